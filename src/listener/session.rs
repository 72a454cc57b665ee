//! One agent connection: CONNECT, then PUBLISH/acknowledge until it ends.
//!
//! Guarantees:
//! - A QoS 1 PUBACK (QoS 2 PUBREC) is written only after the journal committed the message;
//!   acknowledgements go out in the order the PUBLISHes came in.
//! - At most `maxInflight` messages await their commit; beyond that the socket is not read, so
//!   TCP and MQTT flow control hold the agent back. Memory per connection is bounded.
//! - A bad packet closes only this connection (MQTT 5: with the DISCONNECT reason code). Before
//!   closing, messages already received are committed and acknowledged where possible.
//! - A QoS 2 message is journaled once per packet id until its PUBREL.
//! - The Will is journaled when the connection ends without a DISCONNECT (or with reason 0x04).
//! - Every write to the agent makes progress within `writeTimeoutMs`, or the agent is
//!   disconnected; closing takes at most `CLOSE_GRACE`, whatever the agent does. Messages it
//!   sent and did not get acknowledged are its own to send again.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::acl::{Access, Subject};
use super::codec::{
    self, AckReason, ConnAckCode, ConnectError, ConnectRequest, DisconnectReason, InPublish,
    Inbound, Outbound, Protocol, ReadError, SubResult,
};
use super::registry::{Delivery, Registry, SessionState, Takeover};
use super::{DeviceGrant, Settings};
use crate::config::{AuthKind, OnDenied};
use crate::journal::{Appended, Journal, JournalError};
use crate::record::{JournaledRecord, Record, now_ms};
use crate::shutdown::Shutdown;
use crate::sink::pacing::TokenBucket;
use crate::telemetry;

/// Outbound QoS 1 deliveries unacknowledged at once, at most (or the agent's Receive Maximum).
const OUTBOUND_WINDOW: usize = 32;
/// How long closing waits for pending commits so their acknowledgements can still be sent.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// While closing, how long a write to the agent may make no progress (an agent that stopped
/// reading gets no longer than this, whatever `writeTimeoutMs` says).
const CLOSE_WRITE_GRACE: Duration = Duration::from_secs(1);

type CommitReceiver = oneshot::Receiver<Result<Appended, JournalError>>;

/// A message received and not yet acknowledged.
struct PendingAck {
    pkid: u16,
    qos: u8,
    commit: Commit,
}

/// What a pending acknowledgement waits for.
enum Commit {
    /// The journal's answer.
    Waiting(CommitReceiver),
    /// Nothing: a QoS 2 re-send of a message already journaled and PUBRECed.
    AlreadyJournaled,
    /// Nothing: refused at ingest, with this answer (given in order with the others).
    Refused(AckReason),
    /// Nothing: a denied MQTT 3.1.1 message under `onDenied311: ignore`, acknowledged and
    /// not stored.
    Discarded,
}

/// What became of a message, as its acknowledgement tells the agent.
enum Outcome {
    Stored,
    Failed(JournalError),
    Refused(AckReason),
    Discarded,
}

impl From<Result<Appended, JournalError>> for Outcome {
    fn from(result: Result<Appended, JournalError>) -> Self {
        match result {
            Ok(_) => Outcome::Stored,
            Err(e) => Outcome::Failed(e),
        }
    }
}

/// An agent let in: who it is, and client device auth's grant (Greengrass).
struct Admitted {
    identity: String,
    device: Option<Box<dyn DeviceGrant>>,
}

/// How a connection ended, which decides the Will and the log line.
#[derive(Debug)]
enum Close {
    /// The agent sent DISCONNECT; `with_will` for MQTT 5 reason 0x04.
    Normal { with_will: bool },
    /// The socket closed or failed without DISCONNECT.
    Dropped(String),
    /// The agent stopped reading: a write made no progress within `writeTimeoutMs`.
    Stalled(String),
    /// The gateway closed it for a reason the agent is told (MQTT 5).
    Refused(DisconnectReason, String),
    /// A newer connection with the same client id.
    TakenOver(Takeover),
    /// The gateway is shutting down.
    Shutdown,
}

/// Spawns the task that serves one accepted TCP connection to its end: the TLS handshake (on a
/// TLS listener), then MQTT. `slot` (a `maxConnections` permit) is held until it ends. Never
/// panics on network input.
///
/// The task is `serve_mqtt` or `serve_tls` itself, not an async fn around them: every layer of
/// async fn keeps its arguments (and their moved copies) for the whole session, which is what
/// an idle agent costs.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    sessions: &mut JoinSet<()>,
    stream: TcpStream,
    peer: SocketAddr,
    settings: Arc<Settings>,
    journal: Journal,
    registry: Arc<Registry>,
    shutdown: Shutdown,
    slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    match settings.tls.clone() {
        None => sessions.spawn(serve_mqtt(
            stream, None, peer, settings, journal, registry, shutdown, slot,
        )),
        Some(tls) => sessions.spawn(serve_tls(
            stream, tls, peer, settings, journal, registry, shutdown, slot,
        )),
    };
}

#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    stream: TcpStream,
    tls: Arc<super::tls::ServerTls>,
    peer: SocketAddr,
    settings: Arc<Settings>,
    journal: Journal,
    registry: Arc<Registry>,
    shutdown: Shutdown,
    slot: OwnedSemaphorePermit,
) {
    let Some(config) = tls.config() else {
        refused_handshake(
            peer,
            "no server certificate yet (waiting for client device auth)",
        );
        return;
    };
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(stream)) => {
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cert.clone().into_owned());
            serve_mqtt(
                stream, cert, peer, settings, journal, registry, shutdown, slot,
            )
            .await
        }
        Ok(Err(e)) => refused_handshake(peer, &super::tls::describe_handshake_error(&e)),
        Err(_) => refused_handshake(
            peer,
            &format!(
                "no TLS handshake within {} ms (tls.handshakeTimeoutMs)",
                settings.handshake_timeout.as_millis()
            ),
        ),
    }
}

