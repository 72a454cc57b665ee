//! The configuration model: one typed tree, validated all at once before any socket is bound.
//!
//! The same `Config` is read from a JSON file (`gatehouse run --config FILE`), from the embedded
//! defaults (no file), and from the Greengrass component configuration (the recipe's
//! `DefaultConfiguration` merged with the deployment's, read with GetConfiguration, minus
//! `accessControl`). Keys are camelCase; unknown keys and bad values are errors whose message
//! starts with the key path, e.g. `batch.maxBytes: expected an integer between 1024 and 131072,
//! got "lots"`. Integers and booleans given as strings (`"42"`, `"true"`, as nucleus lite returns
//! every scalar of a YAML recipe) are accepted.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// IoT Core's PUBLISH payload limit, the largest batch we may ever emit.
pub const IOT_CORE_MAX_PAYLOAD: u64 = 131_072;

/// A configuration that failed to load or validate. The message names the key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A key is unknown or its value is invalid; `key` is the path, e.g. `batch.maxBytes`.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<InvalidKey>),
}

/// One invalid key, with the reason.
#[derive(Debug)]
pub struct InvalidKey {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() || self.key == "." {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.key, self.reason)
        }
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The gateway's name in batch headers and upstream topics. Default: env `AWS_IOT_THING_NAME`,
    /// else the host name.
    #[serde(default = "default_thing_name")]
    pub thing_name: String,
    /// Where `thing_name` came from, for the start-up log.
    #[serde(skip)]
    pub thing_name_source: ThingNameSource,
    /// Where agents connect. Default: one plain-TCP listener on 127.0.0.1:1883.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    /// Where batches go. Read by `parse_upstream` (its `kind` picks the shape), so that errors
    /// inside it still name the full key path.
    #[serde(skip)]
    pub upstream: UpstreamConfig,
    /// Stands for `upstream` here, so that serde's list of valid top-level keys includes it.
    #[serde(default, rename = "upstream")]
    _upstream: Option<serde::de::IgnoredAny>,
    /// `error`, `warn`, `info` (default), `debug`, `trace`, or any `tracing` filter directive.
    /// `RUST_LOG`, when set, wins.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The optional local admin listener serving Prometheus metrics at `/metrics`.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Agents' persistent MQTT sessions kept while they are disconnected.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// What agents may publish and subscribe to, in every listener. A topic is allowed when an
    /// `allow` rule matches it and no `deny` rule does. Default: publish under
    /// `agents/${identity}/#`, subscribe to `agents/${identity}/commands/#`.
    #[serde(default = "default_acl")]
    pub acl: Vec<AclRuleConfig>,
}

/// Where the thing name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThingNameSource {
    /// The `thingName` key.
    #[default]
    Config,
    /// The `AWS_IOT_THING_NAME` environment variable (set by Greengrass).
    Environment,
    /// The host name: neither was set.
    HostName,
}

impl fmt::Display for ThingNameSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Config => "from thingName in the configuration",
            Self::Environment => "from the AWS_IOT_THING_NAME environment variable",
            Self::HostName => {
                "from the host name, as neither thingName nor AWS_IOT_THING_NAME is set"
            }
        })
    }
}

/// Persistent sessions of disconnected agents (MQTT 3.1.1 clean session 0, MQTT 5 with a
/// Session Expiry Interval): bounded in number and in time.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionsConfig {
    /// Sessions kept at most; past it the longest-disconnected one is discarded (counted).
    /// Default 100000.
    #[serde(default = "default_max_stored_sessions")]
    pub max_stored: Bounded<1, 10_000_000>,
    /// How long a 3.1.1 persistent session outlives its connection, and the most an MQTT 5
    /// agent's Session Expiry Interval is granted. Default 604800 (7 days).
    #[serde(default = "default_session_expiry_secs")]
    pub expiry_secs: Bounded<1, 31_536_000>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            max_stored: default_max_stored_sessions(),
            expiry_secs: default_session_expiry_secs(),
        }
    }
}

