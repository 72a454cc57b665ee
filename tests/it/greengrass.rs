//! The gateway as a Greengrass component, against the fake nucleus (`fake_nucleus`), in both
//! its Java and lite modes: started by the nucleus's environment with no config file, it reads
//! its configuration over IPC, reports RUNNING, and forwards every acknowledged agent message
//! with PublishToIoTCore, never in a frame over the lite cap. `confirm: "cloud"` releases
//! nothing before the cloud's receipts and resends what is not receipted; a configuration
//! update changes `batch.maxDelayMs` live; an invalid deployment is reported invalid; losing
//! the IPC connection or a refused token ends the process non-zero with a clear message;
//! `kill -9` under load loses nothing acknowledged; with `auth.kind: greengrass`, agents are
//! admitted and authorized per the fake's client device auth, whose server certificate the
//! listener serves and follows.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::fake_nucleus::{FakeNucleus, IotPublish, NucleusMode, PublishReply};
use crate::support::{self, AckedPublisher, free_port, gatehouse_bin, poll_until};

const COMPONENT: &str = "io.gatehouse.AgentGateway";
const BATCH_TOPIC: &str = "gatehouse/gw-gg/batches";
const RECEIPT_TOPIC: &str = "gatehouse/gw-gg/receipts";
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The component configuration of these tests: a listener on `port`, quick batches, the
/// Greengrass upstream with `upstream` merged in.
fn component_config(port: u16, upstream: Value) -> Value {
    let mut up = json!({"kind": "greengrass", "retryMinMs": 100, "retryMaxMs": 500});
    if let (Some(base), Some(extra)) = (up.as_object_mut(), upstream.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    json!({
        "listeners": [{"bind": format!("127.0.0.1:{port}"), "maxPacketSize": 2_000_000}],
        "batch": {"maxDelayMs": 100},
        "journal": {"dedupWindowSecs": 0},
        "upstream": up,
        "accessControl": {"aws.greengrass.ipc.mqttproxy": {"p": {"policyDescription": "test",
            "operations": ["*"], "resources": ["*"]}}}
    })
}

/// A fake nucleus of `mode` holding `config` for the component (and, for lite, its own
/// component, as nucleus lite has).
async fn nucleus(mode: NucleusMode, config: Value) -> FakeNucleus {
    let mut builder = FakeNucleus::builder(mode, COMPONENT, config).thing_name("gw-gg");
    if mode == NucleusMode::Lite {
        builder = builder.component_config(
            "aws.greengrass.NucleusLite",
            json!({"awsRegion": "us-east-1"}),
        );
    }
    builder.start()
}

/// `gatehouse run` started as the nucleus starts a component: its environment, no config file,
/// the component's work directory as its working directory.
struct Component {
    work: TempDir,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
    env: Vec<(String, String)>,
}

impl Component {
    async fn start(nucleus: &FakeNucleus, port: u16) -> Component {
        Self::start_with_env(nucleus.env(), port).await
    }

    async fn start_with_env(env: Vec<(String, String)>, port: u16) -> Component {
        let work = tempfile::Builder::new()
            .prefix("gatehouse-gg-")
            .tempdir()
            .unwrap();
        let log = work.path().join("component.log");
        let mut component = Component {
            work,
            port,
            child: None,
            log,
            env,
        };
        component.spawn();
        component
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(gatehouse_bin())
            .arg("run")
            .current_dir(self.work.path())
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gatehouse");
        self.child = Some(child);
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn journal(&self) -> PathBuf {
        self.work.path().join("gatehouse-data/journal.db")
    }

    /// Waits until agents can connect.
    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + support::STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("component exited with {status}:\n{}", self.logs());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not listening in time:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the process to exit by itself.
    async fn exit_status(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => {
                self.child = None;
                status.unwrap()
            }
            Err(_) => panic!(
                "component still running after {timeout:?}:\n{}",
                self.logs()
            ),
        }
    }

    async fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.unwrap();
    }

    async fn stop(&mut self) -> ExitStatus {
        let child = self.child.as_ref().expect("running");
        let pid = child.id().unwrap().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        self.exit_status(support::STOP_TIMEOUT).await
    }
}

/// Every record in `publishes`' batch payloads, fragments reassembled, by `gatehouse decode`
/// over a directory of them.
async fn records_of(publishes: &[IotPublish]) -> Result<Vec<Value>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    for (i, p) in publishes.iter().enumerate() {
        std::fs::write(dir.path().join(format!("{i:08}.batch")), &p.payload)
            .map_err(|e| e.to_string())?;
    }
    let (status, text) =
        support::gatehouse_output(["decode".as_ref(), dir.path().as_os_str()]).await;
    if !status.success() {
        return Err(format!("decode failed: {text}"));
    }
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l}")))
        .collect()
}

