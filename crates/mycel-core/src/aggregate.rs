//! Aggregating the updates of federated-training participants.
//!
//! An update is the change a participant made to the global weights in a round (its local
//! weights minus the global ones), flattened, with the number of samples it trained on.
//! [`aggregate`] combines one round's updates by a [`Rule`]: FedAvg (weighted by samples) or
//! one of the Byzantine-robust rules (coordinate-wise median, trimmed mean, Krum,
//! multi-Krum), optionally after an [`iqr_filter`] on update norms; a [`ServerOptimizer`]
//! then applies the aggregate to the global weights (plain, FedAvgM momentum, or FedAdam).
//!
//! Pure: no I/O, no clock, no randomness. Robust rules bound what `f` arbitrary updates can
//! do (see the property tests): median and trimmed mean (trimming at least `f` from each
//! side) stay inside the honest updates' range in every coordinate; Krum and multi-Krum stay
//! within a bounded distance of the honest updates when `n > 2f + 2`.

use thiserror::Error;

/// One participant's update.
#[derive(Debug, Clone, Copy)]
pub struct Update<'a> {
    /// Local weights minus global weights, flattened.
    pub delta: &'a [f32],
    /// Samples it was trained on (FedAvg's weight).
    pub samples: u64,
}

/// How a round's updates are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The mean weighted by samples (McMahan et al., 2017).
    FedAvg,
    /// The coordinate-wise median.
    Median,
    /// The coordinate-wise mean after dropping the `beta` fraction largest and smallest
    /// values (`floor(beta * n)` from each side).
    TrimmedMean {
        /// Fraction trimmed from each side, in `[0, 0.5)`.
        beta: f64,
    },
    /// The one update closest to its `n - f - 2` nearest neighbours (Blanchard et al., 2017).
    Krum {
        /// Byzantine updates tolerated.
        f: usize,
    },
    /// The mean of the `m` updates with the best Krum scores.
    MultiKrum {
        /// Byzantine updates tolerated.
        f: usize,
        /// Updates averaged.
        m: usize,
    },
}

/// Why updates cannot be aggregated.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AggregateError {
    /// No update to aggregate.
    #[error("no updates to aggregate")]
    Empty,
    /// Updates of different lengths.
    #[error("update {index} has {got} values, the first has {expected}")]
    Length {
        /// Which update.
        index: usize,
        /// Its length.
        got: usize,
        /// The first update's length.
        expected: usize,
    },
    /// A NaN or infinite value.
    #[error("update {index} holds a value that is not finite")]
    NotFinite {
        /// Which update.
        index: usize,
    },
    /// The rule's parameters do not fit this many updates.
    #[error("{0}")]
    Parameters(String),
}

/// A round's aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregated {
    /// The combined update.
    pub delta: Vec<f32>,
    /// Indices of the updates the rule selected (all of them for coordinate-wise rules).
    pub selected: Vec<usize>,
}

/// Checks that `updates` can be aggregated: some, equally long, finite.
pub fn check(updates: &[Update]) -> Result<usize, AggregateError> {
    let first = updates.first().ok_or(AggregateError::Empty)?;
    let len = first.delta.len();
    for (index, update) in updates.iter().enumerate() {
        if update.delta.len() != len {
            return Err(AggregateError::Length {
                index,
                got: update.delta.len(),
                expected: len,
            });
        }
        if update.delta.iter().any(|v| !v.is_finite()) {
            return Err(AggregateError::NotFinite { index });
        }
    }
    Ok(len)
}

