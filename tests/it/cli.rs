//! The command line as a new user meets it: every command in README.md's "Using it" section
//! runs as written; `decode` into a pipe that closes early exits 0; an unknown top-level key is
//! reported with every valid key; a metrics address that cannot be bound is named with its key.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use gatehouse::envelope::{self, BatchIdentity, Codec};
use gatehouse::record::{JournaledRecord, Record, RecordProperties};
use tokio::process::Command;

use crate::support::{free_port, gatehouse_bin, gatehouse_output};

/// The shell block under the "## Using it" heading of README.md.
fn using_it_block() -> String {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n## Using it\n")
        .nth(1)
        .expect("README.md has a \"## Using it\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a ```sh block in \"Using it\"");
    block.to_string()
}

/// Runs `script` with bash (`-euo pipefail`) in `dir`, `gatehouse` on PATH.
async fn bash(dir: &Path, script: &str) -> (bool, String) {
    let bin_dir = gatehouse_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(dir)
            .env("PATH", path)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the commands finish")
    .expect("run bash");
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_readme_using_it_section_runs_as_written() {
    // The commands run from the repository root; a copy of what they use stands in for it, with
    // the agent port 1883 swapped for a free one (CI machines may have a broker on 1883).
    let port = free_port().to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    let example = include_str!("../../docs/gatehouse.example.json").replace("1883", &port);
    std::fs::write(dir.path().join("docs/gatehouse.example.json"), example).unwrap();
    let block = using_it_block();
    assert!(block.contains("gatehouse run"), "{block}");
    let script = block.replace("1883", &port);
    let (ok, output) = bash(dir.path(), &script).await;
    assert!(
        ok,
        "the README's commands failed:\n{script}\n--- output ---\n{output}"
    );
    assert!(
        output.contains("docs/gatehouse.example.json: valid"),
        "{output}"
    );
    assert!(
        output.contains(r#""clientId":"agent-1""#) && output.contains(r#"{\"cpu\": 12}"#),
        "decode shows the message published:\n{output}"
    );
    assert!(output.contains("0 dead-lettered records"), "{output}");
}

/// A batch of `n` records, written to `path`.
fn write_batch(path: &Path, n: usize) {
    let records: Vec<JournaledRecord> = (0..n)
        .map(|i| JournaledRecord {
            seq: i as u64 + 1,
            record: Record {
                received_at_ms: 0,
                client_id: "agent-1".into(),
                topic: "agents/agent-1/telemetry".into(),
                qos: 1,
                payload: Bytes::from(format!(
                    "{{\"event\": {i}, \"pad\": \"{}\"}}",
                    "x".repeat(100)
                )),
                properties: RecordProperties::default(),
            },
        })
        .collect();
    let id = BatchIdentity {
        gateway: "gw-itest".into(),
        batch_seq: 1,
        codec: Codec::Zstd,
        created_at: 0,
    };
    let packed = envelope::pack(&id, &records, 131_072).expect("fits");
    assert_eq!(packed.count, n, "all records in one batch");
    std::fs::write(path, &packed.payload).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_into_a_pipe_closed_early_exits_zero_quietly() {
    let dir = tempfile::tempdir().unwrap();
    // Far more output than a pipe buffers, so decode is still writing when head exits.
    write_batch(&dir.path().join("00000000000000000001.batch"), 5000);
    let (ok, output) = bash(
        dir.path(),
        "gatehouse decode 00000000000000000001.batch | head -1",
    )
    .await;
    assert!(ok, "{output}");
    assert_eq!(
        output.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "{output}"
    );
    assert!(!output.contains("Broken pipe"), "{output}");
    // Several inputs, a directory and stdin.
    let (ok, output) = bash(
        dir.path(),
        "gatehouse decode . 00000000000000000001.batch | wc -l; gatehouse decode < 00000000000000000001.batch | wc -l",
    )
    .await;
    assert!(ok, "{output}");
    let counts: Vec<&str> = output.split_whitespace().take(2).collect();
    assert_eq!(counts, vec!["10000", "5000"], "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_top_level_key_lists_every_valid_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(&file, r#"{"upstreem": {"kind": "directory"}}"#).unwrap();
    let (status, message) = gatehouse_output(["check-config".as_ref(), file.as_os_str()]).await;
    assert_eq!(status.code(), Some(64), "{message}");
    for key in [
        "thingName",
        "listeners",
        "journal",
        "batch",
        "upstream",
        "logLevel",
        "metrics",
        "sessions",
    ] {
        assert!(
            message.contains(&format!("`{key}`")),
            "{key} missing: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_in_use_is_named_with_its_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "listeners": [{"bind": format!("127.0.0.1:{}", free_port())}],
        "journal": {"path": dir.path().join("journal.db")},
        "upstream": {"kind": "directory", "path": dir.path().join("outbox")}
    });
    let file = dir.path().join("gatehouse.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let (status, text) = gatehouse_output([
        "run".as_ref(),
        "--config".as_ref(),
        file.as_os_str(),
        "--metrics".as_ref(),
        std::ffi::OsStr::new(&addr),
    ])
    .await;
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(&format!("metrics.bind: cannot serve metrics on {addr}")),
        "{text}"
    );
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_says_what_it_leaves_out_and_deep_checks_the_machine() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "listeners": [{"bind": taken.local_addr().unwrap().to_string()}],
        "journal": {"path": dir.path().join("journal.db")},
        "upstream": {"kind": "directory", "path": dir.path().join("outbox")}
    });
    let file = dir.path().join("gatehouse.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let (status, text) = gatehouse_output(["check-config".as_ref(), file.as_os_str()]).await;
    assert!(status.success(), "{text}");
    assert!(
        text.contains("not checked: that the listener and metrics ports are free"),
        "{text}"
    );
    let (status, text) =
        gatehouse_output(["check-config".as_ref(), file.as_os_str(), "--deep".as_ref()]).await;
    assert_eq!(status.code(), Some(64), "{text}");
    assert!(
        text.contains(&format!(
            "listeners[0].bind: cannot listen on {}",
            taken.local_addr().unwrap()
        )),
        "{text}"
    );
    drop(taken);
    let (status, text) =
        gatehouse_output(["check-config".as_ref(), file.as_os_str(), "--deep".as_ref()]).await;
    assert!(status.success(), "{text}");
}
