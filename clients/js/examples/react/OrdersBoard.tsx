// A small component on top of useOrdersLive: a connection badge and one line
// per open order. Type-checked in the suite (clients/js/tsconfig.json).
import { useOrdersLive } from './useOrdersLive';

export function OrdersBoard({ gatewayUrl, token }: { gatewayUrl: string; token: () => Promise<string> }) {
  const { orders, state, detail } = useOrdersLive({
    url: `${gatewayUrl.replace(/^http/, 'ws')}/api/ws/orders/live`,
    getToken: token,
  });
  return (
    <section>
      <p role="status" data-state={state}>
        {state}
        {state !== 'live' && detail.reason ? ` (${detail.reason})` : ''}
      </p>
      <ul>
        {orders.map((order) => (
          <li key={order.id}>
            <strong>#{order.order_number ?? order.id.slice(0, 8)}</strong>{' '}
            {order.table_number != null ? `table ${order.table_number}` : 'takeaway'} · {order.order_status} ·{' '}
            {order.items.map((item) => `${item.quantity ?? 1}× ${item.name ?? 'item'}`).join(', ')}
          </li>
        ))}
      </ul>
    </section>
  );
}
