//! pollbench: measures change capture (docs/BENCHMARKS.md, "Change capture").
//!
//! ```text
//! cargo run --release --bin pollbench -- tick      # the poll query over 1,000,000 orders
//! cargo run --release --bin pollbench -- latency   # commit -> dashboard, poll mode
//! cargo run --release --bin pollbench -- latency --rates 10,100,1000  # with the wake-up
//! cargo run --release --bin pollbench -- failover  # leader SIGKILL -> next delivered event
//! cargo run --release --bin pollbench -- triggers  # the NOTIFY triggers' cost on writes
//! ```
//!
//! Every mode works in a database of its own, created on `--admin-url` and
//! dropped at the end. `latency` and `failover` start a private
//! `redis-server` and real gateway replicas: this same executable re-run as
//! `pollbench serve`, which is the gateway configured from the environment
//! exactly like `orders-gateway`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use orders_gateway::db::{BASELINE_SQL, Database, ORDER_COLUMNS, changed_orders_sql};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use uuid::Uuid;

const SECRET: &str = "pollbench-secret-0123456789abcdef";

#[derive(Parser)]
#[command(about = "Change-capture benchmarks for orders-gateway")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// The poll tick's query: 1,000,000 orders, 10,000 active restaurants.
    Tick(TickArgs),
    /// Commit -> dashboard latency in poll mode, two replicas.
    Latency(LatencyArgs),
    /// Leader SIGKILL -> next event delivered by the new leader, three replicas.
    Failover(FailoverArgs),
    /// Inserts and updates per second with and without the NOTIFY triggers.
    Triggers(TriggerArgs),
    /// Run one gateway replica configured from the environment (internal).
    #[command(hide = true)]
    Serve,
}

#[derive(Args, Clone)]
struct Common {
    /// A PostgreSQL database where `CREATE DATABASE` is allowed.
    #[arg(
        long,
        env = "TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    /// Keep the scratch database instead of dropping it.
    #[arg(long)]
    keep: bool,
}

#[derive(Args)]
struct TickArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1_000_000)]
    orders: u32,
    #[arg(long, default_value_t = 10_000)]
    restaurants: u32,
    /// Rows updated just before polling: the tick's real work.
    #[arg(long, default_value_t = 200)]
    touch: u32,
    /// How far back the poll reads (the default POLL_OVERLAP_MS).
    #[arg(long, default_value_t = 10_000)]
    since_ms: u64,
    #[arg(long, default_value_t = 200)]
    runs: usize,
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 100)]
    orders: usize,
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
    /// Mean pause between orders (uniformly random, 0..2x), so commits land
    /// at every phase of the poll cycle.
    #[arg(long, default_value_t = 700)]
    spacing_ms: u64,
    /// Fixed commit rates measured in turn, commits per second (e.g.
    /// `10,100,1000`), instead of the random spacing.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u32>,
    /// Seconds per rate.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Connections committing at once (open loop: a commit is started on
    /// schedule whenever one is free).
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Replicas run with DATABASE_LISTEN_URL=off: periodic poll only.
    #[arg(long)]
    listen_off: bool,
}

#[derive(Args)]
struct TriggerArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent writer connections, each measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    writers: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Alternations of with/without (the machine is shared: interleave).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Orders written over this many restaurants.
    #[arg(long, default_value_t = 100)]
    restaurants: usize,
}

#[derive(Args)]
struct FailoverArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
    /// Leader lock TTL; unset: the gateway's default (three intervals).
    #[arg(long)]
    ttl_ms: Option<u64>,
    /// One order committed this often, throughout.
    #[arg(long, default_value_t = 50)]
    order_every_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Mode::Serve = cli.mode {
        return serve();
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.mode {
            Mode::Tick(a) => tick(a).await,
            Mode::Latency(a) => latency(a).await,
            Mode::Failover(a) => failover(a).await,
            Mode::Triggers(a) => triggers(a).await,
            Mode::Serve => unreachable!(),
        }
    })
}

/// The gateway, configured from the environment as `orders-gateway` is.
fn serve() -> anyhow::Result<()> {
    let mut config = orders_gateway::config::Cli::parse_from(["orders-gateway"]).config;
    config.validate()?;
    orders_gateway::app::init_tracing(&config.log_format);
    tokio::runtime::Runtime::new()?.block_on(async move {
        orders_gateway::app::App::build(config)
            .await?
            .run(orders_gateway::app::shutdown_signal())
            .await
    })
}

