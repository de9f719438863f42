//! Hostile peers on real nodes: down reports that lie, and floods that honest nodes relay.
//! The attacker is an ordinary node that publishes whatever the test signs (with its own key
//! or with keys made up for the purpose) through its `publish_raw` test hook.

mod common;

use std::time::{Duration, Instant};

use common::{
    addrs_of, announcement, cluster, connected_to, join, local_config, wait_converged, wait_until,
};
use mycel_core::membership::PeerState;
use mycel_core::statement::{Contact, DownReport, SignedStatement, Statement};
use mycel_core::wire::Rejection;
use mycel_core::{Keypair, PeerId};
use mycel_node::Node;

/// `key`'s report that `subject` is down, made up: without the subject's word that the two
/// were connected.
fn down_report(key: &Keypair, subject: PeerId, subject_seq: u64) -> SignedStatement {
    down_report_with(key, subject, subject_seq, None)
}

fn down_report_with(
    key: &Keypair,
    subject: PeerId,
    subject_seq: u64,
    contact: Option<Contact>,
) -> SignedStatement {
    let now = mycel_net::now_ms();
    SignedStatement::sign(
        key,
        &Statement::Down(DownReport {
            subject,
            subject_seq,
            issued_at: now,
            expires_at: now + 5_000,
            contact,
        }),
    )
}

/// The down report `node` would publish about `subject`, once it holds the subject's word that
/// the two are connected (gathered over their connection).
async fn genuine_report(node: &Node, subject: PeerId) -> SignedStatement {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(report) = node.net.down_report(subject).await.unwrap() {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "the reporter never got the subject's word that they are connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `reporter`'s genuine report about `subject` through `via` until `observer`
/// counts it: one made just before the subject re-announced is stale there, counted for
/// nobody, and is made again.
async fn report_until_counted(reporter: &Node, subject: PeerId, via: &Node, observer: &Node) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = observer.net.metrics().down_reports_counted_total();
        let report = genuine_report(reporter, subject).await;
        via.net.publish_raw(report.to_bytes()).await.unwrap();
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_secs(2) {
            if observer.net.metrics().down_reports_counted_total() > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            Instant::now() < deadline,
            "the observer never counted the genuine report"
        );
    }
}

/// The genuine reports of `reporters` about `subject`, made once they, `via` and `observer`
/// hold the subject's latest announcement, and published together through `via`: the
/// subject's refutation of the first must not reach the observer before the last.
async fn report_together(reporters: &[Node], subject: PeerId, via: &Node, observer: &Node) {
    wait_until(
        Duration::from_secs(10),
        "the reporters and the observer hold the subject's latest announcement",
        || async {
            let seq = seq_of(observer, subject).await;
            let mut same = true;
            for node in reporters.iter().chain([via]) {
                same &= seq_of(node, subject).await == seq;
            }
            same
        },
    )
    .await;
    let mut reports = Vec::new();
    for node in reporters {
        reports.push(genuine_report(node, subject).await);
    }
    for report in reports {
        via.net.publish_raw(report.to_bytes()).await.unwrap();
    }
}

/// The configuration of a node under `root/name` that keeps one connection, to `via`.
fn one_link(root: &std::path::Path, name: &str, via: &Node) -> mycel_node::NodeConfig {
    let mut config = local_config(&root.join(name), addrs_of(via), false);
    config.limits.max_connections = 1;
    config.limits.target_peers = 1;
    config
}

/// The sequence number of `subject`'s announcement as `node` holds it.
async fn seq_of(node: &Node, subject: PeerId) -> u64 {
    node.net.peer(subject).await.unwrap().map_or(0, |p| p.seq)
}

