//! One dashboard socket: catch-up (resume or snapshot), then one task
//! running one `select!` over the socket, its event queue, its heartbeat,
//! its token's expiry and shutdown. Close codes are [`CloseReason`]s.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WireFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::access::{Access, AccessError};
use crate::broker::{BrokerError, ConnectionRecord, History};
use crate::domain::{EventId, Frame, RestaurantId, format_timestamp};
use crate::hub::{JoinError, Member};
use crate::node::{Node, NodeError};
use crate::snapshots::{Snapshot, SnapshotError, Snapshots};

/// One dashboard's WebSocket (server side of an upgraded HTTP/1.1 connection).
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Why a socket is closed; the code is part of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    TooSlow,
    TooMany(String),
    Unavailable(String),
    ShuttingDown,
    TooBig,
    HeartbeatTimeout,
}

impl CloseReason {
    pub fn code(&self) -> u16 {
        match self {
            CloseReason::BadRequest(_) => 4400,
            CloseReason::Unauthorized(_) => 4401,
            CloseReason::Forbidden(_) => 4403,
            CloseReason::TooSlow => 4408,
            CloseReason::TooMany(_) => 4429,
            CloseReason::Unavailable(_) => 1013,
            CloseReason::ShuttingDown | CloseReason::HeartbeatTimeout => 1001,
            CloseReason::TooBig => 1009,
        }
    }

    pub fn text(&self) -> String {
        match self {
            CloseReason::BadRequest(s)
            | CloseReason::Unauthorized(s)
            | CloseReason::Forbidden(s)
            | CloseReason::TooMany(s)
            | CloseReason::Unavailable(s) => s.clone(),
            CloseReason::TooSlow => "client too slow: send queue overflowed".into(),
            CloseReason::ShuttingDown => "server shutting down, reconnect".into(),
            CloseReason::TooBig => "frame larger than 64 KiB".into(),
            CloseReason::HeartbeatTimeout => "no pong from client".into(),
        }
    }
}

impl From<AccessError> for CloseReason {
    fn from(e: AccessError) -> CloseReason {
        match e {
            AccessError::Auth(e) => CloseReason::Unauthorized(e.to_string()),
            AccessError::BadRequest(m) => CloseReason::BadRequest(m),
            AccessError::Forbidden(m) | AccessError::Mismatch(m) => CloseReason::Forbidden(m),
            AccessError::Unavailable(m) => CloseReason::Unavailable(m),
        }
    }
}

/// Everything sessions share, built once by the app.
pub struct SessionContext {
    pub node: Node,
    /// Admission rules, also for token refresh on an open socket.
    pub access: Access,
    /// Sockets admitted through `restaurant_members`, re-checked together.
    pub members: MembershipWatch,
    /// How often [`watch_memberships`] re-checks them: the bound on how long
    /// a removed member keeps an open socket.
    pub membership_recheck: Duration,
    /// Shared snapshot reads (see `crate::snapshots`); None without a source.
    pub snapshots: Option<Snapshots>,
    pub heartbeat_interval: Duration,
    pub send_queue_capacity: usize,
    /// Bytes per second a message must at least leave at (beyond
    /// [`SEND_TIMEOUT`]): see [`Pace`].
    pub min_send_rate: u64,
    pub client_message_rate: NonZeroU32,
    pub shutdown: CancellationToken,
    /// Bounds how many sockets send their 1001 close at once on shutdown.
    pub closing: Semaphore,
}

/// Who connected, for which restaurant, resuming from where.
#[derive(Debug, Clone)]
pub struct Admission {
    pub user_id: String,
    pub restaurant: RestaurantId,
    pub expires_at: i64,
    /// The restaurant came from `restaurant_members`, not a token claim.
    pub via_membership: bool,
    pub last_event_id: Option<EventId>,
}

/// Open sockets whose restaurant came from `restaurant_members`, by
/// (user, restaurant): one query re-checks them all, and a removed
/// membership cancels the sockets' tokens (closed with 4403).
#[derive(Default)]
pub struct MembershipWatch {
    /// A std Mutex: touched when such a socket opens or closes and once per
    /// re-check, never held across an await.
    sockets: Mutex<HashMap<(Uuid, RestaurantId), HashMap<Uuid, CancellationToken>>>,
}

