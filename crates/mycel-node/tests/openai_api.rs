//! The OpenAI-compatible API of a real node serving tiny models: shapes, streaming, bad input
//! answered with OpenAI-style 4xx errors (the node keeps serving), and the official `openai`
//! Python package driving it.

mod common;

use std::time::Duration;

use common::local_config;
use mycel_ml::fixtures::{write_tiny_bert, write_tiny_llama};
use mycel_node::Node;
use serde_json::{json, Value};

async fn tiny_node(root: &std::path::Path) -> Node {
    tiny_node_with_queue(root, mycel_node::models::DEFAULT_MAX_QUEUE).await
}

async fn tiny_node_with_queue(root: &std::path::Path, max_queue: usize) -> Node {
    write_tiny_bert(&root.join("tiny-bert")).unwrap();
    write_tiny_llama(&root.join("tiny-llama.gguf")).unwrap();
    let mut config = local_config(&root.join("node"), vec![], true);
    config.models = vec![root.join("tiny-bert"), root.join("tiny-llama.gguf")];
    config.max_queue = max_queue;
    Node::start(config).await.unwrap()
}

/// POSTs `body` (raw) and returns the status and the body.
fn post(node: &Node, path: &str, body: &str, token: Option<&str>) -> (u16, String) {
    let url = format!("http://{}{path}", node.api_addr.unwrap());
    let mut request = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build();
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request
        .header("Content-Type", "application/json")
        .send(body)
        .expect("API reachable");
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// POSTs `body` with `stream: true` and returns its events, checking the stream ends with
/// `[DONE]`.
fn events(node: &Node, path: &str, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let (status, events) = post(node, path, &body.to_string(), Some(&node.token));
    assert_eq!(status, 200, "{events}");
    let lines: Vec<&str> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(lines.last(), Some(&"[DONE]"));
    lines[..lines.len() - 1]
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn post_json(node: &Node, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = post(node, path, &body.to_string(), Some(&node.token));
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_shapes_for_models_embeddings_and_chat() {
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node(root.path()).await;

    let url = format!("http://{}/v1/models", node.api_addr.unwrap());
    let mut response = ureq::get(&url)
        .header("Authorization", &format!("Bearer {}", node.token))
        .call()
        .unwrap();
    let models: Value =
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"tiny-bert") && names.contains(&"tiny-llama"),
        "{names:?}"
    );

    let (status, body) = post_json(
        &node,
        "/v1/embeddings",
        json!({ "model": "tiny-bert", "input": ["the cat sat", "the dog ran"] }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 16);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() >= 4);

    // Greedy chat is deterministic; the response has OpenAI's shape.
    let request = json!({
        "model": "tiny-llama",
        "messages": [{ "role": "user", "content": "the cat" }],
        "temperature": 0,
        "max_tokens": 8,
    });
    let (status, first) = post_json(&node, "/v1/chat/completions", request.clone());
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    let text = first["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, second) = post_json(&node, "/v1/chat/completions", request.clone());
    assert_eq!(second["choices"][0]["message"]["content"], text.as_str());
    let completion = first["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion));

    // Streaming: chunks that add up to the same text, then [DONE].
    let mut streamed = String::new();
    let mut finish = None;
    for chunk in events(&node, "/v1/chat/completions", &request) {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(piece);
        }
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    assert_eq!(streamed, text);
    assert!(matches!(finish.as_deref(), Some("stop" | "length")));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_completions_continue_the_prompt_as_it_is() {
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node(root.path()).await;
    // What the model makes of the prompt itself, no chat template around it.
    let generator = mycel_ml::Generator::load(
        &root.path().join("tiny-llama.gguf"),
        mycel_ml::Engine::default(),
    )
    .unwrap();
    let params = mycel_ml::GenerateParams {
        max_tokens: 8,
        temperature: Some(0.0),
        top_p: None,
        seed: 0,
        stop: Vec::new(),
        fit_context: false,
        logprobs: None,
        format: None,
    };
    let expected = generator.generate("the cat", &params, |_| true).unwrap();
    let request = json!({ "model": "tiny-llama", "prompt": "the cat", "max_tokens": 8,
                          "temperature": 0 });
    let (status, body) = post_json(&node, "/v1/completions", request.clone());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], expected.text.as_str());
    assert_eq!(
        body["usage"]["prompt_tokens"].as_u64(),
        Some(expected.prompt_tokens as u64)
    );
    // Streamed: pieces of text that add up to the same, then [DONE].
    let mut streamed = String::new();
    let mut finish = None;
    for chunk in events(&node, "/v1/completions", &request) {
        assert_eq!(chunk["object"], "text_completion", "{chunk}");
        streamed.push_str(chunk["choices"][0]["text"].as_str().unwrap());
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    assert_eq!(streamed, expected.text);
    assert!(matches!(finish.as_deref(), Some("stop" | "length")));
    // Verified like a chat.
    let mut checked = request.clone();
    checked["mycel"] = json!({ "verify": "replicate", "replicas": 1 });
    let (status, body) = post_json(&node, "/v1/completions", checked);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], expected.text.as_str());
    assert_eq!(body["mycel"]["verified"], true, "{body}");
    // The whole response checks against its certificate, and with its text changed it does
    // not.
    let (status, answer) = post_json(&node, "/api/verify", body.clone());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["valid"], true, "{answer}");
    // A second choice beside the certified one does not pass as certified.
    let mut padded = body.clone();
    let extra = json!({ "index": 1, "text": "made up", "finish_reason": "stop" });
    padded["choices"].as_array_mut().unwrap().push(extra);
    let (status, answer) = post_json(&node, "/api/verify", padded);
    assert_eq!(status, 422, "{answer}");
    let mut altered = body.clone();
    altered["choices"][0]["text"] = json!(format!("{}!", expected.text));
    let (status, answer) = post_json(&node, "/api/verify", altered);
    assert_eq!(status, 422, "{answer}");
    // What it does not do is refused by name, never ignored.
    for (field, value) in [
        ("echo", json!(true)),
        ("suffix", json!("end")),
        ("logprobs", json!(6)),
        ("best_of", json!(3)),
        ("presence_penalty", json!(0.5)),
        ("prompt", json!(["one", "two"])),
        ("prompt", json!([1, 2, 3])),
    ] {
        let mut bad = request.clone();
        bad[field] = value;
        let (status, body) = post_json(&node, "/v1/completions", bad);
        assert_eq!(status, 400, "{field}: {body}");
        assert_eq!(body["error"]["param"], field, "{body}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_choices_each_decode_with_their_own_seed_whole_or_streamed() {
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node(root.path()).await;
    let request = json!({ "model": "tiny-llama", "max_tokens": 6, "temperature": 1.5,
                          "seed": 40, "n": 3,
                          "messages": [{ "role": "user", "content": "the dog" }] });
    let (status, body) = post_json(&node, "/v1/chat/completions", request.clone());
    assert_eq!(status, 200, "{body}");
    let texts: Vec<String> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, choice)| {
            assert_eq!(choice["index"], i, "{body}");
            choice["message"]["content"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(texts.len(), 3);
    // Choice i is what one choice with seed 40 + i makes.
    let mut made = 0;
    for (i, text) in texts.iter().enumerate() {
        let mut one = request.clone();
        one["n"] = json!(1);
        one["seed"] = json!(40 + i);
        let (_, single) = post_json(&node, "/v1/chat/completions", one);
        assert_eq!(single["choices"][0]["message"]["content"], text.as_str());
        made += single["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(body["usage"]["completion_tokens"].as_u64(), Some(made));
    // Streamed: each choice's pieces, tagged by index, add up to the same texts.
    let mut streamed = vec![String::new(); 3];
    let mut finished = 0;
    for chunk in events(&node, "/v1/chat/completions", &request) {
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().unwrap() as usize;
        if let Some(piece) = choice["delta"]["content"].as_str() {
            streamed[index].push_str(piece);
        }
        if choice["finish_reason"].is_string() {
            finished += 1;
        }
    }
    assert_eq!(streamed, texts);
    assert_eq!(finished, 3);
    // Too many, or several verified: refused by name.
    for bad in [
        json!({ "n": 9 }),
        json!({ "n": 2, "mycel": { "verify": "replicate", "replicas": 1 } }),
    ] {
        let mut request = request.clone();
        for (k, v) in bad.as_object().unwrap() {
            request[k] = v.clone();
        }
        let (status, body) = post_json(&node, "/v1/chat/completions", request);
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "n", "{body}");
    }
    node.shutdown().await;
}

/// The text the `bytes` of `entries` spell, and each entry's `token` checked against them.
fn spelled(entries: &[Value]) -> String {
    let mut bytes = Vec::new();
    for entry in entries {
        let own: Vec<u8> = serde_json::from_value(entry["bytes"].clone()).unwrap();
        assert_eq!(entry["token"], String::from_utf8_lossy(&own).as_ref());
        bytes.extend(own);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_probabilities_come_per_token_whole_and_streamed_for_chats_and_completions() {
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node(root.path()).await;
    let request = json!({ "model": "tiny-llama", "max_tokens": 8, "temperature": 0,
                          "logprobs": true, "top_logprobs": 2,
                          "messages": [{ "role": "user", "content": "the cat" }] });
    let (status, body) = post_json(&node, "/v1/chat/completions", request.clone());
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        body["usage"]["completion_tokens"].as_u64().unwrap(),
        "one per token: {body}"
    );
    assert_eq!(
        spelled(content),
        choice["message"]["content"].as_str().unwrap()
    );
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{entry}");
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0, "{entry}");
        // Greedy: the chosen token is the most likely.
        assert_eq!(top[0]["token"], entry["token"]);
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        assert!(top[1]["logprob"].as_f64().unwrap() <= logprob);
    }
    // Streamed: the same entries, spread over the pieces.
    let mut streamed = Vec::new();
    let mut text = String::new();
    for chunk in events(&node, "/v1/chat/completions", &request) {
        let choice = &chunk["choices"][0];
        text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if let Some(entries) = choice["logprobs"]["content"].as_array() {
            streamed.extend(entries.iter().cloned());
        }
    }
    assert_eq!(text, choice["message"]["content"].as_str().unwrap());
    assert_eq!(&streamed, content);
    // Not asked: none.
    let mut plain = request.clone();
    plain.as_object_mut().unwrap().remove("logprobs");
    plain.as_object_mut().unwrap().remove("top_logprobs");
    let (_, body) = post_json(&node, "/v1/chat/completions", plain);
    assert!(body["choices"][0]["logprobs"].is_null(), "{body}");

    // A text completion's columns, offsets counted from the end of the prompt.
    let request = json!({ "model": "tiny-llama", "prompt": "the cat", "max_tokens": 6,
                          "temperature": 0, "logprobs": 2 });
    let (status, body) = post_json(&node, "/v1/completions", request.clone());
    assert_eq!(status, 200, "{body}");
    let logprobs = &body["choices"][0]["logprobs"];
    let tokens: Vec<String> = serde_json::from_value(logprobs["tokens"].clone()).unwrap();
    assert_eq!(
        tokens.concat(),
        body["choices"][0]["text"].as_str().unwrap()
    );
    let made = body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(tokens.len(), made);
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), made);
    let offsets: Vec<usize> = serde_json::from_value(logprobs["text_offset"].clone()).unwrap();
    let mut at = "the cat".len();
    for (token, offset) in tokens.iter().zip(&offsets) {
        assert_eq!(*offset, at);
        at += token.chars().count();
    }
    for top in logprobs["top_logprobs"].as_array().unwrap() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
    }
    let mut columns = json!({ "tokens": [], "token_logprobs": [], "top_logprobs": [],
                              "text_offset": [] });
    for chunk in events(&node, "/v1/completions", &request) {
        let part = &chunk["choices"][0]["logprobs"];
        if part.is_null() {
            continue;
        }
        for column in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let items = part[column].as_array().unwrap().clone();
            columns[column].as_array_mut().unwrap().extend(items);
        }
    }
    assert_eq!(&columns, logprobs, "streamed columns add up to the whole");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_format_holds_the_answer_whole_and_streamed() {
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node(root.path()).await;
    let schema = json!({ "type": "object", "additionalProperties": false,
        "required": ["ok", "n", "mood"],
        "properties": { "mood": { "enum": ["calm", "cross"] }, "n": { "type": "integer" },
                        "ok": { "type": "boolean" } } });
    let request = json!({ "model": "tiny-llama", "max_tokens": 200, "temperature": 0,
        "messages": [{ "role": "user", "content": "the cat" }],
        "response_format": { "type": "json_schema",
                             "json_schema": { "name": "answer", "strict": true, "schema": schema } } });
    let (status, body) = post_json(&node, "/v1/chat/completions", request.clone());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    let answer: Value = serde_json::from_str(content).unwrap();
    let keys: Vec<&String> = answer.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "{content}");
    assert!(
        answer["ok"].is_boolean() && answer["n"].is_i64(),
        "{content}"
    );
    assert!(["calm", "cross"].contains(&answer["mood"].as_str().unwrap()));
    let at = |key: &str| content.find(&format!("\"{key}\"")).unwrap();
    assert!(
        at("ok") < at("n") && at("n") < at("mood"),
        "in the order required lists: {content}"
    );
    // Streamed: the same text in pieces.
    let mut streamed = String::new();
    for chunk in events(&node, "/v1/chat/completions", &request) {
        streamed.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
    }
    assert_eq!(streamed, content);
    // Any object.
    let mut object = request.clone();
    object["response_format"] = json!({ "type": "json_object" });
    object["max_tokens"] = json!(300);
    let (status, body) = post_json(&node, "/v1/chat/completions", object);
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.trim_start().starts_with('{'), "{content}");
    if body["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(content).unwrap().is_object());
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_refused_with_the_reason_the_model_gives() {
    let root = tempfile::tempdir().unwrap();
    write_tiny_llama(&root.path().join("tiny-llama.gguf")).unwrap();
    // The same model with a chat template that reads `tools`.
    let path = root.path().join("tool-llama.gguf");
    write_tiny_llama(&path).unwrap();
    let reads_tools = "{% if tools %}{{ tools }}{% endif %}{% for m in messages %}<|im_start|>\
                       {{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    mycel_ml::fixtures::replace_chat_template(&path, reads_tools).unwrap();
    let mut config = local_config(&root.path().join("node"), vec![], true);
    config.models = vec![root.path().join("tiny-llama.gguf"), path];
    let node = Node::start(config).await.unwrap();
    let tools = json!([{ "type": "function",
                         "function": { "name": "f", "parameters": { "type": "object" } } }]);
    for (model, why) in [
        ("tiny-llama", "has no tool support"),
        ("tool-llama", "not supported by this node yet"),
    ] {
        let request = json!({ "model": model, "tools": tools, "tool_choice": "auto",
                              "messages": [{ "role": "user", "content": "hi" }] });
        let (status, body) = post_json(&node, "/v1/chat/completions", request);
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "tools", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(why) && message.contains(model),
            "{message}"
        );
    }
    // The model with tools in its template still chats without them.
    let (status, body) = post_json(
        &node,
        "/v1/chat/completions",
        json!({ "model": "tool-llama", "max_tokens": 4,
                "messages": [{ "role": "user", "content": "hi" }] }),
    );
    assert_eq!(status, 200, "{body}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_node_keeps_serving() {
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node(root.path()).await;
    let chat = |extra: Value| {
        let mut body = json!({
            "model": "tiny-llama",
            "messages": [{ "role": "user", "content": "hi" }],
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            chat(json!({ "model": "nope" })),
            404,
            "model",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "max_tokens": 0 })),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "max_tokens": 100000000 })),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "messages": [] })),
            400,
            "messages",
        ),
        // A parameter it does not implement, or does not know, is refused by name; one at
        // the value that asks for nothing passes (below).
        (
            "/v1/chat/completions",
            chat(json!({ "frequency_penalty": 0.5 })),
            400,
            "frequency_penalty",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "reasoning_effort": "high" })),
            400,
            "reasoning_effort",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "temprature": 0.5 })),
            400,
            "temprature",
        ),
        // A text completion's role is not a chat's: no way around the chat template.
        (
            "/v1/chat/completions",
            chat(json!({ "messages": [{ "role": "raw", "content": "hi" }] })),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "temperature": "hot" })),
            400,
            "temperature",
        ),
        ("/v1/chat/completions", chat(json!({ "n": 0 })), 400, "n"),
        // What the node does not do is refused by name, never ignored.
        (
            "/v1/chat/completions",
            chat(json!({ "tools": [{ "type": "function",
                                      "function": { "name": "f", "parameters": {} } }] })),
            400,
            "tools",
        ),
        (
            "/v1/chat/completions",
            chat(
                json!({ "response_format": { "type": "json_schema", "json_schema": {
                "name": "s", "schema": { "type": "string", "pattern": "a+" } } } }),
            ),
            400,
            "pattern",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "response_format": { "type": "json_schema",
                                               "json_schema": { "name": "s" } } })),
            400,
            "response_format",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "top_logprobs": 2 })),
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "logprobs": true, "top_logprobs": 21 })),
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "logprobs": true,
                          "mycel": { "verify": "replicate", "replicas": 1 } })),
            400,
            "logprobs",
        ),
        (
            "/v1/embeddings",
            json!({ "model": "tiny-bert", "input": [] }),
            400,
            "empty",
        ),
        (
            "/v1/embeddings",
            json!({ "model": "tiny-bert", "input": [1, 2] }),
            400,
            "input",
        ),
        (
            "/v1/embeddings",
            json!({ "model": "tiny-bert", "input": "cat ".repeat(40) }),
            400,
            "tokens",
        ),
        (
            "/v1/embeddings",
            json!({ "model": "tiny-llama", "input": "x" }),
            404,
            "model",
        ),
    ];
    for (path, body, status, mentions) in cases {
        let (got, answer) = post_json(&node, path, body.clone());
        assert_eq!(got, status, "{body} -> {answer}");
        let error = &answer["error"];
        assert!(error["type"].is_string(), "{answer}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(mentions) || error["param"] == mentions,
            "{body}: {message}"
        );
    }
    let (status, answer) = post(
        &node,
        "/v1/chat/completions",
        "{not json",
        Some(&node.token),
    );
    assert_eq!(status, 400);
    assert!(answer.contains("not valid JSON"), "{answer}");
    let (status, _) = post(&node, "/v1/embeddings", "{}", None);
    assert_eq!(status, 401);

    // Still serving.
    let (status, body) = post_json(
        &node,
        "/v1/embeddings",
        json!({ "model": "tiny-bert", "input": "the cat" }),
    );
    assert_eq!(status, 200, "{body}");
    // Those fields at their do-nothing values, as some clients send them, are fine.
    let (status, body) = post_json(
        &node,
        "/v1/chat/completions",
        chat(
            json!({ "tools": [], "response_format": { "type": "text" }, "logprobs": false,
                     "tool_choice": "none", "max_tokens": 2, "frequency_penalty": 0,
                     "presence_penalty": 0.0, "logit_bias": {}, "user": "u-1",
                     "metadata": { "k": "v" }, "modalities": ["text"] }),
        ),
    );
    assert_eq!(status, 200, "{body}");
    node.shutdown().await;
}

