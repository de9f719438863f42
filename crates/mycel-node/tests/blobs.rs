//! Blobs between real nodes on 127.0.0.1: found through the DHT, fetched from several
//! providers, verified chunk by chunk against a provider that lies, resumed after the
//! provider or the fetcher dies.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{addrs_of, local_config, restart, wait_until};
use futures::{AsyncWriteExt, StreamExt};
use mycel_core::blob::{BlobFrame, BlobRequest, CHUNK_BYTES, MAX_BLOB_REQUEST_BYTES};
use mycel_core::id::ContentId;
use mycel_core::statement::ModelKind;
use mycel_net::task::{read_frame, write_frame, BLOB_PROTOCOL};
use mycel_net::{Multiaddr, NetHandle};
use mycel_node::blobs::{BlobConfig, Progress};
use mycel_node::{Node, NodeConfig};
use mycel_store::BlobStore;

const LIMIT: Duration = Duration::from_secs(30);

fn bytes(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn blob_config(upload_limit: Option<u64>) -> BlobConfig {
    BlobConfig {
        upload_limit,
        fetch_deadline: LIMIT,
        request_timeout: Duration::from_secs(3),
        chunks_per_request: 2,
        ..BlobConfig::default()
    }
}

fn config(dir: &Path, bootstrap: Vec<Multiaddr>, upload_limit: Option<u64>) -> NodeConfig {
    let mut config = local_config(dir, bootstrap, false);
    config.blobs = blob_config(upload_limit);
    // The DHT is joined at the first walk: soon, in these small networks.
    config.timing.random_walk_interval = Duration::from_secs(1);
    config
}

async fn start(dir: &Path, bootstrap: Vec<Multiaddr>, upload_limit: Option<u64>) -> Node {
    Node::start(config(dir, bootstrap, upload_limit))
        .await
        .unwrap()
}

/// Waits until `asker` finds `provider` in the DHT as a holder of `id`.
async fn wait_provider(asker: &Node, id: ContentId, provider: mycel_net::PeerId) {
    wait_until(LIMIT, "the DHT lists the provider", || async {
        asker
            .net
            .find_providers(id)
            .await
            .unwrap()
            .contains(&provider)
    })
    .await;
}

fn export(node: &Node, id: &ContentId, to: &Path) -> Vec<u8> {
    node.blobs.store().export(id, to, 0).unwrap();
    std::fs::read(to).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_put_on_one_node_is_fetched_byte_for_byte_by_a_node_that_knows_only_a_third() {
    let root = tempfile::tempdir().unwrap();
    let b = start(&root.path().join("b"), vec![], None).await;
    let a = start(&root.path().join("a"), addrs_of(&b), None).await;
    let c = start(&root.path().join("c"), addrs_of(&b), None).await;

    let file = root.path().join("data.bin");
    let data = bytes(5 * CHUNK_BYTES + 1234, 3);
    std::fs::write(&file, &data).unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("config.json"), b"{}").unwrap();
    std::fs::write(dir.join("sub/weights.bin"), bytes(CHUNK_BYTES + 7, 4)).unwrap();
    let id = a.blobs.import_path(&file, true).await.unwrap();
    let dir_id = a.blobs.import_path(&dir, true).await.unwrap();
    assert_eq!(id, ContentId::of(&data));
    wait_provider(&c, id, a.net.peer_id()).await;

    let progress = Progress::default();
    let blob = c.blobs.fetch(id, &[], false, &progress).await.unwrap();
    assert_eq!(blob.size, data.len() as u64);
    assert_eq!(progress.done.load(Ordering::Relaxed), data.len() as u64);
    assert_eq!(export(&c, &id, &root.path().join("out.bin")), data);
    // C holds it now, and says so.
    wait_provider(&b, id, c.net.peer_id()).await;

    // A directory comes with its files.
    wait_provider(&c, dir_id, a.net.peer_id()).await;
    c.blobs
        .fetch_tree(dir_id, &[], false, &Progress::default())
        .await
        .unwrap();
    let out = root.path().join("model-copy");
    c.blobs.store().export(&dir_id, &out, 0).unwrap();
    assert_eq!(
        std::fs::read(out.join("sub/weights.bin")).unwrap(),
        bytes(CHUNK_BYTES + 7, 4)
    );
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), b"{}");

    for node in [a, b, c] {
        node.shutdown().await;
    }
}