/// One agent listener: MQTT over TCP or TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port` to bind, e.g. `127.0.0.1:1883`.
    pub bind: Bind,
    /// The largest MQTT packet an agent may send; a larger one closes only that agent's
    /// connection (MQTT 5: DISCONNECT 0x95). Default 256 KiB.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: Bounded<64, 268_435_455>,
    /// QoS1/2 messages from one agent that may await their journal commit at once; beyond it the
    /// listener stops reading that socket. Default 1024.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: Bounded<1, 65_535>,
    /// How long a new connection may take to send CONNECT. Default 10 s.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: Bounded<100, 600_000>,
    /// How long a write to an agent (acknowledgements, deliveries) may wait on an agent that
    /// does not read its socket; past it the agent is disconnected (what it sent and did not get
    /// acknowledged, it sends again). Default 10000.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: Bounded<100, 600_000>,
    /// TLS for this listener; absent: plain TCP (loopback, or with `allowPlaintext`).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Accept plain TCP on a non-loopback address (default false).
    #[serde(default, deserialize_with = "lenient_flag")]
    pub allow_plaintext: bool,
    #[serde(default)]
    pub auth: AuthConfig,
    /// An agent may connect only with a client id equal to its identity (default true).
    #[serde(default = "yes", deserialize_with = "lenient_flag")]
    pub client_id_binding: bool,
    /// Connections held at once; more are closed at accept (counted). Default 100000.
    #[serde(default = "security::default_max_connections")]
    pub max_connections: Bounded<1, 10_000_000>,
    /// New connections served per second after `connectionBurst` (a reconnect storm waits in
    /// the listen backlog instead of starving connected agents). Default 1000.
    #[serde(default = "security::default_connections_per_sec")]
    pub connections_per_sec: Bounded<1, 1_000_000>,
    /// Default 2000.
    #[serde(default = "security::default_connection_burst")]
    pub connection_burst: Bounded<1, 1_000_000>,
    /// PUBLISHes per second one agent may send after `publishBurst`; beyond, its socket is not
    /// read until it is back under the rate (nothing is dropped). Default 10000.
    #[serde(default = "security::default_publishes_per_sec")]
    pub publishes_per_sec: Bounded<1, 10_000_000>,
    /// Default 20000.
    #[serde(default = "security::default_publish_burst")]
    pub publish_burst: Bounded<1, 10_000_000>,
    /// The longest topic name or filter, in bytes. Default 256.
    #[serde(default = "security::default_max_topic_length")]
    pub max_topic_length: Bounded<1, 65_535>,
    /// The most levels in a topic name or filter. Default 16.
    #[serde(default = "security::default_max_topic_levels")]
    pub max_topic_levels: Bounded<1, 1_000>,
    /// What a denied MQTT 3.1.1 QoS 1/2 PUBLISH gets: `close` (default) or `ignore`.
    #[serde(default, rename = "onDenied311")]
    pub on_denied_311: OnDenied,
}

/// How fsync-heavy the journal is; the window of data a power loss may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Off,
    Normal,
    Full,
    Extra,
}

impl Synchronous {
    pub fn pragma(self) -> &'static str {
        match self {
            Self::Off => "OFF",
            Self::Normal => "NORMAL",
            Self::Full => "FULL",
            Self::Extra => "EXTRA",
        }
    }
}

/// Which messages the journal drops as duplicates (`journal.dedup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// A message is dropped when the same agent published the same topic and payload within
    /// `dedupWindowSecs` and that earlier copy is journaled or was delivered. The same event
    /// from two agents is always two records.
    Agent,
    /// Nothing is dropped as a duplicate.
    Off,
}

/// The durable journal (SQLite, WAL mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JournalConfig {
    /// The SQLite file. Default `./gatehouse-data/journal.db`.
    #[serde(default = "default_journal_path")]
    pub path: PathBuf,
    /// SQLite `synchronous`. `full` (default): a PUBACKed message survives power loss. `normal`
    /// in WAL mode: survives a process crash, but the last commits may be lost on power loss.
    #[serde(default = "default_synchronous")]
    pub synchronous: Synchronous,
    /// `agent` (default): a message the same agent published with the same topic and payload
    /// within `dedupWindowSecs` is acknowledged but not journaled again (when the earlier copy is
    /// journaled or was delivered). `off`: nothing is dropped as a duplicate.
    #[serde(default = "default_dedup_mode")]
    pub dedup: DedupMode,
    /// The dedup window in seconds. 0 disables dedup. Default 600.
    #[serde(default = "default_dedup_window_secs")]
    pub dedup_window_secs: Bounded<0, 604_800>,
    /// Dedup keys held at most (about 40 bytes of memory each). Past it the oldest keys are
    /// forgotten before their window ends (counted), so a late duplicate may be journaled again;
    /// nothing is dropped. Default 1,000,000: a full 10-minute window up to ~1,600 msg/s.
    #[serde(default = "default_dedup_max_keys")]
    pub dedup_max_keys: Bounded<1_000, 100_000_000>,
    /// Disk the journal's records may use, in bytes (each record is charged its payload, topic
    /// and client id plus 64). When full: the oldest QoS 0 records not yet batched are evicted;
    /// then new messages are refused (MQTT 5: PUBACK 0x97; 3.1.1: the connection is closed).
    /// Default 1 GiB.
    #[serde(default = "default_journal_max_bytes")]
    pub max_bytes: Bounded<65_536, { u64::MAX >> 1 }>,
    /// Group commit: the most messages one transaction holds. Default 4096.
    #[serde(default = "default_commit_max_messages")]
    pub commit_max_messages: Bounded<1, 100_000>,
    /// Group commit: how long the writer may wait for more messages after the first one before it
    /// commits. This delays every PUBACK by at most this much. Default 0 (commit what has queued
    /// while the previous commit was syncing; that alone groups commits under load).
    #[serde(default)]
    pub commit_max_delay_ms: Bounded<0, 1_000>,
}

