//! The dedup index: which messages (by agent, topic and payload) the journal saw within the
//! window.
//!
//! Lookups are in memory; the keys are also persisted, in arrival order, in the `dedup` table in
//! the same transaction as the records they guard, so the index survives restarts and is exact
//! about what committed. Appending in arrival order and pruning from the oldest end keeps the
//! SQLite side sequential, whatever the key distribution.
//!
//! Guarantees:
//! - A message is a duplicate only if the same 128-bit key (the first 16 bytes of
//!   `journal::dedup_key`: SHA-256 over agent, topic and payload) was armed within `window`
//!   before by a record that is journaled or was delivered. The same event from two agents is
//!   two records.
//! - A transaction that rolls back leaves no trace in the index; a QoS 0 record evicted unsent
//!   (journal full) disarms its key in the eviction's transaction (`disarm_records`).
//! - Memory is bounded by `max_keys`: past it the oldest keys are forgotten early (counted), so
//!   at worst a late duplicate is journaled again. Nothing is ever dropped for want of room.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, params};

use crate::telemetry;

/// How often expired keys are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// Rows pruned in one transaction at most, to bound the pause.
const PRUNE_BATCH: usize = 200_000;

pub(super) struct DedupIndex {
    window_ms: i64,
    max_keys: usize,
    /// Committed keys and when they were (last) armed, ms since the epoch.
    seen: HashMap<u128, Armed>,
    /// Keys armed by the transaction in progress; merged on commit, dropped on rollback.
    staged: HashMap<u128, Armed>,
    /// Rows pruned by the transaction in progress; forgotten from `seen` on commit.
    forget: Vec<(u128, i64)>,
    last_prune: Instant,
}

/// When a key was (last) armed, and by which QoS 0 record, if it was one (such a copy may still
/// be evicted unsent, so it cannot stand for an acknowledged QoS 1 message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Armed {
    at: i64,
    qos0_seq: Option<u64>,
}

/// The 128-bit index key of a SHA-256 dedup key.
fn short(key: &[u8; 32]) -> u128 {
    u128::from_be_bytes(key[..16].try_into().expect("16 bytes"))
}

impl DedupIndex {
    /// Loads the keys still inside the window.
    pub(super) fn load(
        conn: &Connection,
        window: Duration,
        max_keys: usize,
        now: i64,
    ) -> rusqlite::Result<Self> {
        let window_ms = window.as_millis() as i64;
        let mut seen = HashMap::new();
        let mut stmt = conn.prepare(
            "SELECT key, seen_at, record_seq FROM dedup WHERE seen_at >= ?1 ORDER BY seq",
        )?;
        let mut rows = stmt.query([now - window_ms])?;
        while let Some(row) = rows.next()? {
            let key: Vec<u8> = row.get(0)?;
            let Ok(key) = <[u8; 16]>::try_from(key.as_slice()) else {
                continue;
            };
            let armed = Armed {
                at: row.get(1)?,
                qos0_seq: row.get::<_, Option<i64>>(2)?.map(|s| s as u64),
            };
            seen.insert(u128::from_be_bytes(key), armed);
        }
        metrics::gauge!(telemetry::DEDUP_KEYS).set(seen.len() as f64);
        Ok(Self {
            window_ms,
            max_keys,
            seen,
            staged: HashMap::new(),
            forget: Vec::new(),
            // Prune soon after start: the table may hold a long-expired tail.
            last_prune: Instant::now() - PRUNE_EVERY,
        })
    }

    /// Whether a message of `qos` with `key` is a duplicate as of `now`: the key was armed
    /// within the window (and not disarmed since) by a copy that will be delivered. A QoS 0 copy
    /// above `evictable_after` (not yet in the batcher's hands) may still be evicted unsent, so
    /// it does not make a QoS 1/2 message a duplicate.
    pub(super) fn is_duplicate(
        &self,
        key: &[u8; 32],
        now: i64,
        qos: u8,
        evictable_after: u64,
    ) -> bool {
        let id = short(key);
        let cutoff = now - self.window_ms;
        let last = self.staged.get(&id).or_else(|| self.seen.get(&id));
        last.is_some_and(|armed| {
            let may_vanish = armed.qos0_seq.is_some_and(|seq| seq > evictable_after);
            armed.at >= cutoff && !(qos > 0 && may_vanish)
        })
    }

