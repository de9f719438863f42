//! Tasks routed across real nodes on 127.0.0.1: a model only a peer serves is reached through
//! any node's API; a worker that dies mid-generation is replaced by another that continues
//! from the delivered tokens; busy and dead nodes are skipped; a malformed task is refused and
//! costs its sender; a task naming an endless budget gets the worker's limit; a first choice
//! that stalls is hedged after the observed p95; a model nobody announces is run on a provider
//! found in the DHT.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{addrs_of, local_config, wait_offers, wait_until};
use mycel_core::membership::PeerState;
use mycel_core::statement::ModelKind;
use mycel_core::task::{
    Logprob, Refusal, TaskFrame, TaskId, TaskInput, TaskOutput, TaskRequest, TaskResult,
    TokenLogprobs, MAX_FRAME_BYTES, MAX_REQUEST_BYTES,
};
use mycel_ml::fixtures::{write_llama, write_tiny_bert, write_tiny_llama, LlamaShape};
use mycel_ml::{ChatMessage, Engine, GenerateParams};
use mycel_net::task::{read_frame, write_frame};
use mycel_net::{Multiaddr, NetHandle};
use mycel_node::inference::{RouteError, Target};
use mycel_node::models::{load_model, Runner, Served};
use mycel_node::Node;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(20);

fn load(root: &Path, name: &str, write: impl FnOnce(&Path)) -> Served {
    let path = root.join(name);
    write(&path);
    load_model(&path, Engine::Exact).unwrap()
}

fn tiny_bert(root: &Path) -> Served {
    load(root, "tiny-bert", |p| write_tiny_bert(p).unwrap())
}

async fn start(
    root: &Path,
    name: &str,
    bootstrap: Vec<Multiaddr>,
    served: Vec<Served>,
    max_queue: usize,
) -> Node {
    let mut config = local_config(&root.join(name), bootstrap, true);
    config.preloaded = served;
    config.max_queue = max_queue;
    // These networks are one user's, and their tests are about routing: a name means the one
    // id announced under it (how names are bound is the impostors' test's subject).
    config.router.bindings.trust_announced_names(true);
    Node::start(config).await.unwrap()
}

/// The tiny BERT model as `node` resolves it.
async fn bert_target(node: &Node) -> Target {
    node.inference
        .resolve("tiny-bert", ModelKind::Embedding)
        .await
        .unwrap()
}

fn post_json(node: &Node, path: &str, body: Value) -> (u16, String) {
    common::post(node, path, body.to_string())
}

fn user(content: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: content.into(),
    }]
}

