//! End to end: agents of both protocol versions (rumqttc MQTT 3.1.1 and MQTT 5 clients at
//! QoS 0/1/2, `mosquitto_pub -V mqttv311` and `-V mqttv5` at QoS 1) publish unique messages;
//! every message lands in the outbox exactly once, decodable by `gatehouse decode`, with the
//! right clientId/topic/qos, in publish order per client, and every batch header agrees with
//! its records (count, firstSeq, lastSeq, codec, batchSeq = file name). `decode` also reads
//! stdin and rejects a truncated batch with an error.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::support::{
    self, AckedPublisher, Gateway, OUTBOX_TIMEOUT, client_id, header_problems, payload_bytes, seq,
    show,
};

/// What one client is expected to have published, in order: (topic, qos, payload).
type Plan = Vec<(String, u8, Vec<u8>)>;

fn qos4(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Mixed QoS 0/1/2 plan for a rumqttc client, with one binary and one empty payload.
fn rumqttc_plan(client: &str) -> Plan {
    let topic = format!("agents/{client}/telemetry");
    let mut plan: Plan = (0..24u8)
        .map(|i| {
            let q = i % 3;
            (
                topic.clone(),
                q,
                format!("{client} msg #{i} qos{q}").into_bytes(),
            )
        })
        .collect();
    let mut binary = vec![0xff, 0xfe, 0x00, 0x80];
    binary.extend_from_slice(client.as_bytes());
    plan.push((format!("agents/{client}/bin"), 1, binary));
    plan.push((format!("agents/{client}/empty"), 1, Vec::new()));
    plan.push((topic, 2, format!("{client} last").into_bytes()));
    plan
}

/// Publishes one message at a time; QoS 1/2 wait for PUBACK/PUBCOMP before the next one, so
/// "publish order" is well defined even across QoS levels.
async fn run_v4(port: u16, client: &str, plan: &Plan) -> Result<(), String> {
    let mut agent = AckedPublisher::connect(client, port).await;
    for (topic, q, payload) in plan {
        agent
            .publish(topic, qos4(*q), payload.clone())
            .await
            .map_err(|e| format!("{client}: publish {:?}: {e}", show(payload)))?;
    }
    agent.disconnect().await;
    Ok(())
}

/// Same as `run_v4` with the rumqttc MQTT 5 client; also checks PUBACK/PUBCOMP reason codes.
async fn run_v5(port: u16, client: &str, plan: &Plan) -> Result<(), String> {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, PubCompReason};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let mut opts = MqttOptions::new(client, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = AsyncClient::new(opts, 64);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<String, String>>();
    let task = tokio::spawn(async move {
        loop {
            let ev = el.poll().await;
            let msg = match ev {
                Ok(Event::Incoming(Packet::ConnAck(ca))) => {
                    if ca.code == ConnectReturnCode::Success {
                        Ok("connack".to_string())
                    } else {
                        Err(format!("CONNACK {:?}", ca.code))
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => match a.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok("ack".into()),
                    r => Err(format!("PUBACK reason {r:?}")),
                },
                Ok(Event::Incoming(Packet::PubComp(a))) => match a.reason {
                    PubCompReason::Success => Ok("ack".into()),
                    r => Err(format!("PUBCOMP reason {r:?}")),
                },
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    Err(format!("server DISCONNECT {:?}", d.reason_code))
                }
                Ok(_) => continue,
                Err(e) => Err(format!("connection error: {e}")),
            };
            let stop = msg.is_err();
            if tx.send(msg).is_err() || stop {
                return;
            }
        }
    });
    let r = next(&mut rx).await;
    if r.as_deref() != Ok("connack") {
        task.abort();
        return Err(format!("{client}: connect: {r:?}"));
    }
    for (topic, q, payload) in plan {
        let q5 = match q {
            0 => Q5::AtMostOnce,
            1 => Q5::AtLeastOnce,
            _ => Q5::ExactlyOnce,
        };
        c.publish(topic.clone(), q5, false, payload.clone())
            .await
            .map_err(|e| format!("{client}: {e}"))?;
        if *q > 0
            && let Err(e) = next(&mut rx).await
        {
            task.abort();
            return Err(format!("{client}: publish {:?}: {e}", show(payload)));
        }
    }
    let _ = c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    task.abort();
    Ok(())
}

async fn next(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
) -> Result<String, String> {
    match tokio::time::timeout(support::ACK_TIMEOUT, rx.recv()).await {
        Ok(Some(r)) => r,
        Ok(None) => Err("event loop ended".to_string()),
        Err(_) => Err("timed out waiting for the gateway".to_string()),
    }
}

/// `mosquitto_pub -l` at QoS 1, one message per stdin line.
async fn run_mosquitto(port: u16, version: &str, client: &str, plan: &Plan) -> Result<(), String> {
    let topic = &plan[0].0;
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version])
        .args(["-q", "1", "-i", client, "-t", topic, "-l", "-d"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn mosquitto_pub: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let mut text = Vec::new();
    for (_, _, p) in plan {
        text.extend_from_slice(p);
        text.push(b'\n');
    }
    stdin.write_all(&text).await.map_err(|e| e.to_string())?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .map_err(|_| format!("{client}: mosquitto_pub did not finish within 20 s"))?
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{client}: mosquitto_pub exited {}: stdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn mosquitto_plan(client: &str) -> Plan {
    let topic = format!("agents/{client}/lines");
    (0..20)
        .map(|i| (topic.clone(), 1, format!("{client} line {i}").into_bytes()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_message_arrives_once_in_order() {
    let mut gw = Gateway::start_with(|c| c["batch"]["compression"] = json!("zstd")).await;
    let port = gw.port;

    let plans: BTreeMap<String, Plan> = [
        ("e2e-rumqttc-v4", rumqttc_plan("e2e-rumqttc-v4")),
        ("e2e-rumqttc-v5", rumqttc_plan("e2e-rumqttc-v5")),
        ("e2e-mosq-311", mosquitto_plan("e2e-mosq-311")),
        ("e2e-mosq-5", mosquitto_plan("e2e-mosq-5")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let (a, b, c, d) = tokio::join!(
        run_v4(port, "e2e-rumqttc-v4", &plans["e2e-rumqttc-v4"]),
        run_v5(port, "e2e-rumqttc-v5", &plans["e2e-rumqttc-v5"]),
        run_mosquitto(port, "mqttv311", "e2e-mosq-311", &plans["e2e-mosq-311"]),
        run_mosquitto(port, "mqttv5", "e2e-mosq-5", &plans["e2e-mosq-5"]),
    );
    let agent_errors: Vec<String> = [a, b, c, d].into_iter().filter_map(|r| r.err()).collect();
    gw.assert_alive();
    assert!(
        agent_errors.is_empty(),
        "agents failed: {agent_errors:#?}\n--- gateway output ---\n{}",
        gw.logs()
    );

    let wanted: Vec<Vec<u8>> = plans
        .values()
        .flat_map(|p| p.iter().map(|(_, _, pl)| pl.clone()))
        .collect();
    gw.wait_for_payloads(&wanted, OUTBOX_TIMEOUT).await;

    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");

    let batches = gw.outbox_records().await;
    let problems = header_problems(&batches, "zstd");
    assert!(problems.is_empty(), "batch header problems: {problems:#?}");
    let dups = support::duplicate_seqs(&batches);
    assert!(dups.is_empty(), "seqs in more than one batch: {dups:?}");

    // Exact multiset of (clientId, payload), plus topic/qos per record.
    let records: Vec<Value> = batches.iter().flat_map(|b| b.records.clone()).collect();
    let mut expected: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    let mut meta: HashMap<(String, Vec<u8>), (String, u8)> = HashMap::new();
    for (client, plan) in &plans {
        for (topic, q, p) in plan {
            *expected.entry((client.clone(), p.clone())).or_default() += 1;
            meta.insert((client.clone(), p.clone()), (topic.clone(), *q));
        }
    }
    let mut actual: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    let mut wrong_meta = Vec::new();
    for r in &records {
        let p = payload_bytes(r);
        if let Some((topic, q)) = meta.get(&(client_id(r), p.clone()))
            && (r["topic"] != json!(topic) || r["qos"] != json!(q))
        {
            wrong_meta.push(format!(
                "{:?}: topic {} qos {} (published on {topic} at QoS {q})",
                show(&p),
                r["topic"],
                r["qos"]
            ));
        }
        for key in ["receivedAt", "seq"] {
            if !r[key].is_u64() {
                wrong_meta.push(format!("record lacks u64 {key}: {r}"));
            }
        }
        *actual.entry((client_id(r), p)).or_default() += 1;
    }
    let diff: Vec<String> = expected
        .keys()
        .chain(actual.keys())
        .filter(|k| expected.get(*k) != actual.get(*k))
        .map(|(c, p)| {
            format!(
                "({c}, {:?}): expected {} got {}",
                show(p),
                expected.get(&(c.clone(), p.clone())).unwrap_or(&0),
                actual.get(&(c.clone(), p.clone())).unwrap_or(&0)
            )
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(
        diff.is_empty(),
        "outbox (clientId, payload) multiset differs: {diff:#?}"
    );
    assert!(
        wrong_meta.is_empty(),
        "wrong record fields: {wrong_meta:#?}"
    );

    // Per-client publish order == seq order.
    for (client, plan) in &plans {
        let mut recs: Vec<&Value> = records.iter().filter(|r| client_id(r) == *client).collect();
        recs.sort_by_key(|r| seq(r));
        let got: Vec<String> = recs.iter().map(|r| show(&payload_bytes(r))).collect();
        let want: Vec<String> = plan.iter().map(|(_, _, p)| show(p)).collect();
        assert_eq!(got, want, "{client}: records in seq order != publish order");
    }

    // `decode` reads stdin too (same output), and refuses a truncated batch.
    let first = gw.outbox.join(&batches[0].file);
    let bytes = std::fs::read(&first).unwrap();
    let (ok, stdout, _) = decode_stdin(&bytes).await;
    let from_stdin: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("decode stdin output is JSON"))
        .collect();
    assert!(ok, "decode from stdin failed");
    assert_eq!(
        from_stdin, batches[0].records,
        "decode via stdin differs from decode FILE"
    );
    let (ok, stdout, stderr) = decode_stdin(&bytes[..bytes.len() / 2]).await;
    assert!(
        !ok && !stderr.trim().is_empty(),
        "decode of a truncated batch must fail with a message; exit ok={ok}, stderr {stderr:?}, stdout {} bytes",
        stdout.len()
    );
}

/// `gatehouse decode` (no FILE) fed `input` on stdin: (success, stdout, stderr).
async fn decode_stdin(input: &[u8]) -> (bool, String, String) {
    let mut child = Command::new(support::gatehouse_bin())
        .arg("decode")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gatehouse decode");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("decode hung")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
