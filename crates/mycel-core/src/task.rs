//! Messages of the inference task protocol.
//!
//! A requester opens a stream to a worker and sends one [`TaskRequest`]: a task id (the same
//! on every attempt, so a retried task is recognisable), the model's content id, a time budget
//! and the input. The worker answers with frames: [`TaskFrame::Chunk`]s of generated text as
//! it is made, then one [`TaskFrame::Done`] carrying the output, its digest signed by the
//! worker and the timings — or one [`TaskFrame::Refused`] saying why not. A generation that
//! dies mid-way is resumed elsewhere from the tokens already delivered ([`Resume`]).
//!
//! Everything here is checked before use: [`TaskRequest::check`] bounds every field a worker
//! allocates or loops over, and [`TaskResult::verify`] ties an output to the peer that signed
//! it.

use serde::{Deserialize, Serialize};

use crate::id::ContentId;
use crate::verify::{input_digest, output_digest, Claim};
use crate::wire::Rejection;
use crate::{Keypair, PeerId, PublicKey};

/// Largest request frame a worker reads.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Largest answer frame a requester reads (embeddings of many inputs are the big ones).
pub const MAX_FRAME_BYTES: usize = 32 << 20;
/// Most inputs in one embedding task.
pub const MAX_EMBED_INPUTS: usize = 2048;
/// Most messages in one chat.
pub const MAX_MESSAGES: usize = 256;
/// The longest a worker lets a peer's task run, whatever budget the task names (a budget
/// is the sender's claim; ten minutes covers the longest generation allowed on a slow CPU).
pub const MAX_TASK_BUDGET_MS: u64 = 10 * 60 * 1000;

/// Most tokens one generation may ask for.
pub const MAX_GENERATE_TOKENS: usize = 32_768;

