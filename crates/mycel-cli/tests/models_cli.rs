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
    let run = |args: &[&str]| common::run_cli(&node, args);

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

/// A stand-in for the Hugging Face hub: serves files under /ORG/REPO/resolve/main/FILE with
/// the headers hf-hub reads (etag, x-repo-commit, Content-Range) and byte ranges.
fn fake_hub(files: std::path::PathBuf) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut range_start: Option<u64> = None;
            let mut range_end: Option<u64> = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = value.trim().split_once('-').unwrap_or(("0", ""));
                    range_start = a.parse().ok();
                    range_end = b.parse().ok();
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_owned();
            // /org/repo/resolve/main/file
            let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
            let file = (parts.len() == 5 && parts[2] == "resolve")
                .then(|| files.join(parts[1]).join(parts[4]))
                .filter(|f| f.is_file());
            let Some(file) = file else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let bytes = std::fs::read(&file).unwrap();
            let size = bytes.len() as u64;
            let start = range_start.unwrap_or(0).min(size);
            let end = range_end
                .unwrap_or(size.saturating_sub(1))
                .min(size.saturating_sub(1));
            let body = &bytes[start as usize..=end as usize];
            let etag = blake3::hash(&bytes).to_hex();
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{size}\r\netag: \"{etag}\"\r\nx-repo-commit: 0123456789abcdef0123456789abcdef01234567\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    (format!("http://{addr}"), served)
}

#[test]
fn models_named_on_the_hub_are_fetched_from_hf_endpoint() {
    let root = tempfile::tempdir().unwrap();
    let hub = root.path().join("hub");
    write_tiny_bert(&hub.join("tiny-bert")).unwrap();
    std::fs::create_dir_all(hub.join("tiny-llama")).unwrap();
    write_tiny_llama(&hub.join("tiny-llama").join("tiny-llama.gguf")).unwrap();
    let (endpoint, served) = fake_hub(hub);
    let api = format!("127.0.0.1:{}", free_port());
    let data_dir = root.path().join("node");
    let child = Command::new(MYCEL)
        .args([
            "node",
            "--no-mdns",
            "--api",
            &api,
            "--port",
            &free_port().to_string(),
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--model",
            "hf:test/tiny-bert",
            "--model",
            "hf:test/tiny-llama/tiny-llama.gguf",
        ])
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", root.path().join("hf-cache"))
        .env("MYCEL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let node = common::NodeProcess {
        child,
        data_dir,
        api: api.clone(),
    };
    wait_until(Duration::from_secs(60), "the node serves its API", || {
        node.peer_id().is_some()
    });
    let models = node.get("/v1/models").unwrap();
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"tiny-bert") && names.contains(&"tiny-llama"),
        "{names:?}"
    );
    // Three files of the embedding model and the GGUF, each asked for (metadata, then body).
    assert!(served.load(std::sync::atomic::Ordering::Relaxed) >= 4);
    // Both are published from the hub cache as pinned blobs under their ids, for peers to
    // fetch.
    let ids: Vec<String> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mycel"]["content_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{models}");
    wait_until(Duration::from_secs(30), "the models are published", || {
        let listed = node.get("/api/blobs").unwrap_or_default();
        ids.iter().all(|id| {
            listed["blobs"].as_array().is_some_and(|b| {
                b.iter()
                    .any(|e| e["id"] == id.as_str() && e["pinned"] == true)
            })
        })
    });

    // A name the hub does not have is a clear error at start-up.
    let output = Command::new(MYCEL)
        .args([
            "node",
            "--no-mdns",
            "--api",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--port", &free_port().to_string()])
        .arg("--data-dir")
        .arg(root.path().join("other"))
        .args(["--model", "hf:test/missing/none.gguf"])
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", root.path().join("hf-cache"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("HF_ENDPOINT") && stderr.contains("hf:test/missing"),
        "{stderr}"
    );
}
