//! TLS pieces shared by the upstream link and the agent listeners: reading PEM certificates and
//! keys with errors that name the config key and the file, and finding the rustls error inside
//! an I/O error chain.

use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Every certificate in `path`; at least one. `key` is the config key, e.g. `upstream.caFile`.
pub fn read_certs(path: &Path, key: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    certs_from(&mut BufReader::new(file), path, key)
}

/// Every certificate in PEM `text`; at least one. `source` names it in errors.
pub fn certs_from(
    text: &mut dyn std::io::BufRead,
    source: &Path,
    key: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(text)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{key}: {} is not valid PEM", source.display()))?;
    if certs.is_empty() {
        bail!(
            "{key}: {} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
            source.display()
        );
    }
    Ok(certs)
}

/// The private key in `path`. `key` is the config key, e.g. `upstream.keyFile`.
pub fn read_key(path: &Path, key: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    key_from(&mut BufReader::new(file), path, key)
}

/// The private key in PEM `text`. `source` names it in errors.
pub fn key_from(
    text: &mut dyn std::io::BufRead,
    source: &Path,
    key: &str,
) -> anyhow::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(text)
        .with_context(|| format!("{key}: {} is not valid PEM", source.display()))?
        .with_context(|| {
            format!(
                "{key}: {} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)",
                source.display()
            )
        })
}

/// A rustls client configuration on the gateway's crypto provider (ring) and protocol versions,
/// trusting `roots` and presenting `identity` (certificate chain and key) when given.
pub fn client_config_from(
    roots: rustls::RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A client configuration trusting the CA in `ca_file`, presenting `client` (certificate and
/// key files) when given: for the benchmark tools that play agents over TLS.
pub fn client_config(
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_file, "--cafile")? {
        roots.add(cert).context("--cafile")?;
    }
    let identity = match client {
        Some((cert, key)) => Some((read_certs(cert, "--cert")?, read_key(key, "--key")?)),
        None => None,
    };
    client_config_from(roots, identity).context("--cert/--key")
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
