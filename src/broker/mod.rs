//! Brokers: how events travel between replicas, how they are numbered and
//! remembered for resume, and the cluster-wide state replicas share
//! (presence, the poller's leader lock and its progress).
//!
//! Three implementations behind the same traits: [`memory::MemoryBroker`]
//! (embedded, one replica), [`redis::RedisBroker`] (one Redis server, fixed
//! or found through Sentinel: [`sentinel::Master`]) and
//! [`cluster::ClusterBroker`] (Redis Cluster, sharded pub/sub). The
//! conformance suite in `tests/it/broker_conformance.rs` runs against all of
//! them (Sentinel included). A broker never knows sockets exist: it hands
//! received payloads to an [`Inbound`] queue.

pub mod cluster;
mod commands;
pub mod functions;
pub mod memory;
pub mod redis;
pub mod sentinel;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{EventId, OrderVersion, RestaurantId};

/// What a broker hands to the node.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// A payload received on a restaurant's channel.
    Event {
        restaurant: RestaurantId,
        payload: Utf8Bytes,
    },
    /// The broker lost its subscriptions and has restored them: events
    /// published in between were not received and must be fetched from
    /// history.
    Resubscribed,
}

/// Capacity of the queue between a broker's receiver and the node. Bounded:
/// when the node falls behind, the receiver waits (Redis buffers, then cuts
/// the subscriber off, and the reconnect path fills the gap from history).
pub const INBOUND_CAPACITY: usize = 4096;

/// What to publish: a JSON object without `event_id`; the broker numbers it.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub restaurant: RestaurantId,
    /// The order version the event reports; a second publish of the same
    /// version is a duplicate and reaches nobody.
    pub version: Option<OrderVersion>,
    pub body: String,
    /// The poller's leader lease; a publish under a lease that is no longer
    /// the current one is refused (fencing).
    pub fence: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub event_id: EventId,
    pub duplicate: bool,
}

/// A position in a restaurant's event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Just after this event.
    After(EventId),
    /// Before the first event of any history that begins at or after this
    /// broker time (ms): the restaurant had no history when it was taken.
    Empty { at_ms: i64 },
}

/// Answer to "what happened after `event_id`?".
#[derive(Debug, Clone, PartialEq)]
pub enum History {
    /// Every later event, oldest first (possibly none).
    Events(Vec<Utf8Bytes>),
    /// The id is older than what is kept, unknown, or of a lost history.
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("stale leader lease: publish refused")]
    Fenced,
    #[error("rejected by broker: {0}")]
    Rejected(String),
}

/// One socket as the rest of the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub connection_id: Uuid,
    pub instance_id: String,
    pub user_id: String,
    pub restaurant_id: RestaurantId,
    pub connected_at: DateTime<Utc>,
}

/// A held poller leader lock. `token` is unique per acquisition and carries
/// an epoch that increases with every acquisition: it is the fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub token: String,
}

impl Lease {
    pub fn new(epoch: u64, instance_id: &str) -> Lease {
        Lease {
            token: format!("{epoch}:{instance_id}:{}", Uuid::new_v4().simple()),
        }
    }
    /// The instance named inside a lease token.
    pub fn holder_of(token: &str) -> Option<String> {
        let mut parts = token.splitn(2, ':');
        parts.next()?;
        let rest = parts.next()?;
        rest.rsplit_once(':')
            .map(|(instance, _)| instance.to_string())
    }
}

/// The poller's saved progress: a global cursor and, per restaurant, a map
/// of opaque fields (the poller decides what they mean).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PollerState {
    pub cursor_micros: Option<i64>,
    pub last_poll_ms: Option<i64>,
    pub restaurants: HashMap<RestaurantId, HashMap<String, String>>,
}

/// Field edits of one restaurant's poller state: set (`Some`) or delete (`None`).
pub type FieldEdits = Vec<(String, Option<String>)>;

