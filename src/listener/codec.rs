//! MQTT 3.1.1 and 5.0 packets, read and written with rumqttc's `mqttbytes` codecs, and mapped
//! onto one protocol-neutral vocabulary (`Inbound`, `Outbound`) so the session logic is written
//! once.
//!
//! Only this module names rumqttc's packet types. The protocol version is fixed by the CONNECT
//! packet (`read_connect` peeks at its protocol level before choosing a decoder).

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::record::RecordProperties;

/// Which MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

/// What a CONNECT asked for, whatever its version.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub protocol: Protocol,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive_secs: u16,
    pub will: Option<Will>,
    pub username: Option<String>,
    /// Never logged.
    pub password: Option<String>,
    /// The agent sent an empty client id and the gateway chose `client_id`.
    pub client_id_was_assigned: bool,
    /// MQTT 5: how many QoS>0 PUBLISHes the client accepts in flight from us.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the client accepts from us.
    pub max_packet_size: Option<u32>,
    /// MQTT 5 Session Expiry Interval (absent means 0: the session ends with the connection).
    /// `None` under 3.1.1, where a persistent session has no expiry.
    pub session_expiry_secs: Option<u32>,
}

/// A Will message, journaled when the agent disconnects abnormally.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub properties: RecordProperties,
}

/// An inbound PUBLISH.
#[derive(Debug, Clone)]
pub struct InPublish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub pkid: u16,
    pub properties: RecordProperties,
}

/// A packet an agent sent after CONNECT.
#[derive(Debug)]
pub enum Inbound {
    Publish(InPublish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `with_will`: MQTT 5 reason 0x04, "disconnect with Will message".
    Disconnect {
        with_will: bool,
    },
    /// A second CONNECT, or a packet only a server sends: a protocol error.
    Unexpected(&'static str),
}

/// Why a packet could not be read. Each closes only this agent's connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("invalid topic name {0:?}: {1}")]
    TopicInvalid(String, &'static str),
    #[error("invalid topic alias: {0}")]
    TopicAlias(String),
}

/// Why a first packet was not an acceptable CONNECT.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    #[error(transparent)]
    Read(ReadError),
    /// Malformed CONNECT of a known version (MQTT 5 answers it with CONNACK 0x81).
    #[error("malformed CONNECT: {1}")]
    Malformed(Protocol, String),
}

/// Reason codes the gateway sends, in domain terms; each maps to its MQTT 3.1.1 and 5 form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnAckCode {
    Accepted,
    UnsupportedProtocol,
    ClientIdRejected,
    Malformed,
    BadCredentials,
    NotAuthorized,
    /// A dependency (client device auth) could not answer; the agent may retry.
    ServerUnavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckReason {
    Success,
    /// The message can never be accepted as sent (e.g. too large to batch); the reason string
    /// says why. MQTT 5 only (3.1.1 has no way to refuse a PUBLISH but to disconnect).
    Refused(String),
    /// A transient failure (journal write failed); the agent may retry.
    Failed(String),
    /// The journal is full (MQTT 5 reason 0x97, Quota exceeded); the agent should retry later.
    QuotaExceeded(String),
    /// The ACL does not allow it (MQTT 5 reason 0x87).
    NotAuthorized(String),
    /// The topic breaks a limit (MQTT 5 reason 0x90, Topic Name invalid).
    TopicNameInvalid(String),
}

/// The answer to one SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubResult {
    Granted(u8),
    /// Not a valid filter, or over a topic limit.
    Invalid,
    /// The ACL does not allow it.
    NotAuthorized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    MalformedPacket,
    ProtocolError,
    TopicNameInvalid,
    TopicAliasInvalid,
    PacketTooLarge,
    QuotaExceeded,
    KeepAliveTimeout,
    SessionTakenOver,
    ServerShuttingDown,
    UnspecifiedError,
    NotAuthorized,
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MalformedPacket => "malformed packet",
            Self::ProtocolError => "protocol error",
            Self::TopicNameInvalid => "topic name invalid",
            Self::TopicAliasInvalid => "topic alias invalid",
            Self::PacketTooLarge => "packet too large",
            Self::QuotaExceeded => "quota exceeded",
            Self::KeepAliveTimeout => "keep-alive timeout",
            Self::SessionTakenOver => "session taken over",
            Self::ServerShuttingDown => "server shutting down",
            Self::UnspecifiedError => "unspecified error",
            Self::NotAuthorized => "not authorized",
        })
    }
}

