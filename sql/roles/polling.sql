-- Least-privilege role for outbox-relay in polling mode (source.mode = "poll").
--
-- Run with psql, connected to the application's database as the owner of the
-- `outbox` schema (the role that ran `outbox-relay migrate`) or a superuser,
-- AFTER `outbox-relay migrate` has created the schema:
--
--   psql "postgres://outbox_owner@db:5432/app" -v ON_ERROR_STOP=1 \
--        -v role=outbox_relay -v password="$RELAY_PASSWORD" \
--        -f sql/roles/polling.sql
--
-- Variables (psql -v):
--   role      the relay's login role (default: outbox_relay)
--   password  its password; omit it to leave the password unchanged (e.g. for
--             certificate or IAM authentication, or to set it with
--             `\password outbox_relay`, which never sends it in clear text)
--   schema    the outbox schema (default: outbox)
--   table     the outbox table in that schema (default: events)
--
-- Idempotent: it creates the role only if it is missing, and re-running the
-- grants changes nothing. Re-run it after upgrades (harmless); run
-- `outbox-relay check` as the relay afterwards: it verifies the privileges.
--
-- Creating a role needs CREATEROLE (or superuser); a schema owner without it
-- can have a DBA create the role and then run this script for the grants.

\set ON_ERROR_STOP on
\if :{?role}
\else
  \set role outbox_relay
\endif
\if :{?schema}
\else
  \set schema outbox
\endif
\if :{?table}
\else
  \set table events
\endif

-- The outbox must exist: `outbox-relay migrate` creates it.
SELECT to_regclass(format('%I.%I', :'schema', :'table')) IS NULL AS outbox_missing \gset
\if :outbox_missing
  \echo 'table' :"schema"'.':"table" 'does not exist'
  DO $$ BEGIN RAISE EXCEPTION 'the outbox table does not exist: run `outbox-relay migrate` first'; END $$;
\endif

BEGIN;

-- The login role. NOINHERIT and the explicit NO... attributes make sure it
-- gains nothing beyond the grants below, even if someone later adds it to a
-- group role. (Leave CONNECTION LIMIT unset: each relay uses a few
-- connections, and several relays (standbys, sidecars) share this role.)
-- Creating or altering it needs CREATEROLE (PostgreSQL 16+: and ADMIN OPTION
-- on an existing role); without it the role must exist already (a DBA
-- creates it) and only its attributes are checked.
-- SUPERUSER, REPLICATION and BYPASSRLS can only be removed by a superuser
-- (a new role has none of them): refuse an existing role that has one.
SELECT coalesce(bool_or(rolsuper OR rolreplication OR rolbypassrls), false) AS role_too_powerful
  FROM pg_roles WHERE rolname = :'role' \gset
\if :role_too_powerful
  \echo 'role' :"role" 'has SUPERUSER, REPLICATION or BYPASSRLS; a superuser must run: ALTER ROLE' :"role" 'NOSUPERUSER NOREPLICATION NOBYPASSRLS;'
  DO $$ BEGIN RAISE EXCEPTION 'the relay role is too powerful'; END $$;
\endif

SELECT rolsuper OR rolcreaterole AS can_manage_roles
  FROM pg_roles WHERE rolname = current_user \gset
\if :can_manage_roles
  SELECT format('CREATE ROLE %I LOGIN', :'role')
   WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
  ALTER ROLE :"role" WITH LOGIN NOCREATEDB NOCREATEROLE NOINHERIT;
  \if :{?password}
    -- Stored as a SCRAM verifier; the statement itself carries the clear
    -- text, so keep log_statement from logging it (psql does not log it).
    SET LOCAL password_encryption = 'scram-sha-256';
    ALTER ROLE :"role" WITH PASSWORD :'password';
  \endif
\else
  SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS role_missing \gset
  \if :role_missing
    \echo 'role' :"role" 'does not exist and' :"USER" 'may not create it: a DBA must run: CREATE ROLE' :"role" 'LOGIN NOINHERIT;'
    DO $$ BEGIN RAISE EXCEPTION 'the relay role does not exist'; END $$;
  \endif
\endif

-- CREATEDB/CREATEROLE were removed above if we could; if not, refuse.
SELECT rolcreatedb OR rolcreaterole AS role_too_powerful
  FROM pg_roles WHERE rolname = :'role' \gset
\if :role_too_powerful
  \echo 'role' :"role" 'has CREATEDB or CREATEROLE; remove it: ALTER ROLE' :"role" 'NOCREATEDB NOCREATEROLE;'
  DO $$ BEGIN RAISE EXCEPTION 'the relay role is too powerful'; END $$;
\endif

-- Connect to this database. PUBLIC usually has CONNECT; hardened databases
-- revoke it. Granted when we may (database owner or superuser).
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role')
 WHERE has_database_privilege(current_database(), 'CONNECT WITH GRANT OPTION') \gexec

-- Resolve names in the outbox schema. USAGE does not allow creating objects.
GRANT USAGE ON SCHEMA :"schema" TO :"role";

-- SELECT: claim unpublished rows in id order (and count the backlog).
-- UPDATE: mark rows published (published_at) and record failures
--         (attempts, last_error, failed_at); also needed by FOR UPDATE.
--         Tighter, if your relay version only writes those columns:
--         GRANT UPDATE (published_at, attempts, last_error, failed_at) ON ...
-- DELETE: published.mode = "delete", and the retention of published rows in
--         mark mode (published.retention).
-- No INSERT: only the applications write events. No TRUNCATE, REFERENCES or
-- TRIGGER. LISTEN/NOTIFY and advisory locks need no grant.
GRANT SELECT, UPDATE, DELETE ON TABLE :"schema".:"table" TO :"role";

-- Coordination between relays (sql/0003_relay_leases.sql; every relay uses
-- it, even a lone one): renew its membership and lane leases, create the
-- lane rows of a new lane count, forget departed relays. No TRUNCATE, no DDL.
GRANT USAGE ON SCHEMA outbox TO :"role";
GRANT SELECT, INSERT, UPDATE ON TABLE outbox.relay_leases TO :"role";
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE outbox.relay_members TO :"role";

-- Read-only access to the migration history, so that `outbox-relay check`
-- and `status` can verify the schema version. Nothing else in the schema.
SELECT format('GRANT SELECT ON TABLE %I.schema_migrations TO %I', :'schema', :'role')
 WHERE to_regclass(format('%I.schema_migrations', :'schema')) IS NOT NULL \gexec

COMMIT;

-- For reference, the applications' role needs (not granted here):
--   GRANT USAGE ON SCHEMA outbox TO app;
--   GRANT INSERT ON outbox.events TO app;
--   GRANT EXECUTE ON FUNCTION outbox.enqueue(text, text, text, jsonb, integer, jsonb, text, text, text) TO app;

\echo 'outbox-relay polling role' :"role" 'ready on' :"schema"'.':"table"
