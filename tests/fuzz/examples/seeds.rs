//! Writes the fuzz targets' seed corpus: `tests/fuzz/corpus/<target>/` (docs/FUZZING.md).
//!
//! `cargo run --manifest-path tests/fuzz/Cargo.toml --example seeds [-- DIR]` (DIR defaults to
//! `tests/fuzz/corpus`). The output is deterministic, so re-running it changes no committed
//! file unless this generator or the encoders changed.
//!
//! - `mqtt_packets`: one valid packet per file for MQTT 3.1.1 and 5, each kind an agent sends
//!   (encoded with rumqttc's encoders, the codec the listener reads with), plus whole sessions.
//! - `session`: whole agent streams, CONNECT first: accepted and refused messages, QoS 0/1/2,
//!   subscriptions, a Will, a persistent session, protocol errors.
//! - `envelope_decode`: real batches sealed by the gateway's own encoder (`envelope::pack` and
//!   `envelope::fragments`), every codec, whole records and fragments.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use gatehouse::envelope::{self, BatchIdentity, Codec};
use gatehouse::record::{JournaledRecord, Record, RecordProperties};
use rumqttc::mqttbytes::{QoS as Q4, v4};
use rumqttc::v5::mqttbytes::{QoS as Q5, v5};

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tests/fuzz/corpus"));
    let packets = root.join("mqtt_packets");
    for (name, bytes) in v311_packets().into_iter().chain(v5_packets()) {
        write(&packets, name, &bytes);
    }
    let sessions = root.join("session");
    for (name, bytes) in sessions_() {
        write(&sessions, name, &bytes);
        if name.ends_with("full") {
            write(&packets, &format!("session-{name}"), &bytes);
        }
    }
    let envelopes = root.join("envelope_decode");
    for (name, bytes) in batches() {
        write(&envelopes, &name, &bytes);
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn v4(packet: v4::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.write(&mut out, usize::MAX).expect("encodes");
    out.to_vec()
}

fn v5(packet: v5::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.write(&mut out, None).expect("encodes");
    out.to_vec()
}

fn connect_v4(client_id: &str, clean: bool, will: bool) -> Vec<u8> {
    let mut c = v4::Connect::new(client_id);
    c.keep_alive = 30;
    c.clean_session = clean;
    if will {
        c.last_will = Some(v4::LastWill::new(
            format!("agents/{client_id}/status"),
            "offline",
            Q4::AtLeastOnce,
            false,
        ));
        c.login = Some(v4::Login::new("operator", "secret"));
    }
    v4(v4::Packet::Connect(c))
}

fn publish_v4(topic: &str, qos: Q4, pkid: u16, payload: &str) -> Vec<u8> {
    let mut p = v4::Publish::new(topic, qos, payload);
    p.pkid = pkid;
    v4(v4::Packet::Publish(p))
}

fn v311_packets() -> Vec<(&'static str, Vec<u8>)> {
    let topic = "agents/agent-1/events";
    vec![
        ("v311-connect", connect_v4("agent-1", true, false)),
        (
            "v311-connect-will-login",
            connect_v4("agent-1", false, true),
        ),
        (
            "v311-publish-qos0",
            publish_v4(topic, Q4::AtMostOnce, 0, r#"{"event":"login"}"#),
        ),
        (
            "v311-publish-qos1",
            publish_v4(topic, Q4::AtLeastOnce, 1, r#"{"event":"exec"}"#),
        ),
        (
            "v311-publish-qos2",
            publish_v4(topic, Q4::ExactlyOnce, 2, r#"{"event":"file"}"#),
        ),
        ("v311-puback", v4(v4::Packet::PubAck(v4::PubAck::new(1)))),
        ("v311-pubrec", v4(v4::Packet::PubRec(v4::PubRec::new(2)))),
        ("v311-pubrel", v4(v4::Packet::PubRel(v4::PubRel::new(2)))),
        ("v311-pubcomp", v4(v4::Packet::PubComp(v4::PubComp::new(3)))),
        (
            "v311-subscribe",
            v4(v4::Packet::Subscribe(v4::Subscribe::new_many([
                v4::SubscribeFilter::new("agents/agent-1/commands/#".into(), Q4::AtLeastOnce),
                v4::SubscribeFilter::new("agents/agent-1/+/config".into(), Q4::ExactlyOnce),
            ]))),
        ),
        (
            "v311-unsubscribe",
            v4(v4::Packet::Unsubscribe(v4::Unsubscribe::new(
                "agents/agent-1/commands/#",
            ))),
        ),
        ("v311-pingreq", v4(v4::Packet::PingReq)),
        ("v311-disconnect", v4(v4::Packet::Disconnect)),
    ]
}

fn connect_v5(client_id: &str, will: bool) -> Vec<u8> {
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: client_id.into(),
        clean_start: !will,
        properties: Some(v5::ConnectProperties {
            session_expiry_interval: will.then_some(600),
            receive_maximum: Some(16),
            max_packet_size: Some(65_536),
            user_properties: vec![("agent-version".into(), "7.1".into())],
            ..v5::ConnectProperties::new()
        }),
    };
    let last_will = will.then(|| {
        v5::LastWill::new(
            format!("agents/{client_id}/status"),
            "offline",
            Q5::AtLeastOnce,
            false,
            Some(v5::LastWillProperties {
                delay_interval: None,
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(3_600),
                content_type: Some("text/plain".into()),
                response_topic: None,
                correlation_data: None,
                user_properties: vec![("reason".into(), "lost".into())],
            }),
        )
    });
    let login = will.then(|| v5::Login::new("operator", "secret"));
    v5(v5::Packet::Connect(connect, last_will, login))
}

fn publish_v5(topic: &str, qos: Q5, pkid: u16, payload: &str, props: bool) -> Vec<u8> {
    let properties = props.then(|| v5::PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(86_400),
        content_type: Some("application/json".into()),
        user_properties: vec![("schema".into(), "ecs-8".into())],
        ..Default::default()
    });
    let mut p = v5::Publish::new(topic, qos, payload.to_string(), properties);
    p.pkid = pkid;
    v5(v5::Packet::Publish(p))
}

fn v5_packets() -> Vec<(&'static str, Vec<u8>)> {
    let topic = "agents/agent-5/events";
    vec![
        ("v5-connect", connect_v5("agent-5", false)),
        ("v5-connect-will-login", connect_v5("agent-5", true)),
        (
            "v5-publish-qos0",
            publish_v5(topic, Q5::AtMostOnce, 0, r#"{"event":"login"}"#, false),
        ),
        (
            "v5-publish-qos1-properties",
            publish_v5(topic, Q5::AtLeastOnce, 1, r#"{"event":"exec"}"#, true),
        ),
        (
            "v5-publish-qos2",
            publish_v5(topic, Q5::ExactlyOnce, 2, r#"{"event":"file"}"#, false),
        ),
        (
            "v5-puback",
            v5(v5::Packet::PubAck(v5::PubAck::new(1, None))),
        ),
        (
            "v5-pubrec",
            v5(v5::Packet::PubRec(v5::PubRec::new(2, None))),
        ),
        (
            "v5-pubrel",
            v5(v5::Packet::PubRel(v5::PubRel::new(2, None))),
        ),
        (
            "v5-pubcomp",
            v5(v5::Packet::PubComp(v5::PubComp::new(3, None))),
        ),
        (
            "v5-subscribe",
            v5(v5::Packet::Subscribe(v5::Subscribe::new_many(
                [
                    v5::Filter::new("agents/agent-5/commands/#", Q5::AtLeastOnce),
                    v5::Filter::new("agents/agent-5/+/config", Q5::ExactlyOnce),
                ],
                Some(v5::SubscribeProperties {
                    id: Some(7),
                    user_properties: Vec::new(),
                }),
            ))),
        ),
        (
            "v5-unsubscribe",
            v5(v5::Packet::Unsubscribe(v5::Unsubscribe::new(
                "agents/agent-5/commands/#",
                None,
            ))),
        ),
        ("v5-pingreq", v5(v5::Packet::PingReq(v5::PingReq))),
        (
            "v5-disconnect-with-will",
            v5(v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::DisconnectWithWillMessage,
            ))),
        ),
        // The short forms MQTT 5 allows, which the codec reads itself: no reason code, and a
        // reason code without properties.
        ("v5-disconnect-short", vec![0xE0, 0x00]),
        ("v5-disconnect-reason-only", vec![0xE0, 0x01, 0x04]),
    ]
}

/// Whole agent streams for the `session` target (the ones named `*-full` also go to
/// `mqtt_packets`).
fn sessions_() -> Vec<(&'static str, Vec<u8>)> {
    let cat = |parts: Vec<Vec<u8>>| parts.concat();
    let a1 = "agents/agent-1/events";
    let a5 = "agents/agent-5/events";
    let sub_v4 = |pkid: u16, filter: &str| {
        let mut s = v4::Subscribe::new(filter, Q4::AtLeastOnce);
        s.pkid = pkid;
        v4(v4::Packet::Subscribe(s))
    };
    let unsub_v4 = |pkid: u16, filter: &str| {
        let mut u = v4::Unsubscribe::new(filter);
        u.pkid = pkid;
        v4(v4::Packet::Unsubscribe(u))
    };
    let sub_v5 = |pkid: u16, filter: &str| {
        let mut s = v5::Subscribe::new(v5::Filter::new(filter, Q5::AtLeastOnce), None);
        s.pkid = pkid;
        v5(v5::Packet::Subscribe(s))
    };
    let unsub_v5 = |pkid: u16, filter: &str| {
        let mut u = v5::Unsubscribe::new(filter, None);
        u.pkid = pkid;
        v5(v5::Packet::Unsubscribe(u))
    };
    // MQTT 3.1 ("MQIsdp", level 3), which the gateway does not speak.
    let mut v31 = vec![0x10, 19, 0, 6];
    v31.extend_from_slice(b"MQIsdp");
    v31.extend_from_slice(&[3, 0x02, 0, 30, 0, 5]);
    v31.extend_from_slice(b"agent");
    vec![
        (
            "v311-full",
            cat(vec![
                connect_v4("agent-1", true, false),
                publish_v4(a1, Q4::AtMostOnce, 0, "zero"),
                publish_v4(a1, Q4::AtLeastOnce, 1, "one"),
                publish_v4(a1, Q4::ExactlyOnce, 2, "two"),
                v4(v4::Packet::PubRel(v4::PubRel::new(2))),
                sub_v4(3, "agents/agent-1/commands/#"),
                unsub_v4(4, "agents/agent-1/commands/#"),
                v4(v4::Packet::PingReq),
                v4(v4::Packet::Disconnect),
            ]),
        ),
        (
            "v311-persistent-will-dropped",
            cat(vec![
                connect_v4("agent-1", false, true),
                publish_v4(a1, Q4::AtLeastOnce, 7, "before the drop"),
                publish_v4(a1, Q4::ExactlyOnce, 8, "qos 2, no PUBREL"),
                publish_v4(a1, Q4::ExactlyOnce, 8, "qos 2, no PUBREL"),
            ]),
        ),
        (
            "v311-denied-publish",
            cat(vec![
                connect_v4("agent-1", true, false),
                publish_v4(a1, Q4::AtLeastOnce, 1, "allowed"),
                publish_v4("agents/agent-2/events", Q4::AtLeastOnce, 2, "not its own"),
            ]),
        ),
        (
            "v311-second-connect",
            cat(vec![
                connect_v4("agent-1", true, false),
                connect_v4("agent-1", true, false),
            ]),
        ),
        ("v31-unsupported", v31),
        (
            "v5-full",
            cat(vec![
                connect_v5("agent-5", true),
                publish_v5(a5, Q5::AtMostOnce, 0, "zero", false),
                publish_v5(a5, Q5::AtLeastOnce, 1, "one", true),
                publish_v5(a5, Q5::ExactlyOnce, 2, "two", true),
                v5(v5::Packet::PubRel(v5::PubRel::new(2, None))),
                sub_v5(3, "agents/agent-5/commands/#"),
                unsub_v5(4, "agents/agent-5/commands/#"),
                v5(v5::Packet::PingReq(v5::PingReq)),
                vec![0xE0, 0x01, 0x04],
            ]),
        ),
        (
            "v5-denied",
            cat(vec![
                connect_v5("agent-5", false),
                publish_v5("agents/agent-2/events", Q5::AtLeastOnce, 1, "x", false),
                publish_v5("$SYS/broker", Q5::ExactlyOnce, 2, "x", false),
                sub_v5(3, "agents/agent-2/commands/#"),
                sub_v5(4, "#"),
                publish_v5(a5, Q5::AtLeastOnce, 5, "allowed after", false),
                vec![0xE0, 0x00],
            ]),
        ),
        (
            "v5-assigned-client-id",
            cat(vec![
                connect_v5("", false),
                v5(v5::Packet::PingReq(v5::PingReq)),
                vec![0xE0, 0x00],
            ]),
        ),
        (
            "v5-topic-alias",
            cat(vec![connect_v5("agent-5", false), {
                let mut p = v5::Publish::new(
                    a5,
                    Q5::AtLeastOnce,
                    "aliased",
                    Some(v5::PublishProperties {
                        topic_alias: Some(1),
                        ..Default::default()
                    }),
                );
                p.pkid = 1;
                v5(v5::Packet::Publish(p))
            }]),
        ),
    ]
}

fn record(
    seq: u64,
    topic: &str,
    payload: impl Into<Bytes>,
    qos: u8,
    props: bool,
) -> JournaledRecord {
    JournaledRecord {
        seq,
        record: Record {
            received_at_ms: 1_767_225_600_000 + seq as i64,
            client_id: "agent-1".into(),
            topic: topic.into(),
            qos,
            payload: payload.into(),
            properties: if props {
                RecordProperties {
                    content_type: Some("application/json".into()),
                    user_properties: vec![("schema".into(), "ecs-8".into())],
                    expires_at_ms: Some(1_767_312_000_000),
                }
            } else {
                RecordProperties::default()
            },
        },
    }
}

fn batches() -> Vec<(String, Vec<u8>)> {
    let id = |codec, batch_seq| BatchIdentity {
        gateway: "gatehouse-lab".into(),
        batch_seq,
        codec,
        created_at: 1_767_225_601_000,
    };
    let records = vec![
        record(
            41,
            "agents/agent-1/events",
            r#"{"event":"login","user":"root"}"#,
            1,
            false,
        ),
        record(
            42,
            "agents/agent-1/events",
            r#"{"event":"exec","argv":["sh"]}"#,
            0,
            true,
        ),
        record(
            43,
            "agents/agent-1/status",
            Bytes::from_static(&[0, 159, 146, 150, 255]),
            2,
            false,
        ),
    ];
    let mut out = Vec::new();
    for (name, codec) in [
        ("zstd", Codec::Zstd),
        ("gzip", Codec::Gzip),
        ("none", Codec::None),
    ] {
        let packed = envelope::pack(&id(codec, 100), &records, 131_072).expect("packs");
        assert_eq!(packed.count, records.len());
        out.push((format!("v1-{name}-3-records"), packed.payload.to_vec()));
    }
    let one = envelope::pack(&id(Codec::Zstd, 101), &records[2..], 131_072).expect("packs");
    out.push(("v1-zstd-binary-record".into(), one.payload.to_vec()));
    // A record too large for a 1,100-byte batch travels as fragments, one per version 2 batch.
    let large: Vec<u8> = (0..900u32).map(|i| (i * 7 % 251) as u8).collect();
    let large = record(44, "agents/agent-1/memory-dump", large, 1, true);
    for (name, codec) in [("zstd", Codec::Zstd), ("none", Codec::None)] {
        let pieces = envelope::fragments(&id(codec, 200), &large, 1_100).expect("splits");
        assert!(pieces.len() > 1, "a split into several fragments");
        for (i, piece) in pieces.iter().enumerate() {
            out.push((
                format!("v2-{name}-fragment-{i}-of-{}", pieces.len()),
                piece.payload.to_vec(),
            ));
        }
    }
    out
}