/// A model file's chat template is its maker's code: one that would loop for hours (it made
/// a node stop answering its API and its peers, who then declared it dead) fails a peer's
/// request within a bounded time on the worker's blocking pool, and the worker goes on
/// answering, alive to its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_that_loops_fails_a_peers_request_and_the_worker_keeps_answering() {
    let root = tempfile::tempdir().unwrap();
    let bert = tiny_bert(root.path());
    let looping = load(root.path(), "looping.gguf", |p| {
        write_tiny_llama(p).unwrap();
        let lasting = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}\
                       {% endfor %}{% endfor %}";
        mycel_ml::fixtures::replace_chat_template(p, lasting).unwrap();
    });
    // Held to its time limit as well as its fuel.
    let Runner::Generate(generator) = &looping.runner else {
        panic!("a generation model")
    };
    let held = std::time::Instant::now();
    let err =
        mycel_node::models::chat_prompt_within(generator, &user("hi"), Duration::from_millis(1))
            .await
            .unwrap_err()
            .to_string();
    assert!(err.contains("time limit"), "{err}");
    assert!(
        held.elapsed() < Duration::from_secs(1),
        "{:?}",
        held.elapsed()
    );
    let worker = start(root.path(), "w", vec![], vec![looping, bert], 16).await;
    let gateway = start(root.path(), "g", addrs_of(&worker), vec![], 16).await;
    wait_offers(&gateway, &[&worker]).await;
    let started = std::time::Instant::now();
    let (status, body) = post_json(
        &gateway,
        "/v1/chat/completions",
        json!({ "model": "looping", "max_tokens": 2,
                "messages": [{ "role": "user", "content": "hi" }] }),
    );
    assert_eq!(status, 400, "{body}");
    // Out of fuel, or past its time limit on a slow machine (a debug build): counted.
    assert!(
        body.contains("chat template") && (body.contains("fuel") || body.contains("time limit")),
        "{body}"
    );
    let limit = mycel_node::defences::TEMPLATE_LIMIT;
    assert_eq!(worker.inference.defences.total(limit), 1);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the request was held {:?}",
        started.elapsed()
    );
    // The worker answers the next request, and its peer holds it alive.
    let (status, body) = post_json(
        &gateway,
        "/v1/embeddings",
        json!({ "model": "tiny-bert", "input": ["the cat sat"] }),
    );
    assert_eq!(status, 200, "{body}");
    let seen = gateway
        .net
        .peer(worker.net.peer_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.state, PeerState::Alive);
    // The worker's own API templates only what it admitted: with every place in its queue
    // taken, the looping template is never run and the request is refused as busy (it was a
    // 400 from the template when the API templated before admission).
    let held: Vec<_> = std::iter::from_fn(|| {
        worker
            .models
            .admit(mycel_core::queue::Requester::Local)
            .ok()
    })
    .take(1000)
    .collect();
    assert!(
        !held.is_empty() && held.len() < 1000,
        "{} places",
        held.len()
    );
    let (status, body) = post_json(
        &worker,
        "/v1/chat/completions",
        json!({ "model": "looping", "max_tokens": 2,
                "messages": [{ "role": "user", "content": "hi" }] }),
    );
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("chat template"), "{body}");
    drop(held);
    for node in [gateway, worker] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_only_a_peer_serves_is_run_there_through_any_nodes_api() {
    let root = tempfile::tempdir().unwrap();
    let bert = tiny_bert(root.path());
    let llama = load(root.path(), "tiny-llama.gguf", |p| {
        write_tiny_llama(p).unwrap()
    });
    let worker = start(
        root.path(),
        "b",
        vec![],
        vec![bert.clone(), llama.clone()],
        16,
    )
    .await;
    let gateway = start(root.path(), "a", addrs_of(&worker), vec![], 16).await;
    wait_offers(&gateway, &[&worker]).await;

    // Embeddings computed by the peer equal the ones it computes for itself.
    let texts = ["the cat sat", "the dog ran"];
    let (status, body) = post_json(
        &gateway,
        "/v1/embeddings",
        json!({ "model": "tiny-bert", "input": texts }),
    );
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let Runner::Embed(embedder) = &bert.runner else {
        panic!("tiny-bert embeds")
    };
    let (expected, tokens) = embedder.embed(&texts).unwrap();
    for (i, vector) in expected.iter().enumerate() {
        let got: Vec<f32> = serde_json::from_value(body["data"][i]["embedding"].clone()).unwrap();
        let diff = got
            .iter()
            .zip(vector)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-6, "vector {i} differs by {diff}");
    }
    assert_eq!(body["usage"]["prompt_tokens"], tokens);

    // A chat too, plain and streamed, token for token what the worker's model makes.
    let Runner::Generate(generator) = &llama.runner else {
        panic!("a GGUF generates")
    };
    let prompt = generator.chat_prompt(&user("the dog")).unwrap();
    let params = GenerateParams {
        max_tokens: 16,
        ..Default::default()
    };
    let expected = generator.generate(&prompt, &params, |_| true).unwrap();
    let request = json!({ "model": "tiny-llama", "max_tokens": 16, "temperature": 0,
                          "messages": [{ "role": "user", "content": "the dog" }] });
    let (status, body) = post_json(&gateway, "/v1/chat/completions", request.clone());
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], expected.text);
    assert_eq!(body["usage"]["completion_tokens"], expected.tokens.len());
    let mut streaming = request;
    streaming["stream"] = json!(true);
    let (status, events) = post_json(&gateway, "/v1/chat/completions", streaming);
    assert_eq!(status, 200, "{events}");
    let streamed: String = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, expected.text);

    // Input the worker's model cannot take is the caller's error, found by the worker.
    let long = "word ".repeat(2000);
    let (status, body) = post_json(
        &gateway,
        "/v1/embeddings",
        json!({ "model": "tiny-bert", "input": long }),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_json(
        &gateway,
        "/v1/embeddings",
        json!({ "model": "nobody-serves-this", "input": "x" }),
    );
    assert_eq!(status, 404, "{body}");

    gateway.shutdown().await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_whose_worker_dies_resumes_on_the_next_node_without_a_seam() {
    let root = tempfile::tempdir().unwrap();
    // A model slow enough (milliseconds per token) to be caught mid-way.
    let slow = load(root.path(), "slow-llama.gguf", |p| {
        write_llama(p, LlamaShape::SLOW).unwrap()
    });
    let first = start(root.path(), "b", vec![], vec![slow.clone()], 16).await;
    let second = start(root.path(), "c", addrs_of(&first), vec![slow.clone()], 16).await;
    let gateway = start(root.path(), "a", addrs_of(&first), vec![], 16).await;
    wait_offers(&gateway, &[&first, &second]).await;

    let Runner::Generate(generator) = &slow.runner else {
        panic!("a GGUF generates")
    };
    let messages = user("tell me a story");
    // With log-probabilities: those of the tokens the first worker streamed, then the
    // second's, are those of one uninterrupted run.
    let params = GenerateParams {
        max_tokens: 60,
        logprobs: Some(2),
        ..Default::default()
    };
    let prompt = generator.chat_prompt(&messages).unwrap();
    let expected = generator.generate(&prompt, &params, |_| true).unwrap();
    assert_eq!(expected.tokens.len(), 60, "the story runs to max_tokens");
    assert_eq!(expected.logprobs.len(), 60);
    assert!(expected.logprobs.iter().all(|l| l.top.len() == 2));

    let target = gateway
        .inference
        .resolve("slow-llama", ModelKind::Generation)
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::channel(1024);
    let ranking = vec![first.net.peer_id(), second.net.peer_id()];
    let inference = gateway.inference.clone();
    let running = tokio::spawn(async move {
        inference
            .generate_on(&target, messages, params, tx, ranking)
            .await
    });
    let mut streamed = String::new();
    let mut scored = Vec::new();
    for _ in 0..5 {
        let piece = rx.recv().await.expect("the first worker streams");
        streamed.push_str(&piece.text);
        scored.extend(piece.logprobs);
    }
    // The first worker dies mid-stream, as a crash would.
    first.abort();
    while let Some(piece) = rx.recv().await {
        streamed.push_str(&piece.text);
        scored.extend(piece.logprobs);
    }
    let completion = running
        .await
        .unwrap()
        .expect("the task survives its worker");
    assert_eq!(completion.attempts, 2, "resumed on the second node");
    assert_eq!(completion.worker, second.net.peer_id());
    assert_eq!(completion.generation.tokens, expected.tokens);
    assert_eq!(completion.generation.text, expected.text);
    assert_eq!(streamed, expected.text, "nothing lost or repeated");
    // The exact engine's matrix products read a resumed context in one pass, which rounds
    // differently from one token at a time: the numbers agree to float precision, the tokens
    // exactly.
    let got = &completion.generation.logprobs;
    assert_eq!(got.len(), expected.logprobs.len());
    for (got, expected) in got.iter().zip(&expected.logprobs) {
        assert_eq!(got.chosen.token, expected.chosen.token);
        assert!((got.chosen.logprob - expected.chosen.logprob).abs() < 1e-3);
        let tokens = |l: &mycel_core::task::TokenLogprobs| -> Vec<u32> {
            l.top.iter().map(|t| t.token).collect()
        };
        assert_eq!(tokens(got), tokens(expected));
    }
    assert!(
        got.starts_with(&scored) && scored.len() > 5,
        "what was streamed, by both workers, is what the answer holds"
    );
    assert_eq!(
        scored[..5],
        expected.logprobs[..5],
        "the first worker's, before it died, are one uninterrupted run's"
    );

    gateway.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_dead_nodes_are_skipped_and_all_busy_is_overloaded() {
    let root = tempfile::tempdir().unwrap();
    let bert = tiny_bert(root.path());
    let busy = start(root.path(), "busy", vec![], vec![bert.clone()], 1).await;
    let good = start(root.path(), "good", addrs_of(&busy), vec![bert.clone()], 16).await;
    let dead = start(root.path(), "dead", addrs_of(&busy), vec![bert.clone()], 16).await;
    let gateway = start(root.path(), "gateway", addrs_of(&busy), vec![], 16).await;
    wait_offers(&gateway, &[&busy, &good, &dead]).await;
    let dead_id = dead.net.peer_id();
    dead.abort();
    let _held = busy
        .models
        .admit(mycel_core::queue::Requester::Local)
        .expect("the one place");

    let target = bert_target(&gateway).await;
    let texts = vec!["the cat sat".to_owned()];
    let ranking = vec![dead_id, busy.net.peer_id(), good.net.peer_id()];
    let embedded = gateway
        .inference
        .embed_on(&target, texts.clone(), ranking)
        .await
        .expect("the good node answers");
    assert_eq!(embedded.worker, good.net.peer_id());
    assert_eq!(embedded.vectors.len(), 1);

    let only_busy = vec![busy.net.peer_id()];
    assert!(matches!(
        gateway
            .inference
            .embed_on(&target, texts.clone(), only_busy)
            .await,
        Err(RouteError::Busy)
    ));
    // The router's own ranking gets there too, whatever it tries first.
    for _ in 0..5 {
        let embedded = gateway
            .inference
            .embed(&target, texts.clone())
            .await
            .unwrap();
        assert_eq!(embedded.worker, good.net.peer_id());
    }

    gateway.shutdown().await;
    good.shutdown().await;
    busy.shutdown().await;
}

/// A greedy generation task of `model` on `words` words ("cat cat ..."), up to `max_tokens`.
fn greedy_task(
    id: TaskId,
    model: mycel_core::id::ContentId,
    budget_ms: u64,
    words: usize,
    max_tokens: usize,
) -> TaskRequest {
    TaskRequest {
        id,
        model,
        budget_ms,
        input: TaskInput::Generate {
            messages: user(&"cat ".repeat(words)),
            params: GenerateParams {
                max_tokens,
                temperature: Some(0.0),
                ..GenerateParams::default()
            },
            resume: Default::default(),
        },
    }
}

/// A peer's task may name any budget (u64::MAX ms here); the worker works on it for at most
/// its own limit (10 minutes by default, 200 ms here), then refuses it, and serves the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_naming_an_endless_budget_gets_the_workers_limit() {
    let root = tempfile::tempdir().unwrap();
    let llama = load(root.path(), "tiny-llama.gguf", |p| {
        write_tiny_llama(p).unwrap()
    });
    let model = llama.offer.id;
    let mut config = local_config(&root.path().join("worker"), vec![], true);
    config.preloaded = vec![llama];
    config.router.max_task_budget = Duration::from_millis(200);
    let worker = Node::start(config).await.unwrap();
    let sender = start(root.path(), "sender", addrs_of(&worker), vec![], 16).await;
    wait_offers(&sender, &[&worker]).await;
    let task = |words: usize, max_tokens: usize| {
        greedy_task(
            TaskId(max_tokens as u128),
            model,
            u64::MAX,
            words,
            max_tokens,
        )
    };
    let run = |request: TaskRequest| {
        let (sender, worker) = (sender.net.clone(), worker.net.peer_id());
        async move {
            let mut stream = sender.open_task_stream(worker).await.unwrap();
            write_frame(&mut stream, &request).await.unwrap();
            // The streamed pieces, then the last frame.
            loop {
                match read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES).await {
                    Ok(Some(TaskFrame::Chunk { .. })) => continue,
                    Ok(frame) => return frame,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    };
    let started = Instant::now();
    // A prompt of some 1,000 tokens, then greedy decoding: 7 s of work for the tiny model
    // without the limit (measured: 0.14 s of prefill, 6.9 s of decoding), 35 times the limit.
    let answer = run(task(250, 3000)).await;
    let took = started.elapsed();
    assert!(
        matches!(&answer, Some(TaskFrame::Refused(Refusal::Failed(m))) if m.contains("time ran out")),
        "{answer:?}"
    );
    assert!(took < Duration::from_secs(5), "worked on it for {took:?}");
    // The worker serves the next task in full (once the first one's decoding has stopped,
    // at its next token: a loaded machine may take a few tries within the limit).
    let mut answer = None;
    for _ in 0..10 {
        answer = run(task(1, 2)).await;
        if matches!(answer, Some(TaskFrame::Done(_))) {
            break;
        }
    }
    assert!(matches!(answer, Some(TaskFrame::Done(_))), "{answer:?}");
    let spent = mycel_node::defences::TASK_BUDGET_SPENT;
    assert!(worker.inference.defences.total(spent) >= 1);
    for node in [sender, worker] {
        node.shutdown().await;
    }
}

/// One peer gets at most its share of the model queue (half of it): of ten long tasks it sends
/// at once, eight take places and two are refused at once as busy, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_gets_at_most_its_share_of_the_model_queue() {
    let root = tempfile::tempdir().unwrap();
    let llama = load(root.path(), "tiny-llama.gguf", |p| {
        write_tiny_llama(p).unwrap()
    });
    let model = llama.offer.id;
    let worker = start(root.path(), "worker", vec![], vec![llama], 16).await;
    let sender = start(root.path(), "sender", addrs_of(&worker), vec![], 16).await;
    wait_offers(&sender, &[&worker]).await;
    // Ten generations of seconds each, all at once (the worker runs one at a time; the
    // others wait in the queue, holding their places).
    let mut streams = Vec::new();
    for i in 0..10u128 {
        let mut stream = sender
            .net
            .open_task_stream(worker.net.peer_id())
            .await
            .unwrap();
        let request = greedy_task(TaskId(i), model, 60_000, 250, 3000);
        write_frame(&mut stream, &request).await.unwrap();
        streams.push(stream);
    }
    let past_share = mycel_node::defences::MODEL_QUEUE_PAST_SHARE;
    wait_until(
        LIMIT,
        "two of the ten refused past the peer's share",
        || async { worker.inference.defences.total(past_share) >= 2 },
    )
    .await;
    // The sender leaves: its generations stop.
    drop(streams);
    assert_eq!(worker.inference.defences.total(past_share), 2);
    for node in [sender, worker] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_task_is_refused_costs_its_sender_and_the_worker_keeps_serving() {
    let root = tempfile::tempdir().unwrap();
    let bert = tiny_bert(root.path());
    let model = bert.offer.id;
    let worker = start(root.path(), "worker", vec![], vec![bert], 16).await;
    let sender = start(root.path(), "sender", addrs_of(&worker), vec![], 16).await;
    wait_offers(&sender, &[&worker]).await;
    let sender_id = sender.net.peer_id();
    assert_eq!(worker.net.reputation(sender_id).await.unwrap(), 0.0);

    let refused =
        |frame: Option<TaskFrame>| matches!(frame, Some(TaskFrame::Refused(Refusal::Invalid(_))));
    // Bytes that are not a task.
    let mut stream = sender
        .net
        .open_task_stream(worker.net.peer_id())
        .await
        .unwrap();
    futures::AsyncWriteExt::write_all(&mut stream, &[5, 0, 0, 0, 0xff, 0xff, 0x13, 0, 1])
        .await
        .unwrap();
    let answer = read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES)
        .await
        .unwrap();
    assert!(refused(answer));
    let after_garbage = worker.net.reputation(sender_id).await.unwrap();
    assert!(after_garbage < 0.0, "{after_garbage}");

    // A length prefix of 4 GiB: refused before anything is allocated.
    let mut stream = sender
        .net
        .open_task_stream(worker.net.peer_id())
        .await
        .unwrap();
    futures::AsyncWriteExt::write_all(&mut stream, &u32::MAX.to_le_bytes())
        .await
        .unwrap();
    let answer = read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES)
        .await
        .unwrap();
    assert!(refused(answer));

    // A well-formed task breaking the protocol's bounds (no inputs).
    let mut stream = sender
        .net
        .open_task_stream(worker.net.peer_id())
        .await
        .unwrap();
    let empty = TaskRequest {
        id: TaskId(1),
        model,
        budget_ms: 1000,
        input: TaskInput::Embed { texts: vec![] },
    };
    write_frame(&mut stream, &empty).await.unwrap();
    let answer = read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES)
        .await
        .unwrap();
    assert!(refused(answer));
    let after_all = worker.net.reputation(sender_id).await.unwrap();
    assert!(after_all < after_garbage, "{after_all} vs {after_garbage}");

    // The same peer's proper task still runs, signed by the worker.
    let mut stream = sender
        .net
        .open_task_stream(worker.net.peer_id())
        .await
        .unwrap();
    let good = TaskRequest {
        id: TaskId(2),
        model,
        budget_ms: 10_000,
        input: TaskInput::Embed {
            texts: vec!["the cat".into()],
        },
    };
    write_frame(&mut stream, &good).await.unwrap();
    let Some(TaskFrame::Done(result)) = read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES)
        .await
        .unwrap()
    else {
        panic!("the task runs")
    };
    result
        .verify(&worker.net.peer_id(), &good)
        .expect("signed by the worker");
    assert_eq!(result.output.vectors(1).unwrap()[0].len(), 16);
    assert!(result.timings.prefill_ms > 0.0);
    // The stream stays open for the sender's next task.
    let next = TaskRequest {
        id: TaskId(3),
        ..good.clone()
    };
    write_frame(&mut stream, &next).await.unwrap();
    let Some(TaskFrame::Done(result)) = read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES)
        .await
        .unwrap()
    else {
        panic!("a second task runs on the same stream")
    };
    result
        .verify(&worker.net.peer_id(), &next)
        .expect("signed by the worker, for the second task");
    // A malformed task on a kept stream is refused like one on a new stream.
    write_frame(&mut stream, &empty).await.unwrap();
    let answer = read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES)
        .await
        .unwrap();
    assert!(refused(answer));
    assert!(worker.net.reputation(sender_id).await.unwrap() < after_all);

    sender.shutdown().await;
    worker.shutdown().await;
}

