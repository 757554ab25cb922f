//! The vocabulary every other module speaks: restaurant ids, event ids,
//! orders, events and the frames sent to dashboards. Imports nothing of ours.

use std::fmt;
use std::str::FromStr;

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use uuid::Uuid;

/// A restaurant: the unit of isolation. Dashboards of one restaurant never
/// see another restaurant's orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RestaurantId(pub Uuid);

impl RestaurantId {
    /// The pub/sub channel of the restaurant (part of the external contract).
    pub fn channel(&self) -> String {
        format!("{CHANNEL_PREFIX}{}", self.0)
    }

    pub fn from_channel(channel: &str) -> Option<Self> {
        channel
            .strip_prefix(CHANNEL_PREFIX)
            .and_then(|s| Uuid::parse_str(s).ok())
            .map(RestaurantId)
    }
}

impl fmt::Display for RestaurantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for RestaurantId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(RestaurantId)
    }
}

pub const CHANNEL_PREFIX: &str = "orders:";

/// Position of an event in its restaurant's stream.
///
/// Rendered as `<epoch:13 digits>-<seq:12 digits>` so that the string order is
/// the event order (clients may compare ids as strings to drop duplicates).
/// The epoch is the millisecond time at which the restaurant's history was
/// started; when history is lost (Redis restart, expiry) a new, larger epoch
/// begins, which is how a resume request detects the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    pub epoch: u64,
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:013}-{:012}", self.epoch, self.seq)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed event id")]
pub struct MalformedEventId;

impl FromStr for EventId {
    type Err = MalformedEventId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, seq) = s.split_once('-').ok_or(MalformedEventId)?;
        let digits = |p: &str, len: usize| {
            if p.len() == len && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse::<u64>().map_err(|_| MalformedEventId)
            } else {
                Err(MalformedEventId)
            }
        };
        Ok(EventId {
            epoch: digits(epoch, 13)?,
            seq: digits(seq, 12)?,
        })
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The kinds of order event (the `type` of the frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    OrderCreated,
    OrderStatusChanged,
    OrderUpdated,
    /// The order is gone from the table; its `order` is only
    /// `{"id","restaurant_id"}` ([`DeletedOrder`]).
    OrderDeleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::OrderCreated => "order_created",
            EventKind::OrderStatusChanged => "order_status_changed",
            EventKind::OrderUpdated => "order_updated",
            EventKind::OrderDeleted => "order_deleted",
        }
    }
}

/// Statuses after which an order leaves the board.
pub const TERMINAL_STATUSES: [&str; 2] = ["completed", "cancelled"];
pub const ORDER_STATUSES: [&str; 7] = [
    "pending",
    "confirmed",
    "preparing",
    "ready",
    "served",
    "completed",
    "cancelled",
];

pub fn is_open_status(status: &str) -> bool {
    !TERMINAL_STATUSES.contains(&status)
}

/// An order as dashboards see it (the contract's `<order>`).
///
/// Every column the contract does not name as a key may be NULL in a schema
/// the gateway did not create, so every field but the three the gateway
/// cannot work without (`id`, `restaurant_id`, `updated_at`: identity, routing
/// and version) is optional and goes out as JSON `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: Uuid,
    pub order_number: Option<String>,
    pub restaurant_id: Uuid,
    pub table_number: Option<i32>,
    pub customer_name: Option<String>,
    pub customer_phone: Option<String>,
    pub order_status: Option<String>,
    pub payment_status: Option<String>,
    pub payment_method: Option<String>,
    pub total_price: Option<f64>,
    pub estimated_time: Option<i32>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub items: Vec<OrderItem>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderItem {
    pub id: Uuid,
    pub menu_item_id: Option<Uuid>,
    pub quantity: Option<i32>,
    pub unit_price: Option<f64>,
    /// From `menu_items.name` when that table exists; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Order {
    pub fn version(&self) -> OrderVersion {
        OrderVersion::new(self.id, self.updated_at)
    }

    /// On the board: a status that is not terminal. A NULL status counts as
    /// closed, as it does in SQL (`NULL NOT IN (...)` is not true), so that
    /// snapshots and the poller agree.
    pub fn is_open(&self) -> bool {
        self.order_status.as_deref().is_some_and(is_open_status)
    }
}

