//! The delivery engine every networked sink runs: held batches (`DeliveryWindow`), resend after
//! every failure, pacing to the upstream's per-connection limits, reconnect backoff with jitter,
//! outage logging and the progress watchdog, over a small seam, `Transport` (connect, publish,
//! what happened next). The `mqtt` sink's transport is one rumqttc link; the `greengrass`
//! sink's is PublishToIoTCore over the nucleus's IPC connection.
//!
//! Guarantees:
//! - A batch is confirmed only when its transport reports it `Acknowledged`; a transport's own
//!   guarantees say what that means (a PUBACK for the packet that carried it; the nucleus's
//!   answer; the cloud's receipt).
//! - After any failure every held batch is sent again, with its original bytes and `batchSeq`.
//! - A batch that fails alone `maxBatchAttempts` times while others get through is settled as
//!   dead-lettered; nothing else is ever given up (see `window`).
//! - At most `max_inflight` batches are in flight; publishes are paced to `publishes_per_sec`
//!   and `bytes_per_sec`; connection attempts are `min_connect_spacing` apart at least and
//!   follow an exponential backoff with jitter.
//! - With batches in flight and nothing acknowledged for `ack_timeout`, the connection is
//!   failed (the watchdog), whatever state the transport believes it is in.
//! - Failures are logged once per change of cause, in the transport's words.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::pacing::{Backoff, TokenBucket};
use super::window::DeliveryWindow;
use super::{BILLING_UNIT, Batch, Confirmation, Outcome};
use crate::telemetry;

/// A link up this long without failing has earned a fresh backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// What a transport reports about a batch it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The far side acknowledged it: it may be confirmed.
    Acknowledged(u64),
    /// It must be sent again, through no fault of its own (a receipt did not come in time).
    Retry(u64),
    /// Nothing the engine needs to act on (a ping, a connection-level event).
    Nothing,
}

/// Why a connection ended, for the operator, and what it says about the batches in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub cause: String,
    /// The batch the upstream refused by name, when that is what ended it.
    pub refused: Option<u64>,
    /// No batch's fault (throttling, a full spool, offline): nothing becomes a suspect.
    pub transient: bool,
}

impl Failure {
    /// A failure of the link itself.
    pub fn link(cause: impl Into<String>) -> Self {
        Self {
            cause: cause.into(),
            refused: None,
            transient: false,
        }
    }
}

/// One upstream connection's worth of publishing.
pub trait Transport: Send {
    /// Opens a connection; returns once batches may be published. Called again after every
    /// failure.
    fn connect(&mut self) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Starts publishing `batch`; what becomes of it is reported by `next`.
    fn publish(&mut self, batch: &Batch) -> Result<(), Failure>;

    /// Waits for what happens next.
    fn next(&mut self) -> impl Future<Output = Result<Event, Failure>> + Send;

    /// Batches given to `publish` on this connection and not yet reported.
    fn in_flight(&self) -> usize;

    /// Bytes IoT Core meters for publishing `batch` (payload plus topic).
    fn metered_size(&self, batch: &Batch) -> usize;

    /// A bounded label for a failure cause (metrics), e.g. `dns`, `watchdog`.
    fn cause_class(&self, cause: &str) -> &'static str;
}

/// How the engine paces and retries.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where batches go, for the start-up log line.
    pub describe: String,
    pub max_inflight: usize,
    pub publishes_per_sec: f64,
    pub bytes_per_sec: f64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub min_connect_spacing: Duration,
    pub ack_timeout: Duration,
    pub max_batch_attempts: u32,
}

/// Why one connection ended.
enum Ended {
    Shutdown,
    Failed(Failure),
}

/// The engine: holds what the batcher hands over until it is settled.
pub struct Engine<T: Transport> {
    transport: T,
    settings: Settings,
    batches: mpsc::Receiver<Batch>,
    confirmations: mpsc::Sender<Confirmation>,
    window: DeliveryWindow,
    publishes: TokenBucket,
    bytes: TokenBucket,
    backoff: Backoff,
    last_connect: Option<Instant>,
    /// The class of the current outage's cause, logged once; `None` while the link delivers.
    outage: Option<&'static str>,
    /// "Upstream connected." was logged since the last logged failure.
    announced_up: bool,
}

impl<T: Transport> Engine<T> {
    pub fn new(
        transport: T,
        settings: Settings,
        batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::Sender<Confirmation>,
    ) -> Self {
        let now = Instant::now();
        Self {
            transport,
            publishes: TokenBucket::new(settings.publishes_per_sec, 1.0, now),
            // A tenth of a second of burst: a whole batch may go at once, paid for afterwards.
            bytes: TokenBucket::new(settings.bytes_per_sec, settings.bytes_per_sec / 10.0, now),
            backoff: Backoff::new(settings.backoff_min, settings.backoff_max),
            window: DeliveryWindow::new(settings.max_batch_attempts),
            settings,
            batches,
            confirmations,
            last_connect: None,
            outage: None,
            announced_up: false,
        }
    }

