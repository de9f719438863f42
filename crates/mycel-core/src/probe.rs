//! Probes of peers held alive without a connection (SWIM's periodic probe of a random member).
//!
//! Pings watch connected peers only. A peer held alive on the strength of its announcement,
//! with no connection from this node, would otherwise stay alive here until the announcement
//! expires (90 s, stretched in large networks) however long it has been gone: after a
//! partition, a peer that kept no connection into this node's half is missed by nobody there,
//! so nobody reports it. [`Prober`] picks such peers now and then and the driver dials each
//! one at the addresses it signed; a dial nobody answers fails the peer **here only**
//! ([`crate::membership::FailReason::Unanswered`]): nothing is published, nothing counts
//! toward anyone's quorum of down reports, and any later contact revives it.
//!
//! What keeps it safe among hostile peers:
//! - whom to probe comes from this node's table and its seeded random source; a counted down
//!   report may add one probe of the peer it names ([`Prober::suspect`], on a budget of one
//!   a second), which can only ever fail that peer here; an alert (one of this node's own
//!   connections went silent) raises the pace for a bounded number of probes;
//! - peers this node has dialled and reached are probed before strangers, so a flood of new
//!   keys cannot crowd them out, and the pace, the probes in flight and the records kept are
//!   all bounded;
//! - a probe dials only what the peer itself signed, and only addresses this node can reach
//!   directly ([`probe_addrs`]): a peer reachable only through a relay or a NAT is never
//!   failed for silence at addresses it could not answer on;
//! - a probe that could not run properly (this node stalled, or heard from no peer at all
//!   meanwhile, its own limits refused the dial, another peer answered) proves nothing and is
//!   retried later.
//!
//! Pure: time and the random source are passed in.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use rand::Rng;

use crate::inbound::subnet_of;
use crate::reach::{is_global_ip, Reachability};
use crate::UnixMillis;

/// Probe pacing and bounds.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// One probe per this long while nothing is wrong.
    pub quiet_interval_ms: u64,
    /// One probe per this long during an alert.
    pub alert_interval_ms: u64,
    /// How long an alert lasts after its last trigger.
    pub alert_ms: u64,
    /// Probes started in one step at most (the token bucket's size: no bursts after a pause).
    pub max_per_step: usize,
    /// Probes in flight at most (0: probing off).
    pub max_in_flight: usize,
    /// A peer is not picked again within this after its last probe.
    pub cooldown_ms: u64,
    /// ... or within this after a probe that proved nothing.
    pub retry_ms: u64,
    /// A probe with no outcome after this long is released (it proved nothing).
    pub deadline_ms: u64,
    /// Steps further apart than this mean this node itself stalled: probes in flight then
    /// prove nothing.
    pub stall_ms: u64,
    /// Per-peer records kept at most.
    pub max_tracked: usize,
    /// Probes an alert may add before the pace falls back to quiet (an alert of every node
    /// at once must not become a storm of handshakes in a large network).
    pub alert_probes: usize,
    /// One probe of a peer named by a counted down report per this long at most.
    pub suspect_interval_ms: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            quiet_interval_ms: 60_000,
            alert_interval_ms: 500,
            alert_ms: 30_000,
            max_per_step: 2,
            max_in_flight: 4,
            cooldown_ms: 30_000,
            retry_ms: 5_000,
            deadline_ms: 15_000,
            stall_ms: 3_000,
            max_tracked: 4_096,
            alert_probes: 24,
            suspect_interval_ms: 1_000,
        }
    }
}

/// A peer that may be probed, as membership sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<P> {
    /// The peer.
    pub peer: P,
    /// The sequence number of its announcement held now (a newer one during the probe
    /// refutes its silence).
    pub seq: u64,
    /// Whether this node has dialled it and got through.
    pub met: bool,
    /// Where to dial it (from [`probe_addrs`]).
    pub addrs: Vec<String>,
}

/// What the driver saw of one probe dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A connection to the peer was established.
    Answered,
    /// Every address tried refused the dial outright: the path works, nobody listens.
    Refused,
    /// Every address tried refused the dial or let it time out, some timed out.
    Unanswered,
    /// Anything else: this node's own limits, another peer answering, a reset.
    Inconclusive,
}

/// A settled probe, for the driver to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered.
    Answered,
    /// Nobody answered while this node was running: fail the peer here if its announcement
    /// is still the one with this sequence number.
    Unanswered {
        /// The sequence number held when it was picked.
        seq: u64,
    },
    /// It proved nothing; the peer is retried sooner.
    Inconclusive,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    started: UnixMillis,
    seq: u64,
    stalled: bool,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    picked: UnixMillis,
    /// Probes in a row that proved nothing (each doubles the wait, up to the cooldown).
    inconclusive: u32,
}

