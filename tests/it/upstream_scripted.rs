//! PUBACK correlation on the `mqtt` upstream, against a scripted MQTT server written here
//! ([`ScriptedBroker`]) that stands in for AWS IoT Core: TLS with client certificates, MQTT
//! 3.1.1 and 5 by hand, and a per-PUBLISH script the test supplies (ack now, refuse with a
//! reason code, withhold and release later in any order, never ack, close, duplicated or
//! spurious PUBACKs).
//!
//! The gateway runs with `upstream.maxInflight` 3 and `batch.maxMessages` 1, so rumqttc's
//! packet ids (1..=3, cyclic) are reused after three batches, and a publish whose id is still
//! in flight is held back by rumqttc (a "collision") until that id is acknowledged. What the
//! tests pin down:
//! * a batch leaves the journal only after the server PUBACKed, with success, the packet that
//!   carried it: out-of-order acks, packet-id reuse and collisions never confirm a batch the
//!   server did not acknowledge (checked on the journal file itself, after `kill -9`);
//! * a PUBACK for a packet id that is not outstanding, and a duplicated PUBACK, fail the link;
//!   the gateway reconnects and re-sends whatever is unconfirmed;
//! * every message acknowledged to an agent arrives, and the server sees duplicates only as
//!   whole re-sent batches (same `batchSeq`, same bytes); in the end the journal is empty.
//!
//! Acknowledgements are only ever *checked* against what the server recorded: the server
//! records each PUBACK before writing it, and the tests read the journal before the server's
//! record, so a PUBACK racing a check can make it weaker, never fail it wrongly.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::support::{
    self, AckedPublisher, Gateway, mqtt_packet, mqtt_string, mqtt_varint, poll_until, show,
    split_packet,
};
use crate::upstream_support::{
    Pki, UpBatch, assert_clean, exactly_wanted_problems, plan, publish_all_acked,
    standalone_upstream, start_gateway_with, tail,
};

/// Deadline for one step of a script (a PUBLISH to arrive, a reconnect).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for everything to arrive and the journal to drain.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// The gateway's upstream window in these tests: rumqttc numbers publishes 1..=3.
const MAX_INFLIGHT: u16 = 3;

/// (clientId, payload) of one agent message.
type Msg = (String, Vec<u8>);

// ---------------------------------------------------------------- the scripted server

/// What the server does with one PUBLISH; the policy decides it when the PUBLISH arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(dead_code)] // Part of the server's API for other tests (poison batches), not all used here.
pub enum Action {
    /// PUBACK with success, at once.
    Ack,
    /// MQTT 5 only: PUBACK at once with this reason code (0x80 unspecified error, 0x87 not
    /// authorized, ...) and a reason string. It answers the packet without acknowledging the
    /// batch. On a 3.1.1 connection it is a script error: recorded in `problems`, and the
    /// connection is closed.
    Refuse(u8),
    /// PUBACK with success twice, in one write: the second answers nothing.
    AckTwice,
    /// Hold the PUBACK until the test sends it (`ack`, `refuse`, `pubacks`); listed by
    /// `withheld`.
    Withhold,
    /// Never PUBACK it by itself (not listed by `withheld`; an explicit `ack` still can).
    Never,
    /// Close the connection at once, without a PUBACK for it or for anything withheld.
    Close,
    /// PUBACK with success, then close the connection.
    AckThenClose,
}

/// One PUBLISH the server received.
#[derive(Clone, Debug)]
#[allow(dead_code)] // Part of the server's API for other tests, not all fields read here.
pub struct Received {
    /// Connection number, 1, 2, ... in accept order.
    pub conn: usize,
    /// 1-based index of this PUBLISH on its connection.
    pub index: usize,
    pub pkid: u16,
    pub dup: bool,
    pub topic: String,
    /// The envelope header (`batchSeq`, `firstSeq`, `lastSeq`, `count`, ...).
    pub header: Value,
    pub batch_seq: u64,
    /// How many times this `batchSeq` arrived so far, this one included (1: the first time).
    pub attempt: usize,
    pub payload: Arc<Vec<u8>>,
    /// The decoded records, when `set_decode_records(true)` (decoded before the policy runs).
    pub records: Option<Arc<Vec<Value>>>,
    pub at: Instant,
}

/// One PUBACK the server wrote (recorded just before writing it).
#[derive(Clone, Debug)]
#[allow(dead_code)] // Part of the server's API for other tests, not all fields read here.
pub struct AckSent {
    pub conn: usize,
    pub pkid: u16,
    /// 0 (success) or an MQTT 5 reason code.
    pub reason: u8,
    /// The batch outstanding under `pkid` on this connection when it was sent; `None`: the
    /// PUBACK answered nothing (spurious or duplicated).
    pub batch_seq: Option<u64>,
    pub at: Instant,
}

impl AckSent {
    /// A success PUBACK that answered a batch: the only thing that may confirm one.
    pub fn acknowledged(&self) -> Option<u64> {
        self.batch_seq.filter(|_| is_success(self.reason))
    }
}

/// One connection, as the server saw it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub number: usize,
    /// 4 (3.1.1) or 5, once CONNECT arrived.
    pub protocol: Option<u8>,
    pub client_id: Option<String>,
    /// Why it ended; `None` while open.
    pub ended: Option<String>,
}

/// A command from the test to one connection's task.
enum Command {
    /// Write these PUBACKs (packet id, reason code) in one write, outstanding or not.
    Pubacks(Vec<(u16, u8)>, oneshot::Sender<Result<(), String>>),
    Close(oneshot::Sender<Result<(), String>>),
}

struct Conn {
    info: ConnInfo,
    /// Packet id -> index into `State::publishes`, for PUBLISHes not answered yet.
    outstanding: BTreeMap<u16, usize>,
    /// The outstanding packet ids whose action was `Withhold`.
    withheld: BTreeSet<u16>,
    commands: mpsc::UnboundedSender<Command>,
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    publishes: Vec<Received>,
    acks: Vec<AckSent>,
    problems: Vec<String>,
    /// Times each batchSeq arrived.
    attempts: HashMap<u64, usize>,
    /// Human-readable timeline, for failure messages.
    timeline: Vec<String>,
    tasks: Vec<tokio::task::AbortHandle>,
}

type Policy = Box<dyn FnMut(&Received) -> Action + Send>;

struct Shared {
    started: Instant,
    state: Mutex<State>,
    policy: Mutex<Policy>,
    decode_records: AtomicBool,
    decoded: Mutex<HashMap<Vec<u8>, Arc<Vec<Value>>>>,
}

impl Shared {
    fn note(&self, state: &mut State, line: String) {
        let ms = self.started.elapsed().as_millis();
        state.timeline.push(format!("+{ms:>6} ms {line}"));
    }

    fn problem(&self, conn: usize, what: String) {
        let mut s = self.state.lock().unwrap();
        self.note(&mut s, format!("c{conn} PROBLEM {what}"));
        s.problems.push(format!("connection {conn}: {what}"));
    }

