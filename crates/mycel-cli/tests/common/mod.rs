//! Running `mycel` processes in tests.

#![allow(dead_code)]

pub mod netns;
#[path = "../../../mycel-node/tests/common/port.rs"]
mod port;

#[allow(unused_imports)] // not every test file picks ports
pub use port::free_port;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const MYCEL: &str = env!("CARGO_BIN_EXE_mycel");

/// A `mycel node` child process, killed with SIGKILL when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub api: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Flags that make failure detection fast enough for a test.
pub const FAST: [&str; 6] = [
    "--ping-interval",
    "1",
    "--announce-ttl",
    "6",
    "--max-missed-pings",
    "2",
];

/// Starts `mycel node` with `args` and the [`FAST`] timings, optionally under a prefix
/// command (e.g. `ip netns exec`).
pub fn spawn_node(prefix: &[&str], data_dir: &Path, api: &str, args: &[String]) -> NodeProcess {
    spawn_node_with(prefix, data_dir, api, &FAST, args)
}

/// Starts `mycel node` with `timings` (flags such as [`FAST`]'s) and `args`.
pub fn spawn_node_with(
    prefix: &[&str],
    data_dir: &Path,
    api: &str,
    timings: &[&str],
    args: &[String],
) -> NodeProcess {
    let mut command = if prefix.is_empty() {
        Command::new(MYCEL)
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg(MYCEL);
        c
    };
    command
        .arg("node")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--api", api])
        .args(timings)
        .args(args)
        // MYCEL_TEST_LOG=<filter> shows more of the nodes' logs (warnings otherwise).
        .env(
            "MYCEL_LOG",
            std::env::var("MYCEL_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = command.spawn().expect("mycel starts");
    NodeProcess {
        child,
        data_dir: data_dir.to_path_buf(),
        api: api.to_owned(),
    }
}

impl NodeProcess {
    /// GET a JSON path of the node's API, `None` while it is not up yet.
    pub fn get(&self, path: &str) -> Option<Value> {
        let token = std::fs::read_to_string(self.data_dir.join("api.token")).ok()?;
        let mut response = ureq::get(&format!("http://{}{path}", self.api))
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .call()
            .ok()?;
        response.body_mut().read_json().ok()
    }

    pub fn peer_id(&self) -> Option<String> {
        self.get("/api/status")?["network"]["peer_id"]
            .as_str()
            .map(str::to_owned)
    }

    /// The state ("alive"/"failed") this node holds for `peer`.
    pub fn state_of(&self, peer: &str) -> Option<String> {
        let peers = self.get("/api/peers")?;
        peers
            .as_array()?
            .iter()
            .find(|p| p["peer_id"] == peer)
            .and_then(|p| p["state"].as_str().map(str::to_owned))
    }
}

/// Polls `condition` every 100 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `mycel ARGS --api … --data-dir …` against `node`: (success, stdout, stderr).
pub fn run_cli(node: &NodeProcess, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(MYCEL)
        .args(args)
        .args(["--api", &node.api, "--data-dir"])
        .arg(&node.data_dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
