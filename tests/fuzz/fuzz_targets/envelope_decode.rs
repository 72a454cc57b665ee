//! Fuzz target `envelope_decode`: arbitrary bytes into the batch envelope decoder
//! (`gatehouse::envelope::decode`), and what it accepts into the `Reassembler`.
//!
//! Checks, for every input:
//! - Nothing panics.
//! - Allocation is bounded by the input and the header's claim: the Rust heap the decoder holds
//!   at its peak is at most `ALLOC_FACTOR` x (input length + the header's `rawBytes`, capped at
//!   `MAX_RAW_BYTES`) + `ALLOC_SLACK`, however the body and record lengths lie. (Measured with a
//!   counting global allocator; the C codecs' own buffers are not counted here, libFuzzer's
//!   `-rss_limit_mb` bounds them.)
//! - A decoded batch is consistent: as many records as its header counts; a version 1 batch,
//!   re-packed with `envelope::pack`, decodes to the same records; every record goes through a
//!   `Reassembler` without a panic, and a version 2 batch holding a whole record (a split into
//!   one fragment) either reassembles to it or is reported corrupt.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gatehouse::envelope::{self, BatchIdentity, MAX_RAW_BYTES, Reassembler, VERSION};
use gatehouse::record::JournaledRecord;
use libfuzzer_sys::fuzz_target;

/// Heap bytes the decoder may hold per byte of input plus claimed record stream.
const ALLOC_FACTOR: usize = 16;
/// Heap bytes the decoder may hold whatever the input (codec state, error strings).
const ALLOC_SLACK: usize = 4 << 20;

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as a fresh allocation before the old one is released: the worst case.
            grew(new_size);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        new
    }
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let claim = claimed_raw_bytes(data).min(MAX_RAW_BYTES) as usize;
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let decoded = envelope::decode(data);
    let held = PEAK.load(Ordering::Relaxed) - base;
    let bound = ALLOC_FACTOR * (data.len() + claim) + ALLOC_SLACK;
    assert!(
        held <= bound,
        "decoding {} bytes (claiming a {claim}-byte record stream) held {held} heap bytes, over {bound}",
        data.len()
    );
    let Ok((header, records)) = decoded else {
        return;
    };
    assert_eq!(records.len(), header.count as usize, "record count");

    if header.version == VERSION && !records.is_empty() {
        let id = BatchIdentity {
            gateway: header.gateway.clone(),
            batch_seq: header.batch_seq,
            codec: header.codec,
            created_at: header.created_at,
        };
        let journaled: Vec<JournaledRecord> = records
            .iter()
            .map(|r| JournaledRecord {
                seq: r.seq,
                record: r.record.clone(),
            })
            .collect();
        let packed = envelope::pack(&id, &journaled, usize::MAX)
            .expect("an unlimited budget packs every record");
        assert_eq!(packed.count, records.len(), "pack took every record");
        let (_, again) = envelope::decode(&packed.payload).expect("a packed batch decodes");
        assert_eq!(again, records, "re-packed records decode differently");
    }

    let mut reassembler = Reassembler::new();
    for rec in records {
        let whole = rec.fragment.is_some_and(|f| f.count == 1);
        match reassembler.push(&header.gateway, rec) {
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => assert!(!whole, "a split into one fragment did not complete"),
        }
    }
});

/// The header's `rawBytes`, when the header is JSON that has it; 0 otherwise.
fn claimed_raw_bytes(data: &[u8]) -> u64 {
    let Some(len) = data.get(4..8) else {
        return 0;
    };
    let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
    data.get(8..8usize.saturating_add(len))
        .and_then(|header| serde_json::from_slice::<serde_json::Value>(header).ok())
        .and_then(|header| header.get("rawBytes")?.as_u64())
        .unwrap_or(0)
}
