//! The auth matrix: every way a token can be wrong closes with 4401, every
//! way a restaurant can be wrong with 4400/4403, and the good ones connect.

use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Gateway, Next, SECRET, TestDb, Ws, config, dashboard, token, token_with};

fn claims(restaurant: Uuid) -> Value {
    json!({ "sub": Uuid::new_v4(), "restaurant_id": restaurant, "exp": Utc::now().timestamp() + 600 })
}

async fn close_code_for(gw: &Gateway, query: &str) -> u16 {
    let mut ws = Ws::connect(&gw.ws_url(query)).await;
    ws.close_code().await
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn bad_tokens_close_with_4401() {
    let gw = Gateway::start(config()).await;
    let r = Uuid::new_v4();
    let other_secret = encode(
        &Header::new(Algorithm::HS256),
        &claims(r),
        &EncodingKey::from_secret(b"another-secret-0123456789"),
    )
    .unwrap();
    let hs384 = encode(
        &Header::new(Algorithm::HS384),
        &claims(r),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let rsa = encode(
        &Header::new(Algorithm::RS256),
        &claims(r),
        &EncodingKey::from_rsa_pem(include_bytes!("../fixtures/rsa_private.pem")).unwrap(),
    )
    .unwrap();
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg":"none","typ":"JWT"})),
        b64(&claims(r))
    );
    let expired =
        token_with(json!({ "sub": "u", "restaurant_id": r, "exp": Utc::now().timestamp() - 60 }));
    let no_exp = token_with(json!({ "sub": "u", "restaurant_id": r }));
    let not_yet = token_with(json!({
        "sub": "u", "restaurant_id": r, "exp": Utc::now().timestamp() + 600, "nbf": Utc::now().timestamp() + 300
    }));
    let bad_claim = token_with(
        json!({ "sub": "u", "restaurant_id": "not-a-uuid", "exp": Utc::now().timestamp() + 600 }),
    );
    for (what, query) in [
        ("missing", String::new()),
        ("empty", "token=".into()),
        ("malformed", "token=abc.def".into()),
        ("bad signature", format!("token={other_secret}")),
        ("wrong alg HS384", format!("token={hs384}")),
        ("RS256 without JWKS", format!("token={rsa}")),
        ("alg none", format!("token={none}")),
        ("expired", format!("token={expired}")),
        ("no exp", format!("token={no_exp}")),
        ("nbf in the future", format!("token={not_yet}")),
        ("bad restaurant claim", format!("token={bad_claim}")),
    ] {
        assert_eq!(close_code_for(&gw, &query).await, 4401, "{what}");
    }
    // The same good token connects, from the query or the header.
    let good = token(r);
    let (_, hello) = dashboard(&gw.ws_url(&format!("token={good}"))).await;
    assert_eq!(hello["restaurant_id"], r.to_string());
    let mut ws = Ws::connect_with(
        &gw.ws_url(""),
        &[("authorization", &format!("Bearer {good}"))],
    )
    .await;
    assert_eq!(ws.json().await["type"], "connection_established");
    let metrics = crate::support::metrics(&format!("http://{}", gw.addr)).await;
    assert!(
        metrics.contains("orders_gateway_auth_failures_total{reason=\"expired\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let mut cfg = config();
    cfg.jwt_audience = Some("authenticated".into());
    cfg.jwt_issuer = Some("https://auth.example".into());
    let gw = Gateway::start(cfg).await;
    let r = Uuid::new_v4();
    let exp = Utc::now().timestamp() + 600;
    let good = token_with(
        json!({"sub":"u","restaurant_id":r,"exp":exp,"aud":"authenticated","iss":"https://auth.example"}),
    );
    let wrong_aud = token_with(
        json!({"sub":"u","restaurant_id":r,"exp":exp,"aud":"anon","iss":"https://auth.example"}),
    );
    let no_aud =
        token_with(json!({"sub":"u","restaurant_id":r,"exp":exp,"iss":"https://auth.example"}));
    let wrong_iss = token_with(
        json!({"sub":"u","restaurant_id":r,"exp":exp,"aud":"authenticated","iss":"https://evil"}),
    );
    for (what, t) in [
        ("wrong aud", wrong_aud),
        ("no aud", no_aud),
        ("wrong iss", wrong_iss),
    ] {
        assert_eq!(
            close_code_for(&gw, &format!("token={t}")).await,
            4401,
            "{what}"
        );
    }
    dashboard(&gw.ws_url(&format!("token={good}"))).await;
}

/// Serve tests/fixtures/jwks.json on a free port; returns its URL.
async fn jwks_server() -> String {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(|| async {
            (
                [("content-type", "application/json")],
                include_str!("../fixtures/jwks.json"),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/jwks.json")
}

#[tokio::test]
async fn jwks_keys_verify_rs256_and_es256_pinned_to_their_key() {
    let mut cfg = config();
    cfg.jwt_secret = None;
    cfg.jwt_jwks_url = Some(jwks_server().await);
    let gw = Gateway::start(cfg).await;
    let r = Uuid::new_v4();
    let rsa_key = EncodingKey::from_rsa_pem(include_bytes!("../fixtures/rsa_private.pem")).unwrap();
    let ec_key = EncodingKey::from_ec_pem(include_bytes!("../fixtures/ec_private.pem")).unwrap();
    let sign = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, &claims(r), key).unwrap()
    };
    let rs = sign(Algorithm::RS256, "rsa-1", &rsa_key);
    let es = sign(Algorithm::ES256, "ec-1", &ec_key);
    dashboard(&gw.ws_url(&format!("token={rs}"))).await;
    dashboard(&gw.ws_url(&format!("token={es}"))).await;
    // An RSA signature presented under the EC key's id, an unknown kid, and
    // HS256 (no secret configured) are all refused.
    let crossed = sign(Algorithm::RS256, "ec-1", &rsa_key);
    let unknown = sign(Algorithm::RS256, "rotated-away", &rsa_key);
    let hs = token(r);
    for (what, t) in [
        ("alg/key mismatch", crossed),
        ("unknown kid", unknown),
        ("HS256", hs),
    ] {
        assert_eq!(
            close_code_for(&gw, &format!("token={t}")).await,
            4401,
            "{what}"
        );
    }
}

#[tokio::test]
async fn jwks_outage_refuses_tokens_without_crashing() {
    let mut cfg = config();
    cfg.jwt_secret = None;
    cfg.jwt_jwks_url = Some(format!(
        "http://127.0.0.1:{}/jwks.json",
        crate::support::free_port()
    ));
    let gw = Gateway::start(cfg).await;
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    let t = encode(
        &h,
        &claims(Uuid::new_v4()),
        &EncodingKey::from_rsa_pem(include_bytes!("../fixtures/rsa_private.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(close_code_for(&gw, &format!("token={t}")).await, 4401);
    let health = reqwest::get(gw.http("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn restaurant_must_be_the_callers() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let one = Uuid::new_v4();
    let many = Uuid::new_v4();
    let nobody = Uuid::new_v4();
    for (user, r) in [(one, a), (many, a), (many, b)] {
        sqlx::query("INSERT INTO restaurant_members (user_id, restaurant_id, role) VALUES ($1, $2, 'owner')")
            .bind(user)
            .bind(r)
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut cfg = config();
    cfg.database_url = Some(db.url.clone());
    let gw = Gateway::start(cfg).await;
    let no_claim =
        |user: Uuid| token_with(json!({ "sub": user, "exp": Utc::now().timestamp() + 600 }));

    let (_, hello) = dashboard(&gw.ws_url(&format!("token={}", no_claim(one)))).await;
    assert_eq!(hello["restaurant_id"], a.to_string(), "single membership");
    let t = no_claim(many);
    assert_eq!(
        close_code_for(&gw, &format!("token={t}")).await,
        4400,
        "several, none chosen"
    );
    let (_, hello) = dashboard(&gw.ws_url(&format!("token={t}&restaurant_id={b}"))).await;
    assert_eq!(hello["restaurant_id"], b.to_string());
    assert_eq!(
        close_code_for(&gw, &format!("token={t}&restaurant_id={c}")).await,
        4403
    );
    assert_eq!(
        close_code_for(&gw, &format!("token={}", no_claim(nobody))).await,
        4403,
        "no membership"
    );
    // Neither a restaurant nor a user (an anon key, a service token): there
    // is nobody whose membership could admit it.
    let anon = token_with(json!({ "role": "anon", "exp": Utc::now().timestamp() + 600 }));
    assert_eq!(
        close_code_for(&gw, &format!("token={anon}")).await,
        4403,
        "no sub, no claim"
    );
    assert_eq!(
        close_code_for(&gw, &format!("token={anon}&restaurant_id={a}")).await,
        4403,
        "no sub, a restaurant asked for"
    );
    // A claim wins; asking for another restaurant is forbidden.
    assert_eq!(
        close_code_for(&gw, &format!("token={}&restaurant_id={b}", token(a))).await,
        4403
    );
    assert_eq!(
        close_code_for(&gw, &format!("token={}&restaurant_id=nope", token(a))).await,
        4400
    );
    assert_eq!(
        close_code_for(&gw, &format!("token={}&last_event_id=42", token(a))).await,
        4400
    );
}

#[tokio::test]
async fn origins_outside_the_allowlist_are_refused() {
    let mut cfg = config();
    cfg.allowed_origins = Some("https://dash.example, http://localhost:3000".into());
    let gw = Gateway::start(cfg).await;
    let url = gw.ws_url(&format!("token={}", token(Uuid::new_v4())));
    let mut evil = Ws::connect_with(&url, &[("origin", "https://evil.example")]).await;
    assert_eq!(evil.close_code().await, 4403);
    let mut ok = Ws::connect_with(&url, &[("origin", "https://dash.example")]).await;
    assert_eq!(ok.json().await["type"], "connection_established");
    // Non-browser clients send no Origin.
    dashboard(&url).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}

async fn add_member(pool: &sqlx::PgPool, user: Uuid, r: Uuid) {
    sqlx::query(
        "INSERT INTO restaurant_members (user_id, restaurant_id, role) VALUES ($1, $2, 'staff')",
    )
    .bind(user)
    .bind(r)
    .execute(pool)
    .await
    .unwrap();
}

async fn remove_member(pool: &sqlx::PgPool, user: Uuid, r: Uuid) {
    sqlx::query("DELETE FROM restaurant_members WHERE user_id = $1 AND restaurant_id = $2")
        .bind(user)
        .bind(r)
        .execute(pool)
        .await
        .unwrap();
}

fn auth_message(token: &str) -> String {
    json!({"type": "auth", "token": token}).to_string()
}

/// A refresh is admitted exactly like a new connection to the socket's
/// restaurant: membership looked up again, `sub` required where a user is
/// needed, a claim for another restaurant refused.
#[tokio::test]
async fn token_refresh_authorizes_like_a_connect() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let member = Uuid::new_v4();
    add_member(&pool, member, a).await;
    let mut cfg = config();
    cfg.database_url = Some(db.url.clone());
    // Long: this test is about the refresh, not the periodic re-check.
    cfg.membership_recheck_ms = 3_600_000;
    let gw = Gateway::start(cfg).await;
    let exp = || Utc::now().timestamp() + 600;

    // 1. Admitted through membership; the membership is removed; a refresh
    //    with a claim-less token of the same user no longer authorizes.
    let no_claim = token_with(json!({ "sub": member, "exp": exp() }));
    let (mut ws, hello) = dashboard(&gw.ws_url(&format!("token={no_claim}"))).await;
    assert_eq!(hello["restaurant_id"], a.to_string());
    assert_eq!(ws.json().await["type"], "snapshot");
    ws.send_text(&auth_message(&no_claim)).await;
    ws.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(ws.json().await["type"], "pong", "a valid refresh is silent");
    remove_member(&pool, member, a).await;
    let again = token_with(json!({ "sub": member, "exp": exp() + 60 }));
    ws.send_text(&auth_message(&again)).await;
    match ws.next(Duration::from_secs(5)).await {
        Next::Close(code, reason) => {
            assert_eq!(code, 4403, "{reason}");
        }
        other => panic!("expected 4403 after a refresh without membership, got {other:?}"),
    }

    // 2. A socket opened with a restaurant claim and no `sub`: a token
    //    without `sub` and without a claim (an anon key) does not extend it.
    let claim_only = token_with(json!({ "restaurant_id": a, "exp": Utc::now().timestamp() + 3 }));
    let (mut ws, _) = dashboard(&gw.ws_url(&format!("token={claim_only}"))).await;
    assert_eq!(ws.json().await["type"], "snapshot");
    let anon = token_with(json!({ "role": "anon", "exp": exp() + 3600 }));
    ws.send_text(&auth_message(&anon)).await;
    let answer = ws.json().await;
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "auth_mismatch", "{answer}");
    match ws.next(Duration::from_secs(8)).await {
        Next::Close(code, reason) => {
            assert_eq!((code, reason.as_str()), (4401, "token expired"));
        }
        other => panic!("the anon key must not have extended the socket: {other:?}"),
    }

    // 3. Same user, a claim for another restaurant: refused, socket kept.
    let user = Uuid::new_v4();
    let t = token_with(json!({ "sub": user, "restaurant_id": a, "exp": exp() }));
    let (mut ws, _) = dashboard(&gw.ws_url(&format!("token={t}"))).await;
    assert_eq!(ws.json().await["type"], "snapshot");
    let other = token_with(json!({ "sub": user, "restaurant_id": b, "exp": exp() }));
    ws.send_text(&auth_message(&other)).await;
    assert_eq!(ws.json().await["code"], "auth_mismatch");
    ws.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(ws.json().await["type"], "pong");
}

/// Removing a row from `restaurant_members` closes that member's open
/// sockets within MEMBERSHIP_RECHECK_MS; sockets admitted by a restaurant
/// claim, and other members, stay.
#[tokio::test]
async fn removed_member_loses_open_sockets_within_the_recheck_period() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let a = Uuid::new_v4();
    let (leaving, staying) = (Uuid::new_v4(), Uuid::new_v4());
    add_member(&pool, leaving, a).await;
    add_member(&pool, staying, a).await;
    let mut cfg = config();
    cfg.database_url = Some(db.url.clone());
    cfg.membership_recheck_ms = 300;
    let gw = Gateway::start(cfg).await;
    let no_claim =
        |user: Uuid| token_with(json!({ "sub": user, "exp": Utc::now().timestamp() + 600 }));
    let (mut gone1, _) = dashboard(&gw.ws_url(&format!("token={}", no_claim(leaving)))).await;
    let (mut gone2, _) = dashboard(&gw.ws_url(&format!("token={}", no_claim(leaving)))).await;
    let (mut kept, _) = dashboard(&gw.ws_url(&format!("token={}", no_claim(staying)))).await;
    let (mut claimed, _) = dashboard(&gw.ws_url(&format!("token={}", token(a)))).await;
    // Snapshots first (the database is configured).
    for ws in [&mut gone1, &mut gone2, &mut kept, &mut claimed] {
        assert_eq!(ws.json().await["type"], "snapshot");
    }
    remove_member(&pool, leaving, a).await;
    for ws in [&mut gone1, &mut gone2] {
        match ws.next(Duration::from_secs(5)).await {
            Next::Close(code, reason) => {
                assert_eq!(code, 4403);
                assert_eq!(reason, "no longer a member of this restaurant");
            }
            other => panic!("expected 4403, got {other:?}"),
        }
    }
    for ws in [&mut kept, &mut claimed] {
        ws.send_text(r#"{"type":"ping"}"#).await;
        assert_eq!(ws.json().await["type"], "pong");
    }
    let m = crate::support::metrics(&format!("http://{}", gw.addr)).await;
    assert!(
        m.contains("orders_gateway_membership_revocations_total"),
        "{m}"
    );
}
