//! The `gatehouse` command's subcommands other than `run`, one module each: `decode` (batch
//! payloads as JSON lines), `check` (`check-config`), `dead_letter` (the operator's view of
//! `dead_letter`), `password` (`password-hash`, lines for a listener's `auth.passwordFile`),
//! `dev_certs` (`dev-certs`, a CA, server and agent certificates for trying mutual TLS). Each
//! returns the process exit code and writes its errors to stderr naming the input.

pub mod check;
pub mod dead_letter;
pub mod decode;
pub mod dev_certs;
pub mod password;

use std::process::ExitCode;

/// Exit code for an invalid configuration (EX_USAGE in sysexits.h).
pub const EX_USAGE: u8 = 64;

/// Whether a write failed only because the reader went away (`gatehouse decode | head`): not
/// an error for a command that prints.
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The exit code of a command that printed what it could: success when it did, or when the
/// reader of its output closed the pipe.
pub fn printed(result: anyhow::Result<()>, command: &str) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatehouse {command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
