//! `mycel bench partition`: a network cut in two and healed, on real kernels' networking.
//!
//! N `mycel` processes, half in each of two network namespaces joined by a veth pair (see
//! `netlab.rs`). Once every node sees every other alive, the link is cut for `--cut-secs`,
//! and at least until every node has announced again: `--cut blackhole` (the default)
//! drops everything arriving over it (nftables: no error reaches anyone, only silence);
//! `--cut down` takes the link down at both ends (the kernels see it go, and senders get
//! errors at once). During the cut one node on
//! each side stores a blob, so its provider record lives only in its own half. Then the link
//! comes back and, with no restart, the halves must reconcile. Per run:
//!
//! - `converge_ms`: start of the nodes until every node sees every other alive;
//! - `detected_ms`: cut (from just before the first nftables rule) until every node sees
//!   every node of the other half failed;
//! - `failed_by`: at that moment, (viewer, peer of the other half) pairs by the reason the
//!   viewer failed the peer (`missed_pings`, `reported`, `unanswered`: its own probe went
//!   unanswered, `expired`, `unreachable`);
//! - `heal_ms`: link restored until every node sees every other alive again;
//! - `reconcile_ms`: link restored until, besides, every node holds every other node's
//!   announcement made during the cut (or a newer one);
//! - `announcements_lost`: (viewer, announcer) pairs where the viewer lacks the announcer's
//!   announcement from the cut when the halves reconcile, or `SETTLE` after the heal;
//! - `announcements_masked`: pairs where the viewer by then holds a newer announcement (the
//!   announcer spoke again after the link came back: nodes announce every 24-36 s), so
//!   whether the one from the cut crossed cannot be told;
//! - `blobs_fetched` (of 2) and `fetch_ms`: each side fetches, by content id, the blob stored
//!   on the other side during the cut (DHT provider records across the healed link).
//!
//! Nodes ping every `--ping-interval` seconds and fail a peer after 2 missed pings (the
//! defaults, 10 s, would not detect a 30 s cut in time); everything else is the node's default.
//! The bench polls each node's /api/peers from a thread that enters the node's namespace, so a
//! poll of 20 nodes takes milliseconds, not 20 process starts. Needs root.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::lab::{median, ms, LabNode};
use crate::netlab::VethPair;

#[derive(Args)]
pub(crate) struct PartitionBenchArgs {
    /// Nodes, half in each namespace.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// How long the link stays cut (at least; the cut lasts until every node has announced
    /// again).
    #[arg(long, default_value_t = 30)]
    cut_secs: u64,
    /// How the link is cut: `blackhole` (silence) or `down` (the link goes away).
    #[arg(long, value_enum, default_value_t = Cut::Blackhole)]
    cut: Cut,
    /// The nodes' ping interval in seconds (`mycel node --ping-interval`).
    #[arg(long, default_value_t = 1)]
    ping_interval: u64,
    /// Networks built, cut and healed.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print one JSON object per run, and one with the medians, on stdout.
    #[arg(long)]
    json: bool,
}

/// How the link between the halves is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Cut {
    /// Every packet arriving over the link is dropped.
    Blackhole,
    /// The link is taken down at both ends.
    Down,
}

impl Cut {
    fn apply(self, pair: &VethPair) -> Result<(), String> {
        match self {
            Self::Blackhole => pair.blackhole(),
            Self::Down => pair.link_down(),
        }
    }

