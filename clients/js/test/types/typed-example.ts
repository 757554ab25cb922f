// Type-checked by `tsc --noEmit` in the suite (test/package.test.mjs): how a
// dashboard developer uses the package, written against the published name.
// Every @ts-expect-error below must be an error, so the declarations are
// strict enough to catch these mistakes (and not `any`).
import WebSocket from 'ws';
import OrdersLiveDefault, {
  OrdersLive, compareTimestamps, backoffDelay, CLOSED_STATUSES,
  type ClientState, type Order, type OrderEvent, type ServerMessage, type StatusDetail,
} from 'orders-live';

const seen: string[] = [];

const live = new OrdersLive({
  url: 'wss://gateway.example/api/ws/orders/live',
  getToken: async () => 'jwt',
  WebSocket,
  restaurantId: '00000000-0000-4000-8000-000000000001',
  backoff: { baseMs: 500, maxMs: 30000 },
  onOrders: (orders, info) => {
    for (const order of orders.values()) {
      const total: number | null = order.total_price;
      const names: string[] = order.items.map((i) => i.name ?? 'Item');
      seen.push(`${order.order_number ?? order.id} ${total} ${names.join(', ')}`);
    }
    if (info.reason === 'event' && info.event) seen.push(info.event.type);
  },
  onEvent: (evt: OrderEvent) => {
    if (evt.type === 'order_status_changed') seen.push(String(evt.previous_status));
    // @ts-expect-error snapshots are not order events
    if (evt.type === 'snapshot') seen.push('never');
  },
  onStatus: (state: ClientState, detail: StatusDetail) => {
    if (state === 'offline') seen.push(`${detail.code}: ${detail.reason}`);
    // @ts-expect-error not a state the client reports
    if (state === 'online') seen.push('never');
  },
  onMessage: (msg: ServerMessage) => {
    if (msg.type === 'connection_established') seen.push(msg.instance_id, String(msg.heartbeat_interval_ms));
    if (msg.type === 'snapshot') seen.push(String(msg.orders.length));
  },
});

live.start().stop();
const first: Order | undefined = live.orders.values().next().value;
const cursor: string | null = live.lastEventId;
const delay: number = backoffDelay(3, { baseMs: 100 });
const newer: number | null = compareTimestamps('2024-01-01T00:00:00Z', first?.updated_at);
const closed: boolean = CLOSED_STATUSES.has('completed');
const same: typeof OrdersLive = OrdersLiveDefault;
void [cursor, delay, newer, closed, same];

// @ts-expect-error url and getToken are required
new OrdersLive({});
// @ts-expect-error getToken returns a token string
new OrdersLive({ url: 'ws://x', getToken: () => 42 });
// @ts-expect-error the map is the client's, not the application's
live.orders = new Map();
