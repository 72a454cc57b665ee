//! The `mqtt` upstream under network faults, against real peers:
//!
//! * an HTTP CONNECT proxy with Basic authentication (a small one in the test support): the
//!   link is tunnelled through it; a wrong password is named as a proxy failure;
//! * an unresolvable broker host: `cannot resolve host`, logged once;
//! * a link that stays up but stops delivering the broker's bytes (no PUBACK): the watchdog
//!   rebuilds it and the unacknowledged batches are re-sent as whole batches;
//! * reconnect pacing: at most one connection attempt per second even with a 100-200 ms
//!   backoff, both against a closed port and against a socket that accepts and closes;
//! * MQTT 5 PUBACK "Not authorized" (mosquitto ACL): the batch is not confirmed, its journal
//!   rows stay, and it arrives once the broker allows it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::json;

use crate::support::{AckedPublisher, poll_until};
use crate::upstream_support::{
    AcceptCloser, ConnectProxy, FreezableRelay, Pki, UP_TOPIC, UPSTREAM_CLIENT_ID, UpBatch,
    Upstream, assert_clean, exactly_wanted_problems, log_lines, metric, plan, publish_all_acked,
    standalone_upstream, start_gateway, start_gateway_with, tail, wait_link_down, wait_metric,
};

/// Deadline for messages to arrive upstream.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

type Msg = (String, Vec<u8>);

/// Publish `n` QoS 1 messages as agent `id` (all PUBACKed by the gateway) and return them.
async fn publish_plan(gw: &crate::support::Gateway, id: &str, tag: &str, n: usize) -> Vec<Msg> {
    let payloads = plan(id, tag, n);
    publish_all_acked(gw.port, id, &format!("agents/{id}/telemetry"), &payloads)
        .await
        .unwrap_or_else(|e| panic!("agent {id}: {e}\n--- gateway log ---\n{}", gw.logs()));
    payloads.into_iter().map(|p| (id.to_string(), p)).collect()
}

/// Every message of `wanted` exactly once when each batchSeq is counted once, and nothing else.
fn assert_exactly_wanted(batches: &[UpBatch], wanted: &[Msg]) {
    let wrong = exactly_wanted_problems(batches, wanted);
    assert!(
        wrong.is_empty(),
        "upstream records (each batchSeq counted once) are not exactly the {} PUBACKed messages: \
         {wrong:?}",
        wanted.len()
    );
}

/// The single `Upstream link down.` line, asserted to be the only one and to contain `needle`.
fn single_link_down(gw: &crate::support::Gateway, needle: &str, attempts: f64) -> String {
    let down = log_lines(gw, "Upstream link down.");
    assert!(
        down.len() == 1 && down[0].contains("cause=") && down[0].contains(needle),
        "expected exactly one `Upstream link down.` line with a cause containing {needle:?} \
         after {attempts} connection attempts, got {down:#?}\n--- gateway log ---\n{}",
        gw.logs()
    );
    assert!(
        down[0].contains("WARN"),
        "link-down line not at WARN: {}",
        down[0]
    );
    down[0].clone()
}

