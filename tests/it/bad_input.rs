//! Hostile/broken input over raw TCP with hand-built MQTT bytes: garbage, PUBLISH before
//! CONNECT, a second CONNECT, an invalid UTF-8 topic, wildcards in a PUBLISH topic, a packet
//! over the listener's maxPacketSize. Each offending connection must be closed promptly
//! (MQTT 5: after a DISCONNECT with the spec's reason code; 3.1.1: just closed), its bad
//! message never journaled or acknowledged, a message PUBACKed before the bad packet on the
//! same connection kept, and a well-behaved rumqttc agent publishing throughout undisturbed.
//! Also CONNACK refusals: unsupported protocol level (3.1.1 return code 1) and an empty client
//! id without clean session (return code 2).

use std::collections::HashSet;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::support::{
    BackgroundAgent, Gateway, OUTBOX_TIMEOUT, mqtt_packet, mqtt_string, payload_bytes, split_packet,
};

/// How long a bad connection may stay open before we call it "not disconnected".
const CLOSE_TIMEOUT: Duration = Duration::from_secs(6);
const MAX_PACKET: usize = 4096;

// ---------------------------------------------------------------- packet building

/// CONNECT with explicit protocol name/level; `v5_props` adds the (empty) property length.
fn connect_raw(name: &[u8], level: u8, clean: bool, client_id: &[u8], v5_props: bool) -> Vec<u8> {
    let mut body = mqtt_string(name);
    body.push(level);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if v5_props {
        body.push(0);
    }
    body.extend(mqtt_string(client_id));
    mqtt_packet(0x10, &body)
}

fn connect(v: u8, client_id: &str) -> Vec<u8> {
    connect_raw(b"MQTT", v, true, client_id.as_bytes(), v == 5)
}

/// PUBLISH with raw topic bytes (so invalid UTF-8 and wildcards can be sent).
fn publish(v: u8, topic: &[u8], qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = mqtt_string(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    mqtt_packet(0x30 | (qos << 1), &body)
}

// ---------------------------------------------------------------- raw connection

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// Every byte received from the gateway, for failure messages.
    wire: Vec<u8>,
}

enum Got {
    Packet(u8, Vec<u8>),
    Closed,
    /// Closed with these trailing bytes that do not form a complete packet.
    ClosedMidPacket(Vec<u8>),
    StillOpen,
}

fn describe(first: u8, body: &[u8]) -> String {
    let name = match first >> 4 {
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        _ => "packet",
    };
    format!("{name}(0x{first:02x}) {body:02x?}")
}

