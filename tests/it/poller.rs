//! Change capture end to end: real PostgreSQL, real Redis, several gateway
//! replicas (in-process, or real processes where signals matter) and
//! dashboards on each. Every test has its own redis-server and database.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use orders_gateway::broker::redis::RedisBroker;
use orders_gateway::broker::{Backend, BrokerError, Lease, PollerStateDelta, PublishRequest};
use orders_gateway::config::{Config, HistoryLimits};
use orders_gateway::domain::RestaurantId;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{
    Gateway, GatewayProcess, Next, PUBLISH_KEY, Redis, TestDb, Ws, config, eventually,
    insert_order, insert_order_in, order_json, post_event, token,
};

const INTERVAL: Duration = Duration::from_millis(200);
/// Commit → dashboard must stay within one interval plus this (a tick, a
/// publish, a fan-out; generous because the suite runs tests in parallel).
const MARGIN: Duration = Duration::from_millis(1000);
/// "Nothing more": several poll intervals of silence.
const QUIET: Duration = Duration::from_millis(1000);

fn cfg(redis: &Redis, db: &TestDb) -> Config {
    let mut c = config();
    c.redis_url = Some(redis.url());
    c.database_url = Some(db.url.clone());
    c.poll_interval_ms = INTERVAL.as_millis() as u64;
    c
}

fn process_env(redis: &Redis, db: &TestDb, ttl_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis.url()),
        ("DATABASE_URL", db.url.clone()),
        ("POLL_INTERVAL_MS", INTERVAL.as_millis().to_string()),
        ("LEADER_TTL_MS", ttl_ms.to_string()),
        ("PRESENCE_TTL_MS", "2000".into()),
    ]
}

/// `n` gateway processes, each with one dashboard of a fresh restaurant.
async fn watched_replicas(
    env: &[(&str, String)],
    n: usize,
) -> (Vec<GatewayProcess>, Vec<Ws>, Uuid) {
    let mut procs = Vec::new();
    for _ in 0..n {
        procs.push(GatewayProcess::start(env).await);
    }
    let r = Uuid::new_v4();
    let q = format!("token={}", token(r));
    let mut boards = Vec::new();
    for p in &procs {
        boards.push(board(p.ws_url(&q)).await.0);
    }
    (procs, boards, r)
}

/// A dashboard past its greeting and snapshot; returns the snapshot.
pub(crate) async fn board(ws_url: String) -> (Ws, Value) {
    let mut ws = Ws::connect(&ws_url).await;
    let hello = ws.json().await;
    assert_eq!(hello["type"], "connection_established", "{hello}");
    let snapshot = ws.json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    (ws, snapshot)
}

/// The next frame within `limit`, or panic.
pub(crate) async fn next_event(ws: &mut Ws, limit: Duration) -> Value {
    match ws.next(limit).await {
        Next::Json(v) => v,
        other => panic!("expected an event within {limit:?}, got {other:?}"),
    }
}

/// Read frames until `done` holds for what was read, or panic at `limit`.
pub(crate) async fn read_until(
    ws: &mut Ws,
    limit: Duration,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    while !done(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws.next(left).await {
            Next::Json(v) => out.push(v),
            other => panic!("after {} frames: {other:?} (limit {limit:?})", out.len()),
        }
    }
    out
}

pub(crate) fn order_id(ev: &Value) -> Uuid {
    ev["order"]["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("event carries an order id")
}

/// Orders created, each once: `ids` all arrived as `order_created`, and no
/// order (of those or any other) arrived twice.
pub(crate) fn assert_created_once(events: &[Value], ids: &HashSet<Uuid>) {
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for ev in events {
        assert_eq!(ev["type"], "order_created", "{ev}");
        *seen.entry(order_id(ev)).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let missing: Vec<_> = ids.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let foreign: Vec<_> = seen.keys().filter(|id| !ids.contains(id)).collect();
    assert!(foreign.is_empty(), "unexpected orders: {foreign:?}");
}

async fn redis_get(redis: &Redis, key: &str) -> Option<String> {
    redis::from_redis_value(redis.cmd(&["GET", key]).await.unwrap()).unwrap()
}

async fn redis_keys(redis: &Redis, pattern: &str) -> Vec<String> {
    redis::from_redis_value(redis.cmd(&["KEYS", pattern]).await.unwrap()).unwrap()
}

/// The instance holding the poller lock (`<epoch>:<instance_id>:<nonce>`).
async fn leader(redis: &Redis) -> Option<(u64, String)> {
    let token = redis_get(redis, "og:{og}:leader").await?;
    let epoch = token.split(':').next()?.parse().ok()?;
    Some((epoch, Lease::holder_of(&token)?))
}

/// Until the poller has finished a tick (saved its cursor): from then on
/// every commit is read by some later tick.
async fn captured(redis: &Redis) {
    eventually(Duration::from_secs(10), || async {
        redis_get(redis, "og:{og}:poll:cursor").await.map(|_| ())
    })
    .await
}

/// Insert `n` orders of `restaurant`, with two items each, in one statement.
async fn insert_bulk(conn: &mut sqlx::PgConnection, restaurant: Uuid, n: i32) {
    sqlx::query(
        "WITH o AS (
           INSERT INTO orders (id, order_number, restaurant_id, table_number, customer_name,
                               customer_phone, order_status, payment_status, payment_method,
                               total_price, estimated_time)
           SELECT gen_random_uuid(), 'BULK-' || g, $1, g % 40, 'Guest', '+100', 'pending',
                  'pending', 'card', 25.50, 15
           FROM generate_series(1, $2) g
           RETURNING id)
         INSERT INTO order_items (id, order_id, menu_item_id, quantity, unit_price)
         SELECT gen_random_uuid(), o.id, gen_random_uuid(), k, 12.75 FROM o, generate_series(1, 2) k",
    )
    .bind(restaurant)
    .bind(n)
    .execute(conn)
    .await
    .unwrap();
}

// ---------------------------------------------------------------- classification

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_order_reaches_every_dashboard_on_every_replica_once() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let a = Gateway::start(cfg(&redis, &db)).await;
    let b = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let q = format!("token={}", token(r));
    let mut boards = Vec::new();
    for gw in [&a, &a, &b, &b] {
        boards.push(board(gw.ws_url(&q)).await.0);
    }
    captured(&redis).await;
    let pool = db.pool().await;
    let committed = Instant::now();
    let id = insert_order(&pool, r, "pending", 2).await;
    let mut event_ids = HashSet::new();
    for ws in &mut boards {
        let ev = next_event(ws, INTERVAL + MARGIN).await;
        assert!(
            committed.elapsed() <= INTERVAL + MARGIN,
            "delivered {:?} after the commit",
            committed.elapsed()
        );
        assert_eq!(ev["type"], "order_created", "{ev}");
        assert!(ev.get("previous_status").is_none(), "{ev}");
        assert!(ev["timestamp"].is_string());
        let order = &ev["order"];
        assert_eq!(order["id"], id.to_string());
        assert_eq!(order["restaurant_id"], r.to_string());
        assert_eq!(order["order_status"], "pending");
        assert_eq!(order["total_price"], json!(25.5), "a JSON number");
        let items = order["items"].as_array().expect("items");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["quantity"], 2);
        assert_eq!(items[0]["unit_price"], json!(12.75));
        event_ids.insert(ev["event_id"].as_str().expect("numbered").to_string());
    }
    assert_eq!(event_ids.len(), 1, "one event, fanned out: {event_ids:?}");
    for ws in &mut boards {
        ws.silent_for(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_change_and_a_payment_update_are_one_event_each() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let a = Gateway::start(cfg(&redis, &db)).await;
    let b = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let q = format!("token={}", token(r));
    let (mut on_a, _) = board(a.ws_url(&q)).await;
    let (mut on_b, _) = board(b.ws_url(&q)).await;
    let pool = db.pool().await;
    let id = insert_order(&pool, r, "pending", 1).await;
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(
            next_event(ws, INTERVAL + MARGIN).await["type"],
            "order_created"
        );
    }

    sqlx::query("UPDATE orders SET order_status = 'confirmed' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    for ws in [&mut on_a, &mut on_b] {
        let ev = next_event(ws, INTERVAL + MARGIN).await;
        assert_eq!(ev["type"], "order_status_changed", "{ev}");
        assert_eq!(ev["previous_status"], "pending");
        assert_eq!(ev["order"]["order_status"], "confirmed");
        assert_eq!(ev["order"]["items"].as_array().unwrap().len(), 1);
        ws.silent_for(QUIET).await;
    }

    sqlx::query("UPDATE orders SET payment_status = 'paid' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    for ws in [&mut on_a, &mut on_b] {
        let ev = next_event(ws, INTERVAL + MARGIN).await;
        assert_eq!(ev["type"], "order_updated", "{ev}");
        assert!(ev.get("previous_status").is_none(), "{ev}");
        assert_eq!(ev["order"]["payment_status"], "paid");
        assert_eq!(ev["order"]["order_status"], "confirmed");
        ws.silent_for(QUIET).await;
    }
}

