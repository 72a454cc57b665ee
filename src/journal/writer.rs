//! The `journal-writer` thread: owns the write connection and commits commands in groups.
//!
//! Guarantee: a command's reply is sent only after the transaction holding it committed; if the
//! transaction fails, every command in it gets the error and nothing of it is visible.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, watch};

use super::dedup::DedupIndex;
use super::{Appended, Command, JournalError, Released};
use crate::config::JournalConfig;
use crate::record::now_ms;
use crate::telemetry;

/// "Journal full" is logged at most this often (with counts), however many messages it refuses.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);
/// QoS 0 records evicted per step when the journal is full.
const EVICT_STEP: i64 = 256;

/// WAL size past which the checkpoint thread truncates it (holding the writer briefly). Only a
/// backstop: the WAL normally restarts on its own (see `checkpoint_loop`).
const WAL_TRUNCATE_AT: u64 = 256 * 1024 * 1024;

/// How often the checkpoint thread folds the WAL into the database while it keeps up...
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// ...and how soon it goes again while it is behind the writer.
const CHECKPOINT_CATCH_UP: Duration = Duration::from_millis(5);

/// Joins the writer and checkpoint threads; dropping every `Journal` handle lets them finish.
pub struct WriterGuard {
    writer: Option<std::thread::JoinHandle<()>>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    stop_checkpoints: Arc<AtomicBool>,
}

impl WriterGuard {
    /// Waits for the writer to commit what is queued and stop. Call after dropping every
    /// `Journal` handle (otherwise it waits for them).
    pub fn join(mut self) {
        self.stop_checkpoints.store(true, Ordering::Relaxed);
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.writer.take() {
            let _ = thread.join();
        }
    }
}

/// Runs PASSIVE checkpoints until told to stop. A PASSIVE checkpoint never blocks the writer,
/// and once it has copied every frame the writer's next commit restarts the WAL from its
/// start (truncated to `journal_size_limit`). Under sustained writes that needs the checkpoint
/// to catch up between two commits, so while it is behind it goes again at once, in small
/// steps. Should readers keep the WAL pinned anyway, past `WAL_TRUNCATE_AT` a TRUNCATE
/// checkpoint holds the writer (it waits in its busy handler, on its own thread) and resets the
/// file. A failure is logged and retried: the WAL keeps every committed frame until a
/// checkpoint succeeds, so nothing is at risk.
fn checkpoint_loop(
    conn: Connection,
    wal: std::path::PathBuf,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    let mut backlog = BacklogReport::default();
    let mut pause = CHECKPOINT_EVERY;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(pause);
        let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
        let mode = if wal_bytes > WAL_TRUNCATE_AT {
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
    rows: AtomicU64,
    bytes: AtomicU64,
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
            if self.last_log.take().is_some() {
                tracing::info!("Journal backlog drained.");
            }
            return;
        };
        let age = Duration::from_millis((now_ms() - received_at).max(0) as u64);
        metrics::gauge!(telemetry::JOURNAL_OLDEST_AGE).set(age.as_secs_f64());
        if age >= Self::REPORT_AGE
            && self
                .last_log
                .is_none_or(|at| at.elapsed() >= Self::LOG_EVERY)
        {
            let rows = stats.rows.load(Ordering::Relaxed);
            let bytes = stats.bytes.load(Ordering::Relaxed);
            let change = rows as i64 - self.last_logged_rows as i64;
            tracing::info!(
                rows,
                bytes,
                oldest_age_secs = age.as_secs(),
                rows_change_since_last_report = change,
                "Journal backlog waiting for the upstream."
            );
            self.last_log = Some(Instant::now());
            self.last_logged_rows = rows;
        }
    }
}

pub(super) struct Writer {
    conn: Connection,
    commands: mpsc::Receiver<Command>,
    committed: watch::Sender<u64>,
    /// `None` when dedup is off (window 0).
    dedup: Option<DedupIndex>,
    max_group: usize,
    quota: Quota,
    max_delay: Duration,
    /// Live rows and their accounted bytes, kept in step with every commit.
    rows: u64,
    bytes: u64,
    stats: Arc<Stats>,
    /// Held for the writer's lifetime: the journal's exclusive lock.
    _lock: std::fs::File,
}

/// The disk bound (`journal.maxBytes`) and its rate-limited "journal full" log.
struct Quota {
    max_bytes: u64,
    /// Records up to here are in the batcher's hands (reserved or sealed): never evicted.
    reserved_through: u64,
    /// When "journal full" was last logged; what was refused and evicted since.
    full_logged: Option<Instant>,
    refused_since_log: u64,
    evicted_since_log: u64,
}

