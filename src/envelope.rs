//! The upstream batch payload: a versioned envelope around compressed records (spec: docs/ENVELOPE.md).
//!
//! Two kinds of batch share the layout: version 1 holds whole records (every batch `pack` seals,
//! byte for byte as before fragments existed); version 2 holds exactly one *fragment* of one
//! record too large for a payload (`fragments`). `decode` reads both; `Reassembler` puts a
//! fragmented record back together.
//!
//! Guarantees:
//! - `pack` never returns a payload above its byte budget, for any input, incompressible included,
//!   and packs whole records only; it packs a first record that passes `Budget::fits_whole`.
//! - `fragments` never returns a payload above its byte budget either, whatever the record's
//!   payload holds, and uses the fewest batches that guarantee it; it fails only when the
//!   record's metadata leaves no room for a byte of payload (`Budget::carries` says so up front).
//! - Encoding is deterministic; `decode` detects truncation and corruption (the header carries the
//!   CRC-32 of the uncompressed record stream) and says which; `Reassembler` checks a
//!   reassembled payload's length and SHA-256.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Compression;
use crate::record::{JournaledRecord, Record, RecordProperties};

/// The first four bytes of every batch payload, whatever its version.
pub const MAGIC: &[u8; 4] = b"GHB1";
/// Envelope version of a batch of whole records, in the header: every batch `pack` seals.
pub const VERSION: u32 = 1;
/// Envelope version of a fragment batch: one fragment of one record (`fragments`).
pub const VERSION_FRAGMENT: u32 = 2;

/// The batch header: what a cloud consumer needs to route, dedup and decode the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// `VERSION` (whole records) or `VERSION_FRAGMENT` (one fragment).
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
    /// Version 2 only; absent from version 1 metadata, so version 1 bytes are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fragment: Option<FragmentMeta>,
}

/// The `fragment` object of a version 2 record's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FragmentMeta {
    index: u32,
    count: u32,
    /// Lowercase hex.
    sha256: String,
    size: u64,
}

/// Where a fragment record's chunk sits in the whole record, and how to check the whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// 0-based position of this chunk among the record's fragments.
    pub index: u32,
    /// How many fragments the record was split into (at least 1).
    pub count: u32,
    /// SHA-256 of the whole payload.
    pub sha256: [u8; 32],
    /// Length of the whole payload.
    pub size: u64,
}

impl Fragment {
    fn to_meta(self) -> FragmentMeta {
        FragmentMeta {
            index: self.index,
            count: self.count,
            sha256: hex(&self.sha256),
            size: self.size,
        }
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
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
    #[error(
        "unsupported envelope version {0} (this decoder reads versions {VERSION} and {VERSION_FRAGMENT})"
    )]
    Version(u32),
    #[error("corrupt batch body: {0} decompression failed: {1}")]
    Body(&'static str, std::io::Error),
    #[error("corrupt batch body: CRC-32 {actual:08x} does not match header {expected:08x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("corrupt record #{index}: {reason}")]
    Record { index: usize, reason: String },
    #[error("header says {expected} records, body holds {actual}")]
    Count { expected: u32, actual: usize },
    #[error(
        "header claims a {0}-byte record stream, over the decoder's {MAX_RAW_BYTES}-byte limit"
    )]
    TooLarge(u64),
    /// A version 2 batch that is not exactly one well-formed fragment, or a version 1 batch
    /// holding a fragment.
    #[error("malformed fragment batch: {0}")]
    Fragment(String),
}

/// A record's metadata JSON, with the `fragment` object when given.
fn meta_json(rec: &JournaledRecord, fragment: Option<Fragment>) -> Vec<u8> {
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
        fragment: fragment.map(Fragment::to_meta),
    };
    serde_json::to_vec(&meta).expect("record metadata serializes")
}

