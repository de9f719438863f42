//! `mycel bench failover`: serving nodes as separate `mycel node` processes, a gateway node in
//! this process, and a client sending embedding requests to the gateway's OpenAI API while
//! two serving nodes are killed with SIGKILL. Every request must succeed; latency is reported
//! before, during and after the kills.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::multiaddr::Protocol;
use mycel_node::{Node, NodeConfig};
use serde_json::json;

#[derive(Args)]
pub(crate) struct FailoverBenchArgs {
    /// The embedding model the serving nodes load.
    #[arg(long, default_value = ".cache/models/all-minilm-l6-v2")]
    model: PathBuf,
    /// Serving nodes (separate processes).
    #[arg(long, default_value_t = 6)]
    servers: usize,
    /// Requests sent in all.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Serving nodes killed: the first when a third of the requests have started, the next
    /// ones evenly until half have.
    #[arg(long, default_value_t = 2)]
    kill: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Kills the child processes when dropped, whatever happens to the benchmark.
pub(crate) struct Children(pub(crate) Vec<Option<std::process::Child>>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in self.0.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Sample {
    index: usize,
    ms: f64,
    ok: bool,
    error: Option<String>,
}

pub(crate) async fn run(args: FailoverBenchArgs) -> anyhow::Result<()> {
    if !args.model.is_dir() {
        bail!(
            "no embedding model at {}: run `bash scripts/fetch-models.sh` (or pass --model DIR)",
            args.model.display()
        );
    }
    anyhow::ensure!(
        args.kill < args.servers,
        "--kill must leave at least one serving node"
    );
    let model_name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = tempfile::tempdir()?;

    // The gateway: serves no model, routes every request. One operator runs every node here,
    // so the gateway trusts the names its serving nodes announce.
    let operator_key = root.path().join("operator.key");
    let mut config = NodeConfig::new(root.path().join("gateway"));
    config.operator_key = Some(operator_key.clone());
    config.mdns = false;
    config.api = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    let gateway = Node::start(config).await?;
    let peer = gateway.net.peer_id();
    let bootstrap = gateway.net.listen_addrs()[0]
        .clone()
        .with(Protocol::P2p(peer));

    let exe = std::env::current_exe().context("finding the mycel binary")?;
    let mut children = Children(Vec::new());
    for i in 0..args.servers {
        let child = std::process::Command::new(&exe)
            .arg("node")
            .arg("--data-dir")
            .arg(root.path().join(format!("server-{i}")))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(["--api", "127.0.0.1:0"])
            .arg("--bootstrap")
            .arg(bootstrap.to_string())
            .arg("--model")
            .arg(&args.model)
            .arg("--operator-key")
            .arg(&operator_key)
            .env("MYCEL_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a serving node")?;
        children.0.push(Some(child));
    }
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!(
        "waiting for {} serving nodes to load {model_name}",
        args.servers
    ));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let limits = (Duration::from_secs(120), Duration::from_millis(100));
    super::wait_for_peers(&gateway, args.servers, "serving nodes", limits, |p| {
        p.capabilities
            .as_ref()
            .is_some_and(|c| c.models.iter().any(|m| m.name == model_name))
    })
    .await?;
    spinner.finish_and_clear();

    let url = format!("http://{}/v1/embeddings", gateway.api_addr.expect("API on"));
    let token = gateway.token.clone();
    let started_count = Arc::new(AtomicUsize::new(0));
    let bar = ProgressBar::new(args.requests as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} requests {msg}",
    )?);
    let (first, last) = (args.requests / 3, args.requests / 2);
    let steps = args.kill.saturating_sub(1).max(1);
    let kill_at: Vec<usize> = (0..args.kill)
        .map(|k| first + (last - first) * k / steps)
        .collect();

    let begun = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (url, token, count, bar) = (
            url.clone(),
            token.clone(),
            started_count.clone(),
            bar.clone(),
        );
        let total = args.requests;
        let model = model_name.clone();
        clients.push(tokio::task::spawn_blocking(move || {
            let agent = ureq::Agent::new_with_defaults();
            let mut samples = Vec::new();
            loop {
                let index = count.fetch_add(1, Ordering::SeqCst);
                if index >= total {
                    return samples;
                }
                let body = json!({ "model": model, "input": [
                    format!("Request {index}: the old fisherman repaired the bridge.")
                ]});
                let started = Instant::now();
                let result = agent
                    .post(&url)
                    .header("Authorization", &format!("Bearer {token}"))
                    .header("Content-Type", "application/json")
                    .send(body.to_string());
                let ms = started.elapsed().as_secs_f64() * 1e3;
                let (ok, error) = match result {
                    Ok(mut response) => {
                        let text = response.body_mut().read_to_string().unwrap_or_default();
                        let valid = serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| v["data"][0]["embedding"].as_array().map(Vec::len))
                            .is_some_and(|n| n > 0);
                        (valid, (!valid).then_some(text))
                    }
                    Err(e) => (false, Some(e.to_string())),
                };
                bar.inc(1);
                samples.push(Sample {
                    index,
                    ms,
                    ok,
                    error,
                });
            }
        }));
    }
    // The killer: SIGKILL a serving node when the request count passes each mark.
    let mut next_kill = 0;
    while next_kill < kill_at.len() {
        if started_count.load(Ordering::SeqCst) >= kill_at[next_kill] {
            if let Some(mut child) = children.0[next_kill].take() {
                child.kill().context("killing a serving node")?;
                let _ = child.wait();
                bar.set_message(format!("{} nodes killed", next_kill + 1));
            }
            next_kill += 1;
        } else if clients.iter().all(|c| c.is_finished()) {
            break;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut samples = Vec::new();
    for client in clients {
        samples.extend(client.await?);
    }
    let total_s = begun.elapsed().as_secs_f64();
    let router = gateway.inference.stats();
    bar.finish_and_clear();
    gateway.shutdown().await;
    drop(children);

    samples.sort_by_key(|s| s.index);
    let first_kill = kill_at.first().copied().unwrap_or(args.requests);
    let after = (2 * args.requests) / 3;
    let phase = |from: usize, to: usize| {
        let chosen: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.index >= from && s.index < to)
            .collect();
        let mut ms: Vec<f64> = chosen.iter().map(|s| s.ms).collect();
        ms.sort_by(f64::total_cmp);
        json!({
            "requests": chosen.len(),
            "succeeded": chosen.iter().filter(|s| s.ok).count(),
            "p50_ms": super::quantile(&ms, 0.5),
            "p99_ms": super::quantile(&ms, 0.99),
        })
    };
    let all = phase(0, args.requests);
    let failures: Vec<String> = samples
        .iter()
        .filter_map(|s| s.error.clone())
        .take(3)
        .collect();
    let result = json!({
        "servers": args.servers,
        "killed": args.kill,
        "kill_at_request": kill_at,
        "concurrency": args.concurrency,
        "requests": all["requests"],
        "succeeded": all["succeeded"],
        "p50_ms": all["p50_ms"],
        "p99_ms": all["p99_ms"],
        "total_s": total_s,
        "before": phase(0, first_kill),
        "during": phase(first_kill, after),
        "after": phase(after, args.requests),
        "router": router,
        "first_errors": failures,
    });
    eprintln!(
        "router: {} tasks completed, {} attempts moved to another node, {} hedged",
        router.completed, router.failovers, router.hedges
    );
    eprintln!(
        "{} of {} requests succeeded; p50 {:.1} ms, p99 {:.1} ms (before {:.1}/{:.1}, during \
         {:.1}/{:.1}, after {:.1}/{:.1})",
        all["succeeded"],
        all["requests"],
        all["p50_ms"].as_f64().unwrap_or(f64::NAN),
        all["p99_ms"].as_f64().unwrap_or(f64::NAN),
        result["before"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        result["before"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
        result["during"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        result["during"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
        result["after"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        result["after"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
    );
    if args.json {
        super::emit_json(result);
    }
    Ok(())
}
