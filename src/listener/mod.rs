//! The agent listener: accepts MQTT 3.1.1 / 5.0 connections over TCP or TLS and runs one
//! session task per connection.
//!
//! Guarantees:
//! - The accept loop never dies: accept errors are logged, counted and backed off.
//! - A connection's failure stays inside its task; other agents are unaffected. The TLS
//!   handshake and the CONNECT run in that task, under their timeouts, never in the accept loop.
//! - At most `maxConnections` connections at once (more are closed at accept, counted); new
//!   connections are taken at `connectionsPerSec` after a `connectionBurst`, so a reconnect
//!   storm waits in the kernel's listen backlog instead of starving connected agents.
//! - Certificates and the password file are re-read when they change on disk (checked every
//!   `RELOAD_CHECK`) and on SIGHUP; connected agents are not dropped.
//! - On shutdown the loop stops accepting, every session acknowledges what it committed and
//!   closes, and `run` returns once all of them have ended, or after `SHUTDOWN_BOUND` at most
//!   (sessions still open then are aborted: their agents resend what was not acknowledged).
//!
//! Only this module (with `codec`) knows MQTT packets; it hands the journal `Record`s.

pub mod acl;
mod codec;
/// The codec and a session entry point, for the fuzz targets in `tests/fuzz` only (see the
/// module's doc).
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
mod registry;
mod session;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{
    AuthKind, Config, IdentityFrom, ListenerConfig, OnDenied, default_handshake_timeout_ms,
};
use crate::journal::Journal;
use crate::shutdown::Shutdown;
use crate::sink::pacing::TokenBucket;
use crate::telemetry;

pub use acl::Access;
pub use registry::{DeliverError, Delivery, Registry};

/// How often certificate and password files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(5);
/// The listen backlog asked of the kernel (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// Why client device auth did not let an agent in.
#[derive(Debug)]
pub enum DeviceRefusal {
    /// A definite no: unknown device, or not allowed to connect with this client id.
    Denied(String),
    /// It could not answer (not deployed, nucleus busy): the agent may retry.
    Unavailable(String),
}

/// A future client device auth answers with.
pub type DeviceFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Greengrass client device auth, as the listener uses it (implemented over IPC in
/// `crate::greengrass::devices`).
pub trait DeviceAuth: Send + Sync {
    /// Verifies the device certificate and that it may connect as `client_id`.
    fn admit<'a>(
        &'a self,
        client_id: &'a str,
        cert: &'a rustls::pki_types::CertificateDer<'static>,
    ) -> DeviceFuture<'a, Result<Box<dyn DeviceGrant>, DeviceRefusal>>;
}

/// What one admitted device may do; answers are cached by the implementation.
pub trait DeviceGrant: Send + Sync {
    fn allows<'a>(&'a self, access: Access, topic: &'a str) -> DeviceFuture<'a, bool>;
}

/// Per-listener settings the sessions need, resolved from the config once.
#[derive(Clone)]
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
    /// TLS, when this is a TLS listener.
    pub tls: Option<Arc<tls::ServerTls>>,
    pub handshake_timeout: Duration,
    pub auth: AuthKind,
    pub identity_from: IdentityFrom,
    pub passwords: Option<Arc<identity::Passwords>>,
    /// Client device auth (`auth.kind: greengrass`), set when running under the nucleus.
    pub devices: Option<Arc<dyn DeviceAuth>>,
    pub client_id_binding: bool,
    pub acl: Arc<acl::Acl>,
    pub thing_name: String,
    pub publishes_per_sec: f64,
    pub publish_burst: f64,
    pub max_topic_length: usize,
    pub max_topic_levels: usize,
    pub on_denied_311: OnDenied,
    pub max_connections: usize,
    pub connections_per_sec: f64,
    pub connection_burst: f64,
}

