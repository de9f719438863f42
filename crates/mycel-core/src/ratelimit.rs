//! Per-peer token buckets: each peer may send `rate` messages a second, in bursts of `burst`.

use std::collections::HashMap;
use std::hash::Hash;

use crate::UnixMillis;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: UnixMillis,
}

/// A token bucket per key (usually a peer id), with a bound on the number of keys tracked.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate_per_s: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Eq + Hash + Copy> RateLimiter<K> {
    /// `rate_per_s` messages a second on average, at most `burst` at once, for at most
    /// `max_keys` keys (full buckets are dropped first when the table is full).
    pub fn new(rate_per_s: f64, burst: f64, max_keys: usize) -> Self {
        Self {
            rate_per_s,
            burst,
            max_keys,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key` at `now`; false when the key is over its rate.
    pub fn allow(&mut self, key: K, now: UnixMillis) -> bool {
        if self.available(key, now) == 0 {
            return false;
        }
        self.spend(key, 1);
        true
    }

    /// The whole tokens `key` has at `now` (refilled), without taking any: for a cost known
    /// only once the work is done, paid with [`RateLimiter::spend`].
    pub fn available(&mut self, key: K, now: UnixMillis) -> u64 {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_keys {
            self.forget_full(now);
        }
        let (rate, burst) = (self.rate_per_s, self.burst);
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed_s = now.saturating_sub(bucket.last) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed_s * rate).min(burst);
        bucket.last = bucket.last.max(now);
        bucket.tokens.max(0.0).floor() as u64
    }

    /// Takes `n` tokens from `key` (after [`RateLimiter::available`] said it has them).
    pub fn spend(&mut self, key: K, n: u64) {
        if let Some(bucket) = self.buckets.get_mut(&key) {
            bucket.tokens = (bucket.tokens - n as f64).max(0.0);
        }
    }

    /// Drops buckets that have refilled completely: they carry no information.
    pub fn forget_full(&mut self, now: UnixMillis) {
        let (rate, burst) = (self.rate_per_s, self.burst);
        self.buckets
            .retain(|_, b| b.tokens + now.saturating_sub(b.last) as f64 / 1000.0 * rate < burst);
    }

    /// Stops tracking `key`.
    pub fn remove(&mut self, key: &K) {
        self.buckets.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_refill_at_rate() {
        let mut limiter = RateLimiter::new(10.0, 3.0, 10);
        assert!((0..3).all(|_| limiter.allow(1u8, 0)));
        assert!(!limiter.allow(1, 0));
        assert!(!limiter.allow(1, 50), "half a token is not enough");
        assert!(limiter.allow(1, 100));
        assert!(limiter.allow(2, 100), "keys are independent");
    }

    #[test]
    fn a_cost_paid_after_the_work_comes_out_of_the_same_bucket() {
        let mut limiter = RateLimiter::new(100.0, 1000.0, 4);
        assert_eq!(limiter.available(1u8, 0), 1000);
        limiter.spend(1, 900);
        assert_eq!(limiter.available(1, 0), 100);
        limiter.spend(1, 100);
        assert_eq!(limiter.available(1, 0), 0);
        assert!(!limiter.allow(1, 0));
        assert_eq!(limiter.available(1, 500), 50, "refilled at the rate");
    }

    proptest! {
        /// Over any schedule, no key gets more than burst + rate * elapsed messages through.
        #[test]
        fn never_exceeds_burst_plus_rate(steps in proptest::collection::vec(0u64..200, 1..300)) {
            let mut limiter = RateLimiter::new(5.0, 4.0, 4);
            let mut now = 0;
            let mut allowed = 0u64;
            for step in steps {
                now += step;
                if limiter.allow(7u8, now) { allowed += 1; }
            }
            let bound = 4.0 + 5.0 * now as f64 / 1000.0;
            prop_assert!(allowed as f64 <= bound + 1e-9, "{allowed} > {bound}");
        }
    }
}
