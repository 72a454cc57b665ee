//! Interoperability with third-party MQTT clients: Eclipse paho (Python, 2.x API) publishing
//! unique QoS 1 messages over MQTT 3.1.1 and MQTT 5, each waited for with
//! `wait_for_publish()`, lands in the outbox exactly once with the right clientId, topic and
//! QoS; SUBSCRIBE is acknowledged (`mosquitto_sub` sees its SUBACK; hand-built 3.1.1 and 5
//! SUBSCRIBEs get the granted QoS, capped at 1, and a failure code for an invalid filter).
//! paho-mqtt is required (scripts/test.sh installs it in a virtual environment and sets
//! `GATEHOUSE_PYTHON`): without it these tests fail, not skip.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tokio::process::Command;

use crate::support::{
    self, ACK_TIMEOUT, Gateway, OUTBOX_TIMEOUT, RawConnect, RawMqtt, client_id, describe_packet,
    mqtt_packet, mqtt_string, payload_bytes, show,
};

const MESSAGES: usize = 40;

/// argv: port client_id version(4|5) count prefix. Exit 0 after every PUBACK; else a message
/// on stderr and exit 1.
const PAHO_PUBLISHER: &str = r#"
import sys, threading
import paho.mqtt.client as mqtt

port, client_id, version, count, prefix = (
    int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])

