//! The Redis Cluster broker (`REDIS_CLUSTER_URLS`): the same functions as
//! the single-node broker, with every key declared and hash-tagged so a
//! restaurant's numbering, history and dedup share one slot with its
//! channel, and sharded pub/sub so an event travels only to the shard that
//! owns its channel.
//!
//! Commands go through the redis crate's cluster connection (it follows
//! `MOVED`/`ASK` and refreshes the slot map). Receiving: one RESP3
//! connection per node (the same cluster connection) carries this replica's
//! `SSUBSCRIBE`s, batched by slot; pushes land in a bounded queue. The
//! receiver watches for what takes subscriptions away — a node's connection
//! dropping (primary failover), a server-side `SUNSUBSCRIBE` (the slot moved
//! to another node), the push queue overflowing — then resubscribes every
//! wanted channel where its slot lives now and hands the node
//! [`Inbound::Resubscribed`], which gap-fills from history or tells the
//! dashboards to resync.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use futures_util::future::join_all;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, PushInfo, PushKind, Value};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::commands::{self, Batch, Commands};
use super::functions::{self, Call, Failure, Functions, LEADER_KEY, classify, library};
use super::{
    Broker, BrokerError, Cluster, ConnectionRecord, Cursor, History, Inbound, Lease, PollerState,
    PollerStateDelta, PublishRequest, Published, backoff,
};
use crate::config::HistoryLimits;
use crate::domain::RestaurantId;
use crate::tasks::Supervisor;

/// Any single Redis round trip taking longer than this counts as Redis
/// being unavailable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Pushes (messages and subscription notices) buffered between the Redis
/// connections and the receiver. When full, further pushes are dropped and
/// the receiver resubscribes and gap-fills (like after a disconnect), so
/// memory stays bounded however far behind the node falls.
pub const PUSH_CAPACITY: usize = 8192;
/// Between two liveness probes and topology checks.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe not heard back within this time means that node's link is deaf.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const PROBE_PREFIX: &str = "og:probe:";
/// Resubscriptions timing out this many times in a row mean the cluster
/// connection itself stopped answering (the redis crate was seen stuck in a
/// slot refresh that never ended, every command on it timing out, for
/// minutes): the restorer then replaces it with a new one. One is enough:
/// the restorer only runs after a disruption, and a resubscription that gets
/// no answer at all for the command timeout (errors from a cluster in
/// flux do not count) is that connection failing; waiting for a second one
/// cost 3 s more silence, and `REDIS_LOST_CLOSE_MS` counts it.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 1;

