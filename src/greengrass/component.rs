//! The component's side of the nucleus: its configuration (read, watched for changes, and
//! validated before a deployment lands) and its lifecycle state.
//!
//! Guarantees:
//! - A deployment whose configuration the gateway would refuse is reported REJECTED before it
//!   lands, with the same message `check-config` gives (naming the key); a valid one ACCEPTED.
//! - A configuration change is classified: keys the running gateway applies live
//!   (`LIVE_PREFIXES`), or keys that need the gateway restarted (in-process, in order).

use serde_json::{Value, json};

use super::ipc::{IpcClient, IpcError, Subscription};
use crate::config::{Config, ConfigError};

/// Configuration keys the running gateway applies without a restart.
pub const LIVE_PREFIXES: &[&str] = &["batch", "logLevel"];

/// Which nucleus the gateway runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nucleus {
    /// Greengrass nucleus lite: 10,000-byte IPC frames, no spooler.
    Lite,
    /// The Java nucleus (or one that did not say it is lite).
    Java,
}

/// The longest validity-report message sent (the frame must stay under lite's cap).
const MAX_REPORT_MESSAGE: usize = 4_000;

/// The IPC frame cap of nucleus lite.
pub const LITE_MAX_FRAME: usize = 10_000;
/// The frame cap assumed for the Java nucleus (aws-c-event-stream's was 16 MiB until 2025).
pub const JAVA_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The component configuration as the gateway's config document: `accessControl` (the
/// nucleus's, not the gateway's) removed, `upstream` defaulted to the Greengrass IPC upstream.
pub fn config_document(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        object.remove("accessControl");
        object
            .entry("upstream")
            .or_insert_with(|| json!({"kind": "greengrass"}));
    }
    value
}

/// Parses a component configuration with the config model.
pub fn parse(value: Value) -> Result<Config, ConfigError> {
    Config::from_value(config_document(value))
}

