//! `mycel bench inference`: the reference models on this machine — embedding throughput
//! (all-MiniLM-L6-v2, batch 32) side by side with sentence-transformers when a Python that has
//! it is given, SmolLM2-135M prompt processing and decoding on each engine side by side with
//! llama.cpp's `llama-bench` when given, in interleaved rounds; and the routing overhead of a
//! task run on a peer.

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
    /// Rounds of ours-then-theirs, interleaved, so that a busy neighbour on a shared machine
    /// hits both sides alike; medians over rounds are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// llama.cpp's `llama-bench` in its default build (native CPU, OpenMP), to time it on the
    /// same GGUF in the same run; the ratios are against it. `bash scripts/build-llama-bench.sh`
    /// builds it with a record of its build (`llama-bench.build` beside it).
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// A portable build of llama-bench (no -march=native, no OpenMP), reported beside.
    #[arg(long)]
    llama_bench_portable: Option<PathBuf>,
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
    let (name, id) = (served.offer.name.clone(), served.offer.id);
    worker_config.preloaded = vec![served];
    let worker = Node::start(worker_config).await?;
    let worker_id = worker.net.peer_id();
    let bootstrap = worker
        .net
        .listen_addrs()
        .iter()
        .map(|a| a.clone().with(Protocol::P2p(worker_id)))
        .collect();
    // One user runs both: the requester binds the worker's model name to its id.
    let mut requester_config = config("requester", bootstrap);
    requester_config.router.bindings.bind(name, id);
    let requester = Node::start(requester_config).await?;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let remote_target = loop {
        // The name is bound, so it resolves at once: wait for the worker's announcement of
        // the model, so that the target holds it as a candidate.
        let offered = requester
            .net
            .peer(worker_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|p| p.capabilities.is_some_and(|c| !c.models.is_empty()));
        if offered {
            break requester
                .inference
                .resolve("all-minilm-l6-v2", ModelKind::Embedding)
                .await?;
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
    // A comparison needs to know what it compares with: checked before anything runs.
    for bin in args.llama_bench.iter().chain(&args.llama_bench_portable) {
        llama_build(bin)?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let passes = args.passes.max(1);
    let texts = sentences(args.sentences.max(1));

    let embedder = {
        let path = minilm.clone();
        let texts = texts.clone();
        std::sync::Arc::new(
            tokio::task::spawn_blocking(move || -> anyhow::Result<Embedder> {
                let model = Embedder::load(&path)?;
                model.embed(&texts)?;
                Ok(model)
            })
            .await??,
        )
    };
    let sentences_file = tempfile::NamedTempFile::new()?;
    std::fs::write(sentences_file.path(), serde_json::to_string(&texts)?)?;
    let decode_tokens = args.decode_tokens.max(1);
    let q4 = std::sync::Arc::new(load_generator(&smollm, Engine::Q4).await?);

    // Ours and theirs, round after round.
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let model = embedder.clone();
        let batch = texts.clone();
        let embed_rate = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let mut rates = Vec::with_capacity(passes);
            for _ in 0..passes {
                let started = Instant::now();
                model.embed(&batch)?;
                rates.push(batch.len() as f64 / started.elapsed().as_secs_f64());
            }
            Ok(median(rates))
        })
        .await??;
        let st_rate = match &args.python {
            None => None,
            Some(python) => Some(
                sentence_transformers(python, &minilm, sentences_file.path(), passes, threads)
                    .await?,
            ),
        };
        let generator = q4.clone();
        let (prefill, decode, prompt_tokens) =
            tokio::task::spawn_blocking(move || time_generation(&generator, decode_tokens, passes))
                .await??;
        let llama = match &args.llama_bench {
            None => None,
            Some(bin) => Some(
                llama_bench(bin, &smollm, threads, prompt_tokens, decode_tokens, passes).await?,
            ),
        };
        let portable = match &args.llama_bench_portable {
            None => None,
            Some(bin) => Some(
                llama_bench(bin, &smollm, threads, prompt_tokens, decode_tokens, passes).await?,
            ),
        };
        rounds.push(json!({
            "embed_sent_per_s": embed_rate,
            "st_sent_per_s": st_rate,
            "prefill_tok_per_s": prefill,
            "decode_tok_per_s": decode,
            "llama_prefill_tok_per_s": llama.map(|l| l.0),
            "llama_decode_tok_per_s": llama.map(|l| l.1),
            "llama_portable_prefill_tok_per_s": portable.map(|l| l.0),
            "llama_portable_decode_tok_per_s": portable.map(|l| l.1),
        }));
    }
    let over_rounds = |key: &str| -> Option<f64> {
        let values: Vec<f64> = rounds.iter().filter_map(|r| r[key].as_f64()).collect();
        (!values.is_empty()).then(|| median(values))
    };
    let ratio = |ours: &str, theirs: &str| -> Option<f64> {
        let values: Vec<f64> = rounds
            .iter()
            .filter_map(|r| Some(r[ours].as_f64()? / r[theirs].as_f64()?))
            .collect();
        (!values.is_empty()).then(|| median(values))
    };

    // The other engines, once, for comparison.
    let mut engines = serde_json::Map::new();
    for engine in [Engine::Exact, Engine::Quantized] {
        let generator = load_generator(&smollm, engine).await?;
        let (prefill, decode, _) =
            tokio::task::spawn_blocking(move || time_generation(&generator, decode_tokens, passes))
                .await??;
        engines.insert(
            engine.name().to_owned(),
            json!({ "prefill_tok_per_s": prefill, "decode_tok_per_s": decode }),
        );
    }
    engines.insert(
        Engine::Q4.name().to_owned(),
        json!({ "prefill_tok_per_s": over_rounds("prefill_tok_per_s"),
                "decode_tok_per_s": over_rounds("decode_tok_per_s") }),
    );

    // On the runtime's workers, as the API's handlers run, not on the thread that waits for
    // the benchmark.
    let (minilm, tasks) = (
        args.models.join("all-minilm-l6-v2"),
        args.overhead_tasks.max(1),
    );
    let (local_ms, remote_ms) =
        tokio::spawn(async move { routing_overhead(&minilm, tasks).await }).await??;

    let embed_rate = over_rounds("embed_sent_per_s").unwrap_or(f64::NAN);
    let decode = over_rounds("decode_tok_per_s").unwrap_or(f64::NAN);
    let result = json!({
        "threads": threads,
        "rounds": rounds,
        "embed_sent_per_s": embed_rate,
        "embed_batch": mycel_ml::embed::BATCH,
        "embed_sentences": texts.len(),
        "st_sent_per_s": over_rounds("st_sent_per_s"),
        "embed_vs_st": ratio("embed_sent_per_s", "st_sent_per_s"),
        "engine": Engine::Q4.name(),
        "prefill_tok_per_s": over_rounds("prefill_tok_per_s"),
        "decode_tok_per_s": decode,
        "llama_prefill_tok_per_s": over_rounds("llama_prefill_tok_per_s"),
        "llama_decode_tok_per_s": over_rounds("llama_decode_tok_per_s"),
        "prefill_vs_llama": ratio("prefill_tok_per_s", "llama_prefill_tok_per_s"),
        "decode_vs_llama": ratio("decode_tok_per_s", "llama_decode_tok_per_s"),
        "llama_build": args.llama_bench.as_deref().map(llama_build).transpose()?,
        "llama_portable_prefill_tok_per_s": over_rounds("llama_portable_prefill_tok_per_s"),
        "llama_portable_decode_tok_per_s": over_rounds("llama_portable_decode_tok_per_s"),
        "prefill_vs_llama_portable": ratio("prefill_tok_per_s", "llama_portable_prefill_tok_per_s"),
        "decode_vs_llama_portable": ratio("decode_tok_per_s", "llama_portable_decode_tok_per_s"),
        "llama_portable_build": args.llama_bench_portable.as_deref().map(llama_build).transpose()?,
        "engines": engines,
        "q4_simd": mycel_ml::qmatmul::kernel_name() != "scalar",
        "q4_kernel": mycel_ml::qmatmul::kernel_name(),
        "task_local_p50_ms": local_ms,
        "task_remote_p50_ms": remote_ms,
        "remote_overhead_p50_ms": remote_ms - local_ms,
    });
    eprintln!(
        "embeddings: {embed_rate:.0} sentences/s{}; SmolLM2 {}: decode {decode:.1} tok/s{} \
         (medians of {} rounds)",
        result["embed_vs_st"]
            .as_f64()
            .map_or(String::new(), |r| format!(
                " ({r:.2}x sentence-transformers)"
            )),
        Engine::Q4.name(),
        result["decode_vs_llama"]
            .as_f64()
            .map_or(String::new(), |r| format!(" ({r:.2}x llama.cpp)")),
        rounds.len(),
    );
    eprintln!(
        "one-sentence task: {local_ms:.2} ms here, {remote_ms:.2} ms from a peer \
         (overhead {:.2} ms, p50)",
        remote_ms - local_ms
    );
    if args.json {
        super::emit_json(result);
    }
    Ok(())
}

