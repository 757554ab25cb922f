-- A deleted order leaves no row for the poller to read. This trigger leaves a
-- tombstone instead, stamped like a write (now(), the transaction's start), so
-- the poller reads tombstones with the same cursor and horizon as orders and
-- publishes `order_deleted`. Only open orders get one (closed orders are on no
-- board; a retention job deleting old orders costs nothing here). Tombstones
-- older than a day are removed by the next deletion.
CREATE TABLE IF NOT EXISTS order_tombstones (
    order_id       uuid NOT NULL,
    restaurant_id  uuid NOT NULL,
    deleted_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS order_tombstones_deleted_at_idx ON order_tombstones (deleted_at);

CREATE OR REPLACE FUNCTION orders_leave_tombstone() RETURNS trigger AS $$
BEGIN
    INSERT INTO order_tombstones (order_id, restaurant_id, deleted_at)
    SELECT d.id, d.restaurant_id, now() FROM og_deleted_orders d
     WHERE d.restaurant_id IS NOT NULL
       AND d.order_status NOT IN ('completed', 'cancelled');
    DELETE FROM order_tombstones WHERE deleted_at < now() - interval '1 day';
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS orders_leave_tombstone ON orders;
CREATE TRIGGER orders_leave_tombstone
    AFTER DELETE ON orders REFERENCING OLD TABLE AS og_deleted_orders
    FOR EACH STATEMENT EXECUTE FUNCTION orders_leave_tombstone();
