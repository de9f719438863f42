//! A llama-family decoder on our own quantised kernels ([`crate::qmatmul`]): the `mycel-q4`
//! engine. The weights come from candle's GGUF reader; the forward pass is plain Rust over
//! f32 slices, because at one token per step the dozens of small tensor ops per block (and the
//! copies of the KV cache that concatenation and head repetition make) cost more than the
//! matrix products themselves.
//!
//! The query, key and value projections are stacked into one matrix, and so are the gate and
//! up projections. Rotary embeddings are the interleaved kind that GGUF llama weights are
//! converted for. Each sequence has its own KV cache ([`KvCache`]): each block's keys and
//! values, position after position. Several sequences go through one forward pass together
//! ([`Llama::forward_batch`]): their rows share each read of the weights, and each row's
//! arithmetic is the one it would get alone, so a token's logits are the same bits whether it
//! came alone, with its prompt, or beside other requests' tokens (what verification by
//! replication needs).

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use candle_core::Device;

use crate::pool::SpinPool;
use crate::qmatmul::{self, QMatrix, Rows};

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
}

/// One sequence's keys and values, block by block, each `[position][kv_heads × head_dim]`.
#[derive(Debug, Default)]
pub(crate) struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    /// Positions held.
    pub(crate) fn len(&self, kv_dim: usize) -> usize {
        self.keys.first().map_or(0, |k| k.len() / kv_dim.max(1))
    }

    /// A copy of its first `n` positions (at most those it holds), with room for `room`.
    pub(crate) fn prefix(&self, n: usize, kv_dim: usize, room: usize) -> KvCache {
        let n = n.min(self.len(kv_dim));
        let copy = |blocks: &[Vec<f32>]| -> Vec<Vec<f32>> {
            blocks
                .iter()
                .map(|block| {
                    let mut copy = Vec::with_capacity(room.max(n) * kv_dim);
                    copy.extend_from_slice(&block[..n * kv_dim]);
                    copy
                })
                .collect()
        };
        KvCache {
            keys: copy(&self.keys),
            values: copy(&self.values),
        }
    }

    /// Bytes it has room for.
    pub(crate) fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|block| block.capacity() * std::mem::size_of::<f32>())
            .sum()
    }

    /// `positions` positions of zeros in `blocks` blocks (tests).
    #[cfg(test)]
    pub(crate) fn zeros(blocks: usize, positions: usize, kv_dim: usize) -> KvCache {
        let block = vec![0f32; positions * kv_dim];
        KvCache {
            keys: vec![block.clone(); blocks],
            values: vec![block; blocks],
        }
    }

    /// Gives back the room past the positions it holds.
    pub(crate) fn shrink(&mut self) {
        for block in self.keys.iter_mut().chain(self.values.iter_mut()) {
            block.shrink_to_fit();
        }
    }
}

/// One sequence's part of a batched forward pass: `tokens` read at positions `pos..` into
/// `cache` (which holds at least the `pos` positions before; anything past is forgotten).
pub(crate) struct Step<'a> {
    pub(crate) cache: &'a mut KvCache,
    pub(crate) tokens: &'a [u32],
    pub(crate) pos: usize,
}

