-- An order's items are part of the order (every event carries them), but the
-- poller finds changes by orders.updated_at: a write to order_items alone
-- would stay invisible. These triggers touch the parent order, so the orders
-- trigger stamps a new version (greatest(now(), previous + 1 µs)) and the
-- poller's horizon argument holds unchanged (docs/CHANGE_CAPTURE.md).
--
-- Orders this transaction already wrote are left alone: their updated_at is
-- already this transaction's version, and an order service that took it from
-- INSERT/UPDATE ... RETURNING updated_at before writing the items keeps a
-- version equal to what commits (so its publish deduplicates the poller's).
-- Statement-level with transition tables: a bulk insert of items touches each
-- order once, not once per item.
CREATE OR REPLACE FUNCTION order_items_touch_order() RETURNS trigger AS $$
DECLARE
    touched uuid[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT order_id) INTO touched FROM og_new_items;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT order_id) INTO touched FROM og_old_items;
    ELSE
        SELECT array_agg(DISTINCT order_id) INTO touched
          FROM (SELECT order_id FROM og_new_items UNION SELECT order_id FROM og_old_items) c;
    END IF;
    IF touched IS NOT NULL THEN
        UPDATE orders o SET updated_at = now()
         WHERE o.id = ANY (touched)
           AND o.xmin::text::bigint <> (txid_current() & 4294967295);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS order_items_touch_order_ins ON order_items;
CREATE TRIGGER order_items_touch_order_ins
    AFTER INSERT ON order_items REFERENCING NEW TABLE AS og_new_items
    FOR EACH STATEMENT EXECUTE FUNCTION order_items_touch_order();
DROP TRIGGER IF EXISTS order_items_touch_order_upd ON order_items;
CREATE TRIGGER order_items_touch_order_upd
    AFTER UPDATE ON order_items REFERENCING OLD TABLE AS og_old_items NEW TABLE AS og_new_items
    FOR EACH STATEMENT EXECUTE FUNCTION order_items_touch_order();
DROP TRIGGER IF EXISTS order_items_touch_order_del ON order_items;
CREATE TRIGGER order_items_touch_order_del
    AFTER DELETE ON order_items REFERENCING OLD TABLE AS og_old_items
    FOR EACH STATEMENT EXECUTE FUNCTION order_items_touch_order();
