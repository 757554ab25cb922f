//! The Redis broker: one dedicated pub/sub connection per replica for
//! receiving, a deadpool of multiplexed connections for everything else,
//! and the server-side functions of `orders_gateway.lua` for every step
//! that must be atomic (publish, history, leader lock, poller progress).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use deadpool_redis::redis::{self, FromRedisValue, aio::PubSubSink};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::commands::{self, Batch, Commands};
use super::functions::{self, Call, Failure, Functions, classify, library};
use super::sentinel::{Master, Sentinels};
use super::{
    Broker, BrokerError, Cluster, ConnectionRecord, Cursor, History, Inbound, Lease, PollerState,
    PollerStateDelta, PublishRequest, Published, backoff,
};
use crate::config::HistoryLimits;
use crate::domain::RestaurantId;
use crate::tasks::Supervisor;

/// The liveness probe: every replica publishes on its own probe channel
/// through the command pool and must hear it back on its pub/sub link.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe not heard back within this time means the link is deaf.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Any single Redis round trip taking longer than this counts as Redis
/// being unavailable: callers (sockets, HTTP requests) must not hang on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
const SUBSCRIBE_CHUNK: usize = 512;
/// How long a subscribe waits for the pub/sub connection to come (back).
const SINK_WAIT: Duration = Duration::from_secs(2);

pub struct RedisBroker {
    /// The master's connection pool; with Sentinel it follows failovers.
    master: Arc<Master>,
    subscriptions: Arc<Subscriptions>,
    limits: HistoryLimits,
    /// Redis time minus local time, in ms, refreshed by every heartbeat:
    /// presence scores use Redis' clock, so replicas with skewed clocks
    /// agree on what has expired.
    clock_offset_ms: Arc<AtomicI64>,
}

/// What the receiver must be subscribed to, and the live sink to do it
/// with. Std mutexes: each is held for an insert or a clone, never across
/// an await.
struct Subscriptions {
    /// Restaurants the node wants; restored after every reconnect.
    wanted: Mutex<HashSet<RestaurantId>>,
    /// Sink of the current pub/sub connection; `None` while disconnected.
    sink: Mutex<Option<PubSubSink>>,
    /// The link delivered its last liveness probe in time (read by /readyz).
    link_up: AtomicBool,
}