// ---------------------------------------------------------------- tick

async fn tick(a: TickArgs) -> anyhow::Result<()> {
    let scratch = Scratch::create(&a.common).await?;
    let db = Database::connect(&scratch.url)?;
    db.migrate().await?;
    let pool = db.pool().clone();

    let started = Instant::now();
    load(&pool, a.orders, a.restaurants).await?;
    println!(
        "loaded {} orders (+{} items) over {} restaurants in {:.1?}",
        a.orders,
        2 * a.orders,
        a.restaurants,
        started.elapsed()
    );
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM pollbench_restaurants ORDER BY n")
        .fetch_all(&pool)
        .await?;
    // The tick's work: rows written since the cursor.
    sqlx::query(
        "UPDATE orders SET order_status = 'ready' WHERE id IN \
         (SELECT id FROM orders ORDER BY random() LIMIT $1)",
    )
    .bind(a.touch as i64)
    .execute(&pool)
    .await?;
    let horizon = db.horizon().await?;
    let since = horizon.db_now - chrono::TimeDelta::milliseconds(a.since_ms as i64);

    let mut times = Vec::with_capacity(a.runs);
    let mut rows = 0;
    for _ in 0..a.runs {
        let t = Instant::now();
        rows = db.changed_orders(since).await?.len();
        times.push(t.elapsed());
    }
    println!(
        "\nchanged_orders: every restaurant ({}), since = now - {} ms, {rows} rows, {} runs \
         (client round trip incl. decoding):\n  {}",
        ids.len(),
        a.since_ms,
        a.runs,
        summary(&mut times)
    );
    let mut horizon_times: Vec<Duration> = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        db.horizon().await?;
        horizon_times.push(t.elapsed());
    }
    println!("horizon(): {}", summary(&mut horizon_times));

    let sql = changed_orders_sql(ORDER_COLUMNS);
    println!("\nSQL:\n{sql}\n");
    let mut conn = pool.acquire().await?;
    // As the poller sends it: bound parameters, planned for their values.
    let plan: Vec<String> =
        sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")))
            .bind(since)
            .fetch_all(&mut *conn)
            .await?;
    println!("EXPLAIN (ANALYZE, BUFFERS), parameters bound (custom plan):");
    for line in plan {
        println!("  {}", elide(&line));
    }
    // A cached statement may switch to a generic plan after five runs: show
    // that one too. The literal is a timestamp, nothing to escape.
    let since_literal = format!("'{}'::timestamptz", since.to_rfc3339());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET plan_cache_mode = force_generic_plan; PREPARE bench_tick(timestamptz) AS {sql}"
    )))
    .execute(&mut *conn)
    .await?;
    let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_tick({since_literal})"
    )))
    .fetch_all(&mut *conn)
    .await?;
    println!("\nEXPLAIN (ANALYZE, BUFFERS), plan_cache_mode = force_generic_plan:");
    for line in plan {
        println!("  {}", elide(&line));
    }
    println!();
    sqlx::raw_sql("DEALLOCATE bench_tick; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await?;

    // What a leader pays once when it starts with no saved progress: the
    // baseline of every open order.
    let mut baseline_times = Vec::new();
    let mut open = 0;
    for _ in 0..5 {
        let t = Instant::now();
        open = db.baseline(since).await?.len();
        baseline_times.push(t.elapsed());
    }
    println!(
        "baseline (first start, {} restaurants): {open} open orders: {}",
        ids.len(),
        summary(&mut baseline_times)
    );
    let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS) {BASELINE_SQL}"
    )))
    .bind(since)
    .fetch_all(&mut *conn)
    .await?;
    for line in plan
        .iter()
        .filter(|l| l.contains("Scan") || l.contains("Execution Time"))
    {
        println!("  {}", line.trim());
    }
    drop(conn);
    pool.close().await;
    scratch.drop().await
}

