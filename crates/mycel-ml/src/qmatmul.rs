//! Our own quantised matrix multiplication for GGUF weights (Q4_1 and Q8_0 blocks of 32) with
//! f32 activations, used by the `mycel-q4` engine ([`crate::llama`]).
//!
//! candle 0.11 multiplies Q4_1 with a scalar loop in a portable build (../shared/CANDLE.md),
//! which makes decoding memory- and instruction-bound at a third of llama.cpp's speed. Here
//! every block is unpacked to 8-lane vectors and multiplied with fused multiply-adds: with AVX2
//! and FMA when the CPU has them (checked at run time, so the binary stays portable), and
//! otherwise with scalar code that performs *the same operations in the same order*
//! (`f32::mul_add` is the fused operation `vfmadd` is), so every CPU computes bit-identical
//! results and replicas agree token for token whatever they run on.
//!
//! The arithmetic, per output element (row `r`, input `x`):
//! - per block `b`: `v[l] = q[l]·x[l]`, then `v[l] = fma(q[8g+l], x[8g+l], v[l])` for the
//!   groups g = 1, 2, 3; `acc[l] = fma(d_b, v[l], acc[l])`; `msum = fma(m_b, Σx_b, msum)`
//!   (Q4_1 only; Σx_b summed in order);
//! - at the end: `((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7)) + msum`.

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

