//! HTTP surface: the router, shared request state, access resolution
//! (token → restaurant), operations endpoints and the embedded board.

mod api;
mod error;
pub mod server;
mod ws;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::auth::{AuthError, Identity, OriginPolicy, Verifier};
use crate::db::Database;
use crate::domain::RestaurantId;
use crate::session::{CloseReason, SessionContext};

/// Request state: cheap to clone, everything behind `Arc`s.
#[derive(Clone)]
pub struct AppState {
    pub sessions: Arc<SessionContext>,
    pub verifier: Verifier,
    pub db: Option<Database>,
    pub origins: OriginPolicy,
    pub publish_api_key: Option<Arc<str>>,
    pub poll_interval_ms: u64,
    pub redis_configured: bool,
    pub database_configured: bool,
    /// Set at the start of shutdown: readiness fails, new sockets get 1001.
    pub draining: Arc<AtomicBool>,
    pub prometheus: PrometheusHandle,
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/ws/orders/live", get(ws::upgrade))
        .route("/api/ws/orders/live/status", get(api::status))
        .route("/api/ws/orders/live/connections", get(api::connections))
        .route(
            "/api/orders/events",
            post(api::publish).layer(DefaultBodyLimit::max(api::MAX_EVENT_BYTES)),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/openapi.json", get(|| asset("application/json", OPENAPI_JSON)))
        .route("/", get(board_page))
        .route("/board.js", get(|| asset("text/javascript", BOARD_JS)))
        .route("/board.css", get(|| asset("text/css", BOARD_CSS)))
        .route("/client/orders-live.js", get(|| asset("text/javascript", CLIENT_JS)))
        .fallback(|| async { ApiError::not_found() })
        .layer(
            // Logs the path only: tokens travel in query strings.
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
            }),
        )
        .with_state(state)
}

const BOARD_HTML: &str = include_str!("../../web/board/index.html");
const BOARD_JS: &str = include_str!("../../web/board/board.js");
const BOARD_CSS: &str = include_str!("../../web/board/board.css");
const CLIENT_JS: &str = include_str!("../../clients/js/orders-live.js");
/// Written by hand and held to the code by the suite: `scripts/check-api.sh`
/// validates it and runs Schemathesis against a live gateway.
const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

async fn board_page() -> Response {
    asset("text/html; charset=utf-8", BOARD_HTML).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.is_draining() {
        return ApiError::unavailable("draining").into_response();
    }
    if st.redis_configured
        && let Err(e) = st.sessions.node.backend().ping().await
    {
        return ApiError::unavailable(format!("redis: {e}")).into_response();
    }
    Json(json!({ "status": "ready" })).into_response()
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.prometheus.render(),
    )
        .into_response()
}

/// Why access to a restaurant was refused, with the answer for sockets
/// and for HTTP.
#[derive(Debug)]
pub enum AccessError {
    Auth(AuthError),
    BadRequest(String),
    Forbidden(String),
    Unavailable(String),
}

impl AccessError {
    pub fn close_reason(&self) -> CloseReason {
        match self {
            AccessError::Auth(e) => CloseReason::Unauthorized(e.to_string()),
            AccessError::BadRequest(m) => CloseReason::BadRequest(m.clone()),
            AccessError::Forbidden(m) => CloseReason::Forbidden(m.clone()),
            AccessError::Unavailable(m) => CloseReason::Unavailable(m.clone()),
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> ApiError {
        match e {
            AccessError::Auth(e) => e.into(),
            AccessError::BadRequest(m) => ApiError::bad_request(m),
            AccessError::Forbidden(m) => ApiError::forbidden(m),
            AccessError::Unavailable(m) => ApiError::unavailable(m),
        }
    }
}

/// The token from `Authorization: Bearer`, else from `?token=`.
pub fn bearer(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    from_header.or_else(|| query.get("token").cloned())
}

pub fn parse_query(raw: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

impl AppState {
    /// Token → identity → the one restaurant this request is about.
    pub async fn resolve(
        &self,
        token: Option<String>,
        query: &HashMap<String, String>,
    ) -> Result<(Identity, RestaurantId), AccessError> {
        let token = token.ok_or(AccessError::Auth(AuthError::Missing))?;
        let identity = self.verifier.verify(&token).await.map_err(|e| {
            metrics::counter!("orders_gateway_auth_failures_total", "reason" => e.reason())
                .increment(1);
            AccessError::Auth(e)
        })?;
        // Empty means "not given" (a URL template with no value); anything
        // else must be a UUID as it stands.
        let requested = match query.get("restaurant_id").map(|s| s.as_str()) {
            None | Some("") => None,
            Some(s) => Some(
                s.parse::<RestaurantId>()
                    .map_err(|_| AccessError::BadRequest("restaurant_id is not a UUID".into()))?,
            ),
        };
        if let Some(claimed) = identity.restaurant {
            return match requested {
                Some(r) if r != claimed => Err(AccessError::Forbidden(
                    "token is not valid for that restaurant".into(),
                )),
                _ => Ok((identity, claimed)),
            };
        }
        let Some(db) = &self.db else {
            return Err(AccessError::Forbidden("token names no restaurant".into()));
        };
        let memberships = db.memberships(&identity.user_id).await.map_err(|e| {
            tracing::warn!(error = %e, "membership lookup failed");
            AccessError::Unavailable("membership lookup unavailable, retry".into())
        })?;
        let restaurant = match (memberships.as_slice(), requested) {
            ([], _) => {
                return Err(AccessError::Forbidden(
                    "not a member of any restaurant".into(),
                ));
            }
            ([only], None) => *only,
            (_, None) => {
                return Err(AccessError::BadRequest(
                    "member of several restaurants: restaurant_id is required".into(),
                ));
            }
            (all, Some(r)) if all.contains(&r) => r,
            (_, Some(_)) => {
                return Err(AccessError::Forbidden(
                    "not a member of that restaurant".into(),
                ));
            }
        };
        Ok((identity, restaurant))
    }
}

pub(crate) fn status_ok<T: serde::Serialize>(status: StatusCode, body: T) -> Response {
    (status, Json(body)).into_response()
}
