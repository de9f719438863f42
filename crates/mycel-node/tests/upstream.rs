//! A model of an OpenAI-compatible server beside a node (`--upstream`), offered to the
//! network: here the server is another Mycel node's API, reached with its token.

mod common;

use common::{addrs_of, local_config, wait_offers};
use mycel_ml::fixtures::write_tiny_llama;
use mycel_node::upstream::Upstream;
use mycel_node::Node;
use serde_json::{json, Value};

fn post(node: &Node, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = common::post(node, path, body.to_string());
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_of_a_server_beside_a_node_is_served_to_the_network() {
    let root = tempfile::tempdir().unwrap();
    write_tiny_llama(&root.path().join("tiny-llama.gguf")).unwrap();
    // The server: a node of its own, not part of the network below.
    let mut config = local_config(&root.path().join("server"), vec![], true);
    config.models = vec![root.path().join("tiny-llama.gguf")];
    let server = Node::start(config).await.unwrap();
    let base = format!("http://{}/v1", server.api_addr.unwrap());

    // The node that offers it, and one that offers a server nobody listens at.
    let mut config = local_config(&root.path().join("host"), vec![], true);
    config.upstreams = vec![
        Upstream::parse(&format!("tiny-up={base}#tiny-llama"))
            .unwrap()
            .with_key(server.token.clone()),
        Upstream::parse("gone=http://127.0.0.1:9/v1").unwrap(),
    ];
    let host = Node::start(config).await.unwrap();
    let mut config = local_config(&root.path().join("gateway"), addrs_of(&host), true);
    // One user's network: a name means the one id announced under it.
    config.router.bindings.trust_announced_names(true);
    let gateway = Node::start(config).await.unwrap();
    wait_offers(&gateway, &[&host]).await;

    let chat = json!({ "model": "tiny-up", "max_tokens": 8, "temperature": 0,
                       "messages": [{ "role": "user", "content": "the cat" }] });
    let (status, via_network) = post(&gateway, "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{via_network}");
    let mut direct = chat.clone();
    direct["model"] = json!("tiny-llama");
    let (status, at_server) = post(&server, "/v1/chat/completions", &direct);
    assert_eq!(status, 200, "{at_server}");
    let text = |body: &Value| body["choices"][0]["message"]["content"].clone();
    assert!(text(&at_server).as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(
        text(&via_network),
        text(&at_server),
        "the server's answer, through a peer"
    );
    assert_eq!(via_network["model"], "tiny-up");
    assert_eq!(
        via_network["usage"]["completion_tokens"], at_server["usage"]["completion_tokens"],
        "the server's count of tokens, though no ids came"
    );
    assert_eq!(
        via_network["choices"][0]["finish_reason"],
        at_server["choices"][0]["finish_reason"]
    );
    // Streamed through the network as the server streams it.
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (status, events) = common::post(&gateway, "/v1/chat/completions", streamed.to_string());
    assert_eq!(status, 200, "{events}");
    let pieces: String = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(json!(pieces), text(&at_server));
    // On the host's own API too, and as a text completion.
    let (status, local) = post(&host, "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{local}");
    assert_eq!(text(&local), text(&at_server));
    let prompt = json!({ "model": "tiny-up", "prompt": "the cat", "max_tokens": 6,
                         "temperature": 0 });
    let (status, completed) = post(&gateway, "/v1/completions", &prompt);
    assert_eq!(status, 200, "{completed}");
    let mut direct = prompt.clone();
    direct["model"] = json!("tiny-llama");
    let (_, completed_at_server) = post(&server, "/v1/completions", &direct);
    assert_eq!(
        completed["choices"][0]["text"],
        completed_at_server["choices"][0]["text"]
    );

    // What an upstream cannot give is refused with the reason.
    let mut scored = chat.clone();
    scored["logprobs"] = json!(true);
    let (status, refused) = post(&gateway, "/v1/chat/completions", &scored);
    assert_eq!(status, 400, "{refused}");
    assert!(refused.to_string().contains("upstream"), "{refused}");
    // A server nobody listens at: a clear error, and the host keeps serving.
    let mut gone = chat.clone();
    gone["model"] = json!("gone");
    let (status, failed) = post(&gateway, "/v1/chat/completions", &gone);
    assert!(status >= 500, "{status}: {failed}");
    assert!(
        failed.to_string().contains("upstream server of gone"),
        "{failed}"
    );
    let (status, again) = post(&gateway, "/v1/chat/completions", &chat);
    assert_eq!((status, text(&again)), (200, text(&at_server)));

    gateway.shutdown().await;
    host.shutdown().await;
    server.shutdown().await;
}
