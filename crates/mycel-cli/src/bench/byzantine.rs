//! `mycel bench byzantine` (a build with `--features fault-injection`): serving nodes in this
//! process, some of them liars (colluding on one wrong output, or each with its own), and a
//! client node (a gateway serving nothing) sending tasks under a verification mode,
//! interleaved with the same tasks under mode none. Per scenario: wrong outputs accepted as verified, tasks that could not be
//! verified, how many tasks involving each liar it took to isolate it, and the work and p50
//! latency against mode none.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mycel_core::statement::ModelKind;
use mycel_core::verify::Mode;
use mycel_ml::{ChatMessage, Engine, GenerateParams};
use mycel_net::PeerId;
use mycel_node::fault::Fault;
use mycel_node::inference::{RouteError, Target};
use mycel_node::{Node, NodeConfig};
use serde_json::json;

#[derive(Args)]
pub(crate) struct ByzantineBenchArgs {
    /// Serving nodes (the client is another node, a gateway serving nothing).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Tasks per scenario under the verification mode (as many again under mode none).
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Replicas asked for under replicate.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Only the scenarios whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Task {
    Chat,
    Embed,
}

struct Scenario {
    name: String,
    mode: Mode,
    task: Task,
    liars: usize,
    colluding: bool,
}

/// Distinct inputs the tasks cycle through.
const INPUTS: usize = 16;
const CHAT_TOKENS: usize = 16;

fn scenarios(replicas: u32) -> Vec<Scenario> {
    let replicate = Mode::Replicate { replicas };
    let mut all = Vec::new();
    for task in [Task::Chat, Task::Embed] {
        for colluding in [true, false] {
            all.push(Scenario {
                name: format!(
                    "replicate-{}-{}",
                    task_name(task),
                    if colluding {
                        "colluding"
                    } else {
                        "independent"
                    }
                ),
                mode: replicate,
                task,
                liars: 3,
                colluding,
            });
        }
    }
    for task in [Task::Embed, Task::Chat] {
        all.push(Scenario {
            name: format!("spot_check-{}", task_name(task)),
            mode: Mode::SpotCheck { rate: 0.1 },
            task,
            liars: 1,
            colluding: false,
        });
    }
    all
}

fn task_name(task: Task) -> &'static str {
    match task {
        Task::Chat => "chat",
        Task::Embed => "embed",
    }
}

pub(crate) async fn run(args: ByzantineBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 4, "--nodes must be at least 4");
    let root = tempfile::tempdir()?;
    let bert = root.path().join("tiny-bert");
    mycel_ml::fixtures::write_tiny_bert(&bert).context("writing the tiny embedding model")?;
    let llama = root.path().join("tiny-llama.gguf");
    mycel_ml::fixtures::write_tiny_llama(&llama).context("writing the tiny chat model")?;
    eprintln!(
        "{:<28} {:>5} {:>6} {:>6} {:>9} {:>10} {:>9} {:>10} {:>9}",
        "scenario", "liars", "tasks", "wrong", "unverif.", "to_isolate", "work", "p50 ms", "p50 ×"
    );
    for scenario in scenarios(args.replicas) {
        if args
            .only
            .as_deref()
            .is_some_and(|o| !scenario.name.contains(o))
        {
            continue;
        }
        let model = match scenario.task {
            Task::Chat => &llama,
            Task::Embed => &bert,
        };
        let dir = root.path().join(&scenario.name);
        let report = run_scenario(&args, &scenario, model, &dir)
            .await
            .with_context(|| format!("scenario {}", scenario.name))?;
        if args.json {
            super::emit_json(report);
        }
    }
    Ok(())
}

fn node_config(dir: &Path, bootstrap: Vec<mycel_net::Multiaddr>, model: &Path) -> NodeConfig {
    let mut config = NodeConfig::new(dir.to_path_buf());
    config.mdns = false;
    config.api = None;
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("an address")];
    config.bootstrap = bootstrap;
    config.models = vec![model.to_path_buf()];
    config.engine = Engine::Exact;
    config
}

/// What one input should give: embedding bits, or generated tokens.
#[derive(Clone, PartialEq)]
enum Answer {
    Vectors(Vec<Vec<f32>>),
    Tokens(Vec<u32>),
}

