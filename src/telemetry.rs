//! Metric names, their descriptions, and the optional admin listener serving them.
//!
//! Every counter and gauge the gateway keeps is named here, so the set is visible in one place.
//! Labels are bounded (reasons, never client ids or topics).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

pub const CONNECTIONS: &str = "gatehouse_connections";
pub const CONNECTIONS_TOTAL: &str = "gatehouse_connections_total";
pub const MESSAGES_IN: &str = "gatehouse_messages_in_total";
pub const BYTES_IN: &str = "gatehouse_bytes_in_total";
pub const MESSAGES_JOURNALED: &str = "gatehouse_messages_journaled_total";
pub const DUPLICATES_DROPPED: &str = "gatehouse_duplicates_dropped_total";
pub const DEDUP_KEYS: &str = "gatehouse_dedup_keys";
pub const DEDUP_EVICTED_EARLY: &str = "gatehouse_dedup_evicted_early_total";
pub const REFUSALS: &str = "gatehouse_refusals_total";
pub const DISCONNECTS: &str = "gatehouse_disconnects_total";
pub const JOURNAL_ROWS: &str = "gatehouse_journal_rows";
pub const JOURNAL_BYTES: &str = "gatehouse_journal_bytes";
pub const JOURNAL_OLDEST_AGE: &str = "gatehouse_journal_oldest_age_seconds";
pub const JOURNAL_COMMIT_SECONDS: &str = "gatehouse_journal_commit_seconds";
pub const JOURNAL_COMMIT_COMMANDS: &str = "gatehouse_journal_commit_commands";
pub const JOURNAL_WRITE_ERRORS: &str = "gatehouse_journal_write_errors_total";
pub const JOURNAL_QUARANTINED: &str = "gatehouse_journal_quarantined_total";
pub const DEAD_LETTERED: &str = "gatehouse_dead_lettered_total";
pub const BATCHES_OUT: &str = "gatehouse_batches_out_total";
pub const BATCH_RECORDS: &str = "gatehouse_batch_records";
pub const BATCH_BYTES: &str = "gatehouse_batch_bytes";
pub const BATCH_RAW_BYTES_TOTAL: &str = "gatehouse_batch_raw_bytes_total";
pub const BATCH_BYTES_TOTAL: &str = "gatehouse_batch_bytes_total";
pub const COMPRESSION_RATIO: &str = "gatehouse_compression_ratio";
pub const BILLING_UNITS: &str = "gatehouse_billing_units_total";
pub const BATCHES_CONFIRMED: &str = "gatehouse_batches_confirmed_total";
pub const SINK_ERRORS: &str = "gatehouse_sink_errors_total";
pub const UPSTREAM_CONNECTED: &str = "gatehouse_upstream_connected";
pub const UPSTREAM_CONNECTS: &str = "gatehouse_upstream_connects_total";
pub const UPSTREAM_PUBLISHES: &str = "gatehouse_upstream_publishes_total";
pub const UPSTREAM_BYTES: &str = "gatehouse_upstream_bytes_total";
pub const UPSTREAM_ACKS: &str = "gatehouse_upstream_acks_total";
pub const UPSTREAM_ERRORS: &str = "gatehouse_upstream_errors_total";
pub const JOURNAL_EVICTED: &str = "gatehouse_journal_evicted_total";
pub const SINK_INFLIGHT: &str = "gatehouse_sink_inflight_batches";
pub const DROPPED: &str = "gatehouse_dropped_total";
pub const BATCHES_DEAD_LETTERED: &str = "gatehouse_batches_dead_lettered_total";
pub const BATCHES_ADOPTED: &str = "gatehouse_batches_adopted_total";
pub const SESSIONS_STORED: &str = "gatehouse_sessions_stored";
pub const SESSIONS_DISCARDED: &str = "gatehouse_sessions_discarded_total";
pub const WRITE_TIMEOUTS: &str = "gatehouse_agent_write_timeouts_total";
pub const THROTTLED: &str = "gatehouse_throttled_total";

