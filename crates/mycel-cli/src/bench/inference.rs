//! `mycel bench inference`: the reference models on this machine — embedding throughput
//! (all-MiniLM-L6-v2, batch 32) side by side with sentence-transformers when a Python that has
//! it is given, and SmolLM2-135M prompt processing and decoding on both engines.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use mycel_ml::{ChatMessage, Embedder, Engine, GenerateParams, Generator};
use serde_json::json;

#[derive(Args)]
pub(crate) struct InferenceBenchArgs {
    /// Where the reference models are (`bash scripts/fetch-models.sh`).
    #[arg(long, default_value = ".cache/models")]
    models: PathBuf,
    /// Sentences embedded per pass.
    #[arg(long, default_value_t = 256)]
    sentences: usize,
    /// Timed passes (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// A Python with sentence-transformers, to time it on the same sentences in the same run.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Tokens decoded per generation run.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Single-sentence tasks timed for the routing overhead (locally and from a peer).
    #[arg(long, default_value_t = 300)]
    overhead_tasks: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Two nodes on loopback, the second serving MiniLM: the same one-sentence embedding task run
/// by the serving node's router locally and by the other node's router on it, interleaved.
/// Returns the medians (local, remote) in milliseconds.
async fn routing_overhead(minilm: &std::path::Path, tasks: usize) -> anyhow::Result<(f64, f64)> {
    use libp2p::multiaddr::Protocol;
    use mycel_core::statement::ModelKind;
    use mycel_node::{Node, NodeConfig};

    let path = minilm.to_path_buf();
    let served =
        tokio::task::spawn_blocking(move || mycel_node::models::load_model(&path, Engine::Exact))
            .await??;
    let root = tempfile::tempdir()?;
    let config = |name: &str, bootstrap: Vec<libp2p::Multiaddr>| {
        let mut config = NodeConfig::new(root.path().join(name));
        config.api = None;
        config.mdns = false;
        config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")];
        config.bootstrap = bootstrap;
        config
    };
    let mut worker_config = config("worker", vec![]);
    worker_config.preloaded = vec![served];
    let worker = Node::start(worker_config).await?;
    let worker_id = worker.net.peer_id();
    let bootstrap = worker
        .net
        .listen_addrs()
        .iter()
        .map(|a| a.clone().with(Protocol::P2p(worker_id)))
        .collect();
    let requester = Node::start(config("requester", bootstrap)).await?;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let remote_target = loop {
        if let Ok(target) = requester
            .inference
            .resolve("all-minilm-l6-v2", ModelKind::Embedding)
            .await
        {
            break target;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the requester never learned the worker's model"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let local_target = worker
        .inference
        .resolve("all-minilm-l6-v2", ModelKind::Embedding)
        .await?;
    let text = vec!["The old fisherman carefully repaired the broken wooden bridge.".to_owned()];
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for i in 0..tasks + 20 {
        let started = Instant::now();
        let done = worker.inference.embed(&local_target, text.clone()).await?;
        let local_ms = started.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(done.worker == worker_id, "the local task ran elsewhere");
        let started = Instant::now();
        let done = requester
            .inference
            .embed(&remote_target, text.clone())
            .await?;
        let remote_ms = started.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(done.worker == worker_id, "the remote task ran elsewhere");
        // The first tasks warm up connections and caches.
        if i >= 20 {
            local.push(local_ms);
            remote.push(remote_ms);
        }
    }
    requester.shutdown().await;
    worker.shutdown().await;
    Ok((median(local), median(remote)))
}

/// Short English sentences (10–18 tokens), varied by index, the same on every run.
fn sentences(n: usize) -> Vec<String> {
    const SUBJECTS: [&str; 8] = [
        "The old fisherman",
        "A small robot",
        "My neighbour's cat",
        "The city council",
        "A curious student",
        "The night train",
        "Our research team",
        "A quiet librarian",
    ];
    const VERBS: [&str; 8] = [
        "carefully repaired",
        "quickly forgot",
        "proudly presented",
        "slowly walked past",
        "secretly admired",
        "loudly complained about",
        "finally understood",
        "happily shared",
    ];
    const OBJECTS: [&str; 8] = [
        "the broken wooden bridge near the harbour.",
        "a strange message from the future.",
        "the results of last year's experiment.",
        "an umbrella left on the bus.",
        "the colourful garden behind the museum.",
        "three boxes of old letters.",
        "the new rules for the summer festival.",
        "a map of the northern mountains.",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{} {} {}",
                SUBJECTS[i % 8],
                VERBS[(i / 8) % 8],
                OBJECTS[(i / 64 + i) % 8]
            )
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    super::quantile(&values, 0.5)
}

const ST_SCRIPT: &str = r#"
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
model_dir, sentences_file, passes, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
sentences = json.load(open(sentences_file))
model = SentenceTransformer(model_dir, device="cpu")
model.encode(sentences, batch_size=32, normalize_embeddings=True)
rates = []
for _ in range(passes):
    t = time.perf_counter()
    model.encode(sentences, batch_size=32, normalize_embeddings=True)
    rates.append(len(sentences) / (time.perf_counter() - t))
rates.sort()
print(json.dumps({"sent_per_s": rates[len(rates) // 2], "torch": torch.__version__, "threads": torch.get_num_threads()}))
"#;

pub(crate) async fn run(args: InferenceBenchArgs) -> anyhow::Result<()> {
    let minilm = args.models.join("all-minilm-l6-v2");
    let smollm = args
        .models
        .join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !minilm.is_dir() || !smollm.is_file() {
        bail!(
            "the reference models are not in {}: run `bash scripts/fetch-models.sh` (or pass --models DIR)",
            args.models.display()
        );
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let passes = args.passes.max(1);
    let texts = sentences(args.sentences.max(1));

    // Embeddings: one warm-up pass, then the median of the timed ones.
    let texts_for_embed = texts.clone();
    let embed_rate = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let model = Embedder::load(&minilm)?;
        model.embed(&texts_for_embed)?;
        let mut rates = Vec::with_capacity(passes);
        for _ in 0..passes {
            let started = Instant::now();
            model.embed(&texts_for_embed)?;
            rates.push(texts_for_embed.len() as f64 / started.elapsed().as_secs_f64());
        }
        Ok(median(rates))
    })
    .await??;

    let st = match &args.python {
        None => None,
        Some(python) => {
            let file = tempfile::NamedTempFile::new()?;
            std::fs::write(file.path(), serde_json::to_string(&texts)?)?;
            let output = tokio::process::Command::new(python)
                .args(["-c", ST_SCRIPT])
                .arg(args.models.join("all-minilm-l6-v2"))
                .arg(file.path())
                .arg(passes.to_string())
                .arg(threads.to_string())
                .output()
                .await
                .with_context(|| format!("running {}", python.display()))?;
            if !output.status.success() {
                bail!(
                    "sentence-transformers failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            let line = stdout.lines().last().unwrap_or_default();
            Some(serde_json::from_str::<serde_json::Value>(line).context("reading its result")?)
        }
    };

    // Generation: a fixed chat prompt, greedy, on each engine.
    let decode_tokens = args.decode_tokens.max(1);
    let generation = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let mut out = serde_json::Map::new();
        for engine in [Engine::Q4, Engine::Exact, Engine::Quantized] {
            let model = Generator::load(&smollm, engine)?;
            let prompt = model.chat_prompt(&[ChatMessage {
                role: "user".into(),
                content: "Explain in detail how a peer-to-peer network finds other nodes, \
                          routes messages and survives nodes that fail."
                    .into(),
            }])?;
            let params = GenerateParams {
                max_tokens: decode_tokens,
                ..Default::default()
            };
            model.generate(&prompt, &params, |_| true)?;
            let mut prefill = Vec::new();
            let mut decode = Vec::new();
            let mut tokens = 0;
            for _ in 0..passes {
                let g = model.generate(&prompt, &params, |_| true)?;
                prefill.push(g.prompt_tokens as f64 / (g.prompt_ms / 1e3));
                // The first generated token comes from the prompt's pass.
                decode.push(g.tokens.len().saturating_sub(1) as f64 / (g.decode_ms / 1e3));
                tokens = g.tokens.len();
            }
            out.insert(
                engine.name().to_owned(),
                json!({
                    "prefill_tok_per_s": median(prefill),
                    "decode_tok_per_s": median(decode),
                    "tokens": tokens,
                }),
            );
        }
        Ok(serde_json::Value::Object(out))
    })
    .await??;

    let (local_ms, remote_ms) = routing_overhead(
        &args.models.join("all-minilm-l6-v2"),
        args.overhead_tasks.max(1),
    )
    .await?;

    // The headline figures are the default engine's.
    let exact = &generation[Engine::default().name()];
    let st_rate = st.as_ref().and_then(|v| v["sent_per_s"].as_f64());
    let result = json!({
        "threads": threads,
        "embed_sent_per_s": embed_rate,
        "embed_batch": mycel_ml::embed::BATCH,
        "embed_sentences": texts.len(),
        "st_sent_per_s": st_rate,
        "embed_vs_st": st_rate.map(|s| embed_rate / s),
        "prefill_tok_per_s": exact["prefill_tok_per_s"],
        "decode_tok_per_s": exact["decode_tok_per_s"],
        "engines": generation,
        "q4_simd": mycel_ml::qmatmul::simd_available(),
        "task_local_p50_ms": local_ms,
        "task_remote_p50_ms": remote_ms,
        "remote_overhead_p50_ms": remote_ms - local_ms,
    });
    eprintln!(
        "embeddings: {:.0} sentences/s{}; SmolLM2 {}: prefill {:.0} tok/s, decode {:.1} tok/s",
        embed_rate,
        st_rate.map_or(String::new(), |s| format!(
            " (sentence-transformers {s:.0}/s, ratio {:.2})",
            embed_rate / s
        )),
        Engine::default().name(),
        exact["prefill_tok_per_s"].as_f64().unwrap_or(f64::NAN),
        exact["decode_tok_per_s"].as_f64().unwrap_or(f64::NAN),
    );
    eprintln!(
        "one-sentence task: {local_ms:.2} ms here, {remote_ms:.2} ms from a peer \
         (overhead {:.2} ms, p50)",
        remote_ms - local_ms
    );
    if args.json {
        println!("{result}");
    }
    Ok(())
}
