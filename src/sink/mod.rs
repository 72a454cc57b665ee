//! The upstream seam: where sealed batches go, and how their delivery is confirmed.
//!
//! A `Sink` receives batches in `batch_seq` order on a channel and reports each one it delivered
//! on the confirmation channel, possibly later and out of order. The journal releases a batch's
//! rows only on that confirmation. A batch a sink never confirms stays in the journal and is sent
//! again (same `batch_seq`, same bytes) after a reconnect or a restart: delivery is at least once,
//! and the cloud deduplicates by (gateway, batch_seq).
//!
//! Implementations: `directory` (each batch one file; the embedded default) and `mqtt` (one
//! MQTT/TLS link to AWS IoT Core). The Greengrass IPC sink plugs in here too.

mod directory;
mod mqtt;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::{Config, UpstreamConfig};
pub use directory::DirectorySink;
pub use mqtt::MqttSink;

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

/// A sink confirmed the batch with this sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    pub batch_seq: u64,
}

pub type SinkFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An upstream destination.
pub trait Sink: Send + 'static {
    /// The name batches are recorded under in the journal (`batches.sink`). Changing it orphans
    /// that sink's unconfirmed batches, so it is fixed per kind.
    fn name(&self) -> &'static str;

    /// How many batches may be handed over and not yet confirmed.
    fn max_inflight(&self) -> usize;

    /// Delivers batches until `batches` closes, then returns after finishing (or giving up on)
    /// what it holds. Each delivered batch is reported once on `confirmations`.
    fn run(
        self: Box<Self>,
        batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::UnboundedSender<Confirmation>,
    ) -> SinkFuture;
}

/// Builds the configured sink, validating what can only be checked at run time (directories,
/// certificates and keys).
pub fn build(config: &Config) -> anyhow::Result<Box<dyn Sink>> {
    match &config.upstream {
        UpstreamConfig::Directory { path, max_inflight } => Ok(Box::new(DirectorySink::new(
            path.clone(),
            max_inflight.get() as usize,
        )?)),
        UpstreamConfig::Mqtt(mqtt) => Ok(Box::new(MqttSink::new(
            (**mqtt).clone(),
            &config.thing_name,
        )?)),
    }
}
