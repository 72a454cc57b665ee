//! Codec: version detection on CONNECT, framing limits, topic checks, and exact bytes where
//! rumqttc's encoder could not be trusted.

use super::*;

fn v4_connect(client_id: &str, clean: bool) -> BytesMut {
    let mut connect = v4::Connect::new(client_id);
    connect.clean_session = clean;
    let mut buf = BytesMut::new();
    v4::Packet::Connect(connect)
        .write(&mut buf, usize::MAX)
        .unwrap();
    buf
}

#[test]
fn connect_of_each_version_is_recognised() {
    let mut buf = v4_connect("agent-1", true);
    let request = read_connect(&mut buf, 1024).unwrap().unwrap();
    assert_eq!(request.protocol, Protocol::V311);
    assert_eq!(request.client_id, "agent-1");
    assert!(buf.is_empty());

    let mut buf = BytesMut::new();
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "agent-5".into(),
        clean_start: false,
        properties: None,
    };
    v5::Packet::Connect(connect, None, None)
        .write(&mut buf, None)
        .unwrap();
    let request = read_connect(&mut buf, 1024).unwrap().unwrap();
    assert_eq!(request.protocol, Protocol::V5);
    assert!(!request.clean_start);
    assert_eq!(request.keep_alive_secs, 30);
}

#[test]
fn partial_connect_asks_for_more_bytes() {
    let full = v4_connect("agent-1", true);
    let mut buf = BytesMut::from(&full[..full.len() - 3]);
    assert!(read_connect(&mut buf, 1024).unwrap().is_none());
}

#[test]
fn mqtt_3_1_and_unknown_levels_are_unsupported() {
    let mut buf = v4_connect("a", true);
    // Protocol level byte follows fixed header (2), name length (2) and "MQTT" (4).
    buf[8] = 6;
    assert!(matches!(
        read_connect(&mut buf, 1024),
        Err(ConnectError::UnsupportedProtocol { level: 6, .. })
    ));
    let mut mqisdp = BytesMut::from(
        &[
            0x10, 0x11, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0x00, 0x3c, 0x00,
            0x03, b'a', b'b', b'c',
        ][..],
    );
    assert!(matches!(
        read_connect(&mut mqisdp, 1024),
        Err(ConnectError::UnsupportedProtocol { level: 3, .. })
    ));
}

#[test]
fn first_packet_must_be_connect() {
    let mut buf = BytesMut::from(&[0x30, 0x05, 0x00, 0x01, b't', b'h', b'i'][..]);
    assert!(matches!(
        read_connect(&mut buf, 1024),
        Err(ConnectError::NotConnect)
    ));
}

#[test]
fn oversize_packet_is_refused_from_its_header_alone() {
    // PUBLISH announcing 10,000 bytes; only the header has arrived.
    let mut buf = BytesMut::from(&[0x30, 0x90, 0x4e][..]);
    assert!(matches!(
        read(Protocol::V311, &mut buf, 4096),
        Err(ReadError::TooLarge { max: 4096, .. })
    ));
}

#[test]
fn wildcards_in_a_publish_topic_are_invalid() {
    for topic in ["a/+/b", "a/#"] {
        let mut buf = BytesMut::new();
        v4::Packet::Publish(v4::Publish::new(
            topic,
            rumqttc::mqttbytes::QoS::AtMostOnce,
            "x",
        ))
        .write(&mut buf, usize::MAX)
        .unwrap();
        assert!(matches!(
            read(Protocol::V311, &mut buf, 4096),
            Err(ReadError::TopicInvalid(..))
        ));
    }
}

#[test]
fn invalid_utf8_topic_is_malformed_in_both_versions() {
    let bytes = [0x30, 0x06, 0x00, 0x02, 0xff, 0xfe, b'h', b'i'];
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(matches!(
        read(Protocol::V311, &mut buf, 4096),
        Err(ReadError::Malformed(_))
    ));
    // MQTT 5 PUBLISH carries a property length after the topic.
    let bytes5 = [0x30, 0x07, 0x00, 0x02, 0xff, 0xfe, 0x00, b'h', b'i'];
    let mut buf = BytesMut::from(&bytes5[..]);
    assert!(matches!(
        read(Protocol::V5, &mut buf, 4096),
        Err(ReadError::Malformed(_))
    ));
}