/// Every restaurant is captured, dashboards or not: the changes of one that
/// nobody watches are numbered and remembered for its next dashboard, and no
/// other restaurant's dashboard sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restaurant_without_dashboards_is_captured_for_its_next_dashboard() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let a = Gateway::start(cfg(&redis, &db)).await;
    let b = Gateway::start(cfg(&redis, &db)).await;
    let watched_r = Uuid::new_v4();
    let idle = Uuid::new_v4();
    let q = format!("token={}", token(watched_r));
    let (mut on_a, _) = board(a.ws_url(&q)).await;
    let (mut on_b, _) = board(b.ws_url(&q)).await;
    captured(&redis).await;
    let pool = db.pool().await;
    let idle_order = insert_order(&pool, idle, "pending", 1).await;
    let seen = insert_order(&pool, watched_r, "pending", 1).await;
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(order_id(&next_event(ws, INTERVAL + MARGIN).await), seen);
    }
    sqlx::query("UPDATE orders SET order_status = 'preparing' WHERE id = $1")
        .bind(idle_order)
        .execute(&pool)
        .await
        .unwrap();
    // Both versions of the idle restaurant's order are in its history...
    let history = format!("og:{{orders:{idle}}}:hist");
    eventually(Duration::from_secs(5), || async {
        let v = redis.cmd(&["ZCARD", &history]).await.ok()?;
        (redis::from_redis_value::<i64>(v).ok()? == 2).then_some(())
    })
    .await;
    for ws in [&mut on_a, &mut on_b] {
        ws.silent_for(QUIET).await;
    }
    // ...and remembered.
    let key = format!("og:{{og}}:poll:known:{idle}");
    eventually(Duration::from_secs(5), || async {
        let v = redis
            .cmd(&["HGET", &key, &idle_order.to_string()])
            .await
            .ok()?;
        let known: Option<String> = redis::from_redis_value(v).ok()?;
        known?.starts_with("preparing|").then_some(())
    })
    .await;
    // Its first dashboard starts from the current state.
    let (mut ws, snapshot) = board(b.ws_url(&format!("token={}", token(idle)))).await;
    let orders = snapshot["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 1, "{snapshot}");
    assert_eq!(orders[0]["order_status"], "preparing");
    ws.silent_for(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_existed_before_the_dashboard_are_not_replayed() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let r = Uuid::new_v4();
    let pool = db.pool().await;
    // Before the poller's first start: old rows (long before its window,
    // the baseline) and a fresh one (inside it: the poller reports it, the
    // dashboard's snapshot already shows it).
    let old = insert_order(&pool, r, "pending", 1).await;
    let closed = insert_order(&pool, r, "completed", 1).await;
    sqlx::raw_sql(
        "BEGIN; SET LOCAL session_replication_role = replica; \
         UPDATE orders SET created_at = now() - interval '1 hour', updated_at = now() - interval '1 hour'; \
         COMMIT",
    )
    .execute(&pool)
    .await
    .unwrap();
    let fresh = insert_order(&pool, r, "confirmed", 2).await;

    let gw = Gateway::start(cfg(&redis, &db)).await;
    let (mut ws, snapshot) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let in_snapshot: HashSet<Uuid> = snapshot["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(in_snapshot, HashSet::from([old, fresh]), "open orders only");
    captured(&redis).await;
    ws.silent_for(QUIET).await;
    assert!(
        redis_get(&redis, &format!("og:{{orders:{r}}}:v:{old}"))
            .await
            .is_none(),
        "an old row is not published"
    );

    // Later changes to them are compared with what existed.
    for (id, status) in [(old, "preparing"), (fresh, "ready")] {
        sqlx::query("UPDATE orders SET order_status = $2 WHERE id = $1")
            .bind(id)
            .bind(status)
            .execute(&pool)
            .await
            .unwrap();
    }
    let events = read_until(&mut ws, INTERVAL + MARGIN * 2, |e| e.len() == 2).await;
    let by_id: HashMap<Uuid, &Value> = events.iter().map(|e| (order_id(e), e)).collect();
    assert_eq!(by_id[&old]["type"], "order_status_changed");
    assert_eq!(by_id[&old]["previous_status"], "pending");
    assert_eq!(by_id[&fresh]["type"], "order_status_changed");
    assert_eq!(by_id[&fresh]["previous_status"], "confirmed");
    // A closed order touched again is news, though never seen before.
    sqlx::query("UPDATE orders SET payment_status = 'refunded' WHERE id = $1")
        .bind(closed)
        .execute(&pool)
        .await
        .unwrap();
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(
        (ev["type"].as_str(), order_id(&ev)),
        (Some("order_updated"), closed)
    );
    ws.silent_for(QUIET).await;
}

// ---------------------------------------------------------------- every restaurant, always

/// Reconnect with `last_event_id` and return the order ids the dashboard
/// learns about: the events replayed (`resumed: true`), or the snapshot after
/// `resync_required` (`resumed: false`). Either keeps the board right; silence
/// does not.
async fn resume(url: &str, last_event_id: &str, expect: &[Uuid]) -> (Ws, Vec<Value>) {
    let mut ws = Ws::connect(&format!("{url}&last_event_id={last_event_id}")).await;
    let hello = ws.json().await;
    assert_eq!(hello["type"], "connection_established", "{hello}");
    if hello["resumed"] == true {
        let events = read_until(&mut ws, INTERVAL + MARGIN * 2, |e| {
            expect
                .iter()
                .all(|id| e.iter().any(|e| e["order"]["id"] == id.to_string()))
        })
        .await;
        (ws, events)
    } else {
        let resync = ws.json().await;
        assert_eq!(resync["type"], "resync_required", "{resync}");
        let snapshot = ws.json().await;
        assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
        let orders = snapshot["orders"].as_array().unwrap().clone();
        for id in expect {
            assert!(
                orders.iter().any(|o| o["id"] == id.to_string()),
                "{snapshot}"
            );
        }
        (ws, vec![])
    }
}

/// Issue 9, hole 1: the restaurant's only dashboard is away longer than the
/// presence TTL, an order is written meanwhile and falls behind the cursor;
/// resuming must replay it (or resync), never answer `resumed: true` and stay
/// silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_away_longer_than_presence_resumes_with_what_changed() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let mut c = cfg(&redis, &db);
    c.presence_ttl_ms = 1000;
    c.poll_overlap_ms = 0;
    let gw = Gateway::start(c).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut ws, _) = board(url.clone()).await;
    captured(&redis).await;
    let pool = db.pool().await;
    let first = insert_order(&pool, r, "pending", 1).await;
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(order_id(&ev), first);
    let seen = ev["event_id"].as_str().unwrap().to_string();
    drop(ws);

    // Away for longer than the presence TTL (and many ticks).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let meanwhile = insert_order(&pool, r, "pending", 1).await;
    sqlx::query("UPDATE orders SET order_status = 'confirmed' WHERE id = $1")
        .bind(first)
        .execute(&pool)
        .await
        .unwrap();
    // The cursor moves well past both writes before the dashboard returns.
    tokio::time::sleep(INTERVAL * 6).await;

    let (mut ws, events) = resume(&url, &seen, &[meanwhile, first]).await;
    if !events.is_empty() {
        let kinds: HashMap<Uuid, &str> = events
            .iter()
            .map(|e| (order_id(e), e["type"].as_str().unwrap()))
            .collect();
        assert_eq!(kinds[&meanwhile], "order_created", "{events:?}");
        assert_eq!(kinds[&first], "order_status_changed", "{events:?}");
        assert_eq!(events.len(), 2, "{events:?}");
    }
    ws.silent_for(QUIET).await;
}

