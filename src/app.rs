//! Wires everything together and owns the shutdown order: readiness off →
//! close sockets with 1001 (bounded concurrency, deadline) → release the
//! poller lock → leave the cluster view → stop the listener.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access::Access;
use crate::auth::{OriginPolicy, Verifier};
use crate::broker::cluster::ClusterBroker;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::sentinel::Sentinels;
use crate::broker::{Backend, INBOUND_CAPACITY};
use crate::config::{Config, RedisMode};
use crate::db::Database;
use crate::demo::Demo;
use crate::domain::SnapshotSource;
use crate::http::{AppState, router, server};
use crate::hub::Hub;
use crate::node::Node;
use crate::poller::Poller;
use crate::session::{MembershipWatch, SessionContext, watch_memberships};
use crate::snapshots::Snapshots;
use crate::tasks::Supervisor;

/// How many sockets send their close frame at once during shutdown.
const CLOSE_CONCURRENCY: usize = 512;
/// Snapshot reads running at once, across restaurants: half the database
/// pool (8, src/db.rs), so the poller and membership lookups always find a
/// connection however many restaurants resync at once.
const SNAPSHOT_READS: usize = 4;

/// The process-wide Prometheus recorder (a recorder can be installed once;
/// tests run several apps in one process and share it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ],
                )
                .expect("buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full("orders_gateway_delivery_latency_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .expect("buckets are valid")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

pub struct App {
    listener: TcpListener,
    state: AppState,
    config: Config,
    node: Node,
    inbound: mpsc::Receiver<crate::broker::Inbound>,
    poller: Option<Poller>,
    demo: Option<Demo>,
    /// Stops the background tasks (receiver, heartbeats, poller) last.
    background: CancellationToken,
}

impl App {
    /// Bind and assemble; nothing is served until [`App::run`].
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let listener = TcpListener::bind(config.bind_addr)
            .await
            .with_context(|| format!("BIND_ADDR: cannot listen on {}", config.bind_addr))?;
        let background = CancellationToken::new();
        let supervisor = Supervisor::new(background.clone());
        let (inbound_tx, inbound) = mpsc::channel(INBOUND_CAPACITY);
        let limits = config.history_limits();
        let instance_id = config.instance_id().to_string();
        let backend: Arc<dyn Backend> = match config.redis_mode() {
            Some(RedisMode::Single(url)) => Arc::new(
                RedisBroker::start_supervised(
                    &url,
                    &instance_id,
                    inbound_tx,
                    limits,
                    background.clone(),
                    &supervisor,
                )
                .await
                .context("REDIS_URL")?,
            ),
            Some(RedisMode::Sentinel { sentinels, master }) => Arc::new(
                RedisBroker::start_sentinel_supervised(
                    Sentinels {
                        urls: sentinels,
                        master,
                    },
                    &instance_id,
                    inbound_tx,
                    limits,
                    background.clone(),
                    &supervisor,
                )
                .await
                .context("REDIS_SENTINEL_URLS")?,
            ),
            Some(RedisMode::Cluster(seeds)) => Arc::new(
                ClusterBroker::start(
                    &seeds,
                    &instance_id,
                    inbound_tx,
                    limits,
                    background.clone(),
                    &supervisor,
                )
                .await
                .context("REDIS_CLUSTER_URLS")?,
            ),
            None => {
                tracing::warn!(
                    "REDIS_URL is unset: embedded in-memory broker. This replica cannot share \
                     events with others; run exactly one."
                );
                Arc::new(MemoryBroker::new(inbound_tx, config.history_limits()))
            }
        };
        let hub = Hub::new(
            config.max_connections,
            config.max_connections_per_restaurant,
        );
        let node = Node::new(
            hub,
            backend.clone(),
            instance_id.clone(),
            config.presence_ttl(),
        );
        let verifier = Verifier::new(&config);
        let db = match &config.database_url {
            Some(url) => Some(Database::connect(url).context("DATABASE_URL")?),
            None => None,
        };
        let demo = if config.demo {
            Some(Demo::new(node.clone(), &config)?)
        } else {
            None
        };
        let snapshots: Option<Arc<dyn SnapshotSource>> = match (&db, &demo) {
            (Some(db), _) => Some(Arc::new(db.clone())),
            (None, Some(demo)) => Some(Arc::new(demo.clone())),
            (None, None) => None,
        };
        let poller = db
            .as_ref()
            .map(|db| Poller::new(db.clone(), backend.clone(), &config, supervisor.clone()));
        let sessions = Arc::new(SessionContext {
            node: node.clone(),
            access: Access::new(verifier.clone(), db.clone()),
            members: MembershipWatch::default(),
            membership_recheck: Duration::from_millis(config.membership_recheck_ms),
            snapshots: snapshots.map(|s| Snapshots::new(s, node.clone(), SNAPSHOT_READS)),
            heartbeat_interval: config.heartbeat_interval(),
            send_queue_capacity: config.send_queue_capacity,
            min_send_rate: config.min_send_bytes_per_sec,
            client_message_rate: NonZeroU32::new(config.client_message_rate).expect("validated"),
            shutdown: CancellationToken::new(),
            closing: Semaphore::new(CLOSE_CONCURRENCY),
        });
        let state = AppState {
            sessions,
            verifier,
            db,
            origins: OriginPolicy::new(config.allowed_origins()),
            publish_api_key: config.publish_api_key.as_deref().map(Arc::from),
            poll_interval_ms: config.poll_interval_ms,
            redis_configured: config.redis_mode().is_some(),
            database_configured: config.database_url.is_some(),
            draining: Arc::new(AtomicBool::new(false)),
            prometheus: prometheus(),
            tasks: supervisor,
        };
        Ok(App {
            listener,
            state,
            config,
            node,
            inbound,
            poller,
            demo,
            background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serve until `shutdown` resolves, then drain and return.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let App {
            listener,
            state,
            config,
            node,
            inbound,
            poller,
            demo,
            background,
        } = self;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, instance_id = %node.instance_id(), "orders-gateway listening");
        // Background tasks log with this replica's id (sockets add theirs).
        let span = tracing::info_span!("gateway", instance_id = %node.instance_id());
        // Supervised: a panic in any of them is logged, counted and makes
        // /readyz fail, instead of silently leaving a half-working replica.
        let sup = state.tasks.clone();
        let tasks = TaskTracker::new();
        {
            let node = node.clone();
            let task = sup.spawn(
                "dispatcher",
                async move { node.dispatch(inbound).await }.instrument(span.clone()),
            );
            tasks.spawn(task);
        }
        {
            let node = node.clone();
            let stop = background.clone();
            let task = sup.spawn(
                "maintain",
                async move { node.maintain(stop).await }.instrument(span.clone()),
            );
            tasks.spawn(task);
        }
        if config.redis_mode().is_some() {
            let node = node.clone();
            let stop = background.clone();
            let limit = Duration::from_millis(config.redis_lost_close_ms);
            let task = sup.spawn(
                "broker_watch",
                async move { node.watch_broker(limit, stop).await }.instrument(span.clone()),
            );
            tasks.spawn(task);
        }
        let poller_task = poller.map(|p| {
            let stop = background.clone();
            sup.spawn(
                "poller",
                async move { p.run(stop).await }.instrument(span.clone()),
            )
        });
        if state.db.is_some() {
            let ctx = state.sessions.clone();
            let stop = background.clone();
            let task = sup.spawn(
                "membership_recheck",
                async move { watch_memberships(ctx, stop).await }.instrument(span.clone()),
            );
            tasks.spawn(task);
        }
        if let Some(demo) = demo {
            let stop = background.clone();
            let base = format!("http://{}", display_addr(addr));
            let task = sup.spawn(
                "demo",
                async move { demo.run(base, stop).await }.instrument(span.clone()),
            );
            tasks.spawn(task);
        }
        state.verifier.warm_up().await;
        node.heartbeat().await;

        let listener_stop = CancellationToken::new();
        let server = {
            let stop = listener_stop.clone();
            let app = router(state.clone());
            let limits = server::Limits {
                header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
                handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
                max_handshakes: config.max_handshakes,
            };
            tokio::spawn(server::serve(listener, app, limits, stop))
        };

        shutdown.await;
        tracing::info!("shutdown: draining");
        state.draining.store(true, Ordering::Release);
        metrics::gauge!("orders_gateway_draining").set(1.0);
        state.sessions.shutdown.cancel();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(config.shutdown_drain_ms);
        while node.hub().connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = node.hub().connections();
        if left > 0 {
            tracing::warn!(left, "drain deadline reached with sockets still open");
        }
        background.cancel();
        if let Some(task) = poller_task {
            // The poller releases its lock on the way out.
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        node.deregister().await;
        listener_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

fn display_addr(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Logging: text or JSON; never the query string (tokens live there).
pub fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,orders_gateway=info,tower_http=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.init();
    }
}
