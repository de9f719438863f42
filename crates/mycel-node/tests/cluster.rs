//! Real nodes on 127.0.0.1: convergence, the HTTP API, and bad input from peers.

mod common;

use std::time::Duration;

use common::{
    addrs_of, announcement, cluster, connected_to, free_port, http_get, join, local_config,
    raw_peer, wait_converged, wait_until,
};
use mycel_core::id::ContentId;
use mycel_core::membership::PeerState;
use mycel_core::statement::{ModelKind, ModelOffer};
use mycel_core::wire::Rejection;
use mycel_core::Keypair;
use mycel_net::Multiaddr;
use mycel_node::Node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_converge_with_capabilities() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 10).await;
    wait_converged(&nodes, Duration::from_secs(30)).await;

    let ids: Vec<String> = nodes.iter().map(|n| n.net.peer_id().to_base58()).collect();
    for node in &nodes {
        let peers = node.net.peers().await.unwrap();
        let me = node.net.peer_id().to_base58();
        for id in ids.iter().filter(|id| **id != me) {
            let peer = peers
                .iter()
                .find(|p| p.peer_id == *id)
                .expect("every peer is known");
            assert_eq!(peer.state, PeerState::Alive);
            let caps = peer.capabilities.as_ref().expect("capabilities announced");
            assert!(caps.hardware.cores >= 1 && caps.hardware.memory_bytes > 0);
            assert!(
                !peer.addrs.is_empty(),
                "announcements carry listen addresses"
            );
        }
    }
    // The DHT joins after membership: the first random walk seeds the routing table.
    wait_until(
        Duration::from_secs(20),
        "every routing table is seeded",
        || async {
            for node in &nodes {
                if node.net.status().await.unwrap().routing_table_peers < 5 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// Probes of peers held alive without a connection, run fast on a healthy network, fail
/// nobody: every dial is answered, and the connections they open close again with a goodbye
/// (degree stays in its band).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_of_live_peers_fail_nobody_and_leave_the_degree_alone() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..6 {
        let bootstrap = nodes.first().map(addrs_of).unwrap_or_default();
        let mut config = local_config(&root.path().join(format!("node-{i}")), bootstrap, false);
        config.limits.target_peers = 2;
        config.timing.probe_interval = Duration::from_millis(200);
        config.timing.probe_cooldown = Duration::from_secs(2);
        // Connections above the band are shed after this (the bootstrap node starts above it).
        config.timing.connection_grace = Duration::from_secs(1);
        nodes.push(Node::start(config).await.unwrap());
    }
    wait_converged(&nodes, Duration::from_secs(30)).await;
    // Six seconds of probing: each node could probe every unconnected peer twice.
    let answered = |nodes: &[Node]| -> u64 {
        nodes
            .iter()
            .map(|n| n.net.metrics().probes_total("answered"))
            .sum()
    };
    let before = answered(&nodes);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(answered(&nodes) > before + 10, "{}", answered(&nodes));
    // (Missed pings on two busy cores are not the probes' doing; an unanswered probe is.)
    for node in &nodes {
        let metrics = node.net.metrics();
        assert_eq!(metrics.peer_failures_total("unanswered"), 0);
        assert_eq!(metrics.probes_total("unanswered"), 0);
    }
    wait_until(
        Duration::from_secs(20),
        "every node back within its band (target 2, high-water mark 4)",
        || async {
            let mut held = Vec::new();
            for node in &nodes {
                held.push(node.net.status().await.unwrap().connected_peers);
            }
            held.iter().all(|h| *h <= 4)
        },
    )
    .await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// A late joiner learns everyone from a neighbour's snapshot (anti-entropy), not from the
/// next round of announcements: here announcements are a minute apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_pulls_a_snapshot_instead_of_waiting_for_gossip() {
    let root = tempfile::tempdir().unwrap();
    let slow = |dir: &str, bootstrap| {
        let mut config = local_config(&root.path().join(dir), bootstrap, false);
        config.timing.announce_interval = Duration::from_secs(60);
        config.timing.announce_ttl = Duration::from_secs(180);
        config
    };
    let mut nodes = vec![Node::start(slow("n0", vec![])).await.unwrap()];
    for i in 1..4 {
        let config = slow(&format!("n{i}"), addrs_of(&nodes[0]));
        nodes.push(Node::start(config).await.unwrap());
    }
    wait_converged(&nodes, Duration::from_secs(20)).await;
    // Everyone has announced; nothing more is gossiped for a minute.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let late = Node::start(slow("late", addrs_of(&nodes[3])))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the late node knows all four",
        || async { late.net.status().await.unwrap().alive_with_capabilities == 4 },
    )
    .await;
    late.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// New models are announced at once; a change of load waits until half an interval has
/// passed since the last announcement (all nodes on a busy host would otherwise re-announce
/// together), then goes out without waiting for the periodic one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_changes_go_out_at_once_and_load_changes_are_paced() {
    let root = tempfile::tempdir().unwrap();
    let paced = |dir: &str, bootstrap| {
        let mut config = local_config(&root.path().join(dir), bootstrap, false);
        config.timing.announce_interval = Duration::from_secs(8);
        config.timing.announce_ttl = Duration::from_secs(24);
        config
    };
    let a = Node::start(paced("a", vec![])).await.unwrap();
    let b = Node::start(paced("b", addrs_of(&a))).await.unwrap();
    let nodes = [a, b];
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let [a, b] = nodes;
    let a_id = a.net.peer_id();
    let seen_by_b = || async { b.net.peer(a_id).await.unwrap().unwrap() };
    let before = seen_by_b().await;
    let mut caps = before.capabilities.clone().unwrap();

    caps.models = vec![ModelOffer {
        id: ContentId::of(b"weights"),
        name: "tiny".into(),
        kind: ModelKind::Generation,
        engine: "candle-f32".into(),
    }];
    a.net.refresh_capabilities(caps.clone()).await.unwrap();
    wait_until(Duration::from_secs(2), "b sees the new model", || async {
        seen_by_b()
            .await
            .capabilities
            .is_some_and(|c| c.models == caps.models)
    })
    .await;
    let after_model = seen_by_b().await;
    assert!(after_model.seq > before.seq);

    caps.load.queue_depth += 7;
    a.net.refresh_capabilities(caps.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        seen_by_b().await.seq,
        after_model.seq,
        "a load change right after an announcement waits"
    );
    // Half of the 8 s interval (jitter does not apply to it), well before the periodic one.
    wait_until(Duration::from_secs(4), "b sees the new load", || async {
        seen_by_b()
            .await
            .capabilities
            .is_some_and(|c| c.load.queue_depth == caps.load.queue_depth)
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_token_and_serves_peers_and_metrics() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 3).await;
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let api = nodes[0].api_addr.unwrap();
    let token = nodes[0].token.clone();
    let others: Vec<String> = nodes[1..]
        .iter()
        .map(|n| n.net.peer_id().to_base58())
        .collect();

    let checks = tokio::task::spawn_blocking(move || {
        for path in ["/api/status", "/api/peers", "/metrics"] {
            let url = format!("http://{api}{path}");
            assert_eq!(http_get(&url, None).0, 401, "{path} without a token");
            assert_eq!(
                http_get(&url, Some("wrong-token-wrong-token")).0,
                401,
                "{path} wrong token"
            );
        }

        let (status, body) = http_get(&format!("http://{api}/api/peers"), Some(&token));
        assert_eq!(status, 200);
        let peers: serde_json::Value = serde_json::from_str(&body).unwrap();
        let listed: Vec<&str> = peers
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["peer_id"].as_str())
            .collect();
        for other in &others {
            assert!(
                listed.contains(&other.as_str()),
                "{other} missing from {listed:?}"
            );
        }
        let first = &peers[0];
        assert_eq!(first["state"], "alive");
        assert!(first["last_seen"].as_u64().unwrap() > 0);

        let (status, body) = http_get(&format!("http://{api}/api/status"), Some(&token));
        assert_eq!(status, 200);
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["network"]["alive"], 2);

        let (status, body) = http_get(&format!("http://{api}/metrics"), Some(&token));
        assert_eq!(status, 200);
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        let alive = scrape
            .samples
            .iter()
            .find(|s| s.metric == "mycel_peers" && s.labels.get("state") == Some("alive"))
            .expect("mycel_peers{state=alive}");
        assert!(
            matches!(alive.value, prometheus_parse::Value::Gauge(v) if v == 2.0),
            "{:?} in\n{body}",
            alive.value
        );
        for metric in [
            "mycel_rejected_messages_total",
            "mycel_messages_total",
            "mycel_connections",
        ] {
            assert!(
                scrape.samples.iter().any(|s| s.metric == metric),
                "{metric} missing"
            );
        }
    });
    checks.await.unwrap();
    for node in nodes {
        node.shutdown().await;
    }
}

