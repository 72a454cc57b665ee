//! The listener's MQTT codec, exposed for the fuzz targets in `tests/fuzz` and nothing else.
//!
//! The codec is private to the listener; this module re-exports exactly what the targets use:
//! framing and decoding for both protocol versions (`mqtt_packets` fuzzes it; `session` reads
//! the agent's stream the way the gateway does, to check the gateway's answers) and the encoder
//! `mqtt_packets` round-trips through. It is `#[doc(hidden)]`, is no part of the gateway's API
//! and promises no stability: the gateway itself never goes through it.

pub use super::codec::{
    AckReason, ConnectError, ConnectRequest, Inbound, Outbound, Protocol, SubResult, read,
    read_connect, write,
};
