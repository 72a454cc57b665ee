//! The durable journal: every accepted agent message is a row in SQLite (WAL mode) before it is
//! acknowledged, and stays there until the upstream sink confirmed the batch that carries it.
//!
//! # Design constraints
//!
//! - **Acknowledge after commit.** `Journal::append` resolves only after the transaction holding
//!   the row committed with the configured `synchronous` level (FULL by default, so a PUBACKed
//!   message survives power loss). A failed transaction answers each of its commands with the
//!   error; no failure is ever reported as a success of any kind.
//! - **Group commit.** One OS thread (`journal-writer`) owns the write connection. Each turn it
//!   blocks for one command, takes every command already queued (up to `commitMaxMessages`,
//!   optionally waiting `commitMaxDelayMs` for more) and runs them in one transaction. Under load
//!   many messages share one fsync; idle, a lone message is committed at once.
//! - **Nothing blocks the reactor.** Writes go through the writer thread over a channel bounded
//!   in commands (`COMMAND_QUEUE`) and in bytes (`QUEUE_BYTES`: a sender waits for room, so
//!   256 KiB packets cannot pile up GiBs); reads (`JournalReader`) use their own connection
//!   inside `spawn_blocking`.
//! - **Release only on confirmation.** Rows are deleted only by `Command::Confirm` (the sink
//!   confirmed the batch that holds them), moved to `dead_letter` with a reason (a record no
//!   batch can hold; a batch the upstream refuses every time), or, QoS 0 only, evicted when the
//!   journal is full (counted). Never silently.
//! - **Checkpoints off the commit path.** A `journal-checkpoint` thread folds the WAL back into
//!   the database (PASSIVE: it never blocks the writer), so commits never pay for it.
//! - **One writer per file.** `Journal::open` takes an exclusive lock on `<path>.lock`.
//! - **Bounded disk.** Records are charged their payload, topic and client id plus 64 bytes
//!   against `journal.maxBytes`. When an append would pass it, the oldest QoS 0 records the
//!   batcher has not reserved (`Journal::reserve`, in the writer's order, so a record is either
//!   evicted or batched, never both) are evicted, and the dedup keys they armed are disarmed; if
//!   none is left, the append is refused with `JournalError::Full`. A QoS 1/2 record
//!   (acknowledged to its agent) is never evicted.
//! - **Fast start, whatever the backlog.** Start-up reads a few rows: the live row and byte
//!   counts are kept in `state`. After a clean stop (`state.clean_shutdown`) the file is not
//!   scanned; after a crash a full `quick_check` runs in the background (`integrity.rs`), not
//!   before agents are served. At any time, SQLite reporting corruption to the writer counts as
//!   the check failing.
//! - **Quarantine only for corruption.** A file SQLite reports as corrupt or not a database is
//!   renamed to `<path>.corrupt-<ms>` and reported at error level; the gateway then starts a new
//!   journal. Any other open failure (permissions, I/O) fails the start naming the file and the
//!   cause, and leaves the file untouched. Corruption found later (background check, or an error
//!   the writer gets) is recorded in `<path>.needs-check` and ends the process (non-zero); the
//!   next start checks the file in full before using it.
//!
//! # Schema (see `schema.rs`)
//!
//! ```text
//! records     (seq PK autoincrement, received_at, client_id, topic, qos, payload,
//!              content_type, user_properties, expires_at, stream, priority, size)
//! batches     (batch_seq PK, sink, first_seq, last_seq, record_count, created_at, payload)
//! dedup       (seq PK, key = dedup_key(agent, topic, payload)[..16], seen_at, record_seq)
//!              in arrival order; record_seq names the QoS 0 record a key armed
//! dead_letter (seq PK, received_at, client_id, topic, qos, payload, reason, moved_at,
//!              content_type, user_properties, expires_at, size, batch_seq)
//! state       (name PK, value): next_batch_seq, batched_through, rows, bytes, clean_shutdown
//! ```
//!
//! # Invariants
//!
//! - `records.seq` strictly increases in commit order and is never reused (AUTOINCREMENT).
//! - Every record with `seq <= batched_through` belongs to exactly one row of `batches`, or has
//!   been released (its batch confirmed) or dead-lettered.
//! - `batch_seq` is never reused; an unconfirmed batch keeps its seq and its exact payload across
//!   retries and restarts, so the cloud can deduplicate by (gateway, batch_seq). The one
//!   exception: a batch larger than the current sink's payload limit (sealed for another sink)
//!   is re-batched under new batch seqs (`Journal::reseal`); its records keep their `seq`.
//!   A new journal numbers from the current time in microseconds (`schema::migrate`), so a
//!   deleted or quarantined journal's successor does not reuse its predecessor's batch seqs.
//! - `state.rows` and `state.bytes` equal `COUNT(*)` and `SUM(size)` of `records`, updated in
//!   the transaction that changes them.
//!
//! # Recovery
//!
//! Start-up needs no replay: committed rows are the state. Unconfirmed `batches`, whichever sink
//! sealed them, are re-sent first (`Journal::adopt` hands them to the current sink), then
//! batching resumes after `batched_through`.

