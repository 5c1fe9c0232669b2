//! Rate limits: token buckets, per connection (inbound frames) and per API
//! key (submissions).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// Tokio's clock: the same as the system's, except in tests that pause it.
use tokio::time::Instant;

/// Allows `rate` events per second, with bursts up to `rate`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            refilled: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled = now;
    }

    /// Takes `n` tokens, or none; false when the rate is exceeded. A cost of
    /// more than a second's worth passes on a full bucket (so that a large
    /// batch is possible at all) and is paid in full: the bucket goes into
    /// debt, and refuses everything until it is repaid.
    pub fn take_n(&mut self, n: u32) -> bool {
        self.refill();
        let cost = f64::from(n);
        if self.tokens >= cost.min(self.rate) {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Counts `n` events that happened (frames already read): the bucket may
    /// go into debt, and [`TokenBucket::wait`] says how long to pause.
    pub fn charge(&mut self, n: u32) {
        self.refill();
        self.tokens -= f64::from(n);
    }

    /// How long until one more event is allowed (zero: now).
    pub fn wait(&self) -> Duration {
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        let elapsed = self.refilled.elapsed().as_secs_f64();
        let missing = 1.0 - (self.tokens + elapsed * self.rate);
        Duration::from_secs_f64((missing / self.rate).max(0.0))
    }

    /// How long until a cost of `n` is allowed again.
    pub fn retry_after(&self, n: u32) -> Duration {
        let cost = f64::from(n).min(self.rate);
        Duration::from_secs_f64(((cost - self.tokens) / self.rate).max(0.0))
    }
}

/// One bucket per key (an API key's scope). Buckets of keys that went quiet
/// are forgotten, so that the map stays small however many keys there are.
pub struct KeyedLimiter {
    rate: u32,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl KeyedLimiter {
    /// `rate` 0: no limit.
    pub fn new(rate: u32) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` events for `key`: Ok, or how long to wait.
    pub fn check(&self, key: &str, n: u32) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().expect("limiter lock");
        if buckets.len() > 10_000 {
            let idle = Duration::from_secs(60);
            // A bucket in debt is kept: forgetting it would forgive the debt.
            buckets.retain(|_, b| b.refilled.elapsed() < idle || b.tokens < 0.0);
        }
        let bucket = buckets
            .entry(key.to_owned())
            .or_insert_with(|| TokenBucket::new(self.rate));
        if bucket.take_n(n) {
            Ok(())
        } else {
            Err(bucket.retry_after(n))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_rate_and_refuses_beyond() {
        let mut bucket = TokenBucket::new(10);
        assert_eq!((0..10).filter(|_| bucket.take_n(1)).count(), 10);
        assert!(!bucket.take_n(1));
        assert!(bucket.retry_after(1) <= Duration::from_millis(100));
    }

    #[test]
    fn a_batch_costs_each_message_and_a_huge_one_is_paid_in_full() {
        let mut bucket = TokenBucket::new(10);
        assert!(bucket.take_n(6));
        assert!(!bucket.take_n(6), "only 4 left");
        assert!(bucket.take_n(4));
        // 1,000 at 10/s: passes on a full bucket, then nothing for ~100 s.
        let mut bucket = TokenBucket::new(10);
        assert!(bucket.take_n(1000));
        assert!(!bucket.take_n(1));
        assert!(bucket.retry_after(1) > Duration::from_secs(99));
    }

    #[test]
    fn charged_frames_pause_reading_for_as_long_as_they_cost() {
        let mut bucket = TokenBucket::new(100);
        bucket.charge(50);
        assert_eq!(bucket.wait(), Duration::ZERO, "50 left");
        // One message carrying 3,000 frames owes 29.5 s at 100/s.
        bucket.charge(3000);
        let wait = bucket.wait();
        assert!(
            wait > Duration::from_secs(29) && wait < Duration::from_secs(30),
            "{wait:?}"
        );
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let limiter = KeyedLimiter::new(2);
        assert!(limiter.check("a", 1).is_ok());
        assert!(limiter.check("a", 1).is_ok());
        assert!(limiter.check("a", 1).is_err());
        assert!(limiter.check("b", 1).is_ok());
        let unlimited = KeyedLimiter::new(0);
        assert!((0..1000).all(|_| unlimited.check("a", 1).is_ok()));
    }
}
