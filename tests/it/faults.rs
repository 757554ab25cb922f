//! Delivery under faults: a pub/sub link that drops or silently stops, a
//! Redis that loses its latest writes, publishers that repeat or reorder
//! versions. Each test is written against the gateway's outside surface
//! (WebSocket, HTTP, raw Redis commands), so it runs unchanged against any
//! version of the gateway.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{
    Gateway, GatewayProcess, Next, Redis, TcpProxy, Ws, config, dashboard, eventually, get_json,
    metrics, order_json, post_event, token,
};

/// Long enough for a reconnect plus gap-fill, far below "never".
const RECOVERY: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(500);

async fn replica(redis_url: String) -> Gateway {
    let mut cfg = config();
    cfg.redis_url = Some(redis_url);
    Gateway::start(cfg).await
}

async fn publish(gw: &Gateway, order: &Value) -> (u16, Value) {
    post_event(
        &format!("http://{}", gw.addr),
        &json!({"type": "order_updated", "order": order}),
    )
    .await
}

fn event_order_id(ev: &Value) -> String {
    ev["order"]["id"].as_str().unwrap_or_default().to_string()
}

/// Hole 2: after the pub/sub connection drops, gap-fill must cover a
/// restaurant that had no event yet since the replica subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_restaurant_gets_what_was_published_while_its_link_was_down() {
    let redis = Redis::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let behind_proxy = replica(proxy.url()).await;
    let direct = replica(redis.url()).await;
    let r = Uuid::new_v4();
    let (mut ws, hello) = dashboard(&behind_proxy.ws_url(&format!("token={}", token(r)))).await;
    assert_eq!(hello["resumed"], false);
    // No event for this restaurant yet. The link stops, an order arrives
    // through the other replica, then the link is cut and comes back.
    proxy.stall();
    let order = order_json(r, Uuid::new_v4(), "pending");
    let (status, _) = publish(&direct, &order).await;
    assert_eq!(status, 202);
    proxy.reset();
    let ev = ws.event().await;
    assert_eq!(event_order_id(&ev), order["id"].as_str().unwrap(), "{ev}");
    ws.silent_for(QUIET).await;
}

/// Hole 3: a link that silently stops carrying messages is detected by the
/// liveness probe, reconnected and gap-filled; the stall is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deaf_link_is_detected_reconnected_and_refilled() {
    let redis = Redis::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let behind_proxy = replica(proxy.url()).await;
    let direct = replica(redis.url()).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = dashboard(&behind_proxy.ws_url(&format!("token={}", token(r)))).await;
    let first = order_json(r, Uuid::new_v4(), "pending");
    assert_eq!(publish(&direct, &first).await.0, 202);
    assert_eq!(
        event_order_id(&ws.event().await),
        first["id"].as_str().unwrap()
    );

    proxy.stall();
    let missed = order_json(r, Uuid::new_v4(), "pending");
    let (status, _) = publish(&direct, &missed).await;
    assert_eq!(
        status, 202,
        "publishing still works: the fault is invisible to publishers"
    );
    match ws.next(RECOVERY).await {
        Next::Json(ev) => assert_eq!(event_order_id(&ev), missed["id"].as_str().unwrap()),
        other => panic!("the deaf replica never delivered the missed event: {other:?}"),
    }
    let text = metrics(&format!("http://{}", behind_proxy.addr)).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("orders_gateway_redis_link_stalls_total") && !l.ends_with(" 0")),
        "the stall is counted"
    );
    // And it goes on delivering.
    let later = order_json(r, Uuid::new_v4(), "pending");
    assert_eq!(publish(&direct, &later).await.0, 202);
    assert_eq!(
        event_order_id(&ws.event().await),
        later["id"].as_str().unwrap()
    );
}

