//! The `gatehouse` command: run the gateway, check a config, decode batch payloads, see and
//! resend dead-lettered records, hash passwords, or write development certificates.
//!
//! Kept thin: argument parsing, logging set-up, config loading, signals and exit codes. The
//! subcommands other than `run` live in `cli/`.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatehouse::config::{Config, MetricsConfig};
use gatehouse::gateway::Gateway;
use gatehouse::telemetry;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Edge aggregation gateway for security agents' MQTT telemetry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (embedded defaults without --config).
    Run {
        /// JSON configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (overrides `metrics.bind`).
        #[arg(long, env = "GATEHOUSE_METRICS", value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Validate a configuration file: exit 0 when valid, else print what is wrong and exit 64.
    CheckConfig {
        file: PathBuf,
        /// Also check this machine: ports free, paths writable, certificates and keys load.
        #[arg(long)]
        deep: bool,
    },
    /// Print batch payloads as JSON lines: files, directories of `*.batch` files, or stdin.
    Decode {
        /// Payload files or directories; stdin when none.
        paths: Vec<PathBuf>,
        /// Print each batch's header before its records.
        #[arg(long)]
        header: bool,
        /// Print fragment records as they are, instead of reassembling large records.
        #[arg(long)]
        fragments: bool,
    },
    /// See, export or resend the records the upstream would not take (`dead_letter`).
    DeadLetter {
        #[command(subcommand)]
        action: cli::dead_letter::DeadLetterAction,
    },
    /// Hash a password read from stdin (argon2id) for a listener's `auth.passwordFile`.
    PasswordHash {
        /// Print a whole `USER:HASH` line for the password file.
        user: Option<String>,
    },
    /// Write a CA, a server certificate and agent certificates into DIR, for trying the
    /// gateway out with mutual TLS (not for production).
    DevCerts {
        /// Directory to write into (created if missing).
        dir: PathBuf,
        /// How many agent certificates: agent-1 ... agent-N (CN = the agent id).
        #[arg(long, value_name = "N", default_value_t = 1)]
        agents: u32,
        /// Another DNS name or IP address for the server certificate, besides localhost and
        /// 127.0.0.1 (repeatable).
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
        /// Validity in days.
        #[arg(long, value_name = "D", default_value_t = 365)]
        days: u32,
        /// Replace existing files (without it, nothing is written if any exists).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, metrics } => run(config, metrics),
        Command::CheckConfig { file, deep } => cli::check::run(&file, deep),
        Command::Decode {
            paths,
            header,
            fragments,
        } => cli::decode::run(&paths, cli::decode::Options { header, fragments }),
        Command::DeadLetter { action } => cli::dead_letter::run(action),
        Command::PasswordHash { user } => cli::password::run(user.as_deref()),
        Command::DevCerts {
            dir,
            agents,
            server_names,
            days,
            force,
        } => cli::dev_certs::run(&cli::dev_certs::Options {
            dir,
            agents,
            server_names,
            days,
            force,
        }),
    }
}

fn run(config_path: Option<PathBuf>, metrics: Option<SocketAddr>) -> ExitCode {
    if config_path.is_none()
        && let Some(env) = gatehouse::greengrass::Environment::detect()
    {
        return run_component(env, metrics);
    }
    let config = match &config_path {
        Some(path) => Config::from_file(path),
        None => Ok(Config::embedded()),
    };
    let mut config = match config {
        Ok(config) => config,
        Err(e) => {
            let source =
                config_path.map_or("embedded defaults".into(), |p| p.display().to_string());
            eprintln!("{source}: invalid configuration\n{e}");
            return ExitCode::from(cli::EX_USAGE);
        }
    };
    if let Some(addr) = metrics {
        config.metrics = Some(MetricsConfig {
            bind: gatehouse::config::Bind(addr),
        });
    }
    let _set_log_level = init_logging(&config.log_level);
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        telemetry::install(config.metrics.as_ref().map(|m| m.bind.0))?;
        let gateway = Gateway::bind(config).await?;
        gateway.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("Gateway failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs as a Greengrass component: configuration, lifecycle and upstream through the nucleus.
fn run_component(env: gatehouse::greengrass::Environment, metrics: Option<SocketAddr>) -> ExitCode {
    let set_log_level = init_logging("info");
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(gatehouse::greengrass::runner::run(
        env,
        metrics,
        set_log_level,
        shutdown_signal(),
    ));
    match result {
        Ok(()) => {
            tracing::info!("Component stopped.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("Component failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Each agent holds a socket: lift the open-files soft limit to the hard limit (Debian's
/// default soft limit, 1024, would refuse the 1,000th agent), and say so.
fn raise_open_files_limit() {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, hard)) if soft < hard => match rlimit::increase_nofile_limit(hard) {
            Ok(now) => tracing::info!(from = soft, to = now, "Raised the open-files limit."),
            Err(e) => {
                tracing::warn!(limit = soft, error = %e, "Cannot raise the open-files limit.")
            }
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Cannot read the open-files limit."),
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    raise_open_files_limit();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gatehouse")
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!(error = %e, "Failed to start the runtime.");
            None
        }
    }
}

/// Logs to stdout at `level` (`RUST_LOG`, when set, wins); returns how to change the level
/// later (`logLevel` applied live under Greengrass).
fn init_logging(level: &str) -> gatehouse::greengrass::runner::SetLogLevel {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, reload};
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stdout)
                .with_ansi(false),
        )
        .init();
    Box::new(move |level: &str| {
        if from_env {
            return;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => {
                let _ = handle.reload(filter);
            }
            Err(e) => tracing::warn!(level, error = %e, "Ignoring an invalid logLevel."),
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
