//! The poller's wake-up (`LISTEN orders_changed`): real PostgreSQL with the
//! migrations' triggers, real Redis, gateways in-process or as processes
//! (where their own /metrics or pg_stat_activity must be told apart).
//!
//! The poll interval is 30 s everywhere, so a delivery within `WAKE` can
//! only come from the wake-up; the periodic tick stays out of the way.

use std::collections::HashSet;
use std::time::Duration;

use orders_gateway::config::Config;
use uuid::Uuid;

use crate::poller::{assert_created_once, board, next_event, order_id, read_until};
use crate::support::{
    Gateway, GatewayProcess, Redis, TestDb, config, eventually, insert_order, insert_order_in,
    metrics, token,
};

const INTERVAL_MS: u64 = 30_000;
/// Far below the interval; generous for a loaded machine.
const WAKE: Duration = Duration::from_secs(10);

fn cfg(redis: &Redis, db: &TestDb) -> Config {
    let mut c = config();
    c.redis_url = Some(redis.url());
    c.database_url = Some(db.url.clone());
    c.poll_interval_ms = INTERVAL_MS;
    c
}

fn process_env(redis: &Redis, db: &TestDb) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis.url()),
        ("DATABASE_URL", db.url.clone()),
        ("POLL_INTERVAL_MS", INTERVAL_MS.to_string()),
        ("PRESENCE_TTL_MS", "2000".into()),
    ]
}

/// Backends holding the wake-up's `LISTEN` in this test's database.
async fn listen_connections(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = $1",
    )
    .bind(orders_gateway::poller::wakeup::APPLICATION_NAME)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Until exactly `n` listen connections exist.
async fn listeners_become(pool: &sqlx::PgPool, n: i64) {
    eventually(WAKE, || async {
        (listen_connections(pool).await == n).then_some(())
    })
    .await
}

/// The value of one series in Prometheus text (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An order committed with triggers off (superuser): it notifies nobody,
/// so only a full tick can find it.
async fn insert_silently(pool: &sqlx::PgPool, r: Uuid) -> Uuid {
    let id = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    insert_order_in(&mut tx, id, r, "pending", 1).await;
    tx.commit().await.unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_the_poller_long_before_its_interval() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let mut c = cfg(&redis, &db);
    // Explicitly, and spelled differently from DATABASE_URL.
    c.database_listen_url = Some(db.url.replacen("postgres://", "postgresql://", 1));
    let gw = Gateway::start(c).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let pool = db.pool().await;
    listeners_become(&pool, 1).await;

    let id = insert_order(&pool, r, "pending", 2).await;
    let ev = next_event(&mut ws, WAKE).await;
    assert_eq!(
        (ev["type"].as_str(), order_id(&ev)),
        (Some("order_created"), id)
    );
    assert_eq!(ev["order"]["items"].as_array().unwrap().len(), 2);

    // An update, and a change to an item alone, wake it too.
    sqlx::query("UPDATE orders SET order_status = 'confirmed' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let ev = next_event(&mut ws, WAKE).await;
    assert_eq!(ev["type"], "order_status_changed", "{ev}");
    assert_eq!(ev["previous_status"], "pending");
    ws.silent_for(Duration::from_millis(500)).await;
}

/// The horizon argument for immediate ticks: T1 starts and writes (its row
/// stamped with T1's start), T2 starts later, writes and commits, and its
/// notification ticks at once while T1 is still open; T1 commits after it.
/// The immediate tick after T2 must not have moved past T1's start, or T1's
/// row would wait for the next periodic tick (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_older_than_a_notified_one_and_committed_after_it_is_delivered() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let mut c = cfg(&redis, &db);
    c.poll_overlap_ms = 0; // only the open-transaction horizon protects T1
    let gw = Gateway::start(c).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let pool = db.pool().await;
    listeners_become(&pool, 1).await;
    let existing = insert_order(&pool, r, "pending", 1).await;
    assert_eq!(order_id(&next_event(&mut ws, WAKE).await), existing);

    let mut t1 = pool.begin().await.unwrap();
    let older = Uuid::new_v4();
    insert_order_in(&mut t1, older, r, "pending", 1).await;
    sqlx::query("UPDATE orders SET order_status = 'preparing' WHERE id = $1")
        .bind(existing)
        .execute(&mut *t1)
        .await
        .unwrap();
    // Well past the smallest overlap (250 ms): only the horizon covers T1.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut newer = Vec::new();
    for _ in 0..3 {
        let id = insert_order(&pool, r, "pending", 0).await;
        let ev = next_event(&mut ws, WAKE).await;
        assert_eq!(
            (ev["type"].as_str(), order_id(&ev)),
            (Some("order_created"), id)
        );
        newer.push(id);
    }
    t1.commit().await.unwrap();

    let events = read_until(&mut ws, WAKE, |e| e.len() == 2).await;
    let by_id: std::collections::HashMap<Uuid, &serde_json::Value> =
        events.iter().map(|e| (order_id(e), e)).collect();
    assert_eq!(by_id[&older]["type"], "order_created");
    assert_eq!(by_id[&existing]["type"], "order_status_changed");
    assert_eq!(by_id[&existing]["previous_status"], "pending");
    ws.silent_for(Duration::from_millis(500)).await;
}

