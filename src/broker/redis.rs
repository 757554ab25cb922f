//! The Redis broker: one dedicated pub/sub connection per replica for
//! receiving, a deadpool of multiplexed connections for everything else,
//! and the server-side functions of `orders_gateway.lua` for every step
//! that must be atomic (publish, history, leader lock, poller progress).

use std::collections::{BTreeMap, HashMap, HashSet};
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
    Broker, BrokerError, Cluster, ConnectionRecord, History, Inbound, Lease, PollerState,
    PollerStateDelta, PublishRequest, Published, backoff,
};
use crate::config::HistoryLimits;
use crate::domain::{EventId, RestaurantId};
use crate::tasks::Supervisor;

/// The function library; see the file for the key layout.
pub const FUNCTIONS: &str = include_str!("orders_gateway.lua");
/// Version of [`FUNCTIONS`]: its library is `orders_gateway_v<N>` and each
/// function `<name>_v<N>`, so replicas of different versions never call or
/// replace each other's code during a rolling deploy. Bump it (and the
/// file's `#!lua name=` line and `VERSION`) on any change of semantics.
pub const LIBRARY_VERSION: u32 = 2;

/// The name this build calls a library function by, e.g.
/// `og_publish` -> `og_publish_v2`.
pub fn function_name(base: &str) -> String {
    format!("{base}_v{LIBRARY_VERSION}")
}

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
}

/// What the receiver must be subscribed to, and the live sink to do it
/// with. Std mutexes: each is held for an insert or a clone, never across
/// an await.
struct Subscriptions {
    /// Restaurants the node wants; restored after every reconnect.
    wanted: Mutex<HashSet<RestaurantId>>,
    /// Sink of the current pub/sub connection; `None` while disconnected.
    sink: Mutex<Option<PubSubSink>>,
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
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl RedisBroker {
    /// Create the broker and start its receiver. Redis need not be up yet:
    /// the receiver keeps retrying, and readiness reports the outage.
    pub async fn start(
        url: &str,
        inbound: mpsc::Sender<Inbound>,
        limits: HistoryLimits,
        shutdown: CancellationToken,
    ) -> Result<RedisBroker, BrokerError> {
        let tasks = Supervisor::new(shutdown.clone());
        Self::start_supervised(url, inbound, limits, shutdown, &tasks).await
    }

    /// [`RedisBroker::start`], with the receiver task watched by `tasks`
    /// (a panic there makes the replica unready).
    pub async fn start_supervised(
        url: &str,
        inbound: mpsc::Sender<Inbound>,
        limits: HistoryLimits,
        shutdown: CancellationToken,
        tasks: &Supervisor,
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
        });
        let broker = RedisBroker {
            pool,
            subscriptions: subscriptions.clone(),
            limits,
        };
        if let Err(e) = broker.install().await {
            tracing::warn!(error = %e, "could not install Redis functions yet; will retry on first use");
        }
        tasks.spawn(
            "redis_receiver",
            receive(client, subscriptions, inbound, shutdown),
        );
        Ok(broker)
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, BrokerError> {
        self.pool.get().await.map_err(unavailable)
    }

    /// Load the function library and the limits it reads.
    pub async fn install(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(FUNCTIONS)
            .ignore()
            .hset_multiple(
                "og:config",
                &[
                    ("history_max_events", self.limits.max_events),
                    ("history_max_age_ms", self.limits.max_age.as_millis() as u64),
                    ("dedup_ttl_ms", DEDUP_TTL_MS),
                ],
            )
            .ignore();
        timed(pipe.query_async::<()>(&mut conn)).await
    }

