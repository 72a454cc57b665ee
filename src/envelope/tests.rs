//! Envelope: round trips, the byte budget under any input, and clear errors on damage; version 1
//! bytes pinned by golden values; fragments (version 2) within the budget for any payload,
//! reassembled exactly, and corrupt, missing or duplicate fragments handled.

use super::*;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

fn record(seq: u64, payload: Vec<u8>) -> JournaledRecord {
    JournaledRecord {
        seq,
        record: Record {
            received_at_ms: 1_700_000_000_000 + seq as i64,
            client_id: format!("agent-{}", seq % 7),
            topic: format!("agents/agent-{}/telemetry", seq % 7),
            qos: (seq % 3) as u8,
            payload: payload.into(),
            properties: RecordProperties::default(),
        },
    }
}

fn id(codec: Codec) -> BatchIdentity {
    BatchIdentity {
        gateway: "gw-test".into(),
        batch_seq: 42,
        codec,
        created_at: 1_700_000_000_000,
    }
}

fn telemetry(rng: &mut StdRng, seq: u64) -> Vec<u8> {
    format!(
        r#"{{"event":"process_start","pid":{},"ppid":{},"image":"C:\\Windows\\System32\\svchost-{}.exe","sha256":"{:016x}{:016x}","seq":{seq}}}"#,
        rng.random_range(1..65535),
        rng.random_range(1..65535),
        rng.random_range(0..50),
        rng.random::<u64>(),
        rng.random::<u64>(),
    )
    .into_bytes()
}

#[test]
fn round_trip_keeps_every_field() {
    let mut records: Vec<_> = (1..=20)
        .map(|s| record(s, format!("m{s}").into_bytes()))
        .collect();
    records[3].record.payload = Bytes::from_static(&[0xff, 0xfe, 0x00]);
    records[4].record.properties = RecordProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("k".into(), "v".into())],
        expires_at_ms: Some(1_800_000_000_000),
    };
    for codec in [Codec::Zstd, Codec::Gzip, Codec::None] {
        let packed = pack(&id(codec), &records, 131_072).unwrap();
        assert_eq!(packed.count, 20);
        let (header, decoded) = decode(&packed.payload).unwrap();
        assert_eq!(header, packed.header);
        assert_eq!(
            (header.first_seq, header.last_seq, header.count),
            (1, 20, 20)
        );
        assert_eq!(header.codec, codec);
        let back: Vec<_> = decoded
            .into_iter()
            .map(|d| JournaledRecord {
                seq: d.seq,
                record: d.record,
            })
            .collect();
        assert_eq!(back, records);
    }
}

#[test]
fn payload_never_exceeds_budget_for_random_and_incompressible_input() {
    let mut rng = StdRng::seed_from_u64(7);
    for round in 0..60 {
        let max_bytes = rng.random_range(1024..=131_072usize);
        let codec = [Codec::Zstd, Codec::Gzip, Codec::None][round % 3];
        let count = rng.random_range(1..400);
        let records: Vec<_> = (0..count)
            .map(|i| {
                let seq = i as u64 + 1;
                let kind = rng.random_range(0..3);
                let len = rng.random_range(0..(max_bytes / 4).max(2));
                let payload = match kind {
                    0 => {
                        let mut p = vec![0u8; len];
                        rng.fill_bytes(&mut p);
                        p
                    }
                    1 => telemetry(&mut rng, seq),
                    _ => vec![b'a'; len],
                };
                record(seq, payload)
            })
            .filter(|r| Budget::new(max_bytes, "gw-test", codec).fits_alone(r))
            .collect();
        if records.is_empty() {
            continue;
        }
        let mut rest = &records[..];
        while !rest.is_empty() {
            // Alternate between no hint and (deliberately poor) hints: the budget holds anyway.
            let hint = [None, Some(3.0), Some(40.0)][rest.len() % 3];
            let packed =
                pack_with_hint(&id(codec), rest, max_bytes, hint).expect("first record fits alone");
            assert!(
                packed.payload.len() <= max_bytes,
                "round {round}: {} > {max_bytes} ({codec:?})",
                packed.payload.len()
            );
            assert!(packed.count >= 1);
            let (_, decoded) = decode(&packed.payload).unwrap();
            assert_eq!(decoded.len(), packed.count);
            assert_eq!(decoded[0].seq, rest[0].seq);
            rest = &rest[packed.count..];
        }
    }
}