fn input(task: Task, k: usize) -> (Vec<String>, Vec<ChatMessage>) {
    let text = format!("input {k}: the network checks what its peers say");
    match task {
        // The tiny embedding model reads at most 24 tokens.
        Task::Embed => (vec![format!("input {k} checked")], Vec::new()),
        Task::Chat => (
            Vec::new(),
            vec![ChatMessage {
                role: "user".into(),
                content: text,
            }],
        ),
    }
}

fn params() -> GenerateParams {
    GenerateParams {
        max_tokens: CHAT_TOKENS,
        ..Default::default()
    }
}

/// Runs input `k` under `mode` (none: the plain router, with failover and hedging).
async fn ask(
    client: &std::sync::Arc<mycel_node::inference::Inference>,
    target: &Target,
    task: Task,
    k: usize,
    mode: Mode,
    ranking: Option<Vec<PeerId>>,
) -> Result<(Answer, bool, PeerId), RouteError> {
    let (texts, messages) = input(task, k);
    match (task, mode, ranking) {
        (Task::Embed, _, Some(ranking)) => {
            let e = client.embed_on(target, texts, ranking).await?;
            Ok((Answer::Vectors(e.vectors), false, e.worker))
        }
        (Task::Chat, _, Some(ranking)) => {
            let (tx, _rx) = tokio::sync::mpsc::channel(4 * CHAT_TOKENS);
            let c = client
                .generate_on(target, messages, params(), tx, ranking)
                .await?;
            Ok((Answer::Tokens(c.generation.tokens), false, c.worker))
        }
        (Task::Embed, Mode::None, None) => {
            let e = client.embed(target, texts).await?;
            Ok((Answer::Vectors(e.vectors), false, e.worker))
        }
        (Task::Chat, Mode::None, None) => {
            let (tx, _rx) = tokio::sync::mpsc::channel(4 * CHAT_TOKENS);
            let c = client.generate(target, messages, params(), tx).await?;
            Ok((Answer::Tokens(c.generation.tokens), false, c.worker))
        }
        (Task::Embed, mode, None) => {
            let (e, v) = client.embed_checked(target, texts, mode).await?;
            Ok((
                Answer::Vectors(e.vectors),
                v.certificate.is_some(),
                e.worker,
            ))
        }
        (Task::Chat, mode, None) => {
            let (c, v) = client
                .generate_checked(target, messages, params(), mode)
                .await?;
            Ok((
                Answer::Tokens(c.generation.tokens),
                v.certificate.is_some(),
                c.worker,
            ))
        }
    }
}

fn worked(nodes: &[Node]) -> u64 {
    nodes.iter().map(|n| n.inference.stats().worked).sum()
}