/// Batch compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl Compression {
    /// The name the configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Gzip => "gzip",
            Self::None => "none",
        }
    }
}

/// How records are packed into upstream payloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchConfig {
    /// The largest payload after compression, envelope included. Default 131072 (IoT Core's limit).
    #[serde(default = "default_batch_max_bytes")]
    pub max_bytes: Bounded<1024, IOT_CORE_MAX_PAYLOAD>,
    /// The most records in one batch. Default 10000.
    #[serde(default = "default_batch_max_messages")]
    pub max_messages: Bounded<1, 1_000_000>,
    /// A batch is flushed when its oldest record has waited this long. Default 1000.
    #[serde(default = "default_batch_max_delay_ms")]
    pub max_delay_ms: Bounded<0, 3_600_000>,
    /// `zstd` (default), `gzip` or `none`.
    #[serde(default = "default_compression")]
    pub compression: Compression,
}

/// Where batches go (`upstream.kind`).
#[derive(Debug, Clone)]
pub enum UpstreamConfig {
    /// `"directory"`: each batch is one file in `path`, named by batch sequence number. The
    /// embedded default.
    Directory {
        path: PathBuf,
        /// Batches handed to the sink and not yet confirmed, at most. Default 16.
        max_inflight: Bounded<1, 1_000>,
    },
    /// `"mqtt"`: one MQTT connection over mutual TLS to the AWS IoT Core data endpoint.
    Mqtt(Box<MqttUpstream>),
    /// `"greengrass"`: PublishToIoTCore through the Greengrass nucleus's own IoT Core
    /// connection. The default under Greengrass.
    Greengrass(Box<GreengrassUpstream>),
}

/// When the `greengrass` upstream may release a batch's journal rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confirm {
    /// When PublishToIoTCore succeeds. The Java nucleus answers once the message is in its
    /// spooler (in memory by default, 2.5 MiB): a nucleus restart before IoT Core's PUBACK loses
    /// it. Nucleus lite answers once IoT Core acknowledged it.
    Nucleus,
    /// When the cloud's receipt for the batch arrives on `receiptTopic` (an AWS IoT rule
    /// republishes one per batch: `cloud/receipts.yaml`); a batch not receipted within
    /// `receiptTimeoutMs` is sent again. End to end: the recommended setting.
    Cloud,
}

/// The Greengrass IPC upstream: PublishToIoTCore, paced to IoT Core's per-connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GreengrassUpstream {
    /// Topic template; `{thingName}` is substituted. With `confirm: "cloud"` the batch sequence
    /// number is appended as a last level (`.../batches/42`), so the rule can receipt it.
    /// Default `gatehouse/{thingName}/batches`.
    #[serde(default = "default_upstream_topic")]
    pub topic: String,
    /// `"nucleus"` (default) or `"cloud"`: see `Confirm`.
    #[serde(default = "default_confirm")]
    pub confirm: Confirm,
    /// Where the cloud's receipts arrive (`confirm: "cloud"`). Default
    /// `gatehouse/{thingName}/receipts`.
    #[serde(default = "default_receipt_topic")]
    pub receipt_topic: String,
    /// With `confirm: "cloud"`, a batch published this long ago without a receipt is sent
    /// again. Default 60000.
    #[serde(default = "default_receipt_timeout_ms")]
    pub receipt_timeout_ms: Bounded<1_000, 86_400_000>,
    /// The largest IPC frame the nucleus takes. Nucleus lite closes the connection on a frame
    /// over 10,000 bytes; the Java nucleus takes far more (its PublishToIoTCore payload cap is
    /// 128 KiB). Default: 10000 on nucleus lite, detected at start, else 16 MiB.
    #[serde(default)]
    pub max_frame_bytes: Option<Bounded<2_048, 16_777_216>>,
    /// PublishToIoTCore requests awaiting their answer at once. Default 16.
    #[serde(default = "default_greengrass_inflight")]
    pub max_inflight: Bounded<1, 100>,
    /// PUBLISH rate cap. IoT Core allows about 100 per second per connection. Default 100.
    #[serde(default = "default_upstream_publishes_per_sec")]
    pub max_publishes_per_sec: Bounded<1, 100_000>,
    /// Throughput cap in payload bytes per second. IoT Core allows 512 KiB/s. Default 524288.
    #[serde(default = "default_upstream_bytes_per_sec")]
    pub max_bytes_per_sec: Bounded<1_024, 1_073_741_824>,
    /// Retry backoff after a refused or failed publish: exponential with full jitter from
    /// this... Default 1000.
    #[serde(default = "default_reconnect_min_ms")]
    pub retry_min_ms: Bounded<100, 3_600_000>,
    /// ...up to this. Default 60000.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: Bounded<100, 3_600_000>,
    /// A PublishToIoTCore unanswered this long counts as failed. Default 30000.
    #[serde(default = "default_greengrass_ack_timeout_ms")]
    pub ack_timeout_ms: Bounded<1_000, 3_600_000>,
    /// See the mqtt upstream's `maxBatchAttempts`. Default 5.
    #[serde(default = "default_max_batch_attempts")]
    pub max_batch_attempts: Bounded<1, 1_000>,
}

