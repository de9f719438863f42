//! The Mycel node runtime: the store, the network and the HTTP API wired together.
//!
//! [`Node::start`] opens the data directory (identity, API token, peer book), starts the
//! libp2p event loop with the remembered peers, serves the API and keeps the peer book and the
//! node's advertised capabilities up to date until [`Node::shutdown`].

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod api;
mod blob_api;
pub mod blobs;
pub mod defences;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod inference;
pub mod models;
pub mod openai;
pub mod schema;
mod slots;
pub mod supply;
pub mod system;
pub mod train_api;
pub mod training;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mycel_core::id::ContentId;
use mycel_ml::Engine;
use mycel_net::{
    Limits, Multiaddr, NatConfig, NetConfig, NetEvent, NetHandle, Registry, Timing, TransportKind,
};
use mycel_store::{BlobStore, KnownPeer, Store};

use crate::blobs::{BlobConfig, BlobService};
use crate::inference::{Inference, RouterConfig};
use crate::models::ModelService;
use crate::supply::ModelSupply;
use crate::training::{LocalDataset, Training};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// How often load and power are re-read (a change is announced at once).
const CAPABILITY_REFRESH: Duration = Duration::from_secs(15);

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Directory for identity, token and state.
    pub data_dir: PathBuf,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap addresses.
    pub bootstrap: Vec<Multiaddr>,
    /// LAN discovery by mDNS.
    pub mdns: bool,
    /// Address of the HTTP API; `None` runs no API.
    pub api: Option<SocketAddr>,
    /// Serve /metrics without the token.
    pub open_metrics: bool,
    /// The operator confirmed an API address beyond loopback.
    pub api_public: bool,
    /// The API speaks HTTPS with this certificate chain and private key (PEM files).
    pub api_tls: Option<ApiTls>,
    /// Transports.
    pub transport: TransportKind,
    /// Root of the `/sys`-like tree power state is read from.
    pub sys_root: PathBuf,
    /// Record libp2p's per-protocol metrics.
    pub libp2p_metrics: bool,
    /// Network timing.
    pub timing: Timing,
    /// Network limits.
    pub limits: Limits,
    /// NAT traversal (relays, hole punching, AutoNAT, UPnP).
    pub nat: NatConfig,
    /// Models to serve: GGUF files (generation) and model directories (embeddings).
    pub models: Vec<PathBuf>,
    /// Models already loaded (shared by several nodes in one process), served as well.
    pub preloaded: Vec<models::Served>,
    /// Generation models of OpenAI-compatible servers beside this node, offered to the
    /// network under their names (`--upstream`).
    pub upstreams: Vec<upstream::Upstream>,
    /// How generation models run.
    pub engine: Engine,
    /// Requests that may wait or run at once before more are refused.
    pub max_queue: usize,
    /// How much a generation model on the q4 engine decodes at once.
    pub batch: mycel_ml::BatchLimits,
    /// Embedding requests at once share runs (`false`: one at a time, as benchmarks compare).
    pub embed_together: bool,
    /// How inference tasks are routed.
    pub router: RouterConfig,
    /// How blobs are kept, served and fetched.
    pub blobs: BlobConfig,
    /// A request for a model id this node lacks makes it fetch the model from its holders
    /// and serve it.
    pub serve_on_demand: bool,
    /// The only model ids served on demand (empty: any a request names).
    pub on_demand_allow: Vec<ContentId>,
    /// Most bytes of models served on demand since the start (their files, about what they
    /// take in memory): a model that would pass it is dropped again instead of loaded.
    pub on_demand_quota: u64,
    /// Datasets held for federated training: (tag, source) pairs, loaded at start.
    pub datasets: Vec<(String, String)>,
    /// Datasets already in memory, held as well.
    pub preloaded_datasets: Vec<Arc<LocalDataset>>,
    /// Whether this node is on a metered network (jobs may exclude it).
    pub metered: bool,
    /// Where its operator says it is (training jobs cluster peers of one site together).
    pub site: Option<String>,
    /// Poison every training update sent (benchmarks and tests of robust aggregation).
    pub train_attack: Option<mycel_core::fl::Attack>,
    /// In securely aggregated rounds, leave right after sending the key shares, as a
    /// participant that crashes then would (tests and benchmarks of dropout recovery).
    pub train_drop_after_shares: bool,
    /// Whose training jobs this node trains for (default: its own only).
    pub train_for: mycel_core::fl::TrainFor,
    /// Seeds this node's secret random choices in training: as a coordinator of private jobs,
    /// which participants a round samples and the noise; as a participant of securely
    /// aggregated rounds, its round keys, shares and noise. The same seed replays a run.
    /// Whoever knows it can take the noise out and unmask the node's updates, so it must stay
    /// secret. `None`: from the OS.
    pub training_seed: Option<u64>,
    /// The key of the operator that runs this node (created there if missing): the node
    /// announces the operator's word for it, and peers never pick two nodes of one operator
    /// to check each other's results.
    pub operator_key: Option<PathBuf>,
}