/// `path` on `engine`, keeping no prompt prefixes: the prompt is timed again and again, and
/// each reading is measured whole, as llama-bench measures it.
async fn load_generator(path: &std::path::Path, engine: Engine) -> anyhow::Result<Generator> {
    let path = path.to_path_buf();
    let limits = mycel_ml::BatchLimits {
        prefix_bytes: 0,
        ..Default::default()
    };
    Ok(tokio::task::spawn_blocking(move || Generator::load_with(&path, engine, limits)).await??)
}

/// Prompt processing and decoding rates (medians of `passes` after a warm-up) on a fixed chat
/// prompt, greedy; and the prompt's length in tokens.
fn time_generation(
    model: &Generator,
    decode_tokens: usize,
    passes: usize,
) -> anyhow::Result<(f64, f64, usize)> {
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
    let warm = model.generate(&prompt, &params, |_| true)?;
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..passes {
        let g = model.generate(&prompt, &params, |_| true)?;
        prefill.push(g.prompt_tokens as f64 / (g.prompt_ms / 1e3));
        // The first generated token comes from the prompt's pass.
        decode.push(g.tokens.len().saturating_sub(1) as f64 / (g.decode_ms / 1e3));
    }
    Ok((median(prefill), median(decode), warm.prompt_tokens))
}

