//! Protocol-level tests of the replication wire client
//! (`src/source/replication/wire.rs`) against a real Postgres: each
//! authentication method it implements, server errors with their SQLSTATE,
//! IDENTIFY_SYSTEM, and one CopyBoth session (WAL data, a status update
//! answered by a keepalive, a clean end). The relay's own tests cover what
//! it does with the stream; these pin the client the decision in the
//! module docs keeps.

mod common;

use std::time::Duration;

use common::relay::connect;
use common::{ClusterOptions, ThrowawayPostgres};
use outbox_relay::source::replication::wire::{
    parse_lsn, ConnectParams, ReplicationConnection, ReplicationStream, WireError, WireTls,
};

/// Loopback TCP only: `postgres` trusted (the harness and setup), one role
/// per password method the client speaks.
const HBA: &str = "local all all trust\n\
                   host all postgres 127.0.0.1/32 trust\n\
                   host all scram_user 127.0.0.1/32 scram-sha-256\n\
                   host all md5_user 127.0.0.1/32 md5\n\
                   host all clear_user 127.0.0.1/32 password\n";

const PASSWORD: &str = "s3cret pass";

/// A cluster with the roles of [`HBA`], each allowed to replicate.
async fn cluster() -> ThrowawayPostgres {
    let options = ClusterOptions { hba: Some(HBA.into()), ..ClusterOptions::default() };
    let pg = tokio::task::spawn_blocking(move || ThrowawayPostgres::start_with(options))
        .await
        .expect("start task")
        .expect("start throwaway postgres");
    let client = connect(&pg.url()).await;
    client
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD '{PASSWORD}'; \
             CREATE ROLE clear_user LOGIN REPLICATION PASSWORD '{PASSWORD}'; \
             SET password_encryption = 'md5'; \
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD '{PASSWORD}';"
        ))
        .await
        .expect("create roles");
    pg
}

