// Unit tests of orders-live.js against a fake in-process server.
import { test, describe, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import {
  OrdersLive, backoffDelay, compareTimestamps, compareEventIds, jwtExpiry, refreshDelay,
} from '../orders-live.js';
import { startFakeServer } from './helpers/fake-server.mjs';
import { waitFor, sleep, makeOrder, nextVersion } from './helpers/util.mjs';
import { mintJwt } from './helpers/jwt.mjs';

const cleanups = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()();
});

async function setup(opts = {}) {
  const server = await startFakeServer();
  const statuses = [];
  const events = [];
  let tokenCalls = 0;
  const client = new OrdersLive({
    url: server.url,
    WebSocket,
    getToken: async () => { tokenCalls += 1; return `token-${tokenCalls}`; },
    backoff: { baseMs: 20, maxMs: 200 },
    random: () => 1,
    pingIntervalMs: 0,
    onStatus: (state, detail) => statuses.push({ state, ...detail }),
    onEvent: (evt) => events.push(evt),
    ...opts,
  });
  cleanups.push(async () => { client.stop(); await server.close(); });
  return { server, client, statuses, events, tokenCalls: () => tokenCalls };
}

const ev = (type, order, event_id, extra = {}) => ({ type, event_id, order, timestamp: new Date().toISOString(), ...extra });
const ids = (client) => [...client.orders.keys()].sort();

describe('pure helpers', () => {
  test('backoff is full jitter under an exponential cap', () => {
    const b = { baseMs: 100, maxMs: 1000 };
    assert.deepEqual([0, 1, 2, 3, 4, 5].map((n) => backoffDelay(n, b, () => 0.999999)), [99, 199, 399, 799, 999, 999]);
    assert.equal(backoffDelay(3, b, () => 0), 0);
    for (let i = 0; i < 100; i++) {
      const d = backoffDelay(2, b);
      assert.ok(d >= 0 && d < 400);
    }
  });

  test('timestamps compare with microsecond precision and any offset', () => {
    assert.ok(compareTimestamps('2024-01-15T10:30:45.123457Z', '2024-01-15T10:30:45.123456Z') > 0);
    assert.ok(compareTimestamps('2024-01-15T10:30:45.1Z', '2024-01-15T10:30:45.099999Z') > 0);
    assert.equal(compareTimestamps('2024-01-15T10:30:45Z', '2024-01-15T12:30:45+02:00'), 0);
    assert.equal(compareTimestamps('garbage', '2024-01-15T10:30:45Z'), null);
  });

  test('event ids compare as fixed-width strings', () => {
    assert.ok(compareEventIds('0000000010', '0000000009') > 0);
    assert.equal(compareEventIds('0000000010', '0000000010'), 0);
  });

  test('jwt exp is read without verification; refresh 30 s early or at half-life', () => {
    assert.equal(jwtExpiry(mintJwt({ exp: 1234567890 }, 's')), 1234567890);
    assert.equal(jwtExpiry('not-a-jwt'), null);
    assert.equal(jwtExpiry(mintJwt({ sub: 'x' }, 's')), null);
    assert.equal(refreshDelay(3600_000), 3570_000);
    assert.equal(refreshDelay(40_000), 20_000);
    assert.equal(refreshDelay(100), 1000);
  });
});

