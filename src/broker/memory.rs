//! The embedded broker: everything in this process. Used when `REDIS_URL`
//! is unset, which limits the deployment to one replica. Same semantics as
//! the Redis broker (numbering, dedup, history limits, fencing), checked by
//! the same conformance suite.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Mutex, mpsc};

use super::{
    Broker, BrokerError, Cluster, ConnectionRecord, Cursor, History, Inbound, Lease, PollerState,
    PollerStateDelta, PublishRequest, Published,
};
use crate::config::HistoryLimits;
use crate::domain::{EventId, RestaurantId, stamp_event_id};

/// How many order versions the embedded broker remembers for deduplication.
const DEDUP_CAPACITY: usize = 100_000;
const DEDUP_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct MemoryBroker {
    /// A tokio mutex because publishing hands the frame to the inbound queue
    /// while numbering is still exclusive: that is what keeps delivery in
    /// event-id order.
    state: Mutex<State>,
    inbound: mpsc::Sender<Inbound>,
    limits: HistoryLimits,
}

#[derive(Default)]
struct State {
    subscribed: HashSet<RestaurantId>,
    histories: HashMap<RestaurantId, RestaurantHistory>,
    /// Newest published version (`updated_at` µs) of each order, its event
    /// id and when the entry expires.
    dedup: HashMap<(RestaurantId, uuid::Uuid), (i64, EventId, Instant)>,
    dedup_order: VecDeque<(RestaurantId, uuid::Uuid)>,
    connections: HashMap<uuid::Uuid, (ConnectionRecord, Instant)>,
    instances: HashMap<String, Instant>,
    leader: Option<(String, Instant)>,
    leader_epoch: u64,
    poller: PollerState,
}

struct RestaurantHistory {
    epoch: u64,
    seq: u64,
    /// Seq of the newest event trimmed away (0: none).
    floor: u64,
    last_at: Instant,
    events: VecDeque<(u64, Instant, Utf8Bytes)>,
}

fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis() as u64
}

impl MemoryBroker {
    pub fn new(inbound: mpsc::Sender<Inbound>, limits: HistoryLimits) -> MemoryBroker {
        MemoryBroker {
            state: Mutex::new(State::default()),
            inbound,
            limits,
        }
    }
}

impl State {
    fn history(
        &mut self,
        r: RestaurantId,
        limits: HistoryLimits,
    ) -> Option<&mut RestaurantHistory> {
        let expired = self
            .histories
            .get(&r)
            .is_some_and(|h| h.last_at.elapsed() > limits.max_age);
        if expired {
            self.histories.remove(&r);
        }
        let h = self.histories.get_mut(&r)?;
        while h
            .events
            .front()
            .is_some_and(|(_, at, _)| at.elapsed() > limits.max_age)
        {
            if let Some((seq, _, _)) = h.events.pop_front() {
                h.floor = seq;
            }
        }
        Some(h)
    }

    fn remember(&mut self, key: (RestaurantId, uuid::Uuid), micros: i64, id: EventId) {
        if self.dedup.len() >= DEDUP_CAPACITY
            && let Some(old) = self.dedup_order.pop_front()
        {
            self.dedup.remove(&old);
        }
        if !self.dedup.contains_key(&key) {
            self.dedup_order.push_back(key);
        }
        self.dedup
            .insert(key, (micros, id, Instant::now() + DEDUP_TTL));
    }

