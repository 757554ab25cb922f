//! `loadgen`: the load tool of docs/BENCHMARKS.md.
//!
//! Opens N authenticated dashboard sockets over R restaurants against one or
//! more gateways (round-robin), then publishes order events through Redis at
//! one or more target rates and measures, per rate: deliveries, loss,
//! duplicates and publish→socket latency. Every event carries its send time
//! (`sent_ns`, nanoseconds on this process's monotonic clock), a global
//! sequence number and a phase tag, so a socket needs no JSON parser to
//! account for it. With `--gateway-pid` it also reads the gateway's CPU time
//! (utime+stime) and RSS from /proc, so CPU per delivery and memory per idle
//! connection come out of the same run.
//!
//! Built only with the `loadgen` feature, so normal builds do not pull
//! tokio-tungstenite or hdrhistogram:
//! `cargo run --release --features loadgen --bin loadgen -- --help`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use uuid::Uuid;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "Load generator and latency meter for orders-gateway"
)]
struct Args {
    /// Gateway base URLs (comma list); sockets are spread round-robin.
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:8080")]
    urls: Vec<String>,
    /// Redis the gateways use; events are published there.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// HS256 secret of the gateways (tokens are minted here).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Sockets to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Restaurants the sockets are spread over (socket i → restaurant i mod R).
    #[arg(long, default_value_t = 100)]
    restaurants: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Local source addresses to bind client sockets to, round-robin
    /// (e.g. 127.0.0.2,127.0.0.3): each gives another ~28k loopback ports.
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Target event rates (events/s), one measured phase each, in order.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    rates: Vec<f64>,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 20.0)]
    duration_secs: f64,
    /// Unmeasured seconds at the phase's rate before each phase.
    #[arg(long, default_value_t = 3.0)]
    warmup_secs: f64,
    /// After a phase, wait at most this long for late deliveries.
    #[arg(long, default_value_t = 5.0)]
    drain_secs: f64,
    /// Stop stepping through `--rates` after the first phase with loss, or
    /// with p99 above this many milliseconds.
    #[arg(long)]
    stop_above_p99_ms: Option<f64>,
    /// Idle mode: connect, wait `--hold-secs`, measure RSS and CPU, exit.
    #[arg(long)]
    idle: bool,
    /// Idle mode: how long to hold the sockets before measuring.
    #[arg(long, default_value_t = 10.0)]
    hold_secs: f64,
    /// `fcall`: FCALL og_publish (numbered, recorded, deduplicated: the
    /// order services' path). `publish`: raw PUBLISH orders:<rid>.
    #[arg(long, value_enum, default_value_t = PublishMode::Fcall)]
    publish: PublishMode,
    /// Publishes in flight at once on the multiplexed Redis connection.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Items per order (event size: ~420 B + ~150 B per item).
    #[arg(long, default_value_t = 3)]
    items: usize,
    /// Runtime worker threads; 1 = a current-thread runtime (fits one core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Gateway process ids whose CPU time and RSS are read from /proc (summed).
    #[arg(long, value_delimiter = ',')]
    gateway_pid: Vec<u32>,
    /// Redis process id, to report its CPU use (saturation check).
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Print one JSON object per result line on stdout.
    #[arg(long)]
    json: bool,
    /// Free-form label copied into every JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PublishMode {
    Fcall,
    Publish,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.connections == 0 || args.restaurants == 0 || args.urls.is_empty() {
        bail!("--connections, --restaurants and --urls must not be empty");
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

// ---------------------------------------------------------------- accounting

/// Tag of events sent during warm-up: delivered, but counted nowhere.
const WARMUP: u64 = 0;

struct PhaseStats {
    received: u64,
    dups: u64,
    latency_us: Histogram<u64>,
}

impl PhaseStats {
    fn new() -> PhaseStats {
        PhaseStats {
            received: 0,
            dups: 0,
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
        }
    }
}

struct Shared {
    origin: Instant,
    /// Index = phase tag (0 = warm-up).
    phases: Mutex<Vec<PhaseStats>>,
    closed: AtomicU64,
    close_codes: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn phases(&self) -> MutexGuard<'_, Vec<PhaseStats>> {
        self.phases.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
    fn closed_with(&self, why: String) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        *self
            .close_codes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(why)
            .or_default() += 1;
    }
}