/// The `order` of an `order_deleted` event.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DeletedOrder {
    pub id: Uuid,
    pub restaurant_id: Uuid,
}

fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_timestamp(*t))
}

fn rfc3339_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// `2024-01-15T10:30:45Z`, with fractional digits only when present.
pub fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// One version of one order: `id` + `updated_at`. Two reports of the same
/// version (order service and poller) are one change and reach dashboards once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrderVersion {
    pub order_id: Uuid,
    /// `updated_at` in microseconds since the Unix epoch (PostgreSQL's precision).
    pub updated_at_micros: i64,
}

impl OrderVersion {
    pub fn new(order_id: Uuid, updated_at: DateTime<Utc>) -> Self {
        OrderVersion {
            order_id,
            updated_at_micros: updated_at.timestamp_micros(),
        }
    }

    /// The version of an order's deletion: after every version it had (its
    /// `updated_at` is unknown once the row is gone), and the same whoever
    /// notices the deletion, so two reports of it deduplicate.
    pub fn deleted(order_id: Uuid) -> Self {
        OrderVersion {
            order_id,
            updated_at_micros: i64::MAX,
        }
    }

    /// Token used as the deduplication key: `<order_id>@<micros>`.
    pub fn token(&self) -> String {
        format!("{}@{}", self.order_id, self.updated_at_micros)
    }
}

/// The body of an order event before the broker stamps its `event_id`.
#[derive(Debug, Serialize)]
pub struct EventBody<'a, O: Serialize> {
    #[serde(rename = "type")]
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_status: Option<&'a str>,
    pub order: &'a O,
    pub timestamp: String,
}

/// Put `"event_id":"…"` first in a JSON object. The body is produced by us
/// or validated to be an object, so splicing text is safe and keeps the
/// order JSON byte-for-byte (no re-encoding of numbers).
pub fn stamp_event_id(body: &str, id: EventId) -> String {
    let rest = body.trim_start().strip_prefix('{').unwrap_or("}");
    let rest = rest.trim_start();
    if rest.starts_with('}') {
        format!("{{\"event_id\":\"{id}\"}}")
    } else {
        format!("{{\"event_id\":\"{id}\",{rest}")
    }
}

/// An event ready for delivery: serialized once, shared by every socket.
#[derive(Clone, Debug)]
pub struct Frame {
    pub text: Utf8Bytes,
    pub event_id: Option<EventId>,
    /// Version of the order the event carries, used to drop events already
    /// reflected in a snapshot.
    pub version: Option<OrderVersion>,
    /// Events may have been missed and history cannot supply them: the
    /// session follows this frame with a fresh snapshot.
    pub resync: bool,
    /// The event's `timestamp` (when it was published), for the
    /// publish-to-delivery latency metric.
    pub published_at: Option<DateTime<Utc>>,
}

/// The parts of an incoming event the gateway needs to route and deduplicate.
#[derive(Deserialize)]
struct EventHeader {
    #[serde(rename = "type")]
    kind: String,
    event_id: Option<String>,
    order: Option<OrderHeader>,
    /// Kept as text: a publisher's odd timestamp must not refuse the event.
    timestamp: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OrderHeader {
    id: Option<Uuid>,
    restaurant_id: Option<Uuid>,
    updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("not a JSON object with a string \"type\"")]
    NotAnEvent,
    #[error("order.restaurant_id does not match the channel")]
    WrongRestaurant,
    #[error("malformed event_id")]
    BadEventId,
}