/// Combines `updates` by `rule`.
pub fn aggregate(rule: Rule, updates: &[Update]) -> Result<Aggregated, AggregateError> {
    let len = check(updates)?;
    let n = updates.len();
    let all = || (0..n).collect::<Vec<_>>();
    match rule {
        Rule::FedAvg => {
            // Summed wide: claimed counts are bounded by the caller, but never overflow here.
            let total: u128 = updates.iter().map(|u| u128::from(u.samples)).sum();
            let weights: Vec<f64> = if total == 0 {
                vec![1.0 / n as f64; n]
            } else {
                updates
                    .iter()
                    .map(|u| u.samples as f64 / total as f64)
                    .collect()
            };
            let mut sum = vec![0f64; len];
            for (update, w) in updates.iter().zip(&weights) {
                for (s, v) in sum.iter_mut().zip(update.delta) {
                    *s += w * f64::from(*v);
                }
            }
            Ok(Aggregated {
                delta: sum.into_iter().map(|v| v as f32).collect(),
                selected: all(),
            })
        }
        Rule::Median => Ok(Aggregated {
            delta: coordinate_wise(updates, len, |column| {
                let mid = column.len() / 2;
                if column.len() % 2 == 1 {
                    f64::from(column[mid])
                } else {
                    (f64::from(column[mid - 1]) + f64::from(column[mid])) / 2.0
                }
            }),
            selected: all(),
        }),
        Rule::TrimmedMean { beta } => {
            if !(0.0..0.5).contains(&beta) {
                return Err(AggregateError::Parameters(format!(
                    "trimmed mean: beta must be in [0, 0.5), not {beta}"
                )));
            }
            let k = (beta * n as f64).floor() as usize;
            if n <= 2 * k {
                return Err(AggregateError::Parameters(format!(
                    "trimmed mean: trimming {k} from each side of {n} updates leaves none"
                )));
            }
            Ok(Aggregated {
                delta: coordinate_wise(updates, len, |column| {
                    let kept = &column[k..column.len() - k];
                    kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64
                }),
                selected: all(),
            })
        }
        Rule::Krum { f } => multi_krum(updates, len, f, 1),
        Rule::MultiKrum { f, m } => multi_krum(updates, len, f, m),
    }
}

/// Applies `reduce` to each coordinate's values, sorted.
fn coordinate_wise(updates: &[Update], len: usize, reduce: impl Fn(&[f32]) -> f64) -> Vec<f32> {
    let mut column = vec![0f32; updates.len()];
    (0..len)
        .map(|i| {
            for (slot, update) in column.iter_mut().zip(updates) {
                *slot = update.delta[i];
            }
            column.sort_unstable_by(f32::total_cmp);
            reduce(&column) as f32
        })
        .collect()
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum()
}

fn multi_krum(
    updates: &[Update],
    len: usize,
    f: usize,
    m: usize,
) -> Result<Aggregated, AggregateError> {
    let n = updates.len();
    if f.checked_mul(2)
        .and_then(|x| x.checked_add(3))
        .is_none_or(|need| n < need)
    {
        return Err(AggregateError::Parameters(format!(
            "Krum with f = {f} needs at least {} updates, got {n}",
            f.saturating_mul(2).saturating_add(3)
        )));
    }
    if m == 0 || m > n - f {
        return Err(AggregateError::Parameters(format!(
            "multi-Krum: m must be in 1..={}, not {m}",
            n - f
        )));
    }
    let mut distances = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let d = squared_distance(updates[i].delta, updates[j].delta);
            distances[i][j] = d;
            distances[j][i] = d;
        }
    }
    let neighbours = n - f - 2;
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n)
                .filter(|j| *j != i)
                .map(|j| distances[i][j])
                .collect();
            others.sort_unstable_by(f64::total_cmp);
            (others[..neighbours].iter().sum(), i)
        })
        .collect();
    scores.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut selected: Vec<usize> = scores[..m].iter().map(|(_, i)| *i).collect();
    selected.sort_unstable();
    let mut sum = vec![0f64; len];
    for i in &selected {
        for (s, v) in sum.iter_mut().zip(updates[*i].delta) {
            *s += f64::from(*v);
        }
    }
    Ok(Aggregated {
        delta: sum.into_iter().map(|v| (v / m as f64) as f32).collect(),
        selected,
    })
}

