//! `gatehouse-loadgen` — MQTT load generator used to benchmark Gatehouse (or any MQTT broker).
//!
//! It simulates `--agents` endpoint agents, each with its own MQTT connection (rumqttc, MQTT 3.1.1
//! or 5), that all connect first (a barrier, so connection setup is not measured) and then each
//! publish `--messages` endpoint-telemetry JSON messages of about `--payload-size` bytes to
//! `agents/<clientId>/telemetry`. Every payload carries the agent id and a sequence number, so no
//! two messages are identical and a deduplicating gateway keeps all of them.
//!
//! With `--qos 1` the run ends when every message has been PUBACKed; with `--qos 0` each agent's
//! last message is sent with QoS 1 as a fence (its PUBACK proves the broker read everything
//! before it). The last stdout line is machine readable:
//!
//! `RESULT agents=50 messages=50000 acked=50000 seconds=1.234 msg_per_sec=40518 ...`
//!
//! Exit status is non-zero if not every message was acknowledged within `--timeout-secs`, if any
//! agent failed, or if an MQTT 5 PUBACK carried an error reason code.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use tokio::sync::{mpsc, watch};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gatehouse-loadgen",
    version,
    about = "MQTT load generator: N agents each publish M unique telemetry messages and wait for PUBACKs"
)]
struct Args {
    /// Broker / gateway host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker / gateway port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Number of agents (one MQTT connection each).
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Messages published per agent.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Approximate payload size in bytes (JSON is padded/trimmed towards this size).
    #[arg(long, default_value_t = 512)]
    payload_size: usize,
    /// QoS of the telemetry messages (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// MQTT protocol level: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=5))]
    protocol: u8,
    /// Maximum unacknowledged QoS1 publishes per agent.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    inflight: u16,
    /// Client id prefix; agent i gets `<prefix><i, 5 digits>`.
    #[arg(long, default_value = "loadgen-")]
    client_prefix: String,
    /// Overall deadline (connect + publish + acks) in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// TCP_NODELAY on agent sockets. rumqttc's default is off, but it writes and flushes every
    /// publish separately, and with Nagle on the loadgen itself becomes the bottleneck.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    tcp_nodelay: bool,
    /// Tokio worker threads (0 = number of CPUs).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// PRNG seed for payload contents.
    #[arg(long, default_value_t = 0x5eed_1234_abcd_ef01)]
    seed: u64,
    /// TLS: the CA that signed the server's certificate (PEM); agents then connect over TLS
    /// (server name `localhost`).
    #[arg(long, value_name = "FILE")]
    cafile: Option<std::path::PathBuf>,
    /// TLS client certificate (PEM) every agent presents, with `--key`.
    #[arg(long, value_name = "FILE", requires = "key", requires = "cafile")]
    cert: Option<std::path::PathBuf>,
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Print N sample payloads (one per line) and exit without connecting.
    #[arg(long, value_name = "N")]
    dump: Option<usize>,
    /// Replay real events instead of generated ones: a JSON-lines file (`.zst` is decompressed),
    /// split into one contiguous slice per agent; agent i publishes its slice's lines in order,
    /// from the start again when it runs out. `--payload-size` is then ignored.
    #[arg(long, value_name = "FILE")]
    corpus: Option<std::path::PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

/// xorshift64* — tiny, fast, good enough for synthetic telemetry.
#[derive(Clone)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // splitmix64 step so that nearby seeds give unrelated streams and 0 is never the state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        XorShift(if z == 0 { 1 } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn hex(&mut self, nbytes: usize) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(nbytes * 2);
        for _ in 0..nbytes {
            let b = self.next_u64() as u8;
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }
}