mod checkpoint;
mod dead_letters;
mod dedup;
mod integrity;
mod quota;
mod reader;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::config::{JournalConfig, Synchronous};
use crate::record::Record;

pub use dead_letters::{DeadLetter, RetrySelection, list_dead_letters, retry_dead_letters};
pub use integrity::Health;
pub use reader::{BatcherState, JournalReader, StoredBatch};
pub use writer::WriterGuard;

/// Commands queued to the writer thread at most; senders wait beyond it (backpressure).
const COMMAND_QUEUE: usize = 16 * 1024;
/// Record bytes (as `accounted_size` charges them) queued to the writer at most, including the
/// group being committed; senders wait beyond it.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;

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
    /// The journal file exists but cannot be opened for a reason other than corruption
    /// (permissions, I/O error, a directory in its place). It was left untouched.
    #[error("cannot open journal {path}: {reason} (the file was left untouched)")]
    Open { path: PathBuf, reason: String },
    /// A dead-letter command was pointed at a file that is not a Gatehouse journal (no schema
    /// version); it was left untouched.
    #[error("{0} is not a Gatehouse journal (it has no journal schema); check the path")]
    NotAJournal(PathBuf),
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

/// What happened to an appended record that the journal accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Committed with this journal sequence number.
    Journaled(u64),
    /// The same agent sent the same topic and payload within the dedup window, and that earlier
    /// copy is journaled or was delivered: acknowledged, not stored again.
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

/// Which unconfirmed batches `Journal::reseal` replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    Nothing,
    /// This batch.
    Batch(u64),
    /// Every batch carrying only the record with this seq (its fragments).
    FragmentsOf(u64),
}

/// What confirming (or dead-lettering) a batch released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    pub rows: u64,
    pub bytes: u64,
}

/// What `Journal::adopt` found: unconfirmed batches sealed for other sinks, now the current
/// sink's, and how many of all unconfirmed batches exceed its payload limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    /// (the sink they were sealed for, how many), for every other sink.
    pub from_other_sinks: Vec<(String, u64)>,
    /// Unconfirmed batches (of any sink) larger than the current sink's payload limit: they are
    /// re-batched before sending.
    pub oversized: u64,
    /// Unconfirmed batches in all.
    pub batches: u64,
    /// Records in the journal (batched or not).
    pub records: u64,
}

type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

