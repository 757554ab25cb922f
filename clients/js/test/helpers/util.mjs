// Small helpers shared by the tests.
import { setTimeout as sleep } from 'node:timers/promises';

export { sleep };

/** Polls `fn` until it returns a truthy value (returned) or the timeout elapses. */
export async function waitFor(fn, { timeout = 5000, interval = 10, message = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      const detail = last instanceof Error ? `: ${last.message}` : '';
      throw new Error(`timed out after ${timeout} ms waiting for ${message}${detail}`);
    }
    await sleep(interval);
  }
}

/** An unbounded async queue: push() values, await shift(). */
export class AsyncQueue {
  constructor() {
    this.items = [];
    this.waiters = [];
  }
  push(v) {
    const w = this.waiters.shift();
    if (w) w.resolve(v);
    else this.items.push(v);
  }
  shift(timeout = 5000, what = 'item') {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve, reject) => {
      const w = { resolve: (v) => { clearTimeout(t); resolve(v); } };
      const t = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`timed out after ${timeout} ms waiting for ${what}`));
      }, timeout);
      this.waiters.push(w);
    });
  }
}

let seq = 0;
/** A full order per CONTRACT.md. */
export function makeOrder(overrides = {}) {
  seq += 1;
  const now = new Date().toISOString();
  return {
    id: crypto.randomUUID(),
    order_number: `A-${String(seq).padStart(4, '0')}`,
    restaurant_id: '00000000-0000-4000-8000-000000000001',
    table_number: (seq % 20) + 1,
    customer_name: `Guest ${seq}`,
    customer_phone: '+15550100',
    order_status: 'pending',
    payment_status: 'pending',
    payment_method: 'card',
    total_price: 23.5,
    estimated_time: 15,
    created_at: now,
    updated_at: now,
    items: [
      { id: crypto.randomUUID(), menu_item_id: crypto.randomUUID(), quantity: 2, unit_price: 8.75 },
      { id: crypto.randomUUID(), menu_item_id: crypto.randomUUID(), quantity: 1, unit_price: 6 },
    ],
    ...overrides,
  };
}

/** The same order one version later (updated_at strictly increases). */
export function nextVersion(order, changes = {}) {
  const prev = Date.parse(order.updated_at);
  const updated = new Date(Math.max(Date.now(), prev + 1)).toISOString();
  return { ...order, ...changes, updated_at: updated };
}
