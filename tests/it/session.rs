//! Session behaviour an agent relies on, over hand-built MQTT packets and rumqttc clients:
//! the Will is journaled when (and only when) a connection ends abnormally (socket dropped,
//! MQTT 5 DISCONNECT 0x04, also in the 1-byte form paho and libmosquitto send; never after a
//! normal DISCONNECT in any of its valid encodings); a second connection with the same client
//! id takes the session over (MQTT 5: DISCONNECT 0x8E); keep-alive closes silent connections
//! (0x8D) and spares pinging ones; a message larger than one upstream batch is acknowledged and
//! delivered in fragments (both versions); a QoS 2 re-send before PUBREL is journaled once, and
//! a PUBREL before its PUBREC closes the connection without losing the next message; packets
//! sent in the same write as the CONNECT are handled at once; SIGTERM acknowledges, flushes and
//! exits 0 with every PUBACKed message in the outbox; after `kill -9` the journal is resumed
//! at start-up without any new traffic (the first run holds batches back with a 10-minute
//! maxDelayMs, the restart uses 200 ms).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use serde_json::{Value, json};

use crate::support::{
    ACK_TIMEOUT, AckedPublisher, BackgroundAgent, Gateway, OUTBOX_TIMEOUT, RAW_PINGREQ, RawConnect,
    RawEvent, RawMqtt, client_id, describe_packet, describe_packets, duplicate_seqs, free_port,
    header_problems, http_get, metric_value, payload_bytes, poll_until, raw_publish, raw_pubrel,
    show, v4_options,
};

/// How long a connection the gateway should close may stay open.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(6);

fn count_payload(recs: &[Value], payload: &[u8]) -> usize {
    recs.iter().filter(|r| payload_bytes(r) == payload).count()
}

/// Poll the metrics endpoint until `gatehouse_connections` is `want`: every session that
/// ended has run to completion (its Will, if due, is committed by then).
async fn wait_for_connections(metrics: &str, want: f64) {
    poll_until(
        &format!("gatehouse_connections == {want}"),
        Duration::from_secs(10),
        || async {
            let body = http_get(metrics, "/metrics").await?;
            match metric_value(&body, "gatehouse_connections") {
                Some(v) if v == want => Ok(()),
                other => Err(format!("gatehouse_connections = {other:?}")),
            }
        },
    )
    .await;
}

/// Expect a PUBACK (`0x40`) for `pkid` with a success reason (MQTT 5 reason < 0x80).
fn check_puback_ok(what: &str, pkid: u16, (f, b): (u8, Vec<u8>)) -> Result<(), String> {
    let id = pkid.to_be_bytes();
    if f == 0x40 && b.len() >= 2 && b[..2] == id && (b.len() == 2 || b[2] < 0x80) {
        Ok(())
    } else {
        Err(format!(
            "{what}: expected a successful PUBACK for packet id {pkid}, got {}",
            describe_packet(f, &b)
        ))
    }
}

/// Exactly one packet came before the close: an MQTT 5 DISCONNECT with reason `code`.
fn only_disconnect(got: &[(u8, Vec<u8>)], code: u8) -> bool {
    matches!(got, [(0xE0, body)] if body.first() == Some(&code))
}

// ---------------------------------------------------------------- 1. Will

