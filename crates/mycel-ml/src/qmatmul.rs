//! Our own quantised matrix multiplication for GGUF weights (Q4_1 and Q8_0 blocks of 32),
//! used by the `mycel-q4` engine ([`crate::llama`]).
//!
//! candle 0.11 multiplies Q4_1 with a scalar loop in a portable build (../shared/CANDLE.md),
//! which makes decoding instruction-bound at a fraction of llama.cpp's speed. Here each block
//! of the input is scaled to 16-bit integers (a scale per 32 values: ~16 bits of precision,
//! far finer than the 4- or 8-bit weights), and a block's products are summed as integers with
//! `madd` (AVX2, chosen at run time, so the binary stays portable) or with scalar code. Integer
//! sums are exact in any order and every floating-point step is the same fused operation in
//! the same order on both paths (`f32::mul_add` is `vfmadd`), so every CPU computes
//! bit-identical results and replicas agree token for token whatever they run on.
//!
//! The arithmetic, per output element (row `r`, input `x`):
//! - the input, per block `b`: `e_b = max|x| / 32767`, `x̂_i = round(x_i / e_b)` (i16), and
//!   `Σx_b` summed in order (for the Q4_1 minimum);
//! - per block: integer lanes `s_j = Σ q_i·x̂_i` over elements `i ∈ {2j, 2j+1, 16+2j, 17+2j}`
//!   (j = 0..8), `acc_j = fma(d_b·e_b, s_j, acc_j)`, `msum = fma(m_b, Σx_b, msum)` (Q4_1);
//! - at the end: `((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7)) + msum`.
//!
//! Every lane sum fits in 24 bits (|q| ≤ 128, |x̂| ≤ 32767, 4 terms), so its conversion to
//! f32 is exact too.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

/// Values per block.
pub(crate) const BLOCK: usize = 32;
/// Row chunks handed to each thread (more balance the load, fewer cost less to hand out).
const CHUNKS_PER_THREAD: usize = 4;

/// How a matrix's blocks store their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// 32 4-bit values, a scale and a minimum: `d·q + m`.
    Q4_1,
    /// 32 signed 8-bit values and a scale: `d·q`.
    Q8_0,
}

impl Format {
    /// Bytes of quantised values per block.
    fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_1 => BLOCK / 2,
            Self::Q8_0 => BLOCK,
        }
    }
}

/// A row-major matrix of quantised blocks, its scales unpacked to f32.
#[derive(Debug, Clone)]
pub(crate) struct QMatrix {
    rows: usize,
    cols: usize,
    format: Format,
    scales: Vec<f32>,
    mins: Vec<f32>,
    quants: Vec<u8>,
}

impl QMatrix {
    /// Takes a GGUF tensor of shape (rows, cols) in Q4_1 or Q8_0.
    pub(crate) fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Self> {
        let (rows, cols) = tensor.shape().dims2()?;
        if cols % BLOCK != 0 {
            candle_core::bail!("{cols} columns is not a multiple of {BLOCK}");
        }
        let format = match tensor.dtype() {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            other => candle_core::bail!("no kernel for {other:?} blocks"),
        };
        let data: Cow<'_, [u8]> = tensor.data()?;
        let blocks = rows * cols / BLOCK;
        // A block is its f16 scale (and, for Q4_1, its f16 minimum), then its values.
        let header = if format == Format::Q4_1 { 4 } else { 2 };
        let quant = format.quant_bytes();
        let size = header + quant;
        if data.len() != blocks * size {
            candle_core::bail!("{} bytes for {blocks} blocks of {size}", data.len());
        }
        let f16_at = |at: usize| half::f16::from_le_bytes([data[at], data[at + 1]]).to_f32();
        let mut scales = Vec::with_capacity(blocks);
        let mut mins = Vec::with_capacity(if format == Format::Q4_1 { blocks } else { 0 });
        let mut quants = Vec::with_capacity(blocks * quant);
        for block in data.chunks_exact(size) {
            let at = block.as_ptr() as usize - data.as_ptr() as usize;
            scales.push(f16_at(at));
            if format == Format::Q4_1 {
                mins.push(f16_at(at + 2));
            }
            quants.extend_from_slice(&block[header..]);
        }
        Ok(Self {
            rows,
            cols,
            format,
            scales,
            mins,
            quants,
        })
    }

