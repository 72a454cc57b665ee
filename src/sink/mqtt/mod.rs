//! The `mqtt` sink: every batch goes to the cloud over ONE MQTT connection with mutual TLS, paced
//! to AWS IoT Core's per-connection limits, surviving outages.
//!
//! Guarantees:
//! - A batch is confirmed (and its journal rows released) only on the broker's PUBACK for the
//!   packet that carried it; `AsyncClient::publish` returning is not an acknowledgement. Packet
//!   ids are paired with batches strictly (`PacketIds`): should rumqttc ever report a packet id
//!   still mapped to an unacknowledged batch, the link is failed and every batch resent, rather
//!   than risk confirming the wrong one.
//! - Unconfirmed batches are re-sent after every reconnect with their original bytes and
//!   `batchSeq`: the cloud sees duplicates only as whole batches with a repeated `batchSeq`.
//! - A batch the broker refuses, or that ends the connection, every time it is sent alone while
//!   others get through is dead-lettered after `maxBatchAttempts` (see `sink::window`); a broker
//!   that refuses everything dead-letters nothing.
//! - At most `maxInflight` batches are unacknowledged; publishes are paced to
//!   `maxPublishesPerSec` and `maxBytesPerSec`; CONNECTs are at least one second apart and
//!   follow an exponential backoff with jitter.
//! - A watchdog rebuilds a link that is connected but not acknowledging (outstanding batches
//!   and no PUBACK for `ackTimeoutMs`).
//! - Failures are logged once per change of cause, in terms an operator can act on.

mod link;
mod pacing;
mod tls;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use self::link::{Link, LinkEvent};
use self::pacing::{Backoff, TokenBucket};
use super::window::DeliveryWindow;
use super::{Batch, Confirmation, Outcome, Sink, SinkFuture};
use crate::config::MqttUpstream;
use crate::telemetry;

/// IoT Core allows about one CONNECT per second per client id.
const MIN_CONNECT_SPACING: Duration = Duration::from_secs(1);
/// A link up this long without failing has earned a fresh backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// IoT Core meters messages in 5 KB units (payload plus topic).
const BILLING_UNIT: usize = 5 * 1024;
/// IoT Core's largest PUBLISH payload.
const MAX_PAYLOAD: usize = 131_072;

pub struct MqttSink {
    config: MqttUpstream,
    topic: String,
    client_id: String,
    tls: Arc<rustls::ClientConfig>,
}

impl MqttSink {
    /// Loads the certificates and key; errors name the config key.
    pub fn new(config: MqttUpstream, thing_name: &str) -> anyhow::Result<Self> {
        let tls = tls::client_config(&config)?;
        Ok(Self {
            topic: config.topic_for(thing_name),
            client_id: config.client_id_for(thing_name),
            config,
            tls,
        })
    }
}

impl Sink for MqttSink {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn max_inflight(&self) -> usize {
        self.config.max_inflight.get() as usize
    }

    fn max_payload(&self) -> usize {
        MAX_PAYLOAD
    }

    fn run(
        self: Box<Self>,
        batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::Sender<Confirmation>,
    ) -> SinkFuture {
        Box::pin(Runner::new(*self, batches, confirmations).run())
    }
}

/// Why a connection ended.
enum Ended {
    /// The batch channel closed: the gateway is shutting down.
    Shutdown,
    /// The link failed; the cause, for the operator, and the batch the broker refused by name,
    /// if that is what ended it.
    Failed(String, Option<u64>),
}

/// Pairs rumqttc's packet ids with the batches they carry.
///
/// rumqttc 0.25.1 numbers QoS 1 publishes itself and reports each id as `Outgoing::Publish`
/// when it writes the packet, in the order the publishes were requested (a publish whose id
/// collides with one still in flight is held back until that one is acknowledged, and the
/// event loop takes no new request meanwhile). So the `n`th id reported belongs to the `n`th
/// batch requested. Anything that contradicts it fails the link (`Err`): the batches are resent,
/// never confirmed on a guess.
#[derive(Default)]
struct PacketIds {
    /// Batches requested, awaiting their packet id, in request order.
    requested: VecDeque<u64>,
    /// Packet ids written and not yet acknowledged.
    in_flight: HashMap<u16, u64>,
}

impl PacketIds {
    fn requested(&mut self, batch_seq: u64) {
        self.requested.push_back(batch_seq);
    }

    /// rumqttc wrote a publish with `pkid`.
    fn sent(&mut self, pkid: u16) -> Result<(), String> {
        let Some(batch_seq) = self.requested.pop_front() else {
            return Err(format!(
                "link failure: packet id {pkid} reported with no publish requested"
            ));
        };
        if let Some(previous) = self.in_flight.insert(pkid, batch_seq) {
            return Err(format!(
                "link failure: packet id {pkid} reused while batch {previous} is unacknowledged"
            ));
        }
        Ok(())
    }

    /// The broker acknowledged (or refused) `pkid`: the batch it carried.
    fn answered(&mut self, pkid: u16) -> Option<u64> {
        self.in_flight.remove(&pkid)
    }

