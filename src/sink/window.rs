//! The delivery window of a networked sink: the batches it holds (received from the batcher, not
//! yet acknowledged), which one to send next, and which one is poison.
//!
//! Pure bookkeeping, no I/O: the sink tells it what it sent, what the far side acknowledged, and
//! when a connection ended; it answers what to send next and which batches to give up on.
//!
//! Guarantees:
//! - Every held batch is sent again after a connection ends, until it is acknowledged or
//!   dead-lettered; nothing held is ever forgotten.
//! - A batch is dead-lettered only when it failed *alone* (the only one outstanding when the
//!   connection ended, or the one the upstream refused by packet id) `max_attempts` times, each
//!   failure counted only if another batch was acknowledged since the previous one (since the
//!   batch was taken, for the first). So a link that refuses everything (an IoT policy that
//!   denies the topic, an outage) dead-letters nothing, whatever `max_attempts`: it is retried
//!   with backoff; only a batch that fails while others get through is poison.
//! - When a connection ends with several batches outstanding and none named, each of them
//!   becomes a suspect and is sent alone (nothing else outstanding) once, before new batches:
//!   the poison one, if any, then fails alone and is counted.
//! - A batch that failed alone is sent again only after another batch was acknowledged, or when
//!   nothing else is waiting; so the link keeps moving while a poison batch is being proven.

use std::collections::BTreeMap;

use super::Batch;

/// One held batch and its delivery history on this run.
struct Held {
    batch: Batch,
    /// Sent on the current connection and not acknowledged yet.
    outstanding: bool,
    /// Must be sent alone: it was outstanding when a connection ended.
    suspect: bool,
    /// Counted failures alone.
    strikes: u32,
    /// `DeliveryWindow::acks` when it was taken, then at its last counted failure.
    acks_at_strike: u64,
    /// `DeliveryWindow::acks` at its last failure alone, counted or not.
    acks_at_failure: Option<u64>,
}

impl Held {
    /// Whether it may go (alone) again: it never failed alone, or something got through since.
    fn ready(&self, acks: u64) -> bool {
        self.acks_at_failure.is_none_or(|at| acks > at)
    }

    /// Whether a failure now counts: another batch got through since the last one (or since it
    /// was taken).
    fn failure_counts(&self, acks: u64) -> bool {
        acks > self.acks_at_strike
    }
}

/// The sink's held batches, by `batch_seq`.
pub struct DeliveryWindow {
    held: BTreeMap<u64, Held>,
    max_attempts: u32,
    /// Acknowledgements so far on this run: the clock for "others got through since".
    acks: u64,
}

/// A batch given up on, and why.
#[derive(Debug)]
pub struct Poison {
    pub batch: Batch,
    pub reason: String,
}

impl DeliveryWindow {
    pub fn new(max_attempts: u32) -> Self {
        Self {
            held: BTreeMap::new(),
            max_attempts: max_attempts.max(1),
            acks: 0,
        }
    }