/// Installs the metrics recorder. With an admin address, also serves Prometheus text at
/// `http://ADDR/metrics`. Must run inside the tokio runtime.
pub fn install(admin: Option<SocketAddr>) -> anyhow::Result<()> {
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    if let Some(addr) = admin {
        builder = builder.with_http_listener(addr);
        builder
            .install()
            .map_err(|e| anyhow::anyhow!("metrics.bind: cannot serve metrics on {addr}: {e}"))?;
        tracing::info!(%addr, "Serving metrics.");
    } else {
        // Keep counting (a later admin listener or a test may read it), serve nothing.
        builder.install_recorder()?;
    }
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(CONNECTIONS, "Agent connections open now.");
    describe_counter!(CONNECTIONS_TOTAL, "Agent connections accepted.");
    describe_counter!(MESSAGES_IN, "PUBLISH packets accepted from agents.");
    describe_counter!(BYTES_IN, "Payload bytes accepted from agents.");
    describe_counter!(MESSAGES_JOURNALED, "Records committed to the journal.");
    describe_counter!(
        DUPLICATES_DROPPED,
        "Messages acknowledged but not journaled: seen within the dedup window."
    );
    describe_gauge!(DEDUP_KEYS, "Dedup keys held (seen within the window).");
    describe_counter!(
        DEDUP_EVICTED_EARLY,
        "Dedup keys forgotten before their window ended, to respect journal.dedupMaxKeys."
    );
    describe_counter!(REFUSALS, "Messages or connections refused, by reason.");
    describe_counter!(
        DISCONNECTS,
        "Agent connections closed by the gateway, by reason."
    );
    describe_gauge!(
        JOURNAL_ROWS,
        "Records in the journal awaiting upstream confirmation."
    );
    describe_gauge!(JOURNAL_BYTES, "Bytes those records are charged.");
    describe_histogram!(
        JOURNAL_COMMIT_SECONDS,
        "Time to run and commit one journal group."
    );
    describe_counter!(
        JOURNAL_WRITE_ERRORS,
        "Journal transactions that failed and were rolled back."
    );
    describe_counter!(
        JOURNAL_QUARANTINED,
        "Corrupt journal files moved aside at start-up."
    );
    describe_counter!(
        DEAD_LETTERED,
        "Records moved to dead_letter, undeliverable."
    );
    describe_counter!(BATCHES_OUT, "Batches sealed and handed to the sink.");
    describe_histogram!(BATCH_RECORDS, "Records per batch.");
    describe_histogram!(BATCH_BYTES, "Payload bytes per batch, after compression.");
    describe_counter!(
        BATCH_RAW_BYTES_TOTAL,
        "Uncompressed record-stream bytes batched."
    );
    describe_counter!(BATCH_BYTES_TOTAL, "Batch payload bytes after compression.");
    describe_gauge!(COMPRESSION_RATIO, "Raw/compressed size of the last batch.");
    describe_counter!(
        BILLING_UNITS,
        "IoT Core 5 KB metering units the batches cost."
    );
    describe_counter!(
        BATCHES_CONFIRMED,
        "Batches the sink confirmed; their rows were released."
    );
    describe_counter!(SINK_ERRORS, "Sink failures, by reason.");
    describe_gauge!(
        SINK_INFLIGHT,
        "Batches handed to the sink and not yet confirmed."
    );
    describe_gauge!(
        JOURNAL_OLDEST_AGE,
        "Age in seconds of the oldest record not yet confirmed upstream (0: none)."
    );
    describe_histogram!(
        JOURNAL_COMMIT_COMMANDS,
        "Commands (messages, seals, releases) committed per journal transaction."
    );
    describe_counter!(
        JOURNAL_EVICTED,
        "QoS 0 records evicted unsent because the journal reached journal.maxBytes."
    );
    describe_gauge!(
        UPSTREAM_CONNECTED,
        "1 while the upstream link is connected, else 0."
    );
    describe_counter!(UPSTREAM_CONNECTS, "Upstream connection attempts.");
    describe_counter!(
        UPSTREAM_PUBLISHES,
        "Batches published upstream (re-sends included)."
    );
    describe_counter!(
        UPSTREAM_BYTES,
        "Payload plus topic bytes published upstream (re-sends included)."
    );
    describe_counter!(UPSTREAM_ACKS, "Upstream PUBACKs that confirmed a batch.");
    describe_counter!(UPSTREAM_ERRORS, "Upstream link failures, by cause.");
    describe_counter!(
        DROPPED,
        "Acknowledged messages that will not travel upstream, by reason: duplicate (same agent, topic and payload within journal.dedupWindowSecs), qos0_evicted (journal full)."
    );
    describe_counter!(
        BATCHES_DEAD_LETTERED,
        "Batches the upstream refused or that ended the connection every time, moved to dead_letter."
    );
    describe_counter!(
        BATCHES_ADOPTED,
        "Unconfirmed batches sealed for another upstream kind, handed to the current one at start."
    );
    describe_gauge!(
        SESSIONS_STORED,
        "Persistent sessions of disconnected agents held now."
    );
    describe_counter!(
        SESSIONS_DISCARDED,
        "Stored sessions discarded, by reason: expired, over sessions.maxStored."
    );
    describe_counter!(
        WRITE_TIMEOUTS,
        "Agents disconnected because a write to them waited past writeTimeoutMs."
    );
    describe_counter!(
        THROTTLED,
        "Times a rate limit held traffic back: what=connections (listeners[].connectionsPerSec), \
         what=publishes (listeners[].publishesPerSec, per agent)."
    );
}

