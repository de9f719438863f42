//! Joins that never strand, on real nodes over loopback: a newcomer whose only bootstrap peer
//! is full gets referrals instead of a refusal, a node started before its bootstrap peer keeps
//! dialling it, and a node that lost every connection dials its bootstrap list again.
//! Referrals are not trusted: a peer that refers strangers who are not where they claim pays
//! for each in reputation, and is banned when it keeps at it.

mod common;

use std::time::Duration;

use common::{addrs_of, connected_to, free_port, join, local_config, raw_peer, wait_until};
use libp2p::multiaddr::Protocol;
use mycel_core::statement::{Announcement, Capabilities, SignedStatement, Statement};
use mycel_core::wire::Rejection;
use mycel_core::Keypair;
use mycel_net::Multiaddr;
use mycel_node::Node;

/// The node's TCP address without its peer id (dialled as a bare bootstrap address).
fn tcp_addr(node: &Node) -> Multiaddr {
    node.net
        .listen_addrs()
        .iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .cloned()
        .expect("a TCP listen address")
}

async fn connections(node: &Node) -> usize {
    node.net.status().await.map_or(0, |s| s.connections)
}

async fn sees_alive(node: &Node, other: &Node) -> bool {
    node.net
        .peer(other.net.peer_id())
        .await
        .ok()
        .flatten()
        .is_some_and(|p| p.state == mycel_core::membership::PeerState::Alive)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_whose_only_bootstrap_peer_is_full_joins_through_its_referrals() {
    let root = tempfile::tempdir().unwrap();
    // A hub that takes two connections, and two nodes that fill them.
    let mut config = local_config(&root.path().join("hub"), Vec::new(), false);
    config.limits.max_connections = 2;
    let hub = Node::start(config).await.unwrap();
    let mut members = Vec::new();
    for name in ["a", "b"] {
        let config = local_config(&root.path().join(name), addrs_of(&hub), false);
        members.push(Node::start(config).await.unwrap());
    }
    wait_until(
        Duration::from_secs(20),
        "the members know each other",
        || async {
            sees_alive(&members[0], &members[1]).await && sees_alive(&members[1], &members[0]).await
        },
    )
    .await;
    wait_until(Duration::from_secs(20), "the hub is full", || async {
        connections(&hub).await >= 2
    })
    .await;
    // And says so in its announcement (a hint for the referrals others give).
    wait_until(
        Duration::from_secs(20),
        "a member sees the hub announce that it is full",
        || async { hub_full(&members[0], &hub).await == Some(true) },
    )
    .await;

    // The newcomer knows only the hub.
    let config = local_config(&root.path().join("newcomer"), addrs_of(&hub), false);
    let newcomer = Node::start(config).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the newcomer is connected to the members and sees them alive",
        || async {
            connections(&newcomer).await >= 1
                && sees_alive(&newcomer, &members[0]).await
                && sees_alive(&newcomer, &members[1]).await
        },
    )
    .await;
    // It got there through the hub's goodbye, and the hub stayed at its cap.
    assert!(
        hub.net.metrics().referred_total() >= 1,
        "no referral counted"
    );
    assert!(newcomer.net.metrics().goodbyes_received_total() >= 1);
    wait_until(
        Duration::from_secs(10),
        "the hub is back within its cap",
        || async { connections(&hub).await <= 2 },
    )
    .await;
    // And the members see the newcomer alive (it joined the network, not just two peers).
    for member in &members {
        wait_until(
            Duration::from_secs(20),
            "the members see the newcomer",
            || async { sees_alive(member, &newcomer).await },
        )
        .await;
    }
    // Below its cap again, the hub announces that it has room.
    let mut members = members.into_iter();
    let (a, b) = (members.next().unwrap(), members.next().unwrap());
    b.shutdown().await;
    newcomer.shutdown().await;
    wait_until(
        Duration::from_secs(20),
        "a member sees the hub announce room again",
        || async { hub_full(&a, &hub).await == Some(false) },
    )
    .await;
}

