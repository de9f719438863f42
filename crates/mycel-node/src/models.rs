//! The models this node serves and the bounded queue they run behind.
//!
//! Models run one at a time on blocking threads (candle uses every core for one forward pass),
//! except generations on the q4 engine: those go to the model's batch thread at once, which
//! decodes every one that runs together in shared passes (`mycel_ml::BatchLimits`).
//! At most `max_queue` requests wait or run; past that a request is refused at once, so a
//! router can go elsewhere instead of queueing behind a busy node.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use mycel_core::queue::{QueueShares, Requester};
use mycel_core::statement::{ModelKind, ModelOffer};
use mycel_core::task::TokenLogprobs;
use mycel_ml::{
    BatchLimits, ChatMessage, Embedder, Engine, GenerateParams, Generation, Generator, MlError,
    Resume,
};
use mycel_net::PeerId;

use tokio::sync::{mpsc, Semaphore};

/// Requests waiting or running, at most, by default.
pub const DEFAULT_MAX_QUEUE: usize = 16;

/// How a served model runs.
#[derive(Debug, Clone)]
pub enum Runner {
    /// An embedding model.
    Embed(Arc<Embedder>),
    /// A generation model.
    Generate(Arc<Generator>),
    /// A generation model served by another server beside this node.
    Upstream(Arc<crate::upstream::Upstream>),
}

/// How long a request waits for a chat template (for a template slot, then for the template)
/// before it fails. The template's fuel bounds the work it can do whatever the clock says: one
/// past this limit keeps its thread and its slot until it ends or its fuel does.
pub const TEMPLATE_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Chat templates that may run at once in this process: a template that outlives its request
/// still holds its slot, so requests that time out cannot pile up threads on the blocking
/// pool (which the store's I/O needs too).
const TEMPLATE_SLOTS: usize = 4;
static TEMPLATES: Semaphore = Semaphore::const_new(TEMPLATE_SLOTS);

/// The prompt for `messages` by `model`'s chat template, worked out on the blocking pool: a
/// template comes with the model file and may run long (up to its fuel and
/// [`TEMPLATE_TIME_LIMIT`]), not on the async runtime that serves the API and the network.
/// (The engine tokenises it, once, when it runs the task.)
pub async fn chat_prompt(
    model: &Arc<Generator>,
    messages: &[mycel_ml::ChatMessage],
) -> Result<String, MlError> {
    chat_prompt_within(model, messages, TEMPLATE_TIME_LIMIT).await
}

