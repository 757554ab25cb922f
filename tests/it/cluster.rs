//! Several replicas over one Redis: fan-out, isolation, Redis outages,
//! the cluster view, and shutdown.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::support::{
    Gateway, GatewayProcess, Next, Redis, Ws, config, dashboard, eventually, get_json, order_json,
    post_event, token,
};

async fn replicas(redis: &Redis, n: usize) -> Vec<Gateway> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut cfg = config();
        cfg.redis_url = Some(redis.url());
        out.push(Gateway::start(cfg).await);
    }
    out
}

fn base(gw: &Gateway) -> String {
    format!("http://{}", gw.addr)
}

#[tokio::test]
async fn restaurants_are_isolated_across_replicas() {
    let redis = Redis::start().await;
    let gws = replicas(&redis, 2).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut a_socks = Vec::new();
    let mut b_socks = Vec::new();
    for gw in &gws {
        a_socks.push(
            dashboard(&gw.ws_url(&format!("token={}", token(a))))
                .await
                .0,
        );
        b_socks.push(
            dashboard(&gw.ws_url(&format!("token={}", token(b))))
                .await
                .0,
        );
    }
    let order = Uuid::new_v4();
    let (status, body) = post_event(
        &base(&gws[0]),
        &json!({"type": "order_created", "order": order_json(a, order, "pending")}),
    )
    .await;
    assert_eq!(status, 202);
    for ws in &mut a_socks {
        let ev = ws.event().await;
        assert_eq!(ev["event_id"], body["event_id"]);
        assert_eq!(ev["order"]["id"], order.to_string());
    }
    // A raw publish on A's channel carrying B's order is refused too.
    redis
        .publish(
            &format!("orders:{a}"),
            &json!({"type": "order_created", "order": order_json(b, Uuid::new_v4(), "pending")})
                .to_string(),
        )
        .await;
    for ws in a_socks.iter_mut().chain(b_socks.iter_mut()) {
        ws.silent_for(Duration::from_millis(400)).await;
    }
}

#[tokio::test]
async fn outside_publish_reaches_every_socket_once() {
    let redis = Redis::start().await;
    let gws = replicas(&redis, 2).await;
    let r = Uuid::new_v4();
    let mut socks = Vec::new();
    for gw in &gws {
        for _ in 0..2 {
            socks.push(
                dashboard(&gw.ws_url(&format!("token={}", token(r))))
                    .await
                    .0,
            );
        }
    }
    let raw = json!({"type": "order_updated", "order": order_json(r, Uuid::new_v4(), "ready"), "timestamp": "2024-01-15T10:30:45Z"});
    let receivers = redis
        .publish(&format!("orders:{r}"), &raw.to_string())
        .await;
    assert_eq!(receivers, 2, "one subscription per replica, not per socket");
    for ws in &mut socks {
        let ev = ws.event().await;
        assert_eq!(ev, raw);
        ws.silent_for(Duration::from_millis(300)).await;
    }
    // The published function is callable by any Redis client too.
    let mut conn = redis.client().await;
    let order = order_json(r, Uuid::new_v4(), "pending");
    let body =
        json!({"type": "order_created", "order": order, "timestamp": "2024-01-15T10:30:45Z"});
    let order_id = order["id"].as_str().unwrap();
    let (id, dup): (String, i64) = redis::cmd("FCALL")
        .arg(orders_gateway::broker::functions::function_name(
            "og_publish",
        ))
        .arg(3)
        .arg(format!("og:{{orders:{r}}}:meta"))
        .arg(format!("og:{{orders:{r}}}:hist"))
        .arg(format!("og:{{orders:{r}}}:v:{order_id}"))
        .arg(r.to_string())
        .arg(format!("{order_id}@1"))
        .arg(body.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dup, 0);
    for ws in &mut socks {
        assert_eq!(ws.event().await["event_id"], id);
    }
}