/// Appends `u32 meta_len | meta | u32 payload_len | payload` to `out`.
fn encode_parts(out: &mut Vec<u8>, meta: &[u8], payload: &[u8]) {
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends one whole record's encoding to `out`: `u32 meta_len | meta JSON | u32 payload_len | payload`.
fn encode_record(out: &mut Vec<u8>, rec: &JournaledRecord) {
    encode_parts(out, &meta_json(rec, None), &rec.record.payload);
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

/// The most bytes the magic, header length and header can take for this gateway, in a batch of
/// either version.
pub fn header_reserve(gateway: &str) -> usize {
    let widest = Header {
        version: VERSION.max(VERSION_FRAGMENT),
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

/// How an ingest check knows a record can always be sent: the batch budget after the header,
/// and the codec.
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

    /// Whether a record alone is sure to fit *whole* in a batch, whatever its content: `pack`
    /// then always packs it when it is first. A record for which this is false may still pack
    /// (when it compresses well); when `pack` returns `None` for it, it needs `fragments`.
    pub fn fits_whole(&self, rec: &JournaledRecord) -> bool {
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

    /// `fits_whole`, under its original name: the listener's ingest check as long as the batcher
    /// sends whole records only. Once the batcher sends fragments, ingest should refuse only
    /// what `carries` rejects.
    pub fn fits_alone(&self, rec: &JournaledRecord) -> bool {
        self.fits_whole(rec)
    }

    /// Whether a record can be sent at all, whole or in fragments, whatever its payload's size
    /// and content: false only when its metadata (client id, topic, properties) leaves no room
    /// for a byte of payload in a fragment batch. When true, the record fits whole
    /// (`fits_whole`) or `fragments` succeeds for it with the `max_bytes` and gateway this budget
    /// was made from.
    pub fn carries(&self, rec: &JournaledRecord) -> bool {
        if self.fits_whole(rec) {
            return true;
        }
        // The widest `fragment` object any split can have, so the answer holds for every count.
        let widest = Fragment {
            index: u32::MAX,
            count: u32::MAX,
            sha256: [0; 32],
            size: u64::MAX,
        };
        let meta_len = meta_json(rec, Some(widest)).len();
        rec.record.payload.len() as u64 <= u64::from(u32::MAX)
            && chunk_capacity(self.codec, self.body_bytes, meta_len) >= 1
    }
}

/// The largest chunk a fragment record with `meta_len` bytes of metadata can carry in
/// `body_bytes` (the batch budget after `header_reserve`), whatever the chunk's bytes; 0 when
/// not even an empty chunk fits.
fn chunk_capacity(codec: Codec, body_bytes: usize, meta_len: usize) -> usize {
    let fits = |chunk: usize| compress_bound(codec, 8 + meta_len + chunk) <= body_bytes;
    if !fits(0) {
        return 0;
    }
    // compress_bound is non-decreasing and at least its input: fits(lo), !fits(hi).
    let (mut lo, mut hi) = (0usize, body_bytes + 1);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
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
    /// How many of the offered records it holds (a prefix). For a fragment batch, 1: the record
    /// it carries a piece of, which is only all sent once every one of its fragment batches is.
    pub count: usize,
    /// `Some` for a fragment batch (version 2): which piece of the record it carries.
    pub fragment: Option<Fragment>,
}

/// The header and payload of a batch whose uncompressed record stream is `raw`.
fn seal(
    id: &BatchIdentity,
    version: u32,
    count: u32,
    (first_seq, last_seq): (u64, u64),
    raw: &[u8],
) -> (Header, Bytes) {
    let body = compress(id.codec, raw);
    let header = Header {
        version,
        gateway: id.gateway.clone(),
        batch_seq: id.batch_seq,
        count,
        first_seq,
        last_seq,
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
    (header, payload.into())
}

fn assemble(id: &BatchIdentity, records: &[JournaledRecord], raw: &[u8]) -> Packed {
    let seqs = (
        records.first().map_or(0, |r| r.seq),
        records.last().map_or(0, |r| r.seq),
    );
    let (header, payload) = seal(id, VERSION, records.len() as u32, seqs, raw);
    Packed {
        payload,
        header,
        count: records.len(),
        fragment: None,
    }
}

/// Packs the longest prefix of `records` whose payload fits in `max_bytes`: a version 1 batch of
/// whole records.
///
/// Returns `None` only when not even the first record fits whole (it always does when
/// `Budget::fits_whole` says so); that record then travels as `fragments`. Compression is
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

/// Why a record cannot be split into fragment batches.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// The budget cannot hold the record's metadata plus one byte of payload (see
    /// `Budget::carries`).
    #[error(
        "record {seq}: a {max_bytes}-byte batch cannot hold one byte of its payload next to its {metadata_bytes} bytes of metadata"
    )]
    BudgetTooSmall {
        seq: u64,
        max_bytes: usize,
        metadata_bytes: usize,
    },
    /// `refragments` was asked for more fragments than the payload has bytes.
    #[error(
        "record {seq}: its {size}-byte payload cannot be split into {count} non-empty fragments"
    )]
    TooManyFragments { seq: u64, size: u64, count: u64 },
}