/// Issue 9, hole 10c, and failover: what the poller knows of an open order
/// never expires, and a new leader loads it for every restaurant with saved
/// state, dashboards or not: the order's next status change is still an
/// `order_status_changed`, replayed to the dashboard when it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_knows_every_open_order_however_quiet() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let a = Gateway::start(cfg(&redis, &db)).await;
    let b = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let (_, holder) = eventually(Duration::from_secs(5), || leader(&redis)).await;
    let (leading, staying) = if holder == a.instance_id {
        (a, b)
    } else {
        (b, a)
    };
    let url = staying.ws_url(&format!("token={}", token(r)));
    let (mut ws, _) = board(url.clone()).await;
    captured(&redis).await;
    let pool = db.pool().await;
    let id = insert_order(&pool, r, "pending", 1).await;
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(order_id(&ev), id);
    let seen = ev["event_id"].as_str().unwrap().to_string();
    drop(ws);

    let key = format!("og:{{og}}:poll:known:{r}");
    eventually(Duration::from_secs(5), || async {
        let v = redis.cmd(&["HEXISTS", &key, &id.to_string()]).await.ok()?;
        (redis::from_redis_value::<i64>(v).ok()? == 1).then_some(())
    })
    .await;
    let ttl: i64 = redis::from_redis_value(redis.cmd(&["PTTL", &key]).await.unwrap()).unwrap();
    assert_eq!(ttl, -1, "known state of an open order has no expiry");
    let member: i64 = redis::from_redis_value(
        redis
            .cmd(&["SISMEMBER", "og:{og}:poll:restaurants", &r.to_string()])
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(member, 1, "the restaurant is listed for the next leader");

    // No dashboard anywhere, then a new leader.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    leading.shutdown().await;
    eventually(Duration::from_secs(5), || async {
        leader(&redis)
            .await
            .filter(|(_, h)| *h == staying.instance_id)
    })
    .await;
    sqlx::query("UPDATE orders SET order_status = 'confirmed' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::sleep(INTERVAL * 6).await;

    let (mut ws, events) = resume(&url, &seen, &[id]).await;
    assert_eq!(events.len(), 1, "history replays it: {events:?}");
    assert_eq!(events[0]["type"], "order_status_changed", "{events:?}");
    assert_eq!(events[0]["previous_status"], "pending");
    ws.silent_for(QUIET).await;
}

// ---------------------------------------------------------------- what a foreign schema allows

/// Issue 9, hole 5: in a schema the gateway did not create, columns the
/// contract does not name as keys may be NULL. Such a row is delivered with
/// `null`s; a row without a restaurant or version is skipped and reported;
/// everyone else keeps flowing, and snapshots skip such rows instead of
/// failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_nulls_never_stop_change_capture() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let pool = db.pool().await;
    sqlx::raw_sql(
        "ALTER TABLE orders ALTER COLUMN restaurant_id DROP NOT NULL, \
           ALTER COLUMN order_status DROP NOT NULL, ALTER COLUMN created_at DROP NOT NULL, \
           ALTER COLUMN updated_at DROP NOT NULL; \
         ALTER TABLE order_items ALTER COLUMN quantity DROP NOT NULL",
    )
    .execute(&pool)
    .await
    .unwrap();
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut ws, _) = board(url.clone()).await;
    captured(&redis).await;

    // Nobody's order: no restaurant.
    let orphan = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO orders (id, restaurant_id, order_status) VALUES ($1, NULL, 'pending')",
    )
    .bind(orphan)
    .execute(&pool)
    .await
    .unwrap();
    // NULLs the contract allows, in the order and in an item.
    let sparse = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO orders (id, restaurant_id, order_status, created_at) VALUES ($1, $2, NULL, NULL)",
    )
    .bind(sparse)
    .bind(r)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("INSERT INTO order_items (id, order_id, quantity) VALUES ($1, $2, NULL)")
        .bind(Uuid::new_v4())
        .bind(sparse)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let fine = insert_order(&pool, r, "pending", 1).await;

    let events = read_until(&mut ws, INTERVAL + MARGIN * 2, |e| e.len() == 2).await;
    let by_id: HashMap<Uuid, &Value> = events.iter().map(|e| (order_id(e), e)).collect();
    assert_eq!(by_id[&fine]["type"], "order_created");
    let s = &by_id[&sparse]["order"];
    assert_eq!(by_id[&sparse]["type"], "order_created", "{s}");
    for field in ["order_status", "created_at", "order_number", "total_price"] {
        assert!(s[field].is_null(), "{field} goes out as null: {s}");
    }
    assert!(s["items"][0]["quantity"].is_null(), "{s}");
    ws.silent_for(QUIET).await;
    let text = crate::support::metrics(&format!("http://{}", gw.addr)).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("orders_gateway_poller_rows_skipped_total{source=\"poll\"}")),
        "{text}"
    );

    // The board keeps working: later changes arrive...
    sqlx::query("UPDATE orders SET order_status = 'ready' WHERE id = $1")
        .bind(fine)
        .execute(&pool)
        .await
        .unwrap();
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(ev["type"], "order_status_changed", "{ev}");
    // ...and a snapshot leaves out an open row without a version.
    sqlx::query(
        "INSERT INTO orders (id, restaurant_id, order_status, updated_at) VALUES ($1, $2, 'pending', NULL)",
    )
    .bind(Uuid::new_v4())
    .bind(r)
    .execute(&pool)
    .await
    .unwrap();
    let (_, snapshot) = board(url).await;
    let ids: Vec<&str> = snapshot["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![fine.to_string()], "{snapshot}");
}

