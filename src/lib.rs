//! Gatehouse: an edge aggregation gateway between security agents and AWS IoT Core.
//!
//! # Layout
//!
//! Data flows source -> journal -> transform -> sink, and acknowledgements flow back:
//!
//! - `listener`: accepts agents' MQTT 3.1.1/5.0 connections; the only module that knows MQTT
//!   packets. Turns PUBLISHes into `Record`s and PUBACKs them once the journal committed them.
//! - `journal`: the SQLite journal, the source of truth. One writer thread does group commit;
//!   `dead_letter` keeps what the upstream would not take, for an operator.
//! - `batcher`: reads committed records in sequence order and packs them into `envelope` batches.
//! - `sink`: where batches go: `directory` (the embedded default) or `mqtt` (one MQTT/TLS link
//!   to AWS IoT Core). A sink settles batches asynchronously (delivered, or dead-lettered); only
//!   then does the journal release their rows. There is no Greengrass IPC sink yet.
//! - `config`: the one configuration model. `telemetry`: metrics names and the admin listener.
//! - `gateway`: wires the pieces together, supervises them and runs them until shutdown.

#![forbid(unsafe_code)]

pub mod batcher;
pub mod config;
pub mod envelope;
pub mod gateway;
pub mod greengrass;
pub mod journal;
pub mod listener;
pub mod record;
pub mod shutdown;
pub mod sink;
pub mod telemetry;
pub mod tls;

#[cfg(test)]
mod tidy;
