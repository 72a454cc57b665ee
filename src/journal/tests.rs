//! Journal against a real SQLite file: commit-before-ack, restart, dedup, batches, locking.

use super::*;
use super::{dedup, schema};
use crate::config::JournalConfig;
use crate::record::RecordProperties;

fn config(dir: &tempfile::TempDir, dedup_window_secs: u64) -> JournalConfig {
    JournalConfig {
        path: dir.path().join("journal.db"),
        dedup_window_secs: serde_json::from_value(dedup_window_secs.into()).unwrap(),
        ..JournalConfig::default()
    }
}

fn record(topic: &str, payload: &str) -> Record {
    Record {
        received_at_ms: crate::record::now_ms(),
        client_id: "agent-1".into(),
        topic: topic.into(),
        qos: 1,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: RecordProperties::default(),
    }
}

async fn append(journal: &Journal, topic: &str, payload: &str) -> Appended {
    let key = dedup_key("agent-1", topic, payload.as_bytes());
    journal
        .append(record(topic, payload), Some(key))
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap()
}

fn close(journal: Journal, reader: JournalReader, guard: WriterGuard) {
    drop(journal);
    drop(reader);
    guard.join();
}

#[tokio::test]
async fn committed_records_survive_reopen_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    let mut seqs = Vec::new();
    for i in 0..10 {
        match append(&journal, "t", &format!("m{i}")).await {
            Appended::Journaled(seq) => seqs.push(seq),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(*journal.committed().borrow(), *seqs.last().unwrap());
    close(journal, reader, guard);

    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    let records = reader.records_after(0, 100, usize::MAX).await.unwrap();
    let payloads: Vec<_> = records.iter().map(|r| r.record.payload.clone()).collect();
    let expected: Vec<_> = (0..10).map(|i| Bytes::from(format!("m{i}"))).collect();
    assert_eq!(payloads, expected);
    assert_eq!(*journal.committed().borrow(), *seqs.last().unwrap());
    close(journal, reader, guard);
}

#[tokio::test]
async fn duplicates_within_window_are_dropped_also_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 600)).unwrap();
    assert!(matches!(
        append(&journal, "t", "same").await,
        Appended::Journaled(_)
    ));
    assert_eq!(append(&journal, "t", "same").await, Appended::Duplicate);
    // Same payload on another topic is a different message.
    assert!(matches!(
        append(&journal, "u", "same").await,
        Appended::Journaled(_)
    ));
    close(journal, reader, guard);

    let (journal, reader, guard) = open(&config(&dir, 600)).unwrap();
    assert_eq!(append(&journal, "t", "same").await, Appended::Duplicate);
    assert_eq!(reader.counts().await.unwrap().0, 2);
    close(journal, reader, guard);
}

#[tokio::test]
async fn a_key_is_accepted_again_once_its_window_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 1)).unwrap();
    assert!(matches!(
        append(&journal, "t", "x").await,
        Appended::Journaled(_)
    ));
    assert_eq!(append(&journal, "t", "x").await, Appended::Duplicate);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(matches!(
        append(&journal, "t", "x").await,
        Appended::Journaled(_)
    ));
    close(journal, reader, guard);
}

#[tokio::test]
async fn rows_are_released_only_when_their_batch_is_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    for i in 0..6 {
        append(&journal, "t", &format!("m{i}")).await;
    }
    let batch = SealedBatch {
        batch_seq: 1,
        sink: "directory".into(),
        first_seq: 1,
        last_seq: 4,
        record_count: 4,
        created_at: 0,
        payload: Bytes::from_static(b"payload-1"),
    };
    journal.seal(batch).await.unwrap();
    assert_eq!(reader.counts().await.unwrap().0, 6);
    let state = reader.batcher_state().await.unwrap();
    assert_eq!(state.batched_through, 4);
    assert!(state.next_batch_seq > 1, "never reissues batch 1");
    close(journal, reader, guard);

    // After a restart the unconfirmed batch is still there, byte for byte.
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    let stored = reader.unconfirmed_batches(0, u64::MAX, 100).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].payload, Bytes::from_static(b"payload-1"));
    let released = journal.confirm(1).await.unwrap();
    assert_eq!(released.rows, 4);
    assert_eq!(reader.counts().await.unwrap().0, 2);
    assert!(
        reader
            .unconfirmed_batches(0, u64::MAX, 100)
            .await
            .unwrap()
            .is_empty()
    );
    // A second confirmation of the same batch releases nothing more.
    assert_eq!(journal.confirm(1).await.unwrap(), Released::default());
    let left = reader.records_after(0, 100, usize::MAX).await.unwrap();
    assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![5, 6]);
    close(journal, reader, guard);
}

