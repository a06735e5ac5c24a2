-- outbox-relay schema, version 1: the outbox table, its NOTIFY trigger and
-- the function applications call inside their own transaction.

CREATE SCHEMA IF NOT EXISTS outbox;

CREATE TABLE IF NOT EXISTS outbox.events (
    -- Publication order: the relay publishes in id order per aggregate.
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    event_version  integer     NOT NULL DEFAULT 1,
    payload        jsonb       NOT NULL,
    headers        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    actor          text,
    traceparent    text,
    -- Optional per-row override of the sink's topic template.
    topic          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- Set by the relay once the broker acknowledged the event (mark mode).
    published_at   timestamptz,
    -- Failure bookkeeping: how often publishing this row failed and why.
    attempts       integer     NOT NULL DEFAULT 0,
    last_error     text,
    failed_at      timestamptz
);

-- The relay only ever looks for unpublished rows, in id order.
CREATE INDEX IF NOT EXISTS events_unpublished_idx
    ON outbox.events (id) WHERE published_at IS NULL;

-- Wake relays at commit time so latency is not bounded by the poll interval.
-- Statement-level, so a bulk insert sends one notification, not one per row.
CREATE OR REPLACE FUNCTION outbox.notify_relay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_events', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS events_notify_relay ON outbox.events;
CREATE TRIGGER events_notify_relay
    AFTER INSERT ON outbox.events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_relay();

-- What applications call inside the transaction that changes their data.
CREATE OR REPLACE FUNCTION outbox.enqueue(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    event_version  integer DEFAULT 1,
    headers        jsonb   DEFAULT '{}'::jsonb,
    actor          text    DEFAULT NULL,
    traceparent    text    DEFAULT NULL,
    topic          text    DEFAULT NULL
) RETURNS uuid
LANGUAGE sql AS $$
    INSERT INTO outbox.events
        (aggregate_type, aggregate_id, event_type, payload, event_version,
         headers, actor, traceparent, topic)
    VALUES
        (enqueue.aggregate_type, enqueue.aggregate_id, enqueue.event_type,
         enqueue.payload, enqueue.event_version, COALESCE(enqueue.headers, '{}'::jsonb),
         enqueue.actor, enqueue.traceparent, enqueue.topic)
    RETURNING event_id;
$$;
