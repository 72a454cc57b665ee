//! Fuzz target `mqtt_packets`: arbitrary bytes through the listener's MQTT codec
//! (`read_connect`, then `read`), for MQTT 3.1.1 and 5, at two packet-size limits.
//!
//! Checks, for every input:
//! - Nothing panics.
//! - Framing: a decoded packet consumes exactly its frame (fixed header plus remaining length);
//!   "need more bytes" consumes nothing. Otherwise a session would lose its place in the stream.
//! - Feeding the bytes one at a time decodes the same packets, and fails at the same packet
//!   with the same error, as feeding them all at once (the socket may split a packet anywhere).
//! - Round trip through the gateway's own encoder where the packet has an outbound twin: a
//!   decoded PUBLISH re-encoded as the gateway's PUBLISH decodes to the same topic, payload, QoS
//!   and packet id; a PUBACK, PUBREC, PUBREL or PUBCOMP to the same packet id; the SUBACK,
//!   UNSUBACK and PINGRESP the gateway would answer with are read back as server-only packets.

#![no_main]

use bytes::BytesMut;
use gatehouse::listener::fuzzing::{
    self, AckReason, ConnectError, ConnectRequest, Inbound, Outbound, Protocol, SubResult,
};
use libfuzzer_sys::fuzz_target;

/// The listener's default `maxPacketSize`, and the smallest the config allows.
const LIMITS: [usize; 2] = [256 * 1024, 64];

fuzz_target!(|data: &[u8]| {
    for max in LIMITS {
        assert_same(
            &as_connection(data, max, Feed::Whole),
            &as_connection(data, max, Feed::ByteByByte),
            "as a connection's first bytes",
        );
        for protocol in [Protocol::V311, Protocol::V5] {
            assert_same(
                &after_connect(protocol, data, max, Feed::Whole),
                &after_connect(protocol, data, max, Feed::ByteByByte),
                "as packets after CONNECT",
            );
        }
    }
});

#[derive(Clone, Copy)]
enum Feed {
    Whole,
    ByteByByte,
}

fn assert_same(whole: &[String], bytewise: &[String], what: &str) {
    assert_eq!(
        whole, bytewise,
        "{what}: fed whole vs byte by byte, the codec decoded different packets"
    );
}

/// Decodes `data` as a session does: CONNECT first, then packets of the version it names.
fn as_connection(data: &[u8], max: usize, feed: Feed) -> Vec<String> {
    let mut events = Vec::new();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let request = loop {
        let before = buf.len();
        let frame = frame_len(&buf);
        match fuzzing::read_connect(&mut buf, max) {
            Ok(Some(request)) => {
                assert_consumed(before, buf.len(), frame, "CONNECT");
                break request;
            }
            Ok(None) => {
                assert_eq!(
                    before,
                    buf.len(),
                    "read_connect consumed bytes, yet wants more"
                );
                if !more(data, &mut fed, &mut buf, feed) {
                    return events;
                }
            }
            Err(e) => {
                events.push(connect_error(&e));
                return events;
            }
        }
    };
    let protocol = request.protocol;
    events.push(connect_summary(&request));
    read_all(protocol, data, fed, buf, max, feed, &mut events);
    events
}

/// Decodes `data` as the packets that follow a CONNECT of `protocol`.
fn after_connect(protocol: Protocol, data: &[u8], max: usize, feed: Feed) -> Vec<String> {
    let mut events = Vec::new();
    read_all(protocol, data, 0, BytesMut::new(), max, feed, &mut events);
    events
}

/// Reads packets until the input runs out or one fails; `data[..fed]` is already in `buf`.
fn read_all(
    protocol: Protocol,
    data: &[u8],
    mut fed: usize,
    mut buf: BytesMut,
    max: usize,
    feed: Feed,
    events: &mut Vec<String>,
) {
    loop {
        let before = buf.len();
        let frame = frame_len(&buf);
        match fuzzing::read(protocol, &mut buf, max) {
            Ok(Some(packet)) => {
                assert_consumed(before, buf.len(), frame, "a packet");
                events.push(summary(&packet));
                round_trip(protocol, &packet);
            }
            Ok(None) => {
                assert_eq!(before, buf.len(), "read consumed bytes, yet wants more");
                if !more(data, &mut fed, &mut buf, feed) {
                    return;
                }
            }
            Err(e) => {
                events.push(format!("error: {e}"));
                return;
            }
        }
    }
}

/// Appends the next bytes of `data` to `buf`: all of them, or one. False when none are left.
fn more(data: &[u8], fed: &mut usize, buf: &mut BytesMut, feed: Feed) -> bool {
    let rest = &data[*fed..];
    if rest.is_empty() {
        return false;
    }
    let n = match feed {
        Feed::Whole => rest.len(),
        Feed::ByteByByte => 1,
    };
    buf.extend_from_slice(&rest[..n]);
    *fed += n;
    true
}

