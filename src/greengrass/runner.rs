//! The gateway as a Greengrass component, from connecting to the nucleus to exiting.
//!
//! Guarantees:
//! - The configuration is the component configuration (`component::parse`); an invalid one is
//!   reported (ERRORED, and the error names the key) and the process exits with an error.
//! - RUNNING is reported once agents are served with the journal open.
//! - A configuration change touching only `component::LIVE_PREFIXES` is applied to the running
//!   gateway; any other change restarts the gateway in this process, in order (listeners,
//!   batcher, sink, journal), with the new configuration, and says which keys caused it.
//! - Deployments are validated before they land (`Component::validate_deployments`).
//! - Losing the IPC connection shuts the gateway down in order and returns an error, so the
//!   process exits non-zero and the nucleus restarts it with a fresh token. SIGTERM (the
//!   nucleus stopping the component) is a graceful stop. A fatal error reports ERRORED first.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use super::Environment;
use super::component::{self, Component, LITE_MAX_FRAME, Nucleus};
use super::ipc::IpcClient;
use crate::config::{Bind, Config, MetricsConfig, UpstreamConfig};
use crate::gateway::Gateway;

/// How long one IPC request may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What to do with the log filter (`logLevel`), which belongs to the process.
pub type SetLogLevel = Box<dyn Fn(&str) + Send + Sync>;

/// Why one gateway run ended.
enum Ended {
    /// SIGTERM: the component is being stopped.
    Stopped,
    /// A configuration change that needs a restart.
    Restart(Box<Config>, Value),
    /// The IPC connection is gone.
    IpcLost(String),
    /// The gateway stopped by itself.
    Failed(anyhow::Error),
}

/// Runs the gateway as a component until `signal`, or until something fatal happens.
/// `metrics` overrides `metrics.bind` (the `--metrics` flag).
pub async fn run(
    env: Environment,
    metrics: Option<SocketAddr>,
    set_log_level: SetLogLevel,
    signal: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tracing::info!(socket = %env.socket.display(), "Running as a Greengrass component.");
    // Every frame is small until the nucleus is known: nucleus lite's cap is safe for both.
    let client = IpcClient::connect(&env.socket, &env.token, LITE_MAX_FRAME, REQUEST_TIMEOUT)
        .await
        .context("connecting to the Greengrass nucleus")?;
    let component = Component::new(client.clone());
    let nucleus = component.nucleus().await;
    let mut document = component
        .configuration()
        .await
        .context("reading the component configuration (GetConfiguration)")?;
    let mut config = match component::parse(document.clone()) {
        Ok(config) => config,
        Err(e) => {
            let _ = component.update_state("ERRORED").await;
            anyhow::bail!("invalid component configuration:\n{e}");
        }
    };
    if let Some(addr) = metrics {
        config.metrics = Some(MetricsConfig { bind: Bind(addr) });
    }
    // Once per process: a restart keeps the metrics listener it started with.
    crate::telemetry::install(config.metrics.as_ref().map(|m| m.bind.0))?;
    let max_frame = frame_cap(&config, nucleus);
    client.set_max_frame(max_frame);
    tracing::info!(
        "Nucleus: {}; IPC frames of {max_frame} bytes at most.",
        match nucleus {
            Nucleus::Lite => "Greengrass nucleus lite",
            Nucleus::Java => "the Greengrass (Java) nucleus",
        }
    );
    tokio::spawn({
        let component = component.clone();
        async move {
            if let Err(e) = component.validate_deployments().await {
                tracing::warn!(error = %e, "Deployments' configurations are not validated in advance.");
            }
        }
    });
    let mut updates = component
        .watch_configuration()
        .await
        .context("subscribing to configuration updates")?;
    tokio::pin!(signal);

    loop {
        set_log_level(&config.log_level);
        let (batch_tx, batch_rx) = watch::channel(config.batch.clone());
        let (ready_tx, mut ready_rx) = oneshot::channel();
        let gateway = match Gateway::bind(config.clone()).await {
            Ok(gateway) => gateway,
            Err(e) => return fail(&component, e).await,
        };
        let gateway = gateway
            .with_nucleus(client.clone())
            .with_live_batch(batch_rx)
            .on_ready(ready_tx);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let mut run = tokio::spawn(gateway.run(async {
            let _ = stop_rx.await;
        }));
        let mut waiting_ready = true;
        let ended = loop {
            tokio::select! {
                _ = &mut signal => break Ended::Stopped,
                reason = client.closed() => break Ended::IpcLost(reason),
                result = &mut run => {
                    break Ended::Failed(match result {
                        Ok(Ok(())) => anyhow::anyhow!("the gateway stopped unexpectedly"),
                        Ok(Err(e)) => e,
                        Err(e) => anyhow::anyhow!("the gateway panicked: {e}"),
                    });
                }
                ready = &mut ready_rx, if waiting_ready => {
                    waiting_ready = false;
                    if ready.is_ok() && let Err(e) = component.update_state("RUNNING").await {
                        tracing::warn!(error = %e, "Cannot report RUNNING to the nucleus.");
                    }
                }
                event = updates.next() => match event {
                    Some(Ok(_)) => {
                        if let Some(restart) = apply_update(
                            &component,
                            &mut document,
                            &mut config,
                            &batch_tx,
                            &set_log_level,
                        )
                        .await
                        {
                            break restart;
                        }
                    }
                    Some(Err(e)) => break Ended::IpcLost(format!("configuration updates failed: {e}")),
                    None => break Ended::IpcLost("configuration updates ended".into()),
                },
            }
        };
        let _ = stop_tx.send(());
        let finished = || async {
            match run.await {
                Ok(result) => result,
                Err(e) => Err(anyhow::anyhow!("the gateway panicked: {e}")),
            }
        };
        match ended {
            // The gateway has already stopped.
            Ended::Failed(e) => return fail(&component, e).await,
            Ended::Stopped => return finished().await,
            Ended::IpcLost(reason) => {
                if let Err(e) = finished().await {
                    tracing::error!("The gateway failed while stopping: {e:#}");
                }
                anyhow::bail!(
                    "lost the Greengrass IPC connection ({reason}); exiting so that the nucleus restarts the component"
                );
            }
            Ended::Restart(new, new_document) => {
                if let Err(e) = finished().await {
                    return fail(&component, e).await;
                }
                config = *new;
                document = new_document;
                client.set_max_frame(frame_cap(&config, nucleus));
                tracing::info!("Gateway restarting with the new configuration.");
            }
        }
    }
}