const EXES: &[&str] = &[
    "C:\\Windows\\System32\\svchost.exe",
    "C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\powershell.exe",
    "C:\\Program Files\\Google\\Chrome\\Application\\chrome.exe",
    "C:\\Windows\\explorer.exe",
    "/usr/bin/python3",
    "/usr/sbin/sshd",
    "/usr/bin/curl",
    "/opt/app/bin/worker",
    "/usr/lib/systemd/systemd-journald",
    "/bin/bash",
];
const USERS: &[&str] = &["SYSTEM", "alice", "bob", "root", "svc-backup", "www-data"];
const DIRS: &[&str] = &[
    "C:\\Users\\alice\\AppData\\Local\\Temp",
    "C:\\ProgramData\\Vendor\\cache",
    "/var/log",
    "/tmp",
    "/home/bob/.cache/pip",
    "/etc/systemd/system",
];
const EXTS: &[&str] = &["log", "tmp", "dll", "json", "db", "conf", "ps1", "so"];
const SIGNERS: &[&str] = &[
    "Microsoft Windows",
    "Google LLC",
    "unsigned",
    "Canonical Ltd.",
];

fn ipv4(rng: &mut XorShift, private: bool) -> String {
    if private {
        format!(
            "10.{}.{}.{}",
            rng.below(256),
            rng.below(256),
            1 + rng.below(254)
        )
    } else {
        format!(
            "{}.{}.{}.{}",
            1 + rng.below(223),
            rng.below(256),
            rng.below(256),
            1 + rng.below(254)
        )
    }
}

/// One random endpoint event (process start / file write / network connection) as compact JSON.
fn random_event(rng: &mut XorShift) -> String {
    let pid = 200 + rng.below(60_000);
    let exe = *rng.pick(EXES);
    let value = match rng.below(3) {
        0 => json!({
            "type": "process_start",
            "pid": pid,
            "ppid": 1 + rng.below(pid),
            "exe": exe,
            "cmdline": format!("{exe} --task {} --id {}", rng.hex(3), rng.below(100_000)),
            "user": *rng.pick(USERS),
            "sha256": rng.hex(32),
            "signer": *rng.pick(SIGNERS),
            "integrity": *rng.pick(&["low", "medium", "high", "system"]),
        }),
        1 => {
            let dir = *rng.pick(DIRS);
            let sep = if dir.starts_with('/') { '/' } else { '\\' };
            json!({
                "type": "file_write",
                "pid": pid,
                "exe": exe,
                "path": format!("{dir}{sep}{}.{}", rng.hex(5), rng.pick(EXTS)),
                "bytes": rng.below(4 << 20),
                "sha256": rng.hex(32),
                "created": rng.below(2) == 0,
            })
        }
        _ => json!({
            "type": "net_connect",
            "pid": pid,
            "exe": exe,
            "proto": *rng.pick(&["tcp", "udp"]),
            "direction": *rng.pick(&["outbound", "outbound", "inbound"]),
            "srcIp": ipv4(rng, true),
            "srcPort": 1024 + rng.below(64_000),
            "dstIp": ipv4(rng, false),
            "dstPort": *rng.pick(&[443u64, 80, 53, 22, 3389, 8883, 445]),
            "bytesOut": rng.below(1 << 20),
            "bytesIn": rng.below(1 << 20),
        }),
    };
    value.to_string()
}

/// Used when the target payload size is too small for a full event.
const MINIMAL_EVENT: &str = r#"{"type":"heartbeat"}"#;
const PAD_CHARS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Shared, pre-generated material: a pool of events and a filler string.
struct PayloadPool {
    events: Vec<String>,
    filler: Vec<u8>,
    target: usize,
    /// `--corpus`: real events, and how many agents share them.
    corpus: Option<(Vec<Vec<u8>>, usize)>,
}

impl PayloadPool {
    fn new(seed: u64, target: usize) -> Self {
        let mut rng = XorShift::new(seed);
        let events = (0..256).map(|_| random_event(&mut rng)).collect();
        let filler = (0..target)
            .map(|_| PAD_CHARS[rng.below(64) as usize])
            .collect();
        PayloadPool {
            events,
            filler,
            target,
            corpus: None,
        }
    }

