//! `mycel bench ...`: whole-network benchmarks. A readable table goes to stderr; with `--json`
//! one JSON object per scenario goes to stdout.

mod attack;
mod blobs;
#[cfg(feature = "fault-injection")]
mod byzantine;
mod failover;
mod fl;
mod inference;
mod lab;
mod nat;
mod net;
mod partition;
mod secagg;
mod serve;

use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Membership, gossip, request-response and failure detection with N real nodes.
    Net(net::NetBenchArgs),
    /// NAT traversal in network namespaces with nftables NAT routers, port-preserving and
    /// symmetric: time until nodes behind NATs are reachable through a relay, and whether a
    /// blob then travels over a punched hole (needs root).
    Nat(nat::NatBenchArgs),
    /// A network of node processes in two network namespaces, the link between them cut (a
    /// blackhole) and restored: how fast each half notices, and how fast and how completely
    /// they reconcile with no restart (needs root).
    Partition(partition::PartitionBenchArgs),
    /// The reference models on this machine: embeddings (beside sentence-transformers when
    /// given --python) and SmolLM2 prompt processing and decoding.
    Inference(inference::InferenceBenchArgs),
    /// Many chat users at once against one node serving a GGUF (continuous batching),
    /// beside llama.cpp's llama-server --parallel N on the same file when given
    /// --llama-server: aggregate tokens per second, latency and time to the first token per
    /// concurrency level.
    Serve(serve::ServeBenchArgs),
    /// Serving nodes killed while a client sends requests through a gateway node: every
    /// request must succeed; latency before, during and after.
    Failover(failover::FailoverBenchArgs),
    /// Blob import, and fetches between node processes against a plain TCP copy: one
    /// provider, three rate-limited providers, memory while fetching a large blob.
    Blobs(blobs::BlobsBenchArgs),
    /// Federated training of the digits across real nodes on loopback, per scenario (split,
    /// aggregator, attack, compression, hierarchy); with --flower, beside Flower.
    Fl(fl::FlBenchArgs),
    /// One securely aggregated round through its state machines in this process, for
    /// rounds of several sizes, with everyone as everyone's neighbour and with
    /// neighbourhoods (SecAgg+): each participant's CPU time and bytes, the coordinator's.
    Secagg(secagg::SecaggBenchArgs),
    /// Attacks on a victim node process by a peer speaking our protocols (lying down
    /// reports, a flood of one issuer's statements, sync amplification, silent task streams,
    /// silent API connections): whether honest nodes still see it alive, honest bans, its CPU
    /// and memory, and the requests it answers against a run with no attack.
    Attack(attack::AttackBenchArgs),
    /// Verification against lying workers (colluding or not) under replicate and
    /// spot_check: wrong outputs accepted, liars isolated, work and latency against mode
    /// none. Needs a build with --features fault-injection.
    #[cfg(feature = "fault-injection")]
    Byzantine(byzantine::ByzantineBenchArgs),
    /// The sending half of the TCP baseline of `bench blobs` (run by it).
    #[command(hide = true)]
    TcpSend(blobs::TcpSendArgs),
}

pub(crate) async fn run(command: BenchCommand) -> anyhow::Result<()> {
    if !matches!(command, BenchCommand::TcpSend(_)) {
        eprintln!("reproduce with: {}", command_line());
    }
    match command {
        BenchCommand::Net(args) => net::run(args).await,
        BenchCommand::Nat(args) => nat::run(args).await,
        BenchCommand::Partition(args) => partition::run(args).await,
        BenchCommand::Inference(args) => inference::run(args).await,
        BenchCommand::Serve(args) => serve::run(args).await,
        BenchCommand::Failover(args) => failover::run(args).await,
        BenchCommand::Blobs(args) => blobs::run(args).await,
        BenchCommand::Fl(args) => fl::run(args).await,
        BenchCommand::Secagg(args) => secagg::run(args).await,
        BenchCommand::Attack(args) => attack::run(args).await,
        #[cfg(feature = "fault-injection")]
        BenchCommand::Byzantine(args) => byzantine::run(args).await,
        BenchCommand::TcpSend(args) => blobs::tcp_send(args),
    }
}

/// The log filter of the node processes a benchmark starts: MYCEL_BENCH_NODE_LOG=<filter>
/// shows their logs (for finding where time goes), errors only otherwise.
pub(crate) fn node_log_filter() -> String {
    std::env::var("MYCEL_BENCH_NODE_LOG").unwrap_or_else(|_| "error".into())
}

/// Where those nodes' logs go: this process's stderr when MYCEL_BENCH_NODE_LOG is set.
pub(crate) fn node_stderr() -> std::process::Stdio {
    if std::env::var_os("MYCEL_BENCH_NODE_LOG").is_some() {
        std::process::Stdio::inherit()
    } else {
        std::process::Stdio::null()
    }
}

/// This process's command line, each argument quoted where a shell would need it: what
/// reproduces the benchmark.
pub(crate) fn command_line() -> String {
    std::env::args()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints one JSON result line on stdout, with the command that reproduces it.
pub(crate) fn emit_json(mut line: serde_json::Value) {
    if let Some(object) = line.as_object_mut() {
        object.insert("command".into(), command_line().into());
    }
    println!("{line}");
}

/// Resident set size of this process in KiB.
pub(crate) fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// Resident set size of process `proc` (a pid, or `self`) in KiB.
pub(crate) fn rss_kib_of(proc: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{proc}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) this process has used, in seconds.
pub(crate) fn cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// CPU time this process has used, in seconds, to the nanosecond (what `cpu_seconds` reads
/// from /proc counts 10 ms ticks: too coarse for one task of a millisecond).
pub(crate) fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return cpu_seconds();
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// CPU time (user + system) process `proc` (a pid, or `self`) has used, in seconds.
pub(crate) fn cpu_seconds_of(proc: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{proc}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/<pid>/stat: indices 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// Waits until `node` sees `want` alive peers that `matches`, polling every `poll`; fails
/// after `limit` saying how many of the `what` came up.
pub(crate) async fn wait_for_peers(
    node: &mycel_node::Node,
    want: usize,
    what: &str,
    (limit, poll): (std::time::Duration, std::time::Duration),
    matches: impl Fn(&mycel_core::membership::PeerInfo) -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let seen = node
            .net
            .peers()
            .await?
            .iter()
            .filter(|p| p.state == mycel_core::membership::PeerState::Alive && matches(p))
            .count();
        if seen >= want {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("only {seen} of {want} {what} came up within {limit:?}");
        }
        tokio::time::sleep(poll).await;
    }
}

/// The value at quantile `q` (0..=1) of sorted `values`.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
