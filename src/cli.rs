//! Command line: `run`, `migrate`, `demo`, all reading `--config FILE`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, ConfigError, LogFormat};
use crate::metrics::Metrics;
use crate::relay::{Relay, RelayError};
use crate::shutdown::{self, Shutdown};
use crate::sink::kafka::{KafkaSink, KafkaSinkError};
use crate::sink::Sink;

/// Publishes a Postgres transactional outbox to Kafka, at least once, in per-aggregate order.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
pub struct Cli {
    /// TOML configuration file; every key can be overridden by OUTBOX_RELAY_<SECTION>__<KEY>.
    #[arg(long, global = true, env = "OUTBOX_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay events from the outbox to the broker until SIGTERM/SIGINT.
    Run,
    /// Install or upgrade the outbox schema (idempotent).
    Migrate,
    /// Zero-setup demo: throwaway Postgres + in-process mock Kafka, relay, verify, summarize.
    Demo {
        /// Number of sample events to enqueue.
        #[arg(long, default_value_t = 400)]
        events: usize,
    },
}

/// Why a command failed, mapped to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Exit code 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Exit code 1.
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(dispatch(cli)),
        Err(e) => Err(CliError::Runtime(anyhow::Error::new(e).context("cannot start the async runtime"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(CliError::Runtime(e)) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Demo { events } => {
            init_logging("warn", LogFormat::Text);
            crate::demo::run(events).await.map_err(CliError::Runtime)
        }
        Command::Run => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(&config.log.level, config.log.format);
            run(config).await
        }
        Command::Migrate => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(&config.log.level, config.log.format);
            migrate(&config).await.map_err(CliError::Runtime)
        }
    }
}

/// Installs the tracing subscriber; `RUST_LOG` overrides the configured level.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let mut connection = crate::postgres::connect(&config.postgres, "outbox-relay migrate").await?;
    let applied = crate::migrate::run(connection.client_mut()).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    } else {
        println!("applied migrations: {applied:?}");
    }
    Ok(())
}

async fn run(config: Config) -> Result<(), CliError> {
    let (trigger, shutdown) = shutdown::channel();
    shutdown::on_signals(trigger).context("cannot install signal handlers")?;
    let queue = config.source.batch_size * (config.source.max_in_flight_batches + 1);
    let sink = Arc::new(KafkaSink::new(&config.sink.kafka, queue).map_err(|e| match e {
        KafkaSinkError::Config(_) => CliError::Config(ConfigError::Load(e.to_string())),
        other => CliError::Runtime(other.into()),
    })?);
    if !wait_for_broker(&sink, shutdown.clone()).await {
        return Ok(());
    }
    let drain = config.shutdown.drain_timeout;
    let relay = Relay::new(config, sink.clone(), Metrics::new(), shutdown).map_err(|e| match e {
        RelayError::Config(m) => CliError::Config(ConfigError::Load(m)),
        other => CliError::Runtime(other.into()),
    })?;
    relay.run().await.map_err(|e| CliError::Runtime(e.into()))?;
    sink.flush(drain).await;
    info!("stopped");
    Ok(())
}

/// Retries the broker until it answers; false if asked to stop first.
async fn wait_for_broker(sink: &KafkaSink, mut shutdown: Shutdown) -> bool {
    let mut backoff = crate::relay::reconnect_backoff();
    loop {
        match sink.check_reachable(Duration::from_secs(5)).await {
            Ok(()) => return true,
            Err(error) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(%error, retry_in = ?delay, "Kafka is not reachable yet");
                tokio::select! {
                    _ = shutdown.wait() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
