//! The node: this replica's hub wired to the broker. It subscribes to a
//! restaurant's channel when its first local socket arrives and drops the
//! subscription lazily after the last one leaves; it turns every received
//! payload into one shared [`Frame`] for the hub; it keeps this replica's
//! sockets registered in the cluster view.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{
    Backend, BrokerError, ConnectionRecord, Cursor, History, Inbound, PublishRequest, Published,
};
use crate::domain::{EventId, Frame, RestaurantId};
use crate::hub::{Hub, JoinError, Member};

/// Connections refreshed per presence pipeline.
const HEARTBEAT_SLICE: usize = 250;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Full(#[from] JoinError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Hub,
    backend: Arc<dyn Backend>,
    instance_id: String,
    presence_ttl: Duration,
    /// Per restaurant, an async lock around "is the channel subscribed":
    /// joins and the lazy unsubscribe sweep take it so that a SUBSCRIBE and
    /// an UNSUBSCRIBE of one channel never overtake each other. The outer
    /// std mutex only guards the map.
    subscriptions: Mutex<HashMap<RestaurantId, Arc<tokio::sync::Mutex<bool>>>>,
    /// This replica's sockets as the cluster sees them, for heartbeats.
    local: Mutex<HashMap<Uuid, ConnectionRecord>>,
    /// Per subscribed restaurant, the stream position this replica has
    /// dispatched up to: taken right after subscribing, advanced by every
    /// numbered event. After a pub/sub reconnect, what came later is
    /// fetched from history. A restaurant without one is told to resync.
    positions: Mutex<HashMap<RestaurantId, Cursor>>,
    /// Per restaurant, the newest version of each order dispatched: an
    /// equal or older version is never dispatched again (a publisher that
    /// lost its dedup state, a lagging poller).
    versions: Mutex<HashMap<RestaurantId, VersionLog>>,
    /// Cancelled once this replica has been without Redis for the
    /// configured time (its sockets close with 1013, joins are refused);
    /// replaced by a fresh token when Redis is back.
    broker_lost: Mutex<CancellationToken>,
}

/// Order versions dispatched for one restaurant, bounded: the oldest
/// entries are forgotten first.
#[derive(Default)]
struct VersionLog {
    newest: HashMap<Uuid, i64>,
    order: std::collections::VecDeque<Uuid>,
}

/// Orders remembered per restaurant by [`VersionLog`]; a day of a busy
/// restaurant, about 40 bytes each.
const VERSIONS_PER_RESTAURANT: usize = 4096;