/// 1,000,000 orders over 10,000 restaurants, two items each, spread over
/// the last 30 days; mostly completed, a few percent still open.
async fn load(pool: &PgPool, orders: u32, restaurants: u32) -> anyhow::Result<()> {
    let steps = [
        format!(
            "CREATE TABLE pollbench_restaurants AS \
             SELECT g AS n, gen_random_uuid() AS id FROM generate_series(0, {}) g",
            restaurants - 1
        ),
        format!(
            "INSERT INTO orders (id, order_number, restaurant_id, table_number, customer_name, \
               customer_phone, order_status, payment_status, payment_method, total_price, \
               estimated_time, created_at, updated_at) \
             SELECT gen_random_uuid(), 'ORD-' || s.g, r.id, 1 + s.g % 30, 'Guest ' || s.g, '+1555' || s.g, \
               CASE WHEN s.x < 0.93 THEN 'completed' WHEN s.x < 0.96 THEN 'cancelled' \
                    WHEN s.x < 0.97 THEN 'pending' WHEN s.x < 0.98 THEN 'preparing' \
                    WHEN s.x < 0.99 THEN 'ready' ELSE 'served' END, \
               CASE WHEN s.x < 0.93 THEN 'paid' ELSE 'pending' END, 'card', \
               10 + (s.g % 9000) / 100.0, 15, s.c, s.c + random() * interval '1 hour' \
             FROM (SELECT g, random() AS x, \
                     now() - interval '1 hour' - random() * interval '30 days' AS c \
                   FROM generate_series(1, {orders}) g) s \
             JOIN pollbench_restaurants r ON r.n = s.g % {restaurants}"
        ),
        "INSERT INTO order_items (id, order_id, menu_item_id, quantity, unit_price) \
         SELECT gen_random_uuid(), o.id, gen_random_uuid(), 1 + k, 9.50 \
         FROM orders o, generate_series(1, 2) k"
            .to_string(),
    ];
    for sql in steps {
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
    }
    // One statement each: several in one message run as one transaction,
    // which VACUUM refuses.
    for table in ["orders", "order_items"] {
        sqlx::raw_sql(AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(pool)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- latency

async fn latency(a: LatencyArgs) -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let scratch = Scratch::create(&a.common).await?;
    let db = Database::connect(&scratch.url)?;
    db.migrate().await?;
    let mut env = replica_env(&redis, &scratch, a.interval_ms, None);
    if a.listen_off {
        env.push(("DATABASE_LISTEN_URL".to_string(), "off".to_string()));
    }
    let replicas = vec![Replica::start(&env).await?, Replica::start(&env).await?];
    let (_, holder) = wait_leader(&redis, None).await?;
    // Listen on the replica that does not poll: the event crosses Redis.
    let listen = replicas
        .iter()
        .find(|r| r.instance_id != holder)
        .context("a follower")?;
    let restaurant = Uuid::new_v4();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(read_dashboard(
        listen.addr,
        restaurant,
        0,
        tx,
        Some(ready_tx),
    ));
    wait_watched(&redis, restaurant).await?;
    // Commits start once the dashboard has its snapshot: an order committed
    // while it connects is shown by the snapshot, not as an event, and would
    // count as missing here.
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .context("the dashboard's snapshot")??;
    if !a.rates.is_empty() {
        let leader = replicas
            .iter()
            .find(|r| r.instance_id == holder)
            .context("the leader")?;
        let out = at_rates(&a, &scratch.url, restaurant, leader.addr, &mut rx).await;
        reader.abort();
        drop(replicas);
        db.pool().close().await;
        scratch.drop().await?;
        return out;
    }

    let pool = db.pool().clone();
    let mut committed: HashMap<Uuid, Instant> = HashMap::new();
    println!(
        "{} orders, POLL_INTERVAL_MS={}, random spacing 0..{} ms, dashboard on the follower",
        a.orders,
        a.interval_ms,
        2 * a.spacing_ms
    );
    for _ in 0..a.orders {
        tokio::time::sleep(Duration::from_millis(rand::random_range(
            0..=2 * a.spacing_ms,
        )))
        .await;
        let id = insert_order(&pool, restaurant).await?;
        committed.insert(id, Instant::now());
    }
    // Everything, then one more interval to catch a repeat.
    let mut received: HashMap<Uuid, Vec<Instant>> = HashMap::new();
    let mut deadline = Instant::now() + Duration::from_millis(3 * a.interval_ms + 2000);
    let mut complete = false;
    while let Ok(Some(ev)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        rx.recv(),
    )
    .await
    {
        received.entry(ev.order).or_default().push(ev.at);
        if !complete && committed.keys().all(|id| received.contains_key(id)) {
            complete = true;
            deadline = Instant::now() + Duration::from_millis(a.interval_ms);
        }
    }
    reader.abort();
    let mut lat: Vec<Duration> = committed
        .iter()
        .filter_map(|(id, c)| received.get(id).map(|r| r[0].saturating_duration_since(*c)))
        .collect();
    let missing = committed.len() - lat.len();
    let duplicates = received.values().filter(|v| v.len() > 1).count();
    println!(
        "commit -> dashboard: {}\n  missing {missing}, delivered twice {duplicates}; target p99 <= {} ms",
        summary(&mut lat),
        a.interval_ms + 150
    );
    drop(replicas);
    pool.close().await;
    scratch.drop().await
}

/// Commit -> dashboard at fixed rates, one after the other, with the
/// leader's poller metrics over each phase.
async fn at_rates(
    a: &LatencyArgs,
    url: &str,
    restaurant: Uuid,
    leader: SocketAddr,
    rx: &mut mpsc::UnboundedReceiver<Received>,
) -> anyhow::Result<()> {
    println!(
        "POLL_INTERVAL_MS={}, wake-up {}, dashboard on the follower, {} s per rate, \
         up to {} commits in flight; {}",
        a.interval_ms,
        if a.listen_off { "off" } else { "on" },
        a.seconds,
        a.writers,
        load_note()
    );
    let pool = PgPoolOptions::new()
        .max_connections(a.writers as u32 + 1)
        .connect(url)
        .await?;
    for &rate in &a.rates {
        let before = scrape(leader).await?;
        let commits: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
        let slots = Arc::new(tokio::sync::Semaphore::new(a.writers));
        let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let phase = Instant::now();
        let total = u64::from(rate) * a.seconds;
        let mut late = 0;
        let mut tasks = Vec::new();
        for _ in 0..total {
            every.tick().await;
            let slot = match slots.clone().try_acquire_owned() {
                Ok(s) => s,
                Err(_) => {
                    late += 1;
                    slots.clone().acquire_owned().await?
                }
            };
            let (pool, commits) = (pool.clone(), commits.clone());
            tasks.push(tokio::spawn(async move {
                if let Ok(id) = insert_order(&pool, restaurant).await {
                    commits.lock().unwrap().insert(id, Instant::now());
                }
                drop(slot);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let elapsed = phase.elapsed();
        let committed = std::mem::take(&mut *commits.lock().unwrap());
        let mut received: HashMap<Uuid, Vec<Instant>> = HashMap::new();
        let deadline = Instant::now() + Duration::from_millis(2 * a.interval_ms + 2000);
        while received.len() < committed.len() || Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(ev)) => received.entry(ev.order).or_default().push(ev.at),
                _ => break,
            }
            // All in: one more short wait catches repeats, then move on.
            if received.len() >= committed.len() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                while let Ok(ev) = rx.try_recv() {
                    received.entry(ev.order).or_default().push(ev.at);
                }
                break;
            }
        }
        let after = scrape(leader).await?;
        let mut lat: Vec<Duration> = committed
            .iter()
            .filter_map(|(id, c)| received.get(id).map(|r| r[0].saturating_duration_since(*c)))
            .collect();
        let missing = committed.len() - lat.len();
        let duplicates = received.values().filter(|v| v.len() > 1).count();
        let d = |series: &str| metric(&after, series) - metric(&before, series);
        let secs = elapsed.as_secs_f64();
        let ticks = ["interval", "notify", "reconnect"].map(|c| {
            d(&format!(
                "orders_gateway_poller_ticks_total{{cause=\"{c}\"}}"
            ))
        });
        let all_ticks: f64 = ticks.iter().sum();
        let db_ms: f64 = ["horizon", "changed_orders", "baseline"]
            .iter()
            .map(|q| {
                d(&format!(
                    "orders_gateway_poller_query_duration_seconds_sum{{query=\"{q}\"}}"
                ))
            })
            .sum::<f64>()
            * 1000.0;
        let tick_ms = d("orders_gateway_poller_tick_duration_seconds_sum") * 1000.0;
        let rows = d("orders_gateway_poller_rows_total");
        println!(
            "\n{rate}/s: {} commits in {:.1} s ({:.0}/s, {late} started late)\n  \
             commit -> dashboard: {}\n  missing {missing}, delivered twice {duplicates}\n  \
             leader: {:.1} ticks/s (interval {:.0}, notify {:.0}, reconnect {:.0}); \
             {:.0} notifications; per tick: {:.2} ms in the database, {:.2} ms in all, {:.0} rows read",
            committed.len(),
            secs,
            committed.len() as f64 / secs,
            summary(&mut lat),
            all_ticks / secs,
            ticks[0],
            ticks[1],
            ticks[2],
            d("orders_gateway_poller_wakeups_total"),
            db_ms / all_ticks.max(1.0),
            tick_ms / all_ticks.max(1.0),
            rows / all_ticks.max(1.0),
        );
    }
    println!("\n{}", load_note());
    pool.close().await;
    Ok(())
}

/// The leader's /metrics.
async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?)
}