impl MembershipWatch {
    fn add(&self, user: Uuid, r: RestaurantId, connection_id: Uuid) -> CancellationToken {
        let token = CancellationToken::new();
        lock(&self.sockets)
            .entry((user, r))
            .or_default()
            .insert(connection_id, token.clone());
        token
    }

    fn remove(&self, user: Uuid, r: RestaurantId, connection_id: Uuid) {
        let mut sockets = lock(&self.sockets);
        if let Some(conns) = sockets.get_mut(&(user, r)) {
            conns.remove(&connection_id);
            if conns.is_empty() {
                sockets.remove(&(user, r));
            }
        }
    }

    /// Cancel the sockets of every pair that was `checked` but is not
    /// `present`; returns how many. Pairs that joined after the check was
    /// taken are left for the next one.
    fn revoke_missing(
        &self,
        checked: &[(Uuid, RestaurantId)],
        present: &HashSet<(Uuid, RestaurantId)>,
    ) -> usize {
        let mut sockets = lock(&self.sockets);
        let mut revoked = 0;
        for pair in checked.iter().filter(|p| !present.contains(p)) {
            if let Some(conns) = sockets.remove(pair) {
                for token in conns.values() {
                    token.cancel();
                }
                revoked += conns.len();
            }
        }
        revoked
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every `ctx.membership_recheck`, look up all (user, restaurant) pairs of
/// the open membership sockets in one batched query and close those whose
/// membership is gone. A failed lookup keeps the sockets (a database outage
/// must not drop every dashboard) and is retried next period.
pub async fn watch_memberships(ctx: Arc<SessionContext>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.membership_recheck);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let pairs: Vec<(Uuid, RestaurantId)> = lock(&ctx.members.sockets).keys().copied().collect();
        if pairs.is_empty() {
            continue;
        }
        match ctx.access.still_members(&pairs).await {
            Ok(present) => {
                let revoked = ctx.members.revoke_missing(&pairs, &present);
                if revoked > 0 {
                    tracing::info!(revoked, "membership removed: closing sockets");
                    metrics::counter!("orders_gateway_membership_revocations_total")
                        .increment(revoked as u64);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "membership re-check failed; will retry");
                metrics::counter!("orders_gateway_membership_recheck_failures_total").increment(1);
            }
        }
    }
}

/// How long a close frame may take to leave before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// A slow client's close frame waits behind what it has not read yet; give
/// it time to get there (memory stays bounded by the socket buffers).
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Every message leaves in WebSocket frames of at most this many bytes.
/// tungstenite copies each frame into the socket's write buffer, and that
/// buffer keeps its largest size for the socket's life: sent whole, a 5 MB
/// snapshot cost 5 MB per socket while a non-reading client held it, and
/// again forever after. In fragments, a socket holds at most one (plus the
/// kernel's socket buffer), and shrinks back to it after any burst. Clients
/// reassemble fragments into one message (RFC 6455 5.4); browsers do it
/// unseen. 8 KiB: ~640 writes for a 5 MB snapshot, and still room for a
/// typical event (~1 KiB) in one frame.
pub const FRAGMENT: usize = 8 * 1024;
/// A send (one fragment) that makes no progress for this long means the
/// client does not read: 4408.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a socket waits for its share of a snapshot read before 1013.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(30);

pub async fn close(socket: &mut Socket, reason: &CloseReason) {
    metrics::counter!("orders_gateway_connections_closed_total", "code" => reason.code().to_string())
        .increment(1);
    let frame = CloseFrame {
        code: CloseCode::from(reason.code()),
        reason: reason.text().into(),
    };
    let limit = if *reason == CloseReason::TooSlow {
        SLOW_CLOSE_TIMEOUT
    } else {
        CLOSE_TIMEOUT
    };
    if tokio::time::timeout(limit, socket.send(Message::Close(Some(frame))))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        // Wait for the peer's close reply: dropping the TCP connection while
        // it is still sending would answer with a reset, and a reset makes
        // the peer's kernel discard our close frame unread.
        let drain = async { while let Some(Ok(_)) = socket.next().await {} };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
    }
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    token: Option<String>,
}

/// Drops events the client already has: those at or before its cursor, and
/// those whose order version (or a newer one) a snapshot already showed.
/// The node drops versions already dispatched on the live stream.
struct Seam {
    cursor: Option<EventId>,
    /// Shared by every socket that got the same snapshot read; kept for the
    /// socket's life (no window), so a lagging poller cannot repeat them.
    snapshot: Arc<HashMap<Uuid, i64>>,
}

