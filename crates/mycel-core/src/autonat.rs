//! AutoNAT probes: which of our candidate addresses to have dialled back, by which server,
//! and what the answers prove.
//!
//! A node learns candidate addresses from how peers see it (identify's observed address);
//! a server (any peer speaking AutoNAT v2) is asked to dial one back and to hand over a nonce
//! on that connection. The driver speaks the protocol; this decides.
//!
//! libp2p-autonat 0.16's own client asks one server at random per candidate and keeps a
//! failure for good: a single server that answers "unreachable" whatever it finds (a liar,
//! or one that cannot dial out) left a public node private for the rest of its life. Here:
//! - **A success needs the dial-back itself**: the nonce handed over by the asked server
//!   (the driver accepts it only on a connection that server dialled to us directly), never
//!   the server's word alone; and a dial-back that came proves the address whatever the
//!   server says after it.
//! - **A failure is asked again of another server**: at once when one is connected that has
//!   not failed the address, after a back-off otherwise (and at once when a new server
//!   appears). An address is refuted only by [`ProbeConfig::refute_by`] distinct servers, or
//!   by every server known when fewer are connected.
//!   A server that gave no verdict (refused, broke off, timed out) is asked last, and the
//!   address waits only when nobody else is left.
//! - **A wrong "unreachable" is paid for**: when a dial-back proves an address reachable,
//!   the other servers that called it unreachable shortly before are named for the driver
//!   to charge (and the confirming server itself if it said "unreachable" after dialling).
//! - **Bounded**: at most [`ProbeConfig::max_candidates`] addresses, ranked by how many
//!   distinct reporters vouch for them (peers choose what they report as our address; one
//!   reporter counts once, and the driver counts a network as one reporter, so that keys made
//!   on one host or subnet count once); a refuted or single-reported address makes room for a newcomer, keeping
//!   its back-off. One probe in flight per address and per server.
//!
//! Pure: time and the random source are passed in.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::IteratorRandom;
use rand::Rng;

use crate::peering::{Backoff, BackoffConfig};
use crate::UnixMillis;

/// How candidates are probed.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Candidate addresses kept at most; the least reported one makes room for a new one.
    pub max_candidates: usize,
    /// A probe unanswered this long counts as inconclusive.
    pub timeout_ms: u64,
    /// Distinct servers that must fail an address before it is refuted (fewer when fewer
    /// servers are connected).
    pub refute_by: usize,
    /// A failure older than this, contradicted by a dial-back, is not charged: the network
    /// may have changed in between.
    pub charge_window_ms: u64,
    /// Back-off between tests of a failed or inconclusive address.
    pub retest: BackoffConfig,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            max_candidates: 8,
            timeout_ms: 30_000,
            refute_by: 2,
            charge_window_ms: 600_000,
            retest: BackoffConfig {
                first_ms: 15_000,
                max_ms: 600_000,
                max_targets: 64,
            },
        }
    }
}

/// What a server answered to a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It says it dialled the address and handed over the nonce.
    Reachable,
    /// It says it could not dial the address (or not complete the dial-back).
    Unreachable,
    /// No verdict: refused the request, failed inside, broke the protocol or the stream.
    Inconclusive,
}

/// A probe to send: ask `server` to dial `addr` back with `nonce`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe<P, A> {
    /// What the server must hand back on the connection it dials.
    pub nonce: u64,
    /// Who is asked.
    pub server: P,
    /// The address to dial.
    pub addr: A,
}

/// What a probe's answer settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding<P, A> {
    /// A dial-back reached `addr`. `wrong`: servers that called it unreachable within
    /// [`ProbeConfig::charge_window_ms`] before.
    Confirmed {
        /// The address confirmed.
        addr: A,
        /// Servers that said otherwise.
        wrong: Vec<P>,
    },
    /// Enough distinct servers could not reach `addr`.
    Refuted {
        /// The address refuted.
        addr: A,
    },
}

