//! `mycel` node processes in network namespaces (see `netlab.rs`), for the benchmarks that run
//! nodes over real kernels' networking: `bench nat` and `bench partition`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// A `mycel node` running inside a namespace; killed on drop.
pub(crate) struct LabNode {
    child: Child,
    /// The namespace it runs in.
    pub(crate) ns: String,
    pub(crate) dir: PathBuf,
    /// Its API's address, inside the namespace.
    pub(crate) api: String,
    /// Its API token, read once the node has written it.
    token: OnceLock<String>,
}

impl Drop for LabNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LabNode {
    /// `mycel node --data-dir DIR --api API --no-mdns --no-upnp ARGS` in namespace `ns`.
    pub(crate) fn start(
        exe: &Path,
        ns: &str,
        dir: PathBuf,
        api: &str,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .arg("node")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--api", api, "--no-mdns", "--no-upnp"])
            .args(args)
            .env("MYCEL_LOG", super::node_log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(super::node_stderr())
            .spawn()
            .context("starting a node")?;
        Ok(Self {
            child,
            ns: ns.to_owned(),
            dir,
            api: api.to_owned(),
            token: OnceLock::new(),
        })
    }

    /// `mycel ARGS` against this node, inside its namespace: (success, stdout, stderr).
    pub(crate) fn cli(&self, exe: &Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", self.ns.as_str()])
            .arg(exe)
            .args(args)
            .args(["--api", &self.api, "--data-dir"])
            .arg(&self.dir)
            .output();
        match out {
            Ok(out) => (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ),
            Err(e) => (false, String::new(), e.to_string()),
        }
    }

    /// Its /api/status, or null while the node does not answer.
    pub(crate) fn status(&self) -> Value {
        self.api("/api/status").unwrap_or_default()
    }

    /// `GET PATH` of its API, from a thread that enters its namespace (milliseconds, where a
    /// `mycel` process per question would cost tens): the JSON answer, or none while the node
    /// does not answer.
    pub(crate) fn api(&self, path: &str) -> Option<Value> {
        let token = match self.token.get() {
            Some(token) => token,
            None => {
                let token = std::fs::read_to_string(self.dir.join("api.token")).ok()?;
                self.token.get_or_init(|| token.trim().to_owned())
            }
        };
        let url = format!("http://{}{path}", self.api);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Err(e) = crate::netlab::enter(&self.ns) {
                        eprintln!("cannot read the node's API: {e}");
                        return None;
                    }
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .timeout_global(Some(Duration::from_secs(2)))
                        .build()
                        .into();
                    agent
                        .get(&url)
                        .header("Authorization", &format!("Bearer {token}"))
                        .call()
                        .ok()?
                        .body_mut()
                        .read_json::<Value>()
                        .ok()
                })
                .join()
                .ok()
                .flatten()
        })
    }

    /// Its peer id, once it answers (within `limit`).
    pub(crate) fn peer_id(&self, limit: Duration) -> anyhow::Result<String> {
        let mut id = String::new();
        wait("a node is up", limit, || {
            id = self.status()["network"]["peer_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            !id.is_empty()
        })?;
        Ok(id)
    }
}

/// Polls `done` every 50 ms until it holds, or fails after `limit` naming `what`.
pub(crate) fn wait(what: &str, limit: Duration, done: impl FnMut() -> bool) -> anyhow::Result<()> {
    match poll(limit, Duration::from_millis(50), done) {
        Some(_) => Ok(()),
        None => bail!("timed out after {limit:?} waiting until {what}"),
    }
}

/// Polls `done` every `every` until it holds (the time that took) or `limit` passes (none).
pub(crate) fn poll(
    limit: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if done() {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Whole milliseconds of `d`.
pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The median of the numbers under `key` in `reports` (none when there are none).
pub(crate) fn median(reports: &[Value], key: &str) -> Option<f64> {
    let mut v: Vec<f64> = reports.iter().filter_map(|r| r[key].as_f64()).collect();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| super::quantile(&v, 0.5))
}
