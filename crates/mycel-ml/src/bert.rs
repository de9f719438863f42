//! A BERT encoder for sentence embeddings, over the real tokens only.
//!
//! The matrix products are the `gemm` crate's (what candle uses), called on our own buffers
//! with the bias folded in; everything between them is plain Rust over slices. Sentences are not padded: the tokens of a batch are stacked into one matrix
//! for the linear layers (no work on padding) and attention runs sentence by sentence. GELU
//! uses a vectorisable erf (Abramowitz–Stegun 7.1.26, |error| < 1.5e-7) instead of a call to
//! libm per value, which alone took a fifth of candle's BERT time.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

struct Linear {
    /// Wᵀ, (in, out) row-major: transposed once at load.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Linear {
    fn load(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Self> {
        let weight = vb.get((outputs, inputs), "weight")?.t()?.contiguous()?;
        Ok(Self {
            weight: weight.flatten_all()?.to_vec1()?,
            bias: vb.get(outputs, "bias")?.to_vec1()?,
        })
    }

    /// Stacks layers with the same inputs into one (their outputs side by side).
    fn stack(parts: Vec<Linear>) -> Self {
        let outputs: Vec<usize> = parts.iter().map(|p| p.bias.len()).collect();
        let inputs = parts[0].weight.len() / outputs[0];
        let mut weight = Vec::with_capacity(inputs * outputs.iter().sum::<usize>());
        for row in 0..inputs {
            for (part, &n) in parts.iter().zip(&outputs) {
                weight.extend_from_slice(&part.weight[row * n..(row + 1) * n]);
            }
        }
        Self {
            weight,
            bias: parts.iter().flat_map(|p| p.bias.iter().copied()).collect(),
        }
    }

    /// `x · Wᵀ + b` for `rows` rows of `x`.
    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let n = self.bias.len();
        let k = self.weight.len() / n;
        assert_eq!(x.len(), rows * k, "input width");
        // Start from the bias and add the product to it.
        let mut y: Vec<f32> = Vec::with_capacity(rows * n);
        for _ in 0..rows {
            y.extend_from_slice(&self.bias);
        }
        // SAFETY: `y` is rows × n, `x` rows × k and `weight` k × n, all row-major with the
        // strides given; gemm reads and writes only inside them.
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                self.weight.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        y
    }
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            gamma: vb.get(size, "weight")?.to_vec1()?,
            beta: vb.get(size, "bias")?.to_vec1()?,
            eps: eps as f32,
        })
    }

    fn apply(&self, x: &mut [f32]) {
        let n = self.gamma.len() as f32;
        x.par_chunks_mut(self.gamma.len() * 16)
            .for_each(|rows| self.apply_rows(rows, n));
    }

    fn apply_rows(&self, x: &mut [f32], n: f32) {
        for row in x.chunks_exact_mut(self.gamma.len()) {
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let scale = 1.0 / (var + self.eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
                *v = (*v - mean) * scale * g + b;
            }
        }
    }
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The encoder.
pub(crate) struct Bert {
    words: Vec<f32>,
    positions: Vec<f32>,
    token_type: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    max_positions: usize,
    act: HiddenAct,
}

/// `e^x`, branch-free so that loops over it vectorise (relative error ~2e-7).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round x / ln 2 to the nearest integer with the 1.5·2^23 trick (no call to round).
    let k = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = (x - k * 0.693_145_75) - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// `a · b` over 8 independent lanes, so that the loop vectorises (a float sum in one
/// accumulator cannot be reordered).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// erf by Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

fn activate(act: HiddenAct, values: &mut [f32]) {
    values
        .par_chunks_mut(16 * 1024)
        .for_each(|chunk| activate_chunk(act, chunk));
}

