//! The batcher: reads committed records in sequence order, packs them into envelope batches and
//! hands them to the sink; on the sink's confirmation it has the journal release their rows.
//!
//! Guarantees:
//! - Records enter batches in journal order; batches get consecutive `batch_seq`s.
//! - A batch is recorded in the journal (`Journal::seal`) before the sink sees it, so its
//!   `batch_seq` and bytes are the same on every retry, across restarts.
//! - A batch is flushed when it is full (`maxBytes` after compression, or `maxMessages`), or when
//!   its oldest record has waited `maxDelayMs`. A backlog therefore drains in full batches.
//! - No payload exceeds `batch.maxBytes` nor the sink's payload limit (`Sink::max_payload`).
//! - At start-up every unconfirmed batch, whichever sink sealed it, is handed to the current
//!   sink (one log line says how many came from another kind): as it is when it fits the
//!   sink's payload limit, else re-batched (`Journal::reseal`). Nothing is left behind.
//! - A batch the sink dead-letters has its records moved to `dead_letter` with the reason.
//! - At most `Sink::max_inflight` batches are unconfirmed; the batcher stops reading beyond that.
//!   Stored batches are read a window at a time, never all at once.
//! - Memory is bounded: at most `RAW_CAP_FACTOR * maxBytes` of records are buffered.
//! - A batch that cannot be handed to the sink (the sink stopped) ends the batcher with
//!   `BatcherError::SinkStopped`; the batch stays sealed in the journal for the next start.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::BatchConfig;
use crate::envelope::{self, BatchIdentity, Codec};
use crate::journal::{Journal, JournalError, JournalReader, Replace, SealedBatch, StoredBatch};
use crate::record::{JournaledRecord, now_ms};
use crate::shutdown::Shutdown;
use crate::sink::{Batch, Confirmation, Outcome};
use crate::telemetry;

/// Why the batcher stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum BatcherError {
    /// The journal could not be read at start.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The sink's channel closed while the gateway was running: nothing more can be delivered.
    #[error("the upstream sink stopped; batch {0} stays in the journal for the next start")]
    SinkStopped(u64),
}

/// Raw (uncompressed) bytes buffered at most, as a multiple of `maxBytes`: compression rarely
/// beats 32x, so a full batch is always within reach.
const RAW_CAP_FACTOR: usize = 32;
/// Records fetched from the journal per read, at most.
const FETCH_LIMIT: usize = 4096;
/// A batch within this fraction of `maxBytes` counts as full.
const FULL_ENOUGH: f64 = 0.9;
/// How long to wait before retrying after a journal error.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Batcher settings derived from the config and the sink.
pub struct Settings {
    pub gateway: String,
    pub batch: BatchConfig,
    pub sink_name: &'static str,
    pub max_inflight: usize,
    /// The sink's payload limit (`Sink::max_payload`).
    pub max_payload: usize,
    /// After shutdown begins: how long to wait for the sink to confirm what it holds.
    pub drain_grace: Duration,
    /// `batch` as it changes while running (Greengrass configuration updates), if it may.
    pub live_batch: Option<tokio::sync::watch::Receiver<BatchConfig>>,
}

pub struct Batcher {
    journal: Journal,
    reader: JournalReader,
    settings: Settings,
    codec: Codec,
    max_bytes: usize,
    raw_cap: usize,
    /// Committed records fetched and not yet sealed, in seq order.
    buffer: VecDeque<JournaledRecord>,
    buffer_raw: usize,
    /// Highest seq fetched into `buffer` (or sealed).
    fetched_through: u64,
    next_batch_seq: u64,
    /// Unconfirmed batches recovered at start-up, a window at a time, waiting for room.
    resend: VecDeque<StoredBatch>,
    /// Stored batches with a seq above this and below `stored_until` are still to be read.
    stored_after: u64,
    /// The first batch seq sealed by this run: stored batches are the ones before it.
    stored_until: u64,
    inflight: usize,
    /// Confirmations whose journal update failed, retried.
    unreleased: Vec<Confirmation>,
    /// Observed payload-bytes/batch-bytes ratio, to guess when the buffer could fill a batch.
    ratio: f64,
    /// The last batch's record-stream bytes per payload byte: where `pack` starts guessing.
    raw_ratio: Option<f64>,
    /// Do not try packing again before the buffer holds this many raw bytes.
    next_pack_at_raw: usize,
    /// Batch settings as they change while running, if they may.
    live_batch: Option<tokio::sync::watch::Receiver<BatchConfig>>,
}

