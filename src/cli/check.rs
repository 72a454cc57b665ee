//! `gatehouse check-config FILE [--deep]`: validates a configuration as `run` would, and says
//! what it did not check.
//!
//! Without `--deep` it checks the model only: keys, types, ranges, cross-field rules, IoT Core
//! topic rules, and that certificate files exist. With `--deep` it also checks what the machine
//! decides: that every listener and the metrics address can be bound now, that the journal and
//! the outbox directories can be written (creating them if need be), and that certificates and
//! keys load. Every problem names its key. Exit 0 when valid, 64 otherwise.

use std::path::Path;
use std::process::ExitCode;

use gatehouse::config::{Config, UpstreamConfig};

/// What a plain check leaves out.
const NOT_CHECKED: &str = "not checked: that the listener and metrics ports are free, that the \
    journal and outbox paths are writable, that certificates and keys load (add --deep to check \
    these), and whether the upstream accepts the certificates";

pub fn run(file: &Path, deep: bool) -> ExitCode {
    let config = match Config::from_file(file) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: invalid configuration\n{e}", file.display());
            return ExitCode::from(super::EX_USAGE);
        }
    };
    if !deep {
        println!("{}: valid\n{NOT_CHECKED}", file.display());
        return ExitCode::SUCCESS;
    }
    let problems = deep_problems(&config);
    if problems.is_empty() {
        println!(
            "{}: valid; ports free, paths writable, certificates and keys load\nnot checked: whether the upstream accepts the certificates",
            file.display()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("{}: invalid on this machine", file.display());
        for problem in problems {
            eprintln!("{problem}");
        }
        ExitCode::from(super::EX_USAGE)
    }
}

/// What would stop `run` on this machine, each naming its key.
fn deep_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        if let Err(e) = std::net::TcpListener::bind(listener.bind.0) {
            problems.push(format!(
                "listeners[{i}].bind: cannot listen on {}: {e}",
                listener.bind.0
            ));
        }
    }
    if let Some(metrics) = &config.metrics
        && let Err(e) = std::net::TcpListener::bind(metrics.bind.0)
    {
        problems.push(format!(
            "metrics.bind: cannot listen on {}: {e}",
            metrics.bind.0
        ));
    }
    let journal_dir = config
        .journal
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Err(e) = writable(journal_dir) {
        problems.push(format!("journal.path: {}: {e}", journal_dir.display()));
    }
    if config.journal.path.is_dir() {
        problems.push(format!(
            "journal.path: {} is a directory",
            config.journal.path.display()
        ));
    }
    match &config.upstream {
        UpstreamConfig::Directory { path, .. } => {
            if let Err(e) = writable(path) {
                problems.push(format!("upstream.path: {}: {e}", path.display()));
            }
        }
        UpstreamConfig::Mqtt(_) => {
            if let Err(e) = gatehouse::sink::build(config, None) {
                problems.push(format!("{e:#}"));
            }
        }
        // Its peer is the nucleus, reachable only from the component itself.
        UpstreamConfig::Greengrass(_) => {}
    }
    problems
}

/// Creates `dir` if need be and writes (then removes) a file in it.
fn writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".gatehouse-check-{}", std::process::id()));
    std::fs::write(&probe, b"check")?;
    std::fs::remove_file(&probe)
}
