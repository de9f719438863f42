//! `mycel bench nat`: NAT traversal between `mycel` processes in network namespaces with real
//! NAT routers (nftables masquerade; see `netlab.rs`). Three scenarios, tries interleaved:
//! both homes behind port-preserving ("cone") routers, one cone and one symmetric, both
//! symmetric. Per try: a relay on the "internet", home A serving a tiny generation model, home
//! B. Once both homes know they are private and hold a relay reservation, B connects to A
//! (through the relay: neither can be dialled), may punch a direct connection (DCUtR), asks A
//! for a chat completion, and fetches a blob from A, which travels only over a direct
//! connection (bulk data never rides a relay by default) or is refused with the error that
//! says why. Needs root.
//!
//! One JSON line per try, and one per scenario with `tries`, `relayed_ok` (B got a connection
//! to A), `relayed_connect_ms` (p50: from both homes private and relayed to B's first
//! connection to A), `direct_ok`, `direct_ms` (p50: from B's first connection to A, relayed, to
//! the direct one, as B recorded it; null in a try where B's first connection was direct),
//! `direct_within_2s`, `chat_ok`, `blob_ok` and `blob_mb_s` (p50).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::lab::{median, ms, LabNode};
use crate::netlab::{NatLab, HOME_A, HOME_B, INTERNET, INTERNET_ADDRS};

#[derive(Args)]
pub(crate) struct NatBenchArgs {
    /// Tries of each scenario (interleaved: cone-cone, cone-symmetric, symmetric-symmetric,
    /// cone-cone, ...).
    #[arg(long, default_value_t = 3)]
    tries: usize,
    /// Size of the blob B fetches from A, in MiB.
    #[arg(long, default_value_t = 4)]
    blob_mib: usize,
    /// Print one JSON line per try and one per scenario.
    #[arg(long)]
    json: bool,
}

/// The scenarios: name, and whether router A and router B are symmetric.
const SCENARIOS: [(&str, [bool; 2]); 3] = [
    ("cone-cone", [false, false]),
    ("cone-symmetric", [false, true]),
    ("symmetric-symmetric", [true, true]),
];

/// How long any one step may take.
const LIMIT: Duration = Duration::from_secs(90);
/// How long B's connection to A may stay relayed before the try counts no direct one (DCUtR
/// makes 3 attempts a few seconds apart).
const DIRECT_LIMIT: Duration = Duration::from_secs(25);

/// A node in namespace `ns` of the lab, its API on the namespace's 127.0.0.1:7878.
fn start(
    exe: &Path,
    lab: &NatLab,
    ns: usize,
    dir: PathBuf,
    args: &[String],
) -> anyhow::Result<LabNode> {
    let args: Vec<String> = ["--port".to_owned(), "4001".to_owned()]
        .into_iter()
        .chain(args.iter().cloned())
        .collect();
    LabNode::start(exe, &lab.names[ns], dir, "127.0.0.1:7878", &args)
}

/// Polls `done` every 20 ms until it holds or `limit` passes: the time it took, or none.
fn time_until(limit: Duration, done: impl FnMut() -> bool) -> Option<Duration> {
    super::lab::poll(limit, Duration::from_millis(20), done)
}

/// `viewer`'s entry for `peer` in /api/peers.
fn peer_entry(viewer: &LabNode, peer: &str) -> Option<Value> {
    viewer
        .api("/api/peers")?
        .as_array()?
        .iter()
        .find(|p| p["peer_id"] == peer)
        .cloned()
}

/// How `viewer` is connected to `peer` now: "direct", "relayed", or none.
fn link(viewer: &LabNode, peer: &str) -> Option<String> {
    peer_entry(viewer, peer)?["link"]
        .as_str()
        .map(str::to_owned)
}

