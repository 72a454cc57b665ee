//! The operator's view of `dead_letter`: records the gateway could not deliver, kept with the
//! reason. Backs `gatehouse dead-letter list|export|retry`.
//!
//! Guarantees:
//! - Listing reads through a read-only connection and works while the gateway runs.
//! - Retrying needs the journal's lock (the gateway stopped), so it never races the writer: in
//!   one transaction it moves the chosen records back into `records` under new sequence
//!   numbers (after everything batched, in their original order), with their properties, and
//!   updates the live counters. Nothing is deleted that was not re-queued.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params_from_iter};

use super::{JournalError, lock_file, schema};
use crate::record::{Record, RecordProperties};

/// One dead-lettered record.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its journal sequence number when it was dead-lettered.
    pub seq: u64,
    /// The batch it was in, when the upstream refused the whole batch.
    pub batch_seq: Option<u64>,
    pub record: Record,
    pub reason: String,
    pub moved_at_ms: i64,
}

/// Which dead letters `retry_dead_letters` re-queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetrySelection {
    All,
    /// The records that left with this batch.
    Batch(u64),
    /// These record sequence numbers.
    Seqs(Vec<u64>),
}

impl RetrySelection {
    /// The SQL condition and its parameters.
    fn condition(&self) -> (String, Vec<i64>) {
        match self {
            RetrySelection::All => ("1".into(), Vec::new()),
            RetrySelection::Batch(batch) => ("batch_seq = ?".into(), vec![*batch as i64]),
            RetrySelection::Seqs(seqs) => (
                format!("seq IN ({})", vec!["?"; seqs.len()].join(", ")),
                seqs.iter().map(|s| *s as i64).collect(),
            ),
        }
    }
}

fn open_error(path: &Path, e: impl std::fmt::Display) -> JournalError {
    JournalError::Open {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Names the file in an SQLite failure: the operator may have passed the wrong path.
fn at(path: &Path) -> impl Fn(rusqlite::Error) -> JournalError + '_ {
    move |e| JournalError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Opens an existing journal for a dead-letter command and returns its schema version;
/// refuses a missing file, a file that is not SQLite, and an SQLite file that is not a journal
/// (never creating or migrating anything in it).
fn open_journal(path: &Path, flags: OpenFlags) -> Result<(Connection, i64), JournalError> {
    if !path.is_file() {
        return Err(open_error(path, "no journal file at this path"));
    }
    let conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| open_error(path, e))?;
    if version == 0 {
        return Err(JournalError::NotAJournal(path.to_owned()));
    }
    if version > schema::CURRENT_VERSION {
        return Err(JournalError::TooNew {
            found: version,
            supported: schema::CURRENT_VERSION,
        });
    }
    Ok((conn, version))
}

/// Calls `visit` with every dead letter, oldest first.
pub fn list_dead_letters(
    path: &Path,
    visit: impl FnMut(DeadLetter) -> std::io::Result<()>,
) -> Result<(), JournalError> {
    let (conn, version) = open_journal(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut failure = None;
    visit_dead_letters(&conn, version, visit, &mut failure).map_err(at(path))?;
    match failure {
        Some(e) => Err(JournalError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
        None => Ok(()),
    }
}

/// Reads the dead letters; stops at the first `visit` failure, left in `failure`.
fn visit_dead_letters(
    conn: &Connection,
    version: i64,
    mut visit: impl FnMut(DeadLetter) -> std::io::Result<()>,
    failure: &mut Option<std::io::Error>,
) -> rusqlite::Result<()> {
    // Version 1 journals lack the columns added by migration 2.
    let extra = if version >= 2 {
        "content_type, user_properties, expires_at, batch_seq"
    } else {
        "NULL, NULL, NULL, NULL"
    };
    let mut stmt = conn.prepare(&format!(
        "SELECT seq, received_at, client_id, topic, qos, payload, reason, moved_at, {extra}
         FROM dead_letter ORDER BY seq"
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let user_properties: Option<String> = row.get(9)?;
        let letter = DeadLetter {
            seq: row.get::<_, i64>(0)? as u64,
            batch_seq: row.get::<_, Option<i64>>(11)?.map(|s| s as u64),
            record: Record {
                received_at_ms: row.get(1)?,
                client_id: row.get(2)?,
                topic: row.get(3)?,
                qos: row.get(4)?,
                payload: row.get::<_, Vec<u8>>(5)?.into(),
                properties: RecordProperties {
                    content_type: row.get(8)?,
                    user_properties: user_properties
                        .and_then(|json| serde_json::from_str(&json).ok())
                        .unwrap_or_default(),
                    expires_at_ms: row.get(10)?,
                },
            },
            reason: row.get(6)?,
            moved_at_ms: row.get(7)?,
        };
        if let Err(e) = visit(letter) {
            *failure = Some(e);
            break;
        }
    }
    Ok(())
}

/// Moves the selected dead letters back into the journal's stream, to be batched and sent at
/// the next start. Returns how many. Fails with `JournalError::Locked` while a gateway runs.
pub fn retry_dead_letters(path: &Path, selection: &RetrySelection) -> Result<u64, JournalError> {
    let (mut conn, _) = open_journal(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let _lock = lock_file(path)?;
    schema::migrate(&mut conn)?;
    move_back(&mut conn, selection).map_err(at(path))
}

fn move_back(conn: &mut Connection, selection: &RetrySelection) -> rusqlite::Result<u64> {
    let (condition, params) = selection.condition();
    let tx = conn.transaction()?;
    let (rows, bytes): (i64, i64) = tx.query_row(
        &format!("SELECT COUNT(*), COALESCE(SUM({SIZE}), 0) FROM dead_letter WHERE {condition}"),
        params_from_iter(params.iter()),
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let moved = tx.execute(
        &format!(
            "INSERT INTO records (received_at, client_id, topic, qos, payload, content_type,
                                  user_properties, expires_at, size)
             SELECT received_at, client_id, topic, qos, payload, content_type,
                    user_properties, expires_at, {SIZE}
             FROM dead_letter WHERE {condition} ORDER BY seq"
        ),
        params_from_iter(params.iter()),
    )?;
    tx.execute(
        &format!("DELETE FROM dead_letter WHERE {condition}"),
        params_from_iter(params.iter()),
    )?;
    tx.execute(
        "UPDATE state SET value = value + ?1 WHERE name = 'rows'",
        [rows],
    )?;
    tx.execute(
        "UPDATE state SET value = value + ?1 WHERE name = 'bytes'",
        [bytes],
    )?;
    tx.commit()?;
    Ok(moved as u64)
}

/// A dead letter's accounted size (rows dead-lettered before migration 2 have none stored).
const SIZE: &str = "CASE WHEN size > 0 THEN size
     ELSE length(payload) + length(CAST(topic AS BLOB)) + length(CAST(client_id AS BLOB)) + 64 END";
