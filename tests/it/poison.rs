//! Poison batches on the `mqtt` upstream, against the scripted server of
//! `upstream_scripted`: a batch the server refuses (MQTT 5 PUBACK with an error reason) or that
//! makes it close the connection, every time it is sent, is moved to `dead_letter` after
//! `maxBatchAttempts` while the rest keeps flowing; `gatehouse dead-letter list|export|retry`
//! shows and resends it. A server that refuses everything dead-letters nothing.
//!
//! The poison batch is told apart by size: batches are uncompressed and hold one message, and
//! only the poison message is large.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::support::{self, AckedPublisher, BackgroundAgent, Gateway, gatehouse_bin, poll_until};
use crate::upstream_scripted::{Action, ScriptedBroker};
use crate::upstream_support::{Pki, standalone_upstream, start_gateway_with, wait_metric};

/// Larger than any other batch in these tests.
const POISON_BYTES: usize = 3000;
const ATTEMPTS: u64 = 3;

fn is_poison(payload_len: usize) -> bool {
    payload_len > POISON_BYTES
}

async fn start(pki: &Pki, broker: &ScriptedBroker, protocol: &str) -> (Gateway, String) {
    let mut upstream = standalone_upstream(pki, "localhost", broker.port);
    upstream["protocol"] = json!(protocol);
    upstream["maxInflight"] = json!(3);
    upstream["maxBatchAttempts"] = json!(ATTEMPTS);
    start_gateway_with(upstream, |c| {
        c["batch"]["maxMessages"] = json!(1);
        c["batch"]["compression"] = json!("none");
    })
    .await
}