fn one_try(
    exe: &Path,
    symmetric: [bool; 2],
    root: &Path,
    blob_mib: usize,
) -> anyhow::Result<Value> {
    let lab = NatLab::new("b", symmetric).map_err(|e| {
        anyhow::anyhow!("cannot build the namespaces and NAT routers ({e}); run as root with ip (iproute2) and nft (nftables)")
    })?;
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root)?;
    let model = root.join("tiny-llama.gguf");
    mycel_ml::fixtures::write_tiny_llama(&model)?;
    let relay = start(
        exe,
        &lab,
        INTERNET,
        root.join("r"),
        &[
            "--external-addr".into(),
            "/ip4/198.51.100.1/udp/4001/quic-v1".into(),
        ],
    )?;
    let relay_id = relay.peer_id(LIMIT)?;
    let started = Instant::now();
    // A and B are one operator's homes: B trusts the name A announces its model under.
    let operator = root.join("operator.key");
    let home = |ns: usize, name: &str, side: usize, extra: &[String]| {
        let mut args = vec![
            "--bootstrap".to_owned(),
            format!(
                "/ip4/{}/udp/4001/quic-v1/p2p/{relay_id}",
                INTERNET_ADDRS[side]
            ),
            "--operator-key".to_owned(),
            operator.display().to_string(),
        ];
        args.extend_from_slice(extra);
        start(exe, &lab, ns, root.join(name), &args)
    };
    let a = home(
        HOME_A,
        "a",
        0,
        &["--model".to_owned(), model.display().to_string()],
    )?;
    let b = home(HOME_B, "b", 1, &[])?;
    let a_id = a.peer_id(LIMIT)?;
    super::lab::wait(
        "both homes are private and hold a relay reservation",
        LIMIT,
        || {
            [&a, &b].iter().all(|n| {
                let net = &n.status()["network"];
                net["reachability"] == "private"
                    && net["relays"].as_array().is_some_and(|r| !r.is_empty())
            })
        },
    )?;
    let private_ms = ms(started.elapsed());

    // B's first connection to A, then (where a hole can be punched) the direct one.
    let mut first = None;
    let relayed_connect = time_until(LIMIT, || {
        first = link(&b, &a_id);
        first.is_some()
    });
    // The time from the relayed connection to the direct one is B's own record
    // (`direct_after_ms`): by the time this loop first looks the hole may be punched already.
    let direct_ok = match first.as_deref() {
        None => false,
        Some("direct") => true,
        Some(_) => time_until(DIRECT_LIMIT, || {
            link(&b, &a_id).as_deref() == Some("direct")
        })
        .is_some(),
    };
    let direct_ms = direct_ok
        .then(|| peer_entry(&b, &a_id))
        .flatten()
        .and_then(|p| p["direct_after_ms"].as_u64());

    // A chat completion from A's model, asked of B (which serves none).
    let chat = [
        "chat",
        "--model",
        "tiny-llama",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "the",
    ];
    let (chat_ok, answer, chat_err) = b.cli(exe, &chat);
    let chat_ok = chat_ok && !answer.trim().is_empty();

    // A blob from A.
    let file = root.join("blob.bin");
    let data: Vec<u8> = (0..(blob_mib as u32) << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&file, &data)?;
    let (ok, out, err) = a.cli(exe, &["put", &file.to_string_lossy()]);
    if !ok {
        bail!("put on A failed: {err}");
    }
    let id = out.trim().to_owned();
    let copy = root.join("copy.bin");
    let asked = Instant::now();
    let (fetched, _, blob_err) = b.cli(exe, &["get", &id, "-o", &copy.to_string_lossy()]);
    let fetch = asked.elapsed();
    if fetched && std::fs::read(&copy)? != data {
        bail!("B fetched a blob that differs from A's");
    }
    Ok(json!({
        "private_ms": private_ms,
        "relayed_ok": relayed_connect.is_some(),
        "relayed_connect_ms": relayed_connect.map(ms),
        "first_link": first,
        "direct_ok": direct_ok,
        "direct_ms": direct_ms,
        "chat_ok": chat_ok,
        "chat_error": if chat_ok { "" } else { chat_err.trim() },
        "blob_ok": fetched,
        "blob_ms": ms(fetch),
        "blob_mb_s": fetched.then(|| data.len() as f64 / 1e6 / fetch.as_secs_f64().max(1e-6)),
        "blob_error": if fetched { "" } else { blob_err.trim() },
    }))
}

pub(crate) async fn run(args: NatBenchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: NatBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the mycel binary")?;
    let root = tempfile::tempdir()?;
    let mut results: Vec<(&str, Value)> = Vec::new();
    for t in 1..=args.tries {
        for (scenario, symmetric) in SCENARIOS {
            eprintln!("try {t}/{}: {scenario}", args.tries);
            let dir = root.path().join(format!("{scenario}{t}"));
            let mut r = one_try(&exe, symmetric, &dir, args.blob_mib)?;
            r["scenario"] = json!(scenario);
            r["try"] = json!(t);
            if args.json {
                println!("{r}");
            } else {
                eprintln!("  {r}");
            }
            results.push((scenario, r));
        }
    }
    for (scenario, _) in SCENARIOS {
        let tries: Vec<Value> = results
            .iter()
            .filter(|(s, _)| *s == scenario)
            .map(|(_, r)| r.clone())
            .collect();
        let count = |key: &str| tries.iter().filter(|t| t[key] == true).count();
        let within_2s = tries
            .iter()
            .filter(|t| t["direct_ms"].as_u64().is_some_and(|d| d <= 2_000))
            .count();
        let summary = json!({
            "scenario": scenario,
            "tries": tries.len(),
            "private_ms": median(&tries, "private_ms"),
            "relayed_ok": count("relayed_ok"),
            "relayed_connect_ms": median(&tries, "relayed_connect_ms"),
            "direct_ok": count("direct_ok"),
            "direct_ms": median(&tries, "direct_ms"),
            "direct_within_2s": within_2s,
            "chat_ok": count("chat_ok"),
            "blob_ok": count("blob_ok"),
            "blob_mb_s": median(&tries, "blob_mb_s"),
        });
        if args.json {
            super::emit_json(summary);
        } else {
            println!("{summary}");
        }
    }
    Ok(())
}
