//! `soak`: the chaos soak of docs/RELIABILITY.md.
//!
//! ```text
//! cargo run --release --bin soak -- --duration 600 --seed 1
//! ```
//!
//! Starts its own redis-server (or, with `--redis cluster`, its own Redis
//! Cluster of 3 primaries + 3 replicas), a throwaway PostgreSQL database, N
//! gateway replicas (real processes: this executable re-run as `soak
//! serve`, which is the gateway configured from the environment exactly as
//! `orders-gateway` is, or `--gateway-bin`), each talking to the single
//! Redis through a loopback proxy the soak can silence; dashboards that
//! behave like the JS client; writers and an order service; and a seeded
//! fault injector. After
//! the faults stop and a settle period, it judges every dashboard (see
//! check.rs) and prints `lost=… dup=… disorder=… diverged=…`; any non-zero
//! exits 1.

mod check;
mod dashboard;
mod faults;
mod infra;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dashboard::{DashCtx, DashState, Shown, lock};
use crate::faults::{Backend, Injector, Kind, RedisMode};
use crate::infra::{Postgres, Proxy, Redis, RedisCluster, Replica, ReplicaSpec};
use crate::writer::{Ledger, WriterCtx};

const SECRET: &str = "soak-secret-0123456789abcdef";
const PUBLISH_KEY: &str = "soak-publish-key-0123456789abcdef";

#[derive(Parser, Debug)]
#[command(
    name = "soak",
    about = "Chaos soak for orders-gateway (docs/RELIABILITY.md)"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Seconds of traffic with faults (then the settle period).
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Seed of the fault schedule, the writers and the dashboards (default: time).
    #[arg(long)]
    seed: Option<u64>,
    /// Gateway replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Restaurants.
    #[arg(long, default_value_t = 6)]
    restaurants: usize,
    /// Dashboards, spread over the restaurants (dashboard i -> restaurant i mod R).
    #[arg(long, default_value_t = 30)]
    dashboards: usize,
    /// Order changes per second, all restaurants together.
    #[arg(long, default_value_t = 25.0)]
    rate: f64,
    /// Share of changes to existing orders that touch only `order_items`.
    #[arg(long, default_value_t = 0.06)]
    item_changes: f64,
    /// Share of changes to existing orders that delete an open order.
    #[arg(long, default_value_t = 0.02)]
    deletes: f64,
    /// Mean seconds between two faults.
    #[arg(long, default_value_t = 4.0)]
    fault_every: f64,
    /// Redis to run against: one redis-server behind proxies, or a Redis
    /// Cluster of 3 primaries + 3 replicas (`REDIS_CLUSTER_URLS`).
    #[arg(long, value_enum, default_value_t = RedisMode::Single)]
    redis: RedisMode,
    /// Fault kinds to inject (comma list); default all the Redis mode allows
    /// (pg-restart only with a PostgreSQL of the soak's own; redis-*/proxy-*
    /// only single, cluster-* only cluster).
    #[arg(long, value_delimiter = ',', value_enum)]
    faults: Vec<Kind>,
    /// Upper bound, in seconds, on waiting for convergence after the faults stop.
    #[arg(long, default_value_t = 60)]
    settle: u64,
    /// A PostgreSQL where CREATE DATABASE is allowed; the soak works in a
    /// database of its own there. Unset (or --own-postgres): initdb a cluster.
    #[arg(long, env = "TEST_DATABASE_URL")]
    database_url: Option<String>,
    /// initdb and run a PostgreSQL cluster of the soak's own (as `nobody`
    /// when root), so that it can be restarted as a fault.
    #[arg(long)]
    own_postgres: bool,
    /// Gateway executable; default: this executable as `soak serve`.
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Work directory (logs, Redis dump, PostgreSQL cluster); default a new
    /// one under the temp dir, removed after a passing run.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the work directory even when the run passes.
    #[arg(long)]
    keep: bool,
    /// Gateway POLL_INTERVAL_MS.
    #[arg(long, default_value_t = 500)]
    poll_interval_ms: u64,
    /// Gateway PRESENCE_TTL_MS (the dashboards-away fault outlasts it).
    #[arg(long, default_value_t = 5000)]
    presence_ttl_ms: u64,
    /// Gateway RUST_LOG.
    #[arg(long, default_value = "info")]
    gateway_log: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one gateway replica configured from the environment (internal).
    #[command(hide = true)]
    Serve,
}