impl Batcher {
    pub fn new(journal: Journal, reader: JournalReader, mut settings: Settings) -> Self {
        let max_bytes = (settings.batch.max_bytes.get() as usize).min(settings.max_payload);
        let live_batch = settings.live_batch.take();
        Self {
            live_batch,
            journal,
            reader,
            codec: settings.batch.compression.into(),
            max_bytes,
            raw_cap: max_bytes * RAW_CAP_FACTOR,
            settings,
            buffer: VecDeque::new(),
            buffer_raw: 0,
            fetched_through: 0,
            next_batch_seq: 1,
            resend: VecDeque::new(),
            stored_after: 0,
            stored_until: 0,
            inflight: 0,
            unreleased: Vec::new(),
            ratio: 1.0,
            raw_ratio: None,
            next_pack_at_raw: 0,
        }
    }

    /// Runs until `shutdown` fires and what was committed by then is batched and confirmed (or
    /// the drain grace runs out). Fails if the journal cannot be read at start, or the sink
    /// stops taking batches.
    pub async fn run(
        mut self,
        batches: mpsc::Sender<Batch>,
        mut confirmations: mpsc::Receiver<Confirmation>,
        mut shutdown: Shutdown,
    ) -> Result<(), BatcherError> {
        let state = self.reader.batcher_state().await?;
        self.next_batch_seq = state.next_batch_seq;
        self.stored_until = state.next_batch_seq;
        self.fetched_through = state.batched_through;
        self.adopt_stored_batches().await?;
        let mut committed = self.journal.committed();
        let mut drain_deadline: Option<Instant> = None;

        // After a journal error, reads and seals wait until then; everything else (shutdown,
        // confirmations, the drain deadline) stays live meanwhile.
        let mut retry_at: Option<Instant> = None;
        loop {
            let committed_now = *committed.borrow_and_update();
            let may_work = retry_at.is_none_or(|at| Instant::now() >= at);
            if may_work {
                retry_at = None;
                if !self.unreleased.is_empty() {
                    self.retry_releases().await;
                    if !self.unreleased.is_empty() {
                        retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
            }

            // 1. Top up the buffer while there is committed data and room, and the sink can take
            //    a batch: records left in the journal meanwhile stay evictable (journal.maxBytes).
            if retry_at.is_none()
                && self.fetched_through < committed_now
                && self.buffer_raw < self.raw_cap
                && self.inflight < self.settings.max_inflight
            {
                match self.fetch(committed_now).await {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "Failed to read the journal; retrying.");
                        retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
            }

            // 2. Hand over what the window allows: stored batches first.
            while retry_at.is_none()
                && self.inflight < self.settings.max_inflight
                && self.stored_pending()
            {
                match self.next_stored().await {
                    Ok(Some(batch)) => self.hand_over(&batches, batch).await?,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "Failed to read stored batches; retrying.");
                        retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
            }
            let draining = drain_deadline.is_some();
            if retry_at.is_none()
                && self.inflight < self.settings.max_inflight
                && !self.stored_pending()
                && !self.buffer.is_empty()
                && self.should_flush(draining)
            {
                match self.seal_one(draining).await {
                    Ok(Some(batch)) => {
                        self.hand_over(&batches, batch).await?;
                        continue;
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "Failed to seal a batch; retrying.");
                        retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
            }

            // 3. Done draining? Everything batched and confirmed, or out of time: what is left
            //    (unsealed records, unconfirmed batches) stays in the journal for the next start.
            if let Some(deadline) = drain_deadline {
                let all_batched = self.buffer.is_empty()
                    && !self.stored_pending()
                    && self.fetched_through >= committed_now;
                if all_batched && self.inflight == 0 {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        unconfirmed_batches = self.inflight + self.resend.len(),
                        stored_batches_not_yet_sent = self.stored_pending(),
                        unbatched_records = committed_now.saturating_sub(self.fetched_through)
                            + self.buffer.len() as u64,
                        "Upstream did not take everything before shutdown; it stays in the journal and is sent at the next start."
                    );
                    return Ok(());
                }
            }

            // 4. Wait for something to change.
            let flush_at = self.flush_deadline();
            let drain_timer =
                drain_deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                Some(confirmation) = confirmations.recv() => {
                    self.settled(confirmation).await;
                }
                changed = committed.changed() => {
                    if changed.is_err() && drain_deadline.is_none() {
                        // The writer is gone: nothing more will be committed.
                        drain_deadline = Some(Instant::now() + self.settings.drain_grace);
                    }
                }
                _ = tokio::time::sleep_until(flush_at.unwrap_or(drain_timer)), if flush_at.is_some() && self.inflight < self.settings.max_inflight => {}
                _ = tokio::time::sleep_until(drain_timer), if drain_deadline.is_some() => {}
                _ = tokio::time::sleep_until(retry_at.unwrap_or(drain_timer)), if retry_at.is_some() => {}
                _ = shutdown.wait(), if drain_deadline.is_none() => {
                    tracing::info!("Batcher draining: flushing what is committed.");
                    drain_deadline = Some(Instant::now() + self.settings.drain_grace);
                }
                Some(batch) = next_setting(&mut self.live_batch) => self.apply_batch(batch),
            }
        }
    }

    /// Takes new batch settings: they apply to the next batch sealed.
    fn apply_batch(&mut self, batch: BatchConfig) {
        self.max_bytes = (batch.max_bytes.get() as usize).min(self.settings.max_payload);
        self.raw_cap = self.max_bytes * RAW_CAP_FACTOR;
        self.codec = batch.compression.into();
        self.next_pack_at_raw = 0;
        tracing::info!(
            "Applied new batch settings: maxBytes {}, maxMessages {}, maxDelayMs {}, compression {}.",
            self.max_bytes,
            batch.max_messages.get(),
            batch.max_delay_ms.get(),
            batch.compression.name()
        );
        self.settings.batch = batch;
    }

    async fn fetch(&mut self, committed_now: u64) -> Result<(), JournalError> {
        let room = self.raw_cap.saturating_sub(self.buffer_raw).max(1);
        let records = self
            .reader
            .records_after(self.fetched_through, FETCH_LIMIT, room)
            .await?;
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            // Nothing visible past our cursor (e.g. only duplicates committed): catch up.
            self.fetched_through = committed_now;
            return Ok(());
        };
        let (first, last) = (first.seq, last.seq);
        // From here on the journal will not evict these; drop any QoS 0 record it evicted
        // between our read and the reservation, so evicted means "not delivered". Only QoS 0
        // records are ever evicted: a read without any needs no reservation (and no wait).
        let present = if records.iter().any(|r| r.record.qos == 0) {
            self.journal.reserve(first, last).await?
        } else {
            Vec::new()
        };
        self.fetched_through = last;
        for rec in records {
            if rec.record.qos == 0 && present.binary_search(&rec.seq).is_err() {
                continue;
            }
            self.buffer_raw += rec.record.payload.len();
            self.buffer.push_back(rec);
        }
        Ok(())
    }

