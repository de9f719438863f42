//! Our own quantised matrix multiplication for GGUF weights (Q4_1 and Q8_0 blocks of 32),
//! used by the `mycel-q4` engine ([`crate::llama`]).
//!
//! candle 0.11 multiplies Q4_1 with a scalar loop (`BlockQ4_1::vec_dot` has no AVX2 kernel,
//! and a portable build compiles that loop for baseline x86-64), which makes decoding
//! instruction-bound at a fraction of llama.cpp's speed. Here each block of the input is
//! scaled to 16-bit integers (a scale per 32 values: ~16 bits of precision,
//! far finer than the 4- or 8-bit weights; llama.cpp's 8 bits change SmolLM2's greedy tokens
//! within 32 of them), and a block's products are summed as integers with `madd` (AVX-512BW
//! two rows to a register, or AVX2, chosen at run time, so the binary stays portable) or with
//! scalar code. Integer sums are exact in any order and every floating-point step is the same
//! fused operation in the same order on every path (`f32::mul_add` is `vfmadd`; the AVX-512
//! kernel holds each row's eight lanes as the AVX2 one does), so every CPU computes
//! bit-identical results and replicas agree token for token whatever they run on (a test runs
//! every kernel the CPU has on the same inputs and compares the bits).
//!
//! The arithmetic, per output element (row `r`, input `x`):
//! - the input, per block `b`: `e_b = max|x| / 32767`, `x̂_i = round(x_i / e_b)` (i16, half
//!   away from zero), and `Σx_b` summed in order (for the Q4_1 minimum);
//! - per block: integer lanes `s_j = Σ q_i·x̂_i` over elements `i ∈ {2j, 2j+1, 16+2j, 17+2j}`
//!   (j = 0..8),
//!   `acc_j = fma(d_b·e_b, s_j, acc_j)`, `msum = fma(m_b, Σx_b, msum)` (Q4_1);
//! - at the end: `((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7)) + msum`.
//!
//! Every lane sum fits in 24 bits (|q| ≤ 128, |x̂| ≤ 32767, 4 terms), so its conversion to
//! f32 is exact too.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};

use crate::pool::SpinPool;

/// Values per block.
pub(crate) const BLOCK: usize = 32;

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

    /// f16 numbers per block: the scale, and the minimum for Q4_1.
    fn halves(self) -> usize {
        match self {
            Self::Q4_1 => 2,
            Self::Q8_0 => 1,
        }
    }

    /// Bytes of one record: a block of each of a group's rows.
    fn record_bytes(self) -> usize {
        GROUP * (2 * self.halves() + self.quant_bytes())
    }
}

/// A row-major matrix of quantised blocks, laid out for decoding, which reads every byte of
/// the weights once per token: rows in groups of [`GROUP`] (the last padded with zeros), and
/// for each group one record per block column: the rows' f16 scales, their f16 minimums
/// (Q4_1), then their packed values. A group's weights are one sequential stream in memory,
/// no larger than in the file.
#[derive(Debug, Clone)]
pub(crate) struct QMatrix {
    rows: usize,
    cols: usize,
    format: Format,
    records: Vec<u8>,
}

