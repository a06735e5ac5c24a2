//! Command line: `run`, `migrate`, `demo`, `check`, `status`, `replay`, all
//! reading `--config FILE`; `run`, `check` and `replay` use the sink
//! `sink.kind` chose (Kafka or Pub/Sub).
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::SinkKind;
use crate::config::{Config, ConfigError, LogFormat};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::relay::{Relay, RelayError};
use crate::shutdown::{self, Shutdown};
use crate::sink::kafka::{KafkaSink, KafkaSinkError};
use crate::sink::pubsub::{PubSubSink, PubSubSinkError};
use crate::sink::{AnySink, Sink};

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
        /// Capture mode to demonstrate (default: `source.mode` of --config, else poll).
        #[arg(long, value_enum)]
        mode: Option<DemoMode>,
    },
    /// Check config, Postgres, schema, privileges, broker and topics; exit 0 only if all pass.
    Check {
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Backlog, oldest unpublished event, recent throughput, and which relay publishes.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-publish already-published events (those rows are not changed); with
    /// --dead-lettered, re-drive dead-lettered rows (marked done once acknowledged).
    Replay {
        /// Lowest id (position), inclusive.
        #[arg(long)]
        from_id: Option<i64>,
        /// Highest id (position), inclusive.
        #[arg(long)]
        to_id: Option<i64>,
        /// Written at or after: RFC 3339 time or a duration ago (e.g. 24h).
        #[arg(long)]
        since: Option<String>,
        /// Written before: RFC 3339 time or a duration ago.
        #[arg(long)]
        until: Option<String>,
        /// Only this aggregate.
        #[arg(long)]
        aggregate_id: Option<String>,
        /// Only this event type.
        #[arg(long)]
        event_type: Option<String>,
        /// Only count what would be re-published.
        #[arg(long)]
        dry_run: bool,
        /// Re-drive dead-lettered rows instead of published ones; each is
        /// marked done again (dead_lettered_at cleared, or deleted in delete
        /// mode) once the broker acknowledged it.
        #[arg(long)]
        dead_lettered: bool,
    },
}

