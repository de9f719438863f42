//! Helpers shared by the node's integration tests: small clusters of real nodes on 127.0.0.1.

#![allow(dead_code)]

mod port;

#[allow(unused_imports)] // not every test file picks ports
pub use port::free_port;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use mycel_core::membership::PeerState;
use mycel_net::{Multiaddr, NetConfig, NetHandle, Registry, Timing};
use mycel_node::{Node, NodeConfig};

/// Timing short enough for tests to see announcements, failures and syncs quickly.
pub fn fast_timing() -> Timing {
    Timing {
        announce_interval: Duration::from_secs(2),
        announce_ttl: Duration::from_secs(6),
        // Test networks are small: keep the short interval at every size used here.
        announce_interval_per_peer: Duration::from_millis(100),
        ping_interval: Duration::from_secs(1),
        ping_timeout: Duration::from_secs(1),
        random_walk_interval: Duration::from_secs(5),
        max_sync_interval: Duration::from_secs(2),
        tick_interval: Duration::from_millis(100),
        ..Timing::default()
    }
}

/// A node config on 127.0.0.1 (TCP and QUIC on free ports), no mDNS, no API unless `api`.
pub fn local_config(dir: &Path, bootstrap: Vec<Multiaddr>, api: bool) -> NodeConfig {
    let mut config = NodeConfig::new(dir.to_path_buf());
    config.listen = vec![
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
    ];
    config.bootstrap = bootstrap;
    config.mdns = false;
    config.api = api.then(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    config.timing = fast_timing();
    config
}

/// The dialable addresses of `node`, with its peer id.
pub fn addrs_of(node: &Node) -> Vec<Multiaddr> {
    let peer = node.net.peer_id();
    node.net
        .listen_addrs()
        .iter()
        .map(|a| a.clone().with(Protocol::P2p(peer)))
        .collect()
}

/// Starts `n` nodes in `root`, each bootstrapping from the first; the first has an API.
pub async fn cluster(root: &Path, n: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..n {
        let bootstrap = nodes.first().map(addrs_of).unwrap_or_default();
        let config = local_config(&root.join(format!("node-{i}")), bootstrap, i == 0);
        nodes.push(Node::start(config).await.expect("node starts"));
    }
    nodes
}

/// Starts a node in `root/name` (no API) that bootstraps from `via`.
pub async fn join(root: &Path, name: &str, via: &Node) -> Node {
    Node::start(local_config(&root.join(name), addrs_of(via), false))
        .await
        .expect("node starts")
}

/// Polls `condition` every 50 ms until it holds, panicking with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `node` holds a connection to `peer` (a peer it does not know: no).
pub async fn connected_to(node: &Node, peer: mycel_net::PeerId) -> bool {
    node.net
        .peer(peer)
        .await
        .unwrap()
        .is_some_and(|p| p.connected)
}

/// Waits until every node sees every other alive with capabilities.
pub async fn wait_converged(nodes: &[Node], limit: Duration) {
    let n = nodes.len();
    wait_until(
        limit,
        "every node sees every other alive with capabilities",
        || async {
            for node in nodes {
                if node.net.status().await.unwrap().alive_with_capabilities < n - 1 {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// A genuine announcement of `key` with `seq`, valid for a minute from now.
pub fn announcement(key: &mycel_core::Keypair, seq: u64) -> mycel_core::statement::SignedStatement {
    announcement_at(key, seq, Vec::new())
}

/// Like [`announcement`], claiming the addresses `addrs`.
pub fn announcement_at(
    key: &mycel_core::Keypair,
    seq: u64,
    addrs: Vec<String>,
) -> mycel_core::statement::SignedStatement {
    use mycel_core::statement::{Announcement, Capabilities, SignedStatement, Statement};
    let now = mycel_net::now_ms();
    SignedStatement::sign(
        key,
        &Statement::Announce(Announcement {
            seq,
            issued_at: now,
            expires_at: now + 60_000,
            capabilities: Capabilities::default(),
            addrs,
            reachability: Default::default(),
            relay: false,
            operator: None,
            full: false,
        }),
    )
}

/// A bare libp2p peer on 127.0.0.1 (no node behind it), for tests that need a peer which
/// misbehaves: it answers whatever protocol the test accepts on it, however the test likes.
pub async fn raw_peer(bootstrap: Vec<Multiaddr>) -> NetHandle {
    raw_peer_keyed(mycel_core::Keypair::generate_ed25519(), bootstrap).await
}

/// [`raw_peer`] with the identity `keypair` (a peer that signs what it sends).
pub async fn raw_peer_keyed(keypair: mycel_core::Keypair, bootstrap: Vec<Multiaddr>) -> NetHandle {
    let mut config = NetConfig::new(keypair);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstrap = bootstrap;
    config.mdns = false;
    config.timing = fast_timing();
    let (net, _events, _task) =
        mycel_net::spawn(config, Box::new(|floor| floor), &mut Registry::default())
            .await
            .unwrap();
    net
}

/// Starts a node as soon as the stopped or crashed one's tasks have released its files.
pub async fn restart(config: NodeConfig) -> Node {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match Node::start(config.clone()).await {
            Ok(node) => return node,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(format!("{e:#}").contains("already open"), "{e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}

/// Waits until `node` sees every one of `peers` alive, offering models.
pub async fn wait_offers(node: &Node, peers: &[&Node]) {
    let ids: Vec<String> = peers.iter().map(|p| p.net.peer_id().to_base58()).collect();
    wait_until(
        Duration::from_secs(20),
        "the serving peers are known with their models",
        || async {
            let known = node.net.peers().await.unwrap();
            ids.iter().all(|id| {
                known.iter().any(|p| {
                    p.peer_id == *id
                        && p.state == PeerState::Alive
                        && p.capabilities
                            .as_ref()
                            .is_some_and(|c| !c.models.is_empty())
                })
            })
        },
    )
    .await;
}

/// GETs `url`, with `token` as bearer when given: the status and the body.
pub fn http_get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = ureq::get(url).config().http_status_as_error(false).build();
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request.call().expect("API reachable");
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// POSTs `body` (JSON) to `node`'s API with its token: the status and the body.
pub fn post(node: &Node, path: &str, body: String) -> (u16, String) {
    let url = format!("http://{}{path}", node.api_addr.unwrap());
    let mut response = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .header("Authorization", &format!("Bearer {}", node.token))
        .header("Content-Type", "application/json")
        .send(body)
        .expect("API reachable");
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// Whether `node` holds `peer` alive.
pub async fn holds_alive(node: &Node, peer: mycel_net::PeerId) -> bool {
    node.net
        .peer(peer)
        .await
        .unwrap()
        .is_some_and(|p| p.state == mycel_core::membership::PeerState::Alive)
}

/// Waits until `coordinator` sees `n` peers announcing the dataset tagged `digits`.
pub async fn wait_for_datasets(coordinator: &Node, n: usize) {
    wait_until(
        Duration::from_secs(30),
        "the coordinator sees every participant's dataset",
        || async {
            let peers = coordinator.net.peers().await.unwrap();
            peers
                .iter()
                .filter(|p| {
                    p.capabilities
                        .as_ref()
                        .is_some_and(|c| c.datasets.iter().any(|d| d.tag == "digits"))
                })
                .count()
                >= n
        },
    )
    .await;
}