/// The indices of the updates whose L2 norms lie within `k` interquartile ranges of the
/// middle half (Tukey's fences; `k = 1.5` is customary), and those outside.
pub fn iqr_filter(updates: &[Update], k: f64) -> (Vec<usize>, Vec<usize>) {
    let norms: Vec<f64> = updates
        .iter()
        .map(|u| {
            u.delta
                .iter()
                .map(|v| f64::from(*v) * f64::from(*v))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    if norms.len() < 4 {
        return ((0..norms.len()).collect(), Vec::new());
    }
    let mut sorted = norms.clone();
    sorted.sort_unstable_by(f64::total_cmp);
    let q1 = quantile(&sorted, 0.25);
    let q3 = quantile(&sorted, 0.75);
    let (low, high) = (q1 - k * (q3 - q1), q3 + k * (q3 - q1));
    (0..norms.len()).partition(|i| (low..=high).contains(&norms[*i]))
}

/// FedAvg for sparse (top-k) updates: each coordinate is the sample-weighted mean over the
/// updates that carry it (a nonzero value). With error feedback a participant holds back most
/// coordinates for later rounds; averaging its zeros in would dilute every coordinate by the
/// number of participants that happened not to send it.
pub fn fedavg_sparse(updates: &[Update]) -> Result<Aggregated, AggregateError> {
    let len = check(updates)?;
    let mut sum = vec![0f64; len];
    let mut weight = vec![0f64; len];
    for update in updates {
        let w = update.samples.max(1) as f64;
        for ((s, total), v) in sum.iter_mut().zip(&mut weight).zip(update.delta) {
            if *v != 0.0 {
                *s += w * f64::from(*v);
                *total += w;
            }
        }
    }
    Ok(Aggregated {
        delta: sum
            .iter()
            .zip(&weight)
            .map(|(s, w)| if *w > 0.0 { (s / w) as f32 } else { 0.0 })
            .collect(),
        selected: (0..updates.len()).collect(),
    })
}

/// Linear-interpolated quantile `q` of sorted `values`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

/// How the aggregate moves the global weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOptimizer {
    /// `w += lr * delta` (FedAvg itself with `lr = 1`).
    Sgd {
        /// Server learning rate.
        lr: f32,
    },
    /// Server momentum (Hsu et al., 2019): `v = momentum * v + delta; w += lr * v`.
    FedAvgM {
        /// Server learning rate.
        lr: f32,
        /// Momentum.
        momentum: f32,
    },
    /// Adam on the server (Reddi et al., 2021): `m = b1 m + (1 - b1) delta`,
    /// `v = b2 v + (1 - b2) delta^2`, `w += lr * m / (sqrt(v) + tau)`.
    FedAdam {
        /// Server learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Adaptivity (the paper's tau).
        tau: f32,
    },
}

/// The server optimizer's state across rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerState {
    /// Momentum or first moment.
    pub m: Vec<f32>,
    /// Second moment (FedAdam).
    pub v: Vec<f32>,
}

