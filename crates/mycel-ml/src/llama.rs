//! A llama-family decoder on our own quantised kernels ([`crate::qmatmul`]): the `mycel-q4`
//! engine. The weights come from candle's GGUF reader; the forward pass is plain Rust over
//! f32 slices, because at one token per step the dozens of small tensor ops per block (and the
//! copies of the KV cache that concatenation and head repetition make) cost more than the
//! matrix products themselves.
//!
//! The query, key and value projections are stacked into one matrix, and so are the gate and
//! up projections. Rotary embeddings are the interleaved kind that GGUF llama weights are
//! converted for. The KV cache keeps each block's keys and values, position after position.

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use candle_core::Device;

use crate::pool::SpinPool;
use crate::qmatmul::{self, QMatrix};

// Longest sequence the rotary tables cover: the limit `Generator` enforces for every engine.
use candle_transformers::models::quantized_llama::MAX_SEQ_LEN;

struct Block {
    qkv: QMatrix,
    out: QMatrix,
    gate_up: QMatrix,
    down: QMatrix,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    ffn: usize,
    /// Keys and values of every position so far: `[position][kv_heads × head_dim]`.
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The model and its KV cache.
pub(crate) struct Llama {
    embed: QMatrix,
    output: QMatrix,
    norm: Vec<f32>,
    blocks: Vec<Block>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    dim: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    /// The threads that share every product.
    pool: SpinPool,
}

fn meta_u32(content: &gguf_file::Content, key: &str) -> candle_core::Result<usize> {
    match content.metadata.get(key) {
        Some(v) => Ok(v.to_u32()? as usize),
        None => candle_core::bail!("the GGUF metadata has no {key}"),
    }
}

fn meta_f32(content: &gguf_file::Content, key: &str, default: f32) -> candle_core::Result<f32> {
    content
        .metadata
        .get(key)
        .map_or(Ok(default), |v| v.to_f32())
}

fn matrix<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    name: &str,
) -> candle_core::Result<QMatrix> {
    QMatrix::from_qtensor(&content.tensor(reader, name, &Device::Cpu)?)
}

fn vector<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    name: &str,
) -> candle_core::Result<Vec<f32>> {
    content
        .tensor(reader, name, &Device::Cpu)?
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()
}

/// `a · b` in an order every CPU follows: element `i` into running sum `i mod 8` (a multiply
/// then an add, never fused: eight independent sums the compiler turns into one vector
/// register, or not, with the same bits), the sums reduced as the q4 kernels reduce their
/// lanes, then the elements past the last multiple of 8 in order. (One running sum made every
/// product wait on the last: attention took 5 % of a token's time at a 100-token context.)
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .fold(0f32, |s, (x, y)| s + x * y);
    let mut acc = [0f32; 8];
    for (x, y) in a8.zip(b8) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    qmatmul::reduce(acc) + tail
}

/// `x / rms(x) · weight`, row by row.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(weight.len()) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * scale * w));
    }
    out
}

