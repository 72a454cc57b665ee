//! The registry of agent sessions: who is connected, session take-over, persistent session
//! state, and delivery to a connected agent.
//!
//! Guarantees: at most one live connection per client id; when a second one connects, the first
//! is told to close and hands its session state over before the second is acknowledged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Deliveries queued to one connection at most; `deliver` refuses beyond it.
pub const DELIVERY_QUEUE: usize = 1024;
/// How long a new connection waits for the one it takes over to hand its session over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// A message for an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: String,
    pub payload: Bytes,
    /// 0 or 1 (QoS 2 is delivered as 1).
    pub qos: u8,
}

/// What a session keeps between connections when the agent asked for a persistent session.
#[derive(Debug, Default, Clone)]
pub struct SessionState {
    /// Topic filters and their granted QoS.
    pub subscriptions: Vec<(String, u8)>,
    /// QoS 2 packet ids journaled and PUBRECed, awaiting PUBREL: a re-sent PUBLISH with one of
    /// these ids is not journaled again.
    pub awaiting_rel: HashSet<u16>,
    /// Deliveries sent and not acknowledged, or not yet sent, resent on reconnect.
    pub undelivered: VecDeque<Delivery>,
}

/// Why a delivery was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    #[error("agent is not connected")]
    Offline,
    #[error("agent's delivery queue is full")]
    Full,
}

/// A request to hand the session over to a new connection.
pub type Takeover = oneshot::Sender<SessionState>;

struct Live {
    conn_id: u64,
    takeover: Option<oneshot::Sender<Takeover>>,
    deliveries: mpsc::Sender<Delivery>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Live>,
    /// Persistent sessions of agents not connected now.
    stored: HashMap<String, SessionState>,
    next_conn_id: u64,
}

/// Shared by all listeners. The `std::sync::Mutex` is held only for map updates, never across
/// an `.await`.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

/// What a newly registered connection gets.
pub struct Registration {
    pub conn_id: u64,
    pub state: SessionState,
    pub session_present: bool,
    pub takeover: oneshot::Receiver<Takeover>,
    pub deliveries: mpsc::Receiver<Delivery>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection for `client_id`, taking over any live one first.
    pub async fn register(&self, client_id: &str, clean_start: bool) -> Registration {
        let (takeover_tx, takeover_rx) = oneshot::channel();
        let (deliver_tx, deliver_rx) = mpsc::channel(DELIVERY_QUEUE);
        let (conn_id, previous) = {
            let mut inner = self.lock();
            inner.next_conn_id += 1;
            let conn_id = inner.next_conn_id;
            let previous = inner.live.insert(
                client_id.to_string(),
                Live {
                    conn_id,
                    takeover: Some(takeover_tx),
                    deliveries: deliver_tx,
                },
            );
            (conn_id, previous)
        };
        let mut taken: Option<SessionState> = None;
        if let Some(mut old) = previous
            && let Some(tx) = old.takeover.take()
        {
            let (state_tx, state_rx) = oneshot::channel();
            if tx.send(state_tx).is_ok() {
                taken = tokio::time::timeout(TAKEOVER_WAIT, state_rx)
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
        }
        let stored = self.lock().stored.remove(client_id);
        let previous_state = taken.or(stored);
        let session_present = !clean_start && previous_state.is_some();
        let state = if clean_start {
            SessionState::default()
        } else {
            previous_state.unwrap_or_default()
        };
        Registration {
            conn_id,
            state,
            session_present,
            takeover: takeover_rx,
            deliveries: deliver_rx,
        }
    }

    /// Called when a connection ends. Keeps `state` for a persistent session, unless the session
    /// was handed over to a newer connection.
    pub fn unregister(&self, client_id: &str, conn_id: u64, state: Option<SessionState>) {
        let mut inner = self.lock();
        let ours = inner
            .live
            .get(client_id)
            .is_some_and(|live| live.conn_id == conn_id);
        if ours {
            inner.live.remove(client_id);
            if let Some(state) = state {
                inner.stored.insert(client_id.to_string(), state);
            }
        }
    }

    /// Queues a message for a connected agent.
    pub fn deliver(&self, client_id: &str, delivery: Delivery) -> Result<(), DeliverError> {
        let inner = self.lock();
        let live = inner.live.get(client_id).ok_or(DeliverError::Offline)?;
        live.deliveries.try_send(delivery).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DeliverError::Full,
            mpsc::error::TrySendError::Closed(_) => DeliverError::Offline,
        })
    }
}
