//! The platform's side: writers that insert orders and move them through
//! their statuses (some in transactions held open 1–3 s, some touching only
//! `order_items`, a few deleting an open order), and an order service that
//! publishes ~30 % of the committed versions through `POST /api/orders/events`
//! — some of them late, as a slow service would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Clock;
use crate::dashboard::{fmt_micros, lock};

pub const FLOW: &[&str] = &[
    "pending",
    "confirmed",
    "preparing",
    "ready",
    "served",
    "completed",
];

/// One committed change, for diagnostics.
#[derive(Clone, Debug)]
pub struct Write {
    pub t: f64,
    pub version: i64,
    pub what: String,
}

/// An answer of the publish endpoint.
#[derive(Clone, Debug)]
pub struct Ack {
    pub t: f64,
    /// When the answered request was sent: the event was numbered between
    /// this and `t`.
    pub sent_t: f64,
    pub restaurant: usize,
    pub event_id: String,
    pub order: Uuid,
    pub version: i64,
    pub kind: String,
    /// Answered 200 `duplicate: true` (the id is that of an earlier event).
    pub duplicate: bool,
}

#[derive(Default)]
pub struct WriterStats {
    pub commits: u64,
    pub held: u64,
    pub item_changes: u64,
    pub deletes: u64,
    pub errors: u64,
    pub published: u64,
    pub publish_duplicates: u64,
    pub publish_late: u64,
    pub publish_failed: u64,
}

/// Everything writers record, shared with the final check.
#[derive(Default)]
pub struct Ledger {
    pub writes: HashMap<Uuid, Vec<Write>>,
    pub acks: Vec<Ack>,
    pub stats: WriterStats,
    pub last_error: Option<String>,
}

pub struct WriterCtx {
    pub clock: Clock,
    pub pool: PgPool,
    pub restaurants: Vec<Uuid>,
    pub replicas: Vec<SocketAddr>,
    pub publish_key: String,
    pub http: reqwest::Client,
    pub ledger: Arc<Mutex<Ledger>>,
    pub stop: CancellationToken,
    /// Changes per second over all restaurants.
    pub rate: f64,
    pub seed: u64,
    /// Bounds publishes in flight.
    pub publishing: Arc<Semaphore>,
    /// Share of changes to an existing order that touch only its items.
    pub item_changes: f64,
    /// Share of changes to an existing order that delete it.
    pub deletes: f64,
}

#[derive(Clone)]
struct Local {
    status: String,
    busy: bool,
}

type Orders = Arc<Mutex<HashMap<Uuid, Local>>>;

