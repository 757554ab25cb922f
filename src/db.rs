//! The orders database, read-only: open orders for snapshots, changed and
//! deleted orders for the poller, memberships for tokens without a
//! restaurant claim. Migrations run only through `orders-gateway migrate`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{FromRow, Row};
use uuid::Uuid;

use crate::domain::{Order, OrderItem, RestaurantId};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The database plus what its schema offers beyond the contract's tables.
#[derive(Clone)]
pub struct Database {
    pool: PgPool,
    /// Shared by every clone (poller, snapshots): one detection per
    /// [`FEATURES_RECHECK`]. A std mutex, held only to copy a few bytes.
    features: Arc<Mutex<Features>>,
}

/// Optional tables found at runtime. Foreign schemas may lack them; a table
/// created (or granted) later is picked up within [`FEATURES_RECHECK`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Features {
    /// `menu_items(id uuid, name)` readable: items carry their `name`.
    pub menu_names: bool,
    /// `order_tombstones` readable: deletions arrive within a tick.
    pub tombstones: bool,
    checked: Option<Instant>,
}

const FEATURES_RECHECK: Duration = Duration::from_secs(60);

const FEATURES_SQL: &str = "SELECT \
     COALESCE((SELECT has_table_privilege(c, 'SELECT') \
        AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = c AND attname = 'id' \
                    AND atttypid = 'uuid'::regtype AND NOT attisdropped) \
        AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = c AND attname = 'name' \
                    AND NOT attisdropped) \
      FROM (SELECT to_regclass('menu_items') AS c) m WHERE c IS NOT NULL), false), \
     COALESCE((SELECT has_table_privilege(c, 'SELECT') \
      FROM (SELECT to_regclass('order_tombstones') AS c) t WHERE c IS NOT NULL), false)";

/// `<order>` with its items as one row; `$item_name` adds each item's name.
macro_rules! order_columns {
    ($item_name:literal) => {
        concat!(
            "o.id, o.order_number, o.restaurant_id, o.table_number, \
             o.customer_name, o.customer_phone, o.order_status, o.payment_status, o.payment_method, \
             o.total_price::float8 AS total_price, o.estimated_time, o.created_at, o.updated_at, \
             COALESCE((SELECT json_agg(json_build_object('id', i.id, 'menu_item_id', i.menu_item_id, \
                'quantity', i.quantity, 'unit_price', i.unit_price::float8",
            $item_name,
            ") ORDER BY i.id) FROM order_items i WHERE i.order_id = o.id), '[]'::json) AS items"
        )
    };
}

/// Columns of `<order>` with its items, as one row.
pub const ORDER_COLUMNS: &str = order_columns!("");
/// The same with each item's `name` from `menu_items` (a scalar subquery, not
/// a join: a `menu_items` without a unique `id` must not duplicate items).
pub const ORDER_COLUMNS_WITH_NAMES: &str = order_columns!(
    ", 'name', (SELECT m.name::text FROM menu_items m WHERE m.id = i.menu_item_id LIMIT 1)"
);

fn order_columns(f: Features) -> &'static str {
    if f.menu_names {
        ORDER_COLUMNS_WITH_NAMES
    } else {
        ORDER_COLUMNS
    }
}

/// One row as read. Everything is optional here, keys included, so that a
/// row the contract allows (NULLs anywhere but the keys) decodes, and one it
/// does not is reported by [`decode_orders`] without failing its neighbours.
#[derive(sqlx::FromRow)]
pub struct OrderRow {
    id: Option<Uuid>,
    order_number: Option<String>,
    restaurant_id: Option<Uuid>,
    table_number: Option<i32>,
    customer_name: Option<String>,
    customer_phone: Option<String>,
    order_status: Option<String>,
    payment_status: Option<String>,
    payment_method: Option<String>,
    total_price: Option<f64>,
    estimated_time: Option<i32>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    items: Option<Json<Vec<OrderItem>>>,
}

