//! One MQTT connection to the broker, over rumqttc, for either protocol version, reduced to
//! what the sink needs: connect, publish QoS 1, and the events that correlate PUBACKs.
//!
//! A `Link` is used for one connection only: after any error it is dropped and a new one built,
//! so rumqttc never retransmits on its own and every resend is the sink's decision (same batch,
//! same bytes). Correlation: rumqttc assigns packet ids in the order publishes are requested and
//! reports each as `Outgoing::Publish(pkid)` when written; the sink pairs them FIFO.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::tls;
use crate::config::{MqttUpstream, MqttVersion};

/// What happened on the link.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// CONNACK accepted.
    Connected,
    /// A requested publish was written with this packet id.
    Sent(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
    /// MQTT 5: the broker refused this packet id (reason code and string).
    Refused(u16, String),
    /// Anything else (pings, ...).
    Other,
}

/// The publishing half of one rumqttc connection.
enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The driving half of one rumqttc connection: its event loop.
enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Largest PUBLISH the link writes: a full batch plus topic and header room.
const MAX_PACKET: usize = 131_072 + 1024;

/// Prepares a connection (nothing happens on the network until its event loop is polled).
fn connection(
    config: &MqttUpstream,
    client_id: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    max_inflight: u16,
) -> (Client, EventLoop) {
    let host = config.host.clone();
    let port = config.port.get() as u16;
    let keep_alive = Duration::from_secs(config.keep_alive_secs.get());
    let transport = rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls));
    let proxy = config.proxy.as_ref().and_then(|p| {
        let (addr, port) = p.host_port().ok()?;
        let auth = match (&p.username, &p.password) {
            (Some(username), password) => rumqttc::ProxyAuth::Basic {
                username: username.clone(),
                password: password.clone().unwrap_or_default(),
            },
            _ => rumqttc::ProxyAuth::None,
        };
        Some((addr, port, auth))
    });
    // Requests queue: the window plus room, so `try_publish` never finds it full.
    let capacity = max_inflight as usize + 16;
    match config.protocol {
        MqttVersion::V311 => {
            let mut options = rumqttc::MqttOptions::new(client_id, host, port);
            options
                .set_transport(transport)
                .set_keep_alive(keep_alive)
                .set_clean_session(true)
                .set_inflight(max_inflight)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET);
            if let Some((addr, port, auth)) = proxy {
                options.set_proxy(rumqttc::Proxy {
                    ty: rumqttc::ProxyType::Http,
                    auth,
                    addr,
                    port,
                });
            }
            let (client, mut events) = rumqttc::AsyncClient::new(options, capacity);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_connection_timeout(10);
            events.set_network_options(network);
            (Client::V311(client), EventLoop::V311(Box::new(events)))
        }
        MqttVersion::V5 => {
            let mut options = rumqttc::v5::MqttOptions::new(client_id, host, port);
            options
                .set_transport(transport)
                .set_keep_alive(keep_alive)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(max_inflight)
                .set_max_packet_size(Some(MAX_PACKET as u32))
                .set_connection_timeout(10);
            if let Some((addr, port, auth)) = proxy {
                options.set_proxy(rumqttc::v5::Proxy {
                    ty: rumqttc::v5::ProxyType::Http,
                    auth: match auth {
                        rumqttc::ProxyAuth::None => rumqttc::v5::ProxyAuth::None,
                        rumqttc::ProxyAuth::Basic { username, password } => {
                            rumqttc::v5::ProxyAuth::Basic { username, password }
                        }
                    },
                    addr,
                    port,
                });
            }
            let (client, events) = rumqttc::v5::AsyncClient::new(options, capacity);
            (Client::V5(client), EventLoop::V5(Box::new(events)))
        }
    }
}

impl Client {
    /// Requests a QoS 1 publish; it is written (and reported as `Sent`) by `poll`.
    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), String> {
        match self {
            Client::V311(client) => client
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .map_err(|e| e.to_string()),
            Client::V5(client) => client
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .map_err(|e| e.to_string()),
        }
    }
}

