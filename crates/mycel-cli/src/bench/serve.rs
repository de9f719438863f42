//! `mycel bench serve`: many chat users at once against one node serving a GGUF, beside
//! llama.cpp's `llama-server --parallel N` on the same file, level by level, interleaved.
//!
//! At each concurrency N, N clients send the requests between them (each waits for its
//! answer before sending the next), streamed, at temperature 0 with the same distinct
//! prompts for both servers. Our node starts with N slots, llama-server with `--parallel N`
//! and a context of [`CONTEXT_PER_SLOT`] per slot; each is warmed up with a few requests first
//! and stopped after its level, so they never run at once. Reported per level: aggregate
//! generated tokens per second (all tokens over the level's wall time), request latency p50
//! and p99, time to the first token p50. With `--embeddings DIR`, one-sentence embedding
//! requests instead, our node embedding requests at once together beside the same node
//! taking them one at a time. With `--upstream`, each level also runs llama-server behind a
//! node that offers it as an upstream model (`mycel node --upstream`), the clients asking
//! the node: what the node's hop costs against asking llama-server directly.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use mycel_node::{Node, NodeConfig};
use serde_json::{json, Value};

#[derive(Args)]
pub(crate) struct ServeBenchArgs {
    /// The GGUF both servers serve.
    #[arg(
        long,
        default_value = ".cache/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// llama.cpp's llama-server, to run beside ours (`scripts/build-llama-bench.sh --server`
    /// builds it); without it only ours runs.
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Requests per level (at least one per client).
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Tokens per answer, at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Rounds over the levels (each level of each server once per round).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// One JSON object per level and round on stdout.
    #[arg(long)]
    json: bool,
    /// A system message of about this many words in every request, the same for all (0:
    /// none): what prefix caching saves. llama-server keeps each slot's last prompt too.
    #[arg(long, default_value_t = 0)]
    system_words: usize,
    /// Our node's `--prefix-cache-mib` (default: the node's default; 0 keeps no prefixes).
    #[arg(long)]
    prefix_cache_mib: Option<usize>,
    /// Instead of chat: embedding requests of one sentence each against this embedding model
    /// (a directory such as .cache/models/all-minilm-l6-v2), our node embedding the requests
    /// that arrive at once together, beside the same node taking them one at a time.
    #[arg(long, value_name = "DIR")]
    embeddings: Option<PathBuf>,
    /// Also run llama-server behind a node that offers it as an upstream model, the clients
    /// asking the node (needs --llama-server).
    #[arg(long, requires = "llama_server")]
    upstream: bool,
}

/// `--embeddings`: at each level, n clients send the level's one-sentence requests between
/// them to a fresh node that embeds requests together, and to one that takes them one at a
/// time (as nodes did before), one after the other.
async fn embeddings(args: &ServeBenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        dir.join("model.safetensors").is_file(),
        "no embedding model in {}: run `bash scripts/fetch-models.sh` or pass another",
        dir.display()
    );
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = tempfile::tempdir()?;
    eprintln!(
        "{:>5} {:>3} {:>10} {:>10} {:>7} {:>9} {:>9}",
        "round", "N", "req/s", "alone", "ratio", "p50 ms", "alone p50"
    );
    for round in 0..args.rounds {
        for &n in &args.concurrency {
            let requests = args.requests.max(n);
            let mut levels = Vec::new();
            for together in [true, false] {
                let dir_n = root.path().join(format!("e{round}-{n}-{together}"));
                let mut config = serving(&dir_n, dir, n)?;
                config.embed_together = together;
                let node = Node::start(config).await?;
                let url = format!("http://{}/v1/embeddings", node.api_addr.expect("API on"));
                let auth = format!("Bearer {}", node.token);
                let model = name.clone();
                let level = tokio::task::spawn_blocking(move || {
                    drive_embeddings(&url, &auth, &model, n.min(2), 8)?;
                    drive_embeddings(&url, &auth, &model, n, requests)
                })
                .await??;
                node.shutdown().await;
                levels.push(level);
            }
            let rate = |l: &Level| l.latencies_ms.len() as f64 / l.wall.as_secs_f64();
            let (ours, alone) = (&levels[0], &levels[1]);
            eprintln!(
                "{:>5} {:>3} {:>10.1} {:>10.1} {:>7.2} {:>9.1} {:>9.1}",
                round + 1,
                n,
                rate(ours),
                rate(alone),
                rate(ours) / rate(alone),
                super::quantile(&ours.latencies_ms, 0.5),
                super::quantile(&alone.latencies_ms, 0.5),
            );
            if args.json {
                super::emit_json(json!({
                    "round": round + 1,
                    "task": "embeddings",
                    "concurrency": n,
                    "requests": requests,
                    "model": name,
                    "req_per_s": rate(ours),
                    "alone_req_per_s": rate(alone),
                    "ratio": rate(ours) / rate(alone),
                    "p50_ms": super::quantile(&ours.latencies_ms, 0.5),
                    "p99_ms": super::quantile(&ours.latencies_ms, 0.99),
                    "alone_p50_ms": super::quantile(&alone.latencies_ms, 0.5),
                    "alone_p99_ms": super::quantile(&alone.latencies_ms, 0.99),
                    "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
                }));
            }
        }
    }
    Ok(())
}

