//! `mycel`: run a node, a local network, query a node, benchmark the network.

mod bench;
mod blobs;
mod client;
mod netlab;
mod train;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mycel_net::Multiaddr;
use mycel_node::{Node, NodeConfig};

#[derive(Parser)]
#[command(name = "mycel", version, about = "A peer-to-peer network for AI work")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node until Ctrl-C.
    Node(Box<NodeArgs>),
    /// Start a local network of N nodes in this process (on 127.0.0.1) and serve until Ctrl-C.
    Up(up::UpArgs),
    /// Show a node's status.
    Status(client::ClientArgs),
    /// List the peers a node knows.
    Peers(client::ClientArgs),
    /// List the models a node and its peers serve.
    Models(client::ClientArgs),
    /// Embed texts with a node's embedding model.
    Embed(client::EmbedArgs),
    /// Chat with a node's generation model; the answer streams to the terminal.
    Chat(client::ChatArgs),
    /// Check a result's certificate offline (a file holding the certificate, or the whole
    /// response that carried it; - for standard input).
    Verify(client::VerifyArgs),
    /// Store a file or directory on a node; prints its content id.
    Put(blobs::PutArgs),
    /// Fetch a blob (a file, or a directory's manifest and files) from the network to a path.
    Get(blobs::GetArgs),
    /// Pin a blob on a node (never evicted).
    Pin(blobs::CidArgs),
    /// Unpin a blob (evicted when the node needs room).
    Unpin(blobs::CidArgs),
    /// List the blobs a node holds.
    Blobs(client::ClientArgs),
    /// Run a federated training job (a TOML spec) from a node, showing each round.
    Train(train::TrainArgs),
    /// List a node's training jobs.
    Jobs(client::ClientArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Args)]
