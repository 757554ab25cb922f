// The live board: one column per open status, fed by the OrdersLive client.
//
// URL parameters:
//   token=<jwt>            required (a dashboard token for one restaurant)
//   restaurant_id=<uuid>   when the user belongs to several restaurants
//   currency=<ISO code>    optional, formats totals (plain number otherwise)
//   sound=0                start with sound off
//
// DOM hooks (used by tests): columns [data-column=<status>], cards
// [data-order-id][data-status] (.late when past estimated_time), counts
// [data-count=<status>], phone tabs [data-tab=<status>], #connection-state
// (live / reconnecting / offline / connecting) and #connection-detail (why).
// window.ordersBoard.alerts counts new-order alerts (one per new order).
import { OrdersLive } from './client/orders-live.js';

const COLUMNS = ['pending', 'confirmed', 'preparing', 'ready', 'served'];
const STATE_TEXT = {
  idle: 'connecting',
  connecting: 'connecting',
  live: 'live',
  reconnecting: 'reconnecting',
  offline: 'offline',
  stopped: 'offline',
};

const params = new URLSearchParams(location.search);
const token = params.get('token');
const restaurantId = params.get('restaurant_id') || undefined;
const currency = params.get('currency');

const $ = (sel) => document.querySelector(sel);
const stateEl = $('#connection-state');
const detailEl = $('#connection-detail');
const banner = $('#banner');
const template = $('#card-template');
const columns = Object.fromEntries(COLUMNS.map((s) => [s, document.querySelector(`[data-column="${s}"] .cards`)]));
const counts = Object.fromEntries(COLUMNS.map((s) => [s, document.querySelector(`[data-count="${s}"]`)]));
const tabCounts = Object.fromEntries(COLUMNS.map((s) => [s, document.querySelector(`[data-tab-count="${s}"]`)]));
const boardEl = $('#board');

/** id -> card element currently on the board. */
const cards = new Map();
let newestId = null;

const money = currency
  ? new Intl.NumberFormat(undefined, { style: 'currency', currency })
  : new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });

// ---- connection indicator ----------------------------------------------

/** Why a connection ended, in the kitchen's words (close codes: docs/PROTOCOL.md). */
function whyClosed(detail) {
  if (typeof navigator !== 'undefined' && navigator.onLine === false) return 'this device has no network';
  switch (detail.code) {
    case 1001: return 'server restarting';
    case 1013: return 'server lost its message bus';
    case 4408: return 'this screen fell behind';
    case 4429: return 'too many connections';
    case 4401: return 'sign-in expired, renewing';
    case 1006: case null: case undefined:
      return detail.reason ? detail.reason : 'connection lost';
    default: return detail.reason || `closed (${detail.code})`;
  }
}

let liveSince = null;
let lostAt = null;

function showState(state, detail = {}) {
  const text = STATE_TEXT[state] ?? state;
  stateEl.textContent = text;
  stateEl.dataset.state = text;
  for (const cls of [...document.body.classList]) if (cls.startsWith('state-')) document.body.classList.remove(cls);
  document.body.classList.add(`state-${text}`);
  if (state === 'live') {
    liveSince = Date.now();
    lostAt = null;
  } else if (liveSince !== null && lostAt === null) {
    lostAt = Date.now();
  }
  let info = '';
  if (state === 'reconnecting') {
    const retry = detail.delayMs == null ? '' : detail.delayMs >= 1000 ? ` · retry in ${Math.round(detail.delayMs / 1000)} s` : ' · retrying';
    info = `${whyClosed(detail)}${retry}`;
  } else if (state === 'offline') {
    info = detail.reason || whyClosed(detail);
  }
  detailEl.textContent = info;
  if (state === 'offline') {
    const why = detail.code === 4401
      ? 'OFFLINE: the token was rejected or has expired. Open the board again with a fresh ?token=.'
      : detail.code === 4403
        ? 'OFFLINE: this token is not allowed to see this restaurant.'
        : `OFFLINE: ${detail.reason || whyClosed(detail)}. Reload the page to try again.`;
    showBanner(why);
  } else if (state === 'reconnecting') {
    showBanner(`Not live (${whyClosed(detail)}) — reconnecting. Orders shown may be out of date${lostAt ? ` since ${clockTime(lostAt)}` : ''}.`);
  } else {
    showBanner(null);
  }
}

