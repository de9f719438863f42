//! The OpenAI-compatible API: GET /v1/models, POST /v1/embeddings, POST /v1/chat/completions
//! and POST /v1/completions (plain and server-sent events), with OpenAI's request, response and error shapes, so that
//! any OpenAI client pointed at a node works (its API key is the node's token).
//!
//! Requests go through the node's router (`crate::inference`): they run here when this node is
//! the best place, on a peer otherwise, and move to another node when one fails.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::StreamExt as _;
use mycel_core::statement::{ModelKind, ModelOffer};
use mycel_ml::gguf_tokenizer::TextDecoder;
use mycel_ml::{ChatMessage, FinishReason, GenerateParams, MlError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::ApiState;
use crate::inference::{RouteError, Verification};
use crate::models::{Piece, Runner};
use mycel_core::task::{Logprob, TaskOutput, TokenLogprobs, MAX_TOP_LOGPROBS};
use mycel_core::verify::Mode;

/// Default `max_tokens` when a request names none.
const DEFAULT_MAX_TOKENS: usize = 512;

/// An OpenAI error response.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<Cow<'static, str>>,
    message: String,
}

impl ApiError {
    fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self::invalid_field(param.map(Cow::Borrowed), message)
    }

    /// A 400 naming the field `param` (any name).
    fn invalid_field(param: Option<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param,
            message: message.into(),
        }
    }

    fn unavailable(code: &'static str, message: String) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: Some(code),
            param: None,
            message,
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::UnknownModel(_) => Self {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                code: Some("model_not_found"),
                param: Some("model".into()),
                message: e.to_string(),
            },
            RouteError::AmbiguousModel(_) => Self {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                code: Some("model_ambiguous"),
                param: Some("model".into()),
                message: e.to_string(),
            },
            RouteError::UnboundModel(_) => Self {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                code: Some("model_unbound"),
                param: Some("model".into()),
                message: e.to_string(),
            },
            RouteError::Invalid(message) => Self::invalid(None, message),
            RouteError::Busy => Self::unavailable("overloaded", e.to_string()),
            RouteError::Unavailable(_) => Self::unavailable("unavailable", e.to_string()),
            RouteError::Unverified(_) => Self {
                status: StatusCode::BAD_GATEWAY,
                kind: "verification_error",
                code: Some("unverified"),
                param: None,
                message: e.to_string(),
            },
        }
    }
}

impl From<MlError> for ApiError {
    fn from(e: MlError) -> Self {
        match e {
            MlError::Input(message) => Self::invalid(None, message),
            e => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "server_error",
                code: None,
                param: None,
                message: e.to_string(),
            },
        }
    }
}

impl ApiError {
    /// The error object OpenAI's clients read, in a response or as a stream's event.
    fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, Json(body)).into_response()
    }
}

/// A stream of server-sent events from `events` until it closes.
fn event_stream(events: mpsc::Receiver<Event>) -> Response {
    let events = futures::stream::unfold(events, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("the body is not valid JSON: {inner}")
        } else if path == "." {
            format!("the request does not have the expected fields: {inner}")
        } else {
            format!("{path}: {inner}")
        };
        ApiError::invalid(None, message)
    })
}

/// Mycel's own part of a request body: `{"mycel": {"verify": "replicate", "replicas": 3}}`
/// or `{"mycel": {"verify": "spot_check", "p": 0.1}}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MycelOptions {
    #[serde(default)]
    verify: Option<String>,
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    p: Option<f64>,
}

/// The verification mode a request asks for, or the node's default.
fn mode(state: &ApiState, options: Option<&MycelOptions>) -> Result<Mode, ApiError> {
    let Some(options) = options else {
        return Ok(state.inference.default_mode());
    };
    let Some(verify) = options.verify.as_deref() else {
        if options.replicas.is_some() || options.p.is_some() {
            return Err(ApiError::invalid(
                Some("mycel.verify"),
                "replicas and p go with verify: replicate or spot_check",
            ));
        }
        return Ok(state.inference.default_mode());
    };
    Mode::from_parts(verify, options.replicas, options.p)
        .map_err(|message| ApiError::invalid(Some("mycel.verify"), message))
}

