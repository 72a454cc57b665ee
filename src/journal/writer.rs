//! The `journal-writer` thread: owns the write connection and commits commands in groups.
//!
//! Guarantee: a command's reply is sent only after the transaction holding it committed; if the
//! transaction fails, every command in it gets the error and nothing of it is visible. A reply
//! carries a success value only for a command that was applied and committed (`Answer`); a
//! failed one is answered from `Unanswered`, which has no value to send.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, watch};

use super::checkpoint::{Stats, checkpoint_loop};
use super::dedup::DedupIndex;
use super::integrity::{self, BackgroundCheck, Health};
use super::quota::{Quota, Usage};
use super::{
    Adoption, Appended, Command, JournalError, Released, Replace, Reply, SealedBatch, sibling,
};
use crate::config::JournalConfig;
use crate::record::{Record, now_ms};
use crate::telemetry;

/// Joins the writer, checkpoint and integrity-check threads; dropping every `Journal` handle
/// lets the writer finish.
pub struct WriterGuard {
    writer: Option<std::thread::JoinHandle<()>>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    /// The full integrity check, run only after an unclean stop.
    check: Option<BackgroundCheck>,
    stop_checkpoints: Arc<AtomicBool>,
}

impl WriterGuard {
    /// Waits for the writer to commit what is queued and stop. Call after dropping every
    /// `Journal` handle (otherwise it waits for them). A running integrity check is interrupted
    /// (it runs again at the next start).
    pub fn join(mut self) {
        if let Some(check) = self.check.take() {
            check.stop();
        }
        self.stop_checkpoints.store(true, Ordering::Relaxed);
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.writer.take() {
            let _ = thread.join();
        }
    }
}

pub(super) struct Writer {
    conn: Connection,
    commands: mpsc::Receiver<Command>,
    committed: watch::Sender<u64>,
    /// `None` when dedup is off.
    dedup: Option<DedupIndex>,
    max_group: usize,
    quota: Quota,
    max_delay: Duration,
    /// Live rows and their accounted bytes, as committed (mirrors `state.rows`/`state.bytes`).
    rows: u64,
    bytes: u64,
    stats: Arc<Stats>,
    /// Where corruption SQLite reports to the writer is told.
    health: Arc<watch::Sender<Health>>,
    path: std::path::PathBuf,
    /// Held for the writer's lifetime: the journal's exclusive lock.
    _lock: std::fs::File,
}

/// A command applied inside the open transaction, with the value its reply gets once the
/// transaction commits.
enum Answer {
    /// `Err`: this append alone was refused (journal full); the rest of the group commits.
    Appended(Option<Reply<Appended>>, Result<Appended, JournalError>),
    Unit(Reply<()>),
    Released(Reply<Released>, Released),
    Present(Reply<Vec<u64>>, Vec<u64>),
    Adopted(Reply<Adoption>, Adoption),
}

/// A command's reply channel without a value: what a failed group answers with its error.
enum Unanswered {
    Appended(Option<Reply<Appended>>),
    Unit(Reply<()>),
    Released(Reply<Released>),
    Present(Reply<Vec<u64>>),
    Adopted(Reply<Adoption>),
}

