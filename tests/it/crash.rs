//! Crash durability: several rumqttc MQTT 3.1.1 agents publish unique QoS 1 messages in a
//! loop while the gateway is `kill -9`ed at random moments and restarted (4 times). Every
//! message whose PUBACK an agent saw must end up in the outbox; no record seq may appear in
//! two different batch files; the outbox holds only messages that were really published;
//! batch headers stay consistent. Duplicated payloads (same message journaled twice) are
//! reported on stderr but not failed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use serde_json::json;

use crate::support::{
    Gateway, OUTBOX_TIMEOUT, duplicate_seqs, header_problems, payload_bytes, show, v4_options,
};

const AGENTS: usize = 4;
/// Messages an agent keeps outstanding (published, not yet PUBACKed). Well below rumqttc's
/// `inflight` (100), so packet ids are never reused while outstanding (no "collisions").
const WINDOW: usize = 8;
const KILLS: usize = 4;

#[derive(Debug, Default)]
struct AgentOutcome {
    client: String,
    /// Ids handed to the client (some may have been lost unacked, which is fine).
    published: u64,
    /// Ids whose PUBACK this agent saw: the gateway promised to keep these.
    acked: Vec<u64>,
    connacks: usize,
    session_present: usize,
    acks_on_last_connection: usize,
    connection_errors: usize,
    /// Events our bookkeeping could not attribute (stale events after a clean session).
    unattributed: usize,
}

fn payload(client: &str, id: u64) -> Vec<u8> {
    format!("{client}:{id}").into_bytes()
}

