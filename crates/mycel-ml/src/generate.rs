//! Text generation from llama-family GGUF models, with the tokenizer and chat template read
//! from the file's metadata; greedy or sampled decoding (temperature, top-p, seed), stop
//! strings and a token budget; text is handed out as it is made.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};
use serde::{Deserialize, Serialize};

pub use crate::batch::{BatchLimits, BatchStats};
use crate::batch::{Batcher, Event, Leave, Request, Scored};
use crate::files::{file_id, model_name};
use crate::gguf_tokenizer::{GgufTokenizer, TextDecoder};
use crate::{ContentId, MlError, Result};
use mycel_core::grammar::{Constraint, Grammar, Vocab};
pub use mycel_core::task::Resume;

/// Used when a GGUF file carries no chat template.
pub(crate) const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

pub use mycel_core::task::{ChatMessage, FinishReason, GenerateParams, Logprob, TokenLogprobs};

fn sampling(params: &GenerateParams) -> Sampling {
    match (params.temperature.filter(|t| *t > 0.0), params.top_p) {
        (None, _) => Sampling::ArgMax,
        (Some(temperature), Some(p)) if p < 1.0 => Sampling::TopP { p, temperature },
        (Some(temperature), _) => Sampling::All { temperature },
    }
}

/// What one generation produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The generated text (stop string excluded).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time spent on the prompt, in milliseconds.
    pub prompt_ms: f64,
    /// Time spent waiting for a slot in the model's batch before the prompt, in
    /// milliseconds.
    #[serde(default)]
    pub waited_ms: f64,
    /// Time spent generating, in milliseconds.
    pub decode_ms: f64,
    /// When asked for ([`GenerateParams::logprobs`]), the log-probabilities of the tokens
    /// this generation made (past its resume point), one per token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprobs>,
    /// How many tokens were made, when `tokens` does not list them (an upstream server's
    /// count: see [`Generation::made`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted: Option<usize>,
}

impl Generation {
    /// How many tokens it made: those listed, or the count given instead of a list.
    pub fn made(&self) -> usize {
        self.counted.unwrap_or(self.tokens.len())
    }
}

/// How a GGUF model's matrices are multiplied. Replicas that must agree token for token need
/// the same engine, so the engine is part of what a node announces about a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// Weights dequantised to f32 at load: the arithmetic of the reference implementations
    /// (transformers, llama.cpp on f32), whose greedy tokens it reproduces; 4 bytes per
    /// parameter in memory.
    Exact,
    /// candle's quantised kernels (activations quantised to 8 bits): a quarter of the memory,
    /// but greedy output drifts from the references after some tokens.
    Quantized,
    /// Our own kernels on the GGUF's Q4_1 / Q8_0 blocks with f32 activations (AVX2 when the
    /// CPU has it, the same results without): the fastest decoding, a quarter of the memory;
    /// reproduces the reference's greedy tokens too. A file with other block types runs on
    /// `Exact` instead.
    #[default]
    Q4,
}

impl Engine {
    /// The name used in announcements and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => crate::embed::f32_engine(),
            Self::Q4 => "mycel-q4",
            Self::Quantized => "candle-q",
        }
    }
}

/// Instructions a chat template may run for one prompt (a real template takes a few hundred
/// per message; a request holds at most a few thousand messages).
const TEMPLATE_FUEL: u64 = 5_000_000;

/// Most blocks (layers) a model may have.
const MAX_LAYERS: u64 = 512;
/// Widest embedding a model may have.
const MAX_WIDTH: u64 = 65_536;
/// Most attention heads.
const MAX_HEADS: u64 = 1_024;
/// Widest attention head (and rotary dimension).
const MAX_HEAD_WIDTH: u64 = 1_024;
/// Widest feed-forward layer.
const MAX_FFN_WIDTH: u64 = 4 * MAX_WIDTH;
/// Most experts of a mixture.
const MAX_EXPERTS: u64 = 256;