/// Waits until every payload in `wanted` arrived at the fake's PublishToIoTCore.
async fn wait_delivered(
    nucleus: &FakeNucleus,
    wanted: &[Vec<u8>],
    component: &Component,
) -> Vec<Value> {
    let wanted: HashSet<&Vec<u8>> = wanted.iter().collect();
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let records = records_of(&nucleus.publishes()).await.unwrap_or_default();
        let have: HashSet<Vec<u8>> = records.iter().map(support::payload_bytes).collect();
        let missing = wanted.iter().filter(|p| !have.contains(**p)).count();
        if missing == 0 {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} messages never published upstream\n--- component ---\n{}",
            wanted.len(),
            support_tail(&component.logs())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn support_tail(s: &str) -> &str {
    crate::upstream_support::tail(s, 6000)
}

/// Publishes `payloads` at QoS 1 as `agent`, each acknowledged by the gateway.
async fn publish(port: u16, agent: &str, payloads: &[Vec<u8>]) {
    let mut options = support::v4_options(agent, port);
    options.set_max_packet_size(2_000_000, 2_000_000);
    let mut client = AckedPublisher::connect_with(options).await;
    for payload in payloads {
        client
            .publish(
                &format!("agents/{agent}/telemetry"),
                QoS::AtLeastOnce,
                payload.clone(),
            )
            .await
            .expect("PUBACK");
    }
    client.disconnect().await;
}

fn journal_rows(path: &Path) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
        .unwrap()
}

