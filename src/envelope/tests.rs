//! Envelope: round trips, the byte budget under any input, and clear errors on damage.

use super::*;
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
