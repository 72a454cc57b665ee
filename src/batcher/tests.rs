//! Batcher against a real journal and a scripted sink: order, stable batch seqs across restarts,
//! flush triggers, full batches from a backlog, rows released only on confirmation.

use super::*;
use crate::config::{BatchConfig, JournalConfig};
use crate::journal::{self, WriterGuard};
use crate::record::{Record, RecordProperties};
use crate::shutdown;
use bytes::Bytes;

struct Harness {
    journal: Journal,
    reader: JournalReader,
    guard: WriterGuard,
}

fn open(dir: &tempfile::TempDir) -> Harness {
    let config = JournalConfig {
        path: dir.path().join("journal.db"),
        dedup_window_secs: serde_json::from_value(0.into()).unwrap(),
        ..JournalConfig::default()
    };
    let (journal, reader, guard) = journal::open(&config).unwrap();
    Harness {
        journal,
        reader,
        guard,
    }
}

fn batch_config(json: serde_json::Value) -> BatchConfig {
    serde_json::from_value(json).unwrap()
}

async fn append(journal: &Journal, payload: String) {
    let record = Record {
        received_at_ms: now_ms(),
        client_id: "agent".into(),
        topic: "agents/agent/telemetry".into(),
        qos: 1,
        payload: Bytes::from(payload),
        properties: RecordProperties::default(),
    };
    journal
        .append(record, None)
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
}

struct Running {
    batches: mpsc::Receiver<Batch>,
    confirm: mpsc::Sender<Confirmation>,
    stop: shutdown::Trigger,
    task: tokio::task::JoinHandle<Result<(), BatcherError>>,
}

fn start(h: &Harness, batch: BatchConfig, max_inflight: usize) -> Running {
    start_for(h, batch, max_inflight, "test", usize::MAX)
}

/// A batcher for a sink named `sink_name` that takes payloads of `max_payload` bytes at most.
fn start_for(
    h: &Harness,
    batch: BatchConfig,
    max_inflight: usize,
    sink_name: &'static str,
    max_payload: usize,
) -> Running {
    let settings = Settings {
        gateway: "gw-test".into(),
        batch,
        sink_name,
        max_inflight,
        max_payload,
        drain_grace: Duration::from_millis(200),
        live_batch: None,
    };
    let (batches_tx, batches) = mpsc::channel(max_inflight);
    let (confirm, confirm_rx) = mpsc::channel(max_inflight);
    let (stop, signal) = shutdown::channel();
    let batcher = Batcher::new(h.journal.clone(), h.reader.clone(), settings);
    let task = tokio::spawn(batcher.run(batches_tx, confirm_rx, signal));
    Running {
        batches,
        confirm,
        stop,
        task,
    }
}

async fn next(running: &mut Running) -> Batch {
    tokio::time::timeout(Duration::from_secs(10), running.batches.recv())
        .await
        .expect("a batch in time")
        .expect("batcher running")
}

async fn close(h: Harness, running: Running) {
    running.stop.fire();
    drop(running.batches);
    running.task.await.unwrap().unwrap();
    drop(h.journal);
    drop(h.reader);
    tokio::task::spawn_blocking(move || h.guard.join())
        .await
        .unwrap();
}

#[tokio::test]
async fn records_flow_in_order_and_are_released_on_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    for i in 0..7 {
        append(&h.journal, format!("m{i}")).await;
    }
    let mut running = start(
        &h,
        batch_config(serde_json::json!({"maxMessages": 3, "maxDelayMs": 50})),
        8,
    );
    let mut seen = Vec::new();
    let mut seqs = Vec::new();
    while seen.len() < 7 {
        let batch = next(&mut running).await;
        seqs.push(batch.batch_seq);
        let (header, records) = envelope::decode(&batch.payload).unwrap();
        assert!(header.count <= 3);
        seen.extend(records.into_iter().map(|r| r.record.payload));
        // Unconfirmed: rows still there.
        assert!(h.reader.counts().await.unwrap().0 > 0);
        running
            .confirm
            .send(Confirmation::delivered(batch.batch_seq))
            .await
            .unwrap();
    }
    assert_eq!(seqs, vec![1, 2, 3]);
    let expected: Vec<_> = (0..7).map(|i| Bytes::from(format!("m{i}"))).collect();
    assert_eq!(seen, expected);
    // Every batch confirmed: the journal empties.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.reader.counts().await.unwrap().0 != 0 {
        assert!(Instant::now() < deadline, "rows not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    close(h, running).await;
}

