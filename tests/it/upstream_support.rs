//! Harness for the `mqtt` upstream tests: a test PKI generated with `rcgen`, a real mosquitto
//! broker standing in for AWS IoT Core (TLS with client certificates, 127.0.0.1 only), and a
//! cloud-side consumer (`mosquitto_sub` over TLS) whose batch payloads are decoded with
//! `gatehouse decode --header`.
//!
//! # Why no batch can be lost at the test broker
//!
//! The gateway only releases a batch when the broker PUBACKs it, and the broker only PUBACKs
//! after routing the message to the subscriptions that exist at that moment. So the tests
//! must make sure the collector's subscription exists *whenever* the gateway can reach the
//! broker, including the first moments after every broker restart (the gateway may reconnect
//! before `mosquitto_sub` does). This harness guarantees it as follows:
//!
//! * The collector connects with a persistent session (`-c -i collector`, clean session false,
//!   no session expiry) and subscribes `gatehouse/#` at QoS 1, so while it is disconnected the
//!   broker queues every matching QoS 1 message for it (`max_queued_messages 100000`).
//! * [`Upstream::start`] waits until the broker has logged the collector's SUBSCRIBE before
//!   returning; only then is a gateway pointed at the broker (started, or let reconnect).
//! * The broker runs with `persistence true` (a per-test `persistence_location`,
//!   `autosave_interval 0`: saved only on exit) and is always stopped with SIGTERM, so the
//!   collector's session (subscription, queued and in-flight messages) is written to disk on
//!   shutdown and restored by the next start on the same port, before it opens its listener.
//!   A broker restart therefore never loses the subscription, nor anything it PUBACKed.
//! * `mosquitto_sub` reconnects by itself after a broker restart (libmosquitto
//!   `loop_forever`); [`Collector::ensure_running`] restarts it (same id, same session) should
//!   it ever exit. It is stopped with SIGTERM only, after it printed what it acknowledged.
//!
//! Messages the broker had sent to the collector but not seen acknowledged are redelivered
//! after a restart, so the collector may see the *same bytes* twice: the assertions accept
//! duplicates only as identical payloads with the same `batchSeq`, which is exactly what the
//! gateway's own retransmissions look like too.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{self, Gateway, free_port, poll_until, v4_options};

/// Thing name of every gateway in these tests (the default of `Gateway::start_with`).
pub const THING: &str = "gw-itest";
/// The gateway's upstream MQTT client id: the default, `<thingName>-gatehouse`.
pub const UPSTREAM_CLIENT_ID: &str = "gw-itest-gatehouse";
/// The topic the gateway publishes to by default: `gatehouse/{thingName}/batches`.
pub const UP_TOPIC: &str = "gatehouse/gw-itest/batches";
/// The collector's client id (persistent session on the broker).
const COLLECTOR_ID: &str = "collector";
/// How long mosquitto gets to start listening / to exit.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- PKI

/// A test PKI written as PEM files into `dir`:
/// * `ca.pem` — the CA the broker trusts for clients and the gateway trusts for the broker;
/// * `server.pem`/`server.key` — broker certificate, SAN DNS `localhost` + IP 127.0.0.1;
/// * `server-otherhost.pem`/`.key` — broker certificate for `otherhost` only (same CA);
/// * `client.pem`/`client.key` — the gateway's device certificate (CN = thing name);
/// * `client-expired.pem`/`.key` — same, but expired (not_after in 2021);
/// * `collector.pem`/`.key` — the cloud-side consumer's certificate;
/// * `other-ca.pem` — an unrelated CA (signed nothing the broker uses).
///
/// All X.509 v3 (rcgen), ECDSA P-256. [`Pki::issue`] adds more leaves (the listener tests'
/// agents and gateway server certificates).
pub struct Pki {
    pub dir: PathBuf,
    ca: (CertificateParams, KeyPair),
    other_ca: (CertificateParams, KeyPair),
}

/// Which CA signs a leaf of [`Pki::issue`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    Ca,
    OtherCa,
}

/// What a leaf of [`Pki::issue`] is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