/// A matrix's blocks in file order, unpacked: each block's f16 scale and minimum (bits) and
/// its packed values.
struct Blocks {
    scales: Vec<u16>,
    mins: Vec<u16>,
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
        let count = rows * cols / BLOCK;
        // A block is its f16 scale (and, for Q4_1, its f16 minimum), then its values.
        let header = 2 * format.halves();
        let quant = format.quant_bytes();
        let size = header + quant;
        if data.len() != count * size {
            candle_core::bail!("{} bytes for {count} blocks of {size}", data.len());
        }
        let mut blocks = Blocks {
            scales: Vec::with_capacity(count),
            mins: Vec::with_capacity(if format == Format::Q4_1 { count } else { 0 }),
            quants: Vec::with_capacity(count * quant),
        };
        for block in data.chunks_exact(size) {
            blocks.scales.push(u16::from_le_bytes([block[0], block[1]]));
            if format == Format::Q4_1 {
                blocks.mins.push(u16::from_le_bytes([block[2], block[3]]));
            }
            blocks.quants.extend_from_slice(&block[header..]);
        }
        Ok(Self::pack(rows, cols, format, &blocks))
    }

    /// Lays out blocks given in file order.
    fn pack(rows: usize, cols: usize, format: Format, blocks: &Blocks) -> Self {
        let per_row = cols / BLOCK;
        let quant = format.quant_bytes();
        let groups = rows.div_ceil(GROUP);
        let mut records = vec![0u8; groups * per_row * format.record_bytes()];
        for (i, record) in records.chunks_exact_mut(format.record_bytes()).enumerate() {
            let (g, b) = (i / per_row, i % per_row);
            let (scales, rest) = record.split_at_mut(2 * GROUP);
            let (mins, quants) = rest.split_at_mut(2 * GROUP * (format.halves() - 1));
            for k in 0..GROUP.min(rows - g * GROUP) {
                let index = (g * GROUP + k) * per_row + b;
                scales[2 * k..2 * k + 2].copy_from_slice(&blocks.scales[index].to_le_bytes());
                if format == Format::Q4_1 {
                    mins[2 * k..2 * k + 2].copy_from_slice(&blocks.mins[index].to_le_bytes());
                }
                quants[k * quant..(k + 1) * quant]
                    .copy_from_slice(&blocks.quants[index * quant..(index + 1) * quant]);
            }
        }
        Self {
            rows,
            cols,
            format,
            records,
        }
    }

    /// The blocks in file order (the inverse of [`QMatrix::pack`]).
    fn unpack(&self) -> Blocks {
        let per_row = self.blocks_per_row();
        let mut blocks = Blocks {
            scales: Vec::new(),
            mins: Vec::new(),
            quants: Vec::new(),
        };
        for r in 0..self.rows {
            for b in 0..per_row {
                blocks.scales.push(self.half(r, b, 0));
                if self.format == Format::Q4_1 {
                    blocks.mins.push(self.half(r, b, 1));
                }
                blocks.quants.extend_from_slice(self.quants(r, b));
            }
        }
        blocks
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
        let mut all = first.unpack();
        for part in &parts[1..] {
            let more = part.unpack();
            all.scales.extend(more.scales);
            all.mins.extend(more.mins);
            all.quants.extend(more.quants);
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Ok(Self::pack(rows, first.cols, first.format, &all))
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
        (0..self.blocks_per_row())
            .flat_map(|b| {
                let (d, m) = (self.scale(r, b), self.min(r, b));
                self.block_ints(r, b).map(|q| d.mul_add(f32::from(q), m))
            })
            .collect()
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// The record holding block `b` of row `r`'s group.
    fn record(&self, r: usize, b: usize) -> &[u8] {
        let size = self.format.record_bytes();
        let at = ((r / GROUP) * self.blocks_per_row() + b) * size;
        &self.records[at..at + size]
    }

    /// Row `r`'s block `b`: f16 number `which` (0: scale, 1: minimum) as bits.
    fn half(&self, r: usize, b: usize, which: usize) -> u16 {
        let at = 2 * (which * GROUP + r % GROUP);
        let record = self.record(r, b);
        u16::from_le_bytes([record[at], record[at + 1]])
    }

    /// Row `r`'s block `b`: its packed values.
    fn quants(&self, r: usize, b: usize) -> &[u8] {
        let quant = self.format.quant_bytes();
        let at = 2 * GROUP * self.format.halves() + (r % GROUP) * quant;
        &self.record(r, b)[at..at + quant]
    }

    /// Row `r`'s block `b`: its scale.
    fn scale(&self, r: usize, b: usize) -> f32 {
        f16(self.half(r, b, 0))
    }

    /// Row `r`'s block `b`: its minimum (0 for formats without one).
    fn min(&self, r: usize, b: usize) -> f32 {
        match self.format {
            Format::Q4_1 => f16(self.half(r, b, 1)),
            Format::Q8_0 => 0.0,
        }
    }

    /// Row `r`'s block `b`: its quantised values as integers, in element order.
    fn block_ints(&self, r: usize, b: usize) -> [i8; BLOCK] {
        let q = self.quants(r, b);
        let mut out = [0i8; BLOCK];
        match self.format {
            Format::Q4_1 => {
                for j in 0..BLOCK / 2 {
                    out[j] = (q[j] & 0x0F) as i8;
                    out[j + BLOCK / 2] = (q[j] >> 4) as i8;
                }
            }
            Format::Q8_0 => {
                for (o, v) in out.iter_mut().zip(q) {
                    *o = *v as i8;
                }
            }
        }
        out
    }

    /// `x · W^T` for `x` of shape (m, cols): returns (m, rows), row-major; its rows shared
    /// among `pool`'s threads (the decoder's).
    pub(crate) fn matmul_on(&self, x: &[f32], m: usize, pool: &mut SpinPool) -> Vec<f32> {
        self.matmul_with(x, m, kernel(), pool)
    }

    /// [`QMatrix::matmul_on`] with the kernel `kernel`.
    fn matmul_with(&self, x: &[f32], m: usize, kernel: Kernel, pool: &mut SpinPool) -> Vec<f32> {
        let (k, n) = (self.cols, self.rows);
        debug_assert_eq!(x.len(), m * k);
        let input = Input::quantize(x);
        let blocks = self.blocks_per_row();
        let groups = n.div_ceil(GROUP);
        // A group of rows is read from memory once and stays in cache while it meets every
        // input, each with the single-input arithmetic, so a token's outputs do not depend on
        // whether it came alone or with a prompt, nor on how the groups are shared among
        // threads.
        let mut result = vec![0f32; m * n];
        let out = Rows(result.as_mut_ptr());
        let groups_of = |part: usize, parts: usize| {
            let range = groups * part / parts..groups * (part + 1) / parts;
            let mut group = [0f32; GROUP];
            let mut wide = [[0f32; GROUP]; WIDE];
            for g in range {
                let rows = GROUP.min(n - g * GROUP);
                let mut j = 0;
                if let Some(kernel) = kernel.wide {
                    while j + WIDE <= m {
                        let firsts = std::array::from_fn(|i| (j + i) * blocks);
                        kernel(self, g, &input, firsts, &mut wide);
                        for (i, group) in wide.iter().enumerate() {
                            // SAFETY: as below.
                            let outputs = unsafe { out.slice((j + i) * n + g * GROUP, rows) };
                            outputs.copy_from_slice(&group[..rows]);
                        }
                        j += WIDE;
                    }
                }
                for j in j..m {
                    (kernel.one)(self, g, &input, j * blocks, &mut group);
                    // SAFETY: parts cover disjoint groups, so input j's outputs of group g
                    // (inside row j of the (m, n) result) are written by this part alone.
                    let outputs = unsafe { out.slice(j * n + g * GROUP, rows) };
                    outputs.copy_from_slice(&group[..rows]);
                }
            }
        };
        let parts = pool.parts();
        pool.run(&|part| groups_of(part, parts));
        result
    }
}

/// An output written by several threads at once, each to its own ranges (a product's, or
/// attention's in `crate::llama`).
#[derive(Clone, Copy)]
pub(crate) struct Rows(pub(crate) *mut f32);

// SAFETY: the threads sharing it write disjoint ranges (see `QMatrix::matmul_with` and
// `Llama::forward_batch`).
unsafe impl Sync for Rows {}

impl Rows {
    /// `len` values from `at`.
    ///
    /// # Safety
    /// The range lies inside the buffer, and no other thread touches it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// Where a SIMD kernel finds a group's blocks, checked: the records of group `g` and the
/// input's blocks from `first` are in bounds for the unchecked reads the kernels make.
#[cfg(target_arch = "x86_64")]
struct Layout {
    /// Blocks per row.
    blocks: usize,
    /// Bytes per record.
    size: usize,
    /// Bytes of one row's values in a block.
    quant: usize,
    /// Where a record's values start.
    values_at: usize,
}

#[cfg(target_arch = "x86_64")]
impl QMatrix {
    fn layout(&self, g: usize, x: &Input, first: usize) -> Layout {
        let blocks = self.blocks_per_row();
        let size = self.format.record_bytes();
        assert!(
            (g + 1) * blocks * size <= self.records.len()
                && x.q.len() >= (first + blocks) * BLOCK
                && x.scale.len() >= first + blocks
                && x.sum.len() >= first + blocks
        );
        Layout {
            blocks,
            size,
            quant: self.format.quant_bytes(),
            values_at: 2 * GROUP * self.format.halves(),
        }
    }
}

/// An f16, given as its bits, as f32 (exact).
fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
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
                let inverse = 1.0 / scale;
                // Rounded half away from zero (`as` truncates; no libm call).
                input.q.extend(block.iter().map(|v| {
                    let y = v * inverse;
                    (y + 0.5f32.copysign(y)).clamp(-32767.0, 32767.0) as i16
                }));
            } else {
                input.q.extend([0i16; BLOCK]);
            }
        }
        input
    }
}

