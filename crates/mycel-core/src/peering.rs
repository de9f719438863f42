//! Keeping a node joined: whom to dial, when to dial again, and which connections to shed.
//!
//! Three rules, each a pure function of what the driver tells it:
//! - [`Backoff`]: every dial target (a bootstrap address, a peer) is tried again after a
//!   capped exponential back-off with jitter until a connection to it succeeds. A node whose
//!   bootstrap peer is not up yet, or is at its cap, keeps trying instead of giving up after
//!   one dial; a thousand nodes retrying one address do not arrive in lockstep.
//! - [`Degree`]: while a node holds fewer connections than its target (counting dials in
//!   flight, so one tick's dials are not repeated by the next), it dials a few more. When its
//!   connections fall to zero it starts over from its bootstrap list at once.
//! - [`Referrals`]: a peer met through another's referral (a goodbye names live peers) is
//!   remembered with its referrer until a dial settles it; if nobody listens at its addresses
//!   or another peer answers there, the referrer is charged. Referring strangers to a victim's
//!   address, or to nonsense, costs the referrer its reputation.
//! - [`shed`]: above the high-water mark the node sheds connections down to the middle of
//!   its band, youngest-first among the unprotected inbound ones. Without it a network drifts
//!   to the hard cap: gossipsub keeps a stream open on every connection, so connections made
//!   for one DHT lookup never idle out.
//! - [`DialBudget`]: an address is only a peer's claim until a dial finds that peer there.
//!   Keys are free, so many "peers" can announce one victim's address; once a few dials
//!   failed at one host within a minute (whichever peers they were for), further dials there
//!   wait, so a node cannot be turned into a source of dials at someone else's machine.
//! - [`evict`]: at the hard cap a newcomer is not simply turned away: an inbound connection
//!   of low value makes room (from the subnet holding most of them, lowest score, youngest),
//!   while the peers this node dialled itself and its longest-connected good inbound peers
//!   are never evicted for a stranger. Sybils that fill the slots evict each other, not the
//!   neighbours that keep the node from being eclipsed; and [`Degree`] keeps dialling until
//!   the node holds `min_outbound` connections it chose itself.

use std::collections::HashMap;
use std::hash::Hash;

use rand::Rng;

use crate::UnixMillis;