/// Checks what a GGUF header claims before anything is allocated from it: every tensor's
/// element count must fit in the file (no block type packs more than 8 elements into a byte),
/// and the llama hyper-parameters the engines
/// size their buffers by must be sane (a file is untrusted input: a peer can send any bytes as
/// a model, and a header claiming 4,294,967,295 layers made the loader abort the process).
fn check_header(content: &gguf_file::Content, file_size: u64) -> std::result::Result<(), String> {
    // Tensors may point at the same bytes, so each fitting in the file is not enough: their
    // sizes together must (an engine copies, or dequantises, every one).
    let mut total = 0u64;
    for (name, info) in &content.tensor_infos {
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(*d as u64));
        let block = info.ggml_dtype.block_size() as u64;
        let bytes = elements
            .filter(|n| *n <= file_size.saturating_mul(8) && block > 0)
            .map(|n| n.div_ceil(block) * info.ggml_dtype.type_size() as u64);
        match bytes {
            Some(b) => total = total.saturating_add(b),
            None => {
                return Err(format!(
                "tensor {name:?} claims shape {:?}, more than a file of {file_size} bytes holds",
                info.shape.dims()
            ))
            }
        }
    }
    if total > file_size {
        return Err(format!(
            "the tensors claim {total} bytes together, more than the file's {file_size}: \
             some overlap"
        ));
    }
    let number = |key: &str| -> std::result::Result<Option<u64>, String> {
        use gguf_file::Value;
        Ok(match content.metadata.get(key) {
            None => None,
            Some(Value::U8(v)) => Some(u64::from(*v)),
            Some(Value::U16(v)) => Some(u64::from(*v)),
            Some(Value::U32(v)) => Some(u64::from(*v)),
            Some(Value::U64(v)) => Some(*v),
            Some(Value::I8(v)) => u64::try_from(*v).ok(),
            Some(Value::I16(v)) => u64::try_from(*v).ok(),
            Some(Value::I32(v)) => u64::try_from(*v).ok(),
            Some(Value::I64(v)) => u64::try_from(*v).ok(),
            Some(_) => return Err(format!("{key} is not a number")),
        })
    };
    let within = |key: &str, low: u64, high: u64| -> std::result::Result<Option<u64>, String> {
        match number(key)? {
            Some(v) if v < low || v > high => Err(format!("{key} is {v}, outside {low}..={high}")),
            v => Ok(v),
        }
    };
    // Each block has at least its attention and feed-forward matrices and two norms.
    let tensors = content.tensor_infos.len() as u64;
    if let Some(layers) = within("llama.block_count", 1, MAX_LAYERS)? {
        if layers.saturating_mul(4) > tensors {
            return Err(format!(
                "llama.block_count is {layers}, but the file holds only {tensors} tensors"
            ));
        }
    }
    let width = within("llama.embedding_length", 1, MAX_WIDTH)?;
    let heads = within("llama.attention.head_count", 1, MAX_HEADS)?;
    if let Some(kv) = within("llama.attention.head_count_kv", 1, MAX_HEADS)? {
        if heads.is_some_and(|heads| kv > heads) {
            return Err(format!("{kv} key-value heads for {heads:?} heads"));
        }
    }
    if let (Some(width), Some(heads)) = (width, heads) {
        if width / heads > MAX_HEAD_WIDTH {
            return Err(format!(
                "heads of width {} are wider than {MAX_HEAD_WIDTH}",
                width / heads
            ));
        }
    }
    within("llama.rope.dimension_count", 0, MAX_HEAD_WIDTH)?;
    within("llama.feed_forward_length", 0, MAX_FFN_WIDTH)?;
    let experts = within("llama.expert_count", 0, MAX_EXPERTS)?.unwrap_or(0);
    within("llama.expert_used_count", 0, experts)?;
    Ok(())
}

/// Rewrites a GGUF model with every quantised tensor dequantised to f32 (an in-memory GGUF),
/// so that candle's llama builds plain f32 matrices from it.
pub(crate) fn dequantized(
    content: &gguf_file::Content,
    file: &mut File,
    path: &Path,
) -> Result<std::io::Cursor<Vec<u8>>> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let device = Device::Cpu;
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let tensor = content
            .tensor(file, name, &device)
            .map_err(|e| MlError::model(path, e))?;
        let tensor = match tensor.dtype() {
            GgmlDType::F32 => tensor,
            _ => QTensor::quantize(&tensor.dequantize(&device)?, GgmlDType::F32)?,
        };
        tensors.push((name.clone(), tensor));
    }
    // The writer aligns tensors its own way; the original alignment must not be copied.
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors)?;
    out.set_position(0);
    Ok(out)
}

/// The decoder an engine runs.
enum Decoder {
    /// candle's llama: one generation at a time.
    Candle(Mutex<Box<ModelWeights>>),
    /// Ours, batching every request that runs at once.
    Own(Batcher),
}

