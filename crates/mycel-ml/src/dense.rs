//! Fully connected classifiers (logistic regression, MLPs with ReLU) trained by a hand-written
//! forward and backward pass over the flat weight vector federated jobs exchange.
//!
//! A federated round trains a model of a few thousand parameters on a few hundred rows: the
//! arithmetic takes tens of microseconds, while candle's autograd spent about a millisecond per
//! participant building graphs and allocating a tensor per operation. Here every buffer is
//! allocated once per call and the products are written as row updates (`y += a * x`) that the
//! compiler vectorises without reordering a sum, so the result is the same on every machine.
//! The maths is candle's (see the test beside the CNN path in `train.rs` that compares the two):
//! softmax cross-entropy averaged over the batch, ReLU's gradient taken where the input is
//! `>= 0`, FedProx's `mu (w - w_global)` added to the gradient, SGD with momentum `v = m v + g`.

use crate::train::{Dataset, TrainParams};
use std::sync::atomic::{AtomicBool, Ordering};

/// The layer widths of a dense model and where each layer's weights sit in the flat vector.
pub(crate) struct Dense<'a> {
    widths: &'a [usize],
}

/// Scratch space for one batch.
struct Buffers {
    /// Per layer, its input rows (layer 0: the batch's features) then the last logits:
    /// `acts[l]` is `[rows, widths[l]]`.
    acts: Vec<Vec<f32>>,
    /// Per hidden layer, its pre-activations (for ReLU's gradient).
    pre: Vec<Vec<f32>>,
    /// The gradient with respect to the current layer's output, `[rows, width]`.
    grad: Vec<f32>,
    /// The gradient with respect to the current layer's input.
    grad_in: Vec<f32>,
    /// Each layer's weights transposed (`[in, out]`), for the forward pass.
    transposed: Vec<Vec<f32>>,
}

impl<'a> Dense<'a> {
    /// A dense model with these widths (inputs first, classes last; at least two).
    pub(crate) fn new(widths: &'a [usize]) -> Self {
        debug_assert!(widths.len() >= 2);
        Self { widths }
    }

    #[inline(always)]
    fn layers(&self) -> usize {
        self.widths.len() - 1
    }

    /// Offset of layer `l`'s weights (`[out, in]`, row-major) in the flat vector; its bias
    /// follows them.
    #[inline(always)]
    fn offset(&self, l: usize) -> usize {
        self.widths
            .windows(2)
            .take(l)
            .map(|w| w[0] * w[1] + w[1])
            .sum()
    }

    fn buffers(&self, rows: usize) -> Buffers {
        let widest = self.widths.iter().copied().max().unwrap_or(0);
        Buffers {
            acts: self.widths.iter().map(|w| vec![0.0; rows * w]).collect(),
            pre: self.widths[1..self.layers()]
                .iter()
                .map(|w| vec![0.0; rows * w])
                .collect(),
            grad: vec![0.0; rows * widest],
            grad_in: vec![0.0; rows * widest],
            transposed: self
                .widths
                .windows(2)
                .map(|w| vec![0.0; w[0] * padded(w[1])])
                .collect(),
        }
    }

    /// Fills `b.acts` for the rows of `data` listed in `rows` (the last is the logits).
    #[inline(always)]
    fn forward(&self, weights: &[f32], data: &Dataset, rows: &[usize], b: &mut Buffers) {
        let n = rows.len();
        let dim = data.dim;
        for (i, &r) in rows.iter().enumerate() {
            b.acts[0][i * dim..(i + 1) * dim]
                .copy_from_slice(&data.features[r * dim..(r + 1) * dim]);
        }
        for l in 0..self.layers() {
            let (fan_in, fan_out) = (self.widths[l], self.widths[l + 1]);
            let at = self.offset(l);
            let (w, bias) = (
                &weights[at..at + fan_in * fan_out],
                &weights[at + fan_in * fan_out..at + fan_in * fan_out + fan_out],
            );
            // Transposed to [in, out], each row padded with zeros to whole lanes.
            let width = padded(fan_out);
            let t = &mut b.transposed[l];
            for o in 0..fan_out {
                for i in 0..fan_in {
                    t[i * width + o] = w[o * fan_in + i];
                }
            }
            let (before, after) = b.acts.split_at_mut(l + 1);
            let (input, output) = (&before[l], &mut after[0]);
            for row in 0..n {
                forward_row(input, output, t, bias, fan_in, fan_out, row);
            }
            if l + 1 < self.layers() {
                let pre = &mut b.pre[l][..n * fan_out];
                pre.copy_from_slice(&output[..n * fan_out]);
                for v in &mut output[..n * fan_out] {
                    *v = v.max(0.0);
                }
            }
        }
    }