impl GreengrassUpstream {
    pub fn topic_for(&self, thing_name: &str) -> String {
        self.topic.replace("{thingName}", thing_name)
    }

    pub fn receipt_topic_for(&self, thing_name: &str) -> String {
        self.receipt_topic.replace("{thingName}", thing_name)
    }
}

/// MQTT protocol version of the upstream link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MqttVersion {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

/// The MQTT upstream: mutual TLS, paced to IoT Core's per-connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttUpstream {
    /// The broker's host name: the IoT data endpoint (`xxxx-ats.iot.REGION.amazonaws.com`). Also
    /// the TLS server name (SNI and certificate check).
    pub host: String,
    /// 8883 (default), or 443 with ALPN `x-amzn-mqtt-ca`.
    #[serde(default = "default_mqtt_port")]
    pub port: Bounded<1, 65_535>,
    /// PEM file of the CA(s) that sign the broker's certificate (Amazon Root CA 1 for IoT Core).
    /// Absent: the system's trusted roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The device certificate (PEM), with any intermediates after it.
    pub cert_file: PathBuf,
    /// The device private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// MQTT client id. Default: `<thingName>-gatehouse`, so it never clashes with the
    /// Greengrass nucleus, which connects to IoT Core as `<thingName>` (two connections with one
    /// client id disconnect each other). The device's IoT policy must allow `iot:Connect` for it.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic template; `{thingName}` is substituted. At most 256 bytes and 7 slashes after
    /// substitution, no wildcards; a leading `$aws/rules/<rule>/` (Basic Ingest) is not counted.
    #[serde(default = "default_upstream_topic")]
    pub topic: String,
    /// `"3.1.1"` (default) or `"5"`.
    #[serde(default = "default_mqtt_version")]
    pub protocol: MqttVersion,
    /// Offer ALPN `x-amzn-mqtt-ca` (needed for MQTT over port 443). Default: on for port 443.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub alpn: Option<bool>,
    /// An HTTP CONNECT proxy to reach the broker through.
    #[serde(default)]
    pub proxy: Option<ProxyConfig>,
    /// MQTT keep-alive. Default 30 s.
    #[serde(default = "default_upstream_keep_alive")]
    pub keep_alive_secs: Bounded<5, 1_200>,
    /// Batches published and not yet acknowledged, at most. IoT Core allows 100. Default 100.
    #[serde(default = "default_upstream_inflight")]
    pub max_inflight: Bounded<1, 65_535>,
    /// PUBLISH rate cap. IoT Core allows about 100 per second per connection. Default 100.
    #[serde(default = "default_upstream_publishes_per_sec")]
    pub max_publishes_per_sec: Bounded<1, 100_000>,
    /// Throughput cap in payload bytes per second. IoT Core allows 512 KiB/s. Default 524288.
    #[serde(default = "default_upstream_bytes_per_sec")]
    pub max_bytes_per_sec: Bounded<1_024, 1_073_741_824>,
    /// Reconnect backoff: exponential with full jitter from this... Default 1000.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: Bounded<100, 3_600_000>,
    /// ...up to this. Default 120000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: Bounded<100, 3_600_000>,
    /// Watchdog: with batches outstanding and no PUBACK for this long, the link is rebuilt.
    /// Default 20000.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: Bounded<1_000, 3_600_000>,
    /// A batch the upstream refuses, or that ends the connection, every time it is sent alone
    /// while other batches get through, is moved to `dead_letter` after this many attempts, so
    /// it cannot block the link (see `gatehouse dead-letter`). Default 5.
    #[serde(default = "default_max_batch_attempts")]
    pub max_batch_attempts: Bounded<1, 1_000>,
}

/// An outbound HTTP CONNECT proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// `http://host:port`.
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