    /// The pool `args` asks for: generated events, or the `--corpus` file's.
    fn for_args(args: &Args) -> Result<Self> {
        let mut pool = Self::new(args.seed, args.payload_size);
        if let Some(path) = &args.corpus {
            let file = std::fs::File::open(path)
                .with_context(|| format!("--corpus {}", path.display()))?;
            let mut text = Vec::new();
            if path.extension().is_some_and(|e| e == "zst") {
                std::io::Read::read_to_end(&mut zstd::Decoder::new(file)?, &mut text)?;
            } else {
                std::io::Read::read_to_end(&mut std::io::BufReader::new(file), &mut text)?;
            }
            let lines: Vec<Vec<u8>> = text
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            if lines.len() < args.agents.max(1) {
                bail!(
                    "--corpus {}: {} events for {} agents",
                    path.display(),
                    lines.len(),
                    args.agents
                );
            }
            pool.corpus = Some((lines, args.agents.max(1)));
        }
        Ok(pool)
    }

    /// The payloads' mean size, for the reports.
    fn mean_payload(&self) -> usize {
        match &self.corpus {
            Some((lines, _)) => lines.iter().map(Vec::len).sum::<usize>() / lines.len().max(1),
            None => self.target,
        }
    }

    /// The largest payload this pool produces.
    fn max_payload(&self) -> usize {
        match &self.corpus {
            Some((lines, _)) => lines.iter().map(Vec::len).max().unwrap_or(0),
            None => self.target.max(160) + 8,
        }
    }
}

/// Per-agent payload builder. One `Vec` allocation per message (rumqttc takes ownership anyway).
struct PayloadGen {
    pool: Arc<PayloadPool>,
    index: usize,
    agent_id: String,
    host: String,
    rng: XorShift,
}

