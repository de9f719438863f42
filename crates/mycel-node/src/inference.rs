//! Where inference runs: the router that sends a task to the best node serving its model
//! (this one included) and moves it elsewhere when that node fails, and the worker that runs
//! tasks peers send here.
//!
//! Candidates are the nodes whose announcements offer the model (same content id, same
//! engine), or, when no announcement does, the DHT's providers of the model's id. They are
//! ranked by `mycel_core::routing::rank` (reliability with Thompson sampling, load, RTT).
//! A task keeps its id on every attempt. An attempt that errs, times out, is refused or whose
//! worker dies moves on to the next candidate; a generation that dies mid-way resumes on the
//! next one from the tokens already delivered, so the caller sees one uninterrupted stream.
//! Embedding tasks are hedged: when the first attempt takes longer than the observed 95th
//! percentile, a second starts on the next candidate and the first answer wins.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use mycel_core::id::ContentId;
use mycel_core::membership::PeerState;
use mycel_core::naming::{self, Bindings, NameError, Resolved};
use mycel_core::queue::Requester;
use mycel_core::routing::{self, Candidate, Reliability, Weights};
use mycel_core::statement::{ModelKind, ModelOffer};
use mycel_core::task::{
    ChatMessage, Refusal, Resume, TaskFrame, TaskId, TaskInput, TaskOutput, TaskRequest,
    TaskResult, Timings, MAX_FRAME_BYTES, MAX_REQUEST_BYTES, MAX_TASK_BUDGET_MS,
};
use mycel_core::wire::Rejection;
use mycel_core::Keypair;
use mycel_ml::{GenerateParams, Generation, MlError};
use mycel_net::task::{read_frame, write_frame, FrameError, IncomingStreams, Stream};
use mycel_net::{now_ms, NetHandle, PeerId};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc;
use tracing::debug;

use crate::models::{ModelService, Piece, PieceSink, RunError, Runner};
use crate::slots::Slots;
use crate::supply::ModelSupply;

/// Task streams served at once; more are dropped (the requester fails over).
const MAX_INBOUND_TASKS: usize = 256;
/// Task streams served at once for one peer: no peer takes every slot.
const MAX_INBOUND_TASKS_PER_PEER: usize = MAX_INBOUND_TASKS / 8;
/// Latencies remembered for the hedging percentile.
const LATENCY_WINDOW: usize = 200;
/// Latencies needed before hedging starts.
const MIN_LATENCIES: usize = 20;
/// Longest wait for a DHT provider lookup.
const PROVIDER_LOOKUP: Duration = Duration::from_secs(3);

/// How the router behaves.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// How much reliability, load and RTT count.
    pub weights: Weights,
    /// Longest wait for a worker's next message before the task moves on.
    pub attempt_timeout: Duration,
    /// Longest a task may take in all.
    pub deadline: Duration,
    /// Start a second attempt of an embedding task that outlives the observed p95.
    pub hedge: bool,
    /// Outcomes fade by half over this time.
    pub reliability_half_life: Duration,
    /// Which ids a model name may mean, as the operator configured them (the models this
    /// node serves are bound to their names as well).
    pub bindings: Bindings,
    /// The engine preferred for a model peers offer with several engines (this node's own;
    /// counting announcers would let made-up keys choose).
    pub engine: String,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            weights: Weights::default(),
            attempt_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(600),
            hedge: true,
            reliability_half_life: Duration::from_secs(300),
            bindings: Bindings::new(),
            engine: mycel_ml::Engine::default().name().to_owned(),
        }
    }
}

/// Why a task could not be run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    /// Nobody serves a model of that name or id for that kind of task.
    #[error("no node serves a model {0:?} for this kind of task; GET /v1/models lists the models")]
    UnknownModel(String),
    /// Peers announce the name for several models and no binding says which one it means
    /// (the message lists the ids).
    #[error("{0}")]
    AmbiguousModel(String),
    /// The input cannot be run (too long, bad parameters): a 4xx.
    #[error("{0}")]
    Invalid(String),
    /// Every candidate refused for lack of room.
    #[error("every node serving the model is busy; try again shortly")]
    Busy,
    /// Every candidate failed.
    #[error("no node could run the task: {0}")]
    Unavailable(String),
}

