//! Agent security end to end (issue 8): TLS listeners with client-certificate identity, the
//! client-id binding, the default topic ACL on both protocol versions, password
//! authentication, certificate rotation without dropping agents, the CONNECT and handshake
//! timeouts, and a reconnect storm absorbed by the connection rate limit while connected
//! agents keep publishing. Agents are rumqttc (over rustls), mosquitto_pub and hand-built
//! packets; the PKI is generated with rcgen per test.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, TlsConfiguration};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{
    AckedPublisher, BackgroundAgent, Gateway, RawConnect, RawEvent, RawMqtt, client_id, free_port,
    gatehouse_output, metric_value_with, mqtt_packet, mqtt_string, payload_bytes, poll_until,
    raw_publish, scrape,
};
use crate::upstream_support::{Pki, Signer, Usage};

/// A gateway whose first listener is set by `listener` (merged over the harness's), with the
/// default ACL (the harness's allow-all rule removed) and a metrics endpoint.
async fn gateway(pki: Option<&Pki>, listener: impl Fn(&Pki) -> Value) -> (Gateway, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let own;
    let pki = match pki {
        Some(p) => p,
        None => {
            own = Pki::generate(dir.path());
            &own
        }
    };
    let extra = listener(pki);
    let gw = Gateway::start_with(|c| {
        c.as_object_mut().unwrap().remove("acl");
        c["metrics"] = json!({ "bind": metrics });
        for (k, v) in extra.as_object().unwrap() {
            c["listeners"][0][k] = v.clone();
        }
    })
    .await;
    (gw, metrics)
}

/// A PKI with the gateway's server certificate (`gw-server`, for localhost) and agents
/// `agent-1`, `agent-2` (test CA), `agent-expired` (test CA, expired) and `agent-rogue`
/// (signed by an unrelated CA).
fn agent_pki(dir: &Path) -> Pki {
    let pki = Pki::generate(dir);
    let sans = ["localhost", "127.0.0.1"];
    pki.issue(
        "gw-server",
        "localhost",
        &sans,
        Usage::Server,
        false,
        Signer::Ca,
    );
    for (name, expired, signer) in [
        ("agent-1", false, Signer::Ca),
        ("agent-2", false, Signer::Ca),
        ("agent-expired", true, Signer::Ca),
        ("agent-rogue", false, Signer::OtherCa),
    ] {
        pki.issue(name, name, &[], Usage::Client, expired, signer);
    }
    pki
}

fn mtls_listener(pki: &Pki) -> Value {
    let (cert, key) = pki.pair("gw-server");
    json!({"tls": {"certFile": cert, "keyFile": key, "clientCaFile": pki.ca(), "handshakeTimeoutMs": 1000}})
}

/// The certificates in a PEM file (the gateway's own reader).
pub fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    gatehouse::tls::read_certs(path, "test").unwrap()
}

/// A rustls client config trusting the test CA, presenting `cert` (a leaf name) if given.
pub fn client_tls(pki: &Pki, cert: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(&pki.ca()) {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match cert {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let (cert, key) = pki.pair(name);
            let key = gatehouse::tls::read_key(&key, "test").unwrap();
            builder
                .with_client_auth_cert(read_certs(&cert), key)
                .unwrap()
        }
    })
}

pub fn tls_options(pki: &Pki, port: u16, client_id: &str, cert: Option<&str>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "localhost", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(rumqttc::Transport::tls_with_config(
        TlsConfiguration::Rustls(client_tls(pki, cert)),
    ));
    o
}

/// How a rumqttc connection attempt ended: `Ok` on a successful CONNACK, else the refusal
/// (`CONNACK <code>`) or the transport error.
pub async fn connect_outcome(opts: MqttOptions) -> Result<(), String> {
    let (_client, mut events) = AsyncClient::new(opts, 8);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return match ack.code {
                        ConnectReturnCode::Success => Ok(()),
                        code => Err(format!("CONNACK {code:?}")),
                    };
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    return Err(format!("CONNACK {code:?}"));
                }
                Err(e) => return Err(format!("connection error: {e}")),
            }
        }
    })
    .await;
    outcome.unwrap_or_else(|_| Err("no outcome within 10 s".into()))
}

