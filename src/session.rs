//! One dashboard socket: catch-up (resume or snapshot), then one task
//! running one `select!` over the socket, its event queue, its heartbeat,
//! its token's expiry and shutdown. Close codes are [`CloseReason`]s.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chrono::Utc;
use futures_util::SinkExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use uuid::Uuid;

use crate::access::{Access, AccessError};
use crate::broker::{BrokerError, ConnectionRecord, History};
use crate::domain::{EventId, Frame, RestaurantId, SnapshotSource, format_timestamp};
use crate::hub::{JoinError, Member};
use crate::node::{Node, NodeError};

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
    pub snapshots: Option<Arc<dyn SnapshotSource>>,
    pub heartbeat_interval: Duration,
    pub send_queue_capacity: usize,
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

pub async fn close(socket: &mut WebSocket, reason: &CloseReason) {
    metrics::counter!("orders_gateway_connections_closed_total", "code" => reason.code().to_string())
        .increment(1);
    let frame = CloseFrame {
        code: reason.code(),
        reason: Utf8Bytes::from(reason.text()),
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
        let drain = async { while let Some(Ok(_)) = socket.recv().await {} };
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
/// A snapshot's versions are kept until the stream passes each of them, not
/// for a fixed window: a poller that lags behind must not repeat them. The
/// node drops versions already dispatched on the live stream.
struct Seam {
    cursor: Option<EventId>,
    snapshot: HashMap<Uuid, i64>,
}

impl Seam {
    fn admits(&mut self, frame: &Frame) -> bool {
        if let (Some(id), Some(cursor)) = (frame.event_id, self.cursor)
            && id <= cursor
        {
            return false;
        }
        if let Some(v) = frame.version
            && let Some(seen) = self.snapshot.get(&v.order_id).copied()
        {
            if seen >= v.updated_at_micros {
                return false;
            }
            // The stream is past the snapshot for this order.
            self.snapshot.remove(&v.order_id);
            if self.snapshot.is_empty() {
                self.snapshot = HashMap::new();
            }
        }
        if let Some(id) = frame.event_id {
            self.cursor = Some(id);
        }
        true
    }
}

struct Session<'a> {
    ctx: &'a SessionContext,
    socket: WebSocket,
    admission: Admission,
    connection_id: Uuid,
    seam: Seam,
    /// Cancelled when the membership that admitted this socket is removed.
    revoked: Option<CancellationToken>,
}

enum Step {
    Continue,
    Close(CloseReason),
    Gone,
}

pub async fn run(ctx: Arc<SessionContext>, socket: WebSocket, admission: Admission) {
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
            snapshot: HashMap::new(),
        },
        revoked: None,
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
    if let Some(reason) = &reason {
        tracing::debug!(code = reason.code(), "closing");
        if *reason == CloseReason::ShuttingDown {
            // Bounded concurrency: thousands of closes do not stampede.
            let _permit = ctx.closing.acquire().await;
            close(&mut session.socket, reason).await;
        } else {
            close(&mut session.socket, reason).await;
        }
    } else {
        metrics::counter!("orders_gateway_connections_closed_total", "code" => "client")
            .increment(1);
    }
    ctx.node.leave(r, connection_id).await;
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

    async fn send_text(&mut self, text: Utf8Bytes) -> Result<(), ()> {
        self.socket.send(Message::Text(text)).await.map_err(|_| ())
    }

    async fn send_json(&mut self, value: serde_json::Value) -> Result<(), ()> {
        self.send_text(Utf8Bytes::from(value.to_string())).await
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
            Err(Some(reason)) => return Some(reason),
            Err(None) => return None,
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
                _ = &mut expiry => Step::Close(CloseReason::Unauthorized("token expired".into())),
                _ = &mut revoked => Step::Close(CloseReason::Forbidden(
                    "no longer a member of this restaurant".into(),
                )),
                frame = queue.recv() => match frame {
                    Some(frame) => self.relay(frame, cut_off.as_mut(), shutdown.as_mut()).await,
                    None => Step::Close(CloseReason::TooSlow),
                },
                msg = self.socket.recv() => {
                    last_heard = Instant::now();
                    // Boxed: its token check is the largest state in this
                    // loop, and every idle socket would carry it inline.
                    Box::pin(self.on_client(msg, &limiter)).await
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        Step::Close(CloseReason::HeartbeatTimeout)
                    } else if self.socket.send(Message::Ping(Default::default())).await.is_err() {
                        Step::Gone
                    } else {
                        Step::Continue
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
    async fn catch_up(&mut self) -> Result<(), Option<CloseReason>> {
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
                Err(e) => return Err(Some(unavailable(e))),
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
        self.send_json(established).await.map_err(|_| None)?;
        if let Some(frames) = replay {
            for text in frames {
                let Ok(frame) = Frame::parse(r, text) else {
                    continue;
                };
                if self.seam.admits(&frame) {
                    self.send_text(frame.text).await.map_err(|_| None)?;
                }
            }
            return Ok(());
        }
        if let Some(reason) = resync_reason {
            self.send_json(json!({ "type": "resync_required", "reason": reason }))
                .await
                .map_err(|_| None)?;
        }
        self.send_snapshot().await
    }

    /// Subscribed first (join), then read: an event committed around now is
    /// either in the snapshot or arrives after it, and the seam drops the
    /// copies of what the snapshot already shows.
    async fn send_snapshot(&mut self) -> Result<(), Option<CloseReason>> {
        let Some(source) = self.ctx.snapshots.clone() else {
            return Ok(());
        };
        let r = self.admission.restaurant;
        let last = self
            .ctx
            .node
            .last_event_id(r)
            .await
            .map_err(|e| Some(unavailable(e)))?;
        let orders = source.open_orders(r).await.map_err(|e| {
            tracing::warn!(restaurant_id = %r, error = %e, "snapshot failed");
            Some(CloseReason::Unavailable(
                "snapshot unavailable, retry".into(),
            ))
        })?;
        metrics::counter!("orders_gateway_snapshots_total").increment(1);
        self.seam.cursor = last.max(self.seam.cursor);
        self.seam.snapshot = orders
            .iter()
            .map(|o| (o.id, o.updated_at.timestamp_micros()))
            .collect();
        let frame = json!({
            "type": "snapshot",
            "orders": orders,
            "last_event_id": last.map(|id| id.to_string()),
        });
        self.send_json(frame).await.map_err(|_| None)
    }

    async fn relay(
        &mut self,
        frame: Arc<Frame>,
        cut_off: Pin<&mut WaitForCancellationFuture<'_>>,
        shutdown: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Step {
        if frame.resync {
            if self.send_text(frame.text.clone()).await.is_err() {
                return Step::Gone;
            }
            self.seam.cursor = None;
            return match self.send_snapshot().await {
                Ok(()) => Step::Continue,
                Err(Some(reason)) => Step::Close(reason),
                Err(None) => Step::Gone,
            };
        }
        if !self.seam.admits(&frame) {
            return Step::Continue;
        }
        // A client that stops reading blocks this send; the hub then fills
        // the queue and cancels `overflowed`, which must win the race.
        tokio::select! {
            biased;
            _ = cut_off => Step::Close(CloseReason::TooSlow),
            _ = shutdown => Step::Close(CloseReason::ShuttingDown),
            sent = self.socket.send(Message::Text(frame.text.clone())) => match sent {
                Ok(()) => Step::Continue,
                Err(_) => Step::Gone,
            },
        }
    }

    async fn on_client(
        &mut self,
        msg: Option<Result<Message, axum::Error>>,
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
            Message::Ping(_) | Message::Pong(_) => return Step::Continue,
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
                    Err(()) => Step::Gone,
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
            Err(()) => Step::Gone,
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

fn is_too_big(e: axum::Error) -> bool {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => true,
        _ => inner.to_string().to_ascii_lowercase().contains("too long"),
    }
}
