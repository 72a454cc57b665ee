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
pub async fn bash(dir: &Path, script: &str) -> (bool, String) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_reassembles_a_fragmented_record_across_a_directory() {
    use base64::Engine;

    /// `gatehouse decode ARGS`: (exit code, stdout lines, stderr).
    async fn decode(args: &[&Path]) -> (Option<i32>, Vec<serde_json::Value>, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(gatehouse_bin())
                .arg("decode")
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("decode finishes")
        .expect("run gatehouse decode");
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), lines, stderr)
    }
    let record = |seq: u64, payload: Vec<u8>| JournaledRecord {
        seq,
        record: Record {
            received_at_ms: 0,
            client_id: "agent-1".into(),
            topic: "agents/agent-1/files".into(),
            qos: 1,
            payload: Bytes::from(payload),
            properties: RecordProperties::default(),
        },
    };
    let id = |batch_seq: u64| BatchIdentity {
        gateway: "gw-itest".into(),
        batch_seq,
        codec: Codec::Zstd,
        created_at: 0,
    };
    let dir = tempfile::tempdir().unwrap();
    let file = |batch_seq: u64| dir.path().join(format!("{batch_seq:020}.batch"));
    // An incompressible 1 MB file (xorshift), between two ordinary batches.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let before: Vec<_> = (1..=3)
        .map(|s| record(s, format!("small {s}").into_bytes()))
        .collect();
    let packed = envelope::pack(&id(1), &before, 131_072).unwrap();
    std::fs::write(file(1), &packed.payload).unwrap();
    let parts = envelope::fragments(&id(2), &record(4, big.clone()), 131_072).unwrap();
    let n = parts.len() as u64;
    assert!(n >= 8, "{n} fragments");
    for part in &parts {
        assert!(part.payload.len() <= 131_072);
        std::fs::write(file(part.header.batch_seq), &part.payload).unwrap();
    }
    let after: Vec<_> = (5..=6)
        .map(|s| record(s, format!("small {s}").into_bytes()))
        .collect();
    let packed = envelope::pack(&id(2 + n), &after, 131_072).unwrap();
    std::fs::write(file(2 + n), &packed.payload).unwrap();

    // Each record once, the big one whole and in place.
    let (code, lines, stderr) = decode(&[dir.path()]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6], "{stderr}");
    let whole = &lines[3];
    assert_eq!(whole["fragments"], n);
    assert!(whole.get("fragment").is_none());
    let payload = base64::engine::general_purpose::STANDARD
        .decode(whole["payloadBase64"].as_str().unwrap())
        .unwrap();
    assert!(payload == big, "the reassembled payload differs");
    assert!(
        lines
            .iter()
            .filter(|l| l.get("fragments").is_some())
            .count()
            == 1
    );
    assert_eq!(lines[0]["payload"], "small 1");

    // --header: one header per batch, still one line per record.
    let out = Command::new(gatehouse_bin())
        .args([
            "decode".as_ref(),
            "--header".as_ref(),
            dir.path().as_os_str(),
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.contains("\"batchSeq\"")).count() as u64,
        n + 2
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("\"clientId\"")).count(),
        6
    );

    // A fragment given twice (in the directory and by name) is a duplicate.
    let (code, lines, stderr) = decode(&[dir.path(), &file(4)]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(lines.len(), 6, "{stderr}");

    // A fragment missing: the rest is printed, the record reported, exit 1.
    let missing = file(5);
    let kept = std::fs::read(&missing).unwrap();
    std::fs::remove_file(&missing).unwrap();
    let (code, lines, stderr) = decode(&[dir.path()]).await;
    assert_eq!(code, Some(1), "{stderr}");
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 5, 6]);
    assert!(
        stderr.contains("record seq 4")
            && stderr.contains(&format!("incomplete, {} of {n} fragments", n - 1)),
        "{stderr}"
    );

    // A fragment of another payload under the same seq: a corrupt set, naming seq and files.
    let mut other = big.clone();
    other[0] ^= 1;
    let foreign = envelope::fragments(&id(5), &record(4, other), 131_072).unwrap();
    std::fs::write(&missing, &foreign[3].payload).unwrap();
    let (code, lines, stderr) = decode(&[dir.path()]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(lines.len(), 5, "{stderr}");
    assert!(
        stderr.contains("record seq 4")
            && stderr.contains("sha256")
            && stderr.contains(&format!("{:020}.batch", 5)),
        "{stderr}"
    );
    std::fs::write(&missing, kept).unwrap();
    let (code, lines, _) = decode(&[dir.path()]).await;
    assert_eq!((code, lines.len()), (Some(0), 6));
}
