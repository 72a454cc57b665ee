//! Event-stream RPC frames as Greengrass IPC uses them: the frame codec of `aws-smithy-eventstream`
//! (prelude, headers, payload, both CRC-32s) under the RPC layer's headers (`:message-type`,
//! `:message-flags`, `:stream-id`, `operation`, `service-model-type`, `:content-type`).
//!
//! Guarantees:
//! - `encode` writes headers in the order AWS's own clients do, and `encoded_len` is the exact
//!   length `encode` produces, so a sender can keep every frame under the nucleus's cap (nucleus
//!   lite closes the connection on a frame over 10,000 bytes).
//! - `Decoder` refuses a frame whose declared length passes its cap before buffering it.

use aws_smithy_eventstream::frame::{read_message_from, write_message_to};
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::{Buf, Bytes, BytesMut};

/// `:message-type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    ApplicationMessage = 0,
    ApplicationError = 1,
    Ping = 2,
    PingResponse = 3,
    Connect = 4,
    ConnectAck = 5,
    ProtocolError = 6,
    InternalError = 7,
}

impl MessageType {
    fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::ApplicationMessage,
            1 => Self::ApplicationError,
            2 => Self::Ping,
            3 => Self::PingResponse,
            4 => Self::Connect,
            5 => Self::ConnectAck,
            6 => Self::ProtocolError,
            7 => Self::InternalError,
            _ => return None,
        })
    }
}

/// `:message-flags` bits.
pub const CONNECTION_ACCEPTED: i32 = 1;
pub const TERMINATE_STREAM: i32 = 2;

/// One RPC message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub message_type: MessageType,
    pub flags: i32,
    pub stream_id: i32,
    /// `operation`: on the first message of a stream.
    pub operation: Option<String>,
    /// `service-model-type`: the request, response, event or error shape.
    pub model_type: Option<String>,
    /// `:content-type`, `application/json` on application messages.
    pub content_type: Option<String>,
    /// `:version`, on Connect.
    pub version: Option<String>,
    pub payload: Bytes,
}

impl Frame {
    /// An application message (a request, or a stream's later message).
    pub fn application(stream_id: i32, flags: i32, payload: Bytes) -> Self {
        Self {
            message_type: MessageType::ApplicationMessage,
            flags,
            stream_id,
            operation: None,
            model_type: None,
            content_type: None,
            version: None,
            payload,
        }
    }

    fn headers(&self) -> Vec<Header> {
        let mut headers = Vec::with_capacity(7);
        let string = |name: &'static str, value: &str| {
            Header::new(name, HeaderValue::String(value.to_string().into()))
        };
        if let Some(version) = &self.version {
            headers.push(string(":version", version));
        }
        if let Some(content_type) = &self.content_type {
            headers.push(string(":content-type", content_type));
        }
        if let Some(model) = &self.model_type {
            headers.push(string("service-model-type", model));
        }
        headers.push(Header::new(
            ":message-type",
            HeaderValue::Int32(self.message_type as i32),
        ));
        headers.push(Header::new(
            ":message-flags",
            HeaderValue::Int32(self.flags),
        ));
        headers.push(Header::new(
            ":stream-id",
            HeaderValue::Int32(self.stream_id),
        ));
        if let Some(operation) = &self.operation {
            headers.push(string("operation", operation));
        }
        headers
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let message = Message::new_from_parts(self.headers(), self.payload.clone());
        let mut out = Vec::with_capacity(encoded_len(self));
        write_message_to(&message, &mut out).map_err(|e| format!("cannot encode frame: {e}"))?;
        Ok(out)
    }

    fn from_message(message: &Message) -> Result<Self, String> {
        let mut frame = Frame::application(0, 0, message.payload().clone());
        let mut message_type = None;
        for header in message.headers() {
            let name = header.name().as_str();
            let text = || {
                header
                    .value()
                    .as_string()
                    .map(|s| s.as_str().to_string())
                    .map_err(|_| format!("header {name} is not a string"))
            };
            let int = || {
                header
                    .value()
                    .as_int32()
                    .map_err(|_| format!("header {name} is not an int32"))
            };
            // Header names are case-insensitive in the reference implementation.
            match name.to_ascii_lowercase().as_str() {
                ":message-type" => {
                    let value = int()?;
                    message_type = Some(
                        MessageType::from_i32(value)
                            .ok_or_else(|| format!("unknown :message-type {value}"))?,
                    );
                }
                ":message-flags" => frame.flags = int()?,
                ":stream-id" => frame.stream_id = int()?,
                "operation" => frame.operation = Some(text()?),
                "service-model-type" => frame.model_type = Some(text()?),
                ":content-type" => frame.content_type = Some(text()?),
                ":version" => frame.version = Some(text()?),
                _ => {}
            }
        }
        frame.message_type = message_type.ok_or("frame without :message-type")?;
        Ok(frame)
    }
}