/// One series' value in Prometheus text (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The machine is shared: say how busy it was.
fn load_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let psi = std::fs::read_to_string("/proc/pressure/cpu").unwrap_or_default();
    let some = psi
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("avg10=?");
    format!(
        "load average {} (2 vCPU), CPU pressure some {some}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

// ---------------------------------------------------------------- triggers

const NOTIFY_TRIGGERS: [(&str, &str); 6] = [
    ("orders", "orders_notify_insert"),
    ("orders", "orders_notify_update"),
    ("orders", "orders_notify_delete"),
    ("order_items", "order_items_notify_insert"),
    ("order_items", "order_items_notify_update"),
    ("order_items", "order_items_notify_delete"),
];

async fn triggers(a: TriggerArgs) -> anyhow::Result<()> {
    let scratch = Scratch::create(&a.common).await?;
    let db = Database::connect(&scratch.url)?;
    db.migrate().await?;
    let max_writers = a.writers.iter().copied().max().unwrap_or(1);
    let pool = PgPoolOptions::new()
        .max_connections(max_writers as u32 + 1)
        .connect(&scratch.url)
        .await?;
    let restaurants: Vec<Uuid> = (0..a.restaurants).map(|_| Uuid::new_v4()).collect();
    // Rows to update, spread out so that writers rarely wait on a row lock.
    let targets: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO orders (id, order_number, restaurant_id, order_status, total_price) \
         SELECT gen_random_uuid(), 'U-' || g, ($1::uuid[])[1 + g % cardinality($1::uuid[])], \
                'pending', 10.00 \
         FROM generate_series(0, 9999) g RETURNING id",
    )
    .bind(&restaurants)
    .fetch_all(&pool)
    .await?;
    // A listener drains the notifications, as the gateway's leader would.
    let heard = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = {
        let mut l = sqlx::postgres::PgListener::connect(&scratch.url).await?;
        l.listen("orders_changed").await?;
        let heard = heard.clone();
        tokio::spawn(async move {
            while l.recv().await.is_ok() {
                heard.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    println!(
        "{} s per measurement, {} rounds alternating with/without the NOTIFY triggers, \
         orders over {} restaurants; insert = one order + one item (one statement), \
         update = one order's status by id, each its own transaction; {}",
        a.seconds,
        a.rounds,
        a.restaurants,
        load_note()
    );
    println!(
        "\n| writers | work | with triggers /s | without /s | with / without |\n|---|---|---|---|---|"
    );
    let targets = Arc::new(targets);
    let restaurants = Arc::new(restaurants);
    for &writers in &a.writers {
        for work in ["insert", "update"] {
            let (mut with, mut without) = (0.0, 0.0);
            for _ in 0..a.rounds {
                for enabled in [true, false] {
                    set_notify_triggers(&pool, enabled).await?;
                    let rate = write_rate(
                        &pool,
                        writers,
                        work,
                        Duration::from_secs(a.seconds),
                        &restaurants,
                        &targets,
                    )
                    .await?;
                    if enabled {
                        with += rate;
                    } else {
                        without += rate;
                    }
                }
            }
            let n = a.rounds as f64;
            println!(
                "| {writers} | {work} | {:.0} | {:.0} | {:.2} |",
                with / n,
                without / n,
                with / without.max(1.0)
            );
        }
    }
    set_notify_triggers(&pool, true).await?;
    println!(
        "\nnotifications received by the listener: {}; {}",
        heard.load(std::sync::atomic::Ordering::Relaxed),
        load_note()
    );
    listener.abort();
    pool.close().await;
    db.pool().close().await;
    scratch.drop().await
}

async fn set_notify_triggers(pool: &PgPool, enabled: bool) -> anyhow::Result<()> {
    let verb = if enabled { "ENABLE" } else { "DISABLE" };
    for (table, trigger) in NOTIFY_TRIGGERS {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER TABLE {table} {verb} TRIGGER {trigger}"
        )))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Commits per second by `writers` connections doing `work` for `d`.
async fn write_rate(
    pool: &PgPool,
    writers: usize,
    work: &'static str,
    d: Duration,
    restaurants: &Arc<Vec<Uuid>>,
    targets: &Arc<Vec<Uuid>>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let until = started + d;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (pool, restaurants, targets) = (pool.clone(), restaurants.clone(), targets.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut i = w;
            while Instant::now() < until {
                let ok = if work == "insert" {
                    insert_order(&pool, restaurants[i % restaurants.len()])
                        .await
                        .is_ok()
                } else {
                    sqlx::query(
                        "UPDATE orders SET order_status = CASE order_status \
                         WHEN 'pending' THEN 'confirmed' ELSE 'pending' END WHERE id = $1",
                    )
                    .bind(targets[(i * 7919) % targets.len()])
                    .execute(&pool)
                    .await
                    .is_ok()
                };
                n += u64::from(ok);
                i += writers;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- failover

async fn failover(a: FailoverArgs) -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let scratch = Scratch::create(&a.common).await?;
    let db = Database::connect(&scratch.url)?;
    db.migrate().await?;
    let env = replica_env(&redis, &scratch, a.interval_ms, a.ttl_ms);
    let ttl_ms = a.ttl_ms.unwrap_or(3 * a.interval_ms);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&env).await?);
    }
    let restaurant = Uuid::new_v4();
    let commits: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let inserter = {
        let pool = db.pool().clone();
        let commits = commits.clone();
        let every = Duration::from_millis(a.order_every_ms);
        tokio::spawn(async move {
            loop {
                if let Ok(id) = insert_order(&pool, restaurant).await {
                    commits.lock().unwrap().insert(id, Instant::now());
                }
                tokio::time::sleep(every).await;
            }
        })
    };
    println!(
        "3 replicas, POLL_INTERVAL_MS={}, LEADER_TTL_MS={ttl_ms}, one order every {} ms; \
         target <= TTL + one interval = {} ms",
        a.interval_ms,
        a.order_every_ms,
        ttl_ms + a.interval_ms
    );
    let mut takeovers = Vec::new();
    let mut failovers = Vec::new();
    let mut duplicates = 0;
    for round in 0..a.rounds {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let readers: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| tokio::spawn(read_dashboard(r.addr, restaurant, i, tx.clone(), None)))
            .collect();
        let (epoch, holder) = wait_leader(&redis, None).await?;
        // Steady state: the dashboards receive.
        tokio::time::sleep(Duration::from_millis(2 * a.interval_ms + 1000)).await;
        let victim = replicas
            .iter()
            .position(|r| r.instance_id == holder)
            .context("the leader is one of ours")?;
        let mut steady: HashMap<usize, usize> = HashMap::new();
        while let Ok(ev) = rx.try_recv() {
            *steady.entry(ev.replica).or_default() += 1;
        }
        println!(
            "  before the kill: events per replica {steady:?}, leader {holder} (replica {victim})"
        );
        let killed = Instant::now();
        replicas[victim].kill();
        wait_leader(&redis, Some(epoch)).await?;
        let takeover = killed.elapsed();
        // The first event on a surviving replica for an order committed after the kill.
        let mut seen: HashMap<(usize, Uuid), usize> = HashMap::new();
        let deadline = killed + Duration::from_millis(ttl_ms + 3 * a.interval_ms + 5000);
        let mut delivered = None;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(ev)) = tokio::time::timeout(left, rx.recv()).await else {
                break;
            };
            *seen.entry((ev.replica, ev.order)).or_default() += 1;
            let after_kill = commits
                .lock()
                .unwrap()
                .get(&ev.order)
                .is_some_and(|c| *c > killed);
            if ev.replica != victim && after_kill && delivered.is_none() {
                delivered = Some(ev.at.saturating_duration_since(killed));
                // Keep reading a little to catch duplicates of the backlog.
                let tail = Instant::now() + Duration::from_millis(a.interval_ms * 2);
                while let Ok(Some(ev)) =
                    tokio::time::timeout(tail.saturating_duration_since(Instant::now()), rx.recv())
                        .await
                {
                    *seen.entry((ev.replica, ev.order)).or_default() += 1;
                }
                break;
            }
        }
        let delivered = delivered.context("no event after the kill")?;
        let dup = seen.values().filter(|n| **n > 1).count();
        duplicates += dup;
        println!(
            "round {round}: leader SIGKILLed; new leader after {:>5} ms; next event delivered after {:>5} ms; duplicates {dup}",
            takeover.as_millis(),
            delivered.as_millis()
        );
        takeovers.push(takeover);
        failovers.push(delivered);
        for r in readers {
            r.abort();
        }
        replicas[victim] = Replica::start(&env).await?;
    }
    inserter.abort();
    println!("takeover (lock re-acquired):   {}", summary(&mut takeovers));
    println!(
        "failover (next event delivered): {}",
        summary(&mut failovers)
    );
    println!("duplicates over all rounds: {duplicates}");
    drop(replicas);
    db.pool().close().await;
    scratch.drop().await
}