/// The certificate an HTTPS API presents.
#[derive(Debug, Clone)]
pub struct ApiTls {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl NodeConfig {
    /// Defaults for a node keeping its state in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            listen: NetConfig::default_listen(4001),
            bootstrap: Vec::new(),
            mdns: true,
            api: Some(SocketAddr::from(([127, 0, 0, 1], 7878))),
            open_metrics: false,
            api_public: false,
            api_tls: None,
            transport: TransportKind::TcpQuic,
            sys_root: PathBuf::from("/sys"),
            libp2p_metrics: true,
            timing: Timing::default(),
            limits: Limits::default(),
            nat: NatConfig::default(),
            models: Vec::new(),
            preloaded: Vec::new(),
            upstreams: Vec::new(),
            engine: Engine::default(),
            batch: mycel_ml::BatchLimits::default(),
            embed_together: true,
            max_queue: models::DEFAULT_MAX_QUEUE,
            router: RouterConfig::default(),
            blobs: BlobConfig::default(),
            serve_on_demand: false,
            on_demand_allow: Vec::new(),
            on_demand_quota: supply::DEFAULT_ON_DEMAND_QUOTA,
            datasets: Vec::new(),
            preloaded_datasets: Vec::new(),
            metered: false,
            site: None,
            train_attack: None,
            train_drop_after_shares: false,
            train_for: Default::default(),
            training_seed: None,
            operator_key: None,
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    /// The network handle.
    pub net: NetHandle,
    /// Where the API listens, if it runs.
    pub api_addr: Option<SocketAddr>,
    /// The API bearer token.
    pub token: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The models this node serves.
    pub models: Arc<ModelService>,
    /// Routes inference tasks and runs those peers send.
    pub inference: Arc<Inference>,
    /// Holds, serves and fetches blobs.
    pub blobs: Arc<BlobService>,
    /// Fetches, loads and serves models.
    pub supply: Arc<ModelSupply>,
    /// Federated training: participant and coordinator.
    pub training: Arc<Training>,
    tasks: Vec<JoinHandle<()>>,
    /// Writes the peer book; on shutdown it writes what it collected once the network task
    /// has stopped.
    peer_book: JoinHandle<()>,
}

impl Node {
    /// Opens the data directory, starts networking and the API.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Self> {
        if let Some(addr) = config.api.filter(|a| !a.ip().is_loopback()) {
            anyhow::ensure!(
                config.api_public,
                "the API would listen on {addr}, beyond this machine: anyone who reaches it \
                 with the token controls the node. Keep --api on 127.0.0.1, or pass \
                 --api-public to confirm (with --api-tls-cert and --api-tls-key, or a TLS \
                 proxy in front)"
            );
        }
        // Read before anything else starts: a bad certificate is a configuration error.
        let tls = config.api_tls.as_ref().map(api::tls_acceptor).transpose()?;
        let dir = config.data_dir.clone();
        mycel_store::prepare_data_dir(&dir)?;
        let keypair = mycel_store::load_or_create_identity(&dir)?;
        let operator = match &config.operator_key {
            Some(path) => Some(
                mycel_store::load_or_create_key(path)
                    .with_context(|| format!("reading the operator key {}", path.display()))?,
            ),
            None => None,
        };
        let token = mycel_store::load_or_create_token(&dir)?;
        let store = Arc::new(Store::open(&dir)?);
        let paths = config.models.clone();
        let (engine, max_queue, batch) = (config.engine, config.max_queue.max(1), config.batch);
        let mut served = config.preloaded.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|path| models::load_model_with(path, engine, batch))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await
        .context("loading models")??;
        let sources = config.datasets.clone();
        let mut datasets = config.preloaded_datasets.clone();
        datasets.extend(
            tokio::task::spawn_blocking(move || {
                sources
                    .iter()
                    .map(|(tag, source)| LocalDataset::load(tag, source).map(Arc::new))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .await
            .context("loading datasets")??,
        );
        let dataset_offers: Vec<_> = datasets.iter().map(|d| d.offer()).collect();
        let extra = system::Extra {
            datasets: dataset_offers,
            metered: config.metered,
            site: config.site.clone(),
        };
        let published: Vec<(PathBuf, mycel_core::id::ContentId)> = loaded
            .iter()
            .map(|s| (s.source.clone(), s.offer.id))
            .collect();
        served.extend(loaded);
        let me = keypair.public().to_peer_id();
        served.extend(config.upstreams.iter().map(|u| u.clone().served(&me)));
        // What the node's defences turn away, counted by every service (registered below).
        let defences = defences::Defences::default();
        let models = Arc::new(
            ModelService::new(served, max_queue)
                .counting(defences.clone())
                .embedding_together(config.embed_together),
        );
        let known_peers = store
            .peers()?
            .into_iter()
            .map(|p| {
                (
                    p.peer,
                    p.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                )
            })
            .collect();

        let blob_dir = dir.join("blobs");
        let quota = config.blobs.quota;
        let blob_store = tokio::task::spawn_blocking(move || BlobStore::open(&blob_dir, quota))
            .await
            .context("opening the blob store")??;

        let mut net_config = NetConfig::new(keypair.clone());
        net_config.transport = config.transport;
        net_config.listen = config.listen.clone();
        net_config.bootstrap = config.bootstrap.clone();
        net_config.known_peers = known_peers;
        net_config.mdns = config.mdns;
        net_config.libp2p_metrics = config.libp2p_metrics;
        net_config.capabilities = system::read_capabilities(&config.sys_root, &models, &extra);
        // Peers would refuse (and charge) announcements they cannot accept: refuse the
        // configuration here instead, saying what to change.
        net_config.capabilities.check().map_err(|e| {
            anyhow::anyhow!("{e}: rename the model file or the dataset tag, or serve fewer")
        })?;
        net_config.timing = config.timing.clone();
        net_config.limits = config.limits.clone();
        net_config.nat = config.nat.clone();
        net_config.operator = operator
            .as_ref()
            .map(|key| mycel_core::statement::Operator::vouch(key, &keypair.public().to_peer_id()));
        // Served from the first connection on: peers hear of our models, blobs and datasets
        // as soon as we connect, and must not find these protocols missing meanwhile.
        net_config.accept = vec![
            mycel_net::task::TASK_PROTOCOL,
            mycel_net::task::BLOB_PROTOCOL,
            mycel_net::task::TRAIN_PROTOCOL,
        ];

        // Sequence numbers are reserved in the store before use, so a restarted node never
        // reuses one (its peers would take the new announcement for a replay).
        let seq_store = store.clone();
        let mut fallback = 0u64;
        let seq_source = Box::new(move |floor: u64| {
            let seq = seq_store.next_announce_seq(floor).unwrap_or_else(|e| {
                warn!("cannot persist announcement sequence: {e}");
                floor.max(fallback + 1)
            });
            fallback = seq;
            seq
        });

        let mut registry = Registry::default();
        defences.register(&mut registry);
        let (net, events, net_task) = mycel_net::spawn(net_config, seq_source, &mut registry)
            .await
            .context("starting the network")?;
        let mut tasks = vec![net_task];
        let mut router = config.router.clone();
        router.engine = config.engine.name().to_owned();
        let inference = Arc::new(
            Inference::new(
                net.clone(),
                keypair.clone(),
                models.clone(),
                router,
                operator.map(|key| key.public().to_peer_id()),
            )
            .counting(defences.clone()),
        );
        let incoming = net.accept_task_streams()?;
        tasks.push(tokio::spawn(inference.clone().serve(incoming)));
        tasks.push(inference.keep_trust_in(store.clone())?);
        let blobs = Arc::new(
            BlobService::new(Arc::new(blob_store), net.clone(), config.blobs.clone())
                .counting(defences),
        );
        blobs.register(&mut registry);
        inference.register(&mut registry);
        registry.register_collector(Box::new(models::BatchMetrics(models.clone())));
        let api_connections = api::ConnMetrics::default();
        api_connections.register(&mut registry);
        tasks.push(tokio::spawn(
            blobs
                .clone()
                .serve(net.accept_streams(mycel_net::task::BLOB_PROTOCOL)?),
        ));
        let supply = Arc::new(
            ModelSupply::new(
                blobs.clone(),
                models.clone(),
                net.clone(),
                config.sys_root.clone(),
                extra.clone(),
                &dir,
                config.engine,
                config.serve_on_demand,
            )
            .batching(config.batch)
            .allowing(config.on_demand_allow.clone())
            .with_quota(config.on_demand_quota)
            .remembering(store.clone()),
        );
        inference.set_supply(supply.clone());
        // The models served on demand before a restart are served again (or released).
        let restoring = supply.clone();
        tasks.push(tokio::spawn(async move { restoring.restore().await }));
        let training = Arc::new(
            Training::new(
                net.clone(),
                keypair,
                store.clone(),
                blobs.clone(),
                datasets,
                config.train_attack,
                config.train_for.clone(),
            )
            .seeded(config.training_seed)
            .dropping_after_shares(config.train_drop_after_shares),
        );
        tasks.push(tokio::spawn(
            training
                .clone()
                .serve(net.accept_streams(mycel_net::task::TRAIN_PROTOCOL)?),
        ));
        // Provider records let nodes that have not heard our announcement find the models,
        // and every node find the blobs held here.
        // (Not an upstream's: there is no blob to fetch behind it.)
        let provided = models.offers().into_iter();
        blobs
            .provide_also(
                provided
                    .filter(|o| o.engine != upstream::ENGINE)
                    .map(|o| o.id),
            )
            .await;
        training.resume_all();
        // The files of the models served from paths become blobs peers can fetch.
        let publisher = supply.clone();
        tasks.push(tokio::spawn(async move {
            for (path, id) in published {
                if let Err(e) = publisher.publish(&path, id).await {
                    warn!("cannot publish the files of {}: {e:#}", path.display());
                }
            }
        }));
        let peer_book = tokio::spawn(persist_peers(store.clone(), events));
        tasks.push(tokio::spawn(refresh_capabilities(
            net.clone(),
            config.sys_root.clone(),
            models.clone(),
            extra,
        )));

        let mut api_addr = None;
        if let Some(addr) = config.api {
            if !addr.ip().is_loopback() && tls.is_none() {
                warn!(
                    "the API listens on {addr}, beyond this machine, over plain HTTP; keep \
                     api.token secret and pass --api-tls-cert and --api-tls-key (or put a TLS \
                     proxy in front)"
                );
            }
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot bind the API to {addr}; is another node using it? Pass --api 127.0.0.1:<free port>")
            })?;
            let bound = listener.local_addr()?;
            let state = api::ApiState {
                net: net.clone(),
                token: token.clone().into(),
                registry: Arc::new(registry),
                api_addr: bound.to_string(),
                models: models.clone(),
                inference: inference.clone(),
                blobs: blobs.clone(),
                training: training.clone(),
            };
            let app = api::router(state, config.open_metrics);
            tasks.push(tokio::spawn(async move {
                api::serve(listener, app, tls, api_connections).await;
            }));
            api_addr = Some(bound);
        }
        Ok(Self {
            net,
            api_addr,
            token,
            data_dir: dir,
            models,
            inference,
            blobs,
            supply,
            training,
            tasks,
            peer_book,
        })
    }

    /// Fetches the model blob `id` and lays it out to load; see [`ModelSupply::fetch`].
    pub async fn fetch_model(
        &self,
        id: mycel_core::id::ContentId,
        progress: &blobs::Progress,
    ) -> anyhow::Result<PathBuf> {
        self.supply.fetch(id, progress).await
    }

    /// Loads the model at `path` and serves it from now on; see [`ModelSupply::serve`].
    pub async fn serve_model(&self, path: PathBuf, engine: Engine) -> anyhow::Result<()> {
        self.supply.serve(path, engine).await.map(|_| ())
    }

    /// Stops the node cleanly.
    pub async fn shutdown(self) {
        self.training.stop();
        self.inference.flush().await;
        self.inference.release_store();
        self.supply.release_store();
        self.net.shutdown().await;
        // The network task stops on the command and closes the peer-book writer's channel:
        // the writer saves what it collected, then ends.
        let mut peer_book = self.peer_book;
        if tokio::time::timeout(PEER_BOOK_FLUSH_WAIT, &mut peer_book)
            .await
            .is_err()
        {
            peer_book.abort();
        }
        for task in self.tasks {
            task.abort();
        }
    }

    /// Stops the node abruptly, as a crash would: tasks are dropped mid-flight.
    pub fn abort(self) {
        self.training.stop();
        self.inference.release_store();
        self.supply.release_store();
        self.peer_book.abort();
        for task in self.tasks {
            task.abort();
        }
    }
}