/// Hash slot of a key or channel: CRC16-XMODEM of its hash tag, mod 16384.
pub fn key_slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let hashed = match b.iter().position(|&c| c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Cluster connection plus sharded subscriptions.
pub struct ShardedPubSub {
    conn: Arc<ConnCell>,
    shared: Arc<Shared>,
}

/// The cluster connection everybody clones for each call, and the client
/// that makes a new one when it stops answering. Std mutex: held for a
/// clone or a swap, never across an await.
struct ConnCell {
    client: ClusterClient,
    current: Mutex<ClusterConnection>,
}

impl ConnCell {
    fn get(&self) -> ClusterConnection {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A new connection in place of the current one (whose clones die with
    /// the calls that hold them).
    async fn reconnect(&self) -> Result<(), BrokerError> {
        let conn = tokio::time::timeout(COMMAND_TIMEOUT * 2, self.client.get_async_connection())
            .await
            .map_err(|_| unavailable("Redis Cluster: connect timed out"))?
            .map_err(unavailable)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = conn;
        metrics::counter!("orders_gateway_redis_cluster_reconnects_total").increment(1);
        Ok(())
    }
}

/// What the receiver and the subscribe calls share.
struct Shared {
    /// Restaurants the node wants; restored after every disruption. Std
    /// mutex: held for an insert, a remove or a copy, never across an await.
    wanted: Mutex<HashSet<RestaurantId>>,
    /// Set by the push sender when the queue was full and a push was lost.
    overflowed: AtomicBool,
    /// Wakes the restorer for a resubscription.
    disrupted: Notify,
    /// Counts disruptions; a restore that began at generation g ends the
    /// gap only if no disruption came after it.
    generation: AtomicU64,
    /// Between a disruption and the restore that follows it, live messages
    /// are dropped: once the node has dispatched a later event its position
    /// moves past the hole, and gap-filling from that position would miss
    /// what the hole swallowed (the crate re-subscribes by itself after a
    /// reconnect, so live messages resume before we know the hole's end).
    /// Everything dropped is in history and comes back by gap-fill.
    gap: AtomicBool,
    /// A resubscription is under way: some channels may be deaf (readiness).
    restoring: AtomicBool,
    /// The liveness probes: one channel per primary (a name that hashes
    /// into a slot that primary owns), with the newest probe number sent
    /// and heard back. Std mutex, never held across an await.
    probes: Mutex<HashMap<String, ProbeState>>,
    /// Every primary's probe came back in time (read by readiness).
    link_up: AtomicBool,
}

#[derive(Debug, Default, Clone, Copy)]
struct ProbeState {
    sent: u64,
    heard: u64,
    /// When the oldest unanswered probe was sent.
    waiting_since: Option<tokio::time::Instant>,
}

impl Shared {
    fn wanted(&self) -> std::sync::MutexGuard<'_, HashSet<RestaurantId>> {
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Something may have cost us messages: stop live delivery until the
    /// restorer has resubscribed and the node has gap-filled.
    fn disrupt(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.gap.store(true, Ordering::Release);
        self.disrupted.notify_one();
    }
    fn probes(&self) -> std::sync::MutexGuard<'_, HashMap<String, ProbeState>> {
        self.probes.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set_link_up(&self, up: bool) {
        if self.link_up.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!("orders_gateway_redis_link_up").set(if up { 1.0 } else { 0.0 });
        }
    }
    /// Every channel to be subscribed: the wanted restaurants and the probes.
    fn all_channels(&self) -> Vec<String> {
        let mut out: Vec<String> = self.wanted().iter().map(|r| r.channel()).collect();
        out.extend(self.probes().keys().cloned());
        out
    }
}

impl ShardedPubSub {
    /// Connect to the cluster (seeds need not all be up) and start the
    /// receiver.
    pub async fn connect(
        seeds: &[String],
        instance_id: &str,
        inbound: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
        tasks: &Supervisor,
    ) -> Result<ShardedPubSub, BrokerError> {
        let (push_tx, push_rx) = mpsc::channel::<PushInfo>(PUSH_CAPACITY);
        let shared = Arc::new(Shared {
            wanted: Mutex::new(HashSet::new()),
            overflowed: AtomicBool::new(false),
            disrupted: Notify::new(),
            restoring: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            gap: AtomicBool::new(false),
            probes: Mutex::new(HashMap::new()),
            link_up: AtomicBool::new(true),
        });
        let on_push = {
            let shared = shared.clone();
            // Must not block (it runs on the connection's task): try_send,
            // and on a full queue remember that something was lost.
            move |info: PushInfo| -> Result<(), ()> {
                if push_tx.try_send(info).is_err()
                    && !shared.overflowed.swap(true, Ordering::AcqRel)
                {
                    metrics::counter!("orders_gateway_redis_push_overflows_total").increment(1);
                    shared.disrupt();
                }
                Ok(())
            }
        };
        let client = ClusterClientBuilder::new(seeds.to_vec())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(on_push)
            .connection_timeout(COMMAND_TIMEOUT)
            .response_timeout(COMMAND_TIMEOUT)
            .retries(4)
            .build()
            .map_err(unavailable)?;
        let conn = tokio::time::timeout(COMMAND_TIMEOUT * 2, client.get_async_connection())
            .await
            .map_err(|_| unavailable("Redis Cluster: connect timed out"))?
            .map_err(unavailable)?;
        let conn = Arc::new(ConnCell {
            client,
            current: Mutex::new(conn),
        });
        let me = ShardedPubSub { conn, shared };
        let (restored_tx, restored_rx) = mpsc::channel(4);
        tasks.spawn(
            "redis_cluster_receiver",
            receive(
                me.shared.clone(),
                push_rx,
                restored_rx,
                inbound,
                shutdown.clone(),
            ),
        );
        tasks.spawn(
            "redis_cluster_restorer",
            restorer(
                me.conn.clone(),
                me.shared.clone(),
                restored_tx,
                shutdown.clone(),
            ),
        );
        tasks.spawn(
            "redis_cluster_prober",
            prober(
                me.conn.clone(),
                me.shared.clone(),
                format!("{PROBE_PREFIX}{instance_id}"),
                shutdown,
            ),
        );
        Ok(me)
    }

    pub fn conn(&self) -> ClusterConnection {
        self.conn.get()
    }

    pub async fn subscribe(&self, r: RestaurantId) -> Result<(), BrokerError> {
        self.shared.wanted().insert(r);
        let mut conn = self.conn();
        timed(conn.ssubscribe(r.channel())).await
    }

    /// Not restoring subscriptions, and every primary's probe came back.
    pub fn healthy(&self) -> bool {
        !self.shared.restoring.load(Ordering::Relaxed)
            && self.shared.link_up.load(Ordering::Relaxed)
    }

    pub async fn unsubscribe(&self, r: RestaurantId) -> Result<(), BrokerError> {
        self.shared.wanted().remove(&r);
        let mut conn = self.conn();
        timed(conn.sunsubscribe(r.channel())).await
    }
}

async fn timed<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Err(_) => Err(unavailable("Redis command timed out")),
        Ok(r) => r.map_err(unavailable),
    }
}

