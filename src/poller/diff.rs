//! The diff: what the poller knew about each order against what the
//! database shows now. Pure: no I/O, no clock.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{EventKind, Order, is_open_status};

/// What the poller last reported about one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// `None`: the row's status was NULL.
    pub status: Option<String>,
    /// The row's `updated_at` as read.
    pub updated_at_micros: i64,
    /// The `updated_at` the event carried: the row's, or later when the
    /// row's stamp went backwards (see [`published_micros`]).
    pub published_micros: i64,
}

impl Known {
    pub fn new(status: Option<String>, updated_at_micros: i64) -> Known {
        Known {
            status,
            updated_at_micros,
            published_micros: updated_at_micros,
        }
    }

    /// What is known after publishing `order` with `published_micros`.
    pub fn of(order: &Order, published_micros: i64) -> Known {
        Known {
            status: order.order_status.clone(),
            updated_at_micros: order.updated_at.timestamp_micros(),
            published_micros,
        }
    }

    /// On the board (see [`Order::is_open`]).
    pub fn is_open(&self) -> bool {
        self.status.as_deref().is_some_and(is_open_status)
    }

    /// Stored as `status|micros[|published micros]` in the poller's state;
    /// a NULL status is empty (no order status is).
    pub fn encode(&self) -> String {
        let status = self.status.as_deref().unwrap_or_default();
        if self.published_micros == self.updated_at_micros {
            format!("{status}|{}", self.updated_at_micros)
        } else {
            format!(
                "{status}|{}|{}",
                self.updated_at_micros, self.published_micros
            )
        }
    }

    pub fn decode(s: &str) -> Option<Known> {
        let (head, last) = s.rsplit_once('|')?;
        let last: i64 = last.parse().ok()?;
        if let Some((status, micros)) = head.rsplit_once('|')
            && let Ok(micros) = micros.parse::<i64>()
        {
            return Some(Known {
                status: status_of(status),
                updated_at_micros: micros,
                published_micros: last,
            });
        }
        Some(Known::new(status_of(head), last))
    }
}

fn status_of(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The `updated_at` to publish a changed row with. Dashboards order an
/// order's versions by `updated_at` and never show an older one after a
/// newer one. A schema whose trigger stamps plain `now()` (the writing
/// transaction's start) can leave an older stamp on a newer state; such a
/// change is published stamped 1 µs after the newest version published, so
/// it is delivered rather than dropped as stale. (The shipped migration
/// makes stamps strictly increase, so this never happens on it.)
pub fn published_micros(known: Option<&Known>, row_micros: i64) -> i64 {
    match known {
        Some(k) if k.published_micros >= row_micros => k.published_micros + 1,
        _ => row_micros,
    }
}

/// One event to publish: the kind, the status before, and the index of the
/// order in the rows given to [`diff`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: EventKind,
    pub previous_status: Option<String>,
    pub row: usize,
}

