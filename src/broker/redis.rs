//! The Redis broker: one dedicated pub/sub connection per replica for
//! receiving, a deadpool of multiplexed connections for everything else,
//! and the server-side functions of `orders_gateway.lua` for every step
//! that must be atomic (publish, history, leader lock, poller progress).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use deadpool_redis::redis::{self, FromRedisValue, aio::PubSubSink};
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    Broker, BrokerError, Cluster, ConnectionRecord, Cursor, History, Inbound, Lease, PollerState,
    PollerStateDelta, PublishRequest, Published, backoff,
};
use crate::config::HistoryLimits;
use crate::domain::{EventId, RestaurantId};

/// The function library as shipped; see the file for the key layout.
/// [`library`] fills in the limits before it is loaded.
pub const FUNCTIONS: &str = include_str!("orders_gateway.lua");

/// The library with this deployment's limits and publish command baked in:
/// functions then read no global config key, so each touches only the keys
/// it declares (a requirement of Redis Cluster).
pub fn library(limits: HistoryLimits, publish_command: &str) -> String {
    let limits_line = format!(
        "local MAX_EVENTS, MAX_AGE_MS, DEDUP_TTL_MS, PUBLISH = {}, {}, {}, '{}'",
        limits.max_events,
        limits.max_age.as_millis(),
        DEDUP_TTL_MS,
        publish_command
    );
    let mut out = String::with_capacity(FUNCTIONS.len() + 64);
    let mut replace_next = false;
    for line in FUNCTIONS.lines() {
        if replace_next {
            out.push_str(&limits_line);
            replace_next = false;
        } else {
            replace_next = line.trim() == "-- @LIMITS@";
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Keys of a restaurant, hash-tagged with its channel name: all in the
/// channel's slot.
pub fn restaurant_key(r: RestaurantId, suffix: &str) -> String {
    format!("og:{{orders:{r}}}:{suffix}")
}
/// The poller lock and everything fenced by it share the `{og}` slot.
pub const LEADER_KEY: &str = "og:{og}:leader";
pub const LEADER_EPOCH_KEY: &str = "og:{og}:leader:epoch";
pub const POLL_CURSOR_KEY: &str = "og:{og}:poll:cursor";
pub const POLL_LAST_KEY: &str = "og:{og}:poll:last";
/// Restaurants that have a `known` hash (what a new leader loads).
pub const POLL_RESTAURANTS_KEY: &str = "og:{og}:poll:restaurants";
pub fn poll_known_key(r: RestaurantId) -> String {
    format!("og:{{og}}:poll:known:{r}")
}

/// The liveness probe: every replica publishes on its own probe channel
/// through the command pool and must hear it back on its pub/sub link.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe not heard back within this time means the link is deaf.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Any single Redis round trip taking longer than this counts as Redis
/// being unavailable: callers (sockets, HTTP requests) must not hang on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Order versions are remembered this long for deduplication.
const DEDUP_TTL_MS: u64 = 24 * 3600 * 1000;
const SUBSCRIBE_CHUNK: usize = 512;
/// How long a subscribe waits for the pub/sub connection to come (back).
const SINK_WAIT: Duration = Duration::from_secs(2);

const INSTANCES: &str = "og:instances";
const ACTIVE: &str = "og:active";

fn conns_key(r: RestaurantId) -> String {
    format!("og:conns:{r}")
}

pub struct RedisBroker {
    pool: Pool,
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

fn local_now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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
        let client = redis::Client::open(url).map_err(unavailable)?;
        let mut cfg = deadpool_redis::Config::from_url(url);
        cfg.pool = Some(PoolConfig {
            max_size: 32,
            timeouts: Timeouts {
                wait: Some(COMMAND_TIMEOUT),
                create: Some(COMMAND_TIMEOUT),
                recycle: Some(COMMAND_TIMEOUT),
            },
            ..PoolConfig::default()
        });
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(unavailable)?;
        let subscriptions = Arc::new(Subscriptions {
            wanted: Mutex::new(HashSet::new()),
            sink: Mutex::new(None),
            link_up: AtomicBool::new(false),
        });
        let broker = RedisBroker {
            pool: pool.clone(),
            subscriptions: subscriptions.clone(),
            limits,
            clock_offset_ms: Arc::new(AtomicI64::new(0)),
        };
        if let Err(e) = broker.install().await {
            tracing::warn!(error = %e, "could not install Redis functions yet; will retry on first use");
        }
        let _ = broker.sync_clock().await;
        let probe = Probe {
            pool,
            channel: format!("og:probe:{instance_id}"),
        };
        tokio::spawn(receive(client, subscriptions, inbound, probe, shutdown));
        Ok(broker)
    }

    /// Now, by Redis' clock (as last measured).
    fn now_ms(&self) -> i64 {
        local_now_ms() + self.clock_offset_ms.load(Ordering::Relaxed)
    }

    /// Measure the offset between Redis' clock and ours.
    async fn sync_clock(&self) -> Result<(), BrokerError> {
        let before = local_now_ms();
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        let ((secs, micros),): ((i64, i64),) = self.query(pipe).await?;
        let after = local_now_ms();
        let redis_ms = secs * 1000 + micros / 1000;
        self.clock_offset_ms
            .store(redis_ms - (before + after) / 2, Ordering::Relaxed);
        Ok(())
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, BrokerError> {
        self.pool.get().await.map_err(unavailable)
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

    async fn fcall<T: FromRedisValue>(
        &self,
        name: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, BrokerError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(name).arg(keys.len());
        for k in keys {
            cmd.arg(*k);
        }
        for a in args {
            cmd.arg(*a);
        }
        for attempt in 0..2 {
            let mut conn = self.conn().await?;
            let answer =
                tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut conn)).await;
            if answer
                .as_ref()
                .map_or(true, |r| r.as_ref().is_err_and(|e| e.is_io_error()))
            {
                discard(conn);
            }
            match answer {
                Err(_) => return Err(unavailable("Redis command timed out")),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if e.code() == Some("FENCED") => return Err(BrokerError::Fenced),
                Ok(Err(e)) if attempt == 0 && e.to_string().contains("Function not found") => {
                    // Redis restarted without persistence: reinstall and retry.
                    self.install().await?;
                }
                Ok(Err(e)) if e.code().is_some() && !e.is_io_error() => {
                    return Err(BrokerError::Rejected(e.to_string()));
                }
                Ok(Err(e)) => return Err(unavailable(e)),
            }
        }
        Err(unavailable("Redis functions could not be installed"))
    }

    async fn query<T: FromRedisValue>(&self, pipe: redis::Pipeline) -> Result<T, BrokerError> {
        query_on(self.conn().await?, pipe).await
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
    pool: Pool,
    channel: String,
}

impl Probe {
    async fn send(&self, n: u64) -> Result<(), BrokerError> {
        let conn = self.pool.get().await.map_err(unavailable)?;
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
    client: redis::Client,
    subs: Arc<Subscriptions>,
    inbound: mpsc::Sender<Inbound>,
    probe: Probe,
    shutdown: CancellationToken,
) {
    let mut attempt: u32 = 0;
    let mut was_connected = false;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()) => r,
        };
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                retry_later(&subs, &mut attempt, &e.to_string(), &shutdown).await;
                continue;
            }
            Err(_) => {
                retry_later(&subs, &mut attempt, "connect timed out", &shutdown).await;
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        if let Err(e) = timed(sink.subscribe(&probe.channel)).await {
            retry_later(&subs, &mut attempt, &e.to_string(), &shutdown).await;
            continue;
        }
        // Publish the sink before reading `wanted`: a concurrent subscribe
        // either lands in the snapshot below or finds this sink.
        subs.set_sink(Some(sink.clone()));
        let channels: Vec<String> = subs.wanted().iter().map(|r| r.channel()).collect();
        let mut restored = true;
        for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
            if let Err(e) = timed(sink.subscribe(chunk)).await {
                tracing::warn!(error = %e, "resubscribe failed");
                restored = false;
                break;
            }
        }
        if !restored {
            subs.set_sink(None);
            retry_later(&subs, &mut attempt, "resubscribe failed", &shutdown).await;
            continue;
        }
        attempt = 0;
        metrics::gauge!("orders_gateway_redis_up").set(1.0);
        subs.set_link_up(true);
        if was_connected {
            metrics::counter!("orders_gateway_redis_reconnects_total").increment(1);
            tracing::info!(
                channels = channels.len(),
                "Redis pub/sub reconnected, subscriptions restored"
            );
            let _ = inbound.send(Inbound::Resubscribed).await;
        }
        was_connected = true;
        let why = relay(&mut stream, &subs, &inbound, &probe, &shutdown).await;
        subs.set_sink(None);
        subs.set_link_up(false);
        metrics::gauge!("orders_gateway_redis_up").set(0.0);
        match why {
            LinkEnd::Shutdown => return,
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

type ProbeSend<'a> = Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + 'a>>;

enum LinkEnd {
    Shutdown,
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

async fn retry_later(
    subs: &Subscriptions,
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
    }
}

fn parse_event_id(epoch: &str, seq: &str) -> Option<EventId> {
    Some(EventId {
        epoch: epoch.parse().ok()?,
        seq: seq.parse().ok()?,
    })
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
        let r = req.restaurant;
        let rid = r.to_string();
        let version = req.version.map(|v| v.token()).unwrap_or_default();
        let fence = req.fence.unwrap_or_default();
        let meta = restaurant_key(r, "meta");
        let hist = restaurant_key(r, "hist");
        let vkey = req
            .version
            .map(|v| restaurant_key(r, &format!("v:{}", v.order_id)));
        let mut keys = vec![meta.as_str(), hist.as_str()];
        if let Some(v) = &vkey {
            keys.push(v);
        }
        let (id, dup): (String, i64) = self
            .fcall("og_publish", &keys, &[&rid, &version, &req.body, &fence])
            .await?;
        let event_id = id
            .parse()
            .map_err(|_| BrokerError::Rejected(format!("unexpected event id {id}")))?;
        Ok(Published {
            event_id,
            duplicate: dup == 1,
        })
    }

    async fn history_after(&self, r: RestaurantId, after: Cursor) -> Result<History, BrokerError> {
        let (epoch, seq) = match after {
            Cursor::After(id) => (format!("{:013}", id.epoch), id.seq.to_string()),
            Cursor::Empty { at_ms } => (String::new(), at_ms.to_string()),
        };
        let meta = restaurant_key(r, "meta");
        let hist = restaurant_key(r, "hist");
        let reply: Vec<String> = self
            .fcall(
                "og_history",
                &[&meta, &hist],
                &[&r.to_string(), &epoch, &seq],
            )
            .await?;
        let mut it = reply.into_iter();
        if it.next().as_deref() != Some("ok") {
            return Ok(History::Gone);
        }
        Ok(History::Events(
            it.filter_map(|m| {
                m.split_once('|')
                    .map(|(_, f)| Utf8Bytes::from(f.to_string()))
            })
            .collect(),
        ))
    }

    async fn position(&self, r: RestaurantId) -> Result<Cursor, BrokerError> {
        let meta = restaurant_key(r, "meta");
        let (epoch, seq): (String, String) =
            self.fcall("og_last", &[&meta], &[&r.to_string()]).await?;
        if epoch.is_empty() {
            let at_ms = seq.parse().map_err(|_| unavailable("bad og_last reply"))?;
            return Ok(Cursor::Empty { at_ms });
        }
        parse_event_id(&epoch, &seq)
            .map(Cursor::After)
            .ok_or_else(|| unavailable("bad og_last reply"))
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
        let until = self.now_ms() + ttl.as_millis() as i64;
        let member = serde_json::to_string(c).expect("record serializes");
        let key = conns_key(c.restaurant_id);
        let mut pipe = redis::pipe();
        pipe.zadd(&key, member, until)
            .ignore()
            .pexpire(&key, 2 * ttl.as_millis() as i64)
            .ignore()
            .zadd(ACTIVE, c.restaurant_id.to_string(), until)
            .ignore()
            .zadd(INSTANCES, &c.instance_id, until)
            .ignore();
        self.query::<()>(pipe).await
    }

    async fn remove_connection(&self, c: &ConnectionRecord) -> Result<(), BrokerError> {
        let member = serde_json::to_string(c).expect("record serializes");
        let mut pipe = redis::pipe();
        pipe.zrem(conns_key(c.restaurant_id), member).ignore();
        self.query::<()>(pipe).await
    }

    async fn heartbeat(
        &self,
        instance_id: &str,
        connections: &[ConnectionRecord],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        if let Err(e) = self.sync_clock().await {
            tracing::debug!(error = %e, "could not read Redis' clock");
        }
        let now = self.now_ms();
        let until = now + ttl.as_millis() as i64;
        let mut by_restaurant: BTreeMap<RestaurantId, Vec<(i64, String)>> = BTreeMap::new();
        for c in connections {
            by_restaurant
                .entry(c.restaurant_id)
                .or_default()
                .push((until, serde_json::to_string(c).expect("record serializes")));
        }
        let mut pipe = redis::pipe();
        pipe.zadd(INSTANCES, instance_id, until)
            .ignore()
            .zrembyscore(INSTANCES, "-inf", now)
            .ignore()
            .zrembyscore(ACTIVE, "-inf", now)
            .ignore();
        for (r, members) in &by_restaurant {
            let key = conns_key(*r);
            pipe.zadd_multiple(&key, members)
                .ignore()
                .zrembyscore(&key, "-inf", now)
                .ignore()
                .pexpire(&key, 2 * ttl.as_millis() as i64)
                .ignore()
                .zadd(ACTIVE, r.to_string(), until)
                .ignore();
        }
        self.query::<()>(pipe).await
    }

    async fn remove_instance(
        &self,
        instance_id: &str,
        connections: &[ConnectionRecord],
    ) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.zrem(INSTANCES, instance_id).ignore();
        for c in connections {
            pipe.zrem(
                conns_key(c.restaurant_id),
                serde_json::to_string(c).expect("record serializes"),
            )
            .ignore();
        }
        self.query::<()>(pipe).await
    }

    async fn connections(&self, r: RestaurantId) -> Result<Vec<ConnectionRecord>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.zrangebyscore(conns_key(r), self.now_ms(), "+inf");
        let (members,): (Vec<String>,) = self.query(pipe).await?;
        let mut out: Vec<ConnectionRecord> = members
            .iter()
            .filter_map(|m| serde_json::from_str(m).ok())
            .collect();
        out.sort_by_key(|c| c.connected_at);
        Ok(out)
    }

    async fn live_instances(&self) -> Result<usize, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.zcount(INSTANCES, self.now_ms(), "+inf");
        let (n,): (usize,) = self.query(pipe).await?;
        Ok(n)
    }

    async fn active_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.zrangebyscore(ACTIVE, self.now_ms(), "+inf");
        let (members,): (Vec<String>,) = self.query(pipe).await?;
        Ok(members.iter().filter_map(|m| m.parse().ok()).collect())
    }

    async fn try_acquire_leader(
        &self,
        instance_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, BrokerError> {
        let ttl = ttl.as_millis().to_string();
        let nonce = Uuid::new_v4().simple().to_string();
        let token: Option<String> = self
            .fcall(
                "og_leader_acquire",
                &[LEADER_KEY, LEADER_EPOCH_KEY],
                &[instance_id, &ttl, &nonce],
            )
            .await?;
        Ok(token.map(|token| Lease { token }))
    }

    async fn renew_leader(&self, lease: &Lease, ttl: Duration) -> Result<bool, BrokerError> {
        let ttl = ttl.as_millis().to_string();
        let ok: i64 = self
            .fcall("og_leader_renew", &[LEADER_KEY], &[&lease.token, &ttl])
            .await?;
        Ok(ok == 1)
    }

    async fn release_leader(&self, lease: &Lease) -> Result<(), BrokerError> {
        let _: i64 = self
            .fcall("og_leader_release", &[LEADER_KEY], &[&lease.token])
            .await?;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<String>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.get(LEADER_KEY);
        let (token,): (Option<String>,) = self.query(pipe).await?;
        Ok(token.as_deref().and_then(Lease::holder_of))
    }

    async fn poller_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.smembers(POLL_RESTAURANTS_KEY);
        let (members,): (Vec<String>,) = self.query(pipe).await?;
        Ok(members.iter().filter_map(|m| m.parse().ok()).collect())
    }

    async fn load_poller_state(
        &self,
        restaurants: &[RestaurantId],
    ) -> Result<PollerState, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.get(POLL_CURSOR_KEY).get(POLL_LAST_KEY);
        for r in restaurants {
            pipe.hgetall(poll_known_key(*r));
        }
        let values: Vec<redis::Value> = self.query(pipe).await?;
        let mut it = values.into_iter();
        let scalar = |v: Option<redis::Value>| -> Option<i64> {
            v.and_then(|v| redis::from_redis_value::<Option<i64>>(v).ok().flatten())
        };
        let cursor_micros = scalar(it.next());
        let last_poll_ms = scalar(it.next());
        let mut state = PollerState {
            cursor_micros,
            last_poll_ms,
            restaurants: HashMap::new(),
        };
        for (r, v) in restaurants.iter().zip(it) {
            let map: HashMap<String, String> = redis::from_redis_value(v).unwrap_or_default();
            if !map.is_empty() {
                state.restaurants.insert(*r, map);
            }
        }
        Ok(state)
    }

    async fn save_poller_state(
        &self,
        lease: &Lease,
        delta: &PollerStateDelta,
    ) -> Result<(), BrokerError> {
        let changes: serde_json::Map<String, serde_json::Value> = delta
            .changes
            .iter()
            .map(|(r, fields)| {
                let obj: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.clone().map_or(serde_json::Value::Null, Into::into),
                        )
                    })
                    .collect();
                (r.to_string(), obj.into())
            })
            .collect();
        let doc = serde_json::json!({ "changes": changes });
        let _: i64 = self
            .fcall(
                "og_poller_save",
                &[LEADER_KEY],
                &[
                    &lease.token,
                    &delta.cursor_micros.to_string(),
                    &delta.last_poll_ms.to_string(),
                    &doc.to_string(),
                ],
            )
            .await?;
        Ok(())
    }
}
