//! The wake-up: the poller leader `LISTEN`s on `orders_changed` and ticks as
//! soon as a writer's trigger notifies, instead of waiting for the next
//! period (docs/CHANGE_CAPTURE.md, "Wake-up"). The periodic tick stays the
//! source of truth: a notification lost here (connection down, pooler in
//! the way, trigger missing) costs latency, never an event.
//!
//! One dedicated connection, not from the query pool: a pooled connection
//! goes back to the pool between queries and would stop listening. The
//! listener lives as long as one leadership: [`Wakeup::start`] when the lock
//! is taken, [`Wakeup::stop`] when it is lost, so only the leader holds a
//! `LISTEN` connection.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::tasks::Supervisor;

/// The channel the migrations' triggers notify.
pub const CHANNEL: &str = "orders_changed";
/// Immediate ticks start at least this far apart. Ticks never overlap
/// anyway; the gap bounds how often the database is polled under a steady
/// stream of commits (each tick re-reads the rows of the last quarter
/// second, so a hundred ticks a second would mostly re-read) at the price
/// of at most this much extra latency.
pub const MIN_GAP: Duration = Duration::from_millis(20);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection attempt that hangs (unreachable host) counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shown in pg_stat_activity, so operators (and tests) can find it.
pub const APPLICATION_NAME: &str = "orders-gateway listen";

/// Why the leader ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The periodic tick.
    Interval,
    /// A notification: an immediate tick.
    Notify,
    /// The listen connection was (re-)established: notifications sent while
    /// it was down are lost, so the tick is a full one.
    Reconnect,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Interval => "interval",
            Cause::Notify => "notify",
            Cause::Reconnect => "reconnect",
        }
    }
}

/// What was asked for since the last tick began. Coalescing happens here:
/// any number of notifications set the same flag, so a burst is one tick
/// (plus one for those arriving while it runs). Two booleans: bounded.
#[derive(Default)]
struct Pending {
    notified: bool,
    reconnected: bool,
}

struct Shared {
    // std Mutex: held for a flag update, never across an await.
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Shared {
    fn set(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.pending.lock().expect("not poisoned"));
        self.notify.notify_one();
    }

    fn is_set(&self) -> bool {
        let p = self.pending.lock().expect("not poisoned");
        p.notified || p.reconnected
    }
}

/// The leader's listener: a background task holding the `LISTEN`
/// connection, and what it asked for.
pub struct Wakeup {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    last_immediate: Option<Instant>,
}

impl Wakeup {
    pub fn start(url: String, tasks: &Supervisor) -> Wakeup {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            notify: Notify::new(),
        });
        let stop = CancellationToken::new();
        let task = tasks.spawn_child("poller_wakeup", listen(url, shared.clone(), stop.clone()));
        Wakeup {
            shared,
            stop,
            task,
            last_immediate: None,
        }
    }

    /// Resolves once something asks for a tick, and not sooner than
    /// [`MIN_GAP`] after the previous immediate tick began. Cancel-safe:
    /// nothing is consumed until [`Wakeup::take`].
    pub async fn wanted(&self) {
        loop {
            // Registered before checking, so a notification in between is
            // not missed (and a stale permit only costs one more check).
            let notified = self.shared.notify.notified();
            if self.shared.is_set() {
                break;
            }
            notified.await;
        }
        if let Some(last) = self.last_immediate {
            tokio::time::sleep_until(last + MIN_GAP).await;
        }
    }

    /// Called when any tick begins (its snapshot follows): it covers every
    /// notification received so far. Returns the cause for a tick that
    /// [`Wakeup::wanted`] started.
    pub fn take(&mut self) -> Cause {
        let p = std::mem::take(&mut *self.shared.pending.lock().expect("not poisoned"));
        self.last_immediate = Some(Instant::now());
        if p.reconnected {
            Cause::Reconnect
        } else {
            Cause::Notify
        }
    }

    /// A periodic tick begins: a full tick, it covers whatever is pending
    /// (a reconnect included).
    pub fn clear(&mut self) {
        *self.shared.pending.lock().expect("not poisoned") = Pending::default();
    }

    /// Leadership ended: close the connection (and with it the `LISTEN`).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// `wanted` of an optional listener; never resolves without one.
pub async fn wanted(w: Option<&Wakeup>) {
    match w {
        Some(w) => w.wanted().await,
        None => std::future::pending().await,
    }
}

/// Connect, `LISTEN`, forward notifications; on any loss reconnect with
/// backoff. Every (re)connection asks for a full tick: whatever was
/// committed before the `LISTEN` took effect notified nobody.
async fn listen(url: String, shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => break,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&url)) => {
                r.unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut))
            }
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "poller: cannot LISTEN {CHANNEL}");
                metrics::counter!("orders_gateway_poller_listen_errors_total").increment(1);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if first {
            tracing::info!("poller: listening on {CHANNEL}");
        } else {
            tracing::info!("poller: listening on {CHANNEL} again; polling everything once");
            metrics::counter!("orders_gateway_poller_listen_reconnects_total").increment(1);
        }
        first = false;
        backoff = BACKOFF_MIN;
        metrics::gauge!("orders_gateway_poller_listening").set(1.0);
        shared.set(|p| p.reconnected = true);
        let lost = loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break None,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => {
                    metrics::counter!("orders_gateway_poller_wakeups_total").increment(1);
                    // The payload names the restaurant ('' = any). The tick
                    // reads every restaurant's rows since the last tick
                    // anyway, so it is only checked, not used to narrow.
                    if !n.payload().is_empty() && Uuid::from_str(n.payload()).is_err() {
                        tracing::debug!(payload = n.payload(), "poller: odd {CHANNEL} payload");
                    }
                    shared.set(|p| p.notified = true);
                }
                Ok(None) => break Some("connection closed".to_string()),
                Err(e) => break Some(e.to_string()),
            }
        };
        metrics::gauge!("orders_gateway_poller_listening").set(0.0);
        // Dropping the listener closes its connection (and its LISTEN).
        drop(listener);
        match lost {
            None => break,
            Some(reason) => {
                tracing::warn!(%reason, "poller: LISTEN connection lost; reconnecting");
                metrics::counter!("orders_gateway_poller_listen_errors_total").increment(1);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                }
            }
        }
    }
    metrics::gauge!("orders_gateway_poller_listening").set(0.0);
}

/// A listener on a pool of its own with one connection, never handed to
/// anything else.
async fn connect(url: &str) -> Result<PgListener, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?.application_name(APPLICATION_NAME);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    // A lost connection ends our loop (which reconnects, counts it and asks
    // for a full tick) rather than being replaced silently.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Up to +50 %, so replicas that lost the same database do not reconnect in
/// step.
fn jitter(d: Duration) -> Duration {
    d + d.mul_f64(rand::random::<f64>() * 0.5)
}
