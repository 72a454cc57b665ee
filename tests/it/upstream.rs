//! The `mqtt` upstream against a real broker: mosquitto with TLS and client certificates
//! (from a test PKI generated with rcgen) stands in for AWS IoT Core, and `mosquitto_sub`
//! (persistent session, QoS 1) is the cloud-side consumer whose payloads are decoded with
//! `gatehouse decode --header`. See `upstream_support.rs` for why no PUBACKed batch can be
//! lost at the test broker, even across broker restarts.
//!
//! * end to end (MQTT 3.1.1 and 5 upstream): every agent message arrives once, in order;
//! * broker outage and 20 quick flaps under load: nothing PUBACKed is lost, duplicates only
//!   as whole batches with a repeated batchSeq;
//! * kill -9 while the upstream is down: the journaled backlog is delivered after restart;
//! * TLS failures (unknown CA, expired client certificate, host name mismatch): the cause is
//!   logged once, the gateway keeps retrying and keeps accepting agents' messages;
//! * pacing: maxPublishesPerSec holds while a backlog drains;
//! * disk bound: journal.maxBytes evicts QoS 0 first, then refuses QoS 1 (MQTT 5 PUBACK 0x97,
//!   MQTT 3.1.1 close); nothing PUBACKed is lost.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::Rng;
use rumqttc::QoS;
use serde_json::json;

use crate::support::{
    self, AckedPublisher, BackgroundAgent, RAW_PINGREQ, RawConnect, RawEvent, RawMqtt, client_id,
    describe_packet, describe_packets, payload_bytes, poll_until, raw_publish, raw_pubrel, show,
};
use crate::upstream_support::{
    Relay, UP_TOPIC, UPSTREAM_CLIENT_ID, UpBatch, Upstream, assert_clean, log_lines, metric,
    publish_all_acked, start_gateway, tail, unique_batch_records, wait_link_down, wait_metric,
};

/// Deadline for a backlog to arrive upstream.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

type Msg = (String, Vec<u8>);

// ---------------------------------------------------------------- 1. end to end

