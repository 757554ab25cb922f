//! Snapshots, shared: one read per restaurant at a time, shared by every
//! socket of that restaurant waiting for it, serialized once.
//!
//! A `resync_required` broadcast makes every socket of a restaurant ask
//! for a snapshot at the same moment. Read one by one, a thousand sockets
//! took a thousand queries from the pool the poller also needs: ticks
//! failed and sockets closed with 1013. Here:
//!
//! - **Single flight per restaurant.** A socket shares a read that has not
//!   *started* yet; a read that already started may predate the socket's
//!   subscription and miss an event published in between, so sockets
//!   arriving during read N share read N+1, which starts when N ends. At
//!   most one read runs and one waits per restaurant.
//! - **Bounded across restaurants.** At most `max_reads` reads at once, so
//!   the rest of the database pool stays free for the poller and the
//!   membership lookups, whatever the number of restaurants resyncing.
//! - **Serialized once.** The `snapshot` frame is built once per read and
//!   shared (reference-counted bytes) by every socket sending it, with the
//!   versions the seam needs.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use uuid::Uuid;

use crate::domain::{EventId, Order, RestaurantId, SnapshotSource};
use crate::node::Node;

/// One read's result, shared by the sockets that waited for it.
#[derive(Debug)]
pub struct Snapshot {
    /// The whole `snapshot` frame (UTF-8 JSON), serialized once.
    pub frame: Bytes,
    /// Order id → `updated_at` (µs) of every order shown: the seam drops
    /// events for versions the snapshot already shows.
    pub versions: Arc<HashMap<Uuid, i64>>,
    /// The newest event id before the read: events after it are live.
    pub last_event_id: Option<EventId>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SnapshotError {
    /// The broker could not say where the event stream stands.
    #[error("broker: {0}")]
    Broker(String),
    /// The orders database failed, timed out, or the read panicked.
    #[error("snapshot source: {0}")]
    Source(String),
}

type Outcome = Result<Arc<Snapshot>, SnapshotError>;

/// A read that gives up is a 1013 for its sockets, not a stuck restaurant.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Snapshots {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn SnapshotSource>,
    node: Node,
    /// Reads running at once, across restaurants (see module doc).
    reads: Semaphore,
    /// Per restaurant, the read sockets may still join. A std mutex: held
    /// for map edits only, never across an await.
    flights: Mutex<HashMap<RestaurantId, Entry>>,
}

struct Entry {
    /// The read not started yet; sockets asking now share it.
    waiting: Option<watch::Receiver<Option<Outcome>>>,
    /// Taken by a read for its whole run: one read per restaurant at a time.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Reads alive (waiting or running); the entry goes at zero.
    alive: usize,
}

#[derive(Serialize)]
struct SnapshotFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    orders: &'a [Order],
    last_event_id: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every edit is a single insert/remove/assignment: a panic cannot leave
    // the map half-changed, so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Snapshots {
    pub fn new(source: Arc<dyn SnapshotSource>, node: Node, max_reads: usize) -> Snapshots {
        Snapshots {
            inner: Arc::new(Inner {
                source,
                node,
                reads: Semaphore::new(max_reads.max(1)),
                flights: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A snapshot of `r` read after this call began. Call it only once the
    /// socket is subscribed: then every event is in the snapshot or after it.
    pub async fn get(&self, r: RestaurantId) -> Outcome {
        let mut rx = {
            let mut flights = lock(&self.inner.flights);
            let entry = flights.entry(r).or_insert_with(|| Entry {
                waiting: None,
                turn: Arc::new(tokio::sync::Mutex::new(())),
                alive: 0,
            });
            match &entry.waiting {
                Some(rx) => {
                    metrics::counter!("orders_gateway_snapshot_shared_total").increment(1);
                    rx.clone()
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    entry.waiting = Some(rx.clone());
                    entry.alive += 1;
                    let turn = entry.turn.clone();
                    // Its own task: the read outlives any one waiting socket.
                    tokio::spawn(self.inner.clone().fly(r, turn, tx));
                    rx
                }
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for Some"),
            // `fly` always sends before it ends; this is a runtime shutdown.
            Err(_) => Err(SnapshotError::Source("snapshot read abandoned".into())),
        }
    }
}

impl Inner {
    async fn fly(
        self: Arc<Self>,
        r: RestaurantId,
        turn: Arc<tokio::sync::Mutex<()>>,
        tx: watch::Sender<Option<Outcome>>,
    ) {
        let turn = turn.lock_owned().await;
        let permit = self.reads.acquire().await;
        // Started: from now on a socket asking must wait for the next read.
        if let Some(entry) = lock(&self.flights).get_mut(&r) {
            entry.waiting = None;
        }
        let outcome = AssertUnwindSafe(tokio::time::timeout(READ_TIMEOUT, self.read(r)))
            .catch_unwind()
            .await;
        let outcome = match outcome {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(SnapshotError::Source("snapshot read timed out".into())),
            Err(_) => {
                metrics::counter!("orders_gateway_task_panics_total", "task" => "snapshot")
                    .increment(1);
                tracing::error!(restaurant_id = %r, "snapshot read panicked");
                Err(SnapshotError::Source("snapshot read failed".into()))
            }
        };
        if let Err(e) = &outcome {
            metrics::counter!("orders_gateway_snapshot_reads_failed_total").increment(1);
            tracing::warn!(restaurant_id = %r, error = %e, "snapshot failed");
        }
        drop(permit);
        drop(turn);
        tx.send_replace(Some(outcome));
        let mut flights = lock(&self.flights);
        if let Some(entry) = flights.get_mut(&r) {
            entry.alive -= 1;
            if entry.alive == 0 {
                flights.remove(&r);
            }
        }
    }

    async fn read(&self, r: RestaurantId) -> Outcome {
        // The cursor first: an event published during the query is either
        // in the rows or after the cursor (the seam drops its copy).
        let last = self
            .node
            .last_event_id(r)
            .await
            .map_err(|e| SnapshotError::Broker(e.to_string()))?;
        let orders = self
            .source
            .open_orders(r)
            .await
            .map_err(SnapshotError::Source)?;
        metrics::counter!("orders_gateway_snapshot_reads_total").increment(1);
        let versions = Arc::new(
            orders
                .iter()
                .map(|o| (o.id, o.updated_at.timestamp_micros()))
                .collect(),
        );
        let frame = serde_json::to_vec(&SnapshotFrame {
            kind: "snapshot",
            orders: &orders,
            last_event_id: last.map(|id| id.to_string()),
        })
        .map_err(|e| SnapshotError::Source(format!("cannot serialize: {e}")))?;
        Ok(Arc::new(Snapshot {
            frame: Bytes::from(frame),
            versions,
            last_event_id: last,
        }))
    }
}