/// A peer's next tasks go on the stream its first one used; a kept stream the worker closed
/// meanwhile (here a worker that closes each stream after its answer) is replaced by a new
/// one, and that costs the worker nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_next_task_goes_on_the_kept_stream_and_a_closed_one_is_replaced() {
    let root = tempfile::tempdir().unwrap();
    let bert = tiny_bert(root.path());
    let keeper = start(root.path(), "keeper", vec![], vec![bert.clone()], 16).await;
    let mut config = local_config(&root.path().join("closer"), addrs_of(&keeper), true);
    config.preloaded = vec![bert.clone()];
    config.router.bindings.trust_announced_names(true);
    config.router.next_task_wait = Duration::ZERO;
    let closer = Node::start(config).await.unwrap();
    let gateway = start(root.path(), "gateway", addrs_of(&keeper), vec![], 16).await;
    wait_offers(&gateway, &[&keeper, &closer]).await;
    // The table the router reads without asking the network task holds what its answers
    // showed.
    let listed = |peer: mycel_net::PeerId| {
        let id = peer.to_base58();
        gateway.net.workers_now().iter().any(|p| p.peer_id == id)
    };
    let (keeper_id, closer_id) = (keeper.net.peer_id(), closer.net.peer_id());
    assert!(listed(keeper_id) && listed(closer_id));
    let target = bert_target(&gateway).await;
    let texts = vec!["the cat sat".to_owned()];
    let Runner::Embed(embedder) = &bert.runner else {
        panic!("an embedding model")
    };
    let expected = embedder.embed(&texts).unwrap().0;
    let three_tasks = |worker: mycel_net::PeerId| {
        let (gateway, target, texts, expected) = (&gateway, &target, &texts, &expected);
        async move {
            for _ in 0..3 {
                let embedded = gateway
                    .inference
                    .embed_on(target, texts.clone(), vec![worker])
                    .await
                    .expect("the task runs");
                assert_eq!(embedded.worker, worker);
                assert_eq!(&embedded.vectors, expected);
            }
        }
    };

    let before = gateway.inference.stats();
    three_tasks(keeper.net.peer_id()).await;
    let kept = gateway.inference.stats();
    assert_eq!(
        kept.streams_kept,
        before.streams_kept + 2,
        "the second and third tasks go on the first one's stream"
    );
    assert_eq!(kept.streams_stale, before.streams_stale);

    three_tasks(closer.net.peer_id()).await;
    let after = gateway.inference.stats();
    assert_eq!(
        after.streams_stale,
        kept.streams_stale + 2,
        "each later task found its kept stream closed"
    );
    assert_eq!(after.streams_kept, kept.streams_kept);
    assert_eq!(after.remote, before.remote + 6);
    assert_eq!(after.failovers, before.failovers, "no attempt failed");
    let faults = gateway
        .inference
        .trust_of(&closer.net.peer_id())
        .map_or((0.0, 0.0), |t| (t.failures, t.timeouts));
    assert_eq!(faults, (0.0, 0.0), "nothing counted against the closer");

    // A worker that leaves drops out of that table as the network task learns of it, with
    // nobody asking.
    closer.shutdown().await;
    wait_until(LIMIT, "the table drops the closer", || async {
        !listed(closer_id)
    })
    .await;
    assert!(listed(keeper_id));

    gateway.shutdown().await;
    keeper.shutdown().await;
}