/// The unsigned integer following `key` in `text` (`"key":123`).
fn field(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    text[at..at + digits].parse().ok()
}

/// One socket's reader: accounts for every bench event until the socket ends.
async fn read_socket(mut ws: WebSocketStream<TcpStream>, shared: Arc<Shared>) {
    let mut last_seq: Option<u64> = None;
    loop {
        let msg = match ws.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                shared.closed_with(format!("error: {e}"));
                return;
            }
            None => {
                shared.closed_with("eof".into());
                return;
            }
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(frame) => {
                let why = frame.map_or("close".to_string(), |f| {
                    format!("close {}", u16::from(f.code))
                });
                shared.closed_with(why);
                return;
            }
            _ => continue,
        };
        let now = shared.now_ns();
        let (Some(seq), Some(phase), Some(sent)) = (
            field(&text, "\"bench_seq\":"),
            field(&text, "\"bench_phase\":"),
            field(&text, "\"sent_ns\":"),
        ) else {
            continue;
        };
        // One publisher, one Redis connection: a restaurant's events arrive
        // in sequence order, so anything not newer is a duplicate (or a
        // reordering, which the contract forbids just the same).
        let dup = last_seq.is_some_and(|l| seq <= l);
        if !dup {
            last_seq = Some(seq);
        }
        let mut phases = shared.phases();
        if let Some(p) = phases.get_mut(phase as usize) {
            p.received += 1;
            if dup {
                p.dups += 1;
            } else {
                let us = (now.saturating_sub(sent) / 1000).max(1);
                p.latency_us.saturating_record(us);
            }
        }
    }
}

// ---------------------------------------------------------------- /proc

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (utime, stime) in seconds.
fn cpu_secs(pid: u32, hz: f64) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let user: f64 = f.get(11)?.parse().ok()?;
    let sys: f64 = f.get(12)?.parse().ok()?;
    Some((user / hz, sys / hz))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[derive(Clone, Copy)]
struct Probe {
    at: Instant,
    gateway_cpu: f64,
    gateway_sys: f64,
    gateway_rss_kib: u64,
    redis_cpu: f64,
    self_cpu: f64,
}

struct Procs {
    gateways: Vec<u32>,
    redis: Option<u32>,
    hz: f64,
}

impl Procs {
    fn probe(&self) -> Probe {
        let total = |t: (f64, f64)| t.0 + t.1;
        let gw: Vec<(f64, f64)> = self
            .gateways
            .iter()
            .filter_map(|p| cpu_secs(*p, self.hz))
            .collect();
        Probe {
            at: Instant::now(),
            gateway_cpu: gw.iter().copied().map(total).sum(),
            gateway_sys: gw.iter().map(|t| t.1).sum(),
            gateway_rss_kib: self.gateways.iter().filter_map(|p| rss_kib(*p)).sum(),
            redis_cpu: self
                .redis
                .and_then(|p| cpu_secs(p, self.hz))
                .map_or(0.0, total),
            self_cpu: cpu_secs(std::process::id(), self.hz).map_or(0.0, total),
        }
    }
}

// ---------------------------------------------------------------- connect

#[derive(Serialize)]
struct Claims<'a> {
    sub: String,
    restaurant_id: &'a str,
    exp: i64,
}

struct Target {
    url: String,
    addr: SocketAddr,
}

fn target(url: &str) -> anyhow::Result<Target> {
    let url = url.trim_end_matches('/').to_string();
    let hostport = url
        .strip_prefix("ws://")
        .with_context(|| format!("{url}: only ws:// URLs are supported"))?;
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve"))?
        .next()
        .with_context(|| format!("{url}: no address"))?;
    Ok(Target { url, addr })
}

fn client_config() -> WebSocketConfig {
    // The client side need not be frugal, but 10k sockets × the 128 KiB
    // default read buffer is 1.3 GB for nothing.
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
}

async fn connect(
    target: &Target,
    source: Option<IpAddr>,
    token: &str,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("{}/api/ws/orders/live?token={token}", target.url);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(client_config())).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.contains("\"connection_established\"") => Ok(ws),
        Some(Ok(Message::Close(f))) => bail!(
            "refused: {}",
            f.map_or("close".into(), |f| format!(
                "{} {}",
                u16::from(f.code),
                f.reason
            ))
        ),
        other => bail!("unexpected first frame: {other:?}"),
    }
}