#[test]
fn mqtt5_disconnect_without_reason_code_is_normal() {
    let mut buf = BytesMut::from(&[0xE0, 0x00][..]);
    assert!(matches!(
        read(Protocol::V5, &mut buf, 4096),
        Ok(Some(Inbound::Disconnect { with_will: false }))
    ));
    assert!(buf.is_empty());
}

#[test]
fn mqtt5_disconnect_with_only_a_reason_code_is_read() {
    let mut buf = BytesMut::from(&[0xE0, 0x01, 0x04, 0xE0, 0x01, 0x00][..]);
    assert!(matches!(
        read(Protocol::V5, &mut buf, 4096),
        Ok(Some(Inbound::Disconnect { with_will: true }))
    ));
    assert!(matches!(
        read(Protocol::V5, &mut buf, 4096),
        Ok(Some(Inbound::Disconnect { with_will: false }))
    ));
    assert!(buf.is_empty());
}

#[test]
fn mqtt5_disconnect_is_framed_with_its_reason_code() {
    let mut out = BytesMut::new();
    write(
        Protocol::V5,
        &Outbound::Disconnect(DisconnectReason::PacketTooLarge),
        &mut out,
    );
    assert_eq!(&out[..], &[0xE0, 0x02, 0x95, 0x00]);
    let mut out = BytesMut::new();
    write(
        Protocol::V311,
        &Outbound::Disconnect(DisconnectReason::PacketTooLarge),
        &mut out,
    );
    assert!(out.is_empty(), "MQTT 3.1.1 has no server DISCONNECT");
}

#[test]
fn mqtt5_refusal_carries_a_reason_code_and_string() {
    let mut out = BytesMut::new();
    write(
        Protocol::V5,
        &Outbound::PubAck {
            pkid: 7,
            reason: AckReason::Refused("too large".into()),
        },
        &mut out,
    );
    match v5::Packet::read(&mut out, None).unwrap() {
        v5::Packet::PubAck(ack) => {
            assert_eq!(ack.pkid, 7);
            assert_eq!(ack.reason, v5::PubAckReason::ImplementationSpecificError);
            assert_eq!(
                ack.properties.unwrap().reason_string.as_deref(),
                Some("too large")
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn reserved_header_flags_and_empty_filter_lists_are_malformed() {
    let framed = |first: u8, body: &[u8]| {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[first, body.len() as u8]);
        buf.extend_from_slice(body);
        buf
    };
    for protocol in [Protocol::V311, Protocol::V5] {
        let props: &[u8] = if protocol == Protocol::V5 { &[0] } else { &[] };
        // PUBACK with a flag bit set; PUBREL, SUBSCRIBE, UNSUBSCRIBE without bit 1.
        for first in [0x41u8, 0x60, 0x80, 0xA0, 0xC1, 0xE2] {
            let mut buf = framed(first, &[0, 1]);
            assert!(
                matches!(read(protocol, &mut buf, 1024), Err(ReadError::Malformed(_))),
                "{protocol}: first byte {first:#04x} must be malformed"
            );
        }
        // PUBLISH with QoS 3.
        let mut buf = framed(0x36, &[0, 1, b'a', 0, 1]);
        assert!(matches!(
            read(protocol, &mut buf, 1024),
            Err(ReadError::Malformed(_))
        ));
        // SUBSCRIBE and UNSUBSCRIBE with a packet id and no filter.
        for first in [0x82u8, 0xA2] {
            let mut body = vec![0, 1];
            body.extend_from_slice(props);
            let mut buf = framed(first, &body);
            assert!(
                matches!(read(protocol, &mut buf, 1024), Err(ReadError::Malformed(_))),
                "{protocol}: {first:#04x} without a filter must be malformed"
            );
        }
        // The valid forms still pass.
        let mut buf = framed(0x62, &[0, 1]);
        assert!(matches!(
            read(protocol, &mut buf, 1024),
            Ok(Some(Inbound::PubRel(1)))
        ));
    }
    // A CONNECT with reserved flags set.
    let mut buf = v4_connect("agent-1", true);
    buf[0] = 0x11;
    assert!(matches!(
        read_connect(&mut buf, 1024),
        Err(ConnectError::Read(ReadError::Malformed(_)))
    ));
}
