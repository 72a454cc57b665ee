//! The agent-facing security settings: a listener's TLS, how it authenticates agents, the limits
//! that keep one client (or a flood of them) from harming the others, and the topic ACL.
//!
//! Validated with the rest of the configuration (`Config::validate`): a plain-TCP listener on a
//! non-loopback address needs `allowPlaintext`, certificate authentication needs a client CA,
//! and so on; every error names its key, e.g. `listeners[0].tls.clientCaFile`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Bounded, InvalidKey, ListenerConfig, lenient_bool};

/// TLS on an agent listener. TLS 1.2 and 1.3 only.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTls {
    /// The server certificate chain (PEM). Not set under `auth.kind: greengrass`, where client
    /// device auth issues it.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The server certificate's private key (PKCS#8, PKCS#1 or SEC1 PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The CAs that sign agents' certificates (PEM).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client certificate is required (default true); when false, agents without one
    /// authenticate with a password (`auth.passwordFile`).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub require_client_cert: Option<bool>,
    /// How long the TLS handshake may take. Default 10000.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: Bounded<100, 600_000>,
    /// Which part of the client certificate is the agent's identity. Default `cn`.
    #[serde(default)]
    pub identity_from: IdentityFrom,
}

impl ListenerTls {
    pub fn require_client_cert(&self) -> bool {
        self.require_client_cert.unwrap_or(true)
    }
}

/// Where an agent's identity is read from in its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentityFrom {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first URI subject alternative name.
    SanUri,
    /// The first DNS subject alternative name.
    SanDns,
}

/// How a listener authenticates agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthKind {
    /// By client certificate (`tls.clientCaFile`); with `tls.requireClientCert: false`, agents
    /// without one fall back to `passwordFile`.
    Certificate,
    /// By MQTT username and password, checked against `passwordFile` (argon2 hashes).
    Password,
    /// By the Greengrass nucleus's client device auth component (as a Greengrass component).
    Greengrass,
    /// Not at all: the agent is who its client id says. Loopback or `allowPlaintext` only.
    None,
}

impl std::fmt::Display for AuthKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthKind::Certificate => "certificate",
            AuthKind::Password => "password",
            AuthKind::Greengrass => "greengrass",
            AuthKind::None => "none",
        })
    }
}

/// `listeners[].auth`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Default: `certificate` when `tls.clientCaFile` is set, else `none`.
    #[serde(default)]
    pub kind: Option<AuthKind>,
    /// Lines of `username:$argon2id$...` (see `gatehouse password-hash`).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// What a denied MQTT 3.1.1 QoS 1/2 PUBLISH gets (3.1.1 cannot refuse one in its PUBACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnDenied {
    /// Close the connection without acknowledging (the default).
    #[default]
    Close,
    /// Acknowledge and discard it, as most brokers do.
    Ignore,
}

/// One ACL rule: `{"allow": "publish", "topic": "agents/${identity}/#"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AclRuleConfig {
    #[serde(default)]
    pub allow: Option<AclAction>,
    #[serde(default)]
    pub deny: Option<AclAction>,
    /// An MQTT topic filter; `${clientId}`, `${identity}` and `${thingName}` are replaced.
    pub topic: String,
}

/// What an ACL rule governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AclAction {
    Publish,
    Subscribe,
    All,
}

/// The default ACL: an agent publishes under its own subtree and subscribes to its commands.
pub fn default_acl() -> Vec<AclRuleConfig> {
    vec![
        AclRuleConfig {
            allow: Some(AclAction::Publish),
            deny: None,
            topic: "agents/${identity}/#".into(),
        },
        AclRuleConfig {
            allow: Some(AclAction::Subscribe),
            deny: None,
            topic: "agents/${identity}/commands/#".into(),
        },
    ]
}

const VARIABLES: [&str; 3] = ["${clientId}", "${identity}", "${thingName}"];

impl ListenerConfig {
    /// The authentication this listener applies (the default depends on its TLS).
    pub fn auth_kind(&self) -> AuthKind {
        self.auth.kind.unwrap_or(
            match self.tls.as_ref().and_then(|t| t.client_ca_file.as_ref()) {
                Some(_) => AuthKind::Certificate,
                None => AuthKind::None,
            },
        )
    }

