//! One suite, every broker: numbering, dedup, history, fencing, delivery
//! order, presence and the leader lock behave the same in memory and Redis.

use std::sync::Arc;
use std::time::Duration;

use orders_gateway::broker::cluster::ClusterBroker;
use orders_gateway::broker::memory::MemoryBroker;
use orders_gateway::broker::redis::RedisBroker;
use orders_gateway::broker::sentinel::Sentinels;
use orders_gateway::broker::{
    Backend, BrokerError, ConnectionRecord, Cursor, History, Inbound, PollerStateDelta,
    PublishRequest,
};
use orders_gateway::config::HistoryLimits;
use orders_gateway::domain::{EventId, OrderVersion, RestaurantId};
use orders_gateway::tasks::Supervisor;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ha::{RedisCluster, RedisSentinel, SENTINEL_MASTER};
use crate::support::Redis;

const LIMITS: HistoryLimits = HistoryLimits {
    max_events: 5,
    max_age: Duration::from_secs(3600),
};

struct Subject {
    backend: Arc<dyn Backend>,
    inbound: mpsc::Receiver<Inbound>,
    /// The servers behind the broker, stopped on drop.
    _servers: Option<Box<dyn std::any::Any + Send>>,
    _stop: CancellationToken,
}

async fn memory() -> Subject {
    let (tx, rx) = mpsc::channel(1024);
    Subject {
        backend: Arc::new(MemoryBroker::new(tx, LIMITS)),
        inbound: rx,
        _servers: None,
        _stop: CancellationToken::new(),
    }
}

