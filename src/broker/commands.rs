//! The plain commands both Redis brokers send — presence (who is connected
//! where, which restaurants are active, which replicas live), the poller's
//! saved state, the lease holder, Redis' clock — and how their replies
//! read. Each broker only says how a batch of commands reaches Redis
//! ([`Commands::run`]: one pipeline on one node, one pipeline per slot on a
//! cluster); what a batch holds and what its replies mean is written once,
//! here, as [`super::functions`] does for the function library.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::{FromRedisValue, Value};

use super::functions::{
    LEADER_KEY, POLL_CURSOR_KEY, POLL_LAST_KEY, POLL_RESTAURANTS_KEY, poll_known_key,
};
use super::{BrokerError, ConnectionRecord, Lease, PollerState};
use crate::domain::RestaurantId;

pub(super) const INSTANCES: &str = "og:instances";
pub(super) const ACTIVE: &str = "og:active";

pub(super) fn conns_key(r: RestaurantId) -> String {
    format!("og:conns:{r}")
}

/// Commands, each with the key that routes it (a cluster groups them by
/// slot; one node pipelines them all).
pub(super) type Batch = Vec<(String, redis::Cmd)>;

#[async_trait]
pub(super) trait Commands: Send + Sync {
    /// Run `batch`; the replies in its order.
    async fn run(&self, batch: Batch) -> Result<Vec<Value>, BrokerError>;
    /// Redis time minus local time, in ms, as last measured: presence
    /// scores use Redis' clock, so replicas with skewed clocks agree on
    /// what has expired.
    fn clock_offset(&self) -> &AtomicI64;
}

fn local_now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Now, by Redis' clock (as last measured).
fn now_ms(c: &(impl Commands + ?Sized)) -> i64 {
    local_now_ms() + c.clock_offset().load(Ordering::Relaxed)
}

async fn one<T: FromRedisValue>(
    c: &(impl Commands + ?Sized),
    key: &str,
    cmd: redis::Cmd,
) -> Result<T, BrokerError> {
    let v = c.run(vec![(key.to_string(), cmd)]).await?.pop();
    T::from_redis_value(v.unwrap_or(Value::Nil))
        .map_err(|e| BrokerError::Unavailable(format!("unexpected reply: {e}")))
}

fn member(c: &ConnectionRecord) -> String {
    serde_json::to_string(c).expect("record serializes")
}

/// Measure the offset between Redis' clock and ours.
pub(super) async fn sync_clock(c: &(impl Commands + ?Sized)) -> Result<(), BrokerError> {
    let before = local_now_ms();
    let (secs, micros): (i64, i64) = one(c, "", redis::cmd("TIME")).await?;
    let after = local_now_ms();
    c.clock_offset().store(
        secs * 1000 + micros / 1000 - (before + after) / 2,
        Ordering::Relaxed,
    );
    Ok(())
}

pub(super) async fn add_connection(
    c: &(impl Commands + ?Sized),
    rec: &ConnectionRecord,
    ttl: Duration,
) -> Result<(), BrokerError> {
    let until = now_ms(c) + ttl.as_millis() as i64;
    let key = conns_key(rec.restaurant_id);
    let batch = vec![
        (key.clone(), redis::Cmd::zadd(&key, member(rec), until)),
        (
            key.clone(),
            redis::Cmd::pexpire(&key, 2 * ttl.as_millis() as i64),
        ),
        (
            ACTIVE.into(),
            redis::Cmd::zadd(ACTIVE, rec.restaurant_id.to_string(), until),
        ),
        (
            INSTANCES.into(),
            redis::Cmd::zadd(INSTANCES, &rec.instance_id, until),
        ),
    ];
    c.run(batch).await.map(|_| ())
}

pub(super) async fn remove_connection(
    c: &(impl Commands + ?Sized),
    rec: &ConnectionRecord,
) -> Result<(), BrokerError> {
    let key = conns_key(rec.restaurant_id);
    let cmd = redis::Cmd::zrem(&key, member(rec));
    c.run(vec![(key, cmd)]).await.map(|_| ())
}

