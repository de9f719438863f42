//! Federated training: the participant side (train a round on a local dataset, answer with a
//! signed update; as a cluster head, gather members first) and the coordinator (run a job
//! round by round, aggregate robustly, evaluate, record every round so a restart resumes).
//!
//! The protocol is `/mycel/train/2` on raw streams: one stream per request, one
//! [`TrainRequest`] frame, one [`TrainReply`] frame (`mycel_core::fl`). Decisions (who takes
//! part, clusters, how updates combine) are mycel-core's; this module does the I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::stream::FuturesUnordered;
use futures::{AsyncWriteExt, FutureExt, StreamExt};
use mycel_core::aggregate::{self, ServerState, Update};
use mycel_core::compress::{Int8, TopK};
use mycel_core::fl::{
    self, Attack, Candidate, Compression, Gathered, JobId, JobSpec, JobTicket, Member, Payload,
    SignedUpdate, TrainFor, TrainReply, TrainRequest,
};
use mycel_core::id::ContentId;
use mycel_core::secagg;
use mycel_core::secround::{self, FromParticipant, RoundError, ToParticipant};
use mycel_core::statement::DatasetOffer;
use mycel_core::wire::{self, Rejection};
use mycel_core::Keypair;
use mycel_ml::train::{Classifier, Dataset, TrainParams};
use mycel_net::task::{
    read_frame, read_frame_sized, write_frame, write_framed, FrameError, IncomingStreams,
    TRAIN_PROTOCOL,
};
use mycel_net::{NetHandle, PeerId};
use mycel_store::Store;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::blobs::BlobService;

/// A peer gave no update because the round's deadline came first.
#[derive(Debug)]
struct Late;

impl std::fmt::Display for Late {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no answer before the round's deadline")
    }
}

impl std::error::Error for Late {}

/// What a participant answers when its training outlasted the round's deadline.
const DEADLINE_PASSED: &str = "the round's deadline passed while training";
/// Why a participant told to drop after sharing (tests, benchmarks) left a secure round.
const DROPPED_AFTER_SHARES: &str = "left after sharing (NodeConfig::train_drop_after_shares)";
/// The shortest a securely aggregated round waits for a step that involves no training.
const QUICK_STEP: Duration = Duration::from_secs(2);
/// How long after its deadline a securely aggregated round waits for its unmasking step.
const UNMASK_GRACE: Duration = Duration::from_secs(10);
/// Rounds whose shares a node remembers revealing (for [`Training::reveal_once`]).
const REVEALS_KEPT: usize = 4096;

/// Attempts a round gets when too few updates arrive, before the job fails. Each attempt that
/// fell short because peers were late doubles the round's deadline (up to [`MAX_STRETCH`]
/// times the job's): on a busy machine training takes longer than the job planned for.
const ROUND_ATTEMPTS: u32 = 5;
/// The most a round's deadline is stretched, as a multiple of the job's.
const MAX_STRETCH: u64 = 16;
/// The pause before a round's next attempt, times the attempts so far.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Trainings run at once on one node.
const CONCURRENT_TRAININGS: usize = 4;
/// Training requests read or answered at once on one node (each may hold a large buffer).
const CONCURRENT_REQUESTS: usize = 16;
/// Of those, at most this many from one peer: a peer that opens streams and sends nothing
/// cannot keep coordinators out.
const REQUESTS_PER_PEER: usize = 4;
/// How long a peer may take to send its request.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most weight-updates (epochs x rows x parameters) one round may ask of a participant.
const MAX_WORK: u64 = 200_000_000_000;
/// Most activations (batch x widest layer) one training step may need.
const MAX_ACTIVATIONS: u64 = 64 << 20;
/// Jobs whose top-k residuals a participant keeps.
const MAX_RESIDUALS: usize = 16;
/// Largest recorded job state decoded.
const MAX_RECORD_BYTES: usize = 256 << 20;

/// A dataset this node holds.
#[derive(Debug)]
pub struct LocalDataset {
    /// The tag jobs name.
    pub tag: String,
    /// The data.
    pub data: Dataset,
    /// Its digest (what is announced).
    pub digest: ContentId,
}

impl LocalDataset {
    /// Loads the dataset `source` names (see `mycel_ml::data::load_source`).
    pub fn load(tag: &str, source: &str) -> anyhow::Result<Self> {
        if tag.is_empty() || tag.len() > 64 {
            bail!("dataset tag {tag:?}: use 1 to 64 characters");
        }
        let data = mycel_ml::data::load_source(source)
            .with_context(|| format!("loading dataset {tag}={source}"))?;
        Ok(Self::new(tag, data))
    }

    /// Wraps data already in memory.
    pub fn new(tag: &str, data: Dataset) -> Self {
        let digest = data.digest();
        Self {
            tag: tag.to_owned(),
            data,
            digest,
        }
    }

    /// What is announced: tag, size and digest.
    pub fn offer(&self) -> DatasetOffer {
        DatasetOffer {
            tag: self.tag.clone(),
            samples: self.data.len() as u64,
            digest: self.digest,
        }
    }
}

/// One round's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// The round (1-based).
    pub round: u32,
    /// Peers asked (cluster heads and members).
    pub asked: u32,
    /// Updates aggregated (a cluster counts its contributors).
    pub participants: u32,
    /// Asked but no update in time (or refused).
    pub dropped: u32,
    /// Updates rejected (their senders penalised).
    pub rejected: u32,
    /// Mean local training loss, weighted by samples.
    pub train_loss: f32,
    /// Loss on the evaluation set (NaN without one).
    pub test_loss: f32,
    /// Accuracy on the evaluation set (NaN without one).
    pub accuracy: f32,
    /// Bytes of updates sent by all participants.
    pub bytes_up: u64,
    /// Bytes of requests (weights) sent to all participants.
    pub bytes_down: u64,
    /// Bytes of updates the coordinator received.
    pub bytes_root: u64,
    /// Wall time of the round, ms.
    pub ms: f64,
    /// The global model after the round, as a blob.
    pub model: Option<ContentId>,
    /// The ε the job had spent after the round (a differentially private job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Attempts the round took (more than 1 when too few updates arrived at first).
    #[serde(default = "one_attempt")]
    pub attempts: u32,
}

fn one_attempt() -> u32 {
    1
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Rounds are running.
    Running,
    /// All rounds done.
    Done,
    /// Stopped with this error.
    Failed(String),
}

/// A job's recorded state: enough to resume it after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job.
    pub id: JobId,
    /// Its spec.
    pub spec: JobSpec,
    /// Where it stands.
    pub state: JobState,
    /// Rounds completed.
    pub round: u32,
    /// The global weights after `round`.
    #[serde(with = "f32_bytes")]
    pub weights: Vec<f32>,
    /// Server optimizer state.
    #[serde(with = "f32_bytes")]
    pub server_m: Vec<f32>,
    /// Server optimizer state (FedAdam's second moment).
    #[serde(with = "f32_bytes")]
    pub server_v: Vec<f32>,
    /// How often each peer was asked (fair rotation).
    pub asked: BTreeMap<String, u32>,
    /// Per-round figures.
    pub metrics: Vec<RoundMetrics>,
    /// Wall time of the completed rounds, ms (summed across restarts).
    pub elapsed_ms: f64,
    /// The rounds after which the job was resumed (the coordinator had stopped).
    #[serde(default)]
    pub resumed_after: Vec<u32>,
    /// Why the job ended before its last round (its privacy budget), if it did.
    #[serde(default)]
    pub stopped: Option<String>,
    /// Peers two or more participants of one secure round named as sealing shares that do
    /// not open: not drawn again for the job (nobody can check the word, so their network
    /// reputation does not pay; a framed honest peer loses one job).
    #[serde(default)]
    pub suspects: BTreeSet<String>,
}

impl JobRecord {
    /// A job that has not run a round (and has no weights yet).
    fn empty(id: JobId, spec: JobSpec) -> Self {
        Self {
            id,
            spec,
            state: JobState::Running,
            round: 0,
            weights: Vec::new(),
            server_m: Vec::new(),
            server_v: Vec::new(),
            asked: BTreeMap::new(),
            metrics: Vec::new(),
            elapsed_ms: 0.0,
            resumed_after: Vec::new(),
            stopped: None,
            suspects: BTreeSet::new(),
        }
    }
}

mod f32_bytes {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(&mycel_core::fl::f32_to_le(v), s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let bytes: Vec<u8> = serde_bytes::deserialize(d)?;
        mycel_core::fl::f32_from_le(&bytes)
            .ok_or_else(|| serde::de::Error::custom("f32 bytes not a multiple of 4"))
    }
}

/// The training service of a node.
pub struct Training {
    net: NetHandle,
    keypair: Keypair,
    store: Arc<Store>,
    blobs: Arc<BlobService>,
    datasets: BTreeMap<String, Arc<LocalDataset>>,
    attack: Option<Attack>,
    /// Whose jobs this node trains for.
    train_for: TrainFor,
    residuals: Mutex<HashMap<(PeerId, JobId), TopK>>,
    running: Mutex<HashMap<JobId, JobRecord>>,
    launched: Mutex<HashSet<JobId>>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    slots: Arc<Semaphore>,
    /// Rounds stopped because their requester went away (or their deadline passed).
    abandoned: AtomicU64,
    /// This node's secret randomness for training: a private job's sampling and noise as its
    /// coordinator; a secure round's keys, shares and noise as a participant.
    rng: Mutex<StdRng>,
    /// Leaves securely aggregated rounds right after sharing (tests, benchmarks).
    drop_after_shares: bool,
}

impl std::fmt::Debug for Training {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Training")
            .field("datasets", &self.datasets.keys().collect::<Vec<_>>())
            .field("attack", &self.attack)
            .finish_non_exhaustive()
    }
}