/// Resubscribe every wanted channel on whichever node serves its slot now,
/// one `SSUBSCRIBE` per slot (a command may only name channels of one slot).
async fn resubscribe_all(conn: &ClusterConnection, shared: &Shared) -> Result<usize, BrokerError> {
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for ch in shared.all_channels() {
        by_slot.entry(key_slot(&ch)).or_default().push(ch);
    }
    let n = by_slot.len();
    let calls = by_slot.into_values().map(|channels| {
        let mut conn = conn.clone();
        async move { timed(conn.ssubscribe(channels)).await }
    });
    for r in join_all(calls).await {
        r?;
    }
    Ok(n)
}

/// The primaries' slot ranges, to notice a failover or a slot move even
/// when no connection told us.
async fn slot_owners(conn: &ClusterConnection) -> Option<Vec<(i64, i64, String)>> {
    let mut conn = conn.clone();
    let v: Value = timed(redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn))
        .await
        .ok()?;
    let Value::Array(ranges) = v else { return None };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let mut it = parts.into_iter();
        let (Some(a), Some(b), Some(primary)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let (Ok(a), Ok(b)) = (i64::from_redis_value(a), i64::from_redis_value(b)) else {
            continue;
        };
        let Value::Array(node) = primary else {
            continue;
        };
        let addr = node
            .into_iter()
            .take(2)
            .map(|v| match v {
                Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                Value::Int(i) => i.to_string(),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join(":");
        out.push((a, b, addr));
    }
    out.sort();
    Some(out)
}

/// Reads pushes and watches the topology. Never blocks on a resubscription
/// (that is the restorer's job), so the shards that are fine keep
/// delivering while one fails over.
async fn receive(
    shared: Arc<Shared>,
    mut pushes: mpsc::Receiver<PushInfo>,
    mut restored: mpsc::Receiver<u64>,
    inbound: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) {
    loop {
        let push = tokio::select! {
            _ = shutdown.cancelled() => return,
            g = restored.recv() => {
                let Some(g) = g else { return };
                // Sent from this task, in order with the messages: what
                // was dropped before is read from history by the node,
                // what is forwarded after was received after the restore.
                if inbound.send(Inbound::Resubscribed).await.is_err() {
                    return;
                }
                if shared.generation.load(Ordering::Acquire) == g {
                    shared.gap.store(false, Ordering::Release);
                }
                continue;
            }
            p = pushes.recv() => p,
        };
        let Some(push) = push else { return };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if heard_probe(&shared, &push.data) {
                    continue;
                }
                if shared.gap.load(Ordering::Acquire) {
                    metrics::counter!("orders_gateway_redis_gap_dropped_total").increment(1);
                    continue;
                }
                if let Some(event) = event_of(push.data)
                    && inbound.send(event).await.is_err()
                {
                    return;
                }
            }
            PushKind::SUnsubscribe => {
                // Ours (an unsubscribe) or the server's (the slot moved
                // away): only the second leaves a wanted channel behind.
                let channel = push
                    .data
                    .first()
                    .and_then(|v| String::from_redis_value(v.clone()).ok())
                    .unwrap_or_default();
                let still_wanted = RestaurantId::from_channel(&channel)
                    .is_some_and(|r| shared.wanted().contains(&r))
                    || shared.probes().contains_key(&channel);
                if still_wanted {
                    tracing::warn!(channel, "Redis Cluster moved a subscribed slot away");
                    shared.disrupt();
                }
            }
            PushKind::Disconnection => {
                tracing::warn!("Redis Cluster: a node connection dropped");
                shared.disrupt();
            }
            _ => {}
        }
    }
}

