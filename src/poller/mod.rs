//! Change capture. Every replica runs a [`Poller`]; only the holder of the
//! leader lock works. Each tick: read the active restaurants, take the
//! horizon, run one query for all of them, [`diff::diff`] against what was
//! already reported, publish the changes through the same atomic step as
//! everyone else (deduplicated by order version, fenced by the lease), and
//! save progress (fenced too). See docs/CHANGE_CAPTURE.md for why no commit
//! is missed. Between periodic ticks, [`wakeup`] ticks at once when a
//! writer's trigger notifies.

pub mod diff;
pub mod wakeup;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::{StreamExt, stream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{Backend, BrokerError, Lease, PollerStateDelta, PublishRequest};
use crate::config::Config;
use crate::db::Database;
use crate::domain::{EventBody, RestaurantId, format_timestamp, is_open_status};
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
    known: HashMap<RestaurantId, HashMap<Uuid, Known>>,
}

#[derive(Debug, thiserror::Error)]
enum TickError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
}

impl Poller {
    pub fn new(db: Database, backend: Arc<dyn Backend>, cfg: &Config) -> Poller {
        Poller {
            db,
            backend,
            instance_id: cfg.instance_id().to_string(),
            interval: cfg.poll_interval(),
            ttl: cfg.leader_ttl(),
            overlap: Duration::from_millis(cfg.poll_overlap_ms).max(MIN_OVERLAP),
            listen_url: cfg.listen_url().map(str::to_string),
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
        let renewer = tokio::spawn(renew(
            self.backend.clone(),
            lease.clone(),
            self.ttl,
            lost.clone(),
            stop.clone(),
        ));
        let mut progress = Progress::default();
        let mut loaded = false;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_success = Instant::now();
        // The listener follows the lock: started here, stopped below.
        let mut wake = self.listen_url.clone().map(Wakeup::start);
        loop {
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
                    progress = self.load(&progress).await?;
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

    /// Restore progress saved by a previous leader.
    async fn load(&self, _current: &Progress) -> Result<Progress, TickError> {
        let active = self.backend.active_restaurants().await?;
        let saved = self.backend.load_poller_state(&active).await?;
        let mut progress = Progress {
            cursor: saved
                .cursor_micros
                .and_then(DateTime::<Utc>::from_timestamp_micros),
            fast_cursor: None,
            known: HashMap::new(),
        };
        for (r, fields) in saved.restaurants {
            let known = fields
                .iter()
                .filter_map(|(k, v)| Some((k.parse::<Uuid>().ok()?, Known::decode(v)?)))
                .collect();
            progress.known.insert(r, known);
        }
        Ok(progress)
    }

    /// One poll. Returns the number of rows read. `full`: read from the
    /// saved cursor and move it (periodic tick); otherwise an immediate tick
    /// reads from the fast cursor and leaves the saved one alone.
    async fn tick(
        &self,
        lease: &Lease,
        progress: &mut Progress,
        full: bool,
    ) -> Result<usize, TickError> {
        let active: HashSet<RestaurantId> = self
            .backend
            .active_restaurants()
            .await?
            .into_iter()
            .collect();
        metrics::gauge!("orders_gateway_poller_active_restaurants").set(active.len() as f64);
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

        let mut delta_state = PollerStateDelta {
            cursor_micros: next_cursor.timestamp_micros(),
            last_poll_ms: Utc::now().timestamp_millis(),
            ..Default::default()
        };
        let gone: Vec<RestaurantId> = progress
            .known
            .keys()
            .filter(|r| !active.contains(r))
            .copied()
            .collect();
        for r in gone {
            progress.known.remove(&r);
            delta_state.forget.push(r);
        }
        let mut changes: HashMap<RestaurantId, Vec<(String, Option<String>)>> = HashMap::new();
        let new: Vec<Uuid> = active
            .iter()
            .filter(|r| !progress.known.contains_key(r))
            .map(|r| r.0)
            .collect();
        if !new.is_empty() {
            for r in &new {
                progress.known.insert(RestaurantId(*r), HashMap::new());
                // Marks the restaurant as watched even when it has no orders.
                changes.entry(RestaurantId(*r)).or_default().push((
                    "_watched".into(),
                    Some(since.timestamp_micros().to_string()),
                ));
            }
            for (r, id, status, updated_at) in self.db.baseline(&new, since).await? {
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
        }

        let ids: Vec<Uuid> = active.iter().map(|r| r.0).collect();
        let rows = if ids.is_empty() {
            Vec::new()
        } else {
            self.db.changed_orders(&ids, since).await?
        };
        let mut by_restaurant: HashMap<RestaurantId, Vec<usize>> = HashMap::new();
        for (i, o) in rows.iter().enumerate() {
            by_restaurant
                .entry(RestaurantId(o.restaurant_id))
                .or_default()
                .push(i);
        }
        let mut to_publish = Vec::new();
        for (r, indices) in &by_restaurant {
            let known = progress.known.entry(*r).or_default();
            let subset: Vec<_> = indices.iter().map(|i| rows[*i].clone()).collect();
            for change in diff(known, &subset, since) {
                let row = &subset[change.row];
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
                to_publish.push((
                    PublishRequest {
                        restaurant: *r,
                        version: Some(order.version()),
                        body,
                        fence: Some(lease.token.clone()),
                    },
                    order.id,
                    Known::of(row, micros),
                ));
            }
        }
        let backend = &self.backend;
        let results: Vec<_> = stream::iter(to_publish)
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
                    changes
                        .entry(r)
                        .or_default()
                        .push((id.to_string(), Some(k.encode())));
                    progress.known.entry(r).or_default().insert(id, k);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            // Keep the cursor: the failed ones are retried next tick.
            return Err(e.into());
        }
        // Closed orders that fell out of the window need not be remembered:
        // a later change to one is reported as an update.
        let horizon_micros = next_cursor.timestamp_micros();
        for (r, known) in progress.known.iter_mut() {
            let stale: Vec<Uuid> = known
                .iter()
                .filter(|(_, k)| !is_open_status(&k.status) && k.updated_at_micros < horizon_micros)
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                known.remove(&id);
                changes.entry(*r).or_default().push((id.to_string(), None));
            }
        }
        delta_state.changes = changes.into_iter().collect();
        self.backend.save_poller_state(lease, &delta_state).await?;
        progress.cursor = Some(next_cursor);
        progress.fast_cursor = Some(next_fast_cursor);
        Ok(rows.len())
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