/// Splits a record too large for one payload into the fewest fragment batches (version 2, one
/// fragment each) that are each at most `max_bytes` whatever the payload holds, incompressible
/// included. Batch `i` (0-based) gets `batch_seq` `id_first.batch_seq + i`; all share
/// `id_first`'s gateway, codec and `created_at`.
///
/// The split depends only on the payload's length, the metadata, the gateway, the codec and
/// `max_bytes`, never on how well the content compresses: no trial compressions, and the same
/// inputs give the same bytes. Chunks differ in length by at most one byte, longest first.
///
/// Meant for a record `pack` cannot pack whole (it returns `None` with the record first); it
/// works for any record, a small one giving a single fragment. Fails only when `max_bytes`
/// cannot carry the record's metadata plus a 1-byte chunk (`Budget::carries` tells up front).
pub fn fragments(
    id_first: &BatchIdentity,
    rec: &JournaledRecord,
    max_bytes: usize,
) -> Result<Vec<Packed>, FragmentError> {
    split(id_first, rec, max_bytes, 1)
}

/// `fragments`, for re-batching: splits a record whose stored fragment batches were a split into
/// `replaced_count` fragments (sealed under a larger payload limit) into *more* than
/// `replaced_count` fragments, so that fragments of the old and the new split never share
/// (`seq`, `count`) and a consumer cannot mix them up (docs/ENVELOPE.md, "Re-splits").
pub fn refragments(
    id_first: &BatchIdentity,
    rec: &JournaledRecord,
    max_bytes: usize,
    replaced_count: u32,
) -> Result<Vec<Packed>, FragmentError> {
    match replaced_count.checked_add(1) {
        Some(min_count) => split(id_first, rec, max_bytes, min_count),
        None => Err(FragmentError::TooManyFragments {
            seq: rec.seq,
            size: rec.record.payload.len() as u64,
            count: u64::from(u32::MAX) + 1,
        }),
    }
}

