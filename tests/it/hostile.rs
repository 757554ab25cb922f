//! Hostile and broken clients against the real server: connections that
//! never finish their handshake, sockets that never read.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use uuid::Uuid;

use orders_gateway::config::Config;

use crate::support::{
    Gateway, TestDb, bulk_orders, config, dashboard, eventually, get_json, metrics, token,
    token_with,
};

/// True when the server closed the connection (EOF or reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An error answer (e.g. 408) may come first; the close follows.
            Ok(Ok(_)) => continue,
        }
    }
}

async fn half_request(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /api/ws/orders/live?tok").await.unwrap();
    s
}

async fn healthz_ok(base: &str) -> bool {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test]
async fn half_request_lines_are_closed_and_do_not_block_others() {
    let mut cfg = config();
    cfg.header_read_timeout_ms = 1000;
    cfg.handshake_timeout_ms = 2000;
    let gw = Gateway::start(cfg).await;
    let base = format!("http://{}", gw.addr);
    let mut slow = Vec::new();
    for _ in 0..200 {
        slow.push(half_request(gw.addr).await);
    }
    // Silent ones too: connected, nothing sent.
    for _ in 0..50 {
        slow.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // Meanwhile a normal request and a normal socket get through.
    assert!(healthz_ok(&base).await);
    let r = Uuid::new_v4();
    let (_ws, hello) = dashboard(&gw.ws_url(&format!("token={}", token(r)))).await;
    assert_eq!(hello["type"], "connection_established");
    // Every half-open connection is closed by the header-read timeout.
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "a connection that never finished its request line is still open"
        );
    }
    let m = metrics(&base).await;
    assert!(
        m.contains(r#"orders_gateway_http_connections_refused_total{reason="header_timeout"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn connections_beyond_the_handshake_limit_are_refused_then_served_again() {
    let mut cfg = config();
    cfg.header_read_timeout_ms = 1000;
    cfg.handshake_timeout_ms = 1000;
    cfg.max_handshakes = 20;
    let gw = Gateway::start(cfg).await;
    let base = format!("http://{}", gw.addr);
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(half_request(gw.addr).await);
    }
    // Give the accept loop time to take all of them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = half_request(gw.addr).await;
    assert!(
        closed_within(&mut extra, Duration::from_millis(500)).await,
        "the connection over the limit must be closed at once"
    );
    for s in &mut held {
        assert!(closed_within(s, Duration::from_secs(10)).await);
    }
    assert!(
        healthz_ok(&base).await,
        "served again once the slots free up"
    );
    let m = metrics(&base).await;
    assert!(
        m.contains(r#"orders_gateway_http_connections_refused_total{reason="handshake_limit"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_request_body_trickled_forever_is_cut_at_the_handshake_deadline() {
    let mut cfg = config();
    cfg.header_read_timeout_ms = 1000;
    cfg.handshake_timeout_ms = 2000;
    let gw = Gateway::start(cfg).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /api/orders/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100000\r\n\r\n{",
    )
    .await
    .unwrap();
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if s.write_all(b" ").await.is_err() {
                return;
            }
        }
    };
    // The head was complete, so only the accept-to-upgrade deadline can end it.
    let _ = tokio::time::timeout(Duration::from_secs(10), trickle).await;
    let mut s = s;
    assert!(
        closed_within(&mut s, Duration::from_millis(100)).await,
        "a connection trickling its body is still open after 10 s"
    );
    let m = metrics(&format!("http://{}", gw.addr)).await;
    assert!(
        m.contains(r#"orders_gateway_http_connections_refused_total{reason="handshake_timeout"}"#),
        "{m}"
    );
}

/// A WebSocket client that completes the handshake and then never reads,
/// with a small receive window so the server's sends block early.
async fn never_reading(
    url: &str,
    addr: std::net::SocketAddr,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("upgrade succeeds");
    ws
}

async fn local_connections(gw: &Gateway, r: Uuid) -> i64 {
    let (status, v) = get_json(&gw.http("/api/ws/orders/live/status"), &token(r)).await;
    assert_eq!(status, 200, "{v}");
    v["local_connections"].as_i64().unwrap()
}

/// A gateway over a database whose one restaurant has `orders` open
/// orders (a snapshot of ~375 bytes each); `tune` adjusts its settings.
async fn big_snapshot_gateway(
    orders: i32,
    tune: impl FnOnce(&mut Config),
) -> (TestDb, sqlx::PgPool, Uuid, Gateway) {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let r = Uuid::new_v4();
    bulk_orders(&pool, r, orders).await;
    let mut cfg = config();
    cfg.database_url = Some(db.url.clone());
    tune(&mut cfg);
    let gw = Gateway::start(cfg).await;
    (db, pool, r, gw)
}

#[tokio::test]
async fn a_big_snapshot_to_a_client_that_never_reads_obeys_token_expiry() {
    // ~15 MB of snapshot: far more than the socket buffers hold.
    let (_db, _pool, r, gw) = big_snapshot_gateway(40_000, |_| {}).await;
    let short = token_with(json!({
        "sub": Uuid::new_v4(), "restaurant_id": r, "exp": Utc::now().timestamp() + 3,
    }));
    let _ws = never_reading(&gw.ws_url(&format!("token={short}")), gw.addr).await;
    eventually(Duration::from_secs(10), || async {
        (local_connections(&gw, r).await == 1).then_some(())
    })
    .await;
    // Its send is blocked; the token's expiry (in 3 s) must still end the
    // socket, well before the 10 s send deadline would.
    eventually(Duration::from_secs(7), || async {
        (local_connections(&gw, r).await == 0).then_some(())
    })
    .await;
    let m = metrics(&format!("http://{}", gw.addr)).await;
    assert!(
        m.contains(r#"orders_gateway_connections_closed_total{code="4401"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_with_4408() {
    // ~7 MB: more than the kernel's socket buffers (4 MB) hold.
    let (_db, _pool, r, gw) = big_snapshot_gateway(20_000, |_| {}).await;
    let _ws = never_reading(&gw.ws_url(&format!("token={}", token(r))), gw.addr).await;
    // No progress for the send deadline: cut off as too slow, not counted.
    eventually(Duration::from_secs(60), || async {
        let m = metrics(&format!("http://{}", gw.addr)).await;
        m.contains(r#"orders_gateway_connections_closed_total{code="4408"}"#)
            .then_some(())
    })
    .await;
    assert_eq!(local_connections(&gw, r).await, 0);
}

#[tokio::test]
async fn a_big_snapshot_arrives_whole_as_one_message() {
    let (_db, _pool, r, gw) = big_snapshot_gateway(3_000, |_| {}).await;
    let (mut ws, _) = dashboard(&gw.ws_url(&format!("token={}", token(r)))).await;
    let snap = ws.json().await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["orders"].as_array().unwrap().len(), 3_000);
    ws.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(ws.json().await["type"], "pong");
}

/// Issue 10, item 2: a client that reads, but slowly, must not hold a
/// socket for as long as a big snapshot would take it: the message as a
/// whole has a deadline (`MIN_SEND_BYTES_PER_SEC`), not only each fragment.
/// The reader is fast enough that no fragment waits 10 s (the kernel wakes
/// a blocked writer only after half its send buffer drained, so a slower
/// trickle is cut by the per-fragment deadline already), and far slower
/// than the floor set here.
#[tokio::test]
async fn a_client_reading_a_big_snapshot_too_slowly_is_closed_with_4408() {
    // ~15 MB: far more than the socket buffers hold.
    let (_db, _pool, r, gw) = big_snapshot_gateway(40_000, |cfg| {
        // 15 MB must leave within 10 s + 7.5 s; at 400 KB/s it takes ~38 s.
        cfg.min_send_bytes_per_sec = 2_000_000;
    })
    .await;
    let mut ws = never_reading(&gw.ws_url(&format!("token={}", token(r))), gw.addr).await;
    // When the snapshot's bytes begin (after the greeting and the read of
    // 40,000 orders, whose time is not the client's to pay).
    let (began_tx, began) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        const RATE: f64 = 400_000.0;
        let mut buf = vec![0u8; 16 * 1024];
        let mut began_tx = Some(began_tx);
        let mut start = None;
        let mut read = 0usize;
        loop {
            match ws.get_mut().read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
            if start.is_none() && read > 4096 {
                let now = tokio::time::Instant::now();
                start = Some((now, read));
                let _ = began_tx.take().map(|tx| tx.send(now));
            }
            if let Some((at, base)) = start {
                let due = Duration::from_secs_f64((read - base) as f64 / RATE);
                tokio::time::sleep_until(at + due).await;
            }
        }
    });
    let began = tokio::time::timeout(Duration::from_secs(30), began)
        .await
        .expect("the snapshot begins")
        .unwrap();
    // Closed at its deadline (17.5 s after the snapshot began), long before
    // the ~38 s it would take to be read at this pace.
    let left = Duration::from_secs(27).saturating_sub(began.elapsed());
    eventually(left, || async {
        (local_connections(&gw, r).await == 0).then_some(())
    })
    .await;
    let m = metrics(&format!("http://{}", gw.addr)).await;
    assert!(
        m.contains(r#"orders_gateway_connections_closed_total{code="4408"}"#),
        "{m}"
    );
    reader.abort();
}

/// A send blocked on a client that does not read is no shelter: a member
/// removed from `restaurant_members` loses the socket within the re-check
/// period (4403), not only when the send's own 10 s deadline ends it.
#[tokio::test]
async fn a_removed_member_is_closed_while_its_snapshot_send_is_blocked() {
    let (_db, pool, r, gw) = big_snapshot_gateway(20_000, |cfg| {
        cfg.membership_recheck_ms = 300;
    })
    .await;
    let user = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO restaurant_members (user_id, restaurant_id, role) VALUES ($1, $2, 'staff')",
    )
    .bind(user)
    .bind(r)
    .execute(&pool)
    .await
    .unwrap();
    let member = token_with(json!({ "sub": user, "exp": Utc::now().timestamp() + 600 }));
    let _ws = never_reading(&gw.ws_url(&format!("token={member}")), gw.addr).await;
    eventually(Duration::from_secs(10), || async {
        (local_connections(&gw, r).await == 1).then_some(())
    })
    .await;
    // Let the snapshot fill the socket buffers and block.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sqlx::query("DELETE FROM restaurant_members WHERE user_id = $1")
        .bind(user)
        .execute(&pool)
        .await
        .unwrap();
    eventually(Duration::from_secs(4), || async {
        (local_connections(&gw, r).await == 0).then_some(())
    })
    .await;
    let m = metrics(&format!("http://{}", gw.addr)).await;
    assert!(
        m.contains(r#"orders_gateway_connections_closed_total{code="4403"}"#),
        "{m}"
    );
}
