//! Pacing for the upstream link: token buckets for IoT Core's per-connection limits, and the
//! reconnect backoff. Pure and clock-driven (callers pass `Instant`s), so tests control time.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// A token bucket that may go into debt: an item is allowed when the balance is not negative,
/// then its whole cost is taken. Over any interval `t` it lets through at most
/// `burst + rate * t + (one item's cost)`, and never blocks an item larger than `burst` forever.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// The most tokens the bucket holds.
    burst: f64,
    balance: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A bucket starting full.
    pub fn new(rate_per_sec: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate: rate_per_sec,
            burst,
            balance: burst,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.balance = (self.balance + elapsed * self.rate).min(self.burst);
        self.updated = now;
    }

    /// How long until an item may go (zero: now).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.balance >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.balance / self.rate)
        }
    }

    /// Charges an item of `cost` tokens (call when `wait` is zero).
    pub fn take(&mut self, cost: f64, now: Instant) {
        self.refill(now);
        self.balance -= cost;
    }
}

/// Reconnect delays: exponential growth from `min` to `max`, each delay drawn uniformly between
/// `min` and the current ceiling (full jitter within the configured bounds), so a fleet of
/// gateways that lost the same endpoint does not reconnect in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The ceiling for the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay, and one step up the ladder.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        if ceiling <= self.min {
            return self.min;
        }
        let span = (ceiling - self.min).as_millis() as u64;
        self.min + Duration::from_millis(rand::rng().random_range(0..=span))
    }

    /// The link proved healthy: start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_its_rate_after_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(20.0, 1.0, start);
        let mut now = start;
        let mut sent = Vec::new();
        while now < start + Duration::from_secs(3) {
            let wait = bucket.wait(now);
            now += wait;
            bucket.take(1.0, now);
            sent.push(now);
        }
        // Any one-second window holds at most rate + burst items.
        for (i, at) in sent.iter().enumerate() {
            let in_window = sent[i..]
                .iter()
                .take_while(|t| **t < *at + Duration::from_secs(1))
                .count();
            assert!(in_window <= 21, "{in_window} items in one second");
        }
        assert!(sent.len() >= 59, "only {} in 3 s", sent.len());
    }

    #[test]
    fn an_item_larger_than_the_burst_still_goes_and_then_waits_it_off() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000.0, 500.0, start);
        assert_eq!(bucket.wait(start), Duration::ZERO);
        bucket.take(2500.0, start);
        let wait = bucket.wait(start);
        assert_eq!(wait, Duration::from_secs(2));
        assert_eq!(bucket.wait(start + wait), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_within_bounds_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(backoff.ceiling());
            let delay = backoff.next_delay();
            assert!(delay >= Duration::from_secs(1));
            assert!(delay <= Duration::from_secs(120));
        }
        assert_eq!(ceilings[0], Duration::from_secs(1));
        assert_eq!(ceilings[3], Duration::from_secs(8));
        assert_eq!(*ceilings.last().unwrap(), Duration::from_secs(120));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
    }
}