/// Size of the per-thread buffer sockets are read into.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Reads what the socket has into `buf`, through a per-thread scratch buffer: a connection
/// waiting for its agent holds no read buffer of its own (`buf` stays empty between packets;
/// only a partial packet is kept). Cancel-safe: bytes are copied only once read.
async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut read = tokio::io::ReadBuf::new(&mut scratch[..]);
            match std::pin::Pin::new(&mut *reader).poll_read(cx, &mut read) {
                std::task::Poll::Ready(Ok(())) => {
                    let filled = read.filled();
                    buf.extend_from_slice(filled);
                    std::task::Poll::Ready(Ok(filled.len()))
                }
                std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        })
    })
    .await
}

/// Whether the ACL and, under Greengrass, client device auth both allow `access` to `topic`.
async fn permitted(
    settings: &Settings,
    subject: &Subject<'_>,
    device: Option<&dyn DeviceGrant>,
    access: Access,
    topic: &str,
) -> bool {
    settings.acl.allows(subject, access, topic)
        && match device {
            Some(grant) => grant.allows(access, topic).await,
            None => true,
        }
}

/// Frees an emptied buffer's memory, so an idle connection holds none.
/// (An empty buffer may have no capacity left and still hold its allocation: what remains after
/// `split_to` took every byte shares it.)
fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
}

fn refused_handshake(peer: SocketAddr, why: &str) {
    metrics::counter!(telemetry::REFUSALS, "reason" => "tls_handshake").increment(1);
    static LOG: telemetry::Throttle = telemetry::Throttle::new(1_000);
    if let Some(held_back) = LOG.ready() {
        tracing::warn!(%peer, %why, similar_not_logged = held_back, "Refused a TLS connection.");
    }
}

/// Serves MQTT on an established stream; `cert` is the agent's verified client certificate.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve_mqtt<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    cert: Option<CertificateDer<'static>>,
    peer: SocketAddr,
    settings: Arc<Settings>,
    journal: Journal,
    registry: Arc<Registry>,
    shutdown: Shutdown,
    _slot: OwnedSemaphorePermit,
) {
    // One stream, not split halves: reads and writes never wait at the same time (the event
    // loop flushes, then waits to read), and a split costs a shared allocation per agent.
    let mut conn = Connection {
        stream,
        read_buf: BytesMut::new(),
        write_buf: BytesMut::new(),
        protocol: Protocol::V311,
        settings,
        journal,
    };
    // The one-off phases (here and in `run_session`) are boxed: a future holds room for its
    // largest state, and an idle connection should not carry the CONNECT's or admission's.
    // Boxed, so that the task keeps no room for it once it is dropped.
    let mut request = match Box::pin(conn.read_connect()).await {
        Ok(request) => Box::new(request),
        Err(why) => {
            tracing::debug!(%peer, reason = %why, "Connection closed before session start.");
            return;
        }
    };
    conn.protocol = request.protocol;
    let admitted = Box::pin(conn.admit(&mut request, cert.as_ref())).await;
    // The certificate was needed only to admit the agent: not held for the session.
    drop(cert);
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err((code, why)) => {
            static LOG: telemetry::Throttle = telemetry::Throttle::new(1_000);
            if let Some(held_back) = LOG.ready() {
                tracing::warn!(
                    %peer,
                    client_id = %request.client_id,
                    %why,
                    similar_not_logged = held_back,
                    "Refused an agent's CONNECT."
                );
            }
            Box::pin(conn.refuse_connect(code)).await;
            return;
        }
    };
    let span = tracing::info_span!("agent", client_id = %request.client_id, %peer);
    conn.run_session(request, admitted, peer, &registry, shutdown)
        .instrument(span)
        .await;
}