impl Frame {
    /// Validate a payload received on `orders:<restaurant>` and wrap it.
    /// An order of another restaurant is refused: isolation does not depend
    /// on every publisher getting the channel right.
    pub fn parse(restaurant: RestaurantId, payload: Utf8Bytes) -> Result<Frame, FrameError> {
        let header: EventHeader =
            serde_json::from_str(payload.as_str()).map_err(|_| FrameError::NotAnEvent)?;
        if header.kind.is_empty() {
            return Err(FrameError::NotAnEvent);
        }
        let event_id = match header.event_id.as_deref() {
            Some(s) => Some(s.parse::<EventId>().map_err(|_| FrameError::BadEventId)?),
            None => None,
        };
        let mut version = None;
        if let Some(order) = header.order {
            if order.restaurant_id.is_some_and(|r| r != restaurant.0) {
                return Err(FrameError::WrongRestaurant);
            }
            if let (Some(id), Some(at)) = (order.id, order.updated_at) {
                version = Some(OrderVersion::new(id, at));
            }
        }
        let published_at = header
            .timestamp
            .as_ref()
            .and_then(|t| t.as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(Frame {
            text: payload,
            event_id,
            version,
            resync: false,
            published_at,
        })
    }

    /// A frame we generate ourselves (control messages).
    pub fn control(value: &serde_json::Value) -> Frame {
        Frame {
            text: Utf8Bytes::from(value.to_string()),
            event_id: None,
            version: None,
            resync: false,
            published_at: None,
        }
    }

    /// `resync_required`, after which the session sends a snapshot.
    pub fn resync(reason: &str) -> Frame {
        Frame {
            resync: true,
            ..Frame::control(&serde_json::json!({ "type": "resync_required", "reason": reason }))
        }
    }
}

/// Where snapshots of a restaurant's open orders come from (the database,
/// or the demo simulator when there is none).
#[async_trait::async_trait]
pub trait SnapshotSource: Send + Sync + 'static {
    async fn open_orders(&self, r: RestaurantId) -> Result<Vec<Order>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_order_as_strings_and_round_trip() {
        let a = EventId {
            epoch: 1_732_510_000_000,
            seq: 9,
        };
        let b = EventId {
            epoch: 1_732_510_000_000,
            seq: 10,
        };
        let c = EventId {
            epoch: 1_732_510_000_001,
            seq: 1,
        };
        assert!(a.to_string() < b.to_string());
        assert!(b.to_string() < c.to_string());
        assert_eq!(b.to_string().parse::<EventId>().unwrap(), b);
        for bad in [
            "",
            "1-2",
            "abc",
            "1732510000000-00000000000x",
            "1732510000000_000000000001",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn stamping_puts_the_id_first_and_keeps_the_body() {
        let id = EventId { epoch: 1, seq: 2 };
        assert_eq!(
            stamp_event_id(r#"{"type":"x","n":1.50}"#, id),
            r#"{"event_id":"0000000000001-000000000002","type":"x","n":1.50}"#
        );
        assert_eq!(
            stamp_event_id("{ }", id),
            r#"{"event_id":"0000000000001-000000000002"}"#
        );
    }

    #[test]
    fn frames_of_another_restaurant_are_refused() {
        let r = RestaurantId(Uuid::new_v4());
        let other = Uuid::new_v4();
        let text = format!(
            r#"{{"type":"order_created","order":{{"id":"{other}","restaurant_id":"{other}"}}}}"#
        );
        assert_eq!(
            Frame::parse(r, text.into()).unwrap_err(),
            FrameError::WrongRestaurant
        );
        let ok = format!(
            r#"{{"type":"order_created","event_id":"0000000000001-000000000002","order":{{"id":"{other}","restaurant_id":"{}","updated_at":"2024-01-15T10:30:45.5Z"}}}}"#,
            r.0
        );
        let f = Frame::parse(r, ok.into()).unwrap();
        assert_eq!(f.event_id, Some(EventId { epoch: 1, seq: 2 }));
        assert_eq!(f.version.unwrap().order_id, other);
        assert!(Frame::parse(r, "[]".into()).is_err());
        assert!(Frame::parse(r, "not json".into()).is_err());
    }
}
