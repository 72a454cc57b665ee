//! Shared harness for the black-box integration tests: starts the real `gatehouse` binary
//! on a private config/tempdir/port, kills/restarts/stops it, decodes the directory
//! outbox with `gatehouse decode --header`, and offers deadline-bounded polling and a few
//! MQTT client helpers (rumqttc agents, raw TCP, Prometheus scraping).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// How long a (debug, possibly loaded CI) gateway gets to start accepting TCP.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful SIGTERM shutdown may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Default deadline for "this should show up in the outbox" polls.
pub const OUTBOX_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline for a single MQTT acknowledgement.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of the gateway binary: Cargo's `CARGO_BIN_EXE_gatehouse` when these tests live in
/// the gatehouse crate, else `$GATEHOUSE_BIN` (scratch crate).
pub fn gatehouse_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_gatehouse") {
        return PathBuf::from(p);
    }
    match std::env::var_os("GATEHOUSE_BIN") {
        Some(p) => PathBuf::from(p),
        None => panic!("gatehouse binary unknown: set GATEHOUSE_BIN=/path/to/gatehouse"),
    }
}

/// The Python the tests run (paho-mqtt clients): `$GATEHOUSE_PYTHON` (scripts/test.sh points it
/// at its virtual environment), else `python3`.
pub fn python() -> String {
    std::env::var("GATEHOUSE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Runs `gatehouse ARGS` to its exit (20 s at most): its status, and stdout then stderr.
pub async fn gatehouse_output<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> (ExitStatus, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(gatehouse_bin())
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("gatehouse exits by itself within 20 s")
    .expect("run gatehouse");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// A free TCP port on 127.0.0.1 (bound and released; a tiny race remains, see `Gateway::start_with`).
pub fn free_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Poll `f` every 50 ms until it returns `Ok`, or panic after `timeout` with `what` and the
/// last `Err` description (the last observed state).
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One decoded `*.batch` file of the outbox.
#[derive(Clone, Debug)]
pub struct Batch {
    pub file: String,
    pub header: Value,
    pub records: Vec<Value>,
}

/// A running (or stopped) gateway with its own tempdir, config, journal, outbox and port.
pub struct Gateway {
    dir: TempDir,
    pub config: Value,
    pub config_path: PathBuf,
    pub port: u16,
    pub outbox: PathBuf,
    pub journal: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    decode_cache: Mutex<HashMap<String, (u64, SystemTime, Batch)>>,
}

impl Gateway {
    /// Default test config: small maxDelayMs so batches flush fast.
    pub async fn start() -> Gateway {
        Self::start_with(|_| {}).await
    }

    /// Start with the default test config modified by `tweak` (e.g. set dedupWindowSecs).
    pub async fn start_with(tweak: impl Fn(&mut Value)) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("gatehouse-it-")
            .tempdir()
            .expect("tempdir");
        let outbox = dir.path().join("outbox");
        let journal = dir.path().join("journal.db");
        let log_path = dir.path().join("gateway.log");
        let config_path = dir.path().join("gatehouse.json");
        let mut gw = Gateway {
            dir,
            config: Value::Null,
            config_path,
            port: 0,
            outbox,
            journal,
            log_path,
            child: None,
            decode_cache: Mutex::new(HashMap::new()),
        };
        // A port picked by `free_port` can, rarely, be taken by someone else's ephemeral
        // socket before the gateway binds it: retry with a fresh port in that case only.
        for attempt in 1.. {
            let port = free_port();
            let mut config = json!({
                "thingName": "gw-itest",
                "listeners": [{"bind": format!("127.0.0.1:{port}"), "maxPacketSize": 262144}],
                "journal": {"path": gw.journal, "synchronous": "full", "dedupWindowSecs": 600},
                "batch": {"maxBytes": 131072, "maxMessages": 1000, "maxDelayMs": 100, "compression": "zstd"},
                "upstream": {"kind": "directory", "path": gw.outbox},
                "logLevel": "info",
                // The feature tests publish on arbitrary topics; `security.rs` removes this
                // rule to test the default ACL (agents/${identity}/...).
                "acl": [{"allow": "all", "topic": "#"}]
            });
            tweak(&mut config);
            std::fs::write(&gw.config_path, serde_json::to_vec_pretty(&config).unwrap())
                .expect("write config");
            gw.port = port;
            gw.config = config;
            match gw.spawn_and_wait().await {
                Ok(()) => break,
                Err(msg) => {
                    let logs = gw.logs();
                    if logs.to_lowercase().contains("in use") && attempt < 4 {
                        continue;
                    }
                    panic!("gateway failed to start: {msg}\n--- gateway output ---\n{logs}");
                }
            }
        }
        gw
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Everything the gateway printed so far (all runs, stdout and stderr).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "gateway already running");
        let bin = gatehouse_bin();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        let child = Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("gateway exited during startup with {status}"));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "port {} not accepting after {STARTUP_TIMEOUT:?}",
                    self.port
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL the gateway (a crash) and reap it.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("gateway not running");
        child.kill().await.expect("SIGKILL gateway");
    }

    /// Start again with the same config, journal and outbox.
    pub async fn restart(&mut self) {
        if let Err(msg) = self.spawn_and_wait().await {
            panic!(
                "gateway failed to restart: {msg}\n--- gateway output ---\n{}",
                self.logs()
            );
        }
    }

    /// SIGTERM (graceful shutdown) and wait for the exit status, bounded by STOP_TIMEOUT.
    pub async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("gateway not running");
        let pid = child.id().expect("pid");
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM {pid} failed");
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => status.expect("wait gateway"),
            Err(_) => {
                let _ = child.kill().await;
                panic!(
                    "gateway did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- gateway output ---\n{}",
                    self.logs()
                );
            }
        }
    }

    /// Panic (with the gateway output) if the gateway process has died.
    pub fn assert_alive(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait().unwrap()
        {
            panic!(
                "gateway died unexpectedly with {status}\n--- gateway output ---\n{}",
                self.logs()
            );
        }
    }

    /// Decode every `*.batch` file of the outbox (sorted by name) with
    /// `gatehouse decode --header`. Panics if a batch file does not decode.
    pub async fn outbox_records(&self) -> Vec<Batch> {
        let mut names: Vec<String> = match std::fs::read_dir(&self.outbox) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".batch"))
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let path = self.outbox.join(&name);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let key = (meta.len(), meta.modified().unwrap());
            if let Some((len, mtime, b)) = self.decode_cache.lock().unwrap().get(&name)
                && (*len, *mtime) == key
            {
                out.push(b.clone());
                continue;
            }
            let batch = decode_file(&path).await;
            self.decode_cache
                .lock()
                .unwrap()
                .insert(name, (key.0, key.1, batch.clone()));
            out.push(batch);
        }
        out
    }

    /// The size of every batch file in the outbox.
    pub fn outbox_records_raw_sizes(&self) -> Vec<u64> {
        std::fs::read_dir(&self.outbox)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".batch"))
                    .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// All records of the outbox, in file order.
    pub async fn all_records(&self) -> Vec<Value> {
        self.outbox_records()
            .await
            .into_iter()
            .flat_map(|b| b.records)
            .collect()
    }

    /// All records of the outbox, large records reassembled from their fragments, by one
    /// `gatehouse decode` over the outbox directory. Fragment sets still incomplete (being
    /// written) are left out; anything else decode reports fails the test.
    pub async fn all_records_reassembled(&self) -> Vec<Value> {
        if !self.outbox.exists() {
            return Vec::new();
        }
        let (status, text) = gatehouse_output(["decode".as_ref(), self.outbox.as_os_str()]).await;
        let records: Vec<Value> = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("decode prints JSON"))
            .collect();
        let problems: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('{') && !l.trim().is_empty())
            .filter(|l| !l.contains("incomplete"))
            .collect();
        assert!(
            status.success() || problems.is_empty(),
            "gatehouse decode of the outbox failed: {problems:?}"
        );
        records
    }

    /// Wait until every payload in `wanted` is present in the outbox; returns the records.
    pub async fn wait_for_payloads(&self, wanted: &[Vec<u8>], timeout: Duration) -> Vec<Value> {
        poll_until("payloads to reach the outbox", timeout, || async {
            let recs = self.all_records().await;
            let have: HashSet<Vec<u8>> = recs.iter().map(payload_bytes).collect();
            let missing: Vec<String> = wanted
                .iter()
                .filter(|p| !have.contains(*p))
                .map(|p| show(p))
                .collect();
            if missing.is_empty() {
                Ok(recs)
            } else {
                Err(format!(
                    "{} of {} missing, e.g. {:?}; outbox has {} records",
                    missing.len(),
                    wanted.len(),
                    &missing[..missing.len().min(5)],
                    recs.len()
                ))
            }
        })
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if std::thread::panicking() && std::env::var_os("GATEHOUSE_IT_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("keeping {}", dir.keep().display());
        }
    }
}

