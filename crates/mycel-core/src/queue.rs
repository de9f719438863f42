//! Places in a node's model queue, shared between its own users and its peers.
//!
//! A node runs requests from its own API and tasks sent by peers behind one bounded queue.
//! Without shares, one peer (or a handful of keys) could hold every place, and the node's own
//! users would be told "busy" on their own machine. Here a quarter of the places (at least
//! one) is kept for the node's own users, and one peer may hold at most half of the places
//! (at least one): the rest stays for others.

use std::collections::HashMap;
use std::hash::Hash;

/// Who asks for a place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requester<K> {
    /// The node's own API.
    Local,
    /// A peer's task.
    Peer(K),
}

/// Why no place was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    /// Every place is taken.
    #[error("every one of the {0} places is taken")]
    Full(usize),
    /// Peers hold every place they may (the rest is kept for the node's own users).
    #[error("peers hold the {0} places they may")]
    PeersFull(usize),
    /// This peer holds its share already.
    #[error("this peer holds its share of {0} places")]
    PeerShare(usize),
}

/// The places held, by requester.
#[derive(Debug)]
pub struct QueueShares<K> {
    max: usize,
    per_peer: usize,
    peers_max: usize,
    held: usize,
    by_peers: usize,
    per: HashMap<K, usize>,
}

impl<K: Eq + Hash + Clone> QueueShares<K> {
    /// `max` places (at least 1).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        let reserved = (max / 4).max(1).min(max - 1);
        Self {
            max,
            per_peer: (max / 2).max(1),
            peers_max: max - reserved,
            held: 0,
            by_peers: 0,
            per: HashMap::new(),
        }
    }

    /// Takes a place for `who`, or says why there is none.
    pub fn take(&mut self, who: &Requester<K>) -> Result<(), QueueFull> {
        if self.held >= self.max {
            return Err(QueueFull::Full(self.max));
        }
        if let Requester::Peer(peer) = who {
            if self.by_peers >= self.peers_max {
                return Err(QueueFull::PeersFull(self.peers_max));
            }
            let n = self.per.entry(peer.clone()).or_default();
            if *n >= self.per_peer {
                return Err(QueueFull::PeerShare(self.per_peer));
            }
            *n += 1;
            self.by_peers += 1;
        }
        self.held += 1;
        Ok(())
    }

    /// Gives back a place `who` took.
    pub fn release(&mut self, who: &Requester<K>) {
        self.held = self.held.saturating_sub(1);
        if let Requester::Peer(peer) = who {
            self.by_peers = self.by_peers.saturating_sub(1);
            if let Some(n) = self.per.get_mut(peer) {
                *n -= 1;
                if *n == 0 {
                    self.per.remove(peer);
                }
            }
        }
    }

    /// Places held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// All places.
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_takes_at_most_half_and_peers_leave_a_quarter_to_the_node() {
        let mut q = QueueShares::new(16);
        let (a, b, c) = (
            Requester::Peer(1u32),
            Requester::Peer(2),
            Requester::Peer(3),
        );
        for _ in 0..8 {
            q.take(&a).unwrap();
        }
        assert_eq!(q.take(&a), Err(QueueFull::PeerShare(8)));
        for _ in 0..4 {
            q.take(&b).unwrap();
        }
        assert_eq!(q.take(&c), Err(QueueFull::PeersFull(12)));
        // The node's own users still get the four kept for them.
        for _ in 0..4 {
            q.take(&Requester::Local).unwrap();
        }
        assert_eq!(q.take(&Requester::Local), Err(QueueFull::Full(16)));
        q.release(&a);
        assert_eq!(q.take(&c), Ok(()));
        for _ in 0..7 {
            q.release(&a);
        }
        assert!(!q.per.contains_key(&1));
        assert_eq!(q.held(), 4 + 4 + 1, "b's four, the node's four, c's one");
    }

    #[test]
    fn a_queue_of_one_serves_whoever_comes_first() {
        let mut q = QueueShares::new(1);
        q.take(&Requester::Peer(1u32)).unwrap();
        assert_eq!(q.take(&Requester::Local), Err(QueueFull::Full(1)));
        q.release(&Requester::Peer(1));
        q.take(&Requester::Local).unwrap();
        let mut q = QueueShares::new(2);
        q.take(&Requester::Peer(1u32)).unwrap();
        assert!(q.take(&Requester::Peer(2)).is_err(), "one place kept");
        q.take(&Requester::Local).unwrap();
    }
}
