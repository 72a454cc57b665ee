//! Config validation through the CLI: `gatehouse check-config` exits 0 on valid files and 64
//! on invalid ones with stderr naming the offending key path (bad batch.maxBytes, unknown
//! keys, bad listeners[0].bind, bad compression, bad synchronous, broken JSON, missing file);
//! `gatehouse run` refuses an invalid config instead of starting.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::gatehouse_bin;

fn valid_config(dir: &Path) -> Value {
    json!({
        "thingName": "gw-test",
        "listeners": [{"bind": "127.0.0.1:18830", "maxPacketSize": 262144}],
        "journal": {"path": dir.join("journal.db"), "synchronous": "full", "dedupWindowSecs": 600},
        "batch": {"maxBytes": 131072, "maxMessages": 1000, "maxDelayMs": 1000, "compression": "zstd"},
        "upstream": {"kind": "directory", "path": dir.join("outbox")},
        "logLevel": "info",
        "metrics": {"bind": "127.0.0.1:9464"}
    })
}

fn check_config_text(dir: &Path, name: &str, text: &str) -> Output {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    check_config_path(&path)
}

fn check_config_path(path: &Path) -> Output {
    Command::new(gatehouse_bin())
        .arg("check-config")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("spawn gatehouse check-config")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert exit code 64 and that stderr mentions every string in `needles`.
fn assert_rejected(what: &str, o: &Output, needles: &[&str]) -> Option<String> {
    let err = stderr(o);
    if o.status.code() != Some(64) {
        return Some(format!(
            "{what}: expected exit 64, got {} (stderr: {err:?})",
            o.status
        ));
    }
    let missing: Vec<&&str> = needles.iter().filter(|n| !err.contains(**n)).collect();
    if !missing.is_empty() {
        return Some(format!(
            "{what}: stderr does not mention {missing:?}: {err:?}"
        ));
    }
    None
}

#[test]
fn valid_configs_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let full = serde_json::to_string_pretty(&valid_config(dir.path())).unwrap();
    for (name, text) in [("full.json", full.as_str()), ("empty.json", "{}")] {
        let o = check_config_text(dir.path(), name, text);
        assert!(
            o.status.success(),
            "check-config {name} should pass, exited {}: {}",
            o.status,
            stderr(&o)
        );
    }
}

#[test]
fn invalid_configs_are_rejected_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    type Mutate = fn(&mut Value);
    let cases: Vec<(&str, Mutate, &[&str])> = vec![
        (
            "batch.maxBytes = \"lots\"",
            |c| c["batch"]["maxBytes"] = json!("lots"),
            &["batch.maxBytes", "lots"],
        ),
        (
            "batch.maxBytes = 10 (below range)",
            |c| c["batch"]["maxBytes"] = json!(10),
            &["batch.maxBytes"],
        ),
        (
            "unknown key journal.pth",
            |c| c["journal"]["pth"] = json!("/tmp/x.db"),
            &["journal", "pth"],
        ),
        (
            "unknown top-level key thingname",
            |c| c["thingname"] = json!("gw"),
            &["thingname"],
        ),
        (
            "listeners[0].bind = \"localhost-ish\"",
            |c| c["listeners"][0]["bind"] = json!("localhost-ish"),
            &["listeners[0].bind"],
        ),
        (
            "listeners[0].bind port out of range",
            |c| c["listeners"][0]["bind"] = json!("127.0.0.1:99999"),
            &["listeners[0].bind"],
        ),
        (
            "batch.compression = \"brotli\"",
            |c| c["batch"]["compression"] = json!("brotli"),
            &["batch.compression"],
        ),
        (
            "journal.synchronous = \"sometimes\"",
            |c| c["journal"]["synchronous"] = json!("sometimes"),
            &["journal.synchronous"],
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, mutate, needles)) in cases.into_iter().enumerate() {
        let mut c = valid_config(dir.path());
        mutate(&mut c);
        let o = check_config_text(dir.path(), &format!("bad{i}.json"), &c.to_string());
        failures.extend(assert_rejected(what, &o, needles));
    }
    let o = check_config_text(
        dir.path(),
        "broken.json",
        "{\"batch\": {\"maxBytes\": 1024,",
    );
    failures.extend(assert_rejected("truncated JSON", &o, &[]));
    let o = check_config_path(&dir.path().join("does-not-exist.json"));
    if o.status.success() {
        failures.push("missing config file accepted".into());
    }
    assert!(
        failures.is_empty(),
        "{} check-config case(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn run_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = valid_config(dir.path());
    c["batch"]["maxBytes"] = json!("lots");
    c["listeners"][0]["bind"] = json!("127.0.0.1:0");
    c.as_object_mut().unwrap().remove("metrics");
    let path = dir.path().join("bad.json");
    std::fs::write(&path, c.to_string()).unwrap();
    let mut child = Command::new(gatehouse_bin())
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gatehouse run");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`gatehouse run` with batch.maxBytes=\"lots\" still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success(), "run accepted an invalid config: {text}");
    assert!(
        text.contains("batch.maxBytes"),
        "run's error does not name batch.maxBytes: {text:?}"
    );
}