/// Work for the writer thread.
enum Command {
    Append {
        record: Record,
        dedup_key: Option<DedupKey>,
        reply: Option<Reply<Appended>>,
        /// This record's share of `QUEUE_BYTES`, returned once its group is answered.
        _queued: OwnedSemaphorePermit,
    },
    Seal {
        batch: SealedBatch,
        reply: Reply<()>,
    },
    Reseal {
        replace: Replace,
        batches: Vec<SealedBatch>,
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
    DeadLetterBatch {
        batch_seq: u64,
        reason: String,
        reply: Reply<Released>,
    },
    Reserve {
        first: u64,
        last: u64,
        reply: Reply<Vec<u64>>,
    },
    Adopt {
        sink: String,
        max_payload: u64,
        reply: Reply<Adoption>,
    },
}

/// A cheap, clonable handle to the journal writer.
#[derive(Clone)]
pub struct Journal {
    commands: mpsc::Sender<Command>,
    queue_bytes: Arc<Semaphore>,
    committed: watch::Receiver<u64>,
    health: watch::Receiver<Health>,
}

/// Opens (creating or migrating) the journal, and starts its writer thread and the background
/// integrity check.
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
    let mut conn = integrity::open_checked(&path, |p| connect(p, config.synchronous))?;
    schema::migrate(&mut conn)?;
    if let Some(pages) = max_pages {
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
    }
    let last_seq: u64 = conn.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'records'), 0)",
        [],
        |row| row.get(0),
    )?;
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (committed_tx, committed_rx) = watch::channel(last_seq);
    let clean = integrity::take_clean_shutdown(&conn)?;
    let (health_tx, health_rx) = watch::channel(Health::Unchecked);
    let health_tx = Arc::new(health_tx);
    let reader = JournalReader::open(&path, health_tx.clone())?;
    let guard = writer::spawn(
        writer::Writer::new(
            conn,
            commands_rx,
            committed_tx,
            config,
            lock,
            health_tx.clone(),
        )?,
        &path,
        (!clean).then_some(health_tx),
    )?;
    Ok((
        Journal {
            commands: commands_tx,
            queue_bytes: Arc::new(Semaphore::new(QUEUE_BYTES)),
            committed: committed_rx,
            health: health_rx,
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
        dedup_key: Option<DedupKey>,
    ) -> Result<oneshot::Receiver<Result<Appended, JournalError>>, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send_append(record, dedup_key, Some(reply)).await?;
        Ok(rx)
    }

    /// Queues a record nobody waits for (QoS 0). It is committed with the next group.
    pub async fn append_unacknowledged(
        &self,
        record: Record,
        dedup_key: Option<DedupKey>,
    ) -> Result<(), JournalError> {
        self.send_append(record, dedup_key, None).await
    }

    async fn send_append(
        &self,
        record: Record,
        dedup_key: Option<DedupKey>,
        reply: Option<Reply<Appended>>,
    ) -> Result<(), JournalError> {
        let bytes = (writer::accounted_size(&record) as usize).min(QUEUE_BYTES);
        let queued = self
            .queue_bytes
            .clone()
            .acquire_many_owned(bytes as u32)
            .await
            .map_err(|_| JournalError::Closed)?;
        self.send(Command::Append {
            record,
            dedup_key,
            reply,
            _queued: queued,
        })
        .await
    }

    /// Records a sealed batch (and advances `batched_through`); returns once committed.
    pub async fn seal(&self, batch: SealedBatch) -> Result<(), JournalError> {
        self.request(|reply| Command::Seal { batch, reply }).await
    }

    /// Records several sealed batches at once: the fragments of one record, which must all be
    /// sealed or none (a record only partly sealed would never be sent whole).
    pub async fn seal_all(&self, batches: Vec<SealedBatch>) -> Result<(), JournalError> {
        self.request(|reply| Command::Reseal {
            replace: Replace::Nothing,
            batches,
            reply,
        })
        .await
    }

    /// Replaces unconfirmed batches (`replace`) by `batches`, which hold exactly their records
    /// (re-batched to fit a smaller payload limit), in one transaction.
    pub async fn reseal(
        &self,
        replace: Replace,
        batches: Vec<SealedBatch>,
    ) -> Result<(), JournalError> {
        self.request(|reply| Command::Reseal {
            replace,
            batches,
            reply,
        })
        .await
    }

    /// The sink confirmed `batch_seq`: deletes its rows and the batch; returns once committed.
    pub async fn confirm(&self, batch_seq: u64) -> Result<Released, JournalError> {
        self.request(|reply| Command::Confirm { batch_seq, reply })
            .await
    }

    /// Moves a record that can never be delivered to `dead_letter`, with the reason.
    pub async fn dead_letter(&self, seq: u64, reason: String) -> Result<(), JournalError> {
        self.request(|reply| Command::DeadLetter { seq, reason, reply })
            .await
    }

    /// Moves every record of a batch the upstream will not take to `dead_letter` (with the
    /// reason and the batch seq), and forgets the batch.
    pub async fn dead_letter_batch(
        &self,
        batch_seq: u64,
        reason: String,
    ) -> Result<Released, JournalError> {
        self.request(|reply| Command::DeadLetterBatch {
            batch_seq,
            reason,
            reply,
        })
        .await
    }

    /// The batcher has read records `first..=last`: from now on none of them may be evicted.
    /// Returns the QoS 0 seqs of that range still present; any other QoS 0 record the batcher
    /// read was evicted meanwhile and must not be batched.
    pub async fn reserve(&self, first: u64, last: u64) -> Result<Vec<u64>, JournalError> {
        self.request(|reply| Command::Reserve { first, last, reply })
            .await
    }

    /// Makes every unconfirmed batch the current `sink`'s, whichever sink sealed it, and counts
    /// those larger than `max_payload` (they must be re-batched before sending).
    pub async fn adopt(&self, sink: &str, max_payload: u64) -> Result<Adoption, JournalError> {
        let sink = sink.to_string();
        self.request(|reply| Command::Adopt {
            sink,
            max_payload,
            reply,
        })
        .await
    }

    /// A watch of the highest committed journal sequence number.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// A watch of the background integrity check's verdict.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    async fn request<T>(
        &self,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(command(reply)).await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    async fn send(&self, command: Command) -> Result<(), JournalError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| JournalError::Closed)
    }
}

/// A message's dedup key (see `dedup_key`).
pub type DedupKey = [u8; 32];

/// The dedup key of a message: SHA-256 over the publishing agent, the topic and the payload,
/// each but the last prefixed by its length, so no two different triples share a key input.
pub fn dedup_key(agent: &str, topic: &str, payload: &[u8]) -> DedupKey {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in [agent.as_bytes(), topic.as_bytes()] {
        hasher.update((part.len() as u32).to_be_bytes());
        hasher.update(part);
    }
    hasher.update(payload);
    hasher.finalize().into()
}

/// Opens a connection with the journal's pragmas.
fn connect(path: &Path, synchronous: Synchronous) -> Result<rusqlite::Connection, rusqlite::Error> {
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
    // Checkpoints run on their own thread (`checkpoint.rs`), not inside commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // Once the WAL restarts, it is truncated back to this size rather than left at its peak.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    Ok(conn)
}

/// `<path><suffix>`, e.g. `journal.db.lock`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn lock_file(path: &Path) -> Result<std::fs::File, JournalError> {
    let lock_path = sibling(path, ".lock");
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

#[cfg(test)]
mod tests;
