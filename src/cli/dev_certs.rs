//! `gatehouse dev-certs DIR --agents N`: a throwaway PKI for trying the gateway out with mutual
//! TLS. Writes into DIR (created if missing):
//!
//! - `ca.pem`, `ca.key`: a CA (path length 0) that signs everything below; the listener's
//!   `tls.clientCaFile`, and the agents' `--cafile`;
//! - `server.pem`, `server.key`: the gateway's server certificate (`tls.certFile`,
//!   `tls.keyFile`), SANs `localhost`, `127.0.0.1` and each `--server-name`;
//! - `agent-1.pem`, `agent-1.key` ... `agent-N`: agents' client certificates, CN = the agent id,
//!   which is the identity the listener takes by default (`tls.identityFrom: cn`) and, with
//!   `clientIdBinding`, the only client id the certificate may connect with.
//!
//! Guarantees:
//! - X.509 v3 (rcgen), ECDSA P-256, valid from an hour ago for `--days` days; server and agent
//!   certificates carry the serverAuth / clientAuth extended key usage respectively.
//! - Private keys (PKCS#8 PEM) are created with mode 0600, certificates 0644 (less the umask).
//! - Nothing is written (DIR not even created) unless every input is valid and every
//!   certificate was generated. Without `--force`, if any file to be written exists, the
//!   command names it, exits non-zero and writes nothing; with `--force` they are replaced.
//! - Every file is first written whole under a temporary name in DIR (removed again on a
//!   failure), and only then are they all renamed into place, so a gateway watching the files
//!   (they reload on change) never reads half of one.
//! - Errors name the bad input (the option and value, or the path); exit code 1.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Most agent certificates one run writes (two files each): enough for a load test, and a typo
/// such as `--agents 1000000` is refused rather than filling the disk.
pub const MAX_AGENTS: u32 = 10_000;
/// Longest validity, in days (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// The server certificate's names before any `--server-name`.
const DEFAULT_SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// What `gatehouse dev-certs` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// Agent certificates: `agent-1` ... `agent-N`.
    pub agents: u32,
    /// More names (DNS names or IP addresses) for the server certificate.
    pub server_names: Vec<String>,
    /// Validity in days.
    pub days: u32,
    /// Replace existing files.
    pub force: bool,
}

/// One file to write: its name in DIR, its PEM text, and whether it is a private key.
#[derive(Debug)]
struct PemFile {
    name: String,
    text: String,
    private: bool,
}

/// The generated PKI, in memory.
#[derive(Debug)]
struct DevPki {
    files: Vec<PemFile>,
    server_names: Vec<String>,
    not_after: OffsetDateTime,
}

pub fn run(options: &Options) -> ExitCode {
    match write(options) {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatehouse dev-certs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The id (and certificate CN) of agent `n`, counting from 1.
pub fn agent_id(n: u32) -> String {
    format!("agent-{n}")
}

/// Checks the options, generates the PKI, writes it; returns the summary to print.
fn write(options: &Options) -> anyhow::Result<String> {
    let names = server_names(&options.server_names)?;
    if options.agents == 0 {
        bail!("--agents 0: at least one agent certificate is needed");
    }
    if options.agents > MAX_AGENTS {
        bail!(
            "--agents {}: at most {MAX_AGENTS} in one run",
            options.agents
        );
    }
    if options.days == 0 || options.days > MAX_DAYS {
        bail!("--days {}: must be from 1 to {MAX_DAYS}", options.days);
    }
    let dir = &options.dir;
    if dir.as_os_str().is_empty() {
        bail!("DIR is empty: name the directory to write into");
    }
    if dir.exists() && !dir.is_dir() {
        bail!("{}: exists and is not a directory", dir.display());
    }
    let pki = generate(
        options.agents,
        &names,
        options.days,
        OffsetDateTime::now_utc(),
    )?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    if !options.force {
        let existing: Vec<String> = pki
            .files
            .iter()
            .map(|f| dir.join(&f.name))
            .filter(|p| p.symlink_metadata().is_ok())
            .map(|p| p.display().to_string())
            .collect();
        if let Some(first) = existing.first() {
            let more = match existing.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            bail!("{first} already exists{more}: nothing written; --force replaces the files");
        }
    }
    write_files(dir, &pki.files)?;
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
    Ok(summary(&dir, &pki, options))
}

/// `localhost`, `127.0.0.1` and the extra names, each once; a name that is neither an IP
/// address nor a DNS name (a leading `*.` wildcard allowed) is refused.
fn server_names(extra: &[String]) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect();
    for name in extra {
        let bare = name.strip_prefix("*.").unwrap_or(name);
        let valid = name.parse::<IpAddr>().is_ok()
            || (bare.parse::<IpAddr>().is_err()
                && rustls::pki_types::DnsName::try_from(bare).is_ok()
                && !bare.ends_with('.'));
        if !valid {
            bail!("--server-name {name:?}: not a DNS name or an IP address");
        }
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.clone());
        }
    }
    Ok(names)
}