/// The length of the complete frame at the start of `buf`, read independently of the codec:
/// `None` when the fixed header is incomplete or malformed.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(i + 2 + len);
        }
    }
    None
}

fn assert_consumed(before: usize, after: usize, frame: Option<usize>, what: &str) {
    let frame = frame.expect("decoded a packet without a complete fixed header");
    assert_eq!(
        before - after,
        frame,
        "decoding {what} consumed {} bytes of a {frame}-byte frame",
        before - after
    );
}

fn connect_error(e: &ConnectError) -> String {
    format!("connect error: {e}")
}

/// The request, with time-dependent fields (Will expiry) reduced to whether they are set.
fn connect_summary(r: &ConnectRequest) -> String {
    let will = r.will.as_ref().map(|w| {
        format!(
            "{:?} {:?} q{} ct={:?} up={:?} exp={}",
            w.topic,
            w.payload,
            w.qos,
            w.properties.content_type,
            w.properties.user_properties,
            w.properties.expires_at_ms.is_some()
        )
    });
    format!(
        "CONNECT {} {:?} clean={} ka={} will={will:?} user={:?} pass={:?} rm={:?} mps={:?} sei={:?}",
        r.protocol,
        r.client_id,
        r.clean_start,
        r.keep_alive_secs,
        r.username,
        r.password,
        r.receive_maximum,
        r.max_packet_size,
        r.session_expiry_secs
    )
}

/// The packet, with time-dependent fields (message expiry) reduced to whether they are set.
fn summary(packet: &Inbound) -> String {
    match packet {
        Inbound::Publish(p) => format!(
            "PUBLISH {:?} {:?} q{} id{} ct={:?} up={:?} exp={}",
            p.topic,
            p.payload,
            p.qos,
            p.pkid,
            p.properties.content_type,
            p.properties.user_properties,
            p.properties.expires_at_ms.is_some()
        ),
        other => format!("{other:?}"),
    }
}

/// Re-encodes what has an outbound twin with the gateway's encoder and reads it back.
fn round_trip(protocol: Protocol, packet: &Inbound) {
    let (outbound, expected) = match packet {
        Inbound::Publish(p) => (
            Outbound::Publish {
                topic: p.topic.clone(),
                payload: p.payload.clone(),
                qos: p.qos,
                pkid: p.pkid,
            },
            format!(
                "PUBLISH {:?} {:?} q{} id{} ct=None up=[] exp=false",
                p.topic, p.payload, p.qos, p.pkid
            ),
        ),
        Inbound::PubAck(pkid) => (
            Outbound::PubAck {
                pkid: *pkid,
                reason: AckReason::Success,
            },
            summary(&Inbound::PubAck(*pkid)),
        ),
        Inbound::PubRec(pkid) => (
            Outbound::PubRec {
                pkid: *pkid,
                reason: AckReason::Success,
            },
            summary(&Inbound::PubRec(*pkid)),
        ),
        Inbound::PubRel(pkid) => (
            Outbound::PubRel { pkid: *pkid },
            summary(&Inbound::PubRel(*pkid)),
        ),
        Inbound::PubComp(pkid) => (
            Outbound::PubComp { pkid: *pkid },
            summary(&Inbound::PubComp(*pkid)),
        ),
        Inbound::Subscribe { pkid, filters } if !filters.is_empty() => (
            Outbound::SubAck {
                pkid: *pkid,
                granted: filters
                    .iter()
                    .map(|(_, qos)| SubResult::Granted((*qos).min(1)))
                    .collect(),
            },
            summary(&Inbound::Unexpected("SUBACK")),
        ),
        Inbound::Unsubscribe { pkid, filters } if !filters.is_empty() => (
            Outbound::UnsubAck {
                pkid: *pkid,
                count: filters.len(),
            },
            summary(&Inbound::Unexpected("UNSUBACK")),
        ),
        Inbound::PingReq => (
            Outbound::PingResp,
            summary(&Inbound::Unexpected("PINGRESP")),
        ),
        _ => return,
    };
    let mut out = BytesMut::new();
    fuzzing::write(protocol, &outbound, &mut out);
    let written = out.len();
    let back = fuzzing::read(protocol, &mut out, usize::MAX)
        .unwrap_or_else(|e| {
            panic!("{protocol}: the gateway's encoding of {outbound:?} does not decode: {e}")
        })
        .unwrap_or_else(|| {
            panic!("{protocol}: the gateway's encoding of {outbound:?} is incomplete")
        });
    assert_eq!(
        summary(&back),
        expected,
        "{protocol}: {outbound:?} encoded, then decoded, is another packet"
    );
    assert!(
        out.is_empty(),
        "{protocol}: {outbound:?} decoded from {} of its {written} bytes",
        written - out.len()
    );
}