/// Issue 9, hole 10a: a change to an order's items alone is a change to the
/// order (the migrations' trigger stamps the order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_change_alone_reaches_dashboards() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    captured(&redis).await;
    let pool = db.pool().await;
    let id = insert_order(&pool, r, "pending", 1).await;
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(
        (ev["type"].as_str(), order_id(&ev)),
        (Some("order_created"), id)
    );
    ws.silent_for(QUIET).await;

    let item = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO order_items (id, order_id, menu_item_id, quantity, unit_price) \
         VALUES ($1, $2, NULL, 1, 3.00)",
    )
    .bind(item)
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(ev["type"], "order_updated", "{ev}");
    assert_eq!(ev["order"]["items"].as_array().unwrap().len(), 2, "{ev}");

    sqlx::query("UPDATE order_items SET quantity = 5 WHERE id = $1")
        .bind(item)
        .execute(&pool)
        .await
        .unwrap();
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(ev["type"], "order_updated", "{ev}");
    let items = ev["order"]["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .any(|i| i["id"] == item.to_string() && i["quantity"] == 5),
        "{ev}"
    );

    sqlx::query("DELETE FROM order_items WHERE id = $1")
        .bind(item)
        .execute(&pool)
        .await
        .unwrap();
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(ev["type"], "order_updated", "{ev}");
    assert_eq!(ev["order"]["items"].as_array().unwrap().len(), 1, "{ev}");
    ws.silent_for(QUIET).await;
}

/// Issue 9, hole 10b: an open order deleted from the table leaves every
/// board: `order_deleted` (from the migrations' tombstone trigger, or, in a
/// schema without it, from the poller's periodic check), and snapshots no
/// longer show it. Closed orders' deletions are nobody's news.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_open_order_leaves_every_board() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let a = Gateway::start(cfg(&redis, &db)).await;
    let b = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let q = format!("token={}", token(r));
    let mut boards = vec![board(a.ws_url(&q)).await.0, board(b.ws_url(&q)).await.0];
    captured(&redis).await;
    let pool = db.pool().await;
    let gone = insert_order(&pool, r, "pending", 1).await;
    let later = insert_order(&pool, r, "pending", 1).await;
    let closed = insert_order(&pool, r, "completed", 1).await;
    for ws in &mut boards {
        read_until(ws, INTERVAL + MARGIN * 2, |e| e.len() == 3).await;
    }
    tokio::time::sleep(QUIET).await; // the closed order falls out of the window

    let deleted = |ev: &Value, id: Uuid| {
        assert_eq!(ev["type"], "order_deleted", "{ev}");
        assert_eq!(
            ev["order"],
            json!({"id": id.to_string(), "restaurant_id": r.to_string()})
        );
        assert!(
            ev["event_id"].is_string() && ev["timestamp"].is_string(),
            "{ev}"
        );
    };
    sqlx::query("DELETE FROM orders WHERE id = ANY($1)")
        .bind(vec![gone, closed])
        .execute(&pool)
        .await
        .unwrap();
    for ws in &mut boards {
        deleted(&next_event(ws, INTERVAL + MARGIN).await, gone);
        ws.silent_for(QUIET).await;
    }
    let (_, snapshot) = board(a.ws_url(&q)).await;
    assert_eq!(
        snapshot["orders"].as_array().unwrap().len(),
        1,
        "{snapshot}"
    );

    // A schema without the trigger: the periodic check finds it.
    sqlx::raw_sql("DROP TRIGGER orders_leave_tombstone ON orders")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM orders WHERE id = $1")
        .bind(later)
        .execute(&pool)
        .await
        .unwrap();
    for ws in &mut boards {
        deleted(&next_event(ws, INTERVAL * 15 + MARGIN * 2).await, later);
        ws.silent_for(QUIET).await;
    }
}

/// Found by the Redis Cluster soak (seed 1, a `stop-leader`): an order the
/// order service published through the endpoint and that was deleted before
/// any tick read its row (here: inserted and deleted in one transaction, so
/// no tick can) is on the board; the poller never knew it, and used to skip
/// its tombstone as "nobody's news", leaving it on every board for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_deleted_before_the_poller_saw_it_leaves_the_board() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    captured(&redis).await;
    let pool = db.pool().await;

    let id = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    insert_order_in(&mut tx, id, r, "pending", 1).await;
    let base = format!("http://{}", gw.addr);
    let created = json!({"type": "order_created", "order": order_json(r, id, "pending")});
    let (status, _) = post_event(&base, &created).await;
    assert_eq!(status, 202);
    let ev = next_event(&mut ws, MARGIN).await;
    assert_eq!(
        (ev["type"].as_str(), order_id(&ev)),
        (Some("order_created"), id)
    );
    sqlx::query("DELETE FROM orders WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(ev["type"], "order_deleted", "{ev}");
    assert_eq!(
        ev["order"],
        json!({"id": id.to_string(), "restaurant_id": r.to_string()})
    );
    // Once: the ticks that read the tombstone again are duplicates.
    ws.silent_for(QUIET).await;
}