/// A real libp2p peer that provides `id` with its true chunk hashes but flips a bit in every
/// chunk it sends.
async fn liar(bootstrap: Vec<Multiaddr>, store: Arc<BlobStore>, id: ContentId) -> NetHandle {
    let net = common::raw_peer(bootstrap).await;
    let mut incoming = net.accept_streams(BLOB_PROTOCOL).unwrap();
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            let store = store.clone();
            tokio::spawn(async move {
                let Ok(Some(request)) =
                    read_frame::<BlobRequest>(&mut stream, MAX_BLOB_REQUEST_BYTES).await
                else {
                    return;
                };
                match request {
                    BlobRequest::Outboard { .. } => {
                        let outboard = store.outboard(&id).unwrap().unwrap();
                        let _ = write_frame(&mut stream, &BlobFrame::Outboard(outboard.to_bytes()))
                            .await;
                    }
                    BlobRequest::Chunks { chunks, .. } => {
                        for index in chunks {
                            let mut data = store.read_chunk(&id, index).unwrap();
                            data[0] ^= 1;
                            let len = data.len() as u32;
                            let header = BlobFrame::Chunk { index, len };
                            if write_frame(&mut stream, &header).await.is_err()
                                || stream.write_all(&data).await.is_err()
                                || stream.flush().await.is_err()
                            {
                                return;
                            }
                        }
                        let _ = stream.close().await;
                    }
                }
            });
        }
    });
    net.provide(vec![id]).await.unwrap();
    net
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_from_a_lying_provider_are_refused_and_the_fetch_completes_from_the_honest_one() {
    let root = tempfile::tempdir().unwrap();
    let honest = start(&root.path().join("honest"), vec![], None).await;
    let data = bytes(8 * CHUNK_BYTES, 5);
    let file = root.path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let id = honest.blobs.import_path(&file, true).await.unwrap();
    let lie_store = Arc::new(BlobStore::open(&root.path().join("liar-store"), 1 << 30).unwrap());
    lie_store.import(data.as_slice(), 0, true).unwrap();
    let liar = liar(addrs_of(&honest), lie_store, id).await;
    let fetcher = start(&root.path().join("fetcher"), addrs_of(&honest), None).await;
    wait_provider(&fetcher, id, liar.peer_id()).await;
    wait_provider(&fetcher, id, honest.net.peer_id()).await;

    // The liar named first, so that its workers take the first chunks off the queue.
    let blob = fetcher
        .blobs
        .fetch(
            id,
            &[liar.peer_id(), honest.net.peer_id()],
            false,
            &Progress::default(),
        )
        .await
        .unwrap();
    assert_eq!(blob.id, id);
    assert_eq!(export(&fetcher, &id, &root.path().join("out")), data);
    assert!(fetcher.blobs.stats.chunks_refused.load(Ordering::Relaxed) > 0);
    let reputation = fetcher.net.reputation(liar.peer_id()).await.unwrap();
    assert!(reputation < 0.0, "{reputation}");
    assert_eq!(
        fetcher.net.reputation(honest.net.peer_id()).await.unwrap(),
        0.0
    );

    liar.shutdown().await;
    fetcher.shutdown().await;
    honest.shutdown().await;
}

/// Starts a fetch of `id` on `node` in the background.
fn fetch_in_background(
    node: &Node,
    id: ContentId,
) -> (
    Arc<Progress>,
    tokio::task::JoinHandle<Result<mycel_store::BlobInfo, String>>,
) {
    let progress = Arc::new(Progress::default());
    let blobs = node.blobs.clone();
    let shown = progress.clone();
    let task = tokio::spawn(async move {
        blobs
            .fetch(id, &[], false, &shown)
            .await
            .map_err(|e| e.to_string())
    });
    (progress, task)
}

