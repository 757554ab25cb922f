-- Demo data for the docker-compose stack (applied once, after the migrations,
-- by the postgres container's init scripts). Idempotent.
--
--   restaurant  11111111-1111-1111-1111-111111111111  ("Demo Bistro")
--   member      22222222-2222-2222-2222-222222222222  (role owner)
--
-- A dashboard token for that member: deploy/compose/dev-token.sh
-- Open orders (pending, preparing, ready) appear in the board's snapshot; the
-- completed one does not.

BEGIN;

INSERT INTO restaurant_members (user_id, restaurant_id, role) VALUES
  ('22222222-2222-2222-2222-222222222222', '11111111-1111-1111-1111-111111111111', 'owner')
ON CONFLICT DO NOTHING;

INSERT INTO orders (id, order_number, restaurant_id, table_number, customer_name, customer_phone,
                    order_status, payment_status, payment_method, total_price, estimated_time,
                    created_at, updated_at) VALUES
  ('a0000000-0000-4000-8000-000000000001', 'ORD-DEMO-0001', '11111111-1111-1111-1111-111111111111',
   5, 'Ada Lovelace', '+15550100001', 'pending', 'pending', 'cash', 25.50, 15,
   now() - interval '4 minutes', now() - interval '4 minutes'),
  ('a0000000-0000-4000-8000-000000000002', 'ORD-DEMO-0002', '11111111-1111-1111-1111-111111111111',
   2, 'Alan Turing', '+15550100002', 'preparing', 'paid', 'card', 18.00, 10,
   now() - interval '12 minutes', now() - interval '6 minutes'),
  ('a0000000-0000-4000-8000-000000000003', 'ORD-DEMO-0003', '11111111-1111-1111-1111-111111111111',
   9, 'Grace Hopper', '+15550100003', 'ready', 'paid', 'card', 42.75, 0,
   now() - interval '25 minutes', now() - interval '1 minute'),
  ('a0000000-0000-4000-8000-000000000004', 'ORD-DEMO-0004', '11111111-1111-1111-1111-111111111111',
   1, 'Edsger Dijkstra', '+15550100004', 'completed', 'paid', 'cash', 9.90, 0,
   now() - interval '2 hours', now() - interval '90 minutes')
ON CONFLICT (id) DO NOTHING;

INSERT INTO order_items (id, order_id, menu_item_id, quantity, unit_price) VALUES
  ('b0000000-0000-4000-8000-000000000001', 'a0000000-0000-4000-8000-000000000001', 'c0000000-0000-4000-8000-000000000001', 2, 12.75),
  ('b0000000-0000-4000-8000-000000000002', 'a0000000-0000-4000-8000-000000000002', 'c0000000-0000-4000-8000-000000000002', 1, 11.00),
  ('b0000000-0000-4000-8000-000000000003', 'a0000000-0000-4000-8000-000000000002', 'c0000000-0000-4000-8000-000000000003', 2, 3.50),
  ('b0000000-0000-4000-8000-000000000004', 'a0000000-0000-4000-8000-000000000003', 'c0000000-0000-4000-8000-000000000001', 1, 12.75),
  ('b0000000-0000-4000-8000-000000000005', 'a0000000-0000-4000-8000-000000000003', 'c0000000-0000-4000-8000-000000000004', 3, 10.00),
  ('b0000000-0000-4000-8000-000000000006', 'a0000000-0000-4000-8000-000000000004', 'c0000000-0000-4000-8000-000000000005', 1, 9.90)
ON CONFLICT (id) DO NOTHING;

COMMIT;