/// A victim, an attacker connected to it, and an observer that hears of the victim only
/// through the attacker. Down reports made up by the attacker (from keys nobody knows, about
/// announcements the victim never made, u64::MAX) fail the victim nowhere; one report from a
/// live reporter is not enough on its own; a report naming an announcement the victim never
/// made costs the attacker; and a flood of reports the victim must refute makes it re-announce
/// at most once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_down_reports_fail_nobody_and_refutations_are_paced() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 2).await;
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let (victim, attacker) = (&nodes[0], &nodes[1]);
    let (victim_id, attacker_id) = (victim.net.peer_id(), attacker.net.peer_id());
    // The attacker signs with its node's own key, as read from its data directory.
    let attacker_key = mycel_store::load_or_create_identity(&root.path().join("node-1")).unwrap();
    assert_eq!(attacker_key.public().to_peer_id(), attacker_id);
    // The observer keeps one connection, to the attacker.
    let config = one_link(root.path(), "observer", attacker);
    let observer = Node::start(config).await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "the observer holds the victim alive, through the attacker only",
        || async {
            observer
                .net
                .peer(victim_id)
                .await
                .unwrap()
                .is_some_and(|p| p.state == PeerState::Alive && !p.connected)
                && connected_to(&observer, attacker_id).await
        },
    )
    .await;

    // Made-up reports: eight keys nobody knows, the attacker's own key about an
    // announcement nobody has seen (u64::MAX), one from the attacker without the victim's
    // word that they are connected; and one genuine report from the attacker itself, a live
    // peer connected to the victim, carrying that word (gathered by its node), about the
    // victim's announcement that the observer holds.
    let seq = seq_of(&observer, victim_id).await;
    let mut lies: Vec<SignedStatement> = (0..8)
        .map(|_| down_report(&Keypair::generate_ed25519(), victim_id, seq))
        .collect();
    lies.push(down_report(&attacker_key, victim_id, u64::MAX));
    lies.push(down_report(&attacker_key, victim_id, seq));
    let ignored_before = observer.net.metrics().down_reports_ignored_total();
    for lie in &lies {
        attacker.net.publish_raw(lie.to_bytes()).await.unwrap();
    }
    report_until_counted(attacker, victim_id, attacker, &observer).await;
    // The same reporter again, within the window: set aside, not counted twice.
    let counted = observer.net.metrics().down_reports_counted_total();
    let ignored = observer.net.metrics().down_reports_ignored_total();
    let again = genuine_report(attacker, victim_id).await;
    attacker.net.publish_raw(again.to_bytes()).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the observer sets the repeat aside",
        || async { observer.net.metrics().down_reports_ignored_total() > ignored },
    )
    .await;
    assert_eq!(observer.net.metrics().down_reports_counted_total(), counted);
    wait_until(
        Duration::from_secs(10),
        "the observer set the made-up reports aside",
        || async { observer.net.metrics().down_reports_ignored_total() >= ignored_before + 10 },
    )
    .await;
    // Watch for three seconds: the victim is never failed in the observer's view.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let info = observer.net.peer(victim_id).await.unwrap().unwrap();
        assert_eq!(
            info.state,
            PeerState::Alive,
            "made-up reports failed the victim: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A report naming an announcement the victim never made is a lie only the attacker can
    // have signed: the victim charges the attacker.
    // (The u64::MAX report above was one already.)
    let false_before = victim.net.metrics().rejected_for(Rejection::FalseReport);
    assert!(false_before >= 1);
    let score_before = victim.net.reputation(attacker_id).await.unwrap();
    let own = seq_of(attacker, victim_id).await;
    attacker
        .net
        .publish_raw(down_report(&attacker_key, victim_id, own + 1_000_000_000).to_bytes())
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the victim counts the false report",
        || async { victim.net.metrics().rejected_for(Rejection::FalseReport) > false_before },
    )
    .await;
    let score = victim.net.reputation(attacker_id).await.unwrap();
    assert!(
        score <= score_before - 9.9,
        "the false report cost the attacker {} points",
        score_before - score
    );

    // A flood of reports about the victim's current announcement, each made as soon as the
    // attacker has seen the victim's last refutation: at most one refutation a second.
    let refuted_before = victim.net.metrics().refutations_total();
    let flood = Instant::now();
    let mut sent = 0;
    while flood.elapsed() < Duration::from_secs(3) {
        // Genuine reports, with the victim's word: made up without it they count nowhere, and
        // the victim has nothing to refute.
        let report = genuine_report(attacker, victim_id).await;
        attacker.net.publish_raw(report.to_bytes()).await.unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = flood.elapsed().as_secs_f64();
    // The last deferred refutation lands up to a second after the flood.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let refutations = victim.net.metrics().refutations_total() - refuted_before;
    assert!(
        refutations >= 1,
        "the victim refuted none of {sent} reports"
    );
    assert!(
        (refutations as f64) <= seconds + 2.0,
        "{refutations} refutations of {sent} reports in {seconds:.1} s"
    );
    // One reporter's reports, however many, counted once: nobody failed the victim for
    // reports (two would have made the observer's quorum).
    assert_eq!(observer.net.metrics().peer_failures_total("reported"), 0);
    // Two live reporters that never reached the victim (one connection each, to the
    // attacker) hold no word from it: they cannot make a report that counts, and the ones
    // they make up without it, or with a word the victim never gave, fail nobody (the forged
    // word costs its carrier).
    let start_reporter = |name: &'static str, connections: Option<u32>| {
        let root = root.path().to_path_buf();
        let via = addrs_of(attacker);
        async move {
            let mut config = local_config(&root.join(name), via, false);
            if let Some(n) = connections {
                config.limits.max_connections = n;
                config.limits.target_peers = n as usize;
                // Dial-only: the victim, learning of it, could otherwise dial it and be let
                // in (a referral slot, or room made for it), and reach it after all.
                config.listen.clear();
            }
            let node = Node::start(config).await.unwrap();
            let key = mycel_store::load_or_create_identity(&root.join(name)).unwrap();
            (node, key)
        }
    };
    let mut far = Vec::new();
    for name in ["far-a", "far-b"] {
        let (node, key) = start_reporter(name, Some(1)).await;
        let id = node.net.peer_id();
        wait_until(
            Duration::from_secs(20),
            "the observer holds the far reporter alive",
            || async { common::holds_alive(&observer, id).await },
        )
        .await;
        assert!(!connected_to(&node, victim_id).await);
        assert!(node.net.down_report(victim_id).await.unwrap().is_none());
        far.push((node, key));
    }
    let seq = seq_of(&observer, victim_id).await;
    let forger = &far[1].1;
    let ignored_before = observer.net.metrics().down_reports_ignored_total();
    let forged_before = observer.net.metrics().rejected_for(Rejection::BadSignature);
    let seen = || {
        observer.net.metrics().down_reports_ignored_total() > ignored_before
            && observer.net.metrics().rejected_for(Rejection::BadSignature) > forged_before
    };
    // A fresh pair every second until the observer has read one (gossip may drop a message
    // on a loaded machine; CI of 57b0d3a timed out here once, and passed 3 of 3 alone).
    let sending = Instant::now();
    while !seen() {
        assert!(
            sending.elapsed() < Duration::from_secs(20),
            "the observer did not set aside the report without the victim's word and refuse \
             the forged one"
        );
        let forged = Contact::sign(forger, forger.public().to_peer_id(), mycel_net::now_ms());
        for report in [
            down_report(&far[0].1, victim_id, seq),
            down_report_with(forger, victim_id, seq, Some(forged)),
        ] {
            attacker.net.publish_raw(report.to_bytes()).await.unwrap();
        }
        let poll = Instant::now();
        while !seen() && poll.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(observer.net.metrics().peer_failures_total("reported"), 0);
    assert!(common::holds_alive(&observer, victim_id).await);

    // Two live reporters connected to the victim carry its word, gathered over their
    // connections: their reports about the one announcement make the quorum, and the
    // observer fails the victim until the victim's refutation reaches it. (Not the attacker
    // again: a reporter counts once per subject in 30 s, whatever announcement it names.)
    let mut reporters = Vec::new();
    for name in ["reporter-a", "reporter-b"] {
        let (node, _) = start_reporter(name, None).await;
        let id = node.net.peer_id();
        wait_until(
            Duration::from_secs(20),
            "the observer holds the reporter alive",
            || async { common::holds_alive(&observer, id).await },
        )
        .await;
        reporters.push(node);
    }
    // (Each holds the victim's word first. The victim's refutations of the flood must have
    // reached everyone: a report names the announcement its reporter holds, and counts only
    // where that one is held.)
    for node in &reporters {
        genuine_report(node, victim_id).await;
    }
    // Reports made just before the victim re-announced (its periodic announcement, a late
    // refutation) are stale at the observer and count for nobody: then the two are made
    // again, about the new announcement (as `report_until_counted` does for one).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counted = observer.net.metrics().down_reports_counted_total();
        report_together(&reporters, victim_id, attacker, &observer).await;
        let sent = Instant::now();
        let failed = || observer.net.metrics().peer_failures_total("reported") >= 1;
        while !failed() && sent.elapsed() < Duration::from_secs(4) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if failed() {
            break;
        }
        if observer.net.metrics().down_reports_counted_total() > counted {
            // Not stale: they fail the victim, or nothing will.
            wait_until(
                Duration::from_secs(10),
                "two live reporters fail the victim at the observer",
                || async { failed() },
            )
            .await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two live reporters never failed the victim at the observer"
        );
    }
    // And the victim is alive everywhere again.
    for node in [attacker, &observer] {
        wait_until(Duration::from_secs(20), "the victim is alive", || async {
            common::holds_alive(node, victim_id).await
        })
        .await;
    }
    for node in reporters
        .into_iter()
        .chain(far.into_iter().map(|(node, _)| node))
    {
        node.shutdown().await;
    }
    observer.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// Keys are free, addresses are not: two reporters connected to the victim from one host
