//! The upstream seam: where sealed batches go, and how their delivery is confirmed.
//!
//! A `Sink` receives batches in `batch_seq` order on a channel and reports each one it settled
//! on the confirmation channel, possibly later and out of order: delivered (the journal then
//! releases its rows) or, for a batch the upstream will never take, dead-lettered with a reason
//! (its rows move to `dead_letter`). A batch a sink never settles stays in the journal and is
//! sent again (same `batch_seq`, same bytes) after a reconnect or a restart: delivery is at
//! least once, and the cloud deduplicates by (gateway, batch_seq).
//!
//! Implementations: `directory` (each batch one file; the embedded default), `mqtt` (one
//! MQTT/TLS link to AWS IoT Core) and `greengrass` (PublishToIoTCore through the nucleus). The
//! networked ones run the same `delivery` engine over their own transport; `window` is its
//! bookkeeping: which held batch goes next, and which one is poison.

pub mod delivery;
mod directory;
mod greengrass;
mod mqtt;
pub mod pacing;
pub mod window;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::{Config, UpstreamConfig};
use crate::greengrass::ipc::IpcClient;
pub use directory::DirectorySink;
pub use greengrass::{GreengrassSink, payload_budget};
pub use mqtt::MqttSink;

/// AWS IoT Core meters a publish in 5 KB units of payload plus topic.
pub const BILLING_UNIT: usize = 5 * 1024;

/// The largest payload of at most `limit` bytes whose publish on a topic of `topic_len` bytes
/// fills whole billing units: a batch a few bytes past a unit boundary would pay a whole unit
/// for them (7,296 bytes through nucleus lite cost 2 units, 5,087 cost 1).
pub fn billing_aligned(limit: usize, topic_len: usize) -> usize {
    match (limit + topic_len) / BILLING_UNIT {
        0 => limit,
        units => units * BILLING_UNIT - topic_len,
    }
}

/// A sealed batch on its way upstream.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Stable across retries and restarts.
    pub batch_seq: u64,
    pub record_count: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The envelope bytes (see docs/ENVELOPE.md).
    pub payload: Bytes,
}

/// A sink settled the batch with this sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    pub batch_seq: u64,
    pub outcome: Outcome,
}

/// How a batch was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The far side acknowledged it.
    Delivered,
    /// The upstream refused it (or dropped the connection) every time; it goes to `dead_letter`
    /// with this reason.
    DeadLettered(String),
}

impl Confirmation {
    pub fn delivered(batch_seq: u64) -> Self {
        Self {
            batch_seq,
            outcome: Outcome::Delivered,
        }
    }
}

pub type SinkFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An upstream destination.
pub trait Sink: Send + 'static {
    /// The name batches are recorded under in the journal (`batches.sink`). Changing it orphans
    /// that sink's unconfirmed batches, so it is fixed per kind.
    fn name(&self) -> &'static str;

    /// How many batches may be handed over and not yet confirmed.
    fn max_inflight(&self) -> usize;

    /// The largest batch payload the far side takes, in bytes. A stored batch larger than this
    /// (sealed for another sink) is re-batched before it is handed over.
    fn max_payload(&self) -> usize;

    /// Delivers batches until `batches` closes, then returns after finishing (or giving up on)
    /// what it holds. Each settled batch is reported once on `confirmations`, which has room
    /// for `max_inflight` (a sink never holds more).
    fn run(
        self: Box<Self>,
        batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::Sender<Confirmation>,
    ) -> SinkFuture;
}

/// Builds the configured sink, validating what can only be checked at run time (directories,
/// certificates and keys). The `greengrass` upstream needs the nucleus's IPC connection.
pub fn build(config: &Config, nucleus: Option<&IpcClient>) -> anyhow::Result<Box<dyn Sink>> {
    match &config.upstream {
        UpstreamConfig::Directory { path, max_inflight } => Ok(Box::new(DirectorySink::new(
            path.clone(),
            max_inflight.get() as usize,
        )?)),
        UpstreamConfig::Mqtt(mqtt) => Ok(Box::new(MqttSink::new(
            (**mqtt).clone(),
            &config.thing_name,
        )?)),
        UpstreamConfig::Greengrass(gg) => match nucleus {
            Some(client) => Ok(Box::new(GreengrassSink::new(
                (**gg).clone(),
                client.clone(),
                &config.thing_name,
            ))),
            None => anyhow::bail!(
                "upstream.kind: \"greengrass\" needs the Greengrass nucleus, and this process was not started by one ({} and {} are not set)",
                crate::greengrass::TOKEN_VAR,
                crate::greengrass::SOCKET_VAR
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_budgets_fill_whole_billing_units() {
        let topic = "gatehouse/gw-1/batches".len();
        assert_eq!(billing_aligned(131_072, topic) + topic, 25 * BILLING_UNIT);
        assert_eq!(billing_aligned(7_296, topic) + topic, BILLING_UNIT);
        assert_eq!(
            billing_aligned(3_000, topic),
            3_000,
            "under one unit: as it is"
        );
    }
}