fn describe_all(p: &[(u8, Vec<u8>)]) -> String {
    if p.is_empty() {
        return "nothing".into();
    }
    p.iter()
        .map(|(f, b)| describe(*f, b))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Raw {
    async fn open(port: u16) -> Result<Raw, String> {
        let s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).ok();
        Ok(Raw {
            s,
            buf: Vec::new(),
            wire: Vec::new(),
        })
    }

    /// Write; a write error just means the gateway already closed on us.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes).await;
    }

    async fn read(&mut self, timeout: Duration) -> Result<Got, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((first, body, used)) = split_packet(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Got::Packet(first, body));
            }
            let mut tmp = [0u8; 4096];
            match tokio::time::timeout_at(deadline.into(), self.s.read(&mut tmp)).await {
                Err(_) => return Ok(Got::StillOpen),
                Ok(Ok(0)) if self.buf.is_empty() => return Ok(Got::Closed),
                Ok(Ok(0)) => return Ok(Got::ClosedMidPacket(std::mem::take(&mut self.buf))),
                Ok(Ok(n)) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    self.wire.extend_from_slice(&tmp[..n]);
                }
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(Got::Closed);
                }
                Ok(Err(e)) => return Err(format!("read error: {e}")),
            }
        }
    }

    /// Read packets until EOF; Err if still open after CLOSE_TIMEOUT. Also returns any
    /// trailing bytes that did not form a complete packet (a framing error).
    async fn until_closed(&mut self) -> Result<(Vec<(u8, Vec<u8>)>, Vec<u8>), String> {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let mut got = Vec::new();
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await?
            {
                Got::Packet(f, b) => got.push((f, b)),
                Got::Closed => return Ok((got, Vec::new())),
                Got::ClosedMidPacket(stray) => return Ok((got, stray)),
                Got::StillOpen => {
                    return Err(format!(
                        "connection still open {CLOSE_TIMEOUT:?} after the bad packet (received: {})",
                        describe_all(&got)
                    ));
                }
            }
        }
    }

    async fn expect_packet(&mut self, what: &str) -> Result<(u8, Vec<u8>), String> {
        match self.read(Duration::from_secs(10)).await? {
            Got::Packet(f, b) => Ok((f, b)),
            Got::Closed | Got::ClosedMidPacket(_) => {
                Err(format!("closed while waiting for {what}"))
            }
            Got::StillOpen => Err(format!("no {what} within 10 s")),
        }
    }

    /// Open, CONNECT (protocol level `v`), and require a successful CONNACK.
    async fn session(port: u16, v: u8, client_id: &str) -> Result<Raw, String> {
        let mut r = Raw::open(port).await?;
        r.send(&connect(v, client_id)).await;
        let (f, b) = r.expect_packet("CONNACK").await?;
        if f != 0x20 || b.len() < 2 || b[1] != 0 {
            return Err(format!(
                "expected successful CONNACK, got {}",
                describe(f, &b)
            ));
        }
        if v == 5 && !has_max_packet_size(&b, MAX_PACKET as u32) {
            eprintln!(
                "note: MQTT 5 CONNACK does not advertise Maximum Packet Size {MAX_PACKET}: {}",
                describe(f, &b)
            );
        }
        Ok(r)
    }

    /// QoS 1 PUBLISH and require its PUBACK (success reason for MQTT 5).
    async fn publish_acked(&mut self, v: u8, topic: &str, payload: &[u8]) -> Result<(), String> {
        self.send(&publish(v, topic.as_bytes(), 1, 7, payload))
            .await;
        let (f, b) = self.expect_packet("PUBACK").await?;
        let ok = f == 0x40 && b.len() >= 2 && b[..2] == [0, 7] && (b.len() == 2 || b[2] < 0x80);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "expected PUBACK for pkid 7, got {}",
                describe(f, &b)
            ))
        }
    }
}

/// Does an MQTT 5 CONNACK body carry Maximum Packet Size (0x27) == `want`?
fn has_max_packet_size(body: &[u8], want: u32) -> bool {
    let Some(Some((_, props, _))) = split_packet(&[&[0u8][..], &body[2..]].concat()).ok() else {
        return false;
    };
    let mut i = 0;
    while i < props.len() {
        let id = props[i];
        i += 1;
        let n = match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x13 | 0x21 | 0x22 => 2,
            0x11 | 0x27 => 4,
            0x12 | 0x1a | 0x1c | 0x1f | 0x15 => {
                if i + 2 > props.len() {
                    return false;
                }
                2 + u16::from_be_bytes([props[i], props[i + 1]]) as usize
            }
            0x26 => {
                // user property: two strings
                let mut j = i;
                for _ in 0..2 {
                    if j + 2 > props.len() {
                        return false;
                    }
                    j += 2 + u16::from_be_bytes([props[j], props[j + 1]]) as usize;
                }
                j - i
            }
            _ => return false,
        };
        if id == 0x27 && i + 4 <= props.len() {
            return u32::from_be_bytes(props[i..i + 4].try_into().unwrap()) == want;
        }
        i += n;
    }
    false
}

// ---------------------------------------------------------------- expectations

/// What must come back after the bad packet.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// 3.1.1 (or no protocol yet): connection closed, no acknowledgement of the bad message.
    Closed,
    /// MQTT 5: DISCONNECT with one of these reason codes, then closed.
    Disconnect(&'static [u8]),
}