/// A probe coming back: note it (true), or not a probe (false).
fn heard_probe(shared: &Shared, data: &[Value]) -> bool {
    let Some(channel) = data
        .first()
        .and_then(|v| String::from_redis_value(v.clone()).ok())
    else {
        return false;
    };
    if !channel.starts_with(PROBE_PREFIX) {
        return false;
    }
    let n = data
        .get(1)
        .and_then(|v| u64::from_redis_value(v.clone()).ok())
        .unwrap_or(0);
    if let Some(p) = shared.probes().get_mut(&channel) {
        p.heard = p.heard.max(n);
        p.waiting_since = if p.heard >= p.sent {
            None
        } else {
            // An older probe: the newest is still due.
            Some(tokio::time::Instant::now())
        };
    }
    true
}

/// Every [`PROBE_INTERVAL`]: read the slot map (a change means a failover
/// or a slot move: restore), keep one probe channel per primary, publish a
/// probe on each and check the previous ones came back. A probe that does
/// not come back within [`PROBE_TIMEOUT`] means that node's link is deaf
/// even though its connection looks open: restore.
async fn prober(
    cell: Arc<ConnCell>,
    shared: Arc<Shared>,
    prefix: String,
    shutdown: CancellationToken,
) {
    let mut owners: Option<Vec<(i64, i64, String)>> = None;
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Taken anew each round: the restorer may have replaced it.
        let conn = cell.get();
        if let Some(now) = slot_owners(&conn).await
            && owners.as_ref() != Some(&now)
        {
            if owners.is_some() {
                tracing::warn!("Redis Cluster topology changed; restoring subscriptions");
                shared.disrupt();
            }
            let channels = probe_channels(&prefix, &now);
            {
                let mut probes = shared.probes();
                probes.retain(|ch, _| channels.contains(ch));
                for ch in &channels {
                    probes.entry(ch.clone()).or_default();
                }
            }
            for ch in &channels {
                let mut c = conn.clone();
                if let Err(e) = timed(c.ssubscribe(ch)).await {
                    tracing::debug!(error = %e, "probe subscribe failed");
                }
            }
            owners = Some(now);
        }
        // Judge the previous probes, then send the next ones.
        let deaf: Vec<String> = shared
            .probes()
            .iter()
            .filter(|(_, p)| {
                p.waiting_since
                    .is_some_and(|t| t.elapsed() >= PROBE_TIMEOUT)
            })
            .map(|(ch, _)| ch.clone())
            .collect();
        if deaf.is_empty() {
            if !shared.restoring.load(Ordering::Relaxed) {
                shared.set_link_up(true);
            }
        } else {
            shared.set_link_up(false);
            metrics::counter!("orders_gateway_redis_link_stalls_total").increment(1);
            tracing::error!(
                channels = ?deaf,
                timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                "Redis Cluster pub/sub stopped delivering (liveness probe not received); restoring"
            );
            for p in shared.probes().values_mut() {
                p.waiting_since = None;
                p.heard = p.sent;
            }
            shared.disrupt();
        }
        let sends: Vec<(String, u64)> = shared
            .probes()
            .iter_mut()
            .map(|(ch, p)| {
                p.sent += 1;
                p.waiting_since
                    .get_or_insert_with(tokio::time::Instant::now);
                (ch.clone(), p.sent)
            })
            .collect();
        let publishes = sends.into_iter().map(|(ch, n)| {
            let mut c = conn.clone();
            async move {
                let r = timed(
                    redis::cmd("SPUBLISH")
                        .arg(&ch)
                        .arg(n)
                        .query_async::<Value>(&mut c),
                )
                .await;
                if let Err(e) = r {
                    tracing::debug!(error = %e, channel = ch, "probe publish failed");
                }
            }
        });
        join_all(publishes).await;
    }
}