/// The `mycel` object of a response: how the result was checked, with the certificate of a
/// verified one.
fn verification_json(verification: &Verification) -> Value {
    let mut value = json!({
        "verify": verification.mode.name(),
        "verified": verification.certificate.is_some(),
    });
    match verification.mode {
        Mode::Replicate { replicas } => value["replicas"] = json!(replicas),
        Mode::SpotCheck { rate } => value["p"] = json!(rate),
        Mode::None => {}
    }
    if let Some(certificate) = &verification.certificate {
        value["certificate"] = json!(certificate);
    }
    value
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// GET /v1/models: this node's models, then those its peers announce. A model's `id` is
/// what a request may name it by: its name when this node serves it or trusts the name (bound,
/// or announced by a trusted operator's node), else its content id (`mycel.name` is the name
/// announced with it).
pub(crate) async fn list_models(State(state): State<ApiState>) -> Response {
    let entry = |offer: &ModelOffer, local: bool, named: bool| {
        let id = if named {
            offer.name.clone()
        } else {
            offer.id.to_string()
        };
        json!({
            "id": id,
            "object": "model",
            "created": 0,
            "owned_by": "mycel",
            "mycel": { "content_id": offer.id, "name": offer.name, "kind": offer.kind,
                       "engine": offer.engine, "local": local, "peers": 0 },
        })
    };
    let mut models: BTreeMap<String, Value> = BTreeMap::new();
    for served in state.models.models().iter() {
        models.insert(
            served.offer.id.to_string(),
            entry(&served.offer, true, true),
        );
    }
    {
        let peers = state.net.workers_now();
        for peer in peers
            .iter()
            .filter(|p| p.state == mycel_core::membership::PeerState::Alive)
        {
            for offer in peer.capabilities.iter().flat_map(|c| c.models.iter()) {
                let named =
                    state
                        .inference
                        .name_usable(&offer.name, offer.id, peer.operator.as_deref());
                let model = models
                    .entry(offer.id.to_string())
                    .or_insert_with(|| entry(offer, false, named));
                if named {
                    // Another announcer of the id may be trusted where the first was not.
                    model["id"] = json!(offer.name);
                }
                let count = model["mycel"]["peers"].as_u64().unwrap_or(0);
                model["mycel"]["peers"] = json!(count + 1);
            }
        }
    }
    Json(json!({ "object": "list", "data": models.into_values().collect::<Vec<_>>() }))
        .into_response()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    mycel: Option<MycelOptions>,
}

/// POST /v1/embeddings.
pub(crate) async fn embeddings(State(state): State<ApiState>, body: Bytes) -> Response {
    match embed(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn embed(state: ApiState, body: Bytes) -> Result<Response, ApiError> {
    let request: EmbeddingsRequest = parse(&body)?;
    let texts =
        match serde_json::from_value::<EmbeddingInput>(request.input) {
            Ok(EmbeddingInput::One(text)) => vec![text],
            Ok(EmbeddingInput::Many(texts)) => texts,
            Err(_) => return Err(ApiError::invalid(
                Some("input"),
                "input must be a string or an array of strings (token arrays are not supported)",
            )),
        };
    if texts.is_empty() {
        return Err(ApiError::invalid(Some("input"), "input is an empty list"));
    }
    if texts.len() > 2048 {
        return Err(ApiError::invalid(
            Some("input"),
            format!("input has {} items; at most 2048", texts.len()),
        ));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("encoding_format must be float or base64, not {other:?}"),
            ))
        }
    };
    let target = state
        .inference
        .resolve(&request.model, ModelKind::Embedding)
        .await?;
    let name = target.offer.name.clone();
    let wrong_dimensions = |made: usize| {
        ApiError::invalid(
            Some("dimensions"),
            format!("{name} makes vectors of {made} dimensions only"),
        )
    };
    if let (Some(dimensions), Some(Runner::Embed(model))) = (request.dimensions, &target.local) {
        if dimensions != model.dimension() {
            return Err(wrong_dimensions(model.dimension()));
        }
    }
    let (embedded, verification) = match mode(&state, request.mycel.as_ref())? {
        Mode::None => (state.inference.embed(&target, texts).await?, None),
        mode => {
            let (embedded, verification) =
                state.inference.embed_checked(&target, texts, mode).await?;
            (embedded, Some(verification))
        }
    };
    let made = embedded.vectors.first().map_or(0, Vec::len);
    if request.dimensions.is_some_and(|d| d != made) {
        return Err(wrong_dimensions(made));
    }
    let tokens = embedded.prompt_tokens;
    let data: Vec<Value> = embedded
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    let mut body = json!({
        "object": "list",
        "data": data,
        "model": name,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    });
    if let Some(verification) = verification {
        body["mycel"] = verification_json(&verification);
    }
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<MessageIn>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    mycel: Option<MycelOptions>,
    // Parts of the API this node does not implement yet: refused when used, never ignored.
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    /// Every other field: refused by name unless it asks for nothing ([`other_fields`]).
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

/// Fields of OpenAI's requests that change nothing a node does (who the user is, what to
/// store, which tier), accepted and not acted on.
const IGNORED_FIELDS: [&str; 5] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
];

/// Refuses, by name, every field of a request that this node does not act on and that asks
/// for something: a parameter it does not implement (`presence_penalty` of 0.5,
/// `reasoning_effort`, ...) or one it does not know. Fields set to what they default to
/// (null, a zero penalty, no logit bias, text as the only modality) ask for nothing.
fn other_fields(rest: &BTreeMap<String, Value>) -> Result<(), ApiError> {
    for (name, value) in rest {
        let nothing = value.is_null()
            || IGNORED_FIELDS.contains(&name.as_str())
            || match name.as_str() {
                "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
                "logit_bias" => value.as_object().is_some_and(|o| o.is_empty()),
                "modalities" => *value == json!(["text"]),
                _ => false,
            };
        if !nothing {
            return Err(ApiError::invalid_field(
                Some(Cow::Owned(name.clone())),
                format!("{name}: not supported by this node; send the request without it"),
            ));
        }
    }
    Ok(())
}

/// Refuses a request that asks for what this node does not do (tools, structured output,
/// log-probabilities), naming the field: answering as if it had been honoured would mislead.
fn unsupported(request: &ChatRequest) -> Result<(), ApiError> {
    let refuse = |param: &'static str, what: &str| {
        Err(ApiError::invalid(
            Some(param),
            format!(
                "{param}: {what} is not supported by this node yet; send the request without \
                 it"
            ),
        ))
    };
    // (Tools are refused once the model is known: `tools_refused`.)
    if !names_tools(request) && (asks(&request.tool_choice) || asks(&request.function_call)) {
        return refuse("tool_choice", "tool and function calling");
    }
    Ok(())
}

/// Whether a chat names tools (`tools`, or the older `functions`).
fn names_tools(request: &ChatRequest) -> bool {
    asks(&request.tools) || asks(&request.functions)
}

