//! `gatehouse password-hash [USER]`: reads a password from stdin (one line, the trailing newline
//! dropped) and prints its argon2id PHC string, or a whole `USER:HASH` line for a listener's
//! `auth.passwordFile`. The password is never echoed nor written anywhere else.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, bail};

/// Passwords longer than this are refused (argon2 takes any length; a file this size on stdin
/// is a mistake).
const MAX_PASSWORD_BYTES: usize = 4096;

pub fn run(user: Option<&str>) -> ExitCode {
    match hash_stdin(user) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatehouse password-hash: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hash_stdin(user: Option<&str>) -> anyhow::Result<String> {
    if let Some(user) = user
        && (user.is_empty() || user.contains(':') || user.chars().any(char::is_whitespace))
    {
        bail!("user {user:?}: must be non-empty, without ':' or white space");
    }
    let mut input = Vec::new();
    std::io::stdin()
        .take(MAX_PASSWORD_BYTES as u64 + 2)
        .read_to_end(&mut input)
        .context("reading the password from stdin")?;
    let password = input
        .strip_suffix(b"\n")
        .map(|p| p.strip_suffix(b"\r").unwrap_or(p))
        .unwrap_or(&input);
    if password.is_empty() {
        bail!("no password on stdin (e.g. `printf %s \"$PASSWORD\" | gatehouse password-hash`)");
    }
    if password.len() > MAX_PASSWORD_BYTES || password.contains(&b'\n') {
        bail!("stdin holds more than one line or over {MAX_PASSWORD_BYTES} bytes: not a password");
    }
    let hash = gatehouse::listener::identity::hash_password(password);
    Ok(match user {
        Some(user) => format!("{user}:{hash}"),
        None => hash,
    })
}
