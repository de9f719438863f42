//! `mycel bench fl`: federated training of the scikit-learn digits across real nodes on
//! loopback (one coordinator, N participants each holding a partition), per scenario: data
//! split, aggregator, attack, compression and hierarchy. With `--flower PYTHON`, Flower's
//! FedAvg simulation of the IID MLP setting runs first, on the same machine, on the same
//! work (Mycel's partitions, initial weights and minibatch orders, written to a plan for
//! bench/flower_digits.py), warmed up, with one and with 0.2 CPUs per client; the faster is
//! compared against the `iid-fedavg` scenario.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::multiaddr::Protocol;
use mycel_core::fl::{AggregatorSpec, Attack, Compression, JobSpec, ModelSpec, ServerSpec};
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
    /// Run only the scenarios whose name contains this, or one of these (comma-separated:
    /// e.g. "attack", "iid-fedavg,secagg").
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
    /// Differential privacy (central noise), with the budget the job ends at.
    privacy: Option<mycel_core::fl::Privacy>,
    /// Secure aggregation.
    secure: Option<mycel_core::fl::SecureAggregation>,
    /// Participants that leave every round right after sending their key shares.
    dropouts: usize,
    /// Participants in sites of `cluster_size` (`--site`), this many sites (0: none stated,
    /// `--participants` of them); attackers are in the last site.
    sites: usize,
}

impl Scenario {
    /// How many take part.
    fn participants(&self, args: &FlBenchArgs) -> usize {
        match self.sites {
            0 => args.participants,
            sites => sites * self.cluster_size as usize,
        }
    }
}

/// The ε a differentially private scenario may spend over the job, at [`DP_DELTA`].
const DP_EPSILON: f64 = 8.0;
/// The δ of the differentially private scenarios.
const DP_DELTA: f64 = 1e-5;

/// The smallest noise multiplier (to 0.01) at which `rounds` rounds with every participant
/// in each (q = 1) spend at most `epsilon` at `delta`.
fn noise_for(rounds: u32, epsilon: f64, delta: f64) -> f64 {
    let spent = |sigma: f64| {
        let mut accountant = mycel_core::dp::Accountant::new();
        accountant
            .compose(1.0, sigma, u64::from(rounds))
            .map_or(f64::INFINITY, |()| {
                accountant.epsilon(delta).unwrap_or(f64::INFINITY)
            })
    };
    let (mut low, mut high) = (0.01, 100.0);
    while high - low > 0.005 {
        let mid = (low + high) / 2.0;
        if spent(mid) <= epsilon {
            high = mid;
        } else {
            low = mid;
        }
    }
    (high * 100.0).ceil() / 100.0
}