/// One probe's worth of [`Prober`]'s credit.
const TOKEN: u64 = 1_000_000;

/// Peers named by reports waiting for their probe, at most.
const MAX_SUSPECTS: usize = 16;

/// A peer named by a report is probed within this or not at all.
pub const SUSPECT_TTL_MS: u64 = 10_000;

/// `credit` plus what `elapsed` earns at one token per `interval`.
fn earn(credit: u64, elapsed: u64, interval: u64) -> u64 {
    let earned = u128::from(elapsed) * u128::from(TOKEN) / u128::from(interval.max(1));
    credit.saturating_add(u64::try_from(earned).unwrap_or(u64::MAX))
}

/// Which alive, unconnected peers to probe and when. See the module docs.
#[derive(Debug)]
pub struct Prober<P> {
    config: ProbeConfig,
    flights: HashMap<P, Flight>,
    records: HashMap<P, Record>,
    /// Probes that may start, in millionths.
    credit: u64,
    last_step: Option<UnixMillis>,
    alert_since: UnixMillis,
    alert_until: UnixMillis,
    /// Probes picked during the current alert.
    alert_picks: usize,
    /// Peers named by counted down reports, to probe once soon, and when they were named.
    suspects: Vec<(P, UnixMillis)>,
    /// Suspect probes that may start, in millionths.
    suspect_credit: u64,
    /// When this node last heard from any peer (a pong, a new connection): silence counts
    /// only while this node itself can hear (its own network may be down).
    last_contact: Option<UnixMillis>,
}

impl<P: Eq + Hash + Clone> Prober<P> {
    /// A prober with no probe made yet.
    pub fn new(config: ProbeConfig) -> Self {
        Self {
            config,
            flights: HashMap::new(),
            records: HashMap::new(),
            // Nothing to probe at start: a node that just started has met nobody yet.
            credit: 0,
            last_step: None,
            alert_since: 0,
            alert_until: 0,
            alert_picks: 0,
            suspects: Vec::new(),
            suspect_credit: TOKEN,
            last_contact: None,
        }
    }

    /// A counted down report names `peer`: probe it once soon, if it is still held alive
    /// without a connection by then (at most one such probe per
    /// [`ProbeConfig::suspect_interval_ms`], a few waiting at most, none older than
    /// [`SUSPECT_TTL_MS`]). A report may choose this target because an unanswered probe is
    /// this node's view alone: it is published nowhere and counts toward no quorum.
    pub fn suspect(&mut self, peer: P, now: UnixMillis) {
        if self.config.max_in_flight == 0 || self.suspects.iter().any(|(p, _)| *p == peer) {
            return;
        }
        if self.suspects.len() >= MAX_SUSPECTS {
            self.suspects.remove(0);
        }
        self.suspects.push((peer, now));
    }

    /// This node heard from a peer (a ping answered, a connection established).
    pub fn heard(&mut self, now: UnixMillis) {
        self.last_contact = Some(now);
    }

    /// Whether this node heard from a peer at `at` or later (its own network worked then).
    pub fn heard_since(&self, at: UnixMillis) -> bool {
        self.last_contact.is_some_and(|c| c >= at)
    }

    /// One of this node's own connections went silent (a partition, a machine gone): probe
    /// faster, for at most [`ProbeConfig::alert_probes`] probes. It names no peer.
    pub fn alert(&mut self, now: UnixMillis) {
        if self.config.max_in_flight == 0 {
            return;
        }
        if !self.alerted(now) {
            self.alert_since = now;
            self.alert_picks = 0;
            // An alert starts with a probe at once.
            self.credit = self.credit.max(TOKEN);
        }
        self.alert_until = now.saturating_add(self.config.alert_ms);
    }

    /// Whether an alert is on.
    pub fn alerted(&self, now: UnixMillis) -> bool {
        now < self.alert_until
    }

    /// Probes in flight.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Whether a probe of `peer` is in flight.
    pub fn probing(&self, peer: &P) -> bool {
        self.flights.contains_key(peer)
    }

    fn stalled(&self, now: UnixMillis) -> bool {
        self.last_step
            .is_some_and(|last| now.saturating_sub(last) > self.config.stall_ms)
    }