async fn refusals(metrics: &str, reason: &str) -> f64 {
    let body = scrape(metrics).await;
    metric_value_with(
        &body,
        "gatehouse_refusals_total",
        &format!("reason=\"{reason}\""),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_agents_by_certificate_and_refuses_the_rest_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let pki = agent_pki(dir.path());
    let (mut gw, metrics) = gateway(Some(&pki), mtls_listener).await;
    let handshakes_before = refusals(&metrics, "tls_handshake").await;

    // A rumqttc agent and a mosquitto_pub agent, each with its own certificate.
    let mut agent =
        AckedPublisher::connect_with(tls_options(&pki, gw.port, "agent-1", Some("agent-1"))).await;
    agent
        .publish(
            "agents/agent-1/telemetry",
            QoS::AtLeastOnce,
            b"tls event 1".to_vec(),
        )
        .await
        .unwrap();
    let (cert, key) = pki.pair("agent-2");
    let out = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "localhost",
            "-p",
            &gw.port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .arg("--cafile")
        .arg(pki.ca())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args([
            "-i",
            "agent-2",
            "-t",
            "agents/agent-2/telemetry",
            "-m",
            "tls event 2",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "mosquitto_pub over mTLS: {out:?}");

    // No certificate, an expired one, one from another CA: refused during the handshake,
    // before any MQTT packet.
    for cert in [None, Some("agent-expired"), Some("agent-rogue")] {
        let id = cert.unwrap_or("agent-without-cert");
        let outcome = connect_outcome(tls_options(&pki, gw.port, id, cert)).await;
        assert!(
            matches!(&outcome, Err(e) if e.starts_with("connection error")),
            "{id}: expected a refused handshake, got {outcome:?}"
        );
    }
    let refused = refusals(&metrics, "tls_handshake").await - handshakes_before;
    assert!(refused >= 3.0, "tls_handshake refusals counted: {refused}");

    // The records carry the certificate identity as the agent.
    let records = gw
        .wait_for_payloads(
            &[b"tls event 1".to_vec(), b"tls event 2".to_vec()],
            Duration::from_secs(15),
        )
        .await;
    let agents: HashSet<(String, Vec<u8>)> = records
        .iter()
        .map(|r| (client_id(r), payload_bytes(r)))
        .collect();
    assert!(
        agents.contains(&("agent-1".into(), b"tls event 1".to_vec())),
        "{agents:?}"
    );
    assert!(
        agents.contains(&("agent-2".into(), b"tls event 2".to_vec())),
        "{agents:?}"
    );
    agent.assert_never_disconnected("agent-1");
    agent.disconnect().await;
    gw.assert_alive();
    assert!(gw.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_take_over_another_agents_session() {
    let dir = tempfile::tempdir().unwrap();
    let pki = agent_pki(dir.path());
    let (mut gw, metrics) = gateway(Some(&pki), mtls_listener).await;
    let mut victim =
        AckedPublisher::connect_with(tls_options(&pki, gw.port, "agent-1", Some("agent-1"))).await;

    // agent-2's certificate with agent-1's client id: refused, and agent-1 keeps its session.
    let outcome = connect_outcome(tls_options(&pki, gw.port, "agent-1", Some("agent-2"))).await;
    assert_eq!(outcome, Err("CONNACK BadClientId".to_string()));
    assert_eq!(refusals(&metrics, "client_id_mismatch").await, 1.0);
    victim
        .publish(
            "agents/agent-1/telemetry",
            QoS::AtLeastOnce,
            b"still mine".to_vec(),
        )
        .await
        .unwrap();
    victim.assert_never_disconnected("the victim");
    // An empty client id gets the identity.
    connect_outcome(tls_options(&pki, gw.port, "", Some("agent-2")))
        .await
        .unwrap();
    victim.disconnect().await;
    assert!(gw.stop().await.success());
}

/// SUBSCRIBE (protocol level `version`) with one `(filter, options)` per entry.
fn raw_subscribe(version: u8, pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if version == 5 {
        body.push(0);
    }
    for f in filters {
        body.extend(mqtt_string(f.as_bytes()));
        body.push(1);
    }
    mqtt_packet(0x82, &body)
}

/// The reason codes of a SUBACK body.
fn suback_codes(version: u8, body: &[u8]) -> Vec<u8> {
    let skip = if version == 5 { 3 } else { 2 };
    body[skip..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_acl_keeps_each_agent_to_its_own_topics_on_both_protocol_versions() {
    let (mut gw, metrics) = gateway(None, |_| json!({})).await;
    let timeout = Duration::from_secs(10);

    // MQTT 5: a denied QoS 1 PUBLISH gets PUBACK 0x87, a denied filter SUBACK 0x87.
    let mut a = RawMqtt::connect(gw.port, &RawConnect::new(5, "agent-a"))
        .await
        .unwrap();
    a.send(&raw_publish(
        5,
        "agents/agent-b/telemetry",
        1,
        1,
        false,
        b"forged by a",
    ))
    .await
    .unwrap();
    let (first, body) = a.expect_packet("PUBACK", timeout).await.unwrap();
    assert_eq!((first, body[..3].to_vec()), (0x40, vec![0, 1, 0x87]));
    let deep = format!("agents/agent-a/{}", vec!["x"; 20].join("/"));
    a.send(&raw_publish(5, &deep, 1, 2, false, b"too deep"))
        .await
        .unwrap();
    let (_, body) = a.expect_packet("PUBACK", timeout).await.unwrap();
    assert_eq!(body[..3].to_vec(), vec![0, 2, 0x90], "over maxTopicLevels");
    a.send(&raw_publish(
        5,
        "agents/agent-a/telemetry",
        1,
        3,
        false,
        b"own by a",
    ))
    .await
    .unwrap();
    let (_, body) = a.expect_packet("PUBACK", timeout).await.unwrap();
    assert!(body.len() == 2 || body[2] == 0, "own topic: {body:02x?}");
    a.send(&raw_subscribe(
        5,
        4,
        &["agents/agent-b/commands/#", "agents/agent-a/commands/#"],
    ))
    .await
    .unwrap();
    let (first, body) = a.expect_packet("SUBACK", timeout).await.unwrap();
    assert_eq!(first, 0x90);
    assert_eq!(suback_codes(5, &body), vec![0x87, 0x01]);

    // MQTT 3.1.1: SUBACK 0x80; a denied QoS 0 is dropped; a denied QoS 1 closes the connection.
    let mut c = RawMqtt::connect(gw.port, &RawConnect::new(4, "agent-c"))
        .await
        .unwrap();
    c.send(&raw_subscribe(4, 1, &["#", "agents/agent-c/commands/+"]))
        .await
        .unwrap();
    let (_, body) = c.expect_packet("SUBACK", timeout).await.unwrap();
    assert_eq!(suback_codes(4, &body), vec![0x80, 0x01]);
    c.send(&raw_publish(
        4,
        "agents/agent-a/telemetry",
        0,
        0,
        false,
        b"forged qos0 by c",
    ))
    .await
    .unwrap();
    c.send(&raw_publish(
        4,
        "agents/agent-c/telemetry",
        1,
        2,
        false,
        b"own by c",
    ))
    .await
    .unwrap();
    let (first, _) = c.expect_packet("PUBACK", timeout).await.unwrap();
    assert_eq!(first, 0x40, "the connection survives a denied QoS 0");
    c.send(&raw_publish(
        4,
        "alerts/edr",
        1,
        3,
        false,
        b"forged qos1 by c",
    ))
    .await
    .unwrap();
    let after = c.until_closed(timeout).await.unwrap();
    assert!(after.is_empty(), "no PUBACK for a denied QoS 1: {after:?}");

    // Nothing denied was journaled; what was allowed (sent after it) was.
    let own = [b"own by a".to_vec(), b"own by c".to_vec()];
    let records = gw.wait_for_payloads(&own, Duration::from_secs(15)).await;
    let forged: Vec<_> = records
        .iter()
        .map(payload_bytes)
        .filter(|p| p.starts_with(b"forged") || p == b"too deep")
        .map(|p| String::from_utf8_lossy(&p).into_owned())
        .collect();
    assert!(forged.is_empty(), "denied messages journaled: {forged:?}");
    assert_eq!(refusals(&metrics, "acl_publish").await, 3.0);
    assert_eq!(refusals(&metrics, "acl_subscribe").await, 2.0);
    assert_eq!(refusals(&metrics, "topic_limit").await, 1.0);
    assert!(gw.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authentication_checks_argon2_hashes_and_reloads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    let hash_line = |user: &str, password: &str| {
        let mut child = std::process::Command::new(crate::support::gatehouse_bin())
            .args(["password-hash", user])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    std::fs::write(&passwords, hash_line("agent-p", "s3cret-pw")).unwrap();
    let file = passwords.clone();
    let (mut gw, metrics) = gateway(
        None,
        move |_| json!({"auth": {"kind": "password", "passwordFile": file}}),
    )
    .await;
    let timeout = Duration::from_secs(10);
    let connack = |version: u8, id: &str, user: &str, password: &str| {
        let connect = RawConnect::new(version, id).credentials(user, password.as_bytes());
        let port = gw.port;
        async move {
            let mut r = RawMqtt::open(port).await.unwrap();
            r.send(&connect.bytes()).await.unwrap();
            let (first, body) = r.expect_packet("CONNACK", timeout).await.unwrap();
            assert_eq!(first, 0x20);
            body[1]
        }
    };
    assert_eq!(connack(4, "agent-p", "agent-p", "s3cret-pw").await, 0);
    assert_eq!(
        connack(4, "agent-p", "agent-p", "wrong").await,
        4,
        "3.1.1 bad credentials"
    );
    assert_eq!(
        connack(5, "agent-p", "agent-p", "wrong").await,
        0x86,
        "5 bad credentials"
    );
    assert_eq!(
        connack(4, "agent-q", "agent-q", "s3cret-pw").await,
        4,
        "unknown user"
    );
    assert_eq!(
        connack(4, "agent-x", "agent-p", "s3cret-pw").await,
        2,
        "client id binding"
    );
    let mut no_password = RawMqtt::open(gw.port).await.unwrap();
    no_password
        .send(&RawConnect::new(4, "agent-p").bytes())
        .await
        .unwrap();
    let (_, body) = no_password.expect_packet("CONNACK", timeout).await.unwrap();
    assert_eq!(body[1], 4, "no credentials");
    assert_eq!(refusals(&metrics, "bad_credentials").await, 4.0);

    // A user added to the file can connect after SIGHUP, without a restart.
    let mut text = std::fs::read_to_string(&passwords).unwrap();
    text.push_str(&hash_line("agent-q", "an0ther"));
    std::fs::write(&passwords, text).unwrap();
    let pid = gw.pid().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    poll_until("agent-q admitted after the reload", timeout, || async {
        match connack(4, "agent-q", "agent-q", "an0ther").await {
            0 => Ok(()),
            code => Err(format!("CONNACK {code}")),
        }
    })
    .await;
    let logs = gw.logs();
    assert!(
        !logs.contains("s3cret-pw") && !logs.contains("an0ther"),
        "a password reached the log"
    );
    assert!(gw.stop().await.success());
}

/// Opens a TLS connection presenting `cert`; returns the server's certificate.
pub async fn server_certificate(pki: &Pki, port: u16, cert: &str) -> Result<Vec<u8>, String> {
    let connector = tokio_rustls::TlsConnector::from(client_tls(pki, Some(cert)));
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    // TLS 1.3 sends the client's certificate after the server's Finished: only an MQTT
    // answer shows the server accepted it.
    tls.write_all(&RawConnect::new(4, cert).bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 && buf[0] == 0x20 => Ok(der),
        other => Err(format!("refused: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_disk_without_dropping_connected_agents() {
    let dir = tempfile::tempdir().unwrap();
    let pki = agent_pki(dir.path());
    // The client CA file is a copy the test rewrites.
    let client_ca = dir.path().join("client-ca.pem");
    std::fs::copy(pki.ca(), &client_ca).unwrap();
    let ca_file = client_ca.clone();
    let (mut gw, _metrics) = gateway(Some(&pki), move |pki| {
        let mut l = mtls_listener(pki);
        l["tls"]["clientCaFile"] = json!(ca_file);
        l
    })
    .await;
    let mut agent =
        AckedPublisher::connect_with(tls_options(&pki, gw.port, "agent-1", Some("agent-1"))).await;
    let first = server_certificate(&pki, gw.port, "agent-2").await.unwrap();

    // A renewed server certificate is picked up from the file, no signal needed.
    let sans = ["localhost", "127.0.0.1"];
    let (renewed, _) = pki.issue(
        "gw-server",
        "localhost",
        &sans,
        Usage::Server,
        false,
        Signer::Ca,
    );
    let renewed = read_certs(&renewed)[0].to_vec();
    assert_ne!(first, renewed);
    poll_until(
        "the renewed server certificate",
        Duration::from_secs(15),
        || async {
            match server_certificate(&pki, gw.port, "agent-2").await {
                Ok(der) if der == renewed => Ok(()),
                Ok(_) => Err("still the old certificate".to_string()),
                Err(e) => Err(e),
            }
        },
    )
    .await;

    // A new client CA (SIGHUP): agents of the old CA are refused from now on, the new CA's
    // admitted, and the agent connected before keeps its connection.
    pki.issue(
        "agent-new",
        "agent-new",
        &[],
        Usage::Client,
        false,
        Signer::OtherCa,
    );
    std::fs::copy(pki.other_ca(), &client_ca).unwrap();
    let pid = gw.pid().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    poll_until("the new client CA", Duration::from_secs(15), || async {
        match (
            server_certificate(&pki, gw.port, "agent-new").await,
            server_certificate(&pki, gw.port, "agent-2").await,
        ) {
            (Ok(_), Err(_)) => Ok(()),
            other => Err(format!("agent-new / agent-2: {other:?}")),
        }
    })
    .await;
    agent
        .publish(
            "agents/agent-1/telemetry",
            QoS::AtLeastOnce,
            b"after rotation".to_vec(),
        )
        .await
        .unwrap();
    agent.assert_never_disconnected("the agent connected before the rotation");
    gw.wait_for_payloads(&[b"after rotation".to_vec()], Duration::from_secs(15))
        .await;
    agent.disconnect().await;
    assert!(gw.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_connect_or_the_handshake_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = agent_pki(dir.path());
    let (mut plain, metrics) = gateway(None, |_| json!({"connectTimeoutMs": 1000})).await;
    let (mut tls, tls_metrics) = gateway(Some(&pki), mtls_listener).await;

    // A CONNECT sent one byte every 200 ms (slowloris), and a TLS socket that says nothing.
    let connect = RawConnect::new(4, "slow-agent").bytes();
    let started = Instant::now();
    let mut slow = RawMqtt::open(plain.port).await.unwrap();
    let mut closed_after = None;
    for byte in &connect {
        if slow.send(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        if let RawEvent::Closed = slow.read(Duration::from_millis(200)).await.unwrap() {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the slow CONNECT was served in full");
    assert!(
        closed_after < Duration::from_millis(2500),
        "closed after {closed_after:?}, connectTimeoutMs is 1000"
    );
    let silent = TcpStream::connect(("127.0.0.1", tls.port)).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    use tokio::io::AsyncReadExt;
    let mut silent = silent;
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "silent TLS socket still open: {read:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(refusals(&metrics, "connect_timeout").await >= 1.0);
    assert!(refusals(&tls_metrics, "tls_handshake").await >= 1.0);
    assert!(plain.stop().await.success());
    assert!(tls.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_2000_agents_is_absorbed_while_connected_agents_publish() {
    // The test process holds 2,000 sockets too.
    let _ = rlimit::increase_nofile_limit(8192);
    let (mut gw, metrics) = gateway(
        None,
        |_| json!({"connectionsPerSec": 800, "connectionBurst": 400, "connectTimeoutMs": 30000}),
    )
    .await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(BackgroundAgent::start(gw.port, &format!("steady-{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let port = gw.port;
    let storm: Vec<_> = (0..2000)
        .map(|i| {
            tokio::spawn(async move {
                let connect = RawConnect::new(4, &format!("storm-{i}"));
                let mut r = RawMqtt::open(port).await?;
                r.send(&connect.bytes()).await?;
                let (first, body) = r.expect_packet("CONNACK", Duration::from_secs(30)).await?;
                if first != 0x20 || body[1] != 0 {
                    return Err(format!("storm-{i}: CONNACK {body:02x?}"));
                }
                Ok::<RawMqtt, String>(r)
            })
        })
        .collect();
    let mut connected = Vec::new();
    let mut failures = Vec::new();
    for t in storm {
        match t.await.unwrap() {
            Ok(c) => connected.push(c),
            Err(e) => failures.push(e),
        }
    }
    let took = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} storm agents failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    // 400 at once, then 800/s: the last waited in the listen backlog, none was refused.
    assert!(
        took >= Duration::from_millis(1500),
        "no rate limit seen: {took:?}"
    );
    let body = scrape(&metrics).await;
    let throttled = metric_value_with(&body, "gatehouse_throttled_total", "what=\"connections\"");
    assert!(throttled.unwrap_or(0.0) > 0.0, "throttling not counted");

    let mut acked = Vec::new();
    for a in agents {
        let report = a.finish().await;
        assert!(
            report.failures.is_empty(),
            "a connected agent was disturbed: {:?}",
            report.failures
        );
        assert_eq!(report.connection_errors, 0);
        acked.extend(report.acked);
    }
    assert!(acked.len() > 50, "too little traffic: {}", acked.len());
    gw.wait_for_payloads(&acked, Duration::from_secs(30)).await;
    drop(connected);
    assert!(gw.stop().await.success());
}

#[tokio::test]
async fn check_config_refuses_plain_tcp_on_the_network_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gatehouse.json");
    std::fs::write(&file, r#"{"listeners": [{"bind": "0.0.0.0:1883"}]}"#).unwrap();
    let (status, text) = gatehouse_output(["check-config".as_ref(), file.as_os_str()]).await;
    assert_eq!(status.code(), Some(64), "{text}");
    assert!(text.contains("listeners[0].allowPlaintext"), "{text}");
}
