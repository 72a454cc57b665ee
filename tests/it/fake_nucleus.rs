//! A fake AWS IoT Greengrass v2 nucleus for the tests: a real event-stream RPC server on a Unix
//! domain socket that the gateway (run as a component) and AWS's own Python IPC client connect
//! to, with its own frame codec (both CRC-32s checked) and no code shared with the gateway.
//!
//! What it guarantees, per `NucleusMode` (see /work/shared/greengrass/IPC.md, §1, §2, §4, §12):
//! - the Connect handshake with the `:version` and token checks of the Java nucleus (ConnectAck
//!   flags 0, then close) or of nucleus lite (close without any ConnectAck);
//! - the stream rules (new ids exactly previous + 1, `operation` on a stream's first message),
//!   whose violations are recorded and close the connection (a ProtocolError first, in Java mode);
//! - the exact model names and `:content-type` of every response, event and modelled error, the
//!   Java error JSON (`_service`/`_message`/`_errorCode` + `message`) or lite's
//!   (`_message`/`_errorCode`), TerminateStream on Java unary responses and on no lite response;
//! - lite's 10,000-byte frame cap (a bigger client frame closes the connection, recorded as an
//!   oversize frame), lite's string-only configuration scalars, lite's missing Ping and missing
//!   configuration-validation operations;
//! - a record of everything a test asserts on (publishes, states, validity reports, active
//!   subscriptions, connections, violations, a frame log) and deadline-bounded `wait_for` helpers.
//!
//! The tests at the bottom check the codec against frames captured from a real nucleus lite
//! session (tests/it/data/greengrass/), replay that session against the fake, and drive the fake
//! with the official `awsiotsdk` Python client in both modes.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use serde_json::{Map, Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc};

use self::eventstream::{Frame, HeaderValue};

// ------------------------------------------------------------------ event-stream codec

/// The AWS event-stream frame format (IPC.md §1): prelude (total length, headers length,
/// prelude CRC), headers, payload, message CRC; standard CRC-32 (IEEE, reflected 0xEDB88320).
pub mod eventstream {
    use std::fmt;

    /// Bytes of the prelude: total length, headers length, prelude CRC.
    pub const PRELUDE_LEN: usize = 12;
    /// The smallest frame: prelude plus message CRC.
    pub const MIN_FRAME_LEN: usize = 16;
    /// Longest string or byte-array header value the reference C implementation accepts.
    pub const MAX_HEADER_VALUE_LEN: usize = 32767;

    const CRC_TABLE: [u32; 256] = crc_table();

    const fn crc_table() -> [u32; 256] {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    }

    /// CRC-32 (the zlib/gzip one) of `data`.
    pub fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        !c
    }

    /// A header value, one variant per wire type byte (0..=9).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum HeaderValue {
        True,
        False,
        Byte(i8),
        Int16(i16),
        Int32(i32),
        Int64(i64),
        Bytes(Vec<u8>),
        String(String),
        Timestamp(i64),
        Uuid([u8; 16]),
    }

    impl HeaderValue {
        pub fn type_byte(&self) -> u8 {
            match self {
                HeaderValue::True => 0,
                HeaderValue::False => 1,
                HeaderValue::Byte(_) => 2,
                HeaderValue::Int16(_) => 3,
                HeaderValue::Int32(_) => 4,
                HeaderValue::Int64(_) => 5,
                HeaderValue::Bytes(_) => 6,
                HeaderValue::String(_) => 7,
                HeaderValue::Timestamp(_) => 8,
                HeaderValue::Uuid(_) => 9,
            }
        }

        pub fn str(s: &str) -> HeaderValue {
            HeaderValue::String(s.to_string())
        }
    }

    impl fmt::Display for HeaderValue {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                HeaderValue::True => write!(f, "true"),
                HeaderValue::False => write!(f, "false"),
                HeaderValue::Byte(v) => write!(f, "{v}"),
                HeaderValue::Int16(v) => write!(f, "{v}"),
                HeaderValue::Int32(v) => write!(f, "{v}"),
                HeaderValue::Int64(v) => write!(f, "{v}"),
                HeaderValue::Bytes(v) => write!(f, "{v:02x?}"),
                HeaderValue::String(v) => write!(f, "'{v}'"),
                HeaderValue::Timestamp(v) => write!(f, "ts:{v}"),
                HeaderValue::Uuid(v) => write!(f, "uuid:{v:02x?}"),
            }
        }
    }

    /// A decoded frame: headers in wire order, and the payload.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Frame {
        pub headers: Vec<(String, HeaderValue)>,
        pub payload: Vec<u8>,
    }

    /// Why bytes are not a valid frame.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum DecodeError {
        /// Fewer bytes than the frame needs.
        Truncated {
            need: usize,
            have: usize,
        },
        PreludeCrc {
            stated: u32,
            computed: u32,
        },
        MessageCrc {
            stated: u32,
            computed: u32,
        },
        /// `total_len` below 16 or the headers not fitting in it.
        BadLengths {
            total_len: u32,
            headers_len: u32,
        },
        BadHeader(String),
        /// More bytes than `total_len` were given to `Frame::decode`.
        TrailingBytes(usize),
    }

    impl fmt::Display for DecodeError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{self:?}")
        }
    }

    /// The checked prelude of a frame.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Prelude {
        pub total_len: u32,
        pub headers_len: u32,
    }

    /// Check the prelude CRC of the first 12 bytes before trusting the lengths, as the C
    /// decoder does.
    pub fn decode_prelude(bytes: &[u8]) -> Result<Prelude, DecodeError> {
        if bytes.len() < PRELUDE_LEN {
            return Err(DecodeError::Truncated {
                need: PRELUDE_LEN,
                have: bytes.len(),
            });
        }
        let total_len = u32::from_be_bytes(bytes[0..4].try_into().unwrap());
        let headers_len = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
        let stated = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
        let computed = crc32(&bytes[0..8]);
        if stated != computed {
            return Err(DecodeError::PreludeCrc { stated, computed });
        }
        if (total_len as usize) < MIN_FRAME_LEN
            || headers_len as usize > total_len as usize - MIN_FRAME_LEN
        {
            return Err(DecodeError::BadLengths {
                total_len,
                headers_len,
            });
        }
        Ok(Prelude {
            total_len,
            headers_len,
        })
    }

    fn take<'a>(buf: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if buf.len() < n {
            return Err(DecodeError::BadHeader(format!(
                "{what}: need {n} bytes, {} left",
                buf.len()
            )));
        }
        let (head, rest) = buf.split_at(n);
        *buf = rest;
        Ok(head)
    }

    fn decode_headers(mut buf: &[u8]) -> Result<Vec<(String, HeaderValue)>, DecodeError> {
        let mut headers = Vec::new();
        while !buf.is_empty() {
            let name_len = take(&mut buf, 1, "header name length")?[0] as usize;
            if name_len == 0 {
                return Err(DecodeError::BadHeader("empty header name".into()));
            }
            let name = std::str::from_utf8(take(&mut buf, name_len, "header name")?)
                .map_err(|e| DecodeError::BadHeader(format!("header name not UTF-8: {e}")))?
                .to_string();
            let type_byte = take(&mut buf, 1, "header type")?[0];
            let be = |b: &[u8]| -> [u8; 8] {
                let mut a = [0u8; 8];
                a[8 - b.len()..].copy_from_slice(b);
                a
            };
            let value = match type_byte {
                0 => HeaderValue::True,
                1 => HeaderValue::False,
                2 => HeaderValue::Byte(take(&mut buf, 1, &name)?[0] as i8),
                3 => HeaderValue::Int16(i16::from_be_bytes(
                    take(&mut buf, 2, &name)?.try_into().unwrap(),
                )),
                4 => HeaderValue::Int32(i32::from_be_bytes(
                    take(&mut buf, 4, &name)?.try_into().unwrap(),
                )),
                5 => HeaderValue::Int64(i64::from_be_bytes(be(take(&mut buf, 8, &name)?))),
                6 | 7 => {
                    let len = u16::from_be_bytes(take(&mut buf, 2, &name)?.try_into().unwrap());
                    let bytes = take(&mut buf, len as usize, &name)?.to_vec();
                    if type_byte == 6 {
                        HeaderValue::Bytes(bytes)
                    } else {
                        HeaderValue::String(String::from_utf8(bytes).map_err(|e| {
                            DecodeError::BadHeader(format!("{name}: string not UTF-8: {e}"))
                        })?)
                    }
                }
                8 => HeaderValue::Timestamp(i64::from_be_bytes(be(take(&mut buf, 8, &name)?))),
                9 => HeaderValue::Uuid(take(&mut buf, 16, &name)?.try_into().unwrap()),
                t => {
                    return Err(DecodeError::BadHeader(format!(
                        "{name}: unknown header type {t}"
                    )));
                }
            };
            headers.push((name, value));
        }
        Ok(headers)
    }

    impl Frame {
        /// A frame with the three RPC headers in the order the real servers and clients write
        /// them: `:message-type`, `:message-flags`, `:stream-id`.
        pub fn rpc(message_type: i32, flags: i32, stream_id: i32) -> Frame {
            Frame::default()
                .with(":message-type", HeaderValue::Int32(message_type))
                .with(":message-flags", HeaderValue::Int32(flags))
                .with(":stream-id", HeaderValue::Int32(stream_id))
        }

        /// Append a header.
        pub fn with(mut self, name: &str, value: HeaderValue) -> Frame {
            self.headers.push((name.to_string(), value));
            self
        }

        pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Frame {
            self.payload = payload.into();
            self
        }

        /// The first header called `name` (ASCII case-insensitive, like aws-c-event-stream).
        pub fn get(&self, name: &str) -> Option<&HeaderValue> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        }

        pub fn int(&self, name: &str) -> Option<i32> {
            match self.get(name) {
                Some(HeaderValue::Int32(v)) => Some(*v),
                _ => None,
            }
        }

        pub fn string(&self, name: &str) -> Option<&str> {
            match self.get(name) {
                Some(HeaderValue::String(v)) => Some(v),
                _ => None,
            }
        }

        pub fn message_type(&self) -> Option<i32> {
            self.int(":message-type")
        }

        pub fn flags(&self) -> i32 {
            self.int(":message-flags").unwrap_or(0)
        }

        pub fn stream_id(&self) -> Option<i32> {
            self.int(":stream-id")
        }

        /// Bytes on the wire. Panics on a header no real peer would accept (a name of 0 or
        /// more than 255 bytes, a value longer than 32767 bytes).
        pub fn encode(&self) -> Vec<u8> {
            let mut headers = Vec::new();
            for (name, value) in &self.headers {
                assert!(
                    !name.is_empty() && name.len() <= 255,
                    "header name length {} out of 1..=255",
                    name.len()
                );
                headers.push(name.len() as u8);
                headers.extend_from_slice(name.as_bytes());
                headers.push(value.type_byte());
                match value {
                    HeaderValue::True | HeaderValue::False => {}
                    HeaderValue::Byte(v) => headers.push(*v as u8),
                    HeaderValue::Int16(v) => headers.extend_from_slice(&v.to_be_bytes()),
                    HeaderValue::Int32(v) => headers.extend_from_slice(&v.to_be_bytes()),
                    HeaderValue::Int64(v) | HeaderValue::Timestamp(v) => {
                        headers.extend_from_slice(&v.to_be_bytes())
                    }
                    HeaderValue::Bytes(b) => {
                        assert!(b.len() <= MAX_HEADER_VALUE_LEN, "{name}: value too long");
                        headers.extend_from_slice(&(b.len() as u16).to_be_bytes());
                        headers.extend_from_slice(b);
                    }
                    HeaderValue::String(s) => {
                        assert!(s.len() <= MAX_HEADER_VALUE_LEN, "{name}: value too long");
                        headers.extend_from_slice(&(s.len() as u16).to_be_bytes());
                        headers.extend_from_slice(s.as_bytes());
                    }
                    HeaderValue::Uuid(u) => headers.extend_from_slice(u),
                }
            }
            let total = MIN_FRAME_LEN + headers.len() + self.payload.len();
            let mut out = Vec::with_capacity(total);
            out.extend_from_slice(&(total as u32).to_be_bytes());
            out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
            let prelude_crc = crc32(&out);
            out.extend_from_slice(&prelude_crc.to_be_bytes());
            out.extend_from_slice(&headers);
            out.extend_from_slice(&self.payload);
            let message_crc = crc32(&out);
            out.extend_from_slice(&message_crc.to_be_bytes());
            out
        }

        /// Decode exactly one frame (both CRCs checked).
        pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
            match split_frame(bytes)? {
                Some((frame, used)) if used == bytes.len() => Ok(frame),
                Some((_, used)) => Err(DecodeError::TrailingBytes(bytes.len() - used)),
                None => {
                    let need = decode_prelude(bytes)
                        .map(|p| p.total_len as usize)
                        .unwrap_or(PRELUDE_LEN);
                    Err(DecodeError::Truncated {
                        need,
                        have: bytes.len(),
                    })
                }
            }
        }
    }

    /// Split the first frame off `buf`: `Ok(None)` while more bytes are needed.
    pub fn split_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        if buf.len() < PRELUDE_LEN {
            return Ok(None);
        }
        let prelude = decode_prelude(buf)?;
        let total = prelude.total_len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let stated = u32::from_be_bytes(buf[total - 4..total].try_into().unwrap());
        let computed = crc32(&buf[..total - 4]);
        if stated != computed {
            return Err(DecodeError::MessageCrc { stated, computed });
        }
        let headers_end = PRELUDE_LEN + prelude.headers_len as usize;
        let headers = decode_headers(&buf[PRELUDE_LEN..headers_end])?;
        let payload = buf[headers_end..total - 4].to_vec();
        Ok(Some((Frame { headers, payload }, total)))
    }
}

// ------------------------------------------------------------------ RPC constants

/// `:message-type` values and `:message-flags` bits of the event-stream RPC layer (IPC.md §2.1).
pub mod rpc {
    pub const APPLICATION_MESSAGE: i32 = 0;
    pub const APPLICATION_ERROR: i32 = 1;
    pub const PING: i32 = 2;
    pub const PING_RESPONSE: i32 = 3;
    pub const CONNECT: i32 = 4;
    pub const CONNECT_ACK: i32 = 5;
    pub const PROTOCOL_ERROR: i32 = 6;
    pub const INTERNAL_ERROR: i32 = 7;

    pub const CONNECTION_ACCEPTED: i32 = 1;
    pub const TERMINATE_STREAM: i32 = 2;

    pub const VERSION: &str = "0.1.0";
    pub const JSON: &str = "application/json";
    /// Prefix of every operation and model name.
    pub const NS: &str = "aws.greengrass#";
}

// ------------------------------------------------------------------ public types

/// Which real server the fake imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NucleusMode {
    /// The Java Greengrass nucleus (aws-greengrass-nucleus with the Java event-stream server).
    Java,
    /// Greengrass nucleus lite (ggipcd), as observed at 2.6.0.
    Lite,
}

/// Nucleus lite's frame cap (`GGL_IPC_MAX_MSG_LEN`). The fake closes the connection on a client
/// frame whose total length exceeds it. (Real ggipcd compares the length after the 12-byte
/// prelude against it, so it would still take up to 10,012 bytes: the fake is 12 bytes stricter,
/// which only matters to a client that cuts it that fine.)
pub const LITE_MAX_FRAME: usize = 10_000;
/// The Java nucleus's cap: aws-c-event-stream's 24 MiB.
pub const JAVA_MAX_FRAME: usize = 24 * 1024 * 1024;
/// The Java nucleus's default `maxMessageSizeInBytes` for PublishToIoTCore payloads.
pub const JAVA_MAX_PUBLISH_PAYLOAD: usize = 131_072;

/// A modelled error (`aws.greengrass#<code>`), e.g. `UnauthorizedError`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelledError {
    /// The shape name without namespace: `ServiceError`, `UnauthorizedError`, ...
    pub code: String,
    pub message: String,
}

impl ModelledError {
    pub fn new(code: &str, message: &str) -> ModelledError {
        ModelledError {
            code: code.to_string(),
            message: message.to_string(),
        }
    }

    /// What the Java nucleus answers when the mqttproxy policy denies a topic.
    pub fn unauthorized() -> ModelledError {
        ModelledError::new("UnauthorizedError", "Not Authorized")
    }

    pub fn service(message: &str) -> ModelledError {
        ModelledError::new("ServiceError", message)
    }

    pub fn invalid_arguments(message: &str) -> ModelledError {
        ModelledError::new("InvalidArgumentsError", message)
    }

    pub fn resource_not_found(message: &str) -> ModelledError {
        ModelledError::new("ResourceNotFoundError", message)
    }

    /// The Java spooler's rejection of a publish when the spool is full (IPC.md §7.1).
    pub fn spool_full(topic: &str) -> ModelledError {
        ModelledError::service(&format!(
            "Publish to topic {topic} failed: Message spool is full. Message could not be added."
        ))
    }
}

/// A PublishToIoTCore request as the fake decoded it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IotPublish {
    /// Connection id (see `ConnectionInfo::id`).
    pub conn: u64,
    pub stream_id: i32,
    pub topic: String,
    pub qos: u8,
    /// The payload, base64-decoded.
    pub payload: Vec<u8>,
    pub retain: Option<bool>,
    pub user_properties: Vec<(String, String)>,
    pub message_expiry_interval_seconds: Option<u64>,
    pub correlation_data: Option<Vec<u8>>,
    pub response_topic: Option<String>,
    /// `"0"` (bytes) or `"1"` (UTF-8), as sent.
    pub payload_format: Option<String>,
    pub content_type: Option<String>,
    /// Total length of the request frame.
    pub frame_len: usize,
    /// The request JSON as received.
    pub request: Value,
}