// ---------------------------------------------------------------- pieces

/// A plan line without the 10,000 restaurant ids the custom plan inlines.
fn elide(line: &str) -> String {
    match line.find("'{") {
        Some(start) if line.len() > 200 => {
            let end = line.rfind("}'").map_or(line.len(), |e| e + 2);
            format!(
                "{}'{{…{} uuids…}}'{}",
                &line[..start],
                line[start..end].matches(',').count() + 1,
                &line[end..]
            )
        }
        _ => line.to_string(),
    }
}

fn summary(times: &mut [Duration]) -> String {
    if times.is_empty() {
        return "no samples".into();
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "n={} p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
        times.len(),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(times[times.len() - 1])
    )
}

async fn insert_order(pool: &PgPool, restaurant: Uuid) -> anyhow::Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "WITH o AS (INSERT INTO orders (id, order_number, restaurant_id, table_number, \
           customer_name, order_status, payment_status, payment_method, total_price, estimated_time) \
           VALUES ($1, 'B-1', $2, 4, 'Guest', 'pending', 'pending', 'cash', 21.00, 10) RETURNING id) \
         INSERT INTO order_items (id, order_id, menu_item_id, quantity, unit_price) \
         SELECT gen_random_uuid(), o.id, gen_random_uuid(), 2, 10.50 FROM o",
    )
    .bind(id)
    .bind(restaurant)
    .execute(pool)
    .await?;
    Ok(id)
}