#[tokio::test]
async fn a_second_gateway_on_the_same_journal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    match open(&config(&dir, 0)) {
        Err(JournalError::Locked(path)) => assert_eq!(path, dir.path().join("journal.db")),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("second open succeeded"),
    }
    close(journal, reader, guard);
}

#[tokio::test]
async fn a_corrupt_journal_is_moved_aside_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    std::fs::write(&path, b"this is not an SQLite database, it is garbage ....").unwrap();
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    let quarantined: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(
        std::fs::read(quarantined[0].path()).unwrap(),
        b"this is not an SQLite database, it is garbage ....".to_vec()
    );
    assert!(matches!(
        append(&journal, "t", "x").await,
        Appended::Journaled(1)
    ));
    close(journal, reader, guard);
}

#[tokio::test]
async fn dead_lettered_records_leave_the_stream_but_stay_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    append(&journal, "t", "poison").await;
    journal.dead_letter(1, "too large".into()).await.unwrap();
    assert_eq!(reader.counts().await.unwrap().0, 0);
    assert_eq!(reader.batcher_state().await.unwrap().batched_through, 1);
    close(journal, reader, guard);
    let conn = rusqlite::Connection::open(dir.path().join("journal.db")).unwrap();
    let (payload, reason): (Vec<u8>, String) = conn
        .query_row(
            "SELECT payload, reason FROM dead_letter WHERE seq = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (payload, reason),
        (b"poison".to_vec(), "too large".to_string())
    );
}

fn dedup_db() -> rusqlite::Connection {
    let mut conn = rusqlite::Connection::open_in_memory().unwrap();
    schema::migrate(&mut conn).unwrap();
    conn
}

#[test]
fn a_rolled_back_key_does_not_count_as_seen() {
    let mut conn = dedup_db();
    let mut index =
        dedup::DedupIndex::load(&conn, std::time::Duration::from_secs(60), 1000, 0).unwrap();
    let key = dedup_key("agent-1", "t", b"payload");
    {
        let tx = conn.transaction().unwrap();
        assert!(!index.check_and_arm(&tx, &key, 1_000).unwrap());
        // Within the same transaction the key is already seen.
        assert!(index.check_and_arm(&tx, &key, 1_001).unwrap());
    } // dropped: rolled back
    index.rolled_back();
    let tx = conn.transaction().unwrap();
    assert!(!index.check_and_arm(&tx, &key, 1_002).unwrap());
    tx.commit().unwrap();
    index.committed();
    let tx = conn.transaction().unwrap();
    assert!(index.check_and_arm(&tx, &key, 1_003).unwrap());
}

#[test]
fn past_the_key_cap_the_oldest_keys_are_forgotten_not_messages() {
    let mut conn = dedup_db();
    let window = std::time::Duration::from_secs(3600);
    let mut index = dedup::DedupIndex::load(&conn, window, 1000, 0).unwrap();
    for i in 0..1200u32 {
        let tx = conn.transaction().unwrap();
        let key = dedup_key("agent-1", "t", &i.to_be_bytes());
        assert!(!index.check_and_arm(&tx, &key, 10_000 + i as i64).unwrap());
        index.prune_if_due(&tx, 10_000 + i as i64).unwrap();
        tx.commit().unwrap();
        index.committed();
    }
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM dedup", [], |r| r.get(0))
        .unwrap();
    assert!(rows <= 1100, "{rows} rows kept");
    // The newest keys are still known; the oldest were forgotten and count as new again.
    let tx = conn.transaction().unwrap();
    assert!(
        index
            .check_and_arm(
                &tx,
                &dedup_key("agent-1", "t", &1199u32.to_be_bytes()),
                20_000
            )
            .unwrap()
    );
    assert!(
        !index
            .check_and_arm(&tx, &dedup_key("agent-1", "t", &0u32.to_be_bytes()), 20_000)
            .unwrap()
    );
    drop(tx);
    index.rolled_back();
    // A restart reloads what the table holds: the newest key is still a duplicate.
    let mut reloaded = dedup::DedupIndex::load(&conn, window, 1000, 20_000).unwrap();
    let tx = conn.transaction().unwrap();
    assert!(
        reloaded
            .check_and_arm(
                &tx,
                &dedup_key("agent-1", "t", &1199u32.to_be_bytes()),
                20_001
            )
            .unwrap()
    );
}

