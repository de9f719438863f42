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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use mycel_core::id::ContentId;
use mycel_core::keepalive;
use mycel_core::membership::PeerState;
use mycel_core::naming::{self, Bindings, NameError, Resolved};
use mycel_core::queue::Requester;
use mycel_core::routing::{self, Candidate, Reliability, Weights};
use mycel_core::statement::{ModelKind, ModelOffer};
use mycel_core::task::{
    ChatMessage, Refusal, Resume, TaskFrame, TaskId, TaskInput, TaskOutput, TaskRequest,
    TaskResult, Timings, TokenLogprobs, MAX_FRAME_BYTES, MAX_REQUEST_BYTES, MAX_TASK_BUDGET_MS,
};
use mycel_core::trust::{self, Trust};
use mycel_core::verify::{
    self, Certificate, Claim, Evidence, Judged, Mode, Next, Replication, Signer, Verdict,
};
use mycel_core::wire::Rejection;
use mycel_core::Keypair;
use mycel_ml::{FinishReason, GenerateParams, Generation, MlError};
use mycel_net::task::{read_frame, write_frame, FrameError, IncomingStreams, Stream};
use mycel_net::{now_ms, NetHandle, PeerId};
use prometheus_client::metrics::counter::Counter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tracing::{debug, warn};

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
/// Pieces of evidence kept per peer.
const EVIDENCE_PER_PEER: usize = 4;
/// Task streams kept open to one peer after their task, for the next tasks to it
/// (`mycel_core::keepalive`).
const KEPT_STREAMS_PER_PEER: usize = 4;
/// Task streams kept open in all.
const KEPT_STREAMS: usize = 256;
/// A kept stream that ends this soon after a task was sent on it, with no answer, had been
/// closed by its worker before: the task goes on a new stream at no cost to the worker.
const STALE_WITHIN: Duration = Duration::from_secs(1);
/// How long a requester keeps a stream for its next task: well below a worker's
/// [`RouterConfig::next_task_wait`].
const KEPT_FOR: Duration = Duration::from_secs(10);
/// Spot checks running at once in the background.
const MAX_RECHECKS: usize = 4;
/// Longest a background spot check may take.
const RECHECK_BUDGET: Duration = Duration::from_secs(60);

/// How the router behaves.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// How much reliability, load and RTT count.
    pub weights: Weights,
    /// Longest wait for a worker's next message before the task moves on.
    pub attempt_timeout: Duration,
    /// Longest a task may take in all.
    pub deadline: Duration,
    /// Longest this node works on a peer's task, whatever budget the task names.
    pub max_task_budget: Duration,
    /// How long this node, as a worker, keeps a task stream open after its answer for the
    /// requester's next task (zero: it closes the stream, as nodes did before they kept
    /// them).
    pub next_task_wait: Duration,
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
    /// How results are checked when a request does not say.
    pub verify: Mode,
    /// When peers are isolated, and for how long.
    pub trust: trust::Config,
    /// Seed of the router's random choices (ranking samples, task ids, spot-check draws,
    /// injected faults): the same seed replays the same choices. `None`: from the OS.
    pub seed: Option<u64>,
    /// How this node misbehaves as a worker (tests and benchmarks).
    #[cfg(feature = "fault-injection")]
    pub fault: Option<crate::fault::Fault>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            weights: Weights::default(),
            attempt_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(600),
            max_task_budget: Duration::from_millis(MAX_TASK_BUDGET_MS),
            next_task_wait: Duration::from_secs(20),
            hedge: true,
            reliability_half_life: Duration::from_secs(300),
            bindings: Bindings::new(),
            engine: mycel_ml::Engine::default().name().to_owned(),
            verify: Mode::None,
            trust: trust::Config::default(),
            seed: None,
            #[cfg(feature = "fault-injection")]
            fault: None,
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
    /// Nothing this node trusts binds the name (the message lists the ids announced under it
    /// and how to trust one).
    #[error("{0}")]
    UnboundModel(String),
    /// The input cannot be run (too long, bad parameters): a 4xx.
    #[error("{0}")]
    Invalid(String),
    /// Every candidate refused for lack of room.
    #[error("every node serving the model is busy; try again shortly")]
    Busy,
    /// Every candidate failed.
    #[error("no node could run the task: {0}")]
    Unavailable(String),
    /// The task ran but no answer could be verified (too few nodes, or the replicas
    /// disagreed beyond what the quorum can settle).
    #[error("the result could not be verified: {0}")]
    Unverified(String),
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
    /// The operators that vouch for some of those peers (by the operator's id); a peer not
    /// in it is an operator of its own.
    operators: HashMap<PeerId, PeerId>,
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
            operators: HashMap::new(),
        }
    }

    /// Who runs `peer`: its operator, or the peer itself when none vouches for it.
    fn operator_of(&self, peer: &PeerId) -> PeerId {
        self.operators.get(peer).copied().unwrap_or(*peer)
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

/// A worker's signed result with the claim it signed (checked, or made here).
type Signed = (TaskResult, Claim);

/// A task sent on a stream that broke before the worker answered anything: on a kept
/// stream, the worker had closed it, and the task goes on a new one.
struct Unanswered {
    reason: String,
    fault: Fault,
}

/// How one attempt ended.
enum Outcome<T> {
    /// It produced the answer.
    Done(T),
    /// The input is at fault: no other node would do better.
    Final(RouteError),
    /// Try the next candidate; `fault` says whether the worker is to blame, and how.
    Retry { reason: String, fault: Fault },
}

/// What a failed attempt says of its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Nothing: it was busy, or does not serve the model.
    None,
    /// Nothing it is to blame for, though it was not busy: the reason is worth showing.
    Excused,
    /// It went quiet: a step of the attempt timed out.
    Quiet,
    /// It failed: an error, a broken stream, a bad or wrong answer.
    Failed,
}

impl Fault {
    /// A task stream that broke: quiet when it timed out, failed otherwise.
    fn of_stream(e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::TimedOut {
            Fault::Quiet
        } else {
            Fault::Failed
        }
    }

    /// What goes into the worker's trust record, if anything.
    fn trust(self) -> Option<trust::Outcome> {
        match self {
            Fault::None | Fault::Excused => None,
            Fault::Quiet => Some(trust::Outcome::Timeout),
            Fault::Failed => Some(trust::Outcome::Failure),
        }
    }
}

fn retry<T>(reason: impl Into<String>, fault: Fault) -> Outcome<T> {
    Outcome::Retry {
        reason: reason.into(),
        fault,
    }
}

struct RouterState {
    reliability: Reliability<PeerId>,
    trust: Trust<PeerId>,
    evidence: HashMap<PeerId, VecDeque<Evidence>>,
    /// Peers whose trust changed since it was last written to the store.
    dirty: HashSet<PeerId>,
    /// Peers cut off in the network whose ban the router has not yet seen lifted.
    cut: HashSet<PeerId>,
    rng: StdRng,
    latencies_ms: VecDeque<f64>,
}

impl RouterState {
    fn note(
        &mut self,
        peer: &PeerId,
        outcome: trust::Outcome,
        now: u64,
    ) -> Option<trust::Isolation> {
        self.dirty.insert(*peer);
        self.trust.note(peer, outcome, now)
    }
}

/// What the store keeps of a peer's trust.
#[derive(serde::Serialize, serde::Deserialize)]
struct TrustEntry {
    record: trust::Record,
    evidence: Vec<Evidence>,
}

/// Largest trust entry decoded from the store.
const MAX_TRUST_ENTRY_BYTES: usize = 1 << 20;
/// Trust changes are written at least this often (isolations at once).
const TRUST_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// How a task's result was checked.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// The mode it ran under.
    pub mode: Mode,
    /// For `replicate`: the certificate of the quorum that agreed.
    pub certificate: Option<Certificate>,
}

/// A result and how it was checked.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The output.
    pub output: TaskOutput,
    /// Who computed it (one of them, for a replicated task).
    pub worker: PeerId,
    /// How it was checked.
    pub verification: Verification,
}

/// What this node's tasks have shown about a peer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerTrust {
    /// Score in (0, 1].
    pub score: f64,
    /// Decayed counts.
    pub successes: f64,
    /// Failed tasks.
    pub failures: f64,
    /// Tasks it went quiet on.
    pub timeouts: f64,
    /// Quorums it lost.
    pub disagreements: f64,
    /// Malformed or badly signed answers.
    pub invalid: f64,
    /// Times isolated.
    pub offences: u32,
    /// Isolated until (Unix ms), when isolated now.
    pub isolated_until: Option<u64>,
    /// Pieces of evidence of lies kept.
    pub evidence: usize,
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
    /// Tasks re-run elsewhere to spot-check the first answer.
    pub spot_checks: u64,
    /// Tasks this node's models ran as a worker (for itself or for peers), replicas
    /// included: the work verification costs.
    pub worked: u64,
    /// Tasks sent to a peer on a stream kept open from an earlier task to it.
    pub streams_kept: u64,
    /// Kept streams the worker had closed meanwhile (the task went on a new one).
    pub streams_stale: u64,
}