/// Refresh this replica and its sockets (and Redis' clock first), and drop
/// what expired.
pub(super) async fn heartbeat(
    c: &(impl Commands + ?Sized),
    instance_id: &str,
    connections: &[ConnectionRecord],
    ttl: Duration,
) -> Result<(), BrokerError> {
    if let Err(e) = sync_clock(c).await {
        tracing::debug!(error = %e, "could not read Redis' clock");
    }
    let now = now_ms(c);
    let until = now + ttl.as_millis() as i64;
    let mut by_restaurant: BTreeMap<RestaurantId, Vec<(i64, String)>> = BTreeMap::new();
    for rec in connections {
        by_restaurant
            .entry(rec.restaurant_id)
            .or_default()
            .push((until, member(rec)));
    }
    let mut batch = vec![
        (
            INSTANCES.to_string(),
            redis::Cmd::zadd(INSTANCES, instance_id, until),
        ),
        (
            INSTANCES.to_string(),
            redis::Cmd::zrembyscore(INSTANCES, "-inf", now),
        ),
        (
            ACTIVE.to_string(),
            redis::Cmd::zrembyscore(ACTIVE, "-inf", now),
        ),
    ];
    for (r, members) in &by_restaurant {
        let key = conns_key(*r);
        batch.push((key.clone(), redis::Cmd::zadd_multiple(&key, members)));
        batch.push((key.clone(), redis::Cmd::zrembyscore(&key, "-inf", now)));
        batch.push((
            key.clone(),
            redis::Cmd::pexpire(&key, 2 * ttl.as_millis() as i64),
        ));
        batch.push((
            ACTIVE.to_string(),
            redis::Cmd::zadd(ACTIVE, r.to_string(), until),
        ));
    }
    c.run(batch).await.map(|_| ())
}

pub(super) async fn remove_instance(
    c: &(impl Commands + ?Sized),
    instance_id: &str,
    connections: &[ConnectionRecord],
) -> Result<(), BrokerError> {
    let mut batch = vec![(
        INSTANCES.to_string(),
        redis::Cmd::zrem(INSTANCES, instance_id),
    )];
    for rec in connections {
        let key = conns_key(rec.restaurant_id);
        batch.push((key.clone(), redis::Cmd::zrem(&key, member(rec))));
    }
    c.run(batch).await.map(|_| ())
}

/// The restaurant's live connections, oldest first.
pub(super) async fn connections(
    c: &(impl Commands + ?Sized),
    r: RestaurantId,
) -> Result<Vec<ConnectionRecord>, BrokerError> {
    let key = conns_key(r);
    let cmd = redis::Cmd::zrangebyscore(&key, now_ms(c), "+inf");
    let members: Vec<String> = one(c, &key, cmd).await?;
    let mut out: Vec<ConnectionRecord> = members
        .iter()
        .filter_map(|m| serde_json::from_str(m).ok())
        .collect();
    out.sort_by_key(|c| c.connected_at);
    Ok(out)
}

pub(super) async fn live_instances(c: &(impl Commands + ?Sized)) -> Result<usize, BrokerError> {
    one(
        c,
        INSTANCES,
        redis::Cmd::zcount(INSTANCES, now_ms(c), "+inf"),
    )
    .await
}

pub(super) async fn active_restaurants(
    c: &(impl Commands + ?Sized),
) -> Result<Vec<RestaurantId>, BrokerError> {
    let cmd = redis::Cmd::zrangebyscore(ACTIVE, now_ms(c), "+inf");
    let members: Vec<String> = one(c, ACTIVE, cmd).await?;
    Ok(members.iter().filter_map(|m| m.parse().ok()).collect())
}

/// The instance holding the poller lease, if any.
pub(super) async fn leader(c: &(impl Commands + ?Sized)) -> Result<Option<String>, BrokerError> {
    let token: Option<String> = one(c, LEADER_KEY, redis::Cmd::get(LEADER_KEY)).await?;
    Ok(token.as_deref().and_then(Lease::holder_of))
}

pub(super) async fn poller_restaurants(
    c: &(impl Commands + ?Sized),
) -> Result<Vec<RestaurantId>, BrokerError> {
    let key = POLL_RESTAURANTS_KEY;
    let members: Vec<String> = one(c, key, redis::Cmd::smembers(key)).await?;
    Ok(members.iter().filter_map(|m| m.parse().ok()).collect())
}

/// The cursor, the last poll and what is known of `restaurants`' open
/// orders; all under the `{og}` tag: one slot, one pipeline.
pub(super) async fn load_poller_state(
    c: &(impl Commands + ?Sized),
    restaurants: &[RestaurantId],
) -> Result<PollerState, BrokerError> {
    let mut batch = vec![
        (
            POLL_CURSOR_KEY.to_string(),
            redis::Cmd::get(POLL_CURSOR_KEY),
        ),
        (POLL_LAST_KEY.to_string(), redis::Cmd::get(POLL_LAST_KEY)),
    ];
    for r in restaurants {
        let key = poll_known_key(*r);
        batch.push((key.clone(), redis::Cmd::hgetall(key)));
    }
    let mut it = c.run(batch).await?.into_iter();
    let scalar = |v: Option<Value>| -> Option<i64> {
        v.and_then(|v| Option::<i64>::from_redis_value(v).ok().flatten())
    };
    let mut state = PollerState {
        cursor_micros: scalar(it.next()),
        last_poll_ms: scalar(it.next()),
        restaurants: HashMap::new(),
    };
    for (r, v) in restaurants.iter().zip(it) {
        let map: HashMap<String, String> = HashMap::from_redis_value(v).unwrap_or_default();
        if !map.is_empty() {
            state.restaurants.insert(*r, map);
        }
    }
    Ok(state)
}