impl Pki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }
    /// (cert, key) of a named leaf: "server", "server-otherhost", "client", "client-expired",
    /// "collector", or one made by [`Pki::issue`].
    pub fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }

    pub fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let (ca_params, ca_key) = make_ca("Gatehouse test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let (other_params, other_key) = make_ca("Unrelated test CA");
        let other = other_params
            .self_signed(&other_key)
            .expect("self-sign CA 2");
        std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca: (ca_params, ca_key),
            other_ca: (other_params, other_key),
        };
        let sans = ["localhost", "127.0.0.1"];
        pki.issue(
            "server",
            "localhost",
            &sans,
            Usage::Server,
            false,
            Signer::Ca,
        );
        let other = &["otherhost"];
        pki.issue(
            "server-otherhost",
            "otherhost",
            other,
            Usage::Server,
            false,
            Signer::Ca,
        );
        pki.issue("client", THING, &[], Usage::Client, false, Signer::Ca);
        pki.issue(
            "client-expired",
            THING,
            &[],
            Usage::Client,
            true,
            Signer::Ca,
        );
        pki.issue(
            "collector",
            COLLECTOR_ID,
            &[],
            Usage::Client,
            false,
            Signer::Ca,
        );
        pki
    }

    /// Write `name.pem` / `name.key`: a leaf with common name `cn` and DNS/IP SANs `sans`
    /// (a SAN starting with `urn:` or `spiffe:` is a URI), valid 2020-2099 or, if `expired`,
    /// 2020-2021.
    pub fn issue(
        &self,
        name: &str,
        cn: &str,
        sans: &[&str],
        usage: Usage,
        expired: bool,
        signer: Signer,
    ) -> (PathBuf, PathBuf) {
        let mut p = CertificateParams::default();
        for san in sans {
            p.subject_alt_names
                .push(if san.starts_with("urn:") || san.starts_with("spiffe:") {
                    rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*san).unwrap())
                } else if let Ok(ip) = san.parse() {
                    rcgen::SanType::IpAddress(ip)
                } else {
                    rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(*san).unwrap())
                });
        }
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        p.use_authority_key_identifier_extension = true;
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = if expired {
            date_time_ymd(2021, 1, 1)
        } else {
            date_time_ymd(2099, 1, 1)
        };
        let (ca_params, ca_key) = match signer {
            Signer::Ca => &self.ca,
            Signer::OtherCa => &self.other_ca,
        };
        let issuer = Issuer::from_params(ca_params, ca_key);
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &issuer).expect("sign leaf");
        let (cert_path, key_path) = self.pair(name);
        // Written to a temporary name and renamed, so a gateway watching the files never
        // reads half a certificate.
        for (path, text) in [(&key_path, key.serialize_pem()), (&cert_path, cert.pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (cert_path, key_path)
    }
}

fn make_ca(cn: &str) -> (CertificateParams, KeyPair) {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Gatehouse tests");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2099, 1, 1);
    (p, KeyPair::generate().expect("CA key"))
}

// ---------------------------------------------------------------- broker

pub fn mosquitto_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOSQUITTO_BIN") {
        return PathBuf::from(p);
    }
    let sbin = PathBuf::from("/usr/sbin/mosquitto");
    if sbin.exists() {
        return sbin;
    }
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v mosquitto"])
        .output()
        .expect("run sh");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!p.is_empty(), "mosquitto not found (set MOSQUITTO_BIN)");
    PathBuf::from(p)
}

/// A mosquitto broker with one TLS listener on 127.0.0.1:`port`, requiring client
/// certificates from the test CA. Can be stopped and started again on the same port.
pub struct Broker {
    pub port: u16,
    pub conf: PathBuf,
    /// mosquitto's own log (`log_dest file`, flushed per line).
    pub log_path: PathBuf,
    /// stdout/stderr of the process (early startup errors).
    out_path: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Broker {
    /// Write the config (server certificate `server_name` of the PKI) without starting.
    pub fn new(dir: &Path, pki: &Pki, server_name: &str) -> Broker {
        let port = free_port();
        let (cert, key) = pki.pair(server_name);
        let log_path = dir.join("mosquitto.log");
        let persist = dir.join("mosquitto-db");
        std::fs::create_dir_all(&persist).unwrap();
        // mosquitto started as root drops privileges to user "mosquitto", who could not
        // read the 0700 tempdir: name the current user (no effect when not root).
        let user = std::process::Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mut conf = format!(
            "listener {port} 127.0.0.1\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             use_identity_as_username true\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {persist}/\n\
             autosave_interval 0\n\
             max_inflight_messages 100\n\
             max_queued_messages 100000\n\
             set_tcp_nodelay true\n\
             log_dest file {log}\n\
             log_type all\n",
            ca = pki.ca().display(),
            cert = cert.display(),
            key = key.display(),
            persist = persist.display(),
            log = log_path.display(),
        );
        if !user.is_empty() {
            conf.push_str(&format!("user {user}\n"));
        }
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf).unwrap();
        Broker {
            port,
            conf: conf_path,
            out_path: dir.join("mosquitto.out"),
            log_path,
            child: None,
            starts: 0,
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Append lines to the config (takes effect at the next start, or on SIGHUP for the
    /// options mosquitto reloads).
    pub fn append_conf(&self, text: &str) {
        let mut conf = std::fs::read_to_string(&self.conf).unwrap();
        conf.push_str(text);
        std::fs::write(&self.conf, conf).unwrap();
    }

    /// SIGHUP: mosquitto re-reads its config, including the ACL file.
    pub async fn reload(&self) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .expect("broker not running");
        signal(pid, "HUP").await;
    }

    /// mosquitto's log so far (all runs).
    pub fn logs(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let out = std::fs::read_to_string(&self.out_path).unwrap_or_default();
        if !out.trim().is_empty() {
            s.push_str("--- mosquitto stdout/stderr ---\n");
            s.push_str(&out);
        }
        s
    }

    /// Start and wait until it logged "running" (listener bound) for this start.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out_path)
            .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + BROKER_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "mosquitto exited during startup ({st}) on port {}\n{}",
                    self.port,
                    self.logs()
                );
            }
            let running = std::fs::read_to_string(&self.log_path)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("mosquitto version") && l.ends_with(" running"))
                .count();
            if running >= self.starts {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto not running after {BROKER_TIMEOUT:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Graceful stop (SIGTERM: persists the collector's session); SIGKILL after 10 s.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("broker not running");
        if let Some(pid) = child.id() {
            signal(pid, "TERM").await;
        }
        if tokio::time::timeout(BROKER_TIMEOUT, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
            panic!("mosquitto ignored SIGTERM for {BROKER_TIMEOUT:?}");
        }
    }

    /// Crash (SIGKILL): nothing persisted since the last start.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("broker not running");
        child.kill().await.expect("SIGKILL mosquitto");
    }

    /// Broker log lines from byte offset `from` on.
    pub fn log_since(&self, from: usize) -> String {
        let s = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        s.get(from..).unwrap_or("").to_string()
    }

    pub fn log_len(&self) -> usize {
        std::fs::metadata(&self.log_path)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }
}

async fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await;
}

// ---------------------------------------------------------------- collector

/// One message the collector printed.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// mosquitto_sub's receive time, seconds since the epoch (`%U`).
    pub at: f64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// One decoded upstream batch, in collector arrival order.
#[derive(Clone, Debug)]
pub struct UpBatch {
    /// Index in the collector's arrival list.
    pub index: usize,
    pub at: f64,
    pub topic: String,
    pub payload: Arc<Vec<u8>>,
    pub header: Value,
    pub records: Arc<Vec<Value>>,
}

impl UpBatch {
    pub fn batch_seq(&self) -> u64 {
        self.header["batchSeq"]
            .as_u64()
            .unwrap_or_else(|| panic!("batch without u64 batchSeq: {}", self.header))
    }
}

type Decoded = (Value, Arc<Vec<Value>>);

/// `mosquitto_sub` over TLS, persistent session, QoS 1, printing `%U %t %x` per message.
pub struct Collector {
    args: Vec<String>,
    supervisor: Option<tokio::task::JoinHandle<()>>,
    pid: Arc<Mutex<Option<u32>>>,
    stopping: Arc<AtomicBool>,
    stderr_path: PathBuf,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    decoded: Mutex<Vec<UpBatch>>,
    cache: Mutex<HashMap<Vec<u8>, Decoded>>,
    restarts: Arc<AtomicUsize>,
}