/// A packet the gateway sends.
#[derive(Debug, Clone)]
pub enum Outbound {
    ConnAck {
        session_present: bool,
        code: ConnAckCode,
        assigned_client_id: Option<String>,
        max_packet_size: u32,
        receive_maximum: u16,
    },
    PubAck {
        pkid: u16,
        reason: AckReason,
    },
    PubRec {
        pkid: u16,
        reason: AckReason,
    },
    PubComp {
        pkid: u16,
    },
    PubRel {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        granted: Vec<SubResult>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
    },
    /// MQTT 5 only; under 3.1.1 the connection is just closed.
    Disconnect(DisconnectReason),
}

fn qos_v4(qos: u8) -> rumqttc::mqttbytes::QoS {
    match qos {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Checks a PUBLISH topic name: non-empty, no wildcards, no NUL.
fn check_topic(topic: &str) -> Result<(), ReadError> {
    if topic.is_empty() {
        return Err(ReadError::TopicInvalid(topic.into(), "empty"));
    }
    if topic.contains(['+', '#']) {
        return Err(ReadError::TopicInvalid(
            topic.into(),
            "wildcards are not allowed in a PUBLISH",
        ));
    }
    if topic.contains('\0') {
        return Err(ReadError::TopicInvalid(topic.into(), "contains NUL"));
    }
    Ok(())
}

/// Reads the variable-length "remaining length"; returns (header length, remaining length),
/// `Ok(None)` when more bytes are needed.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, ReadError> {
    let mut len = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((i + 2, len)));
        }
    }
    if buf.len() >= 5 {
        return Err(ReadError::Malformed(
            "remaining length longer than 4 bytes".into(),
        ));
    }
    Ok(None)
}

/// Frames and decodes the first packet, which must be CONNECT. `Ok(None)`: need more bytes.
pub fn read_connect(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<ConnectRequest>, ConnectError> {
    let Some((header_len, remaining)) = fixed_header(buf).map_err(ConnectError::Read)? else {
        return Ok(None);
    };
    if buf[0] >> 4 != 1 {
        return Err(ConnectError::NotConnect);
    }
    check_header_flags(buf[0]).map_err(ConnectError::Read)?;
    if header_len + remaining > max_packet_size {
        return Err(ConnectError::Read(ReadError::TooLarge {
            size: header_len + remaining,
            max: max_packet_size,
        }));
    }
    if buf.len() < header_len + remaining {
        return Ok(None);
    }
    // Variable header: protocol name (u16 length + bytes), then the level.
    let vh = &buf[header_len..header_len + remaining];
    let name_len = vh
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or_else(|| ConnectError::Read(ReadError::Malformed("CONNECT too short".into())))?;
    let name = vh
        .get(2..2 + name_len)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .ok_or_else(|| ConnectError::Read(ReadError::Malformed("CONNECT too short".into())))?;
    let level = *vh
        .get(2 + name_len)
        .ok_or_else(|| ConnectError::Read(ReadError::Malformed("CONNECT too short".into())))?;
    match (name.as_str(), level) {
        ("MQTT", 4) => match v4::Packet::read(buf, max_packet_size) {
            Ok(v4::Packet::Connect(c)) => Ok(Some(ConnectRequest {
                protocol: Protocol::V311,
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive_secs: c.keep_alive,
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: w.qos as u8,
                    properties: RecordProperties::default(),
                }),
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.map(|l| l.password),
                client_id_was_assigned: false,
                receive_maximum: None,
                max_packet_size: None,
                session_expiry_secs: None,
            })),
            Ok(_) => Err(ConnectError::NotConnect),
            Err(e) => Err(ConnectError::Malformed(Protocol::V311, e.to_string())),
        },
        ("MQTT", 5) => match v5::Packet::read(buf, Some(max_packet_size as u32)) {
            Ok(v5::Packet::Connect(c, will, login)) => {
                let will = match will {
                    Some(w) => {
                        let topic = String::from_utf8(w.topic.to_vec()).map_err(|_| {
                            ConnectError::Malformed(Protocol::V5, "Will topic is not UTF-8".into())
                        })?;
                        let properties = w
                            .properties
                            .map(|props| RecordProperties {
                                content_type: props.content_type,
                                user_properties: props.user_properties,
                                expires_at_ms: props.message_expiry_interval.map(expiry_ms),
                            })
                            .unwrap_or_default();
                        Some(Will {
                            topic,
                            payload: w.message,
                            qos: w.qos as u8,
                            properties,
                        })
                    }
                    None => None,
                };
                let props = c.properties.unwrap_or_default();
                Ok(Some(ConnectRequest {
                    protocol: Protocol::V5,
                    client_id: c.client_id,
                    clean_start: c.clean_start,
                    keep_alive_secs: c.keep_alive,
                    will,
                    username: login.as_ref().map(|l| l.username.clone()),
                    password: login.map(|l| l.password),
                    client_id_was_assigned: false,
                    receive_maximum: props.receive_maximum,
                    max_packet_size: props.max_packet_size,
                    session_expiry_secs: Some(props.session_expiry_interval.unwrap_or(0)),
                }))
            }
            Ok(_) => Err(ConnectError::NotConnect),
            Err(e) => Err(ConnectError::Malformed(Protocol::V5, e.to_string())),
        },
        _ => Err(ConnectError::UnsupportedProtocol { name, level }),
    }
}