/// A `replication=database` connection as `user` (with `password`) to `database`.
async fn wire(
    pg: &ThrowawayPostgres,
    user: &str,
    password: Option<&str>,
    database: &str,
) -> Result<ReplicationConnection, WireError> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(pg.port()).user(user).dbname(database);
    if let Some(password) = password {
        config.password(password);
    }
    let params = ConnectParams::from_config(&config, "outbox-relay wire test")?.with_tls(WireTls::disabled());
    tokio::time::timeout(Duration::from_secs(20), ReplicationConnection::connect(&params))
        .await
        .expect("connect in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authentication_method_connects_and_identify_system_answers() {
    // GIVEN roles that authenticate by trust, SCRAM-SHA-256, MD5 and cleartext
    let pg = cluster().await;
    for (user, password) in [
        ("postgres", None),
        ("scram_user", Some(PASSWORD)),
        ("md5_user", Some(PASSWORD)),
        ("clear_user", Some(PASSWORD)),
    ] {
        // WHEN each opens a replication connection
        let mut connection = wire(&pg, user, password, "postgres").await.unwrap_or_else(|e| panic!("{user}: {e}"));

        // THEN IDENTIFY_SYSTEM answers one row: system id, timeline, WAL position, database
        let rows = connection.simple_query("IDENTIFY_SYSTEM").await.unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(rows.len(), 1, "{user}: {rows:?}");
        let row = &rows[0];
        assert_eq!(row.len(), 4, "{user}: {row:?}");
        assert!(row[0].as_deref().is_some_and(|id| id.parse::<u64>().is_ok()), "{user}: system id {row:?}");
        assert_eq!(row[1].as_deref(), Some("1"), "{user}: timeline");
        assert!(row[2].as_deref().and_then(parse_lsn).is_some(), "{user}: xlogpos {row:?}");
        assert_eq!(row[3].as_deref(), Some("postgres"), "{user}: dbname");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refusals_carry_their_sqlstate() {
    let pg = cluster().await;
    // A wrong password (28P01), a database that does not exist (3D000), a role pg_hba.conf does not name (28000)
    let wrong = wire(&pg, "scram_user", Some("not it"), "postgres").await.err().expect("wrong password refused");
    assert_eq!(wrong.code(), Some("28P01"), "{wrong}");
    let wrong = wire(&pg, "md5_user", Some("not it"), "postgres").await.err().expect("wrong password refused");
    assert_eq!(wrong.code(), Some("28P01"), "{wrong}");
    let missing = wire(&pg, "postgres", None, "no_such_db").await.err().expect("unknown database refused");
    assert_eq!(missing.code(), Some("3D000"), "{missing}");
    let unnamed = wire(&pg, "nobody_here", None, "postgres").await.err().expect("role without an hba line refused");
    assert_eq!(unnamed.code(), Some("28000"), "{unnamed}");
    // A command the server rejects leaves the error with its code, too
    let mut connection = wire(&pg, "postgres", None, "postgres").await.expect("connect");
    let Err(bad) = connection.simple_query("START_REPLICATION SLOT no_such_slot LOGICAL 0/0").await else {
        panic!("START_REPLICATION of a slot that does not exist succeeded");
    };
    assert_eq!(bad.code(), Some("42704"), "{bad}");
}

/// The next CopyData payload of `stream`, within 20 s.
async fn next(stream: &mut ReplicationStream) -> Option<bytes::Bytes> {
    tokio::time::timeout(Duration::from_secs(20), stream.reader.next_copy_data())
        .await
        .expect("the server sent something within 20 s")
        .expect("stream read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_both_session_carries_a_transaction_a_status_update_and_ends_cleanly() {
    // GIVEN a table in a publication and a pgoutput slot made over the wire client
    let pg = cluster().await;
    let client = connect(&pg.url()).await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION p FOR TABLE t;")
        .await
        .unwrap();
    let mut connection = wire(&pg, "scram_user", Some(PASSWORD), "postgres").await.expect("connect");
    let slot = connection.simple_query("CREATE_REPLICATION_SLOT s LOGICAL pgoutput").await.expect("create slot");
    assert_eq!(slot[0][0].as_deref(), Some("s"), "{slot:?}");
    client.execute("INSERT INTO t VALUES (1, 'one')", &[]).await.unwrap();

    // WHEN the stream starts
    let mut stream = connection
        .start_replication("START_REPLICATION SLOT s LOGICAL 0/0 (proto_version '1', publication_names 'p')")
        .await
        .expect("start replication");

    // THEN XLogData messages carry the transaction: Begin, Relation, Insert, Commit
    let mut tags = Vec::new();
    let mut end_lsn = 0;
    while !tags.contains(&b'C') {
        let data = next(&mut stream).await.expect("stream open");
        match data.first() {
            Some(b'w') => {
                assert!(data.len() > 25, "XLogData header is 1 + 8 + 8 + 8 bytes");
                end_lsn = u64::from_be_bytes(data[9..17].try_into().unwrap());
                tags.push(data[25]);
            }
            Some(b'k') => {}
            other => panic!("unexpected CopyData {other:?}"),
        }
    }
    assert_eq!(tags, b"BRIC", "pgoutput messages of one insert");

    // WHEN the client reports the transaction flushed (and asks for a reply)
    stream.send_status(end_lsn, true).await.expect("status update");

    // THEN the server answers with a keepalive, and the slot confirms up to there
    loop {
        let data = next(&mut stream).await.expect("stream open");
        if data.first() == Some(&b'k') {
            break;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let confirmed: String = client
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's'", &[])
            .await
            .unwrap()
            .get(0);
        if parse_lsn(&confirmed).is_some_and(|lsn| lsn >= end_lsn) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot confirmed only {confirmed}, sent {end_lsn:X}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // AND CopyDone ends the stream from both sides
    stream.finish().await.expect("CopyDone");
    while next(&mut stream).await.is_some() {}
}
