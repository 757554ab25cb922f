//! Key rotation with `JWT_JWKS_URL`, against a real local HTTP server whose
//! JWKS document changes under the gateway: a new key works at once, one
//! refetch serves every waiting socket, a broken or empty document never
//! drops known keys, and each key's `use`/`alg` is honoured.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use base64::Engine;
use chrono::Utc;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Gateway, Ws, config, dashboard};

/// A JWKS endpoint whose document and status the test changes at will.
#[derive(Clone)]
struct KeyServer {
    url: String,
    doc: Arc<Mutex<(StatusCode, String)>>,
    fetches: Arc<AtomicUsize>,
}

impl KeyServer {
    async fn start(doc: Value) -> KeyServer {
        let state = Arc::new(Mutex::new((StatusCode::OK, doc.to_string())));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, f) = (state.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (s, f) = (s.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = s.lock().unwrap().clone();
                    (status, [("content-type", "application/json")], body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        KeyServer {
            url: format!("http://{addr}/jwks.json"),
            doc: state,
            fetches,
        }
    }

    fn serve(&self, status: StatusCode, body: impl Into<String>) {
        *self.doc.lock().unwrap() = (status, body.into());
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// A fresh P-256 key: its signer and its public JWK.
struct EcKey {
    kid: String,
    signer: EncodingKey,
    jwk: Value,
}

impl EcKey {
    fn generate(kid: &str) -> EcKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        EcKey {
            kid: kid.into(),
            signer: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                "x": b64(&point[1..33]), "y": b64(&point[33..65]),
            }),
        }
    }

    fn token(&self, restaurant: Uuid) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        let claims = json!({
            "sub": Uuid::new_v4(), "restaurant_id": restaurant, "exp": Utc::now().timestamp() + 600,
        });
        encode(&h, &claims, &self.signer).unwrap()
    }
}

fn jwks(keys: &[&Value]) -> Value {
    json!({ "keys": keys })
}

async fn gateway(keys: &KeyServer) -> Gateway {
    let mut cfg = config();
    cfg.jwt_secret = None;
    cfg.jwt_jwks_url = Some(keys.url.clone());
    Gateway::start(cfg).await
}