/// Message Expiry Interval (seconds from now) as an absolute time in ms.
fn expiry_ms(secs: u32) -> i64 {
    crate::record::now_ms() + secs as i64 * 1000
}

/// Frames and decodes one packet after CONNECT. `Ok(None)`: need more bytes.
pub fn read(
    protocol: Protocol,
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Inbound>, ReadError> {
    let Some((header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    if header_len + remaining > max_packet_size {
        return Err(ReadError::TooLarge {
            size: header_len + remaining,
            max: max_packet_size,
        });
    }
    if buf.len() < header_len + remaining {
        return Ok(None);
    }
    check_header_flags(buf[0])?;
    let packet = match protocol {
        Protocol::V311 => read_v4(buf, max_packet_size)?,
        Protocol::V5 => read_v5(buf, max_packet_size)?,
    };
    match &packet {
        Inbound::Subscribe { filters, .. } if filters.is_empty() => Err(ReadError::Malformed(
            "SUBSCRIBE without a topic filter".into(),
        )),
        Inbound::Unsubscribe { filters, .. } if filters.is_empty() => Err(ReadError::Malformed(
            "UNSUBSCRIBE without a topic filter".into(),
        )),
        _ => Ok(Some(packet)),
    }
}

/// Checks the fixed header's flag bits, which the spec reserves (both versions, section
/// 2.1.3): 0010 for PUBREL, SUBSCRIBE and UNSUBSCRIBE, 0000 for the others but PUBLISH, whose
/// QoS may not be 3.
fn check_header_flags(first: u8) -> Result<(), ReadError> {
    let (kind, flags) = (first >> 4, first & 0x0f);
    let expected = match kind {
        3 if (flags >> 1) & 0b11 == 0b11 => {
            return Err(ReadError::Malformed("PUBLISH with QoS 3".into()));
        }
        3 => return Ok(()),
        6 | 8 | 10 => 0b0010,
        _ => 0b0000,
    };
    if flags != expected {
        return Err(ReadError::Malformed(format!(
            "packet type {kind} with reserved flag bits {flags:04b} (must be {expected:04b})"
        )));
    }
    Ok(())
}

fn read_v4(buf: &mut BytesMut, max: usize) -> Result<Inbound, ReadError> {
    use rumqttc::mqttbytes::Error;
    let packet = v4::Packet::read(buf, max).map_err(|e| match e {
        Error::TopicNotUtf8 => ReadError::Malformed("topic is not valid UTF-8".into()),
        other => ReadError::Malformed(other.to_string()),
    })?;
    Ok(match packet {
        v4::Packet::Publish(p) => {
            check_topic(&p.topic)?;
            Inbound::Publish(InPublish {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                pkid: p.pkid,
                properties: RecordProperties::default(),
            })
        }
        v4::Packet::PubAck(p) => Inbound::PubAck(p.pkid),
        v4::Packet::PubRec(p) => Inbound::PubRec(p.pkid),
        v4::Packet::PubRel(p) => Inbound::PubRel(p.pkid),
        v4::Packet::PubComp(p) => Inbound::PubComp(p.pkid),
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect { with_will: false },
        v4::Packet::Connect(_) => Inbound::Unexpected("a second CONNECT"),
        v4::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Inbound::Unexpected("PINGRESP"),
    })
}

fn read_v5(buf: &mut BytesMut, max: usize) -> Result<Inbound, ReadError> {
    // MQTT 5 lets DISCONNECT omit the reason code (remaining length 0) or the properties
    // (remaining length 1); rumqttc 0.25 rejects both forms, so they are read here.
    if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
        let _ = buf.split_to(2);
        return Ok(Inbound::Disconnect { with_will: false });
    }
    if buf.len() >= 3 && buf[0] == 0xE0 && buf[1] == 1 {
        let reason = buf[2];
        let _ = buf.split_to(3);
        return Ok(Inbound::Disconnect {
            with_will: reason == 0x04,
        });
    }
    let packet =
        v5::Packet::read(buf, Some(max as u32)).map_err(|e| ReadError::Malformed(e.to_string()))?;
    Ok(match packet {
        v5::Packet::Publish(p) => {
            let props = p.properties.unwrap_or_default();
            if props.topic_alias.is_some() {
                return Err(ReadError::TopicAlias(
                    "topic alias used, but this server's Topic Alias Maximum is 0".into(),
                ));
            }
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| ReadError::Malformed("topic is not valid UTF-8".into()))?;
            check_topic(&topic)?;
            Inbound::Publish(InPublish {
                topic,
                payload: p.payload,
                qos: p.qos as u8,
                pkid: p.pkid,
                properties: RecordProperties {
                    content_type: props.content_type,
                    user_properties: props.user_properties,
                    expires_at_ms: props.message_expiry_interval.map(expiry_ms),
                },
            })
        }
        v5::Packet::PubAck(p) => Inbound::PubAck(p.pkid),
        v5::Packet::PubRec(p) => Inbound::PubRec(p.pkid),
        v5::Packet::PubRel(p) => Inbound::PubRel(p.pkid),
        v5::Packet::PubComp(p) => Inbound::PubComp(p.pkid),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Connect(..) => Inbound::Unexpected("a second CONNECT"),
        v5::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Inbound::Unexpected("PINGRESP"),
        v5::Packet::Auth(_) => {
            Inbound::Unexpected("AUTH (enhanced authentication is not supported)")
        }
    })
}

/// Encodes `packet` for `protocol` onto `out`. Packets with no 3.1.1 form (DISCONNECT) write
/// nothing under 3.1.1.
pub fn write(protocol: Protocol, packet: &Outbound, out: &mut BytesMut) {
    let result = match protocol {
        Protocol::V311 => write_v4(packet, out).map_err(|e| e.to_string()),
        Protocol::V5 => write_v5(packet, out).map_err(|e| e.to_string()),
    };
    if let Err(e) = result {
        // Only oversize outbound packets can fail, and we size what we send.
        tracing::warn!(error = %e, "Failed to encode a packet for an agent.");
    }
}

fn write_v4(packet: &Outbound, out: &mut BytesMut) -> Result<usize, rumqttc::mqttbytes::Error> {
    use v4::ConnectReturnCode as Rc;
    let max = usize::MAX;
    let packet = match packet {
        Outbound::ConnAck {
            session_present,
            code,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match code {
                ConnAckCode::Accepted => Rc::Success,
                ConnAckCode::UnsupportedProtocol => Rc::RefusedProtocolVersion,
                ConnAckCode::ClientIdRejected => Rc::BadClientId,
                ConnAckCode::Malformed | ConnAckCode::ServerUnavailable => Rc::ServiceUnavailable,
                ConnAckCode::BadCredentials => Rc::BadUserNamePassword,
                ConnAckCode::NotAuthorized => Rc::NotAuthorized,
            },
            *session_present,
        )),
        Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Outbound::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
        Outbound::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
        Outbound::PubRel { pkid } => v4::Packet::PubRel(v4::PubRel::new(*pkid)),
        Outbound::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            granted
                .iter()
                .map(|g| match g {
                    SubResult::Granted(q) => v4::SubscribeReasonCode::Success(qos_v4(*q)),
                    SubResult::Invalid | SubResult::NotAuthorized => {
                        v4::SubscribeReasonCode::Failure
                    }
                })
                .collect(),
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::Publish {
            topic,
            payload,
            qos,
            pkid,
        } => {
            let mut p = v4::Publish::from_bytes(topic.clone(), qos_v4(*qos), payload.clone());
            p.pkid = *pkid;
            v4::Packet::Publish(p)
        }
        Outbound::Disconnect(_) => return Ok(0),
    };
    packet.write(out, max)
}

