//! Greengrass client device auth (the `aws.greengrass.clientdevices.Auth` component) over IPC:
//! how a listener with `auth.kind: greengrass` admits agents that hold AWS IoT thing
//! certificates, authorizes what they do, and gets its own server certificate — as the stock
//! Greengrass brokers (Moquette, EMQX) do.
//!
//! Guarantees:
//! - An agent is admitted only when client device auth says its certificate belongs to a valid
//!   client device (VerifyClientDeviceIdentity), gives it a session token for its client id
//!   and certificate (GetClientDeviceAuthToken), and authorizes `mqtt:connect` on
//!   `mqtt:clientId:<id>` (AuthorizeClientDeviceAction).
//! - Every publish and subscribe is authorized too (`mqtt:publish` on `mqtt:topic:<topic>`,
//!   `mqtt:subscribe` on `mqtt:topicfilter:<filter>`). Answers are cached per connection for
//!   [`DECISION_TTL`] (at most [`MAX_DECISIONS`] of them); a session token client device auth no
//!   longer knows is renewed once; a question it cannot answer is a denial (fail closed) and is
//!   not cached.
//! - The listeners' server certificate follows SubscribeToCertificateUpdates; until the first
//!   one arrives their TLS handshakes are refused. A failed or ended subscription is opened
//!   again with backoff while the IPC connection lives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

use super::ipc::{IpcClient, IpcError};
use crate::listener::acl::Access;
use crate::listener::tls::ServerTls;
use crate::listener::{DeviceAuth, DeviceFuture, DeviceGrant, DeviceRefusal};
use crate::telemetry::Throttle;

/// How long a connection reuses an authorization answer (client device auth's own default
/// `clientDeviceTrustDurationMinutes` is 1 minute).
pub const DECISION_TTL: Duration = Duration::from_secs(60);
/// Cached answers per connection; past it the cache starts over.
pub const MAX_DECISIONS: usize = 256;
/// Backoff bounds for re-opening the certificate subscription.
const RESUBSCRIBE_MIN: Duration = Duration::from_secs(1);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(60);

/// Client device auth, reached through the nucleus's IPC connection (a cheap handle).
#[derive(Clone)]
pub struct ClientDevices {
    client: IpcClient,
}

impl ClientDevices {
    pub fn new(client: IpcClient) -> Self {
        Self { client }
    }

    /// A session token for `client_id` with certificate `pem`.
    async fn session_token(&self, client_id: &str, pem: &str) -> Result<String, DeviceRefusal> {
        let request = json!({"credential": {"mqttCredential": {
            "clientId": client_id,
            "certificatePem": pem,
        }}});
        let response = self
            .client
            .request("GetClientDeviceAuthToken", &request)
            .await
            .map_err(|e| refusal("GetClientDeviceAuthToken", e))?;
        match response
            .get("clientDeviceAuthToken")
            .and_then(Value::as_str)
        {
            Some(token) if !token.is_empty() => Ok(token.to_string()),
            _ => Err(DeviceRefusal::Unavailable(
                "GetClientDeviceAuthToken answered without a clientDeviceAuthToken".into(),
            )),
        }
    }

    async fn authorize(
        &self,
        token: &str,
        operation: &str,
        resource: &str,
    ) -> Result<bool, IpcError> {
        let request = json!({
            "clientDeviceAuthToken": token,
            "operation": operation,
            "resource": resource,
        });
        let response = self
            .client
            .request("AuthorizeClientDeviceAction", &request)
            .await?;
        Ok(flag(&response, "isAuthorized"))
    }
}