/// The few figures the periodic summary log reports, kept beside the metrics (which cannot be
/// read back). Updated where the matching metric is.
pub struct Progress {
    pub agents_connected: AtomicI64,
    pub messages_in: AtomicU64,
    pub batches_delivered: AtomicU64,
    pub backlog_records: AtomicU64,
    pub oldest_unsent_secs: AtomicU64,
    /// `UPSTREAM_UNKNOWN`, `UPSTREAM_UP` or `UPSTREAM_DOWN`.
    pub upstream: std::sync::atomic::AtomicU8,
}

pub const UPSTREAM_UNKNOWN: u8 = 0;
pub const UPSTREAM_UP: u8 = 1;
pub const UPSTREAM_DOWN: u8 = 2;

pub static PROGRESS: Progress = Progress {
    agents_connected: AtomicI64::new(0),
    messages_in: AtomicU64::new(0),
    batches_delivered: AtomicU64::new(0),
    backlog_records: AtomicU64::new(0),
    oldest_unsent_secs: AtomicU64::new(0),
    upstream: std::sync::atomic::AtomicU8::new(UPSTREAM_UNKNOWN),
};

/// A moment's reading of `PROGRESS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Reading {
    agents: i64,
    messages_in: u64,
    delivered: u64,
    backlog: u64,
    oldest_secs: u64,
    upstream: u8,
}

impl Progress {
    fn read(&self) -> Reading {
        Reading {
            agents: self.agents_connected.load(Ordering::Relaxed),
            messages_in: self.messages_in.load(Ordering::Relaxed),
            delivered: self.batches_delivered.load(Ordering::Relaxed),
            backlog: self.backlog_records.load(Ordering::Relaxed),
            oldest_secs: self.oldest_unsent_secs.load(Ordering::Relaxed),
            upstream: self.upstream.load(Ordering::Relaxed),
        }
    }
}

/// Logs one summary line every `every` when something changed since the last one: agents
/// connected, messages in and batches delivered since, the backlog and its oldest record's age,
/// and the upstream's state. Runs until dropped.
pub async fn summarize(every: std::time::Duration) {
    let mut last = PROGRESS.read();
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let now = PROGRESS.read();
        // The age alone moving is not news.
        let news = Reading {
            oldest_secs: last.oldest_secs,
            ..now
        } != last;
        if !news {
            continue;
        }
        let upstream = match now.upstream {
            UPSTREAM_UP => "connected",
            UPSTREAM_DOWN => "down",
            _ => "not a network link",
        };
        tracing::info!(
            "Summary: {} agents connected; {} messages in and {} batches delivered in the last {} s; backlog {} records, oldest {} s; upstream {upstream}.",
            now.agents,
            now.messages_in.saturating_sub(last.messages_in),
            now.delivered.saturating_sub(last.delivered),
            every.as_secs(),
            now.backlog,
            now.oldest_secs,
        );
        last = now;
    }
}

/// Lets a repeated log line through at most once per period, and counts what it held back, so
/// a storm of refusals or failures cannot flood the component log. Use one `static` per site.
pub struct Throttle {
    period_ms: i64,
    /// When the line last went out, in ms since the epoch (0: never).
    last: AtomicI64,
    held_back: AtomicU64,
}

impl Throttle {
    pub const fn new(period_ms: i64) -> Self {
        Self {
            period_ms,
            last: AtomicI64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last one)` when this occurrence may be logged.
    pub fn ready(&self) -> Option<u64> {
        let now = crate::record::now_ms();
        let last = self.last.load(Ordering::Relaxed);
        if now - last >= self.period_ms
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn every_metric_has_help_text() {
        let source = include_str!("telemetry.rs");
        let squeezed: String = source.chars().filter(|c| !c.is_whitespace()).collect();
        let missing: Vec<&str> = source
            .lines()
            .filter_map(|line| line.strip_prefix("pub const "))
            .filter_map(|rest| rest.split_once(": &str"))
            .map(|(name, _)| name)
            .filter(|name| !squeezed.contains(&format!("!({name},")))
            .collect();
        assert!(missing.is_empty(), "no describe_*! for {missing:?}");
    }

    #[test]
    fn throttle_lets_one_through_per_period_and_counts_the_rest() {
        let throttle = Throttle::new(60_000);
        assert_eq!(throttle.ready(), Some(0));
        assert_eq!(throttle.ready(), None);
        assert_eq!(throttle.ready(), None);
        let quick = Throttle::new(0);
        assert_eq!(quick.ready(), Some(0));
        assert_eq!(quick.ready(), Some(0));
    }
}
