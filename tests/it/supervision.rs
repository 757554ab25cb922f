//! Background tasks never die silently: a panic is logged, counted in a
//! metric and turns /readyz to 503.

use std::time::Duration;

use crate::support::{Gateway, TestDb, config, eventually, metrics};

#[tokio::test]
async fn a_panicking_poller_is_counted_and_makes_the_replica_unready() {
    let db = TestDb::create().await;
    let mut cfg = config();
    cfg.database_url = Some(db.url.clone());
    cfg.validate().unwrap();
    // Validation refuses this at start now; slipped past it, it still
    // panics in the poller's date arithmetic on its first tick, which is
    // exactly the kind of failure that must not go unnoticed.
    cfg.poll_overlap_ms = u64::MAX;
    let gw = Gateway::start_as_is(cfg).await;
    let base = format!("http://{}", gw.addr);
    let body = eventually(Duration::from_secs(10), || async {
        let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
        (r.status() == 503).then_some(())?;
        Some(r.text().await.unwrap())
    })
    .await;
    assert!(body.contains("poller"), "{body}");
    let m = metrics(&base).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("orders_gateway_task_failures_total")
                && l.contains("task=\"poller\"")
                && l.contains("kind=\"panic\"")),
        "{m}"
    );
    // Still alive: the process answers health checks.
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
}