#[tokio::test]
async fn a_full_disk_refuses_new_messages_clearly_and_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    // A journal file that cannot grow past ~40 pages: SQLite reports SQLITE_FULL, as on a full
    // disk.
    let (journal, reader, guard) = open_with_page_limit(&config(&dir, 0), Some(40)).unwrap();
    let mut committed = Vec::new();
    let mut failure = None;
    for i in 0..1000 {
        let payload = format!("{i:04}-{}", "x".repeat(2000));
        let rx = journal.append(record("t", &payload), None).await.unwrap();
        match rx.await.unwrap() {
            Ok(Appended::Journaled(seq)) => committed.push(seq),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("the page limit is reached");
    assert!(
        failure.to_string().contains("full"),
        "the error says the database is full: {failure}"
    );
    assert!(!committed.is_empty());
    // Everything acknowledged before the failure is intact.
    let stored: Vec<u64> = reader
        .records_after(0, 10_000, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(stored, committed);
    // Room made by a confirmed batch lets ingest continue.
    journal
        .seal(SealedBatch {
            batch_seq: 1,
            sink: "directory".into(),
            first_seq: committed[0],
            last_seq: *committed.last().unwrap(),
            record_count: committed.len() as u32,
            created_at: 0,
            payload: Bytes::from_static(b"b"),
        })
        .await
        .unwrap();
    journal.confirm(1).await.unwrap();
    assert!(matches!(
        append(&journal, "t", "after").await,
        Appended::Journaled(_)
    ));
    close(journal, reader, guard);
}

fn record_from(agent: &str, qos: u8, topic: &str, payload: &str) -> Record {
    Record {
        client_id: agent.into(),
        qos,
        ..record(topic, payload)
    }
}

async fn append_from(
    journal: &Journal,
    agent: &str,
    qos: u8,
    topic: &str,
    payload: &str,
) -> Appended {
    let key = dedup_key(agent, topic, payload.as_bytes());
    journal
        .append(record_from(agent, qos, topic, payload), Some(key))
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap()
}

/// `state.rows`/`state.bytes` against a full count of `records`.
fn counters_match(path: &std::path::Path) -> Result<(), String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let get = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    let (rows, bytes) = (
        get("SELECT COUNT(*) FROM records"),
        get("SELECT COALESCE(SUM(size), 0) FROM records"),
    );
    let (state_rows, state_bytes) = (
        get("SELECT value FROM state WHERE name = 'rows'"),
        get("SELECT value FROM state WHERE name = 'bytes'"),
    );
    if (rows, bytes) == (state_rows, state_bytes) {
        Ok(())
    } else {
        Err(format!(
            "records hold {rows} rows / {bytes} bytes, state says {state_rows} / {state_bytes}"
        ))
    }
}

#[tokio::test]
async fn the_same_event_from_different_agents_is_journaled_for_each() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 600)).unwrap();
    let event = r#"{"event":"process_start","image":"evil.exe"}"#;
    for agent in ["agent-A", "agent-B", "agent-C"] {
        assert!(
            matches!(
                append_from(&journal, agent, 1, "alerts/edr", event).await,
                Appended::Journaled(_)
            ),
            "{agent}'s copy of the alert must be journaled"
        );
    }
    // The same agent repeating itself within the window is the duplicate.
    assert_eq!(
        append_from(&journal, "agent-B", 1, "alerts/edr", event).await,
        Appended::Duplicate
    );
    assert_eq!(reader.counts().await.unwrap().0, 3);
    close(journal, reader, guard);
}