async fn end_to_end(protocol: &str) {
    let mut up = Upstream::start().await;
    let proto = protocol.to_string();
    let (mut gw, metrics) = start_gateway(&up, "client", move |c| {
        c["upstream"]["protocol"] = json!(proto);
    })
    .await;
    let port = gw.port;

    let agents: Vec<String> = (0..3).map(|i| format!("up-e2e-{protocol}-{i}")).collect();
    let plans: HashMap<String, Vec<Vec<u8>>> = agents
        .iter()
        .map(|a| {
            let plan = (0..60)
                .map(|i| format!("{a} msg #{i} {}", "x".repeat(i * 7)).into_bytes())
                .collect();
            (a.clone(), plan)
        })
        .collect();
    let runs = agents.iter().map(|a| {
        let plan = plans[a].clone();
        let a = a.clone();
        async move {
            let mut agent = AckedPublisher::connect(&a, port).await;
            let topic = format!("agents/{a}/telemetry");
            for p in plan {
                agent
                    .publish(&topic, QoS::AtLeastOnce, p.clone())
                    .await
                    .map_err(|e| format!("{a}: {:?}: {e}", show(&p)))?;
            }
            agent.disconnect().await;
            Ok::<(), String>(())
        }
    });
    let results = futures_join_all(runs.collect()).await;
    gw.assert_alive();
    for r in results {
        r.unwrap_or_else(|e| panic!("agent failed: {e}\n{}", gw.logs()));
    }

    let wanted: Vec<Msg> = agents
        .iter()
        .flat_map(|a| plans[a].iter().map(move |p| (a.clone(), p.clone())))
        .collect();
    let batches = up.wait_for(&gw, &wanted, UPSTREAM_TIMEOUT).await;
    assert_clean(&batches, &gw);

    // Nothing but the gateway's batches reached the cloud side.
    let foreign: Vec<String> = up
        .collector
        .arrivals()
        .iter()
        .filter(|a| a.topic != UP_TOPIC)
        .map(|a| a.topic.clone())
        .collect();
    assert!(
        foreign.is_empty(),
        "unexpected upstream topics: {foreign:?}"
    );

    // Exactly once by (clientId, payload): no restart, so not even whole-batch duplicates.
    let mut count: HashMap<Msg, usize> = HashMap::new();
    for b in &batches {
        for r in b.records.iter() {
            *count.entry((client_id(r), payload_bytes(r))).or_default() += 1;
            if r["qos"] != json!(1)
                || r["topic"] != json!(format!("agents/{}/telemetry", client_id(r)))
            {
                panic!("record with wrong topic/qos: {r}");
            }
        }
    }
    let wrong: Vec<String> = count
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|((c, p), n)| format!("({c}, {}) x{n}", show(p)))
        .collect();
    assert!(wrong.is_empty(), "not exactly once upstream: {wrong:?}");
    assert_eq!(
        count.len(),
        wanted.len(),
        "upstream holds records nobody published"
    );

    // In publish order per agent, in the order the cloud side received them.
    for a in &agents {
        let got: Vec<Vec<u8>> = batches
            .iter()
            .flat_map(|b| b.records.iter())
            .filter(|r| client_id(r) == *a)
            .map(payload_bytes)
            .collect();
        assert!(
            got == plans[a],
            "{a}: upstream order differs from publish order"
        );
    }

    // The broker saw the gateway connect as clientId = thingName, clean session, keepAlive
    // 30 s, with the configured protocol (mosquitto: p2 = 3.1.1, p5 = 5).
    let p = if protocol == "5" { "p5" } else { "p2" };
    let needle = format!("as {UPSTREAM_CLIENT_ID} ({p}, c1, k30");
    assert!(
        up.broker.logs().contains(&needle),
        "broker log lacks {needle:?}:\n{}",
        tail(&up.broker.logs(), 3000)
    );
    assert!(
        !log_lines(&gw, "Upstream connected.").is_empty(),
        "no `Upstream connected.` in the gateway log"
    );

    let distinct: HashSet<u64> = batches.iter().map(UpBatch::batch_seq).collect();
    wait_metric(
        &metrics,
        "gatehouse_upstream_connected",
        Duration::from_secs(5),
        |v| v == 1.0,
    )
    .await;
    let acks = wait_metric(
        &metrics,
        "gatehouse_upstream_acks_total",
        Duration::from_secs(5),
        |v| v >= distinct.len() as f64,
    )
    .await;
    let publishes = metric(&metrics, "gatehouse_upstream_publishes_total")
        .await
        .unwrap_or(0.0);
    assert!(
        publishes >= acks,
        "publishes_total {publishes} < acks_total {acks}"
    );

    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

