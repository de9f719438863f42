//! `mycel bench fl`: federated training of the scikit-learn digits across real nodes on
//! loopback (one coordinator, N participants each holding a partition), per scenario: data
//! split, aggregator, attack, compression and hierarchy. With `--flower PYTHON`, Flower's
//! FedAvg simulation of the same setting runs first, on the same machine, for the ratio.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::multiaddr::Protocol;
use mycel_core::fl::{AggregatorSpec, Attack, Compression, JobSpec, ModelSpec, ServerSpec};
use mycel_core::membership::PeerState;
use mycel_node::training::JobRecord;
use mycel_node::{Node, NodeConfig};
use serde_json::json;

#[derive(Args)]
pub(crate) struct FlBenchArgs {
    /// Print one JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// Participants (each holds 1/N of the training split).
    #[arg(long, default_value_t = 10)]
    participants: usize,
    /// Rounds per job.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Run only the scenarios whose name contains this (e.g. "attack", "iid-fedavg").
    #[arg(long)]
    only: Option<String>,
    /// A Python with flwr installed: run Flower's simulation of the IID FedAvg setting
    /// (bench/flower_digits.py) first and report our speed against it.
    #[arg(long)]
    flower: Option<String>,
    /// The Flower script.
    #[arg(long, default_value = "bench/flower_digits.py")]
    flower_script: PathBuf,
}

/// One benchmark configuration.
struct Scenario {
    name: String,
    split: &'static str,
    aggregator: AggregatorSpec,
    attack: Option<Attack>,
    compression: Compression,
    cluster_size: u32,
    server: ServerSpec,
    model: ModelSpec,
}

fn scenarios(n: usize) -> Vec<Scenario> {
    let f = (n * 3) / 10;
    let base = |name: &str| Scenario {
        name: name.to_owned(),
        split: "iid",
        aggregator: AggregatorSpec::Fedavg { iqr: None },
        attack: None,
        compression: Compression::None,
        cluster_size: 0,
        server: ServerSpec::Sgd { lr: 1.0 },
        model: ModelSpec::Mlp {
            layers: vec![64, 32, 10],
        },
    };
    let robust = [
        AggregatorSpec::Fedavg { iqr: None },
        AggregatorSpec::MultiKrum {
            f,
            m: n - f,
            iqr: None,
        },
        AggregatorSpec::Median { iqr: None },
        AggregatorSpec::TrimmedMean {
            beta: 0.3,
            iqr: None,
        },
    ];
    let mut out = vec![
        base("iid-fedavg"),
        Scenario {
            split: "dirichlet0.5",
            ..base("dirichlet-fedavg")
        },
        Scenario {
            compression: Compression::TopK { fraction: 0.01 },
            ..base("iid-topk1%")
        },
        Scenario {
            compression: Compression::Int8,
            ..base("iid-int8")
        },
        Scenario {
            cluster_size: 4,
            ..base("iid-clusters4")
        },
        Scenario {
            model: ModelSpec::Cnn {
                side: 8,
                channels: 8,
                classes: 10,
            },
            ..base("iid-cnn8")
        },
    ];
    for split in ["iid", "dirichlet0.5"] {
        for attack in [Attack::SignFlip, Attack::Noise] {
            for aggregator in robust {
                out.push(Scenario {
                    split,
                    aggregator,
                    attack: Some(attack),
                    ..base(&format!(
                        "attack-{split}-{}-{}",
                        attack.name(),
                        aggregator.name()
                    ))
                });
            }
        }
    }
    // What helps robust rules on skewed data: server momentum smooths the noisier aggregate.
    for aggregator in &robust[1..] {
        out.push(Scenario {
            split: "dirichlet0.5",
            aggregator: *aggregator,
            attack: Some(Attack::SignFlip),
            server: ServerSpec::Fedavgm {
                lr: 1.0,
                momentum: 0.5,
            },
            ..base(&format!(
                "attack-dirichlet0.5-sign_flip-{}-fedavgm",
                aggregator.name()
            ))
        });
    }
    out
}