/// Counters of verification, for /metrics.
#[derive(Debug, Default)]
pub struct VerifyMetrics {
    /// Replicated tasks a quorum verified.
    pub verified: Counter,
    /// Replicated tasks no quorum could verify.
    pub unverified: Counter,
    /// Answers that lost a settled quorum.
    pub disagreements: Counter,
    /// Peers isolated.
    pub isolations: Counter,
    /// Tasks re-run to spot-check.
    pub spot_checks: Counter,
    /// Results refused: bad signatures, wrong shapes, another engine.
    pub invalid_results: Counter,
    /// Certificates and evidence refused by /api/verify.
    pub certificates_rejected: Counter,
}

/// The node's inference service: router and worker.
pub struct Inference {
    stats: Mutex<RouterStats>,
    /// Verification counters.
    pub metrics: VerifyMetrics,
    net: NetHandle,
    keypair: Keypair,
    models: Arc<ModelService>,
    config: RouterConfig,
    state: Mutex<RouterState>,
    /// Where models come from, when this node serves on demand.
    supply: OnceLock<Arc<ModelSupply>>,
    /// Where trust is kept across restarts (until the node stops).
    store: Mutex<Option<Arc<mycel_store::Store>>>,
    /// Wakes the trust writer at once (an isolation).
    flush_now: tokio::sync::Notify,
    /// Spot checks running in the background; more are skipped.
    rechecks: Arc<tokio::sync::Semaphore>,
    /// Task streams kept open for the next task to their peer, aged by [`Inference::clock_ms`].
    streams: Mutex<keepalive::Pool<PeerId, Stream>>,
    /// When the service started: a clock that never steps back, for the kept streams.
    started: Instant,
    #[cfg(feature = "fault-injection")]
    injector: Option<crate::fault::Injector>,
    /// The operator that vouches for this node, if any.
    operator: Option<PeerId>,
    /// What the node's defences turned away (shared with the other services).
    pub defences: crate::defences::Defences,
}

/// The models of `kind` that `peer` announces.
fn offers_of(
    peer: &mycel_core::membership::PeerInfo,
    kind: ModelKind,
) -> impl Iterator<Item = &ModelOffer> {
    peer.capabilities
        .iter()
        .flat_map(|c| &c.models)
        .filter(move |o| o.kind == kind)
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("peer", &self.net.peer_id())
            .finish_non_exhaustive()
    }
}

impl Inference {
    /// The service for a node with identity `keypair`, serving `models`, run by `operator`
    /// when one vouches for it.
    pub fn new(
        net: NetHandle,
        keypair: Keypair,
        models: Arc<ModelService>,
        config: RouterConfig,
        operator: Option<PeerId>,
    ) -> Self {
        let half_life = config.reliability_half_life.as_millis() as u64;
        Self {
            stats: Mutex::new(RouterStats::default()),
            metrics: VerifyMetrics::default(),
            net,
            keypair,
            models,
            state: Mutex::new(RouterState {
                reliability: Reliability::new(half_life),
                trust: Trust::new(config.trust.clone()),
                evidence: HashMap::new(),
                dirty: HashSet::new(),
                cut: HashSet::new(),
                rng: config
                    .seed
                    .map_or_else(StdRng::from_entropy, StdRng::seed_from_u64),
                latencies_ms: VecDeque::new(),
            }),
            supply: OnceLock::new(),
            store: Mutex::new(None),
            flush_now: tokio::sync::Notify::new(),
            rechecks: Arc::new(tokio::sync::Semaphore::new(MAX_RECHECKS)),
            streams: Mutex::new(keepalive::Pool::new(
                KEPT_STREAMS_PER_PEER,
                KEPT_STREAMS,
                KEPT_FOR.as_millis() as u64,
            )),
            started: Instant::now(),
            #[cfg(feature = "fault-injection")]
            injector: config
                .fault
                .map(|fault| crate::fault::Injector::new(fault, config.seed)),
            config,
            operator,
            defences: Default::default(),
        }
    }

    /// Counts what its defences turn away in `defences`.
    pub fn counting(mut self, defences: crate::defences::Defences) -> Self {
        self.defences = defences;
        self
    }

