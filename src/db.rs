//! The orders database, read-only: open orders for snapshots, changed
//! orders for the poller, memberships for tokens without a restaurant
//! claim. Migrations run only through `orders-gateway migrate`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::{Order, OrderItem, RestaurantId};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct Database {
    pool: PgPool,
}

/// Columns of `<order>` with its items, as one row.
pub const ORDER_COLUMNS: &str = "o.id, o.order_number, o.restaurant_id, o.table_number, \
     o.customer_name, o.customer_phone, o.order_status, o.payment_status, o.payment_method, \
     o.total_price::float8 AS total_price, o.estimated_time, o.created_at, o.updated_at, \
     COALESCE((SELECT json_agg(json_build_object('id', i.id, 'menu_item_id', i.menu_item_id, \
        'quantity', i.quantity, 'unit_price', i.unit_price::float8) ORDER BY i.id) \
        FROM order_items i WHERE i.order_id = o.id), '[]'::json) AS items";

#[derive(sqlx::FromRow)]
pub struct OrderRow {
    id: Uuid,
    order_number: Option<String>,
    restaurant_id: Uuid,
    table_number: Option<i32>,
    customer_name: Option<String>,
    customer_phone: Option<String>,
    order_status: String,
    payment_status: Option<String>,
    payment_method: Option<String>,
    total_price: Option<f64>,
    estimated_time: Option<i32>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    items: Json<Vec<OrderItem>>,
}

impl From<OrderRow> for Order {
    fn from(r: OrderRow) -> Order {
        Order {
            id: r.id,
            order_number: r.order_number,
            restaurant_id: r.restaurant_id,
            table_number: r.table_number,
            customer_name: r.customer_name,
            customer_phone: r.customer_phone,
            order_status: r.order_status,
            payment_status: r.payment_status,
            payment_method: r.payment_method,
            total_price: r.total_price,
            estimated_time: r.estimated_time,
            created_at: r.created_at,
            updated_at: r.updated_at,
            items: r.items.0,
        }
    }
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

/// The poll's one query: `$1` the active restaurants (uuid[]), `$2` the
/// cursor. Public so that the benchmark can EXPLAIN exactly this text.
pub fn changed_orders_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS} FROM orders o WHERE o.updated_at >= $2 \
         AND o.restaurant_id = ANY($1) ORDER BY o.updated_at, o.id"
    )
}

/// The baseline of restaurants the poller starts watching (see
/// [`Database::baseline`]); public for the benchmark.
pub const BASELINE_SQL: &str = "SELECT o.restaurant_id, o.id, o.order_status, o.updated_at FROM orders o \
     WHERE o.restaurant_id = ANY($1) AND o.updated_at < $2 \
     AND o.order_status NOT IN ('completed', 'cancelled')";

impl Database {
    /// Connects lazily: the gateway starts even while the database is down.
    pub fn connect(url: &str) -> Result<Database, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        Ok(Database { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
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

    /// The restaurant's open orders (not completed or cancelled), oldest first.
    pub async fn open_orders(&self, r: RestaurantId) -> Result<Vec<Order>, sqlx::Error> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders o WHERE o.restaurant_id = $1 \
             AND o.order_status NOT IN ('completed', 'cancelled') ORDER BY o.created_at, o.id"
        );
        let rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(r.0)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Order::from).collect())
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

    /// The poll: every order of the active restaurants written at or after
    /// `since`, with items. One query for all restaurants.
    pub async fn changed_orders(
        &self,
        restaurants: &[Uuid],
        since: DateTime<Utc>,
    ) -> Result<Vec<Order>, sqlx::Error> {
        let _timer = QueryTimer::start("changed_orders");
        // Not a cached prepared statement: PostgreSQL then plans every run
        // for the actual cursor and walks orders_updated_at_idx (~1 ms over a
        // million orders). A cached statement may switch to the generic plan,
        // which cannot tell "the last few seconds" from "a third of the
        // table" and probes (restaurant_id, updated_at) once per restaurant
        // instead: 60 ms for 10,000 restaurants (docs/BENCHMARKS.md).
        let rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(changed_orders_sql()))
            .bind(restaurants)
            .bind(since)
            .persistent(false)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Order::from).collect())
    }

    /// `(restaurant, id, status, updated_at)` of the open orders, last
    /// written before `before`, of restaurants the poller starts watching:
    /// what their later changes are compared against. Rows written since
    /// `before` are left to the poll itself, so none is silently absorbed.
    pub async fn baseline(
        &self,
        restaurants: &[Uuid],
        before: DateTime<Utc>,
    ) -> Result<Vec<(Uuid, Uuid, String, DateTime<Utc>)>, sqlx::Error> {
        let _timer = QueryTimer::start("baseline");
        // Planned for its actual values, like the poll (see changed_orders).
        sqlx::query_as(BASELINE_SQL)
            .bind(restaurants)
            .bind(before)
            .persistent(false)
            .fetch_all(&self.pool)
            .await
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
