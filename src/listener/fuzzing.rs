//! The listener's MQTT codec and session, exposed for the fuzz targets in `tests/fuzz` and
//! nothing else.
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

/// Serves one agent session on `stream` as the listener does after accepting a plain TCP
/// connection (the `session` target drives it over an in-memory duplex).
pub async fn serve_session<S>(
    stream: S,
    peer: std::net::SocketAddr,
    settings: std::sync::Arc<super::Settings>,
    journal: crate::journal::Journal,
    registry: std::sync::Arc<super::Registry>,
    shutdown: crate::shutdown::Shutdown,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let slot = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
        .try_acquire_owned()
        .expect("a fresh semaphore has its permit");
    super::session::serve_mqtt(
        stream, None, peer, settings, journal, registry, shutdown, slot,
    )
    .await
}