/// A model as the router sees it: what is offered, and its local runner if this node serves it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The model's announced description.
    pub offer: ModelOffer,
    /// This node's copy, if it has one.
    pub local: Option<Runner>,
    /// The peers that announced the same model and engine when it was resolved (a snapshot:
    /// resolve again for each request).
    peers: Vec<Candidate<PeerId>>,
}

impl Target {
    /// A model known only by its content id, announced by no peer this node knows: its
    /// candidates are the DHT's providers of the id, whatever engine they run it with.
    pub fn unannounced(id: ContentId, kind: ModelKind) -> Self {
        Self {
            offer: ModelOffer {
                id,
                name: id.to_string(),
                kind,
                engine: String::new(),
            },
            local: None,
            peers: Vec::new(),
        }
    }
}

/// Embeddings and who computed them.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// One unit vector per input.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read.
    pub prompt_tokens: usize,
    /// The node that computed them.
    pub worker: PeerId,
}

/// A completion and who made its last part.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The whole generation.
    pub generation: Generation,
    /// The node that finished it.
    pub worker: PeerId,
    /// Nodes tried, the successful one included.
    pub attempts: usize,
}

/// How one attempt ended.
enum Outcome<T> {
    /// It produced the answer.
    Done(T),
    /// The input is at fault: no other node would do better.
    Final(RouteError),
    /// Try the next candidate; `failed` when the worker is to blame (not when merely busy).
    Retry { reason: String, failed: bool },
}

fn retry<T>(reason: impl Into<String>, failed: bool) -> Outcome<T> {
    Outcome::Retry {
        reason: reason.into(),
        failed,
    }
}

struct RouterState {
    reliability: Reliability<PeerId>,
    rng: StdRng,
    latencies_ms: VecDeque<f64>,
}

/// Counts of what the router has done since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouterStats {
    /// Tasks that completed.
    pub completed: u64,
    /// Attempts that failed or were refused and moved on to another node.
    pub failovers: u64,
    /// Second attempts started because the first was slower than the observed p95.
    pub hedges: u64,
    /// Tasks run on this node.
    pub local: u64,
    /// Tasks run on peers.
    pub remote: u64,
}

/// The node's inference service: router and worker.
pub struct Inference {
    stats: Mutex<RouterStats>,
    net: NetHandle,
    keypair: Keypair,
    models: Arc<ModelService>,
    config: RouterConfig,
    state: Mutex<RouterState>,
    /// Where models come from, when this node serves on demand.
    supply: OnceLock<Arc<ModelSupply>>,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("peer", &self.net.peer_id())
            .finish_non_exhaustive()
    }
}

impl Inference {
    /// The service for a node with identity `keypair`, serving `models`.
    pub fn new(
        net: NetHandle,
        keypair: Keypair,
        models: Arc<ModelService>,
        config: RouterConfig,
    ) -> Self {
        let half_life = config.reliability_half_life.as_millis() as u64;
        Self {
            stats: Mutex::new(RouterStats::default()),
            net,
            keypair,
            models,
            config,
            state: Mutex::new(RouterState {
                reliability: Reliability::new(half_life),
                rng: StdRng::from_entropy(),
                latencies_ms: VecDeque::new(),
            }),
            supply: OnceLock::new(),
        }
    }

