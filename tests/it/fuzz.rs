//! Property tests for everything that parses outside input: none may panic,
//! each input gets its documented answer. Pure parsers run a few hundred
//! cases each; the end-to-end ones (client frames, query strings, publish
//! bodies against a real gateway) a bounded sample, seconds in total.

use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use chrono::Utc;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use orders_gateway::auth::{AuthError, Verifier, parse_jwks};
use orders_gateway::config::Config;
use orders_gateway::domain::{EventId, Frame, FrameError, RestaurantId};
use orders_gateway::http::{bearer, parse_query};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::support::{
    Gateway, Next, PUBLISH_KEY, Redis, SECRET, Ws, config, dashboard, order_json, token,
};

/// Found by `channel_payloads_get_their_documented_verdict`: serde reads a
/// struct from a JSON array, so `["order_created"]` passed as an event.
#[test]
fn a_json_array_on_a_channel_is_not_an_event() {
    let r = RestaurantId(Uuid::new_v4());
    for payload in [r#"["order_created"]"#, r#"["a","",null]"#, r#" ["x"]"#] {
        assert_eq!(
            Frame::parse(r, Utf8Bytes::from(payload)).err(),
            Some(FrameError::NotAnEvent),
            "{payload}"
        );
    }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        Just(json!("0000000000001-000000000001")),
        Just(json!(Uuid::nil())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::hash_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("event_id".to_string()),
                    Just("order".to_string()),
                    Just("id".to_string()),
                    Just("restaurant_id".to_string()),
                    Just("updated_at".to_string()),
                    Just("token".to_string()),
                    Just("keys".to_string()),
                    "[a-z_]{1,10}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Arbitrary text, and text that is almost JSON.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        json_value().prop_map(|v| v.to_string()),
        (json_value(), 0usize..40).prop_map(|(v, cut)| {
            let s = v.to_string();
            s.chars().take(cut).collect()
        }),
    ]
}

