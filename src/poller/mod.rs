//! Change capture. Every replica runs a [`Poller`]; only the holder of the
//! leader lock works. Each tick: take the horizon, run one query over every
//! restaurant (whether or not a dashboard is open: one that returns resumes
//! from history), [`diff::diff`] against what was already reported, publish
//! the changes and deletions through the same atomic step as everyone else
//! (deduplicated by order version, fenced by the lease), and save progress
//! (fenced too). See docs/CHANGE_CAPTURE.md for why no commit is missed.
//! Between periodic ticks, [`wakeup`] ticks at once when a writer's trigger
//! notifies.

pub mod diff;
pub mod wakeup;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::{StreamExt, stream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{Backend, BrokerError, FieldEdits, Lease, PollerStateDelta, PublishRequest};
use crate::config::Config;
use crate::db::Database;
use crate::domain::{
    DeletedOrder, EventBody, EventKind, Order, OrderVersion, RestaurantId, format_timestamp,
};
use crate::tasks::Supervisor;
use diff::{Known, diff, published_micros};
use wakeup::{Cause, Wakeup};

/// Never look further back than this, even for an older open transaction
/// (an idle-in-transaction session must not make every tick re-read hours).
const MAX_LOOKBACK: Duration = Duration::from_secs(15 * 60);
/// The smallest re-read window used, whatever POLL_OVERLAP_MS says. A
/// transaction takes its start time (its rows' `updated_at`) a moment before
/// it shows up in pg_stat_activity; the overlap must cover that moment even
/// on a busy server, so it is never zero.
const MIN_OVERLAP: Duration = Duration::from_millis(250);
/// Publishes in flight at once during a tick.
const PUBLISH_CONCURRENCY: usize = 32;
/// Every this many poll intervals, the known open orders are checked
/// against the table: deletions in a schema without the tombstone trigger
/// (or by TRUNCATE, or an order moved to another restaurant) are reported
/// within this period (30 s at the default interval).
const RECONCILE_EVERY_TICKS: u32 = 15;
/// Yield to the scheduler every this many events prepared in a tick.
const YIELD_EVERY: usize = 256;

#[derive(Clone)]
pub struct Poller {
    db: Database,
    backend: Arc<dyn Backend>,
    instance_id: String,
    interval: Duration,
    ttl: Duration,
    overlap: Duration,
    /// `LISTEN` connection for the wake-up; `None`: periodic ticks only.
    listen_url: Option<String>,
    /// Where the lease renewer's and the listener's panics are recorded.
    tasks: Supervisor,
}

/// The leader's working memory; mirrored in the backend for failover.
#[derive(Default)]
struct Progress {
    /// Next poll reads rows written at or after this.
    cursor: Option<DateTime<Utc>>,
    /// Next *immediate* tick reads rows written at or after this: the same
    /// horizon without the POLL_OVERLAP_MS safety margin (MIN_OVERLAP
    /// only), so that a tick per notification reads what is new rather
    /// than the last ten seconds. Never saved; the periodic tick re-reads
    /// from `cursor` and catches whatever this one might have missed.
    fast_cursor: Option<DateTime<Utc>>,
    /// Per restaurant, every open order and the recently closed ones.
    known: HashMap<RestaurantId, HashMap<Uuid, Known>>,
    /// When the known open orders were last checked against the table.
    last_reconcile: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
enum TickError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
}

impl Poller {
    pub fn new(db: Database, backend: Arc<dyn Backend>, cfg: &Config, tasks: Supervisor) -> Poller {
        Poller {
            db,
            backend,
            instance_id: cfg.instance_id().to_string(),
            interval: cfg.poll_interval(),
            ttl: cfg.leader_ttl(),
            overlap: Duration::from_millis(cfg.poll_overlap_ms).max(MIN_OVERLAP),
            listen_url: cfg.listen_url().map(str::to_string),
            tasks,
        }
    }