/// One restaurant's writer, until `stop`.
pub async fn run(ri: usize, ctx: Arc<WriterCtx>) {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ (0xA076_1D64 * (ri as u64 + 1)));
    let restaurant = ctx.restaurants[ri];
    let orders: Orders = Arc::new(Mutex::new(HashMap::new()));
    let period = ctx.restaurants.len() as f64 / ctx.rate;
    let mut next = tokio::time::Instant::now();
    while !ctx.stop.is_cancelled() {
        next += Duration::from_secs_f64(period * rng.random_range(0.5..1.5));
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        if tokio::time::Instant::now() > next + Duration::from_secs(2) {
            // Behind after an outage: do not burst to catch up.
            next = tokio::time::Instant::now();
        }
        let idle: Vec<(Uuid, String)> = {
            let o = lock(&orders);
            let mut v: Vec<_> = o
                .iter()
                .filter(|(_, l)| !l.busy)
                .map(|(id, l)| (*id, l.status.clone()))
                .collect();
            v.sort();
            v
        };
        let p_insert = match idle.len() {
            0..6 => 0.7,
            6..20 => 0.3,
            _ => 0.1,
        };
        let held = rng.random_bool(0.12);
        let delay = if held {
            Duration::from_millis(rng.random_range(1000..3000))
        } else {
            Duration::ZERO
        };
        let publish = rng.random_bool(0.3);
        let late = publish && rng.random_bool(0.2);
        let late_by = Duration::from_millis(rng.random_range(300..2000));
        let change = if idle.is_empty() || rng.random_bool(p_insert) {
            Change::Insert {
                id: Uuid::new_v4(),
                items: rng.random_range(1..4),
            }
        } else {
            let (id, status) = idle[rng.random_range(0..idle.len())].clone();
            let r: f64 = rng.random();
            let (items, deletes) = (ctx.item_changes, ctx.item_changes + ctx.deletes);
            if r < items {
                Change::Items { id }
            } else if r < deletes {
                Change::Delete { id }
            } else if r < deletes + 0.10 {
                Change::Update {
                    id,
                    minutes: rng.random_range(5..60),
                }
            } else {
                let to = if rng.random_bool(0.05) {
                    "cancelled".to_string()
                } else {
                    let i = FLOW.iter().position(|s| *s == status).unwrap_or(0);
                    FLOW[(i + 1).min(FLOW.len() - 1)].to_string()
                };
                Change::Status {
                    id,
                    from: status,
                    to,
                }
            }
        };
        let id = change.id();
        {
            let mut o = lock(&orders);
            o.entry(id)
                .or_insert(Local {
                    status: "pending".into(),
                    busy: false,
                })
                .busy = true;
        }
        let job = {
            let ctx = ctx.clone();
            let orders = orders.clone();
            async move {
                let res = apply(&ctx, restaurant, &change, delay).await;
                match res {
                    Ok(Some((version, order))) => {
                        {
                            let mut o = lock(&orders);
                            match &change {
                                Change::Delete { .. } => {
                                    o.remove(&id);
                                }
                                _ => {
                                    let l = o.get_mut(&id).expect("busy order is held");
                                    l.busy = false;
                                    l.status = order["order_status"]
                                        .as_str()
                                        .unwrap_or("pending")
                                        .to_string();
                                    if crate::dashboard::is_closed(&l.status) {
                                        o.remove(&id);
                                    }
                                }
                            }
                        }
                        let mut l = lock(&ctx.ledger);
                        l.stats.commits += 1;
                        if !delay.is_zero() {
                            l.stats.held += 1;
                        }
                        match &change {
                            Change::Items { .. } => l.stats.item_changes += 1,
                            Change::Delete { .. } => l.stats.deletes += 1,
                            _ => {}
                        }
                        l.writes.entry(id).or_default().push(Write {
                            t: ctx.clock.t(),
                            version,
                            what: change.describe(),
                        });
                        drop(l);
                        if publish && !matches!(change, Change::Delete { .. }) {
                            let body = match &change {
                                Change::Insert { .. } => {
                                    json!({"type": "order_created", "order": order})
                                }
                                Change::Status { from, .. } => json!({
                                    "type": "order_status_changed",
                                    "previous_status": from,
                                    "order": order
                                }),
                                _ => json!({"type": "order_updated", "order": order}),
                            };
                            let ctx2 = ctx.clone();
                            tokio::spawn(async move {
                                if late {
                                    tokio::time::sleep(late_by).await;
                                }
                                publish_event(&ctx2, ri, id, version, body, late).await;
                            });
                        }
                    }
                    Ok(None) => {
                        lock(&orders).remove(&id);
                    }
                    Err(e) => {
                        {
                            let mut l = lock(&ctx.ledger);
                            l.stats.errors += 1;
                            l.last_error = Some(format!("{e}"));
                        }
                        // Did it commit? Ask the database what it holds now.
                        lock(&orders).remove(&id);
                        reload(&ctx, restaurant, &orders).await;
                    }
                }
            }
        };
        if held {
            tokio::spawn(job);
        } else {
            job.await;
        }
    }
}

enum Change {
    Insert { id: Uuid, items: usize },
    Status { id: Uuid, from: String, to: String },
    Update { id: Uuid, minutes: i32 },
    Items { id: Uuid },
    Delete { id: Uuid },
}

