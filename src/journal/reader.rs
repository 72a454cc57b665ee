//! The journal's read side: the batcher's view of committed records and unconfirmed batches.
//!
//! Uses its own read-only connection (WAL lets it read while the writer commits), always inside
//! `spawn_blocking`, so no SQLite call runs on a reactor thread.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, params};

use super::JournalError;
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

/// Clonable read handle. The `std::sync::Mutex` is only taken inside `spawn_blocking`, never
/// across an `.await`.
#[derive(Clone)]
pub struct JournalReader {
    conn: Arc<Mutex<Connection>>,
}

impl JournalReader {
    pub(super) fn open(path: &Path) -> Result<Self, JournalError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "cache_size", -16_384)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, JournalError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&conn)
        })
        .await
        .map_err(|_| JournalError::Closed)?
        .map_err(JournalError::from)
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
            let mut stmt = conn.prepare_cached(
                "SELECT seq, received_at, client_id, topic, qos, payload, content_type,
                        user_properties, expires_at
                 FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![after as i64, limit as i64])?;
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
        })
        .await
    }

    /// Sealed batches for `sink` not yet confirmed, oldest first.
    pub async fn unconfirmed_batches(&self, sink: &str) -> Result<Vec<StoredBatch>, JournalError> {
        let sink = sink.to_string();
        self.with(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT batch_seq, first_seq, last_seq, record_count, payload
                 FROM batches WHERE sink = ?1 ORDER BY batch_seq",
            )?;
            let rows = stmt.query_map([sink], |row| {
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