/// Hole 3, as a load balancer sees it: while the link is deaf the replica
/// is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_a_deaf_link() {
    let redis = Redis::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let gw = replica(proxy.url()).await;
    let ready = |gw: &Gateway| {
        let url = gw.http("/readyz");
        async move {
            reqwest::get(url)
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    eventually(RECOVERY, || async {
        (ready(&gw).await == 200).then_some(())
    })
    .await;
    // Every pub/sub connection goes silent, reconnected ones too, while
    // commands (PING, PUBLISH) keep working: only the probe can tell.
    proxy.deafen_subscribers(true);
    eventually(RECOVERY, || async {
        (ready(&gw).await == 503).then_some(())
    })
    .await;
    proxy.deafen_subscribers(false);
    proxy.reset();
    eventually(RECOVERY, || async {
        (ready(&gw).await == 200).then_some(())
    })
    .await;
}

/// Dump every key of a restaurant (any key layout names the restaurant).
async fn dump_restaurant(redis: &Redis, r: Uuid) -> Vec<(String, Vec<u8>, i64)> {
    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{r}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push((k, dump, ttl.max(0)));
    }
    out
}

/// Put a restaurant's keys back as dumped: Redis "lost" what came after.
async fn roll_back(redis: &Redis, r: Uuid, dumped: &[(String, Vec<u8>, i64)]) {
    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{r}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in keys {
        let _: () = redis::cmd("DEL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for (k, dump, ttl) in dumped {
        let _: () = redis::cmd("RESTORE")
            .arg(k)
            .arg(*ttl)
            .arg(dump.as_slice())
            .arg("REPLACE")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Hole 4: when Redis loses its most recent writes (an asynchronous replica
/// promoted, a restore), ids a client already holds are never issued again:
/// a live dashboard keeps receiving, and a resume from a lost id is told to
/// resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_are_never_reused_after_redis_loses_writes() {
    let redis = Redis::start().await;
    let gw = replica(redis.url()).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut ws, _) = dashboard(&url).await;
    for _ in 0..2 {
        let o = order_json(r, Uuid::new_v4(), "pending");
        assert_eq!(publish(&gw, &o).await.0, 202);
        ws.event().await;
    }
    let before_loss = dump_restaurant(&redis, r).await;
    let lost = order_json(r, Uuid::new_v4(), "pending");
    assert_eq!(publish(&gw, &lost).await.0, 202);
    let lost_id = ws.event().await["event_id"].as_str().unwrap().to_string();
    roll_back(&redis, r, &before_loss).await;
    // Keep the new event's time apart from the lost one's, as a failover does.
    tokio::time::sleep(Duration::from_millis(5)).await;

    let after = order_json(r, Uuid::new_v4(), "pending");
    let (_, body) = publish(&gw, &after).await;
    let new_id = body["event_id"].as_str().unwrap().to_string();
    assert_ne!(new_id, lost_id, "an id was issued twice");
    match ws.next(RECOVERY).await {
        Next::Json(ev) => assert_eq!(event_order_id(&ev), after["id"].as_str().unwrap()),
        other => panic!("the live dashboard dropped the new event: {other:?}"),
    }
    let mut resumed = Ws::connect(&format!("{url}&last_event_id={lost_id}")).await;
    let hello = resumed.json().await;
    assert_eq!(hello["resumed"], false, "{hello}");
    assert_eq!(resumed.json().await["type"], "resync_required");
}

/// Hole 6: an order version older than one already published is never
/// published after it (the poller read V1, the order service published V2,
/// then the poller publishes V1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_never_follows_a_newer_one() {
    let redis = Redis::start().await;
    let gw = replica(redis.url()).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = dashboard(&gw.ws_url(&format!("token={}", token(r)))).await;
    let mut v1 = order_json(r, Uuid::new_v4(), "pending");
    v1["updated_at"] = json!("2026-01-01T10:00:00.000001Z");
    let mut v2 = v1.clone();
    v2["order_status"] = json!("confirmed");
    v2["updated_at"] = json!("2026-01-01T10:00:00.000002Z");
    let (s2, first) = publish(&gw, &v2).await;
    assert_eq!(s2, 202);
    let (s1, stale) = publish(&gw, &v1).await;
    assert_eq!(s1, 200, "answered like a duplicate: {stale}");
    assert_eq!(stale["duplicate"], true);
    assert_eq!(stale["event_id"], first["event_id"]);
    assert_eq!(ws.event().await["order"]["order_status"], "confirmed");
    ws.silent_for(QUIET).await;
}

/// Hole 7: when Redis loses the dedup state, a version already delivered
/// comes again with a new id; no dashboard is shown it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_is_not_shown_twice_after_dedup_state_is_lost() {
    let redis = Redis::start().await;
    let gw = replica(redis.url()).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = dashboard(&gw.ws_url(&format!("token={}", token(r)))).await;
    let order = order_json(r, Uuid::new_v4(), "pending");
    assert_eq!(publish(&gw, &order).await.0, 202);
    ws.event().await;
    // Forget every key naming the order: its dedup entry.
    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{}*", order["id"].as_str().unwrap()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        let _: () = redis::cmd("DEL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    publish(&gw, &order).await;
    ws.silent_for(QUIET).await;
    // A newer version still arrives.
    let mut newer = order.clone();
    newer["order_status"] = json!("confirmed");
    newer["updated_at"] =
        json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    assert_eq!(publish(&gw, &newer).await.0, 202);
    assert_eq!(ws.event().await["order"]["order_status"], "confirmed");
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Hole 8: presence uses Redis' clock. A replica whose clock runs 40 s
/// behind (beyond the presence TTL) still counts its sockets cluster-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_survives_a_replica_with_a_skewed_clock() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "libfaketime is installed (scripts/test.sh installs the faketime package)"
    );
    let redis = Redis::start().await;
    let common = [
        ("REDIS_URL", redis.url()),
        ("PRESENCE_TTL_MS", "5000".to_string()),
    ];
    let mut skewed_env = common.to_vec();
    skewed_env.extend([
        ("LD_PRELOAD", LIBFAKETIME.to_string()),
        ("FAKETIME", "-40s".to_string()),
        // Timers use the monotonic clock; only wall-clock time is skewed.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ("FAKETIME_NO_CACHE", "1".to_string()),
    ]);
    let skewed = GatewayProcess::start(&skewed_env).await;
    let honest = GatewayProcess::start(&common).await;
    let r = Uuid::new_v4();
    let t = token(r);
    let (_ws, _) = dashboard(&skewed.ws_url(&format!("token={t}"))).await;
    // Within a few heartbeats the honest replica sees the socket, and it
    // does not vanish between them.
    let url = format!("http://{}/api/ws/orders/live/status", honest.addr);
    for _ in 0..3 {
        let status = eventually(RECOVERY, || async {
            let (code, status) = get_json(&url, &t).await;
            (code == 200 && status["connections"] == 1).then_some(status)
        })
        .await;
        assert_eq!(status["instances"], 2, "{status}");
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// The contract's 1013, "this replica lost Redis": Redis gone for longer
/// than `REDIS_LOST_CLOSE_MS` closes the replica's sockets with 1013 (so the
/// load balancer can hand them to a replica that still delivers) and new
/// ones are refused the same way; once Redis is back, dashboards connect
/// again.
#[tokio::test]
async fn a_replica_that_lost_redis_closes_sockets_with_1013_until_it_is_back() {
    let mut redis = Redis::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.redis_lost_close_ms = 1000;
    let gw = Gateway::start(cfg).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut ws, _) = dashboard(&url).await;
    let first = order_json(r, Uuid::new_v4(), "pending");
    assert_eq!(publish(&gw, &first).await.0, 202);
    let seen = ws.event().await["event_id"].as_str().unwrap().to_string();

    redis.stop();
    match ws.next(Duration::from_secs(15)).await {
        Next::Close(1013, _) => {}
        other => panic!("an open socket is closed with 1013, got {other:?}"),
    }
    let mut refused = Ws::connect(&url).await;
    match refused.next(Duration::from_secs(10)).await {
        Next::Close(1013, _) => {}
        other => panic!("a new socket is refused with 1013, got {other:?}"),
    }

    redis.restart().await;
    eventually(Duration::from_secs(20), || async {
        let mut ws = Ws::connect(&format!("{url}&last_event_id={seen}")).await;
        match ws.next(Duration::from_secs(3)).await {
            Next::Json(v) if v["type"] == "connection_established" => Some(()),
            _ => None,
        }
    })
    .await;
}