fn san(name: &str) -> anyhow::Result<SanType> {
    Ok(match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            name.try_into()
                .with_context(|| format!("--server-name {name:?}: not ASCII"))?,
        ),
    })
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// The CA, the server certificate for `server_names` and `agents` agent certificates, valid
/// from an hour before `now` (clocks disagree) for `days` days.
fn generate(
    agents: u32,
    server_names: &[String],
    days: u32,
    now: OffsetDateTime,
) -> anyhow::Result<DevPki> {
    let not_before = now - Duration::hours(1);
    let not_after = now + Duration::days(i64::from(days));
    let validity = |p: &mut CertificateParams| {
        p.not_before = not_before;
        p.not_after = not_after;
    };
    let mut files = Vec::with_capacity(4 + 2 * agents as usize);
    let mut push = |stem: &str, cert: String, key: &KeyPair| {
        files.push(PemFile {
            name: format!("{stem}.pem"),
            text: cert,
            private: false,
        });
        files.push(PemFile {
            name: format!("{stem}.key"),
            text: key.serialize_pem(),
            private: true,
        });
    };

    let mut ca = CertificateParams::default();
    ca.distinguished_name = common_name("Gatehouse development CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "gatehouse dev-certs");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca);
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    push("ca", ca_cert.pem(), &ca_key);
    let issuer = Issuer::from_params(&ca, &ca_key);

    let leaf = |cn: &str, sans: &[String], usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::default();
        p.distinguished_name = common_name(cn);
        p.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p);
        let key = KeyPair::generate().with_context(|| format!("generating {cn}'s key"))?;
        let cert = p
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing {cn}'s certificate"))?;
        anyhow::Ok((cert.pem(), key))
    };
    let (cert, key) = leaf(
        &server_names[0],
        server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    push("server", cert, &key);
    for n in 1..=agents {
        let id = agent_id(n);
        let (cert, key) = leaf(&id, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        push(&id, cert, &key);
    }
    Ok(DevPki {
        files,
        server_names: server_names.to_vec(),
        not_after,
    })
}

/// Writes every file under a temporary name, then renames them all into place; on a failure
/// the temporary files are removed.
fn write_files(dir: &Path, files: &[PemFile]) -> anyhow::Result<()> {
    let temporary = |f: &PemFile| dir.join(format!(".{}.tmp-{}", f.name, std::process::id()));
    let mut written = Vec::with_capacity(files.len());
    let result = (|| {
        for file in files {
            let tmp = temporary(file);
            match std::fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot replace {}", tmp.display()));
                }
            }
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if file.private { 0o600 } else { 0o644 })
                .open(&tmp)
                .with_context(|| format!("cannot write in {}", dir.display()))?;
            written.push(tmp.clone());
            out.write_all(file.text.as_bytes())
                .and_then(|()| out.sync_all())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        for file in files {
            let path = dir.join(&file.name);
            std::fs::rename(temporary(file), &path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        anyhow::Ok(())
    })();
    if result.is_err() {
        for tmp in written {
            let _ = std::fs::remove_file(tmp);
        }
    }
    result
}

/// `path` as a shell word.
fn shell_quote(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@%".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The listener (for `listeners` in a config file) that uses the files in `dir`.
fn listener_snippet(dir: &Path, extra_names: bool) -> serde_json::Value {
    serde_json::json!({
        // Agents on other machines need a non-loopback address (and the name they connect to
        // given with --server-name).
        "bind": if extra_names { "0.0.0.0:8883" } else { "127.0.0.1:8883" },
        "tls": {
            "certFile": dir.join("server.pem"),
            "keyFile": dir.join("server.key"),
            "clientCaFile": dir.join("ca.pem"),
            "requireClientCert": true
        }
    })
}

/// What was written, a listener using it, and how to publish as agent-1.
fn summary(dir: &Path, pki: &DevPki, options: &Options) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let extra_names = pki.server_names.len() > DEFAULT_SERVER_NAMES.len();
    let _ = writeln!(
        s,
        "Wrote to {} (valid until {}; keys mode 0600):",
        dir.display(),
        pki.not_after.date()
    );
    let _ = writeln!(
        s,
        "  ca.pem, ca.key            the CA that signed the others (keep ca.key private)"
    );
    let _ = writeln!(
        s,
        "  server.pem, server.key    the gateway's certificate for {}",
        pki.server_names.join(", ")
    );
    let last = agent_id(options.agents);
    let agents = match options.agents {
        1 => "agent-1.pem, agent-1.key".to_string(),
        _ => format!("agent-1.pem, agent-1.key ... {last}.pem, {last}.key"),
    };
    let _ = writeln!(s, "  {agents}  agents' certificates, CN = the agent id");
    let _ = writeln!(
        s,
        "\nA TLS listener using them, for \"listeners\" in the config file:\n  {}",
        listener_snippet(dir, extra_names)
    );
    let host = if extra_names {
        pki.server_names[DEFAULT_SERVER_NAMES.len()].trim_start_matches("*.")
    } else {
        "localhost"
    };
    let q = |name: &str| shell_quote(&dir.join(name));
    let _ = writeln!(
        s,
        "\nThen start the gateway (gatehouse run --config FILE) and publish as agent-1 (its \
         client id must be its CN):\n  mosquitto_pub -h {host} -p 8883 --cafile {} --cert {} --key {} \\\n    -q 1 -i agent-1 -t agents/agent-1/telemetry -m '{{\"cpu\": 12}}'",
        q("ca.pem"),
        q("agent-1.pem"),
        q("agent-1.key"),
    );
    s
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use gatehouse::config::{Config, IdentityFrom};
    use gatehouse::listener::identity;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;

    fn options(dir: &Path, agents: u32) -> Options {
        Options {
            dir: dir.to_owned(),
            agents,
            server_names: vec!["gw.example.test".into(), "10.0.0.7".into()],
            days: 30,
            force: false,
        }
    }

    fn cert(dir: &Path, name: &str) -> CertificateDer<'static> {
        gatehouse::tls::read_certs(&dir.join(name), "test")
            .unwrap()
            .remove(0)
    }

    fn roots(dir: &Path) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert(dir, "ca.pem")).unwrap();
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn the_certificates_chain_to_the_ca_with_the_agent_id_as_cn() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let summary = write(&options(&out, 3)).unwrap();
        assert!(summary.contains("agent-3"), "{summary}");

        // Agents: the identity the listener reads (CN) is the agent id; webpki accepts each as a
        // client certificate of the CA.
        let clients =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&out), provider())
                .build()
                .unwrap();
        for n in 1..=3 {
            let c = cert(&out, &format!("agent-{n}.pem"));
            assert_eq!(
                identity::from_certificate(&c, IdentityFrom::Cn),
                Ok(format!("agent-{n}"))
            );
            clients
                .verify_client_cert(&c, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("agent-{n}: {e}"));
        }
        assert!(!out.join("agent-4.pem").exists());

        // The server certificate: valid for its names only, and not as a client certificate.
        let server =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&out), provider())
                .build()
                .unwrap();
        let s = cert(&out, "server.pem");
        for name in ["localhost", "127.0.0.1", "gw.example.test", "10.0.0.7"] {
            server
                .verify_server_cert(
                    &s,
                    &[],
                    &ServerName::try_from(name).unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = ServerName::try_from("otherhost").unwrap();
        assert!(
            server
                .verify_server_cert(&s, &[], &other, &[], UnixTime::now())
                .is_err()
        );
        assert!(
            clients
                .verify_client_cert(&s, &[], UnixTime::now())
                .is_err()
        );

        // Expired after --days: 30 days from now, webpki refuses it 31 days on.
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            (OffsetDateTime::now_utc() + Duration::days(31)).unix_timestamp() as u64,
        ));
        let agent = cert(&out, "agent-1.pem");
        assert!(clients.verify_client_cert(&agent, &[], later).is_err());

        // Keys 0600, certificates readable.
        for name in ["ca.key", "server.key", "agent-1.key", "agent-3.key"] {
            let mode = std::fs::metadata(out.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
        }
        let mode = std::fs::metadata(out.join("ca.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o044, 0o044, "ca.pem: {mode:o}");
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn the_printed_listener_loads_as_the_gateway_would_load_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let mut o = options(&out, 1);
        o.server_names.clear();
        let summary = write(&o).unwrap();
        let line = summary
            .lines()
            .find(|l| l.trim_start().starts_with("{\"bind\""))
            .unwrap_or_else(|| panic!("no listener in:\n{summary}"));
        let listener: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(listener["bind"], "127.0.0.1:8883");
        let config = serde_json::json!({
            "listeners": [listener],
            "journal": {"path": dir.path().join("journal.db")},
            "upstream": {"kind": "directory", "path": dir.path().join("outbox")}
        });
        let config = Config::from_json(&config.to_string()).unwrap();
        let tls = config.listeners[0].tls.as_ref().unwrap();
        gatehouse::listener::tls::ServerTls::from_files(tls, "listeners[0].tls").unwrap();
        assert!(summary.contains("--cert "), "{summary}");
    }

    #[test]
    fn existing_files_are_kept_without_force_and_replaced_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_owned();
        write(&options(&out, 2)).unwrap();
        let read = |name: &str| std::fs::read(out.join(name)).unwrap();
        let before = read("agent-2.key");

        // Asking for more agents: agent-3 is new, but nothing is written.
        let err = write(&options(&out, 3)).unwrap_err().to_string();
        assert!(
            err.contains(&out.join("ca.pem").display().to_string())
                && err.contains("already exists")
                && err.contains("--force"),
            "{err}"
        );
        assert!(!out.join("agent-3.pem").exists());
        assert_eq!(read("agent-2.key"), before);

        // Only one file in the way: it is named.
        std::fs::create_dir(dir.path().join("other")).unwrap();
        std::fs::write(dir.path().join("other/agent-1.key"), "mine").unwrap();
        let err = write(&options(&dir.path().join("other"), 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent-1.key already exists:"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("other/agent-1.key")).unwrap(),
            "mine"
        );
        assert!(!dir.path().join("other/ca.pem").exists());

        let mut force = options(&out, 3);
        force.force = true;
        write(&force).unwrap();
        assert_ne!(read("agent-2.key"), before);
        assert!(out.join("agent-3.pem").exists());
        let mode = std::fs::metadata(out.join("agent-2.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bad_inputs_are_named_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let err = |o: Options| write(&o).unwrap_err().to_string();

        let e = err(options(&out, 0));
        assert!(e.contains("--agents 0"), "{e}");
        let e = err(options(&out, MAX_AGENTS + 1));
        assert!(e.contains("--agents 10001"), "{e}");
        let mut o = options(&out, 1);
        o.days = 0;
        assert!(err(o).contains("--days 0"));
        for bad in [
            "",
            "not a name",
            "gw..example",
            "-gw",
            "gw.example.",
            "höst",
        ] {
            let mut o = options(&out, 1);
            o.server_names = vec![bad.into()];
            let e = err(o);
            assert!(
                e.contains(&format!("--server-name {bad:?}")),
                "{bad:?}: {e}"
            );
        }
        assert!(!out.exists(), "nothing written for bad options");

        // DIR is a file, or under one.
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = err(options(&file, 1));
        assert!(e.contains("file: exists and is not a directory"), "{e}");
        let e = err(options(&file.join("sub"), 1));
        assert!(
            e.contains(&format!(
                "cannot create the directory {}",
                file.join("sub").display()
            )),
            "{e}"
        );

        // A wildcard and a repeated default are fine.
        let names = server_names(&["*.gw.example".into(), "LOCALHOST".into()]).unwrap();
        assert_eq!(names, ["localhost", "127.0.0.1", "*.gw.example"]);
    }

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(
            shell_quote(Path::new("/tmp/certs/ca.pem")),
            "/tmp/certs/ca.pem"
        );
        assert_eq!(
            shell_quote(Path::new("/tmp/my certs/it's.pem")),
            r"'/tmp/my certs/it'\''s.pem'"
        );
    }
}