fn activate_chunk(act: HiddenAct, values: &mut [f32]) {
    match act {
        HiddenAct::Gelu => {
            for v in values.iter_mut() {
                *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
        HiddenAct::GeluApproximate => {
            for v in values.iter_mut() {
                let x = *v;
                let inner = 0.797_884_6 * (x + 0.044_715 * x * x * x);
                // tanh(y) = 1 - 2 / (e^{2y} + 1)
                let tanh = 1.0 - 2.0 / (exp(2.0 * inner) + 1.0);
                *v = 0.5 * x * (1.0 + tanh);
            }
        }
        HiddenAct::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

impl Bert {
    /// Loads the weights named as in Hugging Face's `BertModel` (with or without a `bert.`
    /// prefix).
    pub(crate) fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = config.hidden_size;
        if config.num_attention_heads == 0 || !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "{h} is not divisible into {} heads",
                config.num_attention_heads
            );
        }
        let e = vb.pp("embeddings");
        let flat = |t: Tensor| -> candle_core::Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        let words = flat(e.get((config.vocab_size, h), "word_embeddings.weight")?)?;
        let positions = flat(e.get(
            (config.max_position_embeddings, h),
            "position_embeddings.weight",
        )?)?;
        let token_types =
            flat(e.get((config.type_vocab_size, h), "token_type_embeddings.weight")?)?;
        let embedding_norm = LayerNorm::load(&e.pp("LayerNorm"), h, config.layer_norm_eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let qkv = Linear::stack(vec![
                Linear::load(&a.pp("self").pp("query"), h, h)?,
                Linear::load(&a.pp("self").pp("key"), h, h)?,
                Linear::load(&a.pp("self").pp("value"), h, h)?,
            ]);
            let inner = config.intermediate_size;
            layers.push(Layer {
                qkv,
                attention_out: Linear::load(&a.pp("output").pp("dense"), h, h)?,
                attention_norm: LayerNorm::load(
                    &a.pp("output").pp("LayerNorm"),
                    h,
                    config.layer_norm_eps,
                )?,
                intermediate: Linear::load(&l.pp("intermediate").pp("dense"), h, inner)?,
                output: Linear::load(&l.pp("output").pp("dense"), inner, h)?,
                output_norm: LayerNorm::load(
                    &l.pp("output").pp("LayerNorm"),
                    h,
                    config.layer_norm_eps,
                )?,
            });
        }
        Ok(Self {
            words,
            positions,
            token_type: token_types[..h].to_vec(),
            embedding_norm,
            layers,
            hidden: h,
            heads: config.num_attention_heads,
            max_positions: config.max_position_embeddings,
            act: config.hidden_act,
        })
    }

    /// Self-attention of the sentence whose `len` tokens start at token `start` of `qkv`
    /// (queries, keys and values side by side in each row); writes `out` (len × hidden).
    fn attend(&self, qkv: &[f32], start: usize, len: usize, scale: f32, out: &mut [f32]) {
        let h = self.hidden;
        let head_dim = h / self.heads;
        let mut scores = Vec::with_capacity(len);
        for head in 0..self.heads {
            let at =
                |token: usize, part: usize| (start + token) * 3 * h + part * h + head * head_dim;
            for i in 0..len {
                let q = &qkv[at(i, 0)..][..head_dim];
                scores.clear();
                scores.extend((0..len).map(|j| dot(q, &qkv[at(j, 1)..][..head_dim]) * scale));
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = exp(*s - max);
                    sum += *s;
                }
                let row = &mut out[i * h + head * head_dim..][..head_dim];
                for (j, w) in scores.iter().enumerate() {
                    let v = &qkv[at(j, 2)..][..head_dim];
                    let w = w / sum;
                    row.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
                }
            }
        }
    }

    /// The mean of each sentence's final hidden states over its tokens.
    pub(crate) fn mean_pooled(&self, sentences: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let h = self.hidden;
        let vocab = self.words.len() / h;
        let total: usize = sentences.iter().map(|s| s.len()).sum();
        if sentences
            .iter()
            .any(|s| s.is_empty() || s.len() > self.max_positions)
            || sentences
                .iter()
                .flat_map(|s| s.iter())
                .any(|t| *t as usize >= vocab)
        {
            candle_core::bail!("a sentence is empty, too long or has an unknown token");
        }
        let mut x = Vec::with_capacity(total * h);
        for sentence in sentences {
            for (p, &t) in sentence.iter().enumerate() {
                let word = &self.words[t as usize * h..][..h];
                let position = &self.positions[p * h..][..h];
                x.extend(
                    word.iter()
                        .zip(position)
                        .zip(&self.token_type)
                        .map(|((w, p), t)| w + p + t),
                );
            }
        }
        self.embedding_norm.apply(&mut x);
        let head_dim = h / self.heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut starts = Vec::with_capacity(sentences.len());
        let mut start = 0;
        for sentence in sentences {
            starts.push(start);
            start += sentence.len();
        }
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x, total);
            let mut context = vec![0f32; total * h];
            // Each sentence attends to itself only: split the output by sentence and run
            // them in parallel.
            let mut parts = Vec::with_capacity(sentences.len());
            let mut rest = context.as_mut_slice();
            for sentence in sentences {
                let (part, tail) = rest.split_at_mut(sentence.len() * h);
                parts.push(part);
                rest = tail;
            }
            parts
                .into_par_iter()
                .zip(starts.par_iter())
                .for_each(|(out, &start)| {
                    self.attend(&qkv, start, out.len() / h, scale, out);
                });
            let attended = layer.attention_out.forward(&context, total);
            x.iter_mut().zip(&attended).for_each(|(a, b)| *a += b);
            layer.attention_norm.apply(&mut x);
            let mut inner = layer.intermediate.forward(&x, total);
            activate(self.act, &mut inner);
            let out = layer.output.forward(&inner, total);
            x.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
            layer.output_norm.apply(&mut x);
        }
        let mut pooled = Vec::with_capacity(sentences.len());
        let mut start = 0;
        for sentence in sentences {
            let len = sentence.len();
            let mut mean = vec![0f32; h];
            for row in x[start * h..(start + len) * h].chunks_exact(h) {
                mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
            }
            mean.iter_mut().for_each(|m| *m /= len as f32);
            pooled.push(mean);
            start += len;
        }
        Ok(pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 / 100.0;
            let e = exp(x);
            assert!((e - x.exp()).abs() <= 1e-6 * x.exp(), "exp({x}) = {e}");
        }
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            // erf(4) = 1 - 1.5e-8: past it, erf is 1 on the f32 grid.
            let reference = if x.abs() <= 4.0 {
                series_erf(f64::from(x))
            } else {
                1f64.copysign(f64::from(x))
            };
            assert!((f64::from(erf(x)) - reference).abs() < 3e-7, "erf({x})");
        }
    }

    /// erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)), in f64 (accurate for |x| ≤ 4).
    fn series_erf(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
