//! `mycel bench blobs`: blob import speed, and fetches between `mycel node` processes on
//! 127.0.0.1 compared with a plain TCP copy of the same bytes between two processes:
//! - `import_mb_s`: hashing and storing a file (median of 3, fresh stores);
//! - `tcp_mb_s`: a child process sends the file over one loopback TCP connection, this
//!   process writes what arrives to a file through the page cache and syncs it;
//!   `tcp_direct_mb_s`: the same, written the way fetches write (256 KiB aligned chunks past
//!   the page cache into a preallocated file); the fetch is compared against both;
//! - `single_mb_s`: a fetcher node fetches the blob from one provider node;
//! - `swarm_speedup`: providers limited to a third of that rate (`--upload-limit`): the
//!   fetch from three of them against the fetch from one;
//! - `fetch_rss_mib`: the fetcher's peak resident memory while it fetches a 2 GiB blob.
//!
//! Every node is a separate `mycel node` process; fetches go through the fetcher's API
//! (`POST /api/blobs/{cid}/fetch`), timed from the request to its completion event. The TCP
//! copy and the single-provider fetch alternate, five rounds; medians are reported.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use mycel_core::id::ContentId;
use mycel_store::BlobStore;
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;

#[derive(Args)]
pub(crate) struct BlobsBenchArgs {
    /// Size of the blob for the throughput figures.
    #[arg(long, default_value = "512MiB", value_parser = crate::parse_bytes)]
    size: u64,
    /// Size of the blob whose fetch is watched for memory; 0 skips it.
    #[arg(long, default_value = "2GiB", value_parser = crate::parse_bytes)]
    rss_size: u64,
    /// Where the files and node directories go (several times --size, plus 3 x --rss-size).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Arguments of the hidden sender half of the TCP copy.
#[derive(Args)]
pub(crate) struct TcpSendArgs {
    /// The file to send.
    #[arg(long)]
    file: PathBuf,
    /// Where to send it.
    #[arg(long)]
    to: String,
}

/// Sends a file over one TCP connection (the other process of the TCP baseline).
pub(crate) fn tcp_send(args: TcpSendArgs) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(&args.file)?;
    let mut stream = std::net::TcpStream::connect(&args.to)?;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buffer[..n])?;
    }
    Ok(())
}

/// Kills the child processes when dropped, whatever happens to the benchmark.
struct Nodes(Vec<NodeChild>);