fn split(
    id_first: &BatchIdentity,
    rec: &JournaledRecord,
    max_bytes: usize,
    min_count: u32,
) -> Result<Vec<Packed>, FragmentError> {
    let payload = &rec.record.payload;
    let size = payload.len() as u64;
    let sha256: [u8; 32] = Sha256::digest(payload).into();
    let body_bytes = max_bytes.saturating_sub(header_reserve(&id_first.gateway));
    // The widest metadata of a split into `count`: its last index has the most digits.
    let meta_len = |count: u32| {
        let widest = Fragment {
            index: count - 1,
            count,
            sha256,
            size,
        };
        meta_json(rec, Some(widest)).len()
    };
    let too_small = |count: u32| FragmentError::BudgetTooSmall {
        seq: rec.seq,
        max_bytes,
        metadata_bytes: meta_len(count),
    };
    let too_many = |count: u64| FragmentError::TooManyFragments {
        seq: rec.seq,
        size,
        count,
    };
    // The capacity only shrinks as the count gains digits, so ceil(size / capacity(1)) is a
    // lower bound on the count; step up from there to the first count whose chunks hold it all.
    let first = chunk_capacity(id_first.codec, body_bytes, meta_len(1));
    if first == 0 {
        return Err(too_small(1));
    }
    let mut count = size.div_ceil(first as u64).max(u64::from(min_count)).max(1);
    loop {
        let narrow = u32::try_from(count).map_err(|_| too_many(count))?;
        let capacity = chunk_capacity(id_first.codec, body_bytes, meta_len(narrow)) as u64;
        if capacity == 0 {
            return Err(too_small(narrow));
        }
        if count * capacity >= size {
            break;
        }
        count = (count + 1).max(size.div_ceil(capacity));
    }
    if count > size.max(1) {
        return Err(too_many(count));
    }
    let (short, longer) = (size / count, size % count);
    let mut packed = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for index in 0..count {
        let len = (short + u64::from(index < longer)) as usize;
        let fragment = Fragment {
            index: index as u32,
            count: count as u32,
            sha256,
            size,
        };
        let mut raw = Vec::with_capacity(len + 512);
        encode_parts(
            &mut raw,
            &meta_json(rec, Some(fragment)),
            &payload[at..at + len],
        );
        at += len;
        let id = BatchIdentity {
            batch_seq: id_first.batch_seq + index,
            ..id_first.clone()
        };
        let (header, bytes) = seal(&id, VERSION_FRAGMENT, 1, (rec.seq, rec.seq), &raw);
        debug_assert!(bytes.len() <= max_bytes, "{} > {max_bytes}", bytes.len());
        packed.push(Packed {
            payload: bytes,
            header,
            count: 1,
            fragment: Some(fragment),
        });
    }
    Ok(packed)
}

/// One whole record, as `gatehouse decode` prints it (and as `Reassembler` yields it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRecord {
    pub seq: u64,
    pub record: Record,
}

/// One record of a batch's record stream as `decode` reads it: a whole record (version 1), or
/// one fragment of a record (version 2), whose `record.payload` is then the fragment's chunk and
/// whose other fields are the whole record's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub seq: u64,
    pub record: Record,
    /// `Some` for a fragment: feed it to a `Reassembler` to get the record back.
    pub fragment: Option<Fragment>,
}