impl Quota {
    /// Ensures `record` fits under `max_bytes`, evicting the oldest QoS 0 records not yet in a
    /// batch if need be. Returns false when it cannot fit (the journal is full of records that
    /// must not be evicted).
    fn make_room(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        committed_bytes: u64,
        record: &crate::record::Record,
        effect: &mut GroupEffect,
    ) -> rusqlite::Result<bool> {
        let size = accounted_size(record);
        let used = |effect: &GroupEffect| {
            (committed_bytes + effect.bytes_added).saturating_sub(effect.released.bytes)
        };
        while used(effect) + size > self.max_bytes {
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
                self.log_full(used(effect));
                return Ok(false);
            };
            let first = victims[0].0;
            tx.prepare_cached("DELETE FROM records WHERE qos = 0 AND seq BETWEEN ?1 AND ?2")?
                .execute([first, last])?;
            let freed: u64 = victims.iter().map(|(_, size)| size).sum();
            effect.released.rows += victims.len() as u64;
            effect.released.bytes += freed;
            self.evicted_since_log += victims.len() as u64;
            metrics::counter!(telemetry::JOURNAL_EVICTED, "reason" => "journal_full")
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

/// Per-group bookkeeping, applied to the counters only if the group commits.
#[derive(Default)]
struct GroupEffect {
    appended: u64,
    duplicates: u64,
    rows_added: u64,
    bytes_added: u64,
    released: Released,
    last_seq: Option<u64>,
}

/// A reply whose value is known but which may only be sent after commit.
enum Pending {
    Appended(Option<super::Reply<Appended>>, Appended),
    /// An append refused on its own (journal full); the rest of the group commits.
    Refused(Option<super::Reply<Appended>>, JournalError),
    Unit(super::Reply<()>),
    Released(super::Reply<Released>, Released),
    Present(super::Reply<Vec<u64>>, Vec<u64>),
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        commands: mpsc::Receiver<Command>,
        committed: watch::Sender<u64>,
        config: &JournalConfig,
        lock: std::fs::File,
    ) -> Result<Self, JournalError> {
        let (rows, bytes): (u64, u64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let reserved_through = conn.query_row(
            "SELECT value FROM state WHERE name = 'batched_through'",
            [],
            |row| row.get::<_, i64>(0),
        )? as u64;
        let dedup = match config.dedup_window() {
            Some(window) => Some(DedupIndex::load(
                &conn,
                window,
                config.dedup_max_keys.get() as usize,
                now_ms(),
            )?),
            None => None,
        };
        let writer = Self {
            conn,
            commands,
            committed,
            dedup,
            max_group: config.commit_max_messages.get() as usize,
            quota: Quota {
                max_bytes: config.max_bytes.get(),
                reserved_through,
                full_logged: None,
                refused_since_log: 0,
                evicted_since_log: 0,
            },
            max_delay: Duration::from_millis(config.commit_max_delay_ms.get()),
            rows,
            bytes,
            stats: Arc::new(Stats::default()),
            _lock: lock,
        };
        writer.publish_gauges();
        Ok(writer)
    }

    fn run(mut self) {
        let mut group = Vec::with_capacity(self.max_group);
        while let Some(first) = self.commands.blocking_recv() {
            group.push(first);
            self.fill(&mut group);
            self.commit_group(&mut group);
        }
        // Every handle is gone: fold the WAL back into the main file for a tidy restart.
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "Final journal checkpoint failed.");
        }
        tracing::info!(rows = self.rows, "Journal writer stopped.");
    }

