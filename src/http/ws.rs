//! `GET /api/ws/orders/live`: everything about the request is decided
//! before the upgrade; failures are told with a close code right after it.
//!
//! The upgrade is done here rather than with axum's `WebSocketUpgrade`:
//! the session needs tungstenite's raw frames to send a large message
//! (a snapshot) in fragments, so that a socket never buffers more than one
//! fragment (see `session::FRAGMENT`), and axum's socket hides them.

use axum::extract::{FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

use super::{ApiError, AppState, bearer, parse_query};
use crate::domain::EventId;
use crate::session::{self, Admission, CloseReason};

/// Client frames above this are refused with 1009.
pub const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Small socket buffers keep an idle connection's memory low: dashboards
/// send tiny frames (pings; an occasional ~1 KiB `auth`, read in a few
/// reads) and receive ~1 KiB events. The read buffer is allocated per
/// socket up front (4 KiB here was a quarter of an idle socket's memory;
/// see docs/BENCHMARKS.md).
const READ_BUFFER: usize = 512;
const WRITE_BUFFER: usize = 0;
/// Past this much unsent data, tungstenite refuses a frame. The session
/// sends every message in fragments of at most `session::FRAGMENT` and
/// waits for each to leave, so only a fragment and a few control frames
/// are ever buffered; this is a backstop, never allocated.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

/// A valid WebSocket upgrade request: the pending upgrade and the answer key.
pub struct Upgrade {
    on_upgrade: OnUpgrade,
    accept: HeaderValue,
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Upgrade, ApiError> {
        if parts.method != Method::GET {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "WebSocket upgrades use GET",
            ));
        }
        let h = &parts.headers;
        if !header_has_token(h, header::CONNECTION, "upgrade")
            || !header_has_token(h, header::UPGRADE, "websocket")
        {
            return Err(ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "this endpoint only speaks WebSocket",
            ));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(ApiError::bad_request("Sec-WebSocket-Version must be 13"));
        }
        let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(ApiError::bad_request("Sec-WebSocket-Key is missing"));
        };
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .expect("base64 is a valid header value");
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "connection cannot be upgraded",
            ));
        };
        Ok(Upgrade { on_upgrade, accept })
    }
}

impl Upgrade {
    /// Answer 101 and run `f` on the socket once hyper hands it over.
    fn on_upgrade<F, Fut>(self, f: F) -> Response
    where
        F: FnOnce(session::Socket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(WRITE_BUFFER)
            .max_write_buffer_size(MAX_WRITE_BUFFER)
            .max_message_size(Some(MAX_CLIENT_FRAME))
            .max_frame_size(Some(MAX_CLIENT_FRAME));
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let socket = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            f(socket).await;
        });
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (header::SEC_WEBSOCKET_ACCEPT, self.accept),
            ],
        )
            .into_response()
    }
}

pub async fn upgrade(
    State(st): State<AppState>,
    ws: Upgrade,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let admission = admit(&st, &headers, raw.as_deref()).await;
    let ctx = st.sessions.clone();
    ws.on_upgrade(move |mut socket| async move {
            match admission {
                Ok(admission) => {
                    let span = tracing::info_span!(
                        "socket",
                        instance_id = %ctx.node.instance_id(),
                        restaurant_id = %admission.restaurant,
                        connection_id = tracing::field::Empty,
                    );
                    session::run(ctx, socket, admission).instrument(span).await
                }
                Err(reason) => {
                    metrics::counter!("orders_gateway_connections_rejected_total", "code" => reason.code().to_string())
                        .increment(1);
                    session::close(&mut socket, &reason).await
                }
            }
        })
}

async fn admit(
    st: &AppState,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<Admission, CloseReason> {
    if st.is_draining() {
        return Err(CloseReason::ShuttingDown);
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if !st.origins.allows(origin) {
        return Err(CloseReason::Forbidden("origin not allowed".into()));
    }
    let query = parse_query(raw);
    let last_event_id = match query.get("last_event_id").map(|s| s.trim()) {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<EventId>()
                .map_err(|_| CloseReason::BadRequest("malformed last_event_id".into()))?,
        ),
    };
    let (identity, restaurant) = st
        .resolve(bearer(headers, &query), &query)
        .await
        .map_err(|e| e.close_reason())?;
    Ok(Admission {
        user_id: identity.user_id,
        restaurant,
        expires_at: identity.expires_at,
        last_event_id,
    })
}
