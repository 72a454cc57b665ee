//! Wires listener -> journal -> batcher -> sink together and runs them until shutdown.
//!
//! Start-up order: bind every listener (so a bad address fails before anything runs), build the
//! sink, open the journal, then start the sink, the batcher and the listeners.
//!
//! Supervision: the batcher, the sink and the journal's integrity check are watched; should one
//! stop (a panic, an unexpected return, corruption found), the gateway shuts down in order and
//! `run` fails, so the process exits non-zero and its supervisor (Greengrass, systemd) restarts
//! it. A gateway that accepts messages it can no longer deliver never keeps running.
//!
//! Shutdown order (each step finishes before the next):
//! 1. listeners stop accepting; sessions acknowledge what is committed and close;
//! 2. the batcher flushes what was committed and waits (bounded) for the sink's confirmations;
//! 3. the sink finishes; unconfirmed batches stay in the journal for the next start;
//! 4. the journal writer commits what is queued, checkpoints and stops.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};

use crate::batcher::{self, Batcher};
use crate::config::{BatchConfig, Config};
use crate::greengrass::devices::{ClientDevices, follow_server_certificate};
use crate::greengrass::ipc::IpcClient;
use crate::journal::Health;
use crate::listener::{self, Listener, Registry};
use crate::sink::Sink;
use crate::{journal, shutdown, sink, telemetry};

/// How often the summary line is logged (when something changed).
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// How long the batcher may wait for the sink's last confirmations at shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// A gateway whose sockets are bound, not yet running.
pub struct Gateway {
    config: Config,
    listeners: Vec<Listener>,
    /// The nucleus's IPC connection, when running as a Greengrass component.
    nucleus: Option<IpcClient>,
    /// Told once agents are served with the journal open.
    ready: Option<oneshot::Sender<()>>,
    /// Batch settings changed while running (Greengrass configuration updates).
    live_batch: Option<watch::Receiver<BatchConfig>>,
}