    /// Advances the clock (call once per tick): marks flights a stall of this node spoiled,
    /// releases those past their deadline (returned: they proved nothing) and refills the
    /// pace. Returns how many probes may start now; when it is 0 there is no need to gather
    /// candidates.
    pub fn advance(&mut self, now: UnixMillis) -> (usize, Vec<P>) {
        if self.config.max_in_flight == 0 {
            return (0, Vec::new());
        }
        if self.stalled(now) {
            for flight in self.flights.values_mut() {
                flight.stalled = true;
            }
        }
        let deadline = self.config.deadline_ms;
        let expired: Vec<P> = self
            .flights
            .iter()
            .filter(|(_, f)| now.saturating_sub(f.started) >= deadline)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in &expired {
            self.flights.remove(peer);
            self.mark_retry(peer, now);
        }
        let interval = if self.fast(now) {
            self.config
                .alert_interval_ms
                .min(self.config.quiet_interval_ms)
        } else {
            self.config.quiet_interval_ms
        };
        let elapsed = self.last_step.map_or(0, |last| now.saturating_sub(last));
        let cap = self.config.max_per_step as u64 * TOKEN;
        self.credit = earn(self.credit, elapsed, interval).min(cap);
        self.suspect_credit = earn(
            self.suspect_credit,
            elapsed,
            self.config.suspect_interval_ms,
        )
        .min(cap);
        self.last_step = Some(now);
        self.suspects
            .retain(|(_, at)| now.saturating_sub(*at) < SUSPECT_TTL_MS);
        let suspects = if self.suspects.is_empty() {
            0
        } else {
            self.suspect_credit / TOKEN
        };
        let slots = self.config.max_in_flight.saturating_sub(self.flights.len());
        (
            ((self.credit / TOKEN + suspects) as usize).min(slots),
            expired,
        )
    }

    /// Whether probes go at the alert pace: during an alert, until it spent its probes.
    fn fast(&self, now: UnixMillis) -> bool {
        self.alerted(now) && self.alert_picks < self.config.alert_probes
    }

    /// Picks up to `want` (from [`Prober::advance`]) of `candidates` to probe now and records
    /// them in flight: peers met before first, uniformly at random within each tier, none
    /// picked again within its cooldown.
    pub fn pick(
        &mut self,
        now: UnixMillis,
        want: usize,
        candidates: Vec<Candidate<P>>,
        rng: &mut impl Rng,
    ) -> Vec<Candidate<P>> {
        if want == 0 {
            return Vec::new();
        }
        let alerted = self.alerted(now);
        let mut candidates: Vec<Candidate<P>> = candidates
            .into_iter()
            .filter(|c| !c.addrs.is_empty() && !self.flights.contains_key(&c.peer))
            .collect();
        // Peers named by reports first, whatever their cooldown, on their own budget.
        let mut picks = Vec::new();
        let suspects = std::mem::take(&mut self.suspects);
        for (peer, at) in suspects {
            let found = candidates.iter().position(|c| c.peer == peer);
            match found {
                Some(i) if picks.len() < want && self.suspect_credit >= TOKEN => {
                    self.suspect_credit -= TOKEN;
                    picks.push(candidates.swap_remove(i));
                }
                // Waits for the budget, or until the peer is a candidate again (the driver
                // leaves out peers it is dialling anyway), at most until its time is up.
                _ => self.suspects.push((peer, at)),
            }
        }
        let regular = (want - picks.len()).min((self.credit / TOKEN) as usize);
        let (mut met, mut strangers): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .filter(|c| self.due(&c.peer, now, alerted))
            .partition(|c| c.met);
        let mut chosen = Vec::new();
        for tier in [&mut met, &mut strangers] {
            // A partial Fisher-Yates: the first `take` places hold a uniform sample.
            let take = (regular - chosen.len()).min(tier.len());
            for i in 0..take {
                let j = rng.gen_range(i..tier.len());
                tier.swap(i, j);
            }
            chosen.extend(tier.drain(..take));
        }
        self.credit = self.credit.saturating_sub(chosen.len() as u64 * TOKEN);
        if alerted {
            self.alert_picks += chosen.len();
        }
        picks.extend(chosen);
        for c in &picks {
            self.flights.insert(
                c.peer.clone(),
                Flight {
                    started: now,
                    seq: c.seq,
                    stalled: false,
                },
            );
            self.records
                .entry(c.peer.clone())
                .and_modify(|r| r.picked = now)
                .or_insert(Record {
                    picked: now,
                    inconclusive: 0,
                });
        }
        self.prune(now);
        picks
    }

    fn due(&self, peer: &P, now: UnixMillis, alerted: bool) -> bool {
        if self.flights.contains_key(peer) {
            return false;
        }
        let Some(record) = self.records.get(peer) else {
            return true;
        };
        // During an alert, an answer from before it began says nothing about now.
        if alerted && record.picked < self.alert_since {
            return true;
        }
        let cooldown = match record.inconclusive {
            0 => self.config.cooldown_ms,
            n => self
                .config
                .retry_ms
                .saturating_mul(1 << (n - 1).min(16))
                .min(self.config.cooldown_ms),
        };
        now.saturating_sub(record.picked) >= cooldown
    }