fn scenarios(n: usize, rounds: u32) -> Vec<Scenario> {
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
        privacy: None,
        secure: None,
        dropouts: 0,
        sites: 0,
    };
    // DP-FedAvg spending at most ε = 8 at δ = 1e-5 over the job (the private issue's target)
    // with every participant in every round; secure aggregation at a majority threshold.
    let dp_eps8 = Some(mycel_core::fl::Privacy {
        clip: 1.0,
        noise_multiplier: noise_for(rounds, DP_EPSILON, DP_DELTA),
        delta: DP_DELTA,
        epsilon: Some(DP_EPSILON),
    });
    let secure = Some(mycel_core::fl::SecureAggregation {
        threshold: 0.5,
        neighbours: 0,
    });
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
        // DP-FedAvg with central noise: every participant in every round, the noise the
        // rounds need to spend at most ε = 8 at δ = 1e-5 (the private issue's target).
        Scenario {
            privacy: dp_eps8,
            ..base("iid-dp-eps8")
        },
        // The same privacy with distributed noise: each participant clips and adds its share
        // of the noise, under secure aggregation (the coordinator sees only the noised sum).
        Scenario {
            privacy: dp_eps8,
            secure,
            ..base("iid-dp-secagg-eps8")
        },
        // Secure aggregation, with 3 of 10 participants (3 in 10 of them) leaving every
        // round after they shared their secrets: their masks are taken out with the others'
        // shares.
        Scenario {
            secure,
            ..base("iid-secagg")
        },
        Scenario {
            secure,
            dropouts: (n * 3) / 10,
            ..base(&format!("iid-secagg-drop{}", (n * 3) / 10))
        },
        // The same with neighbourhoods of 6 (SecAgg+): each participant masks with 6 others,
        // threshold 4 of its 7, which any 3 dropouts of 10 leave.
        Scenario {
            secure: secure.map(|s| mycel_core::fl::SecureAggregation { neighbours: 6, ..s }),
            dropouts: (n * 3) / 10,
            ..base(&format!("iid-secagg6-drop{}", (n * 3) / 10))
        },
        // Secure sums inside clusters of 4 (a short last cluster joins the one before),
        // FedAvg over the clusters.
        Scenario {
            secure,
            cluster_size: 4,
            ..base("iid-clusters4-secagg")
        },
    ];
    // Secure sums in clusters of 4 and a robust rule over the clusters (the private issue's
    // third target): 12 participants stating three sites of 4, so that the clusters are the
    // sites, and 3 sign-flip attackers together in the last site. Beside it: the same without
    // attackers (what the secure sums and the median cost in accuracy, against plain FedAvg
    // over the same clusters) and the attack against FedAvg over the clusters.
    let sites = |name: &str, aggregator, attack, secure| Scenario {
        aggregator,
        attack,
        secure,
        cluster_size: 4,
        sites: 3,
        ..base(name)
    };
    let median = AggregatorSpec::Median { iqr: None };
    let fedavg = AggregatorSpec::Fedavg { iqr: None };
    out.extend([
        sites("sites3x4-fedavg", fedavg, None, None),
        sites("sites3x4-secagg-median", median, None, secure),
        sites(
            "sites3x4-secagg-median-sign_flip3",
            median,
            Some(Attack::SignFlip),
            secure,
        ),
        sites(
            "sites3x4-secagg-fedavg-sign_flip3",
            fedavg,
            Some(Attack::SignFlip),
            secure,
        ),
    ]);
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
    if let Some(flower) = &flower {
        eprintln!(
            "Flower {} ({} CPUs per client, the faster of {}): {:.1} ms per round, job {:.2} s, \
             start-up {:.2} s, final accuracy {:.4}",
            flower.version,
            flower.cpus_per_client,
            flower
                .runs
                .iter()
                .map(|r| format!("{} -> {:.1} ms", r["cpus_per_client"], r["ms_per_round"]))
                .collect::<Vec<_>>()
                .join(", "),
            flower.ms_per_round,
            flower.job_s,
            flower.startup_s,
            flower.final_acc
        );
    }
    let all = scenarios(args.participants, args.rounds);
    let chosen: Vec<&Scenario> = all
        .iter()
        .filter(|s| {
            args.only
                .as_ref()
                .is_none_or(|o| o.split(',').any(|o| s.name.contains(o)))
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
        "scenario", "acc", "ms/round", "job s", "bytes up", "bytes root"
    );
    for scenario in chosen {
        bar.set_message(scenario.name.clone());
        let run = run_scenario(scenario, &args).await?;
        let record = &run.record;
        anyhow::ensure!(
            record.metrics.len() == args.rounds as usize,
            "{}: {} of {} rounds ran",
            scenario.name,
            record.metrics.len(),
            args.rounds
        );
        // Everything a round costs: wall time between the ends of consecutive rounds (after
        // the round's record is on disk), the first from the job's start.
        let mut per_round = run.round_ms.clone();
        let ms_per_round = per_round.iter().sum::<f64>() / per_round.len().max(1) as f64;
        per_round.sort_by(f64::total_cmp);
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
            "participants": scenario.participants(&args),
            "sites": scenario.sites,
            "rounds": record.metrics.len(),
            "final_acc": final_acc,
            "centralised_acc": centralised,
            "ms_per_round": ms_per_round,
            "ms_per_round_p50": super::quantile(&per_round, 0.5),
            "round_ms": run.round_ms,
            "ms_in_round_record": record.metrics.iter().map(|m| m.ms).sum::<f64>() / record.metrics.len().max(1) as f64,
            "job_s": run.job_s,
            "cpu_ms_per_round": run.cpu_s * 1000.0 / record.metrics.len().max(1) as f64,
            "startup_s": run.startup_s,
            "total_s": run.startup_s + run.job_s,
            "bytes_up": bytes_up,
            "bytes_down": record.metrics.iter().map(|m| m.bytes_down).sum::<u64>(),
            "bytes_root": bytes_root,
            "dropped": record.metrics.iter().map(|m| m.dropped).sum::<u32>(),
            "secure_aggregation": scenario.secure.is_some(),
            "neighbours": scenario.secure.map(|s| s.neighbours),
            "dropouts": scenario.dropouts,
            "epsilon": record.metrics.last().and_then(|m| m.epsilon),
            "delta": scenario.privacy.map(|p| p.delta),
            "noise_multiplier": scenario.privacy.map(|p| p.noise_multiplier),
            "clip": scenario.privacy.map(|p| p.clip),
        });
        // Flower runs the IID FedAvg MLP setting only: the ratio belongs to that scenario.
        if let Some(flower) = flower.as_ref().filter(|_| scenario.name == FLOWER_SCENARIO) {
            let gap = (f64::from(final_acc) - flower.final_acc).abs();
            line["flower"] = json!(flower.version);
            line["flower_cpus_per_client"] = json!(flower.cpus_per_client);
            line["flower_runs"] = json!(flower.runs);
            line["flower_ms_per_round"] = json!(flower.ms_per_round);
            line["flower_job_s"] = json!(flower.job_s);
            line["flower_startup_s"] = json!(flower.startup_s);
            line["flower_final_acc"] = json!(flower.final_acc);
            line["accuracy_gap"] = json!(gap);
            line["round_speedup"] = json!(flower.ms_per_round / ms_per_round);
            line["job_speedup"] = json!(flower.job_s / run.job_s);
            bar.suspend(|| {
                eprintln!(
                    "against Flower: {:.1}x per round, {:.1}x per job; accuracy {final_acc:.4} vs \
                     {:.4}",
                    flower.ms_per_round / ms_per_round,
                    flower.job_s / run.job_s,
                    flower.final_acc
                );
                if gap > 0.01 {
                    eprintln!(
                        "WARNING: the accuracies differ by {gap:.4} (> 0.01) on the same \
                         initialisation and minibatches"
                    );
                }
            });
        }
        bar.suspend(|| {
            eprintln!(
                "{:<52} {:>6.4} {:>9.2} {:>8.2} {:>10} {:>10}",
                scenario.name, final_acc, ms_per_round, run.job_s, bytes_up, bytes_root
            );
            if args.json {
                super::emit_json(line);
            }
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// One scenario's run.
struct ScenarioRun {
    record: JobRecord,
    /// Starting the nodes until the coordinator sees every participant, s.
    startup_s: f64,
    /// From the job's start to its final model, recorded, s.
    job_s: f64,
    /// CPU time of every node (all run in this process) over the job, s.
    cpu_s: f64,
    /// Each round's wall time, ms: between the ends of consecutive rounds (the first from the
    /// job's start), so that selection, evaluation, storing the model and recording the round
    /// all count.
    round_ms: Vec<f64>,
}

/// Starts a coordinator and the participants, runs the job.
async fn run_scenario(scenario: &Scenario, args: &FlBenchArgs) -> anyhow::Result<ScenarioRun> {
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
    let n = scenario.participants(args);
    let attackers = if scenario.attack.is_some() {
        (n * 3) / 10
    } else {
        0
    };
    // Dropouts, like attackers, spread out.
    let dropouts = scenario.dropouts;
    let drop_stride = n / dropouts.max(1);
    let mut starting = Vec::new();
    for k in 0..n {
        let mut c = config(format!("p{k}"));
        c.bootstrap = vec![boot.clone()];
        c.train_for = mycel_core::fl::TrainFor::Coordinators(vec![coordinator.net.peer_id()]);
        let split = match scenario.split {
            "iid" => String::new(),
            _ => ":dirichlet=0.5".into(),
        };
        c.datasets = vec![(
            "digits".into(),
            format!("sklearn-digits:train:{k}/{n}{split}"),
        )];
        // The attackers are spread out (0, 3, 6 of 10), not bunched at the start; with
        // sites, together in the last.
        let stride = n / attackers.max(1);
        let attacks = match scenario.sites {
            0 => k % stride == 0 && k / stride < attackers,
            _ => k >= n - attackers,
        };
        c.train_attack = scenario.attack.filter(|_| attacks);
        if scenario.sites > 0 {
            c.site = Some(format!("site-{}", k / scenario.cluster_size as usize));
        }
        c.train_drop_after_shares = k % drop_stride == 0 && k / drop_stride < dropouts;
        starting.push(Node::start(c));
    }
    let mut participants = Vec::new();
    for node in futures::future::join_all(starting).await {
        participants.push(node?);
    }
    let limits = (Duration::from_secs(60), Duration::from_millis(10));
    super::wait_for_peers(&coordinator, n, "participants", limits, |p| {
        p.capabilities
            .as_ref()
            .is_some_and(|c| c.datasets.iter().any(|d| d.tag == "digits"))
    })
    .await?;
    let startup_s = started.elapsed().as_secs_f64();
    let spec = JobSpec {
        name: scenario.name.clone(),
        model: scenario.model.clone(),
        initial: None,
        dataset: "digits".into(),
        rounds: args.rounds,
        train: LOCAL,
        participants: mycel_core::fl::Participation {
            min: (n - attackers - dropouts) as u32,
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
        privacy: scenario.privacy,
        secure_aggregation: scenario.secure,
    };
    let job_started = Instant::now();
    let cpu_started = super::process_cpu_seconds();
    // On the runtime's workers, as a node runs a job it is given (`Training::start`), not
    // on the thread that waits for the benchmark.
    let training = coordinator.training.clone();
    let job = tokio::spawn(async move {
        let ends = std::sync::Mutex::new(Vec::new());
        let record = training
            .run_job(spec, |_| {
                ends.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Instant::now())
            })
            .await;
        record.map(|record| (record, ends.into_inner().unwrap_or_else(|e| e.into_inner())))
    });
    let (record, ends) = job.await??;
    let job_s = job_started.elapsed().as_secs_f64();
    let cpu_s = super::process_cpu_seconds() - cpu_started;
    let round_ms = std::iter::once(job_started)
        .chain(ends.iter().copied())
        .zip(&ends)
        .map(|(from, to)| to.duration_since(from).as_secs_f64() * 1000.0)
        .collect();
    for node in participants {
        node.shutdown().await;
    }
    coordinator.shutdown().await;
    Ok(ScenarioRun {
        record,
        startup_s,
        job_s,
        cpu_s,
        round_ms,
    })
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
        batch: LOCAL.batch as usize,
        lr: LOCAL.lr,
        momentum: 0.0,
        prox: 0.0,
    };
    model.train(&train, &params, 0)?;
    Ok(model.evaluate(&test)?.1)
}

/// Flower's side of the comparison: the faster of its runs.
struct Flower {
    version: String,
    cpus_per_client: f64,
    ms_per_round: f64,
    job_s: f64,
    startup_s: f64,
    final_acc: f64,
    /// Every run's JSON line.
    runs: Vec<serde_json::Value>,
}

/// The scenario Flower simulates.
const FLOWER_SCENARIO: &str = "iid-fedavg";
/// The layers of that scenario's MLP.
const FLOWER_LAYERS: [usize; 3] = [64, 32, 10];
/// Local training in every scenario.
const LOCAL: mycel_core::fl::LocalTraining = mycel_core::fl::LocalTraining {
    epochs: 1,
    batch: 32,
    lr: 0.1,
    momentum: 0.0,
    prox: 0.0,
};
/// Ray's CPUs per Flower client tried: one actor per core, and five actors per core.
const FLOWER_CPUS_PER_CLIENT: [f64; 2] = [1.0, 0.2];

/// What Flower must train so that both sides do the same work: Mycel's partitions of the
/// training split, its test split, its initial weights (job seed 0) and, per round and client,
/// the row order Mycel's participant holding that partition trains in.
fn flower_plan(args: &FlBenchArgs) -> anyhow::Result<serde_json::Value> {
    use mycel_core::fl::{participant_seed, round_seed};
    use mycel_ml::data::load_source;
    use mycel_ml::train::{epoch_orders, Classifier};
    let n = args.participants;
    let mut clients = Vec::with_capacity(n);
    let mut seeds = Vec::with_capacity(n);
    for k in 0..n {
        let data = load_source(&format!("sklearn-digits:train:{k}/{n}"))?;
        anyhow::ensure!(data.dim == FLOWER_LAYERS[0], "the digits have 64 features");
        seeds.push((data.len(), data.digest()));
        clients.push(json!({ "x": data.features, "y": data.labels }));
    }
    let orders: Vec<Vec<Vec<Vec<usize>>>> = (1..=args.rounds)
        .map(|round| {
            seeds
                .iter()
                .map(|(rows, digest)| {
                    let seed = participant_seed(round_seed(0, round), digest);
                    epoch_orders(*rows, LOCAL.epochs as usize, seed)
                })
                .collect()
        })
        .collect();
    let test = load_source("sklearn-digits:test")?;
    let initial = Classifier::new(
        ModelSpec::Mlp {
            layers: FLOWER_LAYERS.to_vec(),
        },
        0,
    )?
    .weights()?;
    Ok(json!({
        "layers": FLOWER_LAYERS,
        "lr": LOCAL.lr,
        "batch": LOCAL.batch,
        "rounds": args.rounds,
        "clients": clients,
        "test": { "x": test.features, "y": test.labels },
        "initial": initial,
        "orders": orders,
    }))
}

/// Runs Flower's simulation of the IID FedAvg setting on the same plan with each CPU share
/// per client and keeps the faster (by time per round).
fn run_flower(python: &str, args: &FlBenchArgs) -> anyhow::Result<Flower> {
    let dir = tempfile::tempdir()?;
    let plan = dir.path().join("plan.json");
    std::fs::write(&plan, serde_json::to_vec(&flower_plan(args)?)?)?;
    let mut runs = Vec::new();
    for cpus in FLOWER_CPUS_PER_CLIENT {
        let spinner = ProgressBar::new_spinner();
        spinner.set_message(format!(
            "running Flower's simulation of the same job ({cpus} CPUs per client)"
        ));
        spinner.enable_steady_tick(Duration::from_millis(100));
        let output = std::process::Command::new(python)
            .arg(&args.flower_script)
            .arg("--plan")
            .arg(&plan)
            .args(["--cpus-per-client", &cpus.to_string()])
            .output()
            .with_context(|| format!("running {python} {}", args.flower_script.display()))?;
        spinner.finish_and_clear();
        // A side that failed gives no ratio.
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
        for key in ["ms_per_round", "job_s", "startup_s", "final_acc"] {
            anyhow::ensure!(
                line[key].as_f64().is_some_and(f64::is_finite),
                "Flower's run reported no {key}"
            );
        }
        runs.push(line);
    }
    let best = runs
        .iter()
        .min_by(|a, b| {
            let ms = |r: &serde_json::Value| r["ms_per_round"].as_f64().unwrap_or(f64::INFINITY);
            ms(a).total_cmp(&ms(b))
        })
        .context("no Flower run")?;
    let get = |key: &str| best[key].as_f64().unwrap_or(f64::NAN);
    Ok(Flower {
        version: best["flwr"].as_str().unwrap_or("?").to_owned(),
        cpus_per_client: get("cpus_per_client"),
        ms_per_round: get("ms_per_round"),
        job_s: get("job_s"),
        startup_s: get("startup_s"),
        final_acc: get("final_acc"),
        runs: runs.clone(),
    })
}