fn check_close(expect: Expect, got: &[(u8, Vec<u8>)]) -> Result<(), String> {
    if let Some((f, b)) = got.iter().find(|(f, _)| matches!(f >> 4, 2 | 4 | 5)) {
        return Err(format!(
            "the bad packet was answered with {} before the close (all: {})",
            describe(*f, b),
            describe_all(got)
        ));
    }
    match expect {
        Expect::Closed => Ok(()),
        Expect::Disconnect(codes) => {
            let disc = got.iter().find(|(f, _)| *f == 0xE0);
            match disc {
                Some((_, b)) => {
                    let code = b.first().copied().unwrap_or(0);
                    if codes.contains(&code) {
                        Ok(())
                    } else {
                        Err(format!(
                            "DISCONNECT reason 0x{code:02x}, expected {}",
                            show_codes(codes)
                        ))
                    }
                }
                None => Err(format!(
                    "closed without a DISCONNECT (expected reason {}); received: {}",
                    show_codes(codes),
                    describe_all(got)
                )),
            }
        }
    }
}

fn show_codes(c: &[u8]) -> String {
    c.iter()
        .map(|c| format!("0x{c:02x}"))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// One bad-input scenario: optional CONNECT (protocol level), optional good acked message
/// first, then the bad bytes, then the expectation.
#[derive(Clone)]
struct Case {
    name: &'static str,
    connect_as: Option<u8>,
    acked_first: Option<Vec<u8>>,
    bad: Vec<u8>,
    expect: Expect,
}

async fn run_case(port: u16, c: Case) -> Result<(), String> {
    let client = format!("bad-{}", c.name.replace(' ', "-"));
    let mut r = match c.connect_as {
        Some(v) => Raw::session(port, v, &client).await?,
        None => Raw::open(port).await?,
    };
    if let Some(p) = &c.acked_first {
        let v = c.connect_as.expect("acked_first needs a session");
        r.publish_acked(v, &format!("agents/{client}/ok"), p)
            .await?;
    }
    let mark = r.wire.len();
    r.send(&c.bad).await;
    let (got, stray) = r.until_closed().await?;
    let verdict = check_close(c.expect, &got);
    if stray.is_empty() {
        return verdict;
    }
    Err(format!(
        "framing error: after {} the gateway sent {} byte(s) {stray:02x?} that do not form a \
         packet, then closed (bytes on the wire after the bad packet: {:02x?}); reason check: {}",
        describe_all(&got),
        stray.len(),
        &r.wire[mark..],
        match verdict {
            Ok(()) => "ok".to_string(),
            Err(e) => e,
        }
    ))
}

/// Start a gateway (small maxPacketSize) with a good background agent, run all cases
/// concurrently, then check: every case passed, the good agent never failed or
/// disconnected and all its messages are in the outbox, the `acked_first` messages are in
/// the outbox, and no bad payload ("bad:" prefix) was journaled.
async fn run_suite(cases: Vec<Case>) {
    let mut gw = Gateway::start_with(|c| {
        c["listeners"][0]["maxPacketSize"] = json!(MAX_PACKET);
    })
    .await;
    let good = BackgroundAgent::start(gw.port, "good-agent").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut set = JoinSet::new();
    for c in cases.iter().cloned() {
        let port = gw.port;
        set.spawn(async move { (c.name, run_case(port, c).await) });
    }
    let mut failures = Vec::new();
    while let Some(res) = set.join_next().await {
        let (name, r) = res.expect("case panicked");
        if let Err(e) = r {
            failures.push(format!("{name}: {e}"));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.assert_alive();
    let report = good.finish().await;

    let mut wanted = report.acked.clone();
    wanted.extend(cases.iter().filter_map(|c| c.acked_first.clone()));
    let recs = gw.wait_for_payloads(&wanted, OUTBOX_TIMEOUT).await;
    let leaked: HashSet<String> = recs
        .iter()
        .map(payload_bytes)
        .filter(|p| p.starts_with(b"bad:"))
        .map(|p| String::from_utf8_lossy(&p[..p.len().min(60)]).into_owned())
        .collect();

    failures.sort();
    assert!(
        failures.is_empty(),
        "{} bad-input case(s) failed:\n  {}\n--- gateway output (tail) ---\n{}",
        failures.len(),
        failures.join("\n  "),
        tail(&gw.logs(), 40)
    );
    assert!(
        report.failures.is_empty() && report.connection_errors == 0,
        "good agent was disturbed: {} failures {:?}, {} connection errors",
        report.failures.len(),
        &report.failures[..report.failures.len().min(5)],
        report.connection_errors
    );
    assert!(
        report.acked.len() >= 5,
        "good agent made too little progress"
    );
    assert!(
        leaked.is_empty(),
        "rejected messages were journaled: {leaked:?}"
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn oversize(v: u8) -> Vec<u8> {
    let mut payload = b"bad: oversize ".to_vec();
    payload.resize(10 * 1024, b'x');
    publish(v, b"agents/big/telemetry", 1, 9, &payload)
}

/// Bytes that cannot start any valid packet: reserved packet type 0, then junk.
const GARBAGE: &[u8] = b"\x00\x00\xde\xad\xbe\xef garbage \xff\xff\xff\xff\xff";

fn shared_cases(v: u8, expect: impl Fn(&'static [u8]) -> Expect) -> Vec<Case> {
    let case = |name, acked_first: Option<&str>, bad: Vec<u8>, e: Expect| Case {
        name,
        connect_as: Some(v),
        acked_first: acked_first.map(|s| format!("{s} v{v}").into_bytes()),
        bad,
        expect: e,
    };
    vec![
        case(
            "garbage after acked message",
            Some("acked before garbage"),
            GARBAGE.to_vec(),
            expect(&[0x81, 0x82]),
        ),
        case(
            "malformed: topic length beyond packet",
            Some("acked before malformed publish"),
            mqtt_packet(0x32, b"\x00\x40agents/x\x00\x01bad: short"),
            expect(&[0x81]),
        ),
        case(
            "malformed: PUBLISH with QoS 3",
            None,
            {
                let mut p = publish(v, b"agents/q3/telemetry", 2, 3, b"bad: qos3");
                p[0] |= 0x06;
                p
            },
            expect(&[0x81]),
        ),
        case(
            "malformed: 5-byte remaining length",
            None,
            b"\x30\xff\xff\xff\xff\x7f".to_vec(),
            expect(&[0x81]),
        ),
        case(
            "second CONNECT",
            Some("acked before second connect"),
            connect(v, "bad-second-connect-again"),
            expect(&[0x82]),
        ),
        case(
            "invalid UTF-8 topic",
            None,
            publish(
                v,
                b"agents/\xff\xfe/telemetry",
                1,
                4,
                b"bad: invalid utf8 topic",
            ),
            expect(&[0x81]),
        ),
        case(
            "wildcard + in PUBLISH topic",
            None,
            publish(v, b"agents/+/telemetry", 1, 5, b"bad: wildcard plus"),
            expect(&[0x90]),
        ),
        case(
            "wildcard # in PUBLISH topic",
            None,
            publish(v, b"agents/#", 1, 6, b"bad: wildcard hash"),
            expect(&[0x90]),
        ),
        case(
            "oversize PUBLISH (10 KB > maxPacketSize 4096)",
            Some("acked before oversize"),
            oversize(v),
            expect(&[0x95]),
        ),
    ]
}

/// Cases before any CONNECT: no protocol version is known, so the gateway can only close.
fn pre_connect_cases() -> Vec<Case> {
    let case = |name, bad| Case {
        name,
        connect_as: None,
        acked_first: None,
        bad,
        expect: Expect::Closed,
    };
    vec![
        case("garbage before CONNECT", GARBAGE.to_vec()),
        case(
            "PUBLISH before CONNECT (3.1.1 layout)",
            publish(
                4,
                b"agents/early/telemetry",
                1,
                1,
                b"bad: publish before connect 4",
            ),
        ),
        case(
            "PUBLISH before CONNECT (5 layout)",
            publish(
                5,
                b"agents/early/telemetry",
                1,
                1,
                b"bad: publish before connect 5",
            ),
        ),
        case("oversize CONNECT-less packet", oversize(4)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_mqtt311_is_disconnected() {
    let mut cases = shared_cases(4, |_| Expect::Closed);
    cases.extend(pre_connect_cases());
    run_suite(cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_mqtt5_gets_disconnect_reason_codes() {
    run_suite(shared_cases(5, Expect::Disconnect)).await;
}

/// Open, send one CONNECT, return (packets received, closed?).
async fn connack_exchange(port: u16, bytes: &[u8]) -> Result<(Vec<(u8, Vec<u8>)>, bool), String> {
    let mut r = Raw::open(port).await?;
    r.send(bytes).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    loop {
        match r
            .read(deadline.saturating_duration_since(Instant::now()))
            .await?
        {
            Got::Packet(f, b) => got.push((f, b)),
            Got::Closed => return Ok((got, true)),
            Got::ClosedMidPacket(stray) => {
                return Err(format!(
                    "after {} the gateway sent stray bytes {stray:02x?} (wire: {:02x?})",
                    describe_all(&got),
                    r.wire
                ));
            }
            Got::StillOpen => return Ok((got, false)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_refusals() {
    let mut gw = Gateway::start().await;
    let good = BackgroundAgent::start(gw.port, "good-agent-connack").await;
    let port = gw.port;
    let mut failures = Vec::new();

    // (name, CONNECT bytes, acceptable first packets, must close)
    type Check = (&'static str, Vec<u8>, Vec<Vec<u8>>, bool);
    let checks: Vec<Check> = vec![
        (
            "MQTT 3.1 (MQIsdp, level 3) -> return code 1",
            connect_raw(b"MQIsdp", 3, true, b"bad-level-3", false),
            vec![vec![0x20, 0x02, 0x00, 0x01]],
            true,
        ),
        (
            "protocol level 6 -> return code 1 (or MQTT 5 reason 0x84)",
            connect_raw(b"MQTT", 6, true, b"bad-level-6", false),
            vec![
                vec![0x20, 0x02, 0x00, 0x01],
                vec![0x20, 0x03, 0x00, 0x84, 0x00],
            ],
            true,
        ),
        (
            "3.1.1 empty client id with clean session 0 -> return code 2",
            connect_raw(b"MQTT", 4, false, b"", false),
            vec![vec![0x20, 0x02, 0x00, 0x02]],
            true,
        ),
        (
            "3.1.1 empty client id with clean session 1 -> accepted",
            connect_raw(b"MQTT", 4, true, b"", false),
            vec![vec![0x20, 0x02, 0x00, 0x00]],
            false,
        ),
    ];
    let mut set = JoinSet::new();
    for (name, bytes, ok, must_close) in checks {
        set.spawn(async move {
            let r = connack_exchange(port, &bytes)
                .await
                .and_then(|(got, closed)| {
                    let first = got.first().map(|(f, b)| mqtt_packet(*f, b));
                    if first.as_ref().is_none_or(|p| !ok.contains(p)) {
                        return Err(format!(
                            "expected CONNACK {}, received {} (closed: {closed})",
                            ok.iter()
                                .map(|p| format!("{p:02x?}"))
                                .collect::<Vec<_>>()
                                .join(" or "),
                            describe_all(&got)
                        ));
                    }
                    if must_close && !closed {
                        return Err(format!(
                            "connection not closed within {CLOSE_TIMEOUT:?} after the refusal"
                        ));
                    }
                    if !must_close && closed {
                        return Err("accepted connection was closed".into());
                    }
                    Ok(())
                });
            (name, r)
        });
    }
    while let Some(res) = set.join_next().await {
        let (name, r) = res.expect("check panicked");
        if let Err(e) = r {
            failures.push(format!("{name}: {e}"));
        }
    }
    gw.assert_alive();
    let report = good.finish().await;
    gw.wait_for_payloads(&report.acked, OUTBOX_TIMEOUT).await;
    failures.sort();
    assert!(
        failures.is_empty(),
        "CONNACK check(s) failed:\n  {}",
        failures.join("\n  ")
    );
    assert!(
        report.failures.is_empty() && report.connection_errors == 0,
        "good agent was disturbed: {:?}, {} connection errors",
        report.failures,
        report.connection_errors
    );
}
