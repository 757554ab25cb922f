//! One replica's socket protocol: messages, limits, token lifetime,
//! heartbeats and slow clients.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::support::{
    Gateway, Next, Redis, Ws, config, dashboard, order_json, post_event, token, token_with,
};

#[tokio::test]
async fn greeting_ping_and_bad_messages() {
    let gw = Gateway::start(config()).await;
    let r = Uuid::new_v4();
    let (mut ws, hello) = dashboard(&gw.ws_url(&format!("token={}", token(r)))).await;
    assert_eq!(hello["message"], "Connected to real-time order updates");
    assert_eq!(hello["resumed"], false);
    assert_eq!(hello["instance_id"], gw.instance_id);
    assert_eq!(hello["heartbeat_interval_ms"], 25000);
    assert!(Uuid::parse_str(hello["connection_id"].as_str().unwrap()).is_ok());

    ws.send_text(r#"{"type":"ping"}"#).await;
    let pong = ws.json().await;
    assert_eq!(pong["type"], "pong");
    assert!(pong["timestamp"].as_str().unwrap().ends_with('Z'));
    ws.send_text("not json").await;
    assert_eq!(ws.json().await["code"], "bad_request");
    ws.send_text(r#"{"type":"subscribe"}"#).await;
    let err = ws.json().await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("unknown_type"))
    );
    ws.send_raw(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(ws.json().await["type"], "error");
    // Still alive and delivering.
    let id = Uuid::new_v4();
    let (status, body) = post_event(
        &format!("http://{}", gw.addr),
        &json!({"type": "order_created", "order": order_json(r, id, "pending")}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let ev = ws.json().await;
    assert_eq!(ev["type"], "order_created");
    assert_eq!(ev["event_id"], body["event_id"]);
    assert_eq!(ev["order"]["id"], id.to_string());
    assert_eq!(ev["order"]["total_price"], 25.5);
}

#[tokio::test]
async fn floods_close_with_4429_and_limits_apply() {
    let mut cfg = config();
    cfg.client_message_rate = 5;
    cfg.max_connections_per_restaurant = 2;
    let gw = Gateway::start(cfg).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut flooder, _) = dashboard(&url).await;
    let (_second, _) = dashboard(&url).await;
    let mut third = Ws::connect(&url).await;
    assert_eq!(third.close_code().await, 4429, "restaurant limit");
    for _ in 0..50 {
        if flooder
            .send_raw(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(flooder.close_code().await, 4429);
    // Another restaurant is unaffected by the first one's limit.
    dashboard(&gw.ws_url(&format!("token={}", token(Uuid::new_v4())))).await;
}

/// WebSocket control frames cost the server a pong each: a flood of
/// them is a flood like any other (4429), not free.
#[tokio::test]
async fn a_flood_of_websocket_pings_closes_with_4429() {
    let mut cfg = config();
    cfg.client_message_rate = 5;
    let gw = Gateway::start(cfg).await;
    let url = gw.ws_url(&format!("token={}", token(Uuid::new_v4())));
    let (mut flooder, _) = dashboard(&url).await;
    for _ in 0..200 {
        if flooder
            .send_raw(Message::Ping(vec![7; 16].into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(flooder.close_code().await, 4429);
}

#[tokio::test]
async fn oversized_frame_closes_1009_and_leaves_others_alone() {
    let gw = Gateway::start(config()).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut big, _) = dashboard(&url).await;
    let (mut other, _) = dashboard(&url).await;
    let payload = "x".repeat(100 * 1024);
    let _ = big.send_raw(Message::Text(payload.into())).await;
    assert_eq!(big.close_code().await, 1009);
    other.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(other.json().await["type"], "pong");
}

#[tokio::test]
async fn token_refresh_extends_and_expiry_closes_4401() {
    let gw = Gateway::start(config()).await;
    let r = Uuid::new_v4();
    let user = Uuid::new_v4();
    let short = |secs: i64| {
        token_with(json!({"sub": user, "restaurant_id": r, "exp": Utc::now().timestamp() + secs}))
    };
    let (mut refreshed, _) = dashboard(&gw.ws_url(&format!("token={}", short(2)))).await;
    let (mut lapsing, _) = dashboard(&gw.ws_url(&format!("token={}", short(2)))).await;
    refreshed
        .send_text(&json!({"type": "auth", "token": short(3600)}).to_string())
        .await;
    // Another user's token is not accepted as a refresh.
    let stranger = token(r);
    refreshed
        .send_text(&json!({"type": "auth", "token": stranger}).to_string())
        .await;
    assert_eq!(refreshed.json().await["code"], "auth_mismatch");
    match lapsing.next(Duration::from_secs(5)).await {
        Next::Close(code, reason) => {
            assert_eq!(code, 4401);
            assert_eq!(reason, "token expired");
        }
        other => panic!("expected 4401, got {other:?}"),
    }
    refreshed.silent_for(Duration::from_millis(1500)).await;
    refreshed.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(refreshed.json().await["type"], "pong");
}

#[tokio::test]
async fn silent_peers_are_dropped_and_pinging_peers_kept() {
    let mut cfg = config();
    cfg.heartbeat_interval_ms = 200;
    let gw = Gateway::start(cfg).await;
    let url = gw.ws_url(&format!("token={}", token(Uuid::new_v4())));
    let (mut silent, hello) = dashboard(&url).await;
    assert_eq!(hello["heartbeat_interval_ms"], 200);
    let (mut alive, _) = dashboard(&url).await;
    // `alive` reads (so its client answers pings); `silent` does not read
    // at all for a while, so it never answers.
    let keep = tokio::spawn(async move {
        let _ = alive.next(Duration::from_millis(1500)).await;
        alive
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut alive = keep.await.unwrap();
    assert_eq!(silent.close_code().await, 1001);
    alive.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(alive.json().await["type"], "pong");
}

#[tokio::test]
async fn slow_consumer_is_cut_off_while_others_get_everything() {
    let redis = Redis::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    cfg.send_queue_capacity = 256;
    let gw = Gateway::start(cfg).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut slow, _) = dashboard(&url).await;
    let (mut normal, _) = dashboard(&url).await;
    const EVENTS: usize = 2500;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < EVENTS {
            match normal.next(Duration::from_secs(20)).await {
                Next::Json(v) if v["type"] == "order_updated" => {
                    assert_eq!(v["n"], got, "in order, none missing");
                    got += 1;
                }
                Next::Json(_) => {}
                other => panic!("normal client lost its stream after {got}: {other:?}"),
            }
        }
        got
    });
    let pad = "p".repeat(8 * 1024);
    let mut conn = redis.client().await;
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(100) {
        let mut pipe = redis::pipe();
        for n in chunk {
            let body = json!({"type": "order_updated", "n": n, "pad": pad});
            pipe.cmd("PUBLISH")
                .arg(format!("orders:{r}"))
                .arg(body.to_string())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
        // Paced like a busy restaurant, not one burst: the normal client
        // must keep up, only the one that never reads may fall behind.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reader.await.unwrap(), EVENTS);
    // The slow client, reading at last, finds a 4408 after what was buffered.
    assert_eq!(slow.close_code().await, 4408);
    let metrics = crate::support::metrics(&format!("http://{}", gw.addr)).await;
    assert!(metrics.contains("orders_gateway_slow_client_closes_total"));
}