    /// The probe of `peer` proved nothing: it is due again [`ProbeConfig::retry_ms`] from now,
    /// twice that after a second such probe in a row, and so on up to the cooldown.
    fn mark_retry(&mut self, peer: &P, now: UnixMillis) {
        if let Some(record) = self.records.get_mut(peer) {
            record.picked = now;
            record.inconclusive = record.inconclusive.saturating_add(1);
        }
    }

    /// Forgets records past their cooldown once there are too many, then the oldest.
    fn prune(&mut self, now: UnixMillis) {
        if self.records.len() <= self.config.max_tracked {
            return;
        }
        let cooldown = self.config.cooldown_ms;
        let flights = &self.flights;
        self.records.retain(|peer, r| {
            flights.contains_key(peer) || now.saturating_sub(r.picked) < cooldown
        });
        if self.records.len() > self.config.max_tracked {
            let mut ages: Vec<(UnixMillis, P)> = self
                .records
                .iter()
                .filter(|(p, _)| !self.flights.contains_key(*p))
                .map(|(p, r)| (r.picked, p.clone()))
                .collect();
            ages.sort_unstable_by_key(|(picked, _)| *picked);
            let excess = self.records.len() - self.config.max_tracked;
            for (_, peer) in ages.into_iter().take(excess) {
                self.records.remove(&peer);
            }
        }
    }

    /// The outcome of the probe of `peer`; `None` when none was in flight (already settled,
    /// released, or never started).
    pub fn settle(&mut self, peer: &P, outcome: Outcome, now: UnixMillis) -> Option<Verdict> {
        let flight = self.flights.remove(peer)?;
        // A node that did not run while it waited cannot blame the peer for the silence.
        let stalled = flight.stalled || self.stalled(now);
        // Nor can a node that heard from nobody since the probe began (its own network may be
        // what is down).
        let deaf = self.last_contact.is_none_or(|at| at < flight.started);
        // (A refusal is an answer from the peer's host: it proves the path works.)
        let verdict = match outcome {
            Outcome::Answered => Verdict::Answered,
            Outcome::Refused if !stalled => Verdict::Unanswered { seq: flight.seq },
            Outcome::Unanswered if !stalled && !deaf => Verdict::Unanswered { seq: flight.seq },
            Outcome::Refused | Outcome::Unanswered | Outcome::Inconclusive => Verdict::Inconclusive,
        };
        if verdict == Verdict::Inconclusive {
            self.mark_retry(peer, now);
        } else if let Some(record) = self.records.get_mut(peer) {
            record.inconclusive = 0;
        }
        if verdict == Verdict::Answered {
            self.heard(now);
        }
        Some(verdict)
    }
}

/// Where this node stands, to tell which of a peer's addresses it can dial directly.
#[derive(Debug, Clone, Default)]
pub struct Vantage {
    /// The subnets (IPv4 /24, IPv6 /48) of this node's own non-loopback addresses.
    pub subnets: Vec<IpAddr>,
    /// Every address this node listens on is on this host (loopback or in memory).
    pub local_only: bool,
    /// This node has a non-loopback IPv4 address.
    pub v4: bool,
    /// This node has a non-loopback IPv6 address.
    pub v6: bool,
}

impl Vantage {
    /// The vantage of a node with these addresses (multiaddr strings).
    pub fn of<'a>(own: impl IntoIterator<Item = &'a str>) -> Self {
        let mut subnets = Vec::new();
        let (mut local_only, mut v4, mut v6) = (true, false, false);
        for addr in own {
            match parse(addr).host {
                Host::Ip(ip) if !ip.is_loopback() && !ip.is_unspecified() => {
                    local_only = false;
                    v4 |= ip.is_ipv4();
                    v6 |= ip.is_ipv6();
                    let subnet = subnet_of(ip);
                    if !subnets.contains(&subnet) {
                        subnets.push(subnet);
                    }
                }
                Host::Ip(_) | Host::Memory => {}
                Host::Dns | Host::Other => local_only = false,
            }
        }
        Self {
            subnets,
            local_only,
            v4,
            v6,
        }
    }
}