/// The prompt is templated and counted by the node that runs the task, after admission: a
/// prompt that leaves little of the context gets an answer that fits when max_tokens is not
/// given, and a 400 before any stream when an explicit max_tokens does not fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_near_the_end_of_the_context_fits_a_default_budget_and_refuses_a_larger_one() {
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node(root.path()).await;
    let chat = |words: usize, max_tokens: Option<usize>, stream: bool| {
        let mut body = json!({
            "model": "tiny-llama",
            "messages": [{ "role": "user", "content": "cat ".repeat(words) }],
            "temperature": 0,
            "stream": stream,
        });
        if let Some(n) = max_tokens {
            body["max_tokens"] = json!(n);
        }
        body
    };
    // The context of the tiny model (candle's quantised llama) is 4,096 tokens; a budget of
    // all of it never fits, and the refusal counts the prompt without running it.
    let context = 4096;
    let prompt_tokens = |words| {
        let (status, answer) = post_json(
            &node,
            "/v1/chat/completions",
            chat(words, Some(context), false),
        );
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        let counted = message
            .strip_prefix("the prompt has ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok());
        counted.unwrap_or_else(|| panic!("{message}"))
    };
    let (small, large) = (prompt_tokens(64), prompt_tokens(128));
    let per_word = (large - small) / 64;
    assert!(per_word >= 1, "{small} {large}");
    let words = 128 + (context - 6 - large) / per_word;
    let used = prompt_tokens(words);
    assert!(
        used < context && context - used <= 6 + per_word,
        "{used} tokens"
    );
    let left = context - used;

    let (status, answer) = post_json(&node, "/v1/chat/completions", chat(words, None, false));
    assert_eq!(status, 200, "{answer}");
    let completion = answer["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!((1..=left).contains(&completion), "{completion} of {left}");
    for stream in [false, true] {
        let (status, answer) = post_json(
            &node,
            "/v1/chat/completions",
            chat(words, Some(left + 1), stream),
        );
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("max_tokens"), "{message}");
    }
    node.shutdown().await;
}

