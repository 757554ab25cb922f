// orders-live.js — dependency-free client for the orders-gateway WebSocket.
//
// Works in browsers (served by the gateway at /client/orders-live.js) and in
// Node (pass a WebSocket implementation, e.g. the `ws` package, as the
// `WebSocket` option; Node 20 has no stable global WebSocket).
//
// What it does for the application:
//   * keeps `client.orders`, a Map id -> order of OPEN orders (completed and
//     cancelled orders are removed), consistent across reconnects;
//   * reconnects with exponential backoff and full jitter (close codes 1001,
//     1006, 4408, 4429, network errors, a dead socket), resuming with the
//     `last_event_id` of the last event it applied;
//   * applies `snapshot` (replaces the map), handles `resync_required`
//     (forgets the cursor and waits for the snapshot that follows);
//   * drops duplicates: events whose event_id is not after the last applied
//     one, and order versions (id + updated_at) equal to or older than one
//     already held, including across snapshots and after the order closed;
//   * refreshes the token through `getToken()` before it expires (`auth`
//     message) and after a 4401 close; stops on 4403/4400 ('offline').
//
//   const live = new OrdersLive({
//     url: 'wss://gw.example.com/api/ws/orders/live',
//     getToken: async () => fetchJwt(),
//     onOrders: (orders) => render(orders),
//     onEvent: (evt) => { if (evt.type === 'order_created') beep(); },
//     onStatus: (state, detail) => showIndicator(state, detail),
//   });
//   live.start();

/** Order statuses that are no longer "open": removed from the map. */
export const CLOSED_STATUSES = new Set(['completed', 'cancelled']);

/** Close codes after which the client gives up (state 'offline'). */
const FATAL_CODES = new Map([
  [4400, 'bad request'],
  [4403, 'forbidden'],
]);

const ORDER_EVENTS = new Set(['order_created', 'order_status_changed', 'order_updated', 'order_deleted']);
/** Remembered for a deleted order: no later version can bring it back. */
const DELETED_AT = '9999-12-31T23:59:59.999999Z';

/** Custom close code the client uses when it abandons a silent socket. */
export const CLIENT_DEAD_SOCKET_CODE = 4000;

/**
 * Full-jitter exponential backoff: a uniform random delay in
 * [0, min(maxMs, baseMs * 2^attempt)).
 */
export function backoffDelay(attempt, { baseMs = 500, maxMs = 30000 } = {}, random = Math.random) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/**
 * Event ids are fixed-width strings that increase within a restaurant, so a
 * plain string comparison orders them. Returns <0, 0, >0.
 */