#[test]
fn compressible_batches_are_filled_close_to_the_budget() {
    let mut rng = StdRng::seed_from_u64(3);
    let records: Vec<_> = (1..=20_000)
        .map(|s| record(s, telemetry(&mut rng, s)))
        .collect();
    let packed = pack(&id(Codec::Zstd), &records, 131_072).unwrap();
    assert!(packed.count < records.len(), "all 20k should not fit");
    assert!(
        packed.payload.len() >= 131_072 * 9 / 10,
        "batch only {} bytes",
        packed.payload.len()
    );
}

#[test]
fn a_record_too_large_for_the_budget_is_not_packed() {
    let big = record(1, vec![7u8; 4000]);
    for codec in [Codec::Zstd, Codec::Gzip, Codec::None] {
        let budget = Budget::new(2048, "gw-test", codec);
        assert!(!budget.fits_alone(&big), "{codec:?}");
        assert!(budget.fits_alone(&record(1, vec![7u8; 100])), "{codec:?}");
    }
    // Even at the smallest allowed maxBytes a typical small message fits.
    let small = Budget::new(1024, "gw-test", Codec::Zstd);
    assert!(small.fits_alone(&record(1, vec![b'x'; 400])));
}

#[test]
fn damage_is_reported_clearly() {
    let records: Vec<_> = (1..=50).map(|s| record(s, vec![s as u8; 300])).collect();
    let packed = pack(&id(Codec::Zstd), &records, 131_072).unwrap();
    let payload = packed.payload.to_vec();

    let err = decode(&payload[..payload.len() - 10]).unwrap_err();
    assert!(
        matches!(err, DecodeError::Body(..) | DecodeError::Truncated(_)),
        "{err}"
    );

    let err = decode(b"hello world").unwrap_err();
    assert!(matches!(err, DecodeError::BadMagic), "{err}");

    let err = decode(&payload[..12]).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated(_)), "{err}");

    let none = pack(&id(Codec::None), &records, 131_072).unwrap();
    let mut flipped = none.payload.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    let err = decode(&flipped).unwrap_err();
    assert!(matches!(err, DecodeError::Checksum { .. }), "{err}");
}

#[test]
fn the_largest_record_the_ingest_check_accepts_always_packs() {
    let mut rng = StdRng::seed_from_u64(11);
    for codec in [Codec::Zstd, Codec::Gzip, Codec::None] {
        for max_bytes in [1024usize, 4096, 65_536, 131_072] {
            let budget = Budget::new(max_bytes, "gw-test", codec);
            let fits = |len: usize| budget.fits_alone(&record(1, vec![0u8; len]));
            // Largest payload length the ingest check accepts.
            let (mut lo, mut hi) = (0usize, max_bytes);
            while lo + 1 < hi {
                let mid = (lo + hi) / 2;
                if fits(mid) { lo = mid } else { hi = mid }
            }
            let mut payload = vec![0u8; lo];
            rng.fill_bytes(&mut payload);
            let packed = pack(&id(codec), &[record(1, payload)], max_bytes)
                .unwrap_or_else(|| panic!("{codec:?} {max_bytes}: accepted record does not pack"));
            assert!(packed.payload.len() <= max_bytes, "{codec:?} {max_bytes}");
        }
    }
}