/// Reporters counted per candidate at most.
const MAX_REPORTERS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Test<P> {
    /// Due for a test (subject to the back-off).
    Open,
    /// A probe is out.
    Pending {
        nonce: u64,
        server: P,
        at: UnixMillis,
        dialled_back: bool,
        claimed: bool,
    },
    /// A dial-back reached it.
    Confirmed,
}

#[derive(Debug)]
struct Candidate<P, R> {
    /// Who reported it (one reporter counts once, however often it reports).
    reporters: BTreeSet<R>,
    test: Test<P>,
    /// Servers that could not reach it, and when they said so.
    failed_by: BTreeMap<P, UnixMillis>,
    /// Servers that gave no verdict on it (refused, broke the stream, timed out), and when:
    /// asked last.
    shunned: BTreeMap<P, UnixMillis>,
    /// Whether a refutation was reported (once until a success).
    refuted: bool,
}

impl<P: Ord, R> Candidate<P, R> {
    /// The probe out for it: its server, whether the dial-back came, whether the server
    /// claimed success.
    fn probe_out(&mut self) -> Option<(&mut P, &mut bool, &mut bool)> {
        match &mut self.test {
            Test::Pending {
                server,
                dialled_back,
                claimed,
                ..
            } => Some((server, dialled_back, claimed)),
            _ => None,
        }
    }

    /// Whether `server` may settle it (it has not failed it, nor given no verdict on it).
    fn fresh(&self, server: &P) -> bool {
        !self.failed_by.contains_key(server) && !self.shunned.contains_key(server)
    }
}

/// Probing state of one node: servers are `P`, addresses `A`, and reporters of addresses
/// are counted as `R` (the driver's choice: a peer, or the network a peer reports from, so
/// that keys made on one host count once).
#[derive(Debug)]
pub struct Probes<P, A, R = P> {
    config: ProbeConfig,
    candidates: BTreeMap<A, Candidate<P, R>>,
    servers: BTreeSet<P>,
    backoff: Backoff<A>,
}

impl<P: Ord + Clone, A: Ord + Clone + std::hash::Hash, R: Ord> Probes<P, A, R> {
    /// No candidate, no server.
    pub fn new(config: ProbeConfig) -> Self {
        Self {
            config,
            candidates: BTreeMap::new(),
            servers: BTreeSet::new(),
            backoff: Backoff::new(config.retest),
        }
    }

    /// `reporter` says it sees us at `addr`.
    pub fn add_candidate(&mut self, addr: A, reporter: R) {
        if let Some(c) = self.candidates.get_mut(&addr) {
            if c.reporters.len() < MAX_REPORTERS {
                c.reporters.insert(reporter);
            }
            return;
        }
        if self.candidates.len() >= self.config.max_candidates {
            // Room is made by a refuted address first, else by one no more peers vouch for
            // than for the newcomer; never by one confirmed or being tested. Its back-off is
            // kept: a peer cycling addresses gets no fresh probes.
            let weakest = self
                .candidates
                .iter()
                .filter(|(_, c)| c.test == Test::Open && (c.refuted || c.reporters.len() <= 1))
                .min_by_key(|(_, c)| (!c.refuted, c.reporters.len()))
                .map(|(a, _)| a.clone());
            match weakest {
                Some(a) => {
                    self.candidates.remove(&a);
                }
                None => return,
            }
        }
        self.candidates.insert(
            addr,
            Candidate {
                reporters: BTreeSet::from([reporter]),
                test: Test::Open,
                failed_by: BTreeMap::new(),
                shunned: BTreeMap::new(),
                refuted: false,
            },
        );
    }

    /// `server` speaks AutoNAT and can be asked: a new chance for every open address, tested
    /// again at once.
    pub fn server_up(&mut self, server: P) {
        if !self.servers.insert(server.clone()) {
            return;
        }
        for (addr, c) in &self.candidates {
            if c.test == Test::Open && c.fresh(&server) {
                self.backoff.succeeded(addr);
            }
        }
    }