impl Settings {
    /// Resolves `listener` (the `index`th of `config`), loading its certificates and password
    /// file; errors name the key and the file.
    pub fn new(listener: &ListenerConfig, config: &Config, index: usize) -> anyhow::Result<Self> {
        let key = format!("listeners[{index}]");
        let tls = match &listener.tls {
            Some(_) if listener.auth_kind() == AuthKind::Greengrass => Some(Arc::new(
                tls::ServerTls::for_greengrass(&format!("{key}.tls")),
            )),
            Some(t) => Some(Arc::new(tls::ServerTls::from_files(
                t,
                &format!("{key}.tls"),
            )?)),
            None => None,
        };
        let passwords = match &listener.auth.password_file {
            Some(path) => Some(Arc::new(
                identity::Passwords::load(path).map_err(|e| anyhow::anyhow!("{key}.{e}"))?,
            )),
            None => None,
        };
        Ok(Self {
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
            handshake_timeout: Duration::from_millis(
                listener
                    .tls
                    .as_ref()
                    .map_or(default_handshake_timeout_ms(), |t| t.handshake_timeout_ms)
                    .get(),
            ),
            identity_from: listener
                .tls
                .as_ref()
                .map(|t| t.identity_from)
                .unwrap_or_default(),
            tls,
            auth: listener.auth_kind(),
            passwords,
            devices: None,
            client_id_binding: listener.client_id_binding,
            acl: Arc::new(acl::Acl::new(&config.acl)),
            thing_name: config.thing_name.clone(),
            publishes_per_sec: listener.publishes_per_sec.get() as f64,
            publish_burst: listener.publish_burst.get() as f64,
            max_topic_length: listener.max_topic_length.get() as usize,
            max_topic_levels: listener.max_topic_levels.get() as usize,
            on_denied_311: listener.on_denied_311,
            max_connections: listener.max_connections.get() as usize,
            connections_per_sec: listener.connections_per_sec.get() as f64,
            connection_burst: listener.connection_burst.get() as f64,
        })
    }

    /// Checks a topic name or filter against `maxTopicLength` and `maxTopicLevels`.
    pub fn check_topic(&self, topic: &str) -> Result<(), String> {
        if topic.len() > self.max_topic_length {
            return Err(format!(
                "topic of {} bytes is longer than maxTopicLength ({})",
                topic.len(),
                self.max_topic_length
            ));
        }
        let levels = topic.split('/').count();
        if levels > self.max_topic_levels {
            return Err(format!(
                "topic of {levels} levels has more than maxTopicLevels ({})",
                self.max_topic_levels
            ));
        }
        Ok(())
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
        let bind = || -> std::io::Result<TcpListener> {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        };
        let socket = bind().map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        Ok(Self {
            socket,
            settings: Arc::new(settings),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The listener's TLS, for installing certificates from client device auth.
    pub fn tls(&self) -> Option<Arc<tls::ServerTls>> {
        self.settings.tls.clone()
    }

    /// Whether agents on this listener are authenticated by client device auth.
    pub fn needs_device_auth(&self) -> bool {
        self.settings.auth == AuthKind::Greengrass
    }

    /// Sets the client device auth the listener consults (`auth.kind: greengrass`).
    pub fn set_device_auth(&mut self, devices: Arc<dyn DeviceAuth>) {
        Arc::make_mut(&mut self.settings).devices = Some(devices);
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
        let settings = self.settings.clone();
        let mut sessions = JoinSet::new();
        let mut backoff = Duration::from_millis(10);
        let slots = Arc::new(Semaphore::new(settings.max_connections));
        let mut rate = TokenBucket::new(
            settings.connections_per_sec,
            settings.connection_burst,
            Instant::now(),
        );
        let mut reload = tokio::time::interval(RELOAD_CHECK);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "Cannot watch SIGHUP; certificates reload on change only."))
            .ok();
        loop {
            let wait = rate.wait(Instant::now());
            tokio::select! {
                _ = shutdown.wait() => break,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                _ = reload.tick() => settings.reload(false),
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    tracing::info!("SIGHUP: reloading certificates and passwords.");
                    settings.reload(true);
                }
                // Over the connection rate: the next connection waits in the listen backlog.
                _ = tokio::time::sleep(wait), if !wait.is_zero() => {
                    metrics::counter!(telemetry::THROTTLED, "what" => "connections").increment(1);
                }
                accepted = self.socket.accept(), if wait.is_zero() => match accepted {
                    Ok((stream, peer)) => {
                        backoff = Duration::from_millis(10);
                        rate.take(1.0, Instant::now());
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            metrics::counter!(telemetry::REFUSALS, "reason" => "max_connections").increment(1);
                            static LOG: telemetry::Throttle = telemetry::Throttle::new(10_000);
                            if let Some(held_back) = LOG.ready() {
                                tracing::warn!(%peer, max = settings.max_connections, similar_not_logged = held_back, "Refused a connection: maxConnections reached.");
                            }
                            continue;
                        };
                        session::spawn(
                            &mut sessions,
                            stream,
                            peer,
                            settings.clone(),
                            journal.clone(),
                            registry.clone(),
                            shutdown.clone(),
                            permit,
                        );
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

impl Settings {
    /// Re-reads certificates and the password file if they changed (or `force`).
    fn reload(&self, force: bool) {
        if let Some(tls) = &self.tls {
            tls.reload(force);
        }
        if let Some(passwords) = &self.passwords {
            passwords.reload(force);
        }
    }
}

#[cfg(test)]
mod tests;