describe('OrdersLive against a fake server', () => {
  test('connects with token and restaurant_id, goes live, applies the snapshot', async () => {
    const { server, client, statuses } = await setup({ restaurantId: 'r-1' });
    const onOrders = [];
    client.onOrders = (m, info) => onOrders.push([[...m.keys()], info.reason]);
    client.start();
    assert.equal(client.state, 'connecting');
    const conn = await server.nextConnection();
    assert.equal(conn.path, '/api/ws/orders/live');
    assert.equal(conn.query.token, 'token-1');
    assert.equal(conn.query.restaurant_id, 'r-1');
    assert.equal(conn.query.last_event_id, undefined);
    conn.establish();
    const a = makeOrder();
    const b = makeOrder({ order_status: 'ready' });
    const done = makeOrder({ order_status: 'completed' });
    conn.send({ type: 'snapshot', orders: [a, b, done], last_event_id: '0000000005' });
    await waitFor(() => client.orders.size === 2, { message: 'snapshot' });
    assert.equal(client.state, 'live');
    assert.deepEqual(ids(client), [a.id, b.id].sort());
    assert.equal(client.lastEventId, '0000000005');
    assert.deepEqual(statuses.map((s) => s.state), ['connecting', 'live']);
    assert.equal(onOrders.at(-1)[1], 'snapshot');
  });

  test('applies events, drops duplicates and stale versions, removes closed orders', async () => {
    const { server, client, events } = await setup();
    client.start();
    const conn = await server.nextConnection();
    conn.establish();
    const a = makeOrder();
    const a2 = nextVersion(a, { order_status: 'confirmed' });
    const a3 = nextVersion(a2, { order_status: 'completed' });
    const b = makeOrder();
    conn.send(ev('order_created', a, '0000000001'));
    conn.send(ev('order_created', a, '0000000001')); // duplicate delivery
    conn.send(ev('order_status_changed', a2, '0000000002', { previous_status: 'pending' }));
    conn.send(ev('order_updated', a, '0000000003')); // newer id but older version
    conn.send(ev('order_created', b)); // raw Redis event: no event_id
    await waitFor(() => client.orders.size === 2, { message: 'two orders' });
    assert.equal(client.orders.get(a.id).order_status, 'confirmed');
    assert.equal(client.lastEventId, '0000000003', 'an event without event_id does not move the cursor');
    assert.deepEqual(events.map((e) => e.event_id ?? null), ['0000000001', '0000000002', null]);

    conn.send(ev('order_status_changed', a3, '0000000004', { previous_status: 'confirmed' }));
    await waitFor(() => !client.orders.has(a.id), { message: 'completed order removed' });
    // A late event for the completed order must not bring it back.
    conn.send(ev('order_updated', a2));
    conn.send(ev('order_updated', nextVersion(b, { customer_name: 'Renamed' }), '0000000005'));
    await waitFor(() => client.orders.get(b.id).customer_name === 'Renamed', { message: 'b renamed' });
    assert.deepEqual(ids(client), [b.id]);
    assert.equal(client.lastEventId, '0000000005');
  });

  test('reconnects after an abrupt close and resumes from the last applied event', async () => {
    const { server, client, statuses } = await setup();
    client.start();
    let conn = await server.nextConnection();
    conn.establish();
    const a = makeOrder();
    const b = makeOrder();
    conn.send(ev('order_created', a, '0000000007'));
    await waitFor(() => client.orders.size === 1);
    conn.terminate(); // 1006
    conn = await server.nextConnection();
    assert.equal(conn.query.last_event_id, '0000000007');
    assert.equal(conn.query.token, 'token-1', 'a still-valid token is reused');
    const rec = statuses.find((s) => s.state === 'reconnecting');
    assert.equal(rec.code, 1006);
    conn.establish({ resumed: true });
    // A replay that overlaps what the client already has.
    conn.send(ev('order_created', a, '0000000007'));
    conn.send(ev('order_created', b, '0000000008'));
    await waitFor(() => client.orders.size === 2);
    assert.equal(client.lastEventId, '0000000008');
    assert.equal(client.state, 'live');
  });

  test('1001, 4408 and 4429 closes reconnect', async () => {
    const { server, client } = await setup();
    client.start();
    for (const code of [1001, 4408, 4429]) {
      const conn = await server.nextConnection();
      conn.establish();
      await waitFor(() => client.state === 'live');
      conn.close(code, 'bye');
    }
    const conn = await server.nextConnection();
    conn.establish();
    await waitFor(() => client.state === 'live');
    assert.equal(server.connections.length, 4);
  });

  test('resync_required forgets the cursor and the following snapshot replaces the map', async () => {
    const { server, client } = await setup();
    client.start();
    let conn = await server.nextConnection();
    conn.establish();
    const a = makeOrder();
    const b = makeOrder();
    conn.send(ev('order_created', a, '0000000009'));
    await waitFor(() => client.orders.size === 1);
    conn.terminate();

    conn = await server.nextConnection();
    assert.equal(conn.query.last_event_id, '0000000009');
    conn.establish({ resumed: false });
    conn.send({ type: 'resync_required', reason: 'history lost' });
    await waitFor(() => client.awaitingSnapshot);
    assert.equal(client.lastEventId, null);
    // History restarted at lower ids; the snapshot is the truth.
    conn.send({ type: 'snapshot', orders: [b], last_event_id: '0000000002' });
    await waitFor(() => client.orders.has(b.id) && !client.orders.has(a.id));
    const c = makeOrder();
    conn.send(ev('order_created', b, '0000000002')); // covered by the snapshot
    conn.send(ev('order_created', c, '0000000003'));
    await waitFor(() => client.orders.size === 2);
    assert.deepEqual(ids(client), [b.id, c.id].sort());
    assert.equal(client.awaitingSnapshot, false);

    conn.terminate();
    conn = await server.nextConnection();
    assert.equal(conn.query.last_event_id, '0000000003');
  });

  test('a version equal to or older than one already seen is already seen, across snapshots (issue 9 hole 7)', async () => {
    const { server, client, events } = await setup();
    client.start();
    let conn = await server.nextConnection();
    conn.establish();
    const a = makeOrder();
    const a2 = nextVersion(a, { order_status: 'preparing' });
    const b = makeOrder();
    const b2 = nextVersion(b, { order_status: 'confirmed' });
    conn.send(ev('order_created', a, '0000000001'));
    conn.send(ev('order_status_changed', a2, '0000000002', { previous_status: 'pending' }));
    conn.send(ev('order_created', b, '0000000003'));
    conn.send(ev('order_status_changed', b2, '0000000004', { previous_status: 'pending' }));
    await waitFor(() => events.length === 4, { message: 'four events applied' });
    // The same version again under a new id (the server lost its dedup state).
    conn.send(ev('order_status_changed', a2, '0000000005', { previous_status: 'pending' }));
    await sleep(50);
    assert.equal(events.length, 4, 'an equal version is not applied twice');

    // Resync: the snapshot lags b (still v1) and no longer has a (closed since).
    conn.terminate();
    conn = await server.nextConnection();
    conn.establish({ resumed: false });
    conn.send({ type: 'resync_required', reason: 'history lost' });
    conn.send({ type: 'snapshot', orders: [b], last_event_id: '0000000001' });
    await waitFor(() => !client.orders.has(a.id), { message: 'snapshot applied' });
    assert.equal(client.orders.get(b.id).updated_at, b2.updated_at, 'the snapshot does not roll b back to an older version');
    // A lagging poller delivers versions the client has already had, with new ids.
    conn.send(ev('order_status_changed', a2, '0000000002', { previous_status: 'pending' }));
    conn.send(ev('order_status_changed', b2, '0000000003', { previous_status: 'pending' }));
    conn.send(ev('order_created', b, '0000000004'));
    const c = makeOrder();
    conn.send(ev('order_created', c, '0000000005'));
    await waitFor(() => client.orders.has(c.id), { message: 'new order after the replays' });
    assert.deepEqual(ids(client), [b.id, c.id].sort(), 'a closed order does not come back with a version already seen');
    assert.deepEqual(events.slice(4).map((e) => e.order.id), [c.id], 'only the new order is applied');
    assert.equal(client.lastEventId, '0000000005');
  });

  test('order_deleted takes an order off for good', async () => {
    const { server, client, events } = await setup();
    client.start();
    const conn = await server.nextConnection();
    conn.establish();
    const a = makeOrder();
    conn.send(ev('order_created', a, '0000000001'));
    await waitFor(() => client.orders.has(a.id), { message: 'created' });
    conn.send({ type: 'order_deleted', event_id: '0000000002', order: { id: a.id, restaurant_id: a.restaurant_id }, timestamp: a.updated_at });
    await waitFor(() => !client.orders.has(a.id), { message: 'deleted' });
    // A late replay of a version it had does not bring it back.
    conn.send(ev('order_updated', nextVersion(a, { order_status: 'ready' }), '0000000003'));
    await sleep(50);
    assert.equal(client.orders.has(a.id), false);
    assert.equal(events.length, 2);
  });

  test('a connection that is not resumed does not filter the new history with the old cursor', async () => {
    const { server, client } = await setup();
    client.start();
    let conn = await server.nextConnection();
    conn.establish();
    conn.send(ev('order_created', makeOrder(), '0000000050'));
    await waitFor(() => client.orders.size === 1);
    conn.terminate();
    conn = await server.nextConnection();
    assert.equal(conn.query.last_event_id, '0000000050');
    conn.establish({ resumed: false }); // e.g. a restarted gateway without a database
    const b = makeOrder();
    conn.send(ev('order_created', b, '0000000001'));
    await waitFor(() => client.orders.has(b.id), { message: 'event from the new history' });
    assert.equal(client.lastEventId, '0000000001');
  });

  test('reconnect delays grow exponentially with full jitter up to maxMs', async () => {
    const { server, client, statuses } = await setup({ backoff: { baseMs: 10, maxMs: 80 }, random: () => 0.999 });
    client.start();
    for (let i = 0; i < 6; i++) (await server.nextConnection()).close(4429, 'too many');
    await server.nextConnection();
    const delays = statuses.filter((s) => s.state === 'reconnecting').map((s) => s.delayMs);
    assert.deepEqual(delays, [9, 19, 39, 79, 79, 79]);
  });

  test('the backoff resets once a connection has stayed up', async () => {
    const { server, client, statuses } = await setup({ backoff: { baseMs: 10, maxMs: 1000, stableMs: 50 }, random: () => 0.999 });
    client.start();
    for (let i = 0; i < 3; i++) (await server.nextConnection()).close(1011, 'oops');
    const conn = await server.nextConnection();
    conn.establish();
    await sleep(80);
    conn.close(1001, 'going away');
    await server.nextConnection();
    const delays = statuses.filter((s) => s.state === 'reconnecting').map((s) => s.delayMs);
    assert.deepEqual(delays, [9, 19, 39, 9]);
  });

  test('network errors (nothing listening) are retried', async () => {
    const server = await startFakeServer();
    const { port } = server;
    await server.close();
    const statuses = [];
    const client = new OrdersLive({
      url: `ws://127.0.0.1:${port}/api/ws/orders/live`, WebSocket, getToken: () => 't',
      backoff: { baseMs: 5, maxMs: 20 }, pingIntervalMs: 0,
      onStatus: (state, d) => statuses.push({ state, ...d }),
    });
    cleanups.push(async () => client.stop());
    client.start();
    await waitFor(() => statuses.filter((s) => s.state === 'reconnecting').length >= 3);
    assert.equal(statuses.at(-1).code, 1006);
  });

  test('4401 asks getToken() again and reconnects with the new token', async () => {
    const { server, client, tokenCalls } = await setup();
    client.start();
    let conn = await server.nextConnection();
    assert.equal(conn.query.token, 'token-1');
    conn.close(4401, 'token expired');
    conn = await server.nextConnection();
    assert.equal(conn.query.token, 'token-2');
    assert.equal(tokenCalls(), 2);
    conn.establish();
    await waitFor(() => client.state === 'live');
  });

  test('repeated 4401 gives up: offline with the reason', async () => {
    const { server, client, statuses } = await setup({ maxAuthFailures: 3 });
    client.start();
    for (let i = 0; i < 3; i++) (await server.nextConnection()).close(4401, 'bad signature');
    await waitFor(() => client.state === 'offline');
    assert.deepEqual(statuses.at(-1), { state: 'offline', code: 4401, reason: 'bad signature' });
    await sleep(100);
    assert.equal(server.connections.length, 3);
  });

  for (const code of [4403, 4400]) {
    test(`${code} stops: offline, reason surfaced, no reconnect`, async () => {
      const { server, client, statuses } = await setup();
      client.start();
      const conn = await server.nextConnection();
      conn.close(code, 'not yours');
      await waitFor(() => client.state === 'offline');
      assert.deepEqual(statuses.at(-1), { state: 'offline', code, reason: 'not yours' });
      assert.deepEqual(client.lastClose, { code, reason: 'not yours' });
      await sleep(150);
      assert.equal(server.connections.length, 1);
    });
  }

  test('sends an auth message with a fresh token before the current one expires', async () => {
    const secret = 'k';
    let n = 0;
    const { server, client } = await setup({
      getToken: async () => { n += 1; return mintJwt({ sub: 'u', n, exp: Math.floor(Date.now() / 1000) + 3 }, secret); },
    });
    client.start();
    const conn = await server.nextConnection();
    conn.establish();
    const msg = await conn.nextMessage(4000);
    assert.equal(msg.type, 'auth');
    assert.equal(JSON.parse(Buffer.from(msg.token.split('.')[1], 'base64url')).n, 2);
    assert.equal(server.connections.length, 1, 'refreshed in place, no reconnect');
  });

  test('a socket that stops answering pings is abandoned and replaced', async () => {
    const { server, client, statuses } = await setup({ pingIntervalMs: 50, pongTimeoutMs: 250 });
    client.start();
    const conn = await server.nextConnection();
    conn.establish();
    assert.equal((await conn.nextMessage()).type, 'ping');
    // no pong: the client gives up on this socket
    const second = await server.nextConnection();
    assert.ok(statuses.some((s) => s.state === 'reconnecting' && s.reason === 'pong timeout'));
    // A server that answers keeps the socket.
    second.ws.on('message', () => second.send({ type: 'pong', timestamp: new Date().toISOString() }));
    second.establish();
    await sleep(700);
    assert.equal(server.connections.length, 2);
    assert.equal(client.state, 'live');
  });

  test('getToken failures are retried with backoff', async () => {
    let fail = 2;
    const { server, client, statuses } = await setup({
      getToken: async () => { if (fail-- > 0) throw new Error('auth service down'); return 'ok'; },
    });
    client.start();
    const conn = await server.nextConnection();
    assert.equal(conn.query.token, 'ok');
    assert.equal(statuses.filter((s) => s.state === 'reconnecting').length, 2);
    assert.match(statuses[1].reason, /auth service down/);
  });

  test('stop() closes the socket and does not reconnect', async () => {
    const { server, client, statuses } = await setup();
    client.start();
    const conn = await server.nextConnection();
    conn.establish();
    await waitFor(() => client.state === 'live');
    client.stop();
    const closed = await conn.closed;
    assert.equal(closed.code, 1000);
    await sleep(100);
    assert.equal(server.connections.length, 1);
    assert.equal(statuses.at(-1).state, 'stopped');
  });
});