impl ProxyConfig {
    /// The proxy's host and port, from `url`.
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let rest = self.url.strip_prefix("http://").ok_or_else(|| {
            format!(
                "expected a URL like \"http://proxy:3128\", got {:?}",
                self.url
            )
        })?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("no port in {:?}", self.url))?;
        let port = port
            .parse()
            .map_err(|_| format!("bad port in {:?}", self.url))?;
        if host.is_empty() {
            return Err(format!("no host in {:?}", self.url));
        }
        Ok((host.trim_matches(['[', ']']).to_string(), port))
    }
}

impl MqttUpstream {
    /// The topic with `{thingName}` substituted.
    pub fn topic_for(&self, thing_name: &str) -> String {
        self.topic.replace("{thingName}", thing_name)
    }

    pub fn client_id_for(&self, thing_name: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("{thing_name}-gatehouse"))
    }

    /// ALPN `x-amzn-mqtt-ca`: as configured, else on for port 443.
    pub fn use_alpn(&self) -> bool {
        self.alpn.unwrap_or(self.port.get() == 443)
    }
}

/// Checks an upstream topic against IoT Core's rules; the reason in the user's terms.
pub fn check_iot_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("must not be empty".into());
    }
    if topic.contains(['+', '#']) {
        return Err(format!("{topic:?} contains an MQTT wildcard ('+' or '#')"));
    }
    if topic.contains('{') || topic.contains('}') {
        return Err(format!(
            "{topic:?} has an unknown placeholder (only {{thingName}} is substituted)"
        ));
    }
    // Basic Ingest: "$aws/rules/<rule>/" is not counted against the limits.
    let counted = match topic.strip_prefix("$aws/rules/") {
        Some(rest) => match rest.split_once('/') {
            Some((rule, rest)) if !rule.is_empty() => rest,
            _ => {
                return Err(format!(
                    "{topic:?}: Basic Ingest topics look like $aws/rules/<ruleName>/<topic>"
                ));
            }
        },
        None => topic,
    };
    if counted.len() > 256 {
        return Err(format!(
            "{topic:?} is {} bytes; AWS IoT Core allows at most 256",
            counted.len()
        ));
    }
    let slashes = counted.matches('/').count();
    if slashes > 7 {
        return Err(format!(
            "{topic:?} has {slashes} slashes; AWS IoT Core allows at most 7"
        ));
    }
    Ok(())
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self::Directory {
            path: default_outbox_path(),
            max_inflight: default_directory_inflight(),
        }
    }
}

/// The local admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port`, e.g. `127.0.0.1:9464`.
    pub bind: Bind,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            path: default_journal_path(),
            synchronous: default_synchronous(),
            dedup: default_dedup_mode(),
            dedup_window_secs: default_dedup_window_secs(),
            dedup_max_keys: default_dedup_max_keys(),
            max_bytes: default_journal_max_bytes(),
            commit_max_messages: default_commit_max_messages(),
            commit_max_delay_ms: Bounded::default(),
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_batch_max_bytes(),
            max_messages: default_batch_max_messages(),
            max_delay_ms: default_batch_max_delay_ms(),
            compression: default_compression(),
        }
    }
}

impl BatchConfig {
    pub fn max_delay(&self) -> Duration {
        Duration::from_millis(self.max_delay_ms.get())
    }
}

impl JournalConfig {
    /// The dedup window, or `None` when dedup is off (`dedup: "off"` or a window of 0).
    pub fn dedup_window(&self) -> Option<Duration> {
        match (self.dedup, self.dedup_window_secs.get()) {
            (DedupMode::Off, _) | (_, 0) => None,
            (DedupMode::Agent, secs) => Some(Duration::from_secs(secs)),
        }
    }
}

impl Config {
    /// The embedded defaults: what `gatehouse run` uses without `--config`.
    pub fn embedded() -> Self {
        Self::from_json("{}").expect("embedded defaults are valid")
    }

