//! Where the models a node serves come from: paths given at start (their files published as
//! a blob whose id is the model's id, so peers can fetch them), blobs fetched by content id,
//! and, when the node serves on demand, any model id a request names that the node lacks.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use mycel_core::id::ContentId;
use mycel_ml::{BatchLimits, Engine};
use mycel_net::NetHandle;
use mycel_store::Store;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::blobs::{BlobService, FetchError, Progress};
use crate::models::{self, ModelService};
use crate::system;

/// Models fetched on demand at once; further demands wait for a later request.
const MAX_DEMANDS: usize = 2;

/// The most bytes of models served on demand at once, unless configured.
pub const DEFAULT_ON_DEMAND_QUOTA: u64 = 8 << 30;

/// How long an id whose model failed to load on demand, or would have passed the quota, is
/// not fetched again.
const REFUSAL_HOLD: Duration = Duration::from_secs(600);

/// Most ids remembered as refused.
const MAX_REFUSED: usize = 1024;

/// How often, and how long apart, a restart waits for a load slot to serve again a model
/// served on demand before.
const RESTORE_WAITS: usize = 60;
const RESTORE_WAIT: Duration = Duration::from_millis(500);

/// How long an on-demand load looks for holders of the id before it gives up.
const DEMAND_LOOKUP: Duration = Duration::from_secs(5);

/// How a demanded model's load ended (`None` while it runs).
pub type Demand = watch::Receiver<Option<Result<(), String>>>;

/// Fetches, loads, publishes and serves models.
#[derive(Debug)]
pub struct ModelSupply {
    blobs: Arc<BlobService>,
    models: Arc<ModelService>,
    net: NetHandle,
    sys_root: PathBuf,
    extra: system::Extra,
    models_dir: PathBuf,
    engine: Engine,
    /// How much generation models decode at once.
    batch: BatchLimits,
    on_demand: bool,
    /// The only ids served on demand (empty: any).
    allowed: Vec<ContentId>,
    demands: Mutex<HashMap<ContentId, Demand>>,
    /// Most bytes of models served on demand (models are never unloaded: since the start).
    quota: u64,
    /// The bytes of each model served on demand, or being loaded.
    held: Mutex<HashMap<ContentId, u64>>,
    /// Ids whose model failed to load or would have passed the quota, until when they are
    /// not fetched again.
    refused: Mutex<HashMap<ContentId, tokio::time::Instant>>,
    /// Where the models served on demand are recorded, to be served again after a restart
    /// (let go when the node stops: see [`ModelSupply::release_store`]).
    state: Mutex<Option<Arc<Store>>>,
}