    /// Softmax cross-entropy of the logits in `b.acts`: the mean loss, and into `b.grad` its
    /// gradient with respect to the logits.
    #[inline(always)]
    fn loss(&self, data: &Dataset, rows: &[usize], b: &mut Buffers) -> f32 {
        let classes = self.widths[self.layers()];
        let logits = &b.acts[self.layers()];
        let scale = 1.0 / rows.len() as f32;
        let mut total = 0.0f32;
        for (i, &r) in rows.iter().enumerate() {
            let z = &logits[i * classes..(i + 1) * classes];
            let g = &mut b.grad[i * classes..(i + 1) * classes];
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (g, &z) in g.iter_mut().zip(z) {
                *g = (z - max).exp();
                sum += *g;
            }
            let label = data.labels[r] as usize;
            total += sum.ln() + max - z[label];
            for g in g.iter_mut() {
                *g *= scale / sum;
            }
            g[label] -= scale;
        }
        total * scale
    }

    /// Adds the batch's gradient of the loss with respect to every weight into `out` (in the
    /// flat order), from `b.grad` as [`Dense::loss`] left it.
    #[inline(always)]
    fn backward(&self, weights: &[f32], rows: usize, b: &mut Buffers, out: &mut [f32]) {
        for l in (0..self.layers()).rev() {
            let (fan_in, fan_out) = (self.widths[l], self.widths[l + 1]);
            let at = self.offset(l);
            let input = &b.acts[l];
            let grad = &b.grad[..rows * fan_out];
            let (gw, gb) = out[at..at + fan_in * fan_out + fan_out].split_at_mut(fan_in * fan_out);
            // dW[o, i] += the sum over rows (in order) of g[row, o] x[row, i].
            for o in 0..fan_out {
                let gw = &mut gw[o * fan_in..(o + 1) * fan_in];
                for start in (0..fan_in).step_by(LANES) {
                    let lanes = LANES.min(fan_in - start);
                    let mut acc = [0.0f32; LANES];
                    acc[..lanes].copy_from_slice(&gw[start..start + lanes]);
                    for row in 0..rows {
                        let g = grad[row * fan_out + o];
                        add_scaled(
                            &mut acc,
                            g,
                            &input[row * fan_in + start..row * fan_in + start + lanes],
                        );
                    }
                    gw[start..start + lanes].copy_from_slice(&acc[..lanes]);
                }
                for row in 0..rows {
                    gb[o] += grad[row * fan_out + o];
                }
            }
            if l == 0 {
                break;
            }
            let w = &weights[at..at + fan_in * fan_out];
            let pre = &b.pre[l - 1];
            // The gradient at this layer's input: the sum over o of g[row, o] W[o, :], then
            // ReLU's, which passes it where its input was >= 0 (as candle's does).
            for row in 0..rows {
                input_grad(grad, w, pre, &mut b.grad_in, fan_in, fan_out, row);
            }
            std::mem::swap(&mut b.grad, &mut b.grad_in);
        }
    }

