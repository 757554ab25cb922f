//! Tokens to identities. HS256 with a shared secret (Supabase legacy) and
//! RS256/ES256 from a JWKS document (Supabase signing keys). The algorithm
//! is pinned by the key, never taken from the token; `none` is refused;
//! `exp` is required; `nbf`, `aud` and `iss` are checked. Knows nothing of
//! HTTP.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::Value;

use crate::config::Config;
use crate::domain::RestaurantId;

/// Why a token was refused; `reason()` labels the metric and close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token missing")]
    Missing,
    #[error("token malformed")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("algorithm not allowed")]
    WrongAlgorithm,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong audience")]
    WrongAudience,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("signing keys unavailable")]
    KeysUnavailable,
    #[error("invalid restaurant claim")]
    BadRestaurantClaim,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::WrongAlgorithm => "wrong_alg",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::UnknownKey => "unknown_key",
            AuthError::KeysUnavailable => "keys_unavailable",
            AuthError::BadRestaurantClaim => "bad_restaurant_claim",
        }
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// `sub`, the user id (empty when the token has none).
    pub user_id: String,
    /// The restaurant claim, when present.
    pub restaurant: Option<RestaurantId>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: i64,
}

#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    secret: Option<DecodingKey>,
    jwks: Option<Jwks>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
    /// Dotted path, e.g. `restaurant_id` or `app_metadata.restaurant_id`.
    restaurant_claim: Vec<String>,
}

/// Keys from the JWKS document, cached and refetched when a token names a
/// `kid` we do not have (key rotation). Refetches are single-flight: one at
/// a time, shared by every token waiting for it, at most one per
/// `REFETCH_COOLDOWN`. A token with an unknown `kid` waits for a fetch that
/// started after it arrived (never fails just because one happened a
/// moment earlier); an empty or broken document never drops known keys.
struct Jwks {
    url: String,
    client: reqwest::Client,
    /// Read on every token, written on refetch: a std RwLock, never held
    /// across the fetch.
    keys: RwLock<HashMap<String, (DecodingKey, Algorithm)>>,
    /// Fetches started so far; read without the lock by arriving tokens.
    started: AtomicU64,
    /// Held by the one fetch in flight (a tokio Mutex, on purpose held
    /// across it: waiters queue behind it instead of fetching again); holds
    /// when the last fetch started, for the cooldown.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// Keys older than this are fetched again before the next token.
    max_age: Duration,
}

/// Minimum time between two fetches of the JWKS document: bounds what a
/// flood of tokens with made-up `kid`s costs the identity provider.
const REFETCH_COOLDOWN: Duration = Duration::from_secs(1);
/// One fetch of the JWKS document.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

impl Verifier {
    pub fn new(cfg: &Config) -> Verifier {
        let jwks = cfg.jwt_jwks_url.as_ref().map(|url| Jwks {
            url: url.clone(),
            client: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .build()
                .expect("HTTP client builds"),
            keys: RwLock::new(HashMap::new()),
            started: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(None),
            max_age: Duration::from_secs(cfg.jwt_jwks_max_age_secs),
        });
        Verifier {
            inner: Arc::new(Inner {
                secret: cfg
                    .jwt_secret
                    .as_ref()
                    .map(|s| DecodingKey::from_secret(s.as_bytes())),
                jwks,
                audience: cfg.jwt_audience.clone(),
                issuer: cfg.jwt_issuer.clone(),
                leeway: cfg.jwt_leeway_seconds,
                restaurant_claim: cfg
                    .jwt_restaurant_claim
                    .split('.')
                    .map(str::to_string)
                    .collect(),
            }),
        }
    }

    /// Fetch the JWKS document ahead of the first token (failures are logged;
    /// verification retries).
    pub async fn warm_up(&self) {
        if let Some(jwks) = &self.inner.jwks {
            let mut last = jwks.fetching.lock().await;
            jwks.fetch(&mut last).await;
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                AuthError::WrongAlgorithm
            }
            _ => AuthError::Malformed,
        })?;
        let (key, alg) = match header.alg {
            Algorithm::HS256 => match &self.inner.secret {
                Some(k) => (k.clone(), Algorithm::HS256),
                None => return Err(AuthError::WrongAlgorithm),
            },
            Algorithm::RS256 | Algorithm::ES256 => {
                let Some(jwks) = &self.inner.jwks else {
                    return Err(AuthError::WrongAlgorithm);
                };
                let (key, key_alg) = jwks.key(header.kid.as_deref()).await?;
                if key_alg != header.alg {
                    return Err(AuthError::WrongAlgorithm);
                }
                (key, key_alg)
            }
            _ => return Err(AuthError::WrongAlgorithm),
        };
        let mut v = Validation::new(alg);
        v.leeway = self.inner.leeway;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        match &self.inner.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.inner.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = decode::<Value>(token, &key, &v).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::WrongAudience,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::WrongIssuer,
            ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
            _ => AuthError::Malformed,
        })?;
        let claims = data.claims;
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_f64)
            .ok_or(AuthError::Malformed)? as i64;
        let user_id = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut node = Some(&claims);
        for part in &self.inner.restaurant_claim {
            node = node.and_then(|n| n.get(part));
        }
        let restaurant = match node {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.parse().map_err(|_| AuthError::BadRestaurantClaim)?),
            Some(_) => return Err(AuthError::BadRestaurantClaim),
        };
        Ok(Identity {
            user_id,
            restaurant,
            expires_at,
        })
    }
}