fn event_id_model(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 26
        && b[13] == b'-'
        && b[..13].iter().all(u8::is_ascii_digit)
        && b[14..].iter().all(u8::is_ascii_digit)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// `last_event_id` (and ids in frames): 13 digits, '-', 12 digits, or
    /// malformed (4400); well-formed ids round-trip.
    #[test]
    fn event_ids_parse_exactly_their_documented_form(s in prop_oneof![
        ".{0,30}", "[0-9]{10,14}-[0-9]{10,13}", "[0-9+-]{26}"
    ]) {
        let parsed = s.parse::<EventId>();
        prop_assert_eq!(parsed.is_ok(), event_id_model(&s), "{}", s);
        if let Ok(id) = parsed {
            prop_assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn event_ids_round_trip(epoch in 0u64..10_000_000_000_000, seq in 0u64..1_000_000_000_000) {
        let id = EventId { epoch, seq };
        prop_assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
    }

    /// Payloads on `orders:<rid>`: a JSON object with a non-empty string
    /// `type` is an event; anything else `NotAnEvent`; a malformed
    /// `event_id` `BadEventId`; another restaurant's order `WrongRestaurant`.
    #[test]
    fn channel_payloads_get_their_documented_verdict(payload in text()) {
        let r = RestaurantId(Uuid::new_v4());
        let verdict = Frame::parse(r, Utf8Bytes::from(payload.clone()));
        let v: Option<Value> = serde_json::from_str(&payload).ok();
        let has_type = v.as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty());
        if !has_type {
            prop_assert_eq!(verdict.err(), Some(FrameError::NotAnEvent));
        } else if let Ok(f) = verdict {
            prop_assert_eq!(f.text.as_str(), payload.as_str());
        }
    }

    #[test]
    fn structured_channel_payloads(
        kind in "[a-z_]{1,20}",
        event_id in prop::option::of(prop_oneof![
            (0u64..10_000_000_000_000, 0u64..1_000_000_000_000)
                .prop_map(|(e, s)| EventId { epoch: e, seq: s }.to_string()),
            ".{0,30}",
        ]),
        same_restaurant in any::<bool>(),
        extra in json_value(),
    ) {
        let r = RestaurantId(Uuid::new_v4());
        let order_r = if same_restaurant { r.0 } else { Uuid::new_v4() };
        let mut body = json!({
            "type": kind,
            "order": {"id": Uuid::new_v4(), "restaurant_id": order_r,
                      "updated_at": "2024-01-15T10:30:45.123456Z"},
            "extra": extra,
        });
        if let Some(id) = &event_id {
            body["event_id"] = json!(id);
        }
        let verdict = Frame::parse(r, Utf8Bytes::from(body.to_string()));
        let id_ok = event_id.as_deref().is_none_or(event_id_model);
        match verdict {
            Err(FrameError::BadEventId) => prop_assert!(!id_ok),
            Err(FrameError::WrongRestaurant) => prop_assert!(id_ok && !same_restaurant),
            Err(FrameError::NotAnEvent) => prop_assert!(false, "{body}"),
            Ok(f) => {
                prop_assert!(id_ok && same_restaurant);
                prop_assert!(f.version.is_some());
                prop_assert_eq!(f.event_id.map(|e| e.to_string()), event_id);
            }
        }
    }

    /// Query strings: any bytes decode to a map without panicking; the
    /// token comes from the header first, else `?token=`.
    #[test]
    fn query_strings_never_panic(raw in ".{0,200}", header in prop::option::of("[ -~]{0,40}")) {
        let q = parse_query(Some(&raw));
        let mut headers = axum::http::HeaderMap::new();
        if let Some(h) = &header
            && let Ok(v) = axum::http::HeaderValue::from_str(&format!("Bearer {h}"))
        {
            headers.insert(axum::http::header::AUTHORIZATION, v);
        }
        let got = bearer(&headers, &q);
        if headers.is_empty() {
            prop_assert_eq!(got, q.get("token").cloned());
        } else {
            prop_assert_eq!(got, Some(header.unwrap().trim().to_string()));
        }
    }

    /// JWKS documents: any bytes give a (possibly empty) key set.
    #[test]
    fn jwks_documents_never_panic(doc in prop_oneof![
        text(),
        json_value().prop_map(|k| json!({"keys": [k]}).to_string()),
        (prop_oneof![Just("RSA".to_string()), Just("EC".to_string()), Just("oct".to_string()), ".{0,5}"],
         prop::option::of(".{0,8}"), prop::option::of(".{0,8}"), ".{0,60}", ".{0,60}")
            .prop_map(|(kty, alg, usage, a, b)| json!({"keys": [{
                "kty": kty, "kid": "k", "alg": alg, "use": usage,
                "n": a, "e": b, "x": a, "y": b, "crv": "P-256", "k": a,
            }]}).to_string()),
    ]) {
        // At most the one generated key; random ones never parse.
        prop_assert!(parse_jwks(doc.as_bytes()).len() <= 1);
    }

    /// Real keys (tests/fixtures/jwks.json) under arbitrary `use`, `alg`
    /// and `kid`: each is kept exactly when its `use` is absent or "sig" and
    /// its `alg` is absent or the one its type implies; a repeated `kid`
    /// keeps the first.
    #[test]
    fn jwks_keys_are_kept_exactly_by_their_use_and_alg(
        variants in prop::collection::vec((
            0usize..2,
            prop::option::of(prop_oneof![Just("sig"), Just("enc"), Just(""), Just("SIG")]),
            prop::option::of(prop_oneof![Just("RS256"), Just("ES256"), Just("HS256"), Just("none"), Just("RS512")]),
            prop_oneof![Just("a"), Just("b"), Just("c")],
        ), 0..6),
    ) {
        let fixture: Value = serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap();
        let real = fixture["keys"].as_array().unwrap();
        let mut doc = Vec::new();
        let mut expected: Vec<(String, Algorithm)> = Vec::new();
        for (which, usage, alg, kid) in &variants {
            let mut key = real[*which].clone();
            let implied = if key["kty"] == "RSA" { "RS256" } else { "ES256" };
            let obj = key.as_object_mut().unwrap();
            obj.insert("kid".into(), json!(kid));
            match usage { Some(u) => { obj.insert("use".into(), json!(u)); } None => { obj.remove("use"); } }
            match alg { Some(a) => { obj.insert("alg".into(), json!(a)); } None => { obj.remove("alg"); } }
            doc.push(key);
            let usable = usage.is_none_or(|u| u == "sig") && alg.is_none_or(|a| a == implied);
            if usable && !expected.iter().any(|(k, _)| k == kid) {
                let alg = if implied == "RS256" { Algorithm::RS256 } else { Algorithm::ES256 };
                expected.push((kid.to_string(), alg));
            }
        }
        let parsed = parse_jwks(json!({ "keys": doc }).to_string().as_bytes());
        let mut got: Vec<(String, Algorithm)> = parsed.iter().map(|(k, (_, a))| (k.clone(), *a)).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(got, expected);
    }
}

fn verifier() -> Verifier {
    let mut cfg = Config::for_tests(SECRET);
    cfg.jwt_audience = None;
    Verifier::new(&cfg)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Tokens: any text is refused with an AuthError, never a panic.
    #[test]
    fn arbitrary_tokens_are_refused(t in prop_oneof![
        ".{0,300}",
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,40}",
    ]) {
        let v = verifier();
        prop_assert!(runtime().block_on(v.verify(&t)).is_err());
    }

    /// Correctly signed tokens with arbitrary claims: accepted only with a
    /// numeric `exp` in the future and a restaurant claim that is absent,
    /// null or a UUID string; `sub` is kept only when it is a string.
    #[test]
    fn signed_tokens_with_arbitrary_claims(
        mut claims in json_value(),
        exp in prop_oneof![
            Just(json!(Utc::now().timestamp() + 600)),
            Just(json!(Utc::now().timestamp() - 600)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            json_value(),
        ],
        restaurant in prop_oneof![Just(json!(Uuid::new_v4())), json_value()],
    ) {
        if !claims.is_object() {
            claims = json!({ "payload": claims });
        }
        for checked in ["nbf", "aud", "iss"] {
            claims.as_object_mut().unwrap().remove(checked);
        }
        claims["exp"] = exp.clone();
        claims["restaurant_id"] = restaurant.clone();
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        ).unwrap();
        let verdict = runtime().block_on(verifier().verify(&t));
        let now = Utc::now().timestamp();
        // Clearly valid: an integer NumericDate well in the future.
        let clearly_live = exp.as_u64().is_some_and(|e| e > (now + 10) as u64);
        let restaurant_ok = restaurant.is_null()
            || restaurant.as_str().is_some_and(|s| s.parse::<Uuid>().is_ok());
        match verdict {
            Ok(id) => {
                prop_assert!(restaurant_ok, "{claims}");
                prop_assert!(exp.as_f64().is_some_and(|e| e > now as f64), "{claims}");
                prop_assert_eq!(
                    id.user_id,
                    claims.get("sub").and_then(Value::as_str).unwrap_or("").to_string()
                );
            }
            Err(AuthError::BadRestaurantClaim) => prop_assert!(!restaurant_ok),
            Err(_) => prop_assert!(!clearly_live || !restaurant_ok, "{claims}"),
        }
    }
}