/// `from` relays a genuine announcement of `key` with `seq`; waits until `to` accepted it.
async fn relay_genuine(from: &Node, to: &Node, key: &Keypair, seq: u64) {
    let peer = key.public().to_peer_id();
    from.net
        .publish_raw(announcement(key, seq).to_bytes())
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "a genuine statement is accepted",
        || async {
            to.net
                .peer(peer)
                .await
                .unwrap()
                .is_some_and(|p| p.seq == seq)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_oversized_and_malformed_messages_are_rejected_and_cost_the_sender() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 2).await;
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let (victim, attacker) = (&nodes[0], &nodes[1]);
    let metrics = victim.net.metrics().clone();
    let other = Keypair::generate_ed25519();
    let other_id = other.public().to_peer_id();

    // A genuine statement relayed by the attacker is accepted.
    relay_genuine(attacker, victim, &other, 10).await;

    let rejected = |reason: Rejection| metrics.rejected_for(reason);

    // Forged: a well-formed body that is not the one that was signed.
    let mut forged = announcement(&other, 11);
    forged.body = announcement(&other, 13).body;
    attacker.net.publish_raw(forged.to_bytes()).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the forgery is rejected",
        || async { rejected(Rejection::BadSignature) >= 1 },
    )
    .await;

    // Replayed: a genuine statement older than the one accepted, as honest neighbours relay
    // now and then (gossip and sync race). Refused and counted, but not charged.
    let score = || async { victim.net.reputation(attacker.net.peer_id()).await.unwrap() };
    let before = score().await;
    attacker
        .net
        .publish_raw(announcement(&other, 5).to_bytes())
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the replay is rejected",
        || async { rejected(Rejection::Replayed) >= 1 },
    )
    .await;
    assert!(
        score().await >= before - 0.01,
        "a stale genuine statement cost its relay"
    );

    // Oversized (above the statement limit, below gossipsub's frame limit) and malformed.
    attacker
        .net
        .publish_raw(vec![0xa5; 20 * 1024])
        .await
        .unwrap();
    attacker
        .net
        .publish_raw(b"definitely not CBOR".to_vec())
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "oversized and malformed are rejected",
        || async { rejected(Rejection::Oversized) >= 1 && rejected(Rejection::Malformed) >= 1 },
    )
    .await;

    // None of it changed what the victim believes, and it still accepts genuine news.
    assert_eq!(victim.net.peer(other_id).await.unwrap().unwrap().seq, 10);
    relay_genuine(attacker, victim, &other, 12).await;

    // Enough forgeries exhaust the attacker's reputation: it is banned and disconnected.
    for i in 0..6u8 {
        let mut forged = announcement(&other, 20 + u64::from(i));
        forged.signature[0] ^= 0xff;
        if attacker.net.publish_raw(forged.to_bytes()).await.is_err() {
            break;
        }
    }
    let attacker_id = attacker.net.peer_id();
    wait_until(
        Duration::from_secs(10),
        "the attacker is banned and disconnected",
        || async { !connected_to(victim, attacker_id).await },
    )
    .await;
    assert!(rejected(Rejection::BadSignature) >= 2);
    for node in nodes {
        node.shutdown().await;
    }
}