/// How often at most the peer-book writer writes (each write ends with an fsync).
const PEER_BOOK_BATCH: Duration = Duration::from_secs(1);
/// How long a clean shutdown waits for the peer-book writer's last write.
const PEER_BOOK_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Writes the addresses peers tell us about to the peer book, in batches: the first after a
/// quiet second at once, the rest of a burst (a join learns a whole network's addresses in
/// seconds) once a second. Measured: one write per event made 50 nodes joining in one
/// process converge in 1.1-1.4 s instead of 0.9-1.0 s, the fsyncs taking CPU and the
/// blocking threads. What was collected is written when the network task stops.
async fn persist_peers(store: Arc<Store>, mut events: tokio::sync::mpsc::Receiver<NetEvent>) {
    let mut last_write: Option<tokio::time::Instant> = None;
    while let Some(event) = events.recv().await {
        let mut batch = Vec::new();
        let mut push = |event: NetEvent| match event {
            NetEvent::PeerAddresses { peer, addrs } => batch.push(KnownPeer {
                peer,
                addrs: addrs.iter().map(|a| a.to_string()).collect(),
                last_seen: mycel_net::now_ms(),
            }),
        };
        push(event);
        if let Some(at) = last_write {
            let until = at + PEER_BOOK_BATCH;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    event = events.recv() => match event {
                        Some(event) => push(event),
                        None => break,
                    },
                }
            }
        }
        while let Ok(event) = events.try_recv() {
            push(event);
        }
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || store.put_peers(&batch)).await;
        last_write = Some(tokio::time::Instant::now());
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("cannot save peers: {e}"),
            Err(e) => debug!("peer-book writer stopped: {e}"),
        }
    }
}

/// Re-reads load and power and hands them to the network task, which decides when to
/// announce them. Nodes start at a random offset so that many nodes on one host do not read
/// in the same instant.
async fn refresh_capabilities(
    net: NetHandle,
    sys_root: PathBuf,
    models: Arc<ModelService>,
    extra: system::Extra,
) {
    let offset = CAPABILITY_REFRESH.mul_f64(rand::random::<f64>());
    let start = tokio::time::Instant::now() + CAPABILITY_REFRESH + offset;
    let mut interval = tokio::time::interval_at(start, CAPABILITY_REFRESH);
    loop {
        interval.tick().await;
        let current = system::read_capabilities(&sys_root, &models, &extra);
        if net.refresh_capabilities(current).await.is_err() {
            return;
        }
    }
}