struct NodeChild {
    child: Child,
    dir: PathBuf,
    api: String,
    peer: String,
    addr: String,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for node in &mut self.0 {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes `size` bytes of pseudo-random data (BLAKE3's output stream) to `path`.
fn write_data(path: &Path, size: u64, seed: u8) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(MIB as usize, std::fs::File::create(path)?);
    let mut stream = blake3::Hasher::new().update(&[seed]).finalize_xof();
    let mut buffer = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        stream.fill(&mut buffer[..n]);
        out.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Starts `mycel node` in `dir` with `extra` flags; returns once its API answers.
fn start_node(exe: &Path, dir: &Path, extra: &[String]) -> anyhow::Result<NodeChild> {
    let port = free_port()?;
    let api = format!("127.0.0.1:{}", free_port()?);
    let mut child = Command::new(exe)
        .arg("node")
        .arg("--data-dir")
        .arg(dir)
        .args(["--no-mdns", "--api", &api, "--listen"])
        .arg(format!("/ip4/127.0.0.1/tcp/{port}"))
        .args(extra)
        .env("MYCEL_LOG", super::node_log_filter())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(super::node_stderr())
        .spawn()
        .context("starting a node")?;
    let stdout = child.stdout.take().context("the node's output")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().context("the node exited")??;
    let peer = first
        .strip_prefix("peer id")
        .map(|p| p.trim().to_owned())
        .context("the node did not print its peer id")?;
    // Keep draining its output so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let node = NodeChild {
        child,
        dir: dir.to_path_buf(),
        api,
        addr: format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"),
        peer,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while api_get(&node, "/api/status").is_err() {
        if Instant::now() > deadline {
            bail!("the node in {} did not start", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(node)
}

fn token(node: &NodeChild) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(node.dir.join("api.token"))?
        .trim()
        .to_owned())
}

fn api_get(node: &NodeChild, path: &str) -> anyhow::Result<Value> {
    let token = token(node)?;
    Ok(ureq::get(&format!("http://{}{path}", node.api))
        .header("Authorization", &format!("Bearer {token}"))
        .call()?
        .body_mut()
        .read_json()?)
}

/// A provider node holding `file`'s blob (imported into its store before it starts).
fn provider(exe: &Path, dir: &Path, file: &Path, limit: Option<u64>) -> anyhow::Result<NodeChild> {
    let store = BlobStore::open(&dir.join("blobs"), u64::MAX)?;
    store.import_path(file, 0, true)?;
    drop(store);
    let extra: Vec<String> = limit
        .map(|l| vec!["--upload-limit".into(), l.to_string()])
        .unwrap_or_default();
    start_node(exe, dir, &extra)
}

/// Peak resident memory of process `pid`, MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A fresh fetcher node that knows `providers`; fetches `id` through its API. Returns the
/// seconds from the request to the completion event, and the fetcher's peak RSS.
fn fetch(
    exe: &Path,
    dir: &Path,
    providers: &[&NodeChild],
    id: &ContentId,
) -> anyhow::Result<(f64, f64)> {
    let mut extra = Vec::new();
    for p in providers {
        extra.push("--bootstrap".to_owned());
        extra.push(p.addr.clone());
    }
    let fetcher = Nodes(vec![start_node(exe, dir, &extra)?]);
    let node = &fetcher.0[0];
    // The providers are connected and seen before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peers = api_get(node, "/api/peers")?;
        let seen = providers.iter().all(|p| {
            peers
                .as_array()
                .into_iter()
                .flatten()
                .any(|q| q["peer_id"] == p.peer.as_str() && q["state"] == "alive")
        });
        if seen {
            break;
        }
        if Instant::now() > deadline {
            bail!("the fetcher did not see its providers");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let response = ureq::post(&format!("http://{}/api/blobs/{id}/fetch", node.api))
        .header("Authorization", &format!("Bearer {}", token(node)?))
        .send_empty()?;
    let mut complete = false;
    for line in BufReader::new(response.into_body().into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let event: Value = serde_json::from_str(data.trim())?;
        if let Some(e) = event["error"].as_str() {
            bail!("the fetch failed: {e}");
        }
        if event["complete"] == true {
            complete = true;
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(complete, "the fetch ended without completing");
    let rss = peak_rss_mib(node.child.id());
    Ok((seconds, rss))
}

/// How the TCP baseline's receiver writes.
#[derive(Clone, Copy, PartialEq)]
enum Sink {
    /// Through the page cache, synced at the end.
    Cached,
    /// As fetches write: 256 KiB chunks from aligned buffers past the page cache
    /// (`O_DIRECT`) into a preallocated file, synced at the end.
    Direct,
}

/// Copies `file` from a child process over loopback TCP into `out` (synced); seconds.
fn tcp_copy(exe: &Path, file: &Path, out: &Path, write: Sink) -> anyhow::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let started = Instant::now();
    let mut sender = Command::new(exe)
        .args(["bench", "tcp-send", "--file"])
        .arg(file)
        .args(["--to", &addr.to_string()])
        .spawn()?;
    let (mut stream, _) = listener.accept()?;
    let mut sink = std::fs::File::create(out)?;
    match write {
        Sink::Cached => {
            let mut buffer = vec![0u8; 256 * 1024];
            loop {
                let n = stream.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                sink.write_all(&buffer[..n])?;
            }
        }
        Sink::Direct => {
            use std::os::unix::fs::FileExt;
            let size = std::fs::metadata(file)?.len();
            sink.set_len(size)?;
            mycel_store::preallocate(&sink, size)?;
            let direct = mycel_store::DirectWriter::open(out);
            let mut chunk = mycel_store::ChunkBuf::new();
            let mut offset = 0u64;
            while offset < size {
                let len = (size - offset).min(mycel_core::blob::CHUNK_BYTES) as usize;
                let buffer = chunk.sized(len);
                stream.read_exact(buffer)?;
                if !direct.write_at(chunk.bytes(), offset) {
                    sink.write_all_at(chunk.bytes(), offset)?;
                }
                offset += len as u64;
            }
        }
    }
    sink.sync_all()?;
    let seconds = started.elapsed().as_secs_f64();
    sender.wait()?;
    Ok(seconds)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(crate) async fn run(args: BlobsBenchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

/// Touches and frees `bytes` of memory. This machine is a VM whose memory the host backs on
/// first touch: page cache written into never-used guest pages costs several times more
/// (~0.5 GB/s here, against ~5 GB/s for pages used before), and whichever side of a
/// comparison first needs fresh pages would pay for it. Both sides run after this, every
/// round (pages freed once may be handed back to the host and be cold again later).
fn warm_memory(bytes: u64) {
    let mut block = vec![0u8; bytes as usize];
    for i in (0..block.len()).step_by(4096) {
        block[i] = 1;
    }
    std::hint::black_box(&block);
}

fn run_blocking(args: BlobsBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the mycel binary")?;
    warm_memory((4 * args.size).min(6 << 30));
    let root = match &args.dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let dir = root.path();
    let size_mb = args.size as f64 / 1e6;
    let file = dir.join("data.bin");
    eprintln!("writing {} MiB of data", args.size / MIB);
    write_data(&file, args.size, 1)?;
    let id = ContentId(
        *blake3::Hasher::new()
            .update_reader(std::fs::File::open(&file)?)?
            .finalize()
            .as_bytes(),
    );

    // Import: hash and store.
    let mut imports = Vec::new();
    for i in 0..3 {
        let store_dir = dir.join(format!("import-{i}"));
        let store = BlobStore::open(&store_dir, u64::MAX)?;
        let started = Instant::now();
        let imported = store.import_path(&file, 0, false)?;
        imports.push(size_mb / started.elapsed().as_secs_f64());
        anyhow::ensure!(
            imported == id,
            "the import's id differs from BLAKE3 of the file"
        );
        drop(store);
        std::fs::remove_dir_all(&store_dir)?;
    }
    let import_mb_s = median(imports.clone());
    eprintln!("import      {import_mb_s:.0} MB/s (runs {imports:.0?})");

    // Plain TCP between two processes (written through the page cache, and written the way
    // fetches write), and one provider, alternating.
    let mut tcp = Vec::new();
    let mut tcp_direct = Vec::new();
    let mut single = Vec::new();
    let lone = Nodes(vec![provider(&exe, &dir.join("provider"), &file, None)?]);
    for round in 0..5 {
        let out = dir.join("tcp-out.bin");
        for (write, rates) in [(Sink::Cached, &mut tcp), (Sink::Direct, &mut tcp_direct)] {
            warm_memory((3 * args.size).min(6 << 30));
            let seconds = tcp_copy(&exe, &file, &out, write)?;
            anyhow::ensure!(
                std::fs::metadata(&out)?.len() == args.size,
                "the TCP copy is short"
            );
            std::fs::remove_file(&out)?;
            rates.push(size_mb / seconds);
        }
        let fetcher_dir = dir.join(format!("fetcher-single-{round}"));
        warm_memory((3 * args.size).min(6 << 30));
        let (seconds, _) = fetch(&exe, &fetcher_dir, &[&lone.0[0]], &id)?;
        std::fs::remove_dir_all(&fetcher_dir)?;
        single.push(size_mb / seconds);
        eprintln!(
            "round {round}: tcp {:.0} MB/s (page cache), {:.0} MB/s (direct), one provider \
             {:.0} MB/s",
            tcp[round], tcp_direct[round], single[round]
        );
    }
    drop(lone);
    let (tcp_mb_s, tcp_direct_mb_s, single_mb_s) = (
        median(tcp.clone()),
        median(tcp_direct.clone()),
        median(single.clone()),
    );

    // Providers limited to a third of the single rate: one, then three.
    let limit = (single_mb_s * 1e6 / 3.0) as u64;
    let limited: Vec<NodeChild> = (0..3)
        .map(|i| provider(&exe, &dir.join(format!("limited-{i}")), &file, Some(limit)))
        .collect::<anyhow::Result<_>>()?;
    let limited = Nodes(limited);
    warm_memory((3 * args.size).min(6 << 30));
    let (one_s, _) = fetch(&exe, &dir.join("fetcher-one"), &[&limited.0[0]], &id)?;
    std::fs::remove_dir_all(dir.join("fetcher-one"))?;
    let all: Vec<&NodeChild> = limited.0.iter().collect();
    warm_memory((3 * args.size).min(6 << 30));
    let (three_s, _) = fetch(&exe, &dir.join("fetcher-three"), &all, &id)?;
    std::fs::remove_dir_all(dir.join("fetcher-three"))?;
    drop(limited);
    let swarm_speedup = one_s / three_s;
    eprintln!(
        "swarm: limit {:.0} MB/s each; one provider {:.1} s, three {:.1} s: {swarm_speedup:.2}x",
        limit as f64 / 1e6,
        one_s,
        three_s
    );
    for i in 0..3 {
        std::fs::remove_dir_all(dir.join(format!("limited-{i}")))?;
    }
    std::fs::remove_dir_all(dir.join("provider"))?;

    // Memory while fetching a large blob.
    let mut fetch_rss_mib = None;
    if args.rss_size > 0 {
        std::fs::remove_file(&file)?;
        let big = dir.join("big.bin");
        eprintln!("writing {} MiB of data", args.rss_size / MIB);
        write_data(&big, args.rss_size, 2)?;
        let big_id = ContentId(
            *blake3::Hasher::new()
                .update_reader(std::fs::File::open(&big)?)?
                .finalize()
                .as_bytes(),
        );
        let holder = Nodes(vec![provider(&exe, &dir.join("big-provider"), &big, None)?]);
        std::fs::remove_file(&big)?;
        let (seconds, rss) = fetch(&exe, &dir.join("big-fetcher"), &[&holder.0[0]], &big_id)?;
        eprintln!(
            "{} MiB fetched in {seconds:.1} s; fetcher peak RSS {rss:.0} MiB",
            args.rss_size / MIB
        );
        fetch_rss_mib = Some(rss);
    }

    let result = json!({
        "size_mib": args.size / MIB,
        "import_mb_s": import_mb_s,
        "tcp_mb_s": tcp_mb_s,
        "tcp_direct_mb_s": tcp_direct_mb_s,
        "single_mb_s": single_mb_s,
        "single_vs_tcp": single_mb_s / tcp_mb_s,
        "single_vs_tcp_direct": single_mb_s / tcp_direct_mb_s,
        "swarm_limit_mb_s": limit as f64 / 1e6,
        "swarm_one_s": one_s,
        "swarm_three_s": three_s,
        "swarm_speedup": swarm_speedup,
        "fetch_rss_mib": fetch_rss_mib,
        "rss_size_mib": args.rss_size / MIB,
        "rounds": {
            "import_mb_s": imports,
            "tcp_mb_s": tcp,
            "tcp_direct_mb_s": tcp_direct,
            "single_mb_s": single,
        },
    });
    if args.json {
        super::emit_json(result);
    } else {
        eprintln!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}