    /// `server` is gone (its probes time out by themselves).
    pub fn server_down(&mut self, server: &P) {
        self.servers.remove(server);
    }

    /// Whether `addr` was confirmed by a dial-back.
    pub fn is_confirmed(&self, addr: &A) -> bool {
        self.candidates
            .get(addr)
            .is_some_and(|c| c.test == Test::Confirmed)
    }

    /// Probes to send now: each open, due address (most reported first) with a server that
    /// has no probe out and is `usable` now (the driver's say: one whose dial-back our own
    /// connection limits would refuse is not). A server that has neither failed the address
    /// nor given no verdict on it comes first, then one that gave no verdict (longest ago
    /// first); while any server has not failed it, a server that did is not asked again
    /// (the address waits for the others to be free); only when all have failed it is the
    /// one that did so longest ago asked again.
    pub fn poll(
        &mut self,
        now: UnixMillis,
        usable: impl Fn(&P) -> bool,
        rng: &mut impl Rng,
    ) -> Vec<Probe<P, A>> {
        let mut busy: BTreeSet<P> = self
            .candidates
            .values()
            .filter_map(|c| match &c.test {
                Test::Pending { server, .. } => Some(server.clone()),
                _ => None,
            })
            .collect();
        let mut due: Vec<(usize, A)> = self
            .candidates
            .iter()
            .filter(|(a, c)| c.test == Test::Open && self.backoff.due(a, now))
            .map(|(a, c)| (c.reporters.len(), a.clone()))
            .collect();
        due.sort_by(|x, y| y.0.cmp(&x.0).then_with(|| x.1.cmp(&y.1)));
        let mut probes = Vec::new();
        for (_, addr) in due {
            let c = &self.candidates[&addr];
            let free: Vec<&P> = self
                .servers
                .iter()
                .filter(|s| !busy.contains(*s) && usable(s))
                .collect();
            let server = if self.servers.iter().any(|s| !c.failed_by.contains_key(s)) {
                let fresh: Vec<&P> = free.iter().copied().filter(|s| c.fresh(s)).collect();
                if fresh.is_empty() {
                    free.iter()
                        .copied()
                        .filter(|s| !c.failed_by.contains_key(*s))
                        .min_by_key(|s| c.shunned.get(*s).copied().unwrap_or(0))
                        .cloned()
                } else {
                    fresh.into_iter().choose(rng).cloned()
                }
            } else {
                free.iter()
                    .copied()
                    .min_by_key(|s| c.failed_by.get(*s).copied().unwrap_or(0))
                    .cloned()
            };
            let Some(server) = server else { continue };
            let nonce = rng.gen();
            busy.insert(server.clone());
            self.candidates.get_mut(&addr).expect("listed above").test = Test::Pending {
                nonce,
                server: server.clone(),
                at: now,
                dialled_back: false,
                claimed: false,
            };
            probes.push(Probe {
                nonce,
                server,
                addr,
            });
        }
        probes
    }

    /// `from` handed over `nonce` on a connection it dialled to us. Counts only from the
    /// server the probe went to.
    pub fn on_dial_back(&mut self, nonce: u64, from: &P, now: UnixMillis) -> Option<Finding<P, A>> {
        let (addr, c) = pending(&mut self.candidates, nonce)?;
        let (server, dialled_back, claimed) = c.probe_out()?;
        if server != from {
            return None;
        }
        *dialled_back = true;
        if !*claimed {
            return None;
        }
        let (addr, server) = (addr.clone(), server.clone());
        self.confirm(addr, server, false, now)
    }