    /// Records a PUBACK about to be written; returns its bytes.
    fn record_ack(&self, conn: usize, pkid: u16, reason: u8, v5: bool) -> Vec<u8> {
        let mut s = self.state.lock().unwrap();
        let c = &mut s.conns[conn - 1];
        c.withheld.remove(&pkid);
        let answered = c.outstanding.remove(&pkid);
        let batch_seq = answered.map(|i| s.publishes[i].batch_seq);
        s.acks.push(AckSent {
            conn,
            pkid,
            reason,
            batch_seq,
            at: Instant::now(),
        });
        let what = match batch_seq {
            Some(seq) => format!("batch {seq}"),
            None => "NOTHING outstanding (spurious)".to_string(),
        };
        self.note(
            &mut s,
            format!("c{conn} PUBACK pkid {pkid} reason 0x{reason:02x} -> {what}"),
        );
        puback_bytes(v5, pkid, reason)
    }

    async fn decode(&self, payload: &[u8]) -> Result<Arc<Vec<Value>>, String> {
        if let Some(r) = self.decoded.lock().unwrap().get(payload) {
            return Ok(r.clone());
        }
        let (_, records) = support::decode_bytes(payload).await?;
        let records = Arc::new(records);
        self.decoded
            .lock()
            .unwrap()
            .insert(payload.to_vec(), records.clone());
        Ok(records)
    }
}

/// A scripted MQTT server standing in for AWS IoT Core in PUBACK-correlation tests.
///
/// Listens on 127.0.0.1:`port` with TLS (certificate `server` of the test [`Pki`], SAN
/// localhost/127.0.0.1; client certificates verified against its CA), speaks MQTT 3.1.1 and 5
/// by hand (CONNECT/CONNACK, PINGREQ/PINGRESP, QoS 1 PUBLISH/PUBACK, DISCONNECT) and answers
/// every PUBLISH as the policy (`set_policy`, default: ack everything) decides when it
/// arrives. Withheld PUBACKs are sent on the test's command (`ack`, `refuse`, `pubacks`), in
/// any order; `close` ends a connection. A policy sees the connection number, so "from
/// connection 2 on, ack everything" is one `match` arm.
///
/// Guarantees, which the assertions rely on:
/// * every PUBLISH is recorded (`publishes`) with its connection number, index on the
///   connection, packet id, `batchSeq` (from the envelope header) and raw payload, before
///   anything is written in answer to it;
/// * every PUBACK is recorded (`acks`) before it is written, with the batch that was
///   outstanding under its packet id on that connection at that moment (`None`: it answered
///   nothing). So `acked_batches` (success PUBACKs that answered a batch) contains, at any
///   instant, everything the gateway can legitimately have confirmed;
/// * nothing is written unless the policy or a command says so; one connection's PUBLISHes
///   and commands are handled in order;
/// * protocol violations by the gateway (a packet id reused while outstanding, a packet a
///   client should not send, a PUBLISH that is not QoS 1 or not an envelope) and script
///   errors (a reason code on a 3.1.1 connection) land in `problems`.
pub struct ScriptedBroker {
    pub port: u16,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

#[allow(dead_code)] // Part of the server's API for other tests (poison batches), not all used here.
impl ScriptedBroker {
    /// Binds 127.0.0.1:0 and starts accepting; the policy acks everything until replaced.
    pub async fn start(pki: &Pki) -> ScriptedBroker {
        let acceptor = TlsAcceptor::from(server_tls(pki));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the scripted broker");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            started: Instant::now(),
            state: Mutex::new(State::default()),
            policy: Mutex::new(Box::new(|_| Action::Ack)),
            decode_records: AtomicBool::new(false),
            decoded: Mutex::new(HashMap::new()),
        });
        let s2 = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let (tx, rx) = mpsc::unbounded_channel();
                let number = {
                    let mut s = s2.state.lock().unwrap();
                    let number = s.conns.len() + 1;
                    s.conns.push(Conn {
                        info: ConnInfo {
                            number,
                            protocol: None,
                            client_id: None,
                            ended: None,
                        },
                        outstanding: BTreeMap::new(),
                        withheld: BTreeSet::new(),
                        commands: tx,
                    });
                    s2.note(&mut s, format!("c{number} accepted"));
                    number
                };
                let shared = s2.clone();
                let acceptor = acceptor.clone();
                let task = tokio::spawn(async move {
                    let why = connection(shared.clone(), number, tcp, acceptor, rx).await;
                    let mut s = shared.state.lock().unwrap();
                    shared.note(&mut s, format!("c{number} ended: {why}"));
                    s.conns[number - 1].info.ended = Some(why);
                });
                s2.state.lock().unwrap().tasks.push(task.abort_handle());
            }
        });
        ScriptedBroker {
            port,
            shared,
            accept,
        }
    }

    /// Replaces the policy; it applies to PUBLISHes arriving from now on.
    pub fn set_policy(&self, policy: impl FnMut(&Received) -> Action + Send + 'static) {
        *self.shared.policy.lock().unwrap() = Box::new(policy);
    }

    /// Decode each PUBLISH's records (with `gatehouse decode`) before the policy runs, so a
    /// policy can pick a batch by content (`Received::records`). Off by default: it slows
    /// every answer by a process spawn.
    pub fn set_decode_records(&self, on: bool) {
        self.shared.decode_records.store(on, Ordering::SeqCst);
    }

    /// PUBACK with success for `pkid` on connection `conn` (outstanding or not). Returns once
    /// written.
    pub async fn ack(&self, conn: usize, pkid: u16) -> Result<(), String> {
        self.pubacks(conn, &[(pkid, 0)]).await
    }

    /// MQTT 5 PUBACK with reason code `reason` for `pkid`.
    pub async fn refuse(&self, conn: usize, pkid: u16, reason: u8) -> Result<(), String> {
        self.pubacks(conn, &[(pkid, reason)]).await
    }

    /// Writes these PUBACKs `(packet id, reason code)`, in this order, in one write, whether
    /// or not their packet ids are outstanding. Returns once written.
    pub async fn pubacks(&self, conn: usize, acks: &[(u16, u8)]) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.command(conn, Command::Pubacks(acks.to_vec(), tx))?;
        rx.await
            .map_err(|_| format!("connection {conn} ended before the PUBACKs were written"))?
    }

    /// Closes connection `conn` (TLS close_notify, then the socket).
    pub async fn close(&self, conn: usize) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.command(conn, Command::Close(tx))?;
        rx.await
            .map_err(|_| format!("connection {conn} ended before the close"))?
    }

    fn command(&self, conn: usize, command: Command) -> Result<(), String> {
        let s = self.shared.state.lock().unwrap();
        let c = s
            .conns
            .get(conn.wrapping_sub(1))
            .ok_or_else(|| format!("no connection {conn}"))?;
        c.commands
            .send(command)
            .map_err(|_| format!("connection {conn} has ended"))
    }

    /// Every PUBLISH received, in arrival order.
    pub fn publishes(&self) -> Vec<Received> {
        self.shared.state.lock().unwrap().publishes.clone()
    }

    /// The PUBLISHes received on connection `conn`, in arrival order.
    pub fn publishes_on(&self, conn: usize) -> Vec<Received> {
        self.publishes()
            .into_iter()
            .filter(|p| p.conn == conn)
            .collect()
    }

    /// Every PUBACK written, in order.
    pub fn acks(&self) -> Vec<AckSent> {
        self.shared.state.lock().unwrap().acks.clone()
    }

    /// The batchSeqs PUBACKed with success (answering an outstanding packet), any connection.
    pub fn acked_batches(&self) -> BTreeSet<u64> {
        self.acks()
            .iter()
            .filter_map(AckSent::acknowledged)
            .collect()
    }

    /// The batchSeqs PUBACKed with success on connection `conn`, in order.
    pub fn acked_on(&self, conn: usize) -> Vec<u64> {
        self.acks()
            .iter()
            .filter(|a| a.conn == conn)
            .filter_map(AckSent::acknowledged)
            .collect()
    }

    /// The PUBLISHes on `conn` whose PUBACK is withheld (action `Withhold`, not answered yet),
    /// in arrival order.
    pub fn withheld(&self, conn: usize) -> Vec<Received> {
        let s = self.shared.state.lock().unwrap();
        let Some(c) = s.conns.get(conn.wrapping_sub(1)) else {
            return Vec::new();
        };
        let mut held: Vec<Received> = c
            .withheld
            .iter()
            .filter_map(|pkid| c.outstanding.get(pkid))
            .map(|i| s.publishes[*i].clone())
            .collect();
        held.sort_by_key(|r| r.index);
        held
    }

    /// The PUBLISHes on `conn` not answered yet (withheld, never, or awaiting a command).
    pub fn outstanding(&self, conn: usize) -> Vec<Received> {
        let s = self.shared.state.lock().unwrap();
        let Some(c) = s.conns.get(conn.wrapping_sub(1)) else {
            return Vec::new();
        };
        let mut out: Vec<Received> = c
            .outstanding
            .values()
            .map(|i| s.publishes[*i].clone())
            .collect();
        out.sort_by_key(|r| r.index);
        out
    }

    pub fn connections(&self) -> Vec<ConnInfo> {
        let s = self.shared.state.lock().unwrap();
        s.conns.iter().map(|c| c.info.clone()).collect()
    }

    /// Numbers of the connections still open.
    pub fn open_connections(&self) -> Vec<usize> {
        self.connections()
            .into_iter()
            .filter(|c| c.ended.is_none())
            .map(|c| c.number)
            .collect()
    }

    /// Protocol violations and script errors (see the type's doc); empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().problems.clone()
    }

    /// The server's timeline (connections, PUBLISHes and the actions taken, PUBACKs), for
    /// failure messages.
    pub fn timeline(&self) -> String {
        self.shared.state.lock().unwrap().timeline.join("\n")
    }

    /// The decoded records of a received PUBLISH (cached by payload).
    pub async fn records(&self, r: &Received) -> Result<Arc<Vec<Value>>, String> {
        match &r.records {
            Some(records) => Ok(records.clone()),
            None => self.shared.decode(&r.payload).await.map_err(|e| {
                format!(
                    "PUBLISH c{} #{} (batchSeq {}): {e}",
                    r.conn, r.index, r.batch_seq
                )
            }),
        }
    }

    /// Waits until connection `conn` received at least `n` PUBLISHes; returns them all.
    pub async fn wait_publishes(&self, conn: usize, n: usize, timeout: Duration) -> Vec<Received> {
        poll_until(
            &format!("{n} PUBLISHes on scripted connection {conn}"),
            timeout,
            || async {
                let got = self.publishes_on(conn);
                if got.len() >= n {
                    Ok(got)
                } else {
                    Err(format!(
                        "{} so far; server timeline:\n{}",
                        got.len(),
                        tail(&self.timeline(), 3000)
                    ))
                }
            },
        )
        .await
    }
}

