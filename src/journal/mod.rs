//! The durable journal: every accepted agent message is a row in SQLite (WAL mode) before it is
//! acknowledged, and stays there until the upstream sink confirmed the batch that carries it.
//!
//! # Design constraints
//!
//! - **Acknowledge after commit.** `Journal::append` resolves only after the transaction holding
//!   the row committed with the configured `synchronous` level (FULL by default, so a PUBACKed
//!   message survives power loss).
//! - **Group commit.** One OS thread (`journal-writer`) owns the write connection. Each turn it
//!   blocks for one command, takes every command already queued (up to `commitMaxMessages`,
//!   optionally waiting `commitMaxDelayMs` for more) and runs them in one transaction. Under load
//!   many messages share one fsync; idle, a lone message is committed at once.
//! - **Nothing blocks the reactor.** Writes go through the writer thread over a bounded channel;
//!   reads (`JournalReader`) use their own connection inside `spawn_blocking`.
//! - **Release only on confirmation.** Rows are deleted only by `Command::Confirm` (the sink
//!   confirmed the batch that holds them) or moved to `dead_letter` with a reason. Never silently.
//! - **Checkpoints off the commit path.** A `journal-checkpoint` thread folds the WAL back into
//!   the database every `CHECKPOINT_EVERY` (PASSIVE: it never blocks the writer), so commits
//!   never pay for it and pages rewritten within the interval are copied once.
//! - **One writer per file.** `Journal::open` takes an exclusive lock on `<path>.lock`.
//! - **Bounded disk.** Records are charged their payload, topic and client id plus 64 bytes
//!   against `journal.maxBytes`. When an append would pass it, the oldest QoS 0 records the
//!   batcher has not reserved (`Journal::reserve`, in the writer's order, so a record is either
//!   evicted or batched, never both) are evicted; if none is left, the append is refused with
//!   `JournalError::Full`. A QoS 1/2 record (acknowledged to its agent) is never evicted.
//! - **Corruption is loud.** A file that fails `quick_check` is renamed to
//!   `<path>.corrupt-<ms>` and reported at error level; the gateway then starts a new journal.
//!
//! # Schema (see `schema.rs`)
//!
//! ```text
//! records     (seq PK autoincrement, received_at, client_id, topic, qos, payload,
//!              content_type, user_properties, expires_at, stream, priority, size)
//! batches     (batch_seq PK, sink, first_seq, last_seq, record_count, created_at, payload)
//! dedup       (seq PK, key = sha256(topic 0x00 payload)[..16], seen_at), in arrival order
//! dead_letter (seq PK, ..., reason, moved_at)
//! state       (name PK, value): next_batch_seq, batched_through
//! ```
//!
//! # Invariants
//!
//! - `records.seq` strictly increases in commit order and is never reused (AUTOINCREMENT).
//! - Every record with `seq <= batched_through` belongs to exactly one row of `batches`, or has
//!   been released (its batch confirmed) or dead-lettered.
//! - `batch_seq` is never reused; an unconfirmed batch keeps its seq and its exact payload across
//!   retries and restarts, so the cloud can deduplicate by (gateway, batch_seq).
//!
//! # Recovery
//!
//! Start-up needs no replay: committed rows are the state. Unconfirmed `batches` are re-sent
//! first, then batching resumes after `batched_through`.

mod dedup;
mod reader;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{JournalConfig, Synchronous};
use crate::record::Record;

pub use reader::{BatcherState, JournalReader, StoredBatch};
pub use writer::WriterGuard;

/// Commands queued to the writer thread at most; senders wait beyond it (backpressure).
const COMMAND_QUEUE: usize = 16 * 1024;

