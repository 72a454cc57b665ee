//! The agent listener: accepts MQTT 3.1.1 / 5.0 connections over TCP and runs one session task
//! per connection.
//!
//! Guarantees:
//! - The accept loop never dies: accept errors are logged, counted and backed off.
//! - A connection's failure stays inside its task; other agents are unaffected.
//! - On shutdown the loop stops accepting, every session acknowledges what it committed and
//!   closes, and `run` returns once all of them have ended, or after `SHUTDOWN_BOUND` at most
//!   (sessions still open then are aborted: their agents resend what was not acknowledged).
//!
//! Only this module (with `codec`) knows MQTT packets; it hands the journal `Record`s.

mod codec;
mod registry;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::{Config, ListenerConfig};
use crate::journal::Journal;
use crate::shutdown::Shutdown;
use crate::telemetry;

pub use registry::{DeliverError, Delivery, Registry};

/// Per-listener settings the sessions need, resolved from the config once.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_packet_size: usize,
    pub max_inflight: usize,
    pub connect_timeout: Duration,
    /// How long one write to an agent may make no progress.
    pub write_timeout: Duration,
    /// Messages larger than a batch can hold are refused at ingest.
    pub batch_max_bytes: usize,
    pub batch_budget: crate::envelope::Budget,
    /// Whether to compute dedup keys (dedup window > 0).
    pub dedup: bool,
}

impl Settings {
    pub fn new(listener: &ListenerConfig, config: &Config) -> Self {
        Self {
            max_packet_size: listener.max_packet_size.get() as usize,
            max_inflight: listener.max_inflight.get() as usize,
            connect_timeout: Duration::from_millis(listener.connect_timeout_ms.get()),
            write_timeout: Duration::from_millis(listener.write_timeout_ms.get()),
            batch_max_bytes: config.batch.max_bytes.get() as usize,
            batch_budget: crate::envelope::Budget::new(
                config.batch.max_bytes.get() as usize,
                &config.thing_name,
                config.batch.compression.into(),
            ),
            dedup: config.journal.dedup_window().is_some(),
        }
    }
}

/// How long `run` waits for sessions to close after shutdown began; a session closes within
/// its own `CLOSE_GRACE`, so this is only the backstop.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(8);

/// A bound listener, ready to serve.
pub struct Listener {
    socket: TcpListener,
    settings: Arc<Settings>,
}

impl Listener {
    /// Binds the address; the error names it.
    pub async fn bind(addr: SocketAddr, settings: Settings) -> anyhow::Result<Self> {
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        Ok(Self {
            socket,
            settings: Arc::new(settings),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Caps the ingest check at the sink's payload limit when that is below `batch.maxBytes`,
    /// so the listener refuses exactly what the batcher could not build a batch for.
    pub fn limit_payload(&mut self, max_payload: usize, config: &Config) {
        let settings = Arc::make_mut(&mut self.settings);
        if max_payload < settings.batch_max_bytes {
            settings.batch_max_bytes = max_payload;
            settings.batch_budget = crate::envelope::Budget::new(
                max_payload,
                &config.thing_name,
                config.batch.compression.into(),
            );
        }
    }

    /// Accepts until `shutdown` fires, then waits for every session to close.
    pub async fn run(self, journal: Journal, registry: Arc<Registry>, mut shutdown: Shutdown) {
        let mut sessions = JoinSet::new();
        let mut backoff = Duration::from_millis(10);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                accepted = self.socket.accept() => match accepted {
                    Ok((stream, peer)) => {
                        backoff = Duration::from_millis(10);
                        sessions.spawn(session::serve(
                            stream,
                            peer,
                            self.settings.clone(),
                            journal.clone(),
                            registry.clone(),
                            shutdown.clone(),
                        ));
                    }
                    Err(e) => {
                        metrics::counter!(telemetry::REFUSALS, "reason" => "accept_error").increment(1);
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Failed to accept a connection.");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                },
            }
        }
        drop(self.socket);
        let all_closed = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_BOUND, all_closed)
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = sessions.len(),
                "Agent sessions did not close in time; aborting them."
            );
            sessions.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests;