async fn connects(metrics: &str) -> f64 {
    metric(metrics, "gatehouse_upstream_connects_total")
        .await
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------- 1. HTTP CONNECT proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_through_http_connect_proxy() {
    let mut up = Upstream::start().await;
    let broker_port = up.broker.port;
    let target = format!("localhost:{broker_port}");

    // Right credentials: everything goes through the tunnel.
    let proxy = ConnectProxy::start("u", "p").await;
    let url = proxy.url();
    let (mut gw, _metrics) = start_gateway(&up, "client", move |c| {
        c["upstream"]["proxy"] = json!({"url": url, "username": "u", "password": "p"});
        c["batch"]["maxDelayMs"] = json!(200);
    })
    .await;
    let mut wanted = Vec::new();
    for i in 0..2 {
        wanted.extend(publish_plan(&gw, &format!("up-proxy-{i}"), "via proxy", 40).await);
    }
    let batches = up.wait_for(&gw, &wanted, UPSTREAM_TIMEOUT).await;
    assert_clean(&batches, &gw);
    assert_exactly_wanted(&batches, &wanted);

    let reqs = proxy.requests();
    assert!(!reqs.is_empty(), "the proxy saw no request");
    for r in &reqs {
        assert!(
            r.request_line == format!("CONNECT {target} HTTP/1.1") && r.auth_ok,
            "proxy request {r:?}: expected `CONNECT {target} HTTP/1.1` with \
             Proxy-Authorization `Basic base64(u:p)`; all requests: {reqs:#?}"
        );
    }
    // Every session of the gateway at the broker came from one of the proxy's tunnels (the
    // broker logs the client's address, which is the proxy's socket).
    let tunnel_ports: HashSet<u16> = reqs.iter().filter_map(|r| r.tunnel_from_port).collect();
    let broker_log = up.broker.logs();
    let sessions: Vec<&str> = broker_log
        .lines()
        .filter(|l| {
            l.contains("New client connected from")
                && l.contains(&format!(" as {UPSTREAM_CLIENT_ID} ("))
        })
        .collect();
    assert!(!sessions.is_empty(), "the broker never saw the gateway");
    for s in &sessions {
        assert!(
            tunnel_ports
                .iter()
                .any(|p| s.contains(&format!("from 127.0.0.1:{p} "))),
            "gateway session not through the proxy: {s}\ntunnel source ports: {tunnel_ports:?}"
        );
    }
    eprintln!(
        "proxy: {} CONNECT request(s), {} gateway session(s) at the broker, {} messages upstream",
        reqs.len(),
        sessions.len(),
        wanted.len()
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");

    // Wrong password: the proxy answers 407; the cause names the proxy, the gateway retries
    // and keeps journaling.
    let strict = ConnectProxy::start("u", "p").await;
    let url = strict.url();
    let (mut gw, metrics) = start_gateway(&up, "client", move |c| {
        c["upstream"]["proxy"] = json!({"url": url, "username": "u", "password": "wrong"});
        c["upstream"]["reconnectMinMs"] = json!(100);
        c["upstream"]["reconnectMaxMs"] = json!(200);
    })
    .await;
    poll_until(
        "2 refused CONNECTs at the proxy",
        Duration::from_secs(20),
        || async {
            match strict.requests().len() {
                n if n >= 2 => Ok(()),
                n => Err(format!(
                    "{n} requests; gateway log tail: {}",
                    tail(&gw.logs(), 1500)
                )),
            }
        },
    )
    .await;
    let mut agent = AckedPublisher::connect("up-proxy-agent", gw.port).await;
    agent
        .publish(
            "agents/up-proxy-agent/telemetry",
            QoS::AtLeastOnce,
            b"accepted while the proxy refuses".to_vec(),
        )
        .await
        .unwrap_or_else(|e| panic!("QoS 1 publish not PUBACKed: {e}\n{}", gw.logs()));
    agent.disconnect().await;
    // One more attempt after the agent's message; the one before it has been answered.
    let seen = strict.requests().len();
    poll_until(
        "another CONNECT at the proxy",
        Duration::from_secs(10),
        || async {
            match strict.requests().len() {
                n if n > seen => Ok(()),
                n => Err(format!("{n} requests")),
            }
        },
    )
    .await;
    gw.assert_alive();
    let reqs = strict.requests();
    for r in &reqs {
        assert!(
            r.target.as_deref() == Some(target.as_str())
                && !r.auth_ok
                && r.authorization.is_some()
                && r.tunnel_from_port.is_none(),
            "proxy request {r:?}: expected CONNECT {target} with wrong credentials, refused"
        );
    }
    let down = log_lines(&gw, "Upstream link down.");
    assert!(
        !down.is_empty() && down.iter().all(|l| l.to_lowercase().contains("proxy")),
        "expected `Upstream link down.` with a cause mentioning the proxy after {} refused \
         CONNECTs (407), got {down:#?}\n--- gateway log ---\n{}",
        reqs.len(),
        gw.logs()
    );
    let line = single_link_down(&gw, "proxy", reqs.len() as f64);
    assert!(
        line.contains("credentials"),
        "a 407 is named as a credentials problem: {line}"
    );
    eprintln!("wrong proxy password, {} attempts: {line}", reqs.len());
    assert!(
        log_lines(&gw, "Upstream connected.").is_empty(),
        "the gateway claims to be connected"
    );
    let rows = metric(&metrics, "gatehouse_journal_rows").await;
    assert!(
        rows.is_some_and(|r| r >= 1.0),
        "gatehouse_journal_rows = {rows:?} with a journaled, unsent message"
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

// ---------------------------------------------------------------- 2. DNS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dns_failure_is_named() {
    const HOST: &str = "gatehouse-test.invalid";
    // What does this machine's resolver say? (`.invalid` must not resolve, RFC 6761.)
    match tokio::net::lookup_host((HOST, 8883)).await {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            assert!(
                addrs.is_empty(),
                "this machine's resolver answers {HOST} with {addrs:?}: cannot test a DNS failure"
            );
        }
        Err(e) => eprintln!("resolver for {HOST}: {e}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"));
    let (mut gw, metrics) = start_gateway_with(standalone_upstream(&pki, HOST, 8883), |_| {}).await;

    // Two attempts over: the third has started.
    wait_metric(
        &metrics,
        "gatehouse_upstream_connects_total",
        Duration::from_secs(20),
        |v| v >= 3.0,
    )
    .await;
    let mut agent = AckedPublisher::connect("up-dns-agent", gw.port).await;
    agent
        .publish(
            "agents/up-dns-agent/telemetry",
            QoS::AtLeastOnce,
            b"accepted while DNS fails".to_vec(),
        )
        .await
        .unwrap_or_else(|e| panic!("QoS 1 publish not PUBACKed: {e}\n{}", gw.logs()));
    agent.disconnect().await;
    let seen = connects(&metrics).await;
    wait_metric(
        &metrics,
        "gatehouse_upstream_connects_total",
        Duration::from_secs(10),
        |v| v > seen,
    )
    .await;
    gw.assert_alive();
    let line = single_link_down(&gw, "cannot resolve host", seen);
    eprintln!("{seen} attempts, logged once: {line}");
    assert!(
        log_lines(&gw, "Upstream connected.").is_empty(),
        "the gateway claims to be connected"
    );
    assert_eq!(
        metric(&metrics, "gatehouse_upstream_connected").await,
        Some(0.0),
        "gatehouse_upstream_connected"
    );
    let rows = metric(&metrics, "gatehouse_journal_rows").await;
    assert!(
        rows.is_some_and(|r| r >= 1.0),
        "gatehouse_journal_rows = {rows:?}"
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

// ---------------------------------------------------------------- 3. watchdog

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_watchdog_rebuilds_a_stuck_link() {
    const ACK_TIMEOUT_MS: u64 = 2000;
    let mut up = Upstream::start().await;
    let relay = FreezableRelay::start(up.broker.port).await;
    let relay_port = relay.port;
    let (mut gw, metrics) = start_gateway(&up, "client", move |c| {
        c["upstream"]["port"] = json!(relay_port);
        c["upstream"]["ackTimeoutMs"] = json!(ACK_TIMEOUT_MS);
        // Keep-alive must not notice the dead direction first.
        c["upstream"]["keepAliveSecs"] = json!(60);
        c["upstream"]["reconnectMinMs"] = json!(200);
        c["upstream"]["reconnectMaxMs"] = json!(500);
        c["batch"]["maxDelayMs"] = json!(200);
    })
    .await;

    // A healthy link: batches go out and are acknowledged, none outstanding.
    let mut wanted = publish_plan(&gw, "up-wd-0", "before", 30).await;
    up.wait_for(&gw, &wanted, UPSTREAM_TIMEOUT).await;
    poll_until(
        "every upstream publish acknowledged",
        Duration::from_secs(10),
        || async {
            let p = metric(&metrics, "gatehouse_upstream_publishes_total").await;
            let a = metric(&metrics, "gatehouse_upstream_acks_total").await;
            match (p, a) {
                (Some(p), Some(a)) if p >= 1.0 && p == a => Ok(()),
                other => Err(format!("(publishes, acks) = {other:?}")),
            }
        },
    )
    .await;
    let connects_before = connects(&metrics).await;
    assert!(
        log_lines(&gw, "Upstream link down.").is_empty(),
        "link went down before the freeze:\n{}",
        gw.logs()
    );

    // Freeze: the TCP connection stays, the gateway's bytes reach the broker, the broker's
    // PUBACKs never come back.
    let frozen_at = Instant::now();
    let frozen = relay.freeze_current();
    assert!(frozen >= 1, "no connection through the relay to freeze");
    let more = publish_plan(&gw, "up-wd-1", "frozen", 30).await;
    wanted.extend(more);

    let (line, fired) = poll_until("the watchdog to fire", Duration::from_secs(15), || async {
        let down = log_lines(&gw, "Upstream link down.");
        match down.iter().find(|l| l.contains("watchdog")) {
            Some(l) => Ok((l.clone(), frozen_at.elapsed())),
            None => Err(format!(
                "link-down lines: {down:?}; relay dropped {} bytes; gateway log tail: {}",
                relay.dropped_bytes(),
                tail(&gw.logs(), 1500)
            )),
        }
    })
    .await;
    eprintln!("watchdog after {fired:?}: {line}");
    assert!(
        relay.dropped_bytes() > 0,
        "nothing from the broker was held back: the freeze did not happen"
    );
    assert!(
        fired >= Duration::from_millis(ACK_TIMEOUT_MS) && fired <= Duration::from_secs(6),
        "watchdog (ackTimeoutMs {ACK_TIMEOUT_MS}) fired {fired:?} after the freeze: {line}"
    );
    let down = log_lines(&gw, "Upstream link down.");
    assert_eq!(
        down.len(),
        1,
        "the watchdog should be the only failure: {down:#?}"
    );

    // A new connection (not frozen) carries the unacknowledged batches again.
    wait_metric(
        &metrics,
        "gatehouse_upstream_connects_total",
        Duration::from_secs(10),
        |v| v > connects_before,
    )
    .await;
    // `connects_total` counts attempts, before the TCP connect: the relay may accept a moment
    // later on a loaded machine.
    poll_until(
        "a new connection through the relay",
        Duration::from_secs(10),
        || async {
            if relay.connections() > frozen {
                Ok(())
            } else {
                Err("the gateway reconnected but not through the relay".to_string())
            }
        },
    )
    .await;
    up.wait_for(&gw, &wanted, UPSTREAM_TIMEOUT).await;
    poll_until("the journal to drain", UPSTREAM_TIMEOUT, || async {
        match metric(&metrics, "gatehouse_journal_rows").await {
            Some(0.0) => Ok(()),
            v => Err(format!("gatehouse_journal_rows = {v:?}")),
        }
    })
    .await;
    // The batches published while frozen reached the broker (and the collector) once before
    // the watchdog, and again after it: whole batches with the same batchSeq and bytes. The
    // first copy may satisfy `wait_for` before the re-sent one is printed by the collector.
    let (batches, resent) = poll_until(
        "a re-sent batch (same batchSeq twice) at the collector",
        Duration::from_secs(15),
        || async {
            let batches = up.collector.batches(UP_TOPIC).await;
            let mut seen: HashMap<u64, usize> = HashMap::new();
            for b in &batches {
                *seen.entry(b.batch_seq()).or_default() += 1;
            }
            let resent: Vec<u64> = seen
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(s, _)| *s)
                .collect();
            if resent.is_empty() {
                Err(format!(
                    "batchSeqs {:?}: none twice, although the gateway must re-send what was \
                     unacknowledged when the watchdog fired",
                    batches.iter().map(UpBatch::batch_seq).collect::<Vec<_>>()
                ))
            } else {
                Ok((batches, resent))
            }
        },
    )
    .await;
    assert_clean(&batches, &gw);
    assert_exactly_wanted(&batches, &wanted);
    eprintln!(
        "watchdog: {} messages, {} payloads upstream, re-sent batchSeqs {resent:?}, relay \
         connections {}, dropped {} bytes",
        wanted.len(),
        batches.len(),
        relay.connections(),
        relay.dropped_bytes()
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

// ---------------------------------------------------------------- 4. connect pacing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connects_at_most_once_per_second() {
    const WINDOW: Duration = Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"));
    // Nothing listens on `port` at first: every attempt is refused at once.
    let port = crate::support::free_port();
    let (mut gw, metrics) =
        start_gateway_with(standalone_upstream(&pki, "localhost", port), |_| {}).await;
    wait_link_down(&gw, "cannot reach").await;

    // Closed port: count attempts with the gateway's own counter. Starts inside the interval
    // between two scrapes are at most floor(elapsed) + 1 when they are >= 1 s apart.
    let started = Instant::now();
    let c0 = connects(&metrics).await;
    tokio::time::sleep(WINDOW).await;
    let c1 = connects(&metrics).await;
    let elapsed = started.elapsed().as_secs_f64();
    let n = c1 - c0;
    eprintln!("closed port: {n} connection attempts in {elapsed:.2} s");
    assert!(
        n <= elapsed.floor() + 1.0,
        "{n} connection attempts within {elapsed:.2} s (reconnectMinMs 100, reconnectMaxMs \
         200): more than one per second"
    );
    // It does retry: 3 attempts since `c0` (normally within the window; a machine that
    // stalls the gateway gets more time, the bound above is what matters).
    poll_until(
        "3 connection attempts to the closed port",
        Duration::from_secs(20),
        || async {
            match connects(&metrics).await - c0 {
                n if n >= 3.0 => Ok(()),
                n => Err(format!(
                    "{n} attempts in {:.2} s\n--- gateway log ---\n{}",
                    started.elapsed().as_secs_f64(),
                    gw.logs()
                )),
            }
        },
    )
    .await;

    // A socket that accepts and closes at once (TLS fails after TCP succeeded): count the
    // TCP connections it accepts.
    let closer = AcceptCloser::bind(port).await;
    let opened = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let window_end = Instant::now();
    let accepts: Vec<Instant> = closer
        .accepts()
        .into_iter()
        .filter(|t| *t <= window_end)
        .collect();
    let elapsed = (window_end - opened).as_secs_f64();
    let n = accepts.len();
    let gaps: Vec<f64> = accepts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    eprintln!("accept-and-close: {n} TCP connections in {elapsed:.2} s, gaps {gaps:.3?}");
    assert!(
        n as f64 <= elapsed.floor() + 1.0,
        "{n} TCP connections within {elapsed:.2} s: more than one per second; gaps {gaps:.3?}"
    );
    poll_until(
        "3 TCP connections at the accept-and-close socket",
        Duration::from_secs(20),
        || async {
            match closer.accepts().len() {
                n if n >= 3 => Ok(()),
                n => Err(format!(
                    "{n} connections in {:.2} s\n--- gateway log ---\n{}",
                    opened.elapsed().as_secs_f64(),
                    gw.logs()
                )),
            }
        },
    )
    .await;
    let down = log_lines(&gw, "Upstream link down.");
    eprintln!("causes: {down:#?}");
    gw.assert_alive();
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}

// ---------------------------------------------------------------- 5. MQTT 5 PUBACK refusal

/// mosquitto ACLs: the gateway (certificate CN `gw-itest`) may only read, then may write.
const ACL_DENY_GATEWAY: &str = "user collector\ntopic read gatehouse/#\n\n\
                                user gw-itest\ntopic read gatehouse/#\n";
const ACL_ALLOW_GATEWAY: &str = "user collector\ntopic read gatehouse/#\n\n\
                                 user gw-itest\ntopic readwrite gatehouse/#\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mqtt5_refused_publish_is_not_confirmed() {
    // mosquitto 2.0 answers an ACL-denied MQTT 5 QoS 1 PUBLISH with PUBACK 0x87 (Not
    // authorized) and does not route it.
    let mut up = Upstream::start_with_acl(ACL_DENY_GATEWAY).await;
    let (mut gw, metrics) = start_gateway(&up, "client", |c| {
        c["upstream"]["protocol"] = json!("5");
        c["upstream"]["reconnectMinMs"] = json!(200);
        c["upstream"]["reconnectMaxMs"] = json!(500);
        c["batch"]["maxDelayMs"] = json!(200);
    })
    .await;
    let wanted = publish_plan(&gw, "up-acl-0", "denied", 30).await;

    let denied = || {
        up.broker
            .logs()
            .lines()
            .filter(|l| l.contains(&format!("Denied PUBLISH from {UPSTREAM_CLIENT_ID} ")))
            .count()
    };
    poll_until(
        "the gateway to log the refusal and retry (3 denied PUBLISHes at the broker)",
        Duration::from_secs(20),
        || async {
            let down = log_lines(&gw, "Upstream link down.");
            let refused = down.iter().any(|l| l.contains("broker refused a publish"));
            if refused && denied() >= 3 {
                Ok(())
            } else {
                Err(format!(
                    "{} denied PUBLISHes; link-down lines {down:?}; gateway log tail: {}",
                    denied(),
                    tail(&gw.logs(), 1500)
                ))
            }
        },
    )
    .await;
    gw.assert_alive();
    let body = crate::support::scrape(&metrics).await;
    let rows = crate::support::metric_value(&body, "gatehouse_journal_rows");
    let acks = crate::support::metric_value(&body, "gatehouse_upstream_acks_total").unwrap_or(0.0);
    let n_connects =
        crate::support::metric_value(&body, "gatehouse_upstream_connects_total").unwrap_or(0.0);
    assert!(
        rows.is_some_and(|r| r >= wanted.len() as f64),
        "gatehouse_journal_rows = {rows:?}: refused batches were released from the journal"
    );
    assert_eq!(
        acks, 0.0,
        "gatehouse_upstream_acks_total counts refused publishes"
    );
    assert!(
        n_connects >= 3.0,
        "{n_connects} connects: the gateway stopped retrying"
    );
    let refusals = log_lines(&gw, "broker refused a publish");
    eprintln!(
        "refused: {} denied PUBLISHes, {n_connects} connects, {} WARN lines, first: {}",
        denied(),
        refusals.len(),
        refusals[0]
    );
    assert_eq!(
        refusals.len(),
        1,
        "a broker that keeps refusing is one outage: one WARN, not one per reconnect"
    );
    // The first connection, and the first one after the logged refusal; the later reconnects
    // into the same refusal are not news.
    assert_eq!(
        log_lines(&gw, "Upstream connected.").len(),
        2,
        "reconnecting into the same refusal is logged once"
    );
    assert!(
        up.batches().await.is_empty(),
        "the collector received a publish the broker refused"
    );

    // Allowed again: the journaled batches arrive, whole.
    up.set_acl(ACL_ALLOW_GATEWAY).await;
    let batches = up.wait_for(&gw, &wanted, UPSTREAM_TIMEOUT).await;
    assert_clean(&batches, &gw);
    assert_exactly_wanted(&batches, &wanted);
    poll_until("the journal to drain", UPSTREAM_TIMEOUT, || async {
        match metric(&metrics, "gatehouse_journal_rows").await {
            Some(0.0) => Ok(()),
            v => Err(format!("gatehouse_journal_rows = {v:?}")),
        }
    })
    .await;
    assert!(
        batches.iter().all(|b| b.topic == UP_TOPIC),
        "unexpected topic upstream"
    );
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");
}