impl ModelSupply {
    /// The supply of a node whose fetched models live under `data_dir/models`, loaded with
    /// `engine`; `on_demand`: requests for model ids it lacks fetch and serve them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        blobs: Arc<BlobService>,
        models: Arc<ModelService>,
        net: NetHandle,
        sys_root: PathBuf,
        extra: system::Extra,
        data_dir: &Path,
        engine: Engine,
        on_demand: bool,
    ) -> Self {
        Self {
            blobs,
            models,
            net,
            sys_root,
            extra,
            models_dir: data_dir.join("models"),
            engine,
            batch: BatchLimits::default(),
            on_demand,
            allowed: Vec::new(),
            demands: Mutex::new(HashMap::new()),
            quota: DEFAULT_ON_DEMAND_QUOTA,
            held: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            state: Mutex::new(None),
        }
    }

    /// Records the models served on demand in `state`, to serve them again after a restart
    /// (see [`ModelSupply::restore`]).
    pub fn remembering(self, state: Arc<Store>) -> Self {
        *lock(&self.state) = Some(state);
        self
    }

    /// Lets go of the state database (the node is stopping: it must close, while requests
    /// may still hold this supply).
    pub fn release_store(&self) {
        lock(&self.state).take();
    }

    /// Serves at most `quota` bytes of models on demand.
    pub fn with_quota(mut self, quota: u64) -> Self {
        self.quota = quota;
        self
    }

    /// Serves on demand only the model ids in `allowed` (empty: any a request names).
    pub fn allowing(mut self, allowed: Vec<ContentId>) -> Self {
        self.allowed = allowed;
        self
    }

    /// Whether requests for models this node lacks make it fetch and serve them.
    pub fn serves_on_demand(&self) -> bool {
        self.on_demand
    }

    /// Fetches the model blob `id` (a GGUF file, or a directory's manifest and its files),
    /// pinned, and lays it out under `<data dir>/models/` (hard links into the blob store, no
    /// copies); returns the path to load. `progress` shows the fetch.
    pub async fn fetch(&self, id: ContentId, progress: &Progress) -> anyhow::Result<PathBuf> {
        self.blobs
            .fetch_tree(id, &[], true, progress)
            .await
            .with_context(|| format!("fetching the model {id}"))?;
        self.link_out(id).await
    }

    /// Lays out the model blob `id`, held here whole, under `<data dir>/models/` (unless it
    /// is there already); returns the path to load.
    async fn link_out(&self, id: ContentId) -> anyhow::Result<PathBuf> {
        let store = self.blobs.store().clone();
        let models = self.models_dir.clone();
        let hex = id
            .to_string()
            .replace(mycel_core::id::CONTENT_ID_PREFIX, "");
        tokio::task::spawn_blocking(move || -> anyhow::Result<PathBuf> {
            std::fs::create_dir_all(&models)?;
            let target = match store.manifest(&id)? {
                Some(_) => models.join(&hex),
                None => models.join(format!("{hex}.gguf")),
            };
            if !target.exists() {
                let part = models.join(format!("{hex}.part"));
                if part.exists() {
                    let _ = std::fs::remove_dir_all(&part);
                    let _ = std::fs::remove_file(&part);
                }
                store.link_out(&id, &part)?;
                std::fs::rename(&part, &target)?;
            }
            Ok(target)
        })
        .await?
    }

    /// Loads the model at `path` and serves it from now on: announced, provided in the DHT,
    /// run for local and remote tasks, its files published as a blob. Returns its id.
    pub async fn serve(&self, path: PathBuf, engine: Engine) -> anyhow::Result<ContentId> {
        self.serve_loaded(load(path, engine, self.batch).await?)
            .await
    }

    /// Generation models it loads decode within `limits`.
    pub fn batching(mut self, limits: BatchLimits) -> Self {
        self.batch = limits;
        self
    }

    /// Serves a model already loaded (see [`ModelSupply::serve`]).
    async fn serve_loaded(&self, served: models::Served) -> anyhow::Result<ContentId> {
        let (id, source) = (served.offer.id, served.source.clone());
        self.models.add(served);
        self.blobs.provide_also([id]).await;
        let capabilities = system::read_capabilities(&self.sys_root, &self.models, &self.extra);
        self.net.refresh_capabilities(capabilities).await?;
        self.publish(&source, id).await?;
        Ok(id)
    }

    /// Stores the files of the model loaded from `path` ([`models::Served::source`]: for a
    /// model named on the hub, the hub cache) as the blob `id` (the model's id: the file
    /// itself, or a manifest of exactly the files the model is loaded from), pinned, so that
    /// peers can fetch the model. Nothing is done when the blob is already held.
    pub async fn publish(&self, path: &Path, id: ContentId) -> anyhow::Result<()> {
        let store = self.blobs.store().clone();
        let shown = path.display().to_string();
        let path = path.to_path_buf();
        let published = tokio::task::spawn_blocking(move || -> anyhow::Result<ContentId> {
            if store.info(&id)?.is_some() {
                store.set_pinned(&id, true)?;
                return Ok(id);
            }
            let now = mycel_net::now_ms();
            Ok(if path.is_file() {
                store.import_path(&path, now, true)?
            } else {
                store.import_files(&path, &mycel_ml::embed::EMBEDDER_FILES, now, true)?
            })
        })
        .await??;
        anyhow::ensure!(
            published == id,
            "the files of {shown} hash to {published}, not to the model's id {id}"
        );
        self.blobs.announce().await;
        Ok(())
    }

    /// Starts fetching and serving model `id`, or joins the load already under way. Returns
    /// `None` when the node does not serve on demand, not this id, already runs its most
    /// loads, or the id's model failed to load or would have passed the quota lately.
    pub fn demand(self: &Arc<Self>, id: ContentId) -> Option<Demand> {
        if !self.on_demand || !(self.allowed.is_empty() || self.allowed.contains(&id)) {
            return None;
        }
        let now = tokio::time::Instant::now();
        if lock(&self.refused)
            .get(&id)
            .is_some_and(|until| *until > now)
        {
            return None;
        }
        let mut demands = lock(&self.demands);
        if let Some(under_way) = demands.get(&id) {
            return Some(under_way.clone());
        }
        if demands.len() >= MAX_DEMANDS {
            return None;
        }
        let (done, demand) = watch::channel(None);
        demands.insert(id, demand.clone());
        let supply = self.clone();
        tokio::spawn(async move {
            let outcome = supply.fetch_and_serve(id).await;
            match &outcome {
                Ok(()) => info!(%id, "model fetched and served on demand"),
                Err(e) => warn!(%id, "cannot serve the model on demand: {e:#}"),
            }
            lock(&supply.demands).remove(&id);
            let _ = done.send(Some(outcome.map_err(|e| format!("{e:#}"))));
        });
        Some(demand)
    }

    /// Serves again the models served on demand when the node last ran, from the blobs kept
    /// here (one after another, each as a demand: the quota and the load checks apply), and
    /// forgets those it no longer serves on demand (the flag off, or the id no longer
    /// allowed; their blobs are unpinned, cache like any other) or now serves from its
    /// configuration.
    pub async fn restore(self: &Arc<Self>) {
        let ids = match self.on_state(|state| state.on_demand()).await {
            Ok(ids) => ids,
            Err(e) => {
                warn!("cannot read the models served on demand before: {e:#}");
                return;
            }
        };
        for id in ids {
            if self.models.offers().iter().any(|o| o.id == id) {
                // Served from the configuration now: its blobs are that model's.
                if let Err(e) = self.remember(id, false).await {
                    warn!(%id, "cannot forget the model served on demand: {e:#}");
                }
            } else if self.on_demand && (self.allowed.is_empty() || self.allowed.contains(&id)) {
                // Peers' demands may hold the load slots for a while.
                let mut demand = self.demand(id);
                for _ in 0..RESTORE_WAITS {
                    if demand.is_some() {
                        break;
                    }
                    tokio::time::sleep(RESTORE_WAIT).await;
                    demand = self.demand(id);
                }
                let outcome = match demand {
                    Some(demand) => settled(demand).await,
                    None => Err("no load slot came free".into()),
                };
                // A load that failed released it (unpinned, forgotten); one over the quota or
                // that could not start stays recorded and pinned, for the next start.
                if let Err(e) = outcome {
                    warn!(%id, "cannot serve again the model served on demand before: {e}");
                }
            } else {
                // Unpinned first: a crash in between leaves it recorded, released next time.
                let forgotten = async {
                    self.set_tree_pinned(id, false).await?;
                    self.remember(id, false).await
                };
                match forgotten.await {
                    Ok(()) => info!(%id, "no longer served on demand: its blobs are unpinned"),
                    Err(e) => warn!(%id, "cannot release the model served on demand: {e:#}"),
                }
            }
        }
    }

    /// Records (or forgets) that the model `id` is served on demand; an error once the node
    /// is stopping (the database let go).
    async fn remember(&self, id: ContentId, served: bool) -> anyhow::Result<()> {
        self.on_state(move |state| match served {
            true => state.put_on_demand(&id),
            false => state.remove_on_demand(&id),
        })
        .await
    }

    /// Whether the model `id` is recorded as served on demand.
    async fn recorded(&self, id: ContentId) -> bool {
        self.on_state(|state| state.on_demand())
            .await
            .is_ok_and(|ids| ids.contains(&id))
    }

    /// Runs `f` on the state database on the blocking pool; an error once the node is
    /// stopping (the database let go).
    async fn on_state<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, mycel_store::StoreError> + Send + 'static,
    ) -> anyhow::Result<T> {
        let state = lock(&self.state)
            .clone()
            .context("the node is stopping: the models served on demand are not recorded")?;
        Ok(tokio::task::spawn_blocking(move || f(&state)).await??)
    }

    async fn fetch_and_serve(&self, id: ContentId) -> anyhow::Result<()> {
        // A quick look first: an id nobody holds must not keep a load slot for the whole
        // fetch deadline. (One held here whole, as after a restart, needs nobody.)
        let store = self.blobs.store().clone();
        let held_here = tokio::task::spawn_blocking(move || store.info(&id))
            .await??
            .is_some();
        if !held_here {
            let holders = tokio::time::timeout(DEMAND_LOOKUP, self.net.find_providers(id))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let own = self.net.peer_id();
            anyhow::ensure!(holders.iter().any(|p| *p != own), "no peer holds {id}");
        }
        // Nothing more fits: not even fetched. What fits is fetched no further than the room
        // left (a model found larger is refused before its data is asked for).
        let room = {
            let held = lock(&self.held);
            let bytes: u64 = held.values().sum();
            if bytes >= self.quota {
                self.blobs
                    .defences
                    .count(crate::defences::ON_DEMAND_OVER_QUOTA);
                return Err(self.refuse(
                    id,
                    OverQuota {
                        id,
                        size: None,
                        held: bytes,
                        models: held.len(),
                        quota: self.quota,
                    }
                    .into(),
                ));
            }
            self.quota - bytes
        };
        // Whoever asked chose the id: what it names may be no model at all. It is kept
        // unpinned until it loads, and what of it this fetch brought is dropped if it does
        // not: the blobs held here before (the root, and for a directory the files its
        // manifest lists, read once the root is here) are left as they were.
        self.blobs
            .fetch_within(id, &[], false, &Progress::default(), room)
            .await
            .map_err(|e| self.fetch_failed(id, e))?;
        let store = self.blobs.store().clone();
        let held_before = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut held = HashSet::new();
            if held_here {
                held.insert(id);
            }
            for entry in store.manifest(&id)?.unwrap_or_default() {
                if store.info(&entry.id)?.is_some() {
                    held.insert(entry.id);
                }
            }
            Ok(held)
        })
        .await??;
        if let Err(e) = self
            .blobs
            .fetch_tree_within(id, &[], false, &Progress::default(), room)
            .await
        {
            // Nothing of it is linked or pinned yet.
            if let Err(cleanup) = self.drop_tree(id, None, held_before).await {
                warn!(%id, "cannot drop what was fetched for a failed fetch: {cleanup:#}");
            }
            return Err(self.fetch_failed(id, e));
        }
        let path = self.link_out(id).await?;
        // Recorded before anything of it is pinned (serving publishes it, which pins its
        // blob): a crash after leaves a record whose blobs the next start serves again or
        // releases, never pinned blobs nothing accounts for.
        let outcome = async {
            self.reserve(id).await?;
            let served = load(path.clone(), self.engine, self.batch).await?;
            anyhow::ensure!(
                served.offer.id == id,
                "the blob {id} holds the model {}, not {id}",
                served.offer.id
            );
            self.remember(id, true).await?;
            self.serve_loaded(served).await?;
            self.set_tree_pinned(id, true).await
        }
        .await;
        let Err(e) = outcome else {
            return Ok(());
        };
        let over_quota = e.is::<OverQuota>();
        self.blobs.defences.count(if over_quota {
            crate::defences::ON_DEMAND_OVER_QUOTA
        } else {
            crate::defences::ON_DEMAND_LOAD_FAILED
        });
        if !over_quota {
            lock(&self.held).remove(&id);
        }
        // Undone whatever of it was done: no longer served, offered or kept.
        if self.models.remove(&id) {
            let capabilities = system::read_capabilities(&self.sys_root, &self.models, &self.extra);
            let _ = self.net.refresh_capabilities(capabilities).await;
        }
        self.blobs.provide_no_longer(id).await;
        // A model recorded before (served again after a restart) that no longer fits the
        // quota stays recorded and pinned, for a start with room; one that no longer loads is
        // released as cache (unpinned, not deleted: its files may be another model's too), the
        // record last. Otherwise what this fetch brought goes.
        let ours = self.recorded(id).await;
        let cleanup = async {
            match (ours, over_quota) {
                (true, true) => {}
                (true, false) => {
                    let link = path.clone();
                    tokio::task::spawn_blocking(move || remove_link(&link)).await??;
                    self.set_tree_pinned(id, false).await?;
                    self.remember(id, false).await?;
                }
                (false, _) => self.drop_tree(id, Some(&path), held_before).await?,
            }
            anyhow::Ok(())
        };
        if let Err(cleanup) = cleanup.await {
            warn!(%id, "cannot drop what was fetched for a failed load: {cleanup:#}");
        }
        Err(self.refuse(id, e))
    }

    /// The fetch of `id` on demand failed: one refused for its size passes the quota (counted,
    /// and the id refused for a while).
    fn fetch_failed(&self, id: ContentId, e: FetchError) -> anyhow::Error {
        let too_large = matches!(e, FetchError::TooLarge { .. });
        let e = anyhow::Error::new(e).context(format!(
            "fetching the model {id}{}",
            if too_large {
                " on demand (raise --on-demand-quota)"
            } else {
                ""
            }
        ));
        if !too_large {
            return e;
        }
        self.blobs
            .defences
            .count(crate::defences::ON_DEMAND_OVER_QUOTA);
        self.refuse(id, e)
    }

    /// Remembers `id` as refused for a while (the error `e` says why), and returns `e`.
    fn refuse(&self, id: ContentId, e: anyhow::Error) -> anyhow::Error {
        let now = tokio::time::Instant::now();
        let mut refused = lock(&self.refused);
        refused.retain(|_, until| *until > now);
        if refused.len() >= MAX_REFUSED {
            if let Some(soonest) = refused
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(k, _)| *k)
            {
                refused.remove(&soonest);
            }
        }
        refused.insert(id, now + REFUSAL_HOLD);
        e
    }

    /// Counts the fetched model `id` against the quota, or refuses it when it would pass it.
    async fn reserve(&self, id: ContentId) -> anyhow::Result<()> {
        let store = self.blobs.store().clone();
        let size = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let mut size = 0u64;
            for part in tree(&store, id)? {
                size = size.saturating_add(store.info(&part)?.map_or(0, |b| b.size));
            }
            Ok(size)
        })
        .await??;
        let mut held = lock(&self.held);
        let others: u64 = held
            .iter()
            .filter(|(model, _)| **model != id)
            .map(|(_, bytes)| *bytes)
            .sum();
        if others.saturating_add(size) > self.quota {
            return Err(OverQuota {
                id,
                size: Some(size),
                held: others,
                models: held.len(),
                quota: self.quota,
            }
            .into());
        }
        held.insert(id, size);
        Ok(())
    }

    /// Pins or unpins the blob `id` and, for a manifest, the files it lists.
    async fn set_tree_pinned(&self, id: ContentId, pinned: bool) -> anyhow::Result<()> {
        let store = self.blobs.store().clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for part in tree(&store, id)? {
                store.set_pinned(&part, pinned)?;
            }
            Ok(())
        })
        .await?
    }

    /// Deletes what an on-demand fetch of `id` brought (the blob and the files its manifest
    /// lists, but none in `held_before` and none another model pinned, and the model's link at
    /// `path`), and stops offering it to peers.
    async fn drop_tree(
        &self,
        id: ContentId,
        link: Option<&Path>,
        held_before: HashSet<ContentId>,
    ) -> anyhow::Result<()> {
        let store = self.blobs.store().clone();
        let link = link.map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            if let Some(link) = link {
                remove_link(&link)?;
            }
            for part in tree(&store, id)? {
                if !held_before.contains(&part) && store.info(&part)?.is_some_and(|b| !b.pinned) {
                    store.remove(&part)?;
                }
            }
            Ok(())
        })
        .await??;
        self.blobs.announce().await;
        Ok(())
    }
}