/// How the fake answers a PublishToIoTCore that passed validation (`set_publish_policy`).
#[derive(Clone, Debug)]
pub enum PublishReply {
    /// `PublishToIoTCoreResponse {}`: the message is spooled (and counts in `publishes()`).
    Accept,
    /// A modelled error.
    Reject(ModelledError),
    /// `inner`, after a delay (other streams carry on meanwhile).
    Delay(Duration, Box<PublishReply>),
    /// Never answer (a hung nucleus).
    NoReply,
    /// Close the client's connection instead of answering (the nucleus dying mid-call).
    CloseConnection,
}

impl PublishReply {
    pub fn unauthorized() -> PublishReply {
        PublishReply::Reject(ModelledError::unauthorized())
    }

    pub fn spool_full(publish: &IotPublish) -> PublishReply {
        PublishReply::Reject(ModelledError::spool_full(&publish.topic))
    }

    pub fn service_error(message: &str) -> PublishReply {
        PublishReply::Reject(ModelledError::service(message))
    }
}

/// What finally happened to a publish attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum PublishOutcome {
    Accepted,
    /// Answered with this error: by validation (like the real nucleus) or by the policy.
    Rejected(ModelledError),
    NoReply,
    /// The policy closed the connection, or the connection was gone when a delayed reply was due.
    ConnectionClosed,
}

/// One PublishToIoTCore request and its outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishAttempt {
    pub publish: IotPublish,
    pub outcome: PublishOutcome,
}

/// An active SubscribeToIoTCore stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IotSubscription {
    pub conn: u64,
    pub stream_id: i32,
    pub filter: String,
    pub qos: u8,
}

/// A SendConfigurationValidityReport the fake accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidityReport {
    /// `ACCEPTED` or `REJECTED`.
    pub status: String,
    pub deployment_id: String,
    pub message: Option<String>,
}

/// A connection that completed the handshake.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionInfo {
    pub id: u64,
    pub open: bool,
    /// The Connect payload.
    pub connect_payload: Value,
}

/// A handshake the fake refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFailure {
    pub conn: u64,
    pub reason: String,
}

/// A client protocol violation (stream rules, bad CRC, oversize frame, ...) that made the fake
/// close the connection (or, for lite's missing `operation`, answer an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub conn: u64,
    pub reason: String,
}

/// A client frame over `LITE_MAX_FRAME` in Lite mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OversizeFrame {
    pub conn: u64,
    pub total_len: usize,
}

/// Any operation request a client made (first message of a stream).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub conn: u64,
    pub stream_id: i32,
    /// Without the `aws.greengrass#` prefix, e.g. `GetConfiguration`.
    pub operation: String,
    /// The payload as JSON (`Value::Null` if it was not JSON).
    pub payload: Value,
    pub frame_len: usize,
}

type PublishPolicy = Box<dyn FnMut(&IotPublish) -> PublishReply + Send>;

/// The fake's client device auth (`aws.greengrass.clientdevices.Auth`, a plugin of the Java
/// nucleus): registered device certificates, one policy for every device (CDA's
/// `deviceGroups` reduced to one group), session tokens, and the broker's server certificate.
#[derive(Default)]
struct ClientDeviceAuth {
    /// Registered certificates (PEM without white space) -> thing name.
    devices: HashMap<String, String>,
    /// (operation, resource pattern): `*` matches anything, `${iot:Connection.Thing.ThingName}`
    /// is the device's thing name.
    policy: Vec<(String, String)>,
    /// Session token -> thing name.
    tokens: HashMap<String, String>,
    next_token: u64,
    /// The `certificateUpdate` of the current server certificate.
    server_certificate: Option<Value>,
    /// Every AuthorizeClientDeviceAction: (thing or "?", operation, resource, answer).
    decisions: Vec<(String, String, String, bool)>,
}

fn pem_key(pem: &str) -> String {
    pem.chars().filter(|c| !c.is_whitespace()).collect()
}

/// `*` glob match.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

impl ClientDeviceAuth {
    fn allows(&self, thing: &str, operation: &str, resource: &str) -> bool {
        self.policy.iter().any(|(op, res)| {
            let res = res.replace("${iot:Connection.Thing.ThingName}", thing);
            (op == operation || op == "mqtt:*" || op == "*") && glob(&res, resource)
        })
    }
}

// ------------------------------------------------------------------ shared state

enum Out {
    Frame(Vec<u8>),
    Close(String),
}

#[derive(Clone, Debug)]
struct StreamEntry {
    operation: String,
    open: bool,
}

struct ConnEntry {
    tx: mpsc::Sender<Out>,
    connected: bool,
    last_stream_id: i32,
    streams: HashMap<i32, StreamEntry>,
}

#[derive(Clone, Debug)]
enum Subscription {
    IotCore(IotSubscription),
    ConfigUpdate {
        conn: u64,
        stream_id: i32,
        component: String,
        key_path: Vec<String>,
    },
    ValidateConfig {
        conn: u64,
        stream_id: i32,
    },
    /// SubscribeToCertificateUpdates (client device auth).
    Certificates {
        conn: u64,
        stream_id: i32,
    },
}

impl Subscription {
    fn stream(&self) -> (u64, i32) {
        match self {
            Subscription::IotCore(s) => (s.conn, s.stream_id),
            Subscription::ConfigUpdate {
                conn, stream_id, ..
            }
            | Subscription::ValidateConfig { conn, stream_id }
            | Subscription::Certificates { conn, stream_id } => (*conn, *stream_id),
        }
    }
}

const LOG_LINES: usize = 600;

#[derive(Default)]
struct State {
    config: Value,
    other_configs: BTreeMap<String, Value>,
    conns: HashMap<u64, ConnEntry>,
    connections: Vec<ConnectionInfo>,
    connect_failures: Vec<ConnectFailure>,
    violations: Vec<Violation>,
    oversize: Vec<OversizeFrame>,
    max_client_frame: usize,
    requests: Vec<Request>,
    publish_attempts: Vec<PublishAttempt>,
    states: Vec<String>,
    validity_reports: Vec<ValidityReport>,
    pending_validations: BTreeSet<String>,
    subscriptions: Vec<Subscription>,
    operation_errors: HashMap<String, ModelledError>,
    client_devices: ClientDeviceAuth,
    log: VecDeque<String>,
    log_dropped: usize,
}

impl State {
    fn log(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
            self.log_dropped += 1;
        }
        self.log.push_back(line);
    }

    /// Queue a frame to a connection (dropped if it is gone).
    fn send(&mut self, conn: u64, frame: &Frame) {
        let bytes = frame.encode();
        self.log(format!("#{conn} S>C {}", describe(frame, bytes.len())));
        let Some(entry) = self.conns.get(&conn) else {
            self.log(format!("#{conn} (connection gone, frame dropped)"));
            return;
        };
        if entry.tx.try_send(Out::Frame(bytes)).is_err() {
            self.log(format!(
                "#{conn} outbound queue full or closed: frame dropped"
            ));
        }
    }

    fn close(&mut self, conn: u64, reason: &str) {
        if let Some(entry) = self.conns.get(&conn) {
            let _ = entry.tx.try_send(Out::Close(reason.to_string()));
        }
    }

    fn stream_open(&self, conn: u64, stream_id: i32) -> bool {
        self.conns
            .get(&conn)
            .and_then(|c| c.streams.get(&stream_id))
            .is_some_and(|s| s.open)
    }

    fn close_stream(&mut self, conn: u64, stream_id: i32) {
        if let Some(s) = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.streams.get_mut(&stream_id))
        {
            s.open = false;
        }
        self.subscriptions
            .retain(|s| s.stream() != (conn, stream_id));
    }

    fn violation(&mut self, conn: u64, reason: String) {
        self.log(format!("#{conn} VIOLATION: {reason}"));
        self.violations.push(Violation { conn, reason });
    }
}

struct Shared {
    mode: NucleusMode,
    component: String,
    token: String,
    state: Mutex<State>,
    changed: Notify,
    publish_policy: Mutex<PublishPolicy>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the state, then wake every `wait_for`.
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.notify_waiters();
        r
    }

    fn max_frame(&self) -> usize {
        match self.mode {
            NucleusMode::Java => JAVA_MAX_FRAME,
            NucleusMode::Lite => LITE_MAX_FRAME,
        }
    }

    /// A unary or streaming operation's response.
    fn response_frame(&self, stream_id: i32, operation: &str, body: &Value, unary: bool) -> Frame {
        let flags = if unary && self.mode == NucleusMode::Java {
            rpc::TERMINATE_STREAM
        } else {
            0
        };
        Frame::rpc(rpc::APPLICATION_MESSAGE, flags, stream_id)
            .with(":content-type", HeaderValue::str(rpc::JSON))
            .with(
                "service-model-type",
                HeaderValue::String(format!("{}{operation}Response", rpc::NS)),
            )
            .with_payload(serde_json::to_vec(body).unwrap())
    }

    /// A stream event (`model` without namespace, e.g. `IoTCoreMessage`).
    fn event_frame(&self, stream_id: i32, model: &str, body: &Value) -> Frame {
        Frame::rpc(rpc::APPLICATION_MESSAGE, 0, stream_id)
            .with(":content-type", HeaderValue::str(rpc::JSON))
            .with(
                "service-model-type",
                HeaderValue::String(format!("{}{model}", rpc::NS)),
            )
            .with_payload(serde_json::to_vec(body).unwrap())
    }

    /// A modelled error: ApplicationError with TerminateStream, in the mode's JSON shape.
    fn error_frame(&self, stream_id: i32, error: &ModelledError) -> Frame {
        let body = match self.mode {
            NucleusMode::Java => json!({
                "_service": "aws.greengrass#GreengrassCoreIPC",
                "_message": error.message,
                "_errorCode": error.code,
                "message": error.message,
            }),
            NucleusMode::Lite => json!({"_message": error.message, "_errorCode": error.code}),
        };
        Frame::rpc(rpc::APPLICATION_ERROR, rpc::TERMINATE_STREAM, stream_id)
            .with(":content-type", HeaderValue::str(rpc::JSON))
            .with(
                "service-model-type",
                HeaderValue::String(format!("{}{}", rpc::NS, error.code)),
            )
            .with_payload(serde_json::to_vec(&body).unwrap())
    }

    /// Send a response and, for a Java unary one, forget the stream.
    fn respond(
        &self,
        st: &mut State,
        conn: u64,
        stream_id: i32,
        op: &str,
        body: Value,
        unary: bool,
    ) {
        let frame = self.response_frame(stream_id, op, &body, unary);
        st.send(conn, &frame);
        if unary && self.mode == NucleusMode::Java {
            st.close_stream(conn, stream_id);
        }
    }

    fn fail(&self, st: &mut State, conn: u64, stream_id: i32, error: &ModelledError) {
        let frame = self.error_frame(stream_id, error);
        st.send(conn, &frame);
        st.close_stream(conn, stream_id);
    }

    /// The mode's representation of configuration written by a deployment: nucleus lite loads
    /// YAML scalars as strings.
    fn as_deployed(&self, v: &Value) -> Value {
        match self.mode {
            NucleusMode::Java => v.clone(),
            NucleusMode::Lite => stringify_scalars(v),
        }
    }
}

fn describe(frame: &Frame, len: usize) -> String {
    let mut s = format!("[{len}B]");
    for (name, value) in &frame.headers {
        s.push_str(&format!(" {name}={value}"));
    }
    let payload = String::from_utf8_lossy(&frame.payload);
    if payload.len() > 240 {
        let mut cut = 240;
        while !payload.is_char_boundary(cut) {
            cut -= 1;
        }
        s.push_str(&format!(
            " payload={}...({} bytes)",
            &payload[..cut],
            frame.payload.len()
        ));
    } else {
        s.push_str(&format!(" payload={payload}"));
    }
    s
}

// ------------------------------------------------------------------ JSON helpers

