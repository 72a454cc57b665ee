//! Fuzz target `session`: a byte stream from an agent into a whole agent session, the
//! listener's `serve_mqtt`, over an in-memory `tokio::io::duplex`, with a real SQLite journal.
//!
//! The input is what the agent sends. For inputs of even length its first packet (normally a
//! CONNECT) is written alone and answered before the rest is written, as most agents do; the
//! others are written at once, so packets arrive in the same read as the CONNECT. The agent
//! then waits for as many
//! answers as its packets ask for (at most `SETTLE_BOUND`, or until the gateway closes) and
//! closes its side. Meanwhile everything the gateway sends is read.
//!
//! Checks, for every input:
//! - Nothing panics, in the session or the journal behind it.
//! - Nothing hangs: a complete first packet is answered (or the connection closed) within
//!   `ANSWER_BOUND`, and the whole exchange, session end included, takes at most `END_BOUND`.
//! - What the gateway sends is well-formed MQTT for the connection's version, as a client
//!   (rumqttc's decoder) reads it: whole packets, nothing left over, CONNACK first.
//! - Every answer answers something the agent sent: a PUBACK (PUBREC) names a packet id the
//!   agent published at QoS 1 (2); a PUBREL, PUBCOMP, SUBACK or UNSUBACK answers the agent's
//!   PUBREC, PUBREL, SUBSCRIBE or UNSUBSCRIBE with that packet id (a SUBACK with one code per
//!   filter); there are no more PINGRESPs than PINGREQs, and no PUBLISH (nothing is delivered).
//!
//! One journal serves many inputs (opening SQLite per input would dominate the run); it is
//! replaced by a fresh one every `JOURNAL_INPUTS` inputs so the disk used stays small. Each
//! input gets a fresh session registry.

#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use gatehouse::config::Config;
use gatehouse::listener::fuzzing::{self, ConnectError, Inbound, Protocol};
use gatehouse::listener::{Registry, Settings};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the gateway may take to answer (or refuse) a complete first packet.
const ANSWER_BOUND: Duration = Duration::from_secs(5);
/// How long the agent waits for the answers its packets ask for before it closes its side.
const SETTLE_BOUND: Duration = Duration::from_secs(1);
/// How long the whole exchange may take. Closing alone may wait 5 s (`CLOSE_GRACE`) for
/// pending commits; anything near this bound is a hang.
const END_BOUND: Duration = Duration::from_secs(15);
/// Inputs served by one journal before it is replaced.
const JOURNAL_INPUTS: u32 = 10_000;
/// The listener's `maxPacketSize`: small, so that oversized packets are reachable.
const MAX_PACKET: usize = 4096;

struct Harness {
    runtime: tokio::runtime::Runtime,
    settings: Arc<Settings>,
    journal: Mutex<Journal>,
}

/// A journal in its own temporary directory, and how many inputs it has served.
struct Journal {
    handle: gatehouse::journal::Journal,
    served: u32,
    reader: gatehouse::journal::JournalReader,
    guard: gatehouse::journal::WriterGuard,
    dir: tempfile::TempDir,
}

impl Journal {
    /// Stops the journal's threads (the writer once its last handle is gone, the checkpoint
    /// thread on `join`) and removes its files.
    fn close(self) {
        let Journal {
            handle,
            reader,
            guard,
            dir,
            ..
        } = self;
        drop(handle);
        drop(reader);
        guard.join();
        drop(dir);
    }
}

fn config(dir: &Path) -> Config {
    // synchronous "off": fsyncs would only slow the run; the code paths are the same.
    Config::from_json(&format!(
        r#"{{
            "listeners": [{{"bind": "127.0.0.1:0", "maxPacketSize": {MAX_PACKET}, "maxInflight": 8}}],
            "journal": {{"path": "{}", "synchronous": "off"}}
        }}"#,
        dir.join("journal.db").display()
    ))
    .expect("the fuzz config is valid")
}

/// The directory this process keeps its journals in: `<temp>/gatehouse-fuzz-session-<pid>/`.
/// libFuzzer exits without running destructors, so each process first removes the directories
/// of processes no longer running.
fn journal_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        const PREFIX: &str = "gatehouse-fuzz-session-";
        let temp = std::env::temp_dir();
        for entry in std::fs::read_dir(&temp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let root = temp.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("journal directory");
        root
    })
}

fn open_journal() -> Journal {
    let dir = tempfile::tempdir_in(journal_root()).expect("temporary directory");
    let (handle, reader, guard) =
        gatehouse::journal::open(&config(dir.path()).journal).expect("journal opens");
    Journal {
        handle,
        served: 0,
        reader,
        guard,
        dir,
    }
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let config = config(journal_root());
        let settings = Settings::new(&config.listeners[0], &config, 0).expect("settings");
        Harness {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            settings: Arc::new(settings),
            journal: Mutex::new(open_journal()),
        }
    })
}

