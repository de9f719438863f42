//! `mycel bench nat`: NAT traversal between `mycel` processes in network namespaces with real
//! NAT routers (nftables masquerade; see `netlab.rs`), behind port-preserving ("cone") and
//! symmetric NATs, runs interleaved. Per run: how long until both homes know they are private
//! and hold a relay reservation, and how long B takes to fetch a 1 MiB blob from A (a relayed
//! connection, a hole punch, then the transfer over the direct connection) or to be refused
//! with the error that says why (symmetric NATs: no hole can be punched, bulk data does not
//! ride the relay). Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::netlab::{NatLab, HOME_A, HOME_B, INTERNET, INTERNET_ADDRS};

#[derive(Args)]
pub(crate) struct NatBenchArgs {
    /// Runs of each NAT kind (interleaved: cone, symmetric, cone, ...).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON line per run and one with the medians.
    #[arg(long)]
    json: bool,
}

/// How long any one step may take.
const LIMIT: Duration = Duration::from_secs(90);

struct Node {
    child: Child,
    ns: String,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(
        exe: &Path,
        lab: &NatLab,
        ns: usize,
        dir: PathBuf,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let [program, prefix @ ..] = lab.exec(ns);
        let child = Command::new(program)
            .args(prefix)
            .arg(exe)
            .arg("node")
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--no-mdns",
                "--no-upnp",
                "--port",
                "4001",
                "--api",
                "127.0.0.1:7878",
            ])
            .args(args)
            .env("MYCEL_LOG", super::node_log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(super::node_stderr())
            .spawn()
            .context("starting a node")?;
        Ok(Self {
            child,
            ns: lab.names[ns].clone(),
            dir,
        })
    }

    /// `mycel ARGS` against this node, inside its namespace.
    fn cli(&self, exe: &Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", self.ns.as_str()])
            .arg(exe)
            .args(args)
            .args(["--api", "127.0.0.1:7878", "--data-dir"])
            .arg(&self.dir)
            .output();
        match out {
            Ok(out) => (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ),
            Err(e) => (false, String::new(), e.to_string()),
        }
    }

    fn status(&self, exe: &Path) -> Value {
        let (ok, out, _) = self.cli(exe, &["status", "--json"]);
        if ok {
            serde_json::from_str(&out).unwrap_or(Value::Null)
        } else {
            Value::Null
        }
    }
}

fn wait(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {LIMIT:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

struct Run {
    private_ms: f64,
    fetch_ms: f64,
    fetched: bool,
    error: String,
}

fn one_run(exe: &Path, symmetric: bool, root: &Path) -> anyhow::Result<Run> {
    let lab = NatLab::new("b", symmetric).map_err(|e| {
        anyhow::anyhow!("cannot build the namespaces and NAT routers ({e}); run as root with ip (iproute2) and nft (nftables)")
    })?;
    let _ = std::fs::remove_dir_all(root);
    let relay = Node::start(
        exe,
        &lab,
        INTERNET,
        root.join("r"),
        &[
            "--external-addr".into(),
            "/ip4/198.51.100.1/udp/4001/quic-v1".into(),
        ],
    )?;
    let mut relay_id = String::new();
    wait("the relay is up", || {
        relay_id = relay.status(exe)["network"]["peer_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        !relay_id.is_empty()
    })?;
    let started = Instant::now();
    let home = |ns: usize, name: &str, side: usize| {
        Node::start(
            exe,
            &lab,
            ns,
            root.join(name),
            &[
                "--bootstrap".into(),
                format!(
                    "/ip4/{}/udp/4001/quic-v1/p2p/{relay_id}",
                    INTERNET_ADDRS[side]
                ),
            ],
        )
    };
    let a = home(HOME_A, "a", 0)?;
    let b = home(HOME_B, "b", 1)?;
    wait(
        "both homes are private and hold a relay reservation",
        || {
            [&a, &b].iter().all(|n| {
                let net = &n.status(exe)["network"];
                net["reachability"] == "private"
                    && net["relays"].as_array().is_some_and(|r| !r.is_empty())
            })
        },
    )?;
    let private_ms = started.elapsed().as_secs_f64() * 1000.0;

    let file = root.join("blob.bin");
    let data: Vec<u8> = (0..1u32 << 20)
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
    let (fetched, _, error) = b.cli(exe, &["get", &id, "-o", &copy.to_string_lossy()]);
    let fetch_ms = asked.elapsed().as_secs_f64() * 1000.0;
    if fetched && std::fs::read(&copy)? != data {
        bail!("B fetched a blob that differs from A's");
    }
    Ok(Run {
        private_ms,
        fetch_ms,
        fetched,
        error: error.trim().to_owned(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) async fn run(args: NatBenchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: NatBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the mycel binary")?;
    let root = tempfile::tempdir()?;
    let kinds = [("cone", false), ("symmetric", true)];
    let mut results: Vec<(&str, Run)> = Vec::new();
    for run in 1..=args.runs {
        for (kind, symmetric) in kinds {
            eprintln!("run {run}/{}: {kind} NATs", args.runs);
            let r = one_run(&exe, symmetric, &root.path().join(format!("{kind}{run}")))?;
            if args.json {
                println!(
                    "{}",
                    json!({"nat": kind, "run": run, "private_ms": r.private_ms.round(),
                           "fetch_ms": r.fetch_ms.round(), "fetched": r.fetched,
                           "error": if r.fetched { "" } else { r.error.as_str() }})
                );
            } else {
                println!(
                    "{kind:<9} run {run}: private and relayed after {:>6.0} ms; blob {} after {:>6.0} ms{}",
                    r.private_ms,
                    if r.fetched { "fetched directly" } else { "refused" },
                    r.fetch_ms,
                    if r.fetched { String::new() } else { format!(" ({})", r.error) }
                );
            }
            results.push((kind, r));
        }
    }
    for (kind, _) in kinds {
        let runs: Vec<&Run> = results
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, r)| r)
            .collect();
        let fetched = runs.iter().filter(|r| r.fetched).count();
        let private = median(runs.iter().map(|r| r.private_ms).collect());
        let fetch = median(runs.iter().map(|r| r.fetch_ms).collect());
        let summary = json!({"nat": kind, "runs": runs.len(), "fetched_directly": fetched,
                             "private_ms_median": private.round(), "fetch_ms_median": fetch.round(),
                             "command": super::command_line()});
        if args.json {
            println!("{summary}");
        } else {
            println!(
                "{kind}: {fetched} of {} fetched directly; median {private:.0} ms to private and relayed, {fetch:.0} ms to the blob or its refusal",
                runs.len()
            );
        }
    }
    Ok(())
}
