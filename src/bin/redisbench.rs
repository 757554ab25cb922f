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
//!
//! With `--failover`: the failover gap instead. One restaurant, a publish
//! every 10 ms; after a steady second the node that owns the restaurant
//! (the cluster primary of its slot, or the Sentinel master) is SIGKILLed.
//! Prints how long until an event published after the kill is delivered,
//! and how long publishes failed.
//!
//!   redisbench --mode cluster  --failover --urls <cluster seeds>
//!   redisbench --mode sentinel --failover --urls <sentinels> --sentinel-master mymaster

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use orders_gateway::broker::cluster::{ClusterBroker, key_slot};
use orders_gateway::broker::redis::RedisBroker;
use orders_gateway::broker::sentinel::Sentinels;
use orders_gateway::broker::{Backend, INBOUND_CAPACITY, Inbound, PublishRequest};
use orders_gateway::config::HistoryLimits;
use orders_gateway::domain::RestaurantId;
use orders_gateway::tasks::Supervisor;
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
    /// Measure the failover gap (see above) instead of throughput.
    #[arg(long)]
    failover: bool,
    /// With `--mode sentinel`: the master's name.
    #[arg(long, default_value = "mymaster")]
    sentinel_master: String,
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
            ClusterBroker::start(
                &urls,
                "redisbench",
                tx,
                limits,
                stop.clone(),
                &Supervisor::new(stop.clone()),
            )
            .await?,
        ),
        "sentinel" => std::sync::Arc::new(
            RedisBroker::start_sentinel(
                Sentinels {
                    urls: urls.clone(),
                    master: args.sentinel_master.clone(),
                },
                "redisbench",
                tx,
                limits,
                stop.clone(),
            )
            .await?,
        ),
        other => anyhow::bail!("--mode must be single, cluster or sentinel, not {other}"),
    };
    if args.failover {
        let gap = failover_gap(&args, &urls, broker, rx).await;
        stop.cancel();
        println!("{}", gap?);
        return Ok(());
    }
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

/// The port of the node that owns `r` now: the cluster primary of its
/// channel's slot, or the master Sentinel names.
async fn owner_port(args: &Args, urls: &[String], r: RestaurantId) -> anyhow::Result<u16> {
    let client = redis::Client::open(urls[0].as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    if args.mode == "sentinel" {
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&args.sentinel_master)
            .query_async(&mut conn)
            .await?;
        return Ok(port);
    }
    let slot = i64::from(key_slot(&r.channel()));
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await?;
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let (from, to): (i64, i64) = (
            redis::from_redis_value(parts[0].clone())?,
            redis::from_redis_value(parts[1].clone())?,
        );
        if from <= slot && slot <= to {
            // [ip, port, id, metadata]
            let redis::Value::Array(node) = &parts[2] else {
                anyhow::bail!("unexpected CLUSTER SLOTS entry")
            };
            return Ok(redis::from_redis_value(node[1].clone())?);
        }
    }
    anyhow::bail!("no node owns slot {slot}")
}

/// SIGKILL the redis-server on `port` (its pid from `INFO server`).
async fn kill_node(port: u16) -> anyhow::Result<()> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let pid = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("process_id:"))
        .ok_or_else(|| anyhow::anyhow!("no process_id in INFO"))?
        .to_string();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid} failed");
    Ok(())
}

/// See the module doc. Events carry their attempt number; the gap ends at
/// the first delivery of an attempt started after the kill.
async fn failover_gap(
    args: &Args,
    urls: &[String],
    broker: std::sync::Arc<dyn Backend>,
    mut rx: mpsc::Receiver<Inbound>,
) -> anyhow::Result<serde_json::Value> {
    const EVERY: Duration = Duration::from_millis(10);
    const LIMIT: Duration = Duration::from_secs(60);
    let r = RestaurantId(Uuid::new_v4());
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.subscribe(r).await?;
    let origin = Instant::now();
    let ms = move |t: Instant| t.duration_since(origin).as_secs_f64() * 1000.0;
    // Attempt n started at starts[n]; failed publishes are recorded with their end.
    let starts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let stop = CancellationToken::new();
    let publisher = {
        let (broker, starts, failures, stop) = (
            broker.clone(),
            starts.clone(),
            failures.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.is_cancelled() {
                tick.tick().await;
                let n = {
                    let mut s = starts.lock().unwrap();
                    s.push(Instant::now());
                    s.len() - 1
                };
                let req = PublishRequest {
                    restaurant: r,
                    version: None,
                    body: format!(r#"{{"type":"order_updated","attempt":{n}}}"#),
                    fence: None,
                };
                // Publishes overlap (a failing one can take seconds).
                let (broker, failures) = (broker.clone(), failures.clone());
                tokio::spawn(async move {
                    if broker.publish(req).await.is_err() {
                        failures.lock().unwrap().push(Instant::now());
                    }
                });
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let port = owner_port(args, urls, r).await?;
    let killed_at = Instant::now();
    kill_node(port).await?;
    let first_after = starts.lock().unwrap().len();
    let mut delivered_at = None;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while delivered_at.is_none() {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            break;
        };
        if let Inbound::Event { payload, .. } = msg {
            let v: serde_json::Value = serde_json::from_str(payload.as_str())?;
            if v["attempt"]
                .as_u64()
                .is_some_and(|a| a as usize >= first_after)
            {
                delivered_at = Some(Instant::now());
            }
        }
    }
    stop.cancel();
    let _ = publisher.await;
    let failures = failures.lock().unwrap().clone();
    let last_failure = failures.iter().filter(|t| **t >= killed_at).max().copied();
    Ok(serde_json::json!({
        "mode": args.mode,
        "killed_port": port,
        "gap_ms": delivered_at.map(|t| (ms(t) - ms(killed_at)).round()),
        "publishes_failed": failures.len(),
        "publish_outage_ms": last_failure.map(|t| (ms(t) - ms(killed_at)).round()),
    }))
}