struct Connected {
    /// Sockets connected per restaurant index.
    per_restaurant: Vec<u64>,
    ok: usize,
    failed: usize,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    handshake_ms: Histogram<u64>,
}

async fn connect_all(
    args: &Args,
    restaurants: &[String],
    shared: &Arc<Shared>,
) -> anyhow::Result<Connected> {
    let targets: Arc<Vec<Target>> = Arc::new(
        args.urls
            .iter()
            .map(|u| target(u))
            .collect::<anyhow::Result<_>>()?,
    );
    let key = jsonwebtoken::EncodingKey::from_secret(args.jwt_secret.as_bytes());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let exp = chrono::Utc::now().timestamp() + 6 * 3600;
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut c = Connected {
        per_restaurant: vec![0; restaurants.len()],
        ok: 0,
        failed: 0,
        errors: BTreeMap::new(),
        elapsed: Duration::ZERO,
        handshake_ms: Histogram::new_with_bounds(1, 600_000, 3)?,
    };
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let r = i % restaurants.len();
        let claims = Claims {
            sub: format!("bench-user-{i}"),
            restaurant_id: &restaurants[r],
            exp,
        };
        let token = jsonwebtoken::encode(&header, &claims, &key)?;
        let permit = gate.clone().acquire_owned().await?;
        let targets = targets.clone();
        let source =
            (!args.source_ips.is_empty()).then(|| args.source_ips[i % args.source_ips.len()]);
        let shared = shared.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            let target = &targets[i % targets.len()];
            let res =
                tokio::time::timeout(Duration::from_secs(30), connect(target, source, &token))
                    .await;
            drop(permit);
            let took = t0.elapsed();
            match res {
                Ok(Ok(ws)) => {
                    tokio::spawn(read_socket(ws, shared));
                    Ok((r, took))
                }
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err("handshake timed out".to_string()),
            }
        });
        // Reap as we go so the set stays small.
        while let Some(done) = tasks.try_join_next() {
            account(&mut c, done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        account(&mut c, done);
    }
    c.elapsed = started.elapsed();
    Ok(c)
}

fn account(
    c: &mut Connected,
    done: Result<Result<(usize, Duration), String>, tokio::task::JoinError>,
) {
    match done {
        Ok(Ok((r, took))) => {
            c.ok += 1;
            c.per_restaurant[r] += 1;
            c.handshake_ms
                .saturating_record((took.as_millis() as u64).max(1));
        }
        Ok(Err(e)) => {
            c.failed += 1;
            *c.errors.entry(e).or_default() += 1;
        }
        Err(e) => {
            c.failed += 1;
            *c.errors.entry(format!("task: {e}")).or_default() += 1;
        }
    }
}

// ---------------------------------------------------------------- publish

struct Publisher {
    conn: redis::aio::MultiplexedConnection,
    mode: PublishMode,
    restaurants: Arc<Vec<String>>,
    items: usize,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    errors: Arc<AtomicU64>,
    first_error: Arc<Mutex<Option<String>>>,
    seq: u64,
}

fn event_body(
    seq: u64,
    phase: u64,
    sent_ns: u64,
    restaurant: &str,
    items: usize,
) -> (String, String) {
    let order_id = Uuid::new_v4();
    let now = chrono::Utc::now();
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let items: Vec<_> = (0..items)
        .map(|k| {
            json!({
                "id": Uuid::new_v4(),
                "menu_item_id": Uuid::new_v4(),
                "quantity": 1 + k as i64 % 3,
                "unit_price": 9.5 + k as f64,
            })
        })
        .collect();
    let order = json!({
        "id": order_id,
        "order_number": format!("B-{seq:08}"),
        "restaurant_id": restaurant,
        "table_number": 1 + seq % 40,
        "customer_name": "Bench Customer",
        "customer_phone": "+15550100",
        "order_status": "pending",
        "payment_status": "pending",
        "payment_method": "card",
        "total_price": 42.5,
        "estimated_time": 15,
        "created_at": ts,
        "updated_at": ts,
        "items": items,
    });
    // The bench fields go first so a reader finds them without scanning.
    let body = format!(
        "{{\"type\":\"order_created\",\"bench_seq\":{seq},\"bench_phase\":{phase},\"sent_ns\":{sent_ns},\"order\":{order},\"timestamp\":\"{ts}\"}}"
    );
    let version = format!("{order_id}@{}", now.timestamp_micros());
    (body, version)
}