/// Why a journal operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// SQLite refused (disk full, I/O error, ...). The transaction was rolled back: nothing in
    /// it was committed, so nothing in it may be acknowledged. Often transient (disk full).
    #[error("journal write failed: {0}")]
    Sqlite(Arc<rusqlite::Error>),
    /// The journal was written by a newer Gatehouse. Not recoverable by this build.
    #[error("journal schema version {found} is newer than this build supports ({supported})")]
    TooNew { found: i64, supported: i64 },
    /// Another process holds the journal. Check for a second gatehouse on the same path.
    #[error("journal {0} is locked: is another gatehouse running on this journal?")]
    Locked(PathBuf),
    /// The journal directory or lock file could not be created.
    #[error("journal {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// `journal.maxBytes` is reached and nothing may be evicted: the message is refused (not
    /// stored). Transient: room returns as the upstream confirms batches.
    #[error("journal is full (journal.maxBytes = {max_bytes})")]
    Full { max_bytes: u64 },
    /// The writer thread has stopped (shutdown); nothing more can be committed.
    #[error("journal is closed")]
    Closed,
}

impl From<rusqlite::Error> for JournalError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(Arc::new(e))
    }
}

/// What happened to an appended record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Committed with this journal sequence number.
    Journaled(u64),
    /// Its dedup key was seen within the window: acknowledged, not stored again.
    Duplicate,
}

/// A batch the batcher sealed, to be recorded before it is handed to a sink.
#[derive(Debug, Clone)]
pub struct SealedBatch {
    pub batch_seq: u64,
    pub sink: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_count: u32,
    pub created_at: i64,
    pub payload: Bytes,
}

/// What confirming a batch released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    pub rows: u64,
    pub bytes: u64,
}

type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

/// Work for the writer thread.
enum Command {
    Append {
        record: Record,
        dedup_key: Option<[u8; 32]>,
        reply: Option<Reply<Appended>>,
    },
    Seal {
        batch: SealedBatch,
        reply: Reply<()>,
    },
    Confirm {
        batch_seq: u64,
        reply: Reply<Released>,
    },
    DeadLetter {
        seq: u64,
        reason: String,
        reply: Reply<()>,
    },
    Reserve {
        first: u64,
        last: u64,
        reply: Reply<Vec<u64>>,
    },
}

/// A cheap, clonable handle to the journal writer.
#[derive(Clone)]
pub struct Journal {
    commands: mpsc::Sender<Command>,
    committed: watch::Receiver<u64>,
}

/// Opens (creating or migrating) the journal, and starts its writer thread.
///
/// Returns the write handle, a reader for the batcher, and the guard that joins the writer
/// thread once every `Journal` handle is dropped.
pub fn open(config: &JournalConfig) -> Result<(Journal, JournalReader, WriterGuard), JournalError> {
    open_with_page_limit(config, None)
}

/// `open`, with the writer's file capped at `max_pages` pages: how tests make a disk full.
fn open_with_page_limit(
    config: &JournalConfig,
    max_pages: Option<u64>,
) -> Result<(Journal, JournalReader, WriterGuard), JournalError> {
    let path = config.path.clone();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| JournalError::Io {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
    }
    let lock = lock_file(&path)?;
    quarantine_if_corrupt(&path);
    let mut conn = connect(&path, config.synchronous)?;
    schema::migrate(&mut conn)?;
    if let Some(pages) = max_pages {
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
    }
    let reader = JournalReader::open(&path)?;
    let last_seq: u64 = conn.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'records'), 0)",
        [],
        |row| row.get(0),
    )?;
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (committed_tx, committed_rx) = watch::channel(last_seq);
    let guard = writer::spawn(
        writer::Writer::new(conn, commands_rx, committed_tx, config, lock)?,
        &path,
    )?;
    Ok((
        Journal {
            commands: commands_tx,
            committed: committed_rx,
        },
        reader,
        guard,
    ))
}

