//! Catch-up: resume from `last_event_id`, resync when history cannot
//! tell, and the snapshot/live seam.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use orders_gateway::config::Config;

use crate::ha::{RedisCluster, RedisSentinel, SENTINEL_MASTER};
use crate::support::{
    Gateway, Next, Redis, TestDb, Ws, config, dashboard, insert_order, order_json, post_event,
    token,
};

async fn publish(gw: &Gateway, r: Uuid, kind: &str, status: &str) -> String {
    let (s, body) = post_event(
        &format!("http://{}", gw.addr),
        &json!({"type": kind, "order": order_json(r, Uuid::new_v4(), status)}),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    body["event_id"].as_str().unwrap().to_string()
}

async fn redis_replicas(redis: &Redis, db: Option<&TestDb>, n: usize) -> Vec<Gateway> {
    replicas(n, db, |c| c.redis_url = Some(redis.url())).await
}

/// `n` replicas on the Redis that `redis` configures.
async fn replicas(n: usize, db: Option<&TestDb>, redis: impl Fn(&mut Config)) -> Vec<Gateway> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut cfg = config();
        redis(&mut cfg);
        cfg.database_url = db.map(|d| d.url.clone());
        out.push(Gateway::start(cfg).await);
    }
    out
}

#[tokio::test]
async fn resume_replays_exactly_what_was_missed_then_goes_live() {
    let gw = Gateway::start(config()).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut ws, _) = dashboard(&url).await;
    publish(&gw, r, "order_created", "pending").await;
    let seen = ws.event().await["event_id"].as_str().unwrap().to_string();
    drop(ws);
    let mut missed = Vec::new();
    for _ in 0..5 {
        missed.push(publish(&gw, r, "order_created", "pending").await);
    }
    let mut ws = Ws::connect(&format!("{url}&last_event_id={seen}")).await;
    let hello = ws.json().await;
    assert_eq!(hello["resumed"], true);
    for id in &missed {
        assert_eq!(ws.json().await["event_id"], *id.as_str());
    }
    let live = publish(&gw, r, "order_created", "pending").await;
    assert_eq!(
        ws.json().await["event_id"],
        live.as_str(),
        "no gap, no duplicate at the seam"
    );
    ws.silent_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn resume_works_across_replicas() {
    let redis = Redis::start().await;
    resume_across(&redis_replicas(&redis, None, 2).await).await;
}

#[tokio::test]
async fn resume_works_across_replicas_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    resume_across(&replicas(2, None, |c| c.redis_cluster_urls = Some(cluster.urls())).await).await;
}

#[tokio::test]
async fn resume_works_across_replicas_with_sentinel() {
    let s = RedisSentinel::start().await;
    let gws = replicas(2, None, |c| {
        c.redis_sentinel_urls = Some(s.urls());
        c.redis_sentinel_master = Some(SENTINEL_MASTER.into());
    })
    .await;
    resume_across(&gws).await;
}

