//! The hub: this replica's sockets, grouped by restaurant. It fans a frame
//! out to the local sockets of one restaurant and nothing else; it knows
//! neither Redis nor SQL nor axum.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::{Frame, RestaurantId};

const SHARDS: usize = 32;

/// The hub's handle on one socket.
#[derive(Clone)]
pub struct Member {
    pub connection_id: Uuid,
    /// Bounded: a socket that cannot keep up is cut off, never buffered for.
    /// Shared frames: a queue slot is one pointer, not a whole `Frame`
    /// (tokio allocates a channel's first 32 slots up front, per socket).
    pub queue: mpsc::Sender<Arc<Frame>>,
    /// Cancelled by the hub when `queue` overflows; the session closes with 4408.
    pub overflowed: CancellationToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("connection limit of this replica reached")]
    ReplicaFull,
    #[error("connection limit of this restaurant reached")]
    RestaurantFull,
}

/// Outcome of a fan-out, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    pub delivered: usize,
    pub overflowed: usize,
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// Sharded so that fan-out to one restaurant does not block joins and
    /// fan-outs of restaurants in other shards. A std mutex: it is held only
    /// for map edits and non-blocking `try_send`s, never across an await.
    shards: Vec<Mutex<HashMap<RestaurantId, Vec<Member>>>>,
    total: AtomicUsize,
    max_total: usize,
    max_per_restaurant: usize,
}

impl Hub {
    pub fn new(max_total: usize, max_per_restaurant: usize) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                total: AtomicUsize::new(0),
                max_total,
                max_per_restaurant,
            }),
        }
    }

    fn shard(&self, r: RestaurantId) -> MutexGuard<'_, HashMap<RestaurantId, Vec<Member>>> {
        let idx = (r.0.as_u128() % SHARDS as u128) as usize;
        // A panic while holding the lock cannot leave the map inconsistent
        // (every edit is a single push/remove), so poisoning is ignored.
        self.inner.shards[idx]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Add a socket. Returns true when it is the restaurant's first local socket.
    pub fn join(&self, r: RestaurantId, member: Member) -> Result<bool, JoinError> {
        let inner = &self.inner;
        if inner
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max_total).then_some(n + 1)
            })
            .is_err()
        {
            return Err(JoinError::ReplicaFull);
        }
        let mut shard = self.shard(r);
        let members = shard.entry(r).or_default();
        if members.len() >= inner.max_per_restaurant {
            let now_empty = members.is_empty();
            if now_empty {
                shard.remove(&r);
            }
            inner.total.fetch_sub(1, Ordering::AcqRel);
            return Err(JoinError::RestaurantFull);
        }
        members.push(member);
        Ok(members.len() == 1)
    }

    /// Remove a socket. Returns true when the restaurant has no local socket left.
    pub fn leave(&self, r: RestaurantId, connection_id: Uuid) -> bool {
        let mut shard = self.shard(r);
        let Some(members) = shard.get_mut(&r) else {
            return true;
        };
        if let Some(pos) = members
            .iter()
            .position(|m| m.connection_id == connection_id)
        {
            members.swap_remove(pos);
            self.inner.total.fetch_sub(1, Ordering::AcqRel);
        }
        if members.is_empty() {
            shard.remove(&r);
            true
        } else {
            false
        }
    }

    /// Queue `frame` for every local socket of `r`. A socket whose queue is
    /// full is told to close (4408); the others are not slowed down by it.
    pub fn broadcast(&self, r: RestaurantId, frame: &Frame) -> Fanout {
        let shard = self.shard(r);
        let mut out = Fanout::default();
        if let Some(members) = shard.get(&r) {
            let frame = Arc::new(frame.clone());
            for m in members {
                match m.queue.try_send(frame.clone()) {
                    Ok(()) => out.delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if !m.overflowed.is_cancelled() {
                            m.overflowed.cancel();
                            out.overflowed += 1;
                        }
                    }
                    // The session is on its way out and will leave.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        out
    }

    pub fn connections(&self) -> usize {
        self.inner.total.load(Ordering::Acquire)
    }

    pub fn restaurant_connections(&self, r: RestaurantId) -> usize {
        self.shard(r).get(&r).map_or(0, Vec::len)
    }

    /// Restaurants with at least one local socket.
    pub fn restaurants(&self) -> Vec<RestaurantId> {
        let mut out = Vec::new();
        for idx in 0..SHARDS {
            let shard = self.inner.shards[idx]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            out.extend(shard.keys().copied());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(cap: usize) -> (Member, mpsc::Receiver<Arc<Frame>>) {
        let (tx, rx) = mpsc::channel(cap);
        (
            Member {
                connection_id: Uuid::new_v4(),
                queue: tx,
                overflowed: CancellationToken::new(),
            },
            rx,
        )
    }

    fn frame(n: u32) -> Frame {
        Frame::control(&serde_json::json!({ "type": "t", "n": n }))
    }

    #[test]
    fn fan_out_reaches_only_the_restaurant_and_cuts_off_slow_members() {
        let hub = Hub::new(10, 10);
        let a = RestaurantId(Uuid::new_v4());
        let b = RestaurantId(Uuid::new_v4());
        let (fast, mut fast_rx) = member(100);
        let (slow, _slow_rx) = member(1);
        let (other, mut other_rx) = member(100);
        assert!(hub.join(a, fast.clone()).unwrap());
        assert!(!hub.join(a, slow.clone()).unwrap());
        assert!(hub.join(b, other).unwrap());

        assert_eq!(
            hub.broadcast(a, &frame(1)),
            Fanout {
                delivered: 2,
                overflowed: 0
            }
        );
        assert_eq!(
            hub.broadcast(a, &frame(2)),
            Fanout {
                delivered: 1,
                overflowed: 1
            }
        );
        assert!(slow.overflowed.is_cancelled());
        assert!(!fast.overflowed.is_cancelled());
        assert_eq!(
            fast_rx.try_recv().unwrap().text.as_str(),
            r#"{"n":1,"type":"t"}"#
        );
        assert!(fast_rx.try_recv().is_ok());
        assert!(other_rx.try_recv().is_err());

        assert!(!hub.leave(a, slow.connection_id));
        assert!(hub.leave(a, fast.connection_id));
        assert_eq!(hub.connections(), 1);
    }

    #[test]
    fn limits_are_enforced_per_replica_and_per_restaurant() {
        let hub = Hub::new(3, 2);
        let a = RestaurantId(Uuid::new_v4());
        let b = RestaurantId(Uuid::new_v4());
        hub.join(a, member(1).0).unwrap();
        hub.join(a, member(1).0).unwrap();
        assert_eq!(hub.join(a, member(1).0), Err(JoinError::RestaurantFull));
        hub.join(b, member(1).0).unwrap();
        assert_eq!(hub.join(b, member(1).0), Err(JoinError::ReplicaFull));
        assert_eq!(hub.connections(), 3);
    }
}