impl Drop for ScriptedBroker {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(s) = self.shared.state.lock() {
            for t in &s.tasks {
                t.abort();
            }
        }
    }
}

fn is_success(reason: u8) -> bool {
    // 0x00 Success, 0x10 No matching subscribers (MQTT 5): the broker took the message.
    reason == 0x00 || reason == 0x10
}

/// The server's TLS configuration: ring explicitly, client certificates required.
fn server_tls(pki: &Pki) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(&pki.ca()) {
        roots.add(cert).expect("add the test CA");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client certificate verifier");
    let (cert, key) = pki.pair("server");
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        std::fs::File::open(&key).expect("open server key"),
    ))
    .expect("read server key")
    .expect("a private key in server.key");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(&cert), key)
        .expect("server certificate");
    Arc::new(config)
}

fn pem_certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// PUBACK: packet id, and for a non-success MQTT 5 answer the reason code and a reason string.
fn puback_bytes(v5: bool, pkid: u16, reason: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 && reason != 0 {
        body.push(reason);
        let mut props = vec![0x1F]; // Reason String
        props.extend(mqtt_string(
            format!("scripted refusal 0x{reason:02x}").as_bytes(),
        ));
        body.extend(mqtt_varint(props.len()));
        body.extend(props);
    }
    mqtt_packet(0x40, &body)
}

/// Cursor over a packet body.
struct Body<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Body<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Body { bytes, pos: 0 }
    }

    fn u8(&mut self) -> Result<u8, String> {
        let b = *self.bytes.get(self.pos).ok_or("packet cut short")?;
        self.pos += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    /// Length-prefixed string / binary data.
    fn string(&mut self) -> Result<&'a [u8], String> {
        let len = self.u16()? as usize;
        let s = self
            .bytes
            .get(self.pos..self.pos + len)
            .ok_or("string past the end of the packet")?;
        self.pos += len;
        Ok(s)
    }

    fn varint(&mut self) -> Result<usize, String> {
        let mut n = 0usize;
        let mut mult = 1usize;
        for _ in 0..4 {
            let b = self.u8()?;
            n += (b & 0x7f) as usize * mult;
            if b & 0x80 == 0 {
                return Ok(n);
            }
            mult *= 128;
        }
        Err("variable byte integer longer than 4 bytes".into())
    }

    /// MQTT 5 properties: skipped.
    fn skip_properties(&mut self) -> Result<(), String> {
        let len = self.varint()?;
        if self.pos + len > self.bytes.len() {
            return Err("properties past the end of the packet".into());
        }
        self.pos += len;
        Ok(())
    }

    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }
}

/// The JSON header of a batch envelope (docs/ENVELOPE.md: "GHB1", u32 BE length, JSON).
fn envelope_header(payload: &[u8]) -> Result<Value, String> {
    if payload.len() < 8 || &payload[..4] != b"GHB1" {
        return Err(format!(
            "not a batch envelope: {:02x?}",
            &payload[..payload.len().min(16)]
        ));
    }
    let len = u32::from_be_bytes(payload[4..8].try_into().unwrap()) as usize;
    let json = payload
        .get(8..8 + len)
        .ok_or("envelope header length past the end")?;
    serde_json::from_slice(json).map_err(|e| format!("envelope header is not JSON: {e}"))
}