/// carry its word naming that host's block of addresses, and of their genuine reports about
/// one announcement an observer counts the first and sets the second aside: the victim is
/// not failed. (The same two reports fail it where the victim tells this machine's peers apart
/// by key alone: the end of `lying_down_reports_fail_nobody_and_refutations_are_paced`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporters_from_one_host_count_once_toward_a_quorum() {
    let root = tempfile::tempdir().unwrap();
    // The victim limits this machine's peers like any host's: 127.0.0.1 is one host.
    let mut config = local_config(&root.path().join("victim"), Vec::new(), false);
    config.limits.limit_loopback = true;
    let victim = Node::start(config).await.unwrap();
    let victim_id = victim.net.peer_id();
    let relay = join(root.path(), "relay", &victim).await;
    let reporters = [
        join(root.path(), "reporter-a", &victim).await,
        join(root.path(), "reporter-b", &victim).await,
    ];
    // The observer keeps one connection, to the relay.
    let config = one_link(root.path(), "observer", &relay);
    let observer = Node::start(config).await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "the observer holds the victim and both reporters alive, through the relay only",
        || async {
            let mut alive = common::holds_alive(&observer, victim_id).await
                && !connected_to(&observer, victim_id).await;
            for node in &reporters {
                alive &= common::holds_alive(&observer, node.net.peer_id()).await;
            }
            alive
        },
    )
    .await;
    // Each holds the victim's word, naming the block it is connected from.
    for node in &reporters {
        let report = genuine_report(node, victim_id).await;
        let Ok(claimed) = report.peek() else {
            panic!("a report it cannot read")
        };
        let Statement::Down(DownReport {
            contact: Some(contact),
            ..
        }) = claimed.statement
        else {
            panic!("not a report with the victim's word")
        };
        assert_eq!(contact.from, vec![127, 0, 0, 0]);
    }
    // Published together as where they make a quorum: the first is counted, the second,
    // from the same block, set aside.
    let counted = observer.net.metrics().down_reports_counted_total();
    let ignored = observer.net.metrics().down_reports_ignored_total();
    report_together(&reporters, victim_id, &relay, &observer).await;
    wait_until(
        Duration::from_secs(10),
        "the observer counts one report and sets the other aside",
        || async {
            observer.net.metrics().down_reports_counted_total() > counted
                && observer.net.metrics().down_reports_ignored_total() > ignored
        },
    )
    .await;
    assert_eq!(
        observer.net.metrics().down_reports_counted_total(),
        counted + 1
    );
    assert_eq!(observer.net.metrics().peer_failures_total("reported"), 0);
    assert!(common::holds_alive(&observer, victim_id).await);
    observer.shutdown().await;
    for node in reporters.into_iter().chain([relay, victim]) {
        node.shutdown().await;
    }
}

/// A peer held alive on its announcement alone, whose address swallows connections and never
/// speaks: the node's probe dials it, the dial times out, and the node fails it here only,
/// for "unanswered", publishing nothing. One hostile report about it from a live peer (which
/// makes the node probe sooner) plus that local failure still fail it nowhere else: the probe
/// is no report and counts toward nobody's quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_failed_by_probes_only_where_they_went_unanswered() {
    use mycel_core::membership::FailReason;
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 2).await;
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let (node, attacker) = (&nodes[0], &nodes[1]);
    let attacker_id = attacker.net.peer_id();
    let attacker_key = mycel_store::load_or_create_identity(&root.path().join("node-1")).unwrap();
    // An observer that hears of the peer only through the attacker and probes nobody.
    let mut config = one_link(root.path(), "observer", attacker);
    config.limits.max_probes_in_flight = 0;
    let observer = Node::start(config).await.unwrap();
    // The silent address: connections are accepted and held, never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = format!("/ip4/127.0.0.1/tcp/{}", silent.local_addr().unwrap().port());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(64) {
            held.push(stream);
        }
    });
    let ghost = Keypair::generate_ed25519();
    let ghost_id = ghost.public().to_peer_id();
    let told = common::announcement_at(&ghost, 1, vec![silent_addr]);
    let reports_before = node.net.metrics().down_reports_sent_total();
    let score_before = node.net.reputation(attacker_id).await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "the node and the observer hold the silent peer's announcement",
        || async {
            // Republished until it takes: gossip needs the mesh first.
            let _ = attacker.net.publish_raw(told.to_bytes()).await;
            // (The node holds the announcement: a probe may already be under way.)
            let at_node = node.net.peer(ghost_id).await.unwrap();
            let at_observer = observer.net.peer(ghost_id).await.unwrap();
            at_node.is_some_and(|p| p.seq == 1)
                && at_observer.is_some_and(|p| p.state == PeerState::Alive)
        },
    )
    .await;
    // One report from a live peer, below the quorum of two (with the word of the peer
    // that the attacker was connected to it, as a reporter that was would have).
    let contact = Contact::sign(&ghost, attacker_id, mycel_net::now_ms());
    let _ = attacker
        .net
        .publish_raw(down_report_with(&attacker_key, ghost_id, 1, Some(contact)).to_bytes())
        .await;
    wait_until(
        Duration::from_secs(20),
        "the node fails the silent peer for an unanswered probe",
        || async {
            node.net
                .peer(ghost_id)
                .await
                .unwrap()
                .is_some_and(|p| p.fail_reason == Some(FailReason::Unanswered))
        },
    )
    .await;
    assert!(node.net.metrics().probes_total("unanswered") >= 1);
    assert_eq!(
        node.net.metrics().peer_failures_total("unanswered"),
        1,
        "only the silent peer"
    );
    assert_eq!(
        node.net.metrics().down_reports_sent_total(),
        reports_before,
        "an unanswered probe is told to nobody"
    );
    // The observer, which heard the one report, still holds it alive.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let info = observer.net.peer(ghost_id).await.unwrap().unwrap();
        assert_eq!(info.state, PeerState::Alive, "{info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The attacker's report was genuine and counted: it costs the attacker nothing.
    assert!(node.net.reputation(attacker_id).await.unwrap() >= score_before);
    observer.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// A report about a peer nobody has heard of goes no further than the first honest node: the
/// attacker's report (with the made-up subject's word that the two were connected, as a
/// genuine one would carry) is set aside at the node it reaches, and a third node behind
/// that node never sees it, while the announcements published before and after it reach
/// the third node by the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_about_an_unknown_peer_is_not_relayed() {
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 2).await;
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let (middle, attacker) = (&nodes[0], &nodes[1]);
    let attacker_id = attacker.net.peer_id();
    let attacker_key = mycel_store::load_or_create_identity(&root.path().join("node-1")).unwrap();
    // The observer keeps one connection, to the middle node, and listens nowhere: the
    // attacker cannot dial it (a connection to the attacker, however brief, would bring the
    // attacker's own publications straight to it).
    let mut config = one_link(root.path(), "observer", middle);
    config.listen = Vec::new();
    let observer = Node::start(config).await.unwrap();
    // A peer the attacker makes known, published until the observer holds it: the path
    // attacker -> middle -> observer carries gossip.
    let relayed = |what: &'static str| {
        let key = Keypair::generate_ed25519();
        let id = key.public().to_peer_id();
        let told = common::announcement_at(&key, 1, vec!["/ip4/127.0.0.1/tcp/9".into()]);
        let (attacker, observer) = (attacker, &observer);
        async move {
            wait_until(Duration::from_secs(20), what, || async {
                let _ = attacker.net.publish_raw(told.to_bytes()).await;
                observer.net.peer(id).await.unwrap().is_some()
            })
            .await;
        }
    };
    relayed("an announcement reaches the observer through the middle node").await;
    assert!(!connected_to(&observer, attacker_id).await);
    let ignored_at_observer = observer.net.metrics().down_reports_ignored_total();
    let ignored_at_middle = middle.net.metrics().down_reports_ignored_total();
    // The report about a key nobody has heard of, published until the middle node has it.
    let ghost = Keypair::generate_ed25519();
    let ghost_id = ghost.public().to_peer_id();
    let contact = Contact::sign(&ghost, attacker_id, mycel_net::now_ms());
    let report = down_report_with(&attacker_key, ghost_id, 1, Some(contact));
    wait_until(
        Duration::from_secs(20),
        "the middle node sets the report aside",
        || async {
            let _ = attacker.net.publish_raw(report.to_bytes()).await;
            middle.net.metrics().down_reports_ignored_total() > ignored_at_middle
        },
    )
    .await;
    assert!(middle.net.peer(ghost_id).await.unwrap().is_none());
    // What the attacker publishes after it still reaches the observer, the report never did.
    relayed("an announcement published after the report reaches the observer").await;
    assert_eq!(
        observer.net.metrics().down_reports_ignored_total(),
        ignored_at_observer,
        "the report about an unknown peer was passed on"
    );
    assert!(observer.net.peer(ghost_id).await.unwrap().is_none());
    observer.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// A flood of genuine statements from one issuer, injected at two points of a network of
