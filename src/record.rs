//! The domain's unit of data: one agent message, as the listener accepted it and the journal keeps it.
//!
//! Everything downstream of the listener sees `Record`s, never MQTT packets.

use bytes::Bytes;

/// One message an agent published, before it has a journal sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When the listener accepted it, in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The MQTT client id of the agent that sent it.
    pub client_id: String,
    /// The MQTT topic it was published to.
    pub topic: String,
    /// The QoS the agent published with (0, 1 or 2).
    pub qos: u8,
    pub payload: Bytes,
    /// MQTT 5 properties that matter downstream; empty for MQTT 3.1.1.
    pub properties: RecordProperties,
}

/// MQTT 5 publish properties carried to the cloud.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordProperties {
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
    /// When the message stops being worth delivering, in ms since the epoch (from Message Expiry
    /// Interval).
    pub expires_at_ms: Option<i64>,
}

/// A record the journal committed, with its journal sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournaledRecord {
    /// Journal sequence number: strictly increasing in commit order, never reused.
    pub seq: u64,
    pub record: Record,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
