//! Supervision: a gateway whose sink stops (a panic, or an unexpected return) shuts down and
//! fails, so the process exits non-zero instead of accepting messages it cannot deliver.

use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions, QoS};

use super::*;
use crate::sink::{Batch, Confirmation, SinkFuture};

/// A sink that takes batches and, at the first one, panics or returns.
struct FailingSink {
    panic: bool,
}

impl Sink for FailingSink {
    fn name(&self) -> &'static str {
        "directory"
    }

    fn max_inflight(&self) -> usize {
        4
    }

    fn max_payload(&self) -> usize {
        usize::MAX
    }

    fn run(
        self: Box<Self>,
        mut batches: mpsc::Receiver<Batch>,
        _confirmations: mpsc::Sender<Confirmation>,
    ) -> SinkFuture {
        Box::pin(async move {
            let _first = batches.recv().await;
            if self.panic {
                panic!("test sink fails at its first batch");
            }
        })
    }
}

async fn run_until_the_sink_fails(panic: bool) -> anyhow::Error {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_json(&format!(
        r#"{{"listeners": [{{"bind": "127.0.0.1:0"}}], "journal": {{"path": "{}"}},
            "batch": {{"maxDelayMs": 10}}}}"#,
        dir.path().join("journal.db").display()
    ))
    .unwrap();
    let gateway = Gateway::bind(config).await.unwrap();
    let addr = gateway.local_addrs()[0];
    let run = tokio::spawn(
        gateway.run_with_sink(Box::new(FailingSink { panic }), std::future::pending()),
    );
    let mut options = MqttOptions::new("agent-1", addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 10);
    client
        .publish("agents/agent-1/telemetry", QoS::AtLeastOnce, false, "event")
        .await
        .unwrap();
    let agent = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let result = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the gateway must stop by itself once its sink is gone")
        .unwrap();
    agent.abort();
    result.expect_err("a gateway whose sink stopped must fail")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_sink_stops_the_gateway_with_an_error() {
    let error = run_until_the_sink_fails(true).await;
    assert!(format!("{error:#}").contains("sink panicked"), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_returns_stops_the_gateway_with_an_error() {
    let error = run_until_the_sink_fails(false).await;
    assert!(
        format!("{error:#}").contains("sink stopped unexpectedly"),
        "{error:#}"
    );
}
