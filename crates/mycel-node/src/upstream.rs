//! Models served by an OpenAI-compatible server beside this node (`--upstream NAME=URL`):
//! llama-server, vLLM, Ollama, another Mycel node. The node announces NAME to the network
//! like a model of its own and runs the tasks peers send for it by calling the server's chat
//! or text completions with `stream: true`, passing the pieces on as they come. The server's
//! address and its key stay on this node: peers see only the name.
//!
//! What an upstream cannot give is refused with the reason: token ids (so a generation that
//! failed elsewhere mid-way cannot be resumed here, and there are no log-probabilities), and
//! constrained decoding. Its answers carry no token ids; their signatures cover the text.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mycel_core::id::ContentId;
use mycel_core::statement::{ModelKind, ModelOffer};
use mycel_core::task::{ChatMessage, FinishReason, GenerateParams, Resume};
use mycel_ml::{Generation, MlError};
use serde_json::{json, Value};

use crate::models::{Runner, Served};

/// The engine named in an upstream model's announcement: no replica elsewhere runs it.
pub const ENGINE: &str = "upstream/1";

/// The longest line of a server's stream, in bytes.
const MAX_LINE: u64 = 1 << 20;

/// The longest answer taken from a server, in bytes.
const MAX_TEXT: usize = 8 << 20;

/// The most of a server's error message passed on.
const MAX_MESSAGE: usize = 200;

/// Why an upstream generation did not happen.
#[derive(Debug)]
pub enum Failure {
    /// The server is down, busy or rate-limited, or cannot do this (a resume): another node
    /// may, and nobody here is to blame.
    Unavailable(String),
    /// The request, or the generation, failed.
    Model(MlError),
}

impl From<MlError> for Failure {
    fn from(e: MlError) -> Self {
        Self::Model(e)
    }
}

/// At most [`MAX_MESSAGE`] characters of a server's message.
fn clip(message: &str) -> String {
    let mut clipped: String = message.chars().take(MAX_MESSAGE).collect();
    if clipped.len() < message.len() {
        clipped.push('…');
    }
    clipped
}

/// A model served by another server.
#[derive(Clone)]
pub struct Upstream {
    /// The name it is offered under.
    pub name: String,
    /// The server's API base (`http://HOST:PORT/v1`).
    pub base: String,
    /// The model name the server knows it by.
    pub model: String,
    /// The key the server wants (`Authorization: Bearer`), from the environment.
    key: Option<String>,
    /// Its HTTP client, made once: connections to the server are kept between requests.
    agent: ureq::Agent,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never printed.
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base", &self.base)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The HTTP client of an upstream server: its bounds on time, and no proxy.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        // A server quiet this long is stuck; no task runs longer in all.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .timeout_global(Some(Duration::from_millis(
            mycel_core::task::MAX_TASK_BUDGET_MS,
        )))
        // The key goes to the server, through no proxy the environment names.
        .proxy(None)
        .build()
        .into()
}

/// The environment variable an upstream's key is read from: `MYCEL_UPSTREAM_KEY_` and its
/// name in capitals, other characters as `_`.
pub fn key_variable(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_uppercase(),
            false => '_',
        })
        .collect();
    format!("MYCEL_UPSTREAM_KEY_{name}")
}