    /// Stacks matrices with the same columns and format on top of each other (fused
    /// projections: one pass over the input for several outputs).
    pub(crate) fn stack(parts: &[QMatrix]) -> candle_core::Result<Self> {
        let first = &parts[0];
        if parts
            .iter()
            .any(|p| p.cols != first.cols || p.format != first.format)
        {
            candle_core::bail!("stacked matrices must share columns and format");
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            format: first.format,
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            mins: parts.iter().flat_map(|p| p.mins.iter().copied()).collect(),
            quants: parts
                .iter()
                .flat_map(|p| p.quants.iter().copied())
                .collect(),
        })
    }

    /// Output features.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r`, dequantised.
    pub(crate) fn row(&self, r: usize) -> Vec<f32> {
        let blocks = self.blocks_per_row();
        (r * blocks..(r + 1) * blocks)
            .flat_map(|b| {
                let (d, m) = (self.scales[b], self.min(b));
                self.block_values(b).map(|q| d.mul_add(q, m))
            })
            .collect()
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// The quantised values of block `b` as integers, in element order.
    fn block_values(&self, b: usize) -> [f32; BLOCK] {
        let bytes = self.format.quant_bytes();
        let q = &self.quants[b * bytes..(b + 1) * bytes];
        let mut out = [0f32; BLOCK];
        match self.format {
            Format::Q4_1 => {
                for j in 0..BLOCK / 2 {
                    out[j] = f32::from(q[j] & 0x0F);
                    out[j + BLOCK / 2] = f32::from(q[j] >> 4);
                }
            }
            Format::Q8_0 => {
                for (o, v) in out.iter_mut().zip(q) {
                    *o = f32::from(*v as i8);
                }
            }
        }
        out
    }

    fn min(&self, b: usize) -> f32 {
        if self.format == Format::Q4_1 {
            self.mins[b]
        } else {
            0.0
        }
    }

    /// The quantised values of block `b` as integers, in element order.
    fn block_ints(&self, b: usize) -> [i16; BLOCK] {
        self.block_values(b).map(|v| v as i16)
    }

    /// `x · W^T` for `x` of shape (m, cols): returns (m, rows), row-major.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.cols, self.rows);
        debug_assert_eq!(x.len(), m * k);
        let input = Input::quantize(x);
        let chunk = n
            .div_ceil(rayon::current_num_threads() * CHUNKS_PER_THREAD)
            .max(16);
        let blocks = self.blocks_per_row();
        if m == 1 {
            let row_fn = row_kernel();
            let mut out = vec![0f32; n];
            out.par_chunks_mut(chunk).enumerate().for_each(|(c, part)| {
                for (i, o) in part.iter_mut().enumerate() {
                    *o = row_fn(self, c * chunk + i, None, &input, 0);
                }
            });
            return out;
        }
        // Several inputs: each weight row is unpacked once and used for all of them, with the
        // single-input arithmetic, so a token's outputs do not depend on whether it came
        // alone or with a prompt.
        let row_fn = row_kernel();
        let mut transposed = vec![0f32; n * m];
        transposed
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, part)| {
                for (i, outputs) in part.chunks_mut(m).enumerate() {
                    let r = c * chunk + i;
                    let q = self.row_ints(r);
                    for (j, o) in outputs.iter_mut().enumerate() {
                        *o = row_fn(self, r, Some(&q), &input, j * blocks);
                    }
                }
            });
        let mut out = vec![0f32; m * n];
        for (r, column) in transposed.chunks_exact(m).enumerate() {
            for (j, v) in column.iter().enumerate() {
                out[j * n + r] = *v;
            }
        }
        out
    }

    /// Row `r`'s quantised values as integers.
    fn row_ints(&self, r: usize) -> Vec<i16> {
        let blocks = self.blocks_per_row();
        (r * blocks..(r + 1) * blocks)
            .flat_map(|b| self.block_ints(b))
            .collect()
    }
}

/// Inputs scaled to 16-bit integers, block by block.
struct Input {
    /// The scaled values.
    q: Vec<i16>,
    /// Each block's scale.
    scale: Vec<f32>,
    /// Each block's sum of the original values.
    sum: Vec<f32>,
}

