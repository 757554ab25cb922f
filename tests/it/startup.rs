//! Start-up: a bad configuration stops the process with one line naming
//! the variable; the embedded defaults serve with no Redis and no database.

use crate::support::{GatewayProcess, binary, dashboard, order_json, post_event, token};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run the binary with `env`; a process still running after 10 s (the
/// configuration was accepted) is killed and reported as `None`.
fn start_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BIND_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    (code, stderr)
}

#[test]
fn bad_configuration_is_one_line_naming_the_variable() {
    let secret = ("JWT_SECRET", "0123456789abcdef0123");
    for (env, var) in [
        (vec![], "JWT_SECRET"),
        (vec![("JWT_SECRET", "short")], "JWT_SECRET"),
        (vec![secret, ("BIND_ADDR", "nowhere")], "BIND_ADDR"),
        (
            vec![secret, ("POLL_INTERVAL_MS", "soon")],
            "POLL_INTERVAL_MS",
        ),
        (vec![secret, ("POLL_INTERVAL_MS", "5")], "POLL_INTERVAL_MS"),
        (vec![secret, ("REDIS_URL", "http://x")], "REDIS_URL"),
        (vec![secret, ("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
        (
            vec![
                secret,
                ("DATABASE_URL", "postgres://db/orders"),
                ("DATABASE_LISTEN_URL", "no"),
            ],
            "DATABASE_LISTEN_URL",
        ),
        (
            vec![secret, ("DATABASE_LISTEN_URL", "postgres://db/orders")],
            "DATABASE_LISTEN_URL",
        ),
        (vec![secret, ("LOG_FORMAT", "xml")], "LOG_FORMAT"),
        (vec![secret, ("PUBLISH_API_KEY", "abc")], "PUBLISH_API_KEY"),
        (vec![("JWT_JWKS_URL", "ftp://keys")], "JWT_JWKS_URL"),
        // Absurd durations and sizes: each used to be accepted and to blow
        // up later in date or Instant arithmetic inside a background task
        // (POLL_OVERLAP_MS killed the poller on every replica).
        (
            vec![secret, ("POLL_OVERLAP_MS", "18446744073709551615")],
            "POLL_OVERLAP_MS",
        ),
        (
            vec![secret, ("POLL_OVERLAP_MS", "86400000")],
            "POLL_OVERLAP_MS",
        ),
        (
            vec![secret, ("HEARTBEAT_INTERVAL_MS", "18446744073709551615")],
            "HEARTBEAT_INTERVAL_MS",
        ),
        (
            vec![secret, ("SHUTDOWN_DRAIN_MS", "18446744073709551615")],
            "SHUTDOWN_DRAIN_MS",
        ),
        (
            vec![secret, ("LEADER_TTL_MS", "18446744073709551615")],
            "LEADER_TTL_MS",
        ),
        (
            vec![secret, ("PRESENCE_TTL_MS", "18446744073709551615")],
            "PRESENCE_TTL_MS",
        ),
        (
            vec![secret, ("HISTORY_MAX_AGE_SECS", "18446744073709551615")],
            "HISTORY_MAX_AGE_SECS",
        ),
        (
            vec![secret, ("HISTORY_MAX_EVENTS", "18446744073709551615")],
            "HISTORY_MAX_EVENTS",
        ),
        (
            vec![secret, ("CLIENT_MESSAGE_RATE", "4000000000")],
            "CLIENT_MESSAGE_RATE",
        ),
        (
            vec![secret, ("MAX_CONNECTIONS", "18446744073709551615")],
            "MAX_CONNECTIONS",
        ),
        (
            vec![secret, ("JWT_LEEWAY_SECONDS", "86400")],
            "JWT_LEEWAY_SECONDS",
        ),
        (
            vec![secret, ("JWT_JWKS_MAX_AGE_SECS", "0")],
            "JWT_JWKS_MAX_AGE_SECS",
        ),
        (
            vec![secret, ("MIN_SEND_BYTES_PER_SEC", "0")],
            "MIN_SEND_BYTES_PER_SEC",
        ),
        (
            vec![secret, ("SEND_QUEUE_CAPACITY", "0")],
            "SEND_QUEUE_CAPACITY",
        ),
        (
            vec![secret, ("MAX_CONNECTIONS_PER_RESTAURANT", "0")],
            "MAX_CONNECTIONS_PER_RESTAURANT",
        ),
        (
            vec![secret, ("MEMBERSHIP_RECHECK_MS", "18446744073709551615")],
            "MEMBERSHIP_RECHECK_MS",
        ),
        (
            vec![secret, ("REDIS_LOST_CLOSE_MS", "1")],
            "REDIS_LOST_CLOSE_MS",
        ),
        (
            vec![secret, ("HEADER_READ_TIMEOUT_MS", "0")],
            "HEADER_READ_TIMEOUT_MS",
        ),
        (
            vec![secret, ("HANDSHAKE_TIMEOUT_MS", "18446744073709551615")],
            "HANDSHAKE_TIMEOUT_MS",
        ),
        (vec![secret, ("MAX_HANDSHAKES", "0")], "MAX_HANDSHAKES"),
    ] {
        let (code, stderr) = start_with(&env);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{env:?}: {stderr}");
        assert!(stderr.contains(var), "{env:?} should name {var}: {stderr}");
    }
}

#[test]
fn redis_modes_are_exclusive_and_each_url_checked() {
    let secret = ("JWT_SECRET", "0123456789abcdef0123");
    let url = "redis://127.0.0.1:1";
    for (env, var) in [
        (
            vec![secret, ("REDIS_URL", url), ("REDIS_CLUSTER_URLS", url)],
            "REDIS_CLUSTER_URLS",
        ),
        (
            vec![secret, ("REDIS_URL", url), ("REDIS_SENTINEL_URLS", url)],
            "REDIS_SENTINEL_URLS",
        ),
        (
            vec![secret, ("REDIS_CLUSTER_URLS", "redis://a:1,,redis://b:2")],
            "REDIS_CLUSTER_URLS",
        ),
        (
            vec![secret, ("REDIS_CLUSTER_URLS", "redis://a:1,http://b")],
            "REDIS_CLUSTER_URLS",
        ),
        (
            vec![secret, ("REDIS_SENTINEL_URLS", url)],
            "REDIS_SENTINEL_MASTER",
        ),
        (
            vec![secret, ("REDIS_SENTINEL_MASTER", "mymaster")],
            "REDIS_SENTINEL_MASTER",
        ),
        (
            vec![
                secret,
                ("REDIS_SENTINEL_URLS", "sentinel:26379"),
                ("REDIS_SENTINEL_MASTER", "mymaster"),
            ],
            "REDIS_SENTINEL_URLS",
        ),
    ] {
        let (code, stderr) = start_with(&env);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{env:?}: {stderr}");
        assert!(stderr.contains(var), "{env:?} should name {var}: {stderr}");
    }
}

#[tokio::test]
async fn embedded_defaults_serve_without_redis_or_database() {
    let gw = GatewayProcess::start(&[]).await;
    let base = format!("http://{}", gw.addr);
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    let board = reqwest::get(format!("{base}/")).await.unwrap();
    assert!(
        board.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let r = uuid::Uuid::new_v4();
    let (mut ws, _) = dashboard(&gw.ws_url(&format!("token={}", token(r)))).await;
    let (s, _) = post_event(
        &base,
        &serde_json::json!({"type": "order_created", "order": order_json(r, uuid::Uuid::new_v4(), "pending")}),
    )
    .await;
    assert_eq!(s, 202);
    assert_eq!(ws.event().await["type"], "order_created");
}