/// A loaded generation model.
pub struct Generator {
    model: Decoder,
    tokenizer: GgufTokenizer,
    template: minijinja::Environment<'static>,
    device: Device,
    id: ContentId,
    name: String,
    engine: Engine,
    /// The vocabulary as constrained decoding walks it, made at the first request for a
    /// format.
    vocab: std::sync::OnceLock<Arc<Vocab>>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// Loads a llama-family GGUF file to run on `engine`, batching under the default
    /// [`BatchLimits`].
    pub fn load(path: &Path, engine: Engine) -> Result<Self> {
        Self::load_with(path, engine, BatchLimits::default())
    }

    /// Loads a llama-family GGUF file to run on `engine`; the q4 engine decodes the requests
    /// that run at once together, within `limits`.
    pub fn load_with(path: &Path, engine: Engine, limits: BatchLimits) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| MlError::model(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| MlError::model(path, format!("not a GGUF file: {e}")))?;
        let file_size = file.metadata().map_err(|e| MlError::model(path, e))?.len();
        check_header(&content, file_size).map_err(|e| MlError::model(path, e))?;
        let tokenizer = GgufTokenizer::from_gguf(&content).map_err(|e| MlError::model(path, e))?;
        let device = Device::Cpu;
        let not_llama = |e| MlError::model(path, format!("not a llama-family model: {e}"));
        let (model, engine) = match engine {
            Engine::Q4 => match crate::llama::Llama::from_gguf(&content, &mut file) {
                Ok(model) => (
                    Decoder::Own(
                        Batcher::start(model, limits).map_err(|e| MlError::model(path, e))?,
                    ),
                    Engine::Q4,
                ),
                Err(e) => {
                    tracing::warn!(
                        "{}: the q4 engine cannot run this file ({e}); using the exact engine",
                        path.display()
                    );
                    return Self::load(path, Engine::Exact);
                }
            },
            Engine::Quantized => (
                ModelWeights::from_gguf(content, &mut file, &device)
                    .map(|m| Decoder::Candle(Mutex::new(Box::new(m))))
                    .map_err(not_llama)?,
                engine,
            ),
            Engine::Exact => {
                let mut f32_file = dequantized(&content, &mut file, path)?;
                let f32_content =
                    gguf_file::Content::read(&mut f32_file).map_err(|e| MlError::model(path, e))?;
                let model = ModelWeights::from_gguf(f32_content, &mut f32_file, &device)
                    .map_err(not_llama)?;
                (Decoder::Candle(Mutex::new(Box::new(model))), engine)
            }
        };
        let mut template = minijinja::Environment::new();
        // A template comes with the file, from whoever made it: it runs on bounded fuel, so
        // one that loops fails the request instead of holding the node.
        template.set_fuel(Some(TEMPLATE_FUEL));
        template.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let source = tokenizer
            .chat_template
            .clone()
            .unwrap_or_else(|| CHATML.to_owned());
        template
            .add_template_owned("chat", source)
            .map_err(|e| MlError::model(path, format!("bad chat template: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            template,
            device,
            id: file_id(path)?,
            name: model_name(path),
            engine,
            vocab: std::sync::OnceLock::new(),
        })
    }

    /// Whether the model's chat template reads `tools` (the tool definitions a chat may come
    /// with): a template that never mentions them cannot offer the model any.
    pub fn template_takes_tools(&self) -> bool {
        self.template
            .get_template("chat")
            .is_ok_and(|t| t.undeclared_variables(false).contains("tools"))
    }

    /// The vocabulary for constrained decoding: every token that stands for bytes (control
    /// tokens left out), and the tokens that end a turn.
    fn vocab(&self) -> Arc<Vocab> {
        self.vocab
            .get_or_init(|| {
                let tokenizer = &self.tokenizer;
                let tokens = (0..tokenizer.vocab_size() as u32)
                    .filter(|id| !tokenizer.is_special(*id) && !tokenizer.ends_turn(*id))
                    .map(|id| (id, tokenizer.token_bytes(id)));
                Arc::new(Vocab::new(tokens, tokenizer.turn_ends()))
            })
            .clone()
    }

    /// How many requests it decodes at once (1 on candle's engines), and within what.
    pub fn batch_limits(&self) -> Option<BatchLimits> {
        match &self.model {
            Decoder::Own(batcher) => Some(batcher.limits()),
            Decoder::Candle(_) => None,
        }
    }