fn golden_records() -> Vec<JournaledRecord> {
    let mut records: Vec<_> = (1..=40u64)
        .map(|s| {
            record(
                s,
                format!(
                    r#"{{"n":{s},"pad":"{}"}}"#,
                    "xy".repeat((s as usize * 7) % 90)
                )
                .into_bytes(),
            )
        })
        .collect();
    records[2].record.payload = Bytes::from_static(&[0xff, 0x00, 0xfe, 0x01]);
    records[5].record.properties = RecordProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![
            ("k".into(), "v\"\u{e9}".into()),
            ("a".into(), String::new()),
        ],
        expires_at_ms: Some(1_800_000_000_000),
    };
    records
}

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Version 1 payloads, as `pack` produced them before fragments existed: per codec and budget,
/// the record counts of the successive batches and the SHA-256 of `u32 count | payload` for all
/// of them. Codec `none` pins the format itself; the zstd and gzip values also pin the codec
/// libraries' output (after a codec upgrade, check `none` still passes and decoding round-trips
/// before updating those).
const GOLDEN: &[(Codec, usize, &[usize], &str)] = &[
    (
        Codec::None,
        131072,
        &[40],
        "435289ca8128031107b46f75a929e56a7d87cec425a5a682628b41cc52eed5be",
    ),
    (
        Codec::None,
        1024,
        &[5, 3, 3, 4, 4, 3, 3, 5, 3, 3, 3, 1],
        "a2493c5637c25eb4d67eb751be7b405642329e265d8274c42ce1036d25f3be74",
    ),
    (
        Codec::None,
        500,
        &[
            2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1,
            1, 1, 1, 2,
        ],
        "b64709808815a312554258cdd9f81a767b24bc8bebde0c0d5762576a888f00d7",
    ),
    (
        Codec::Zstd,
        131072,
        &[40],
        "f533f30247ca2b31a186fb52aa496e50904653060a5fb166193e4a0a9a14debd",
    ),
    (
        Codec::Zstd,
        1024,
        &[40],
        "f533f30247ca2b31a186fb52aa496e50904653060a5fb166193e4a0a9a14debd",
    ),
    (
        Codec::Zstd,
        500,
        &[8, 13, 14, 5],
        "d0193e695a888801d5529c5395965f2224890ad5e16f4ffc69a2cf136e5236fd",
    ),
    (
        Codec::Gzip,
        131072,
        &[40],
        "aa99b3c2ffabda2c1a99e1cdabb110a13819d3e896d7c94c162b08032e881651",
    ),
    (
        Codec::Gzip,
        1024,
        &[37, 3],
        "533969b85b145c4f4f7999ce1217bfb9f0d7e1af344dd2d4e3d9c63e4b057d22",
    ),
    (
        Codec::Gzip,
        500,
        &[7, 10, 10, 10, 3],
        "333332efd2f1aa5f0b0b05a55dcd158790ed975f9a0c52009e3cf3023e847112",
    ),
];

/// The first three golden records packed with codec `none`, byte for byte (before fragments).
const GOLDEN_NONE_3: &[u8] = b"GHB1\0\0\0\xa0{\"version\":1,\"gateway\":\"gw-test\",\"batchSeq\":42,\"count\":3,\"firstSeq\":1,\"lastSeq\":3,\"codec\":\"none\",\"createdAt\":1700000000000,\"rawBytes\":402,\"rawCrc32\":1506516736}\0\0\0d{\"seq\":1,\"clientId\":\"agent-1\",\"topic\":\"agents/agent-1/telemetry\",\"qos\":1,\"receivedAt\":1700000000001}\0\0\0\x1e{\"n\":1,\"pad\":\"xyxyxyxyxyxyxy\"}\0\0\0d{\"seq\":2,\"clientId\":\"agent-2\",\"topic\":\"agents/agent-2/telemetry\",\"qos\":2,\"receivedAt\":1700000000002}\0\0\0,{\"n\":2,\"pad\":\"xyxyxyxyxyxyxyxyxyxyxyxyxyxy\"}\0\0\0d{\"seq\":3,\"clientId\":\"agent-3\",\"topic\":\"agents/agent-3/telemetry\",\"qos\":0,\"receivedAt\":1700000000003}\0\0\0\x04\xff\0\xfe\x01";

#[test]
fn version_1_batches_are_byte_identical_to_before_fragments() {
    let records = golden_records();
    for &(codec, budget, counts, fingerprint) in GOLDEN {
        let mut rest = &records[..];
        let mut all = Vec::new();
        let mut got_counts = Vec::new();
        while !rest.is_empty() {
            let p = pack_with_hint(&id(codec), rest, budget, None).unwrap();
            assert_eq!(p.header.version, VERSION);
            assert!(p.fragment.is_none());
            all.extend_from_slice(&(p.count as u32).to_be_bytes());
            all.extend_from_slice(&p.payload);
            got_counts.push(p.count);
            rest = &rest[p.count..];
        }
        assert_eq!(got_counts, counts, "{codec:?} {budget}");
        assert_eq!(sha_hex(&all), fingerprint, "{codec:?} {budget}");
    }
    let none = pack(&id(Codec::None), &records[..3], 131_072).unwrap();
    assert_eq!(&none.payload[..], GOLDEN_NONE_3);
    // And it decodes exactly as before: whole records, no fragment.
    let (header, decoded) = decode(GOLDEN_NONE_3).unwrap();
    assert_eq!(header, none.header);
    let expected: Vec<_> = records[..3]
        .iter()
        .map(|r| BatchRecord {
            seq: r.seq,
            record: r.record.clone(),
            fragment: None,
        })
        .collect();
    assert_eq!(decoded, expected);
    assert_eq!(header_reserve("gw-test"), 8 + 249);
}

