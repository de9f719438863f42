//! `mycel bench attack`: a victim `mycel node` process serving a tiny embedding model, two
//! honest nodes in this process (one connected to the victim, one that hears of it only
//! through the first), and an attacker in this process speaking our protocols with a bare
//! libp2p node. A client sends embedding requests to the victim's API throughout. Each attack
//! runs for `--seconds` after a run with no attack; per attack it reports whether any honest
//! node saw the victim failed, honest bans, the victim's CPU and memory, and the requests
//! answered against the no-attack run.
//!
//! On a machine with more than one CPU the victim and the client run on the last CPU and
//! everything else of this process (the attacker, the honest nodes) on the others, so that
//! the requests answered measure what the attack does to the victim, not the attacker's own
//! CPU taken from it (`--shared-cores` runs everything on every CPU instead).

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use libp2p::multiaddr::Protocol;
use mycel_core::membership::PeerState;
use mycel_core::statement::{Announcement, Capabilities, DownReport, SignedStatement, Statement};
use mycel_core::Keypair;
use mycel_net::{Multiaddr, NetConfig, NetHandle, PeerId, Registry};
use mycel_node::{Node, NodeConfig};
use serde_json::json;

use super::blobs::free_port;
use super::failover::Children;

/// The attacks, in the order they run.
const ATTACKS: [&str; 7] = [
    "down_reports",
    "issuer_flood",
    "sync_amplification",
    "task_streams",
    "api_connections",
    "handshake_stalls",
    "sybil_connections",
];

#[derive(Args)]
pub(crate) struct AttackBenchArgs {
    /// Seconds each attack (and the no-attack run before it) lasts.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Only this attack (see the list in the output).
    #[arg(long)]
    only: Option<String>,
    /// Print one JSON object per attack on stdout.
    #[arg(long)]
    json: bool,
    /// Requests a second the client sends (one at a time, each on its schedule: a user's
    /// steady load); 0 sends the next as soon as the last is answered (the victim's capacity).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Let the victim, the client and the attacker share every CPU (by default the victim
    /// and the client get the last CPU to themselves).
    #[arg(long)]
    shared_cores: bool,
}

/// Which CPUs the victim and the client use, and which the rest of this process uses.
#[derive(Debug, Clone)]
struct Cores {
    victim: Vec<usize>,
    attacker: Vec<usize>,
}

impl Cores {
    fn plan(shared: bool) -> Self {
        let all: Vec<usize> =
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        if shared || all.len() < 2 {
            return Self {
                victim: all.clone(),
                attacker: all,
            };
        }
        let (attacker, victim) = all.split_at(all.len() - 1);
        Self {
            victim: victim.to_vec(),
            attacker: attacker.to_vec(),
        }
    }
}

/// How the client sends its requests.
#[derive(Debug)]
struct Client {
    /// Where it (and the victim) run.
    cores: Cores,
    /// Requests a second (0: as fast as answered).
    rate: f64,
}

/// Pins thread `tid` (0: the calling thread) to `cpus`.
fn pin(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within its bounds for
    // CPU numbers below CPU_SETSIZE (checked), and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus.iter().filter(|c| **c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins every thread of this process to `cpus` (threads started later inherit it from
/// the thread that starts them).
fn pin_process(cpus: &[usize]) -> std::io::Result<()> {
    for task in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::pid_t>().ok())
        {
            // A thread that ended meanwhile is no matter.
            let _ = pin(tid, cpus);
        }
    }
    Ok(())
}

/// What one run (attack or none) saw.
struct Observed {
    requests_ok: u64,
    requests_failed: u64,
    victim_failed: bool,
    cpu_pct: f64,
    rss_mib: f64,
}

