//! Shares of inbound connections per source address: one host (an IPv4 address, an IPv6
//! /64) and one subnet (an IPv4 /24, an IPv6 /48: one operator's block) may hold only so
//! many of a node's inbound connections, in their handshake and established together. A
//! stranger can make keys without end, but addresses cost it something: this is what keeps
//! a single machine, or a single rented block, from taking every slot a node has.
//!
//! A connection past its source's share is not simply refused: it may finish its handshake
//! to hear a goodbye with referrals (several honest nodes behind one NAT must not strand
//! the ones past the share), while the handshakes one host may have in flight stay bounded.
//!
//! Pure bookkeeping keyed by the driver's connection id; the driver decides which
//! connections are subject to it (not those from this machine, nor relayed ones, whose
//! address is the relay's).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use crate::UnixMillis;

/// The unit one host is limited by: an IPv4 address, or the /64 an IPv6 host usually holds.
pub fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

/// The block one operator is limited by: an IPv4 /24 or an IPv6 /48.
pub fn subnet_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & !0xff).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
    }
}

/// How many inbound connections one source may hold.
#[derive(Debug, Clone, Copy)]
pub struct SharesConfig {
    /// In their handshake from one host at once.
    pub pending_per_host: usize,
    /// From one host, in their handshake or established.
    pub per_host: usize,
    /// From one subnet, in their handshake or established.
    pub per_subnet: usize,
}

/// Why an inbound connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShareRefusal {
    /// Its host has this many connections in their handshake already.
    #[error("{0} already has {1} connections in their handshake")]
    PendingPerHost(IpAddr, usize),
    /// Its host holds this many inbound connections already.
    #[error("{0} already holds {1} inbound connections")]
    PerHost(IpAddr, usize),
    /// Its subnet holds this many inbound connections already.
    #[error("the subnet {0} already holds {1} inbound connections")]
    PerSubnet(IpAddr, usize),
}

impl ShareRefusal {
    /// Every [`Self::reason`].
    pub const REASONS: [&'static str; 3] =
        ["pending_per_ip", "inbound_per_ip", "inbound_per_subnet"];

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PendingPerHost(..) => "pending_per_ip",
            Self::PerHost(..) => "inbound_per_ip",
            Self::PerSubnet(..) => "inbound_per_subnet",
        }
    }
}

/// What [`InboundShares::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within its source's share: counted.
    Counted,
    /// Past its source's share: it may finish its handshake only to hear a goodbye with
    /// referrals (counted as pending until it settles, not as held).
    OverShare(ShareRefusal),
    /// Refused before its handshake: its host has its share of handshakes in flight.
    Refused(ShareRefusal),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    host: IpAddr,
    subnet: IpAddr,
    established: bool,
    /// Admitted past its share: not counted as held.
    over_share: bool,
}

/// The inbound connections held per host and subnet.
#[derive(Debug)]
pub struct InboundShares<C> {
    config: SharesConfig,
    conns: HashMap<C, Entry>,
    pending: HashMap<IpAddr, usize>,
    hosts: HashMap<IpAddr, usize>,
    subnets: HashMap<IpAddr, usize>,
}

fn inc(map: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    *map.entry(key).or_default() += 1;
}

