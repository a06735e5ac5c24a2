//! TLS to Postgres, end to end: a private cluster with `ssl = on` and a CA,
//! server and client certificate made here with the `openssl` command line;
//! both the tokio-postgres connections (`check`, polling) and the
//! replication wire client, in every sslmode that matters.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::relay::{cli, relay_env, RelayProcess};
use common::{consume, ClusterOptions, ServerTls, TestBroker, ThrowawayPostgres};
use outbox_relay::config::PostgresConfig;
use outbox_relay::source::replication::wire::{ConnectParams, ReplicationConnection, WireTls};

const TOPIC: &str = "outbox.Order";

/// Only TLS connections over TCP (plaintext gets Postgres's "no encryption" refusal).
const HBA_TLS_ONLY: &str = "local all all trust\nlocal replication all trust\n\
                            hostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n";
/// TLS plus a client certificate whose CN is the user.
const HBA_CLIENT_CERT: &str = "local all all trust\nlocal replication all trust\n\
                               hostssl all all 127.0.0.1/32 cert\nhostssl replication all 127.0.0.1/32 cert\n";

/// A test CA, a second unrelated CA, a server certificate for `localhost`
/// only (RSA), and a client certificate for user `postgres` (ECDSA P-256).
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the openssl command line (apt-get install openssl)");
    assert!(output.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "rsa:2048",
            "-sha256",
            "-days",
            "2",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN=outbox-relay test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

fn issue(dir: &Path, name: &str, subject: &str, key_args: &[&str], extensions: &str, serial: &str) {
    let mut request = vec!["req", "-new", "-nodes"];
    request.extend_from_slice(key_args);
    let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
    request.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", subject]);
    openssl(dir, &request);
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            serial,
            "-days",
            "2",
            "-sha256",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &ext,
        ],
    );
}

fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    issue(
        d,
        "server",
        "/CN=localhost",
        &["-newkey", "rsa:2048"],
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        "2",
    );
    issue(
        d,
        "client",
        "/CN=postgres",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        "3",
    );
    Pki {
        ca: d.join("ca.crt"),
        other_ca: d.join("other-ca.crt"),
        server_cert: d.join("server.crt"),
        server_key: d.join("server.key"),
        client_cert: d.join("client.crt"),
        client_key: d.join("client.key"),
        _dir: dir,
    }
}

fn start_tls_cluster(pki: &Pki, hba: &str) -> ThrowawayPostgres {
    ThrowawayPostgres::start_with(ClusterOptions {
        tls: Some(ServerTls {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            ca_file: Some(pki.ca.clone()),
        }),
        hba: Some(hba.into()),
    })
    .expect("postgres with ssl = on")
}

/// `postgres://postgres@HOST:PORT/postgres` plus `query` (libpq spellings).
fn url(pg: &ThrowawayPostgres, host: &str, query: &str) -> String {
    let base = format!("postgres://postgres@{host}:{}/postgres", pg.port());
    if query.is_empty() {
        base
    } else {
        format!("{base}?{query}")
    }
}

fn pg_config(url: &str) -> PostgresConfig {
    PostgresConfig { url: url.into(), connect_timeout: Duration::from_secs(10), ..PostgresConfig::default() }
}