struct Connection<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
    protocol: Protocol,
    settings: Arc<Settings>,
    journal: Journal,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Connection<S> {
    fn max_packet(&self) -> usize {
        self.settings.max_packet_size
    }

    fn send(&mut self, packet: Outbound) {
        codec::write(self.protocol, &packet, &mut self.write_buf);
    }

    /// Writes what is buffered. Each write must make progress within `writeTimeoutMs`: an agent
    /// that stops reading cannot hold its session (and the gateway's shutdown) forever.
    /// Cancel-safe: bytes not yet written stay buffered.
    async fn flush(&mut self) -> std::io::Result<()> {
        self.flush_by(None).await
    }

    /// `flush`, giving up at `deadline` as well, and after `CLOSE_WRITE_GRACE` without
    /// progress (closing).
    async fn flush_by(&mut self, deadline: Option<Instant>) -> std::io::Result<()> {
        let timeout = match deadline {
            Some(_) => self.settings.write_timeout.min(CLOSE_WRITE_GRACE),
            None => self.settings.write_timeout,
        };
        while !self.write_buf.is_empty() {
            let limit = deadline.map_or(Instant::now() + timeout, |d| {
                d.min(Instant::now() + timeout)
            });
            match tokio::time::timeout_at(limit, self.stream.write_buf(&mut self.write_buf)).await {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    metrics::counter!(telemetry::WRITE_TIMEOUTS).increment(1);
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the agent read nothing for {} ms (writeTimeoutMs)",
                            timeout.as_millis()
                        ),
                    ));
                }
            }
        }
        release_if_empty(&mut self.write_buf);
        Ok(())
    }

    /// Reads the CONNECT within the deadline and answers refusals; returns an accepted request
    /// (with the client id assigned when it was empty).
    async fn read_connect(&mut self) -> Result<ConnectRequest, String> {
        let deadline = Instant::now() + self.settings.connect_timeout;
        let result = loop {
            let max_packet = self.max_packet();
            match codec::read_connect(&mut self.read_buf, max_packet) {
                Ok(Some(request)) => break Ok(request),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            match tokio::time::timeout_at(deadline, read_some(&mut self.stream, &mut self.read_buf))
                .await
            {
                Err(_) => {
                    metrics::counter!(telemetry::REFUSALS, "reason" => "connect_timeout")
                        .increment(1);
                    return Err("no CONNECT within connectTimeoutMs".into());
                }
                Ok(Ok(0)) => return Err("closed".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
            }
        };
        let refuse = |code, reason: String| (code, reason);
        let (protocol, code, reason) = match result {
            Ok(request) => {
                if request.client_id.is_empty() {
                    if !request.clean_start {
                        self.protocol = request.protocol;
                        metrics::counter!(telemetry::REFUSALS, "reason" => "empty_client_id")
                            .increment(1);
                        let (code, reason) = refuse(
                            ConnAckCode::ClientIdRejected,
                            "empty client id with a persistent session".to_string(),
                        );
                        (request.protocol, code, reason)
                    } else {
                        // Assigned in `admit`, once the agent's identity is known.
                        return Ok(request);
                    }
                } else {
                    return Ok(request);
                }
            }
            Err(ConnectError::UnsupportedProtocol { name, level }) => (
                Protocol::V311,
                ConnAckCode::UnsupportedProtocol,
                format!("unsupported protocol {name:?} level {level}"),
            ),
            Err(ConnectError::Malformed(protocol, why)) => (
                protocol,
                ConnAckCode::Malformed,
                format!("malformed CONNECT: {why}"),
            ),
            Err(e) => {
                metrics::counter!(telemetry::REFUSALS, "reason" => "bad_connect").increment(1);
                return Err(e.to_string());
            }
        };
        metrics::counter!(telemetry::REFUSALS, "reason" => "bad_connect").increment(1);
        self.protocol = protocol;
        self.refuse_connect(code).await;
        Err(reason)
    }

    /// Answers a refused CONNECT and closes.
    async fn refuse_connect(&mut self, code: ConnAckCode) {
        // MQTT 3.1.1 has no "malformed" CONNACK: just close.
        if !(self.protocol == Protocol::V311 && code == ConnAckCode::Malformed) {
            self.send(Outbound::ConnAck {
                session_present: false,
                code,
                assigned_client_id: None,
                max_packet_size: self.max_packet() as u32,
                receive_maximum: self.settings.max_inflight as u16,
            });
            let _ = self
                .flush_by(Some(Instant::now() + CLOSE_WRITE_GRACE))
                .await;
        }
        let _ = tokio::time::timeout(CLOSE_WRITE_GRACE, self.stream.shutdown()).await;
    }

    /// Authenticates the agent and applies the client-id binding: returns who it is, or the
    /// CONNACK refusal and why. Assigns a client id when the agent sent none (its identity
    /// under binding, else a random one).
    async fn admit(
        &mut self,
        request: &mut ConnectRequest,
        cert: Option<&CertificateDer<'static>>,
    ) -> Result<Admitted, (ConnAckCode, String)> {
        let mut device = None;
        let settings = self.settings.clone();
        let refuse = |code, reason: &str, why: String| {
            metrics::counter!(telemetry::REFUSALS, "reason" => reason.to_string()).increment(1);
            Err((code, why))
        };
        let identity = match (settings.auth, cert) {
            (AuthKind::None, _) => None,
            (AuthKind::Certificate, Some(cert)) => {
                match super::identity::from_certificate(cert, settings.identity_from) {
                    Ok(identity) => Some(identity),
                    Err(why) => return refuse(ConnAckCode::NotAuthorized, "no_identity", why),
                }
            }
            (AuthKind::Certificate | AuthKind::Password, _) => {
                let (Some(user), Some(password)) = (&request.username, request.password.take())
                else {
                    return refuse(
                        ConnAckCode::BadCredentials,
                        "bad_credentials",
                        "no client certificate and no username and password".into(),
                    );
                };
                let Some(passwords) = &settings.passwords else {
                    return refuse(
                        ConnAckCode::BadCredentials,
                        "bad_credentials",
                        "this listener takes no passwords".into(),
                    );
                };
                if !super::identity::check_password(passwords, user, password).await {
                    return refuse(
                        ConnAckCode::BadCredentials,
                        "bad_credentials",
                        format!("wrong username or password for user {user:?}"),
                    );
                }
                Some(user.clone())
            }
            (AuthKind::Greengrass, cert) => {
                let Some(devices) = &settings.devices else {
                    return refuse(
                        ConnAckCode::ServerUnavailable,
                        "device_auth_unavailable",
                        "client device auth is not available".into(),
                    );
                };
                let Some(cert) = cert else {
                    return refuse(
                        ConnAckCode::NotAuthorized,
                        "no_identity",
                        "no client certificate".into(),
                    );
                };
                // Client device auth names a device by its client id (the thing name): there is
                // nothing to assign one from.
                if request.client_id.is_empty() {
                    return refuse(
                        ConnAckCode::ClientIdRejected,
                        "empty_client_id",
                        "an empty client id under client device auth".into(),
                    );
                }
                match devices.admit(&request.client_id, cert).await {
                    Ok(grant) => {
                        device = Some(grant);
                        Some(request.client_id.clone())
                    }
                    Err(super::DeviceRefusal::Denied(why)) => {
                        return refuse(ConnAckCode::NotAuthorized, "device_auth_denied", why);
                    }
                    Err(super::DeviceRefusal::Unavailable(why)) => {
                        return refuse(
                            ConnAckCode::ServerUnavailable,
                            "device_auth_unavailable",
                            why,
                        );
                    }
                }
            }
        };
        request.password = None;
        if request.client_id.is_empty() {
            request.client_id = match (&identity, settings.client_id_binding) {
                (Some(identity), true) => identity.clone(),
                _ => format!("gatehouse-{:016x}", rand_id()),
            };
            request.client_id_was_assigned = true;
        }
        let identity = identity.unwrap_or_else(|| request.client_id.clone());
        if settings.client_id_binding && request.client_id != identity {
            return refuse(
                ConnAckCode::ClientIdRejected,
                "client_id_mismatch",
                format!(
                    "client id {:?} is not the agent's identity {identity:?} (clientIdBinding)",
                    request.client_id
                ),
            );
        }
        if let Some(will) = &request.will {
            let subject = Subject {
                client_id: &request.client_id,
                identity: &identity,
                thing_name: &settings.thing_name,
            };
            if let Err(why) = settings.check_topic(&will.topic) {
                return refuse(
                    ConnAckCode::NotAuthorized,
                    "topic_limit",
                    format!("Will {why}"),
                );
            }
            let device = device.as_deref();
            if !permitted(&settings, &subject, device, Access::Publish, &will.topic).await {
                return refuse(
                    ConnAckCode::NotAuthorized,
                    "acl_publish",
                    format!("a Will on {:?} is not allowed", will.topic),
                );
            }
        }
        Ok(Admitted { identity, device })
    }

    /// The session from CONNACK to its end. Its arguments are small or boxed: an async fn's
    /// arguments stay in its future for the whole session, next to their moved copies.
    async fn run_session(
        &mut self,
        mut request: Box<ConnectRequest>,
        admitted: Admitted,
        peer: SocketAddr,
        registry: &Registry,
        mut shutdown: Shutdown,
    ) {
        let client_id = request.client_id.clone();
        let (protocol, clean_start, session_expiry_secs) = (
            request.protocol,
            request.clean_start,
            request.session_expiry_secs,
        );
        let (mut registration, state) = Box::pin(registry.register(&client_id, clean_start)).await;
        metrics::counter!(telemetry::CONNECTIONS_TOTAL).increment(1);
        metrics::gauge!(telemetry::CONNECTIONS).increment(1.0);
        telemetry::PROGRESS
            .agents_connected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(
            protocol = %request.protocol,
            clean_start = request.clean_start,
            keep_alive = request.keep_alive_secs,
            username = request.username.as_deref().unwrap_or(""),
            "Agent connected."
        );
        self.send(Outbound::ConnAck {
            session_present: registration.session_present,
            code: ConnAckCode::Accepted,
            assigned_client_id: request.client_id_assigned(),
            max_packet_size: self.max_packet() as u32,
            receive_maximum: self.settings.max_inflight.min(u16::MAX as usize) as u16,
        });

        let mut session = Session {
            client_id: client_id.clone(),
            identity: admitted.identity,
            device: admitted.device,
            publish_rate: TokenBucket::new(
                self.settings.publishes_per_sec,
                self.settings.publish_burst,
                Instant::now(),
            ),
            state,
            pending: VecDeque::new(),
            will: request.will.take().map(Box::new),
            outbound: HashMap::new(),
            next_pkid: 1,
            max_packet_out: request.max_packet_size.map_or(usize::MAX, |m| m as usize),
            window: request
                .receive_maximum
                .map_or(OUTBOUND_WINDOW, |m| (m as usize).min(OUTBOUND_WINDOW))
                .max(1),
        };
        let keep_alive = match request.keep_alive_secs {
            0 => None,
            secs => Some(Duration::from_millis(secs as u64 * 1500)),
        };
        // Only what the end of the session needs is kept across it.
        drop(request);
        let close = self
            .event_loop(&mut session, &mut registration, keep_alive, &mut shutdown)
            .await;
        let close = Box::pin(self.finish(&mut session, close)).await;
        // A new connection that took the session over while this one was closing still gets
        // the session: it waits for it (`TAKEOVER_WAIT`).
        let close = match close {
            Close::TakenOver(handover) => Close::TakenOver(handover),
            other => match registration.takeover.try_recv() {
                Ok(handover) => Close::TakenOver(handover),
                Err(_) => other,
            },
        };

        // The Will: journaled on any end but a normal DISCONNECT or our own shutdown.
        let will_due = match &close {
            Close::Normal { with_will } => *with_will,
            Close::Shutdown => false,
            Close::Dropped(_) | Close::Stalled(_) | Close::Refused(..) | Close::TakenOver(_) => {
                true
            }
        };
        let will = session.will.take().filter(|_| will_due);
        // Unacknowledged deliveries go back to the session for the next connection.
        let mut state = std::mem::take(&mut session.state);
        let mut unacked: Vec<_> = session.outbound.drain().collect();
        unacked.sort_by_key(|(pkid, _)| *pkid);
        for (_, delivery) in unacked.into_iter().rev() {
            state.undelivered.push_front(delivery);
        }
        while let Some(delivery) = registration.deliveries.try_recv() {
            state.undelivered.push_back(delivery);
        }
        match &close {
            Close::Normal { with_will } => {
                tracing::debug!(will_published = *with_will, "Agent disconnected.")
            }
            Close::Shutdown => {
                tracing::debug!("Agent disconnected: the gateway is shutting down.")
            }
            Close::TakenOver(_) => tracing::info!("Session taken over by a new connection."),
            Close::Dropped(why) => tracing::debug!(reason = %why, "Agent connection dropped."),
            Close::Stalled(why) => {
                static LOG: telemetry::Throttle = telemetry::Throttle::new(1_000);
                metrics::counter!(telemetry::DISCONNECTS, "reason" => "write_timeout").increment(1);
                if let Some(held_back) = LOG.ready() {
                    tracing::warn!(
                        %peer,
                        why = %why,
                        similar_not_logged = held_back,
                        "Disconnected an agent that stopped reading; it resends what was not acknowledged."
                    );
                }
            }
            Close::Refused(DisconnectReason::QuotaExceeded, why) => {
                // The journal logs "full" at a bounded rate; a line per agent would flood.
                metrics::counter!(telemetry::DISCONNECTS, "reason" => "QuotaExceeded").increment(1);
                tracing::debug!(why = %why, "Disconnected agent: journal full.");
            }
            Close::Refused(reason, why) => {
                static LOG: telemetry::Throttle = telemetry::Throttle::new(1_000);
                metrics::counter!(telemetry::DISCONNECTS, "reason" => format!("{reason:?}"))
                    .increment(1);
                if let Some(held_back) = LOG.ready() {
                    tracing::warn!(
                        %peer,
                        %reason,
                        why = %why,
                        similar_not_logged = held_back,
                        "Disconnected an agent."
                    );
                }
            }
        }
        if let Close::TakenOver(handover) = close {
            let _ = handover.send(state);
        } else {
            // 3.1.1: clean session 0 keeps the session. MQTT 5: a non-zero Session Expiry
            // Interval does, whatever Clean Start said (absent means it ends with the connection).
            let keep = match protocol {
                Protocol::V311 => !clean_start,
                Protocol::V5 => session_expiry_secs.is_some_and(|secs| secs > 0),
            };
            let lifetime = registry.session_lifetime(session_expiry_secs);
            registry.unregister(
                &client_id,
                registration.conn_id,
                keep.then_some((state, lifetime)),
            );
        }
        if let Some(will) = will {
            Box::pin(self.journal_will(&session.identity, *will)).await;
        }
        metrics::gauge!(telemetry::CONNECTIONS).decrement(1.0);
        telemetry::PROGRESS
            .agents_connected
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn event_loop(
        &mut self,
        session: &mut Session,
        registration: &mut super::registry::Registration,
        keep_alive: Option<Duration>,
        shutdown: &mut Shutdown,
    ) -> Close {
        // Resend what a previous connection left undelivered.
        while session.outbound.len() < session.window
            && let Some(delivery) = session.state.undelivered.pop_front()
        {
            session.send_delivery(self, delivery);
        }
        // Packets that came in the same read as the CONNECT.
        if let Some(close) = self.handle_buffered(session).await {
            return close;
        }
        let mut last_heard = Instant::now();
        loop {
            let flushed = tokio::select! {
                result = self.flush() => result,
                _ = shutdown.wait() => return Close::Shutdown,
            };
            match flushed {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Close::Stalled(e.to_string());
                }
                Err(e) => return Close::Dropped(e.to_string()),
            }
            let throttled = session.publish_rate.wait(Instant::now());
            let can_read =
                session.pending.len() < self.settings.max_inflight && throttled.is_zero();
            let can_deliver = session.outbound.len() < session.window;
            let expires = keep_alive.map(|ka| last_heard + ka);
            // One timer for both (a future keeps room for every branch of a select): the
            // keep-alive deadline, or sooner the end of a publish-rate wait.
            let now = Instant::now();
            let wake = match (throttled.is_zero(), expires) {
                (true, expires) => expires,
                (false, Some(expires)) => Some(expires.min(now + throttled)),
                (false, None) => Some(now + throttled),
            };
            enum Event {
                Committed(Outcome),
                Read(std::io::Result<usize>),
                Deliver(Delivery),
                Takeover(Takeover),
                Timer,
                Shutdown,
            }
            let event = tokio::select! {
                biased;
                result = next_commit(&mut session.pending), if !session.pending.is_empty() => Event::Committed(result),
                _ = shutdown.wait() => Event::Shutdown,
                Ok(handover) = &mut registration.takeover => Event::Takeover(handover),
                result = read_some(&mut self.stream, &mut self.read_buf), if can_read => Event::Read(result),
                delivery = registration.deliveries.recv(), if can_deliver => Event::Deliver(delivery),
                _ = sleep_until_opt(wake) => Event::Timer,
            };
            match event {
                Event::Committed(result) => {
                    let pending = session.pending.pop_front().expect("pending is not empty");
                    if let Some(close) = session.acknowledge(self, pending, result) {
                        return close;
                    }
                    // A group commit resolves many at once: acknowledge every one already
                    // resolved, so they leave in one write.
                    while let Some(result) = session.pending.front_mut().and_then(ready_commit) {
                        let pending = session.pending.pop_front().expect("front exists");
                        if let Some(close) = session.acknowledge(self, pending, result) {
                            return close;
                        }
                    }
                }
                Event::Read(Ok(0)) => return Close::Dropped("connection closed by peer".into()),
                Event::Read(Err(e)) => return Close::Dropped(e.to_string()),
                Event::Read(Ok(_)) => {
                    last_heard = Instant::now();
                    if let Some(close) = self.handle_buffered(session).await {
                        return close;
                    }
                }
                Event::Deliver(delivery) => session.send_delivery(self, delivery),
                Event::Takeover(handover) => return Close::TakenOver(handover),
                Event::Timer if expires.is_some_and(|at| at <= Instant::now()) => {
                    return Close::Refused(
                        DisconnectReason::KeepAliveTimeout,
                        "nothing heard within 1.5 x keep-alive".into(),
                    );
                }
                // Over its publish rate: read again now that it is back under it.
                Event::Timer => {
                    metrics::counter!(telemetry::THROTTLED, "what" => "publishes").increment(1);
                }
                Event::Shutdown => return Close::Shutdown,
            }
        }
    }

    /// Handles every whole packet in the read buffer, keeping a partial one for the next read.
    async fn handle_buffered(&mut self, session: &mut Session) -> Option<Close> {
        loop {
            let max_packet = self.max_packet();
            let packet = match codec::read(self.protocol, &mut self.read_buf, max_packet) {
                Ok(Some(packet)) => packet,
                Ok(None) => break,
                Err(e) => return Some(refused_for(&e)),
            };
            if let Some(close) = Box::pin(session.handle(self, packet)).await {
                return Some(close);
            }
        }
        release_if_empty(&mut self.read_buf);
        None
    }

    /// Acknowledges what is still pending (bounded wait), tells an MQTT 5 agent why, and closes.
    async fn finish(&mut self, session: &mut Session, close: Close) -> Close {
        let deadline = Instant::now() + CLOSE_GRACE;
        let socket_alive = !matches!(close, Close::Dropped(_) | Close::Stalled(_));
        while let Some(mut pending) = session.pending.pop_front() {
            let outcome = match &mut pending.commit {
                Commit::Waiting(rx) => match tokio::time::timeout_at(deadline, rx).await {
                    Ok(result) => Outcome::from(result.unwrap_or(Err(JournalError::Closed))),
                    // Unknown: the session keeps nothing of it, so a re-send is stored again.
                    Err(_) => break,
                },
                Commit::AlreadyJournaled => Outcome::Stored,
                Commit::Refused(reason) => Outcome::Refused(reason.clone()),
                Commit::Discarded => Outcome::Discarded,
            };
            // Even with the socket gone the outcome updates the session (QoS 2 state); a
            // further failure here only means fewer acknowledgements: close as planned.
            let _ = session.acknowledge(self, pending, outcome);
        }
        if socket_alive {
            let reason = match &close {
                Close::Refused(reason, _) => Some(*reason),
                Close::TakenOver(_) => Some(DisconnectReason::SessionTakenOver),
                Close::Shutdown => Some(DisconnectReason::ServerShuttingDown),
                Close::Normal { .. } | Close::Dropped(_) | Close::Stalled(_) => None,
            };
            if let Some(reason) = reason {
                self.send(Outbound::Disconnect(reason));
            }
            if self.flush_by(Some(deadline)).await.is_ok() {
                let _ = tokio::time::timeout_at(deadline, self.stream.shutdown()).await;
            }
        }
        close
    }

    async fn journal_will(&self, identity: &str, will: codec::Will) {
        let record = Record {
            received_at_ms: now_ms(),
            client_id: identity.to_string(),
            topic: will.topic,
            qos: will.qos,
            payload: will.payload,
            properties: will.properties,
        };
        // Wills are not deduplicated: the same "agent lost" message may legitimately repeat.
        match self.journal.append(record, None).await {
            Ok(rx) => match rx.await {
                Ok(Ok(_)) => {
                    metrics::counter!(telemetry::MESSAGES_IN, "kind" => "will").increment(1);
                    tracing::debug!("Journaled the agent's Will.");
                }
                Ok(Err(e)) => tracing::error!(error = %e, "Failed to journal the agent's Will."),
                Err(_) => tracing::error!("Journal closed before the agent's Will was committed."),
            },
            Err(e) => tracing::error!(error = %e, "Failed to journal the agent's Will."),
        }
    }
}

/// The connection-independent session logic.
struct Session {
    client_id: String,
    /// Who the agent is (certificate, password, client device auth, or its client id): what
    /// records carry as the agent, and what the ACL's `${identity}` stands for.
    identity: String,
    /// Client device auth's grant for this connection (Greengrass), consulted with the ACL.
    device: Option<Box<dyn DeviceGrant>>,
    publish_rate: TokenBucket,
    state: SessionState,
    pending: VecDeque<PendingAck>,
    /// Boxed: most agents set none, and an idle session should not carry room for one.
    will: Option<Box<codec::Will>>,
    /// Outbound QoS 1 deliveries awaiting the agent's PUBACK, by packet id.
    outbound: HashMap<u16, Delivery>,
    next_pkid: u16,
    /// The agent's Maximum Packet Size (MQTT 5): larger deliveries are dropped, as the spec says.
    max_packet_out: usize,
    window: usize,
}

impl Session {
    fn subject<'a>(&'a self, settings: &'a Settings) -> Subject<'a> {
        Subject {
            client_id: &self.client_id,
            identity: &self.identity,
            thing_name: &settings.thing_name,
        }
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        conn: &mut Connection<S>,
        packet: Inbound,
    ) -> Option<Close> {
        match packet {
            Inbound::Publish(publish) => return self.publish(conn, publish).await,
            Inbound::PubRel(pkid) => {
                // A PUBREL before its PUBREC breaks the QoS 2 exchange: taken as a release, the
                // packet id would then be marked journaled once the commit lands, and the
                // agent's next message with that id acknowledged without being stored.
                let committing = |p: &PendingAck| {
                    p.qos == 2 && p.pkid == pkid && matches!(p.commit, Commit::Waiting(_))
                };
                if self.pending.iter().any(committing) {
                    return Some(Close::Refused(
                        DisconnectReason::ProtocolError,
                        format!("PUBREL for packet id {pkid} before its PUBREC"),
                    ));
                }
                self.state.awaiting_rel.remove(&pkid);
                conn.send(Outbound::PubComp { pkid });
            }
            Inbound::PubAck(pkid) => {
                self.outbound.remove(&pkid);
            }
            Inbound::PubRec(pkid) => {
                // We deliver at QoS 1 at most; answer anyway so a confused agent moves on.
                self.outbound.remove(&pkid);
                conn.send(Outbound::PubRel { pkid });
            }
            Inbound::PubComp(pkid) => {
                self.outbound.remove(&pkid);
            }
            Inbound::Subscribe { pkid, filters } => {
                let mut granted = Vec::with_capacity(filters.len());
                for (filter, qos) in filters {
                    granted.push(self.subscribe(&conn.settings, filter, qos).await);
                }
                conn.send(Outbound::SubAck { pkid, granted });
            }
            Inbound::Unsubscribe { pkid, filters } => {
                self.state
                    .subscriptions
                    .retain(|(f, _)| !filters.contains(f));
                conn.send(Outbound::UnsubAck {
                    pkid,
                    count: filters.len(),
                });
            }
            Inbound::PingReq => conn.send(Outbound::PingResp),
            Inbound::Disconnect { with_will } => return Some(Close::Normal { with_will }),
            Inbound::Unexpected(what) => {
                return Some(Close::Refused(
                    DisconnectReason::ProtocolError,
                    format!("unexpected {what}"),
                ));
            }
        }
        None
    }

    /// Checks and records one SUBSCRIBE filter.
    async fn subscribe(&mut self, settings: &Settings, filter: String, qos: u8) -> SubResult {
        if !rumqttc::valid_filter(&filter) || settings.check_topic(&filter).is_err() {
            metrics::counter!(telemetry::REFUSALS, "reason" => "bad_filter").increment(1);
            return SubResult::Invalid;
        }
        if !self.allowed(settings, Access::Subscribe, &filter).await {
            return SubResult::NotAuthorized;
        }
        let qos = qos.min(1);
        self.state.subscriptions.retain(|(f, _)| *f != filter);
        self.state.subscriptions.push((filter, qos));
        SubResult::Granted(qos)
    }

    /// Whether the ACL (and client device auth, under Greengrass) allow it; counts a denial.
    async fn allowed(&self, settings: &Settings, access: Access, topic: &str) -> bool {
        let subject = self.subject(settings);
        let allowed = permitted(settings, &subject, self.device.as_deref(), access, topic).await;
        if !allowed {
            denied(access, topic);
        }
        allowed
    }

    async fn publish<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        conn: &mut Connection<S>,
        publish: InPublish,
    ) -> Option<Close> {
        self.publish_rate.take(1.0, Instant::now());
        metrics::counter!(telemetry::MESSAGES_IN).increment(1);
        telemetry::PROGRESS
            .messages_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(telemetry::BYTES_IN).increment(publish.payload.len() as u64);
        let InPublish {
            topic,
            payload,
            qos,
            pkid,
            properties,
        } = publish;
        if qos == 2 && self.state.awaiting_rel.contains(&pkid) {
            // A re-sent QoS 2 PUBLISH we already journaled: acknowledge, do not store twice.
            // (One re-sent while its first copy's commit is pending is appended again: the
            // dedup index, or at worst a duplicate record, absorbs it; it is never lost.)
            self.pending.push_back(PendingAck {
                pkid,
                qos,
                commit: Commit::AlreadyJournaled,
            });
            return None;
        }
        let settings = conn.settings.clone();
        let refusal = match settings.check_topic(&topic) {
            Err(why) => {
                metrics::counter!(telemetry::REFUSALS, "reason" => "topic_limit").increment(1);
                Some(AckReason::TopicNameInvalid(why))
            }
            Ok(()) if !self.allowed(&settings, Access::Publish, &topic).await => Some(
                AckReason::NotAuthorized(format!("publishing to {topic:?} is not allowed")),
            ),
            Ok(()) => None,
        };
        if let Some(reason) = refusal {
            let commit = match (conn.protocol, qos, settings.on_denied_311) {
                (_, 0, _) => return None,
                (Protocol::V311, _, OnDenied::Ignore) => Commit::Discarded,
                _ => Commit::Refused(reason),
            };
            // Answered in turn, after the messages before it.
            self.pending.push_back(PendingAck { pkid, qos, commit });
            return None;
        }
        let record = Record {
            received_at_ms: now_ms(),
            client_id: self.identity.clone(),
            topic,
            qos,
            payload,
            properties,
        };
        let max_batch = conn.settings.batch_max_bytes;
        let probe = JournaledRecord {
            seq: u64::MAX,
            record,
        };
        // A record larger than one batch travels as fragments; only one whose metadata alone
        // leaves no room for any payload cannot be carried.
        if !conn.settings.batch_budget.carries(&probe) {
            metrics::counter!(telemetry::REFUSALS, "reason" => "too_large_for_batch").increment(1);
            let why = format!(
                "message of {} bytes cannot fit in one upstream batch (batch.maxBytes = {max_batch})",
                probe.record.payload.len()
            );
            static LOG: telemetry::Throttle = telemetry::Throttle::new(10_000);
            if let Some(held_back) = LOG.ready() {
                tracing::warn!(topic = %probe.record.topic, %why, similar_not_logged = held_back, "Refused a message.");
            }
            if qos > 0 {
                // Answered in turn, after the messages before it (3.1.1: by closing).
                self.pending.push_back(PendingAck {
                    pkid,
                    qos,
                    commit: Commit::Refused(AckReason::Refused(why)),
                });
            }
            return None;
        }
        let record = probe.record;
        let key = conn
            .settings
            .dedup
            .then(|| crate::journal::dedup_key(&record.client_id, &record.topic, &record.payload));
        if qos == 0 {
            if let Err(e) = conn.journal.append_unacknowledged(record, key).await {
                return Some(Close::Refused(
                    DisconnectReason::UnspecifiedError,
                    e.to_string(),
                ));
            }
            return None;
        }
        match conn.journal.append(record, key).await {
            Ok(commit) => {
                self.pending.push_back(PendingAck {
                    pkid,
                    qos,
                    commit: Commit::Waiting(commit),
                });
                None
            }
            Err(e) => Some(Close::Refused(
                DisconnectReason::UnspecifiedError,
                e.to_string(),
            )),
        }
    }

    /// Sends the acknowledgement for an outcome. Returns a close when the outcome leaves no way
    /// to answer the agent but to disconnect (MQTT 3.1.1 on a journal failure). A QoS 2
    /// message's packet id is remembered as journaled only once it is (`Outcome::Stored`).
    fn acknowledge<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        conn: &mut Connection<S>,
        pending: PendingAck,
        outcome: Outcome,
    ) -> Option<Close> {
        let reason = match outcome {
            Outcome::Stored => {
                if pending.qos == 2 {
                    self.state.awaiting_rel.insert(pending.pkid);
                }
                AckReason::Success
            }
            Outcome::Failed(e @ JournalError::Full { .. }) => {
                AckReason::QuotaExceeded(e.to_string())
            }
            Outcome::Failed(e) => {
                metrics::counter!(telemetry::REFUSALS, "reason" => "journal_error").increment(1);
                AckReason::Failed(e.to_string())
            }
            Outcome::Refused(reason) => reason,
            Outcome::Discarded => AckReason::Success,
        };
        // MQTT 3.1.1 cannot refuse a PUBLISH: closing without PUBACK makes the agent keep
        // the message and send it again after reconnecting.
        if conn.protocol == Protocol::V311 {
            let code = match &reason {
                AckReason::Success => None,
                AckReason::QuotaExceeded(why) => Some((DisconnectReason::QuotaExceeded, why)),
                AckReason::Refused(why) => Some((DisconnectReason::PacketTooLarge, why)),
                AckReason::NotAuthorized(why) => Some((DisconnectReason::NotAuthorized, why)),
                AckReason::TopicNameInvalid(why) => Some((DisconnectReason::TopicNameInvalid, why)),
                AckReason::Failed(why) => Some((DisconnectReason::UnspecifiedError, why)),
            };
            if let Some((code, why)) = code {
                return Some(Close::Refused(code, why.clone()));
            }
        }
        let pkid = pending.pkid;
        conn.send(match pending.qos {
            2 => Outbound::PubRec { pkid, reason },
            _ => Outbound::PubAck { pkid, reason },
        });
        None
    }

    fn send_delivery<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        conn: &mut Connection<S>,
        delivery: Delivery,
    ) {
        let settings = conn.settings.clone();
        if !settings
            .acl
            .allows(&self.subject(&settings), Access::Subscribe, &delivery.topic)
        {
            // Subscriptions are checked when made; this guards deliveries addressed otherwise.
            denied(Access::Subscribe, &delivery.topic);
            return;
        }
        // Fixed header, topic, packet id and an empty property block, generously counted.
        if delivery.payload.len() + delivery.topic.len() + 16 > self.max_packet_out {
            metrics::counter!(telemetry::REFUSALS, "reason" => "delivery_too_large").increment(1);
            tracing::warn!(topic = %delivery.topic, "Dropped a delivery larger than the agent's Maximum Packet Size.");
            return;
        }
        let qos = delivery.qos.min(1);
        let pkid = if qos == 0 {
            0
        } else {
            let mut pkid = self.next_pkid;
            while pkid == 0 || self.outbound.contains_key(&pkid) {
                pkid = pkid.wrapping_add(1);
            }
            self.next_pkid = pkid.wrapping_add(1);
            pkid
        };
        conn.send(Outbound::Publish {
            topic: delivery.topic.clone(),
            payload: delivery.payload.clone(),
            qos,
            pkid,
        });
        if qos == 1 {
            self.outbound.insert(pkid, delivery);
        }
    }
}

