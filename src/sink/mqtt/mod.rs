//! The `mqtt` sink: every batch goes to the cloud over ONE MQTT connection with mutual TLS, paced
//! to AWS IoT Core's per-connection limits, surviving outages.
//!
//! Guarantees:
//! - A batch is confirmed (and its journal rows released) only on the broker's PUBACK for the
//!   packet that carried it; `AsyncClient::publish` returning is not an acknowledgement.
//! - Unconfirmed batches are re-sent after every reconnect, in order, with their original bytes
//!   and `batchSeq`: the cloud sees duplicates only as whole batches with a repeated `batchSeq`.
//! - At most `maxInflight` batches are unacknowledged; publishes are paced to
//!   `maxPublishesPerSec` and `maxBytesPerSec`; CONNECTs are at least one second apart and
//!   follow an exponential backoff with jitter.
//! - A watchdog rebuilds a link that is connected but not acknowledging (outstanding batches
//!   and no PUBACK for `ackTimeoutMs`).
//! - Failures are logged once per change of cause, in terms an operator can act on.

mod link;
mod pacing;
mod tls;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use self::link::{Link, LinkEvent};
use self::pacing::{Backoff, TokenBucket};
use super::{Batch, Confirmation, Sink, SinkFuture};
use crate::config::MqttUpstream;
use crate::telemetry;

/// IoT Core allows about one CONNECT per second per client id.
const MIN_CONNECT_SPACING: Duration = Duration::from_secs(1);
/// A link up this long without failing has earned a fresh backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// IoT Core meters messages in 5 KB units (payload plus topic).
const BILLING_UNIT: usize = 5 * 1024;

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

    fn run(
        self: Box<Self>,
        batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::UnboundedSender<Confirmation>,
    ) -> SinkFuture {
        Box::pin(Runner::new(*self, batches, confirmations).run())
    }
}

/// Why a connection ended.
enum Ended {
    /// The batch channel closed: the gateway is shutting down.
    Shutdown,
    /// The link failed; the cause, for the operator.
    Failed(String),
}

struct Runner {
    sink: MqttSink,
    batches: mpsc::Receiver<Batch>,
    confirmations: mpsc::UnboundedSender<Confirmation>,
    /// Batches received and not yet acknowledged, by `batch_seq`; re-sent on every connection.
    held: BTreeMap<u64, Batch>,
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
        confirmations: mpsc::UnboundedSender<Confirmation>,
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
            sink,
            batches,
            confirmations,
            held: BTreeMap::new(),
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
            let cause = match ended {
                Ended::Shutdown => return,
                Ended::Failed(cause) => cause,
            };
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
                    cause = ?cause,
                    held_batches = self.held.len(),
                    retry_in_ms = delay.as_millis() as u64,
                    "Upstream link down."
                );
                self.outage = Some(class);
                self.announced_up = false;
            } else {
                tracing::debug!(cause = ?cause, retry_in_ms = delay.as_millis() as u64, "Upstream still down.");
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
                    Some(batch) => {
                        self.held.insert(batch.batch_seq, batch);
                    }
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
        // Every held batch goes again, oldest first.
        let mut to_send: VecDeque<u64> = self.held.keys().copied().collect();
        // Publishes requested, awaiting their packet id (`Sent`), in request order.
        let mut requested: VecDeque<u64> = VecDeque::new();
        let mut by_pkid: HashMap<u16, u64> = HashMap::new();
        let mut connected = false;
        // Watchdog reference: the last PUBACK, or when the first outstanding publish went out.
        let mut progress = Instant::now();
        loop {
            let outstanding = !requested.is_empty() || !by_pkid.is_empty();
            let now = Instant::now();
            let send_at = now + self.publishes.wait(now).max(self.bytes.wait(now));
            let can_send = connected && !to_send.is_empty();
            tokio::select! {
                event = link.poll() => match event {
                    Ok(LinkEvent::Connected) => {
                        connected = true;
                        progress = Instant::now();
                        metrics::gauge!(telemetry::UPSTREAM_CONNECTED).set(1.0);
                        if !self.announced_up {
                            tracing::info!(
                                host = %self.sink.config.host,
                                resending = to_send.len(),
                                "Upstream connected."
                            );
                            self.announced_up = true;
                        }
                    }
                    Ok(LinkEvent::Sent(pkid)) => {
                        if let Some(seq) = requested.pop_front() {
                            by_pkid.insert(pkid, seq);
                        }
                    }
                    Ok(LinkEvent::Acked(pkid)) => {
                        if let Some(seq) = by_pkid.remove(&pkid) {
                            self.held.remove(&seq);
                            let _ = self.confirmations.send(Confirmation { batch_seq: seq });
                            metrics::counter!(telemetry::UPSTREAM_ACKS).increment(1);
                            self.backoff.reset();
                            self.outage = None;
                            progress = Instant::now();
                        }
                    }
                    Ok(LinkEvent::Refused(_, reason)) => {
                        return Ended::Failed(format!(
                            "broker refused a publish ({reason}); check the IoT policy allows iot:Publish on {}",
                            self.sink.topic
                        ));
                    }
                    Ok(LinkEvent::Other) => {}
                    Err(cause) => return Ended::Failed(cause),
                },
                batch = self.batches.recv() => match batch {
                    Some(batch) => {
                        to_send.push_back(batch.batch_seq);
                        self.held.insert(batch.batch_seq, batch);
                    }
                    None => return Ended::Shutdown,
                },
                _ = tokio::time::sleep_until(send_at), if can_send => {
                    let seq = to_send.pop_front().expect("can_send");
                    let Some(batch) = self.held.get(&seq) else { continue };
                    if let Err(e) = link.publish(&self.sink.topic, batch.payload.clone()) {
                        return Ended::Failed(format!("link failure: {e}"));
                    }
                    let now = Instant::now();
                    let size = batch.payload.len() + self.sink.topic.len();
                    self.publishes.take(1.0, now);
                    self.bytes.take(size as f64, now);
                    if !outstanding {
                        progress = now;
                    }
                    requested.push_back(seq);
                    metrics::counter!(telemetry::UPSTREAM_PUBLISHES).increment(1);
                    metrics::counter!(telemetry::UPSTREAM_BYTES).increment(size as u64);
                    metrics::counter!(telemetry::BILLING_UNITS).increment(size.div_ceil(BILLING_UNIT) as u64);
                }
                _ = tokio::time::sleep_until(progress + ack_timeout), if connected && outstanding => {
                    return Ended::Failed(format!(
                        "watchdog: no PUBACK for {} ms with {} batches outstanding",
                        ack_timeout.as_millis(),
                        requested.len() + by_pkid.len()
                    ));
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
