//! The upstream batch payload: a versioned envelope around compressed records (spec: docs/ENVELOPE.md).
//!
//! Guarantees:
//! - `pack` never returns a payload above its byte budget, for any input, incompressible included,
//!   as long as the first record passes `Budget::fits_alone` (the listener refuses any that do
//!   not).
//! - Encoding is deterministic; `decode` detects truncation and corruption (the header carries the
//!   CRC-32 of the uncompressed record stream) and says which.

use std::io::{Read, Write};

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::Compression;
use crate::record::{JournaledRecord, Record, RecordProperties};

/// The first four bytes of every batch payload.
pub const MAGIC: &[u8; 4] = b"GHB1";
/// Envelope format version, in the header.
pub const VERSION: u32 = 1;

/// The batch header: what a cloud consumer needs to route, dedup and decode the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    pub version: u32,
    /// The gateway (thing) name.
    pub gateway: String,
    /// Stable across retries and restarts: (gateway, batchSeq) identifies a batch.
    pub batch_seq: u64,
    pub count: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub codec: Codec,
    /// When the batch was sealed, ms since the epoch.
    pub created_at: i64,
    /// Length of the uncompressed record stream.
    pub raw_bytes: u64,
    /// CRC-32 (IEEE) of the uncompressed record stream.
    pub raw_crc32: u32,
}

/// The body codec, as named in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    Zstd,
    Gzip,
    None,
}

impl From<Compression> for Codec {
    fn from(c: Compression) -> Self {
        match c {
            Compression::Zstd => Codec::Zstd,
            Compression::Gzip => Codec::Gzip,
            Compression::None => Codec::None,
        }
    }
}

/// Per-record metadata, the JSON part of each record in the stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordMeta {
    seq: u64,
    client_id: String,
    topic: String,
    qos: u8,
    received_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    user_properties: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a Gatehouse batch: missing the \"GHB1\" magic")]
    BadMagic,
    #[error("truncated batch: {0}")]
    Truncated(&'static str),
    #[error("corrupt batch header: {0}")]
    Header(serde_json::Error),
    #[error("unsupported envelope version {0} (this decoder reads version {VERSION})")]
    Version(u32),
    #[error("corrupt batch body: {0} decompression failed: {1}")]
    Body(&'static str, std::io::Error),
    #[error("corrupt batch body: CRC-32 {actual:08x} does not match header {expected:08x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("corrupt record #{index}: {reason}")]
    Record { index: usize, reason: String },
    #[error("header says {expected} records, body holds {actual}")]
    Count { expected: u32, actual: usize },
}

/// Appends one record's encoding to `out`: `u32 meta_len | meta JSON | u32 payload_len | payload`.
fn encode_record(out: &mut Vec<u8>, rec: &JournaledRecord) {
    let r = &rec.record;
    let meta = RecordMeta {
        seq: rec.seq,
        client_id: r.client_id.clone(),
        topic: r.topic.clone(),
        qos: r.qos,
        received_at: r.received_at_ms,
        content_type: r.properties.content_type.clone(),
        user_properties: r.properties.user_properties.clone(),
        expires_at: r.properties.expires_at_ms,
    };
    let meta = serde_json::to_vec(&meta).expect("record metadata serializes");
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&(r.payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&r.payload);
}

/// The encoded size of a record in the (uncompressed) record stream.
pub fn encoded_len(rec: &JournaledRecord) -> usize {
    let mut out = Vec::new();
    encode_record(&mut out, rec);
    out.len()
}

/// An upper bound on what `codec` may produce from `raw` bytes, whatever they hold. zstd's is
/// `ZSTD_COMPRESSBOUND` plus its frame header and checksum; deflate's is zlib's
/// `deflateBound` with a margin for the stored-block fallback, plus the gzip wrapper.
pub fn compress_bound(codec: Codec, raw: usize) -> usize {
    match codec {
        Codec::None => raw,
        Codec::Zstd => {
            let small = if raw < 128 * 1024 {
                (128 * 1024 - raw) >> 11
            } else {
                0
            };
            raw + (raw >> 8) + small + 32
        }
        Codec::Gzip => raw + (raw >> 6) + 64,
    }
}

/// The most bytes the magic, header length and header can take for this gateway.
pub fn header_reserve(gateway: &str) -> usize {
    let widest = Header {
        version: VERSION,
        gateway: gateway.to_string(),
        batch_seq: u64::MAX,
        count: u32::MAX,
        first_seq: u64::MAX,
        last_seq: u64::MAX,
        codec: Codec::Zstd,
        created_at: i64::MIN,
        raw_bytes: u64::MAX,
        raw_crc32: u32::MAX,
    };
    8 + serde_json::to_vec(&widest)
        .expect("header serializes")
        .len()
}

/// How an ingest check knows a record can always be batched: the batch budget after the
/// header, and the codec.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// `batch.maxBytes` minus `header_reserve`.
    pub body_bytes: usize,
    pub codec: Codec,
}

