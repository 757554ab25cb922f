// Type declarations for orders-live.js (the orders-gateway WebSocket client).
// The wire shapes follow docs/PROTOCOL.md and docs/asyncapi.yaml.

/** Order statuses of the platform. Unknown strings are possible from foreign schemas. */
export type OrderStatus =
  | 'pending'
  | 'confirmed'
  | 'preparing'
  | 'ready'
  | 'served'
  | 'completed'
  | 'cancelled';

export interface OrderItem {
  id: string;
  menu_item_id: string | null;
  quantity: number | null;
  unit_price: number | null;
  /** From the optional menu_items table; absent when the gateway has no name. */
  name?: string | null;
}

/** A full order with its items; `id` + `updated_at` is its version. */
export interface Order {
  id: string;
  order_number: string | null;
  restaurant_id: string;
  table_number: number | null;
  customer_name: string | null;
  customer_phone: string | null;
  order_status: OrderStatus | (string & {});
  payment_status: string | null;
  payment_method: string | null;
  /** A JSON number (numeric(10,2) in the database). */
  total_price: number | null;
  /** Minutes. */
  estimated_time: number | null;
  /** RFC 3339. */
  created_at: string | null;
  /** RFC 3339; increases with every change of the order. */
  updated_at: string;
  items: OrderItem[];
}

export interface ConnectionEstablished {
  type: 'connection_established';
  restaurant_id: string;
  message: string;
  connection_id: string;
  instance_id: string;
  heartbeat_interval_ms: number;
  resumed: boolean;
}

export interface SnapshotMessage {
  type: 'snapshot';
  orders: Order[];
  last_event_id: string | null;
}

interface OrderEventBase {
  /** Opaque; increases within a restaurant. Absent for raw Redis publishes. */
  event_id?: string;
  order: Order;
  timestamp: string;
}
export interface OrderCreated extends OrderEventBase { type: 'order_created' }
export interface OrderUpdated extends OrderEventBase { type: 'order_updated' }
export interface OrderStatusChanged extends OrderEventBase {
  type: 'order_status_changed';
  previous_status?: OrderStatus | (string & {}) | null;
}
/** An open order was deleted from the database: it leaves the board. */
export interface OrderDeleted {
  type: 'order_deleted';
  event_id?: string;
  order: { id: string; restaurant_id: string };
  timestamp: string;
}
/** An event that changed `client.orders`. */
export type OrderEvent = OrderCreated | OrderUpdated | OrderStatusChanged | OrderDeleted;

export interface ResyncRequired { type: 'resync_required'; reason: string }
export interface Pong { type: 'pong'; timestamp: string }
export interface ErrorMessage { type: 'error'; code: string; message: string }

/** Every message the server sends. */
export type ServerMessage =
  | ConnectionEstablished
  | SnapshotMessage
  | OrderEvent
  | ResyncRequired
  | Pong
  | ErrorMessage;

export type ClientState = 'idle' | 'connecting' | 'live' | 'reconnecting' | 'offline' | 'stopped';

/** What onStatus receives with each state. */
export interface StatusDetail {
  /** WebSocket close code that caused the change (4401, 4403, 1001, 1006, …), null for network/token errors. */
  code?: number | null;
  reason?: string;
  /** 'reconnecting': delay before the next attempt. */
  delayMs?: number;
  /** 'reconnecting': attempt number since the last stable connection. */
  attempt?: number;
  /** 'live': the connection_established message. */
  connection?: ConnectionEstablished;
}

export interface OrdersInfo {
  reason: 'snapshot' | 'event';
  event?: OrderEvent;
}

/** The WebSocket constructor the client uses (browser WebSocket, or `ws` in Node). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: any }) => any) | null;
  onerror: ((ev: any) => any) | null;
  onclose: ((ev: { code: number; reason: string }) => any) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface OrdersLiveOptions {
  /** ws: or wss: URL of /api/ws/orders/live (relative URLs resolve against location in browsers). */
  url: string;
  /** Called on first connect, after a 4401 close and before the current token expires. */
  getToken: () => string | Promise<string>;
  /** Sent as restaurant_id (users of several restaurants). */
  restaurantId?: string;
  /** Initial resume cursor. */
  lastEventId?: string;
  /** Default: globalThis.WebSocket. Node 20: pass the `ws` package's WebSocket. */
  WebSocket?: WebSocketConstructor | (abstract new (...args: any[]) => any);
  backoff?: { baseMs?: number; maxMs?: number; stableMs?: number };
  /** App-level ping period, 0 disables. Default 20000. */
  pingIntervalMs?: number;
  /** No message this long after a ping: the socket is dead. Default 10000. */
  pongTimeoutMs?: number;
  /** Consecutive 4401 closes before going offline. Default 3. */
  maxAuthFailures?: number;
  /** The open orders (id → order) after every change. The same Map instance until the next snapshot. */
  onOrders?: (orders: ReadonlyMap<string, Order>, info: OrdersInfo) => void;
  /** Each applied order event (duplicates and stale versions are not applied). */
  onEvent?: (evt: OrderEvent) => void;
  onStatus?: (state: ClientState, detail: StatusDetail) => void;
  /** Every server message, raw. */
  onMessage?: (msg: ServerMessage) => void;
  /** For tests: replaces Math.random in the backoff. */
  random?: () => number;
}

export declare class OrdersLive {
  constructor(opts: OrdersLiveOptions);
  readonly url: string;
  readonly restaurantId: string | null;
  /** Open orders, id → order. */
  readonly orders: Map<string, Order>;
  readonly state: ClientState;
  /** The resume cursor: event_id of the last applied event or snapshot. */
  readonly lastEventId: string | null;
  readonly lastClose: { code: number; reason: string } | null;
  readonly connection: ConnectionEstablished | null;
  readonly awaitingSnapshot: boolean;
  /** Starts (or restarts after stop/offline). */
  start(): this;
  /** Closes the socket and stops reconnecting; the map is kept. */
  stop(): void;
  /** Sends {"type":"ping"}; false when not connected. */
  ping(): boolean;
}

export declare const CLOSED_STATUSES: ReadonlySet<string>;
export declare const CLIENT_DEAD_SOCKET_CODE: 4000;
export declare function backoffDelay(
  attempt: number,
  opts?: { baseMs?: number; maxMs?: number },
  random?: () => number,
): number;
export declare function compareEventIds(a: string, b: string): number;
export declare function parseTimestamp(ts: unknown): [number, number] | null;
export declare function compareTimestamps(a: unknown, b: unknown): number | null;
export declare function jwtExpiry(token: string): number | null;
export declare function refreshDelay(remainingMs: number, leadMs?: number): number;

export default OrdersLive;