/// How dial retries are spaced.
#[derive(Debug, Clone, Copy)]
pub struct BackoffConfig {
    /// The wait after the first failed try.
    pub first_ms: u64,
    /// The longest wait.
    pub max_ms: u64,
    /// Targets tracked at most; the longest-waiting are forgotten first when full.
    pub max_targets: usize,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        // Nodes started together find their bootstrap peers not listening yet: the first
        // retries come quickly, the cap keeps a dead address cheap.
        Self {
            first_ms: 250,
            max_ms: 60_000,
            max_targets: 4_096,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Attempts {
    tries: u32,
    next_at: UnixMillis,
    /// Set by [`Backoff::hold`]; survives [`Backoff::reset`].
    held_until: UnixMillis,
}

/// Per-target capped exponential back-off with jitter. A target with no record is due.
#[derive(Debug)]
pub struct Backoff<K> {
    config: BackoffConfig,
    targets: HashMap<K, Attempts>,
}

impl<K: Eq + Hash + Clone> Backoff<K> {
    /// No target tried yet.
    pub fn new(config: BackoffConfig) -> Self {
        Self {
            config,
            targets: HashMap::new(),
        }
    }

    /// Whether `target` may be dialled at `now`.
    pub fn due(&self, target: &K, now: UnixMillis) -> bool {
        self.targets
            .get(target)
            .is_none_or(|a| now >= a.next_at.max(a.held_until))
    }

    /// Records a dial of `target` at `now`: the next one waits `first_ms · 2^tries`, capped
    /// at `max_ms`, times a jitter factor drawn from [0.5, 1.5). Returns that wait.
    pub fn tried(&mut self, target: K, now: UnixMillis, rng: &mut impl Rng) -> u64 {
        if self.full_without(&target, now) {
            // Forget the target whose next try is furthest away: it matters least now.
            if let Some(far) = self
                .targets
                .iter()
                .max_by_key(|(_, a)| a.next_at)
                .map(|(k, _)| k.clone())
            {
                self.targets.remove(&far);
            }
        }
        let attempts = self.targets.entry(target).or_insert(Attempts {
            tries: 0,
            next_at: now,
            held_until: 0,
        });
        let base = self
            .config
            .first_ms
            .saturating_mul(1u64 << attempts.tries.min(32))
            .min(self.config.max_ms);
        let wait = (base as f64 * rng.gen_range(0.5..1.5)) as u64;
        attempts.tries = attempts.tries.saturating_add(1);
        attempts.next_at = now.saturating_add(wait);
        wait
    }

    /// Whether the table is full and `target` not in it, once the targets that hold nothing
    /// back at `now` (due, their hold over) are forgotten: a full table makes room with
    /// them first.
    fn full_without(&mut self, target: &K, now: UnixMillis) -> bool {
        if self.targets.contains_key(target) || self.targets.len() < self.config.max_targets {
            return false;
        }
        self.targets
            .retain(|_, a| now < a.next_at.max(a.held_until));
        self.targets.len() >= self.config.max_targets
    }

    /// Holds `target` back from `now` until at least `until` (a peer that just said
    /// goodbye, say), without counting a try. A hold outlives [`Self::reset`] and
    /// [`Self::succeeded`]. A full table first forgets targets whose wait is over.
    pub fn hold(&mut self, target: K, now: UnixMillis, until: UnixMillis) {
        if self.full_without(&target, now) {
            return;
        }
        if let Some(a) = self.targets.get_mut(&target) {
            a.held_until = a.held_until.max(until);
        } else {
            self.targets.insert(
                target,
                Attempts {
                    tries: 0,
                    next_at: 0,
                    held_until: until,
                },
            );
        }
    }

    /// A connection to `target` succeeded: its next dial, if ever needed, goes at once
    /// (unless it is held).
    pub fn succeeded(&mut self, target: &K) {
        if let Some(a) = self.targets.get_mut(target) {
            a.tries = 0;
            a.next_at = 0;
            if a.held_until == 0 {
                self.targets.remove(target);
            }
        }
    }

    /// Every target not held at `now` is due again (the node lost all its connections:
    /// start over).
    pub fn reset(&mut self, now: UnixMillis) {
        self.targets.retain(|_, a| a.held_until > now);
        for a in self.targets.values_mut() {
            a.tries = 0;
            a.next_at = 0;
        }
    }

    /// Targets tracked.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether no target is tracked.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// The connection band a node keeps.
#[derive(Debug, Clone, Copy)]
pub struct DegreeConfig {
    /// Connections the node wants; it dials while below.
    pub target: usize,
    /// Above this it sheds connections (down to the middle of target and high).
    pub high: usize,
    /// Dials started in one step at most.
    pub max_dials_per_step: usize,
    /// Connections this node dialled itself that it keeps up whatever its total (inbound
    /// strangers filling every slot cannot cut it off from the peers it chose).
    pub min_outbound: usize,
    /// The longest-connected inbound peers in good standing that [`evict`] never picks.
    pub protect_oldest: usize,
    /// A connection is neither shed nor evicted in its first this many milliseconds: a
    /// newcomer needs time to sync and to find other peers through this one.
    pub grace_ms: u64,
}

impl DegreeConfig {
    /// The band for `target`: shed above twice the target.
    pub fn for_target(target: usize) -> Self {
        Self {
            target,
            high: target.saturating_mul(2).max(target + 1),
            max_dials_per_step: 4,
            min_outbound: target.div_ceil(4),
            protect_oldest: target / 2,
            grace_ms: SHED_GRACE_MS,
        }
    }

    /// Where shedding stops.
    pub fn low_water(&self) -> usize {
        self.target + (self.high.saturating_sub(self.target)) / 2
    }
}

/// The connections a node holds, as [`Degree::step`] counts them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Held {
    /// Peers connected.
    pub connected: usize,
    /// Of those, peers whose first connection this node dialled.
    pub outbound: usize,
    /// Dials in flight.
    pub dialing: usize,
}

/// What [`Degree::step`] asks of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DegreeStep<K> {
    /// Every connection was lost since the last step: dial the bootstrap list again now
    /// (back-offs were reset).
    pub rebootstrap: bool,
    /// Candidates to dial now.
    pub dial: Vec<K>,
}

/// Degree upkeep: whom to dial to stay at the target, with back-off per candidate.
#[derive(Debug)]
pub struct Degree<K> {
    config: DegreeConfig,
    backoff: Backoff<K>,
    had_connections: bool,
}

impl<K: Eq + Hash + Clone> Degree<K> {
    /// Upkeep for `config`, retries spaced by `backoff`.
    pub fn new(config: DegreeConfig, backoff: BackoffConfig) -> Self {
        Self {
            config,
            backoff: Backoff::new(backoff),
            had_connections: false,
        }
    }

    /// The band.
    pub fn config(&self) -> DegreeConfig {
        self.config
    }

    /// The per-target back-off (the driver records successes and goodbyes in it).
    pub fn backoff_mut(&mut self) -> &mut Backoff<K> {
        &mut self.backoff
    }

    /// Whether `target` may be dialled at `now`.
    pub fn due(&self, target: &K, now: UnixMillis) -> bool {
        self.backoff.due(target, now)
    }

    /// How many dials the node is short of: its target degree, or the connections it must
    /// have dialled itself, whichever is further.
    pub fn shortfall(&self, held: Held) -> usize {
        let total = self
            .config
            .target
            .saturating_sub(held.connected + held.dialing);
        let outbound = self
            .config
            .min_outbound
            .saturating_sub(held.outbound + held.dialing);
        total.max(outbound)
    }

