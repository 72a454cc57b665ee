//! The Greengrass IPC client: one authenticated event-stream RPC connection to the nucleus over
//! its Unix domain socket, carrying request/response operations and subscriptions.
//!
//! Guarantees:
//! - One writer task owns the socket: frames are queued to it in stream-id order (ids are
//!   allocated 1, 2, 3, ... together with the queue slot), so they reach the socket in order
//!   (the nucleus rejects gaps and reordering), and a caller cancelled mid-request cannot tear
//!   a frame. A write that makes no progress for `WRITE_TIMEOUT` closes the connection.
//! - No frame larger than `max_frame` is ever written: such a request fails with
//!   `IpcError::FrameTooLarge` before anything is sent (nucleus lite would close the connection).
//! - The first message on a stream answers its request whether or not it ends the stream (the
//!   Java nucleus terminates unary streams, nucleus lite does not); later ones are events.
//! - A lost connection (EOF, socket error, a connection-level error from the nucleus) fails every
//!   pending request, ends every subscription, and resolves `closed()`. The client never
//!   reconnects: its token is only good for this process's first connection.
//! - Every wait is bounded: requests by `timeout`, writes by `WRITE_TIMEOUT`; a subscriber that
//!   does not keep up with its events loses the subscription (it ends), never the connection.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, watch};

use super::frame::{
    CONNECTION_ACCEPTED, Decoder, Frame, MessageType, TERMINATE_STREAM, encoded_len,
};

/// How long the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a frame's write may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames queued for the writer at most.
const WRITE_QUEUE: usize = 256;
/// Events queued per subscription before the reader waits for the subscriber.
const EVENT_QUEUE: usize = 256;
/// The largest frame accepted from the nucleus (its own cap is 16 to 24 MiB).
const MAX_INCOMING_FRAME: usize = 24 * 1024 * 1024;

/// Why an IPC operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IpcError {
    /// The socket could not be reached.
    #[error("cannot connect to the Greengrass nucleus at {path}: {reason}")]
    Unreachable { path: String, reason: String },
    /// The nucleus refused the token (or closed the socket before acknowledging it).
    #[error("the Greengrass nucleus refused this component's IPC token (SVCUID): {0}")]
    AccessDenied(String),
    /// The connection is gone; nothing more can be sent on it.
    #[error("the Greengrass IPC connection is closed: {0}")]
    Closed(String),
    /// No answer within the request timeout.
    #[error("no answer from the Greengrass nucleus to {operation} within {timeout_ms} ms")]
    Timeout { operation: String, timeout_ms: u64 },
    /// The request's frame would exceed the nucleus's frame cap; nothing was sent.
    #[error("{operation} frame of {len} bytes is over the nucleus's {cap} byte limit")]
    FrameTooLarge {
        operation: String,
        len: usize,
        cap: usize,
    },
    /// The nucleus answered with a modelled error (`UnauthorizedError`, `ServiceError`, ...).
    #[error("{code}: {message}")]
    Service { code: String, message: String },
    /// The nucleus broke the protocol, or sent something unreadable.
    #[error("Greengrass IPC protocol error: {0}")]
    Protocol(String),
}

