//! Memory of sockets that never read while a large snapshot is offered to
//! each (docs/BENCHMARKS.md, "Snapshots to sockets that never read").
//!
//! Starts everything itself on 127.0.0.1: a throwaway database with one
//! restaurant's open orders sized to `--snapshot-mb`, the release gateway
//! (next to this binary) with an in-memory broker, then `--sockets`
//! WebSockets with a 4 KiB receive buffer that never read. It samples the
//! gateway's RSS (/proc/<pid>/status) while they are offered the snapshot,
//! then closes them all and samples again.
//!
//!   cargo build --release --bin orders-gateway --bin snapbench
//!   target/release/snapbench --database-url postgres://postgres@127.0.0.1:5432/postgres

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[derive(Parser, Debug)]
struct Args {
    /// Admin URL of a PostgreSQL server; a throwaway database is created on it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// Sockets that never read.
    #[arg(long, default_value_t = 1000)]
    sockets: usize,
    /// Target size of the snapshot frame.
    #[arg(long, default_value_t = 5.0)]
    snapshot_mb: f64,
    /// Seconds to sample while the sockets are open.
    #[arg(long, default_value_t = 30)]
    hold_secs: u64,
    /// Seconds to sample after the client closed them.
    #[arg(long, default_value_t = 10)]
    after_secs: u64,
    /// Rounds of (connect all, hold, close all): memory that is reused, not
    /// leaked, does not grow from one round to the next.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Sockets connecting at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// The gateway binary. Default: `orders-gateway` next to this one.
    #[arg(long)]
    gateway: Option<PathBuf>,
}

const SECRET: &str = "snapbench-secret-0123456789abcdef";
/// Bytes of one generated order in the snapshot JSON (measured; the run
/// prints the actual frame size).
const ORDER_BYTES: f64 = 390.0;

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn never_reading(url: &str, port: u16) -> Option<WebSocketStream<TcpStream>> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.set_recv_buffer_size(4096).ok()?;
    let stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .ok()?;
    tokio_tungstenite::client_async(url, stream)
        .await
        .ok()
        .map(|(ws, _)| ws)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // reqwest (the health check) needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let name = format!("og_snapbench_{}", Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&args.database_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    let (base, _) = args.database_url.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}");
    let result = run(&args, &url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    result
}

async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    let db = orders_gateway::db::Database::connect(url)?;
    db.migrate().await?;
    let r = Uuid::new_v4();
    let orders = (args.snapshot_mb * 1024.0 * 1024.0 / ORDER_BYTES) as i32;
    sqlx::query(
        "INSERT INTO orders (id, order_number, restaurant_id, table_number, customer_name, \
         customer_phone, order_status, payment_status, payment_method, total_price, estimated_time) \
         SELECT gen_random_uuid(), 'ORD-' || g, $1, 7, 'Guest number ' || g, '+100', 'pending', \
         'pending', 'cash', 25.50, 15 FROM generate_series(1, $2) g",
    )
    .bind(r)
    .bind(orders)
    .execute(db.pool())
    .await?;
    db.pool().close().await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe: PathBuf = match &args.gateway {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("orders-gateway"),
    };
    let gateway = Gateway(
        Command::new(&exe)
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", url)
            .env("JWT_SECRET", SECRET)
            .env(
                "MAX_CONNECTIONS_PER_RESTAURANT",
                (args.sockets + 10).to_string(),
            )
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = gateway.0.id();
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = encode(
        &Header::default(),
        &json!({"sub": Uuid::new_v4(), "restaurant_id": r,
                "exp": chrono::Utc::now().timestamp() + 3600}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let ws_url = format!("ws://127.0.0.1:{port}/api/ws/orders/live?token={token}");

    // One reading client: the snapshot's real size.
    let (mut reader, _) = tokio_tungstenite::connect_async(&ws_url).await?;
    let mut frame_bytes = 0;
    while let Some(Ok(m)) = reader.next().await {
        if let Message::Text(t) = m
            && t.as_str().starts_with(r#"{"type":"snapshot""#)
        {
            frame_bytes = t.len();
            break;
        }
    }
    drop(reader);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_mib(pid);
    println!(
        "snapshot: {orders} orders, {:.2} MiB frame; gateway RSS before sockets: {idle:.1} MiB",
        frame_bytes as f64 / 1048576.0
    );

    // Sampled every 250 ms in the background: the peak may come while
    // the sockets are still connecting.
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let kib = (rss_mib(pid) * 1024.0) as u64;
                peak.fetch_max(kib, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut summary = Vec::new();
    for round in 1..=args.rounds {
        peak.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let limit = Arc::new(Semaphore::new(args.concurrency));
        let mut connecting = Vec::with_capacity(args.sockets);
        for _ in 0..args.sockets {
            let permit = limit.clone().acquire_owned().await?;
            let url = ws_url.clone();
            connecting.push(tokio::spawn(async move {
                let ws = never_reading(&url, port).await;
                drop(permit);
                ws
            }));
        }
        let mut sockets = Vec::with_capacity(args.sockets);
        for c in connecting {
            if let Ok(Some(ws)) = c.await {
                sockets.push(ws);
            }
        }
        println!(
            "round {round}: {} sockets connected in {:.1} s (none reads); RSS {:.1} MiB",
            sockets.len(),
            started.elapsed().as_secs_f64(),
            rss_mib(pid)
        );
        for t in 1..=args.hold_secs {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if t % 5 == 0 {
                println!(
                    "round {round}: t={t:>3}s open   RSS {:>7.1} MiB",
                    rss_mib(pid)
                );
            }
        }
        drop(sockets);
        for t in 1..=args.after_secs {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if t % 5 == 0 || t == args.after_secs {
                println!(
                    "round {round}: t+{t:>2}s closed RSS {:>7.1} MiB",
                    rss_mib(pid)
                );
            }
        }
        let peak_mib = peak.load(Ordering::Relaxed) as f64 / 1024.0;
        summary.push(format!(
            "round {round}: peak {peak_mib:.1} MiB, after close {:.1} MiB",
            rss_mib(pid)
        ));
    }
    sampler.abort();
    println!(
        "summary: sockets={} snapshot_mib={:.2} rss_before={idle:.1} MiB; {}",
        args.sockets,
        frame_bytes as f64 / 1048576.0,
        summary.join("; ")
    );
    drop(gateway);
    Ok(())
}