/// Payload kinds a fragmented record may hold.
fn big_payload(rng: &mut StdRng, kind: usize, len: usize) -> Vec<u8> {
    match kind {
        0 => {
            let mut p = vec![0u8; len];
            rng.fill_bytes(&mut p);
            p
        }
        1 => {
            let mut p = Vec::with_capacity(len + 200);
            while p.len() < len {
                let seq = p.len() as u64;
                p.extend_from_slice(&telemetry(rng, seq));
            }
            p.truncate(len);
            p
        }
        _ => vec![0u8; len],
    }
}

/// Decodes fragment batches and checks each is one well-formed fragment of `rec`.
fn decode_fragments(
    packed: &[Packed],
    rec: &JournaledRecord,
    first_batch_seq: u64,
    max_bytes: usize,
) -> Vec<BatchRecord> {
    let n = packed.len() as u32;
    packed
        .iter()
        .enumerate()
        .map(|(i, p)| {
            assert!(
                p.payload.len() <= max_bytes,
                "{} > {max_bytes}",
                p.payload.len()
            );
            let (header, mut records) = decode(&p.payload).unwrap();
            assert_eq!(header, p.header);
            assert_eq!(header.version, VERSION_FRAGMENT);
            assert_eq!(header.batch_seq, first_batch_seq + i as u64);
            assert_eq!(
                (header.count, header.first_seq, header.last_seq),
                (1, rec.seq, rec.seq)
            );
            assert_eq!(p.count, 1);
            let got = records.pop().unwrap();
            let f = got.fragment.expect("a fragment");
            assert_eq!(Some(f), p.fragment);
            assert_eq!(
                (f.index, f.count, f.size),
                (i as u32, n, rec.record.payload.len() as u64)
            );
            assert_eq!(got.seq, rec.seq);
            let mut fields = got.record.clone();
            fields.payload = rec.record.payload.clone();
            assert_eq!(
                fields, rec.record,
                "every fragment carries the record's metadata"
            );
            got
        })
        .collect()
}

/// Whether a split of `rec` into `count` is sure to fit `max_bytes`, by the worst-case rule.
fn split_fits(codec: Codec, rec: &JournaledRecord, count: u64, max_bytes: usize) -> bool {
    let size = rec.record.payload.len() as u64;
    let widest = Fragment {
        index: count as u32 - 1,
        count: count as u32,
        sha256: [0; 32],
        size,
    };
    let chunk = size.div_ceil(count) as usize;
    header_reserve("gw-test")
        + compress_bound(codec, 8 + meta_json(rec, Some(widest)).len() + chunk)
        <= max_bytes
}

#[test]
fn fragments_fit_the_budget_for_any_payload_and_reassemble_exactly() {
    let mut rng = StdRng::seed_from_u64(21);
    for codec in [Codec::Zstd, Codec::Gzip, Codec::None] {
        for max_bytes in [1024usize, 7_000, 10_000, 131_072] {
            let mut sizes = vec![0, 1, 500, max_bytes - 1, max_bytes, max_bytes + 1];
            sizes.extend([2 * max_bytes + 3, 45_000, 300_001]);
            if max_bytes >= 7_000 {
                sizes.push(1_000_000);
            }
            for (i, &len) in sizes.iter().enumerate() {
                let kind = i % 3;
                let rec = record(1000 + i as u64, big_payload(&mut rng, kind, len));
                let first = 7 + i as u64;
                let packed = fragments(
                    &BatchIdentity {
                        batch_seq: first,
                        ..id(codec)
                    },
                    &rec,
                    max_bytes,
                )
                .unwrap_or_else(|e| panic!("{codec:?} {max_bytes} {len}: {e}"));
                let what = format!("{codec:?} max {max_bytes} len {len} kind {kind}");
                let n = packed.len() as u64;
                // Fewest: one fragment fewer would not be sure to fit.
                assert!(split_fits(codec, &rec, n, max_bytes), "{what}");
                assert!(
                    n == 1 || !split_fits(codec, &rec, n - 1, max_bytes),
                    "{what}: {n} is not the fewest"
                );
                let mut parts = decode_fragments(&packed, &rec, first, max_bytes);
                let lens: Vec<usize> = parts.iter().map(|p| p.record.payload.len()).collect();
                assert!(
                    lens.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1),
                    "{what}: {lens:?}"
                );
                parts.shuffle(&mut rng);
                let mut re = Reassembler::new();
                let last = parts.pop().unwrap();
                for part in parts {
                    assert_eq!(re.push("gw-test", part).unwrap(), None, "{what}");
                }
                let whole = re.push("gw-test", last).unwrap().expect("complete");
                assert_eq!(whole.gateway, "gw-test");
                assert_eq!(whole.fragments, Some(n as u32));
                assert_eq!(
                    whole.record,
                    DecodedRecord {
                        seq: rec.seq,
                        record: rec.record.clone()
                    },
                    "{what}"
                );
                assert!(re.incomplete().is_empty());
                assert_eq!(re.pending_bytes(), 0);
            }
        }
    }
}