    /// What its batch thread has done (`None` on candle's engines).
    pub fn batch_stats(&self) -> Option<BatchStats> {
        match &self.model {
            Decoder::Own(batcher) => Some(batcher.stats()),
            Decoder::Candle(_) => None,
        }
    }

    /// The engine the model runs on.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The model's content id (BLAKE3 of the GGUF file).
    pub fn id(&self) -> ContentId {
        self.id
    }

    /// The model's name (the file's stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// The prompt for `messages` by the model's chat template, ready for the assistant's turn.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String> {
        if messages.is_empty() {
            return Err(MlError::Input("messages is empty".into()));
        }
        let template = self
            .template
            .get_template("chat")
            .map_err(|e| MlError::Run(e.to_string()))?;
        let token = |id: Option<u32>| id.and_then(|i| self.tokenizer.token_text(i));
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => token(self.tokenizer.bos).unwrap_or_default(),
                eos_token => token(Some(self.tokenizer.eos)).unwrap_or_default(),
            })
            .map_err(|e| MlError::Input(format!("the chat template refused the messages: {e}")))
    }

    /// Generates a continuation of `prompt` (raw text: apply [`Generator::chat_prompt`]
    /// first for a chat). `on_text` receives the text as it is made (never part of a stop
    /// string), after every token (empty when the token made no text yet); returning `false`
    /// from it stops generation.
    pub fn generate(
        &self,
        prompt: &str,
        params: &GenerateParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.generate_from(prompt, params, &Resume::default(), |text, _| on_text(text))
    }

    /// Like [`Generator::generate`], but picks up after `resume.tokens` (generated earlier,
    /// perhaps by another node with the same model and engine), handing out text only past
    /// the `resume.text_bytes` already delivered. Greedy and seeded decoding continue exactly
    /// as an uninterrupted run would. `on_text` also receives every token generated so far.
    pub fn generate_from(
        &self,
        prompt: &str,
        params: &GenerateParams,
        resume: &Resume,
        on_text: impl FnMut(&str, &[u32]) -> bool,
    ) -> Result<Generation> {
        self.generate_watching(prompt, params, resume, &Arc::default(), on_text)
    }

    /// Like [`Generator::generate_from`], stopping (with [`MlError::Stopped`]) as soon as
    /// `stop` is set: while it waits for a slot in the model's batch as well as between
    /// tokens.
    pub fn generate_watching(
        &self,
        prompt: &str,
        params: &GenerateParams,
        resume: &Resume,
        stop: &Arc<AtomicBool>,
        mut on_text: impl FnMut(&str, &[u32]) -> bool,
    ) -> Result<Generation> {
        self.generate_scoped(0, prompt, params, resume, stop, |text, tokens, _| {
            on_text(text, tokens)
        })
    }

    /// Like [`Generator::generate_watching`], for the requester `scope`: on our engine, the
    /// keys and values of what was read before are reused only between requests of one scope,
    /// so that nobody learns from how fast its own answers start how another's prompts begin.
    /// `on_text` also receives the log-probabilities of the tokens made so far (past the
    /// resume point), when `params` asks for them.
    pub fn generate_scoped(
        &self,
        scope: u64,
        prompt: &str,
        params: &GenerateParams,
        resume: &Resume,
        stop: &Arc<AtomicBool>,
        mut on_text: impl FnMut(&str, &[u32], &[TokenLogprobs]) -> bool,
    ) -> Result<Generation> {
        params.check().map_err(MlError::Input)?;
        let prompt_ids = self.tokenizer.encode(prompt)?;
        if prompt_ids.is_empty() {
            return Err(MlError::Input("the prompt is empty".into()));
        }
        if prompt_ids.len() >= MAX_SEQ_LEN {
            return Err(MlError::Input(format!(
                "the prompt has {} tokens; {} takes at most {} in all, the answer included",
                prompt_ids.len(),
                self.name,
                MAX_SEQ_LEN
            )));
        }
        // The most positions one request may take: the context, and on our engine what the
        // KV budget holds.
        let room = match &self.model {
            Decoder::Own(batcher) => MAX_SEQ_LEN.min(batcher.positions()),
            Decoder::Candle(_) => MAX_SEQ_LEN,
        };
        let fitted;
        let params = if params.fit_context && prompt_ids.len() + params.max_tokens > room {
            fitted = GenerateParams {
                max_tokens: room.saturating_sub(prompt_ids.len()).max(1),
                ..params.clone()
            };
            &fitted
        } else {
            params
        };
        if prompt_ids.len() + params.max_tokens > MAX_SEQ_LEN {
            return Err(MlError::Input(format!(
                "the prompt has {} tokens and max_tokens is {}; {} takes at most {} in all",
                prompt_ids.len(),
                params.max_tokens,
                self.name,
                MAX_SEQ_LEN
            )));
        }
        let vocab = self.tokenizer.vocab_size() as u32;
        if resume.tokens.len() >= params.max_tokens || resume.tokens.iter().any(|t| *t >= vocab) {
            return Err(MlError::Input(
                "the resume point is past max_tokens or names unknown tokens".into(),
            ));
        }
        // Held to a format: the grammar, past what was generated before.
        let mut constraint = match &params.format {
            Some(shape) => {
                let grammar = Grammar::new(shape).map_err(MlError::Input)?;
                Some(Constraint::new(Arc::new(grammar), self.vocab()))
            }
            None => None,
        };
        if let Some(constraint) = &mut constraint {
            if !resume.tokens.iter().all(|t| constraint.advance(*t)) {
                // Streamed by a worker that failed: another may have been sent other tokens.
                return Err(MlError::Run(
                    "the resume point does not fit the requested format".into(),
                ));
            }
        }
        let started = Instant::now();
        // A resumed generation reads its earlier tokens with the prompt, and draws the
        // sampler's random numbers it drew for them, so what follows is what an uninterrupted
        // run would have made.
        let mut tokens: Vec<u32> = resume.tokens.clone();
        let context: Vec<u32> = prompt_ids.iter().chain(&tokens).copied().collect();
        let mut source = match &self.model {
            Decoder::Own(batcher) => {
                let (events, incoming) = std::sync::mpsc::channel();
                let gone = Arc::new(AtomicBool::new(false));
                batcher.submit(Request {
                    context,
                    replay: tokens.len(),
                    seed: params.seed,
                    sampling: sampling(params),
                    logprobs: params.logprobs,
                    constraint,
                    max_new: params.max_tokens - tokens.len(),
                    ends: self.tokenizer.turn_ends(),
                    events,
                    leave: Leave {
                        gone: gone.clone(),
                        stop: stop.clone(),
                    },
                    scope,
                })?;
                Tokens::Batched {
                    incoming,
                    _gone: Gone(gone),
                    stop: stop.clone(),
                }
            }
            Decoder::Candle(model) => {
                let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling(params));
                let mut model = model.lock().map_err(|_| {
                    MlError::Run("the model is poisoned by an earlier panic".into())
                })?;
                model.clear_kv_cache();
                let input = Tensor::new(context.as_slice(), &self.device)?.unsqueeze(0)?;
                let logits = model.forward(&input, 0)?.squeeze(0)?;
                if !tokens.is_empty() {
                    let one = Tensor::new(&[0f32], &self.device)?;
                    for _ in &tokens {
                        sampler.sample(&one)?;
                    }
                }
                Tokens::Alone {
                    model,
                    sampler: Box::new(sampler),
                    logits,
                    last: None,
                    pos: context.len(),
                    constraint: constraint.map(Box::new),
                }
            }
        };
        let mut waited_ms = 0.0;
        if let Tokens::Batched { incoming, stop, .. } = &source {
            // Our turn in the batch.
            match receive(incoming, stop)? {
                Event::Admitted => waited_ms = started.elapsed().as_secs_f64() * 1e3,
                Event::Token(..) | Event::Failed(_) => {
                    return Err(MlError::Run("the batch skipped a request's turn".into()))
                }
            }
        }
        // The first token: the prompt has been read.
        let top = params.logprobs;
        let mut next = source.next(&self.device, top)?;
        let prompt_ms = started.elapsed().as_secs_f64() * 1e3 - waited_ms;

        let decode_started = Instant::now();
        let mut stream = TextStream::new(&params.stop);
        let mut decoder = TextDecoder::default();
        for token in &tokens {
            decoder.push(&self.tokenizer, *token);
        }
        let resumed_text = decoder.text();
        let mut delivered = (resume.text_bytes as usize).min(resumed_text.len());
        while !resumed_text.is_char_boundary(delivered) {
            delivered -= 1;
        }
        stream.emitted = delivered;
        drop(resumed_text);
        let mut finish_reason = FinishReason::Length;
        let mut logprobs = Vec::new();
        while tokens.len() < params.max_tokens {
            let (token, scored) = next;
            if self.tokenizer.ends_turn(token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            tokens.push(token);
            if let Some(scored) = scored {
                logprobs.push(self.spell(scored));
            }
            decoder.push(&self.tokenizer, token);
            let text = decoder.text();
            let (fresh, stopped) = stream.advance(&text);
            // Asked after every token, with empty text when the token made none yet (part of
            // a character, or of a possible stop string): the caller may stop at any token.
            if !on_text(fresh, &tokens, &logprobs) {
                finish_reason = FinishReason::Stop;
                break;
            }
            if stopped {
                finish_reason = FinishReason::Stop;
                break;
            }
            if tokens.len() == params.max_tokens {
                break;
            }
            next = source.next(&self.device, top)?;
        }
        drop(source);
        let text = decoder.text();
        let (rest, _) = stream.finish(&text);
        if !rest.is_empty() {
            on_text(rest, &tokens, &logprobs);
        }
        Ok(Generation {
            text: stream.emitted_text(&text).to_owned(),
            tokens,
            prompt_tokens: prompt_ids.len(),
            finish_reason,
            prompt_ms,
            waited_ms,
            decode_ms: decode_started.elapsed().as_secs_f64() * 1e3,
            logprobs,
            counted: None,
        })
    }

    /// `scored` with each token's bytes, as a requester without the model needs them.
    fn spell(&self, scored: Scored) -> TokenLogprobs {
        let logprob = |token: u32, logprob: f32| Logprob {
            token,
            bytes: self.tokenizer.token_bytes(token),
            logprob,
        };
        TokenLogprobs {
            chosen: logprob(scored.token, scored.logprob),
            top: scored.top.into_iter().map(|(t, l)| logprob(t, l)).collect(),
        }
    }
}

