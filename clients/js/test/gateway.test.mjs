// Integration tests: orders-live.js against the real gateway binary
// (embedded broker, no database). Skipped when the binary is missing,
// except under CI=true where that is a failure.
import { test, describe, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { OrdersLive, compareTimestamps } from '../orders-live.js';
import { Gateway, freePort, gatewayUnavailable } from './helpers/gateway.mjs';
import { waitFor, sleep, makeOrder, nextVersion } from './helpers/util.mjs';

let unavailable;
try {
  unavailable = gatewayUnavailable();
} catch (err) {
  unavailable = err;
}

const cleanups = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()();
});

async function startGateway(opts) {
  const gw = new Gateway(opts);
  cleanups.push(() => gw.stop('SIGKILL'));
  await gw.start();
  return gw;
}

/**
 * A WebSocket class that records every URL the client opens and can be
 * "unplugged": while gate.open is false, connections go to a dead port and
 * fail at once, as during a network outage.
 */
async function gatedWebSocket() {
  const gate = { open: true, deadPort: await freePort(), urls: [], sockets: [] };
  gate.WebSocket = class GatedWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(gate.open ? url : url.replace(/:\d+\//, `:${gate.deadPort}/`), protocols);
      if (gate.open) gate.urls.push(new URL(url));
      gate.sockets.push(this);
    }
  };
  return gate;
}

/** A client that records what it sees. */
function makeClient(gw, restaurantId, opts = {}) {
  const rec = { messages: [], statuses: [], events: [] };
  const client = new OrdersLive({
    url: gw.wsUrl,
    WebSocket,
    getToken: () => gw.token(restaurantId),
    backoff: { baseMs: 50, maxMs: 500 },
    onMessage: (m) => rec.messages.push(m),
    onStatus: (state, d) => rec.statuses.push({ state, ...d }),
    onEvent: (e) => rec.events.push(e),
    ...opts,
  });
  cleanups.push(async () => client.stop());
  return { client, rec };
}

const rid = () => crypto.randomUUID();
const messagesOfType = (rec, type) => rec.messages.filter((m) => m.type === type);

/** Asserts `got` is the published order (timestamps compared as instants). */
function assertSameOrder(got, sent) {
  for (const [k, v] of Object.entries(sent)) {
    if (k === 'created_at' || k === 'updated_at') {
      assert.equal(compareTimestamps(got[k], v), 0, `order.${k}: sent ${v}, got ${got[k]}`);
    } else {
      assert.deepEqual(got[k], v, `order.${k}`);
    }
  }
}

