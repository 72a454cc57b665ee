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
    assert_eq!(mqtt.client_id_for(&config.thing_name), "gw-1");
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