#[test]
fn a_record_too_large_to_pack_whole_is_carried_in_fragments() {
    let mut rng = StdRng::seed_from_u64(5);
    for codec in [Codec::Zstd, Codec::Gzip, Codec::None] {
        let budget = Budget::new(7_000, "gw-test", codec);
        let big = record(9, big_payload(&mut rng, 0, 45_000));
        assert!(!budget.fits_whole(&big) && !budget.fits_alone(&big));
        assert!(budget.carries(&big));
        assert!(pack(&id(codec), std::slice::from_ref(&big), 7_000).is_none());
        // Behind smaller records, `pack` stops before it.
        let mut records: Vec<_> = (1..=8).map(|s| record(s, vec![b'a'; 50])).collect();
        records.push(big.clone());
        let packed = pack(&id(codec), &records, 7_000).unwrap();
        assert_eq!(packed.count, 8);
        let parts = fragments(&id(codec), &big, 7_000).unwrap();
        assert!(parts.len() >= 7 && parts.iter().all(|p| p.payload.len() <= 7_000));
        // A small record fits whole, and carries trivially.
        let small = record(1, vec![b'x'; 100]);
        assert!(budget.fits_whole(&small) && budget.carries(&small));
    }
}

#[test]
fn carries_is_false_only_when_the_metadata_leaves_no_room() {
    let mut rng = StdRng::seed_from_u64(9);
    for codec in [Codec::Zstd, Codec::Gzip, Codec::None] {
        for max_bytes in [1024usize, 4096] {
            let budget = Budget::new(max_bytes, "gw-test", codec);
            // Never fits whole, so `carries` is about fragments; small, as near the boundary
            // each fragment carries only a few bytes of it.
            let payload = Bytes::from(big_payload(&mut rng, 0, max_bytes + 1));
            let with_topic = |len: usize| {
                let mut r = record(3, Vec::new());
                r.record.payload = payload.clone();
                r.record.topic = "t".repeat(len);
                r
            };
            // The longest topic `carries` accepts.
            let (mut lo, mut hi) = (0usize, max_bytes);
            while lo + 1 < hi {
                let mid = (lo + hi) / 2;
                if budget.carries(&with_topic(mid)) {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            assert!(lo > 0, "{codec:?} {max_bytes}: a plain record is carried");
            let rec = with_topic(lo);
            assert!(!budget.fits_whole(&rec));
            let parts = fragments(&id(codec), &rec, max_bytes)
                .unwrap_or_else(|e| panic!("{codec:?} {max_bytes}: carried but not split: {e}"));
            assert!(parts.iter().all(|p| p.payload.len() <= max_bytes));
            let err = fragments(&id(codec), &with_topic(max_bytes), max_bytes).unwrap_err();
            assert!(
                matches!(err, FragmentError::BudgetTooSmall { seq: 3, .. }),
                "{err}"
            );
            assert!(!budget.carries(&with_topic(max_bytes)));
        }
    }
    // A budget that leaves no room for any payload.
    let err = fragments(&id(Codec::Zstd), &record(4, vec![1; 10]), 200).unwrap_err();
    assert!(
        matches!(
            err,
            FragmentError::BudgetTooSmall {
                seq: 4,
                max_bytes: 200,
                ..
            }
        ),
        "{err}"
    );
}

/// The decoded fragments of a 20 kB random record split for a 4 kB budget.
fn sample_parts() -> (JournaledRecord, Vec<BatchRecord>) {
    let mut rng = StdRng::seed_from_u64(13);
    let rec = record(77, big_payload(&mut rng, 0, 20_000));
    let packed = fragments(&id(Codec::Zstd), &rec, 4096).unwrap();
    let parts = decode_fragments(&packed, &rec, 42, 4096);
    assert!(parts.len() >= 5);
    (rec, parts)
}

/// Feeds `parts` to a new reassembler until one fails; the last outcome and the reassembler.
fn push_all(
    parts: Vec<BatchRecord>,
) -> (Result<Option<Reassembled>, ReassemblyError>, Reassembler) {
    let mut re = Reassembler::new();
    let mut outcome = Ok(None);
    for part in parts {
        outcome = re.push("gw-test", part);
        if outcome.is_err() {
            break;
        }
    }
    (outcome, re)
}

#[test]
fn a_corrupt_fragment_set_is_reported_naming_the_record() {
    let (_, parts) = sample_parts();

    // A chunk with a flipped byte: the SHA-256 of the whole does not match.
    let mut flipped = parts.clone();
    let mut chunk = flipped[1].record.payload.to_vec();
    chunk[10] ^= 1;
    flipped[1].record.payload = chunk.into();
    let (outcome, re) = push_all(flipped);
    let err = outcome.unwrap_err();
    assert_eq!((err.gateway.as_str(), err.seq), ("gw-test", 77));
    assert!(matches!(err.fault, ReassemblyFault::Sha256 { .. }), "{err}");
    assert!(
        err.to_string().contains("record seq 77") && err.to_string().contains("SHA-256"),
        "{err}"
    );
    assert!(
        re.incomplete().is_empty() && re.pending_bytes() == 0,
        "the corrupt set is dropped"
    );

    // A chunk cut short: the lengths do not add up.
    let mut short = parts.clone();
    short[2].record.payload = short[2].record.payload.slice(1..);
    let err = push_all(short).0.unwrap_err();
    assert!(
        matches!(
            err.fault,
            ReassemblyFault::Size {
                expected: 20_000,
                actual: 19_999
            }
        ),
        "{err}"
    );

    // Fragments that disagree on the record's metadata or checksum.
    let mut other_topic = parts.clone();
    other_topic[3].record.topic = "elsewhere".into();
    let err = push_all(other_topic).0.unwrap_err();
    assert!(
        matches!(
            err.fault,
            ReassemblyFault::Disagrees {
                index: 3,
                what: "metadata",
                ..
            }
        ),
        "{err}"
    );
    let mut other_sha = parts.clone();
    other_sha[1].fragment.as_mut().unwrap().sha256[0] ^= 1;
    let err = push_all(other_sha).0.unwrap_err();
    assert!(
        matches!(
            err.fault,
            ReassemblyFault::Disagrees {
                index: 1,
                what: "sha256",
                ..
            }
        ),
        "{err}"
    );

    // The same fragment twice with different bytes.
    let mut twice = parts.clone();
    let mut changed = twice[0].clone();
    let mut bytes = changed.record.payload.to_vec();
    bytes[0] ^= 1;
    changed.record.payload = bytes.into();
    twice.insert(1, changed);
    let err = push_all(twice).0.unwrap_err();
    assert!(
        matches!(
            err.fault,
            ReassemblyFault::DuplicateDiffers { index: 0, .. }
        ),
        "{err}"
    );
}

#[test]
fn a_missing_fragment_is_reported_until_it_arrives() {
    let (rec, mut parts) = sample_parts();
    let n = parts.len() as u32;
    let missing = parts.remove(2);
    let mut re = Reassembler::new();
    for part in parts {
        assert_eq!(re.push("gw-test", part).unwrap(), None);
    }
    assert!(re.is_pending("gw-test", 77));
    assert_eq!(
        re.incomplete(),
        vec![Incomplete {
            gateway: "gw-test".into(),
            seq: 77,
            received: n - 1,
            count: n,
            size: 20_000
        }]
    );
    assert_eq!(re.pending_bytes(), 20_000 - missing.record.payload.len());
    let whole = re
        .push("gw-test", missing.clone())
        .unwrap()
        .expect("complete now");
    assert_eq!(whole.record.record, rec.record);
    assert!(re.incomplete().is_empty() && !re.is_pending("gw-test", 77));
    // The same seq from another gateway is another record.
    assert_eq!(re.push("gw-other", missing).unwrap(), None);
    assert_eq!(re.incomplete().len(), 1);
    re.forget("gw-other", 77);
    assert!(re.incomplete().is_empty() && re.pending_bytes() == 0);
}

#[test]
fn duplicate_fragments_are_tolerated_and_a_record_completes_once() {
    let (rec, parts) = sample_parts();
    let mut rng = StdRng::seed_from_u64(17);
    let mut fed: Vec<BatchRecord> = parts.iter().chain(parts.iter()).cloned().collect();
    fed.shuffle(&mut rng);
    fed.extend(parts.iter().cloned()); // and again after it completed
    let mut re = Reassembler::new();
    let mut wholes = Vec::new();
    for part in fed {
        if let Some(whole) = re.push("gw-test", part).unwrap() {
            wholes.push(whole);
        }
    }
    assert_eq!(wholes.len(), 1);
    assert_eq!(wholes[0].record.record, rec.record);
    assert!(re.incomplete().is_empty() && re.pending_bytes() == 0);
    // Whole records pass straight through, every time.
    let whole = BatchRecord {
        seq: 5,
        record: record(5, b"hi".to_vec()).record,
        fragment: None,
    };
    for _ in 0..2 {
        let out = re.push("gw-test", whole.clone()).unwrap().unwrap();
        assert_eq!((out.record.seq, out.fragments), (5, None));
    }
}

#[test]
fn a_re_split_has_more_fragments_and_completes_the_record() {
    let mut rng = StdRng::seed_from_u64(19);
    let rec = record(50, big_payload(&mut rng, 0, 1_000_000));
    let old = fragments(&id(Codec::Zstd), &rec, 131_072).unwrap();
    let old_count = old.len() as u32;
    // A slightly smaller limit: the fewest count would be the same, the re-split has one more.
    assert_eq!(
        fragments(&id(Codec::Zstd), &rec, 131_000).unwrap().len() as u32,
        old_count
    );
    let new = refragments(
        &BatchIdentity {
            batch_seq: 100,
            ..id(Codec::Zstd)
        },
        &rec,
        131_000,
        old_count,
    )
    .unwrap();
    assert_eq!(new.len() as u32, old_count + 1);
    let old_parts = decode_fragments(&old, &rec, 42, 131_072);
    let new_parts = decode_fragments(&new, &rec, 100, 131_000);
    // Some of the old split was delivered, then all of the new one.
    let mut re = Reassembler::new();
    for part in old_parts.iter().take(3).cloned() {
        assert_eq!(re.push("gw-test", part).unwrap(), None);
    }
    let mut done = None;
    for part in new_parts {
        if let Some(whole) = re.push("gw-test", part).unwrap() {
            done = Some(whole);
        }
    }
    let whole = done.expect("the new split completes");
    assert_eq!(
        (whole.fragments, &whole.record.record),
        (Some(old_count + 1), &rec.record)
    );
    assert!(
        re.incomplete().is_empty(),
        "the old split's pieces went with it"
    );
    // The rest of the old split arriving late is a duplicate of a complete record.
    for part in old_parts.into_iter().skip(3) {
        assert_eq!(re.push("gw-test", part).unwrap(), None);
    }
    assert!(re.incomplete().is_empty());
    // More fragments than bytes cannot be.
    let err = refragments(&id(Codec::None), &record(1, vec![1, 2]), 131_072, 2).unwrap_err();
    assert!(
        matches!(err, FragmentError::TooManyFragments { .. }),
        "{err}"
    );
}

/// A batch of `version` around a record stream of `(meta, payload)` pairs.
fn hand_made(version: u32, seqs: (u64, u64), records: &[(Vec<u8>, Vec<u8>)]) -> Bytes {
    let mut raw = Vec::new();
    for (meta, payload) in records {
        encode_parts(&mut raw, meta, payload);
    }
    seal(&id(Codec::None), version, records.len() as u32, seqs, &raw).1
}

#[test]
fn decode_checks_the_version_and_the_fragment_form() {
    let rec = record(8, vec![5u8; 100]);
    let sha: [u8; 32] = Sha256::digest(&rec.record.payload).into();
    let frag = |index, count| Fragment {
        index,
        count,
        sha256: sha,
        size: 100,
    };
    let part = |f: Fragment, len: usize| (meta_json(&rec, Some(f)), vec![5u8; len]);

    // Well-formed by hand: decodes, with the fragment's fields.
    let good = hand_made(VERSION_FRAGMENT, (8, 8), &[part(frag(1, 2), 50)]);
    let (header, records) = decode(&good).unwrap();
    assert_eq!(header.version, 2);
    assert_eq!(records[0].fragment, Some(frag(1, 2)));
    let json = batch_record_json(&records[0]);
    assert_eq!(json["fragment"]["index"], 1);
    assert_eq!(json["fragment"]["count"], 2);
    assert_eq!(json["fragment"]["size"], 100);
    assert_eq!(json["fragment"]["sha256"], hex(&sha));
    assert_eq!(json["seq"], 8);

    let malformed = |payload: Bytes| match decode(&payload) {
        Err(DecodeError::Fragment(reason)) => reason,
        other => panic!("expected a fragment error, got {other:?}"),
    };
    let whole = (meta_json(&rec, None), rec.record.payload.to_vec());
    // Version 2 without a fragment, with two records, index past count, chunk past the whole,
    // a single fragment that is not the whole, header seqs not the record's.
    malformed(hand_made(
        VERSION_FRAGMENT,
        (8, 8),
        std::slice::from_ref(&whole),
    ));
    malformed(hand_made(
        VERSION_FRAGMENT,
        (8, 8),
        &[part(frag(0, 2), 50), part(frag(1, 2), 50)],
    ));
    malformed(hand_made(VERSION_FRAGMENT, (8, 8), &[part(frag(2, 2), 50)]));
    malformed(hand_made(
        VERSION_FRAGMENT,
        (8, 8),
        &[part(frag(0, 2), 101)],
    ));
    malformed(hand_made(VERSION_FRAGMENT, (8, 8), &[part(frag(0, 1), 99)]));
    malformed(hand_made(VERSION_FRAGMENT, (8, 9), &[part(frag(0, 2), 50)]));
    // Version 1 with a fragment.
    malformed(hand_made(VERSION, (8, 8), &[part(frag(0, 2), 50)]));
    // Unknown versions.
    let err = decode(&hand_made(3, (8, 8), std::slice::from_ref(&whole))).unwrap_err();
    assert!(matches!(err, DecodeError::Version(3)), "{err}");
    assert!(err.to_string().contains("versions 1 and 2"), "{err}");
    // A sha256 that is not hex.
    let mut meta: serde_json::Value = serde_json::from_slice(&part(frag(0, 2), 50).0).unwrap();
    meta["fragment"]["sha256"] = "xyz".into();
    let bad = hand_made(
        VERSION_FRAGMENT,
        (8, 8),
        &[(serde_json::to_vec(&meta).unwrap(), vec![5; 50])],
    );
    assert!(matches!(
        decode(&bad).unwrap_err(),
        DecodeError::Record { index: 0, .. }
    ));
}

/// `payload` with its header rewritten by `change`.
fn with_header(payload: &[u8], change: impl FnOnce(&mut Header)) -> Vec<u8> {
    let len = read_u32(payload, 4).unwrap() as usize;
    let mut header: Header = serde_json::from_slice(&payload[8..8 + len]).unwrap();
    change(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&payload[8 + len..]);
    out
}

#[test]
fn a_hostile_header_cannot_make_the_decoder_inflate_without_bound() {
    let records: Vec<_> = (1..=40).map(|s| record(s, vec![0u8; 20_000])).collect();
    let packed = pack(&id(Codec::Zstd), &records, 131_072).unwrap();
    assert!(packed.header.raw_bytes > 500_000);

    // A claim past the decoder's limit is refused before anything is inflated.
    let huge = with_header(&packed.payload, |h| h.raw_bytes = MAX_RAW_BYTES + 1);
    let err = decode(&huge).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge(_)), "{err}");
    assert!(err.to_string().contains("limit"), "{err}");

    // A body that inflates past a small claim is refused, having inflated only the claim.
    let small = with_header(&packed.payload, |h| h.raw_bytes = 1000);
    let err = decode(&small).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated(_)), "{err}");
    let zeros = read_all(std::io::repeat(0).take(10_000_000), 1001).unwrap();
    assert_eq!(zeros.len(), 1001, "reading stops at the limit");
}

#[test]
fn a_fragment_set_claiming_a_huge_size_is_refused_without_allocating_it() {
    let (_, mut parts) = sample_parts();
    for part in &mut parts {
        if let Some(f) = part.fragment.as_mut() {
            f.size = u64::MAX / 2;
        }
    }
    let (outcome, re) = push_all(parts);
    let err = outcome.unwrap_err();
    assert!(matches!(err.fault, ReassemblyFault::Size { .. }), "{err}");
    assert_eq!(re.pending_bytes(), 0, "the bad set is dropped");
}
