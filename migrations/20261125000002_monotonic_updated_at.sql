-- updated_at must be a per-row version that only moves forward: the poller,
-- the session's snapshot seam and the dashboard client all treat an event
-- whose updated_at is not newer than what they hold as already seen.
-- now() alone is the writer's transaction start, so a transaction that began
-- before another one but updated the row after that one committed would stamp
-- an older time on a newer state, and that change would be dropped
-- downstream. Row locking orders the writers of one row, so "one microsecond
-- after the previous version" restores the order. The value never goes below
-- now(), which is what the poller's horizon relies on (docs/CHANGE_CAPTURE.md).
CREATE OR REPLACE FUNCTION orders_touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at := greatest(now(), OLD.updated_at + interval '1 microsecond');
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
