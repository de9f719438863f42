//! Compressing federated-training updates before they travel.
//!
//! - [`TopK`]: keep the `k` largest-magnitude values of an update (indices and values), and
//!   carry what was dropped into the participant's next update (error feedback, so nothing
//!   is lost for good, only delayed).
//! - [`Int8`]: every value as a signed byte, with one f32 scale per block of
//!   [`INT8_BLOCK`] values (round to nearest).
//!
//! Decoding checks everything a peer could get wrong (lengths, indices, non-finite scales)
//! before building the dense update. Pure: no I/O, no clock, no randomness.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Values per int8 block (one scale each).
pub const INT8_BLOCK: usize = 256;

/// Why a compressed update does not decode.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CompressError {
    /// The update claims another length than the model's.
    #[error("the update has {got} values, the model {expected}")]
    Length {
        /// Claimed.
        got: u64,
        /// The model's.
        expected: usize,
    },
    /// Indices and values disagree, or an index is out of range or repeated.
    #[error("malformed sparse update: {0}")]
    Sparse(String),
    /// Scales or values that do not fit the length.
    #[error("malformed int8 update: {0}")]
    Int8(String),
    /// A NaN or infinite value or scale.
    #[error("the update holds a value that is not finite")]
    NotFinite,
}

/// A sparse update: the values at `indices` (ascending, distinct) of a `len`-long vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sparse {
    /// The dense length.
    pub len: u64,
    /// Positions kept.
    pub indices: Vec<u32>,
    /// Their values.
    pub values: Vec<f32>,
}

/// An int8-quantised update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantised {
    /// The dense length.
    pub len: u64,
    /// One scale per block of [`INT8_BLOCK`] values.
    pub scales: Vec<f32>,
    /// The values, each times its block's scale.
    #[serde(with = "serde_bytes")]
    pub values: Vec<u8>,
}

/// Top-k sparsification with error feedback; holds the participant's residual.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopK {
    /// What earlier rounds dropped, added to the next update.
    pub residual: Vec<f32>,
}

impl TopK {
    /// The `fraction` (0..=1, at least one value) largest-magnitude values of `delta` plus the
    /// residual; the rest becomes the new residual.
    pub fn compress(&mut self, delta: &[f32], fraction: f64) -> Sparse {
        self.residual.resize(delta.len(), 0.0);
        let corrected: Vec<f32> = delta
            .iter()
            .zip(&self.residual)
            .map(|(d, r)| d + r)
            .collect();
        let k = ((fraction.clamp(0.0, 1.0) * delta.len() as f64).ceil() as usize)
            .clamp(1, delta.len().max(1))
            .min(delta.len());
        let mut order: Vec<u32> = (0..delta.len() as u32).collect();
        if k < order.len() {
            order.select_nth_unstable_by(k, |a, b| {
                corrected[*b as usize]
                    .abs()
                    .total_cmp(&corrected[*a as usize].abs())
                    .then(a.cmp(b))
            });
            order.truncate(k);
        }
        order.sort_unstable();
        let values: Vec<f32> = order.iter().map(|i| corrected[*i as usize]).collect();
        self.residual = corrected;
        for i in &order {
            self.residual[*i as usize] = 0.0;
        }
        Sparse {
            len: delta.len() as u64,
            indices: order,
            values,
        }
    }
}

impl Sparse {
    /// The dense update, for a model of `expected` values.
    pub fn decode(&self, expected: usize) -> Result<Vec<f32>, CompressError> {
        if self.len != expected as u64 {
            return Err(CompressError::Length {
                got: self.len,
                expected,
            });
        }
        if self.indices.len() != self.values.len() {
            return Err(CompressError::Sparse(format!(
                "{} indices but {} values",
                self.indices.len(),
                self.values.len()
            )));
        }
        let mut dense = vec![0f32; expected];
        let mut previous: Option<u32> = None;
        for (i, v) in self.indices.iter().zip(&self.values) {
            if (*i as usize) >= expected || previous.is_some_and(|p| p >= *i) {
                return Err(CompressError::Sparse(format!(
                    "index {i} out of range or out of order"
                )));
            }
            if !v.is_finite() {
                return Err(CompressError::NotFinite);
            }
            dense[*i as usize] = *v;
            previous = Some(*i);
        }
        Ok(dense)
    }
}

/// Int8 quantisation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Int8;

impl Int8 {
    /// `delta` as bytes and per-block scales (`max |v| / 127`).
    pub fn compress(delta: &[f32]) -> Quantised {
        let mut scales = Vec::with_capacity(delta.len().div_ceil(INT8_BLOCK));
        let mut values = Vec::with_capacity(delta.len());
        for block in delta.chunks(INT8_BLOCK) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
            scales.push(scale);
            values.extend(block.iter().map(|v| {
                let q = if scale > 0.0 {
                    (v / scale).round()
                } else {
                    0.0
                };
                q.clamp(-127.0, 127.0) as i8 as u8
            }));
        }
        Quantised {
            len: delta.len() as u64,
            scales,
            values,
        }
    }
}