struct NodeArgs {
    /// Directory for identity, API token and state [default: the platform's data directory]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on (repeatable) [default: /ip4/0.0.0.0/tcp/4001 and
    /// /ip4/0.0.0.0/udp/4001/quic-v1, with --port]
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    listen: Vec<Multiaddr>,
    /// Port for the default listen addresses.
    #[arg(long, default_value_t = 4001)]
    port: u16,
    /// Address of a node to join through (repeatable).
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    bootstrap: Vec<Multiaddr>,
    /// Do not discover peers on the LAN by mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Address of the HTTP API (keep it on loopback unless you mean otherwise).
    #[arg(long, default_value = "127.0.0.1:7878")]
    api: SocketAddr,
    /// Confirms an --api address beyond loopback: anyone who reaches it with the token
    /// controls the node (serve it over HTTPS with --api-tls-cert and --api-tls-key, or put
    /// a TLS proxy in front).
    #[arg(long)]
    api_public: bool,
    /// The API speaks HTTPS with this certificate chain (PEM, leaf first); needs
    /// --api-tls-key.
    #[arg(long, value_name = "PEM", requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --api-tls-cert.
    #[arg(long, value_name = "PEM", requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// Serve /metrics without the bearer token.
    #[arg(long)]
    open_metrics: bool,
    /// A model to serve (repeatable): a .gguf file (chat) or a directory with config.json,
    /// model.safetensors and tokenizer.json (embeddings); `hf:ORG/REPO[/FILE]` from the
    /// Hugging Face hub; or a content id (blake3:...) fetched from the network's peers.
    #[arg(long = "model", value_name = "PATH")]
    models: Vec<PathBuf>,
    /// A generation model of an OpenAI-compatible server beside this node (llama-server,
    /// vLLM, Ollama, another Mycel node), offered to the network as NAME: NAME=URL of its API
    /// (http://HOST:PORT/v1), or NAME=URL#MODEL when the server calls it MODEL. Its key, if it
    /// wants one, is read from MYCEL_UPSTREAM_KEY_<NAME> and never leaves this node.
    #[arg(long = "upstream", value_name = "NAME=URL", value_parser = parse_upstream)]
    upstreams: Vec<mycel_node::upstream::Upstream>,
    /// How generation models run: q4 (our SIMD kernels on the file's Q4_1/Q8_0 blocks: the
    /// fastest decoding, a quarter of the memory; files with other blocks run exact), exact
    /// (f32 weights: the fastest prompt processing) or quantized (candle's kernels). q4 and
    /// exact agree with the reference implementations token for token.
    #[arg(long, default_value = "q4", value_parser = parse_engine)]
    engine: mycel_ml::Engine,
    /// Requests that may wait or run at once; more are refused at once.
    #[arg(long, default_value_t = mycel_node::models::DEFAULT_MAX_QUEUE)]
    max_queue: usize,
    /// Generations a model on the q4 engine decodes together, sharing each forward pass;
    /// more wait for a slot.
    #[arg(long, default_value_t = mycel_ml::BatchLimits::default().slots)]
    slots: usize,
    /// MiB of KV cache a generation model's requests may hold together; a request whose
    /// prompt and max_tokens need more than all of it is refused.
    #[arg(long, default_value_t = mycel_ml::BatchLimits::default().kv_bytes >> 20)]
    kv_mib: usize,
    /// MiB of KV cache a generation model keeps from prompts and answers it read, so that a
    /// request starting with the same tokens (a shared system prompt, a conversation's
    /// earlier turns) reads only the rest; 0 keeps none.
    #[arg(long, default_value_t = mycel_ml::BatchLimits::default().prefix_bytes >> 20)]
    prefix_cache_mib: usize,
    /// Most established connections.
    #[arg(long, default_value_t = 24)]
    max_connections: u32,
    /// Connections the node keeps: it dials while below and sheds above twice this.
    #[arg(long, default_value_t = 8)]
    target_peers: usize,
    /// Serve as a relay for nodes behind NATs: auto (once this node is found reachable from
    /// outside), on or off.
    #[arg(long, default_value = "auto", value_parser = parse_relay_server)]
    relay_server: mycel_net::RelayServer,
    /// Reservations this node's relay holds at once (each lets one node behind a NAT be
    /// reached through it); more are refused.
    #[arg(long, default_value_t = mycel_net::NatConfig::default().max_reservations)]
    relay_max_reservations: usize,
    /// Relayed connections this node's relay carries at once; more are refused.
    #[arg(long, default_value_t = mycel_net::NatConfig::default().max_circuits)]
    relay_max_circuits: usize,
    /// Seconds one relayed connection may last; the relay then closes it (the two nodes
    /// reconnect through it, or directly once a hole is punched).
    #[arg(long, default_value_t = mycel_net::NatConfig::default().max_circuit_duration.as_secs())]
    relay_circuit_secs: u64,
    /// Bytes one relayed connection may carry, both directions together (e.g. 8MiB); the
    /// relay then closes it.
    #[arg(long, default_value_t = mycel_net::NatConfig::default().max_circuit_bytes, value_parser = parse_bytes)]
    relay_circuit_bytes: u64,
    /// An address of this node reachable from outside (repeatable), e.g. a port forwarded on
    /// the router: announced, and the node counts as public.
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    external_addr: Vec<Multiaddr>,
    /// Let blobs, model files and training updates travel over relayed connections when no
    /// direct one can be made (off: they wait for a hole punch, then fail with a clear error).
    #[arg(long)]
    allow_relayed_data: bool,
    /// Seconds bulk data waits for a direct connection (a hole punch) to a peer reached only
    /// through a relay before it fails.
    #[arg(long, default_value_t = mycel_net::NatConfig::default().direct_wait.as_secs())]
    direct_wait: u64,
    /// Do not ask a UPnP gateway to forward our port.
    #[arg(long)]
    no_upnp: bool,
    /// Seconds after which a silent peer's announcement expires (failure detection bound for
    /// peers not directly connected).
    #[arg(long, default_value_t = 90)]
    announce_ttl: u64,
    /// Seconds between pings of each connected peer.
    #[arg(long, default_value_t = 10)]
    ping_interval: u64,
    /// Missed pings before a connected peer is declared failed.
    #[arg(long, default_value_t = 2)]
    max_missed_pings: u32,
    /// Root of the /sys tree power state is read from.
    #[arg(long, default_value = "/sys", hide = true)]
    sys_root: PathBuf,
    /// Most bytes of blobs kept (e.g. 500MiB, 64GiB); unpinned blobs are evicted least
    /// recently used first to make room.
    #[arg(long, default_value = "64GiB", value_parser = parse_bytes)]
    blob_quota: u64,
    /// Most bytes per second uploaded to peers (e.g. 20MiB); unlimited when not given.
    #[arg(long, value_parser = parse_bytes)]
    upload_limit: Option<u64>,
    /// Serve models on demand: a request for a model id this node lacks fetches the model
    /// from the peers that hold it, then serves it.
    #[arg(long)]
    serve_on_demand: bool,
    /// With --serve-on-demand, the only model ids served on demand (repeatable; default:
    /// any id a request names).
    #[arg(long = "on-demand-allow", value_name = "ID")]
    on_demand_allow: Vec<mycel_core::id::ContentId>,
    /// With --serve-on-demand, the most bytes of models served on demand (since the start; their
    /// files, about what they take in memory); a model that would pass it is not served.
    #[arg(long, value_parser = parse_bytes, default_value = "8GiB")]
    on_demand_quota: u64,
    /// Lets a model name mean a model id this node trusts (repeatable): NAME=ID. A name
    /// that nothing trusted binds is refused, with the ids peers announce under it listed
    /// (keys are free: believing announcers would let anyone capture a name).
    #[arg(long = "bind-model", value_name = "NAME=ID")]
    bind_model: Vec<String>,
    /// Trusts the model names announced by nodes this operator key vouches for (repeatable;
    /// the peer id of the key given to those nodes' --operator-key): a name they announce
    /// means the id they announce it for, whatever others announce. The nodes sharing this
    /// node's own --operator-key are trusted so without it.
    #[arg(long = "trust-operator", value_name = "KEY")]
    trust_operator: Vec<mycel_core::PeerId>,
    /// Lets a model name that nothing trusted binds mean the one id peers announce under it
    /// (refused, with the ids listed, when they announce several). Only for networks whose
    /// peers you trust: anyone can announce any name.
    #[arg(long)]
    trust_announced_names: bool,
    /// How results of this node's inference requests are checked when a request does not
    /// say: none, replicate[:R] (a quorum of distinct peers must agree; a certificate comes
    /// with the answer) or spot_check:P (a fraction P re-run elsewhere).
    #[arg(long, value_name = "MODE", default_value = "none")]
    verify: mycel_core::verify::Mode,
    /// The key of the operator running this node, shared by all the nodes one operator runs
    /// (created there on first use, readable by its owner only). The node announces the
    /// operator's signature for it, checked results never have two workers of one operator,
    /// and the names the operator's other nodes announce are trusted here.
    #[arg(long, value_name = "FILE")]
    operator_key: Option<PathBuf>,
    /// Misbehave as a worker, for tests and benchmarks: wrong[:GROUP], random, slow:MS,
    /// drop, crash:N, bad_signature or replay.
    #[cfg(feature = "fault-injection")]
    #[arg(long, value_name = "FAULT")]
    fault: Option<mycel_node::fault::Fault>,
    /// A dataset for federated training (repeatable), announced by tag and size only:
    /// TAG=SOURCE, SOURCE a .csv or .npy file (class in the last column) or
    /// sklearn-digits[:train|test][:K/N][:dirichlet=A] (the shipped digits data).
    #[arg(long = "dataset", value_name = "TAG=SOURCE", value_parser = parse_dataset)]
    datasets: Vec<(String, String)>,
    /// This node is on a metered network (training jobs may exclude it).
    #[arg(long)]
    metered: bool,
    /// Where this node is (a data centre, a building, a region: any name of at most 128
    /// bytes): clustered training jobs put peers of one site in the same clusters.
    #[arg(long, value_name = "NAME")]
    site: Option<String>,
    /// Inbound connections one remote IP may have in their handshake at once (loopback is
    /// not limited): a flood of silent or stalled connections from one address cannot take
    /// every pending slot.
    #[arg(long, default_value_t = 4)]
    max_pending_per_ip: u32,
    /// Inbound connections one remote IP (an IPv6 /64) may hold at once, in their handshake
    /// or established (loopback and relayed ones are not limited): keys made on one machine
    /// cannot take every slot.
    #[arg(long, default_value_t = 8)]
    max_inbound_per_ip: u32,
    /// Inbound connections one subnet (an IPv4 /24, an IPv6 /48) may hold at once.
    #[arg(long, default_value_t = 16)]
    max_inbound_per_subnet: u32,
    /// A coordinator whose training jobs this node trains for (repeatable), by peer id; `any`
    /// trains for every coordinator. Without it a node trains only for its own jobs: an
    /// update can reveal the data it was trained on.
    #[arg(long = "train-for", value_name = "PEER_ID|any")]
    train_for: Vec<String>,
    /// Poison every training update (sign-flip or noise): for tests of robust aggregation.
    #[arg(long, hide = true, value_parser = parse_attack)]
    train_attack: Option<mycel_core::fl::Attack>,
    /// Keep announcing relay service with every reservation taken (refusing all who believe
    /// it): for tests of how clients make such a relay pay.
    #[arg(long, hide = true)]
    lie_relay_room: bool,
    /// Hold this machine's own connections to the per-host limits like any host's: for
    /// benchmarks of them, where every process shares 127.0.0.1.
    #[arg(long, hide = true)]
    limit_loopback: bool,
}