export function compareEventIds(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Parses an RFC 3339 timestamp into a comparable [epochSeconds, nanos] pair,
 * keeping sub-millisecond precision (PostgreSQL has microseconds; Date has
 * milliseconds). Returns null when it cannot be parsed.
 */
export function parseTimestamp(ts) {
  if (typeof ts !== 'string') return null;
  let nanos = 0;
  const withoutFraction = ts.replace(/\.(\d+)/, (_, digits) => {
    nanos = Number((digits + '000000000').slice(0, 9));
    return '';
  });
  const ms = Date.parse(withoutFraction);
  if (Number.isNaN(ms)) return null;
  return [Math.floor(ms / 1000), nanos];
}

/** Compares two timestamps; null when either cannot be parsed. */
export function compareTimestamps(a, b) {
  const pa = parseTimestamp(a);
  const pb = parseTimestamp(b);
  if (!pa || !pb) return null;
  return pa[0] - pb[0] || pa[1] - pb[1];
}

/** Reads the `exp` claim (seconds) of a JWT without verifying it; null if absent. */
export function jwtExpiry(token) {
  try {
    const part = String(token).split('.')[1];
    if (!part) return null;
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const json = typeof atob === 'function'
      ? decodeURIComponent(Array.from(atob(padded), (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join(''))
      : Buffer.from(padded, 'base64').toString('utf8');
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/**
 * When to refresh a token that has `remainingMs` left: 30 s before expiry,
 * or at half-life for tokens that live less than a minute.
 */
export function refreshDelay(remainingMs, leadMs = 30000) {
  const delay = remainingMs > 2 * leadMs ? remainingMs - leadMs : remainingMs / 2;
  return Math.max(1000, Math.floor(delay));
}

const noop = () => {};

export class OrdersLive {
  /**
   * @param {object} opts
   * @param {string} opts.url WebSocket URL of /api/ws/orders/live (ws: or wss:)
   * @param {() => Promise<string>|string} opts.getToken token provider, called on
   *   first connect, after a 4401 close and before the current token expires
   * @param {string} [opts.restaurantId] sent as restaurant_id
   * @param {string} [opts.lastEventId] initial resume cursor
   * @param {Function} [opts.WebSocket] WebSocket implementation (default globalThis.WebSocket)
   * @param {{baseMs?:number,maxMs?:number,stableMs?:number}} [opts.backoff]
   *   reconnect delays; the attempt counter resets once a connection has been
   *   live for stableMs (so a server that accepts then drops does not cause a tight loop)
   * @param {number} [opts.pingIntervalMs=20000] app-level ping period (0 disables)
   * @param {number} [opts.pongTimeoutMs=10000] no message for this long after a ping: socket is dead
   * @param {number} [opts.maxAuthFailures=3] consecutive 4401 closes before going offline
   * @param {(orders: Map<string, object>, info: object) => void} [opts.onOrders]
   * @param {(evt: object) => void} [opts.onEvent] each applied order event
   * @param {(state: string, detail: object) => void} [opts.onStatus]
   * @param {(msg: object) => void} [opts.onMessage] every server message, raw
   * @param {() => number} [opts.random] for tests
   */
  constructor(opts = {}) {
    if (!opts.url) throw new TypeError('OrdersLive: url is required');
    if (typeof opts.getToken !== 'function') throw new TypeError('OrdersLive: getToken is required');
    this.url = opts.url;
    this.getToken = opts.getToken;
    this.restaurantId = opts.restaurantId ?? null;
    this.WebSocket = opts.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== 'function') {
      throw new TypeError('OrdersLive: no WebSocket implementation (pass { WebSocket })');
    }
    this.backoff = { baseMs: 500, maxMs: 30000, stableMs: 10000, ...(opts.backoff || {}) };
    this.pingIntervalMs = opts.pingIntervalMs ?? 20000;
    this.pongTimeoutMs = opts.pongTimeoutMs ?? 10000;
    this.maxAuthFailures = opts.maxAuthFailures ?? 3;
    this.random = opts.random ?? Math.random;
    this.onOrders = opts.onOrders ?? noop;
    this.onEvent = opts.onEvent ?? noop;
    this.onStatus = opts.onStatus ?? noop;
    this.onMessage = opts.onMessage ?? noop;

    /** Open orders, id -> order. */
    this.orders = new Map();
    /** 'idle' | 'connecting' | 'live' | 'reconnecting' | 'offline' | 'stopped' */
    this.state = 'idle';
    /** event_id of the last applied event (or of the last snapshot); the resume cursor. */
    this.lastEventId = opts.lastEventId ?? null;
    /** Last close seen: {code, reason}. */
    this.lastClose = null;
    /** The connection_established message of the current connection. */
    this.connection = null;
    /** True between resync_required and the snapshot that follows it. */
    this.awaitingSnapshot = false;

    this._ws = null;
    this._token = null;
    this._attempt = 0;
    this._authFailures = 0;
    this._liveSince = 0;
    this._reconnectTimer = null;
    this._refreshTimer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    // updated_at of recently removed (completed/cancelled) orders, so a late,
    // stale event cannot bring a closed order back. Bounded.
    this._removed = new Map();
    this._onOnline = () => {
      if (this.state === 'reconnecting' && this._reconnectTimer) {
        clearTimeout(this._reconnectTimer);
        this._reconnectTimer = null;
        this._connect();
      }
    };
  }

  /** Starts (or restarts after stop/offline) the connection. */
  start() {
    if (this.state === 'connecting' || this.state === 'live' || this.state === 'reconnecting') return this;
    this._attempt = 0;
    this._authFailures = 0;
    this._setState('connecting', {});
    globalThis.addEventListener?.('online', this._onOnline);
    this._connect();
    return this;
  }

  /** Closes the socket and stops reconnecting. The map is kept. */
  stop() {
    globalThis.removeEventListener?.('online', this._onOnline);
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try { ws.close(1000, 'client stopped'); } catch { /* already closed */ }
    }
    this._setState('stopped', {});
  }

  /** Sends {"type":"ping"}; the server answers with pong. */
  ping() {
    return this._send({ type: 'ping' });
  }

  // ---- connection ------------------------------------------------------

  async _connect() {
    this._reconnectTimer = null;
    if (this.state === 'stopped' || this.state === 'offline') return;
    let token;
    try {
      token = await this._currentToken();
    } catch (err) {
      this._scheduleReconnect({ code: null, reason: `getToken failed: ${err?.message ?? err}` });
      return;
    }
    if (this.state === 'stopped' || this.state === 'offline') return;

    let url;
    try {
      url = new URL(this.url, globalThis.location?.href);
    } catch {
      this._fatal({ code: null, reason: `invalid url: ${this.url}` });
      return;
    }
    url.searchParams.set('token', token);
    if (this.restaurantId) url.searchParams.set('restaurant_id', this.restaurantId);
    if (this.lastEventId) url.searchParams.set('last_event_id', this.lastEventId);
    else url.searchParams.delete('last_event_id');

    let ws;
    try {
      ws = new this.WebSocket(url.toString());
    } catch (err) {
      this._scheduleReconnect({ code: null, reason: `connect failed: ${err?.message ?? err}` });
      return;
    }
    this._ws = ws;
    this._sentCursor = this.lastEventId;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._startPing();
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._onData(ev.data);
    };
    ws.onerror = () => { /* a close event follows */ };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._onClose(ev.code, ev.reason || '');
    };
  }

  async _currentToken(force = false) {
    if (!force && this._token) {
      const exp = jwtExpiry(this._token);
      if (exp === null || exp * 1000 > Date.now() + 5000) return this._token;
    }
    const token = await this.getToken();
    if (!token) throw new Error('empty token');
    this._token = String(token);
    return this._token;
  }

  _onClose(code, reason) {
    this._stopPing();
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this.connection = null;
    this.lastClose = { code, reason };
    if (this._liveSince && Date.now() - this._liveSince >= this.backoff.stableMs) this._attempt = 0;
    this._liveSince = 0;
    if (this.state === 'stopped' || this.state === 'offline') return;

    if (FATAL_CODES.has(code)) {
      this._fatal({ code, reason: reason || FATAL_CODES.get(code) });
      return;
    }
    if (code === 4401) {
      this._authFailures += 1;
      if (this._authFailures >= this.maxAuthFailures) {
        this._fatal({ code, reason: reason || 'unauthorized' });
        return;
      }
      this._token = null; // getToken() again before the next attempt
    }
    this._scheduleReconnect({ code, reason });
  }

  _scheduleReconnect(detail) {
    if (this.state === 'stopped' || this.state === 'offline') return;
    // The first retry after an auth failure goes at once with the new token.
    const delayMs = detail.code === 4401 && this._authFailures === 1
      ? 0
      : backoffDelay(this._attempt, this.backoff, this.random);
    this._attempt += 1;
    this._setState('reconnecting', { ...detail, delayMs, attempt: this._attempt });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._connect(), delayMs);
  }

  _fatal(detail) {
    globalThis.removeEventListener?.('online', this._onOnline);
    this._clearTimers();
    this._setState('offline', detail);
  }

  _clearTimers() {
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._refreshTimer);
    this._reconnectTimer = null;
    this._refreshTimer = null;
    this._stopPing();
  }

  _setState(state, detail) {
    this.state = state;
    try { this.onStatus(state, detail); } catch (err) { reportCallbackError(err); }
  }

  _send(obj) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(obj));
      return true;
    } catch {
      return false;
    }
  }

  // ---- liveness --------------------------------------------------------

  _startPing() {
    this._stopPing();
    if (!this.pingIntervalMs) return;
    this._pingTimer = setInterval(() => {
      if (this._pongTimer) return; // still waiting for the previous answer
      if (!this._send({ type: 'ping' })) return;
      this._pongTimer = setTimeout(() => {
        // Nothing at all arrived since the ping: the socket is dead even if
        // the OS has not noticed yet. Abandon it and reconnect.
        const ws = this._ws;
        if (!ws) return;
        this._ws = null;
        try { ws.close(CLIENT_DEAD_SOCKET_CODE, 'pong timeout'); } catch { /* ignore */ }
        this._onClose(1006, 'pong timeout');
      }, this.pongTimeoutMs);
    }, this.pingIntervalMs);
  }

  _stopPing() {
    clearInterval(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._pingTimer = null;
    this._pongTimer = null;
  }

  _scheduleTokenRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const exp = jwtExpiry(this._token);
    if (exp === null) return;
    const delay = refreshDelay(exp * 1000 - Date.now());
    this._refreshTimer = setTimeout(async () => {
      this._refreshTimer = null;
      try {
        const token = await this._currentToken(true);
        if (this._send({ type: 'auth', token })) this._scheduleTokenRefresh();
      } catch {
        // Try again shortly; if the token expires first, the server closes
        // with 4401 and the reconnect path asks for a token again.
        if (this._ws) this._refreshTimer = setTimeout(() => this._scheduleTokenRefresh(), 5000);
      }
    }, delay);
  }

  // ---- protocol --------------------------------------------------------

  _onData(data) {
    // Any frame proves the socket is alive.
    clearTimeout(this._pongTimer);
    this._pongTimer = null;
    let msg;
    try {
      msg = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    try { this.onMessage(msg); } catch (err) { reportCallbackError(err); }

    switch (msg.type) {
      case 'connection_established':
        this.connection = msg;
        this._authFailures = 0;
        this._liveSince = Date.now();
        if (this._sentCursor && msg.resumed === false) {
          // The server could not resume from our cursor; its ids may come
          // from a new history, so the old cursor must not filter them.
          this.lastEventId = null;
        }
        this._scheduleTokenRefresh();
        this._setState('live', { connection: msg });
        break;
      case 'snapshot':
        this._applySnapshot(msg);
        break;
      case 'resync_required':
        this.lastEventId = null;
        this.awaitingSnapshot = true;
        break;
      default:
        if (ORDER_EVENTS.has(msg.type)) this._applyEvent(msg);
    }
  }

  _applySnapshot(msg) {
    // The snapshot is the server's view, but a version this client already
    // had stays "seen": a snapshot that lags a live event does not roll an
    // order back, and an order that left the snapshot (closed meanwhile) is
    // remembered at the version held, so a late replay of it (a lagging
    // poller, dedup state lost) cannot bring it back.
    const orders = new Map();
    for (const order of Array.isArray(msg.orders) ? msg.orders : []) {
      if (!order || order.id == null) continue;
      const id = String(order.id);
      const held = this.orders.get(id);
      if (held && isNotNewer(order.updated_at, held.updated_at)) {
        orders.set(id, held);
        continue;
      }
      if (this._removed.has(id) && isNotNewer(order.updated_at, this._removed.get(id))) continue;
      if (CLOSED_STATUSES.has(order.order_status)) {
        this._rememberRemoved(id, order.updated_at);
        continue;
      }
      this._removed.delete(id);
      orders.set(id, order);
    }
    for (const [id, held] of this.orders) {
      if (!orders.has(id)) this._rememberRemoved(id, held.updated_at);
    }
    this.orders = orders;
    this.lastEventId = msg.last_event_id || null;
    this.awaitingSnapshot = false;
    this._emitOrders({ reason: 'snapshot' });
  }

  _applyEvent(evt) {
    const order = evt.order;
    if (!order || order.id == null) return;
    if (evt.event_id != null && this.lastEventId != null && compareEventIds(String(evt.event_id), this.lastEventId) <= 0) {
      return; // already applied (resume overlap or duplicate delivery)
    }
    if (evt.event_id != null) this.lastEventId = String(evt.event_id);

    // A version equal to or older than one already held (or held before the
    // order closed) is already seen: delivered again under a new event id
    // after the server lost its dedup state, or by a lagging poller.
    const id = String(order.id);
    if (evt.type === 'order_deleted') {
      // Gone from the database: off the board, for good.
      this.orders.delete(id);
      this._rememberRemoved(id, DELETED_AT);
      try { this.onEvent(evt); } catch (err) { reportCallbackError(err); }
      this._emitOrders({ reason: 'event', event: evt });
      return;
    }
    const held = this.orders.get(id);
    const heldAt = held ? held.updated_at : this._removed.get(id);
    if (heldAt !== undefined && isNotNewer(order.updated_at, heldAt)) return;

    if (CLOSED_STATUSES.has(order.order_status)) {
      this.orders.delete(id);
      this._rememberRemoved(id, order.updated_at);
    } else {
      this._removed.delete(id);
      this.orders.set(id, order);
    }
    try { this.onEvent(evt); } catch (err) { reportCallbackError(err); }
    this._emitOrders({ reason: 'event', event: evt });
  }

  _rememberRemoved(id, updatedAt) {
    this._removed.set(id, updatedAt);
    if (this._removed.size > 1000) this._removed.delete(this._removed.keys().next().value);
  }

  _emitOrders(info) {
    try { this.onOrders(this.orders, info); } catch (err) { reportCallbackError(err); }
  }
}

/** True when version `a` is known to be the same as or older than `b`. */
function isNotNewer(a, b) {
  const cmp = compareTimestamps(a, b);
  return cmp !== null && cmp <= 0;
}

function reportCallbackError(err) {
  // A throwing application callback must not break the protocol state.
  console.error('OrdersLive: callback failed:', err);
}

export default OrdersLive;
