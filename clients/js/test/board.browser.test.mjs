// The live board in headless chromium: against a fake server (always), and
// against the real gateway (when its binary exists).
import { test, describe, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { chromiumUnavailable, openBrowser, board } from './helpers/browser.mjs';
import { Gateway, gatewayUnavailable } from './helpers/gateway.mjs';
import { startFakeServer } from './helpers/fake-server.mjs';
import { makeOrder, nextVersion, waitFor } from './helpers/util.mjs';

const BOARD_FROM_REPO = process.env.BOARD_FROM_REPO === '1';
const COLUMNS = ['pending', 'confirmed', 'preparing', 'ready', 'served'];
// web/board/board.js UNNAMED_ITEM (not importable here: it needs a DOM).
const UNNAMED_ITEM = 'Item';
// Smallest font size (px) of every shown instance, readable from two metres:
// the order's distinguishing number and the item lines are big, the
// connection state bigger than body text.
const READABLE = { '.order-tail': 24, '.items li': 15, '.elapsed': 18, '#connection-state': 15 };

function unavailable(...checks) {
  for (const check of checks) {
    try {
      const why = check();
      if (why) return why;
    } catch (err) {
      return err;
    }
  }
  return false;
}

const cleanups = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()();
});

async function browser(opts) {
  const b = await openBrowser(opts);
  cleanups.push(() => b.close());
  return b;
}

const ev = (type, order, event_id, extra = {}) => ({ type, event_id, order, timestamp: new Date().toISOString(), ...extra });

function declare(name, why, fn) {
  if (why instanceof Error) test(name, () => { throw why; });
  else test(name, { skip: why || false, timeout: 120000 }, fn);
}

