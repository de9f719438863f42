//! `mycel up`: a local network of N nodes in one process, for trying Mycel on one machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mycel_node::{Node, NodeConfig};

#[derive(Args)]
pub(crate) struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Folder for the nodes' data directories [default: a new temporary folder]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// API address of the first node (the others get free ports).
    #[arg(long, default_value = "127.0.0.1:7878")]
    api: SocketAddr,
    /// A model to serve (repeatable) [default: the reference models in .cache/models, when
    /// `bash scripts/fetch-models.sh` has put them there]
    #[arg(long = "model", value_name = "PATH")]
    models: Vec<PathBuf>,
    /// How many nodes serve the models (loaded once, shared).
    #[arg(long, default_value_t = 2)]
    servers: usize,
}

/// The reference models, where `scripts/fetch-models.sh` puts them.
const REFERENCE_MODELS: [&str; 2] = [
    ".cache/models/all-minilm-l6-v2",
    ".cache/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
];

pub(crate) async fn run(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    let (root, _temp) = match args.dir {
        Some(dir) => (dir, None),
        None => {
            let temp = tempfile::tempdir().context("creating a temporary folder")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let model_paths: Vec<PathBuf> = if args.models.is_empty() {
        REFERENCE_MODELS
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect()
    } else {
        args.models.clone()
    };
    let spinner = ProgressBar::new_spinner();
    let mut served = Vec::new();
    for path in &model_paths {
        spinner.set_message(format!("loading {}", path.display()));
        spinner.enable_steady_tick(Duration::from_millis(100));
        let path = path.clone();
        served.push(
            tokio::task::spawn_blocking(move || {
                mycel_node::models::load_model(&path, mycel_ml::Engine::default())
            })
            .await??,
        );
    }
    spinner.finish_and_clear();

    let progress = ProgressBar::new(args.nodes as u64).with_style(
        ProgressStyle::with_template("{spinner} {msg} {pos}/{len}").expect("valid template"),
    );
    progress.set_message("starting nodes");
    let mut nodes: Vec<Node> = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let mut config = NodeConfig::new(root.join(format!("node-{i}")));
        config.listen = vec![
            "/ip4/127.0.0.1/tcp/0".parse()?,
            "/ip4/127.0.0.1/udp/0/quic-v1".parse()?,
        ];
        config.mdns = false;
        config.api = Some(if i == 0 {
            args.api
        } else {
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        if i < args.servers {
            config.preloaded = served.clone();
        }
        // One user runs this network: the names of the models it loaded mean them on every
        // node (a name nothing trusted binds means nothing).
        for model in &served {
            config
                .router
                .bindings
                .bind(model.offer.name.clone(), model.offer.id);
        }
        if let Some(first) = nodes.first() {
            let peer = first.net.peer_id();
            config.bootstrap = first
                .net
                .listen_addrs()
                .iter()
                .map(|a| a.clone().with(libp2p::multiaddr::Protocol::P2p(peer)))
                .collect();
        }
        let node = Node::start(config)
            .await
            .with_context(|| format!("starting node {i}"))?;
        nodes.push(node);
        progress.inc(1);
    }

    progress.set_message("waiting for the nodes to see each other");
    progress.set_position(0);
    progress.set_length((args.nodes * args.nodes.saturating_sub(1)) as u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen = 0;
        for node in &nodes {
            seen += node
                .net
                .status()
                .await
                .map_or(0, |s| s.alive_with_capabilities);
        }
        progress.set_position(seen as u64);
        if seen >= args.nodes * (args.nodes - 1) || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.finish_and_clear();

    let first = &nodes[0];
    let api = first.api_addr.context("the first node has no API")?;
    println!(
        "Mycel is up: {} nodes on 127.0.0.1, data in {}",
        nodes.len(),
        root.display()
    );
    println!();
    println!("  API      http://{api}");
    println!("  token    {}", first.token);
    if served.is_empty() {
        println!("  models   none: run `bash scripts/fetch-models.sh` first, or pass --model PATH");
    }
    for model in &served {
        println!(
            "  model    {} ({:?}, {}) on {} node(s)",
            model.offer.name,
            model.offer.kind,
            model.offer.id.short(),
            args.servers.min(nodes.len())
        );
    }
    println!();
    println!("Try:");
    println!("  mycel status --api {api} --token {}", first.token);
    println!("  mycel peers  --api {api} --token {}", first.token);
    println!(
        "  curl -H 'Authorization: Bearer {}' http://{api}/api/peers",
        first.token
    );
    for model in &served {
        match model.offer.kind {
            mycel_core::statement::ModelKind::Generation => println!(
                "  curl -H 'Authorization: Bearer {}' http://{api}/v1/chat/completions -d \\\n    '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi!\"}}]}}'",
                first.token, model.offer.name
            ),
            mycel_core::statement::ModelKind::Embedding => println!(
                "  curl -H 'Authorization: Bearer {}' http://{api}/v1/embeddings -d \\\n    '{{\"model\": \"{}\", \"input\": \"Hello\"}}'",
                first.token, model.offer.name
            ),
        }
    }
    println!();
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}