fn journal() -> gatehouse::journal::Journal {
    let mut journal = harness().journal.lock().unwrap();
    if journal.served >= JOURNAL_INPUTS {
        // Closing waits for the checkpoint thread's next wake-up (up to 0.5 s): not on the
        // fuzzing thread.
        let old = std::mem::replace(&mut *journal, open_journal());
        std::thread::spawn(move || old.close());
    }
    journal.served += 1;
    journal.handle.clone()
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let journal = journal();
    let (protocol, sent) = agent_sent(data);
    let output = h
        .runtime
        .block_on(run(data, sent.answers, h.settings.clone(), journal));
    check_output(protocol, &sent, &output);
});

/// Serves `data` as one agent's stream; returns what the gateway sent. `expected` is how many
/// packets the agent's stream asks an answer for: the agent's side stays open until that many
/// answers came (or `SETTLE_BOUND` passed, or the gateway closed), so that the answers that wait
/// for journal commits are exercised, not cut short by the end of the stream.
async fn run(
    data: &[u8],
    expected: usize,
    settings: Arc<Settings>,
    journal: gatehouse::journal::Journal,
) -> Vec<u8> {
    let (agent, gateway) = tokio::io::duplex(64 * 1024);
    let (mut from_gateway, mut to_gateway) = tokio::io::split(agent);
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let (_stop, shutdown) = gatehouse::shutdown::channel();
    let session = fuzzing::serve_session(
        gateway,
        peer,
        settings,
        journal,
        Arc::new(Registry::default()),
        shutdown,
    );
    // Complete packets received from the gateway; `usize::MAX` once it closed.
    let (received_tx, mut received) = tokio::sync::watch::channel(0usize);
    let read = async move {
        let mut output = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = from_gateway.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                received_tx.send_replace(usize::MAX);
                return output;
            }
            output.extend_from_slice(&chunk[..n]);
            received_tx.send_replace(complete_packets(&output));
        }
    };
    let write = async move {
        // Inputs of even length send the first packet alone, answered before the rest follows,
        // as most agents do; the others send everything at once (packets in the CONNECT's read).
        let first = first_frame(data).filter(|&n| n <= data.len());
        match first {
            Some(_) if data.len() % 2 == 1 => {
                let _ = to_gateway.write_all(data).await;
                let settled = received.wait_for(|&n| n > expected);
                let _ = tokio::time::timeout(SETTLE_BOUND, settled).await;
            }
            Some(n) => {
                let _ = to_gateway.write_all(&data[..n]).await;
                let answered = received.wait_for(|&n| n > 0);
                if tokio::time::timeout(ANSWER_BOUND, answered).await.is_err() {
                    panic!("a complete first packet got no answer within {ANSWER_BOUND:?}");
                }
                let _ = to_gateway.write_all(&data[n..]).await;
                // The CONNACK, then one answer per packet that asks for one.
                let settled = received.wait_for(|&n| n > expected);
                let _ = tokio::time::timeout(SETTLE_BOUND, settled).await;
            }
            // Not even a first packet: the gateway still waits for its CONNECT.
            None => {
                let _ = to_gateway.write_all(data).await;
            }
        }
        let _ = to_gateway.shutdown().await;
    };
    let all = async {
        let (_, output, ()) = tokio::join!(session, read, write);
        output
    };
    match tokio::time::timeout(END_BOUND, all).await {
        Ok(output) => output,
        Err(_) => panic!("the session did not end within {END_BOUND:?}"),
    }
}

/// How many complete packets `output` holds, by their fixed headers.
fn complete_packets(output: &[u8]) -> usize {
    let mut count = 0;
    let mut at = 0;
    while let Some(len) = first_frame(&output[at..]) {
        if at + len > output.len() {
            break;
        }
        at += len;
        count += 1;
    }
    count
}

/// The length of the first frame by its fixed header, if the header is complete and valid.
fn first_frame(data: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, byte) in data.iter().skip(1).take(4).enumerate() {
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(i + 2 + len);
        }
    }
    None
}

/// What the agent asked for, by kind and packet id.
#[derive(Default)]
struct Sent {
    publish_qos1: HashSet<u16>,
    publish_qos2: HashSet<u16>,
    pubrec: HashSet<u16>,
    pubrel: HashSet<u16>,
    /// Packet id to the filter counts of SUBSCRIBEs with it.
    subscribe: HashMap<u16, Vec<usize>>,
    unsubscribe: HashSet<u16>,
    pingreq: usize,
    /// Packets that ask the gateway for an answer, up to the first that ends the session.
    answers: usize,
}