    /// When the oldest buffered record reaches `maxDelayMs`.
    fn flush_deadline(&self) -> Option<Instant> {
        let oldest = self.buffer.front()?;
        let due_ms = oldest.record.received_at_ms + self.settings.batch.max_delay_ms.get() as i64;
        let wait = (due_ms - now_ms()).max(0) as u64;
        Some(Instant::now() + Duration::from_millis(wait))
    }

    fn should_flush(&self, draining: bool) -> bool {
        draining
            || self.buffer.len() >= self.settings.batch.max_messages.get() as usize
            || self.buffer_raw >= self.raw_cap
            || self.flush_deadline().is_some_and(|at| at <= Instant::now())
            || (self.buffer_raw >= self.next_pack_at_raw
                && self.buffer_raw as f64 / self.ratio >= FULL_ENOUGH * self.max_bytes as f64)
    }

    /// Packs the front of the buffer. Returns `None` when the buffer turned out not to be full
    /// enough to be worth sealing yet (and nothing is due).
    async fn seal_one(&mut self, draining: bool) -> Result<Option<Batch>, JournalError> {
        let limit = self
            .buffer
            .len()
            .min(self.settings.batch.max_messages.get() as usize);
        let candidates: Vec<JournaledRecord> = self.buffer.iter().take(limit).cloned().collect();
        let id = BatchIdentity {
            gateway: self.settings.gateway.clone(),
            batch_seq: self.next_batch_seq,
            codec: self.codec,
            created_at: now_ms(),
        };
        let max_bytes = self.max_bytes;
        let hint = self.raw_ratio;
        let packed = tokio::task::spawn_blocking(move || {
            envelope::pack_with_hint(&id, &candidates, max_bytes, hint)
        })
        .await
        .map_err(|_| JournalError::Closed)?;

        let Some(packed) = packed else {
            // The first record does not fit a batch whole: it travels as fragments.
            return self.seal_fragments().await;
        };

        let raw = packed.header.raw_bytes as f64;
        let size = packed.payload.len();
        // The ratio is kept in the unit `buffer_raw` counts (payload bytes), so the estimate in
        // `should_flush` compares like with like.
        let payload_bytes: usize = self
            .buffer
            .iter()
            .take(packed.count)
            .map(|r| r.record.payload.len())
            .sum();
        self.ratio = (payload_bytes as f64 / size as f64).max(0.01);
        self.raw_ratio = Some(raw / size as f64);
        let took_all = packed.count == self.buffer.len();
        let due = draining
            || self.flush_deadline().is_some_and(|at| at <= Instant::now())
            || packed.count >= self.settings.batch.max_messages.get() as usize
            || self.buffer_raw >= self.raw_cap;
        if took_all && !due && (size as f64) < FULL_ENOUGH * self.max_bytes as f64 {
            // Everything fits with room to spare: wait for more (or the deadline).
            self.next_pack_at_raw = self.buffer_raw + self.buffer_raw / 10;
            return Ok(None);
        }

        let batch = Batch {
            batch_seq: packed.header.batch_seq,
            record_count: packed.header.count,
            first_seq: packed.header.first_seq,
            last_seq: packed.header.last_seq,
            payload: packed.payload,
        };
        self.journal
            .seal(SealedBatch {
                batch_seq: batch.batch_seq,
                sink: self.settings.sink_name.to_string(),
                first_seq: batch.first_seq,
                last_seq: batch.last_seq,
                record_count: batch.record_count,
                created_at: packed.header.created_at,
                payload: batch.payload.clone(),
            })
            .await?;
        self.next_batch_seq += 1;
        for rec in self.buffer.drain(..packed.count) {
            self.buffer_raw -= rec.record.payload.len();
        }
        self.next_pack_at_raw = 0;
        metrics::counter!(telemetry::BATCHES_OUT).increment(1);
        metrics::histogram!(telemetry::BATCH_RECORDS).record(packed.count as f64);
        metrics::histogram!(telemetry::BATCH_BYTES).record(size as f64);
        metrics::counter!(telemetry::BATCH_RAW_BYTES_TOTAL).increment(raw as u64);
        metrics::counter!(telemetry::BATCH_BYTES_TOTAL).increment(size as u64);
        metrics::gauge!(telemetry::COMPRESSION_RATIO).set(raw / size as f64);
        tracing::debug!(
            batch_seq = batch.batch_seq,
            records = batch.record_count,
            bytes = size,
            ratio = format!("{:.2}", raw / size as f64),
            "Sealed batch."
        );
        Ok(Some(batch))
    }

