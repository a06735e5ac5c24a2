//! A throwaway PostgreSQL cluster: initdb into a fresh directory, start on a
//! free loopback port with `wal_level=logical`, remove everything on drop.
//!
//! The demo uses it so a first run needs no database, and the integration
//! tests use it so they can stop, crash and restart Postgres on purpose.
//! Postgres refuses to run as root, so as root the directory is handed to the
//! `postgres` user (or `nobody`) and the server runs as that user. The
//! directory lives under [`std::env::temp_dir`], which that user must be able
//! to traverse (true for `/tmp`).
//!
//! `fsync=off` and `full_page_writes=off`: the data is thrown away anyway,
//! and only an OS crash loses unsynced writes, so a crash of the server
//! ([`StopMode::Immediate`]) still recovers every committed transaction from
//! WAL. `synchronous_commit` stays on on purpose: off, a server crash loses
//! the last ~200 ms of commits the client was told had succeeded, which
//! would turn crash tests into false alarms (with fsync off it costs little).

use std::fs::{self, File};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop waits before escalating (Fast -> Immediate -> SIGKILL), so
/// that a stuck replication client cannot hang a test or the demo forever.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// How to stop the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: fast shutdown; sessions are terminated and a clean checkpoint
    /// is written.
    Fast,
    /// SIGQUIT: crash-like, no checkpoint; the next start replays WAL, as
    /// after a power loss or an OOM kill.
    Immediate,
}

/// Why the cluster could not be created, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ThrowawayPostgresError {
    /// No server binaries on this machine; the message says how to get them.
    #[error("PostgreSQL server binaries were not found (looked in /usr/lib/postgresql/*/bin and PATH); install them with `apt-get update && apt-get install -y postgresql`")]
    BinariesMissing,
    /// initdb exited with an error; carries its stderr.
    #[error("initdb failed ({status}): {stderr}")]
    Initdb {
        /// How initdb exited.
        status: std::process::ExitStatus,
        /// What initdb printed on stderr.
        stderr: String,
    },
    /// The server did not accept connections in time, or exited while
    /// starting; carries the tail of the server log, which says why.
    #[error("postgres did not become ready on port {port} (it exited, or 30 s passed); server log tail:\n{log_tail}")]
    StartTimeout {
        /// The port the server was to listen on.
        port: u16,
        /// The end of the server log.
        log_tail: String,
    },
    /// A filesystem, user lookup or process error.
    #[error("throwaway postgres: {0}")]
    Io(#[from] std::io::Error),
}

/// How to set up a cluster beyond the defaults (see [`ThrowawayPostgres::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Serve TLS (`ssl = on`) with these files.
    pub tls: Option<ServerTls>,
    /// The whole `pg_hba.conf`, replacing the default trust-everything one
    /// (e.g. `hostssl` lines only, or `cert` authentication).
    pub hba: Option<String>,
}

/// Server-side TLS files (PEM). They are copied into the cluster directory,
/// owned by the server's user, the key with mode 0600 as Postgres demands.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Server certificate (chain).
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// CA whose client certificates the server accepts (`ssl_ca_file`), if any.
    pub ca_file: Option<PathBuf>,
}