    /// Reads and validates a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates a JSON document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            ConfigError::Invalid(vec![InvalidKey {
                key: String::new(),
                reason: format!("not valid JSON: {e}"),
            }])
        })?;
        Self::from_value(doc)
    }

    /// Builds and validates a config from a JSON value (a file's content, or recipe parameters).
    pub fn from_value(doc: serde_json::Value) -> Result<Self, ConfigError> {
        let named = doc.get("thingName").is_some();
        // Parsed on its own, so its errors are reported along with the rest.
        let upstream = doc.get("upstream").cloned().map(parse_upstream).transpose();
        let config: Result<Config, _> = typed(doc, "");
        let config = match (config, upstream) {
            (Ok(config), Ok(upstream)) => Config {
                upstream: upstream.unwrap_or_default(),
                thing_name_source: match (named, std::env::var_os("AWS_IOT_THING_NAME")) {
                    (true, _) => ThingNameSource::Config,
                    (false, Some(name)) if !name.is_empty() => ThingNameSource::Environment,
                    (false, _) => ThingNameSource::HostName,
                },
                ..config
            },
            // Report both halves' problems at once.
            (config, upstream) => {
                let errors = [config.err(), upstream.err()]
                    .into_iter()
                    .flatten()
                    .flat_map(|e| match e {
                        ConfigError::Invalid(keys) => keys,
                        ConfigError::Read { .. } => Vec::new(),
                    })
                    .collect();
                return Err(ConfigError::Invalid(errors));
            }
        };
        config.validate()?;
        Ok(config)
    }

    fn validate_mqtt(&self, mqtt: &MqttUpstream, errors: &mut Vec<InvalidKey>) {
        let mut bad = |key: &str, reason: String| {
            errors.push(InvalidKey {
                key: format!("upstream.{key}"),
                reason,
            })
        };
        if mqtt.host.is_empty() {
            bad("host", "must not be empty".into());
        }
        if let Err(reason) = check_iot_topic(&mqtt.topic_for(&self.thing_name)) {
            bad("topic", reason);
        }
        if mqtt.client_id_for(&self.thing_name).is_empty() {
            bad("clientId", "must not be empty".into());
        }
        let files = [
            ("caFile", mqtt.ca_file.as_ref()),
            ("certFile", Some(&mqtt.cert_file)),
            ("keyFile", Some(&mqtt.key_file)),
        ];
        for (key, path) in files {
            if let Some(path) = path
                && let Err(e) = std::fs::metadata(path)
            {
                bad(key, format!("cannot read {}: {e}", path.display()));
            }
        }
        if mqtt.reconnect_min_ms.get() > mqtt.reconnect_max_ms.get() {
            bad(
                "reconnectMaxMs",
                format!(
                    "must not be less than reconnectMinMs ({})",
                    mqtt.reconnect_min_ms.get()
                ),
            );
        }
        if let Some(proxy) = &mqtt.proxy
            && let Err(reason) = proxy.host_port()
        {
            bad("proxy.url", reason);
        }
    }

    /// Cross-field checks that serde cannot express; every problem is reported, not just the first.
    fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if self.listeners.is_empty() {
            errors.push(InvalidKey {
                key: "listeners".into(),
                reason: "at least one listener is required".into(),
            });
        }
        if self.thing_name.is_empty() || self.thing_name.len() > 128 {
            errors.push(InvalidKey {
                key: "thingName".into(),
                reason: format!(
                    "must be 1 to 128 bytes (AWS IoT thing names are), got {} bytes",
                    self.thing_name.len()
                ),
            });
        }
        if let UpstreamConfig::Directory { path, .. } = &self.upstream
            && path.as_os_str().is_empty()
        {
            errors.push(InvalidKey {
                key: "upstream.path".into(),
                reason: "must not be empty".into(),
            });
        }
        if let UpstreamConfig::Mqtt(mqtt) = &self.upstream {
            self.validate_mqtt(mqtt, &mut errors);
        }
        if let UpstreamConfig::Greengrass(gg) = &self.upstream {
            let topic = gg.topic_for(&self.thing_name);
            // With cloud receipts a last level (the batch seq) is appended.
            let checked = match gg.confirm {
                Confirm::Cloud => format!("{topic}/1"),
                Confirm::Nucleus => topic,
            };
            if let Err(reason) = check_iot_topic(&checked) {
                errors.push(InvalidKey {
                    key: "upstream.topic".into(),
                    reason,
                });
            }
            if let Err(reason) = check_iot_topic(&gg.receipt_topic_for(&self.thing_name)) {
                errors.push(InvalidKey {
                    key: "upstream.receiptTopic".into(),
                    reason,
                });
            }
            if gg.retry_min_ms.get() > gg.retry_max_ms.get() {
                errors.push(InvalidKey {
                    key: "upstream.retryMaxMs".into(),
                    reason: format!(
                        "must not be less than retryMinMs ({})",
                        gg.retry_min_ms.get()
                    ),
                });
            }
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            listener.validate_security(&format!("listeners[{i}]"), &mut errors);
        }
        security::validate_acl(&self.acl, &mut errors);
        if self.journal.path.as_os_str().is_empty() {
            errors.push(InvalidKey {
                key: "journal.path".into(),
                reason: "must not be empty".into(),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// Deserializes `value`, naming the key path (below `prefix`) in any error.
fn typed<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    prefix: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = match (prefix.is_empty(), path.as_str()) {
            (true, _) => path,
            (false, ".") => prefix.to_string(),
            (false, _) => format!("{prefix}.{path}"),
        };
        ConfigError::Invalid(vec![InvalidKey {
            key,
            reason: e.into_inner().to_string(),
        }])
    })
}