/// `requests` one-sentence embedding requests from `clients` clients at once against `url`.
fn drive_embeddings(
    url: &str,
    auth: &str,
    model: &str,
    clients: usize,
    requests: usize,
) -> anyhow::Result<Level> {
    let (wall, results) = clients_at_once(clients, requests, |agent, i| {
        let body = json!({
            "model": model,
            "input": format!("Request {i} asks for a short story about {}.", TOPICS[i % TOPICS.len()]),
        });
        let sent = Instant::now();
        let mut response = agent
            .post(url)
            .header("Authorization", auth)
            .send_json(&body)
            .context("sending an embedding request")?;
        let status = response.status().as_u16();
        let reply: Value = response
            .body_mut()
            .read_json()
            .context("an embedding reply")?;
        anyhow::ensure!(
            status == 200 && reply["data"].as_array().is_some_and(|d| d.len() == 1),
            "embedding request {i}: HTTP {status}: {reply}"
        );
        Ok(sent.elapsed().as_secs_f64() * 1e3)
    })?;
    let mut latencies_ms = results;
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Level {
        tokens: 0,
        wall,
        latencies_ms,
        ttft_ms: Vec::new(),
    })
}

/// Request `0..requests` sent by `clients` clients at once (each with its own connection,
/// waiting for an answer before its next request) through `send`: the wall time and every
/// request's result.
fn clients_at_once<T: Send>(
    clients: usize,
    requests: usize,
    send: impl Fn(&ureq::Agent, usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<(Duration, Vec<T>)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<anyhow::Result<Vec<T>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(300)))
                        .build()
                        .into();
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= requests {
                            return Ok(done);
                        }
                        done.push(send(&agent, i)?);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread"))
            .collect()
    });
    let wall = started.elapsed();
    let mut all = Vec::with_capacity(requests);
    for client in results {
        all.extend(client?);
    }
    Ok((wall, all))
}

/// A system message of `words` words (none for 0), the same every time.
fn system_message(words: usize) -> String {
    const RULES: [&str; 6] = [
        "You are a careful storyteller for a library's reading club.",
        "Write in plain words that a child of ten can follow.",
        "Give every story a beginning, a middle and an end.",
        "Name at least one person and one place in each story.",
        "Never use lists, headings or quotation marks.",
        "Keep every sentence short and end on a calm note.",
    ];
    RULES
        .iter()
        .cycle()
        .flat_map(|rule| rule.split(' '))
        .take(words)
        .collect::<Vec<_>>()
        .join(" ")
}

/// llama-server's context per slot (`-c` is shared among its slots).
const CONTEXT_PER_SLOT: usize = 1024;

const TOPICS: [&str; 16] = [
    "the sea",
    "a lighthouse keeper",
    "bread",
    "an old map",
    "the first snow",
    "a lost key",
    "trains at night",
    "a small robot",
    "the moon",
    "a garden",
    "a library",
    "rain in the city",
    "a mountain village",
    "a clockmaker",
    "the desert",
    "a river",
];