/// A boolean answer field; nucleus lite style `"true"` accepted.
fn flag(response: &Value, field: &str) -> bool {
    match response.get(field) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

/// How an IPC failure refuses an agent: a definite answer about its credentials is a denial,
/// anything else means client device auth could not answer.
fn refusal(operation: &str, e: IpcError) -> DeviceRefusal {
    match e.service_code() {
        Some("InvalidCredentialError" | "InvalidClientDeviceAuthTokenError") => {
            DeviceRefusal::Denied(format!("{operation}: {e}"))
        }
        Some("UnauthorizedError") => DeviceRefusal::Unavailable(format!(
            "{operation}: {e} (the component's accessControl must allow \
             aws.greengrass.clientdevices.Auth operations)"
        )),
        Some("ServiceError") | None if is_unsupported(&e) => DeviceRefusal::Unavailable(format!(
            "{operation}: {e} (is aws.greengrass.clientdevices.Auth deployed on this core \
             device?)"
        )),
        _ => DeviceRefusal::Unavailable(format!("{operation}: {e}")),
    }
}

fn is_unsupported(e: &IpcError) -> bool {
    e.to_string().to_lowercase().contains("unsupported")
}

/// A DER certificate as PEM, the form client device auth takes.
fn pem_of(cert: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

impl DeviceAuth for ClientDevices {
    fn admit<'a>(
        &'a self,
        client_id: &'a str,
        cert: &'a CertificateDer<'static>,
    ) -> DeviceFuture<'a, Result<Box<dyn DeviceGrant>, DeviceRefusal>> {
        Box::pin(async move {
            let pem = pem_of(cert);
            let request = json!({"credential": {"clientDeviceCertificate": pem}});
            let verified = self
                .client
                .request("VerifyClientDeviceIdentity", &request)
                .await
                .map_err(|e| refusal("VerifyClientDeviceIdentity", e))?;
            if !flag(&verified, "isValidClientDevice") {
                return Err(DeviceRefusal::Denied(
                    "client device auth does not know this certificate \
                     (VerifyClientDeviceIdentity)"
                        .into(),
                ));
            }
            let token = self.session_token(client_id, &pem).await?;
            let resource = format!("mqtt:clientId:{client_id}");
            match self.authorize(&token, "mqtt:connect", &resource).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(DeviceRefusal::Denied(format!(
                        "client device auth does not allow mqtt:connect on {resource}"
                    )));
                }
                Err(e) => return Err(refusal("AuthorizeClientDeviceAction", e)),
            }
            Ok(Box::new(Grant {
                devices: self.clone(),
                client_id: client_id.to_string(),
                pem,
                token: Mutex::new(token),
                decisions: Mutex::new(HashMap::new()),
            }) as Box<dyn DeviceGrant>)
        })
    }
}

/// One admitted agent's session with client device auth.
struct Grant {
    devices: ClientDevices,
    client_id: String,
    pem: String,
    token: Mutex<String>,
    /// (access, topic) -> (allowed, when answered).
    decisions: Mutex<HashMap<(bool, String), (bool, Instant)>>,
}

impl Grant {
    fn cached(&self, key: &(bool, String)) -> Option<bool> {
        let decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        decisions
            .get(key)
            .filter(|(_, at)| at.elapsed() < DECISION_TTL)
            .map(|(allowed, _)| *allowed)
    }

    fn remember(&self, key: (bool, String), allowed: bool) {
        let mut decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if decisions.len() >= MAX_DECISIONS {
            decisions.clear();
        }
        decisions.insert(key, (allowed, Instant::now()));
    }