    /// Delivers until the batch channel closes (shutdown).
    pub async fn run(mut self) {
        tracing::info!("Upstream starting: {}.", self.settings.describe);
        loop {
            if let Some(last) = self.last_connect {
                let spacing = (last + self.settings.min_connect_spacing)
                    .saturating_duration_since(Instant::now());
                if !spacing.is_zero() && !self.wait_accepting_batches(spacing).await {
                    return;
                }
            }
            self.last_connect = Some(Instant::now());
            let started = Instant::now();
            let ended = self.connection().await;
            set_connected(false);
            let failure = match ended {
                Ended::Shutdown => return,
                Ended::Failed(failure) => failure,
            };
            if !self.settle_failure(&failure).await {
                return;
            }
            let class = self.transport.cause_class(&failure.cause);
            metrics::counter!(telemetry::UPSTREAM_ERRORS, "cause" => class).increment(1);
            if started.elapsed() >= HEALTHY_AFTER {
                // A long healthy spell ends any outage: the next failure is news.
                self.backoff.reset();
                self.outage = None;
            }
            let delay = self.backoff.next_delay();
            // One WARN per change of cause; a flapping link or an upstream that keeps refusing
            // stays at debug until it delivers again.
            if self.outage != Some(class) {
                tracing::warn!(
                    cause = %failure.cause,
                    held_batches = self.window.len(),
                    retry_in_ms = delay.as_millis() as u64,
                    "Upstream link down."
                );
                self.outage = Some(class);
                self.announced_up = false;
            } else {
                tracing::debug!(cause = %failure.cause, retry_in_ms = delay.as_millis() as u64, "Upstream still down.");
            }
            if !self.wait_accepting_batches(delay).await {
                return;
            }
        }
    }

    /// Puts the batches in flight back in the window and settles the poison ones. False when
    /// the batcher is gone.
    async fn settle_failure(&mut self, failure: &Failure) -> bool {
        if failure.transient {
            self.window.requeue_all();
            return true;
        }
        for poison in self
            .window
            .connection_ended(failure.refused, &failure.cause)
        {
            let batch_seq = poison.batch.batch_seq;
            tracing::error!(
                batch_seq,
                records = poison.batch.record_count,
                reason = %poison.reason,
                "Upstream will not take this batch; moving it to dead_letter (see gatehouse dead-letter)."
            );
            let settled = Confirmation {
                batch_seq,
                outcome: Outcome::DeadLettered(poison.reason),
            };
            if self.confirmations.send(settled).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Waits `delay` while still taking batches from the batcher (they are held for the next
    /// connection). Returns false when the channel closed (shutdown).
    async fn wait_accepting_batches(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                batch = self.batches.recv() => match batch {
                    Some(batch) => self.window.hold(batch),
                    None => return false,
                },
            }
        }
    }

    /// One connection, from connecting to failure (or shutdown).
    async fn connection(&mut self) -> Ended {
        metrics::counter!(telemetry::UPSTREAM_CONNECTS).increment(1);
        {
            let Self {
                transport,
                batches,
                window,
                ..
            } = self;
            let connect = transport.connect();
            tokio::pin!(connect);
            loop {
                tokio::select! {
                    connected = &mut connect => match connected {
                        Ok(()) => break,
                        Err(failure) => return Ended::Failed(failure),
                    },
                    batch = batches.recv() => match batch {
                        Some(batch) => window.hold(batch),
                        None => return Ended::Shutdown,
                    },
                }
            }
        }
        set_connected(true);
        if !self.announced_up {
            tracing::info!(resending = self.window.len(), "Upstream connected.");
            self.announced_up = true;
        }
        let ack_timeout = self.settings.ack_timeout;
        // Watchdog reference: the last acknowledgement, or when the first batch in flight went.
        let mut progress = Instant::now();
        loop {
            let in_flight = self.transport.in_flight();
            let now = Instant::now();
            let send_at = now + self.publishes.wait(now).max(self.bytes.wait(now));
            let can_send = in_flight < self.settings.max_inflight && self.window.next().is_some();
            tokio::select! {
                event = self.transport.next() => match event {
                    Ok(Event::Acknowledged(seq)) => {
                        if self.window.acknowledged(seq) {
                            if self.confirmations.send(Confirmation::delivered(seq)).await.is_err() {
                                return Ended::Shutdown;
                            }
                            metrics::counter!(telemetry::UPSTREAM_ACKS).increment(1);
                            self.backoff.reset();
                            self.outage = None;
                            progress = Instant::now();
                        }
                    }
                    Ok(Event::Retry(seq)) => self.window.requeue(seq),
                    Ok(Event::Nothing) => {}
                    Err(failure) => return Ended::Failed(failure),
                },
                batch = self.batches.recv() => match batch {
                    Some(batch) => self.window.hold(batch),
                    None => return Ended::Shutdown,
                },
                _ = tokio::time::sleep_until(send_at), if can_send => {
                    let Some(batch) = self.window.next() else { continue };
                    let seq = batch.batch_seq;
                    let size = self.transport.metered_size(batch);
                    if let Err(failure) = self.transport.publish(batch) {
                        return Ended::Failed(failure);
                    }
                    self.window.sent(seq);
                    let now = Instant::now();
                    self.publishes.take(1.0, now);
                    self.bytes.take(size as f64, now);
                    if in_flight == 0 {
                        progress = now;
                    }
                    metrics::counter!(telemetry::UPSTREAM_PUBLISHES).increment(1);
                    metrics::counter!(telemetry::UPSTREAM_BYTES).increment(size as u64);
                    metrics::counter!(telemetry::BILLING_UNITS).increment(size.div_ceil(BILLING_UNIT) as u64);
                }
                _ = tokio::time::sleep_until(progress + ack_timeout), if in_flight > 0 => {
                    return Ended::Failed(Failure::link(format!(
                        "watchdog: no acknowledgement for {} ms with {in_flight} batches outstanding",
                        ack_timeout.as_millis(),
                    )));
                }
            }
        }
    }
}

fn set_connected(up: bool) {
    metrics::gauge!(telemetry::UPSTREAM_CONNECTED).set(if up { 1.0 } else { 0.0 });
    telemetry::PROGRESS.upstream.store(
        if up {
            telemetry::UPSTREAM_UP
        } else {
            telemetry::UPSTREAM_DOWN
        },
        std::sync::atomic::Ordering::Relaxed,
    );
}