function clockTime(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function showBanner(text) {
  banner.hidden = !text;
  banner.textContent = text || '';
}

// ---- cards ---------------------------------------------------------------

function shortId(id) {
  return String(id ?? '').slice(0, 8);
}

/**
 * Splits an order number so the part that tells orders apart (after the last
 * '-', '/', '_' or space, e.g. "0042" of "ORD-261129-0042") can be shown big.
 * The whole number is always shown.
 */
export function splitOrderNumber(number) {
  const s = String(number);
  const m = /^(.*[-/_ ])([^-/_ ]+)$/.exec(s);
  return m ? [m[1], m[2]] : ['', s];
}

/** Shown for an item the gateway could not name (no menu_items table). */
export const UNNAMED_ITEM = 'Item';

function fillCard(card, order) {
  card.dataset.status = order.order_status;
  card.dataset.version = order.updated_at ?? '';
  const [prefix, tail] = splitOrderNumber(order.order_number ?? shortId(order.id));
  card.querySelector('.order-prefix').textContent = `#${prefix}`;
  card.querySelector('.order-tail').textContent = tail;
  card.querySelector('.order-number').title = `#${prefix}${tail}`;
  card.querySelector('.table').textContent = order.table_number != null ? `Table ${order.table_number}` : 'Takeaway';
  card.querySelector('.customer').textContent = order.customer_name || '';
  const list = card.querySelector('.items');
  list.replaceChildren(...(order.items || []).map((item) => {
    const li = document.createElement('li');
    const qty = document.createElement('span');
    qty.className = 'qty';
    qty.textContent = `${item.quantity ?? 1} ×`;
    const name = document.createElement('span');
    const named = typeof item.name === 'string' && item.name.trim() !== '';
    name.className = named ? 'item' : 'item unnamed';
    // Without a name there is nothing meaningful to show: a neutral word,
    // with the menu item id on hover for whoever needs to look it up.
    name.textContent = named ? item.name.trim() : UNNAMED_ITEM;
    name.title = String(item.menu_item_id ?? '');
    li.append(qty, ' ', name);
    return li;
  }));
  const total = Number(order.total_price);
  card.querySelector('.total').textContent = Number.isFinite(total) ? money.format(total) : '';
  const elapsed = card.querySelector('.elapsed');
  elapsed.dataset.createdAt = order.created_at ?? '';
  elapsed.dataset.estimatedMinutes = order.estimated_time ?? '';
  tickCard(elapsed, Date.now());
}

function createCard(order) {
  const card = template.content.firstElementChild.cloneNode(true);
  card.dataset.orderId = order.id;
  card.addEventListener('animationend', () => card.classList.remove('flash'));
  return card;
}

function formatElapsed(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return h > 0 ? `${h}h ${String(m).padStart(2, '0')}m` : `${m}:${String(sec).padStart(2, '0')}`;
}

function tickCard(elapsed, now) {
  const created = Date.parse(elapsed.dataset.createdAt);
  if (Number.isNaN(created)) {
    elapsed.textContent = '';
    return;
  }
  const ms = now - created;
  elapsed.textContent = formatElapsed(ms);
  const est = Number(elapsed.dataset.estimatedMinutes);
  const card = elapsed.closest('.card');
  const late = est > 0 && ms > est * 60000;
  card?.classList.toggle('late', late);
  card?.setAttribute('aria-label', `waited ${formatElapsed(ms)}${late ? `, late (estimate ${est} min)` : ''}`);
}

function tick() {
  const now = Date.now();
  for (const el of document.querySelectorAll('.card .elapsed')) tickCard(el, now);
  $('#clock').textContent = clockTime(now);
}

let renderQueued = false;
let latestOrders = new Map();

function scheduleRender(orders) {
  latestOrders = orders;
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render(latestOrders);
  });
}