    /// One upkeep step at `now` with the connections `held`. `candidates` are the targets
    /// the node could dial, each with a tier (0 first: peers known alive before peers last
    /// seen failed, say). Targets not yet due are skipped; up to the [`Self::shortfall`] (at
    /// most `max_dials_per_step`) are picked at random from the lowest tier, then the next,
    /// and each is recorded as tried.
    pub fn step(
        &mut self,
        now: UnixMillis,
        held: Held,
        candidates: impl IntoIterator<Item = (K, u8)>,
        rng: &mut impl Rng,
    ) -> DegreeStep<K> {
        let rebootstrap = held.connected == 0 && self.had_connections;
        if rebootstrap {
            self.backoff.reset(now);
        }
        self.had_connections = held.connected > 0;
        let mut want = self.shortfall(held).min(self.config.max_dials_per_step);
        let mut dial = Vec::new();
        if want > 0 {
            let mut tiers: std::collections::BTreeMap<u8, Vec<K>> = Default::default();
            for (k, tier) in candidates {
                if self.backoff.due(&k, now) {
                    tiers.entry(tier).or_default().push(k);
                }
            }
            for (_, mut due) in tiers {
                // A partial Fisher-Yates: the first `take` places hold a uniform sample.
                let take = want.min(due.len());
                for i in 0..take {
                    let j = rng.gen_range(i..due.len());
                    due.swap(i, j);
                }
                due.truncate(take);
                want -= take;
                dial.extend(due);
                if want == 0 {
                    break;
                }
            }
            for k in &dial {
                self.backoff.tried(k.clone(), now, rng);
            }
        }
        DegreeStep { rebootstrap, dial }
    }
}

/// Re-dialling peers last seen failed, one at a time and regardless of degree: a node that
/// has its degree within one half of a partition would otherwise never look across again,
/// and the halves would wait for a DHT walk to meet. Each failed peer is retried with a short
/// capped back-off (a peer that really left costs a refused dial every few seconds, until
/// membership forgets it).
#[derive(Debug)]
pub struct Revival<K> {
    backoff: Backoff<K>,
}

impl<K: Eq + Hash + Clone> Revival<K> {
    /// Retries spaced by `backoff` (its cap bounds how long a healed partition waits).
    pub fn new(backoff: BackoffConfig) -> Self {
        Self {
            backoff: Backoff::new(backoff),
        }
    }

    /// The back-off for revival dials of 1 s doubling to 8 s.
    pub fn default_backoff() -> BackoffConfig {
        BackoffConfig {
            first_ms: 1_000,
            max_ms: 8_000,
            max_targets: 4_096,
        }
    }

    /// One failed peer to dial now, if any is due; recorded as tried.
    pub fn step(
        &mut self,
        now: UnixMillis,
        failed: impl IntoIterator<Item = K>,
        rng: &mut impl Rng,
    ) -> Option<K> {
        let due: Vec<K> = failed
            .into_iter()
            .filter(|k| self.backoff.due(k, now))
            .collect();
        if due.is_empty() {
            return None;
        }
        let pick = due[rng.gen_range(0..due.len())].clone();
        self.backoff.tried(pick.clone(), now, rng);
        Some(pick)
    }

