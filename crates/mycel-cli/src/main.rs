//! `mycel`: run a node, a local network, query a node, benchmark the network.

mod bench;
mod client;
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
    Node(NodeArgs),
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
    /// Serve /metrics without the bearer token.
    #[arg(long)]
    open_metrics: bool,
    /// A model to serve (repeatable): a .gguf file (chat) or a directory with config.json,
    /// model.safetensors and tokenizer.json (embeddings).
    #[arg(long = "model", value_name = "PATH")]
    models: Vec<PathBuf>,
    /// How generation models run: q4 (our SIMD kernels on the file's Q4_1/Q8_0 blocks: the
    /// fastest decoding, a quarter of the memory; files with other blocks run exact), exact
    /// (f32 weights: the fastest prompt processing) or quantized (candle's kernels). q4 and
    /// exact agree with the reference implementations token for token.
    #[arg(long, default_value = "q4", value_parser = parse_engine)]
    engine: mycel_ml::Engine,
    /// Requests that may wait or run at once; more are refused at once.
    #[arg(long, default_value_t = mycel_node::models::DEFAULT_MAX_QUEUE)]
    max_queue: usize,
    /// Most established connections.
    #[arg(long, default_value_t = 24)]
    max_connections: u32,
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
    config.open_metrics = args.open_metrics;
    config.sys_root = args.sys_root;
    config.models = args.models;
    config.engine = args.engine;
    config.max_queue = args.max_queue;
    config.limits.max_connections = args.max_connections;
    config.limits.max_missed_pings = args.max_missed_pings;
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
        println!(
            "api       http://{api}  (token in {})",
            data_dir.join("api.token").display()
        );
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    node.shutdown().await;
    Ok(())
}

fn main() -> std::process::ExitCode {
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
            Command::Node(args) => run_node(args).await,
            Command::Up(args) => up::run(args).await,
            Command::Status(args) => client::status(args),
            Command::Peers(args) => client::peers(args),
            Command::Models(args) => client::models(args),
            Command::Embed(args) => client::embed(args),
            Command::Chat(args) => client::chat(args),
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