/// Seconds since the start of the run: every record uses it.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn t(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// RFC 3339 → microseconds since the epoch (the version's precision).
pub fn parse_micros(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc).timestamp_micros())
}

fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(Cmd::Serve) = args.command {
        if let Err(e) = serve() {
            eprintln!("orders-gateway: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(soak(args)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("[soak] could not run: {e:#}");
            2
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
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

fn token(restaurant: Uuid, hours: i64) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({
            "sub": Uuid::new_v4(),
            "restaurant_id": restaurant,
            "exp": Utc::now().timestamp() + hours * 3600,
        }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HS256 encodes")
}

async fn soak(args: Args) -> anyhow::Result<bool> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let clock = Clock(Instant::now());
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("og-soak-{seed}-{}", std::process::id())),
    };
    let refused: Vec<&str> = args
        .faults
        .iter()
        .filter(|k| match args.redis {
            RedisMode::Single => k.cluster_only(),
            RedisMode::Cluster => k.single_only(),
        })
        .map(|k| k.name())
        .collect();
    if !refused.is_empty() {
        let allowed: Vec<&str> = Kind::all(args.redis).iter().map(|k| k.name()).collect();
        anyhow::bail!(
            "--faults {}: not possible with --redis {} (allowed: {})",
            refused.join(","),
            args.redis.name(),
            allowed.join(",")
        );
    }
    std::fs::create_dir_all(&work)?;
    println!(
        "[soak] seed={seed} redis={} duration={}s replicas={} restaurants={} dashboards={} \
         rate={}/s fault every ~{}s; work dir {}",
        args.redis.name(),
        args.duration,
        args.replicas,
        args.restaurants,
        args.dashboards,
        args.rate,
        args.fault_every,
        work.display()
    );

    // ------------------------------------------------ infrastructure
    let redis = match args.redis {
        RedisMode::Single => Backend::Single(Redis::start(&work).await?),
        RedisMode::Cluster => Backend::Cluster(RedisCluster::start(&work).await?),
    };
    let own = args.own_postgres || args.database_url.is_none();
    let (postgres, db_url) = if own {
        Postgres::own(&work).await?
    } else {
        Postgres::external(args.database_url.as_deref().unwrap_or_default()).await?
    };
    orders_gateway::db::Database::connect(&db_url)?
        .migrate()
        .await
        .context("migrate (what `orders-gateway migrate` does)")?;
    println!(
        "[soak] redis {}, PostgreSQL {} ({})",
        match &redis {
            Backend::Single(r) => format!("127.0.0.1:{}", r.port),
            Backend::Cluster(c) => format!("cluster {}", c.urls()),
        },
        db_url,
        if own {
            "own cluster"
        } else {
            "external server"
        }
    );

    let (program, prog_args) = match &args.gateway_bin {
        Some(p) => (p.clone(), vec![]),
        None => (std::env::current_exe()?, vec!["serve".to_string()]),
    };
    let mut spec = ReplicaSpec {
        program,
        args: prog_args,
        env: vec![
            ("DATABASE_URL".into(), db_url.clone()),
            ("JWT_SECRET".into(), SECRET.into()),
            ("PUBLISH_API_KEY".into(), PUBLISH_KEY.into()),
            ("POLL_INTERVAL_MS".into(), args.poll_interval_ms.to_string()),
            ("PRESENCE_TTL_MS".into(), args.presence_ttl_ms.to_string()),
            ("HEARTBEAT_INTERVAL_MS".into(), "5000".into()),
            ("SHUTDOWN_DRAIN_MS".into(), "3000".into()),
            ("RUST_LOG".into(), args.gateway_log.clone()),
            ("NO_COLOR".into(), "1".into()),
        ],
        log_dir: work.clone(),
    };
    if let Backend::Cluster(c) = &redis {
        spec.env.push(("REDIS_CLUSTER_URLS".into(), c.urls()));
    }
    let mut replicas = Vec::new();
    for slot in 0..args.replicas {
        let proxy = match &redis {
            Backend::Single(r) => Some(Proxy::start(r.port).await?),
            Backend::Cluster(_) => None,
        };
        let mut r = Replica::new(slot, proxy);
        r.spawn(&spec).await?;
        replicas.push(r);
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let restaurants: Vec<Uuid> = (0..args.restaurants).map(|_| Uuid::new_v4()).collect();
    let http = reqwest::Client::new();

    // ------------------------------------------------ dashboards
    let dash_stop = CancellationToken::new();
    let dctx = Arc::new(DashCtx {
        clock,
        replicas: addrs.clone(),
        stop: dash_stop.clone(),
        seed,
    });
    let away: Vec<watch::Sender<f64>> = (0..args.restaurants)
        .map(|_| watch::channel(0.0).0)
        .collect();
    let hours = (args.duration + args.settle) as i64 / 3600 + 2;
    let mut dashes = Vec::new();
    let mut dash_tasks = Vec::new();
    for i in 0..args.dashboards {
        let ri = i % args.restaurants;
        let state = Arc::new(Mutex::new(DashState::new(format!("d{i:02}"), ri)));
        dashes.push(state.clone());
        dash_tasks.push(tokio::spawn(dashboard::run(
            i,
            state,
            token(restaurants[ri], hours),
            dctx.clone(),
            away[ri].subscribe(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while dashes.iter().any(|d| !lock(d).live) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // ------------------------------------------------ writers, order service
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(&db_url)?;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let write_stop = CancellationToken::new();
    let wctx = Arc::new(WriterCtx {
        clock,
        pool: pool.clone(),
        restaurants: restaurants.clone(),
        replicas: addrs.clone(),
        publish_key: PUBLISH_KEY.into(),
        http: http.clone(),
        ledger: ledger.clone(),
        stop: write_stop.clone(),
        rate: args.rate,
        seed,
        publishing: Arc::new(Semaphore::new(64)),
        item_changes: args.item_changes.clamp(0.0, 0.5),
        deletes: args.deletes.clamp(0.0, 0.3),
    });
    let writer_tasks: Vec<_> = (0..args.restaurants)
        .map(|ri| tokio::spawn(writer::run(ri, wctx.clone())))
        .collect();

    // ------------------------------------------------ faults
    let mut kinds = if args.faults.is_empty() {
        Kind::all(args.redis)
    } else {
        args.faults.clone()
    };
    if !own {
        kinds.retain(|k| *k != Kind::PgRestart);
    }
    let mut injector = Injector {
        clock,
        rng: Injector::new_rng(seed),
        kinds,
        every: args.fault_every,
        replicas,
        spec,
        redis,
        postgres,
        restaurants: restaurants.clone(),
        away,
        presence_ttl: Duration::from_millis(args.presence_ttl_ms),
        leader_ttl: Duration::from_millis(3 * args.poll_interval_ms),
        status_token: token(restaurants[0], hours),
        http,
        faults: Vec::new(),
        crashes: Vec::new(),
        errors: Vec::new(),
        leaderless: Vec::new(),
        leaderless_since: None,
        next_leader_check: 0.0,
    };
    let faults_from = clock.t();
    injector.run(faults_from + args.duration as f64).await;
    let faults_end = clock.t();

    // ------------------------------------------------ settle
    write_stop.cancel();
    for t in writer_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    injector.heal_all().await;
    println!(
        "[soak] t={:7.1}s faults and writes stopped; settling (at most {} s)",
        clock.t(),
        args.settle
    );
    let settle_deadline = Instant::now() + Duration::from_secs(args.settle);
    let mut db: check::Db;
    let mut converged_after = None;
    loop {
        injector.watch_crashes().await;
        injector.watch_leader().await;
        db = read_open_orders(&pool, &restaurants)
            .await
            .unwrap_or_default();
        let behind = dashes
            .iter()
            .filter(|d| {
                let d = lock(d);
                let want = db.get(&d.restaurant).cloned().unwrap_or_default();
                !check::diff_view(&d.view, &want).is_empty() || d.offline.is_some()
            })
            .count();
        if behind == 0 {
            converged_after = Some(clock.t() - faults_end);
            break;
        }
        if Instant::now() > settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let dashes_stopped = clock.t();
    dash_stop.cancel();
    for t in dash_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    db = read_open_orders(&pool, &restaurants).await?;

    // ------------------------------------------------ judgement
    // In a block of its own: the dashboards' and the ledger's locks are
    // held while judging and never across an await.
    let ok = {
        let guards: Vec<_> = dashes.iter().map(|d| lock(d)).collect();
        let states: Vec<&DashState> = guards.iter().map(|g| &**g).collect();
        let ledger = lock(&ledger);
        let findings = check::judge(&states, &ledger, &injector.faults, &db, dashes_stopped);
        for l in &findings.notes {
            println!("{l}");
        }
        if findings.id_reused > 0 {
            println!(
                "[soak] {} event id(s) named two different events (ids issued again after Redis lost writes)",
                findings.id_reused
            );
        }
        for l in &findings.lines {
            println!("{l}");
        }
        if !findings.by_fault.is_empty() {
            println!("[soak] findings by the fault that preceded them:");
            for (k, v) in &findings.by_fault {
                let parts: Vec<String> = v.iter().map(|(w, n)| format!("{w}={n}")).collect();
                println!("         {k:<16} {}", parts.join(" "));
            }
        }
        injector.leaderless_until(clock.t());
        for (from, to) in &injector.leaderless {
            println!(
                "[soak] NO POLLER LEADER t={from:.1}s–{to:.1}s ({:.1} s, lease TTL {} ms); {}",
                to - from,
                injector.leader_ttl.as_millis(),
                injector
                    .faults
                    .iter()
                    .rev()
                    .find(|f| f.t <= *from)
                    .map(|f| format!(
                        "after fault #{} {} at t={:.1}s ({})",
                        f.n,
                        f.kind.name(),
                        f.t,
                        f.detail
                    ))
                    .unwrap_or_else(|| "before any fault".into())
            );
        }
        for e in &injector.errors {
            println!("[soak] fault injection error: {e}");
        }

        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &injector.faults {
            *by_kind.entry(f.kind.name()).or_default() += 1;
        }
        let mut sum = dashboard::Stats::default();
        let mut closes: BTreeMap<String, u64> = BTreeMap::new();
        for d in &states {
            sum.deliveries += d.stats.deliveries;
            sum.snapshots += d.stats.snapshots;
            sum.resyncs += d.stats.resyncs;
            sum.resumes += d.stats.resumes;
            sum.connects += d.stats.connects;
            sum.connect_failures += d.stats.connect_failures;
            sum.dead_sockets += d.stats.dead_sockets;
            for (k, v) in &d.stats.close_codes {
                *closes.entry(k.clone()).or_default() += v;
            }
        }
        let w = &ledger.stats;
        println!(
            "[soak] faults ({} in {:.0} s): {}",
            injector.faults.len(),
            faults_end - faults_from,
            by_kind
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "[soak] writes: commits={} held_open={} item_only={} deletes={} errors={}{}; \
         order service: published={} (duplicate answers {}, late {}) failed={}",
            w.commits,
            w.held,
            w.item_changes,
            w.deletes,
            w.errors,
            ledger
                .last_error
                .as_ref()
                .map(|e| format!(" (last: {e})"))
                .unwrap_or_default(),
            w.published,
            w.publish_duplicates,
            w.publish_late,
            w.publish_failed
        );
        println!(
            "[soak] dashboards: deliveries={} snapshots={} resyncs={} resumes={} sockets={} \
         connect_failures={} dead_sockets={}; endings: {}",
            sum.deliveries,
            sum.snapshots,
            sum.resyncs,
            sum.resumes,
            sum.connects,
            sum.connect_failures,
            sum.dead_sockets,
            closes
                .iter()
                .map(|(k, n)| format!("[{k}]={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        if findings.reseen > 0 {
            println!(
                "[soak] reseen={} (not counted): a version its snapshot showed, sent again after \
             the dashboard resumed on another socket; the JS client drops it",
                findings.reseen
            );
        }
        let mut delays = findings.delays.clone();
        delays.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            delays
                .get(((delays.len() as f64 * p) as usize).min(delays.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        println!(
            "[soak] delivery delay after the event's first sighting: p50={:.3}s p99={:.3}s \
         max={:.1}s; >5 s: {}",
            pct(0.5),
            pct(0.99),
            delays.last().copied().unwrap_or(0.0),
            delays.iter().filter(|d| **d > 5.0).count()
        );
        if let Some(w) = &findings.worst_delay {
            println!("[soak] slowest delivery: {w}");
        }
        for c in &injector.crashes {
            println!(
                "[soak] CRASH: replica r{} ({}) exited on its own at t={:.1}s (see replica-{}.log)",
                c.slot, c.instance, c.t, c.slot
            );
        }
        match converged_after {
            Some(s) => println!("[soak] converged {s:.1} s after the faults stopped"),
            None => println!(
                "[soak] NOT converged within the {} s settle bound",
                args.settle
            ),
        }
        let crashed = injector.crashes.len();
        let ok = findings.lost == 0
            && findings.dup == 0
            && findings.disorder == 0
            && findings.diverged == 0
            && crashed == 0;
        println!(
            "soak: seed={seed} duration={}s lost={} dup={} disorder={} diverged={} crashed={} \
         faults={} deliveries={} -> {}",
            args.duration,
            findings.lost,
            findings.dup,
            findings.disorder,
            findings.diverged,
            crashed,
            injector.faults.len(),
            sum.deliveries,
            if ok { "PASS" } else { "FAIL" }
        );
        ok
    };
    pool.close().await;
    drop(injector);
    if ok && !args.keep && args.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("[soak] logs: {}", work.display());
    }
    Ok(ok)
}

/// Open orders per restaurant index, as dashboards should show them.
async fn read_open_orders(pool: &sqlx::PgPool, restaurants: &[Uuid]) -> anyhow::Result<check::Db> {
    type Row = (
        Uuid,
        Uuid,
        String,
        DateTime<Utc>,
        sqlx::types::Json<Vec<(Uuid, i64)>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT o.id, o.restaurant_id, o.order_status, o.updated_at, \
         COALESCE(json_agg(json_build_array(i.id, i.quantity)) FILTER (WHERE i.id IS NOT NULL), \
         '[]'::json) FROM orders o LEFT JOIN order_items i ON i.order_id = o.id \
         WHERE o.restaurant_id = ANY($1) AND o.order_status NOT IN ('completed', 'cancelled') \
         GROUP BY o.id",
    )
    .bind(restaurants)
    .fetch_all(pool)
    .await?;
    let index: HashMap<Uuid, usize> = restaurants
        .iter()
        .enumerate()
        .map(|(i, r)| (*r, i))
        .collect();
    let mut db: check::Db = (0..restaurants.len())
        .map(|i| (i, HashMap::new()))
        .collect();
    for (id, r, status, updated_at, items) in rows {
        let mut items = items.0;
        items.sort();
        db.entry(index[&r]).or_default().insert(
            id,
            Shown {
                status,
                version: updated_at.timestamp_micros(),
                items,
            },
        );
    }
    Ok(db)
}
