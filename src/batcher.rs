//! The batcher: reads committed records in sequence order, packs them into envelope batches and
//! hands them to the sink; on the sink's confirmation it has the journal release their rows.
//!
//! Guarantees:
//! - Records enter batches in journal order; batches get consecutive `batch_seq`s.
//! - A batch is recorded in the journal (`Journal::seal`) before the sink sees it, so its
//!   `batch_seq` and bytes are the same on every retry, across restarts.
//! - A batch is flushed when it is full (`maxBytes` after compression, or `maxMessages`), or when
//!   its oldest record has waited `maxDelayMs`. A backlog therefore drains in full batches.
//! - At most `Sink::max_inflight` batches are unconfirmed; the batcher stops reading beyond that.
//! - Memory is bounded: at most `RAW_CAP_FACTOR * maxBytes` of records are buffered.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::BatchConfig;
use crate::envelope::{self, BatchIdentity, Codec};
use crate::journal::{Journal, JournalError, JournalReader, SealedBatch};
use crate::record::{JournaledRecord, now_ms};
use crate::shutdown::Shutdown;
use crate::sink::{Batch, Confirmation};
use crate::telemetry;

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
    /// After shutdown begins: how long to wait for the sink to confirm what it holds.
    pub drain_grace: Duration,
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
    /// Unconfirmed batches recovered at start-up, waiting for room in the window.
    resend: VecDeque<Batch>,
    inflight: usize,
    /// Confirmations whose journal release failed, retried.
    unreleased: Vec<u64>,
    /// Observed payload-bytes/batch-bytes ratio, to guess when the buffer could fill a batch.
    ratio: f64,
    /// The last batch's record-stream bytes per payload byte: where `pack` starts guessing.
    raw_ratio: Option<f64>,
    /// Do not try packing again before the buffer holds this many raw bytes.
    next_pack_at_raw: usize,
}

impl Batcher {
    pub fn new(journal: Journal, reader: JournalReader, settings: Settings) -> Self {
        let max_bytes = settings.batch.max_bytes.get() as usize;
        Self {
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
            inflight: 0,
            unreleased: Vec::new(),
            ratio: 1.0,
            raw_ratio: None,
            next_pack_at_raw: 0,
        }
    }