impl VersionLog {
    /// Record `v` unless an equal or newer version was dispatched already.
    fn admit(&mut self, v: crate::domain::OrderVersion) -> bool {
        match self.newest.get_mut(&v.order_id) {
            Some(seen) if *seen >= v.updated_at_micros => false,
            Some(seen) => {
                *seen = v.updated_at_micros;
                true
            }
            None => {
                if self.order.len() >= VERSIONS_PER_RESTAURANT
                    && let Some(old) = self.order.pop_front()
                {
                    self.newest.remove(&old);
                }
                self.order.push_back(v.order_id);
                self.newest.insert(v.order_id, v.updated_at_micros);
                true
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    pub fn new(
        hub: Hub,
        backend: Arc<dyn Backend>,
        instance_id: String,
        presence_ttl: Duration,
    ) -> Node {
        Node {
            inner: Arc::new(Inner {
                hub,
                backend,
                instance_id,
                presence_ttl,
                subscriptions: Mutex::new(HashMap::new()),
                local: Mutex::new(HashMap::new()),
                positions: Mutex::new(HashMap::new()),
                versions: Mutex::new(HashMap::new()),
                broker_lost: Mutex::new(CancellationToken::new()),
            }),
        }
    }

    /// Cancelled while this replica counts as having lost Redis (see
    /// [`Node::watch_broker`]); sockets close with 1013 when it is.
    pub fn broker_lost(&self) -> CancellationToken {
        lock(&self.inner.broker_lost).clone()
    }

    /// Every second, ask the broker whether it works (commands and the
    /// pub/sub link's liveness probe). Failing for `limit` in a row: cancel
    /// [`Node::broker_lost`] — every socket closes with 1013 and joins are
    /// refused, so dashboards reconnect through the load balancer to a
    /// replica that still delivers (this one fails `/readyz` meanwhile) and
    /// resume from their `last_event_id`. Working again: a fresh token.
    pub async fn watch_broker(&self, limit: Duration, shutdown: CancellationToken) {
        const EVERY: Duration = Duration::from_secs(1);
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ok = matches!(
                tokio::time::timeout(EVERY * 3, self.inner.backend.ping()).await,
                Ok(Ok(()))
            );
            if ok {
                failing_since = None;
                let mut lost = lock(&self.inner.broker_lost);
                if lost.is_cancelled() {
                    *lost = CancellationToken::new();
                    tracing::info!("Redis works again: accepting sockets");
                }
                continue;
            }
            let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
            let lost = lock(&self.inner.broker_lost);
            if since.elapsed() >= limit && !lost.is_cancelled() {
                tracing::error!(
                    after_ms = limit.as_millis() as u64,
                    sockets = self.inner.hub.connections(),
                    "Redis lost: closing this replica's sockets with 1013 until it is back"
                );
                metrics::counter!("orders_gateway_broker_lost_total").increment(1);
                lost.cancel();
            }
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Register a socket. When this returns Ok, every event published on the
    /// restaurant's channel from now on reaches `member.queue`.
    pub async fn join(&self, record: ConnectionRecord, member: Member) -> Result<(), NodeError> {
        let r = record.restaurant_id;
        let connection_id = member.connection_id;
        if self.broker_lost().is_cancelled() {
            return Err(NodeError::Broker(BrokerError::Unavailable(
                "this replica lost Redis".into(),
            )));
        }
        self.inner.hub.join(r, member)?;
        if let Err(e) = self.ensure_subscribed(r).await {
            self.inner.hub.leave(r, connection_id);
            return Err(e.into());
        }
        metrics::gauge!("orders_gateway_connections").set(self.inner.hub.connections() as f64);
        lock(&self.inner.local).insert(connection_id, record.clone());
        if let Err(e) = self
            .inner
            .backend
            .add_connection(&record, self.inner.presence_ttl)
            .await
        {
            // The next heartbeat registers it.
            tracing::warn!(error = %e, "could not register connection in the cluster view");
        }
        Ok(())
    }

    pub async fn leave(&self, r: RestaurantId, connection_id: Uuid) {
        self.inner.hub.leave(r, connection_id);
        metrics::gauge!("orders_gateway_connections").set(self.inner.hub.connections() as f64);
        let record = lock(&self.inner.local).remove(&connection_id);
        if let Some(record) = record
            && let Err(e) = self.inner.backend.remove_connection(&record).await
        {
            tracing::debug!(error = %e, "could not deregister connection; it expires");
        }
    }

    fn subscription(&self, r: RestaurantId) -> Arc<tokio::sync::Mutex<bool>> {
        lock(&self.inner.subscriptions)
            .entry(r)
            .or_default()
            .clone()
    }

    async fn ensure_subscribed(&self, r: RestaurantId) -> Result<(), BrokerError> {
        let cell = self.subscription(r);
        let mut subscribed = cell.lock().await;
        if !*subscribed {
            self.inner.backend.subscribe(r).await?;
            *subscribed = true;
            // Read after subscribing: whatever is published later arrives
            // on the link, or is in history after this position.
            match self.inner.backend.position(r).await {
                Ok(p) => {
                    lock(&self.inner.positions).insert(r, p);
                }
                Err(e) => {
                    tracing::warn!(restaurant_id = %r, error = %e, "could not read the stream position");
                }
            }
        }
        Ok(())
    }

    /// Unsubscribe channels whose restaurant has had no local socket since
    /// the previous sweep (lazy: a dashboard reloading does not churn).
    async fn sweep_subscriptions(&self, idle: &mut HashMap<RestaurantId, u32>) {
        let candidates: Vec<(RestaurantId, Arc<tokio::sync::Mutex<bool>>)> =
            lock(&self.inner.subscriptions)
                .iter()
                .map(|(r, c)| (*r, c.clone()))
                .collect();
        for (r, cell) in candidates {
            if self.inner.hub.restaurant_connections(r) > 0 {
                idle.remove(&r);
                continue;
            }
            let rounds = idle.entry(r).or_insert(0);
            *rounds += 1;
            if *rounds < 2 {
                continue;
            }
            let mut subscribed = cell.lock().await;
            // Re-checked under the lock: a join may have arrived meanwhile.
            if self.inner.hub.restaurant_connections(r) > 0 {
                continue;
            }
            if *subscribed && self.inner.backend.unsubscribe(r).await.is_ok() {
                *subscribed = false;
            }
            if !*subscribed {
                drop(subscribed);
                idle.remove(&r);
                let mut map = lock(&self.inner.subscriptions);
                // Only this sweep and the map hold it: nobody is joining.
                if map.get(&r).is_some_and(|c| Arc::strong_count(c) == 2) {
                    map.remove(&r);
                    lock(&self.inner.positions).remove(&r);
                    lock(&self.inner.versions).remove(&r);
                }
            }
        }
    }

    pub async fn publish(&self, req: PublishRequest) -> Result<Published, BrokerError> {
        self.inner.backend.publish(req).await
    }

    pub async fn history_after(
        &self,
        r: RestaurantId,
        after: EventId,
    ) -> Result<History, BrokerError> {
        self.inner
            .backend
            .history_after(r, Cursor::After(after))
            .await
    }

    /// The id of the restaurant's newest event, if it has a history.
    pub async fn last_event_id(&self, r: RestaurantId) -> Result<Option<EventId>, BrokerError> {
        Ok(match self.inner.backend.position(r).await? {
            Cursor::After(id) => Some(id),
            Cursor::Empty { .. } => None,
        })
    }

    /// Fan received payloads out to the hub until the broker goes away.
    pub async fn dispatch(&self, mut inbound: mpsc::Receiver<Inbound>) {
        while let Some(msg) = inbound.recv().await {
            match msg {
                Inbound::Event {
                    restaurant,
                    payload,
                } => self.dispatch_one(restaurant, payload),
                Inbound::Resubscribed => self.fill_gaps().await,
            }
        }
    }

    fn dispatch_one(&self, r: RestaurantId, payload: axum::extract::ws::Utf8Bytes) {
        metrics::counter!("orders_gateway_events_received_total").increment(1);
        let frame = match Frame::parse(r, payload) {
            Ok(f) => f,
            Err(e) => {
                metrics::counter!("orders_gateway_events_rejected_total").increment(1);
                tracing::warn!(restaurant_id = %r, error = %e, "dropped an invalid event");
                return;
            }
        };
        if let Some(v) = frame.version
            && !lock(&self.inner.versions).entry(r).or_default().admit(v)
        {
            metrics::counter!("orders_gateway_events_stale_dropped_total").increment(1);
            return;
        }
        if let Some(id) = frame.event_id {
            let mut positions = lock(&self.inner.positions);
            let p = positions.entry(r).or_insert(Cursor::After(id));
            match p {
                Cursor::After(newest) if *newest >= id => {}
                _ => *p = Cursor::After(id),
            }
        }
        if let Some(at) = frame.published_at {
            let age = (chrono::Utc::now() - at)
                .num_microseconds()
                .unwrap_or(i64::MAX);
            // Replays after an outage are old by design; count live ones.
            if (0..60_000_000).contains(&age) {
                metrics::histogram!("orders_gateway_delivery_latency_seconds")
                    .record(age as f64 / 1e6);
            }
        }
        let out = self.inner.hub.broadcast(r, &frame);
        metrics::counter!("orders_gateway_messages_delivered_total")
            .increment(out.delivered as u64);
        if out.overflowed > 0 {
            metrics::counter!("orders_gateway_slow_client_closes_total")
                .increment(out.overflowed as u64);
        }
    }

    /// After the pub/sub connection was lost and restored, deliver what was
    /// published meanwhile; where history cannot tell, ask sockets to resync.
    /// A read that fails (a failover still settling: the slot map moving
    /// under the client) is retried in a few short rounds before its
    /// restaurant is told to resync: a resync costs every dashboard of the
    /// restaurant a snapshot, and a failover touches every restaurant of
    /// the shard at once.
    async fn fill_gaps(&self) {
        const ROUNDS: u32 = 3;
        let mut pending = self.inner.hub.restaurants();
        for round in 0..ROUNDS {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(200 << round)).await;
            }
            let mut failed = Vec::new();
            for r in pending {
                if let Err(e) = self.fill_gap(r).await {
                    if round + 1 == ROUNDS {
                        tracing::warn!(restaurant_id = %r, error = %e, "gap fill failed; asking sockets to resync");
                        let frame = Frame::resync(
                            "events may have been missed while the broker was unreachable",
                        );
                        self.inner.hub.broadcast(r, &frame);
                    } else {
                        failed.push(r);
                    }
                }
            }
            if failed.is_empty() {
                return;
            }
            pending = failed;
        }
    }

    /// One restaurant's gap: replayed, or a resync when history is gone;
    /// an error when history could not be read.
    async fn fill_gap(&self, r: RestaurantId) -> Result<(), BrokerError> {
        let position = lock(&self.inner.positions).get(&r).copied();
        let Some(position) = position else {
            // Subscribed without learning where the stream stood.
            let frame =
                Frame::resync("events may have been missed while the broker was unreachable");
            self.inner.hub.broadcast(r, &frame);
            return Ok(());
        };
        match self.inner.backend.history_after(r, position).await? {
            History::Events(frames) => {
                for f in frames {
                    self.dispatch_one(r, f);
                }
            }
            History::Gone => {
                let frame = Frame::resync("history was lost while the broker was unreachable");
                self.inner.hub.broadcast(r, &frame);
            }
        }
        Ok(())
    }

    /// Heartbeats and lazy unsubscribes, until shutdown.
    pub async fn maintain(&self, shutdown: CancellationToken) {
        let period = self.inner.presence_ttl / 4;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.heartbeat().await;
            self.sweep_subscriptions(&mut idle).await;
            metrics::gauge!("orders_gateway_restaurants")
                .set(self.inner.hub.restaurants().len() as f64);
        }
    }

    pub async fn heartbeat(&self) {
        let records: Vec<ConnectionRecord> = lock(&self.inner.local).values().cloned().collect();
        // In slices: building one pipeline for 10k sockets kept the worker
        // busy for ~20 ms, a stall every socket felt as delivery latency.
        // Each slice's round trip yields to the sockets in between.
        let mut slices: Vec<&[ConnectionRecord]> = records.chunks(HEARTBEAT_SLICE).collect();
        if slices.is_empty() {
            slices.push(&[]);
        }
        for slice in slices {
            if let Err(e) = self
                .inner
                .backend
                .heartbeat(&self.inner.instance_id, slice, self.inner.presence_ttl)
                .await
            {
                tracing::warn!(error = %e, "presence heartbeat failed");
                break;
            }
        }
        if let Ok(n) = self.inner.backend.live_instances().await {
            metrics::gauge!("orders_gateway_instances").set(n as f64);
        }
    }

    /// Remove this replica from the cluster view (clean shutdown).
    pub async fn deregister(&self) {
        let records: Vec<ConnectionRecord> = lock(&self.inner.local).values().cloned().collect();
        if let Err(e) = self
            .inner
            .backend
            .remove_instance(&self.inner.instance_id, &records)
            .await
        {
            tracing::warn!(error = %e, "could not deregister this replica; it expires");
        }
    }
}