    /// Lets requests for models this node lacks fetch and serve them (when `supply` serves
    /// on demand).
    pub fn set_supply(&self, supply: Arc<ModelSupply>) {
        if supply.serves_on_demand() {
            let _ = self.supply.set(supply);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- choosing where ------------------------------------------------------------------

    /// The model called `name` (or with that content id) for tasks of `kind`: this node's if
    /// it serves one; else the id the name is bound to, or the one id peers announce under it
    /// (see `mycel_core::naming`), run with the engine most of its announcers use; with the
    /// peers that offer it.
    pub async fn resolve(&self, name: &str, kind: ModelKind) -> Result<Target, RouteError> {
        let peers = self.net.peers().await.unwrap_or_default();
        let alive = || peers.iter().filter(|p| p.state == PeerState::Alive);
        let offers = || {
            alive()
                .flat_map(|p| p.capabilities.iter().flat_map(|c| &c.models))
                .filter(|o| o.kind == kind)
        };
        // This node's copy of a model of the right kind, by name or id.
        let here = |key: &str| {
            self.models
                .find(key)
                .filter(|s| s.offer.kind == kind)
                .map(|s| (s.offer.clone(), Some(s.runner.clone())))
        };
        let (offer, local) = match here(name) {
            Some(found) => found,
            None => {
                let announced: Vec<(ContentId, &str)> =
                    offers().map(|o| (o.id, o.name.as_str())).collect();
                let resolved = naming::resolve(name, &announced, &self.config.bindings).map_err(
                    |e| match e {
                        NameError::Unknown(_) => RouteError::UnknownModel(name.to_owned()),
                        ambiguous @ NameError::Ambiguous { .. } => {
                            RouteError::AmbiguousModel(ambiguous.to_string())
                        }
                    },
                )?;
                let id = resolved.id();
                if let (None, Some(supply)) = (here(&id.to_string()), self.supply.get()) {
                    // Serving on demand: a model peers announce is fetched in the background
                    // (the request goes to them meanwhile); one nobody announces is fetched
                    // first.
                    let demand = supply.demand(id);
                    if let (Resolved::Unannounced(_), Some(demand)) = (resolved, demand) {
                        if let Err(e) = crate::supply::settled(demand).await {
                            debug!(%id, "not served on demand: {e}");
                        }
                    }
                }
                match here(&id.to_string()) {
                    Some(found) => found,
                    None => {
                        // This node's own engine when peers offer the id with it (keys are
                        // free: a count of announcers would let made-up ones choose), else the
                        // engine most of the id's announcers run it with.
                        let mut engines: HashMap<&str, (usize, &ModelOffer)> = HashMap::new();
                        for offer in offers().filter(|o| o.id == id) {
                            engines.entry(offer.engine.as_str()).or_insert((0, offer)).0 += 1;
                        }
                        let preferred = engines
                            .get(self.config.engine.as_str())
                            .map(|(_, offer)| (usize::MAX, *offer));
                        let best = preferred.or_else(|| {
                            engines.into_values().max_by(|a, b| {
                                a.0.cmp(&b.0).then_with(|| b.1.engine.cmp(&a.1.engine))
                            })
                        });
                        match best {
                            Some((_, offer)) => (offer.clone(), None),
                            // Nobody we know of announces it: the DHT's providers of the id
                            // are the candidates.
                            None => return Ok(Target::unannounced(id, kind)),
                        }
                    }
                }
            }
        };
        let mut serving = Vec::new();
        for peer in alive() {
            let Some(capabilities) = &peer.capabilities else {
                continue;
            };
            let serves = capabilities
                .models
                .iter()
                .any(|m| m.id == offer.id && m.engine == offer.engine);
            if let (true, Ok(peer_id)) = (serves, peer.peer_id.parse::<PeerId>()) {
                serving.push(Candidate {
                    peer: peer_id,
                    rtt_ms: peer.rtt_us.map(|us| us as f64 / 1e3),
                    queue_depth: capabilities.load.queue_depth,
                    utilisation: capabilities.load.utilisation,
                });
            }
        }
        Ok(Target {
            offer,
            local,
            peers: serving,
        })
    }

    /// Every node that could run a task on `target`, best first.
    async fn ranking(&self, target: &Target) -> Vec<PeerId> {
        let own = self.net.peer_id();
        let mut candidates = Vec::with_capacity(target.peers.len() + 1);
        if target.local.is_some() {
            candidates.push(Candidate {
                peer: own,
                rtt_ms: Some(0.0),
                queue_depth: u32::try_from(self.models.queue_depth()).unwrap_or(u32::MAX),
                utilisation: 0.0,
            });
        }
        candidates.extend(target.peers.iter().cloned());
        if candidates.is_empty() {
            // Nobody we know of announces it: ask the DHT who provides it.
            let lookup = self.net.find_providers(target.offer.id);
            if let Ok(Ok(providers)) = tokio::time::timeout(PROVIDER_LOOKUP, lookup).await {
                candidates.extend(providers.into_iter().filter(|p| *p != own).map(|peer| {
                    Candidate {
                        peer,
                        rtt_ms: None,
                        queue_depth: 0,
                        utilisation: 0.0,
                    }
                }));
            }
        }
        let now = now_ms();
        let mut state = self.lock();
        let RouterState {
            reliability, rng, ..
        } = &mut *state;
        routing::rank(
            &candidates,
            |p| reliability.record(p, now),
            &self.config.weights,
            rng,
        )
    }

    /// What the router has done since the node started.
    pub fn stats(&self) -> RouterStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, what: impl FnOnce(&mut RouterStats)) {
        what(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn record(&self, peer: &PeerId, success: bool, elapsed: Option<Duration>) {
        let local = *peer == self.net.peer_id();
        self.count(|s| {
            if success {
                s.completed += 1;
                if local {
                    s.local += 1;
                } else {
                    s.remote += 1;
                }
            }
        });
        let now = now_ms();
        let mut state = self.lock();
        if success {
            state.reliability.success(peer, now);
        } else {
            state.reliability.failure(peer, now);
        }
        if let Some(elapsed) = elapsed {
            if state.latencies_ms.len() == LATENCY_WINDOW {
                state.latencies_ms.pop_front();
            }
            state.latencies_ms.push_back(elapsed.as_secs_f64() * 1e3);
        }
    }

    /// The observed 95th percentile of successful embedding attempts.
    fn p95(&self) -> Option<Duration> {
        let state = self.lock();
        if state.latencies_ms.len() < MIN_LATENCIES {
            return None;
        }
        let mut sorted: Vec<f64> = state.latencies_ms.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let ms = sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)];
        Some(Duration::from_secs_f64(ms / 1e3))
    }

    // ---- embeddings ------------------------------------------------------------------------

    /// Embeds `texts` with `target` on the best node, failing over and hedging as needed.
    pub async fn embed(&self, target: &Target, texts: Vec<String>) -> Result<Embedded, RouteError> {
        let ranking = self.ranking(target).await;
        self.embed_on(target, texts, ranking).await
    }

    /// Embeds `texts` trying `ranking` in order.
    pub async fn embed_on(
        &self,
        target: &Target,
        texts: Vec<String>,
        ranking: Vec<PeerId>,
    ) -> Result<Embedded, RouteError> {
        let request = TaskRequest {
            id: TaskId(rand::random()),
            model: target.offer.id,
            budget_ms: self.config.deadline.as_millis() as u64,
            input: TaskInput::Embed { texts },
        };
        let deadline = tokio::time::Instant::now() + self.config.deadline;
        let hedge_after = self.config.hedge.then(|| self.p95()).flatten();
        let mut running = FuturesUnordered::new();
        let mut next = 0;
        let mut hedged = false;
        let mut reasons = Vec::new();
        let mut all_busy = true;
        let attempt = |peer: PeerId| {
            let request = request.clone();
            async move {
                let started = Instant::now();
                let outcome = self.embed_attempt(peer, target, request).await;
                (peer, outcome, started.elapsed())
            }
        };
        loop {
            if running.is_empty() {
                let Some(peer) = ranking.get(next) else {
                    break;
                };
                running.push(attempt(*peer));
                next += 1;
            }
            let hedge_now =
                hedge_after.filter(|_| !hedged && running.len() == 1 && next < ranking.len());
            let hedge_timer = async {
                match hedge_now {
                    Some(after) => tokio::time::sleep(after).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                Some((peer, outcome, elapsed)) = running.next() => match outcome {
                    Outcome::Done(embedded) => {
                        self.record(&peer, true, Some(elapsed));
                        return Ok(embedded);
                    }
                    Outcome::Final(e) => return Err(e),
                    Outcome::Retry { reason, failed } => {
                        debug!(%peer, %reason, "embedding attempt failed; trying the next node");
                        self.count(|s| s.failovers += 1);
                        if failed {
                            self.record(&peer, false, None);
                        }
                        all_busy &= !failed;
                        reasons.push(format!("{peer}: {reason}"));
                    }
                },
                _ = hedge_timer => {
                    hedged = true;
                    self.count(|s| s.hedges += 1);
                    running.push(attempt(ranking[next]));
                    next += 1;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(RouteError::Unavailable("the deadline passed".into()));
                }
            }
        }
        Err(give_up(ranking.is_empty(), all_busy, reasons))
    }

    async fn embed_attempt(
        &self,
        peer: PeerId,
        target: &Target,
        request: TaskRequest,
    ) -> Outcome<Embedded> {
        let TaskInput::Embed { texts } = &request.input else {
            return Outcome::Final(RouteError::Invalid("not an embedding task".into()));
        };
        let count = texts.len();
        if peer == self.net.peer_id() {
            let Some(Runner::Embed(model)) = &target.local else {
                return retry("this node does not serve the model", false);
            };
            let admission = match self.models.admit(Requester::Local) {
                Ok(admission) => admission,
                Err(e) => return retry(e.to_string(), false),
            };
            return match self
                .models
                .embed(admission, model.clone(), texts.clone())
                .await
            {
                Ok(((vectors, prompt_tokens), _)) => Outcome::Done(Embedded {
                    vectors,
                    prompt_tokens,
                    worker: peer,
                }),
                Err(e) => run_error(e),
            };
        }
        let model = request.model;
        let id = request.id;
        match self.remote(peer, &request, None).await {
            Outcome::Done(result) => match result.output.vectors(count) {
                Ok(vectors) => {
                    let prompt_tokens = match result.output {
                        TaskOutput::Embeddings { prompt_tokens, .. } => prompt_tokens as usize,
                        TaskOutput::Generation { .. } => 0,
                    };
                    debug!(%peer, task = %id, model = %model.short(), "embedded remotely");
                    Outcome::Done(Embedded {
                        vectors,
                        prompt_tokens,
                        worker: peer,
                    })
                }
                Err(reason) => {
                    self.net.penalise(peer, Rejection::Malformed).await;
                    retry(reason, true)
                }
            },
            Outcome::Final(e) => Outcome::Final(e),
            Outcome::Retry { reason, failed } => Outcome::Retry { reason, failed },
        }
    }

    // ---- generation ------------------------------------------------------------------------

    /// Runs a chat completion on the best node; text goes to `text` as it is made. A worker
    /// that dies mid-way is replaced by the next candidate, which continues from the tokens
    /// already delivered.
    pub async fn generate(
        &self,
        target: &Target,
        messages: Vec<ChatMessage>,
        params: GenerateParams,
        text: mpsc::Sender<String>,
    ) -> Result<Completion, RouteError> {
        let ranking = self.ranking(target).await;
        self.generate_on(target, messages, params, text, ranking)
            .await
    }

    /// Like [`Inference::generate`], trying `ranking` in order.
    pub async fn generate_on(
        &self,
        target: &Target,
        messages: Vec<ChatMessage>,
        params: GenerateParams,
        text: mpsc::Sender<String>,
        ranking: Vec<PeerId>,
    ) -> Result<Completion, RouteError> {
        let id = TaskId(rand::random());
        let deadline = tokio::time::Instant::now() + self.config.deadline;
        let mut progress = Progress {
            resume: Resume::default(),
            text,
        };
        let mut reasons = Vec::new();
        let mut all_busy = true;
        for (attempt, peer) in ranking.iter().enumerate() {
            let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
            if budget.is_zero() {
                return Err(RouteError::Unavailable("the deadline passed".into()));
            }
            let started = Instant::now();
            let outcome = if *peer == self.net.peer_id() {
                self.generate_locally(target, &messages, &params, &mut progress)
                    .await
            } else {
                let request = TaskRequest {
                    id,
                    model: target.offer.id,
                    budget_ms: budget.as_millis().max(1) as u64,
                    input: TaskInput::Generate {
                        messages: messages.clone(),
                        params: params.clone(),
                        resume: progress.resume.clone(),
                    },
                };
                self.generate_remotely(*peer, &request, &mut progress).await
            };
            match outcome {
                Outcome::Done(generation) => {
                    self.record(peer, true, None);
                    debug!(%peer, task = %id, ms = started.elapsed().as_millis(), "generated");
                    return Ok(Completion {
                        generation,
                        worker: *peer,
                        attempts: attempt + 1,
                    });
                }
                Outcome::Final(e) => return Err(e),
                Outcome::Retry { reason, failed } => {
                    debug!(%peer, %reason, delivered = progress.resume.tokens.len(),
                           "generation attempt failed; trying the next node");
                    self.count(|s| s.failovers += 1);
                    if failed {
                        self.record(peer, false, None);
                    }
                    all_busy &= !failed;
                    reasons.push(format!("{peer}: {reason}"));
                }
            }
        }
        Err(give_up(ranking.is_empty(), all_busy, reasons))
    }

    async fn generate_locally(
        &self,
        target: &Target,
        messages: &[ChatMessage],
        params: &GenerateParams,
        progress: &mut Progress,
    ) -> Outcome<Generation> {
        let Some(Runner::Generate(model)) = &target.local else {
            return retry("this node does not serve the model", false);
        };
        let admission = match self.models.admit(Requester::Local) {
            Ok(admission) => admission,
            Err(e) => return retry(e.to_string(), false),
        };
        let prompt = match crate::models::chat_prompt(model, messages).await {
            Ok((prompt, _)) => prompt,
            Err(e) => return Outcome::Final(RouteError::Invalid(e.to_string())),
        };
        let resume = progress.resume.clone();
        match self
            .models
            .generate_into(
                admission,
                model.clone(),
                prompt,
                params.clone(),
                resume,
                progress,
            )
            .await
        {
            Ok(Some((generation, _))) => Outcome::Done(generation),
            Ok(None) => Outcome::Final(RouteError::Unavailable("the caller left".into())),
            Err(e) => run_error(e),
        }
    }

    async fn generate_remotely(
        &self,
        peer: PeerId,
        request: &TaskRequest,
        progress: &mut Progress,
    ) -> Outcome<Generation> {
        let outcome = self.remote(peer, request, Some(progress)).await;
        let result = match outcome {
            Outcome::Done(result) => result,
            Outcome::Final(e) => return Outcome::Final(e),
            Outcome::Retry { reason, failed } => return Outcome::Retry { reason, failed },
        };
        let TaskOutput::Generation {
            text,
            tokens,
            prompt_tokens,
            finish_reason,
        } = result.output
        else {
            self.net.penalise(peer, Rejection::Malformed).await;
            return retry("the worker returned embeddings for a chat", true);
        };
        // The final answer must continue what was streamed.
        let delivered = progress.resume.text_bytes as usize;
        if !tokens.starts_with(&progress.resume.tokens)
            || !text.is_char_boundary(delivered.min(text.len()))
            || text.len() < delivered
        {
            self.net.penalise(peer, Rejection::Malformed).await;
            return retry("the worker's answer contradicts what it streamed", true);
        }
        if text.len() > delivered && !progress.deliver(text[delivered..].to_owned(), vec![]).await {
            return Outcome::Final(RouteError::Unavailable("the caller left".into()));
        }
        Outcome::Done(Generation {
            text,
            tokens,
            prompt_tokens: prompt_tokens as usize,
            finish_reason,
            prompt_ms: result.timings.prefill_ms,
            decode_ms: result.timings.decode_ms,
        })
    }

    // ---- the wire --------------------------------------------------------------------------

    /// Sends `request` to `peer` and reads its answer; chunks go to `progress`, when given.
    /// The answer's signature is checked.
    async fn remote(
        &self,
        peer: PeerId,
        request: &TaskRequest,
        mut progress: Option<&mut Progress>,
    ) -> Outcome<TaskResult> {
        let wait = self.config.attempt_timeout;
        let mut stream = match tokio::time::timeout(wait, self.net.open_task_stream(peer)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return retry(format!("cannot open a task stream: {e}"), true),
            Err(_) => return retry("opening a task stream timed out", true),
        };
        match tokio::time::timeout(wait, write_frame(&mut stream, request)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return retry(format!("cannot send the task: {e}"), true),
            Err(_) => return retry("sending the task timed out", true),
        }
        loop {
            let frame =
                tokio::time::timeout(wait, read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES))
                    .await;
            match frame {
                Err(_) => return retry("the worker went quiet", true),
                Ok(Ok(None)) => return retry("the worker closed the stream", true),
                Ok(Err(FrameError::Io(e))) => {
                    return retry(format!("the stream failed: {e}"), true)
                }
                Ok(Err(FrameError::Rejected(reason))) => {
                    self.net.penalise(peer, reason).await;
                    return retry(format!("the worker sent a bad message: {reason}"), true);
                }
                Ok(Ok(Some(TaskFrame::Chunk { text, tokens }))) => {
                    let Some(progress) = progress.as_deref_mut() else {
                        self.net.penalise(peer, Rejection::Malformed).await;
                        return retry("the worker streamed text for an embedding task", true);
                    };
                    if !progress.deliver(text, tokens).await {
                        return Outcome::Final(RouteError::Unavailable("the caller left".into()));
                    }
                }
                Ok(Ok(Some(TaskFrame::Refused(refusal)))) => {
                    return match refusal {
                        Refusal::Invalid(message) => Outcome::Final(RouteError::Invalid(message)),
                        Refusal::Busy { .. } | Refusal::UnknownModel => {
                            retry(refusal.to_string(), false)
                        }
                        Refusal::Failed(_) => retry(refusal.to_string(), true),
                    };
                }
                Ok(Ok(Some(TaskFrame::Done(result)))) => {
                    if let Err(reason) = result.verify(&peer, request.id, &request.model) {
                        self.net.penalise(peer, reason).await;
                        return retry(
                            format!("the answer is not signed by the worker: {reason}"),
                            true,
                        );
                    }
                    return Outcome::Done(*result);
                }
            }
        }
    }

    // ---- the worker ------------------------------------------------------------------------

    /// Serves the task streams peers open to this node until the network stops.
    pub async fn serve(self: Arc<Self>, mut incoming: IncomingStreams) {
        // Tasks run in a set owned by this task: when the node stops, they stop with it.
        let mut slots = Slots::new(MAX_INBOUND_TASKS, MAX_INBOUND_TASKS_PER_PEER);
        loop {
            tokio::select! {
                next = incoming.next() => {
                    let Some((peer, stream)) = next else { break };
                    let this = self.clone();
                    if !slots.spawn(peer, async move { this.work(peer, stream).await }) {
                        debug!(%peer, "too many task streams; dropping one");
                    }
                }
                () = slots.next_done(), if !slots.is_empty() => {}
            }
        }
    }

    async fn work(&self, peer: PeerId, mut stream: Stream) {
        let request = match tokio::time::timeout(
            self.config.attempt_timeout,
            read_frame::<TaskRequest>(&mut stream, MAX_REQUEST_BYTES),
        )
        .await
        {
            Ok(Ok(Some(request))) => request,
            Ok(Err(FrameError::Rejected(reason))) => {
                self.net.penalise(peer, reason).await;
                let refusal = Refusal::Invalid(format!("the task does not decode: {reason}"));
                let _ = write_frame(&mut stream, &TaskFrame::Refused(refusal)).await;
                return;
            }
            _ => return,
        };
        if let Err(message) = request.check() {
            self.net.penalise(peer, Rejection::Malformed).await;
            let _ = write_frame(&mut stream, &TaskFrame::Refused(Refusal::Invalid(message))).await;
            return;
        }
        // The sender's budget, but never more than a task may take here.
        let budget = Duration::from_millis(request.budget_ms.min(MAX_TASK_BUDGET_MS));
        let answer = tokio::time::timeout(budget, self.run_task(peer, &request, &mut stream)).await;
        let frame = match answer {
            Ok(Ok(result)) => TaskFrame::Done(Box::new(result)),
            Ok(Err(refusal)) => TaskFrame::Refused(refusal),
            Err(_) => TaskFrame::Refused(Refusal::Failed("the task's time ran out".into())),
        };
        let _ = write_frame(&mut stream, &frame).await;
        let _ = futures::AsyncWriteExt::close(&mut stream).await;
    }

    async fn run_task(
        &self,
        peer: PeerId,
        request: &TaskRequest,
        stream: &mut Stream,
    ) -> Result<TaskResult, Refusal> {
        let models = self.models.models();
        let served = models
            .iter()
            .find(|m| m.offer.id == request.model)
            .ok_or_else(|| {
                // Serving on demand: fetch it for next time; this task goes elsewhere.
                if let Some(supply) = self.supply.get() {
                    let _ = supply.demand(request.model);
                }
                Refusal::UnknownModel
            })?;
        let admission = self
            .models
            .admit(Requester::Peer(peer))
            .map_err(|_| Refusal::Busy {
                queue: u32::try_from(self.models.queue_depth()).unwrap_or(u32::MAX),
            })?;
        let started = Instant::now();
        let (output, timings) = match (&served.runner, &request.input) {
            (Runner::Embed(model), TaskInput::Embed { texts }) => {
                let ((vectors, tokens), queue_ms) = self
                    .models
                    .embed(admission, model.clone(), texts.clone())
                    .await
                    .map_err(refusal)?;
                let timings = Timings {
                    queue_ms,
                    prefill_ms: started.elapsed().as_secs_f64() * 1e3 - queue_ms,
                    decode_ms: 0.0,
                };
                (TaskOutput::embeddings(&vectors, tokens), timings)
            }
            (
                Runner::Generate(model),
                TaskInput::Generate {
                    messages,
                    params,
                    resume,
                },
            ) => {
                let (prompt, _) = crate::models::chat_prompt(model, messages)
                    .await
                    .map_err(|e| refusal(e.into()))?;
                let (generation, queue_ms) = self
                    .models
                    .generate_into(
                        admission,
                        model.clone(),
                        prompt,
                        params.clone(),
                        resume.clone(),
                        &mut ChunkWriter(stream),
                    )
                    .await
                    .map_err(refusal)?
                    .ok_or_else(|| Refusal::Failed("the requester left".into()))?;
                let timings = Timings {
                    queue_ms,
                    prefill_ms: generation.prompt_ms,
                    decode_ms: generation.decode_ms,
                };
                let output = TaskOutput::Generation {
                    text: generation.text,
                    tokens: generation.tokens,
                    prompt_tokens: generation.prompt_tokens as u32,
                    finish_reason: generation.finish_reason,
                };
                (output, timings)
            }
            _ => {
                return Err(Refusal::Invalid(format!(
                    "{} does not run this kind of task",
                    served.offer.name
                )))
            }
        };
        Ok(TaskResult::sign(
            &self.keypair,
            request.id,
            &request.model,
            output,
            timings,
        ))
    }
}

/// What the caller has received so far, and where its stream goes.
struct Progress {
    resume: Resume,
    text: mpsc::Sender<String>,
}

impl PieceSink for Progress {
    async fn take(&mut self, piece: Piece) -> bool {
        self.deliver(piece.text, piece.tokens).await
    }
}

/// Sends a worker's pieces to the requester as chunks.
struct ChunkWriter<'a>(&'a mut Stream);