/// sentence-transformers' rate on the same sentences (median of `passes` after a warm-up).
async fn sentence_transformers(
    python: &std::path::Path,
    model: &std::path::Path,
    sentences: &std::path::Path,
    passes: usize,
    threads: usize,
) -> anyhow::Result<f64> {
    let output = tokio::process::Command::new(python)
        .args(["-c", ST_SCRIPT])
        .arg(model)
        .arg(sentences)
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
    let value: serde_json::Value = serde_json::from_str(line).context("reading its result")?;
    value["sent_per_s"]
        .as_f64()
        .context("sentence-transformers printed no rate")
}

/// How a llama.cpp binary was built: the `<name>.build` record beside it
/// (`scripts/build-llama-bench.sh` writes it). A comparison with an unknown build is refused.
pub(crate) fn llama_build(bin: &std::path::Path) -> anyhow::Result<String> {
    let name = bin
        .file_name()
        .map_or("llama-bench".into(), |n| n.to_string_lossy());
    let record = bin.with_file_name(format!("{name}.build"));
    let text = std::fs::read_to_string(&record).with_context(|| {
        format!(
            "{} has no build record ({}): build it with `bash scripts/build-llama-bench.sh`, \
             or write there the commands that built it",
            bin.display(),
            record.display()
        )
    })?;
    Ok(text.trim().replace('\n', "; "))
}

/// llama.cpp's prompt processing and decoding rates on the same GGUF and thread count.
async fn llama_bench(
    bin: &std::path::Path,
    model: &std::path::Path,
    threads: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    passes: usize,
) -> anyhow::Result<(f64, f64)> {
    let output = tokio::process::Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string(), "-p", &prompt_tokens.to_string()])
        .args(["-n", &decode_tokens.to_string(), "-r", &passes.to_string()])
        .args(["-o", "json"])
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    if !output.status.success() {
        use std::os::unix::process::ExitStatusExt;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        let how = match output.status.signal() {
            // SIGILL, SIGSEGV: most often a build for instructions this machine does not run
            // (a native build's AMX on a VM that grants no tile state).
            Some(signal @ (4 | 11)) => format!(
                "killed by signal {signal}: built for instructions this machine does not run? \
                 `bash scripts/build-llama-bench.sh` checks the default build and makes one \
                 without AMX where it crashes"
            ),
            Some(signal) => format!("killed by signal {signal}"),
            None => output.status.to_string(),
        };
        bail!("{} failed ({how}): {tail}", bin.display());
    }
    let runs: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).context("reading llama-bench's JSON")?;
    let rate = |prompt: bool| {
        runs.iter()
            .find(|r| (r["n_prompt"].as_u64().unwrap_or(0) > 0) == prompt)
            .and_then(|r| r["avg_ts"].as_f64())
            .context("llama-bench printed no rate")
    };
    Ok((rate(true)?, rate(false)?))
}
