//! Journal integrity: tells corruption from other open failures, quarantines only a corrupt
//! file, and checks the whole file in the background so a large backlog never delays start-up.
//!
//! Guarantees:
//! - A file is renamed aside (`<path>.corrupt-<ms>`, with its `-wal` and `-shm`) only when
//!   SQLite reports it corrupt or not a database. Never deleted.
//! - Any other failure to open (permissions, I/O, a directory in its place) is returned as
//!   `JournalError::Open` naming the file and the cause; the file is left untouched.
//! - Start-up reads only the schema. After a clean stop (the writer sets `clean_shutdown` as
//!   its last act) nothing more is read; after a crash the full `quick_check` runs on its own
//!   thread (`journal-check`) once the gateway serves agents. While it runs it holds one read
//!   snapshot, so the WAL cannot restart: it grows by what is written meanwhile (see
//!   `checkpoint.rs`).
//! - Corruption found by the check, or reported by SQLite to the writer at any time, writes
//!   `<path>.needs-check` with the report and sets `Health::Corrupt`; the gateway then exits
//!   non-zero, and the next start checks the file in full before using it (and quarantines it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::watch;

use super::{JournalError, sibling};
use crate::telemetry;

/// The background integrity check's verdict on the journal file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The check has not finished yet.
    Unchecked,
    /// `quick_check` found nothing wrong.
    Ok,
    /// `quick_check` reported this; the file must be quarantined at the next start.
    Corrupt(String),
}

/// Reads and clears the clean-stop flag: whether the journal was closed cleanly last time.
pub(super) fn take_clean_shutdown(conn: &Connection) -> rusqlite::Result<bool> {
    let clean: i64 = conn.query_row(
        "SELECT value FROM state WHERE name = 'clean_shutdown'",
        [],
        |row| row.get(0),
    )?;
    conn.execute(
        "UPDATE state SET value = 0 WHERE name = 'clean_shutdown'",
        [],
    )?;
    Ok(clean == 1)
}

/// Marks the journal closed cleanly (the writer's last act).
pub(super) fn mark_clean_shutdown(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE state SET value = 1 WHERE name = 'clean_shutdown'",
        [],
    )
    .map(|_| ())
}

/// Whether SQLite says the file itself is damaged (as opposed to unreachable).
pub(super) fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn open_error(path: &Path, e: &rusqlite::Error) -> JournalError {
    let reason = match e {
        rusqlite::Error::SqliteFailure(code, Some(message)) => {
            format!("{message} (SQLite {:?})", code.code)
        }
        other => other.to_string(),
    };
    JournalError::Open {
        path: path.to_owned(),
        reason,
    }
}

/// Opens the journal with `connect`, reading enough to know it is a database. A corrupt file is
/// quarantined and a new one opened; any other failure is returned, the file untouched. A
/// `needs-check` marker from an earlier run gets a full check first.
pub(super) fn open_checked(
    path: &Path,
    connect: impl Fn(&Path) -> rusqlite::Result<Connection>,
) -> Result<Connection, JournalError> {
    let marker = sibling(path, ".needs-check");
    if marker.exists() && path.exists() {
        tracing::warn!(
            journal = %path.display(),
            "An earlier run found this journal damaged; checking it in full before using it."
        );
        match full_check(path) {
            Ok(None) => {
                tracing::info!(journal = %path.display(), "Journal integrity check passed.")
            }
            Ok(Some(problem)) => quarantine(path, &problem),
            Err(e) if is_corruption(&e) => quarantine(path, &e.to_string()),
            Err(e) => return Err(open_error(path, &e)),
        }
    }
    let _ = std::fs::remove_file(&marker);
    let probe = |path: &Path| -> rusqlite::Result<Connection> {
        let conn = connect(path)?;
        conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| {
            row.get::<_, i64>(0)
        })?;
        Ok(conn)
    };
    match probe(path) {
        Ok(conn) => Ok(conn),
        Err(e) if is_corruption(&e) => {
            quarantine(path, &e.to_string());
            probe(path).map_err(|e| open_error(path, &e))
        }
        Err(e) => Err(open_error(path, &e)),
    }
}