/// Whether a field asks for something: set, and not null, an empty list or "none".
fn asks(field: &Option<Value>) -> bool {
    match field {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => s != "none",
        Some(_) => true,
    }
}

/// The refusal of a chat that names tools, saying why for the model when this node serves
/// it (`served`; looked up here, never fetched): a chat template that never reads `tools`
/// cannot offer the model any.
fn tools_refused(served: Option<&crate::models::Served>) -> ApiError {
    let message = match served.map(|s| (&s.runner, &s.offer.name)) {
        Some((Runner::Generate(model), name)) if !model.template_takes_tools() => format!(
            "tools: the chat template of {name} has no tool support (it never reads `tools`), \
             so the model cannot be offered tools; send the request without them"
        ),
        Some((Runner::Upstream(_), name)) => format!(
            "tools: {name} is served by an upstream server, and tools are not passed on to it \
             yet; send the request without them"
        ),
        Some((Runner::Generate(_), name)) => format!(
            "tools: tool calling through the chat template of {name} is not supported by this \
             node yet; send the request without them"
        ),
        _ => "tools: tool and function calling is not supported by this node yet; send the \
              request without it"
            .to_owned(),
    };
    ApiError::invalid(Some("tools"), message)
}

/// The log-probabilities a chat asks for: `Some(k)` with `k` alternatives per token when
/// `logprobs` is true (`top_logprobs`, 0 to 20, needs it, as in OpenAI's API).
fn chat_logprobs(request: &ChatRequest) -> Result<Option<u8>, ApiError> {
    let top = match request.top_logprobs {
        None => 0,
        Some(n) if n <= u32::from(MAX_TOP_LOGPROBS) => n as u8,
        Some(n) => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                format!("top_logprobs must be 0 to {MAX_TOP_LOGPROBS}, not {n}"),
            ))
        }
    };
    match request.logprobs {
        Some(true) => Ok(Some(top)),
        _ if request.top_logprobs.is_some_and(|n| n > 0) => Err(ApiError::invalid(
            Some("top_logprobs"),
            "top_logprobs needs logprobs: true",
        )),
        _ => Ok(None),
    }
}

fn messages(request: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages is empty"));
    }
    request
        .messages
        .iter()
        .map(|m| {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant"
            ) {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!(
                        "role {:?} is not supported (system, user, assistant are)",
                        m.role
                    ),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(text)) => text.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    Some("messages"),
                                    format!("content parts of type {kind:?} are not supported"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            Ok(ChatMessage {
                role: role.to_owned(),
                content,
            })
        })
        .collect()
}

/// How a chat decodes; `seed` when the request names none.
fn params(request: &ChatRequest, seed: u64) -> Result<GenerateParams, ApiError> {
    let budget = request.max_completion_tokens.or(request.max_tokens);
    sampling(
        budget,
        DEFAULT_MAX_TOKENS,
        request.temperature,
        request.top_p,
        seed,
        &request.stop,
    )
}

/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: u32 = 8;

/// The choices a request asks for (`n`, 1 by default).
fn choices(n: Option<u32>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n as usize),
        n => Err(ApiError::invalid(
            Some("n"),
            format!("n must be 1 to {MAX_CHOICES}, not {n}"),
        )),
    }
}

/// How to decode, from the fields chat and text completions share; `default_max` tokens
/// when the request names no budget (then up to the context the prompt leaves).
fn sampling(
    budget: Option<i64>,
    default_max: usize,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: u64,
    stop: &Option<Stop>,
) -> Result<GenerateParams, ApiError> {
    let max_tokens = match budget {
        None => default_max,
        Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!("max_tokens must be at least 1, not {n}"),
            ))
        }
    };
    let stop = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    Ok(GenerateParams {
        max_tokens,
        // OpenAI's defaults: temperature 1, a fresh seed per request (the caller's).
        temperature: Some(temperature.unwrap_or(1.0)),
        top_p,
        seed,
        stop,
        // Without an explicit budget, generate up to the context the prompt leaves.
        fit_context: budget.is_none(),
        logprobs: None,
        format: None,
    })
}

/// A request to POST /v1/completions.
#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Value,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    mycel: Option<MycelOptions>,
    // Parts of the API this node does not implement: refused when used, never ignored.
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(default)]
    best_of: Option<u32>,
    /// Every other field (penalties and logit_bias among them): refused by name unless it asks for nothing ([`other_fields`]).
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

/// Most alternatives a text completion's `logprobs` may ask for (OpenAI's limit).
const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// The log-probabilities a text completion asks for: `Some(k)` with `k` alternatives per
/// token (0 to 5) when `logprobs` is a number.
fn completion_logprobs(request: &CompletionRequest) -> Result<Option<u8>, ApiError> {
    match request.logprobs {
        None => Ok(None),
        Some(n) if n <= MAX_COMPLETION_LOGPROBS => Ok(Some(n as u8)),
        Some(n) => Err(ApiError::invalid(
            Some("logprobs"),
            format!("logprobs must be 0 to {MAX_COMPLETION_LOGPROBS}, not {n}"),
        )),
    }
}

/// OpenAI's default budget of a text completion.
const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// The prompt of a text completion: one string (a list of one string too). Lists of several
/// prompts, and token ids, are refused by name.
fn completion_prompt(request: &CompletionRequest) -> Result<String, ApiError> {
    let refuse = |message: &str| Err(ApiError::invalid(Some("prompt"), message));
    match &request.prompt {
        Value::String(prompt) => Ok(prompt.clone()),
        Value::Array(items) => match items.as_slice() {
            [Value::String(prompt)] => Ok(prompt.clone()),
            [] => refuse("prompt is empty"),
            [Value::String(_), ..] => refuse("only one prompt per request is supported"),
            _ => refuse("prompts of token ids are not supported; send the text"),
        },
        _ => refuse("prompt must be a string"),
    }
}