fn write_v5(packet: &Outbound, out: &mut BytesMut) -> Result<usize, rumqttc::v5::mqttbytes::Error> {
    use v5::ConnectReturnCode as Rc;
    let packet = match packet {
        Outbound::ConnAck {
            session_present,
            code,
            assigned_client_id,
            max_packet_size,
            receive_maximum,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present: *session_present,
            code: match code {
                ConnAckCode::Accepted => Rc::Success,
                ConnAckCode::UnsupportedProtocol => Rc::UnsupportedProtocolVersion,
                ConnAckCode::ClientIdRejected => Rc::ClientIdentifierNotValid,
                ConnAckCode::Malformed => Rc::MalformedPacket,
                ConnAckCode::BadCredentials => Rc::BadUserNamePassword,
                ConnAckCode::NotAuthorized => Rc::NotAuthorized,
                ConnAckCode::ServerUnavailable => Rc::ServerUnavailable,
            },
            properties: (*code == ConnAckCode::Accepted).then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(*receive_maximum),
                max_qos: None,
                retain_available: Some(0),
                max_packet_size: Some(*max_packet_size),
                assigned_client_identifier: assigned_client_id.clone(),
                topic_alias_max: Some(0),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Outbound::PubAck { pkid, reason } => {
            let (reason, properties) = ack_reason_v5(reason);
            v5::Packet::PubAck(v5::PubAck {
                pkid: *pkid,
                reason: match reason {
                    0x00 => v5::PubAckReason::Success,
                    0x83 => v5::PubAckReason::ImplementationSpecificError,
                    0x87 => v5::PubAckReason::NotAuthorized,
                    0x90 => v5::PubAckReason::TopicNameInvalid,
                    0x97 => v5::PubAckReason::QuotaExceeded,
                    _ => v5::PubAckReason::UnspecifiedError,
                },
                properties: properties.map(|reason_string| v5::PubAckProperties {
                    reason_string: Some(reason_string),
                    user_properties: Vec::new(),
                }),
            })
        }
        Outbound::PubRec { pkid, reason } => {
            let (reason, properties) = ack_reason_v5(reason);
            v5::Packet::PubRec(v5::PubRec {
                pkid: *pkid,
                reason: match reason {
                    0x00 => v5::PubRecReason::Success,
                    0x83 => v5::PubRecReason::ImplementationSpecificError,
                    0x87 => v5::PubRecReason::NotAuthorized,
                    0x90 => v5::PubRecReason::TopicNameInvalid,
                    0x97 => v5::PubRecReason::QuotaExceeded,
                    _ => v5::PubRecReason::UnspecifiedError,
                },
                properties: properties.map(|reason_string| v5::PubRecProperties {
                    reason_string: Some(reason_string),
                    user_properties: Vec::new(),
                }),
            })
        }
        Outbound::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp::new(*pkid, None)),
        Outbound::PubRel { pkid } => v5::Packet::PubRel(v5::PubRel::new(*pkid, None)),
        Outbound::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: granted
                .iter()
                .map(|g| match g {
                    SubResult::Granted(q) => v5::SubscribeReasonCode::Success(qos_v5(*q)),
                    SubResult::Invalid => v5::SubscribeReasonCode::TopicFilterInvalid,
                    SubResult::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: vec![v5::UnsubAckReason::Success; *count],
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Publish {
            topic,
            payload,
            qos,
            pkid,
        } => {
            let mut p = v5::Publish::new(topic.clone(), qos_v5(*qos), payload.clone(), None);
            p.pkid = *pkid;
            v5::Packet::Publish(p)
        }
        Outbound::Disconnect(reason) => {
            // Written by hand: rumqttc 0.25.1 mis-frames a DISCONNECT with a reason code (with
            // `properties: None` it writes a property-length byte its remaining length does not
            // count; with empty properties it drops the reason code). Fixed header, remaining
            // length 2, reason code, empty properties.
            out.extend_from_slice(&[0xE0, 0x02, disconnect_code(*reason), 0x00]);
            return Ok(4);
        }
    };
    packet.write(out, None)
}

/// The MQTT 5 DISCONNECT reason code.
fn disconnect_code(reason: DisconnectReason) -> u8 {
    match reason {
        DisconnectReason::UnspecifiedError => 0x80,
        DisconnectReason::MalformedPacket => 0x81,
        DisconnectReason::ProtocolError => 0x82,
        DisconnectReason::ServerShuttingDown => 0x8B,
        DisconnectReason::KeepAliveTimeout => 0x8D,
        DisconnectReason::SessionTakenOver => 0x8E,
        DisconnectReason::TopicNameInvalid => 0x90,
        DisconnectReason::TopicAliasInvalid => 0x94,
        DisconnectReason::PacketTooLarge => 0x95,
        DisconnectReason::QuotaExceeded => 0x97,
        DisconnectReason::NotAuthorized => 0x87,
    }
}

/// The MQTT 5 reason byte and reason string for an acknowledgement.
fn ack_reason_v5(reason: &AckReason) -> (u8, Option<String>) {
    match reason {
        AckReason::Success => (0x00, None),
        AckReason::Refused(why) => (0x83, Some(why.clone())),
        AckReason::Failed(why) => (0x80, Some(why.clone())),
        AckReason::QuotaExceeded(why) => (0x97, Some(why.clone())),
        AckReason::NotAuthorized(why) => (0x87, Some(why.clone())),
        AckReason::TopicNameInvalid(why) => (0x90, Some(why.clone())),
    }
}

#[cfg(test)]
mod tests;