    /// The server's verdict on the probe with `nonce`.
    pub fn on_answer(
        &mut self,
        nonce: u64,
        answer: Answer,
        now: UnixMillis,
        rng: &mut impl Rng,
    ) -> Option<Finding<P, A>> {
        let servers = self.servers.len();
        let refute_by = self.config.refute_by;
        let (addr, c) = pending(&mut self.candidates, nonce)?;
        let addr = addr.clone();
        let (server, dialled_back, claimed) = c.probe_out()?;
        let server = server.clone();
        if *dialled_back {
            // The dial-back came: whatever the server says, the address was reached, and a
            // server that calls it unreachable all the same lies.
            return self.confirm(addr, server, answer == Answer::Unreachable, now);
        }
        match answer {
            Answer::Reachable => {
                // The nonce may still be on its way (another stream): wait for it until the
                // probe times out.
                *claimed = true;
                None
            }
            Answer::Unreachable => {
                c.test = Test::Open;
                c.failed_by.insert(server, now);
                let others = self.servers.iter().any(|s| !c.failed_by.contains_key(s));
                let refuted = !c.refuted && c.failed_by.len() >= refute_by.min(servers.max(1));
                if refuted {
                    c.refuted = true;
                }
                if !others {
                    self.backoff.tried(addr.clone(), now, rng);
                }
                refuted.then_some(Finding::Refuted { addr })
            }
            Answer::Inconclusive => {
                c.test = Test::Open;
                c.shunned.insert(server, now);
                // Asked of another server at once where one may settle it; the address waits
                // only when nobody is left to ask.
                if !self.servers.iter().any(|s| c.fresh(s)) {
                    self.backoff.tried(addr, now, rng);
                }
                None
            }
        }
    }

    /// `addr` was reached by `confirmer`'s dial-back. The servers that called it unreachable
    /// lately are named, the confirmer itself only when it said so too (`lied`).
    fn confirm(
        &mut self,
        addr: A,
        confirmer: P,
        lied: bool,
        now: UnixMillis,
    ) -> Option<Finding<P, A>> {
        let window = self.config.charge_window_ms;
        let c = self.candidates.get_mut(&addr)?;
        c.test = Test::Confirmed;
        c.refuted = false;
        c.shunned.clear();
        let mut wrong: Vec<P> = std::mem::take(&mut c.failed_by)
            .into_iter()
            .filter(|(s, at)| *s != confirmer && now.saturating_sub(*at) <= window)
            .map(|(s, _)| s)
            .collect();
        if lied {
            wrong.push(confirmer);
        }
        self.backoff.succeeded(&addr);
        Some(Finding::Confirmed { addr, wrong })
    }

    /// Probes out for too long: one whose dial-back came confirms (the server's answer was
    /// lost); any other counts as no verdict (a server that claimed a dial-back that never
    /// came included). Returns what the expired probes settled.
    pub fn expire(&mut self, now: UnixMillis, rng: &mut impl Rng) -> Vec<Finding<P, A>> {
        let timeout = self.config.timeout_ms;
        let stale: Vec<u64> = self
            .candidates
            .values()
            .filter_map(|c| match &c.test {
                Test::Pending { nonce, at, .. } if now.saturating_sub(*at) >= timeout => {
                    Some(*nonce)
                }
                _ => None,
            })
            .collect();
        stale
            .into_iter()
            .filter_map(|nonce| self.on_answer(nonce, Answer::Inconclusive, now, rng))
            .collect()
    }

    /// Forgets a confirmed address that expired (the gateway or the network changed): it is
    /// tested again like a new one.
    pub fn reopen(&mut self, addr: &A) {
        if let Some(c) = self.candidates.get_mut(addr) {
            if c.test == Test::Confirmed {
                c.test = Test::Open;
            }
        }
    }
}

