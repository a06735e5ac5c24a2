//! A throwaway PostgreSQL cluster: initdb into a fresh directory, start on a
//! free loopback port with `wal_level=logical`, remove everything on drop.
//!
//! The demo uses it so a first run needs no database, and the integration
//! tests use it so they can stop, crash and restart Postgres on purpose.
//! Postgres refuses to run as root, so as root the server runs as the
//! `postgres` user (or `nobody`).

use std::fs::{self, File};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How to stop the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: fast shutdown, a clean checkpoint.
    Fast,
    /// SIGQUIT: crash-like; the next start replays WAL.
    Immediate,
}

/// Why the cluster could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum ThrowawayPostgresError {
    /// No server binaries on this machine.
    #[error("PostgreSQL server binaries were not found (looked in /usr/lib/postgresql/*/bin and PATH); install them with `apt-get update && apt-get install -y postgresql`")]
    BinariesMissing,
    /// initdb failed.
    #[error("initdb failed: {0}")]
    Initdb(String),
    /// The server did not accept connections in time.
    #[error("postgres did not become ready within 30 s; server log tail:\n{0}")]
    StartTimeout(String),
    /// A filesystem or process error.
    #[error("throwaway postgres: {0}")]
    Io(#[from] std::io::Error),
}

/// A private PostgreSQL server for one demo run or one test.
pub struct ThrowawayPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    server: Option<Child>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl ThrowawayPostgres {
    /// Creates and starts a new cluster (blocking, about a second).
    pub fn start() -> Result<Self, ThrowawayPostgresError> {
        let bin = find_bin_dir().ok_or(ThrowawayPostgresError::BinariesMissing)?;
        let unique = format!(
            "outbox-relay-pg-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
        );
        let dir = std::env::temp_dir().join(unique);
        fs::create_dir_all(&dir)?;
        let owner = if unsafe { libc::geteuid() } == 0 { Some(unprivileged_user()?) } else { None };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let mut pg = ThrowawayPostgres { bin, dir, port: 0, owner, server: None };
        pg.initdb()?;
        let mut last_error = None;
        for _ in 0..5 {
            pg.port = free_port()?;
            match pg.start_again() {
                Ok(()) => return Ok(pg),
                Err(e) => {
                    let log = fs::read_to_string(pg.log_path()).unwrap_or_default();
                    if !log.contains("could not bind") {
                        return Err(e);
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or(ThrowawayPostgresError::StartTimeout(String::new())))
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` database as the `postgres` superuser (trust auth).
    pub fn url(&self) -> String {
        self.url_for("postgres", "postgres")
    }

    /// URL for another user or database on this cluster.
    pub fn url_for(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.server.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the server and waits for it to exit.
    pub fn stop(&mut self, mode: StopMode) -> Result<(), ThrowawayPostgresError> {
        if let Some(mut child) = self.server.take() {
            let signal = match mode {
                StopMode::Fast => libc::SIGINT,
                StopMode::Immediate => libc::SIGQUIT,
            };
            unsafe { libc::kill(child.id() as i32, signal) };
            child.wait()?;
        }
        Ok(())
    }

    /// (Re)starts the server on the same data directory and port.
    pub fn start_again(&mut self) -> Result<(), ThrowawayPostgresError> {
        let data = self.dir.join("data");
        let log = File::options().create(true).append(true).open(self.log_path())?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid))?;
        }
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "wal_level=logical"])
            .args(["-c", "max_replication_slots=20", "-c", "max_wal_senders=20"])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=128MB"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.drop_privileges(&mut command);
        let child = command.spawn()?;
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !self.is_running() {
                break;
            }
            if self.ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.stop(StopMode::Immediate);
        Err(ThrowawayPostgresError::StartTimeout(self.log_tail()))
    }

    fn initdb(&self) -> Result<(), ThrowawayPostgresError> {
        let mut command = Command::new(self.bin.join("initdb"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-N", "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.drop_privileges(&mut command);
        let output = command.output()?;
        if !output.status.success() {
            return Err(ThrowawayPostgresError::Initdb(String::from_utf8_lossy(&output.stderr).into_owned()));
        }
        let hba = "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";
        fs::write(self.dir.join("data").join("pg_hba.conf"), hba)?;
        Ok(())
    }

    fn ready(&self) -> bool {
        if TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            return false;
        }
        let isready = self.bin.join("pg_isready");
        if !isready.exists() {
            return true;
        }
        Command::new(isready)
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn drop_privileges(&self, command: &mut Command) {
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = self.stop(StopMode::Fast);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(Path::new)
        .find(|dir| dir.join("postgres").exists() && dir.join("initdb").exists())
        .map(Path::to_path_buf)
}

fn unprivileged_user() -> Result<(u32, u32), ThrowawayPostgresError> {
    for name in [c"postgres", c"nobody"] {
        let entry = unsafe { libc::getpwnam(name.as_ptr()) };
        if !entry.is_null() {
            let entry = unsafe { &*entry };
            return Ok((entry.pw_uid, entry.pw_gid));
        }
    }
    Err(ThrowawayPostgresError::Io(std::io::Error::other(
        "running as root but neither a `postgres` nor a `nobody` user exists to run the server",
    )))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