/// A full queue refuses at once with 503; once the client holding the only place hangs up,
/// the node serves again (that generation stops early: see the unit test in models.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_serves_again_when_the_client_leaves() {
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node_with_queue(root.path(), 1).await;
    let url = format!("http://{}/v1/chat/completions", node.api_addr.unwrap());

    // The only place taken: refused at once. (Held directly: a sampled generation of the
    // tiny model may end at any token, and with it its hold on the place.)
    let held = node
        .models
        .admit(mycel_core::queue::Requester::Local)
        .expect("the one place");
    let started = std::time::Instant::now();
    let (status, answer) = post_json(
        &node,
        "/v1/chat/completions",
        json!({ "model": "tiny-llama", "messages": [{ "role": "user", "content": "hi" }] }),
    );
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "overloaded");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    drop(held);

    // A client that takes the place with a long stream and hangs up gives it back.
    let long = json!({
        "model": "tiny-llama",
        "messages": [{ "role": "user", "content": "the cat" }],
        "max_tokens": 4000,
        "temperature": 1.0,
        "stream": true,
    });
    let token = node.token.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let response = ureq::post(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .send(long.to_string())
            .unwrap();
        let mut reader = std::io::BufReader::new(response.into_body().into_reader());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(line.starts_with("data: "), "{line}");
        reader
    })
    .await
    .unwrap();

    // Hang up: the place comes back.
    drop(reader);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = post_json(
            &node,
            "/v1/embeddings",
            json!({ "model": "tiny-bert", "input": "the cat" }),
        );
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await;
}

/// The official `openai` package (from PyPI) against a running node. Needs a Python with it
/// installed: `bash scripts/setup-test-python.sh` makes .cache/venv; CI sets
/// MYCEL_REQUIRE_OPENAI=1 so that its absence fails instead of skipping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_against_a_node() {
    let python = std::env::var_os("MYCEL_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../.cache/venv/bin/python")
        });
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        mycel_ml::fixtures::skip_unless_required(
            "the_official_openai_client_works_against_a_node",
            "MYCEL_REQUIRE_OPENAI",
            &format!(
                "no Python with the openai package at {} (run `bash scripts/setup-test-python.sh`)",
                python.display()
            ),
        );
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let node = tiny_node(root.path()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(script)
            .env(
                "OPENAI_BASE_URL",
                format!("http://{}/v1", node.api_addr.unwrap()),
            )
            .env("OPENAI_API_KEY", &node.token)
            .output(),
    )
    .await
    .expect("the client finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("ALL OK"), "{stdout}\n{stderr}");
    node.shutdown().await;
}