impl Publisher {
    /// Publish at `rate` events/s for `secs`, tagging events `phase`.
    /// Returns (events, expected deliveries, achieved rate).
    async fn run(
        &mut self,
        shared: &Arc<Shared>,
        per_restaurant: &[u64],
        rate: f64,
        secs: f64,
        phase: u64,
    ) -> (u64, u64, f64) {
        let total = (rate * secs).round() as u64;
        let started = Instant::now();
        let mut sent = 0u64;
        let mut expected = 0u64;
        let n = self.restaurants.len() as u64;
        while sent < total {
            let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
            while sent < due {
                let permit = self
                    .in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed");
                let r = (self.seq % n) as usize;
                let (body, version) = event_body(
                    self.seq,
                    phase,
                    shared.now_ns(),
                    &self.restaurants[r],
                    self.items,
                );
                let cmd = match self.mode {
                    PublishMode::Fcall => {
                        let rid = &self.restaurants[r];
                        let order_id = version.split('@').next().unwrap_or_default();
                        let mut c = redis::cmd("FCALL");
                        c.arg(orders_gateway::broker::functions::function_name(
                            "og_publish",
                        ))
                        .arg(3)
                        .arg(format!("og:{{orders:{rid}}}:meta"))
                        .arg(format!("og:{{orders:{rid}}}:hist"))
                        .arg(format!("og:{{orders:{rid}}}:v:{order_id}"))
                        .arg(rid)
                        .arg(version)
                        .arg(body);
                        c
                    }
                    PublishMode::Publish => {
                        let mut c = redis::cmd("PUBLISH");
                        c.arg(format!("orders:{}", self.restaurants[r])).arg(body);
                        c
                    }
                };
                let mut conn = self.conn.clone();
                let errors = self.errors.clone();
                let first_error = self.first_error.clone();
                tokio::spawn(async move {
                    if let Err(e) = cmd.query_async::<redis::Value>(&mut conn).await {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert_with(|| e.to_string());
                    }
                    drop(permit);
                });
                expected += per_restaurant[r];
                self.seq += 1;
                sent += 1;
            }
            if sent < total {
                let next = started + Duration::from_secs_f64((sent as f64) / rate);
                tokio::time::sleep_until(next.into()).await;
            }
        }
        // Every publish answered.
        let all = self
            .in_flight
            .acquire_many(self.max_in_flight as u32)
            .await
            .expect("never closed");
        drop(all);
        let took = started.elapsed().as_secs_f64();
        (sent, expected, sent as f64 / took.max(1e-9))
    }
}

// ---------------------------------------------------------------- report