/// Exactly how many bytes `encode` writes for `frame`.
pub fn encoded_len(frame: &Frame) -> usize {
    let header_len: usize = frame
        .headers()
        .iter()
        .map(|h| {
            1 + h.name().as_bytes().len()
                + 1
                + match h.value() {
                    HeaderValue::Int32(_) => 4,
                    HeaderValue::String(s) => 2 + s.as_bytes().len(),
                    _ => 0,
                }
        })
        .sum();
    // Prelude (total, headers length, prelude CRC), headers, payload, message CRC.
    12 + header_len + frame.payload.len() + 4
}

/// Reads frames from a byte stream, refusing any whose declared length is over `max_len`.
pub struct Decoder {
    buffer: BytesMut,
    max_len: usize,
}

impl Decoder {
    pub fn new(max_len: usize) -> Self {
        Self {
            buffer: BytesMut::with_capacity(16 * 1024),
            max_len,
        }
    }

    /// Where the caller reads more bytes into.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buffer
    }

    /// The next complete frame in the buffer, if any. The frame's declared length is checked
    /// before anything else is read; both CRCs are checked by the codec.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        if self.buffer.len() < 4 {
            return Ok(None);
        }
        let declared = (&self.buffer[..4]).get_u32() as usize;
        if declared > self.max_len {
            return Err(format!(
                "frame of {declared} bytes is over the {} byte limit",
                self.max_len
            ));
        }
        if declared < 16 {
            return Err(format!(
                "frame of {declared} bytes is shorter than a frame can be"
            ));
        }
        if self.buffer.len() < declared {
            return Ok(None);
        }
        let mut bytes = self.buffer.split_to(declared).freeze();
        let message = read_message_from(&mut bytes).map_err(|e| format!("malformed frame: {e}"))?;
        Frame::from_message(&message).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The Connect frame AWS's Python client sends (IPC.md §2.2, verified on the wire).
    const CONNECT: &str = "0000007900000048e9e79475083a76657273696f6e070005302e312e300d3a6d6573736167652d7479706504000000040e3a6d6573736167652d666c61677304000000000a3a73747265616d2d696404000000007b2261757468546f6b656e223a20224142434445464748494a4b4c4d4e4f50227d0259ce5e";
    /// A ConnectAck a real client accepted (IPC.md §2.2).
    const CONNECT_ACK: &str = "0000004700000037374cfe3f0d3a6d6573736167652d7479706504000000050e3a6d6573736167652d666c61677304000000010a3a73747265616d2d69640400000000e237e27d";

    fn decode_one(bytes: &[u8]) -> Frame {
        let mut decoder = Decoder::new(1 << 20);
        decoder.buffer().extend_from_slice(bytes);
        let frame = decoder.next_frame().unwrap().expect("one whole frame");
        assert!(decoder.buffer().is_empty());
        frame
    }

    #[test]
    fn the_connect_frame_is_byte_for_byte_what_aws_clients_send() {
        let frame = Frame {
            message_type: MessageType::Connect,
            flags: 0,
            stream_id: 0,
            operation: None,
            model_type: None,
            content_type: None,
            version: Some("0.1.0".into()),
            payload: Bytes::from_static(br#"{"authToken": "ABCDEFGHIJKLMNOP"}"#),
        };
        assert_eq!(frame.encode().unwrap(), hex(CONNECT));
        assert_eq!(encoded_len(&frame), hex(CONNECT).len());
        assert_eq!(decode_one(&hex(CONNECT)), frame);
    }

    #[test]
    fn a_connect_ack_decodes() {
        let frame = decode_one(&hex(CONNECT_ACK));
        assert_eq!(frame.message_type, MessageType::ConnectAck);
        assert_eq!(frame.flags, CONNECTION_ACCEPTED);
        assert_eq!(frame.stream_id, 0);
    }

    #[test]
    fn encoded_len_is_exact_for_requests() {
        for payload_len in [0usize, 1, 100, 7_000] {
            let mut frame = Frame::application(7, 0, Bytes::from(vec![b'x'; payload_len]));
            frame.operation = Some("aws.greengrass#PublishToIoTCore".into());
            frame.model_type = Some("aws.greengrass#PublishToIoTCoreRequest".into());
            frame.content_type = Some("application/json".into());
            assert_eq!(encoded_len(&frame), frame.encode().unwrap().len());
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_it_is_buffered() {
        let mut decoder = Decoder::new(100);
        decoder.buffer().extend_from_slice(&hex(CONNECT)[..12]);
        let err = decoder.next_frame().unwrap_err();
        assert!(
            err.contains("121 bytes is over the 100 byte limit"),
            "{err}"
        );
    }

    #[test]
    fn frames_split_anywhere_decode() {
        let bytes = [hex(CONNECT_ACK), hex(CONNECT)].concat();
        let mut decoder = Decoder::new(1 << 20);
        let mut frames = Vec::new();
        for b in bytes {
            decoder.buffer().extend_from_slice(&[b]);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame.message_type);
            }
        }
        assert_eq!(frames, vec![MessageType::ConnectAck, MessageType::Connect]);
    }
}
