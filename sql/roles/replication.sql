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
--   published_mode  the relay's published.mode: mark (default) or delete
--                (the relay also stamps or deletes published rows, and drains
--                by polling after recreating a lost slot: it needs UPDATE and
--                DELETE too), or none (the slot's position is the only mark:
--                SELECT suffices)
--
-- Idempotent: role and publication are created only if missing.
--
-- Creating a role WITH REPLICATION needs superuser (PostgreSQL < 16) or
-- CREATEROLE plus REPLICATION (16+). The replication slot (`outbox_relay` by
-- default) is not created here: `outbox-relay migrate` creates it in
-- replication mode (its role then needs REPLICATION too), or the relay does on
-- first start. A slot nobody consumes retains WAL from the moment it exists.
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
\if :{?published_mode}
\else
  \set published_mode mark
\endif
SELECT :'published_mode' NOT IN ('mark', 'delete', 'none') AS bad_mode,
       :'published_mode' <> 'none' AS writes_rows \gset
\if :bad_mode
  \echo 'published_mode must be mark, delete or none, not' :'published_mode'
  DO $$ BEGIN RAISE EXCEPTION 'bad published_mode'; END $$;
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
-- SUPERUSER and BYPASSRLS can only be removed by a superuser (a new role has
-- neither): refuse an existing role that has one.
SELECT coalesce(bool_or(rolsuper OR rolbypassrls), false) AS role_too_powerful
  FROM pg_roles WHERE rolname = :'role' \gset
\if :role_too_powerful
  \echo 'role' :"role" 'has SUPERUSER or BYPASSRLS; a superuser must run: ALTER ROLE' :"role" 'NOSUPERUSER NOBYPASSRLS;'
  DO $$ BEGIN RAISE EXCEPTION 'the relay role is too powerful'; END $$;
\endif
SELECT format('CREATE ROLE %I LOGIN REPLICATION', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN REPLICATION NOCREATEDB NOCREATEROLE NOINHERIT;

\if :{?password}
SET LOCAL password_encryption = 'scram-sha-256';
ALTER ROLE :"role" WITH PASSWORD :'password';
\endif

-- Connect to this database (PUBLIC usually has CONNECT), when we may grant it.
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role')
 WHERE has_database_privilege(current_database(), 'CONNECT WITH GRANT OPTION') \gexec

-- Name resolution in the outbox schema, and SELECT on the published table:
-- reading rows written before the slot existed, and the table's metadata.
GRANT USAGE ON SCHEMA :"schema" TO :"role";
GRANT SELECT ON TABLE :"schema".:"table" TO :"role";
\if :writes_rows
-- published.mode = mark/delete: stamp published_at or delete acknowledged
-- rows, record failures, retention; and polling after a slot was recreated.
GRANT UPDATE, DELETE ON TABLE :"schema".:"table" TO :"role";
\else
-- published.mode = none: the relay never writes the table.
REVOKE UPDATE, DELETE ON TABLE :"schema".:"table" FROM :"role";
\endif
-- Leader election between relays (sql/0003_relay_leases.sql): the slot's
-- lease and the members. A new leader also terminates a deposed leader's
-- walsender, which needs no grant: it runs as this same role.
GRANT USAGE ON SCHEMA outbox TO :"role";
GRANT SELECT, INSERT, UPDATE ON TABLE outbox.relay_leases TO :"role";
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE outbox.relay_members TO :"role";
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

\echo 'outbox-relay replication role' :"role" 'ready for published.mode' :published_mode'; publication' :"publication" 'on' :"schema"'.':"table"