type RowFn = fn(&QMatrix, usize, &[f32], &[f32]) -> f32;
type UnpackedRowFn = fn(&QMatrix, usize, &[f32], &[f32], &[f32]) -> f32;

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
        let (header, quant) = match format {
            Format::Q4_1 => (4, BLOCK / 2),
            Format::Q8_0 => (2, BLOCK),
        };
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

    /// `x · W^T` for `x` of shape (m, cols): returns (m, rows), row-major.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.cols, self.rows);
        debug_assert_eq!(x.len(), m * k);
        let xsums: Vec<f32> = x
            .chunks_exact(BLOCK)
            .map(|c| c.iter().fold(0f32, |s, v| s + v))
            .collect();
        let chunk = n
            .div_ceil(rayon::current_num_threads() * CHUNKS_PER_THREAD)
            .max(16);
        if m == 1 {
            let row_fn = row_kernel();
            let mut out = vec![0f32; n];
            out.par_chunks_mut(chunk).enumerate().for_each(|(c, part)| {
                for (i, o) in part.iter_mut().enumerate() {
                    *o = row_fn(self, c * chunk + i, x, &xsums);
                }
            });
            return out;
        }
        // Several inputs: each weight row is unpacked once and used for all of them. The
        // arithmetic is the single-input one, so a token's outputs do not depend on whether
        // it came alone or with a prompt.
        let row_fn = unpacked_row_kernel();
        let blocks = self.blocks_per_row();
        let mut transposed = vec![0f32; n * m];
        transposed
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, part)| {
                let mut unpacked = vec![0f32; k];
                for (i, outputs) in part.chunks_mut(m).enumerate() {
                    let r = c * chunk + i;
                    for b in 0..blocks {
                        unpacked[b * BLOCK..(b + 1) * BLOCK]
                            .copy_from_slice(&self.block_values(r * blocks + b));
                    }
                    for (j, o) in outputs.iter_mut().enumerate() {
                        let xs = &x[j * k..(j + 1) * k];
                        let sums = &xsums[j * blocks..(j + 1) * blocks];
                        *o = row_fn(self, r, &unpacked, xs, sums);
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
}

/// The fixed reduction of the 8 lanes.
fn reduce(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// One block's contribution, lane by lane, from its values `q` and inputs `x`.
fn block_lanes(q: &[f32], x: &[f32], d: f32, acc: &mut [f32; 8]) {
    for l in 0..8 {
        let mut v = q[l] * x[l];
        v = q[8 + l].mul_add(x[8 + l], v);
        v = q[16 + l].mul_add(x[16 + l], v);
        v = q[24 + l].mul_add(x[24 + l], v);
        acc[l] = d.mul_add(v, acc[l]);
    }
}

fn row_scalar(w: &QMatrix, r: usize, x: &[f32], xsums: &[f32]) -> f32 {
    let blocks = w.blocks_per_row();
    let mut acc = [0f32; 8];
    let mut msum = 0f32;
    for (b, &xsum) in xsums.iter().enumerate().take(blocks) {
        let block = r * blocks + b;
        let q = w.block_values(block);
        block_lanes(
            &q,
            &x[b * BLOCK..(b + 1) * BLOCK],
            w.scales[block],
            &mut acc,
        );
        msum = w.min(block).mul_add(xsum, msum);
    }
    reduce(acc) + msum
}

fn unpacked_row_scalar(w: &QMatrix, r: usize, q: &[f32], x: &[f32], xsums: &[f32]) -> f32 {
    let blocks = w.blocks_per_row();
    let mut acc = [0f32; 8];
    let mut msum = 0f32;
    for (b, &xsum) in xsums.iter().enumerate().take(blocks) {
        let block = r * blocks + b;
        let span = b * BLOCK..(b + 1) * BLOCK;
        block_lanes(&q[span.clone()], &x[span], w.scales[block], &mut acc);
        msum = w.min(block).mul_add(xsum, msum);
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

fn unpacked_row_kernel() -> UnpackedRowFn {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return avx2::unpacked_row;
    }
    unpacked_row_scalar
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

    use super::{Format, QMatrix, BLOCK};

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

    /// Unpacks block `b` into four vectors of 8 values, in element order.
    #[target_feature(enable = "avx2,fma")]
    fn unpack(w: &QMatrix, b: usize) -> [__m256; 4] {
        match w.format {
            Format::Q4_1 => {
                let bytes = &w.quants[b * BLOCK / 2..(b + 1) * BLOCK / 2];
                // SAFETY: `bytes` holds 16 bytes; unaligned loads are allowed.
                let raw = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
                let mask = _mm_set1_epi8(0x0F);
                let low = _mm_and_si128(raw, mask);
                let high = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let widen = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                [
                    widen(low),
                    widen(_mm_srli_si128(low, 8)),
                    widen(high),
                    widen(_mm_srli_si128(high, 8)),
                ]
            }
            Format::Q8_0 => {
                let bytes = &w.quants[b * BLOCK..(b + 1) * BLOCK];
                // SAFETY: `bytes` holds 32 bytes; unaligned loads are allowed.
                let (a, c) = unsafe {
                    (
                        _mm_loadu_si128(bytes.as_ptr().cast()),
                        _mm_loadu_si128(bytes.as_ptr().add(16).cast()),
                    )
                };
                let widen = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                [
                    widen(a),
                    widen(_mm_srli_si128(a, 8)),
                    widen(c),
                    widen(_mm_srli_si128(c, 8)),
                ]
            }
        }
    }

    /// `v = q0·x0`, then `v = fma(qg, xg, v)` for g = 1..3, `acc = fma(d, v, acc)`.
    #[target_feature(enable = "avx2,fma")]
    fn block(q: [__m256; 4], x: &[f32], d: f32, acc: __m256) -> __m256 {
        debug_assert!(x.len() >= BLOCK);
        // SAFETY: `x` holds at least 32 floats; unaligned loads are allowed.
        let xs = unsafe {
            [
                _mm256_loadu_ps(x.as_ptr()),
                _mm256_loadu_ps(x.as_ptr().add(8)),
                _mm256_loadu_ps(x.as_ptr().add(16)),
                _mm256_loadu_ps(x.as_ptr().add(24)),
            ]
        };
        let mut v = _mm256_mul_ps(q[0], xs[0]);
        v = _mm256_fmadd_ps(q[1], xs[1], v);
        v = _mm256_fmadd_ps(q[2], xs[2], v);
        v = _mm256_fmadd_ps(q[3], xs[3], v);
        _mm256_fmadd_ps(_mm256_set1_ps(d), v, acc)
    }

    #[target_feature(enable = "avx2,fma")]
    fn row_avx2(w: &QMatrix, r: usize, x: &[f32], xsums: &[f32]) -> f32 {
        let blocks = w.blocks_per_row();
        let mut acc = _mm256_setzero_ps();
        let mut msum = 0f32;
        for (b, &xsum) in xsums.iter().enumerate().take(blocks) {
            let index = r * blocks + b;
            let q = unpack(w, index);
            acc = block(q, &x[b * BLOCK..(b + 1) * BLOCK], w.scales[index], acc);
            msum = w.min(index).mul_add(xsum, msum);
        }
        reduce(acc) + msum
    }

    #[target_feature(enable = "avx2,fma")]
    fn unpacked_row_avx2(w: &QMatrix, r: usize, q: &[f32], x: &[f32], xsums: &[f32]) -> f32 {
        let blocks = w.blocks_per_row();
        let mut acc = _mm256_setzero_ps();
        let mut msum = 0f32;
        for (b, &xsum) in xsums.iter().enumerate().take(blocks) {
            let index = r * blocks + b;
            let at = b * BLOCK;
            // SAFETY: `q` holds the row's `blocks * 32` values.
            let values = unsafe {
                [
                    _mm256_loadu_ps(q.as_ptr().add(at)),
                    _mm256_loadu_ps(q.as_ptr().add(at + 8)),
                    _mm256_loadu_ps(q.as_ptr().add(at + 16)),
                    _mm256_loadu_ps(q.as_ptr().add(at + 24)),
                ]
            };
            acc = block(values, &x[at..at + BLOCK], w.scales[index], acc);
            msum = w.min(index).mul_add(xsum, msum);
        }
        reduce(acc) + msum
    }

    pub(super) fn row(w: &QMatrix, r: usize, x: &[f32], xsums: &[f32]) -> f32 {
        // SAFETY: chosen only when the CPU has AVX2 and FMA (`available`).
        unsafe { row_avx2(w, r, x, xsums) }
    }

    pub(super) fn unpacked_row(w: &QMatrix, r: usize, q: &[f32], x: &[f32], xsums: &[f32]) -> f32 {
        // SAFETY: chosen only when the CPU has AVX2 and FMA (`available`).
        unsafe { unpacked_row_avx2(w, r, q, x, xsums) }
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
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{format:?}: {a} vs {b}"
                );
            }
            // One row at a time gives the very same bits as several at once.
            for j in 0..m {
                let alone = w.matmul(&x[j * cols..(j + 1) * cols], 1);
                assert_eq!(alone, got[j * rows..(j + 1) * rows].to_vec(), "{format:?}");
            }
            // The scalar kernels give the very same bits as the SIMD ones.
            let xsums: Vec<f32> = x[..cols]
                .chunks_exact(BLOCK)
                .map(|c| c.iter().fold(0f32, |s, v| s + v))
                .collect();
            for r in 0..rows {
                assert_eq!(
                    row_scalar(&w, r, &x[..cols], &xsums).to_bits(),
                    row_kernel()(&w, r, &x[..cols], &xsums).to_bits(),
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
