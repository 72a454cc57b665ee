//! Config loading: defaults, and errors that name the key path.

use super::*;

fn error_of(json: &str) -> String {
    Config::from_json(json).unwrap_err().to_string()
}

#[test]
fn embedded_defaults_match_the_documented_contract() {
    let config = Config::embedded();
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.listeners[0].bind.0.to_string(), "127.0.0.1:1883");
    assert_eq!(
        config.journal.path,
        PathBuf::from("./gatehouse-data/journal.db")
    );
    assert_eq!(config.journal.synchronous, Synchronous::Full);
    assert_eq!(config.batch.max_bytes.get(), 131_072);
    assert_eq!(config.batch.max_delay_ms.get(), 1000);
    assert_eq!(config.batch.compression, Compression::Zstd);
    assert_eq!(config.listeners[0].max_packet_size.get(), 256 * 1024);
    let UpstreamConfig::Directory { path, .. } = config.upstream else {
        panic!("default upstream is the directory sink");
    };
    assert_eq!(path, PathBuf::from("./gatehouse-data/outbox"));
    assert_eq!(config.journal.max_bytes.get(), 1 << 30);
}

#[test]
fn bad_integer_names_key_and_range() {
    assert_eq!(
        error_of(r#"{"batch": {"maxBytes": "lots"}}"#),
        r#"batch.maxBytes: expected an integer between 1024 and 131072, got "lots""#
    );
    assert_eq!(
        error_of(r#"{"batch": {"maxBytes": 200000}}"#),
        "batch.maxBytes: expected an integer between 1024 and 131072, got 200000"
    );
}

#[test]
fn unknown_key_is_an_error_naming_its_parent() {
    let message = error_of(r#"{"journal": {"pth": "x.db"}}"#);
    assert!(message.starts_with("journal"), "{message}");
    assert!(message.contains("unknown field `pth`"), "{message}");
}

#[test]
fn bad_bind_names_listener_index() {
    let message = error_of(r#"{"listeners": [{"bind": "nowhere"}]}"#);
    assert!(message.starts_with("listeners[0].bind: "), "{message}");
    assert!(message.contains("\"nowhere\""), "{message}");
}

#[test]
fn bad_enum_value_names_key_and_choices() {
    let message = error_of(r#"{"batch": {"compression": "lz4"}}"#);
    assert!(message.starts_with("batch.compression: "), "{message}");
    assert!(message.contains("zstd"), "{message}");
}

#[test]
fn empty_listener_list_is_rejected() {
    assert_eq!(
        error_of(r#"{"listeners": []}"#),
        "listeners: at least one listener is required"
    );
}

#[test]
fn unknown_upstream_kind_is_rejected() {
    let message = error_of(r#"{"upstream": {"kind": "carrier-pigeon"}}"#);
    assert!(message.starts_with("upstream"), "{message}");
    assert!(message.contains("carrier-pigeon"), "{message}");
}

fn mqtt_config(extra: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::write(dir.path().join(name), "x").unwrap();
    }
    let d = dir.path().display();
    let json = format!(
        r#"{{"thingName": "gw-1", "upstream": {{"kind": "mqtt", "host": "example-ats.iot.eu-west-1.amazonaws.com",
            "caFile": "{d}/ca.pem", "certFile": "{d}/cert.pem", "keyFile": "{d}/key.pem"{extra}}}}}"#
    );
    (dir, json)
}

#[test]
fn mqtt_upstream_defaults_follow_iot_core() {
    let (_dir, json) = mqtt_config("");
    let config = Config::from_json(&json).unwrap();
    let UpstreamConfig::Mqtt(mqtt) = &config.upstream else {
        panic!("mqtt upstream expected");
    };
    assert_eq!(mqtt.port.get(), 8883);
    assert_eq!(mqtt.topic_for(&config.thing_name), "gatehouse/gw-1/batches");
    assert_eq!(mqtt.client_id_for(&config.thing_name), "gw-1-gatehouse");
    assert_eq!(mqtt.max_inflight.get(), 100);
    assert_eq!(mqtt.max_publishes_per_sec.get(), 100);
    assert_eq!(mqtt.max_bytes_per_sec.get(), 524_288);
    assert!(!mqtt.use_alpn());
    let (_dir, json) = mqtt_config(r#", "port": 443"#);
    let UpstreamConfig::Mqtt(mqtt) = Config::from_json(&json).unwrap().upstream else {
        panic!("mqtt upstream expected");
    };
    assert!(mqtt.use_alpn(), "port 443 needs ALPN x-amzn-mqtt-ca");
}

#[test]
fn upstream_topic_is_checked_against_iot_core_rules() {
    let cases = [
        (r#", "topic": "a/+/b""#, "wildcard"),
        (r#", "topic": "a/b/c/d/e/f/g/h/i""#, "8 slashes"),
        (r#", "topic": "{thing}/x""#, "placeholder"),
    ];
    for (extra, why) in cases {
        let (_dir, json) = mqtt_config(extra);
        let message = error_of(&json);
        assert!(message.starts_with("upstream.topic: "), "{why}: {message}");
    }
    let long = format!(r#", "topic": "t/{}""#, "x".repeat(300));
    let (_dir, json) = mqtt_config(&long);
    assert!(error_of(&json).contains("at most 256"));
    // Basic Ingest: the $aws/rules/<rule>/ prefix is not counted.
    let (_dir, json) = mqtt_config(r#", "topic": "$aws/rules/ingest/a/b/c/d/e/f/g/{thingName}""#);
    Config::from_json(&json).unwrap();
}

#[test]
fn missing_certificate_files_name_their_key() {
    let (dir, json) = mqtt_config("");
    std::fs::remove_file(dir.path().join("key.pem")).unwrap();
    let message = error_of(&json);
    assert!(
        message.starts_with("upstream.keyFile: cannot read "),
        "{message}"
    );
}

#[test]
fn reconnect_bounds_must_be_ordered() {
    let (_dir, json) = mqtt_config(r#", "reconnectMinMs": 5000, "reconnectMaxMs": 1000"#);
    assert!(error_of(&json).starts_with("upstream.reconnectMaxMs: "));
}

/// The keys serde says are valid, from an unknown-key error message.
fn listed_keys(message: &str) -> Vec<String> {
    // serde says "expected `a`", "expected `a` or `b`", or "expected one of `a`, `b`, ...".
    let list = message
        .split("expected ")
        .nth(1)
        .unwrap_or_else(|| panic!("no key list in {message:?}"));
    let list = list.strip_prefix("one of ").unwrap_or(list);
    let mut keys: Vec<String> = list
        .split(", ")
        .flat_map(|k| k.split(" or "))
        .map(|k| k.trim().trim_matches('`').to_string())
        .collect();
    keys.sort();
    keys
}

fn sorted(keys: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    keys.sort();
    keys
}

#[test]
fn every_unknown_key_message_lists_exactly_the_valid_keys() {
    let (_dir, mqtt) = mqtt_config(r#", "hots": "x""#);
    let cases = [
        (
            r#"{"thingNmae": "x"}"#.to_string(),
            "",
            sorted(&[
                "thingName",
                "listeners",
                "journal",
                "batch",
                "upstream",
                "logLevel",
                "metrics",
                "sessions",
                "acl",
            ]),
        ),
        (
            r#"{"listeners": [{"bind": "127.0.0.1:1", "x": 1}]}"#.into(),
            "listeners[0]",
            sorted(&[
                "bind",
                "maxPacketSize",
                "maxInflight",
                "connectTimeoutMs",
                "writeTimeoutMs",
                "tls",
                "allowPlaintext",
                "auth",
                "clientIdBinding",
                "maxConnections",
                "connectionsPerSec",
                "connectionBurst",
                "publishesPerSec",
                "publishBurst",
                "maxTopicLength",
                "maxTopicLevels",
                "onDenied311",
            ]),
        ),
        (
            r#"{"journal": {"x": 1}}"#.into(),
            "journal",
            sorted(&[
                "path",
                "synchronous",
                "dedup",
                "dedupWindowSecs",
                "dedupMaxKeys",
                "maxBytes",
                "commitMaxMessages",
                "commitMaxDelayMs",
            ]),
        ),
        (
            r#"{"batch": {"x": 1}}"#.into(),
            "batch",
            sorted(&["maxBytes", "maxMessages", "maxDelayMs", "compression"]),
        ),
        (
            r#"{"sessions": {"x": 1}}"#.into(),
            "sessions",
            sorted(&["maxStored", "expirySecs"]),
        ),
        (
            r#"{"metrics": {"bind": "127.0.0.1:1", "x": 1}}"#.into(),
            "metrics",
            sorted(&["bind"]),
        ),
        (
            r#"{"upstream": {"kind": "directory", "x": 1}}"#.into(),
            "upstream",
            sorted(&["kind", "path", "maxInflight"]),
        ),
        (
            mqtt,
            "upstream",
            sorted(&[
                "kind",
                "host",
                "port",
                "caFile",
                "certFile",
                "keyFile",
                "clientId",
                "topic",
                "protocol",
                "alpn",
                "proxy",
                "keepAliveSecs",
                "maxInflight",
                "maxPublishesPerSec",
                "maxBytesPerSec",
                "reconnectMinMs",
                "reconnectMaxMs",
                "ackTimeoutMs",
                "maxBatchAttempts",
            ]),
        ),
    ];
    for (json, key, expected) in cases {
        let message = error_of(&json);
        assert!(message.starts_with(key), "{message}");
        assert_eq!(listed_keys(&message), expected, "{json}: {message}");
    }
}

#[test]
fn the_default_upstream_client_id_is_not_the_thing_name() {
    let (_dir, json) = mqtt_config("");
    let config = Config::from_json(&json).unwrap();
    let UpstreamConfig::Mqtt(mqtt) = &config.upstream else {
        panic!("mqtt upstream");
    };
    let client_id = mqtt.client_id_for(&config.thing_name);
    assert_ne!(
        client_id, config.thing_name,
        "the Greengrass nucleus connects as the thing name"
    );
    assert_eq!(client_id, format!("{}-gatehouse", config.thing_name));
}

#[test]
fn the_thing_name_source_is_known() {
    let named = Config::from_json(r#"{"thingName": "gw-7"}"#).unwrap();
    assert_eq!(named.thing_name_source, ThingNameSource::Config);
    if std::env::var_os("AWS_IOT_THING_NAME").is_none() {
        let unnamed = Config::embedded();
        assert_eq!(unnamed.thing_name_source, ThingNameSource::HostName);
    }
}

#[test]
fn agent_security_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("server.pem");
    std::fs::write(&pem, "not checked here").unwrap();
    let pem = pem.display();
    let cases = [
        (
            r#"{"listeners": [{"bind": "0.0.0.0:1883"}]}"#.to_string(),
            "listeners[0].allowPlaintext",
            "plain TCP on a non-loopback address",
        ),
        (
            r#"{"listeners": [{"bind": "127.0.0.1:1", "auth": {"kind": "certificate"}}]}"#.into(),
            "listeners[0].auth.kind",
            "needs a TLS listener",
        ),
        (
            format!(
                r#"{{"listeners": [{{"bind": "0.0.0.0:8883", "tls": {{"certFile": "{pem}", "keyFile": "{pem}"}}, "auth": {{"kind": "certificate"}}}}]}}"#
            ),
            "listeners[0].tls.clientCaFile",
            "is required for certificate authentication",
        ),
        (
            r#"{"listeners": [{"bind": "0.0.0.0:8883", "tls": {"certFile": "/nope/s.pem", "keyFile": "/nope/s.key"}, "allowPlaintext": true}]}"#.into(),
            "listeners[0].tls.certFile",
            "/nope/s.pem",
        ),
        (
            r#"{"listeners": [{"bind": "127.0.0.1:1", "auth": {"kind": "password"}}]}"#.into(),
            "listeners[0].auth.passwordFile",
            "is required for password authentication",
        ),
        (
            format!(
                r#"{{"listeners": [{{"bind": "0.0.0.0:8883", "tls": {{"certFile": "{pem}"}}, "auth": {{"kind": "greengrass"}}}}]}}"#
            ),
            "listeners[0].tls.certFile",
            "must not be set with auth.kind greengrass",
        ),
        (
            r#"{"acl": [{"allow": "publish", "topic": "agents/${nobody}/#"}]}"#.into(),
            "acl[0].topic",
            "unknown variable",
        ),
        (
            r#"{"acl": [{"allow": "publish", "deny": "all", "topic": "a"}]}"#.into(),
            "acl[0]",
            "has both",
        ),
    ];
    for (json, key, reason) in cases {
        let message = error_of(&json);
        assert!(
            message.contains(key) && message.contains(reason),
            "{json}: expected {key:?} and {reason:?} in {message:?}"
        );
    }
    // Explicitly allowed, plain TCP on the network is accepted; loopback needs nothing.
    Config::from_json(r#"{"listeners": [{"bind": "0.0.0.0:1883", "allowPlaintext": "true"}]}"#)
        .unwrap();
    let config = Config::from_json(r#"{"listeners": [{"bind": "127.0.0.1:1883"}]}"#).unwrap();
    assert!(config.listeners[0].client_id_binding);
    assert_eq!(config.listeners[0].auth_kind(), AuthKind::None);
}