#[tokio::test]
async fn dedup_off_keeps_every_copy() {
    let dir = tempfile::tempdir().unwrap();
    let config = JournalConfig {
        dedup: crate::config::DedupMode::Off,
        ..config(&dir, 600)
    };
    let (journal, reader, guard) = open(&config).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            append_from(&journal, "agent-A", 1, "t", "same").await,
            Appended::Journaled(_)
        ));
    }
    close(journal, reader, guard);
}

#[tokio::test]
async fn an_evicted_qos0_copy_does_not_make_a_later_copy_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let config = JournalConfig {
        max_bytes: serde_json::from_value(65_536.into()).unwrap(),
        ..config(&dir, 600)
    };
    let (journal, reader, guard) = open(&config).unwrap();
    let event = "login failure for admin";
    let qos0 = journal
        .append(
            record_from("agent-A", 0, "alerts/auth", event),
            Some(dedup_key("agent-A", "alerts/auth", event.as_bytes())),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    let Appended::Journaled(evicted_seq) = qos0 else {
        panic!("{qos0:?}")
    };
    // Fill the journal with QoS 1 telemetry until the QoS 0 record is evicted unsent.
    let filler = "x".repeat(4000);
    for i in 0..30 {
        let payload = format!("{i} {filler}");
        let rx = journal
            .append(record_from("agent-A", 1, "telemetry", &payload), None)
            .await
            .unwrap();
        if let Err(JournalError::Full { .. }) = rx.await.unwrap() {
            break;
        }
    }
    let left = reader.records_after(0, 100, usize::MAX).await.unwrap();
    assert!(
        left.iter().all(|r| r.seq != evicted_seq),
        "the QoS 0 record must have been evicted to make room"
    );
    // Room again, then the agent sends the same alert at QoS 1: it must be kept.
    journal
        .seal(SealedBatch {
            batch_seq: 1,
            sink: "directory".into(),
            first_seq: 1,
            last_seq: left.last().unwrap().seq,
            record_count: left.len() as u32,
            created_at: 0,
            payload: Bytes::from_static(b"b"),
        })
        .await
        .unwrap();
    journal.confirm(1).await.unwrap();
    assert!(
        matches!(
            append_from(&journal, "agent-A", 1, "alerts/auth", event).await,
            Appended::Journaled(_)
        ),
        "the earlier copy was never delivered: this one is not a duplicate"
    );
    close(journal, reader, guard);
    // Also across a restart, the disarmed key stays disarmed.
    let (journal, reader, guard) = open(&config).unwrap();
    assert_eq!(
        append_from(&journal, "agent-A", 1, "alerts/auth", event).await,
        Appended::Duplicate,
        "the QoS 1 copy is journaled: now a repeat is a duplicate"
    );
    close(journal, reader, guard);
    counters_match(&config.path).unwrap();
}

#[tokio::test]
async fn live_counters_follow_every_change_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = JournalConfig {
        max_bytes: serde_json::from_value(65_536.into()).unwrap(),
        ..config(&dir, 0)
    };
    let (journal, reader, guard) = open(&config).unwrap();
    let filler = "y".repeat(3000);
    for i in 0..30 {
        let qos = if i % 3 == 0 { 0 } else { 1 };
        let rx = journal
            .append(record_from("a", qos, "t", &format!("{i} {filler}")), None)
            .await
            .unwrap();
        let _ = rx.await.unwrap();
    }
    journal
        .seal(SealedBatch {
            batch_seq: 1,
            sink: "directory".into(),
            first_seq: 1,
            last_seq: 5,
            record_count: 5,
            created_at: 0,
            payload: Bytes::from_static(b"b"),
        })
        .await
        .unwrap();
    journal.confirm(1).await.unwrap();
    let seqs: Vec<u64> = reader
        .records_after(0, 100, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    journal.dead_letter(seqs[0], "test".into()).await.unwrap();
    close(journal, reader, guard);
    counters_match(&config.path).unwrap();
}