/// Refuses a text completion that asks for what this node does not do, naming the field.
fn completion_unsupported(request: &CompletionRequest) -> Result<(), ApiError> {
    let refuse = |param: &'static str, what: &str| {
        Err(ApiError::invalid(
            Some(param),
            format!("{param}: {what} is not supported by this node; send the request without it"),
        ))
    };
    if request.echo == Some(true) {
        return refuse("echo", "echoing the prompt");
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return refuse("suffix", "inserting between a prompt and a suffix");
    }
    if request.best_of.is_some_and(|n| n != 1) {
        return refuse("best_of", "choosing the best of several completions");
    }
    Ok(())
}

/// POST /v1/completions: a text completion of a prompt, given to the model as it is (no chat
/// template), routed, verified and streamed as a chat is.
pub(crate) async fn completions(State(state): State<ApiState>, body: Bytes) -> Response {
    match complete(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn complete(state: ApiState, body: Bytes) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse(&body)?;
    completion_unsupported(&request)?;
    other_fields(&request.rest)?;
    let prompt = completion_prompt(&request)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "prompt is empty"));
    }
    let seed = request.seed.unwrap_or_else(|| state.inference.draw());
    let params = GenerateParams {
        logprobs: completion_logprobs(&request)?,
        ..sampling(
            request.max_tokens,
            DEFAULT_COMPLETION_TOKENS,
            request.temperature,
            request.top_p,
            seed,
            &request.stop,
        )?
    };
    let asked = Asked {
        model: &request.model,
        mycel: request.mycel.as_ref(),
        stream: request.stream,
        stream_options: &request.stream_options,
        n: request.n,
        prompt_chars: prompt.chars().count(),
    };
    generate(state, asked, vec![ChatMessage::raw(prompt)], params, true).await
}

