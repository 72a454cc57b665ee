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
    let key = dedup_key(topic, payload.as_bytes());
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
    assert_eq!(
        state,
        BatcherState {
            next_batch_seq: 2,
            batched_through: 4
        }
    );
    close(journal, reader, guard);

    // After a restart the unconfirmed batch is still there, byte for byte.
    let (journal, reader, guard) = open(&config(&dir, 0)).unwrap();
    let stored = reader.unconfirmed_batches("directory").await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].payload, Bytes::from_static(b"payload-1"));
    let released = journal.confirm(1).await.unwrap();
    assert_eq!(released.rows, 4);
    assert_eq!(reader.counts().await.unwrap().0, 2);
    assert!(
        reader
            .unconfirmed_batches("directory")
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
    let key = dedup_key("t", b"payload");
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
        let key = dedup_key("t", &i.to_be_bytes());
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
            .check_and_arm(&tx, &dedup_key("t", &1199u32.to_be_bytes()), 20_000)
            .unwrap()
    );
    assert!(
        !index
            .check_and_arm(&tx, &dedup_key("t", &0u32.to_be_bytes()), 20_000)
            .unwrap()
    );
    drop(tx);
    index.rolled_back();
    // A restart reloads what the table holds: the newest key is still a duplicate.
    let mut reloaded = dedup::DedupIndex::load(&conn, window, 1000, 20_000).unwrap();
    let tx = conn.transaction().unwrap();
    assert!(
        reloaded
            .check_and_arm(&tx, &dedup_key("t", &1199u32.to_be_bytes()), 20_001)
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