pub(crate) async fn run(args: FlBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.participants >= 4, "--participants must be at least 4");
    let flower = match &args.flower {
        Some(python) => Some(run_flower(python, &args)?),
        None => None,
    };
    let all = scenarios(args.participants);
    let chosen: Vec<&Scenario> = all
        .iter()
        .filter(|s| {
            args.only
                .as_ref()
                .is_none_or(|o| s.name.contains(o.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        bail!("no scenario matches --only");
    }
    let bar = ProgressBar::new(chosen.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar.set_prefix("bench fl");
    let centralised = centralised_accuracy(args.rounds)?;
    eprintln!(
        "centralised ceiling (same MLP, {} epochs on the whole training split): {centralised:.4}",
        args.rounds
    );
    eprintln!(
        "{:<52} {:>6} {:>9} {:>8} {:>10} {:>10}",
        "scenario", "acc", "ms/round", "total s", "bytes up", "bytes root"
    );
    for scenario in chosen {
        bar.set_message(scenario.name.clone());
        let (record, total_s, startup_s) = run_scenario(scenario, &args).await?;
        let rounds = record.metrics.len().max(1) as f64;
        let mut per_round: Vec<f64> = record.metrics.iter().map(|m| m.ms).collect();
        per_round.sort_by(f64::total_cmp);
        let ms_per_round = per_round.iter().sum::<f64>() / rounds;
        let bytes_up: u64 = record.metrics.iter().map(|m| m.bytes_up).sum();
        let bytes_root: u64 = record.metrics.iter().map(|m| m.bytes_root).sum();
        let final_acc = record.metrics.last().map_or(f32::NAN, |m| m.accuracy);
        let mut line = json!({
            "bench": "fl",
            "scenario": scenario.name,
            "split": scenario.split,
            "aggregator": scenario.aggregator.name(),
            "attack": scenario.attack.map_or("none", Attack::name),
            "compression": scenario.compression.name(),
            "hierarchy": if scenario.cluster_size > 1 { format!("clusters{}", scenario.cluster_size) } else { "flat".into() },
            "server": format!("{:?}", scenario.server),
            "participants": args.participants,
            "rounds": record.metrics.len(),
            "final_acc": final_acc,
            "centralised_acc": centralised,
            "ms_per_round": ms_per_round,
            "ms_per_round_p50": super::quantile(&per_round, 0.5),
            "total_s": total_s,
            "startup_s": startup_s,
            "bytes_up": bytes_up,
            "bytes_down": record.metrics.iter().map(|m| m.bytes_down).sum::<u64>(),
            "bytes_root": bytes_root,
            "dropped": record.metrics.iter().map(|m| m.dropped).sum::<u32>(),
        });
        if let Some(flower) = &flower {
            line["flower_ms_per_round"] = json!(flower.ms_per_round);
            line["flower_total_s"] = json!(flower.total_s);
            line["flower_final_acc"] = json!(flower.final_acc);
            line["round_speedup"] = json!(flower.ms_per_round / ms_per_round);
            line["total_speedup"] = json!(flower.total_s / total_s);
        }
        bar.suspend(|| {
            eprintln!(
                "{:<52} {:>6.4} {:>9.2} {:>8.2} {:>10} {:>10}",
                scenario.name, final_acc, ms_per_round, total_s, bytes_up, bytes_root
            );
            if args.json {
                println!("{line}");
            }
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Starts a coordinator and the participants, runs the job; (record, whole time from the
/// first node's start to the final model, start-up part), both in seconds.
async fn run_scenario(
    scenario: &Scenario,
    args: &FlBenchArgs,
) -> anyhow::Result<(JobRecord, f64, f64)> {
    let started = Instant::now();
    let root = tempfile::tempdir()?;
    let config = |name: String| {
        let mut c = NodeConfig::new(root.path().join(name));
        c.mdns = false;
        c.api = None;
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")];
        c.libp2p_metrics = false;
        c.timing.announce_interval_per_peer = Duration::from_millis(50);
        c
    };
    let coordinator = Node::start(config("coordinator".into())).await?;
    let boot = coordinator.net.listen_addrs()[0]
        .clone()
        .with(Protocol::P2p(coordinator.net.peer_id()));
    let n = args.participants;
    let attackers = if scenario.attack.is_some() {
        (n * 3) / 10
    } else {
        0
    };
    let mut starting = Vec::new();
    for k in 0..n {
        let mut c = config(format!("p{k}"));
        c.bootstrap = vec![boot.clone()];
        let split = match scenario.split {
            "iid" => String::new(),
            _ => ":dirichlet=0.5".into(),
        };
        c.datasets = vec![(
            "digits".into(),
            format!("sklearn-digits:train:{k}/{n}{split}"),
        )];
        // The attackers are spread out (0, 3, 6 of 10), not bunched at the start.
        let stride = n / attackers.max(1);
        c.train_attack = scenario
            .attack
            .filter(|_| k % stride == 0 && k / stride < attackers);
        starting.push(Node::start(c));
    }
    let mut participants = Vec::new();
    for node in futures::future::join_all(starting).await {
        participants.push(node?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let holders = coordinator
            .net
            .peers()
            .await?
            .iter()
            .filter(|p| {
                p.state == PeerState::Alive
                    && p.capabilities
                        .as_ref()
                        .is_some_and(|c| c.datasets.iter().any(|d| d.tag == "digits"))
            })
            .count();
        if holders >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {holders} of {n} participants were seen in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let startup_s = started.elapsed().as_secs_f64();
    let spec = JobSpec {
        name: scenario.name.clone(),
        model: scenario.model.clone(),
        initial: None,
        dataset: "digits".into(),
        rounds: args.rounds,
        train: mycel_core::fl::LocalTraining {
            epochs: 1,
            batch: 32,
            lr: 0.1,
            momentum: 0.0,
            prox: 0.0,
        },
        participants: mycel_core::fl::Participation {
            min: (n - attackers) as u32,
            ..Default::default()
        },
        device: Default::default(),
        aggregator: scenario.aggregator,
        server: scenario.server,
        compression: scenario.compression,
        cluster_size: scenario.cluster_size,
        round_deadline_ms: 30_000,
        eval: Some("sklearn-digits:test".into()),
        seed: 0,
    };
    let record = coordinator.training.run_job(spec, |_| {}).await?;
    let total_s = started.elapsed().as_secs_f64();
    for node in participants {
        node.shutdown().await;
    }
    coordinator.shutdown().await;
    Ok((record, total_s, startup_s))
}

/// The ceiling: the same MLP trained on the whole training split for `epochs` epochs.
fn centralised_accuracy(epochs: u32) -> anyhow::Result<f32> {
    use mycel_ml::train::{Architecture, Classifier, TrainParams};
    let train = mycel_ml::data::load_source("sklearn-digits:train")?;
    let test = mycel_ml::data::load_source("sklearn-digits:test")?;
    let mut model = Classifier::new(
        Architecture::Mlp {
            layers: vec![64, 32, 10],
        },
        0,
    )?;
    let params = TrainParams {
        epochs: epochs as usize,
        batch: 32,
        lr: 0.1,
        momentum: 0.0,
        prox: 0.0,
    };
    model.train(&train, &params, 0)?;
    Ok(model.evaluate(&test)?.1)
}

struct Flower {
    ms_per_round: f64,
    total_s: f64,
    final_acc: f64,
}

/// Runs Flower's simulation of the IID FedAvg setting and reads its JSON line.
fn run_flower(python: &str, args: &FlBenchArgs) -> anyhow::Result<Flower> {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("running Flower's simulation of the same setting");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let output = std::process::Command::new(python)
        .arg(&args.flower_script)
        .args(["--clients", &args.participants.to_string()])
        .args(["--rounds", &args.rounds.to_string()])
        .output()
        .with_context(|| format!("running {python} {}", args.flower_script.display()))?;
    let wall = started.elapsed().as_secs_f64();
    spinner.finish_and_clear();
    if !output.status.success() {
        bail!(
            "Flower's run failed (is flwr[simulation] installed for {python}?): {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .context("Flower's script printed no JSON line")?;
    let flower = Flower {
        ms_per_round: line["ms_per_round"].as_f64().context("ms_per_round")?,
        total_s: wall,
        final_acc: line["final_acc"].as_f64().unwrap_or(f64::NAN),
    };
    eprintln!(
        "Flower {}: {:.1} ms per round, {:.2} s in all (the command, start-up included), final accuracy {:.4}",
        line["flwr"].as_str().unwrap_or("?"),
        flower.ms_per_round,
        flower.total_s,
        flower.final_acc
    );
    Ok(flower)
}
