//! Who an agent is: read from its client certificate (CN or a SAN), or checked against a
//! password file, or (without authentication) taken from its client id.
//!
//! Guarantees:
//! - A certificate without the configured field, or with an empty one, yields no identity (the
//!   agent is refused), never a default.
//! - Passwords are compared only through argon2 verification of the stored PHC hash, and are
//!   never logged or kept after the check.
//! - A password file that fails to load keeps the previously loaded one (and says why); an
//!   unknown user and a wrong password are refused alike.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use rustls::pki_types::CertificateDer;

use crate::config::IdentityFrom;

/// The agent's identity from its end-entity certificate, or why there is none.
pub fn from_certificate(cert: &CertificateDer<'_>, from: IdentityFrom) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let found = match from {
        IdentityFrom::Cn => parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        IdentityFrom::SanUri | IdentityFrom::SanDns => {
            use x509_parser::extensions::GeneralName;
            let san = parsed
                .subject_alternative_name()
                .map_err(|e| format!("unreadable subjectAltName: {e}"))?;
            san.and_then(|san| {
                san.value
                    .general_names
                    .iter()
                    .find_map(|name| match (from, name) {
                        (IdentityFrom::SanUri, GeneralName::URI(uri)) => Some(uri.to_string()),
                        (IdentityFrom::SanDns, GeneralName::DNSName(dns)) => Some(dns.to_string()),
                        _ => None,
                    })
            })
        }
    };
    match found {
        Some(identity) if !identity.is_empty() => Ok(identity),
        _ => Err(format!(
            "the client certificate has no {} (tls.identityFrom)",
            match from {
                IdentityFrom::Cn => "subject common name",
                IdentityFrom::SanUri => "URI subject alternative name",
                IdentityFrom::SanDns => "DNS subject alternative name",
            }
        )),
    }
}

/// Usernames and their argon2 hashes, from `auth.passwordFile`: one `username:$argon2...` per
/// line; blank lines and lines starting with `#` are ignored.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    hashes: HashMap<String, String>,
}

impl PasswordFile {
    /// Reads and checks the file; the error names the file and the line.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("auth.passwordFile: cannot read {}: {e}", path.display()))?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self, String> {
        let mut hashes = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| {
                format!(
                    "auth.passwordFile: {} line {}: {why}",
                    path.display(),
                    n + 1
                )
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("expected username:$argon2id$..."))?;
            if user.is_empty() {
                return Err(bad("empty username"));
            }
            let parsed = PasswordHash::new(hash).map_err(|e| bad(&format!("bad hash: {e}")))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(bad("not an argon2 hash (use gatehouse password-hash)"));
            }
            if hashes.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(bad(&format!("user {user:?} appears twice")));
            }
        }
        Ok(Self { hashes })
    }

    /// Whether `password` is `user`'s. Slow on purpose (argon2): call off the reactor.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let Some(hash) = self.hashes.get(user) else {
            return false;
        };
        let Ok(hash) = PasswordHash::new(hash) else {
            return false;
        };
        argon2::Argon2::default()
            .verify_password(password, &hash)
            .is_ok()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// A password file that follows its file on disk (re-read when it changes, or on SIGHUP).
pub struct Passwords {
    path: PathBuf,
    current: std::sync::RwLock<std::sync::Arc<PasswordFile>>,
    watch: super::tls::FileWatch,
}

impl Passwords {
    pub fn load(path: &Path) -> Result<Self, String> {
        let watch = super::tls::FileWatch::new(vec![path.to_owned()]);
        let file = PasswordFile::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            current: std::sync::RwLock::new(std::sync::Arc::new(file)),
            watch,
        })
    }

    pub fn current(&self) -> std::sync::Arc<PasswordFile> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads when the file changed (or `force`); keeps the old one when the new one is bad.
    pub fn reload(&self, force: bool) {
        if !self.watch.changed(force) {
            return;
        }
        match PasswordFile::load(&self.path) {
            Ok(file) => {
                tracing::info!(path = %self.path.display(), users = file.len(), "Reloaded the password file.");
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    std::sync::Arc::new(file);
            }
            Err(e) => tracing::error!("{e}; keeping the previous password file."),
        }
    }
}

/// Checks a password off the reactor, a few at a time: each argon2 verification takes tens of
/// milliseconds and about 19 MiB, so a reconnect storm must not run hundreds at once.
pub async fn check_password(passwords: &Passwords, user: &str, password: String) -> bool {
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
    let Ok(_slot) = SLOTS.acquire().await else {
        return false;
    };
    let file = passwords.current();
    let user = user.to_string();
    tokio::task::spawn_blocking(move || file.verify(&user, password.as_bytes()))
        .await
        .unwrap_or(false)
}

/// A PHC argon2id hash of `password`, for a password file line (`gatehouse password-hash`).
pub fn hash_password(password: &[u8]) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .expect("argon2 with default parameters hashes any password")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_verifies_its_users_and_names_bad_lines() {
        let hash = hash_password(b"s3cret");
        let text = format!("# agents\n\nedr-1:{hash}\n");
        let file = PasswordFile::parse(&text, Path::new("pw.txt")).unwrap();
        assert!(file.verify("edr-1", b"s3cret"));
        assert!(!file.verify("edr-1", b"S3cret"));
        assert!(!file.verify("edr-2", b"s3cret"));

        let err = PasswordFile::parse("edr-1 plaintext\n", Path::new("pw.txt")).unwrap_err();
        assert!(err.contains("pw.txt line 1"), "{err}");
        let err =
            PasswordFile::parse(&format!("a:{hash}\na:{hash}\n"), Path::new("pw.txt")).unwrap_err();
        assert!(err.contains("line 2") && err.contains("twice"), "{err}");
        let err = PasswordFile::parse("a:$5$rounds=1$abc$def\n", Path::new("pw.txt")).unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }
}