fn parse_dataset(s: &str) -> Result<(String, String), String> {
    let (tag, source) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected TAG=SOURCE, e.g. digits=sklearn-digits:train:0/4")
    })?;
    if tag.is_empty() || source.is_empty() {
        return Err(format!("{s:?}: expected TAG=SOURCE"));
    }
    Ok((tag.to_owned(), source.to_owned()))
}

pub(crate) fn parse_attack(s: &str) -> Result<mycel_core::fl::Attack, String> {
    match s {
        "sign-flip" | "sign_flip" => Ok(mycel_core::fl::Attack::SignFlip),
        "noise" => Ok(mycel_core::fl::Attack::Noise),
        _ => Err(format!("{s:?}: expected sign-flip or noise")),
    }
}

/// A byte count: a number with an optional unit (B, KB, MB, GB, TB or KiB, MiB, GiB, TiB).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 500MiB or 2GB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "mb" | "m" => 1000u64.pow(2),
        "gb" | "g" => 1000u64.pow(3),
        "tb" | "t" => 1000u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ))
        }
    };
    Ok((number * scale as f64) as u64)
}

pub(crate) fn parse_engine(s: &str) -> Result<mycel_ml::Engine, String> {
    match s {
        "exact" => Ok(mycel_ml::Engine::Exact),
        "quantized" => Ok(mycel_ml::Engine::Quantized),
        "q4" => Ok(mycel_ml::Engine::Q4),
        other => Err(format!(
            "unknown engine {other:?}; use exact, quantized or q4"
        )),
    }
}