pub(crate) async fn run(args: AttackBenchArgs) -> anyhow::Result<()> {
    if let Some(only) = &args.only {
        if !ATTACKS.contains(&only.as_str()) {
            bail!("no attack {only:?}; the attacks are {}", ATTACKS.join(", "));
        }
    }
    let root = tempfile::tempdir()?;
    let model = root.path().join("tiny-bert");
    mycel_ml::fixtures::write_tiny_bert(&model).context("writing the tiny model")?;
    let (port, api_port) = (free_port()?, free_port()?);
    let data = root.path().join("victim");
    let exe = std::env::current_exe().context("finding the mycel binary")?;
    let cores = Cores::plan(args.shared_cores);
    let client = Client {
        cores: cores.clone(),
        rate: args.rate,
    };
    eprintln!(
        "victim and client on CPU {:?}, attacker and honest nodes on CPU {:?}",
        cores.victim, cores.attacker
    );
    pin_process(&cores.attacker).context("pinning this process's threads")?;
    let mut command = std::process::Command::new(&exe);
    {
        use std::os::unix::process::CommandExt;
        let victim_cpus = cores.victim.clone();
        // SAFETY: only sched_setaffinity between fork and exec (async-signal-safe).
        unsafe {
            command.pre_exec(move || pin(0, &victim_cpus));
        }
    }
    let child = command
        .arg("node")
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--listen",
            &format!("/ip4/127.0.0.1/tcp/{port}"),
            "--no-mdns",
        ])
        .args(["--api", &format!("127.0.0.1:{api_port}")])
        // The attacker shares 127.0.0.1 with everyone here: the victim limits it as the
        // host of its own an attacker elsewhere would be (the honest nodes are connected
        // before any attack, and an attacker's host refused after one waits out the hold).
        .arg("--limit-loopback")
        .arg("--model")
        .arg(&model)
        .env("MYCEL_LOG", super::node_log_filter())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(super::node_stderr())
        .spawn()
        .context("starting the victim node")?;
    let pid = child.id();
    let _children = Children(vec![Some(child)]);
    let api = format!("127.0.0.1:{api_port}");
    let token = wait_for_token(&data).await?;
    let victim_id = wait_for_peer_id(&api, &token).await?;
    let victim_addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{victim_id}").parse()?;

    // Honest nodes: `near` connected to the victim, `far` only to `near`.
    let honest_config = |name: &str, bootstrap: Vec<Multiaddr>, max: u32| {
        let mut c = NodeConfig::new(root.path().join(name));
        c.mdns = false;
        c.api = None;
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")];
        c.bootstrap = bootstrap;
        c.limits.max_connections = max;
        c.limits.target_peers = 1;
        c
    };
    let near = Node::start(honest_config("near", vec![victim_addr.clone()], 24)).await?;
    let near_addr = near.net.listen_addrs()[0]
        .clone()
        .with(Protocol::P2p(near.net.peer_id()));
    let far = Node::start(honest_config("far", vec![near_addr], 1)).await?;
    let victim_peer: PeerId = victim_id.parse()?;
    wait_alive(&[&near, &far], victim_peer).await?;

    let seconds = Duration::from_secs(args.seconds);
    let mut rows = Vec::new();
    for attack in ATTACKS {
        if args.only.as_deref().is_some_and(|o| o != attack) {
            continue;
        }
        eprintln!(
            "{attack}: {} s without, then {} s with",
            args.seconds, args.seconds
        );
        let run = || {
            let honest = [&near, &far];
            let (api, token, client) = (&api, &token, &client);
            async move { observe(pid, api, token, &honest, victim_peer, seconds, client).await }
        };
        let baseline = run().await?;
        // A fresh identity for each attack (keys are free; the victim may have banned the
        // last one). Its address is the last one's: after an attacker that kept dialling
        // once banned, the victim refuses it until the hold ends (a minute at most).
        let target = mycel_net::Limits::default().target_peers;
        let (attacker, attacker_key) = raw_peer(vec![victim_addr.clone()], target).await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        while !connected(&attacker, victim_peer).await {
            if Instant::now() > deadline {
                bail!("the attacker could not connect to the victim within 90 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let running = tokio::spawn(attack_loop(
            attack,
            attacker.clone(),
            attacker_key,
            Victim {
                peer: victim_peer,
                addr: victim_addr.clone(),
                tcp: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                api: api.clone(),
            },
            stop.clone(),
            sent.clone(),
        ));
        let under = run().await?;
        stop.store(true, Ordering::SeqCst);
        let _ = running.await;
        attacker.shutdown().await;
        let honest_bans = honest_bans(&near, &far, victim_peer, &api, &token).await?;
        let ratio = under.requests_ok as f64 / baseline.requests_ok.max(1) as f64;
        let row = json!({
            "attack": attack,
            "seconds": args.seconds,
            "attack_messages": sent.load(Ordering::SeqCst),
            "victims_failed": u64::from(under.victim_failed),
            "honest_bans": honest_bans,
            "victim_cpu_pct": round1(under.cpu_pct),
            "victim_cpu_pct_baseline": round1(baseline.cpu_pct),
            "victim_rss_mib": round1(under.rss_mib),
            "requests_ok": under.requests_ok,
            "requests_failed": under.requests_failed,
            "requests_ok_baseline": baseline.requests_ok,
            "requests_ok_ratio": (ratio * 1000.0).round() / 1000.0,
            "client_rate": args.rate,
            "victim_cpus": cores.victim,
            "attacker_cpus": cores.attacker,
        });
        eprintln!(
            "  {} attack messages; victims_failed {} honest_bans {} cpu {:.0}% (baseline {:.0}%) rss {:.0} MiB requests_ok {} of {} ({:.1}%)",
            sent.load(Ordering::SeqCst),
            u64::from(under.victim_failed),
            honest_bans,
            under.cpu_pct,
            baseline.cpu_pct,
            under.rss_mib,
            under.requests_ok,
            baseline.requests_ok,
            ratio * 100.0
        );
        rows.push(row);
    }
    if args.json {
        for row in rows {
            super::emit_json(row);
        }
    }
    near.shutdown().await;
    far.shutdown().await;
    Ok(())
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A bare libp2p node on 127.0.0.1 wanting `target` peers, and its key.
async fn raw_peer(
    bootstrap: Vec<Multiaddr>,
    target: usize,
) -> anyhow::Result<(NetHandle, Keypair)> {
    let key = Keypair::generate_ed25519();
    let mut config = NetConfig::new(key.clone());
    config.limits.target_peers = target;
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.bootstrap = bootstrap;
    config.mdns = false;
    let (net, _events, _task) =
        mycel_net::spawn(config, Box::new(|floor| floor), &mut Registry::default()).await?;
    Ok((net, key))
}

async fn connected(net: &NetHandle, peer: PeerId) -> bool {
    net.peer(peer)
        .await
        .ok()
        .flatten()
        .is_some_and(|p| p.connected)
}

async fn wait_for_token(data: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(token) = std::fs::read_to_string(data.join("api.token")) {
            if token.trim().len() >= 16 {
                return Ok(token.trim().to_owned());
            }
        }
        if Instant::now() > deadline {
            bail!("the victim node wrote no api.token within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_peer_id(api: &str, token: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = get_json(api, token, "/api/status").await;
        if let Some(id) = status
            .as_ref()
            .and_then(|s| s["network"]["peer_id"].as_str())
        {
            return Ok(id.to_owned());
        }
        if Instant::now() > deadline {
            bail!("the victim node's API did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_json(api: &str, token: &str, path: &str) -> Option<serde_json::Value> {
    let (url, auth) = (format!("http://{api}{path}"), format!("Bearer {token}"));
    tokio::task::spawn_blocking(move || {
        let mut response = ureq::get(&url).header("Authorization", &auth).call().ok()?;
        serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
    })
    .await
    .ok()
    .flatten()
}

async fn wait_alive(nodes: &[&Node], victim: PeerId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in nodes {
        loop {
            let alive = node
                .net
                .peer(victim)
                .await?
                .is_some_and(|p| p.state == PeerState::Alive);
            if alive {
                break;
            }
            if Instant::now() > deadline {
                bail!("an honest node did not see the victim alive within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Honest pairs (near, far and the victim) where one side holds the other banned: the
/// honest nodes' views read in this process, the victim's from its API.
async fn honest_bans(
    near: &Node,
    far: &Node,
    victim: PeerId,
    api: &str,
    token: &str,
) -> anyhow::Result<u64> {
    let mut bans = 0;
    let pairs = [
        (near, victim),
        (near, far.net.peer_id()),
        (far, near.net.peer_id()),
        (far, victim),
    ];
    for (node, peer) in pairs {
        if node
            .net
            .peer(peer)
            .await
            .ok()
            .flatten()
            .is_some_and(|p| p.banned)
        {
            bans += 1;
        }
    }
    let mut listed = None;
    for _ in 0..5 {
        listed = get_json(api, token, "/api/peers").await;
        if listed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Some(serde_json::Value::Array(peers)) = listed else {
        bail!("the victim's API did not list its peers (GET /api/peers, 5 tries)");
    };
    let honest = [
        near.net.peer_id().to_string(),
        far.net.peer_id().to_string(),
    ];
    bans += peers
        .iter()
        .filter(|p| {
            p["peer_id"]
                .as_str()
                .is_some_and(|id| honest.iter().any(|h| h == id))
                && p["banned"].as_bool() == Some(true)
        })
        .count() as u64;
    Ok(bans)
}

/// Sends embedding requests to the victim for `duration`, one at a time, while watching
/// whether the honest nodes hold the victim alive.
async fn observe(
    pid: u32,
    api: &str,
    token: &str,
    honest: &[&Node],
    victim: PeerId,
    duration: Duration,
    client: &Client,
) -> anyhow::Result<Observed> {
    let (cores, rate) = (&client.cores, client.rate);
    let cpu_before = super::cpu_seconds_of(&pid.to_string());
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (url, auth) = (
        format!("http://{api}/v1/embeddings"),
        format!("Bearer {token}"),
    );
    let client = {
        let stop = stop.clone();
        let cores = cores.clone();
        tokio::task::spawn_blocking(move || {
            // The client is the victim's user: it runs beside the victim, not the attacker.
            let _ = pin(0, &cores.victim);
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            let (mut ok, mut failed) = (0u64, 0u64);
            let period = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
            let mut next = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                if let Some(period) = period {
                    // On schedule; a late answer delays only the requests behind it.
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    next += period;
                }
                let body = json!({ "model": "tiny-bert", "input": ["the cat sat on the mat"] });
                let answered = agent
                    .post(&url)
                    .header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .send(body.to_string())
                    .ok()
                    .and_then(|mut r| r.body_mut().read_to_string().ok())
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|v| v["data"][0]["embedding"].is_array());
                if answered {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            // This blocking thread may run other work next: back with the rest.
            let _ = pin(0, &cores.attacker);
            (ok, failed)
        })
    };
    let mut victim_failed = false;
    while started.elapsed() < duration {
        for node in honest {
            let failed = node
                .net
                .peer(victim)
                .await?
                .is_none_or(|p| p.state == PeerState::Failed);
            victim_failed |= failed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (requests_ok, requests_failed) = client.await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu_pct = (super::cpu_seconds_of(&pid.to_string()) - cpu_before) / wall * 100.0;
    let rss_mib = super::rss_kib_of(&pid.to_string()) as f64 / 1024.0;
    Ok(Observed {
        requests_ok,
        requests_failed,
        victim_failed,
        cpu_pct,
        rss_mib,
    })
}

/// Where the victim is.
struct Victim {
    peer: PeerId,
    /// Its libp2p address, with its peer id.
    addr: Multiaddr,
    /// Its libp2p TCP port's socket address.
    tcp: std::net::SocketAddr,
    /// Its API's socket address.
    api: String,
}

/// Runs `attack` against `victim` until `stop`, counting what it sent in `sent`.
async fn attack_loop(
    attack: &'static str,
    net: NetHandle,
    key: Keypair,
    target: Victim,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    let (victim, api) = (target.peer, target.api.as_str());
    let count = || sent.fetch_add(1, Ordering::SeqCst);
    // Whether the victim has not closed `stream` (a read of nothing, or an error other than
    // "nothing yet", says it did; what the victim sent, say its multistream-select answer,
    // is read and dropped).
    let open = |s: &tokio::net::TcpStream| {
        let mut buf = [0u8; 256];
        match s.try_read(&mut buf) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    };
    // A connection, or nothing within a second (a victim that stopped accepting must not hold
    // the attack past its end).
    let connect = |addr: std::net::SocketAddr| async move {
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
            .ok()
            .and_then(Result::ok)
    };
    match attack {
        // Reports about the victim: from keys nobody knows, naming announcements it never
        // made (u64::MAX), and from the attacker itself about its current one (made up
        // without the victim's word that they are connected, and the genuine one its node
        // makes with that word).
        "down_reports" => {
            while !stop.load(Ordering::SeqCst) {
                let seq = net.peer(victim).await.ok().flatten().map_or(0, |p| p.seq);
                for (signer, subject_seq) in [
                    (Keypair::generate_ed25519(), seq),
                    (key.clone(), u64::MAX),
                    (key.clone(), seq),
                ] {
                    let now = mycel_net::now_ms();
                    let report = SignedStatement::sign(
                        &signer,
                        &Statement::Down(DownReport {
                            subject: victim,
                            subject_seq,
                            issued_at: now,
                            expires_at: now + 60_000,
                            contact: None,
                        }),
                    );
                    let _ = net.publish_raw(report.to_bytes()).await;
                    count();
                }
                if let Ok(Some(genuine)) = net.down_report(victim).await {
                    let _ = net.publish_raw(genuine.to_bytes()).await;
                    count();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Genuine announcements of one key, each newer than the last, as fast as they go.
        "issuer_flood" => {
            let flooder = Keypair::generate_ed25519();
            let mut seq = 1;
            while !stop.load(Ordering::SeqCst) {
                let now = mycel_net::now_ms();
                let statement = SignedStatement::sign(
                    &flooder,
                    &Statement::Announce(Announcement {
                        seq,
                        issued_at: now,
                        expires_at: now + 60_000,
                        capabilities: Capabilities::default(),
                        addrs: Vec::new(),
                        reachability: Default::default(),
                        relay: false,
                        operator: None,
                        full: false,
                    }),
                );
                seq += 1;
                let _ = net.publish_raw(statement.to_bytes()).await;
                count();
                if seq % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        // Sync requests with an empty digest: "send me everything".
        "sync_amplification" => {
            while !stop.load(Ordering::SeqCst) {
                let _ = net.sync_raw(victim).await;
                count();
            }
        }
        // Task streams opened and left silent, as many as the victim keeps.
        "task_streams" => {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if held.len() < 512 {
                    if let Ok(stream) = net
                        .open_stream(victim, mycel_net::task::TASK_PROTOCOL)
                        .await
                    {
                        held.push(stream);
                        count();
                    }
                } else {
                    held.clear();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // TCP connections to the victim's API that send nothing, kept topped up to 300.
        "api_connections" => {
            let mut held = Vec::new();
            let api: std::net::SocketAddr = api.parse().expect("the API's address");
            while !stop.load(Ordering::SeqCst) {
                // Those the victim closed are opened again.
                held.retain(open);
                while held.len() < 300 && !stop.load(Ordering::SeqCst) {
                    match connect(api).await {
                        Some(stream) => {
                            held.push(stream);
                            count();
                        }
                        None => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // TCP connections to the victim's libp2p port, kept topped up to 200: half silent,
        // half stalled after proposing /noise (multistream-select's header and the protocol).
        "handshake_stalls" => {
            use tokio::io::AsyncWriteExt;
            let mut held = Vec::new();
            let mut opened = 0u64;
            while !stop.load(Ordering::SeqCst) {
                held.retain(open);
                while held.len() < 200 && !stop.load(Ordering::SeqCst) {
                    let Some(mut stream) = connect(target.tcp).await else {
                        break;
                    };
                    opened += 1;
                    if opened.is_multiple_of(2) {
                        let _ = stream
                            .write_all(b"\x13/multistream/1.0.0\n\x07/noise\n")
                            .await;
                    }
                    held.push(stream);
                    count();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Fresh identities from the attacker's host, up to 32 at once, each dialling the
        // victim; one not connected within 2 s is dropped for another fresh one.
        "sybil_connections" => {
            let mut sybils: Vec<(NetHandle, Instant)> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let mut kept = Vec::new();
                for (sybil, born) in sybils {
                    if born.elapsed() < Duration::from_secs(2) || connected(&sybil, victim).await {
                        kept.push((sybil, born));
                    } else {
                        sybil.shutdown().await;
                    }
                }
                sybils = kept;
                while sybils.len() < 32 && !stop.load(Ordering::SeqCst) {
                    match raw_peer(vec![target.addr.clone()], 1).await {
                        Ok((sybil, _)) => {
                            sybils.push((sybil, Instant::now()));
                            count();
                        }
                        Err(_) => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for (sybil, _) in sybils {
                sybil.shutdown().await;
            }
        }
        _ => {}
    }
}