impl Subscriptions {
    fn sink(&self) -> Option<PubSubSink> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set_sink(&self, sink: Option<PubSubSink>) {
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = sink;
    }
    fn wanted(&self) -> std::sync::MutexGuard<'_, HashSet<RestaurantId>> {
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set_link_up(&self, up: bool) {
        if self.link_up.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!("orders_gateway_redis_link_up").set(if up { 1.0 } else { 0.0 });
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl RedisBroker {
    /// Create the broker and start its receiver. Redis need not be up yet:
    /// the receiver keeps retrying, and readiness reports the outage.
    pub async fn start(
        url: &str,
        instance_id: &str,
        inbound: mpsc::Sender<Inbound>,
        limits: HistoryLimits,
        shutdown: CancellationToken,
    ) -> Result<RedisBroker, BrokerError> {
        let tasks = Supervisor::new(shutdown.clone());
        Self::start_supervised(url, instance_id, inbound, limits, shutdown, &tasks).await
    }

    /// [`RedisBroker::start`], with the receiver task watched by `tasks`
    /// (a panic there makes the replica unready).
    pub async fn start_supervised(
        url: &str,
        instance_id: &str,
        inbound: mpsc::Sender<Inbound>,
        limits: HistoryLimits,
        shutdown: CancellationToken,
        tasks: &Supervisor,
    ) -> Result<RedisBroker, BrokerError> {
        redis::Client::open(url).map_err(unavailable)?;
        let master = Arc::new(Master::fixed(url, COMMAND_TIMEOUT)?);
        RedisBroker::start_with(master, instance_id, inbound, limits, shutdown, tasks).await
    }

    /// Find the master through Sentinel and follow its failovers.
    pub async fn start_sentinel(
        sentinels: Sentinels,
        instance_id: &str,
        inbound: mpsc::Sender<Inbound>,
        limits: HistoryLimits,
        shutdown: CancellationToken,
    ) -> Result<RedisBroker, BrokerError> {
        let tasks = Supervisor::new(shutdown.clone());
        Self::start_sentinel_supervised(sentinels, instance_id, inbound, limits, shutdown, &tasks)
            .await
    }

    /// [`RedisBroker::start_sentinel`], with the receiver task watched by `tasks`.
    pub async fn start_sentinel_supervised(
        sentinels: Sentinels,
        instance_id: &str,
        inbound: mpsc::Sender<Inbound>,
        limits: HistoryLimits,
        shutdown: CancellationToken,
        tasks: &Supervisor,
    ) -> Result<RedisBroker, BrokerError> {
        let master = Master::sentinel(sentinels, COMMAND_TIMEOUT, shutdown.clone(), tasks).await?;
        RedisBroker::start_with(master, instance_id, inbound, limits, shutdown, tasks).await
    }

    async fn start_with(
        master: Arc<Master>,
        instance_id: &str,
        inbound: mpsc::Sender<Inbound>,
        limits: HistoryLimits,
        shutdown: CancellationToken,
        tasks: &Supervisor,
    ) -> Result<RedisBroker, BrokerError> {
        let subscriptions = Arc::new(Subscriptions {
            wanted: Mutex::new(HashSet::new()),
            sink: Mutex::new(None),
            link_up: AtomicBool::new(false),
        });
        let broker = RedisBroker {
            master: master.clone(),
            subscriptions: subscriptions.clone(),
            limits,
            clock_offset_ms: Arc::new(AtomicI64::new(0)),
        };
        if let Err(e) = broker.install().await {
            tracing::warn!(error = %e, "could not install Redis functions yet; will retry on first use");
        }
        let _ = commands::sync_clock(&broker).await;
        let probe = Probe {
            master: master.clone(),
            channel: format!("og:probe:{instance_id}"),
        };
        tasks.spawn(
            "redis_receiver",
            receive(master, subscriptions, inbound, probe, shutdown),
        );
        Ok(broker)
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, BrokerError> {
        let endpoint = self.master.endpoint().await?;
        match endpoint.pool.get().await {
            Ok(c) => Ok(c),
            Err(e) => {
                // Refused or timed out: perhaps the master moved.
                self.master.suspect().await;
                Err(unavailable(e))
            }
        }
    }

    /// After a failed command: with Sentinel, an I/O error, a timeout or
    /// `READONLY` (a demoted master) means "look for the master again".
    async fn after_error(&self, e: &redis::RedisError) {
        if e.is_io_error() || e.is_timeout() || is_readonly(e) {
            self.master.suspect().await;
        }
    }

    /// Load the function library and the limits it reads.
    pub async fn install(&self) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(library(self.limits, "PUBLISH"))
            .ignore();
        self.query::<()>(pipe).await
    }

    async fn query<T: FromRedisValue>(&self, pipe: redis::Pipeline) -> Result<T, BrokerError> {
        let answer = query_on(self.conn().await?, pipe).await;
        if answer.is_err() {
            // With Sentinel: a failed command may mean the master moved or
            // was demoted (READONLY). Rate-limited; a no-op without Sentinel.
            self.master.suspect().await;
        }
        answer
    }
}

fn is_readonly(e: &redis::RedisError) -> bool {
    e.code() == Some("READONLY")
}

#[async_trait]
impl Commands for RedisBroker {
    /// One pipeline on the master (with Sentinel, a failure makes it look
    /// for the master again).
    async fn run(&self, batch: Batch) -> Result<Vec<redis::Value>, BrokerError> {
        let mut pipe = redis::pipe();
        for (_, cmd) in batch {
            pipe.add_command(cmd);
        }
        self.query(pipe).await
    }

    fn clock_offset(&self) -> &AtomicI64 {
        &self.clock_offset_ms
    }
}

#[async_trait]
impl Functions for RedisBroker {
    /// On the master's pool. A demoted master (Sentinel) or a Redis that
    /// lost the library refused before doing anything: look again / load
    /// it, and retry once.
    async fn fcall(&self, call: &Call) -> Result<redis::Value, BrokerError> {
        let cmd = call.cmd();
        for attempt in 0..2 {
            let mut conn = self.conn().await?;
            let answer = tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async(&mut conn)).await;
            let e = match answer {
                Ok(Ok(v)) => return Ok(v),
                Err(_) => {
                    discard(conn);
                    self.master.suspect().await;
                    return Err(unavailable("Redis command timed out"));
                }
                Ok(Err(e)) => e,
            };
            if e.is_io_error() {
                discard(conn);
            }
            match classify(&e) {
                Failure::Fenced => return Err(BrokerError::Fenced),
                Failure::NoLibrary if attempt == 0 => self.install().await?,
                Failure::Elsewhere if attempt == 0 && is_readonly(&e) => self.after_error(&e).await,
                Failure::Rejected => return Err(BrokerError::Rejected(e.to_string())),
                _ => {
                    self.after_error(&e).await;
                    return Err(unavailable(e));
                }
            }
        }
        Err(unavailable("Redis functions could not be installed"))
    }
}

/// Run `pipe` on a pooled connection with the command timeout. A connection
/// that timed out or failed is not returned to the pool: a TCP connection
/// that silently stopped would otherwise fail every later command on it.
async fn query_on<T: FromRedisValue>(
    mut conn: deadpool_redis::Connection,
    pipe: redis::Pipeline,
) -> Result<T, BrokerError> {
    let answer = tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<T>(&mut conn)).await;
    match answer {
        Err(_) => {
            discard(conn);
            Err(unavailable("Redis command timed out"))
        }
        Ok(Err(e)) => {
            if e.is_io_error() {
                discard(conn);
            }
            Err(unavailable(e))
        }
        Ok(Ok(v)) => Ok(v),
    }
}

