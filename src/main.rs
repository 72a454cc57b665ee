//! The `gatehouse` command: run the gateway, check a config, or decode a batch payload.
//!
//! Kept thin: argument parsing, logging set-up, config loading, signals and exit codes.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatehouse::config::Config;
use gatehouse::gateway::Gateway;
use gatehouse::{envelope, telemetry};

/// Exit code for an invalid configuration (EX_USAGE in sysexits.h).
const EX_USAGE: u8 = 64;

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
    },
    /// Validate a configuration file: exit 0 when valid, else print what is wrong and exit 64.
    CheckConfig { file: PathBuf },
    /// Print the records of one batch payload (a file, or stdin) as JSON lines.
    Decode {
        /// The payload file; stdin when absent.
        file: Option<PathBuf>,
        /// Print the batch header first.
        #[arg(long)]
        header: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { file } => match Config::from_file(&file) {
            Ok(_) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: invalid configuration\n{e}", file.display());
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Decode { file, header } => match decode(file.as_ref(), header) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let source = file.map_or("stdin".to_string(), |f| f.display().to_string());
                eprintln!("gatehouse decode: {source}: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(config_path: Option<PathBuf>) -> ExitCode {
    let config = match &config_path {
        Some(path) => Config::from_file(path),
        None => Ok(Config::embedded()),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            let source =
                config_path.map_or("embedded defaults".into(), |p| p.display().to_string());
            eprintln!("{source}: invalid configuration\n{e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    init_logging(&config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gatehouse")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "Failed to start the runtime.");
            return ExitCode::FAILURE;
        }
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

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .init();
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

fn decode(file: Option<&PathBuf>, header: bool) -> anyhow::Result<()> {
    let payload = match file {
        Some(path) => std::fs::read(path)?,
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
    };
    let (head, records) = envelope::decode(&payload)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if header {
        serde_json::to_writer(&mut out, &head)?;
        out.write_all(b"\n")?;
    }
    for record in &records {
        serde_json::to_writer(&mut out, &envelope::record_json(record))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