impl Budget {
    pub fn new(max_bytes: usize, gateway: &str, codec: Codec) -> Self {
        Self {
            body_bytes: max_bytes.saturating_sub(header_reserve(gateway)),
            codec,
        }
    }

    /// Whether a record alone is sure to fit in a batch, whatever its content.
    pub fn fits_alone(&self, rec: &JournaledRecord) -> bool {
        // Cheap first: a bound on the encoded size (JSON escapes at most 6 bytes per input
        // byte, plus the fixed keys and numbers); only a near miss pays for the exact encoding.
        let r = &rec.record;
        let text = r.client_id.len()
            + r.topic.len()
            + r.properties.content_type.as_ref().map_or(0, String::len)
            + r.properties
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 6)
                .sum::<usize>();
        let bound = 8 + r.payload.len() + 6 * text + 256;
        compress_bound(self.codec, bound) <= self.body_bytes
            || compress_bound(self.codec, encoded_len(rec)) <= self.body_bytes
    }
}

fn compress(codec: Codec, raw: &[u8]) -> Vec<u8> {
    match codec {
        Codec::None => raw.to_vec(),
        Codec::Zstd => {
            let mut enc = zstd::Encoder::new(Vec::new(), 3).expect("zstd encoder");
            enc.include_checksum(true).expect("zstd option");
            enc.write_all(raw).expect("write to memory");
            enc.finish().expect("zstd finish in memory")
        }
        Codec::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            enc.write_all(raw).expect("write to memory");
            enc.finish().expect("gzip finish in memory")
        }
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// The batch-level facts `pack` needs besides the records.
#[derive(Debug, Clone)]
pub struct BatchIdentity {
    pub gateway: String,
    pub batch_seq: u64,
    pub codec: Codec,
    pub created_at: i64,
}

/// A sealed batch payload and what it covers.
#[derive(Debug, Clone)]
pub struct Packed {
    pub payload: Bytes,
    pub header: Header,
    /// How many of the offered records it holds (a prefix).
    pub count: usize,
}

fn assemble(id: &BatchIdentity, records: &[JournaledRecord], raw: &[u8]) -> Packed {
    let body = compress(id.codec, raw);
    let header = Header {
        version: VERSION,
        gateway: id.gateway.clone(),
        batch_seq: id.batch_seq,
        count: records.len() as u32,
        first_seq: records.first().map_or(0, |r| r.seq),
        last_seq: records.last().map_or(0, |r| r.seq),
        codec: id.codec,
        created_at: id.created_at,
        raw_bytes: raw.len() as u64,
        raw_crc32: crc32(raw),
    };
    let header_json = serde_json::to_vec(&header).expect("header serializes");
    let mut payload = Vec::with_capacity(8 + header_json.len() + body.len());
    payload.extend_from_slice(MAGIC);
    payload.extend_from_slice(&(header_json.len() as u32).to_be_bytes());
    payload.extend_from_slice(&header_json);
    payload.extend_from_slice(&body);
    Packed {
        payload: payload.into(),
        header,
        count: records.len(),
    }
}

/// Packs the longest prefix of `records` whose payload fits in `max_bytes`.
///
/// Returns `None` only when not even the first record fits (see `fits_alone`). Compression is
/// tried a few times: first on everything, then on prefixes guessed from the observed ratio,
/// narrowing like a bisection, so the result is the longest fitting prefix found in at most a
/// dozen compressions.
pub fn pack(id: &BatchIdentity, records: &[JournaledRecord], max_bytes: usize) -> Option<Packed> {
    pack_with_hint(id, records, max_bytes, None)
}

/// `pack`, starting from the prefix a known compression ratio (uncompressed record-stream bytes
/// per payload byte, e.g. the last batch's) predicts will fill the budget: with a good hint one
/// or two compressions suffice instead of compressing the whole buffer first.
pub fn pack_with_hint(
    id: &BatchIdentity,
    records: &[JournaledRecord],
    max_bytes: usize,
    ratio_hint: Option<f64>,
) -> Option<Packed> {
    if records.is_empty() {
        return None;
    }
    // ends[i] = raw length of the first i+1 records.
    let mut raw = Vec::new();
    let mut ends = Vec::with_capacity(records.len());
    for rec in records {
        encode_record(&mut raw, rec);
        ends.push(raw.len());
    }
    let try_prefix = |n: usize| -> Packed { assemble(id, &records[..n], &raw[..ends[n - 1]]) };

    // Guaranteed fit: skip the trial compressions.
    if compress_bound(id.codec, raw.len()) + header_reserve(&id.gateway) <= max_bytes {
        return Some(try_prefix(records.len()));
    }
    let mut best: Option<Packed> = None;
    let (mut lo, mut hi) = (0usize, records.len() + 1); // lo fits (0 trivially), hi does not.
    let mut n = match ratio_hint {
        Some(ratio) if ratio > 0.0 => {
            let target_raw = (max_bytes as f64 * ratio * 0.97) as usize;
            ends.partition_point(|&end| end <= target_raw)
                .clamp(1, records.len())
        }
        _ => records.len(),
    };
    for _ in 0..12 {
        let packed = try_prefix(n);
        let size = packed.payload.len();
        if size <= max_bytes {
            lo = n;
            best = Some(packed);
            // Within 2% of the budget is as full as it is worth trying for.
            if size * 50 >= max_bytes * 49 {
                break;
            }
        } else {
            hi = n;
        }
        if hi - lo <= 1 {
            break;
        }
        // Guess the prefix whose raw size scales to the budget at this ratio, kept strictly
        // inside (lo, hi) so every step narrows the range.
        let target_raw = (ends[n - 1] as f64 * (max_bytes as f64 / size as f64) * 0.98) as usize;
        let guess = ends.partition_point(|&end| end <= target_raw);
        n = guess.clamp(lo + 1, hi - 1);
    }
    if best.is_none() && lo == 0 && hi > 1 {
        // The loop ran out of tries without a fit; fall back to the one-record batch.
        let packed = try_prefix(1);
        if packed.payload.len() <= max_bytes {
            best = Some(packed);
        }
    }
    best
}

/// One decoded record, as `gatehouse decode` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRecord {
    pub seq: u64,
    pub record: Record,
}