impl Answer {
    fn send(self) {
        match self {
            Answer::Appended(reply, result) => {
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Answer::Unit(reply) => {
                let _ = reply.send(Ok(()));
            }
            Answer::Released(reply, value) => {
                let _ = reply.send(Ok(value));
            }
            Answer::Present(reply, value) => {
                let _ = reply.send(Ok(value));
            }
            Answer::Adopted(reply, value) => {
                let _ = reply.send(Ok(value));
            }
        }
    }

    fn unanswered(self) -> Unanswered {
        match self {
            Answer::Appended(reply, _) => Unanswered::Appended(reply),
            Answer::Unit(reply) => Unanswered::Unit(reply),
            Answer::Released(reply, _) => Unanswered::Released(reply),
            Answer::Present(reply, _) => Unanswered::Present(reply),
            Answer::Adopted(reply, _) => Unanswered::Adopted(reply),
        }
    }
}

impl Unanswered {
    fn fail(self, e: &JournalError) {
        match self {
            Unanswered::Appended(Some(reply)) => {
                let _ = reply.send(Err(e.clone()));
            }
            Unanswered::Appended(None) => {
                // A QoS 0 message: nobody waits, so say it here.
                metrics::counter!(telemetry::REFUSALS, "reason" => "journal_error").increment(1);
            }
            Unanswered::Unit(reply) => {
                let _ = reply.send(Err(e.clone()));
            }
            Unanswered::Released(reply) => {
                let _ = reply.send(Err(e.clone()));
            }
            Unanswered::Present(reply) => {
                let _ = reply.send(Err(e.clone()));
            }
            Unanswered::Adopted(reply) => {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

impl Command {
    fn unanswered(self) -> Unanswered {
        match self {
            Command::Append { reply, .. } => Unanswered::Appended(reply),
            Command::Seal { reply, .. }
            | Command::Reseal { reply, .. }
            | Command::DeadLetter { reply, .. } => Unanswered::Unit(reply),
            Command::Confirm { reply, .. } | Command::DeadLetterBatch { reply, .. } => {
                Unanswered::Released(reply)
            }
            Command::Reserve { reply, .. } => Unanswered::Present(reply),
            Command::Adopt { reply, .. } => Unanswered::Adopted(reply),
        }
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

/// A failed group: the error, and every command in it still waiting for an answer.
type Failed = (JournalError, Vec<Unanswered>);

impl Writer {
    pub(super) fn new(
        conn: Connection,
        commands: mpsc::Receiver<Command>,
        committed: watch::Sender<u64>,
        config: &JournalConfig,
        lock: std::fs::File,
        health: Arc<watch::Sender<Health>>,
    ) -> Result<Self, JournalError> {
        let rows = get_state(&conn, "rows")?;
        let bytes = get_state(&conn, "bytes")?;
        let reserved_through = get_state(&conn, "batched_through")?;
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
            quota: Quota::new(config.max_bytes.get(), reserved_through),
            max_delay: Duration::from_millis(config.commit_max_delay_ms.get()),
            rows,
            bytes,
            stats: Arc::new(Stats::default()),
            health,
            path: config.path.clone(),
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
        // Every handle is gone: mark the stop clean (the next start then skips the full
        // check) and fold the WAL back into the main file for a tidy restart.
        let healthy = !matches!(*self.health.borrow(), Health::Corrupt(_));
        if healthy && let Err(e) = integrity::mark_clean_shutdown(&self.conn) {
            tracing::warn!(error = %e, "Cannot mark the journal closed cleanly; the next start checks it in full.");
        }
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "Final journal checkpoint failed.");
        }
        tracing::info!(
            unconfirmed_records = self.rows,
            unconfirmed_bytes = self.bytes,
            "Journal closed."
        );
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
        let commands = group.len();
        let result = self.apply(group.drain(..), &mut effect);
        if let Some(dedup) = self.dedup.as_mut() {
            match result {
                Ok(_) => dedup.committed(),
                Err(_) => dedup.rolled_back(),
            }
        }
        match result {
            Ok(answers) => {
                self.rows = self.rows + effect.rows_added - effect.released.rows;
                self.bytes = self.bytes + effect.bytes_added - effect.released.bytes;
                if let Some(seq) = effect.last_seq {
                    self.committed.send_replace(seq);
                }
                metrics::counter!(telemetry::MESSAGES_JOURNALED).increment(effect.appended);
                metrics::counter!(telemetry::DUPLICATES_DROPPED).increment(effect.duplicates);
                metrics::counter!(telemetry::DROPPED, "reason" => "duplicate")
                    .increment(effect.duplicates);
                metrics::histogram!(telemetry::JOURNAL_COMMIT_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!(telemetry::JOURNAL_COMMIT_COMMANDS).record(commands as f64);
                self.publish_gauges();
                answers.into_iter().for_each(Answer::send);
            }
            Err((e, unanswered)) => {
                metrics::counter!(telemetry::JOURNAL_WRITE_ERRORS).increment(1);
                if let JournalError::Sqlite(sqlite) = &e
                    && integrity::is_corruption(sqlite)
                {
                    integrity::report_corruption(&self.path, sqlite.to_string(), &self.health);
                }
                static LOG: telemetry::Throttle = telemetry::Throttle::new(5_000);
                if let Some(held_back) = LOG.ready() {
                    tracing::error!(
                        error = %e,
                        commands,
                        failed_commits_not_logged = held_back,
                        "Journal commit failed; nothing in it is acknowledged."
                    );
                }
                for waiting in unanswered {
                    waiting.fail(&e);
                }
            }
        }
    }

    /// Runs the whole group in one transaction. On failure, the transaction is rolled back and
    /// every command of the group is returned unanswered, with the error.
    fn apply(
        &mut self,
        mut commands: impl Iterator<Item = Command>,
        effect: &mut GroupEffect,
    ) -> Result<Vec<Answer>, Failed> {
        let now = now_ms();
        let mut answers: Vec<Answer> = Vec::new();
        let fail =
            |e: JournalError, answers: Vec<Answer>, rest: &mut dyn Iterator<Item = Command>| {
                let mut unanswered: Vec<Unanswered> =
                    answers.into_iter().map(Answer::unanswered).collect();
                unanswered.extend(rest.map(Command::unanswered));
                (e, unanswered)
            };
        // IMMEDIATE: take the write lock up front (waiting in the busy handler while a
        // checkpoint holds it), so no statement in the group can fail on a lock upgrade.
        let tx = match self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => return Err(fail(e.into(), answers, &mut commands)),
        };
        while let Some(cmd) = commands.next() {
            match apply_one(
                &tx,
                cmd,
                now,
                effect,
                &mut self.quota,
                self.dedup.as_mut(),
                self.bytes,
            ) {
                Ok(answer) => answers.push(answer),
                Err((e, failed)) => {
                    let (e, mut unanswered) = fail(e, answers, &mut commands);
                    unanswered.push(failed);
                    return Err((e, unanswered));
                }
            }
        }
        let mut finish = || -> rusqlite::Result<()> {
            if let Some(dedup) = self.dedup.as_mut() {
                dedup.prune_if_due(&tx, now)?;
            }
            let rows_delta = effect.rows_added as i64 - effect.released.rows as i64;
            let bytes_delta = effect.bytes_added as i64 - effect.released.bytes as i64;
            if rows_delta != 0 || bytes_delta != 0 {
                add_state(&tx, "rows", rows_delta)?;
                add_state(&tx, "bytes", bytes_delta)?;
            }
            Ok(())
        };
        if let Err(e) = finish() {
            return Err(fail(e.into(), answers, &mut commands));
        }
        match tx.commit() {
            Ok(()) => Ok(answers),
            Err(e) => Err(fail(e.into(), answers, &mut commands)),
        }
    }

    fn publish_gauges(&self) {
        self.stats.rows.store(self.rows, Ordering::Relaxed);
        self.stats.bytes.store(self.bytes, Ordering::Relaxed);
        metrics::gauge!(telemetry::JOURNAL_ROWS).set(self.rows as f64);
        telemetry::PROGRESS
            .backlog_records
            .store(self.rows, Ordering::Relaxed);
        metrics::gauge!(telemetry::JOURNAL_BYTES).set(self.bytes as f64);
    }
}

/// Applies one command inside `tx`. On failure returns the error and the command's reply.
#[allow(clippy::too_many_arguments)]
fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    cmd: Command,
    now: i64,
    effect: &mut GroupEffect,
    quota: &mut Quota,
    mut dedup: Option<&mut DedupIndex>,
    committed_bytes: u64,
) -> Result<Answer, (JournalError, Unanswered)> {
    macro_rules! try_or {
        ($result:expr, $unanswered:expr) => {
            match $result {
                Ok(value) => value,
                Err(e) => return Err((JournalError::from(e), $unanswered)),
            }
        };
    }
    Ok(match cmd {
        Command::Append {
            record,
            dedup_key,
            reply,
            _queued,
        } => {
            if let (Some(key), Some(index)) = (&dedup_key, dedup.as_deref())
                && index.is_duplicate(key, now, record.qos, quota.reserved_through)
            {
                effect.duplicates += 1;
                return Ok(Answer::Appended(reply, Ok(Appended::Duplicate)));
            }
            let size = accounted_size(&record);
            let mut usage = Usage {
                committed: committed_bytes,
                added: effect.bytes_added,
                released: effect.released.bytes,
                released_rows: effect.released.rows,
            };
            let room = quota.make_room(tx, size, &mut usage, dedup.as_deref_mut());
            effect.released.bytes = usage.released;
            effect.released.rows = usage.released_rows;
            if !try_or!(room, Unanswered::Appended(reply)) {
                quota.refused_since_log += 1;
                metrics::counter!(telemetry::REFUSALS, "reason" => "journal_full").increment(1);
                let full = JournalError::Full {
                    max_bytes: quota.max_bytes,
                };
                return Ok(Answer::Appended(reply, Err(full)));
            }
            let seq = try_or!(
                insert_record(tx, &record, size),
                Unanswered::Appended(reply)
            );
            if let (Some(key), Some(index)) = (&dedup_key, dedup) {
                let qos0 = (record.qos == 0).then_some(seq);
                try_or!(index.arm(tx, key, now, qos0), Unanswered::Appended(reply));
            }
            effect.appended += 1;
            effect.rows_added += 1;
            effect.bytes_added += size;
            effect.last_seq = Some(seq);
            Answer::Appended(reply, Ok(Appended::Journaled(seq)))
        }
        Command::Seal { batch, reply } => {
            try_or!(seal(tx, &batch), Unanswered::Unit(reply));
            quota.reserved_through = quota.reserved_through.max(batch.last_seq);
            Answer::Unit(reply)
        }
        Command::Reseal {
            replace,
            batches,
            reply,
        } => {
            let deleted = match replace {
                Replace::Nothing => Ok(0),
                Replace::Batch(batch_seq) => tx
                    .prepare_cached("DELETE FROM batches WHERE batch_seq = ?1")
                    .and_then(|mut s| s.execute([batch_seq as i64])),
                Replace::FragmentsOf(seq) => tx
                    .prepare_cached("DELETE FROM batches WHERE first_seq = ?1 AND last_seq = ?1")
                    .and_then(|mut s| s.execute([seq as i64])),
            };
            try_or!(deleted, Unanswered::Unit(reply));
            for batch in &batches {
                try_or!(seal(tx, batch), Unanswered::Unit(reply));
                quota.reserved_through = quota.reserved_through.max(batch.last_seq);
            }
            Answer::Unit(reply)
        }
        Command::Confirm { batch_seq, reply } => {
            let released = try_or!(release(tx, batch_seq), Unanswered::Released(reply));
            effect.released.rows += released.rows;
            effect.released.bytes += released.bytes;
            Answer::Released(reply, released)
        }
        Command::DeadLetter { seq, reason, reply } => {
            let released = try_or!(
                dead_letter_range(tx, seq, seq, None, &reason, now),
                Unanswered::Unit(reply)
            );
            try_or!(advance_batched_through(tx, seq), Unanswered::Unit(reply));
            effect.released.rows += released.rows;
            effect.released.bytes += released.bytes;
            Answer::Unit(reply)
        }
        Command::DeadLetterBatch {
            batch_seq,
            reason,
            reply,
        } => {
            let released = try_or!(
                dead_letter_batch(tx, batch_seq, &reason, now),
                Unanswered::Released(reply)
            );
            effect.released.rows += released.rows;
            effect.released.bytes += released.bytes;
            Answer::Released(reply, released)
        }
        Command::Reserve { first, last, reply } => {
            quota.reserved_through = quota.reserved_through.max(last);
            let present = try_or!(qos0_present(tx, first, last), Unanswered::Present(reply));
            Answer::Present(reply, present)
        }
        Command::Adopt {
            sink,
            max_payload,
            reply,
        } => {
            let adoption = try_or!(adopt(tx, &sink, max_payload), Unanswered::Adopted(reply));
            Answer::Adopted(reply, adoption)
        }
    })
}

/// Bytes a record is charged in the journal: its data plus a fixed allowance for row overhead.
pub(super) fn accounted_size(record: &Record) -> u64 {
    (record.payload.len() + record.topic.len() + record.client_id.len() + 64) as u64
}

fn insert_record(
    tx: &rusqlite::Transaction<'_>,
    record: &Record,
    size: u64,
) -> rusqlite::Result<u64> {
    let props = &record.properties;
    let user_properties = (!props.user_properties.is_empty())
        .then(|| serde_json::to_string(&props.user_properties).expect("pairs serialize"));
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
    Ok(tx.last_insert_rowid() as u64)
}

/// Records a sealed batch and advances the batching cursor.
fn seal(tx: &rusqlite::Transaction<'_>, batch: &SealedBatch) -> rusqlite::Result<()> {
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
    tx.prepare_cached("UPDATE state SET value = MAX(value, ?1) WHERE name = 'next_batch_seq'")?
        .execute([batch.batch_seq as i64 + 1])?;
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

fn get_state(conn: &Connection, name: &str) -> rusqlite::Result<u64> {
    conn.query_row("SELECT value FROM state WHERE name = ?1", [name], |row| {
        row.get::<_, i64>(0)
    })
    .map(|v| v.max(0) as u64)
}

fn add_state(tx: &rusqlite::Transaction<'_>, name: &str, delta: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE state SET value = value + ?2 WHERE name = ?1")?
        .execute(params![name, delta])?;
    Ok(())
}

fn advance_batched_through(tx: &rusqlite::Transaction<'_>, seq: u64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE state SET value = MAX(value, ?1) WHERE name = 'batched_through'")?
        .execute([seq as i64])?;
    Ok(())
}

/// The records of `first..=last` still in the journal: how many, and their accounted bytes.
fn range_usage(
    tx: &rusqlite::Transaction<'_>,
    first: i64,
    last: i64,
) -> rusqlite::Result<Released> {
    tx.prepare_cached(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE seq BETWEEN ?1 AND ?2",
    )?
    .query_row([first, last], |row| {
        Ok(Released {
            rows: row.get(0)?,
            bytes: row.get(1)?,
        })
    })
}

fn batch_range(
    tx: &rusqlite::Transaction<'_>,
    batch_seq: u64,
) -> rusqlite::Result<Option<(i64, i64)>> {
    tx.prepare_cached("SELECT first_seq, last_seq FROM batches WHERE batch_seq = ?1")?
        .query_row([batch_seq as i64], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
}

/// Releases a confirmed batch: its row, and its records unless another unconfirmed batch still
/// carries them (the fragments of one large record are several batches over the same seq).
fn release(tx: &rusqlite::Transaction<'_>, batch_seq: u64) -> rusqlite::Result<Released> {
    let Some((first, last)) = batch_range(tx, batch_seq)? else {
        // Already confirmed (a sink may confirm twice after a reconnect): nothing to release.
        return Ok(Released::default());
    };
    tx.prepare_cached("DELETE FROM batches WHERE batch_seq = ?1")?
        .execute([batch_seq as i64])?;
    let overlapping: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM batches WHERE first_seq <= ?2 AND last_seq >= ?1")?
        .query_row([first, last], |row| row.get(0))?;
    if overlapping == 0 {
        let released = range_usage(tx, first, last)?;
        tx.prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2")?
            .execute([first, last])?;
        return Ok(released);
    }
    const UNCOVERED: &str = "seq BETWEEN ?1 AND ?2 AND NOT EXISTS
        (SELECT 1 FROM batches WHERE first_seq <= records.seq AND last_seq >= records.seq)";
    let released = tx
        .prepare_cached(&format!(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE {UNCOVERED}"
        ))?
        .query_row([first, last], |row| {
            Ok(Released {
                rows: row.get(0)?,
                bytes: row.get(1)?,
            })
        })?;
    tx.prepare_cached(&format!("DELETE FROM records WHERE {UNCOVERED}"))?
        .execute([first, last])?;
    Ok(released)
}

/// Moves the records of `first..=last` to `dead_letter`, with the reason and their batch.
fn dead_letter_range(
    tx: &rusqlite::Transaction<'_>,
    first: u64,
    last: u64,
    batch_seq: Option<u64>,
    reason: &str,
    now: i64,
) -> rusqlite::Result<Released> {
    let released = range_usage(tx, first as i64, last as i64)?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO dead_letter (seq, received_at, client_id, topic, qos, payload,
                content_type, user_properties, expires_at, size, batch_seq, reason, moved_at)
         SELECT seq, received_at, client_id, topic, qos, payload,
                content_type, user_properties, expires_at, size, ?3, ?4, ?5
         FROM records WHERE seq BETWEEN ?1 AND ?2",
    )?
    .execute(params![
        first as i64,
        last as i64,
        batch_seq.map(|s| s as i64),
        reason,
        now
    ])?;
    tx.prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2")?
        .execute([first as i64, last as i64])?;
    metrics::counter!(telemetry::DEAD_LETTERED).increment(released.rows);
    Ok(released)
}

fn dead_letter_batch(
    tx: &rusqlite::Transaction<'_>,
    batch_seq: u64,
    reason: &str,
    now: i64,
) -> rusqlite::Result<Released> {
    let Some((first, last)) = batch_range(tx, batch_seq)? else {
        return Ok(Released::default());
    };
    let released = dead_letter_range(tx, first as u64, last as u64, Some(batch_seq), reason, now)?;
    tx.prepare_cached("DELETE FROM batches WHERE batch_seq = ?1")?
        .execute([batch_seq as i64])?;
    Ok(released)
}

/// Makes every unconfirmed batch `sink`'s; reports the others' counts and the oversized ones.
fn adopt(
    tx: &rusqlite::Transaction<'_>,
    sink: &str,
    max_payload: u64,
) -> rusqlite::Result<Adoption> {
    let from_other_sinks = tx
        .prepare("SELECT sink, COUNT(*) FROM batches WHERE sink <> ?1 GROUP BY sink ORDER BY sink")?
        .query_map([sink], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(String, u64)>>>()?;
    if !from_other_sinks.is_empty() {
        tx.execute("UPDATE batches SET sink = ?1 WHERE sink <> ?1", [sink])?;
    }
    let (batches, oversized) = tx.query_row(
        "SELECT COUNT(*), COALESCE(SUM(length(payload) > ?1), 0) FROM batches",
        [max_payload.min(i64::MAX as u64) as i64],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let records = tx.query_row("SELECT value FROM state WHERE name = 'rows'", [], |row| {
        row.get(0)
    })?;
    Ok(Adoption {
        from_other_sinks,
        oversized,
        batches,
        records,
    })
}

/// Starts the writer and checkpoint threads, and the full integrity check when `check` says
/// where to report it (after an unclean stop).
pub(super) fn spawn(
    writer: Writer,
    path: &std::path::Path,
    check: Option<Arc<watch::Sender<Health>>>,
) -> Result<WriterGuard, JournalError> {
    let thread_error = |e: std::io::Error| JournalError::Io {
        path: path.to_owned(),
        reason: format!("cannot start journal thread: {e}"),
    };
    let checkpoint_conn = Connection::open(path)?;
    checkpoint_conn.busy_timeout(Duration::from_secs(5))?;
    let stop_checkpoints = Arc::new(AtomicBool::new(false));
    let checking = Arc::new(AtomicBool::new(false));
    let check = match check {
        Some(health) => {
            Some(BackgroundCheck::spawn(path, health, checking.clone()).map_err(thread_error)?)
        }
        None => {
            writer.health.send_replace(Health::Ok);
            None
        }
    };
    let stop = stop_checkpoints.clone();
    let wal = sibling(path, "-wal");
    let stats = writer.stats.clone();
    let checkpointer = std::thread::Builder::new()
        .name("journal-checkpoint".into())
        .spawn(move || checkpoint_loop(checkpoint_conn, wal, stats, stop, checking))
        .map_err(thread_error)?;
    let writer = std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || writer.run())
        .map_err(thread_error)?;
    Ok(WriterGuard {
        writer: Some(writer),
        checkpointer: Some(checkpointer),
        check,
        stop_checkpoints,
    })
}
