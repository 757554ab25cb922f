//! JSON endpoints: the cluster view for dashboards' owners and the publish
//! endpoint for order services.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState, bearer, parse_query, status_ok};
use crate::broker::PublishRequest;
use crate::domain::{EventBody, EventKind, ORDER_STATUSES, Order, RestaurantId, format_timestamp};

/// Largest accepted publish body.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

async fn caller_restaurant(
    st: &AppState,
    headers: &HeaderMap,
    raw: Option<String>,
) -> Result<RestaurantId, ApiError> {
    let query = parse_query(raw.as_deref());
    // Status endpoints take the token from the Authorization header only.
    let token = bearer(headers, &Default::default());
    let (_, restaurant) = st.resolve(token, &query).await?;
    Ok(restaurant)
}

pub async fn status(
    State(st): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let r = caller_restaurant(&st, &headers, raw).await?;
    let node = &st.sessions.node;
    let backend = node.backend();
    let connections = backend.connections(r).await?.len();
    let instances = backend.live_instances().await?;
    let (leader, last_poll_at) = if st.database_configured {
        let leader = backend.leader().await?;
        let state = backend.load_poller_state(&[]).await?;
        let last = state
            .last_poll_ms
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .map(format_timestamp);
        (leader, last)
    } else {
        (None, None)
    };
    Ok(status_ok(
        StatusCode::OK,
        json!({
            "restaurant_id": r,
            "connections": connections,
            "local_connections": node.hub().restaurant_connections(r),
            "instances": instances,
            "realtime": {
                "running": !st.is_draining(),
                "poller_leader": leader,
                "last_poll_at": last_poll_at,
                "poll_interval_ms": st.poll_interval_ms,
            },
        }),
    ))
}

pub async fn connections(
    State(st): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let r = caller_restaurant(&st, &headers, raw).await?;
    let list: Vec<_> = st
        .sessions
        .node
        .backend()
        .connections(r)
        .await?
        .into_iter()
        .map(|c| {
            json!({
                "connection_id": c.connection_id,
                "instance_id": c.instance_id,
                "user_id": c.user_id,
                "connected_at": format_timestamp(c.connected_at),
            })
        })
        .collect();
    Ok(status_ok(
        StatusCode::OK,
        json!({ "restaurant_id": r, "connections": list }),
    ))
}

#[derive(Deserialize)]
struct PublishBody {
    #[serde(rename = "type")]
    kind: EventKind,
    order: Order,
    previous_status: Option<String>,
}

/// `POST /api/orders/events`: number, deduplicate and broadcast one order
/// event through the same server-side step the poller uses.
pub async fn publish(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Some(key) = &st.publish_api_key else {
        return Err(ApiError::not_found());
    };
    let presented = bearer(&headers, &Default::default()).unwrap_or_default();
    if !bool::from(presented.as_bytes().ct_eq(key.as_bytes())) {
        return Err(ApiError::unauthorized("missing or wrong publish API key"));
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        ));
    }
    let body = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, format!("could not read the body: {e}"))
    })?;
    let bad_body = |e: serde_json::Error| {
        ApiError::bad_request(format!(
            "body must be {{\"type\",\"order\"[,\"previous_status\"]}} with a full order: {e}"
        ))
    };
    let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(bad_body)?;
    integral_floats_to_integers(&mut value);
    if let Some(items) = value.pointer("/order/items").and_then(|v| v.as_array())
        && items.iter().any(|i| {
            i.get("name")
                .is_some_and(|n| !n.is_string() && !n.is_null())
        })
    {
        return Err(ApiError::bad_request(
            "order.items[].name must be a string or null",
        ));
    }
    let event: PublishBody = serde_json::from_value(value).map_err(bad_body)?;
    // The database may hold NULLs here; a publisher sends the full order
    // (docs/openapi.json).
    if event.order.created_at.is_none() || event.order.items.iter().any(|i| i.quantity.is_none()) {
        return Err(ApiError::bad_request(
            "order.created_at and each item's quantity are required",
        ));
    }
    if event.kind == EventKind::OrderDeleted {
        // The poller reports deletions (docs/CHANGE_CAPTURE.md); an
        // order_deleted carries no full order to validate or version.
        return Err(ApiError::bad_request(
            "order_deleted is reported by the gateway's change capture, not published",
        ));
    }
    if !event
        .order
        .order_status
        .as_deref()
        .is_some_and(|s| ORDER_STATUSES.contains(&s))
    {
        return Err(ApiError::bad_request(format!(
            "order.order_status must be one of {ORDER_STATUSES:?}"
        )));
    }
    if let Some(prev) = &event.previous_status
        && !ORDER_STATUSES.contains(&prev.as_str())
    {
        return Err(ApiError::bad_request(
            "previous_status is not an order status",
        ));
    }
    let restaurant = RestaurantId(event.order.restaurant_id);
    let previous_status = match event.kind {
        EventKind::OrderStatusChanged => event.previous_status.as_deref(),
        _ => None,
    };
    let body = serde_json::to_string(&EventBody {
        kind: event.kind,
        previous_status,
        order: &event.order,
        timestamp: format_timestamp(Utc::now()),
    })
    .expect("event serializes");
    let published = st
        .sessions
        .node
        .publish(PublishRequest {
            restaurant,
            version: Some(event.order.version()),
            body,
            fence: None,
        })
        .await?;
    let source = "http";
    if published.duplicate {
        metrics::counter!("orders_gateway_events_deduplicated_total", "source" => source)
            .increment(1);
        Ok(status_ok(
            StatusCode::OK,
            json!({ "event_id": published.event_id.to_string(), "duplicate": true }),
        ))
    } else {
        metrics::counter!("orders_gateway_events_published_total", "source" => source).increment(1);
        Ok(status_ok(
            StatusCode::ACCEPTED,
            json!({ "event_id": published.event_id.to_string() }),
        ))
    }
}

/// JSON has one number type: `2.0` is the integer 2 (JSON Schema says so too,
/// and the OpenAPI document promises integers for quantities and minutes).
/// serde refuses `2.0` for an `i32` field, so whole floats become integers
/// before the body is read into an order. Floats that stay floats
/// (`total_price`) read the same either way.
fn integral_floats_to_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::integral_floats_to_integers;
    use serde_json::json;

    #[test]
    fn whole_floats_read_as_integers_and_fractions_stay() {
        let mut v = json!({"quantity": -776.0, "price": 12.5, "n": [3.0, 1e300], "s": "4.0"});
        integral_floats_to_integers(&mut v);
        assert_eq!(
            v,
            json!({"quantity": -776, "price": 12.5, "n": [3, 1e300], "s": "4.0"})
        );
        assert!(v["quantity"].is_i64());
    }
}