impl Change {
    fn id(&self) -> Uuid {
        match self {
            Change::Insert { id, .. }
            | Change::Status { id, .. }
            | Change::Update { id, .. }
            | Change::Items { id }
            | Change::Delete { id } => *id,
        }
    }

    fn describe(&self) -> String {
        match self {
            Change::Insert { items, .. } => format!("insert ({items} items)"),
            Change::Status { from, to, .. } => format!("{from} -> {to}"),
            Change::Update { minutes, .. } => format!("estimated_time = {minutes}"),
            Change::Items { .. } => "order_items quantity + 1".into(),
            Change::Delete { .. } => "DELETE".into(),
        }
    }
}

/// Apply one change in one transaction (held open `hold` before commit).
/// Returns the committed version and the order as the service would
/// publish it, or None when the order is gone.
async fn apply(
    ctx: &WriterCtx,
    restaurant: Uuid,
    change: &Change,
    hold: Duration,
) -> anyhow::Result<Option<(i64, Value)>> {
    let mut tx = tokio::time::timeout(Duration::from_secs(5), ctx.pool.begin()).await??;
    match change {
        Change::Insert { id, items } => {
            sqlx::query(
                "INSERT INTO orders (id, order_number, restaurant_id, table_number, customer_name, \
                 customer_phone, order_status, payment_status, payment_method, total_price, \
                 estimated_time) VALUES ($1, $2, $3, 7, 'Guest', '+100', 'pending', 'pending', \
                 'card', 25.50, 15)",
            )
            .bind(id)
            .bind(format!("ORD-{}", &id.simple().to_string()[..8]))
            .bind(restaurant)
            .execute(&mut *tx)
            .await?;
            for _ in 0..*items {
                sqlx::query(
                    "INSERT INTO order_items (id, order_id, menu_item_id, quantity, unit_price) \
                     VALUES ($1, $2, $3, 1, 12.75)",
                )
                .bind(Uuid::new_v4())
                .bind(id)
                .bind(Uuid::new_v4())
                .execute(&mut *tx)
                .await?;
            }
        }
        Change::Status { id, to, .. } => {
            sqlx::query("UPDATE orders SET order_status = $2 WHERE id = $1")
                .bind(id)
                .bind(to)
                .execute(&mut *tx)
                .await?;
        }
        Change::Update { id, minutes } => {
            sqlx::query("UPDATE orders SET estimated_time = $2 WHERE id = $1")
                .bind(id)
                .bind(minutes)
                .execute(&mut *tx)
                .await?;
        }
        Change::Items { id } => {
            // Touches order_items only: the order's own row is not updated
            // by this statement (hole 10; a trigger must stamp the order).
            sqlx::query(
                "UPDATE order_items SET quantity = quantity + 1 \
                 WHERE id = (SELECT id FROM order_items WHERE order_id = $1 ORDER BY id LIMIT 1)",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        Change::Delete { id } => {
            sqlx::query("DELETE FROM orders WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
    }
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    let order = if matches!(change, Change::Delete { .. }) {
        None
    } else {
        read_order(&mut tx, change.id()).await?
    };
    tokio::time::timeout(Duration::from_secs(5), tx.commit()).await??;
    Ok(match (change, order) {
        (Change::Delete { .. }, _) => Some((0, Value::Null)),
        (_, Some(o)) => {
            let v = o["updated_at"]
                .as_str()
                .and_then(crate::parse_micros)
                .unwrap_or(0);
            Some((v, o))
        }
        (_, None) => None,
    })
}

/// The order as `<order>` JSON, read inside the writing transaction (what
/// an order service holds right after its write).
async fn read_order(conn: &mut sqlx::PgConnection, id: Uuid) -> anyhow::Result<Option<Value>> {
    type Row = (
        Uuid,
        Option<String>,
        Uuid,
        Option<i32>,
        Option<String>,
        Option<String>,
        String,
        Option<String>,
        Option<String>,
        Option<f64>,
        Option<i32>,
        DateTime<Utc>,
        DateTime<Utc>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, order_number, restaurant_id, table_number, customer_name, customer_phone, \
         order_status, payment_status, payment_method, total_price::float8, estimated_time, \
         created_at, updated_at FROM orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let items: Vec<(Uuid, Option<Uuid>, i32, Option<f64>)> = sqlx::query_as(
        "SELECT id, menu_item_id, quantity, unit_price::float8 FROM order_items \
         WHERE order_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let ts = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    Ok(Some(json!({
        "id": r.0, "order_number": r.1, "restaurant_id": r.2, "table_number": r.3,
        "customer_name": r.4, "customer_phone": r.5, "order_status": r.6,
        "payment_status": r.7, "payment_method": r.8, "total_price": r.9,
        "estimated_time": r.10, "created_at": ts(r.11), "updated_at": ts(r.12),
        "items": items.iter().map(|i| json!({
            "id": i.0, "menu_item_id": i.1, "quantity": i.2, "unit_price": i.3
        })).collect::<Vec<_>>(),
    })))
}

async fn reload(ctx: &WriterCtx, restaurant: Uuid, orders: &Orders) {
    for _ in 0..50 {
        if ctx.stop.is_cancelled() {
            return;
        }
        let rows: Result<Vec<(Uuid, String)>, _> = sqlx::query_as(
            "SELECT id, order_status FROM orders WHERE restaurant_id = $1 \
             AND order_status NOT IN ('completed', 'cancelled')",
        )
        .bind(restaurant)
        .fetch_all(&ctx.pool)
        .await;
        if let Ok(rows) = rows {
            let mut o = lock(orders);
            let busy: Vec<Uuid> = o
                .iter()
                .filter(|(_, l)| l.busy)
                .map(|(id, _)| *id)
                .collect();
            o.retain(|_, l| l.busy);
            for (id, status) in rows {
                if !busy.contains(&id) {
                    o.insert(
                        id,
                        Local {
                            status,
                            busy: false,
                        },
                    );
                }
            }
            // The failed change's order is no longer busy.
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// POST the event to a replica, retrying others (a service behind a load
/// balancer would); the same version again is safe (idempotent).
async fn publish_event(
    ctx: &WriterCtx,
    ri: usize,
    order: Uuid,
    version: i64,
    body: Value,
    late: bool,
) {
    let Ok(_permit) = ctx.publishing.clone().try_acquire_owned() else {
        lock(&ctx.ledger).stats.publish_failed += 1;
        return;
    };
    let kind = body["type"].as_str().unwrap_or_default().to_string();
    for attempt in 0..5usize {
        let slot = (order.as_u128() as usize + attempt) % ctx.replicas.len();
        let sent_t = ctx.clock.t();
        let resp = ctx
            .http
            .post(format!("http://{}/api/orders/events", ctx.replicas[slot]))
            .bearer_auth(&ctx.publish_key)
            .timeout(Duration::from_secs(3))
            .json(&body)
            .send()
            .await;
        if let Ok(r) = resp {
            let status = r.status().as_u16();
            if status == 200 || status == 202 {
                let v: Value = r.json().await.unwrap_or(Value::Null);
                let mut l = lock(&ctx.ledger);
                l.stats.published += 1;
                if late {
                    l.stats.publish_late += 1;
                }
                let duplicate = v["duplicate"].as_bool().unwrap_or(false);
                if duplicate {
                    l.stats.publish_duplicates += 1;
                }
                if let Some(eid) = v["event_id"].as_str() {
                    l.acks.push(Ack {
                        t: ctx.clock.t(),
                        sent_t,
                        restaurant: ri,
                        event_id: eid.to_string(),
                        order,
                        version,
                        kind: kind.clone(),
                        duplicate,
                    });
                }
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut l = lock(&ctx.ledger);
    l.stats.publish_failed += 1;
    l.last_error = Some(format!(
        "publish of order {order} v={} failed 5 times",
        fmt_micros(version)
    ));
}