impl IpcError {
    /// The modelled error's short name (`UnauthorizedError`, ...), if it is one.
    pub fn service_code(&self) -> Option<&str> {
        match self {
            IpcError::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// What the reader delivers to a stream's owner.
enum Slot {
    /// A request: its first message answers it.
    Request(oneshot::Sender<Result<Frame, IpcError>>),
    /// A subscription: the first message answers it, later ones are events.
    Subscription {
        response: Option<oneshot::Sender<Result<Frame, IpcError>>>,
        events: mpsc::Sender<Result<Value, IpcError>>,
    },
}

struct Inner {
    /// Frames for the writer task. Queue slots are taken under `last_stream`, so frames are
    /// queued in stream-id order.
    outgoing: mpsc::Sender<Vec<u8>>,
    /// The last stream id used.
    last_stream: tokio::sync::Mutex<i32>,
    /// Open streams by id. The `std::sync::Mutex` is held only for map updates, never across
    /// an `.await`.
    streams: Mutex<HashMap<i32, Slot>>,
    /// `Some(reason)` once the connection is gone.
    closed: watch::Sender<Option<String>>,
    max_frame: std::sync::atomic::AtomicUsize,
    timeout: Duration,
}

/// A cheap, clonable handle to the IPC connection.
#[derive(Clone)]
pub struct IpcClient {
    inner: Arc<Inner>,
}

/// An open subscription's events; dropping it closes the stream on the nucleus.
pub struct Subscription {
    stream_id: i32,
    events: mpsc::Receiver<Result<Value, IpcError>>,
    client: IpcClient,
}

impl Subscription {
    /// The next event's JSON; `None` once the stream or the connection ended.
    pub async fn next(&mut self) -> Option<Result<Value, IpcError>> {
        self.events.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.client.inner.streams_lock().remove(&self.stream_id);
        // Best effort: a full queue means the connection is in trouble anyway.
        let close = Frame::application(self.stream_id, TERMINATE_STREAM, Bytes::new());
        if let Ok(bytes) = close.encode() {
            let _ = self.client.inner.outgoing.try_send(bytes);
        }
    }
}

impl Inner {
    fn streams_lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Slot>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection closed and fails everything waiting on it.
    fn close(&self, reason: String) {
        if self.closed.borrow().is_some() {
            return;
        }
        self.closed.send_replace(Some(reason.clone()));
        let streams = std::mem::take(&mut *self.streams_lock());
        for (_, slot) in streams {
            let error = IpcError::Closed(reason.clone());
            match slot {
                Slot::Request(tx) => {
                    let _ = tx.send(Err(error));
                }
                Slot::Subscription { response, events } => {
                    if let Some(tx) = response {
                        let _ = tx.send(Err(error.clone()));
                    }
                    let _ = events.try_send(Err(error));
                }
            }
        }
    }
}

impl IpcClient {
    /// Connects to the nucleus's socket and authenticates with `token` (the component's
    /// `SVCUID`). `max_frame` caps every frame sent; `timeout` bounds every request.
    pub async fn connect(
        socket: &Path,
        token: &str,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<IpcClient, IpcError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| IpcError::Unreachable {
                path: socket.display().to_string(),
                reason: e.to_string(),
            })?;
        let (mut reader, mut writer) = stream.into_split();
        let connect = Frame {
            message_type: MessageType::Connect,
            flags: 0,
            stream_id: 0,
            operation: None,
            model_type: None,
            content_type: None,
            version: Some("0.1.0".into()),
            payload: serde_json::to_vec(&serde_json::json!({ "authToken": token }))
                .expect("json")
                .into(),
        };
        let bytes = connect.encode().map_err(IpcError::Protocol)?;
        writer
            .write_all(&bytes)
            .await
            .map_err(|e| IpcError::Closed(e.to_string()))?;
        let mut decoder = Decoder::new(MAX_INCOMING_FRAME);
        let ack = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                if let Some(frame) = decoder.next_frame().map_err(IpcError::Protocol)? {
                    return Ok(frame);
                }
                match reader.read_buf(decoder.buffer()).await {
                    Ok(0) => {
                        return Err(IpcError::AccessDenied(
                            "the nucleus closed the connection without acknowledging it".into(),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(IpcError::Closed(e.to_string())),
                }
            }
        })
        .await
        .map_err(|_| IpcError::Timeout {
            operation: "Connect".into(),
            timeout_ms: CONNECT_TIMEOUT.as_millis() as u64,
        })??;
        if ack.message_type != MessageType::ConnectAck {
            return Err(IpcError::Protocol(format!(
                "expected ConnectAck, got {:?}",
                ack.message_type
            )));
        }
        if ack.flags & CONNECTION_ACCEPTED == 0 {
            return Err(IpcError::AccessDenied(
                "ConnectAck without acceptance".into(),
            ));
        }
        let (closed, _) = watch::channel(None);
        let (outgoing, queue) = mpsc::channel(WRITE_QUEUE);
        let inner = Arc::new(Inner {
            outgoing,
            last_stream: tokio::sync::Mutex::new(0),
            streams: Mutex::new(HashMap::new()),
            closed,
            max_frame: std::sync::atomic::AtomicUsize::new(max_frame),
            timeout,
        });
        tokio::spawn(read_loop(reader, decoder, inner.clone()));
        tokio::spawn(write_loop(writer, queue, inner.clone()));
        Ok(IpcClient { inner })
    }

    /// Resolves once the connection is gone, with the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.inner.closed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the client was dropped".into(),
        }
    }

