// The machine-readable API documents: docs/asyncapi.yaml (WebSocket) is a
// valid AsyncAPI 3 document and the frames a real gateway sends match its
// message schemas; docs/openapi.json is what the gateway serves at
// /api/openapi.json. (The OpenAPI document itself is validated, and the HTTP
// API fuzzed against it with Schemathesis, by scripts/check-api.sh.)
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { Parser } from '@asyncapi/parser';
import Ajv from 'ajv';
import addFormats from 'ajv-formats';
import { Gateway, gatewayUnavailable } from './helpers/gateway.mjs';
import { AsyncQueue, makeOrder, nextVersion } from './helpers/util.mjs';

const docs = (name) => fileURLToPath(new URL(`../../../docs/${name}`, import.meta.url));
const ERROR = 0; // @asyncapi/parser diagnostic severity

async function parseAsyncApi() {
  const { document, diagnostics } = await new Parser().parse(readFileSync(docs('asyncapi.yaml'), 'utf8'));
  return { document, errors: diagnostics.filter((d) => d.severity === ERROR) };
}

/** type -> ajv validator of that message's payload. */
async function messageValidators() {
  const { document } = await parseAsyncApi();
  const ajv = new Ajv({ strict: false, allErrors: true });
  addFormats(ajv);
  const out = new Map();
  for (const message of document.allMessages()) {
    out.set(message.name(), ajv.compile(message.payload().json()));
  }
  return out;
}

describe('AsyncAPI document', () => {
  test('docs/asyncapi.yaml is a valid AsyncAPI 3 document', async () => {
    const { document, errors } = await parseAsyncApi();
    assert.deepEqual(errors.map((d) => `${d.path.join('.')}: ${d.message}`), []);
    assert.ok(document, 'parsed');
    assert.match(document.version(), /^3\./);
    const names = document.allMessages().all().map((m) => m.name()).sort();
    assert.deepEqual(names, ['auth', 'connection_established', 'error', 'order_created', 'order_deleted',
      'order_status_changed', 'order_updated', 'ping', 'pong', 'resync_required', 'snapshot']);
  });

  test('a schema violation is caught (the validators are not vacuous)', async () => {
    const v = await messageValidators();
    assert.equal(v.get('pong')({ type: 'pong', timestamp: 'yesterday' }), false);
    assert.equal(v.get('order_created')({ type: 'order_created', order: { id: 'x' }, timestamp: new Date().toISOString() }), false);
  });
});

const why = (() => { try { return gatewayUnavailable(); } catch (err) { return err; } })();

describe('the real gateway speaks its documents', { skip: why instanceof Error ? false : why }, () => {
  if (why instanceof Error) {
    test('needs the gateway binary', () => { throw why; });
    return;
  }
  let gw;
  before(async () => { gw = await new Gateway().start(); });
  after(async () => { await gw?.stop('SIGKILL'); });

  test('GET /api/openapi.json serves docs/openapi.json', async () => {
    const res = await fetch(`${gw.httpUrl}/api/openapi.json`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type'), /application\/json/);
    assert.deepEqual(await res.json(), JSON.parse(readFileSync(docs('openapi.json'), 'utf8')));
  });

  test('every frame the gateway sends matches its AsyncAPI message schema', async () => {
    const validators = await messageValidators();
    const restaurant = crypto.randomUUID();
    const ws = new WebSocket(`${gw.wsUrl}?token=${gw.token(restaurant)}`);
    const frames = new AsyncQueue();
    ws.on('message', (d) => frames.push(JSON.parse(d.toString())));
    const seen = [];
    const next = async (type) => {
      for (;;) {
        const msg = await frames.shift(10000, type);
        const validate = validators.get(msg.type);
        assert.ok(validate, `undocumented message type ${msg.type}`);
        assert.ok(validate(msg), `${msg.type} does not match docs/asyncapi.yaml: ${JSON.stringify(validate.errors)}\n${JSON.stringify(msg)}`);
        seen.push(msg.type);
        if (msg.type === type) return msg;
      }
    };
    await next('connection_established');
    const o = makeOrder({ restaurant_id: restaurant, items: [
      { id: crypto.randomUUID(), menu_item_id: crypto.randomUUID(), quantity: 1, unit_price: 9.5, name: 'Soup of the day' },
      { id: crypto.randomUUID(), menu_item_id: null, quantity: 2, unit_price: null },
    ] });
    await gw.publishOk('order_created', o);
    await next('order_created');
    const o2 = nextVersion(o, { order_status: 'preparing' });
    await gw.publishOk('order_status_changed', o2, { previous_status: 'pending' });
    await next('order_status_changed');
    await gw.publishOk('order_updated', nextVersion(o2, { customer_name: null, table_number: null, total_price: null }));
    await next('order_updated');
    ws.send(JSON.stringify({ type: 'ping' }));
    await next('pong');
    ws.send(JSON.stringify({ type: 'dance' }));
    await next('error');
    ws.close();

    // Resuming from a cursor the gateway cannot honour: resync_required, then a snapshot.
    const ws2 = new WebSocket(`${gw.wsUrl}?token=${gw.token(restaurant)}&last_event_id=0000000000001-000000000001`);
    ws2.on('message', (d) => frames.push(JSON.parse(d.toString())));
    const established = await next('connection_established');
    if (!established.resumed) await next('resync_required');
    ws2.close();
    assert.ok(seen.length >= 7, `frames checked: ${seen}`);
  });
});