/// A throwaway database.
struct Scratch {
    url: String,
    name: String,
    admin: String,
    keep: bool,
}

impl Scratch {
    async fn create(c: &Common) -> anyhow::Result<Scratch> {
        let name = format!("pollbench_{}", &Uuid::new_v4().simple().to_string()[..8]);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&c.admin_url)
            .await?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        let (base, _) = c
            .admin_url
            .rsplit_once('/')
            .context("admin url has a database")?;
        Ok(Scratch {
            url: format!("{base}/{name}"),
            name,
            admin: c.admin_url.clone(),
            keep: c.keep,
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        if self.keep {
            println!("kept database {}", self.url);
            return Ok(());
        }
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin)
            .await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&admin)
        .await?;
        Ok(())
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct RedisServer {
    url: String,
    child: Child,
}

impl RedisServer {
    async fn start() -> anyhow::Result<RedisServer> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("redis-server on PATH")?;
        let server = RedisServer {
            url: format!("redis://127.0.0.1:{port}/"),
            child,
        };
        for _ in 0..200 {
            if server.get("og:none").await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("redis-server did not start")
    }

    async fn conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await
    }

    async fn get(&self, key: &str) -> redis::RedisResult<Option<String>> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn().await?)
            .await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica_env(
    redis: &RedisServer,
    db: &Scratch,
    interval_ms: u64,
    ttl_ms: Option<u64>,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("REDIS_URL".to_string(), redis.url.clone()),
        ("DATABASE_URL".to_string(), db.url.clone()),
        ("JWT_SECRET".to_string(), SECRET.to_string()),
        ("POLL_INTERVAL_MS".to_string(), interval_ms.to_string()),
        (
            "RUST_LOG".to_string(),
            "info,orders_gateway=debug".to_string(),
        ),
    ];
    if let Some(ttl) = ttl_ms {
        env.push(("LEADER_TTL_MS".to_string(), ttl.to_string()));
    }
    env
}

