//! The journal's schema and its numbered migrations.
//!
//! Rule: never change what a column means; add a migration instead. `PRAGMA user_version` holds
//! the number of migrations applied. A journal from a newer Gatehouse is refused, not guessed at.

use rusqlite::Connection;

use super::JournalError;

/// Each entry is one migration; entry `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: records, batches, dedup keys, dead letters and gateway state.
    "
    CREATE TABLE records (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT, -- journal sequence, never reused
        received_at     INTEGER NOT NULL,                  -- ms since the epoch
        client_id       TEXT    NOT NULL,
        topic           TEXT    NOT NULL,
        qos             INTEGER NOT NULL,
        payload         BLOB    NOT NULL,
        content_type    TEXT,
        user_properties TEXT,                              -- JSON [[k, v], ...] or NULL
        expires_at      INTEGER,                           -- ms since the epoch or NULL
        stream          TEXT    NOT NULL DEFAULT 'telemetry', -- routing / priority streams
        priority        INTEGER NOT NULL DEFAULT 0,        -- higher drains first (later issues)
        size            INTEGER NOT NULL                   -- bytes charged against journal caps
    );
    -- QoS 0 records, the ones a full journal may evict (oldest first).
    CREATE INDEX records_qos0 ON records (seq) WHERE qos = 0;
    -- A batch sealed for a sink and not yet confirmed. Its payload is kept so a retry, even after
    -- a restart, sends the very same bytes under the same batch_seq.
    CREATE TABLE batches (
        batch_seq    INTEGER PRIMARY KEY,
        sink         TEXT    NOT NULL,
        first_seq    INTEGER NOT NULL,
        last_seq     INTEGER NOT NULL,
        record_count INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        payload      BLOB    NOT NULL
    );
    -- Dedup keys in arrival order: the first 16 bytes of SHA-256(topic, 0x00, payload), and
    -- when they were armed. Appended and pruned at the ends only (see dedup.rs).
    CREATE TABLE dedup (
        seq     INTEGER PRIMARY KEY,
        key     BLOB    NOT NULL,
        seen_at INTEGER NOT NULL     -- ms since the epoch
    );
    -- Records that can never be delivered (e.g. larger than a batch after a config change),
    -- kept for an operator instead of silently deleted.
    CREATE TABLE dead_letter (
        seq         INTEGER PRIMARY KEY,
        received_at INTEGER NOT NULL,
        client_id   TEXT    NOT NULL,
        topic       TEXT    NOT NULL,
        qos         INTEGER NOT NULL,
        payload     BLOB    NOT NULL,
        reason      TEXT    NOT NULL,
        moved_at    INTEGER NOT NULL
    );
    -- Small named integers: next_batch_seq, batched_through.
    CREATE TABLE state (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO state (name, value) VALUES ('next_batch_seq', 1), ('batched_through', 0);
    ",
    // 2: dedup keys name the QoS 0 record they armed (so evicting it disarms them); dead
    // letters keep everything needed to resend them and the batch they left; live row and byte
    // counters are kept in `state`, so a start-up never counts a large backlog.
    "
    ALTER TABLE dedup ADD COLUMN record_seq INTEGER; -- the QoS 0 record this key armed, or NULL
    CREATE INDEX dedup_by_record ON dedup (record_seq) WHERE record_seq IS NOT NULL;
    ALTER TABLE dead_letter ADD COLUMN content_type TEXT;
    ALTER TABLE dead_letter ADD COLUMN user_properties TEXT;
    ALTER TABLE dead_letter ADD COLUMN expires_at INTEGER;
    ALTER TABLE dead_letter ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE dead_letter ADD COLUMN batch_seq INTEGER; -- the batch it was in, or NULL
    INSERT INTO state (name, value) SELECT 'rows', COUNT(*) FROM records;
    INSERT INTO state (name, value) SELECT 'bytes', COALESCE(SUM(size), 0) FROM records;
    -- 1 while the journal is closed after a clean stop; set to 0 by every start.
    INSERT INTO state (name, value) VALUES ('clean_shutdown', 0);
    ",
];

/// The schema version this build writes.
pub const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to `CURRENT_VERSION`, each migration in its own transaction.
pub fn migrate(conn: &mut Connection) -> Result<(), JournalError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version > CURRENT_VERSION {
        return Err(JournalError::TooNew {
            found: version,
            supported: CURRENT_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = index + 1, "Migrated journal schema.");
    }
    if version == 0 {
        seed_batch_seq(conn)?;
    }
    Ok(())
}

/// A new journal (first start, a path change, or one replacing a quarantined or deleted file)
/// numbers its batches from the current time in microseconds, not from 1: the cloud
/// deduplicates by (gateway, batchSeq), so a restart at 1 would make it drop new batches as
/// repeats of old ones. Unique as long as no journal ever sealed more than one batch per
/// microsecond of its life; below 2^53 (exact in a JSON double) until the year 2255.
fn seed_batch_seq(conn: &Connection) -> Result<(), JournalError> {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    conn.execute(
        "UPDATE state SET value = MAX(value, ?1) WHERE name = 'next_batch_seq'",
        [micros],
    )?;
    Ok(())
}
