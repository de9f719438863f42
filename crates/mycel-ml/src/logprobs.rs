//! Log-probabilities of generated tokens (`logprobs` and `top_logprobs` in OpenAI's API):
//! the natural log of each token's softmax probability under the model's logits at
//! temperature 1, whatever the sampling settings, and the most likely tokens at its position.
//!
//! `log p_i = (l_i − max) − ln Σ_j exp(l_j − max)`, the sum taken in f64 in id order, so the
//! same logits give the same bits. The most likely tokens are the `k` largest logits, ties
//! to the smaller id.

/// A generated token's log-probability and the `k` most likely tokens at its position, by id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scored {
    /// The token generated.
    pub(crate) token: u32,
    /// Its log-probability.
    pub(crate) logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub(crate) top: Vec<(u32, f32)>,
}

impl Scored {
    /// The log-probability of `token` under `logits`, with the `k` most likely tokens.
    pub(crate) fn of(logits: &[f32], token: u32, k: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|l| f64::from((l - max).exp())).sum();
        let norm = max + sum.ln() as f32;
        // At most 0 (rounding may put the largest a hair above), and finite: a logit of −∞
        // (a banned token) is the least f32.
        let logprob = |l: f32| (l - norm).clamp(f32::MIN, 0.0);
        let k = k.min(logits.len());
        // The k largest, kept sorted: a later id enters only when strictly larger, so ties
        // keep the smaller id first.
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if k > 0 {
            for (id, &l) in logits.iter().enumerate() {
                if top.len() == k && top[k - 1].1 >= l {
                    continue;
                }
                let at = top.partition_point(|(_, kept)| *kept >= l);
                top.insert(at, (id as u32, l));
                top.truncate(k);
            }
        }
        Self {
            token,
            logprob: logits.get(token as usize).map_or(f32::MIN, |l| logprob(*l)),
            top: top.into_iter().map(|(id, l)| (id, logprob(l))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_sum_to_one_and_the_top_is_the_largest_first_ties_by_id() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5, 2.0];
        let scored = Scored::of(&logits, 4, 3);
        let total: f64 = (0..logits.len() as u32)
            .map(|t| f64::from(Scored::of(&logits, t, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(
            scored.top.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [1, 3, 5]
        );
        // ln softmax by the textbook formula.
        let z: f64 = logits.iter().map(|l| f64::from(*l).exp()).sum();
        let expected = (0.5f64).exp() / z;
        assert!((f64::from(scored.logprob).exp() - expected).abs() < 1e-6);
        assert_eq!(scored.top[0].1, scored.top[1].1);
        assert!(scored.top.iter().all(|(_, l)| *l <= 0.0));
    }

    #[test]
    fn extreme_logits_stay_finite_and_at_most_zero() {
        let mut logits = vec![-1e30f32; 1000];
        logits[7] = 1e30;
        logits[9] = f32::NEG_INFINITY;
        let scored = Scored::of(&logits, 7, 2);
        assert_eq!(scored.logprob, 0.0);
        assert_eq!(scored.top[0], (7, 0.0));
        assert!(scored.top[1].1.is_finite() && scored.top[1].1 < -1e29);
        assert_eq!(Scored::of(&logits, 9, 0).logprob, f32::MIN);
        let asked_more = Scored::of(&logits[..3], 0, 20);
        assert_eq!(asked_more.top.len(), 3);
    }
}