    /// Seals the front record, too large for one batch, as consecutive fragment batches (all in
    /// one transaction) and returns the first; the others wait in `resend`, ahead of new seals.
    /// A record no budget can carry (its metadata alone is too large) is dead-lettered.
    async fn seal_fragments(&mut self) -> Result<Option<Batch>, JournalError> {
        let rec = self.buffer.front().cloned().expect("buffer is not empty");
        let id = BatchIdentity {
            gateway: self.settings.gateway.clone(),
            batch_seq: self.next_batch_seq,
            codec: self.codec,
            created_at: now_ms(),
        };
        let max_bytes = self.max_bytes;
        let split = tokio::task::spawn_blocking(move || envelope::fragments(&id, &rec, max_bytes))
            .await
            .map_err(|_| JournalError::Closed)?;
        // The record leaves the buffer only once the journal took it: on an error it is tried
        // again, never skipped.
        let parts = match split {
            Ok(parts) => parts,
            Err(e) => {
                let rec = self.buffer.front().expect("buffer is not empty");
                let reason = format!("record cannot be carried upstream: {e}");
                tracing::error!(seq = rec.seq, client_id = %rec.record.client_id, %reason, "Moving record to dead_letter.");
                self.journal.dead_letter(rec.seq, reason).await?;
                let rec = self.buffer.pop_front().expect("buffer is not empty");
                self.buffer_raw -= rec.record.payload.len();
                return Ok(None);
            }
        };
        let sealed: Vec<SealedBatch> = parts.iter().map(|p| self.sealed(p)).collect();
        self.journal.seal_all(sealed.clone()).await?;
        let rec = self.buffer.pop_front().expect("buffer is not empty");
        self.buffer_raw -= rec.record.payload.len();
        self.next_batch_seq += sealed.len() as u64;
        self.next_pack_at_raw = 0;
        metrics::counter!(telemetry::BATCHES_OUT).increment(sealed.len() as u64);
        tracing::debug!(
            seq = rec.seq,
            bytes = rec.record.payload.len(),
            fragments = sealed.len(),
            "Sealed a record too large for one batch as fragments."
        );
        let mut batches = sealed.into_iter().map(stored);
        let first = batches.next().map(Batch::from);
        for (i, batch) in batches.enumerate() {
            self.resend.insert(i, batch);
        }
        Ok(first)
    }

