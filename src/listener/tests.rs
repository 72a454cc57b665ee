//! The session layer end to end in-process: a real listener, a real journal file and a rumqttc
//! agent; delivery to a connected agent within its window, and the journal behind PUBACKs.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::*;
use crate::config::Config;
use crate::shutdown;

struct Running {
    addr: SocketAddr,
    registry: Arc<Registry>,
    stop: shutdown::Trigger,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_json(&format!(
        r#"{{"listeners": [{{"bind": "127.0.0.1:0"}}], "journal": {{"path": "{}"}}}}"#,
        dir.path().join("journal.db").display()
    ))
    .unwrap();
    let (journal, _reader, _guard) = crate::journal::open(&config.journal).unwrap();
    let listener = Listener::bind(
        config.listeners[0].bind.0,
        Settings::new(&config.listeners[0], &config, 0).unwrap(),
    )
    .await
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = Arc::new(Registry::default());
    let (stop, signal) = shutdown::channel();
    let task = tokio::spawn(listener.run(journal, registry.clone(), signal));
    Running {
        addr,
        registry,
        stop,
        task,
        _dir: dir,
    }
}

/// Polls the agent's event loop until `f` picks an event, with a deadline.
async fn until<T>(events: &mut rumqttc::EventLoop, mut f: impl FnMut(&Event) -> Option<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.poll().await.expect("agent connection");
            if let Some(value) = f(&event) {
                return value;
            }
        }
    })
    .await
    .expect("event in time")
}

#[tokio::test]
async fn a_connected_agent_receives_deliveries_and_an_offline_one_is_reported() {
    let running = start().await;
    let mut options = MqttOptions::new("agent-7", "127.0.0.1", running.addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 16);
    until(&mut events, |e| {
        matches!(e, Event::Incoming(Packet::ConnAck(_))).then_some(())
    })
    .await;
    client
        .subscribe("agents/agent-7/commands/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut events, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())
    })
    .await;

    for (i, qos) in [(1u8, 1u8), (2, 0)] {
        running
            .registry
            .deliver(
                "agent-7",
                Delivery {
                    topic: format!("agents/agent-7/commands/{i}"),
                    payload: format!("isolate host {i}").into(),
                    qos,
                },
            )
            .unwrap();
        let publish = until(&mut events, |e| match e {
            Event::Incoming(Packet::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await;
        assert_eq!(publish.topic, format!("agents/agent-7/commands/{i}"));
        assert_eq!(&publish.payload[..], format!("isolate host {i}").as_bytes());
        assert_eq!(publish.qos as u8, qos);
        if qos == 1 {
            assert_ne!(publish.pkid, 0, "QoS 1 deliveries carry a packet id");
        }
    }

    assert_eq!(
        running.registry.deliver(
            "nobody",
            Delivery {
                topic: "commands/nobody".into(),
                payload: "x".into(),
                qos: 1,
            },
        ),
        Err(DeliverError::Offline)
    );
    running.stop.fire();
    tokio::time::timeout(Duration::from_secs(10), running.task)
        .await
        .expect("listener stops on shutdown")
        .unwrap();
}
