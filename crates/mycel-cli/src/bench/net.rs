//! `mycel bench net`: N real nodes in this process.
//!
//! Up to `--memory-above` nodes talk TCP (and QUIC for the round-trip pair) over 127.0.0.1;
//! above it they use libp2p's in-process memory transport, because a process may hold at most
//! 20,000 file descriptors here. Each node is a full `mycel` node (store on disk, identity,
//! membership, gossip, Kademlia), without the HTTP API. Every node after the first bootstraps
//! from two random earlier nodes, as a bootstrap list would.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::future::join_all;
use libp2p::multiaddr::Protocol;
use mycel_net::{Multiaddr, PeerId, TransportKind};
use mycel_node::{Node, NodeConfig};
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::json;

use super::{cpu_seconds, quantile, rss_kib};

#[derive(Args)]
pub(crate) struct NetBenchArgs {
    /// Network sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,50,200")]
    nodes: Vec<usize>,
    /// Use the memory transport above this many nodes.
    #[arg(long, default_value_t = 100)]
    memory_above: usize,
    /// Announcements timed for gossip latency.
    #[arg(long, default_value_t = 30)]
    announcements: usize,
    /// Round trips timed between two nodes.
    #[arg(long, default_value_t = 10_000)]
    round_trips: usize,
    /// Seconds of idle CPU measured after convergence; the degree is read at its end. The
    /// default outlasts the grace in which a new connection is never shed (20 s), so the
    /// degree read is the network's steady state, not its join.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Networks built and measured per size.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print one JSON object per network (size and run) on stdout.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: NetBenchArgs) -> anyhow::Result<()> {
    eprintln!(
        "{:>5} {:>9} {:>11} {:>10} {:>10} {:>9} {:>9} {:>11} {:>9} {:>8} {:>6} {:>5} {:>6} {:>5}",
        "nodes",
        "transport",
        "converge_ms",
        "gossip_p50",
        "gossip_p99",
        "rtt_p50us",
        "rtt_p99us",
        "fail_det_ms",
        "rss_kib",
        "idle_cpu",
        "conns",
        "most",
        "peers",
        "most"
    );
    let mut unconverged = Vec::new();
    let runs = (0..args.runs.max(1)).flat_map(|run| args.nodes.iter().map(move |&n| (run, n)));
    for (run, n) in runs {
        anyhow::ensure!(n >= 3, "each network needs at least 3 nodes");
        let mut result = bench_one(n, &args).await?;
        result["run"] = json!(run + 1);
        if result["converged"] == false {
            if args.json {
                super::emit_json(result);
            }
            unconverged.push(n);
            continue;
        }
        eprintln!(
            "{:>5} {:>9} {:>11} {:>10.1} {:>10.1} {:>9.0} {:>9.0} {:>11} {:>9} {:>7.1}% {:>6.1} {:>5} {:>6.1} {:>5}",
            n,
            result["transport"].as_str().unwrap_or("?"),
            result["converge_ms"],
            result["gossip_p50_ms"].as_f64().unwrap_or(f64::NAN),
            result["gossip_p99_ms"].as_f64().unwrap_or(f64::NAN),
            result["rtt_p50_us"].as_f64().unwrap_or(f64::NAN),
            result["rtt_p99_us"].as_f64().unwrap_or(f64::NAN),
            result["failure_detect_ms"],
            result["rss_per_node_kib"],
            result["idle_cpu_pct"].as_f64().unwrap_or(f64::NAN),
            result["conns_per_node_after_idle"][0]
                .as_f64()
                .unwrap_or(f64::NAN),
            result["most_conns_after_idle"],
            result["peers_per_node_after_idle"]
                .as_f64()
                .unwrap_or(f64::NAN),
            result["most_peers_after_idle"],
        );
        if args.json {
            super::emit_json(result);
        }
    }
    if !unconverged.is_empty() {
        bail!("networks of {unconverged:?} nodes did not converge (stranded nodes above)");
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1, held (by the returned listener) until every node has its
/// own: ports picked one by one and released at once can repeat, and two nodes on one port
/// (libp2p sets SO_REUSEPORT) would each receive the other's connections.
fn free_tcp_port() -> anyhow::Result<(u16, std::net::TcpListener)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((listener.local_addr()?.port(), listener))
}

async fn bench_one(n: usize, args: &NetBenchArgs) -> anyhow::Result<serde_json::Value> {
    let transport = if n > args.memory_above {
        TransportKind::Memory
    } else {
        TransportKind::TcpQuic
    };
    let root = tempfile::tempdir()?;
    let mut rng = rand::thread_rng();

    // Identities and addresses first, so that all nodes can start at once with a bootstrap
    // list naming nodes that are starting beside them.
    let mut configs = Vec::with_capacity(n);
    let mut held_ports = Vec::with_capacity(n);
    let mut addrs: Vec<(PeerId, Multiaddr)> = Vec::with_capacity(n);
    for i in 0..n {
        let dir = root.path().join(format!("node-{i}"));
        mycel_store::prepare_data_dir(&dir)?;
        let peer = mycel_store::load_or_create_identity(&dir)?
            .public()
            .to_peer_id();
        let mut config = NodeConfig::new(dir);
        config.api = None;
        config.mdns = false;
        config.transport = transport;
        // The round-trip measurement sends 10k requests back to back: far above the per-peer
        // message rate a production node allows (200/s, bursts of 2000).
        config.limits.messages_per_sec = 1e6;
        config.limits.message_burst = 1e6;
        config.listen = match transport {
            TransportKind::Memory => vec![format!("/memory/{}", rng.gen::<u64>()).parse()?],
            TransportKind::TcpQuic => {
                let (port, held) = free_tcp_port()?;
                held_ports.push(held);
                vec![
                    format!("/ip4/127.0.0.1/tcp/{port}").parse()?,
                    "/ip4/127.0.0.1/udp/0/quic-v1".parse()?,
                ]
            }
        };
        addrs.push((peer, config.listen[0].clone().with(Protocol::P2p(peer))));
        configs.push(config);
    }
    for (i, config) in configs.iter_mut().enumerate().skip(1) {
        let earlier: Vec<&(PeerId, Multiaddr)> = addrs[..i].iter().collect();
        config.bootstrap = earlier
            .choose_multiple(&mut rng, 2)
            .map(|(_, addr)| addr.clone())
            .collect();
    }

    drop(held_ports);
    let rss_before = rss_kib();
    let started = Instant::now();
    let results = join_all(configs.into_iter().map(Node::start)).await;
    let mut nodes = Vec::with_capacity(n);
    for (i, result) in results.into_iter().enumerate() {
        nodes.push(result.with_context(|| format!("starting node {i}"))?);
    }
    let startup_ms = started.elapsed().as_millis() as u64;

    // Convergence: every node sees every other alive, with capabilities.
    let deadline = started + Duration::from_secs(120);
    let converge_ms = loop {
        let mut converged = true;
        for node in &nodes {
            if node.net.status().await?.alive_with_capabilities < n - 1 {
                converged = false;
                break;
            }
        }
        if converged {
            break started.elapsed().as_millis() as u64;
        }
        if Instant::now() > deadline {
            return not_converged(n, nodes, transport).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let rss_per_node_kib = rss_kib().saturating_sub(rss_before) / n as u64;
    let conns_at_converge = mean_connections(&nodes).await?;

    // Idle: the whole process, nothing asked of the nodes.
    let cpu_start = cpu_seconds();
    let idle_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_cpu_pct = (cpu_seconds() - cpu_start) / idle_start.elapsed().as_secs_f64() * 100.0;
    let conns_after_idle = mean_connections(&nodes).await?;
    // The degree: peers connected (a peer may hold more than one connection: both sides
    // dialled at once, or a TCP and a QUIC one).
    let (mut most_conns, mut peers, mut most_peers) = (0, 0, 0);
    for node in &nodes {
        let status = node.net.status().await?;
        most_conns = most_conns.max(status.connections);
        most_peers = most_peers.max(status.connected_peers);
        peers += status.connected_peers;
    }
    let peers_after_idle = peers as f64 / n as f64;

    // Gossip: a node re-announces; time until the last node has the new announcement.
    let mut gossip_ms = Vec::with_capacity(args.announcements);
    for _ in 0..args.announcements {
        let source = rng.gen_range(0..n);
        let source_id = nodes[source].net.peer_id();
        let mut caps = mycel_node::system::read_capabilities(
            std::path::Path::new("/sys"),
            &mycel_node::models::ModelService::new(vec![], 1),
            &mycel_node::system::Extra::default(),
        );
        caps.load.queue_depth = rng.gen_range(1..1000);
        let t0 = mycel_net::now_ms();
        let seq = nodes[source].net.set_capabilities(caps).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last_arrival = t0;
        for (i, node) in nodes.iter().enumerate() {
            if i == source {
                continue;
            }
            loop {
                let info = node.net.peer(source_id).await?;
                if let Some(info) = info.filter(|p| p.seq >= seq) {
                    last_arrival = last_arrival.max(info.announced_at);
                    break;
                }
                if Instant::now() > deadline {
                    bail!("an announcement did not reach every node within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        gossip_ms.push(last_arrival.saturating_sub(t0) as f64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gossip_ms.sort_by(f64::total_cmp);

    // Request-response round trips between two more nodes started beside the network (so
    // the network's background work goes on): QUIC only when sockets are in use, since a
    // request goes over whichever connection to the peer request-response picks first.
    let pair_listen: Multiaddr = match transport {
        TransportKind::Memory => format!("/memory/{}", rng.gen::<u64>()).parse()?,
        TransportKind::TcpQuic => "/ip4/127.0.0.1/udp/0/quic-v1".parse()?,
    };
    let pair_config = |name: &str, bootstrap: Vec<Multiaddr>| {
        let mut config = NodeConfig::new(root.path().join(name));
        config.api = None;
        config.mdns = false;
        config.transport = transport;
        config.listen = vec![pair_listen.clone()];
        config.bootstrap = bootstrap;
        config.limits.messages_per_sec = 1e6;
        config.limits.message_burst = 1e6;
        config
    };
    let a = Node::start(pair_config("rtt-a", vec![])).await?;
    let a_addr = a.net.listen_addrs()[0]
        .clone()
        .with(Protocol::P2p(a.net.peer_id()));
    let mut b_config = pair_config("rtt-b", vec![a_addr]);
    if let TransportKind::Memory = transport {
        b_config.listen = vec![format!("/memory/{}", rng.gen::<u64>()).parse()?];
    }
    let b = Node::start(b_config).await?;
    let payload = vec![7u8; 32];
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.net.echo(a.net.peer_id(), payload.clone()).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the round-trip pair did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..100 {
        b.net.echo(a.net.peer_id(), payload.clone()).await?;
    }
    let mut rtt_us = Vec::with_capacity(args.round_trips);
    for _ in 0..args.round_trips {
        let t = Instant::now();
        b.net.echo(a.net.peer_id(), payload.clone()).await?;
        rtt_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtt_us.sort_by(f64::total_cmp);
    let rtt_transport = match transport {
        TransportKind::TcpQuic => "quic",
        TransportKind::Memory => "memory",
    };
    a.shutdown().await;
    b.shutdown().await;

    // Failure detection: one node stops abruptly.
    let victim_index = rng.gen_range(2..n);
    let victim = nodes.remove(victim_index);
    let victim_id = victim.net.peer_id();
    let t0 = Instant::now();
    victim.abort();
    let deadline = t0 + Duration::from_secs(60);
    let failure_detect_ms = 'outer: loop {
        let mut all = true;
        for node in &nodes {
            let failed = node
                .net
                .peer(victim_id)
                .await?
                .is_none_or(|p| p.state == mycel_core::membership::PeerState::Failed);
            if !failed {
                all = false;
                break;
            }
        }
        if all {
            break 'outer t0.elapsed().as_millis() as u64;
        }
        if Instant::now() > deadline {
            bail!("the stopped node was not marked failed everywhere within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    for node in nodes {
        node.shutdown().await;
    }
    Ok(json!({
        "nodes": n,
        "transport": transport_name(transport),
        "converged": true,
        "startup_ms": startup_ms,
        "converge_ms": converge_ms,
        "gossip_p50_ms": quantile(&gossip_ms, 0.5),
        "gossip_p99_ms": quantile(&gossip_ms, 0.99),
        "rtt_transport": rtt_transport,
        "rtt_p50_us": quantile(&rtt_us, 0.5),
        "rtt_p99_us": quantile(&rtt_us, 0.99),
        "failure_detect_ms": failure_detect_ms,
        "stranded": 0,
        "rss_per_node_kib": rss_per_node_kib,
        "idle_cpu_pct": idle_cpu_pct,
        "conns_per_node_at_converge": conns_at_converge,
        "conns_per_node_after_idle": conns_after_idle,
        "most_conns_after_idle": most_conns,
        "peers_per_node_after_idle": peers_after_idle,
        "most_peers_after_idle": most_peers,
        "target_peers": mycel_net::Limits::default().target_peers,
    }))
}

/// How a network's transport is named in the report.
fn transport_name(transport: TransportKind) -> &'static str {
    match transport {
        TransportKind::Memory => "memory",
        TransportKind::TcpQuic => "tcp",
    }
}

/// The report of a network that did not converge in 120 s, instead of only an error: how many
/// nodes were stranded (no connection at all), and every node that saw fewer than all the
/// others, with its connections and dial failures.
async fn not_converged(
    n: usize,
    nodes: Vec<Node>,
    transport: TransportKind,
) -> anyhow::Result<serde_json::Value> {
    let mut stranded = Vec::new();
    let mut seen = Vec::with_capacity(n);
    for (i, node) in nodes.iter().enumerate() {
        let status = node.net.status().await?;
        seen.push(status.alive_with_capabilities as f64);
        if status.alive_with_capabilities < n - 1 {
            stranded.push(json!({
                "node": i,
                "peer": node.net.peer_id().to_string(),
                "sees": status.alive_with_capabilities,
                "connections": status.connections,
                "dial_failures": status.dial_failures,
            }));
        }
    }
    let conns = mean_connections(&nodes).await?;
    seen.sort_by(f64::total_cmp);
    // Stranded: no connection at all. The others listed merely do not see those yet.
    let isolated = stranded.iter().filter(|s| s["connections"] == 0).count();
    eprintln!(
        "{n} nodes did not converge within 120 s: {isolated} stranded with no connection, {} \
         not seeing every other (each node sees min {} / median {} of {} others; mean \
         connections {:.1})",
        stranded.len() - isolated,
        seen[0],
        quantile(&seen, 0.5),
        n - 1,
        conns.0
    );
    for s in stranded.iter().filter(|s| s["connections"] == 0) {
        eprintln!("  stranded: {s}");
    }
    for node in nodes {
        node.shutdown().await;
    }
    Ok(json!({
        "nodes": n,
        "transport": transport_name(transport),
        "converged": false,
        "stranded": isolated,
        "incomplete": stranded,
        "conns_per_node_at_deadline": conns,
    }))
}

/// Mean (connections, connections opened so far, dial failures so far) per node.
async fn mean_connections(nodes: &[Node]) -> anyhow::Result<(f64, f64, f64)> {
    let (mut now, mut opened, mut failed) = (0, 0, 0);
    for node in nodes {
        let status = node.net.status().await?;
        now += status.connections;
        opened += status.connections_opened;
        failed += status.dial_failures;
    }
    let n = nodes.len() as f64;
    Ok((now as f64 / n, opened as f64 / n, failed as f64 / n))
}
