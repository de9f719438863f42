//! The OpenAI-compatible API: GET /v1/models, POST /v1/embeddings, POST /v1/chat/completions
//! (plain and server-sent events), with OpenAI's request, response and error shapes, so that
//! any OpenAI client pointed at a node works (its API key is the node's token).
//!
//! Requests go through the node's router (`crate::inference`): they run here when this node is
//! the best place, on a peer otherwise, and move to another node when one fails.

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
use mycel_core::statement::{ModelKind, ModelOffer};
use mycel_ml::{ChatMessage, FinishReason, GenerateParams, MlError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::ApiState;
use crate::inference::{RouteError, Verification};
use crate::models::Runner;
use mycel_core::task::TaskOutput;
use mycel_core::verify::Mode;

/// Default `max_tokens` when a request names none.
const DEFAULT_MAX_TOKENS: usize = 512;

/// An OpenAI error response.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
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
                param: Some("model"),
                message: e.to_string(),
            },
            RouteError::AmbiguousModel(_) => Self {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                code: Some("model_ambiguous"),
                param: Some("model"),
                message: e.to_string(),
            },
            RouteError::UnboundModel(_) => Self {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                code: Some("model_unbound"),
                param: Some("model"),
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
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

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
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
    if let Ok(peers) = state.net.workers().await {
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
}

/// Refuses a request that asks for what this node does not do (tools, structured output,
/// log-probabilities), naming the field: answering as if it had been honoured would mislead.
fn unsupported(request: &ChatRequest) -> Result<(), ApiError> {
    let used = |v: &Option<Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => s != "none",
        Some(_) => true,
    };
    let refuse = |param: &'static str, what: &str| {
        Err(ApiError::invalid(
            Some(param),
            format!(
                "{param}: {what} is not supported by this node yet; send the request without \
                 it"
            ),
        ))
    };
    if used(&request.tools) || used(&request.functions) {
        return refuse("tools", "tool and function calling");
    }
    if used(&request.tool_choice) || used(&request.function_call) {
        return refuse("tool_choice", "tool and function calling");
    }
    let format = request
        .response_format
        .as_ref()
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str);
    if request.response_format.is_some() && format != Some("text") {
        return refuse(
            "response_format",
            "structured output (json_object, json_schema)",
        );
    }
    if request.logprobs == Some(true) || request.top_logprobs.is_some_and(|n| n > 0) {
        return refuse("logprobs", "returning log-probabilities");
    }
    Ok(())
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