impl Input {
    fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut input = Self {
            q: Vec::with_capacity(x.len()),
            scale: Vec::with_capacity(blocks),
            sum: Vec::with_capacity(blocks),
        };
        for block in x.chunks_exact(BLOCK) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 32767.0;
            input.scale.push(scale);
            input.sum.push(block.iter().fold(0f32, |s, v| s + v));
            if scale > 0.0 && scale.is_finite() {
                input.q.extend(
                    block
                        .iter()
                        .map(|v| (v / scale).round().clamp(-32767.0, 32767.0) as i16),
                );
            } else {
                input.q.extend([0i16; BLOCK]);
            }
        }
        input
    }
}

/// Row `r` times the input whose blocks start at block `first`; the row's integers are read
/// from `q` when given (unpacked once for several inputs), else from the packed blocks.
type RowFn = fn(&QMatrix, usize, Option<&[i16]>, &Input, usize) -> f32;

/// The fixed reduction of the 8 lanes.
fn reduce(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

fn row_scalar(w: &QMatrix, r: usize, q: Option<&[i16]>, x: &Input, first: usize) -> f32 {
    let blocks = w.blocks_per_row();
    let mut acc = [0f32; 8];
    let mut msum = 0f32;
    for b in 0..blocks {
        let index = r * blocks + b;
        let unpacked;
        let qs = match q {
            Some(q) => &q[b * BLOCK..(b + 1) * BLOCK],
            None => {
                unpacked = w.block_ints(index);
                &unpacked[..]
            }
        };
        let xs = &x.q[(first + b) * BLOCK..(first + b + 1) * BLOCK];
        let scale = w.scales[index] * x.scale[first + b];
        for (j, a) in acc.iter_mut().enumerate() {
            let lane: i32 = [2 * j, 2 * j + 1, 16 + 2 * j, 17 + 2 * j]
                .iter()
                .map(|&e| i32::from(qs[e]) * i32::from(xs[e]))
                .sum();
            *a = scale.mul_add(lane as f32, *a);
        }
        msum = w.min(index).mul_add(x.sum[first + b], msum);
    }
    reduce(acc) + msum
}

fn row_kernel() -> RowFn {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return avx2::row;
    }
    row_scalar
}