    /// The peer is connected again: forget its back-off.
    pub fn revived(&mut self, peer: &K) {
        self.backoff.succeeded(peer);
    }
}

/// A connection as [`shed`] sees it.
#[derive(Debug, Clone)]
pub struct Connected<K> {
    /// The peer.
    pub peer: K,
    /// When the (oldest) connection to it was established.
    pub since: UnixMillis,
    /// Whether the peer dialled us (its slot is the first to give back).
    pub inbound: bool,
    /// Never shed (a bootstrap peer, a peer with work in flight).
    pub protected: bool,
    /// Its reputation score; lower is shed first among equals.
    pub score: f64,
    /// The subnet its address is in (see `inbound::subnet_of`); `None` where none applies
    /// (this machine, a relayed connection).
    pub subnet: Option<std::net::IpAddr>,
}

/// The default [`DegreeConfig::grace_ms`].
pub const SHED_GRACE_MS: u64 = 20_000;

/// Which of `live` (each peer with whether its latest announcement said it was at its
/// connection cap) to refer a newcomer to, at most `max`: half of the list from peers with
/// free slots, in random order, the rest a uniform pick of the others (full ones refer the
/// newcomer on in turn). The claim is a peer's own: keys that never say `full` cannot take
/// more than that half of the list beyond their share of the live peers.
pub fn referrals<K>(live: Vec<(K, bool)>, max: usize, rng: &mut impl rand::Rng) -> Vec<K> {
    use rand::seq::SliceRandom;
    let mut live = live;
    live.shuffle(rng);
    let with_room = max.div_ceil(2);
    let mut picked = Vec::with_capacity(max.min(live.len()));
    let mut rest = Vec::with_capacity(live.len());
    for (peer, full) in live {
        if !full && picked.len() < with_room {
            picked.push(peer);
        } else {
            rest.push(peer);
        }
    }
    let room = max.saturating_sub(picked.len());
    picked.extend(rest.into_iter().take(room));
    picked
}

/// Which peers to disconnect at `now` so that at most `config.low_water()` remain, once
/// more than `config.high` are connected. Inbound before outbound (the peers we chose keep
/// the node from being eclipsed by those that chose us), lower score first, then the
/// youngest. Kept: protected peers, those within their `grace_ms`, the `protect_oldest`
/// longest-connected inbound peers in good standing (as [`evict`] keeps them), and at least
/// `min_outbound` of the peers this node dialled (strangers arriving one after another, each
/// in its grace, must not make the node shed the peers it chose or its long-lived
/// neighbours).
pub fn shed<K: Clone>(config: &DegreeConfig, now: UnixMillis, conns: &[Connected<K>]) -> Vec<K> {
    if conns.len() <= config.high {
        return Vec::new();
    }
    let excess = conns.len() - config.low_water();
    let past_grace = |c: &Connected<K>| now.saturating_sub(c.since) >= config.grace_ms;
    let mut oldest: Vec<&Connected<K>> = conns
        .iter()
        .filter(|c| c.inbound && !c.protected && past_grace(c) && c.score > GOOD_STANDING)
        .collect();
    oldest.sort_by_key(|c| c.since);
    oldest.truncate(config.protect_oldest);
    // The `min_outbound` peers this node dialled and has held longest are kept: a peer it
    // dialled lately (a stranger it reached again, still in its grace) must not count in
    // their place, or the peers it chose would go.
    let mut chosen: Vec<&Connected<K>> = conns.iter().filter(|c| !c.inbound).collect();
    chosen.sort_by(|a, b| a.since.cmp(&b.since).then(b.score.total_cmp(&a.score)));
    chosen.truncate(config.min_outbound);
    let kept = |c: &Connected<K>| {
        oldest.iter().any(|o| std::ptr::eq(*o, c)) || chosen.iter().any(|o| std::ptr::eq(*o, c))
    };
    let mut sheddable: Vec<&Connected<K>> = conns
        .iter()
        .filter(|c| !c.protected && past_grace(c) && !kept(c))
        .collect();
    sheddable.sort_by(|a, b| {
        b.inbound
            .cmp(&a.inbound)
            .then(a.score.total_cmp(&b.score))
            .then(b.since.cmp(&a.since))
    });
    sheddable
        .into_iter()
        .take(excess)
        .map(|c| c.peer.clone())
        .collect()
}

/// A score above this keeps a long-lived peer protected from eviction: an honest peer
/// charged a point now and then (a relayed expired statement, a sync over budget) is still
/// in good standing; one charged for real misbehaviour is not.
pub const GOOD_STANDING: f64 = -10.0;

/// Scores compared in bands this wide when choosing whom to evict: a fresh key's clean 0
/// does not outrank a long-lived peer's few points of wear.
const SCORE_BAND: f64 = 10.0;

/// Which inbound connection makes room at `now` for a newcomer once the node is at its
/// hard cap, if any. Never a peer this node dialled, a protected one, one within its first
/// `config.grace_ms` (unless `for_own_dial`: a connection this node dialled to hold its
/// `min_outbound` takes precedence over any inbound one's grace), nor one of the
/// `config.protect_oldest` longest-connected inbound peers in good standing
/// ([`GOOD_STANDING`]). Of the rest: from the subnet holding most of them (a block of
/// addresses filling the slots loses its own first), the lowest score band, then the
/// youngest. `None`: the newcomer gets the goodbye instead.
pub fn evict<K: Clone>(
    config: &DegreeConfig,
    now: UnixMillis,
    conns: &[Connected<K>],
    for_own_dial: bool,
) -> Option<K> {
    let mut inbound: Vec<&Connected<K>> = conns
        .iter()
        .filter(|c| {
            c.inbound
                && !c.protected
                && (for_own_dial || now.saturating_sub(c.since) >= config.grace_ms)
        })
        .collect();
    inbound.sort_by_key(|c| c.since);
    let mut kept = 0;
    inbound.retain(|c| {
        let keep = kept < config.protect_oldest
            && c.score > GOOD_STANDING
            && now.saturating_sub(c.since) >= config.grace_ms;
        kept += usize::from(keep);
        !keep
    });
    // Towards zero: (-10, 0] is the band of a clean key, so a little wear costs nothing.
    let band = |c: &Connected<K>| (c.score / SCORE_BAND).ceil() as i64;
    let mut per_subnet: HashMap<std::net::IpAddr, usize> = HashMap::new();
    for c in &inbound {
        if let Some(subnet) = c.subnet {
            *per_subnet.entry(subnet).or_default() += 1;
        }
    }
    let crowd = |c: &Connected<K>| c.subnet.map_or(1, |s| per_subnet[&s]);
    inbound
        .into_iter()
        .max_by(|a, b| {
            crowd(a)
                .cmp(&crowd(b))
                .then(band(b).cmp(&band(a)))
                .then(a.since.cmp(&b.since))
        })
        .map(|c| c.peer.clone())
}

/// Dials that failed (or are not known to have succeeded) at each host, each under the
/// driver's key for it (the dial, with the peer it was meant for); see the module doc.
#[derive(Debug)]
pub struct DialBudget<K> {
    per_host: usize,
    window_ms: u64,
    max_hosts: usize,
    failed: HashMap<std::net::IpAddr, Vec<(K, UnixMillis)>>,
}

impl<K: Eq + Clone> DialBudget<K> {
    /// At most `per_host` dials may fail at one host within `window_ms` before further
    /// dials there wait; at most `max_hosts` hosts are tracked (the oldest failures are
    /// forgotten first).
    pub fn new(per_host: usize, window_ms: u64, max_hosts: usize) -> Self {
        Self {
            per_host,
            window_ms,
            max_hosts,
            failed: HashMap::new(),
        }
    }

    /// Whether a dial at the host of `ip` may be made at `now`: while fewer than `per_host`
    /// dials failed there (or are under way) within the window.
    pub fn allows(&self, ip: std::net::IpAddr, now: UnixMillis) -> bool {
        let host = crate::inbound::host_of(ip);
        self.failed.get(&host).is_none_or(|failed| {
            failed
                .iter()
                .filter(|(_, at)| now.saturating_sub(*at) < self.window_ms)
                .count()
                < self.per_host
        })
    }