/// One connection's protocol state and the write half of its socket.
struct Session {
    shared: Arc<Shared>,
    number: usize,
    wr: WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>,
    /// Protocol level once CONNECT arrived.
    version: Option<u8>,
    index: usize,
}

impl Session {
    fn v5(&self) -> bool {
        self.version == Some(5)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.wr
            .write_all(bytes)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        self.wr
            .flush()
            .await
            .map_err(|e| format!("flush failed: {e}"))
    }

    async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }

    /// Writes PUBACKs in one write. `Err`: the connection must end (with that reason).
    async fn pubacks(&mut self, acks: &[(u16, u8)]) -> Result<(), String> {
        let v5 = self.v5();
        if !v5 && acks.iter().any(|(_, reason)| *reason != 0) {
            let what = format!("script error: PUBACK reason code on a 3.1.1 connection ({acks:?})");
            self.shared.problem(self.number, what.clone());
            return Err(what);
        }
        let mut bytes = Vec::new();
        for (pkid, reason) in acks {
            bytes.extend(self.shared.record_ack(self.number, *pkid, *reason, v5));
        }
        self.write(&bytes).await
    }

    /// Handles one packet from the client; `Some(why)` ends the connection.
    async fn packet(&mut self, first: u8, body: &[u8]) -> Option<String> {
        let result = match first >> 4 {
            1 => self.connect(body).await,
            3 => self.publish(first, body).await,
            12 => self.write(&[0xD0, 0x00]).await.map(|_| None),
            14 => Ok(Some("DISCONNECT from the client".to_string())),
            _ => {
                let what = format!(
                    "unexpected packet {}",
                    support::describe_packet(first, body)
                );
                self.shared.problem(self.number, what.clone());
                Ok(Some(what))
            }
        };
        result.unwrap_or_else(Some)
    }

    async fn connect(&mut self, body: &[u8]) -> Result<Option<String>, String> {
        if self.version.is_some() {
            let what = "a second CONNECT".to_string();
            self.shared.problem(self.number, what.clone());
            return Ok(Some(what));
        }
        let mut b = Body::new(body);
        let name = b.string()?;
        let level = b.u8()?;
        let _flags = b.u8()?;
        let _keep_alive = b.u16()?;
        if name != b"MQTT" || !(level == 4 || level == 5) {
            let what = format!("CONNECT with protocol {:?} level {level}", show(name));
            self.shared.problem(self.number, what.clone());
            return Ok(Some(what));
        }
        if level == 5 {
            b.skip_properties()?;
        }
        let client_id = String::from_utf8_lossy(b.string()?).into_owned();
        self.version = Some(level);
        {
            let mut s = self.shared.state.lock().unwrap();
            let info = &mut s.conns[self.number - 1].info;
            info.protocol = Some(level);
            info.client_id = Some(client_id.clone());
            self.shared.note(
                &mut s,
                format!("c{} CONNECT level {level} client {client_id}", self.number),
            );
        }
        // CONNACK: no session present, accepted (MQTT 5: reason Success, no properties).
        let connack = if level == 5 {
            mqtt_packet(0x20, &[0, 0, 0])
        } else {
            mqtt_packet(0x20, &[0, 0])
        };
        self.write(&connack).await.map(|_| None)
    }

    async fn publish(&mut self, first: u8, body: &[u8]) -> Result<Option<String>, String> {
        let n = self.number;
        if self.version.is_none() {
            let what = "PUBLISH before CONNECT".to_string();
            self.shared.problem(n, what.clone());
            return Ok(Some(what));
        }
        let qos = (first >> 1) & 3;
        let dup = first & 0x08 != 0;
        let mut b = Body::new(body);
        let topic = String::from_utf8_lossy(b.string()?).into_owned();
        if qos != 1 {
            let what = format!("PUBLISH at QoS {qos} on {topic}");
            self.shared.problem(n, what.clone());
            return Ok(Some(what));
        }
        let pkid = b.u16()?;
        if self.v5() {
            b.skip_properties()?;
        }
        let payload = Arc::new(b.rest().to_vec());
        let header = match envelope_header(&payload) {
            Ok(h) => h,
            Err(e) => {
                let what = format!("PUBLISH pkid {pkid}: {e}");
                self.shared.problem(n, what.clone());
                return Ok(Some(what));
            }
        };
        let Some(batch_seq) = header["batchSeq"].as_u64() else {
            let what = format!("PUBLISH pkid {pkid}: header without batchSeq: {header}");
            self.shared.problem(n, what.clone());
            return Ok(Some(what));
        };
        let records = if self.shared.decode_records.load(Ordering::SeqCst) {
            Some(self.shared.decode(&payload).await?)
        } else {
            None
        };
        self.index += 1;
        let received = {
            let mut s = self.shared.state.lock().unwrap();
            let attempt = {
                let a = s.attempts.entry(batch_seq).or_default();
                *a += 1;
                *a
            };
            let received = Received {
                conn: n,
                index: self.index,
                pkid,
                dup,
                topic,
                header,
                batch_seq,
                attempt,
                payload,
                records,
                at: Instant::now(),
            };
            let at = s.publishes.len();
            s.publishes.push(received.clone());
            if let Some(previous) = s.conns[n - 1].outstanding.insert(pkid, at) {
                let old = s.publishes[previous].batch_seq;
                s.problems.push(format!(
                    "connection {n}: packet id {pkid} reused for batch {batch_seq} while batch \
                     {old} was not answered"
                ));
            }
            received
        };
        let action = (self.shared.policy.lock().unwrap())(&received);
        {
            let mut s = self.shared.state.lock().unwrap();
            self.shared.note(
                &mut s,
                format!(
                    "c{n} PUBLISH #{} pkid {pkid} batch {batch_seq} (attempt {}{}) -> {action:?}",
                    received.index,
                    received.attempt,
                    if dup { ", DUP" } else { "" }
                ),
            );
            if action == Action::Withhold {
                s.conns[n - 1].withheld.insert(pkid);
            }
        }
        match action {
            Action::Ack => self.pubacks(&[(pkid, 0)]).await.map(|_| None),
            Action::Refuse(reason) => self.pubacks(&[(pkid, reason)]).await.map(|_| None),
            Action::AckTwice => self.pubacks(&[(pkid, 0), (pkid, 0)]).await.map(|_| None),
            Action::Withhold | Action::Never => Ok(None),
            Action::Close => Ok(Some(format!(
                "closed by the script on PUBLISH #{}",
                received.index
            ))),
            Action::AckThenClose => {
                self.pubacks(&[(pkid, 0)]).await?;
                Ok(Some(format!(
                    "closed by the script after acking PUBLISH #{}",
                    received.index
                )))
            }
        }
    }
}