fn params(request: &ChatRequest) -> Result<GenerateParams, ApiError> {
    if request.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
    }
    let max_tokens = match request.max_completion_tokens.or(request.max_tokens) {
        None => DEFAULT_MAX_TOKENS,
        Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!("max_tokens must be at least 1, not {n}"),
            ))
        }
    };
    let stop = match &request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    Ok(GenerateParams {
        max_tokens,
        // OpenAI's defaults: temperature 1, a fresh seed per request.
        temperature: Some(request.temperature.unwrap_or(1.0)),
        top_p: request.top_p,
        seed: request.seed.unwrap_or_else(rand::random),
        stop,
        // Without an explicit budget, generate up to the context the prompt leaves.
        fit_context: request
            .max_completion_tokens
            .or(request.max_tokens)
            .is_none(),
    })
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
    unsupported(&request)?;
    let messages = messages(&request)?;
    let params = params(&request)?;
    let target = state
        .inference
        .resolve(&request.model, ModelKind::Generation)
        .await?;
    // Everything that can be refused is refused before a stream is opened, by whichever node
    // runs the task (this one too) before its first token; the prompt is templated and counted
    // only there, after the task is admitted.
    params
        .check()
        .map_err(|message| ApiError::invalid(None, message))?;
    let id = request_id("chatcmpl");
    let created = unix_now();
    let name = target.offer.name.clone();
    let fingerprint = target.offer.engine.clone();
    let mode = mode(&state, request.mycel.as_ref())?;
    if mode != Mode::None {
        return chat_checked(state, request, target, messages, params, mode, id, created).await;
    }
    let (text_tx, mut text_rx) = mpsc::channel::<String>(64);

    if !request.stream.unwrap_or(false) {
        // Run in this future: a client that leaves drops it, which stops the generation.
        let generation = state.inference.generate(&target, messages, params, text_tx);
        tokio::pin!(generation);
        let completion = loop {
            tokio::select! {
                Some(_) = text_rx.recv() => {}
                result = &mut generation => break result?,
            }
        };
        let reply = Reply {
            id,
            created,
            model: name,
            fingerprint,
        };
        return Ok(Json(reply.completion(&completion.generation)).into_response());
    }

    let include_usage = include_usage(&request);
    let reply = Reply {
        id,
        created,
        model: name,
        fingerprint,
    };
    let chunk = move |delta: Value, finish_reason: Value| reply.chunk(delta, finish_reason);
    let inference = state.inference.clone();
    let mut task =
        tokio::spawn(async move { inference.generate(&target, messages, params, text_tx).await });
    let stop = AbortOnDrop(task.abort_handle());
    // Wait for the first text (or the end): a refusal before it is an error response, not an
    // error inside a 200 stream.
    let first = tokio::select! {
        Some(text) = text_rx.recv() => Ok(text),
        result = &mut task => Err(result),
    };
    let mut early_end = None;
    let first_text = match first {
        Ok(text) => Some(text),
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
        let first = chunk(json!({ "role": "assistant", "content": "" }), Value::Null);
        if event_tx.send(data(&first)).await.is_err() {
            return;
        }
        if let Some(text) = first_text {
            if event_tx
                .send(data(&chunk(json!({ "content": text }), Value::Null)))
                .await
                .is_err()
            {
                return;
            }
        }
        let result = match early_end {
            Some(result) => result,
            None => loop {
                tokio::select! {
                    // The client went away: aborting the task stops the generation.
                    _ = event_tx.closed() => return,
                    Some(text) = text_rx.recv() => {
                        let piece = chunk(json!({ "content": text }), Value::Null);
                        if event_tx.send(data(&piece)).await.is_err() {
                            return;
                        }
                    }
                    result = &mut task => break result.unwrap_or_else(|e| {
                        Err(RouteError::Unavailable(format!("the task failed: {e}")))
                    }),
                }
            },
        };
        while let Ok(text) = text_rx.try_recv() {
            let _ = event_tx
                .send(data(&chunk(json!({ "content": text }), Value::Null)))
                .await;
        }
        match result {
            Ok(completion) => {
                let generation = completion.generation;
                let last = chunk(json!({}), json!(finish(generation.finish_reason)));
                let _ = event_tx.send(data(&last)).await;
                if include_usage {
                    let mut tail = chunk(json!({}), Value::Null);
                    tail["choices"] = json!([]);
                    tail["usage"] = usage(generation.prompt_tokens, generation.tokens.len());
                    let _ = event_tx.send(data(&tail)).await;
                }
            }
            Err(e) => {
                let error = ApiError::from(e);
                let body = json!({ "error": { "message": error.message, "type": error.kind,
                                              "param": error.param, "code": error.code } });
                let _ = event_tx.send(data(&body)).await;
            }
        }
        let _ = event_tx.send(Event::default().data("[DONE]")).await;
    });
    let events = futures::stream::unfold(event_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// What every reply to one chat request repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

impl Reply {
    /// A whole (not streamed) completion.
    fn completion(&self, generation: &mycel_ml::Generation) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": generation.text },
                "logprobs": null,
                "finish_reason": finish(generation.finish_reason),
            }],
            "usage": usage(generation.prompt_tokens, generation.tokens.len()),
        })
    }

    /// One event of a streamed completion.
    fn chunk(&self, delta: Value, finish_reason: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null,
                          "finish_reason": finish_reason }],
        })
    }
}

/// Whether a streamed request asked for a final usage event.
fn include_usage(request: &ChatRequest) -> bool {
    request
        .stream_options
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
        Some("chat.completion") => {
            let choice = &response["choices"][0];
            let text = choice["message"]["content"]
                .as_str()
                .ok_or("no message content in the response")?;
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
            }))
        }
        _ => Ok(None),
    }
}

/// A chat completion checked as `mode` says. The text comes once it is checked: a stream
/// gets it in one piece, then the `mycel` object (with the certificate) in its final event.
#[allow(clippy::too_many_arguments)]
async fn chat_checked(
    state: ApiState,
    request: ChatRequest,
    target: crate::inference::Target,
    messages: Vec<ChatMessage>,
    params: GenerateParams,
    mode: Mode,
    id: String,
    created: u64,
) -> Result<Response, ApiError> {
    let reply = Reply {
        id,
        created,
        model: target.offer.name.clone(),
        fingerprint: target.offer.engine.clone(),
    };
    let (completion, verification) = state
        .inference
        .generate_checked(&target, messages, params, mode)
        .await?;
    let generation = completion.generation;
    let mut checked = verification_json(&verification);
    // The token ids are part of what the workers signed: with them a client can check the
    // answer against the certificate (`certified_output`).
    checked["output_tokens"] = json!(generation.tokens);
    if !request.stream.unwrap_or(false) {
        let mut body = reply.completion(&generation);
        body["mycel"] = checked;
        return Ok(Json(body).into_response());
    }
    let include_usage = include_usage(&request);
    let chunk = |delta: Value, finish_reason: Value| reply.chunk(delta, finish_reason);
    let mut last = chunk(json!({}), json!(finish(generation.finish_reason)));
    last["mycel"] = checked;
    let mut events = vec![
        data(&chunk(
            json!({ "role": "assistant", "content": "" }),
            Value::Null,
        )),
        data(&chunk(json!({ "content": generation.text }), Value::Null)),
        data(&last),
    ];
    if include_usage {
        let mut tail = chunk(json!({}), Value::Null);
        tail["choices"] = json!([]);
        tail["usage"] = usage(generation.prompt_tokens, generation.tokens.len());
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
