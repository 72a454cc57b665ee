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
/// All X.509 v3 (rcgen), ECDSA P-256.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }
    /// (cert, key) of a named leaf: "server", "server-otherhost", "client", "client-expired",
    /// "collector".
    pub fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }

    pub fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();

        let (ca_params, ca_key) = make_ca("Gatehouse test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        write("ca.pem", ca_cert.pem());
        let issuer = Issuer::from_params(&ca_params, &ca_key);

        let (other_params, other_key) = make_ca("Unrelated test CA");
        let other = other_params
            .self_signed(&other_key)
            .expect("self-sign CA 2");
        write("other-ca.pem", other.pem());

        let leaf = |name: &str, cn: &str, sans: &[&str], server: bool, expired: bool| {
            let mut p =
                CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .expect("leaf params");
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            p.use_authority_key_identifier_extension = true;
            if expired {
                p.not_before = date_time_ymd(2020, 1, 1);
                p.not_after = date_time_ymd(2021, 1, 1);
            } else {
                p.not_before = date_time_ymd(2020, 1, 1);
                p.not_after = date_time_ymd(2099, 1, 1);
            }
            let key = KeyPair::generate().expect("leaf key");
            let cert = p.signed_by(&key, &issuer).expect("sign leaf");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        };
        leaf(
            "server",
            "localhost",
            &["localhost", "127.0.0.1"],
            true,
            false,
        );
        leaf("server-otherhost", "otherhost", &["otherhost"], true, false);
        leaf("client", THING, &[], false, false);
        leaf("client-expired", THING, &[], false, true);
        leaf("collector", COLLECTOR_ID, &[], false, false);
        Pki {
            dir: dir.to_path_buf(),
        }
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
    child: Option<Child>,
    stderr_path: PathBuf,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    decoded: Mutex<Vec<UpBatch>>,
    cache: Mutex<HashMap<Vec<u8>, Decoded>>,
    pub restarts: usize,
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
            child: None,
            stderr_path: dir.join("collector.err"),
            arrivals: Arc::new(Mutex::new(Vec::new())),
            decoded: Mutex::new(Vec::new()),
            cache: Mutex::new(HashMap::new()),
            restarts: 0,
        }
    }

    fn spawn(&mut self) {
        let err = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let mut child = Command::new("mosquitto_sub")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mosquitto_sub");
        let stdout = child.stdout.take().unwrap();
        let arrivals = self.arrivals.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut parts = line.splitn(3, ' ');
                let at = parts.next().and_then(|t| t.parse::<f64>().ok());
                let topic = parts.next();
                let hex = parts.next().unwrap_or("").trim();
                let (Some(at), Some(topic)) = (at, topic) else {
                    panic!("unexpected mosquitto_sub output line: {line:?}");
                };
                let payload = hex_decode(hex)
                    .unwrap_or_else(|| panic!("bad hex from mosquitto_sub: {line:.200}"));
                arrivals.lock().unwrap().push(Arrival {
                    at,
                    topic: topic.to_string(),
                    payload,
                });
            }
        });
        self.child = Some(child);
    }

    /// Restart `mosquitto_sub` (same id: same session) if it exited.
    pub fn ensure_running(&mut self) {
        let exited = match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_some(),
            None => true,
        };
        if exited {
            if self.child.is_some() {
                self.restarts += 1;
            }
            self.spawn();
        }
    }

    /// SIGTERM (mosquitto_sub disconnects cleanly; everything it acknowledged is printed).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                signal(pid, "TERM").await;
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
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
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
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
        let dir = tempfile::Builder::new()
            .prefix("gatehouse-up-")
            .tempdir()
            .expect("tempdir");
        let pki = Pki::generate(&dir.path().join("pki"));
        let mut broker = Broker::new(dir.path(), &pki, server_name);
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
                     --- gateway log (tail) ---\n{}\n--- broker log (tail) ---\n{}\n--- collector stderr ---\n{}",
                    missing.len(),
                    wanted.len(),
                    missing
                        .iter()
                        .take(5)
                        .map(|(c, p)| format!("{c}: {}", support::show(p)))
                        .collect::<Vec<_>>(),
                    batches.len(),
                    self.collector.restarts,
                    tail(&gw.logs(), 6000),
                    tail(&self.broker.logs(), 3000),
                    self.collector.stderr(),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
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