    /// Restores the trust records kept in `store` and keeps writing changes there: an
    /// isolation at once, everything else within `TRUST_FLUSH_INTERVAL`. Returns the writer.
    pub fn keep_trust_in(
        self: &Arc<Self>,
        store: Arc<mycel_store::Store>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let kept = store.trust()?;
        let mut isolated = Vec::new();
        {
            let mut state = self.lock();
            for (peer, bytes) in kept {
                match mycel_core::wire::decode::<TrustEntry>(&bytes, MAX_TRUST_ENTRY_BYTES) {
                    Ok(entry) => {
                        if entry.record.isolated_until > now_ms() {
                            isolated.push((peer, entry.record.isolated_until));
                        }
                        state.trust.restore(peer, entry.record);
                        if !entry.evidence.is_empty() {
                            state.evidence.insert(peer, entry.evidence.into());
                        }
                    }
                    Err(reason) => warn!(%peer, %reason, "a stored trust record does not decode"),
                }
            }
        }
        // Isolations are for lies: the network cuts the peer off again.
        for (peer, until) in isolated {
            self.cut_off(peer, until);
        }
        *self.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
        let this = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(TRUST_FLUSH_INTERVAL) => {}
                    () = this.flush_now.notified() => {}
                }
                this.flush().await;
            }
        }))
    }

    /// Writes the trust records that changed to the store.
    pub async fn flush(&self) {
        let Some(store) = self.store.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let entries: Vec<(PeerId, Vec<u8>)> = {
            let mut state = self.lock();
            let dirty: Vec<PeerId> = state.dirty.drain().collect();
            dirty
                .into_iter()
                .filter_map(|peer| {
                    let record = state.trust.stored(&peer)?;
                    let evidence = state
                        .evidence
                        .get(&peer)
                        .map(|e| e.iter().cloned().collect())
                        .unwrap_or_default();
                    let entry = TrustEntry { record, evidence };
                    Some((peer, mycel_core::wire::encode(&entry)))
                })
                .collect()
        };
        if entries.is_empty() {
            return;
        }
        let peers: Vec<PeerId> = entries.iter().map(|(peer, _)| *peer).collect();
        let written = tokio::task::spawn_blocking(move || store.put_trust(&entries)).await;
        let error = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        warn!("cannot write peers' trust records (tried again later): {error}");
        self.lock().dirty.extend(peers);
    }

    /// Lets go of the store (the node is stopping: its database must close).
    pub fn release_store(&self) {
        self.store.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Registers the verification counters in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let m = &self.metrics;
        for (name, help, counter) in [
            (
                "mycel_verify_verified",
                "Replicated tasks a quorum verified",
                &m.verified,
            ),
            (
                "mycel_verify_unverified",
                "Replicated tasks no quorum could verify",
                &m.unverified,
            ),
            (
                "mycel_verify_disagreements",
                "Answers that lost a settled quorum",
                &m.disagreements,
            ),
            (
                "mycel_verify_isolations",
                "Peers isolated for lies (lost quorums, invalid answers)",
                &m.isolations,
            ),
            (
                "mycel_verify_spot_checks",
                "Tasks re-run elsewhere to spot-check",
                &m.spot_checks,
            ),
            (
                "mycel_verify_invalid_results",
                "Worker results refused (bad signature, wrong shape, another engine)",
                &m.invalid_results,
            ),
            (
                "mycel_verify_certificates_rejected",
                "Certificates and evidence that failed their check at /api/verify",
                &m.certificates_rejected,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
    }

    /// Lets requests for models this node lacks fetch and serve them (when `supply` serves
    /// on demand).
    pub fn set_supply(&self, supply: Arc<ModelSupply>) {
        if supply.serves_on_demand() {
            let _ = self.supply.set(supply);
        }
    }

    /// Whether a request by `name` may mean the model `id` that a peer vouched for by
    /// `operator` (if any) announces under it: the name is bound to the id, the operator is
    /// trusted (or runs this node), or the operator trusts announced names. For listing
    /// models; the request itself is resolved by [`Inference::resolve`].
    pub fn name_usable(&self, name: &str, id: ContentId, operator: Option<&str>) -> bool {
        let bindings = &self.config.bindings;
        if let Some(ids) = bindings.get(name) {
            return ids.contains(&id);
        }
        let operator = operator.and_then(|o| o.parse::<PeerId>().ok());
        bindings.trusts_announced_names()
            || operator.is_some_and(|o| bindings.trusts(&o) || self.operator == Some(o))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- choosing where ------------------------------------------------------------------

    /// The model called `name` (or with that content id) for tasks of `kind`: this node's if
    /// it serves one; else the id the name is bound to, or that nodes of a trusted operator
    /// (this node's own included) announce under it (see `mycel_core::naming`), run with the
    /// engine most of its announcers use; with the peers that offer it.
    pub async fn resolve(&self, name: &str, kind: ModelKind) -> Result<Target, RouteError> {
        let peers = self.net.workers_now();
        let alive = || peers.iter().filter(|p| p.state == PeerState::Alive);
        // Who runs whom, for every peer that says (the DHT's providers of an unannounced
        // model may be among them).
        let mut operators = HashMap::new();
        if let Some(operator) = self.operator {
            operators.insert(self.net.peer_id(), operator);
        }
        let bindings = &self.config.bindings;
        // The nodes a trusted operator vouches for (its signature over the node's id, checked
        // with the announcement): their names are trusted.
        let mut vouched = Vec::new();
        for peer in alive().filter(|p| p.operator.is_some()) {
            let node = peer.peer_id.parse::<PeerId>();
            let operator = peer.operator.as_deref().map(str::parse::<PeerId>);
            if let (Ok(node), Some(Ok(operator))) = (node, operator) {
                operators.insert(node, operator);
                // This node's own operator's nodes are trusted like those of an operator the
                // bindings name.
                if bindings.trusts(&operator) || self.operator == Some(operator) {
                    vouched.push(peer);
                }
            }
        }
        let offers = || alive().flat_map(|p| offers_of(p, kind));
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
                let trusted: Vec<(ContentId, &str)> = vouched
                    .iter()
                    .flat_map(|p| offers_of(p, kind))
                    .map(|o| (o.id, o.name.as_str()))
                    .collect();
                let resolved = naming::resolve_trusting(name, &announced, &trusted, bindings)
                    .map_err(|e| match e {
                        NameError::Unknown(_) => RouteError::UnknownModel(name.to_owned()),
                        refused @ NameError::Ambiguous { .. } => {
                            self.defences.count(crate::defences::MODEL_NAME_AMBIGUOUS);
                            RouteError::AmbiguousModel(refused.to_string())
                        }
                        refused @ NameError::Unbound { .. } => {
                            self.defences.count(crate::defences::MODEL_NAME_UNBOUND);
                            RouteError::UnboundModel(refused.to_string())
                        }
                    })?;
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
                            None => {
                                let mut target = Target::unannounced(id, kind);
                                target.operators = operators;
                                return Ok(target);
                            }
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
            operators,
        })
    }

    /// Every node that could run a task on `target`, best first.
    pub async fn ranking(&self, target: &Target) -> Vec<PeerId> {
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
        self.keep_usable(&mut candidates, |c| c.peer).await;
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

    /// Drops isolated peers from `items` (they get no work until their back-off ends), and
    /// has the network lift its ban on those whose isolation has just ended, before any task
    /// goes to them (it would otherwise lift it at its next tick, and a task sent before
    /// would fail); a peer the network still bans for its score is dropped too.
    async fn keep_usable<T>(&self, items: &mut Vec<T>, peer: impl Fn(&T) -> PeerId) {
        let own = self.net.peer_id();
        let now = now_ms();
        let lift: Vec<PeerId> = {
            let state = self.lock();
            items.retain(|item| {
                let p = peer(item);
                p == own || !state.trust.isolated(&p, now)
            });
            items
                .iter()
                .map(&peer)
                .filter(|p| state.cut.contains(p))
                .collect()
        };
        for p in lift {
            if self.net.lift_isolation(p).await {
                // Unless it was isolated again meanwhile (then cut off anew, and dropped
                // below).
                let mut state = self.lock();
                if !state.trust.isolated(&p, now_ms()) {
                    state.cut.remove(&p);
                }
            } else {
                items.retain(|item| peer(item) != p);
            }
        }
        let state = self.lock();
        let now = now_ms();
        items.retain(|item| {
            let p = peer(item);
            p == own || !state.trust.isolated(&p, now)
        });
    }

    /// What the router has done since the node started.
    pub fn stats(&self) -> RouterStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, what: impl FnOnce(&mut RouterStats)) {
        what(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn record(&self, peer: &PeerId, outcome: trust::Outcome, elapsed: Option<Duration>) {
        let success = outcome == trust::Outcome::Success;
        if !success {
            self.lock_streams().forget(peer);
        }
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
        // An unchecked answer is no credit against a later lie: trust counts as successes only
        // answers a quorum or a spot check agreed with (see `settled` and `recheck`).
        let isolation = if success {
            None
        } else {
            state.note(peer, outcome, now)
        };
        if let Some(isolation) = isolation {
            self.flush_now.notify_one();
            self.metrics.isolations.inc();
            warn!(%peer, offences = isolation.offences, "isolating a peer whose tasks keep failing");
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
            id: TaskId(self.lock().rng.gen()),
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
                        self.record(&peer, trust::Outcome::Success, Some(elapsed));
                        return Ok(embedded);
                    }
                    Outcome::Final(e) => return Err(e),
                    Outcome::Retry { reason, fault } => {
                        debug!(%peer, %reason, "embedding attempt failed; trying the next node");
                        self.count(|s| s.failovers += 1);
                        if let Some(outcome) = fault.trust() {
                            self.record(&peer, outcome, None);
                        }
                        all_busy &= fault == Fault::None;
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
                return retry("this node does not serve the model", Fault::None);
            };
            let admission = match self.models.admit(Requester::Local) {
                Ok(admission) => admission,
                Err(e) => return retry(e.to_string(), Fault::None),
            };
            self.count(|s| s.worked += 1);
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
            Outcome::Done((result, _)) => match result.output.vectors(count) {
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
                    retry(reason, Fault::Failed)
                }
            },
            Outcome::Final(e) => Outcome::Final(e),
            Outcome::Retry { reason, fault } => Outcome::Retry { reason, fault },
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
        pieces: mpsc::Sender<Piece>,
    ) -> Result<Completion, RouteError> {
        let ranking = self.ranking(target).await;
        self.generate_on(target, messages, params, pieces, ranking)
            .await
    }

    /// Like [`Inference::generate`], trying `ranking` in order.
    pub async fn generate_on(
        &self,
        target: &Target,
        messages: Vec<ChatMessage>,
        params: GenerateParams,
        pieces: mpsc::Sender<Piece>,
        ranking: Vec<PeerId>,
    ) -> Result<Completion, RouteError> {
        let id = TaskId(self.lock().rng.gen());
        let deadline = tokio::time::Instant::now() + self.config.deadline;
        let mut progress = Progress {
            resume: Resume::default(),
            pieces: Some(pieces),
            logprobs: Vec::new(),
            format: params.format.as_ref().and_then(|shape| {
                let grammar = mycel_core::grammar::Grammar::new(shape).ok()?;
                let matcher = grammar.start();
                Some((Arc::new(grammar), matcher))
            }),
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
                    self.record(peer, trust::Outcome::Success, None);
                    debug!(%peer, task = %id, ms = started.elapsed().as_millis(), "generated");
                    return Ok(Completion {
                        generation,
                        worker: *peer,
                        attempts: attempt + 1,
                    });
                }
                Outcome::Final(e) => return Err(e),
                Outcome::Retry { reason, fault } => {
                    debug!(%peer, %reason, delivered = progress.resume.tokens.len(),
                           "generation attempt failed; trying the next node");
                    self.count(|s| s.failovers += 1);
                    if let Some(outcome) = fault.trust() {
                        self.record(peer, outcome, None);
                    }
                    all_busy &= fault == Fault::None;
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
        let (Some(Runner::Generate(_)) | Some(Runner::Upstream(_))) = &target.local else {
            return retry("this node does not serve the model", Fault::None);
        };
        let admission = match self.models.admit(Requester::Local) {
            Ok(admission) => admission,
            Err(e) => return retry(e.to_string(), Fault::None),
        };
        let resume = progress.resume.clone();
        let inherited = progress.logprobs.len();
        let generated = match &target.local {
            Some(Runner::Generate(model)) => {
                let prompt = match self.prompt(model, messages).await {
                    Ok(prompt) => prompt,
                    Err(e) => return Outcome::Final(RouteError::Invalid(e.to_string())),
                };
                self.count(|s| s.worked += 1);
                self.models
                    .generate_into(
                        admission,
                        model.clone(),
                        prompt,
                        params.clone(),
                        resume,
                        progress,
                    )
                    .await
            }
            Some(Runner::Upstream(upstream)) => {
                self.count(|s| s.worked += 1);
                self.models
                    .upstream_into(
                        admission,
                        upstream.clone(),
                        messages.to_vec(),
                        params.clone(),
                        resume,
                        progress,
                    )
                    .await
            }
            _ => return retry("this node does not serve the model", Fault::None),
        };
        match generated {
            Ok(Some((mut generation, _))) => {
                // Earlier workers' log-probabilities, then this run's.
                let mine = std::mem::take(&mut generation.logprobs);
                generation.logprobs = progress.logprobs[..inherited].to_vec();
                generation.logprobs.extend(mine);
                Outcome::Done(generation)
            }
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
        // What earlier workers streamed: their claims, not this worker's.
        let inherited = !progress.resume.tokens.is_empty() || progress.resume.text_bytes > 0;
        let (base, scored) = (progress.resume.tokens.len(), progress.logprobs.len());
        let outcome = self.remote(peer, request, Some(progress)).await;
        let result = match outcome {
            Outcome::Done((result, _)) => result,
            Outcome::Final(e) => return Outcome::Final(e),
            Outcome::Retry { reason, fault } => return Outcome::Retry { reason, fault },
        };
        let TaskOutput::Generation {
            text,
            tokens,
            prompt_tokens,
            finish_reason,
            logprobs,
            counted,
        } = result.output
        else {
            self.net.penalise(peer, Rejection::Malformed).await;
            return retry("the worker returned embeddings for a chat", Fault::Failed);
        };
        // Its log-probabilities: one per token it made, and those it streamed as it streamed
        // them.
        let streamed = &progress.logprobs[scored..];
        let made = tokens.get(base..).unwrap_or_default();
        if let Err(reason) = request.check_logprobs(made, &logprobs) {
            self.net.penalise(peer, Rejection::Malformed).await;
            self.note(&peer, trust::Outcome::Invalid);
            return retry(
                format!("the worker's log-probabilities: {reason}"),
                Fault::Failed,
            );
        }
        if !logprobs.starts_with(streamed) {
            self.net.penalise(peer, Rejection::Malformed).await;
            self.note(&peer, trust::Outcome::Invalid);
            return retry(
                "the worker's log-probabilities contradict what it streamed",
                Fault::Failed,
            );
        }
        if !progress.fits(request, &text, finish_reason) {
            self.net.penalise(peer, Rejection::Malformed).await;
            self.note(&peer, trust::Outcome::Invalid);
            return retry(
                "the worker's answer is not in the requested format",
                Fault::Failed,
            );
        }
        // The final answer must continue what was streamed.
        let delivered = progress.resume.text_bytes as usize;
        if !tokens.starts_with(&progress.resume.tokens)
            || !text.is_char_boundary(delivered.min(text.len()))
            || text.len() < delivered
        {
            if inherited {
                // The text to continue came from a worker that failed: it may have claimed
                // more than it sent. Nobody here is to blame for certain.
                return retry(
                    "the answer does not continue what an earlier worker streamed",
                    Fault::None,
                );
            }
            self.net.penalise(peer, Rejection::Malformed).await;
            self.note(&peer, trust::Outcome::Invalid);
            return retry(
                "the worker's answer contradicts what it streamed",
                Fault::Failed,
            );
        }
        let tail = Piece {
            text: text.get(delivered..).unwrap_or_default().to_owned(),
            ..Piece::default()
        };
        if !tail.text.is_empty() && !progress.deliver(tail).await {
            return Outcome::Final(RouteError::Unavailable("the caller left".into()));
        }
        // Earlier workers' log-probabilities, then this one's (the caller has the ones
        // delivered so far, and takes the rest from here).
        let mut all = progress.logprobs[..scored].to_vec();
        all.extend(logprobs);
        // A count in place of ids (an upstream model's): for usage only, bounded.
        let budget = match &request.input {
            TaskInput::Generate { params, .. } => params.max_tokens,
            TaskInput::Embed { .. } => 0,
        };
        let counted = counted_tokens(budget, &tokens, counted);
        Outcome::Done(Generation {
            text,
            tokens,
            prompt_tokens: prompt_tokens as usize,
            finish_reason,
            prompt_ms: result.timings.prefill_ms,
            waited_ms: 0.0,
            decode_ms: result.timings.decode_ms,
            logprobs: all,
            counted,
        })
    }

    // ---- verified results ------------------------------------------------------------------

    /// Runs `input` on `target`, checked as `mode` says: `replicate` answers only with an
    /// output a quorum of distinct workers signed (and its certificate); `spot_check` answers
    /// from the first worker and re-runs a fraction of tasks elsewhere in the background.
    pub async fn run_checked(
        self: &Arc<Self>,
        target: &Target,
        input: TaskInput,
        mode: Mode,
    ) -> Result<Checked, RouteError> {
        let ranking = self.ranking(target).await;
        self.run_checked_on(target, input, mode, ranking).await
    }

    /// Like [`Inference::run_checked`], with `ranking` as the candidates, in order.
    pub async fn run_checked_on(
        self: &Arc<Self>,
        target: &Target,
        input: TaskInput,
        mode: Mode,
        ranking: Vec<PeerId>,
    ) -> Result<Checked, RouteError> {
        mode.check().map_err(RouteError::Invalid)?;
        // Distinct, not isolated, and no more than a quorum may draw from. A checked task's
        // workers are distinct operators too (the best-ranked node of each), so that one
        // operator's nodes count once among the candidates and never check each other.
        let mut ranking = ranking;
        let mut seen = HashSet::new();
        ranking.retain(|p| seen.insert(*p));
        self.keep_usable(&mut ranking, |p| *p).await;
        if mode != Mode::None {
            let mut operators = HashSet::new();
            ranking.retain(|p| operators.insert(target.operator_of(p)));
        }
        ranking.truncate(verify::MAX_CANDIDATES);
        let id = TaskId(self.lock().rng.gen());
        let request = TaskRequest {
            id,
            model: target.offer.id,
            budget_ms: self.config.deadline.as_millis() as u64,
            input,
        };
        match mode {
            Mode::Replicate { replicas } => {
                let (worker, result, certificate) = self
                    .replicate(target, &request, &ranking, replicas as usize, Vec::new())
                    .await?;
                Ok(Checked {
                    output: result.output,
                    worker,
                    verification: Verification {
                        mode,
                        certificate: Some(certificate),
                    },
                })
            }
            Mode::SpotCheck { rate } => self.spot_check(target, request, ranking, rate).await,
            Mode::None => self.spot_check(target, request, ranking, 0.0).await,
        }
    }

    /// Embeddings checked as `mode` says.
    pub async fn embed_checked(
        self: &Arc<Self>,
        target: &Target,
        texts: Vec<String>,
        mode: Mode,
    ) -> Result<(Embedded, Verification), RouteError> {
        let count = texts.len();
        let checked = self
            .run_checked(target, TaskInput::Embed { texts }, mode)
            .await?;
        let vectors = checked
            .output
            .vectors(count)
            .map_err(RouteError::Unavailable)?;
        let prompt_tokens = match checked.output {
            TaskOutput::Embeddings { prompt_tokens, .. } => prompt_tokens as usize,
            TaskOutput::Generation { .. } => 0,
        };
        let embedded = Embedded {
            vectors,
            prompt_tokens,
            worker: checked.worker,
        };
        Ok((embedded, checked.verification))
    }

    /// A chat completion checked as `mode` says (not streamed: the text comes once checked).
    pub async fn generate_checked(
        self: &Arc<Self>,
        target: &Target,
        messages: Vec<ChatMessage>,
        params: GenerateParams,
        mode: Mode,
    ) -> Result<(Completion, Verification), RouteError> {
        let budget = params.max_tokens;
        let input = TaskInput::Generate {
            messages,
            params,
            resume: Resume::default(),
        };
        let checked = self.run_checked(target, input, mode).await?;
        let TaskOutput::Generation {
            text,
            tokens,
            prompt_tokens,
            finish_reason,
            logprobs,
            counted,
        } = checked.output
        else {
            return Err(RouteError::Unavailable(
                "the worker returned embeddings for a chat".into(),
            ));
        };
        let counted = counted_tokens(budget, &tokens, counted);
        let completion = Completion {
            generation: Generation {
                text,
                tokens,
                prompt_tokens: prompt_tokens as usize,
                finish_reason,
                prompt_ms: 0.0,
                waited_ms: 0.0,
                decode_ms: 0.0,
                logprobs,
                counted,
            },
            worker: checked.worker,
            attempts: 1,
        };
        Ok((completion, checked.verification))
    }

    /// Runs `request` on distinct candidates of `ranking` (after the `prior` answers already
    /// in hand) until a quorum of equal signed claims is reached (see `mycel_core::verify`);
    /// returns one agreeing worker, its result and the certificate. Workers on the losing
    /// side of a settled quorum are noted as having disagreed, with the evidence kept.
    async fn replicate(
        &self,
        target: &Target,
        request: &TaskRequest,
        ranking: &[PeerId],
        replicas: usize,
        prior: Vec<(PeerId, Signed)>,
    ) -> Result<(PeerId, TaskResult, Certificate), RouteError> {
        let claims = prior.iter().map(|(p, (_, c))| (*p, c.clone())).collect();
        let draw = self.lock().rng.gen();
        let mut replication = Replication::new(ranking, replicas, claims, draw)
            .map_err(|e| RouteError::Unverified(e.to_string()))?;
        let mut results: Vec<(PeerId, TaskResult, Claim)> = prior
            .into_iter()
            .map(|(peer, (result, claim))| (peer, result, claim))
            .collect();
        let deadline = tokio::time::Instant::now() + self.config.deadline;
        let mut running = FuturesUnordered::new();
        let mut reasons = Vec::new();
        loop {
            match replication.step() {
                Next::Ask(peers) => {
                    for peer in peers {
                        running.push(self.signed_attempt(peer, target, request));
                    }
                }
                Next::Wait => {
                    tokio::select! {
                        Some((peer, outcome)) = running.next() => match outcome {
                            Outcome::Done((result, claim)) => {
                                replication.answered(peer, claim.clone());
                                results.push((peer, result, claim));
                            }
                            // This node's own model refuses the input: the caller's error.
                            Outcome::Final(e) if peer == self.net.peer_id() => return Err(e),
                            // A peer that calls the input invalid may lie to stop the task:
                            // the caller hears so only from more peers than may lie.
                            Outcome::Final(e) => {
                                if replication.refused(peer) {
                                    return Err(e);
                                }
                                reasons.push(format!("{peer}: {e}"));
                            }
                            Outcome::Retry { reason, fault } => {
                                replication.failed();
                                if let Some(outcome) = fault.trust() {
                                    self.record(&peer, outcome, None);
                                }
                                reasons.push(format!("{peer}: {reason}"));
                            }
                        },
                        _ = tokio::time::sleep_until(deadline) => {
                            self.judge_unsettled(request, &replication, &results);
                            return Err(self.unverified(
                                "the deadline passed before a quorum agreed",
                                &reasons,
                            ));
                        }
                    }
                }
                Next::Accept(judged) => {
                    self.metrics.verified.inc();
                    return self.settled(request, judged, results);
                }
                Next::GiveUp(why) => {
                    self.judge_unsettled(request, &replication, &results);
                    return Err(self.unverified(&why, &reasons));
                }
            }
        }
    }

    /// A replicated task that found no answer to accept, with what the replicas said.
    fn unverified(&self, why: &str, reasons: &[String]) -> RouteError {
        self.metrics.unverified.inc();
        if reasons.is_empty() {
            RouteError::Unverified(why.to_owned())
        } else {
            RouteError::Unverified(format!("{why}; {}", reasons.join("; ")))
        }
    }

    /// A quorum agreed on `agreed`: the certificate, and the verdicts applied.
    fn settled(
        &self,
        request: &TaskRequest,
        judged: Judged<PeerId>,
        results: Vec<(PeerId, TaskResult, Claim)>,
    ) -> Result<(PeerId, TaskResult, Certificate), RouteError> {
        let agreed = judged.output.clone();
        let certificate = self.judge(request, judged, &results)?;
        self.count(|s| s.completed += 1);
        let (peer, result, _) = results
            .into_iter()
            .find(|(_, _, claim)| *claim == agreed)
            .ok_or_else(|| RouteError::Unverified("no agreeing answer kept".into()))?;
        Ok((peer, result, certificate))
    }

    /// A task that ends unverified still makes the liars its answers prove pay
    /// ([`Replication::judged`]).
    fn judge_unsettled(
        &self,
        request: &TaskRequest,
        replication: &Replication<PeerId>,
        results: &[(PeerId, TaskResult, Claim)],
    ) {
        if let Some(judged) = replication.judged() {
            if let Err(e) = self.judge(request, judged, results) {
                debug!(task = %request.id, "could not judge an unverified task: {e}");
            }
        }
    }

    /// An output known right: its certificate, and what each worker's answer shows noted in
    /// its record; liars are cut off and their lies kept as evidence.
    fn judge(
        &self,
        request: &TaskRequest,
        judged: Judged<PeerId>,
        results: &[(PeerId, TaskResult, Claim)],
    ) -> Result<Certificate, RouteError> {
        let Judged {
            output: agreed,
            rule,
            verdicts,
        } = judged;
        let agreed = &agreed;
        let now = now_ms();
        let signers = results
            .iter()
            .filter(|(_, _, claim)| claim == agreed)
            .map(|(_, result, _)| Signer::from_parts(&result.public_key, &result.signature))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RouteError::Unverified(e.to_string()))?;
        let certificate = Certificate::issue(&self.keypair, agreed.clone(), rule, signers, now);
        let mut isolations = Vec::new();
        let mut state = self.lock();
        for (peer, verdict) in verdicts {
            let outcome = match verdict {
                Verdict::Agreed => {
                    state.reliability.success(&peer, now);
                    trust::Outcome::Success
                }
                Verdict::OtherEngine => {
                    state.reliability.failure(&peer, now);
                    trust::Outcome::Failure
                }
                Verdict::RefusedValidInput => {
                    self.metrics.invalid_results.inc();
                    trust::Outcome::Invalid
                }
                Verdict::Outvoted => {
                    self.metrics.disagreements.inc();
                    state.reliability.failure(&peer, now);
                    // The liar's signature over its claim (the certificate was just made
                    // here).
                    let lie = results.iter().find(|(p, _, _)| *p == peer);
                    let evidence = lie.and_then(|(_, result, claim)| {
                        let liar = Signer::from_parts(&result.public_key, &result.signature)
                            .ok()
                            .filter(|liar| liar.verify(&claim.signed_bytes()) == Ok(peer))?;
                        Some(Evidence {
                            lie: claim.clone(),
                            liar,
                            certificate: certificate.clone(),
                        })
                    });
                    if let Some(evidence) = evidence {
                        state.dirty.insert(peer);
                        let kept = state.evidence.entry(peer).or_default();
                        if kept.len() == EVIDENCE_PER_PEER {
                            kept.pop_front();
                        }
                        kept.push_back(evidence);
                    }
                    trust::Outcome::Disagreement
                }
            };
            if let Some(isolation) = state.note(&peer, outcome, now) {
                isolations.push((peer, isolation, outcome));
            }
        }
        drop(state);
        for (peer, isolation, outcome) in isolations {
            self.cut_off(peer, isolation.until);
            self.flush_now.notify_one();
            self.metrics.isolations.inc();
            warn!(%peer, task = %request.id, offences = isolation.offences, ?outcome,
                  "isolating a peer whose answer lost a quorum");
        }
        Ok(certificate)
    }

    /// Answers from the first candidate that answers with a signed result; with probability
    /// `rate` the task is then re-run on another candidate in the background and compared.
    async fn spot_check(
        self: &Arc<Self>,
        target: &Target,
        request: TaskRequest,
        ranking: Vec<PeerId>,
        rate: f64,
    ) -> Result<Checked, RouteError> {
        let mut reasons = Vec::new();
        let mut all_busy = true;
        let deadline = tokio::time::Instant::now() + self.config.deadline;
        for peer in &ranking {
            let attempt = self.signed_attempt(*peer, target, &request);
            let Ok((peer, outcome)) = tokio::time::timeout_at(deadline, attempt).await else {
                return Err(RouteError::Unavailable("the deadline passed".into()));
            };
            match outcome {
                Outcome::Done((result, claim)) => {
                    self.record(&peer, trust::Outcome::Success, None);
                    let draw = self.lock().rng.gen::<f64>();
                    let slot = verify::spot_checked(rate, draw)
                        .then(|| self.rechecks.clone().try_acquire_owned().ok())
                        .flatten();
                    if let Some(slot) = slot {
                        self.count(|s| s.spot_checks += 1);
                        self.metrics.spot_checks.inc();
                        let this = self.clone();
                        let (target, request, first) =
                            (target.clone(), request.clone(), (result.clone(), claim));
                        let ranking = ranking.clone();
                        // Spot checks share 4 slots: a slow peer must not hold them long.
                        let deadline = this.config.deadline.min(RECHECK_BUDGET);
                        tokio::spawn(async move {
                            let _slot = slot;
                            let recheck = this.recheck(&target, &request, &ranking, peer, first);
                            let _ = tokio::time::timeout(deadline, recheck).await;
                        });
                    }
                    let mode = if rate > 0.0 {
                        Mode::SpotCheck { rate }
                    } else {
                        Mode::None
                    };
                    return Ok(Checked {
                        output: result.output,
                        worker: peer,
                        verification: Verification {
                            mode,
                            certificate: None,
                        },
                    });
                }
                Outcome::Final(e) => return Err(e),
                Outcome::Retry { reason, fault } => {
                    if let Some(outcome) = fault.trust() {
                        self.record(&peer, outcome, None);
                    }
                    all_busy &= fault == Fault::None;
                    reasons.push(format!("{peer}: {reason}"));
                }
            }
        }
        Err(give_up(ranking.is_empty(), all_busy, reasons))
    }

    /// Re-runs a task `first_peer` answered on another candidate; when the two differ, a
    /// quorum settles which one lied.
    async fn recheck(
        &self,
        target: &Target,
        request: &TaskRequest,
        ranking: &[PeerId],
        first_peer: PeerId,
        first: Signed,
    ) {
        for peer in ranking.iter().filter(|p| **p != first_peer) {
            let (peer, outcome) = self.signed_attempt(*peer, target, request).await;
            match outcome {
                Outcome::Done(second) if second.1 == first.1 => {
                    // Two workers agreed: both answers are checked ones.
                    self.record(&peer, trust::Outcome::Success, None);
                    self.note(&peer, trust::Outcome::Success);
                    self.note(&first_peer, trust::Outcome::Success);
                    return;
                }
                Outcome::Done(second) => {
                    debug!(task = %request.id, %first_peer, %peer, "a spot check disagreed");
                    let prior = vec![(first_peer, first), (peer, second)];
                    if let Err(e) = self.replicate(target, request, ranking, 2, prior).await {
                        debug!(task = %request.id, "the spot check was not settled: {e}");
                    }
                    return;
                }
                // A peer that calls the input invalid: the next one checks.
                Outcome::Final(_) => {}
                Outcome::Retry { fault, .. } => {
                    if let Some(outcome) = fault.trust() {
                        self.record(&peer, outcome, None);
                    }
                }
            }
        }
    }

    /// Runs `request` on `peer` (this node included) for a signed result: this node signs
    /// its own; a peer's is checked (signature, engine, kind of output).
    async fn signed_attempt(
        &self,
        peer: PeerId,
        target: &Target,
        request: &TaskRequest,
    ) -> (PeerId, Outcome<Signed>) {
        let mut sink = Progress {
            resume: Resume::default(),
            pieces: None,
            logprobs: Vec::new(),
            format: None,
        };
        if peer == self.net.peer_id() {
            let Some(runner) = &target.local else {
                return (
                    peer,
                    retry("this node does not serve the model", Fault::None),
                );
            };
            let computed = self
                .compute(
                    runner,
                    &target.offer.name,
                    &request.input,
                    Requester::Local,
                    &mut sink,
                )
                .await;
            let outcome = match computed {
                Ok((output, timings)) => {
                    let result = TaskResult::sign(
                        &self.keypair,
                        request,
                        &target.offer.engine,
                        output,
                        timings,
                    );
                    let claim = result.claim(request);
                    Outcome::Done((result, claim))
                }
                Err(Refusal::Invalid(message)) => Outcome::Final(RouteError::Invalid(message)),
                Err(refusal @ (Refusal::Busy { .. } | Refusal::UnknownModel)) => {
                    retry(refusal.to_string(), Fault::None)
                }
                Err(refusal @ Refusal::Unavailable(_)) => {
                    retry(refusal.to_string(), Fault::Excused)
                }
                Err(refusal) => retry(refusal.to_string(), Fault::Failed),
            };
            return (peer, outcome);
        }
        let generating = matches!(request.input, TaskInput::Generate { .. });
        let outcome = self
            .remote(peer, request, generating.then_some(&mut sink))
            .await;
        let Outcome::Done((result, claim)) = outcome else {
            return (peer, outcome);
        };
        let shape = match (&request.input, &result.output) {
            (TaskInput::Embed { texts }, output) => output.vectors(texts.len()).map(|_| ()),
            (TaskInput::Generate { .. }, TaskOutput::Generation { .. }) => Ok(()),
            (TaskInput::Generate { .. }, _) => Err("embeddings for a chat".to_owned()),
        };
        if let Err(reason) = shape {
            self.net.penalise(peer, Rejection::Malformed).await;
            self.note(&peer, trust::Outcome::Invalid);
            return (peer, retry(reason, Fault::Failed));
        }
        if !target.offer.engine.is_empty() && result.engine != target.offer.engine {
            self.metrics.invalid_results.inc();
            return (
                peer,
                retry(
                    format!(
                        "the worker ran engine {:?}, not {:?}",
                        result.engine, target.offer.engine
                    ),
                    Fault::Failed,
                ),
            );
        }
        (peer, Outcome::Done((result, claim)))
    }

    fn note(&self, peer: &PeerId, outcome: trust::Outcome) {
        // Its next task goes on a new stream (the stream of an answer found wrong after it
        // was kept, say).
        self.lock_streams().forget(peer);
        let now = now_ms();
        if outcome == trust::Outcome::Invalid {
            self.metrics.invalid_results.inc();
        }
        let isolation = self.lock().note(peer, outcome, now);
        if let Some(isolation) = isolation {
            if matches!(
                outcome,
                trust::Outcome::Invalid | trust::Outcome::Disagreement
            ) {
                self.cut_off(*peer, isolation.until);
            }
            self.flush_now.notify_one();
            self.metrics.isolations.inc();
            warn!(%peer, offences = isolation.offences, ?outcome, "isolating a peer");
        }
    }

    /// A liar (a lost quorum, a forged or malformed answer) is cut off in the network as
    /// well until its isolation ends: disconnected, its gossip ignored, not selected for
    /// training. Takes the router's lock: never call it with the lock held.
    fn cut_off(&self, peer: PeerId, until: u64) {
        self.lock().cut.insert(peer);
        let net = self.net.clone();
        tokio::spawn(async move { net.isolate(peer, until).await });
    }

    /// What this node's tasks have shown about `peer`, if it did any.
    pub fn trust_of(&self, peer: &PeerId) -> Option<PeerTrust> {
        let now = now_ms();
        let state = self.lock();
        if !state.trust.knows(peer) {
            return None;
        }
        let decayed = state.trust.record(peer, now);
        let conduct = decayed.conduct;
        Some(PeerTrust {
            score: conduct.score(),
            successes: conduct.successes,
            failures: conduct.failures,
            timeouts: conduct.timeouts,
            disagreements: conduct.disagreements,
            invalid: conduct.invalid,
            offences: decayed.offences,
            isolated_until: (decayed.isolated_until > now).then_some(decayed.isolated_until),
            evidence: state.evidence.get(peer).map_or(0, VecDeque::len),
        })
    }

    /// Spot checks running in the background now.
    pub fn rechecks_running(&self) -> usize {
        MAX_RECHECKS - self.rechecks.available_permits()
    }

    /// A number from the router's RNG (seeded by `RouterConfig::seed` when set, so that a
    /// run can be replayed): the API's response ids, and the decoding seed a request leaves
    /// to the node.
    pub fn draw(&self) -> u64 {
        self.lock().rng.gen()
    }

    /// The default verification mode of this node.
    pub fn default_mode(&self) -> Mode {
        self.config.verify
    }

    /// The evidence kept of `peer`'s lies.
    pub fn evidence(&self, peer: &PeerId) -> Vec<Evidence> {
        self.lock()
            .evidence
            .get(peer)
            .map(|kept| kept.iter().cloned().collect())
            .unwrap_or_default()
    }

    // ---- the wire --------------------------------------------------------------------------

    /// Sends `request` to `peer` and reads its answer; chunks go to `progress`, when given.
    /// The answer's signature is checked.
    async fn remote(
        &self,
        peer: PeerId,
        request: &TaskRequest,
        mut progress: Option<&mut Progress>,
    ) -> Outcome<Signed> {
        let kept = self.lock_streams().take(&peer, self.clock_ms());
        if let Some(stream) = kept {
            match self
                .exchange(peer, stream, request, progress.as_deref_mut())
                .await
            {
                // The worker closed the stream while it was kept (its wait ran out, it
                // restarted, it closes after one task): nothing was run, so a new one is no
                // second attempt.
                Err(Unanswered { .. }) => self.count(|s| s.streams_stale += 1),
                Ok(outcome) => {
                    self.count(|s| s.streams_kept += 1);
                    return outcome;
                }
            }
        }
        let wait = self.config.attempt_timeout;
        let stream = match tokio::time::timeout(wait, self.net.open_task_stream(peer)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return retry(format!("cannot open a task stream: {e}"), Fault::Failed),
            Err(_) => return retry("opening a task stream timed out", Fault::Quiet),
        };
        match self.exchange(peer, stream, request, progress).await {
            Err(Unanswered { reason, fault }) => retry(reason, fault),
            Ok(outcome) => outcome,
        }
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, keepalive::Pool<PeerId, Stream>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the service started.
    fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Sends `request` on `stream` and reads the answer; a stream whose answer was whole and
    /// signed is kept for the next task to `peer`.
    async fn exchange(
        &self,
        peer: PeerId,
        mut stream: Stream,
        request: &TaskRequest,
        mut progress: Option<&mut Progress>,
    ) -> Result<Outcome<Signed>, Unanswered> {
        let wait = self.config.attempt_timeout;
        let unanswered = |reason: String, fault| Err(Unanswered { reason, fault });
        match tokio::time::timeout(wait, write_frame(&mut stream, request)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return unanswered(format!("cannot send the task: {e}"), Fault::of_stream(&e))
            }
            Err(_) => return Ok(retry("sending the task timed out", Fault::Quiet)),
        }
        // A stream that has begun moves on when it goes quiet far beyond its own pace.
        let begun = tokio::time::Instant::now();
        // A kept stream the worker had closed shows it at once; one that breaks later broke
        // on this task.
        let unread = |answered: bool| !answered && begun.elapsed() < STALE_WITHIN;
        let mut pace = mycel_core::pace::Pace::new(wait.as_millis() as u64);
        let mut answered = false;
        // Tokens a generation may still stream: no more than its budget past the resume
        // point; and text: no more than that many tokens' longest text (a worker that lists no
        // token ids, an upstream model's, is bounded too).
        let mut room = match &request.input {
            TaskInput::Generate { params, resume, .. } => {
                params.max_tokens.saturating_sub(resume.tokens.len())
            }
            TaskInput::Embed { .. } => 0,
        };
        let mut text_room = room.saturating_mul(mycel_core::task::MAX_TOKEN_BYTES);
        loop {
            let quiet = Duration::from_millis(pace.wait_ms());
            let frame =
                tokio::time::timeout(quiet, read_frame::<TaskFrame>(&mut stream, MAX_FRAME_BYTES))
                    .await;
            let outcome = match frame {
                Err(_) => {
                    let why = match quiet < wait {
                        true => format!(
                            "the worker went quiet for {} ms, far beyond its stream's pace",
                            quiet.as_millis()
                        ),
                        false => "the worker went quiet".to_owned(),
                    };
                    retry(why, Fault::Quiet)
                }
                Ok(Ok(None)) if unread(answered) => {
                    return unanswered("the worker closed the stream".into(), Fault::Failed)
                }
                Ok(Ok(None)) => retry("the worker closed the stream", Fault::Failed),
                Ok(Err(FrameError::Io(e))) if unread(answered) => {
                    return unanswered(format!("the stream failed: {e}"), Fault::of_stream(&e))
                }
                Ok(Err(FrameError::Io(e))) => {
                    retry(format!("the stream failed: {e}"), Fault::of_stream(&e))
                }
                Ok(Err(FrameError::Rejected(reason))) => {
                    self.net.penalise(peer, reason).await;
                    retry(
                        format!("the worker sent a bad message: {reason}"),
                        Fault::Failed,
                    )
                }
                Ok(Ok(Some(TaskFrame::Chunk {
                    text,
                    tokens,
                    logprobs,
                }))) => {
                    answered = true;
                    pace.piece(begun.elapsed().as_millis() as u64);
                    let Some(progress) = progress.as_deref_mut() else {
                        self.net.penalise(peer, Rejection::Malformed).await;
                        return Ok(retry(
                            "the worker streamed text for an embedding task",
                            Fault::Failed,
                        ));
                    };
                    let within = tokens.len() <= room && text.len() <= text_room;
                    let fits = match (within, progress.continues(&text)) {
                        (true, true) => request.check_logprobs(&tokens, &logprobs),
                        (false, _) => Err("more than the task's budget".to_owned()),
                        (_, false) => Err("text out of the requested format".to_owned()),
                    };
                    if let Err(reason) = fits {
                        self.net.penalise(peer, Rejection::Malformed).await;
                        self.note(&peer, trust::Outcome::Invalid);
                        return Ok(retry(
                            format!("the worker streamed a bad chunk: {reason}"),
                            Fault::Failed,
                        ));
                    }
                    room -= tokens.len();
                    text_room -= text.len();
                    let piece = Piece {
                        text,
                        tokens,
                        logprobs,
                    };
                    if !progress.deliver(piece).await {
                        Outcome::Final(RouteError::Unavailable("the caller left".into()))
                    } else {
                        continue;
                    }
                }
                // A refusal after text was streamed: no honest worker refuses once it began.
                Ok(Ok(Some(TaskFrame::Refused(refusal)))) if answered => {
                    retry(refusal.to_string(), Fault::Failed)
                }
                Ok(Ok(Some(TaskFrame::Refused(refusal)))) => match refusal {
                    Refusal::Invalid(message) => Outcome::Final(RouteError::Invalid(message)),
                    Refusal::Busy { .. } | Refusal::UnknownModel => {
                        retry(refusal.to_string(), Fault::None)
                    }
                    Refusal::Failed(_) => retry(refusal.to_string(), Fault::Failed),
                    Refusal::Unavailable(_) => retry(refusal.to_string(), Fault::Excused),
                },
                Ok(Ok(Some(TaskFrame::Done(result)))) => match result.verify(&peer, request) {
                    Ok(claim) => {
                        self.lock_streams().put(peer, stream, self.clock_ms());
                        return Ok(Outcome::Done((*result, claim)));
                    }
                    Err(reason) => {
                        self.net.penalise(peer, reason).await;
                        self.note(&peer, trust::Outcome::Invalid);
                        retry(
                            format!("the answer is not signed by the worker: {reason}"),
                            Fault::Failed,
                        )
                    }
                },
            };
            return Ok(outcome);
        }
    }

    // ---- the worker ------------------------------------------------------------------------

    /// Serves the task streams peers open to this node until the network stops.
    pub async fn serve(self: Arc<Self>, incoming: IncomingStreams) {
        let slots = Slots::new(MAX_INBOUND_TASKS, MAX_INBOUND_TASKS_PER_PEER);
        let past_share = ("task", crate::defences::TASK_STREAMS_PAST_SHARE);
        let defences = self.defences.clone();
        let idle = slots.idle();
        // Kept streams go when they are too old even while no task comes to use them: they
        // hold their connections open.
        let pruner = {
            let this = Arc::downgrade(&self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(KEPT_FOR).await;
                    let Some(this) = this.upgrade() else { break };
                    let now = this.clock_ms();
                    this.lock_streams().prune(now);
                }
            })
        };
        crate::slots::serve(incoming, slots, past_share, defences, |peer, stream| {
            let this = self.clone();
            let idle = idle.clone();
            async move { this.work(peer, stream, idle).await }
        })
        .await;
        pruner.abort();
    }

    /// Answers the tasks `peer` sends on `stream`, one after another. After an answer the
    /// stream stays open for the requester's next task (`next_task_wait`; a task on a new
    /// stream waits a round trip of negotiation more), unless the serve loop needs its slot
    /// for a newcomer (`idle`).
    async fn work(&self, peer: PeerId, mut stream: Stream, idle: crate::slots::Idle) {
        let mut answered = false;
        loop {
            let wait = match answered {
                true => self.config.next_task_wait,
                false => self.config.attempt_timeout,
            };
            let waiting = answered.then(|| idle.waiting());
            let read = tokio::time::timeout(
                wait,
                read_frame::<TaskRequest>(&mut stream, MAX_REQUEST_BYTES),
            );
            let request = tokio::select! {
                read = read => match read {
                    Ok(Ok(Some(request))) => request,
                    Ok(Err(FrameError::Rejected(reason))) => {
                        self.net.penalise(peer, reason).await;
                        let refusal =
                            Refusal::Invalid(format!("the task does not decode: {reason}"));
                        let _ = write_frame(&mut stream, &TaskFrame::Refused(refusal)).await;
                        return;
                    }
                    // Nothing more came: closed, not reset, so that a requester that has not
                    // read the last answer yet still does.
                    Err(_) if answered => break,
                    _ => return,
                },
                () = idle.crowded(), if answered => break,
            };
            drop(waiting);
            if !self.answer(peer, &mut stream, request).await {
                return;
            }
            if self.config.next_task_wait.is_zero() {
                break;
            }
            answered = true;
        }
        let _ = futures::AsyncWriteExt::close(&mut stream).await;
    }

    /// Runs one task `peer` sent on `stream` and writes the answer; false when the stream is
    /// to be closed (an invalid task, a write that failed, a fault injected).
    async fn answer(&self, peer: PeerId, stream: &mut Stream, request: TaskRequest) -> bool {
        if let Err(message) = request.check() {
            self.net.penalise(peer, Rejection::Malformed).await;
            let _ = write_frame(stream, &TaskFrame::Refused(Refusal::Invalid(message))).await;
            return false;
        }
        #[cfg(feature = "fault-injection")]
        if let Some(injector) = &self.injector {
            if injector.refuses() {
                let refusal = Refusal::Invalid("fault injection: refused as invalid".into());
                let _ = write_frame(stream, &TaskFrame::Refused(refusal)).await;
                return false;
            }
            match injector.before() {
                None => return false,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
        // The sender's budget, but never more than a task may take here.
        let budget = Duration::from_millis(request.budget_ms).min(self.config.max_task_budget);
        let answer = tokio::time::timeout(budget, self.run_task(peer, &request, stream)).await;
        let frame = match answer {
            Ok(Ok(result)) => TaskFrame::Done(Box::new(result)),
            Ok(Err(refusal)) => TaskFrame::Refused(refusal),
            Err(_) => {
                if Duration::from_millis(request.budget_ms) > budget {
                    self.defences.count(crate::defences::TASK_BUDGET_SPENT);
                }
                TaskFrame::Refused(Refusal::Failed("the task's time ran out".into()))
            }
        };
        let written = write_frame(stream, &frame).await.is_ok();
        written
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
        let (output, timings) = self
            .compute(
                &served.runner,
                &served.offer.name,
                &request.input,
                Requester::Peer(peer),
                &mut ChunkWriter(stream),
            )
            .await?;
        #[cfg(feature = "fault-injection")]
        let output = match &self.injector {
            Some(injector) => injector.output(output),
            None => output,
        };
        let result = TaskResult::sign(
            &self.keypair,
            request,
            &served.offer.engine,
            output,
            timings,
        );
        #[cfg(feature = "fault-injection")]
        let result = match &self.injector {
            Some(injector) => injector.result(result),
            None => result,
        };
        Ok(result)
    }

    /// `model`'s prompt for `messages` ([`crate::models::chat_prompt`]), counting a template
    /// stopped at its fuel or time limit; a text completion's prompt as it is.
    async fn prompt(
        &self,
        model: &Arc<mycel_ml::Generator>,
        messages: &[ChatMessage],
    ) -> Result<String, MlError> {
        if let Some(prompt) = ChatMessage::raw_prompt(messages) {
            return Ok(prompt.to_owned());
        }
        let prompt = crate::models::chat_prompt(model, messages).await;
        if prompt.as_ref().is_err_and(crate::models::template_limit) {
            self.defences.count(crate::defences::TEMPLATE_LIMIT);
        }
        prompt
    }

    /// Runs `input` on this node's `runner` for `requester`; generated text goes to `sink`.
    async fn compute<S: PieceSink + Send>(
        &self,
        runner: &Runner,
        name: &str,
        input: &TaskInput,
        requester: Requester<PeerId>,
        sink: &mut S,
    ) -> Result<(TaskOutput, Timings), Refusal> {
        let admission = self.models.admit(requester).map_err(|_| Refusal::Busy {
            queue: u32::try_from(self.models.queue_depth()).unwrap_or(u32::MAX),
        })?;
        let started = Instant::now();
        self.count(|s| s.worked += 1);
        match (runner, input) {
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
                Ok((TaskOutput::embeddings(&vectors, tokens), timings))
            }
            (
                Runner::Generate(model),
                TaskInput::Generate {
                    messages,
                    params,
                    resume,
                },
            ) => {
                let prompt = self
                    .prompt(model, messages)
                    .await
                    .map_err(|e| refusal(e.into()))?;
                let generation = self.models.generate_into(
                    admission,
                    model.clone(),
                    prompt,
                    params.clone(),
                    resume.clone(),
                    sink,
                );
                generated(generation.await)
            }
            (
                Runner::Upstream(upstream),
                TaskInput::Generate {
                    messages,
                    params,
                    resume,
                },
            ) => {
                let generation = self.models.upstream_into(
                    admission,
                    upstream.clone(),
                    messages.clone(),
                    params.clone(),
                    resume.clone(),
                    sink,
                );
                generated(generation.await)
            }
            _ => Err(Refusal::Invalid(format!(
                "{name} does not run this kind of task"
            ))),
        }
    }
}

/// A worker's output and timings for what a generation came to (with how long it waited for
/// its turn), or its refusal.
fn generated(
    result: Result<Option<(Generation, f64)>, RunError>,
) -> Result<(TaskOutput, Timings), Refusal> {
    let (generation, queue_ms) = result
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
        logprobs: generation.logprobs,
        counted: generation.counted.map(|n| n.min(u32::MAX as usize) as u32),
    };
    Ok((output, timings))
}

