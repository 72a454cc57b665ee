//! Black-box integration tests for the `gatehouse` binary: real MQTT agents (rumqttc v4/v5,
//! mosquitto_pub, hand-built packets) against a spawned gateway, checked through the
//! directory outbox decoded by `gatehouse decode`.

mod bad_input;
mod cli;
mod config_errors;
mod crash;
mod dedup;
mod dev_certs;
mod e2e;
mod fake_nucleus;
mod greengrass;
mod interop;
mod no_loss;
mod poison;
mod recipe;
mod security;
mod session;
mod support;
mod upstream;
mod upstream_faults;
mod upstream_scripted;
mod upstream_support;
