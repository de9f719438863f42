//! `mycel put`, `get`, `pin`, `unpin`, `blobs` and `node --model CID` between `mycel node`
//! processes on 127.0.0.1, one of them killed with SIGKILL in the middle of a fetch.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{free_port, run_cli as run, spawn_node, wait_until, NodeProcess, MYCEL};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn start(root: &Path, name: &str, port: u16, boot: Option<&str>, extra: &[&str]) -> NodeProcess {
    let mut args: Vec<String> = vec![
        "--no-mdns".into(),
        "--listen".into(),
        format!("/ip4/127.0.0.1/tcp/{port}"),
    ];
    if let Some(boot) = boot {
        args.extend(["--bootstrap".into(), boot.to_owned()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let api = format!("127.0.0.1:{}", free_port());
    let node = spawn_node(&[], &root.join(name), &api, &args);
    wait_until(LIMIT, "the node serves its API", || {
        node.peer_id().is_some()
    });
    node
}

fn listed(node: &NodeProcess) -> Vec<Value> {
    node.get("/api/blobs").unwrap()["blobs"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn files_and_directories_travel_between_nodes_and_a_killed_fetcher_resumes() {
    let root = tempfile::tempdir().unwrap();
    let port_a = free_port();
    // A serves slowly (4 MiB/s), so that B can be killed in the middle of a fetch.
    let a = start(root.path(), "a", port_a, None, &["--upload-limit", "4MiB"]);
    let boot = format!("/ip4/127.0.0.1/tcp/{port_a}/p2p/{}", a.peer_id().unwrap());
    let port_b = free_port();
    let b = start(root.path(), "b", port_b, Some(&boot), &[]);

    // A file and a directory put on A.
    let file = root.path().join("data.bin");
    let data = bytes(12 * 1024 * 1024 + 3, 1);
    std::fs::write(&file, &data).unwrap();
    let dir = root.path().join("dir");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("a.txt"), b"alpha").unwrap();
    std::fs::write(dir.join("sub/b.bin"), bytes(300_000, 2)).unwrap();
    let (ok, out, err) = run(&a, &["put", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let file_id = out.trim().to_owned();
    assert!(file_id.starts_with("blake3:"), "{out}");
    let (ok, out, err) = run(&a, &["put", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    let dir_id = out.trim().to_owned();
    let (ok, out, _) = run(&a, &["blobs"]);
    assert!(
        ok && out.contains(&file_id) && out.contains(&dir_id),
        "{out}"
    );

    // The directory, fetched by B through `mycel get`.
    let copy = root.path().join("copy");
    let (ok, _, err) = run(&b, &["get", &dir_id, "-o", copy.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(copy.join("a.txt")).unwrap(), b"alpha");
    assert_eq!(
        std::fs::read(copy.join("sub/b.bin")).unwrap(),
        bytes(300_000, 2)
    );

    // The file: B is killed with SIGKILL while it fetches (12 MiB at 4 MiB/s).
    let mut get = Command::new(MYCEL)
        .args(["get", &file_id, "-o"])
        .arg(root.path().join("out.bin"))
        .args(["--api", &b.api, "--data-dir"])
        .arg(&b.data_dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let partial = b
        .data_dir
        .join("blobs/partial")
        .join(&file_id["blake3:".len()..]);
    wait_until(LIMIT, "B's fetch has begun", || partial.exists());
    std::thread::sleep(Duration::from_millis(700));
    drop(b);
    let _ = get.wait();
    let b = start(root.path(), "b", port_b, Some(&boot), &[]);
    // After the restart, the part-fetched blob is neither listed nor served whole.
    assert!(listed(&b).iter().all(|blob| blob["id"] != file_id.as_str()));
    let (ok, out, err) = run(
        &b,
        &[
            "get",
            &file_id,
            "-o",
            root.path().join("out.bin").to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("out.bin"), "{out}");
    assert_eq!(std::fs::read(root.path().join("out.bin")).unwrap(), data);

    // A byte range straight from the API.
    let token = std::fs::read_to_string(b.data_dir.join("api.token")).unwrap();
    let mut response = ureq::get(&format!("http://{}/api/blobs/{file_id}", b.api))
        .header("Authorization", &format!("Bearer {}", token.trim()))
        .header("Range", "bytes=1000000-1000099")
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 206);
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes 1000000-1000099/{}", data.len()).as_str()
    );
    let part = response.body_mut().read_to_vec().unwrap();
    assert_eq!(part, data[1_000_000..1_000_100]);

    // Pins: what B fetched is not pinned until asked, and DELETE unpins.
    let pinned = |node: &NodeProcess, id: &str| {
        listed(node)
            .iter()
            .find(|blob| blob["id"] == id)
            .map(|blob| blob["pinned"] == true)
    };
    assert_eq!(pinned(&b, &file_id), Some(false));
    let (ok, _, err) = run(&b, &["pin", &file_id]);
    assert!(ok, "{err}");
    assert_eq!(pinned(&b, &file_id), Some(true));
    let (ok, _, err) = run(&b, &["unpin", &file_id]);
    assert!(ok, "{err}");
    assert_eq!(pinned(&b, &file_id), Some(false));

    // Bad input: a malformed id and an id nobody holds are clear errors.
    let (ok, _, err) = run(&b, &["pin", "blake3:nothex"]);
    assert!(!ok && err.contains("not a content id"), "{err}");
    let absent = format!("blake3:{}", "0".repeat(64));
    let (ok, _, err) = run(&b, &["unpin", &absent]);
    assert!(!ok && err.contains("404"), "{err}");
}

#[test]
fn a_node_asked_to_serve_a_model_by_content_id_fetches_it_from_its_peers() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama.gguf");
    mycel_ml::fixtures::write_tiny_llama(&model).unwrap();
    let port_a = free_port();
    let a = start(root.path(), "a", port_a, None, &[]);
    let (ok, out, err) = run(&a, &["put", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    let id = out.trim().to_owned();

    let boot = format!("/ip4/127.0.0.1/tcp/{port_a}/p2p/{}", a.peer_id().unwrap());
    let b = start(
        root.path(),
        "b",
        free_port(),
        Some(&boot),
        &["--model", &id],
    );
    // Served by B itself once fetched: listed as local, answered there.
    wait_until(LIMIT, "B serves the fetched model", || {
        b.get("/v1/models").is_some_and(|models| {
            models["data"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["mycel"]["content_id"] == id.as_str() && m["mycel"]["local"] == true)
        })
    });
    let (ok, out, err) = run(
        &b,
        &[
            "chat",
            "--model",
            &id,
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "the",
        ],
    );
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty());
}

const FULL_DISK_TEST: &str = "a_full_disk_is_said_as_such_and_a_corrupt_database_with_the_way_out";

/// Unmounts the small file system when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `mycel put` onto a node whose disk fills up says "no space left", not that the node
/// cannot be reached; a node whose database file is corrupt refuses to start and says how
/// to recover, not "another node using this --data-dir". The disk is an 8 MiB tmpfs (root
/// needed: where mounting fails the test says so and returns, unless
/// MYCEL_REQUIRE_NETNS=1, set by CI, which makes that a failure).
#[test]
fn a_full_disk_is_said_as_such_and_a_corrupt_database_with_the_way_out() {
    let root = tempfile::tempdir().unwrap();
    let disk = root.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&disk)
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        other => {
            mycel_ml::fixtures::skip_unless_required(
                FULL_DISK_TEST,
                "MYCEL_REQUIRE_NETNS",
                &format!("cannot mount a small tmpfs ({other:?})"),
            );
            return;
        }
    }
    let _mounted = Mounted(disk.clone());
    let node = start(&disk, "node", free_port(), None, &[]);
    let file = root.path().join("big.bin");
    std::fs::write(&file, bytes(24 * 1024 * 1024, 2)).unwrap();
    let (ok, _, stderr) = run(&node, &["put", file.to_str().unwrap()]);
    assert!(!ok, "a 24 MiB put onto 8 MiB succeeded");
    assert!(stderr.contains("no space left"), "{stderr}");
    assert!(!stderr.contains("cannot reach"), "{stderr}");
    // The node is still fine: a small file goes in once the space is free again.
    let small = root.path().join("small.bin");
    std::fs::write(&small, bytes(1000, 3)).unwrap();
    let (ok, out, stderr) = run(&node, &["put", small.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(!out.trim().is_empty());
    drop(node);

    // A corrupt state database: the node refuses to start, saying what to do.
    let data_dir = root.path().join("corrupt");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("state.redb"), bytes(256 * 1024, 4)).unwrap();
    let out = Command::new(MYCEL)
        .args(["node", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--api", &format!("127.0.0.1:{}", free_port()), "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("corrupt") && stderr.contains("mv "),
        "{stderr}"
    );
    assert!(!stderr.contains("another mycel node"), "{stderr}");
}