/// POST /v1/chat/completions.
pub(crate) async fn chat_completions(State(state): State<ApiState>, body: Bytes) -> Response {
    match chat(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn chat(state: ApiState, body: Bytes) -> Result<Response, ApiError> {
    let request: ChatRequest = parse(&body)?;
    if names_tools(&request) {
        return Err(tools_refused(state.models.find(&request.model).as_ref()));
    }
    unsupported(&request)?;
    other_fields(&request.rest)?;
    let messages = messages(&request)?;
    let seed = request.seed.unwrap_or_else(|| state.inference.draw());
    let format = match &request.response_format {
        None => None,
        Some(format) => crate::schema::response_format(format).map_err(|e| {
            ApiError::invalid(Some("response_format"), format!("response_format: {e}"))
        })?,
    };
    let params = GenerateParams {
        logprobs: chat_logprobs(&request)?,
        format,
        ..params(&request, seed)?
    };
    let asked = Asked {
        model: &request.model,
        mycel: request.mycel.as_ref(),
        stream: request.stream,
        stream_options: &request.stream_options,
        n: request.n,
        prompt_chars: 0,
    };
    generate(state, asked, messages, params, false).await
}

/// What chat and text completions ask for alike, beside their messages and decoding.
struct Asked<'a> {
    model: &'a str,
    mycel: Option<&'a MycelOptions>,
    stream: Option<bool>,
    stream_options: &'a Option<Value>,
    n: Option<u32>,
    /// Characters of a text completion's prompt (where its `text_offset`s start).
    prompt_chars: usize,
}

/// Resolves the model, refuses what can be refused before a stream is opened, and answers the
/// request's generations (a text completion's when `text`).
async fn generate(
    state: ApiState,
    asked: Asked<'_>,
    messages: Vec<ChatMessage>,
    params: GenerateParams,
    text: bool,
) -> Result<Response, ApiError> {
    let target = state
        .inference
        .resolve(asked.model, ModelKind::Generation)
        .await?;
    // Everything that can be refused is refused before a stream is opened, by whichever node
    // runs the task (this one too) before its first token; the prompt is templated and counted
    // only there, after the task is admitted.
    params
        .check()
        .map_err(|message| ApiError::invalid(None, message))?;
    let job = Job {
        mode: mode(&state, asked.mycel)?,
        reply: Reply {
            logprobs: params.logprobs.is_some(),
            prompt_chars: asked.prompt_chars,
            ..Reply::new(&target, text, state.inference.draw())
        },
        target,
        messages,
        params,
        stream: asked.stream.unwrap_or(false),
        include_usage: include_usage(asked.stream_options),
        choices: choices(asked.n)?,
    };
    answer(state, job).await
}

/// One request's generations, as chat and text completions both ask for them.
struct Job {
    reply: Reply,
    target: crate::inference::Target,
    messages: Vec<ChatMessage>,
    params: GenerateParams,
    mode: Mode,
    stream: bool,
    include_usage: bool,
    /// Choices asked for (`n`).
    choices: usize,
}

/// Runs a request's generation (a chat's, or a text completion's) checked as its mode says,
/// and answers it in its reply's shape: whole, or as server-sent events.
async fn answer(state: ApiState, job: Job) -> Result<Response, ApiError> {
    if job.params.logprobs.is_some() && job.mode != Mode::None {
        return Err(ApiError::invalid(
            Some("logprobs"),
            format!(
                "log-probabilities cannot be verified yet (this request is verified as {}, by \
                 its mycel object or the node's default): send the request without them, or \
                 send \"mycel\": {{\"verify\": \"none\"}}",
                job.mode
            ),
        ));
    }
    if job.choices > 1 {
        if job.mode != Mode::None {
            return Err(ApiError::invalid(
                Some("n"),
                format!(
                    "n above 1 cannot be verified yet (this request is verified as {}, by \
                     its mycel object or the node's default): ask for one choice, or send \
                     \"mycel\": {{\"verify\": \"none\"}}",
                    job.mode
                ),
            ));
        }
        return answer_many(state, job).await;
    }
    if job.mode != Mode::None {
        return answer_checked(state, job).await;
    }
    let Job {
        reply,
        target,
        messages,
        params,
        stream,
        include_usage,
        ..
    } = job;
    let (piece_tx, mut piece_rx) = mpsc::channel::<Piece>(64);

    if !stream {
        // Run in this future: a client that leaves drops it, which stops the generation.
        let generation = state
            .inference
            .generate(&target, messages, params, piece_tx);
        tokio::pin!(generation);
        let completion = loop {
            tokio::select! {
                Some(_) = piece_rx.recv() => {}
                result = &mut generation => break result?,
            }
        };
        return Ok(Json(reply.completion(&completion.generation)).into_response());
    }

    let inference = state.inference.clone();
    let mut task = tokio::spawn(async move {
        inference
            .generate(&target, messages, params, piece_tx)
            .await
    });
    let stop = AbortOnDrop(task.abort_handle());
    // Wait for the first text (or the end): a refusal before it is an error response, not an
    // error inside a 200 stream.
    let first = tokio::select! {
        Some(piece) = piece_rx.recv() => Ok(piece),
        result = &mut task => Err(result),
    };
    let mut early_end = None;
    let first_piece = match first {
        Ok(piece) => Some(piece),
        Err(Ok(Err(e))) => return Err(e.into()),
        Err(Ok(Ok(completion))) => {
            early_end = Some(Ok(completion));
            None
        }
        Err(Err(e)) => return Err(RouteError::Unavailable(format!("the task failed: {e}")).into()),
    };
    let (event_tx, event_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let _stop = stop;
        let mut stream = reply.stream(1);
        if let Some(first) = reply.opening() {
            if event_tx.send(data(&first)).await.is_err() {
                return;
            }
        }
        if let Some(piece) = first_piece {
            if event_tx.send(data(&stream.piece(0, &piece))).await.is_err() {
                return;
            }
        }
        let result = match early_end {
            Some(result) => result,
            None => loop {
                tokio::select! {
                    // The client went away: aborting the task stops the generation.
                    _ = event_tx.closed() => return,
                    Some(piece) = piece_rx.recv() => {
                        if event_tx.send(data(&stream.piece(0, &piece))).await.is_err() {
                            return;
                        }
                    }
                    result = &mut task => break result.unwrap_or_else(|e| {
                        Err(RouteError::Unavailable(format!("the task failed: {e}")))
                    }),
                }
            },
        };
        while let Ok(piece) = piece_rx.try_recv() {
            let _ = event_tx.send(data(&stream.piece(0, &piece))).await;
        }
        match result {
            Ok(completion) => {
                let generation = completion.generation;
                for event in stream.end(0, &generation) {
                    let _ = event_tx.send(data(&event)).await;
                }
                if include_usage {
                    let tail = reply.usage_tail()(generation.prompt_tokens, generation.made());
                    let _ = event_tx.send(data(&tail)).await;
                }
            }
            Err(e) => {
                let _ = event_tx.send(data(&ApiError::from(e).body())).await;
            }
        }
        let _ = event_tx.send(Event::default().data("[DONE]")).await;
    });
    Ok(event_stream(event_rx))
}

