//! The server-side function library (`orders_gateway.lua`) and how it is
//! called: key layout, argument lists and reply parsing, shared by the
//! single-node/Sentinel broker ([`super::redis`]) and the cluster broker
//! ([`super::cluster`]). Each broker only says how one `FCALL` reaches
//! Redis and what a failure means for its connections ([`Functions`]);
//! what a call sends and what its answer means is written once, here.

use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use redis::{FromRedisValue, Value};
use uuid::Uuid;

use super::{BrokerError, Cursor, History, Lease, PollerStateDelta, PublishRequest, Published};
use crate::config::HistoryLimits;
use crate::domain::{EventId, RestaurantId};

/// The function library as shipped; see the file for the key layout.
/// [`library`] fills in the limits before it is loaded.
pub const FUNCTIONS: &str = include_str!("orders_gateway.lua");
/// Version of [`FUNCTIONS`]: its library is `orders_gateway_v<N>` and each
/// function `<name>_v<N>`, so replicas of different versions never call or
/// replace each other's code during a rolling deploy. Bump it (and the
/// file's `#!lua name=` line and `VERSION`) on any change of semantics.
pub const LIBRARY_VERSION: u32 = 2;
/// Order versions are remembered this long for deduplication.
const DEDUP_TTL_MS: u64 = 24 * 3600 * 1000;

/// The name this build calls a library function by, e.g.
/// `og_publish` -> `og_publish_v2`.
pub fn function_name(base: &str) -> String {
    format!("{base}_v{LIBRARY_VERSION}")
}

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

/// One `FCALL`: which function, its declared keys, its arguments.
pub(super) struct Call {
    name: &'static str,
    keys: Vec<String>,
    args: Vec<String>,
}

impl Call {
    fn new(name: &'static str, keys: Vec<String>, args: Vec<String>) -> Call {
        Call { name, keys, args }
    }