async fn redis() -> Subject {
    let redis = Redis::start().await;
    let (tx, rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    let broker = RedisBroker::start(&redis.url(), "conformance", tx, LIMITS, stop.clone())
        .await
        .unwrap();
    Subject {
        backend: Arc::new(broker),
        inbound: rx,
        _servers: Some(Box::new(redis)),
        _stop: stop,
    }
}

async fn cluster() -> Subject {
    let cluster = RedisCluster::start().await;
    let (tx, rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    let broker = ClusterBroker::start(
        &cluster.seeds(),
        "conformance",
        tx,
        LIMITS,
        stop.clone(),
        &Supervisor::new(stop.clone()),
    )
    .await
    .unwrap();
    Subject {
        backend: Arc::new(broker),
        inbound: rx,
        _servers: Some(Box::new(cluster)),
        _stop: stop,
    }
}

async fn sentinel() -> Subject {
    let sentinel = RedisSentinel::start().await;
    let (tx, rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    let sentinels = Sentinels {
        urls: sentinel.urls().split(',').map(String::from).collect(),
        master: SENTINEL_MASTER.into(),
    };
    let broker = RedisBroker::start_sentinel(sentinels, "conformance", tx, LIMITS, stop.clone())
        .await
        .unwrap();
    Subject {
        backend: Arc::new(broker),
        inbound: rx,
        _servers: Some(Box::new(sentinel)),
        _stop: stop,
    }
}

fn body(n: u32) -> String {
    format!(r#"{{"type":"order_updated","n":{n}}}"#)
}

fn req(r: RestaurantId, n: u32, version: Option<OrderVersion>) -> PublishRequest {
    PublishRequest {
        restaurant: r,
        version,
        body: body(n),
        fence: None,
    }
}

async fn subscribe_until_ready(s: &Subject, r: RestaurantId) {
    // The Redis receiver connects asynchronously after start.
    for _ in 0..100 {
        if s.backend.subscribe(r).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("could not subscribe");
}

async fn received(s: &mut Subject) -> (RestaurantId, String) {
    match tokio::time::timeout(Duration::from_secs(5), s.inbound.recv()).await {
        Ok(Some(Inbound::Event {
            restaurant,
            payload,
        })) => (restaurant, payload.to_string()),
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn numbering_delivery_and_isolation(mut s: Subject) {
    let a = RestaurantId(Uuid::new_v4());
    let b = RestaurantId(Uuid::new_v4());
    subscribe_until_ready(&s, a).await;
    let p1 = s.backend.publish(req(a, 1, None)).await.unwrap();
    let p2 = s.backend.publish(req(a, 2, None)).await.unwrap();
    let pb = s.backend.publish(req(b, 3, None)).await.unwrap();
    assert!(p1.event_id < p2.event_id);
    assert!(p1.event_id.to_string() < p2.event_id.to_string());
    assert_eq!(pb.event_id.seq, 1, "numbering is per restaurant");
    assert!(!p1.duplicate && !p2.duplicate);
    let (r1, f1) = received(&mut s).await;
    let (_, f2) = received(&mut s).await;
    assert_eq!(r1, a);
    assert_eq!(
        f1,
        format!(
            r#"{{"event_id":"{}","type":"order_updated","n":1}}"#,
            p1.event_id
        )
    );
    assert!(f2.contains(&p2.event_id.to_string()));
    // b is not subscribed: nothing of it arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.inbound.recv())
            .await
            .is_err()
    );
    assert_eq!(
        s.backend.position(a).await.unwrap(),
        Cursor::After(p2.event_id)
    );
    assert!(matches!(
        s.backend
            .position(RestaurantId(Uuid::new_v4()))
            .await
            .unwrap(),
        Cursor::Empty { .. }
    ));
}

async fn duplicates_answer_the_first_id_and_reach_nobody(mut s: Subject) {
    let a = RestaurantId(Uuid::new_v4());
    subscribe_until_ready(&s, a).await;
    let v = OrderVersion {
        order_id: Uuid::new_v4(),
        updated_at_micros: 1_700_000_000_000_000,
    };
    let first = s.backend.publish(req(a, 1, Some(v))).await.unwrap();
    let again = s.backend.publish(req(a, 1, Some(v))).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.event_id, first.event_id);
    let newer = OrderVersion {
        updated_at_micros: v.updated_at_micros + 1,
        ..v
    };
    assert!(
        !s.backend
            .publish(req(a, 2, Some(newer)))
            .await
            .unwrap()
            .duplicate
    );
    received(&mut s).await;
    let (_, second) = received(&mut s).await;
    assert!(
        second.contains(r#""n":2"#),
        "the duplicate was not broadcast"
    );
}

async fn history_replays_and_knows_its_limits(s: Subject) {
    let a = RestaurantId(Uuid::new_v4());
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(s.backend.publish(req(a, n, None)).await.unwrap().event_id);
    }
    // Five kept (LIMITS): after ids[2] is the oldest id that can resume.
    match s
        .backend
        .history_after(a, Cursor::After(ids[2]))
        .await
        .unwrap()
    {
        History::Events(frames) => {
            assert_eq!(frames.len(), 5);
            assert!(frames[0].as_str().contains(&ids[3].to_string()));
            assert!(frames[4].as_str().contains(&ids[7].to_string()));
        }
        History::Gone => panic!("ids[2] is resumable"),
    }
    assert_eq!(
        s.backend
            .history_after(a, Cursor::After(ids[1]))
            .await
            .unwrap(),
        History::Gone
    );
    assert_eq!(
        s.backend
            .history_after(a, Cursor::After(ids[7]))
            .await
            .unwrap(),
        History::Events(vec![])
    );
    let future = EventId {
        seq: ids[7].seq + 10,
        ..ids[7]
    };
    assert_eq!(
        s.backend
            .history_after(a, Cursor::After(future))
            .await
            .unwrap(),
        History::Gone
    );
    let other_epoch = EventId {
        epoch: ids[7].epoch - 1,
        ..ids[7]
    };
    assert_eq!(
        s.backend
            .history_after(a, Cursor::After(other_epoch))
            .await
            .unwrap(),
        History::Gone
    );
}

async fn fencing_refuses_stale_leases(s: Subject) {
    let ttl = Duration::from_millis(400);
    let a = RestaurantId(Uuid::new_v4());
    let first = s
        .backend
        .try_acquire_leader("one", ttl)
        .await
        .unwrap()
        .expect("free lock");
    assert!(
        s.backend
            .try_acquire_leader("two", ttl)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.backend.leader().await.unwrap().as_deref(), Some("one"));
    assert!(s.backend.renew_leader(&first, ttl).await.unwrap());
    let mut fenced = req(a, 1, None);
    fenced.fence = Some(first.token.clone());
    s.backend.publish(fenced.clone()).await.unwrap();
    // "one" pauses past its TTL; "two" takes over.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let second = s
        .backend
        .try_acquire_leader("two", ttl)
        .await
        .unwrap()
        .expect("expired lock");
    assert!(matches!(
        s.backend.publish(fenced).await,
        Err(BrokerError::Fenced)
    ));
    assert!(!s.backend.renew_leader(&first, ttl).await.unwrap());
    let delta = PollerStateDelta {
        cursor_micros: 1,
        last_poll_ms: 2,
        ..Default::default()
    };
    assert!(matches!(
        s.backend.save_poller_state(&first, &delta).await,
        Err(BrokerError::Fenced)
    ));
    s.backend.save_poller_state(&second, &delta).await.unwrap();
    assert_eq!(
        s.backend
            .load_poller_state(&[])
            .await
            .unwrap()
            .cursor_micros,
        Some(1)
    );
    // Releasing with the stale lease does nothing; with the current one frees it.
    s.backend.release_leader(&first).await.unwrap();
    assert_eq!(s.backend.leader().await.unwrap().as_deref(), Some("two"));
    s.backend.release_leader(&second).await.unwrap();
    assert!(s.backend.leader().await.unwrap().is_none());
}

async fn presence_counts_and_expires(s: Subject) {
    let a = RestaurantId(Uuid::new_v4());
    let rec = |instance: &str| ConnectionRecord {
        connection_id: Uuid::new_v4(),
        instance_id: instance.into(),
        user_id: "u".into(),
        restaurant_id: a,
        connected_at: chrono::Utc::now(),
    };
    let long = Duration::from_secs(30);
    let short = Duration::from_millis(300);
    let c1 = rec("i1");
    let c2 = rec("i2");
    s.backend
        .heartbeat("i1", std::slice::from_ref(&c1), long)
        .await
        .unwrap();
    s.backend
        .heartbeat("i2", std::slice::from_ref(&c2), short)
        .await
        .unwrap();
    assert_eq!(s.backend.connections(a).await.unwrap().len(), 2);
    assert_eq!(s.backend.live_instances().await.unwrap(), 2);
    assert_eq!(s.backend.active_restaurants().await.unwrap(), vec![a]);
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert_eq!(s.backend.connections(a).await.unwrap(), vec![c1.clone()]);
    assert_eq!(s.backend.live_instances().await.unwrap(), 1);
    s.backend.remove_connection(&c1).await.unwrap();
    assert!(s.backend.connections(a).await.unwrap().is_empty());
}

/// A version older than one already published is never published after it
/// (the poller read V1, the order service published V2, then the poller
/// publishes V1): answered like a duplicate, with the newest id.
async fn older_versions_never_follow_newer_ones(mut s: Subject) {
    let a = RestaurantId(Uuid::new_v4());
    subscribe_until_ready(&s, a).await;
    let v1 = OrderVersion {
        order_id: Uuid::new_v4(),
        updated_at_micros: 1_700_000_000_000_000,
    };
    let v2 = OrderVersion {
        updated_at_micros: v1.updated_at_micros + 5,
        ..v1
    };
    let newer = s.backend.publish(req(a, 2, Some(v2))).await.unwrap();
    let older = s.backend.publish(req(a, 1, Some(v1))).await.unwrap();
    assert!(!newer.duplicate);
    assert!(older.duplicate, "an older version is not published");
    assert_eq!(older.event_id, newer.event_id);
    let (_, f) = received(&mut s).await;
    assert!(f.contains(r#""n":2"#));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.inbound.recv())
            .await
            .is_err(),
        "nothing else was broadcast"
    );
}

/// A position taken before a restaurant had any history resumes into the
/// whole history that began after it, and ids resume exactly.
async fn an_empty_position_resumes_into_the_first_history(s: Subject) {
    let a = RestaurantId(Uuid::new_v4());
    let before = s.backend.position(a).await.unwrap();
    assert!(matches!(before, Cursor::Empty { .. }));
    assert_eq!(
        s.backend.history_after(a, before).await.unwrap(),
        History::Events(vec![])
    );
    let p1 = s.backend.publish(req(a, 1, None)).await.unwrap();
    let p2 = s.backend.publish(req(a, 2, None)).await.unwrap();
    assert!(p2.event_id > p1.event_id);
    match s.backend.history_after(a, before).await.unwrap() {
        History::Events(frames) => {
            assert_eq!(frames.len(), 2);
            assert!(frames[0].as_str().contains(&p1.event_id.to_string()));
        }
        History::Gone => panic!("the whole history began after the position"),
    }
    // A position from long before this history began cannot vouch for it.
    assert_eq!(
        s.backend
            .history_after(a, Cursor::Empty { at_ms: i64::MAX })
            .await
            .unwrap(),
        History::Gone
    );
}

macro_rules! conformance {
    ($($name:ident),*) => {
        mod memory_broker {
            $(#[tokio::test] async fn $name() { super::$name(super::memory().await).await })*
        }
        mod redis_broker {
            $(#[tokio::test] async fn $name() { super::$name(super::redis().await).await })*
        }
        mod redis_cluster_broker {
            $(#[tokio::test] async fn $name() { super::$name(super::cluster().await).await })*
        }
        mod redis_sentinel_broker {
            $(#[tokio::test] async fn $name() { super::$name(super::sentinel().await).await })*
        }
    };
}

conformance!(
    numbering_delivery_and_isolation,
    duplicates_answer_the_first_id_and_reach_nobody,
    history_replays_and_knows_its_limits,
    fencing_refuses_stale_leases,
    presence_counts_and_expires,
    older_versions_never_follow_newer_ones,
    an_empty_position_resumes_into_the_first_history
);