/// Whether this CPU runs the AVX2 kernels (otherwise the scalar ones, with the same results).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Format, Input, QMatrix, BLOCK};

    pub(super) fn available() -> bool {
        std::env::var_os("MYCEL_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    }

    /// The fixed reduction of the 8 lanes (see `super::reduce`).
    #[target_feature(enable = "avx2,fma")]
    fn reduce(acc: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(acc);
        let hi = _mm256_extractf128_ps(acc, 1);
        // [a0+a4, a1+a5, a2+a6, a3+a7]
        let s4 = _mm_add_ps(lo, hi);
        // [(a0+a4)+(a2+a6), (a1+a5)+(a3+a7), ..]
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }

    /// Block `index`'s values as two vectors of 16 integers (elements 0..16 and 16..32).
    #[target_feature(enable = "avx2,fma")]
    fn packed(w: &QMatrix, index: usize) -> (__m256i, __m256i) {
        match w.format {
            Format::Q4_1 => {
                let bytes = &w.quants[index * BLOCK / 2..(index + 1) * BLOCK / 2];
                // SAFETY: `bytes` holds 16 bytes; unaligned loads are allowed.
                let raw = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
                let mask = _mm_set1_epi8(0x0F);
                (
                    _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask)),
                    _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)),
                )
            }
            Format::Q8_0 => {
                let bytes = &w.quants[index * BLOCK..(index + 1) * BLOCK];
                // SAFETY: `bytes` holds 32 bytes; unaligned loads are allowed.
                unsafe {
                    (
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(bytes.as_ptr().cast())),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(bytes.as_ptr().add(16).cast())),
                    )
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn row_avx2(w: &QMatrix, r: usize, q: Option<&[i16]>, x: &Input, first: usize) -> f32 {
        let blocks = w.blocks_per_row();
        assert!(
            q.is_none_or(|q| q.len() >= blocks * BLOCK) && x.q.len() >= (first + blocks) * BLOCK
        );
        let mut acc = _mm256_setzero_ps();
        let mut msum = 0f32;
        for b in 0..blocks {
            let index = r * blocks + b;
            let xb = first + b;
            let (q0, q1) = match q {
                // SAFETY: the assertion above keeps both 16-lane loads inside `q`.
                Some(q) => unsafe {
                    let qp = q.as_ptr().add(b * BLOCK);
                    (
                        _mm256_loadu_si256(qp.cast()),
                        _mm256_loadu_si256(qp.add(16).cast()),
                    )
                },
                None => packed(w, index),
            };
            // SAFETY: the assertion above keeps both 16-lane loads inside `x.q`.
            let (x0, x1) = unsafe {
                let xp = x.q.as_ptr().add(xb * BLOCK);
                (
                    _mm256_loadu_si256(xp.cast()),
                    _mm256_loadu_si256(xp.add(16).cast()),
                )
            };
            // Lane j: elements 2j, 2j+1 (first half) plus 16+2j, 17+2j (second half).
            let lanes = _mm256_add_epi32(_mm256_madd_epi16(q0, x0), _mm256_madd_epi16(q1, x1));
            let scale = _mm256_set1_ps(w.scales[index] * x.scale[xb]);
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(lanes), acc);
            msum = w.min(index).mul_add(x.sum[xb], msum);
        }
        reduce(acc) + msum
    }

    pub(super) fn row(w: &QMatrix, r: usize, q: Option<&[i16]>, x: &Input, first: usize) -> f32 {
        // SAFETY: chosen only when the CPU has AVX2 and FMA (`available`).
        unsafe { row_avx2(w, r, q, x, first) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn matrix(format: GgmlDType, rows: usize, cols: usize) -> (QTensor, QMatrix) {
        let w = Tensor::from_vec(random(rows * cols, 7), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, format).unwrap();
        let m = QMatrix::from_qtensor(&q).unwrap();
        (q, m)
    }

    #[test]
    fn matches_the_dequantised_product_and_is_the_same_with_or_without_simd() {
        for format in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols, m) = (70, 96, 3);
            let (q, w) = matrix(format, rows, cols);
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let x = random(m * cols, 11);
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            let expected: Vec<f32> = xt
                .matmul(&dense.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = w.matmul(&x, m);
            for (a, b) in got.iter().zip(&expected) {
                // Inputs carry ~16 bits per block of 32, 1e-5 of the block's largest value.
                assert!(
                    (a - b).abs() < 2e-3 * (1.0 + b.abs()),
                    "{format:?}: {a} vs {b}"
                );
            }
            // One row at a time gives the very same bits as several at once.
            for j in 0..m {
                let alone = w.matmul(&x[j * cols..(j + 1) * cols], 1);
                assert_eq!(alone, got[j * rows..(j + 1) * rows].to_vec(), "{format:?}");
            }
            // The scalar kernel gives the very same bits as the SIMD one, from packed blocks
            // or from unpacked integers.
            let input = Input::quantize(&x[..cols]);
            for r in 0..rows {
                let ints = w.row_ints(r);
                let reference = row_scalar(&w, r, None, &input, 0).to_bits();
                assert_eq!(
                    reference,
                    row_scalar(&w, r, Some(&ints), &input, 0).to_bits()
                );
                assert_eq!(reference, row_kernel()(&w, r, None, &input, 0).to_bits());
                assert_eq!(
                    reference,
                    row_kernel()(&w, r, Some(&ints), &input, 0).to_bits(),
                    "{format:?} row {r}"
                );
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let w = Tensor::from_vec(random(64 * 64, 1), (64, 64), &Device::Cpu).unwrap();
        let f32_tensor = QTensor::quantize(&w, GgmlDType::F32).unwrap();
        assert!(QMatrix::from_qtensor(&f32_tensor).is_err());
        let (_, a) = matrix(GgmlDType::Q4_1, 8, 64);
        let (_, b) = matrix(GgmlDType::Q8_0, 8, 64);
        assert!(QMatrix::stack(&[a.clone(), b]).is_err());
        let stacked = QMatrix::stack(&[a.clone(), a.clone()]).unwrap();
        let x = random(64, 3);
        let out = stacked.matmul(&x, 1);
        assert_eq!(out[..8], out[8..]);
        assert_eq!(out[..8], a.matmul(&x, 1)[..]);
    }
}