/// What the caller has received so far, and where its stream goes.
struct Progress {
    resume: Resume,
    /// Where pieces go; `None` for a replica, whose text nobody reads as it comes.
    pieces: Option<mpsc::Sender<Piece>>,
    /// The log-probabilities delivered, when the task asked for them: one per token of
    /// `resume`.
    logprobs: Vec<TokenLogprobs>,
    /// The format the task asked for, and where the text delivered so far is in it.
    format: Option<(
        Arc<mycel_core::grammar::Grammar>,
        mycel_core::grammar::Matcher,
    )>,
}

impl PieceSink for Progress {
    async fn take(&mut self, piece: Piece) -> bool {
        self.deliver(piece).await
    }
}

/// Sends a worker's pieces to the requester as chunks.
struct ChunkWriter<'a>(&'a mut Stream);

impl PieceSink for ChunkWriter<'_> {
    async fn take(&mut self, piece: Piece) -> bool {
        let chunk = TaskFrame::Chunk {
            text: piece.text,
            tokens: piece.tokens,
            logprobs: piece.logprobs,
        };
        write_frame(self.0, &chunk).await.is_ok()
    }
}

impl Progress {
    /// Whether `text`, a worker's whole answer to `request` that ended for `finish`, has the
    /// shape the task asked for: a whole value when it ended by itself (and no stop string
    /// could have cut it), the beginning of one when it ran out of tokens.
    fn fits(&self, request: &TaskRequest, text: &str, finish: FinishReason) -> bool {
        let (Some((grammar, _)), TaskInput::Generate { params, .. }) =
            (&self.format, &request.input)
        else {
            return true;
        };
        match finish == FinishReason::Stop && params.stop.is_empty() {
            true => grammar.matches(text.as_bytes()),
            false => grammar.begins(text.as_bytes()),
        }
    }

