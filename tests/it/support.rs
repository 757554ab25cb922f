//! Test harness: private redis-servers, throwaway PostgreSQL databases,
//! gateways in-process or as real processes, WebSocket clients and tokens.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use orders_gateway::app::App;
use orders_gateway::config::Config;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const PUBLISH_KEY: &str = "publish-key-0123456789abcdef";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,orders_gateway=warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

// ---------------------------------------------------------------- Redis

/// A private redis-server on a free port: stop, restart, kill at will.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
        };
        r.spawn().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if self.cmd(&["PING"]).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on {}", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// `PUBLISH` from an outside client, as an order service would.
    pub async fn publish(&self, channel: &str, payload: &str) -> i64 {
        let mut conn = self.client().await;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- PostgreSQL

/// A throwaway database with the schema applied; dropped at the end.
pub struct TestDb {
    pub url: String,
    name: String,
    admin: String,
}

pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin = admin_database_url();
        let name = format!("og_test_{}", Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("PostgreSQL reachable at TEST_DATABASE_URL (scripts/test.sh provides one)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let (base, _) = admin.rsplit_once('/').unwrap();
        let url = format!("{base}/{name}");
        let db = orders_gateway::db::Database::connect(&url).unwrap();
        db.migrate().await.unwrap();
        db.pool().close().await;
        TestDb { url, name, admin }
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop may run inside or outside a runtime: use a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                }
            });
        })
        .join();
    }
}

/// Insert an order with `items` items; returns its id.
pub async fn insert_order(
    pool: &sqlx::PgPool,
    restaurant: Uuid,
    status: &str,
    items: usize,
) -> Uuid {
    let id = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    insert_order_in(&mut tx, id, restaurant, status, items).await;
    tx.commit().await.unwrap();
    id
}

pub async fn insert_order_in(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    restaurant: Uuid,
    status: &str,
    items: usize,
) {
    sqlx::query(
        "INSERT INTO orders (id, order_number, restaurant_id, table_number, customer_name, \
         customer_phone, order_status, payment_status, payment_method, total_price, estimated_time) \
         VALUES ($1, $2, $3, 7, 'Guest', '+100', $4, 'pending', 'cash', 25.50, 15)",
    )
    .bind(id)
    .bind(format!("ORD-{}", &id.simple().to_string()[..8]))
    .bind(restaurant)
    .bind(status)
    .execute(&mut *conn)
    .await
    .unwrap();
    for _ in 0..items {
        sqlx::query(
            "INSERT INTO order_items (id, order_id, menu_item_id, quantity, unit_price) \
             VALUES ($1, $2, $3, 2, 12.75)",
        )
        .bind(Uuid::new_v4())
        .bind(id)
        .bind(Uuid::new_v4())
        .execute(&mut *conn)
        .await
        .unwrap();
    }
}

// ---------------------------------------------------------------- gateways

pub fn config() -> Config {
    init();
    let mut c = Config::for_tests(SECRET);
    c.publish_api_key = Some(PUBLISH_KEY.into());
    c.presence_ttl_ms = 2000;
    c.poll_interval_ms = 200;
    c.poll_overlap_ms = 1000;
    c
}