/// [`chat_prompt`] with the template's time limit `limit`.
pub async fn chat_prompt_within(
    model: &Arc<Generator>,
    messages: &[mycel_ml::ChatMessage],
    limit: std::time::Duration,
) -> Result<String, MlError> {
    let failed =
        |e: tokio::task::JoinError| MlError::Run(format!("preparing the prompt failed: {e}"));
    let (templating, messages) = (model.clone(), messages.to_vec());
    let render = async move {
        let slot = TEMPLATES
            .acquire()
            .await
            .map_err(|e| MlError::Run(format!("no template slot: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            templating.chat_prompt(&messages)
        })
        .await
        .map_err(failed)?
    };
    match tokio::time::timeout(limit, render).await {
        Ok(rendered) => rendered,
        Err(_) => Err(MlError::Input(format!(
            "the model's chat template ran past its time limit ({} ms)",
            limit.as_millis()
        ))),
    }
}

/// Whether `e` is a chat template stopped at its fuel or its time limit.
pub fn template_limit(e: &MlError) -> bool {
    matches!(e, MlError::Input(m) if m.contains("chat template")
        && (m.contains("fuel") || m.contains("time limit")))
}

/// A model this node serves.
#[derive(Debug, Clone)]
pub struct Served {
    /// What is announced about it.
    pub offer: ModelOffer,
    /// The loaded model.
    pub runner: Runner,
    /// The local file or folder it was loaded from (for a model named on the hub, its place
    /// in the hub cache): what is published as its blob.
    pub source: std::path::PathBuf,
}

/// Why a request was not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The queue is full: try another node or later.
    #[error("this node's queue is full ({0} requests); try again later")]
    Busy(usize),
    /// The model refused the input or failed.
    #[error(transparent)]
    Model(#[from] MlError),
    /// It cannot run now through no fault of its own (an upstream server that is down).
    #[error("{0}")]
    Unavailable(String),
}

/// The node's models and their queue.
#[derive(Debug)]
pub struct ModelService {
    /// The served models: a snapshot replaced whole when one is added.
    models: std::sync::RwLock<Arc<Vec<Served>>>,
    queue: Arc<Mutex<QueueShares<PeerId>>>,
    worker: Arc<Semaphore>,
    /// Where peers refused past their share are counted.
    defences: crate::defences::Defences,
    /// Embedding requests at once share runs (otherwise: one at a time, with the cores).
    embed_together: bool,
}

/// Loads one model: a `.gguf` file is a generation model, a directory with config.json,
/// model.safetensors and tokenizer.json an embedding model.
/// `hf:ORG/REPO[/FILE]` is fetched from the Hugging Face hub first.
pub fn load_model(path: &Path, engine: Engine) -> anyhow::Result<Served> {
    load_model_with(path, engine, BatchLimits::default())
}

/// [`load_model`], a generation model on the q4 engine decoding within `batch`.
pub fn load_model_with(path: &Path, engine: Engine, batch: BatchLimits) -> anyhow::Result<Served> {
    let name = path.to_string_lossy();
    if mycel_ml::hub::is_hub_name(&name) {
        let local = mycel_ml::hub::fetch(&name)?;
        let mut served = load_model_with(&local, engine, batch)?;
        if local.is_dir() {
            // The snapshot folder is named by commit: call the model by its repository.
            served.offer.name = name
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(&name)
                .to_owned();
        }
        return Ok(served);
    }
    let what = || format!("cannot load the model at {}", path.display());
    if path.is_file() {
        let generator = Generator::load_with(path, engine, batch).with_context(what)?;
        Ok(Served {
            offer: ModelOffer {
                id: generator.id(),
                name: generator.name().to_owned(),
                kind: ModelKind::Generation,
                engine: engine.name().to_owned(),
            },
            runner: Runner::Generate(Arc::new(generator)),
            source: path.to_path_buf(),
        })
    } else if path.is_dir() {
        let embedder = Embedder::load(path).with_context(what)?;
        Ok(Served {
            offer: ModelOffer {
                id: embedder.id(),
                name: embedder.name().to_owned(),
                kind: ModelKind::Embedding,
                engine: mycel_ml::embed::f32_engine().to_owned(),
            },
            runner: Runner::Embed(Arc::new(embedder)),
            source: path.to_path_buf(),
        })
    } else {
        anyhow::bail!(
            "no model at {}: pass a .gguf file (generation), a directory with config.json, \
             model.safetensors and tokenizer.json (embeddings), or hf:ORG/REPO[/FILE.gguf]; \
             `bash scripts/fetch-models.sh` fetches the reference models into .cache/models",
            path.display()
        )
    }
}

impl ModelService {
    /// Serves already loaded models.
    pub fn new(models: Vec<Served>, max_queue: usize) -> Self {
        Self {
            models: std::sync::RwLock::new(Arc::new(models)),
            queue: Arc::new(Mutex::new(QueueShares::new(max_queue))),
            worker: Arc::new(Semaphore::new(1)),
            defences: Default::default(),
            embed_together: true,
        }
    }

    /// Whether embedding requests at once share runs (the default) or run one at a time
    /// with the cores to themselves (benchmarks compare the two).
    pub fn embedding_together(mut self, together: bool) -> Self {
        self.embed_together = together;
        self
    }

    /// Counts what the queue turns away in `defences`.
    pub fn counting(mut self, defences: crate::defences::Defences) -> Self {
        self.defences = defences;
        self
    }

    /// What to announce.
    pub fn offers(&self) -> Vec<ModelOffer> {
        self.models().iter().map(|m| m.offer.clone()).collect()
    }

    /// Every served model (a snapshot).
    pub fn models(&self) -> Arc<Vec<Served>> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops serving every model with id `id`; whether one was served.
    pub fn remove(&self, id: &mycel_core::id::ContentId) -> bool {
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        let kept: Vec<Served> = models
            .iter()
            .filter(|m| m.offer.id != *id)
            .cloned()
            .collect();
        let removed = kept.len() != models.len();
        *models = Arc::new(kept);
        removed
    }

    /// Serves one more model (a model with the same id and engine is not served twice).
    pub fn add(&self, served: Served) {
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        if models
            .iter()
            .any(|m| m.offer.id == served.offer.id && m.offer.engine == served.offer.engine)
        {
            return;
        }
        let mut more = models.as_ref().clone();
        more.push(served);
        *models = Arc::new(more);
    }

    /// The model called `name`, or whose content id is `name`.
    pub fn find(&self, name: &str) -> Option<Served> {
        self.models()
            .iter()
            .find(|m| m.offer.name == name || m.offer.id.to_string() == name)
            .cloned()
    }

    /// Requests waiting or running.
    pub fn queue_depth(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).held()
    }

    /// Places in the queue.
    fn queue_places(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).max()
    }

    /// Takes a place in the queue for `who`, or says at once that there is none: a quarter
    /// of the places is kept for the node's own users, and one peer holds at most half
    /// (mycel-core's `queue`).
    pub fn admit(&self, who: Requester<PeerId>) -> Result<Admission, RunError> {
        let mut shares = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        shares.take(&who).map_err(|e| {
            if matches!(e, mycel_core::queue::QueueFull::PeerShare(_)) {
                self.defences.count(crate::defences::MODEL_QUEUE_PAST_SHARE);
            }
            RunError::Busy(shares.max())
        })?;
        Ok(Admission {
            shares: self.queue.clone(),
            who,
        })
    }

    /// Runs `work` on a blocking thread when its turn comes (at once when it does not need
    /// the cores to itself: it hands its work to a batch); returns its result and how long
    /// it waited for its turn, in milliseconds. If the caller stops waiting (the client went
    /// away), `work` is told through the flag it is given and its places are released only
    /// when it has returned.
    async fn run<T: Send + 'static>(
        &self,
        admission: Admission,
        alone: bool,
        work: impl FnOnce(&Arc<AtomicBool>) -> Result<T, MlError> + Send + 'static,
    ) -> Result<(T, f64), RunError> {
        let queued = std::time::Instant::now();
        let turn = match alone {
            true => Some(
                self.worker
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| RunError::Busy(self.queue_places()))?,
            ),
            false => None,
        };
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancelled.clone());
        let queue_ms = queued.elapsed().as_secs_f64() * 1e3;
        let task = tokio::task::spawn_blocking(move || {
            let _places = (admission, turn);
            work(&cancelled)
        });
        match task.await {
            Ok(result) => Ok((result?, queue_ms)),
            Err(e) => Err(RunError::Model(MlError::Run(format!(
                "the model task failed: {e}"
            )))),
        }
    }

    /// Embeds `texts` with `model`: the vectors, the tokens read and the time queued (ms).
    /// Requests at once are embedded together (`Embedder::embed_together`), each with the
    /// vectors it gets alone.
    pub async fn embed(
        &self,
        admission: Admission,
        model: Arc<Embedder>,
        texts: Vec<String>,
    ) -> Result<((Vec<Vec<f32>>, usize), f64), RunError> {
        if !self.embed_together {
            return self
                .run(admission, true, move |_| model.embed(&texts))
                .await;
        }
        // The caller that runs a batch takes the cores as other work that needs them does.
        let (worker, runtime) = (self.worker.clone(), tokio::runtime::Handle::current());
        let turn = move || runtime.block_on(worker.clone().acquire_owned()).ok();
        let result = self
            .run(admission, false, move |stop| {
                let (result, waited) = model.embed_together(texts, stop, turn);
                result.map(|embedded| (embedded, waited))
            })
            .await;
        // The wait for a run is queueing too.
        result.map(|((embedded, waited), queued)| (embedded, queued + waited))
    }

    /// Generates with `model`, picking up after `resume`; text goes to `stream` as it is
    /// made, when given. Generation stops early when the receiver is dropped or the caller
    /// stops waiting. Returns the generation and the time queued (ms).
    pub async fn generate(
        &self,
        admission: Admission,
        model: Arc<Generator>,
        prompt: String,
        params: GenerateParams,
        resume: Resume,
        stream: Option<mpsc::Sender<Piece>>,
    ) -> Result<(Generation, f64), RunError> {
        let alone = model.batch_limits().is_none();
        // Cached prompt starts are shared within one requester's requests only (scope 0 is
        // the engine's default, for callers that name none).
        let scope = match &admission.who {
            Requester::Local => 2,
            Requester::Peer(peer) => {
                let digest = blake3::hash(&peer.to_bytes());
                u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes")) | 1
            }
        };
        let result = self
            .run(admission, alone, move |cancelled| {
                let mut sent = resume.tokens.len();
                let mut scored = 0;
                model.generate_scoped(
                    scope,
                    &prompt,
                    &params,
                    &resume,
                    cancelled,
                    |text, tokens, logprobs| {
                        if text.is_empty() {
                            // No text yet: its tokens go with the next piece.
                            return !cancelled.load(Ordering::Relaxed);
                        }
                        let piece = Piece {
                            text: text.to_owned(),
                            tokens: tokens[sent.min(tokens.len())..].to_vec(),
                            logprobs: logprobs[scored.min(logprobs.len())..].to_vec(),
                        };
                        sent = tokens.len();
                        scored = logprobs.len();
                        !cancelled.load(Ordering::Relaxed)
                            && stream
                                .as_ref()
                                .is_none_or(|tx| tx.blocking_send(piece).is_ok())
                    },
                )
            })
            .await;
        // The wait for a slot in the model's batch is queueing too.
        result.map(|(generation, queued)| {
            let waited = generation.waited_ms;
            (generation, queued + waited)
        })
    }
}