describe('live board', () => {
  declare('against a fake server: cards, columns, counts, indicator, reconnect without duplicates',
    unavailable(chromiumUnavailable), async () => {
      const server = await startFakeServer({ serveBoard: true });
      cleanups.push(() => server.close());
      const { page, errors, screenshot } = await browser();
      const b = board(page);
      await page.goto(`${server.httpUrl}/?token=tok-1&restaurant_id=r-9`);

      let conn = await server.nextConnection();
      assert.equal(conn.query.token, 'tok-1');
      assert.equal(conn.query.restaurant_id, 'r-9');
      conn.establish();
      await b.waitState('live');
      const a = makeOrder({ created_at: new Date(Date.now() - 125000).toISOString(), customer_name: 'Ada' });
      conn.send({ type: 'snapshot', orders: [a], last_event_id: '0000000010' });
      await b.cardIn('pending', a.id).waitFor();
      assert.match(await b.card(a.id).locator('.elapsed').textContent(), /^2:0\d$/);
      assert.match(await b.card(a.id).textContent(), /Ada/);
      assert.match(await b.card(a.id).locator('.items').textContent(), /2 ×/);

      const c = makeOrder({ customer_name: 'Grace' });
      conn.send(ev('order_created', c, '0000000011'));
      await b.cardIn('pending', c.id).waitFor();
      await page.waitForSelector(`[data-order-id="${c.id}"].newest.flash`, { timeout: 1500 });
      assert.equal(await page.locator('.card.newest').count(), 1);
      assert.equal(await b.count('pending'), 2);

      conn.send(ev('order_status_changed', nextVersion(a, { order_status: 'preparing' }), '0000000012', { previous_status: 'pending' }));
      await b.cardIn('preparing', a.id).waitFor();
      assert.equal(await b.card(a.id).getAttribute('data-status'), 'preparing');
      assert.equal(await b.count('pending'), 1);
      assert.equal(await b.count('preparing'), 1);

      conn.terminate();
      await b.waitState('reconnecting');
      conn = await server.nextConnection();
      assert.equal(conn.query.last_event_id, '0000000012');
      conn.establish({ resumed: true });
      await b.waitState('live');
      const d = makeOrder({ customer_name: 'Linus' });
      conn.send(ev('order_created', c, '0000000011')); // overlap: already shown
      conn.send(ev('order_created', d, '0000000013'));
      await b.cardIn('pending', d.id).waitFor();
      assert.deepEqual((await b.allCardIds()).sort(), [a.id, c.id, d.id].sort());

      conn.send(ev('order_status_changed', nextVersion(c, { order_status: 'cancelled' }), '0000000014'));
      await b.card(c.id).waitFor({ state: 'detached' });
      assert.equal(await b.count('pending'), 1);
      await screenshot('board-fake.png');

      conn.close(4403, 'forbidden for this restaurant');
      await b.waitState('offline');
      assert.match(await page.locator('#banner').textContent(), /not allowed/);
      assert.deepEqual(errors, []);
    });

  declare('layout at 1920x1080, 1280x800, 1024x768 and 390x844: nothing clipped, overlapping or sideways; every order reachable',
    unavailable(chromiumUnavailable), async () => {
      const server = await startFakeServer({ serveBoard: true });
      cleanups.push(() => server.close());
      const { page, errors, screenshot } = await browser();
      const b = board(page);
      const orders = kitchenRush();
      await page.goto(`${server.httpUrl}/?token=tok-1`);
      const conn = await server.nextConnection();
      conn.establish();
      conn.send({ type: 'snapshot', orders, last_event_id: '0000000100' });
      await b.waitState('live');
      await page.waitForFunction((n) => document.querySelectorAll('[data-order-id]').length === n, orders.length);

      for (const [width, height] of [[1920, 1080], [1280, 800], [1024, 768], [390, 844]]) {
        const size = `${width}x${height}`;
        await page.setViewportSize({ width, height });
        await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
        const phone = width < 700;

        // A phone shows one column at a time: every tab is its own layout
        // (the longest order number and the 7-item card are not in Pending).
        const views = phone ? COLUMNS : [null];
        const fontMin = {};
        for (const status of views) {
          const view = status ? `${size} ${status} tab` : size;
          if (status) {
            await page.click(`[data-tab="${status}"]`);
            await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
          }
          const report = await page.evaluate(layoutProblems);
          assert.deepEqual(report.problems, [], `${view}: layout problems`);
          const expected = status ? orders.filter((o) => o.order_status === status).length : orders.length;
          assert.equal(report.checkedCards, expected, `${view}: cards checked`);

          // Readable from two metres: the smallest shown instance counts,
          // not whichever happens to come first in the document.
          const sizes = await page.evaluate((sels) => Object.fromEntries(sels.map((sel) => {
            const px = [...document.querySelectorAll(sel)]
              .filter((el) => el.getClientRects().length > 0)
              .map((el) => parseFloat(getComputedStyle(el).fontSize));
            return [sel, px.length ? Math.min(...px) : null];
          })), Object.keys(READABLE));
          for (const [sel, px] of Object.entries(sizes)) {
            if (px !== null) fontMin[sel] = Math.min(fontMin[sel] ?? Infinity, px);
          }

          // A late order stands out: its LATE badge is shown, and no other
          // card's is (the badge is in every card, hidden by CSS).
          for (const order of orders) {
            if (status && order.order_status !== status) continue;
            const card = b.cardIn(order.order_status, order.id);
            const shown = await card.locator('.late-badge').isVisible();
            assert.equal(shown, order === orders[0], `${view}: late badge of ${order.order_number} ${shown ? 'shown' : 'hidden'}`);
          }
          if (!status || status === orders[0].order_status) {
            const [lateBorder, onTimeBorder] = await Promise.all([orders[0], orders[1]].map((o) =>
              b.card(o.id).evaluate((el) => getComputedStyle(el).borderTopColor)));
            assert.notEqual(lateBorder, onTimeBorder, `${view}: the late card's frame looks like any other`);
          }
          // The longest order number and the 7-item card, for a human to look at.
          if (status === 'preparing') await screenshot(`board-${size}-preparing.png`);
        }
        for (const [sel, min] of Object.entries(READABLE)) {
          assert.ok(fontMin[sel] !== undefined, `${size}: no ${sel} shown`);
          assert.ok(fontMin[sel] >= min, `${size}: smallest ${sel} font-size ${fontMin[sel]}px < ${min}px`);
        }
        if (phone) await page.click('[data-tab="pending"]');

        // One column at a time on a phone; all five side by side otherwise.
        const shown = await page.$$eval('[data-column]', (els) => els.filter((e) => e.offsetParent !== null).length);
        assert.equal(shown, phone ? 1 : 5, `${size}: visible columns`);

        // Every open order can be brought into view: (phone: its tab, then)
        // scrolling its column; the whole order number is on the card.
        for (const order of orders) {
          if (phone) await page.click(`[data-tab="${order.order_status}"]`);
          const card = b.cardIn(order.order_status, order.id);
          await card.scrollIntoViewIfNeeded();
          const hit = await card.evaluate((el) => {
            const r = el.getBoundingClientRect();
            const x = r.left + r.width / 2;
            const y = r.top + Math.min(r.height / 2, 20);
            const top = document.elementFromPoint(x, y);
            return { inView: r.left >= 0 && r.right <= innerWidth && r.top >= 0 && r.top < innerHeight, onTop: el.contains(top) };
          });
          assert.ok(hit.inView && hit.onTop, `${size}: order ${order.order_number} not reachable: ${JSON.stringify(hit)}`);
          assert.equal(await card.locator('.order-number').textContent(), `#${order.order_number}`, `${size}: whole order number`);
        }
        if (phone) await page.click('[data-tab="pending"]');
        await page.evaluate(() => { for (const el of document.querySelectorAll('.cards')) el.scrollTop = 0; });
        await screenshot(`board-${size}.png`);
      }

      // Waiting time on every card; only the order past its estimate is late.
      const late = await page.$$eval('.card.late', (els) => els.map((e) => e.dataset.orderId));
      assert.deepEqual(late, [orders[0].id]);
      assert.match(await b.card(orders[0].id).locator('.elapsed').textContent(), /^(4\d:\d\d|1h \d\dm)$/);
      assert.match(await b.card(orders[0].id).locator('.late-badge').textContent(), /late/i);
      // Names, and a neutral word when an item has none (never a UUID).
      const itemText = await page.locator('.items').allTextContents();
      assert.ok(itemText.some((t) => t.includes('Margherita pizza')));
      const unnamed = b.card(orders[0].id).locator('.items .item.unnamed');
      assert.equal(await unnamed.count(), 1, 'the item without a name is marked unnamed');
      assert.ok(await unnamed.isVisible(), 'the unnamed item is shown');
      assert.equal(await unnamed.textContent(), UNNAMED_ITEM);
      assert.equal(await unnamed.getAttribute('title'), orders[0].items[1].menu_item_id, 'its menu item id on hover');
      assert.ok(!itemText.some((t) => /[0-9a-f]{8}/.test(t)), `an item shows hex: ${itemText.find((t) => /[0-9a-f]{8}/.test(t))}`);
      assert.deepEqual(errors, []);
    });

  declare('connection state says why, and the new-order sound rings once per new order',
    unavailable(chromiumUnavailable), async () => {
      const server = await startFakeServer({ serveBoard: true });
      cleanups.push(() => server.close());
      const { page, errors, screenshot } = await browser();
      await page.addInitScript(fakeAudio);
      const b = board(page);
      await page.goto(`${server.httpUrl}/?token=tok-1`);
      let conn = await server.nextConnection();
      conn.establish();
      const a = makeOrder();
      conn.send({ type: 'snapshot', orders: [a], last_event_id: '0000000010' });
      await b.cardIn('pending', a.id).waitFor();
      await page.mouse.click(10, 10); // the user gesture browsers want before sound
      await page.waitForFunction(() => document.querySelector('#sound-toggle').textContent === 'Sound on');
      const chimes = () => page.evaluate(() => window.__chimes);
      const alerts = () => page.evaluate(() => window.ordersBoard.alerts);
      assert.equal(await chimes(), 0, 'orders already open when the board opens do not ring');

      const c = makeOrder();
      conn.send(ev('order_created', c, '0000000011'));
      await b.cardIn('pending', c.id).waitFor();
      await waitFor(async () => (await chimes()) === 1, { message: 'one chime for the new order' });
      // The same order again: a duplicate delivery, the same version under a
      // new id (server lost its dedup state), a newer version re-announced as
      // created, a status change. None is a new order.
      conn.send(ev('order_created', c, '0000000011'));
      conn.send(ev('order_created', c, '0000000012'));
      const c2 = nextVersion(c, { customer_name: 'Changed' });
      conn.send(ev('order_created', c2, '0000000013'));
      conn.send(ev('order_status_changed', nextVersion(c2, { order_status: 'confirmed' }), '0000000014', { previous_status: 'pending' }));
      await b.cardIn('confirmed', c.id).waitFor();

      // Lost connection: the board says so, and why.
      conn.terminate();
      await b.waitState('reconnecting');
      assert.match(await page.locator('#connection-detail').textContent(), /connection lost/);
      assert.ok(await page.locator('#banner').isVisible());
      assert.match(await page.locator('#banner').textContent(), /Not live/);
      await screenshot('board-reconnecting.png');

      // Resync after the reconnect: a snapshot with one order the board has not seen.
      conn = await server.nextConnection();
      conn.establish({ resumed: false });
      const d = makeOrder();
      conn.send({ type: 'resync_required', reason: 'history lost' });
      conn.send({ type: 'snapshot', orders: [a, nextVersion(c2, { order_status: 'preparing' }), d], last_event_id: '0000000003' });
      await b.cardIn('pending', d.id).waitFor();
      await b.cardIn('preparing', c.id).waitFor();
      assert.ok(!(await page.locator('#banner').isVisible()), 'banner gone once live');
      await waitFor(async () => (await chimes()) === 2, { message: 'one chime for the order first seen in the snapshot' });
      await page.waitForTimeout(300);
      assert.equal(await chimes(), 2, 'exactly one chime per new order');
      assert.equal(await alerts(), 2);

      // A resync bringing several orders the board has not seen: one chime
      // each, not a capped "some sound".
      const open = [a, nextVersion(c2, { order_status: 'preparing' }), d];
      const burst = Array.from({ length: 5 }, () => makeOrder());
      conn.send({ type: 'resync_required', reason: 'history lost' });
      conn.send({ type: 'snapshot', orders: [...open, ...burst], last_event_id: '0000000004' });
      for (const o of burst) await b.cardIn('pending', o.id).waitFor();
      await waitFor(async () => (await chimes()) >= 7, { message: 'five chimes for five new orders' }).catch(() => {});
      await page.waitForTimeout(300);
      assert.equal(await chimes() - 2, 5, 'a burst of 5 new orders rings 5 chimes');
      assert.equal(await alerts(), 7);

      // A huge resync (a screen back after a long outage) rings at most 20
      // times, so it does not keep ringing for half a minute; every order
      // still counts as an alert.
      const flood = Array.from({ length: 25 }, () => makeOrder());
      conn.send({ type: 'resync_required', reason: 'history lost' });
      conn.send({ type: 'snapshot', orders: [...open, ...burst, ...flood], last_event_id: '0000000005' });
      for (const o of flood) await b.cardIn('pending', o.id).waitFor();
      await waitFor(async () => (await alerts()) === 32, { message: '25 more alerts' });
      await page.waitForTimeout(300);
      assert.equal(await chimes() - 7, 20, 'a burst of 25 new orders rings the bound of 20 chimes');

      conn.close(1001, 'server shutting down');
      await b.waitState('reconnecting');
      assert.match(await page.locator('#connection-detail').textContent(), /server restarting/);
      conn = await server.nextConnection();
      conn.close(4401, 'token expired');
      await waitFor(async () => /sign-in/.test(await page.locator('#connection-detail').textContent()), { message: 'auth reason shown' });
      conn = await server.nextConnection();
      conn.close(4403, 'forbidden for this restaurant');
      await b.waitState('offline');
      assert.match(await page.locator('#banner').textContent(), /OFFLINE.*not allowed/);
      assert.deepEqual(errors, []);
    });

  declare('against the real gateway: appears, moves, survives a restart with no duplicates',
    unavailable(chromiumUnavailable, gatewayUnavailable), async () => {
      const gw = new Gateway();
      cleanups.push(() => gw.stop('SIGKILL'));
      await gw.start();
      const restaurant = crypto.randomUUID();

      // The gateway serves the board and the client with usable types.
      const served = [
        ['/', /text\/html/, '../../../web/board/index.html'],
        ['/board.js', /javascript/, '../../../web/board/board.js'],
        ['/board.css', /text\/css/, '../../../web/board/board.css'],
        ['/client/orders-live.js', /javascript/, '../orders-live.js'],
      ];
      for (const [p, type, file] of served) {
        const res = await fetch(gw.httpUrl + p);
        assert.equal(res.status, 200, `GET ${p}`);
        assert.match(res.headers.get('content-type') ?? '', type, `GET ${p} content-type`);
        const repoCopy = readFileSync(fileURLToPath(new URL(file, import.meta.url)), 'utf8');
        if (!BOARD_FROM_REPO) {
          assert.ok(await res.text() === repoCopy, `GET ${p} is not the repo's ${file.replace(/^(\.\.\/)+/, '')} (gateway built before it changed? rebuild, or set BOARD_FROM_REPO=1)`);
        }
      }

      // A page fulfilled by page.route() counts as non-local for chromium's
      // local network access checks, which would then block ws://127.0.0.1.
      const { page, errors, screenshot } = await browser(
        BOARD_FROM_REPO ? { extraArgs: ['--disable-features=LocalNetworkAccessChecks'] } : {});
      if (BOARD_FROM_REPO) {
        // Working-tree board files against an older binary (development only).
        for (const [p, , file] of served) {
          await page.route((url) => url.port === String(gw.port) && url.pathname === p, (route) => route.fulfill({
            body: readFileSync(fileURLToPath(new URL(file, import.meta.url))),
            contentType: p === '/' ? 'text/html' : p.endsWith('.css') ? 'text/css' : 'text/javascript',
          }));
        }
      }
      const b = board(page);
      await page.goto(`${gw.httpUrl}/?token=${gw.token(restaurant)}`);
      await b.waitState('live');

      const o1 = makeOrder({ restaurant_id: restaurant, customer_name: 'First guest' });
      await gw.publishOk('order_created', o1);
      await b.cardIn('pending', o1.id).waitFor({ timeout: 10000 });

      await gw.publishOk('order_status_changed', nextVersion(o1, { order_status: 'confirmed' }), { previous_status: 'pending' });
      await b.cardIn('confirmed', o1.id).waitFor({ timeout: 10000 });
      assert.equal(await b.count('pending'), 0);
      assert.equal(await b.count('confirmed'), 1);

      await gw.stop('SIGTERM');
      await b.waitState('reconnecting');
      await gw.start();
      await b.waitState('live', 30000);

      const o2 = makeOrder({ restaurant_id: restaurant, table_number: 4, customer_name: 'After restart' });
      const o3 = makeOrder({ restaurant_id: restaurant, table_number: 9, customer_name: 'After restart too' });
      await gw.publishOk('order_created', o2);
      await gw.publishOk('order_created', o3);
      await b.cardIn('pending', o2.id).waitFor({ timeout: 10000 });
      await b.cardIn('pending', o3.id).waitFor({ timeout: 10000 });
      await page.waitForTimeout(500);

      const ids = await b.allCardIds();
      assert.equal(new Set(ids).size, ids.length, `duplicate cards: ${ids}`);
      assert.ok(ids.includes(o2.id) && ids.includes(o3.id));
      assert.equal(await b.count('pending'), 2);
      await page.waitForSelector(`[data-order-id="${o3.id}"].newest`, { timeout: 1500 });
      assert.equal(await page.locator('.card.newest').count(), 1);
      await waitFor(async () => (await b.state()) === 'live');
      await screenshot('board.png');
      assert.deepEqual(errors, []);
    });
});