/// `outbox-relay check` against `url` (the broker address is a closed port
/// unless given: only the postgres line matters then).
fn check(url: &str, brokers: &str, extra: &[(&'static str, String)]) -> (i32, String) {
    let mut env = relay_env(url, brokers);
    env.extend_from_slice(extra);
    let (code, out, err) = cli(&["check"], &env);
    assert!(!err.contains("panicked") && !out.contains("panicked"), "{out}{err}");
    (code, format!("{out}{err}"))
}

fn closed_port() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

/// The replication wire client with the relay's own TLS resolution.
async fn wire_connect(config: &PostgresConfig) -> Result<ReplicationConnection, String> {
    let prepared = outbox_relay::postgres::prepare(config).map_err(|e| e.to_string())?;
    let params = ConnectParams::from_config(&prepared.config, "outbox-relay tls test")
        .map_err(|e| e.to_string())?
        .with_tls(WireTls { settings: prepared.tls, config: prepared.rustls });
    ReplicationConnection::connect(&params).await.map_err(|e| e.to_string())
}

/// Whether this session's connection is encrypted, and with which protocol.
async fn ssl_of_own_session(client: &tokio_postgres::Client) -> (bool, Option<String>) {
    let row = client.query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_full_with_the_right_ca_and_host_name_passes_check_and_streams_replication() {
    let pki = make_pki();
    let pg = start_tls_cluster(&pki, HBA_TLS_ONLY);
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 1);
    let url = url(&pg, "localhost", &format!("sslmode=verify-full&sslrootcert={}", pki.ca.display()));
    let mut env = relay_env(&url, &broker.bootstrap());
    env.push(("OUTBOX_RELAY_SOURCE__MODE", "replication".into()));
    env.push(("OUTBOX_RELAY_PUBLISHED__MODE", "none".into()));

    // migrate and check (tokio-postgres connections) over verified TLS.
    let (code, out, err) = cli(&["migrate"], &env);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&["check"], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("[ ok ] postgres") && out.contains("connected to postgres@localhost"), "{out}");

    // A replication-mode relay streams an event.
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    let connection = outbox_relay::postgres::connect(&pg_config(&url), "tls test").await.expect("verified TLS connect");
    assert!(ssl_of_own_session(&connection.client).await.0);
    let status = outbox_relay::postgres::tls_status(&connection.client, &pg_config(&url)).await;
    assert!(status.starts_with("TLSv1.3 TLS_") && status.ends_with(", sslmode=verify-full"), "{status}");
    connection
        .client
        .batch_execute("SELECT outbox.enqueue('Order', 'tls-1', 'OrderPlaced', '{\"seq\":1}')")
        .await
        .unwrap();
    let consumed = consume(&broker.bootstrap(), &[TOPIC], 1, Duration::from_secs(30));
    assert_eq!(consumed.len(), 1, "{}", relay.log());
    assert_eq!(consumed[0].key.as_deref(), Some(&b"tls-1"[..]));

    // The walsender's connection is the encrypted one.
    let row = connection
        .client
        .query_one(
            "SELECT s.ssl, s.version FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
             WHERE r.application_name LIKE 'outbox-relay%'",
            &[],
        )
        .await
        .expect("the relay's walsender");
    assert!(row.get::<_, bool>(0), "replication connection not encrypted");
    assert!(row.get::<_, Option<String>>(1).unwrap_or_default().starts_with("TLSv1."), "{row:?}");
    assert!(!relay.log().contains("panicked"), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_host_name_the_certificate_does_not_cover_and_verify_ca_accepts_it() {
    let pki = make_pki();
    let pg = start_tls_cluster(&pki, HBA_TLS_ONLY);
    let expected = "certificate for localhost is not valid for host 127.0.0.1 (sslmode=verify-full): \
                    use the host name in the certificate, or sslmode=verify-ca";

    // The certificate names only localhost; we connect to 127.0.0.1.
    let wrong_host = url(&pg, "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", pki.ca.display()));
    let (code, out) = check(&wrong_host, &closed_port(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[FAIL] postgres") && out.contains(expected), "{out}");
    let error = wire_connect(&pg_config(&wrong_host)).await.err().expect("replication connect must be refused");
    assert_eq!(error, expected);

    // verify-ca checks the chain only: the same host is fine.
    let ca_only = url(&pg, "127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={}", pki.ca.display()));
    let connection = outbox_relay::postgres::connect(&pg_config(&ca_only), "tls test").await.expect("verify-ca");
    assert!(ssl_of_own_session(&connection.client).await.0);
    let mut wire = wire_connect(&pg_config(&ca_only)).await.expect("verify-ca replication connect");
    assert_eq!(wire.simple_query("IDENTIFY_SYSTEM").await.expect("identify").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_from_another_ca() {
    let pki = make_pki();
    let pg = start_tls_cluster(&pki, HBA_TLS_ONLY);
    let wrong_ca = url(&pg, "localhost", &format!("sslmode=verify-full&sslrootcert={}", pki.other_ca.display()));
    let expected = format!(
        "the certificate of localhost is not signed by a CA in sslrootcert {} (sslmode=verify-full): \
         set sslrootcert to the CA certificate that issued the server's certificate",
        pki.other_ca.display()
    );
    let (code, out) = check(&wrong_ca, &closed_port(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[FAIL] postgres") && out.contains(&expected), "{out}");
    assert_eq!(wire_connect(&pg_config(&wrong_ca)).await.err().expect("refused"), expected);

    // No sslrootcert: the system trust store, which does not know the test CA.
    let system = url(&pg, "localhost", "sslmode=verify-full");
    let error = outbox_relay::postgres::connect(&pg_config(&system), "tls test").await.err().expect("refused");
    assert!(error.to_string().contains("not signed by a CA in the system trust store"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_and_prefer_encrypt_without_a_root_certificate() {
    let pki = make_pki();
    let pg = start_tls_cluster(&pki, HBA_TLS_ONLY);
    // 127.0.0.1 is not in the certificate, and no CA is given: require does not verify.
    for query in ["sslmode=require", "", "sslmode=prefer"] {
        let url = url(&pg, "127.0.0.1", query);
        let (_, out) = check(&url, &closed_port(), &[]);
        assert!(out.contains("[ ok ] postgres"), "{query}: {out}");
        let connection = outbox_relay::postgres::connect(&pg_config(&url), "tls test").await.expect(query);
        let (ssl, version) = ssl_of_own_session(&connection.client).await;
        assert!(ssl && version.unwrap_or_default().starts_with("TLSv1."), "{query}");
        let mut wire = wire_connect(&pg_config(&url)).await.expect("replication connect");
        assert_eq!(wire.simple_query("IDENTIFY_SYSTEM").await.expect("identify").len(), 1, "{query}");
    }
    // The config key wins over the URL: sslmode=disable in the URL, require in [postgres].
    let url = url(&pg, "127.0.0.1", "sslmode=disable");
    let (_, out) = check(&url, &closed_port(), &[("OUTBOX_RELAY_POSTGRES__SSLMODE", "require".into())]);
    assert!(out.contains("[ ok ] postgres"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_against_a_tls_only_server_surfaces_postgres_refusal() {
    let pki = make_pki();
    let pg = start_tls_cluster(&pki, HBA_TLS_ONLY);
    let plain = url(&pg, "127.0.0.1", "sslmode=disable");
    let (code, out) = check(&plain, &closed_port(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("[FAIL] postgres")
            && out.contains("no pg_hba.conf entry for host \"127.0.0.1\"")
            && out.contains("no encryption")
            && out.contains("set postgres.sslmode"),
        "{out}"
    );
    let error = wire_connect(&pg_config(&plain)).await.err().expect("refused");
    assert!(
        error.contains("no pg_hba.conf entry") && error.contains("no encryption") && error.contains("28000"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_is_refused_and_prefer_falls_back() {
    let pg = ThrowawayPostgres::start().unwrap();
    let expected = "does not accept TLS connections (sslmode=require)";
    let require = url(&pg, "127.0.0.1", "sslmode=require");
    let (code, out) = check(&require, &closed_port(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(expected), "{out}");
    let error = wire_connect(&pg_config(&require)).await.err().expect("refused");
    assert!(error.contains(expected), "{error}");

    let prefer = url(&pg, "127.0.0.1", "");
    let connection = outbox_relay::postgres::connect(&pg_config(&prefer), "tls test").await.expect("prefer, plaintext");
    assert!(!ssl_of_own_session(&connection.client).await.0);
    assert_eq!(
        outbox_relay::postgres::tls_status(&connection.client, &pg_config(&prefer)).await,
        "no TLS, sslmode=prefer"
    );
    let mut wire = wire_connect(&pg_config(&prefer)).await.expect("prefer, plaintext replication");
    assert_eq!(wire.simple_query("IDENTIFY_SYSTEM").await.expect("identify").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_authentication_from_config_keys() {
    let pki = make_pki();
    let pg = start_tls_cluster(&pki, HBA_CLIENT_CERT);
    let plain_url = url(&pg, "localhost", "");
    let keys = [
        ("OUTBOX_RELAY_POSTGRES__SSLMODE", "verify-full".to_owned()),
        ("OUTBOX_RELAY_POSTGRES__SSLROOTCERT", pki.ca.display().to_string()),
        ("OUTBOX_RELAY_POSTGRES__SSLCERT", pki.client_cert.display().to_string()),
        ("OUTBOX_RELAY_POSTGRES__SSLKEY", pki.client_key.display().to_string()),
    ];
    let (_, out) = check(&plain_url, &closed_port(), &keys);
    assert!(out.contains("[ ok ] postgres"), "{out}");

    // Without the client certificate Postgres says why.
    let (code, out) = check(&plain_url, &closed_port(), &keys[..2]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("certificate") && out.contains("set postgres.sslcert and postgres.sslkey"), "{out}");

    // The replication client presents it too (URL form this time).
    let url = url(
        &pg,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        ),
    );
    let mut wire = wire_connect(&pg_config(&url)).await.expect("replication connect with a client certificate");
    assert_eq!(wire.simple_query("IDENTIFY_SYSTEM").await.expect("identify").len(), 1);

    // A key without its certificate is a configuration error naming the key.
    let (code, out) = check(&plain_url, &closed_port(), &[keys[3].clone()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("postgres.sslcert"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_binds_the_channel_on_both_clients() {
    let pki = make_pki();
    let hba = "local all all trust\nlocal replication all trust\n\
               hostssl all postgres 127.0.0.1/32 trust\nhostssl all relay 127.0.0.1/32 scram-sha-256\n";
    let pg = start_tls_cluster(&pki, hba);
    let admin = outbox_relay::postgres::connect(&pg_config(&url(&pg, "127.0.0.1", "sslmode=require")), "tls test")
        .await
        .expect("admin connect");
    admin
        .client
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE relay LOGIN REPLICATION PASSWORD 'pw-s3cret'",
        )
        .await
        .unwrap();
    let ca = pki.ca.display();
    let good =
        format!("postgres://relay:pw-s3cret@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca}", pg.port());
    // The server offers SCRAM-SHA-256-PLUS over TLS; both clients take it, so a wrong binding would fail here.
    let connection =
        outbox_relay::postgres::connect(&pg_config(&good), "tls test").await.expect("tokio-postgres SCRAM");
    assert!(ssl_of_own_session(&connection.client).await.0);
    let mut wire = wire_connect(&pg_config(&good)).await.expect("replication SCRAM-SHA-256-PLUS");
    assert_eq!(wire.simple_query("IDENTIFY_SYSTEM").await.expect("identify").len(), 1);

    let bad = good.replace("pw-s3cret", "wrong-pw");
    let error = wire_connect(&pg_config(&bad)).await.err().expect("wrong password refused");
    assert!(error.contains("password authentication failed") && !error.contains("wrong-pw"), "{error}");
}