/// `signed` encoded with its fields in another order: CBOR that decodes to the same
/// statement, but is not the one encoding nodes publish.
fn reordered(signed: &mycel_core::statement::SignedStatement) -> Vec<u8> {
    fn head(out: &mut Vec<u8>, major: u8, len: usize) {
        match len {
            0..=23 => out.push(major << 5 | len as u8),
            24..=255 => out.extend([major << 5 | 24, len as u8]),
            _ => {
                out.push(major << 5 | 25);
                out.extend((len as u16).to_be_bytes());
            }
        }
    }
    let mut out = Vec::new();
    head(&mut out, 5, 3);
    for (key, value) in [
        ("signature", &signed.signature),
        ("public_key", &signed.public_key),
        ("body", &signed.body),
    ] {
        head(&mut out, 3, key.len());
        out.extend(key.as_bytes());
        head(&mut out, 2, value.len());
        out.extend(value);
    }
    out
}

/// Another encoding of a genuine statement (its fields in another order) decodes the same
/// but would be a second gossip message for it: a node refuses it as malformed, charges the
/// neighbour that sent it and neither applies nor passes it on; the one encoding of the same
/// statement is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_encoding_of_a_statement_is_refused_and_never_passed_on() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 3).await;
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let (victim, attacker) = (&nodes[0], &nodes[1]);
    let other = Keypair::generate_ed25519();
    let other_id = other.public().to_peer_id();
    let genuine = announcement(&other, 7);
    let variant = reordered(&genuine);
    assert_ne!(variant, genuine.to_bytes());
    assert_eq!(
        mycel_core::statement::SignedStatement::from_bytes(&variant).unwrap(),
        genuine,
        "the variant decodes to the very statement"
    );
    let metrics = victim.net.metrics();
    let before = metrics.rejected_for(Rejection::Malformed);
    attacker.net.publish_raw(variant).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the variant is refused",
        || async { metrics.rejected_for(Rejection::Malformed) > before },
    )
    .await;
    for node in &nodes {
        assert!(node.net.peer(other_id).await.unwrap().is_none());
    }
    assert!(victim.net.reputation(attacker.net.peer_id()).await.unwrap() <= -19.9);
    relay_genuine(attacker, victim, &other, 7).await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// Strangers (one key each, as cheap as keys are) ask a relay for more reservations than it
