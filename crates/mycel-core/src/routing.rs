//! Where a task runs: candidates (the providers of a model, the local node among them) ranked
//! by reliability, load and round-trip time, with Thompson sampling on reliability so that new
//! or recovering peers still get some traffic. The caller tries the ranking in order: the
//! first is the choice, the rest are the failover order.

use std::collections::HashMap;
use std::hash::Hash;

use rand::Rng;
use rand_distr::{Beta, Distribution};

use crate::UnixMillis;

/// How much each signal counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// Weight of the (sampled or mean) success rate, in [0, 1].
    pub reliability: f64,
    /// Weight of the load penalty (queue depth and utilisation), in [0, 1.5).
    pub load: f64,
    /// Weight of the round-trip penalty, rtt / (rtt + `rtt_scale_ms`), in [0, 1).
    pub rtt: f64,
    /// Round-trip time at which the penalty is half its weight.
    pub rtt_scale_ms: f64,
    /// Sample reliability (Thompson sampling) instead of using its mean.
    pub explore: bool,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            reliability: 1.0,
            load: 1.0,
            rtt: 0.5,
            rtt_scale_ms: 20.0,
            explore: true,
        }
    }
}

/// A peer that could run a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<P> {
    /// Who.
    pub peer: P,
    /// Measured round-trip time; `None` when unknown (counted as the median of the
    /// candidates' measured ones, see [`rank`]). The local node has 0.
    pub rtt_ms: Option<f64>,
    /// Tasks waiting or running there.
    pub queue_depth: u32,
    /// Fraction of its compute in use, 0 to 1.
    pub utilisation: f32,
}

/// Successes and failures of one peer, decayed so that old outcomes fade.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Record {
    /// Decayed count of tasks it completed.
    pub successes: f64,
    /// Decayed count of tasks it failed (error, timeout, wrong answer, death).
    pub failures: f64,
}

impl Record {
    /// The posterior mean success rate with a uniform prior.
    pub fn mean(&self) -> f64 {
        (self.successes + 1.0) / (self.successes + self.failures + 2.0)
    }
}

/// Outcomes per peer, halving every `half_life_ms`.
#[derive(Debug, Clone)]
pub struct Reliability<P> {
    records: HashMap<P, (Record, UnixMillis)>,
    half_life_ms: f64,
}

impl<P: Eq + Hash + Clone> Reliability<P> {
    /// Outcomes fade by half every `half_life_ms`.
    pub fn new(half_life_ms: u64) -> Self {
        Self {
            records: HashMap::new(),
            half_life_ms: half_life_ms.max(1) as f64,
        }
    }

    fn decayed(&self, record: Record, since: UnixMillis, now: UnixMillis) -> Record {
        let factor = 0.5f64.powf(now.saturating_sub(since) as f64 / self.half_life_ms);
        Record {
            successes: record.successes * factor,
            failures: record.failures * factor,
        }
    }

    fn add(&mut self, peer: &P, now: UnixMillis, success: bool) {
        let current = self.record(peer, now);
        let mut next = current;
        if success {
            next.successes += 1.0;
        } else {
            next.failures += 1.0;
        }
        self.records.insert(peer.clone(), (next, now));
    }

    /// `peer` completed a task.
    pub fn success(&mut self, peer: &P, now: UnixMillis) {
        self.add(peer, now, true);
    }

    /// `peer` failed a task.
    pub fn failure(&mut self, peer: &P, now: UnixMillis) {
        self.add(peer, now, false);
    }

    /// The record of `peer` at `now` (empty for a peer never tried).
    pub fn record(&self, peer: &P, now: UnixMillis) -> Record {
        self.records
            .get(peer)
            .map(|(record, at)| self.decayed(*record, *at, now))
            .unwrap_or_default()
    }
}

