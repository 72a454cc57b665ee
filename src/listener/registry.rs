//! The registry of agent sessions: who is connected, session take-over, persistent session
//! state, and delivery to a connected agent.
//!
//! Guarantees:
//! - At most one live connection per client id; when a second one connects, the first is told
//!   to close and hands its session state over before the second is acknowledged.
//! - Stored sessions are bounded: each expires (`sessions.expirySecs` for MQTT 3.1.1, the
//!   agent's Session Expiry Interval capped by it for MQTT 5), and past `sessions.maxStored` the
//!   one closest to expiry is discarded. Both are counted. Sessions live in memory only: a
//!   gateway restart ends them (what agents published is in the journal regardless).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::config::SessionsConfig;
use crate::telemetry;

/// Deliveries queued to one connection at most; `deliver` refuses beyond it...
pub const DELIVERY_QUEUE: usize = 1024;
/// ...and payload bytes queued to one connection at most.
pub const DELIVERY_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// How long a new connection waits for the one it takes over to hand its session over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

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
    deliveries: Arc<DeliveryQueue>,
}

/// One connection's queued deliveries, bounded by `DELIVERY_QUEUE` and
/// `DELIVERY_QUEUE_BYTES`. Allocates nothing while empty: an idle agent costs no queue memory
/// (a channel would allocate a block of slots per connection up front).
#[derive(Default)]
struct DeliveryQueue {
    queue: Mutex<Queue>,
    ready: Notify,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
}

fn queued_bytes(delivery: &Delivery) -> usize {
    (delivery.payload.len() + delivery.topic.len()).max(1)
}

impl DeliveryQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, delivery: Delivery) -> Result<(), DeliverError> {
        let bytes = queued_bytes(&delivery);
        let mut queue = self.lock();
        if queue.items.len() >= DELIVERY_QUEUE || queue.bytes + bytes > DELIVERY_QUEUE_BYTES {
            return Err(DeliverError::Full);
        }
        queue.bytes += bytes;
        queue.items.push_back(delivery);
        drop(queue);
        self.ready.notify_one();
        Ok(())
    }

    fn pop(&self) -> Option<Delivery> {
        let mut queue = self.lock();
        let delivery = queue.items.pop_front()?;
        queue.bytes -= queued_bytes(&delivery);
        if queue.items.is_empty() {
            // Give the memory of a burst back.
            queue.items = VecDeque::new();
        }
        Some(delivery)
    }
}

/// The receiving end of a connection's deliveries.
pub struct Deliveries(Arc<DeliveryQueue>);

impl Deliveries {
    /// The next delivery, waiting for one. Cancel-safe.
    pub async fn recv(&mut self) -> Delivery {
        loop {
            if let Some(delivery) = self.0.pop() {
                return delivery;
            }
            // `notify_one` keeps a permit when nobody waits, so a push between `pop` and
            // here is not missed.
            self.0.ready.notified().await;
        }
    }

    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.0.pop()
    }
}

/// A stored session and its place in `Inner::expiry`.
struct Stored {
    state: SessionState,
    key: (Instant, u64),
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Live>,
    /// Persistent sessions of agents not connected now...
    stored: HashMap<String, Stored>,
    /// ...ordered by when they expire (ties broken by a serial number).
    expiry: BTreeMap<(Instant, u64), String>,
    next_conn_id: u64,
    next_serial: u64,
}

impl Inner {
    fn take_stored(&mut self, client_id: &str) -> Option<SessionState> {
        let stored = self.stored.remove(client_id)?;
        self.expiry.remove(&stored.key);
        Some(stored.state)
    }

    /// Discards expired sessions, then the soonest-expiring ones past `max_stored`.
    fn prune(&mut self, max_stored: usize, now: Instant) {
        while let Some(entry) = self.expiry.first_entry() {
            let reason = if entry.key().0 <= now {
                "expired"
            } else if self.stored.len() > max_stored {
                "over_max_stored"
            } else {
                break;
            };
            let client_id = entry.remove();
            self.stored.remove(&client_id);
            metrics::counter!(telemetry::SESSIONS_DISCARDED, "reason" => reason).increment(1);
        }
        metrics::gauge!(telemetry::SESSIONS_STORED).set(self.stored.len() as f64);
    }
}

/// Shared by all listeners. The `std::sync::Mutex` is held only for map updates, never across
/// an `.await`.
pub struct Registry {
    inner: Mutex<Inner>,
    max_stored: usize,
    /// The longest a stored session lives.
    max_expiry: Duration,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(&SessionsConfig::default())
    }
}

/// What a newly registered connection keeps for its lifetime (its session state comes
/// separately from `register`, so that it is not held twice).
pub struct Registration {
    pub conn_id: u64,
    pub session_present: bool,
    pub takeover: oneshot::Receiver<Takeover>,
    pub deliveries: Deliveries,
}