/// One agent. Ack attribution uses packet ids, not PUBACK order:
/// * every id handed to `try_publish` joins the FIFO `unassigned`;
/// * `Outgoing::Publish(pkid)` for a pkid we are not tracking is the *next new* request
///   (rumqttc takes requests in FIFO order), so it pops `unassigned` into `inflight[pkid]`;
///   a tracked pkid is a retransmission (after a reconnect with session_present);
/// * `Incoming::PubAck(pkid)` moves `inflight[pkid]` to `acked`.
/// * After a CONNACK with session_present = false rumqttc drops everything pending, so we
///   drop our bookkeeping too (those ids are simply never acked).
/// * New messages are only handed over while connected and with no buffered events left in
///   the event loop (stale events from the dead connection are drained first), so a stale
///   event can never be attributed to a new id. Any doubt errs towards "not acked", which
///   keeps the acked-subset-of-outbox assertion sound.
async fn crash_agent(port: u16, client: String, stop: Arc<AtomicBool>) -> AgentOutcome {
    let mut opts = v4_options(&client, port);
    // Persistent session: rumqttc retransmits unacked messages if the gateway resumes it.
    opts.set_clean_session(false);
    opts.set_inflight(100);
    let (c, mut el) = AsyncClient::new(opts, 2 * WINDOW);
    let topic = format!("agents/{client}/crash");
    let mut out = AgentOutcome {
        client: client.clone(),
        ..Default::default()
    };
    let mut unassigned: VecDeque<u64> = VecDeque::new();
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut connected = false;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            let deadline = *drain_deadline.get_or_insert(Instant::now() + Duration::from_secs(10));
            if (unassigned.is_empty() && inflight.is_empty()) || Instant::now() >= deadline {
                break;
            }
        } else if connected && el.state.events.is_empty() {
            while unassigned.len() + inflight.len() < WINDOW {
                let id = out.published;
                out.published += 1;
                c.try_publish(&topic, QoS::AtLeastOnce, false, payload(&client, id))
                    .expect("request channel has room");
                unassigned.push_back(id);
            }
        }
        let ev = match drain_deadline {
            // While draining, give up at the deadline (the event loop is dropped anyway).
            Some(d) => tokio::select! {
                ev = el.poll() => ev,
                _ = tokio::time::sleep_until(d.into()) => break,
            },
            None => el.poll().await,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ca))) => {
                connected = true;
                out.connacks += 1;
                out.acks_on_last_connection = 0;
                if ca.session_present {
                    out.session_present += 1;
                } else {
                    unassigned.clear();
                    inflight.clear();
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let std::collections::hash_map::Entry::Vacant(e) = inflight.entry(pkid) {
                    match unassigned.pop_front() {
                        Some(id) => {
                            e.insert(id);
                        }
                        None => out.unattributed += 1,
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => match inflight.remove(&a.pkid) {
                Some(id) => {
                    out.acked.push(id);
                    out.acks_on_last_connection += 1;
                }
                None => out.unattributed += 1,
            },
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                panic!("{client}: unexpected packet id collision on {pkid}")
            }
            Ok(_) => {}
            Err(_) => {
                connected = false;
                out.connection_errors += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_repeated_kill_9() {
    let mut gw = Gateway::start_with(|c| c["batch"]["compression"] = json!("gzip")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let agents: Vec<_> = (0..AGENTS)
        .map(|i| {
            tokio::spawn(crash_agent(
                gw.port,
                format!("crash-agent-{i}"),
                stop.clone(),
            ))
        })
        .collect();

    // Random kill moments (and down-times), drawn up front and printed for reproduction.
    let plan: Vec<(u64, u64)> = {
        let mut rng = rand::rng();
        (0..KILLS)
            .map(|_| (rng.random_range(300..1500), rng.random_range(0..300)))
            .collect()
    };
    eprintln!("kill plan (run ms, down ms): {plan:?}");
    for (run_ms, down_ms) in &plan {
        tokio::time::sleep(Duration::from_millis(*run_ms)).await;
        gw.assert_alive();
        gw.kill9().await;
        tokio::time::sleep(Duration::from_millis(*down_ms)).await;
        gw.restart().await;
    }
    // Let the agents make progress on the final incarnation, then stop publishing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for a in agents {
        let o = tokio::time::timeout(Duration::from_secs(20), a)
            .await
            .expect("agent did not finish")
            .expect("agent panicked");
        eprintln!(
            "{}: published {} acked {} connacks {} session_present {} errors {} unattributed {}",
            o.client,
            o.published,
            o.acked.len(),
            o.connacks,
            o.session_present,
            o.connection_errors,
            o.unattributed
        );
        outcomes.push(o);
    }
    gw.assert_alive();

    for o in &outcomes {
        assert!(
            o.connacks > KILLS,
            "{} connected only {} times across {KILLS} kills",
            o.client,
            o.connacks
        );
        assert!(
            o.acks_on_last_connection > 0,
            "{} got no PUBACK after the last restart (connection errors {})\n--- gateway output ---\n{}",
            o.client,
            o.connection_errors,
            gw.logs()
        );
    }

    let acked: Vec<Vec<u8>> = outcomes
        .iter()
        .flat_map(|o| o.acked.iter().map(|id| payload(&o.client, *id)))
        .collect();
    let published: HashSet<Vec<u8>> = outcomes
        .iter()
        .flat_map(|o| (0..o.published).map(|id| payload(&o.client, id)))
        .collect();

    // Wait (bounded) for every acked message to be batched; the poll's panic lists what is
    // missing if some acked message never shows up.
    gw.wait_for_payloads(&acked, OUTBOX_TIMEOUT).await;
    let status = gw.stop().await;
    assert!(status.success(), "graceful stop exited with {status}");

    let batches = gw.outbox_records().await;
    let have: HashSet<Vec<u8>> = batches
        .iter()
        .flat_map(|b| b.records.iter().map(payload_bytes))
        .collect();
    let lost: Vec<String> = acked
        .iter()
        .filter(|p| !have.contains(*p))
        .map(|p| show(p))
        .collect();
    assert!(
        lost.is_empty(),
        "{} PUBACKed messages missing from the outbox: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    let invented: Vec<String> = have
        .iter()
        .filter(|p| !published.contains(*p))
        .map(|p| show(p))
        .collect();
    assert!(
        invented.is_empty(),
        "outbox holds payloads nobody published: {invented:?}"
    );

    let dup_seqs = duplicate_seqs(&batches);
    assert!(
        dup_seqs.is_empty(),
        "record seqs present in more than one batch file: {:?}",
        &dup_seqs[..dup_seqs.len().min(20)]
    );
    let problems = header_problems(&batches, "gzip");
    assert!(problems.is_empty(), "batch header problems: {problems:#?}");

    // Report (do not fail on) payloads journaled more than once.
    let mut count: HashMap<Vec<u8>, usize> = HashMap::new();
    for b in &batches {
        for r in &b.records {
            *count.entry(payload_bytes(r)).or_default() += 1;
        }
    }
    let dups: Vec<String> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(p, n)| format!("{} x{n}", show(p)))
        .collect();
    eprintln!(
        "outbox: {} batch files, {} distinct payloads, {} acked, {} payloads duplicated {:?}",
        batches.len(),
        count.len(),
        acked.len(),
        dups.len(),
        &dups[..dups.len().min(20)]
    );
}