/// Reads a batch payload back into its header and records.
pub fn decode(payload: &[u8]) -> Result<(Header, Vec<DecodedRecord>), DecodeError> {
    if payload.len() < 4 {
        return Err(if MAGIC.starts_with(payload) {
            DecodeError::Truncated("shorter than the magic")
        } else {
            DecodeError::BadMagic
        });
    }
    if &payload[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let header_len = read_u32(payload, 4).ok_or(DecodeError::Truncated("no header length"))?;
    let header_end = 8usize
        .checked_add(header_len as usize)
        .filter(|&end| end <= payload.len())
        .ok_or(DecodeError::Truncated("header cut short"))?;
    let header: Header =
        serde_json::from_slice(&payload[8..header_end]).map_err(DecodeError::Header)?;
    if header.version != VERSION {
        return Err(DecodeError::Version(header.version));
    }
    let body = &payload[header_end..];
    let raw = match header.codec {
        Codec::None => body.to_vec(),
        Codec::Zstd => {
            read_all(zstd::Decoder::new(body).map_err(|e| DecodeError::Body("zstd", e))?)
                .map_err(|e| DecodeError::Body("zstd", e))?
        }
        Codec::Gzip => read_all(flate2::read::GzDecoder::new(body))
            .map_err(|e| DecodeError::Body("gzip", e))?,
    };
    if raw.len() as u64 != header.raw_bytes {
        return Err(DecodeError::Truncated(
            "record stream shorter than the header says",
        ));
    }
    let actual = crc32(&raw);
    if actual != header.raw_crc32 {
        return Err(DecodeError::Checksum {
            expected: header.raw_crc32,
            actual,
        });
    }
    let records = decode_records(&raw)?;
    if records.len() != header.count as usize {
        return Err(DecodeError::Count {
            expected: header.count,
            actual: records.len(),
        });
    }
    Ok((header, records))
}

fn read_all(mut reader: impl Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader.read_to_end(&mut out)?;
    Ok(out)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let slice = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(slice.try_into().ok()?))
}