    /// The dial `key` at `ip` failed (nobody listens there, or another peer answered), or is
    /// being made and counts as failed until [`Self::forget`]. One entry per key: a dial
    /// recorded when it starts and again when it fails counts once.
    pub fn failed(&mut self, ip: std::net::IpAddr, key: K, now: UnixMillis) {
        let host = crate::inbound::host_of(ip);
        if !self.failed.contains_key(&host) && self.failed.len() >= self.max_hosts {
            let window = self.window_ms;
            self.failed
                .retain(|_, list| list.iter().any(|(_, at)| now.saturating_sub(*at) < window));
            if self.failed.len() >= self.max_hosts {
                let oldest = self
                    .failed
                    .iter()
                    .min_by_key(|(_, list)| list.iter().map(|(_, at)| *at).max())
                    .map(|(h, _)| *h);
                if let Some(oldest) = oldest {
                    self.failed.remove(&oldest);
                }
            }
        }
        let list = self.failed.entry(host).or_default();
        list.retain(|(k, at)| *k != key && now.saturating_sub(*at) < self.window_ms);
        list.push((key, now));
        // Never more than the budget and one to hold per host.
        let excess = list.len().saturating_sub(self.per_host + 1);
        list.drain(..excess);
    }

    /// Forgets the entries at `ip` that `which` picks: a dial that ended in a way that says
    /// nothing about the address (a timeout, an unreachable network: a partition, not a
    /// lie), or every dial of a peer that answered there.
    pub fn forget(&mut self, ip: std::net::IpAddr, which: impl Fn(&K) -> bool) {
        let host = crate::inbound::host_of(ip);
        if let Some(list) = self.failed.get_mut(&host) {
            list.retain(|(k, _)| !which(k));
            if list.is_empty() {
                self.failed.remove(&host);
            }
        }
    }
}

/// Who referred which peer, until a dial shows whether the peer is where it claims to be.
///
/// Bounded: when full, the oldest referral is forgotten (its referrer goes uncharged, which a
/// flood of referrals cannot turn into a cost for anyone else). Referrals older than the
/// time to live are forgotten too: a peer that leaves long after it was referred says
/// nothing about its referrer.
#[derive(Debug)]
pub struct Referrals<K> {
    by: HashMap<K, (K, UnixMillis)>,
    max: usize,
    ttl_ms: u64,
}

impl<K: Eq + Hash + Clone> Referrals<K> {
    /// Keeps at most `max` referrals, each for `ttl_ms`.
    pub fn new(max: usize, ttl_ms: u64) -> Self {
        Self {
            by: HashMap::new(),
            max,
            ttl_ms,
        }
    }

    /// `referrer` told us of `peer` at `now`, a peer we did not know. A peer already
    /// referred keeps its first referrer.
    pub fn referred(&mut self, peer: K, referrer: K, now: UnixMillis) {
        if self.by.contains_key(&peer) || self.max == 0 {
            return;
        }
        if self.by.len() >= self.max {
            let ttl = self.ttl_ms;
            self.by.retain(|_, (_, at)| now.saturating_sub(*at) < ttl);
        }
        if self.by.len() >= self.max {
            if let Some(oldest) = self
                .by
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                self.by.remove(&oldest);
            }
        }
        self.by.insert(peer, (referrer, now));
    }

    /// A dial of `peer` at `now` found nobody there, or another peer: the referrer to charge,
    /// if a live referral brought `peer`. The referral is settled either way.
    pub fn bogus(&mut self, peer: &K, now: UnixMillis) -> Option<K> {
        let (referrer, at) = self.by.remove(peer)?;
        (now.saturating_sub(at) < self.ttl_ms).then_some(referrer)
    }

    /// We connected to `peer`: its referral was good.
    pub fn confirmed(&mut self, peer: &K) {
        self.by.remove(peer);
    }

    /// Referrals not settled yet.
    pub fn len(&self) -> usize {
        self.by.len()
    }