impl Seam {
    fn admits(&mut self, frame: &Frame) -> bool {
        if let (Some(id), Some(cursor)) = (frame.event_id, self.cursor)
            && id <= cursor
        {
            return false;
        }
        if let Some(v) = frame.version
            && self
                .snapshot
                .get(&v.order_id)
                .is_some_and(|seen| *seen >= v.updated_at_micros)
        {
            return false;
        }
        if let Some(id) = frame.event_id {
            self.cursor = Some(id);
        }
        true
    }
}

struct Session<'a> {
    ctx: &'a SessionContext,
    socket: Socket,
    admission: Admission,
    connection_id: Uuid,
    seam: Seam,
    /// Cancelled by the hub when this socket's queue overflows: 4408.
    overflowed: CancellationToken,
    /// Cancelled when the membership that admitted this socket is removed.
    revoked: Option<CancellationToken>,
    /// Set while a resume's replay is sent: its events are paced as one.
    pace: Option<Pace>,
}

/// The time a client has to read what it is sent. A deadline per fragment
/// alone ([`SEND_TIMEOUT`]) lets a client that reads one fragment every
/// few seconds hold a socket in a 5 MB snapshot for hours, outside the
/// main loop; a floor on the rate bounds the whole: N bytes must be read
/// within `SEND_TIMEOUT + N / min_send_rate` of the first.
struct Pace {
    start: Instant,
    bytes: u64,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Adds `len` bytes to what must leave; the deadline for all of them.
    fn add(&mut self, len: usize, min_rate: u64) -> Instant {
        self.bytes += len as u64;
        self.start + SEND_TIMEOUT + Duration::from_secs_f64(self.bytes as f64 / min_rate as f64)
    }
}

enum Step {
    Continue,
    Close(CloseReason),
    Gone,
}

pub async fn run(ctx: Arc<SessionContext>, socket: Socket, admission: Admission) {
    let connection_id = Uuid::new_v4();
    let r = admission.restaurant;
    // The caller's span has the restaurant and instance; add the connection.
    tracing::Span::current().record("connection_id", tracing::field::display(connection_id));
    let (queue_tx, queue_rx) = mpsc::channel(ctx.send_queue_capacity);
    let overflowed = CancellationToken::new();
    let member = Member {
        connection_id,
        queue: queue_tx,
        overflowed: overflowed.clone(),
    };
    let record = ConnectionRecord {
        connection_id,
        instance_id: ctx.node.instance_id().to_string(),
        user_id: admission.user_id.clone(),
        restaurant_id: r,
        connected_at: Utc::now(),
    };
    let mut session = Session {
        ctx: &ctx,
        socket,
        admission,
        connection_id,
        seam: Seam {
            cursor: None,
            snapshot: Arc::default(),
        },
        overflowed: overflowed.clone(),
        revoked: None,
        pace: None,
    };
    if let Err(e) = ctx.node.join(record, member).await {
        let reason = match e {
            NodeError::Full(JoinError::ReplicaFull) => {
                CloseReason::TooMany("connection limit of this server reached".into())
            }
            NodeError::Full(JoinError::RestaurantFull) => {
                CloseReason::TooMany("connection limit of this restaurant reached".into())
            }
            NodeError::Broker(e) => {
                tracing::warn!(error = %e, "cannot subscribe");
                CloseReason::Unavailable("real-time service unavailable, retry".into())
            }
        };
        metrics::counter!("orders_gateway_connections_rejected_total", "code" => reason.code().to_string())
            .increment(1);
        close(&mut session.socket, &reason).await;
        return;
    }
    metrics::counter!("orders_gateway_connections_opened_total").increment(1);
    tracing::debug!("connected");
    let watched = session.watch();
    let reason = session.serve(queue_rx, overflowed).await;
    session.unwatch(watched);
    match &reason {
        Some(CloseReason::ShuttingDown) => {
            tracing::debug!(code = 1001, "closing");
            // Bounded concurrency: thousands of closes do not stampede.
            // Counted until closed: the drain waits for these.
            let _permit = ctx.closing.acquire().await;
            close(&mut session.socket, &CloseReason::ShuttingDown).await;
            ctx.node.leave(r, connection_id).await;
        }
        Some(reason) => {
            tracing::debug!(code = reason.code(), "closing");
            // Out of the hub first: a client that does not read may keep
            // its close frame waiting for seconds, and is not a dashboard
            // any more (no events queued for it, not counted).
            ctx.node.leave(r, connection_id).await;
            close(&mut session.socket, reason).await;
        }
        None => {
            metrics::counter!("orders_gateway_connections_closed_total", "code" => "client")
                .increment(1);
            ctx.node.leave(r, connection_id).await;
        }
    }
}

