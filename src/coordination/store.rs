//! The lease tables (`sql/0003_relay_leases.sql`): every statement the
//! coordinator runs, each a single round trip except the acquisition.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use uuid::Uuid;

use super::{Identity, Resource};
use crate::postgres::PostgresError;

/// A live relay, as every relay reads them: oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its process.
    pub instance: Uuid,
    /// Its name.
    pub relay_id: String,
    /// The lane count it was configured with.
    pub lanes: i32,
}

/// What an acquisition got.
#[derive(Debug, Default)]
pub struct Acquired {
    /// Lanes now held, with their previous holder (None: it was free).
    pub lanes: Vec<(i32, Option<String>)>,
    /// A relay with another lane count still holds lanes of this outbox:
    /// its lane count.
    pub other_layout: Option<i32>,
}

/// A failed lease statement. These statements touch only the lease
/// tables, so a missing table or privilege (by SQLSTATE) is theirs.
fn error(what: &str, e: &tokio_postgres::Error) -> PostgresError {
    let missing = e.code().is_some_and(|c| *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INSUFFICIENT_PRIVILEGE);
    if missing {
        let what = format!(
            "{what} (the lease tables are missing or not granted: run `outbox-relay migrate`, then the role script in sql/roles)"
        );
        return PostgresError::query(&what, e);
    }
    PostgresError::query(what, e)
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Creates the layout's lane rows if this is the first relay with it.
pub async fn ensure_lanes(client: &Client, resource: &Resource) -> Result<(), PostgresError> {
    client
        .execute(
            "INSERT INTO outbox.relay_leases (resource, lanes, lane) \
             SELECT $1, $2, g FROM generate_series(0, $2 - 1) AS g \
             ON CONFLICT DO NOTHING",
            &[&resource.name, &resource.lanes],
        )
        .await
        .map_err(|e| error("creating the lane rows", &e))?;
    Ok(())
}

/// Says this relay is alive for another `lease`.
pub async fn heartbeat(
    client: &Client,
    resource: &Resource,
    me: &Identity,
    lease: Duration,
) -> Result<(), PostgresError> {
    client
        .execute(
            "INSERT INTO outbox.relay_members (resource, instance, relay_id, lanes, expires_at) \
             VALUES ($1, $2, $3, $4, now() + $5 * interval '1 second') \
             ON CONFLICT (resource, instance) DO UPDATE \
             SET relay_id = EXCLUDED.relay_id, lanes = EXCLUDED.lanes, seen_at = now(), expires_at = EXCLUDED.expires_at",
            &[&resource.name, &me.instance, &me.relay_id, &resource.lanes, &seconds(lease)],
        )
        .await
        .map_err(|e| error("renewing this relay's membership", &e))?;
    Ok(())
}

/// Extends every lease this relay still holds; returns those lanes (a
/// lease that expired in the meantime is not renewed: it may be someone
/// else's by now).
pub async fn renew(
    client: &Client,
    resource: &Resource,
    me: &Identity,
    lease: Duration,
) -> Result<BTreeSet<i32>, PostgresError> {
    let rows = client
        .query(
            "UPDATE outbox.relay_leases SET expires_at = now() + $4 * interval '1 second' \
             WHERE resource = $1 AND lanes = $2 AND instance = $3 AND expires_at > now() \
             RETURNING lane",
            &[&resource.name, &resource.lanes, &me.instance, &seconds(lease)],
        )
        .await
        .map_err(|e| error("renewing leases", &e))?;
    rows.iter().map(|r| r.try_get(0).map_err(|e| error("renewing leases", &e))).collect()
}

/// The live relays on this resource, in the order every relay uses for
/// fair shares. Members gone for an hour are forgotten.
pub async fn members(client: &Client, resource: &Resource) -> Result<Vec<Member>, PostgresError> {
    client
        .execute(
            "DELETE FROM outbox.relay_members WHERE resource = $1 AND expires_at < now() - interval '1 hour'",
            &[&resource.name],
        )
        .await
        .map_err(|e| error("forgetting departed relays", &e))?;
    let rows = client
        .query(
            "SELECT instance, relay_id, lanes FROM outbox.relay_members \
             WHERE resource = $1 AND expires_at > now() ORDER BY started_at, instance",
            &[&resource.name],
        )
        .await
        .map_err(|e| error("reading the live relays", &e))?;
    rows.iter()
        .map(|r| {
            Ok(Member {
                instance: r.try_get(0).map_err(|e| error("reading the live relays", &e))?,
                relay_id: r.try_get(1).map_err(|e| error("reading the live relays", &e))?,
                lanes: r.try_get(2).map_err(|e| error("reading the live relays", &e))?,
            })
        })
        .collect()
}

/// Takes up to `want` free or expired lanes. Serialized across relays by a
/// transaction-scoped advisory lock, which also makes the "no other layout
/// is live" test and the take one atomic step.
pub async fn acquire(
    client: &mut Client,
    resource: &Resource,
    me: &Identity,
    want: usize,
    lease: Duration,
) -> Result<Acquired, PostgresError> {
    let tx = client.transaction().await.map_err(|e| error("acquiring lanes", &e))?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('outbox-relay:leases:' || $1))", &[&resource.name])
        .await
        .map_err(|e| error("acquiring lanes", &e))?;
    let other: Option<i32> = tx
        .query_opt(
            "SELECT lanes FROM outbox.relay_leases \
             WHERE resource = $1 AND lanes <> $2 AND instance IS NOT NULL AND expires_at > now() LIMIT 1",
            &[&resource.name, &resource.lanes],
        )
        .await
        .map_err(|e| error("acquiring lanes", &e))?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(|e| error("acquiring lanes", &e))?;
    if other.is_some() {
        tx.commit().await.map_err(|e| error("acquiring lanes", &e))?;
        return Ok(Acquired { lanes: Vec::new(), other_layout: other });
    }
    let rows = tx
        .query(
            "WITH pick AS ( \
               SELECT lane, relay_id AS previous, instance AS previous_instance FROM outbox.relay_leases \
               WHERE resource = $1 AND lanes = $2 AND (instance IS NULL OR expires_at IS NULL OR expires_at <= now()) \
               ORDER BY lane LIMIT $5 FOR UPDATE \
             ) \
             UPDATE outbox.relay_leases AS l \
             SET instance = $3, relay_id = $4, expires_at = now() + $6 * interval '1 second', acquired_at = now(), \
                 handovers = l.handovers + CASE WHEN pick.previous_instance IS DISTINCT FROM $3 THEN 1 ELSE 0 END \
             FROM pick WHERE l.resource = $1 AND l.lanes = $2 AND l.lane = pick.lane \
             RETURNING l.lane, pick.previous",
            &[&resource.name, &resource.lanes, &me.instance, &me.relay_id, &(want as i64), &seconds(lease)],
        )
        .await
        .map_err(|e| error("acquiring lanes", &e))?;
    tx.commit().await.map_err(|e| error("acquiring lanes", &e))?;
    let lanes = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(|e| error("acquiring lanes", &e))?;
    Ok(Acquired { lanes, other_layout: None })
}

