-- Wake-up for the poller (docs/CHANGE_CAPTURE.md, "Wake-up"): after every
-- statement that writes orders or order_items, one
-- NOTIFY orders_changed, '<restaurant_id>' per restaurant the statement
-- touched. The poller leader LISTENs and polls at once instead of waiting
-- for its next tick; the periodic poll stays the source of truth, so a lost
-- or missing notification only costs latency.
--
-- Statement-level with transition tables: a statement that writes 10,000
-- rows of one restaurant sends one notification, not 10,000, and PostgreSQL
-- folds identical notifications of one transaction into one. The price is
-- NOTIFY's commit-time lock: committing transactions that notified are
-- serialized database-wide (docs/BENCHMARKS.md measures it; the triggers
-- can be disabled with ALTER TABLE ... DISABLE TRIGGER without losing
-- anything but latency).

CREATE OR REPLACE FUNCTION orders_notify_changed() RETURNS trigger AS $$
BEGIN
    -- plpgsql plans each statement when it first runs, so a branch may
    -- name a transition table only its own trigger declares.
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('orders_changed', r::text)
        FROM (SELECT DISTINCT restaurant_id AS r FROM new_rows) s WHERE r IS NOT NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Both sides: an order moved to another restaurant leaves one board
        -- and joins another.
        PERFORM pg_notify('orders_changed', r::text)
        FROM (SELECT restaurant_id AS r FROM new_rows
              UNION SELECT restaurant_id FROM old_rows) s WHERE r IS NOT NULL;
    ELSE
        PERFORM pg_notify('orders_changed', r::text)
        FROM (SELECT DISTINCT restaurant_id AS r FROM old_rows) s WHERE r IS NOT NULL;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- order_items has no restaurant_id: take it from the order. Items deleted
-- by ON DELETE CASCADE find no order any more; the orders trigger already
-- notified for those.
CREATE OR REPLACE FUNCTION order_items_notify_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('orders_changed', r::text)
        FROM (SELECT DISTINCT o.restaurant_id AS r FROM new_rows i JOIN orders o ON o.id = i.order_id) s
        WHERE r IS NOT NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM pg_notify('orders_changed', r::text)
        FROM (SELECT o.restaurant_id AS r FROM new_rows i JOIN orders o ON o.id = i.order_id
              UNION SELECT o.restaurant_id FROM old_rows i JOIN orders o ON o.id = i.order_id) s
        WHERE r IS NOT NULL;
    ELSE
        PERFORM pg_notify('orders_changed', r::text)
        FROM (SELECT DISTINCT o.restaurant_id AS r FROM old_rows i JOIN orders o ON o.id = i.order_id) s
        WHERE r IS NOT NULL;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- A trigger with transition tables may handle only one event, hence three
-- per table.
DROP TRIGGER IF EXISTS orders_notify_insert ON orders;
CREATE TRIGGER orders_notify_insert AFTER INSERT ON orders
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION orders_notify_changed();
DROP TRIGGER IF EXISTS orders_notify_update ON orders;
CREATE TRIGGER orders_notify_update AFTER UPDATE ON orders
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION orders_notify_changed();
DROP TRIGGER IF EXISTS orders_notify_delete ON orders;
CREATE TRIGGER orders_notify_delete AFTER DELETE ON orders
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION orders_notify_changed();

DROP TRIGGER IF EXISTS order_items_notify_insert ON order_items;
CREATE TRIGGER order_items_notify_insert AFTER INSERT ON order_items
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_items_notify_changed();
DROP TRIGGER IF EXISTS order_items_notify_update ON order_items;
CREATE TRIGGER order_items_notify_update AFTER UPDATE ON order_items
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_items_notify_changed();
DROP TRIGGER IF EXISTS order_items_notify_delete ON order_items;
CREATE TRIGGER order_items_notify_delete AFTER DELETE ON order_items
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_items_notify_changed();