/// honest nodes: the issuer pays for what reached the honest nodes (over its rate), the two
/// injectors, which pass on far more of one issuer than any node that checks what it relays
/// would, pay for that (`over_relayed`) and are banned, and the honest nodes that relayed
/// what they accepted of it are charged nothing and stay connected to each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_injected_at_several_points_is_charged_to_its_issuer_and_injectors_not_to_honest_relays(
) {
    const FLOOD: u64 = 2_500;
    let root = tempfile::tempdir().unwrap();
    // The honest nodes in a line behind the injectors: the first is connected to both
    // injectors, the second only to the first (at a cap of one connection it sends anyone
    // else away), so everything of the flood the second sees, the first passed on.
    let first = Node::start(local_config(&root.path().join("first"), Vec::new(), false))
        .await
        .unwrap();
    let injectors = [
        join(root.path(), "injector-0", &first).await,
        join(root.path(), "injector-1", &first).await,
    ];
    let config = one_link(root.path(), "second", &first);
    let second = Node::start(config).await.unwrap();
    let [i0, i1] = injectors;
    let nodes = [i0, i1, first, second];
    wait_converged(&nodes, Duration::from_secs(30)).await;
    let (injectors, honest) = nodes.split_at(2);
    let flooder = Keypair::generate_ed25519();
    let flooder_id = flooder.public().to_peer_id();

    // Each injector publishes its own share of the issuer's statements (every one genuine and
    // newer than the last), as fast as it can.
    let mut sends = Vec::new();
    for (k, injector) in injectors.iter().enumerate() {
        let net = injector.net.clone();
        let key = flooder.clone();
        sends.push(tokio::spawn(async move {
            for i in 0..FLOOD {
                let seq = 1 + 2 * i + k as u64;
                if net
                    .publish_raw(announcement(&key, seq).to_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }));
    }
    for send in sends {
        send.await.unwrap();
    }
    let first = &honest[0];
    {
        let node = first;
        wait_until(
            Duration::from_secs(30),
            "an injector is banned for what it passed on",
            || async {
                let mut banned = false;
                for injector in injectors {
                    banned |= node.net.reputation(injector.net.peer_id()).await.unwrap() <= -100.0;
                }
                banned
            },
        )
        .await;
        // Its view of the banned injector says so (as /api/peers shows it).
        let mut shown = 0;
        for injector in injectors {
            let id = injector.net.peer_id();
            if let Some(info) = node.net.peer(id).await.unwrap() {
                shown += usize::from(info.banned);
            }
        }
        assert!(shown >= 1, "no banned injector shown as banned");
        let metrics = node.net.metrics();
        assert!(metrics.rejected_for(Rejection::OverRelayed) >= 1);
        assert!(metrics.rejected_for(Rejection::RateLimited) >= 1);
        let issuer = node.net.reputation(flooder_id).await.unwrap();
        assert!(issuer < 0.0, "the issuer was charged {issuer}");
    }
    // What the first passed on of the flood reached the second, within the issuer's rate.
    wait_until(
        Duration::from_secs(10),
        "the second holds the issuer's statements",
        || async { seq_of(&honest[1], flooder_id).await > 0 },
    )
    .await;
    // Nobody honest was charged for relaying it, and the honest nodes hold together.
    for node in honest {
        for other in honest {
            if node.net.peer_id() == other.net.peer_id() {
                continue;
            }
            let score = node.net.reputation(other.net.peer_id()).await.unwrap();
            assert!(
                score > -0.5,
                "{} charged {} {score} points for relaying",
                node.net.peer_id(),
                other.net.peer_id()
            );
            assert!(connected_to(node, other.net.peer_id()).await);
            let info = node.net.peer(other.net.peer_id()).await.unwrap().unwrap();
            assert!(!info.banned);
        }
    }
    for node in nodes {
        node.shutdown().await;
    }
}

/// A banned peer that keeps dialling costs its victim a handshake each time (its id shows
/// only once the handshake is done): past three banned peers from one host within a minute,
/// that host's connections are refused before their handshake, for a second doubling up to a
/// minute, and counted, while the connections already held stay. (Every process here shares
/// 127.0.0.1, so the victim is told to limit this machine's connections like any host's;
/// that another host is not refused with it is the unit test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_keeps_sending_banned_peers_is_refused_before_the_handshake() {
    let root = tempfile::tempdir().unwrap();
    let mut config = local_config(&root.path().join("victim"), Vec::new(), true);
    config.limits.limit_loopback = true;
    let victim = Node::start(config).await.unwrap();
    let neighbour = join(root.path(), "neighbour", &victim).await;
    let nodes = [victim, neighbour];
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let [victim, neighbour] = nodes;
    let (victim_id, neighbour_id) = (victim.net.peer_id(), neighbour.net.peer_id());
    let attacker = common::raw_peer(addrs_of(&victim)).await;
    let attacker_id = attacker.peer_id();
    wait_until(Duration::from_secs(20), "the attacker connects", || async {
        connected_to(&victim, attacker_id).await
    })
    .await;
    // Forgeries (25 points each) until it is banned; a publish finds nobody until the
    // victim's subscription has reached the attacker.
    let other = Keypair::generate_ed25519();
    let mut seq = 0;
    wait_until(Duration::from_secs(20), "the attacker is banned", || {
        seq += 1;
        let mut forged = announcement(&other, seq);
        forged.signature[0] ^= 0xff;
        let (attacker, victim) = (attacker.clone(), &victim);
        async move {
            let _ = attacker.publish_raw(forged.to_bytes()).await;
            victim.net.reputation(attacker_id).await.unwrap() <= -100.0
        }
    })
    .await;
    // It keeps asking to sync, and so keeps dialling: a few handshakes are wasted, then its
    // host is refused before them.
    let metrics = victim.net.metrics();
    wait_until(
        Duration::from_secs(30),
        "the attacker's host is refused before its handshakes",
        || {
            let attacker = attacker.clone();
            async move {
                let _ = attacker.sync_raw(victim_id).await;
                metrics.refused_total("struck_host") >= 1
            }
        },
    )
    .await;
    assert!(metrics.refused_total("banned_peer") >= 1);
    assert!(!connected_to(&victim, attacker_id).await);
    // The neighbour's connection, made before, is still held and both see each other alive.
    assert!(connected_to(&victim, neighbour_id).await);
    let seen = neighbour.net.peer(victim_id).await.unwrap().unwrap();
    assert_eq!(seen.state, PeerState::Alive);
    neighbour.shutdown().await;
    victim.shutdown().await;
}

/// The local API under a flood of connections that send nothing, or headers a byte at a time
/// too slowly: each is closed once it has sent no complete request for 10 s, or sooner when a
/// newcomer needs its slot, so they cannot hold the API's connection slots, and a client's
/// request is answered at once (not after their 10 s). The bearer scheme is matched
/// case-insensitively.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_connections_cannot_hold_the_api() {
    use std::io::{Read, Write};
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(local_config(&root.path().join("n"), vec![], true))
        .await
        .unwrap();
    let api = node.api_addr.unwrap();
    // More silent connections than the API serves at once, and one that trickles headers.
    let silent: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(api).unwrap())
        .collect();
    let mut slow = std::net::TcpStream::connect(api).unwrap();
    slow.write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let token = node.token.clone();
    let answered = tokio::task::spawn_blocking(move || {
        let url = format!("http://{api}/api/status");
        let status = ureq::get(&url)
            .header("Authorization", &format!("bearer {token}"))
            .call()
            .map(|r| r.status().as_u16());
        (status.ok(), started.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(answered.0, Some(200), "lower-case scheme, during the flood");
    assert!(
        answered.1 < Duration::from_secs(5),
        "answered after {:?}: the silent connections held the slots",
        answered.1
    );
    // Each silent connection was closed by the node (EOF), none later than ~10 s after it
    // opened.
    let check = tokio::task::spawn_blocking(move || {
        let mut closed = 0;
        for mut stream in silent.into_iter().chain([slow]) {
            stream
                .set_read_timeout(Some(Duration::from_secs(15)))
                .unwrap();
            let mut buf = [0u8; 256];
            // A timed-out header read may get a 408 before the close; read to the end.
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        closed += 1;
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        closed += 1;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        (closed, started.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(check.0, 301, "every silent or slow connection is closed");
    assert!(check.1 < Duration::from_secs(25), "{:?}", check.1);
    // The flood shows in /metrics: 302 connections during it (300 silent, the slow one, the
    // client) for 256 slots, so at least 46 silent ones closed for newcomers; the others
    // timed out. The scrape's own connection came after.
    let metrics = tokio::task::spawn_blocking({
        let (api, token) = (api, node.token.clone());
        move || scrape(api, &token)
    })
    .await
    .unwrap();
    let counter = |name: &str| {
        metrics
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    let accepted = counter("mycel_api_connections_accepted_total");
    let made_room = counter("mycel_api_connections_closed_for_newcomer_total");
    let timed_out = counter("mycel_api_connections_timed_out_total");
    assert!(accepted >= 303.0, "accepted: {accepted}");
    assert!(made_room >= 46.0, "closed for newcomers: {made_room}");
    assert!(
        timed_out >= 200.0,
        "timed out: {timed_out} (the silent connections left after the newcomers' room)"
    );
    assert!(
        made_room + timed_out <= accepted,
        "{made_room} + {timed_out} > {accepted}"
    );
    node.shutdown().await;
}

/// The node's /metrics, parsed.
fn scrape(api: std::net::SocketAddr, token: &str) -> prometheus_parse::Scrape {
    let (status, body) = common::http_get(&format!("http://{api}/metrics"), Some(token));
    assert_eq!(status, 200, "/metrics: {body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text")
}

/// One request on a kept-alive connection: its status code (the body read to its end, so the
/// connection is ready for the next).
fn keep_alive_request(stream: &mut std::net::TcpStream, token: Option<&str>) -> u16 {
    use std::io::{BufRead, Read, Write};
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(stream, "GET /api/status HTTP/1.1\r\nHost: x\r\n{auth}\r\n").unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    status
}

/// Connections that send only requests without the token hold no slot against a client: the
/// one idle longest makes room for a newcomer. A connection that sent an authorised request
/// keeps its slot through the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_token_do_not_keep_a_connection_slot() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(local_config(&root.path().join("n"), vec![], true))
        .await
        .unwrap();
    let api = node.api_addr.unwrap();
    let token = node.token.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut kept = std::net::TcpStream::connect(api).unwrap();
        let first = keep_alive_request(&mut kept, Some(&token));
        // More than the API serves at once, each answered 401 and then idle.
        let flood: Vec<std::net::TcpStream> = (0..300)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(api).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let status = keep_alive_request(&mut stream, None);
                assert_eq!(status, 401);
                stream
            })
            .collect();
        let started = Instant::now();
        let fresh = ureq::get(&format!("http://{api}/api/status"))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .map(|r| r.status().as_u16())
            .ok();
        let waited = started.elapsed();
        let again = keep_alive_request(&mut kept, Some(&token));
        drop(flood);
        (first, fresh, waited, again)
    })
    .await
    .unwrap();
    assert_eq!(result.0, 200);
    assert_eq!(
        result.1,
        Some(200),
        "a newcomer is answered during the flood"
    );
    assert!(
        result.2 < Duration::from_secs(5),
        "answered after {:?}: unauthorised connections held the slots",
        result.2
    );
    assert_eq!(result.3, 200, "the authorised connection kept its slot");
    node.shutdown().await;
}

/// An API address beyond loopback is refused unless the operator confirms it, with the flag
/// named (refused before anything starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_beyond_loopback_must_be_confirmed() {
    let root = tempfile::tempdir().unwrap();
    let mut config = local_config(&root.path().join("n"), vec![], true);
    config.api = Some(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let err = Node::start(config).await.unwrap_err();
    assert!(format!("{err:#}").contains("--api-public"), "{err:#}");
}

/// The API over HTTPS: a client that trusts the node's certificate gets its answers; plain
/// HTTP on that port gets none; a key that does not fit the certificate is refused at start
/// with both files named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_speaks_https_with_the_certificate_it_is_given() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let root = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (root.path().join("cert.pem"), root.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    let mut config = local_config(&root.path().join("n"), vec![], true);
    config.api_tls = Some(mycel_node::ApiTls {
        cert: cert.clone(),
        key: key.clone(),
    });
    let node = Node::start(config).await.unwrap();
    let api = node.api_addr.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request = format!(
        "GET /api/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Connection: close\r\n\r\n",
        node.token
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("peer_id"), "{answer}");

    // Plain HTTP to the HTTPS port gets no answer.
    let plain = tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://{api}/api/status"))
            .config()
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .call()
            .map(|r| r.status().as_u16())
    })
    .await
    .unwrap();
    assert!(plain.is_err(), "plain HTTP answered {plain:?}");
    node.shutdown().await;

    // Another key than the certificate's: refused at start, both files named.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&key, other.serialize_pem()).unwrap();
    let mut config = local_config(&root.path().join("m"), vec![], true);
    config.api_tls = Some(mycel_node::ApiTls {
        cert: cert.clone(),
        key: key.clone(),
    });
    let err = format!("{:#}", Node::start(config).await.unwrap_err());
    assert!(err.contains("key.pem") && err.contains("cert.pem"), "{err}");
}

