//! Supervised background tasks. A panic (or an unexpected return) in a
//! task the replica depends on — dispatcher, heartbeats, poller, Redis
//! receiver — must never be silent: it is logged at error level, counted in
//! `orders_gateway_task_failures_total{task,kind}`, and makes `/readyz`
//! answer 503 so the load balancer and the orchestrator see it.
//! Imports nothing of ours, so every layer may use it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Cheap to clone; one per replica (tests run several in one process).
#[derive(Clone, Default)]
pub struct Supervisor {
    /// Names of failed tasks. A std Mutex: pushed once per failure, read by
    /// /readyz, never held across an await.
    failed: Arc<Mutex<Vec<String>>>,
    /// Cancelled when the replica stops its background tasks: a return
    /// after that is the expected end, not a failure.
    stopping: CancellationToken,
}

impl Supervisor {
    pub fn new(stopping: CancellationToken) -> Supervisor {
        Supervisor {
            failed: Arc::default(),
            stopping,
        }
    }

    /// Spawn `fut` as task `name`; its panic or early return is recorded.
    pub fn spawn<F>(&self, name: &'static str, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn_watched(name, fut, false)
    }

    /// Spawn `fut` as task `name` for a supervised task that starts it and
    /// waits for its end (the poller's lease renewer and wake-up listener
    /// live as long as one leadership): returning is its normal end; only
    /// its panic is recorded. A bare `tokio::spawn` would hand the panic to
    /// a `JoinHandle` nobody reads.
    pub fn spawn_child<F>(&self, name: &'static str, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn_watched(name, fut, true)
    }

    fn spawn_watched<F>(&self, name: &'static str, fut: F, may_return: bool) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(()) if may_return || me.stopping.is_cancelled() => {}
                Ok(()) => me.record(name, "exited", "returned before shutdown".into()),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".into());
                    me.record(name, "panic", message);
                }
            }
        })
    }

    fn record(&self, name: &'static str, kind: &'static str, message: String) {
        tracing::error!(task = name, kind, %message, "background task failed; replica not ready");
        metrics::counter!("orders_gateway_task_failures_total", "task" => name, "kind" => kind)
            .increment(1);
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_string());
    }

    /// Tasks that failed so far (empty when all is well).
    pub fn failed(&self) -> Vec<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn panics_and_early_returns_are_recorded_but_a_stop_is_not() {
        let stop = CancellationToken::new();
        let sup = Supervisor::new(stop.clone());
        sup.spawn("boom", async { panic!("kaput") }).await.unwrap();
        sup.spawn("quits", async {}).await.unwrap();
        assert_eq!(sup.failed(), vec!["boom".to_string(), "quits".to_string()]);
        stop.cancel();
        sup.spawn("stopped", async {}).await.unwrap();
        assert_eq!(sup.failed().len(), 2);
    }

    #[tokio::test]
    async fn a_child_may_return_but_its_panic_is_recorded() {
        let sup = Supervisor::new(CancellationToken::new());
        sup.spawn_child("done", async {}).await.unwrap();
        assert!(sup.failed().is_empty());
        sup.spawn_child("renewer", async { panic!("kaput") })
            .await
            .unwrap();
        assert_eq!(sup.failed(), vec!["renewer".to_string()]);
    }
}