/// The capture mode `demo --mode` shows.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DemoMode {
    /// Claim unpublished rows, woken by NOTIFY.
    Poll,
    /// Tail a logical replication slot.
    Replication,
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
    let run_command = matches!(cli.command, Command::Run);
    if !run_command {
        // One-shot commands behave like Unix tools when piped into `head`.
        // SAFETY: restoring the default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        // The command runs as a task on the runtime's workers, not on this
        // thread: its wake-ups by the publish stage, the Postgres drivers and
        // the broker client stay among the workers instead of each one
        // unparking the main thread (a futex round trip per batch at low rates).
        // (The demo's mock cluster cannot move between threads: it stays here.)
        Ok(runtime) => runtime.block_on(async {
            if matches!(cli.command, Command::Demo { .. }) {
                return dispatch(cli).await;
            }
            tokio::spawn(dispatch_tool(cli)).await.unwrap_or_else(|panicked| {
                Err(CliError::Runtime(anyhow::anyhow!("the command's task panicked: {panicked}")))
            })
        }),
        Err(e) => Err(CliError::Runtime(anyhow::Error::new(e).context("cannot start the async runtime"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(CliError::Runtime(e)) => {
            // Once: `run` reports through its log (JSON for log shippers),
            // one-shot commands as a plain `error:` line.
            if run_command {
                error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), CliError> {
    if let Command::Demo { events, mode } = cli.command {
        let config = Config::extract(cli.config.as_deref())?;
        let _ = init_logging("warn", LogFormat::Text);
        let mode = mode.map(|m| match m {
            DemoMode::Poll => crate::config::SourceMode::Poll,
            DemoMode::Replication => crate::config::SourceMode::Replication,
        });
        return crate::demo::run(events, config, mode).await.map_err(CliError::Runtime);
    }
    dispatch_tool(cli).await
}

/// Every command but the demo: `run` and the operator tools.
async fn dispatch_tool(cli: Cli) -> Result<(), CliError> {
    let config = crate::startup::load(cli.config.as_deref())?;
    crate::postgres::set_relay_id(config.replicas.resolved_relay_id());
    let reload = init_logging(&config.log.level, config.log.format);
    match cli.command {
        Command::Demo { .. } => Ok(()),
        Command::Run => {
            // Every line this relay logs names it, so several relays' logs can be told apart.
            let span = tracing::info_span!("relay", relay_id = %crate::postgres::relay_id());
            tracing::Instrument::instrument(run(config, cli.config, reload), span).await
        }
        Command::Migrate => migrate(&config).await.map_err(CliError::Runtime),
        Command::Check { json } => check(&config, json).await,
        Command::Status { json } => status(&config, json).await,
        Command::Replay { from_id, to_id, since, until, aggregate_id, event_type, dry_run, dead_lettered } => {
            let parse = |flag: &'static str, value: Option<String>| -> Result<_, CliError> {
                value
                    .map(|v| crate::replay::parse_time(&v))
                    .transpose()
                    .map_err(|e| CliError::Config(ConfigError::Invalid { key: flag, problem: e }))
            };
            let selection = crate::replay::Selection {
                from_id,
                to_id,
                since: parse("--since", since)?,
                until: parse("--until", until)?,
                aggregate_id,
                event_type,
                dead_lettered,
            };
            replay(&config, &selection, dry_run).await
        }
    }
}

/// Changes the log filter of a running process (SIGHUP).
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the tracing subscriber; `RUST_LOG` overrides the configured level.
pub fn init_logging(level: &str, format: LogFormat) -> LogReload {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry.with(output.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry.with(output).try_init(),
    };
    Box::new(move |level| {
        handle.reload(EnvFilter::try_new(level).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
    })
}

/// On SIGHUP, re-reads the configuration and applies its log level; other
/// settings need a restart.
fn reload_on_sighup(path: Option<PathBuf>, reload: LogReload) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match crate::startup::load(path.as_deref()) {
                Ok(config) => match reload(&config.log.level) {
                    Ok(()) => {
                        info!(level = %config.log.level, "SIGHUP: log level reloaded (other settings need a restart)")
                    }
                    Err(e) => warn!(error = %e, "SIGHUP: log level not changed"),
                },
                Err(e) => warn!(error = %e, "SIGHUP: configuration not reloaded"),
            }
        }
    });
    Ok(())
}

/// The configured sink (`sink.kind`); a bad producer setting or credentials
/// file is a configuration error (exit 2).
fn build_sink(config: &Config) -> Result<AnySink, CliError> {
    match config.sink.kind {
        SinkKind::Kafka => {
            let queue = config.source.batch_size * (config.source.max_in_flight_batches + 1);
            KafkaSink::new(&config.sink.kafka, queue).map(AnySink::Kafka).map_err(|e| match e {
                KafkaSinkError::Config(_) | KafkaSinkError::SecretFile(_) => {
                    CliError::Config(ConfigError::Load(e.to_string()))
                }
                other => CliError::Runtime(other.into()),
            })
        }
        SinkKind::PubSub => PubSubSink::new(&config.sink.pubsub, &config.sink.topic)
            .map(AnySink::PubSub)
            .map_err(|PubSubSinkError::Config(message)| CliError::Config(ConfigError::Load(message))),
    }
}

async fn check(config: &Config, json: bool) -> Result<(), CliError> {
    let sink = build_sink(config).map_err(|e| match e {
        CliError::Config(e) => e.to_string(),
        CliError::Runtime(e) => format!("{e:#}"),
    });
    let results = crate::check::run(config, sink.as_ref().map_err(|e| e.clone())).await;
    let passed = if json {
        println!("{}", serde_json::to_string_pretty(&results).unwrap_or_default());
        results.iter().all(|r| r.verdict != crate::check::Verdict::Fail)
    } else {
        crate::check::print(&results)
    };
    if passed {
        Ok(())
    } else {
        Err(CliError::Runtime(anyhow::anyhow!("some checks failed")))
    }
}

async fn status(config: &Config, json: bool) -> Result<(), CliError> {
    let status = crate::status::gather(config).await.map_err(|e| CliError::Runtime(e.into()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
    } else {
        crate::status::print(&status);
    }
    Ok(())
}

async fn replay(config: &Config, selection: &crate::replay::Selection, dry_run: bool) -> Result<(), CliError> {
    let runtime = |e: crate::replay::ReplayError| CliError::Runtime(e.into());
    if dry_run {
        let (count, first, last) = crate::replay::count(config, selection).await.map_err(runtime)?;
        match (first, last) {
            (Some(first), Some(last)) => println!("would re-publish {count} events (ids {first}..={last})"),
            _ => println!("would re-publish 0 events: nothing matches"),
        }
        return Ok(());
    }
    let sink = build_sink(config)?;
    sink.reachable(Duration::from_secs(10)).await.map_err(|e| CliError::Runtime(anyhow::anyhow!(e)))?;
    let started = std::time::Instant::now();
    let summary = crate::replay::run(config, &sink, selection, |done, total| {
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-6);
        eprint!("\rreplayed {done}/{total} ({rate:.0}/s)   ");
    })
    .await
    .map_err(runtime)?;
    eprintln!();
    println!("re-published {} of {} matching events", summary.published, summary.matched);
    Ok(())
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let mut connection = crate::postgres::connect(&config.postgres, "outbox-relay migrate").await?;
    let applied = crate::migrate::run(connection.client_mut()).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    } else {
        println!("applied migrations: {applied:?}");
    }
    println!("{}", crate::migrate::reconcile_notify_trigger(&connection.client, config).await?);
    if config.source.mode == crate::config::SourceMode::Replication {
        for step in crate::source::replication::setup(&connection.client, config).await? {
            println!("{step}");
        }
    }
    Ok(())
}