/// Where a generation's tokens come from.
enum Tokens<'a> {
    /// The batch thread (ours).
    Batched {
        incoming: std::sync::mpsc::Receiver<Event>,
        /// Tells the batch this caller has stopped listening, once dropped.
        _gone: Gone,
        /// The caller's own stop.
        stop: Arc<AtomicBool>,
    },
    /// candle's model, held for this generation alone.
    Alone {
        model: std::sync::MutexGuard<'a, Box<ModelWeights>>,
        sampler: Box<LogitsProcessor>,
        /// The logits the next token is drawn from, once `last` is read.
        logits: Tensor,
        /// The token drawn last, not read yet.
        last: Option<u32>,
        /// Where it goes.
        pos: usize,
        /// The grammar the answer is held to.
        constraint: Option<Box<Constraint>>,
    },
}

impl Tokens<'_> {
    /// The next token, with its log-probabilities and `top` alternatives when asked for:
    /// each call after the first reads the token before it.
    fn next(&mut self, device: &Device, top: Option<u8>) -> Result<(u32, Option<Scored>)> {
        match self {
            Self::Batched { incoming, stop, .. } => match receive(incoming, stop)? {
                Event::Token(token, scored) => Ok((token, scored)),
                Event::Failed(e) => Err(MlError::Run(e)),
                Event::Admitted => Err(MlError::Run("the batch admitted a request twice".into())),
            },
            Self::Alone {
                model,
                sampler,
                logits,
                last,
                pos,
                constraint,
            } => {
                if let Some(token) = last.take() {
                    let input = Tensor::new(&[token], device)?.unsqueeze(0)?;
                    *logits = model.forward(&input, *pos)?.squeeze(0)?;
                    *pos += 1;
                }
                let token = match constraint {
                    Some(constraint) => {
                        let mut kept: Vec<f32> =
                            logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                        if !constraint.mask(&mut kept) {
                            return Err(MlError::Run(crate::batch::NO_CONTINUATION.into()));
                        }
                        let n = kept.len();
                        let token = sampler.sample(&Tensor::from_vec(kept, n, device)?)?;
                        if !constraint.advance(token) {
                            return Err(MlError::Run(crate::batch::NO_CONTINUATION.into()));
                        }
                        token
                    }
                    None => sampler.sample(logits)?,
                };
                *last = Some(token);
                let scored = match top {
                    Some(top) => {
                        let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                        Some(Scored::of(&logits, token, usize::from(top)))
                    }
                    None => None,
                };
                Ok((token, scored))
            }
        }
    }
}

