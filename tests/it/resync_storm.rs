//! A `resync_required` to every socket of a restaurant: one shared
//! snapshot read, not one per socket; the poller keeps ticking.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::support::{
    Gateway, Next, Redis, TestDb, bulk_orders, config, dashboard, eventually, get_json, order_json,
    post_event, token,
};

/// Index and sequential scans of `orders` in the test database, as
/// PostgreSQL counts them: every snapshot read is one.
async fn order_scans(pool: &sqlx::PgPool) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::int8 \
         FROM pg_stat_user_tables WHERE relname = 'orders'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    n
}

#[tokio::test]
async fn a_resync_broadcast_shares_one_snapshot_read_and_the_poller_keeps_ticking() {
    const SOCKETS: usize = 200;
    let mut redis = Redis::start().await;
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let r = Uuid::new_v4();
    // ~40 KB each: a snapshot in several fragments.
    bulk_orders(&pool, r, 100).await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.database_url = Some(db.url.clone());
    cfg.poll_interval_ms = 1000;
    let gw = Gateway::start(cfg).await;
    let base = format!("http://{}", gw.addr);
    let url = gw.ws_url(&format!("token={}", token(r)));
    let mut socks = Vec::new();
    for _ in 0..SOCKETS {
        let (mut ws, _) = dashboard(&url).await;
        match ws.next(Duration::from_secs(30)).await {
            Next::Json(v) if v["type"] == "snapshot" => {}
            other => panic!("expected the snapshot, got {other:?}"),
        }
        socks.push(ws);
    }
    // One numbered event, so that the replica knows where this restaurant's
    // stream stood when the link drops.
    let (s, body) = post_event(
        &base,
        &json!({"type": "order_created", "order": order_json(r, Uuid::new_v4(), "pending")}),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    for ws in &mut socks {
        assert_eq!(ws.event().await["type"], "order_created");
    }
    let (_, before) = get_json(&gw.http("/api/ws/orders/live/status"), &token(r)).await;
    // Let the gateway's connections report their scans so far.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let scans_before = order_scans(&pool).await;
    // History is lost with the restart: every socket is told to resync.
    redis.restart().await;
    for (n, ws) in socks.iter_mut().enumerate() {
        let v = loop {
            match ws.next(Duration::from_secs(30)).await {
                Next::Json(v) if v["type"] == "resync_required" => break v,
                Next::Json(_) => continue,
                other => panic!("socket {n}: {other:?} instead of resync_required"),
            }
        };
        assert_eq!(v["type"], "resync_required");
        match ws.next(Duration::from_secs(30)).await {
            Next::Json(v) => {
                assert_eq!(v["type"], "snapshot", "socket {n}");
                assert_eq!(v["orders"].as_array().unwrap().len(), 100);
            }
            other => panic!("socket {n}: {other:?} instead of its snapshot (1013?)"),
        }
    }
    // PostgreSQL's own count: a few reads (and the poller's ticks), not one per socket.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reads = order_scans(&pool).await - scans_before;
    assert!(
        reads < 30,
        "{reads} scans of orders for one resync of {SOCKETS} sockets"
    );
    // The poller still ticks.
    let last_before = before["realtime"]["last_poll_at"].clone();
    eventually(Duration::from_secs(10), || async {
        let (_, now) = get_json(&gw.http("/api/ws/orders/live/status"), &token(r)).await;
        let last = now["realtime"]["last_poll_at"].clone();
        (last.is_string() && last != last_before).then_some(())
    })
    .await;
}