/// One channel name per primary, each hashing into a slot that primary owns.
fn probe_channels(prefix: &str, owners: &[(i64, i64, String)]) -> HashSet<String> {
    let primaries: HashSet<&str> = owners.iter().map(|(_, _, a)| a.as_str()).collect();
    let owner_of = |slot: u16| {
        owners
            .iter()
            .find(|(a, b, _)| *a <= slot as i64 && slot as i64 <= *b)
            .map(|(_, _, addr)| addr.as_str())
    };
    let mut found: HashMap<&str, String> = HashMap::new();
    for n in 0..100_000u32 {
        if found.len() == primaries.len() {
            break;
        }
        let ch = format!("{prefix}:{n}");
        if let Some(addr) = owner_of(key_slot(&ch)) {
            found.entry(addr).or_insert(ch);
        }
    }
    found.into_values().collect()
}

/// On every disruption: resubscribe everything where it lives now, then
/// have the receiver tell the node to gap-fill. A disruption during a restore (the `Notify`
/// keeps one permit) triggers one more.
async fn restorer(
    cell: Arc<ConnCell>,
    shared: Arc<Shared>,
    restored: mpsc::Sender<u64>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.disrupted.notified() => {}
        }
        let generation = shared.generation.load(Ordering::Acquire);
        shared.restoring.store(true, Ordering::Relaxed);
        metrics::gauge!("orders_gateway_redis_up").set(0.0);
        // Give the cluster a moment to settle (a failover announces itself
        // in pieces), then restore.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !restore(&cell, &shared, &shutdown).await {
            return;
        }
        shared.restoring.store(false, Ordering::Relaxed);
        metrics::gauge!("orders_gateway_redis_up").set(1.0);
        metrics::counter!("orders_gateway_redis_reconnects_total").increment(1);
        if restored.send(generation).await.is_err() {
            return;
        }
    }
}