async fn end_to_end(mode: NucleusMode) {
    let port = free_port();
    let fake = nucleus(mode, component_config(port, json!({}))).await;
    let mut component = Component::start(&fake, port).await;
    component.wait_listening().await;
    fake.wait_for_state("RUNNING", Duration::from_secs(10))
        .await;
    let wanted = crate::upstream_support::plan("gg-agent", "event", 200);
    publish(port, "gg-agent", &wanted).await;
    let records = wait_delivered(&fake, &wanted, &component).await;
    assert!(records.iter().all(|r| r["clientId"] == json!("gg-agent")));
    for p in fake.publishes() {
        assert_eq!(p.topic, BATCH_TOPIC);
        assert_eq!(p.qos, 1);
    }
    if mode == NucleusMode::Lite {
        assert!(
            fake.oversize_frames().is_empty(),
            "{:?}",
            fake.oversize_frames()
        );
        assert!(
            fake.max_client_frame() <= 10_000,
            "{}",
            fake.max_client_frame()
        );
    }
    let logs = component.logs();
    assert!(
        logs.contains("Running as a Greengrass component."),
        "{logs}"
    );
    assert!(component.stop().await.success(), "{}", component.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_under_the_java_nucleus_forwards_every_acknowledged_message() {
    end_to_end(NucleusMode::Java).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_under_nucleus_lite_forwards_everything_in_frames_under_the_cap() {
    end_to_end(NucleusMode::Lite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_travel_as_fragments_under_the_lite_cap() {
    let port = free_port();
    let fake = nucleus(NucleusMode::Lite, component_config(port, json!({}))).await;
    let mut component = Component::start(&fake, port).await;
    component.wait_listening().await;
    // An EDR event of 45 KB and a file of 1 MB, incompressible, and small ones around them.
    let noise = |seed: u64, len: usize| -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'!' + (x % 90) as u8
            })
            .collect()
    };
    let wanted = vec![
        b"small before".to_vec(),
        noise(45, 45 * 1024),
        noise(1, 1024 * 1024),
        b"small after".to_vec(),
    ];
    publish(port, "big-agent", &wanted).await;
    let records = wait_delivered(&fake, &wanted, &component).await;
    let large = records
        .iter()
        .find(|r| support::payload_bytes(r).len() == 1024 * 1024)
        .expect("the 1 MB record");
    assert!(
        large["fragments"].as_u64().unwrap_or(0) > 100,
        "{}",
        large["fragments"]
    );
    assert!(
        fake.oversize_frames().is_empty(),
        "{:?}",
        fake.oversize_frames()
    );
    assert!(fake.max_client_frame() <= 10_000);
    poll_until("the journal to drain", DELIVERY_TIMEOUT, || async {
        match journal_rows(&component.journal()) {
            0 => Ok(()),
            n => Err(format!("{n} records left")),
        }
    })
    .await;
    assert!(component.stop().await.success());
}

/// The batch seq at the end of a cloud-confirmed publish's topic.
fn topic_seq(p: &IotPublish) -> u64 {
    p.topic.rsplit('/').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cloud_confirmation_nothing_is_released_before_its_receipt() {
    let port = free_port();
    let fake = nucleus(
        NucleusMode::Java,
        component_config(port, json!({"confirm": "cloud", "receiptTimeoutMs": 2000})),
    )
    .await;
    let mut component = Component::start(&fake, port).await;
    component.wait_listening().await;
    fake.wait_for_subscription(RECEIPT_TOPIC, Duration::from_secs(10))
        .await;
    let wanted = crate::upstream_support::plan("cloud-agent", "alert", 30);
    publish(port, "cloud-agent", &wanted).await;
    wait_delivered(&fake, &wanted, &component).await;
    // Published, but no receipt yet: every record is still in the journal.
    assert_eq!(journal_rows(&component.journal()), 30);
    // No receipt within 2 s: the batches are sent again, with the same bytes.
    let first: Vec<IotPublish> = fake.publishes();
    let seqs: HashSet<u64> = first.iter().map(topic_seq).collect();
    poll_until(
        "a resend of an unreceipted batch",
        Duration::from_secs(15),
        || async {
            let again = fake
                .publishes()
                .iter()
                .filter(|p| seqs.contains(&topic_seq(p)))
                .count();
            if again > first.len() {
                Ok(())
            } else {
                Err(format!("{again} publishes of {} batches", seqs.len()))
            }
        },
    )
    .await;
    for p in fake.publishes() {
        let original = first.iter().find(|f| f.topic == p.topic).unwrap();
        assert_eq!(
            original.payload, p.payload,
            "a resend carries the same bytes"
        );
        assert!(p.topic.starts_with(&format!("{BATCH_TOPIC}/")));
    }
    // The cloud's rule receipts each batch: now, and only now, the journal empties.
    for seq in &seqs {
        fake.send_iot_message(
            RECEIPT_TOPIC,
            json!({"batchSeq": seq}).to_string().as_bytes(),
        );
    }
    poll_until("the journal to be released", DELIVERY_TIMEOUT, || async {
        match journal_rows(&component.journal()) {
            0 => Ok(()),
            n => Err(format!("{n} records left")),
        }
    })
    .await;
    assert!(component.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_update_changes_max_delay_live() {
    let port = free_port();
    let mut config = component_config(port, json!({}));
    config["batch"]["maxDelayMs"] = json!(600_000);
    let fake = nucleus(NucleusMode::Lite, config).await;
    let mut component = Component::start(&fake, port).await;
    component.wait_listening().await;
    publish(port, "slow-agent", &[b"waits for the batch".to_vec()]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        fake.publishes().is_empty(),
        "flushed before maxDelayMs (10 min)"
    );
    fake.update_config(json!({"batch": {"maxDelayMs": 100}}));
    wait_delivered(&fake, &[b"waits for the batch".to_vec()], &component).await;
    let logs = component.logs();
    assert!(
        logs.contains("Applying a configuration change live: batch.maxDelayMs."),
        "{logs}"
    );
    assert!(!logs.contains("restarting"), "{logs}");
    assert!(component.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_deployment_is_reported_invalid_and_not_applied() {
    let port = free_port();
    let config = component_config(port, json!({}));
    let fake = nucleus(NucleusMode::Java, config.clone()).await;
    let mut component = Component::start(&fake, port).await;
    component.wait_listening().await;
    fake.wait_for_state("RUNNING", Duration::from_secs(10))
        .await;
    let mut proposed = config.clone();
    proposed["batch"]["maxDelayMs"] = json!("soon");
    let report = fake
        .validate_config(proposed, "deployment-1", Duration::from_secs(10))
        .await
        .expect("a report");
    assert_eq!(report.status, "REJECTED");
    let message = report.message.unwrap_or_default();
    assert!(message.contains("batch.maxDelayMs"), "{message}");
    let report = fake
        .validate_config(config.clone(), "deployment-2", Duration::from_secs(10))
        .await
        .expect("a report");
    assert_eq!(report.status, "ACCEPTED");
    // Still running on the old configuration.
    publish(port, "agent-1", &[b"still fine".to_vec()]).await;
    wait_delivered(&fake, &[b"still fine".to_vec()], &component).await;
    assert!(component.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_ipc_connection_ends_the_process_with_an_error() {
    let port = free_port();
    let fake = nucleus(NucleusMode::Java, component_config(port, json!({}))).await;
    let mut component = Component::start(&fake, port).await;
    component.wait_listening().await;
    fake.wait_for_state("RUNNING", Duration::from_secs(10))
        .await;
    fake.close_connections();
    let status = component.exit_status(Duration::from_secs(20)).await;
    assert!(!status.success());
    let logs = component.logs();
    assert!(
        logs.contains("lost the Greengrass IPC connection"),
        "the reason is logged:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_a_clear_error() {
    for mode in [NucleusMode::Java, NucleusMode::Lite] {
        let port = free_port();
        let fake = nucleus(mode, component_config(port, json!({}))).await;
        let env: Vec<(String, String)> = fake
            .env()
            .into_iter()
            .map(|(k, v)| {
                if k == "SVCUID" {
                    (k, "WRONGTOKEN000000".into())
                } else {
                    (k, v)
                }
            })
            .collect();
        let mut component = Component::start_with_env(env, port).await;
        let status = component.exit_status(Duration::from_secs(20)).await;
        assert!(!status.success());
        let logs = component.logs();
        assert!(
            logs.contains("refused this component's IPC token (SVCUID)"),
            "{mode:?}:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorized_publish_is_explained_and_retried_losing_nothing() {
    let port = free_port();
    let fake = nucleus(NucleusMode::Java, component_config(port, json!({}))).await;
    // The deployment forgot the mqttproxy policy; it is fixed a few attempts later.
    let mut refusals = 0;
    fake.set_publish_policy(move |_| {
        refusals += 1;
        if refusals <= 3 {
            PublishReply::unauthorized()
        } else {
            PublishReply::Accept
        }
    });
    let mut component = Component::start(&fake, port).await;
    component.wait_listening().await;
    let wanted = crate::upstream_support::plan("agent-u", "event", 10);
    publish(port, "agent-u", &wanted).await;
    wait_delivered(&fake, &wanted, &component).await;
    let logs = component.logs();
    assert!(
        logs.contains("aws.greengrass.ipc.mqttproxy") && logs.contains(BATCH_TOPIC),
        "the log names the policy and the topic:\n{logs}"
    );
    assert!(component.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let port = free_port();
    let fake = nucleus(NucleusMode::Lite, component_config(port, json!({}))).await;
    let mut component = Component::start(&fake, port).await;
    component.wait_listening().await;
    let agent = support::BackgroundAgent::start(port, "steady").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    component.kill9().await;
    let report = agent.finish().await;
    assert!(!report.acked.is_empty());
    // The nucleus restarts the component.
    component.spawn();
    component.wait_listening().await;
    wait_delivered(&fake, &report.acked, &component).await;
    assert!(fake.oversize_frames().is_empty());
    assert!(component.stop().await.success());
}

/// Client device auth (`auth.kind: greengrass`): the fake's CDA knows `device-1` and
/// `device-3` (IoT certificates from another CA than the core device CA that signs the
/// listener's certificate) and lets each connect as its thing name and publish under
/// `agents/<thing>/t/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_device_auth_admits_and_authorizes_agents_per_the_nucleus() {
    use crate::security::{connect_outcome, read_certs, server_certificate, tls_options};
    use crate::upstream_support::{Pki, Signer, Usage};

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let sans = ["localhost", "127.0.0.1"];
    let (server, server_key) = pki.issue(
        "core-1",
        "localhost",
        &sans,
        Usage::Server,
        false,
        Signer::Ca,
    );
    for device in ["device-1", "device-2", "device-3"] {
        pki.issue(device, device, &[], Usage::Client, false, Signer::OtherCa);
    }
    let pem = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    let port = free_port();
    let mut config = component_config(port, json!({}));
    config["listeners"] =
        json!([{"bind": format!("127.0.0.1:{port}"), "tls": {}, "auth": {"kind": "greengrass"}}]);
    let nucleus = nucleus(NucleusMode::Java, config).await;
    nucleus.register_client_device(&pem(pki.pair("device-1").0), "device-1");
    nucleus.register_client_device(&pem(pki.pair("device-3").0), "device-3");
    nucleus.set_client_device_policy(&[
        (
            "mqtt:connect",
            "mqtt:clientId:${iot:Connection.Thing.ThingName}",
        ),
        (
            "mqtt:publish",
            "mqtt:topic:agents/${iot:Connection.Thing.ThingName}/t/*",
        ),
        (
            "mqtt:subscribe",
            "mqtt:topicfilter:agents/${iot:Connection.Thing.ThingName}/commands/*",
        ),
    ]);
    nucleus.rotate_server_certificate(&pem(server.clone()), &pem(server_key), &[pem(pki.ca())]);
    let mut component = Component::start(&nucleus, port).await;
    component.wait_listening().await;

    // The listener serves client device auth's certificate (it arrives over IPC).
    let first = poll_until(
        "the server certificate from CDA",
        DELIVERY_TIMEOUT,
        || async { server_certificate(&pki, port, "device-1").await },
    )
    .await;
    assert_eq!(first, read_certs(&server)[0].to_vec());

    // A registered device connects as its thing and publishes where the policy allows.
    let mut agent =
        AckedPublisher::connect_with(tls_options(&pki, port, "device-1", Some("device-1"))).await;
    agent
        .publish(
            "agents/device-1/t/1",
            QoS::AtLeastOnce,
            b"cda allowed 1".to_vec(),
        )
        .await
        .unwrap();
    // An expired session token is renewed: a new topic is still authorized.
    nucleus.expire_client_device_tokens();
    agent
        .publish(
            "agents/device-1/t/2",
            QoS::AtLeastOnce,
            b"cda allowed 2".to_vec(),
        )
        .await
        .unwrap();
    agent.assert_never_disconnected("device-1");

    // Unknown certificate; a known one connecting as another thing: CONNACK not authorized.
    for (cert, id) in [("device-2", "device-2"), ("device-3", "device-1")] {
        let outcome = connect_outcome(tls_options(&pki, port, id, Some(cert))).await;
        assert_eq!(
            outcome,
            Err("CONNACK NotAuthorized".to_string()),
            "{cert} as {id}"
        );
    }

    // An empty client id: there is no thing name to ask client device auth about.
    let outcome = connect_outcome(tls_options(&pki, port, "", Some("device-1"))).await;
    assert_eq!(outcome, Err("CONNACK BadClientId".to_string()));

    // A rotated server certificate is served to new connections; the agent stays connected.
    let (rotated, rotated_key) = pki.issue(
        "core-2",
        "localhost",
        &sans,
        Usage::Server,
        false,
        Signer::Ca,
    );
    assert_eq!(
        nucleus.rotate_server_certificate(
            &pem(rotated.clone()),
            &pem(rotated_key),
            &[pem(pki.ca())]
        ),
        1
    );
    let rotated = read_certs(&rotated)[0].to_vec();
    poll_until("the rotated certificate", DELIVERY_TIMEOUT, || async {
        match server_certificate(&pki, port, "device-3").await {
            Ok(der) if der == rotated => Ok(()),
            other => Err(format!("{:?}", other.map(|d| d.len()))),
        }
    })
    .await;
    agent
        .publish(
            "agents/device-1/t/3",
            QoS::AtLeastOnce,
            b"cda allowed 3".to_vec(),
        )
        .await
        .unwrap();

    // Outside the policy (though inside the default ACL): denied; 3.1.1 closes the connection.
    let denied = agent
        .publish(
            "agents/device-1/other",
            QoS::AtLeastOnce,
            b"cda denied".to_vec(),
        )
        .await;
    assert!(denied.is_err(), "a publish CDA denies was acknowledged");
    let decisions = nucleus.client_device_decisions();
    let asked = |resource: &str, allowed: bool| {
        decisions
            .iter()
            .any(|(thing, _, r, a)| thing == "device-1" && r == resource && *a == allowed)
    };
    assert!(asked("mqtt:clientId:device-1", true), "{decisions:?}");
    assert!(
        asked("mqtt:topic:agents/device-1/t/2", true),
        "{decisions:?}"
    );
    assert!(
        asked("mqtt:topic:agents/device-1/other", false),
        "{decisions:?}"
    );
    let records = wait_delivered(
        &nucleus,
        &[
            b"cda allowed 1".to_vec(),
            b"cda allowed 2".to_vec(),
            b"cda allowed 3".to_vec(),
        ],
        &component,
    )
    .await;
    assert!(records.iter().all(|r| support::client_id(r) == "device-1"));
    assert!(
        !records
            .iter()
            .any(|r| support::payload_bytes(r) == b"cda denied")
    );
    agent.disconnect().await;
    assert!(component.stop().await.success(), "{}", component.logs());
}