if (unavailable instanceof Error) {
  test('real gateway integration tests need the gateway binary', () => { throw unavailable; });
} else if (unavailable) {
  test('OrdersLive against the real gateway', { skip: unavailable }, () => {});
} else describe('OrdersLive against the real gateway', () => {
  test('receives created and status events as the contract shapes them', async () => {
    const gw = await startGateway();
    const restaurant = rid();
    const { client, rec } = makeClient(gw, restaurant);
    client.start();
    await waitFor(() => client.state === 'live', { message: 'live' });

    const est = messagesOfType(rec, 'connection_established')[0];
    assert.equal(est.restaurant_id, restaurant);
    assert.equal(typeof est.connection_id, 'string');
    assert.equal(typeof est.instance_id, 'string');
    assert.equal(typeof est.heartbeat_interval_ms, 'number');
    assert.equal(est.resumed, false);

    const order = makeOrder({ restaurant_id: restaurant });
    const id1 = await gw.publishOk('order_created', order);
    await waitFor(() => client.orders.has(order.id), { message: 'order_created delivered' });
    const created = rec.events.at(-1);
    assert.equal(created.type, 'order_created');
    assert.equal(created.event_id, id1);
    assert.ok(!Number.isNaN(Date.parse(created.timestamp)), `timestamp ${created.timestamp}`);
    assertSameOrder(created.order, order);
    assert.equal(client.lastEventId, id1);

    const confirmed = nextVersion(order, { order_status: 'confirmed' });
    const id2 = await gw.publishOk('order_status_changed', confirmed, { previous_status: 'pending' });
    assert.ok(id2 > id1, `event ids increase: ${id1} then ${id2}`);
    await waitFor(() => client.orders.get(order.id)?.order_status === 'confirmed', { message: 'status change delivered' });
    const changed = rec.events.at(-1);
    assert.equal(changed.type, 'order_status_changed');
    assert.equal(changed.previous_status, 'pending');
    assert.equal(changed.event_id, id2);

    // The same order version published again reaches dashboards once.
    const dup = await gw.publish('order_status_changed', confirmed, { previous_status: 'pending' });
    assert.equal(dup.status, 200, JSON.stringify(dup.body));
    assert.deepEqual(dup.body, { event_id: id2, duplicate: true });

    const done = nextVersion(confirmed, { order_status: 'completed' });
    const id3 = await gw.publishOk('order_status_changed', done, { previous_status: 'confirmed' });
    await waitFor(() => !client.orders.has(order.id), { message: 'completed order removed' });
    await sleep(200);
    assert.deepEqual(rec.events.map((e) => e.event_id), [id1, id2, id3]);
    assert.equal(messagesOfType(rec, 'order_status_changed').length, 2, 'duplicate publish not delivered');

    // Another restaurant's events never arrive.
    await gw.publishOk('order_created', makeOrder({ restaurant_id: rid() }));
    await sleep(200);
    assert.equal(rec.events.length, 3);
  });

  test('resumes after a dropped socket with exactly the missed events', async () => {
    const gw = await startGateway();
    const restaurant = rid();
    const gate = await gatedWebSocket();
    const { client, rec } = makeClient(gw, restaurant, { WebSocket: gate.WebSocket });
    client.start();
    await waitFor(() => client.state === 'live', { message: 'live' });
    const a = makeOrder({ restaurant_id: restaurant });
    const idA = await gw.publishOk('order_created', a);
    await waitFor(() => client.lastEventId === idA, { message: 'first event' });

    gate.open = false;
    gate.sockets.at(-1).terminate(); // network drop: no close frame
    await waitFor(() => client.state === 'reconnecting', { message: 'reconnecting' });

    const missed = [];
    const orders = [];
    for (let i = 0; i < 5; i++) {
      const o = i === 2 ? nextVersion(a, { order_status: 'preparing' }) : makeOrder({ restaurant_id: restaurant });
      orders.push(o);
      missed.push(await gw.publishOk(i === 2 ? 'order_status_changed' : 'order_created', o, i === 2 ? { previous_status: 'pending' } : {}));
    }
    const before = rec.messages.length;
    gate.open = true;
    await waitFor(() => client.lastEventId === missed.at(-1), { message: 'replayed events', timeout: 10000 });
    await sleep(300);

    const resumeUrl = gate.urls.at(-1);
    assert.equal(resumeUrl.searchParams.get('last_event_id'), idA);
    const after = rec.messages.slice(before);
    assert.equal(after[0].type, 'connection_established');
    assert.equal(after[0].resumed, true, 'connection_established.resumed');
    const replayed = after.slice(1);
    assert.deepEqual(replayed.map((m) => m.type), ['order_created', 'order_created', 'order_status_changed', 'order_created', 'order_created']);
    assert.deepEqual(replayed.map((m) => m.event_id), missed);
    assert.equal(client.orders.size, 5);
    assert.equal(client.orders.get(a.id).order_status, 'preparing');
  });

  test('reconnects by itself after the gateway restarts and applies the new process\'s events', async () => {
    const gw = await startGateway();
    const restaurant = rid();
    const gate = await gatedWebSocket();
    const { client, rec } = makeClient(gw, restaurant, { WebSocket: gate.WebSocket });
    client.start();
    await waitFor(() => client.state === 'live', { message: 'live' });
    const a = makeOrder({ restaurant_id: restaurant });
    const idA = await gw.publishOk('order_created', a);
    await waitFor(() => client.lastEventId === idA, { message: 'first event' });
    const firstInstance = client.connection.instance_id;

    await gw.stop('SIGKILL');
    await waitFor(() => client.state === 'reconnecting', { message: 'reconnecting' });
    const before = rec.messages.length;
    await gw.start(); // same port, same secrets, empty history
    await waitFor(() => client.state === 'live', { message: 'live again', timeout: 15000 });
    assert.notEqual(client.connection.instance_id, firstInstance, 'a new process');
    assert.equal(gate.urls.at(-1).searchParams.get('last_event_id'), idA, 'tried to resume');

    const b = makeOrder({ restaurant_id: restaurant });
    const idB = await gw.publishOk('order_created', b);
    const b2 = nextVersion(b, { order_status: 'ready' });
    const idB2 = await gw.publishOk('order_status_changed', b2, { previous_status: 'pending' });
    await waitFor(() => client.orders.get(b.id)?.order_status === 'ready', { message: 'new process events applied' });

    const after = rec.messages.slice(before);
    const est = after.find((m) => m.type === 'connection_established');
    assert.equal(est.resumed, false, 'history was lost with the process: cannot be resumed');
    assert.ok(after.some((m) => m.type === 'resync_required'), `resync_required expected, got ${after.map((m) => m.type).join(', ')}`);
    const snapshot = after.find((m) => m.type === 'snapshot');
    // Without a snapshot the client keeps what it had; a snapshot is the truth.
    assert.equal(client.orders.has(a.id), !snapshot);
    assert.equal(client.lastEventId, idB2);
    assert.deepEqual(rec.events.map((e) => e.event_id), [idA, idB, idB2]);
  });

  test('events published to a restarted gateway before the client is back: resync, then a consistent map', async (t) => {
    const gw = await startGateway();
    const restaurant = rid();
    const gate = await gatedWebSocket();
    const { client, rec } = makeClient(gw, restaurant, { WebSocket: gate.WebSocket });
    client.start();
    await waitFor(() => client.state === 'live', { message: 'live' });
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push(await gw.publishOk('order_created', makeOrder({ restaurant_id: restaurant })));
    await waitFor(() => client.lastEventId === ids.at(-1), { message: 'events' });

    gate.open = false;
    await gw.stop('SIGTERM'); // graceful: the client sees 1001
    await waitFor(() => client.state === 'reconnecting', { message: 'reconnecting' });
    assert.ok(rec.statuses.some((s) => s.code === 1001), `close codes seen: ${rec.statuses.map((s) => s.code)}`);
    await gw.start();
    const early = makeOrder({ restaurant_id: restaurant });
    await gw.publishOk('order_created', early);
    const before = rec.messages.length;
    gate.open = true;
    await waitFor(() => client.state === 'live', { message: 'live again', timeout: 15000 });
    assert.equal(gate.urls.at(-1).searchParams.get('last_event_id'), ids.at(-1));
    await waitFor(() => rec.messages.slice(before).some((m) => m.type === 'resync_required'), { message: 'resync_required' });
    await sleep(300);
    const after = rec.messages.slice(before);
    const snapshot = after.find((m) => m.type === 'snapshot');

    // Whatever the new process's ids look like, later events must apply.
    const late = makeOrder({ restaurant_id: restaurant });
    const idLate = await gw.publishOk('order_created', late);
    await waitFor(() => client.orders.has(late.id), { message: 'event after resync applied' });
    assert.equal(client.lastEventId, idLate);
    if (snapshot) {
      const expected = new Set([...snapshot.orders.map((o) => o.id), late.id]);
      assert.deepEqual(new Set(client.orders.keys()), expected);
    } else {
      assert.equal(client.orders.size, 4, 'three old orders kept, plus the new one');
    }
    t.diagnostic(`after restart: ${after.map((m) => m.type).join(', ')}; early order ${client.orders.has(early.id) ? 'shown' : 'not shown (no snapshot source without a database)'}`);
  });

  test('4401: a bad token is replaced through getToken(); a hopeless one ends offline', async () => {
    const gw = await startGateway();
    const restaurant = rid();
    let calls = 0;
    const { client } = makeClient(gw, restaurant, {
      getToken: () => (++calls === 1 ? gw.token(restaurant).slice(0, -4) + 'AAAA' : gw.token(restaurant)),
    });
    client.start();
    await waitFor(() => client.state === 'live', { message: 'live with the second token' });
    assert.equal(calls, 2);

    const { client: hopeless, rec } = makeClient(gw, restaurant, { getToken: () => 'not.a.jwt' });
    hopeless.start();
    await waitFor(() => hopeless.state === 'offline', { message: 'offline' });
    assert.equal(rec.statuses.at(-1).code, 4401);
    assert.equal(rec.statuses.filter((s) => s.code === 4401).length, 3);
  });

  test('the token is refreshed in place with an auth message before it expires', async () => {
    const gw = await startGateway({ env: { JWT_LEEWAY_SECONDS: '0' } });
    const restaurant = rid();
    const short = () => gw.token(restaurant, { ttlSeconds: 5, sub: '11111111-1111-4111-8111-111111111111' });
    const { client, rec } = makeClient(gw, restaurant, { getToken: short });
    // Control: a client whose provider keeps handing out the first token.
    const first = short();
    const { client: stale, rec: staleRec } = makeClient(gw, restaurant, { getToken: () => first, maxAuthFailures: 1 });
    client.start();
    stale.start();
    await waitFor(() => client.state === 'live' && stale.state === 'live', { message: 'both live' });
    await waitFor(() => stale.state === 'offline', { message: 'stale token closed', timeout: 12000 });
    assert.equal(staleRec.statuses.at(-1).code, 4401);
    await sleep(2000);
    assert.equal(client.state, 'live');
    assert.equal(messagesOfType(rec, 'connection_established').length, 1, 'one connection all along');
    assert.ok(!rec.messages.some((m) => m.type === 'error'), JSON.stringify(messagesOfType(rec, 'error')));
    const o = makeOrder({ restaurant_id: restaurant });
    await gw.publishOk('order_created', o);
    await waitFor(() => client.orders.has(o.id), { message: 'still receiving' });
  });
});