    /// Takes what is already queued, waiting up to `max_delay` once for more.
    fn fill(&mut self, group: &mut Vec<Command>) {
        let drain = |commands: &mut mpsc::Receiver<Command>, group: &mut Vec<Command>| {
            while group.len() < self.max_group {
                match commands.try_recv() {
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
        };
        drain(&mut self.commands, group);
        if !self.max_delay.is_zero() && group.len() < self.max_group {
            std::thread::sleep(self.max_delay);
            drain(&mut self.commands, group);
        }
    }

    fn commit_group(&mut self, group: &mut Vec<Command>) {
        let started = Instant::now();
        let mut effect = GroupEffect::default();
        let mut pending = Vec::with_capacity(group.len());
        let result = self.apply(group.drain(..), &mut effect, &mut pending);
        if let Some(dedup) = self.dedup.as_mut() {
            match result {
                Ok(()) => dedup.committed(),
                Err(_) => dedup.rolled_back(),
            }
        }
        match result {
            Ok(()) => {
                self.rows = self.rows + effect.rows_added - effect.released.rows;
                self.bytes = self.bytes + effect.bytes_added - effect.released.bytes;
                if let Some(seq) = effect.last_seq {
                    self.committed.send_replace(seq);
                }
                metrics::counter!(telemetry::MESSAGES_JOURNALED).increment(effect.appended);
                metrics::counter!(telemetry::DUPLICATES_DROPPED).increment(effect.duplicates);
                metrics::histogram!(telemetry::JOURNAL_COMMIT_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!(telemetry::JOURNAL_COMMIT_COMMANDS)
                    .record(pending.len() as f64);
                self.publish_gauges();
                for p in pending {
                    match p {
                        Pending::Appended(Some(reply), value) => {
                            let _ = reply.send(Ok(value));
                        }
                        Pending::Appended(None, _) => {}
                        Pending::Refused(Some(reply), e) => {
                            let _ = reply.send(Err(e));
                        }
                        Pending::Refused(None, _) => {}
                        Pending::Unit(reply) => {
                            let _ = reply.send(Ok(()));
                        }
                        Pending::Released(reply, value) => {
                            let _ = reply.send(Ok(value));
                        }
                        Pending::Present(reply, value) => {
                            let _ = reply.send(Ok(value));
                        }
                    }
                }
            }
            Err((e, rest)) => {
                metrics::counter!(telemetry::JOURNAL_WRITE_ERRORS).increment(1);
                static LOG: telemetry::Throttle = telemetry::Throttle::new(5_000);
                if let Some(held_back) = LOG.ready() {
                    tracing::error!(
                        error = %e,
                        commands = pending.len() + rest.len(),
                        failed_commits_not_logged = held_back,
                        "Journal commit failed; nothing in it is acknowledged."
                    );
                }
                let fail = |p: Pending| match p {
                    Pending::Appended(Some(reply), _) => {
                        let _ = reply.send(Err(e.clone()));
                    }
                    Pending::Refused(Some(reply), _) => {
                        let _ = reply.send(Err(e.clone()));
                    }
                    Pending::Appended(None, _) | Pending::Refused(None, _) => {
                        metrics::counter!(telemetry::REFUSALS, "reason" => "journal_error")
                            .increment(1);
                    }
                    Pending::Unit(reply) => {
                        let _ = reply.send(Err(e.clone()));
                    }
                    Pending::Released(reply, _) => {
                        let _ = reply.send(Err(e.clone()));
                    }
                    Pending::Present(reply, _) => {
                        let _ = reply.send(Err(e.clone()));
                    }
                };
                pending.into_iter().for_each(fail);
                rest.into_iter().for_each(|cmd| fail(Self::unapplied(cmd)));
            }
        }
    }

    /// A command that never ran, as a pending reply to fail.
    fn unapplied(cmd: Command) -> Pending {
        match cmd {
            Command::Append { reply, .. } => Pending::Appended(reply, Appended::Duplicate),
            Command::Seal { reply, .. } | Command::DeadLetter { reply, .. } => Pending::Unit(reply),
            Command::Confirm { reply, .. } => Pending::Released(reply, Released::default()),
            Command::Reserve { reply, .. } => Pending::Present(reply, Vec::new()),
        }
    }

    /// Runs the whole group in one transaction. On failure, returns the error and the commands
    /// not yet applied; the transaction is rolled back.
    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        commands: impl Iterator<Item = Command>,
        effect: &mut GroupEffect,
        pending: &mut Vec<Pending>,
    ) -> Result<(), (JournalError, Vec<Command>)> {
        let now = now_ms();
        let mut commands = commands;
        // IMMEDIATE: take the write lock up front (waiting in the busy handler while a
        // checkpoint holds it), so no statement in the group can fail on a lock upgrade.
        let tx = match self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => return Err((e.into(), commands.collect())),
        };
        while let Some(cmd) = commands.next() {
            // Each command yields its pending reply even when it fails, so a failed group can
            // answer every one of its commands with the error.
            let (outcome, reply) = match cmd {
                Command::Append {
                    record,
                    dedup_key,
                    reply,
                } => match self.quota.make_room(&tx, self.bytes, &record, effect) {
                    Err(e) => (Err(e), Pending::Appended(reply, Appended::Duplicate)),
                    Ok(false) => {
                        self.quota.refused_since_log += 1;
                        metrics::counter!(telemetry::REFUSALS, "reason" => "journal_full")
                            .increment(1);
                        let full = JournalError::Full {
                            max_bytes: self.quota.max_bytes,
                        };
                        (Ok(()), Pending::Refused(reply, full))
                    }
                    Ok(true) => {
                        match append(&tx, &record, dedup_key.zip(self.dedup.as_mut()), now) {
                            Ok((appended, size)) => {
                                match appended {
                                    Appended::Journaled(seq) => {
                                        effect.appended += 1;
                                        effect.rows_added += 1;
                                        effect.bytes_added += size;
                                        effect.last_seq = Some(seq);
                                    }
                                    Appended::Duplicate => effect.duplicates += 1,
                                }
                                (Ok(()), Pending::Appended(reply, appended))
                            }
                            Err(e) => (Err(e), Pending::Appended(reply, Appended::Duplicate)),
                        }
                    }
                },
                Command::Seal { batch, reply } => {
                    let outcome = seal(&tx, &batch);
                    if outcome.is_ok() {
                        self.quota.reserved_through =
                            self.quota.reserved_through.max(batch.last_seq);
                    }
                    (outcome, Pending::Unit(reply))
                }
                Command::Confirm { batch_seq, reply } => match release(&tx, batch_seq) {
                    Ok(released) => {
                        effect.released.rows += released.rows;
                        effect.released.bytes += released.bytes;
                        (Ok(()), Pending::Released(reply, released))
                    }
                    Err(e) => (Err(e), Pending::Released(reply, Released::default())),
                },
                Command::Reserve { first, last, reply } => {
                    self.quota.reserved_through = self.quota.reserved_through.max(last);
                    match qos0_present(&tx, first, last) {
                        Ok(present) => (Ok(()), Pending::Present(reply, present)),
                        Err(e) => (Err(e), Pending::Present(reply, Vec::new())),
                    }
                }
                Command::DeadLetter { seq, reason, reply } => {
                    match dead_letter(&tx, seq, &reason, now) {
                        Ok(released) => {
                            effect.released.rows += released.rows;
                            effect.released.bytes += released.bytes;
                            (Ok(()), Pending::Unit(reply))
                        }
                        Err(e) => (Err(e), Pending::Unit(reply)),
                    }
                }
            };
            pending.push(reply);
            if let Err(e) = outcome {
                return Err((e.into(), commands.collect()));
            }
        }
        if let Some(dedup) = self.dedup.as_mut()
            && let Err(e) = dedup.prune_if_due(&tx, now)
        {
            return Err((e.into(), Vec::new()));
        }
        tx.commit().map_err(|e| (e.into(), Vec::new()))
    }

    fn publish_gauges(&self) {
        self.stats.rows.store(self.rows, Ordering::Relaxed);
        self.stats.bytes.store(self.bytes, Ordering::Relaxed);
        metrics::gauge!(telemetry::JOURNAL_ROWS).set(self.rows as f64);
        metrics::gauge!(telemetry::JOURNAL_BYTES).set(self.bytes as f64);
    }
}

/// Bytes a record is charged in the journal: its data plus a fixed allowance for row overhead.
fn accounted_size(record: &crate::record::Record) -> u64 {
    (record.payload.len() + record.topic.len() + record.client_id.len() + 64) as u64
}

fn append(
    tx: &rusqlite::Transaction<'_>,
    record: &crate::record::Record,
    dedup: Option<([u8; 32], &mut DedupIndex)>,
    now: i64,
) -> rusqlite::Result<(Appended, u64)> {
    if let Some((key, index)) = dedup
        && index.check_and_arm(tx, &key, now)?
    {
        return Ok((Appended::Duplicate, 0));
    }
    let props = &record.properties;
    let user_properties = (!props.user_properties.is_empty())
        .then(|| serde_json::to_string(&props.user_properties).expect("pairs serialize"));
    let size = accounted_size(record);
    tx.prepare_cached(
        "INSERT INTO records (received_at, client_id, topic, qos, payload, content_type,
                              user_properties, expires_at, size)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        record.received_at_ms,
        record.client_id,
        record.topic,
        record.qos,
        &record.payload[..],
        props.content_type,
        user_properties,
        props.expires_at_ms,
        size as i64,
    ])?;
    Ok((Appended::Journaled(tx.last_insert_rowid() as u64), size))
}