    async fn fcall<T: FromRedisValue>(&self, name: &str, args: &[&str]) -> Result<T, BrokerError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(function_name(name)).arg(0);
        for a in args {
            cmd.arg(*a);
        }
        for attempt in 0..2 {
            let mut conn = self.conn().await?;
            match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
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
        let mut conn = self.conn().await?;
        timed(pipe.query_async::<T>(&mut conn)).await
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

/// The receiver: keeps one pub/sub connection alive, restores every wanted
/// subscription after a reconnect, and forwards messages to the node.
async fn receive(
    client: redis::Client,
    subs: Arc<Subscriptions>,
    inbound: mpsc::Sender<Inbound>,
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
                retry_later(&mut attempt, &e.to_string(), &shutdown).await;
                continue;
            }
            Err(_) => {
                retry_later(&mut attempt, "connect timed out", &shutdown).await;
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
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
            retry_later(&mut attempt, "resubscribe failed", &shutdown).await;
            continue;
        }
        attempt = 0;
        metrics::gauge!("orders_gateway_redis_up").set(1.0);
        if was_connected {
            metrics::counter!("orders_gateway_redis_reconnects_total").increment(1);
            tracing::info!(
                channels = channels.len(),
                "Redis pub/sub reconnected, subscriptions restored"
            );
            let _ = inbound.send(Inbound::Resubscribed).await;
        }
        was_connected = true;
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = stream.next() => m,
            };
            let Some(msg) = msg else { break };
            let Some(restaurant) = RestaurantId::from_channel(msg.get_channel_name()) else {
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
                return;
            }
        }
        subs.set_sink(None);
        metrics::gauge!("orders_gateway_redis_up").set(0.0);
        tracing::warn!("Redis pub/sub connection lost; reconnecting");
    }
}

async fn retry_later(attempt: &mut u32, why: &str, shutdown: &CancellationToken) {
    metrics::gauge!("orders_gateway_redis_up").set(0.0);
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
        let rid = req.restaurant.to_string();
        let version = req.version.map(|v| v.token()).unwrap_or_default();
        let fence = req.fence.unwrap_or_default();
        let (id, dup): (String, i64) = self
            .fcall("og_publish", &[&rid, &version, &req.body, &fence])
            .await?;
        let event_id = id
            .parse()
            .map_err(|_| BrokerError::Rejected(format!("unexpected event id {id}")))?;
        Ok(Published {
            event_id,
            duplicate: dup == 1,
        })
    }

    async fn history_after(&self, r: RestaurantId, after: EventId) -> Result<History, BrokerError> {
        let epoch = format!("{:013}", after.epoch);
        let seq = after.seq.to_string();
        let reply: Vec<String> = self
            .fcall("og_history", &[&r.to_string(), &epoch, &seq])
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

    async fn last_event_id(&self, r: RestaurantId) -> Result<Option<EventId>, BrokerError> {
        let reply: Option<(String, String)> = self.fcall("og_last", &[&r.to_string()]).await?;
        Ok(reply.and_then(|(e, s)| parse_event_id(&e, &s)))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        self.query::<(String,)>(pipe).await.map(|_| ())
    }
}

#[async_trait]
impl Cluster for RedisBroker {
    async fn add_connection(&self, c: &ConnectionRecord, ttl: Duration) -> Result<(), BrokerError> {
        let until = now_ms() + ttl.as_millis() as i64;
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
        let now = now_ms();
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
        pipe.zrangebyscore(conns_key(r), now_ms(), "+inf");
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
        pipe.zcount(INSTANCES, now_ms(), "+inf");
        let (n,): (usize,) = self.query(pipe).await?;
        Ok(n)
    }

    async fn active_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.zrangebyscore(ACTIVE, now_ms(), "+inf");
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
            .fcall("og_leader_acquire", &[instance_id, &ttl, &nonce])
            .await?;
        Ok(token.map(|token| Lease { token }))
    }

    async fn renew_leader(&self, lease: &Lease, ttl: Duration) -> Result<bool, BrokerError> {
        let ttl = ttl.as_millis().to_string();
        let ok: i64 = self.fcall("og_leader_renew", &[&lease.token, &ttl]).await?;
        Ok(ok == 1)
    }

    async fn release_leader(&self, lease: &Lease) -> Result<(), BrokerError> {
        let _: i64 = self.fcall("og_leader_release", &[&lease.token]).await?;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<String>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.get("og:leader");
        let (token,): (Option<String>,) = self.query(pipe).await?;
        Ok(token.as_deref().and_then(Lease::holder_of))
    }

    async fn load_poller_state(
        &self,
        restaurants: &[RestaurantId],
    ) -> Result<PollerState, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.get("og:poll:cursor").get("og:poll:last");
        for r in restaurants {
            pipe.hgetall(format!("og:poll:known:{r}"));
        }
        let mut conn = self.conn().await?;
        let values: Vec<redis::Value> = timed(pipe.query_async(&mut conn)).await?;
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
        let doc = serde_json::json!({
            "forget": delta.forget.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            "changes": changes,
        });
        let _: i64 = self
            .fcall(
                "og_poller_save",
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
