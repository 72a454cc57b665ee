//! The journal's read side: the batcher's view of committed records and unconfirmed batches.
//!
//! Uses its own read-only connection (WAL lets it read while the writer commits), always inside
//! `spawn_blocking`, so no SQLite call runs on a reactor thread.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, params};

use tokio::sync::watch;

use super::JournalError;
use super::integrity::{self, Health};
use crate::record::{JournaledRecord, Record, RecordProperties};

/// Where batching stands, as committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherState {
    pub next_batch_seq: u64,
    /// Every record at or below this seq is in a batch (confirmed or not) or dead-lettered.
    pub batched_through: u64,
}

/// A sealed, unconfirmed batch, as stored.
#[derive(Debug, Clone)]
pub struct StoredBatch {
    pub batch_seq: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_count: u32,
    pub payload: Bytes,
}

/// The columns `record_from_row` reads, in its order.
const SELECT_RECORDS: &str =
    "SELECT seq, received_at, client_id, topic, qos, payload, content_type,
        user_properties, expires_at FROM records";

/// Reads rows of `SELECT_RECORDS`: all of them and, past the first, at most `max_raw_bytes` of
/// payload.
fn collect_records(
    mut rows: rusqlite::Rows<'_>,
    max_raw_bytes: usize,
) -> rusqlite::Result<Vec<JournaledRecord>> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        let payload: Vec<u8> = row.get(5)?;
        if !out.is_empty() && bytes + payload.len() > max_raw_bytes {
            break;
        }
        bytes += payload.len();
        let user_properties: Option<String> = row.get(7)?;
        out.push(JournaledRecord {
            seq: row.get::<_, i64>(0)? as u64,
            record: Record {
                received_at_ms: row.get(1)?,
                client_id: row.get(2)?,
                topic: row.get(3)?,
                qos: row.get(4)?,
                payload: payload.into(),
                properties: RecordProperties {
                    content_type: row.get(6)?,
                    user_properties: user_properties
                        .and_then(|json| serde_json::from_str(&json).ok())
                        .unwrap_or_default(),
                    expires_at_ms: row.get(8)?,
                },
            },
        });
    }
    Ok(out)
}

/// Clonable read handle. The `std::sync::Mutex` is only taken inside `spawn_blocking`, never
/// across an `.await`.
#[derive(Clone)]
pub struct JournalReader {
    conn: Arc<Mutex<Connection>>,
    /// Corruption a read runs into is reported here, as the writer's is.
    health: Arc<watch::Sender<Health>>,
    path: Arc<std::path::PathBuf>,
}

impl JournalReader {
    pub(super) fn open(
        path: &Path,
        health: Arc<watch::Sender<Health>>,
    ) -> Result<Self, JournalError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "cache_size", -16_384)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            health,
            path: Arc::new(path.to_owned()),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, JournalError> {
        let conn = self.conn.clone();
        let result = tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&conn)
        })
        .await
        .map_err(|_| JournalError::Closed)?;
        if let Err(e) = &result
            && integrity::is_corruption(e)
        {
            integrity::report_corruption(&self.path, e.to_string(), &self.health);
        }
        result.map_err(JournalError::from)
    }

    /// Committed records with `seq > after`, in seq order: at most `limit` records and, past the
    /// first, at most `max_raw_bytes` of payload.
    pub async fn records_after(
        &self,
        after: u64,
        limit: usize,
        max_raw_bytes: usize,
    ) -> Result<Vec<JournaledRecord>, JournalError> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{SELECT_RECORDS} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))?;
            let rows = stmt.query(params![after as i64, limit as i64])?;
            collect_records(rows, max_raw_bytes)
        })
        .await
    }

    /// The records of `first..=last` still in the journal, in seq order.
    pub async fn records_between(
        &self,
        first: u64,
        last: u64,
    ) -> Result<Vec<JournaledRecord>, JournalError> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "{SELECT_RECORDS} WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq"
            ))?;
            let rows = stmt.query(params![first as i64, last as i64])?;
            collect_records(rows, usize::MAX)
        })
        .await
    }

    /// Sealed, unconfirmed batches with `after < batch_seq < before`, oldest first, at most
    /// `limit`.
    pub async fn unconfirmed_batches(
        &self,
        after: u64,
        before: u64,
        limit: usize,
    ) -> Result<Vec<StoredBatch>, JournalError> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT batch_seq, first_seq, last_seq, record_count, payload
                 FROM batches WHERE batch_seq > ?1 AND batch_seq < ?2
                 ORDER BY batch_seq LIMIT ?3",
            )?;
            let before = before.min(i64::MAX as u64) as i64;
            let rows = stmt.query_map(params![after as i64, before, limit as i64], |row| {
                Ok(StoredBatch {
                    batch_seq: row.get::<_, i64>(0)? as u64,
                    first_seq: row.get::<_, i64>(1)? as u64,
                    last_seq: row.get::<_, i64>(2)? as u64,
                    record_count: row.get(3)?,
                    payload: row.get::<_, Vec<u8>>(4)?.into(),
                })
            })?;
            rows.collect()
        })
        .await
    }

    pub async fn batcher_state(&self) -> Result<BatcherState, JournalError> {
        self.with(|conn| {
            let get = |name: &str| {
                conn.query_row("SELECT value FROM state WHERE name = ?1", [name], |row| {
                    row.get::<_, i64>(0)
                })
            };
            Ok(BatcherState {
                next_batch_seq: get("next_batch_seq")? as u64,
                batched_through: get("batched_through")? as u64,
            })
        })
        .await
    }

    /// Live records and their payload bytes (for tests and the CLI).
    pub async fn counts(&self) -> Result<(u64, u64), JournalError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
        })
        .await
    }
}