impl Journal {
    /// Queues a record and returns a receiver that resolves once it is committed (or found to be
    /// a duplicate). Awaiting the send applies backpressure when the writer is behind.
    pub async fn append(
        &self,
        record: Record,
        dedup_key: Option<[u8; 32]>,
    ) -> Result<oneshot::Receiver<Result<Appended, JournalError>>, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Append {
            record,
            dedup_key,
            reply: Some(reply),
        })
        .await?;
        Ok(rx)
    }

    /// Queues a record nobody waits for (QoS 0). It is committed with the next group.
    pub async fn append_unacknowledged(
        &self,
        record: Record,
        dedup_key: Option<[u8; 32]>,
    ) -> Result<(), JournalError> {
        self.send(Command::Append {
            record,
            dedup_key,
            reply: None,
        })
        .await
    }

    /// Records a sealed batch (and advances `batched_through`); returns once committed.
    pub async fn seal(&self, batch: SealedBatch) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Seal { batch, reply }).await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// The sink confirmed `batch_seq`: deletes its rows and the batch; returns once committed.
    pub async fn confirm(&self, batch_seq: u64) -> Result<Released, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Confirm { batch_seq, reply }).await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Moves a record that can never be delivered to `dead_letter`, with the reason.
    pub async fn dead_letter(&self, seq: u64, reason: String) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::DeadLetter { seq, reason, reply })
            .await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// The batcher has read records `first..=last`: from now on none of them may be evicted.
    /// Returns the QoS 0 seqs of that range still present; any other QoS 0 record the batcher
    /// read was evicted meanwhile and must not be batched.
    pub async fn reserve(&self, first: u64, last: u64) -> Result<Vec<u64>, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Reserve { first, last, reply }).await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// A watch of the highest committed journal sequence number.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    async fn send(&self, command: Command) -> Result<(), JournalError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| JournalError::Closed)
    }
}

/// The dedup key of a message: SHA-256 over topic, a zero byte, and payload.
pub fn dedup_key(topic: &str, payload: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(topic.as_bytes());
    hasher.update([0u8]);
    hasher.update(payload);
    hasher.finalize().into()
}

/// Opens a connection with the journal's pragmas.
fn connect(path: &Path, synchronous: Synchronous) -> Result<rusqlite::Connection, JournalError> {
    let conn = rusqlite::Connection::open(path)?;
    // A TRUNCATE checkpoint may hold the write lock for a while; the writer waits (on its own
    // thread) rather than failing a group of messages.
    conn.busy_timeout(Duration::from_secs(60))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "Journal is not in WAL mode.");
    }
    conn.pragma_update(None, "synchronous", synchronous.pragma())?;
    // 16 MiB page cache: the B-trees being appended to stay in memory.
    conn.pragma_update(None, "cache_size", -16_384)?;
    // Checkpoints run on their own thread (`writer::spawn`), not inside commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // Once the WAL restarts, it is truncated back to this size rather than left at its peak.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    Ok(conn)
}

fn lock_file(path: &Path) -> Result<std::fs::File, JournalError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| JournalError::Io {
            path: lock_path.clone(),
            reason: e.to_string(),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Locked(path.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(JournalError::Io {
            path: lock_path,
            reason: e.to_string(),
        }),
    }
}

/// Renames a journal that SQLite cannot read or that fails `quick_check`, keeping it for an
/// operator, and says so at error level. Never deletes it.
fn quarantine_if_corrupt(path: &Path) {
    if !path.exists() {
        return;
    }
    let verdict = rusqlite::Connection::open(path)
        .and_then(|conn| conn.query_row("PRAGMA quick_check", [], |row| row.get::<_, String>(0)));
    let problem = match verdict {
        Ok(ok) if ok == "ok" => return,
        Ok(report) => report,
        Err(e) => e.to_string(),
    };
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".corrupt-{}", crate::record::now_ms()));
    let target = PathBuf::from(target);
    metrics::counter!(crate::telemetry::JOURNAL_QUARANTINED).increment(1);
    match std::fs::rename(path, &target) {
        Ok(()) => {
            for suffix in ["-wal", "-shm"] {
                let mut from = path.as_os_str().to_owned();
                from.push(suffix);
                let mut to = target.as_os_str().to_owned();
                to.push(suffix);
                let _ = std::fs::rename(from, to);
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

#[cfg(test)]
mod tests;