impl PayloadGen {
    fn new(pool: Arc<PayloadPool>, agent_id: &str, index: usize, seed: u64) -> Self {
        PayloadGen {
            pool,
            index,
            agent_id: agent_id.to_string(),
            host: format!("ws-{index:05}.corp.example"),
            rng: XorShift::new(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    fn make(&mut self, seq: u64, ts_ms: u64) -> Vec<u8> {
        if let Some((lines, agents)) = &self.pool.corpus {
            let start = self.index * lines.len() / agents;
            let end = (self.index + 1) * lines.len() / agents;
            return lines[start + (seq as usize) % (end - start)].clone();
        }
        let target = self.pool.target;
        let mut v = Vec::with_capacity(target.max(160) + 8);
        v.extend_from_slice(b"{\"agentId\":\"");
        v.extend_from_slice(self.agent_id.as_bytes());
        // Writing integers into a Vec cannot fail.
        let _ = write!(v, "\",\"seq\":{seq},\"ts\":{ts_ms},\"host\":\"");
        v.extend_from_slice(self.host.as_bytes());
        v.extend_from_slice(b"\",\"event\":");
        let event = self.rng.pick(&self.pool.events).as_str();
        let event = if v.len() + event.len() < target {
            event
        } else {
            MINIMAL_EVENT
        };
        v.extend_from_slice(event.as_bytes());
        // `,"pad":"` + `"` + `}` = 10 bytes of overhead.
        if v.len() + 10 < target {
            let n = target - v.len() - 10;
            let start = (self.rng.below(64) as usize).min(self.pool.filler.len() - n);
            v.extend_from_slice(b",\"pad\":\"");
            v.extend_from_slice(&self.pool.filler[start..start + n]);
            v.push(b'"');
        }
        v.push(b'}');
        v
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------------

struct AgentCfg {
    index: usize,
    client_id: String,
    args: Arc<Args>,
    pool: Arc<PayloadPool>,
    /// Reports "connected" (or the connect error) to the coordinator.
    ready: mpsc::Sender<Result<(), String>>,
    /// Flips to `true` when every agent is connected.
    go: watch::Receiver<bool>,
    acked_total: Arc<AtomicU64>,
    /// TLS for the agents' connections (`--cafile`).
    tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Default)]
struct AgentStats {
    sent: u64,
    acked: u64,
    rejected: u64,
    finished_at: Option<Instant>,
}

/// Bookkeeping common to the v4 and v5 loops.
struct Progress {
    total: u64,
    next_seq: u64,
    /// Requests handed to rumqttc's channel but not yet written (Outgoing::Publish not seen).
    queued: usize,
    cap: usize,
    stats: AgentStats,
}

impl Progress {
    fn new(total: u64, cap: usize) -> Self {
        Progress {
            total,
            next_seq: 0,
            queued: 0,
            cap,
            stats: AgentStats::default(),
        }
    }

    fn done(&self) -> bool {
        self.stats.acked + self.stats.rejected >= self.total
    }

    /// QoS of message `seq`: with --qos 0 the last message is a QoS1 fence.
    fn qos_for(&self, seq: u64, qos: u8) -> u8 {
        if qos == 0 && seq + 1 == self.total {
            1
        } else {
            qos
        }
    }

    fn on_outgoing_publish(&mut self, qos0: bool) {
        self.queued = self.queued.saturating_sub(1);
        self.stats.sent += 1;
        if qos0 {
            // QoS0 messages count as acknowledged once written; the final fence (QoS1) proves
            // the broker has read them.
            self.stats.acked += 1;
        }
    }
}

async fn wait_for_go(go: &mut watch::Receiver<bool>) -> Result<()> {
    while !*go.borrow() {
        go.changed().await.context("run aborted before start")?;
    }
    Ok(())
}

/// TLS to the server named `localhost` (the benchmark certificates' name).
fn agent_transport(tls: &Arc<rustls::ClientConfig>) -> rumqttc::Transport {
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone()))
}

async fn agent_v4(mut cfg: AgentCfg) -> Result<AgentStats> {
    use rumqttc::{
        AsyncClient, ClientError, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
    };
    let args = cfg.args.clone();
    let mut opts = MqttOptions::new(&cfg.client_id, &args.host, args.port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_clean_session(true)
        .set_inflight(args.inflight);
    let max_packet = (cfg.pool.max_payload() + 1024).max(10 * 1024);
    opts.set_max_packet_size(max_packet, max_packet);
    if let Some(tls) = &cfg.tls {
        opts.set_transport(agent_transport(tls));
    }
    let cap = args.inflight as usize;
    let (client, mut el) = AsyncClient::new(opts, cap);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(args.tcp_nodelay);
    net.set_connection_timeout(30);
    el.set_network_options(net);

    // Connect.
    let connected = async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
                return Ok::<_, rumqttc::ConnectionError>(());
            }
        }
    }
    .await;
    let _ = cfg.ready.send(connected.map_err(|e| e.to_string())).await;
    wait_for_go(&mut cfg.go).await?;