impl Llama {
    /// Reads the weights of a llama-family GGUF (Q4_1 or Q8_0 matrices).
    pub(crate) fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
    ) -> candle_core::Result<Self> {
        let heads = meta_u32(content, "llama.attention.head_count")?;
        let kv_heads = meta_u32(content, "llama.attention.head_count_kv")?;
        let layers = meta_u32(content, "llama.block_count")?;
        let dim = meta_u32(content, "llama.embedding_length")?;
        let eps = meta_f32(content, "llama.attention.layer_norm_rms_epsilon", 1e-5)?;
        let base = meta_f32(content, "llama.rope.freq_base", 10_000.0)?;
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || dim % heads != 0 {
            candle_core::bail!(
                "{heads} heads, {kv_heads} key-value heads and width {dim} do not fit"
            );
        }
        let head_dim = dim / heads;
        if head_dim % 2 != 0 {
            candle_core::bail!("head width {head_dim} is odd");
        }
        let embed = matrix(content, reader, "token_embd.weight")?;
        // Tied embeddings when there is no output matrix.
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => matrix(content, reader, "output.weight")?,
            false => embed.clone(),
        };
        let norm = vector(content, reader, "output_norm.weight")?;
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            let p = format!("blk.{i}");
            let attn_norm = vector(content, reader, &format!("{p}.attn_norm.weight"))?;
            let ffn_norm = vector(content, reader, &format!("{p}.ffn_norm.weight"))?;
            let mut m = |name: &str| matrix(content, reader, &format!("{p}.{name}.weight"));
            let qkv = QMatrix::stack(&[m("attn_q")?, m("attn_k")?, m("attn_v")?])?;
            let out = m("attn_output")?;
            let gate = m("ffn_gate")?;
            let ffn = gate.rows();
            let gate_up = QMatrix::stack(&[gate, m("ffn_up")?])?;
            let down = m("ffn_down")?;
            if qkv.rows() != (heads + 2 * kv_heads) * head_dim
                || qkv.cols() != dim
                || out.rows() != dim
                || down.rows() != dim
                || attn_norm.len() != dim
                || ffn_norm.len() != dim
            {
                candle_core::bail!("block {i}'s matrices do not fit the model's shape");
            }
            blocks.push(Block {
                qkv,
                out,
                gate_up,
                down,
                attn_norm,
                ffn_norm,
                ffn,
                keys: Vec::new(),
                values: Vec::new(),
            });
        }
        if embed.cols() != dim || output.cols() != dim || norm.len() != dim {
            candle_core::bail!("the embeddings do not fit the model's width");
        }
        let half = head_dim / 2;
        let inverse: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let angles: Vec<f32> = (0..MAX_SEQ_LEN)
            .flat_map(|p| inverse.iter().map(move |f| p as f32 * f))
            .collect();
        Ok(Self {
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            embed,
            output,
            norm,
            blocks,
            dim,
            heads,
            kv_heads,
            head_dim,
            eps,
            pool: SpinPool::for_this_machine(),
        })
    }

    /// Forgets the KV cache.
    pub(crate) fn clear_kv_cache(&mut self) {
        for block in &mut self.blocks {
            block.keys.clear();
            block.values.clear();
        }
    }

    /// Rotates each head of `row` (interleaved pairs) for position `pos`.
    fn rope(&self, row: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for head in row.chunks_exact_mut(self.head_dim) {
            for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[j] - b * sin[j];
                pair[1] = a * sin[j] + b * cos[j];
            }
        }
    }

    /// Reads `tokens` at positions `pos..pos + n`; returns the logits after the last one.
    pub(crate) fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        let n = tokens.len();
        if n == 0 || pos + n > MAX_SEQ_LEN {
            candle_core::bail!("positions {pos}..{} are outside 0..{MAX_SEQ_LEN}", pos + n);
        }
        if tokens.iter().any(|t| *t as usize >= self.embed.rows()) {
            candle_core::bail!("a token id is outside the vocabulary");
        }
        let (dim, heads, kv_heads, head_dim) = (self.dim, self.heads, self.kv_heads, self.head_dim);
        let kv_dim = kv_heads * head_dim;
        let group = heads / kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut x: Vec<f32> = tokens
            .iter()
            .flat_map(|t| self.embed.row(*t as usize))
            .collect();
        for b in 0..self.blocks.len() {
            let block = &self.blocks[b];
            let h = rms_norm(&x, &block.attn_norm, self.eps);
            let mut qkv = block.qkv.matmul_on(&h, n, &mut self.pool);
            let width = (heads + 2 * kv_heads) * head_dim;
            for (i, row) in qkv.chunks_exact_mut(width).enumerate() {
                self.rope(&mut row[..(heads + kv_heads) * head_dim], pos + i);
            }
            let block = &mut self.blocks[b];
            block.keys.truncate(pos * kv_dim);
            block.values.truncate(pos * kv_dim);
            for row in qkv.chunks_exact(width) {
                block
                    .keys
                    .extend_from_slice(&row[heads * head_dim..][..kv_dim]);
                block
                    .values
                    .extend_from_slice(&row[(heads + kv_heads) * head_dim..][..kv_dim]);
            }
            // Attention, causal: position pos + i sees positions 0..=pos + i.
            let mut y = vec![0f32; n * heads * head_dim];
            let mut scores = Vec::with_capacity(pos + n);
            for i in 0..n {
                let seen = pos + i + 1;
                for head in 0..heads {
                    let kv = head / group;
                    let q = &qkv[i * width + head * head_dim..][..head_dim];
                    scores.clear();
                    scores.extend((0..seen).map(|t| {
                        let k = &block.keys[t * kv_dim + kv * head_dim..][..head_dim];
                        dot(q, k) * scale
                    }));
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    let out = &mut y[(i * heads + head) * head_dim..][..head_dim];
                    for (t, w) in scores.iter().enumerate() {
                        let v = &block.values[t * kv_dim + kv * head_dim..][..head_dim];
                        let w = w / total;
                        for (o, v) in out.iter_mut().zip(v) {
                            *o += w * v;
                        }
                    }
                }
            }
            let attended = block.out.matmul_on(&y, n, &mut self.pool);
            x.iter_mut().zip(&attended).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x, &block.ffn_norm, self.eps);
            let gate_up = block.gate_up.matmul_on(&h, n, &mut self.pool);
            let ffn = block.ffn;
            let act: Vec<f32> = gate_up
                .chunks_exact(2 * ffn)
                .flat_map(|row| {
                    let (gate, up) = row.split_at(ffn);
                    gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                })
                .collect();
            let down = block.down.matmul_on(&act, n, &mut self.pool);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let last = rms_norm(&x[(n - 1) * dim..], &self.norm, self.eps);
        Ok(self.output.matmul_on(&last, 1, &mut self.pool))
    }
}
