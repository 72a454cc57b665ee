//! The `greengrass` sink: every batch goes to AWS IoT Core with PublishToIoTCore, over the
//! nucleus's own IPC connection and IoT Core connection, so the gateway needs no FQDN of its own.
//! The delivery engine (`sink::delivery`) paces, retries and dead-letters; this module is its
//! `Transport`.
//!
//! Guarantees:
//! - No frame exceeds the nucleus's cap: the sink's payload budget (`max_payload`) is computed
//!   from the exact size of the PublishToIoTCore frame that carries it (base64 inside JSON), and
//!   the client refuses anything larger before sending.
//! - `confirm: "nucleus"`: a batch is acknowledged when PublishToIoTCore succeeds (the Java
//!   nucleus has it in its spooler then, nucleus lite has IoT Core's PUBACK).
//! - `confirm: "cloud"`: the batch goes to `<topic>/<batchSeq>`, and is acknowledged only when the
//!   cloud's receipt for that batch seq arrives on `receiptTopic` (SubscribeToIoTCore); one not
//!   receipted within `receiptTimeoutMs` of its publish is sent again.
//! - Refusals are sorted: UnauthorizedError names the missing `aws.greengrass.ipc.mqttproxy`
//!   policy and the topic; a full spool, throttling or being offline is transient (back off,
//!   nothing is anyone's fault); anything else counts against the batch (poison detection).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::delivery::{self, Engine, Event, Failure, Transport};
use super::{Batch, Confirmation, Sink, SinkFuture};
use crate::config::{Confirm, GreengrassUpstream};
use crate::greengrass::ipc::{IpcClient, IpcError, Subscription};

/// The Java nucleus's PublishToIoTCore payload cap (`maxMessageSizeInBytes`) and IoT Core's.
const MAX_IOT_PAYLOAD: usize = 131_072;

pub struct GreengrassSink {
    config: GreengrassUpstream,
    client: IpcClient,
    topic: String,
    receipt_topic: String,
    max_payload: usize,
}

impl GreengrassSink {
    /// A sink publishing through `client`; its payload budget follows from the client's frame cap.
    pub fn new(config: GreengrassUpstream, client: IpcClient, thing_name: &str) -> Self {
        let topic = config.topic_for(thing_name);
        let longest_topic = match config.confirm {
            Confirm::Cloud => format!("{topic}/{}", u64::MAX),
            Confirm::Nucleus => topic.clone(),
        };
        let max_payload = super::billing_aligned(
            payload_budget(&longest_topic, client.max_frame()).min(MAX_IOT_PAYLOAD),
            longest_topic.len(),
        );
        Self {
            receipt_topic: config.receipt_topic_for(thing_name),
            config,
            client,
            topic,
            max_payload,
        }
    }
}

/// The PublishToIoTCore request for `payload` on `topic`.
fn publish_request(topic: &str, payload: &[u8]) -> Value {
    json!({
        "topicName": topic,
        "qos": "1",
        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
    })
}

/// The largest raw payload whose PublishToIoTCore frame on `topic` fits in `max_frame` bytes.
pub fn payload_budget(topic: &str, max_frame: usize) -> usize {
    let frame_len = |payload_len: usize| {
        let request = publish_request(topic, &vec![0u8; payload_len]);
        let body = serde_json::to_vec(&request).expect("json");
        crate::greengrass::ipc::frame::encoded_len(&IpcClient::request_frame(
            "PublishToIoTCore",
            body.into(),
        ))
    };
    let empty = frame_len(0);
    if empty >= max_frame {
        return 0;
    }
    // Base64 turns every 3 bytes into 4; start there and step down to the exact fit.
    let mut n = (max_frame - empty) / 4 * 3;
    while n > 0 && frame_len(n) > max_frame {
        n -= 1;
    }
    n
}