/// Hands lanes back: free at once for the next relay.
pub async fn release(client: &Client, resource: &Resource, me: &Identity, lanes: &[i32]) -> Result<(), PostgresError> {
    client
        .execute(
            "UPDATE outbox.relay_leases SET instance = NULL, relay_id = NULL, expires_at = NULL \
             WHERE resource = $1 AND lanes = $2 AND instance = $3 AND lane = ANY($4)",
            &[&resource.name, &resource.lanes, &me.instance, &lanes],
        )
        .await
        .map_err(|e| error("releasing lanes", &e))?;
    Ok(())
}

/// Leaves: releases every lane and the membership, so the others take over
/// at their next tick instead of waiting for expiry.
pub async fn leave(client: &Client, resource: &Resource, me: &Identity) -> Result<(), PostgresError> {
    client
        .execute(
            "UPDATE outbox.relay_leases SET instance = NULL, relay_id = NULL, expires_at = NULL \
             WHERE resource = $1 AND instance = $2",
            &[&resource.name, &me.instance],
        )
        .await
        .map_err(|e| error("releasing lanes", &e))?;
    client
        .execute(
            "DELETE FROM outbox.relay_members WHERE resource = $1 AND instance = $2",
            &[&resource.name, &me.instance],
        )
        .await
        .map_err(|e| error("leaving", &e))?;
    Ok(())
}

/// One row of `status`: a relay and what it holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Holding {
    /// Its name.
    pub relay_id: String,
    /// Its process.
    pub instance: String,
    /// Its configured lane count.
    pub lane_count: i32,
    /// The lanes (or, in replication, the slot's single lease) it holds now.
    pub lanes: Vec<i32>,
    /// Seconds until its membership expires unless renewed.
    pub expires_in_seconds: f64,
}

/// Every live relay on `resource` and the lanes it holds, for `status`.
pub async fn holdings(client: &Client, resource: &str) -> Result<Vec<Holding>, PostgresError> {
    let rows = client
        .query(
            "SELECT m.relay_id, m.instance::text, m.lanes, \
                    coalesce(array_agg(l.lane ORDER BY l.lane) FILTER (WHERE l.lane IS NOT NULL), '{}'), \
                    extract(epoch FROM m.expires_at - now())::float8 \
             FROM outbox.relay_members m \
             LEFT JOIN outbox.relay_leases l \
               ON l.resource = m.resource AND l.instance = m.instance AND l.lanes = m.lanes AND l.expires_at > now() \
             WHERE m.resource = $1 AND m.expires_at > now() \
             GROUP BY m.relay_id, m.instance, m.lanes, m.expires_at, m.started_at \
             ORDER BY m.started_at, m.instance",
            &[&resource],
        )
        .await
        .map_err(|e| error("reading the lease table", &e))?;
    rows.iter()
        .map(|r| {
            Ok(Holding {
                relay_id: r.try_get(0)?,
                instance: r.try_get(1)?,
                lane_count: r.try_get(2)?,
                lanes: r.try_get(3)?,
                expires_in_seconds: r.try_get(4)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(|e| error("reading the lease table", &e))
}