    /// Minibatch SGD over `data` in the given epoch orders, updating `weights` in place;
    /// returns the mean batch loss of the last epoch.
    /// Returns the last epoch's mean loss, or `None` when `stop` was set (checked before
    /// each minibatch; the weights are then part-trained).
    pub(crate) fn train(
        &self,
        weights: &mut [f32],
        data: &Dataset,
        params: &TrainParams,
        orders: &[Vec<usize>],
        stop: &AtomicBool,
    ) -> Option<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { self.train_avx512(weights, data, params, orders, stop) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { self.train_avx2(weights, data, params, orders, stop) };
            }
        }
        self.train_any(weights, data, params, orders, stop)
    }

    /// [`Dense::train`] compiled for AVX-512: [`LANES`] fills one 512-bit register; the same
    /// operations in the same order as every other path, so the same bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn train_avx512(
        &self,
        weights: &mut [f32],
        data: &Dataset,
        params: &TrainParams,
        orders: &[Vec<usize>],
        stop: &AtomicBool,
    ) -> Option<f32> {
        self.train_any(weights, data, params, orders, stop)
    }

    /// [`Dense::train`] compiled for AVX2: the same operations in the same order as the
    /// portable path (element-wise products and sums, no fused multiply-add), so the same
    /// bits; [`LANES`] fills two 256-bit registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn train_avx2(
        &self,
        weights: &mut [f32],
        data: &Dataset,
        params: &TrainParams,
        orders: &[Vec<usize>],
        stop: &AtomicBool,
    ) -> Option<f32> {
        self.train_any(weights, data, params, orders, stop)
    }

    #[inline(always)]
    fn train_any(
        &self,
        weights: &mut [f32],
        data: &Dataset,
        params: &TrainParams,
        orders: &[Vec<usize>],
        stop: &AtomicBool,
    ) -> Option<f32> {
        let batch = params.batch.min(data.len()).max(1);
        let mut b = self.buffers(batch);
        let anchor = weights.to_vec();
        let mut grad = vec![0.0f32; weights.len()];
        let mut velocity: Option<Vec<f32>> = None;
        let mut last = 0.0;
        for order in orders {
            let (mut sum, mut batches) = (0.0f32, 0usize);
            for rows in order.chunks(batch) {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                self.forward(weights, data, rows, &mut b);
                sum += self.loss(data, rows, &mut b);
                batches += 1;
                grad.fill(0.0);
                self.backward(weights, rows.len(), &mut b, &mut grad);
                if params.prox > 0.0 {
                    for ((g, w), a) in grad.iter_mut().zip(weights.iter()).zip(&anchor) {
                        *g += (w - a) * params.prox;
                    }
                }
                let step = if params.momentum > 0.0 {
                    match &mut velocity {
                        Some(v) => {
                            for (v, g) in v.iter_mut().zip(&grad) {
                                *v = *v * params.momentum + g;
                            }
                        }
                        None => velocity = Some(grad.clone()),
                    }
                    velocity.as_deref().unwrap_or(&grad)
                } else {
                    &grad
                };
                for (w, g) in weights.iter_mut().zip(step) {
                    *w -= g * params.lr;
                }
            }
            last = sum / batches.max(1) as f32;
        }
        Some(last)
    }

    /// Mean loss and accuracy on `data`.
    pub(crate) fn evaluate(&self, weights: &[f32], data: &Dataset) -> (f32, f32) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { self.evaluate_avx512(weights, data) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { self.evaluate_avx2(weights, data) };
            }
        }
        self.evaluate_any(weights, data)
    }

    /// [`Dense::evaluate`] compiled for AVX-512 (the same bits as every other path).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn evaluate_avx512(&self, weights: &[f32], data: &Dataset) -> (f32, f32) {
        self.evaluate_any(weights, data)
    }

    /// [`Dense::evaluate`] compiled for AVX2 (the same bits as every other path).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn evaluate_avx2(&self, weights: &[f32], data: &Dataset) -> (f32, f32) {
        self.evaluate_any(weights, data)
    }

    #[inline(always)]
    fn evaluate_any(&self, weights: &[f32], data: &Dataset) -> (f32, f32) {
        const ROWS: usize = 256;
        let classes = self.widths[self.layers()];
        let mut b = self.buffers(ROWS.min(data.len()).max(1));
        let all: Vec<usize> = (0..data.len()).collect();
        let (mut loss, mut right) = (0.0f64, 0usize);
        for rows in all.chunks(ROWS) {
            self.forward(weights, data, rows, &mut b);
            for (i, &r) in rows.iter().enumerate() {
                let z = &b.acts[self.layers()][i * classes..(i + 1) * classes];
                // The first largest logit, as argmax picks it.
                let best = z
                    .iter()
                    .enumerate()
                    .fold(0, |best, (c, v)| if *v > z[best] { c } else { best });
                if best == data.labels[r] as usize {
                    right += 1;
                }
            }
            loss += f64::from(self.loss(data, rows, &mut b)) * rows.len() as f64;
        }
        let n = data.len().max(1);
        ((loss / n as f64) as f32, right as f32 / n as f32)
    }
}

/// Outputs computed together, held in registers: one 512-bit vector of f32 (two 256-bit ones
/// on AVX2). Each output's sum runs in the same order whatever the width, so the width changes
/// only how many outputs go at once, never the bits.
const LANES: usize = 16;

/// `acc[k] += a * x[k]` for the first `x.len()` (at most [`LANES`]) lanes; a whole row of
/// lanes as one fixed-size loop, which the compiler turns into vector instructions.
#[inline(always)]
fn add_scaled(acc: &mut [f32; LANES], a: f32, x: &[f32]) {
    if let Ok(x) = <&[f32; LANES]>::try_from(x) {
        for k in 0..LANES {
            acc[k] += a * x[k];
        }
    } else {
        for (acc, x) in acc.iter_mut().zip(x) {
            *acc += a * x;
        }
    }
}

/// `n` rounded up to whole lanes.
fn padded(n: usize) -> usize {
    n.div_ceil(LANES) * LANES
}