    /// The largest frame this client sends.
    pub fn max_frame(&self) -> usize {
        self.inner
            .max_frame
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the largest frame this client sends (once the nucleus is known).
    pub fn set_max_frame(&self, max_frame: usize) {
        self.inner
            .max_frame
            .store(max_frame, std::sync::atomic::Ordering::Relaxed);
    }

    /// The request frame of `operation` with `payload`, as it would be sent on some stream (its
    /// length does not depend on the stream id).
    pub fn request_frame(operation: &str, payload: Bytes) -> Frame {
        let mut frame = Frame::application(i32::MAX, 0, payload);
        frame.operation = Some(format!("aws.greengrass#{operation}"));
        frame.model_type = Some(format!("aws.greengrass#{operation}Request"));
        frame.content_type = Some("application/json".into());
        frame
    }

    /// Runs a request/response `operation` (e.g. `PublishToIoTCore`) and returns the response's
    /// JSON.
    pub async fn request(&self, operation: &str, request: &Value) -> Result<Value, IpcError> {
        let (tx, rx) = oneshot::channel();
        let stream_id = self
            .send_request(operation, request, Slot::Request(tx))
            .await?;
        self.answer(operation, stream_id, rx).await
    }

    /// Opens a streaming `operation` (e.g. `SubscribeToIoTCore`): its response's JSON, and the
    /// events that follow.
    pub async fn subscribe(
        &self,
        operation: &str,
        request: &Value,
    ) -> Result<(Value, Subscription), IpcError> {
        let (tx, rx) = oneshot::channel();
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let slot = Slot::Subscription {
            response: Some(tx),
            events: events_tx,
        };
        let stream_id = self.send_request(operation, request, slot).await?;
        let subscription = Subscription {
            stream_id,
            events,
            client: self.clone(),
        };
        let response = self.answer(operation, stream_id, rx).await?;
        Ok((response, subscription))
    }

    async fn send_request(
        &self,
        operation: &str,
        request: &Value,
        slot: Slot,
    ) -> Result<i32, IpcError> {
        let payload: Bytes = serde_json::to_vec(request).expect("json").into();
        let mut frame = Self::request_frame(operation, payload);
        let len = encoded_len(&frame);
        let cap = self.max_frame();
        if len > cap {
            return Err(IpcError::FrameTooLarge {
                operation: operation.to_string(),
                len,
                cap,
            });
        }
        // Cancel-safe: until the queue slot is ours nothing is allocated; after it, nothing awaits.
        let mut last = self.inner.last_stream.lock().await;
        let permit = self
            .inner
            .outgoing
            .reserve()
            .await
            .map_err(|_| IpcError::Closed("the writer stopped".into()))?;
        if let Some(reason) = self.inner.closed.borrow().clone() {
            return Err(IpcError::Closed(reason));
        }
        let Some(stream_id) = last.checked_add(1) else {
            let reason = "stream ids exhausted (2^31 operations on one connection)".to_string();
            self.inner.close(reason.clone());
            return Err(IpcError::Closed(reason));
        };
        frame.stream_id = stream_id;
        let bytes = frame.encode().map_err(IpcError::Protocol)?;
        *last = stream_id;
        self.inner.streams_lock().insert(stream_id, slot);
        permit.send(bytes);
        Ok(stream_id)
    }

    /// Waits (bounded) for a stream's first message and reads it as a response.
    async fn answer(
        &self,
        operation: &str,
        stream_id: i32,
        rx: oneshot::Receiver<Result<Frame, IpcError>>,
    ) -> Result<Value, IpcError> {
        let frame = match tokio::time::timeout(self.inner.timeout, rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(IpcError::Closed("the reader stopped".into())),
            Err(_) => {
                self.inner.streams_lock().remove(&stream_id);
                return Err(IpcError::Timeout {
                    operation: operation.to_string(),
                    timeout_ms: self.inner.timeout.as_millis() as u64,
                });
            }
        };
        match frame.message_type {
            MessageType::ApplicationMessage => json_of(&frame),
            MessageType::ApplicationError => Err(service_error(&frame)),
            other => Err(IpcError::Protocol(format!(
                "unexpected {other:?} answering {operation}"
            ))),
        }
    }
}

/// A payload's JSON (an empty payload is `{}`).
fn json_of(frame: &Frame) -> Result<Value, IpcError> {
    if frame.payload.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(&frame.payload).map_err(|e| {
        IpcError::Protocol(format!(
            "{} payload is not JSON: {e}",
            frame.model_type.as_deref().unwrap_or("a")
        ))
    })
}

/// A modelled error: the Java nucleus sends `_errorCode`, `_message` and `message`; nucleus lite
/// only the first two.
fn service_error(frame: &Frame) -> IpcError {
    let body = json_of(frame).unwrap_or(Value::Null);
    let code = body["_errorCode"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            frame
                .model_type
                .as_deref()
                .map(|m| m.trim_start_matches("aws.greengrass#").to_string())
        })
        .unwrap_or_else(|| "UnknownError".into());
    let message = body["_message"]
        .as_str()
        .or_else(|| body["message"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&frame.payload).into_owned());
    IpcError::Service { code, message }
}