fn emit(args: &Args, human: String, mut value: serde_json::Value) {
    eprintln!("{human}");
    if args.json {
        value["label"] = json!(args.label);
        println!("{value}");
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn run(args: Args) -> anyhow::Result<()> {
    let procs = Procs {
        gateways: args.gateway_pid.clone(),
        redis: args.redis_pid,
        hz: clock_ticks(),
    };
    let restaurants: Arc<Vec<String>> = Arc::new(
        (0..args.restaurants)
            .map(|_| Uuid::new_v4().to_string())
            .collect(),
    );
    let shared = Arc::new(Shared {
        origin: Instant::now(),
        phases: Mutex::new((0..=args.rates.len()).map(|_| PhaseStats::new()).collect()),
        closed: AtomicU64::new(0),
        close_codes: Mutex::new(BTreeMap::new()),
    });

    // Connect.
    let before = procs.probe();
    let c = connect_all(&args, &restaurants, &shared).await?;
    let after = procs.probe();
    let rate = c.ok as f64 / c.elapsed.as_secs_f64().max(1e-9);
    let gw_cpu = after.gateway_cpu - before.gateway_cpu;
    emit(
        &args,
        format!(
            "connect: {} ok, {} failed in {:.2} s = {:.0}/s; handshake p50 {} ms p99 {} ms; gateway CPU {:.1} µs/connection{}",
            c.ok,
            c.failed,
            c.elapsed.as_secs_f64(),
            rate,
            c.handshake_ms.value_at_quantile(0.5),
            c.handshake_ms.value_at_quantile(0.99),
            gw_cpu * 1e6 / c.ok.max(1) as f64,
            if c.errors.is_empty() {
                String::new()
            } else {
                format!("; errors {:?}", c.errors)
            },
        ),
        json!({
            "kind": "connect",
            "connections": c.ok,
            "failed": c.failed,
            "errors": c.errors,
            "restaurants": args.restaurants,
            "seconds": c.elapsed.as_secs_f64(),
            "connects_per_s": rate,
            "handshake_p50_ms": c.handshake_ms.value_at_quantile(0.5),
            "handshake_p99_ms": c.handshake_ms.value_at_quantile(0.99),
            "gateway_cpu_us_per_connection": gw_cpu * 1e6 / c.ok.max(1) as f64,
        }),
    );
    if c.ok == 0 {
        bail!("no socket connected");
    }

    if args.idle {
        // Let the gateway settle (presence registration, allocator), then
        // measure memory and the CPU an idle socket costs.
        let settle = Duration::from_secs_f64(args.hold_secs.max(0.0));
        tokio::time::sleep(settle / 2).await;
        let p0 = procs.probe();
        tokio::time::sleep(settle / 2).await;
        let p1 = procs.probe();
        let open = c.ok as u64 - shared.closed.load(Ordering::Relaxed);
        let per_conn = (p1.gateway_rss_kib as f64 - before.gateway_rss_kib as f64) / c.ok as f64;
        let idle_cpu = (p1.gateway_cpu - p0.gateway_cpu) / (p1.at - p0.at).as_secs_f64();
        emit(
            &args,
            format!(
                "idle: {} sockets open; gateway RSS {} KiB before, {} KiB after = {:.2} KiB per connection; idle gateway CPU {:.2}% of a core",
                open,
                before.gateway_rss_kib,
                p1.gateway_rss_kib,
                per_conn,
                idle_cpu * 100.0
            ),
            json!({
                "kind": "idle",
                "connections": c.ok,
                "open": open,
                "rss_before_kib": before.gateway_rss_kib,
                "rss_after_kib": p1.gateway_rss_kib,
                "rss_per_connection_kib": per_conn,
                "idle_cpu_cores": idle_cpu,
            }),
        );
        return Ok(());
    }

    let client = redis::Client::open(args.redis_url.as_str())?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .context("connect to Redis")?;
    let mut publisher = Publisher {
        conn,
        mode: args.publish,
        restaurants: restaurants.clone(),
        items: args.items,
        in_flight: Arc::new(Semaphore::new(args.max_in_flight.max(1))),
        max_in_flight: args.max_in_flight.max(1),
        errors: Arc::new(AtomicU64::new(0)),
        first_error: Arc::new(Mutex::new(None)),
        seq: 1,
    };

    for (k, &rate) in args.rates.iter().enumerate() {
        let phase = k as u64 + 1;
        if args.warmup_secs > 0.0 {
            publisher
                .run(&shared, &c.per_restaurant, rate, args.warmup_secs, WARMUP)
                .await;
        }
        let closed_before = shared.closed.load(Ordering::Relaxed);
        let errors_before = publisher.errors.load(Ordering::Relaxed);
        let p0 = procs.probe();
        let (events, expected, achieved) = publisher
            .run(&shared, &c.per_restaurant, rate, args.duration_secs, phase)
            .await;
        // Wait for stragglers: until everything arrived or nothing moves.
        let drain_until = Instant::now() + Duration::from_secs_f64(args.drain_secs);
        let mut last = u64::MAX;
        let mut still_since = Instant::now();
        loop {
            let got = {
                let p = shared.phases();
                p[phase as usize].received - p[phase as usize].dups
            };
            if got >= expected || Instant::now() >= drain_until {
                break;
            }
            if got != last {
                last = got;
                still_since = Instant::now();
            } else if still_since.elapsed() > Duration::from_millis(1500) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p1 = procs.probe();
        let (received, dups, h) = {
            let p = shared.phases();
            let s = &p[phase as usize];
            (s.received, s.dups, s.latency_us.clone())
        };
        let unique = received - dups;
        let lost = expected.saturating_sub(unique);
        let wall = (p1.at - p0.at).as_secs_f64();
        let gw_cpu = p1.gateway_cpu - p0.gateway_cpu;
        let cpu_per_delivery_us = gw_cpu * 1e6 / unique.max(1) as f64;
        let sys_per_delivery_us = (p1.gateway_sys - p0.gateway_sys) * 1e6 / unique.max(1) as f64;
        let closed = shared.closed.load(Ordering::Relaxed) - closed_before;
        let errors = publisher.errors.load(Ordering::Relaxed) - errors_before;
        // Over the time the events actually took to publish: when the load
        // side cannot keep the target rate, the phase runs longer.
        let publish_secs = if achieved > 0.0 {
            events as f64 / achieved
        } else {
            args.duration_secs
        };
        let deliveries_per_s = unique as f64 / publish_secs.max(1e-9);
        emit(
            &args,
            format!(
                "rate {rate:.0} ev/s (achieved {achieved:.0}): {events} events, {expected} expected, {unique} delivered ({deliveries_per_s:.0}/s), \
                 lost {lost}, dups {dups}; latency p50 {:.2} ms p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}; \
                 gateway CPU {:.2} µs/delivery ({:.2} in the kernel; {:.0}% of a core), RSS {} KiB; redis {:.0}%, loadgen {:.0}% of a core; \
                 sockets closed {closed}, publish errors {errors}",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.9)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max()),
                cpu_per_delivery_us,
                sys_per_delivery_us,
                gw_cpu / wall * 100.0,
                p1.gateway_rss_kib,
                (p1.redis_cpu - p0.redis_cpu) / wall * 100.0,
                (p1.self_cpu - p0.self_cpu) / wall * 100.0,
            ),
            json!({
                "kind": "phase",
                "phase": phase,
                "connections": c.ok,
                "restaurants": args.restaurants,
                "publish": format!("{:?}", args.publish).to_lowercase(),
                "rate_target": rate,
                "rate_achieved": achieved,
                "events": events,
                "expected": expected,
                "delivered": unique,
                "deliveries_per_s": deliveries_per_s,
                "lost": lost,
                "dups": dups,
                "p50_ms": ms(h.value_at_quantile(0.5)),
                "p90_ms": ms(h.value_at_quantile(0.9)),
                "p99_ms": ms(h.value_at_quantile(0.99)),
                "p999_ms": ms(h.value_at_quantile(0.999)),
                "max_ms": ms(h.max()),
                "gateway_cpu_s": gw_cpu,
                "gateway_cpu_us_per_delivery": cpu_per_delivery_us,
                "gateway_sys_us_per_delivery": sys_per_delivery_us,
                "gateway_cpu_cores": gw_cpu / wall,
                "gateway_rss_kib": p1.gateway_rss_kib,
                "redis_cpu_cores": (p1.redis_cpu - p0.redis_cpu) / wall,
                "loadgen_cpu_cores": (p1.self_cpu - p0.self_cpu) / wall,
                "sockets_closed": closed,
                "publish_errors": errors,
                "first_publish_error": publisher.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            }),
        );
        if let Some(limit) = args.stop_above_p99_ms
            && (lost > 0 || ms(h.value_at_quantile(0.99)) > limit)
        {
            break;
        }
    }
    let codes = shared
        .close_codes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if !codes.is_empty() {
        eprintln!("socket endings: {codes:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_without_parsing_json() {
        let t = r#"{"event_id":"1-2","type":"order_created","bench_seq":42,"bench_phase":3,"sent_ns":123456,"order":{}}"#;
        assert_eq!(field(t, "\"bench_seq\":"), Some(42));
        assert_eq!(field(t, "\"bench_phase\":"), Some(3));
        assert_eq!(field(t, "\"sent_ns\":"), Some(123456));
        assert_eq!(field(t, "\"missing\":"), None);
    }

    #[test]
    fn event_bodies_are_json_with_the_bench_fields_first() {
        let r = Uuid::new_v4().to_string();
        let (body, version) = event_body(7, 1, 99, &r, 3);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["order"]["restaurant_id"], r.as_str());
        assert_eq!(v["order"]["items"].as_array().unwrap().len(), 3);
        assert!(
            body.starts_with(
                r#"{"type":"order_created","bench_seq":7,"bench_phase":1,"sent_ns":99,"#
            )
        );
        assert!(version.contains('@'));
    }
}