    fn outstanding(&self) -> usize {
        self.requested.len() + self.in_flight.len()
    }
}

struct Runner {
    sink: MqttSink,
    batches: mpsc::Receiver<Batch>,
    confirmations: mpsc::Sender<Confirmation>,
    /// Batches received and not yet settled; re-sent on every connection.
    window: DeliveryWindow,
    publishes: TokenBucket,
    bytes: TokenBucket,
    backoff: Backoff,
    last_connect: Option<Instant>,
    /// The class of the current outage's cause (`cause_class`), logged once; `None` while the
    /// link is healthy (it has delivered since the last failure).
    outage: Option<&'static str>,
    /// "Upstream connected." was logged since the last logged failure.
    announced_up: bool,
}

impl Runner {
    fn new(
        sink: MqttSink,
        batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::Sender<Confirmation>,
    ) -> Self {
        let now = Instant::now();
        let c = &sink.config;
        let bytes_per_sec = c.max_bytes_per_sec.get() as f64;
        Self {
            publishes: TokenBucket::new(c.max_publishes_per_sec.get() as f64, 1.0, now),
            // A tenth of a second of burst: a whole batch may go at once, paid for afterwards.
            bytes: TokenBucket::new(bytes_per_sec, bytes_per_sec / 10.0, now),
            backoff: Backoff::new(
                Duration::from_millis(c.reconnect_min_ms.get()),
                Duration::from_millis(c.reconnect_max_ms.get()),
            ),
            window: DeliveryWindow::new(c.max_batch_attempts.get() as u32),
            sink,
            batches,
            confirmations,
            last_connect: None,
            outage: None,
            announced_up: false,
        }
    }

    async fn run(mut self) {
        tracing::info!(
            host = %self.sink.config.host,
            port = self.sink.config.port.get(),
            client_id = %self.sink.client_id,
            topic = %self.sink.topic,
            "Upstream link starting."
        );
        loop {
            if let Some(last) = self.last_connect {
                let spacing =
                    (last + MIN_CONNECT_SPACING).saturating_duration_since(Instant::now());
                if !spacing.is_zero() && !self.wait_accepting_batches(spacing).await {
                    return;
                }
            }
            self.last_connect = Some(Instant::now());
            let started = Instant::now();
            let ended = self.connection().await;
            metrics::gauge!(telemetry::UPSTREAM_CONNECTED).set(0.0);
            telemetry::PROGRESS.upstream.store(
                telemetry::UPSTREAM_DOWN,
                std::sync::atomic::Ordering::Relaxed,
            );
            let (cause, refused) = match ended {
                Ended::Shutdown => return,
                Ended::Failed(cause, refused) => (cause, refused),
            };
            for poison in self.window.connection_ended(refused, &cause) {
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
                    return;
                }
            }
            let class = cause_class(&cause);
            metrics::counter!(telemetry::UPSTREAM_ERRORS, "cause" => class).increment(1);
            if started.elapsed() >= HEALTHY_AFTER {
                // A long healthy spell ends any outage: the next failure is news.
                self.backoff.reset();
                self.outage = None;
            }
            let delay = self.backoff.next_delay();
            // One WARN per change of cause; a flapping link or a broker that keeps refusing
            // stays at debug until it delivers again.
            if self.outage != Some(class) {
                tracing::warn!(
                    cause = %cause,
                    held_batches = self.window.len(),
                    retry_in_ms = delay.as_millis() as u64,
                    "Upstream link down."
                );
                self.outage = Some(class);
                self.announced_up = false;
            } else {
                tracing::debug!(cause = %cause, retry_in_ms = delay.as_millis() as u64, "Upstream still down.");
            }
            if !self.wait_accepting_batches(delay).await {
                return;
            }
        }
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