/// Where the pieces of a streamed generation go.
pub trait PieceSink {
    /// Takes the next piece; `false` when the receiver has gone (generation then stops).
    fn take(&mut self, piece: Piece) -> impl std::future::Future<Output = bool> + Send;
}

/// Text a generation made, with the tokens made since the previous piece (both empty: a
/// heartbeat, see [`HEARTBEAT`]) and their log-probabilities when the generation asked for
/// them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Piece {
    /// New text.
    pub text: String,
    /// New tokens.
    pub tokens: Vec<u32>,
    /// Their log-probabilities, one per token, when asked for.
    pub logprobs: Vec<TokenLogprobs>,
}

/// How long a generation handed to a sink may make no piece before the sink gets an empty
/// one: a requester waiting on a peer's stream tells a worker whose batch is busy (reading a
/// newcomer's prompt, a large model's slow step) from one that is frozen
/// (`mycel_core::pace`).
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(500);

impl ModelService {
    /// Generates like [`ModelService::generate`], handing each piece to `sink` as it comes
    /// (and an empty piece after [`HEARTBEAT`] without one); `Ok(None)` when the sink's
    /// receiver went away (the generation was stopped).
    pub async fn generate_into(
        &self,
        admission: Admission,
        model: Arc<Generator>,
        prompt: String,
        params: GenerateParams,
        resume: Resume,
        sink: &mut impl PieceSink,
    ) -> Result<Option<(Generation, f64)>, RunError> {
        let (tx, rx) = mpsc::channel::<Piece>(64);
        let generation = self.generate(admission, model, prompt, params, resume, Some(tx));
        pump(generation, rx, sink).await
    }

