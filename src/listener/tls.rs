//! TLS for agent listeners: the server certificate, and how agents' client certificates are
//! verified; reloaded from disk without dropping connected agents.
//!
//! Guarantees:
//! - TLS 1.2 and 1.3 only (rustls).
//! - With a client CA, a certificate that does not chain to it, is expired or not yet valid,
//!   or is missing (when required) fails the handshake.
//! - Under Greengrass client device auth, any client certificate passes the handshake *only*
//!   as far as proving possession of its key (the handshake signature is verified); the
//!   listener then asks the nucleus whether the certificate is a known device.
//! - A reload (files changed, or SIGHUP) builds a complete new configuration first: a bad new
//!   file is reported and the previous configuration stays in use. New handshakes use the new
//!   one; established connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use anyhow::Context;
use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::ListenerTls;
use crate::tls::{self as pem, rustls_error};

/// The files' modification times and lengths: a change in any means "reload".
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(Vec<(Option<SystemTime>, u64)>);

impl FileStamp {
    fn of(paths: &[PathBuf]) -> Option<Self> {
        paths
            .iter()
            .map(|p| {
                let meta = std::fs::metadata(p).ok()?;
                Some((meta.modified().ok(), meta.len()))
            })
            .collect::<Option<Vec<_>>>()
            .map(Self)
    }
}

/// Watches files (certificates, keys, a password file) for changes, so they are reloaded only
/// when they changed.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    last: Mutex<Option<FileStamp>>,
}

impl FileWatch {
    /// Starts watching `paths` as they are now: call it before reading them, so a change
    /// during the read is seen at the next check.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let last = Mutex::new(FileStamp::of(&paths));
        Self { paths, last }
    }

    /// Whether the files changed since the last call (always, with `force`). Remembers what it
    /// saw either way: a reload that fails is retried at the next change (or SIGHUP).
    pub fn changed(&self, force: bool) -> bool {
        let now = FileStamp::of(&self.paths);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let changed = force || now != *last;
        *last = now;
        changed
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How client certificates are checked.
#[derive(Debug)]
enum ClientAuth {
    /// Against these CAs; `required` or optional (password fallback).
    Verified {
        roots: Arc<RootCertStore>,
        required: bool,
    },
    /// No client certificate asked for.
    None,
    /// Greengrass client device auth: any certificate, possession of its key proven.
    AnyDevice,
}

/// Builds a server configuration.
fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: &ClientAuth,
    key_path: &str,
) -> anyhow::Result<ServerConfig> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS provider")?;
    let builder = match client_auth {
        ClientAuth::Verified { roots, required } => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider);
            let verifier = if *required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier.build().with_context(|| {
                    format!("{key_path}.clientCaFile: unusable CA certificates")
                })?,
            )
        }
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::AnyDevice => builder.with_client_cert_verifier(Arc::new(AnyDevice(provider))),
    };
    builder.with_single_cert(chain, key).with_context(|| {
        format!("{key_path}.keyFile: the key does not match {key_path}.certFile, or is unsupported")
    })
}

/// Where the configuration comes from.
enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
        required: bool,
    },
    /// Certificates pushed by Greengrass client device auth.
    Greengrass,
}

/// A listener's TLS configuration, replaceable at run time.
pub struct ServerTls {
    /// Config key of this TLS block, e.g. `listeners[0].tls`, for messages.
    key: String,
    source: Source,
    current: RwLock<Option<Arc<ServerConfig>>>,
    /// The certificate, key and client CA files (none under client device auth).
    watch: Option<FileWatch>,
}