/// What one level measured on one server.
struct Level {
    tokens: usize,
    wall: Duration,
    latencies_ms: Vec<f64>,
    ttft_ms: Vec<f64>,
}

impl Level {
    fn agg_tok_per_s(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }
}

/// One streamed chat completion: (tokens, latency ms, time to first token ms).
fn one_request(
    agent: &ureq::Agent,
    url: &str,
    auth: Option<&str>,
    body: &Value,
) -> anyhow::Result<(usize, f64, f64)> {
    let started = Instant::now();
    let mut request = agent.post(url);
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    let mut response = request.send_json(body).context("sending a chat request")?;
    let status = response.status().as_u16();
    anyhow::ensure!(
        status == 200,
        "{url} answered {status}: {}",
        response.body_mut().read_to_string().unwrap_or_default()
    );
    let (mut first, mut chunks, mut usage) = (None, 0usize, None);
    for event in crate::client::chat_events(response.body_mut().as_reader()) {
        let event = event?;
        if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
            usage = Some(n as usize);
        }
        let content = event["choices"][0]["delta"]["content"].as_str();
        if content.is_some_and(|c| !c.is_empty()) {
            chunks += 1;
            first.get_or_insert_with(|| started.elapsed());
        }
    }
    let latency = started.elapsed();
    let first = first.unwrap_or(latency);
    Ok((
        usage.unwrap_or(chunks),
        latency.as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3,
    ))
}