/// A burst of thousands of notifications is a handful of ticks, and
/// many concurrent commits are each delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_notifications_is_a_handful_of_ticks() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let gw = GatewayProcess::start(&process_env(&redis, &db)).await;
    let base = format!("http://{}", gw.addr);
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let pool = db.pool().await;
    listeners_become(&pool, 1).await;
    let id = insert_order(&pool, r, "pending", 0).await;
    assert_eq!(order_id(&next_event(&mut ws, WAKE).await), id);

    let before = metrics(&base).await;
    // 5,000 distinct notifications in one commit: they arrive together.
    sqlx::query(
        "SELECT pg_notify('orders_changed', gen_random_uuid()::text) \
         FROM generate_series(1, 5000)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let series = "orders_gateway_poller_wakeups_total";
    eventually(WAKE, || async {
        let m = metrics(&base).await;
        (metric(&m, series) - metric(&before, series) >= 5000.0).then_some(())
    })
    .await;
    // Let the ticks they asked for finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = metrics(&base).await;
    let ticks = |m: &str| metric(m, "orders_gateway_poller_ticks_total{cause=\"notify\"}");
    let burst_ticks = ticks(&after) - ticks(&before);
    assert!(
        (1.0..=20.0).contains(&burst_ticks),
        "5,000 notifications made {burst_ticks} ticks"
    );

    // 400 orders committed one by one from 4 connections.
    let mut writers = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..100 {
                ids.push(insert_order(&pool, r, "pending", 1).await);
            }
            ids
        }));
    }
    let mut ids = HashSet::new();
    for w in writers {
        ids.extend(w.await.unwrap());
    }
    let events = read_until(&mut ws, WAKE * 3, |e| e.len() >= ids.len()).await;
    assert_created_once(&events, &ids);
    ws.silent_for(Duration::from_millis(500)).await;
}

/// The listen connection is killed: the leader reconnects and polls
/// everything once, which finds a commit that notified nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listen_connection_reconnects_and_polls_everything() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let gw = GatewayProcess::start(&process_env(&redis, &db)).await;
    let base = format!("http://{}", gw.addr);
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let pool = db.pool().await;
    listeners_become(&pool, 1).await;
    let first = insert_order(&pool, r, "pending", 0).await;
    assert_eq!(order_id(&next_event(&mut ws, WAKE).await), first);
    let before = metrics(&base).await;

    // Committed without a notification: nothing wakes the poller for it.
    let silent = insert_silently(&pool, r).await;
    ws.silent_for(Duration::from_secs(2)).await;

    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = $1) t",
    )
    .bind(orders_gateway::poller::wakeup::APPLICATION_NAME)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(killed, 1, "one LISTEN connection");
    let ev = next_event(&mut ws, WAKE).await;
    assert_eq!(
        (ev["type"].as_str(), order_id(&ev)),
        (Some("order_created"), silent)
    );

    let after = metrics(&base).await;
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert!(
        delta("orders_gateway_poller_listen_reconnects_total") >= 1.0,
        "{after}"
    );
    assert!(
        delta("orders_gateway_poller_ticks_total{cause=\"reconnect\"}") >= 1.0,
        "{after}"
    );
    assert_eq!(metric(&after, "orders_gateway_poller_listening"), 1.0);
    // And it listens again.
    listeners_become(&pool, 1).await;
    let again = insert_order(&pool, r, "pending", 0).await;
    assert_eq!(order_id(&next_event(&mut ws, WAKE).await), again);
}

/// Only the leader listens; when it steps down the new leader does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_moves_with_leadership() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let mut c = cfg(&redis, &db);
    // Followers retry every TTL/3 = 1 s (the 30 s interval would be slow).
    c.leader_ttl_ms = Some(3000);
    let a = Gateway::start(c.clone()).await;
    let b = Gateway::start(c).await;
    let r = Uuid::new_v4();
    let q = format!("token={}", token(r));
    let (on_b, _) = board(b.ws_url(&q)).await;
    let pool = db.pool().await;
    listeners_become(&pool, 1).await;
    let holder = eventually(WAKE, || async {
        let v = redis.cmd(&["GET", "og:{og}:leader"]).await.ok()?;
        let token: Option<String> = redis::from_redis_value(v).ok()?;
        orders_gateway::broker::Lease::holder_of(&token?)
    })
    .await;
    // Shut the leader down; watch from the other replica.
    let (leader, mut on_follower) = if holder == a.instance_id {
        (a, on_b)
    } else {
        (b, board(a.ws_url(&q)).await.0)
    };
    leader.shutdown().await;
    // The follower takes over (within a retry) and listens: still one.
    listeners_become(&pool, 0).await;
    listeners_become(&pool, 1).await;
    let id = insert_order(&pool, r, "pending", 0).await;
    let ev = next_event(&mut on_follower, WAKE).await;
    assert_eq!(order_id(&ev), id);
}

/// DATABASE_LISTEN_URL=off: no listen connection, the periodic poll alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_wake_up_off_the_periodic_poll_delivers() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    let mut c = cfg(&redis, &db);
    c.database_listen_url = Some("off".into());
    c.poll_interval_ms = 200;
    let gw = Gateway::start(c).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = board(gw.ws_url(&format!("token={}", token(r)))).await;
    let pool = db.pool().await;
    let id = insert_order(&pool, r, "pending", 1).await;
    assert_eq!(order_id(&next_event(&mut ws, WAKE).await), id);
    assert_eq!(listen_connections(&pool).await, 0);
}