/// Tells the batch thread, when dropped, that nobody listens any more.
struct Gone(Arc<AtomicBool>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The batch's next event for a request, or [`MlError::Stopped`] once `stop` is set.
fn receive(incoming: &std::sync::mpsc::Receiver<Event>, stop: &AtomicBool) -> Result<Event> {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match incoming.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(event) => return Ok(event),
            Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => {}
            _ if stop.load(Ordering::Relaxed) => return Err(MlError::Stopped),
            Err(_) => {
                return Err(MlError::Run(
                    "the model's batch thread failed (see the node's log); reload the model".into(),
                ))
            }
        }
    }
}

/// Hands out generated text as it grows, holding back what might still become a stop string
/// or is an incomplete UTF-8 sequence.
struct TextStream<'a> {
    stop: &'a [String],
    emitted: usize,
    /// Where a stop string began, once one has.
    end: Option<usize>,
}

impl<'a> TextStream<'a> {
    fn new(stop: &'a [String]) -> Self {
        Self {
            stop,
            emitted: 0,
            end: None,
        }
    }

    /// The new text that is safe to hand out, and whether a stop string has appeared.
    fn advance<'t>(&mut self, text: &'t str) -> (&'t str, bool) {
        if let Some(at) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            self.end = Some(at);
            let start = self.emitted.min(at);
            self.emitted = at;
            return (&text[start..at], true);
        }
        let mut safe = text.len();
        if text.ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        // Hold back the longest tail that is the beginning of a stop string.
        let end = safe;
        for stop in self.stop {
            for len in (1..stop.len()).rev() {
                if stop.is_char_boundary(len) && text[..end].ends_with(&stop[..len]) {
                    safe = safe.min(end - len);
                    break;
                }
            }
        }
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe <= self.emitted {
            return ("", false);
        }
        let fresh = &text[self.emitted..safe];
        self.emitted = safe;
        (fresh, false)
    }

    /// What is left to hand out once generation ended.
    fn finish<'t>(&mut self, text: &'t str) -> (&'t str, bool) {
        let end = self.end.unwrap_or(text.len());
        let start = self.emitted.min(end);
        self.emitted = end;
        (&text[start..end], self.end.is_some())
    }

    fn emitted_text<'t>(&self, text: &'t str) -> &'t str {
        &text[..self.end.unwrap_or(text.len()).min(text.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_holds_back_possible_stop_strings_and_cuts_at_one() {
        let stop = vec!["END".to_owned()];
        let mut stream = TextStream::new(&stop);
        assert_eq!(stream.advance("Hello"), ("Hello", false));
        assert_eq!(stream.advance("Hello E"), (" ", false), "E may begin END");
        assert_eq!(stream.advance("Hello EN"), ("", false));
        assert_eq!(stream.advance("Hello ENd"), ("ENd", false));
        assert_eq!(stream.advance("Hello ENd END more"), (" ", true));
        assert_eq!(stream.finish("Hello ENd END more"), ("", true));
        assert_eq!(stream.emitted_text("Hello ENd END more"), "Hello ENd ");
    }

    #[test]
    fn stream_holds_back_the_longest_possible_stop_string() {
        let stop = vec!["Human:".to_owned(), "\n\nHuman:".to_owned()];
        let mut stream = TextStream::new(&stop);
        assert_eq!(stream.advance("ok"), ("ok", false));
        assert_eq!(
            stream.advance("ok\n\nH"),
            ("", false),
            "all of \\n\\nH may begin a stop"
        );
        assert_eq!(stream.advance("ok\n\nHuman:"), ("", true));
        assert_eq!(stream.emitted_text("ok\n\nHuman:"), "ok");
    }

    #[test]
    fn stream_waits_for_whole_characters_and_flushes_at_the_end() {
        let mut stream = TextStream::new(&[]);
        assert_eq!(stream.advance("a\u{FFFD}"), ("a", false));
        assert_eq!(stream.advance("aé"), ("é", false));
        let mut stream = TextStream::new(&[]);
        assert_eq!(stream.advance("x\u{FFFD}"), ("x", false));
        assert_eq!(stream.finish("x\u{FFFD}"), ("\u{FFFD}", false));
    }
}