impl TryFrom<OrderRow> for Order {
    type Error = &'static str;
    fn try_from(r: OrderRow) -> Result<Order, &'static str> {
        Ok(Order {
            id: r.id.ok_or("id is NULL")?,
            order_number: r.order_number,
            restaurant_id: r.restaurant_id.ok_or("restaurant_id is NULL")?,
            table_number: r.table_number,
            customer_name: r.customer_name,
            customer_phone: r.customer_phone,
            order_status: r.order_status,
            payment_status: r.payment_status,
            payment_method: r.payment_method,
            total_price: r.total_price,
            estimated_time: r.estimated_time,
            created_at: r.created_at,
            updated_at: r.updated_at.ok_or("updated_at is NULL")?,
            items: r.items.map(|j| j.0).unwrap_or_default(),
        })
    }
}

/// Decode rows one by one: a row the gateway cannot use (no id, restaurant
/// or version; a column of an unexpected type) is logged with its order id,
/// counted in `orders_gateway_poller_rows_skipped_total{source}` and left
/// out, and everyone else's orders keep flowing.
pub fn decode_orders(rows: &[PgRow], source: &'static str) -> Vec<Order> {
    rows.iter()
        .filter_map(|row| {
            let decoded = OrderRow::from_row(row)
                .map_err(|e| e.to_string())
                .and_then(|r| Order::try_from(r).map_err(str::to_string));
            match decoded {
                Ok(order) => Some(order),
                Err(reason) => {
                    let id = row
                        .try_get::<Option<Uuid>, _>("id")
                        .ok()
                        .flatten()
                        .map_or_else(|| "NULL".to_string(), |id| id.to_string());
                    tracing::error!(order_id = %id, %reason, source, "skipping an order row the gateway cannot use");
                    metrics::counter!("orders_gateway_poller_rows_skipped_total", "source" => source)
                        .increment(1);
                    None
                }
            }
        })
        .collect()
}

/// [`decode_orders`] in slices, yielding in between: thousands of rows are
/// CPU work that must not hold a runtime worker (the poller's lease renewal,
/// sockets) for long.
async fn decode_yielding(rows: &[PgRow], source: &'static str) -> Vec<Order> {
    let mut orders = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(256) {
        orders.extend(decode_orders(chunk, source));
        if rows.len() > 256 {
            tokio::task::yield_now().await;
        }
    }
    orders
}

/// Errors that mean the schema changed under a cached [`Features`] (a table
/// or column gone, a privilege revoked): detect again before retrying.
fn is_schema_error(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| matches!(c.as_ref(), "42P01" | "42703" | "42501" | "42883"))
}

/// Where the next poll must start so that no commit is missed, measured
/// before the poll's own snapshot is taken.
#[derive(Debug, Clone, Copy)]
pub struct Horizon {
    pub db_now: DateTime<Utc>,
    /// Start of the oldest transaction open in this database (when the role
    /// may see other sessions in pg_stat_activity).
    pub oldest_open_transaction: Option<DateTime<Utc>>,
}

/// The poll's one query: `$1` the cursor; every restaurant. Public so that
/// the benchmark can EXPLAIN exactly this text.
pub fn changed_orders_sql(columns: &str) -> String {
    format!("SELECT {columns} FROM orders o WHERE o.updated_at >= $1 ORDER BY o.updated_at, o.id")
}

/// The baseline of a first start (see [`Database::baseline`]); public for
/// the benchmark. Rows without a restaurant or version are the poll's to
/// report (and skip).
pub const BASELINE_SQL: &str = "SELECT o.restaurant_id, o.id, o.order_status, o.updated_at FROM orders o \
     WHERE o.updated_at < $1 AND o.restaurant_id IS NOT NULL \
     AND o.order_status NOT IN ('completed', 'cancelled')";

/// Open orders known to the poller that are no longer in the table under
/// their restaurant (deleted, or moved to another restaurant).
const MISSING_SQL: &str = "SELECT k.id FROM unnest($1::uuid[], $2::uuid[]) AS k(id, restaurant_id) \
     WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = k.id AND o.restaurant_id = k.restaurant_id)";