function createdAtOf(order) {
  const t = Date.parse(order.created_at);
  return Number.isNaN(t) ? 0 : t;
}

function render(orders) {
  const byColumn = Object.fromEntries(COLUMNS.map((s) => [s, []]));
  let newest = null;
  for (const order of orders.values()) {
    // Unknown statuses are still shown rather than silently hidden.
    const column = COLUMNS.includes(order.order_status) ? order.order_status : 'pending';
    byColumn[column].push(order);
    // Ties go to the later arrival (Map iteration follows insertion order).
    if (!newest || createdAtOf(order) >= createdAtOf(newest)) newest = order;
  }

  for (const [id, card] of cards) {
    if (!orders.has(id)) {
      card.remove();
      cards.delete(id);
    }
  }

  for (const status of COLUMNS) {
    const list = byColumn[status].sort((a, b) => createdAtOf(a) - createdAtOf(b) || String(a.id).localeCompare(String(b.id)));
    const container = columns[status];
    list.forEach((order, i) => {
      let card = cards.get(String(order.id));
      if (!card) {
        card = createCard(order);
        cards.set(String(order.id), card);
      }
      if (card.dataset.version !== (order.updated_at ?? '') || card.dataset.status !== order.order_status) fillCard(card, order);
      // Move only when needed: re-inserting a node restarts its animations.
      if (container.children[i] !== card) container.insertBefore(card, container.children[i] ?? null);
    });
    counts[status].textContent = String(list.length);
    tabCounts[status].textContent = String(list.length);
  }
  $('#open-count').textContent = String(orders.size);

  const id = newest ? String(newest.id) : null;
  if (id !== newestId) {
    cards.get(newestId)?.classList.remove('newest');
    newestId = id;
  }
  if (id) cards.get(id)?.classList.add('newest');
  runFlashes();
}

/** Orders to flash once their card exists (the render runs on the next frame). */
const pendingFlash = new Set();

function flash(orderId) {
  pendingFlash.add(String(orderId));
  scheduleRender(latestOrders);
}

function runFlashes() {
  if (!pendingFlash.size) return;
  for (const id of pendingFlash) {
    const card = cards.get(id);
    if (!card) continue;
    card.classList.remove('flash');
    void card.offsetWidth; // restart the animation
    card.classList.add('flash');
    card.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
    const status = card.dataset.status;
    if (status !== boardEl.dataset.active) document.querySelector(`[data-tab="${status}"]`)?.classList.add('has-new');
  }
  pendingFlash.clear();
  document.body.classList.remove('alert');
  void document.body.offsetWidth;
  document.body.classList.add('alert');
  setTimeout(() => document.body.classList.remove('alert'), 3000);
}

// ---- phone tabs ------------------------------------------------------------

function showColumn(status) {
  boardEl.dataset.active = status;
  for (const tab of document.querySelectorAll('[data-tab]')) {
    const on = tab.dataset.tab === status;
    tab.setAttribute('aria-pressed', String(on));
    if (on) tab.classList.remove('has-new');
  }
}
for (const tab of document.querySelectorAll('[data-tab]')) {
  tab.addEventListener('click', () => showColumn(tab.dataset.tab));
}

// ---- new-order alerts --------------------------------------------------------
//
// One alert (flash + sound) per new order, ever: an order id is remembered
// once seen, so a replayed or re-published event of the same order (a resume
// overlap, a version delivered again after the server lost its dedup state, a
// snapshot after a resync) never rings twice. The orders of the first
// snapshot are already there when the board opens: they do not ring.