fn discard(conn: deadpool_redis::Connection) {
    drop(deadpool_redis::Connection::take(conn));
}

async fn timed<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Err(_) => Err(unavailable("Redis command timed out")),
        Ok(r) => r.map_err(unavailable),
    }
}

/// How the receiver checks its own link: a publish through the command pool
/// on a channel only this replica subscribes to.
struct Probe {
    master: Arc<Master>,
    channel: String,
}

impl Probe {
    async fn send(&self, n: u64) -> Result<(), BrokerError> {
        let endpoint = self.master.endpoint().await?;
        let conn = endpoint.pool.get().await.map_err(unavailable)?;
        let mut pipe = redis::pipe();
        pipe.publish(&self.channel, n).ignore();
        query_on(conn, pipe).await
    }
}

/// The receiver: keeps one pub/sub connection alive, restores every wanted
/// subscription after a reconnect, and forwards messages to the node. A
/// link that stops delivering its own probes is dropped and reconnected:
/// a TCP connection can stay open while nothing arrives on it (a lost
/// Redis host, a failover to a new address, a middlebox dropping state).
async fn receive(
    master: Arc<Master>,
    subs: Arc<Subscriptions>,
    inbound: mpsc::Sender<Inbound>,
    probe: Probe,
    shutdown: CancellationToken,
) {
    let mut attempt: u32 = 0;
    let mut was_connected = false;
    let mut master_changed = master.watch();
    loop {
        master_changed.borrow_and_update();
        let (mut stream, channels) = match connect_link(&master, &subs, &probe, &shutdown).await {
            Ok(link) => link,
            Err(None) => return,
            Err(Some(why)) => {
                retry_later(&subs, &mut master_changed, &mut attempt, &why, &shutdown).await;
                continue;
            }
        };
        attempt = 0;
        metrics::gauge!("orders_gateway_redis_up").set(1.0);
        subs.set_link_up(true);
        if was_connected {
            metrics::counter!("orders_gateway_redis_reconnects_total").increment(1);
            tracing::info!(
                channels,
                "Redis pub/sub reconnected, subscriptions restored"
            );
            let _ = inbound.send(Inbound::Resubscribed).await;
        }
        was_connected = true;
        let why = relay(
            &mut stream,
            &subs,
            &inbound,
            &probe,
            &mut master_changed,
            &shutdown,
        )
        .await;
        subs.set_sink(None);
        subs.set_link_up(false);
        metrics::gauge!("orders_gateway_redis_up").set(0.0);
        match why {
            LinkEnd::Shutdown => return,
            LinkEnd::MasterChanged => {
                tracing::warn!("Redis master changed (Sentinel); resubscribing on the new one")
            }
            LinkEnd::Closed => tracing::warn!("Redis pub/sub connection lost; reconnecting"),
            LinkEnd::Deaf => {
                metrics::counter!("orders_gateway_redis_link_stalls_total").increment(1);
                tracing::error!(
                    timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                    "Redis pub/sub link stopped delivering (liveness probe not received); reconnecting"
                );
            }
        }
    }
}

