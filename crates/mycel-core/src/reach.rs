//! Reachability: whether other nodes can dial this one, and which relays a node that cannot
//! be dialled keeps reservations with.
//!
//! The driver feeds in what AutoNAT probes found (another node tried to dial one of our
//! candidate addresses back) and what happened to relay reservations; [`Reach`] says what the
//! node announces about itself and whom to ask for a reservation next. Pure: time and the
//! random source are passed in.
//!
//! - **Public** once an address of ours is confirmed from outside (a probe dialled back, a
//!   gateway mapped a port, or the operator declared it); such a node serves as a relay.
//! - **Private** after [`ReachConfig::private_after`] failed probes with nothing confirmed
//!   (the node sits behind a NAT or a firewall): it reserves a slot on up to
//!   [`ReachConfig::relays`] public relays and announces the relayed addresses, so others
//!   reach it through them until a direct connection is punched (DCUtR).
//! - **Unknown** until then. An unknown node also reserves relay slots once it has waited
//!   [`ReachConfig::unknown_grace_ms`] without a verdict (no probe server answered): being
//!   reachable through a relay costs little, not being reachable at all strands the node.

use std::collections::HashMap;
use std::hash::Hash;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::peering::{Backoff, BackoffConfig};
use crate::UnixMillis;

/// Whether `ip` is on the internet: not loopback, private (RFC 1918, unique local),
/// link-local, shared (carrier-grade NAT, 100.64/10), broadcast or unspecified.
pub fn is_global_ip(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(ip) => {
            let [a, b, ..] = ip.octets();
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || (a == 100 && (64..128).contains(&b)))
        }
        std::net::IpAddr::V6(ip) => {
            let first = ip.segments()[0];
            !(ip.is_loopback()
                || ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// Whether a node can be dialled from outside its network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// Not known yet.
    #[default]
    Unknown,
    /// An address of the node was dialled from outside.
    Public,
    /// Probes from outside failed: the node is behind a NAT or a firewall.
    Private,
}

impl Reachability {
    /// The word used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Public => "public",
            Self::Private => "private",
        }
    }
}

/// How reachability is judged and how many relays are kept.
#[derive(Debug, Clone, Copy)]
pub struct ReachConfig {
    /// Failed probes, with nothing confirmed, before the node calls itself private.
    pub private_after: u32,
    /// Relays a private node keeps reservations with.
    pub relays: usize,
    /// How long a node stays unknown before it reserves relay slots anyway.
    pub unknown_grace_ms: u64,
    /// A reservation request unanswered for this long counts as failed.
    pub reserve_timeout_ms: u64,
}

impl Default for ReachConfig {
    fn default() -> Self {
        Self {
            private_after: 1,
            relays: 2,
            unknown_grace_ms: 30_000,
            reserve_timeout_ms: 15_000,
        }
    }
}

/// Where a relay reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Asked at this time, no answer yet.
    Asked(UnixMillis),
    /// Accepted.
    Held,
}

/// Reachability and relay reservations of one node.
#[derive(Debug)]
pub struct Reach<P> {
    config: ReachConfig,
    started: UnixMillis,
    /// Externally confirmed addresses (by the driver's own key, usually the address text).
    confirmed: usize,
    /// Probes failed since the last success.
    failures: u32,
    /// The operator fixed the answer.
    forced: Option<Reachability>,
    slots: HashMap<P, Slot>,
    backoff: Backoff<P>,
}

impl<P: Eq + Hash + Clone + Ord> Reach<P> {
    /// A node started at `now`, reachability unknown.
    pub fn new(config: ReachConfig, now: UnixMillis) -> Self {
        Self {
            config,
            started: now,
            confirmed: 0,
            failures: 0,
            forced: None,
            slots: HashMap::new(),
            backoff: Backoff::new(BackoffConfig {
                first_ms: 2_000,
                max_ms: 120_000,
                max_targets: 256,
            }),
        }
    }

    /// The operator says what the node is (an address declared public, say); probes no
    /// longer change it.
    pub fn force(&mut self, reachability: Reachability) {
        self.forced = Some(reachability);
    }

    /// What the node announces about itself.
    pub fn status(&self) -> Reachability {
        if let Some(forced) = self.forced {
            return forced;
        }
        if self.confirmed > 0 {
            Reachability::Public
        } else if self.failures >= self.config.private_after {
            Reachability::Private
        } else {
            Reachability::Unknown
        }
    }