/// The rows of group `g` times the input whose blocks start at block `first`, written to
/// `out` (padding rows give 0).
type One = fn(&QMatrix, usize, &Input, usize, &mut [f32; GROUP]);

/// Inputs a wide kernel takes at once.
const WIDE: usize = 4;

/// [`One`] for [`WIDE`] inputs at once (each with the bits it gets alone).
type Wide = fn(&QMatrix, usize, &Input, [usize; WIDE], &mut [[f32; GROUP]; WIDE]);

/// A kernel: its one-input form, and a wide form where it has one.
#[derive(Clone, Copy)]
struct Kernel {
    one: One,
    wide: Option<Wide>,
}

impl Kernel {
    const fn one(one: One) -> Self {
        Self { one, wide: None }
    }
}

/// Rows laid out and computed together: they share each load of the input.
const GROUP: usize = 4;

/// The fixed reduction of the 8 lanes.
pub(crate) fn reduce(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

fn row_scalar(w: &QMatrix, r: usize, x: &Input, first: usize) -> f32 {
    let mut acc = [0f32; 8];
    let mut msum = 0f32;
    for b in 0..w.blocks_per_row() {
        let qs = w.block_ints(r, b);
        let xs = &x.q[(first + b) * BLOCK..(first + b + 1) * BLOCK];
        let scale = w.scale(r, b) * x.scale[first + b];
        for (j, a) in acc.iter_mut().enumerate() {
            let lane: i32 = [2 * j, 2 * j + 1, 16 + 2 * j, 17 + 2 * j]
                .iter()
                .map(|&e| i32::from(qs[e]) * i32::from(xs[e]))
                .sum();
            *a = scale.mul_add(lane as f32, *a);
        }
        msum = w.min(r, b).mul_add(x.sum[first + b], msum);
    }
    reduce(acc) + msum
}

fn kernel_scalar(w: &QMatrix, g: usize, x: &Input, first: usize, out: &mut [f32; GROUP]) {
    for (k, o) in out.iter_mut().enumerate() {
        *o = row_scalar(w, g * GROUP + k, x, first);
    }
}

/// The kernels this CPU can run, the fastest first, each with its name; every one computes
/// the same bits (the scalar one is always there).
fn kernels() -> Vec<(&'static str, Kernel)> {
    let mut kernels: Vec<(&'static str, Kernel)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::available() {
            kernels.push((
                "avx512",
                Kernel {
                    one: avx512::group,
                    wide: Some(avx512::wide),
                },
            ));
        }
        if avx2::available() {
            kernels.push(("avx2", Kernel::one(avx2::group)));
        }
    }
    kernels.push(("scalar", Kernel::one(kernel_scalar)));
    kernels
}