#[tokio::test]
async fn an_unconfirmed_batch_is_resent_with_the_same_seq_and_bytes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    for i in 0..5 {
        append(&h.journal, format!("m{i}")).await;
    }
    let mut running = start(&h, batch_config(serde_json::json!({"maxDelayMs": 10})), 4);
    let first = next(&mut running).await;
    close(h, running).await; // never confirmed

    let h = open(&dir);
    append(&h.journal, "after restart".into()).await;
    let mut running = start(&h, batch_config(serde_json::json!({"maxDelayMs": 10})), 4);
    let again = next(&mut running).await;
    assert_eq!(again.batch_seq, first.batch_seq);
    assert_eq!(again.payload, first.payload);
    let fresh = next(&mut running).await;
    assert_eq!(fresh.batch_seq, first.batch_seq + 1);
    let (_, records) = envelope::decode(&fresh.payload).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].record.payload, Bytes::from("after restart"));
    close(h, running).await;
}

#[tokio::test]
async fn a_lone_record_is_flushed_after_max_delay() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    let mut running = start(&h, batch_config(serde_json::json!({"maxDelayMs": 300})), 4);
    let started = Instant::now();
    append(&h.journal, "alone".into()).await;
    let batch = next(&mut running).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "flushed too early: {waited:?}"
    );
    assert_eq!(batch.record_count, 1);
    close(h, running).await;
}

#[tokio::test]
async fn a_backlog_drains_in_full_batches_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    for i in 0..3000 {
        append(
            &h.journal,
            format!(
                r#"{{"event":"file_write","path":"/var/log/app-{i}.log","bytes":{}}}"#,
                i * 37
            ),
        )
        .await;
    }
    let max_bytes = 4096usize;
    let mut running = start(
        &h,
        batch_config(serde_json::json!({"maxBytes": max_bytes, "maxDelayMs": 1000})),
        2,
    );
    // The window is 2: two batches come, a third only after a confirmation.
    let first = next(&mut running).await;
    let second = next(&mut running).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        running.batches.try_recv().is_err(),
        "a third batch beyond the window"
    );
    let mut held = VecDeque::from([first, second]);
    let mut total = 0;
    let mut sizes = Vec::new();
    while total < 3000 {
        let batch = match held.pop_front() {
            Some(batch) => batch,
            None => next(&mut running).await,
        };
        assert!(batch.payload.len() <= max_bytes);
        sizes.push(batch.payload.len());
        total += batch.record_count as usize;
        running
            .confirm
            .send(Confirmation::delivered(batch.batch_seq))
            .await
            .unwrap();
    }
    assert_eq!(total, 3000);
    // All but the last are full (within 10% of the budget), though every record was overdue.
    for size in &sizes[..sizes.len() - 1] {
        assert!(*size as f64 >= 0.9 * max_bytes as f64, "sizes {sizes:?}");
    }
    close(h, running).await;
}

#[tokio::test]
async fn shutdown_ends_within_the_grace_even_when_the_sink_takes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    for i in 0..50 {
        append(&h.journal, format!("m{i}")).await;
    }
    // Window of one, one record per batch, and a sink that never confirms (upstream down).
    let mut running = start(
        &h,
        batch_config(serde_json::json!({"maxMessages": 1, "maxDelayMs": 10})),
        1,
    );
    let first = next(&mut running).await;
    assert_eq!(first.record_count, 1);
    running.stop.fire();
    // Settings::drain_grace is 200 ms in `start`; allow generous scheduling slack.
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut running.task).await;
    assert!(
        ended.is_ok(),
        "batcher still running after shutdown with a stuck sink"
    );
    ended.unwrap().unwrap().unwrap();
    drop(running.batches);
    // Nothing was released: every record is still journaled for the next start.
    assert_eq!(h.reader.counts().await.unwrap().0, 50);
    drop(h.journal);
    drop(h.reader);
    tokio::task::spawn_blocking(move || h.guard.join())
        .await
        .unwrap();
}

/// Pseudo-random, incompressible text of `len` bytes (so batches really are as large as they
/// look).
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