def fail(msg):
    print(f"{client_id}: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)

proto = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
connected = threading.Event()
state = {"rc": None, "bad_acks": []}

def on_connect(client, userdata, flags, reason_code, properties):
    state["rc"] = reason_code
    connected.set()

def on_publish(client, userdata, mid, reason_code, properties):
    if reason_code.is_failure:
        state["bad_acks"].append((mid, str(reason_code)))

c.on_connect = on_connect
c.on_publish = on_publish
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
if not connected.wait(10):
    fail("no CONNACK within 10 s")
if state["rc"].is_failure:
    fail(f"CONNACK refused: {state['rc']}")
topic = f"agents/{client_id}/paho"
for i in range(count):
    info = c.publish(topic, f"{prefix} #{i}".encode(), qos=1)
    info.wait_for_publish(timeout=10)
    if not info.is_published():
        fail(f"message #{i} not acknowledged within 10 s (rc {info.rc})")
if state["bad_acks"]:
    fail(f"PUBACK failure reason codes: {state['bad_acks']}")
c.disconnect()
c.loop_stop()
print(f"{client_id}: {count} messages acknowledged")
"#;

/// Fails the test (no silent skip) if paho-mqtt 2.x is not importable.
async fn require_paho() {
    let out = Command::new(support::python())
        .args([
            "-c",
            "import paho.mqtt.client as m; m.CallbackAPIVersion.VERSION2",
        ])
        .output()
        .await
        .unwrap_or_else(|e| panic!("python3 is required for the paho interop tests: {e}"));
    assert!(
        out.status.success(),
        "paho-mqtt 2.x is required for the interop tests: run scripts/test.sh (it makes a \
         virtual environment with it), or set GATEHOUSE_PYTHON to a python that has it; \
         {} says:\n{}",
        support::python(),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn run_paho(gw: &Gateway, client: &str, version: &str, prefix: &str) -> Result<(), String> {
    let script = gw.dir().join("paho_publisher.py");
    let mut cmd = Command::new(support::python());
    cmd.arg(&script)
        .args([
            &gw.port.to_string(),
            client,
            version,
            &MESSAGES.to_string(),
            prefix,
        ])
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .map_err(|_| format!("{client}: paho publisher did not finish within 20 s"))?
        .map_err(|e| format!("{client}: spawn python3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{client}: paho publisher exited {}:\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_v311_and_v5_messages_arrive_exactly_once() {
    require_paho().await;
    let mut gw = Gateway::start().await;
    std::fs::write(gw.dir().join("paho_publisher.py"), PAHO_PUBLISHER).unwrap();
    let clients = [("paho-v311", "4"), ("paho-v5", "5")];
    let (a, b) = tokio::join!(
        run_paho(&gw, clients[0].0, clients[0].1, "paho 3.1.1 message"),
        run_paho(&gw, clients[1].0, clients[1].1, "paho 5 message"),
    );
    let errors: Vec<String> = [a, b].into_iter().filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "paho publishers failed:\n{}\n--- gateway output ---\n{}",
        errors.join("\n"),
        gw.logs()
    );

    let expected: Vec<(String, Vec<u8>)> = clients
        .iter()
        .flat_map(|(client, v)| {
            let prefix = if *v == "4" {
                "paho 3.1.1 message"
            } else {
                "paho 5 message"
            };
            (0..MESSAGES).map(move |i| (client.to_string(), format!("{prefix} #{i}").into_bytes()))
        })
        .collect();
    let payloads: Vec<Vec<u8>> = expected.iter().map(|(_, p)| p.clone()).collect();
    gw.wait_for_payloads(&payloads, OUTBOX_TIMEOUT).await;
    // Stop so the outbox is final, then count.
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
    let recs = gw.all_records().await;
    let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
    for r in &recs {
        *counts.entry(payload_bytes(r)).or_default() += 1;
    }
    let mut problems = Vec::new();
    for (client, p) in &expected {
        let n = counts.get(p).copied().unwrap_or(0);
        if n != 1 {
            problems.push(format!("{:?}: {n} records", show(p)));
            continue;
        }
        let r = recs.iter().find(|r| payload_bytes(r) == *p).unwrap();
        let topic = format!("agents/{client}/paho");
        if client_id(r) != *client || r["topic"] != json!(topic) || r["qos"] != json!(1) {
            problems.push(format!("{:?}: wrong fields {r}", show(p)));
        }
    }
    assert!(
        problems.is_empty(),
        "paho messages not in the outbox exactly once with the right fields:\n  {}",
        problems.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_gets_its_suback() {
    let gw = Gateway::start().await;
    for version in ["mqttv311", "mqttv5"] {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &gw.port.to_string(), "-V", version])
            .args(["-i", &format!("sub-{version}"), "-t", "agents/sub/commands"])
            .args(["-q", "1", "-C", "1", "-W", "2", "-d"])
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
            .await
            .expect("mosquitto_sub did not exit")
            .expect("spawn mosquitto_sub");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // `-d` prints the SUBACK and the granted QoS; `-W 2` then ends it with "Timed out".
        assert!(
            stdout.contains("received SUBACK") && stdout.contains("Subscribed (mid: 1): 1"),
            "mosquitto_sub -V {version}: no SUBACK granting QoS 1 (exit {}):\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
        assert!(
            stderr.contains("Timed out") && !stdout.contains("received DISCONNECT"),
            "mosquitto_sub -V {version}: expected it to end by its -W 2 timeout, not an error \
             (exit {}):\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_grants_qos_capped_at_1_and_rejects_invalid_filters() {
    let gw = Gateway::start().await;
    for v in [4u8, 5] {
        let mut r = RawMqtt::connect(gw.port, &RawConnect::new(v, &format!("raw-sub-v{v}")))
            .await
            .unwrap();
        let mut body = 5u16.to_be_bytes().to_vec();
        if v == 5 {
            body.push(0);
        }
        for (filter, qos) in [
            ("agents/sub/cmd", 1u8),
            ("agents/+/cmd", 2),
            ("bad/#/filter", 0),
        ] {
            body.extend(mqtt_string(filter.as_bytes()));
            body.push(qos);
        }
        r.send(&mqtt_packet(0x82, &body)).await.unwrap();
        let (f, b) = r.expect_packet("SUBACK", ACK_TIMEOUT).await.unwrap();
        // 3.1.1: pkid, codes. 5: pkid, property length 0, reason codes (0x8F invalid filter).
        let want: Vec<u8> = if v == 5 {
            vec![0, 5, 0, 0x01, 0x01, 0x8F]
        } else {
            vec![0, 5, 0x01, 0x01, 0x80]
        };
        assert!(
            f == 0x90 && b == want,
            "v{v} SUBSCRIBE [agents/sub/cmd QoS 1, agents/+/cmd QoS 2, bad/#/filter QoS 0]: \
             expected SUBACK {want:02x?}, got {}",
            describe_packet(f, &b)
        );
    }
}
