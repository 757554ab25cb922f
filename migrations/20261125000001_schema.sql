-- The orders schema of the platform (contract), for dev, test and standalone
-- deployments. Production databases that already have it are never migrated
-- implicitly: run `orders-gateway migrate` only where wanted.
CREATE TABLE IF NOT EXISTS orders (
    id              uuid PRIMARY KEY,
    order_number    text,
    restaurant_id   uuid NOT NULL,
    table_number    int,
    customer_name   text,
    customer_phone  text,
    order_status    text NOT NULL DEFAULT 'pending'
        CHECK (order_status IN ('pending','confirmed','preparing','ready','served','completed','cancelled')),
    payment_status  text,
    payment_method  text,
    total_price     numeric(10,2),
    estimated_time  int,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS order_items (
    id            uuid PRIMARY KEY,
    order_id      uuid NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    menu_item_id  uuid,
    quantity      int NOT NULL DEFAULT 1,
    unit_price    numeric(10,2)
);

CREATE TABLE IF NOT EXISTS restaurant_members (
    user_id        uuid NOT NULL,
    restaurant_id  uuid NOT NULL,
    role           text NOT NULL DEFAULT 'staff',
    PRIMARY KEY (user_id, restaurant_id)
);

-- updated_at moves on every write, set by the database, so the poller can
-- rely on it. now() is the transaction start: the poller's horizon accounts
-- for transactions that commit long after they started.
CREATE OR REPLACE FUNCTION orders_touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS orders_touch_updated_at ON orders;
CREATE TRIGGER orders_touch_updated_at
    BEFORE UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_touch_updated_at();

-- Poller: rows changed since the cursor, filtered by active restaurant.
CREATE INDEX IF NOT EXISTS orders_updated_at_idx ON orders (updated_at);
CREATE INDEX IF NOT EXISTS orders_restaurant_updated_at_idx ON orders (restaurant_id, updated_at);
-- Snapshots and the poller's baseline: a restaurant's open orders.
CREATE INDEX IF NOT EXISTS orders_open_by_restaurant_idx ON orders (restaurant_id, created_at)
    WHERE order_status NOT IN ('completed', 'cancelled');
CREATE INDEX IF NOT EXISTS order_items_order_id_idx ON order_items (order_id);
CREATE INDEX IF NOT EXISTS restaurant_members_user_idx ON restaurant_members (user_id);