/// `n` choices: as many generations side by side, each with its own seed (the request's,
/// plus the choice's index), answered whole or streamed with each piece tagged by its
/// choice. A refusal before any text is an error response, as for one choice.
async fn answer_many(state: ApiState, job: Job) -> Result<Response, ApiError> {
    let Job {
        reply,
        target,
        messages,
        params,
        stream,
        include_usage,
        choices,
        ..
    } = job;
    let (piece_tx, mut piece_rx) = mpsc::channel::<(usize, Piece)>(64);
    let mut guards = Vec::with_capacity(choices);
    let mut running = futures::stream::FuturesUnordered::new();
    for index in 0..choices {
        let (text_tx, mut text_rx) = mpsc::channel::<Piece>(64);
        let pieces = piece_tx.clone();
        tokio::spawn(async move {
            while let Some(piece) = text_rx.recv().await {
                if pieces.send((index, piece)).await.is_err() {
                    return;
                }
            }
        });
        let inference = state.inference.clone();
        let (target, messages) = (target.clone(), messages.clone());
        let params = GenerateParams {
            seed: params.seed.wrapping_add(index as u64),
            ..params.clone()
        };
        let task =
            tokio::spawn(
                async move { inference.generate(&target, messages, params, text_tx).await },
            );
        guards.push(AbortOnDrop(task.abort_handle()));
        running.push(async move {
            let result = task
                .await
                .unwrap_or_else(|e| Err(RouteError::Unavailable(format!("the task failed: {e}"))));
            (index, result)
        });
    }
    drop(piece_tx);
    let mut ended: Vec<Option<Result<mycel_ml::Generation, RouteError>>> =
        (0..choices).map(|_| None).collect();
    if !stream {
        loop {
            tokio::select! {
                Some(_) = piece_rx.recv() => {}
                next = running.next() => match next {
                    Some((index, result)) => ended[index] = Some(result.map(|c| c.generation)),
                    None => break,
                },
            }
        }
        let generations = ended
            .into_iter()
            .map(|result| result.expect("every choice ended"))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Json(reply.completions(&generations)).into_response());
    }
    // Wait for the first text (or the first end): a refusal before it is an error response.
    let first = tokio::select! {
        Some(piece) = piece_rx.recv() => Some(piece),
        Some((index, result)) = running.next() => {
            ended[index] = Some(Ok(result?.generation));
            None
        }
    };
    let (event_tx, event_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let _stop = guards;
        let send = |value: Value| {
            let event_tx = event_tx.clone();
            async move { event_tx.send(data(&value)).await.is_ok() }
        };
        for index in 0..choices {
            if let Some(opening) = reply.opening_at(index) {
                if !send(opening).await {
                    return;
                }
            }
        }
        let mut stream = reply.stream(choices);
        let mut piece = |(index, piece): (usize, Piece)| stream.piece(index, &piece);
        if let Some(first) = first {
            if !send(piece(first)).await {
                return;
            }
        }
        loop {
            tokio::select! {
                // The client went away: dropping the guards stops the generations.
                _ = event_tx.closed() => return,
                Some(next) = piece_rx.recv() => {
                    if !send(piece(next)).await {
                        return;
                    }
                }
                next = running.next() => match next {
                    Some((index, result)) => ended[index] = Some(result.map(|c| c.generation)),
                    None => break,
                },
            }
        }
        // Every generation ended: the rest of their text, then each choice's end.
        while let Some(next) = piece_rx.recv().await {
            if !send(piece(next)).await {
                return;
            }
        }
        let (mut prompt, mut made) = (0, 0);
        for (index, result) in ended.into_iter().enumerate() {
            match result.expect("every choice ended") {
                Ok(generation) => {
                    prompt = generation.prompt_tokens;
                    made += generation.made();
                    for event in stream.end(index, &generation) {
                        send(event).await;
                    }
                }
                Err(e) => {
                    send(ApiError::from(e).body()).await;
                }
            }
        }
        if include_usage {
            send(reply.usage_tail()(prompt, made)).await;
        }
        let _ = event_tx.send(Event::default().data("[DONE]")).await;
    });
    Ok(event_stream(event_rx))
}

/// What every reply to one request repeats, and its shape: a chat completion's, or a text
/// completion's (`/v1/completions`).
struct Reply {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    text: bool,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
    /// Characters of a text completion's prompt: the first token's `text_offset`.
    prompt_chars: usize,
}

impl Reply {
    /// The reply to a request for `target`, a text completion's when `text`, with the id
    /// made from `draw`.
    fn new(target: &crate::inference::Target, text: bool, draw: u64) -> Self {
        let prefix = if text { "cmpl" } else { "chatcmpl" };
        Self {
            id: format!("{prefix}-{draw:016x}"),
            created: unix_now(),
            model: target.offer.name.clone(),
            fingerprint: target.offer.engine.clone(),
            text,
            logprobs: false,
            prompt_chars: 0,
        }
    }

    /// A choice's `logprobs`: `null` unless the request asked for them; a chat's
    /// `{"content": [...]}`, or a text completion's columns with each token's `text_offset`
    /// counted on from `offset`.
    fn scores(&self, logprobs: &[TokenLogprobs], offset: &mut Offset) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let token = |l: &Logprob| String::from_utf8_lossy(&l.bytes).into_owned();
        if !self.text {
            let entry =
                |l: &Logprob| json!({ "token": token(l), "logprob": l.logprob, "bytes": l.bytes });
            let content: Vec<Value> = logprobs
                .iter()
                .map(|l| {
                    let mut chosen = entry(&l.chosen);
                    chosen["top_logprobs"] = l.top.iter().map(entry).collect();
                    chosen
                })
                .collect();
            return json!({ "content": content, "refusal": null });
        }
        let offsets: Vec<usize> = logprobs
            .iter()
            .map(|l| offset.take(&l.chosen.bytes))
            .collect();
        json!({
            "tokens": logprobs.iter().map(|l| token(&l.chosen)).collect::<Vec<_>>(),
            "token_logprobs": logprobs.iter().map(|l| l.chosen.logprob).collect::<Vec<_>>(),
            "top_logprobs": logprobs
                .iter()
                .map(|l| l.top.iter().map(|t| (token(t), json!(t.logprob))).collect())
                .collect::<Vec<serde_json::Map<String, Value>>>(),
            "text_offset": offsets,
        })
    }

    /// The events of a stream of `choices` choices, as its pieces come.
    fn stream(&self, choices: usize) -> Streamed<'_> {
        Streamed {
            reply: self,
            offsets: vec![Offset::at(self.prompt_chars); choices],
            scored: vec![0; choices],
        }
    }

    /// A whole (not streamed) completion.
    fn completion(&self, generation: &mycel_ml::Generation) -> Value {
        self.completions(std::slice::from_ref(generation))
    }

    /// A whole completion of several choices (`n`): the prompt counted once, the tokens of
    /// every choice.
    fn completions(&self, generations: &[mycel_ml::Generation]) -> Value {
        let choices: Vec<Value> = generations
            .iter()
            .enumerate()
            .map(|(index, generation)| {
                let finish_reason = finish(generation.finish_reason);
                let logprobs =
                    self.scores(&generation.logprobs, &mut Offset::at(self.prompt_chars));
                if self.text {
                    json!({ "index": index, "text": generation.text, "logprobs": logprobs,
                            "finish_reason": finish_reason })
                } else {
                    json!({ "index": index,
                            "message": { "role": "assistant", "content": generation.text },
                            "logprobs": logprobs, "finish_reason": finish_reason })
                }
            })
            .collect();
        let prompt = generations.first().map_or(0, |g| g.prompt_tokens);
        let made = generations.iter().map(mycel_ml::Generation::made).sum();
        json!({
            "id": self.id,
            "object": if self.text { "text_completion" } else { "chat.completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": usage(prompt, made),
        })
    }

    /// The first event of a stream: a chat's names the assistant's role (a text
    /// completion's has none).
    fn opening(&self) -> Option<Value> {
        self.opening_at(0)
    }

    /// The first event of choice `index`'s stream.
    fn opening_at(&self, index: usize) -> Option<Value> {
        (!self.text).then(|| {
            self.chunk_at(
                index,
                json!({ "role": "assistant", "content": "" }),
                Value::Null,
            )
        })
    }

    /// One event of a streamed completion: `delta` is a chat's (`{"content": text}`, or
    /// `{}` at the end); a text completion carries its `content` as `text`.
    fn chunk(&self, delta: Value, finish_reason: Value) -> Value {
        self.chunk_at(0, delta, finish_reason)
    }

    /// The last event of a stream that asked for usage (`stream_options.include_usage`):
    /// no choices, the tokens read and made.
    fn usage_tail(&self) -> impl Fn(usize, usize) -> Value {
        let mut tail = self.chunk(json!({}), Value::Null);
        tail["choices"] = json!([]);
        move |prompt, made| {
            let mut tail = tail.clone();
            tail["usage"] = usage(prompt, made);
            tail
        }
    }

    /// [`Reply::chunk`] for choice `index`.
    fn chunk_at(&self, index: usize, delta: Value, finish_reason: Value) -> Value {
        let (object, choice) = if self.text {
            let text = delta.get("content").and_then(Value::as_str).unwrap_or("");
            (
                "text_completion",
                json!({ "index": index, "text": text, "logprobs": null,
                        "finish_reason": finish_reason }),
            )
        } else {
            (
                "chat.completion.chunk",
                json!({ "index": index, "delta": delta, "logprobs": null,
                        "finish_reason": finish_reason }),
            )
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [choice],
        })
    }
}