impl ServerTls {
    /// Loads a file-based configuration; the error names the key and the file.
    pub fn from_files(tls: &ListenerTls, key: &str) -> anyhow::Result<Self> {
        let source = Source::Files {
            cert: tls
                .cert_file
                .clone()
                .with_context(|| format!("{key}.certFile: is required"))?,
            key: tls
                .key_file
                .clone()
                .with_context(|| format!("{key}.keyFile: is required"))?,
            client_ca: tls.client_ca_file.clone(),
            required: tls.require_client_cert(),
        };
        let mut paths = vec![tls.cert_file.clone(), tls.key_file.clone()];
        paths.push(tls.client_ca_file.clone());
        let this = Self {
            key: key.to_string(),
            source,
            current: RwLock::new(None),
            watch: Some(FileWatch::new(paths.into_iter().flatten().collect())),
        };
        this.install(this.load_files()?);
        Ok(this)
    }

    /// A configuration that waits for Greengrass client device auth's server certificate.
    pub fn for_greengrass(key: &str) -> Self {
        Self {
            key: key.to_string(),
            source: Source::Greengrass,
            current: RwLock::new(None),
            watch: None,
        }
    }

    /// Installs a server certificate issued by client device auth (PEM chain and key).
    pub fn install_device_certificate(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let source = Path::new("the certificate from client device auth");
        let chain = pem::certs_from(&mut chain_pem.as_bytes(), source, &self.key)?;
        let key = pem::key_from(&mut key_pem.as_bytes(), source, &self.key)?;
        let config = build(chain, key, &ClientAuth::AnyDevice, &self.key)?;
        self.install(config);
        Ok(())
    }

    fn install(&self, config: ServerConfig) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(config));
    }

    /// The configuration for a new handshake; `None` until a certificate is installed.
    pub fn config(&self) -> Option<Arc<ServerConfig>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn load_files(&self) -> anyhow::Result<ServerConfig> {
        let Source::Files {
            cert,
            key,
            client_ca,
            required,
        } = &self.source
        else {
            anyhow::bail!("{}: not file-based", self.key);
        };
        let chain = pem::read_certs(cert, &format!("{}.certFile", self.key))?;
        let private = pem::read_key(key, &format!("{}.keyFile", self.key))?;
        let client_auth = match client_ca {
            Some(path) => {
                let ca_key = format!("{}.clientCaFile", self.key);
                let mut roots = RootCertStore::empty();
                for ca in pem::read_certs(path, &ca_key)? {
                    roots.add(ca).with_context(|| {
                        format!(
                            "{ca_key}: {} holds an unusable CA certificate",
                            path.display()
                        )
                    })?;
                }
                ClientAuth::Verified {
                    roots: Arc::new(roots),
                    required: *required,
                }
            }
            None => ClientAuth::None,
        };
        build(chain, private, &client_auth, &self.key)
    }

    /// Reloads the files when they changed (or when `force`, on SIGHUP). Returns whether a new
    /// configuration is in use; a failed reload is logged and the old one kept.
    pub fn reload(&self, force: bool) -> bool {
        match &self.watch {
            Some(watch) if watch.changed(force) => {}
            _ => return false,
        }
        match self.load_files() {
            Ok(config) => {
                self.install(config);
                tracing::info!(tls = %self.key, "Reloaded the listener's certificates.");
                true
            }
            Err(e) => {
                tracing::error!("{e:#}; keeping the previous TLS configuration.");
                false
            }
        }
    }
}

/// Accepts any client certificate chain as far as the TLS layer goes, verifying only that the
/// client holds the certificate's key: Greengrass client device auth decides the rest.
#[derive(Debug)]
struct AnyDevice(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyDevice {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A handshake failure in an operator's terms.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    use rustls::CertificateError as Cert;
    let Some(tls) = rustls_error(e) else {
        return format!("TLS handshake failed: {e}");
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::Expired | Cert::ExpiredContext { .. } => "client certificate expired".to_string(),
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                "client certificate not yet valid (check the clocks)".to_string()
            }
            Cert::UnknownIssuer => "client certificate not signed by tls.clientCaFile".to_string(),
            other => format!("client certificate refused ({other:?})"),
        },
        rustls::Error::NoCertificatesPresented => {
            "no client certificate (tls.requireClientCert is true)".to_string()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}