impl PieceSink for ChunkWriter<'_> {
    async fn take(&mut self, piece: Piece) -> bool {
        let chunk = TaskFrame::Chunk {
            text: piece.text,
            tokens: piece.tokens,
        };
        write_frame(self.0, &chunk).await.is_ok()
    }
}

impl Progress {
    /// Hands `text` to the caller and remembers `tokens`; `false` when the caller has gone.
    async fn deliver(&mut self, text: String, tokens: Vec<u32>) -> bool {
        self.resume.tokens.extend(tokens);
        if text.is_empty() {
            return true;
        }
        self.resume.text_bytes += text.len() as u64;
        self.text.send(text).await.is_ok()
    }
}

fn refusal(e: RunError) -> Refusal {
    match e {
        RunError::Busy(queue) => Refusal::Busy {
            queue: u32::try_from(queue).unwrap_or(u32::MAX),
        },
        RunError::Model(MlError::Input(message)) => Refusal::Invalid(message),
        RunError::Model(e) => Refusal::Failed(e.to_string()),
    }
}

fn run_error<T>(e: RunError) -> Outcome<T> {
    match e {
        RunError::Busy(_) => retry(e.to_string(), false),
        RunError::Model(MlError::Input(message)) => Outcome::Final(RouteError::Invalid(message)),
        RunError::Model(e) => retry(e.to_string(), true),
    }
}

fn give_up(nobody: bool, all_busy: bool, reasons: Vec<String>) -> RouteError {
    if nobody {
        RouteError::Unavailable("no reachable node serves the model".into())
    } else if all_busy {
        RouteError::Busy
    } else {
        RouteError::Unavailable(reasons.join("; "))
    }
}