    pub(super) fn cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(function_name(self.name))
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

/// What a failed `FCALL` means, whatever the topology.
pub(super) enum Failure {
    /// The lease is stale (`FENCED`).
    Fenced,
    /// The node has no library (restarted without persistence, a new
    /// primary): load it and retry.
    NoLibrary,
    /// The node is not (or no longer) the one to ask: a demoted master
    /// (`READONLY`), a slot moving or failing over, a node still loading.
    /// Nothing was done; retry where the topology says now.
    Elsewhere,
    /// Redis refused the call itself (bad arguments): retrying won't help.
    Rejected,
    /// Connection lost or timed out: the outcome is unknown.
    Unavailable,
}

pub(super) fn classify(e: &redis::RedisError) -> Failure {
    match e.code() {
        Some("FENCED") => Failure::Fenced,
        _ if e.to_string().contains("Function not found") => Failure::NoLibrary,
        Some(
            "READONLY" | "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "LOADING",
        ) => Failure::Elsewhere,
        Some(_) if !e.is_io_error() => Failure::Rejected,
        _ => Failure::Unavailable,
    }
}

/// How a broker runs one call: its connections, retries and failover
/// handling. The operations below are written against this.
#[async_trait]
pub(super) trait Functions: Send + Sync {
    async fn fcall(&self, call: &Call) -> Result<Value, BrokerError>;
}

async fn run<T: FromRedisValue>(
    f: &(impl Functions + ?Sized),
    call: Call,
) -> Result<T, BrokerError> {
    let v = f.fcall(&call).await?;
    T::from_redis_value(v)
        .map_err(|e| BrokerError::Unavailable(format!("unexpected reply from {}: {e}", call.name)))
}

/// Number, record and publish one event (`og_publish`).
pub(super) async fn publish(
    f: &(impl Functions + ?Sized),
    req: &PublishRequest,
) -> Result<Published, BrokerError> {
    let r = req.restaurant;
    let mut keys = vec![restaurant_key(r, "meta"), restaurant_key(r, "hist")];
    if let Some(v) = &req.version {
        keys.push(restaurant_key(r, &format!("v:{}", v.order_id)));
    }
    let args = vec![
        r.to_string(),
        req.version.map(|v| v.token()).unwrap_or_default(),
        req.body.clone(),
        req.fence.clone().unwrap_or_default(),
    ];
    let (id, dup): (String, i64) = run(f, Call::new("og_publish", keys, args)).await?;
    let event_id = id
        .parse()
        .map_err(|_| BrokerError::Rejected(format!("unexpected event id {id}")))?;
    Ok(Published {
        event_id,
        duplicate: dup == 1,
    })
}

/// The events after `after`, or `Gone` when history cannot prove there is
/// no gap (`og_history`).
pub(super) async fn history_after(
    f: &(impl Functions + ?Sized),
    r: RestaurantId,
    after: Cursor,
) -> Result<History, BrokerError> {
    let (epoch, seq) = match after {
        Cursor::After(id) => (format!("{:013}", id.epoch), id.seq.to_string()),
        Cursor::Empty { at_ms } => (String::new(), at_ms.to_string()),
    };
    let keys = vec![restaurant_key(r, "meta"), restaurant_key(r, "hist")];
    let reply: Vec<String> = run(
        f,
        Call::new("og_history", keys, vec![r.to_string(), epoch, seq]),
    )
    .await?;
    let mut it = reply.into_iter();
    if it.next().as_deref() != Some("ok") {
        return Ok(History::Gone);
    }
    // Entries are "<ms>|<frame>".
    Ok(History::Events(
        it.filter_map(|m| {
            m.split_once('|')
                .map(|(_, f)| Utf8Bytes::from(f.to_string()))
        })
        .collect(),
    ))
}

/// Where the restaurant's stream stands now (`og_last`).
pub(super) async fn position(
    f: &(impl Functions + ?Sized),
    r: RestaurantId,
) -> Result<Cursor, BrokerError> {
    let call = Call::new(
        "og_last",
        vec![restaurant_key(r, "meta")],
        vec![r.to_string()],
    );
    let (epoch, seq): (String, String) = run(f, call).await?;
    let bad = || BrokerError::Unavailable("bad og_last reply".into());
    if epoch.is_empty() {
        return Ok(Cursor::Empty {
            at_ms: seq.parse().map_err(|_| bad())?,
        });
    }
    match (epoch.parse(), seq.parse()) {
        (Ok(epoch), Ok(seq)) => Ok(Cursor::After(EventId { epoch, seq })),
        _ => Err(bad()),
    }
}

pub(super) async fn acquire_leader(
    f: &(impl Functions + ?Sized),
    instance_id: &str,
    ttl: Duration,
) -> Result<Option<Lease>, BrokerError> {
    let nonce = Uuid::new_v4().simple().to_string();
    let call = Call::new(
        "og_leader_acquire",
        vec![LEADER_KEY.into(), LEADER_EPOCH_KEY.into()],
        vec![instance_id.into(), ttl.as_millis().to_string(), nonce],
    );
    let token: Option<String> = run(f, call).await?;
    Ok(token.map(|token| Lease { token }))
}

pub(super) async fn renew_leader(
    f: &(impl Functions + ?Sized),
    lease: &Lease,
    ttl: Duration,
) -> Result<bool, BrokerError> {
    let call = Call::new(
        "og_leader_renew",
        vec![LEADER_KEY.into()],
        vec![lease.token.clone(), ttl.as_millis().to_string()],
    );
    Ok(run::<i64>(f, call).await? == 1)
}

pub(super) async fn release_leader(
    f: &(impl Functions + ?Sized),
    lease: &Lease,
) -> Result<(), BrokerError> {
    let call = Call::new(
        "og_leader_release",
        vec![LEADER_KEY.into()],
        vec![lease.token.clone()],
    );
    run::<i64>(f, call).await.map(|_| ())
}

/// Save the poller's progress under its lease (`og_poller_save`).
pub(super) async fn save_poller_state(
    f: &(impl Functions + ?Sized),
    lease: &Lease,
    delta: &PollerStateDelta,
) -> Result<(), BrokerError> {
    let call = Call::new(
        "og_poller_save",
        vec![LEADER_KEY.into()],
        vec![
            lease.token.clone(),
            delta.cursor_micros.to_string(),
            delta.last_poll_ms.to_string(),
            poller_delta_json(delta),
        ],
    );
    run::<i64>(f, call).await.map(|_| ())
}

/// The argument of `og_poller_save`: `{changes: {rid: {field: value|null}}}`.
fn poller_delta_json(delta: &PollerStateDelta) -> String {
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
    serde_json::json!({ "changes": changes }).to_string()
}