/// Runs `PRAGMA quick_check` over the whole file. `Ok(None)` when it is sound.
fn full_check(path: &Path) -> rusqlite::Result<Option<String>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    check_with(&conn)
}

fn check_with(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let lines: Vec<String> = stmt
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(match lines.as_slice() {
        [ok] if ok == "ok" => None,
        _ => Some(lines.join("; ")),
    })
}

/// Renames a corrupt journal aside, keeping it for an operator, and says so at error level.
fn quarantine(path: &Path, problem: &str) {
    let target = sibling(path, &format!(".corrupt-{}", crate::record::now_ms()));
    metrics::counter!(telemetry::JOURNAL_QUARANTINED).increment(1);
    match std::fs::rename(path, &target) {
        Ok(()) => {
            for suffix in ["-wal", "-shm"] {
                let _ = std::fs::rename(sibling(path, suffix), sibling(&target, suffix));
            }
            tracing::error!(
                journal = %path.display(),
                quarantined = %target.display(),
                problem,
                "Journal is corrupt; moved it aside and starting a new one. Its contents were NOT delivered."
            )
        }
        Err(e) => tracing::error!(
            journal = %path.display(),
            problem,
            error = %e,
            "Journal is corrupt and could not be moved aside."
        ),
    }
}

/// The background check's thread, interruptible at shutdown.
pub(super) struct BackgroundCheck {
    thread: std::thread::JoinHandle<()>,
    interrupt: Option<rusqlite::InterruptHandle>,
}

impl BackgroundCheck {
    /// Starts `quick_check` on its own read-only connection. While it runs, `checking` is set
    /// (the checkpoint thread then avoids TRUNCATE, which would wait on this reader).
    pub(super) fn spawn(
        path: &Path,
        health: Arc<watch::Sender<Health>>,
        checking: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY);
        let interrupt = conn.as_ref().ok().map(Connection::get_interrupt_handle);
        let path: PathBuf = path.to_owned();
        checking.store(true, Ordering::Relaxed);
        let thread = std::thread::Builder::new()
            .name("journal-check".into())
            .spawn(move || {
                let verdict = conn.and_then(|conn| check_with(&conn));
                checking.store(false, Ordering::Relaxed);
                match verdict {
                    Ok(None) => {
                        tracing::debug!(journal = %path.display(), "Journal integrity check passed.");
                        health.send_replace(Health::Ok);
                    }
                    Ok(Some(problem)) => report_corruption(&path, problem, &health),
                    Err(e) if is_corruption(&e) => report_corruption(&path, e.to_string(), &health),
                    Err(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) => {}
                    Err(e) => tracing::warn!(
                        journal = %path.display(),
                        error = %e,
                        "Journal integrity check could not run; it runs again at the next start."
                    ),
                }
            })?;
        Ok(Self { thread, interrupt })
    }

    /// Stops the check if it is still running, and waits for its thread.
    pub(super) fn stop(self) {
        if let Some(interrupt) = self.interrupt {
            interrupt.interrupt();
        }
        let _ = self.thread.join();
    }
}

/// Records corruption for the next start and reports it (once).
pub(super) fn report_corruption(path: &Path, problem: String, health: &watch::Sender<Health>) {
    if matches!(*health.borrow(), Health::Corrupt(_)) {
        return;
    }
    let marker = sibling(path, ".needs-check");
    if let Err(e) = std::fs::write(&marker, &problem) {
        tracing::error!(marker = %marker.display(), error = %e, "Cannot record the journal's corruption for the next start.");
    }
    tracing::error!(
        journal = %path.display(),
        problem,
        "Journal integrity check found corruption; the gateway stops, and the next start quarantines the file."
    );
    health.send_replace(Health::Corrupt(problem));
}