/// One pub/sub connection to the master with the probe channel and every
/// wanted restaurant subscribed: its message stream and how many channels
/// were restored. `Err(None)` on shutdown, `Err(Some(why))` to retry.
async fn connect_link(
    master: &Master,
    subs: &Subscriptions,
    probe: &Probe,
    shutdown: &CancellationToken,
) -> Result<(redis::aio::PubSubStream, usize), Option<String>> {
    // With Sentinel: only a server that answers ROLE as master.
    let endpoint = master.verify().await.map_err(|e| Some(e.to_string()))?;
    let client = redis::Client::open(endpoint.url.as_str()).map_err(|e| Some(e.to_string()))?;
    let pubsub = tokio::select! {
        _ = shutdown.cancelled() => return Err(None),
        r = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()) => match r {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(Some(e.to_string())),
            Err(_) => return Err(Some("connect timed out".into())),
        },
    };
    let (mut sink, stream) = pubsub.split();
    timed(sink.subscribe(&probe.channel))
        .await
        .map_err(|e| Some(e.to_string()))?;
    // Publish the sink before reading `wanted`: a concurrent subscribe
    // either lands in the snapshot below or finds this sink.
    subs.set_sink(Some(sink.clone()));
    let channels: Vec<String> = subs.wanted().iter().map(|r| r.channel()).collect();
    for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
        if let Err(e) = timed(sink.subscribe(chunk)).await {
            tracing::warn!(error = %e, "resubscribe failed");
            subs.set_sink(None);
            return Err(Some("resubscribe failed".into()));
        }
    }
    Ok((stream, channels.len()))
}

type ProbeSend<'a> = Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + 'a>>;

enum LinkEnd {
    Shutdown,
    /// Sentinel named another master: leave the old one.
    MasterChanged,
    Closed,
    /// Probes were published but did not come back in time.
    Deaf,
}

/// Forward messages until the link closes, goes deaf or shutdown.
async fn relay(
    stream: &mut redis::aio::PubSubStream,
    subs: &Subscriptions,
    inbound: &mpsc::Sender<Inbound>,
    probe: &Probe,
    master_changed: &mut tokio::sync::watch::Receiver<u64>,
    shutdown: &CancellationToken,
) -> LinkEnd {
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent: u64 = 0;
    // Newest probe heard back, and when the oldest unanswered one was sent.
    let mut heard: u64 = 0;
    let mut waiting_since: Option<tokio::time::Instant> = None;
    // The probe publish runs beside the stream, never blocking delivery.
    let mut in_flight: Option<ProbeSend<'_>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return LinkEnd::Shutdown,
            _ = ticker.tick() => {
                if waiting_since.is_some_and(|t| t.elapsed() >= PROBE_TIMEOUT) {
                    subs.set_link_up(false);
                    return LinkEnd::Deaf;
                }
                if in_flight.is_none() {
                    sent += 1;
                    waiting_since.get_or_insert_with(tokio::time::Instant::now);
                    in_flight = Some(Box::pin(probe.send(sent)));
                }
            }
            r = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                in_flight = None;
                if let Err(e) = r {
                    // Commands fail too: Redis itself is unreachable. The
                    // probe's timeout still decides about the link.
                    tracing::debug!(error = %e, "liveness probe publish failed");
                }
            }
            _ = master_changed.changed() => return LinkEnd::MasterChanged,
            m = stream.next() => {
                let Some(msg) = m else { return LinkEnd::Closed };
                let channel = msg.get_channel_name();
                if channel == probe.channel {
                    if let Ok(n) = msg.get_payload::<u64>() {
                        heard = heard.max(n);
                    }
                    if heard >= sent {
                        waiting_since = None;
                        subs.set_link_up(true);
                    } else {
                        // An older probe: the newest is still due.
                        waiting_since = Some(tokio::time::Instant::now());
                    }
                    continue;
                }
                let Some(restaurant) = RestaurantId::from_channel(channel) else {
                    continue;
                };
                let Ok(text) = String::from_utf8(msg.get_payload_bytes().to_vec()) else {
                    tracing::warn!(%restaurant, "dropped a non-UTF-8 payload");
                    continue;
                };
                let event = Inbound::Event {
                    restaurant,
                    payload: Utf8Bytes::from(text),
                };
                if inbound.send(event).await.is_err() {
                    return LinkEnd::Shutdown;
                }
            }
        }
    }
}