/// A worker that answers a stream's first task and stalls the next one sent on the same stream
/// before it closes the stream: the task fails and the worker pays, as on a new stream (a
/// kept stream closed at once costs the worker nothing, which a stall must not buy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stalls_a_task_on_a_kept_stream_then_closes_it_pays() {
    let root = tempfile::tempdir().unwrap();
    let gateway = start(root.path(), "gateway", vec![], vec![], 16).await;
    let keypair = mycel_core::Keypair::generate_ed25519();
    let fake = common::raw_peer_keyed(keypair.clone(), addrs_of(&gateway)).await;
    let fake_id = fake.peer_id();
    let mut incoming = fake.accept_task_streams().unwrap();
    tokio::spawn(async move {
        while let Some((_, mut stream)) = futures::StreamExt::next(&mut incoming).await {
            let keypair = keypair.clone();
            tokio::spawn(async move {
                let Ok(Some(request)) =
                    read_frame::<TaskRequest>(&mut stream, MAX_REQUEST_BYTES).await
                else {
                    return;
                };
                let output = TaskOutput::embeddings(&[vec![0.5; 16]], 3);
                let result =
                    TaskResult::sign(&keypair, &request, "fake", output, Default::default());
                write_frame(&mut stream, &TaskFrame::Done(Box::new(result)))
                    .await
                    .unwrap();
                if let Ok(Some(_)) = read_frame::<TaskRequest>(&mut stream, MAX_REQUEST_BYTES).await
                {
                    // The misbehaviour under test: a stall well past a stale stream's second.
                    tokio::time::sleep(Duration::from_millis(1_500)).await;
                }
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            });
        }
    });
    wait_until(LIMIT, "the gateway knows the fake worker", || async {
        gateway.net.peer(fake_id).await.unwrap().is_some()
    })
    .await;
    let target = Target::unannounced(
        mycel_core::id::ContentId::of(b"a model"),
        ModelKind::Embedding,
    );
    let texts = vec!["the cat sat".to_owned()];
    let before = gateway.inference.stats();
    let first = gateway
        .inference
        .embed_on(&target, texts.clone(), vec![fake_id])
        .await
        .expect("the first task is answered");
    assert_eq!(first.vectors, vec![vec![0.5; 16]]);
    let second = gateway
        .inference
        .embed_on(&target, texts.clone(), vec![fake_id])
        .await;
    assert!(second.is_err(), "{second:?}");
    let after = gateway.inference.stats();
    assert_eq!(
        after.streams_kept,
        before.streams_kept + 1,
        "sent on the kept stream"
    );
    assert_eq!(
        after.streams_stale, before.streams_stale,
        "not taken for stale"
    );
    assert_eq!(after.failovers, before.failovers + 1);
    let trust = gateway.inference.trust_of(&fake_id).expect("its record");
    assert!(trust.failures > 0.0, "{trust:?}");

    fake.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_answer_does_not_fit_what_the_task_asked_pays_and_the_task_moves_on() {
    let root = tempfile::tempdir().unwrap();
    let llama = load(root.path(), "tiny-llama.gguf", |p| {
        write_tiny_llama(p).unwrap()
    });
    let worker = start(root.path(), "worker", vec![], vec![llama], 16).await;
    let gateway = start(root.path(), "gateway", addrs_of(&worker), vec![], 16).await;
    wait_offers(&gateway, &[&worker]).await;
    let target = gateway
        .inference
        .resolve("tiny-llama", ModelKind::Generation)
        .await
        .unwrap();
    let scored = GenerateParams {
        max_tokens: 6,
        logprobs: Some(0),
        ..Default::default()
    };
    let object = GenerateParams {
        max_tokens: 6,
        format: Some(mycel_core::grammar::Shape::AnyObject),
        ..Default::default()
    };
    let chunk = |logprobs| TaskFrame::Chunk {
        text: "xy".into(),
        tokens: vec![5, 6],
        logprobs,
    };
    let one = TokenLogprobs {
        chosen: Logprob {
            token: 5,
            bytes: vec![b'x'],
            logprob: -0.5,
        },
        top: Vec::new(),
    };
    // What a fake worker sends, each round a new one: a chunk of two tokens with one
    // log-probability; a signed answer "xy" with none, though the task asks for them; the
    // same for a task that asks for a JSON object; a chunk "xy" for one; a heartbeat (a
    // chunk of nothing) and then a refusal that would excuse it, had it not begun.
    let heartbeat = TaskFrame::Chunk {
        text: String::new(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
    };
    let excuse = TaskFrame::Refused(Refusal::Unavailable("my server is down".into()));
    // Text past what 6 tokens can be, with no token ids to count.
    let flood = TaskFrame::Chunk {
        text: "x".repeat(6 * mycel_core::task::MAX_TOKEN_BYTES + 1),
        tokens: Vec::new(),
        logprobs: Vec::new(),
    };
    let rounds = [
        (scored.clone(), Some(vec![chunk(vec![one])])),
        (scored, None),
        (object.clone(), None),
        (object, Some(vec![chunk(Vec::new())])),
        (
            GenerateParams {
                max_tokens: 6,
                ..Default::default()
            },
            Some(vec![heartbeat, excuse]),
        ),
        (
            GenerateParams {
                max_tokens: 6,
                ..Default::default()
            },
            Some(vec![flood]),
        ),
    ];
    for (round, (params, sent)) in rounds.into_iter().enumerate() {
        let keypair = mycel_core::Keypair::generate_ed25519();
        let fake = common::raw_peer_keyed(keypair.clone(), addrs_of(&gateway)).await;
        let fake_id = fake.peer_id();
        let mut incoming = fake.accept_task_streams().unwrap();
        let (read, mut reads) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((_, mut stream)) = futures::StreamExt::next(&mut incoming).await {
                let Ok(Some(request)) =
                    read_frame::<TaskRequest>(&mut stream, MAX_REQUEST_BYTES).await
                else {
                    continue;
                };
                let _ = read.send(());
                let frames = sent.clone().unwrap_or_else(|| {
                    let output = TaskOutput::Generation {
                        text: "xy".into(),
                        tokens: vec![5, 6],
                        prompt_tokens: 3,
                        finish_reason: mycel_ml::FinishReason::Stop,
                        logprobs: Vec::new(),
                        counted: None,
                    };
                    let result =
                        TaskResult::sign(&keypair, &request, "fake", output, Default::default());
                    vec![TaskFrame::Done(Box::new(result))]
                });
                for frame in &frames {
                    let _ = write_frame(&mut stream, frame).await;
                }
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            }
        });
        wait_until(LIMIT, "the gateway knows the fake worker", || async {
            gateway.net.peer(fake_id).await.unwrap().is_some()
        })
        .await;
        let (tx, mut rx) = mpsc::channel(64);
        let ranking = vec![fake_id, worker.net.peer_id()];
        let completion = gateway
            .inference
            .generate_on(&target, user("hello"), params.clone(), tx, ranking)
            .await
            .expect("the honest worker answers");
        assert!(
            reads.try_recv().is_ok(),
            "round {round}: the fake got the task"
        );
        let mut streamed = String::new();
        while let Ok(piece) = rx.try_recv() {
            streamed.push_str(&piece.text);
        }
        assert_eq!(completion.worker, worker.net.peer_id(), "round {round}");
        assert_eq!(completion.attempts, 2);
        assert_eq!(
            streamed, completion.generation.text,
            "round {round}: nothing of the fake's shown"
        );
        let logprobs = &completion.generation.logprobs;
        if params.format.is_some() {
            let object = mycel_core::grammar::Grammar::new(&mycel_core::grammar::Shape::AnyObject);
            let begun = completion.generation.text.as_bytes();
            assert!(object.unwrap().begins(begun), "{completion:?}");
            assert!(logprobs.is_empty());
        } else if params.logprobs.is_some() {
            assert_eq!(logprobs.len(), completion.generation.tokens.len());
        } else {
            assert!(logprobs.is_empty());
        }
        assert!(logprobs
            .iter()
            .zip(&completion.generation.tokens)
            .all(|(l, t)| l.chosen.token == *t && l.top.is_empty()));
        let trust = gateway.inference.trust_of(&fake_id).expect("its record");
        assert!(trust.failures > 0.0, "round {round}: {trust:?}");
        fake.shutdown().await;
    }

    worker.shutdown().await;
    gateway.shutdown().await;
}

