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
    match config.upstream {
        UpstreamConfig::Directory { path, .. } => {
            assert_eq!(path, PathBuf::from("./gatehouse-data/outbox"))
        }
    }
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