/// One gateway replica: this executable as `pollbench serve`.
struct Replica {
    addr: SocketAddr,
    instance_id: String,
    child: Child,
}

impl Replica {
    async fn start(env: &[(String, String)]) -> anyhow::Result<Replica> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let instance_id = format!("bench-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BIND_ADDR", addr.to_string())
            .env("INSTANCE_ID", &instance_id)
            .stdout(std::fs::File::create(
                std::env::temp_dir().join(format!("{instance_id}.log")),
            )?)
            .spawn()?;
        let replica = Replica {
            addr,
            instance_id,
            child,
        };
        let client = reqwest::Client::new();
        for _ in 0..400 {
            if let Ok(r) = client.get(format!("http://{addr}/healthz")).send().await
                && r.status().is_success()
            {
                return Ok(replica);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("replica did not become healthy")
    }

    /// SIGKILL.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The lock holder, once there is one with an epoch above `after`.
async fn wait_leader(redis: &RedisServer, after: Option<u64>) -> anyhow::Result<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(token)) = redis.get("og:{og}:leader").await {
            let epoch: u64 = token.split(':').next().unwrap_or_default().parse()?;
            let holder = orders_gateway::broker::Lease::holder_of(&token).context("lease token")?;
            if after.is_none_or(|e| epoch > e) {
                return Ok((epoch, holder));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("no leader")
}

/// Until the poller has finished a tick (it captures every restaurant, so
/// from then on every commit of `_r` is read by some later tick).
async fn wait_watched(redis: &RedisServer, _r: Uuid) -> anyhow::Result<()> {
    for _ in 0..600 {
        let mut conn = redis.conn().await?;
        let n: i64 = redis::cmd("EXISTS")
            .arg("og:{og}:poll:cursor")
            .query_async(&mut conn)
            .await?;
        if n == 1 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the poller never completed a tick")
}

struct Received {
    replica: usize,
    order: Uuid,
    at: Instant,
}

/// One dashboard: forwards every order event's arrival time, and says
/// when its first snapshot arrived (`ready`).
async fn read_dashboard(
    addr: SocketAddr,
    restaurant: Uuid,
    replica: usize,
    tx: mpsc::UnboundedSender<Received>,
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({
            "sub": Uuid::new_v4(),
            "restaurant_id": restaurant,
            "exp": Utc::now().timestamp() + 3600,
        }),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token encodes");
    let mut ws = match MiniWs::connect(addr, &format!("/api/ws/orders/live?token={token}")).await {
        Ok(ws) => ws,
        Err(e) => {
            eprintln!("dashboard on replica {replica}: {e:#}");
            return;
        }
    };
    loop {
        let text = match ws.next_text().await {
            Ok(Some(text)) => text,
            Ok(None) => break,
            // The replica went away (the failover victim).
            Err(_) => break,
        };
        let at = Instant::now();
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if v["type"] == "snapshot"
            && let Some(ready) = ready.take()
        {
            let _ = ready.send(());
        }
        if !v["type"].as_str().is_some_and(|t| t.starts_with("order_")) {
            continue;
        }
        if let Some(order) = v["order"]["id"].as_str().and_then(|s| s.parse().ok())
            && tx.send(Received { replica, order, at }).is_err()
        {
            return;
        }
    }
}

/// Just enough of a WebSocket client to read a dashboard's frames (the
/// crate's WebSocket client library is a dev-dependency, not available to
/// binaries): the upgrade, unfragmented server frames, pongs to pings.
struct MiniWs {
    stream: BufReader<TcpStream>,
}

impl MiniWs {
    async fn connect(addr: SocketAddr, path: &str) -> anyhow::Result<MiniWs> {
        let mut stream = BufReader::new(TcpStream::connect(addr).await?);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cG9sbGJlbmNoLWtleS0wMQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.get_mut().write_all(request.as_bytes()).await?;
        let mut status = String::new();
        stream.read_line(&mut status).await?;
        if !status.contains(" 101 ") {
            bail!("upgrade refused: {status}");
        }
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Ok(MiniWs { stream })
    }

    /// The next text frame; `None` after a close frame.
    async fn next_text(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head).await?;
            let opcode = head[0] & 0x0f;
            let len = match head[1] & 0x7f {
                126 => self.stream.read_u16().await? as usize,
                127 => self.stream.read_u64().await? as usize,
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload).await?;
            match opcode {
                0x1 => return Ok(Some(String::from_utf8(payload)?)),
                0x8 => return Ok(None),
                0x9 => self.send(0xA, &payload).await?,
                _ => {}
            }
        }
    }

    /// A masked frame, as clients must send.
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mask: [u8; 4] = rand::random();
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.get_mut().write_all(&frame).await?;
        Ok(())
    }
}