    /// Generates `messages` with the upstream server `upstream` like
    /// [`ModelService::generate_into`] (no cores of this node taken: the server computes).
    pub async fn upstream_into(
        &self,
        admission: Admission,
        upstream: Arc<crate::upstream::Upstream>,
        messages: Vec<ChatMessage>,
        params: GenerateParams,
        resume: Resume,
        sink: &mut impl PieceSink,
    ) -> Result<Option<(Generation, f64)>, RunError> {
        use crate::upstream::Failure;
        let (tx, rx) = mpsc::channel::<Piece>(64);
        let generation = async move {
            let ran = self.run(admission, false, move |cancelled| {
                Ok(
                    upstream.generate(&messages, &params, &resume, cancelled, |text| {
                        let piece = Piece {
                            text: text.to_owned(),
                            ..Piece::default()
                        };
                        !cancelled.load(Ordering::Relaxed) && tx.blocking_send(piece).is_ok()
                    }),
                )
            });
            match ran.await? {
                (Ok(generation), queued) => Ok((generation, queued)),
                (Err(Failure::Model(e)), _) => Err(RunError::Model(e)),
                (Err(Failure::Unavailable(why)), _) => Err(RunError::Unavailable(why)),
            }
        };
        pump(generation, rx, sink).await
    }
}