#[tokio::test]
async fn batches_sealed_for_another_sink_are_handed_to_the_current_one_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    for i in 0..5 {
        append(&h.journal, format!("m{i}")).await;
    }
    let config = || batch_config(serde_json::json!({"maxMessages": 2, "maxDelayMs": 10}));
    let mut running = start_for(&h, config(), 8, "mqtt", usize::MAX);
    let mut sealed = Vec::new();
    for _ in 0..3 {
        sealed.push(next(&mut running).await);
    }
    close(h, running).await; // never confirmed: the operator switches sinks

    let h = open(&dir);
    let mut running = start_for(&h, config(), 8, "directory", usize::MAX);
    for expected in &sealed {
        let again = next(&mut running).await;
        assert_eq!(again.batch_seq, expected.batch_seq);
        assert_eq!(again.payload, expected.payload, "same bytes");
        running
            .confirm
            .send(Confirmation::delivered(again.batch_seq))
            .await
            .unwrap();
    }
    poll_empty(&h).await;
    close(h, running).await;
}

#[tokio::test]
async fn stored_batches_larger_than_the_sink_takes_are_rebatched_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    let sent: Vec<String> = (0..40)
        .map(|i| format!("{i:02} {}", noise(i, 900)))
        .collect();
    for payload in &sent {
        append(&h.journal, payload.clone()).await;
    }
    let config = || batch_config(serde_json::json!({"maxDelayMs": 10}));
    let mut running = start_for(&h, config(), 8, "java-nucleus", usize::MAX);
    let big = next(&mut running).await;
    assert!(
        big.payload.len() > 15_000,
        "one large batch: {}",
        big.payload.len()
    );
    close(h, running).await;

    let h = open(&dir);
    let limit = 7_000;
    let mut running = start_for(&h, config(), 8, "lite-nucleus", limit);
    let mut received = Vec::new();
    let mut seqs = Vec::new();
    while received.len() < sent.len() {
        let batch = next(&mut running).await;
        assert!(
            batch.payload.len() <= limit,
            "batch {} is {} bytes",
            batch.batch_seq,
            batch.payload.len()
        );
        assert!(batch.batch_seq > big.batch_seq, "re-batched under new seqs");
        seqs.push(batch.batch_seq);
        let (_, records) = envelope::decode(&batch.payload).unwrap();
        received.extend(
            records
                .into_iter()
                .map(|r| String::from_utf8(r.record.payload.to_vec()).unwrap()),
        );
        running
            .confirm
            .send(Confirmation::delivered(batch.batch_seq))
            .await
            .unwrap();
    }
    assert_eq!(received, sent, "every record, in order");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    poll_empty(&h).await;
    close(h, running).await;
}

#[tokio::test]
async fn a_dead_lettered_batch_leaves_the_stream_for_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    append(&h.journal, "poison".into()).await;
    let mut running = start(&h, batch_config(serde_json::json!({"maxDelayMs": 10})), 4);
    let batch = next(&mut running).await;
    running
        .confirm
        .send(Confirmation {
            batch_seq: batch.batch_seq,
            outcome: Outcome::DeadLettered("refused every time".into()),
        })
        .await
        .unwrap();
    poll_empty(&h).await;
    close(h, running).await;
    let mut reasons = Vec::new();
    journal::list_dead_letters(&dir.path().join("journal.db"), |l| {
        reasons.push((l.batch_seq, l.reason));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        reasons,
        vec![(Some(batch.batch_seq), "refused every time".to_string())]
    );
}

#[tokio::test]
async fn a_batch_the_sink_cannot_take_ends_the_batcher_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir);
    let running = start(&h, batch_config(serde_json::json!({"maxDelayMs": 10})), 4);
    drop(running.batches); // the sink is gone
    append(&h.journal, "undeliverable for now".into()).await;
    let result = tokio::time::timeout(Duration::from_secs(10), running.task)
        .await
        .expect("the batcher notices")
        .unwrap();
    assert!(
        matches!(result, Err(BatcherError::SinkStopped(_))),
        "{result:?}"
    );
    // The batch it could not hand over stays sealed for the next start.
    assert_eq!(
        h.reader
            .unconfirmed_batches(0, 100, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// Waits until the journal holds no records.
async fn poll_empty(h: &Harness) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (rows, _) = h.reader.counts().await.unwrap();
        if rows == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{rows} records left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