/// `n` values from `strategy`, deterministic per run.
fn sample<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// Client frames against a real gateway: each gets its documented answer
/// (`pong`, an `error` frame, silence for a valid `auth`, or a close with
/// 1009 / 4429 / 4401 / 4403), the server never crashes, and other sockets
/// keep working.
#[tokio::test]
async fn client_frames_get_their_documented_answer() {
    let mut cfg = config();
    cfg.client_message_rate = 10_000;
    let gw = Gateway::start(cfg).await;
    let r = Uuid::new_v4();
    let url = gw.ws_url(&format!("token={}", token(r)));
    let (mut witness, _) = dashboard(&url).await;
    let frames = sample(
        prop_oneof![
            text(),
            json_value().prop_map(|v| json!({"type": "auth", "token": v}).to_string()),
            ".{0,40}".prop_map(|t| json!({"type": "auth", "token": t}).to_string()),
            json_value().prop_map(|v| json!({"type": v}).to_string()),
        ],
        200,
    );
    let (mut ws, _) = dashboard(&url).await;
    for f in frames {
        ws.send_text(&f).await;
        // A ping right after each: its pong proves the frame was handled
        // and the socket is still serving.
        ws.send_text(r#"{"type":"ping"}"#).await;
        loop {
            match ws.next(Duration::from_secs(5)).await {
                Next::Json(v) if v["type"] == "pong" => break,
                Next::Json(v) if v["type"] == "error" => {
                    let code = v["code"].as_str().unwrap_or_default();
                    assert!(
                        [
                            "bad_request",
                            "unknown_type",
                            "auth_failed",
                            "auth_mismatch"
                        ]
                        .contains(&code),
                        "{f:?} -> {v}"
                    );
                }
                Next::Close(code, reason) => {
                    assert!([4401, 4403].contains(&code), "{f:?} -> {code} {reason}");
                    let (again, _) = dashboard(&url).await;
                    ws = again;
                    break;
                }
                other => panic!("{f:?} -> {other:?}"),
            }
        }
    }
    let _ = ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(ws.json().await["code"], "unsupported");
    witness.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(witness.json().await["type"], "pong");
}

/// Query strings on the socket endpoint: every one ends in
/// `connection_established` or a documented close code.
#[tokio::test]
async fn socket_query_strings_get_a_documented_close_or_connect() {
    let gw = Gateway::start(config()).await;
    let r = Uuid::new_v4();
    let good = token(r);
    let queries = sample(
        (
            prop::option::of(prop_oneof![Just(good.clone()), ".{0,40}"]),
            prop::option::of(prop_oneof![Just(r.to_string()), ".{0,40}"]),
            prop::option::of(prop_oneof![
                Just("0000000000001-000000000001".to_string()),
                ".{0,30}"
            ]),
            ".{0,30}",
        ),
        60,
    );
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    for (t, rid, last, junk) in queries {
        let mut q = format!("x={}", enc(&junk));
        if let Some(t) = &t {
            q += &format!("&token={}", enc(t));
        }
        if let Some(rid) = &rid {
            q += &format!("&restaurant_id={}", enc(rid));
        }
        if let Some(last) = &last {
            q += &format!("&last_event_id={}", enc(last));
        }
        let mut ws = Ws::connect(&gw.ws_url(&q)).await;
        match ws.next(Duration::from_secs(5)).await {
            Next::Json(v) => {
                assert_eq!(v["type"], "connection_established", "{q}");
                assert_eq!(t.as_deref(), Some(good.as_str()), "{q}");
            }
            Next::Close(code, _) => assert!([4400, 4401, 4403].contains(&code), "{q} -> {code}"),
            other => panic!("{q} -> {other:?}"),
        }
    }
}

/// Publish bodies: 202/200 for a valid event, else a JSON error with 400,
/// 413 or 415; never a 5xx. Through real Redis, so every accepted body
/// also passes the server-side step (`og_publish`).
#[tokio::test]
async fn publish_bodies_get_a_documented_status() {
    let redis = Redis::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = Gateway::start(cfg).await;
    let base = format!("http://{}", gw.addr);
    let r = Uuid::new_v4();
    let bodies = sample(
        prop_oneof![
            text(),
            json_value().prop_map(|o| json!({"type": "order_created", "order": o}).to_string()),
            (
                json_value(),
                ".{0,12}",
                prop::sample::select(vec![
                    "id",
                    "order_status",
                    "total_price",
                    "restaurant_id",
                    "updated_at",
                    "items"
                ])
            )
                .prop_map(move |(v, kind, field)| {
                    let mut order = order_json(r, Uuid::new_v4(), "pending");
                    order[field] = v;
                    json!({"type": kind, "order": order, "previous_status": "pending"}).to_string()
                }),
            // Valid events with arbitrary text where free text is allowed:
            // these must be accepted (202), whatever the characters.
            (text(), text(), text()).prop_map(move |(name, phone, item)| {
                let mut order = order_json(r, Uuid::new_v4(), "pending");
                order["customer_name"] = json!(name);
                order["customer_phone"] = json!(phone);
                order["items"][0]["name"] = json!(item);
                json!({"type": "order_created", "order": order, "valid": true}).to_string()
            }),
        ],
        150,
    );
    let client = reqwest::Client::new();
    for body in bodies {
        let resp = client
            .post(format!("{base}/api/orders/events"))
            .bearer_auth(PUBLISH_KEY)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if body.contains(r#""valid":true"#) {
            assert_eq!(status, 202, "{body} -> {answer}");
        }
        match status {
            200 | 202 => assert!(answer["event_id"].is_string(), "{body} -> {answer}"),
            400 | 413 | 415 => assert!(answer["error"]["code"].is_string(), "{body} -> {answer}"),
            other => panic!("{body} -> {other} {answer}"),
        }
    }
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
}

/// Payloads on `orders:<rid>` from anyone who can write to Redis, end to
/// end: bytes that are not UTF-8, not JSON, not an event, too big for a
/// client frame, another restaurant's order, a bad event id. None reaches the dashboard, none
/// stops the replica's receiver: the valid event published after them
/// arrives, and is the first thing the dashboard sees.
#[tokio::test]
async fn garbage_on_the_restaurant_channel_is_dropped_and_delivery_goes_on() {
    let redis = Redis::start().await;
    let mut cfg = config();
    cfg.redis_url = Some(redis.url());
    let gw = Gateway::start(cfg).await;
    let r = Uuid::new_v4();
    let (mut ws, _) = dashboard(&gw.ws_url(&format!("token={}", token(r)))).await;
    let channel = RestaurantId(r).channel();
    let mut conn = redis.client().await;
    let other = order_json(Uuid::new_v4(), Uuid::new_v4(), "pending");
    let mut payloads: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0x00, 0x80],
        b"".to_vec(),
        vec![b'{'; 70_000],
        br#"["order_created"]"#.to_vec(),
        json!({"event_id": "0000000000001-000000000001", "type": "order_created", "order": other})
            .to_string()
            .into_bytes(),
        json!({"event_id": "not-an-id", "type": "order_created", "order": order_json(r, Uuid::new_v4(), "pending")})
            .to_string()
            .into_bytes(),
    ];
    // Random text, less what the documented rule calls an event (an
    // object with a string `type` is forwarded, unknown types included).
    payloads.extend(
        sample(text(), 60)
            .into_iter()
            .filter(|t| Frame::parse(RestaurantId(r), Utf8Bytes::from(t.clone())).is_err())
            .map(String::into_bytes),
    );
    for p in payloads {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(p)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let id = Uuid::new_v4();
    let (status, body) = crate::support::post_event(
        &format!("http://{}", gw.addr),
        &json!({"type": "order_created", "order": order_json(r, id, "pending")}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    match ws.next(Duration::from_secs(5)).await {
        Next::Json(v) => assert_eq!(v["order"]["id"], id.to_string(), "{v}"),
        other => panic!("expected the valid event, got {other:?}"),
    }
}