    /// One connection, from CONNECT to failure (or shutdown).
    async fn connection(&mut self) -> Ended {
        let config = &self.sink.config;
        let mut link = Link::new(
            config,
            &self.sink.client_id,
            self.sink.tls.clone(),
            config.max_inflight.get() as u16,
        );
        metrics::counter!(telemetry::UPSTREAM_CONNECTS).increment(1);
        let ack_timeout = Duration::from_millis(config.ack_timeout_ms.get());
        let max_inflight = config.max_inflight.get() as usize;
        let mut ids = PacketIds::default();
        let mut connected = false;
        // Watchdog reference: the last PUBACK, or when the first outstanding publish went out.
        let mut progress = Instant::now();
        loop {
            let outstanding = ids.outstanding() > 0;
            let now = Instant::now();
            let send_at = now + self.publishes.wait(now).max(self.bytes.wait(now));
            let can_send =
                connected && ids.outstanding() < max_inflight && self.window.next().is_some();
            tokio::select! {
                event = link.poll() => match event {
                    Ok(LinkEvent::Connected) => {
                        connected = true;
                        progress = Instant::now();
                        metrics::gauge!(telemetry::UPSTREAM_CONNECTED).set(1.0);
                        telemetry::PROGRESS
                            .upstream
                            .store(telemetry::UPSTREAM_UP, std::sync::atomic::Ordering::Relaxed);
                        if !self.announced_up {
                            tracing::info!(
                                host = %self.sink.config.host,
                                resending = self.window.len(),
                                "Upstream connected."
                            );
                            self.announced_up = true;
                        }
                    }
                    Ok(LinkEvent::Sent(pkid)) => {
                        if let Err(cause) = ids.sent(pkid) {
                            return Ended::Failed(cause, None);
                        }
                    }
                    Ok(LinkEvent::Acked(pkid)) => {
                        if let Some(seq) = ids.answered(pkid)
                            && self.window.acknowledged(seq)
                        {
                            if self.confirmations.send(Confirmation::delivered(seq)).await.is_err() {
                                return Ended::Shutdown;
                            }
                            metrics::counter!(telemetry::UPSTREAM_ACKS).increment(1);
                            self.backoff.reset();
                            self.outage = None;
                            progress = Instant::now();
                        }
                    }
                    Ok(LinkEvent::Refused(pkid, reason)) => {
                        // Quota exceeded is throttling, not this batch's fault: back off only.
                        let refused = ids.answered(pkid).filter(|_| !reason.starts_with("QuotaExceeded"));
                        return Ended::Failed(
                            format!(
                                "broker refused a publish ({reason}); check the IoT policy allows iot:Publish on {}",
                                self.sink.topic
                            ),
                            refused,
                        );
                    }
                    Ok(LinkEvent::Other) => {}
                    Err(cause) => return Ended::Failed(cause, None),
                },
                batch = self.batches.recv() => match batch {
                    Some(batch) => self.window.hold(batch),
                    None => return Ended::Shutdown,
                },
                _ = tokio::time::sleep_until(send_at), if can_send => {
                    let Some(batch) = self.window.next() else { continue };
                    let seq = batch.batch_seq;
                    let size = batch.payload.len() + self.sink.topic.len();
                    if let Err(e) = link.publish(&self.sink.topic, batch.payload.clone()) {
                        return Ended::Failed(format!("link failure: {e}"), None);
                    }
                    self.window.sent(seq);
                    ids.requested(seq);
                    let now = Instant::now();
                    self.publishes.take(1.0, now);
                    self.bytes.take(size as f64, now);
                    if !outstanding {
                        progress = now;
                    }
                    metrics::counter!(telemetry::UPSTREAM_PUBLISHES).increment(1);
                    metrics::counter!(telemetry::UPSTREAM_BYTES).increment(size as u64);
                    metrics::counter!(telemetry::BILLING_UNITS).increment(size.div_ceil(BILLING_UNIT) as u64);
                }
                _ = tokio::time::sleep_until(progress + ack_timeout), if connected && outstanding => {
                    return Ended::Failed(format!(
                        "watchdog: no PUBACK for {} ms with {} batches outstanding",
                        ack_timeout.as_millis(),
                        ids.outstanding()
                    ), None);
                }
            }
        }
    }
}

/// A bounded label for a failure cause.
fn cause_class(cause: &str) -> &'static str {
    const CLASSES: [(&str, &str); 10] = [
        ("server certificate", "server_certificate"),
        ("client certificate", "client_certificate"),
        ("cannot resolve", "dns"),
        ("cannot reach", "unreachable"),
        ("broker refused the connection", "connect_refused"),
        ("broker refused a publish", "publish_refused"),
        ("watchdog", "watchdog"),
        ("proxy", "proxy"),
        ("TLS", "tls"),
        ("connection closed", "closed"),
    ];
    CLASSES
        .iter()
        .find(|(needle, _)| cause.contains(needle))
        .map_or("other", |(_, class)| class)
}

#[cfg(test)]
mod tests {
    use super::PacketIds;

    #[test]
    fn packet_ids_pair_in_request_order() {
        let mut ids = PacketIds::default();
        ids.requested(10);
        ids.requested(11);
        ids.sent(1).unwrap();
        ids.sent(2).unwrap();
        assert_eq!(ids.answered(2), Some(11));
        assert_eq!(ids.answered(1), Some(10));
        assert_eq!(ids.answered(1), None, "an id answers once");
        assert_eq!(ids.outstanding(), 0);
    }

    #[test]
    fn a_packet_id_reused_while_in_flight_fails_instead_of_guessing() {
        let mut ids = PacketIds::default();
        ids.requested(10);
        ids.requested(11);
        ids.sent(1).unwrap();
        // rumqttc reporting id 1 again before its PUBACK would pair it with batch 11: the
        // next PUBACK for 1 could then confirm 11, which the broker never acknowledged.
        let err = ids.sent(1).unwrap_err();
        assert!(err.contains("packet id 1 reused"), "{err}");
    }

    #[test]
    fn a_packet_id_with_no_publish_requested_fails() {
        let mut ids = PacketIds::default();
        assert!(ids.sent(7).is_err());
    }
}
