//! `mycel node --model` serving tiny models, driven by `mycel models`, `mycel embed` and
//! `mycel chat` as a user would.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{free_port, spawn_node, wait_until, MYCEL};
use mycel_ml::fixtures::{write_tiny_bert, write_tiny_llama};

#[test]
fn node_serves_models_to_the_cli() {
    let root = tempfile::tempdir().unwrap();
    write_tiny_bert(&root.path().join("tiny-bert")).unwrap();
    write_tiny_llama(&root.path().join("tiny-llama.gguf")).unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> = vec![
        "--port".into(),
        free_port().to_string(),
        "--no-mdns".into(),
        "--model".into(),
        root.path().join("tiny-bert").display().to_string(),
        "--model".into(),
        root.path().join("tiny-llama.gguf").display().to_string(),
    ];
    let node = spawn_node(&[], &root.path().join("node"), &api, &args);
    wait_until(Duration::from_secs(60), "the node serves its API", || {
        node.peer_id().is_some()
    });
    let run = |args: &[&str]| {
        let output = Command::new(MYCEL)
            .args(args)
            .args(["--api", &api, "--data-dir"])
            .arg(&node.data_dir)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    let (ok, out, err) = run(&["models"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("tiny-bert") && out.contains("embedding"),
        "{out}"
    );
    assert!(
        out.contains("tiny-llama") && out.contains("generation"),
        "{out}"
    );
    assert!(out.contains("blake3:"), "{out}");

    let (ok, out, err) = run(&["embed", "--model", "tiny-bert", "the cat", "the dog"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains("(16 dimensions)"), "{out}");

    let chat = [
        "chat",
        "--model",
        "tiny-llama",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "the",
    ];
    let (ok, first, err) = run(&chat);
    assert!(ok, "{err}");
    let (_, second, _) = run(&chat);
    assert!(!first.trim().is_empty());
    assert_eq!(first, second, "greedy answers repeat");

    let (ok, _, err) = run(&["chat", "--model", "no-such-model", "hi"]);
    assert!(!ok);
    assert!(
        err.contains("no-such-model") && err.contains("mycel models"),
        "{err}"
    );
    let (ok, _, err) = run(&["chat", "--model", "tiny-llama", "--max-tokens", "0", "hi"]);
    assert!(!ok);
    assert!(err.contains("max_tokens"), "{err}");
}

#[test]
fn a_missing_model_path_is_a_clear_startup_error() {
    let root = tempfile::tempdir().unwrap();
    let output = Command::new(MYCEL)
        .args(["node", "--no-mdns", "--data-dir"])
        .arg(root.path().join("node"))
        .args(["--api", &format!("127.0.0.1:{}", free_port())])
        .args(["--port", &free_port().to_string()])
        .args(["--model", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("fetch-models.sh") && stderr.contains("/nonexistent"),
        "{stderr}"
    );
}