/// A model whose name peers would refuse (over 128 bytes: both neighbours used to ban the
/// node within seconds) is refused at start, with the limit and the fix named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_name_peers_would_refuse_is_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join(format!("{}.gguf", "m".repeat(200)));
    mycel_ml::fixtures::write_tiny_llama(&path).unwrap();
    let mut config = local_config(&root.path().join("n"), vec![], false);
    config.models = vec![path];
    let err = format!("{:#}", Node::start(config).await.unwrap_err());
    assert!(
        err.contains("at most 128") && err.contains("rename"),
        "{err}"
    );
}

/// A sync request is a few bytes, and its answer can be the whole membership table: answers
/// are cut to what the asker has left to pull (4,000 statements at once, 500 a second after),
/// and an asker whose answers are cut is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_answers_are_paced_per_asker_and_charged_to_it() {
    const KEYS: u64 = 300;
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 2).await;
    wait_converged(&nodes, Duration::from_secs(20)).await;
    let (victim, helper) = (&nodes[0], &nodes[1]);
    // Give the victim a table worth pulling: 300 more members.
    for _ in 0..KEYS {
        let key = Keypair::generate_ed25519();
        helper
            .net
            .publish_raw(announcement(&key, 1).to_bytes())
            .await
            .unwrap();
    }
    wait_until(
        Duration::from_secs(20),
        "the victim holds every announcement",
        || async { victim.net.status().await.unwrap().alive >= KEYS as usize },
    )
    .await;
    let asker = common::raw_peer(addrs_of(victim)).await;
    let asker_id = asker.peer_id();
    wait_until(
        Duration::from_secs(20),
        "the asker is connected",
        || async { connected_to(victim, asker_id).await },
    )
    .await;
    let started = Instant::now();
    let (mut pulled, mut answers, mut refused) = (0usize, 0, 0);
    for _ in 0..60 {
        match asker.sync_raw(victim.net.peer_id()).await {
            Ok(n) => {
                pulled += n;
                answers += 1;
            }
            Err(_) => refused += 1,
        }
    }
    let bound = 4_000.0 + 500.0 * started.elapsed().as_secs_f64() + KEYS as f64 + 2.0;
    assert!(
        answers >= 10,
        "an honest-looking first pull is answered in full"
    );
    assert!(
        (pulled as f64) <= bound,
        "{pulled} statements in {answers} answers, more than {bound:.0}"
    );
    eprintln!("{pulled} statements in {answers} answers, {refused} refused");
    assert!(victim.net.reputation(asker_id).await.unwrap() < 0.0);
    for node in nodes {
        node.shutdown().await;
    }
}

