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