/// Commit order `id` with `other_items` items off the menu and one of
/// `menu_item`, in one transaction.
async fn commit_order_with_menu_item(
    pool: &sqlx::PgPool,
    id: Uuid,
    r: Uuid,
    other_items: usize,
    menu_item: Uuid,
) {
    let mut tx = pool.begin().await.unwrap();
    insert_order_in(&mut tx, id, r, "pending", other_items).await;
    sqlx::query(
        "INSERT INTO order_items (id, order_id, menu_item_id, quantity, unit_price) \
         VALUES (gen_random_uuid(), $1, $2, 1, 9.50)",
    )
    .bind(id)
    .bind(menu_item)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Issue 13, item 2: with a `menu_items(id, name)` table, items carry their
/// name, in events and snapshots; the publish endpoint passes names through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_carry_their_menu_names_when_the_table_exists() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let pizza = Uuid::new_v4();
    sqlx::raw_sql("CREATE TABLE menu_items (id uuid PRIMARY KEY, name text, price numeric(10,2))")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO menu_items (id, name, price) VALUES ($1, 'Margherita', 9.50)")
        .bind(pizza)
        .execute(&pool)
        .await
        .unwrap();
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let q = format!("token={}", token(r));
    let (mut ws, _) = board(gw.ws_url(&q)).await;
    captured(&redis).await;

    let id = Uuid::new_v4();
    // One item not on the menu, and the pizza.
    commit_order_with_menu_item(&pool, id, r, 1, pizza).await;
    let names = |order: &Value| -> Vec<Option<String>> {
        let mut v: Vec<_> = order["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.get("name").map(|n| n.as_str().unwrap().to_string()))
            .collect();
        v.sort();
        v
    };
    let expected = vec![None, Some("Margherita".to_string())];
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(names(&ev["order"]), expected, "{ev}");
    let (_, snapshot) = board(gw.ws_url(&q)).await;
    assert_eq!(names(&snapshot["orders"][0]), expected, "{snapshot}");

    let mut order = order_json(r, Uuid::new_v4(), "pending");
    order["items"][0]["name"] = json!("Tiramisu");
    let (status, body) = post_event(
        &format!("http://{}", gw.addr),
        &json!({"type": "order_created", "order": order}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let ev = next_event(&mut ws, MARGIN).await;
    assert_eq!(ev["order"]["items"][0]["name"], "Tiramisu", "{ev}");
}

/// `menu_items` dropped while the gateway runs: the next query fails on
/// the missing table, the gateway stops asking for names at once, and the
/// order arrives without them (not after the minute's re-check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_menu_table_dropped_at_runtime_costs_names_not_orders() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let pool = db.pool().await;
    sqlx::raw_sql("CREATE TABLE menu_items (id uuid PRIMARY KEY, name text)")
        .execute(&pool)
        .await
        .unwrap();
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    captured(&redis).await;
    sqlx::raw_sql("DROP TABLE menu_items")
        .execute(&pool)
        .await
        .unwrap();
    let id = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    insert_order_in(&mut tx, id, r, "pending", 1).await;
    tx.commit().await.unwrap();
    let ev = next_event(&mut ws, INTERVAL * 3 + MARGIN).await;
    assert_eq!(ev["order"]["id"], id.to_string(), "{ev}");
    assert!(ev["order"]["items"][0].get("name").is_none(), "{ev}");
    // A board connecting now gets it in its snapshot too.
    let (_, snapshot) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    assert_eq!(snapshot["orders"][0]["id"], id.to_string(), "{snapshot}");
}

/// A foreign `menu_items` whose `name` is not text (here jsonb, as schemas
/// with translated names have) must not cost the order: its items carry
/// the name's text form, and the order arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_menu_name_that_is_not_text_does_not_drop_the_order() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let pizza = Uuid::new_v4();
    sqlx::raw_sql("CREATE TABLE menu_items (id uuid PRIMARY KEY, name jsonb)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(r#"INSERT INTO menu_items (id, name) VALUES ($1, '{"en": "Margherita"}')"#)
        .bind(pizza)
        .execute(&pool)
        .await
        .unwrap();
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    captured(&redis).await;

    let id = Uuid::new_v4();
    commit_order_with_menu_item(&pool, id, r, 0, pizza).await;
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(ev["order"]["id"], id.to_string(), "{ev}");
    let name = ev["order"]["items"][0]["name"].as_str().unwrap_or_default();
    assert!(name.contains("Margherita"), "{ev}");
}

// ---------------------------------------------------------------- no missed commits

/// A transaction that stamps its rows at its start but commits seconds later,
/// after many polls (and far outside the re-read overlap), is still seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_commit_is_delivered_exactly_once() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let mut c = cfg(&redis, &db);
    c.poll_overlap_ms = 0; // only the open-transaction horizon protects it
    let gw = Gateway::start(c).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let pool = db.pool().await;
    let existing = insert_order(&pool, r, "pending", 1).await;
    assert_eq!(
        order_id(&next_event(&mut ws, INTERVAL + MARGIN).await),
        existing
    );

    let mut slow = pool.begin().await.unwrap();
    let started: (chrono::DateTime<chrono::Utc>,) = sqlx::query_as("SELECT now()")
        .fetch_one(&mut *slow)
        .await
        .unwrap();
    let delayed = Uuid::new_v4();
    insert_order_in(&mut slow, delayed, r, "pending", 2).await;
    sqlx::query("UPDATE orders SET order_status = 'preparing' WHERE id = $1")
        .bind(existing)
        .execute(&mut *slow)
        .await
        .unwrap();
    // Meanwhile other orders commit and are delivered: the poller moves on.
    let mut others = Vec::new();
    let hold = Instant::now();
    while hold.elapsed() < INTERVAL * 7 {
        let id = insert_order(&pool, r, "pending", 0).await;
        let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
        assert_eq!(
            (ev["type"].as_str(), order_id(&ev)),
            (Some("order_created"), id)
        );
        others.push(id);
    }
    assert!(others.len() >= 3);
    slow.commit().await.unwrap();

    let events = read_until(&mut ws, INTERVAL + MARGIN, |e| e.len() == 2).await;
    let by_id: HashMap<Uuid, &Value> = events.iter().map(|e| (order_id(e), e)).collect();
    let d = by_id.get(&delayed).expect("the delayed insert arrives");
    assert_eq!(d["type"], "order_created");
    assert_eq!(d["order"]["items"].as_array().unwrap().len(), 2);
    let stamped: chrono::DateTime<chrono::Utc> =
        d["order"]["updated_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        stamped, started.0,
        "stamped at its transaction's start, seconds ago"
    );
    let e = by_id.get(&existing).expect("the delayed update arrives");
    assert_eq!(e["type"], "order_status_changed");
    assert_eq!(e["previous_status"], "pending");
    ws.silent_for(QUIET).await;
}

/// A transaction that began before another one but writes the same order
/// after that one committed. With `now()` alone its row would carry the older
/// timestamp; the migrations' trigger keeps `updated_at` moving forward.
/// Returns (the first change's event, the later change's event).
async fn older_transaction_writes_last(db: &TestDb, redis: &Redis) -> (Value, Value) {
    let gw = Gateway::start(cfg(redis, db)).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let pool = db.pool().await;
    let id = insert_order(&pool, r, "pending", 1).await;
    assert_eq!(
        next_event(&mut ws, INTERVAL + MARGIN).await["type"],
        "order_created"
    );

    let mut early = pool.begin().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *early).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    sqlx::query("UPDATE orders SET order_status = 'confirmed' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let confirmed = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(confirmed["type"], "order_status_changed");

    sqlx::query("UPDATE orders SET payment_status = 'paid' WHERE id = $1")
        .bind(id)
        .execute(&mut *early)
        .await
        .unwrap();
    early.commit().await.unwrap();
    let paid = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(paid["type"], "order_updated", "{paid}");
    assert_eq!(paid["order"]["payment_status"], "paid");
    assert_eq!(paid["order"]["order_status"], "confirmed");
    ws.silent_for(QUIET).await;
    (confirmed, paid)
}

fn updated_at(ev: &Value) -> chrono::DateTime<chrono::Utc> {
    ev["order"]["updated_at"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_write_by_an_older_transaction_is_delivered_as_newer() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let (confirmed, paid) = older_transaction_writes_last(&db, &redis).await;
    assert!(
        updated_at(&paid) > updated_at(&confirmed),
        "versions move forward"
    );
}

/// The same against a schema whose trigger stamps plain `now()` (as the
/// platform's may): the poller still reports the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_write_stamped_earlier_by_a_foreign_trigger_is_delivered() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION orders_touch_updated_at() RETURNS trigger AS $$ \
         BEGIN NEW.updated_at := now(); RETURN NEW; END; $$ LANGUAGE plpgsql",
    )
    .execute(&db.pool().await)
    .await
    .unwrap();
    let (confirmed, paid) = older_transaction_writes_last(&db, &redis).await;
    let id: Uuid = paid["order"]["id"].as_str().unwrap().parse().unwrap();
    let stamped: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT updated_at FROM orders WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool().await)
            .await
            .unwrap();
    assert!(
        stamped < updated_at(&confirmed),
        "the newer state carries the older stamp in the table"
    );
    assert!(
        updated_at(&paid) > updated_at(&confirmed),
        "but is published as a newer version, so no dashboard drops it as stale"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_in_one_transaction_all_arrive_once() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    captured(&redis).await;
    let pool = db.pool().await;
    let mut conn = pool.acquire().await.unwrap();
    insert_bulk(&mut conn, r, 10_000).await;
    let ids: HashSet<Uuid> = sqlx::query_scalar("SELECT id FROM orders WHERE restaurant_id = $1")
        .bind(r)
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ids.len(), 10_000);
    let started = Instant::now();
    let events = read_until(&mut ws, Duration::from_secs(60), |e| e.len() == ids.len()).await;
    eprintln!(
        "10,000 orders of one tick delivered in {:?}",
        started.elapsed()
    );
    assert_created_once(&events, &ids);
    assert!(
        events
            .iter()
            .all(|e| e["order"]["items"].as_array().unwrap().len() == 2)
    );
    let mut event_ids: Vec<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    event_ids.sort_unstable();
    event_ids.dedup();
    assert_eq!(event_ids.len(), 10_000);
    ws.silent_for(QUIET).await;
}

