//! Redis broker benchmark (docs/BENCHMARKS.md, "Redis: one node vs a
//! cluster"): publishes events through the real broker (`og_publish`, the
//! same function the gateway uses) over many restaurants with a fixed
//! concurrency, receives them on the same broker's subscriptions, and reads
//! the Redis servers' CPU time before and after.
//!
//!   redisbench --mode single  --urls redis://127.0.0.1:6379
//!   redisbench --mode cluster --urls redis://127.0.0.1:7000,redis://127.0.0.1:7001,...
//!
//! `--urls` must list every data node whose CPU should be counted (for a
//! cluster: all primaries and replicas). Prints one JSON line.

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use orders_gateway::broker::cluster::ClusterBroker;
use orders_gateway::broker::redis::RedisBroker;
use orders_gateway::broker::{Backend, INBOUND_CAPACITY, Inbound, PublishRequest};
use orders_gateway::config::HistoryLimits;
use orders_gateway::domain::RestaurantId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// `single` (RedisBroker on the first URL) or `cluster` (ClusterBroker).
    #[arg(long)]
    mode: String,
    /// Comma list of data nodes (all are read for CPU time).
    #[arg(long)]
    urls: String,
    #[arg(long, default_value_t = 200)]
    restaurants: usize,
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

async fn cpu_seconds(urls: &[String]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for url in urls {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
        for line in info.lines() {
            if let Some((k, v)) = line.trim().split_once(':')
                && (k == "used_cpu_sys" || k == "used_cpu_user")
            {
                total += v.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let urls: Vec<String> = args.urls.split(',').map(|s| s.trim().to_string()).collect();
    let limits = HistoryLimits {
        max_events: 1000,
        max_age: Duration::from_secs(3600),
    };
    let stop = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(INBOUND_CAPACITY);
    let broker: std::sync::Arc<dyn Backend> = match args.mode.as_str() {
        "single" => std::sync::Arc::new(
            RedisBroker::start(&urls[0], "redisbench", tx, limits, stop.clone()).await?,
        ),
        "cluster" => std::sync::Arc::new(
            ClusterBroker::start(&urls, "redisbench", tx, limits, stop.clone()).await?,
        ),
        other => anyhow::bail!("--mode must be single or cluster, not {other}"),
    };
    let restaurants: Vec<RestaurantId> = (0..args.restaurants)
        .map(|_| RestaurantId(Uuid::new_v4()))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in &restaurants {
        let mut tries = 0;
        while let Err(e) = broker.subscribe(*r).await {
            tries += 1;
            anyhow::ensure!(tries < 50, "subscribe failed: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let n = args.events;
    let receiver = tokio::spawn(async move {
        let mut got = 0usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while got < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Inbound::Event { .. })) => got += 1,
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        (got, Instant::now())
    });
    let cpu_before = cpu_seconds(&urls).await?;
    let started = Instant::now();
    let body = r#"{"type":"order_updated","order":{"id":"x"}}"#;
    let results: Vec<bool> = futures_util::stream::iter(0..n)
        .map(|i| {
            let broker = broker.clone();
            let r = restaurants[i % restaurants.len()];
            async move {
                broker
                    .publish(PublishRequest {
                        restaurant: r,
                        version: None,
                        body: body.to_string(),
                        fence: None,
                    })
                    .await
                    .is_ok()
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let published_in = started.elapsed();
    let (received, done_at) = receiver.await?;
    let received_in = done_at.duration_since(started);
    let cpu_after = cpu_seconds(&urls).await?;
    let ok = results.iter().filter(|b| **b).count();
    let cpu = cpu_after - cpu_before;
    println!(
        "{}",
        serde_json::json!({
            "mode": args.mode,
            "nodes": urls.len(),
            "restaurants": args.restaurants,
            "concurrency": args.concurrency,
            "published": ok,
            "failed": n - ok,
            "received": received,
            "publish_events_per_s": (ok as f64 / published_in.as_secs_f64()).round(),
            "delivered_events_per_s": (received as f64 / received_in.as_secs_f64()).round(),
            "redis_cpu_s": (cpu * 1000.0).round() / 1000.0,
            "redis_cpu_us_per_event": ((cpu * 1e6 / ok.max(1) as f64) * 10.0).round() / 10.0,
        })
    );
    stop.cancel();
    Ok(())
}