    /// Compete for the lock; poll while holding it; release it on `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let retry = self.interval.min(self.ttl / 3);
        loop {
            let lease = match self
                .backend
                .try_acquire_leader(&self.instance_id, self.ttl)
                .await
            {
                Ok(Some(lease)) => Some(lease),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "leader election unavailable");
                    None
                }
            };
            if let Some(lease) = lease {
                tracing::info!(instance_id = %self.instance_id, "poller: became leader");
                metrics::counter!("orders_gateway_leader_changes_total").increment(1);
                metrics::gauge!("orders_gateway_poller_leader").set(1.0);
                self.lead(&lease, &stop).await;
                metrics::gauge!("orders_gateway_poller_leader").set(0.0);
                if stop.is_cancelled() {
                    let _ = self.backend.release_leader(&lease).await;
                    tracing::info!("poller: released leadership");
                    return;
                }
                tracing::warn!("poller: lost leadership");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Poll until the lease is lost or `stop`.
    async fn lead(&self, lease: &Lease, stop: &CancellationToken) {
        let lost = CancellationToken::new();
        let renewer = self.tasks.spawn_child(
            "poller_lease",
            renew(
                self.backend.clone(),
                lease.clone(),
                self.ttl,
                lost.clone(),
                stop.clone(),
            ),
        );
        let mut progress = Progress::default();
        let mut loaded = false;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_success = Instant::now();
        // The listener follows the lock: started here, stopped below.
        let mut wake = self
            .listen_url
            .clone()
            .map(|url| Wakeup::start(url, &self.tasks));
        loop {
            // A renewer that ended by panicking (recorded by the
            // Supervisor) renews no more: stop leading rather than wait
            // to be fenced.
            if renewer.is_finished() {
                break;
            }
            let cause = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = lost.cancelled() => break,
                _ = tick.tick() => Cause::Interval,
                _ = wakeup::wanted(wake.as_ref()) => Cause::Notify,
            };
            // Ticks run one at a time; this one covers every notification
            // received so far (its snapshot comes later).
            let cause = match (cause, wake.as_mut()) {
                (Cause::Interval, Some(w)) => {
                    w.clear();
                    Cause::Interval
                }
                (Cause::Interval, None) => Cause::Interval,
                (_, Some(w)) => w.take(),
                (c, None) => c,
            };
            let full = cause != Cause::Notify;
            let started = Instant::now();
            let outcome = async {
                if !loaded {
                    progress = self.load().await?;
                    loaded = true;
                }
                // Losing the lease mid-tick aborts the tick at once.
                tokio::select! {
                    r = self.tick(lease, &mut progress, full) => r,
                    _ = lost.cancelled() => Err(TickError::Broker(BrokerError::Fenced)),
                }
            }
            .await;
            match outcome {
                Ok(rows) => {
                    last_success = Instant::now();
                    metrics::counter!("orders_gateway_poller_ticks_total", "cause" => cause.label())
                        .increment(1);
                    metrics::counter!("orders_gateway_poller_rows_total").increment(rows as u64);
                    metrics::histogram!("orders_gateway_poller_tick_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                }
                Err(TickError::Broker(BrokerError::Fenced)) => {
                    tracing::warn!("poller: lease no longer current; stopping");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "poller: tick failed; will retry");
                    // Progress in memory may be ahead of what was saved.
                    loaded = false;
                }
            }
            metrics::gauge!("orders_gateway_poller_lag_seconds")
                .set(last_success.elapsed().as_secs_f64());
        }
        if let Some(w) = wake {
            w.stop().await;
        }
        lost.cancel();
        let _ = renewer.await;
    }

    /// Restore progress saved by a previous leader: the cursor and what is
    /// known of every restaurant that has saved state.
    async fn load(&self) -> Result<Progress, TickError> {
        let restaurants = self.backend.poller_restaurants().await?;
        let saved = self.backend.load_poller_state(&restaurants).await?;
        let mut progress = Progress {
            cursor: saved
                .cursor_micros
                .and_then(DateTime::<Utc>::from_timestamp_micros),
            ..Progress::default()
        };
        for (r, fields) in saved.restaurants {
            // Fields that are not order ids (`_watched` of older versions)
            // are skipped.
            let known = fields
                .iter()
                .filter_map(|(k, v)| Some((k.parse::<Uuid>().ok()?, Known::decode(v)?)))
                .collect();
            progress.known.insert(r, known);
        }
        Ok(progress)
    }

    /// One poll over every restaurant. Returns the number of rows read.
    /// `full`: read from the saved cursor and move it (periodic tick);
    /// otherwise an immediate tick reads from the fast cursor and leaves the
    /// saved one alone.
    async fn tick(
        &self,
        lease: &Lease,
        progress: &mut Progress,
        full: bool,
    ) -> Result<usize, TickError> {
        // Taken before the query's snapshot: every commit the query cannot
        // see belongs to a transaction that started after `next_cursor`.
        let horizon = self.db.horizon().await?;
        let floor = horizon.db_now - delta(MAX_LOOKBACK);
        let at_horizon = |overlap: Duration| {
            horizon
                .oldest_open_transaction
                .unwrap_or(horizon.db_now)
                .min(horizon.db_now - delta(overlap))
                .max(floor)
        };
        let next_fast_cursor = at_horizon(MIN_OVERLAP);
        // An immediate tick moves only the fast cursor: the saved one, and
        // with it the POLL_OVERLAP_MS margin, belongs to periodic ticks.
        let (since, next_cursor) = match (full, progress.cursor, progress.fast_cursor) {
            (false, Some(cursor), Some(fast)) => (fast, cursor),
            (_, cursor, _) => {
                let next = at_horizon(self.overlap);
                (cursor.unwrap_or(next), next)
            }
        };

        let mut changes: HashMap<RestaurantId, FieldEdits> = HashMap::new();
        if progress.cursor.is_none() {
            self.start_from_baseline(lease, progress, since).await?;
        }

        let rows = self.db.changed_orders(since).await?;
        let row_count = rows.len();
        let mut by_restaurant: HashMap<RestaurantId, Vec<Order>> = HashMap::new();
        for o in rows {
            by_restaurant
                .entry(RestaurantId(o.restaurant_id))
                .or_default()
                .push(o);
        }
        let mut batch = Vec::new();
        for (r, orders) in &by_restaurant {
            let known = progress.known.entry(*r).or_default();
            for change in diff(known, orders, since) {
                let row = &orders[change.row];
                let micros =
                    published_micros(known.get(&row.id), row.updated_at.timestamp_micros());
                let mut restamped = None;
                if micros != row.updated_at.timestamp_micros() {
                    metrics::counter!("orders_gateway_poller_restamped_total").increment(1);
                    tracing::warn!(
                        order_id = %row.id,
                        "order's updated_at went backwards (trigger stamps now()?); published with a later stamp"
                    );
                    let mut o = row.clone();
                    o.updated_at =
                        DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or(o.updated_at);
                    restamped = Some(o);
                }
                let order = restamped.as_ref().unwrap_or(row);
                let body = serde_json::to_string(&EventBody {
                    kind: change.kind,
                    previous_status: change.previous_status.as_deref(),
                    order,
                    timestamp: format_timestamp(Utc::now()),
                })
                .expect("event serializes");
                batch.push((
                    PublishRequest {
                        restaurant: *r,
                        version: Some(order.version()),
                        body,
                        fence: Some(lease.token.clone()),
                    },
                    order.id,
                    Some(Known::of(row, micros)),
                ));
                // A tick of thousands of rows is CPU work: let the lease
                // renewal and the Redis connection run meanwhile.
                if batch.len() % YIELD_EVERY == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        drop(by_restaurant);

        // Deletions, read before anything is published so that publishing
        // and saving stay back to back (a leader that dies in between makes
        // its successor repeat what it published).
        let reconcile = progress
            .last_reconcile
            .is_none_or(|t| t.elapsed() >= self.interval * RECONCILE_EVERY_TICKS);
        let mut gone: HashSet<(RestaurantId, Uuid)> = self
            .db
            .deleted_orders(since)
            .await?
            .into_iter()
            .map(|(id, r)| (RestaurantId(r), id))
            .collect();
        if reconcile {
            let open: Vec<(Uuid, Uuid)> = progress
                .known
                .iter()
                .flat_map(|(r, known)| {
                    known
                        .iter()
                        .filter(|(_, k)| k.is_open())
                        .map(|(id, _)| (*id, r.0))
                })
                .collect();
            let missing: HashSet<Uuid> = self.db.missing_orders(&open).await?.into_iter().collect();
            gone.extend(
                open.into_iter()
                    .filter(|(id, _)| missing.contains(id))
                    .map(|(id, r)| (RestaurantId(r), id)),
            );
        }
        // Every one of them may be on a board. A tombstone is left only for
        // an order open when deleted, and this poller not knowing the order
        // does not mean no board shows it: the order service may have
        // published it through the publish endpoint before it was deleted
        // and before any tick read the row (created and deleted between two
        // ticks, or while no leader was polling). Skipping unknown ones left
        // such an order on every board for good. A deletion nobody showed
        // costs dashboards one ignored event; one published already comes
        // back from Redis as a duplicate (the version key of the order).
        // Reconciled ones are known open orders by construction; closed
        // orders leave no tombstone, so their deletions stay nobody's news.
        for (r, id) in gone {
            let body = serde_json::to_string(&EventBody {
                kind: EventKind::OrderDeleted,
                previous_status: None,
                order: &DeletedOrder {
                    id,
                    restaurant_id: r.0,
                },
                timestamp: format_timestamp(Utc::now()),
            })
            .expect("event serializes");
            batch.push((
                PublishRequest {
                    restaurant: r,
                    version: Some(OrderVersion::deleted(id)),
                    body,
                    fence: Some(lease.token.clone()),
                },
                id,
                None,
            ));
        }
        self.publish_all(batch, progress, &mut changes).await?;

        // Closed orders that fell out of the window need not be remembered:
        // a later change to one is reported as an update. Open ones stay
        // until they close or are deleted, however quiet their restaurant.
        let horizon_micros = next_cursor.timestamp_micros();
        for (r, known) in progress.known.iter_mut() {
            let stale: Vec<Uuid> = known
                .iter()
                .filter(|(_, k)| !k.is_open() && k.updated_at_micros < horizon_micros)
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                known.remove(&id);
                changes.entry(*r).or_default().push((id.to_string(), None));
            }
        }
        progress.known.retain(|_, known| !known.is_empty());
        metrics::gauge!("orders_gateway_poller_known_orders")
            .set(progress.known.values().map(HashMap::len).sum::<usize>() as f64);
        let state = PollerStateDelta {
            cursor_micros: next_cursor.timestamp_micros(),
            last_poll_ms: Utc::now().timestamp_millis(),
            changes: changes.into_iter().collect(),
        };
        self.backend.save_poller_state(lease, &state).await?;
        progress.cursor = Some(next_cursor);
        progress.fast_cursor = Some(next_fast_cursor);
        if reconcile {
            progress.last_reconcile = Some(Instant::now());
        }
        Ok(row_count)
    }

    /// Nothing saved to resume from (first start, or Redis lost its state,
    /// and with it every history, so dashboards resync anyway): the open
    /// orders last written before `since` are the baseline, not events;
    /// dashboards get them in their snapshots. Rows written since are left
    /// to the poll, so none is absorbed. Saved at once with `since` as the
    /// cursor: a first tick that fails (a huge first window, a lost lease)
    /// resumes from here instead of taking a later baseline that would
    /// absorb what it had not published yet.
    async fn start_from_baseline(
        &self,
        lease: &Lease,
        progress: &mut Progress,
        since: DateTime<Utc>,
    ) -> Result<(), TickError> {
        let mut changes: HashMap<RestaurantId, FieldEdits> = HashMap::new();
        for (r, id, status, updated_at) in self.db.baseline(since).await? {
            let k = Known::new(status, updated_at.timestamp_micros());
            changes
                .entry(RestaurantId(r))
                .or_default()
                .push((id.to_string(), Some(k.encode())));
            progress
                .known
                .entry(RestaurantId(r))
                .or_default()
                .insert(id, k);
        }
        let orders: usize = changes.values().map(Vec::len).sum();
        let state = PollerStateDelta {
            cursor_micros: since.timestamp_micros(),
            last_poll_ms: Utc::now().timestamp_millis(),
            changes: changes.into_iter().collect(),
        };
        self.backend.save_poller_state(lease, &state).await?;
        progress.cursor = Some(since);
        tracing::info!(
            orders,
            "poller: no saved progress; open orders taken as the baseline"
        );
        Ok(())
    }

    /// Publish, `PUBLISH_CONCURRENCY` at a time, and record what is now
    /// known of each order (`None`: deleted, forgotten). The first failure
    /// fails the tick once all have finished: the cursor stays, the failed
    /// ones are read again next tick, the others come back as duplicates.
    async fn publish_all(
        &self,
        batch: Vec<(PublishRequest, Uuid, Option<Known>)>,
        progress: &mut Progress,
        changes: &mut HashMap<RestaurantId, FieldEdits>,
    ) -> Result<(), TickError> {
        let backend = &self.backend;
        let results: Vec<_> = stream::iter(batch)
            .map(|(req, id, k)| async move {
                let r = req.restaurant;
                (backend.publish(req).await, r, id, k)
            })
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .collect()
            .await;
        let mut first_error = None;
        for (result, r, id, k) in results {
            match result {
                Ok(p) => {
                    let label = if p.duplicate {
                        "deduplicated"
                    } else {
                        "published"
                    };
                    metrics::counter!(format!("orders_gateway_events_{label}_total"), "source" => "poller")
                        .increment(1);
                    let known = progress.known.entry(r).or_default();
                    match k {
                        Some(k) => {
                            changes
                                .entry(r)
                                .or_default()
                                .push((id.to_string(), Some(k.encode())));
                            known.insert(id, k);
                        }
                        None => {
                            changes.entry(r).or_default().push((id.to_string(), None));
                            known.remove(&id);
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// Keep the lease alive; cancel `lost` the moment it cannot be renewed in
/// time, so the poller stops before another replica can take over.
async fn renew(
    backend: Arc<dyn Backend>,
    lease: Lease,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let period = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let remaining = ttl.saturating_sub(last_ok.elapsed());
        match tokio::time::timeout(remaining, backend.renew_leader(&lease, ttl)).await {
            Ok(Ok(true)) => last_ok = Instant::now(),
            Ok(Ok(false)) => {
                lost.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "poller: lease renewal failed"),
            Err(_) => {}
        }
        // Two periods without a renewal: the lease may be gone any moment.
        if last_ok.elapsed() >= period * 2 {
            lost.cancel();
            return;
        }
    }
}