/// Resubscribe until it works (or shutdown: false).
async fn restore(cell: &ConnCell, shared: &Shared, shutdown: &CancellationToken) -> bool {
    let mut attempt = 0u32;
    let mut timeouts = 0u32;
    loop {
        // Cleared first: an overflow during the resubscription triggers another.
        shared.overflowed.store(false, Ordering::Release);
        if timeouts >= TIMEOUTS_BEFORE_RECONNECT {
            timeouts = 0;
            tracing::warn!("Redis Cluster connection not answering; connecting again");
            if let Err(e) = cell.reconnect().await {
                tracing::warn!(error = %e, "Redis Cluster reconnect failed");
            }
        }
        match resubscribe_all(&cell.get(), shared).await {
            Ok(slots) => {
                tracing::info!(slots, "Redis Cluster subscriptions restored");
                return true;
            }
            Err(e) => {
                // Ours ("Redis command timed out") or the crate's ("timed
                // out"): the connection did not answer, as opposed to the
                // cluster answering with an error (failover, slot move).
                if e.to_string().contains("timed out") {
                    timeouts += 1;
                } else {
                    timeouts = 0;
                }
                let delay = backoff(attempt);
                if attempt.is_multiple_of(10) {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Redis Cluster resubscribe failed");
                }
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn event_of(data: Vec<Value>) -> Option<Inbound> {
    let mut it = data.into_iter();
    let channel = String::from_redis_value(it.next()?).ok()?;
    let restaurant = RestaurantId::from_channel(&channel)?;
    let payload = match it.next()? {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        other => String::from_redis_value(other).ok(),
    };
    let Some(payload) = payload else {
        tracing::warn!(%restaurant, "dropped a non-UTF-8 payload");
        return None;
    };
    Some(Inbound::Event {
        restaurant,
        payload: Utf8Bytes::from(payload),
    })
}

// ---------------------------------------------------------------- the broker

/// The Redis Cluster broker: [`ShardedPubSub`] for receiving, the cluster
/// connection for commands, the function library on every primary.
pub struct ClusterBroker {
    pubsub: ShardedPubSub,
    library: String,
    /// Redis time minus local time, in ms (presence uses Redis' clock).
    clock_offset_ms: AtomicI64,
}

impl ClusterBroker {
    /// Connect through the seeds and start receiving. Unlike the single-node
    /// broker this needs the cluster reachable at start (the slot map comes
    /// from it); a later outage is survived like any failover.
    pub async fn start(
        seeds: &[String],
        instance_id: &str,
        inbound: mpsc::Sender<Inbound>,
        limits: HistoryLimits,
        shutdown: CancellationToken,
        tasks: &Supervisor,
    ) -> Result<ClusterBroker, BrokerError> {
        let pubsub = ShardedPubSub::connect(seeds, instance_id, inbound, shutdown, tasks).await?;
        let broker = ClusterBroker {
            pubsub,
            library: library(limits, "SPUBLISH"),
            clock_offset_ms: AtomicI64::new(0),
        };
        if let Err(e) = broker.install().await {
            tracing::warn!(error = %e, "could not install Redis functions yet; will retry on first use");
        }
        let _ = commands::sync_clock(&broker).await;
        Ok(broker)
    }

    /// Load the function library on every primary (the cluster connection
    /// sends `FUNCTION LOAD` to all of them). Replicas receive it through
    /// replication, so a promoted replica has it; a new or emptied primary
    /// is caught by "function not found" on first use.
    pub async fn install(&self) -> Result<(), BrokerError> {
        let mut conn = self.pubsub.conn();
        timed(
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(&self.library)
                .query_async::<Value>(&mut conn),
        )
        .await
        .map(|_| ())
    }

    /// Run commands grouped by the slot of their key: one pipeline per
    /// slot (a pipeline may not cross slots), all slots concurrently.
    /// Replies come back in the order of `cmds`.
    async fn by_slot(&self, cmds: Vec<(String, redis::Cmd)>) -> Result<Vec<Value>, BrokerError> {
        let n = cmds.len();
        let mut groups: BTreeMap<u16, Vec<(usize, redis::Cmd)>> = BTreeMap::new();
        for (i, (key, cmd)) in cmds.into_iter().enumerate() {
            groups.entry(key_slot(&key)).or_default().push((i, cmd));
        }
        let runs = groups.into_values().map(|group| {
            let mut conn = self.pubsub.conn();
            async move {
                let mut pipe = redis::pipe();
                for (_, cmd) in &group {
                    pipe.add_command(cmd.clone());
                }
                let values: Vec<Value> = timed(pipe.query_async(&mut conn)).await?;
                Ok::<_, BrokerError>(
                    group
                        .into_iter()
                        .map(|(i, _)| i)
                        .zip(values)
                        .collect::<Vec<_>>(),
                )
            }
        });
        let mut out = vec![Value::Nil; n];
        for r in join_all(runs).await {
            for (i, v) in r? {
                out[i] = v;
            }
        }
        Ok(out)
    }

    async fn one<T: FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, BrokerError> {
        let mut conn = self.pubsub.conn();
        timed(cmd.query_async(&mut conn)).await
    }
}

#[async_trait]
impl Commands for ClusterBroker {
    async fn run(&self, batch: Batch) -> Result<Vec<Value>, BrokerError> {
        self.by_slot(batch).await
    }

    fn clock_offset(&self) -> &AtomicI64 {
        &self.clock_offset_ms
    }
}

#[async_trait]
impl Functions for ClusterBroker {
    /// Through the cluster connection, which follows `MOVED`/`ASK` and
    /// retries a failover by itself; what it gives up on is unavailability,
    /// not a rejection. A primary without the library (a new node, one
    /// restarted without persistence) gets it loaded everywhere, then one retry.
    async fn fcall(&self, call: &Call) -> Result<Value, BrokerError> {
        let cmd = call.cmd();
        for attempt in 0..2 {
            let mut conn = self.pubsub.conn();
            let e = match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async(&mut conn)).await {
                Err(_) => return Err(unavailable("Redis command timed out")),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
            };
            match classify(&e) {
                Failure::Fenced => return Err(BrokerError::Fenced),
                Failure::NoLibrary if attempt == 0 => self.install().await?,
                Failure::Rejected => return Err(BrokerError::Rejected(e.to_string())),
                _ => return Err(unavailable(e)),
            }
        }
        Err(unavailable("Redis functions could not be installed"))
    }
}

#[async_trait]
impl Broker for ClusterBroker {
    async fn subscribe(&self, r: RestaurantId) -> Result<(), BrokerError> {
        self.pubsub.subscribe(r).await
    }

    async fn unsubscribe(&self, r: RestaurantId) -> Result<(), BrokerError> {
        self.pubsub.unsubscribe(r).await
    }

    async fn publish(&self, req: PublishRequest) -> Result<Published, BrokerError> {
        // The leader key lives in another slot, so the function cannot read
        // it: check it here first (a stale lease is refused as on one node),
        // and the function's per-restaurant fence refuses a lease older than
        // one already used on this restaurant. What remains is a leader that
        // pauses between this check and the call while nobody newer has
        // published here yet (docs/OPERATIONS.md).
        if let Some(fence) = req.fence.as_deref().filter(|f| !f.is_empty()) {
            let current: Option<String> = self.one(redis::Cmd::get(LEADER_KEY)).await?;
            if current.as_deref() != Some(fence) {
                return Err(BrokerError::Fenced);
            }
        }
        functions::publish(self, &req).await
    }

    async fn history_after(&self, r: RestaurantId, after: Cursor) -> Result<History, BrokerError> {
        functions::history_after(self, r, after).await
    }

    async fn position(&self, r: RestaurantId) -> Result<Cursor, BrokerError> {
        functions::position(self, r).await
    }

    /// Every primary answers (the crate sends `PING` to all of them) and
    /// the subscriptions are not being restored.
    async fn ping(&self) -> Result<(), BrokerError> {
        let _: Value = self.one(redis::cmd("PING")).await?;
        if !self.pubsub.healthy() {
            return Err(unavailable(
                "Redis Cluster subscriptions are being restored",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Cluster for ClusterBroker {
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

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
        assert_eq!(key_slot("og:{orders:x}:meta"), key_slot("orders:x"));
    }
}