    /// Whether `text` may follow what was delivered, in the task's format.
    fn continues(&self, text: &str) -> bool {
        match &self.format {
            None => true,
            Some((grammar, matcher)) => matcher.clone().feed_all(grammar, text.as_bytes()),
        }
    }

    /// Hands `piece` to the caller and remembers its tokens and log-probabilities; `false`
    /// when the caller has gone.
    async fn deliver(&mut self, piece: Piece) -> bool {
        let Some(sender) = &self.pieces else {
            // A replica's stream: nobody reads it, and the final answer carries it all.
            return true;
        };
        self.resume.tokens.extend_from_slice(&piece.tokens);
        self.logprobs.extend_from_slice(&piece.logprobs);
        if let Some((grammar, matcher)) = &mut self.format {
            matcher.feed_all(grammar, piece.text.as_bytes());
        }
        if piece.text.is_empty() && piece.logprobs.is_empty() {
            return true;
        }
        self.resume.text_bytes += piece.text.len() as u64;
        sender.send(piece).await.is_ok()
    }
}

/// The count of tokens a worker gave in place of their ids (an upstream model's), kept only
/// when it listed none, and at most the task's `budget`: it feeds usage figures alone.
fn counted_tokens(budget: usize, tokens: &[u32], counted: Option<u32>) -> Option<usize> {
    counted
        .filter(|_| tokens.is_empty())
        .map(|n| (n as usize).min(budget))
}