/// A gateway running in this process.
pub struct Gateway {
    pub addr: SocketAddr,
    pub instance_id: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Gateway {
    pub async fn start(mut cfg: Config) -> Gateway {
        init();
        cfg.validate().expect("test config is valid");
        Self::start_as_is(cfg).await
    }

    /// Start without validating `cfg` (to provoke failures validation
    /// would stop at the door).
    pub async fn start_as_is(cfg: Config) -> Gateway {
        init();
        let instance_id = cfg.instance_id().to_string();
        let app = App::build(cfg).await.expect("gateway builds");
        let addr = app.local_addr();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(app.run(async move { s.cancelled().await }));
        Gateway {
            addr,
            instance_id,
            stop,
            task: Some(task),
        }
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/api/ws/orders/live?{query}", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGTERM-equivalent: drain and stop.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The real binary as a child process (for signals).
pub struct GatewayProcess {
    pub addr: SocketAddr,
    pub instance_id: String,
    child: Child,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orders-gateway"))
}

impl GatewayProcess {
    pub async fn start(env: &[(&str, String)]) -> GatewayProcess {
        // The health check below uses reqwest, which needs the crypto provider.
        init();
        let port = free_port();
        let instance_id = format!("proc-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let mut cmd = Command::new(binary());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("JWT_SECRET", SECRET)
            .env("PUBLISH_API_KEY", PUBLISH_KEY)
            .env("INSTANCE_ID", &instance_id)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Owned by the guard from the start: killed and reaped on any exit.
        let process = GatewayProcess {
            addr,
            instance_id,
            child: cmd.spawn().expect("gateway binary runs"),
        };
        let client = reqwest::Client::new();
        for _ in 0..400 {
            if let Ok(r) = client.get(format!("http://{addr}/healthz")).send().await
                && r.status().is_success()
            {
                return process;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("gateway process did not become healthy");
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/api/ws/orders/live?{query}", self.addr)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for exit; returns the exit code.
    pub async fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- tokens

pub fn token_with(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A valid HS256 token for `restaurant`, one hour.
pub fn token(restaurant: Uuid) -> String {
    token_with(json!({
        "sub": Uuid::new_v4(),
        "restaurant_id": restaurant,
        "exp": Utc::now().timestamp() + 3600,
    }))
}

// ---------------------------------------------------------------- WebSocket client

pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

#[derive(Debug, PartialEq)]
pub enum Next {
    Json(Value),
    Close(u16, String),
    Ended,
    Timeout,
}

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        Self::connect_with(url, &[]).await
    }

    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Ws {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (stream, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade succeeds");
        Ws { stream }
    }

    pub async fn next(&mut self, limit: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Next::Timeout,
                Ok(None) => return Next::Ended,
                Ok(Some(Err(_))) => return Next::Ended,
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Next::Json(
                        serde_json::from_str(t.as_str()).expect("server sends JSON"),
                    );
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    return match f {
                        Some(f) => Next::Close(f.code.into(), f.reason.to_string()),
                        None => Next::Close(1005, String::new()),
                    };
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next JSON frame, or panic.
    pub async fn json(&mut self) -> Value {
        match self.next(Duration::from_secs(10)).await {
            Next::Json(v) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Next frame that is not a snapshot/connection_established.
    pub async fn event(&mut self) -> Value {
        loop {
            let v = self.json().await;
            let t = v["type"].as_str().unwrap_or_default();
            if t != "connection_established" && t != "snapshot" {
                return v;
            }
        }
    }

    /// Expect a close frame; returns its code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.next(Duration::from_secs(10)).await {
                Next::Close(code, _) => return code,
                Next::Json(_) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Assert nothing arrives for `d`.
    pub async fn silent_for(&mut self, d: Duration) {
        match self.next(d).await {
            Next::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send_raw(
        &mut self,
        m: Message,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.stream.send(m).await
    }
}

/// A dashboard connected and past its greeting (and snapshot, if any).
pub async fn dashboard(url: &str) -> (Ws, Value) {
    let mut ws = Ws::connect(url).await;
    let hello = ws.json().await;
    assert_eq!(hello["type"], "connection_established", "{hello}");
    (ws, hello)
}

// ---------------------------------------------------------------- orders and publishing

pub fn order_json(restaurant: Uuid, id: Uuid, status: &str) -> Value {
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    json!({
        "id": id, "order_number": "ORD-1", "restaurant_id": restaurant, "table_number": 5,
        "customer_name": "John Doe", "customer_phone": "+1234567890", "order_status": status,
        "payment_status": "pending", "payment_method": "cash", "total_price": 25.5,
        "estimated_time": 15, "created_at": now, "updated_at": now,
        "items": [{"id": Uuid::new_v4(), "menu_item_id": Uuid::new_v4(), "quantity": 2, "unit_price": 12.75}]
    })
}

pub async fn post_event(base: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/orders/events"))
        .bearer_auth(PUBLISH_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The gateway's Prometheus text.
pub async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub async fn get_json(url: &str, token: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Poll `check` until it returns Some, up to `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- TCP proxy

/// A loopback TCP proxy in front of a server, to break links the way
/// networks do: [`TcpProxy::stall`] silently stops carrying bytes on the
/// connections open now (a middlebox that lost its state, a host that
/// vanished) while new connections work; [`TcpProxy::reset`] closes them;
/// [`TcpProxy::deafen_subscribers`] silences every connection that sent a
/// SUBSCRIBE, now and later, while command connections keep working.
pub struct TcpProxy {
    pub port: u16,
    state: std::sync::Arc<tokio::sync::watch::Sender<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy, Default)]
struct ProxyState {
    /// A connection born before a bump stops moving (stall) or is closed (reset).
    stall: u64,
    reset: u64,
    deaf_subscribers: bool,
}

/// Carry bytes from `from` to `to` until EOF, `stop` says so, or the
/// connection is silenced (then wait, holding the sockets, until `stop`).
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: tokio::sync::watch::Receiver<ProxyState>,
    born: ProxyState,
    subscriber: std::sync::Arc<std::sync::atomic::AtomicBool>,
    inspect: bool,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let silenced = |s: &ProxyState| {
        s.stall > born.stall || (s.deaf_subscribers && subscriber.load(Ordering::Relaxed))
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if silenced(&rx.borrow()) {
            let _ = rx.wait_for(|s| s.reset > born.reset).await;
            return;
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = rx.changed() => continue,
        };
        if inspect
            && buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
        {
            subscriber.store(true, Ordering::Relaxed);
        }
        if silenced(&rx.borrow()) {
            let _ = rx.wait_for(|s| s.reset > born.reset).await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl TcpProxy {
    pub async fn start(target_port: u16) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, _) = tokio::sync::watch::channel(ProxyState::default());
        let state = std::sync::Arc::new(tx);
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let born = *st.borrow();
                let rx = st.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let subscriber = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let up = carry(ri, wo, rx.clone(), born, subscriber.clone(), true);
                    let down = carry(ro, wi, rx.clone(), born, subscriber, false);
                    // Either direction ending closes both: dropping the halves.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        TcpProxy { port, state, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Freeze every connection open now; later ones are carried.
    pub fn stall(&self) {
        self.state.send_modify(|s| s.stall += 1);
    }

    /// Close every connection open now.
    pub fn reset(&self) {
        self.state.send_modify(|s| s.reset += 1);
    }

    /// Silence pub/sub connections (on or off); commands keep flowing.
    pub fn deafen_subscribers(&self, on: bool) {
        self.state.send_modify(|s| s.deaf_subscribers = on);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `n` open orders of `restaurant` in one statement (no items): big
/// snapshots without a slow test. Stamped an hour ago, as orders already
/// there before the gateway started: they are in snapshots, and the poller
/// does not announce them as new (tens of thousands of events would cut a
/// socket off with 4408 before what the test is about can happen).
pub async fn bulk_orders(pool: &sqlx::PgPool, restaurant: Uuid, n: i32) {
    sqlx::query(
        "INSERT INTO orders (id, order_number, restaurant_id, table_number, customer_name, \
         customer_phone, order_status, payment_status, payment_method, total_price, estimated_time, \
         created_at, updated_at) \
         SELECT gen_random_uuid(), 'ORD-' || g, $1, 7, 'Guest number ' || g, '+100', 'pending', \
         'pending', 'cash', 25.50, 15, now() - interval '1 hour', now() - interval '1 hour' \
         FROM generate_series(1, $2) g",
    )
    .bind(restaurant)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}