/// Decodes the agent's stream as the gateway does: the protocol its CONNECT names (3.1.1 for a
/// refused one), and every packet after it that decodes.
fn agent_sent(data: &[u8]) -> (Protocol, Sent) {
    let mut buf = BytesMut::from(data);
    let protocol = match fuzzing::read_connect(&mut buf, MAX_PACKET) {
        Ok(Some(request)) => request.protocol,
        Err(ConnectError::Malformed(protocol, _)) => return (protocol, Sent::default()),
        _ => return (Protocol::V311, Sent::default()),
    };
    let mut sent = Sent::default();
    while let Ok(Some(packet)) = fuzzing::read(protocol, &mut buf, MAX_PACKET) {
        sent.answers += 1;
        match packet {
            Inbound::Publish(p) if p.qos == 1 => {
                sent.publish_qos1.insert(p.pkid);
            }
            Inbound::Publish(p) if p.qos == 2 => {
                sent.publish_qos2.insert(p.pkid);
            }
            Inbound::PubRec(pkid) => {
                sent.pubrec.insert(pkid);
            }
            Inbound::PubRel(pkid) => {
                sent.pubrel.insert(pkid);
            }
            Inbound::Subscribe { pkid, filters } => {
                sent.subscribe.entry(pkid).or_default().push(filters.len());
            }
            Inbound::Unsubscribe { pkid, .. } => {
                sent.unsubscribe.insert(pkid);
            }
            Inbound::PingReq => sent.pingreq += 1,
            // The session ends here: nothing after it is read.
            Inbound::Disconnect { .. } | Inbound::Unexpected(_) => {
                sent.answers -= 1;
                break;
            }
            Inbound::Publish(_) | Inbound::PubAck(_) | Inbound::PubComp(_) => sent.answers -= 1,
        }
    }
    (protocol, sent)
}

/// One packet the gateway sent, reduced to what `check_output` compares.
#[derive(Debug)]
enum Answer {
    ConnAck,
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    SubAck(u16, usize),
    UnsubAck(u16),
    PingResp,
    Disconnect,
    Other(String),
}

fn check_output(protocol: Protocol, sent: &Sent, output: &[u8]) {
    let mut buf = BytesMut::from(output);
    let mut answers = Vec::new();
    while !buf.is_empty() {
        let at = output.len() - buf.len();
        let answer = match protocol {
            Protocol::V311 => v4::Packet::read(&mut buf, usize::MAX)
                .map(|p| match p {
                    v4::Packet::ConnAck(_) => Answer::ConnAck,
                    v4::Packet::PubAck(p) => Answer::PubAck(p.pkid),
                    v4::Packet::PubRec(p) => Answer::PubRec(p.pkid),
                    v4::Packet::PubRel(p) => Answer::PubRel(p.pkid),
                    v4::Packet::PubComp(p) => Answer::PubComp(p.pkid),
                    v4::Packet::SubAck(s) => Answer::SubAck(s.pkid, s.return_codes.len()),
                    v4::Packet::UnsubAck(u) => Answer::UnsubAck(u.pkid),
                    v4::Packet::PingResp => Answer::PingResp,
                    v4::Packet::Disconnect => Answer::Disconnect,
                    other => Answer::Other(format!("{other:?}")),
                })
                .map_err(|e| format!("{e:?}")),
            Protocol::V5 => v5::Packet::read(&mut buf, None)
                .map(|p| match p {
                    v5::Packet::ConnAck(_) => Answer::ConnAck,
                    v5::Packet::PubAck(p) => Answer::PubAck(p.pkid),
                    v5::Packet::PubRec(p) => Answer::PubRec(p.pkid),
                    v5::Packet::PubRel(p) => Answer::PubRel(p.pkid),
                    v5::Packet::PubComp(p) => Answer::PubComp(p.pkid),
                    v5::Packet::SubAck(s) => Answer::SubAck(s.pkid, s.return_codes.len()),
                    v5::Packet::UnsubAck(u) => Answer::UnsubAck(u.pkid),
                    v5::Packet::PingResp(_) => Answer::PingResp,
                    v5::Packet::Disconnect(_) => Answer::Disconnect,
                    other => Answer::Other(format!("{other:?}")),
                })
                .map_err(|e| format!("{e:?}")),
        }
        .unwrap_or_else(|e| {
            panic!(
                "{protocol}: the gateway sent a packet a client cannot read at byte {at}: {e} \
                 (output: {output:02x?})"
            )
        });
        if let Answer::Other(packet) = &answer {
            panic!("{protocol}: the gateway sent a packet only a client sends: {packet}");
        }
        answers.push(answer);
    }
    if let Some(first) = answers.first() {
        assert!(
            matches!(first, Answer::ConnAck),
            "{protocol}: the gateway's first packet is {first:?}, not CONNACK"
        );
    }
    let mut pingresps = 0;
    for answer in answers.iter().skip(1) {
        let justified = match answer {
            Answer::PubAck(pkid) => sent.publish_qos1.contains(pkid),
            Answer::PubRec(pkid) => sent.publish_qos2.contains(pkid),
            Answer::PubRel(pkid) => sent.pubrec.contains(pkid),
            Answer::PubComp(pkid) => sent.pubrel.contains(pkid),
            Answer::SubAck(pkid, codes) => sent
                .subscribe
                .get(pkid)
                .is_some_and(|counts| counts.contains(codes)),
            Answer::UnsubAck(pkid) => sent.unsubscribe.contains(pkid),
            Answer::PingResp => {
                pingresps += 1;
                pingresps <= sent.pingreq
            }
            Answer::Disconnect => protocol == Protocol::V5,
            Answer::ConnAck => false,
            Answer::Other(_) => unreachable!("refused above"),
        };
        assert!(
            justified,
            "{protocol}: the gateway sent {answer:?}, which answers nothing the agent sent \
             (answers: {answers:?})"
        );
    }
}
