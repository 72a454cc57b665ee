//! Nothing acknowledged is lost, nothing stalls: the same alert from several agents is several
//! records; batches sealed for one upstream kind are delivered after switching to another; an
//! agent that stops reading is disconnected and cannot hold up a SIGTERM; a journal that cannot
//! be opened fails the start and is left where it is.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::support::{
    self, AckedPublisher, Gateway, OUTBOX_TIMEOUT, RawConnect, client_id, free_port,
    gatehouse_output, metric_value_with, payload_bytes, poll_until, scrape,
};
use crate::upstream_support::{Pki, standalone_upstream, wait_metric};

const ALERT: &str = r#"{"event":"process_start","image":"C:\\Users\\Public\\evil.exe","pid":4242}"#;

/// `mosquitto_pub -i <agent> -q 1 -t <topic> -m <payload>`; Ok once it exits 0 (it exits only
/// after the PUBACK).
async fn mosquitto_pub(port: u16, agent: &str, topic: &str, payload: &str) -> Result<(), String> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-i", agent, "-q", "1", "-t", topic, "-m", payload])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .map_err(|_| format!("{agent}: mosquitto_pub did not finish"))?
    .map_err(|e| format!("spawn mosquitto_pub: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{agent}: mosquitto_pub exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_alert_from_three_agents_is_three_records_and_repeats_are_dropped_counted() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let m = metrics.clone();
    let gw = Gateway::start_with(move |c| {
        c["metrics"] = json!({ "bind": m });
    })
    .await;
    for agent in ["agent-A", "agent-B", "agent-C"] {
        mosquitto_pub(gw.port, agent, "alerts/edr", ALERT)
            .await
            .unwrap();
    }
    // agent-A repeats itself twice within the window: acknowledged, dropped, counted.
    for _ in 0..2 {
        mosquitto_pub(gw.port, "agent-A", "alerts/edr", ALERT)
            .await
            .unwrap();
    }
    mosquitto_pub(gw.port, "agent-A", "alerts/edr", "marker")
        .await
        .unwrap();
    let records = gw
        .wait_for_payloads(&[b"marker".to_vec()], OUTBOX_TIMEOUT)
        .await;
    let mut senders: Vec<String> = records
        .iter()
        .filter(|r| payload_bytes(r) == ALERT.as_bytes())
        .map(client_id)
        .collect();
    senders.sort();
    assert_eq!(
        senders,
        vec!["agent-A", "agent-B", "agent-C"],
        "one record per agent that raised the alert: {records:#?}"
    );
    let body = scrape(&metrics).await;
    assert_eq!(
        metric_value_with(&body, "gatehouse_dropped_total", r#"reason="duplicate""#),
        Some(2.0),
        "{body}"
    );
}

/// Rows of the journal's `batches` table by sink, and records not yet batched.
fn journal_batches(path: &Path) -> Result<(Vec<(String, i64)>, i64), String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    let by_sink = conn
        .prepare("SELECT sink, COUNT(*) FROM batches GROUP BY sink")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(|e| e.to_string())?;
    let unbatched = conn
        .query_row(
            "SELECT COUNT(*) FROM records WHERE seq > (SELECT value FROM state WHERE name = 'batched_through')",
            [],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    Ok((by_sink, unbatched))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sealed_for_the_mqtt_upstream_are_delivered_after_switching_to_the_directory() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(pki_dir.path());
    // An MQTT upstream nobody answers: every batch is sealed for it and stays unconfirmed.
    let upstream = standalone_upstream(&pki, "localhost", free_port());
    let mut gw = Gateway::start_with(move |c| {
        c["upstream"] = upstream.clone();
        c["batch"]["maxMessages"] = json!(10);
    })
    .await;
    let wanted = crate::upstream_support::plan("switcher", "alert", 45);
    let mut agent = AckedPublisher::connect("switcher", gw.port).await;
    for payload in &wanted {
        agent
            .publish(
                "agents/switcher/alerts",
                rumqttc::QoS::AtLeastOnce,
                payload.clone(),
            )
            .await
            .expect("PUBACK");
    }
    agent.disconnect().await;
    let journal = gw.journal.clone();
    poll_until(
        "every record sealed into mqtt batches",
        OUTBOX_TIMEOUT,
        || {
            let journal = journal.clone();
            async move {
                match journal_batches(&journal)? {
                    (by_sink, 0) if by_sink.iter().any(|(s, n)| s == "mqtt" && *n >= 5) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    assert!(gw.stop().await.success());
    let sealed = match journal_batches(&gw.journal).unwrap() {
        (by_sink, 0) => by_sink
            .iter()
            .find(|(s, _)| s == "mqtt")
            .map_or(0, |(_, n)| *n),
        other => panic!("{other:?}"),
    };

    // The operator switches the upstream kind.
    let mut config: Value = gw.config.clone();
    config["upstream"] = json!({"kind": "directory", "path": gw.outbox});
    std::fs::write(&gw.config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    gw.restart().await;
    let records = gw.wait_for_payloads(&wanted, OUTBOX_TIMEOUT).await;
    assert_eq!(
        records.len(),
        wanted.len(),
        "every message once (the mqtt batches were never delivered)"
    );
    let logs = gw.logs();
    assert!(
        logs.lines().any(|l| l.contains(&format!(
            "Handing {sealed} unconfirmed batches sealed for another upstream ({sealed} from the mqtt upstream)"
        ))),
        "one line says how many batches changed hands:\n{logs}"
    );
    assert!(
        logs.contains(&format!(
            "Resuming {} records and {sealed} unconfirmed batches from the journal.",
            wanted.len()
        )),
        "the start says what it resumes:\n{logs}"
    );
    let journal = gw.journal.clone();
    poll_until("the journal to be empty", OUTBOX_TIMEOUT, || {
        let journal = journal.clone();
        async move {
            match journal_batches(&journal)? {
                (by_sink, 0) if by_sink.is_empty() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

/// An agent that connects with a tiny receive buffer, then sends SUBSCRIBE after SUBSCRIBE (each
/// answered by a SUBACK, no journal involved, so the flood is fast) and never reads: the
/// gateway's answers pile up until its writes stall. `stalled` is set once one of the agent's
/// own writes has waited a second (the gateway stopped reading it).
struct DeafAgent {
    task: tokio::task::JoinHandle<()>,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DeafAgent {
    async fn connect(port: u16) -> DeafAgent {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        stream
            .write_all(&RawConnect::new(4, "deaf-agent").bytes())
            .await
            .unwrap();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            let mut burst = Vec::new();
            for pkid in 1..=500u16 {
                let mut body = pkid.to_be_bytes().to_vec();
                body.extend(support::mqtt_string(b"agents/deaf-agent/commands/#"));
                body.push(1);
                burst.extend(support::mqtt_packet(0x82, &body));
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(1), stream.write_all(&burst)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return, // the gateway closed the connection
                    Err(_) => {
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        // Keep the socket open, still not reading.
                        if stream.write_all(&burst).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        DeafAgent { task, stalled }
    }

    async fn wait_stalled(&self) {
        poll_until(
            "the gateway to stop reading the deaf agent",
            Duration::from_secs(30),
            || async {
                if self.stalled.load(std::sync::atomic::Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("its writes still flow".to_string())
                }
            },
        )
        .await;
    }
}

async fn start_with_write_timeout(ms: u64) -> (Gateway, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let m = metrics.clone();
    let gw = Gateway::start_with(move |c| {
        c["listeners"][0]["writeTimeoutMs"] = json!(ms);
        c["metrics"] = json!({ "bind": m });
        c["journal"]["dedupWindowSecs"] = json!(0);
    })
    .await;
    (gw, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_reading_is_disconnected_and_others_carry_on() {
    let (mut gw, metrics) = start_with_write_timeout(1000).await;
    let deaf = DeafAgent::connect(gw.port).await;
    wait_metric(
        &metrics,
        "gatehouse_agent_write_timeouts_total",
        Duration::from_secs(30),
        |n| n >= 1.0,
    )
    .await;
    // Another agent is unaffected.
    let mut agent = AckedPublisher::connect("healthy-agent", gw.port).await;
    agent
        .publish(
            "agents/healthy-agent/t",
            rumqttc::QoS::AtLeastOnce,
            b"fine".to_vec(),
        )
        .await
        .expect("PUBACK within the timeout");
    agent.disconnect().await;
    let started = Instant::now();
    assert!(gw.stop().await.success());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "SIGTERM took {:?}",
        started.elapsed()
    );
    deaf.task.abort();
    let logs = gw.logs();
    assert!(
        logs.contains("read nothing for 1000 ms (writeTimeoutMs)"),
        "the disconnect says why:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_within_seconds_while_an_agent_does_not_read() {
    // A write timeout longer than the test: only the shutdown bound can end this session.
    let (mut gw, _metrics) = start_with_write_timeout(600_000).await;
    let deaf = DeafAgent::connect(gw.port).await;
    deaf.wait_stalled().await;
    let started = Instant::now();
    assert!(gw.stop().await.success(), "{}", gw.logs());
    let took = started.elapsed();
    // The agent's part is at most CLOSE_WRITE_GRACE (1 s); the batcher's drain of what is
    // committed is bounded separately (5 s).
    assert!(
        took < Duration::from_secs(8),
        "SIGTERM took {took:?}\n{}",
        gw.logs()
    );
    deaf.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_cannot_be_opened_fails_the_start_and_stays_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.db");
    // A directory where the journal file should be: unreadable as a database, even for root.
    std::fs::create_dir(&journal).unwrap();
    std::fs::write(journal.join("operator-data"), b"keep me").unwrap();
    let config = json!({
        "thingName": "gw-itest",
        "listeners": [{"bind": format!("127.0.0.1:{}", free_port())}],
        "journal": {"path": journal},
        "upstream": {"kind": "directory", "path": dir.path().join("outbox")}
    });
    let config_path = dir.path().join("gatehouse.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (status, text) =
        gatehouse_output(["run".as_ref(), "--config".as_ref(), config_path.as_os_str()]).await;
    assert!(!status.success(), "started anyway:\n{text}");
    assert!(
        text.contains(&format!("cannot open journal {}", journal.display())),
        "the error names the file:\n{text}"
    );
    assert!(text.contains("left untouched"), "{text}");
    assert_eq!(
        std::fs::read(journal.join("operator-data")).unwrap(),
        b"keep me"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("corrupt"))
        .collect();
    assert!(aside.is_empty(), "nothing was quarantined: {aside:?}");
}