/// Serves one connection until it ends; returns why it ended.
async fn connection(
    shared: Arc<Shared>,
    number: usize,
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    mut commands: mpsc::UnboundedReceiver<Command>,
) -> String {
    let tls = match tokio::time::timeout(STEP_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return format!("TLS handshake failed: {e}"),
        Err(_) => return "TLS handshake timed out".to_string(),
    };
    let (mut rd, wr) = tokio::io::split(tls);
    let mut session = Session {
        shared,
        number,
        wr,
        version: None,
        index: 0,
    };
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 16 * 1024];
    loop {
        loop {
            match split_packet(&buf) {
                Err(e) => {
                    session.shared.problem(number, e.clone());
                    session.shutdown().await;
                    return e;
                }
                Ok(None) => break,
                Ok(Some((first, body, used))) => {
                    buf.drain(..used);
                    if let Some(why) = session.packet(first, &body).await {
                        session.shutdown().await;
                        return why;
                    }
                }
            }
        }
        tokio::select! {
            read = rd.read(&mut tmp) => match read {
                Ok(0) => return "closed by the client".to_string(),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) => return format!("closed by the client ({e})"),
            },
            command = commands.recv() => match command {
                Some(Command::Pubacks(acks, done)) => {
                    let result = session.pubacks(&acks).await;
                    let failed = result.clone().err();
                    let _ = done.send(result);
                    if let Some(why) = failed {
                        session.shutdown().await;
                        return why;
                    }
                }
                Some(Command::Close(done)) => {
                    session.shutdown().await;
                    let _ = done.send(Ok(()));
                    return "closed by the test".to_string();
                }
                None => return "server dropped".to_string(),
            },
        }
    }
}

// ---------------------------------------------------------------- journal

/// What the gateway's journal holds (read-only snapshot).
struct JournalView {
    /// seq -> (clientId, payload).
    records: BTreeMap<u64, Msg>,
    /// batch_seq -> (first_seq, last_seq).
    batches: BTreeMap<u64, (u64, u64)>,
    dead_letters: u64,
}

fn read_journal(path: &Path) -> Result<JournalView, String> {
    use rusqlite::{Connection, OpenFlags};
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("open {} read-only: {e}", path.display()))?;
    db.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let err = |e: rusqlite::Error| format!("journal query: {e}");
    let mut records = BTreeMap::new();
    let mut stmt = db
        .prepare("SELECT seq, client_id, payload FROM records")
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })
        .map_err(err)?;
    for row in rows {
        let (seq, client, payload) = row.map_err(err)?;
        records.insert(seq as u64, (client, payload));
    }
    let mut batches = BTreeMap::new();
    let mut stmt = db
        .prepare("SELECT batch_seq, first_seq, last_seq FROM batches")
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(err)?;
    for row in rows {
        let (seq, first, last) = row.map_err(err)?;
        batches.insert(seq as u64, (first as u64, last as u64));
    }
    let dead_letters: i64 = db
        .query_row("SELECT COUNT(*) FROM dead_letter", [], |r| r.get(0))
        .map_err(err)?;
    Ok(JournalView {
        records,
        batches,
        dead_letters: dead_letters as u64,
    })
}

/// Every received PUBLISH with its decoded records, in arrival order.
async fn decoded(broker: &ScriptedBroker) -> Result<Vec<(Received, Arc<Vec<Value>>)>, String> {
    let mut out = Vec::new();
    for p in broker.publishes() {
        let records = broker.records(&p).await?;
        out.push((p, records));
    }
    Ok(out)
}

fn msg(record: &Value) -> Msg {
    (support::client_id(record), support::payload_bytes(record))
}

/// The messages carried by batches the server PUBACKed with success.
async fn delivered(broker: &ScriptedBroker) -> Result<HashSet<Msg>, String> {
    let acked = broker.acked_batches();
    Ok(decoded(broker)
        .await?
        .iter()
        .filter(|(p, _)| acked.contains(&p.batch_seq))
        .flat_map(|(_, records)| records.iter().map(msg))
        .collect())
}

