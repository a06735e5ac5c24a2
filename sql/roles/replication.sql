-- Least-privilege role for outbox-relay in logical replication mode.
--
-- Run with psql, connected to the application's database as the owner of the
-- outbox table (a publication can only be created by the table's owner) or a
-- superuser, AFTER `outbox-relay migrate`:
--
--   psql "postgres://outbox_owner@db:5432/app" -v ON_ERROR_STOP=1 \
--        -v role=outbox_relay_repl -v password="$RELAY_PASSWORD" \
--        -f sql/roles/replication.sql
--
-- Variables (psql -v), each with the relay's default:
--   role         the relay's login role (default: outbox_relay_repl)
--   password     its password; omit to leave it unchanged (see polling.sql)
--   schema       outbox schema (default: outbox)
--   table        outbox table (default: events)
--   publication  publication the relay subscribes to (default: outbox_relay_pub)
--
-- Idempotent: role and publication are created only if missing.
--
-- Creating a role WITH REPLICATION needs superuser (PostgreSQL < 16) or
-- CREATEROLE plus REPLICATION (16+). The replication slot (`outbox_relay` by
-- default) is created by the relay itself on first start; it is not created
-- here, because a slot nobody consumes retains WAL from the moment it exists.
--
-- Server prerequisites (postgresql.conf, restart needed):
--   wal_level = logical
--   max_replication_slots and max_wal_senders >= number of relays + others
--   max_slot_wal_keep_size = 10GB (or what your disk affords): caps the WAL a
--     stalled relay can pin; past it the slot is invalidated instead of the
--     disk filling up (alert OutboxReplicationSlotLagHigh fires long before).
-- pg_hba.conf: a logical replication connection matches the database name
-- (not the keyword `replication`), e.g.
--   hostssl  app  outbox_relay_repl  10.0.0.0/8  scram-sha-256

\set ON_ERROR_STOP on
\if :{?role}
\else
  \set role outbox_relay_repl
\endif
\if :{?schema}
\else
  \set schema outbox
\endif
\if :{?table}
\else
  \set table events
\endif
\if :{?publication}
\else
  \set publication outbox_relay_pub
\endif

SELECT to_regclass(format('%I.%I', :'schema', :'table')) IS NULL AS outbox_missing \gset
\if :outbox_missing
  \echo 'table' :"schema"'.':"table" 'does not exist'
  DO $$ BEGIN RAISE EXCEPTION 'the outbox table does not exist: run `outbox-relay migrate` first'; END $$;
\endif

SELECT current_setting('wal_level') <> 'logical' AS wal_not_logical \gset
\if :wal_not_logical
  \echo 'WARNING: wal_level is not logical: the relay cannot create its slot until it is (needs a restart)'
\endif

BEGIN;

-- The login role. REPLICATION lets it open a replication connection, create
-- and drop its logical slot and stream changes; it bypasses nothing else
-- (no superuser, no row-level-security bypass, no inherited privileges).
SELECT format('CREATE ROLE %I LOGIN REPLICATION', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE
    NOINHERIT NOBYPASSRLS;

\if :{?password}
SET LOCAL password_encryption = 'scram-sha-256';
ALTER ROLE :"role" WITH PASSWORD :'password';
\endif

SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role') \gexec

-- Name resolution in the outbox schema, and SELECT on the published table:
-- needed for the initial snapshot of rows written before the slot existed,
-- and by pgoutput to read the table's rows and metadata.
GRANT USAGE ON SCHEMA :"schema" TO :"role";
GRANT SELECT ON TABLE :"schema".:"table" TO :"role";
-- Lets `outbox-relay check` / `status` verify the schema version.
SELECT format('GRANT SELECT ON TABLE %I.schema_migrations TO %I', :'schema', :'role')
 WHERE to_regclass(format('%I.schema_migrations', :'schema')) IS NOT NULL \gexec

-- The publication: only INSERTs are events. Publishing UPDATE/DELETE too would
-- stream the relay's own bookkeeping (published_at, retention deletes) back
-- to it.
SELECT format('CREATE PUBLICATION %I FOR TABLE %I.%I WITH (publish = %L)',
              :'publication', :'schema', :'table', 'insert')
 WHERE NOT EXISTS (SELECT FROM pg_publication WHERE pubname = :'publication') \gexec

COMMIT;

-- If the relay also marks or deletes published rows in this mode
-- (published.mode = "mark" / "delete", or retention), it needs the polling
-- grants too: run sql/roles/polling.sql with the same -v role=... .

\echo 'outbox-relay replication role' :"role" 'ready; publication' :"publication" 'on' :"schema"'.':"table"
