//! Dedup window: with a short `journal.dedupWindowSecs`, the same topic+payload published twice
//! inside the window yields one outbox record (both PUBACKed), also across a graceful restart;
//! the same payload on another topic is a separate record; after the window has passed the
//! message is journaled again. The drop is counted in `gatehouse_duplicates_dropped_total`
//! on the metrics endpoint.

use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::{Value, json};

use crate::support::{
    AckedPublisher, Gateway, OUTBOX_TIMEOUT, free_port, http_get, metric_value, payload_bytes,
    poll_until,
};

const WINDOW_SECS: u64 = 5;
const TOPIC: &str = "agents/dedup-agent/telemetry";
const OTHER_TOPIC: &str = "agents/dedup-agent/other";

fn count(recs: &[Value], topic: &str, payload: &[u8]) -> usize {
    recs.iter()
        .filter(|r| r["topic"] == json!(topic) && payload_bytes(r) == payload)
        .count()
}

async fn duplicates_dropped(metrics_addr: &str) -> Option<f64> {
    let body = poll_until("the metrics endpoint", Duration::from_secs(10), || async {
        http_get(metrics_addr, "/metrics").await
    })
    .await;
    metric_value(&body, "gatehouse_duplicates_dropped_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_inside_window_are_dropped_even_across_restart() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut gw = Gateway::start_with(|c| {
        c["journal"]["dedupWindowSecs"] = json!(WINDOW_SECS);
        c["batch"]["compression"] = json!("none");
        c["metrics"] = json!({ "bind": metrics_addr });
    })
    .await;
    let dup = b"dedup: the same reading".to_vec();
    let qos1 = QoS::AtLeastOnce;

    // Twice inside the window: both acknowledged, one record.
    let mut agent = AckedPublisher::connect("dedup-agent", gw.port).await;
    agent.publish(TOPIC, qos1, dup.clone()).await.expect("1st");
    let first_at = Instant::now();
    agent
        .publish(TOPIC, qos1, dup.clone())
        .await
        .expect("a duplicate must still be PUBACKed");
    agent
        .publish(OTHER_TOPIC, qos1, dup.clone())
        .await
        .expect("other topic");
    // A marker published after them: once it is batched, the earlier messages are too.
    agent
        .publish(TOPIC, qos1, b"dedup marker 1".to_vec())
        .await
        .unwrap();
    let recs = gw
        .wait_for_payloads(&[b"dedup marker 1".to_vec()], OUTBOX_TIMEOUT)
        .await;
    assert_eq!(
        count(&recs, TOPIC, &dup),
        1,
        "same topic+payload twice within {WINDOW_SECS}s must give one record: {recs:#?}"
    );
    assert_eq!(
        count(&recs, OTHER_TOPIC, &dup),
        1,
        "same payload on another topic is a different message: {recs:#?}"
    );
    assert_eq!(
        duplicates_dropped(&metrics_addr).await,
        Some(1.0),
        "gatehouse_duplicates_dropped_total after one dropped duplicate"
    );
    agent.disconnect().await;

    // Graceful restart, then the same message again, still inside the window.
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
    gw.restart().await;
    let mut agent = AckedPublisher::connect("dedup-agent", gw.port).await;
    agent
        .publish(TOPIC, qos1, dup.clone())
        .await
        .expect("3rd (after restart)");
    let last_dup_at = Instant::now();
    let since_first = last_dup_at - first_at;
    assert!(
        since_first < Duration::from_secs(WINDOW_SECS) - Duration::from_millis(500),
        "test setup too slow: restart took the re-publish {since_first:?} after the first one, \
         beyond the {WINDOW_SECS}s window, so nothing can be concluded"
    );
    agent
        .publish(TOPIC, qos1, b"dedup marker 2".to_vec())
        .await
        .unwrap();
    let recs = gw
        .wait_for_payloads(&[b"dedup marker 2".to_vec()], OUTBOX_TIMEOUT)
        .await;
    assert_eq!(
        count(&recs, TOPIC, &dup),
        1,
        "a duplicate {since_first:?} after the first (window {WINDOW_SECS}s) but after a \
         graceful restart was journaled again: {recs:#?}"
    );
    let after_restart = duplicates_dropped(&metrics_addr).await;
    assert!(
        after_restart.is_some_and(|v| v >= 1.0),
        "gatehouse_duplicates_dropped_total after a dropped duplicate in the new process: {after_restart:?}"
    );

    // Past the window (measured from the last sighting too): journaled again.
    tokio::time::sleep_until(
        (last_dup_at + Duration::from_secs(WINDOW_SECS) + Duration::from_millis(1500)).into(),
    )
    .await;
    agent
        .publish(TOPIC, qos1, dup.clone())
        .await
        .expect("4th (after window)");
    agent
        .publish(TOPIC, qos1, b"dedup marker 3".to_vec())
        .await
        .unwrap();
    let recs = gw
        .wait_for_payloads(&[b"dedup marker 3".to_vec()], OUTBOX_TIMEOUT)
        .await;
    assert_eq!(
        count(&recs, TOPIC, &dup),
        2,
        "after the {WINDOW_SECS}s window the message must be journaled again: {recs:#?}"
    );
    agent.disconnect().await;
    gw.assert_alive();
}