/// keeps: those past its limit are refused, each refusal counted in the relay's /metrics and
/// charged to the peer that asked, and the relay goes on serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_reservations_past_its_limit_counts_and_charges_them() {
    const SYBILS: usize = 6;
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config = local_config(&root.path().join("relay"), Vec::new(), false);
    config.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()];
    config.nat.relay_server = mycel_net::RelayServer::On;
    config.nat.max_reservations = 2;
    // Declared as an operator of a public relay would: reservations carry this address.
    config.nat.external_addrs = config.listen.clone();
    let relay = Node::start(config).await.unwrap();
    let relay_id = relay.net.peer_id();
    let circuit: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{relay_id}/p2p-circuit")
        .parse()
        .unwrap();
    let served = |result| relay.net.metrics().nat_events("relay_served", result);

    let mut sybils = Vec::new();
    for _ in 0..SYBILS {
        let sybil = raw_peer(addrs_of(&relay)).await;
        let id = sybil.peer_id();
        wait_until(Duration::from_secs(20), "a sybil is connected", || async {
            connected_to(&relay, id).await
        })
        .await;
        sybil.listen(circuit.clone()).await.unwrap();
        sybils.push(sybil);
    }
    wait_until(
        Duration::from_secs(30),
        "the relay answered every request",
        || async { served("reservation_accepted") + served("reservation_denied") >= SYBILS as u64 },
    )
    .await;
    assert_eq!(served("reservation_accepted"), 2, "as many as it keeps");
    assert_eq!(served("reservation_denied"), SYBILS as u64 - 2);
    let mut charged = 0;
    for sybil in &sybils {
        let score = relay.net.reputation(sybil.peer_id()).await.unwrap();
        if score < -0.5 {
            charged += 1;
        }
    }
    assert_eq!(
        charged,
        SYBILS - 2,
        "each refused peer, and only those, is charged"
    );

    // The relay goes on serving: a newcomer joins through it.
    let newcomer = join(root.path(), "newcomer", &relay).await;
    let newcomer_id = newcomer.net.peer_id();
    wait_until(
        Duration::from_secs(20),
        "the relay sees the newcomer alive",
        || async { common::holds_alive(&relay, newcomer_id).await },
    )
    .await;
}