/// Records a sealed batch and advances the batching cursor.
fn seal(tx: &rusqlite::Transaction<'_>, batch: &super::SealedBatch) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO batches (batch_seq, sink, first_seq, last_seq, record_count, created_at, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        batch.batch_seq as i64,
        batch.sink,
        batch.first_seq as i64,
        batch.last_seq as i64,
        batch.record_count,
        batch.created_at,
        &batch.payload[..]
    ])?;
    set_state(tx, "next_batch_seq", batch.batch_seq + 1)?;
    advance_batched_through(tx, batch.last_seq)
}

/// The QoS 0 records of `first..=last` still in the journal, in seq order.
fn qos0_present(
    tx: &rusqlite::Transaction<'_>,
    first: u64,
    last: u64,
) -> rusqlite::Result<Vec<u64>> {
    tx.prepare_cached(
        "SELECT seq FROM records WHERE qos = 0 AND seq BETWEEN ?1 AND ?2 ORDER BY seq",
    )?
    .query_map([first as i64, last as i64], |row| row.get::<_, i64>(0))?
    .map(|seq| seq.map(|s| s as u64))
    .collect()
}

fn set_state(tx: &rusqlite::Transaction<'_>, name: &str, value: u64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE state SET value = ?2 WHERE name = ?1")?
        .execute(params![name, value as i64])?;
    Ok(())
}