    fn token(&self) -> String {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks client device auth, renewing an expired session token once.
    async fn ask(&self, operation: &str, resource: &str) -> Result<bool, String> {
        let devices = &self.devices;
        match devices.authorize(&self.token(), operation, resource).await {
            Err(e) if e.service_code() == Some("InvalidClientDeviceAuthTokenError") => {
                let renewed = devices
                    .session_token(&self.client_id, &self.pem)
                    .await
                    .map_err(|r| match r {
                        DeviceRefusal::Denied(why) | DeviceRefusal::Unavailable(why) => why,
                    })?;
                *self.token.lock().unwrap_or_else(|e| e.into_inner()) = renewed.clone();
                devices
                    .authorize(&renewed, operation, resource)
                    .await
                    .map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }
}

impl DeviceGrant for Grant {
    fn allows<'a>(&'a self, access: Access, topic: &'a str) -> DeviceFuture<'a, bool> {
        Box::pin(async move {
            let publish = access == Access::Publish;
            let key = (publish, topic.to_string());
            if let Some(allowed) = self.cached(&key) {
                return allowed;
            }
            let (operation, resource) = if publish {
                ("mqtt:publish", format!("mqtt:topic:{topic}"))
            } else {
                ("mqtt:subscribe", format!("mqtt:topicfilter:{topic}"))
            };
            match self.ask(operation, &resource).await {
                Ok(allowed) => {
                    self.remember(key, allowed);
                    allowed
                }
                Err(why) => {
                    static LOG: Throttle = Throttle::new(10_000);
                    if let Some(held_back) = LOG.ready() {
                        tracing::warn!(
                            client_id = %self.client_id,
                            operation,
                            resource,
                            error = %why,
                            similar_not_logged = held_back,
                            "Client device auth could not answer; denied."
                        );
                    }
                    false
                }
            }
        })
    }
}

/// Keeps `listeners`' server certificate equal to client device auth's, until the IPC
/// connection closes.
pub async fn follow_server_certificate(client: IpcClient, listeners: Vec<Arc<ServerTls>>) {
    let mut backoff = RESUBSCRIBE_MIN;
    let request = json!({"certificateOptions": {"certificateType": "SERVER"}});
    loop {
        let subscribed = tokio::select! {
            _ = client.closed() => return,
            s = client.subscribe("SubscribeToCertificateUpdates", &request) => s,
        };
        match subscribed {
            Ok((_, mut updates)) => {
                tracing::info!("Following client device auth's server certificate.");
                loop {
                    let event = tokio::select! {
                        _ = client.closed() => return,
                        event = updates.next() => event,
                    };
                    match event {
                        Some(Ok(event)) => {
                            backoff = RESUBSCRIBE_MIN;
                            install(&event, &listeners);
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "Server certificate updates failed.");
                            break;
                        }
                        None => {
                            tracing::warn!("Server certificate updates ended.");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                let hint = match e.service_code() {
                    Some("UnauthorizedError") => {
                        " (the component's accessControl must allow \
                         aws.greengrass#SubscribeToCertificateUpdates on \
                         aws.greengrass.clientdevices.Auth)"
                    }
                    _ => " (is aws.greengrass.clientdevices.Auth deployed on this core device?)",
                };
                tracing::error!(
                    retry_in_s = backoff.as_secs(),
                    "No server certificate from client device auth: {e}{hint}; agents cannot \
                     connect over TLS until one arrives."
                );
            }
        }
        tokio::select! {
            _ = client.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
    }
}

/// Installs one CertificateUpdateEvent into every listener.
fn install(event: &Value, listeners: &[Arc<ServerTls>]) {
    let update = &event["certificateUpdate"];
    let (Some(certificate), Some(key)) = (
        update["certificate"].as_str(),
        update["privateKey"].as_str(),
    ) else {
        tracing::warn!("Ignoring a certificate update without certificate and privateKey.");
        return;
    };
    let mut chain = certificate.trim_end().to_string();
    for ca in update["caCertificates"].as_array().into_iter().flatten() {
        if let Some(ca) = ca.as_str() {
            chain.push('\n');
            chain.push_str(ca.trim_end());
        }
    }
    chain.push('\n');
    for tls in listeners {
        match tls.install_device_certificate(&chain, key) {
            Ok(()) => tracing::info!("Installed a server certificate from client device auth."),
            Err(e) => tracing::error!("Cannot use client device auth's server certificate: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_becomes_the_pem_client_device_auth_takes() {
        let der = CertificateDer::from((0u8..=200).collect::<Vec<u8>>());
        let pem = pem_of(&der);
        let parsed: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(parsed, vec![der]);
        assert!(pem.lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn a_definite_answer_denies_and_anything_else_is_unavailable() {
        let service = |code: &str| IpcError::Service {
            code: code.into(),
            message: "m".into(),
        };
        assert!(matches!(
            refusal("op", service("InvalidCredentialError")),
            DeviceRefusal::Denied(_)
        ));
        assert!(matches!(
            refusal("op", service("UnauthorizedError")),
            DeviceRefusal::Unavailable(why) if why.contains("accessControl")
        ));
        assert!(matches!(
            refusal("op", IpcError::Closed("gone".into())),
            DeviceRefusal::Unavailable(_)
        ));
        assert!(flag(&json!({"isAuthorized": "true"}), "isAuthorized"));
        assert!(!flag(&json!({}), "isAuthorized"));
    }
}