/// `requests` requests from `clients` clients at once against `url`.
fn drive(
    url: &str,
    auth: Option<&str>,
    model: &str,
    (clients, requests, max_tokens): (usize, usize, usize),
    system: &str,
) -> anyhow::Result<Level> {
    let (wall, results) = clients_at_once(clients, requests, |agent, i| {
        let user = json!({
            "role": "user",
            "content": format!("Write a short story about {}.", TOPICS[i % TOPICS.len()]),
        });
        let messages = match system {
            "" => vec![user],
            system => vec![json!({"role": "system", "content": system}), user],
        };
        let body = json!({
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        one_request(agent, url, auth, &body)
    })?;
    let mut level = Level {
        tokens: 0,
        wall,
        latencies_ms: Vec::new(),
        ttft_ms: Vec::new(),
    };
    for (tokens, latency, first) in results {
        level.tokens += tokens;
        level.latencies_ms.push(latency);
        level.ttft_ms.push(first);
    }
    level.latencies_ms.sort_by(f64::total_cmp);
    level.ttft_ms.sort_by(f64::total_cmp);
    Ok(level)
}

/// A node in `dir` serving `model` on 127.0.0.1 with its API, queueing enough for `clients`
/// clients at once.
fn serving(
    dir: &std::path::Path,
    model: &std::path::Path,
    clients: usize,
) -> anyhow::Result<NodeConfig> {
    let mut config = NodeConfig::new(dir.to_path_buf());
    config.mdns = false;
    config.api = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.models = vec![model.to_path_buf()];
    config.max_queue = mycel_node::models::DEFAULT_MAX_QUEUE.max(2 * clients);
    Ok(config)
}

/// Our node serving `args.model` with `slots` slots, its chat URL and token.
async fn our_node(
    args: &ServeBenchArgs,
    slots: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Node> {
    let mut config = serving(dir, &args.model, slots)?;
    let defaults = mycel_ml::BatchLimits::default();
    config.batch = mycel_ml::BatchLimits {
        slots,
        prefix_bytes: args
            .prefix_cache_mib
            .map_or(defaults.prefix_bytes, |mib| mib << 20),
        ..defaults
    };
    Node::start(config).await
}

struct LlamaServer(Child);

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// llama-server on `model` with `parallel` slots; waits until it answers /health.
fn llama_server(
    bin: &std::path::Path,
    model: &std::path::Path,
    parallel: usize,
) -> anyhow::Result<(LlamaServer, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--parallel", &parallel.to_string()])
        .args(["-c", &(CONTEXT_PER_SLOT * parallel).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(super::node_stderr())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let server = LlamaServer(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let healthy = ureq::get(&format!("{base}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200);
        if healthy {
            return Ok((server, base));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "llama-server did not become healthy within 120 s (MYCEL_BENCH_NODE_LOG=1 shows its log)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// llama-server with `n` slots behind a node that offers it as an upstream model, driven
/// through the node's API like the others.
async fn through_upstream(
    args: &ServeBenchArgs,
    bin: &std::path::Path,
    n: usize,
    requests: usize,
    dir: &std::path::Path,
    system: &str,
) -> anyhow::Result<Level> {
    let (bin, model_path) = (bin.to_path_buf(), args.model.clone());
    let (server, base) =
        tokio::task::spawn_blocking(move || llama_server(&bin, &model_path, n)).await??;
    let mut config = NodeConfig::new(dir.to_path_buf());
    config.mdns = false;
    config.api = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.max_queue = mycel_node::models::DEFAULT_MAX_QUEUE.max(2 * n);
    config.upstreams = vec![
        mycel_node::upstream::Upstream::parse(&format!("upstream={base}/v1"))
            .map_err(anyhow::Error::msg)?,
    ];
    let node = Node::start(config).await?;
    let url = format!(
        "http://{}/v1/chat/completions",
        node.api_addr.expect("API on")
    );
    let auth = format!("Bearer {}", node.token);
    let (max_tokens, system) = (args.max_tokens, system.to_owned());
    let level = tokio::task::spawn_blocking(move || {
        drive(
            &url,
            Some(&auth),
            "upstream",
            (n.min(2), 2, max_tokens),
            &system,
        )?;
        drive(
            &url,
            Some(&auth),
            "upstream",
            (n, requests, max_tokens),
            &system,
        )
    })
    .await?;
    node.shutdown().await;
    drop(server);
    level
}

pub(crate) async fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.concurrency.iter().all(|n| *n > 0),
        "--concurrency levels must be at least 1"
    );
    if let Some(dir) = &args.embeddings {
        return embeddings(&args, dir).await;
    }
    anyhow::ensure!(
        args.model.is_file(),
        "no GGUF at {}: run `bash scripts/fetch-models.sh` or pass --model",
        args.model.display()
    );
    let llama_build = match &args.llama_server {
        Some(bin) => Some(super::inference::llama_build(bin)?),
        None => None,
    };
    let root = tempfile::tempdir()?;
    let name = mycel_ml::files::model_name(&args.model);
    eprintln!(
        "{:>5} {:>3} {:>11} {:>11} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "round",
        "N",
        "ours tok/s",
        "llama tok/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "ttft p50",
        "llama p50"
    );
    let system = system_message(args.system_words);
    for round in 0..args.rounds {
        // Our single-stream rate this round, once measured.
        let mut single = None;
        for &n in &args.concurrency {
            let requests = args.requests.max(n);
            // Ours: a fresh node with n slots, warmed up, then the level.
            let dir = root.path().join(format!("node-{round}-{n}"));
            let node = our_node(&args, n, &dir).await?;
            let url = format!(
                "http://{}/v1/chat/completions",
                node.api_addr.expect("API on")
            );
            let auth = format!("Bearer {}", node.token);
            let (model, max_tokens, prompt) = (name.clone(), args.max_tokens, system.clone());
            let ours = tokio::task::spawn_blocking(move || {
                drive(
                    &url,
                    Some(&auth),
                    &model,
                    (n.min(2), 2, max_tokens),
                    &prompt,
                )?;
                drive(
                    &url,
                    Some(&auth),
                    &model,
                    (n, requests, max_tokens),
                    &prompt,
                )
            })
            .await??;
            node.shutdown().await;
            // Theirs, the same way.
            let llama = match &args.llama_server {
                Some(bin) => {
                    let (bin, model_path, model, max_tokens, system) = (
                        bin.clone(),
                        args.model.clone(),
                        name.clone(),
                        args.max_tokens,
                        system.clone(),
                    );
                    Some(
                        tokio::task::spawn_blocking(move || -> anyhow::Result<Level> {
                            let (_server, base) = llama_server(&bin, &model_path, n)?;
                            let url = format!("{base}/v1/chat/completions");
                            drive(&url, None, &model, (n.min(2), 2, max_tokens), &system)?;
                            drive(&url, None, &model, (n, requests, max_tokens), &system)
                        })
                        .await??,
                    )
                }
                None => None,
            };
            // llama-server again, behind a node that offers it as an upstream model.
            let upstream = match (&args.llama_server, args.upstream) {
                (Some(bin), true) => {
                    let dir = root.path().join(format!("upstream-{round}-{n}"));
                    Some(through_upstream(&args, bin, n, requests, &dir, &system).await?)
                }
                _ => None,
            };
            if n == 1 {
                single = Some(ours.agg_tok_per_s());
            }
            let ratio = llama
                .as_ref()
                .map(|l| ours.agg_tok_per_s() / l.agg_tok_per_s());
            eprintln!(
                "{:>5} {:>3} {:>11.1} {:>11} {:>7} {:>9.0} {:>9.0} {:>9.0} {:>9}",
                round + 1,
                n,
                ours.agg_tok_per_s(),
                llama
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:.1}", l.agg_tok_per_s())),
                ratio.map_or("-".into(), |r| format!("{r:.2}")),
                super::quantile(&ours.latencies_ms, 0.5),
                super::quantile(&ours.latencies_ms, 0.99),
                super::quantile(&ours.ttft_ms, 0.5),
                llama.as_ref().map_or("-".into(), |l| format!(
                    "{:.0}",
                    super::quantile(&l.latencies_ms, 0.5)
                )),
            );
            if let (Some(u), Some(l)) = (&upstream, &llama) {
                eprintln!(
                    "{:>9} llama-server behind a node: {:.1} tok/s ({:.2}x direct), p50 {:.0} ms",
                    "",
                    u.agg_tok_per_s(),
                    u.agg_tok_per_s() / l.agg_tok_per_s(),
                    super::quantile(&u.latencies_ms, 0.5)
                );
            }
            if args.json {
                super::emit_json(json!({
                    "round": round + 1,
                    "concurrency": n,
                    "requests": requests,
                    "max_tokens": args.max_tokens,
                    "system_words": args.system_words,
                    "prefix_cache_mib": args.prefix_cache_mib,
                    "model": name,
                    "agg_tok_per_s": ours.agg_tok_per_s(),
                    "tokens": ours.tokens,
                    "p50_ms": super::quantile(&ours.latencies_ms, 0.5),
                    "p99_ms": super::quantile(&ours.latencies_ms, 0.99),
                    "ttft_p50_ms": super::quantile(&ours.ttft_ms, 0.5),
                    "vs_single": single.map(|s| ours.agg_tok_per_s() / s),
                    "llama_agg_tok_per_s": llama.as_ref().map(Level::agg_tok_per_s),
                    "llama_tokens": llama.as_ref().map(|l| l.tokens),
                    "llama_p50_ms": llama.as_ref().map(|l| super::quantile(&l.latencies_ms, 0.5)),
                    "llama_p99_ms": llama.as_ref().map(|l| super::quantile(&l.latencies_ms, 0.99)),
                    "llama_ttft_p50_ms": llama.as_ref().map(|l| super::quantile(&l.ttft_ms, 0.5)),
                    "ratio": ratio,
                    "upstream_agg_tok_per_s": upstream.as_ref().map(Level::agg_tok_per_s),
                    "upstream_tokens": upstream.as_ref().map(|l| l.tokens),
                    "upstream_p50_ms": upstream.as_ref().map(|l| super::quantile(&l.latencies_ms, 0.5)),
                    "upstream_ttft_p50_ms": upstream.as_ref().map(|l| super::quantile(&l.ttft_ms, 0.5)),
                    "upstream_ratio": upstream.as_ref().zip(llama.as_ref()).map(|(u, l)| u.agg_tok_per_s() / l.agg_tok_per_s()),
                    "llama_build": llama_build,
                    "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
                }));
            }
        }
    }
    Ok(())
}
