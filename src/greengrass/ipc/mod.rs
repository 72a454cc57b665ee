//! Greengrass IPC: the event-stream RPC protocol between a component and the nucleus.
//!
//! Written here rather than taken from the `greengrass-ipc` crate (0.2.0), which lacks what the
//! gateway needs: SubscribeToValidateConfigurationUpdates and SendConfigurationValidityReport,
//! a way to know a request's exact frame size before sending it (nucleus lite closes the
//! connection on a frame over 10,000 bytes), and bounded event queues. The frame codec itself is
//! `aws-smithy-eventstream`'s; `frame` adds the RPC headers, `client` the connection.

pub mod client;
pub mod frame;

pub use client::{IpcClient, IpcError, Subscription};