impl Jwks {
    async fn key(&self, kid: Option<&str>) -> Result<(DecodingKey, Algorithm), AuthError> {
        let kid = kid.unwrap_or("");
        self.refresh_if_old().await;
        // Read before the lookup: any fetch numbered above this one started
        // after the lookup missed, so it saw the document as of now or later.
        let arrived = self.started.load(Ordering::Acquire);
        if let Some(k) = self.lookup(kid) {
            return Ok(k);
        }
        let mut last = self.fetching.lock().await;
        if self.started.load(Ordering::Acquire) == arrived {
            // No fetch began since we looked: run one, after the cooldown
            // (waiting tokens queue on the lock meanwhile and share it).
            if let Some(at) = *last {
                tokio::time::sleep_until((at + REFETCH_COOLDOWN).into()).await;
            }
            self.fetch(&mut last).await;
        }
        drop(last);
        match self.lookup(kid) {
            Some(k) => Ok(k),
            None if self.is_empty() => Err(AuthError::KeysUnavailable),
            None => Err(AuthError::UnknownKey),
        }
    }

    /// A key removed from the document must stop verifying: a copy older
    /// than `max_age` is fetched again by the token that finds it so (the
    /// others go on with the keys held, a fetch being in flight). A failed
    /// or empty fetch keeps the keys and waits `max_age` again.
    async fn refresh_if_old(&self) {
        let Ok(mut last) = self.fetching.try_lock() else {
            return;
        };
        if last.is_some_and(|at| at.elapsed() >= self.max_age) {
            self.fetch(&mut last).await;
        }
    }

    fn is_empty(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn lookup(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        // A token without `kid` is accepted only when the set has one key.
        if kid.is_empty() && keys.len() == 1 {
            return keys.values().next().cloned();
        }
        keys.get(kid).cloned()
    }

    /// Fetch the document (caller holds `fetching`). Known keys are replaced
    /// only by a document with at least one usable key.
    async fn fetch(&self, last: &mut Option<Instant>) {
        *last = Some(Instant::now());
        self.started.fetch_add(1, Ordering::AcqRel);
        metrics::counter!("orders_gateway_jwks_fetches_total").increment(1);
        let fetched = async {
            let resp = self
                .client
                .get(&self.url)
                .send()
                .await?
                .error_for_status()?;
            resp.bytes().await
        }
        .await;
        let body = match fetched {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, url = %self.url, "JWKS fetch failed; keeping known keys");
                metrics::counter!("orders_gateway_jwks_fetch_failures_total").increment(1);
                return;
            }
        };
        let keys = parse_jwks(&body);
        if keys.is_empty() {
            tracing::warn!(url = %self.url, "JWKS document has no usable signing key; keeping known keys");
            metrics::counter!("orders_gateway_jwks_fetch_failures_total").increment(1);
            return;
        }
        tracing::info!(keys = keys.len(), "JWKS fetched");
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }
}

/// The usable signing keys of a JWKS document, by `kid`; anything else
/// (not JSON, no `keys` array, a key that does not parse, `use` other than
/// `sig`, an `alg` other than RS256/ES256 or not matching the key type,
/// a curve other than P-256, a repeated `kid`) is skipped. Never panics.
pub fn parse_jwks(body: &[u8]) -> HashMap<String, (DecodingKey, Algorithm)> {
    let mut keys = HashMap::new();
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return keys;
    };
    let Some(list) = doc.get("keys").and_then(Value::as_array) else {
        return keys;
    };
    for raw in list {
        if raw.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
            continue;
        }
        let declared = match raw.get("alg") {
            None => None,
            Some(Value::String(a)) if a == "RS256" => Some(Algorithm::RS256),
            Some(Value::String(a)) if a == "ES256" => Some(Algorithm::ES256),
            Some(_) => continue,
        };
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            continue;
        };
        if jwk
            .common
            .key_operations
            .as_ref()
            .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
        {
            continue;
        }
        let by_type = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => continue,
        };
        if declared.is_some_and(|d| d != by_type) {
            continue;
        }
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        if keys.contains_key(&kid) {
            continue;
        }
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            keys.insert(kid, (key, by_type));
        }
    }
    keys
}

/// The allowed-origin check for browser sockets.
#[derive(Clone, Debug)]
pub struct OriginPolicy {
    allowed: Option<HashSet<String>>,
}

impl OriginPolicy {
    pub fn new(allowed: Option<Vec<String>>) -> OriginPolicy {
        OriginPolicy {
            allowed: allowed.map(|v| v.into_iter().collect()),
        }
    }

    /// Non-browser clients send no `Origin` and are judged by token alone.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match (&self.allowed, origin) {
            (None, _) | (_, None) => true,
            (Some(set), Some(o)) => set.contains(&o.trim_end_matches('/').to_ascii_lowercase()),
        }
    }
}
