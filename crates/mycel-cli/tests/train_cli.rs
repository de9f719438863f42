//! End to end: `mycel train` against `mycel node` processes holding digits partitions; the
//! coordinator is killed with SIGKILL mid-job and resumes from its last completed round.

mod common;

use std::time::Duration;

use common::{free_port, run_cli, spawn_node, wait_until, NodeProcess};

fn node(root: &std::path::Path, name: &str, port: u16, extra: &[String]) -> NodeProcess {
    let mut args = vec![
        "--no-mdns".to_owned(),
        "--listen".to_owned(),
        format!("/ip4/127.0.0.1/tcp/{port}"),
    ];
    args.extend_from_slice(extra);
    spawn_node(
        &[],
        &root.join(name),
        &format!("127.0.0.1:{}", free_port()),
        &args,
    )
}

const JOB: &str = r#"
name = "digits-e2e"
dataset = "digits"
rounds = 30
seed = 1
eval = "sklearn-digits:test"
round_deadline_ms = 10000

[model]
kind = "mlp"
layers = [64, 16, 10]

[train]
epochs = 2
batch = 8
lr = 0.05

[participants]
min = 3
"#;

#[test]
fn a_job_runs_from_the_cli_and_a_killed_coordinator_resumes_it() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let coordinator = node(root.path(), "coordinator", port, &[]);
    wait_until(Duration::from_secs(30), "the coordinator is up", || {
        coordinator.peer_id().is_some()
    });
    let boot = format!(
        "/ip4/127.0.0.1/tcp/{port}/p2p/{}",
        coordinator.peer_id().unwrap()
    );
    let participants: Vec<NodeProcess> = (0..3)
        .map(|k| {
            node(
                root.path(),
                &format!("p{k}"),
                free_port(),
                &[
                    "--bootstrap".into(),
                    boot.clone(),
                    "--dataset".into(),
                    format!("digits=sklearn-digits:train:{k}/3"),
                    "--train-for".into(),
                    coordinator.peer_id().unwrap(),
                ],
            )
        })
        .collect();
    let holders = |node: &NodeProcess| {
        node.get("/api/peers").map_or(0, |peers| {
            peers
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["capabilities"]["datasets"][0]["tag"] == "digits")
                .count()
        })
    };
    wait_until(
        Duration::from_secs(60),
        "the coordinator sees 3 datasets",
        || holders(&coordinator) == 3,
    );

    let job = root.path().join("job.toml");
    std::fs::write(&job, JOB).unwrap();
    let (ok, out, err) = run_cli(&coordinator, &["train", job.to_str().unwrap(), "--detach"]);
    assert!(ok, "{err}");
    let id = out.trim().to_owned();
    assert_eq!(id.len(), 32, "{out}");

    let round = |node: &NodeProcess| {
        node.get(&format!("/api/train/{id}"))
            .and_then(|j| j["round"].as_u64())
    };
    wait_until(Duration::from_secs(60), "two rounds complete", || {
        round(&coordinator).is_some_and(|r| r >= 2)
    });
    let seen = round(&coordinator).unwrap();
    assert!(seen < 30, "the job ended before the kill; make it longer");
    let data_dir = coordinator.data_dir.clone();
    drop(coordinator); // SIGKILL

    let coordinator = node(root.path(), "coordinator", port, &[]);
    wait_until(
        Duration::from_secs(120),
        "the resumed job completes",
        || {
            coordinator
                .get(&format!("/api/train/{id}"))
                .is_some_and(|j| j["state"] == "done")
        },
    );
    assert_eq!(coordinator.data_dir, data_dir);
    let job_state = coordinator.get(&format!("/api/train/{id}")).unwrap();
    let rounds: Vec<u64> = job_state["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["round"].as_u64().unwrap())
        .collect();
    assert_eq!(rounds, (1..=30).collect::<Vec<_>>(), "every round once");
    let resumed = job_state["resumed_after"].as_array().unwrap();
    assert_eq!(resumed.len(), 1, "{job_state}");
    let after = resumed[0].as_u64().unwrap();
    assert!(
        after >= seen && after < 30,
        "resumed after {after}, {seen} seen done"
    );
    let accuracy = job_state["metrics"][29]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.8, "accuracy {accuracy}");

    // `mycel train` on a finished job prints its table at once; `mycel jobs` lists it.
    let (ok, out, err) = run_cli(&coordinator, &["train", job.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("job {id} done: 30 rounds")), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.trim_start().starts_with("30 "))
            .count(),
        1,
        "{out}"
    );
    let (ok, out, _) = run_cli(&coordinator, &["jobs"]);
    assert!(ok && out.contains(&id) && out.contains("done"), "{out}");

    // A bad spec is refused with the reason.
    std::fs::write(&job, JOB.replace("rounds = 30", "rounds = 0")).unwrap();
    let (ok, _, err) = run_cli(&coordinator, &["train", job.to_str().unwrap()]);
    assert!(!ok && err.contains("rounds must be"), "{err}");

    // The API itself refuses bad specs with an OpenAI-style 400 and the reason.
    let token = std::fs::read_to_string(coordinator.data_dir.join("api.token")).unwrap();
    let post = |body: &str| {
        let mut response = ureq::post(&format!("http://{}/api/train", coordinator.api))
            .config()
            .http_status_as_error(false)
            .build()
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.body_mut().read_json().unwrap();
        (
            status,
            body["error"]["message"].as_str().unwrap_or("").to_owned(),
        )
    };
    let (status, message) = post("{not json");
    assert_eq!(status, 400, "{message}");
    let (status, message) = post(
        r#"{"model":{"kind":"mlp","layers":[64,10]},"dataset":"digits","rounds":5,
            "train":{"epochs":1,"batch":0,"lr":0.1}}"#,
    );
    assert!(
        status == 400 && message.contains("train.batch"),
        "{status} {message}"
    );
    let (status, message) = post(r#"{"model":{"kind":"mlp","layers":[64,10]}}"#);
    assert!(
        status == 400 && message.contains("dataset"),
        "{status} {message}"
    );
    drop(participants);
}