fn dec(map: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl<C: Eq + Hash> InboundShares<C> {
    /// Nothing held yet.
    pub fn new(config: SharesConfig) -> Self {
        Self {
            config,
            conns: HashMap::new(),
            pending: HashMap::new(),
            hosts: HashMap::new(),
            subnets: HashMap::new(),
        }
    }

    /// A connection from `ip` starts its handshake: counted within its source's share,
    /// admitted past it to hear referrals, or refused (then nothing is counted).
    pub fn admit(&mut self, conn: C, ip: IpAddr) -> Admission {
        let (host, subnet) = (host_of(ip), subnet_of(ip));
        let count = |map: &HashMap<IpAddr, usize>, key| map.get(&key).copied().unwrap_or(0);
        let pending = count(&self.pending, host);
        if pending >= self.config.pending_per_host {
            return Admission::Refused(ShareRefusal::PendingPerHost(host, pending));
        }
        let (hosts, subnets) = (count(&self.hosts, host), count(&self.subnets, subnet));
        let over = if hosts >= self.config.per_host {
            Some(ShareRefusal::PerHost(host, hosts))
        } else if subnets >= self.config.per_subnet {
            Some(ShareRefusal::PerSubnet(subnet, subnets))
        } else {
            None
        };
        let entry = Entry {
            host,
            subnet,
            established: false,
            over_share: over.is_some(),
        };
        if let Some(old) = self.conns.insert(conn, entry) {
            // The driver reused an id it never released: forget the old one's counts.
            self.release(old);
        }
        inc(&mut self.pending, host);
        match over {
            Some(refusal) => Admission::OverShare(refusal),
            None => {
                inc(&mut self.hosts, host);
                inc(&mut self.subnets, subnet);
                Admission::Counted
            }
        }
    }

    /// Whether `conn` was admitted past its source's share (the driver sends it away).
    pub fn is_over_share(&self, conn: &C) -> bool {
        self.conns.get(conn).is_some_and(|e| e.over_share)
    }

    /// The connection finished its handshake: it no longer counts as pending (one let in
    /// past its share does until it closes: the host's pending share also bounds how many of
    /// those it can hold while they hear their goodbye).
    pub fn established(&mut self, conn: &C) {
        if let Some(entry) = self.conns.get_mut(conn) {
            if !entry.established && !entry.over_share {
                entry.established = true;
                dec(&mut self.pending, entry.host);
            }
        }
    }

    /// The connection failed its handshake or closed: its share is free again.
    pub fn closed(&mut self, conn: &C) {
        if let Some(entry) = self.conns.remove(conn) {
            self.release(entry);
        }
    }

    fn release(&mut self, entry: Entry) {
        if !entry.established || entry.over_share {
            dec(&mut self.pending, entry.host);
        }
        if !entry.over_share {
            dec(&mut self.hosts, entry.host);
            dec(&mut self.subnets, entry.subnet);
        }
    }
}

/// Handshakes from one host that ended with a banned peer, past which the host is refused
/// before its handshakes ([`Strikes`]).
const FREE_STRIKES: u32 = 3;
/// A host's strikes are forgotten after this long without a new one, counted from the end
/// of its hold (a strike right after the longest hold keeps it at the longest).
const STRIKE_WINDOW_MS: u64 = 60_000;
/// How long the first refusal lasts; each further strike doubles it, up to the most.
const FIRST_HOLD_MS: u64 = 1_000;
const MOST_HOLD_MS: u64 = 60_000;
/// Hosts whose strikes are remembered at once.
const MAX_STRUCK_HOSTS: usize = 4_096;

#[derive(Debug, Clone, Copy)]
struct Struck {
    count: u32,
    last: UnixMillis,
    held_until: UnixMillis,
}

/// Hosts that keep sending banned peers. A banned peer is known only once its handshake is
/// done, and a handshake costs its receiver as much as its sender (a key exchange and a
/// signature each way): a banned peer that dials again and again, or a host that makes a new
/// key for every connection that gets banned, costs the node a handshake each time. Past
/// [`FREE_STRIKES`] such handshakes within a minute, the host's connections are refused before
/// their handshake (an accept and a close) for a second, doubling with each further strike up
/// to a minute. Honest peers behind the same address are refused with it for that while;
/// they still dial out, and others still dial them.
#[derive(Debug, Default)]
pub struct Strikes {
    hosts: HashMap<IpAddr, Struck>,
}

impl Strikes {
    /// Counts a handshake from `ip` that ended with a banned peer.
    pub fn strike(&mut self, ip: IpAddr, now: UnixMillis) {
        let host = host_of(ip);
        if !self.hosts.contains_key(&host) && self.hosts.len() >= MAX_STRUCK_HOSTS {
            self.hosts
                .retain(|_, s| now.saturating_sub(s.last) < STRIKE_WINDOW_MS);
            if self.hosts.len() >= MAX_STRUCK_HOSTS {
                // Still full: the one struck longest ago makes room.
                if let Some(oldest) = self
                    .hosts
                    .iter()
                    .min_by_key(|(_, s)| s.last)
                    .map(|(h, _)| *h)
                {
                    self.hosts.remove(&oldest);
                }
            }
        }
        let struck = self.hosts.entry(host).or_insert(Struck {
            count: 0,
            last: now,
            held_until: 0,
        });
        if now.saturating_sub(struck.last.max(struck.held_until)) >= STRIKE_WINDOW_MS {
            struck.count = 0;
        }
        struck.count += 1;
        struck.last = now;
        if struck.count > FREE_STRIKES {
            let doublings = (struck.count - FREE_STRIKES - 1).min(16);
            let hold = (FIRST_HOLD_MS << doublings).min(MOST_HOLD_MS);
            struck.held_until = struck.held_until.max(now + hold);
        }
    }

    /// Whether a connection from `ip` may start its handshake at `now`.
    pub fn admits(&self, ip: IpAddr, now: UnixMillis) -> bool {
        self.hosts
            .get(&host_of(ip))
            .is_none_or(|s| s.held_until <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: SharesConfig = SharesConfig {
        pending_per_host: 2,
        per_host: 3,
        per_subnet: 5,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn hosts_and_subnets_hold_their_share_and_no_more() {
        let mut s = InboundShares::new(CONFIG);
        let a = ip("192.0.2.7");
        assert_eq!(s.admit(1, a), Admission::Counted);
        assert_eq!(s.admit(2, a), Admission::Counted);
        assert_eq!(
            s.admit(3, a),
            Admission::Refused(ShareRefusal::PendingPerHost(a, 2))
        );
        s.established(&1);
        s.established(&2);
        s.established(&2); // twice counts once
        assert_eq!(s.admit(3, a), Admission::Counted);
        s.established(&3);
        // Past the host's share: admitted to hear referrals, never held; its handshake
        // still counts against the host's pending ones.
        let over = Admission::OverShare(ShareRefusal::PerHost(a, 3));
        assert_eq!(s.admit(4, a), over);
        assert!(s.is_over_share(&4) && !s.is_over_share(&3));
        assert_eq!(s.admit(5, a), over);
        assert!(matches!(
            s.admit(6, a),
            Admission::Refused(ShareRefusal::PendingPerHost(..))
        ));
        s.established(&4);
        s.established(&5);
        assert!(
            matches!(
                s.admit(6, a),
                Admission::Refused(ShareRefusal::PendingPerHost(..))
            ),
            "those past the share count as pending until they close"
        );
        s.closed(&4);
        s.closed(&5);
        // The same /24 from other hosts: two more, then the subnet is full.
        assert_eq!(s.admit(4, ip("192.0.2.8")), Admission::Counted);
        assert_eq!(s.admit(5, ip("192.0.2.9")), Admission::Counted);
        let Admission::OverShare(refused) = s.admit(6, ip("192.0.2.10")) else {
            panic!("the subnet is full")
        };
        assert_eq!(refused, ShareRefusal::PerSubnet(ip("192.0.2.0"), 5));
        assert_eq!(refused.reason(), "inbound_per_subnet");
        s.closed(&6);
        // Another subnet is not affected; a close frees a share.
        assert_eq!(s.admit(6, ip("198.51.100.1")), Admission::Counted);
        s.closed(&1);
        assert_eq!(s.admit(7, a), Admission::Counted);
        s.established(&7);
        assert!(matches!(s.admit(8, a), Admission::OverShare(..)));
        for c in 1..=8 {
            s.closed(&c);
        }
        assert!(s.conns.is_empty());
        assert!(s.pending.is_empty() && s.hosts.is_empty() && s.subnets.is_empty());
    }

    #[test]
    fn a_host_that_keeps_sending_banned_peers_is_refused_for_a_doubling_while() {
        let mut strikes = Strikes::default();
        let (bad, other) = (ip("203.0.113.7"), ip("203.0.113.8"));
        for t in 0..3 {
            strikes.strike(bad, t * 1_000);
            assert!(strikes.admits(bad, t * 1_000), "the first three are free");
        }
        strikes.strike(bad, 3_000);
        assert!(!strikes.admits(bad, 3_500));
        assert!(strikes.admits(bad, 4_000), "held for a second");
        assert!(strikes.admits(other, 3_500), "another host is not");
        strikes.strike(bad, 4_000);
        assert!(!strikes.admits(bad, 5_999));
        assert!(strikes.admits(bad, 6_000), "then two");
        for t in 0..20 {
            strikes.strike(bad, 6_000 + t);
        }
        assert!(!strikes.admits(bad, 6_019 + 59_999));
        let free = 6_019 + 60_000;
        assert!(strikes.admits(bad, free), "a minute at most");
        // Back at once after the longest hold: held for another minute, not let off.
        strikes.strike(bad, free + 100);
        assert!(!strikes.admits(bad, free + 100 + 59_999));
        // A minute without strikes after the hold: it starts again from nothing.
        let later = free + 100 + 60_000 + 60_000;
        strikes.strike(bad, later);
        assert!(strikes.admits(bad, later));
        // An IPv6 host is its /64: a new address in it is the same host.
        let v6 = ip("2001:db8::1");
        for t in 0..4 {
            strikes.strike(v6, t);
        }
        assert!(!strikes.admits(ip("2001:db8::ffff"), 10));
        assert!(strikes.admits(ip("2001:db8:0:1::1"), 10));
    }

    #[test]
    fn an_ipv6_host_is_its_64_and_a_subnet_its_48() {
        assert_eq!(
            host_of(ip("2001:db8:1:2:aaaa::1")),
            ip("2001:db8:1:2::"),
            "one /64"
        );
        assert_eq!(subnet_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1::"));
        assert_eq!(subnet_of(ip("203.0.113.77")), ip("203.0.113.0"));
        let mut s = InboundShares::new(CONFIG);
        for c in 1..=3 {
            assert_eq!(
                s.admit(c, ip(&format!("2001:db8:1:2::{c}"))),
                Admission::Counted
            );
            s.established(&c);
        }
        assert!(matches!(
            s.admit(4, ip("2001:db8:1:2:ffff::9")),
            Admission::OverShare(ShareRefusal::PerHost(..))
        ));
        assert_eq!(s.admit(5, ip("2001:db8:1:3::1")), Admission::Counted);
    }
}