    fn leader_token(&mut self) -> Option<&str> {
        if self
            .leader
            .as_ref()
            .is_some_and(|(_, exp)| *exp <= Instant::now())
        {
            self.leader = None;
        }
        self.leader.as_ref().map(|(t, _)| t.as_str())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn subscribe(&self, r: RestaurantId) -> Result<(), BrokerError> {
        self.state.lock().await.subscribed.insert(r);
        Ok(())
    }

    async fn unsubscribe(&self, r: RestaurantId) -> Result<(), BrokerError> {
        self.state.lock().await.subscribed.remove(&r);
        Ok(())
    }

    async fn publish(&self, req: PublishRequest) -> Result<Published, BrokerError> {
        let mut st = self.state.lock().await;
        if let Some(fence) = &req.fence
            && st.leader_token() != Some(fence.as_str())
        {
            return Err(BrokerError::Fenced);
        }
        let key = req.version.map(|v| (req.restaurant, v.order_id));
        if let (Some(key), Some(v)) = (&key, req.version)
            && let Some((micros, id, exp)) = st.dedup.get(key)
            && *exp > Instant::now()
            && *micros >= v.updated_at_micros
        {
            return Ok(Published {
                event_id: *id,
                duplicate: true,
            });
        }
        let limits = self.limits;
        if st.history(req.restaurant, limits).is_none() {
            st.histories.insert(
                req.restaurant,
                RestaurantHistory {
                    epoch: now_ms(),
                    seq: 0,
                    floor: 0,
                    last_at: Instant::now(),
                    events: VecDeque::new(),
                },
            );
        }
        let h = st
            .histories
            .get_mut(&req.restaurant)
            .expect("inserted above");
        h.seq += 1;
        h.last_at = Instant::now();
        let id = EventId {
            epoch: h.epoch,
            seq: h.seq,
        };
        let frame = Utf8Bytes::from(stamp_event_id(&req.body, id));
        h.events.push_back((h.seq, Instant::now(), frame.clone()));
        while h.events.len() as u64 > limits.max_events {
            if let Some((seq, _, _)) = h.events.pop_front() {
                h.floor = seq;
            }
        }
        if let (Some(key), Some(v)) = (key, req.version) {
            st.remember(key, v.updated_at_micros, id);
        }
        if st.subscribed.contains(&req.restaurant) {
            let msg = Inbound::Event {
                restaurant: req.restaurant,
                payload: frame,
            };
            // Waits when the node is behind; the lock keeps event order.
            let _ = self.inbound.send(msg).await;
        }
        Ok(Published {
            event_id: id,
            duplicate: false,
        })
    }

    async fn history_after(&self, r: RestaurantId, after: Cursor) -> Result<History, BrokerError> {
        let mut st = self.state.lock().await;
        let Some(h) = st.history(r, self.limits) else {
            return Ok(match after {
                Cursor::Empty { .. } => History::Events(Vec::new()),
                Cursor::After(_) => History::Gone,
            });
        };
        let after_seq = match after {
            Cursor::Empty { at_ms } => {
                if (h.epoch as i64) < at_ms || h.floor != 0 {
                    return Ok(History::Gone);
                }
                0
            }
            Cursor::After(id) => {
                if id.epoch != h.epoch || id.seq > h.seq || id.seq < h.floor {
                    return Ok(History::Gone);
                }
                id.seq
            }
        };
        Ok(History::Events(
            h.events
                .iter()
                .filter(|(s, _, _)| *s > after_seq)
                .map(|(_, _, f)| f.clone())
                .collect(),
        ))
    }

    async fn position(&self, r: RestaurantId) -> Result<Cursor, BrokerError> {
        let mut st = self.state.lock().await;
        Ok(match st.history(r, self.limits) {
            Some(h) => Cursor::After(EventId {
                epoch: h.epoch,
                seq: h.seq,
            }),
            None => Cursor::Empty {
                at_ms: now_ms() as i64,
            },
        })
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

#[async_trait]
impl Cluster for MemoryBroker {
    async fn add_connection(&self, c: &ConnectionRecord, ttl: Duration) -> Result<(), BrokerError> {
        let mut st = self.state.lock().await;
        st.connections
            .insert(c.connection_id, (c.clone(), Instant::now() + ttl));
        st.instances
            .entry(c.instance_id.clone())
            .or_insert(Instant::now() + ttl);
        Ok(())
    }

    async fn remove_connection(&self, c: &ConnectionRecord) -> Result<(), BrokerError> {
        self.state.lock().await.connections.remove(&c.connection_id);
        Ok(())
    }

    async fn heartbeat(
        &self,
        instance_id: &str,
        connections: &[ConnectionRecord],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let mut st = self.state.lock().await;
        let until = Instant::now() + ttl;
        st.instances.insert(instance_id.to_string(), until);
        for c in connections {
            st.connections.insert(c.connection_id, (c.clone(), until));
        }
        let now = Instant::now();
        st.connections.retain(|_, (_, exp)| *exp > now);
        st.instances.retain(|_, exp| *exp > now);
        Ok(())
    }

    async fn remove_instance(
        &self,
        instance_id: &str,
        connections: &[ConnectionRecord],
    ) -> Result<(), BrokerError> {
        let mut st = self.state.lock().await;
        st.instances.remove(instance_id);
        for c in connections {
            st.connections.remove(&c.connection_id);
        }
        Ok(())
    }

    async fn connections(&self, r: RestaurantId) -> Result<Vec<ConnectionRecord>, BrokerError> {
        let st = self.state.lock().await;
        let now = Instant::now();
        let mut out: Vec<_> = st
            .connections
            .values()
            .filter(|(c, exp)| c.restaurant_id == r && *exp > now)
            .map(|(c, _)| c.clone())
            .collect();
        out.sort_by_key(|c| c.connected_at);
        Ok(out)
    }

    async fn live_instances(&self) -> Result<usize, BrokerError> {
        let st = self.state.lock().await;
        let now = Instant::now();
        Ok(st.instances.values().filter(|exp| **exp > now).count())
    }

    async fn active_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError> {
        let st = self.state.lock().await;
        let now = Instant::now();
        let set: HashSet<_> = st
            .connections
            .values()
            .filter(|(_, exp)| *exp > now)
            .map(|(c, _)| c.restaurant_id)
            .collect();
        Ok(set.into_iter().collect())
    }

    async fn try_acquire_leader(
        &self,
        instance_id: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, BrokerError> {
        let mut st = self.state.lock().await;
        if st.leader_token().is_some() {
            return Ok(None);
        }
        st.leader_epoch += 1;
        let lease = Lease::new(st.leader_epoch, instance_id);
        st.leader = Some((lease.token.clone(), Instant::now() + ttl));
        Ok(Some(lease))
    }

    async fn renew_leader(&self, lease: &Lease, ttl: Duration) -> Result<bool, BrokerError> {
        let mut st = self.state.lock().await;
        if st.leader_token() == Some(lease.token.as_str()) {
            st.leader = Some((lease.token.clone(), Instant::now() + ttl));
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn release_leader(&self, lease: &Lease) -> Result<(), BrokerError> {
        let mut st = self.state.lock().await;
        if st.leader_token() == Some(lease.token.as_str()) {
            st.leader = None;
        }
        Ok(())
    }

    async fn leader(&self) -> Result<Option<String>, BrokerError> {
        let mut st = self.state.lock().await;
        Ok(st.leader_token().and_then(Lease::holder_of))
    }

    async fn poller_restaurants(&self) -> Result<Vec<RestaurantId>, BrokerError> {
        let st = self.state.lock().await;
        Ok(st.poller.restaurants.keys().copied().collect())
    }

    async fn load_poller_state(
        &self,
        restaurants: &[RestaurantId],
    ) -> Result<PollerState, BrokerError> {
        let st = self.state.lock().await;
        Ok(PollerState {
            cursor_micros: st.poller.cursor_micros,
            last_poll_ms: st.poller.last_poll_ms,
            restaurants: restaurants
                .iter()
                .filter_map(|r| st.poller.restaurants.get(r).map(|m| (*r, m.clone())))
                .collect(),
        })
    }

    async fn save_poller_state(
        &self,
        lease: &Lease,
        delta: &PollerStateDelta,
    ) -> Result<(), BrokerError> {
        let mut st = self.state.lock().await;
        if st.leader_token() != Some(lease.token.as_str()) {
            return Err(BrokerError::Fenced);
        }
        st.poller.cursor_micros = Some(delta.cursor_micros);
        st.poller.last_poll_ms = Some(delta.last_poll_ms);
        for (r, fields) in &delta.changes {
            let map = st.poller.restaurants.entry(*r).or_default();
            for (k, v) in fields {
                match v {
                    Some(v) => map.insert(k.clone(), v.clone()),
                    None => map.remove(k),
                };
            }
            if map.is_empty() {
                st.poller.restaurants.remove(r);
            }
        }
        Ok(())
    }
}