/// Classify every row against `known`.
///
/// - same version as known → nothing (re-read inside the overlap window);
///   any other `updated_at`, earlier ones included, is a new version: the
///   trigger stamps `now()`, the writing transaction's start, so a
///   transaction that began before another one but updated the row after it
///   committed leaves an *older* timestamp on a *newer* state. The poller
///   reads successive snapshots, so what it reads is never older than what
///   it knew;
/// - never seen, created inside this poll's window → `order_created` (also
///   when it changed again before this poll saw it: one event, latest state);
///   a NULL `created_at` counts as created at its `updated_at`;
/// - never seen, created before the window → `order_updated` (a closed order
///   the poller no longer remembers, or one that existed before the first
///   start; its old status is unknown);
/// - known, status differs → `order_status_changed` with `previous_status`
///   (`order_updated` when the known status was NULL: there is none to name);
/// - known, anything else differs → `order_updated`.
pub fn diff(
    known: &HashMap<Uuid, Known>,
    rows: &[Order],
    window_start: DateTime<Utc>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (row, order) in rows.iter().enumerate() {
        let micros = order.updated_at.timestamp_micros();
        let change = match known.get(&order.id) {
            Some(k) if micros == k.updated_at_micros => None,
            Some(k) if k.status != order.order_status => match &k.status {
                Some(previous) => Some((EventKind::OrderStatusChanged, Some(previous.clone()))),
                None => Some((EventKind::OrderUpdated, None)),
            },
            Some(_) => Some((EventKind::OrderUpdated, None)),
            None if order.created_at.unwrap_or(order.updated_at) >= window_start => {
                Some((EventKind::OrderCreated, None))
            }
            None => Some((EventKind::OrderUpdated, None)),
        };
        if let Some((kind, previous_status)) = change {
            changes.push(Change {
                kind,
                previous_status,
                row,
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    fn order(id: Uuid, status: &str, created: i64, updated: i64) -> Order {
        Order {
            id,
            order_number: None,
            restaurant_id: Uuid::nil(),
            table_number: Some(3),
            customer_name: None,
            customer_phone: None,
            order_status: Some(status.into()),
            payment_status: Some("pending".into()),
            payment_method: None,
            total_price: Some(12.5),
            estimated_time: None,
            created_at: Some(t(created)),
            updated_at: t(updated),
            items: vec![],
        }
    }

    fn known(status: &str, updated: i64) -> Known {
        Known::new(Some(status.into()), t(updated).timestamp_micros())
    }

    #[test]
    fn first_sight_inside_the_window_is_created_even_if_changed_since() {
        let id = Uuid::new_v4();
        let rows = [order(id, "confirmed", 100, 101)];
        let out = diff(&HashMap::new(), &rows, t(99));
        assert_eq!(
            out,
            vec![Change {
                kind: EventKind::OrderCreated,
                previous_status: None,
                row: 0
            }]
        );
    }

    #[test]
    fn first_sight_of_an_older_order_is_an_update() {
        let rows = [order(Uuid::new_v4(), "ready", 10, 100)];
        let out = diff(&HashMap::new(), &rows, t(99));
        assert_eq!(out[0].kind, EventKind::OrderUpdated);
    }

    #[test]
    fn status_change_carries_the_previous_status() {
        let id = Uuid::new_v4();
        let k = HashMap::from([(id, known("pending", 100))]);
        let out = diff(&k, &[order(id, "preparing", 100, 105)], t(99));
        assert_eq!(
            out,
            vec![Change {
                kind: EventKind::OrderStatusChanged,
                previous_status: Some("pending".into()),
                row: 0
            }]
        );
    }

    #[test]
    fn other_changes_are_updates_and_rereads_are_nothing() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let k = HashMap::from([(a, known("pending", 100)), (b, known("pending", 100))]);
        let rows = [order(a, "pending", 90, 106), order(b, "pending", 90, 100)];
        let out = diff(&k, &rows, t(99));
        assert_eq!(
            out,
            vec![Change {
                kind: EventKind::OrderUpdated,
                previous_status: None,
                row: 0
            }]
        );
    }

    #[test]
    fn an_earlier_timestamp_than_known_is_still_a_change() {
        // T1 begins at 100, T2 begins at 105, sets "ready" and commits; T1
        // then marks the order paid and commits: the row now carries 100.
        let id = Uuid::new_v4();
        let k = HashMap::from([(id, known("ready", 105))]);
        let mut paid = order(id, "ready", 90, 100);
        paid.payment_status = Some("paid".into());
        assert_eq!(
            diff(&k, &[paid], t(99)),
            vec![Change {
                kind: EventKind::OrderUpdated,
                previous_status: None,
                row: 0
            }]
        );
    }

    #[test]
    fn known_round_trips_through_its_encoding() {
        let k = known("preparing", 42);
        assert_eq!(Known::decode(&k.encode()), Some(k));
        let null = Known::new(None, 7);
        assert_eq!(Known::decode(&null.encode()), Some(null));
        let restamped = Known {
            published_micros: 9,
            ..Known::new(None, 7)
        };
        assert_eq!(Known::decode(&restamped.encode()), Some(restamped));
        assert_eq!(Known::decode("garbage"), None);
    }

    #[test]
    fn nulls_classify_without_guessing() {
        let id = Uuid::new_v4();
        // Unknown creation time: a first sight inside the window is new.
        let mut o = order(id, "pending", 0, 100);
        o.created_at = None;
        assert_eq!(
            diff(&HashMap::new(), &[o], t(99))[0].kind,
            EventKind::OrderCreated
        );
        // A status out of NULL has no previous status to name.
        let k = HashMap::from([(id, Known::new(None, t(100).timestamp_micros()))]);
        assert_eq!(
            diff(&k, &[order(id, "pending", 90, 101)], t(99))[0].kind,
            EventKind::OrderUpdated
        );
        // Into NULL: a status change whose previous status is known.
        let k = HashMap::from([(id, known("ready", 100))]);
        let mut o = order(id, "ready", 90, 101);
        o.order_status = None;
        assert_eq!(
            diff(&k, &[o], t(99))[0].previous_status.as_deref(),
            Some("ready")
        );
    }
}
