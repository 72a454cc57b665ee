//! The `mqtt` sink: every batch goes to the cloud over ONE MQTT connection with mutual TLS, paced
//! to AWS IoT Core's per-connection limits, surviving outages.
//!
//! Guarantees:
//! - A batch is confirmed (and its journal rows released) only on the broker's PUBACK for the
//!   packet that carried it; `AsyncClient::publish` returning is not an acknowledgement. Packet
//!   ids are paired with batches strictly (`PacketIds`): should rumqttc ever report a packet id
//!   still mapped to an unacknowledged batch, the link is failed and every batch resent, rather
//!   than risk confirming the wrong one.
//! - Everything else (resend after every reconnect, poison batches, pacing to `maxInflight`,
//!   `maxPublishesPerSec` and `maxBytesPerSec`, backoff with CONNECTs at least a second apart,
//!   the watchdog, outage logs) is the delivery engine's (`sink::delivery`); this module is its
//!   `Transport`: one rumqttc link per connection. A link's failures are described in terms an
//!   operator can act on (`link.rs`, `tls.rs`).

mod link;
mod tls;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use self::link::{Link, LinkEvent};
use super::delivery::{self, Engine, Event, Failure, Transport};
use super::{Batch, Confirmation, Sink, SinkFuture};
use crate::config::MqttUpstream;

/// IoT Core allows about one CONNECT per second per client id.
const MIN_CONNECT_SPACING: Duration = Duration::from_secs(1);
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
        super::billing_aligned(MAX_PAYLOAD, self.topic.len())
    }

    fn run(
        self: Box<Self>,
        batches: mpsc::Receiver<Batch>,
        confirmations: mpsc::Sender<Confirmation>,
    ) -> SinkFuture {
        let c = &self.config;
        let settings = delivery::Settings {
            describe: format!(
                "MQTT to {}:{} as client {} on topic {}",
                c.host,
                c.port.get(),
                self.client_id,
                self.topic
            ),
            max_inflight: c.max_inflight.get() as usize,
            publishes_per_sec: c.max_publishes_per_sec.get() as f64,
            bytes_per_sec: c.max_bytes_per_sec.get() as f64,
            backoff_min: Duration::from_millis(c.reconnect_min_ms.get()),
            backoff_max: Duration::from_millis(c.reconnect_max_ms.get()),
            min_connect_spacing: MIN_CONNECT_SPACING,
            ack_timeout: Duration::from_millis(c.ack_timeout_ms.get()),
            max_batch_attempts: c.max_batch_attempts.get() as u32,
        };
        let transport = MqttTransport {
            sink: *self,
            link: None,
            ids: PacketIds::default(),
        };
        Box::pin(Engine::new(transport, settings, batches, confirmations).run())
    }
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

/// The delivery engine's transport: a new rumqttc link per connection, so rumqttc never
/// retransmits on its own and every resend is the engine's (same batch, same bytes).
struct MqttTransport {
    sink: MqttSink,
    link: Option<Link>,
    ids: PacketIds,
}

impl Transport for MqttTransport {
    async fn connect(&mut self) -> Result<(), Failure> {
        let config = &self.sink.config;
        self.ids = PacketIds::default();
        let link = self.link.insert(Link::new(
            config,
            &self.sink.client_id,
            self.sink.tls.clone(),
            config.max_inflight.get() as u16,
        ));
        loop {
            match link.poll().await {
                Ok(LinkEvent::Connected) => return Ok(()),
                Ok(_) => {}
                Err(cause) => return Err(Failure::link(cause)),
            }
        }
    }

    fn publish(&mut self, batch: &Batch) -> Result<(), Failure> {
        let link = self
            .link
            .as_ref()
            .ok_or_else(|| Failure::link("link failure: not connected"))?;
        link.publish(&self.sink.topic, batch.payload.clone())
            .map_err(|e| Failure::link(format!("link failure: {e}")))?;
        self.ids.requested(batch.batch_seq);
        Ok(())
    }

    async fn next(&mut self) -> Result<Event, Failure> {
        let Some(link) = self.link.as_mut() else {
            return std::future::pending().await;
        };
        match link.poll().await {
            Ok(LinkEvent::Sent(pkid)) => self
                .ids
                .sent(pkid)
                .map(|()| Event::Nothing)
                .map_err(Failure::link),
            Ok(LinkEvent::Acked(pkid)) => Ok(self
                .ids
                .answered(pkid)
                .map_or(Event::Nothing, Event::Acknowledged)),
            Ok(LinkEvent::Refused(pkid, reason)) => {
                // Quota exceeded is throttling, not this batch's fault: back off only.
                let throttled = reason.starts_with("QuotaExceeded");
                let refused = self.ids.answered(pkid).filter(|_| !throttled);
                Err(Failure {
                    cause: format!(
                        "broker refused a publish ({reason}); check the IoT policy allows iot:Publish on {}",
                        self.sink.topic
                    ),
                    refused,
                    transient: throttled,
                })
            }
            Ok(LinkEvent::Connected | LinkEvent::Other) => Ok(Event::Nothing),
            Err(cause) => Err(Failure::link(cause)),
        }
    }

    fn in_flight(&self) -> usize {
        self.ids.outstanding()
    }

    fn metered_size(&self, batch: &Batch) -> usize {
        batch.payload.len() + self.sink.topic.len()
    }

    fn cause_class(&self, cause: &str) -> &'static str {
        cause_class(cause)
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