impl Session<'_> {
    /// Register with the membership re-check when admitted through
    /// `restaurant_members`; returns the user registered.
    fn watch(&mut self) -> Option<Uuid> {
        if !self.admission.via_membership {
            return None;
        }
        let user = Uuid::parse_str(&self.admission.user_id).ok()?;
        self.revoked = Some(self.ctx.members.add(
            user,
            self.admission.restaurant,
            self.connection_id,
        ));
        Some(user)
    }

    fn unwatch(&mut self, watched: Option<Uuid>) {
        if let Some(user) = watched {
            self.ctx
                .members
                .remove(user, self.admission.restaurant, self.connection_id);
        }
    }

    /// Send one text message (UTF-8 JSON), in fragments of at most
    /// [`FRAGMENT`] bytes, each with a deadline. `Err` is how the socket ends.
    async fn send_text(&mut self, text: Bytes) -> Result<(), Step> {
        let rate = self.ctx.min_send_rate;
        // A lone one-fragment message's floor lies beyond SEND_TIMEOUT
        // anyway: events on the hot path pay for no clock read here.
        let deadline = match &mut self.pace {
            Some(pace) => Some(pace.add(text.len(), rate)),
            None if text.len() <= FRAGMENT => None,
            None => Some(Pace::new().add(text.len(), rate)),
        };
        if text.len() <= FRAGMENT {
            let frame = WireFrame::message(text, OpCode::Data(Data::Text), true);
            return self.send(Message::Frame(frame), deadline).await;
        }
        let mut start = 0;
        while start < text.len() {
            let end = (start + FRAGMENT).min(text.len());
            // A fragment may split a UTF-8 sequence: allowed, only the
            // whole message must be valid (RFC 6455 5.6).
            let op = if start == 0 {
                Data::Text
            } else {
                Data::Continue
            };
            let frame =
                WireFrame::message(text.slice(start..end), OpCode::Data(op), end == text.len());
            self.send(Message::Frame(frame), deadline).await?;
            start = end;
        }
        Ok(())
    }

    async fn send_json(&mut self, value: serde_json::Value) -> Result<(), Step> {
        self.send_text(Bytes::from(value.to_string())).await
    }

    /// One send, bounded: it ends the socket when it makes no progress for
    /// [`SEND_TIMEOUT`], or at `deadline` (its message's [`Pace`], if any), with
    /// 4408; while it waits the session still obeys everything its main
    /// loop does (see [`interruption`]). Most sends complete at
    /// once and pay for none of these timers.
    async fn send(&mut self, msg: Message, deadline: Option<Instant>) -> Result<(), Step> {
        let Session { socket, .. } = self;
        let mut send = std::pin::pin!(socket.send(msg));
        if let Poll::Ready(sent) = futures_util::poll!(send.as_mut()) {
            return sent.map_err(|_| Step::Gone);
        }
        metrics::counter!("orders_gateway_blocked_sends_total").increment(1);
        let Session {
            ctx,
            admission,
            overflowed,
            revoked,
            ..
        } = self;
        let stalled = Instant::now() + SEND_TIMEOUT;
        let give_up = deadline.map_or(stalled, |d| d.min(stalled));
        tokio::select! {
            biased;
            step = interruption(ctx, overflowed, revoked.as_ref(), admission.expires_at) => Err(step),
            _ = sleep_until(give_up) => {
                metrics::counter!("orders_gateway_send_timeouts_total").increment(1);
                Err(Step::Close(CloseReason::TooSlow))
            }
            sent = send => sent.map_err(|_| Step::Gone),
        }
    }

    /// This socket's share of a snapshot read that starts after now,
    /// waited for like a send (shutdown, overflow, expiry, a deadline).
    async fn shared_snapshot(&mut self, snapshots: &Snapshots) -> Result<Arc<Snapshot>, Step> {
        let r = self.admission.restaurant;
        let unavailable = |e: SnapshotError| {
            Step::Close(match e {
                SnapshotError::Broker(_) => {
                    CloseReason::Unavailable("real-time service unavailable, retry".into())
                }
                SnapshotError::Source(_) => {
                    CloseReason::Unavailable("snapshot unavailable, retry".into())
                }
            })
        };
        let interrupted = interruption(
            self.ctx,
            &self.overflowed,
            self.revoked.as_ref(),
            self.admission.expires_at,
        );
        tokio::select! {
            biased;
            step = interrupted => Err(step),
            _ = sleep(SNAPSHOT_WAIT) => {
                Err(Step::Close(CloseReason::Unavailable("snapshot unavailable, retry".into())))
            }
            got = snapshots.get(r) => got.map_err(unavailable),
        }
    }

    /// Catch the client up, then relay until something ends the socket.
    /// `None`: the client went away (nothing to close).
    async fn serve(
        &mut self,
        mut queue: mpsc::Receiver<Arc<Frame>>,
        overflowed: CancellationToken,
    ) -> Option<CloseReason> {
        match self.catch_up().await {
            Ok(()) => {}
            Err(Step::Close(reason)) => return Some(reason),
            Err(_) => return None,
        }
        let ctx = self.ctx;
        let limiter: DefaultDirectRateLimiter = RateLimiter::direct(
            Quota::per_second(ctx.client_message_rate).allow_burst(
                ctx.client_message_rate
                    .saturating_mul(NonZeroU32::new(2).unwrap()),
            ),
        );
        let silence_limit = ctx.heartbeat_interval.mul_f32(2.5);
        let mut last_heard = Instant::now();
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + ctx.heartbeat_interval,
            ctx.heartbeat_interval,
        );
        // Made once and polled in place: building them anew on every
        // wake-up (a timer entry, two waiter registrations) cost more CPU
        // per delivered event than the fan-out itself.
        let shutdown = ctx.shutdown.cancelled();
        tokio::pin!(shutdown);
        let cut_off = overflowed.cancelled();
        tokio::pin!(cut_off);
        // Never resolves for sockets admitted by a restaurant claim.
        let revoked = self.revoked.clone();
        let revoked = async move {
            match revoked {
                Some(t) => t.cancelled_owned().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(revoked);
        let lost = ctx.node.broker_lost().cancelled_owned();
        tokio::pin!(lost);
        let mut expires_at = self.admission.expires_at;
        let expiry = sleep_until(expiry_instant(expires_at));
        tokio::pin!(expiry);
        loop {
            if self.admission.expires_at != expires_at {
                expires_at = self.admission.expires_at;
                expiry.as_mut().reset(expiry_instant(expires_at));
            }
            let step = tokio::select! {
                biased;
                _ = &mut shutdown => Step::Close(CloseReason::ShuttingDown),
                _ = &mut cut_off => Step::Close(CloseReason::TooSlow),
                _ = &mut expiry => expired(),
                _ = &mut revoked => revoked_step(),
                _ = &mut lost => lost_step(),
                frame = queue.recv() => match frame {
                    Some(frame) => self.relay(frame).await,
                    None => Step::Close(CloseReason::TooSlow),
                },
                msg = self.socket.next() => {
                    last_heard = Instant::now();
                    // Boxed: its token check is the largest state in this
                    // loop, and every idle socket would carry it inline.
                    Box::pin(self.on_client(msg, &limiter)).await
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        Step::Close(CloseReason::HeartbeatTimeout)
                    } else {
                        match self.send(Message::Ping(Bytes::new()), None).await {
                            Ok(()) => Step::Continue,
                            Err(step) => step,
                        }
                    }
                }
            };
            match step {
                Step::Continue => {}
                Step::Close(reason) => return Some(reason),
                Step::Gone => return None,
            }
        }
    }

    /// Resume from `last_event_id`, or send a snapshot; then
    /// `connection_established` has told the client which it got.
    async fn catch_up(&mut self) -> Result<(), Step> {
        let r = self.admission.restaurant;
        let node = &self.ctx.node;
        let mut replay = None;
        let mut resync_reason = None;
        if let Some(after) = self.admission.last_event_id {
            match node.history_after(r, after).await {
                Ok(History::Events(frames)) => {
                    metrics::counter!("orders_gateway_history_replays_total", "result" => "hit")
                        .increment(1);
                    replay = Some(frames);
                    self.seam.cursor = Some(after);
                }
                Ok(History::Gone) => {
                    metrics::counter!("orders_gateway_history_replays_total", "result" => "miss")
                        .increment(1);
                    resync_reason = Some(
                        "last_event_id is older than the kept history, unknown, or its history was lost",
                    );
                }
                Err(e) => return Err(Step::Close(unavailable(e))),
            }
        }
        let resumed = replay.is_some();
        let established = json!({
            "type": "connection_established",
            "restaurant_id": r,
            "message": "Connected to real-time order updates",
            "connection_id": self.connection_id,
            "instance_id": node.instance_id(),
            "heartbeat_interval_ms": self.ctx.heartbeat_interval.as_millis() as u64,
            "resumed": resumed,
        });
        self.send_json(established).await?;
        if let Some(frames) = replay {
            return self.replay(r, frames).await;
        }
        if let Some(reason) = resync_reason {
            self.send_json(json!({ "type": "resync_required", "reason": reason }))
                .await?;
        }
        self.send_snapshot().await
    }

    /// Send a resume's missed events, paced as one message: a client that
    /// reads them slowly is held to the same floor as for a snapshot.
    async fn replay(
        &mut self,
        r: RestaurantId,
        frames: Vec<axum::extract::ws::Utf8Bytes>,
    ) -> Result<(), Step> {
        self.pace = Some(Pace::new());
        let mut sent = Ok(());
        for text in frames {
            let Ok(frame) = Frame::parse(r, text) else {
                continue;
            };
            if self.seam.admits(&frame) {
                sent = self.send_text(frame.text.into()).await;
                if sent.is_err() {
                    break;
                }
            }
        }
        self.pace = None;
        sent
    }

    /// Subscribed first (join), then read: an event committed around now is
    /// either in the snapshot or arrives after it, and the seam drops the
    /// copies of what the snapshot already shows. The read is shared with
    /// the restaurant's other sockets waiting at the same time.
    async fn send_snapshot(&mut self) -> Result<(), Step> {
        let Some(snapshots) = self.ctx.snapshots.clone() else {
            return Ok(());
        };
        let snapshot = self.shared_snapshot(&snapshots).await?;
        metrics::counter!("orders_gateway_snapshots_total").increment(1);
        self.seam.cursor = snapshot.last_event_id.max(self.seam.cursor);
        self.seam.snapshot = snapshot.versions.clone();
        let frame = snapshot.frame.clone();
        // Only the bytes are needed from here on; the rest may go.
        drop(snapshot);
        self.send_text(frame).await
    }

    async fn relay(&mut self, frame: Arc<Frame>) -> Step {
        if frame.resync {
            if let Err(step) = self.send_text(frame.text.clone().into()).await {
                return step;
            }
            self.seam.cursor = None;
            return match self.send_snapshot().await {
                Ok(()) => Step::Continue,
                Err(step) => step,
            };
        }
        if !self.seam.admits(&frame) {
            return Step::Continue;
        }
        // A client that stops reading blocks this send; the hub then fills
        // the queue and cancels `overflowed`, which `send` obeys.
        match self.send_text(frame.text.clone().into()).await {
            Ok(()) => Step::Continue,
            Err(step) => step,
        }
    }

    async fn on_client(
        &mut self,
        msg: Option<Result<Message, tungstenite::Error>>,
        limiter: &DefaultDirectRateLimiter,
    ) -> Step {
        let msg = match msg {
            None => return Step::Gone,
            Some(Err(e)) => {
                return if is_too_big(e) {
                    Step::Close(CloseReason::TooBig)
                } else {
                    Step::Gone
                };
            }
            Some(Ok(m)) => m,
        };
        let text = match msg {
            Message::Close(_) => {
                // tungstenite has queued the echo; let it leave (RFC 6455 5.5.1).
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, SinkExt::flush(&mut self.socket)).await;
                return Step::Gone;
            }
            // tungstenite answers a ping by itself, so each costs a write:
            // counted like any client message. (Our own pings' pongs come
            // once per heartbeat and fit the burst.)
            Message::Ping(_) | Message::Pong(_) => {
                return if limiter.check().is_err() {
                    self.flooded()
                } else {
                    Step::Continue
                };
            }
            Message::Frame(_) => return Step::Continue,
            Message::Text(t) => t,
            Message::Binary(_) => {
                if limiter.check().is_err() {
                    return self.flooded();
                }
                return self
                    .error_frame("unsupported", "binary frames are not supported")
                    .await;
            }
        };
        if limiter.check().is_err() {
            return self.flooded();
        }
        let Ok(m) = serde_json::from_str::<ClientMessage>(text.as_str()) else {
            return self
                .error_frame("bad_request", "expected a JSON object with a \"type\"")
                .await;
        };
        match m.kind.as_str() {
            "ping" => {
                let pong = json!({ "type": "pong", "timestamp": format_timestamp(Utc::now()) });
                match self.send_json(pong).await {
                    Ok(()) => Step::Continue,
                    Err(step) => step,
                }
            }
            "auth" => self.reauthenticate(m.token.unwrap_or_default()).await,
            other => {
                let message = format!("unknown message type {other:?}; expected ping or auth");
                self.error_frame("unknown_type", &message).await
            }
        }
    }

    fn flooded(&self) -> Step {
        metrics::counter!("orders_gateway_rate_limited_total").increment(1);
        Step::Close(CloseReason::TooMany("message rate limit exceeded".into()))
    }

    /// Replace the token. Authorized exactly like a new connection to
    /// this restaurant, for the same user ([`Access::refresh`]).
    async fn reauthenticate(&mut self, token: String) -> Step {
        let a = &self.admission;
        match self
            .ctx
            .access
            .refresh(&token, &a.user_id, a.restaurant)
            .await
        {
            Ok(grant) => {
                self.admission.expires_at = grant.identity.expires_at;
                Step::Continue
            }
            Err(AccessError::Auth(e)) => self.error_frame("auth_failed", &e.to_string()).await,
            // The same user, verified, is no longer a member: the socket's
            // admission no longer holds.
            Err(AccessError::Forbidden(m)) if self.admission.via_membership => {
                metrics::counter!("orders_gateway_membership_revocations_total").increment(1);
                Step::Close(CloseReason::Forbidden(m))
            }
            Err(AccessError::Unavailable(m)) => self.error_frame("auth_unavailable", &m).await,
            Err(
                AccessError::Mismatch(m) | AccessError::Forbidden(m) | AccessError::BadRequest(m),
            ) => self.error_frame("auth_mismatch", &m).await,
        }
    }

    async fn error_frame(&mut self, code: &str, message: &str) -> Step {
        match self
            .send_json(json!({ "type": "error", "code": code, "message": message }))
            .await
        {
            Ok(()) => Step::Continue,
            Err(step) => step,
        }
    }
}