/// Waits (a minute at most) until `client`'s background spot checks have finished.
async fn rechecks_done(client: &Node) {
    let settled = Instant::now() + Duration::from_secs(60);
    while client.inference.rechecks_running() > 0 && Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn run_scenario(
    args: &ByzantineBenchArgs,
    scenario: &Scenario,
    model: &Path,
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let mut nodes: Vec<Node> = Vec::new();
    // Node 0 is the client: a gateway serving nothing. Then the serving nodes, the liars
    // last.
    for i in 0..=args.nodes {
        let bootstrap = match nodes.first() {
            Some(first) => vec![first.net.listen_addrs()[0]
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(first.net.peer_id()))],
            None => Vec::new(),
        };
        let mut config = node_config(&dir.join(format!("n{i}")), bootstrap, model);
        if i == 0 {
            config.models.clear();
            // The liars here lie about results, not names (the model is the honest one's): the
            // client takes the name its peers announce, and verification is what is measured.
            config.router.bindings.trust_announced_names(true);
        }
        // Each node's random choices from a seed of its own: a run can be replayed.
        config.router.seed = Some(i as u64);
        if i > args.nodes - scenario.liars {
            let group = if scenario.colluding { 1 } else { i as u64 + 1 };
            config.router.fault = Some(Fault::Wrong { group });
        }
        nodes.push(Node::start(config).await?);
    }
    let client = &nodes[0];
    let liars: Vec<PeerId> = nodes[args.nodes + 1 - scenario.liars..]
        .iter()
        .map(|n| n.net.peer_id())
        .collect();
    let limits = (Duration::from_secs(60), Duration::from_millis(100));
    super::wait_for_peers(client, args.nodes, "serving peers", limits, |p| {
        p.capabilities
            .as_ref()
            .is_some_and(|c| !c.models.is_empty())
    })
    .await?;
    let kind = match scenario.task {
        Task::Chat => ModelKind::Generation,
        Task::Embed => ModelKind::Embedding,
    };
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target = client.inference.resolve(&name, kind).await?;
    // The right answers: an honest node's.
    let honest = nodes[1].net.peer_id();
    let mut expected = Vec::with_capacity(INPUTS);
    for k in 0..INPUTS {
        let (answer, _, _) = ask(
            &client.inference,
            &target,
            scenario.task,
            k,
            Mode::None,
            Some(vec![honest]),
        )
        .await?;
        expected.push(answer);
    }

    let bar = ProgressBar::new(args.tasks as u64);
    bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}").expect("a template"));
    bar.set_message(scenario.name.clone());
    let (mut none_ms, mut mode_ms) = (Vec::new(), Vec::new());
    let (mut wrong_accepted, mut wrong_returned, mut unverified, mut failed) = (0, 0, 0, 0);
    let mut none_work = 0;
    let work_start = worked(&nodes);
    // Per liar: tasks under the mode that involved it, and whether it is isolated yet.
    let mut involved = vec![0u32; liars.len()];
    let mut isolated_after: Vec<Option<u32>> = vec![None; liars.len()];
    let involvement = |peer: &PeerId| {
        client.inference.trust_of(peer).map_or(0.0, |t| {
            t.successes + t.failures + t.timeouts + t.disagreements + t.invalid
        })
    };
    // The process's CPU time in each mode's tasks (all nodes run in this process): from a
    // task's start to the next one's, so that background spot checks count for the mode.
    let (mut none_cpu, mut mode_cpu) = (0.0, 0.0);
    let mut cpu_mark = super::process_cpu_seconds();
    for i in 0..args.tasks {
        let k = i % INPUTS;
        // Spot checks of the task before finish first: their work and CPU are the mode's.
        rechecks_done(client).await;
        let cpu = super::process_cpu_seconds();
        mode_cpu += cpu - cpu_mark;
        cpu_mark = cpu;
        // Mode none, then the mode, on the same input.
        let before = worked(&nodes);
        let started = Instant::now();
        let _ = ask(
            &client.inference,
            &target,
            scenario.task,
            k,
            Mode::None,
            None,
        )
        .await;
        none_ms.push(started.elapsed().as_secs_f64() * 1e3);
        none_work += worked(&nodes) - before;
        let cpu = super::process_cpu_seconds();
        none_cpu += cpu - cpu_mark;
        cpu_mark = cpu;

        let seen: Vec<f64> = liars.iter().map(involvement).collect();
        // Under spot_check only the first choice answers, and the router's ranking gives a
        // peer with no record little traffic: every tenth task the liar is offered first, the
        // share a uniform router would give one peer in ten.
        let ranking = match scenario.mode {
            Mode::SpotCheck { .. } if i % args.nodes == 0 => {
                let mut ranking = client.inference.ranking(&target).await;
                ranking.retain(|p| *p != liars[0]);
                ranking.insert(0, liars[0]);
                Some(ranking)
            }
            _ => None,
        };
        let started = Instant::now();
        let outcome = match ranking {
            Some(ranking) => {
                let (texts, messages) = input(scenario.task, k);
                let task_input = match scenario.task {
                    Task::Embed => mycel_core::task::TaskInput::Embed { texts },
                    Task::Chat => mycel_core::task::TaskInput::Generate {
                        messages,
                        params: params(),
                        resume: Default::default(),
                    },
                };
                client
                    .inference
                    .run_checked_on(&target, task_input, scenario.mode, ranking)
                    .await
                    .map(|checked| {
                        let answer = match checked.output {
                            mycel_core::task::TaskOutput::Embeddings { .. } => {
                                Answer::Vectors(checked.output.vectors(1).unwrap_or_default())
                            }
                            mycel_core::task::TaskOutput::Generation { tokens, .. } => {
                                Answer::Tokens(tokens)
                            }
                        };
                        (
                            answer,
                            checked.verification.certificate.is_some(),
                            checked.worker,
                        )
                    })
            }
            None => {
                ask(
                    &client.inference,
                    &target,
                    scenario.task,
                    k,
                    scenario.mode,
                    None,
                )
                .await
            }
        };
        mode_ms.push(started.elapsed().as_secs_f64() * 1e3);
        // The task involved a liar that answered it (spot check: the first answer), or whose
        // record it changed (replicas).
        let answered_by = outcome.as_ref().ok().map(|(_, _, worker)| *worker);
        match outcome {
            Ok((answer, verified, _)) if answer != expected[k] => {
                wrong_returned += 1;
                if verified {
                    wrong_accepted += 1;
                }
            }
            Ok(_) => {}
            Err(RouteError::Unverified(_)) => unverified += 1,
            Err(_) => failed += 1,
        }
        for (l, liar) in liars.iter().enumerate() {
            if isolated_after[l].is_some() {
                continue;
            }
            if answered_by == Some(*liar) || involvement(liar) > seen[l] + 0.5 {
                involved[l] += 1;
            }
            if client
                .inference
                .trust_of(liar)
                .is_some_and(|t| t.isolated_until.is_some())
            {
                isolated_after[l] = Some(involved[l]);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Background spot checks still running count for the mode.
    rechecks_done(client).await;
    let mode_work = worked(&nodes) - work_start - none_work;
    mode_cpu += super::process_cpu_seconds() - cpu_mark;
    let tasks = args.tasks.max(1) as f64;
    let (cpu_ms_none, cpu_ms_mode) = (none_cpu * 1e3 / tasks, mode_cpu * 1e3 / tasks);
    none_ms.sort_by(f64::total_cmp);
    mode_ms.sort_by(f64::total_cmp);
    let p50_none = super::quantile(&none_ms, 0.5);
    let p50_mode = super::quantile(&mode_ms, 0.5);
    let all_isolated = isolated_after.iter().all(Option::is_some);
    let max_to_isolate = isolated_after.iter().flatten().max().copied();
    let work_ratio = mode_work as f64 / none_work.max(1) as f64;
    let unisolated: Vec<u32> = isolated_after
        .iter()
        .zip(&involved)
        .filter(|(isolated, _)| isolated.is_none())
        .map(|(_, tasks)| *tasks)
        .collect();
    eprintln!(
        "{:<28} {:>5} {:>6} {:>6} {:>9} {:>10} {:>9.2} {:>10.2} {:>9.2}",
        scenario.name,
        scenario.liars,
        args.tasks,
        wrong_accepted,
        unverified,
        match (all_isolated, max_to_isolate) {
            (true, Some(m)) => m.to_string(),
            _ => format!(
                "{}/{} ({}t)",
                isolated_after.iter().flatten().count(),
                liars.len(),
                unisolated.iter().max().unwrap_or(&0)
            ),
        },
        work_ratio,
        p50_mode,
        p50_mode / p50_none
    );
    // Honest workers noted as disagreeing or isolated: false disagreements of the exact
    // agreement rule (the same output bytes), which should never happen.
    let honest: Vec<PeerId> = nodes[1..=args.nodes - scenario.liars]
        .iter()
        .map(|n| n.net.peer_id())
        .collect();
    let records: Vec<_> = honest
        .iter()
        .filter_map(|p| client.inference.trust_of(p))
        .collect();
    let honest_disagreements: f64 = records.iter().map(|t| t.disagreements).sum();
    let honest_isolated = records.iter().filter(|t| t.offences > 0).count();
    let honest_successes: f64 = records.iter().map(|t| t.successes).sum();
    for node in nodes {
        node.shutdown().await;
    }
    Ok(json!({
        "honest_disagreements": honest_disagreements.round(),
        "honest_answers": honest_successes.round(),
        "honest_isolated": honest_isolated,
        "scenario": scenario.name,
        "mode": scenario.mode.to_string(),
        "task": task_name(scenario.task),
        "nodes": args.nodes,
        "liars": scenario.liars,
        "colluding": scenario.colluding,
        "tasks": args.tasks,
        "wrong_accepted": wrong_accepted,
        "wrong_returned": wrong_returned,
        "unverified": unverified,
        "failed": failed,
        "liars_isolated": isolated_after.iter().flatten().count(),
        "max_tasks_to_isolate": if all_isolated { json!(max_to_isolate) } else { json!(null) },
        "tasks_to_isolate": isolated_after,
        // Liars never isolated, and how many tasks involved each: a liar the router never
        // asked harmed no one.
        "unisolated_liar_tasks": unisolated,
        "work_ratio": work_ratio,
        "p50_ms": p50_mode,
        "p50_none_ms": p50_none,
        "p50_ratio": p50_mode / p50_none,
        // CPU of every node (one process) per task: with all nodes on this machine's cores,
        // a task under the mode cannot take less wall time than its CPU over the cores.
        "cpu_ms_per_task": cpu_ms_mode,
        "cpu_ms_per_task_none": cpu_ms_none,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "models": "tiny fixtures (mycel_ml::fixtures), exact engine",
    }))
}
