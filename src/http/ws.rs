//! `GET /api/ws/orders/live`: everything about the request is decided
//! before the upgrade; failures are told with a close code right after it.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use tracing::Instrument;

use super::{AppState, bearer, parse_query};
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
/// Past this much unsent data, sends wait (then the queue overflows → 4408).
/// Also the largest single frame that can be sent at all (tungstenite
/// refuses a bigger one with WriteBufferFull, and the session drops the
/// socket): it must hold a whole snapshot. 256 KiB was ~550 open orders, so
/// a busy restaurant's dashboards could never connect. Sends are awaited one
/// at a time, so this is never allocated for queued frames.
const MAX_WRITE_BUFFER: usize = 64 * 1024 * 1024;

pub async fn upgrade(
    State(st): State<AppState>,
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let admission = admit(&st, &headers, raw.as_deref()).await;
    let ctx = st.sessions.clone();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |mut socket| async move {
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
    let grant = st
        .resolve(bearer(headers, &query), &query)
        .await
        .map_err(CloseReason::from)?;
    Ok(Admission {
        user_id: grant.identity.user_id,
        restaurant: grant.restaurant,
        expires_at: grant.identity.expires_at,
        via_membership: grant.via_membership,
        last_event_id,
    })
}