#[derive(Clone, Copy, Debug)]
enum End {
    /// Close the TCP socket without DISCONNECT.
    Drop,
    /// Send these DISCONNECT bytes, then wait for the gateway to close.
    Disconnect(&'static [u8]),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_journaled_only_when_the_connection_ends_abnormally() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start_with(|c| c["metrics"] = json!({ "bind": metrics })).await;
    // (client id, protocol level, how the connection ends, Will expected)
    let cases: &[(&str, u8, End, bool)] = &[
        ("will-drop-v4", 4, End::Drop, true),
        ("will-drop-v5", 5, End::Drop, true),
        // MQTT 5 "Disconnect with Will Message", with and without the property length
        // (paho and libmosquitto send the 1-byte form).
        (
            "will-disc04-v5",
            5,
            End::Disconnect(&[0xE0, 0x02, 0x04, 0x00]),
            true,
        ),
        (
            "will-disc04-short-v5",
            5,
            End::Disconnect(&[0xE0, 0x01, 0x04]),
            true,
        ),
        ("will-normal-v4", 4, End::Disconnect(&[0xE0, 0x00]), false),
        ("will-normal-v5", 5, End::Disconnect(&[0xE0, 0x00]), false),
        (
            "will-normal-rc-v5",
            5,
            End::Disconnect(&[0xE0, 0x02, 0x00, 0x00]),
            false,
        ),
        (
            "will-normal-short-v5",
            5,
            End::Disconnect(&[0xE0, 0x01, 0x00]),
            false,
        ),
    ];
    let mut failures = Vec::new();
    for &(client, v, end, _) in cases {
        let topic = format!("agents/{client}/status");
        let connect = RawConnect::new(v, client).will(&topic, b"agent lost");
        let mut r = RawMqtt::connect(gw.port, &connect)
            .await
            .unwrap_or_else(|e| panic!("{client}: {e}"));
        match end {
            End::Drop => drop(r),
            End::Disconnect(bytes) => {
                r.send(bytes).await.unwrap();
                match r.until_closed(CLOSE_TIMEOUT).await {
                    Ok(got) if got.is_empty() => {}
                    Ok(got) => failures.push(format!(
                        "{client}: DISCONNECT {bytes:02x?} was answered with {}",
                        describe_packets(&got)
                    )),
                    Err(e) => {
                        failures.push(format!("{client}: after DISCONNECT {bytes:02x?}: {e}"))
                    }
                }
            }
        }
    }
    // Every session has ended (Wills committed), then a marker from another agent: once the
    // marker is in the outbox, a Will committed before it would be too.
    wait_for_connections(&metrics, 0.0).await;
    let marker = b"will test: marker after all sessions ended".to_vec();
    let mut agent = AckedPublisher::connect("will-marker", gw.port).await;
    agent
        .publish(
            "agents/will-marker/telemetry",
            QoS::AtLeastOnce,
            marker.clone(),
        )
        .await
        .expect("marker PUBACK");
    agent.disconnect().await;
    let expected: Vec<&str> = cases.iter().filter(|c| c.3).map(|c| c.0).collect();
    let recs = poll_until(
        "the marker and the expected Wills",
        OUTBOX_TIMEOUT,
        || async {
            let recs = gw.all_records().await;
            let missing: Vec<&str> = expected
                .iter()
                .copied()
                .filter(|c| !recs.iter().any(|r| client_id(r) == *c))
                .collect();
            if count_payload(&recs, &marker) > 0 && missing.is_empty() {
                Ok(recs)
            } else {
                Err(format!(
                    "marker present: {}, Wills missing for {missing:?}",
                    count_payload(&recs, &marker) > 0
                ))
            }
        },
    )
    .await;
    for &(client, _, end, due) in cases {
        let mine: Vec<&Value> = recs.iter().filter(|r| client_id(r) == client).collect();
        let topic = format!("agents/{client}/status");
        let ok = if due {
            mine.len() == 1
                && mine[0]["topic"] == json!(topic)
                && payload_bytes(mine[0]) == b"agent lost"
        } else {
            mine.is_empty()
        };
        if !ok {
            failures.push(format!(
                "{client} ({end:?}): expected {} Will record(s) on {topic}, outbox has {:?}",
                u8::from(due),
                mine
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "Will handling is wrong:\n  {}\n--- gateway output ---\n{}",
        failures.join("\n  "),
        gw.logs()
    );
}

// ---------------------------------------------------------------- 2. take-over

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_with_the_same_client_id_takes_over() {
    let gw = Gateway::start().await;
    let mut wanted = Vec::new();
    for (v, id) in [(5u8, "dup"), (4, "dup-311")] {
        let topic = format!("agents/{id}/telemetry");
        let mut a = RawMqtt::connect(gw.port, &RawConnect::new(v, id))
            .await
            .unwrap();
        let before = format!("takeover v{v}: from the first connection").into_bytes();
        a.send(&raw_publish(v, &topic, 1, 1, false, &before))
            .await
            .unwrap();
        check_puback_ok(
            "first connection",
            1,
            a.expect_packet("PUBACK", ACK_TIMEOUT).await.unwrap(),
        )
        .unwrap();

        let mut b = RawMqtt::connect(gw.port, &RawConnect::new(v, id))
            .await
            .unwrap_or_else(|e| panic!("v{v}: second connection with id {id}: {e}"));
        let got = a
            .until_closed(CLOSE_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("v{v}: first connection after the take-over: {e}"));
        if v == 5 {
            assert!(
                only_disconnect(&got, 0x8E),
                "MQTT 5: the first connection must get DISCONNECT 0x8E (Session taken over) \
                 before EOF; got {}",
                describe_packets(&got)
            );
        } else {
            assert!(
                got.is_empty(),
                "3.1.1: the first connection must just be closed; got {}",
                describe_packets(&got)
            );
        }

        let after = format!("takeover v{v}: from the second connection").into_bytes();
        b.send(&raw_publish(v, &topic, 1, 2, false, &after))
            .await
            .unwrap();
        check_puback_ok(
            "second connection",
            2,
            b.expect_packet("PUBACK", ACK_TIMEOUT).await.unwrap(),
        )
        .unwrap();
        // Still alive afterwards.
        b.send(&RAW_PINGREQ).await.unwrap();
        let (f, body) = b.expect_packet("PINGRESP", ACK_TIMEOUT).await.unwrap();
        assert_eq!(
            f,
            0xD0,
            "second connection: expected PINGRESP, got {}",
            describe_packet(f, &body)
        );
        wanted.push((id, before));
        wanted.push((id, after));
    }
    let payloads: Vec<Vec<u8>> = wanted.iter().map(|(_, p)| p.clone()).collect();
    let recs = gw.wait_for_payloads(&payloads, OUTBOX_TIMEOUT).await;
    for (id, p) in &wanted {
        let mine: Vec<&Value> = recs.iter().filter(|r| payload_bytes(r) == *p).collect();
        assert!(
            mine.len() == 1 && client_id(mine[0]) == *id,
            "{:?}: expected one record from {id}, got {mine:?}",
            show(p)
        );
    }
}

// ---------------------------------------------------------------- 3. keep-alive

/// A connection with keep-alive 1 s that sends nothing: closed after 1.5 x keep-alive.
async fn silent(port: u16, v: u8) -> Result<(), String> {
    let client = format!("ka-silent-v{v}");
    let mut r = RawMqtt::connect(port, &RawConnect::new(v, &client).keep_alive(1)).await?;
    let t0 = Instant::now();
    let got = r
        .until_closed(Duration::from_secs(4))
        .await
        .map_err(|e| format!("{client}: silent with keep-alive 1 s: {e}"))?;
    let elapsed = t0.elapsed();
    if elapsed < Duration::from_secs(1) {
        return Err(format!(
            "{client}: closed after only {elapsed:?} (keep-alive 1 s allows 1.5 s)"
        ));
    }
    let ok = if v == 5 {
        only_disconnect(&got, 0x8D)
    } else {
        got.is_empty()
    };
    if !ok {
        return Err(format!(
            "{client}: closed after {elapsed:?} with {} (expected {})",
            describe_packets(&got),
            if v == 5 { "DISCONNECT 0x8D" } else { "nothing" }
        ));
    }
    Ok(())
}

/// A connection with keep-alive 1 s that pings every 500 ms for 3 s: stays open, gets every
/// PINGRESP.
async fn pinging(port: u16, v: u8) -> Result<(), String> {
    let client = format!("ka-pinger-v{v}");
    let mut r = RawMqtt::connect(port, &RawConnect::new(v, &client).keep_alive(1)).await?;
    let t0 = Instant::now();
    let (mut pings, mut pongs) = (0u32, 0u32);
    while t0.elapsed() < Duration::from_secs(3) || pongs < pings {
        if pongs == pings && t0.elapsed() >= Duration::from_millis(500) * pings {
            r.send(&RAW_PINGREQ).await?;
            pings += 1;
        }
        let next_ping = t0 + Duration::from_millis(500) * pings;
        let wait = next_ping
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        match r.read(wait).await? {
            RawEvent::Packet(0xD0, b) if b.is_empty() => pongs += 1,
            RawEvent::Packet(f, b) => {
                return Err(format!(
                    "{client}: unexpected {} after {:?}",
                    describe_packet(f, &b),
                    t0.elapsed()
                ));
            }
            RawEvent::Closed => {
                return Err(format!(
                    "{client}: closed after {:?} although it pinged every 500 ms ({pings} PINGREQ, {pongs} PINGRESP)",
                    t0.elapsed()
                ));
            }
            RawEvent::StillOpen => {}
        }
        if t0.elapsed() > Duration::from_secs(8) {
            return Err(format!(
                "{client}: {pings} PINGREQ sent but only {pongs} PINGRESP received"
            ));
        }
    }
    if pings < 5 {
        return Err(format!("{client}: only {pings} PINGREQ in 3 s"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_closes_silent_connections_and_spares_pinging_ones() {
    let gw = Gateway::start().await;
    let p = gw.port;
    let (a, b, c, d) = tokio::join!(silent(p, 5), silent(p, 4), pinging(p, 5), pinging(p, 4));
    let failures: Vec<String> = [a, b, c, d].into_iter().filter_map(Result::err).collect();
    assert!(
        failures.is_empty(),
        "keep-alive:\n  {}\n--- gateway output ---\n{}",
        failures.join("\n  "),
        gw.logs()
    );
}

// ---------------------------------------------------------------- 4. larger than a batch

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_a_batch_is_accepted_and_delivered_in_fragments() {
    let gw = Gateway::start_with(|c| {
        c["batch"]["maxBytes"] = json!(4096);
    })
    .await;
    let good = BackgroundAgent::start(gw.port, "big-good-agent").await;
    let big = |v: u8| {
        let mut p = format!("too big for one batch v{v}: ").into_bytes();
        // Incompressible, so it really needs several 4 KB batches.
        let mut x: u32 = 0x9E37_79B9 ^ v as u32;
        p.extend((0..20 * 1024).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b'a' + (x % 26) as u8
        }));
        p
    };
    // MQTT 5 and 3.1.1 alike: a success PUBACK, nothing refused, the connection stays usable.
    for v in [5u8, 4] {
        let client = format!("big-v{v}");
        let topic = format!("agents/{client}/telemetry");
        let mut raw = RawMqtt::connect(gw.port, &RawConnect::new(v, &client))
            .await
            .unwrap();
        raw.send(&raw_publish(v, &topic, 1, 10, false, &big(v)))
            .await
            .unwrap();
        check_puback_ok(
            "a 20 KB message with batch.maxBytes 4096",
            10,
            raw.expect_packet("PUBACK", ACK_TIMEOUT).await.unwrap(),
        )
        .unwrap();
        raw.send(&RAW_PINGREQ).await.unwrap();
        let (f, b) = raw.expect_packet("PINGRESP", ACK_TIMEOUT).await.unwrap();
        assert_eq!(f, 0xD0, "expected PINGRESP, got {}", describe_packet(f, &b));
    }
    let report = good.finish().await;
    let mut wanted = report.acked.clone();
    wanted.push(big(5));
    wanted.push(big(4));
    let recs = poll_until("every message in the outbox", OUTBOX_TIMEOUT, || async {
        let recs = gw.all_records_reassembled().await;
        let have: HashSet<Vec<u8>> = recs.iter().map(payload_bytes).collect();
        let missing = wanted.iter().filter(|p| !have.contains(*p)).count();
        if missing == 0 {
            Ok(recs)
        } else {
            Err(format!("{missing} of {} missing", wanted.len()))
        }
    })
    .await;
    let large: Vec<&Value> = recs
        .iter()
        .filter(|r| payload_bytes(r).starts_with(b"too big"))
        .collect();
    assert_eq!(large.len(), 2, "each large message once");
    for r in large {
        assert!(
            r["fragments"].as_u64().unwrap_or(0) >= 5,
            "carried in several 4 KB fragment batches: {}",
            r["fragments"]
        );
    }
    assert!(
        report.failures.is_empty() && report.connection_errors == 0 && !report.acked.is_empty(),
        "another agent was disturbed: {} acked, failures {:?}, {} connection errors",
        report.acked.len(),
        report.failures,
        report.connection_errors
    );
    for batch in gw.outbox_records_raw_sizes() {
        assert!(batch <= 4096, "a batch file of {batch} bytes");
    }
}

// ---------------------------------------------------------------- 5. QoS 2

async fn qos2_exchange(port: u16, v: u8) -> Result<Vec<Vec<u8>>, String> {
    let client = format!("qos2-v{v}");
    let topic = format!("agents/{client}/telemetry");
    let mut r = RawMqtt::connect(port, &RawConnect::new(v, &client)).await?;
    let expect = async |r: &mut RawMqtt, first: u8, name: &str, step: &str| {
        let (f, b) = r.expect_packet(name, ACK_TIMEOUT).await?;
        if f == first && b.len() >= 2 && b[..2] == [0, 7] && (b.len() == 2 || b[2] < 0x80) {
            Ok(())
        } else {
            Err(format!(
                "{client}: {step}: expected {name} for packet id 7, got {}",
                describe_packet(f, &b)
            ))
        }
    };
    let first = format!("qos2 v{v}: exactly once").into_bytes();
    r.send(&raw_publish(v, &topic, 2, 7, false, &first)).await?;
    expect(&mut r, 0x50, "PUBREC", "PUBLISH QoS 2 pkid 7").await?;
    r.send(&raw_publish(v, &topic, 2, 7, true, &first)).await?;
    expect(
        &mut r,
        0x50,
        "PUBREC",
        "re-sent PUBLISH (DUP) pkid 7 before PUBREL",
    )
    .await?;
    r.send(&raw_pubrel(7)).await?;
    expect(&mut r, 0x70, "PUBCOMP", "PUBREL 7").await?;
    // After PUBCOMP the packet id is free again: a new message with it is a new message.
    let second = format!("qos2 v{v}: next message reusing pkid 7").into_bytes();
    r.send(&raw_publish(v, &topic, 2, 7, false, &second))
        .await?;
    expect(&mut r, 0x50, "PUBREC", "new PUBLISH reusing pkid 7").await?;
    r.send(&raw_pubrel(7)).await?;
    expect(&mut r, 0x70, "PUBCOMP", "second PUBREL 7").await?;
    Ok(vec![first, second])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_resend_before_pubrel_is_journaled_once() {
    // No dedup: only the QoS 2 exchange itself may prevent the duplicate.
    let mut gw = Gateway::start_with(|c| c["journal"]["dedupWindowSecs"] = json!(0)).await;
    let (a, b) = tokio::join!(qos2_exchange(gw.port, 4), qos2_exchange(gw.port, 5));
    let mut payloads = a.unwrap();
    payloads.extend(b.unwrap());
    gw.wait_for_payloads(&payloads, OUTBOX_TIMEOUT).await;
    // Stop so that the outbox is final before counting.
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
    let recs = gw.all_records().await;
    for p in &payloads {
        let n = count_payload(&recs, p);
        assert_eq!(
            n,
            1,
            "{:?} must be in the outbox exactly once (QoS 2 with a DUP re-send before PUBREL, \
             dedup disabled), found {n} times",
            show(p)
        );
    }
}

/// PUBLISH QoS 2 and its PUBREL in one write, before the PUBREC: the gateway must not take it
/// as a release. (Taken as one, the packet id was marked journaled when the commit landed, and
/// the agent's next QoS 2 message with that id was acknowledged without being stored.)
async fn pubrel_before_pubrec(port: u16, v: u8) -> Result<Vec<Vec<u8>>, String> {
    let client = format!("early-pubrel-v{v}");
    let topic = format!("agents/{client}/telemetry");
    let first = format!("v{v}: PUBREL came before PUBREC").into_bytes();
    let second = format!("v{v}: next message reusing pkid 9").into_bytes();
    let mut r = RawMqtt::connect(port, &RawConnect::new(v, &client)).await?;
    let mut both = raw_publish(v, &topic, 2, 9, false, &first);
    both.extend(raw_pubrel(9));
    r.send(&both).await?;
    let got = r.until_closed(CLOSE_TIMEOUT).await?;
    if v == 5
        && !got
            .iter()
            .any(|(f, b)| *f == 0xE0 && b.first() == Some(&0x82))
    {
        return Err(format!(
            "v5: expected DISCONNECT 0x82 (protocol error), got {}",
            describe_packets(&got)
        ));
    }
    // The same (clean) session id reconnects and reuses the packet id: a new message.
    let mut r = RawMqtt::connect(port, &RawConnect::new(v, &client)).await?;
    r.send(&raw_publish(v, &topic, 2, 9, false, &second))
        .await?;
    let (f, b) = r.expect_packet("PUBREC", ACK_TIMEOUT).await?;
    if f != 0x50 || b[..2] != [0, 9] {
        return Err(format!("expected PUBREC 9, got {}", describe_packet(f, &b)));
    }
    r.send(&raw_pubrel(9)).await?;
    r.expect_packet("PUBCOMP", ACK_TIMEOUT).await?;
    Ok(vec![first, second])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_before_pubrec_closes_the_connection_and_loses_nothing() {
    let gw = Gateway::start_with(|c| c["journal"]["dedupWindowSecs"] = json!(0)).await;
    for v in [4, 5] {
        let payloads = pubrel_before_pubrec(gw.port, v).await.unwrap();
        gw.wait_for_payloads(&payloads, OUTBOX_TIMEOUT).await;
    }
}

/// Packets sent in the same write as the CONNECT are handled at once, not when more bytes come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_that_came_with_the_connect_are_handled_at_once() {
    let gw = Gateway::start().await;
    for v in [4, 5] {
        let client = format!("eager-v{v}");
        let topic = format!("agents/{client}/telemetry");
        let payload = format!("v{v}: sent with the CONNECT").into_bytes();
        let mut r = RawMqtt::open(gw.port).await.unwrap();
        let mut bytes = RawConnect::new(v, &client).bytes();
        bytes.extend(raw_publish(v, &topic, 1, 3, false, &payload));
        r.send(&bytes).await.unwrap();
        let mut got = Vec::new();
        for what in ["CONNACK", "PUBACK"] {
            got.push(
                r.expect_packet(what, ACK_TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("v{v}: {e}; before it: {}", describe_packets(&got))),
            );
        }
        let firsts: Vec<u8> = got.iter().map(|(f, _)| *f).collect();
        assert_eq!(firsts, [0x20, 0x40], "v{v}: {}", describe_packets(&got));
        gw.wait_for_payloads(&[payload], OUTBOX_TIMEOUT).await;
    }
}

// ---------------------------------------------------------------- 6. graceful shutdown

const WINDOW: usize = 8;

#[derive(Debug, Default)]
struct ShutdownAgent {
    client: String,
    acked: Vec<Vec<u8>>,
    ended_by: String,
}

/// Publishes unique QoS 1 messages with up to WINDOW in flight until the connection ends
/// (no reconnect). PUBACKs are attributed by packet id: with a clean session and no
/// reconnect, `Outgoing::Publish` events come in request order.
async fn shutdown_agent(port: u16, client: String, progress: Arc<AtomicUsize>) -> ShutdownAgent {
    let mut opts = v4_options(&client, port);
    opts.set_inflight(100);
    let (c, mut el) = AsyncClient::new(opts, 2 * WINDOW);
    let topic = format!("agents/{client}/telemetry");
    let mut out = ShutdownAgent {
        client: client.clone(),
        ..Default::default()
    };
    let mut next = 0u64;
    let mut unassigned: std::collections::VecDeque<Vec<u8>> = Default::default();
    let mut inflight: HashMap<u16, Vec<u8>> = HashMap::new();
    let mut connected = false;
    loop {
        if connected {
            while unassigned.len() + inflight.len() < WINDOW {
                let p = format!("{client} #{next}").into_bytes();
                next += 1;
                c.try_publish(&topic, QoS::AtLeastOnce, false, p.clone())
                    .expect("request channel has room");
                unassigned.push_back(p);
            }
        }
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let p = unassigned.pop_front().expect("a request for this PUBLISH");
                assert!(
                    inflight.insert(pkid, p).is_none(),
                    "{client}: packet id {pkid} reused while in flight"
                );
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                let p = inflight
                    .remove(&a.pkid)
                    .unwrap_or_else(|| panic!("{client}: PUBACK for unknown packet id {}", a.pkid));
                out.acked.push(p);
                progress.fetch_add(1, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(e) => {
                out.ended_by = e.to_string();
                return out;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_every_acknowledged_message_and_exits_0() {
    let mut gw = Gateway::start().await;
    let observer = RawMqtt::connect(gw.port, &RawConnect::new(5, "shutdown-observer-v5"))
        .await
        .unwrap();
    let progress: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let agents: Vec<_> = progress
        .iter()
        .enumerate()
        .map(|(i, p)| {
            tokio::spawn(shutdown_agent(
                gw.port,
                format!("shutdown-agent-{i}"),
                p.clone(),
            ))
        })
        .collect();
    poll_until(
        "every agent to get 30 PUBACKs",
        Duration::from_secs(15),
        || async {
            let counts: Vec<usize> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
            if counts.iter().all(|n| *n >= 30) {
                Ok(())
            } else {
                Err(format!("PUBACKs so far: {counts:?}"))
            }
        },
    )
    .await;

    // Agents are still publishing: SIGTERM now.
    let t0 = Instant::now();
    let status = gw.stop().await;
    let took = t0.elapsed();
    assert!(
        status.success(),
        "SIGTERM: gateway exited with {status} after {took:?}\n--- gateway output ---\n{}",
        gw.logs()
    );
    let mut outcomes = Vec::new();
    for a in agents {
        let o = tokio::time::timeout(Duration::from_secs(10), a)
            .await
            .expect("agent did not notice the shutdown")
            .expect("agent panicked");
        eprintln!(
            "{}: {} acked, ended by {:?}",
            o.client,
            o.acked.len(),
            o.ended_by
        );
        outcomes.push(o);
    }
    let mut observer = observer;
    let got = observer
        .until_closed(Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("MQTT 5 connection after the gateway exited: {e}"));
    assert!(
        only_disconnect(&got, 0x8B),
        "MQTT 5 agent at shutdown: expected DISCONNECT 0x8B (Server shutting down), got {}",
        describe_packets(&got)
    );

    // No restart: what was acknowledged must already be in the outbox.
    let batches = gw.outbox_records().await;
    let recs: Vec<Value> = batches.iter().flat_map(|b| b.records.clone()).collect();
    let mut missing = Vec::new();
    let mut duplicated = Vec::new();
    for o in &outcomes {
        for p in &o.acked {
            match count_payload(&recs, p) {
                0 => missing.push(show(p)),
                1 => {}
                n => duplicated.push(format!("{} x{n}", show(p))),
            }
        }
    }
    let total: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    assert!(
        missing.is_empty(),
        "{} of {total} PUBACKed messages are not in the outbox after SIGTERM (stop took {took:?}), \
         e.g. {:?}\n--- gateway output ---\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        gw.logs()
    );
    assert!(duplicated.is_empty(), "duplicated records: {duplicated:?}");
    assert!(
        header_problems(&batches, "zstd").is_empty(),
        "{:?}",
        header_problems(&batches, "zstd")
    );
    assert!(
        duplicate_seqs(&batches).is_empty(),
        "{:?}",
        duplicate_seqs(&batches)
    );
}

// ---------------------------------------------------------------- 7. resume after kill -9

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_is_resumed_at_startup_after_kill_9_without_new_traffic() {
    // First run: batches would only be flushed after 10 minutes, so the acknowledged messages
    // are in the journal and not in the outbox when the gateway is killed.
    let mut gw = Gateway::start_with(|c| c["batch"]["maxDelayMs"] = json!(600_000)).await;
    let mut agent = AckedPublisher::connect("resume-agent", gw.port).await;
    let payloads: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("resume: journaled before kill #{i}").into_bytes())
        .collect();
    for p in &payloads {
        agent
            .publish("agents/resume-agent/telemetry", QoS::AtLeastOnce, p.clone())
            .await
            .unwrap_or_else(|e| panic!("publish {:?}: {e}", show(p)));
    }
    // No agent may reconnect after the restart: no new traffic at all.
    agent.disconnect().await;
    assert!(
        gw.all_records().await.is_empty(),
        "precondition: nothing should be batched before the kill (maxDelayMs 600000)"
    );
    gw.kill9().await;

    // Second run: a short maxDelayMs, so resumed records are due at once.
    gw.config["batch"]["maxDelayMs"] = json!(200);
    std::fs::write(
        &gw.config_path,
        serde_json::to_vec_pretty(&gw.config).unwrap(),
    )
    .unwrap();
    gw.restart().await;
    let recs = gw.wait_for_payloads(&payloads, OUTBOX_TIMEOUT).await;
    for p in &payloads {
        assert_eq!(count_payload(&recs, p), 1, "{:?} not exactly once", show(p));
    }
}