/// Changes to [`PollerState`] written by the leader after a tick. A
/// restaurant whose fields are all deleted leaves the saved state.
#[derive(Debug, Clone, Default)]
pub struct PollerStateDelta {
    pub cursor_micros: i64,
    pub last_poll_ms: i64,
    pub changes: Vec<(RestaurantId, FieldEdits)>,
}

/// Pub/sub, numbering and history.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Receive the restaurant's channel into the inbound queue. Returns once
    /// the subscription is in effect: events published after that arrive.
    async fn subscribe(&self, r: RestaurantId) -> Result<(), BrokerError>;
    async fn unsubscribe(&self, r: RestaurantId) -> Result<(), BrokerError>;
    /// Number, record in history and broadcast, atomically. An order
    /// version already published, or older than one already published, is
    /// not published again: answered as a duplicate with the newest id.
    async fn publish(&self, req: PublishRequest) -> Result<Published, BrokerError>;
    /// Every event after `after`, or [`History::Gone`] when that cannot be
    /// told exactly (trimmed, expired, another epoch, or an id this broker
    /// never issued or has lost).
    async fn history_after(&self, r: RestaurantId, after: Cursor) -> Result<History, BrokerError>;
    /// The restaurant's current position: its newest event, or "no history
    /// yet" with the broker's time.
    async fn position(&self, r: RestaurantId) -> Result<Cursor, BrokerError>;
    /// Is the broker reachable, and does this replica's subscription link
    /// deliver, right now?
    async fn ping(&self) -> Result<(), BrokerError>;
}

/// What replicas share about each other.
#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    async fn add_connection(&self, c: &ConnectionRecord, ttl: Duration) -> Result<(), BrokerError>;
    async fn remove_connection(&self, c: &ConnectionRecord) -> Result<(), BrokerError>;
    /// Refresh this replica and all its connections; entries not refreshed
    /// within `ttl` are gone from every view (a crashed replica's sockets).
    async fn heartbeat(
        &self,
        instance_id: &str,
        connections: &[ConnectionRecord],
        ttl: Duration,
    ) -> Result<(), BrokerError>;
    async fn remove_instance(
        &self,
        instance_id: &str,
        connections: &[ConnectionRecord],
    ) -> Result<(), BrokerError>;
    async fn connections(&self, r: RestaurantId) -> Result<Vec<ConnectionRecord>, BrokerError>;
    async fn live_instances(&self) -> Result<usize, BrokerError>;
    /// Restaurants with at least one live socket anywhere.
    async fn active_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError>;

    /// Take the poller lock if free.
    async fn try_acquire_leader(
        &self,
        instance_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, BrokerError>;
    /// Extend the lock; false when it is no longer ours.
    async fn renew_leader(&self, lease: &Lease, ttl: Duration) -> Result<bool, BrokerError>;
    async fn release_leader(&self, lease: &Lease) -> Result<(), BrokerError>;
    /// Current holder's instance id.
    async fn leader(&self) -> Result<Option<String>, BrokerError>;
    /// Restaurants with saved poller state (what a new leader loads).
    async fn poller_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError>;
    async fn load_poller_state(
        &self,
        restaurants: &[RestaurantId],
    ) -> Result<PollerState, BrokerError>;
    /// Save progress, refused with [`BrokerError::Fenced`] under a stale lease.
    async fn save_poller_state(
        &self,
        lease: &Lease,
        delta: &PollerStateDelta,
    ) -> Result<(), BrokerError>;
}

/// Both halves, as the node holds them.
pub trait Backend: Broker + Cluster {}
impl<T: Broker + Cluster> Backend for T {}

/// Retry delays for reconnecting: exponential with full jitter, capped.
pub fn backoff(attempt: u32) -> Duration {
    let cap_ms = 5_000u64;
    let base = 100u64.saturating_mul(1u64 << attempt.min(10)).min(cap_ms);
    Duration::from_millis(rand::random_range(base / 2..=base))
}