    fn undo(self, pair: &VethPair) -> Result<(), String> {
        match self {
            Self::Blackhole => pair.restore(),
            Self::Down => pair.link_up(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Blackhole => "blackhole",
            Self::Down => "down",
        }
    }
}

/// How long convergence, detection or healing may take before the run reports it failed.
const LIMIT: Duration = Duration::from_secs(120);
/// How long after the heal the announcements made during the cut may still arrive.
const SETTLE: Duration = Duration::from_secs(5);

/// What one node sees: peer id -> (state, sequence number of its latest announcement).
type View = HashMap<String, (String, u64)>;

/// Past this, the bench says which nodes still hold which peers of the other half alive.
const SLOW_DETECTION: Duration = Duration::from_secs(15);

struct Member {
    node: LabNode,
    /// Index of its namespace in the pair (0 or 1).
    side: usize,
}

pub(crate) async fn run(args: PartitionBenchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: PartitionBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.nodes >= 4 && args.nodes.is_multiple_of(2),
        "--nodes must be even and at least 4 (half on each side)"
    );
    let exe = std::env::current_exe().context("finding the mycel binary")?;
    let root = tempfile::tempdir()?;
    let mut reports = Vec::new();
    for run in 1..=args.runs.max(1) {
        eprintln!("run {run}/{}: {} nodes", args.runs.max(1), args.nodes);
        let mut report = one_run(&exe, &args, &root.path().join(format!("run{run}")))?;
        report["run"] = json!(run);
        if args.json {
            super::emit_json(report.clone());
        } else {
            eprintln!("{report}");
        }
        reports.push(report);
    }
    let median = |key: &str| median(&reports, key).map(f64::round);
    let summary = json!({
        "nodes": args.nodes,
        "cut": args.cut.name(),
        "runs": reports.len(),
        "healed": reports.iter().filter(|r| !r["heal_ms"].is_null()).count(),
        "converge_ms_median": median("converge_ms"),
        "detected_ms_median": median("detected_ms"),
        "heal_ms_median": median("heal_ms"),
        "reconcile_ms_median": median("reconcile_ms"),
        "announcements_lost_total": reports.iter().filter_map(|r| r["announcements_lost"].as_u64()).sum::<u64>(),
        "announcements_masked_total": reports.iter().filter_map(|r| r["announcements_masked"].as_u64()).sum::<u64>(),
        "blobs_fetched": reports.iter().filter_map(|r| r["blobs_fetched"].as_u64()).sum::<u64>(),
        "blobs_asked": 2 * reports.len(),
    });
    if args.json {
        super::emit_json(summary);
    } else {
        println!("{summary}");
    }
    Ok(())
}

