//! The Greengrass packaging, checked without a nucleus: the recipe parses, has a manifest per
//! architecture that both nuclei accept, and its default configuration is the configuration
//! model (every key, each with the model's default; `gatehouse check-config` accepts it, also
//! with every scalar a string as nucleus lite returns them); its IPC authorization names the
//! thing; the scripts parse, stage the artifacts the manifests name and hand greengrass-cli what
//! it needs (with stand-in tools); the GDK project and the receipts CloudFormation template agree
//! with the recipe.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use gatehouse::config::Config;
use serde_json::Value;
use tokio::process::Command;

use crate::support::gatehouse_output;

const COMPONENT: &str = "io.gatehouse.AgentGateway";
const VERSION: &str = env!("CARGO_PKG_VERSION");
const RECIPE: &str = include_str!("../../recipes/io.gatehouse.AgentGateway.yaml");
const RECEIPTS_TEMPLATE: &str = include_str!("../../cloud/receipts.yaml");
const GDK_CONFIG: &str = include_str!("../../gdk-config.json");
const ARTIFACTS_GITIGNORE: &str = include_str!("../../artifacts/.gitignore");
/// Where GDK puts artifact URIs, and where `gdk component publish` rewrites them.
const URI_PREFIX: &str = "s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/";

/// Top-level keys the recipe leaves out because their default is absent or computed, each said
/// in a comment: `thingName` (AWS_IOT_THING_NAME), `metrics` (no admin listener).
const OMITTED_TOP_LEVEL: [&str; 2] = ["thingName", "metrics"];
/// Likewise in `listeners[0]`: `tls` (plain TCP on loopback) and `auth` (its kind follows `tls`).
const OMITTED_LISTENER: [&str; 2] = ["tls", "auth"];
/// Likewise in `upstream`: `maxFrameBytes` (detected at start: nucleus lite or not).
const OMITTED_UPSTREAM: [&str; 1] = ["maxFrameBytes"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn recipe() -> Value {
    serde_norway::from_str(RECIPE).expect("the recipe is YAML")
}

/// `ComponentConfiguration.DefaultConfiguration`, `accessControl` included.
fn default_configuration() -> Value {
    recipe()["ComponentConfiguration"]["DefaultConfiguration"].clone()
}

/// The configuration the gateway parses: the default configuration minus `accessControl`.
fn gateway_configuration() -> Value {
    let mut config = default_configuration();
    let removed = config
        .as_object_mut()
        .expect("DefaultConfiguration is an object")
        .remove("accessControl");
    assert!(removed.is_some(), "DefaultConfiguration has accessControl");
    config
}

/// Every scalar as a string (`42` as `"42"`, `true` as `"true"`), as nucleus lite returns the
/// configuration of a YAML recipe.
fn stringified(value: &Value) -> Value {
    match value {
        Value::Number(n) => Value::String(n.to_string()),
        Value::Bool(b) => Value::String(b.to_string()),
        Value::Array(items) => Value::Array(items.iter().map(stringified).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), stringified(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("expected an object, got {value}"))
        .keys()
        .cloned()
        .collect()
}

/// Runs `gatehouse check-config` on `config` written to a temp file.
async fn check_config(config: &Value) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.json");
    std::fs::write(&file, serde_json::to_string_pretty(config).unwrap()).unwrap();
    let (status, text) = gatehouse_output(["check-config".as_ref(), file.as_os_str()]).await;
    (status.code(), text)
}

/// The keys the model accepts where `probe` puts the unknown key `zzProbe`, read from
/// check-config's error ("unknown field `zzProbe`, expected one of `a`, `b`, ...").
async fn valid_keys(probe: Value) -> BTreeSet<String> {
    let (code, text) = check_config(&probe).await;
    assert_eq!(code, Some(64), "{probe} is refused: {text}");
    let line = text
        .lines()
        .find(|l| l.contains("unknown field `zzProbe`"))
        .unwrap_or_else(|| panic!("{probe}: no unknown-field error in: {text}"));
    let (_, expected) = line
        .split_once("expected")
        .unwrap_or_else(|| panic!("no list of valid keys in: {line}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Runs `bash SCRIPT ARGS` from the repository root with `envs`; (success, stdout, stderr).
async fn script(
    path: &str,
    args: &[&OsStr],
    envs: &[(&str, &OsStr)],
    cwd: &Path,
) -> (bool, String, String) {
    let mut command = Command::new("bash");
    command
        .arg(repo().join(path))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the script finishes")
        .expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The manifest for Linux `architecture`, and the file name of its single artifact.
fn manifest<'a>(recipe: &'a Value, architecture: &str) -> (&'a Value, String) {
    let manifest = recipe["Manifests"]
        .as_array()
        .expect("Manifests is a list")
        .iter()
        .find(|m| m["Platform"]["architecture"] == architecture)
        .unwrap_or_else(|| panic!("no manifest for {architecture}"));
    let artifacts = manifest["Artifacts"].as_array().expect("Artifacts");
    assert_eq!(artifacts.len(), 1, "{architecture}: one artifact");
    let uri = artifacts[0]["URI"].as_str().expect("URI");
    let file = uri
        .strip_prefix(URI_PREFIX)
        .unwrap_or_else(|| panic!("{uri} is not in GDK's {URI_PREFIX}<file> form"));
    (manifest, file.to_string())
}

/// The artifact file names, as scripts/build-artifact.sh names them.
const ARTIFACTS: [(&str, &str); 2] = [
    ("amd64", "gatehouse-x86_64"),
    ("aarch64", "gatehouse-aarch64"),
];

#[test]
fn the_recipe_has_the_required_keys_and_a_manifest_per_architecture() {
    let recipe = recipe();
    assert_eq!(recipe["RecipeFormatVersion"], "2020-01-25");
    assert_eq!(recipe["ComponentName"], COMPONENT);
    assert_eq!(
        recipe["ComponentVersion"], VERSION,
        "the recipe's version is Cargo.toml's"
    );
    for key in ["ComponentDescription", "ComponentPublisher"] {
        let text = recipe[key].as_str().unwrap_or_default();
        assert!(!text.trim().is_empty(), "{key} is set");
    }
    assert!(recipe["ComponentConfiguration"]["DefaultConfiguration"].is_object());

    let mut seen = BTreeSet::new();
    for (architecture, expected_file) in ARTIFACTS {
        let (manifest, file) = manifest(&recipe, architecture);
        let platform = &manifest["Platform"];
        assert_eq!(platform["os"], "linux", "{architecture}");
        assert_eq!(
            platform["runtime"], "*",
            "{architecture}: nucleus lite skips a manifest without runtime \"*\""
        );
        assert_eq!(file, expected_file, "{architecture}");
        let artifact = &manifest["Artifacts"][0];
        assert!(
            ["OWNER", "ALL"].contains(&artifact["Permission"]["Execute"].as_str().unwrap_or("")),
            "{architecture}: the binary is executable: {artifact}"
        );
        let run = manifest["Lifecycle"]["Run"]
            .as_str()
            .unwrap_or_else(|| panic!("{architecture}: Lifecycle.Run is a script"));
        assert!(
            run.contains(&format!("{{artifacts:path}}/{file}")) && run.ends_with(" run"),
            "{architecture}: Run starts `{{artifacts:path}}/{file} run`: {run}"
        );
        seen.insert(file);
    }
    assert_eq!(seen.len(), 2, "one binary per architecture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_configuration_passes_check_config_also_with_string_scalars() {
    let config = gateway_configuration();
    assert_eq!(config["upstream"]["kind"], "greengrass");
    let (code, text) = check_config(&config).await;
    assert_eq!(
        code,
        Some(0),
        "check-config refuses the recipe's defaults: {text}"
    );

    let lite = stringified(&config);
    assert_eq!(lite["batch"]["maxBytes"], "131072", "{lite}");
    let (code, text) = check_config(&lite).await;
    assert_eq!(
        code,
        Some(0),
        "check-config refuses the defaults as nucleus lite returns them: {text}"
    );
}

#[test]
fn every_listed_value_is_the_models_default() {
    // The model's defaults under Greengrass: nothing set but the upstream kind.
    let model = Config::from_value(serde_json::json!({"upstream": {"kind": "greengrass"}}))
        .expect("the model's defaults");
    let recipe = Config::from_value(gateway_configuration()).expect("the recipe's defaults");
    assert_eq!(
        format!("{recipe:#?}"),
        format!("{model:#?}"),
        "a value in the recipe's DefaultConfiguration differs from the model's default"
    );
    let lite = Config::from_value(stringified(&gateway_configuration()))
        .expect("the recipe's defaults as nucleus lite returns them");
    assert_eq!(format!("{lite:#?}"), format!("{model:#?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_configuration_lists_every_key_of_the_model() {
    let config = gateway_configuration();
    let sections: [(&str, Value, &Value, &[&str]); 6] = [
        (
            "the top level",
            serde_json::json!({"zzProbe": 1}),
            &config,
            &OMITTED_TOP_LEVEL,
        ),
        (
            "listeners[0]",
            serde_json::json!({"listeners": [{"bind": "127.0.0.1:1883", "zzProbe": 1}]}),
            &config["listeners"][0],
            &OMITTED_LISTENER,
        ),
        (
            "journal",
            serde_json::json!({"journal": {"zzProbe": 1}}),
            &config["journal"],
            &[],
        ),
        (
            "batch",
            serde_json::json!({"batch": {"zzProbe": 1}}),
            &config["batch"],
            &[],
        ),
        (
            "sessions",
            serde_json::json!({"sessions": {"zzProbe": 1}}),
            &config["sessions"],
            &[],
        ),
        (
            "upstream (greengrass)",
            serde_json::json!({"upstream": {"kind": "greengrass", "zzProbe": 1}}),
            &config["upstream"],
            &OMITTED_UPSTREAM,
        ),
    ];
    assert_eq!(
        config["listeners"].as_array().map(Vec::len),
        Some(1),
        "the default is one listener"
    );
    for (section, probe, listed, omitted) in sections {
        let model = valid_keys(probe).await;
        let listed = keys(listed);
        let extra: Vec<_> = listed.difference(&model).collect();
        assert!(extra.is_empty(), "{section}: not in the model: {extra:?}");
        let missing: BTreeSet<&str> = model
            .iter()
            .filter(|k| !listed.contains(*k))
            .map(String::as_str)
            .collect();
        let omitted: BTreeSet<&str> = omitted.iter().copied().collect();
        assert_eq!(
            missing, omitted,
            "{section}: the recipe must list every key of the model with its default, except \
             the documented absent/computed ones"
        );
        for key in omitted {
            assert!(
                RECIPE
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("# {key}: left out"))),
                "{section}: the recipe says in a comment why {key} is left out"
            );
        }
    }
}

#[test]
fn every_access_control_resource_names_the_thing() {
    let config = default_configuration();
    let policies = config["accessControl"]["aws.greengrass.ipc.mqttproxy"]
        .as_object()
        .expect("an aws.greengrass.ipc.mqttproxy policy");
    let mut allowed: Vec<(String, String)> = Vec::new();
    for (id, policy) in policies {
        assert!(
            policy["policyDescription"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{id}: policyDescription"
        );
        let resources = policy["resources"].as_array().expect("resources");
        assert!(!resources.is_empty(), "{id}: resources");
        for operation in policy["operations"].as_array().expect("operations") {
            for resource in resources {
                let resource = resource.as_str().expect("a topic");
                assert!(
                    resource.contains("{iot:thingName}"),
                    "{id}: {resource} is not scoped to the core device's thing"
                );
                allowed.push((
                    operation.as_str().unwrap().to_string(),
                    resource.to_string(),
                ));
            }
        }
    }
    // The gateway's own topics, its `{thingName}` being the core device's thing name.
    let thing = |topic: &Value| {
        topic
            .as_str()
            .unwrap()
            .replace("{thingName}", "{iot:thingName}")
    };
    let batches = thing(&config["upstream"]["topic"]);
    let receipts = thing(&config["upstream"]["receiptTopic"]);
    let commands = receipts.replace("/receipts", "/commands/#");
    for (operation, resource) in [
        ("aws.greengrass#PublishToIoTCore", batches.clone()),
        ("aws.greengrass#PublishToIoTCore", format!("{batches}/*")),
        ("aws.greengrass#SubscribeToIoTCore", receipts),
        ("aws.greengrass#SubscribeToIoTCore", commands),
    ] {
        assert!(
            allowed
                .iter()
                .any(|(o, r)| *o == operation && *r == resource),
            "{operation} on {resource} is not allowed: {allowed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripts_parse_and_stage_the_artifacts_the_manifests_name() {
    for path in ["scripts/build-artifact.sh", "scripts/deploy-local.sh"] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(repo().join(path))
            .output()
            .await
            .expect("run bash -n");
        assert!(
            out.status.success(),
            "bash -n {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let (ok, stdout, stderr) = script(
        "scripts/build-artifact.sh",
        &["--dry-run".as_ref()],
        &[("TARGET", "all".as_ref())],
        &repo(),
    )
    .await;
    assert!(ok, "build-artifact.sh --dry-run: {stderr}");
    let recipe = recipe();
    for (architecture, _) in ARTIFACTS {
        let (_, file) = manifest(&recipe, architecture);
        let staged = format!("artifacts/{COMPONENT}/{VERSION}/{file}");
        assert!(
            stdout.lines().any(|l| l.ends_with(&format!("-> {staged}"))),
            "build-artifact.sh does not stage {staged}: {stdout}"
        );
    }
}

/// ELF e_machine of this machine's binaries, and the artifact's architecture suffix.
fn host_elf() -> Option<(u8, &'static str)> {
    match std::env::consts::ARCH {
        "x86_64" => Some((0x3e, "x86_64")),
        "aarch64" => Some((0xb7, "aarch64")),
        _ => None,
    }
}

fn write_executable(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_then_deploy_locally_with_stand_in_cargo_and_greengrass_cli() {
    let Some((machine, arch)) = host_elf() else {
        eprintln!(
            "skipped: the recipe has no manifest for {}",
            std::env::consts::ARCH
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let artifacts = tmp.join("artifacts");
    // A cargo that "builds" a stub ELF header of this machine's architecture.
    let cargo = tmp.join("fake-cargo");
    write_executable(
        &cargo,
        &format!(
            "#!/usr/bin/env bash\nset -eu\necho \"$*\" > \"{log}\"\nmkdir -p \"$CARGO_TARGET_DIR/release\"\n\
             printf '\\177ELF\\2\\1\\1\\0\\0\\0\\0\\0\\0\\0\\0\\0\\2\\0\\{machine:03o}\\0' > \"$CARGO_TARGET_DIR/release/gatehouse\"\n",
            log = tmp.join("cargo-args").display()
        ),
    );
    let (ok, _, stderr) = script(
        "scripts/build-artifact.sh",
        &[],
        &[
            ("CARGO", cargo.as_os_str()),
            ("CARGO_TARGET_DIR", tmp.join("target").as_os_str()),
            ("ARTIFACTS_DIR", artifacts.as_os_str()),
            ("TARGET", "".as_ref()),
        ],
        tmp,
    )
    .await;
    assert!(ok, "build-artifact.sh: {stderr}");
    let cargo_args = std::fs::read_to_string(tmp.join("cargo-args")).unwrap();
    assert!(
        cargo_args.contains("build --release --locked --bin gatehouse"),
        "{cargo_args}"
    );
    let staged = artifacts
        .join(COMPONENT)
        .join(VERSION)
        .join(format!("gatehouse-{arch}"));
    let mode = std::fs::metadata(&staged)
        .unwrap_or_else(|e| panic!("{}: {e}; {stderr}", staged.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "{} is executable", staged.display());

    // A greengrass-cli that records its arguments.
    let root = tmp.join("greengrass");
    let cli_log = tmp.join("cli-args");
    write_executable(
        &root.join("bin/greengrass-cli"),
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"{}\"\n",
            cli_log.display()
        ),
    );
    let update = tmp.join("update.json");
    std::fs::write(
        &update,
        format!(r#"{{"{COMPONENT}": {{"MERGE": {{"batch": {{"maxDelayMs": 200}}}}}}}}"#),
    )
    .unwrap();
    let envs = [
        ("GREENGRASS_ROOT", root.as_os_str()),
        ("ARTIFACTS_DIR", artifacts.as_os_str()),
        ("SUDO", "".as_ref()),
    ];
    let (ok, _, stderr) = script(
        "scripts/deploy-local.sh",
        &["--update-config".as_ref(), update.as_os_str()],
        &envs,
        tmp,
    )
    .await;
    assert!(ok, "deploy-local.sh: {stderr}");
    let args: Vec<String> = std::fs::read_to_string(&cli_log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let recipes = std::fs::canonicalize(repo().join("recipes")).unwrap();
    let artifacts = std::fs::canonicalize(&artifacts).unwrap();
    let update = std::fs::canonicalize(&update).unwrap();
    let expected: Vec<String> = [
        "deployment",
        "create",
        "--recipeDir",
        recipes.to_str().unwrap(),
        "--artifactDir",
        artifacts.to_str().unwrap(),
        "--merge",
        &format!("{COMPONENT}={VERSION}"),
        "--update-config",
        update.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(args, expected);

    // Without greengrass-cli: a clear error saying where it comes from.
    let empty = tmp.join("no-greengrass");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, stderr) = script(
        "scripts/deploy-local.sh",
        &[],
        &[
            ("GREENGRASS_ROOT", empty.as_os_str()),
            ("SUDO", "".as_ref()),
        ],
        tmp,
    )
    .await;
    assert!(!ok, "deploy-local.sh succeeded without greengrass-cli");
    assert!(
        stderr.contains("no greengrass-cli at") && stderr.contains("aws.greengrass.Cli"),
        "{stderr}"
    );
}

#[test]
fn the_gdk_project_builds_this_component_with_the_build_script() {
    let gdk: Value = serde_json::from_str(GDK_CONFIG).expect("gdk-config.json is JSON");
    assert!(gdk["gdk_version"].is_string(), "gdk_version is required");
    let components = gdk["component"].as_object().expect("component");
    assert_eq!(components.len(), 1, "GDK takes one component per project");
    let component = &components[COMPONENT];
    assert_eq!(
        component["version"], VERSION,
        "gdk-config.json's version is Cargo.toml's"
    );
    assert!(component["author"].is_string());
    assert_eq!(component["build"]["build_system"], "custom");
    let command = component["build"]["custom_build_command"].to_string();
    assert!(
        command.contains("scripts/build-artifact.sh") && command.contains("--gdk"),
        "{command}"
    );
    assert!(
        component["publish"]["bucket"].is_string() && component["publish"]["region"].is_string()
    );

    let lines: BTreeSet<&str> = ARTIFACTS_GITIGNORE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(lines, BTreeSet::from(["*", "!.gitignore", "!README.md"]));
}

#[test]
fn the_receipts_template_is_plain_yaml_with_the_rule_the_gateway_expects() {
    // Short-form tags are not plain YAML (comments may name them).
    for line in RECEIPTS_TEMPLATE
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        assert!(
            !line.contains(" !"),
            "a short-form tag: use the long form (Fn::Sub, Fn::GetAtt, Ref): {line}"
        );
    }
    let template: Value =
        serde_norway::from_str(RECEIPTS_TEMPLATE).expect("cloud/receipts.yaml is YAML");
    assert!(
        template["Description"]
            .as_str()
            .is_some_and(|d| d.contains("after IoT Core accepted the publish")),
        "{}",
        template["Description"]
    );
    assert!(template["Parameters"]["RuleName"].is_object());
    assert_eq!(
        template["Parameters"]["TopicPrefix"]["Default"],
        "gatehouse"
    );

    let resources = template["Resources"].as_object().expect("Resources");
    let rules: Vec<&Value> = resources
        .values()
        .filter(|r| r["Type"] == "AWS::IoT::TopicRule")
        .collect();
    assert_eq!(rules.len(), 1, "one topic rule");
    let payload = &rules[0]["Properties"]["TopicRulePayload"];
    let sql = payload["Sql"]["Fn::Sub"]
        .as_str()
        .expect("Sql is an Fn::Sub string");
    for part in [
        "topic(4)",
        "AS batchSeq",
        "timestamp() AS receivedAt",
        "FROM '${TopicPrefix}/+/batches/+'",
    ] {
        assert!(sql.contains(part), "{part} not in {sql}");
    }
    let action = &payload["Actions"][0]["Republish"];
    let topic = action["Topic"]["Fn::Sub"]
        .as_str()
        .expect("republish topic");
    // With the default prefix, the republish topic is the gateway's default receipt topic.
    let config = default_configuration();
    assert_eq!(
        topic
            .replace("${TopicPrefix}", "gatehouse")
            .replace("${!topic(2)}", "{thingName}"),
        config["upstream"]["receiptTopic"].as_str().unwrap()
    );
    // ... and the rule listens where the gateway publishes with confirm "cloud".
    assert_eq!(
        format!("{}/+", config["upstream"]["topic"].as_str().unwrap()),
        "gatehouse/{thingName}/batches/+"
    );
    let role = action["RoleArn"]["Fn::GetAtt"][0]
        .as_str()
        .expect("RoleArn: Fn::GetAtt");
    assert_eq!(
        resources[role]["Type"], "AWS::IAM::Role",
        "the republish role is in the template"
    );
}