impl Sink for GreengrassSink {
    fn name(&self) -> &'static str {
        "greengrass"
    }

    fn max_inflight(&self) -> usize {
        self.config.max_inflight.get() as usize
    }

    fn max_payload(&self) -> usize {
        self.max_payload
    }

    fn run(
        self: Box<Self>,
        batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::Sender<Confirmation>,
    ) -> SinkFuture {
        let c = &self.config;
        let receipt_timeout = Duration::from_millis(c.receipt_timeout_ms.get());
        let ack_timeout = Duration::from_millis(c.ack_timeout_ms.get());
        let settings = delivery::Settings {
            describe: format!(
                "PublishToIoTCore through the Greengrass nucleus on topic {}{}, confirmed by {}, payloads of {} bytes at most",
                self.topic,
                if c.confirm == Confirm::Cloud {
                    "/<batchSeq>"
                } else {
                    ""
                },
                match c.confirm {
                    Confirm::Nucleus => "the nucleus".to_string(),
                    Confirm::Cloud => format!("cloud receipts on {}", self.receipt_topic),
                },
                self.max_payload
            ),
            max_inflight: c.max_inflight.get() as usize,
            publishes_per_sec: c.max_publishes_per_sec.get() as f64,
            bytes_per_sec: c.max_bytes_per_sec.get() as f64,
            backoff_min: Duration::from_millis(c.retry_min_ms.get()),
            backoff_max: Duration::from_millis(c.retry_max_ms.get()),
            min_connect_spacing: Duration::ZERO,
            // Receipts take their own time; the per-batch receipt timeout resends before this.
            ack_timeout: match c.confirm {
                Confirm::Nucleus => ack_timeout,
                Confirm::Cloud => ack_timeout.max(receipt_timeout * 2),
            },
            max_batch_attempts: c.max_batch_attempts.get() as u32,
        };
        let transport = IpcTransport {
            confirm: c.confirm,
            receipt_timeout,
            client: self.client.clone(),
            topic: self.topic.clone(),
            receipt_topic: self.receipt_topic.clone(),
            receipts: None,
            requests: JoinSet::new(),
            generation: 0,
            current_requests: 0,
            awaiting: HashMap::new(),
            receipted_early: HashSet::new(),
        };
        Box::pin(Engine::new(transport, settings, batches, confirmations).run())
    }
}

struct IpcTransport {
    confirm: Confirm,
    receipt_timeout: Duration,
    client: IpcClient,
    topic: String,
    receipt_topic: String,
    /// The receipt subscription (`confirm: "cloud"`), opened at the first connect.
    receipts: Option<Subscription>,
    /// PublishToIoTCore requests in flight, each answering with its connection generation
    /// and batch seq.
    requests: JoinSet<(u64, u64, Result<Value, IpcError>)>,
    /// Bumped at every connect: answers to requests of an earlier one are stale.
    generation: u64,
    /// Requests of the current generation not yet answered.
    current_requests: usize,
    /// Published batches awaiting their receipt, and when to give up waiting.
    awaiting: HashMap<u64, Instant>,
    /// Receipts that came before the nucleus's answer (bounded by `EARLY_RECEIPTS`).
    receipted_early: HashSet<u64>,
}

/// Early receipts remembered at most (a receipt normally follows the nucleus's answer).
const EARLY_RECEIPTS: usize = 4096;

impl IpcTransport {
    fn topic_for(&self, batch_seq: u64) -> String {
        match self.confirm {
            Confirm::Cloud => format!("{}/{batch_seq}", self.topic),
            Confirm::Nucleus => self.topic.clone(),
        }
    }

    /// What a PublishToIoTCore answer means.
    fn answered(
        &mut self,
        batch_seq: u64,
        result: Result<Value, IpcError>,
    ) -> Result<Event, Failure> {
        match result {
            Ok(_) => match self.confirm {
                Confirm::Nucleus => Ok(Event::Acknowledged(batch_seq)),
                Confirm::Cloud => {
                    if !self.receipted_early.remove(&batch_seq) {
                        self.awaiting
                            .insert(batch_seq, Instant::now() + self.receipt_timeout);
                    }
                    Ok(Event::Nothing)
                }
            },
            Err(e) => Err(self.refusal(batch_seq, &e)),
        }
    }