/// Whether `hub`'s latest announcement, as `viewer` holds it, says it is at its cap.
async fn hub_full(viewer: &Node, hub: &Node) -> Option<bool> {
    viewer
        .net
        .peer(hub.net.peer_id())
        .await
        .ok()
        .flatten()
        .filter(|p| p.seq > 0)
        .map(|p| p.full)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_its_bootstrap_peer_joins_when_it_comes_up() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let bootstrap: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let early = Node::start(local_config(
        &root.path().join("early"),
        vec![bootstrap],
        false,
    ))
    .await
    .unwrap();
    wait_until(Duration::from_secs(10), "the first dial failed", || async {
        early.net.status().await.unwrap().dial_failures >= 1
    })
    .await;
    let mut config = local_config(&root.path().join("late"), Vec::new(), false);
    config.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()];
    let late = Node::start(config).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the early node reached its bootstrap peer",
        || async { sees_alive(&early, &late).await && sees_alive(&late, &early).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_every_connection_dials_its_bootstrap_list_again() {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let mut config = local_config(&root.path().join("first"), Vec::new(), false);
    config.listen = vec![listen.clone()];
    let first = Node::start(config).await.unwrap();
    let node = Node::start(local_config(
        &root.path().join("node"),
        vec![tcp_addr(&first)],
        false,
    ))
    .await
    .unwrap();
    wait_until(Duration::from_secs(20), "the node joined", || async {
        sees_alive(&node, &first).await
    })
    .await;
    let first_id = first.net.peer_id();
    first.shutdown().await;
    wait_until(
        Duration::from_secs(20),
        "the node lost its only peer",
        || async { connections(&node).await == 0 },
    )
    .await;
    // A different node (new identity, empty peer book, no bootstrap of its own) now listens
    // at the bootstrap address: only the node's own re-dialling can connect the two.
    let mut config = local_config(&root.path().join("second"), Vec::new(), false);
    config.listen = vec![listen];
    let second = Node::start(config).await.unwrap();
    assert_ne!(second.net.peer_id(), first_id);
    wait_until(
        Duration::from_secs(30),
        "the node re-joined through its bootstrap address",
        || async { sees_alive(&node, &second).await && sees_alive(&second, &node).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_above_twice_its_target_sheds_connections_with_a_goodbye_not_a_failure() {
    let root = tempfile::tempdir().unwrap();
    // Target 2: shed above 4, down to 3.
    let mut config = local_config(&root.path().join("hub"), Vec::new(), false);
    config.limits.target_peers = 2;
    let hub = Node::start(config).await.unwrap();
    let mut leaves = Vec::new();
    // Leaves keep the default target (8): with six peers at most they never shed, so every
    // connection the hub loses is one it let go itself.
    for k in 0..6 {
        let config = local_config(&root.path().join(format!("leaf{k}")), addrs_of(&hub), false);
        leaves.push(Node::start(config).await.unwrap());
    }
    wait_until(
        Duration::from_secs(20),
        "all six leaves reach the hub",
        || async { connections(&hub).await >= 6 },
    )
    .await;
    // Connections are kept for their first 20 s (`Timing::connection_grace`).
    wait_until(
        Duration::from_secs(45),
        "the hub sheds down to its band",
        || async { connections(&hub).await <= 4 },
    )
    .await;
    assert!(hub.net.metrics().goodbyes_sent_total() >= 2);
    // The leaves it let go took the goodbye for what it was: the hub is alive to all of them,
    // and each found another peer through the referrals.
    for leaf in &leaves {
        wait_until(
            Duration::from_secs(20),
            "every leaf is connected",
            || async { connections(leaf).await >= 1 },
        )
        .await;
        assert!(sees_alive(leaf, &hub).await, "a shed leaf failed the hub");
    }
}

/// The signed announcement of a freshly made key that claims to listen at `addr`.
fn stranger_at(addr: &str) -> SignedStatement {
    let now = mycel_net::now_ms();
    SignedStatement::sign(
        &Keypair::generate_ed25519(),
        &Statement::Announce(Announcement {
            seq: 1,
            issued_at: now,
            expires_at: now + 60_000,
            capabilities: Capabilities::default(),
            addrs: vec![addr.to_owned()],
            reachability: Default::default(),
            relay: false,
            operator: None,
            full: false,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_refers_strangers_who_are_not_there_pays_for_each_and_is_banned() {
    let root = tempfile::tempdir().unwrap();
    let victim = Node::start(local_config(&root.path().join("victim"), Vec::new(), false))
        .await
        .unwrap();
    let honest = join(root.path(), "honest", &victim).await;
    wait_until(
        Duration::from_secs(20),
        "the nodes know each other",
        || async { sees_alive(&victim, &honest).await },
    )
    .await;
    // A bare libp2p peer that says goodbye with whatever referrals it likes.
    let attacker = raw_peer(addrs_of(&victim)).await;
    let attacker_id = attacker.peer_id();
    let victim_id = victim.net.peer_id();
    wait_until(
        Duration::from_secs(20),
        "the attacker is connected",
        || async { connected_to(&victim, attacker_id).await },
    )
    .await;

    // Sixteen strangers (the most one goodbye may name): half claim a port where nobody
    // listens, half claim the victim's own address.
    let nowhere = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let own = tcp_addr(&victim).to_string();
    let batch = || -> Vec<SignedStatement> {
        (0..16)
            .map(|i| stranger_at(if i % 2 == 0 { &nowhere } else { &own }))
            .collect()
    };
    attacker.refer_raw(victim_id, batch()).await.unwrap();
    let charged = || victim.net.metrics().rejected_for(Rejection::BadReferral);
    // Degree upkeep dials the strangers as it looks for peers (each with its own back-off),
    // finds nobody or itself, and charges the attacker once per referral.
    wait_until(
        Duration::from_secs(30),
        "the victim dialled strangers and charged the attacker",
        || async { charged() >= 8 },
    )
    .await;
    let score = victim.net.reputation(attacker_id).await.unwrap();
    let at_least = 5.0 * charged().min(16) as f64 - 1.0;
    assert!(
        score <= -at_least,
        "the attacker's reputation is {score} after {} charges",
        charged()
    );
    assert!(
        sees_alive(&victim, &honest).await && connections(&victim).await >= 2,
        "the victim keeps its honest peer (and, so far, the attacker)"
    );

    // It keeps at it: banned and disconnected; the honest peer stays.
    let mut batches = 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let connected = connected_to(&victim, attacker_id).await;
        if victim.net.reputation(attacker_id).await.unwrap() <= -100.0 && !connected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the attacker was not banned after {batches} goodbyes ({} charges)",
            charged()
        );
        if batches < 5 && attacker.refer_raw(victim_id, batch()).await.is_ok() {
            batches += 1;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        charged() <= 16 * batches,
        "{} charges for {batches} goodbyes of 16 referrals: a referral charged twice",
        charged()
    );
    assert!(
        sees_alive(&victim, &honest).await,
        "the honest peer is still alive"
    );
    assert!(
        victim.net.reputation(honest.net.peer_id()).await.unwrap() > -1.0,
        "the honest peer was not charged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_book_holds_the_peers_a_join_taught_after_a_clean_shutdown() {
    let root = tempfile::tempdir().unwrap();
    let hub = Node::start(local_config(&root.path().join("hub"), Vec::new(), false))
        .await
        .unwrap();
    let node = join(root.path(), "node", &hub).await;
    wait_until(Duration::from_secs(20), "the node saw the hub", || async {
        sees_alive(&node, &hub).await
    })
    .await;
    // The writer batches a burst of addresses (at most one write a second): the newcomer's
    // may still wait in the batch when the node shuts down, which writes it then.
    let newcomer = join(root.path(), "newcomer", &hub).await;
    wait_until(
        Duration::from_secs(20),
        "the node saw the newcomer",
        || async { sees_alive(&node, &newcomer).await },
    )
    .await;
    node.shutdown().await;
    // The store closes once the node's aborted tasks have let it go.
    let dir = root.path().join("node");
    wait_until(Duration::from_secs(10), "the store was let go", || async {
        mycel_store::Store::open(&dir).is_ok()
    })
    .await;
    let book = mycel_store::Store::open(&dir).unwrap().peers().unwrap();
    for (name, peer) in [("hub", &hub), ("newcomer", &newcomer)] {
        assert!(
            book.iter()
                .any(|p| p.peer == peer.net.peer_id() && !p.addrs.is_empty()),
            "the {name} is not in the peer book: {book:?}"
        );
    }
}
