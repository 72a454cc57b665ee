//! The upstream's TLS settings: the device certificate and key, the trusted CAs, ALPN; and the
//! translation of TLS failures into causes an operator can act on.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::MqttUpstream;

/// ALPN protocol IoT Core expects for MQTT on port 443.
pub const IOT_ALPN: &[u8] = b"x-amzn-mqtt-ca";

fn read_certs(path: &Path, key: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("upstream.{key}: cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("upstream.{key}: {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "upstream.{key}: {} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
            path.display()
        );
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("upstream.keyFile: cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .with_context(|| format!("upstream.keyFile: {} is not valid PEM", path.display()))?
        .with_context(|| {
            format!(
                "upstream.keyFile: {} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)",
                path.display()
            )
        })
}

/// Builds the rustls client configuration: server verification against `caFile` (or the
/// system roots), the device certificate for client authentication, and ALPN when asked.
pub fn client_config(config: &MqttUpstream) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            for cert in read_certs(path, "caFile")? {
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
    let chain = read_certs(&config.cert_file, "certFile")?;
    let key = read_key(&config.key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS provider")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("upstream.keyFile: the key does not match upstream.certFile, or is unsupported")?;
    if config.use_alpn() {
        tls.alpn_protocols = vec![IOT_ALPN.to_vec()];
    }
    Ok(Arc::new(tls))
}

/// Finds a rustls error inside an I/O error chain.
pub fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
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
