//! mDNS discovery between two `mycel` processes in two network namespaces joined by a veth
//! pair (libp2p's mDNS never uses the loopback interface). Needs root for `ip netns`; where
//! namespaces cannot be made the test says so on stderr and returns, unless
//! MYCEL_REQUIRE_NETNS=1 (set by CI), where that is a failure.

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::VethPair;
use common::{spawn_node, wait_until};

#[test]
fn two_nodes_find_each_other_by_mdns_across_a_veth_pair() {
    let ns = match VethPair::new("m", 7) {
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
    for (i, addr) in ns.addrs.iter().enumerate() {
        let prefix = ns.exec(i);
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