/// Hands the pieces a generation sends on `rx` to `sink` as they come (an empty one after
/// [`HEARTBEAT`] without one) until `generation` ends; `Ok(None)` when the sink's receiver
/// went away (dropping the generation stops it).
async fn pump(
    generation: impl std::future::Future<Output = Result<(Generation, f64), RunError>>,
    mut rx: mpsc::Receiver<Piece>,
    sink: &mut impl PieceSink,
) -> Result<Option<(Generation, f64)>, RunError> {
    tokio::pin!(generation);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut took = false;
    let result = loop {
        tokio::select! {
            Some(piece) = rx.recv() => {
                took = true;
                // Dropping the generation stops it.
                if !sink.take(piece).await {
                    return Ok(None);
                }
            }
            _ = beat.tick() => {
                if !std::mem::take(&mut took) && !sink.take(Piece::default()).await {
                    return Ok(None);
                }
            }
            result = &mut generation => break result,
        }
    };
    while let Ok(piece) = rx.try_recv() {
        if !sink.take(piece).await {
            return Ok(None);
        }
    }
    result.map(Some)
}

/// What each generation model's batch has done, read at every scrape of /metrics:
/// `mycel_batch_passes_total`, `mycel_batch_steps_total`, `mycel_batch_prefix_hits_total`
/// and `mycel_batch_prefix_tokens_total`, by model name.
#[derive(Debug)]
pub struct BatchMetrics(pub Arc<ModelService>);