impl Database {
    /// Connects lazily: the gateway starts even while the database is down.
    pub fn connect(url: &str) -> Result<Database, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        Ok(Database {
            pool,
            features: Arc::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// The optional tables, detected at most once per [`FEATURES_RECHECK`].
    /// While detection fails, the last answer (at first: none) stands.
    pub async fn features(&self) -> Features {
        let cached = *self.features.lock().unwrap_or_else(|p| p.into_inner());
        if cached
            .checked
            .is_some_and(|t| t.elapsed() < FEATURES_RECHECK)
        {
            return cached;
        }
        match sqlx::query_as::<_, (bool, bool)>(FEATURES_SQL)
            .fetch_one(&self.pool)
            .await
        {
            Ok((menu_names, tombstones)) => {
                let found = Features {
                    menu_names,
                    tombstones,
                    checked: Some(Instant::now()),
                };
                if cached.checked.is_none()
                    || (cached.menu_names, cached.tombstones) != (menu_names, tombstones)
                {
                    tracing::info!(menu_names, tombstones, "orders database: optional tables");
                }
                *self.features.lock().unwrap_or_else(|p| p.into_inner()) = found;
                found
            }
            Err(e) => {
                tracing::debug!(error = %e, "orders database: optional tables not detected");
                cached
            }
        }
    }

    /// Detect again at the next use (the schema changed under us).
    fn forget_features(&self) {
        self.features
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .checked = None;
    }

    /// Restaurants the user is a member of.
    pub async fn memberships(&self, user_id: &str) -> Result<Vec<RestaurantId>, sqlx::Error> {
        let Ok(user) = Uuid::parse_str(user_id) else {
            return Ok(Vec::new());
        };
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT restaurant_id FROM restaurant_members WHERE user_id = $1 ORDER BY restaurant_id",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(r,)| RestaurantId(r)).collect())
    }

    /// Which of `pairs` (user, restaurant) still exist, in one query per
    /// thousand pairs: the periodic re-check of open sockets.
    pub async fn present_memberships(
        &self,
        pairs: &[(Uuid, RestaurantId)],
    ) -> Result<std::collections::HashSet<(Uuid, RestaurantId)>, sqlx::Error> {
        let mut present = std::collections::HashSet::new();
        for chunk in pairs.chunks(1000) {
            let (users, restaurants): (Vec<Uuid>, Vec<Uuid>) =
                chunk.iter().map(|(u, r)| (*u, r.0)).unzip();
            let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
                "SELECT m.user_id, m.restaurant_id FROM restaurant_members m \
                 JOIN unnest($1::uuid[], $2::uuid[]) AS p(user_id, restaurant_id) \
                 ON m.user_id = p.user_id AND m.restaurant_id = p.restaurant_id",
            )
            .bind(&users)
            .bind(&restaurants)
            .fetch_all(&self.pool)
            .await?;
            present.extend(rows.into_iter().map(|(u, r)| (u, RestaurantId(r))));
        }
        Ok(present)
    }

    /// The restaurant's open orders (not completed or cancelled), oldest
    /// first. Rows the gateway cannot use are skipped (and reported).
    pub async fn open_orders(&self, r: RestaurantId) -> Result<Vec<Order>, sqlx::Error> {
        let features = self.features().await;
        match self.open_orders_with(r, features).await {
            Err(e) if features.menu_names && is_schema_error(&e) => {
                self.forget_features();
                self.open_orders_with(r, Features::default()).await
            }
            other => other,
        }
    }

    async fn open_orders_with(
        &self,
        r: RestaurantId,
        features: Features,
    ) -> Result<Vec<Order>, sqlx::Error> {
        let sql = format!(
            "SELECT {} FROM orders o WHERE o.restaurant_id = $1 \
             AND o.order_status NOT IN ('completed', 'cancelled') ORDER BY o.created_at, o.id",
            order_columns(features)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(r.0)
            .fetch_all(&self.pool)
            .await?;
        Ok(decode_yielding(&rows, "snapshot").await)
    }

    /// Autovacuum workers and WAL senders never write orders, yet a long
    /// vacuum of a big table shows an old `xact_start`: left in, it would
    /// hold the horizon back and make every tick re-read minutes of changes.
    /// Every other backend (client sessions, background workers such as
    /// pg_cron or logical replication) might write, so it counts.
    pub async fn horizon(&self) -> Result<Horizon, sqlx::Error> {
        let _timer = QueryTimer::start("horizon");
        let (db_now, oldest): (DateTime<Utc>, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT clock_timestamp(), (SELECT min(xact_start) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL \
             AND backend_type NOT IN ('autovacuum worker', 'walsender'))",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Horizon {
            db_now,
            oldest_open_transaction: oldest,
        })
    }

    /// The poll: every order of every restaurant written at or after
    /// `since`, with items. One query. Rows the gateway cannot use are
    /// skipped (and reported).
    pub async fn changed_orders(&self, since: DateTime<Utc>) -> Result<Vec<Order>, sqlx::Error> {
        let _timer = QueryTimer::start("changed_orders");
        let features = self.features().await;
        match self.changed_orders_with(since, features).await {
            Err(e) if features.menu_names && is_schema_error(&e) => {
                self.forget_features();
                self.changed_orders_with(since, Features::default()).await
            }
            other => other,
        }
    }

    async fn changed_orders_with(
        &self,
        since: DateTime<Utc>,
        features: Features,
    ) -> Result<Vec<Order>, sqlx::Error> {
        // Not a cached prepared statement: PostgreSQL then plans every run
        // for the actual cursor and walks orders_updated_at_idx. A cached
        // statement may switch to the generic plan, which cannot tell "the
        // last few seconds" from "a third of the table" (docs/BENCHMARKS.md).
        let rows = sqlx::query(sqlx::AssertSqlSafe(changed_orders_sql(order_columns(
            features,
        ))))
        .bind(since)
        .persistent(false)
        .fetch_all(&self.pool)
        .await?;
        Ok(decode_yielding(&rows, "poll").await)
    }

    /// `(restaurant, id, status, updated_at)` of every open order last
    /// written before `before`: what a poller starting with no saved state
    /// compares later changes against. Rows written since `before` are left
    /// to the poll itself, so none is silently absorbed.
    pub async fn baseline(
        &self,
        before: DateTime<Utc>,
    ) -> Result<Vec<(Uuid, Uuid, Option<String>, DateTime<Utc>)>, sqlx::Error> {
        let _timer = QueryTimer::start("baseline");
        // Planned for its actual values, like the poll (see changed_orders).
        sqlx::query_as(BASELINE_SQL)
            .bind(before)
            .persistent(false)
            .fetch_all(&self.pool)
            .await
    }

    /// `(order, restaurant)` of the open orders deleted at or after `since`
    /// (tombstones left by the migrations' trigger; empty without the table).
    pub async fn deleted_orders(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
        if !self.features().await.tombstones {
            return Ok(Vec::new());
        }
        let r = sqlx::query_as(
            "SELECT order_id, restaurant_id FROM order_tombstones \
             WHERE deleted_at >= $1 AND restaurant_id IS NOT NULL",
        )
        .bind(since)
        .persistent(false)
        .fetch_all(&self.pool)
        .await;
        if r.as_ref().is_err_and(is_schema_error) {
            self.forget_features();
        }
        r
    }

    /// Of `(order, restaurant)` pairs, the orders no longer in the table
    /// under that restaurant.
    pub async fn missing_orders(&self, known: &[(Uuid, Uuid)]) -> Result<Vec<Uuid>, sqlx::Error> {
        let mut missing = Vec::new();
        for chunk in known.chunks(10_000) {
            let (ids, restaurants): (Vec<Uuid>, Vec<Uuid>) = chunk.iter().copied().unzip();
            let found: Vec<(Uuid,)> = sqlx::query_as(MISSING_SQL)
                .bind(ids)
                .bind(restaurants)
                .fetch_all(&self.pool)
                .await?;
            missing.extend(found.into_iter().map(|(id,)| id));
        }
        Ok(missing)
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}

/// Records a poller query's wall time (round trip and decoding) when
/// dropped: the database time per tick (docs/BENCHMARKS.md).
struct QueryTimer {
    query: &'static str,
    started: std::time::Instant,
}

impl QueryTimer {
    fn start(query: &'static str) -> QueryTimer {
        QueryTimer {
            query,
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for QueryTimer {
    fn drop(&mut self) {
        metrics::histogram!("orders_gateway_poller_query_duration_seconds", "query" => self.query)
            .record(self.started.elapsed().as_secs_f64());
    }
}

#[async_trait::async_trait]
impl crate::domain::SnapshotSource for Database {
    async fn open_orders(&self, r: RestaurantId) -> Result<Vec<Order>, String> {
        Database::open_orders(self, r)
            .await
            .map_err(|e| e.to_string())
    }
}