/// A real libp2p peer that accepts task streams, reads each request, reports its id and
/// never answers: a worker stuck behind something else.
async fn staller(bootstrap: Vec<Multiaddr>) -> (NetHandle, mpsc::UnboundedReceiver<TaskId>) {
    let net = common::raw_peer(bootstrap).await;
    let mut incoming = net.accept_task_streams().unwrap();
    let (seen, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((_, mut stream)) = futures::StreamExt::next(&mut incoming).await {
            if let Ok(Some(request)) =
                read_frame::<TaskRequest>(&mut stream, MAX_REQUEST_BYTES).await
            {
                let _ = seen.send(request.id);
            }
            held.push(stream);
        }
    });
    (net, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_first_choice_is_hedged_after_the_observed_p95() {
    let root = tempfile::tempdir().unwrap();
    let bert = tiny_bert(root.path());
    let worker = start(root.path(), "worker", vec![], vec![bert], 16).await;
    let gateway = start(root.path(), "gateway", addrs_of(&worker), vec![], 16).await;
    let (stuck, mut received) = staller(addrs_of(&gateway)).await;
    wait_offers(&gateway, &[&worker]).await;
    let target = bert_target(&gateway).await;
    let texts = vec!["the cat sat".to_owned()];

    // The router learns what an embedding takes here (a p95 needs 20 samples).
    for _ in 0..25 {
        gateway
            .inference
            .embed_on(&target, texts.clone(), vec![worker.net.peer_id()])
            .await
            .unwrap();
    }
    let before = gateway.inference.stats();
    assert_eq!(before.hedges, 0);

    let started = Instant::now();
    let embedded = gateway
        .inference
        .embed_on(
            &target,
            texts.clone(),
            vec![stuck.peer_id(), worker.net.peer_id()],
        )
        .await
        .expect("the hedge answers");
    let elapsed = started.elapsed();
    assert_eq!(embedded.worker, worker.net.peer_id());
    // The stalled peer did get the task: the second attempt was a hedge, not a failover.
    let stalled = tokio::time::timeout(LIMIT, received.recv()).await.unwrap();
    assert!(stalled.is_some());
    let after = gateway.inference.stats();
    assert_eq!(after.hedges, before.hedges + 1);
    assert_eq!(after.failovers, before.failovers);
    // Far sooner than the attempt timeout that a failover would have waited for.
    let timeout = mycel_node::inference::RouterConfig::default().attempt_timeout;
    assert!(elapsed < timeout / 2, "{elapsed:?}");

    stuck.shutdown().await;
    gateway.shutdown().await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_nobody_announces_runs_on_a_provider_found_in_the_dht() {
    let root = tempfile::tempdir().unwrap();
    let bert = tiny_bert(root.path());
    let model = bert.offer.id;
    let first = start(root.path(), "first", vec![], vec![], 16).await;
    let worker = start(
        root.path(),
        "worker",
        addrs_of(&first),
        vec![bert.clone()],
        16,
    )
    .await;
    let gateway = start(root.path(), "gateway", addrs_of(&first), vec![], 16).await;
    let worker_id = worker.net.peer_id();
    wait_until(LIMIT, "the DHT lists the worker as a provider", || async {
        gateway
            .net
            .find_providers(model)
            .await
            .unwrap()
            .contains(&worker_id)
    })
    .await;

    // The model by content id, with no announcing peer to start from: the candidates come
    // from the DHT, and the task runs there.
    let target = Target::unannounced(model, ModelKind::Embedding);
    let before = gateway.inference.stats();
    let texts = vec!["the cat sat".to_owned(), "a dog".to_owned()];
    let embedded = gateway
        .inference
        .embed(&target, texts.clone())
        .await
        .expect("a provider runs it");
    assert_eq!(embedded.worker, worker_id);
    let Runner::Embed(embedder) = &bert.runner else {
        panic!("an embedding model")
    };
    assert_eq!(embedded.vectors, embedder.embed(&texts).unwrap().0);
    assert_eq!(gateway.inference.stats().remote, before.remote + 1);

    // An id that nobody provides: a clear refusal, not a hang.
    let unknown = Target::unannounced(
        mycel_core::id::ContentId::of(b"nothing"),
        ModelKind::Embedding,
    );
    assert!(matches!(
        gateway.inference.embed(&unknown, texts).await,
        Err(RouteError::Unavailable(_))
    ));

    gateway.shutdown().await;
    worker.shutdown().await;
    first.shutdown().await;
}

/// Keys are free: two impostors announcing their own model under an honest model's name do
/// not capture the name. By default a name nothing trusted binds means nothing, and the
/// request is refused with both ids listed (ambiguous, when the node trusts announcements); a
/// node that bound the name to the honest id, or trusts the honest worker's operator, gets the
/// honest model however many announce the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostors_announcing_a_name_cannot_capture_it() {
    let root = tempfile::tempdir().unwrap();
    for dir in ["honest", "impostor"] {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    let honest = load(root.path(), "honest/tiny.gguf", |p| {
        write_tiny_llama(p).unwrap()
    });
    let impostor = load(root.path(), "impostor/tiny.gguf", |p| {
        write_llama(
            p,
            LlamaShape {
                layers: 1,
                ..LlamaShape::TINY
            },
        )
        .unwrap()
    });
    let (honest_id, impostor_id) = (honest.offer.id, impostor.offer.id);
    assert_ne!(honest_id, impostor_id);
    assert_eq!(
        honest.offer.name, impostor.offer.name,
        "one name, two models"
    );
    // The honest worker's operator vouches for it.
    let mut config = local_config(&root.path().join("h"), vec![], true);
    config.preloaded = vec![honest];
    config.max_queue = 16;
    config.operator_key = Some(root.path().join("operator.key"));
    let worker = Node::start(config).await.unwrap();
    let mut impostors = Vec::new();
    for name in ["x1", "x2"] {
        impostors.push(
            start(
                root.path(),
                name,
                addrs_of(&worker),
                vec![impostor.clone()],
                16,
            )
            .await,
        );
    }
    // By default: the name is bound to nothing this node trusts, and the error lists what is
    // announced and how to trust it.
    let asker = Node::start(local_config(
        &root.path().join("a"),
        addrs_of(&worker),
        true,
    ))
    .await
    .unwrap();
    wait_offers(&asker, &[&worker, &impostors[0], &impostors[1]]).await;
    match asker.inference.resolve("tiny", ModelKind::Generation).await {
        Err(RouteError::UnboundModel(message)) => {
            assert!(
                message.contains(&honest_id.to_string())
                    && message.contains(&impostor_id.to_string())
                    && message.contains("--trust-operator"),
                "{message}"
            );
        }
        other => panic!("an unbound name resolved: {:?}", other.map(|t| t.offer.id)),
    }
    let unbound = mycel_node::defences::MODEL_NAME_UNBOUND;
    assert_eq!(asker.inference.defences.total(unbound), 1);
    // Trusting announcements: still not captured, ambiguous.
    let mut config = local_config(&root.path().join("o"), addrs_of(&worker), true);
    config.router.bindings.trust_announced_names(true);
    let open = Node::start(config).await.unwrap();
    wait_offers(&open, &[&worker, &impostors[0], &impostors[1]]).await;
    match open.inference.resolve("tiny", ModelKind::Generation).await {
        Err(RouteError::AmbiguousModel(message)) => {
            assert!(
                message.contains(&honest_id.to_string())
                    && message.contains(&impostor_id.to_string()),
                "{message}"
            );
        }
        other => panic!(
            "the name must be ambiguous: {:?}",
            other.map(|t| t.offer.id)
        ),
    }
    let ambiguous = mycel_node::defences::MODEL_NAME_AMBIGUOUS;
    assert_eq!(open.inference.defences.total(ambiguous), 1);
    assert_eq!(open.inference.defences.total(unbound), 0);
    open.shutdown().await;
    let (status, body) = post_json(
        &asker,
        "/v1/chat/completions",
        json!({ "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2 }),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("model_unbound") && body.contains(&honest_id.to_string()),
        "{body}"
    );
    // By id, no binding is needed.
    let by_id = asker
        .inference
        .resolve(&honest_id.to_string(), ModelKind::Generation)
        .await
        .unwrap();
    assert_eq!(by_id.offer.id, honest_id);
    // /v1/models lists what a request may name: the content ids here, the name where it is
    // bound (below).
    let listed_as = |node: &Node, id: mycel_core::id::ContentId| {
        let url = format!("http://{}/v1/models", node.api_addr.unwrap());
        let (status, body) = common::http_get(&url, Some(&node.token));
        assert_eq!(status, 200, "{body}");
        let models: Value = serde_json::from_str(&body).unwrap();
        let entry = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mycel"]["content_id"] == id.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed: {models}"));
        assert_eq!(entry["mycel"]["name"], "tiny");
        entry["id"].as_str().unwrap().to_owned()
    };
    assert_eq!(listed_as(&asker, honest_id), honest_id.to_string());
    assert_eq!(listed_as(&asker, impostor_id), impostor_id.to_string());

    // A node that bound the name to the honest id.
    let mut config = local_config(&root.path().join("b"), addrs_of(&worker), true);
    config
        .router
        .bindings
        .bind_spec(&format!("tiny={honest_id}"))
        .unwrap();
    let bound = Node::start(config).await.unwrap();
    wait_offers(&bound, &[&worker, &impostors[0], &impostors[1]]).await;
    let target = bound
        .inference
        .resolve("tiny", ModelKind::Generation)
        .await
        .unwrap();
    assert_eq!(
        target.offer.id, honest_id,
        "two impostors, one honest server"
    );
    assert_eq!(listed_as(&bound, honest_id), "tiny");
    assert_eq!(listed_as(&bound, impostor_id), impostor_id.to_string());
    let (status, body) = post_json(
        &bound,
        "/v1/chat/completions",
        json!({ "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2 }),
    );
    assert_eq!(status, 200, "{body}");

    // A node that trusts the honest worker's operator: the name its nodes announce is a
    // record signed (through the operator's word for the node) by a key it trusts.
    let operator: mycel_net::PeerId = bound
        .net
        .peer(worker.net.peer_id())
        .await
        .unwrap()
        .and_then(|p| p.operator)
        .expect("the worker's operator is announced")
        .parse()
        .unwrap();
    let mut trusting = local_config(&root.path().join("t"), addrs_of(&worker), true);
    trusting.router.bindings.trust_operator(operator);
    // A node of the honest worker's own operator trusts its names without being told.
    let mut sibling = local_config(&root.path().join("s"), addrs_of(&worker), true);
    sibling.operator_key = Some(root.path().join("operator.key"));
    for (config, what) in [
        (trusting, "the trusted operator's name"),
        (sibling, "its own operator's name"),
    ] {
        let node = Node::start(config).await.unwrap();
        wait_offers(&node, &[&worker, &impostors[0], &impostors[1]]).await;
        let target = node
            .inference
            .resolve("tiny", ModelKind::Generation)
            .await
            .unwrap();
        assert_eq!(target.offer.id, honest_id, "{what}");
        node.shutdown().await;
    }
}

/// Made-up keys announcing an honest model's id under an engine of their own do not draw its
/// requests by outnumbering the honest server: a node prefers its own engine when a peer
/// offers the id with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_engines_announced_for_an_honest_id_do_not_draw_its_requests() {
    use mycel_core::statement::{
        Announcement, Capabilities, ModelOffer, SignedStatement, Statement,
    };
    let root = tempfile::tempdir().unwrap();
    let honest = load(root.path(), "tiny.gguf", |p| write_tiny_llama(p).unwrap());
    let (id, engine) = (honest.offer.id, honest.offer.engine.clone());
    let worker = start(root.path(), "w", vec![], vec![honest], 16).await;
    let mut config = local_config(&root.path().join("a"), addrs_of(&worker), true);
    config.engine = Engine::Exact;
    let asker = Node::start(config).await.unwrap();
    wait_offers(&asker, &[&worker]).await;
    // Five keys announce the same id run by "fast-engine", relayed by the worker.
    let now = mycel_net::now_ms();
    let mut fakes = Vec::new();
    for _ in 0..5 {
        let key = mycel_core::Keypair::generate_ed25519();
        fakes.push(key.public().to_peer_id());
        let statement = SignedStatement::sign(
            &key,
            &Statement::Announce(Announcement {
                seq: 1,
                issued_at: now,
                expires_at: now + 60_000,
                capabilities: Capabilities {
                    models: vec![ModelOffer {
                        id,
                        name: "tiny".into(),
                        kind: ModelKind::Generation,
                        engine: "fast-engine".into(),
                    }],
                    ..Default::default()
                },
                addrs: Vec::new(),
                reachability: Default::default(),
                relay: false,
                operator: None,
                full: false,
            }),
        );
        worker.net.publish_raw(statement.to_bytes()).await.unwrap();
    }
    wait_until(LIMIT, "the asker holds the made-up offers", || async {
        let peers = asker.net.peers().await.unwrap();
        fakes.iter().all(|f| {
            peers
                .iter()
                .any(|p| p.peer_id == f.to_base58() && p.state == PeerState::Alive)
        })
    })
    .await;
    let target = asker
        .inference
        .resolve(&id.to_string(), ModelKind::Generation)
        .await
        .unwrap();
    assert_eq!(
        target.offer.engine, engine,
        "five made-up announcers, one honest"
    );
    let (status, body) = post_json(
        &asker,
        "/v1/chat/completions",
        json!({ "model": id.to_string(), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2 }),
    );
    assert_eq!(status, 200, "{body}");
}
