//! A llama-family decoder whose matrices run on our own quantised kernels ([`crate::qmatmul`]):
//! the `mycel-q4` engine. Everything else (embedding lookup, RMS norms, rotary embeddings,
//! attention with a KV cache, SwiGLU) is candle tensors.
//!
//! The query, key and value projections are stacked into one matrix, and so are the gate and
//! up projections, so each block reads its input twice instead of five times. Rotary
//! embeddings are the interleaved kind that GGUF llama weights are converted for.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_nn::ops::{rms_norm, silu, softmax_last_dim};
use candle_nn::rotary_emb::rope_i;

use crate::qmatmul::{QLinear, QMatrix};

/// Longest sequence the rotary tables cover.
pub(crate) const MAX_SEQ_LEN: usize = 4096;

struct Block {
    qkv: QLinear,
    out: QLinear,
    gate_up: QLinear,
    down: QLinear,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    ffn: usize,
    cache: Option<(Tensor, Tensor)>,
}

/// The model and its KV cache.
pub(crate) struct Llama {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    output: QLinear,
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
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

impl Llama {
    /// Reads the weights of a llama-family GGUF (Q4_1 or Q8_0 matrices).
    pub(crate) fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
    ) -> candle_core::Result<Self> {
        let device = Device::Cpu;
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
        let mut tensor = |name: &str| content.tensor(reader, name, &device);
        let matrix = |t: &candle_core::quantized::QTensor| QMatrix::from_qtensor(t);
        let linear = |m: QMatrix| QLinear(Arc::new(m));

        let token_embd = tensor("token_embd.weight")?;
        let embed = token_embd.dequantize(&device)?;
        let output = match tensor("output.weight") {
            Ok(t) => matrix(&t)?,
            // Tied embeddings.
            Err(_) => matrix(&token_embd)?,
        };
        let norm = tensor("output_norm.weight")?.dequantize(&device)?;
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            let p = format!("blk.{i}");
            let mut m = |name: &str| -> candle_core::Result<QMatrix> {
                matrix(&tensor(&format!("{p}.{name}.weight"))?)
            };
            let qkv = QMatrix::stack(&[m("attn_q")?, m("attn_k")?, m("attn_v")?])?;
            let out = m("attn_output")?;
            let gate = m("ffn_gate")?;
            let ffn = gate.rows();
            let gate_up = QMatrix::stack(&[gate, m("ffn_up")?])?;
            let down = m("ffn_down")?;
            blocks.push(Block {
                qkv: linear(qkv),
                out: linear(out),
                gate_up: linear(gate_up),
                down: linear(down),
                attn_norm: tensor(&format!("{p}.attn_norm.weight"))?.dequantize(&device)?,
                ffn_norm: tensor(&format!("{p}.ffn_norm.weight"))?.dequantize(&device)?,
                ffn,
                cache: None,
            });
        }
        let inverse: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let angles: Vec<f32> = (0..MAX_SEQ_LEN)
            .flat_map(|p| inverse.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (MAX_SEQ_LEN, head_dim / 2), &device)?;
        Ok(Self {
            embed,
            blocks,
            norm,
            output: linear(output),
            cos: angles.cos()?,
            sin: angles.sin()?,
            heads,
            kv_heads,
            head_dim,
            eps,
        })
    }

    /// Forgets the KV cache.
    pub(crate) fn clear_kv_cache(&mut self) {
        for block in &mut self.blocks {
            block.cache = None;
        }
    }

    /// Reads tokens `input` (shape (1, n)) at positions `pos..pos+n`; returns the logits after
    /// the last one, shape (1, vocab).
    pub(crate) fn forward(&mut self, input: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let (_, n) = input.dims2()?;
        if pos + n > MAX_SEQ_LEN {
            candle_core::bail!("position {} is past {MAX_SEQ_LEN}", pos + n);
        }
        let ids = input.squeeze(0)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let mask = (n > 1)
            .then(|| {
                let total = pos + n;
                let values: Vec<f32> = (0..n)
                    .flat_map(|i| {
                        (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                    })
                    .collect();
                Tensor::from_vec(values, (n, total), &Device::Cpu)
            })
            .transpose()?;
        let cos = self.cos.narrow(0, pos, n)?;
        let sin = self.sin.narrow(0, pos, n)?;
        let (heads, kv_heads, head_dim, eps) = (self.heads, self.kv_heads, self.head_dim, self.eps);
        let scale = 1.0 / (head_dim as f64).sqrt();
        for block in &mut self.blocks {
            let h = rms_norm(&x, &block.attn_norm, eps)?;
            let qkv = block.qkv.forward(&h)?;
            let split = |from: usize, count: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(1, from * head_dim, count * head_dim)?
                    .reshape((1, n, count, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = rope_i(&split(0, heads)?, &cos, &sin)?;
            let k = rope_i(&split(heads, kv_heads)?, &cos, &sin)?;
            let v = split(heads + kv_heads, kv_heads)?;
            let (k, v) = match &block.cache {
                Some((k_cache, v_cache)) if pos > 0 => (
                    Tensor::cat(&[k_cache, &k], 2)?,
                    Tensor::cat(&[v_cache, &v], 2)?,
                ),
                _ => (k, v),
            };
            block.cache = Some((k.clone(), v.clone()));
            let repeat = heads / kv_heads;
            let k = candle_transformers::utils::repeat_kv(k, repeat)?;
            let v = candle_transformers::utils::repeat_kv(v, repeat)?.contiguous()?;
            let mut att = (q.matmul(&k.t()?)? * scale)?;
            if let Some(mask) = &mask {
                att = att.broadcast_add(mask)?;
            }
            let att = softmax_last_dim(&att)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n, heads * head_dim))?;
            x = (x + block.out.forward(&y)?)?;
            let h = rms_norm(&x, &block.ffn_norm, eps)?;
            let gate_up = block.gate_up.forward(&h)?;
            let act = (silu(&gate_up.narrow(1, 0, block.ffn)?)?
                * gate_up.narrow(1, block.ffn, block.ffn)?)?;
            x = (x + block.down.forward(&act)?)?;
        }
        let last = rms_norm(&x.narrow(0, n - 1, 1)?, &self.norm, eps)?;
        self.output.forward(&last)
    }
}