/// The kernel matrices are multiplied with: the fastest this CPU runs, chosen once.
fn kernel() -> Kernel {
    chosen().1
}

fn chosen() -> (&'static str, Kernel) {
    static CHOSEN: std::sync::OnceLock<(&'static str, Kernel)> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| kernels()[0])
}

/// The kernel this CPU runs: `avx512`, `avx2` or `scalar` (all with the same results).
/// `MYCEL_NO_SIMD` (any value) makes it the scalar one, `MYCEL_NO_AVX512` at most AVX2.
pub fn kernel_name() -> &'static str {
    chosen().0
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Format, Input, QMatrix, BLOCK, GROUP};

    pub(super) fn available() -> bool {
        std::env::var_os("MYCEL_NO_AVX512").is_none()
            && super::avx2::available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
    }

    /// The rows of group `g` times the input's blocks from `first`, two rows to a 512-bit
    /// register: lanes 0..8 hold the first row's eight integer lanes and accumulators, lanes
    /// 8..16 the second's, each computed with the very operations of the AVX2 kernel (the
    /// same `madd` sums, one `fma` per lane per block), so each row's bits are the same.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
    fn group_avx512<const Q4: bool>(
        w: &QMatrix,
        g: usize,
        x: &Input,
        first: usize,
        out: &mut [f32; GROUP],
    ) {
        let super::Layout {
            blocks,
            size,
            quant,
            values_at,
        } = w.layout(g, x, first);
        // Two pairs of rows: (0, 1) and (2, 3).
        let mut acc = [_mm512_setzero_ps(); GROUP / 2];
        let mut msum = _mm_setzero_ps();
        let nibble = _mm512_set1_epi16(0x0F);
        // Lane i of a pair takes the scale of row 2p + i / 8.
        let pick = [
            _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
            _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
        ];
        for b in 0..blocks {
            let xb = first + b;
            // SAFETY (every unchecked access below): `layout` checked the bounds of the input's
            // blocks first..first + blocks and the records of group g.
            let (x0, x1, xscale, xsum, record) = unsafe {
                let xp = x.q.as_ptr().add(xb * BLOCK);
                (
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(xp.cast())),
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(xp.add(16).cast())),
                    *x.scale.get_unchecked(xb),
                    *x.sum.get_unchecked(xb),
                    w.records.as_ptr().add((g * blocks + b) * size),
                )
            };
            // The rows' scales times the input's, each rounded once as in `row_scalar`.
            let d = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(record.cast()) });
            let scales = _mm512_castps128_ps512(_mm_mul_ps(d, _mm_set1_ps(xscale)));
            if Q4 {
                // Per row: msum = fma(m, Σx, msum).
                let m = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(record.add(8).cast()) });
                msum = _mm_fmadd_ps(m, _mm_set1_ps(xsum), msum);
            }
            for (p, acc) in acc.iter_mut().enumerate() {
                let qp = unsafe { record.add(values_at + 2 * p * quant) };
                // Each row's elements 0..16 and 16..32 as 16-bit integers, the pair's first
                // row in the low half.
                let (q0, q1) = if Q4 {
                    // Byte j holds element j (low nibble) and element 16 + j (high).
                    let v = _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(qp.cast()) });
                    (_mm512_and_si512(v, nibble), _mm512_srli_epi16(v, 4))
                } else {
                    // SAFETY: the pair's two rows of 32 bytes lie in the record.
                    unsafe { (q8_pair(qp, 0), q8_pair(qp, 16)) }
                };
                let lanes = _mm512_add_epi32(_mm512_madd_epi16(q0, x0), _mm512_madd_epi16(q1, x1));
                let scale = _mm512_permutexvar_ps(pick[p], scales);
                *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(lanes), *acc);
            }
        }
        finish(&acc, msum, out);
    }

    /// A group's outputs from its pairs' accumulators and its rows' minimum terms.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
    fn finish(acc: &[__m512; GROUP / 2], msum: __m128, out: &mut [f32; GROUP]) {
        let mut mins = [0f32; GROUP];
        // SAFETY: `mins` holds four floats; unaligned stores are allowed.
        unsafe { _mm_storeu_ps(mins.as_mut_ptr(), msum) };
        for (p, acc) in acc.iter().enumerate() {
            let rows = [
                _mm512_castps512_ps256(*acc),
                _mm512_extractf32x8_ps(*acc, 1),
            ];
            for (i, row) in rows.into_iter().enumerate() {
                let k = 2 * p + i;
                out[k] = super::avx2::reduce(row) + mins[k];
            }
        }
    }

    /// [`group_avx512`] for [`super::WIDE`] inputs at once, whose blocks start at `firsts`:
    /// each block's weights are unpacked once for all of them, and each input meets them
    /// with the very operations, in the very order, it meets them alone, so its bits are the
    /// same.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
    fn wide_avx512<const Q4: bool>(
        w: &QMatrix,
        g: usize,
        x: &Input,
        firsts: [usize; super::WIDE],
        out: &mut [[f32; GROUP]; super::WIDE],
    ) {
        let super::Layout {
            blocks,
            size,
            quant,
            values_at,
        } = w.layout(g, x, firsts[0]);
        for first in &firsts[1..] {
            w.layout(g, x, *first);
        }
        let mut acc = [[_mm512_setzero_ps(); GROUP / 2]; super::WIDE];
        let mut msum = [_mm_setzero_ps(); super::WIDE];
        let nibble = _mm512_set1_epi16(0x0F);
        let pick = [
            _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
            _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
        ];
        for b in 0..blocks {
            // SAFETY (every unchecked access below): `layout` checked the bounds of every
            // input's blocks and the records of group g.
            let record = unsafe { w.records.as_ptr().add((g * blocks + b) * size) };
            let d = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(record.cast()) });
            let m = match Q4 {
                true => _mm_cvtph_ps(unsafe { _mm_loadl_epi64(record.add(8).cast()) }),
                false => _mm_setzero_ps(),
            };
            let mut q = [(_mm512_setzero_si512(), _mm512_setzero_si512()); GROUP / 2];
            for (p, q) in q.iter_mut().enumerate() {
                let qp = unsafe { record.add(values_at + 2 * p * quant) };
                *q = if Q4 {
                    let v = _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(qp.cast()) });
                    (_mm512_and_si512(v, nibble), _mm512_srli_epi16(v, 4))
                } else {
                    // SAFETY: the pair's two rows of 32 bytes lie in the record.
                    unsafe { (q8_pair(qp, 0), q8_pair(qp, 16)) }
                };
            }
            for (j, first) in firsts.iter().enumerate() {
                let xb = first + b;
                let (x0, x1, xscale, xsum) = unsafe {
                    let xp = x.q.as_ptr().add(xb * BLOCK);
                    (
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(xp.cast())),
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(xp.add(16).cast())),
                        *x.scale.get_unchecked(xb),
                        *x.sum.get_unchecked(xb),
                    )
                };
                let scales = _mm512_castps128_ps512(_mm_mul_ps(d, _mm_set1_ps(xscale)));
                if Q4 {
                    msum[j] = _mm_fmadd_ps(m, _mm_set1_ps(xsum), msum[j]);
                }
                for (p, (q0, q1)) in q.iter().enumerate() {
                    let lanes =
                        _mm512_add_epi32(_mm512_madd_epi16(*q0, x0), _mm512_madd_epi16(*q1, x1));
                    let scale = _mm512_permutexvar_ps(pick[p], scales);
                    acc[j][p] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(lanes), acc[j][p]);
                }
            }
        }
        for ((acc, msum), out) in acc.iter().zip(&msum).zip(out.iter_mut()) {
            finish(acc, *msum, out);
        }
    }

    pub(super) fn wide(
        w: &QMatrix,
        g: usize,
        x: &Input,
        firsts: [usize; super::WIDE],
        out: &mut [[f32; GROUP]; super::WIDE],
    ) {
        // SAFETY: as for `group`.
        unsafe {
            match w.format {
                Format::Q4_1 => wide_avx512::<true>(w, g, x, firsts, out),
                Format::Q8_0 => wide_avx512::<false>(w, g, x, firsts, out),
            }
        }
    }

    /// Bytes `at..at + 16` of two Q8_0 rows of 32 bytes from `qp`, as 16-bit integers: the
    /// first row's in the low half.
    ///
    /// # Safety
    /// `qp` must point at 64 readable bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn q8_pair(qp: *const u8, at: usize) -> __m512i {
        let (lo, hi) = unsafe {
            (
                _mm_loadu_si128(qp.add(at).cast()),
                _mm_loadu_si128(qp.add(32 + at).cast()),
            )
        };
        _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1))
    }

    pub(super) fn group(w: &QMatrix, g: usize, x: &Input, first: usize, out: &mut [f32; GROUP]) {
        // SAFETY: chosen only when the CPU has AVX-512 F, BW and DQ, AVX2, FMA and F16C
        // (`available`).
        unsafe {
            match w.format {
                Format::Q4_1 => group_avx512::<true>(w, g, x, first, out),
                Format::Q8_0 => group_avx512::<false>(w, g, x, first, out),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Format, Input, QMatrix, BLOCK, GROUP};

    pub(super) fn available() -> bool {
        std::env::var_os("MYCEL_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// The fixed reduction of the 8 lanes (see `super::reduce`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn reduce(acc: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(acc);
        let hi = _mm256_extractf128_ps(acc, 1);
        // [a0+a4, a1+a5, a2+a6, a3+a7]
        let s4 = _mm_add_ps(lo, hi);
        // [(a0+a4)+(a2+a6), (a1+a5)+(a3+a7), ..]
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }

    /// The rows of group `g` times the input's blocks from `first`, the weights' format
    /// fixed at compile time (`Q4`: Q4_1, else Q8_0). Per row, the same integer lanes and the
    /// same floating-point operations in the same order as `super::row_scalar`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn group_avx2<const Q4: bool>(
        w: &QMatrix,
        g: usize,
        x: &Input,
        first: usize,
        out: &mut [f32; GROUP],
    ) {
        let super::Layout {
            blocks,
            size,
            quant,
            values_at,
        } = w.layout(g, x, first);
        let mut acc = [_mm256_setzero_ps(); GROUP];
        let mut msum = _mm_setzero_ps();
        let nibble = _mm256_set1_epi16(0x0F);
        let mut scales = [0f32; GROUP];
        for b in 0..blocks {
            let xb = first + b;
            // SAFETY (every unchecked access below): `layout` checked the bounds of the input's
            // blocks first..first + blocks and the records of group g.
            let (x0, x1, xscale, xsum, record) = unsafe {
                let xp = x.q.as_ptr().add(xb * BLOCK);
                (
                    _mm256_loadu_si256(xp.cast()),
                    _mm256_loadu_si256(xp.add(16).cast()),
                    *x.scale.get_unchecked(xb),
                    *x.sum.get_unchecked(xb),
                    w.records.as_ptr().add((g * blocks + b) * size),
                )
            };
            // The rows' scales times the input's, each rounded once as in `row_scalar`.
            let d = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(record.cast()) });
            // SAFETY: `scales` holds four floats; unaligned stores are allowed.
            unsafe { _mm_storeu_ps(scales.as_mut_ptr(), _mm_mul_ps(d, _mm_set1_ps(xscale))) };
            if Q4 {
                // Per row: msum = fma(m, Σx, msum).
                let m = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(record.add(8).cast()) });
                msum = _mm_fmadd_ps(m, _mm_set1_ps(xsum), msum);
            }
            for k in 0..GROUP {
                let qp = unsafe { record.add(values_at + k * quant) };
                // Elements 0..16 and 16..32 as 16-bit integers.
                let (q0, q1) = if Q4 {
                    // Byte j holds element j (low nibble) and element 16 + j (high).
                    let v = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(qp.cast()) });
                    (_mm256_and_si256(v, nibble), _mm256_srli_epi16(v, 4))
                } else {
                    unsafe {
                        (
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(qp.cast())),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(qp.add(16).cast())),
                        )
                    }
                };
                // Lane j: elements 2j, 2j+1 (first half) plus 16+2j, 17+2j (second half).
                let lanes = _mm256_add_epi32(_mm256_madd_epi16(q0, x0), _mm256_madd_epi16(q1, x1));
                let scale = _mm256_set1_ps(scales[k]);
                acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(lanes), acc[k]);
            }
        }
        let mut mins = [0f32; GROUP];
        // SAFETY: `mins` holds four floats; unaligned stores are allowed.
        unsafe { _mm_storeu_ps(mins.as_mut_ptr(), msum) };
        for k in 0..GROUP {
            out[k] = reduce(acc[k]) + mins[k];
        }
    }

    pub(super) fn group(w: &QMatrix, g: usize, x: &Input, first: usize, out: &mut [f32; GROUP]) {
        // SAFETY: chosen only when the CPU has AVX2, FMA and F16C (`available`).
        unsafe {
            match w.format {
                Format::Q4_1 => group_avx2::<true>(w, g, x, first, out),
                Format::Q8_0 => group_avx2::<false>(w, g, x, first, out),
            }
        }
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
            // 70 rows: full groups of 4 and a partial one.
            // 6 inputs: a wide kernel's 4 at once and 2 alone.
            let (rows, cols, m) = (70, 96, 6);
            let (q, w) = matrix(format, rows, cols);
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let x = random(m * cols, 11);
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            let product = |x: &Tensor, w: &Tensor| -> Vec<f32> {
                x.matmul(&w.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let expected = product(&xt, &dense);
            let magnitude = product(&xt.abs().unwrap(), &dense.abs().unwrap());
            let got = w.matmul_on(&x, m, &mut SpinPool::new(1));
            for ((a, b), size) in got.iter().zip(&expected).zip(&magnitude) {
                // Each input carries 16 bits per block of 32: an error of at most half a step,
                // 1/65534 of the block's largest value, per product.
                assert!(
                    (a - b).abs() <= size / 65534.0 + 1e-5,
                    "{format:?}: {a} vs {b}"
                );
            }
            // Every kernel this CPU runs (AVX-512, AVX2, scalar) gives the very same bits.
            let names: Vec<&str> = kernels().iter().map(|(name, _)| *name).collect();
            eprintln!("{format:?}: kernels {names:?}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for (name, kernel) in kernels() {
                let theirs = w.matmul_with(&x, m, kernel, &mut SpinPool::new(1));
                assert_eq!(bits(&theirs), bits(&got), "{format:?}: {name}");
            }
            // So does the decoder's pool, whatever its size.
            for helpers in [0, 1, 2, 5] {
                let mut pool = SpinPool::new(helpers);
                let theirs = w.matmul_on(&x, m, &mut pool);
                assert_eq!(bits(&theirs), bits(&got), "{format:?}: {helpers} helpers");
            }
            // One input at a time gives the very same bits as several at once, and the
            // scalar kernel the very same bits as the SIMD one.
            for j in 0..m {
                let one = &x[j * cols..(j + 1) * cols];
                let alone = w.matmul_on(one, 1, &mut SpinPool::new(1));
                assert_eq!(alone, got[j * rows..(j + 1) * rows].to_vec(), "{format:?}");
                let input = Input::quantize(one);
                for (r, v) in alone.iter().enumerate() {
                    let reference = row_scalar(&w, r, &input, 0);
                    assert_eq!(v.to_bits(), reference.to_bits(), "{format:?} row {r}");
                }
            }
        }
    }

    /// Replicas on different CPUs must agree bit for bit: on many shapes and inputs (wide
    /// ranges of magnitudes included), every kernel this CPU runs gives the scalar kernel's
    /// bits. (On a CPU with AVX-512 this checks AVX-512, AVX2 and scalar against each other.)
    #[test]
    fn every_kernel_gives_the_same_bits_on_many_shapes() {
        let all = kernels();
        assert_eq!(all.last().map(|(name, _)| *name), Some("scalar"));
        // Where the CPU has what a SIMD kernel needs, it is among those compared (unless
        // turned off on purpose).
        #[cfg(target_arch = "x86_64")]
        {
            let names: Vec<&str> = all.iter().map(|(name, _)| *name).collect();
            let off = |var: &str| std::env::var_os(var).is_some();
            let simd = !off("MYCEL_NO_SIMD")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if simd {
                assert!(names.contains(&"avx2"), "{names:?}");
            }
            if simd
                && !off("MYCEL_NO_AVX512")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
            {
                assert!(names.contains(&"avx512"), "{names:?}");
            }
        }
        for seed in 0..24u64 {
            let format = if seed % 2 == 0 {
                GgmlDType::Q4_1
            } else {
                GgmlDType::Q8_0
            };
            let rows = 1 + (seed as usize * 7) % 37;
            let cols = BLOCK * (1 + (seed as usize * 5) % 9);
            let w = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu)
                .unwrap()
                .affine(1.0 + seed as f64 * 3.0, 0.0)
                .unwrap();
            let w = QMatrix::from_qtensor(&QTensor::quantize(&w, format).unwrap()).unwrap();
            // Up to 9 inputs: wide kernels' groups of inputs and the ones left over.
            let m = 1 + (seed as usize * 5) % 9;
            // Inputs from 1e-6 to 1e4 in size, a few exact zeros.
            let x: Vec<f32> = random(m * cols, seed + 100)
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if i % 29 == 0 {
                        0.0
                    } else {
                        v * 10f32.powi((i % 11) as i32 - 6)
                    }
                })
                .collect();
            let scalar = w.matmul_with(&x, m, Kernel::one(kernel_scalar), &mut SpinPool::new(1));
            for (name, kernel) in &all {
                let theirs = w.matmul_with(&x, m, *kernel, &mut SpinPool::new(1));
                for (a, b) in theirs.iter().zip(&scalar) {
                    assert_eq!(a.to_bits(), b.to_bits(), "{format:?} seed {seed}: {name}");
                }
            }
        }
    }

    #[test]
    fn an_input_of_zeros_or_extremes_stays_exact() {
        let (_, w) = matrix(GgmlDType::Q8_0, 8, 64);
        assert!(w
            .matmul_on(&[0.0; 64], 1, &mut SpinPool::new(1))
            .iter()
            .all(|v| *v == 0.0));
        // Full-scale inputs against full-scale weights: no integer saturates.
        let x: Vec<f32> = (0..64)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let input = Input::quantize(&x);
        let out = w.matmul_on(&x, 1, &mut SpinPool::new(1));
        for (r, v) in out.iter().enumerate() {
            assert_eq!(v.to_bits(), row_scalar(&w, r, &input, 0).to_bits());
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
        let out = stacked.matmul_on(&x, 1, &mut SpinPool::new(1));
        assert_eq!(out[..8], out[8..]);
        assert_eq!(out[..8], a.matmul_on(&x, 1, &mut SpinPool::new(1))[..]);
    }
}