/// One layer's outputs for row `row`: the bias, then the products with the inputs in order.
/// `t` is the weights transposed, rows padded to whole lanes.
#[inline(always)]
fn forward_row(
    input: &[f32],
    output: &mut [f32],
    t: &[f32],
    bias: &[f32],
    fan_in: usize,
    fan_out: usize,
    row: usize,
) {
    let width = padded(fan_out);
    let x = &input[row * fan_in..(row + 1) * fan_in];
    for start in (0..fan_out).step_by(LANES) {
        let lanes = LANES.min(fan_out - start);
        let mut acc = [0.0f32; LANES];
        acc[..lanes].copy_from_slice(&bias[start..start + lanes]);
        for (i, &x) in x.iter().enumerate() {
            let column: &[f32; LANES] = t[i * width + start..i * width + start + LANES]
                .try_into()
                .expect("LANES values");
            for k in 0..LANES {
                acc[k] += x * column[k];
            }
        }
        let at = row * fan_out + start;
        output[at..at + lanes].copy_from_slice(&acc[..lanes]);
    }
}

/// The gradient at a layer's input for row `row`: the sum over outputs `o` (in order) of
/// `g[row, o] W[o, :]`, zero where the ReLU's input `pre` was negative.
#[inline(always)]
fn input_grad(
    grad: &[f32],
    w: &[f32],
    pre: &[f32],
    grad_in: &mut [f32],
    fan_in: usize,
    fan_out: usize,
    row: usize,
) {
    let g = &grad[row * fan_out..(row + 1) * fan_out];
    for start in (0..fan_in).step_by(LANES) {
        let lanes = LANES.min(fan_in - start);
        let mut acc = [0.0f32; LANES];
        for (o, &g) in g.iter().enumerate() {
            add_scaled(
                &mut acc,
                g,
                &w[o * fan_in + start..o * fan_in + start + lanes],
            );
        }
        let at = row * fan_in + start;
        for k in 0..lanes {
            grad_in[at + k] = if pre[at + k] < 0.0 { 0.0 } else { acc[k] };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`every_instruction_set_gives_the_same_bits`] trains, as trained on 2026-12-05.
    const FINGERPRINT: u64 = 0x80c5_2785_9eda_46ee;
    const LOSS_BITS: u32 = 0x3fbe_c1e3;

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let data = crate::data::load_source("sklearn-digits:train:1/10").unwrap();
        let widths = [64, 24, 10];
        let dense = Dense::new(&widths);
        let start = crate::train::Classifier::new(
            crate::train::Architecture::Mlp {
                layers: widths.to_vec(),
            },
            3,
        )
        .unwrap()
        .weights()
        .unwrap();
        let params = TrainParams {
            epochs: 2,
            batch: 16,
            lr: 0.1,
            momentum: 0.5,
            prox: 0.01,
        };
        let orders = crate::train::epoch_orders(data.len(), 2, 5);
        let (mut fast, mut plain) = (start.clone(), start);
        let go = AtomicBool::new(false);
        let fast_loss = dense
            .train(&mut fast, &data, &params, &orders, &go)
            .unwrap();
        let plain_loss = dense
            .train_any(&mut plain, &data, &params, &orders, &go)
            .unwrap();
        assert_eq!(fast_loss.to_bits(), plain_loss.to_bits());
        // Pinned across versions too: a change to any sum's order (or to the maths) shows
        // here, and would break agreement with nodes of an older version.
        let fingerprint = plain
            .iter()
            .fold(0u64, |h, w| h.rotate_left(7) ^ u64::from(w.to_bits()));
        assert_eq!(
            (fingerprint, plain_loss.to_bits()),
            (FINGERPRINT, LOSS_BITS),
            "fingerprint {fingerprint:#x}, loss bits {:#x}",
            plain_loss.to_bits()
        );
        assert!(fast
            .iter()
            .zip(&plain)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(
            dense.evaluate(&fast, &data),
            dense.evaluate_any(&plain, &data)
        );
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut avx2 = fast.clone();
            let mut again = fast.clone();
            // SAFETY: the CPU has AVX2 (checked just above).
            let a = unsafe { dense.train_avx2(&mut avx2, &data, &params, &orders, &go) };
            let b = dense.train_any(&mut again, &data, &params, &orders, &go);
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits));
            // Told to stop, it stops before the first minibatch and leaves the weights be.
            let mut kept = fast.clone();
            let stop = AtomicBool::new(true);
            assert_eq!(dense.train(&mut kept, &data, &params, &orders, &stop), None);
            assert_eq!(kept, fast);
            assert!(avx2
                .iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let (mut wide, mut again) = (fast.clone(), fast.clone());
            // SAFETY: the CPU has AVX-512F (checked just above).
            let a = unsafe { dense.train_avx512(&mut wide, &data, &params, &orders, &go) };
            let b = dense.train_any(&mut again, &data, &params, &orders, &go);
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits));
            assert!(wide
                .iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            // SAFETY: as above.
            let evaluated = unsafe { dense.evaluate_avx512(&wide, &data) };
            assert_eq!(evaluated, dense.evaluate_any(&again, &data));
        }
    }
}
