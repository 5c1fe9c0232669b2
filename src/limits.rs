//! Rate limits: token buckets, per connection (inbound frames) and per API
//! key (submissions).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

    /// Takes one token; false when the rate is exceeded.
    pub fn take(&mut self) -> bool {
        self.take_n(1)
    }

    /// Takes `n` tokens, or none; false when the rate is exceeded. More than
    /// a second's worth costs a full bucket, so that a large batch is
    /// possible at all.
    pub fn take_n(&mut self, n: u32) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled = now;
        let cost = f64::from(n).min(self.rate);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// How long until `n` tokens are available again.
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
            buckets.retain(|_, b| b.refilled.elapsed() < idle);
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
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 10);
        assert!(!bucket.take());
        assert!(bucket.retry_after(1) <= Duration::from_millis(100));
    }

    #[test]
    fn a_batch_costs_each_message_and_a_huge_one_a_full_bucket() {
        let mut bucket = TokenBucket::new(10);
        assert!(bucket.take_n(6));
        assert!(!bucket.take_n(6), "only 4 left");
        assert!(bucket.take_n(4));
        let mut bucket = TokenBucket::new(10);
        assert!(bucket.take_n(1000));
        assert!(!bucket.take());
        assert!(bucket.retry_after(1000) > Duration::from_millis(900));
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