/// A private PostgreSQL server for one demo run or one test, reachable on
/// 127.0.0.1 with trust authentication as the `postgres` superuser.
pub struct ThrowawayPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// uid/gid the server runs as when we are root.
    owner: Option<(u32, u32)>,
    /// Behind a mutex so that `is_running(&self)` can reap the child.
    server: Mutex<Option<Child>>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl ThrowawayPostgres {
    /// Creates a fresh cluster and starts it (blocking, about a second).
    ///
    /// Retries on another port if the chosen one was taken in the meantime
    /// (tests start clusters in parallel).
    pub fn start() -> Result<Self, ThrowawayPostgresError> {
        Self::start_with(ClusterOptions::default())
    }

    /// Like [`start`](Self::start), with TLS and/or a custom `pg_hba.conf`.
    pub fn start_with(options: ClusterOptions) -> Result<Self, ThrowawayPostgresError> {
        let bin = find_bin_dir().ok_or(ThrowawayPostgresError::BinariesMissing)?;
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let unique =
            format!("outbox-relay-pg-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(unique);
        fs::create_dir(&dir)?;
        // From here on Drop removes the directory, whatever fails.
        let mut pg = ThrowawayPostgres { bin, dir, port: 0, owner: None, server: Mutex::new(None) };
        if unsafe { libc::geteuid() } == 0 {
            let (uid, gid) = unprivileged_user()?;
            std::os::unix::fs::chown(&pg.dir, Some(uid), Some(gid))?;
            pg.owner = Some((uid, gid));
        }
        pg.initdb(&options)?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            pg.port = free_port()?;
            let log_before = fs::metadata(pg.log_path()).map(|m| m.len()).unwrap_or(0);
            match pg.start_again() {
                Ok(()) => return Ok(pg),
                Err(e) if attempts < 5 && pg.log_since(log_before).contains("could not bind") => drop(e),
                Err(e) => return Err(e),
            }
        }
    }

    /// The TCP port on 127.0.0.1; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` database as the `postgres` superuser (trust
    /// auth), usable by tokio-postgres and by the relay's config.
    pub fn url(&self) -> String {
        self.url_for("postgres", "postgres")
    }

    /// URL for another user or database on this cluster (create them first).
    pub fn url_for(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's log file (all starts append to it); read it when a test
    /// needs to know what the server did.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Whether the server process (the postmaster) is still alive; false
    /// after [`stop`](Self::stop) or if it died on its own.
    pub fn is_running(&self) -> bool {
        let mut server = self.server.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        matches!(server.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Stops the server and waits until the process has exited. Escalates
    /// (Fast -> Immediate -> SIGKILL) if it takes longer than 20 s, e.g.
    /// because a replication client stopped reading. No-op if not running.
    pub fn stop(&mut self, mode: StopMode) -> Result<(), ThrowawayPostgresError> {
        let server = self.server.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(mut child) = server.take() else { return Ok(()) };
        let pid = child.id() as libc::pid_t;
        let first = match mode {
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        };
        for signal in [first, libc::SIGQUIT, libc::SIGKILL] {
            // The child is not reaped yet, so the pid cannot have been reused.
            unsafe { libc::kill(pid, signal) };
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        child.wait()?;
        Ok(())
    }

    /// Starts the server again on the same data directory and port, and waits
    /// until it accepts connections (after an Immediate stop, that includes
    /// WAL recovery). No-op if it is already running.
    pub fn start_again(&mut self) -> Result<(), ThrowawayPostgresError> {
        if self.is_running() {
            return Ok(());
        }
        let log = File::options().create(true).append(true).open(self.log_path())?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid))?;
        }
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_replication_slots=20", "-c", "max_wal_senders=20"])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=128MB"])
            // A file, never an unread pipe: a full pipe would block the server.
            .stdout(log.try_clone()?)
            .stderr(log);
        self.prepare(&mut command);
        *self.server.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(command.spawn()?);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline && self.is_running() {
            if self.ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.stop(StopMode::Immediate);
        Err(ThrowawayPostgresError::StartTimeout { port: self.port, log_tail: self.log_tail() })
    }

    fn initdb(&self, options: &ClusterOptions) -> Result<(), ThrowawayPostgresError> {
        let data = self.dir.join("data");
        let mut command = Command::new(self.bin.join("initdb"));
        command.arg("-D").arg(&data).args(["-N", "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"]);
        self.prepare(&mut command);
        let output = command.output()?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            return Err(ThrowawayPostgresError::Initdb { status: output.status, stderr });
        }
        // Trust for normal and replication connections (the relay can stream
        // logical replication); the socket only listens on 127.0.0.1 anyway.
        let hba = "local all all trust\nlocal replication all trust\n\
                   host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";
        fs::write(data.join("pg_hba.conf"), options.hba.as_deref().unwrap_or(hba))?;
        // In the config file rather than on the command line, so a test can
        // lower it with ALTER SYSTEM to check the relay's wal_level message.
        let mut conf = fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut conf, b"\nwal_level = logical\n")?;
        if let Some(tls) = &options.tls {
            // Relative paths are read from the data directory.
            self.install_file(&tls.cert_file, &data.join("server.crt"), 0o644)?;
            self.install_file(&tls.key_file, &data.join("server.key"), 0o600)?;
            let mut settings = String::from("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            if let Some(ca) = &tls.ca_file {
                self.install_file(ca, &data.join("root.crt"), 0o644)?;
                settings.push_str("ssl_ca_file = 'root.crt'\n");
            }
            std::io::Write::write_all(&mut conf, settings.as_bytes())?;
        }
        Ok(())
    }

    /// Copies `from` to `to`, owned by the server's user, with `mode`.
    fn install_file(&self, from: &Path, to: &Path, mode: u32) -> Result<(), ThrowawayPostgresError> {
        use std::os::unix::fs::PermissionsExt;
        fs::copy(from, to)?;
        fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(to, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// True once a real connection is accepted (not just a TCP handshake).
    fn ready(&self) -> bool {
        let isready = self.bin.join("pg_isready");
        if !isready.exists() {
            return TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        Command::new(isready)
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs in our directory (the unprivileged user may not be able to enter
    /// the caller's), without our PG* environment, and as that user if root.
    fn prepare(&self, command: &mut Command) {
        command.current_dir(&self.dir).stdin(Stdio::null());
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
            command.env_remove(var);
        }
        if let Some((uid, gid)) = self.owner {
            // std also drops root's supplementary groups when uid is set.
            command.uid(uid).gid(gid);
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let log = fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(log.get(offset as usize..).unwrap_or_default()).into_owned()
    }

    fn log_tail(&self) -> String {
        let log = self.log_since(0);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ThrowawayPostgres {
    /// Fast shutdown, wait for the exit, then delete the directory.
    fn drop(&mut self) {
        let _ = self.stop(StopMode::Fast);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Newest `/usr/lib/postgresql/<ver>/bin`, else `pg_config --bindir`, else PATH.
fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    if let Some(bin) = from_pg_config.filter(|bin| has_server(bin)) {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| has_server(dir))
}

/// uid and gid of `postgres`, else `nobody` (getpwnam_r: tests run in threads).
fn unprivileged_user() -> Result<(u32, u32), ThrowawayPostgresError> {
    for name in [c"postgres", c"nobody"] {
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buffer = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut result) };
        if rc == 0 && !result.is_null() {
            return Ok((entry.pw_uid, entry.pw_gid));
        }
    }
    Err(ThrowawayPostgresError::Io(std::io::Error::other(
        "running as root, but neither a `postgres` nor a `nobody` user exists to run the server as",
    )))
}

/// A port the kernel just had free; the caller retries if it is lost.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