/// The key paths (dotted, `batch.maxDelayMs`) whose values differ between two documents.
pub fn changed_keys(old: &Value, new: &Value) -> Vec<String> {
    fn walk(prefix: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
        match (old.as_object(), new.as_object()) {
            (Some(a), Some(b)) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                for key in keys {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(
                        &path,
                        a.get(key).unwrap_or(&Value::Null),
                        b.get(key).unwrap_or(&Value::Null),
                        out,
                    );
                }
            }
            _ if old != new => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

/// Whether every changed key can be applied live.
pub fn all_live(changed: &[String]) -> bool {
    changed.iter().all(|key| {
        LIVE_PREFIXES
            .iter()
            .any(|p| key == p || key.starts_with(&format!("{p}.")))
    })
}

/// This component, as the nucleus sees it.
#[derive(Clone)]
pub struct Component {
    client: IpcClient,
}

impl Component {
    pub fn new(client: IpcClient) -> Self {
        Self { client }
    }

    pub fn client(&self) -> &IpcClient {
        &self.client
    }

    /// The component configuration as it stands (the whole `configuration` object).
    pub async fn configuration(&self) -> Result<Value, IpcError> {
        let response = self
            .client
            .request("GetConfiguration", &json!({"keyPath": []}))
            .await?;
        Ok(response.get("value").cloned().unwrap_or(Value::Null))
    }

    /// Reports the component's lifecycle state (`RUNNING`, `ERRORED`).
    pub async fn update_state(&self, state: &str) -> Result<(), IpcError> {
        self.client
            .request("UpdateState", &json!({"state": state}))
            .await
            .map(|_| ())
    }

    /// Nucleus lite answers GetConfiguration for its own component, `aws.greengrass.NucleusLite`;
    /// the Java nucleus says it does not exist. Anything else (a timeout, another error) is not
    /// a positive sign of the Java nucleus, so the smaller frames of lite are kept: they work on
    /// both, while a frame over lite's cap would kill the connection.
    pub async fn nucleus(&self) -> Nucleus {
        let probe = json!({"componentName": "aws.greengrass.NucleusLite", "keyPath": []});
        match self.client.request("GetConfiguration", &probe).await {
            Err(e) if e.service_code() == Some("ResourceNotFoundError") => Nucleus::Java,
            Ok(_) => Nucleus::Lite,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot tell which nucleus this is; keeping nucleus lite's 10,000-byte IPC frames.");
                Nucleus::Lite
            }
        }
    }

    /// Configuration change notifications (each names a key path; the values are read again).
    pub async fn watch_configuration(&self) -> Result<Subscription, IpcError> {
        let (_, subscription) = self
            .client
            .subscribe("SubscribeToConfigurationUpdate", &json!({"keyPath": []}))
            .await?;
        Ok(subscription)
    }

    /// Answers every deployment's validation request until the connection ends.
    pub async fn validate_deployments(self) -> Result<(), IpcError> {
        let (_, mut events) = self
            .client
            .subscribe("SubscribeToValidateConfigurationUpdates", &json!({}))
            .await?;
        while let Some(event) = events.next().await {
            let event = event?;
            let update = &event["validateConfigurationUpdateEvent"];
            let Some(deployment) = update["deploymentId"].as_str() else {
                tracing::warn!(
                    "Ignoring a configuration validation request without a deployment id."
                );
                continue;
            };
            let report = match parse(update["configuration"].clone()) {
                Ok(_) => {
                    tracing::info!(
                        deployment,
                        "Configuration of an incoming deployment is valid."
                    );
                    json!({"status": "ACCEPTED", "deploymentId": deployment})
                }
                Err(e) => {
                    tracing::error!(
                        deployment,
                        "Rejecting a deployment: invalid configuration: {e}"
                    );
                    // Short enough for any nucleus's frame (lite: 10,000 bytes).
                    let mut message = e.to_string();
                    if message.len() > MAX_REPORT_MESSAGE {
                        let mut end = MAX_REPORT_MESSAGE;
                        while !message.is_char_boundary(end) {
                            end -= 1;
                        }
                        message.truncate(end);
                        message.push_str(" ...");
                    }
                    json!({"status": "REJECTED", "deploymentId": deployment, "message": message})
                }
            };
            if let Err(e) = self
                .client
                .request(
                    "SendConfigurationValidityReport",
                    &json!({"configurationValidityReport": report}),
                )
                .await
            {
                tracing::warn!(deployment, error = %e, "Cannot report the configuration's validity.");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_component_configuration_is_the_config_model_minus_access_control() {
        let config = parse(json!({
            "batch": {"maxDelayMs": "250"},
            "listeners": [{"bind": "127.0.0.1:1883", "maxInflight": "64"}],
            "accessControl": {"aws.greengrass.ipc.mqttproxy": {"p": {"policyDescription": "x", "operations": ["*"], "resources": ["*"]}}}
        }))
        .unwrap();
        assert_eq!(
            config.batch.max_delay_ms.get(),
            250,
            "strings as nucleus lite sends them"
        );
        assert_eq!(config.listeners[0].max_inflight.get(), 64);
        assert!(matches!(
            config.upstream,
            crate::config::UpstreamConfig::Greengrass(_)
        ));
    }

    #[test]
    fn an_invalid_component_configuration_names_the_key() {
        let error = parse(json!({"batch": {"maxDelayMs": "soon"}})).unwrap_err();
        assert!(
            error.to_string().starts_with("batch.maxDelayMs:"),
            "{error}"
        );
    }

    #[test]
    fn changes_are_live_only_under_the_live_keys() {
        let old =
            json!({"batch": {"maxDelayMs": 1000}, "logLevel": "info", "journal": {"path": "a"}});
        let live =
            json!({"batch": {"maxDelayMs": 50}, "logLevel": "debug", "journal": {"path": "a"}});
        let changed = changed_keys(&old, &live);
        assert_eq!(changed, vec!["batch.maxDelayMs", "logLevel"]);
        assert!(all_live(&changed));
        let restart =
            json!({"batch": {"maxDelayMs": 1000}, "logLevel": "info", "journal": {"path": "b"}});
        let changed = changed_keys(&old, &restart);
        assert_eq!(changed, vec!["journal.path"]);
        assert!(!all_live(&changed));
    }
}
