//! Federated training on a busy machine (a thread per core burning CPU beside the nodes, for
//! the whole test; a test binary of its own, so no other test shares the burners): a
//! coordinator that crashes mid-round is not trained for after it is gone, its resumed job
//! finishes, and a job whose deadline is far too short for this machine stretches it until
//! its rounds complete.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{addrs_of, local_config, restart, wait_for_datasets, wait_until};
use mycel_core::fl::{JobSpec, TrainFor};
use mycel_ml::train::{Classifier, Dataset, TrainParams};
use mycel_node::training::{JobState, LocalDataset};
use mycel_node::Node;

/// Burns a core until dropped.
struct Burner {
    running: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Burner {
    fn start(threads: usize) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let threads = (0..threads)
            .map(|_| {
                let running = running.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while running.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005) ^ 1);
                    }
                })
            })
            .collect();
        Self { running, threads }
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn job(rounds: u32, epochs: u32, deadline_ms: u64) -> JobSpec {
    let text = format!(
        r#"{{"name":"busy","model":{{"kind":"mlp","layers":[64,16,10]}},
        "dataset":"digits","rounds":{rounds},"train":{{"epochs":{epochs},"batch":32,"lr":0.1}},
        "participants":{{"min":3}},"round_deadline_ms":{deadline_ms},"seed":{deadline_ms}}}"#
    );
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_job_finishes_on_a_busy_machine() {
    let root = tempfile::tempdir().unwrap();
    let coordinator_config = || local_config(&root.path().join("coordinator"), vec![], false);
    let coordinator = Node::start(coordinator_config()).await.unwrap();
    // Each participant holds 12 copies of the digits: a round trains for a while.
    let digits = mycel_ml::data::load_source("sklearn-digits:train").unwrap();
    let mut data = Dataset {
        features: Vec::new(),
        labels: Vec::new(),
        ..digits.clone()
    };
    for _ in 0..12 {
        data.features.extend_from_slice(&digits.features);
        data.labels.extend_from_slice(&digits.labels);
    }
    let mut participants = Vec::new();
    for k in 0..3 {
        let mut config = local_config(
            &root.path().join(format!("p{k}")),
            addrs_of(&coordinator),
            false,
        );
        config.preloaded_datasets = vec![Arc::new(LocalDataset::new("digits", data.clone()))];
        config.train_for = TrainFor::Coordinators(vec![coordinator.net.peer_id()]);
        participants.push(Node::start(config).await.unwrap());
    }
    wait_for_datasets(&coordinator, 3).await;
    let burner = Burner::start(2);

    // How long one participant's epoch takes on this machine now; the crashed job's rounds
    // train for a few seconds whatever the machine's speed (one epoch took 58 ms on a fast
    // CI machine: the round was over before the coordinator could crash during it).
    let started = Instant::now();
    let mut classifier = Classifier::new(job(1, 1, 1).model, 1).unwrap();
    let params = TrainParams {
        epochs: 1,
        batch: 32,
        lr: 0.1,
        momentum: 0.0,
        prox: 0.0,
    };
    classifier.train(&data, &params, 1).unwrap();
    let epoch = started.elapsed();
    let epochs = (Duration::from_secs(3).as_secs_f64() / epoch.as_secs_f64()).ceil() as u32;
    let epochs = epochs.clamp(1, 1000);
    let one = epoch * epochs;
    eprintln!("one epoch's training: {epoch:?}; a round of {epochs} epochs: {one:?}");
    let spec = job(2, epochs, 60_000);

    // The coordinator crashes while the three train round 1 (the deadline is a minute away):
    // each stops at once rather than burn the machine for a round nobody waits for (and so
    // frees its training slot).
    let abandoned = || -> u64 {
        participants
            .iter()
            .map(|p| p.training.rounds_abandoned())
            .sum()
    };
    let id = coordinator.training.start(spec).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the three train round 1",
        || async {
            participants
                .iter()
                .all(|p| p.training.trainings_running() > 0)
        },
    )
    .await;
    coordinator.abort();
    let crashed = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the participants stop the dead coordinator's round",
        || async { abandoned() >= 3 },
    )
    .await;
    // The training threads themselves stop (within a minibatch), long before the round
    // would have been trained.
    wait_until(one / 2, "the training threads stop", || async {
        participants
            .iter()
            .all(|p| p.training.trainings_running() == 0)
    })
    .await;
    assert!(
        crashed.elapsed() < one,
        "stopped after {:?}, one round trains for {one:?}",
        crashed.elapsed()
    );
    // Started again, the coordinator resumes the job, and it finishes.
    let coordinator = restart(coordinator_config()).await;
    wait_for_datasets(&coordinator, 3).await;
    let ended = |coordinator: &Node, id| {
        let training = coordinator.training.clone();
        async move {
            training
                .job(id)
                .unwrap()
                .is_some_and(|r| r.state != JobState::Running)
        }
    };
    wait_until(Duration::from_secs(120), "the resumed job ends", || {
        ended(&coordinator, id)
    })
    .await;
    let record = coordinator.training.job(id).unwrap().unwrap();
    assert_eq!(record.state, JobState::Done, "{:?}", record.state);
    let rounds: Vec<u32> = record.metrics.iter().map(|m| m.round).collect();
    assert_eq!(rounds, [1, 2], "every round once");

    // A job of one epoch a round whose deadline is a third of what that takes here: each attempt that falls
    // short doubles it, and the rounds complete (a fixed deadline failed every attempt).
    let short = (epoch.as_millis() as u64 / 3).max(20);
    let id = coordinator.training.start(job(2, 1, short)).unwrap();
    wait_until(
        Duration::from_secs(180),
        "the short-deadline job ends",
        || ended(&coordinator, id),
    )
    .await;
    let record = coordinator.training.job(id).unwrap().unwrap();
    assert_eq!(record.state, JobState::Done, "{:?}", record.state);
    let attempts: Vec<u32> = record.metrics.iter().map(|m| m.attempts).collect();
    assert!(
        attempts.iter().all(|a| *a > 1),
        "each round needed a longer deadline: {attempts:?}"
    );
    drop(burner);
    coordinator.shutdown().await;
    for node in participants {
        node.shutdown().await;
    }
}