/// A streamed reply's choices: where each one's text offsets are, and how many of its
/// log-probabilities have gone out.
struct Streamed<'a> {
    reply: &'a Reply,
    offsets: Vec<Offset>,
    scored: Vec<usize>,
}

/// Where a text completion's next token starts, in characters, as `text_offset` counts
/// them: the characters whole so far (a token may end inside one; its bytes wait in the
/// decoder).
#[derive(Debug, Clone)]
struct Offset {
    chars: usize,
    text: TextDecoder,
}

impl Offset {
    fn at(chars: usize) -> Self {
        Self {
            chars,
            text: TextDecoder::default(),
        }
    }

    /// The offset of a token of `bytes`; moves past it.
    fn take(&mut self, bytes: &[u8]) -> usize {
        let at = self.chars;
        let before = self.text.whole().len();
        self.text.push_bytes(bytes);
        self.chars += self.text.whole()[before..].chars().count();
        at
    }
}

impl Streamed<'_> {
    /// The event of choice `index`'s next piece: its text, and its tokens' log-probabilities
    /// when asked for.
    fn piece(&mut self, index: usize, piece: &Piece) -> Value {
        let mut event = self
            .reply
            .chunk_at(index, json!({ "content": piece.text }), Value::Null);
        self.scored[index] += piece.logprobs.len();
        event["choices"][0]["logprobs"] =
            self.reply.scores(&piece.logprobs, &mut self.offsets[index]);
        event
    }

    /// The last events of choice `index`: the log-probabilities of tokens that came with no
    /// text (held back, or past the last piece), then the choice's end.
    fn end(&mut self, index: usize, generation: &mycel_ml::Generation) -> Vec<Value> {
        let mut events = Vec::with_capacity(2);
        let rest = generation
            .logprobs
            .get(self.scored[index]..)
            .unwrap_or_default();
        if !rest.is_empty() {
            let piece = Piece {
                logprobs: rest.to_vec(),
                ..Piece::default()
            };
            events.push(self.piece(index, &piece));
        }
        let reason = json!(finish(generation.finish_reason));
        events.push(self.reply.chunk_at(index, json!({}), reason));
        events
    }
}

/// Whether a streamed request asked for a final usage event.
fn include_usage(stream_options: &Option<Value>) -> bool {
    stream_options
        .as_ref()
        .and_then(|o| o["include_usage"].as_bool())
        .unwrap_or(false)
}

/// Checks a certificate given alone or inside the response that carried it: the text is in
/// its one canonical form, the signatures and rule hold, and a response's content is the
/// certified output. Pure CPU: callers on the async runtime run it on the blocking pool.
pub fn check_certificate(
    value: &Value,
) -> Result<(mycel_core::verify::Certificate, mycel_core::verify::Checked), String> {
    use mycel_core::verify::{output_digest, Certificate};
    let (certificate_value, response) = match value.pointer("/mycel/certificate") {
        Some(certificate) => (certificate, Some(value)),
        None => (value, None),
    };
    let certificate: Certificate = serde_json::from_value(certificate_value.clone())
        .map_err(|e| format!("not a certificate (nor a response with mycel.certificate): {e}"))?;
    // serde ignores what it does not read: the text must be exactly the certificate's.
    if serde_json::to_value(&certificate).ok().as_ref() != Some(certificate_value) {
        return Err("the certificate has fields or values beyond its canonical form".into());
    }
    let checked = certificate.check().map_err(|e| e.to_string())?;
    if let Some(response) = response {
        let output = certified_output(response)?
            .ok_or("the response is neither an embeddings list nor a chat completion")?;
        if output_digest(&output) != certificate.claim.output {
            return Err(
                "the response's content is not the output the certificate certifies".into(),
            );
        }
    }
    Ok((certificate, checked))
}