/// Run `futs` concurrently (spawned) and collect their outputs in order.
async fn futures_join_all<F>(futs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_end_to_end_mqtt311() {
    end_to_end("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_end_to_end_mqtt5() {
    end_to_end("5").await;
}

// ---------------------------------------------------------------- 2. outage and flaps

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_broker_outage_and_flaps() {
    let mut up = Upstream::start().await;
    let (mut gw, metrics) = start_gateway(&up, "client", |c| {
        c["batch"]["maxDelayMs"] = json!(200);
    })
    .await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(BackgroundAgent::start(gw.port, &format!("up-flap-{i}")).await);
    }

    // Traffic flows upstream before the first outage.
    poll_until("first batches upstream", UPSTREAM_TIMEOUT, || async {
        let n = up.collector.batches(UP_TOPIC).await.len();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} batches"))
        }
    })
    .await;

    // ~3 s outage under load, then wait until the gateway is connected again.
    let connects_before = metric(&metrics, "gatehouse_upstream_connects_total")
        .await
        .unwrap_or(0.0);
    up.stop_broker().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    up.start_broker().await;
    wait_metric(
        &metrics,
        "gatehouse_upstream_connects_total",
        Duration::from_secs(15),
        |v| v > connects_before,
    )
    .await;

    // 20 quick flaps: down 200-300 ms, up 300-700 ms (the gateway's backoff is 1-2 s, so it
    // reconnects in some of the up windows and is cut off again, possibly mid-publish).
    for _ in 0..20 {
        up.stop_broker().await;
        let down = rand::rng().random_range(200..=300);
        tokio::time::sleep(Duration::from_millis(down)).await;
        up.start_broker().await;
        let upt = rand::rng().random_range(300..=700);
        tokio::time::sleep(Duration::from_millis(upt)).await;
        gw.assert_alive();
    }

    let mut acked: Vec<Msg> = Vec::new();
    let mut failures = Vec::new();
    for (i, a) in agents.into_iter().enumerate() {
        let r = a.finish().await;
        let id = format!("up-flap-{i}");
        failures.extend(r.failures.iter().map(|f| format!("{id}: {f}")));
        if r.connection_errors > 0 {
            failures.push(format!("{id}: {} connection errors", r.connection_errors));
        }
        acked.extend(r.acked.into_iter().map(|p| (id.clone(), p)));
    }
    assert!(
        failures.is_empty(),
        "agents were disturbed by the upstream outage: {failures:?}\n--- gateway log (tail) ---\n{}",
        tail(&gw.logs(), 4000)
    );
    assert!(acked.len() > 100, "too little traffic: {}", acked.len());

    let batches = up.wait_for(&gw, &acked, UPSTREAM_TIMEOUT).await;
    assert_clean(&batches, &gw);
    let acked_set: HashSet<&Msg> = acked.iter().collect();
    let unknown: Vec<String> = unique_batch_records(&batches)
        .iter()
        .map(|r| (client_id(r), payload_bytes(r)))
        .filter(|m| !acked_set.contains(m))
        .map(|(c, p)| format!("{c}: {}", show(&p)))
        .collect();
    assert!(
        unknown.is_empty(),
        "upstream records that no agent had PUBACKed: {unknown:?}"
    );
    let distinct: HashSet<u64> = batches.iter().map(UpBatch::batch_seq).collect();
    eprintln!(
        "outage/flaps: {} messages, {} batches, {} payloads received ({} re-sent), {} connects, collector restarts {}",
        acked.len(),
        distinct.len(),
        batches.len(),
        batches.len() - distinct.len(),
        metric(&metrics, "gatehouse_upstream_connects_total")
            .await
            .unwrap_or(-1.0),
        up.collector.restarts()
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

// ---------------------------------------------------------------- 3. kill -9 while down

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_kill9_while_upstream_down() {
    let mut up = Upstream::start().await;
    up.stop_broker().await;
    let (mut gw, _metrics) = start_gateway(&up, "client", |_| {}).await;
    let port = gw.port;

    // The gateway notices the broker is unreachable (contract cause `cannot reach`).
    wait_link_down(&gw, "cannot reach").await;

    // The journal accepts offline: every message is PUBACKed.
    let mut wanted: Vec<Msg> = Vec::new();
    let mut runs = Vec::new();
    for i in 0..3 {
        let id = format!("up-k9-{i}");
        let payloads: Vec<Vec<u8>> = (0..100)
            .map(|n| format!("{id} offline #{n}").into_bytes())
            .collect();
        wanted.extend(payloads.iter().map(|p| (id.clone(), p.clone())));
        runs.push(async move {
            publish_all_acked(port, &id, &format!("agents/{id}/telemetry"), &payloads).await
        });
    }
    for r in futures_join_all(runs).await {
        r.unwrap_or_else(|e| panic!("offline publish failed: {e}\n{}", gw.logs()));
    }

    gw.kill9().await;
    gw.restart().await;
    up.start_broker().await;

    let batches = up.wait_for(&gw, &wanted, UPSTREAM_TIMEOUT).await;
    assert_clean(&batches, &gw);
    let wanted_set: HashSet<&Msg> = wanted.iter().collect();
    let recs = unique_batch_records(&batches);
    let extra: Vec<String> = recs
        .iter()
        .map(|r| (client_id(r), payload_bytes(r)))
        .filter(|m| !wanted_set.contains(m))
        .map(|(c, p)| format!("{c}: {}", show(&p)))
        .collect();
    assert!(extra.is_empty(), "unexpected records upstream: {extra:?}");
    assert_eq!(
        recs.len(),
        wanted.len(),
        "records upstream (each batchSeq counted once) != messages published"
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

// ---------------------------------------------------------------- 4. TLS errors

/// Does the broker (OpenSSL) answer this expired client certificate with the TLS alert
/// certificate_expired? Asked with `openssl s_client` (None if openssl is unavailable).
async fn broker_alert_for(up: &Upstream, client: &str) -> Option<String> {
    let (cert, key) = up.pki.pair(client);
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{}", up.broker.port))
        .args(["-servername", "localhost", "-ign_eof", "-CAfile"])
        .arg(up.pki.ca())
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let _ = child.stdin.take();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .ok()?
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.contains("alert"))
        .map(str::to_string)
}

/// One TLS failure case: a fresh broker (server certificate `server`) and gateway (client
/// certificate `client`, optionally another caFile). Checks: the expected cause is logged in
/// exactly one `Upstream link down.` line although the gateway retried (>= 3 TCP connections
/// seen by the broker), it never connected, it keeps running and PUBACKs agents' messages.
async fn tls_case(server: &str, client: &str, other_ca: bool, causes: &[&str]) {
    let up = Upstream::start_with_server(server).await;
    let other = up.pki.other_ca();
    let mark = up.broker.log_len();
    let (mut gw, metrics) = start_gateway(&up, client, move |c| {
        if other_ca {
            c["upstream"]["caFile"] = json!(other);
        }
    })
    .await;

    let connections = || {
        up.broker
            .log_since(mark)
            .lines()
            .filter(|l| l.contains("New connection from"))
            .count()
    };
    poll_until(
        "3 connection attempts at the broker",
        Duration::from_secs(25),
        || async {
            match connections() {
                n if n >= 3 => Ok(()),
                n => Err(format!(
                    "{n} attempts; gateway log tail: {}",
                    tail(&gw.logs(), 1500)
                )),
            }
        },
    )
    .await;
    gw.assert_alive();

    // The journal keeps accepting while the upstream fails.
    let mut agent = AckedPublisher::connect("up-tls-agent", gw.port).await;
    agent
        .publish(
            "agents/up-tls-agent/telemetry",
            QoS::AtLeastOnce,
            b"accepted while the upstream fails".to_vec(),
        )
        .await
        .unwrap_or_else(|e| panic!("QoS 1 publish not PUBACKed: {e}\n{}", gw.logs()));
    agent.disconnect().await;

    // One more attempt after the agent's message, then look at the log.
    let seen = connections();
    // Reconnects are 1-2 s apart; 30 s leaves room for a loaded CI machine.
    poll_until(
        "another connection attempt",
        Duration::from_secs(30),
        || async {
            if connections() > seen {
                Ok(())
            } else {
                Err(format!("{} attempts", connections()))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let that attempt fail and be logged
    gw.assert_alive();
    let down = log_lines(&gw, "Upstream link down.");
    let attempts = connections();
    assert!(
        down.len() == 1 && down[0].contains("cause=") && causes.iter().all(|c| down[0].contains(c)),
        "expected exactly one `Upstream link down.` line with a cause containing {causes:?} \
         after {attempts} connection attempts, got {down:#?}\n--- gateway log ---\n{}",
        gw.logs()
    );
    eprintln!("{attempts} attempts, logged once: {}", down[0]);
    assert!(
        down[0].contains("WARN"),
        "link-down line not at WARN: {}",
        down[0]
    );
    assert!(
        log_lines(&gw, "Upstream connected.").is_empty(),
        "the gateway claims to be connected"
    );
    assert_eq!(
        metric(&metrics, "gatehouse_upstream_connected").await,
        Some(0.0),
        "gatehouse_upstream_connected"
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_unknown_ca() {
    tls_case(
        "server",
        "client",
        true,
        &["server certificate not trusted"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_expired_client_certificate() {
    // OpenSSL maps X509_V_ERR_CERT_HAS_EXPIRED to the alert certificate_expired; if this
    // broker says so (checked with openssl s_client), the cause must say `expired` too.
    let probe = Upstream::start().await;
    let alert = broker_alert_for(&probe, "client-expired").await;
    drop(probe);
    eprintln!("broker's alert for an expired client certificate: {alert:?}");
    let says_expired = alert
        .as_deref()
        .is_some_and(|a| a.contains("certificate expired"));
    let mut causes = vec!["client certificate rejected by broker"];
    if says_expired {
        causes.push("expired");
    }
    tls_case("server", "client-expired", false, &causes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_host_mismatch() {
    // The broker presents a certificate for `otherhost` only; the gateway dials `localhost`.
    tls_case(
        "server-otherhost",
        "client",
        false,
        &["server certificate does not match host"],
    )
    .await;
}

// ---------------------------------------------------------------- 5. pacing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_pacing_limits_publish_rate() {
    const RATE: usize = 20;
    // The outage is a closed relay in front of the broker, not a stopped broker: the
    // collector stays connected, so its arrival times are the broker's receive times. (After
    // a broker restart the collector may reconnect after the gateway, and the broker would
    // hand it the queued publishes in one burst.)
    let mut up = Upstream::start().await;
    let relay = Relay::start(up.broker.port).await;
    let relay_port = relay.port;
    let (mut gw, _metrics) = start_gateway(&up, "client", move |c| {
        c["batch"] = json!({"maxBytes": 2048, "maxMessages": 1000, "maxDelayMs": 50,
                            "compression": "none"});
        c["upstream"]["maxPublishesPerSec"] = json!(RATE);
        c["upstream"]["port"] = json!(relay_port);
    })
    .await;
    let port = gw.port;
    poll_until(
        "the gateway to see the outage",
        Duration::from_secs(15),
        || async {
            match log_lines(&gw, "Upstream link down.").len() {
                0 => Err("no `Upstream link down.` yet".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;

    // ~300-byte payloads: the gateway admits a record only if it fits alone with room for a
    // worst-case compression bound (+1 KiB) and a 520-byte header reserve (~340 bytes of
    // payload at most with 2048-byte batches); ~4 records fill a batch: 400 messages make
    // ~100 batches, 5 s at 20 publishes/s.
    let mut wanted: Vec<Msg> = Vec::new();
    let mut runs = Vec::new();
    for i in 0..4 {
        let id = format!("up-pace-{i}");
        let payloads: Vec<Vec<u8>> = (0..100)
            .map(|n| format!("{id} #{n:03} {}", "p".repeat(300)).into_bytes())
            .collect();
        wanted.extend(payloads.iter().map(|p| (id.clone(), p.clone())));
        runs.push(async move {
            publish_all_acked(port, &id, &format!("agents/{id}/telemetry"), &payloads).await
        });
    }
    for r in futures_join_all(runs).await {
        r.unwrap_or_else(|e| panic!("offline publish failed: {e}\n{}", gw.logs()));
    }

    relay.set_open(true);
    let batches = up.wait_for(&gw, &wanted, UPSTREAM_TIMEOUT).await;
    assert_clean(&batches, &gw);
    assert!(
        batches.len() >= 60,
        "expected a backlog of many small batches, got {} batches",
        batches.len()
    );

    // Arrival times at the collector (every PUBLISH the broker got, re-sends included).
    let mut times: Vec<f64> = batches.iter().map(|b| b.at).collect();
    times.sort_by(f64::total_cmp);
    let mut worst = (0usize, 0f64);
    for (i, t) in times.iter().enumerate() {
        let n = times[i..].iter().take_while(|u| **u < t + 1.0).count();
        if n > worst.0 {
            worst = (n, *t);
        }
    }
    let span = times.last().unwrap() - times.first().unwrap();
    eprintln!(
        "pacing: {} publishes over {span:.2} s, busiest 1 s window {} (from {:.3})",
        times.len(),
        worst.0,
        worst.1
    );
    // Bound: a token bucket refilling at RATE/s with a burst of one publish (it starts full:
    // +1), which lets a publish go whenever its balance is not negative (debt of at most one
    // publish: +1), lets at most RATE + 2 through in any 1-s window. Arrival times are taken
    // by mosquitto_sub, so broker/collector scheduling jitter could only add to that; steady
    // pacing at exactly RATE/s shows RATE or RATE + 1 per window.
    assert!(
        worst.0 <= RATE + 2,
        "{} publishes arrived within one second (maxPublishesPerSec = {RATE}), from t={:.3}; \
         all arrival times: {times:?}",
        worst.0,
        worst.1
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

// ---------------------------------------------------------------- 6. disk bound

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_disk_bound_evicts_qos0_then_refuses_qos1() {
    let mut up = Upstream::start().await;
    up.stop_broker().await;
    let (mut gw, metrics) = start_gateway(&up, "client", |c| {
        c["journal"]["maxBytes"] = json!(65536);
    })
    .await;
    let topic = "agents/disk-v5/telemetry";
    let filler = |tag: &str| format!("{tag} {}", "d".repeat(1000)).into_bytes();

    let mut v5 = RawMqtt::connect(gw.port, &RawConnect::new(5, "disk-v5"))
        .await
        .expect("MQTT 5 agent connects");
    // 1. QoS 0: ~120 KB into a 64 KiB journal (the oldest QoS 0 make room for newer ones).
    let q0: Vec<Vec<u8>> = (0..120)
        .map(|i| filler(&format!("disk-v5 q0 #{i:03}")))
        .collect();
    for p in &q0 {
        v5.send(&raw_publish(5, topic, 0, 0, false, p))
            .await
            .unwrap();
    }
    v5.send(&RAW_PINGREQ).await.unwrap();
    let (f, b) = v5
        .expect_packet("PINGRESP", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(f, 0xD0, "expected PINGRESP, got {}", describe_packet(f, &b));

    // 2. QoS 1 until refused with PUBACK reason 0x97 (Quota exceeded).
    let mut accepted: Vec<Vec<u8>> = Vec::new();
    let mut refused: Vec<Vec<u8>> = Vec::new();
    for i in 0..500u16 {
        let p = filler(&format!("disk-v5 q1 #{i:03}"));
        v5.send(&raw_publish(5, topic, 1, i + 1, false, &p))
            .await
            .unwrap();
        let (f, b) = v5
            .expect_packet("PUBACK", Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("QoS 1 #{i}: {e}\n{}", gw.logs()));
        assert!(
            f == 0x40 && b.len() >= 2 && u16::from_be_bytes([b[0], b[1]]) == i + 1,
            "QoS 1 #{i}: expected PUBACK for packet id {}, got {}",
            i + 1,
            describe_packet(f, &b)
        );
        match b.get(2).copied().unwrap_or(0) {
            0x00 => accepted.push(p),
            0x97 => {
                refused.push(p);
                break;
            }
            rc => panic!("QoS 1 #{i}: unexpected PUBACK reason 0x{rc:02x}"),
        }
    }
    assert!(
        !refused.is_empty(),
        "500 QoS 1 messages of 1 KB were all accepted by a 64 KiB journal"
    );
    assert!(
        !accepted.is_empty(),
        "no QoS 1 message accepted at all (QoS 0 should have been evicted to make room)"
    );
    // Still full: the next one is refused too.
    let again = filler("disk-v5 q1 again");
    v5.send(&raw_publish(5, topic, 1, 600, false, &again))
        .await
        .unwrap();
    let (f, b) = v5
        .expect_packet("PUBACK", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        f == 0x40 && b.get(2) == Some(&0x97),
        "second QoS 1 while full: expected PUBACK 0x97, got {}",
        describe_packet(f, &b)
    );
    refused.push(again);
    // A QoS 2 PUBLISH refused with PUBREC 0x97 was not stored: its packet id is not held as
    // "already journaled", so the agent's retry later is stored, not answered from memory.
    // Its DUP re-send, arriving before the first copy's answer, is refused too: it must not
    // be answered "already journaled" on the strength of a commit that then failed.
    let q2 = filler("disk-v5 q2 refused then retried");
    let mut both = raw_publish(5, topic, 2, 800, false, &q2);
    both.extend(raw_publish(5, topic, 2, 800, true, &q2));
    v5.send(&both).await.unwrap();
    for copy in ["first", "DUP"] {
        let (f, b) = v5
            .expect_packet("PUBREC", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            f == 0x50 && b[..2] == 800u16.to_be_bytes() && b.get(2) == Some(&0x97),
            "QoS 2 while full ({copy} copy): expected PUBREC 0x97 for packet id 800, got {}",
            describe_packet(f, &b)
        );
    }

    // 3. MQTT 3.1.1 cannot say "quota exceeded": the connection is closed without PUBACK.
    let v4_payload = filler("disk-v4 q1 refused");
    let mut v4 = RawMqtt::connect(gw.port, &RawConnect::new(4, "disk-v4"))
        .await
        .expect("MQTT 3.1.1 agent connects");
    v4.send(&raw_publish(
        4,
        "agents/disk-v4/telemetry",
        1,
        1,
        false,
        &v4_payload,
    ))
    .await
    .unwrap();
    let got = v4
        .until_closed(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("MQTT 3.1.1 QoS 1 while full: {e}"));
    assert!(
        !got.iter().any(|(f, _)| *f == 0x40),
        "MQTT 3.1.1 QoS 1 while full was PUBACKed: {}",
        describe_packets(&got)
    );

    let body = support::scrape(&metrics).await;
    let evicted = support::metric_value(&body, "gatehouse_journal_evicted_total").unwrap_or(0.0);
    let full =
        support::metric_value_with(&body, "gatehouse_refusals_total", "reason=\"journal_full\"")
            .unwrap_or(0.0);
    assert!(evicted > 0.0, "gatehouse_journal_evicted_total = {evicted}");
    assert!(
        full >= 2.0,
        "gatehouse_refusals_total{{reason=\"journal_full\"}} = {full} after 2 refused QoS 1 \
         (0x97) and one 3.1.1 close"
    );

    // 4. Upstream back: every PUBACKed QoS 1 arrives; the missing ones are QoS 0 only.
    up.start_broker().await;
    let wanted: Vec<Msg> = accepted
        .iter()
        .map(|p| ("disk-v5".to_string(), p.clone()))
        .collect();
    let batches = up.wait_for(&gw, &wanted, UPSTREAM_TIMEOUT).await;
    assert_clean(&batches, &gw);
    // Let anything else still queued arrive before judging what is missing.
    poll_until("the journal to drain", UPSTREAM_TIMEOUT, || async {
        match metric(&metrics, "gatehouse_journal_rows").await {
            Some(0.0) => Ok(()),
            v => Err(format!("gatehouse_journal_rows = {v:?}")),
        }
    })
    .await;
    let batches = up.batches().await;
    let recs = unique_batch_records(&batches);
    let got: HashSet<Vec<u8>> = recs.iter().map(payload_bytes).collect();
    let q0_set: HashSet<&Vec<u8>> = q0.iter().collect();
    let acc_set: HashSet<&Vec<u8>> = accepted.iter().collect();
    for r in &recs {
        let p = payload_bytes(r);
        let expected_qos = if q0_set.contains(&p) {
            0
        } else if acc_set.contains(&p) {
            1
        } else {
            panic!("unexpected record upstream (refused or unknown): {r}");
        };
        assert_eq!(r["qos"], json!(expected_qos), "record {r}");
    }
    let missing_q0 = q0.iter().filter(|p| !got.contains(*p)).count();
    let body = support::scrape(&metrics).await;
    let evicted = support::metric_value(&body, "gatehouse_journal_evicted_total").unwrap_or(0.0);
    let arrived_q0: Vec<String> = batches
        .iter()
        .flat_map(|b| b.records.iter().map(move |r| (b, r)))
        .filter(|(_, r)| r["qos"] == json!(0))
        .map(|(b, r)| {
            format!(
                "{} (seq {}, batchSeq {})",
                show(&payload_bytes(r)[..18]),
                r["seq"],
                b.batch_seq()
            )
        })
        .collect();
    // Every evicted record is a QoS 0 record that never reaches the cloud; dropped new QoS 0
    // messages are missing too, so: evicted <= missing QoS 0.
    assert!(
        missing_q0 > 0 && evicted <= missing_q0 as f64,
        "{missing_q0} of {} QoS 0 messages missing upstream but gatehouse_journal_evicted_total = \
         {evicted}: records counted as evicted were delivered. QoS 0 records that arrived: \
         {arrived_q0:#?}\n--- gateway log ---\n{}",
        q0.len(),
        gw.logs()
    );
    eprintln!(
        "disk bound: {} QoS 1 accepted, {} refused, {missing_q0} of {} QoS 0 missing ({evicted} evicted)",
        accepted.len(),
        refused.len(),
        q0.len()
    );

    // 5. Drained: QoS 1 is accepted again.
    let after = filler("disk-v5 q1 after drain");
    v5.send(&raw_publish(5, topic, 1, 700, false, &after))
        .await
        .unwrap();
    match v5.read(Duration::from_secs(10)).await.unwrap() {
        RawEvent::Packet(0x40, b) if b.get(2).copied().unwrap_or(0) == 0 => {}
        other => panic!("QoS 1 after the drain: expected PUBACK 0x00, got {other:?}"),
    }
    // The refused QoS 2 message, retried with the same packet id, is stored and delivered.
    v5.send(&raw_publish(5, topic, 2, 800, false, &q2))
        .await
        .unwrap();
    let (f, b) = v5
        .expect_packet("PUBREC", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        f == 0x50 && b[..2] == 800u16.to_be_bytes() && b.get(2).copied().unwrap_or(0) == 0,
        "QoS 2 retry after the drain: expected PUBREC 0x00, got {}",
        describe_packet(f, &b)
    );
    v5.send(&raw_pubrel(800)).await.unwrap();
    let (f, b) = v5
        .expect_packet("PUBCOMP", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(f, 0x70, "expected PUBCOMP, got {}", describe_packet(f, &b));
    up.wait_for(&gw, &[("disk-v5".to_string(), q2)], UPSTREAM_TIMEOUT)
        .await;
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}