impl EventLoop {
    /// Drives the connection; returns its next event, or the failure that ended it, described
    /// for an operator. Not cancel-safe (rumqttc's event loop is not): only the driver task
    /// calls it.
    async fn poll(&mut self) -> Result<LinkEvent, String> {
        match self {
            EventLoop::V311(events) => {
                use rumqttc::{Event, Outgoing, Packet};
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(LinkEvent::Connected),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => Ok(LinkEvent::Acked(ack.pkid)),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(LinkEvent::Sent(pkid)),
                    Ok(_) => Ok(LinkEvent::Other),
                    Err(e) => Err(describe_v4(&e)),
                }
            }
            EventLoop::V5(events) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(LinkEvent::Connected),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => match ack.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                            Ok(LinkEvent::Acked(ack.pkid))
                        }
                        reason => Ok(LinkEvent::Refused(
                            ack.pkid,
                            format!(
                                "{reason:?}{}",
                                ack.properties
                                    .and_then(|p| p.reason_string)
                                    .map(|s| format!(": {s}"))
                                    .unwrap_or_default()
                            ),
                        )),
                    },
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(LinkEvent::Sent(pkid)),
                    Ok(_) => Ok(LinkEvent::Other),
                    Err(e) => Err(describe_v5(&e)),
                }
            }
        }
    }
}

/// Events the driver task may have ready before the sink takes them.
const EVENT_QUEUE: usize = 64;

/// A connection driven by its own task: rumqttc's event loop runs to completion of each step
/// whatever the sink is doing, and the sink reads its events from a channel (cancel-safe).
pub struct Link {
    client: Client,
    events: mpsc::Receiver<Result<LinkEvent, String>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Prepares a connection and starts driving it.
    pub fn new(
        config: &MqttUpstream,
        client_id: &str,
        tls: std::sync::Arc<rustls::ClientConfig>,
        max_inflight: u16,
    ) -> Self {
        let (client, mut event_loop) = connection(config, client_id, tls, max_inflight);
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        let driver = tokio::spawn(async move {
            loop {
                let event = event_loop.poll().await;
                let ended = event.is_err();
                if tx.send(event).await.is_err() || ended {
                    return;
                }
            }
        });
        Link {
            client,
            events,
            driver,
        }
    }

    /// Requests a QoS 1 publish; it is written (and reported as `Sent`) by the driver.
    pub fn publish(&self, topic: &str, payload: Bytes) -> Result<(), String> {
        self.client.publish(topic, payload)
    }

    /// The next event, or the failure that ended the connection. Cancel-safe.
    pub async fn poll(&mut self) -> Result<LinkEvent, String> {
        self.events
            .recv()
            .await
            .unwrap_or_else(|| Err("link failure: the connection's driver stopped".into()))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Classifies I/O failures shared by both versions.
fn describe_io(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let text = e.to_string();
    if text.contains("lookup address") || text.contains("Name or service not known") {
        return format!("cannot resolve host: {text}");
    }
    match e.kind() {
        ErrorKind::ConnectionRefused
        | ErrorKind::TimedOut
        | ErrorKind::HostUnreachable
        | ErrorKind::NetworkUnreachable
        | ErrorKind::AddrNotAvailable => format!("cannot reach broker: {text}"),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::UnexpectedEof => {
            format!("connection closed by broker: {text}")
        }
        _ => format!("link I/O failure: {text}"),
    }
}

fn describe_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(tls) = crate::tls::rustls_error(e) {
        return Some(tls::describe(tls));
    }
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(describe_io(io));
        }
        current = err.source();
    }
    None
}

fn describe_v4(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => format!("broker refused the connection: {code:?}"),
        E::NetworkTimeout => "cannot reach broker: connection timed out".to_string(),
        E::Proxy(p) => describe_proxy(&p.to_string()),
        other => describe_error(other).unwrap_or_else(|| format!("link failure: {other}")),
    }
}

/// Names the common proxy failures; the proxy's own text otherwise.
fn describe_proxy(text: &str) -> String {
    if text.contains("407") {
        "proxy refused our credentials (HTTP 407); check upstream.proxy.username and password"
            .to_string()
    } else if text.contains("Socket connect") {
        format!("proxy unreachable; check upstream.proxy.url ({text})")
    } else {
        format!("proxy: {text}")
    }
}

fn describe_v5(e: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => format!("broker refused the connection: {code:?}"),
        E::Timeout(_) => "cannot reach broker: connection timed out".to_string(),
        E::Proxy(p) => describe_proxy(&p.to_string()),
        other => describe_error(other).unwrap_or_else(|| format!("link failure: {other}")),
    }
}