impl Collector {
    fn new(dir: &Path, pki: &Pki, port: u16) -> Collector {
        let (cert, key) = pki.pair("collector");
        let args = vec![
            "--cafile".into(),
            pki.ca().display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "-h".into(),
            "localhost".into(),
            "-p".into(),
            port.to_string(),
            "-t".into(),
            "gatehouse/#".into(),
            "-q".into(),
            "1".into(),
            "-c".into(),
            "-i".into(),
            COLLECTOR_ID.into(),
            "--nodelay".into(),
            "-F".into(),
            "%U %t %x".into(),
        ];
        Collector {
            args,
            supervisor: None,
            pid: Arc::new(Mutex::new(None)),
            stopping: Arc::new(AtomicBool::new(false)),
            stderr_path: dir.join("collector.err"),
            arrivals: Arc::new(Mutex::new(Vec::new())),
            decoded: Mutex::new(Vec::new()),
            cache: Mutex::new(HashMap::new()),
            restarts: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Start the supervisor task: it runs `mosquitto_sub` and restarts it (same id, same
    /// session) within 100 ms whenever it exits, until [`Collector::stop`]. mosquitto_sub
    /// gives up on some connection errors during broker restarts (it printed "Error: The
    /// connection was lost." once in CI); restarting it at once, rather than when a test
    /// next polls, keeps the session's queue draining.
    fn spawn(&mut self) {
        let args = self.args.clone();
        let stderr_path = self.stderr_path.clone();
        let arrivals = self.arrivals.clone();
        let restarts = self.restarts.clone();
        let stopping = self.stopping.clone();
        let pid = self.pid.clone();
        self.supervisor = Some(tokio::spawn(async move {
            loop {
                let err = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr_path)
                    .unwrap();
                let mut child = Command::new("mosquitto_sub")
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(err)
                    .kill_on_drop(true)
                    .spawn()
                    .expect("spawn mosquitto_sub");
                *pid.lock().unwrap() = child.id();
                let stdout = child.stdout.take().unwrap();
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    arrivals.lock().unwrap().push(parse_arrival(&line));
                }
                let status = child.wait().await;
                *pid.lock().unwrap() = None;
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                restarts.fetch_add(1, Ordering::SeqCst);
                let note = format!("[harness] mosquitto_sub exited ({status:?}); restarting\n");
                let _ = OpenOptions::new()
                    .append(true)
                    .open(&stderr_path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, note.as_bytes()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    /// Start the collector if it is not running yet (it restarts itself after that).
    pub fn ensure_running(&mut self) {
        if self.supervisor.is_none() {
            self.spawn();
        }
    }

    /// How many times `mosquitto_sub` exited and was restarted.
    pub fn restarts(&self) -> usize {
        self.restarts.load(Ordering::SeqCst)
    }

    /// SIGTERM (mosquitto_sub disconnects cleanly; everything it acknowledged is printed).
    pub async fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let Some(mut supervisor) = self.supervisor.take() else {
            return;
        };
        let pid = *self.pid.lock().unwrap();
        if let Some(pid) = pid {
            signal(pid, "TERM").await;
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut supervisor)
            .await
            .is_err()
        {
            supervisor.abort();
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Everything received so far (including probes / foreign topics).
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Decode every batch received so far (cached), in arrival order. Arrivals whose topic
    /// is not `topic` are skipped. Panics if a payload does not decode.
    pub async fn batches(&self, topic: &str) -> Vec<UpBatch> {
        let arrivals = self.arrivals();
        let done = self
            .decoded
            .lock()
            .unwrap()
            .last()
            .map(|b| b.index + 1)
            .unwrap_or(0);
        for (index, a) in arrivals.iter().enumerate().skip(done) {
            if a.topic != topic {
                continue;
            }
            let cached = self.cache.lock().unwrap().get(&a.payload).cloned();
            let (header, records) = match cached {
                Some(d) => d,
                None => {
                    let (h, r) = support::decode_bytes(&a.payload)
                        .await
                        .unwrap_or_else(|e| panic!("upstream payload #{index} on {topic}: {e}"));
                    let d = (h, Arc::new(r));
                    self.cache
                        .lock()
                        .unwrap()
                        .insert(a.payload.clone(), d.clone());
                    d
                }
            };
            self.decoded.lock().unwrap().push(UpBatch {
                index,
                at: a.at,
                topic: a.topic.clone(),
                payload: Arc::new(a.payload.clone()),
                header,
                records,
            });
        }
        self.decoded.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        // Dropping the task drops its `Child`, which is killed (`kill_on_drop`).
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
    }
}

/// One `%U %t %x` line of mosquitto_sub.
fn parse_arrival(line: &str) -> Arrival {
    let mut parts = line.splitn(3, ' ');
    let at = parts.next().and_then(|t| t.parse::<f64>().ok());
    let topic = parts.next();
    let hex = parts.next().unwrap_or("").trim();
    let (Some(at), Some(topic)) = (at, topic) else {
        panic!("unexpected mosquitto_sub output line: {line:?}");
    };
    let payload =
        hex_decode(hex).unwrap_or_else(|| panic!("bad hex from mosquitto_sub: {line:.200}"));
    Arrival {
        at,
        topic: topic.to_string(),
        payload,
    }
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

// ---------------------------------------------------------------- upstream = PKI + broker + collector

/// Everything on the "cloud" side of one test.
pub struct Upstream {
    dir: TempDir,
    pub pki: Pki,
    pub broker: Broker,
    pub collector: Collector,
}

impl Upstream {
    /// Generate the PKI, start the broker (server certificate `server_name`), start the
    /// collector and wait until its subscription exists. The broker is left running.
    pub async fn start_with_server(server_name: &str) -> Upstream {
        Self::start_inner(server_name, None).await
    }

    /// Like [`Upstream::start`], with a mosquitto ACL file (`acl_file`) holding `acl`. Client
    /// names in it are certificate CNs (`use_identity_as_username`): the gateway is [`THING`],
    /// the collector `collector` (it needs `topic read gatehouse/#`).
    pub async fn start_with_acl(acl: &str) -> Upstream {
        Self::start_inner("server", Some(acl)).await
    }

    async fn start_inner(server_name: &str, acl: Option<&str>) -> Upstream {
        let dir = tempfile::Builder::new()
            .prefix("gatehouse-up-")
            .tempdir()
            .expect("tempdir");
        let pki = Pki::generate(&dir.path().join("pki"));
        let mut broker = Broker::new(dir.path(), &pki, server_name);
        if let Some(acl) = acl {
            let path = dir.path().join("mosquitto.acl");
            std::fs::write(&path, acl).unwrap();
            broker.append_conf(&format!("acl_file {}\n", path.display()));
        }
        let collector = Collector::new(dir.path(), &pki, broker.port);
        broker.start().await;
        let mut up = Upstream {
            dir,
            pki,
            broker,
            collector,
        };
        if server_name == "server" {
            up.collector.ensure_running();
            up.wait_subscribed().await;
        }
        up
    }

    pub async fn start() -> Upstream {
        Self::start_with_server("server").await
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replace the ACL file written by [`Upstream::start_with_acl`] and make the running
    /// broker reload it (SIGHUP); returns once mosquitto logged the reload.
    pub async fn set_acl(&mut self, acl: &str) {
        std::fs::write(self.dir.path().join("mosquitto.acl"), acl).unwrap();
        let reloads = |log: &str| log.matches("Reloading config").count();
        let before = reloads(&self.broker.logs());
        self.broker.reload().await;
        poll_until("mosquitto to reload its config", BROKER_TIMEOUT, || async {
            let log = self.broker.logs();
            if reloads(&log) > before {
                Ok(())
            } else {
                Err(format!("broker log tail: {:?}", tail(&log, 500)))
            }
        })
        .await;
    }

    /// Wait until the broker logged the collector's SUBACK (its session subscribes
    /// `gatehouse/#` at QoS 1 from then on, across broker restarts).
    async fn wait_subscribed(&mut self) {
        let what = format!("the collector's subscription on port {}", self.broker.port);
        poll_until(&what, Duration::from_secs(15), || async {
            let log = self.broker.logs();
            if log.contains(&format!("Sending SUBACK to {COLLECTOR_ID}")) {
                Ok(())
            } else {
                Err(format!(
                    "collector stderr: {:?}; broker log tail: {:?}",
                    self.collector.stderr(),
                    tail(&log, 800)
                ))
            }
        })
        .await;
    }

    /// Stop the broker (SIGTERM). The collector keeps retrying by itself.
    pub async fn stop_broker(&mut self) {
        self.broker.stop().await;
    }

    /// Start the broker again on the same port; make sure the collector runs.
    pub async fn start_broker(&mut self) {
        self.broker.start().await;
        self.collector.ensure_running();
    }

    /// The `upstream` config object for a gateway using this broker (3.1.1, default topic).
    /// `client` is the client certificate pair name ("client" or "client-expired").
    pub fn gateway_upstream(&self, client: &str) -> Value {
        let (cert, key) = self.pki.pair(client);
        json!({
            "kind": "mqtt",
            "host": "localhost",
            "port": self.broker.port,
            "caFile": self.pki.ca(),
            "certFile": cert,
            "keyFile": key,
            "keepAliveSecs": 30,
            "reconnectMinMs": 1000,
            "reconnectMaxMs": 2000,
            "ackTimeoutMs": 10000
        })
    }

    /// Decoded batches on the gateway's topic so far (keeps the collector running).
    pub async fn batches(&mut self) -> Vec<UpBatch> {
        self.collector.ensure_running();
        self.collector.batches(UP_TOPIC).await
    }

    /// Wait until every (clientId, payload) of `wanted` arrived upstream; returns the
    /// batches received so far. The failure message names what is missing.
    pub async fn wait_for(
        &mut self,
        gw: &Gateway,
        wanted: &[(String, Vec<u8>)],
        timeout: Duration,
    ) -> Vec<UpBatch> {
        let deadline = Instant::now() + timeout;
        loop {
            let batches = self.batches().await;
            let have: HashSet<(String, Vec<u8>)> = batches
                .iter()
                .flat_map(|b| b.records.iter())
                .map(|r| (support::client_id(r), support::payload_bytes(r)))
                .collect();
            let missing: Vec<&(String, Vec<u8>)> =
                wanted.iter().filter(|w| !have.contains(*w)).collect();
            if missing.is_empty() {
                return batches;
            }
            if Instant::now() >= deadline {
                let records: usize = batches.iter().map(|b| b.records.len()).sum();
                panic!(
                    "timed out after {timeout:?}: {} of {} messages never arrived upstream, e.g. {:?}; \
                     collector got {} batches / {records} records (collector restarts {})\n\
                     --- gateway log (tail) ---\n{}\n--- broker log (tail) ---\n{}\n\
                     --- broker log, the collector's connections ---\n{}\n--- collector stderr ---\n{}",
                    missing.len(),
                    wanted.len(),
                    missing
                        .iter()
                        .take(5)
                        .map(|(c, p)| format!("{c}: {}", support::show(p)))
                        .collect::<Vec<_>>(),
                    batches.len(),
                    self.collector.restarts(),
                    tail(&gw.logs(), 6000),
                    tail(&self.broker.logs(), 3000),
                    collector_connections(&self.broker.logs()),
                    self.collector.stderr(),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The broker log lines about the collector's connections and session (not its messages).
fn collector_connections(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains(COLLECTOR_ID) || l.contains("running") || l.contains("Saving"))
        .filter(|l| !l.contains("PUBLISH") && !l.contains("PUBACK"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

// ---------------------------------------------------------------- relay

/// A TCP relay on 127.0.0.1 in front of the broker that can be "closed" (connections are
/// accepted and dropped at once) without stopping the broker: the gateway sees an outage
/// while the collector stays connected, so arrival times at the collector are the broker's
/// receive times (no burst of messages queued while the collector was away).
pub struct Relay {
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A closed relay forwarding to 127.0.0.1:`target` once opened.
    pub async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open2 = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !open2.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { port, open, task }
    }

    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- gateway helpers

/// Start a gateway whose upstream is `up` (client certificate pair `client`), with a
/// metrics endpoint; `tweak` runs last. Returns the gateway and its metrics address.
pub async fn start_gateway(
    up: &Upstream,
    client: &str,
    tweak: impl Fn(&mut Value),
) -> (Gateway, String) {
    let upstream = up.gateway_upstream(client);
    let metrics = format!("127.0.0.1:{}", free_port());
    let m2 = metrics.clone();
    let gw = Gateway::start_with(move |c| {
        c["upstream"] = upstream.clone();
        c["metrics"] = json!({"bind": m2});
        tweak(c);
    })
    .await;
    (gw, metrics)
}

/// Lines of the gateway log containing `needle`.
pub fn log_lines(gw: &Gateway, needle: &str) -> Vec<String> {
    gw.logs()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Wait for a metric to satisfy `pred`; returns its value.
/// Waits until the gateway logged `Upstream link down.` with a cause containing `needle`.
pub async fn wait_link_down(gw: &Gateway, needle: &str) {
    poll_until(
        &format!("`{needle}` in the gateway log"),
        Duration::from_secs(15),
        || async {
            let lines = log_lines(gw, "Upstream link down.");
            if lines.iter().any(|l| l.contains(needle)) {
                Ok(())
            } else {
                Err(format!("link-down lines: {lines:?}"))
            }
        },
    )
    .await;
}

pub async fn wait_metric(
    metrics: &str,
    name: &str,
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    poll_until(&format!("metric {name}"), timeout, || async {
        let body = support::http_get(metrics, "/metrics").await?;
        match support::metric_value(&body, name) {
            Some(v) if pred(v) => Ok(v),
            v => Err(format!("{name} = {v:?}")),
        }
    })
    .await
}

/// Current value of a metric (None if absent or the endpoint does not answer).
pub async fn metric(metrics: &str, name: &str) -> Option<f64> {
    let body = support::http_get(metrics, "/metrics").await.ok()?;
    support::metric_value(&body, name)
}

/// Publish `payloads` at QoS 1 from one rumqttc (3.1.1) agent, pipelined (rumqttc keeps up
/// to 100 in flight), and wait until every one is PUBACKed on a connection that never broke.
pub async fn publish_all_acked(
    port: u16,
    client: &str,
    topic: &str,
    payloads: &[Vec<u8>],
) -> Result<(), String> {
    let (c, mut el) = AsyncClient::new(v4_options(client, port), 256);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let task = tokio::spawn(async move {
        loop {
            let r = match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => Ok(()),
                Ok(Event::Incoming(Packet::ConnAck(ca)))
                    if ca.code != rumqttc::ConnectReturnCode::Success =>
                {
                    Err(format!("CONNACK {:?}", ca.code))
                }
                Ok(_) => continue,
                Err(e) => Err(format!("connection error: {e}")),
            };
            let stop = r.is_err();
            if tx.send(r).is_err() || stop {
                return;
            }
        }
    });
    let sender = {
        let c = c.clone();
        let topic = topic.to_string();
        let payloads = payloads.to_vec();
        tokio::spawn(async move {
            for p in payloads {
                if c.publish(&topic, QoS::AtLeastOnce, false, p).await.is_err() {
                    return;
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acked = 0;
    let result = loop {
        if acked == payloads.len() {
            break Ok(());
        }
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(Ok(()))) => acked += 1,
            Ok(Some(Err(e))) => break Err(format!("{client}: after {acked} PUBACKs: {e}")),
            Ok(None) => break Err(format!("{client}: event loop ended after {acked} PUBACKs")),
            Err(_) => {
                break Err(format!(
                    "{client}: only {acked} of {} PUBACKed within 30 s",
                    payloads.len()
                ));
            }
        }
    };
    sender.abort();
    let _ = c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    task.abort();
    result
}

/// Problems with the batches' headers: version, gateway name, count, firstSeq/lastSeq,
/// increasing seqs inside a batch, topic.
pub fn up_header_problems(batches: &[UpBatch]) -> Vec<String> {
    let mut problems = Vec::new();
    for b in batches {
        let h = &b.header;
        let id = format!("payload #{} (batchSeq {})", b.index, h["batchSeq"]);
        if h["version"] != json!(1) {
            problems.push(format!("{id}: version {}", h["version"]));
        }
        if h["gateway"] != json!(THING) {
            problems.push(format!("{id}: gateway {} != {THING:?}", h["gateway"]));
        }
        if !h["batchSeq"].is_u64() {
            problems.push(format!("{id}: batchSeq not an integer"));
        }
        if b.topic != UP_TOPIC {
            problems.push(format!("{id}: topic {} != {UP_TOPIC}", b.topic));
        }
        if h["count"].as_u64() != Some(b.records.len() as u64) {
            problems.push(format!(
                "{id}: count {} but {} records",
                h["count"],
                b.records.len()
            ));
        }
        let seqs: Vec<u64> = b.records.iter().map(support::seq).collect();
        if seqs.first().copied() != h["firstSeq"].as_u64()
            || seqs.last().copied() != h["lastSeq"].as_u64()
        {
            problems.push(format!(
                "{id}: firstSeq/lastSeq {}/{} but records {:?}..{:?}",
                h["firstSeq"],
                h["lastSeq"],
                seqs.first(),
                seqs.last()
            ));
        }
        if seqs.windows(2).any(|w| w[0] >= w[1]) {
            problems.push(format!("{id}: seqs not increasing"));
        }
    }
    problems
}

/// Duplicate problems: a batchSeq seen with different bytes, a record seq carried by more
/// than one batchSeq, a (clientId, payload) journaled under more than one seq.
pub fn duplicate_problems(batches: &[UpBatch]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_batch: BTreeMap<u64, &UpBatch> = BTreeMap::new();
    for b in batches {
        match by_batch.get(&b.batch_seq()) {
            Some(first) if first.payload != b.payload => problems.push(format!(
                "batchSeq {} arrived with different bytes (payload #{} and #{}: {} vs {} records)",
                b.batch_seq(),
                first.index,
                b.index,
                first.records.len(),
                b.records.len()
            )),
            Some(_) => {}
            None => {
                by_batch.insert(b.batch_seq(), b);
            }
        }
    }
    let mut seq_batches: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut msg_seqs: HashMap<(String, Vec<u8>), HashSet<u64>> = HashMap::new();
    for b in by_batch.values() {
        for r in b.records.iter() {
            seq_batches
                .entry(support::seq(r))
                .or_default()
                .insert(b.batch_seq());
            msg_seqs
                .entry((support::client_id(r), support::payload_bytes(r)))
                .or_default()
                .insert(support::seq(r));
        }
    }
    let mut multi: Vec<_> = seq_batches.iter().filter(|(_, v)| v.len() > 1).collect();
    multi.sort_by_key(|(s, _)| **s);
    for (s, v) in multi.iter().take(10) {
        problems.push(format!("record seq {s} is in batches {v:?}"));
    }
    let mut twice: Vec<_> = msg_seqs.iter().filter(|(_, v)| v.len() > 1).collect();
    twice.sort_by(|a, b| a.0.cmp(b.0));
    for ((c, p), v) in twice.iter().take(10) {
        problems.push(format!(
            "message ({c}, {}) journaled under seqs {v:?}",
            support::show(p)
        ));
    }
    problems
}

/// All (clientId, payload) pairs of the records received, with multiplicity, counting each
/// batchSeq once (a redelivered batch is the same batch).
/// What keeps `batches` from holding every (clientId, payload) of `wanted` exactly once when
/// each batchSeq is counted once, and nothing else: one line per wrong message, and a count
/// line when messages are missing. Empty when exactly right.
pub fn exactly_wanted_problems(batches: &[UpBatch], wanted: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut count: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    for r in unique_batch_records(batches) {
        *count
            .entry((support::client_id(&r), support::payload_bytes(&r)))
            .or_default() += 1;
    }
    let wanted_set: HashSet<&(String, Vec<u8>)> = wanted.iter().collect();
    let mut wrong: Vec<String> = count
        .iter()
        .filter(|(m, n)| **n != 1 || !wanted_set.contains(m))
        .map(|((c, p), n)| format!("({c}, {}) x{n}", support::show(p)))
        .collect();
    if count.len() != wanted.len() {
        wrong.push(format!(
            "{} distinct messages, {} wanted",
            count.len(),
            wanted.len()
        ));
    }
    wrong
}

pub fn unique_batch_records(batches: &[UpBatch]) -> Vec<Value> {
    let mut seen = HashSet::new();
    batches
        .iter()
        .filter(|b| seen.insert(b.batch_seq()))
        .flat_map(|b| b.records.iter().cloned())
        .collect()
}

/// Header problems and duplicates that are not whole re-sent batches fail the test.
pub fn assert_clean(batches: &[UpBatch], gw: &Gateway) {
    let problems = up_header_problems(batches);
    assert!(
        problems.is_empty(),
        "batch header problems: {problems:#?}\n--- gateway log (tail) ---\n{}",
        tail(&gw.logs(), 4000)
    );
    let dups = duplicate_problems(batches);
    assert!(
        dups.is_empty(),
        "duplicates that are not whole re-sent batches: {dups:#?}\n--- gateway log (tail) ---\n{}",
        tail(&gw.logs(), 4000)
    );
}

/// The `upstream` config object for a broker that is not an [`Upstream`] (an unresolvable
/// host, a socket the test controls): certificates from `pki`, fast reconnects (100-200 ms).
pub fn standalone_upstream(pki: &Pki, host: &str, port: u16) -> Value {
    let (cert, key) = pki.pair("client");
    json!({
        "kind": "mqtt",
        "host": host,
        "port": port,
        "caFile": pki.ca(),
        "certFile": cert,
        "keyFile": key,
        "keepAliveSecs": 30,
        "reconnectMinMs": 100,
        "reconnectMaxMs": 200,
        "ackTimeoutMs": 10000
    })
}

/// Start a gateway with this `upstream` object and a metrics endpoint; `tweak` runs last.
pub async fn start_gateway_with(upstream: Value, tweak: impl Fn(&mut Value)) -> (Gateway, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let m2 = metrics.clone();
    let gw = Gateway::start_with(move |c| {
        c["upstream"] = upstream.clone();
        c["metrics"] = json!({"bind": m2});
        tweak(c);
    })
    .await;
    (gw, metrics)
}

/// Distinct payloads for `n` messages of agent `id`: `"{id} {tag} #NNN"`.
pub fn plan(id: &str, tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{id} {tag} #{i:03}").into_bytes())
        .collect()
}

// ---------------------------------------------------------------- HTTP CONNECT proxy

/// One CONNECT request the proxy received.
#[derive(Clone, Debug)]
pub struct ProxyRequest {
    /// The request line, e.g. `CONNECT localhost:8883 HTTP/1.1`.
    pub request_line: String,
    /// `host:port` of a well-formed `CONNECT host:port HTTP/1.1`, else None.
    pub target: Option<String>,
    /// The `Proxy-Authorization` header value, if any.
    pub authorization: Option<String>,
    /// It was exactly `Basic base64(user:pass)` of the configured credentials.
    pub auth_ok: bool,
    /// The tunnel was established (200 sent); then the local port of the proxy's socket to
    /// the target (what the broker logs as the client's address).
    pub tunnel_from_port: Option<u16>,
}

/// A minimal HTTP CONNECT proxy on 127.0.0.1 requiring Basic authentication: 407 for a
/// missing or wrong `Proxy-Authorization`, 400 for anything but `CONNECT host:port HTTP/1.1`,
/// 502 if the target does not answer; else `200 Connection established` and a byte tunnel.
/// `localhost` is dialled as 127.0.0.1.
pub struct ConnectProxy {
    pub port: u16,
    requests: Arc<Mutex<Vec<ProxyRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    pub async fn start(username: &str, password: &str) -> ConnectProxy {
        use base64::Engine as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
        );
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let expected = expected.clone();
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let _ = proxy_connection(inbound, &expected, &reqs).await;
                });
            }
        });
        ConnectProxy {
            port,
            requests,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<ProxyRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_connection(
    mut inbound: tokio::net::TcpStream,
    expected_auth: &str,
    requests: &Mutex<Vec<ProxyRequest>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The request head, up to the blank line (the client sends nothing more before the 200).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 16 * 1024 {
            inbound
                .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                .await?;
            return Ok(());
        }
        let n = inbound.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let leftover = head.split_off(end);
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_string();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, v)| v.trim().to_string());
    let parts: Vec<&str> = request_line.split(' ').collect();
    let target = match parts.as_slice() {
        ["CONNECT", target, "HTTP/1.1"] if target.rsplit_once(':').is_some() => {
            Some(target.to_string())
        }
        _ => None,
    };
    let auth_ok = authorization.as_deref() == Some(expected_auth);
    let index = {
        let mut r = requests.lock().unwrap();
        r.push(ProxyRequest {
            request_line,
            target: target.clone(),
            authorization,
            auth_ok,
            tunnel_from_port: None,
        });
        r.len() - 1
    };
    let Some(target) = target else {
        inbound
            .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    };
    if !auth_ok {
        inbound
            .write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                  Proxy-Authenticate: Basic realm=\"gatehouse-test\"\r\n\
                  Content-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
        let _ = inbound.shutdown().await;
        return Ok(());
    }
    let (host, port) = target.rsplit_once(':').unwrap();
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let Ok(port) = port.parse::<u16>() else {
        inbound
            .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    };
    let mut outbound = match tokio::net::TcpStream::connect((host, port)).await {
        Ok(s) => s,
        Err(_) => {
            inbound
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
                .await?;
            return Ok(());
        }
    };
    requests.lock().unwrap()[index].tunnel_from_port = outbound.local_addr().ok().map(|a| a.port());
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    inbound
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    if !leftover.is_empty() {
        outbound.write_all(&leftover).await?;
    }
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    Ok(())
}

// ---------------------------------------------------------------- freezable relay

/// One connection through a [`FreezableRelay`].
struct RelayConn {
    /// Broker-to-client bytes are read and discarded instead of forwarded.
    frozen: std::sync::atomic::AtomicBool,
    /// Bytes discarded while frozen.
    dropped: std::sync::atomic::AtomicUsize,
}

/// A TCP relay on 127.0.0.1 in front of the broker whose open connections can be frozen in
/// the broker-to-client direction: the TCP connection stays up and the client's bytes still
/// reach the broker, but nothing the broker sends (PUBACK, PINGRESP) reaches the client any
/// more. Connections accepted later are not frozen.
pub struct FreezableRelay {
    pub port: u16,
    conns: Arc<Mutex<Vec<Arc<RelayConn>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableRelay {
    pub async fn start(target: u16) -> FreezableRelay {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<RelayConn>>>> = Arc::new(Mutex::new(Vec::new()));
        let conns2 = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let state = Arc::new(RelayConn {
                    frozen: AtomicBool::new(false),
                    dropped: AtomicUsize::new(0),
                });
                conns2.lock().unwrap().push(state.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (mut in_r, mut in_w) = inbound.into_split();
                    let (mut out_r, mut out_w) = outbound.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut in_r, &mut out_w).await;
                    };
                    let down = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match out_r.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if state.frozen.load(Ordering::SeqCst) {
                                state.dropped.fetch_add(n, Ordering::SeqCst);
                                continue;
                            }
                            if in_w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    // Either side closing closes both.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        FreezableRelay { port, conns, task }
    }

    /// Freeze every connection open now; returns how many there are.
    pub fn freeze_current(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        for c in conns.iter() {
            c.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        conns.len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Broker-to-client bytes discarded by frozen connections.
    pub fn dropped_bytes(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.dropped.load(std::sync::atomic::Ordering::SeqCst))
            .sum()
    }
}

impl Drop for FreezableRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- accept-and-close socket

/// A listener on 127.0.0.1:`port` that accepts every TCP connection and closes it at once,
/// recording when it accepted each: a "broker" that is there but never speaks.
pub struct AcceptCloser {
    accepts: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AcceptCloser {
    pub async fn bind(port: u16) -> AcceptCloser {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("bind 127.0.0.1:{port}: {e}"));
        let accepts = Arc::new(Mutex::new(Vec::new()));
        let a2 = accepts.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                a2.lock().unwrap().push(Instant::now());
                drop(s);
            }
        });
        AcceptCloser { accepts, task }
    }

    pub fn accepts(&self) -> Vec<Instant> {
        self.accepts.lock().unwrap().clone()
    }
}

impl Drop for AcceptCloser {
    fn drop(&mut self) {
        self.task.abort();
    }
}