async fn wait_progress(progress: &Progress, at_least: u64) {
    wait_until(LIMIT, "the fetch is under way", || async {
        progress.done.load(Ordering::Relaxed) >= at_least
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_outlives_its_provider_restarting_and_never_fetches_a_verified_chunk_twice() {
    let root = tempfile::tempdir().unwrap();
    let first = start(&root.path().join("first"), vec![], None).await;
    // 16 chunks at 2 MiB/s: about 2 s of transfer.
    let limit = Some(2 * 1024 * 1024);
    let provider_dir = root.path().join("provider");
    let provider = start(&provider_dir, addrs_of(&first), limit).await;
    let data = bytes(16 * CHUNK_BYTES, 6);
    let file = root.path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let id = provider.blobs.import_path(&file, true).await.unwrap();
    let fetcher = start(&root.path().join("fetcher"), addrs_of(&first), None).await;
    wait_provider(&fetcher, id, provider.net.peer_id()).await;

    let (progress, task) = fetch_in_background(&fetcher, id);
    wait_progress(&progress, 4 * CHUNK_BYTES).await;
    let provider_addrs = provider.net.listen_addrs().to_vec();
    provider.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let missing = fetcher.blobs.store().missing(&id).unwrap().unwrap();
    assert!(!missing.is_empty() && missing.len() < 16, "{missing:?}");

    // The provider comes back on the same addresses with its store intact.
    let mut again = config(&provider_dir, addrs_of(&first), limit);
    again.listen = provider_addrs;
    let provider = restart(again).await;
    let blob = task.await.unwrap().expect("the fetch completes");
    assert_eq!(blob.id, id);
    assert_eq!(export(&fetcher, &id, &root.path().join("out")), data);
    // The restarted provider sent only what was still missing.
    let served = provider.blobs.stats.chunks_served.load(Ordering::Relaxed);
    assert!(
        served <= missing.len() as u64,
        "{served} > {}",
        missing.len()
    );

    for node in [provider, fetcher, first] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_that_crashes_keeps_no_partial_blob_and_resumes_where_it_stopped() {
    let root = tempfile::tempdir().unwrap();
    let provider = start(&root.path().join("provider"), vec![], Some(2 * 1024 * 1024)).await;
    let data = bytes(16 * CHUNK_BYTES, 7);
    let file = root.path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let id = provider.blobs.import_path(&file, true).await.unwrap();
    let fetcher_dir = root.path().join("fetcher");
    let fetcher = start(&fetcher_dir, addrs_of(&provider), None).await;
    wait_provider(&fetcher, id, provider.net.peer_id()).await;

    let (progress, task) = fetch_in_background(&fetcher, id);
    wait_progress(&progress, 4 * CHUNK_BYTES).await;
    task.abort();
    fetcher.abort();
    let served_before = provider.blobs.stats.chunks_served.load(Ordering::Relaxed);

    let fetcher = restart(config(&fetcher_dir, addrs_of(&provider), None)).await;
    // Not whole: not listed, not served, not readable.
    assert!(fetcher.blobs.store().info(&id).unwrap().is_none());
    assert!(fetcher.blobs.store().open_reader(&id, 0).is_err());
    let missing = fetcher.blobs.store().missing(&id).unwrap().unwrap();
    assert!(missing.len() < 16, "{missing:?}");
    wait_provider(&fetcher, id, provider.net.peer_id()).await;
    fetcher
        .blobs
        .fetch(id, &[], false, &Progress::default())
        .await
        .unwrap();
    assert_eq!(export(&fetcher, &id, &root.path().join("out")), data);
    let served_after = provider.blobs.stats.chunks_served.load(Ordering::Relaxed) - served_before;
    // Chunks in flight at the crash (2 requests of 2) may be sent again; verified ones are not.
    assert!(
        served_after <= missing.len() as u64 + 4,
        "{served_after} for {} missing",
        missing.len()
    );

    fetcher.shutdown().await;
    provider.shutdown().await;
}

/// A tiny embedding model directory with a README beside its files.
fn tiny_model_dir(root: &Path) -> PathBuf {
    let dir = root.join("tiny-bert");
    mycel_ml::fixtures::write_tiny_bert(&dir).unwrap();
    std::fs::write(dir.join("README.md"), "not part of the model").unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_served_from_a_path_is_published_under_its_id_and_a_peer_fetches_and_serves_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = tiny_model_dir(root.path());
    let mut holder_config = config(&root.path().join("a"), vec![], None);
    holder_config.models = vec![dir.clone()];
    let holder = Node::start(holder_config).await.unwrap();
    let id = holder.models.offers()[0].id;
    // Its files (not the README) become a blob whose id is the model's id.
    wait_until(LIMIT, "the model's files are published", || async {
        holder.blobs.store().info(&id).unwrap().is_some()
    })
    .await;
    let entries = holder.blobs.store().manifest(&id).unwrap().unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, mycel_ml::embed::EMBEDDER_FILES);
    assert!(holder.blobs.store().info(&id).unwrap().unwrap().pinned);

    let fetcher = start(&root.path().join("b"), addrs_of(&holder), None).await;
    wait_provider(&fetcher, id, holder.net.peer_id()).await;
    let path = fetcher.fetch_model(id, &Progress::default()).await.unwrap();
    fetcher
        .serve_model(path, mycel_ml::Engine::default())
        .await
        .unwrap();
    let offers = fetcher.models.offers();
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].id, id, "the fetched model has the same identity");
}

/// Whoever asks for a model by id chooses the id: a blob that is no model is fetched, fails to
/// load with a clear error, and is then deleted (not left pinned), its link under models/
/// removed; the node serves nothing new and goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_is_no_model_fails_to_load_on_demand_and_is_dropped() {
    let root = tempfile::tempdir().unwrap();
    let holder = start(&root.path().join("a"), vec![], None).await;
    let junk: Vec<u8> = (0..3 * CHUNK_BYTES as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let id = holder
        .blobs
        .store()
        .import(junk.as_slice(), 0, true)
        .unwrap()
        .id;
    holder.blobs.announce().await;

    let mut on_demand = config(&root.path().join("b"), addrs_of(&holder), None);
    on_demand.serve_on_demand = true;
    let node = Node::start(on_demand).await.unwrap();
    wait_provider(&node, id, holder.net.peer_id()).await;
    let demand = node.supply.demand(id).expect("a load slot is free");
    let outcome = mycel_node::supply::settled(demand).await;
    match outcome {
        Err(e) => assert!(e.contains("GGUF"), "{e}"),
        Ok(()) => panic!("junk was served as a model"),
    }
    assert!(
        node.blobs.store().info(&id).unwrap().is_none(),
        "the junk is deleted"
    );
    let models = root.path().join("b").join("models");
    let left: Vec<_> = std::fs::read_dir(&models)
        .map(|dir| dir.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left under models/: {left:?}");
    assert!(node.models.offers().is_empty());
    let failed = mycel_node::defences::ON_DEMAND_LOAD_FAILED;
    assert_eq!(node.blobs.defences.total(failed), 1);

    // A real GGUF whose header claims 4,294,967,295 layers (it aborted the process once):
    // refused by name, dropped, and the node goes on answering.
    let gguf = root.path().join("absurd.gguf");
    mycel_ml::fixtures::write_tiny_llama(&gguf).unwrap();
    let mut bytes = std::fs::read(&gguf).unwrap();
    let key = b"llama.block_count";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key in the header")
        + key.len();
    assert_eq!(&bytes[at..at + 4], &4u32.to_le_bytes(), "a u32 value");
    bytes[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let absurd = holder
        .blobs
        .store()
        .import(bytes.as_slice(), 0, true)
        .unwrap()
        .id;
    holder.blobs.announce().await;
    wait_provider(&node, absurd, holder.net.peer_id()).await;
    let demand = node.supply.demand(absurd).expect("a load slot is free");
    match mycel_node::supply::settled(demand).await {
        Err(e) => assert!(e.contains("block_count"), "{e}"),
        Ok(()) => panic!("a model claiming 4,294,967,295 layers was served"),
    }
    assert!(node.blobs.store().info(&absurd).unwrap().is_none());
    assert_eq!(node.blobs.defences.total(failed), 2);
    assert!(node.net.status().await.is_ok(), "the node answers");

    // Real models past the on-demand quota: room for the first, which is served; the second
    // would pass the quota with the first, so it is refused once its size is known, before
    // any of its data is fetched.
    let mut models = Vec::new();
    for (name, layers) in [("two.gguf", 2), ("one.gguf", 1)] {
        let path = root.path().join(name);
        let shape = mycel_ml::fixtures::LlamaShape {
            layers,
            ..mycel_ml::fixtures::LlamaShape::TINY
        };
        mycel_ml::fixtures::write_llama(&path, shape).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let info = holder
            .blobs
            .store()
            .import(bytes.as_slice(), 0, true)
            .unwrap();
        models.push((info.id, info.size));
    }
    holder.blobs.announce().await;
    let mut bounded = config(&root.path().join("q"), addrs_of(&holder), None);
    bounded.serve_on_demand = true;
    bounded.on_demand_quota = models[0].1 + models[1].1 - 1;
    let bounded = Node::start(bounded).await.unwrap();
    for (id, _) in &models {
        wait_provider(&bounded, *id, holder.net.peer_id()).await;
    }
    let demand = bounded
        .supply
        .demand(models[0].0)
        .expect("a load slot is free");
    mycel_node::supply::settled(demand).await.unwrap();
    assert_eq!(bounded.models.offers().len(), 1, "the first is served");
    let chunks_before = bounded.blobs.stats.chunks_fetched.load(Ordering::Relaxed);
    let demand = bounded
        .supply
        .demand(models[1].0)
        .expect("a load slot is free");
    match mycel_node::supply::settled(demand).await {
        Err(e) => assert!(e.contains("--on-demand-quota"), "{e}"),
        Ok(()) => panic!("a model past the on-demand quota was served"),
    }
    assert_eq!(bounded.models.offers().len(), 1);
    assert!(bounded.blobs.store().info(&models[1].0).unwrap().is_none());
    assert_eq!(
        bounded.blobs.stats.chunks_fetched.load(Ordering::Relaxed),
        chunks_before,
        "a model past the quota was fetched"
    );
    assert!(
        bounded
            .blobs
            .store()
            .info(&models[0].0)
            .unwrap()
            .unwrap()
            .pinned
    );
    let over = mycel_node::defences::ON_DEMAND_OVER_QUOTA;
    assert_eq!(bounded.blobs.defences.total(over), 1);
    assert_eq!(bounded.blobs.defences.total(failed), 0);
    // Refused lately: asking again does not fetch it again.
    assert!(bounded.supply.demand(models[1].0).is_none());
    assert!(
        node.supply.demand(id).is_none(),
        "nor junk that failed to load"
    );

    // An operator who allows only other ids on demand: the junk is not even fetched.
    let mut strict = config(&root.path().join("c"), addrs_of(&holder), None);
    strict.serve_on_demand = true;
    strict.on_demand_allow = vec![ContentId([3; 32])];
    let strict = Node::start(strict).await.unwrap();
    assert!(strict.supply.demand(id).is_none(), "not an allowed id");
    assert!(strict.supply.demand(ContentId([3; 32])).is_some());
    assert!(strict.blobs.store().info(&id).unwrap().is_none());
    // It still fetches what it is asked for.
    let copy = node
        .blobs
        .fetch(id, &[], false, &Progress::default())
        .await
        .unwrap();
    assert_eq!(copy.id, id);
}

/// A node (under `root/a`) that keeps a tiny embedding model's files (written under `root`) as
/// a blob, announced, but does not serve the model; the files' directory and the blob's id.
async fn holder_of_a_model(root: &Path) -> (Node, PathBuf, ContentId) {
    let dir = tiny_model_dir(root);
    let holder = start(&root.join("a"), vec![], None).await;
    let id = holder
        .blobs
        .store()
        .import_files(&dir, &mycel_ml::embed::EMBEDDER_FILES, 0, true)
        .unwrap();
    holder.blobs.announce().await;
    (holder, dir, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serving_on_demand_fetches_and_loads_a_model_asked_for_by_id_that_only_a_peer_holds()
{
    let root = tempfile::tempdir().unwrap();
    let (holder, dir, id) = holder_of_a_model(root.path()).await;
    let reference = mycel_ml::Embedder::load(&dir).unwrap();
    assert_eq!(id, reference.id(), "the blob's id is the model's id");

    let mut on_demand = config(&root.path().join("b"), addrs_of(&holder), None);
    on_demand.serve_on_demand = true;
    let node = Node::start(on_demand).await.unwrap();
    wait_provider(&node, id, holder.net.peer_id()).await;
    assert!(node.models.offers().is_empty());
    let target = node
        .inference
        .resolve(&id.to_string(), ModelKind::Embedding)
        .await
        .unwrap();
    assert!(target.local.is_some(), "fetched, verified and loaded first");
    let texts = vec!["on demand".to_owned(), "a second sentence".to_owned()];
    let embedded = node.inference.embed(&target, texts.clone()).await.unwrap();
    assert_eq!(
        embedded.worker,
        node.net.peer_id(),
        "run where it was loaded"
    );
    assert_eq!(embedded.vectors, reference.embed(&texts).unwrap().0);
    assert!(node.blobs.store().info(&id).unwrap().unwrap().pinned);

    // An id nobody holds: a clear refusal soon, not a wait for the fetch deadline.
    let nobody = ContentId([7; 32]);
    let started = std::time::Instant::now();
    let target = node
        .inference
        .resolve(&nobody.to_string(), ModelKind::Embedding)
        .await
        .unwrap();
    assert!(target.local.is_none());
    assert!(node.inference.embed(&target, texts).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(node.models.offers().len(), 1);

    // A model a peer serves: the request goes to it at once, and the node on demand becomes
    // a replica in the background.
    let mut third = config(&root.path().join("c"), addrs_of(&node), None);
    third.serve_on_demand = true;
    let third = Node::start(third).await.unwrap();
    wait_until(LIMIT, "the serving peer's announcement", || async {
        third.net.peers().await.unwrap().iter().any(|p| {
            p.capabilities
                .iter()
                .any(|c| c.models.iter().any(|m| m.id == id))
        })
    })
    .await;
    let target = third
        .inference
        .resolve(&id.to_string(), ModelKind::Embedding)
        .await
        .unwrap();
    assert!(target.local.is_none(), "not waited for: a peer serves it");
    let embedded = third
        .inference
        .embed(&target, vec!["x".into()])
        .await
        .unwrap();
    assert_eq!(embedded.worker, node.net.peer_id());
    wait_until(LIMIT, "the model is replicated on demand", || async {
        third.models.offers().iter().any(|o| o.id == id)
    })
    .await;
}

/// A model served on demand is served again after a restart, from the blobs the node kept
/// (its only holder gone by then), and released by a restart without `--serve-on-demand`:
/// not served, its blobs unpinned (cache like any other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_served_on_demand_is_served_again_after_a_restart_or_released_without_it() {
    let root = tempfile::tempdir().unwrap();
    let (holder, _, id) = holder_of_a_model(root.path()).await;
    let bootstrap = addrs_of(&holder);
    let node_config = |serve_on_demand| {
        let mut node = config(&root.path().join("b"), bootstrap.clone(), None);
        node.serve_on_demand = serve_on_demand;
        node
    };
    let node = Node::start(node_config(true)).await.unwrap();
    wait_provider(&node, id, holder.net.peer_id()).await;
    let target = node
        .inference
        .resolve(&id.to_string(), ModelKind::Embedding)
        .await
        .unwrap();
    assert!(target.local.is_some(), "served on demand");
    node.shutdown().await;
    holder.shutdown().await;

    let node = restart(node_config(true)).await;
    wait_until(
        LIMIT,
        "the model is served again after the restart",
        || async { node.models.offers().iter().any(|o| o.id == id) },
    )
    .await;
    let target = node
        .inference
        .resolve(&id.to_string(), ModelKind::Embedding)
        .await
        .unwrap();
    let embedded = node
        .inference
        .embed(&target, vec!["served again".into()])
        .await
        .unwrap();
    assert_eq!(embedded.worker, node.net.peer_id());
    // The model's blob and every file its manifest lists, pinned.
    let store = node.blobs.store().clone();
    let parts = |store: &mycel_store::BlobStore| {
        let files = store
            .manifest(&id)
            .unwrap()
            .expect("a directory's manifest");
        std::iter::once(id)
            .chain(files.iter().map(|f| f.id))
            .map(|part| store.info(&part).unwrap().unwrap().pinned)
            .collect::<Vec<bool>>()
    };
    assert!(parts(&store).iter().all(|p| *p), "{:?}", parts(&store));
    drop(store);
    node.shutdown().await;

    let node = restart(node_config(false)).await;
    wait_until(LIMIT, "the blobs of the model are unpinned", || async {
        parts(node.blobs.store()).iter().all(|p| !p)
    })
    .await;
    assert!(node.models.offers().is_empty());
    node.shutdown().await;
    // Forgotten: with on-demand serving back on it is not served again by itself.
    let node = restart(node_config(true)).await;
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        assert!(
            node.models.offers().is_empty(),
            "served again after it was released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.shutdown().await;
}

/// A real libp2p peer that claims to provide `id` and then never answers: it reads each
/// request and holds the stream open in silence.
async fn silent_provider(bootstrap: Vec<Multiaddr>, id: ContentId) -> NetHandle {
    let net = common::raw_peer(bootstrap).await;
    let mut incoming = net.accept_streams(BLOB_PROTOCOL).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((_, mut stream)) = incoming.next().await {
            let _ = read_frame::<BlobRequest>(&mut stream, MAX_BLOB_REQUEST_BYTES).await;
            held.push(stream);
        }
    });
    net.provide(vec![id]).await.unwrap();
    net
}

/// Provider records are anyone's claim: two silent "providers" named before the honest one
/// cost the fetch no request timeout (20 s each when they were asked one after another), and
/// an id nobody holds fails within the lookup deadline, saying so, not after the fetch
/// deadline (10 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_providers_do_not_delay_a_fetch_and_an_id_nobody_holds_fails_soon() {
    let root = tempfile::tempdir().unwrap();
    let honest = start(&root.path().join("honest"), vec![], None).await;
    let data = bytes(3 * CHUNK_BYTES, 6);
    let file = root.path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let id = honest.blobs.import_path(&file, true).await.unwrap();
    let silent = [
        silent_provider(addrs_of(&honest), id).await,
        silent_provider(addrs_of(&honest), id).await,
    ];
    let mut config = config(&root.path().join("fetcher"), addrs_of(&honest), None);
    config.blobs.lookup_deadline = Duration::from_secs(2);
    let fetcher = Node::start(config).await.unwrap();
    for peer in silent
        .iter()
        .map(|s| s.peer_id())
        .chain([honest.net.peer_id()])
    {
        wait_provider(&fetcher, id, peer).await;
    }
    let hints = [
        silent[0].peer_id(),
        silent[1].peer_id(),
        honest.net.peer_id(),
    ];
    let started = std::time::Instant::now();
    let blob = fetcher
        .blobs
        .fetch(id, &hints, false, &Progress::default())
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(blob.size, data.len() as u64);
    assert!(took < Duration::from_secs(10), "the fetch took {took:?}");
    let excluded = mycel_node::defences::BLOB_PROVIDER_EXCLUDED;
    assert!(fetcher.blobs.defences.total(excluded) >= 1);

    let nobody = ContentId([9; 32]);
    let started = std::time::Instant::now();
    let err = fetcher
        .blobs
        .fetch(nobody, &[], false, &Progress::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no peer holds it"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_never_serves_a_chunk_its_disk_changed_and_repairs_the_blob_from_a_peer() {
    let root = tempfile::tempdir().unwrap();
    let a = start(&root.path().join("a"), vec![], None).await;
    let mut with_api = config(&root.path().join("b"), addrs_of(&a), None);
    with_api.api = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let b = Node::start(with_api).await.unwrap();
    let data = bytes(4 * CHUNK_BYTES + 99, 7);
    let file = root.path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let id = a.blobs.import_path(&file, true).await.unwrap();
    wait_provider(&b, id, a.net.peer_id()).await;
    b.blobs
        .fetch(id, &[], true, &Progress::default())
        .await
        .unwrap();

    // Bit rot in chunk 2 of B's copy.
    let hex: String = id.0.iter().map(|b| format!("{b:02x}")).collect();
    let path = root.path().join("b/blobs/data").join(&hex[..2]).join(&hex);
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[(2 * CHUNK_BYTES + 5) as usize] ^= 0x40;
    std::fs::write(&path, &on_disk).unwrap();

    // A peer asking B for every chunk gets 0 and 1, then "not found", never the bad bytes.
    let mut stream = a
        .net
        .open_stream(b.net.peer_id(), BLOB_PROTOCOL)
        .await
        .unwrap();
    let request = BlobRequest::Chunks {
        id,
        chunks: vec![0, 1, 2, 3],
    };
    write_frame(&mut stream, &request).await.unwrap();
    for expected in 0..2u64 {
        let frame = read_frame::<BlobFrame>(&mut stream, 1 << 20).await.unwrap();
        let Some(BlobFrame::Chunk { index, len }) = frame else {
            panic!("chunk {expected}: {frame:?}")
        };
        assert_eq!(index, expected);
        let mut chunk = vec![0u8; len as usize];
        futures::AsyncReadExt::read_exact(&mut stream, &mut chunk)
            .await
            .unwrap();
    }
    let frame = read_frame::<BlobFrame>(&mut stream, 1 << 20).await.unwrap();
    assert!(matches!(frame, Some(BlobFrame::NotFound)), "{frame:?}");

    // B takes it out of service, fetches what it lost from A, and holds it whole and pinned.
    wait_until(LIMIT, "B repairs the blob from A", || async {
        b.blobs.stats.repaired.get() >= 1
    })
    .await;
    assert_eq!(b.blobs.stats.corrupt.get(), 1);
    let held = b.blobs.store().info(&id).unwrap().unwrap();
    assert!(held.pinned, "still pinned after the repair");
    assert_eq!(export(&b, &id, &root.path().join("out.bin")), data);

    // Through B's own API. Bit rot in the first chunk: a 503 that names it, before any byte.
    let url = format!("http://{}/api/blobs/{id}", b.api_addr.unwrap());
    let rot = |chunk: u64| {
        let mut on_disk = std::fs::read(&path).unwrap();
        on_disk[(chunk * CHUNK_BYTES + 5) as usize] ^= 0x40;
        std::fs::write(&path, &on_disk).unwrap();
    };
    rot(0);
    let (u, token) = (url.clone(), b.token.clone());
    let (status, body) = tokio::task::spawn_blocking(move || common::http_get(&u, Some(&token)))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("blob_corrupt"), "{body}");
    wait_until(LIMIT, "B repairs the blob again", || async {
        b.blobs.stats.repaired.get() >= 2
    })
    .await;
    // In a later chunk: the body stops short of its length (a failed transfer), and what came
    // is the blob's own bytes.
    rot(3);
    let token = b.token.clone();
    let got = tokio::task::spawn_blocking(move || {
        let mut response = ureq::get(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let mut got = Vec::new();
        let read = std::io::Read::read_to_end(&mut response.body_mut().as_reader(), &mut got);
        (read.is_err(), got)
    })
    .await
    .unwrap();
    assert!(got.0, "the transfer fails");
    assert!(got.1.len() <= 3 * CHUNK_BYTES as usize, "{}", got.1.len());
    assert_eq!(got.1, data[..got.1.len()], "never a wrong byte");
    for node in [a, b] {
        node.shutdown().await;
    }
}