/// Ranks `candidates`, best first. `record` gives each one's reliability record.
///
/// A round trip not yet measured counts as the median of the measured ones (`rtt_scale_ms`
/// when none is): a peer this node has no connection to is neither favoured nor left out.
/// Counted as the scale, it ranked below every measured peer, so exploration never reached
/// it and it was never asked (two liars in `bench byzantine` took part in no task in 1,000).
pub fn rank<P: Clone, R: Rng + ?Sized>(
    candidates: &[Candidate<P>],
    record: impl Fn(&P) -> Record,
    weights: &Weights,
    rng: &mut R,
) -> Vec<P> {
    let mut measured: Vec<f64> = candidates
        .iter()
        .filter_map(|c| c.rtt_ms)
        .filter(|r| r.is_finite())
        .collect();
    measured.sort_by(f64::total_cmp);
    let unmeasured = match measured.len() {
        0 => weights.rtt_scale_ms,
        n if n % 2 == 1 => measured[n / 2],
        n => (measured[n / 2 - 1] + measured[n / 2]) / 2.0,
    };
    let mut scored: Vec<(f64, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let r = record(&c.peer);
            let reliability = if weights.explore {
                Beta::new(r.successes + 1.0, r.failures + 1.0)
                    .map(|beta| beta.sample(rng))
                    .unwrap_or_else(|_| r.mean())
            } else {
                r.mean()
            };
            let queue = f64::from(c.queue_depth);
            // Figures from peers: a non-finite one counts as the worst.
            let utilisation = if c.utilisation.is_finite() {
                c.utilisation.clamp(0.0, 1.0)
            } else {
                1.0
            };
            let load = queue / (queue + 4.0) + 0.5 * f64::from(utilisation);
            let rtt = match c.rtt_ms {
                None => unmeasured,
                Some(rtt) if rtt.is_finite() => rtt,
                Some(_) => weights.rtt_scale_ms,
            }
            .max(0.0);
            let rtt = rtt / (rtt + weights.rtt_scale_ms.max(1e-9));
            let score = weights.reliability * reliability - weights.load * load - weights.rtt * rtt;
            (score, i)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored
        .into_iter()
        .map(|(_, i)| candidates[i].peer.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn candidate(peer: u32, rtt: f64, queue: u32, util: f32) -> Candidate<u32> {
        Candidate {
            peer,
            rtt_ms: Some(rtt),
            queue_depth: queue,
            utilisation: util,
        }
    }

    proptest! {
        #[test]
        fn ranking_is_a_permutation(
            specs in proptest::collection::vec((0.0f64..500.0, 0u32..50, 0.0f32..1.0, 0u8..20, 0u8..20), 0..12),
            seed in any::<u64>(),
        ) {
            let candidates: Vec<Candidate<u32>> = specs
                .iter()
                .enumerate()
                .map(|(i, (rtt, q, u, _, _))| candidate(i as u32, *rtt, *q, *u))
                .collect();
            let records: Vec<Record> = specs
                .iter()
                .map(|(_, _, _, s, f)| Record { successes: f64::from(*s), failures: f64::from(*f) })
                .collect();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut ranked = rank(&candidates, |p| records[*p as usize], &Weights::default(), &mut rng);
            ranked.sort_unstable();
            prop_assert_eq!(ranked, (0..specs.len() as u32).collect::<Vec<_>>());
        }

        /// Without exploration, a candidate at least as good on every signal and better on
        /// one ranks ahead.
        #[test]
        fn dominant_candidates_rank_first(
            rtt in 0.0f64..200.0, queue in 0u32..20, util in 0.0f32..1.0,
            successes in 0u8..30, failures in 0u8..30,
            better in 0usize..4, by in 1u8..10,
        ) {
            let worse = candidate(1, rtt, queue, util);
            let mut good = candidate(0, rtt, queue, util);
            let mut good_record = Record { successes: f64::from(successes), failures: f64::from(failures) };
            let worse_record = good_record;
            match better {
                0 => good.rtt_ms = Some((rtt - f64::from(by)).max(0.0)),
                1 => good.queue_depth = queue.saturating_sub(u32::from(by)),
                2 => good.utilisation = (util - 0.05 * f32::from(by)).max(0.0),
                _ => good_record.successes += f64::from(by),
            }
            let strictly_better = good.rtt_ms < worse.rtt_ms
                || good.queue_depth < worse.queue_depth
                || good.utilisation < worse.utilisation
                || good_record.successes > worse_record.successes;
            prop_assume!(strictly_better);
            let weights = Weights { explore: false, ..Weights::default() };
            let mut rng = StdRng::seed_from_u64(0);
            let records = [good_record, worse_record];
            let ranked = rank(&[worse, good], |p| records[*p as usize], &weights, &mut rng);
            prop_assert_eq!(ranked, vec![0, 1]);
        }
    }

    #[test]
    fn exploration_gives_new_peers_traffic_and_shuns_failing_ones() {
        let veteran = candidate(0, 5.0, 0, 0.0);
        let newcomer = candidate(1, 5.0, 0, 0.0);
        let mut rng = StdRng::seed_from_u64(42);
        let first_picks = |records: [Record; 2], rng: &mut StdRng| {
            (0..2000)
                .filter(|_| {
                    rank(
                        &[veteran.clone(), newcomer.clone()],
                        |p| records[*p as usize],
                        &Weights::default(),
                        rng,
                    )[0] == 1
                })
                .count()
        };
        // A reliable veteran (20 of 21) still leaves the newcomer some of the traffic...
        let good = Record {
            successes: 20.0,
            failures: 1.0,
        };
        let newcomer_share = first_picks([good, Record::default()], &mut rng);
        assert!((50..1000).contains(&newcomer_share), "{newcomer_share}");
        // ...and a failing one loses most of it to the newcomer.
        let bad = Record {
            successes: 1.0,
            failures: 20.0,
        };
        let newcomer_share = first_picks([bad, Record::default()], &mut rng);
        assert!(newcomer_share > 1800, "{newcomer_share}");
    }

    #[test]
    fn the_local_node_wins_when_idle_and_loses_when_swamped() {
        let weights = Weights {
            explore: false,
            ..Weights::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let local = candidate(0, 0.0, 0, 0.1);
        let remote = candidate(1, 0.4, 0, 0.1);
        let even = |_: &u32| Record {
            successes: 10.0,
            failures: 0.0,
        };
        assert_eq!(
            rank(&[remote.clone(), local.clone()], even, &weights, &mut rng)[0],
            0
        );
        let swamped = Candidate {
            queue_depth: 16,
            utilisation: 1.0,
            ..local
        };
        assert_eq!(rank(&[remote, swamped], even, &weights, &mut rng)[0], 1);
    }

    #[test]
    fn non_finite_figures_never_rank_first() {
        let mut rng = StdRng::seed_from_u64(3);
        let weights = Weights {
            explore: false,
            ..Weights::default()
        };
        let even = |_: &u32| Record::default();
        let sane = candidate(0, 5.0, 0, 0.5);
        let nan = Candidate {
            utilisation: f32::NAN,
            ..candidate(1, 5.0, 0, 0.0)
        };
        let inf = Candidate {
            rtt_ms: Some(f64::NAN),
            ..candidate(2, 0.0, 0, 0.5)
        };
        assert_eq!(rank(&[nan, inf, sane], even, &weights, &mut rng)[0], 0);
    }

    #[test]
    fn an_unmeasured_round_trip_ranks_as_the_median_one() {
        let mut rng = StdRng::seed_from_u64(4);
        let weights = Weights {
            explore: false,
            ..Weights::default()
        };
        let even = |_: &u32| Record::default();
        let unmeasured = Candidate {
            rtt_ms: None,
            ..candidate(2, 0.0, 0, 0.0)
        };
        let near = candidate(0, 0.1, 0, 0.0);
        let far = candidate(1, 5.0, 0, 0.0);
        assert_eq!(
            rank(&[far, unmeasured, near], even, &weights, &mut rng),
            vec![0, 2, 1]
        );
    }

    #[test]
    fn outcomes_fade_with_time() {
        let mut reliability = Reliability::new(1_000);
        reliability.failure(&7u32, 0);
        reliability.failure(&7u32, 0);
        assert_eq!(reliability.record(&7, 0).failures, 2.0);
        let later = reliability.record(&7, 1_000);
        assert!((later.failures - 1.0).abs() < 1e-9);
        reliability.success(&7, 1_000);
        let now = reliability.record(&7, 1_000);
        assert_eq!(now.successes, 1.0);
        assert!(
            reliability.record(&8, 5).mean() == 0.5,
            "unknown peers start even"
        );
    }
}
