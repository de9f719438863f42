//! Network namespaces for tests that need real kernels' networking between `mycel` processes
//! (mDNS, partitions, NAT, UPnP). Needs root; the namespaces are deleted on drop.

// The namespaces and the command helpers are shared with `mycel bench nat` and `bench partition`.
#[path = "../../src/netlab.rs"]
mod netlab;
#[allow(unused_imports)]
pub use netlab::{
    ip, output, run, NatLab, Star, UpnpLab, VethPair, HOME_A, HOME_B, INTERNET, INTERNET_ADDRS,
};

use std::process::Command;

use serde_json::Value;

use super::{spawn_node, wait_until, NodeProcess, MYCEL};

/// A lab of namespaces the nodes of a test run in.
pub trait Lab {
    /// The name of namespace `i`.
    fn ns(&self, i: usize) -> &str;
}

impl Lab for NatLab {
    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }
}

impl Lab for VethPair {
    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }
}

impl Lab for Star {
    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }
}

impl Lab for UpnpLab {
    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }
}

/// A node running in namespace `ns` of a lab.
pub struct Member {
    pub process: NodeProcess,
    pub ns: usize,
}

/// A node in namespace `ns` listening on `port` on every interface (its API on
/// 127.0.0.1:`port` + 3877 there), without mDNS, with `args` after those flags.
pub fn lab_node(
    lab: &impl Lab,
    ns: usize,
    dir: &std::path::Path,
    port: u16,
    args: &[&str],
) -> Member {
    let common = ["--no-mdns", "--port", &port.to_string()].map(str::to_owned);
    let args: Vec<String> = common
        .into_iter()
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    Member {
        process: spawn_node(
            &["ip", "netns", "exec", lab.ns(ns)],
            dir,
            &format!("127.0.0.1:{}", port + 3877),
            &args,
        ),
        ns,
    }
}

/// Runs `mycel ARGS` against `member` inside its namespace: (success, stdout, stderr).
pub fn cli(lab: &impl Lab, member: &Member, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", lab.ns(member.ns), MYCEL])
        .args(args)
        .args(["--api", &member.process.api, "--data-dir"])
        .arg(&member.process.data_dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mycel COMMAND --json` against `member`, parsed.
pub fn json(lab: &impl Lab, member: &Member, command: &str) -> Option<Value> {
    let (ok, out, _) = cli(lab, member, &[command, "--json"]);
    ok.then(|| serde_json::from_str(&out).ok()).flatten()
}

/// `mycel status --json` of `member` (null while it does not answer).
pub fn status(lab: &impl Lab, member: &Member) -> Value {
    json(lab, member, "status").unwrap_or(Value::Null)
}

/// `viewer`'s record of the peer `id`, from `mycel peers --json`.
pub fn peer(lab: &impl Lab, viewer: &Member, id: &str) -> Value {
    json(lab, viewer, "peers")
        .and_then(|list| {
            list.as_array()?
                .iter()
                .find(|p| p["peer_id"] == id)
                .cloned()
        })
        .unwrap_or(Value::Null)
}

/// `member`'s peer id, once it answers.
pub fn id_of(lab: &impl Lab, member: &Member) -> String {
    let mut id = String::new();
    wait_until(std::time::Duration::from_secs(60), "the node is up", || {
        id = status(lab, member)["network"]["peer_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        !id.is_empty()
    });
    id
}

/// `member`'s /metrics, read inside its namespace.
pub fn metrics(lab: &impl Lab, m: &Member) -> String {
    let token = std::fs::read_to_string(m.process.data_dir.join("api.token")).unwrap_or_default();
    let out = Command::new("ip")
        .args(["netns", "exec", lab.ns(m.ns), "curl", "-s", "-H"])
        .arg(format!("Authorization: Bearer {}", token.trim()))
        .arg(format!("http://{}/metrics", m.process.api))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the series `name` (a metric's name, with its labels if it has any) in a
/// /metrics text.
pub fn gauge(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `mycel_rejected_messages_total{reason}` of `member`: what it charged its peers for.
pub fn rejected(lab: &impl Lab, m: &Member, reason: &str) -> u64 {
    let series = format!("mycel_rejected_messages_total{{reason=\"{reason}\"}}");
    gauge(&metrics(lab, m), &series).unwrap_or(0)
}

/// `mycel_nat_events_total{event, result}` of `member`.
pub fn nat_events(lab: &impl Lab, m: &Member, event: &str, result: &str) -> u64 {
    let series = format!("mycel_nat_events_total{{event=\"{event}\",result=\"{result}\"}}");
    gauge(&metrics(lab, m), &series).unwrap_or(0)
}