/// Runs `gatehouse dead-letter ARGS --journal JOURNAL`; its stdout, or the failure.
async fn dead_letter_cli(gw: &Gateway, args: &[&str]) -> Result<String, String> {
    let out = Command::new(gatehouse_bin())
        .arg("dead-letter")
        .args(args)
        .arg("--journal")
        .arg(&gw.journal)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "exit {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The payloads of every batch the server acknowledged, decoded.
async fn delivered_payloads(broker: &ScriptedBroker) -> Result<HashSet<Vec<u8>>, String> {
    let acked = broker.acked_batches();
    let mut seen = HashSet::new();
    let mut out = HashSet::new();
    for received in broker.publishes() {
        if !acked.contains(&received.batch_seq) || !seen.insert(received.batch_seq) {
            continue;
        }
        for record in broker.records(&received).await?.iter() {
            out.insert(support::payload_bytes(record));
        }
    }
    Ok(out)
}

async fn poison_is_dead_lettered_and_the_rest_delivered(protocol: &str, action: Action) {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path());
    let broker = ScriptedBroker::start(&pki).await;
    let poison_action = action.clone();
    broker.set_policy(move |r| {
        if is_poison(r.payload.len()) {
            poison_action.clone()
        } else {
            Action::Ack
        }
    });
    let (mut gw, metrics) = start(&pki, &broker, protocol).await;
    // Telemetry keeps flowing from one agent while another sends the poison once.
    let steady = BackgroundAgent::start(gw.port, "steady-agent").await;
    let poison = format!("poison {}", "P".repeat(POISON_BYTES));
    let mut sender = AckedPublisher::connect("poison-agent", gw.port).await;
    sender
        .publish(
            "agents/poison-agent/alerts",
            QoS::AtLeastOnce,
            poison.clone().into_bytes(),
        )
        .await
        .expect("the gateway acknowledges it: it is journaled");
    sender.disconnect().await;
    wait_metric(
        &metrics,
        "gatehouse_batches_dead_lettered_total",
        Duration::from_secs(60),
        |n| n >= 1.0,
    )
    .await;
    let report = steady.finish().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    // Everything else gets through.
    let wanted: Vec<Vec<u8>> = report.acked.clone();
    let delivered = poll_until(
        "the steady agent's messages",
        Duration::from_secs(30),
        || async {
            let delivered = delivered_payloads(&broker).await?;
            let missing = wanted.iter().filter(|p| !delivered.contains(*p)).count();
            if missing == 0 {
                Ok(delivered)
            } else {
                Err(format!("{missing} of {} not delivered", wanted.len()))
            }
        },
    )
    .await;
    assert!(!delivered.contains(poison.as_bytes()));
    let attempts = broker
        .publishes()
        .iter()
        .filter(|r| is_poison(r.payload.len()))
        .count() as u64;
    assert!(
        attempts >= ATTEMPTS,
        "sent {attempts} times before giving up (maxBatchAttempts {ATTEMPTS})"
    );
    assert!(
        attempts <= ATTEMPTS + 8,
        "sent {attempts} times: the link must move on after a bounded number of attempts"
    );

    // The operator sees it, with its reason...
    let list = dead_letter_cli(&gw, &["list"]).await.unwrap();
    assert!(list.contains("agent poison-agent"), "{list}");
    assert!(list.contains("1 dead-lettered records"), "{list}");
    let export = dead_letter_cli(&gw, &["export"]).await.unwrap();
    let letters: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{export}");
    assert_eq!(letters[0]["payload"], json!(poison));
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("while other batches were delivered"),
        "{}",
        letters[0]
    );
    // ...cannot retry while the gateway runs...
    let refused = dead_letter_cli(&gw, &["retry", "--all"]).await.unwrap_err();
    assert!(
        refused.contains("is another gatehouse running"),
        "{refused}"
    );
    // ...and can once it is stopped; the next start delivers it.
    assert!(gw.stop().await.success());
    broker.set_policy(|_| Action::Ack);
    let retried = dead_letter_cli(&gw, &["retry", "--all"]).await.unwrap();
    assert!(retried.contains("Re-queued 1 records"), "{retried}");
    gw.restart().await;
    poll_until(
        "the retried record to arrive",
        Duration::from_secs(30),
        || async {
            if delivered_payloads(&broker)
                .await?
                .contains(poison.as_bytes())
            {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    assert_eq!(
        dead_letter_cli(&gw, &["list"]).await.unwrap().trim(),
        format!(
            "0 dead-lettered records (0 payload bytes) in {}",
            gw.journal.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_every_time_is_dead_lettered_and_the_rest_delivered() {
    poison_is_dead_lettered_and_the_rest_delivered("5", Action::Refuse(0x99)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_closes_the_connection_every_time_is_dead_lettered() {
    poison_is_dead_lettered_and_the_rest_delivered("3.1.1", Action::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_everything_dead_letters_nothing() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path());
    let broker = ScriptedBroker::start(&pki).await;
    // An IoT policy that denies the topic: every publish is refused.
    broker.set_policy(|_| Action::Refuse(0x87));
    let (gw, metrics) = start(&pki, &broker, "5").await;
    let mut agent = AckedPublisher::connect("agent-1", gw.port).await;
    let wanted: Vec<Vec<u8>> = (0..5).map(|i| format!("event {i}").into_bytes()).collect();
    for payload in &wanted {
        agent
            .publish("agents/agent-1/t", QoS::AtLeastOnce, payload.clone())
            .await
            .unwrap();
    }
    agent.disconnect().await;
    // Enough connections for every batch to have failed more than maxBatchAttempts times.
    poll_until("many refused attempts", Duration::from_secs(60), || async {
        let conns = broker.connections().len() as u64;
        if conns > 2 * ATTEMPTS + 5 {
            Ok(())
        } else {
            Err(format!("{conns} connections so far"))
        }
    })
    .await;
    let body = support::http_get(&metrics, "/metrics").await.unwrap();
    assert_eq!(
        support::metric_value(&body, "gatehouse_batches_dead_lettered_total").unwrap_or(0.0),
        0.0,
        "nothing is poison when nothing gets through"
    );
    // The policy is fixed: everything is delivered.
    broker.set_policy(|_| Action::Ack);
    poll_until("everything to arrive", Duration::from_secs(30), || async {
        let delivered = delivered_payloads(&broker).await?;
        let missing = wanted.iter().filter(|p| !delivered.contains(*p)).count();
        if missing == 0 {
            Ok(())
        } else {
            Err(format!("{missing} missing"))
        }
    })
    .await;
}