/// Seen on one replica, missed events published through both, resumed on
/// the other: exactly the missed events, in order.
async fn resume_across(gws: &[Gateway]) {
    let r = Uuid::new_v4();
    let t = token(r);
    let (mut ws, _) = dashboard(&gws[0].ws_url(&format!("token={t}"))).await;
    publish(&gws[0], r, "order_created", "pending").await;
    let seen = ws.event().await["event_id"].as_str().unwrap().to_string();
    drop(ws);
    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(publish(&gws[i % 2], r, "order_created", "pending").await);
    }
    let mut ws = Ws::connect(&gws[1].ws_url(&format!("token={t}&last_event_id={seen}"))).await;
    assert_eq!(ws.json().await["resumed"], true);
    for id in &missed {
        assert_eq!(ws.json().await["event_id"], *id.as_str());
    }
    ws.silent_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn unknown_or_lost_history_means_resync_then_snapshot() {
    let mut redis = Redis::start().await;
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let gws = redis_replicas(&redis, Some(&db), 1).await;
    let gw = &gws[0];
    let r = Uuid::new_v4();
    let open = insert_order(&pool, r, "pending", 1).await;
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut ws, hello) = dashboard(&url).await;
    assert_eq!(hello["resumed"], false);
    assert_eq!(ws.json().await["type"], "snapshot");
    publish(gw, r, "order_created", "pending").await;
    let seen = ws.event().await["event_id"].as_str().unwrap().to_string();
    drop(ws);

    // A well-formed id that is far in the past, and one of no history at all.
    for bogus in [
        "0000000000001-000000000001".to_string(),
        format!("{}-999999999999", &seen[..13]),
    ] {
        let mut ws = Ws::connect(&format!("{url}&last_event_id={bogus}")).await;
        assert_eq!(ws.json().await["resumed"], false);
        assert_eq!(ws.json().await["type"], "resync_required");
        let snap = ws.json().await;
        assert_eq!(snap["type"], "snapshot");
        assert_eq!(snap["orders"][0]["id"], open.to_string());
    }

    // History lost with a Redis restart: the old id cannot be resumed.
    redis.restart().await;
    let mut attempt = 0;
    let mut ws = loop {
        attempt += 1;
        let mut ws = Ws::connect(&format!("{url}&last_event_id={seen}")).await;
        match ws.next(Duration::from_secs(5)).await {
            Next::Json(v) => {
                assert_eq!(v["resumed"], false);
                break ws;
            }
            // 1013 while the replica is still reconnecting to Redis.
            Next::Close(1013, _) if attempt < 50 => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(ws.json().await["type"], "resync_required");
    assert_eq!(ws.json().await["type"], "snapshot");
}

#[tokio::test]
async fn snapshot_holds_exactly_the_open_orders_of_the_restaurant() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let (r, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut open = Vec::new();
    for status in ["pending", "confirmed", "preparing", "ready", "served"] {
        open.push(insert_order(&pool, r, status, 2).await);
    }
    insert_order(&pool, r, "completed", 1).await;
    insert_order(&pool, r, "cancelled", 1).await;
    insert_order(&pool, other, "pending", 1).await;
    let mut cfg = config();
    cfg.database_url = Some(db.url.clone());
    let gw = Gateway::start(cfg).await;
    let (mut ws, _) = dashboard(&gw.ws_url(&format!("token={}", token(r)))).await;
    let snap = ws.json().await;
    assert_eq!(snap["type"], "snapshot");
    let mut ids: Vec<String> = snap["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want: Vec<String> = open.iter().map(Uuid::to_string).collect();
    want.sort();
    assert_eq!(ids, want);
    let first = &snap["orders"][0];
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    assert_eq!(first["total_price"], 25.5);
    assert_eq!(first["items"][0]["unit_price"], 12.75);
    assert!(first["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(snap.get("last_event_id").is_some());
}

/// An order committed while a dashboard connects shows up exactly once:
/// in the snapshot or as an event, never both, never neither.
#[tokio::test]
async fn orders_committed_while_connecting_appear_exactly_once() {
    let redis = Redis::start().await;
    let db = TestDb::create().await;
    committed_while_connecting(&redis_replicas(&redis, Some(&db), 2).await, &db).await;
}

#[tokio::test]
async fn orders_committed_while_connecting_appear_exactly_once_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let db = TestDb::create().await;
    let gws = replicas(2, Some(&db), |c| {
        c.redis_cluster_urls = Some(cluster.urls())
    })
    .await;
    committed_while_connecting(&gws, &db).await;
}

#[tokio::test]
async fn orders_committed_while_connecting_appear_exactly_once_with_sentinel() {
    let s = RedisSentinel::start().await;
    let db = TestDb::create().await;
    let gws = replicas(2, Some(&db), |c| {
        c.redis_sentinel_urls = Some(s.urls());
        c.redis_sentinel_master = Some(SENTINEL_MASTER.into());
    })
    .await;
    committed_while_connecting(&gws, &db).await;
}

async fn committed_while_connecting(gws: &[Gateway], db: &TestDb) {
    let pool = db.pool().await;
    let r = Uuid::new_v4();
    // Keep the restaurant active so the poller watches it throughout.
    let (_keeper, _) = dashboard(&gws[0].ws_url(&format!("token={}", token(r)))).await;
    let rounds = 25;
    for round in 0..rounds {
        let gw = &gws[round % 2];
        let url = gw.ws_url(&format!("token={}", token(r)));
        let insert = {
            let pool = pool.clone();
            async move {
                // Vary where the commit lands relative to the connect.
                tokio::time::sleep(Duration::from_millis((round as u64 * 7) % 40)).await;
                insert_order(&pool, r, "pending", 1).await
            }
        };
        let connect = async {
            let mut ws = Ws::connect(&url).await;
            assert_eq!(ws.json().await["type"], "connection_established");
            ws
        };
        let (id, mut ws) = tokio::join!(insert, connect);
        let mut seen: HashMap<String, usize> = HashMap::new();
        // Poll interval 200 ms: an event arrives well within this.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match ws.next(left).await {
                Next::Json(v) => count(&v, &mut seen),
                Next::Timeout => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            seen.get(&id.to_string()),
            Some(&1),
            "round {round}: {seen:?}"
        );
    }
}

fn count(v: &Value, seen: &mut HashMap<String, usize>) {
    match v["type"].as_str() {
        Some("snapshot") => {
            for o in v["orders"].as_array().unwrap() {
                *seen
                    .entry(o["id"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
        Some("order_created") => {
            *seen
                .entry(v["order"]["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        _ => {}
    }
}
