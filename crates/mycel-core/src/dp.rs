//! Privacy accounting for differentially private federated averaging (DP-FedAvg).
//!
//! Each round samples participants with probability `q` (Poisson sampling), clips every
//! update to an L2 norm `C` and adds Gaussian noise of standard deviation `σ·C` to their sum:
//! the *sampled Gaussian mechanism* with noise multiplier `σ`. Its Rényi differential privacy
//! (RDP) at order `α` is `ln(A_α) / (α − 1)`, with `A_α` the `α`-th moment of the ratio of
//! the mechanism's output densities on neighbouring inputs (Mironov, Talwar and Zhang,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019):
//! - integer `α`: `A_α = Σ_{k=0..α} C(α,k) (1−q)^(α−k) q^k exp((k²−k) / 2σ²)`;
//! - fractional `α`: `A_α = A₀ + A₁`, two series split at `z₀ = σ² ln(1/q − 1) + ½`, each
//!   term weighted by half a complementary error function (their section 3.3), summed until
//!   both series' terms fall and are 30 nats below the total (at most 1000 terms; an order
//!   whose series does not settle is left out).
//!
//! RDP composes by addition over rounds. It becomes `(ε, δ)` at the best of the orders by
//! `ε = rdp + ln(1 − 1/α) − ln(δ·α) / (α − 1)` (Balle et al. 2020, proposition 12; Canonne,
//! Kamath and Steinke 2020), for orders above 1.01. The orders are those Google's
//! `dp-accounting` uses by default, so that its figures pin ours: the test holds every
//! reference epsilon of `tests/data/dp_reference.json` (made by `scripts/dp-reference.py`)
//! within 1%.
//!
//! The aggregate itself ([`noisy_mean`]) takes its randomness from the caller, which must
//! keep it secret (noise anyone could replay hides nothing). No clock, no I/O.

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Orders of Rényi divergence the accountant tracks: 1.1 to 10.9 by tenths, 11 to 63, and
/// 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// Terms summed at most for a fractional order.
const MAX_TERMS: usize = 1000;

/// What the accountant cannot account for.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpError {
    /// A sampling rate outside [0, 1].
    #[error("sampling rate {0} is not in [0, 1]")]
    Rate(f64),
    /// A negative or non-finite noise multiplier.
    #[error("noise multiplier {0} is not a finite number ≥ 0")]
    Noise(f64),
    /// A δ outside (0, 1).
    #[error("δ {0} is not in (0, 1)")]
    Delta(f64),
}

/// `ln(e^a + e^b)` without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln |C(n, k)|` for real `n` and `k` (the generalised binomial coefficient's magnitude).
fn log_binomial(n: f64, k: f64) -> f64 {
    libm::lgamma_r(n + 1.0).0 - libm::lgamma_r(k + 1.0).0 - libm::lgamma_r(n - k + 1.0).0
}

/// `ln erfc(x)`, accurate where `erfc(x)` underflows (large `x`) by its asymptotic series.
fn log_erfc(x: f64) -> f64 {
    let value = libm::erfc(x);
    if value > 1e-300 {
        return value.ln();
    }
    let (x2, x4) = (x * x, x.powi(4));
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / x4 - 37.0 / 24.0 / (x4 * x2)
        + 353.0 / 64.0 / (x4 * x4)
}

/// `ln A_α` for an integer order.
fn log_a_integer(q: f64, sigma: f64, alpha: u32) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let alpha_f = f64::from(alpha);
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, k| {
        let k = f64::from(k);
        let term = log_binomial(alpha_f, k)
            + k * ln_q
            + (alpha_f - k) * ln_1mq
            + (k * k - k) / (2.0 * sigma * sigma);
        log_add(acc, term)
    })
}

/// `ln A_α` for a fractional order; infinity when its series does not settle.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let variance2 = 2.0 * sigma * sigma;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let scale = std::f64::consts::SQRT_2 * sigma;
    let ln_half = 0.5f64.ln();
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_TERMS {
        let i = i as f64;
        let j = alpha - i;
        let coefficient = log_binomial(alpha, i);
        let s0 = coefficient
            + i * ln_q
            + j * ln_1mq
            + (i * i - i) / variance2
            + ln_half
            + log_erfc((i - z0) / scale);
        let s1 = coefficient
            + j * ln_q
            + i * ln_1mq
            + (j * j - j) / variance2
            + ln_half
            + log_erfc((z0 - j) / scale);
        a0 = log_add(a0, s0);
        a1 = log_add(a1, s1);
        let total = log_add(a0, a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        (last0, last1) = (s0, s1);
    }
    f64::INFINITY
}