impl Registry {
    pub fn new(config: &SessionsConfig) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_stored: config.max_stored.get() as usize,
            max_expiry: Duration::from_secs(config.expiry_secs.get()),
        }
    }

    /// How long a session whose agent asked for `requested` (MQTT 5 Session Expiry Interval;
    /// `None` for 3.1.1) is kept: never longer than `sessions.expirySecs`.
    pub fn session_lifetime(&self, requested: Option<u32>) -> Duration {
        requested.map_or(self.max_expiry, |secs| {
            Duration::from_secs(secs as u64).min(self.max_expiry)
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection for `client_id`, taking over any live one first; returns the
    /// registration and the session state to resume.
    pub async fn register(
        &self,
        client_id: &str,
        clean_start: bool,
    ) -> (Registration, SessionState) {
        let (takeover_tx, takeover_rx) = oneshot::channel();
        let deliveries = Arc::new(DeliveryQueue::default());
        let (conn_id, previous) = {
            let mut inner = self.lock();
            inner.next_conn_id += 1;
            let conn_id = inner.next_conn_id;
            let previous = inner.live.insert(
                client_id.to_string(),
                Live {
                    conn_id,
                    takeover: Some(takeover_tx),
                    deliveries: deliveries.clone(),
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
        let stored = {
            let mut inner = self.lock();
            inner.prune(self.max_stored, Instant::now());
            inner.take_stored(client_id)
        };
        let previous_state = taken.or(stored);
        let session_present = !clean_start && previous_state.is_some();
        let state = if clean_start {
            SessionState::default()
        } else {
            previous_state.unwrap_or_default()
        };
        let registration = Registration {
            conn_id,
            session_present,
            takeover: takeover_rx,
            deliveries: Deliveries(deliveries),
        };
        (registration, state)
    }

    /// Called when a connection ends. Keeps `state` for `lifetime` (a persistent session),
    /// unless the session was handed over to a newer connection.
    pub fn unregister(
        &self,
        client_id: &str,
        conn_id: u64,
        state: Option<(SessionState, Duration)>,
    ) {
        let mut inner = self.lock();
        let ours = inner
            .live
            .get(client_id)
            .is_some_and(|live| live.conn_id == conn_id);
        if ours {
            inner.live.remove(client_id);
            if let Some((state, lifetime)) = state {
                inner.take_stored(client_id);
                inner.next_serial += 1;
                let key = (Instant::now() + lifetime, inner.next_serial);
                inner.expiry.insert(key, client_id.to_string());
                inner
                    .stored
                    .insert(client_id.to_string(), Stored { state, key });
            }
        }
        inner.prune(self.max_stored, Instant::now());
    }

    /// Stored sessions held now.
    pub fn stored_sessions(&self) -> usize {
        self.lock().stored.len()
    }

    /// Queues a message for a connected agent.
    pub fn deliver(&self, client_id: &str, delivery: Delivery) -> Result<(), DeliverError> {
        let inner = self.lock();
        let live = inner.live.get(client_id).ok_or(DeliverError::Offline)?;
        live.deliveries.push(delivery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max_stored: u64, expiry_secs: u64) -> Registry {
        Registry::new(&SessionsConfig {
            max_stored: serde_json::from_value(max_stored.into()).unwrap(),
            expiry_secs: serde_json::from_value(expiry_secs.into()).unwrap(),
        })
    }

    async fn connect_and_leave(registry: &Registry, id: &str, lifetime: Duration) {
        let (registration, _) = registry.register(id, false).await;
        registry.unregister(
            id,
            registration.conn_id,
            Some((SessionState::default(), lifetime)),
        );
    }

    #[tokio::test]
    async fn stored_sessions_are_bounded_in_number_discarding_the_soonest_to_expire() {
        let registry = registry(3, 3600);
        for (i, id) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            connect_and_leave(&registry, id, Duration::from_secs(100 + i as u64)).await;
        }
        assert_eq!(registry.stored_sessions(), 3);
        // "a" and "b" expired soonest: gone. "e" is still there.
        assert!(!registry.register("a", false).await.0.session_present);
        assert!(registry.register("e", false).await.0.session_present);
    }

    #[tokio::test(start_paused = true)]
    async fn stored_sessions_expire() {
        let registry = registry(100, 3600);
        connect_and_leave(&registry, "short", Duration::from_secs(10)).await;
        connect_and_leave(&registry, "long", Duration::from_secs(1000)).await;
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!registry.register("short", false).await.0.session_present);
        assert!(registry.register("long", false).await.0.session_present);
    }

    #[test]
    fn an_mqtt5_session_expiry_is_capped_by_the_configured_expiry() {
        let registry = registry(100, 3600);
        assert_eq!(registry.session_lifetime(None), Duration::from_secs(3600));
        assert_eq!(registry.session_lifetime(Some(60)), Duration::from_secs(60));
        assert_eq!(
            registry.session_lifetime(Some(u32::MAX)),
            Duration::from_secs(3600)
        );
    }
}