fn decode_records(raw: &[u8]) -> Result<Vec<DecodedRecord>, DecodeError> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let index = records.len();
        let bad = |reason: &str| DecodeError::Record {
            index,
            reason: reason.to_string(),
        };
        let meta_len = read_u32(raw, at).ok_or_else(|| bad("metadata length cut short"))? as usize;
        at += 4;
        let meta_bytes = raw
            .get(at..at + meta_len)
            .ok_or_else(|| bad("metadata cut short"))?;
        let meta: RecordMeta =
            serde_json::from_slice(meta_bytes).map_err(|e| bad(&format!("metadata: {e}")))?;
        at += meta_len;
        let payload_len =
            read_u32(raw, at).ok_or_else(|| bad("payload length cut short"))? as usize;
        at += 4;
        let payload = raw
            .get(at..at + payload_len)
            .ok_or_else(|| bad("payload cut short"))?;
        at += payload_len;
        records.push(DecodedRecord {
            seq: meta.seq,
            record: Record {
                received_at_ms: meta.received_at,
                client_id: meta.client_id,
                topic: meta.topic,
                qos: meta.qos,
                payload: Bytes::copy_from_slice(payload),
                properties: RecordProperties {
                    content_type: meta.content_type,
                    user_properties: meta.user_properties,
                    expires_at_ms: meta.expires_at,
                },
            },
        });
    }
    Ok(records)
}

/// One record as the JSON line `gatehouse decode` prints.
pub fn record_json(rec: &DecodedRecord) -> serde_json::Value {
    let r = &rec.record;
    let mut obj = serde_json::json!({
        "seq": rec.seq,
        "clientId": r.client_id,
        "topic": r.topic,
        "qos": r.qos,
        "receivedAt": r.received_at_ms,
    });
    let map = obj.as_object_mut().expect("object");
    match std::str::from_utf8(&r.payload) {
        Ok(text) => map.insert("payload".into(), text.into()),
        Err(_) => map.insert(
            "payloadBase64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(&r.payload)
                .into(),
        ),
    };
    if let Some(ct) = &r.properties.content_type {
        map.insert("contentType".into(), ct.clone().into());
    }
    if !r.properties.user_properties.is_empty() {
        map.insert(
            "userProperties".into(),
            serde_json::to_value(&r.properties.user_properties).expect("pairs serialize"),
        );
    }
    if let Some(at) = r.properties.expires_at_ms {
        map.insert("expiresAt".into(), at.into());
    }
    obj
}

#[cfg(test)]
mod tests;