fn unavailable(e: BrokerError) -> CloseReason {
    tracing::warn!(error = %e, "broker unavailable during catch-up");
    CloseReason::Unavailable("real-time service unavailable, retry".into())
}

fn expiry_instant(expires_at: i64) -> Instant {
    let left = expires_at - Utc::now().timestamp();
    Instant::now() + Duration::from_secs(left.clamp(0, 10 * 365 * 24 * 3600) as u64)
}

fn is_too_big(e: tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Capacity(_))
}

fn expired() -> Step {
    Step::Close(CloseReason::Unauthorized("token expired".into()))
}

fn revoked_step() -> Step {
    Step::Close(CloseReason::Forbidden(
        "no longer a member of this restaurant".into(),
    ))
}

fn lost_step() -> Step {
    Step::Close(CloseReason::Unavailable(
        "this replica lost Redis; reconnect".into(),
    ))
}

/// What ends a socket while it waits outside its main loop (a blocked
/// send, its share of a snapshot read): the main loop's own reasons, so
/// that no wait lets a socket outlive its shutdown, its queue, its token,
/// its membership or its replica's Redis link. Built only when a wait
/// actually blocks.
async fn interruption(
    ctx: &SessionContext,
    overflowed: &CancellationToken,
    revoked: Option<&CancellationToken>,
    expires_at: i64,
) -> Step {
    let revoked = async {
        match revoked {
            Some(t) => t.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let lost = ctx.node.broker_lost();
    tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => Step::Close(CloseReason::ShuttingDown),
        _ = overflowed.cancelled() => Step::Close(CloseReason::TooSlow),
        _ = sleep_until(expiry_instant(expires_at)) => expired(),
        _ = revoked => revoked_step(),
        _ = lost.cancelled() => lost_step(),
    }
}
