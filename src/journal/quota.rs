//! The disk bound, `journal.maxBytes`: which records may be evicted to make room, and the
//! rate-limited "journal full" log.
//!
//! Guarantees:
//! - Only QoS 0 records the batcher has not reserved are ever evicted, oldest first; a QoS 1/2
//!   record (acknowledged to its agent) never is.
//! - An evicted record's dedup key is disarmed in the same transaction, so a later copy of the
//!   message is journaled, not dropped as a duplicate of something never delivered.
//! - Every eviction is counted; "journal full" is logged at most every `FULL_LOG_EVERY`.

use std::time::{Duration, Instant};

use super::dedup::DedupIndex;
use crate::telemetry;

/// "Journal full" is logged at most this often (with counts), however many messages it refuses.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);
/// QoS 0 records evicted per step when the journal is full.
const EVICT_STEP: i64 = 256;

/// Live bytes before and within the open transaction, as `make_room` needs them.
pub(super) struct Usage {
    /// Bytes charged to committed records.
    pub committed: u64,
    /// Added and released by the transaction in progress.
    pub added: u64,
    pub released: u64,
    /// Rows released by the transaction in progress (evictions add to it).
    pub released_rows: u64,
}

impl Usage {
    fn used(&self) -> u64 {
        (self.committed + self.added).saturating_sub(self.released)
    }
}

pub(super) struct Quota {
    pub max_bytes: u64,
    /// Records up to here are in the batcher's hands (reserved or sealed): never evicted.
    pub reserved_through: u64,
    /// When "journal full" was last logged; what was refused and evicted since.
    full_logged: Option<Instant>,
    pub refused_since_log: u64,
    evicted_since_log: u64,
}

impl Quota {
    pub fn new(max_bytes: u64, reserved_through: u64) -> Self {
        Self {
            max_bytes,
            reserved_through,
            full_logged: None,
            refused_since_log: 0,
            evicted_since_log: 0,
        }
    }

    /// Ensures `size` more bytes fit under `max_bytes`, evicting the oldest QoS 0 records not
    /// yet in a batch if need be. Returns false when they cannot fit (the journal is full of
    /// records that must not be evicted).
    pub fn make_room(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        size: u64,
        usage: &mut Usage,
        mut dedup: Option<&mut DedupIndex>,
    ) -> rusqlite::Result<bool> {
        while usage.used() + size > self.max_bytes {
            let victims: Vec<(i64, u64)> = tx
                .prepare_cached(
                    "SELECT seq, size FROM records WHERE qos = 0 AND seq > ?1
                     ORDER BY seq LIMIT ?2",
                )?
                .query_map([self.reserved_through as i64, EVICT_STEP], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let Some(&(last, _)) = victims.last() else {
                self.log_full(usage.used());
                return Ok(false);
            };
            let first = victims[0].0;
            tx.prepare_cached("DELETE FROM records WHERE qos = 0 AND seq BETWEEN ?1 AND ?2")?
                .execute([first, last])?;
            if let Some(dedup) = dedup.as_deref_mut() {
                dedup.disarm_records(tx, first as u64, last as u64)?;
            }
            let freed: u64 = victims.iter().map(|(_, size)| size).sum();
            usage.released_rows += victims.len() as u64;
            usage.released += freed;
            self.evicted_since_log += victims.len() as u64;
            metrics::counter!(telemetry::JOURNAL_EVICTED, "reason" => "journal_full")
                .increment(victims.len() as u64);
            metrics::counter!(telemetry::DROPPED, "reason" => "qos0_evicted")
                .increment(victims.len() as u64);
        }
        Ok(true)
    }

    fn log_full(&mut self, used_bytes: u64) {
        if self
            .full_logged
            .is_some_and(|at| at.elapsed() < FULL_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            max_bytes = self.max_bytes,
            used_bytes,
            refused_since_last_log = self.refused_since_log,
            qos0_evicted_since_last_log = self.evicted_since_log,
            "Journal full (journal.maxBytes): refusing new messages until the upstream drains it."
        );
        self.full_logged = Some(Instant::now());
        self.refused_since_log = 0;
        self.evicted_since_log = 0;
    }
}