    /// A probe dialled one of our addresses back (`ok`) or could not. Returns whether the
    /// status changed.
    pub fn on_probe(&mut self, ok: bool) -> bool {
        let before = self.status();
        if ok {
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
        }
        before != self.status()
    }

    /// The number of addresses confirmed from outside now (probes, a gateway's mapping, the
    /// operator). Returns whether the status changed.
    pub fn set_confirmed(&mut self, confirmed: usize) -> bool {
        let before = self.status();
        self.confirmed = confirmed;
        if confirmed > 0 {
            self.failures = 0;
        }
        before != self.status()
    }

    /// Whether the node should hold relay reservations now.
    pub fn wants_relays(&self, now: UnixMillis) -> bool {
        match self.status() {
            Reachability::Public => false,
            Reachability::Private => true,
            Reachability::Unknown => {
                now.saturating_sub(self.started) >= self.config.unknown_grace_ms
            }
        }
    }

    /// Reservation requests unanswered for too long: each counts as failed (asked again after
    /// a back-off); the driver drops its listener, so a late answer cannot hold a slot.
    pub fn expire(&mut self, now: UnixMillis, rng: &mut impl Rng) -> Vec<P> {
        let timeout = self.config.reserve_timeout_ms;
        let stale: Vec<P> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Asked(at) if now.saturating_sub(*at) >= timeout))
            .map(|(p, _)| p.clone())
            .collect();
        for relay in &stale {
            self.on_failed(relay.clone(), now, rng);
        }
        stale
    }

    /// Relays to ask for a reservation now, chosen at random among `candidates` (public
    /// peers that serve as relays), skipping those held, asked or backing off. Each returned
    /// relay counts as asked at `now`.
    pub fn reserve(&mut self, now: UnixMillis, candidates: &[P], rng: &mut impl Rng) -> Vec<P> {
        if !self.wants_relays(now) {
            return Vec::new();
        }
        let want = self.config.relays.saturating_sub(self.slots.len());
        let mut pool: Vec<P> = candidates
            .iter()
            .filter(|p| !self.slots.contains_key(*p) && self.backoff.due(p, now))
            .cloned()
            .collect();
        pool.sort();
        pool.dedup();
        pool.shuffle(rng);
        pool.truncate(want);
        for relay in &pool {
            self.slots.insert(relay.clone(), Slot::Asked(now));
        }
        pool
    }

    /// `relay` accepted (or renewed) our reservation. False when it was not asked (a late
    /// answer after [`Reach::expire`]): the driver drops it.
    pub fn on_reserved(&mut self, relay: P) -> bool {
        if !self.slots.contains_key(&relay) {
            return false;
        }
        self.backoff.succeeded(&relay);
        self.slots.insert(relay, Slot::Held);
        true
    }

    /// A reservation with `relay` was refused, failed or closed: asked again after a
    /// back-off.
    pub fn on_failed(&mut self, relay: P, now: UnixMillis, rng: &mut impl Rng) {
        self.slots.remove(&relay);
        self.backoff.tried(relay, now, rng);
    }

    /// When the pending reservation request to `relay` was made (`None`: none pending).
    pub fn asked_at(&self, relay: &P) -> Option<UnixMillis> {
        match self.slots.get(relay) {
            Some(Slot::Asked(at)) => Some(*at),
            _ => None,
        }
    }

    /// `relay`, asked for a reservation and not answered yet, proved it does not serve as it
    /// announced: our dial found nobody at its public addresses (refused outright, another
    /// peer answering, or silence while our own network worked), or it refused the request
    /// while announcing room for it. The request counts as failed now; returns whether to charge the relay, which happens once
    /// per request: not for a relay that was never asked or that granted the request (one
    /// holding our reservation that stops serving is not lying), nor twice for one request.
    pub fn on_false_relay(&mut self, relay: P, now: UnixMillis, rng: &mut impl Rng) -> bool {
        if !matches!(self.slots.get(&relay), Some(Slot::Asked(_))) {
            return false;
        }
        self.on_failed(relay, now, rng);
        true
    }

    /// Relays whose reservation is held; a node that turned public no longer needs them.
    pub fn held(&self) -> Vec<P> {
        let mut held: Vec<P> = self
            .slots
            .iter()
            .filter(|(_, s)| **s == Slot::Held)
            .map(|(p, _)| p.clone())
            .collect();
        held.sort();
        held
    }

    /// Forgets every reservation (the node turned public and closed them).
    pub fn release_all(&mut self) {
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn reach() -> Reach<u32> {
        Reach::new(ReachConfig::default(), 0)
    }

    #[test]
    fn probes_decide_public_and_private() {
        let mut r = reach();
        assert_eq!(r.status(), Reachability::Unknown);
        // A server really tried to dial us back and could not.
        assert!(r.on_probe(false));
        assert_eq!(r.status(), Reachability::Private);
        assert!(!r.on_probe(false), "no change");
        // A confirmed address overrides failures, and losing it goes back to unknown.
        assert!(r.set_confirmed(1));
        assert_eq!(r.status(), Reachability::Public);
        assert!(r.set_confirmed(0));
        assert_eq!(r.status(), Reachability::Unknown);
        // A success resets the count of failures.
        r.on_probe(false);
        r.on_probe(true);
        assert_eq!(r.status(), Reachability::Unknown);
    }

    #[test]
    fn the_operator_has_the_last_word() {
        let mut r = reach();
        r.force(Reachability::Public);
        r.on_probe(false);
        r.on_probe(false);
        assert_eq!(r.status(), Reachability::Public);
        assert!(!r.wants_relays(1_000_000));
    }

    #[test]
    fn a_private_node_reserves_up_to_its_relays_and_retries_failed_ones_later() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut r = reach();
        // Unknown and young: no reservation yet.
        assert!(r.reserve(1_000, &[1, 2, 3], &mut rng).is_empty());
        r.on_probe(false);
        let asked = r.reserve(1_000, &[1, 2, 3], &mut rng);
        assert_eq!(asked.len(), 2);
        // Asked ones are not asked again while pending.
        assert!(r.reserve(1_100, &[1, 2, 3], &mut rng).is_empty());
        assert!(r.on_reserved(asked[0]));
        r.on_failed(asked[1], 1_200, &mut rng);
        // The failed relay backs off; the third is asked instead.
        let third: Vec<u32> = [1, 2, 3]
            .into_iter()
            .filter(|p| !asked.contains(p))
            .collect();
        assert_eq!(r.reserve(1_300, &[1, 2, 3], &mut rng), third);
        assert_eq!(r.held(), vec![asked[0]]);
        // An unanswered request times out and frees its slot; a late answer is refused.
        let later = 1_300 + ReachConfig::default().reserve_timeout_ms;
        assert_eq!(r.expire(later, &mut rng), third);
        assert!(!r.on_reserved(third[0]));
        let again = r.reserve(later, &[1, 2, 3], &mut rng);
        assert_eq!(
            again,
            vec![asked[1]],
            "the back-off has passed, the third timed out"
        );
    }

    #[test]
    fn only_a_relay_asked_and_not_found_at_its_address_is_charged() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut r = reach();
        r.on_probe(false);
        let asked = r.reserve(1_000, &[1, 2], &mut rng);
        assert_eq!(asked.len(), 2);
        assert!(r.on_reserved(asked[0]));
        // Held: a relay that stops serving later is not lying about serving.
        assert!(!r.on_false_relay(asked[0], 1_100, &mut rng));
        assert_eq!(r.held(), vec![asked[0]], "the held reservation stands");
        // Never asked: nothing to charge.
        assert!(!r.on_false_relay(9, 1_100, &mut rng));
        assert_eq!(r.asked_at(&asked[1]), Some(1_000));
        assert_eq!(r.asked_at(&asked[0]), None, "granted");
        // Asked and nobody there: charged once, the request failed and backs off.
        assert!(r.on_false_relay(asked[1], 1_100, &mut rng));
        assert_eq!(r.asked_at(&asked[1]), None);
        assert!(
            !r.on_false_relay(asked[1], 1_200, &mut rng),
            "once per request"
        );
        assert!(
            r.reserve(1_300, &[1, 2], &mut rng).is_empty(),
            "backing off"
        );
    }

    #[test]
    fn an_unknown_node_reserves_after_its_grace_and_a_public_one_never() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut r = reach();
        let grace = ReachConfig::default().unknown_grace_ms;
        assert!(r.reserve(grace - 1, &[7], &mut rng).is_empty());
        assert_eq!(r.reserve(grace, &[7], &mut rng), vec![7]);
        let mut public = reach();
        public.set_confirmed(1);
        assert!(public.reserve(grace * 10, &[7], &mut rng).is_empty());
    }
}