/// The candidate whose pending probe has `nonce`.
fn pending<P, A: Ord, R>(
    candidates: &mut BTreeMap<A, Candidate<P, R>>,
    nonce: u64,
) -> Option<(&A, &mut Candidate<P, R>)> {
    candidates
        .iter_mut()
        .find(|(_, c)| matches!(&c.test, Test::Pending { nonce: n, .. } if *n == nonce))
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    type P = u32;
    type A = &'static str;

    fn probes() -> (Probes<P, A>, StdRng) {
        (
            Probes::new(ProbeConfig::default()),
            StdRng::seed_from_u64(7),
        )
    }

    fn confirmed(addr: A, wrong: Vec<P>) -> Option<Finding<P, A>> {
        Some(Finding::Confirmed { addr, wrong })
    }

    fn only(probes: Vec<Probe<P, A>>) -> Probe<P, A> {
        assert_eq!(probes.len(), 1, "{probes:?}");
        probes.into_iter().next().unwrap()
    }

    #[test]
    fn a_dial_back_confirms_and_a_word_alone_does_not() {
        let (mut p, mut rng) = probes();
        p.add_candidate("a", 100);
        assert!(p.poll(0, |_| true, &mut rng).is_empty(), "no server yet");
        p.server_up(1);
        let probe = only(p.poll(0, |_| true, &mut rng));
        assert_eq!((probe.server, probe.addr), (1, "a"));
        assert!(
            p.poll(10, |_| true, &mut rng).is_empty(),
            "one probe per address"
        );
        // Said reachable without the nonce: not yet; the nonce from another peer: no.
        assert_eq!(
            p.on_answer(probe.nonce, Answer::Reachable, 20, &mut rng),
            None
        );
        assert_eq!(p.on_dial_back(probe.nonce, &2, 30), None);
        assert!(!p.is_confirmed(&"a"));
        let found = p.on_dial_back(probe.nonce, &1, 40);
        assert_eq!(found, confirmed("a", vec![]));
        assert!(p.is_confirmed(&"a"));
        assert!(
            p.poll(50, |_| true, &mut rng).is_empty(),
            "confirmed stays confirmed"
        );
        // A claim with no dial-back ever times out, inconclusive.
        p.add_candidate("b", 100);
        let probe = only(p.poll(100, |_| true, &mut rng));
        p.on_answer(probe.nonce, Answer::Reachable, 110, &mut rng);
        p.expire(100 + ProbeConfig::default().timeout_ms, &mut rng);
        assert!(!p.is_confirmed(&"b"));
    }

    #[test]
    fn one_liar_cannot_refute_a_reachable_address_and_pays_for_trying() {
        let (mut p, mut rng) = probes();
        p.add_candidate("a", 100);
        // Only the liar at first: its word is all there is.
        p.server_up(9);
        let probe = only(p.poll(0, |_| true, &mut rng));
        assert_eq!(probe.server, 9);
        assert_eq!(
            p.on_answer(probe.nonce, Answer::Unreachable, 10, &mut rng),
            Some(Finding::Refuted { addr: "a" })
        );
        assert!(
            p.poll(20, |_| true, &mut rng).is_empty(),
            "backing off, nobody else to ask"
        );
        // An honest server appears: asked at once, and its dial-back settles it.
        p.server_up(1);
        let probe = only(p.poll(30, |_| true, &mut rng));
        assert_eq!(probe.server, 1);
        p.on_dial_back(probe.nonce, &1, 40);
        assert_eq!(
            p.on_answer(probe.nonce, Answer::Reachable, 50, &mut rng),
            confirmed("a", vec![9])
        );
    }

    #[test]
    fn a_failure_is_asked_again_of_another_server_before_it_refutes() {
        let (mut p, mut rng) = probes();
        p.add_candidate("a", 100);
        p.server_up(1);
        p.server_up(2);
        let first = only(p.poll(0, |_| true, &mut rng));
        assert_eq!(
            p.on_answer(first.nonce, Answer::Unreachable, 10, &mut rng),
            None,
            "one server of two is not enough"
        );
        let second = only(p.poll(20, |_| true, &mut rng));
        assert_ne!(second.server, first.server, "asked of the other at once");
        assert_eq!(
            p.on_answer(second.nonce, Answer::Unreachable, 30, &mut rng),
            Some(Finding::Refuted { addr: "a" })
        );
        // Refuted once; later tests back off and do not report it again.
        assert!(p.poll(40, |_| true, &mut rng).is_empty());
        let later = 40 + ProbeConfig::default().retest.max_ms;
        let third = only(p.poll(later, |_| true, &mut rng));
        assert_eq!(
            third.server, first.server,
            "the oldest failure is asked again"
        );
        assert_eq!(
            p.on_answer(third.nonce, Answer::Unreachable, later, &mut rng),
            None
        );
        // A dial-back long after the failures charges nobody.
        let fourth = only(p.poll(later * 3, |_| true, &mut rng));
        p.on_dial_back(fourth.nonce, &fourth.server, later * 3);
        let found = p.on_answer(fourth.nonce, Answer::Reachable, later * 3, &mut rng);
        assert_eq!(found, confirmed("a", vec![]));
    }

    #[test]
    fn a_failed_address_waits_for_a_busy_fresh_server_rather_than_ask_its_failer_again() {
        let (mut p, mut rng) = probes();
        p.add_candidate("a", 100);
        p.server_up(9);
        let first = only(p.poll(0, |_| true, &mut rng));
        p.on_answer(first.nonce, Answer::Unreachable, 10, &mut rng);
        // An honest server appears, and another address takes it first.
        p.add_candidate("b", 100);
        p.add_candidate("b", 101);
        p.add_candidate("b", 102);
        p.server_up(1);
        let probes = p.poll(20, |_| true, &mut rng);
        assert!(
            probes.iter().all(|x| !(x.server == 9 && x.addr == "a")),
            "not asked again of the server that failed it: {probes:?}"
        );
        if let Some(to_one) = probes.iter().find(|x| x.server == 1 && x.addr == "b") {
            // 1 was busy with b: a waited, and goes to 1 once it is free.
            assert_eq!(probes.len(), 1, "{probes:?}");
            p.on_answer(to_one.nonce, Answer::Inconclusive, 30, &mut rng);
            // b, given no verdict by 1, goes to 9 at once; a to 1.
            let mut next: Vec<_> = p
                .poll(40, |_| true, &mut rng)
                .into_iter()
                .map(|x| (x.server, x.addr))
                .collect();
            next.sort();
            assert_eq!(next, vec![(1, "a"), (9, "b")]);
        } else {
            assert!(
                probes.iter().any(|x| x.server == 1 && x.addr == "a"),
                "{probes:?}"
            );
        }
    }

    #[test]
    fn a_dial_back_is_proof_whatever_the_server_says_and_its_own_earlier_failure_is_forgiven() {
        let (mut p, mut rng) = probes();
        p.add_candidate("a", 100);
        p.server_up(1);
        // 1 fails a once (a passing fault), then its own dial-back reaches a: not charged.
        let probe = only(p.poll(0, |_| true, &mut rng));
        p.on_answer(probe.nonce, Answer::Unreachable, 10, &mut rng);
        let later = ProbeConfig::default().retest.max_ms * 2;
        let probe = only(p.poll(later, |_| true, &mut rng));
        p.on_dial_back(probe.nonce, &1, later);
        assert_eq!(
            p.on_answer(probe.nonce, Answer::Reachable, later, &mut rng),
            confirmed("a", vec![])
        );
        // A server that dialled back and then says "unreachable" lies, and is named.
        p.add_candidate("b", 100);
        let probe = only(p.poll(later, |_| true, &mut rng));
        p.on_dial_back(probe.nonce, &1, later);
        assert_eq!(
            p.on_answer(probe.nonce, Answer::Unreachable, later, &mut rng),
            confirmed("b", vec![1])
        );
        // A dial-back whose answer never comes confirms when the probe expires.
        p.add_candidate("c", 100);
        let probe = only(p.poll(later, |_| true, &mut rng));
        p.on_dial_back(probe.nonce, &1, later);
        let settled = p.expire(later + ProbeConfig::default().timeout_ms, &mut rng);
        assert_eq!(
            settled,
            vec![Finding::Confirmed {
                addr: "c",
                wrong: vec![]
            }]
        );
    }

    #[test]
    fn servers_the_driver_cannot_use_now_are_not_asked() {
        let (mut p, mut rng) = probes();
        p.add_candidate("a", 100);
        p.server_up(9);
        let first = only(p.poll(0, |_| true, &mut rng));
        p.on_answer(first.nonce, Answer::Unreachable, 10, &mut rng);
        p.server_up(1);
        // 1 has no room for a dial-back now: a waits for it, not asking 9 again.
        assert!(p.poll(20, |s| *s != 1, &mut rng).is_empty());
        let next = only(p.poll(30, |_| true, &mut rng));
        assert_eq!((next.server, next.addr), (1, "a"));
    }

    #[test]
    fn inconclusive_answers_back_off_and_servers_take_one_probe_at_a_time() {
        let (mut p, mut rng) = probes();
        p.add_candidate("a", 100);
        p.add_candidate("b", 100);
        p.add_candidate("b", 101);
        p.server_up(1);
        let probe = only(p.poll(0, |_| true, &mut rng));
        assert_eq!(probe.addr, "b", "the most reported first");
        assert_eq!(
            p.on_answer(probe.nonce, Answer::Inconclusive, 10, &mut rng),
            None
        );
        let next = only(p.poll(20, |_| true, &mut rng));
        assert_eq!(next.addr, "a", "b backs off; the free server takes a");
        // Unknown nonces change nothing.
        assert_eq!(p.on_answer(12345, Answer::Unreachable, 30, &mut rng), None);
        assert_eq!(p.on_dial_back(12345, &1, 30), None);
    }

    #[test]
    fn candidates_are_bounded_and_well_reported_ones_stay() {
        let (mut p, _) = probes();
        let max = ProbeConfig::default().max_candidates;
        let names: Vec<&'static str> = (0..max * 4)
            .map(|i| &*Box::leak(format!("x{i}").into_boxed_str()))
            .collect();
        p.add_candidate("real", 100);
        p.add_candidate("real", 101);
        for n in &names {
            // One peer reporting a flood of addresses, each again and again.
            p.add_candidate(n, 666);
            p.add_candidate(n, 666);
        }
        assert_eq!(p.candidates.len(), max);
        assert!(p.candidates.contains_key(&"real"));
    }

    #[test]
    fn reporters_counted_by_network_keep_sybils_of_one_network_from_the_slots() {
        // Reporters as the driver counts them: by the network they report from. Sybils on one
        // network report fakes two keys each; every fake counts one reporter, so a real
        // address newly seen by one honest network still gets a slot and is probed first once
        // a second network reports it.
        let mut p: Probes<u32, &str, &str> = Probes::new(ProbeConfig::default());
        let mut rng = StdRng::seed_from_u64(7);
        let max = ProbeConfig::default().max_candidates;
        let fakes: Vec<&'static str> = (0..max)
            .map(|i| &*Box::leak(format!("fake{i}").into_boxed_str()))
            .collect();
        for f in &fakes {
            p.add_candidate(f, "10.0.0.0/24");
            p.add_candidate(f, "10.0.0.0/24");
        }
        p.add_candidate("real", "192.0.2.0/24");
        assert!(p.candidates.contains_key(&"real"), "a newcomer gets a slot");
        assert_eq!(p.candidates.len(), max);
        p.add_candidate("real", "198.51.100.0/24");
        p.server_up(1);
        let probes = p.poll(0, |_| true, &mut rng);
        assert_eq!(probes.len(), 1, "one probe per server at a time");
        assert_eq!(
            probes[0].addr, "real",
            "the best-reported address is probed first"
        );
    }
}