/// Reports ERRORED and returns the error.
async fn fail(component: &Component, error: anyhow::Error) -> anyhow::Result<()> {
    if let Err(e) = component.update_state("ERRORED").await {
        tracing::warn!(error = %e, "Cannot report ERRORED to the nucleus.");
    }
    Err(error)
}

/// The frame cap: `upstream.maxFrameBytes`, else the nucleus's.
fn frame_cap(config: &Config, nucleus: Nucleus) -> usize {
    let configured = match &config.upstream {
        UpstreamConfig::Greengrass(gg) => gg.max_frame_bytes.map(|b| b.get() as usize),
        _ => None,
    };
    configured.unwrap_or(match nucleus {
        Nucleus::Lite => LITE_MAX_FRAME,
        Nucleus::Java => component::JAVA_MAX_FRAME,
    })
}

/// Reads the configuration after an update event: applies it live, or asks for a restart.
async fn apply_update(
    component: &Component,
    document: &mut Value,
    config: &mut Config,
    batch: &watch::Sender<crate::config::BatchConfig>,
    set_log_level: &SetLogLevel,
) -> Option<Ended> {
    let new_document = match component.configuration().await {
        Ok(value) => value,
        Err(e) => {
            tracing::error!(error = %e, "Cannot read the updated configuration; keeping the running one.");
            return None;
        }
    };
    let changed = component::changed_keys(
        &component::config_document(document.clone()),
        &component::config_document(new_document.clone()),
    );
    if changed.is_empty() {
        return None;
    }
    let new = match component::parse(new_document.clone()) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("Configuration update not applied, the running one is kept: {e}");
            return None;
        }
    };
    if component::all_live(&changed) {
        tracing::info!(
            "Applying a configuration change live: {}.",
            changed.join(", ")
        );
        batch.send_replace(new.batch.clone());
        set_log_level(&new.log_level);
        *config = new;
        *document = new_document;
        return None;
    }
    tracing::info!(
        "Configuration change needs a restart of the gateway: {}.",
        changed.join(", ")
    );
    Some(Ended::Restart(Box::new(new), new_document))
}