/// Reads `upstream`: its `kind` selects the shape, and errors keep the full key path.
fn parse_upstream(mut value: serde_json::Value) -> Result<UpstreamConfig, ConfigError> {
    let invalid = |key: &str, reason: String| {
        ConfigError::Invalid(vec![InvalidKey {
            key: key.to_string(),
            reason,
        }])
    };
    let Some(object) = value.as_object_mut() else {
        return Err(invalid(
            "upstream",
            format!("expected an object, got {value}"),
        ));
    };
    let kind = match object.remove("kind") {
        Some(serde_json::Value::String(kind)) => kind,
        Some(other) => {
            return Err(invalid(
                "upstream.kind",
                format!("expected {UPSTREAM_KINDS}, got {other}"),
            ));
        }
        None => {
            return Err(invalid(
                "upstream.kind",
                format!("missing: {UPSTREAM_KINDS}"),
            ));
        }
    };
    match kind.as_str() {
        "directory" => {
            let d: DirectoryUpstream = typed(value, "upstream").map_err(with_kind)?;
            Ok(UpstreamConfig::Directory {
                path: d.path,
                max_inflight: d.max_inflight,
            })
        }
        "mqtt" => Ok(UpstreamConfig::Mqtt(Box::new(
            typed(value, "upstream").map_err(with_kind)?,
        ))),
        "greengrass" => Ok(UpstreamConfig::Greengrass(Box::new(
            typed(value, "upstream").map_err(with_kind)?,
        ))),
        other => Err(invalid(
            "upstream.kind",
            format!("expected {UPSTREAM_KINDS}, got {other:?}"),
        )),
    }
}

/// The values `upstream.kind` takes.
const UPSTREAM_KINDS: &str = r#""directory", "mqtt" or "greengrass""#;

/// Adds `kind` (read before the rest) to serde's list of an upstream's valid keys.
fn with_kind(error: ConfigError) -> ConfigError {
    match error {
        ConfigError::Invalid(keys) => ConfigError::Invalid(
            keys.into_iter()
                .map(|k| InvalidKey {
                    reason: match k.reason.split_once("expected ") {
                        // serde: "expected one of `a`, `b`, ..." or "expected `a` or `b`".
                        Some((head, keys))
                            if keys.starts_with('`') || keys.starts_with("one of ") =>
                        {
                            let keys = keys.strip_prefix("one of ").unwrap_or(keys);
                            format!(
                                "{head}expected one of `kind`, {}",
                                keys.replace(" or ", ", ")
                            )
                        }
                        _ => k.reason,
                    },
                    key: k.key,
                })
                .collect(),
        ),
        other => other,
    }
}

/// The `directory` upstream's keys.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DirectoryUpstream {
    #[serde(default = "default_outbox_path")]
    path: PathBuf,
    #[serde(default = "default_directory_inflight")]
    max_inflight: Bounded<1, 1_000>,
}

/// An integer that must lie in `MIN..=MAX`; its error says so in the user's terms.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Bounded<const MIN: u64, const MAX: u64>(u64);

impl<const MIN: u64, const MAX: u64> Bounded<MIN, MAX> {
    /// # Panics
    /// When `value` is out of range: only for literals in this module.
    pub const fn new(value: u64) -> Self {
        assert!(value >= MIN && value <= MAX);
        Self(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl<const MIN: u64, const MAX: u64> fmt::Debug for Bounded<MIN, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        // Nucleus lite returns a YAML recipe's integers as strings ("42").
        let number = value
            .as_u64()
            .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()));
        match number {
            Some(n) if (MIN..=MAX).contains(&n) => Ok(Self(n)),
            _ => Err(serde::de::Error::custom(format_args!(
                "expected an integer between {MIN} and {MAX}, got {value}"
            ))),
        }
    }
}

/// An optional boolean, also given as the string `"true"` or `"false"` (nucleus lite).
fn lenient_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Bool(b) => Ok(Some(b)),
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) if s == "true" => Ok(Some(true)),
        serde_json::Value::String(s) if s == "false" => Ok(Some(false)),
        other => Err(serde::de::Error::custom(format_args!(
            "expected true or false, got {other}"
        ))),
    }
}

/// A boolean, also given as the string `"true"` or `"false"` (nucleus lite).
fn lenient_flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    lenient_bool(deserializer)?
        .ok_or_else(|| serde::de::Error::custom("expected true or false, got null"))
}

fn yes() -> bool {
    true
}

/// A `host:port` socket address, checked at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind(pub SocketAddr);

impl<'de> Deserialize<'de> for Bind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor(PhantomData<Bind>);
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Bind;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address like \"127.0.0.1:1883\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Bind, E> {
                v.parse().map(Bind).map_err(|_| {
                    E::custom(format_args!(
                        "expected an address like \"127.0.0.1:1883\", got {v:?}"
                    ))
                })
            }
        }
        deserializer.deserialize_str(Visitor(PhantomData))
    }
}