    /// Takes a batch from the batcher.
    pub fn hold(&mut self, batch: Batch) {
        self.held.insert(
            batch.batch_seq,
            Held {
                batch,
                outstanding: false,
                suspect: false,
                strikes: 0,
                acks_at_strike: self.acks,
                acks_at_failure: None,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Batches sent on this connection and not acknowledged.
    pub fn outstanding(&self) -> usize {
        self.held.values().filter(|h| h.outstanding).count()
    }

    /// The batch to send now, if one may go: suspects first, each alone; then the oldest
    /// waiting batch. `None` while a suspect is outstanding or others must finish first.
    pub fn next(&self) -> Option<&Batch> {
        let mut outstanding = 0;
        let mut suspect_ready = None;
        let mut suspect_waiting = None;
        let mut normal = None;
        for held in self.held.values() {
            if held.outstanding {
                if held.suspect {
                    return None;
                }
                outstanding += 1;
            } else if held.suspect {
                if held.ready(self.acks) {
                    suspect_ready = suspect_ready.or(Some(&held.batch));
                } else {
                    suspect_waiting = suspect_waiting.or(Some(&held.batch));
                }
            } else {
                normal = normal.or(Some(&held.batch));
            }
        }
        if let Some(batch) = suspect_ready {
            return (outstanding == 0).then_some(batch);
        }
        if normal.is_some() {
            return normal;
        }
        // Only batches that failed alone are left: retry one alone (it counts only after others
        // got through, so this cannot dead-letter anything by itself).
        suspect_waiting.filter(|_| outstanding == 0)
    }

    /// The batch was handed to the connection.
    pub fn sent(&mut self, batch_seq: u64) {
        if let Some(held) = self.held.get_mut(&batch_seq) {
            held.outstanding = true;
        }
    }

    /// The far side acknowledged the batch: it leaves the window. False if it was not held.
    pub fn acknowledged(&mut self, batch_seq: u64) -> bool {
        let known = self.held.remove(&batch_seq).is_some();
        if known {
            self.acks += 1;
        }
        known
    }

    /// The batch must be sent again, through no fault of its own (e.g. its cloud receipt did
    /// not come in time): it waits again, without a strike.
    pub fn requeue(&mut self, batch_seq: u64) {
        if let Some(held) = self.held.get_mut(&batch_seq) {
            held.outstanding = false;
        }
    }

    /// The connection failed for a reason that is no batch's fault (throttling, the nucleus's
    /// spool full, offline): every outstanding batch waits again, without strikes or suspicion.
    pub fn requeue_all(&mut self) {
        for held in self.held.values_mut() {
            held.outstanding = false;
        }
    }

    /// The batch with this seq, if held.
    pub fn get(&self, batch_seq: u64) -> Option<&Batch> {
        self.held.get(&batch_seq).map(|h| &h.batch)
    }

    /// The connection ended (`cause`, for the operator). `refused`: the batch the upstream
    /// refused by name, if that is what ended it. Every outstanding batch waits again; returns
    /// the batches that have now failed alone `max_attempts` times, removed from the window.
    pub fn connection_ended(&mut self, refused: Option<u64>, cause: &str) -> Vec<Poison> {
        let outstanding: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| h.outstanding)
            .map(|(seq, _)| *seq)
            .collect();
        for held in self.held.values_mut() {
            held.outstanding = false;
        }
        let culprit = refused
            .filter(|seq| self.held.contains_key(seq))
            .or_else(|| (outstanding.len() == 1).then(|| outstanding[0]));
        let Some(culprit) = culprit else {
            if outstanding.len() > 1 {
                for seq in &outstanding {
                    if let Some(held) = self.held.get_mut(seq) {
                        held.suspect = true;
                    }
                }
            }
            return Vec::new();
        };
        let acks = self.acks;
        let max_attempts = self.max_attempts;
        let Some(held) = self.held.get_mut(&culprit) else {
            return Vec::new();
        };
        held.suspect = true;
        held.acks_at_failure = Some(acks);
        if held.failure_counts(acks) {
            held.strikes += 1;
            held.acks_at_strike = acks;
        }
        if held.strikes < max_attempts {
            return Vec::new();
        }
        let held = self.held.remove(&culprit).expect("held");
        vec![Poison {
            reason: format!(
                "the upstream failed it {} times while other batches were delivered; last: {cause}",
                held.strikes
            ),
            batch: held.batch,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn batch(seq: u64) -> Batch {
        Batch {
            batch_seq: seq,
            record_count: 1,
            first_seq: seq,
            last_seq: seq,
            payload: Bytes::from(vec![seq as u8]),
        }
    }

    fn window(seqs: &[u64], max_attempts: u32) -> DeliveryWindow {
        let mut w = DeliveryWindow::new(max_attempts);
        for &seq in seqs {
            w.hold(batch(seq));
        }
        w
    }

    /// Sends everything the window allows now, in order; returns the seqs sent.
    fn send_all(w: &mut DeliveryWindow) -> Vec<u64> {
        let mut sent = Vec::new();
        while let Some(seq) = w.next().map(|b| b.batch_seq) {
            w.sent(seq);
            sent.push(seq);
        }
        sent
    }

    /// One connection where the upstream acknowledges everything except `poison`, and closes
    /// the connection when `poison` is sent. Returns what was dead-lettered.
    fn connection_with_poison(w: &mut DeliveryWindow, poison: u64) -> Vec<u64> {
        loop {
            let sent = send_all(w);
            if sent.is_empty() {
                return Vec::new();
            }
            if sent.contains(&poison) {
                return w
                    .connection_ended(None, "connection closed")
                    .into_iter()
                    .map(|p| p.batch.batch_seq)
                    .collect();
            }
            for seq in sent {
                assert!(w.acknowledged(seq));
            }
        }
    }

    #[test]
    fn batches_go_oldest_first_and_leave_when_acknowledged() {
        let mut w = window(&[3, 1, 2], 5);
        assert_eq!(send_all(&mut w), vec![1, 2, 3]);
        assert_eq!(w.outstanding(), 3);
        assert!(w.acknowledged(2));
        assert!(!w.acknowledged(2), "acknowledged twice");
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn a_poison_batch_in_a_busy_window_is_dead_lettered_and_the_rest_delivered() {
        let mut w = window(&(1..=10).collect::<Vec<_>>(), 5);
        let mut dead = Vec::new();
        for seq in 11..41 {
            dead.extend(connection_with_poison(&mut w, 4));
            // New traffic keeps arriving.
            w.hold(batch(seq));
            if !dead.is_empty() {
                break;
            }
        }
        assert_eq!(dead, vec![4]);
        // Everything else goes through.
        connection_with_poison(&mut w, 4);
        assert!(w.is_empty(), "left: {}", w.len());
    }

    #[test]
    fn a_link_that_refuses_everything_dead_letters_nothing() {
        let mut w = window(&[1, 2, 3], 2);
        for round in 0..50 {
            let sent = send_all(&mut w);
            assert!(!sent.is_empty(), "round {round}: nothing to send");
            // Refused: whatever was sent fails, nothing is ever acknowledged.
            let refused = (sent.len() == 1).then(|| sent[0]);
            let dead = w.connection_ended(refused, "refused");
            assert!(dead.is_empty(), "round {round}: dead-lettered {dead:?}");
        }
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn a_refused_batch_named_by_the_upstream_is_struck_alone() {
        let mut w = window(&[1, 2, 3], 2);
        assert_eq!(send_all(&mut w), vec![1, 2, 3]);
        assert!(w.acknowledged(1));
        // 2 refused by name while 3 is outstanding: 3 is innocent and waits normally.
        assert!(w.connection_ended(Some(2), "refused").is_empty());
        w.hold(batch(4));
        // Nothing got through since 2 failed: the others go first.
        assert_eq!(send_all(&mut w), vec![3, 4]);
        assert!(w.acknowledged(3) && w.acknowledged(4));
        // Now 2 goes again, alone, and its second refusal is its last.
        assert_eq!(send_all(&mut w), vec![2]);
        let dead = w.connection_ended(Some(2), "refused: NotAuthorized");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].batch.batch_seq, 2);
        assert!(
            dead[0].reason.contains("NotAuthorized"),
            "{}",
            dead[0].reason
        );
        assert!(w.is_empty());
    }

    #[test]
    fn a_struck_batch_waits_until_another_got_through() {
        let mut w = window(&[1, 2], 5);
        assert_eq!(send_all(&mut w), vec![1, 2]);
        assert!(w.connection_ended(Some(1), "refused").is_empty());
        // 1 failed alone and nothing was acknowledged since: 2 goes first.
        assert_eq!(send_all(&mut w), vec![2]);
        assert!(w.acknowledged(2));
        assert_eq!(send_all(&mut w), vec![1]);
    }

    #[test]
    fn after_a_failure_with_many_outstanding_each_goes_alone_once() {
        let mut w = window(&[1, 2, 3], 5);
        assert_eq!(send_all(&mut w), vec![1, 2, 3]);
        assert!(w.connection_ended(None, "closed").is_empty());
        w.hold(batch(4));
        for expected in [1, 2, 3] {
            assert_eq!(send_all(&mut w), vec![expected], "suspects go alone");
            assert!(w.acknowledged(expected));
        }
        assert_eq!(send_all(&mut w), vec![4]);
    }

    #[test]
    fn one_attempt_dead_letters_at_the_first_failure_alone_once_others_got_through() {
        let mut w = window(&[1, 2], 1);
        assert_eq!(send_all(&mut w), vec![1, 2]);
        assert!(w.acknowledged(1));
        // 2 fails alone, after 1 got through: poison at once.
        let dead = w.connection_ended(None, "closed");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].batch.batch_seq, 2);
        assert!(dead[0].reason.contains("closed"), "{}", dead[0].reason);
        assert!(w.is_empty());
    }

    #[test]
    fn even_one_attempt_dead_letters_nothing_when_nothing_gets_through() {
        let mut w = window(&[1, 2, 3], 1);
        for round in 0..20 {
            let sent = send_all(&mut w);
            let refused = (sent.len() == 1).then(|| sent[0]);
            let dead = w.connection_ended(refused, "refused");
            assert!(dead.is_empty(), "round {round}: dead-lettered {dead:?}");
        }
        assert_eq!(w.len(), 3);
    }
}