/// The addresses of a peer (as it announced them) that a probe from `vantage` may dial: the
/// best stream (TCP, memory) one and the best other (QUIC) one, global addresses before
/// private ones; none when silence there would prove nothing:
/// - a peer that announced it is private, or any relayed address, may be reachable only
///   through a relay;
/// - a global IP is dialable from anywhere (of a family this node has); a private one only
///   from the same subnet, and only when the peer has no global address (another network's
///   192.168.1.5 or 172.17.0.2 is somebody else); loopback and in-memory addresses only from
///   a node kept to this host itself; a DNS name only when the peer says it is public;
///   link-local never.
///
/// A firewall may drop one transport and not the other: with one address of each, silence
/// must be on both.
pub fn probe_addrs(addrs: &[String], reachability: Reachability, vantage: &Vantage) -> Vec<String> {
    if reachability == Reachability::Private {
        return Vec::new();
    }
    let parsed: Vec<(&String, Parsed)> = addrs.iter().map(|a| (a, parse(a))).collect();
    if parsed.iter().any(|(_, p)| p.relayed) {
        return Vec::new();
    }
    // (address, rank: 0 reachable from anywhere it can go, 1 only as a neighbour, stream)
    let family = |ip: IpAddr| if ip.is_ipv4() { vantage.v4 } else { vantage.v6 };
    let mut usable: Vec<(&String, u8, bool)> = parsed
        .into_iter()
        .filter_map(|(a, p)| {
            let rank = match p.host {
                Host::Ip(ip) if ip.is_loopback() => vantage.local_only.then_some(0),
                Host::Ip(ip) if link_local(ip) || ip.is_unspecified() || !family(ip) => None,
                Host::Ip(ip) if is_global_ip(ip) => Some(0),
                Host::Ip(ip) => vantage.subnets.contains(&subnet_of(ip)).then_some(1),
                Host::Memory => vantage.local_only.then_some(0),
                Host::Dns => (reachability == Reachability::Public).then_some(0),
                Host::Other => None,
            };
            rank.map(|rank| (a, rank, p.stream))
        })
        .collect();
    if usable.iter().any(|(_, rank, _)| *rank == 0) {
        usable.retain(|(_, rank, _)| *rank == 0);
    }
    usable.sort_by_key(|(_, rank, stream)| (*rank, !*stream));
    let stream = usable.iter().find(|(.., s)| *s);
    let other = usable.iter().find(|(.., s)| !*s);
    stream
        .into_iter()
        .chain(other)
        .map(|(a, ..)| (*a).clone())
        .collect()
}

fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[derive(Debug, Clone, Copy)]
enum Host {
    Ip(IpAddr),
    Memory,
    Dns,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Parsed {
    host: Host,
    stream: bool,
    relayed: bool,
}

/// The parts of a multiaddr string a probe cares about.
fn parse(addr: &str) -> Parsed {
    let parts: Vec<&str> = addr.split('/').collect();
    let host = match (parts.get(1).copied(), parts.get(2)) {
        (Some("ip4" | "ip6"), Some(ip)) => ip.parse().map_or(Host::Other, Host::Ip),
        (Some("memory"), Some(_)) => Host::Memory,
        (Some("dns" | "dns4" | "dns6"), Some(_)) => Host::Dns,
        _ => Host::Other,
    };
    Parsed {
        host,
        stream: matches!(host, Host::Memory) || parts.contains(&"tcp"),
        relayed: parts.contains(&"p2p-circuit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn candidates(n: u32, met: bool) -> Vec<Candidate<u32>> {
        (0..n)
            .map(|i| Candidate {
                peer: if met { i } else { 100_000 + i },
                seq: 1,
                met,
                addrs: vec!["/ip4/1.2.3.4/tcp/1".into()],
            })
            .collect()
    }

    fn peers(picks: &[Candidate<u32>]) -> Vec<u32> {
        picks.iter().map(|c| c.peer).collect()
    }

    /// Runs `secs` seconds of 100 ms steps, settling every probe as answered at once.
    fn run(prober: &mut Prober<u32>, rng: &mut StdRng, from: u64, secs: u64) -> Vec<u32> {
        let mut picked = Vec::new();
        for step in 0..secs * 10 {
            let now = from + step * 100;
            let (want, _) = prober.advance(now);
            let picks = prober.pick(now, want, candidates(20, true), rng);
            for c in &picks {
                prober.settle(&c.peer, Outcome::Answered, now);
            }
            picked.extend(peers(&picks));
        }
        picked
    }

    #[test]
    fn picks_are_seeded_and_held_to_the_pace_and_the_slots() {
        let pick_all = |seed| {
            let mut prober = Prober::new(ProbeConfig {
                quiet_interval_ms: 10_000,
                ..Default::default()
            });
            run(&mut prober, &mut StdRng::seed_from_u64(seed), 0, 60)
        };
        let picked = pick_all(7);
        assert_eq!(picked, pick_all(7), "the same seed replays the same probes");
        // Quiet: one per 10 s.
        assert_eq!(picked.len(), 5, "{picked:?}");
        let mut prober = Prober::new(ProbeConfig::default());
        let picked = run(&mut prober, &mut StdRng::seed_from_u64(7), 0, 130);
        assert_eq!(picked.len(), 2, "one a minute by default");
        // During an alert: two a second at most.
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(1);
        prober.alert(0);
        let picked = run(&mut prober, &mut rng, 0, 10);
        assert_eq!(picked.len(), 20);
        // Probes that never settle: four in flight at most.
        let mut prober = Prober::new(ProbeConfig::default());
        prober.alert(0);
        let mut in_flight = 0;
        for step in 0..50 {
            let (want, _) = prober.advance(step * 100);
            in_flight += prober
                .pick(step * 100, want, candidates(20, true), &mut rng)
                .len();
            assert!(prober.in_flight() <= 4);
        }
        assert_eq!(in_flight, 4);
    }

    #[test]
    fn every_candidate_is_probed_once_before_any_twice() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(3);
        prober.alert(0);
        // 20 candidates at 2/s: all covered in 10 s, none twice within the 30 s cooldown.
        let picked = run(&mut prober, &mut rng, 0, 10);
        let mut distinct = picked.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 20, "{picked:?}");
        assert_eq!(picked.len(), 20);
        prober.alert(10_000);
        assert!(run(&mut prober, &mut rng, 10_000, 10).is_empty());
    }