impl prometheus_client::collector::Collector for BatchMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::MetricType;
        let stats: Vec<(String, mycel_ml::BatchStats)> = self
            .0
            .models()
            .iter()
            .filter_map(|m| match &m.runner {
                Runner::Generate(g) => g.batch_stats().map(|s| (m.offer.name.clone(), s)),
                Runner::Embed(_) | Runner::Upstream(_) => None,
            })
            .collect();
        // Name, help, and the count.
        type Count = (&'static str, &'static str, fn(&mycel_ml::BatchStats) -> u64);
        let counts: [Count; 4] = [
            (
                "mycel_batch_passes",
                "Forward passes of a model's batch",
                |s| s.passes,
            ),
            (
                "mycel_batch_steps",
                "Requests' steps in those passes (a pass of three requests counts three)",
                |s| s.steps,
            ),
            (
                "mycel_batch_prefix_hits",
                "Requests that started from a cached start of their context",
                |s| s.prefix_hits,
            ),
            (
                "mycel_batch_prefix_tokens",
                "Positions those requests did not read again",
                |s| s.prefix_tokens,
            ),
        ];
        for (name, help, count) in counts {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (model, s) in &stats {
                let labels = [("model", model.as_str())];
                ConstCounter::new(count(s)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A place in a node's queue, held until the request has run.
#[derive(Debug)]
pub struct Admission {
    shares: Arc<Mutex<QueueShares<PeerId>>>,
    who: Requester<PeerId>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(&self.who);
    }
}

struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_show_each_models_batch_and_its_prefix_hits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        mycel_ml::fixtures::write_tiny_llama(&path).unwrap();
        let served = load_model(&path, Engine::Q4).unwrap();
        let Runner::Generate(model) = served.runner.clone() else {
            panic!("a GGUF is a generation model")
        };
        let name = served.offer.name.clone();
        let service = Arc::new(ModelService::new(vec![served], 1));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(BatchMetrics(service)));
        let params = GenerateParams {
            max_tokens: 8,
            ..Default::default()
        };
        let prompt = "<|im_start|>user\nthe cat and the dog<|im_end|>\n<|im_start|>assistant\n";
        for _ in 0..2 {
            model.generate(prompt, &params, |_| true).unwrap();
        }
        let stats = model.batch_stats().unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for (metric, value) in [
            ("mycel_batch_passes_total", stats.passes),
            ("mycel_batch_prefix_hits_total", 1),
            ("mycel_batch_prefix_tokens_total", stats.prefix_tokens),
        ] {
            let line = format!("{metric}{{model=\"{name}\"}} {value}");
            assert!(text.contains(&line), "no {line:?} in\n{text}");
        }
        assert!(stats.passes > 0 && stats.prefix_tokens > 0, "{stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_stream_stops_generation_and_a_full_queue_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        mycel_ml::fixtures::write_tiny_llama(&path).unwrap();
        let served = load_model(&path, Engine::Exact).unwrap();
        let Runner::Generate(model) = served.runner.clone() else {
            panic!("a GGUF is a generation model")
        };
        let service = Arc::new(ModelService::new(vec![served], 1));
        let params = GenerateParams {
            max_tokens: 4000,
            ..Default::default()
        };
        let prompt = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n".to_owned();

        // Left alone, greedy decoding of this prompt runs for hundreds of tokens.
        let (full, _) = service
            .generate(
                service.admit(Requester::Local).unwrap(),
                model.clone(),
                prompt.clone(),
                params.clone(),
                Resume::default(),
                None,
            )
            .await
            .unwrap();
        assert!(full.tokens.len() > 200, "{}", full.tokens.len());

        let (tx, mut rx) = mpsc::channel(1);
        let admission = service.admit(Requester::Local).unwrap();
        assert!(
            matches!(service.admit(Requester::Local), Err(RunError::Busy(1))),
            "one place only"
        );
        let running = {
            let service = service.clone();
            tokio::spawn(async move {
                service
                    .generate(
                        admission,
                        model,
                        prompt,
                        params,
                        Resume::default(),
                        Some(tx),
                    )
                    .await
            })
        };
        rx.recv().await.expect("some text");
        drop(rx);
        let (cut, _) = running.await.unwrap().unwrap();
        assert!(cut.tokens.len() < 20, "stopped early: {}", cut.tokens.len());
        assert_eq!(service.queue_depth(), 0);
        assert!(service.admit(Requester::Local).is_ok());
    }

    #[test]
    fn one_peer_holds_at_most_half_the_queue_and_the_node_keeps_a_quarter() {
        let service = ModelService::new(Vec::new(), 16);
        let (hog, other) = (PeerId::random(), PeerId::random());
        let held: Vec<Admission> = (0..8)
            .map(|_| service.admit(Requester::Peer(hog)).unwrap())
            .collect();
        assert!(
            service.admit(Requester::Peer(hog)).is_err(),
            "half is its share"
        );
        let theirs: Vec<Admission> = (0..4)
            .map(|_| service.admit(Requester::Peer(other)).unwrap())
            .collect();
        assert!(
            service.admit(Requester::Peer(PeerId::random())).is_err(),
            "peers hold the 12 places they may"
        );
        let own: Vec<Admission> = (0..4)
            .map(|_| service.admit(Requester::Local).unwrap())
            .collect();
        assert_eq!(service.queue_depth(), 16);
        drop((held, theirs, own));
        assert_eq!(service.queue_depth(), 0, "every place given back");
    }
}
