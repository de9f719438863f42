//! Which task streams a requester keeps open between tasks, and for how long.
//!
//! Opening a stream to a peer costs a round trip of protocol negotiation before the task can
//! be sent (and a few wake-ups on both nodes); on loopback that was a third of what running a
//! task on a peer cost over running it locally. A worker therefore keeps a stream open after
//! it answered, waiting for the next task on it, and a requester keeps the streams whose task
//! ended cleanly, to send its next task to that peer on one of them.
//!
//! The pool is bounded three ways: a number of streams for one peer, a number in all, and an
//! age past which a stream is dropped rather than used (a worker closes a stream that stays
//! idle longer than its own wait, 20 s by default; the requester's limit is set below that).
//! The stream used last is taken first: it is the one least likely to have been closed.
//! Pure: time is given in milliseconds, from any clock that does not step back.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use crate::UnixMillis;

/// Idle items (streams) kept per key (peer), newest last.
#[derive(Debug)]
pub struct Pool<K, T> {
    per_key: usize,
    total: usize,
    max_age_ms: u64,
    idle: HashMap<K, VecDeque<(T, UnixMillis)>>,
    count: usize,
}

impl<K: Eq + Hash + Clone, T> Pool<K, T> {
    /// At most `per_key` idle items for one key and `total` in all, each kept `max_age_ms`.
    pub fn new(per_key: usize, total: usize, max_age_ms: u64) -> Self {
        Self {
            per_key,
            total,
            max_age_ms,
            idle: HashMap::new(),
            count: 0,
        }
    }

    /// Keeps `item` for `key` from `now`. Past the key's bound its oldest item is dropped;
    /// when the pool is full in all, items past their age go first, and if none had, `item`
    /// is dropped. (A put comes with every task answered: the whole pool is looked over only
    /// when it is full, and by [`Pool::prune`], which its owner calls now and then.)
    pub fn put(&mut self, key: K, item: T, now: UnixMillis) {
        if self.count >= self.total {
            self.prune(now);
        }
        if self.per_key == 0 {
            return;
        }
        let room = self.count < self.total;
        let items = self.idle.entry(key.clone()).or_default();
        if items.len() >= self.per_key {
            items.pop_front();
            self.count -= 1;
        } else if !room {
            if items.is_empty() {
                self.idle.remove(&key);
            }
            return;
        }
        items.push_back((item, now));
        self.count += 1;
    }

    /// The item for `key` kept last, if one is still young enough.
    pub fn take(&mut self, key: &K, now: UnixMillis) -> Option<T> {
        let items = self.idle.get_mut(key)?;
        let mut taken = None;
        while let Some((item, since)) = items.pop_back() {
            self.count -= 1;
            if now.saturating_sub(since) <= self.max_age_ms {
                taken = Some(item);
                break;
            }
        }
        if items.is_empty() {
            self.idle.remove(key);
        }
        taken
    }

    /// Drops every item kept for `key`.
    pub fn forget(&mut self, key: &K) {
        if let Some(items) = self.idle.remove(key) {
            self.count -= items.len();
        }
    }

    /// Drops every item past its age.
    pub fn prune(&mut self, now: UnixMillis) {
        let max_age = self.max_age_ms;
        let mut dropped = 0;
        self.idle.retain(|_, items| {
            let before = items.len();
            items.retain(|(_, since)| now.saturating_sub(*since) <= max_age);
            dropped += before - items.len();
            !items.is_empty()
        });
        self.count -= dropped;
    }

    /// Items kept now, in all.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_young_item_is_taken_and_old_ones_are_dropped() {
        let mut pool = Pool::new(4, 16, 1_000);
        pool.put("a", 1, 0);
        pool.put("a", 2, 500);
        pool.put("b", 3, 500);
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.take(&"a", 600), Some(2), "the one kept last");
        assert_eq!(pool.take(&"a", 600), Some(1));
        assert_eq!(pool.take(&"a", 600), None);
        // Past its age an item is never handed out.
        pool.put("a", 4, 600);
        assert_eq!(pool.take(&"a", 1_601), None);
        assert_eq!(
            pool.take(&"b", 1_500),
            Some(3),
            "exactly at its age it is kept"
        );
        assert!(pool.is_empty());
        // Old items behind a young one go when it is taken from an emptied key, and with
        // a prune.
        pool.put("c", 5, 0);
        pool.put("c", 6, 900);
        assert_eq!(pool.take(&"c", 1_500), Some(6));
        assert_eq!(pool.take(&"c", 1_500), None);
        assert!(pool.is_empty(), "the stale item was dropped, not kept");
        pool.put("d", 7, 0);
        pool.put("e", 8, 800);
        pool.prune(1_200);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.take(&"e", 1_200), Some(8));
        pool.put("f", 9, 1_200);
        pool.put("f", 10, 1_200);
        pool.put("g", 11, 1_200);
        pool.forget(&"f");
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.take(&"f", 1_200), None);
        assert_eq!(pool.take(&"g", 1_200), Some(11));
    }

    #[test]
    fn bounds_per_key_and_in_all_hold() {
        let mut pool = Pool::new(2, 3, 10_000);
        pool.put("a", 1, 0);
        pool.put("a", 2, 1);
        pool.put("a", 3, 2);
        assert_eq!(pool.len(), 2, "a key's oldest item makes room");
        pool.put("b", 4, 3);
        assert_eq!(pool.len(), 3);
        pool.put("c", 5, 4);
        assert_eq!(pool.len(), 3, "full in all: the newcomer is dropped");
        assert_eq!(pool.take(&"c", 5), None);
        // A key at its own bound still swaps its oldest for a newer one when the pool is full.
        pool.put("a", 6, 5);
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.take(&"a", 6), Some(6));
        assert_eq!(pool.take(&"a", 6), Some(3));
        assert_eq!(pool.take(&"a", 6), None);
        assert_eq!(pool.take(&"b", 6), Some(4));
        assert!(pool.is_empty());
        let mut none = Pool::new(0, 8, 10_000);
        none.put("a", 1, 0);
        assert!(none.is_empty(), "a pool of no items per key keeps none");
    }
}
