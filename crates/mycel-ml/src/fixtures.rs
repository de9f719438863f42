//! Tiny models with random weights, written the way real ones are (safetensors + config.json +
//! tokenizer.json; GGUF with its tokenizer in the metadata), for tests and demos on machines
//! that hold no real model.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

use crate::{MlError, Result};

fn fail(e: impl std::fmt::Display) -> MlError {
    MlError::Run(format!("cannot write the tiny model: {e}"))
}

/// Writes a 2-layer BERT with hidden size 16 and a word-piece tokenizer that covers any
/// lower-case ASCII text into `dir` (created if needed).
pub fn write_tiny_bert(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .into_iter()
        .map(String::from)
        .collect();
    for word in [
        "the", "cat", "sat", "on", "mat", "dog", "ran", "big", "red", ".",
    ] {
        vocab.push(word.into());
    }
    for letter in 'a'..='z' {
        vocab.push(letter.to_string());
        vocab.push(format!("##{letter}"));
    }
    let config = serde_json::json!({
        "vocab_size": vocab.len(),
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "max_position_embeddings": 24,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "model_type": "bert",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(fail)?;

    let parsed: Config = serde_json::from_value(config).map_err(fail)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    BertModel::load(vb, &parsed).map_err(fail)?;
    varmap.save(dir.join("model.safetensors")).map_err(fail)?;

    let ids: ahash::AHashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let wordpiece = WordPiece::builder()
        .vocab(ids)
        .unk_token("[UNK]".into())
        .build()
        .map_err(fail)?;
    let mut tokenizer = Tokenizer::new(wordpiece);
    tokenizer
        .with_normalizer(Some(BertNormalizer::default()))
        .map_err(fail)?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .map_err(fail)?
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .map_err(fail)?,
    ));
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(fail)?;
    Ok(())
}

/// GPT-2's map from bytes to the printable characters byte-level BPE vocabularies use.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<(u32, char)> = printable
        .iter()
        .map(|&b| (b, char::from_u32(b).unwrap()))
        .collect();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars.push((b, char::from_u32(256 + extra).unwrap()));
            extra += 1;
        }
    }
    printable.clear();
    chars.sort_by_key(|(b, _)| *b);
    chars.into_iter().map(|(_, c)| c).collect()
}

/// The size of a random llama written by [`write_llama`].
#[derive(Debug, Clone, Copy)]
pub struct LlamaShape {
    /// Hidden size (a multiple of 32 for Q4_1 blocks).
    pub dim: usize,
    /// Feed-forward size.
    pub ffn: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Context length in the metadata.
    pub context: u32,
}

impl LlamaShape {
    /// 2 layers, hidden size 64: loads and runs in milliseconds.
    pub const TINY: Self = Self {
        dim: 64,
        ffn: 128,
        layers: 2,
        context: 256,
    };
    /// 8 layers, hidden size 512: a few milliseconds per token, for tests that must catch a
    /// generation mid-way.
    pub const SLOW: Self = Self {
        dim: 512,
        ffn: 1536,
        layers: 8,
        context: 4096,
    };
}

/// Writes a 2-layer llama-architecture GGUF (hidden size 64, Q4_1 matrices as in the
/// reference model) with a byte-level BPE tokenizer, ChatML control tokens and a ChatML chat
/// template in its metadata, to `path`.
pub fn write_tiny_llama(path: &Path) -> Result<()> {
    write_llama(path, LlamaShape::TINY)
}