fn one_run(exe: &Path, args: &PartitionBenchArgs, root: &Path) -> anyhow::Result<Value> {
    let pair = VethPair::new("q", 77).map_err(|e| {
        anyhow::anyhow!(
            "cannot build the namespaces ({e}); run as root with ip (iproute2) and nft (nftables)"
        )
    })?;
    // nftables must work before anything is measured.
    pair.blackhole()
        .and_then(|()| pair.restore())
        .map_err(|e| anyhow::anyhow!("nftables does not work here ({e}); install nftables"))?;
    let n = args.nodes;
    let side_of = |i: usize| usize::from(i >= n / 2);
    let started = Instant::now();
    // Ports repeat across the sides (each side is its own namespace).
    let port_of = |i: usize| 4001 + i % (n / 2);
    let start = |i: usize, boot: &[String]| -> anyhow::Result<LabNode> {
        let side = side_of(i);
        let mut node_args = vec![
            "--port".to_owned(),
            port_of(i).to_string(),
            "--ping-interval".to_owned(),
            args.ping_interval.to_string(),
            "--max-missed-pings".to_owned(),
            "2".to_owned(),
        ];
        for b in boot {
            node_args.extend(["--bootstrap".to_owned(), b.clone()]);
        }
        LabNode::start(
            exe,
            &pair.names[side],
            root.join(format!("n{i}")),
            &format!("127.0.0.1:{}", 7000 + i),
            &node_args,
        )
    };
    // Two seeds, one per side; everyone else bootstraps from both, as from a bootstrap list.
    let mut nodes: Vec<Option<LabNode>> = (0..n).map(|_| None).collect();
    let mut boot = Vec::new();
    for seed in [0, n / 2] {
        let node = start(seed, &boot)?;
        let id = node.peer_id(LIMIT)?;
        boot.push(format!(
            "/ip4/{}/tcp/{}/p2p/{id}",
            pair.addrs[side_of(seed)],
            port_of(seed)
        ));
        nodes[seed] = Some(node);
    }
    for (i, slot) in nodes.iter_mut().enumerate() {
        if slot.is_none() {
            *slot = Some(start(i, &boot)?);
        }
    }
    let members: Vec<Member> = nodes
        .into_iter()
        .enumerate()
        .map(|(i, node)| Member {
            node: node.expect("every node started"),
            side: side_of(i),
        })
        .collect();
    let ids: Vec<String> = members
        .iter()
        .map(|m| m.node.peer_id(LIMIT))
        .collect::<anyhow::Result<_>>()?;
    let all_alive = |views: &[View]| {
        views.iter().enumerate().all(|(i, view)| {
            ids.iter()
                .enumerate()
                .all(|(j, id)| i == j || view.get(id).is_some_and(|(s, _)| s == "alive"))
        })
    };
    poll_until(&members, "every node sees every other alive", |v| {
        all_alive(v)
    })?;
    let converge_ms = ms(started.elapsed());
    eprintln!("  converged after {converge_ms} ms; cutting the link");

    // The latest announcement of node j that its own half has seen.
    let seen_in_half = |views: &[View], j: usize| {
        (0..n)
            .filter(|i| *i != j && members[*i].side == members[j].side)
            .filter_map(|i| views[i].get(&ids[j]).map(|(_, seq)| *seq))
            .max()
            .unwrap_or(0)
    };
    let before: Vec<u64> = {
        let v = views(&members);
        (0..n).map(|j| seen_in_half(&v, j)).collect()
    };
    // The cut takes effect with the first rule: time it from before the rules go in.
    let cut = Instant::now();
    args.cut.apply(&pair).map_err(anyhow::Error::msg)?;
    let mut detected_ms = None;
    let mut told = false;
    poll_until(&members, "each half sees the other failed", |v| {
        let failed = (0..n).all(|i| {
            (0..n)
                .filter(|j| members[*j].side != members[i].side)
                .all(|j| v[i].get(&ids[j]).is_some_and(|(s, _)| s == "failed"))
        });
        if failed {
            detected_ms = Some(ms(cut.elapsed()));
        } else if !told && cut.elapsed() > SLOW_DETECTION {
            // Detection should take seconds: say who still holds whom alive, and how.
            told = true;
            for i in 0..n {
                for p in other_half(&members, &ids, i) {
                    if p["state"].as_str() != Some("failed") {
                        eprintln!("  after {SLOW_DETECTION:?} node {i} still holds {p}");
                    }
                }
            }
        }
        failed
    })?;
    // A blob stored on each side during the cut: its provider record stays on that side.
    let blob = |i: usize| -> anyhow::Result<(String, Vec<u8>)> {
        let data: Vec<u8> = (0..256 * 1024u32)
            .map(|k| (k.wrapping_mul(2_654_435_761).wrapping_add(i as u32) >> 24) as u8)
            .collect();
        let file = root.join(format!("blob{i}.bin"));
        std::fs::write(&file, &data)?;
        let (ok, out, err) = members[i].node.cli(exe, &["put", &file.to_string_lossy()]);
        if !ok {
            bail!("put on node {i} during the cut failed: {err}");
        }
        Ok((out.trim().to_owned(), data))
    };
    let failed_by = fail_reasons(&members, &ids);
    let blobs = [blob(0)?, blob(n / 2)?];
    let mut during = before.clone();
    poll_until(
        &members,
        "every node has announced again during the cut",
        |v| {
            during = (0..n).map(|j| seen_in_half(v, j)).collect();
            during.iter().zip(&before).all(|(d, b)| d > b)
        },
    )?;
    while cut.elapsed() < Duration::from_secs(args.cut_secs) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // What each node announced during the cut, as its half has it when the link returns.
    let v = views(&members);
    let during: Vec<u64> = (0..n).map(|j| seen_in_half(&v, j).max(during[j])).collect();
    let cut_ms = ms(cut.elapsed());
    eprintln!("  each half failed the other after {detected_ms:?} ms; restoring the link after {cut_ms} ms");

    args.cut.undo(&pair).map_err(anyhow::Error::msg)?;
    let restored = Instant::now();
    // (viewer, announcer) pairs whose viewer holds an announcement older (`Less`) than, or
    // newer (`Greater`) than, the announcer's from the cut. Newer means the announcer spoke
    // again after the link came back, so whether the one from the cut got across cannot be
    // told (reported as masked, not counted as delivered or lost).
    let pairs = |v: &[View], order: std::cmp::Ordering| {
        (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .filter(|(i, j)| {
                i != j
                    && v[*i]
                        .get(&ids[*j])
                        .map_or(0, |(_, seq)| *seq)
                        .cmp(&during[*j])
                        == order
            })
            .count()
    };
    let missing = |v: &[View]| pairs(v, std::cmp::Ordering::Less);
    let masked = |v: &[View]| pairs(v, std::cmp::Ordering::Greater);
    let mut heal_ms = None;
    let mut reconcile_ms = None;
    let mut lost = None;
    let mut masked_pairs = 0;
    let healed = poll_until(&members, "the halves reconcile", |v| {
        if heal_ms.is_none() && all_alive(v) {
            heal_ms = Some(ms(restored.elapsed()));
        }
        let missing = missing(v);
        if heal_ms.is_some() && reconcile_ms.is_none() && missing == 0 {
            reconcile_ms = Some(ms(restored.elapsed()));
        }
        let settled =
            heal_ms.is_some_and(|h| restored.elapsed() >= Duration::from_millis(h) + SETTLE);
        if settled || reconcile_ms.is_some() {
            lost = Some(missing);
            masked_pairs = masked(v);
        }
        lost.is_some()
    });
    if let Err(e) = healed {
        eprintln!("  {e}");
        lost = Some(missing(&views(&members)));
    }
    eprintln!("  healed after {heal_ms:?} ms, reconciled after {reconcile_ms:?} ms");

    // Each side fetches the other side's blob by content id.
    let mut fetch_ms = Vec::new();
    let mut fetched = 0;
    for ((id, data), fetcher) in blobs.iter().zip([n - 1, n / 2 - 1]) {
        let copy = root.join(format!("copy{fetcher}.bin"));
        let asked = Instant::now();
        let (ok, _, err) = members[fetcher]
            .node
            .cli(exe, &["get", id, "-o", &copy.to_string_lossy()]);
        fetch_ms.push(ms(asked.elapsed()));
        if ok && std::fs::read(&copy)? == *data {
            fetched += 1;
        } else {
            eprintln!(
                "  node {fetcher} could not fetch {id} across the healed link: {}",
                err.trim()
            );
        }
    }
    Ok(json!({
        "nodes": n,
        "cut": args.cut.name(),
        "cut_ms": cut_ms,
        "converge_ms": converge_ms,
        "detected_ms": detected_ms,
        "failed_by": failed_by,
        "heal_ms": heal_ms,
        "reconcile_ms": reconcile_ms,
        "announcements_lost": lost,
        "announcements_masked": masked_pairs,
        "blobs_fetched": fetched,
        "fetch_ms": fetch_ms,
    }))
}

/// (viewer, peer of the other half) pairs each member holds failed, by the reason it failed
/// them.
fn fail_reasons(members: &[Member], ids: &[String]) -> Value {
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for i in 0..members.len() {
        for p in other_half(members, ids, i) {
            if p["state"].as_str() != Some("failed") {
                continue;
            }
            // A unit reason is a string; `reported` carries its reporter.
            let reason = match &p["fail_reason"] {
                Value::String(r) => r.clone(),
                Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
                _ => "none".to_owned(),
            };
            *counts.entry(reason).or_default() += 1;
        }
    }
    json!(counts)
}

/// What member `i` holds about the peers of the other half (its /api/peers entries).
fn other_half(members: &[Member], ids: &[String], i: usize) -> Vec<Value> {
    let other_side: HashSet<&str> = members
        .iter()
        .zip(ids)
        .filter(|(m, _)| m.side != members[i].side)
        .map(|(_, id)| id.as_str())
        .collect();
    let peers = members[i].node.api("/api/peers").unwrap_or_default();
    let Value::Array(peers) = peers else {
        return Vec::new();
    };
    peers
        .into_iter()
        .filter(|p| {
            p["peer_id"]
                .as_str()
                .is_some_and(|id| other_side.contains(id))
        })
        .collect()
}

/// Every member's view, from its /api/peers (a node that does not answer sees nobody).
fn views(members: &[Member]) -> Vec<View> {
    members
        .iter()
        .map(|m| {
            let peers = m.node.api("/api/peers").unwrap_or_default();
            peers
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p["peer_id"].as_str()?.to_owned(),
                        (p["state"].as_str()?.to_owned(), p["seq"].as_u64()?),
                    ))
                })
                .collect()
        })
        .collect()
}

/// Polls every node's view until `done` holds (or [`LIMIT`] passes).
fn poll_until(
    members: &[Member],
    what: &str,
    mut done: impl FnMut(&[View]) -> bool,
) -> anyhow::Result<()> {
    super::lab::wait(what, LIMIT, || done(&views(members)))
}