    /// A refused or failed publish, in the operator's terms, with whose fault it is.
    fn refusal(&self, batch_seq: u64, error: &IpcError) -> Failure {
        let topic = self.topic_for(batch_seq);
        let text = error.to_string();
        let transient = |cause: String| Failure {
            cause,
            refused: None,
            transient: true,
        };
        match error {
            IpcError::Service { code, .. } if code == "UnauthorizedError" => Failure {
                cause: format!(
                    "PublishToIoTCore refused ({text}): the component's accessControl needs an aws.greengrass.ipc.mqttproxy policy allowing aws.greengrass#PublishToIoTCore on {topic}"
                ),
                refused: Some(batch_seq),
                transient: false,
            },
            IpcError::Service { message, .. }
                if [
                    "spool is full",
                    "offline",
                    "throttl",
                    "Throttl",
                    "operation timed out",
                ]
                .iter()
                .any(|m| message.contains(m)) =>
            {
                transient(format!("PublishToIoTCore deferred by the nucleus ({text})"))
            }
            IpcError::Timeout { .. } => transient(format!("PublishToIoTCore unanswered ({text})")),
            IpcError::Closed(_) | IpcError::Unreachable { .. } | IpcError::AccessDenied(_) => {
                Failure::link(format!("Greengrass IPC lost: {text}"))
            }
            _ => Failure {
                cause: format!("PublishToIoTCore failed ({text})"),
                refused: Some(batch_seq),
                transient: false,
            },
        }
    }
}