/// The RDP at order `alpha` of one round of the Gaussian mechanism with noise multiplier
/// `sigma`, each participant sampled with probability `q`. Infinite without noise.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, alpha: f64) -> Result<f64, DpError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(DpError::Rate(q));
    }
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return Err(DpError::Noise(sigma));
    }
    Ok(if q == 0.0 {
        0.0
    } else if sigma == 0.0 || alpha.is_infinite() {
        f64::INFINITY
    } else if q == 1.0 {
        alpha / (2.0 * sigma * sigma)
    } else if alpha.fract() == 0.0 && alpha <= f64::from(u32::MAX) {
        log_a_integer(q, sigma, alpha as u32) / (alpha - 1.0)
    } else {
        log_a_fractional(q, sigma, alpha) / (alpha - 1.0)
    })
}

/// The smallest `ε` that RDP figures `rdp` at `orders` prove at `delta`, and the order that
/// proves it.
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64), DpError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(DpError::Delta(delta));
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&alpha, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            // A divergence this small bounds δ by itself (through the KL divergence).
            0.0
        } else if alpha > 1.01 {
            r + (-1.0 / alpha).ln_1p() - (delta * alpha).ln() / (alpha - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// `update`'s L2 norm, and the factor that brings it down to `clip` (1 when it is shorter).
fn norm_and_scale(update: &[f32], clip: f32) -> (f64, f64) {
    let norm = update
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let scale = if norm > f64::from(clip) {
        f64::from(clip) / norm
    } else {
        1.0
    };
    (norm, scale)
}

/// Scales `update` down to L2 norm `clip` if it is longer; returns its norm before.
pub fn clip(update: &mut [f32], clip: f32) -> f64 {
    let (norm, scale) = norm_and_scale(update, clip);
    if scale < 1.0 {
        update.iter_mut().for_each(|v| *v *= scale as f32);
    }
    norm
}

/// Why updates cannot be aggregated privately.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// Updates of different lengths.
    #[error("updates of {0} and {1} values cannot be summed")]
    Shape(usize, usize),
    /// A parameter out of range.
    #[error("clip {clip}, noise multiplier {sigma} and denominator {denominator} must be finite and above 0")]
    Parameters {
        /// The clip norm.
        clip: f32,
        /// The noise multiplier.
        sigma: f64,
        /// The denominator.
        denominator: f64,
    },
}

/// DP-FedAvg's aggregate with central noise: every update clipped to L2 norm `clip`, summed,
/// Gaussian noise of standard deviation `sigma × clip` added to each coordinate of the sum,
/// and the sum divided by `denominator` (the expected number of participants, which does not
/// depend on anyone's data). One participant more or less moves the sum by at most `clip`:
/// the noise is calibrated to that. `len` is the model's size (the aggregate of no update is
/// noise alone).
pub fn noisy_mean(
    updates: Vec<Vec<f32>>,
    len: usize,
    clip: f32,
    sigma: f64,
    denominator: f64,
    rng: &mut impl Rng,
) -> Result<Vec<f32>, AggregateError> {
    let valid = |x: f64| x.is_finite() && x > 0.0;
    if !(valid(f64::from(clip)) && valid(sigma) && valid(denominator)) {
        return Err(AggregateError::Parameters {
            clip,
            sigma,
            denominator,
        });
    }
    let mut sum = vec![0f64; len];
    for update in &updates {
        if update.len() != len {
            return Err(AggregateError::Shape(update.len(), len));
        }
        // Scaled in f64: a huge update's scale would lose precision as an f32.
        let (_, scale) = norm_and_scale(update, clip);
        for (s, v) in sum.iter_mut().zip(update) {
            *s += f64::from(*v) * scale;
        }
    }
    let noise =
        Normal::new(0.0, sigma * f64::from(clip)).map_err(|_| AggregateError::Parameters {
            clip,
            sigma,
            denominator,
        })?;
    Ok(sum
        .into_iter()
        .map(|s| ((s + noise.sample(rng)) / denominator) as f32)
        .collect())
}

/// The privacy a job has spent: RDP at each order, summed over its rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for Accountant {
    fn default() -> Self {
        Self::new()
    }
}

impl Accountant {
    /// Nothing spent, at the [`default_orders`].
    pub fn new() -> Self {
        let orders = default_orders();
        Self {
            rdp: vec![0.0; orders.len()],
            orders,
        }
    }

    /// The RDP spent at each of the orders.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// The RDP of one round at each order (to compose many rounds with [`Accountant::add`]
    /// without computing it again).
    pub fn round(&self, q: f64, sigma: f64) -> Result<Vec<f64>, DpError> {
        self.orders
            .iter()
            .map(|&alpha| rdp_sampled_gaussian(q, sigma, alpha))
            .collect()
    }

    /// Adds `rounds` rounds whose RDP per round is `per_round` (from [`Accountant::round`]).
    pub fn add(&mut self, per_round: &[f64], rounds: u64) {
        for (total, r) in self.rdp.iter_mut().zip(per_round) {
            *total += rounds as f64 * r;
        }
    }