/// Nucleus lite's view of deployed configuration: every scalar a string, null kept.
pub fn stringify_scalars(v: &Value) -> Value {
    match v {
        Value::Bool(b) => Value::String(b.to_string()),
        Value::Number(n) => Value::String(n.to_string()),
        Value::Array(a) => Value::Array(a.iter().map(stringify_scalars).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), stringify_scalars(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// RFC 7386 JSON merge patch (a `null` removes the key).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// UpdateConfiguration's merge: objects merge key by key, anything else replaces.
fn deep_merge(target: &mut Value, value: &Value) {
    match (target, value) {
        (Value::Object(t), Value::Object(v)) => {
            for (k, v) in v {
                deep_merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, v) => *t = v.clone(),
    }
}

/// Key paths of the leaves that differ between `old` and `new` (added, removed or changed;
/// a list is a leaf), sorted.
pub fn changed_leaf_paths(old: &Value, new: &Value) -> Vec<Vec<String>> {
    fn leaves(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            Value::Object(o) if !o.is_empty() => {
                for (k, v) in o {
                    prefix.push(k.clone());
                    leaves(v, prefix, out);
                    prefix.pop();
                }
            }
            _ => out.push(prefix.clone()),
        }
    }
    fn walk(old: &Value, new: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match (old, new) {
            (Value::Object(a), Value::Object(b)) => {
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    prefix.push(k.clone());
                    match (a.get(k), b.get(k)) {
                        (Some(x), Some(y)) => walk(x, y, prefix, out),
                        (Some(x), None) => leaves(x, prefix, out),
                        (None, Some(y)) => leaves(y, prefix, out),
                        (None, None) => {}
                    }
                    prefix.pop();
                }
            }
            _ if old != new => out.push(prefix.clone()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(old, new, &mut Vec::new(), &mut out);
    out
}

/// GetConfiguration's answer for `key_path` (IPC.md §4.5): the subtree for a container, else
/// `{leaf: value}`; `None` when the key does not exist.
pub fn config_at(config: &Value, key_path: &[String]) -> Option<Value> {
    let mut node = config;
    for k in key_path {
        node = node.as_object()?.get(k)?;
    }
    match (node, key_path.last()) {
        (Value::Object(_), _) | (_, None) => Some(node.clone()),
        (leaf, Some(name)) => Some(json!({ name.as_str(): leaf })),
    }
}

/// MQTT topic-filter matching (`+`, `#`, `$share/<group>/`, and `$` topics not matched by a
/// leading wildcard).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
        None => filter,
    };
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    if topic.starts_with('$') && matches!(f[0], "#" | "+") {
        return false;
    }
    for (i, level) in f.iter().enumerate() {
        if *level == "#" {
            return true;
        }
        match t.get(i) {
            Some(tl) if *level == "+" || level == tl => {}
            _ => return false,
        }
    }
    f.len() == t.len()
}

/// The Java nucleus's IoT Core topic rules (IotCoreTopicValidator, IPC.md §7.2): `None` if
/// `topic` is acceptable (as a publish topic, or as a subscription filter).
pub fn iot_topic_problem(topic: &str, filter: bool) -> Option<String> {
    if topic.is_empty() {
        return Some("topic must not be empty".into());
    }
    let mut counted = topic;
    if filter {
        if let Some(rest) = topic.strip_prefix("$share/") {
            counted = rest.split_once('/').map_or("", |(_, f)| f);
        }
    } else if let Some(rest) = topic.strip_prefix("$aws/rules/") {
        counted = rest.split_once('/').map_or("", |(_, t)| t);
    }
    if counted.len() > 256 {
        return Some(format!(
            "topic must be at most 256 bytes, this one has {}",
            counted.len()
        ));
    }
    if counted.matches('/').count() > 7 {
        return Some("topic must have at most 7 forward slashes".into());
    }
    let levels: Vec<&str> = topic.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains('#') || level.contains('+');
        if !wild {
            continue;
        }
        if !filter {
            return Some("topic must not contain wildcards".into());
        }
        let ok = *level == "+" || (*level == "#" && i == levels.len() - 1);
        if !ok {
            return Some(format!("invalid use of a wildcard in level {level:?}"));
        }
    }
    None
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

// ------------------------------------------------------------------ the server

/// A running fake nucleus. Dropping it stops it and removes its socket directory.
pub struct FakeNucleus {
    shared: Arc<Shared>,
    dir: TempDir,
    socket_path: PathBuf,
    thing_name: String,
    accept_task: tokio::task::JoinHandle<()>,
}

/// Options for `FakeNucleus::builder`.
pub struct FakeNucleusBuilder {
    mode: NucleusMode,
    component: String,
    config: Value,
    thing_name: String,
    token: Option<String>,
    other_configs: BTreeMap<String, Value>,
}

impl FakeNucleusBuilder {
    /// `AWS_IOT_THING_NAME` in `env()` (default `fake-thing`).
    pub fn thing_name(mut self, name: &str) -> Self {
        self.thing_name = name.to_string();
        self
    }

    /// A fixed auth token instead of a random one.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// Configuration of another component, readable with GetConfiguration's `componentName`.
    pub fn component_config(mut self, component: &str, config: Value) -> Self {
        self.other_configs.insert(component.to_string(), config);
        self
    }

    /// Bind the socket and start serving (needs a Tokio runtime).
    pub fn start(self) -> FakeNucleus {
        let dir = tempfile::Builder::new()
            .prefix("gg-nucleus-")
            .tempdir()
            .expect("tempdir for the fake nucleus");
        let socket_path = dir.path().join("ipc.socket");
        let listener = UnixListener::bind(&socket_path)
            .unwrap_or_else(|e| panic!("bind {}: {e}", socket_path.display()));
        let token = self.token.unwrap_or_else(|| random_token(self.mode));
        let mut state = State::default();
        let shared_mode = self.mode;
        let deployed = |v: &Value| match shared_mode {
            NucleusMode::Java => v.clone(),
            NucleusMode::Lite => stringify_scalars(v),
        };
        state.config = deployed(&self.config);
        state.other_configs = self
            .other_configs
            .iter()
            .map(|(k, v)| (k.clone(), deployed(v)))
            .collect();
        let shared = Arc::new(Shared {
            mode: self.mode,
            component: self.component,
            token,
            state: Mutex::new(state),
            changed: Notify::new(),
            publish_policy: Mutex::new(Box::new(|_: &IotPublish| PublishReply::Accept)),
        });
        let accept_shared = shared.clone();
        let accept_task = tokio::spawn(async move {
            let mut next_conn = 1u64;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = next_conn;
                next_conn += 1;
                let (tx, rx) = mpsc::channel(4096);
                accept_shared.with_state(|st| {
                    st.log(format!("#{conn} accepted"));
                    st.conns.insert(
                        conn,
                        ConnEntry {
                            tx,
                            connected: false,
                            last_stream_id: 0,
                            streams: HashMap::new(),
                        },
                    );
                });
                tokio::spawn(serve_connection(accept_shared.clone(), stream, conn, rx));
            }
        });
        FakeNucleus {
            shared,
            dir,
            socket_path,
            thing_name: self.thing_name,
            accept_task,
        }
    }
}

fn random_token(mode: NucleusMode) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    match mode {
        // The Java nucleus: 16 random upper-case letters.
        NucleusMode::Java => (0..16)
            .map(|_| rng.random_range(b'A'..=b'Z') as char)
            .collect(),
        // Nucleus lite: base64 of 12 random bytes.
        NucleusMode::Lite => {
            let bytes: [u8; 12] = rng.random();
            b64().encode(bytes)
        }
    }
}

impl FakeNucleus {
    /// Start a fake nucleus serving `component_name` with configuration `config` (a random
    /// token, thing name `fake-thing`).
    pub fn start(mode: NucleusMode, component_name: &str, config: Value) -> FakeNucleus {
        FakeNucleus::builder(mode, component_name, config).start()
    }

    pub fn builder(mode: NucleusMode, component_name: &str, config: Value) -> FakeNucleusBuilder {
        FakeNucleusBuilder {
            mode,
            component: component_name.to_string(),
            config,
            thing_name: "fake-thing".to_string(),
            token: None,
            other_configs: BTreeMap::new(),
        }
    }

    pub fn mode(&self) -> NucleusMode {
        self.shared.mode
    }

    pub fn component_name(&self) -> &str {
        &self.shared.component
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The SVCUID a component must present.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The environment the nucleus gives a component process (IPC.md §3): `SVCUID`,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN`, `AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`,
    /// `AWS_IOT_THING_NAME`, `AWS_REGION`, `AWS_DEFAULT_REGION`.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("SVCUID".to_string(), self.token().to_string()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN".to_string(),
                self.token().to_string(),
            ),
            (
                "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT".to_string(),
                self.socket_path.display().to_string(),
            ),
            ("AWS_IOT_THING_NAME".to_string(), self.thing_name.clone()),
        ];
        for var in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
            env.push((var.to_string(), "us-east-1".to_string()));
        }
        env
    }

    // -------------------------------------------------------------- records

    /// Publishes answered with success ("reached IoT Core"), in arrival order.
    pub fn publishes(&self) -> Vec<IotPublish> {
        self.shared
            .lock()
            .publish_attempts
            .iter()
            .filter(|a| a.outcome == PublishOutcome::Accepted)
            .map(|a| a.publish.clone())
            .collect()
    }

    /// Every PublishToIoTCore request with its outcome (rejections included; a `Delay`ed
    /// reply shows up once it is sent).
    pub fn publish_attempts(&self) -> Vec<PublishAttempt> {
        self.shared.lock().publish_attempts.clone()
    }

    /// Decide how validated publishes are answered (default: accept all). The policy runs on
    /// the fake's connection task: it must not call back into the fake.
    pub fn set_publish_policy(
        &self,
        policy: impl FnMut(&IotPublish) -> PublishReply + Send + 'static,
    ) {
        *self
            .shared
            .publish_policy
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Box::new(policy);
    }

    /// Make every request for `operation` (e.g. `"GetConfiguration"`) fail with `error`, or
    /// (with `None`) behave normally again.
    pub fn set_operation_error(&self, operation: &str, error: Option<ModelledError>) {
        self.shared.with_state(|st| match error {
            Some(e) => {
                st.operation_errors.insert(operation.to_string(), e);
            }
            None => {
                st.operation_errors.remove(operation);
            }
        });
    }

    /// UpdateState values, in order.
    pub fn states(&self) -> Vec<String> {
        self.shared.lock().states.clone()
    }

    /// Accepted SendConfigurationValidityReport reports, in order.
    pub fn validity_reports(&self) -> Vec<ValidityReport> {
        self.shared.lock().validity_reports.clone()
    }

    /// Active SubscribeToIoTCore streams.
    pub fn subscriptions(&self) -> Vec<IotSubscription> {
        self.shared
            .lock()
            .subscriptions
            .iter()
            .filter_map(|s| match s {
                Subscription::IotCore(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Active SubscribeToConfigurationUpdate streams: (component, keyPath).
    pub fn config_subscriptions(&self) -> Vec<(String, Vec<String>)> {
        self.shared
            .lock()
            .subscriptions
            .iter()
            .filter_map(|s| match s {
                Subscription::ConfigUpdate {
                    component,
                    key_path,
                    ..
                } => Some((component.clone(), key_path.clone())),
                _ => None,
            })
            .collect()
    }

    /// Number of active SubscribeToValidateConfigurationUpdates streams.
    pub fn validate_subscriptions(&self) -> usize {
        self.shared
            .lock()
            .subscriptions
            .iter()
            .filter(|s| matches!(s, Subscription::ValidateConfig { .. }))
            .count()
    }

    /// Connections that completed the handshake (open or not).
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.shared.lock().connections.clone()
    }

    pub fn open_connections(&self) -> usize {
        self.shared
            .lock()
            .connections
            .iter()
            .filter(|c| c.open)
            .count()
    }

    pub fn connect_failures(&self) -> Vec<ConnectFailure> {
        self.shared.lock().connect_failures.clone()
    }

    pub fn violations(&self) -> Vec<Violation> {
        self.shared.lock().violations.clone()
    }

    /// Every operation request, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// The largest total length of any frame a client sent (or announced, for a frame the
    /// fake refused to read).
    pub fn max_client_frame(&self) -> usize {
        self.shared.lock().max_client_frame
    }

    /// Client frames over the lite cap (Lite mode only).
    pub fn oversize_frames(&self) -> Vec<OversizeFrame> {
        self.shared.lock().oversize.clone()
    }

    /// The component configuration as the nucleus holds it (lite: scalars as strings).
    pub fn config(&self) -> Value {
        self.shared.lock().config.clone()
    }

    /// The last frames and events, one a line, for failure messages.
    pub fn frame_log(&self) -> String {
        let st = self.shared.lock();
        let mut s = String::new();
        if st.log_dropped > 0 {
            s.push_str(&format!("({} earlier lines dropped)\n", st.log_dropped));
        }
        for line in &st.log {
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    // -------------------------------------------------------------- actions

    /// A deployment changing the component configuration: apply the JSON merge patch and send
    /// one ConfigurationUpdateEvents per changed leaf key path to every matching
    /// SubscribeToConfigurationUpdate stream. Returns the changed paths.
    pub fn update_config(&self, patch: Value) -> Vec<Vec<String>> {
        let patch = self.shared.as_deployed(&patch);
        self.shared.with_state(|st| {
            let old = st.config.clone();
            merge_patch(&mut st.config, &patch);
            let changed = changed_leaf_paths(&old, &st.config);
            st.log(format!("config updated by the test: changed {changed:?}"));
            notify_config_change(&self.shared, st, &changed);
            changed
        })
    }

    /// Set (or replace) another component's configuration.
    pub fn set_component_config(&self, component: &str, config: Value) {
        let config = self.shared.as_deployed(&config);
        self.shared.with_state(|st| {
            st.other_configs.insert(component.to_string(), config);
        });
    }

    /// Client device auth: register a device certificate (PEM) as IoT thing `thing_name`.
    pub fn register_client_device(&self, certificate_pem: &str, thing_name: &str) {
        self.shared.with_state(|st| {
            st.client_devices
                .devices
                .insert(pem_key(certificate_pem), thing_name.to_string());
        });
    }

    /// Client device auth's policy for every device: `(operation, resource)` statements, e.g.
    /// `("mqtt:publish", "mqtt:topic:agents/${iot:Connection.Thing.ThingName}/*")`.
    pub fn set_client_device_policy(&self, statements: &[(&str, &str)]) {
        self.shared.with_state(|st| {
            st.client_devices.policy = statements
                .iter()
                .map(|(o, r)| (o.to_string(), r.to_string()))
                .collect();
        });
    }

    /// Forget every session token (as when client device auth restarts): the next
    /// AuthorizeClientDeviceAction with an old one gets InvalidClientDeviceAuthTokenError.
    pub fn expire_client_device_tokens(&self) {
        self.shared
            .with_state(|st| st.client_devices.tokens.clear());
    }

    /// Every AuthorizeClientDeviceAction answered: (thing, operation, resource, allowed).
    pub fn client_device_decisions(&self) -> Vec<(String, String, String, bool)> {
        self.shared
            .with_state(|st| st.client_devices.decisions.clone())
    }

    /// Rotate the broker's server certificate: stored for new subscribers and sent to every
    /// SubscribeToCertificateUpdates stream. Returns how many streams got it.
    pub fn rotate_server_certificate(
        &self,
        certificate: &str,
        private_key: &str,
        ca: &[String],
    ) -> usize {
        let update = json!({
            "certificate": certificate,
            "privateKey": private_key,
            "publicKey": "",
            "caCertificates": ca,
        });
        self.shared.with_state(|st| {
            st.client_devices.server_certificate = Some(update.clone());
            let targets: Vec<(u64, i32)> = st
                .subscriptions
                .iter()
                .filter_map(|s| match s {
                    Subscription::Certificates { conn, stream_id } => Some((*conn, *stream_id)),
                    _ => None,
                })
                .collect();
            let body = json!({"certificateUpdate": update});
            for (conn, stream_id) in &targets {
                let frame = self
                    .shared
                    .event_frame(*stream_id, "CertificateUpdateEvent", &body);
                st.send(*conn, &frame);
            }
            st.log(format!(
                "server certificate rotated, sent to {} stream(s)",
                targets.len()
            ));
            targets.len()
        })
    }

    /// Deliver an IoT Core message to every SubscribeToIoTCore stream whose filter matches
    /// `topic`. Returns how many streams it was sent to.
    pub fn send_iot_message(&self, topic: &str, payload: &[u8]) -> usize {
        let body = json!({"message": {"topicName": topic, "payload": b64().encode(payload)}});
        self.shared.with_state(|st| {
            let targets: Vec<(u64, i32)> = st
                .subscriptions
                .iter()
                .filter_map(|s| match s {
                    Subscription::IotCore(s) if topic_matches(&s.filter, topic) => {
                        Some((s.conn, s.stream_id))
                    }
                    _ => None,
                })
                .collect();
            for (conn, stream_id) in &targets {
                let frame = self.shared.event_frame(*stream_id, "IoTCoreMessage", &body);
                st.send(*conn, &frame);
            }
            st.log(format!(
                "IoT Core message on {topic} sent to {} subscription(s)",
                targets.len()
            ));
            targets.len()
        })
    }

    /// A deployment asking the component to validate `proposed` configuration: send a
    /// ValidateConfigurationUpdateEvents to every subscriber and wait (at most `timeout`) for
    /// the component's SendConfigurationValidityReport for `deployment_id`. Err if nobody is
    /// subscribed or no report came in time (the pending validation then times out, and a
    /// later report is refused like the Java nucleus does).
    pub async fn validate_config(
        &self,
        proposed: Value,
        deployment_id: &str,
        timeout: Duration,
    ) -> Result<ValidityReport, String> {
        let proposed = self.shared.as_deployed(&proposed);
        let already = self.validity_reports().len();
        let sent = self.shared.with_state(|st| {
            let targets: Vec<(u64, i32)> = st
                .subscriptions
                .iter()
                .filter_map(|s| match s {
                    Subscription::ValidateConfig { conn, stream_id } => Some((*conn, *stream_id)),
                    _ => None,
                })
                .collect();
            if !targets.is_empty() {
                st.pending_validations.insert(deployment_id.to_string());
            }
            let body = json!({"validateConfigurationUpdateEvent": {
                "configuration": proposed,
                "deploymentId": deployment_id,
            }});
            for (conn, stream_id) in &targets {
                let frame =
                    self.shared
                        .event_frame(*stream_id, "ValidateConfigurationUpdateEvents", &body);
                st.send(*conn, &frame);
            }
            targets.len()
        });
        if sent == 0 {
            return Err("no SubscribeToValidateConfigurationUpdates subscriber".into());
        }
        let found = self
            .try_wait_for(timeout, |n| {
                n.validity_reports()[already..]
                    .iter()
                    .find(|r| r.deployment_id == deployment_id)
                    .cloned()
            })
            .await;
        self.shared.with_state(|st| {
            st.pending_validations.remove(deployment_id);
        });
        found.ok_or_else(|| {
            format!("no validity report for deployment {deployment_id} within {timeout:?}")
        })
    }

    /// The nucleus going away: close every client connection (the socket keeps accepting).
    pub fn close_connections(&self) {
        self.shared.with_state(|st| {
            let conns: Vec<u64> = st.conns.keys().copied().collect();
            for conn in conns {
                st.close(conn, "close_connections");
            }
        });
    }

    /// Stop accepting (the socket file is removed) and close every connection.
    pub fn shutdown(&self) {
        self.accept_task.abort();
        let _ = std::fs::remove_file(&self.socket_path);
        self.close_connections();
    }

    // -------------------------------------------------------------- waiting

    /// Wait until `f` returns `Some` (re-checked on every change of the fake's state), or
    /// panic after `timeout` naming `what`, with the frame log.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&FakeNucleus) -> Option<T>,
    ) -> T {
        match self.try_wait_for(timeout, f).await {
            Some(v) => v,
            None => panic!(
                "fake nucleus: timed out after {timeout:?} waiting for {what}\n--- frame log ---\n{}",
                self.frame_log()
            ),
        }
    }

    /// `wait_for` returning `None` at the deadline instead of panicking.
    pub async fn try_wait_for<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&FakeNucleus) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = f(self) {
                return Some(v);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return f(self);
            }
        }
    }

    /// Wait for at least `n` accepted publishes; returns them all.
    pub async fn wait_for_publishes(&self, n: usize, timeout: Duration) -> Vec<IotPublish> {
        self.wait_for(&format!("{n} accepted publishes"), timeout, |f| {
            let p = f.publishes();
            (p.len() >= n).then_some(p)
        })
        .await
    }

    /// Wait for an UpdateState with `state`.
    pub async fn wait_for_state(&self, state: &str, timeout: Duration) {
        self.wait_for(&format!("UpdateState {state}"), timeout, |f| {
            f.states().iter().any(|s| s == state).then_some(())
        })
        .await
    }

    /// Wait for an active SubscribeToIoTCore with exactly this filter.
    pub async fn wait_for_subscription(&self, filter: &str, timeout: Duration) -> IotSubscription {
        self.wait_for(&format!("a SubscribeToIoTCore on {filter}"), timeout, |f| {
            f.subscriptions().into_iter().find(|s| s.filter == filter)
        })
        .await
    }

    /// Wait for at least `n` completed handshakes.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) -> Vec<ConnectionInfo> {
        self.wait_for(&format!("{n} connections"), timeout, |f| {
            let c = f.connections();
            (c.len() >= n).then_some(c)
        })
        .await
    }
}

impl Drop for FakeNucleus {
    fn drop(&mut self) {
        self.accept_task.abort();
        let st = self.shared.lock();
        for entry in st.conns.values() {
            let _ = entry.tx.try_send(Out::Close("fake nucleus dropped".into()));
        }
    }
}

/// Send ConfigurationUpdateEvents for `changed` paths of the served component.
fn notify_config_change(shared: &Shared, st: &mut State, changed: &[Vec<String>]) {
    let targets: Vec<(u64, i32, Vec<String>)> = st
        .subscriptions
        .iter()
        .filter_map(|s| match s {
            Subscription::ConfigUpdate {
                conn,
                stream_id,
                component,
                key_path,
            } if *component == shared.component => Some((*conn, *stream_id, key_path.clone())),
            _ => None,
        })
        .collect();
    for path in changed {
        for (conn, stream_id, watched) in &targets {
            let related = path.starts_with(watched) || watched.starts_with(path);
            if !related {
                continue;
            }
            let body = json!({"configurationUpdateEvent": {
                "componentName": shared.component,
                "keyPath": path,
            }});
            let frame = shared.event_frame(*stream_id, "ConfigurationUpdateEvents", &body);
            st.send(*conn, &frame);
        }
    }
}

// ------------------------------------------------------------------ one connection

enum Flow {
    Continue,
    /// A ProtocolError and a close are queued: read nothing more.
    Closing,
    /// Close the socket now (after flushing what is already queued).
    CloseNow(String),
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    conn: u64,
    mut rx: mpsc::Receiver<Out>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 64 * 1024];
    let mut reading = true;
    let reason = loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Frame(bytes)) => {
                    if let Err(e) = wr.write_all(&bytes).await {
                        break format!("write failed: {e}");
                    }
                }
                Some(Out::Close(reason)) => break reason,
                None => break "channel closed".to_string(),
            },
            r = rd.read(&mut tmp), if reading => match r {
                Ok(0) => break "client closed the connection".to_string(),
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    match process_input(&shared, conn, &mut buf) {
                        Flow::Continue => {}
                        Flow::Closing => reading = false,
                        Flow::CloseNow(reason) => {
                            // Like the real servers, answers to earlier frames are out first.
                            while let Ok(Out::Frame(bytes)) = rx.try_recv() {
                                if wr.write_all(&bytes).await.is_err() {
                                    break;
                                }
                            }
                            break reason;
                        }
                    }
                }
                Err(e) => break format!("read failed: {e}"),
            },
        }
    };
    let _ = wr.shutdown().await;
    drop(wr);
    drop(rd);
    shared.with_state(|st| {
        st.log(format!("#{conn} closed: {reason}"));
        st.conns.remove(&conn);
        st.subscriptions.retain(|s| s.stream().0 != conn);
        for c in st.connections.iter_mut().filter(|c| c.id == conn) {
            c.open = false;
        }
    });
}

/// Handle every complete frame in `buf`.
fn process_input(shared: &Arc<Shared>, conn: u64, buf: &mut Vec<u8>) -> Flow {
    loop {
        if buf.len() < eventstream::PRELUDE_LEN {
            return Flow::Continue;
        }
        let prelude = match eventstream::decode_prelude(buf) {
            Ok(p) => p,
            Err(e) => {
                let reason = format!("undecodable prelude: {e}");
                shared.with_state(|st| st.violation(conn, reason.clone()));
                return Flow::CloseNow(reason);
            }
        };
        let total = prelude.total_len as usize;
        shared.with_state(|st| st.max_client_frame = st.max_client_frame.max(total));
        if total > shared.max_frame() {
            let reason = format!(
                "frame of {total} bytes exceeds the {:?} nucleus's {} byte cap",
                shared.mode,
                shared.max_frame()
            );
            shared.with_state(|st| {
                if shared.mode == NucleusMode::Lite {
                    st.oversize.push(OversizeFrame {
                        conn,
                        total_len: total,
                    });
                }
                st.violation(conn, reason.clone());
            });
            return Flow::CloseNow(reason);
        }
        if buf.len() < total {
            return Flow::Continue;
        }
        let bytes: Vec<u8> = buf.drain(..total).collect();
        let frame = match Frame::decode(&bytes) {
            Ok(f) => f,
            Err(e) => {
                let reason = format!("undecodable frame: {e}");
                shared.with_state(|st| st.violation(conn, reason.clone()));
                return Flow::CloseNow(reason);
            }
        };
        shared.with_state(|st| st.log(format!("#{conn} C>S {}", describe(&frame, total))));
        match handle_frame(shared, conn, &frame, total) {
            Flow::Continue => {}
            other => return other,
        }
    }
}

/// A protocol violation: Java sends a ProtocolError and closes; nucleus lite just closes.
fn protocol_violation(shared: &Shared, conn: u64, reason: &str) -> Flow {
    shared.with_state(|st| {
        st.violation(conn, reason.to_string());
        match shared.mode {
            NucleusMode::Java => {
                let frame = Frame::rpc(rpc::PROTOCOL_ERROR, 0, 0)
                    .with(":content-type", HeaderValue::str(rpc::JSON))
                    .with_payload(serde_json::to_vec(&json!({ "message": reason })).unwrap());
                st.send(conn, &frame);
                st.close(conn, reason);
                Flow::Closing
            }
            NucleusMode::Lite => Flow::CloseNow(reason.to_string()),
        }
    })
}

fn handle_frame(shared: &Arc<Shared>, conn: u64, frame: &Frame, frame_len: usize) -> Flow {
    let Some(message_type) = frame.message_type() else {
        return protocol_violation(shared, conn, "frame without an INT32 :message-type");
    };
    let Some(stream_id) = frame.stream_id() else {
        return protocol_violation(shared, conn, "frame without an INT32 :stream-id");
    };
    let connected = shared.lock().conns.get(&conn).is_some_and(|c| c.connected);
    if !connected {
        if message_type != rpc::CONNECT {
            return protocol_violation(
                shared,
                conn,
                &format!("message type {message_type} before the Connect handshake"),
            );
        }
        return handle_connect(shared, conn, frame, stream_id);
    }
    match message_type {
        rpc::APPLICATION_MESSAGE | rpc::APPLICATION_ERROR => {}
        rpc::PING if shared.mode == NucleusMode::Java && stream_id == 0 => {
            let mut pong = Frame::rpc(rpc::PING_RESPONSE, 0, 0).with_payload(frame.payload.clone());
            for (name, value) in &frame.headers {
                if !name.starts_with(':') {
                    pong.headers.push((name.clone(), value.clone()));
                }
            }
            shared.with_state(|st| st.send(conn, &pong));
            return Flow::Continue;
        }
        rpc::PING_RESPONSE if shared.mode == NucleusMode::Java && stream_id == 0 => {
            return Flow::Continue;
        }
        rpc::PING if shared.mode == NucleusMode::Lite => {
            return protocol_violation(shared, conn, "Ping: nucleus lite has no Ping support");
        }
        other => {
            return protocol_violation(
                shared,
                conn,
                &format!("unexpected message type {other} on stream {stream_id} after Connect"),
            );
        }
    }
    if stream_id <= 0 {
        return protocol_violation(
            shared,
            conn,
            &format!("application message on stream {stream_id}: stream ids must be positive"),
        );
    }
    let terminate = frame.flags() & rpc::TERMINATE_STREAM != 0;
    enum Kind {
        New,
        Open,
        Closed,
        Unknown(i32),
    }
    let kind = {
        let st = shared.lock();
        let entry = &st.conns[&conn];
        if stream_id > entry.last_stream_id {
            if stream_id == entry.last_stream_id + 1 {
                Kind::New
            } else {
                Kind::Unknown(entry.last_stream_id)
            }
        } else {
            match entry.streams.get(&stream_id) {
                Some(s) if s.open => Kind::Open,
                Some(_) => Kind::Closed,
                None => Kind::Unknown(entry.last_stream_id),
            }
        }
    };
    match kind {
        Kind::Unknown(last) if stream_id > last => protocol_violation(
            shared,
            conn,
            &format!(
                "new stream id {stream_id} after {last}: stream ids must be incremented by exactly 1"
            ),
        ),
        Kind::Unknown(last) => protocol_violation(
            shared,
            conn,
            &format!("stream id {stream_id} is lower than the last seen ({last}) and unknown"),
        ),
        Kind::Closed if terminate => Flow::Continue,
        Kind::Closed => protocol_violation(
            shared,
            conn,
            &format!("message on closed stream {stream_id}"),
        ),
        Kind::Open if terminate => {
            shared.with_state(|st| {
                st.close_stream(conn, stream_id);
                st.log(format!("#{conn} stream {stream_id} closed by the client"));
            });
            Flow::Continue
        }
        Kind::Open => {
            shared.with_state(|st| {
                st.log(format!(
                    "#{conn} ignored a client message on open stream {stream_id}"
                ))
            });
            Flow::Continue
        }
        Kind::New => {
            let Some(operation) = frame.string("operation").map(str::to_string) else {
                return match shared.mode {
                    NucleusMode::Java => protocol_violation(
                        shared,
                        conn,
                        &format!("first message of stream {stream_id} has no operation header"),
                    ),
                    // ggipcd answers a ServiceError (with an empty message) instead.
                    NucleusMode::Lite => {
                        shared.with_state(|st| {
                            let entry = st.conns.get_mut(&conn).unwrap();
                            entry.last_stream_id = stream_id;
                            st.violation(
                                conn,
                                format!(
                                    "first message of stream {stream_id} has no operation header"
                                ),
                            );
                            shared.fail(st, conn, stream_id, &ModelledError::service(""));
                        });
                        Flow::Continue
                    }
                };
            };
            shared.with_state(|st| {
                let entry = st.conns.get_mut(&conn).unwrap();
                entry.last_stream_id = stream_id;
                entry.streams.insert(
                    stream_id,
                    StreamEntry {
                        operation: operation.clone(),
                        open: !terminate,
                    },
                );
            });
            if terminate {
                // The Java server skips the operation of a stream opened with TerminateStream.
                return Flow::Continue;
            }
            dispatch(shared, conn, stream_id, &operation, frame, frame_len);
            Flow::Continue
        }
    }
}

fn handle_connect(shared: &Shared, conn: u64, frame: &Frame, stream_id: i32) -> Flow {
    let payload: Value = serde_json::from_slice(&frame.payload).unwrap_or(Value::Null);
    let problem = if stream_id != 0 {
        Some(format!("Connect on stream {stream_id}"))
    } else if shared.mode == NucleusMode::Lite && frame.flags() != 0 {
        Some("Connect with flags set".to_string())
    } else {
        match (shared.mode, frame.string(":version")) {
            (_, Some(v)) if v != rpc::VERSION => Some(format!(":version {v:?} is not 0.1.0")),
            (NucleusMode::Java, None) => Some("Connect without :version".to_string()),
            _ => match payload.get("authToken").and_then(Value::as_str) {
                None => Some(format!("no authToken in the Connect payload {payload}")),
                Some(t) if t != shared.token => Some(format!("bad authToken {t:?}")),
                Some(_) => None,
            },
        }
    };
    shared.with_state(|st| match problem {
        None => {
            st.conns.get_mut(&conn).unwrap().connected = true;
            st.connections.push(ConnectionInfo {
                id: conn,
                open: true,
                connect_payload: payload,
            });
            let ack = Frame::rpc(rpc::CONNECT_ACK, rpc::CONNECTION_ACCEPTED, 0);
            st.send(conn, &ack);
            Flow::Continue
        }
        Some(reason) => {
            st.log(format!("#{conn} connect refused: {reason}"));
            st.connect_failures.push(ConnectFailure {
                conn,
                reason: reason.clone(),
            });
            match shared.mode {
                NucleusMode::Java => {
                    st.send(conn, &Frame::rpc(rpc::CONNECT_ACK, 0, 0));
                    st.close(conn, &reason);
                    Flow::Closing
                }
                NucleusMode::Lite => Flow::CloseNow(reason),
            }
        }
    })
}

fn str_list(v: Option<&Value>) -> Result<Vec<String>, ()> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or(()))
            .collect(),
        Some(_) => Err(()),
    }
}

/// Run an operation request (the first message of a new stream).
fn dispatch(
    shared: &Arc<Shared>,
    conn: u64,
    stream_id: i32,
    operation: &str,
    frame: &Frame,
    frame_len: usize,
) {
    let mode = shared.mode;
    let op = operation
        .strip_prefix(rpc::NS)
        .unwrap_or(operation)
        .to_string();
    let body: Option<Value> = serde_json::from_slice(&frame.payload)
        .ok()
        .filter(Value::is_object);
    let lite_invalid = || ModelledError::service("");
    shared.with_state(|st| {
        st.requests.push(Request {
            conn,
            stream_id,
            operation: op.clone(),
            payload: body.clone().unwrap_or(Value::Null),
            frame_len,
        })
    });
    let Some(body) = body else {
        shared.with_state(|st| match mode {
            // An unmodelled failure of the Java server.
            NucleusMode::Java => {
                let f = Frame::rpc(rpc::APPLICATION_ERROR, rpc::TERMINATE_STREAM, stream_id)
                    .with(":content-type", HeaderValue::str("text/plain"))
                    .with_payload(&b"InternalServerError"[..]);
                st.send(conn, &f);
                st.close_stream(conn, stream_id);
            }
            NucleusMode::Lite => shared.fail(st, conn, stream_id, &lite_invalid()),
        });
        return;
    };
    if let Some(err) = shared.lock().operation_errors.get(&op).cloned() {
        shared.with_state(|st| shared.fail(st, conn, stream_id, &err));
        return;
    }
    match op.as_str() {
        "GetConfiguration" => shared.with_state(|st| {
            let component = body
                .get("componentName")
                .and_then(Value::as_str)
                .unwrap_or(&shared.component)
                .to_string();
            let Ok(key_path) = str_list(body.get("keyPath")) else {
                let e = match mode {
                    NucleusMode::Java => {
                        ModelledError::invalid_arguments("keyPath must be a list of strings")
                    }
                    NucleusMode::Lite => ModelledError::service("Received invalid parameters."),
                };
                return shared.fail(st, conn, stream_id, &e);
            };
            let config = if component == shared.component {
                Some(&st.config)
            } else {
                st.other_configs.get(&component)
            };
            match config.and_then(|c| config_at(c, &key_path)) {
                Some(value) => shared.respond(
                    st,
                    conn,
                    stream_id,
                    &op,
                    json!({"componentName": component, "value": value}),
                    true,
                ),
                None => {
                    let msg = match mode {
                        NucleusMode::Java => "Key not found",
                        NucleusMode::Lite => "Key not found.",
                    };
                    shared.fail(st, conn, stream_id, &ModelledError::resource_not_found(msg))
                }
            }
        }),
        "UpdateConfiguration" => shared.with_state(|st| {
            let key_path = str_list(body.get("keyPath"));
            let value = body.get("valueToMerge");
            let (Ok(key_path), Some(value)) = (key_path, value) else {
                let e = match mode {
                    NucleusMode::Java => {
                        ModelledError::invalid_arguments("valueToMerge is required")
                    }
                    NucleusMode::Lite => ModelledError::service("Received invalid parameters."),
                };
                return shared.fail(st, conn, stream_id, &e);
            };
            let old = st.config.clone();
            let mut node = &mut st.config;
            for k in &key_path {
                if !node.is_object() {
                    *node = Value::Object(Map::new());
                }
                node = node
                    .as_object_mut()
                    .unwrap()
                    .entry(k.clone())
                    .or_insert(Value::Null);
            }
            // Values written through UpdateConfiguration keep their JSON types, in lite too.
            deep_merge(node, value);
            let changed = changed_leaf_paths(&old, &st.config);
            shared.respond(st, conn, stream_id, &op, json!({}), true);
            notify_config_change(shared, st, &changed);
        }),
        "SubscribeToConfigurationUpdate" => shared.with_state(|st| {
            let component = body
                .get("componentName")
                .and_then(Value::as_str)
                .unwrap_or(&shared.component)
                .to_string();
            let Ok(key_path) = str_list(body.get("keyPath")) else {
                let e = match mode {
                    NucleusMode::Java => {
                        ModelledError::invalid_arguments("keyPath must be a list of strings")
                    }
                    NucleusMode::Lite => ModelledError::service("Received invalid parameters."),
                };
                return shared.fail(st, conn, stream_id, &e);
            };
            st.subscriptions.push(Subscription::ConfigUpdate {
                conn,
                stream_id,
                component,
                key_path,
            });
            shared.respond(st, conn, stream_id, &op, json!({}), false);
        }),
        // Nucleus lite (2.6.0) has no configuration validation operations.
        "SubscribeToValidateConfigurationUpdates" if mode == NucleusMode::Java => shared
            .with_state(|st| {
                st.subscriptions
                    .push(Subscription::ValidateConfig { conn, stream_id });
                shared.respond(st, conn, stream_id, &op, json!({}), false);
            }),
        "SendConfigurationValidityReport" if mode == NucleusMode::Java => shared.with_state(|st| {
            let report = body.get("configurationValidityReport");
            let field = |k: &str| {
                report
                    .and_then(|r| r.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let deployment_id = field("deploymentId");
            match deployment_id {
                Some(id) if st.pending_validations.contains(&id) => {
                    st.pending_validations.remove(&id);
                    st.validity_reports.push(ValidityReport {
                        status: field("status").unwrap_or_default(),
                        deployment_id: id,
                        message: field("message"),
                    });
                    shared.respond(st, conn, stream_id, &op, json!({}), true);
                }
                _ => shared.fail(
                    st,
                    conn,
                    stream_id,
                    &ModelledError::invalid_arguments(
                        "Validation request either timed out or was never made",
                    ),
                ),
            }
        }),
        "UpdateState" => shared.with_state(|st| match body.get("state").and_then(Value::as_str) {
            Some(state @ ("RUNNING" | "ERRORED")) => {
                st.states.push(state.to_string());
                shared.respond(st, conn, stream_id, &op, json!({}), true);
            }
            other => {
                let e = match mode {
                    NucleusMode::Java => {
                        ModelledError::invalid_arguments(&format!("Invalid state: {other:?}"))
                    }
                    NucleusMode::Lite => lite_invalid(),
                };
                shared.fail(st, conn, stream_id, &e);
            }
        }),
        "PublishToIoTCore" => publish_to_iot_core(shared, conn, stream_id, &op, body, frame_len),
        "SubscribeToIoTCore" => shared.with_state(|st| {
            let filter = body.get("topicName").and_then(Value::as_str);
            let qos = parse_qos(mode, body.get("qos"));
            let problem = match (filter, &qos) {
                (None, _) => Some(match mode {
                    NucleusMode::Java => ModelledError::invalid_arguments("Topic is required"),
                    NucleusMode::Lite => lite_invalid(),
                }),
                (_, Err(e)) => Some(e.clone()),
                (Some(f), Ok(_)) if mode == NucleusMode::Java => {
                    iot_topic_problem(f, true).map(|r| {
                        ModelledError::service(&format!("Subscribe to topic {f} failed: {r}"))
                    })
                }
                _ => None,
            };
            if let Some(e) = problem {
                return shared.fail(st, conn, stream_id, &e);
            }
            st.subscriptions
                .push(Subscription::IotCore(IotSubscription {
                    conn,
                    stream_id,
                    filter: filter.unwrap().to_string(),
                    qos: qos.unwrap(),
                }));
            shared.respond(st, conn, stream_id, &op, json!({}), false);
        }),
        "VerifyClientDeviceIdentity"
        | "GetClientDeviceAuthToken"
        | "AuthorizeClientDeviceAction"
        | "SubscribeToCertificateUpdates"
            if mode == NucleusMode::Java =>
        {
            shared.with_state(|st| client_device_auth(shared, st, conn, stream_id, &op, &body))
        }
        _ => shared.with_state(|st| match mode {
            NucleusMode::Java => {
                let f = Frame::rpc(rpc::APPLICATION_ERROR, rpc::TERMINATE_STREAM, stream_id)
                    .with(":content-type", HeaderValue::str(rpc::JSON))
                    .with_payload(
                        serde_json::to_vec(&json!({
                            "error": "Unsupported Operation",
                            "message": format!("{operation} is an unsupported operation."),
                        }))
                        .unwrap(),
                    );
                st.send(conn, &f);
                st.close_stream(conn, stream_id);
            }
            NucleusMode::Lite => shared.fail(st, conn, stream_id, &lite_invalid()),
        }),
    }
}

/// The client device auth operations, as the CDA plugin of the Java nucleus answers them.
fn client_device_auth(
    shared: &Shared,
    st: &mut State,
    conn: u64,
    stream_id: i32,
    op: &str,
    body: &Value,
) {
    let invalid = |what: &str| ModelledError::invalid_arguments(&format!("{what} is required"));
    match op {
        "VerifyClientDeviceIdentity" => {
            let Some(pem) = body["credential"]["clientDeviceCertificate"].as_str() else {
                return shared.fail(st, conn, stream_id, &invalid("clientDeviceCertificate"));
            };
            let valid = st.client_devices.devices.contains_key(&pem_key(pem));
            st.log(format!("VerifyClientDeviceIdentity -> {valid}"));
            shared.respond(
                st,
                conn,
                stream_id,
                op,
                json!({"isValidClientDevice": valid}),
                true,
            );
        }
        "GetClientDeviceAuthToken" => {
            let mqtt = &body["credential"]["mqttCredential"];
            let (Some(client_id), Some(pem)) =
                (mqtt["clientId"].as_str(), mqtt["certificatePem"].as_str())
            else {
                return shared.fail(st, conn, stream_id, &invalid("mqttCredential"));
            };
            let Some(thing) = st.client_devices.devices.get(&pem_key(pem)).cloned() else {
                let e = ModelledError::new(
                    "InvalidCredentialError",
                    "Failed to authenticate the client device",
                );
                return shared.fail(st, conn, stream_id, &e);
            };
            st.client_devices.next_token += 1;
            let token = format!("cda-session-{}", st.client_devices.next_token);
            st.client_devices
                .tokens
                .insert(token.clone(), thing.clone());
            st.log(format!(
                "GetClientDeviceAuthToken {client_id} ({thing}) -> {token}"
            ));
            let answer = json!({"clientDeviceAuthToken": token});
            shared.respond(st, conn, stream_id, op, answer, true);
        }
        "AuthorizeClientDeviceAction" => {
            let (Some(token), Some(operation), Some(resource)) = (
                body["clientDeviceAuthToken"].as_str(),
                body["operation"].as_str(),
                body["resource"].as_str(),
            ) else {
                return shared.fail(st, conn, stream_id, &invalid("clientDeviceAuthToken"));
            };
            let Some(thing) = st.client_devices.tokens.get(token).cloned() else {
                let e = ModelledError::new(
                    "InvalidClientDeviceAuthTokenError",
                    "Invalid client device auth token",
                );
                return shared.fail(st, conn, stream_id, &e);
            };
            let allowed = st.client_devices.allows(&thing, operation, resource);
            st.client_devices.decisions.push((
                thing,
                operation.to_string(),
                resource.to_string(),
                allowed,
            ));
            shared.respond(
                st,
                conn,
                stream_id,
                op,
                json!({"isAuthorized": allowed}),
                true,
            );
        }
        _ => {
            if body["certificateOptions"]["certificateType"].as_str() != Some("SERVER") {
                return shared.fail(st, conn, stream_id, &invalid("certificateType SERVER"));
            }
            st.subscriptions
                .push(Subscription::Certificates { conn, stream_id });
            shared.respond(st, conn, stream_id, op, json!({}), false);
            if let Some(update) = st.client_devices.server_certificate.clone() {
                let body = json!({"certificateUpdate": update});
                let frame = shared.event_frame(stream_id, "CertificateUpdateEvent", &body);
                st.send(conn, &frame);
            }
        }
    }
}

/// PublishToIoTCore's / SubscribeToIoTCore's `qos`: a string enum ("0"/"1") or, as lite also
/// takes, a number; Java requires it and allows 0..=1, lite defaults to 0 and allows 0..=2.
fn parse_qos(mode: NucleusMode, v: Option<&Value>) -> Result<u8, ModelledError> {
    let invalid = |raw: &Value| match mode {
        NucleusMode::Java => ModelledError::invalid_arguments(&format!("Invalid QoS value: {raw}")),
        NucleusMode::Lite => ModelledError::service(""),
    };
    let max = match mode {
        NucleusMode::Java => 1,
        NucleusMode::Lite => 2,
    };
    let n = match v {
        None | Some(Value::Null) => {
            return match mode {
                NucleusMode::Java => Err(ModelledError::invalid_arguments("QoS is required")),
                NucleusMode::Lite => Ok(0),
            };
        }
        Some(Value::String(s)) => s.parse::<u64>().map_err(|_| invalid(v.unwrap()))?,
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| invalid(v.unwrap()))?,
        Some(other) => return Err(invalid(other)),
    };
    if n > max {
        return Err(invalid(v.unwrap()));
    }
    Ok(n as u8)
}

fn publish_to_iot_core(
    shared: &Arc<Shared>,
    conn: u64,
    stream_id: i32,
    op: &str,
    body: Value,
    frame_len: usize,
) {
    let mode = shared.mode;
    let lite_invalid = || ModelledError::service("");
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    let mut publish = IotPublish {
        conn,
        stream_id,
        topic: text("topicName").unwrap_or_default(),
        retain: body.get("retain").and_then(Value::as_bool),
        message_expiry_interval_seconds: body
            .get("messageExpiryIntervalSeconds")
            .and_then(Value::as_u64),
        response_topic: text("responseTopic"),
        payload_format: body.get("payloadFormat").map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
        content_type: text("contentType"),
        frame_len,
        request: body.clone(),
        ..IotPublish::default()
    };
    if let Some(Value::Array(props)) = body.get("userProperties") {
        for p in props {
            let kv = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            publish.user_properties.push((kv("key"), kv("value")));
        }
    }
    let decode = |k: &str| -> Result<Option<Vec<u8>>, ModelledError> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => b64().decode(s).map(Some).map_err(|e| match mode {
                NucleusMode::Java => {
                    ModelledError::service(&format!("{k} is not valid base64: {e}"))
                }
                NucleusMode::Lite => lite_invalid(),
            }),
            Some(_) => Err(match mode {
                NucleusMode::Java => ModelledError::service(&format!("{k} is not a base64 string")),
                NucleusMode::Lite => lite_invalid(),
            }),
        }
    };
    // Validation, in the Java nucleus's order (IPC.md §4.1); lite is laxer.
    let validated = (|| -> Result<(), ModelledError> {
        if body.get("topicName").and_then(Value::as_str).is_none() {
            return Err(match mode {
                NucleusMode::Java => ModelledError::invalid_arguments("Topic is required"),
                NucleusMode::Lite => lite_invalid(),
            });
        }
        let payload = decode("payload")?;
        if payload.is_none() && mode == NucleusMode::Java {
            return Err(ModelledError::invalid_arguments("Payload is required"));
        }
        publish.payload = payload.unwrap_or_default();
        publish.qos = parse_qos(mode, body.get("qos"))?;
        publish.correlation_data = decode("correlationData")?;
        if mode == NucleusMode::Java {
            let topic = &publish.topic;
            if let Some(reason) = iot_topic_problem(topic, false) {
                return Err(ModelledError::service(&format!(
                    "Publish to topic {topic} failed: {reason}"
                )));
            }
            if publish.payload.len() > JAVA_MAX_PUBLISH_PAYLOAD {
                return Err(ModelledError::service(&format!(
                    "Publish to topic {topic} failed: payload of {} bytes exceeds the maximum message size of {JAVA_MAX_PUBLISH_PAYLOAD} bytes",
                    publish.payload.len()
                )));
            }
        }
        Ok(())
    })();
    if let Err(e) = validated {
        shared.with_state(|st| {
            st.publish_attempts.push(PublishAttempt {
                publish,
                outcome: PublishOutcome::Rejected(e.clone()),
            });
            shared.fail(st, conn, stream_id, &e);
        });
        return;
    }
    let reply = {
        let mut policy = shared
            .publish_policy
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        policy(&publish)
    };
    resolve_publish(shared.clone(), op.to_string(), publish, reply);
}

fn resolve_publish(shared: Arc<Shared>, op: String, publish: IotPublish, reply: PublishReply) {
    let (conn, stream_id) = (publish.conn, publish.stream_id);
    match reply {
        PublishReply::Delay(delay, inner) => {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                resolve_publish(shared, op, publish, *inner);
            });
        }
        reply => shared.clone().with_state(|st| {
            let alive = st.conns.contains_key(&conn);
            let outcome = match (&reply, alive) {
                (PublishReply::NoReply, _) => PublishOutcome::NoReply,
                (_, false) | (PublishReply::CloseConnection, _) => PublishOutcome::ConnectionClosed,
                (PublishReply::Accept, true) => PublishOutcome::Accepted,
                (PublishReply::Reject(e), true) => PublishOutcome::Rejected(e.clone()),
                (PublishReply::Delay(..), true) => unreachable!(),
            };
            match &reply {
                PublishReply::Accept if alive && st.stream_open(conn, stream_id) => {
                    shared.respond(st, conn, stream_id, &op, json!({}), true)
                }
                PublishReply::Reject(e) if alive && st.stream_open(conn, stream_id) => {
                    shared.fail(st, conn, stream_id, e)
                }
                PublishReply::CloseConnection => st.close(conn, "publish policy: close connection"),
                _ => {}
            }
            st.publish_attempts
                .push(PublishAttempt { publish, outcome });
        }),
    }
}

// ------------------------------------------------------------------ tests of the fake

#[cfg(test)]
mod tests {
    use super::eventstream::{DecodeError, Frame, HeaderValue, crc32, decode_prelude};
    use super::*;
    use std::process::Stdio;
    use tokio::process::{Child, Command};

    const COMPONENT: &str = "com.example.Gatehouse";
    const T: Duration = Duration::from_secs(20);

    // -------------------------------------------------------------- test vectors

    fn data_dir() -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/data/greengrass");
        assert!(
            dir.join("frames.hex").is_file() && dir.join("frames.decoded.txt").is_file(),
            "the captured Greengrass frames are missing from {} (they are copies of \
             /work/shared/greengrass/frames.hex and frames.decoded.txt, see the README.md there)",
            dir.display()
        );
        dir
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
            .collect()
    }

    /// (direction, frame bytes) per line of frames.hex.
    fn captured_frames() -> Vec<(String, Vec<u8>)> {
        let text = std::fs::read_to_string(data_dir().join("frames.hex")).unwrap();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (dir, hex) = l.split_once(' ').expect("`DIR HEX` line");
                assert!(dir == "C>S" || dir == "S>C", "bad direction in {l:?}");
                (dir.to_string(), unhex(hex))
            })
            .collect()
    }

    /// One frame of frames.decoded.txt.
    #[derive(Debug)]
    struct DecodedFrame {
        direction: String,
        len: usize,
        headers: Vec<(String, HeaderValue)>,
        payload: Vec<u8>,
    }

    /// A Python `repr` of a str (`'...'`) or bytes (`b'...'`) literal, from the opening quote;
    /// returns the bytes and what follows the closing quote.
    fn python_literal(s: &str) -> (Vec<u8>, &str) {
        let quote = s.as_bytes()[0];
        assert!(quote == b'\'' || quote == b'"', "not a quoted literal: {s}");
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 1;
        while bytes[i] != quote {
            if bytes[i] == b'\\' {
                let esc = bytes[i + 1];
                i += 2;
                match esc {
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'x' => {
                        out.push(u8::from_str_radix(&s[i..i + 2], 16).unwrap());
                        i += 2;
                    }
                    other => out.push(other),
                }
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        (out, &s[i + 1..])
    }

    fn decoded_frames() -> Vec<DecodedFrame> {
        let text = std::fs::read_to_string(data_dir().join("frames.decoded.txt")).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            lines.len().is_multiple_of(2),
            "frames.decoded.txt: odd number of lines"
        );
        lines
            .chunks(2)
            .map(|pair| {
                let (direction, rest) = pair[0].split_once(' ').unwrap();
                let rest = rest.strip_prefix('[').unwrap();
                let (len, mut rest) = rest.split_once("B] ").unwrap();
                let mut headers = Vec::new();
                while !rest.is_empty() {
                    let (name, value) = rest.split_once('=').unwrap();
                    let (value, after) = if value.starts_with('\'') {
                        let (b, after) = python_literal(value);
                        (HeaderValue::String(String::from_utf8(b).unwrap()), after)
                    } else {
                        let end = value.find(", ").unwrap_or(value.len());
                        let n: i32 = value[..end].parse().unwrap();
                        (HeaderValue::Int32(n), &value[end..])
                    };
                    headers.push((name.to_string(), value));
                    rest = after.strip_prefix(", ").unwrap_or(after);
                }
                let payload = pair[1].trim().strip_prefix("payload=b").unwrap();
                let (payload, after) = python_literal(payload);
                assert!(
                    after.is_empty(),
                    "trailing text after the payload: {after:?}"
                );
                DecodedFrame {
                    direction: direction.to_string(),
                    len: len.parse().unwrap(),
                    headers,
                    payload,
                }
            })
            .collect()
    }

    /// How many payload bytes the capture tool printed at most.
    const DECODED_PAYLOAD_CUT: usize = 300;

    #[test]
    fn codec_reproduces_every_captured_frame() {
        let frames = captured_frames();
        let decoded = decoded_frames();
        assert_eq!(frames.len(), 20, "frames.hex");
        assert_eq!(
            frames.len(),
            decoded.len(),
            "frames.hex vs frames.decoded.txt"
        );
        for (i, ((direction, bytes), expected)) in frames.iter().zip(&decoded).enumerate() {
            let frame = Frame::decode(bytes).unwrap_or_else(|e| panic!("frame {i}: {e}"));
            assert_eq!(&frame.encode(), bytes, "frame {i} re-encodes byte for byte");
            assert_eq!(direction, &expected.direction, "frame {i} direction");
            assert_eq!(bytes.len(), expected.len, "frame {i} length");
            assert_eq!(frame.headers, expected.headers, "frame {i} headers");
            if expected.payload.len() == frame.payload.len() {
                assert_eq!(frame.payload, expected.payload, "frame {i} payload");
            } else {
                assert_eq!(expected.payload.len(), DECODED_PAYLOAD_CUT, "frame {i} cut");
                assert!(
                    frame.payload.starts_with(&expected.payload),
                    "frame {i}: the printed payload is a prefix of the real one"
                );
            }
            // Both CRCs are checked: flipping any covered byte is detected.
            for pos in [0, 9, 12, bytes.len() / 2, bytes.len() - 1] {
                let mut bad = bytes.clone();
                bad[pos] ^= 0x01;
                assert!(
                    Frame::decode(&bad).is_err(),
                    "frame {i}: byte {pos} flipped"
                );
            }
        }
    }

    const CONNECT_HEX: &str = "0000007900000048e9e79475083a76657273696f6e070005302e312e300d3a6d6573736167652d7479706504000000040e3a6d6573736167652d666c61677304000000000a3a73747265616d2d696404000000007b2261757468546f6b656e223a20224142434445464748494a4b4c4d4e4f50227d0259ce5e";
    const CONNECT_ACK_HEX: &str = "0000004700000037374cfe3f0d3a6d6573736167652d7479706504000000050e3a6d6573736167652d666c61677304000000010a3a73747265616d2d69640400000000e237e27d";

    #[test]
    fn codec_matches_the_documented_test_vectors() {
        assert_eq!(
            crc32(b"123456789"),
            0xCBF4_3926,
            "the standard CRC-32 check value"
        );

        let empty = unhex("000000100000000005c248eb7d98c8ff");
        assert_eq!(
            Frame::default().encode(),
            empty,
            "empty message (IPC.md §1.1)"
        );
        assert_eq!(Frame::decode(&empty).unwrap(), Frame::default());

        let connect = unhex(CONNECT_HEX);
        assert_eq!(connect.len(), 121);
        let built = Frame::default()
            .with(":version", HeaderValue::str("0.1.0"))
            .with(":message-type", HeaderValue::Int32(rpc::CONNECT))
            .with(":message-flags", HeaderValue::Int32(0))
            .with(":stream-id", HeaderValue::Int32(0))
            .with_payload(&br#"{"authToken": "ABCDEFGHIJKLMNOP"}"#[..]);
        assert_eq!(built.encode(), connect, "Connect (IPC.md §2.2)");
        let prelude = decode_prelude(&connect).unwrap();
        assert_eq!((prelude.total_len, prelude.headers_len), (121, 72));
        assert_eq!(&connect[8..12], &[0xe9, 0xe7, 0x94, 0x75], "prelude CRC");
        assert_eq!(&connect[117..], &[0x02, 0x59, 0xce, 0x5e], "message CRC");
        assert_eq!(Frame::decode(&connect).unwrap(), built);

        let ack = unhex(CONNECT_ACK_HEX);
        assert_eq!(ack.len(), 71);
        let built = Frame::rpc(rpc::CONNECT_ACK, rpc::CONNECTION_ACCEPTED, 0);
        assert_eq!(built.encode(), ack, "ConnectAck (IPC.md §2.2)");
        assert_eq!(Frame::decode(&ack).unwrap(), built);
    }

    #[test]
    fn codec_round_trips_every_header_type_and_rejects_bad_input() {
        let frame = Frame::default()
            .with("t", HeaderValue::True)
            .with("f", HeaderValue::False)
            .with("byte", HeaderValue::Byte(-3))
            .with("i16", HeaderValue::Int16(-12345))
            .with("i32", HeaderValue::Int32(i32::MIN))
            .with("i64", HeaderValue::Int64(i64::MAX))
            .with("bytes", HeaderValue::Bytes(vec![0, 1, 255]))
            .with("string", HeaderValue::str("héllo"))
            .with("ts", HeaderValue::Timestamp(1_700_000_000_123))
            .with("uuid", HeaderValue::Uuid(*b"0123456789abcdef"))
            .with_payload(&b"payload"[..]);
        let bytes = frame.encode();
        assert_eq!(Frame::decode(&bytes).unwrap(), frame);

        let mut bad = bytes.clone();
        bad[5] ^= 0x40;
        assert!(matches!(
            Frame::decode(&bad),
            Err(DecodeError::PreludeCrc { .. })
        ));
        let mut bad = bytes.clone();
        bad[20] ^= 0x40;
        assert!(matches!(
            Frame::decode(&bad),
            Err(DecodeError::MessageCrc { .. })
        ));
        assert!(matches!(
            Frame::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        assert!(matches!(
            Frame::decode(&two),
            Err(DecodeError::TrailingBytes(_))
        ));
        let (first, used) = eventstream::split_frame(&two).unwrap().unwrap();
        assert_eq!((first, used), (frame, bytes.len()));
    }

    #[test]
    fn json_helpers_follow_greengrass_and_mqtt_semantics() {
        let config = json!({"a": {"b": 1, "c": [1, 2]}, "d": true});
        assert_eq!(config_at(&config, &[]), Some(config.clone()));
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            config_at(&config, &path(&["a"])),
            Some(json!({"b": 1, "c": [1, 2]}))
        );
        assert_eq!(
            config_at(&config, &path(&["a", "b"])),
            Some(json!({"b": 1}))
        );
        assert_eq!(
            config_at(&config, &path(&["a", "c"])),
            Some(json!({"c": [1, 2]}))
        );
        assert_eq!(config_at(&config, &path(&["a", "x"])), None);
        assert_eq!(config_at(&config, &path(&["d", "x"])), None);

        assert_eq!(
            stringify_scalars(&json!({"n": 42, "f": 0.5, "b": true, "l": [1, "x"], "z": null})),
            json!({"n": "42", "f": "0.5", "b": "true", "l": ["1", "x"], "z": null})
        );

        let mut c = config.clone();
        merge_patch(
            &mut c,
            &json!({"a": {"b": 2, "c": null, "e": {"f": 1}}, "d": true}),
        );
        assert_eq!(c, json!({"a": {"b": 2, "e": {"f": 1}}, "d": true}));
        assert_eq!(
            changed_leaf_paths(&config, &c),
            vec![path(&["a", "b"]), path(&["a", "c"]), path(&["a", "e", "f"])]
        );
        assert!(changed_leaf_paths(&c, &c).is_empty());

        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("#", "a/b"));
        assert!(!topic_matches("#", "$aws/things/x"));
        assert!(topic_matches(
            "$aws/things/+/shadow",
            "$aws/things/x/shadow"
        ));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("a/b", "a"));
        assert!(topic_matches("$share/g/a/+", "a/b"));

        assert_eq!(iot_topic_problem("a/b", false), None);
        assert!(iot_topic_problem("", false).is_some());
        assert!(iot_topic_problem("a/#", false).is_some());
        assert_eq!(iot_topic_problem("a/#", true), None);
        assert!(iot_topic_problem("a/#/b", true).is_some());
        assert!(iot_topic_problem("a/b+", true).is_some());
        assert_eq!(iot_topic_problem("1/2/3/4/5/6/7/8", false), None);
        assert!(iot_topic_problem("1/2/3/4/5/6/7/8/9", false).is_some());
        assert_eq!(
            iot_topic_problem("$aws/rules/r/1/2/3/4/5/6/7/8", false),
            None
        );
        assert!(iot_topic_problem(&"x".repeat(257), false).is_some());
    }

    // -------------------------------------------------------------- a raw client

    /// A hand-driven IPC client: our codec over a Unix socket.
    struct RawClient {
        stream: UnixStream,
        buf: Vec<u8>,
    }

    /// awsiotsdk's Connect: `:version` first, `json.dumps` spacing.
    fn connect_frame(token: &str) -> Frame {
        Frame::default()
            .with(":version", HeaderValue::str(rpc::VERSION))
            .with(":message-type", HeaderValue::Int32(rpc::CONNECT))
            .with(":message-flags", HeaderValue::Int32(0))
            .with(":stream-id", HeaderValue::Int32(0))
            .with_payload(format!("{{\"authToken\": \"{token}\"}}"))
    }

    /// awsiotsdk's request header order.
    fn request_frame(stream_id: i32, operation: &str, body: &Value) -> Frame {
        Frame::default()
            .with(":content-type", HeaderValue::str(rpc::JSON))
            .with(
                "service-model-type",
                HeaderValue::String(format!("{}{operation}Request", rpc::NS)),
            )
            .with(
                ":message-type",
                HeaderValue::Int32(rpc::APPLICATION_MESSAGE),
            )
            .with(":message-flags", HeaderValue::Int32(0))
            .with(":stream-id", HeaderValue::Int32(stream_id))
            .with(
                "operation",
                HeaderValue::String(format!("{}{operation}", rpc::NS)),
            )
            .with_payload(serde_json::to_vec(body).unwrap())
    }

    fn json_of(frame: &Frame) -> Value {
        serde_json::from_slice(&frame.payload)
            .unwrap_or_else(|e| panic!("payload is not JSON ({e}): {frame:?}"))
    }

    impl RawClient {
        async fn open(nucleus: &FakeNucleus) -> RawClient {
            RawClient {
                stream: UnixStream::connect(nucleus.socket_path())
                    .await
                    .expect("connect to the fake nucleus"),
                buf: Vec::new(),
            }
        }

        /// Open and complete the handshake.
        async fn connect(nucleus: &FakeNucleus) -> RawClient {
            let mut c = RawClient::open(nucleus).await;
            c.send(&connect_frame(nucleus.token())).await;
            let ack = c.expect_frame("ConnectAck").await;
            assert_eq!(
                ack,
                Frame::rpc(rpc::CONNECT_ACK, rpc::CONNECTION_ACCEPTED, 0)
            );
            c
        }

        async fn send(&mut self, frame: &Frame) {
            self.send_bytes(&frame.encode()).await;
        }

        async fn send_bytes(&mut self, bytes: &[u8]) {
            self.stream
                .write_all(bytes)
                .await
                .expect("write to the fake");
        }

        /// The next frame, or `None` once the server closed the connection (EOF or reset).
        async fn next(&mut self) -> Option<Frame> {
            let deadline = tokio::time::Instant::now() + T;
            loop {
                if let Some((frame, used)) = eventstream::split_frame(&self.buf).unwrap() {
                    self.buf.drain(..used);
                    return Some(frame);
                }
                let mut tmp = [0u8; 16384];
                match tokio::time::timeout_at(deadline, self.stream.read(&mut tmp)).await {
                    Err(_) => panic!("no frame and no close within {T:?}"),
                    Ok(Ok(0)) => {
                        assert!(self.buf.is_empty(), "closed inside a frame: {:?}", self.buf);
                        return None;
                    }
                    Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                    Ok(Err(e)) => panic!("read: {e}"),
                }
            }
        }

        async fn expect_frame(&mut self, what: &str) -> Frame {
            match self.next().await {
                Some(f) => f,
                None => panic!("connection closed while waiting for {what}"),
            }
        }

        async fn expect_closed(&mut self, what: &str) {
            if let Some(f) = self.next().await {
                panic!("{what}: expected the connection to close, got {f:?}");
            }
        }

        async fn request(&mut self, stream_id: i32, operation: &str, body: Value) -> Frame {
            self.send(&request_frame(stream_id, operation, &body)).await;
            self.expect_frame(operation).await
        }
    }

    fn test_config() -> Value {
        json!({
            "greeting": "hi",
            "nested": {"threshold": 42, "enabled": true, "list": [1, 2, 3], "ratio": 0.5},
            "upstream": {"topic": "dt/gw/up"}
        })
    }

    fn modes() -> [NucleusMode; 2] {
        [NucleusMode::Java, NucleusMode::Lite]
    }

    // -------------------------------------------------------------- raw protocol tests

    #[tokio::test]
    async fn lite_replays_the_captured_nucleus_lite_session() {
        let frames = captured_frames();
        let connect = Frame::decode(&frames[0].1).unwrap();
        let token = json_of(&connect)["authToken"].as_str().unwrap().to_string();
        let captured_config = json!({
            "message": "changed",
            "threshold": 42,
            "nested": {"enabled": true, "list": [1, 2, 3]},
            "accessControl": {
                "aws.greengrass.ipc.mqttproxy": {
                    "com.example.RustComponent:mqttproxy:1": {
                        "policyDescription": "Allow IoT Core pub/sub on test topics",
                        "operations": ["aws.greengrass#PublishToIoTCore", "aws.greengrass#SubscribeToIoTCore"],
                        "resources": ["*"]
                    }
                },
                "aws.greengrass.ipc.pubsub": {
                    "com.example.RustComponent:pubsub:1": {
                        "policyDescription": "Allow local pub/sub",
                        "operations": ["*"],
                        "resources": ["*"]
                    }
                }
            }
        });
        let nucleus = FakeNucleus::builder(
            NucleusMode::Lite,
            "com.example.RustComponent",
            captured_config,
        )
        .token(&token)
        .component_config(
            "aws.greengrass.NucleusLite",
            json!({"awsRegion": "us-east-1"}),
        )
        .start();
        let mut client = RawClient::open(&nucleus).await;
        let mut identical = 0;
        for (i, (direction, bytes)) in frames.iter().enumerate() {
            let expected = Frame::decode(bytes).unwrap();
            if direction == "C>S" {
                client.send_bytes(bytes).await;
                continue;
            }
            if expected.string("service-model-type") == Some("aws.greengrass#IoTCoreMessage") {
                let msg = &json_of(&expected)["message"];
                let payload = b64().decode(msg["payload"].as_str().unwrap()).unwrap();
                let sent = nucleus.send_iot_message(msg["topicName"].as_str().unwrap(), &payload);
                assert_eq!(sent, 1, "one subscription matches the captured message");
            }
            let got = client.expect_frame(&format!("captured frame {i}")).await;
            assert_eq!(
                got.headers,
                expected.headers,
                "frame {i} headers\n{}",
                nucleus.frame_log()
            );
            if expected.payload.is_empty() {
                assert!(got.payload.is_empty(), "frame {i} payload");
            } else {
                assert_eq!(json_of(&got), json_of(&expected), "frame {i} JSON");
            }
            // Byte for byte too, except where nucleus lite wrote JSON keys in its own order
            // (the fake's serde_json writes them sorted).
            if expected.payload.is_empty()
                || serde_json::to_vec(&json_of(&expected)).unwrap() == expected.payload
            {
                assert_eq!(got.encode(), *bytes, "frame {i} bytes");
                identical += 1;
            }
        }
        assert_eq!(
            identical, 9,
            "of the 11 server frames, 2 have unsorted JSON keys"
        );
        assert!(
            nucleus.violations().is_empty(),
            "{:?}",
            nucleus.violations()
        );
        assert_eq!(nucleus.states(), vec!["RUNNING".to_string()]);
        let publishes = nucleus.publishes();
        assert_eq!(publishes.len(), 1);
        assert_eq!(publishes[0].topic, "test/up");
        assert_eq!(publishes[0].payload, br#"{"hello":"mosquitto"}"#);
        assert_eq!(publishes[0].qos, 1);
        assert_eq!(publishes[0].frame_len, 287);
        assert_eq!(nucleus.max_client_frame(), 320);
        assert_eq!(
            nucleus.config()["message"],
            json!("changed-1795678784.2398274")
        );
    }

    /// A PublishToIoTCore frame of exactly `total` bytes.
    fn publish_of_size(stream_id: i32, total: usize) -> Frame {
        let body = |pad: usize| json!({"topicName": "t/big", "qos": "1", "payload": "aGk=", "contentType": "x".repeat(pad)});
        let base = request_frame(stream_id, "PublishToIoTCore", &body(0))
            .encode()
            .len();
        let frame = request_frame(stream_id, "PublishToIoTCore", &body(total - base));
        assert_eq!(frame.encode().len(), total);
        frame
    }

    #[tokio::test]
    async fn lite_closes_the_connection_on_a_client_frame_over_10000_bytes() {
        let nucleus = FakeNucleus::start(NucleusMode::Lite, COMPONENT, test_config());
        let mut client = RawClient::connect(&nucleus).await;
        client.send(&publish_of_size(1, LITE_MAX_FRAME)).await;
        let resp = client.expect_frame("response to a 10,000-byte frame").await;
        assert_eq!(
            resp.string("service-model-type"),
            Some("aws.greengrass#PublishToIoTCoreResponse")
        );
        assert_eq!(resp.flags(), 0, "lite never terminates unary streams");
        assert_eq!(nucleus.publishes()[0].frame_len, LITE_MAX_FRAME);

        client.send(&publish_of_size(2, LITE_MAX_FRAME + 1)).await;
        client.expect_closed("a 10,001-byte frame").await;
        let conn = nucleus.connections()[0].id;
        assert_eq!(
            nucleus.oversize_frames(),
            vec![OversizeFrame {
                conn,
                total_len: LITE_MAX_FRAME + 1
            }]
        );
        assert_eq!(nucleus.max_client_frame(), LITE_MAX_FRAME + 1);
        assert_eq!(nucleus.violations().len(), 1);
        assert_eq!(
            nucleus.publishes().len(),
            1,
            "the oversize publish was not taken"
        );
        nucleus
            .wait_for("the connection to be gone", T, |n| {
                (n.open_connections() == 0).then_some(())
            })
            .await;

        // The nucleus itself lives on: a new connection works.
        let mut again = RawClient::connect(&nucleus).await;
        let resp = again
            .request(1, "UpdateState", json!({"state": "RUNNING"}))
            .await;
        assert_eq!(
            resp.string("service-model-type"),
            Some("aws.greengrass#UpdateStateResponse")
        );

        // The Java nucleus takes the same frame.
        let java = FakeNucleus::start(NucleusMode::Java, COMPONENT, test_config());
        let mut client = RawClient::connect(&java).await;
        let resp = client
            .request_frame_raw(publish_of_size(1, LITE_MAX_FRAME + 1))
            .await;
        assert_eq!(
            resp.string("service-model-type"),
            Some("aws.greengrass#PublishToIoTCoreResponse")
        );
        assert_eq!(
            resp.flags(),
            rpc::TERMINATE_STREAM,
            "Java terminates unary streams"
        );
        assert!(java.oversize_frames().is_empty());
    }

    impl RawClient {
        async fn request_frame_raw(&mut self, frame: Frame) -> Frame {
            self.send(&frame).await;
            self.expect_frame("response").await
        }
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_like_each_nucleus_does() {
        for mode in modes() {
            let nucleus = FakeNucleus::start(mode, COMPONENT, test_config());
            let mut client = RawClient::open(&nucleus).await;
            client.send(&connect_frame("WRONGWRONGWRONG1")).await;
            if mode == NucleusMode::Java {
                let ack = client.expect_frame("ConnectAck").await;
                assert_eq!(
                    ack,
                    Frame::rpc(rpc::CONNECT_ACK, 0, 0),
                    "Java: ConnectAck flags 0"
                );
            }
            client.expect_closed(&format!("{mode:?}: bad token")).await;

            // A bad :version with the right token.
            let mut client = RawClient::open(&nucleus).await;
            let mut frame = connect_frame(nucleus.token());
            frame.headers[0].1 = HeaderValue::str("0.2.0");
            client.send(&frame).await;
            if mode == NucleusMode::Java {
                assert_eq!(client.expect_frame("ConnectAck").await.flags(), 0);
            }
            client
                .expect_closed(&format!("{mode:?}: bad version"))
                .await;

            let failures = nucleus.connect_failures();
            assert_eq!(failures.len(), 2, "{mode:?}: {failures:?}");
            assert!(failures[0].reason.contains("bad authToken"), "{failures:?}");
            assert!(failures[1].reason.contains("0.2.0"), "{failures:?}");
            assert!(nucleus.connections().is_empty());
            assert!(mode == NucleusMode::Java || nucleus.token().len() == 16);
            assert_eq!(nucleus.token().len(), 16);
        }
    }

    #[tokio::test]
    async fn stream_rules_and_ping_differ_by_mode() {
        for mode in modes() {
            let nucleus = FakeNucleus::start(mode, COMPONENT, test_config());
            let state = json!({"state": "RUNNING"});

            // A stream id that skips one.
            let mut c = RawClient::connect(&nucleus).await;
            c.request(1, "UpdateState", state.clone()).await;
            c.send(&request_frame(3, "UpdateState", &state)).await;
            if mode == NucleusMode::Java {
                let err = c.expect_frame("ProtocolError").await;
                assert_eq!(err.message_type(), Some(rpc::PROTOCOL_ERROR));
                assert_eq!(err.string(":content-type"), Some(rpc::JSON));
                assert!(
                    json_of(&err)["message"]
                        .as_str()
                        .unwrap()
                        .contains("exactly 1")
                );
            }
            c.expect_closed(&format!("{mode:?}: stream id gap")).await;

            // A new stream without `operation`.
            let mut c = RawClient::connect(&nucleus).await;
            let mut frame = request_frame(1, "UpdateState", &state);
            frame.headers.retain(|(n, _)| n != "operation");
            c.send(&frame).await;
            match mode {
                NucleusMode::Java => {
                    let err = c.expect_frame("ProtocolError").await;
                    assert_eq!(err.message_type(), Some(rpc::PROTOCOL_ERROR));
                    c.expect_closed("Java: no operation").await;
                }
                NucleusMode::Lite => {
                    let err = c.expect_frame("ServiceError").await;
                    assert_eq!(err.message_type(), Some(rpc::APPLICATION_ERROR));
                    assert_eq!(
                        err.string("service-model-type"),
                        Some("aws.greengrass#ServiceError")
                    );
                    assert_eq!(
                        json_of(&err),
                        json!({"_message": "", "_errorCode": "ServiceError"})
                    );
                    // ggipcd keeps the connection.
                    let ok = c.request(2, "UpdateState", state.clone()).await;
                    assert_eq!(ok.message_type(), Some(rpc::APPLICATION_MESSAGE));
                }
            }

            // Ping.
            let mut c = RawClient::connect(&nucleus).await;
            let ping = Frame::rpc(rpc::PING, 0, 0)
                .with("x-trace", HeaderValue::str("abc"))
                .with_payload(&b"ping!"[..]);
            c.send(&ping).await;
            match mode {
                NucleusMode::Java => {
                    let pong = c.expect_frame("PingResponse").await;
                    let expected = Frame::rpc(rpc::PING_RESPONSE, 0, 0)
                        .with("x-trace", HeaderValue::str("abc"))
                        .with_payload(&b"ping!"[..]);
                    assert_eq!(pong, expected);
                }
                NucleusMode::Lite => c.expect_closed("Lite: Ping").await,
            }

            // Messages before Connect.
            let mut c = RawClient::open(&nucleus).await;
            c.send(&request_frame(1, "UpdateState", &state)).await;
            if mode == NucleusMode::Java {
                let err = c.expect_frame("ProtocolError").await;
                assert_eq!(err.message_type(), Some(rpc::PROTOCOL_ERROR));
            }
            c.expect_closed(&format!("{mode:?}: request before Connect"))
                .await;

            let expected_violations = match mode {
                NucleusMode::Java => 3,
                NucleusMode::Lite => 4,
            };
            assert_eq!(
                nucleus.violations().len(),
                expected_violations,
                "{mode:?}: {:?}",
                nucleus.violations()
            );
        }
    }

    #[tokio::test]
    async fn configuration_operations_follow_each_nucleus() {
        for mode in modes() {
            let nucleus = FakeNucleus::builder(mode, COMPONENT, test_config())
                .component_config("aws.greengrass.Nucleus", json!({"awsRegion": "eu-west-1"}))
                .start();
            let lite = mode == NucleusMode::Lite;
            let deployed = |v: Value| if lite { stringify_scalars(&v) } else { v };
            let mut c = RawClient::connect(&nucleus).await;
            let mut sid = 0;
            let mut next = || {
                sid += 1;
                sid
            };

            let r = c
                .request(next(), "GetConfiguration", json!({"keyPath": []}))
                .await;
            assert_eq!(
                r.string("service-model-type"),
                Some("aws.greengrass#GetConfigurationResponse")
            );
            assert_eq!(r.string(":content-type"), Some(rpc::JSON));
            assert_eq!(r.flags(), if lite { 0 } else { rpc::TERMINATE_STREAM });
            assert_eq!(
                json_of(&r),
                json!({"componentName": COMPONENT, "value": deployed(test_config())})
            );
            let r = c
                .request(
                    next(),
                    "GetConfiguration",
                    json!({"keyPath": ["nested", "threshold"]}),
                )
                .await;
            assert_eq!(json_of(&r)["value"], deployed(json!({"threshold": 42})));
            let r = c
                .request(next(), "GetConfiguration", json!({"keyPath": ["nested"]}))
                .await;
            assert_eq!(
                json_of(&r)["value"],
                deployed(test_config()["nested"].clone())
            );
            let r = c
                .request(
                    next(),
                    "GetConfiguration",
                    json!({"componentName": "aws.greengrass.Nucleus", "keyPath": ["awsRegion"]}),
                )
                .await;
            assert_eq!(
                json_of(&r),
                json!({"componentName": "aws.greengrass.Nucleus", "value": {"awsRegion": "eu-west-1"}})
            );
            let r = c
                .request(next(), "GetConfiguration", json!({"keyPath": ["nope"]}))
                .await;
            assert_eq!(r.message_type(), Some(rpc::APPLICATION_ERROR));
            assert_eq!(r.flags(), rpc::TERMINATE_STREAM);
            assert_eq!(
                r.string("service-model-type"),
                Some("aws.greengrass#ResourceNotFoundError")
            );
            let expected = if lite {
                json!({"_message": "Key not found.", "_errorCode": "ResourceNotFoundError"})
            } else {
                json!({"_service": "aws.greengrass#GreengrassCoreIPC", "_message": "Key not found",
                       "_errorCode": "ResourceNotFoundError", "message": "Key not found"})
            };
            assert_eq!(json_of(&r), expected);

            // Configuration updates: one event per changed leaf under the watched key path.
            let watch = next();
            let r = c
                .request(
                    watch,
                    "SubscribeToConfigurationUpdate",
                    json!({"keyPath": ["nested"]}),
                )
                .await;
            assert_eq!(
                r.string("service-model-type"),
                Some("aws.greengrass#SubscribeToConfigurationUpdateResponse")
            );
            assert_eq!(r.flags(), 0, "streaming responses keep the stream open");
            let changed =
                nucleus.update_config(json!({"nested": {"threshold": 43}, "greeting": "yo"}));
            assert_eq!(changed.len(), 2);
            let ev = c.expect_frame("ConfigurationUpdateEvents").await;
            assert_eq!(ev.stream_id(), Some(watch));
            assert_eq!(
                ev.string("service-model-type"),
                Some("aws.greengrass#ConfigurationUpdateEvents")
            );
            assert_eq!(
                json_of(&ev),
                json!({"configurationUpdateEvent": {"componentName": COMPONENT, "keyPath": ["nested", "threshold"]}})
            );
            assert!(
                nucleus
                    .update_config(json!({"nested": {"threshold": 43}}))
                    .is_empty()
            );
            nucleus.update_config(json!({"nested": {"list": null}}));
            let ev = c.expect_frame("event for the removed list").await;
            assert_eq!(
                json_of(&ev)["configurationUpdateEvent"]["keyPath"],
                json!(["nested", "list"])
            );
            assert_eq!(nucleus.config()["nested"]["threshold"], deployed(json!(43)));

            // A component's own UpdateConfiguration keeps JSON types, in lite too.
            let r = c
                .request(
                    next(),
                    "UpdateConfiguration",
                    json!({"keyPath": ["nested"], "timestamp": 1.5, "valueToMerge": {"ratio": 0.75}}),
                )
                .await;
            assert_eq!(
                r.string("service-model-type"),
                Some("aws.greengrass#UpdateConfigurationResponse")
            );
            let ev = c.expect_frame("event for UpdateConfiguration").await;
            assert_eq!(
                json_of(&ev)["configurationUpdateEvent"]["keyPath"],
                json!(["nested", "ratio"])
            );
            assert_eq!(nucleus.config()["nested"]["ratio"], json!(0.75));

            // Closing the stream removes the subscription.
            c.send(&Frame::rpc(
                rpc::APPLICATION_MESSAGE,
                rpc::TERMINATE_STREAM,
                watch,
            ))
            .await;
            nucleus
                .wait_for("the subscription to go", T, |n| {
                    n.config_subscriptions().is_empty().then_some(())
                })
                .await;

            // Validation: Java only.
            let r = c
                .request(next(), "SubscribeToValidateConfigurationUpdates", json!({}))
                .await;
            if lite {
                assert_eq!(
                    r.string("service-model-type"),
                    Some("aws.greengrass#ServiceError")
                );
                let report = nucleus
                    .validate_config(json!({"nested": {}}), "d-1", Duration::from_secs(1))
                    .await;
                assert!(report.is_err(), "{report:?}");
            } else {
                let validate = r.stream_id().unwrap();
                assert_eq!(
                    r.string("service-model-type"),
                    Some("aws.greengrass#SubscribeToValidateConfigurationUpdatesResponse")
                );
                let report_stream = next();
                let (report, ()) = tokio::join!(
                    nucleus.validate_config(json!({"nested": {"threshold": 7}}), "d-1", T),
                    async {
                        let ev = c.expect_frame("ValidateConfigurationUpdateEvents").await;
                        assert_eq!(ev.stream_id(), Some(validate));
                        assert_eq!(
                            json_of(&ev),
                            json!({"validateConfigurationUpdateEvent": {
                                "configuration": {"nested": {"threshold": 7}}, "deploymentId": "d-1"}})
                        );
                        let r = c
                            .request(
                                report_stream,
                                "SendConfigurationValidityReport",
                                json!({"configurationValidityReport": {"status": "ACCEPTED", "deploymentId": "d-1"}}),
                            )
                            .await;
                        assert_eq!(r.message_type(), Some(rpc::APPLICATION_MESSAGE));
                    }
                );
                assert_eq!(
                    report.unwrap(),
                    ValidityReport {
                        status: "ACCEPTED".into(),
                        deployment_id: "d-1".into(),
                        message: None
                    }
                );
                // A report nobody asked for.
                let r = c
                    .request(
                        next(),
                        "SendConfigurationValidityReport",
                        json!({"configurationValidityReport": {"status": "ACCEPTED", "deploymentId": "d-2"}}),
                    )
                    .await;
                assert_eq!(
                    r.string("service-model-type"),
                    Some("aws.greengrass#InvalidArgumentsError")
                );
            }

            // An operation the nucleus does not have.
            let r = c.request(next(), "ListComponents", json!({})).await;
            assert_eq!(r.message_type(), Some(rpc::APPLICATION_ERROR));
            if lite {
                assert_eq!(
                    json_of(&r),
                    json!({"_message": "", "_errorCode": "ServiceError"})
                );
            } else {
                assert_eq!(r.string("service-model-type"), None);
                assert_eq!(
                    json_of(&r),
                    json!({"error": "Unsupported Operation",
                           "message": "aws.greengrass#ListComponents is an unsupported operation."})
                );
            }
            assert!(
                nucleus.violations().is_empty(),
                "{mode:?}: {:?}",
                nucleus.violations()
            );
        }
    }

    #[tokio::test]
    async fn publish_validation_policies_and_connection_loss() {
        for mode in modes() {
            let lite = mode == NucleusMode::Lite;
            let nucleus = FakeNucleus::start(mode, COMPONENT, test_config());
            nucleus.set_publish_policy(|p| match p.topic.as_str() {
                "slow" => {
                    PublishReply::Delay(Duration::from_millis(50), Box::new(PublishReply::Accept))
                }
                "hang" => PublishReply::NoReply,
                "full" => PublishReply::spool_full(p),
                "die" => PublishReply::CloseConnection,
                _ => PublishReply::Accept,
            });
            let mut c = RawClient::connect(&nucleus).await;
            let r = c
                .request(
                    1,
                    "PublishToIoTCore",
                    json!({"topicName": "a/b", "qos": "1", "payload": "AAH/", "retain": true,
                           "userProperties": [{"key": "k", "value": "v"}],
                           "messageExpiryIntervalSeconds": 60, "correlationData": "aGk=",
                           "responseTopic": "r/t", "payloadFormat": "0", "contentType": "c/t"}),
                )
                .await;
            assert_eq!(
                r.string("service-model-type"),
                Some("aws.greengrass#PublishToIoTCoreResponse")
            );
            assert_eq!(json_of(&r), json!({}));
            let p = &nucleus.publishes()[0];
            assert_eq!(
                (p.topic.as_str(), p.qos, p.payload.as_slice(), p.retain),
                ("a/b", 1, &[0u8, 1, 255][..], Some(true))
            );
            assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
            assert_eq!(p.message_expiry_interval_seconds, Some(60));
            assert_eq!(p.correlation_data.as_deref(), Some(&b"hi"[..]));
            assert_eq!(p.response_topic.as_deref(), Some("r/t"));
            assert_eq!(p.payload_format.as_deref(), Some("0"));
            assert_eq!(p.content_type.as_deref(), Some("c/t"));

            // Validation like the real nucleus (never reaching the policy).
            let r = c
                .request(
                    2,
                    "PublishToIoTCore",
                    json!({"topicName": "a/#", "qos": "0", "payload": ""}),
                )
                .await;
            let r3 = c
                .request(
                    3,
                    "PublishToIoTCore",
                    json!({"topicName": "a", "qos": "2", "payload": ""}),
                )
                .await;
            let r4 = c
                .request(
                    4,
                    "PublishToIoTCore",
                    json!({"topicName": "a", "payload": ""}),
                )
                .await;
            if lite {
                assert_eq!(
                    r.message_type(),
                    Some(rpc::APPLICATION_MESSAGE),
                    "lite does not check topics"
                );
                assert_eq!(
                    r3.message_type(),
                    Some(rpc::APPLICATION_MESSAGE),
                    "lite takes QoS 2"
                );
                assert_eq!(
                    r4.message_type(),
                    Some(rpc::APPLICATION_MESSAGE),
                    "lite defaults QoS to 0"
                );
            } else {
                assert_eq!(
                    r.string("service-model-type"),
                    Some("aws.greengrass#ServiceError")
                );
                assert!(
                    json_of(&r)["message"]
                        .as_str()
                        .unwrap()
                        .contains("Publish to topic a/# failed")
                );
                assert_eq!(
                    r3.string("service-model-type"),
                    Some("aws.greengrass#InvalidArgumentsError")
                );
                assert_eq!(json_of(&r3)["message"], json!("Invalid QoS value: \"2\""));
                assert_eq!(json_of(&r4)["message"], json!("QoS is required"));
            }

            // Policies.
            let r = c
                .request(
                    5,
                    "PublishToIoTCore",
                    json!({"topicName": "full", "qos": "1", "payload": "eA=="}),
                )
                .await;
            assert_eq!(
                r.string("service-model-type"),
                Some("aws.greengrass#ServiceError")
            );
            assert_eq!(
                json_of(&r)["_message"],
                json!(
                    "Publish to topic full failed: Message spool is full. Message could not be added."
                )
            );
            c.send(&request_frame(
                6,
                "PublishToIoTCore",
                &json!({"topicName": "hang", "qos": "1", "payload": "eA=="}),
            ))
            .await;
            let r = c
                .request(
                    7,
                    "PublishToIoTCore",
                    json!({"topicName": "slow", "qos": "1", "payload": "eA=="}),
                )
                .await;
            assert_eq!(
                r.stream_id(),
                Some(7),
                "the hung publish does not block others"
            );
            let outcomes: Vec<(String, PublishOutcome)> = nucleus
                .publish_attempts()
                .into_iter()
                .map(|a| (a.publish.topic, a.outcome))
                .collect();
            assert_eq!(outcomes.len(), 7);
            assert_eq!(outcomes[5], ("hang".to_string(), PublishOutcome::NoReply));
            assert_eq!(outcomes[6], ("slow".to_string(), PublishOutcome::Accepted));

            // Subscriptions, injected messages, and the nucleus dying mid-call.
            let r = c
                .request(
                    8,
                    "SubscribeToIoTCore",
                    json!({"topicName": "cmd/+/x", "qos": "1"}),
                )
                .await;
            assert_eq!(
                r.string("service-model-type"),
                Some("aws.greengrass#SubscribeToIoTCoreResponse")
            );
            assert_eq!(nucleus.subscriptions()[0].filter, "cmd/+/x");
            assert_eq!(nucleus.send_iot_message("cmd/a/y", b"no"), 0);
            assert_eq!(nucleus.send_iot_message("cmd/a/x", b"yes"), 1);
            let ev = c.expect_frame("IoTCoreMessage").await;
            assert_eq!(
                ev.string("service-model-type"),
                Some("aws.greengrass#IoTCoreMessage")
            );
            assert_eq!(
                json_of(&ev),
                json!({"message": {"topicName": "cmd/a/x", "payload": "eWVz"}})
            );
            c.send(&request_frame(
                9,
                "PublishToIoTCore",
                &json!({"topicName": "die", "qos": "1", "payload": "eA=="}),
            ))
            .await;
            c.expect_closed("policy CloseConnection").await;
            nucleus
                .wait_for("the subscription to die with its connection", T, |n| {
                    (n.subscriptions().is_empty() && n.open_connections() == 0).then_some(())
                })
                .await;

            // close_connections: every client sees its socket close.
            let mut a = RawClient::connect(&nucleus).await;
            let mut b = RawClient::connect(&nucleus).await;
            nucleus.wait_for_connections(3, T).await;
            nucleus.close_connections();
            a.expect_closed("close_connections (a)").await;
            b.expect_closed("close_connections (b)").await;
            assert!(
                nucleus.violations().is_empty(),
                "{mode:?}: {:?}",
                nucleus.violations()
            );
        }
    }

    // -------------------------------------------------------------- the official Python client

    /// Drives the fake with awsiotsdk's GreengrassCoreIPCClientV2 and prints one JSON line per
    /// step. Between subscribing and closing, it waits for events the test injects, then for a
    /// line on stdin before disconnecting.
    const PY_CLIENT: &str = r#"
import json, sys, threading
from awsiot.greengrasscoreipc import connect
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc import model

sock, token = sys.argv[1], sys.argv[2]

def out(step, **kw):
    kw["step"] = step
    print(json.dumps(kw), flush=True)

def call(step, fn):
    try:
        out(step, ok=True, **(fn() or {}))
    except Exception as e:
        out(step, ok=False, error=type(e).__name__, message=getattr(e, "message", None), detail=str(e))

try:
    conn = connect(ipc_socket=sock, authtoken=token, timeout=10)
except Exception as e:
    out("connect", ok=False, error=type(e).__name__, detail=str(e))
    sys.exit(0)
out("connect", ok=True)
ipc = GreengrassCoreIPCClientV2(client=conn)

def get(step, **kw):
    def f():
        r = ipc.get_configuration(**kw)
        return {"component": r.component_name, "value": r.value}
    call(step, f)

get("config_all", key_path=[])
get("config_leaf", key_path=["nested", "threshold"])
get("config_container", key_path=["nested"])
get("config_other", component_name="aws.greengrass.Nucleus", key_path=["awsRegion"])
get("config_missing", key_path=["nope"])

def publish(step, topic, **kw):
    def f():
        ipc.publish_to_iot_core(topic_name=topic, qos=model.QOS.AT_LEAST_ONCE, **kw)
        return {}
    call(step, f)

publish("publish", "dt/gw/up", payload=b"hello\x00\xff",
        user_properties=[model.UserProperty(key="k", value="v")],
        content_type="application/octet-stream")
publish("publish_denied", "deny/me", payload=b"x")
publish("publish_full", "full/x", payload=b"y")
call("update_state", lambda: (ipc.update_state(state=model.ReportedLifecycleState.RUNNING), {})[1])
call("unsupported", lambda: (ipc.list_components(), {})[1])

events = {"iot": [], "config": [], "validate": []}
got = {k: threading.Event() for k in events}

def on_iot(ev):
    events["iot"].append({"topic": ev.message.topic_name, "payload": ev.message.payload.decode("latin-1")})
    got["iot"].set()

def on_config(ev):
    e = ev.configuration_update_event
    events["config"].append({"component": e.component_name, "keyPath": e.key_path})
    got["config"].set()

def on_validate(ev):
    e = ev.validate_configuration_update_event
    events["validate"].append({"configuration": e.configuration, "deploymentId": e.deployment_id})
    got["validate"].set()

_, iot_op = ipc.subscribe_to_iot_core(topic_name="cmd/+/down", qos=model.QOS.AT_LEAST_ONCE, on_stream_event=on_iot)
_, cfg_op = ipc.subscribe_to_configuration_update(key_path=[], on_stream_event=on_config)
val_op = None
try:
    _, val_op = ipc.subscribe_to_validate_configuration_updates(on_stream_event=on_validate)
    out("subscribe_validate", ok=True)
except Exception as e:
    out("subscribe_validate", ok=False, error=type(e).__name__, message=getattr(e, "message", None))

out("iot_event", ok=got["iot"].wait(30), events=events["iot"])
out("config_event", ok=got["config"].wait(30), events=events["config"])
if val_op is not None:
    ok = got["validate"].wait(30)
    out("validate_event", ok=ok, events=events["validate"])
    if ok:
        report = model.ConfigurationValidityReport(
            status=model.ConfigurationValidityStatus.REJECTED,
            deployment_id=events["validate"][0]["deploymentId"],
            message="threshold too high")
        call("validity_report", lambda: (ipc.send_configuration_validity_report(configuration_validity_report=report), {})[1])

iot_op.close().result(10)
out("iot_closed", ok=True)
sys.stdin.readline()
ipc.close()
out("done", ok=True)
"#;

    /// The Python client process; on failure, panics with its output and the fake's log.
    struct PyClient {
        child: Option<Child>,
    }

    impl PyClient {
        fn spawn(nucleus: &FakeNucleus, token: &str) -> PyClient {
            let script = nucleus.dir().join("client.py");
            std::fs::write(&script, PY_CLIENT).unwrap();
            let child = Command::new(crate::support::python())
                .arg(&script)
                .arg(nucleus.socket_path())
                .arg(token)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {} (set GATEHOUSE_PYTHON): {e}",
                        crate::support::python()
                    )
                });
            PyClient { child: Some(child) }
        }

        async fn fail(&mut self, nucleus: &FakeNucleus, what: &str) -> ! {
            let mut child = self.child.take().unwrap();
            let _ = child.start_kill();
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "{what}\n--- python stdout ---\n{}\n--- python stderr ---\n{}\n--- frame log ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                nucleus.frame_log()
            );
        }

        async fn wait<T>(
            &mut self,
            nucleus: &FakeNucleus,
            what: &str,
            f: impl FnMut(&FakeNucleus) -> Option<T>,
        ) -> T {
            match nucleus.try_wait_for(T, f).await {
                Some(v) => v,
                None => {
                    self.fail(nucleus, &format!("timed out waiting for {what}"))
                        .await
                }
            }
        }

        /// Let the script disconnect, wait for its exit; its steps by name.
        async fn finish(&mut self, nucleus: &FakeNucleus) -> HashMap<String, Value> {
            let mut child = self.child.take().unwrap();
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"go\n").await;
            }
            let out = match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
                .await
            {
                Ok(out) => out.unwrap(),
                Err(_) => panic!("the Python client did not exit\n{}", nucleus.frame_log()),
            };
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let context = format!(
                "--- python stdout ---\n{stdout}\n--- python stderr ---\n{stderr}\n--- frame log ---\n{}",
                nucleus.frame_log()
            );
            assert!(
                out.status.success(),
                "python exited with {}\n{context}",
                out.status
            );
            let mut steps = HashMap::new();
            for line in stdout.lines().filter(|l| l.starts_with('{')) {
                let v: Value = serde_json::from_str(line).unwrap();
                steps.insert(v["step"].as_str().unwrap().to_string(), v);
            }
            steps.insert("_context".to_string(), Value::String(context));
            steps
        }
    }

    async fn drive_with_python(mode: NucleusMode) {
        let lite = mode == NucleusMode::Lite;
        let nucleus = FakeNucleus::builder(mode, COMPONENT, test_config())
            .component_config("aws.greengrass.Nucleus", json!({"awsRegion": "eu-west-1"}))
            .start();
        nucleus.set_publish_policy(|p| {
            if p.topic.starts_with("deny/") {
                PublishReply::unauthorized()
            } else if p.topic.starts_with("full/") {
                PublishReply::spool_full(p)
            } else {
                PublishReply::Accept
            }
        });
        let mut py = PyClient::spawn(&nucleus, nucleus.token());
        py.wait(&nucleus, "the IoT Core subscription", |n| {
            (n.subscriptions().len() == 1).then_some(())
        })
        .await;
        py.wait(&nucleus, "the configuration subscription", |n| {
            (n.config_subscriptions().len() == 1).then_some(())
        })
        .await;
        py.wait(&nucleus, "the validation subscription attempt", |n| {
            n.requests()
                .iter()
                .any(|r| r.operation == "SubscribeToValidateConfigurationUpdates")
                .then_some(())
        })
        .await;
        assert_eq!(nucleus.send_iot_message("cmd/gw1/down", b"reboot"), 1);
        assert_eq!(
            nucleus.update_config(json!({"nested": {"threshold": 43}})),
            vec![vec!["nested".to_string(), "threshold".to_string()]]
        );
        let proposed = json!({"nested": {"threshold": 1000}});
        let report = nucleus
            .validate_config(proposed.clone(), "deployment-1", T)
            .await;
        if lite {
            assert!(report.is_err(), "lite has no validation: {report:?}");
        } else if let Err(e) = report {
            py.fail(&nucleus, &e).await;
        }
        py.wait(&nucleus, "the client to close its IoT Core stream", |n| {
            (n.subscriptions().is_empty() && n.open_connections() == 1).then_some(())
        })
        .await;
        let steps = py.finish(&nucleus).await;
        let ctx = steps["_context"].as_str().unwrap().to_string();
        let step = |name: &str| -> &Value {
            steps
                .get(name)
                .unwrap_or_else(|| panic!("no step {name}\n{ctx}"))
        };
        let ok = |name: &str| assert_eq!(step(name)["ok"], json!(true), "{name}\n{ctx}");
        let err = |name: &str, error: &str, message: Option<&str>| {
            let s = step(name);
            assert_eq!(s["ok"], json!(false), "{name}\n{ctx}");
            assert_eq!(s["error"], json!(error), "{name}\n{ctx}");
            assert_eq!(s["message"], json!(message), "{name}\n{ctx}");
        };
        let deployed = |v: Value| if lite { stringify_scalars(&v) } else { v };

        ok("connect");
        assert_eq!(
            step("config_all")["value"],
            deployed(test_config()),
            "{ctx}"
        );
        assert_eq!(step("config_all")["component"], json!(COMPONENT), "{ctx}");
        assert_eq!(
            step("config_leaf")["value"],
            deployed(json!({"threshold": 42})),
            "{ctx}"
        );
        assert_eq!(
            step("config_container")["value"],
            deployed(test_config()["nested"].clone()),
            "{ctx}"
        );
        assert_eq!(
            step("config_other")["value"],
            json!({"awsRegion": "eu-west-1"}),
            "{ctx}"
        );
        // The Python client reads only `message`, which nucleus lite does not send.
        let text = |m: &'static str| (!lite).then_some(m);
        err(
            "config_missing",
            "ResourceNotFoundError",
            text("Key not found"),
        );
        ok("publish");
        err(
            "publish_denied",
            "UnauthorizedError",
            text("Not Authorized"),
        );
        err(
            "publish_full",
            "ServiceError",
            text(
                "Publish to topic full/x failed: Message spool is full. Message could not be added.",
            ),
        );
        ok("update_state");
        if lite {
            err("unsupported", "ServiceError", None);
        } else {
            // The Java nucleus's "Unsupported Operation" has TerminateStream and no
            // service-model-type: awsiotsdk takes it for an empty close of the stream (not the
            // UnmappedDataError IPC.md §2.3 predicts) and fails the call with StreamClosedError.
            assert_eq!(
                step("unsupported")["error"],
                json!("StreamClosedError"),
                "{ctx}"
            );
        }
        ok("iot_event");
        assert_eq!(
            step("iot_event")["events"],
            json!([{"topic": "cmd/gw1/down", "payload": "reboot"}]),
            "{ctx}"
        );
        ok("config_event");
        assert_eq!(
            step("config_event")["events"],
            json!([{"component": COMPONENT, "keyPath": ["nested", "threshold"]}]),
            "{ctx}"
        );
        if lite {
            err("subscribe_validate", "ServiceError", None);
            assert!(nucleus.validity_reports().is_empty());
        } else {
            ok("subscribe_validate");
            ok("validate_event");
            assert_eq!(
                step("validate_event")["events"],
                json!([{"configuration": proposed, "deploymentId": "deployment-1"}]),
                "{ctx}"
            );
            ok("validity_report");
            assert_eq!(
                nucleus.validity_reports(),
                vec![ValidityReport {
                    status: "REJECTED".into(),
                    deployment_id: "deployment-1".into(),
                    message: Some("threshold too high".into()),
                }]
            );
        }
        ok("iot_closed");
        ok("done");

        // What the fake recorded.
        let publishes = nucleus.publishes();
        assert_eq!(publishes.len(), 1, "{ctx}");
        let p = &publishes[0];
        assert_eq!((p.topic.as_str(), p.qos), ("dt/gw/up", 1));
        assert_eq!(p.payload, b"hello\x00\xff");
        assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
        assert_eq!(p.content_type.as_deref(), Some("application/octet-stream"));
        let outcomes: Vec<PublishOutcome> = nucleus
            .publish_attempts()
            .into_iter()
            .map(|a| a.outcome)
            .collect();
        assert_eq!(outcomes.len(), 3);
        assert_eq!(
            outcomes[1],
            PublishOutcome::Rejected(ModelledError::unauthorized())
        );
        assert_eq!(nucleus.states(), vec!["RUNNING".to_string()]);
        let conns = nucleus.connections();
        assert_eq!(conns.len(), 1);
        assert_eq!(
            conns[0].connect_payload,
            json!({"authToken": nucleus.token()})
        );
        assert!(nucleus.connect_failures().is_empty());
        assert!(
            nucleus.violations().is_empty(),
            "{:?}\n{ctx}",
            nucleus.violations()
        );
        assert!(nucleus.max_client_frame() < LITE_MAX_FRAME);
        nucleus
            .wait_for("the client's disconnect", T, |n| {
                (n.open_connections() == 0 && n.config_subscriptions().is_empty()).then_some(())
            })
            .await;
    }

    #[tokio::test]
    async fn python_client_drives_the_java_fake() {
        drive_with_python(NucleusMode::Java).await;
    }

    #[tokio::test]
    async fn python_client_drives_the_lite_fake() {
        drive_with_python(NucleusMode::Lite).await;
    }

    #[tokio::test]
    async fn python_client_with_a_bad_token_cannot_connect() {
        for mode in modes() {
            let nucleus = FakeNucleus::start(mode, COMPONENT, test_config());
            let mut py = PyClient::spawn(&nucleus, "WRONGWRONGWRONG1");
            let steps = py.finish(&nucleus).await;
            let ctx = steps["_context"].as_str().unwrap();
            let connect = &steps["connect"];
            assert_eq!(connect["ok"], json!(false), "{mode:?}\n{ctx}");
            if mode == NucleusMode::Java {
                // awscrt reports the rejecting ConnectAck as AccessDeniedError, unless the
                // server's close (which the Java nucleus does right after that ack) reaches its
                // event loop first: then the socket close wins.
                let error = connect["error"].as_str().unwrap_or_default();
                let detail = connect["detail"].as_str().unwrap_or_default();
                assert!(
                    error == "AccessDeniedError"
                        || (error == "AwsCrtError" && detail.contains("AWS_IO_SOCKET_CLOSED")),
                    "{ctx}"
                );
            }
            assert!(!steps.contains_key("config_all"), "{ctx}");
            let failures = nucleus.connect_failures();
            assert_eq!(failures.len(), 1, "{mode:?}\n{ctx}");
            assert!(failures[0].reason.contains("bad authToken"), "{failures:?}");
            assert!(nucleus.connections().is_empty());
        }
    }

    #[tokio::test]
    async fn env_names_the_socket_token_and_thing() {
        let nucleus = FakeNucleus::builder(NucleusMode::Java, COMPONENT, json!({}))
            .thing_name("gw-thing-7")
            .start();
        let env: HashMap<String, String> = nucleus.env().into_iter().collect();
        assert_eq!(env["SVCUID"], nucleus.token());
        assert_eq!(env["AWS_CONTAINER_AUTHORIZATION_TOKEN"], nucleus.token());
        assert_eq!(
            Path::new(&env["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"]),
            nucleus.socket_path()
        );
        assert_eq!(env["AWS_IOT_THING_NAME"], "gw-thing-7");
        assert!(nucleus.token().chars().all(|c| c.is_ascii_uppercase()));
        assert!(
            nucleus.socket_path().as_os_str().len() < 108,
            "sun_path limit"
        );
    }
}