#[tokio::test]
async fn a_dead_lettered_batch_keeps_its_records_and_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir, 0);
    let (journal, reader, guard) = open(&config).unwrap();
    let mut props = record("agents/a/alerts", "refused");
    props.properties.content_type = Some("application/json".into());
    props.properties.user_properties = vec![("k".into(), "v".into())];
    journal
        .append(props, None)
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    append(&journal, "agents/a/alerts", "refused too").await;
    append(&journal, "t", "not in the batch").await;
    journal
        .seal(SealedBatch {
            batch_seq: 1,
            sink: "mqtt".into(),
            first_seq: 1,
            last_seq: 2,
            record_count: 2,
            created_at: 0,
            payload: Bytes::from_static(b"b"),
        })
        .await
        .unwrap();
    let released = journal
        .dead_letter_batch(1, "refused: NotAuthorized".into())
        .await
        .unwrap();
    assert_eq!(released.rows, 2);
    assert!(
        reader
            .unconfirmed_batches(0, 100, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(reader.counts().await.unwrap().0, 1);
    // While the gateway holds the journal, retry is refused.
    assert!(matches!(
        retry_dead_letters(&config.path, &RetrySelection::All),
        Err(JournalError::Locked(_))
    ));
    close(journal, reader, guard);

    let mut letters = Vec::new();
    list_dead_letters(&config.path, |l| {
        letters.push(l);
        Ok(())
    })
    .unwrap();
    assert_eq!(letters.len(), 2);
    assert!(
        letters
            .iter()
            .all(|l| l.batch_seq == Some(1) && l.reason == "refused: NotAuthorized")
    );
    assert_eq!(
        letters[0].record.properties.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    assert_eq!(
        retry_dead_letters(&config.path, &RetrySelection::Batch(1)).unwrap(),
        2
    );
    counters_match(&config.path).unwrap();
    let (journal, reader, guard) = open(&config).unwrap();
    let back = reader.records_after(3, 10, usize::MAX).await.unwrap();
    let payloads: Vec<_> = back.iter().map(|r| r.record.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![
            Bytes::from_static(b"refused"),
            Bytes::from_static(b"refused too")
        ],
        "retried records come back after everything else, in their order"
    );
    assert_eq!(
        back[0].record.properties.content_type.as_deref(),
        Some("application/json")
    );
    close(journal, reader, guard);
    let mut none_left = true;
    list_dead_letters(&config.path, |_| {
        none_left = false;
        Ok(())
    })
    .unwrap();
    assert!(none_left);
}

#[tokio::test]
async fn adopting_batches_of_another_sink_keeps_them_and_counts_the_oversized() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    for i in 0..4 {
        append(&journal, "t", &format!("m{i}")).await;
    }
    for (seq, size) in [(1u64, 100usize), (2, 5000)] {
        journal
            .seal(SealedBatch {
                batch_seq: seq,
                sink: "mqtt".into(),
                first_seq: seq * 2 - 1,
                last_seq: seq * 2,
                record_count: 2,
                created_at: 0,
                payload: Bytes::from(vec![0u8; size]),
            })
            .await
            .unwrap();
    }
    let adoption = journal.adopt("directory", 1000).await.unwrap();
    assert_eq!(adoption.from_other_sinks, vec![("mqtt".to_string(), 2)]);
    assert_eq!(adoption.oversized, 1);
    assert_eq!(
        journal
            .adopt("directory", 1000)
            .await
            .unwrap()
            .from_other_sinks,
        Vec::new(),
        "adopted once"
    );
    // Re-batching the oversized one replaces it by batches over exactly its records.
    let new = |batch_seq, first_seq, last_seq| SealedBatch {
        batch_seq,
        sink: "directory".into(),
        first_seq,
        last_seq,
        record_count: 1,
        created_at: 0,
        payload: Bytes::from_static(b"small"),
    };
    journal
        .reseal(Replace::Batch(2), vec![new(3, 3, 3), new(4, 4, 4)])
        .await
        .unwrap();
    let stored = reader.unconfirmed_batches(0, 100, 10).await.unwrap();
    assert_eq!(
        stored.iter().map(|b| b.batch_seq).collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    assert!(reader.batcher_state().await.unwrap().next_batch_seq > 4);
    close(journal, reader, guard);
}

#[tokio::test]
async fn a_new_journal_at_the_same_path_never_reuses_a_batch_seq() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir, 0);
    let (journal, reader, guard) = open(&config).unwrap();
    append(&journal, "t", "m").await;
    let issued = reader.batcher_state().await.unwrap().next_batch_seq;
    journal
        .seal(SealedBatch {
            batch_seq: issued,
            sink: "mqtt".into(),
            first_seq: 1,
            last_seq: 1,
            record_count: 1,
            created_at: 0,
            payload: Bytes::from_static(b"p"),
        })
        .await
        .unwrap();
    close(journal, reader, guard);
    // The operator deletes the journal (or it is quarantined): the cloud still remembers
    // `issued`, so the new journal must number above it.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", config.path.display()));
    }
    let (journal, reader, guard) = open(&config).unwrap();
    let next = reader.batcher_state().await.unwrap().next_batch_seq;
    assert!(
        next > issued,
        "new journal starts at {next}, old one issued {issued}"
    );
    close(journal, reader, guard);
}