impl Quantised {
    /// The dense update, for a model of `expected` values.
    pub fn decode(&self, expected: usize) -> Result<Vec<f32>, CompressError> {
        if self.len != expected as u64 {
            return Err(CompressError::Length {
                got: self.len,
                expected,
            });
        }
        if self.values.len() != expected || self.scales.len() != expected.div_ceil(INT8_BLOCK) {
            return Err(CompressError::Int8(format!(
                "{} values and {} scales for {expected} values",
                self.values.len(),
                self.scales.len()
            )));
        }
        if self.scales.iter().any(|s| !s.is_finite()) {
            return Err(CompressError::NotFinite);
        }
        let values: Vec<f32> = self
            .values
            .chunks(INT8_BLOCK)
            .zip(&self.scales)
            .flat_map(|(block, scale)| block.iter().map(move |q| f32::from(*q as i8) * scale))
            .collect();
        // A huge scale times 127 overflows to infinity.
        if values.iter().any(|v| !v.is_finite()) {
            return Err(CompressError::NotFinite);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn top_k_keeps_the_largest_and_feeds_the_rest_back() {
        let mut top = TopK::default();
        let sparse = top.compress(&[0.1, -3.0, 0.5, 2.0], 0.5);
        assert_eq!(sparse.indices, vec![1, 3]);
        assert_eq!(sparse.values, vec![-3.0, 2.0]);
        assert_eq!(sparse.decode(4).unwrap(), vec![0.0, -3.0, 0.0, 2.0]);
        assert_eq!(top.residual, vec![0.1, 0.0, 0.5, 0.0]);
        // Next round, the residual rides along: 0.5 + 0.6 = 1.1 now makes the cut.
        let sparse = top.compress(&[0.0, 0.0, 0.6, 0.1], 0.25);
        assert_eq!(sparse.indices, vec![2]);
        assert!((sparse.values[0] - 1.1).abs() < 1e-6);
        assert!((top.residual[0] - 0.1).abs() < 1e-6);
    }

    #[test]
    fn int8_by_hand() {
        let q = Int8::compress(&[1.27, -0.6, 0.0]);
        assert_eq!(q.scales.len(), 1);
        assert!((q.scales[0] - 0.01).abs() < 1e-8);
        assert_eq!(q.values, vec![127, (-60i8) as u8, 0]);
        let back = q.decode(3).unwrap();
        assert!((back[0] - 1.27).abs() < 1e-6 && (back[1] + 0.6).abs() < 1e-6);
        assert_eq!(back[2], 0.0);
    }

    #[test]
    fn malformed_updates_are_refused() {
        let good = Sparse {
            len: 4,
            indices: vec![0, 2],
            values: vec![1.0, 2.0],
        };
        assert!(good.decode(4).is_ok());
        assert!(matches!(good.decode(5), Err(CompressError::Length { .. })));
        let repeated = Sparse {
            indices: vec![2, 2],
            ..good.clone()
        };
        assert!(matches!(repeated.decode(4), Err(CompressError::Sparse(_))));
        let outside = Sparse {
            indices: vec![0, 4],
            ..good.clone()
        };
        assert!(matches!(outside.decode(4), Err(CompressError::Sparse(_))));
        let nan = Sparse {
            values: vec![1.0, f32::NAN],
            ..good
        };
        assert_eq!(nan.decode(4), Err(CompressError::NotFinite));
        let mut q = Int8::compress(&[1.0; 300]);
        q.scales.pop();
        assert!(matches!(q.decode(300), Err(CompressError::Int8(_))));
        let mut q = Int8::compress(&[1.0; 3]);
        q.scales[0] = f32::INFINITY;
        assert_eq!(q.decode(3), Err(CompressError::NotFinite));
        // Finite scale, infinite product.
        q.scales[0] = f32::MAX;
        assert_eq!(q.decode(3), Err(CompressError::NotFinite));
    }

    proptest! {
        #[test]
        fn int8_error_is_at_most_half_a_step(values in prop::collection::vec(-10.0f32..10.0, 1..700)) {
            let q = Int8::compress(&values);
            let back = q.decode(values.len()).unwrap();
            for (block, (orig, got)) in values.chunks(INT8_BLOCK).zip(back.chunks(INT8_BLOCK)).enumerate() {
                let step = q.scales[block];
                for (o, g) in orig.iter().zip(got) {
                    prop_assert!((o - g).abs() <= step * 0.5 + 1e-5, "{o} -> {g} (step {step})");
                }
            }
        }

        #[test]
        fn top_k_loses_nothing_over_time(values in prop::collection::vec(-1.0f32..1.0, 1..200), fraction in 0.01f64..1.0) {
            // What was sent plus what is still held equals everything given.
            let mut top = TopK::default();
            let mut sent = vec![0f32; values.len()];
            for _ in 0..3 {
                let sparse = top.compress(&values, fraction);
                for (s, v) in sent.iter_mut().zip(sparse.decode(values.len()).unwrap()) {
                    *s += v;
                }
            }
            for i in 0..values.len() {
                prop_assert!((sent[i] + top.residual[i] - 3.0 * values[i]).abs() < 1e-4);
            }
        }
    }
}