/// Writes queued frames to the socket, each within `WRITE_TIMEOUT`, until the connection ends.
async fn write_loop(
    mut socket: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    inner: Arc<Inner>,
) {
    let mut closed = inner.closed.subscribe();
    loop {
        let bytes = tokio::select! {
            bytes = queue.recv() => match bytes {
                Some(bytes) => bytes,
                None => return,
            },
            _ = closed.wait_for(Option::is_some) => return,
        };
        match tokio::time::timeout(WRITE_TIMEOUT, socket.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                inner.close(format!("write failed: {e}"));
                return;
            }
            Err(_) => {
                inner.close(format!(
                    "the nucleus read nothing for {} s",
                    WRITE_TIMEOUT.as_secs()
                ));
                return;
            }
        }
    }
}

/// Dispatches the nucleus's frames to the streams waiting for them, until the connection ends.
async fn read_loop(
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut decoder: Decoder,
    inner: Arc<Inner>,
) {
    let reason = loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => match reader.read_buf(decoder.buffer()).await {
                Ok(0) => break "the nucleus closed the connection".to_string(),
                Ok(_) => continue,
                Err(e) => break format!("read failed: {e}"),
            },
            Err(e) => break e,
        };
        match frame.message_type {
            MessageType::ApplicationMessage | MessageType::ApplicationError => {
                dispatch(&inner, frame).await;
            }
            MessageType::Ping => {
                let mut pong = frame.clone();
                pong.message_type = MessageType::PingResponse;
                match pong.encode() {
                    // Best effort: never wait for room here, the reader must keep reading.
                    Ok(bytes) => {
                        let _ = inner.outgoing.try_send(bytes);
                    }
                    Err(e) => break e,
                }
            }
            MessageType::ProtocolError | MessageType::InternalError => {
                break format!(
                    "the nucleus reported a {:?}: {}",
                    frame.message_type,
                    String::from_utf8_lossy(&frame.payload)
                );
            }
            _ => {}
        }
    };
    tracing::debug!(reason, "Greengrass IPC connection ended.");
    inner.close(reason);
}

async fn dispatch(inner: &Inner, frame: Frame) {
    enum Action {
        Answer(oneshot::Sender<Result<Frame, IpcError>>),
        Event(mpsc::Sender<Result<Value, IpcError>>),
        Ignore,
    }
    let stream_id = frame.stream_id;
    let ends = frame.flags & TERMINATE_STREAM != 0;
    let failed = frame.message_type == MessageType::ApplicationError;
    // Decide under the lock, deliver after it (an event may wait for room).
    let action = {
        let mut streams = inner.streams_lock();
        let action = match streams.get_mut(&stream_id) {
            // A stream we gave up on (timed out, dropped).
            None => Action::Ignore,
            Some(Slot::Request(_)) => match streams.remove(&stream_id) {
                Some(Slot::Request(tx)) => Action::Answer(tx),
                _ => Action::Ignore,
            },
            Some(Slot::Subscription { response, events }) => match response.take() {
                Some(tx) => Action::Answer(tx),
                None => Action::Event(events.clone()),
            },
        };
        let first_was_error = matches!(action, Action::Answer(_)) && failed;
        if ends || first_was_error {
            streams.remove(&stream_id);
        }
        action
    };
    match action {
        Action::Answer(tx) => {
            let _ = tx.send(Ok(frame));
        }
        // A bare stream close carries no event.
        Action::Event(_) if frame.payload.is_empty() && !failed => {}
        Action::Event(events) => {
            let event = if failed {
                Err(service_error(&frame))
            } else {
                json_of(&frame)
            };
            // Never wait here: one slow subscriber would stall every response.
            if let Err(mpsc::error::TrySendError::Full(_)) = events.try_send(event) {
                tracing::warn!(
                    stream_id,
                    "A subscriber fell {EVENT_QUEUE} events behind; ending its subscription."
                );
                inner.streams_lock().remove(&stream_id);
            }
        }
        Action::Ignore => {}
    }
}
