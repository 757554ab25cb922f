//! A dashboard that behaves like clients/js/orders-live.js — resume with
//! `last_event_id`, reset on `resync_required` + `snapshot`, reconnect with
//! jittered backoff to any replica, abandon a silent socket — and records
//! everything the server sent, so the end-of-run check can judge it.
//!
//! Continuity is tracked in *segments*: a segment starts at a snapshot
//! (whose `last_event_id` says "everything up to here is in it") and goes on
//! through every `resumed: true` reconnect; it ends at `resync_required` or
//! at a connection that was not resumed. Inside a segment the dashboard
//! claims it saw every event of its restaurant after the segment's start.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Clock, parse_micros};

/// An order as the dashboard shows it (what convergence compares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    pub status: String,
    pub version: i64,
    /// (item id, quantity), sorted.
    pub items: Vec<(Uuid, i64)>,
}

impl Shown {
    fn from_order(o: &Value) -> Option<(Uuid, Shown)> {
        let id = Uuid::parse_str(o["id"].as_str()?).ok()?;
        let version = parse_micros(o["updated_at"].as_str()?)?;
        let mut items: Vec<(Uuid, i64)> = o["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| {
                        Some((
                            Uuid::parse_str(i["id"].as_str()?).ok()?,
                            i["quantity"].as_i64()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        items.sort();
        Some((
            id,
            Shown {
                status: o["order_status"].as_str().unwrap_or_default().to_string(),
                version,
                items,
            },
        ))
    }
}

pub fn is_closed(status: &str) -> bool {
    status == "completed" || status == "cancelled"
}

/// One order event as received.
#[derive(Clone, Debug)]
pub struct Receipt {
    pub t: f64,
    pub event_id: String,
    pub kind: String,
    pub order: Uuid,
    pub version: Option<i64>,
    pub status: Option<String>,
    pub conn: u32,
}

#[derive(Debug)]
pub struct Segment {
    /// The snapshot's `last_event_id` (or the cursor a resume started from).
    pub start: Option<String>,
    pub started_t: f64,
    pub how: &'static str,
    /// Highest event id received in this segment (the claim's upper end).
    pub max_id: Option<String>,
    pub received: Vec<Receipt>,
    pub ids: HashSet<String>,
    /// Newest version seen per order in this segment (snapshot included).
    pub versions: HashMap<Uuid, i64>,
    /// The versions its snapshot showed: an event of a version the snapshot
    /// already had is legitimately skipped (the snapshot seam).
    pub snapshot: HashMap<Uuid, i64>,
    /// The socket the snapshot came on.
    pub snapshot_conn: u32,
}

/// One socket's life.
#[derive(Clone, Debug)]
pub struct Conn {
    pub n: u32,
    pub t: f64,
    pub slot: usize,
    pub instance: String,
    pub sent_cursor: Option<String>,
    pub resumed: Option<bool>,
    pub end_t: Option<f64>,
    pub end: String,
}

#[derive(Clone, Debug)]
pub enum Breach {
    /// The same version (or the same event id) twice in one segment.
    Dup,
    /// A version the segment's snapshot showed, again after a resume on
    /// another socket: that replica cannot know the snapshot (the contract
    /// leaves it to the client, which drops an equal version). Reported,
    /// not counted.
    Reseen,
    /// An older version after a newer one, or event ids out of order.
    Disorder,
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub kind: Breach,
    pub t: f64,
    /// The event and what is wrong with it (the same for every dashboard).
    pub what: String,
    /// This dashboard's side: the segment it was in.
    pub context: String,
    pub conn: u32,
}

#[derive(Default)]
pub struct Stats {
    pub deliveries: u64,
    pub snapshots: u64,
    pub resyncs: u64,
    pub resumes: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub dead_sockets: u64,
    pub close_codes: HashMap<String, u64>,
}

pub struct DashState {
    pub name: String,
    pub restaurant: usize,
    pub segments: Vec<Segment>,
    /// Index into `segments` of the segment in progress, if any.
    pub current: Option<usize>,
    pub conns: Vec<Conn>,
    pub view: HashMap<Uuid, Shown>,
    /// Versions of orders removed from the view (closed or deleted), so a
    /// late stale event does not bring them back, as the JS client does.
    removed: HashMap<Uuid, i64>,
    pub cursor: Option<String>,
    pub violations: Vec<Violation>,
    pub stats: Stats,
    /// Why it gave up (4400/4403), like the JS client's 'offline'.
    pub offline: Option<String>,
    /// A snapshot has been applied at least once and no reset is pending.
    pub live: bool,
}

impl DashState {
    pub fn new(name: String, restaurant: usize) -> DashState {
        DashState {
            name,
            restaurant,
            segments: Vec::new(),
            current: None,
            conns: Vec::new(),
            view: HashMap::new(),
            removed: HashMap::new(),
            cursor: None,
            violations: Vec::new(),
            stats: Stats::default(),
            offline: None,
            live: false,
        }
    }

    fn conn_no(&self) -> u32 {
        self.conns.last().map(|c| c.n).unwrap_or(0)
    }

    fn handle(&mut self, now: f64, msg: &Value) {
        let kind = msg["type"].as_str().unwrap_or_default();
        match kind {
            "connection_established" => {
                let resumed = msg["resumed"].as_bool().unwrap_or(false);
                let instance = msg["instance_id"].as_str().unwrap_or_default().to_string();
                let sent = self.conns.last().and_then(|c| c.sent_cursor.clone());
                if let Some(c) = self.conns.last_mut() {
                    c.resumed = Some(resumed);
                    c.instance = instance;
                }
                if resumed {
                    self.stats.resumes += 1;
                    if self.current.is_none() {
                        // A cursor from events applied while a reset was
                        // pending: the server vouches for everything after it.
                        self.open_segment(now, sent, "resume without snapshot");
                    }
                } else {
                    // Not resumed: the old cursor must not filter new ids.
                    if sent.is_some() {
                        self.cursor = None;
                    }
                    self.current = None;
                    self.live = false;
                }
            }
            "snapshot" => {
                self.stats.snapshots += 1;
                let start = msg["last_event_id"].as_str().map(str::to_string);
                let how = if self.segments.is_empty() {
                    "first snapshot"
                } else {
                    "snapshot"
                };
                self.open_segment(now, start.clone(), how);
                self.view.clear();
                self.removed.clear();
                let mut versions = HashMap::new();
                for o in msg["orders"].as_array().into_iter().flatten() {
                    if let Some((id, shown)) = Shown::from_order(o) {
                        versions.insert(id, shown.version);
                        if !is_closed(&shown.status) {
                            self.view.insert(id, shown);
                        }
                    }
                }
                if let Some(i) = self.current {
                    self.segments[i].snapshot = versions.clone();
                    self.segments[i].versions = versions;
                }
                self.cursor = start;
                self.live = true;
            }
            "resync_required" => {
                self.stats.resyncs += 1;
                self.cursor = None;
                self.current = None;
                self.live = false;
            }
            "order_created" | "order_status_changed" | "order_updated" | "order_deleted" => {
                self.on_event(now, kind, msg);
            }
            _ => {}
        }
    }

    fn open_segment(&mut self, now: f64, start: Option<String>, how: &'static str) {
        self.segments.push(Segment {
            start: start.clone(),
            started_t: now,
            how,
            max_id: start,
            received: Vec::new(),
            ids: HashSet::new(),
            versions: HashMap::new(),
            snapshot: HashMap::new(),
            snapshot_conn: self.conn_no(),
        });
        self.current = Some(self.segments.len() - 1);
    }

    fn on_event(&mut self, now: f64, kind: &str, msg: &Value) {
        self.stats.deliveries += 1;
        let order = &msg["order"];
        let Some(id) = order["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()) else {
            return;
        };
        let version = order["updated_at"].as_str().and_then(parse_micros);
        let event_id = msg["event_id"].as_str().map(str::to_string);
        let conn = self.conn_no();
        let receipt = Receipt {
            t: now,
            event_id: event_id.clone().unwrap_or_default(),
            kind: kind.to_string(),
            order: id,
            version,
            status: order["order_status"].as_str().map(str::to_string),
            conn,
        };

        // --- the server's promises, judged on the raw stream
        if let Some(i) = self.current {
            let seg = &mut self.segments[i];
            let mut breach: Option<(Breach, String)> = None;
            if let (Some(v), Some(&held)) = (version, seg.versions.get(&id)) {
                if v == held {
                    let before = seg
                        .received
                        .iter()
                        .rev()
                        .find(|r| r.order == id && r.version == Some(v))
                        .map(|r| format!("event {} {} at t={:.1}s", r.event_id, r.kind, r.t));
                    let kind_b = if before.is_none()
                        && seg.snapshot.get(&id) == Some(&v)
                        && seg.snapshot_conn != conn
                    {
                        Breach::Reseen
                    } else {
                        Breach::Dup
                    };
                    breach = Some((
                        kind_b,
                        format!(
                            "version {} again (first: {})",
                            fmt_micros(v),
                            before.unwrap_or_else(|| format!(
                                "the segment's snapshot, on socket #{}",
                                seg.snapshot_conn
                            ))
                        ),
                    ));
                } else if v < held {
                    breach = Some((
                        Breach::Disorder,
                        format!("version {} after newer {}", fmt_micros(v), fmt_micros(held)),
                    ));
                }
            }
            if let Some(eid) = &event_id {
                if seg.ids.contains(eid) {
                    breach.get_or_insert((Breach::Dup, "event id again".into()));
                } else if seg.max_id.as_ref().is_some_and(|m| eid <= m) {
                    breach.get_or_insert((
                        Breach::Disorder,
                        format!(
                            "event id not after {} (segment max)",
                            seg.max_id.clone().unwrap_or_default()
                        ),
                    ));
                }
            }
            if let Some((kind_b, why)) = breach {
                self.violations.push(Violation {
                    kind: kind_b,
                    t: now,
                    what: format!(
                        "{kind} {} order {id} status {} v={}: {why}",
                        receipt.event_id,
                        receipt.status.as_deref().unwrap_or("-"),
                        version.map(fmt_micros).unwrap_or_else(|| "-".into()),
                    ),
                    context: format!("segment since t={:.1}s ({})", seg.started_t, seg.how),
                    conn,
                });
            }
            if let Some(v) = version {
                let e = seg.versions.entry(id).or_insert(v);
                *e = (*e).max(v);
            }
            if let Some(eid) = &event_id {
                seg.ids.insert(eid.clone());
                if seg.max_id.as_ref().is_none_or(|m| eid > m) {
                    seg.max_id = Some(eid.clone());
                }
            }
            seg.received.push(receipt);
        }

        // --- what the JS client does with it
        if let Some(eid) = &event_id {
            if self.cursor.as_ref().is_some_and(|c| eid <= c) {
                return;
            }
            self.cursor = Some(eid.clone());
        }
        if kind == "order_deleted" {
            if self.view.remove(&id).is_some() {
                self.removed.insert(id, i64::MAX);
            }
            return;
        }
        let Some((_, shown)) = Shown::from_order(order) else {
            return;
        };
        let held = self
            .view
            .get(&id)
            .map(|s| s.version)
            .or_else(|| self.removed.get(&id).copied());
        if held.is_some_and(|h| shown.version <= h) {
            return;
        }
        if is_closed(&shown.status) {
            self.view.remove(&id);
            self.removed.insert(id, shown.version);
        } else {
            self.removed.remove(&id);
            self.view.insert(id, shown);
        }
    }
}

pub fn fmt_micros(m: i64) -> String {
    chrono::DateTime::from_timestamp_micros(m)
        .map(|t| t.format("%H:%M:%S%.6f").to_string())
        .unwrap_or_else(|| m.to_string())
}

/// What a dashboard task needs.
pub struct DashCtx {
    pub clock: Clock,
    pub replicas: Vec<std::net::SocketAddr>,
    pub stop: CancellationToken,
    pub seed: u64,
}

/// Run one dashboard until `stop`. `away` holds "stay disconnected until
/// t = x seconds" for its restaurant (a fault).
pub async fn run(
    idx: usize,
    state: Arc<Mutex<DashState>>,
    token: String,
    ctx: Arc<DashCtx>,
    mut away: watch::Receiver<f64>,
) {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ (0x5DEE_CE66 * (idx as u64 + 1)));
    let mut attempt: u32 = 0;
    loop {
        if ctx.stop.is_cancelled() {
            return;
        }
        let away_until = *away.borrow_and_update();
        let now = ctx.clock.t();
        if away_until > now {
            tokio::select! {
                _ = ctx.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs_f64(away_until - now)) => {}
            }
            continue;
        }
        if lock(&state).offline.is_some() {
            ctx.stop.cancelled().await;
            return;
        }
        let slot = rng.random_range(0..ctx.replicas.len());
        let cursor = lock(&state).cursor.clone();
        let mut url = format!(
            "ws://{}/api/ws/orders/live?token={token}",
            ctx.replicas[slot]
        );
        if let Some(c) = &cursor {
            url.push_str(&format!("&last_event_id={c}"));
        }
        let n = {
            let mut s = lock(&state);
            let n = s.conn_no() + 1;
            s.conns.push(Conn {
                n,
                t: ctx.clock.t(),
                slot,
                instance: String::new(),
                sent_cursor: cursor,
                resumed: None,
                end_t: None,
                end: String::new(),
            });
            s.stats.connects += 1;
            n
        };
        let started = ctx.clock.t();
        let end = match tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        {
            Ok(Ok((ws, _))) => session(ws, &state, &ctx, &mut away).await,
            Ok(Err(e)) => {
                lock(&state).stats.connect_failures += 1;
                format!("connect failed: {e}")
            }
            Err(_) => {
                lock(&state).stats.connect_failures += 1;
                "connect timed out".into()
            }
        };
        {
            let mut s = lock(&state);
            let key = end.split(':').next().unwrap_or_default().to_string();
            *s.stats.close_codes.entry(key).or_default() += 1;
            if end.starts_with("close 4400") || end.starts_with("close 4403") {
                s.offline = Some(end.clone());
            }
            if let Some(c) = s.conns.iter_mut().rev().find(|c| c.n == n) {
                c.end_t = Some(ctx.clock.t());
                c.end = end;
            }
        }
        if ctx.clock.t() - started > 5.0 {
            attempt = 0;
        }
        let cap = (200u64 << attempt.min(5)).min(3000);
        attempt += 1;
        let delay = rng.random_range(0..cap.max(1));
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One socket until it ends; returns how it ended.
async fn session(
    ws: Socket,
    state: &Arc<Mutex<DashState>>,
    ctx: &DashCtx,
    away: &mut watch::Receiver<f64>,
) -> String {
    let (mut sink, mut stream) = ws.split();
    let mut ping = tokio::time::interval(Duration::from_secs(2));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ctx.stop.cancelled() => return "stopped".into(),
            changed = away.changed() => {
                if changed.is_ok() && *away.borrow_and_update() > ctx.clock.t() {
                    let _ = sink.send(Message::Close(None)).await;
                    return "away".into();
                }
            }
            _ = ping.tick() => {
                match waiting_since {
                    Some(since) if since.elapsed() > Duration::from_millis(3500) => {
                        lock(state).stats.dead_sockets += 1;
                        return "dead: no frame 3.5 s after a ping".into();
                    }
                    Some(_) => {}
                    None => {
                        let sent = tokio::time::timeout(
                            Duration::from_secs(1),
                            sink.send(Message::Text(r#"{"type":"ping"}"#.into())),
                        ).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            return "ping send failed".into();
                        }
                        waiting_since = Some(tokio::time::Instant::now());
                    }
                }
            }
            msg = stream.next() => {
                waiting_since = None;
                match msg {
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                            lock(state).handle(ctx.clock.t(), &v);
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        return match f {
                            Some(f) => format!("close {}: {}", u16::from(f.code), f.reason),
                            None => "close 1005".into(),
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return format!("error: {e}"),
                    None => return "ended".into(),
                }
            }
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