#[tokio::test]
async fn redis_restart_keeps_dashboards_connected_and_delivering() {
    let mut redis = Redis::start().await;
    let gws = replicas(&redis, 2).await;
    let r = Uuid::new_v4();
    let mut socks = Vec::new();
    for gw in &gws {
        socks.push(
            dashboard(&gw.ws_url(&format!("token={}", token(r))))
                .await
                .0,
        );
    }
    let (s, _) = post_event(
        &base(&gws[0]),
        &json!({"type": "order_created", "order": order_json(r, Uuid::new_v4(), "pending")}),
    )
    .await;
    assert_eq!(s, 202);
    for ws in &mut socks {
        ws.event().await;
    }
    redis.stop();
    // Readiness reports the outage; the HTTP publish says 503, not a hang.
    let ready = reqwest::get(gws[0].http("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let (s, body) = post_event(
        &base(&gws[0]),
        &json!({"type": "order_created", "order": order_json(r, Uuid::new_v4(), "pending")}),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    redis.restart().await;
    // Both replicas resubscribe by themselves.
    eventually(Duration::from_secs(20), || async {
        let v = redis
            .cmd(&["PUBSUB", "NUMSUB", &format!("orders:{r}")])
            .await
            .ok()?;
        let n: Vec<(String, i64)> = redis::from_redis_value(v).ok()?;
        (n[0].1 == 2).then_some(())
    })
    .await;
    // Events flow again to the same sockets.
    let order = Uuid::new_v4();
    let event_id = eventually(Duration::from_secs(20), || async {
        let (s, body) = post_event(
            &base(&gws[1]),
            &json!({"type": "order_created", "order": order_json(r, order, "pending")}),
        )
        .await;
        (s == 202).then(|| body["event_id"].clone())
    })
    .await;
    for ws in &mut socks {
        // History was lost with the restart: sockets may first be told to resync.
        let ev = loop {
            let v = ws.event().await;
            if v["type"] != "resync_required" {
                break v;
            }
        };
        if ev["event_id"] != event_id {
            // The first post may have raced a resubscribe; the retry is the same order version.
            assert_eq!(ev["order"]["id"], order.to_string());
        }
    }
    let ready = reqwest::get(gws[0].http("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = crate::support::metrics(&format!("http://{}", gws[0].addr)).await;
    assert!(
        metrics.contains("orders_gateway_redis_reconnects_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn status_and_connections_are_cluster_wide() {
    let redis = Redis::start().await;
    let gws = replicas(&redis, 2).await;
    let (r, other) = (Uuid::new_v4(), Uuid::new_v4());
    let t = token(r);
    let _s1 = dashboard(&gws[0].ws_url(&format!("token={t}"))).await;
    let _s2 = dashboard(&gws[0].ws_url(&format!("token={t}"))).await;
    let _s3 = dashboard(&gws[1].ws_url(&format!("token={t}"))).await;
    let _o = dashboard(&gws[1].ws_url(&format!("token={}", token(other)))).await;
    let (code, status) = get_json(&gws[0].http("/api/ws/orders/live/status"), &t).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["restaurant_id"], r.to_string());
    assert_eq!(status["connections"], 3);
    assert_eq!(status["local_connections"], 2);
    assert_eq!(status["instances"], 2);
    assert_eq!(status["realtime"]["poll_interval_ms"], 200);
    assert!(status["realtime"]["last_poll_at"].is_null());
    let (code, list) = get_json(&gws[1].http("/api/ws/orders/live/connections"), &t).await;
    assert_eq!(code, 200);
    let conns = list["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 3, "caller's restaurant only: {list}");
    let mut instances: Vec<_> = conns
        .iter()
        .map(|c| c["instance_id"].as_str().unwrap())
        .collect();
    instances.sort();
    instances.dedup();
    assert_eq!(instances.len(), 2);
    assert!(
        conns
            .iter()
            .all(|c| c["connected_at"].is_string() && c["user_id"].is_string())
    );
    let (code, err) = get_json(&gws[1].http("/api/ws/orders/live/status"), "garbage").await;
    assert_eq!(code, 401);
    assert_eq!(err["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn a_crashed_replicas_connections_disappear() {
    let redis = Redis::start().await;
    let survivor = replicas(&redis, 1).await.remove(0);
    let mut doomed = GatewayProcess::start(&[
        ("REDIS_URL", redis.url()),
        ("PRESENCE_TTL_MS", "2000".into()),
    ])
    .await;
    let r = Uuid::new_v4();
    let t = token(r);
    let _a = dashboard(&survivor.ws_url(&format!("token={t}"))).await;
    let _b = dashboard(&doomed.ws_url(&format!("token={t}"))).await;
    let url = survivor.http("/api/ws/orders/live/status");
    eventually(Duration::from_secs(5), || async {
        let (_, s) = get_json(&url, &t).await;
        (s["connections"] == 2 && s["instances"] == 2).then_some(())
    })
    .await;
    doomed.signal("KILL");
    doomed.wait(Duration::from_secs(5)).await;
    eventually(Duration::from_secs(10), || async {
        let (_, s) = get_json(&url, &t).await;
        (s["connections"] == 1 && s["instances"] == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_exits_cleanly() {
    let redis = Redis::start().await;
    let mut gw = GatewayProcess::start(&[("REDIS_URL", redis.url())]).await;
    let r = Uuid::new_v4();
    let mut socks = Vec::new();
    for _ in 0..3 {
        socks.push(
            dashboard(&gw.ws_url(&format!("token={}", token(r))))
                .await
                .0,
        );
    }
    gw.signal("TERM");
    for ws in &mut socks {
        match ws.next(Duration::from_secs(10)).await {
            Next::Close(code, _) => assert_eq!(code, 1001),
            other => panic!("expected 1001, got {other:?}"),
        }
    }
    assert_eq!(gw.wait(Duration::from_secs(15)).await, Some(0));
    // Its registration left with it.
    let mut conn = redis.client().await;
    let live: i64 = redis::cmd("ZCARD")
        .arg("og:instances")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(live, 0);
    let _ = Ws::connect;
}

async fn numsub(redis: &Redis, r: Uuid) -> Option<i64> {
    let v = redis
        .cmd(&["PUBSUB", "NUMSUB", &format!("orders:{r}")])
        .await
        .ok()?;
    let n: Vec<(String, i64)> = redis::from_redis_value(v).ok()?;
    Some(n[0].1)
}

#[tokio::test]
async fn channels_are_unsubscribed_lazily_and_resubscribed_on_return() {
    let redis = Redis::start().await;
    let gw = replicas(&redis, 1).await.remove(0);
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (ws, _) = dashboard(&url).await;
    assert_eq!(numsub(&redis, r).await, Some(1));
    drop(ws);
    // Gone after a couple of sweeps (PRESENCE_TTL_MS/4 each in tests).
    eventually(Duration::from_secs(10), || async {
        (numsub(&redis, r).await == Some(0)).then_some(())
    })
    .await;
    let (mut ws, _) = dashboard(&url).await;
    assert_eq!(numsub(&redis, r).await, Some(1));
    let (s, _) = post_event(
        &base(&gw),
        &json!({"type": "order_created", "order": order_json(r, Uuid::new_v4(), "pending")}),
    )
    .await;
    assert_eq!(s, 202);
    assert_eq!(ws.event().await["type"], "order_created");
}