    /// Adds `rounds` rounds of the mechanism sampling with probability `q` at noise
    /// multiplier `sigma`.
    pub fn compose(&mut self, q: f64, sigma: f64, rounds: u64) -> Result<(), DpError> {
        let per_round = self.round(q, sigma)?;
        self.add(&per_round, rounds);
        Ok(())
    }

    /// The `ε` spent so far at `delta`.
    pub fn epsilon(&self, delta: f64) -> Result<f64, DpError> {
        epsilon(&self.orders, &self.rdp, delta).map(|(eps, _)| eps)
    }

    /// The `ε` spent so far at `delta`, and the order that proves it.
    pub fn epsilon_and_order(&self, delta: f64) -> Result<(f64, f64), DpError> {
        epsilon(&self.orders, &self.rdp, delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_sampling_or_rounds_nothing_is_spent_and_without_noise_everything() {
        let mut accountant = Accountant::new();
        assert_eq!(accountant.epsilon(1e-5), Ok(0.0));
        accountant.compose(0.0, 1.0, 100).unwrap();
        assert_eq!(accountant.epsilon(1e-5), Ok(0.0));
        accountant.compose(0.1, 0.0, 1).unwrap();
        assert_eq!(accountant.epsilon(1e-5), Ok(f64::INFINITY));
    }

    #[test]
    fn the_unsampled_gaussian_has_its_closed_form() {
        // Without sampling the RDP is α / 2σ² exactly.
        assert_eq!(rdp_sampled_gaussian(1.0, 2.0, 3.0), Ok(3.0 / 8.0));
        // The integer series for q = 1 collapses to the same (only k = α is left).
        let series = log_a_integer(1.0 - 1e-12, 2.0, 3) / 2.0;
        assert!((series - 3.0 / 8.0).abs() < 1e-6, "{series}");
    }

    #[test]
    fn more_rounds_less_noise_or_more_sampling_spend_more() {
        let spent = |q: f64, sigma: f64, rounds: u64| {
            let mut accountant = Accountant::new();
            accountant.compose(q, sigma, rounds).unwrap();
            accountant.epsilon(1e-5).unwrap()
        };
        let base = spent(0.01, 1.0, 100);
        assert!(spent(0.01, 1.0, 1000) > base);
        assert!(spent(0.01, 0.8, 100) > base);
        assert!(spent(0.05, 1.0, 100) > base);
        // Composing in parts is composing at once.
        let mut parts = Accountant::new();
        parts.compose(0.01, 1.0, 40).unwrap();
        parts.compose(0.01, 1.0, 60).unwrap();
        assert!((parts.epsilon(1e-5).unwrap() - base).abs() < 1e-9);
    }

    #[test]
    fn one_update_moves_the_sum_by_the_clip_at_most_and_the_noise_is_calibrated() {
        use rand::SeedableRng;
        let mut long = vec![3.0f32, 4.0];
        assert_eq!(clip(&mut long, 1.0), 5.0);
        assert!((long[0] - 0.6).abs() < 1e-6 && (long[1] - 0.8).abs() < 1e-6);
        let mut short = vec![0.3f32, 0.4];
        clip(&mut short, 1.0);
        assert_eq!(short, [0.3, 0.4], "short updates are kept as they are");

        // With the same noise, a huge update changes the aggregate as much as one at the clip.
        let mean = |updates: Vec<Vec<f32>>| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            noisy_mean(updates, 2, 1.0, 1.0, 4.0, &mut rng).unwrap()
        };
        let others = vec![vec![0.1f32, 0.2], vec![-0.3, 0.1]];
        let with = |extra: Vec<f32>| {
            let mut all = others.clone();
            all.push(extra);
            mean(all)
        };
        assert_eq!(with(vec![1e6, 0.0]), with(vec![1.0, 0.0]));
        let without = mean(others.clone());
        let moved = with(vec![1e6, 0.0])[0] - without[0];
        assert!((moved - 0.25).abs() < 1e-5, "{moved}");

        // The noise on the sum has standard deviation σ·clip.
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let noise = noisy_mean(Vec::new(), 20_000, 0.5, 2.0, 1.0, &mut rng).unwrap();
        let sd = (noise.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 20_000.0).sqrt();
        assert!((sd - 1.0).abs() < 0.03, "{sd}");

        assert_eq!(
            noisy_mean(vec![vec![1.0]], 2, 1.0, 1.0, 1.0, &mut rng),
            Err(AggregateError::Shape(1, 2))
        );
        assert!(noisy_mean(Vec::new(), 2, 0.0, 1.0, 1.0, &mut rng).is_err());
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(rdp_sampled_gaussian(1.5, 1.0, 2.0), Err(DpError::Rate(1.5)));
        assert!(matches!(
            rdp_sampled_gaussian(0.1, f64::NAN, 2.0),
            Err(DpError::Noise(_))
        ));
        assert_eq!(Accountant::new().epsilon(0.0), Err(DpError::Delta(0.0)));
        assert_eq!(Accountant::new().epsilon(1.0), Err(DpError::Delta(1.0)));
    }
}