    /// Cross-field checks of one listener, `key` being e.g. `listeners[0]`.
    pub(super) fn validate_security(&self, key: &str, errors: &mut Vec<InvalidKey>) {
        let mut bad = |sub: &str, reason: String| {
            errors.push(InvalidKey {
                key: format!("{key}.{sub}"),
                reason,
            })
        };
        let addr = self.bind.0;
        let plaintext_ok = addr.ip().is_loopback() || self.allow_plaintext;
        if self.tls.is_none() && !plaintext_ok {
            bad(
                "allowPlaintext",
                format!(
                    "{addr} is plain TCP on a non-loopback address: agents' telemetry and \
                     credentials would cross the network unencrypted; add \"tls\", or set \
                     \"allowPlaintext\": true to accept that"
                ),
            );
        }
        let kind = self.auth_kind();
        let file_check = |path: &PathBuf| {
            std::fs::metadata(path)
                .err()
                .map(|e| format!("cannot read {}: {e}", path.display()))
        };
        match (&self.tls, kind) {
            (None, AuthKind::Certificate | AuthKind::Greengrass) => bad(
                "auth.kind",
                format!("{kind} authentication needs a TLS listener (\"tls\")"),
            ),
            (Some(tls), AuthKind::Greengrass) => {
                for (sub, set) in [
                    ("certFile", tls.cert_file.is_some()),
                    ("keyFile", tls.key_file.is_some()),
                    ("clientCaFile", tls.client_ca_file.is_some()),
                ] {
                    if set {
                        bad(
                            &format!("tls.{sub}"),
                            "must not be set with auth.kind greengrass: client device auth \
                             issues the server certificate and verifies agents"
                                .into(),
                        );
                    }
                }
            }
            (Some(tls), _) => {
                for (sub, path) in [("certFile", &tls.cert_file), ("keyFile", &tls.key_file)] {
                    match path {
                        None => bad(&format!("tls.{sub}"), "is required".into()),
                        Some(path) => {
                            if let Some(reason) = file_check(path) {
                                bad(&format!("tls.{sub}"), reason);
                            }
                        }
                    }
                }
                if let Some(reason) = tls.client_ca_file.as_ref().and_then(file_check) {
                    bad("tls.clientCaFile", reason);
                }
                if kind == AuthKind::Certificate && tls.client_ca_file.is_none() {
                    bad(
                        "tls.clientCaFile",
                        "is required for certificate authentication".into(),
                    );
                }
                if kind == AuthKind::Certificate
                    && !tls.require_client_cert()
                    && self.auth.password_file.is_none()
                {
                    bad(
                        "auth.passwordFile",
                        "is required when tls.requireClientCert is false: agents without a \
                         certificate authenticate with a password"
                            .into(),
                    );
                }
            }
            (None, _) => {}
        }
        match (kind, &self.auth.password_file) {
            (AuthKind::Password, None) => bad(
                "auth.passwordFile",
                "is required for password authentication".into(),
            ),
            (AuthKind::Greengrass | AuthKind::None, Some(_)) => bad(
                "auth.passwordFile",
                format!("has no use with auth.kind {kind}"),
            ),
            (AuthKind::Certificate, Some(_))
                if self.tls.as_ref().is_some_and(|t| t.require_client_cert()) =>
            {
                bad(
                    "auth.passwordFile",
                    "has no use while tls.requireClientCert is true (every agent has a \
                     certificate)"
                        .into(),
                )
            }
            (_, Some(path)) => {
                if let Some(reason) = file_check(path) {
                    bad("auth.passwordFile", reason);
                }
            }
            _ => {}
        }
        if kind == AuthKind::None && !plaintext_ok {
            bad(
                "auth.kind",
                format!(
                    "none (no authentication) on the non-loopback address {addr}: any host on \
                     the network could publish as any agent; use certificate or password \
                     authentication, or set \"allowPlaintext\": true to accept that"
                ),
            );
        }
    }
}

/// Checks the ACL rules; `key` is `acl`.
pub(super) fn validate_acl(rules: &[AclRuleConfig], errors: &mut Vec<InvalidKey>) {
    for (i, rule) in rules.iter().enumerate() {
        let mut bad = |sub: &str, reason: String| {
            errors.push(InvalidKey {
                key: format!("acl[{i}]{sub}"),
                reason,
            })
        };
        match (rule.allow, rule.deny) {
            (Some(_), Some(_)) => bad("", "has both \"allow\" and \"deny\"; use two rules".into()),
            (None, None) => bad("", "needs \"allow\" or \"deny\"".into()),
            _ => {}
        }
        // Check the filter's shape with every variable standing for one plain level.
        let mut shape = rule.topic.clone();
        for var in VARIABLES {
            shape = shape.replace(var, "x");
        }
        if shape.contains("${") {
            bad(
                ".topic",
                format!(
                    "{:?} uses an unknown variable; known: {}",
                    rule.topic,
                    VARIABLES.join(", ")
                ),
            );
        } else if shape.is_empty() || !rumqttc::valid_filter(&shape) {
            bad(
                ".topic",
                format!("{:?} is not a valid MQTT topic filter", rule.topic),
            );
        }
    }
}

pub const fn default_handshake_timeout_ms() -> Bounded<100, 600_000> {
    Bounded::new(10_000)
}
pub(super) const fn default_max_connections() -> Bounded<1, 10_000_000> {
    Bounded::new(100_000)
}
pub(super) const fn default_connections_per_sec() -> Bounded<1, 1_000_000> {
    Bounded::new(1_000)
}
pub(super) const fn default_connection_burst() -> Bounded<1, 1_000_000> {
    Bounded::new(2_000)
}
pub(super) const fn default_publishes_per_sec() -> Bounded<1, 10_000_000> {
    Bounded::new(10_000)
}
pub(super) const fn default_publish_burst() -> Bounded<1, 10_000_000> {
    Bounded::new(20_000)
}
pub(super) const fn default_max_topic_length() -> Bounded<1, 65_535> {
    Bounded::new(256)
}
pub(super) const fn default_max_topic_levels() -> Bounded<1, 1_000> {
    Bounded::new(16)
}