/// Writes a random llama of `shape` like [`write_tiny_llama`].
pub fn write_llama(path: &Path, shape: LlamaShape) -> Result<()> {
    use gguf_file::Value;
    let LlamaShape {
        dim, ffn, layers, ..
    } = shape;
    let (heads, kv_heads) = (4usize, 2usize);
    let head_dim = dim / heads;

    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"];
    for merge in merges {
        tokens.push(merge.replace(' ', ""));
    }
    let mut types = vec![1i32; tokens.len()];
    for control in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(control.into());
        types.push(3);
    }
    let eos = (tokens.len() - 1) as u32;
    let bos = (tokens.len() - 3) as u32;
    let vocab = tokens.len();

    let device = Device::Cpu;
    // Seeded, so that every run writes the same model (candle's CPU RNG cannot be seeded).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = |shape: (usize, usize)| {
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                // Uniform in [-1, 1).
                (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &device)
    };
    let mut quantized =
        |shape| -> Result<QTensor> { Ok(QTensor::quantize(&random(shape)?, GgmlDType::Q4_1)?) };
    let norm = || -> Result<QTensor> {
        Ok(QTensor::quantize(
            &Tensor::ones(dim, DType::F32, &device)?,
            GgmlDType::F32,
        )?)
    };
    let mut named: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), quantized((vocab, dim))?),
        ("output_norm.weight".into(), norm()?),
    ];
    for layer in 0..layers {
        let p = format!("blk.{layer}");
        named.push((format!("{p}.attn_q.weight"), quantized((dim, dim))?));
        named.push((
            format!("{p}.attn_k.weight"),
            quantized((kv_heads * head_dim, dim))?,
        ));
        named.push((
            format!("{p}.attn_v.weight"),
            quantized((kv_heads * head_dim, dim))?,
        ));
        named.push((format!("{p}.attn_output.weight"), quantized((dim, dim))?));
        named.push((format!("{p}.ffn_gate.weight"), quantized((ffn, dim))?));
        named.push((format!("{p}.ffn_up.weight"), quantized((ffn, dim))?));
        named.push((format!("{p}.ffn_down.weight"), quantized((dim, ffn))?));
        named.push((format!("{p}.attn_norm.weight"), norm()?));
        named.push((format!("{p}.ffn_norm.weight"), norm()?));
    }

    let strings = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny-llama".into())),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads as u32)),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.embedding_length", Value::U32(dim as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.context_length", Value::U32(shape.context)),
        ("llama.rope.dimension_count", Value::U32(head_dim as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            strings(merges.iter().map(|m| m.to_string()).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(bos)),
        ("tokenizer.ggml.eos_token_id", Value::U32(eos)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (
            "tokenizer.chat_template",
            Value::String(crate::generate::CHATML.into()),
        ),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = File::create(path).map_err(fail)?;
    gguf_file::write(&mut file, &metadata, &tensors)?;
    Ok(())
}

/// Rewrites, in place, the chat template of a GGUF written by [`write_tiny_llama`] (or
/// [`write_llama`]) to `template`, padded with spaces to the old one's length, which its
/// length prefix (the 8 bytes before it) keeps saying; `template` must be no longer.
pub fn replace_chat_template(path: &Path, template: &str) -> Result<()> {
    let mut bytes = std::fs::read(path).map_err(fail)?;
    let start = b"{% for message in messages %}";
    let at = bytes
        .windows(start.len())
        .position(|w| w == start)
        .ok_or_else(|| MlError::model(path, "no chat template of ours in the header"))?;
    let len = u64::from_le_bytes(bytes[at - 8..at].try_into().expect("8 bytes")) as usize;
    if template.len() > len {
        return Err(MlError::model(
            path,
            format!(
                "a template of {} bytes does not fit in {len}",
                template.len()
            ),
        ));
    }
    bytes[at..at + len].copy_from_slice(format!("{template:<len$}").as_bytes());
    std::fs::write(path, bytes).map_err(fail)?;
    Ok(())
}

/// Writes a copy of the GGUF at `path` with every matrix dequantised to f32, to `out` (a file
/// no quantised kernel applies to).
pub fn write_f32_copy(path: &Path, out: &Path) -> Result<()> {
    let mut file = File::open(path).map_err(fail)?;
    let content = gguf_file::Content::read(&mut file)?;
    let bytes = crate::generate::dequantized(&content, &mut file, path)?.into_inner();
    std::fs::write(out, bytes).map_err(fail)
}

/// Called by a test that cannot run on this machine (a missing model, Python package or
/// kernel feature). When the environment variable `require` is `1` (CI sets it) the test
/// fails with `why` instead. Otherwise the skip is said on stderr and, because `cargo test`
/// hides a passing test's output, appended as a line to the file `$MYCEL_SKIP_LOG` when that
/// is set (`.ci/run` counts those lines and fails on any).
pub fn skip_unless_required(test: &str, require: &str, why: &str) {
    assert!(
        std::env::var(require).as_deref() != Ok("1"),
        "{test}: {why} ({require}=1 requires it)"
    );
    eprintln!("SKIPPED {test}: {why}");
    if let Some(log) = std::env::var_os("MYCEL_SKIP_LOG") {
        use std::io::Write;
        let line = format!("SKIPPED {test}: {why}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("cannot record the skip in {}: {e}", log.to_string_lossy());
        }
    }
}
