//! The Redis function library across a rolling deploy: two versions loaded
//! side by side, neither replacing nor calling the other's code; and the
//! atomic publish step refusing bodies it cannot number.

use orders_gateway::broker::functions::{
    FUNCTIONS, LIBRARY_VERSION, function_name, restaurant_key,
};
use orders_gateway::domain::RestaurantId;
use serde_json::json;
use uuid::Uuid;

use crate::support::{Gateway, Redis, config, order_json, post_event};

/// A modified copy of this build's library posing as the previous version:
/// its own names, and a publish whose answer shows whose code ran.
fn previous_version() -> String {
    let (v, old) = (LIBRARY_VERSION, LIBRARY_VERSION - 1);
    let copy = FUNCTIONS
        .replace(
            &format!("#!lua name=orders_gateway_v{v}"),
            &format!("#!lua name=orders_gateway_v{old}"),
        )
        .replace(
            &format!("local VERSION = '_v{v}'"),
            &format!("local VERSION = '_v{old}'"),
        )
        .replace("return {id, 0}", "return {'old-code', 0}");
    assert_ne!(copy, FUNCTIONS);
    copy
}

async fn load(redis: &Redis, library: &str) -> redis::RedisResult<String> {
    let mut conn = redis.client().await;
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library)
        .query_async(&mut conn)
        .await
}