/// A model served on demand would pass the on-demand quota.
#[derive(Debug, thiserror::Error)]
#[error(
    "serving the model {id}{} on demand would pass the on-demand quota: {held} of {quota} \
     bytes are held by {models} model(s) served on demand (raise --on-demand-quota)",
    size.map(|s| format!(" ({s} bytes)")).unwrap_or_default()
)]
struct OverQuota {
    id: ContentId,
    /// The model's size, when it was fetched to learn it.
    size: Option<u64>,
    held: u64,
    models: usize,
    quota: u64,
}

/// Removes a model's layout under the models directory (hard links into the blob store).
fn remove_link(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads the model at `path` on the blocking pool.
async fn load(path: PathBuf, engine: Engine, batch: BatchLimits) -> anyhow::Result<models::Served> {
    tokio::task::spawn_blocking(move || models::load_model_with(&path, engine, batch)).await?
}

/// The blob `id` and, when it is a manifest, the files it lists.
fn tree(store: &mycel_store::BlobStore, id: ContentId) -> anyhow::Result<Vec<ContentId>> {
    let mut parts = vec![id];
    if let Some(entries) = store.manifest(&id)? {
        parts.extend(entries.iter().map(|e| e.id));
    }
    Ok(parts)
}

/// Waits until `demand` ends.
pub async fn settled(mut demand: Demand) -> Result<(), String> {
    loop {
        if let Some(outcome) = demand.borrow_and_update().clone() {
            return outcome;
        }
        if demand.changed().await.is_err() {
            return Err("the load stopped".into());
        }
    }
}