/// What a whole response (an embeddings list, or a chat completion made under verification)
/// says was computed, as the workers' output: `None` for anything else (a certificate
/// alone). Its digest must be the certificate's `claim.output`.
pub fn certified_output(response: &Value) -> Result<Option<TaskOutput>, String> {
    match response["object"].as_str() {
        Some("list") => {
            let data = response["data"]
                .as_array()
                .ok_or("no data in the response")?;
            let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(data.len());
            for (position, item) in data.iter().enumerate() {
                // Each vector where its index says, all of one length: the digest alone
                // would not tell a regrouped or reordered list from the certified one.
                if item["index"].as_u64() != Some(position as u64) {
                    return Err(format!("embedding {position} has index {}", item["index"]));
                }
                let vector: Vec<f32> = match &item["embedding"] {
                    Value::String(encoded) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(encoded)
                            .map_err(|e| format!("an embedding is not base64: {e}"))?;
                        if bytes.len() % 4 != 0 {
                            return Err("a base64 embedding is not whole floats".into());
                        }
                        bytes
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect()
                    }
                    other => serde_json::from_value(other.clone())
                        .map_err(|e| format!("an embedding is not a list of numbers: {e}"))?,
                };
                if vectors
                    .first()
                    .is_some_and(|first| first.len() != vector.len())
                {
                    return Err("the embeddings are not all of one length".into());
                }
                vectors.push(vector);
            }
            let tokens = response["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            Ok(Some(TaskOutput::embeddings(&vectors, tokens as usize)))
        }
        Some(object @ ("chat.completion" | "text_completion")) => {
            // One choice: a certificate covers one output, and a second choice beside it
            // would pass unchecked.
            let choices = response["choices"].as_array().map_or(0, Vec::len);
            if choices != 1 {
                return Err(format!(
                    "the response has {choices} choices; a certificate covers one"
                ));
            }
            let choice = &response["choices"][0];
            let text = if object == "text_completion" {
                &choice["text"]
            } else {
                &choice["message"]["content"]
            };
            let text = text.as_str().ok_or("no text in the response")?;
            let tokens: Vec<u32> =
                serde_json::from_value(response["mycel"]["output_tokens"].clone())
                    .map_err(|_| "the response has no mycel.output_tokens".to_owned())?;
            let finish_reason = match choice["finish_reason"].as_str() {
                Some("stop") => FinishReason::Stop,
                Some("length") => FinishReason::Length,
                other => return Err(format!("finish_reason {other:?}")),
            };
            let prompt_tokens = response["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            Ok(Some(TaskOutput::Generation {
                text: text.to_owned(),
                tokens,
                prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
                finish_reason,
                logprobs: Vec::new(),
                counted: None,
            }))
        }
        _ => Ok(None),
    }
}

/// A chat completion checked as `mode` says. The text comes once it is checked: a stream
/// gets it in one piece, then the `mycel` object (with the certificate) in its final event.
async fn answer_checked(state: ApiState, job: Job) -> Result<Response, ApiError> {
    let Job {
        reply,
        target,
        messages,
        params,
        mode,
        stream,
        include_usage,
        ..
    } = job;
    let (completion, verification) = state
        .inference
        .generate_checked(&target, messages, params, mode)
        .await?;
    let generation = completion.generation;
    let mut checked = verification_json(&verification);
    // The token ids are part of what the workers signed: with them a client can check the
    // answer against the certificate (`certified_output`).
    checked["output_tokens"] = json!(generation.tokens);
    if !stream {
        let mut body = reply.completion(&generation);
        body["mycel"] = checked;
        return Ok(Json(body).into_response());
    }
    let chunk = |delta: Value, finish_reason: Value| reply.chunk(delta, finish_reason);
    let mut last = chunk(json!({}), json!(finish(generation.finish_reason)));
    last["mycel"] = checked;
    let mut events: Vec<Event> = reply.opening().iter().map(data).collect();
    events.extend([
        data(&chunk(json!({ "content": generation.text }), Value::Null)),
        data(&last),
    ]);
    if include_usage {
        let tail = reply.usage_tail()(generation.prompt_tokens, generation.made());
        events.push(data(&tail));
    }
    events.push(Event::default().data("[DONE]"));
    let events = futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    Ok(Sse::new(events).into_response())
}

/// Stops a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

fn finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion })
}

#[cfg(test)]
mod tests {
    use super::Offset;

    #[test]
    fn text_offsets_count_characters_that_tokens_may_split() {
        let mut offset = Offset::at(7);
        assert_eq!(offset.take(b"a"), 7);
        // "é" (C3 A9) over two tokens: both start where it does.
        assert_eq!(offset.take(&[0xC3]), 8);
        assert_eq!(offset.take(&[0xA9]), 8);
        assert_eq!(offset.take(b"x"), 9);
        // A byte that begins no character counts as one, as the text shows it.
        assert_eq!(offset.take(&[0xA9]), 10);
        assert_eq!(offset.take(b"y"), 11);
    }
}