/// The model (each sequence brings its own [`KvCache`]).
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
            });
        }
        if embed.cols() != dim || output.cols() != dim || norm.len() != dim {
            candle_core::bail!("the embeddings do not fit the model's width");
        }
        if output.rows() != embed.rows() {
            candle_core::bail!(
                "the output makes {} token ids, the embeddings read {}",
                output.rows(),
                embed.rows()
            );
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

    /// A KV cache with room for `positions` positions.
    pub(crate) fn kv_cache(&self, positions: usize) -> KvCache {
        let room = positions * self.kv_heads * self.head_dim;
        let block = || Vec::with_capacity(room);
        KvCache {
            keys: self.blocks.iter().map(|_| block()).collect(),
            values: self.blocks.iter().map(|_| block()).collect(),
        }
    }

    /// Token ids it reads (and makes: the output has a row per embedding).
    pub(crate) fn vocab(&self) -> usize {
        self.embed.rows()
    }

    /// Keys (and values) per position in one block: a [`KvCache`]'s row.
    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of KV cache one position of one sequence takes.
    pub(crate) fn kv_bytes_per_position(&self) -> usize {
        self.blocks.len() * 2 * self.kv_dim() * std::mem::size_of::<f32>()
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

    /// Reads each step's tokens into its cache, all steps in one pass; returns the logits
    /// after each step's last token, in order.
    pub(crate) fn forward_batch(
        &mut self,
        steps: &mut [Step<'_>],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let (dim, heads, kv_heads, head_dim) = (self.dim, self.heads, self.kv_heads, self.head_dim);
        let kv_dim = kv_heads * head_dim;
        for step in steps.iter_mut() {
            let (n, pos) = (step.tokens.len(), step.pos);
            if n == 0 || pos + n > MAX_SEQ_LEN {
                candle_core::bail!("positions {pos}..{} are outside 0..{MAX_SEQ_LEN}", pos + n);
            }
            if step.tokens.iter().any(|t| *t as usize >= self.embed.rows()) {
                candle_core::bail!("a token id is outside the vocabulary");
            }
            if step.cache.keys.len() != self.blocks.len() {
                step.cache.keys = vec![Vec::new(); self.blocks.len()];
                step.cache.values = vec![Vec::new(); self.blocks.len()];
            }
            if step.cache.len(kv_dim) < pos {
                candle_core::bail!(
                    "position {pos} follows only {} cached positions",
                    step.cache.len(kv_dim)
                );
            }
        }
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let group = heads / kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        // Row `r` of the pass is token `r - starts[s]` of step `s = row_step[r]`.
        let row_step: Vec<usize> = steps
            .iter()
            .enumerate()
            .flat_map(|(k, s)| std::iter::repeat_n(k, s.tokens.len()))
            .collect();
        let mut starts = Vec::with_capacity(steps.len());
        let mut rows = 0;
        for step in steps.iter() {
            starts.push(rows);
            rows += step.tokens.len();
        }
        let mut x: Vec<f32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter())
            .flat_map(|t| self.embed.row(*t as usize))
            .collect();
        let width = (heads + 2 * kv_heads) * head_dim;
        for b in 0..self.blocks.len() {
            let block = &self.blocks[b];
            let h = rms_norm(&x, &block.attn_norm, self.eps);
            let mut qkv = block.qkv.matmul_on(&h, rows, &mut self.pool);
            for (step, start) in steps.iter().zip(&starts) {
                for i in 0..step.tokens.len() {
                    let row = &mut qkv[(start + i) * width..][..(heads + kv_heads) * head_dim];
                    self.rope(row, step.pos + i);
                }
            }
            let block = &self.blocks[b];
            for (step, start) in steps.iter_mut().zip(&starts) {
                let (keys, values) = (&mut step.cache.keys[b], &mut step.cache.values[b]);
                keys.truncate(step.pos * kv_dim);
                values.truncate(step.pos * kv_dim);
                let own = &qkv[start * width..][..step.tokens.len() * width];
                for row in own.chunks_exact(width) {
                    keys.extend_from_slice(&row[heads * head_dim..][..kv_dim]);
                    values.extend_from_slice(&row[(heads + kv_heads) * head_dim..][..kv_dim]);
                }
            }
            // Attention, causal: position pos + i sees positions 0..=pos + i of its sequence.
            // Each (row, head) is one unit, computed alone whichever thread takes it; the
            // units are shared among the pool's threads.
            let mut y = vec![0f32; rows * heads * head_dim];
            let out = Rows(y.as_mut_ptr());
            let seqs: Vec<(&[f32], &[f32], usize, usize)> = steps
                .iter()
                .zip(&starts)
                .map(|(s, start)| (&s.cache.keys[b][..], &s.cache.values[b][..], s.pos, *start))
                .collect();
            let qkv = &qkv;
            let attend = |part: usize, parts: usize| {
                let units = rows * heads;
                let mut scores = Vec::new();
                for unit in units * part / parts..units * (part + 1) / parts {
                    let (row, head) = (unit / heads, unit % heads);
                    let (keys, values, pos, start) = seqs[row_step[row]];
                    let seen = pos + (row - start) + 1;
                    let kv = head / group;
                    let q = &qkv[row * width + head * head_dim..][..head_dim];
                    scores.clear();
                    scores.extend((0..seen).map(|t| {
                        let k = &keys[t * kv_dim + kv * head_dim..][..head_dim];
                        dot(q, k) * scale
                    }));
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    // SAFETY: each unit is taken by one part, and its head's range of its row
                    // lies inside `y`.
                    let out = unsafe { out.slice(unit * head_dim, head_dim) };
                    for (t, w) in scores.iter().enumerate() {
                        let v = &values[t * kv_dim + kv * head_dim..][..head_dim];
                        let w = w / total;
                        for (o, v) in out.iter_mut().zip(v) {
                            *o += w * v;
                        }
                    }
                }
            };
            let parts = self.pool.parts();
            self.pool.run(&|part| attend(part, parts));
            let attended = block.out.matmul_on(&y, rows, &mut self.pool);
            x.iter_mut().zip(&attended).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x, &block.ffn_norm, self.eps);
            let gate_up = block.gate_up.matmul_on(&h, rows, &mut self.pool);
            let ffn = block.ffn;
            let act: Vec<f32> = gate_up
                .chunks_exact(2 * ffn)
                .flat_map(|row| {
                    let (gate, up) = row.split_at(ffn);
                    gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                })
                .collect();
            let down = block.down.matmul_on(&act, rows, &mut self.pool);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let lasts: Vec<f32> = steps
            .iter()
            .zip(&starts)
            .flat_map(|(step, start)| {
                let last = start + step.tokens.len() - 1;
                rms_norm(&x[last * dim..][..dim], &self.norm, self.eps)
            })
            .collect();
        let logits = self.output.matmul_on(&lasts, steps.len(), &mut self.pool);
        Ok(logits
            .chunks_exact(self.output.rows())
            .map(<[f32]>::to_vec)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (tempfile::TempDir, Llama) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::fixtures::write_tiny_llama(&path).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let model = Llama::from_gguf(&content, &mut file).unwrap();
        (dir, model)
    }

    /// Logits after `prompt` read in chunks of `chunk`, then after each of `then`, alone.
    fn alone(model: &mut Llama, prompt: &[u32], chunk: usize, then: &[u32]) -> Vec<Vec<f32>> {
        let mut cache = KvCache::default();
        let mut out = Vec::new();
        let mut pos = 0;
        for part in prompt.chunks(chunk) {
            let mut step = [Step {
                cache: &mut cache,
                tokens: part,
                pos,
            }];
            let logits = model.forward_batch(&mut step).unwrap();
            pos += part.len();
            if pos == prompt.len() {
                out.extend(logits);
            }
        }
        for t in then {
            let mut step = [Step {
                cache: &mut cache,
                tokens: std::slice::from_ref(t),
                pos,
            }];
            out.extend(model.forward_batch(&mut step).unwrap());
            pos += 1;
        }
        out
    }

    fn bits(rows: &[Vec<f32>]) -> Vec<Vec<u32>> {
        rows.iter()
            .map(|r| r.iter().map(|v| v.to_bits()).collect())
            .collect()
    }

    /// A token's logits are the same bits alone, with its whole prompt, in chunks of it, or
    /// in a pass beside another sequence's prompt chunk and decoding: what lets requests
    /// share passes and still agree with replicas that ran them alone.
    #[test]
    fn a_sequence_gets_the_same_bits_alone_chunked_and_batched() {
        let (_dir, mut model) = tiny();
        let a: Vec<u32> = (1..40).map(|i| (i * 7) % 200).collect();
        let b: Vec<u32> = (1..23).map(|i| (i * 13) % 200).collect();
        let (a_next, b_next) = ([5u32, 9, 11], [3u32, 4, 8, 15]);
        let a_alone = alone(&mut model, &a, a.len(), &a_next);
        assert_eq!(bits(&alone(&mut model, &a, 5, &a_next)), bits(&a_alone));
        let b_alone = alone(&mut model, &b, b.len(), &b_next);

        // Together: b's prompt in two chunks while a reads its prompt, then a decodes beside
        // b's second chunk, then both decode.
        let (mut ca, mut cb) = (KvCache::default(), KvCache::default());
        let mut a_got = Vec::new();
        let mut b_got = Vec::new();
        let mut pass = |steps: &mut [Step<'_>]| model.forward_batch(steps).unwrap();
        let out = pass(&mut [
            Step {
                cache: &mut ca,
                tokens: &a,
                pos: 0,
            },
            Step {
                cache: &mut cb,
                tokens: &b[..10],
                pos: 0,
            },
        ]);
        a_got.push(out[0].clone());
        let out = pass(&mut [
            Step {
                cache: &mut cb,
                tokens: &b[10..],
                pos: 10,
            },
            Step {
                cache: &mut ca,
                tokens: &a_next[..1],
                pos: a.len(),
            },
        ]);
        b_got.push(out[0].clone());
        a_got.push(out[1].clone());
        for i in 0..2 {
            let out = pass(&mut [
                Step {
                    cache: &mut ca,
                    tokens: &a_next[i + 1..i + 2],
                    pos: a.len() + i + 1,
                },
                Step {
                    cache: &mut cb,
                    tokens: &b_next[i..i + 1],
                    pos: b.len() + i,
                },
            ]);
            a_got.push(out[0].clone());
            b_got.push(out[1].clone());
        }
        assert_eq!(bits(&a_got), bits(&a_alone));
        assert_eq!(bits(&b_got), bits(&b_alone[..3]));

        // A position past what the cache holds is refused, not read from nothing.
        let mut empty = KvCache::default();
        assert!(model
            .forward_batch(&mut [Step {
                cache: &mut empty,
                tokens: &[1],
                pos: 3,
            }])
            .is_err());
    }
}