/// Violations of "nothing leaves the journal without a PUBACK for the packet that carried it":
/// * a batch the server received and never PUBACKed with success has lost its `batches` row
///   or one of its records;
/// * a message acknowledged to the agent (`wanted`) is neither in the journal nor in a batch
///   the server PUBACKed with success (lost);
/// * anything was dead-lettered (these tests allow 1000 attempts: nothing may be).
///
/// The journal is read before the server's record, so an acknowledgement racing the check
/// cannot make it fail wrongly (acknowledgements only accumulate).
async fn release_problems(gw: &Gateway, broker: &ScriptedBroker, wanted: &[Msg]) -> Vec<String> {
    let journal = match read_journal(&gw.journal) {
        Ok(j) => j,
        Err(e) => return vec![e],
    };
    let acked = broker.acked_batches();
    let received = match decoded(broker).await {
        Ok(d) => d,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let mut checked = BTreeSet::new();
    for (p, records) in &received {
        if acked.contains(&p.batch_seq) || !checked.insert(p.batch_seq) {
            continue;
        }
        if !journal.batches.contains_key(&p.batch_seq) {
            problems.push(format!(
                "batch {} was never PUBACKed with success, yet its `batches` row is gone",
                p.batch_seq
            ));
        }
        for r in records.iter() {
            let seq = support::seq(r);
            if !journal.records.contains_key(&seq) {
                problems.push(format!(
                    "record seq {seq} ({}) of batch {}, never PUBACKed with success, was released \
                     from the journal",
                    show(&support::payload_bytes(r)),
                    p.batch_seq
                ));
            }
        }
    }
    let journaled: HashSet<&Msg> = journal.records.values().collect();
    let delivered: HashSet<Msg> = received
        .iter()
        .filter(|(p, _)| acked.contains(&p.batch_seq))
        .flat_map(|(_, records)| records.iter().map(msg))
        .collect();
    for m in wanted {
        if !journaled.contains(m) && !delivered.contains(m) {
            problems.push(format!(
                "message ({}, {}) was acknowledged to the agent, is not in the journal, and no \
                 batch carrying it was PUBACKed by the server: lost",
                m.0,
                show(&m.1)
            ));
        }
    }
    if journal.dead_letters > 0 {
        problems.push(format!(
            "{} records were dead-lettered (maxBatchAttempts is 1000)",
            journal.dead_letters
        ));
    }
    problems
}

// ---------------------------------------------------------------- gateway and agent helpers

/// Failure context: the server's timeline and problems, and the gateway's log.
fn context(gw: &Gateway, broker: &ScriptedBroker) -> String {
    format!(
        "\n--- scripted server problems ---\n{:#?}\n--- scripted server timeline (tail) ---\n{}\n\
         --- gateway log (tail) ---\n{}",
        broker.problems(),
        tail(&broker.timeline(), 6000),
        tail(&gw.logs(), 6000)
    )
}

fn assert_no_release_problems(problems: &[String], gw: &Gateway, broker: &ScriptedBroker) {
    assert!(
        problems.is_empty(),
        "the journal released what the server never acknowledged: {problems:#?}{}",
        context(gw, broker)
    );
}

/// A gateway whose upstream is `broker` (protocol "3.1.1" or "5"), a window of
/// [`MAX_INFLIGHT`] batches of one message each, no dead-lettering, no pacing in the way.
async fn start_scripted_gateway(
    pki: &Pki,
    broker: &ScriptedBroker,
    protocol: &str,
) -> (Gateway, String) {
    let mut upstream = standalone_upstream(pki, "localhost", broker.port);
    upstream["protocol"] = json!(protocol);
    upstream["maxInflight"] = json!(MAX_INFLIGHT);
    upstream["maxBatchAttempts"] = json!(1000);
    upstream["maxPublishesPerSec"] = json!(10_000);
    start_gateway_with(upstream, |c| {
        c["batch"]["maxMessages"] = json!(1);
    })
    .await
}

/// (gatehouse_upstream_acks_total, gatehouse_batches_confirmed_total): confirmations the sink
/// sent, and confirmations the journal applied.
async fn confirmation_counters(metrics: &str) -> Result<(f64, f64), String> {
    let body = support::http_get(metrics, "/metrics").await?;
    let get = |name| support::metric_value(&body, name).unwrap_or(0.0);
    Ok((
        get("gatehouse_upstream_acks_total"),
        get("gatehouse_batches_confirmed_total"),
    ))
}

/// Once the sink has left a connection (the server saw the next one) and the next one
/// acknowledges nothing: waits until the journal applied every confirmation the sink sent,
/// and checks the sink confirmed no more batches than the server acknowledged.
async fn settle_confirmations(gw: &Gateway, broker: &ScriptedBroker, metrics: &str) -> f64 {
    let (acks, _) = poll_until(
        "the journal to apply every confirmation the sink sent",
        STEP_TIMEOUT,
        || async {
            let (acks, confirmed) = confirmation_counters(metrics).await?;
            if acks == confirmed {
                Ok((acks, confirmed))
            } else {
                Err(format!(
                    "upstream acks {acks}, batches confirmed {confirmed}"
                ))
            }
        },
    )
    .await;
    let acked = broker.acked_batches();
    assert!(
        acks as usize <= acked.len(),
        "the gateway confirmed {acks} batches but the server PUBACKed only {} with success \
         ({acked:?}){}",
        acked.len(),
        context(gw, broker)
    );
    acks
}

/// An agent publishing unique QoS 1 messages one at a time; `acked` holds those the gateway
/// PUBACKed (all of them: the gateway journals whatever the upstream does).
struct Agent {
    id: String,
    topic: String,
    publisher: AckedPublisher,
    next: usize,
    acked: Vec<Msg>,
}

impl Agent {
    async fn connect(gw: &Gateway, id: &str) -> Agent {
        Agent {
            id: id.to_string(),
            topic: format!("agents/{id}/telemetry"),
            publisher: AckedPublisher::connect(id, gw.port).await,
            next: 0,
            acked: Vec::new(),
        }
    }

    async fn publish(&mut self, gw: &Gateway, n: usize) {
        for _ in 0..n {
            let payload = format!("{} #{:03}", self.id, self.next).into_bytes();
            self.next += 1;
            if let Err(e) = self
                .publisher
                .publish(&self.topic, QoS::AtLeastOnce, payload.clone())
                .await
            {
                panic!(
                    "agent {}: {} not PUBACKed by the gateway: {e}\n--- gateway log ---\n{}",
                    self.id,
                    show(&payload),
                    tail(&gw.logs(), 6000)
                );
            }
            self.acked.push((self.id.clone(), payload));
        }
    }
}

/// Waits until every message of `wanted` is in a batch the server PUBACKed with success and
/// the journal holds no record and no batch, checking [`release_problems`] on every round.
/// Returns every PUBLISH received, decoded, for the duplicate checks.
async fn wait_delivered(gw: &Gateway, broker: &ScriptedBroker, wanted: &[Msg]) -> Vec<UpBatch> {
    poll_until(
        "every acknowledged message PUBACKed by the server and the journal empty",
        DELIVERY_TIMEOUT,
        || async {
            let problems = release_problems(gw, broker, wanted).await;
            assert_no_release_problems(&problems, gw, broker);
            let delivered = delivered(broker).await?;
            let missing: Vec<String> = wanted
                .iter()
                .filter(|m| !delivered.contains(*m))
                .map(|(_, p)| show(p))
                .collect();
            let journal = read_journal(&gw.journal)?;
            if missing.is_empty() && journal.records.is_empty() && journal.batches.is_empty() {
                return Ok(up_batches(&decoded(broker).await?));
            }
            Err(format!(
                "{} of {} not delivered (e.g. {:?}); journal: {} records, batches {:?}; server \
                 connections {}, timeline tail:\n{}",
                missing.len(),
                wanted.len(),
                &missing[..missing.len().min(5)],
                journal.records.len(),
                journal.batches.keys().collect::<Vec<_>>(),
                broker.connections().len(),
                tail(&broker.timeline(), 2000)
            ))
        },
    )
    .await
}

fn up_batches(decoded: &[(Received, Arc<Vec<Value>>)]) -> Vec<UpBatch> {
    decoded
        .iter()
        .enumerate()
        .map(|(index, (p, records))| UpBatch {
            index,
            at: 0.0,
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            header: p.header.clone(),
            records: records.clone(),
        })
        .collect()
}

/// Duplicates only as whole re-sent batches (same batchSeq, same bytes; `assert_clean`), each
/// message of `wanted` in exactly one batchSeq and nothing else, no protocol problems.
fn assert_delivered_exactly(
    batches: &[UpBatch],
    wanted: &[Msg],
    gw: &Gateway,
    broker: &ScriptedBroker,
) {
    assert_clean(batches, gw);
    let wrong = exactly_wanted_problems(batches, wanted);
    assert!(
        wrong.is_empty(),
        "records at the server (each batchSeq counted once) are not exactly the {} messages \
         acknowledged to the agent: {wrong:?}{}",
        wanted.len(),
        context(gw, broker)
    );
    assert!(
        broker.problems().is_empty(),
        "protocol problems at the scripted server{}",
        context(gw, broker)
    );
}

fn pkids(publishes: &[Received]) -> Vec<u16> {
    publishes.iter().map(|p| p.pkid).collect()
}

// ---------------------------------------------------------------- a) out-of-order acks

/// Connection 1: the server withholds packets 1, 2, 3 (batches 1-3), acks 2 and 3, and 300 ms
/// later 1, so the batch rumqttc held back on packet id 1 goes out on id 1 right after that
/// PUBACK. That batch (the 4th PUBLISH) is never acknowledged; the 5th is acked at once; the
/// 6th is acked after 200 ms (3.1.1; then the server closes the connection) or refused with
/// 0x87 Not authorized (MQTT 5, which ends the link from the gateway's side); a gateway that
/// ends the link earlier (rather than pair a reused packet id) skips that part. Connection 2
/// withholds everything. Then `kill -9` and the journal must still hold every batch the server
/// did not acknowledge; after a restart against a server that acks everything, every
/// acknowledged message arrives, duplicates only as whole batches.
async fn out_of_order_acks_with_packet_id_reuse(protocol: &str) {
    let v5 = protocol == "5";
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path());
    let broker = ScriptedBroker::start(&pki).await;
    broker.set_policy(|p| match (p.conn, p.index) {
        (1, 4) => Action::Never,
        (1, 5) => Action::Ack,
        _ => Action::Withhold,
    });
    let (mut gw, metrics) = start_scripted_gateway(&pki, &broker, protocol).await;
    let id = if v5 {
        "scripted-reuse-5"
    } else {
        "scripted-reuse-4"
    };
    let mut agent = Agent::connect(&gw, id).await;
    agent.publish(&gw, 8).await;

    let first = broker.wait_publishes(1, 3, STEP_TIMEOUT).await;
    assert_eq!(
        pkids(&first[..3]),
        vec![1, 2, 3],
        "rumqttc numbers the first publishes 1, 2, 3{}",
        context(&gw, &broker)
    );
    broker.ack(1, 2).await.unwrap();
    broker.ack(1, 3).await.unwrap();
    // The script's pause: the gateway requests batch 4, rumqttc assigns it packet id 1, still
    // in flight, and holds it back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.ack(1, 1).await.unwrap();
    // Six PUBLISHes on connection 1, unless the gateway ends the link first: a sink may fail
    // it rather than pair a reused packet id it cannot tell apart (then the batches are
    // re-sent on connection 2, which is just as correct).
    let on_first = poll_until(
        "6 PUBLISHes on connection 1, or its end",
        STEP_TIMEOUT,
        || async {
            let got = broker.publishes_on(1);
            let ended = broker.connections()[0].ended.is_some();
            if got.len() >= 6 || ended {
                Ok(got)
            } else {
                Err(format!(
                    "{} PUBLISHes; timeline:\n{}",
                    got.len(),
                    tail(&broker.timeline(), 3000)
                ))
            }
        },
    )
    .await;
    if let Some(fourth) = on_first.get(3) {
        assert_eq!(
            fourth.pkid,
            1,
            "the publish after packet 1's PUBACK reuses id 1{}",
            context(&gw, &broker)
        );
    }
    if on_first.len() >= 6 {
        // Another pause: more batches are requested; the next one collides with the
        // never-acked packet id of the 4th PUBLISH.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sixth = on_first[5].pkid;
        // The connection may have ended meanwhile (a sink that fails the link instead).
        if v5 {
            let _ = broker.refuse(1, sixth, 0x87).await;
        } else {
            let _ = broker.ack(1, sixth).await;
            let _ = broker.close(1).await;
        }
    } else {
        eprintln!(
            "[{protocol}] the gateway ended connection 1 after {} PUBLISHes",
            on_first.len()
        );
    }
    // The gateway rebuilds the link and re-sends; connection 2 answers nothing, so the sink
    // confirms nothing more from here on.
    broker.wait_publishes(2, 1, STEP_TIMEOUT).await;
    let confirmed = settle_confirmations(&gw, &broker, &metrics).await;
    gw.kill9().await;

    let problems = release_problems(&gw, &broker, &agent.acked).await;
    assert_no_release_problems(&problems, &gw, &broker);
    let journal = read_journal(&gw.journal).unwrap();
    let never_acked: BTreeSet<u64> = broker
        .publishes()
        .iter()
        .map(|p| p.batch_seq)
        .filter(|s| !broker.acked_batches().contains(s))
        .collect();
    if let Some(fourth) = on_first.get(3) {
        assert!(
            never_acked.contains(&fourth.batch_seq),
            "the script never acknowledges the batch carried by the reused packet id{}",
            context(&gw, &broker)
        );
    }
    eprintln!(
        "[{protocol}] phase 1: server acked {:?} on connection 1, never acked {never_acked:?}; \
         gateway confirmed {confirmed}; journal after kill -9 holds batches {:?} and {} records",
        broker.acked_on(1),
        journal.batches.keys().collect::<Vec<_>>(),
        journal.records.len()
    );

    // Restart against a server that acks everything: everything arrives.
    broker.set_policy(|_| Action::Ack);
    gw.restart().await;
    let batches = wait_delivered(&gw, &broker, &agent.acked).await;
    assert_delivered_exactly(&batches, &agent.acked, &gw, &broker);
    eprintln!(
        "[{protocol}] {} PUBLISHes over {} connections, {} distinct batches, all {} messages \
         delivered, journal empty",
        batches.len(),
        broker.connections().len(),
        batches
            .iter()
            .map(|b| b.batch_seq())
            .collect::<BTreeSet<_>>()
            .len(),
        agent.acked.len()
    );
    agent.publisher.disconnect().await;
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_with_packet_id_reuse_never_confirm_an_unacknowledged_batch() {
    out_of_order_acks_with_packet_id_reuse("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_out_of_order_acks_with_packet_id_reuse_never_confirm_an_unacknowledged_batch() {
    out_of_order_acks_with_packet_id_reuse("5").await;
}

// ---------------------------------------------------------------- b) spurious, duplicated PUBACKs

/// Connection 1: one batch outstanding (packet id 1); the server sends a PUBACK for
/// `spurious_pkid`, which is not outstanding and cannot be assigned meanwhile (no other batch
/// exists). Connection 2: the re-sent batch is acked (once the test checked nothing was
/// confirmed), three more are withheld, then the last one's PUBACK is sent twice in one write
/// (its packet id cannot be reassigned in between: rumqttc's next id is another one, and a
/// collision blocks new requests). Connection 3: the first PUBLISH (a batch re-sent alone) is
/// acked twice. Each time the link must fail and the gateway re-send; at every step the
/// journal must hold everything not acknowledged; in the end everything arrives and the
/// journal is empty.
async fn spurious_and_duplicated_pubacks(protocol: &str, spurious_pkid: u16) {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path());
    let broker = ScriptedBroker::start(&pki).await;
    broker.set_policy(|p| match (p.conn, p.index) {
        (1 | 2, _) => Action::Withhold,
        (3, 1) => Action::AckTwice,
        _ => Action::Ack,
    });
    let (gw, metrics) = start_scripted_gateway(&pki, &broker, protocol).await;
    let id = if protocol == "5" {
        "scripted-spurious-5"
    } else {
        "scripted-spurious-4"
    };
    let mut agent = Agent::connect(&gw, id).await;

    // 1. A PUBACK for a packet id that is not outstanding.
    agent.publish(&gw, 1).await;
    let c1 = broker.wait_publishes(1, 1, STEP_TIMEOUT).await;
    broker.pubacks(1, &[(spurious_pkid, 0)]).await.unwrap();
    let c2 = broker.wait_publishes(2, 1, STEP_TIMEOUT).await;
    assert!(
        c2[0].batch_seq == c1[0].batch_seq && c2[0].payload == c1[0].payload,
        "after the spurious PUBACK the gateway did not re-send the unacknowledged batch first, \
         with the same bytes{}",
        context(&gw, &broker)
    );
    let spurious = broker.acks();
    assert!(
        spurious[0].conn == 1 && spurious[0].batch_seq.is_none(),
        "the first PUBACK should have answered nothing: {spurious:?}"
    );
    // The sink has left connection 1 (connection 2 is up), and no success PUBACK answered
    // anything yet: nothing may have been confirmed.
    let (acks, _) = confirmation_counters(&metrics).await.unwrap();
    assert_eq!(
        acks,
        0.0,
        "the gateway confirmed a batch after a PUBACK for a packet id it never used{}",
        context(&gw, &broker)
    );
    let problems = release_problems(&gw, &broker, &agent.acked).await;
    assert_no_release_problems(&problems, &gw, &broker);
    broker.ack(2, c2[0].pkid).await.unwrap();

    // 2. A duplicated PUBACK while three packets are outstanding.
    agent.publish(&gw, 4).await;
    let held = poll_until(
        "three withheld PUBLISHes on connection 2",
        STEP_TIMEOUT,
        || async {
            let held = broker.withheld(2);
            if held.len() >= 3 {
                Ok(held)
            } else {
                Err(format!("withheld {:?}", pkids(&held)))
            }
        },
    )
    .await;
    let last = held.last().unwrap().pkid;
    broker.pubacks(2, &[(last, 0), (last, 0)]).await.unwrap();
    broker.wait_publishes(3, 1, STEP_TIMEOUT).await;
    let problems = release_problems(&gw, &broker, &agent.acked).await;
    assert_no_release_problems(&problems, &gw, &broker);

    // 3. Connection 3 acks its first PUBLISH twice; connection 4 acks everything.
    broker.wait_publishes(4, 1, STEP_TIMEOUT).await;
    let batches = wait_delivered(&gw, &broker, &agent.acked).await;
    assert_delivered_exactly(&batches, &agent.acked, &gw, &broker);
    let dups = broker
        .acks()
        .iter()
        .filter(|a| a.batch_seq.is_none())
        .count();
    assert_eq!(
        dups,
        3,
        "one spurious and two duplicated PUBACKs were scripted{}",
        context(&gw, &broker)
    );
    let ended = poll_until("connections 1-3 to end", STEP_TIMEOUT, || async {
        let conns = broker.connections();
        if conns[..3].iter().all(|c| c.ended.is_some()) {
            Ok(conns)
        } else {
            Err(format!("{conns:?}"))
        }
    })
    .await;
    for c in &ended[..3] {
        assert!(
            c.ended
                .as_deref()
                .is_some_and(|w| w.starts_with("closed by the client")),
            "connection {} should have been dropped by the gateway after an unsolicited \
             PUBACK: {c:?}{}",
            c.number,
            context(&gw, &broker)
        );
    }
    eprintln!(
        "[{protocol}] {} PUBLISHes over {} connections; acked per connection: {:?}",
        batches.len(),
        broker.connections().len(),
        (1..=broker.connections().len())
            .map(|c| broker.acked_on(c))
            .collect::<Vec<_>>()
    );
    agent.publisher.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spurious_and_duplicated_pubacks_fail_the_link_and_confirm_nothing_unacknowledged() {
    spurious_and_duplicated_pubacks("3.1.1", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_spurious_and_duplicated_pubacks_fail_the_link_and_confirm_nothing_unacknowledged() {
    // 7 is beyond rumqttc's packet-id range (1..=maxInflight): never a valid id.
    spurious_and_duplicated_pubacks("5", 7).await;
}

// ---------------------------------------------------------------- c) reverse order, many rounds

/// The server withholds every PUBACK; a driver releases them in reverse arrival order once a
/// full window (3) is withheld, or whatever is withheld after 50 ms without a new PUBLISH,
/// alternately in one write and one by one 2 ms apart (so rumqttc collides on packet ids and
/// sends held-back publishes between PUBACKs). `n` messages; everything must arrive exactly
/// once per batchSeq and the journal end empty.
async fn reverse_order_rounds(protocol: &str, n: usize) {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path());
    let broker = Arc::new(ScriptedBroker::start(&pki).await);
    broker.set_policy(|_| Action::Withhold);
    let (gw, _metrics) = start_scripted_gateway(&pki, &broker, protocol).await;

    let rounds = Arc::new(AtomicUsize::new(0));
    let reversed_rounds = Arc::new(AtomicUsize::new(0));
    let driver = {
        let (broker, rounds, reversed_rounds) =
            (broker.clone(), rounds.clone(), reversed_rounds.clone());
        tokio::spawn(async move {
            loop {
                for conn in broker.open_connections() {
                    let held = broker.withheld(conn);
                    let idle = held
                        .last()
                        .is_some_and(|r| r.at.elapsed() > Duration::from_millis(50));
                    if held.len() < MAX_INFLIGHT as usize && !idle {
                        continue;
                    }
                    let round = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                    if held.len() >= 2 {
                        reversed_rounds.fetch_add(1, Ordering::SeqCst);
                    }
                    let acks: Vec<(u16, u8)> = held.iter().rev().map(|r| (r.pkid, 0)).collect();
                    if round % 2 == 0 {
                        let _ = broker.pubacks(conn, &acks).await;
                    } else {
                        for ack in acks {
                            let _ = broker.pubacks(conn, &[ack]).await;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let id = if protocol == "5" {
        "scripted-reverse-5"
    } else {
        "scripted-reverse-4"
    };
    let payloads = plan(id, "reverse", n);
    if let Err(e) =
        publish_all_acked(gw.port, id, &format!("agents/{id}/telemetry"), &payloads).await
    {
        panic!("agent {id}: {e}{}", context(&gw, &broker));
    }
    let wanted: Vec<Msg> = payloads.into_iter().map(|p| (id.to_string(), p)).collect();
    let batches = wait_delivered(&gw, &broker, &wanted).await;
    driver.abort();
    assert_delivered_exactly(&batches, &wanted, &gw, &broker);
    let reversed = reversed_rounds.load(Ordering::SeqCst);
    eprintln!(
        "[{protocol}] {n} messages, {} PUBLISHes over {} connection(s), {} release rounds ({} of \
         them out of order)",
        batches.len(),
        broker.connections().len(),
        rounds.load(Ordering::SeqCst),
        reversed
    );
    assert!(
        reversed >= n / MAX_INFLIGHT as usize / 4,
        "only {reversed} rounds released two or more PUBACKs out of order: the scenario did not \
         happen{}",
        context(&gw, &broker)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_order_acks_for_full_windows_deliver_everything_and_empty_the_journal() {
    reverse_order_rounds("3.1.1", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_reverse_order_acks_for_full_windows_deliver_everything_and_empty_the_journal() {
    reverse_order_rounds("5", 120).await;
}