    /// Runs until `shutdown` fires and what was committed by then is batched and confirmed (or
    /// the drain grace runs out). Returns an error only if the journal cannot be read at start.
    pub async fn run(
        mut self,
        batches: mpsc::Sender<Batch>,
        mut confirmations: mpsc::UnboundedReceiver<Confirmation>,
        mut shutdown: Shutdown,
    ) -> Result<(), JournalError> {
        let state = self.reader.batcher_state().await?;
        self.next_batch_seq = state.next_batch_seq;
        self.fetched_through = state.batched_through;
        for stored in self
            .reader
            .unconfirmed_batches(self.settings.sink_name)
            .await?
        {
            self.resend.push_back(Batch {
                batch_seq: stored.batch_seq,
                record_count: stored.record_count,
                first_seq: stored.first_seq,
                last_seq: stored.last_seq,
                payload: stored.payload,
            });
        }
        if !self.resend.is_empty() {
            tracing::info!(
                batches = self.resend.len(),
                "Resending batches left unconfirmed before the restart."
            );
        }
        let mut committed = self.journal.committed();
        let mut drain_deadline: Option<Instant> = None;

        loop {
            self.retry_releases().await;
            let committed_now = *committed.borrow_and_update();

            // 1. Top up the buffer while there is committed data and room, and the sink can take
            //    a batch: records left in the journal meanwhile stay evictable (journal.maxBytes).
            if self.fetched_through < committed_now
                && self.buffer_raw < self.raw_cap
                && self.inflight < self.settings.max_inflight
            {
                if let Err(e) = self.fetch(committed_now).await {
                    tracing::error!(error = %e, "Failed to read the journal; retrying.");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                continue;
            }

            // 2. Hand over what the window allows.
            while self.inflight < self.settings.max_inflight
                && let Some(batch) = self.resend.pop_front()
            {
                self.hand_over(&batches, batch).await;
            }
            let draining = drain_deadline.is_some();
            if self.inflight < self.settings.max_inflight
                && self.resend.is_empty()
                && !self.buffer.is_empty()
                && self.should_flush(draining)
            {
                match self.seal_one(draining).await {
                    Ok(Some(batch)) => self.hand_over(&batches, batch).await,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "Failed to seal a batch; retrying.");
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
                continue;
            }

            // 3. Done draining? Everything batched and confirmed, or out of time: what is left
            //    (unsealed records, unconfirmed batches) stays in the journal for the next start.
            if let Some(deadline) = drain_deadline {
                let all_batched = self.buffer.is_empty()
                    && self.resend.is_empty()
                    && self.fetched_through >= committed_now;
                if all_batched && self.inflight == 0 {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        unconfirmed_batches = self.inflight + self.resend.len(),
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
                    self.confirmed(confirmation.batch_seq).await;
                }
                changed = committed.changed() => {
                    if changed.is_err() && drain_deadline.is_none() {
                        // The writer is gone: nothing more will be committed.
                        drain_deadline = Some(Instant::now() + self.settings.drain_grace);
                    }
                }
                _ = tokio::time::sleep_until(flush_at.unwrap_or(drain_timer)), if flush_at.is_some() && self.inflight < self.settings.max_inflight => {}
                _ = tokio::time::sleep_until(drain_timer), if drain_deadline.is_some() => {}
                _ = shutdown.wait(), if drain_deadline.is_none() => {
                    tracing::info!("Batcher draining: flushing what is committed.");
                    drain_deadline = Some(Instant::now() + self.settings.drain_grace);
                }
            }
        }
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
            // Not even the first record fits: only possible if maxBytes shrank since it was
            // accepted. Keep it for an operator rather than block the stream forever.
            let rec = self.buffer.pop_front().expect("buffer is not empty");
            self.buffer_raw -= rec.record.payload.len();
            let reason = format!(
                "record does not fit in batch.maxBytes = {} (it was accepted under a larger limit)",
                self.max_bytes
            );
            tracing::error!(seq = rec.seq, client_id = %rec.record.client_id, %reason, "Moving record to dead_letter.");
            self.journal.dead_letter(rec.seq, reason).await?;
            metrics::counter!(telemetry::DEAD_LETTERED).increment(1);
            return Ok(None);
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
            ratio = raw / size as f64,
            "Sealed batch."
        );
        Ok(Some(batch))
    }

    async fn hand_over(&mut self, batches: &mpsc::Sender<Batch>, batch: Batch) {
        // The channel holds max_inflight, and we never exceed it, so this does not wait.
        if batches.send(batch).await.is_ok() {
            self.inflight += 1;
            metrics::gauge!(telemetry::SINK_INFLIGHT).set(self.inflight as f64);
        }
    }

    async fn confirmed(&mut self, batch_seq: u64) {
        self.inflight = self.inflight.saturating_sub(1);
        metrics::gauge!(telemetry::SINK_INFLIGHT).set(self.inflight as f64);
        metrics::counter!(telemetry::BATCHES_CONFIRMED).increment(1);
        if let Err(e) = self.journal.confirm(batch_seq).await {
            tracing::error!(error = %e, batch_seq, "Failed to release a confirmed batch; retrying.");
            self.unreleased.push(batch_seq);
        }
    }

    async fn retry_releases(&mut self) {
        if self.unreleased.is_empty() {
            return;
        }
        tokio::time::sleep(RETRY_AFTER).await;
        let pending = std::mem::take(&mut self.unreleased);
        for batch_seq in pending {
            if self.journal.confirm(batch_seq).await.is_err() {
                self.unreleased.push(batch_seq);
            }
        }
    }
}

#[cfg(test)]
mod tests;