async fn run(config: Config, path: Option<PathBuf>, reload: LogReload) -> Result<(), CliError> {
    // Everything that can reject the configuration runs before anything is
    // bound or connected: a configuration error exits 2 even when the HTTP
    // port is taken or the broker is down.
    let metrics = Metrics::for_config(&config);
    let health = Health::new();
    let sink = Arc::new(build_sink(&config)?);
    let drain = config.shutdown.drain_timeout;
    let (trigger, shutdown) = shutdown::channel();
    let relay = Relay::new(config.clone(), sink.clone(), metrics.clone(), health.clone(), shutdown.clone()).map_err(
        |e| match e {
            RelayError::Config(m) => CliError::Config(ConfigError::Load(m)),
            other => CliError::Runtime(other.into()),
        },
    )?;
    shutdown::on_signals(trigger, config.shutdown.drain_timeout).context("cannot install signal handlers")?;
    reload_on_sighup(path, reload).context("cannot install the SIGHUP handler")?;
    health.beat();
    crate::http::serve(&config.http.listen, metrics.clone(), health.clone(), shutdown.clone()).await.with_context(
        || format!("cannot serve http.listen {} (set http.listen to a free address)", config.http.listen),
    )?;
    if !wait_for_broker(&sink, &relay, &config, &health, shutdown.clone()).await {
        return Ok(());
    }
    health.set_broker(true);
    health.set_waiting(None);
    if let AnySink::PubSub(pubsub) = sink.as_ref() {
        check_static_pubsub_topic(pubsub, &config.sink.topic).await;
    }
    tokio::spawn(crate::monitor::watch_broker(sink.clone(), health.clone(), shutdown.clone()));
    tokio::spawn(crate::monitor::watch_backlog(config.clone(), metrics.clone(), shutdown.clone()));
    crate::systemd::notify("READY=1");
    let result = relay.run().await;
    crate::systemd::notify("STOPPING=1");
    result.map_err(|e| CliError::Runtime(e.into()))?;
    sink.flush(drain).await;
    info!("stopped");
    Ok(())
}

/// With a static `sink.topic`, says at start-up if the Pub/Sub topic is
/// missing (events would fail and stay unpublished until it exists).
async fn check_static_pubsub_topic(sink: &PubSubSink, template: &str) {
    if template.contains('{') {
        return;
    }
    match sink.check_topic(template, Duration::from_secs(5)).await {
        Err(e) if e.is_not_found() && !sink.creates_topics() => {
            error!(
                topic = template,
                "{}; events stay unpublished and are retried until it exists",
                sink.explain(&e, template)
            )
        }
        _ => {}
    }
}

/// Retries the broker until it answers; false if asked to stop first.
/// Meanwhile readiness tells the truth: it names what the relay waits for,
/// and Postgres is probed so `"postgres"` says whether it is reachable;
/// `status` lists the relay as waiting (it holds no lanes yet, and does not
/// count in anyone's fair share).
async fn wait_for_broker(
    sink: &AnySink,
    relay: &Relay<AnySink>,
    config: &Config,
    health: &Health,
    mut shutdown: Shutdown,
) -> bool {
    let mut backoff = crate::relay::reconnect_backoff();
    let mut postgres: Option<crate::postgres::Connection> = None;
    let mut announced = false;
    loop {
        match sink.reachable(Duration::from_secs(5)).await {
            Ok(()) => {
                if let (Some(connection), true) = (&postgres, announced) {
                    if let Err(e) = relay.stop_waiting(&connection.client).await {
                        debug!(error = %e, "could not clear this relay's waiting entry; it expires by itself");
                    }
                }
                return true;
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(%error, retry_in = ?delay, "{} is not reachable yet", sink.name());
                health.set_waiting(Some(format!("{} is not reachable yet: {error}", sink.name())));
                if postgres.is_none() {
                    // The relay reconnects by itself after the wait; this connection only reports.
                    postgres = crate::postgres::connect(&config.postgres, "outbox-relay start-up probe").await.ok();
                    health.set_postgres(postgres.is_some());
                }
                if let Some(connection) = &postgres {
                    // Visible until a little after the next attempt, renewed on each one.
                    match relay.announce_waiting(&connection.client, delay + Duration::from_secs(10)).await {
                        Ok(()) => announced = true,
                        Err(e) => debug!(error = %e, "this relay cannot show itself as waiting in status"),
                    }
                }
                health.beat();
                tokio::select! {
                    _ = shutdown.wait() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