/// Reads a batch payload back into its header and records: whole records from a version 1
/// batch, the one fragment of a version 2 batch.
///
/// Beyond the envelope's integrity (magic, lengths, codec, CRC-32, record count), checks that a
/// version 1 batch holds no fragment and that a version 2 batch holds exactly one well-formed
/// fragment (index below count, chunk no longer than the whole, header seqs the record's).
pub fn decode(payload: &[u8]) -> Result<(Header, Vec<BatchRecord>), DecodeError> {
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
    if header.version != VERSION && header.version != VERSION_FRAGMENT {
        return Err(DecodeError::Version(header.version));
    }
    if header.raw_bytes > MAX_RAW_BYTES {
        return Err(DecodeError::TooLarge(header.raw_bytes));
    }
    let body = &payload[header_end..];
    // Inflates at most one byte past what the header claims: a corrupt or hostile body
    // cannot make the decoder allocate more than the (bounded) claim.
    let limit = header.raw_bytes + 1;
    let raw = match header.codec {
        Codec::None => body.to_vec(),
        Codec::Zstd => read_all(
            zstd::Decoder::new(body).map_err(|e| DecodeError::Body("zstd", e))?,
            limit,
        )
        .map_err(|e| DecodeError::Body("zstd", e))?,
        Codec::Gzip => read_all(flate2::read::GzDecoder::new(body), limit)
            .map_err(|e| DecodeError::Body("gzip", e))?,
    };
    if raw.len() as u64 != header.raw_bytes {
        return Err(DecodeError::Truncated(
            "record stream not the length the header says",
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
    if header.version == VERSION_FRAGMENT {
        check_fragment_batch(&header, &records).map_err(DecodeError::Fragment)?;
    } else if let Some(index) = records.iter().position(|r| r.fragment.is_some()) {
        return Err(DecodeError::Fragment(format!(
            "record #{index} of a version {VERSION} batch is a fragment"
        )));
    }
    Ok((header, records))
}

/// A version 2 batch is exactly one consistent fragment record.
fn check_fragment_batch(header: &Header, records: &[BatchRecord]) -> Result<(), String> {
    let [rec] = records else {
        return Err(format!("{} records, not 1", records.len()));
    };
    let Some(f) = rec.fragment else {
        return Err("its record has no \"fragment\" metadata".into());
    };
    if (header.first_seq, header.last_seq) != (rec.seq, rec.seq) {
        return Err(format!(
            "header seqs {}..{} are not the record's seq {}",
            header.first_seq, header.last_seq, rec.seq
        ));
    }
    if f.count == 0 || f.index >= f.count {
        return Err(format!("fragment index {} of count {}", f.index, f.count));
    }
    let chunk = rec.record.payload.len() as u64;
    if chunk > f.size || (f.count == 1 && chunk != f.size) {
        return Err(format!(
            "fragment {} of {} holds {chunk} bytes of a {}-byte payload",
            f.index, f.count, f.size
        ));
    }
    Ok(())
}

/// The largest record stream `decode` inflates. A batch is at most a few hundred KB on the
/// wire; even telemetry of one repeated byte does not expand past this.
pub const MAX_RAW_BYTES: u64 = 1 << 30;

fn read_all(reader: impl Read, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let slice = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(slice.try_into().ok()?))
}

fn decode_records(raw: &[u8]) -> Result<Vec<BatchRecord>, DecodeError> {
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
        let fragment = match meta.fragment {
            None => None,
            Some(f) => Some(Fragment {
                index: f.index,
                count: f.count,
                sha256: parse_sha256(&f.sha256)
                    .ok_or_else(|| bad("fragment sha256 is not 64 hex digits"))?,
                size: f.size,
            }),
        };
        records.push(BatchRecord {
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
            fragment,
        });
    }
    Ok(records)
}

/// A whole record put back together by `Reassembler`, or passed through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassembled {
    /// The batch header's gateway it came from.
    pub gateway: String,
    pub record: DecodedRecord,
    /// How many fragments it was reassembled from; `None` for a record that travelled whole.
    pub fragments: Option<u32>,
}

/// What is wrong with a set of fragments (`ReassemblyError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReassemblyFault {
    /// The reassembled payload does not hash to the fragments' `sha256`.
    Sha256 {
        expected: [u8; 32],
        actual: [u8; 32],
    },
    /// The chunks add up to another length than the fragments' `size`.
    Size { expected: u64, actual: u64 },
    /// A fragment disagrees with earlier fragments of the same record on `what` (`sha256`,
    /// `size`, or the metadata: client id, topic, QoS, receivedAt, properties).
    Disagrees {
        index: u32,
        count: u32,
        what: &'static str,
    },
    /// The same fragment came twice with different bytes.
    DuplicateDiffers { index: u32, count: u32 },
}

impl std::fmt::Display for ReassemblyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sha256 { expected, actual } => write!(
                f,
                "reassembled payload has SHA-256 {}, its fragments say {}",
                hex(actual),
                hex(expected)
            ),
            Self::Size { expected, actual } => write!(
                f,
                "fragments hold {actual} bytes, the record is {expected} bytes"
            ),
            Self::Disagrees { index, count, what } => write!(
                f,
                "fragment {index} of {count} disagrees with the record's other fragments on {what}"
            ),
            Self::DuplicateDiffers { index, count } => {
                write!(
                    f,
                    "fragment {index} of {count} came twice with different bytes"
                )
            }
        }
    }
}

/// A corrupt set of fragments, naming the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gateway {gateway:?}, record seq {seq}: {fault}")]
pub struct ReassemblyError {
    pub gateway: String,
    pub seq: u64,
    pub fault: ReassemblyFault,
}

/// A record whose fragments have not all arrived (`Reassembler::incomplete`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    pub gateway: String,
    pub seq: u64,
    /// Distinct fragments held of this split.
    pub received: u32,
    /// The split's fragment count.
    pub count: u32,
    /// The whole payload's length.
    pub size: u64,
}

