//! The `journal-checkpoint` thread: folds the WAL back into the database off the commit path,
//! and reports the backlog (the age of the oldest unconfirmed record) while it persists.
//!
//! Guarantee: a checkpoint never loses a committed frame; a failed one is logged and retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::record::now_ms;
use crate::telemetry;

/// WAL size past which the checkpoint thread truncates it (holding the writer briefly). Only a
/// backstop: the WAL normally restarts on its own (see `checkpoint_loop`).
const WAL_TRUNCATE_AT: u64 = 256 * 1024 * 1024;

/// How often the checkpoint thread folds the WAL into the database while it keeps up...
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// ...and how soon it goes again while it is behind the writer.
const CHECKPOINT_CATCH_UP: Duration = Duration::from_millis(5);

/// Runs PASSIVE checkpoints until told to stop. A PASSIVE checkpoint never blocks the writer,
/// and once it has copied every frame the writer's next commit restarts the WAL from its
/// start (truncated to `journal_size_limit`). Under sustained writes that needs the checkpoint
/// to catch up between two commits, so while it is behind it goes again at once, in small
/// steps. Should readers keep the WAL pinned anyway, past `WAL_TRUNCATE_AT` a TRUNCATE
/// checkpoint holds the writer (it waits in its busy handler, on its own thread) and resets the
/// file. A failure is logged and retried: the WAL keeps every committed frame until a
/// checkpoint succeeds, so nothing is at risk.
///
/// While the background integrity check holds its long read (`checking`), the TRUNCATE is put
/// off: it would hold the writer for its whole busy timeout and still fail.
pub(super) fn checkpoint_loop(
    conn: Connection,
    wal: std::path::PathBuf,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    checking: Arc<AtomicBool>,
) {
    let mut backlog = BacklogReport::default();
    let mut pause = CHECKPOINT_EVERY;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(pause);
        let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
        let mode = if wal_bytes > WAL_TRUNCATE_AT && !checking.load(Ordering::Relaxed) {
            "TRUNCATE"
        } else {
            "PASSIVE"
        };
        // Returns (busy, frames in the WAL, frames checkpointed).
        let progress = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        pause = match progress {
            Ok((frames, done)) if done < frames => CHECKPOINT_CATCH_UP,
            Ok(_) => CHECKPOINT_EVERY,
            Err(e) => {
                tracing::warn!(error = %e, mode, "Journal checkpoint failed; will retry.");
                CHECKPOINT_EVERY
            }
        };
        backlog.tick(&conn, &stats);
    }
}

/// The writer's live counters, shared with the checkpoint thread's backlog report.
#[derive(Default)]
pub(super) struct Stats {
    pub(super) rows: AtomicU64,
    pub(super) bytes: AtomicU64,
}

/// Publishes the age of the oldest unconfirmed record and, while a backlog persists, logs its
/// progress now and then: the operator's view of a long outage and its drain.
#[derive(Default)]
struct BacklogReport {
    last_check: Option<Instant>,
    last_log: Option<Instant>,
    last_logged_rows: u64,
}

impl BacklogReport {
    const CHECK_EVERY: Duration = Duration::from_secs(5);
    const LOG_EVERY: Duration = Duration::from_secs(60);
    /// A backlog worth reporting: its oldest record has waited this long.
    const REPORT_AGE: Duration = Duration::from_secs(60);

    fn tick(&mut self, conn: &Connection, stats: &Stats) {
        if self
            .last_check
            .is_some_and(|at| at.elapsed() < Self::CHECK_EVERY)
        {
            return;
        }
        self.last_check = Some(Instant::now());
        let oldest: Option<i64> = conn
            .query_row(
                "SELECT received_at FROM records ORDER BY seq LIMIT 1",
                [],
                |row| row.get(0),
            )
            .ok();
        let Some(received_at) = oldest else {
            metrics::gauge!(telemetry::JOURNAL_OLDEST_AGE).set(0.0);
            telemetry::PROGRESS
                .oldest_unsent_secs
                .store(0, Ordering::Relaxed);
            if self.last_log.take().is_some() {
                tracing::info!("Journal backlog drained.");
            }
            return;
        };
        let age = Duration::from_millis((now_ms() - received_at).max(0) as u64);
        metrics::gauge!(telemetry::JOURNAL_OLDEST_AGE).set(age.as_secs_f64());
        telemetry::PROGRESS
            .oldest_unsent_secs
            .store(age.as_secs(), Ordering::Relaxed);
        if age >= Self::REPORT_AGE
            && self
                .last_log
                .is_none_or(|at| at.elapsed() >= Self::LOG_EVERY)
        {
            let rows = stats.rows.load(Ordering::Relaxed);
            let bytes = stats.bytes.load(Ordering::Relaxed);
            let change = rows as i64 - self.last_logged_rows as i64;
            tracing::info!(
                records = rows,
                bytes,
                oldest_age_secs = age.as_secs(),
                records_change_since_last_report = change,
                "Journal backlog waiting for the upstream."
            );
            self.last_log = Some(Instant::now());
            self.last_logged_rows = rows;
        }
    }
}