    #[test]
    fn an_alert_makes_peers_probed_before_it_due_again_once() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(4);
        prober.alert(0);
        assert_eq!(run(&mut prober, &mut rng, 0, 10).len(), 20);
        // The alert ended (30 s after it began); a new one at 45 s makes all 20 due again.
        prober.alert(45_000);
        assert_eq!(run(&mut prober, &mut rng, 45_000, 10).len(), 20);
        // A further trigger within the same alert does not.
        prober.alert(55_000);
        assert!(run(&mut prober, &mut rng, 55_000, 5).is_empty());
    }

    #[test]
    fn peers_met_before_are_probed_before_strangers() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(5);
        prober.alert(0);
        let mut all = candidates(10_000, false);
        all.extend(candidates(5, true));
        let mut picked = Vec::new();
        for step in 0..30 {
            let now = step * 100;
            let (want, _) = prober.advance(now);
            let picks = prober.pick(now, want, all.clone(), &mut rng);
            for c in &picks {
                prober.settle(&c.peer, Outcome::Answered, now);
            }
            picked.extend(peers(&picks));
        }
        assert!(picked.len() > 5);
        let mut first: Vec<u32> = picked[..5].to_vec();
        first.sort_unstable();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn only_a_probe_in_flight_settles_and_only_once() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(6);
        assert_eq!(prober.settle(&1, Outcome::Unanswered, 0), None);
        prober.alert(0);
        let (want, _) = prober.advance(0);
        let picks = prober.pick(0, want, candidates(1, true), &mut rng);
        assert_eq!(peers(&picks), vec![0]);
        prober.heard(1_000);
        assert_eq!(
            prober.settle(&0, Outcome::Unanswered, 2_000),
            Some(Verdict::Unanswered { seq: 1 })
        );
        assert_eq!(prober.settle(&0, Outcome::Unanswered, 2_000), None);
    }

    #[test]
    fn a_probe_that_proved_nothing_is_retried_sooner() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(8);
        prober.alert(0);
        let (want, _) = prober.advance(0);
        assert_eq!(prober.pick(0, want, candidates(1, true), &mut rng).len(), 1);
        // Never settled: released at the deadline, due again 5 s later (not 30 s).
        let mut now = 0;
        let mut released = Vec::new();
        while released.is_empty() {
            now += 500;
            released = prober.advance(now).1;
        }
        assert_eq!((now, released), (15_000, vec![0]));
        let (want, _) = prober.advance(19_000);
        assert!(prober
            .pick(19_000, want, candidates(1, true), &mut rng)
            .is_empty());
        let (want, _) = prober.advance(20_000);
        assert_eq!(
            peers(&prober.pick(20_000, want, candidates(1, true), &mut rng)),
            vec![0]
        );
        assert_eq!(
            prober.settle(&0, Outcome::Inconclusive, 20_100),
            Some(Verdict::Inconclusive)
        );
        // A second one in a row: twice the wait.
        let (want, _) = prober.advance(29_000);
        assert!(prober
            .pick(29_000, want, candidates(1, true), &mut rng)
            .is_empty());
        let (want, _) = prober.advance(30_200);
        assert_eq!(
            peers(&prober.pick(30_200, want, candidates(1, true), &mut rng)),
            vec![0]
        );
    }

    #[test]
    fn silence_while_this_node_heard_from_nobody_proves_nothing() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(11);
        prober.alert(0);
        prober.heard(0);
        for step in 0..=10 {
            prober.advance(step * 500);
        }
        let picks = prober.pick(5_000, 2, candidates(2, true), &mut rng);
        assert_eq!(picks.len(), 2);
        // Heard from nobody since the probes began (this node's own network is down)...
        assert_eq!(
            prober.settle(&picks[0].peer, Outcome::Unanswered, 5_500),
            Some(Verdict::Inconclusive)
        );
        prober.heard(5_600);
        assert_eq!(
            prober.settle(&picks[1].peer, Outcome::Unanswered, 5_700),
            Some(Verdict::Unanswered { seq: 1 })
        );
        // Heard from nobody since this one began either, but a refusal is the peer's host
        // answering: nobody listens there.
        let (want, _) = prober.advance(6_500);
        let picks = prober.pick(6_500, want, candidates(3, true), &mut rng);
        assert_eq!(peers(&picks), vec![2]);
        assert_eq!(
            prober.settle(&2, Outcome::Refused, 6_510),
            Some(Verdict::Unanswered { seq: 1 })
        );
    }

    #[test]
    fn a_peer_named_by_a_report_is_probed_once_soon_on_a_budget_of_its_own() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(12);
        let all = candidates(20, true);
        // Quiet, no credit yet: only the suspect goes, whatever its cooldown.
        prober.suspect(7, 0);
        let (want, _) = prober.advance(0);
        assert_eq!(peers(&prober.pick(0, want, all.clone(), &mut rng)), vec![7]);
        prober.settle(&7, Outcome::Answered, 100);
        prober.suspect(7, 200);
        let (want, _) = prober.advance(200);
        assert!(
            prober.pick(200, want, all.clone(), &mut rng).is_empty(),
            "budget spent"
        );
        let (want, _) = prober.advance(1_200);
        assert_eq!(
            peers(&prober.pick(1_200, want, all.clone(), &mut rng)),
            vec![7]
        );
        // A flood of reports: one probe a second, the rest dropped or expired.
        let mut picked = 0;
        for step in 0..100u64 {
            let now = 2_000 + step * 100;
            prober.suspect((step % 20) as u32, now);
            let (want, _) = prober.advance(now);
            for c in prober.pick(now, want, all.clone(), &mut rng) {
                prober.settle(&c.peer, Outcome::Answered, now);
                picked += 1;
            }
        }
        assert!((9..=12).contains(&picked), "{picked}");
        // A suspect that is no candidate (connected, failed) is not probed; if it becomes one
        // within 10 s it is, after that it is forgotten.
        let mut prober = Prober::new(ProbeConfig::default());
        prober.suspect(99, 0);
        let (want, _) = prober.advance(0);
        assert!(prober.pick(0, want, all.clone(), &mut rng).is_empty());
        let mut more = all.clone();
        more.extend(candidates(100, true).into_iter().filter(|c| c.peer == 99));
        let (want, _) = prober.advance(5_000);
        assert_eq!(
            peers(&prober.pick(5_000, want, more.clone(), &mut rng)),
            vec![99]
        );
        prober.settle(&99, Outcome::Answered, 5_100);
        prober.suspect(99, 6_000);
        let (want, _) = prober.advance(16_000);
        assert!(!peers(&prober.pick(16_000, want, more, &mut rng)).contains(&99));
    }

    #[test]
    fn an_alert_spends_a_bounded_number_of_probes() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(13);
        prober.alert(0);
        let mut picked = 0;
        for step in 0..300u64 {
            let now = step * 100;
            let (want, _) = prober.advance(now);
            for c in prober.pick(now, want, candidates(200, false), &mut rng) {
                prober.settle(&c.peer, Outcome::Answered, now);
                picked += 1;
            }
        }
        // 24 at two a second, then the quiet pace for the rest of the 30 s alert.
        assert!((24..=27).contains(&picked), "{picked}");
    }

    #[test]
    fn silence_while_this_node_stalled_proves_nothing() {
        for through_step in [true, false] {
            let mut prober = Prober::new(ProbeConfig::default());
            let mut rng = StdRng::seed_from_u64(9);
            prober.alert(0);
            let (want, _) = prober.advance(0);
            assert_eq!(prober.pick(0, want, candidates(1, true), &mut rng).len(), 1);
            prober.advance(1_000);
            prober.heard(4_999);
            // The node did not run for 4 s (the steps are 1 s apart otherwise).
            if through_step {
                prober.advance(5_000);
            }
            assert_eq!(
                prober.settle(&0, Outcome::Unanswered, 5_000),
                Some(Verdict::Inconclusive),
                "{through_step}"
            );
        }
    }

    #[test]
    fn records_stay_bounded_under_a_stream_of_new_candidates() {
        let mut prober = Prober::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(10);
        prober.alert(0);
        for step in 0..20_000u32 {
            let now = u64::from(step) * 500;
            prober.alert(now);
            let (want, _) = prober.advance(now);
            let fresh = vec![Candidate {
                peer: step,
                seq: 1,
                met: false,
                addrs: vec!["/ip4/1.2.3.4/tcp/1".into()],
            }];
            for c in prober.pick(now, want, fresh, &mut rng) {
                prober.settle(&c.peer, Outcome::Answered, now);
            }
        }
        assert!(prober.records.len() <= 4_096, "{}", prober.records.len());
    }

    #[test]
    fn probing_off_starts_nothing() {
        let mut prober = Prober::<u32>::new(ProbeConfig {
            max_in_flight: 0,
            ..Default::default()
        });
        prober.alert(0);
        assert_eq!(prober.advance(10_000).0, 0);
        assert!(!prober.alerted(1));
    }

    #[test]
    fn only_addresses_dialable_from_here_are_probed() {
        let lan = Vantage::of(["/ip4/10.1.2.3/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]);
        let local = Vantage::of(["/ip4/127.0.0.1/tcp/4001", "/memory/5"]);
        let dual = Vantage::of(["/ip4/10.1.2.3/tcp/4001", "/ip6/2001:db8::3/tcp/4001"]);
        assert!(local.local_only && !lan.local_only && lan.v4 && !lan.v6 && dual.v6);
        let addrs = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let unknown = Reachability::Unknown;
        // Global: the best stream address and the best other one, of a family this node has.
        let global = addrs(&[
            "/ip6/2001:4860::1/tcp/1",
            "/ip4/8.8.8.8/udp/1/quic-v1",
            "/ip4/8.8.8.8/tcp/1",
            "/ip4/9.9.9.9/tcp/1",
        ]);
        assert_eq!(
            probe_addrs(&global, unknown, &lan),
            addrs(&["/ip4/8.8.8.8/tcp/1", "/ip4/8.8.8.8/udp/1/quic-v1"])
        );
        assert_eq!(
            probe_addrs(&global, unknown, &dual),
            addrs(&["/ip6/2001:4860::1/tcp/1", "/ip4/8.8.8.8/udp/1/quic-v1"])
        );
        // Private: only from the same /24, and only when the peer has no global address.
        let same = addrs(&["/ip4/10.1.2.9/tcp/1"]);
        assert_eq!(probe_addrs(&same, unknown, &lan), same);
        let both = addrs(&["/ip4/10.1.2.9/tcp/1", "/ip4/8.8.8.8/tcp/1"]);
        assert_eq!(
            probe_addrs(&both, unknown, &lan),
            addrs(&["/ip4/8.8.8.8/tcp/1"])
        );
        assert!(probe_addrs(&addrs(&["/ip4/10.1.3.9/tcp/1"]), unknown, &lan).is_empty());
        assert!(probe_addrs(&addrs(&["/ip4/192.168.1.5/tcp/1"]), unknown, &lan).is_empty());
        // Loopback and memory: only from a node kept to this host.
        let here = addrs(&["/ip4/127.0.0.1/tcp/1", "/memory/7"]);
        assert!(probe_addrs(&here, unknown, &lan).is_empty());
        assert_eq!(
            probe_addrs(&here, unknown, &local),
            addrs(&["/ip4/127.0.0.1/tcp/1"])
        );
        // Link-local never; DNS only from a peer that says it is public.
        assert!(probe_addrs(&addrs(&["/ip4/169.254.1.1/tcp/1"]), unknown, &lan).is_empty());
        let dns = addrs(&["/dns4/example.org/tcp/1"]);
        assert!(probe_addrs(&dns, unknown, &lan).is_empty());
        assert_eq!(probe_addrs(&dns, Reachability::Public, &lan), dns);
        // Private peers and any relayed address: silence at the direct ones proves nothing.
        assert!(probe_addrs(&global, Reachability::Private, &lan).is_empty());
        let mut relayed = global.clone();
        relayed.push("/ip4/8.8.4.4/tcp/1/p2p/12D3KooWRelay/p2p-circuit".into());
        assert!(probe_addrs(&relayed, unknown, &lan).is_empty());
    }
}