impl Gateway {
    /// Binds every listener. Fails with a message naming the address on a bind error.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let mut listeners = Vec::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            let settings = listener::Settings::new(listener, &config, index)?;
            listeners.push(Listener::bind(listener.bind.0, settings).await?);
        }
        Ok(Self {
            config,
            listeners,
            nucleus: None,
            ready: None,
            live_batch: None,
        })
    }

    /// Runs as a Greengrass component: the `greengrass` upstream publishes through `client`.
    pub fn with_nucleus(mut self, client: IpcClient) -> Self {
        self.nucleus = Some(client);
        self
    }

    /// `ready` fires once agents are served and the journal is open.
    pub fn on_ready(mut self, ready: oneshot::Sender<()>) -> Self {
        self.ready = Some(ready);
        self
    }

    /// The batcher follows `batch` as it changes.
    pub fn with_live_batch(mut self, batch: watch::Receiver<BatchConfig>) -> Self {
        self.live_batch = Some(batch);
        self
    }

    /// The addresses agents can connect to (useful when binding port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Runs until `signal` resolves, then shuts down in order. Fails (after the same orderly
    /// shutdown) when a stage the gateway cannot run without stops on its own: the batcher, the
    /// sink, or the journal found corrupt.
    pub async fn run(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let sink = sink::build(&self.config, self.nucleus.as_ref())?;
        self.run_with_sink(sink, signal).await
    }

    /// `run`, with a sink built by the caller.
    pub async fn run_with_sink(
        self,
        sink: Box<dyn Sink>,
        signal: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let config = self.config;
        let mut listeners = self.listeners;
        let certificates = client_device_auth(&mut listeners, self.nucleus.as_ref())?;
        // Opening may migrate: blocking work, kept off the reactor.
        let journal_config = config.journal.clone();
        let (journal, reader, writer) =
            tokio::task::spawn_blocking(move || journal::open(&journal_config))
                .await?
                .with_context(|| format!("journal.path {}", config.journal.path.display()))?;

        let max_payload = sink.max_payload();
        let settings = batcher::Settings {
            gateway: config.thing_name.clone(),
            batch: config.batch.clone(),
            sink_name: sink.name(),
            max_inflight: sink.max_inflight(),
            max_payload,
            drain_grace: DRAIN_GRACE,
            live_batch: self.live_batch,
        };
        let (batches_tx, batches_rx) = mpsc::channel(sink.max_inflight());
        // A sink settles at most what it holds, which is at most max_inflight.
        let (confirm_tx, confirm_rx) = mpsc::channel(sink.max_inflight());
        let mut sink_task = tokio::spawn(sink.run(batches_rx, confirm_tx));

        let (batcher_stop, batcher_shutdown) = shutdown::channel();
        let mut batcher_task = tokio::spawn(Batcher::new(journal.clone(), reader, settings).run(
            batches_tx,
            confirm_rx,
            batcher_shutdown,
        ));

        let (listeners_stop, listeners_shutdown) = shutdown::channel();
        let registry = Arc::new(Registry::new(&config.sessions));
        let mut listener_tasks = Vec::new();
        for mut listener in listeners {
            listener.limit_payload(max_payload, &config);
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "Listening for agents.");
            }
            listener_tasks.push(tokio::spawn(listener.run(
                journal.clone(),
                registry.clone(),
                listeners_shutdown.clone(),
            )));
        }
        drop(listeners_shutdown);
        tracing::info!(
            "Gateway running as {} ({}); journal {}.",
            config.thing_name,
            config.thing_name_source,
            config.journal.path.display()
        );
        let summary = tokio::spawn(telemetry::summarize(SUMMARY_EVERY));
        if let Some(ready) = self.ready {
            let _ = ready.send(());
        }

        let mut health = journal.health();
        let mut failure = None;
        let mut batcher_done = false;
        let mut sink_done = false;
        tokio::select! {
            _ = signal => tracing::info!("Shutting down."),
            result = &mut batcher_task => {
                batcher_done = true;
                failure = Some(match result {
                    Ok(Ok(())) => anyhow::anyhow!("batcher stopped unexpectedly"),
                    Ok(Err(e)) => anyhow::Error::new(e).context("batcher failed"),
                    Err(e) => anyhow::anyhow!("batcher panicked: {e}"),
                });
            }
            result = &mut sink_task => {
                sink_done = true;
                failure = Some(match result {
                    Ok(()) => anyhow::anyhow!("the upstream sink stopped unexpectedly; nothing more could be delivered"),
                    Err(e) => anyhow::anyhow!("the upstream sink panicked: {e}"),
                });
            }
            Ok(problem) = health.wait_for(|h| matches!(h, Health::Corrupt(_))) => {
                let problem = match &*problem { Health::Corrupt(p) => p.clone(), _ => String::new() };
                failure = Some(anyhow::anyhow!(
                    "journal {} is corrupt ({problem}); restart to quarantine it",
                    config.journal.path.display()
                ));
            }
        }
        if let Some(e) = &failure {
            tracing::error!("{e:#}; shutting down.");
        }

        summary.abort();
        if let Some(task) = certificates {
            task.abort();
        }
        listeners_stop.fire();
        for task in listener_tasks {
            let _ = task.await;
        }
        tracing::info!("Agents disconnected; flushing batches.");
        batcher_stop.fire();
        if !batcher_done {
            let result = batcher_task.await;
            if failure.is_none() {
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failure = Some(anyhow::Error::new(e).context("batcher failed")),
                    Err(e) => failure = Some(anyhow::anyhow!("batcher panicked: {e}")),
                }
            }
        }
        if !sink_done && tokio::time::timeout(DRAIN_GRACE, sink_task).await.is_err() {
            tracing::warn!("Sink did not stop in time; its unconfirmed batches stay journaled.");
        }
        drop(journal);
        drop(registry);
        tokio::task::spawn_blocking(move || writer.join()).await?;
        metrics::gauge!(telemetry::CONNECTIONS).set(0.0);
        telemetry::PROGRESS
            .agents_connected
            .store(0, std::sync::atomic::Ordering::Relaxed);
        match failure {
            Some(e) => Err(e),
            None => {
                tracing::info!("Gateway stopped.");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// Hands client device auth to the listeners with `auth.kind: greengrass`, and starts following
/// its server certificate for them. Such listeners need the nucleus.
fn client_device_auth(
    listeners: &mut [Listener],
    nucleus: Option<&IpcClient>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let mut tls = Vec::new();
    for (index, listener) in listeners.iter_mut().enumerate() {
        if !listener.needs_device_auth() {
            continue;
        }
        let Some(client) = nucleus else {
            anyhow::bail!(
                "listeners[{index}].auth.kind: greengrass (client device auth) works only when \
                 the gateway runs as a Greengrass component"
            );
        };
        listener.set_device_auth(Arc::new(ClientDevices::new(client.clone())));
        tls.extend(listener.tls());
    }
    Ok(match (nucleus, tls.is_empty()) {
        (Some(client), false) => Some(tokio::spawn(follow_server_certificate(client.clone(), tls))),
        _ => None,
    })
}