/// One peer opening many task streams and sending nothing gets at most its share of the
/// node's 256 task slots (32); the streams past its share are closed at once, and another
/// peer's streams are served beside them. Blob streams likewise (16 of 64), and training
/// streams (4 of 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_gets_at_most_its_share_of_task_and_blob_streams() {
    use mycel_net::task::{read_frame, TASK_PROTOCOL};
    let root = tempfile::tempdir().unwrap();
    let nodes = cluster(root.path(), 1).await;
    let victim = &nodes[0];
    let hog = common::raw_peer(addrs_of(victim)).await;
    let other = common::raw_peer(addrs_of(victim)).await;
    for peer in [hog.peer_id(), other.peer_id()] {
        wait_until(Duration::from_secs(20), "connected", || async {
            connected_to(victim, peer).await
        })
        .await;
    }
    // The hog's burst and the other peer's streams arrive at once.
    let open = |peer: &mycel_net::NetHandle, n: usize| {
        let peer = peer.clone();
        let victim = victim.net.peer_id();
        async move {
            let opens = (0..n).map(|_| peer.open_stream(victim, TASK_PROTOCOL));
            futures::future::join_all(opens).await
        }
    };
    let (streams, theirs) = tokio::join!(open(&hog, 64), open(&other, 4));
    let streams: Vec<_> = streams.into_iter().map(Result::unwrap).collect();
    let theirs: Vec<_> = theirs.into_iter().map(Result::unwrap).collect();
    // A stream the node holds waits for its request (for 10 s); one past the share is closed.
    let held = |mut stream: mycel_net::task::Stream| async move {
        tokio::time::timeout(
            Duration::from_secs(2),
            read_frame::<mycel_core::task::TaskFrame>(&mut stream, 1 << 20),
        )
        .await
        .is_err()
    };
    let (outcomes, theirs) = tokio::join!(
        futures::future::join_all(streams.into_iter().map(held)),
        futures::future::join_all(theirs.into_iter().map(held))
    );
    let kept = outcomes.iter().filter(|h| **h).count();
    assert_eq!(kept, 32, "the hog's streams held: {kept} of 64");
    assert!(
        theirs.iter().all(|h| *h),
        "another peer's streams are served"
    );
    assert_eq!(
        victim.net.metrics().streams_dropped_total(),
        0,
        "no stream was lost on its way to the serve loop"
    );
    // Blob streams likewise: 16 of 64 for one peer.
    let mut blob_streams = Vec::new();
    for _ in 0..24 {
        blob_streams.push(
            hog.open_stream(victim.net.peer_id(), mycel_net::task::BLOB_PROTOCOL)
                .await
                .unwrap(),
        );
    }
    let outcomes = futures::future::join_all(blob_streams.into_iter().map(held)).await;
    let kept = outcomes.iter().filter(|h| **h).count();
    assert_eq!(kept, 16, "the hog's blob streams held: {kept} of 24");
    // Training streams likewise: 4 of 16 for one peer, and a coordinator still gets in.
    let (train, theirs) = tokio::join!(
        async {
            let opens = (0..8)
                .map(|_| hog.open_stream(victim.net.peer_id(), mycel_net::task::TRAIN_PROTOCOL));
            futures::future::join_all(opens).await
        },
        other.open_stream(victim.net.peer_id(), mycel_net::task::TRAIN_PROTOCOL)
    );
    let train: Vec<_> = train.into_iter().map(Result::unwrap).collect();
    let (outcomes, theirs) = tokio::join!(
        futures::future::join_all(train.into_iter().map(held)),
        held(theirs.unwrap())
    );
    let kept = outcomes.iter().filter(|h| **h).count();
    assert_eq!(kept, 4, "the hog's training streams held: {kept} of 8");
    assert!(theirs, "another peer's training stream is served");
    // What the shares turned away is counted in /metrics.
    use mycel_node::defences::{
        BLOB_STREAMS_PAST_SHARE, TASK_STREAMS_PAST_SHARE, TRAINING_STREAMS_PAST_SHARE,
    };
    let defences = &victim.blobs.defences;
    assert!(defences.total(TASK_STREAMS_PAST_SHARE) >= 32);
    assert!(defences.total(BLOB_STREAMS_PAST_SHARE) >= 8);
    assert!(defences.total(TRAINING_STREAMS_PAST_SHARE) >= 4);
    for node in nodes {
        node.shutdown().await;
    }
}