impl ServerOptimizer {
    /// Moves `weights` by the round's aggregate `delta`.
    pub fn apply(
        &self,
        state: &mut ServerState,
        weights: &mut [f32],
        delta: &[f32],
    ) -> Result<(), AggregateError> {
        if weights.len() != delta.len() {
            return Err(AggregateError::Length {
                index: 0,
                got: delta.len(),
                expected: weights.len(),
            });
        }
        match *self {
            ServerOptimizer::Sgd { lr } => {
                for (w, d) in weights.iter_mut().zip(delta) {
                    *w += lr * d;
                }
            }
            ServerOptimizer::FedAvgM { lr, momentum } => {
                state.m.resize(weights.len(), 0.0);
                for ((w, d), m) in weights.iter_mut().zip(delta).zip(&mut state.m) {
                    *m = momentum * *m + d;
                    *w += lr * *m;
                }
            }
            ServerOptimizer::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                state.m.resize(weights.len(), 0.0);
                state.v.resize(weights.len(), 0.0);
                for (((w, d), m), v) in weights
                    .iter_mut()
                    .zip(delta)
                    .zip(&mut state.m)
                    .zip(&mut state.v)
                {
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    *v = beta2 * *v + (1.0 - beta2) * d * d;
                    *w += lr * *m / (v.sqrt() + tau);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn updates(deltas: &[Vec<f32>]) -> Vec<Update<'_>> {
        deltas
            .iter()
            .map(|d| Update {
                delta: d,
                samples: 1,
            })
            .collect()
    }

    #[test]
    fn fedavg_weights_by_samples() {
        let a = [1.0, 2.0];
        let b = [4.0, -1.0];
        let out = aggregate(
            Rule::FedAvg,
            &[
                Update {
                    delta: &a,
                    samples: 1,
                },
                Update {
                    delta: &b,
                    samples: 3,
                },
            ],
        )
        .unwrap();
        // (1*1 + 3*4)/4 = 3.25; (1*2 + 3*-1)/4 = -0.25
        assert_eq!(out.delta, vec![3.25, -0.25]);
        assert_eq!(out.selected, vec![0, 1]);
    }

    #[test]
    fn fedavg_sums_claimed_samples_without_overflow() {
        let (a, b) = ([2.0], [4.0]);
        let claims = [u64::MAX, u64::MAX];
        let updates = [
            Update {
                delta: &a,
                samples: claims[0],
            },
            Update {
                delta: &b,
                samples: claims[1],
            },
        ];
        assert_eq!(aggregate(Rule::FedAvg, &updates).unwrap().delta, vec![3.0]);
        assert_eq!(fedavg_sparse(&updates).unwrap().delta, vec![3.0]);
    }

    #[test]
    fn sparse_fedavg_averages_each_coordinate_over_its_senders() {
        let a = [2.0, 0.0, 0.0];
        let b = [4.0, 6.0, 0.0];
        let out = fedavg_sparse(&[
            Update {
                delta: &a,
                samples: 1,
            },
            Update {
                delta: &b,
                samples: 3,
            },
        ])
        .unwrap();
        // (1*2 + 3*4)/4 = 3.5; only b sent the second (6); nobody the third.
        assert_eq!(out.delta, vec![3.5, 6.0, 0.0]);
        assert!(fedavg_sparse(&[]).is_err());
    }

    #[test]
    fn median_and_trimmed_mean_by_hand() {
        let d = vec![
            vec![1.0, 10.0],
            vec![2.0, -5.0],
            vec![100.0, 0.0],
            vec![3.0, 1.0],
            vec![-50.0, 2.0],
        ];
        let u = updates(&d);
        // Sorted columns: [-50, 1, 2, 3, 100] and [-5, 0, 1, 2, 10].
        assert_eq!(aggregate(Rule::Median, &u).unwrap().delta, vec![2.0, 1.0]);
        let trimmed = aggregate(Rule::TrimmedMean { beta: 0.2 }, &u).unwrap();
        // One trimmed from each side: (1+2+3)/3 = 2; (0+1+2)/3 = 1.
        assert_eq!(trimmed.delta, vec![2.0, 1.0]);
        // An even count: the median is the middle pair's mean.
        let even = updates(&d[..4]);
        assert_eq!(
            aggregate(Rule::Median, &even).unwrap().delta,
            vec![2.5, 0.5]
        );
        assert!(matches!(
            aggregate(Rule::TrimmedMean { beta: 0.5 }, &u),
            Err(AggregateError::Parameters(_))
        ));
    }

    #[test]
    fn krum_picks_the_update_in_the_crowd_and_multi_krum_averages_the_best() {
        let d = vec![
            vec![0.0, 0.0],
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![1.0, 1.0],
            vec![0.5, 0.5],
            vec![100.0, -100.0],
        ];
        let u = updates(&d);
        // f = 1: each score sums the 3 nearest squared distances. The centre (0.5, 0.5) is
        // 0.5 from each corner: 1.5; a corner: 0.5 (centre) + 1 + 1 = 2.5; the outlier: huge.
        let krum = aggregate(Rule::Krum { f: 1 }, &u).unwrap();
        assert_eq!(krum.selected, vec![4]);
        assert_eq!(krum.delta, vec![0.5, 0.5]);
        let multi = aggregate(Rule::MultiKrum { f: 1, m: 5 }, &u).unwrap();
        assert_eq!(multi.selected, vec![0, 1, 2, 3, 4]);
        assert_eq!(multi.delta, vec![0.5, 0.5]);
        assert!(matches!(
            aggregate(Rule::Krum { f: 2 }, &u),
            Err(AggregateError::Parameters(_))
        ));
    }

    #[test]
    fn the_iqr_filter_drops_updates_with_outlying_norms() {
        let d = vec![
            vec![1.0, 0.0],
            vec![0.0, 1.1],
            vec![0.9, 0.0],
            vec![1.0, 0.2],
            vec![30.0, 40.0],
            vec![0.0, 0.0001],
        ];
        let (kept, dropped) = iqr_filter(&updates(&d), 1.5);
        assert_eq!(kept, vec![0, 1, 2, 3]);
        assert_eq!(dropped, vec![4, 5]);
    }

    #[test]
    fn bad_updates_are_refused_with_the_reason() {
        assert_eq!(aggregate(Rule::FedAvg, &[]), Err(AggregateError::Empty));
        let d = vec![vec![1.0, 2.0], vec![1.0]];
        assert!(matches!(
            aggregate(Rule::Median, &updates(&d)),
            Err(AggregateError::Length { index: 1, .. })
        ));
        let d = vec![vec![1.0, 2.0], vec![f32::NAN, 0.0]];
        assert_eq!(
            aggregate(Rule::FedAvg, &updates(&d)),
            Err(AggregateError::NotFinite { index: 1 })
        );
    }

    #[test]
    fn server_optimizers_by_hand() {
        let mut w = vec![1.0f32, 1.0];
        let mut state = ServerState::default();
        ServerOptimizer::Sgd { lr: 0.5 }
            .apply(&mut state, &mut w, &[2.0, -2.0])
            .unwrap();
        assert_eq!(w, vec![2.0, 0.0]);

        let momentum = ServerOptimizer::FedAvgM {
            lr: 1.0,
            momentum: 0.9,
        };
        let (mut w, mut state) = (vec![0.0f32], ServerState::default());
        momentum.apply(&mut state, &mut w, &[1.0]).unwrap();
        momentum.apply(&mut state, &mut w, &[1.0]).unwrap();
        // v1 = 1, w = 1; v2 = 0.9 + 1 = 1.9, w = 2.9.
        assert!((w[0] - 2.9).abs() < 1e-6);

        let adam = ServerOptimizer::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let (mut w, mut state) = (vec![0.0f32], ServerState::default());
        adam.apply(&mut state, &mut w, &[2.0]).unwrap();
        assert!(adam.apply(&mut state, &mut w, &[1.0, 2.0]).is_err());
        // m = 0.2, v = 0.04, w = 0.1 * 0.2 / (0.2 + 0.001).
        assert!((w[0] - 0.1 * 0.2 / 0.201).abs() < 1e-6, "{w:?}");
    }

    /// Honest updates near a centre, and `f` arbitrary ones.
    fn round() -> impl Strategy<Value = (Vec<Vec<f32>>, Vec<Vec<f32>>)> {
        (1usize..4, 3usize..6).prop_flat_map(|(dim, f)| {
            let honest = 2 * f + 3;
            (
                prop::collection::vec(prop::collection::vec(-1.0f32..1.0, dim), honest),
                prop::collection::vec(prop::collection::vec(-1e6f32..1e6, dim), f),
            )
        })
    }

    proptest! {
        #[test]
        fn median_and_trimmed_mean_stay_inside_the_honest_range((honest, byzantine) in round()) {
            let f = byzantine.len();
            let n = honest.len() + f;
            let all: Vec<Vec<f32>> = honest.iter().chain(&byzantine).cloned().collect();
            let beta = (f as f64 + 0.5) / n as f64;
            for rule in [Rule::Median, Rule::TrimmedMean { beta }] {
                let out = aggregate(rule, &updates(&all)).unwrap();
                for (i, v) in out.delta.iter().enumerate() {
                    let lo = honest.iter().map(|h| h[i]).fold(f32::INFINITY, f32::min);
                    let hi = honest.iter().map(|h| h[i]).fold(f32::NEG_INFINITY, f32::max);
                    prop_assert!(*v >= lo - 1e-4 && *v <= hi + 1e-4, "{rule:?}: {v} outside [{lo}, {hi}]");
                }
            }
        }

        #[test]
        fn krum_and_multi_krum_stay_near_the_honest_updates((honest, byzantine) in round()) {
            let f = byzantine.len();
            let n = honest.len() + f;
            let all: Vec<Vec<f32>> = byzantine.iter().chain(&honest).cloned().collect();
            // The honest diameter D.
            let mut diameter: f64 = 0.0;
            for a in &honest {
                for b in &honest {
                    diameter = diameter.max(squared_distance(a, b).sqrt());
                }
            }
            // A Krum choice is within sqrt(n - f - 2) * D of some honest update; a mean of
            // such choices is within that plus D of every honest update.
            let bound = ((n - f - 2) as f64).sqrt() * diameter + diameter + 1e-3;
            for rule in [Rule::Krum { f }, Rule::MultiKrum { f, m: n - f }] {
                let out = aggregate(rule, &updates(&all)).unwrap();
                let nearest = honest
                    .iter()
                    .map(|h| squared_distance(&out.delta, h).sqrt())
                    .fold(f64::INFINITY, f64::min);
                prop_assert!(nearest <= bound, "{rule:?}: {nearest} > {bound}");
            }
        }
    }
}
