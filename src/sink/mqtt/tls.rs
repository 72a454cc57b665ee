//! The upstream's TLS settings: the device certificate and key, the trusted CAs, ALPN; and the
//! translation of TLS failures into causes an operator can act on.

use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::{ClientConfig, RootCertStore};

use crate::tls::{read_certs, read_key};

use crate::config::MqttUpstream;

/// ALPN protocol IoT Core expects for MQTT on port 443.
pub const IOT_ALPN: &[u8] = b"x-amzn-mqtt-ca";

/// Builds the rustls client configuration: server verification against `caFile` (or the
/// system roots), the device certificate for client authentication, and ALPN when asked.
pub fn client_config(config: &MqttUpstream) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            for cert in read_certs(path, "upstream.caFile")? {
                roots.add(cert).with_context(|| {
                    format!(
                        "upstream.caFile: {} holds an unusable CA certificate",
                        path.display()
                    )
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                bail!("upstream.caFile: not set, and no system CA certificates were found");
            }
        }
    }
    let chain = read_certs(&config.cert_file, "upstream.certFile")?;
    let key = read_key(&config.key_file, "upstream.keyFile")?;
    let mut tls = crate::tls::client_config_from(roots, Some((chain, key)))
        .context("upstream.keyFile: the key does not match upstream.certFile, or is unsupported")?;
    if config.use_alpn() {
        tls.alpn_protocols = vec![IOT_ALPN.to_vec()];
    }
    Ok(Arc::new(tls))
}

/// What a TLS failure means for the operator.
pub fn describe(error: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    match error {
        Error::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer | Cert::BadSignature | Cert::UnhandledCriticalExtension => {
                format!("server certificate not trusted ({cert:?}); check upstream.caFile")
            }
            Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                format!("server certificate expired or not yet valid ({cert:?}); check the clocks")
            }
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                "server certificate does not match host; check upstream.host".to_string()
            }
            other => format!("server certificate not trusted ({other:?})"),
        },
        Error::AlertReceived(alert) => match alert {
            Alert::CertificateExpired => {
                "client certificate rejected by broker: certificate expired; renew upstream.certFile"
                    .to_string()
            }
            Alert::CertificateRevoked => {
                "client certificate rejected by broker: certificate revoked".to_string()
            }
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::CertificateRequired
            | Alert::AccessDenied
            | Alert::DecryptError => format!(
                "client certificate rejected by broker ({alert:?}); check upstream.certFile and its registration"
            ),
            other => format!("TLS alert from broker: {other:?}"),
        },
        Error::NoApplicationProtocol => {
            "broker does not speak ALPN x-amzn-mqtt-ca; check upstream.alpn and upstream.port"
                .to_string()
        }
        other => format!("TLS failure: {other}"),
    }
}
