// A React hook over orders-live: the open orders, sorted oldest first, and the
// connection state, re-rendered on every change. One client per mounted hook;
// it stops when the component unmounts or the url/restaurant changes.
import { useEffect, useRef, useState } from 'react';
import { OrdersLive, type ClientState, type Order, type StatusDetail } from 'orders-live';

export interface OrdersLiveView {
  /** Open orders, oldest first. */
  orders: Order[];
  state: ClientState;
  /** Why the connection is not live (close reason), when it is not. */
  detail: StatusDetail;
}

export interface UseOrdersLiveOptions {
  /** wss://…/api/ws/orders/live */
  url: string;
  /** Returns a fresh dashboard token (called again before expiry and after 4401). */
  getToken: () => string | Promise<string>;
  restaurantId?: string;
  /** Called once per applied order_created (e.g. to play a sound). */
  onNewOrder?: (order: Order) => void;
}

const byCreatedAt = (a: Order, b: Order) =>
  Date.parse(a.created_at ?? '') - Date.parse(b.created_at ?? '') || a.id.localeCompare(b.id);

export function useOrdersLive({ url, getToken, restaurantId, onNewOrder }: UseOrdersLiveOptions): OrdersLiveView {
  const [view, setView] = useState<OrdersLiveView>({ orders: [], state: 'idle', detail: {} });
  // Latest callbacks without restarting the connection when they change.
  const callbacks = useRef({ getToken, onNewOrder });
  callbacks.current = { getToken, onNewOrder };

  useEffect(() => {
    const client = new OrdersLive({
      url,
      restaurantId,
      getToken: () => callbacks.current.getToken(),
      // The client keeps one Map and mutates it: copy into a new array so
      // React sees a new value.
      onOrders: (orders) => setView((v) => ({ ...v, orders: [...orders.values()].sort(byCreatedAt) })),
      onEvent: (evt) => {
        if (evt.type === 'order_created') callbacks.current.onNewOrder?.(evt.order);
      },
      onStatus: (state, detail) => setView((v) => ({ ...v, state, detail })),
    });
    client.start();
    return () => client.stop();
  }, [url, restaurantId]);

  return view;
}