impl Transport for IpcTransport {
    async fn connect(&mut self) -> Result<(), Failure> {
        // What was in flight before is being sent again by the engine: start afresh.
        self.generation += 1;
        self.current_requests = 0;
        self.awaiting.clear();
        self.receipted_early.clear();
        if self.confirm == Confirm::Cloud && self.receipts.is_none() {
            let request = json!({"topicName": self.receipt_topic, "qos": "1"});
            match self.client.subscribe("SubscribeToIoTCore", &request).await {
                Ok((_, subscription)) => self.receipts = Some(subscription),
                Err(e) => {
                    let hint = if e.service_code() == Some("UnauthorizedError") {
                        format!(
                            "; the component's accessControl needs an aws.greengrass.ipc.mqttproxy policy allowing aws.greengrass#SubscribeToIoTCore on {}",
                            self.receipt_topic
                        )
                    } else {
                        String::new()
                    };
                    return Err(Failure::link(format!(
                        "cannot subscribe to the receipts on {} ({e}){hint}",
                        self.receipt_topic
                    )));
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self, batch: &Batch) -> Result<(), Failure> {
        let request = publish_request(&self.topic_for(batch.batch_seq), &batch.payload);
        let client = self.client.clone();
        let batch_seq = batch.batch_seq;
        let generation = self.generation;
        self.awaiting.remove(&batch_seq);
        self.current_requests += 1;
        self.requests.spawn(async move {
            let result = client.request("PublishToIoTCore", &request).await;
            (generation, batch_seq, result)
        });
        Ok(())
    }

    async fn next(&mut self) -> Result<Event, Failure> {
        let next_deadline = self
            .awaiting
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(s, at)| (*s, *at));
        let until =
            next_deadline.map_or_else(|| Instant::now() + Duration::from_secs(3600), |(_, at)| at);
        tokio::select! {
                        Some(joined) = self.requests.join_next(), if !self.requests.is_empty() => match joined {
                Ok((generation, batch_seq, result)) if generation == self.generation => {
                    self.current_requests -= 1;
                    self.answered(batch_seq, result)
                }
                // A request of an earlier connection: its success still delivered the batch
                // (the engine ignores it if it was settled since); its failure is old news.
                Ok((_, batch_seq, Ok(_))) if self.confirm == Confirm::Nucleus => {
                    Ok(Event::Acknowledged(batch_seq))
                }
                Ok(_) => Ok(Event::Nothing),
                Err(e) => Err(Failure::link(format!("PublishToIoTCore task failed: {e}"))),
            },
            receipt = next_receipt(&mut self.receipts) => match receipt {
                Some(Ok(event)) => Ok(match receipt_seq(&event) {
                                        Some(batch_seq) => {
                        if self.awaiting.remove(&batch_seq).is_none()
                            && self.receipted_early.len() < EARLY_RECEIPTS
                        {
                            self.receipted_early.insert(batch_seq);
                        }
                        Event::Acknowledged(batch_seq)
                    }
                    None => {
                        tracing::warn!(receipt = %event, "Ignoring a receipt without a batchSeq.");
                        Event::Nothing
                    }
                }),
                Some(Err(e)) => {
                    self.receipts = None;
                    Err(Failure::link(format!("the receipt subscription failed: {e}")))
                }
                None => {
                    self.receipts = None;
                    Err(Failure::link("the receipt subscription ended"))
                }
            },
            _ = tokio::time::sleep_until(until), if next_deadline.is_some() => {
                let (batch_seq, _) = next_deadline.expect("guarded");
                self.awaiting.remove(&batch_seq);
                tracing::debug!(batch_seq, "No receipt in time; sending the batch again.");
                Ok(Event::Retry(batch_seq))
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.current_requests + self.awaiting.len()
    }

    fn metered_size(&self, batch: &Batch) -> usize {
        batch.payload.len() + self.topic_for(batch.batch_seq).len()
    }

    fn cause_class(&self, cause: &str) -> &'static str {
        const CLASSES: [(&str, &str); 5] = [
            ("accessControl", "unauthorized"),
            ("deferred", "deferred"),
            ("unanswered", "timeout"),
            ("IPC lost", "ipc_lost"),
            ("receipt", "receipts"),
        ];
        CLASSES
            .iter()
            .find(|(needle, _)| cause.contains(needle))
            .map_or("other", |(_, class)| class)
    }
}

/// The next receipt event, or never when there is no receipt subscription.
async fn next_receipt(receipts: &mut Option<Subscription>) -> Option<Result<Value, IpcError>> {
    match receipts {
        Some(subscription) => subscription.next().await,
        None => std::future::pending().await,
    }
}

/// The batch seq an `IoTCoreMessage` receipt names: its payload is `{"batchSeq": N, ...}`.
fn receipt_seq(event: &Value) -> Option<u64> {
    let payload = event["message"]["payload"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .ok()?;
    let receipt: Value = serde_json::from_slice(&bytes).ok()?;
    receipt["batchSeq"]
        .as_u64()
        .or_else(|| receipt["batchSeq"].as_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_budget_fills_the_frame_exactly() {
        let topic = "gatehouse/gw-1/batches/18446744073709551615";
        for cap in [2_048usize, 10_000, 131_072] {
            let n = payload_budget(topic, cap);
            let frame = |len: usize| {
                let body = serde_json::to_vec(&publish_request(topic, &vec![7u8; len])).unwrap();
                IpcClient::request_frame("PublishToIoTCore", body.into())
                    .encode()
                    .unwrap()
                    .len()
            };
            assert!(
                frame(n) <= cap,
                "budget {n} gives a {} byte frame",
                frame(n)
            );
            assert!(
                frame(n + 1) > cap || frame(n + 3) > cap,
                "budget {n} leaves room"
            );
        }
        // Nucleus lite: about 7 KB of raw payload.
        let lite = payload_budget("gatehouse/gw-1/batches", 10_000);
        assert!((7_000..7_400).contains(&lite), "{lite}");
    }

    #[test]
    fn a_receipt_names_its_batch() {
        let payload = base64::engine::general_purpose::STANDARD.encode(br#"{"batchSeq": 42}"#);
        let event = json!({"message": {"topicName": "gatehouse/gw/receipts", "payload": payload}});
        assert_eq!(receipt_seq(&event), Some(42));
    }
}