    let topic = format!("agents/{}/telemetry", cfg.client_id);
    let mut payloads = PayloadGen::new(cfg.pool.clone(), &cfg.client_id, cfg.index, args.seed);
    let mut p = Progress::new(args.messages, cap);
    let qos0 = args.qos == 0;
    while !p.done() {
        // Keep rumqttc's request channel topped up without blocking.
        if p.next_seq < p.total && p.queued < p.cap {
            let ts = now_ms();
            while p.next_seq < p.total && p.queued < p.cap {
                let qos = match p.qos_for(p.next_seq, args.qos) {
                    0 => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                let payload = payloads.make(p.next_seq, ts);
                match client.try_publish(topic.as_str(), qos, false, payload) {
                    Ok(()) => {
                        p.next_seq += 1;
                        p.queued += 1;
                    }
                    Err(ClientError::TryRequest(_)) => break, // channel full; regenerate later
                    Err(e) => bail!("publish: {e}"),
                }
            }
        }
        match el.poll().await.context("connection error")? {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                // pkid 0 = QoS0; the fence is QoS1 and is counted on its PUBACK.
                p.on_outgoing_publish(qos0 && pkid == 0);
            }
            Event::Incoming(Packet::PubAck(_)) => {
                p.stats.acked += 1;
                cfg.acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Event::Incoming(Packet::Disconnect) => bail!("broker sent DISCONNECT"),
            _ => {}
        }
    }
    if qos0 {
        cfg.acked_total
            .fetch_add(p.stats.acked.saturating_sub(1), Ordering::Relaxed);
    }
    p.stats.finished_at = Some(Instant::now());

    // Graceful disconnect (not timed).
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(p.stats)
}

async fn agent_v5(mut cfg: AgentCfg) -> Result<AgentStats> {
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::{AsyncClient, ClientError, Event, MqttOptions};
    let args = cfg.args.clone();
    let mut opts = MqttOptions::new(&cfg.client_id, &args.host, args.port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_clean_start(true)
        .set_connection_timeout(30)
        // Without this rumqttc v5 sizes its inflight table to 65535 and, if the server sends no
        // Receive Maximum, allows 65535 unacknowledged publishes.
        .set_outgoing_inflight_upper_limit(args.inflight);
    let max_packet = (cfg.pool.max_payload() + 1024).max(10 * 1024) as u32;
    opts.set_max_packet_size(Some(max_packet));
    if let Some(tls) = &cfg.tls {
        opts.set_transport(agent_transport(tls));
    }
    let mut net = opts.network_options();
    net.set_tcp_nodelay(args.tcp_nodelay);
    opts.set_network_options(net);
    let cap = args.inflight as usize;
    let (client, mut el) = AsyncClient::new(opts, cap);

    let mut receive_max = None;
    let connected = async {
        loop {
            if let Event::Incoming(Packet::ConnAck(ack)) = el.poll().await? {
                receive_max = ack.properties.and_then(|p| p.receive_max);
                return Ok::<_, rumqttc::v5::ConnectionError>(());
            }
        }
    }
    .await;
    if let Some(rm) = receive_max.filter(|rm| cfg.index == 0 && *rm < args.inflight) {
        eprintln!(
            "note: server Receive Maximum {rm} caps --inflight {}",
            args.inflight
        );
    }
    let _ = cfg.ready.send(connected.map_err(|e| e.to_string())).await;
    wait_for_go(&mut cfg.go).await?;

    let topic = format!("agents/{}/telemetry", cfg.client_id);
    let mut payloads = PayloadGen::new(cfg.pool.clone(), &cfg.client_id, cfg.index, args.seed);
    let mut p = Progress::new(args.messages, cap);
    let qos0 = args.qos == 0;
    let mut first_reject: Option<PubAckReason> = None;
    while !p.done() {
        if p.next_seq < p.total && p.queued < p.cap {
            let ts = now_ms();
            while p.next_seq < p.total && p.queued < p.cap {
                let qos = match p.qos_for(p.next_seq, args.qos) {
                    0 => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                let payload = payloads.make(p.next_seq, ts);
                match client.try_publish(topic.as_str(), qos, false, payload) {
                    Ok(()) => {
                        p.next_seq += 1;
                        p.queued += 1;
                    }
                    Err(ClientError::TryRequest(_)) => break,
                    Err(e) => bail!("publish: {e}"),
                }
            }
        }
        match el.poll().await.context("connection error")? {
            Event::Outgoing(Outgoing::Publish(pkid)) => p.on_outgoing_publish(qos0 && pkid == 0),
            Event::Incoming(Packet::PubAck(ack)) => match ack.reason {
                // mosquitto answers NoMatchingSubscribers when nobody subscribes: still accepted.
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                    p.stats.acked += 1;
                    cfg.acked_total.fetch_add(1, Ordering::Relaxed);
                }
                reason => {
                    p.stats.rejected += 1;
                    first_reject.get_or_insert(reason);
                }
            },
            Event::Incoming(Packet::Disconnect(d)) => {
                bail!("server sent DISCONNECT ({:?})", d.reason_code)
            }
            _ => {}
        }
    }
    if qos0 {
        cfg.acked_total
            .fetch_add(p.stats.acked.saturating_sub(1), Ordering::Relaxed);
    }
    p.stats.finished_at = Some(Instant::now());
    if let Some(reason) = first_reject {
        eprintln!(
            "{}: {} PUBACKs with error reason (first: {reason:?})",
            cfg.client_id, p.stats.rejected
        );
    }

    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(p.stats)
}

// ---------------------------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------------------------

struct Summary {
    total: u64,
    acked: u64,
    rejected: u64,
    errors: usize,
    seconds: f64,
    timed_out: bool,
}

fn print_result(args: &Args, s: &Summary, payload: usize) {
    let rate = if s.seconds > 0.0 {
        s.acked as f64 / s.seconds
    } else {
        0.0
    };
    println!(
        "RESULT agents={} messages={} acked={} seconds={:.3} msg_per_sec={:.0} qos={} protocol={} payload={} inflight={} rejected={} errors={} timed_out={}",
        args.agents,
        s.total,
        s.acked,
        s.seconds,
        rate,
        args.qos,
        args.protocol,
        payload,
        args.inflight,
        s.rejected,
        s.errors,
        s.timed_out
    );
}

async fn run(args: Arc<Args>) -> Result<bool> {
    let total = args.agents as u64 * args.messages;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let pool = Arc::new(PayloadPool::for_args(&args)?);
    let tls = match &args.cafile {
        Some(ca) => Some(Arc::new(gatehouse::tls::client_config(
            ca,
            args.cert.as_deref().zip(args.key.as_deref()),
        )?)),
        None => None,
    };
    let acked_total = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::channel(args.agents.max(1));
    let (go_tx, go_rx) = watch::channel(false);

    let connect_started = Instant::now();
    let mut handles = Vec::with_capacity(args.agents);
    for index in 0..args.agents {
        let cfg = AgentCfg {
            index,
            client_id: format!("{}{index:05}", args.client_prefix),
            args: args.clone(),
            pool: pool.clone(),
            ready: ready_tx.clone(),
            go: go_rx.clone(),
            acked_total: acked_total.clone(),
            tls: tls.clone(),
        };
        handles.push(tokio::spawn(async move {
            if cfg.args.protocol == 5 {
                agent_v5(cfg).await
            } else {
                agent_v4(cfg).await
            }
        }));
    }
    drop(ready_tx);

    // Barrier: wait until every agent is connected.
    let mut connected = 0usize;
    while connected < args.agents {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => connected += 1,
            Ok(Some(Err(e))) => bail!(
                "agent failed to connect to {}:{}: {e}",
                args.host,
                args.port
            ),
            Ok(None) => bail!("agents exited before connecting"),
            Err(_) => bail!(
                "timed out: only {connected}/{} agents connected",
                args.agents
            ),
        }
    }
    eprintln!(
        "{} agents connected in {:.3}s (MQTT {}, QoS {}, payload ~{} B, inflight {}); publishing {} messages",
        args.agents,
        connect_started.elapsed().as_secs_f64(),
        if args.protocol == 5 { "5" } else { "3.1.1" },
        args.qos,
        pool.mean_payload(),
        args.inflight,
        total
    );

    let start = Instant::now();
    go_tx.send_replace(true);

    // Wait for all agents, with progress every 5 s and the overall deadline.
    let mut summary = Summary {
        total,
        acked: 0,
        rejected: 0,
        errors: 0,
        seconds: 0.0,
        timed_out: false,
    };
    let mut finish_times = Vec::with_capacity(args.agents);
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    let mut pending = handles.into_iter();
    let mut current = pending.next();
    while let Some(handle) = current.as_mut() {
        tokio::select! {
            res = handle => {
                match res {
                    Ok(Ok(stats)) => {
                        summary.acked += stats.acked;
                        summary.rejected += stats.rejected;
                        if let Some(t) = stats.finished_at {
                            finish_times.push(t.saturating_duration_since(start).as_secs_f64());
                        }
                    }
                    Ok(Err(e)) => {
                        summary.errors += 1;
                        eprintln!("agent error: {e:#}");
                    }
                    Err(e) => {
                        summary.errors += 1;
                        eprintln!("agent task failed: {e}");
                    }
                }
                current = pending.next();
            }
            _ = ticker.tick() => {
                let acked = acked_total.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64();
                eprintln!("  t={secs:.0}s acked={acked}/{total} ({:.0} msg/s)", acked as f64 / secs);
            }
            _ = tokio::time::sleep_until(deadline) => {
                summary.timed_out = true;
                summary.acked = acked_total.load(Ordering::Relaxed);
                summary.seconds = start.elapsed().as_secs_f64();
                eprintln!("timed out after {}s", args.timeout_secs);
                print_result(&args, &summary, pool.mean_payload());
                return Ok(false);
            }
        }
    }

    finish_times.sort_by(f64::total_cmp);
    summary.seconds = finish_times.last().copied().unwrap_or(0.0);
    if let (Some(first), Some(last)) = (finish_times.first(), finish_times.last()) {
        let median = finish_times[finish_times.len() / 2];
        eprintln!(
            "agent finish times: first {first:.3}s, median {median:.3}s, last {last:.3}s; {:.1} MB/s payload",
            summary.acked as f64 * pool.mean_payload() as f64 / 1e6 / last.max(1e-9)
        );
    }
    print_result(&args, &summary, pool.mean_payload());
    Ok(summary.errors == 0 && summary.rejected == 0 && summary.acked == total)
}

fn main() {
    let args = Args::parse();
    if let Some(n) = args.dump {
        let pool = Arc::new(PayloadPool::new(args.seed, args.payload_size));
        let id = format!("{}{:05}", args.client_prefix, 0);
        let mut generator = PayloadGen::new(pool, &id, 0, args.seed);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for seq in 0..n as u64 {
            let _ = out.write_all(&generator.make(seq, now_ms()));
            let _ = out.write_all(b"\n");
        }
        return;
    }
    if args.agents == 0 || args.messages == 0 {
        eprintln!("error: --agents and --messages must be at least 1");
        std::process::exit(2);
    }

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if args.threads > 0 {
        builder.worker_threads(args.threads);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(Arc::new(args)));
    // Do not wait for stuck agent tasks on the way out.
    runtime.shutdown_background();
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_valid_unique_json_of_target_size() {
        for target in [64usize, 200, 512, 4096] {
            let pool = Arc::new(PayloadPool::new(7, target));
            let mut g = PayloadGen::new(pool, "loadgen-00042", 42, 7);
            let mut seen = std::collections::HashSet::new();
            for seq in 0..500 {
                let p = g.make(seq, 1_700_000_000_000 + seq);
                let v: serde_json::Value = serde_json::from_slice(&p).expect("valid JSON");
                assert_eq!(v["agentId"], "loadgen-00042");
                assert_eq!(v["seq"], seq);
                assert!(v["event"]["type"].is_string());
                if target >= 512 {
                    assert!(p.len() <= target && p.len() + 12 >= target, "{}", p.len());
                }
                assert!(seen.insert(p));
            }
        }
    }

    #[test]
    fn xorshift_is_deterministic_and_nonzero() {
        let mut a = XorShift::new(0);
        let mut b = XorShift::new(0);
        for _ in 0..1000 {
            let x = a.next_u64();
            assert_eq!(x, b.next_u64());
        }
        assert_ne!(a.0, 0);
    }
}