/// Run `gatehouse decode --header FILE` and parse its output.
pub async fn decode_file(path: &Path) -> Batch {
    let out = Command::new(gatehouse_bin())
        .arg("decode")
        .arg(path)
        .arg("--header")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("spawn gatehouse decode");
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        out.status.success(),
        "gatehouse decode --header {} failed ({}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("decode output is UTF-8");
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Value = serde_json::from_str(lines.next().expect("decode printed no header"))
        .unwrap_or_else(|e| panic!("bad header JSON from decode of {name}: {e}"));
    let records = lines
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad record JSON from decode of {name}: {e}: {l}"))
        })
        .collect();
    Batch {
        file: name,
        header,
        records,
    }
}

/// Decode one batch payload held in memory (e.g. received from an MQTT upstream) with
/// `gatehouse decode --header` reading stdin: (header, records), or the failure.
pub async fn decode_bytes(payload: &[u8]) -> Result<(Value, Vec<Value>), String> {
    let mut child = Command::new(gatehouse_bin())
        .arg("decode")
        .arg("--header")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn gatehouse decode: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let input = payload.to_vec();
    // Feed stdin concurrently with reading stdout, so large batches cannot deadlock.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .map_err(|_| "gatehouse decode hung".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = writer.await;
    if !out.status.success() {
        return Err(format!(
            "gatehouse decode --header failed ({}) on {} bytes: {}",
            out.status,
            payload.len(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8(out.stdout).map_err(|_| "decode output is not UTF-8")?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Value = serde_json::from_str(lines.next().ok_or("decode printed no header")?)
        .map_err(|e| format!("bad header JSON from decode: {e}"))?;
    let records = lines
        .map(|l| serde_json::from_str(l).map_err(|e| format!("bad record JSON {l:?}: {e}")))
        .collect::<Result<Vec<Value>, String>>()?;
    Ok((header, records))
}

/// Check every batch header against its records: version 1, count, firstSeq/lastSeq,
/// seqs increasing inside the batch, batchSeq equals the file name, codec as configured.
/// Returns the list of problems (empty = fine).
pub fn header_problems(batches: &[Batch], codec: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for b in batches {
        let h = &b.header;
        let f = &b.file;
        if h["version"] != json!(1) {
            problems.push(format!("{f}: version {} != 1", h["version"]));
        }
        if h["count"].as_u64() != Some(b.records.len() as u64) {
            problems.push(format!(
                "{f}: header count {} but {} records",
                h["count"],
                b.records.len()
            ));
        }
        let seqs: Vec<u64> = b.records.iter().map(seq).collect();
        if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
            if h["firstSeq"].as_u64() != Some(*first) {
                problems.push(format!(
                    "{f}: firstSeq {} but first record seq {first}",
                    h["firstSeq"]
                ));
            }
            if h["lastSeq"].as_u64() != Some(*last) {
                problems.push(format!(
                    "{f}: lastSeq {} but last record seq {last}",
                    h["lastSeq"]
                ));
            }
        }
        if seqs.windows(2).any(|w| w[0] >= w[1]) {
            problems.push(format!("{f}: record seqs not increasing: {seqs:?}"));
        }
        let stem = f.trim_end_matches(".batch");
        if stem.len() != 20 || h["batchSeq"].as_u64() != stem.parse::<u64>().ok() {
            problems.push(format!(
                "{f}: batchSeq {} does not match the 20-digit file name",
                h["batchSeq"]
            ));
        }
        if h["codec"] != json!(codec) {
            problems.push(format!("{f}: codec {} != {codec:?}", h["codec"]));
        }
    }
    problems
}

/// Seqs that occur in more than one distinct batch file (or twice in one).
pub fn duplicate_seqs(batches: &[Batch]) -> Vec<(u64, Vec<String>)> {
    let mut by_seq: HashMap<u64, Vec<String>> = HashMap::new();
    for b in batches {
        for r in &b.records {
            by_seq.entry(seq(r)).or_default().push(b.file.clone());
        }
    }
    let mut d: Vec<_> = by_seq.into_iter().filter(|(_, v)| v.len() > 1).collect();
    d.sort();
    d
}

pub fn seq(rec: &Value) -> u64 {
    rec["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("record without u64 seq: {rec}"))
}

pub fn client_id(rec: &Value) -> String {
    rec["clientId"]
        .as_str()
        .unwrap_or_else(|| panic!("record without clientId: {rec}"))
        .to_string()
}

/// The record's payload bytes, from `payload` (UTF-8) or `payloadBase64`.
pub fn payload_bytes(rec: &Value) -> Vec<u8> {
    if let Some(s) = rec["payload"].as_str() {
        s.as_bytes().to_vec()
    } else if let Some(b) = rec["payloadBase64"].as_str() {
        base64_decode(b).unwrap_or_else(|| panic!("bad payloadBase64 in {rec}"))
    } else {
        panic!("record has neither payload nor payloadBase64: {rec}")
    }
}

/// Printable form of a payload for messages.
pub fn show(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) => s.to_string(),
        Err(_) => format!("{p:02x?}"),
    }
}

pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// rumqttc (MQTT 3.1.1) options for a test agent.
pub fn v4_options(client_id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// A rumqttc v4 agent that publishes one message at a time and waits for its
/// acknowledgement (PUBACK for QoS 1, PUBCOMP for QoS 2), so the ack it sees is
/// unambiguously for the message just sent.
pub struct AckedPublisher {
    pub client: AsyncClient,
    acks: mpsc::UnboundedReceiver<u16>,
    /// Number of connection errors the event loop saw (0 = never disconnected).
    pub errors: Arc<AtomicUsize>,
    pub last_error: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AckedPublisher {
    pub async fn connect(client_id: &str, port: u16) -> AckedPublisher {
        Self::connect_with(v4_options(client_id, port)).await
    }

    pub async fn connect_with(opts: MqttOptions) -> AckedPublisher {
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (tx, acks) = mpsc::unbounded_channel();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
        let errors = Arc::new(AtomicUsize::new(0));
        let last_error = Arc::new(Mutex::new(None));
        let (e2, le2) = (errors.clone(), last_error.clone());
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ca))) => {
                        let _ = conn_tx.send(ca.code);
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = tx.send(a.pkid);
                    }
                    Ok(Event::Incoming(Packet::PubComp(a))) => {
                        let _ = tx.send(a.pkid);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        e2.fetch_add(1, Ordering::SeqCst);
                        *le2.lock().unwrap() = Some(e.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        match tokio::time::timeout(ACK_TIMEOUT, conn_rx.recv()).await {
            Ok(Some(rumqttc::ConnectReturnCode::Success)) => {}
            other => panic!(
                "agent could not connect: {other:?} (last error {:?})",
                last_error.lock().unwrap()
            ),
        }
        AckedPublisher {
            client,
            acks,
            errors,
            last_error,
            task,
        }
    }

    /// Publish and (for QoS 1/2) wait for the final acknowledgement.
    pub async fn publish(&mut self, topic: &str, qos: QoS, payload: Vec<u8>) -> Result<(), String> {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .map_err(|e| e.to_string())?;
        if qos == QoS::AtMostOnce {
            return Ok(());
        }
        match tokio::time::timeout(ACK_TIMEOUT, self.acks.recv()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("event loop gone".into()),
            Err(_) => Err(format!(
                "no ack within {ACK_TIMEOUT:?} (connection errors: {}, last: {:?})",
                self.errors.load(Ordering::SeqCst),
                self.last_error.lock().unwrap()
            )),
        }
    }

    /// Panics if the event loop ever saw a connection error (`who` names the agent).
    pub fn assert_never_disconnected(&self, who: &str) {
        assert_eq!(
            self.errors.load(Ordering::SeqCst),
            0,
            "{who} was disconnected: {:?}",
            self.last_error.lock().unwrap()
        );
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

/// A "good" agent publishing unique QoS 1 messages continuously in the background
/// (one in flight at a time) until stopped. Used to show that other clients' bad input
/// does not disturb it.
pub struct BackgroundAgent {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<BackgroundReport>,
}

#[derive(Debug)]
pub struct BackgroundReport {
    pub acked: Vec<Vec<u8>>,
    pub failures: Vec<String>,
    pub connection_errors: usize,
}

impl BackgroundAgent {
    pub async fn start(port: u16, client_id: &str) -> BackgroundAgent {
        let mut agent = AckedPublisher::connect(client_id, port).await;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let topic = format!("agents/{client_id}/telemetry");
        let id = client_id.to_string();
        let handle = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                let payload = format!("{id} good #{i}").into_bytes();
                match agent
                    .publish(&topic, QoS::AtLeastOnce, payload.clone())
                    .await
                {
                    Ok(()) => acked.push(payload),
                    Err(e) => failures.push(format!("message #{i}: {e}")),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let connection_errors = agent.errors.load(Ordering::SeqCst);
            agent.disconnect().await;
            BackgroundReport {
                acked,
                failures,
                connection_errors,
            }
        });
        BackgroundAgent { stop, handle }
    }

    pub async fn finish(self) -> BackgroundReport {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("background agent did not stop")
            .expect("background agent panicked")
    }
}

/// Plain HTTP/1.0 GET against 127.0.0.1 (for the Prometheus endpoint); returns the body.
pub async fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP header end in {text:?}"))?;
        if !head.starts_with("HTTP/1.") || !head.contains(" 200") {
            return Err(format!("HTTP status not 200: {head}"));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "HTTP GET timed out".to_string())?
}

/// Sum of the samples of metric `name` in a Prometheus text body (None if absent).
pub fn metric_value(body: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = line
            .split_whitespace()
            .last()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// The samples of metric `name` whose label set contains `label` (e.g.
/// `reason="too_large_for_batch"`), summed (None if there is no such sample).
pub fn metric_value_with(body: &str, name: &str, label: &str) -> Option<f64> {
    let mut total = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some((labels, value)) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) else {
            continue;
        };
        if !labels.split(',').any(|l| l.trim() == label) {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// Scrape `http://{addr}/metrics`, retrying until the endpoint answers (10 s at most).
pub async fn scrape(addr: &str) -> String {
    poll_until("the metrics endpoint", Duration::from_secs(10), || async {
        http_get(addr, "/metrics").await
    })
    .await
}

// ---------------------------------------------------------------- raw MQTT over TCP

/// MQTT variable byte integer.
pub fn mqtt_varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// MQTT length-prefixed string / binary data.
pub fn mqtt_string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// Fixed header (first byte + remaining length) followed by `body`.
pub fn mqtt_packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    out.extend(mqtt_varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// A CONNECT to build by hand: protocol level 4 (3.1.1) or 5, clean session, keep-alive and
/// an optional QoS 0 Will.
#[derive(Clone, Debug)]
pub struct RawConnect {
    pub version: u8,
    pub client_id: String,
    pub keep_alive: u16,
    /// (topic, payload)
    pub will: Option<(String, Vec<u8>)>,
    /// (username, password)
    pub credentials: Option<(String, Vec<u8>)>,
}

impl RawConnect {
    pub fn new(version: u8, client_id: &str) -> RawConnect {
        RawConnect {
            version,
            client_id: client_id.to_string(),
            keep_alive: 60,
            will: None,
            credentials: None,
        }
    }

    pub fn credentials(mut self, username: &str, password: &[u8]) -> RawConnect {
        self.credentials = Some((username.to_string(), password.to_vec()));
        self
    }

    pub fn keep_alive(mut self, secs: u16) -> RawConnect {
        self.keep_alive = secs;
        self
    }

    pub fn will(mut self, topic: &str, payload: &[u8]) -> RawConnect {
        self.will = Some((topic.to_string(), payload.to_vec()));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let v5 = self.version == 5;
        let mut body = mqtt_string(b"MQTT");
        body.push(self.version);
        // Clean session/start, plus the Will flag (QoS 0, no retain) and the credential flags.
        let mut flags = if self.will.is_some() { 0x06 } else { 0x02 };
        if self.credentials.is_some() {
            flags |= 0xC0;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            body.push(0); // no CONNECT properties
        }
        body.extend(mqtt_string(self.client_id.as_bytes()));
        if let Some((topic, payload)) = &self.will {
            if v5 {
                body.push(0); // no Will properties
            }
            body.extend(mqtt_string(topic.as_bytes()));
            body.extend(mqtt_string(payload));
        }
        if let Some((username, password)) = &self.credentials {
            body.extend(mqtt_string(username.as_bytes()));
            body.extend(mqtt_string(password));
        }
        mqtt_packet(0x10, &body)
    }
}

/// PUBLISH (protocol level `version`) with an optional DUP flag.
pub fn raw_publish(
    version: u8,
    topic: &str,
    qos: u8,
    pkid: u16,
    dup: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = mqtt_string(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if version == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(payload);
    mqtt_packet(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, &body)
}

/// PUBREL with just the packet id (valid in 3.1.1 and 5: reason Success implied).
pub fn raw_pubrel(pkid: u16) -> Vec<u8> {
    mqtt_packet(0x62, &pkid.to_be_bytes())
}

pub const RAW_PINGREQ: [u8; 2] = [0xC0, 0x00];

/// Name and body of a packet for failure messages.
pub fn describe_packet(first: u8, body: &[u8]) -> String {
    let name = match first >> 4 {
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        9 => "SUBACK",
        11 => "UNSUBACK",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        _ => "packet",
    };
    format!("{name}(0x{first:02x}) {body:02x?}")
}

pub fn describe_packets(p: &[(u8, Vec<u8>)]) -> String {
    if p.is_empty() {
        return "nothing".into();
    }
    p.iter()
        .map(|(f, b)| describe_packet(*f, b))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one `RawMqtt::read` saw.
#[derive(Debug)]
pub enum RawEvent {
    Packet(u8, Vec<u8>),
    Closed,
    StillOpen,
}

/// A hand-driven MQTT connection: write any bytes, read whole packets or the close.
pub struct RawMqtt {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawMqtt {
    pub async fn open(port: u16) -> Result<RawMqtt, String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).ok();
        Ok(RawMqtt {
            stream,
            buf: Vec::new(),
        })
    }

    /// Open, CONNECT, and require a successful CONNACK.
    pub async fn connect(port: u16, connect: &RawConnect) -> Result<RawMqtt, String> {
        let mut r = RawMqtt::open(port).await?;
        r.send(&connect.bytes()).await?;
        let (f, b) = r.expect_packet("CONNACK", ACK_TIMEOUT).await?;
        if f != 0x20 || b.len() < 2 || b[1] != 0 {
            return Err(format!(
                "{}: expected a successful CONNACK, got {}",
                connect.client_id,
                describe_packet(f, &b)
            ));
        }
        Ok(r)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    /// The next packet, the close, or `StillOpen` once `timeout` passed.
    pub async fn read(&mut self, timeout: Duration) -> Result<RawEvent, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((first, body, used)) = split_packet(&self.buf)? {
                self.buf.drain(..used);
                return Ok(RawEvent::Packet(first, body));
            }
            let mut tmp = [0u8; 4096];
            match tokio::time::timeout_at(deadline.into(), self.stream.read(&mut tmp)).await {
                Err(_) => return Ok(RawEvent::StillOpen),
                Ok(Ok(0)) if self.buf.is_empty() => return Ok(RawEvent::Closed),
                Ok(Ok(0)) => {
                    return Err(format!(
                        "closed in the middle of a packet: {:02x?}",
                        self.buf
                    ));
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(RawEvent::Closed);
                }
                Ok(Err(e)) => return Err(format!("read: {e}")),
            }
        }
    }

    pub async fn expect_packet(
        &mut self,
        what: &str,
        timeout: Duration,
    ) -> Result<(u8, Vec<u8>), String> {
        match self.read(timeout).await? {
            RawEvent::Packet(f, b) => Ok((f, b)),
            RawEvent::Closed => Err(format!("connection closed while waiting for {what}")),
            RawEvent::StillOpen => Err(format!("no {what} within {timeout:?}")),
        }
    }

    /// Every packet until the close; Err if still open after `timeout`.
    pub async fn until_closed(&mut self, timeout: Duration) -> Result<Vec<(u8, Vec<u8>)>, String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await?
            {
                RawEvent::Packet(f, b) => got.push((f, b)),
                RawEvent::Closed => return Ok(got),
                RawEvent::StillOpen => {
                    return Err(format!(
                        "connection still open after {timeout:?} (received: {})",
                        describe_packets(&got)
                    ));
                }
            }
        }
    }
}

/// Split one packet off the front of `buf`: (first byte, body, bytes used).
pub fn split_packet(buf: &[u8]) -> Result<Option<(u8, Vec<u8>, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len += (b & 0x7f) as usize * mult;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        mult *= 128;
        if i > 4 {
            return Err(format!("gateway sent a malformed length: {buf:02x?}"));
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    Ok(Some((buf[0], buf[i..i + len].to_vec(), i + len)))
}
