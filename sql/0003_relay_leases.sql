-- Several relays on one outbox (one per application pod): who is alive and
-- who holds what, kept in Postgres so there is no coordinator to deploy.
-- See src/coordination for the protocol.

-- Every running relay renews its row; a row past expires_at is a relay
-- that died, froze or lost its database.
CREATE TABLE IF NOT EXISTS outbox.relay_members (
    -- What the relays share: the outbox table (schema.table) when polling,
    -- 'slot:<name>' in replication mode.
    resource   text        NOT NULL,
    -- One per relay process, so two relays given the same relay_id by
    -- mistake still never share a lease.
    instance   uuid        NOT NULL,
    -- replicas.relay_id: the pod or host name, for people.
    relay_id   text        NOT NULL,
    -- The lane count this relay was configured with (replicas.lanes).
    lanes      integer     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (resource, instance)
);

-- One row per lane (polling) or one for the slot (replication, lanes = 1).
-- A lane is held while instance is set and expires_at is in the future, by
-- the database's clock; only its holder claims or streams its events.
CREATE TABLE IF NOT EXISTS outbox.relay_leases (
    resource    text        NOT NULL,
    -- Lanes in this layout: rows of another lane count are a different
    -- split of the same outbox, and never held at the same time.
    lanes       integer     NOT NULL,
    lane        integer     NOT NULL,
    instance    uuid,
    relay_id    text,
    expires_at  timestamptz,
    acquired_at timestamptz,
    -- How often the lane changed holder (hand-overs and takeovers).
    handovers   bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (resource, lanes, lane),
    CONSTRAINT relay_leases_lane_in_range CHECK (lane >= 0 AND lane < lanes)
);
