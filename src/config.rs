//! The configuration model: one typed tree, validated all at once before any socket is bound.
//!
//! The same `Config` is read from a JSON file (`gatehouse run --config FILE`), from the embedded
//! defaults (no file), and later from Greengrass recipe parameters. Keys are camelCase; unknown
//! keys and bad values are errors whose message starts with the key path, e.g.
//! `batch.maxBytes: expected an integer between 1024 and 131072, got "lots"`.

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
    /// Where agents connect. Default: one plain-TCP listener on 127.0.0.1:1883.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// `error`, `warn`, `info` (default), `debug`, `trace`, or any `tracing` filter directive.
    /// `RUST_LOG`, when set, wins.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The optional local admin listener serving Prometheus metrics at `/metrics`.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
}

/// One agent listener (plain MQTT over TCP).
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
    /// A message whose topic+payload was seen within this many seconds is acknowledged but not
    /// journaled again. 0 disables dedup. Default 600.
    #[serde(default = "default_dedup_window_secs")]
    pub dedup_window_secs: Bounded<0, 604_800>,
    /// Dedup keys held at most (about 40 bytes of memory each). Past it the oldest keys are
    /// forgotten before their window ends (counted), so a late duplicate may be journaled again;
    /// nothing is dropped. Default 1,000,000: a full 10-minute window up to ~1,600 msg/s.
    #[serde(default = "default_dedup_max_keys")]
    pub dedup_max_keys: Bounded<1_000, 100_000_000>,
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

/// Where batches go.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum UpstreamConfig {
    /// Each batch is one file in `path`, named by batch sequence number. The embedded default.
    Directory {
        #[serde(default = "default_outbox_path")]
        path: PathBuf,
        /// Batches handed to the sink and not yet confirmed, at most. Default 16.
        #[serde(default = "default_directory_inflight", rename = "maxInflight")]
        max_inflight: Bounded<1, 1_000>,
    },
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
            dedup_window_secs: default_dedup_window_secs(),
            dedup_max_keys: default_dedup_max_keys(),
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
    pub fn dedup_window(&self) -> Option<Duration> {
        match self.dedup_window_secs.get() {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
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
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let reason = e.inner().to_string();
            // serde_json appends " at line L column C"; the key path says more.
            let reason = match reason.rfind(" at line ") {
                Some(at) => reason[..at].to_string(),
                None => reason,
            };
            ConfigError::Invalid(vec![InvalidKey { key, reason }])
        })?;
        config.validate()?;
        Ok(config)
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
        if self.thing_name.is_empty() {
            errors.push(InvalidKey {
                key: "thingName".into(),
                reason: "must not be empty".into(),
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
        match value.as_u64() {
            Some(n) if (MIN..=MAX).contains(&n) => Ok(Self(n)),
            _ => Err(serde::de::Error::custom(format_args!(
                "expected an integer between {MIN} and {MAX}, got {value}"
            ))),
        }
    }
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
    vec![ListenerConfig {
        bind: Bind(([127, 0, 0, 1], 1883).into()),
        max_packet_size: default_max_packet_size(),
        max_inflight: default_max_inflight(),
        connect_timeout_ms: default_connect_timeout_ms(),
    }]
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
fn default_log_level() -> String {
    "info".to_string()
}

#[cfg(test)]
mod tests;