/// A busy restaurant: its snapshot is one big frame (here ~1 MB), and its
/// dashboards must still connect and then receive changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restaurant_with_thousands_of_open_orders_gets_its_snapshot_and_events() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let r = Uuid::new_v4();
    let pool = db.pool().await;
    // Open orders from before the poller's first start (and its first
    // window): its baseline, not events.
    insert_bulk(&mut pool.acquire().await.unwrap(), r, 2_000).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let (mut ws, snapshot) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    captured(&redis).await;
    assert_eq!(snapshot["orders"].as_array().unwrap().len(), 2_000);
    let id = insert_order(&pool, r, "pending", 1).await;
    let ev = next_event(&mut ws, INTERVAL + MARGIN * 2).await;
    assert_eq!(
        (ev["type"].as_str(), order_id(&ev)),
        (Some("order_created"), id)
    );
}

// ---------------------------------------------------------------- leadership

/// The leader dies mid-stream: after takeover every order has reached the
/// dashboards of the surviving replicas, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_loses_and_repeats_nothing() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let env = process_env(&redis, &db, 1000);
    let (procs, mut boards, r) = watched_replicas(&env, 3).await;
    let (epoch, holder) = eventually(Duration::from_secs(5), || leader(&redis)).await;
    let victim = procs
        .iter()
        .position(|p| p.instance_id == holder)
        .expect("a replica leads");
    captured(&redis).await;

    let pool = db.pool().await;
    let inserter = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut ids = HashSet::new();
            for _ in 0..60 {
                ids.insert(insert_order(&pool, r, "pending", 1).await);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            ids
        }
    });
    tokio::time::sleep(Duration::from_millis(900)).await;
    procs[victim].signal("KILL");
    let killed = Instant::now();
    let (new_epoch, new_holder) = eventually(Duration::from_secs(5), || async {
        leader(&redis).await.filter(|(_, h)| *h != holder)
    })
    .await;
    eprintln!("new leader {new_holder} after {:?}", killed.elapsed());
    assert!(new_epoch > epoch, "a takeover takes a new fencing epoch");
    assert!(killed.elapsed() < Duration::from_millis(1000) + INTERVAL * 3);
    let ids = inserter.await.unwrap();

    for (i, ws) in boards.iter_mut().enumerate() {
        if i == victim {
            continue;
        }
        let events = read_until(ws, Duration::from_secs(10), |e| {
            e.iter().map(order_id).collect::<HashSet<_>>().len() == ids.len()
        })
        .await;
        ws.silent_for(QUIET).await;
        assert_created_once(&events, &ids);
    }
}

