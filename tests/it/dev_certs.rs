//! `gatehouse dev-certs` as a user meets it: the README's mTLS quick start runs as written
//! (dev-certs, the gateway on a TLS listener using the files, mosquitto_pub over mutual TLS,
//! `gatehouse decode`); the generated certificates plug into a listener's `tls` block, admit
//! each agent under its own client id only (client-id binding), and a second run without
//! `--force` names an existing file and changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::json;
use tokio::process::Command;

use crate::cli::bash;
use crate::support::{Gateway, client_id, free_port, gatehouse_output, payload_bytes};

/// Every file `dev-certs DIR --agents 2` writes, and whether it is a private key.
const FILES: [(&str, bool); 8] = [
    ("ca.pem", false),
    ("ca.key", true),
    ("server.pem", false),
    ("server.key", true),
    ("agent-1.pem", false),
    ("agent-1.key", true),
    ("agent-2.pem", false),
    ("agent-2.key", true),
];

/// The ```sh block after "mTLS quick start" in README.md's "Agent security" section.
fn quick_start_block() -> String {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n## Agent security\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has an \"## Agent security\" section");
    section
        .split("mTLS quick start")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|rest| rest.split("\n```").next())
        .expect("a ```sh block after \"mTLS quick start\" in \"Agent security\"")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_mtls_quick_start_runs_as_written() {
    // From a copy of what the commands use from the repository root, with the port 8883
    // swapped for a free one.
    let port = free_port().to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    let config = include_str!("../../docs/gatehouse.mtls.json").replace("8883", &port);
    std::fs::write(dir.path().join("docs/gatehouse.mtls.json"), config).unwrap();
    let block = quick_start_block();
    for command in [
        "gatehouse dev-certs",
        "gatehouse run",
        "mosquitto_pub",
        "--cert certs/agent-1.pem",
        "gatehouse decode",
    ] {
        assert!(block.contains(command), "{command} missing:\n{block}");
    }
    // Should a line fail, the gateway started in the background is stopped too.
    let script = format!(
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{}",
        block.replace("8883", &port)
    );
    let (ok, output) = bash(dir.path(), &script).await;
    assert!(
        ok,
        "the README's quick start failed:\n{script}\n--- output ---\n{output}"
    );
    assert!(
        output.contains(r#""clientId":"agent-1""#) && output.contains(r#"{\"cpu\": 12}"#),
        "decode shows the message agent-1 published over mTLS:\n{output}"
    );
    for (name, _) in FILES {
        assert!(dir.path().join("certs").join(name).is_file(), "{name}");
    }
}

/// `mosquitto_pub` over mutual TLS with `cert`'s certificate and key from `certs`, as client
/// id `id`, one QoS 1 message to `agents/<id>/telemetry`.
async fn publish(port: u16, certs: &Path, cert: &str, id: &str, message: &str) -> Output {
    tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("mosquitto_pub")
            .arg("--cafile")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join(format!("{cert}.pem")))
            .arg("--key")
            .arg(certs.join(format!("{cert}.key")))
            .args([
                "-h",
                "localhost",
                "-p",
                &port.to_string(),
                "-q",
                "1",
                "-i",
                id,
            ])
            .args(["-t", &format!("agents/{id}/telemetry"), "-m", message])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_pub exits within 30 s")
    .expect("run mosquitto_pub")
}

/// Every file of [`FILES`] in `dir`, in order.
fn contents(dir: &Path) -> Vec<Vec<u8>> {
    FILES
        .iter()
        .map(|(name, _)| std::fs::read(dir.join(name)).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_certs_admit_each_agent_as_itself_only_and_never_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let dev_certs = |extra: &[&str]| {
        let mut args = vec!["dev-certs".to_string(), certs.display().to_string()];
        args.extend(["--agents", "2"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        gatehouse_output(args)
    };
    let (status, text) = dev_certs(&[]).await;
    assert!(status.success(), "{text}");
    assert!(
        text.contains(&format!("\"clientCaFile\":\"{}/ca.pem\"", certs.display())),
        "the summary shows a listener using the files:\n{text}"
    );
    for (name, private) in FILES {
        let mode = std::fs::metadata(certs.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        if private {
            assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
        }
    }
    assert!(!certs.join("agent-3.pem").exists());
    let before = contents(&certs);

    // A gateway with a TLS listener on those files and the default ACL.
    let mut gw = Gateway::start_with(|c| {
        c.as_object_mut().unwrap().remove("acl");
        c["listeners"][0]["tls"] = json!({
            "certFile": certs.join("server.pem"),
            "keyFile": certs.join("server.key"),
            "clientCaFile": certs.join("ca.pem"),
            "requireClientCert": true
        });
    })
    .await;

    let out = publish(gw.port, &certs, "agent-1", "agent-1", "from agent-1").await;
    assert!(out.status.success(), "agent-1 over mTLS: {out:?}");
    // agent-2's certificate with agent-1's client id: refused at CONNECT.
    let out = publish(gw.port, &certs, "agent-2", "agent-1", "spoofed").await;
    assert!(
        !out.status.success(),
        "agent-2's certificate as agent-1 was accepted: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("identifier rejected"), "{stderr}");
    // agent-2's certificate is good for agent-2.
    let out = publish(gw.port, &certs, "agent-2", "agent-2", "from agent-2").await;
    assert!(out.status.success(), "agent-2 over mTLS: {out:?}");

    let records = gw
        .wait_for_payloads(
            &[b"from agent-1".to_vec(), b"from agent-2".to_vec()],
            Duration::from_secs(15),
        )
        .await;
    let mut seen: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                client_id(r),
                String::from_utf8_lossy(&payload_bytes(r)).into_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("agent-1".to_string(), "from agent-1".to_string()),
            ("agent-2".to_string(), "from agent-2".to_string())
        ]
    );
    gw.assert_alive();
    assert!(gw.stop().await.success());

    // Again without --force: refused, naming a file, nothing changed.
    let (status, text) = dev_certs(&[]).await;
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(&format!("{}/ca.pem already exists", certs.display()))
            && text.contains("--force"),
        "{text}"
    );
    assert!(contents(&certs) == before, "files changed without --force");
    let names: Vec<String> = std::fs::read_dir(&certs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), FILES.len(), "{names:?}");

    // With --force: every file replaced, keys still 0600.
    let (status, text) = dev_certs(&["--force"]).await;
    assert!(status.success(), "{text}");
    let after = contents(&certs);
    for (i, (name, private)) in FILES.iter().enumerate() {
        assert!(after[i] != before[i], "{name} not replaced");
        let mode = std::fs::metadata(certs.join(name))
            .unwrap()
            .permissions()
            .mode();
        if *private {
            assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_certs_name_bad_input_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let certs_arg = certs.display().to_string();
    let under_file = file.join("certs").display().to_string();
    for (args, expected) in [
        (
            vec![certs_arg.as_str(), "--agents", "0"],
            "--agents 0".to_string(),
        ),
        (
            vec![certs_arg.as_str(), "--days", "0"],
            "--days 0".to_string(),
        ),
        (
            vec![certs_arg.as_str(), "--server-name", "bad name"],
            "--server-name \"bad name\"".to_string(),
        ),
        (
            vec![under_file.as_str()],
            format!("cannot create the directory {under_file}"),
        ),
    ] {
        let (status, text) = gatehouse_output(["dev-certs"].into_iter().chain(args.clone())).await;
        assert!(!status.success(), "{args:?}: {text}");
        assert!(text.contains(&expected), "{args:?}: {text}");
    }
    assert!(!certs.exists(), "nothing written");
}