#[tokio::test]
async fn a_journal_that_cannot_be_opened_fails_the_start_and_is_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    // A directory where the file should be: as unreadable as a file can get, even for root.
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"operator's data").unwrap();
    match open(&config(&dir, 0)) {
        Err(JournalError::Open {
            path: named,
            reason,
        }) => {
            assert_eq!(named, path);
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a directory opened as a journal"),
    }
    assert!(path.join("keep").exists(), "left untouched");
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert!(aside.is_empty(), "nothing quarantined: {aside:?}");
}

/// A journal of 2000 records, closed, then damaged in the middle of the records' B-tree (the
/// header and the schema intact, so opening succeeds). `crashed`: as if the last run had not
/// stopped cleanly.
async fn damaged_journal(dir: &tempfile::TempDir, crashed: bool) -> JournalConfig {
    let config = config(dir, 0);
    let (journal, reader, guard) = open(&config).unwrap();
    for i in 0..2000 {
        append(&journal, "t", &format!("record {i} {}", "z".repeat(200))).await;
    }
    close(journal, reader, guard);
    if crashed {
        let conn = rusqlite::Connection::open(&config.path).unwrap();
        conn.execute(
            "UPDATE state SET value = 0 WHERE name = 'clean_shutdown'",
            [],
        )
        .unwrap();
    }
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&config.path)
        .unwrap();
    let len = file.metadata().unwrap().len();
    file.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
    file.write_all(&[0xA5; 4096]).unwrap();
    config
}

async fn verdict(journal: &Journal) -> Health {
    let mut health = journal.health();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        health.wait_for(|h| matches!(h, Health::Corrupt(_))),
    )
    .await
    .map(|h| h.unwrap().clone())
    .unwrap_or_else(|_| health.borrow().clone())
}

/// The corrupt file is quarantined at the next start, which opens a new, empty journal.
async fn assert_quarantined_at_next_start(dir: &tempfile::TempDir, config: &JournalConfig) {
    assert!(dir.path().join("journal.db.needs-check").exists());
    let (journal, reader, guard) = open(config).unwrap();
    assert_eq!(reader.counts().await.unwrap().0, 0, "a new journal");
    close(journal, reader, guard);
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .count();
    assert!(aside >= 1, "the corrupt file is kept aside");
    assert!(!dir.path().join("journal.db.needs-check").exists());
}

#[tokio::test]
async fn after_a_crash_corruption_is_found_by_the_background_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = damaged_journal(&dir, true).await;
    let (journal, reader, guard) = open(&config).expect("opening reads only the schema");
    assert!(matches!(verdict(&journal).await, Health::Corrupt(_)));
    close(journal, reader, guard);
    assert_quarantined_at_next_start(&dir, &config).await;
}

#[tokio::test]
async fn after_a_clean_stop_nothing_is_scanned_and_corruption_is_found_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = damaged_journal(&dir, false).await;
    let (journal, reader, guard) = open(&config).expect("opening reads only the schema");
    assert_eq!(
        *journal.health().borrow(),
        Health::Ok,
        "a clean stop skips the full check"
    );
    // The batcher reading the records runs into the damage.
    assert!(reader.records_after(0, 5000, usize::MAX).await.is_err());
    assert!(matches!(verdict(&journal).await, Health::Corrupt(_)));
    close(journal, reader, guard);
    assert_quarantined_at_next_start(&dir, &config).await;
}

