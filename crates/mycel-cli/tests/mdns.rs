//! mDNS discovery between two `mycel` processes in two network namespaces joined by a veth
//! pair (libp2p's mDNS never uses the loopback interface). Needs root for `ip netns`; where
//! namespaces cannot be made the test says so on stderr and returns, unless
//! MYCEL_REQUIRE_NETNS=1 (set by CI), where that is a failure.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{spawn_node, wait_until};

struct Namespaces {
    names: [String; 2],
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn make_namespaces() -> Result<Namespaces, String> {
    let tag = std::process::id() % 100_000;
    let names = [format!("mycel-a-{tag}"), format!("mycel-b-{tag}")];
    let ns = Namespaces {
        names: names.clone(),
    };
    let (va, vb) = (format!("mva{tag}"), format!("mvb{tag}"));
    ip(&["netns", "add", &names[0]])?;
    ip(&["netns", "add", &names[1]])?;
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
    ip(&["link", "set", &va, "netns", &names[0]])?;
    ip(&["link", "set", &vb, "netns", &names[1]])?;
    for (name, dev, addr) in [
        (&names[0], &va, "10.213.7.1/24"),
        (&names[1], &vb, "10.213.7.2/24"),
    ] {
        ip(&["-n", name, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", name, "link", "set", dev, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        // A fresh namespace has no route for multicast; a LAN host has its default route.
        ip(&["-n", name, "route", "add", "default", "dev", dev])?;
    }
    Ok(ns)
}

#[test]
fn two_nodes_find_each_other_by_mdns_across_a_veth_pair() {
    let ns = match make_namespaces() {
        Ok(ns) => ns,
        Err(e) => {
            mycel_ml::fixtures::skip_unless_required(
                "two_nodes_find_each_other_by_mdns_across_a_veth_pair",
                "MYCEL_REQUIRE_NETNS",
                &format!("cannot create network namespaces ({e})"),
            );
            return;
        }
    };
    let root = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for (i, addr) in ["10.213.7.1", "10.213.7.2"].iter().enumerate() {
        let prefix = ["ip", "netns", "exec", ns.names[i].as_str()];
        let args = vec!["--listen".to_owned(), format!("/ip4/{addr}/tcp/4001")];
        nodes.push(spawn_node(
            &prefix,
            &root.path().join(format!("n{i}")),
            "127.0.0.1:7878",
            &args,
        ));
    }
    // Each API listens on its own namespace's loopback: ask through `mycel peers` run there.
    let peers_seen_by = |i: usize| -> Vec<(String, String)> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.names[i].as_str(),
                common::MYCEL,
                "peers",
                "--json",
            ])
            .arg("--data-dir")
            .arg(&nodes[i].data_dir)
            .output()
            .unwrap();
        let peers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        peers
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|p| {
                        let id = p["peer_id"].as_str().unwrap_or_default().to_owned();
                        (id, p["state"].as_str().unwrap_or_default().to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until(
        Duration::from_secs(60),
        "each node discovers the other by mDNS",
        || {
            let (a, b) = (peers_seen_by(0), peers_seen_by(1));
            a.len() == 1 && b.len() == 1 && a[0].1 == "alive" && b[0].1 == "alive"
        },
    );
}