/// The leader is frozen past its TTL (SIGSTOP), another replica takes over,
/// then the old one wakes up mid-tick: its stale lease is refused, nothing
/// reaches dashboards twice or out of date, and it does not lead again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_cannot_publish_after_waking() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let env = process_env(&redis, &db, 1000);
    let (procs, mut boards, r) = watched_replicas(&env, 2).await;
    let (_, holder) = eventually(Duration::from_secs(5), || leader(&redis)).await;
    let paused = procs.iter().position(|p| p.instance_id == holder).unwrap();
    let pool = db.pool().await;
    let first = insert_order(&pool, r, "pending", 1).await;
    for ws in &mut boards {
        assert_eq!(order_id(&next_event(ws, INTERVAL + MARGIN).await), first);
    }

    procs[paused].signal("STOP");
    let second = insert_order(&pool, r, "pending", 1).await;
    sqlx::query("UPDATE orders SET order_status = 'preparing' WHERE id = $1")
        .bind(first)
        .execute(&pool)
        .await
        .unwrap();
    let (_, successor) = eventually(Duration::from_secs(5), || async {
        leader(&redis).await.filter(|(_, h)| *h != holder)
    })
    .await;
    // Changes keep coming while the old leader is frozen and after it wakes.
    let third = insert_order(&pool, r, "pending", 1).await;
    tokio::time::sleep(INTERVAL * 2).await;
    procs[paused].signal("CONT");
    sqlx::query("UPDATE orders SET order_status = 'ready' WHERE id = $1")
        .bind(first)
        .execute(&pool)
        .await
        .unwrap();
    let fourth = insert_order(&pool, r, "pending", 1).await;

    for ws in &mut boards {
        let events = read_until(ws, Duration::from_secs(10), |e| e.len() >= 5).await;
        ws.silent_for(QUIET).await;
        let created: Vec<Uuid> = events
            .iter()
            .filter(|e| e["type"] == "order_created")
            .map(order_id)
            .collect();
        assert_eq!(
            created.iter().collect::<HashSet<_>>(),
            HashSet::from([&second, &third, &fourth])
        );
        assert_eq!(created.len(), 3, "{events:?}");
        let changes: Vec<(&str, &str)> = events
            .iter()
            .filter(|e| e["type"] == "order_status_changed")
            .map(|e| {
                (
                    e["previous_status"].as_str().unwrap(),
                    e["order"]["order_status"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            changes,
            vec![("pending", "preparing"), ("preparing", "ready")]
        );
        let ids: Vec<&str> = events
            .iter()
            .map(|e| e["event_id"].as_str().unwrap())
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "event ids increase: {ids:?}"
        );
    }
    assert_eq!(
        leader(&redis).await.unwrap().1,
        successor,
        "the woken replica does not lead"
    );
}

/// What the woken leader's publish looks like to Redis, through the same
/// backend the poller uses and as a raw FCALL.
#[tokio::test]
async fn a_stale_lease_is_fenced_at_publish_and_save() {
    let redis = Redis::start().await;
    let stop = CancellationToken::new();
    let limits = HistoryLimits {
        max_events: 100,
        max_age: Duration::from_secs(60),
    };
    let (tx, _rx) = mpsc::channel(16);
    let backend: std::sync::Arc<dyn Backend> = std::sync::Arc::new(
        RedisBroker::start(&redis.url(), "poller-test", tx, limits, stop.clone())
            .await
            .unwrap(),
    );
    let ttl = Duration::from_millis(300);
    let old = backend
        .try_acquire_leader("old", ttl)
        .await
        .unwrap()
        .unwrap();
    eventually(Duration::from_secs(3), || async {
        leader(&redis).await.is_none().then_some(())
    })
    .await;
    let new = backend
        .try_acquire_leader("new", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();

    let r = RestaurantId(Uuid::new_v4());
    let order = order_json(r.0, Uuid::new_v4(), "pending");
    let body = json!({"type": "order_created", "order": order}).to_string();
    let version = format!("{}@1700000000000000", order["id"].as_str().unwrap());
    let publish = |fence: &Lease| PublishRequest {
        restaurant: r,
        version: None,
        body: body.clone(),
        fence: Some(fence.token.clone()),
    };
    assert!(matches!(
        backend.publish(publish(&old)).await,
        Err(BrokerError::Fenced)
    ));
    let delta = PollerStateDelta {
        cursor_micros: 1,
        last_poll_ms: 1,
        changes: vec![(r, vec![("x".into(), Some("y".into()))])],
    };
    assert!(matches!(
        backend.save_poller_state(&old, &delta).await,
        Err(BrokerError::Fenced)
    ));
    let mut conn = redis.client().await;
    let order_id = version.split('@').next().unwrap();
    let raw: redis::RedisResult<redis::Value> = redis::cmd("FCALL")
        .arg(orders_gateway::broker::functions::function_name(
            "og_publish",
        ))
        .arg(3)
        .arg(format!("og:{{orders:{r}}}:meta"))
        .arg(format!("og:{{orders:{r}}}:hist"))
        .arg(format!("og:{{orders:{r}}}:v:{order_id}"))
        .arg(r.to_string())
        .arg(&version)
        .arg(&body)
        .arg(&old.token)
        .query_async(&mut conn)
        .await;
    let err = raw.expect_err("a stale lease is refused");
    assert_eq!(err.code(), Some("FENCED"), "{err}");
    // The refused calls left nothing behind.
    assert!(redis_keys(&redis, &format!("og:*{r}*")).await.is_empty());
    assert!(redis_get(&redis, "og:{og}:poll:cursor").await.is_none());

    // The current lease works.
    assert!(!backend.publish(publish(&new)).await.unwrap().duplicate);
    backend.save_poller_state(&new, &delta).await.unwrap();
    stop.cancel();
}

/// A leader shut down with SIGTERM releases the lock: another replica leads
/// within about one retry interval, long before the TTL would expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_shut_down_hands_over_at_once() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let ttl = Duration::from_millis(5000);
    let env = process_env(&redis, &db, ttl.as_millis() as u64);
    let (mut procs, mut boards, r) = watched_replicas(&env, 2).await;
    let (epoch, holder) = eventually(Duration::from_secs(5), || leader(&redis)).await;
    let leaving = procs.iter().position(|p| p.instance_id == holder).unwrap();
    let staying = 1 - leaving;
    // The leaving replica's dashboard answers its close at once, as a
    // browser does (an unanswered close handshake holds the drain up to 1 s).
    let mut leaving_board = boards.swap_remove(leaving);
    let closed = tokio::spawn(async move { leaving_board.close_code().await });
    let mut staying_board = boards.pop().unwrap();
    procs[leaving].signal("TERM");
    let sent = Instant::now();
    let (new_epoch, successor) = eventually(Duration::from_secs(5), || async {
        leader(&redis).await.filter(|(_, h)| *h != holder)
    })
    .await;
    let took = sent.elapsed();
    eprintln!("handover after SIGTERM: {took:?}");
    assert_eq!(successor, procs[staying].instance_id);
    assert!(new_epoch > epoch);
    // Released after the sockets are closed, and taken at the follower's
    // next retry (every poll interval here): well within one renewal
    // interval (TTL/3), never by expiry.
    assert!(took < ttl / 3, "took {took:?}");
    assert_eq!(procs[leaving].wait(Duration::from_secs(10)).await, Some(0));
    assert_eq!(closed.await.unwrap(), 1001);
    // The new leader works.
    let pool = db.pool().await;
    let id = insert_order(&pool, r, "pending", 1).await;
    let ev = next_event(&mut staying_board, INTERVAL + MARGIN).await;
    assert_eq!(
        (ev["type"].as_str(), order_id(&ev)),
        (Some("order_created"), id)
    );
}

// ---------------------------------------------------------------- publish endpoint

async fn post_raw(base: &str, auth: Option<&str>, content_type: &str, body: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/orders/events"))
        .header("content-type", content_type)
        .body(body.to_string());
    if let Some(key) = auth {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn assert_api_error(status: u16, body: &Value, expected: u16) {
    assert_eq!(status, expected, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_endpoint_is_idempotent_and_deduplicated_against_the_poller() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let gw = Gateway::start(cfg(&redis, &db)).await;
    let other = Gateway::start(cfg(&redis, &db)).await;
    let base = format!("http://{}", gw.addr);
    let r = Uuid::new_v4();
    let q = format!("token={}", token(r));
    let (mut ws, _) = board(gw.ws_url(&q)).await;
    let (mut ws2, _) = board(other.ws_url(&q)).await;
    captured(&redis).await;

    // An event for an order that is not in the database: HTTP only.
    let event = json!({"type": "order_created", "order": order_json(r, Uuid::new_v4(), "pending")});
    let (status, first) = post_event(&base, &event).await;
    assert_eq!(status, 202, "{first}");
    let event_id = first["event_id"].as_str().expect("event_id").to_string();
    for w in [&mut ws, &mut ws2] {
        let ev = next_event(w, MARGIN).await;
        assert_eq!(ev["event_id"], event_id.as_str());
        assert_eq!(ev["type"], "order_created");
    }
    let (status, again) = post_event(&base, &event).await;
    assert_eq!(status, 200);
    assert_eq!(again, json!({"event_id": event_id, "duplicate": true}));

    // The order service publishes its write (before even committing it);
    // the poller then finds the same version in the database.
    let pool = db.pool().await;
    let mut tx = pool.begin().await.unwrap();
    let id = Uuid::new_v4();
    insert_order_in(&mut tx, id, r, "pending", 2).await;
    let sql = format!(
        "SELECT row_to_json(x) FROM (SELECT {} FROM orders o WHERE o.id = $1) x",
        orders_gateway::db::ORDER_COLUMNS
    );
    let (order,): (Value,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let (status, published) =
        post_event(&base, &json!({"type": "order_created", "order": order})).await;
    assert_eq!(status, 202, "{published}");
    tx.commit().await.unwrap();
    for w in [&mut ws, &mut ws2] {
        let ev = next_event(w, MARGIN).await;
        assert_eq!(ev["event_id"], published["event_id"]);
        assert_eq!(order_id(&ev), id);
    }
    // The poller has seen it (it remembers the order) and sent nothing.
    let known = format!("og:{{og}}:poll:known:{r}");
    eventually(Duration::from_secs(5), || async {
        let v = redis
            .cmd(&["HEXISTS", &known, &id.to_string()])
            .await
            .ok()?;
        (redis::from_redis_value::<i64>(v).ok()? == 1).then_some(())
    })
    .await;
    for w in [&mut ws, &mut ws2] {
        w.silent_for(QUIET).await;
    }
    // The same version once more, now also the poller's: still one event.
    let (status, third) =
        post_event(&base, &json!({"type": "order_created", "order": order})).await;
    assert_eq!((status, &third["event_id"]), (200, &published["event_id"]));

    // The poller first, the order service second.
    sqlx::query("UPDATE orders SET order_status = 'confirmed' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let ev = next_event(&mut ws, INTERVAL + MARGIN).await;
    assert_eq!(ev["type"], "order_status_changed");
    let late =
        json!({"type": "order_status_changed", "previous_status": "pending", "order": ev["order"]});
    let (status, dup) = post_event(&base, &late).await;
    assert_eq!(status, 200, "{dup}");
    assert_eq!(dup, json!({"event_id": ev["event_id"], "duplicate": true}));
    assert_eq!(
        next_event(&mut ws2, MARGIN).await["event_id"],
        ev["event_id"]
    );
    for w in [&mut ws, &mut ws2] {
        w.silent_for(QUIET).await;
    }
}

#[tokio::test]
async fn the_publish_endpoint_refuses_bad_requests() {
    let redis = Redis::start().await;
    let mut c = config();
    c.redis_url = Some(redis.url());
    let gw = Gateway::start(c).await;
    let base = format!("http://{}", gw.addr);
    let r = Uuid::new_v4();
    let good = json!({"type": "order_created", "order": order_json(r, Uuid::new_v4(), "pending")})
        .to_string();
    let json_ct = "application/json";

    let (s, b) = post_raw(&base, None, json_ct, &good).await;
    assert_api_error(s, &b, 401);
    let (s, b) = post_raw(&base, Some("wrong-key-0123456789abcdef"), json_ct, &good).await;
    assert_api_error(s, &b, 401);
    let (s, b) = post_raw(&base, Some(PUBLISH_KEY), "text/plain", &good).await;
    assert_api_error(s, &b, 415);
    for bad in [
        "{not json",
        "[]",
        r#"{"type":"order_created"}"#,
        r#"{"order":{}}"#,
        &json!({"type": "order_exploded", "order": order_json(r, Uuid::new_v4(), "pending")})
            .to_string(),
        &json!({"type": "order_created", "order": {"id": Uuid::new_v4()}}).to_string(),
        &json!({"type": "order_created", "order": order_json(r, Uuid::new_v4(), "lost")})
            .to_string(),
    ] {
        let (s, b) = post_raw(&base, Some(PUBLISH_KEY), json_ct, bad).await;
        assert_api_error(s, &b, 400);
    }
    // Nothing of those was numbered.
    assert!(redis_keys(&redis, &format!("og:*{r}*")).await.is_empty());
    let (s, b) = post_raw(&base, Some(PUBLISH_KEY), json_ct, &good).await;
    assert_eq!(s, 202, "{b}");

    // Without PUBLISH_API_KEY the route does not exist.
    let mut c = config();
    c.publish_api_key = None;
    let closed = Gateway::start(c).await;
    let (s, b) = post_raw(
        &format!("http://{}", closed.addr),
        Some(PUBLISH_KEY),
        json_ct,
        &good,
    )
    .await;
    assert_api_error(s, &b, 404);
}

/// Issue 13, item 2: demo mode names its dishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_orders_name_their_dishes() {
    let mut c = config();
    c.demo = true;
    let gw = Gateway::start(c).await;
    let r = orders_gateway::demo::DEMO_RESTAURANT;
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let ev = next_event(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(ev["type"], "order_created", "{ev}");
    let items = ev["order"]["items"].as_array().unwrap();
    assert!(!items.is_empty(), "{ev}");
    for item in items {
        assert!(item["name"].as_str().is_some_and(|n| !n.is_empty()), "{ev}");
    }
}