    /// Whether no referral waits.
    pub fn is_empty(&self) -> bool {
        self.by.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn referrals_name_peers_with_free_slots_first() {
        let mut rng = StdRng::seed_from_u64(7);
        // 20 full peers and 3 with room, 16 referrals: the 3 always come first.
        let live: Vec<(u32, bool)> = (0..23).map(|k| (k, k >= 3)).collect();
        for _ in 0..50 {
            let picked = referrals(live.clone(), 16, &mut rng);
            assert_eq!(picked.len(), 16);
            let mut first: Vec<u32> = picked[..3].to_vec();
            first.sort();
            assert_eq!(first, vec![0, 1, 2], "{picked:?}");
            let mut unique = picked.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), 16, "no peer twice: {picked:?}");
        }
        // Keys that never say full (30 of them) beside 10 honest full peers: the honest
        // ones still get a fair part of the uniform half.
        let crowd: Vec<(u32, bool)> = (0..40).map(|k| (k, k >= 30)).collect();
        let honest: usize = (0..50)
            .map(|_| {
                referrals(crowd.clone(), 16, &mut rng)
                    .iter()
                    .filter(|k| **k >= 30)
                    .count()
            })
            .sum();
        assert!(
            honest >= 50,
            "honest full peers named {honest} times in 50 lists"
        );
        // With room everywhere it is a random sample, not always the same peers.
        let open: Vec<(u32, bool)> = (0..40).map(|k| (k, false)).collect();
        let a = referrals(open.clone(), 16, &mut rng);
        let b = referrals(open, 16, &mut rng);
        assert_ne!(a, b);
        // Only full peers: they are still named (they pass the newcomer on).
        assert_eq!(referrals(vec![(9u32, true)], 16, &mut rng), vec![9]);
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_the_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(BackoffConfig {
            first_ms: 1_000,
            max_ms: 16_000,
            max_targets: 8,
        });
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert!(b.due(&"boot", now));
            let wait = b.tried("boot", now, &mut rng);
            assert!(!b.due(&"boot", now + wait - 1));
            waits.push(wait);
            now += wait;
        }
        for (i, w) in waits.iter().enumerate() {
            let base = (1_000u64 << i).min(16_000);
            assert!(
                *w >= base / 2 && *w < base * 3 / 2,
                "try {i}: {w} vs {base}"
            );
        }
        // Jitter: two targets tried at the same instants do not stay in lockstep.
        let mut c = Backoff::new(BackoffConfig::default());
        let (a, z) = (c.tried("a", 0, &mut rng), c.tried("z", 0, &mut rng));
        assert_ne!(a, z);
        // Success clears; reset makes everything due.
        b.succeeded(&"boot");
        assert!(b.due(&"boot", now));
        c.hold("held", 0, 5_000);
        c.reset(1_000);
        assert!(c.due(&"a", 0) && c.len() == 1);
        assert!(
            !c.due(&"held", 4_999) && c.due(&"held", 5_000),
            "holds outlive a reset"
        );
        c.succeeded(&"held");
        assert!(!c.due(&"held", 4_999), "and a success");
    }

    #[test]
    fn the_back_off_table_stays_bounded() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(BackoffConfig {
            max_targets: 16,
            ..Default::default()
        });
        for k in 0..1_000u32 {
            b.tried(k, u64::from(k), &mut rng);
            b.hold(k + 10_000, u64::from(k), 5);
        }
        assert!(b.len() <= 16);
        // A table full of holds that are over still takes a new one.
        let mut h = Backoff::new(BackoffConfig {
            max_targets: 4,
            ..Default::default()
        });
        for k in 0..4u32 {
            h.hold(k, 0, 100);
        }
        h.hold(9, 200, 60_200);
        assert!(!h.due(&9, 30_000), "the new hold is kept");
        assert!(h.len() <= 4);
        // And a dial recorded into a table full of live holds keeps them.
        for k in 0..4u32 {
            h.hold(k, 200, 60_200);
        }
        h.tried(77, 300, &mut rng);
        assert!(h.len() <= 4);
    }

    #[test]
    fn upkeep_dials_the_shortfall_counting_dials_in_flight() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut d = Degree::new(DegreeConfig::for_target(8), BackoffConfig::default());
        let peers: Vec<(u32, u8)> = (0..50).map(|p| (p, 0)).collect();
        let held = |connected, dialing| Held {
            connected,
            outbound: connected,
            dialing,
        };
        let step = d.step(0, held(2, 0), peers.clone(), &mut rng);
        assert_eq!(step.dial.len(), 4, "at most four per step");
        let step2 = d.step(100, held(2, 4), peers.clone(), &mut rng);
        assert_eq!(step2.dial.len(), 2, "8 - 2 connected - 4 in flight");
        assert!(
            step2.dial.iter().all(|p| !step.dial.contains(p)),
            "tried ones wait"
        );
        assert!(d
            .step(200, held(8, 0), peers.clone(), &mut rng)
            .dial
            .is_empty());
        assert!(d
            .step(300, held(5, 3), peers.clone(), &mut rng)
            .dial
            .is_empty());
        // Lower tiers first: two alive peers due, then the failed ones fill the rest.
        let mut d = Degree::new(DegreeConfig::for_target(8), BackoffConfig::default());
        let tiered = [(1u32, 1), (2, 0), (3, 1), (4, 0), (5, 1), (6, 1)];
        let dial = d.step(0, held(0, 0), tiered, &mut rng).dial;
        assert_eq!(dial.len(), 4);
        assert!(dial.contains(&2) && dial.contains(&4), "{dial:?}");
        // At its degree but every connection inbound: it dials until it holds two it chose.
        let mut d = Degree::new(DegreeConfig::for_target(8), BackoffConfig::default());
        let inbound_only = Held {
            connected: 20,
            outbound: 0,
            dialing: 0,
        };
        assert_eq!(
            d.step(0, inbound_only, peers.clone(), &mut rng).dial.len(),
            2
        );
        let one_out = Held {
            outbound: 1,
            dialing: 1,
            ..inbound_only
        };
        assert!(d.step(100, one_out, peers, &mut rng).dial.is_empty());
    }

    #[test]
    fn a_candidate_that_keeps_failing_is_not_hammered() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut d = Degree::new(DegreeConfig::for_target(8), BackoffConfig::default());
        let mut dials = 0;
        // One candidate, no connection ever succeeds, a step every 100 ms for 60 s.
        for t in 0..600u64 {
            let held = Held {
                connected: 1,
                outbound: 1,
                dialing: 0,
            };
            dials += d.step(t * 100, held, [(42u32, 0)], &mut rng).dial.len();
        }
        // 0.25, 0.5, 1, 2, 4, 8, 16, 32 s (x0.5..1.5): at most ~11 tries in a minute.
        assert!((6..=11).contains(&dials), "{dials} dials");
    }

    #[test]
    fn losing_every_connection_rebootstraps_at_once() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut d = Degree::new(DegreeConfig::for_target(8), BackoffConfig::default());
        let held = |connected| Held {
            connected,
            outbound: connected,
            dialing: 0,
        };
        // Never connected: no re-bootstrap signal (the driver's first dials are the bootstrap).
        assert!(!d.step(0, held(0), [(1u32, 0)], &mut rng).rebootstrap);
        assert!(!d.due(&1, 1));
        assert!(!d.step(1_000, held(3), [(1u32, 0)], &mut rng).rebootstrap);
        let step = d.step(2_000, held(0), [(1u32, 0)], &mut rng);
        assert!(step.rebootstrap);
        assert_eq!(step.dial, vec![1], "back-offs were reset");
        assert!(
            !d.step(3_000, held(0), [(1u32, 0)], &mut rng).rebootstrap,
            "once per loss"
        );
    }

    #[test]
    fn failed_peers_are_retried_one_at_a_time_within_the_cap() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut r = Revival::new(Revival::<u32>::default_backoff());
        let failed = [1u32, 2, 3];
        let mut tries: HashMap<u32, Vec<u64>> = HashMap::new();
        for t in 0..600u64 {
            let now = t * 100;
            if let Some(p) = r.step(now, failed, &mut rng) {
                tries.entry(p).or_default().push(now);
            }
        }
        for p in failed {
            let at = &tries[&p];
            // Never much more than 12 s (8 s x 1.5) between two tries, backed off fully.
            assert!(at.windows(2).all(|w| w[1] - w[0] <= 12_500), "{p}: {at:?}");
            assert!(at.len() >= 5, "{p}: {at:?}");
        }
        assert_eq!(r.step(0, std::iter::empty(), &mut rng), None);
    }

    fn conn(peer: u32, since: u64, inbound: bool) -> Connected<u32> {
        Connected {
            peer,
            since,
            inbound,
            protected: false,
            score: 0.0,
            subnet: None,
        }
    }

    #[test]
    fn a_newcomer_evicts_the_crowded_subnet_never_chosen_or_old_good_peers() {
        let config = DegreeConfig::for_target(8);
        let now = 1_000_000;
        let subnet = |n: u8| Some(std::net::IpAddr::from([10, 0, n, 0]));
        // Outbound 0-3; inbound 4-9 old and honest, each from its own subnet; sybils 10-19
        // from one subnet, connected later; 20 in its grace period.
        let mut conns: Vec<Connected<u32>> = (0..4).map(|p| conn(p, 0, false)).collect();
        for p in 4..10u32 {
            conns.push(Connected {
                subnet: subnet(p as u8),
                ..conn(p, 1_000 * u64::from(p), true)
            });
        }
        for p in 10..20u32 {
            conns.push(Connected {
                subnet: subnet(99),
                score: 1.0,
                ..conn(p, 100_000 + u64::from(p), true)
            });
        }
        conns.push(conn(20, now - 1, true));
        let victim = evict(&config, now, &conns, false).unwrap();
        assert!(
            (10..20).contains(&victim),
            "a sybil goes first, not {victim}"
        );
        assert_eq!(victim, 19, "the youngest of the crowd");
        // Without the sybils: never an outbound peer, never the four oldest good inbound,
        // never one in its grace; the young honest ones are fair game.
        conns.truncate(4 + 6);
        conns.push(conn(20, now - 1, true));
        let victim = evict(&config, now, &conns, false).unwrap();
        assert!([8, 9].contains(&victim), "{victim}");
        // A few points of wear neither cost the protection nor outrank a clean newcomer's
        // band; a bad score loses the protection.
        conns[8].score = -3.0;
        let victim = evict(&config, now, &conns, false).unwrap();
        assert_eq!(
            victim, 9,
            "8's wear is within a clean key's band: the youngest goes"
        );
        conns[8].score = -12.0;
        assert_eq!(evict(&config, now, &conns, false), Some(8));
        conns[8].score = 0.0;
        conns[4].score = -30.0;
        assert_eq!(evict(&config, now, &conns, false), Some(4));
        // The node's own dial takes precedence over a stranger's grace, not over the old.
        conns[4].score = 0.0;
        conns.truncate(4 + 4);
        conns.push(conn(21, now - 1, true));
        assert_eq!(evict(&config, now, &conns, false), None);
        assert_eq!(evict(&config, now, &conns, true), Some(21));
        // Only outbound, protected, old-and-good or young connections: nobody is evicted.
        let mut kept: Vec<Connected<u32>> = (0..4).map(|p| conn(p, 0, false)).collect();
        kept.extend((4..8).map(|p| conn(p, 0, true)));
        kept.push(Connected {
            protected: true,
            ..conn(8, 0, true)
        });
        kept.push(conn(9, now, true));
        assert_eq!(evict(&config, now, &kept, false), None);
    }

    #[test]
    fn shedding_starts_above_high_water_and_keeps_chosen_old_protected_peers() {
        let config = DegreeConfig::for_target(8); // high 16, low water 12
        let now = 100_000;
        let mut conns: Vec<Connected<u32>> = (0..16).map(|p| conn(p, 0, p % 2 == 0)).collect();
        assert!(
            shed(&config, now, &conns).is_empty(),
            "at high water: keep all"
        );
        conns.push(conn(100, now - 1_000, true)); // in its grace period
        conns.push(conn(101, 0, true));
        conns[1].protected = true;
        conns[3].score = -50.0;
        let out = shed(&config, now, &conns);
        assert_eq!(out.len(), 18 - 12);
        assert!(!out.contains(&100), "young connections are kept");
        assert!(!out.contains(&1), "protected ones are kept");
        // Inbound first: of the 9 inbound old enough (0, 2, …, 14 and 101) the 4 oldest in
        // good standing are kept (0, 2, 4, 6), the other 5 shed; then the outbound peer with
        // the lowest score.
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![3, 8, 10, 12, 14, 101]);
        // Among outbound, a low score goes first.
        let mut outbound: Vec<Connected<u32>> = (0..20).map(|p| conn(p, 0, false)).collect();
        outbound[3].score = -50.0;
        assert_eq!(shed(&config, now, &outbound)[0], 3);
        // Strangers in their grace fill the node above high water: the peers it dialled are
        // kept down to min_outbound (2 here), the worst shed first, not all for the strangers.
        let mut eclipsed: Vec<Connected<u32>> = (0..3).map(|p| conn(p, 0, false)).collect();
        eclipsed[0].score = -5.0;
        eclipsed.extend((10..30).map(|p| conn(p, now - 1_000, true)));
        assert_eq!(shed(&config, now, &eclipsed), vec![0]);
        // A peer it dialled lately (in its grace) does not count for the ones it has held
        // longest: with one of each beyond min_outbound, the old ones stay.
        let mut redialled: Vec<Connected<u32>> = (0..2).map(|p| conn(p, 0, false)).collect();
        redialled.push(conn(2, now - 1_000, false));
        redialled.extend((10..24).map(|p| conn(p, now - 1_000, true)));
        let out = shed(&config, now, &redialled);
        assert!(!out.contains(&0) && !out.contains(&1), "{out:?}");
        // Nor the longest-connected inbound peers in good standing (protect_oldest, 4 here):
        // with wear, but in good standing, they stay while strangers past their grace go.
        let mut worn: Vec<Connected<u32>> = (0..4).map(|p| conn(p, p.into(), true)).collect();
        for c in &mut worn {
            c.score = -5.0;
        }
        worn.extend((10..25).map(|p| conn(p, 50_000, true)));
        let out = shed(&config, now, &worn);
        assert_eq!(out.len(), 19 - 12);
        assert!(out.iter().all(|p| *p >= 10), "{out:?}");
    }

    #[test]
    fn many_peers_claiming_one_host_get_a_few_dials_there_not_one_each() {
        let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
        let other: std::net::IpAddr = "198.51.100.1".parse().unwrap();
        let mut budget = DialBudget::new(4, 60_000, 16);
        // Keys are (peer, dial).
        for peer in 0..2u32 {
            for dial in 0..2u32 {
                assert!(budget.allows(ip, 10));
                budget.failed(ip, (peer, dial), 10);
                budget.failed(ip, (peer, dial), 11); // recorded at the start and the end: once
            }
        }
        assert!(!budget.allows(ip, 20), "a fifth dial waits, for any peer");
        assert!(budget.allows(other, 20), "other hosts are not affected");
        // A peer found there frees its places, a dial that said nothing its own; the window
        // frees the rest.
        budget.forget(ip, |k| k.0 == 0);
        assert!(budget.allows(ip, 20));
        budget.failed(ip, (4, 9), 20);
        budget.failed(ip, (4, 10), 20);
        assert!(!budget.allows(ip, 30));
        budget.forget(ip, |k| *k == (4, 10));
        assert!(budget.allows(ip, 30));
        budget.failed(ip, (4, 10), 20);
        assert!(budget.allows(ip, 60_021), "failures older than the window");
        // Bounded: many hosts, many peers.
        for h in 0..1_000u32 {
            let ip = std::net::IpAddr::from(h.to_be_bytes());
            for peer in 0..10u32 {
                budget.failed(ip, (peer, 0), 100_000 + u64::from(h));
            }
        }
        assert!(budget.failed.len() <= 16);
        assert!(budget.failed.values().all(|l| l.len() <= 5));
    }

    #[test]
    fn a_bogus_referral_is_charged_to_its_referrer_once() {
        let mut r = Referrals::new(8, 60_000);
        r.referred(1u32, 100u32, 0);
        // A second referrer of the same peer does not take over the first one's referral.
        r.referred(1, 200, 10);
        r.referred(2, 100, 20);
        assert_eq!(r.bogus(&1, 1_000), Some(100));
        assert_eq!(r.bogus(&1, 1_000), None, "settled once");
        r.confirmed(&2);
        assert_eq!(
            r.bogus(&2, 1_000),
            None,
            "a good referral costs nothing later"
        );
        assert!(r.is_empty());
    }

    #[test]
    fn referrals_expire_and_stay_bounded() {
        let mut r = Referrals::new(4, 1_000);
        r.referred(1u32, 100u32, 0);
        assert_eq!(r.bogus(&1, 5_000), None, "too old to blame the referrer");
        for peer in 0..1_000u32 {
            r.referred(peer, 7, u64::from(peer));
        }
        assert_eq!(r.len(), 4);
        // The newest are kept.
        assert_eq!(r.bogus(&999, 1_000), Some(7));
        assert_eq!(r.bogus(&0, 1_000), None);
    }
}