pub(crate) fn parse_relay_server(s: &str) -> Result<mycel_net::RelayServer, String> {
    match s {
        "auto" => Ok(mycel_net::RelayServer::Auto),
        "on" => Ok(mycel_net::RelayServer::On),
        "off" => Ok(mycel_net::RelayServer::Off),
        other => Err(format!("unknown relay mode {other:?}; use auto, on or off")),
    }
}

pub(crate) fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.parse::<Multiaddr>().map_err(|e| {
        format!("{e}; expected a multiaddr such as /ip4/192.0.2.7/tcp/4001 or /ip4/192.0.2.7/udp/4001/quic-v1 (optionally ending in /p2p/<peer id>)")
    })
}

pub(crate) fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("mycel")
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MYCEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn parse_upstream(spec: &str) -> Result<mycel_node::upstream::Upstream, String> {
    mycel_node::upstream::Upstream::parse(spec)
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let mut config = NodeConfig::new(data_dir.clone());
    if !args.listen.is_empty() {
        config.listen = args.listen;
    } else {
        config.listen = mycel_net::NetConfig::default_listen(args.port);
    }
    config.bootstrap = args.bootstrap;
    config.mdns = !args.no_mdns;
    config.api = Some(args.api);
    config.api_public = args.api_public;
    config.api_tls = args
        .api_tls_cert
        .clone()
        .zip(args.api_tls_key.clone())
        .map(|(cert, key)| mycel_node::ApiTls { cert, key });
    let tls = config.api_tls.is_some();
    config.open_metrics = args.open_metrics;
    config.sys_root = args.sys_root;
    let (fetched, paths): (Vec<PathBuf>, Vec<PathBuf>) = args.models.into_iter().partition(|m| {
        m.to_str()
            .is_some_and(|m| m.parse::<mycel_core::id::ContentId>().is_ok())
    });
    config.models = paths;
    config.upstreams = args.upstreams;
    config.engine = args.engine;
    config.max_queue = args.max_queue;
    config.batch = mycel_ml::BatchLimits {
        slots: args.slots.max(1),
        kv_bytes: args.kv_mib.saturating_mul(1 << 20),
        prefix_bytes: args.prefix_cache_mib.saturating_mul(1 << 20),
        ..Default::default()
    };
    config.blobs.quota = args.blob_quota;
    config.blobs.upload_limit = args.upload_limit;
    config.serve_on_demand = args.serve_on_demand;
    config.on_demand_allow = args.on_demand_allow;
    config.on_demand_quota = args.on_demand_quota;
    for spec in &args.bind_model {
        config
            .router
            .bindings
            .bind_spec(spec)
            .map_err(|e| anyhow::anyhow!("--bind-model {e}"))?;
    }
    for operator in &args.trust_operator {
        config.router.bindings.trust_operator(*operator);
    }
    config
        .router
        .bindings
        .trust_announced_names(args.trust_announced_names);
    config.router.verify = args.verify;
    config.operator_key = args.operator_key;
    #[cfg(feature = "fault-injection")]
    {
        config.router.fault = args.fault;
    }
    config.datasets = args.datasets;
    config.metered = args.metered;
    config.site = args.site;
    config.train_for = if args.train_for.iter().any(|c| c == "any") {
        mycel_core::fl::TrainFor::Anyone
    } else {
        mycel_core::fl::TrainFor::Coordinators(
            args.train_for
                .iter()
                .map(|c| {
                    c.parse::<mycel_net::PeerId>().map_err(|e| {
                        anyhow::anyhow!("--train-for {c:?}: not a peer id or `any` ({e})")
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        )
    };
    config.train_attack = args.train_attack;
    config.limits.max_connections = args.max_connections;
    config.limits.max_pending_per_ip = args.max_pending_per_ip;
    config.limits.max_inbound_per_ip = args.max_inbound_per_ip;
    config.limits.max_inbound_per_subnet = args.max_inbound_per_subnet;
    anyhow::ensure!(
        args.target_peers >= 1 && args.target_peers <= args.max_connections as usize,
        "--target-peers must be between 1 and --max-connections ({})",
        args.max_connections
    );
    config.limits.target_peers = args.target_peers;
    config.limits.max_missed_pings = args.max_missed_pings;
    config.nat.relay_server = args.relay_server;
    anyhow::ensure!(
        args.relay_max_reservations >= 1 && args.relay_max_circuits >= 1,
        "--relay-max-reservations and --relay-max-circuits must be at least 1 (use \
         --relay-server off to serve no relay)"
    );
    anyhow::ensure!(
        (1..=u64::from(u32::MAX)).contains(&args.relay_circuit_secs),
        "--relay-circuit-secs must be between 1 and {}",
        u32::MAX
    );
    anyhow::ensure!(
        args.relay_circuit_bytes >= 1,
        "--relay-circuit-bytes must be at least 1 byte"
    );
    config.nat.max_reservations = args.relay_max_reservations;
    config.nat.max_circuits = args.relay_max_circuits;
    config.nat.max_circuit_duration = std::time::Duration::from_secs(args.relay_circuit_secs);
    config.nat.max_circuit_bytes = args.relay_circuit_bytes;
    config.nat.external_addrs = args.external_addr;
    config.nat.allow_relayed_data = args.allow_relayed_data;
    config.nat.lie_relay_room = args.lie_relay_room;
    config.limits.limit_loopback = args.limit_loopback;
    config.nat.direct_wait = std::time::Duration::from_secs(args.direct_wait.max(1));
    config.nat.upnp = !args.no_upnp;
    config.timing.announce_ttl = std::time::Duration::from_secs(args.announce_ttl.max(2));
    config.timing.announce_interval = config.timing.announce_ttl / 3;
    config.timing.ping_interval = std::time::Duration::from_secs(args.ping_interval.max(1));
    config.timing.ping_timeout = config
        .timing
        .ping_interval
        .min(std::time::Duration::from_secs(5));

    let node = Node::start(config)
        .await
        .with_context(|| format!("starting the node in {}", data_dir.display()))?;
    let peer_id = node.net.peer_id();
    println!("peer id   {peer_id}");
    for addr in node.net.listen_addrs() {
        println!("listening {addr}/p2p/{peer_id}");
    }
    if let Some(api) = node.api_addr {
        let scheme = if tls { "https" } else { "http" };
        println!(
            "api       {scheme}://{api}  (token in {})",
            data_dir.join("api.token").display()
        );
    }
    for cid in fetched {
        let id: mycel_core::id::ContentId = cid.to_string_lossy().parse()?;
        let path = fetch_with_bar(&node, id).await?;
        node.serve_model(path, args.engine)
            .await
            .with_context(|| format!("serving the model {id}"))?;
        println!("model     {id} fetched and served");
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    node.shutdown().await;
    Ok(())
}

/// Fetches the model blob `id` through `node`, with a progress bar.
async fn fetch_with_bar(node: &Node, id: mycel_core::id::ContentId) -> anyhow::Result<PathBuf> {
    use std::sync::atomic::Ordering;
    let progress = mycel_node::blobs::Progress::default();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("fetching {}", id.short()));
    let fetch = node.fetch_model(id, &progress);
    tokio::pin!(fetch);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let path = loop {
        tokio::select! {
            done = &mut fetch => break done,
            _ = tick.tick() => {
                bar.set_length(progress.total.load(Ordering::Relaxed));
                bar.set_position(progress.done.load(Ordering::Relaxed));
            }
        }
    };
    bar.finish_and_clear();
    path
}

/// glibc gives freed memory back to the kernel as soon as a heap's free top passes a
/// threshold (adaptive, from 128 KiB). A busy TLS connection allocates and frees a 16 KiB
/// buffer per record, so its heap grows and shrinks thousands of times a second and every
/// regrown page faults again (on VMs whose host backs guest pages on first touch, at about
/// 0.5 GB/s): measured, tens of thousands of faults per 512 MiB fetched. Fixed thresholds
/// keep up to 32 MiB free per heap instead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    mycel_ml::fix_thread_count();
    let cli = Cli::parse();
    // Benchmarks print figures; node logs (hundreds of nodes) would drown them.
    // Kademlia warns at start-up that it cannot bootstrap with an empty table: Mycel seeds the
    // table itself after membership has formed, so that is expected.
    init_tracing(if matches!(cli.command, Command::Bench(_)) {
        "warn,libp2p_kad=error"
    } else {
        "warn,libp2p_kad=error,mycel=info"
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Node(args) => run_node(*args).await,
            Command::Up(args) => up::run(args).await,
            Command::Status(args) => client::status(args),
            Command::Peers(args) => client::peers(args),
            Command::Models(args) => client::models(args),
            Command::Embed(args) => client::embed(args),
            Command::Chat(args) => client::chat(args),
            Command::Verify(args) => client::verify(args),
            Command::Put(args) => blobs::put(args),
            Command::Get(args) => blobs::get(args),
            Command::Pin(args) => blobs::pin(args),
            Command::Unpin(args) => blobs::unpin(args),
            Command::Blobs(args) => blobs::list(args),
            Command::Train(args) => train::train(args),
            Command::Jobs(args) => train::jobs(args),
            Command::Bench(command) => bench::run(command).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