impl Upstream {
    /// `NAME=URL` or `NAME=URL#MODEL` (the server's name for it; NAME by default), the key
    /// from [`key_variable`] when it is set.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?}: expected NAME=URL (or NAME=URL#MODEL)"))?;
        let (url, model) = match rest.split_once('#') {
            Some((url, model)) => (url, model),
            None => (rest, name),
        };
        if name.is_empty() || model.is_empty() || name.len() > 128 {
            return Err(format!(
                "{spec:?}: the name and model must be 1 to 128 characters"
            ));
        }
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "{url:?}: an upstream is reached over http:// (a server beside this node; put \
                 a TLS proxy in front of one elsewhere)"
            ));
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() || host.contains(['@', ' ', '?']) {
            return Err(format!("{url:?}: expected http://HOST:PORT/v1"));
        }
        Ok(Self {
            name: name.to_owned(),
            base: url.trim_end_matches('/').to_owned(),
            model: model.to_owned(),
            agent: agent(),
            key: std::env::var(key_variable(name))
                .ok()
                .filter(|k| !k.is_empty()),
        })
    }

    /// With `key` as the server's key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// What this node serves for it: an offer whose id is its name as this node's (`node`),
    /// so two nodes' upstreams of one name are two models.
    pub fn served(self, node: &mycel_net::PeerId) -> Served {
        let mut id = b"mycel/upstream/1\0".to_vec();
        id.extend_from_slice(self.name.as_bytes());
        id.push(0);
        id.extend_from_slice(&node.to_bytes());
        Served {
            offer: ModelOffer {
                id: ContentId::of(&id),
                name: self.name.clone(),
                kind: ModelKind::Generation,
                engine: ENGINE.to_owned(),
            },
            runner: Runner::Upstream(Arc::new(self)),
            source: std::path::PathBuf::new(),
        }
    }

    /// Generates `messages` (a text completion's prompt when it is one) on the server, giving
    /// `on_text` the text as it comes (`false`: stop); stops early when `stop` is set.
    /// Blocking: run it off the async runtime.
    pub fn generate(
        &self,
        messages: &[ChatMessage],
        params: &GenerateParams,
        resume: &Resume,
        stop: &AtomicBool,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, Failure> {
        let refuse = |what: &str| Failure::Model(MlError::Input(format!("{} {what}", self.name)));
        params.check().map_err(MlError::Input)?;
        if params.logprobs.is_some() {
            return Err(refuse(
                "is served by an upstream server, which gives no token ids: no log-probabilities",
            ));
        }
        if params.format.is_some() {
            return Err(refuse(
                "is served by an upstream server: response_format is not passed on yet",
            ));
        }
        if !resume.tokens.is_empty() || resume.text_bytes > 0 {
            return Err(Failure::Unavailable(
                "an upstream server cannot resume another node's generation".into(),
            ));
        }
        let started = std::time::Instant::now();
        let raw = ChatMessage::raw_prompt(messages);
        let mut body = json!({
            "model": self.model,
            "temperature": params.temperature.unwrap_or(0.0),
            // Servers read a seed as a signed number of 64 bits at most (some of 32).
            "seed": params.seed & 0x7fff_ffff,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        // A budget the caller did not set is the server's to choose (its context may differ);
        // the answer is still cut at it here.
        if !params.fit_context {
            body["max_tokens"] = json!(params.max_tokens);
        }
        if let Some(p) = params.top_p {
            body["top_p"] = json!(p);
        }
        if !params.stop.is_empty() {
            body["stop"] = json!(params.stop);
        }
        let path = match raw {
            Some(prompt) => {
                body["prompt"] = json!(prompt);
                "completions"
            }
            None => {
                body["messages"] = messages
                    .iter()
                    .map(|m| json!({ "role": m.role, "content": m.content }))
                    .collect();
                "chat/completions"
            }
        };
        let url = format!("{}/{path}", self.base);
        let mut request = self.agent.post(&url);
        if let Some(key) = &self.key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = request.send_json(&body).map_err(|e| {
            Failure::Unavailable(format!(
                "cannot reach the upstream server of {}: {}",
                self.name,
                clip(&e.to_string())
            ))
        })?;
        let status = response.status().as_u16();
        if status != 200 {
            let answer: Value = response
                .body_mut()
                .with_config()
                .limit(1 << 16)
                .read_json()
                .unwrap_or(Value::Null);
            let message = [
                &answer["error"]["message"],
                &answer["message"],
                &answer["detail"],
            ]
            .into_iter()
            .find_map(Value::as_str)
            .map_or("no details".into(), clip);
            let said = format!(
                "the upstream server of {} answered {status}: {message}",
                self.name
            );
            return Err(match status {
                // Its message may quote the key.
                401 | 403 => Failure::Model(MlError::Run(format!(
                    "the upstream server of {} refused this node's key ({status})",
                    self.name
                ))),
                // (A 404 is the operator's: a wrong model name or path in --upstream.)
                400 | 422 => Failure::Model(MlError::Input(said)),
                408 | 429 | 500..=599 => Failure::Unavailable(said),
                _ => Failure::Model(MlError::Run(said)),
            });
        }
        let prompt_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut text = String::new();
        // Pieces taken: about a token each, the count that cuts an answer at its budget.
        let mut pieces = 0;
        let mut finish_reason = None;
        let (mut prompt_tokens, mut counted) = (0, None);
        for event in events(response.into_body().into_reader(), MAX_LINE) {
            if stop.load(Ordering::Relaxed) {
                return Err(Failure::Model(MlError::Stopped));
            }
            let event = event.map_err(|e| {
                Failure::Model(MlError::Run(format!(
                    "the upstream server of {}: {}",
                    self.name,
                    clip(&e)
                )))
            })?;
            if let Some(n) = event["usage"]["prompt_tokens"].as_u64() {
                prompt_tokens = n as usize;
            }
            if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
                counted = Some(n.min(params.max_tokens as u64) as usize);
            }
            let Some(choice) = event["choices"].get(0) else {
                continue;
            };
            let piece = match raw {
                Some(_) => choice["text"].as_str(),
                None => choice["delta"]["content"].as_str(),
            };
            if let Some(piece) = piece.filter(|p| !p.is_empty()) {
                // Past the budget (the server sent more than asked): cut here.
                if pieces >= params.max_tokens || text.len() + piece.len() > MAX_TEXT {
                    finish_reason = Some(FinishReason::Length);
                    break;
                }
                text.push_str(piece);
                pieces += 1;
                if !on_text(piece) {
                    return Err(Failure::Model(MlError::Stopped));
                }
            }
            match choice["finish_reason"].as_str() {
                Some("length") => finish_reason = Some(FinishReason::Length),
                Some(_) => finish_reason = Some(FinishReason::Stop),
                // A budget the server chose: cut at ours. (One it was sent, it ends itself,
                // and its finish and usage still come.)
                None if params.fit_context && pieces >= params.max_tokens => {
                    finish_reason = Some(FinishReason::Length);
                    break;
                }
                None => {}
            }
        }
        let Some(finish_reason) = finish_reason else {
            return Err(Failure::Model(MlError::Run(format!(
                "the upstream server of {} ended its stream before the answer's end",
                self.name
            ))));
        };
        Ok(Generation {
            text,
            tokens: Vec::new(),
            prompt_tokens,
            finish_reason,
            prompt_ms,
            waited_ms: 0.0,
            decode_ms: started.elapsed().as_secs_f64() * 1e3 - prompt_ms,
            logprobs: Vec::new(),
            counted: counted.or(Some(pieces)),
        })
    }
}

/// The events of a streamed chat or text completion (server-sent events, up to `[DONE]`),
/// each parsed; an error event, a line longer than `max_line` bytes or a broken stream ends
/// them with the reason.
pub fn events(
    body: impl std::io::Read,
    max_line: u64,
) -> impl Iterator<Item = Result<Value, String>> {
    let mut reader = std::io::BufReader::new(body);
    let mut done = false;
    std::iter::from_fn(move || loop {
        if done {
            return None;
        }
        let mut line = Vec::new();
        let read = std::io::Read::take(&mut reader, max_line + 1).read_until(b'\n', &mut line);
        match read {
            Ok(0) => return None,
            Ok(n) if n as u64 > max_line => {
                done = true;
                return Some(Err(format!(
                    "a line of the stream is over {max_line} bytes"
                )));
            }
            Ok(_) => {}
            Err(e) => {
                done = true;
                return Some(Err(format!("the stream broke off: {e}")));
            }
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end();
        if let Some(error) = line.strip_prefix("error:") {
            done = true;
            return Some(Err(format!("generation failed: {}", error.trim())));
        }
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            return None;
        }
        let event = match serde_json::from_str::<Value>(data) {
            Ok(event) => event,
            Err(e) => {
                done = true;
                return Some(Err(format!("the stream sent invalid JSON: {e}")));
            }
        };
        let message = match event["object"].as_str() {
            Some("error") => event["message"].as_str(),
            _ => event["error"]["message"].as_str(),
        };
        if let Some(message) = message {
            done = true;
            return Some(Err(format!("generation failed: {message}")));
        }
        return Some(Ok(event));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_what_is_expected() {
        let up = Upstream::parse("llama=http://127.0.0.1:8080/v1/#llama-3").unwrap();
        assert_eq!(
            (up.name.as_str(), up.base.as_str(), up.model.as_str()),
            ("llama", "http://127.0.0.1:8080/v1", "llama-3")
        );
        assert_eq!(Upstream::parse("m=http://h/v1").unwrap().model, "m");
        assert!(Upstream::parse("no-equals")
            .unwrap_err()
            .contains("NAME=URL"));
        assert!(Upstream::parse("m=https://h/v1")
            .unwrap_err()
            .contains("http://"));
        assert!(Upstream::parse("=http://h/v1").is_err());
        assert_eq!(key_variable("tiny-up.2"), "MYCEL_UPSTREAM_KEY_TINY_UP_2");
        assert!(Upstream::parse("m=http:///v1")
            .unwrap_err()
            .contains("HOST"));
        let with_key = Upstream::parse("m=http://h/v1")
            .unwrap()
            .with_key("sk-secret");
        assert!(
            !format!("{with_key:?}").contains("sk-secret"),
            "never printed"
        );
    }

    #[test]
    fn events_end_at_done_and_stop_at_what_is_wrong() {
        let stream =
            "data: {\"a\":1}\n\n: comment\ndata:{\"a\":2}\ndata: [DONE]\ndata: {\"a\":3}\n";
        let got: Vec<_> = events(stream.as_bytes(), 100).collect();
        assert_eq!(got, vec![Ok(json!({ "a": 1 })), Ok(json!({ "a": 2 }))]);
        let failed: Vec<_> = events(
            "data: {\"error\":{\"message\":\"boom\"}}\ndata: {}\n".as_bytes(),
            100,
        )
        .collect();
        assert_eq!(failed, vec![Err("generation failed: boom".to_owned())]);
        let long = format!("data: \"{}\"\n", "x".repeat(200));
        let too_long: Vec<_> = events(long.as_bytes(), 100).collect();
        assert!(too_long.len() == 1 && too_long[0].as_ref().unwrap_err().contains("over 100"));
        let bad: Vec<_> = events("data: {nope\n".as_bytes(), 100).collect();
        assert!(bad[0].as_ref().unwrap_err().contains("invalid JSON"));
        // The other ways servers say a generation failed.
        for stream in [
            "error: {\"code\": 500}\n",
            "data: {\"object\": \"error\", \"message\": \"boom\"}\n",
        ] {
            let got: Vec<_> = events(stream.as_bytes(), 100).collect();
            assert!(
                got.len() == 1 && got[0].as_ref().unwrap_err().contains("failed"),
                "{got:?}"
            );
        }
    }

    /// A server on loopback that answers one request with `answer` (status line, headers and
    /// body) and closes; the spec of an upstream there.
    fn server(answer: String) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut socket, _) = listener.accept().unwrap();
            let _ = socket.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            // The request: its headers, then as many bytes as their content-length says.
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let text = String::from_utf8_lossy(&request).to_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|n| n.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
                match socket.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = socket.write_all(answer.as_bytes());
        });
        format!("up=http://{addr}/v1")
    }

    fn ask(spec: &str) -> Result<Generation, Failure> {
        let up = Upstream::parse(spec).unwrap().with_key("sk-abcdef123456");
        let chat = [ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        let params = GenerateParams::default();
        let stop = AtomicBool::new(false);
        up.generate(&chat, &params, &Resume::default(), &stop, |_| true)
    }

    #[test]
    fn servers_that_fail_are_told_apart_and_their_messages_not_passed_on_whole() {
        let sse = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                   connection: close\r\n\r\n";
        let piece = |content: &str| {
            format!(
                "data: {}\n\n",
                json!({ "choices": [{ "delta": { "content": content } }] })
            )
        };
        // A stream cut before the answer's end is no answer.
        match ask(&server(format!("{sse}{}", piece("a")))) {
            Err(Failure::Model(MlError::Run(e))) => assert!(e.contains("before the answer"), "{e}"),
            other => panic!("{other:?}"),
        }
        let end = json!({ "choices": [{ "delta": {}, "finish_reason": "stop" }] });
        let usage =
            json!({ "choices": [], "usage": { "prompt_tokens": 3, "completion_tokens": 2 } });
        let whole = format!(
            "{sse}{}data: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n",
            piece("ab")
        );
        let answer = ask(&server(whole)).unwrap();
        assert_eq!(
            (answer.text.as_str(), answer.made(), answer.prompt_tokens),
            ("ab", 2, 3)
        );
        assert_eq!(answer.finish_reason, FinishReason::Stop);
        // Busy, or nobody there: nobody's fault.
        let busy = "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}";
        assert!(matches!(
            ask(&server(busy.into())),
            Err(Failure::Unavailable(_))
        ));
        assert!(matches!(
            ask("up=http://127.0.0.1:9/v1"),
            Err(Failure::Unavailable(_))
        ));
        // A refused key: the server's message, which may quote it, is not passed on.
        let message =
            json!({ "error": { "message": "bad key sk-abcdef123456 given" } }).to_string();
        let refused = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{message}",
            message.len()
        );
        match ask(&server(refused)) {
            Err(Failure::Model(MlError::Run(e))) => {
                assert!(
                    e.contains("refused this node's key") && !e.contains("sk-"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        // A long message is cut.
        assert_eq!(clip(&"x".repeat(500)).chars().count(), MAX_MESSAGE + 1);
    }
}