/** A busy service: long numbers and names, a late order, a column longer than the screen. */
function kitchenRush() {
  const ago = (min) => new Date(Date.now() - min * 60000).toISOString();
  const item = (name, quantity = 1) => ({ id: crypto.randomUUID(), menu_item_id: crypto.randomUUID(), quantity, unit_price: 12.5, ...(name ? { name } : {}) });
  const list = [];
  let n = 40;
  const add = (status, extra) => list.push(makeOrder({ order_number: `ORD-261129-${String(n++).padStart(4, '0')}`, order_status: status, estimated_time: 90, ...extra }));
  add('pending', { created_at: ago(47), estimated_time: 15, table_number: 120, total_price: 1234.5,
    customer_name: 'Maximilian Alexander Featherstonehaugh-Smythe',
    items: [item('Margherita pizza with extra buffalo mozzarella', 12), item(null, 2), item('Supercalifragilisticexpialidocious-burger-deluxe')] });
  for (let i = 0; i < 7; i++) add('pending', { created_at: ago(20 - i), items: [item('Caesar salad', 2), item('Sparkling water 0.75 l', 3)] });
  add('confirmed', { created_at: ago(12), table_number: null, items: [item('Tiramisu', 4)] });
  add('confirmed', { created_at: ago(11) });
  add('preparing', { created_at: ago(30), items: Array.from({ length: 7 }, (_, i) => item(`Tapas plate number ${i + 1} with aioli`, i + 1)) });
  add('preparing', { created_at: ago(25), order_number: 'WEB-ORDER-2026-11-29-000123456' });
  add('ready', { created_at: ago(35), customer_name: '' });
  add('served', { created_at: ago(55), total_price: 98765.43 });
  return list;
}