/// Back off before the next connect; a new master named by Sentinel ends
/// the wait at once (after a failover the old address only refuses, and
/// the backoff grown meanwhile would delay delivery by up to its cap).
async fn retry_later(
    subs: &Subscriptions,
    master_changed: &mut watch::Receiver<u64>,
    attempt: &mut u32,
    why: &str,
    shutdown: &CancellationToken,
) {
    metrics::gauge!("orders_gateway_redis_up").set(0.0);
    subs.set_link_up(false);
    let delay = backoff(*attempt);
    if (*attempt).is_multiple_of(10) {
        tracing::warn!(
            error = why,
            retry_in_ms = delay.as_millis() as u64,
            "Redis pub/sub unavailable"
        );
    }
    *attempt = attempt.saturating_add(1);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
        Ok(()) = master_changed.changed() => *attempt = 0,
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn subscribe(&self, r: RestaurantId) -> Result<(), BrokerError> {
        self.subscriptions.wanted().insert(r);
        // Right after start or a reconnect the receiver may be a moment away
        // from having a connection: wait for it a little, not forever.
        let deadline = tokio::time::Instant::now() + SINK_WAIT;
        let mut sink = loop {
            if let Some(sink) = self.subscriptions.sink() {
                break sink;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable("Redis pub/sub connection is down"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        timed(sink.subscribe(r.channel())).await
    }

    async fn unsubscribe(&self, r: RestaurantId) -> Result<(), BrokerError> {
        self.subscriptions.wanted().remove(&r);
        match self.subscriptions.sink() {
            Some(mut sink) => timed(sink.unsubscribe(r.channel())).await,
            None => Ok(()),
        }
    }

    async fn publish(&self, req: PublishRequest) -> Result<Published, BrokerError> {
        functions::publish(self, &req).await
    }

    async fn history_after(&self, r: RestaurantId, after: Cursor) -> Result<History, BrokerError> {
        functions::history_after(self, r, after).await
    }

    async fn position(&self, r: RestaurantId) -> Result<Cursor, BrokerError> {
        functions::position(self, r).await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        self.query::<(String,)>(pipe).await?;
        if !self.subscriptions.link_up.load(Ordering::Relaxed) {
            return Err(unavailable(
                "the pub/sub link is not delivering (liveness probe)",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Cluster for RedisBroker {
    async fn add_connection(&self, c: &ConnectionRecord, ttl: Duration) -> Result<(), BrokerError> {
        commands::add_connection(self, c, ttl).await
    }

    async fn remove_connection(&self, c: &ConnectionRecord) -> Result<(), BrokerError> {
        commands::remove_connection(self, c).await
    }

    async fn heartbeat(
        &self,
        instance_id: &str,
        connections: &[ConnectionRecord],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        commands::heartbeat(self, instance_id, connections, ttl).await
    }

    async fn remove_instance(
        &self,
        instance_id: &str,
        connections: &[ConnectionRecord],
    ) -> Result<(), BrokerError> {
        commands::remove_instance(self, instance_id, connections).await
    }

    async fn connections(&self, r: RestaurantId) -> Result<Vec<ConnectionRecord>, BrokerError> {
        commands::connections(self, r).await
    }

    async fn live_instances(&self) -> Result<usize, BrokerError> {
        commands::live_instances(self).await
    }

    async fn active_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError> {
        commands::active_restaurants(self).await
    }

    async fn try_acquire_leader(
        &self,
        instance_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, BrokerError> {
        functions::acquire_leader(self, instance_id, ttl).await
    }

    async fn renew_leader(&self, lease: &Lease, ttl: Duration) -> Result<bool, BrokerError> {
        functions::renew_leader(self, lease, ttl).await
    }

    async fn release_leader(&self, lease: &Lease) -> Result<(), BrokerError> {
        functions::release_leader(self, lease).await
    }

    async fn leader(&self) -> Result<Option<String>, BrokerError> {
        commands::leader(self).await
    }

    async fn poller_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError> {
        commands::poller_restaurants(self).await
    }

    async fn load_poller_state(
        &self,
        restaurants: &[RestaurantId],
    ) -> Result<PollerState, BrokerError> {
        commands::load_poller_state(self, restaurants).await
    }

    async fn save_poller_state(
        &self,
        lease: &Lease,
        delta: &PollerStateDelta,
    ) -> Result<(), BrokerError> {
        functions::save_poller_state(self, lease, delta).await
    }
}