#[tokio::test]
async fn a_record_carried_by_several_batches_stays_until_the_last_is_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    append(&journal, "t", "large, in three fragments").await;
    append(&journal, "t", "ordinary").await;
    let fragment = |batch_seq: u64, seq: u64| SealedBatch {
        batch_seq,
        sink: "greengrass".into(),
        first_seq: seq,
        last_seq: seq,
        record_count: 1,
        created_at: 0,
        payload: Bytes::from_static(b"fragment"),
    };
    for batch_seq in 1..=3 {
        journal.seal(fragment(batch_seq, 1)).await.unwrap();
    }
    journal.seal(fragment(4, 2)).await.unwrap();
    assert_eq!(journal.confirm(2).await.unwrap(), Released::default());
    assert_eq!(journal.confirm(4).await.unwrap().rows, 1, "its own batch");
    assert_eq!(journal.confirm(1).await.unwrap(), Released::default());
    assert_eq!(
        reader.counts().await.unwrap().0,
        1,
        "fragments 3 still unconfirmed"
    );
    assert_eq!(journal.confirm(3).await.unwrap().rows, 1);
    assert_eq!(reader.counts().await.unwrap().0, 0);
    close(journal, reader, guard);
    counters_match(&dir.path().join("journal.db")).unwrap();
}

#[tokio::test]
async fn a_qos1_copy_of_an_evictable_qos0_message_is_stored_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, reader, guard) = open(&config(&dir, 600)).unwrap();
    // The QoS 0 copy is journaled but not in the batcher's hands: it could still be evicted.
    assert!(matches!(
        append_from(&journal, "agent-A", 0, "alerts/auth", "failed login").await,
        Appended::Journaled(_)
    ));
    assert!(
        matches!(
            append_from(&journal, "agent-A", 1, "alerts/auth", "failed login").await,
            Appended::Journaled(_)
        ),
        "an acknowledged QoS 1 message may not lean on a copy that can vanish"
    );
    // Now a stored QoS 1 copy stands for it: a repeat is a duplicate, at either QoS.
    for qos in [0, 1] {
        assert_eq!(
            append_from(&journal, "agent-A", qos, "alerts/auth", "failed login").await,
            Appended::Duplicate
        );
    }
    assert_eq!(reader.counts().await.unwrap().0, 2);
    close(journal, reader, guard);
}

#[test]
fn dead_letter_commands_refuse_files_that_are_not_journals_and_leave_them_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("notes.txt");
    std::fs::write(&garbage, b"not a database at all, just some text ........").unwrap();
    let other = dir.path().join("other.db");
    {
        let conn = rusqlite::Connection::open(&other).unwrap();
        conn.execute_batch(
            "CREATE TABLE inventory (item TEXT); INSERT INTO inventory VALUES ('x');",
        )
        .unwrap();
    }
    let before = |p: &std::path::Path| std::fs::read(p).unwrap();
    let (garbage_bytes, other_bytes) = (before(&garbage), before(&other));

    for path in [&garbage, &other] {
        let listed = list_dead_letters(path, |_| Ok(())).unwrap_err();
        let retried = retry_dead_letters(path, &RetrySelection::All).unwrap_err();
        for err in [listed, retried] {
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err} names the file"
            );
        }
    }
    assert!(matches!(
        retry_dead_letters(&other, &RetrySelection::All),
        Err(JournalError::NotAJournal(_))
    ));
    let missing = dir.path().join("missing.db");
    let err = list_dead_letters(&missing, |_| Ok(())).unwrap_err();
    assert!(err.to_string().contains("missing.db"), "{err}");
    assert!(!missing.exists(), "nothing created");
    assert_eq!(before(&garbage), garbage_bytes);
    assert_eq!(
        before(&other),
        other_bytes,
        "no journal schema written into it"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "no lock or side files: {left:?}");
}