    /// A packed payload as the journal records it.
    fn sealed(&self, packed: &envelope::Packed) -> SealedBatch {
        SealedBatch {
            batch_seq: packed.header.batch_seq,
            sink: self.settings.sink_name.to_string(),
            first_seq: packed.header.first_seq,
            last_seq: packed.header.last_seq,
            record_count: packed.header.count,
            created_at: packed.header.created_at,
            payload: packed.payload.clone(),
        }
    }

    async fn hand_over(
        &mut self,
        batches: &mpsc::Sender<Batch>,
        batch: Batch,
    ) -> Result<(), BatcherError> {
        // The channel holds max_inflight, and we never exceed it, so this does not wait.
        let batch_seq = batch.batch_seq;
        batches
            .send(batch)
            .await
            .map_err(|_| BatcherError::SinkStopped(batch_seq))?;
        self.inflight += 1;
        metrics::gauge!(telemetry::SINK_INFLIGHT).set(self.inflight as f64);
        Ok(())
    }

    /// The sink settled a batch: release its rows, or move them to `dead_letter`.
    async fn settled(&mut self, confirmation: Confirmation) {
        self.inflight = self.inflight.saturating_sub(1);
        metrics::gauge!(telemetry::SINK_INFLIGHT).set(self.inflight as f64);
        if let Err(e) = self.apply_settlement(&confirmation).await {
            tracing::error!(error = %e, batch_seq = confirmation.batch_seq, "Failed to record a settled batch in the journal; retrying.");
            self.unreleased.push(confirmation);
        }
    }

