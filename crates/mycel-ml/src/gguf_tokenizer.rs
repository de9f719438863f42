//! A byte-level BPE tokenizer built from a GGUF file's metadata.
//!
//! candle's own `TokenizerFromGguf` does not know the `smollm` pre-tokenizer and falls back to
//! a byte-level one that adds a prefix space, which gives SmolLM2 the wrong tokens ("Hello"
//! becomes "ĠHello"; candle 0.11.1 matched llama.cpp on 1 of 8 test strings). Here the
//! pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp does, and control tokens are matched
//! before BPE.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::{MlError, Result};

/// GGUF token types of tokens matched whole, before BPE: control (3) and user-defined (4).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The tokenizer of a GGUF model and its special tokens.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The tokenizer proper.
    pub tokenizer: Tokenizer,
    /// Token that ends a text (generation stops there).
    pub eos: u32,
    /// Token that ends a turn, where the model has one apart from `eos`.
    pub eot: Option<u32>,
    /// Token that begins a text, if the model uses one.
    pub bos: Option<u32>,
    /// Whether a prompt starts with the BOS token.
    pub add_bos: bool,
    /// The Jinja chat template, if the file has one.
    pub chat_template: Option<String>,
    /// Control and user-defined tokens, matched whole: their text is what they stand for.
    specials: std::collections::HashSet<u32>,
}

fn get<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| MlError::Run(format!("the GGUF metadata has no {key}")))
}

fn strings(value: &Value, key: &str) -> Result<Vec<String>> {
    value
        .to_vec()
        .map_err(|e| MlError::Run(format!("{key}: {e}")))?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| MlError::Run(format!("{key}: {e}")))
        })
        .collect()
}

impl GgufTokenizer {
    /// Builds the tokenizer described by `content`'s metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let model = get(content, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| MlError::Run(e.to_string()))?;
        if model != "gpt2" {
            return Err(MlError::Run(format!(
                "tokenizer model {model:?} is not supported (byte-level BPE, \"gpt2\", is)"
            )));
        }
        let pre = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".into());
        let tokens = strings(get(content, "tokenizer.ggml.tokens")?, "tokens")?;
        let merges = strings(get(content, "tokenizer.ggml.merges")?, "merges")?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| MlError::Run(e.to_string()))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };

        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| MlError::Run(format!("cannot build the BPE model: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            // llama.cpp's `smollm`: digits one by one, then the GPT-2 regex.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt2" | "default" => byte_level.into(),
            other => {
                return Err(MlError::Run(format!(
                    "pre-tokenizer {other:?} is not supported (smollm and gpt2 are)"
                )))
            }
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special = |t: &i32| *t == CONTROL || *t == USER_DEFINED;
        let special_ids = types
            .iter()
            .enumerate()
            .filter(|(_, t)| special(t))
            .map(|(id, _)| id as u32)
            .collect();
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, t)| special(t))
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| MlError::Run(format!("cannot add the control tokens: {e}")))?;

        let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let eos = id("tokenizer.ggml.eos_token_id")
            .ok_or_else(|| MlError::Run("the GGUF metadata names no EOS token".into()))?;
        let add_bos = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Self {
            tokenizer,
            eos,
            eot: id("tokenizer.ggml.eot_token_id").filter(|t| *t != eos),
            bos: id("tokenizer.ggml.bos_token_id"),
            add_bos,
            chat_template,
            specials: special_ids,
        })
    }

    /// Whether `id` is a control or user-defined token (matched whole, never made by BPE).
    pub fn is_special(&self, id: u32) -> bool {
        self.specials.contains(&id)
    }

    /// Whether generation stops at `token` (end of text or of the turn).
    pub fn ends_turn(&self, token: u32) -> bool {
        token == self.eos || Some(token) == self.eot
    }

    /// The tokens [`GgufTokenizer::ends_turn`] is true of.
    pub fn turn_ends(&self) -> Vec<u32> {
        std::iter::once(self.eos).chain(self.eot).collect()
    }

    /// Token ids of `text`, control tokens included as themselves.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| MlError::Input(format!("cannot tokenize the prompt: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            // A chat template that writes `{{ bos_token }}` itself gets no second one.
            if encoding.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| MlError::Run(format!("cannot decode tokens: {e}")))
    }

    /// Number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The bytes a token id stands for: a byte-level BPE token's characters mapped back to
    /// the bytes they encode (GPT-2's table), a control token's text as it is; empty for an
    /// unknown id.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        if self.is_special(id) {
            return text.into_bytes();
        }
        // As the byte-level decoder does: a token with a character outside the table stands
        // for its text as it is.
        text.chars()
            .map(byte_of)
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| text.into_bytes())
    }

    /// The text of a token id, if it has one.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// Text of tokens as they come, each token decoded once: what [`GgufTokenizer::decode`] makes
/// of all of them (control tokens left out, bytes that are no UTF-8 as U+FFFD), without
/// decoding the whole answer again at each token.
#[derive(Debug, Default, Clone)]
pub struct TextDecoder {
    /// The text of the whole characters so far.
    text: String,
    /// The bytes of a character begun and not yet ended.
    pending: Vec<u8>,
}

impl TextDecoder {
    /// Adds `token`'s bytes.
    pub fn push(&mut self, tokenizer: &GgufTokenizer, token: u32) {
        if !tokenizer.is_special(token) {
            self.push_bytes(&tokenizer.token_bytes(token));
        }
    }

    /// Adds `bytes` (a token's, or any piece of a byte stream).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        loop {
            let (valid, bad) = match std::str::from_utf8(&self.pending) {
                Ok(_) => (self.pending.len(), None),
                Err(e) => (e.valid_up_to(), e.error_len()),
            };
            self.text
                .push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
            match bad {
                Some(bad) => {
                    self.text.push(char::REPLACEMENT_CHARACTER);
                    self.pending.drain(..valid + bad);
                }
                None => {
                    self.pending.drain(..valid);
                    return;
                }
            }
        }
    }

    /// The text of the whole characters so far (a byte that begins none as U+FFFD).
    pub fn whole(&self) -> &str {
        &self.text
    }

    /// The text so far; a character not yet ended shows as U+FFFD, as decoding shows it.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self.pending.is_empty() {
            true => std::borrow::Cow::Borrowed(&self.text),
            false => std::borrow::Cow::Owned(format!("{}\u{FFFD}", self.text)),
        }
    }
}

/// The byte a character of a byte-level BPE token stands for (GPT-2's table): printable
/// bytes are themselves; the others (0–32, 127–160, 173) are U+0100 onwards, in order.
fn byte_of(c: char) -> Option<u8> {
    const fn printable(b: u8) -> bool {
        matches!(b, 33..=126 | 161..=172 | 174..=255)
    }
    /// The bytes that are not printable, in order: U+0100 + i stands for `OTHERS[i]`.
    const OTHERS: [u8; 68] = {
        let mut others = [0u8; 68];
        let (mut b, mut n) = (0usize, 0usize);
        while b < 256 {
            if !printable(b as u8) {
                others[n] = b as u8;
                n += 1;
            }
            b += 1;
        }
        others
    };
    match c as u32 {
        code @ 0..=255 if printable(code as u8) => Some(code as u8),
        code @ 256..=323 => Some(OTHERS[(code - 256) as usize]),
        _ => None,
    }
}