async fn libraries(redis: &Redis) -> Vec<String> {
    let mut conn = redis.client().await;
    let list: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let text = format!("{list:?}");
    let mut names: Vec<String> = text
        .match_indices("orders_gateway_v")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn two_library_versions_coexist_during_a_rolling_deploy() {
    let redis = Redis::start().await;
    let old = previous_version();
    // An old replica is running: its library is loaded.
    load(&redis, &old).await.expect("old library loads");
    // A new replica starts and installs its own.
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = Gateway::start(cfg).await;
    let base = format!("http://{}", gw.addr);
    let r = Uuid::new_v4();
    let publish =
        |id: Uuid| json!({"type": "order_created", "order": order_json(r, id, "pending")});
    let (status, body) = post_event(&base, &publish(Uuid::new_v4())).await;
    assert_eq!(status, 202, "{body}");
    assert_ne!(
        body["event_id"], "old-code",
        "the new replica ran the old code"
    );
    // The old replica restarts (or meets a Redis without its functions) and
    // reinstalls its library with REPLACE: the new replica is not affected.
    load(&redis, &old).await.expect("old library reloads");
    let (status, body) = post_event(&base, &publish(Uuid::new_v4())).await;
    assert_eq!(status, 202, "{body}");
    assert_ne!(
        body["event_id"], "old-code",
        "an old replica replaced the new code"
    );
    // And the old replica still finds its own functions, unchanged by the
    // new replica's install.
    let mut conn = redis.client().await;
    let rid = RestaurantId(r);
    let (id, _): (String, i64) = redis::cmd("FCALL")
        .arg(format!("og_publish_v{}", LIBRARY_VERSION - 1))
        .arg(2)
        .arg(restaurant_key(rid, "meta"))
        .arg(restaurant_key(rid, "hist"))
        .arg(r.to_string())
        .arg("")
        .arg(json!({"type": "order_created"}).to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(id, "old-code");
    assert_eq!(
        libraries(&redis).await,
        vec![
            format!("orders_gateway_v{}", LIBRARY_VERSION - 1),
            format!("orders_gateway_v{LIBRARY_VERSION}"),
        ]
    );
}

/// The library of release 0.1, as it shipped (`git show aa9cb5e:src/broker/orders_gateway.lua`).
const RELEASE_0_1: &str = include_str!("../fixtures/orders_gateway_0.1.lua");

async fn fcall<T: redis::FromRedisValue>(redis: &Redis, function: &str, args: &[&str]) -> T {
    let mut conn = redis.client().await;
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(function).arg(0);
    for a in args {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// Release 0.1's real library (unversioned `orders_gateway`, functions
/// without a suffix) and this build's, in one Redis: installing either
/// leaves the other's functions loaded and working.
#[tokio::test]
async fn release_0_1s_library_and_this_builds_stay_loaded_side_by_side() {
    let redis = Redis::start().await;
    load(&redis, RELEASE_0_1).await.expect("0.1 library loads");
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = Gateway::start(cfg).await;
    let base = format!("http://{}", gw.addr);
    let r = Uuid::new_v4();
    let publish =
        |id: Uuid| json!({"type": "order_created", "order": order_json(r, id, "pending")});
    let (status, body) = post_event(&base, &publish(Uuid::new_v4())).await;
    assert_eq!(status, 202, "{body}");
    // A 0.1 replica restarting reinstalls its library with REPLACE.
    load(&redis, RELEASE_0_1)
        .await
        .expect("0.1 library reloads");
    let (status, body) = post_event(&base, &publish(Uuid::new_v4())).await;
    assert_eq!(status, 202, "{body}");
    // 0.1's own publish still runs its own code (its numbering, its keys).
    let old: (String, i64) = fcall(
        &redis,
        "og_publish",
        &[
            &r.to_string(),
            "",
            &json!({"type": "order_created"}).to_string(),
        ],
    )
    .await;
    assert_eq!(old.1, 0, "{old:?}");
    let mut conn = redis.client().await;
    let listed: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let listed = format!("{listed:?}");
    for name in [
        "\"orders_gateway\"",
        &format!("orders_gateway_v{LIBRARY_VERSION}"),
    ] {
        assert!(listed.contains(name), "{name} missing from {listed}");
    }
}

#[test]
fn the_library_file_carries_the_version_the_code_calls() {
    let first = FUNCTIONS.lines().next().unwrap();
    assert_eq!(
        first,
        format!("#!lua name=orders_gateway_v{LIBRARY_VERSION}")
    );
    assert!(FUNCTIONS.contains(&format!("local VERSION = '_v{LIBRARY_VERSION}'")));
    // Every registration goes through VERSION.
    for line in FUNCTIONS
        .lines()
        .filter(|l| l.starts_with("redis.register_function"))
    {
        assert!(line.contains(".. VERSION"), "{line}");
    }
    assert_eq!(
        function_name("og_publish"),
        format!("og_publish_v{LIBRARY_VERSION}")
    );
}

/// `og_publish` called directly with a body that already holds `event_id`
/// is refused with a clear error, and consumes no sequence number.
#[tokio::test]
async fn og_publish_refuses_a_body_that_brings_its_own_event_id() {
    let redis = Redis::start().await;
    load(&redis, FUNCTIONS).await.unwrap();
    let mut conn = redis.client().await;
    let r = Uuid::new_v4();
    let meta = restaurant_key(RestaurantId(r), "meta");
    let hist = restaurant_key(RestaurantId(r), "hist");
    let fcall = |body: String| {
        let mut c = redis::cmd("FCALL");
        c.arg(function_name("og_publish"))
            .arg(2)
            .arg(&meta)
            .arg(&hist)
            .arg(r.to_string())
            .arg("")
            .arg(body);
        c
    };
    for body in [
        json!({"event_id": "0000000000001-000000000001", "type": "order_created"}).to_string(),
        json!({"type": "order_created", "event_id": null}).to_string(),
        r#"{"type":"order_created","event_id":"x","event_id":"y"}"#.to_string(),
    ] {
        let err = fcall(body.clone())
            .query_async::<(String, i64)>(&mut conn)
            .await
            .expect_err(&body);
        assert!(err.to_string().contains("event_id"), "{body}: {err}");
    }
    for body in ["{not json", "[1,2]", "{\"type\":"] {
        let err = fcall(body.to_string())
            .query_async::<(String, i64)>(&mut conn)
            .await
            .expect_err(body);
        assert!(err.to_string().contains("JSON object"), "{body}: {err}");
    }
    // A nested event_id (inside the order) is the publisher's business.
    let (id, dup): (String, i64) =
        fcall(json!({"type": "order_created", "order": {"event_id": "mine"}}).to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
    assert_eq!(dup, 0);
    assert!(
        id.ends_with("-000000000001"),
        "refused calls consumed no sequence: {id}"
    );
}