    async fn apply_settlement(&self, confirmation: &Confirmation) -> Result<(), JournalError> {
        let batch_seq = confirmation.batch_seq;
        match &confirmation.outcome {
            Outcome::Delivered => {
                self.journal.confirm(batch_seq).await?;
                metrics::counter!(telemetry::BATCHES_CONFIRMED).increment(1);
                telemetry::PROGRESS
                    .batches_delivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Outcome::DeadLettered(reason) => {
                let released = self
                    .journal
                    .dead_letter_batch(batch_seq, reason.clone())
                    .await?;
                metrics::counter!(telemetry::BATCHES_DEAD_LETTERED).increment(1);
                tracing::error!(
                    batch_seq,
                    records = released.rows,
                    reason = %reason,
                    "Moved an undeliverable batch's records to dead_letter; `gatehouse dead-letter list` shows them, `retry` resends them."
                );
            }
        }
        Ok(())
    }

    /// Tries again to record the settlements the journal failed to take.
    async fn retry_releases(&mut self) {
        let pending = std::mem::take(&mut self.unreleased);
        for confirmation in pending {
            if self.apply_settlement(&confirmation).await.is_err() {
                self.unreleased.push(confirmation);
            }
        }
    }

    /// Hands every unconfirmed batch to the current sink, and says so once.
    async fn adopt_stored_batches(&mut self) -> Result<(), JournalError> {
        let sink = self.settings.sink_name;
        let adoption = self.journal.adopt(sink, self.max_bytes as u64).await?;
        if adoption.records > 0 || adoption.batches > 0 {
            tracing::info!(
                "Resuming {} records and {} unconfirmed batches from the journal.",
                adoption.records,
                adoption.batches
            );
        }
        let from_others: u64 = adoption.from_other_sinks.iter().map(|(_, n)| n).sum();
        if from_others > 0 {
            metrics::counter!(telemetry::BATCHES_ADOPTED).increment(from_others);
            let sources = adoption
                .from_other_sinks
                .iter()
                .map(|(name, n)| format!("{n} from the {name} upstream"))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::info!(
                "Handing {from_others} unconfirmed batches sealed for another upstream ({sources}) to the {sink} upstream; {} of all stored batches are larger than its {} byte payload limit and will be re-batched.",
                adoption.oversized,
                self.max_bytes
            );
        } else if adoption.oversized > 0 {
            tracing::info!(
                "{} stored batches are larger than the {sink} upstream's {} byte payload limit and will be re-batched.",
                adoption.oversized,
                self.max_bytes
            );
        }
        Ok(())
    }

    /// Whether stored batches remain to be handed over.
    fn stored_pending(&self) -> bool {
        !self.resend.is_empty() || self.stored_after + 1 < self.stored_until
    }

    /// The next stored batch to hand over, re-batched first when it is larger than the sink
    /// takes. `None` when there was nothing (more) to read, or the batch turned out to be empty.
    async fn next_stored(&mut self) -> Result<Option<Batch>, JournalError> {
        if self.resend.is_empty() {
            let page = self
                .reader
                .unconfirmed_batches(
                    self.stored_after,
                    self.stored_until,
                    self.settings.max_inflight,
                )
                .await?;
            match page.last() {
                Some(last) => self.stored_after = last.batch_seq,
                None => self.stored_after = self.stored_until,
            }
            self.resend.extend(page);
        }
        let Some(stored) = self.resend.pop_front() else {
            return Ok(None);
        };
        if stored.payload.len() <= self.max_bytes {
            return Ok(Some(Batch::from(stored)));
        }
        let mut rebatched = match self.rebatch(&stored).await {
            Ok(rebatched) => rebatched,
            Err(e) => {
                // Tried again after the retry pause; never dropped from this run.
                self.resend.push_front(stored);
                return Err(e);
            }
        };
        if rebatched.is_empty() {
            return Ok(None);
        }
        let first = rebatched.remove(0);
        for (i, batch) in rebatched.into_iter().enumerate() {
            self.resend.insert(i, batch);
        }
        Ok(Some(Batch::from(first)))
    }

    /// Packs a stored batch's records into batches that fit `max_bytes`, and replaces it by
    /// them in the journal: records too large for one batch as fragments; a stored fragment
    /// batch by a finer split of its record (replacing all its fragment batches). A record no
    /// budget can carry is dead-lettered.
    async fn rebatch(&mut self, old: &StoredBatch) -> Result<Vec<StoredBatch>, JournalError> {
        let mut records = self
            .reader
            .records_between(old.first_seq, old.last_seq)
            .await?;
        let payload = old.payload.clone();
        let stored_split = tokio::task::spawn_blocking(move || {
            envelope::decode(&payload)
                .ok()
                .and_then(|(_, recs)| recs.first().and_then(|r| r.fragment))
        })
        .await
        .map_err(|_| JournalError::Closed)?;
        let mut sealed = Vec::new();
        let mut next_seq = self.next_batch_seq;
        let id_at = |batch_seq| BatchIdentity {
            gateway: self.settings.gateway.clone(),
            batch_seq,
            codec: self.codec,
            created_at: now_ms(),
        };
        let max_bytes = self.max_bytes;
        let mut dead = Vec::new();
        while !records.is_empty() {
            let id = id_at(next_seq);
            let candidates = records.clone();
            let replaced = stored_split.map(|f| f.count);
            let parts = tokio::task::spawn_blocking(move || match replaced {
                Some(count) => envelope::refragments(&id, &candidates[0], max_bytes, count)
                    .map(|parts| (parts, 1)),
                None => match envelope::pack(&id, &candidates, max_bytes) {
                    Some(packed) => {
                        let count = packed.count;
                        Ok((vec![packed], count))
                    }
                    None => envelope::fragments(&id, &candidates[0], max_bytes).map(|p| (p, 1)),
                },
            })
            .await
            .map_err(|_| JournalError::Closed)?;
            match parts {
                Ok((parts, consumed)) => {
                    records.drain(..consumed);
                    next_seq += parts.len() as u64;
                    sealed.extend(parts.iter().map(|p| self.sealed(p)));
                }
                Err(e) => {
                    let rec = records.remove(0);
                    dead.push((rec.seq, format!("record cannot be carried upstream: {e}")));
                }
            }
        }
        for (seq, reason) in dead {
            tracing::error!(seq, %reason, "Moving record to dead_letter.");
            self.journal.dead_letter(seq, reason).await?;
        }
        let replace = match stored_split {
            Some(_) => Replace::FragmentsOf(old.first_seq),
            None => Replace::Batch(old.batch_seq),
        };
        self.journal.reseal(replace, sealed.clone()).await?;
        if stored_split.is_some() {
            // Its sibling fragments were replaced too: do not send them.
            let seq = old.first_seq;
            self.resend
                .retain(|b| !(b.first_seq == seq && b.last_seq == seq));
        }
        self.next_batch_seq = next_seq;
        tracing::info!(
            old_batch_seq = old.batch_seq,
            old_bytes = old.payload.len(),
            new_batches = sealed.len(),
            "Re-batched a stored batch to fit the upstream's payload limit."
        );
        Ok(sealed.into_iter().map(stored).collect())
    }
}

impl From<StoredBatch> for Batch {
    fn from(stored: StoredBatch) -> Self {
        Batch {
            batch_seq: stored.batch_seq,
            record_count: stored.record_count,
            first_seq: stored.first_seq,
            last_seq: stored.last_seq,
            payload: stored.payload,
        }
    }
}

/// A sealed batch as the stored-batch queue holds it.
fn stored(b: SealedBatch) -> StoredBatch {
    StoredBatch {
        batch_seq: b.batch_seq,
        first_seq: b.first_seq,
        last_seq: b.last_seq,
        record_count: b.record_count,
        payload: b.payload,
    }
}

/// The next value of a settings watch; never, when there is none or its sender is gone.
async fn next_setting<T: Clone>(watch: &mut Option<tokio::sync::watch::Receiver<T>>) -> Option<T> {
    if let Some(rx) = watch
        && rx.changed().await.is_ok()
    {
        return Some(rx.borrow_and_update().clone());
    }
    std::future::pending().await
}