/// Puts fragmented records back together from decoded batch records, fed in any order, across
/// any number of batches, duplicates included (docs/ENVELOPE.md, "Reassembly").
///
/// Fragments are grouped by (gateway, `seq`) and, within a record, by `count` (a re-split has
/// another count, and its chunks other boundaries); the first group to hold every index yields
/// the record, its length and SHA-256 checked. Whole records pass straight through.
///
/// Memory is the caller's business: the reassembler holds every chunk of every incomplete record
/// (`pending_bytes`), and remembers the (gateway, seq) of each record it completed so that later
/// duplicates of its fragments are dropped instead of starting over. A long-running consumer
/// bounds both, e.g. by calling `forget` for records long complete, or for incomplete ones it
/// gives up on (after reporting them).
#[derive(Debug, Default)]
pub struct Reassembler {
    pending: HashMap<(String, u64), Pending>,
    done: HashSet<(String, u64)>,
    pending_bytes: usize,
}

/// The fragments held of one record.
#[derive(Debug)]
struct Pending {
    sha256: [u8; 32],
    size: u64,
    /// The record's fields but the payload (empty), which every fragment repeats.
    fields: Record,
    /// By split count: the chunks held of that split.
    splits: BTreeMap<u32, Split>,
    /// Chunk bytes held, all splits.
    bytes: usize,
}

#[derive(Debug, Default)]
struct Split {
    /// By index.
    chunks: BTreeMap<u32, Bytes>,
    bytes: u64,
}