impl ConnectRequest {
    /// The id to report in CONNACK when the gateway assigned it.
    fn client_id_assigned(&self) -> Option<String> {
        (self.protocol == Protocol::V5 && self.client_id_was_assigned)
            .then(|| self.client_id.clone())
    }
}

/// Counts and (at a bounded rate) logs an ACL denial.
fn denied(access: Access, topic: &str) {
    let reason = match access {
        Access::Publish => "acl_publish",
        Access::Subscribe => "acl_subscribe",
    };
    metrics::counter!(telemetry::REFUSALS, "reason" => reason).increment(1);
    static LOG: telemetry::Throttle = telemetry::Throttle::new(1_000);
    if let Some(held_back) = LOG.ready() {
        tracing::warn!(?access, %topic, similar_not_logged = held_back, "The ACL denied an agent.");
    }
}

fn refused_for(e: &ReadError) -> Close {
    let reason = match e {
        ReadError::TooLarge { .. } => DisconnectReason::PacketTooLarge,
        ReadError::Malformed(_) => DisconnectReason::MalformedPacket,
        ReadError::TopicInvalid(..) => DisconnectReason::TopicNameInvalid,
        ReadError::TopicAlias(_) => DisconnectReason::TopicAliasInvalid,
    };
    Close::Refused(reason, e.to_string())
}

async fn next_commit(pending: &mut VecDeque<PendingAck>) -> Outcome {
    match pending.front_mut().map(|p| &mut p.commit) {
        Some(Commit::Waiting(rx)) => Outcome::from(rx.await.unwrap_or(Err(JournalError::Closed))),
        Some(Commit::Refused(reason)) => Outcome::Refused(reason.clone()),
        Some(Commit::Discarded) => Outcome::Discarded,
        Some(Commit::AlreadyJournaled) | None => Outcome::Stored,
    }
}

/// The outcome of `pending` if it is already known, without waiting.
fn ready_commit(pending: &mut PendingAck) -> Option<Outcome> {
    match &mut pending.commit {
        Commit::AlreadyJournaled => Some(Outcome::Stored),
        Commit::Refused(reason) => Some(Outcome::Refused(reason.clone())),
        Commit::Discarded => Some(Outcome::Discarded),
        Commit::Waiting(rx) => match rx.try_recv() {
            Ok(result) => Some(Outcome::from(result)),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Some(Outcome::Failed(JournalError::Closed))
            }
        },
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A random 64-bit id for assigned client ids.
fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ms());
    h.finish()
}