impl Training {
    /// A training service holding `datasets`; `attack` poisons every update it sends (for
    /// benchmarks and tests of robust aggregation only).
    pub fn new(
        net: NetHandle,
        keypair: Keypair,
        store: Arc<Store>,
        blobs: Arc<BlobService>,
        datasets: Vec<Arc<LocalDataset>>,
        attack: Option<Attack>,
        train_for: TrainFor,
    ) -> Self {
        Self {
            train_for,
            net,
            keypair,
            store,
            blobs,
            datasets: datasets.into_iter().map(|d| (d.tag.clone(), d)).collect(),
            attack,
            residuals: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            launched: Mutex::new(Default::default()),
            background: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(CONCURRENT_TRAININGS)),
            abandoned: Default::default(),
            rng: Mutex::new(StdRng::from_entropy()),
            drop_after_shares: false,
        }
    }

    /// Makes this node leave securely aggregated rounds right after it sends its key shares,
    /// as a participant that crashes then would (see `NodeConfig::train_drop_after_shares`).
    pub fn dropping_after_shares(self, drop: bool) -> Self {
        Self {
            drop_after_shares: drop,
            ..self
        }
    }

    /// Seeds this node's secret randomness in training (see `NodeConfig::training_seed`);
    /// without a seed it comes from the OS.
    pub fn seeded(self, seed: Option<u64>) -> Self {
        match seed {
            Some(seed) => Self {
                rng: Mutex::new(StdRng::seed_from_u64(seed)),
                ..self
            },
            None => self,
        }
    }

    /// 32 bytes of this node's secret randomness (see `NodeConfig::training_seed`).
    fn secret_seed(&self) -> [u8; 32] {
        use rand::Rng;
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).gen()
    }

    /// Rounds this node is training now.
    pub fn trainings_running(&self) -> usize {
        CONCURRENT_TRAININGS - self.slots.available_permits()
    }

    /// Rounds this node stopped training because nobody waited for them any more: the
    /// requester closed the stream (it crashed, or gave up at its deadline), or the round's
    /// deadline passed.
    pub fn rounds_abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// What this node announces.
    pub fn offers(&self) -> Vec<DatasetOffer> {
        self.datasets.values().map(|d| d.offer()).collect()
    }

    /// Answers training requests until the node stops: at most [`CONCURRENT_REQUESTS`] at
    /// once, [`REQUESTS_PER_PEER`] of them for one peer (a stream past its share is closed).
    /// The answers run in a set owned by this task: when the node stops, they stop with it.
    pub async fn serve(self: Arc<Self>, incoming: IncomingStreams) {
        let slots = crate::slots::Slots::new(CONCURRENT_REQUESTS, REQUESTS_PER_PEER);
        let past_share = ("training", crate::defences::TRAINING_STREAMS_PAST_SHARE);
        let defences = self.blobs.defences.clone();
        crate::slots::serve(incoming, slots, past_share, defences, |peer, stream| {
            let this = self.clone();
            async move { this.answer(peer, stream).await }
        })
        .await;
    }

    async fn answer(&self, peer: PeerId, mut stream: mycel_net::task::Stream) {
        let read = read_frame(&mut stream, fl::MAX_REQUEST_BYTES);
        let request: TrainRequest = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read).await {
            Err(_) => return,
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None) | Err(FrameError::Io(_))) => return,
            Ok(Err(FrameError::Rejected(reason))) => {
                self.net.penalise(peer, reason).await;
                let _ = write_frame(&mut stream, &TrainReply::Refused(reason.to_string())).await;
                return;
            }
        };
        // A securely aggregated round's participant; a head of such a round (members to
        // gather) takes the plain path and sums its members securely.
        if request.secure.is_some() && request.members.is_empty() {
            return self.answer_secure(peer, stream, request).await;
        }
        // The requester sends nothing more: a read that ends means it closed the stream or
        // went away, and the round's training (CPU a busy machine needs) stops.
        let stop = Arc::new(AtomicBool::new(false));
        let work = self.train_round(peer, request, stop.clone());
        tokio::pin!(work);
        let mut probe = [0u8; 1];
        let outcome = tokio::select! {
            biased;
            outcome = &mut work => outcome,
            _ = futures::AsyncReadExt::read(&mut stream, &mut probe) => {
                stop.store(true, Ordering::Relaxed);
                self.abandoned.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "the requester went away; its round's training stopped");
                return;
            }
        };
        let reply = match outcome {
            Ok((update, gathered)) => TrainReply::Update { update, gathered },
            Err(Refuse::Malformed(why)) => {
                self.net.penalise(peer, Rejection::Malformed).await;
                TrainReply::Refused(why)
            }
            Err(Refuse::Other(why)) => TrainReply::Refused(why),
            Err(Refuse::Gone) => return,
        };
        let _ = write_frame(&mut stream, &reply).await;
        let _ = stream.close().await;
    }

    /// A securely aggregated round (`mycel_core::secround`): the round's steps on the
    /// request's stream, this node's training running beside the first of them. When the
    /// coordinator goes away or the round fails, the training stops.
    async fn answer_secure(
        &self,
        peer: PeerId,
        mut stream: mycel_net::task::Stream,
        request: TrainRequest,
    ) {
        let stop = Arc::new(AtomicBool::new(false));
        let result = self.secure_round(peer, &mut stream, &request, &stop).await;
        if let Err(refuse) = result {
            // Whatever stopped the round, its training stops too.
            let already = stop.swap(true, Ordering::Relaxed);
            let why = match refuse {
                Refuse::Malformed(why) => {
                    self.net.penalise(peer, Rejection::Malformed).await;
                    why
                }
                Refuse::Other(why) => why,
                Refuse::Gone => {
                    if !already {
                        self.abandoned.fetch_add(1, Ordering::Relaxed);
                    }
                    debug!(%peer, round = request.round, "the coordinator went away");
                    return;
                }
            };
            debug!(%peer, round = request.round, "secure round stopped: {why}");
            // A participant told to drop leaves without a word, as a crash would.
            if why != DROPPED_AFTER_SHARES {
                let _ = write_frame(&mut stream, &FromParticipant::Refused(why)).await;
            }
        }
        let _ = stream.close().await;
    }

    async fn secure_round(
        &self,
        from: PeerId,
        stream: &mut mycel_net::task::Stream,
        request: &TrainRequest,
        stop: &Arc<AtomicBool>,
    ) -> Result<(), Refuse> {
        let setup = request
            .secure
            .as_ref()
            .expect("a securely aggregated request");
        let (global, dataset) = self.prepare(from, request)?;
        let deadline = Instant::now() + Duration::from_millis(request.deadline_ms);
        // The unmasking comes once the coordinator has the updates, up to its deadline: a
        // little longer to wait for that.
        let last = deadline + UNMASK_GRACE;
        // A setup that names its coordinator (the requester, or the ticket's signer) would let
        // it subtract its own update from a sum of few.
        let named = setup.check().map_err(Refuse::Malformed)?;
        let signer = request
            .ticket
            .as_ref()
            .and_then(|t| mycel_core::PublicKey::try_decode_protobuf(&t.public_key).ok())
            .map(|k| k.to_peer_id());
        if named.contains(&from) || signer.is_some_and(|s| named.contains(&s)) {
            return Err(Refuse::Malformed(
                "a securely aggregated round whose setup names its coordinator".into(),
            ));
        }
        let mut rng = secround::secret_rng(self.secret_seed());
        let (mut round, keys) =
            secround::Participant::new(&self.keypair, request.job, request.round, setup, &mut rng)
                .map_err(refusal)?;
        let training = self.train_local(request, &global, &dataset, stop, deadline);
        tokio::pin!(training);
        let mut trained = None;
        let inbox = {
            let sharing = async {
                send(&mut *stream, &FromParticipant::Keys(keys)).await?;
                let ToParticipant::Roster(roster) = next_step(&mut *stream, deadline).await? else {
                    return Err(Refuse::Malformed("expected the roster".into()));
                };
                let sealed = round.share(&roster, &mut rng).map_err(refusal)?;
                send(&mut *stream, &FromParticipant::Shares(sealed)).await?;
                if self.drop_after_shares {
                    return Err(Refuse::Other(DROPPED_AFTER_SHARES.into()));
                }
                let ToParticipant::Inbox(inbox) = next_step(&mut *stream, deadline).await? else {
                    return Err(Refuse::Malformed("expected the sealed shares".into()));
                };
                Ok(inbox)
            };
            tokio::pin!(sharing);
            loop {
                tokio::select! {
                    done = &mut training, if trained.is_none() => trained = Some(done?),
                    inbox = &mut sharing => break inbox?,
                }
            }
        };
        let (delta, loss) = match trained {
            Some(done) => {
                stop.store(true, Ordering::Relaxed);
                done
            }
            // The coordinator sends nothing until it has this node's update: a read that ends
            // means it went away, and the training stops.
            None => {
                let mut probe = [0u8; 1];
                tokio::select! {
                    biased;
                    done = &mut training => {
                        // Done: a later stop is not an abandoned training.
                        stop.store(true, Ordering::Relaxed);
                        done?
                    }
                    read = futures::AsyncReadExt::read(&mut *stream, &mut probe) => {
                        return Err(match read {
                            Ok(n) if n > 0 => Refuse::Malformed(
                                "a step before this node's masked update".into(),
                            ),
                            _ => Refuse::Gone,
                        });
                    }
                }
            }
        };
        let samples = dataset.data.len() as u64;
        let values = match &setup.noise {
            // Distributed DP: clipped, noised from the OS's randomness, weighing 1.
            Some(noise) => {
                secround::noised(&delta, noise, &mut StdRng::from_seed(self.secret_seed()))
            }
            None => secround::pack(&delta, samples, loss, round.scale()),
        };
        let masked = match round.mask(&inbox, &values, samples, dataset.digest) {
            Ok(masked) => masked,
            // Shares that do not open: say whose, and send no update (and no secret).
            Err(RoundError::SecAgg(secagg::SecAggError::Unsealed(from, _))) => {
                round.accuse(from).map_err(refusal)?;
                let from = from as u32;
                send(&mut *stream, &FromParticipant::Unopened { from }).await?;
                return Ok(());
            }
            Err(e) => return Err(refusal(e)),
        };
        send(&mut *stream, &FromParticipant::Masked(masked)).await?;
        let ToParticipant::Confirm(senders) = next_step(&mut *stream, last).await? else {
            return Err(Refuse::Malformed("expected the senders list".into()));
        };
        let signature = round.confirm(&self.keypair, &senders).map_err(refusal)?;
        send(&mut *stream, &FromParticipant::Confirmed(signature)).await?;
        let ToParticipant::Unmask {
            senders,
            signatures,
        } = next_step(&mut *stream, last).await?
        else {
            return Err(Refuse::Malformed("expected the unmasking request".into()));
        };
        let reveal = round.reveal(&senders, &signatures).map_err(refusal)?;
        // Shares of one round are revealed once, even across restarts: two sums over nested
        // sets of the round's (deterministically trained) updates would give one update.
        if !self.reveal_once(from, request).await? {
            return Err(Refuse::Other(format!(
                "this node already revealed its shares for round {} of job {}",
                request.round, request.job
            )));
        }
        send(&mut *stream, &FromParticipant::Reveal(reveal)).await?;
        Ok(())
    }

    /// Records that this node reveals its shares for `request` from `coordinator`, on disk
    /// before anything is revealed: false when it did before for that coordinator's job and
    /// round (remembered for the last [`REVEALS_KEPT`] reveals, across restarts: a node that
    /// crashed and trains the same round again for a coordinator that asks again must not
    /// reveal a second sum). The same training under another job or round label is not
    /// refused: an honest user may run it again, and a slightly changed model would evade
    /// the check anyway (differences between rounds are what differential privacy bounds).
    /// A record that cannot be written refuses the reveal.
    async fn reveal_once(
        &self,
        coordinator: PeerId,
        request: &TrainRequest,
    ) -> Result<bool, Refuse> {
        let mut round = blake3::Hasher::new();
        round.update(b"mycel/secagg/revealed-round\0");
        wire::hash_encoded(
            &(coordinator.to_bytes(), request.job, request.round),
            &mut round,
        );
        let key = *round.finalize().as_bytes();
        let store = self.store.clone();
        let failed =
            |e: &dyn std::fmt::Display| Refuse::Other(format!("recording the reveal failed: {e}"));
        tokio::task::spawn_blocking(move || store.reveal_once(&key, REVEALS_KEPT))
            .await
            .map_err(|e| failed(&e))?
            .map_err(|e| failed(&e))
    }

    /// Checks a request and whether this node trains it: the global weights and the dataset.
    fn prepare(
        &self,
        from: PeerId,
        request: &TrainRequest,
    ) -> Result<(Vec<f32>, Arc<LocalDataset>), Refuse> {
        request.check().map_err(Refuse::Malformed)?;
        let parameters = request.model.parameters();
        if let Some(dataset) = self.datasets.get(&request.dataset) {
            // Bound the work and the activations a request may ask of this node.
            let rows = dataset.data.len() as u64;
            let work = u64::from(request.train.epochs)
                .saturating_mul(rows)
                .saturating_mul(parameters as u64);
            let width = match &request.model {
                fl::ModelSpec::Cnn { side, channels, .. } => side * side * channels,
                model => model.widths().into_iter().max().unwrap_or(0),
            };
            let activations = (request.train.batch as u64).min(rows.max(1)) * width as u64;
            if work > MAX_WORK || activations > MAX_ACTIVATIONS {
                return Err(Refuse::Other(format!(
                    "the round asks too much of this node ({work} weight-updates, \
                     {activations} activations per step)"
                )));
            }
        }
        let global = request
            .weights
            .decode(parameters)
            .map_err(|e| Refuse::Malformed(format!("the global weights: {e}")))?;
        // Only for jobs the operator allowed: an update can reveal the data it came from.
        let me = self.keypair.public().to_peer_id();
        fl::authorise(&self.train_for, request, &from, &me, mycel_net::now_ms()).map_err(
            |why| {
                self.blobs
                    .defences
                    .count(crate::defences::TRAINING_NOT_ALLOWED);
                Refuse::Other(why)
            },
        )?;
        let dataset = self
            .datasets
            .get(&request.dataset)
            .cloned()
            .ok_or_else(|| {
                Refuse::Other(format!(
                    "this node holds no dataset tagged {:?}",
                    request.dataset
                ))
            })?;
        Ok((global, dataset))
    }

    /// Trains this node's part of a round from `global` on `dataset`, until `deadline` at
    /// the latest: its update and loss, checked finite, poisoned if this node attacks.
    async fn train_local(
        &self,
        request: &TrainRequest,
        global: &[f32],
        dataset: &Arc<LocalDataset>,
        stop: &Arc<AtomicBool>,
        deadline: Instant,
    ) -> Result<(Vec<f32>, f32), Refuse> {
        // The slot goes with the training thread: a stopped round holds it until its
        // thread has stopped too.
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refuse::Other("busy: training other rounds".into()))?;
        let (model, train) = (request.model.clone(), request.train);
        let (global, data) = (global.to_vec(), dataset.clone());
        let seed = fl::participant_seed(request.seed, &dataset.digest);
        let flag = stop.clone();
        let training = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            local_update(&model, &train, &global, &data.data, seed, &flag)
        });
        // Training past the round's deadline helps nobody: it stops there.
        let late = tokio::time::sleep_until(deadline.into());
        let (mut delta, loss) = tokio::select! {
            done = training => done
                .map_err(|e| Refuse::Other(format!("training failed: {e}")))?
                .map_err(|e| Refuse::Other(format!("training failed: {e:#}")))?,
            () = late => {
                stop.store(true, Ordering::Relaxed);
                self.abandoned.fetch_add(1, Ordering::Relaxed);
                return Err(Refuse::Other(DEADLINE_PASSED.into()));
            }
        };
        if !loss.is_finite() || delta.iter().any(|v| !v.is_finite()) {
            return Err(Refuse::Other(
                "local training diverged (values not finite); a smaller lr may help".into(),
            ));
        }
        if Instant::now() > deadline {
            return Err(Refuse::Other(DEADLINE_PASSED.into()));
        }
        if let Some(attack) = self.attack {
            let mut rng =
                StdRng::seed_from_u64(fl::participant_seed(request.seed ^ 1, &dataset.digest));
            attack.apply(&mut delta, &mut rng);
        }
        Ok((delta, loss))
    }

    /// Trains one round as asked (and, as a cluster head, gathers the members).
    async fn train_round(
        &self,
        from: PeerId,
        request: TrainRequest,
        stop: Arc<AtomicBool>,
    ) -> Result<(SignedUpdate, Gathered), Refuse> {
        let (global, dataset) = self.prepare(from, &request)?;
        let parameters = request.model.parameters();
        let deadline = Instant::now() + Duration::from_millis(request.deadline_ms);
        let gather = async {
            if request.members.is_empty() {
                return (Vec::new(), Gathered::default(), None);
            }
            let mut forward = request.clone();
            forward.members = Vec::new();
            // Members answer a little before the head must.
            forward.deadline_ms = request.deadline_ms.saturating_mul(8) / 10;
            let cut = Instant::now() + Duration::from_millis(forward.deadline_ms);
            let peers: Vec<(PeerId, Vec<String>)> = request
                .members
                .iter()
                .map(|m| (m.peer, m.addrs.clone()))
                .collect();
            if let Some(setup) = &request.secure {
                // The head of a securely aggregated cluster coordinates its members' secure
                // sum: it learns their sum, and the requester only the cluster's.
                // At least three in the sum, and done a little before this head must answer.
                let min = (setup.quorum() as u32).max(secround::MIN_PARTICIPANTS as u32);
                let finish_by = deadline - Duration::from_millis(request.deadline_ms / 10);
                let outcome = self
                    .ask_secure(
                        &peers,
                        &forward,
                        SecureBounds {
                            cut,
                            min,
                            finish_by: Some(finish_by),
                        },
                        parameters,
                        &HashMap::new(),
                    )
                    .await;
                // Whom members named for shares that did not open stays with this head: the
                // root could not check it (a head could frame its members), and a clustered
                // round is not drawn again anyway (docs/ARCHITECTURE.md).
                let why = outcome.why.join("; ");
                return (
                    Vec::new(),
                    outcome.gathered,
                    Some(outcome.summed.ok_or(why)),
                );
            }
            let outcome = self
                .ask_all(&peers, &forward, cut, parameters, &HashMap::new())
                .await;
            (outcome.updates, outcome.gathered, None)
        };
        let local = self.train_local(&request, &global, &dataset, &stop, deadline);
        // A head that cannot train (busy, too late) stops gathering at once: its members'
        // secure sum would be learnt, and their one reveal spent, for nothing.
        let ((gathered_updates, gathered, summed), (delta, loss)) =
            futures::future::try_join(gather.map(Ok), local).await?;
        let samples = dataset.data.len() as u64;
        if request.members.is_empty() {
            let payload = match request.compression {
                Compression::None => Payload::dense(&delta),
                Compression::TopK { fraction } => {
                    let mut residuals = self.residuals.lock().unwrap_or_else(|e| e.into_inner());
                    // Kept per coordinator and job, for a few jobs at a time.
                    if residuals.len() >= MAX_RESIDUALS
                        && !residuals.contains_key(&(from, request.job))
                    {
                        residuals.clear();
                    }
                    let state = residuals.entry((from, request.job)).or_default();
                    if !state.residual.is_empty() && state.residual.len() != delta.len() {
                        state.residual.clear();
                    }
                    Payload::Sparse(state.compress(&delta, fraction))
                }
                Compression::Int8 => Payload::Int8(Int8::compress(&delta)),
            };
            let update = SignedUpdate::sign(
                &self.keypair,
                request.job,
                request.round,
                samples,
                loss,
                dataset.digest,
                1,
                payload,
            );
            return Ok((update, Gathered::default()));
        }
        // A cluster head combines its own update with its members' by the job's rule; in a
        // securely aggregated job, with its members' secure sum by FedAvg (the job's rule is
        // for the requester, over clusters).
        let mut all = gathered_updates;
        let mut rule = request.aggregator;
        if let Some(summed) = summed {
            // Without the members' sum the head's own update would go out alone, in the clear.
            let summed = summed.map_err(|why| {
                Refuse::Other(format!("the cluster's secure sum did not complete: {why}"))
            })?;
            all.push(Received {
                delta: summed.delta,
                samples: summed.samples,
                loss: summed.loss,
                data: summed.data,
                contributors: summed.contributors,
            });
            rule = fl::AggregatorSpec::Fedavg { iqr: None };
        }
        all.push(Received {
            delta,
            samples,
            loss,
            data: dataset.digest,
            contributors: 1,
        });
        let combined = combine(&rule, request.compression, all)
            .map_err(|e| Refuse::Other(format!("cannot combine the cluster's updates: {e}")))?;
        debug!(%from, round = request.round, contributors = combined.contributors, "cluster update");
        let update = SignedUpdate::sign(
            &self.keypair,
            request.job,
            request.round,
            combined.samples,
            combined.loss,
            combined.data,
            combined.contributors,
            Payload::dense(&combined.delta),
        );
        Ok((update, gathered))
    }

    /// Sends `request` to every peer at once and collects what arrives before `cut`.
    async fn ask_all(
        &self,
        peers: &[Addressed],
        request: &TrainRequest,
        cut: Instant,
        parameters: usize,
        samples_cap: &HashMap<PeerId, u64>,
    ) -> Outcome {
        let body = own_frame(request);
        // A plain participant speaks for itself; a head for at most itself and its members.
        let most_contributors = 1 + request.members.len() as u32;
        let mut pending: FuturesUnordered<_> = peers
            .iter()
            .map(|(peer, addrs)| {
                let body = &body;
                async move {
                    let asking = async {
                        let mut stream = self.send_request(*peer, addrs, body).await?;
                        read_reply::<TrainReply>(&mut stream).await
                    };
                    let result = tokio::time::timeout_at(cut.into(), asking)
                        .await
                        .map_err(|_| anyhow::Error::new(Late));
                    (*peer, result.and_then(|r| r))
                }
            })
            .collect();
        let mut outcome = Outcome::default();
        outcome.gathered.asked = peers.len() as u32;
        outcome.gathered.bytes_down = body.len() as u64 * peers.len() as u64;
        while let Some((peer, result)) = pending.next().await {
            match result {
                Ok((TrainReply::Update { update, gathered }, bytes)) => {
                    // Only a head reports on members, and on no more than it was given.
                    let mut reported = if request.members.is_empty() {
                        Gathered::default()
                    } else {
                        gathered.capped(most_contributors)
                    };
                    reported.bytes_up = reported.bytes_up.saturating_add(bytes);
                    let g = &mut outcome.gathered;
                    g.add(&reported);
                    outcome.root_bytes = outcome.root_bytes.saturating_add(bytes);
                    let opened = update
                        .open(&peer, request.job, request.round, parameters)
                        .and_then(|delta| {
                            // Claims the sender cannot back: more contributors than it was
                            // asked to gather, a payload other than the job's compression.
                            let kind_ok = matches!(
                                (&update.payload, request.compression),
                                (Payload::Dense(_), _)
                                    | (Payload::Sparse(_), Compression::TopK { .. })
                                    | (Payload::Int8(_), Compression::Int8)
                            );
                            if update.contributors > most_contributors || !kind_ok {
                                return Err(Rejection::Malformed);
                            }
                            Ok(delta)
                        });
                    match opened {
                        Ok(delta) => outcome.updates.push(Received {
                            delta,
                            // No more samples than the peer (or its cluster) announced.
                            samples: match samples_cap.get(&peer) {
                                Some(cap) if update.samples > *cap => {
                                    self.blobs
                                        .defences
                                        .count(crate::defences::TRAINING_SAMPLES_CAPPED);
                                    *cap
                                }
                                _ => update.samples,
                            },
                            loss: update.loss,
                            data: update.data,
                            contributors: update.contributors,
                        }),
                        Err(reason) => {
                            warn!(%peer, %reason, round = request.round, "update rejected");
                            self.net.penalise(peer, reason).await;
                            g.rejected = g.rejected.saturating_add(1);
                            outcome.note(peer, format_args!("update rejected: {reason}"));
                        }
                    }
                }
                Ok((TrainReply::Refused(why), _)) => {
                    // Not counted late on its word: a participant's own deadline falls after
                    // this node's cut, so a late one is already counted as such.
                    debug!(%peer, %why, "participant refused");
                    outcome.gathered.dropped += most_contributors;
                    outcome.note(peer, format_args!("refused: {why}"));
                }
                Err(e) => self.lost(&mut outcome, peer, &e, true).await,
            }
        }
        outcome
    }

    /// A peer that gave no reply: penalised when what it sent was refused (counted
    /// rejected), counted dropped otherwise (and late, when it missed a deadline that waits
    /// for training and `counts_late`).
    async fn lost(
        &self,
        outcome: &mut Outcome,
        peer: PeerId,
        e: &anyhow::Error,
        counts_late: bool,
    ) {
        if let Some(reason) = e.downcast_ref::<Rejection>() {
            warn!(%peer, "reply rejected: {e:#}");
            self.net.penalise(peer, *reason).await;
            outcome.gathered.rejected += 1;
        } else {
            debug!(%peer, "participant dropped: {e:#}");
            if counts_late && e.downcast_ref::<Late>().is_some() {
                outcome.late += 1;
            }
            outcome.gathered.dropped += 1;
            outcome.dropped.push(peer);
        }
        outcome.note(peer, format_args!("{e:#}"));
    }

    /// Opens a training stream to `peer` (at `addrs` too, if given) and sends it `frame`.
    async fn send_request(
        &self,
        peer: PeerId,
        addrs: &[String],
        frame: &[u8],
    ) -> anyhow::Result<mycel_net::task::Stream> {
        if !addrs.is_empty() {
            // A cluster head may be asked to gather members it never met: the coordinator
            // passes on where they listen.
            let addrs = addrs.iter().filter_map(|a| a.parse().ok()).collect();
            self.net.add_addresses(peer, addrs).await?;
        }
        let mut stream = self.net.open_bulk_stream(peer, TRAIN_PROTOCOL).await?;
        write_framed(&mut stream, frame).await?;
        Ok(stream)
    }

    /// A securely aggregated round with `peers`, whom `request.secure` names in this order:
    /// the round's steps (`mycel_core::secround`) on one stream per participant. A
    /// participant that fails a step, refuses, misbehaves or is late leaves the round (its
    /// stream closes, its secrets are rebuilt from the others' shares); each step but the
    /// last waits until `cut` at most. The outcome holds the unmasked sum, or why there is
    /// none.
    async fn ask_secure(
        &self,
        peers: &[Addressed],
        request: &TrainRequest,
        bounds: SecureBounds,
        parameters: usize,
        samples_cap: &HashMap<PeerId, u64>,
    ) -> Outcome {
        let SecureBounds {
            cut,
            min,
            finish_by,
        } = bounds;
        let mut outcome = Outcome::default();
        outcome.gathered.asked = peers.len() as u32;
        // The steps that involve no training are quick: one peer that never answers must not
        // hold them (and so everyone else) until the round's cut.
        let quick = || {
            let step = Duration::from_millis(request.deadline_ms / 5).max(QUICK_STEP);
            cut.min(Instant::now() + step)
        };
        let setup = request
            .secure
            .as_ref()
            .expect("a securely aggregated request");
        let mut round =
            match secround::Coordinator::new(request.job, request.round, setup, parameters) {
                Ok(round) => round,
                Err(e) => {
                    outcome.gathered.dropped = peers.len() as u32;
                    outcome.why.push(format!("the round's setup: {e}"));
                    return outcome;
                }
            };
        // The request on a stream of its own to each, answered with the participant's keys.
        let body = own_frame(request);
        let opening_cut = quick();
        let opened =
            futures::future::join_all(peers.iter().enumerate().map(|(index, (peer, addrs))| {
                let body = &body;
                async move {
                    let opening = async {
                        let mut stream = self.send_request(*peer, addrs, body).await?;
                        let reply = secure_reply(&mut stream).await;
                        anyhow::Ok((stream, reply))
                    };
                    match tokio::time::timeout_at(opening_cut.into(), opening).await {
                        Ok(Ok((stream, reply))) => (*peer, index, Some(stream), reply),
                        Ok(Err(e)) => (*peer, index, None, Err(e)),
                        Err(_) => (*peer, index, None, Err(anyhow::Error::new(Late))),
                    }
                }
            }))
            .await;
        outcome.gathered.bytes_down += body.len() as u64 * peers.len() as u64;
        let mut live = self
            .settle(&mut outcome, opened, false, |i, reply| match reply {
                FromParticipant::Keys(keys) => round.keys(i, keys),
                _ => Err(RoundError::Bad("expected keys".into())),
            })
            .await;
        let roster = match round.roster() {
            Ok(roster) => own_frame(&ToParticipant::Roster(roster)),
            Err(e) => return secure_failed(outcome, live, e),
        };
        let replies = self.step(&mut outcome, live, |_| &roster, quick()).await;
        live = self
            .settle(&mut outcome, replies, false, |i, reply| match reply {
                FromParticipant::Shares(sealed) => round.shares(i, sealed),
                _ => Err(RoundError::Bad("expected sealed shares".into())),
            })
            .await;
        if let Err(e) = round.shared() {
            return secure_failed(outcome, live, e);
        }
        let inboxes: HashMap<usize, Vec<u8>> = live
            .iter()
            .map(|(_, i, _)| (*i, own_frame(&ToParticipant::Inbox(round.inbox(*i)))))
            .collect();
        let replies = self.step(&mut outcome, live, |i| &inboxes[&i], cut).await;
        live = self
            .settle(&mut outcome, replies, true, |i, reply| match reply {
                FromParticipant::Masked(masked) => round.masked(i, masked),
                FromParticipant::Unopened { from } => round.unopened(i, from),
                _ => Err(RoundError::Bad("expected a masked update".into())),
            })
            .await;
        // Shares that do not open: the accuser and the sealer are left out of the sum (the
        // round goes on while enough remain). An accusation cannot be checked (the accuser
        // shows no secret), so nobody's reputation pays: two liars could frame an honest
        // sealer. A sealer named by two or more is not drawn again for the job; a sealer and
        // its lone accuser (one of them misbehaved) not again for the round.
        for (u, accusers) in round.accusations() {
            let Some(peer) = round.peer(u) else {
                continue;
            };
            warn!(%peer, round = request.round, accusers = accusers.len(), "named as sealing shares that do not open");
            outcome.note(
                peer,
                format_args!("{} said its shares do not open", accusers.len()),
            );
            if round.sent(u) {
                // It sent its update, which is left out.
                outcome.gathered.dropped += 1;
            }
            if accusers.len() >= 2 {
                outcome.suspects.push(peer);
            } else {
                outcome.benched.push(peer);
                outcome
                    .benched
                    .extend(accusers.iter().filter_map(|&a| round.peer(a)));
            }
        }
        // Those that accused send no update.
        outcome.gathered.dropped += round.accusers() as u32;
        // Too few to make the round count: it stops before anything is unmasked (a sum is
        // unmasked at most once per round: two over nested sets would give one update).
        let senders = match round.senders() {
            Ok(senders) if senders.len() >= min as usize => {
                // Only those whose update is summed sign (not an accuser, nor an accused
                // sealer).
                live.retain(|(_, i, _)| senders.contains(&(*i as u32)));
                own_frame(&ToParticipant::Confirm(senders))
            }
            Ok(senders) => {
                let e = RoundError::TooFew(format!(
                    "{} participants sent their masked update, the job needs {min}",
                    senders.len()
                ));
                return secure_failed(outcome, live, e);
            }
            Err(e) => return secure_failed(outcome, live, e),
        };
        // Answered at once from here: the training is done.
        let mut until = Instant::now() + UNMASK_GRACE / 2;
        if let Some(finish_by) = finish_by {
            until = until.min(finish_by);
        }
        let replies = self.step(&mut outcome, live, |_| &senders, until).await;
        live = self
            .settle(&mut outcome, replies, false, |i, reply| match reply {
                FromParticipant::Confirmed(signature) => round.confirmed(i, signature),
                _ => Err(RoundError::Bad("expected a signed senders list".into())),
            })
            .await;
        let unmasking = match round.unmasking() {
            Ok(unmasking) => own_frame(&unmasking),
            Err(e) => return secure_failed(outcome, live, e),
        };
        // From here a sum may be unmasked: the round is not drawn again, whatever happens.
        outcome.unmask_asked = true;
        let replies = self.step(&mut outcome, live, |_| &unmasking, until).await;
        live = self
            .settle(&mut outcome, replies, false, |i, reply| match reply {
                FromParticipant::Reveal(reveal) => round.reveal(i, reveal),
                _ => Err(RoundError::Bad("expected shares for unmasking".into())),
            })
            .await;
        drop(live);
        let summed = match round.finish() {
            Ok(summed) => summed,
            Err(e) => return secure_failed(outcome, Vec::new(), e),
        };
        if let Some(peer) = summed.blamed.and_then(|i| round.peer(i)) {
            warn!(%peer, round = request.round, "its shares did not rebuild a secret; left out");
            self.net.penalise(peer, Rejection::Malformed).await;
            outcome.gathered.rejected += 1;
        }
        let mut used: Vec<(u64, ContentId)> = summed
            .contributors
            .iter()
            .filter_map(|&(i, samples, data)| {
                let peer = round.peer(i)?;
                let cap = samples_cap.get(&peer).copied().unwrap_or(samples);
                Some((samples.min(cap), data))
            })
            .collect();
        used.sort_by_key(|(_, data)| *data);
        let mut data = blake3::Hasher::new();
        for (_, d) in &used {
            data.update(&d.0);
        }
        if summed.delta.iter().any(|v| !v.is_finite()) || !summed.loss.is_finite() {
            outcome.why.push("the unmasked sum is not finite".into());
            return outcome;
        }
        // With distributed DP the requester divides the sum itself (by the expected number of
        // participants, which does not depend on who sent).
        let delta = if setup.noise.is_some() {
            summed.delta.iter().map(|v| v * summed.weight).collect()
        } else {
            summed.delta
        };
        outcome.summed = Some(Combined {
            delta,
            samples: used.iter().map(|(s, _)| *s).fold(0u64, u64::saturating_add),
            loss: summed.loss,
            data: ContentId(*data.finalize().as_bytes()),
            contributors: used.len() as u32,
        });
        outcome
    }

    /// Sends each live participant of a secure round its step (`step` by index) and reads
    /// its reply, all at once, until `until`.
    async fn step<'a>(
        &self,
        outcome: &mut Outcome,
        live: Vec<SecureLink>,
        step: impl Fn(usize) -> &'a [u8],
        until: Instant,
    ) -> Vec<SecureReply> {
        for (_, i, _) in &live {
            outcome.gathered.bytes_down += step(*i).len() as u64;
        }
        futures::future::join_all(live.into_iter().map(|(peer, i, mut stream)| {
            let frame = step(i);
            async move {
                let exchange = async {
                    write_framed(&mut stream, frame).await?;
                    secure_reply(&mut stream).await
                };
                let reply = match tokio::time::timeout_at(until.into(), exchange).await {
                    Ok(reply) => reply,
                    Err(_) => Err(anyhow::Error::new(Late)),
                };
                (peer, i, Some(stream), reply)
            }
        }))
        .await
    }

    /// A secure round's replies to one step, each handed to `take` (the round's checks):
    /// the participants still in the round. One that failed, refused, was late or sent
    /// what the round refuses leaves (a misbehaving one is penalised).
    async fn settle(
        &self,
        outcome: &mut Outcome,
        replies: Vec<SecureReply>,
        training: bool,
        mut take: impl FnMut(usize, FromParticipant) -> Result<(), RoundError>,
    ) -> Vec<SecureLink> {
        let mut live = Vec::new();
        for (peer, i, stream, reply) in replies {
            let failed = match reply {
                Ok((reply, bytes)) => {
                    outcome.gathered.bytes_up = outcome.gathered.bytes_up.saturating_add(bytes);
                    outcome.root_bytes = outcome.root_bytes.saturating_add(bytes);
                    match take(i, reply) {
                        Ok(()) => None,
                        Err(RoundError::Bad(why)) => {
                            warn!(%peer, "secure round: {why}");
                            self.net.penalise(peer, Rejection::Malformed).await;
                            outcome.gathered.rejected += 1;
                            outcome.note(peer, format_args!("rejected: {why}"));
                            Some(())
                        }
                        Err(e) => {
                            outcome.note(peer, format_args!("{e}"));
                            Some(())
                        }
                    }
                }
                Err(e) => {
                    // Late only in the step that waits for training: the deadline may be
                    // short; the quick steps' lateness is not the training's.
                    self.lost(outcome, peer, &e, training).await;
                    Some(())
                }
            };
            if let (None, Some(stream)) = (failed, stream) {
                live.push((peer, i, stream));
            }
        }
        live
    }

    /// Starts `spec` in the background (or resumes it, if it ran here before and did not
    /// finish); returns its id at once. Starting a job that is already running does nothing.
    pub fn start(self: &Arc<Self>, spec: JobSpec) -> Result<JobId, String> {
        spec.check()?;
        let id = spec.id();
        if !self
            .launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id)
        {
            return Ok(id);
        }
        // Visible as running from now on, before the task has loaded anything.
        let mut shown = match self.job(id) {
            Ok(Some(record)) => record,
            _ => JobRecord::empty(id, spec.clone()),
        };
        if shown.state != JobState::Done {
            shown.state = JobState::Running;
        }
        self.set_running(&shown);
        let this = self.clone();
        let handle = tokio::spawn(async move {
            // Cleared however the task ends (a panic included), so the job can start again.
            let _launch = Launched(this.clone(), id);
            match this.run_job(spec, |_| {}).await {
                Ok(record) => info!(job = %id, rounds = record.round, "training job done"),
                Err(e) => warn!(job = %id, "training job failed: {e:#}"),
            }
        });
        let mut background = self.background.lock().unwrap_or_else(|e| e.into_inner());
        background.retain(|h| !h.is_finished());
        background.push(handle);
        Ok(id)
    }

    /// Stops the jobs started in the background (their recorded state stays).
    pub fn stop(&self) {
        for handle in self
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            handle.abort();
        }
    }

    /// Resumes every recorded job that was running when the node stopped.
    pub fn resume_all(self: &Arc<Self>) {
        let jobs = match self.jobs() {
            Ok(jobs) => jobs,
            Err(e) => {
                warn!("cannot read the recorded training jobs: {e:#}");
                return;
            }
        };
        for job in jobs.into_iter().filter(|j| j.state == JobState::Running) {
            info!(job = %job.id, round = job.round, "resuming an interrupted training job");
            let _ = self.start(job.spec);
        }
    }

    /// A job's state: the running copy, else the recorded one.
    pub fn job(&self, id: JobId) -> anyhow::Result<Option<JobRecord>> {
        if let Some(record) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(Some(record.clone()));
        }
        self.stored(id)
    }

    /// A job's state as last stored on disk.
    fn stored(&self, id: JobId) -> anyhow::Result<Option<JobRecord>> {
        self.store
            .job(id.0)?
            .map(|bytes| {
                wire::decode(&bytes, MAX_RECORD_BYTES).map_err(|e| anyhow!("job record: {e}"))
            })
            .transpose()
    }

    /// Every recorded job.
    pub fn jobs(&self) -> anyhow::Result<Vec<JobRecord>> {
        let mut jobs: Vec<JobRecord> = self
            .store
            .jobs()?
            .into_iter()
            .filter_map(|(_, bytes)| wire::decode(&bytes, MAX_RECORD_BYTES).ok())
            .collect();
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for job in &mut jobs {
            if let Some(live) = running.get(&job.id) {
                *job = live.clone();
            }
        }
        Ok(jobs)
    }

    /// Runs `spec` to the end (or resumes it from its last completed round), calling
    /// `progress` after every round.
    pub async fn run_job(
        &self,
        spec: JobSpec,
        progress: impl Fn(&JobRecord),
    ) -> anyhow::Result<JobRecord> {
        spec.check().map_err(|e| anyhow!("the job spec: {e}"))?;
        let id = spec.id();
        let result = self.run_checked(&spec, &progress).await;
        if let Err(e) = &result {
            // Whatever stopped it, the job's record says so (the API and `mycel train` show
            // it; running the job again resumes it): the last record stored, not what was in
            // memory (a round that failed half-way is not recorded as done).
            let mut record = self
                .stored(id)
                .ok()
                .flatten()
                .unwrap_or_else(|| JobRecord::empty(id, spec.clone()));
            record.state = JobState::Failed(format!("{e:#}"));
            if let Some(running) = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
            {
                record.suspects.extend(running.suspects.iter().cloned());
            }
            if let Err(save) = self.save(&record).await {
                warn!(job = %id, "cannot record the job's failure: {save:#}");
            }
        }
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        result
    }

    async fn run_checked(
        &self,
        spec: &JobSpec,
        progress: &impl Fn(&JobRecord),
    ) -> anyhow::Result<JobRecord> {
        let id = spec.id();
        let existing = match self.job(id)? {
            Some(record) if record.state == JobState::Done => return Ok(record),
            existing => existing,
        };
        let eval = match &spec.eval {
            Some(source) => {
                let source = source.clone();
                let data =
                    tokio::task::spawn_blocking(move || mycel_ml::data::load_source(&source))
                        .await??;
                let (inputs, classes) = spec.model.io();
                if data.dim != inputs || data.classes() > classes {
                    bail!(
                        "the evaluation data has {} features and {} classes; the model takes {inputs} \
                         and {classes}",
                        data.dim,
                        data.classes()
                    );
                }
                Some(Arc::new(data))
            }
            None => None,
        };
        let mut record = match existing {
            Some(mut record) if !record.weights.is_empty() => {
                info!(job = %id, round = record.round, "resuming the job");
                record.state = JobState::Running;
                record.resumed_after.push(record.round);
                record
            }
            // New, or recorded before it had weights (it failed at the start): stored before
            // its first round, so that a coordinator that crashes in round 1 finds the job to
            // resume.
            _ => {
                let record = self.fresh(spec).await?;
                self.save(&record).await?;
                record
            }
        };
        self.set_running(&record);
        let result = self.rounds(spec, &mut record, eval, progress).await;
        // The final model's blob is announced, so any node can fetch it by its id.
        self.blobs.announce().await;
        // Every completed round was stored with the job's state; a failure is recorded by
        // `run_job` on the last stored round; what is left is a job that had no round left.
        match &result {
            Err(_) => {}
            Ok(()) if record.state != JobState::Done => {
                record.state = JobState::Done;
                self.save(&record).await?;
            }
            Ok(()) => {}
        }
        result.map(|()| record)
    }

    /// A new job's record: initial weights from the spec's blob or its seed.
    async fn fresh(&self, spec: &JobSpec) -> anyhow::Result<JobRecord> {
        let weights = match spec.initial {
            Some(blob) => self.initial_weights(blob, spec.model.parameters()).await?,
            None => Classifier::new(spec.model.clone(), spec.seed)?.weights()?,
        };
        let mut record = JobRecord::empty(spec.id(), spec.clone());
        record.weights = weights;
        Ok(record)
    }

    async fn rounds(
        &self,
        spec: &JobSpec,
        record: &mut JobRecord,
        eval: Option<Arc<Dataset>>,
        progress: &impl Fn(&JobRecord),
    ) -> anyhow::Result<()> {
        let parameters = spec.model.parameters();
        let optimizer = spec.server.optimizer();
        let mut server = ServerState {
            m: record.server_m.clone(),
            v: record.server_v.clone(),
        };
        let mut attempts = 0;
        // Attempts of this round that fell short because peers were late: each doubles the
        // deadline of the next (failures of other kinds do not: gone peers stay gone).
        let mut late_attempts = 0;
        // A sealer and its lone accuser in this round's attempts so far: not drawn again for
        // the round (one of them misbehaved; see ask_secure).
        let mut benched: HashSet<PeerId> = HashSet::new();
        let mut persisting: Option<tokio::task::JoinHandle<anyhow::Result<JobRecord>>> = None;
        // A private job's spending. Every round costs the same (each peer sampled with the
        // participation fraction, noise at the multiplier) and is charged exactly once: a
        // private round is never tried again, and is stored before its model goes anywhere.
        // So what was spent follows from the rounds the record holds.
        let mut accountant = mycel_core::dp::Accountant::new();
        let per_round = spec
            .privacy
            .map(|p| accountant.round(spec.participants.fraction, p.noise_multiplier))
            .transpose()?;
        if let Some(per_round) = &per_round {
            accountant.add(per_round, u64::from(record.round));
        }
        // However the rounds end, the last round's storing is waited for (a failure recorded
        // after it must not be overwritten by it).
        let outcome = async {
        while record.round < spec.rounds {
            if let (Some(privacy), Some(per_round)) = (&spec.privacy, &per_round) {
                let mut next = accountant.clone();
                next.add(per_round, 1);
                let epsilon = next.epsilon(privacy.delta)?;
                if let Some(budget) = privacy.epsilon.filter(|budget| epsilon > *budget) {
                    let why = format!(
                        "stopped after round {}: round {} would bring the privacy spent to \
                         ε = {epsilon:.3} at δ = {}, over the job's budget of ε = {budget}",
                        record.round,
                        record.round + 1,
                        privacy.delta
                    );
                    info!(job = %record.id, "{why}");
                    record.stopped = Some(why);
                    record.state = JobState::Done;
                    if let Some(previous) = persisting.take() {
                        self.reported(previous, record, progress).await?;
                    }
                    persisting = Some(self.persist(record.clone()));
                    break;
                }
            }
            let started = Instant::now();
            let round = record.round + 1;
            let seed = fl::round_seed(spec.seed, round);
            let Selection {
                peers: selected,
                addrs,
                rtts,
                sites,
                samples,
                eligible,
            } = self.select(spec, record, seed, &benched).await?;
            if spec.privacy.is_some()
                && spec.secure_aggregation.is_some()
                && selected.len() > secround::MAX_PARTICIPANTS
            {
                // A Poisson sample is not cut (that would change the sampling the accountant
                // counts): a round this large cannot be summed securely.
                bail!(
                    "round {round}: {} participants sampled, more than the {} a securely \
                     aggregated round allows; lower participants.fraction",
                    selected.len(),
                    secround::MAX_PARTICIPANTS
                );
            }
            let selected_ms = started.elapsed().as_secs_f64() * 1000.0;
            let deadline_ms = stretched(spec.round_deadline_ms, late_attempts);
            let request = TrainRequest {
                job: record.id,
                round,
                model: spec.model.clone(),
                dataset: spec.dataset.clone(),
                weights: Payload::dense(&record.weights),
                train: spec.train,
                compression: spec.compression,
                seed,
                deadline_ms,
                members: Vec::new(),
                aggregator: spec.aggregator,
                ticket: None,
                secure: None,
            };
            let mut plan = fl::clusters(
                &selected
                    .iter()
                    .map(|p| (*p, sites.get(p).map(String::as_str), rtts.get(p).copied()))
                    .collect::<Vec<_>>(),
                spec.cluster_size as usize,
            );
            if spec.cluster_size > 1 {
                // Every cluster sums at least three members securely (too few for one
                // cluster, and the round is one flat secure sum); in the clear, no peer
                // alone in its site makes a cluster of its own.
                let least = match spec.secure_aggregation {
                    Some(_) => secround::MIN_PARTICIPANTS,
                    None => 1,
                };
                plan = fl::fill_clusters(plan, least);
            }
            let cut = Instant::now() + Duration::from_millis(deadline_ms);
            let mut outcome = Outcome::default();
            // Heads with members get their own request; plain participants share one.
            let (flat, heads): (Vec<_>, Vec<_>) =
                plan.into_iter().partition(|c| c.members.is_empty());
            let flat_peers: Vec<Addressed> = flat
                .iter()
                .map(|c| (c.head, addrs.get(&c.head).cloned().unwrap_or_default()))
                .collect();
            // This coordinator vouches for each request and names the peers it is for, so
            // that nodes training only for coordinators they trust can check it (the tickets
            // are made below: the plain participants' one, the heads', a private job's).
            let mut request = request;
            // Valid for the round (and the allowed clock skew), no longer.
            let expires_at = mycel_net::now_ms() + deadline_ms;
            let head_requests: Vec<([Addressed; 1], TrainRequest)> = heads
                .iter()
                .map(|c| {
                    let mut r = request.clone();
                    r.members = c
                        .members
                        .iter()
                        .map(|m| Member {
                            peer: *m,
                            addrs: addrs.get(m).cloned().unwrap_or_default(),
                        })
                        .collect();
                    if let Some(secure) = &spec.secure_aggregation {
                        // The head coordinates its members' secure sum.
                        let scale = c
                            .members
                            .iter()
                            .map(|p| samples.get(p).copied().unwrap_or(0))
                            .fold(0u64, u64::saturating_add);
                        r.secure = Some(secround::Setup::for_job(&c.members, secure, scale));
                    }
                    let cluster: Vec<PeerId> =
                        std::iter::once(c.head).chain(c.members.iter().copied()).collect();
                    r.ticket = Some(JobTicket::sign(
                        &self.keypair,
                        &r,
                        &cluster,
                        Some(c.head),
                        expires_at,
                    ));
                    (
                        [(c.head, addrs.get(&c.head).cloned().unwrap_or_default())],
                        r,
                    )
                })
                .collect();
            // What each answering peer may claim to have trained on: its announced samples,
            // a head's cluster's together.
            let mut caps = samples.clone();
            for (head, r) in &head_requests {
                let cluster = r.members.iter().map(|m| m.peer).chain([head[0].0]);
                let total = cluster
                    .map(|p| samples.get(&p).copied().unwrap_or(0))
                    .fold(0u64, u64::saturating_add);
                caps.insert(head[0].0, total);
            }
            // A private job's sample is secret, from the participants too: each gets a request
            // whose ticket names it alone.
            let private_requests: Vec<([Addressed; 1], TrainRequest)> = if spec.privacy.is_some()
                && spec.secure_aggregation.is_none()
            {
                flat_peers
                    .iter()
                    .map(|peer| {
                        let mut r = request.clone();
                        r.ticket = Some(JobTicket::sign(
                            &self.keypair,
                            &r,
                            &[peer.0],
                            None,
                            expires_at,
                        ));
                        ([peer.clone()], r)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let mut asks = Vec::new();
            // A securely aggregated private job names its sample to its participants: each
            // must check the others' keys.
            if spec.privacy.is_none() || spec.secure_aggregation.is_some() {
                let flat_ids: Vec<PeerId> = flat_peers.iter().map(|(p, _)| *p).collect();
                if let Some(secure) = &spec.secure_aggregation {
                    // Updates are weighed by samples over all the participants' announced.
                    let scale = flat_ids
                        .iter()
                        .map(|p| samples.get(p).copied().unwrap_or(0))
                        .fold(0u64, u64::saturating_add);
                    let mut setup = secround::Setup::for_job(&flat_ids, secure, scale);
                    if let Some(privacy) = &spec.privacy {
                        // Distributed DP: each participant adds its share of the noise, so
                        // that the sum of at least the job's minimum carries σ·C.
                        let share = f64::from(spec.participants.min).sqrt();
                        setup = setup.with_noise(secround::Noise {
                            clip: privacy.clip,
                            std: privacy.noise_multiplier * f64::from(privacy.clip) / share,
                            senders: spec.participants.min,
                        });
                    }
                    request.secure = Some(setup);
                }
                request.ticket = Some(JobTicket::sign(
                    &self.keypair,
                    &request,
                    &flat_ids,
                    None,
                    expires_at,
                ));
                if request.secure.is_some() && flat_peers.is_empty() {
                    // Every participant is in a cluster whose head sums it securely.
                } else if request.secure.is_some() {
                    let min = spec.participants.min;
                    asks.push(
                        self.ask_secure(
                            &flat_peers,
                            &request,
                            SecureBounds {
                                cut,
                                min,
                                finish_by: None,
                            },
                            parameters,
                            &caps,
                        )
                        .boxed(),
                    );
                } else {
                    asks.push(
                        self.ask_all(&flat_peers, &request, cut, parameters, &caps)
                            .boxed(),
                    );
                }
            }
            for (peer, r) in head_requests.iter().chain(&private_requests) {
                asks.push(self.ask_all(peer, r, cut, parameters, &caps).boxed());
            }
            for part in futures::future::join_all(asks).await {
                outcome.merge(part);
            }
            let asked_ms = started.elapsed().as_secs_f64() * 1000.0;
            // The previous round, stored while this one trained, is reported now rather than
            // when this one ends.
            if persisting.as_ref().is_some_and(|p| p.is_finished()) {
                if let Some(stored) = persisting.take() {
                    self.reported(stored, record, progress).await?;
                }
            }
            for peer in &selected {
                *record.asked.entry(peer.to_string()).or_insert(0) += 1;
            }
            if !outcome.suspects.is_empty() {
                record
                    .suspects
                    .extend(outcome.suspects.iter().map(|p| p.to_string()));
                // Kept even if the round then fails (the failure is recorded over the last
                // stored record, to which they are added).
                self.note_suspects(record);
            }
            benched.extend(outcome.benched.iter().copied());
            // In a clustered secure job the heads' secure sums are unmasked (and their means
            // sent) by the time they answer: the round is not drawn again either.
            let clusters_summed =
                spec.secure_aggregation.is_some() && !head_requests.is_empty();
            if outcome.unmask_asked && outcome.summed.is_none() && !clusters_summed {
                bail!(
                    "round {round}: the securely aggregated sum could not be unmasked ({}); \
                     a round whose shares were asked for is not drawn again",
                    outcome.why.join("; ")
                );
            }
            let contributors: u32 = outcome.updates.iter().map(|u| u.contributors).sum::<u32>()
                + outcome.summed.as_ref().map_or(0, |s| s.contributors);
            // A private round is never drawn again: the retried round would include each peer
            // more often than the accountant counts. It aggregates what arrived.
            // A securely aggregated round that fell short unmasked nothing (it stops before
            // the senders list): drawing it again releases nothing twice, private or not.
            if contributors < spec.participants.min && clusters_summed {
                bail!(
                    "round {round}: only {contributors} updates arrived in the clusters' secure \
                     sums, the job needs {}; a round whose clusters were summed is not drawn \
                     again ({})",
                    spec.participants.min,
                    outcome.why.join("; ")
                );
            }
            // A private round is never drawn again (a redrawn sample would include each peer
            // more often than the accountant's q). A securely aggregated private round that
            // fell short released nothing: it is charged and leaves the model as it was.
            let released_nothing = spec.privacy.is_some()
                && spec.secure_aggregation.is_some()
                && contributors < spec.participants.min;
            if released_nothing {
                warn!(
                    job = %record.id, round, contributors,
                    "too few updates for the round's noise ({contributors} of at least {}: {}); \
                     the round releases nothing and is charged",
                    spec.participants.min,
                    outcome.why.join("; ")
                );
                outcome.summed = Some(Combined {
                    delta: vec![0.0; parameters],
                    samples: 0,
                    loss: f32::NAN,
                    data: ContentId([0; 32]),
                    contributors: 0,
                });
            } else if contributors < spec.participants.min && spec.privacy.is_none() {
                attempts += 1;
                if outcome.late > 0 {
                    late_attempts += 1;
                }
                let why = outcome.why.join("; ");
                if attempts >= ROUND_ATTEMPTS {
                    let left_out = record.suspects.len() + benched.len();
                    let accused = if left_out > 0 {
                        format!(
                            "; {left_out} peers left out for shares that did not open in a \
                             secure round"
                        )
                    } else {
                        String::new()
                    };
                    bail!(
                        "round {round}: only {contributors} updates arrived, the job needs {}; \
                         are enough peers holding dataset {:?} online? ({why}{accused})",
                        spec.participants.min,
                        spec.dataset
                    );
                }
                let pause = RETRY_PAUSE * attempts;
                warn!(
                    job = %record.id, round, contributors,
                    "too few updates ({contributors} of at least {}: {why}); trying the round \
                     again in {pause:?}, with a deadline of {} ms",
                    spec.participants.min,
                    stretched(spec.round_deadline_ms, late_attempts)
                );
                // Peers that failed at once (starting, restarting, reconnecting) get time
                // to come back before the next attempt.
                tokio::time::sleep(pause).await;
                continue;
            }
            let root_bytes = outcome.root_bytes;
            let gathered = outcome.gathered;
            let combined = match (&spec.privacy, outcome.summed.take()) {
                // Securely aggregated: the sum is all there is.
                // Distributed DP: the noised sum over the expected number of participants (a
                // round that released nothing: no change).
                (Some(_), Some(mut summed)) => {
                    let expected = (spec.participants.fraction * eligible as f64).max(1.0);
                    summed
                        .delta
                        .iter_mut()
                        .for_each(|v| *v = (f64::from(*v) / expected) as f32);
                    summed.loss = f32::NAN;
                    Ok(summed)
                }
                (None, Some(summed)) => Ok(summed),
                // The expected number of participants: it does not depend on who answered.
                (Some(privacy), None) => combine_private(
                    privacy,
                    parameters,
                    spec.participants.fraction * eligible as f64,
                    outcome.updates,
                    &mut self.rng.lock().unwrap_or_else(|e| e.into_inner()),
                ),
                (None, None) => combine(&spec.aggregator, spec.compression, outcome.updates),
            };
            let combined = match combined {
                Ok(combined) => combined,
                Err(e) if spec.privacy.is_some() || spec.secure_aggregation.is_some() => {
                    return Err(e.context(format!("round {round} of a private or secure job")));
                }
                Err(e) => {
                    attempts += 1;
                    warn!(job = %record.id, round, "cannot combine the updates: {e:#}; trying the round again");
                    if attempts >= ROUND_ATTEMPTS {
                        return Err(e.context(format!("round {round}")));
                    }
                    continue;
                }
            };
            let (weights_before, server_before) = (record.weights.clone(), server.clone());
            optimizer.apply(&mut server, &mut record.weights, &combined.delta)?;
            if record.weights.iter().any(|w| !w.is_finite()) {
                // Updates that passed every check can still add up to infinity (FedAvg has no
                // defence against a huge one): keep the last model and try the round again.
                record.weights = weights_before;
                server = server_before;
                if spec.privacy.is_some() {
                    bail!("round {round}: the private aggregate made the model non-finite");
                }
                if spec.secure_aggregation.is_some() {
                    // Not drawn again: a second sum over the round's updates could single
                    // one out.
                    bail!("round {round}: the securely aggregated sum made the model non-finite");
                }
                attempts += 1;
                warn!(job = %record.id, round, "the aggregate made the model non-finite; trying the round again");
                if attempts >= ROUND_ATTEMPTS {
                    bail!(
                        "round {round}: the aggregate made the model non-finite {ROUND_ATTEMPTS} \
                         times; a robust aggregator (median, trimmed_mean, multi_krum) or an \
                         IQR filter keeps out updates that large"
                    );
                }
                continue;
            }
            let round_attempts = attempts + 1;
            (attempts, late_attempts) = (0, 0);
            benched.clear();
            let (test_loss, accuracy) = match &eval {
                Some(eval) => {
                    let (arch, weights, eval) =
                        (spec.model.clone(), record.weights.clone(), eval.clone());
                    tokio::task::spawn_blocking(move || -> anyhow::Result<(f32, f32)> {
                        Ok(Classifier::from_weights(arch, &weights)?.evaluate(&eval)?)
                    })
                    .await??
                }
                None => (f32::NAN, f32::NAN),
            };
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let epsilon = match (&spec.privacy, &per_round) {
                (Some(privacy), Some(per_round)) => {
                    accountant.add(per_round, 1);
                    Some(accountant.epsilon(privacy.delta)?)
                }
                _ => None,
            };
            record.metrics.push(RoundMetrics {
                round,
                epsilon,
                attempts: round_attempts,
                asked: gathered.asked,
                participants: combined.contributors,
                dropped: gathered.dropped,
                rejected: gathered.rejected,
                train_loss: combined.loss,
                test_loss,
                accuracy,
                bytes_up: gathered.bytes_up,
                bytes_down: gathered.bytes_down,
                bytes_root: root_bytes,
                ms,
                model: None,
            });
            record.round = round;
            record.server_m = server.m.clone();
            record.server_v = server.v.clone();
            record.elapsed_ms += ms;
            if round == spec.rounds {
                record.state = JobState::Done;
            }
            // Write-behind: the round is stored (its model as a blob, the record durably) while
            // the next round trains. Rounds are stored in order, and a round is reported
            // (progress, the API's view) only once it is on disk, so a restart still resumes
            // from the last round reported.
            if let Some(previous) = persisting.take() {
                self.reported(previous, record, progress).await?;
            }
            persisting = Some(self.persist(record.clone()));
            if spec.privacy.is_some() {
                // Stored (and so charged) before the next round's request carries the model
                // out: a crash cannot release a round the record does not hold.
                if let Some(stored) = persisting.take() {
                    self.reported(stored, record, progress).await?;
                }
            }
            debug!(round, selected_ms, asked_ms, ms, "round done");
        }
        anyhow::Ok(())
        }
        .await;
        let stored = match persisting.take() {
            Some(last) => self.reported(last, record, progress).await,
            None => Ok(()),
        };
        outcome.and(stored)
    }

    /// Waits for a round's storing to finish, copies the model's id it learnt into `record`
    /// and reports the stored round.
    async fn reported(
        &self,
        persisting: tokio::task::JoinHandle<anyhow::Result<JobRecord>>,
        record: &mut JobRecord,
        progress: &impl Fn(&JobRecord),
    ) -> anyhow::Result<()> {
        let stored = persisting.await.context("storing a round")??;
        if let Some(m) = stored.metrics.last() {
            if let Some(mine) = record.metrics.iter_mut().find(|r| r.round == m.round) {
                mine.model = m.model;
            }
        }
        self.set_running(&stored);
        progress(&stored);
        Ok(())
    }

    /// Stores a round: the global model as a blob (pinned after the last round; earlier
    /// rounds' models may be evicted, the record keeps the latest weights), then the job's
    /// record, durably. Returns the record as stored.
    fn persist(&self, mut record: JobRecord) -> tokio::task::JoinHandle<anyhow::Result<JobRecord>> {
        let (store, blobs) = (self.store.clone(), self.blobs.store().clone());
        tokio::task::spawn_blocking(move || {
            let last = record.state == JobState::Done;
            let model = match blobs.import(
                std::io::Cursor::new(fl::f32_to_le(&record.weights)),
                mycel_net::now_ms(),
                last,
            ) {
                Ok(blob) => Some(blob.id),
                Err(e) => {
                    warn!("cannot store the round's model as a blob: {e}");
                    None
                }
            };
            if let Some(last) = record.metrics.last_mut() {
                last.model = model;
            }
            store
                .put_job(record.id.0, &wire::encode(&record))
                .context("recording the job's state")?;
            Ok(record)
        })
    }

    /// The round's participants, their announced addresses and measured RTTs (ms).
    async fn select(
        &self,
        spec: &JobSpec,
        record: &JobRecord,
        seed: u64,
        benched: &HashSet<PeerId>,
    ) -> anyhow::Result<Selection> {
        // Right after a start the peers' announcements may not have arrived yet.
        let patience = Instant::now() + Duration::from_millis(spec.round_deadline_ms.max(5_000));
        loop {
            match self.try_select(spec, record, seed, benched).await {
                Err(e) if Instant::now() < patience => {
                    debug!("waiting for participants: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_select(
        &self,
        spec: &JobSpec,
        record: &JobRecord,
        seed: u64,
        benched: &HashSet<PeerId>,
    ) -> anyhow::Result<Selection> {
        let mut eligible = Vec::new();
        let mut addrs = HashMap::new();
        let mut rtts = HashMap::new();
        let mut sites = HashMap::new();
        let mut samples = HashMap::new();
        let mut excluded = Vec::new();
        // Peers left out for an accusation in a secure round (see ask_secure).
        let mut accused = 0;
        for holder in self.holders(spec).await? {
            let peer = holder.peer;
            if record.suspects.contains(&peer.to_string()) || benched.contains(&peer) {
                excluded.push(format!(
                    "{peer}: named in a secure round as sealing shares that do not open, or \
                     naming a sealer alone"
                ));
                accused += 1;
                continue;
            }
            match holder.exclusion {
                None if holder.alive => {
                    eligible.push(peer);
                    samples.insert(peer, holder.samples);
                    addrs.insert(peer, holder.addrs);
                    if let Some(rtt) = holder.rtt_ms {
                        rtts.insert(peer, rtt);
                    }
                    if let Some(site) = holder.site {
                        sites.insert(peer, site);
                    }
                }
                None => {}
                Some(why) => excluded.push(format!("{peer}: {why}")),
            }
        }
        if !excluded.is_empty() {
            debug!(job = %record.id, "not eligible: {}", excluded.join("; "));
        }
        if eligible.is_empty() {
            bail!(
                "no eligible peer holds dataset {:?} ({} excluded by the job's policy, {accused} \
                 for shares that did not open in a secure round); start nodes with --dataset \
                 {}=PATH",
                spec.dataset,
                excluded.len() - accused,
                spec.dataset
            );
        }
        let asked: BTreeMap<PeerId, u32> = record
            .asked
            .iter()
            .filter_map(|(p, n)| Some((p.parse().ok()?, *n)))
            .collect();
        let peers = if spec.privacy.is_some() {
            // Secret randomness: who takes part is part of what the noise hides, and a seed
            // in the spec is known to every participant.
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            fl::poisson_select(&eligible, spec.participants.fraction, &mut *rng)
        } else {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut peers = fl::select(&eligible, &asked, &spec.participants, &mut rng);
            if spec.secure_aggregation.is_some() {
                // Shares are points of GF(256).
                peers.truncate(secround::MAX_PARTICIPANTS);
            }
            peers
        };
        Ok(Selection {
            peers,
            addrs,
            rtts,
            sites,
            samples,
            eligible: eligible.len(),
        })
    }

    /// Peers the coordinator would consider for `spec` now, each with why it is excluded (if
    /// it is).
    pub async fn candidates(
        &self,
        spec: &JobSpec,
    ) -> anyhow::Result<Vec<(PeerId, Option<String>)>> {
        Ok(self
            .holders(spec)
            .await?
            .into_iter()
            .map(|h| (h.peer, h.exclusion.map(|e| e.to_string())))
            .collect())
    }

    /// The peers that announce `spec`'s dataset, and whether the job's policy excludes them.
    async fn holders(&self, spec: &JobSpec) -> anyhow::Result<Vec<Holder>> {
        let mut found = Vec::new();
        for info in self.net.peers().await? {
            let Some(caps) = &info.capabilities else {
                continue;
            };
            let Some(offer) = caps.datasets.iter().find(|d| d.tag == spec.dataset) else {
                continue;
            };
            let Ok(peer) = info.peer_id.parse::<PeerId>() else {
                continue;
            };
            let candidate = Candidate {
                peer,
                samples: offer.samples,
                reputation: 0.0,
                power: caps.power.clone(),
                metered: caps.metered,
            };
            let holder = Holder {
                peer,
                samples: offer.samples,
                alive: info.state == mycel_core::membership::PeerState::Alive,
                addrs: info.addrs.clone(),
                rtt_ms: info.rtt_us.map(|us| us as f64 / 1000.0),
                site: caps.site.clone(),
                exclusion: None,
            };
            found.push((candidate, holder));
        }
        // Asked of the event loop all at once, not one peer after another.
        let reputations =
            futures::future::join_all(found.iter().map(|(c, _)| self.net.reputation(c.peer))).await;
        Ok(found
            .into_iter()
            .zip(reputations)
            .map(|((mut candidate, mut holder), reputation)| {
                candidate.reputation = reputation.unwrap_or(0.0);
                holder.exclusion = fl::eligibility(&candidate, spec).err();
                holder
            })
            .collect())
    }

    /// Fetches (from the network if need be) and checks a job's initial weights.
    async fn initial_weights(
        &self,
        blob: ContentId,
        parameters: usize,
    ) -> anyhow::Result<Vec<f32>> {
        let progress = crate::blobs::Progress::default();
        let info = self
            .blobs
            .fetch(blob, &[], true, &progress)
            .await
            .with_context(|| format!("fetching the initial weights {blob}"))?;
        if info.size != parameters as u64 * 4 {
            bail!(
                "the initial weights {blob} hold {} bytes; the model's {parameters} parameters \
                 need {} (little-endian f32)",
                info.size,
                parameters * 4
            );
        }
        let store = self.blobs.store().clone();
        let max = parameters as u64 * 4;
        let bytes = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
            // Verified chunk by chunk: weights the disk changed are never trained from.
            store
                .read_verified(&blob, max, mycel_net::now_ms())?
                .ok_or_else(|| anyhow!("the initial weights {blob} are over {max} bytes"))
        })
        .await??;
        Payload::Dense(bytes)
            .decode(parameters)
            .map_err(|e| anyhow!("the initial weights {blob}: {e}"))
    }

    /// Adds `record`'s suspects to the running copy of its job.
    fn note_suspects(&self, record: &JobRecord) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(copy) = running.get_mut(&record.id) {
            copy.suspects.extend(record.suspects.iter().cloned());
        }
    }

    fn set_running(&self, record: &JobRecord) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.id, record.clone());
    }

    async fn save(&self, record: &JobRecord) -> anyhow::Result<()> {
        let (store, id, bytes) = (self.store.clone(), record.id.0, wire::encode(record));
        tokio::task::spawn_blocking(move || store.put_job(id, &bytes))
            .await?
            .context("recording the job's state")
    }
}

/// A peer announcing a job's dataset.
struct Holder {
    peer: PeerId,
    samples: u64,
    alive: bool,
    addrs: Vec<String>,
    rtt_ms: Option<f64>,
    site: Option<String>,
    exclusion: Option<fl::Exclusion>,
}

/// Marks a job launched while alive.
struct Launched(Arc<Training>, JobId);

impl Drop for Launched {
    fn drop(&mut self) {
        self.0
            .launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// A round's participants and what the coordinator knows of them.
struct Selection {
    peers: Vec<PeerId>,
    addrs: HashMap<PeerId, Vec<String>>,
    rtts: HashMap<PeerId, f64>,
    /// The sites they state.
    sites: HashMap<PeerId, String>,
    /// Samples each announced.
    samples: HashMap<PeerId, u64>,
    /// Peers that could have been selected.
    eligible: usize,
}

/// A peer and the addresses it announced.
type Addressed = (PeerId, Vec<String>);

/// When a secure round's steps end and how few senders it unmasks for.
struct SecureBounds {
    /// The end of the steps that wait for training.
    cut: Instant,
    /// Fewest senders to go on to the senders list.
    min: u32,
    /// When the last steps must be over (a head answering its own requester).
    finish_by: Option<Instant>,
}

/// A participant still in a secure round: its peer id, index and stream.
type SecureLink = (PeerId, usize, mycel_net::task::Stream);

/// A participant's reply to a secure round's step, with its stream if it is still open and
/// the reply's size on the wire.
type SecureReply = (
    PeerId,
    usize,
    Option<mycel_net::task::Stream>,
    anyhow::Result<(FromParticipant, u64)>,
);

/// A participant's next message in a secure round (a refusal as an error).
async fn secure_reply(
    stream: &mut mycel_net::task::Stream,
) -> anyhow::Result<(FromParticipant, u64)> {
    match read_reply(stream).await? {
        (FromParticipant::Refused(why), _) => bail!("refused: {why}"),
        reply => Ok(reply),
    }
}

/// A participant's reply frame, with its size on the wire; a frame refused (too large, not
/// decoding) as the [`Rejection`] it is, for its sender to pay.
async fn read_reply<T: serde::de::DeserializeOwned>(
    stream: &mut mycel_net::task::Stream,
) -> anyhow::Result<(T, u64)> {
    match read_frame_sized(stream, fl::MAX_UPDATE_BYTES).await {
        Ok(Some((reply, bytes))) => Ok((reply, bytes as u64 + 4)),
        Ok(None) => bail!("the participant closed the stream"),
        Err(FrameError::Io(e)) => Err(e.into()),
        Err(FrameError::Rejected(reason)) => {
            Err(anyhow::Error::new(reason).context("the participant's reply"))
        }
    }
}

/// A frame this node built from its own values (far below the 4 GiB a frame can hold).
fn own_frame<T: Serialize>(value: &T) -> Vec<u8> {
    mycel_net::task::frame(value).expect("a frame this node builds fits in 4 GiB")
}

/// A secure round that cannot go on: its streams close (the participants stop), and why.
fn secure_failed(mut outcome: Outcome, live: Vec<SecureLink>, e: RoundError) -> Outcome {
    drop(live);
    outcome.why.insert(0, format!("secure aggregation: {e}"));
    outcome
}

/// Why a request is not answered with an update.
enum Refuse {
    /// The request itself was bad (the sender pays).
    Malformed(String),
    /// This node cannot or will not (no such dataset, deadline passed).
    Other(String),
    /// The requester went away.
    Gone,
}

/// An opened update.
struct Received {
    delta: Vec<f32>,
    samples: u64,
    loss: f32,
    data: ContentId,
    contributors: u32,
}

/// What a fan-out brought back.
#[derive(Default)]
struct Outcome {
    updates: Vec<Received>,
    /// A securely aggregated round's unmasked sum.
    summed: Option<Combined>,
    /// Whether a securely aggregated round asked for shares to unmask (it is then never
    /// drawn again: two sums over the round's updates could single one out).
    unmask_asked: bool,
    gathered: Gathered,
    root_bytes: u64,
    dropped: Vec<PeerId>,
    /// Peers that had not answered by the round's deadline.
    late: u32,
    /// Why peers gave no update (the first few), for the log when a round falls short.
    why: Vec<String>,
    /// Sealers two or more participants of a secure round said sealed shares that do not
    /// open: not drawn again for the job.
    suspects: Vec<PeerId>,
    /// A sealer and its lone accuser: not drawn again for the round.
    benched: Vec<PeerId>,
}

impl Outcome {
    /// Reasons kept for the log.
    const REASONS: usize = 4;

    fn note(&mut self, peer: PeerId, why: impl std::fmt::Display) {
        if self.why.len() < Self::REASONS {
            self.why.push(format!("{peer}: {why}"));
        }
    }

    fn note_all(&mut self, reasons: Vec<String>) {
        let room = Self::REASONS.saturating_sub(self.why.len());
        self.why.extend(reasons.into_iter().take(room));
    }

    fn merge(&mut self, other: Outcome) {
        self.updates.extend(other.updates);
        if other.summed.is_some() {
            self.summed = other.summed;
        }
        self.unmask_asked |= other.unmask_asked;
        self.suspects.extend(other.suspects);
        self.benched.extend(other.benched);
        self.root_bytes += other.root_bytes;
        self.dropped.extend(other.dropped);
        self.late += other.late;
        self.note_all(other.why);
        self.gathered.add(&other.gathered);
    }
}

/// Updates combined by a rule.
struct Combined {
    delta: Vec<f32>,
    samples: u64,
    loss: f32,
    data: ContentId,
    contributors: u32,
}

/// How a participant answers a step of a securely aggregated round that cannot go on.
fn refusal(e: RoundError) -> Refuse {
    match e {
        RoundError::Bad(why) => Refuse::Malformed(why),
        other => Refuse::Other(other.to_string()),
    }
}

/// Sends a participant's step of a securely aggregated round.
async fn send(stream: &mut mycel_net::task::Stream, step: &FromParticipant) -> Result<(), Refuse> {
    write_frame(stream, step).await.map_err(|_| Refuse::Gone)
}

/// The coordinator's next step of a securely aggregated round, by `until`.
async fn next_step(
    stream: &mut mycel_net::task::Stream,
    until: Instant,
) -> Result<ToParticipant, Refuse> {
    let read = read_frame(stream, secround::MAX_STEP_BYTES);
    match tokio::time::timeout_at(until.into(), read).await {
        Err(_) => Err(Refuse::Other(
            "the coordinator's next step did not come in time".into(),
        )),
        Ok(Ok(Some(step))) => Ok(step),
        Ok(Ok(None) | Err(FrameError::Io(_))) => Err(Refuse::Gone),
        Ok(Err(FrameError::Rejected(reason))) => Err(Refuse::Malformed(format!(
            "the coordinator's step: {reason}"
        ))),
    }
}

/// A round's deadline after `attempts` attempts that fell short for lateness: the job's,
/// doubled for each, at most [`MAX_STRETCH`] times the job's and an hour.
fn stretched(deadline_ms: u64, attempts: u32) -> u64 {
    let factor = 1u64 << attempts.min(63);
    deadline_ms
        .saturating_mul(factor.min(MAX_STRETCH))
        .min(3_600_000)
        .max(deadline_ms)
}

/// Combines a differentially private job's updates (`mycel_core::dp::noisy_mean`): each
/// clipped, summed with the noise from `rng` (secret), over `expected` participants; every
/// update weighs the same (weights by samples would let one participant's data count for more
/// than the clip). The participants' losses are their data's: the combined loss is NaN, never
/// published.
fn combine_private(
    privacy: &fl::Privacy,
    parameters: usize,
    expected: f64,
    mut updates: Vec<Received>,
    rng: &mut StdRng,
) -> anyhow::Result<Combined> {
    updates.sort_by_key(|u| u.data);
    let samples = updates
        .iter()
        .map(|u| u.samples)
        .fold(0u64, u64::saturating_add);
    let mut data = blake3::Hasher::new();
    for u in &updates {
        data.update(&u.data.0);
    }
    let contributors = updates.iter().map(|u| u.contributors).sum();
    let delta = mycel_core::dp::noisy_mean(
        updates.into_iter().map(|u| u.delta).collect(),
        parameters,
        privacy.clip,
        privacy.noise_multiplier,
        expected.max(1.0),
        rng,
    )?;
    if delta.iter().any(|v| !v.is_finite()) {
        bail!("the combined update is not finite");
    }
    Ok(Combined {
        delta,
        samples,
        loss: f32::NAN,
        data: ContentId(*data.finalize().as_bytes()),
        contributors,
    })
}

/// Combines updates by the job's rule (after its IQR filter), in an order that depends only
/// on the data behind them, so that the same job gives the same model whatever the peer ids.
fn combine(
    spec: &fl::AggregatorSpec,
    compression: Compression,
    mut updates: Vec<Received>,
) -> anyhow::Result<Combined> {
    let sparse = matches!(compression, Compression::TopK { .. });
    updates.sort_by_key(|u| u.data);
    let (rule, iqr) = spec.rule();
    let views: Vec<Update> = updates
        .iter()
        .map(|u| Update {
            delta: &u.delta,
            samples: u.samples,
        })
        .collect();
    let kept: Vec<usize> = match iqr {
        Some(k) => aggregate::iqr_filter(&views, k).0,
        None => (0..views.len()).collect(),
    };
    let kept_views: Vec<Update> = kept.iter().map(|&i| views[i]).collect();
    // Sparse updates are averaged over the participants that sent each coordinate. Robust
    // rules need enough updates; with too few (a small cluster), fall back to the median,
    // which needs only one.
    let aggregated = if sparse && rule == aggregate::Rule::FedAvg {
        aggregate::fedavg_sparse(&kept_views)?
    } else {
        aggregate::aggregate(rule, &kept_views)
            .or_else(|_| aggregate::aggregate(aggregate::Rule::Median, &kept_views))?
    };
    // Samples, loss and contributors of the updates the rule actually used.
    let used: Vec<&Received> = aggregated
        .selected
        .iter()
        .filter_map(|&i| kept.get(i).and_then(|&k| updates.get(k)))
        .collect();
    let samples = used
        .iter()
        .map(|u| u.samples)
        .fold(0u64, u64::saturating_add);
    let loss = if samples == 0 {
        0.0
    } else {
        (used
            .iter()
            .map(|u| f64::from(u.loss) * u.samples as f64)
            .sum::<f64>()
            / samples as f64) as f32
    };
    if !loss.is_finite() || aggregated.delta.iter().any(|v| !v.is_finite()) {
        bail!("the combined update is not finite");
    }
    let mut data = blake3::Hasher::new();
    for u in &used {
        data.update(&u.data.0);
    }
    Ok(Combined {
        delta: aggregated.delta,
        samples,
        loss,
        data: ContentId(*data.finalize().as_bytes()),
        contributors: used
            .iter()
            .map(|u| u.contributors)
            .fold(0u32, u32::saturating_add),
    })
}

/// Trains from `global` on `data` and returns local minus global weights and the last loss.
fn local_update(
    model: &fl::ModelSpec,
    train: &fl::LocalTraining,
    global: &[f32],
    data: &Dataset,
    seed: u64,
    stop: &AtomicBool,
) -> anyhow::Result<(Vec<f32>, f32)> {
    let mut classifier = Classifier::from_weights(model.clone(), global)?;
    let params = TrainParams {
        epochs: train.epochs as usize,
        batch: train.batch as usize,
        lr: train.lr,
        momentum: train.momentum,
        prox: train.prox,
    };
    let report = classifier.train_until(data, &params, seed, stop)?;
    let local = classifier.weights()?;
    let delta = local.iter().zip(global).map(|(l, g)| l - g).collect();
    Ok((delta, report.loss))
}