impl Reassembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one record decoded from a batch whose header names `gateway`. Returns the whole
    /// record when this completes it (or at once, for a record that was never fragmented);
    /// `None` while fragments are missing, or when `rec` repeats a fragment of a record already
    /// complete or already held.
    ///
    /// Fails on a corrupt set: a fragment that disagrees with the record's others, a duplicate
    /// with different bytes, chunks that add up to another length, or a SHA-256 mismatch. What
    /// was held of that record is then dropped.
    pub fn push(
        &mut self,
        gateway: &str,
        rec: BatchRecord,
    ) -> Result<Option<Reassembled>, ReassemblyError> {
        let Some(f) = rec.fragment else {
            return Ok(Some(Reassembled {
                gateway: gateway.to_string(),
                record: DecodedRecord {
                    seq: rec.seq,
                    record: rec.record,
                },
                fragments: None,
            }));
        };
        let key = (gateway.to_string(), rec.seq);
        if self.done.contains(&key) {
            return Ok(None);
        }
        let fail = |this: &mut Self, key: (String, u64), fault| {
            if let Some(dropped) = this.pending.remove(&key) {
                this.pending_bytes -= dropped.bytes;
            }
            Err(ReassemblyError {
                gateway: key.0,
                seq: key.1,
                fault,
            })
        };
        let chunk = rec.record.payload.clone();
        let mut fields = rec.record;
        fields.payload = Bytes::new();
        let pending = self.pending.entry(key.clone()).or_insert_with(|| Pending {
            sha256: f.sha256,
            size: f.size,
            fields: fields.clone(),
            splits: BTreeMap::new(),
            bytes: 0,
        });
        let disagrees = |what| ReassemblyFault::Disagrees {
            index: f.index,
            count: f.count,
            what,
        };
        let fault = if pending.sha256 != f.sha256 {
            Some(disagrees("sha256"))
        } else if pending.size != f.size {
            Some(disagrees("size"))
        } else if pending.fields != fields {
            Some(disagrees("metadata"))
        } else {
            None
        };
        if let Some(fault) = fault {
            return fail(self, key, fault);
        }
        let split = pending.splits.entry(f.count).or_default();
        if let Some(held) = split.chunks.get(&f.index) {
            if *held != chunk {
                let fault = ReassemblyFault::DuplicateDiffers {
                    index: f.index,
                    count: f.count,
                };
                return fail(self, key, fault);
            }
            return Ok(None);
        }
        let split_bytes = split.bytes + chunk.len() as u64;
        if split_bytes > f.size {
            let fault = ReassemblyFault::Size {
                expected: f.size,
                actual: split_bytes,
            };
            return fail(self, key, fault);
        }
        split.bytes = split_bytes;
        pending.bytes += chunk.len();
        self.pending_bytes += chunk.len();
        split.chunks.insert(f.index, chunk);
        if split.chunks.len() < f.count as usize {
            return Ok(None);
        }
        let pending = self.pending.remove(&key).expect("held above");
        self.pending_bytes -= pending.bytes;
        let split = &pending.splits[&f.count];
        if split.bytes != pending.size {
            let fault = ReassemblyFault::Size {
                expected: pending.size,
                actual: split.bytes,
            };
            return fail(self, key, fault);
        }
        // Sized by the bytes actually held, never by the (untrusted) claimed size alone.
        let chunks = &split.chunks;
        let mut payload = Vec::with_capacity(split.bytes as usize);
        for chunk in chunks.values() {
            payload.extend_from_slice(chunk);
        }
        if payload.len() as u64 != pending.size {
            let fault = ReassemblyFault::Size {
                expected: pending.size,
                actual: payload.len() as u64,
            };
            return fail(self, key, fault);
        }
        let actual: [u8; 32] = Sha256::digest(&payload).into();
        if actual != pending.sha256 {
            let fault = ReassemblyFault::Sha256 {
                expected: pending.sha256,
                actual,
            };
            return fail(self, key, fault);
        }
        self.done.insert(key.clone());
        let mut record = pending.fields;
        record.payload = payload.into();
        Ok(Some(Reassembled {
            gateway: key.0,
            record: DecodedRecord { seq: key.1, record },
            fragments: Some(f.count),
        }))
    }

    /// The records still missing fragments, by gateway and seq: one entry per split held (the
    /// same record split twice, into different counts, gives two).
    pub fn incomplete(&self) -> Vec<Incomplete> {
        let mut out: Vec<Incomplete> = self
            .pending
            .iter()
            .flat_map(|((gateway, seq), p)| {
                p.splits.iter().map(move |(&count, split)| Incomplete {
                    gateway: gateway.clone(),
                    seq: *seq,
                    received: split.chunks.len() as u32,
                    count,
                    size: p.size,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.gateway, a.seq, a.count).cmp(&(&b.gateway, b.seq, b.count)));
        out
    }

    /// Whether fragments of this record are held, waiting for the rest.
    pub fn is_pending(&self, gateway: &str, seq: u64) -> bool {
        self.pending.contains_key(&(gateway.to_string(), seq))
    }

    /// Chunk bytes held for incomplete records.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Drops everything about this record: the fragments held, and the memory that it was
    /// completed (so fragments of it arriving later start over).
    pub fn forget(&mut self, gateway: &str, seq: u64) {
        let key = (gateway.to_string(), seq);
        if let Some(dropped) = self.pending.remove(&key) {
            self.pending_bytes -= dropped.bytes;
        }
        self.done.remove(&key);
    }
}

/// One record as the JSON line `gatehouse decode` prints.
pub fn record_json(rec: &DecodedRecord) -> serde_json::Value {
    fields_json(rec.seq, &rec.record)
}

/// One record of a batch as `gatehouse decode --fragments` prints it: `record_json`, plus a
/// `fragment` object (`index`, `count`, `sha256` in hex, `size`) for a fragment, whose payload
/// is then its chunk.
pub fn batch_record_json(rec: &BatchRecord) -> serde_json::Value {
    let mut obj = fields_json(rec.seq, &rec.record);
    if let (Some(f), Some(map)) = (rec.fragment, obj.as_object_mut()) {
        map.insert(
            "fragment".into(),
            serde_json::to_value(f.to_meta()).expect("fragment serializes"),
        );
    }
    obj
}

fn fields_json(seq: u64, r: &Record) -> serde_json::Value {
    let mut obj = serde_json::json!({
        "seq": seq,
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