fn default_thing_name() -> String {
    std::env::var("AWS_IOT_THING_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| hostname::get().ok()?.into_string().ok())
        .unwrap_or_else(|| "gatehouse".to_string())
}
fn default_listeners() -> Vec<ListenerConfig> {
    let listener = serde_json::json!({"bind": "127.0.0.1:1883"});
    vec![serde_json::from_value(listener).expect("the default listener is valid")]
}
const fn default_max_packet_size() -> Bounded<64, 268_435_455> {
    Bounded::new(256 * 1024)
}
const fn default_max_inflight() -> Bounded<1, 65_535> {
    Bounded::new(1024)
}
const fn default_connect_timeout_ms() -> Bounded<100, 600_000> {
    Bounded::new(10_000)
}
const fn default_write_timeout_ms() -> Bounded<100, 600_000> {
    Bounded::new(10_000)
}
const fn default_max_stored_sessions() -> Bounded<1, 10_000_000> {
    Bounded::new(100_000)
}
const fn default_session_expiry_secs() -> Bounded<1, 31_536_000> {
    Bounded::new(604_800)
}
const fn default_dedup_mode() -> DedupMode {
    DedupMode::Agent
}
const fn default_max_batch_attempts() -> Bounded<1, 1_000> {
    Bounded::new(5)
}
const fn default_confirm() -> Confirm {
    Confirm::Nucleus
}
fn default_receipt_topic() -> String {
    "gatehouse/{thingName}/receipts".to_string()
}
const fn default_receipt_timeout_ms() -> Bounded<1_000, 86_400_000> {
    Bounded::new(60_000)
}
const fn default_greengrass_inflight() -> Bounded<1, 100> {
    Bounded::new(16)
}
const fn default_retry_max_ms() -> Bounded<100, 3_600_000> {
    Bounded::new(60_000)
}
const fn default_greengrass_ack_timeout_ms() -> Bounded<1_000, 3_600_000> {
    Bounded::new(30_000)
}
fn default_journal_path() -> PathBuf {
    PathBuf::from("./gatehouse-data/journal.db")
}
fn default_outbox_path() -> PathBuf {
    PathBuf::from("./gatehouse-data/outbox")
}
const fn default_synchronous() -> Synchronous {
    Synchronous::Full
}
const fn default_dedup_window_secs() -> Bounded<0, 604_800> {
    Bounded::new(600)
}
const fn default_journal_max_bytes() -> Bounded<65_536, { u64::MAX >> 1 }> {
    Bounded::new(1 << 30)
}
const fn default_dedup_max_keys() -> Bounded<1_000, 100_000_000> {
    Bounded::new(1_000_000)
}
const fn default_commit_max_messages() -> Bounded<1, 100_000> {
    Bounded::new(4096)
}
const fn default_batch_max_bytes() -> Bounded<1024, IOT_CORE_MAX_PAYLOAD> {
    Bounded::new(IOT_CORE_MAX_PAYLOAD)
}
const fn default_batch_max_messages() -> Bounded<1, 1_000_000> {
    Bounded::new(10_000)
}
const fn default_batch_max_delay_ms() -> Bounded<0, 3_600_000> {
    Bounded::new(1000)
}
const fn default_compression() -> Compression {
    Compression::Zstd
}
const fn default_directory_inflight() -> Bounded<1, 1_000> {
    Bounded::new(16)
}
const fn default_mqtt_port() -> Bounded<1, 65_535> {
    Bounded::new(8883)
}
fn default_upstream_topic() -> String {
    "gatehouse/{thingName}/batches".to_string()
}
const fn default_mqtt_version() -> MqttVersion {
    MqttVersion::V311
}
const fn default_upstream_keep_alive() -> Bounded<5, 1_200> {
    Bounded::new(30)
}
const fn default_upstream_inflight() -> Bounded<1, 65_535> {
    Bounded::new(100)
}
const fn default_upstream_publishes_per_sec() -> Bounded<1, 100_000> {
    Bounded::new(100)
}
const fn default_upstream_bytes_per_sec() -> Bounded<1_024, 1_073_741_824> {
    Bounded::new(512 * 1024)
}
const fn default_reconnect_min_ms() -> Bounded<100, 3_600_000> {
    Bounded::new(1_000)
}
const fn default_reconnect_max_ms() -> Bounded<100, 3_600_000> {
    Bounded::new(120_000)
}
const fn default_ack_timeout_ms() -> Bounded<1_000, 3_600_000> {
    Bounded::new(20_000)
}
fn default_log_level() -> String {
    "info".to_string()
}

mod security;
pub use security::{
    AclAction, AclRuleConfig, AuthConfig, AuthKind, IdentityFrom, ListenerTls, OnDenied,
    default_acl, default_handshake_timeout_ms,
};

#[cfg(test)]
mod tests;