/**
 * Runs in the page: everything that makes a layout unusable.
 * - the document wider (or taller) than the viewport;
 * - any element whose content is larger than its box (clipped or spilling),
 *   except vertical scrolling of the scroll containers (the columns);
 * - text boxes inside a card (and the top bar, tabs, column headers) that
 *   intersect each other or stick out of their container.
 */
function layoutProblems() {
  const problems = [];
  const name = (el) => `${el.tagName.toLowerCase()}${el.id ? `#${el.id}` : ''}${[...el.classList].map((c) => `.${c}`).join('')}${el.dataset.orderId ? `[${el.closest('[data-order-id]').querySelector('.order-number')?.textContent}]` : ''}`;
  const de = document.documentElement;
  if (de.scrollWidth > innerWidth) problems.push(`document is ${de.scrollWidth}px wide in a ${innerWidth}px viewport`);
  if (de.scrollHeight > innerHeight) problems.push(`document is ${de.scrollHeight}px tall in a ${innerHeight}px viewport`);
  for (const el of document.body.querySelectorAll('*')) {
    const cs = getComputedStyle(el);
    if (cs.display === 'none' || cs.display === 'inline' || el.getClientRects().length === 0) continue;
    const scrollsY = cs.overflowY === 'auto' || cs.overflowY === 'scroll';
    if (el.scrollWidth > el.clientWidth + 1) problems.push(`${name(el)}: content ${el.scrollWidth}px wide in ${el.clientWidth}px`);
    if (!scrollsY && el.scrollHeight > el.clientHeight + 1) problems.push(`${name(el)}: content ${el.scrollHeight}px tall in ${el.clientHeight}px`);
  }
  const textRects = (root) => {
    const out = [];
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (!node.textContent.trim() || node.parentElement.getClientRects().length === 0) continue;
      const range = document.createRange();
      range.selectNodeContents(node);
      for (const r of range.getClientRects()) if (r.width > 0 && r.height > 0) out.push({ node, r, text: node.textContent.trim() });
    }
    return out;
  };
  let checkedCards = 0;
  for (const box of document.querySelectorAll('.card, .topbar, .tabs, .column h2')) {
    if (box.getClientRects().length === 0) continue;
    if (box.classList.contains('card')) checkedCards += 1;
    const outer = box.getBoundingClientRect();
    const rects = textRects(box);
    for (const { r, text } of rects) {
      if (r.left < outer.left - 1 || r.right > outer.right + 1 || r.top < outer.top - 1 || r.bottom > outer.bottom + 1) {
        problems.push(`${name(box)}: text "${text}" sticks out of its box`);
      }
    }
    for (let i = 0; i < rects.length; i++) {
      for (let j = i + 1; j < rects.length; j++) {
        if (rects[i].node === rects[j].node) continue;
        const a = rects[i].r;
        const c = rects[j].r;
        const w = Math.min(a.right, c.right) - Math.max(a.left, c.left);
        const h = Math.min(a.bottom, c.bottom) - Math.max(a.top, c.top);
        if (w > 1 && h > 1) problems.push(`${name(box)}: "${rects[i].text}" overlaps "${rects[j].text}"`);
      }
    }
  }
  return { problems, checkedCards };
}

/** Replaces Web Audio with a counter of chimes (the first tone of each). */
function fakeAudio() {
  window.__chimes = 0;
  class FakeAudioContext {
    constructor() { this.state = 'suspended'; this.currentTime = 0; this.destination = {}; }
    resume() { this.state = 'running'; return Promise.resolve(); }
    createOscillator() {
      return {
        type: 'sine', frequency: { value: 0 },
        connect: (n) => n,
        start() { if (this.frequency.value === 880) window.__chimes += 1; },
        stop() {},
      };
    }
    createGain() { return { gain: { setValueAtTime() {}, exponentialRampToValueAtTime() {} }, connect: (n) => n }; }
  }
  window.AudioContext = FakeAudioContext;
}