/// Identifies a task across its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u128);

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`; [`RAW_ROLE`] for a text completion's prompt.
    pub role: String,
    /// What was said.
    pub content: String,
}

/// The role of the one message of a text completion (`/v1/completions`): its content is the
/// prompt as it is, given to the model without its chat template.
pub const RAW_ROLE: &str = "raw";

impl ChatMessage {
    /// A text completion's prompt.
    pub fn raw(prompt: impl Into<String>) -> Self {
        Self {
            role: RAW_ROLE.to_owned(),
            content: prompt.into(),
        }
    }

    /// The prompt of `messages` when they are a text completion's ([`ChatMessage::raw`]).
    pub fn raw_prompt(messages: &[ChatMessage]) -> Option<&str> {
        match messages {
            [only] if only.role == RAW_ROLE => Some(&only.content),
            _ => None,
        }
    }
}

/// How to decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 or absent: greedy (argmax). Above 0: sampled at this temperature.
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to this.
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed gives the same tokens.
    pub seed: u64,
    /// Generation stops before the first of these strings.
    pub stop: Vec<String>,
    /// `max_tokens` is a default, not the caller's: the engine lowers it to what the model's
    /// context leaves after the prompt (at least 1) instead of refusing the task. Absent on the
    /// wire when false, so tasks that do not use it encode as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fit_context: bool,
    /// Log-probabilities of the generated tokens, each with this many of the most likely
    /// tokens at its position (0 to [`MAX_TOP_LOGPROBS`]); absent: none. Absent on the wire
    /// when not asked for, so tasks that do not use it encode as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u8>,
    /// The shape the answer must take (`response_format`): only tokens that keep it a
    /// beginning of such a value may be drawn, and the answer ends once it is whole
    /// ([`crate::grammar`]). Absent on the wire when free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<crate::grammar::Shape>,
}

/// Most alternatives a generated token's log-probability may come with.
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// Longest text of one token that a log-probability may carry, in bytes.
pub const MAX_TOKEN_BYTES: usize = 256;

/// A token and its log-probability under the model (the natural log of its softmax
/// probability at temperature 1, before any sampling setting), with the token's bytes: a
/// requester that does not hold the model cannot spell it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logprob {
    /// The token id.
    pub token: u32,
    /// Its text as bytes (a piece of a UTF-8 character, for some tokens).
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely tokens at its position, most
/// likely first (ties by the smaller id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token generated.
    pub chosen: Logprob,
    /// The most likely tokens there (the chosen one among them when it is one of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<Logprob>,
}

impl TokenLogprobs {
    /// Refuses what no honest worker sends as the log-probabilities of `token` with `top`
    /// alternatives: another token, another number of alternatives, alternatives out of
    /// order, or a log-probability that is not a number at most 0.
    pub fn check(&self, token: u32, top: u8) -> Result<(), String> {
        let valid = |l: &Logprob| {
            l.logprob.is_finite() && l.logprob <= 0.0 && l.bytes.len() <= MAX_TOKEN_BYTES
        };
        if self.chosen.token != token {
            return Err(format!(
                "log-probabilities of token {} for token {token}",
                self.chosen.token
            ));
        }
        // Fewer when the vocabulary has fewer tokens.
        if self.top.len() > usize::from(top) || (top > 0 && self.top.is_empty()) {
            return Err(format!(
                "{} alternatives where {top} were asked for",
                self.top.len()
            ));
        }
        if !valid(&self.chosen) || !self.top.iter().all(valid) {
            return Err("a log-probability is not a number at most 0".into());
        }
        if self.top.windows(2).any(|w| w[0].logprob < w[1].logprob) {
            return Err("the alternatives are not the most likely first".into());
        }
        if self
            .top
            .first()
            .is_some_and(|t| t.logprob < self.chosen.logprob)
        {
            return Err("the chosen token is more likely than the most likely".into());
        }
        for (i, alternative) in self.top.iter().enumerate() {
            if self.top[..i].iter().any(|t| t.token == alternative.token) {
                return Err(format!("token {} is listed twice", alternative.token));
            }
            if alternative.token == token && alternative.logprob != self.chosen.logprob {
                return Err("the chosen token's two log-probabilities differ".into());
            }
        }
        Ok(())
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: None,
            top_p: None,
            seed: 0,
            stop: Vec::new(),
            fit_context: false,
            logprobs: None,
            format: None,
        }
    }
}

impl GenerateParams {
    /// Refuses parameters no generation can run with.
    pub fn check(&self) -> Result<(), String> {
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.max_tokens > MAX_GENERATE_TOKENS {
            return Err(format!(
                "max_tokens must be at most {MAX_GENERATE_TOKENS}, not {}",
                self.max_tokens
            ));
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(format!("temperature must be between 0 and 2, not {t}"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], not {p}"));
            }
        }
        if self.stop.len() > 4 || self.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err("stop takes at most 4 non-empty strings of at most 256 bytes".into());
        }
        if let Some(shape) = &self.format {
            shape.check().map_err(|e| format!("response_format: {e}"))?;
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, not {}",
                self.logprobs.unwrap_or_default()
            ));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn or a stop string came.
    Stop,
    /// `max_tokens` ran out.
    Length,
}

/// Where a generation picks up after its first worker died: the tokens already generated and
/// how many bytes of their text the caller has already received.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// Tokens generated so far.
    pub tokens: Vec<u32>,
    /// Bytes of their text already delivered.
    pub text_bytes: u64,
}

/// What to compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskInput {
    /// Sentence embeddings of `texts`.
    Embed {
        /// The inputs.
        texts: Vec<String>,
    },
    /// A chat completion.
    Generate {
        /// The conversation so far.
        messages: Vec<ChatMessage>,
        /// How to decode.
        params: GenerateParams,
        /// Where to pick up, when an earlier worker died mid-way.
        resume: Resume,
    },
}

/// The one request of a task stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// The task, the same on every attempt.
    pub id: TaskId,
    /// The model to run.
    pub model: ContentId,
    /// How long the requester will wait, from when the worker receives the request.
    pub budget_ms: u64,
    /// What to compute.
    pub input: TaskInput,
}

impl TaskRequest {
    /// Checks the log-probabilities a worker sent with `tokens` (tokens it made for this
    /// task, in order) against what the task asked for: one per token, each of its token
    /// with as many alternatives as asked ([`TokenLogprobs::check`]), or none when the task
    /// asked for none.
    pub fn check_logprobs(&self, tokens: &[u32], logprobs: &[TokenLogprobs]) -> Result<(), String> {
        let asked = match &self.input {
            TaskInput::Generate { params, .. } => params.logprobs,
            TaskInput::Embed { .. } => None,
        };
        let Some(top) = asked else {
            return match logprobs.is_empty() {
                true => Ok(()),
                false => Err("log-probabilities the task did not ask for".into()),
            };
        };
        if logprobs.len() != tokens.len() {
            return Err(format!(
                "{} log-probabilities for {} tokens",
                logprobs.len(),
                tokens.len()
            ));
        }
        tokens
            .iter()
            .zip(logprobs)
            .try_for_each(|(token, logprobs)| logprobs.check(*token, top))
    }

    /// Refuses requests a worker must not run: empty or too many inputs, bad parameters, a
    /// resume point past the token budget.
    pub fn check(&self) -> Result<(), String> {
        if self.budget_ms == 0 {
            return Err("the task has no time left".into());
        }
        match &self.input {
            TaskInput::Embed { texts } => {
                if texts.is_empty() || texts.len() > MAX_EMBED_INPUTS {
                    return Err(format!(
                        "an embedding task takes 1 to {MAX_EMBED_INPUTS} inputs, not {}",
                        texts.len()
                    ));
                }
            }
            TaskInput::Generate {
                messages,
                params,
                resume,
            } => {
                if messages.is_empty() || messages.len() > MAX_MESSAGES {
                    return Err(format!(
                        "a chat takes 1 to {MAX_MESSAGES} messages, not {}",
                        messages.len()
                    ));
                }
                if messages.len() > 1 && messages.iter().any(|m| m.role == RAW_ROLE) {
                    return Err(format!(
                        "a message of role {RAW_ROLE:?} is a text completion's prompt and \
                         comes alone"
                    ));
                }
                params.check()?;
                if resume.tokens.len() >= params.max_tokens {
                    return Err("the resume point is past max_tokens".into());
                }
            }
        }
        Ok(())
    }
}

/// Why a worker did not run a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// Its queue is full.
    #[error("the worker is busy ({queue} requests queued)")]
    Busy {
        /// Its queue length.
        queue: u32,
    },
    /// It does not serve the model.
    #[error("the worker does not serve this model")]
    UnknownModel,
    /// The input cannot be run by this model anywhere (too long, bad parameters).
    #[error("{0}")]
    Invalid(String),
    /// The model failed.
    #[error("the worker failed: {0}")]
    Failed(String),
    /// It cannot run the task now, through no fault of its own (the server it passes a
    /// model's tasks to is down or busy, or cannot take over another's generation).
    #[error("the worker cannot run it now: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// Whether another worker could do better: everything but invalid input.
    pub fn retry_elsewhere(&self) -> bool {
        !matches!(self, Self::Invalid(_))
    }
}

/// What a task produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskOutput {
    /// One vector per input, `dims` little-endian f32 each, back to back.
    Embeddings {
        /// Length of each vector.
        dims: u32,
        /// The vectors' values.
        #[serde(with = "serde_bytes")]
        values: Vec<u8>,
        /// Tokens in all inputs.
        prompt_tokens: u32,
    },
    /// A completion (the whole of it, resumed parts included).
    Generation {
        /// The generated text.
        text: String,
        /// The generated tokens.
        tokens: Vec<u32>,
        /// Tokens in the prompt.
        prompt_tokens: u32,
        /// Why it ended.
        finish_reason: FinishReason,
        /// When the task asked for them ([`GenerateParams::logprobs`]): the log-probabilities
        /// of the tokens this worker generated (those past the task's resume point), one per
        /// token. Absent on the wire when empty, so outputs without them encode (and digest)
        /// as before.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logprobs: Vec<TokenLogprobs>,
        /// How many tokens were made, when `tokens` does not list them (a model served by
        /// an upstream server, which gives no ids: its count). Absent on the wire otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counted: Option<u32>,
    },
}

impl TaskOutput {
    /// Packs embedding vectors (all of one length).
    pub fn embeddings(vectors: &[Vec<f32>], prompt_tokens: usize) -> Self {
        let dims = vectors.first().map_or(0, Vec::len);
        let values = vectors
            .iter()
            .flat_map(|v| v.iter().flat_map(|x| x.to_le_bytes()))
            .collect();
        Self::Embeddings {
            dims: dims as u32,
            values,
            prompt_tokens: prompt_tokens.min(u32::MAX as usize) as u32,
        }
    }

    /// Unpacks embedding vectors, checking there are `count` of them, all finite.
    pub fn vectors(&self, count: usize) -> Result<Vec<Vec<f32>>, String> {
        let Self::Embeddings { dims, values, .. } = self else {
            return Err("the worker returned a completion for an embedding task".into());
        };
        let dims = *dims as usize;
        if dims == 0 || values.len() != count * dims * 4 {
            return Err(format!(
                "the worker returned {} bytes for {count} vectors of {dims} values",
                values.len()
            ));
        }
        let floats: Vec<f32> = values
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if floats.iter().any(|x| !x.is_finite()) {
            return Err("the worker returned non-finite values".into());
        }
        Ok(floats.chunks_exact(dims).map(<[f32]>::to_vec).collect())
    }
}

/// Where a worker's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting for its turn.
    pub queue_ms: f64,
    /// Reading the input (the prompt, or the whole embedding batch).
    pub prefill_ms: f64,
    /// Generating tokens.
    pub decode_ms: f64,
}

/// A task's output with its worker's signature over the [`Claim`] it makes: this task, this
/// model run by this engine, this input, this output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// What was computed.
    pub output: TaskOutput,
    /// The engine (and its numeric version) that computed it.
    pub engine: String,
    /// The worker's public key (protobuf encoding).
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// The worker's signature over the claim ([`Claim::signed_bytes`]).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// Where the worker's time went.
    pub timings: Timings,
}

impl TaskResult {
    /// The claim this result makes as the answer to `request`.
    pub fn claim(&self, request: &TaskRequest) -> Claim {
        Claim::new(
            request.id,
            request.model,
            &self.engine,
            input_digest(&request.input),
            output_digest(&self.output),
        )
    }

    /// Signs `output`, computed by `engine`, as the answer to `request`.
    pub fn sign(
        keypair: &Keypair,
        request: &TaskRequest,
        engine: &str,
        output: TaskOutput,
        timings: Timings,
    ) -> Self {
        let mut result = Self {
            output,
            engine: engine.to_owned(),
            public_key: keypair.public().encode_protobuf(),
            signature: Vec::new(),
            timings,
        };
        result.signature = keypair
            .sign(&result.claim(request).signed_bytes())
            .expect("ed25519 signing does not fail");
        result
    }

    /// Checks that `worker` signed this output as the answer to `request`; returns the claim
    /// it signed.
    pub fn verify(&self, worker: &PeerId, request: &TaskRequest) -> Result<Claim, Rejection> {
        let key =
            PublicKey::try_decode_protobuf(&self.public_key).map_err(|_| Rejection::Malformed)?;
        if key.to_peer_id() != *worker {
            return Err(Rejection::BadSignature);
        }
        if self.engine.len() > crate::verify::MAX_ENGINE_BYTES {
            return Err(Rejection::Malformed);
        }
        let claim = self.claim(request);
        if !key.verify(&claim.signed_bytes(), &self.signature) {
            return Err(Rejection::BadSignature);
        }
        Ok(claim)
    }
}

/// A message from worker to requester.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskFrame {
    /// Generated text as it is made, with the tokens generated since the last chunk.
    Chunk {
        /// New text.
        text: String,
        /// New tokens.
        tokens: Vec<u32>,
        /// Their log-probabilities, one per token, when the task asked for them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        logprobs: Vec<TokenLogprobs>,
    },
    /// The task is done.
    Done(Box<TaskResult>),
    /// The task was not run.
    Refused(Refusal),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    fn model() -> ContentId {
        ContentId::of(b"model")
    }

    #[test]
    fn a_raw_prompt_comes_alone() {
        let with = |messages: Vec<ChatMessage>| {
            let mut request = generate_request(8, 0);
            if let TaskInput::Generate { messages: m, .. } = &mut request.input {
                *m = messages;
            }
            request
        };
        let raw = ChatMessage::raw("once upon");
        assert!(with(vec![raw.clone()]).check().is_ok());
        assert_eq!(
            ChatMessage::raw_prompt(std::slice::from_ref(&raw)),
            Some("once upon")
        );
        let user = ChatMessage {
            role: "user".into(),
            content: "and then".into(),
        };
        let mixed = vec![raw, user];
        assert!(with(mixed.clone()).check().unwrap_err().contains("alone"));
        assert_eq!(ChatMessage::raw_prompt(&mixed), None);
    }

    fn generate_request(max_tokens: usize, resume: usize) -> TaskRequest {
        TaskRequest {
            id: TaskId(7),
            model: model(),
            budget_ms: 1000,
            input: TaskInput::Generate {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                }],
                params: GenerateParams {
                    max_tokens,
                    ..Default::default()
                },
                resume: Resume {
                    tokens: vec![1; resume],
                    text_bytes: 0,
                },
            },
        }
    }

    #[test]
    fn log_probabilities_must_fit_the_tokens_and_what_was_asked() {
        let mut asked = generate_request(10, 0);
        if let TaskInput::Generate { params, .. } = &mut asked.input {
            params.logprobs = Some(2);
        }
        let entry = |token: u32, logprobs: &[f32]| TokenLogprobs {
            chosen: Logprob {
                token,
                bytes: vec![b'a'],
                logprob: logprobs[0],
            },
            top: logprobs[1..]
                .iter()
                .enumerate()
                .map(|(i, l)| Logprob {
                    token: i as u32,
                    bytes: vec![],
                    logprob: *l,
                })
                .collect(),
        };
        let good = [entry(4, &[-0.5, -0.1, -0.7]), entry(9, &[-1.0, -0.2, -0.2])];
        assert_eq!(asked.check_logprobs(&[4, 9], &good), Ok(()));
        for (tokens, logprobs, why) in [
            (vec![4, 9, 1], good.to_vec(), "for 3 tokens"),
            (vec![4, 8], good.to_vec(), "for token 8"),
            (
                vec![4],
                vec![entry(4, &[-0.5, -0.1, -0.2, -0.3])],
                "3 alternatives",
            ),
            (
                vec![4],
                vec![entry(4, &[-0.05, -0.1, -0.2])],
                "more likely than",
            ),
            (vec![4], vec![entry(4, &[-0.5])], "0 alternatives"),
            (vec![0], vec![entry(0, &[-0.5, -0.1, -0.2])], "differ"),
            (vec![4], vec![entry(4, &[0.5, -0.1, -0.2])], "at most 0"),
            (
                vec![4],
                vec![entry(4, &[f32::NAN, -0.1, -0.2])],
                "at most 0",
            ),
            (
                vec![4],
                vec![entry(4, &[-0.5, -0.3, -0.1])],
                "most likely first",
            ),
        ] {
            let refused = asked.check_logprobs(&tokens, &logprobs).unwrap_err();
            assert!(refused.contains(why), "{refused}");
        }
        let mut twice = entry(4, &[-0.5, -0.1, -0.2]);
        twice.top[1].token = 0;
        let refused = asked.check_logprobs(&[4], &[twice]).unwrap_err();
        assert!(refused.contains("twice"), "{refused}");
        let mut long = entry(4, &[-0.5, -0.1, -0.7]);
        long.chosen.bytes = vec![0; MAX_TOKEN_BYTES + 1];
        assert!(asked.check_logprobs(&[4], &[long]).is_err());
        // Not asked for: none may come.
        let plain = generate_request(10, 0);
        assert_eq!(plain.check_logprobs(&[4, 9], &[]), Ok(()));
        assert!(plain.check_logprobs(&[4, 9], &good).is_err());
        // At most 20 alternatives.
        if let TaskInput::Generate { params, .. } = &mut asked.input {
            params.logprobs = Some(MAX_TOP_LOGPROBS + 1);
        }
        assert!(asked.check().unwrap_err().contains("top_logprobs"));
    }

    #[test]
    fn requests_are_bounded() {
        assert!(generate_request(10, 3).check().is_ok());
        assert!(
            generate_request(10, 10).check().is_err(),
            "resume past budget"
        );
        assert!(generate_request(0, 0).check().is_err());
        assert!(generate_request(MAX_GENERATE_TOKENS + 1, 0)
            .check()
            .is_err());
        let mut no_time = generate_request(10, 0);
        no_time.budget_ms = 0;
        assert!(no_time.check().is_err());
        let embed = |n: usize| TaskRequest {
            id: TaskId(1),
            model: model(),
            budget_ms: 1,
            input: TaskInput::Embed {
                texts: vec!["x".into(); n],
            },
        };
        assert!(embed(1).check().is_ok());
        assert!(embed(0).check().is_err());
        assert!(embed(MAX_EMBED_INPUTS + 1).check().is_err());
    }

    #[test]
    fn a_signed_result_verifies_only_for_its_worker_task_and_output() {
        let worker = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let output = TaskOutput::embeddings(&[vec![1.0, 2.0], vec![3.0, 4.0]], 5);
        let request = TaskRequest {
            id: TaskId(9),
            model: model(),
            budget_ms: 1000,
            input: TaskInput::Embed {
                texts: vec!["a".into(), "b".into()],
            },
        };
        let result = TaskResult::sign(&worker, &request, "candle/1", output, Timings::default());
        let peer = worker.public().to_peer_id();
        let claim = result.verify(&peer, &request).expect("verifies");
        assert_eq!(claim.engine, "candle/1");
        assert_eq!(claim.output, output_digest(&result.output));
        assert_eq!(
            result.verify(&other.public().to_peer_id(), &request),
            Err(Rejection::BadSignature),
            "signed by someone else"
        );
        let another_task = TaskRequest {
            id: TaskId(10),
            ..request.clone()
        };
        assert_eq!(
            result.verify(&peer, &another_task),
            Err(Rejection::BadSignature),
            "another task"
        );
        let another_input = TaskRequest {
            input: TaskInput::Embed {
                texts: vec!["a".into(), "c".into()],
            },
            ..request.clone()
        };
        assert_eq!(
            result.verify(&peer, &another_input),
            Err(Rejection::BadSignature),
            "another input"
        );
        let mut other_engine = result.clone();
        other_engine.engine = "candle/2".into();
        assert_eq!(
            other_engine.verify(&peer, &request),
            Err(Rejection::BadSignature),
            "another engine"
        );
        let mut tampered = result.clone();
        if let TaskOutput::Embeddings { values, .. } = &mut tampered.output {
            values[0] ^= 1;
        }
        assert_eq!(
            tampered.verify(&peer, &request),
            Err(Rejection::BadSignature)
        );
        // The frame survives the wire.
        let frame = TaskFrame::Done(Box::new(result));
        let back: TaskFrame = wire::decode(&wire::encode(&frame), MAX_FRAME_BYTES).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn embeddings_unpack_checked() {
        let output = TaskOutput::embeddings(&[vec![0.5, -1.0], vec![2.0, 3.0]], 4);
        assert_eq!(
            output.vectors(2).unwrap(),
            vec![vec![0.5, -1.0], vec![2.0, 3.0]]
        );
        assert!(output.vectors(3).is_err(), "wrong count");
        let nan = TaskOutput::embeddings(&[vec![f32::NAN]], 1);
        assert!(nan.vectors(1).is_err());
    }
}