fn refusal(e: RunError) -> Refusal {
    match e {
        RunError::Busy(queue) => Refusal::Busy {
            queue: u32::try_from(queue).unwrap_or(u32::MAX),
        },
        RunError::Model(MlError::Input(message)) => Refusal::Invalid(message),
        RunError::Model(e) => Refusal::Failed(e.to_string()),
        RunError::Unavailable(why) => Refusal::Unavailable(why),
    }
}

fn run_error<T>(e: RunError) -> Outcome<T> {
    match e {
        RunError::Busy(_) => retry(e.to_string(), Fault::None),
        RunError::Unavailable(why) => retry(why, Fault::Excused),
        RunError::Model(MlError::Input(message)) => Outcome::Final(RouteError::Invalid(message)),
        RunError::Model(e) => retry(e.to_string(), Fault::Failed),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_attempt_is_judged_by_its_kind_not_its_message() {
        use std::io::{Error, ErrorKind};
        assert_eq!(Fault::None.trust(), None);
        assert_eq!(Fault::Quiet.trust(), Some(trust::Outcome::Timeout));
        assert_eq!(Fault::Failed.trust(), Some(trust::Outcome::Failure));
        // What a message says does not count: a reset that mentions a time-out is a failure,
        // a time-out whatever its text is quiet.
        let reset = Error::new(ErrorKind::ConnectionReset, "timed out? no: went quiet");
        assert_eq!(Fault::of_stream(&reset), Fault::Failed);
        let timeout = Error::new(ErrorKind::TimedOut, "read");
        assert_eq!(Fault::of_stream(&timeout), Fault::Quiet);
    }
}