const SEEN_LIMIT = 5000;
const seen = new Set();
let primed = false;
let alerts = 0;

function remember(id) {
  seen.add(id);
  if (seen.size > SEEN_LIMIT) seen.delete(seen.values().next().value);
}

function onOrders(orders, info) {
  const fresh = [];
  for (const id of orders.keys()) {
    if (seen.has(id)) continue;
    remember(id);
    if (primed || info.reason !== 'snapshot') fresh.push(id);
  }
  primed = true;
  scheduleRender(orders);
  if (fresh.length) {
    for (const id of fresh) flash(id);
    alerts += fresh.length;
    beep(fresh.length);
  }
}

// ---- sound -----------------------------------------------------------------

let audio = null;
let soundWanted = params.get('sound') !== '0';
const soundButton = $('#sound-toggle');

function audioContext() {
  if (!audio) {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return null;
    audio = new Ctx();
  }
  return audio;
}

function updateSoundButton() {
  const on = soundWanted && audio?.state === 'running';
  soundButton.textContent = soundWanted ? (on ? 'Sound on' : 'Tap to enable sound') : 'Sound off';
  soundButton.setAttribute('aria-pressed', String(on));
  soundButton.classList.toggle('needs-tap', soundWanted && !on);
}

// Browsers only start audio after a user gesture: any tap on the page does.
function unlockAudio() {
  if (!soundWanted) return;
  const ctx = audioContext();
  ctx?.resume().then(updateSoundButton, updateSoundButton);
}

soundButton.addEventListener('click', (e) => {
  e.stopPropagation();
  const on = soundWanted && audio?.state === 'running';
  if (on) {
    soundWanted = false;
  } else {
    soundWanted = true;
    unlockAudio();
    beep();
  }
  updateSoundButton();
});
document.addEventListener('pointerdown', unlockAudio);

/**
 * Chimes rung for one burst at most: a resync after a long outage can bring
 * dozens of orders at once, and 0.45 s apart, 20 chimes already ring for 9 s;
 * ringing 50 would go on for 20+ s. Every order still flashes and counts.
 */
const MAX_CHIMES_PER_BURST = 20;

/** One two-tone chime per new order, 0.45 s apart so each one can be counted by ear. */
function beep(times = 1) {
  if (!soundWanted || !audio || audio.state !== 'running') return;
  const now = audio.currentTime;
  for (let i = 0; i < Math.min(times, MAX_CHIMES_PER_BURST); i++) chime(now + i * 0.45);
}

function chime(t) {
  for (const [offset, freq] of [[0, 880], [0.18, 1175]]) {
    const osc = audio.createOscillator();
    const gain = audio.createGain();
    osc.type = 'sine';
    osc.frequency.value = freq;
    gain.gain.setValueAtTime(0.0001, t + offset);
    gain.gain.exponentialRampToValueAtTime(0.4, t + offset + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, t + offset + 0.16);
    osc.connect(gain).connect(audio.destination);
    osc.start(t + offset);
    osc.stop(t + offset + 0.17);
  }
}

// ---- start -----------------------------------------------------------------

updateSoundButton();
tick();
setInterval(tick, 1000);

if (!token) {
  showState('offline', { reason: 'no token' });
  showBanner('Open this page with ?token=<dashboard token> in the address.');
} else {
  const wsUrl = new URL('api/ws/orders/live', location.href);
  wsUrl.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  wsUrl.search = '';
  wsUrl.hash = '';

  const client = new OrdersLive({
    url: wsUrl.toString(),
    getToken: () => token,
    restaurantId,
    // Only a new order that is on the board calls the kitchen's attention
    // (an order created and closed before this board saw it is not).
    onOrders,
    onStatus: showState,
  });
  // For operators poking at the console, and for tests.
  window.ordersBoard = { client, get alerts() { return alerts; } };
  client.start();
}