/// A victim (target 2, a 1.5 s grace, at most `max_connections`), the peer it chose (its
/// bootstrap peer: a connection it dialled) and a neighbour that dialled it, all connected:
/// (victim, chosen, neighbour).
async fn victim_with_chosen_and_neighbour(
    root: &std::path::Path,
    max_connections: u32,
) -> (Node, Node, Node) {
    // The chosen peer wants no more peers itself.
    let mut config = local_config(&root.join("chosen"), Vec::new(), false);
    config.limits.target_peers = 1;
    // Strangers that learn of it dial it too: it keeps them all for a test's length rather
    // than shed the victim for them.
    config.timing.connection_grace = Duration::from_secs(600);
    let chosen = Node::start(config).await.unwrap();
    let chosen_id = chosen.net.peer_id();
    let mut config = local_config(&root.join("victim"), addrs_of(&chosen), false);
    config.limits.max_connections = max_connections;
    config.limits.target_peers = 2;
    config.timing.connection_grace = Duration::from_millis(1_500);
    let victim = Node::start(config).await.unwrap();
    let neighbour = Node::start(local_config(
        &root.join("neighbour"),
        addrs_of(&victim),
        false,
    ))
    .await
    .unwrap();
    let neighbour_id = neighbour.net.peer_id();
    wait_until(
        Duration::from_secs(20),
        "the neighbour connects, and the victim to the peer it chose",
        || async {
            connected_to(&victim, neighbour_id).await && connected_to(&victim, chosen_id).await
        },
    )
    .await;
    (victim, chosen, neighbour)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_at_the_cap_evict_each_other_not_a_long_lived_neighbour() {
    let root = tempfile::tempdir().unwrap();
    let (victim, chosen, neighbour) = victim_with_chosen_and_neighbour(root.path(), 4).await;
    let (chosen_id, neighbour_id) = (chosen.net.peer_id(), neighbour.net.peer_id());
    // A few points of wear, as an honest peer collects: still in good standing, but a lower
    // score than any fresh stranger's, so only its protection as a long-lived peer keeps it.
    victim
        .net
        .penalise(neighbour_id, Rejection::BadReferral)
        .await;
    // Strangers arrive one after another, each once the one before it holds a slot and is
    // past its grace (the window starts when the victim holds it, not when it was started:
    // on a loaded machine a dial can take longer than the grace), until the victim is at its
    // cap many times over. A stranger sent away with a goodbye does not come back for a
    // minute, so each must get its slot on its first dial.
    let mut strangers = Vec::new();
    let check = |what: &'static str| {
        let victim = &victim;
        async move {
            assert!(
                connected_to(victim, neighbour_id).await,
                "the long-lived neighbour keeps its slot ({what})"
            );
            assert!(
                connected_to(victim, chosen_id).await,
                "the peer the victim chose keeps its slot ({what})"
            );
            let held = victim.net.status().await.unwrap().connected_peers;
            // The cap, its referral slots, and the peer the victim dialled (the cap bounds
            // what others dial in).
            assert!(
                held <= 4 + 4 + 1,
                "{held} peers held at a cap of 4 ({what})"
            );
        }
    };
    for i in 0..8 {
        let stranger = common::raw_peer(addrs_of(&victim)).await;
        let id = stranger.peer_id();
        strangers.push(stranger);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !connected_to(&victim, id).await {
            assert!(
                Instant::now() < deadline,
                "stranger {i} got no slot within 15 s (strangers should evict each other)"
            );
            check("while a stranger joins").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let past_grace = Instant::now() + Duration::from_millis(1_800);
        while Instant::now() < past_grace {
            check("while a stranger holds its slot").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let evicted = victim.net.metrics().evicted_total();
    // Each of the five that found the victim full made room once (and the victim's own upkeep
    // dial now and then); those sent away that came back (their probes, their lookups, the
    // victim's upkeep) took nobody's place: 9 were counted when they did.
    assert!(
        (3..=7).contains(&evicted),
        "strangers made room by eviction, once each: {evicted} evictions for 8 strangers"
    );
    for node in [neighbour, chosen, victim] {
        node.shutdown().await;
    }
}

/// Above its high-water mark a node sheds strangers, not its long-lived neighbour (a little
/// worn, still in good standing) nor the peer it chose (its bootstrap peer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_takes_strangers_not_an_old_neighbour_nor_the_peer_a_node_chose() {
    let root = tempfile::tempdir().unwrap();
    // A target of 2: it sheds above 4 connections down to 3, keeping its oldest inbound peer
    // in good standing and one peer it dialled; no cap in the way (16).
    let (victim, chosen, neighbour) = victim_with_chosen_and_neighbour(root.path(), 16).await;
    let (chosen_id, neighbour_id) = (chosen.net.peer_id(), neighbour.net.peer_id());
    // Wear that puts it below any fresh stranger's score, as an honest peer collects.
    victim
        .net
        .penalise(neighbour_id, Rejection::BadReferral)
        .await;
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let mut strangers = Vec::new();
    for _ in 0..6 {
        strangers.push(common::raw_peer(addrs_of(&victim)).await);
    }
    // Until the strangers are past their grace and shed, and for a while after: the
    // neighbour and the chosen peer stay.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut shed = false;
    let mut quiet_until = None;
    while quiet_until.is_none_or(|until| Instant::now() < until) {
        assert!(Instant::now() < deadline, "the victim never shed down to 3");
        assert!(
            connected_to(&victim, neighbour_id).await,
            "the long-lived neighbour was shed"
        );
        if !connected_to(&victim, chosen_id).await {
            panic!(
                "the peer the victim chose was shed (its score there {:?}, the victim's there {:?}, rejected {:?}; chosen sees victim connected {}; victim's info {:?}; chosen's info {:?}; shed at {:?})",
                victim.net.reputation(chosen_id).await,
                chosen.net.reputation(victim.net.peer_id()).await,
                victim.net.metrics().rejected_total(),
                connected_to(&chosen, victim.net.peer_id()).await,
                victim.net.peer(chosen_id).await,
                chosen.net.peer(victim.net.peer_id()).await,
                shed,
            );
        }
        let held = victim.net.status().await.unwrap().connected_peers;
        if !shed && held <= 3 {
            shed = true;
            quiet_until = Some(Instant::now() + Duration::from_secs(2));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node in [neighbour, chosen, victim] {
        node.shutdown().await;
    }
}

/// A membership table full of strangers' announcements (keys are free) still takes honest
/// newcomers and keeps the peers it knew before the flood: a peer out of good standing makes
/// room first, however long known, then the strangers listed last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_full_of_strangers_takes_an_honest_newcomer_and_keeps_its_old_peers() {
    const TABLE: usize = 12;
    let root = tempfile::tempdir().unwrap();
    let mut config = local_config(&root.path().join("victim"), Vec::new(), false);
    config.limits.max_members = TABLE;
    let victim = Node::start(config).await.unwrap();
    let old = join(root.path(), "old", &victim).await;
    let attacker = common::raw_peer(addrs_of(&victim)).await;
    let (old_id, attacker_id) = (old.net.peer_id(), attacker.peer_id());
    wait_until(Duration::from_secs(20), "both connect", || async {
        connected_to(&victim, old_id).await && connected_to(&victim, attacker_id).await
    })
    .await;
    let listed = || async {
        victim
            .net
            .peers()
            .await
            .unwrap()
            .iter()
            .map(|p| p.peer_id.clone())
            .collect::<Vec<_>>()
    };
    // Two peers known before the flood that hold no connection (announced, then out of
    // reach): a veteran, and one that will lie.
    let [veteran, tainted] = [(); 2].map(|_| Keypair::generate_ed25519());
    let [veteran_id, tainted_id] = [&veteran, &tainted].map(|k| k.public().to_peer_id());
    let [veteran_b58, tainted_b58] = [veteran_id, tainted_id].map(|id| id.to_base58());
    for (key, id) in [(&veteran, &veteran_b58), (&tainted, &tainted_b58)] {
        let statement = common::announcement(key, 1).to_bytes();
        wait_until(Duration::from_secs(10), "the peer is listed", || async {
            let _ = attacker.publish_raw(statement.clone()).await;
            listed().await.contains(id)
        })
        .await;
    }
    // Forty made-up keys announce themselves through the attacker, a few a second (within
    // every rate: what a patient attacker does).
    let strangers: Vec<Keypair> = (0..40).map(|_| Keypair::generate_ed25519()).collect();
    for key in &strangers {
        let statement = common::announcement(key, 1).to_bytes();
        // The first waits for the victim's subscription to reach the attacker.
        wait_until(
            Duration::from_secs(10),
            "the attacker can publish",
            || async { attacker.publish_raw(statement.clone()).await.is_ok() },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stranger_ids: Vec<String> = strangers
        .iter()
        .map(|k| k.public().to_peer_id().to_base58())
        .collect();
    let strangers_listed =
        |listed: &[String]| listed.iter().filter(|p| stranger_ids.contains(p)).count();
    wait_until(
        Duration::from_secs(20),
        "the table fills with strangers",
        || async {
            let listed = listed().await;
            listed.len() == TABLE && strangers_listed(&listed) >= TABLE - 4
        },
    )
    .await;
    let before = listed().await;
    for known in [&veteran_b58, &tainted_b58] {
        assert!(
            before.contains(known),
            "a peer known before the flood was pushed out by newer strangers"
        );
    }
    // The peer known before the flood is still listed, alive.
    let seen = victim.net.peer(old_id).await.unwrap();
    assert!(
        seen.is_some_and(|p| p.state == PeerState::Alive),
        "the old peer was pushed out"
    );
    // The liar's lies put it out of good standing (two down reports about the victim naming
    // announcements it never made: 10 points each).
    let victim_id = victim.net.peer_id();
    for seq in [u64::MAX, u64::MAX - 1] {
        let lie = down_report(&tainted, victim_id, seq).to_bytes();
        attacker.publish_raw(lie).await.unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "the liar is out of good standing",
        || async { victim.net.reputation(tainted_id).await.unwrap() < -10.0 },
    )
    .await;
    // Honest newcomers join through the full table, each listed alive. The liar makes room
    // first, however long known (whatever newcomer comes first: the old peer's syncs may
    // bring back strangers evicted before), the veteran known as long stays; then strangers
    // make room (with the old peer, the attacker, the veteran and the two newcomers kept, at
    // most TABLE - 5 of them are left).
    let mut newcomers = Vec::new();
    for name in ["newcomer", "second"] {
        let newcomer = join(root.path(), name, &victim).await;
        let newcomer_id = newcomer.net.peer_id();
        wait_until(
            Duration::from_secs(20),
            "the victim lists the newcomer alive, and the liar no more",
            || async {
                common::holds_alive(&victim, newcomer_id).await
                    && !listed().await.contains(&tainted_b58)
            },
        )
        .await;
        newcomers.push(newcomer);
        let listed = listed().await;
        assert!(listed.len() <= TABLE, "{} listed", listed.len());
        for kept in [&old_id.to_base58(), &attacker_id.to_base58(), &veteran_b58] {
            assert!(listed.contains(kept), "{kept} was pushed out ({name})");
        }
    }
    assert!(victim.net.metrics().members_evicted_total() >= 1);
    let listed = listed().await;
    assert!(
        strangers_listed(&listed) <= TABLE - 5,
        "{} strangers listed",
        strangers_listed(&listed)
    );
    for node in newcomers.into_iter().chain([old, victim]) {
        node.shutdown().await;
    }
}

const DIAL_BUDGET_TEST: &str = "keys_that_all_claim_one_address_get_a_few_dials_there_not_one_each";

/// Removes the test's veth pair however the test ends.
struct Veth(String);

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

/// Twenty fresh keys announce one address where no node of theirs listens (a victim's
/// machine): the node dials a few of them there, then holds the others back, instead of
/// dialling that address once per key. The addresses are on a veth pair in this namespace
/// (not loopback, which is never limited); root is needed for it: where it is missing the test
/// says so and returns, unless MYCEL_REQUIRE_NETNS=1 (set by CI), where that is a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_all_claim_one_address_get_a_few_dials_there_not_one_each() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let tag = std::process::id() % 200;
    let dev = format!("mycd{tag}");
    let (ours, theirs) = (format!("10.216.{tag}.1"), format!("10.216.{tag}.2"));
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| e.to_string())
            .and_then(|o| {
                o.status
                    .success()
                    .then_some(())
                    .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
            })
    };
    let peer_dev = format!("{dev}p");
    if let Err(e) = ip(&[
        "link", "add", &dev, "type", "veth", "peer", "name", &peer_dev,
    ]) {
        mycel_ml::fixtures::skip_unless_required(
            DIAL_BUDGET_TEST,
            "MYCEL_REQUIRE_NETNS",
            &format!("cannot add a veth pair ({e})"),
        );
        return;
    }
    let _veth = Veth(dev.clone());
    for (addr, dev) in [(&ours, &dev), (&theirs, &peer_dev)] {
        ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]).unwrap();
        ip(&["link", "set", dev, "up"]).unwrap();
    }

    // The victim machine: every connection accepted is counted and closed at once.
    let target = std::net::TcpListener::bind(format!("{theirs}:0")).unwrap();
    let target_port = target.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for stream in target.incoming() {
                accepted.fetch_add(1, Ordering::Relaxed);
                drop(stream);
            }
        });
    }

    let root = tempfile::tempdir().unwrap();
    let mut config = local_config(&root.path().join("node"), vec![], false);
    config.listen = vec![format!("/ip4/{ours}/tcp/0").parse().unwrap()];
    let node = Node::start(config).await.unwrap();
    let attacker = common::raw_peer(addrs_of(&node)).await;
    wait_until(Duration::from_secs(20), "the attacker connects", || async {
        connected_to(&node, attacker.peer_id()).await
    })
    .await;
    let claimed = format!("/ip4/{theirs}/tcp/{target_port}");
    // Gossip has somewhere to go once the node's subscription reaches the attacker; until
    // then a publish finds nobody (each try is a fresh key: a repeated message would be a
    // duplicate).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut told = 0;
    while told < 20 {
        let key = Keypair::generate_ed25519();
        let lie = common::announcement_at(&key, 1, vec![claimed.clone()]);
        match attacker.publish_raw(lie.to_bytes()).await {
            Ok(()) => told += 1,
            Err(e) => {
                assert!(Instant::now() < deadline, "publishing: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // The attacker leaves (it is a full node too, and would dial the keys it told of
    // itself); the node still holds the 20 keys alive and keeps wanting them.
    wait_until(
        Duration::from_secs(20),
        "the node lists the 20 keys",
        || async { node.net.status().await.unwrap().alive >= 21 },
    )
    .await;
    attacker.shutdown().await;
    let before = accepted.load(Ordering::Relaxed);
    let refused = node.net.metrics().refused_total("address_budget");
    // Degree upkeep and Kademlia keep asking for them (the node is short of its degree),
    // and the budget lets at most 8 dials a minute reach the host. Without it every key
    // would be dialled there at least once, most several times.
    wait_until(
        Duration::from_secs(30),
        "the node held back 60 more dials to the claimed address",
        || async { node.net.metrics().refused_total("address_budget") >= refused + 60 },
    )
    .await;
    let dials = accepted.load(Ordering::Relaxed) - before;
    assert!(
        dials <= 8,
        "{dials} connections reached the claimed address for 20 keys"
    );
    node.shutdown().await;
}