async fn connects(gw: &Gateway, token: &str) -> Result<(), (u16, String)> {
    let mut ws = Ws::connect(&gw.ws_url(&format!("token={token}"))).await;
    match ws.next(std::time::Duration::from_secs(15)).await {
        crate::support::Next::Json(v) if v["type"] == "connection_established" => Ok(()),
        crate::support::Next::Close(code, reason) => Err((code, reason)),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_key_published_after_the_last_fetch_works_at_once_with_one_shared_refetch() {
    let old = EcKey::generate("old");
    let keys = KeyServer::start(jwks(&[&old.jwk])).await;
    let gw = gateway(&keys).await;
    let r = Uuid::new_v4();
    dashboard(&gw.ws_url(&format!("token={}", old.token(r)))).await;
    let before = keys.fetches();
    // Rotation: the identity provider publishes a new key and signs with it
    // right away. Twenty sockets arrive at once with the new kid.
    let new = EcKey::generate("new");
    keys.serve(StatusCode::OK, jwks(&[&old.jwk, &new.jwk]).to_string());
    let attempts: Vec<_> = (0..20)
        .map(|_| {
            let url = gw.ws_url(&format!("token={}", new.token(r)));
            tokio::spawn(async move {
                let mut ws = Ws::connect(&url).await;
                ws.json().await["type"].clone()
            })
        })
        .collect();
    for a in attempts {
        assert_eq!(a.await.unwrap(), "connection_established");
    }
    let refetches = keys.fetches() - before;
    assert!(
        (1..=2).contains(&refetches),
        "20 sockets should share one refetch, saw {refetches}"
    );
    // Made-up kids cannot make the gateway hammer the identity provider:
    // fetches stay one per cooldown, and each is refused with 4401.
    let before = keys.fetches();
    let bogus: Vec<_> = (0..20)
        .map(|i| {
            let url = gw.ws_url(&format!(
                "token={}",
                EcKey::generate(&format!("bogus-{i}")).token(r)
            ));
            tokio::spawn(async move {
                let mut ws = Ws::connect(&url).await;
                ws.close_code().await
            })
        })
        .collect();
    for b in bogus {
        assert_eq!(b.await.unwrap(), 4401);
    }
    let refetches = keys.fetches() - before;
    assert!(refetches <= 3, "bogus kids caused {refetches} fetches");
}

#[tokio::test]
async fn an_empty_or_broken_jwks_never_drops_known_keys() {
    let known = EcKey::generate("known");
    let keys = KeyServer::start(jwks(&[&known.jwk])).await;
    let gw = gateway(&keys).await;
    let r = Uuid::new_v4();
    assert_eq!(connects(&gw, &known.token(r)).await, Ok(()));
    let stranger = EcKey::generate("stranger");
    for (status, body) in [
        (StatusCode::OK, json!({"keys": []}).to_string()),
        (StatusCode::OK, "{not json".to_string()),
        (StatusCode::OK, json!({"nope": 1}).to_string()),
        (
            StatusCode::OK,
            json!({"keys": [{"kty": "RSA", "kid": "x", "n": "%%%", "e": "AQAB"}]}).to_string(),
        ),
        (StatusCode::INTERNAL_SERVER_ERROR, "down".to_string()),
    ] {
        keys.serve(status, body.clone());
        // An unknown kid forces a refetch of the bad document...
        let before = keys.fetches();
        let refused = connects(&gw, &stranger.token(r)).await;
        assert_eq!(refused.map_err(|(c, _)| c), Err(4401), "{status} {body}");
        assert_eq!(keys.fetches(), before + 1, "{status} {body} was fetched");
        // ...after which the known key still verifies.
        assert_eq!(
            connects(&gw, &known.token(r)).await,
            Ok(()),
            "{status} {body}"
        );
    }
}

#[tokio::test]
async fn each_keys_use_and_alg_are_honoured() {
    let sig = EcKey::generate("sig");
    let enc = EcKey::generate("enc");
    let mislabelled = EcKey::generate("mislabelled");
    let foreign_alg = EcKey::generate("foreign-alg");
    let mut enc_jwk = enc.jwk.clone();
    enc_jwk["use"] = json!("enc");
    let mut mislabelled_jwk = mislabelled.jwk.clone();
    mislabelled_jwk["alg"] = json!("RS256");
    let mut foreign_jwk = foreign_alg.jwk.clone();
    foreign_jwk["alg"] = json!("ECDH-ES");
    let keys = KeyServer::start(jwks(&[&sig.jwk, &enc_jwk, &mislabelled_jwk, &foreign_jwk])).await;
    let gw = gateway(&keys).await;
    let r = Uuid::new_v4();
    // A key with an unknown `alg` does not spoil the others in its document.
    assert_eq!(connects(&gw, &sig.token(r)).await, Ok(()));
    for (what, key) in [
        ("use enc", &enc),
        ("alg RS256 on an EC key", &mislabelled),
        ("alg ECDH-ES", &foreign_alg),
    ] {
        assert_eq!(
            connects(&gw, &key.token(r)).await.map_err(|(c, _)| c),
            Err(4401),
            "{what}"
        );
    }
}

/// A key taken out of the document (rotated out, or leaked) stops
/// verifying within `JWT_JWKS_MAX_AGE_SECS`, even though tokens signed
/// with it name a `kid` the gateway already holds.
#[tokio::test]
async fn a_key_removed_from_the_jwks_stops_verifying_within_the_max_age() {
    let leaked = EcKey::generate("leaked");
    let next = EcKey::generate("next");
    let keys = KeyServer::start(jwks(&[&leaked.jwk, &next.jwk])).await;
    let mut cfg = config();
    cfg.jwt_secret = None;
    cfg.jwt_jwks_url = Some(keys.url.clone());
    cfg.jwt_jwks_max_age_secs = 1;
    let gw = Gateway::start(cfg).await;
    let r = Uuid::new_v4();
    assert_eq!(connects(&gw, &leaked.token(r)).await, Ok(()));
    keys.serve(StatusCode::OK, jwks(&[&next.jwk]).to_string());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        connects(&gw, &leaked.token(r)).await.map_err(|(c, _)| c),
        Err(4401)
    );
    assert_eq!(connects(&gw, &next.token(r)).await, Ok(()));
}