    /// Arms `key` in `tx` for the record just inserted; `qos0_seq` names it when it is a QoS 0
    /// record (one that may be evicted unsent, which must disarm the key).
    pub(super) fn arm(
        &mut self,
        tx: &Transaction<'_>,
        key: &[u8; 32],
        now: i64,
        qos0_seq: Option<u64>,
    ) -> rusqlite::Result<()> {
        tx.prepare_cached("INSERT INTO dedup (key, seen_at, record_seq) VALUES (?1, ?2, ?3)")?
            .execute(params![&key[..16], now, qos0_seq.map(|s| s as i64)])?;
        self.staged.insert(short(key), Armed { at: now, qos0_seq });
        Ok(())
    }

    /// `is_duplicate`, arming the key when it is not (as for a QoS 1 record).
    #[cfg(test)]
    pub(super) fn check_and_arm(
        &mut self,
        tx: &Transaction<'_>,
        key: &[u8; 32],
        now: i64,
    ) -> rusqlite::Result<bool> {
        if self.is_duplicate(key, now, 1, u64::MAX) {
            return Ok(true);
        }
        self.arm(tx, key, now, None)?;
        Ok(false)
    }

    /// QoS 0 records `first..=last` were evicted in `tx`: the keys they armed no longer stand
    /// for a journaled copy.
    pub(super) fn disarm_records(
        &mut self,
        tx: &Transaction<'_>,
        first: u64,
        last: u64,
    ) -> rusqlite::Result<()> {
        let armed: Vec<(Vec<u8>, i64)> = tx
            .prepare_cached("SELECT key, seen_at FROM dedup WHERE record_seq BETWEEN ?1 AND ?2")?
            .query_map([first as i64, last as i64], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (key, seen_at) in armed {
            let Ok(key) = <[u8; 16]>::try_from(key.as_slice()) else {
                continue;
            };
            let id = u128::from_be_bytes(key);
            if self.staged.get(&id).map(|a| a.at) == Some(seen_at) {
                self.staged.remove(&id);
            }
            self.forget.push((id, seen_at));
        }
        tx.prepare_cached("DELETE FROM dedup WHERE record_seq BETWEEN ?1 AND ?2")?
            .execute([first as i64, last as i64])?;
        Ok(())
    }

    /// Deletes expired rows (and, past `max_keys`, the oldest live ones) within `tx`.
    pub(super) fn prune_if_due(&mut self, tx: &Transaction<'_>, now: i64) -> rusqlite::Result<()> {
        let over_cap = self.seen.len() > self.max_keys + self.max_keys / 10;
        if !over_cap && self.last_prune.elapsed() < PRUNE_EVERY {
            return Ok(());
        }
        let cutoff = now - self.window_ms;
        let mut remaining = self.seen.len();
        let mut last_seq = None;
        let mut early = 0u64;
        {
            let mut stmt = tx.prepare_cached("SELECT seq, key, seen_at FROM dedup ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let seen_at: i64 = row.get(2)?;
                let expired = seen_at < cutoff;
                if !expired && remaining <= self.max_keys {
                    break;
                }
                if self.forget.len() >= PRUNE_BATCH {
                    break;
                }
                let key: Vec<u8> = row.get(1)?;
                if let Ok(key) = <[u8; 16]>::try_from(key.as_slice()) {
                    let id = u128::from_be_bytes(key);
                    // Only the row that armed the live entry removes it (re-armed keys stay).
                    if self.seen.get(&id).map(|a| a.at) == Some(seen_at) {
                        remaining -= 1;
                        if !expired {
                            early += 1;
                        }
                    }
                    self.forget.push((id, seen_at));
                }
                last_seq = Some(row.get::<_, i64>(0)?);
            }
        }
        if let Some(seq) = last_seq {
            tx.prepare_cached("DELETE FROM dedup WHERE seq <= ?1")?
                .execute([seq])?;
        }
        if early > 0 {
            metrics::counter!(telemetry::DEDUP_EVICTED_EARLY).increment(early);
            tracing::warn!(
                keys = early,
                max_keys = self.max_keys,
                "Dedup index full: forgot keys before their window ended (journal.dedupMaxKeys)."
            );
        }
        self.last_prune = Instant::now();
        Ok(())
    }

    /// The transaction committed: staged keys become seen, pruned ones are forgotten.
    pub(super) fn committed(&mut self) {
        for (id, at) in self.forget.drain(..) {
            if self.seen.get(&id).map(|a| a.at) == Some(at) {
                self.seen.remove(&id);
            }
        }
        self.seen.extend(self.staged.drain());
        metrics::gauge!(telemetry::DEDUP_KEYS).set(self.seen.len() as f64);
    }

    /// The transaction rolled back: nothing it did counts.
    pub(super) fn rolled_back(&mut self) {
        self.staged.clear();
        self.forget.clear();
    }
}