fn advance_batched_through(tx: &rusqlite::Transaction<'_>, seq: u64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE state SET value = MAX(value, ?1) WHERE name = 'batched_through'")?
        .execute([seq as i64])?;
    Ok(())
}

fn release(tx: &rusqlite::Transaction<'_>, batch_seq: u64) -> rusqlite::Result<Released> {
    let range: Option<(i64, i64)> = tx
        .prepare_cached("SELECT first_seq, last_seq FROM batches WHERE batch_seq = ?1")?
        .query_row([batch_seq as i64], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((first, last)) = range else {
        // Already confirmed (a sink may confirm twice after a reconnect): nothing to release.
        return Ok(Released::default());
    };
    let (rows, bytes): (u64, u64) = tx
        .prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE seq BETWEEN ?1 AND ?2",
        )?
        .query_row([first, last], |row| Ok((row.get(0)?, row.get(1)?)))?;
    tx.prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2")?
        .execute([first, last])?;
    tx.prepare_cached("DELETE FROM batches WHERE batch_seq = ?1")?
        .execute([batch_seq as i64])?;
    Ok(Released { rows, bytes })
}

fn dead_letter(
    tx: &rusqlite::Transaction<'_>,
    seq: u64,
    reason: &str,
    now: i64,
) -> rusqlite::Result<Released> {
    let size: Option<u64> = tx
        .query_row(
            "SELECT size FROM records WHERE seq = ?1",
            [seq as i64],
            |row| row.get(0),
        )
        .optional()?;
    tx.execute(
        "INSERT OR IGNORE INTO dead_letter (seq, received_at, client_id, topic, qos, payload, reason, moved_at)
         SELECT seq, received_at, client_id, topic, qos, payload, ?2, ?3 FROM records WHERE seq = ?1",
        params![seq as i64, reason, now],
    )?;
    tx.execute("DELETE FROM records WHERE seq = ?1", [seq as i64])?;
    advance_batched_through(tx, seq)?;
    Ok(Released {
        rows: size.map_or(0, |_| 1),
        bytes: size.unwrap_or(0),
    })
}

pub(super) fn spawn(writer: Writer, path: &std::path::Path) -> Result<WriterGuard, JournalError> {
    let thread_error = |e: std::io::Error| JournalError::Io {
        path: path.to_owned(),
        reason: format!("cannot start journal thread: {e}"),
    };
    let checkpoint_conn = Connection::open(path)?;
    checkpoint_conn.busy_timeout(Duration::from_secs(5))?;
    let stop_checkpoints = Arc::new(AtomicBool::new(false));
    let stop = stop_checkpoints.clone();
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    let stats = writer.stats.clone();
    let checkpointer = std::thread::Builder::new()
        .name("journal-checkpoint".into())
        .spawn(move || checkpoint_loop(checkpoint_conn, wal, stats, stop))
        .map_err(thread_error)?;
    let writer = std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || writer.run())
        .map_err(thread_error)?;
    Ok(WriterGuard {
        writer: Some(writer),
        checkpointer: Some(checkpointer),
        stop_checkpoints,
    })
}
