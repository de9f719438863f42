//! Federated training: the job spec, who takes part in a round, and the messages of the
//! training protocol.
//!
//! A coordinator runs a [`JobSpec`] round by round. Each round it picks participants among
//! the peers that announce the job's dataset tag ([`eligibility`] applies the reputation and
//! device policy, [`select`] rotates fairly), optionally groups them into clusters by
//! measured round-trip time ([`clusters`]), and sends each a [`TrainRequest`] carrying the
//! global weights. A participant trains on its local data and answers with a
//! [`SignedUpdate`]: its change to the weights (compressed as the job asks), the samples it
//! trained on, signed with its node key. A cluster head also asks its members, aggregates
//! their updates robustly and forwards one update, so the root receives one per cluster.
//!
//! Pure: no I/O, no clock; randomness is passed in.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Rule, ServerOptimizer};
use crate::compress::{CompressError, Quantised, Sparse};
use crate::id::ContentId;
use crate::statement::PowerState;
use crate::wire::{self, Rejection};
use crate::{Keypair, PeerId, PublicKey};

/// Largest training request a participant reads (it carries the global weights).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;
/// Largest update a coordinator or cluster head reads.
pub const MAX_UPDATE_BYTES: usize = 64 << 20;
/// Most parameters a job's model may have.
pub const MAX_PARAMETERS: usize = 8 << 20;
/// Most members one cluster head is asked to gather.
pub const MAX_MEMBERS: usize = 256;
/// Most values a cluster head gathers in one round (members times parameters).
pub const MAX_GATHERED_VALUES: usize = 64 << 20;
/// Most rounds in one job.
pub const MAX_ROUNDS: u32 = 100_000;

/// Identifies a job: a hash of its spec, so the same spec run again resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u128);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            return Err(format!("a job id is 32 hex digits, not {s:?}"));
        }
        u128::from_str_radix(s, 16)
            .map(JobId)
            .map_err(|_| format!("a job id is 32 hex digits, not {s:?}"))
    }
}

/// The model a job trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// Multinomial logistic regression.
    Logistic {
        /// Input features.
        inputs: usize,
        /// Classes.
        classes: usize,
    },
    /// A multilayer perceptron with ReLU between layers: `[inputs, hidden..., classes]`.
    Mlp {
        /// Layer widths.
        layers: Vec<usize>,
    },
    /// A small CNN on `side`×`side` one-channel images: 3×3 convolution to `channels` maps,
    /// ReLU, 2×2 max pooling, a linear layer to `classes`.
    Cnn {
        /// Image side (even).
        side: usize,
        /// Feature maps.
        channels: usize,
        /// Classes.
        classes: usize,
    },
}

impl ModelSpec {
    /// The layer widths, inputs first, classes last (a CNN: pixels, pooled features,
    /// classes).
    pub fn widths(&self) -> Vec<usize> {
        match self {
            ModelSpec::Logistic { inputs, classes } => vec![*inputs, *classes],
            ModelSpec::Mlp { layers } => layers.clone(),
            ModelSpec::Cnn {
                side,
                channels,
                classes,
            } => vec![
                side.saturating_mul(*side),
                channels.saturating_mul((side / 2).saturating_mul(side / 2)),
                *classes,
            ],
        }
    }

    /// Number of parameters (weights and biases); saturates on absurd sizes.
    pub fn parameters(&self) -> usize {
        match self {
            ModelSpec::Cnn {
                channels, classes, ..
            } => {
                let pooled = self.widths()[1];
                channels
                    .saturating_mul(10)
                    .saturating_add(pooled.saturating_mul(*classes))
                    .saturating_add(*classes)
            }
            _ => self
                .widths()
                .windows(2)
                .map(|w| w[0].saturating_mul(w[1]).saturating_add(w[1]))
                .fold(0usize, usize::saturating_add),
        }
    }

    /// Input features and classes.
    pub fn io(&self) -> (usize, usize) {
        let widths = self.widths();
        (
            widths.first().copied().unwrap_or(0),
            widths.last().copied().unwrap_or(0),
        )
    }

    /// Each layer's weight shape and bias length, in the flat parameter order (weights
    /// row-major, then biases, layer by layer).
    pub fn shapes(&self) -> Vec<(Vec<usize>, usize)> {
        match self {
            ModelSpec::Cnn {
                side,
                channels,
                classes,
            } => vec![
                (vec![*channels, 1, 3, 3], *channels),
                (vec![*classes, channels * (side / 2) * (side / 2)], *classes),
            ],
            _ => self
                .widths()
                .windows(2)
                .map(|w| (vec![w[1], w[0]], w[1]))
                .collect(),
        }
    }

    /// Checks the model's shape.
    pub fn check(&self) -> Result<(), String> {
        let widths = self.widths();
        if widths.len() < 2 || widths.contains(&0) {
            return Err("the model needs at least an input and an output width, none 0".into());
        }
        if widths.len() > 16 {
            return Err("the model has more than 16 layers".into());
        }
        if let ModelSpec::Cnn { side, channels, .. } = self {
            if side % 2 != 0 || *side > 256 || *channels > 256 {
                return Err(
                    "a CNN's side must be even and at most 256, channels at most 256".into(),
                );
            }
        }
        if self.parameters() > MAX_PARAMETERS {
            return Err(format!(
                "the model has {} parameters, at most {MAX_PARAMETERS} are allowed",
                self.parameters()
            ));
        }
        Ok(())
    }
}

/// Local training of one round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTraining {
    /// Passes over the local data.
    pub epochs: u32,
    /// Minibatch size.
    pub batch: u32,
    /// Learning rate.
    pub lr: f32,
    /// SGD momentum (0: plain SGD).
    #[serde(default)]
    pub momentum: f32,
    /// FedProx's proximal weight mu (0: FedAvg's local training).
    #[serde(default)]
    pub prox: f32,
}

/// How many take part in a round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Participation {
    /// Fraction of the eligible peers asked each round.
    #[serde(default = "one")]
    pub fraction: f64,
    /// Fewest updates a round needs; fewer and the round is retried.
    #[serde(default = "one_u32")]
    pub min: u32,
    /// Most participants per round.
    #[serde(default = "many")]
    pub max: u32,
    /// Peers whose reputation is below this are not asked.
    #[serde(default = "default_min_reputation")]
    pub min_reputation: f64,
}

fn one() -> f64 {
    1.0
}
fn one_u32() -> u32 {
    1
}
fn many() -> u32 {
    1000
}
fn default_min_reputation() -> f64 {
    -50.0
}

impl Default for Participation {
    fn default() -> Self {
        Self {
            fraction: 1.0,
            min: 1,
            max: many(),
            min_reputation: default_min_reputation(),
        }
    }
}

/// Which devices may take part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePolicy {
    /// A device on battery takes part only with at least this charge (percent).
    pub min_battery: Option<u8>,
    /// A device hotter than this (°C) does not take part.
    pub max_temperature: Option<f32>,
    /// Devices on a metered network do not take part.
    #[serde(default)]
    pub exclude_metered: bool,
}

/// The aggregation rule, as written in a job spec.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum AggregatorSpec {
    /// Weighted mean.
    Fedavg {
        /// Drop updates whose norm is an IQR outlier first (k, e.g. 1.5).
        #[serde(default)]
        iqr: Option<f64>,
    },
    /// Coordinate-wise median.
    Median {
        /// IQR norm filter first.
        #[serde(default)]
        iqr: Option<f64>,
    },
    /// Trimmed mean.
    TrimmedMean {
        /// Fraction trimmed from each side.
        beta: f64,
        /// IQR norm filter first.
        #[serde(default)]
        iqr: Option<f64>,
    },
    /// Krum.
    Krum {
        /// Byzantine updates tolerated.
        f: usize,
        /// IQR norm filter first.
        #[serde(default)]
        iqr: Option<f64>,
    },
    /// Multi-Krum.
    MultiKrum {
        /// Byzantine updates tolerated.
        f: usize,
        /// Updates averaged.
        m: usize,
        /// IQR norm filter first.
        #[serde(default)]
        iqr: Option<f64>,
    },
}

impl Default for AggregatorSpec {
    fn default() -> Self {
        AggregatorSpec::Fedavg { iqr: None }
    }
}

impl AggregatorSpec {
    /// The rule and the IQR filter's k.
    pub fn rule(&self) -> (Rule, Option<f64>) {
        match *self {
            AggregatorSpec::Fedavg { iqr } => (Rule::FedAvg, iqr),
            AggregatorSpec::Median { iqr } => (Rule::Median, iqr),
            AggregatorSpec::TrimmedMean { beta, iqr } => (Rule::TrimmedMean { beta }, iqr),
            AggregatorSpec::Krum { f, iqr } => (Rule::Krum { f }, iqr),
            AggregatorSpec::MultiKrum { f, m, iqr } => (Rule::MultiKrum { f, m }, iqr),
        }
    }

    /// Checks the rule's parameters.
    pub fn check(&self) -> Result<(), String> {
        match self.rule() {
            (Rule::TrimmedMean { beta }, _) if !(0.0..0.5).contains(&beta) => {
                Err("aggregator.beta must be in [0, 0.5)".into())
            }
            (Rule::MultiKrum { m: 0, .. }, _) => Err("aggregator.m must be at least 1".into()),
            (Rule::Krum { f } | Rule::MultiKrum { f, .. }, _) if f > MAX_MEMBERS => {
                Err(format!("aggregator.f must be at most {MAX_MEMBERS}"))
            }
            (Rule::MultiKrum { m, .. }, _) if m > MAX_MEMBERS => {
                Err(format!("aggregator.m must be at most {MAX_MEMBERS}"))
            }
            (_, Some(k)) if !(k.is_finite() && k > 0.0) => {
                Err("aggregator.iqr must be above 0".into())
            }
            _ => Ok(()),
        }
    }

    /// A short name for reports.
    pub fn name(&self) -> String {
        let (rule, iqr) = self.rule();
        let base = match rule {
            Rule::FedAvg => "fedavg".to_owned(),
            Rule::Median => "median".to_owned(),
            Rule::TrimmedMean { beta } => format!("trimmed_mean({beta})"),
            Rule::Krum { f } => format!("krum({f})"),
            Rule::MultiKrum { f, m } => format!("multi_krum({f},{m})"),
        };
        match iqr {
            Some(k) => format!("{base}+iqr({k})"),
            None => base,
        }
    }
}

/// The server optimizer, as written in a job spec.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "optimizer", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerSpec {
    /// `w += lr * aggregate`.
    Sgd {
        /// Server learning rate.
        #[serde(default = "one_f32")]
        lr: f32,
    },
    /// Server momentum.
    Fedavgm {
        /// Server learning rate.
        #[serde(default = "one_f32")]
        lr: f32,
        /// Momentum.
        #[serde(default = "default_momentum")]
        momentum: f32,
    },
    /// Server Adam.
    Fedadam {
        /// Server learning rate.
        #[serde(default = "default_adam_lr")]
        lr: f32,
    },
}

fn one_f32() -> f32 {
    1.0
}
fn default_momentum() -> f32 {
    0.9
}
fn default_adam_lr() -> f32 {
    0.01
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec::Sgd { lr: 1.0 }
    }
}

impl ServerSpec {
    /// The optimizer.
    pub fn optimizer(&self) -> ServerOptimizer {
        match *self {
            ServerSpec::Sgd { lr } => ServerOptimizer::Sgd { lr },
            ServerSpec::Fedavgm { lr, momentum } => ServerOptimizer::FedAvgM { lr, momentum },
            ServerSpec::Fedadam { lr } => ServerOptimizer::FedAdam {
                lr,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
        }
    }
}

/// How participants compress their updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Compression {
    /// Dense little-endian f32.
    #[default]
    None,
    /// The largest `fraction` of values by magnitude, the rest fed back next round.
    TopK {
        /// Fraction kept, in (0, 1].
        fraction: f64,
    },
    /// 8-bit blockwise quantisation.
    Int8,
}

impl Compression {
    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Compression::None => "none".into(),
            Compression::TopK { fraction } => format!("topk({fraction})"),
            Compression::Int8 => "int8".into(),
        }
    }
}

/// A federated training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A name for people.
    #[serde(default)]
    pub name: String,
    /// The model.
    pub model: ModelSpec,
    /// Initial weights: a blob of little-endian f32 values in the model's parameter order (a
    /// previous job's model, say), fetched from the network; absent: random from `seed`.
    #[serde(default)]
    pub initial: Option<ContentId>,
    /// The dataset tag participants hold.
    pub dataset: String,
    /// Rounds.
    pub rounds: u32,
    /// Local training per round.
    pub train: LocalTraining,
    /// Who takes part.
    #[serde(default)]
    pub participants: Participation,
    /// Device policy.
    #[serde(default)]
    pub device: DevicePolicy,
    /// How updates are combined.
    #[serde(default)]
    pub aggregator: AggregatorSpec,
    /// How the aggregate moves the global model.
    #[serde(default)]
    pub server: ServerSpec,
    /// How updates travel.
    #[serde(default)]
    pub compression: Compression,
    /// Cluster size of hierarchical aggregation (0 or 1: flat).
    #[serde(default)]
    pub cluster_size: u32,
    /// Milliseconds a round waits for updates; stragglers are cut.
    #[serde(default = "default_deadline")]
    pub round_deadline_ms: u64,
    /// Evaluation data on the coordinator (a dataset source, see the CLI), if any.
    #[serde(default)]
    pub eval: Option<String>,
    /// Seed of initial weights, selection and local shuffling.
    #[serde(default)]
    pub seed: u64,
    /// Differential privacy (DP-FedAvg), if the job promises it. Not encoded when absent, so
    /// that a job without it keeps its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<Privacy>,
    /// Secure aggregation, if the job promises that no participant's update is seen in the
    /// clear (by the coordinator either). Not encoded when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureAggregation>,
}

/// Secure aggregation (Bonawitz et al. 2017; [`crate::secround`]): each round's participants
/// mask their updates with pairwise masks that cancel in the sum, and share their secrets so
/// that the round completes when some drop out. In a flat job the coordinator learns the sum
/// of the updates of those that sent (FedAvg's weighted mean) and nothing about any one of
/// them; in a clustered job each head learns its members' sum and the coordinator each
/// cluster's mean, which it combines by the job's rule (robust over clusters).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregation {
    /// The share of a round's participants (of a participant and its neighbours, with
    /// `neighbours`) whose shares rebuild one participant's secrets (at least a majority is
    /// used whatever this says): a round completes while this share is left, and no fewer
    /// can unmask anyone. With neighbourhoods each step of the round needs a bare majority
    /// of it whatever this says.
    #[serde(default = "half")]
    pub threshold: f64,
    /// Neighbourhoods (SecAgg+): each participant masks with and shares its secrets among
    /// this many others (at least 4, rounded up to an even number), so its work grows with
    /// this, not with the round's size; the threshold is then the share of a neighbourhood,
    /// and a coordinator colluding with that many of a participant's neighbours could unmask
    /// it (docs/ARCHITECTURE.md). 0 (the default), or at least the round's size: everyone
    /// with everyone.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub neighbours: u32,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn half() -> f64 {
    0.5
}

impl SecureAggregation {
    fn check(&self, spec: &JobSpec) -> Result<(), String> {
        if !(0.5..=1.0).contains(&self.threshold) {
            return Err("secure_aggregation.threshold must be in [0.5, 1]".into());
        }
        let least = crate::secround::MIN_NEIGHBOURS as u32;
        if (self.neighbours != 0 && self.neighbours < least)
            || self.neighbours > crate::secround::MAX_PARTICIPANTS as u32
        {
            return Err(format!(
                "secure_aggregation.neighbours must be 0 (everyone) or {least} to {}: a \
                 coordinator colluding with half of a participant's neighbours could unmask it",
                crate::secround::MAX_PARTICIPANTS
            ));
        }
        let clustered = spec.cluster_size > 1;
        if !clustered && spec.aggregator != (AggregatorSpec::Fedavg { iqr: None }) {
            return Err(format!(
                "secure_aggregation in a flat job needs aggregator fedavg without an IQR \
                 filter, not {}: the coordinator sees only the sum of the masked updates, and \
                 a median, a trimmed mean, Krum or a filter needs each update in the clear \
                 (with cluster_size of 4 or more the aggregator applies over the clusters' \
                 secure sums)",
                spec.aggregator.name()
            ));
        }
        if spec.compression != Compression::None {
            return Err(
                "secure_aggregation needs compression none: masked values are uniformly \
                 random words, which neither sparsify nor quantise"
                    .into(),
            );
        }
        if clustered && spec.cluster_size < 1 + crate::secround::MIN_PARTICIPANTS as u32 {
            return Err(format!(
                "secure_aggregation with clusters needs cluster_size of at least {}: each \
                 head sums at least {} members securely",
                1 + crate::secround::MIN_PARTICIPANTS,
                crate::secround::MIN_PARTICIPANTS
            ));
        }
        if spec.participants.min < 3 {
            return Err(
                "secure_aggregation needs participants.min of at least 3: from a sum of two \
                 updates and the next model, each of the two learns the other's update"
                    .into(),
            );
        }
        if let Some(privacy) = &spec.privacy {
            // Each participant's noise must fit the fixed point of the largest round.
            let clip = f64::from(privacy.clip);
            let std = privacy.noise_multiplier * clip / f64::from(spec.participants.min).sqrt();
            let most = (spec.participants.max as usize).min(crate::secround::MAX_PARTICIPANTS);
            let range = crate::secagg::range(most);
            if clip + 6.0 * std > range {
                return Err(format!(
                    "privacy with secure_aggregation: each participant's noise (clip {clip}, \
                     standard deviation {std:.3}) does not fit the fixed-point range of \
                     {most} participants (±{range:.0}); lower privacy.clip or \
                     participants.max, or raise participants.min"
                ));
            }
        }
        Ok(())
    }
}

fn default_deadline() -> u64 {
    10_000
}

/// What a differentially private job (DP-FedAvg) promises and how.
///
/// Each round the coordinator draws participants by Poisson sampling with secret randomness
/// (each eligible peer independently with probability `participants.fraction`;
/// `participants.max` does not apply, and a round that falls short of `participants.min`
/// is not drawn again: it aggregates what arrived), names each its own in its ticket, clips each
/// update to L2 norm `clip`, adds Gaussian noise of standard deviation
/// `noise_multiplier × clip` to their sum and divides by the expected number of participants.
/// A privacy accountant ([`crate::dp`]) reports the ε spent after every round at `delta`; the
/// job stops before a round would spend more than `epsilon`.
///
/// With secure aggregation the noise is distributed instead: each participant clips its own
/// update and adds Gaussian noise of standard deviation `noise_multiplier × clip /
/// √participants.min` (a round unmasks only when at least that many sent; one that falls
/// short releases nothing, leaves the model as it was and is charged), the coordinator divides
/// the noised sum by the expected number of participants, and the sample is named to the
/// participants (each checks the others' keys): the reported ε, which assumes a secret
/// sample, holds against observers of the models, not against the coordinator or the round's
/// participants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// L2 norm each participant's update is clipped to.
    pub clip: f32,
    /// Standard deviation of the noise over `clip` (σ).
    pub noise_multiplier: f64,
    /// The δ of the (ε, δ) guarantee.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// The most ε the job may spend.
    #[serde(default)]
    pub epsilon: Option<f64>,
}

fn default_delta() -> f64 {
    1e-5
}

impl Privacy {
    fn check(&self, spec: &JobSpec) -> Result<(), String> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err("privacy.clip must be a number above 0".into());
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err("privacy.noise_multiplier must be a number above 0".into());
        }
        if !(self.delta > 0.0 && self.delta < 0.01) {
            return Err("privacy.delta must be above 0 and below 0.01".into());
        }
        if self.epsilon.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
            return Err("privacy.epsilon must be a number above 0".into());
        }
        if spec.aggregator != (AggregatorSpec::Fedavg { iqr: None }) {
            return Err(
                "privacy needs aggregator fedavg without an IQR filter: the noise bounds what \
                 one clipped update can change in a sum, not in a median or a filter"
                    .into(),
            );
        }
        if spec.compression != Compression::None || spec.cluster_size > 1 {
            return Err(
                "privacy needs dense updates (compression none) and a flat job (cluster_size \
                 0 or 1): the coordinator clips each participant's update"
                    .into(),
            );
        }
        Ok(())
    }
}

impl JobSpec {
    /// The job's id: BLAKE3 over the spec's encoding.
    pub fn id(&self) -> JobId {
        let hash = blake3::hash(&wire::encode(self));
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash.as_bytes()[..16]);
        JobId(u128::from_le_bytes(bytes))
    }

    /// Checks every field a coordinator or participant relies on.
    pub fn check(&self) -> Result<(), String> {
        self.model.check()?;
        if self.dataset.is_empty() || self.dataset.len() > 64 {
            return Err("the dataset tag must be 1 to 64 characters".into());
        }
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return Err(format!("rounds must be 1 to {MAX_ROUNDS}"));
        }
        let t = &self.train;
        if t.epochs == 0 || t.epochs > 1000 || t.batch == 0 || t.batch > 1 << 16 {
            return Err("train.epochs must be 1 to 1000 and train.batch 1 to 65536".into());
        }
        if !(t.lr.is_finite() && t.lr > 0.0 && t.lr <= 100.0) {
            return Err("train.lr must be above 0 and at most 100".into());
        }
        if !(0.0..1.0).contains(&t.momentum) || !(0.0..=1000.0).contains(&t.prox) {
            return Err("train.momentum must be in [0, 1) and train.prox in [0, 1000]".into());
        }
        let p = &self.participants;
        if !(p.fraction > 0.0 && p.fraction <= 1.0) || p.min == 0 || p.max < p.min {
            return Err(
                "participants: fraction in (0, 1], min at least 1, max at least min".into(),
            );
        }
        if !p.min_reputation.is_finite() {
            return Err("participants.min_reputation must be a number".into());
        }
        self.aggregator.check()?;
        if matches!(self.compression, Compression::TopK { .. })
            && self.aggregator.rule().0 != Rule::FedAvg
        {
            return Err(
                "compression top_k needs aggregator fedavg: the coordinate-wise and \
                        distance rules see mostly zeros in sparse updates"
                    .into(),
            );
        }
        let server_lr = match self.server {
            ServerSpec::Sgd { lr }
            | ServerSpec::Fedavgm { lr, .. }
            | ServerSpec::Fedadam { lr } => lr,
        };
        if !(server_lr.is_finite() && server_lr > 0.0 && server_lr <= 100.0) {
            return Err("server.lr must be above 0 and at most 100".into());
        }
        if let ServerSpec::Fedavgm { momentum, .. } = self.server {
            if !(0.0..1.0).contains(&momentum) {
                return Err("server.momentum must be in [0, 1)".into());
            }
        }
        if let Compression::TopK { fraction } = self.compression {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err("compression.fraction must be in (0, 1]".into());
            }
        }
        if self.cluster_size as usize > MAX_MEMBERS {
            return Err(format!("cluster_size must be at most {MAX_MEMBERS}"));
        }
        if !(1..=3_600_000).contains(&self.round_deadline_ms) {
            return Err("round_deadline_ms must be 1 to 3600000".into());
        }
        if let Some(privacy) = &self.privacy {
            privacy.check(self)?;
        }
        if let Some(secure) = &self.secure_aggregation {
            secure.check(self)?;
        }
        Ok(())
    }
}

/// What the coordinator knows about a peer that holds the job's dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The peer.
    pub peer: PeerId,
    /// Samples it holds under the tag.
    pub samples: u64,
    /// Its reputation with the coordinator.
    pub reputation: f64,
    /// Its announced power state.
    pub power: Option<PowerState>,
    /// Whether it announced a metered network.
    pub metered: bool,
}

/// Why a peer is not asked this round.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Exclusion {
    /// Reputation below the job's threshold.
    #[error("reputation {0:.1} is below the job's threshold")]
    Reputation(f64),
    /// On battery below the threshold.
    #[error("on battery at {0}%")]
    Battery(u8),
    /// Too hot.
    #[error("at {0:.0} °C")]
    Temperature(f32),
    /// On a metered network.
    #[error("on a metered network")]
    Metered,
    /// Holds no data.
    #[error("holds no samples")]
    NoData,
}

/// Whether `candidate` may take part under `spec`. A device on mains, or that reports no
/// power state (most servers), passes the battery rule.
pub fn eligibility(candidate: &Candidate, spec: &JobSpec) -> Result<(), Exclusion> {
    if candidate.samples == 0 {
        return Err(Exclusion::NoData);
    }
    if candidate.reputation.is_nan() || candidate.reputation < spec.participants.min_reputation {
        return Err(Exclusion::Reputation(candidate.reputation));
    }
    if spec.device.exclude_metered && candidate.metered {
        return Err(Exclusion::Metered);
    }
    if let Some(power) = &candidate.power {
        if let (Some(min), Some(battery)) = (spec.device.min_battery, power.battery_pct) {
            if power.on_mains != Some(true) && battery < min {
                return Err(Exclusion::Battery(battery));
            }
        }
        if let (Some(max), Some(t)) = (spec.device.max_temperature, power.temperature_c) {
            if t > max {
                return Err(Exclusion::Temperature(t));
            }
        }
    }
    Ok(())
}

/// How many of `eligible` peers a round asks.
pub fn round_size(eligible: usize, p: &Participation) -> usize {
    let wanted = (p.fraction * eligible as f64).ceil() as usize;
    wanted.max(p.min as usize).min(p.max as usize).min(eligible)
}

/// Picks a round's participants among `eligible`: those asked least often so far first
/// (`asked` counts earlier rounds), ties broken at random; returned in ascending peer order.
pub fn select(
    eligible: &[PeerId],
    asked: &BTreeMap<PeerId, u32>,
    p: &Participation,
    rng: &mut impl Rng,
) -> Vec<PeerId> {
    let mut order: Vec<PeerId> = eligible.to_vec();
    order.sort();
    order.dedup();
    order.shuffle(rng);
    // A stable sort keeps the random order among peers asked equally often.
    order.sort_by_key(|peer| asked.get(peer).copied().unwrap_or(0));
    order.truncate(round_size(order.len(), p));
    order.sort();
    order
}

/// A differentially private job's participants: each of `eligible` independently with
/// probability `fraction` (Poisson sampling, which the privacy accountant assumes). `rng`
/// must be secret: who was sampled is part of what the noise hides.
pub fn poisson_select(eligible: &[PeerId], fraction: f64, rng: &mut impl Rng) -> Vec<PeerId> {
    let mut peers: Vec<PeerId> = eligible.to_vec();
    peers.sort();
    peers.dedup();
    peers.retain(|_| rng.gen_bool(fraction.clamp(0.0, 1.0)));
    peers
}

/// A cluster of hierarchical aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Trains, gathers its members' updates and forwards one.
    pub head: PeerId,
    /// The other members.
    pub members: Vec<PeerId>,
}

/// Groups `peers` (each with the site its operator states, and its measured round-trip
/// time to the coordinator, `None` when unmeasured) into clusters of at most `size`: peers of
/// one site share clusters, never with another site's (peers that state none are one group),
/// and within a site peers close in RTT share a cluster, the closest of each its head. Sites
/// come in the order of their closest peers. `size` 0 or 1 gives one cluster per peer (flat).
///
/// A stated site is not checked: a peer can put itself in any site's clusters, as it could
/// by where it runs. What robust aggregation over clusters withstands is attackers in fewer
/// than half the clusters (docs/ARCHITECTURE.md).
pub fn clusters(peers: &[(PeerId, Option<&str>, Option<f64>)], size: usize) -> Vec<Cluster> {
    let rtt = |r: Option<f64>| r.filter(|r| r.is_finite()).unwrap_or(f64::MAX);
    let mut sites: BTreeMap<Option<&str>, Vec<(PeerId, f64)>> = BTreeMap::new();
    for (peer, site, r) in peers {
        sites.entry(*site).or_default().push((*peer, rtt(*r)));
    }
    let mut sites: Vec<Vec<(PeerId, f64)>> = sites.into_values().collect();
    for site in &mut sites {
        site.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    }
    // Stable: sites whose closest peers tie keep their names' order.
    sites.sort_by(|a, b| a[0].1.total_cmp(&b[0].1));
    sites
        .iter()
        .flat_map(|site| site.chunks(size.max(1)))
        .map(|group| Cluster {
            head: group[0].0,
            members: group[1..].iter().map(|(p, _)| *p).collect(),
        })
        .collect()
}

/// `clusters` with at least `min_members` members each: a cluster that is short takes the
/// ones after it in until it is not (so short clusters of small sites join each other, not
/// one large cluster), and a short last one joins the one before it; when there is only one
/// cluster and it is short, everyone becomes a plain participant (clusters without members).
/// A secure job needs `secround::MIN_PARTICIPANTS` members to sum; a plain one 1, so that a
/// peer alone in its site does not get a cluster's vote at the root.
pub fn fill_clusters(clusters: Vec<Cluster>, min_members: usize) -> Vec<Cluster> {
    let join = |into: &mut Cluster, short: Cluster| {
        into.members.push(short.head);
        into.members.extend(short.members);
    };
    let mut out: Vec<Cluster> = Vec::with_capacity(clusters.len());
    for cluster in clusters {
        match out.last_mut() {
            Some(last) if last.members.len() < min_members => join(last, cluster),
            _ => out.push(cluster),
        }
    }
    // Only the last can still be short.
    if out.len() > 1 && out.last().is_some_and(|c| c.members.len() < min_members) {
        let short = out.pop().expect("more than one cluster");
        join(out.last_mut().expect("more than one cluster"), short);
    }
    if out.len() == 1 && out[0].members.len() < min_members {
        let only = out.pop().expect("one cluster");
        return std::iter::once(only.head)
            .chain(only.members)
            .map(|head| Cluster {
                head,
                members: Vec::new(),
            })
            .collect();
    }
    out
}

/// `values` as little-endian bytes: how weights travel and are stored.
pub fn f32_to_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian bytes back to values; `None` unless the length is a multiple of 4.
pub fn f32_from_le(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// Weights or an update on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    /// Little-endian f32 values.
    Dense(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Top-k values.
    Sparse(Sparse),
    /// Int8 blocks.
    Int8(Quantised),
}

impl Payload {
    /// Dense encoding of `values`.
    pub fn dense(values: &[f32]) -> Self {
        Payload::Dense(f32_to_le(values))
    }

    /// The values, checked to be `expected` long and finite.
    pub fn decode(&self, expected: usize) -> Result<Vec<f32>, CompressError> {
        match self {
            Payload::Dense(bytes) => {
                if bytes.len() != expected.saturating_mul(4) {
                    return Err(CompressError::Length {
                        got: bytes.len() as u64 / 4,
                        expected,
                    });
                }
                let values = f32_from_le(bytes).expect("length checked above");
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(CompressError::NotFinite);
                }
                Ok(values)
            }
            Payload::Sparse(s) => s.decode(expected),
            Payload::Int8(q) => q.decode(expected),
        }
    }
}

/// A member a cluster head gathers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The member.
    #[serde(with = "crate::statement::peer_id_bytes")]
    pub peer: PeerId,
    /// Where it listens (multiaddr strings), to dial it if not yet connected.
    pub addrs: Vec<String>,
}

/// The coordinator's (or a cluster head's) request to train one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    /// The job.
    pub job: JobId,
    /// The round (1-based).
    pub round: u32,
    /// The model.
    pub model: ModelSpec,
    /// The dataset tag to train on.
    pub dataset: String,
    /// The global weights (dense).
    pub weights: Payload,
    /// Local training.
    pub train: LocalTraining,
    /// How to send the update back.
    pub compression: Compression,
    /// Seed of the round; each participant mixes in its data's digest.
    pub seed: u64,
    /// Milliseconds the requester waits.
    pub deadline_ms: u64,
    /// For a cluster head: the members to gather, and how to combine them.
    pub members: Vec<Member>,
    /// How a cluster head combines its members' updates.
    pub aggregator: AggregatorSpec,
    /// The coordinator's signature on this round's request (a cluster head forwards it
    /// unchanged): participants that train only for coordinators they trust check it.
    #[serde(default)]
    pub ticket: Option<JobTicket>,
    /// A securely aggregated round's setup: the request's stream then carries the round's
    /// steps (`crate::secround`). Not encoded when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<crate::secround::Setup>,
}

impl TrainRequest {
    /// What a [`JobTicket`] vouches for: everything a participant trains by (job, round,
    /// model, dataset, weights, local training, compression, seed, aggregator), not the
    /// deadline or members a cluster head changes when it forwards the request.
    pub fn body_digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"mycel/fl-request/1\0");
        wire::hash_encoded(
            &(
                self.job,
                self.round,
                &self.model,
                &self.dataset,
                &self.weights,
                self.train,
                self.compression,
                self.seed,
                self.aggregator,
                &self.secure,
            ),
            &mut h,
        );
        *h.finalize().as_bytes()
    }

    /// Bounds every field a participant allocates or loops over.
    pub fn check(&self) -> Result<(), String> {
        self.model.check()?;
        if self.members.len() > MAX_MEMBERS
            || self.members.iter().any(|m| m.addrs.len() > 8)
            || self.dataset.len() > 64
        {
            return Err("too many members or addresses, or a dataset tag too long".into());
        }
        let t = &self.train;
        if t.epochs == 0
            || t.epochs > 1000
            || t.batch == 0
            || t.batch > 1 << 16
            || !(t.lr.is_finite() && t.lr > 0.0 && t.lr <= 100.0)
            || !(0.0..1.0).contains(&t.momentum)
            || !(0.0..=1000.0).contains(&t.prox)
        {
            return Err("malformed local-training parameters".into());
        }
        if self.members.len().saturating_mul(self.model.parameters()) > MAX_GATHERED_VALUES {
            return Err("too many members for a model this size".into());
        }
        if !(1..=3_600_000).contains(&self.deadline_ms) {
            return Err("deadline_ms must be 1 to 3600000".into());
        }
        if let Compression::TopK { fraction } = self.compression {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err("malformed compression".into());
            }
        }
        if let Some(setup) = &self.secure {
            let named = setup.check()?;
            if self.compression != Compression::None {
                return Err("a securely aggregated round is dense (no compression)".into());
            }
            // A head's setup names exactly its members.
            if !self.members.is_empty() && !named.iter().eq(self.members.iter().map(|m| &m.peer)) {
                return Err("a secure cluster's setup does not name its members".into());
            }
        }
        self.aggregator.check()
    }
}

/// Digest of the members a cluster head is to gather.
fn members_digest(members: &[Member]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"mycel/fl-members/1\0");
    wire::hash_encoded(&members, &mut h);
    *h.finalize().as_bytes()
}

/// Most peers one ticket names.
pub const MAX_TICKET_PEERS: usize = 4 * MAX_MEMBERS;

/// A coordinator's signature on one round's request: the request's body (see
/// [`TrainRequest::body_digest`]), the members a cluster head is to gather, the peers the
/// request is for (the plain participants it was sent to, or a head and its members), the head
/// that may forward it, and when it expires. A node that trains only for coordinators it
/// trusts trains a round only under such a ticket, only when it is one of the peers named,
/// and only when the request came from the coordinator itself or, with no members, from the
/// ticket's head (forwarding it): no participant can ask another for its update, a head
/// gathers only the members the coordinator gave it, and an old ticket cannot be replayed
/// for long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTicket {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// [`TrainRequest::body_digest`] of the request.
    pub body: [u8; 32],
    /// Digest of the members a head is to gather (of none, for plain participants).
    pub members: [u8; 32],
    /// The peers the request is for (peer id bytes).
    pub peers: Vec<serde_bytes::ByteBuf>,
    /// The cluster head that may forward the request to its members (peer id bytes); none
    /// for plain participants.
    pub head: Option<serde_bytes::ByteBuf>,
    /// When the ticket stops being valid (Unix milliseconds).
    pub expires_at: u64,
    /// The coordinator's public key (protobuf encoding).
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Ed25519 signature over [`JobTicket::digest`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// The multihash code of a peer id that is its public key itself (Ed25519 keys' ids).
const IDENTITY_MULTIHASH: u64 = 0;

/// Clock skew allowed when checking a ticket's expiry.
const TICKET_SKEW_MS: u64 = 60_000;

impl JobTicket {
    /// What is signed: everything but the key and signature, domain-separated.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"mycel/fl-ticket/2\0");
        wire::hash_encoded(
            &(
                self.job,
                self.round,
                self.body,
                self.members,
                &self.peers,
                &self.head,
                self.expires_at,
            ),
            &mut h,
        );
        *h.finalize().as_bytes()
    }

    /// The coordinator `keypair` vouches for `request` (its members included) sent to
    /// `peers`, forwarded only by `head` (for a cluster head's request), until `expires_at`.
    pub fn sign(
        keypair: &Keypair,
        request: &TrainRequest,
        peers: &[PeerId],
        head: Option<PeerId>,
        expires_at: u64,
    ) -> Self {
        let mut ticket = Self {
            job: request.job,
            round: request.round,
            body: request.body_digest(),
            members: members_digest(&request.members),
            peers: peers
                .iter()
                .map(|p| serde_bytes::ByteBuf::from(p.to_bytes()))
                .collect(),
            head: head.map(|h| serde_bytes::ByteBuf::from(h.to_bytes())),
            expires_at,
            public_key: keypair.public().encode_protobuf(),
            signature: Vec::new(),
        };
        ticket.signature = keypair
            .sign(&ticket.digest())
            .expect("ed25519 signing does not fail");
        ticket
    }

    /// Checks that this ticket vouches for `request`, received by `me` from `from` at `now`;
    /// returns the coordinator that signed it. `from` must be the peer the connection
    /// authenticated, never an id a message claims: a ticket `from` its own signer is
    /// accepted without a signature check.
    pub fn check(
        &self,
        request: &TrainRequest,
        from: &PeerId,
        me: &PeerId,
        now: u64,
    ) -> Result<PeerId, String> {
        if self.peers.len() > MAX_TICKET_PEERS {
            return Err("the job ticket names too many peers".into());
        }
        // Sent by its signer in person, the ticket needs no signature check: the connection
        // it came over authenticated `from` (its peer id is the coordinator's key itself),
        // and a check costs each participant an Ed25519 verification every round. A ticket
        // forwarded by a cluster head is checked.
        let in_person = {
            let id = from.as_ref();
            id.code() == IDENTITY_MULTIHASH && id.digest() == self.public_key.as_slice()
        };
        let coordinator = if in_person {
            *from
        } else {
            let key = PublicKey::try_decode_protobuf(&self.public_key)
                .map_err(|_| "the job ticket's key does not decode".to_owned())?;
            if !key.verify(&self.digest(), &self.signature) {
                return Err("the job ticket's signature does not verify".into());
            }
            key.to_peer_id()
        };
        if now > self.expires_at.saturating_add(TICKET_SKEW_MS) {
            return Err("the job ticket has expired".into());
        }
        if self.job != request.job
            || self.round != request.round
            || self.body != request.body_digest()
        {
            return Err("the job ticket is for another request".into());
        }
        let is = |bytes: &serde_bytes::ByteBuf, peer: &PeerId| {
            bytes.as_slice() == peer.to_bytes().as_slice()
        };
        if !self.peers.iter().any(|p| is(p, me)) {
            return Err("the job ticket is not for this node".into());
        }
        let from_head = self.head.as_ref().is_some_and(|h| is(h, from));
        if !request.members.is_empty() {
            // Gathering: only as the ticket's head, only the members it covers, only when
            // the coordinator asks.
            if *from != coordinator || !self.head.as_ref().is_some_and(|h| is(h, me)) {
                return Err("only the coordinator can make this node a cluster head".into());
            }
            if self.members != members_digest(&request.members) {
                return Err("the job ticket gives this node no such members to gather".into());
            }
        } else if *from != coordinator && !from_head {
            return Err(
                "the request came from neither the coordinator nor the head of its ticket".into(),
            );
        }
        Ok(coordinator)
    }
}

/// Whose training requests a node answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainFor {
    /// Any coordinator's (a node that accepts that its updates go to strangers).
    Anyone,
    /// Only jobs signed by these coordinators (and this node's own jobs).
    Coordinators(Vec<PeerId>),
}

impl Default for TrainFor {
    /// Only this node's own jobs.
    fn default() -> Self {
        Self::Coordinators(Vec::new())
    }
}

/// Whether `policy` lets `me` train `request`, received from `from` (the peer the connection
/// authenticated) at `now`.
pub fn authorise(
    policy: &TrainFor,
    request: &TrainRequest,
    from: &PeerId,
    me: &PeerId,
    now: u64,
) -> Result<(), String> {
    let TrainFor::Coordinators(allowed) = policy else {
        return Ok(());
    };
    let Some(ticket) = &request.ticket else {
        return Err(
            "this node trains only for coordinators its operator allowed, and the request \
             carries no job ticket"
                .into(),
        );
    };
    let coordinator = ticket.check(request, from, me, now)?;
    if coordinator != *me && !allowed.contains(&coordinator) {
        return Err(format!(
            "this node trains only for the coordinators its operator allowed \
             (mycel node --train-for PEER_ID); {coordinator} is not one"
        ));
    }
    Ok(())
}

/// A participant's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainReply {
    /// The update, and what a cluster head saw gathering its members.
    Update {
        /// The (possibly combined) update.
        update: SignedUpdate,
        /// The head's traffic with its members (zero for a plain participant).
        gathered: Gathered,
    },
    /// Why not.
    Refused(String),
}

/// A cluster head's report of gathering its members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Gathered {
    /// Bytes of updates the head received from members.
    pub bytes_up: u64,
    /// Bytes of requests the head sent to members.
    pub bytes_down: u64,
    /// Members asked.
    pub asked: u32,
    /// Members that did not answer in time or refused.
    pub dropped: u32,
    /// Members whose update was rejected (bad signature, malformed, not finite).
    pub rejected: u32,
}

impl Gathered {
    /// Adds `other`'s bytes and counts to these (saturating).
    pub fn add(&mut self, other: &Gathered) {
        self.bytes_up = self.bytes_up.saturating_add(other.bytes_up);
        self.bytes_down = self.bytes_down.saturating_add(other.bytes_down);
        self.asked = self.asked.saturating_add(other.asked);
        self.dropped = self.dropped.saturating_add(other.dropped);
        self.rejected = self.rejected.saturating_add(other.rejected);
    }

    /// The report with each count at most `members` (what a head asked `members` peers can
    /// truthfully claim).
    pub fn capped(self, members: u32) -> Gathered {
        Gathered {
            asked: self.asked.min(members),
            dropped: self.dropped.min(members),
            rejected: self.rejected.min(members),
            ..self
        }
    }
}

/// A round's update, signed by the peer that made it (or the cluster head that combined it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedUpdate {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// Samples behind the update.
    pub samples: u64,
    /// Mean training loss of the last local epoch.
    pub loss: f32,
    /// Digest of the data it trained on (orders updates independently of peer ids).
    pub data: ContentId,
    /// Updates combined into this one (1 unless sent by a cluster head).
    pub contributors: u32,
    /// Local weights minus global weights.
    pub payload: Payload,
    /// The signer's public key (protobuf encoding).
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Ed25519 signature over [`SignedUpdate::digest`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedUpdate {
    /// What is signed: everything but the key and signature, domain-separated.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"mycel/fl-update/1\0");
        h.update(&wire::encode(&(
            self.job,
            self.round,
            self.samples,
            self.loss,
            self.data,
            self.contributors,
            &self.payload,
        )));
        *h.finalize().as_bytes()
    }

    /// Signs an update.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        keypair: &Keypair,
        job: JobId,
        round: u32,
        samples: u64,
        loss: f32,
        data: ContentId,
        contributors: u32,
        payload: Payload,
    ) -> Self {
        let mut update = Self {
            job,
            round,
            samples,
            loss,
            data,
            contributors,
            payload,
            public_key: keypair.public().encode_protobuf(),
            signature: Vec::new(),
        };
        update.signature = keypair
            .sign(&update.digest())
            .expect("ed25519 signing does not fail");
        update
    }

    /// Checks that `sender` signed this update for `job`'s round `round`, and decodes it to
    /// `parameters` finite values.
    pub fn open(
        &self,
        sender: &PeerId,
        job: JobId,
        round: u32,
        parameters: usize,
    ) -> Result<Vec<f32>, Rejection> {
        let key =
            PublicKey::try_decode_protobuf(&self.public_key).map_err(|_| Rejection::Malformed)?;
        if key.to_peer_id() != *sender || !key.verify(&self.digest(), &self.signature) {
            return Err(Rejection::BadSignature);
        }
        if self.job != job || self.round != round {
            return Err(Rejection::Replayed);
        }
        if !self.loss.is_finite() || self.contributors == 0 {
            return Err(Rejection::Malformed);
        }
        self.payload
            .decode(parameters)
            .map_err(|_| Rejection::Malformed)
    }
}

/// The seed a participant trains with in a round: the round's seed mixed with its data's
/// digest, so every participant shuffles differently and the same data always the same way.
pub fn participant_seed(round_seed: u64, data: &ContentId) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&round_seed.to_le_bytes());
    h.update(&data.0);
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The seed of round `round` of a job seeded `seed`.
pub fn round_seed(seed: u64, round: u32) -> u64 {
    seed ^ (u64::from(round).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A poisoning behaviour, for benchmarks and tests of robust aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attack {
    /// Sends `w_g - 4 (w_local - w_g)`: the update times -4.
    SignFlip,
    /// Sends `w_g + N(0, 1)`: an update of standard normal noise.
    Noise,
}

impl Attack {
    /// Poisons an honest `update` in place.
    pub fn apply(self, update: &mut [f32], rng: &mut impl Rng) {
        match self {
            Attack::SignFlip => update.iter_mut().for_each(|v| *v *= -4.0),
            Attack::Noise => {
                use rand_distr::{Distribution, StandardNormal};
                update
                    .iter_mut()
                    .for_each(|v| *v = StandardNormal.sample(rng));
            }
        }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Attack::SignFlip => "sign_flip",
            Attack::Noise => "noise",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn spec() -> JobSpec {
        let toml_like = r#"{"model":{"kind":"mlp","layers":[64,32,10]},"dataset":"digits",
            "rounds":20,"train":{"epochs":1,"batch":32,"lr":0.1}}"#;
        serde_json::from_str(toml_like).unwrap()
    }

    #[test]
    fn secure_aggregation_keeps_old_ids_and_refuses_what_cannot_work_over_masked_updates() {
        assert!(
            !wire::encode(&spec()).windows(6).any(|w| w == b"secure"),
            "a job without secure aggregation encodes as before (its id unchanged)"
        );
        let secure = |edit: fn(&mut JobSpec)| {
            let mut s = spec();
            s.participants.min = 3;
            s.secure_aggregation = Some(SecureAggregation {
                threshold: 0.5,
                neighbours: 0,
            });
            edit(&mut s);
            s.check()
        };
        assert_eq!(secure(|_| {}), Ok(()));
        assert_eq!(
            secure(|s| s.secure_aggregation.as_mut().unwrap().neighbours = 6),
            Ok(())
        );
        for (what, edit) in [
            (
                "threshold",
                (|s| s.secure_aggregation.as_mut().unwrap().threshold = 0.4) as fn(&mut JobSpec),
            ),
            ("krum", |s| {
                s.aggregator = AggregatorSpec::Krum { f: 1, iqr: None }
            }),
            ("IQR", |s| {
                s.aggregator = AggregatorSpec::Fedavg { iqr: Some(1.5) }
            }),
            ("compression none", |s| s.compression = Compression::Int8),
            ("cluster_size", |s| s.cluster_size = 2),
            ("flat job", |s| {
                // Private and secure: distributed DP, in flat jobs only.
                s.cluster_size = 4;
                s.privacy = Some(Privacy {
                    clip: 1.0,
                    noise_multiplier: 1.0,
                    delta: 1e-5,
                    epsilon: None,
                })
            }),
            ("participants.min", |s| s.participants.min = 2),
            ("neighbours", |s| {
                s.secure_aggregation.as_mut().unwrap().neighbours = 2
            }),
        ] {
            let err = secure(edit).unwrap_err();
            assert!(err.contains(what), "{what}: {err}");
        }
        assert_eq!(
            secure(|s| {
                s.privacy = Some(Privacy {
                    clip: 1.0,
                    noise_multiplier: 1.0,
                    delta: 1e-5,
                    epsilon: None,
                })
            }),
            Ok(())
        );
        // With clusters of four or more, a robust rule applies over the clusters' sums.
        assert_eq!(
            secure(|s| {
                s.cluster_size = 4;
                s.aggregator = AggregatorSpec::Median { iqr: Some(1.5) };
            }),
            Ok(())
        );
    }

    #[test]
    fn filled_clusters_have_at_least_three_members_each() {
        let peers: Vec<PeerId> = (0..11).map(|_| PeerId::random()).collect();
        let plan = clusters(
            &peers.iter().map(|p| (*p, None, None)).collect::<Vec<_>>(),
            4,
        );
        assert_eq!(plan.len(), 3, "4 + 4 + 3");
        let merged = fill_clusters(plan.clone(), 3);
        assert_eq!(
            merged.iter().map(|c| c.members.len()).collect::<Vec<_>>(),
            vec![3, 6],
            "the short cluster joins the one before"
        );
        let everyone: std::collections::BTreeSet<PeerId> = merged
            .iter()
            .flat_map(|c| std::iter::once(c.head).chain(c.members.iter().copied()))
            .collect();
        assert_eq!(everyone.len(), 11);
        // One short cluster: everyone is a flat participant.
        let short = clusters(
            &peers[..3]
                .iter()
                .map(|p| (*p, None, None))
                .collect::<Vec<_>>(),
            4,
        );
        let flat = fill_clusters(short, 3);
        assert_eq!(flat.len(), 3);
        assert!(flat.iter().all(|c| c.members.is_empty()));
        // Clusters that are long enough stay as they are.
        let even = clusters(
            &peers[..8]
                .iter()
                .map(|p| (*p, None, None))
                .collect::<Vec<_>>(),
            4,
        );
        assert_eq!(fill_clusters(even.clone(), 3), even);
    }

    #[test]
    fn privacy_keeps_old_ids_and_refuses_what_it_cannot_bound() {
        let plain = spec();
        let encoded = wire::encode(&plain);
        assert!(
            !encoded.windows(7).any(|w| w == b"privacy"),
            "a job without privacy encodes as before (its id unchanged)"
        );
        let private = |edit: fn(&mut JobSpec)| {
            let mut s = spec();
            s.privacy = Some(Privacy {
                clip: 1.0,
                noise_multiplier: 1.0,
                delta: 1e-5,
                epsilon: Some(8.0),
            });
            edit(&mut s);
            s.check()
        };
        assert_eq!(private(|_| {}), Ok(()));
        for (what, edit) in [
            (
                "clip",
                (|s| s.privacy.as_mut().unwrap().clip = 0.0) as fn(&mut JobSpec),
            ),
            ("noise_multiplier", |s| {
                s.privacy.as_mut().unwrap().noise_multiplier = f64::NAN
            }),
            ("delta", |s| s.privacy.as_mut().unwrap().delta = 0.5),
            ("epsilon", |s| {
                s.privacy.as_mut().unwrap().epsilon = Some(-1.0)
            }),
            ("aggregator", |s| {
                s.aggregator = AggregatorSpec::Fedavg { iqr: Some(1.5) }
            }),
            ("flat", |s| s.cluster_size = 4),
        ] {
            let err = private(edit).unwrap_err();
            assert!(err.contains(what), "{what}: {err}");
        }
        // Poisson sampling: each peer on its own, about the fraction of them.
        let peers: Vec<PeerId> = (0..1000).map(|_| PeerId::random()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let chosen = poisson_select(&peers, 0.2, &mut rng).len();
        assert!((150..250).contains(&chosen), "{chosen}");
        assert_eq!(poisson_select(&peers, 1.0, &mut rng).len(), 1000);
    }

    #[test]
    fn a_minimal_spec_gets_defaults_and_bad_fields_are_named() {
        let s = spec();
        s.check().unwrap();
        assert_eq!(s.model.parameters(), 64 * 32 + 32 + 32 * 10 + 10);
        let cnn: ModelSpec =
            serde_json::from_str(r#"{"kind":"cnn","side":8,"channels":4,"classes":10}"#).unwrap();
        assert_eq!(cnn.parameters(), 4 * 9 + 4 + 10 * 4 * 16 + 10);
        let odd = ModelSpec::Cnn {
            side: 7,
            channels: 4,
            classes: 10,
        };
        assert!(odd.check().is_err());
        assert_eq!(s.aggregator, AggregatorSpec::Fedavg { iqr: None });
        assert_eq!(s.id(), spec().id());
        let mut other = spec();
        other.seed = 1;
        assert_ne!(s.id(), other.id());
        let id = s.id();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);

        for (field, bad) in [
            ("rounds", {
                let mut b = spec();
                b.rounds = 0;
                b
            }),
            ("lr", {
                let mut b = spec();
                b.train.lr = f32::NAN;
                b
            }),
            ("beta", {
                let mut b = spec();
                b.aggregator = AggregatorSpec::TrimmedMean {
                    beta: 0.5,
                    iqr: None,
                };
                b
            }),
            ("parameters", {
                let mut b = spec();
                b.model = ModelSpec::Mlp {
                    layers: vec![100_000, 100_000, 10],
                };
                b
            }),
        ] {
            let err = bad.check().unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
        let mut sparse_median = spec();
        sparse_median.compression = Compression::TopK { fraction: 0.1 };
        sparse_median.aggregator = AggregatorSpec::Median { iqr: None };
        assert!(sparse_median.check().unwrap_err().contains("top_k"));
        let mut huge_f = spec();
        huge_f.aggregator = AggregatorSpec::Krum {
            f: usize::MAX / 2,
            iqr: None,
        };
        assert!(huge_f.check().unwrap_err().contains("aggregator.f"));
        let unknown = r#"{"model":{"kind":"mlp","layers":[4,2]},"dataset":"d","rounds":1,
            "train":{"epochs":1,"batch":1,"lr":0.1},"colour":"red"}"#;
        assert!(serde_json::from_str::<JobSpec>(unknown).is_err());
    }

    #[test]
    fn the_device_policy_and_reputation_exclude() {
        let mut s = spec();
        s.device = DevicePolicy {
            min_battery: Some(30),
            max_temperature: Some(80.0),
            exclude_metered: true,
        };
        let base = Candidate {
            peer: PeerId::random(),
            samples: 10,
            reputation: 0.0,
            power: None,
            metered: false,
        };
        assert_eq!(eligibility(&base, &s), Ok(()));
        let power = |on_mains, battery_pct, temperature_c| Candidate {
            power: Some(PowerState {
                on_mains,
                battery_pct,
                temperature_c,
            }),
            ..base.clone()
        };
        assert_eq!(
            eligibility(&power(Some(false), Some(20), None), &s),
            Err(Exclusion::Battery(20))
        );
        assert_eq!(eligibility(&power(Some(true), Some(20), None), &s), Ok(()));
        assert_eq!(eligibility(&power(None, Some(31), None), &s), Ok(()));
        assert_eq!(
            eligibility(&power(Some(true), None, Some(90.0)), &s),
            Err(Exclusion::Temperature(90.0))
        );
        let metered = Candidate {
            metered: true,
            ..base.clone()
        };
        assert_eq!(eligibility(&metered, &s), Err(Exclusion::Metered));
        let shunned = Candidate {
            reputation: -60.0,
            ..base.clone()
        };
        assert!(matches!(
            eligibility(&shunned, &s),
            Err(Exclusion::Reputation(_))
        ));
    }

    #[test]
    fn selection_rotates_fairly_and_respects_bounds() {
        let peers: Vec<PeerId> = (0..10).map(|_| PeerId::random()).collect();
        let p = Participation {
            fraction: 0.3,
            min: 2,
            max: 5,
            ..Default::default()
        };
        assert_eq!(round_size(10, &p), 3);
        assert_eq!(round_size(1, &p), 1);
        assert_eq!(round_size(100, &Participation { fraction: 1.0, ..p }), 5);
        let mut rng = StdRng::seed_from_u64(7);
        let mut asked = BTreeMap::new();
        for _ in 0..10 {
            let chosen = select(&peers, &asked, &p, &mut rng);
            assert_eq!(chosen.len(), 3);
            for peer in chosen {
                *asked.entry(peer).or_insert(0) += 1;
            }
        }
        // 30 places over 10 peers: everyone asked exactly 3 times.
        assert!(peers.iter().all(|p| asked[p] == 3), "{asked:?}");
    }

    #[test]
    fn clusters_group_by_rtt_with_the_closest_as_head() {
        let p: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        let rtts = [5.0, 1.0, 30.0, 2.0, 31.0, 6.0];
        let peers: Vec<_> = p
            .iter()
            .zip(rtts)
            .map(|(p, r)| (*p, None, Some(r)))
            .collect();
        let cs = clusters(&peers, 3);
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].head, p[1]);
        assert_eq!(cs[0].members, vec![p[3], p[0]]);
        assert_eq!(cs[1].head, p[5]);
        assert_eq!(clusters(&peers, 0).len(), 6);
        assert!(clusters(&peers, 0).iter().all(|c| c.members.is_empty()));
    }

    #[test]
    fn clusters_keep_sites_apart_in_the_order_of_their_closest_peers() {
        let p: Vec<PeerId> = (0..9).map(|_| PeerId::random()).collect();
        // Two sites whose RTTs interleave, and two peers that state none.
        let placed = [
            (Some("far"), 2.0),
            (Some("near"), 1.0),
            (Some("far"), 3.0),
            (Some("near"), 4.0),
            (Some("far"), 5.0),
            (Some("near"), 6.0),
            (None, 0.5),
            (Some("near"), 7.0),
            (None, 8.0),
        ];
        let peers: Vec<_> = p
            .iter()
            .zip(placed)
            .map(|(p, (site, r))| (*p, site, Some(r)))
            .collect();
        let cs = clusters(&peers, 3);
        let shape: Vec<Vec<PeerId>> = cs
            .iter()
            .map(|c| std::iter::once(c.head).chain(c.members.clone()).collect())
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![p[6], p[8]],
                vec![p[1], p[3], p[5]],
                vec![p[7]],
                vec![p[0], p[2], p[4]],
            ],
            "sites in the order of their closest peers, never mixed, RTT order within"
        );
        // Short clusters take the next ones in until they are long enough.
        let merged = fill_clusters(cs, 2);
        let sizes: Vec<usize> = merged.iter().map(|c| c.members.len() + 1).collect();
        assert_eq!(sizes, vec![5, 4], "{merged:?}");
        assert_eq!((merged[0].head, merged[1].head), (p[6], p[7]));
        // Small sites join each other, not one large cluster: four sites of three, clusters
        // of four, three members each needed.
        let q: Vec<PeerId> = (0..12).map(|_| PeerId::random()).collect();
        let sites = ["a", "b", "c", "d"];
        let small: Vec<_> = q
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, Some(sites[i / 3]), Some(i as f64)))
            .collect();
        let merged = fill_clusters(clusters(&small, 4), 3);
        let sizes: Vec<usize> = merged.iter().map(|c| c.members.len() + 1).collect();
        assert_eq!(sizes, vec![6, 6]);
        // A plain job's peer alone in its site joins a neighbour.
        let alone = [
            (q[0], Some("a"), None),
            (q[1], Some("a"), None),
            (q[2], Some("b"), None),
        ];
        let merged = fill_clusters(clusters(&alone, 4), 1);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].members.len(), 2);
    }

    #[test]
    fn updates_open_only_for_their_signer_job_and_round() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let job = JobId(5);
        let data = ContentId::of(b"data");
        let update =
            SignedUpdate::sign(&key, job, 3, 10, 0.5, data, 1, Payload::dense(&[1.0, 2.0]));
        assert_eq!(update.open(&peer, job, 3, 2).unwrap(), vec![1.0, 2.0]);
        assert_eq!(
            update.open(&PeerId::random(), job, 3, 2),
            Err(Rejection::BadSignature)
        );
        assert_eq!(update.open(&peer, job, 4, 2), Err(Rejection::Replayed));
        assert_eq!(update.open(&peer, job, 3, 3), Err(Rejection::Malformed));
        let mut forged = update.clone();
        forged.payload = Payload::dense(&[9.0, 2.0]);
        assert_eq!(forged.open(&peer, job, 3, 2), Err(Rejection::BadSignature));
        let nan = SignedUpdate::sign(
            &key,
            job,
            3,
            10,
            0.5,
            data,
            1,
            Payload::dense(&[f32::NAN, 0.0]),
        );
        assert_eq!(nan.open(&peer, job, 3, 2), Err(Rejection::Malformed));
        let reply = TrainReply::Update {
            update,
            gathered: Gathered::default(),
        };
        let back: TrainReply = wire::decode(&wire::encode(&reply), MAX_UPDATE_BYTES).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn a_node_trains_only_under_a_ticket_from_a_coordinator_it_allowed_and_for_itself() {
        const NOW: u64 = 1_000_000;
        let s = spec();
        let [coordinator, head, member, me, stranger] =
            [(); 5].map(|_| Keypair::generate_ed25519());
        let id = |k: &Keypair| k.public().to_peer_id();
        let request = TrainRequest {
            job: s.id(),
            round: 2,
            model: s.model.clone(),
            dataset: s.dataset.clone(),
            weights: Payload::dense(&vec![0.5; s.model.parameters()]),
            train: s.train,
            compression: s.compression,
            seed: 7,
            deadline_ms: 1000,
            members: Vec::new(),
            aggregator: s.aggregator,
            ticket: None,
            secure: None,
        };
        let allowed = TrainFor::Coordinators(vec![id(&coordinator)]);
        let signed = |key: &Keypair, r: &TrainRequest, peers: &[PeerId], head: Option<PeerId>| {
            let mut r = r.clone();
            r.ticket = Some(JobTicket::sign(key, &r, peers, head, NOW + 5_000));
            r
        };
        let check = |policy: &TrainFor, r: &TrainRequest, from: &Keypair, to: &Keypair, now| {
            authorise(policy, r, &id(from), &id(to), now)
        };
        let refused = |r: &TrainRequest, from: &Keypair, to: &Keypair, now, what: &str| {
            let err = check(&allowed, r, from, to, now).unwrap_err();
            assert!(err.contains(what), "{err}");
        };
        // Flat: named plain participants, from the coordinator.
        let flat = signed(&coordinator, &request, &[id(&me), id(&stranger)], None);
        assert_eq!(check(&allowed, &flat, &coordinator, &me, NOW), Ok(()));
        // Anyone, without a ticket: the old behaviour, for an operator who wants it.
        assert_eq!(
            check(&TrainFor::Anyone, &request, &stranger, &me, NOW),
            Ok(())
        );
        refused(&request, &coordinator, &me, NOW, "no job ticket");
        assert!(check(&TrainFor::default(), &flat, &coordinator, &me, NOW)
            .unwrap_err()
            .contains("is not one"));
        // Another participant named in the same ticket cannot ask this one for its update,
        // nor can a stranger replay it, nor does it hold for long.
        refused(&flat, &stranger, &me, NOW, "neither the coordinator");
        refused(&flat, &coordinator, &me, NOW + 70_000, "expired");
        // A stranger's own ticket; a ticket for other peers; other weights; a forgery.
        let own = signed(&stranger, &request, &[id(&me)], None);
        refused(&own, &stranger, &me, NOW, "is not one");
        refused(
            &signed(&coordinator, &request, &[id(&member)], None),
            &coordinator,
            &me,
            NOW,
            "not for this node",
        );
        let mut other_weights = flat.clone();
        other_weights.weights = Payload::dense(&vec![9.0; s.model.parameters()]);
        refused(&other_weights, &coordinator, &me, NOW, "another request");
        // A node's own jobs need no allow-list.
        let mine = signed(&me, &request, &[id(&me)], None);
        assert_eq!(check(&TrainFor::default(), &mine, &me, &me, NOW), Ok(()));

        // A cluster: the head gathers exactly the members the ticket covers, when the
        // coordinator asks, and forwards the request (members cleared, deadline shortened)
        // under the same ticket, which its member accepts from it and from nobody else.
        let mut cluster = request.clone();
        cluster.members = vec![Member {
            peer: id(&member),
            addrs: Vec::new(),
        }];
        let cluster = signed(
            &coordinator,
            &cluster,
            &[id(&head), id(&member)],
            Some(id(&head)),
        );
        assert_eq!(check(&allowed, &cluster, &coordinator, &head, NOW), Ok(()));
        let mut more = cluster.clone();
        more.members.push(Member {
            peer: id(&stranger),
            addrs: Vec::new(),
        });
        refused(&more, &coordinator, &head, NOW, "no such members");
        refused(
            &cluster,
            &coordinator,
            &member,
            NOW,
            "only the coordinator can make",
        );
        refused(&cluster, &head, &head, NOW, "only the coordinator can make");
        let mut forwarded = cluster.clone();
        forwarded.members.clear();
        forwarded.deadline_ms = 800;
        assert_eq!(check(&allowed, &forwarded, &head, &member, NOW), Ok(()));
        refused(
            &forwarded,
            &stranger,
            &member,
            NOW,
            "neither the coordinator",
        );
        // A forwarded ticket is checked: a forgery, or another key's, fails. From the
        // coordinator in person the connection vouches for the sender, and the signature is
        // not what authorises it.
        let mut in_person = flat.clone();
        in_person.ticket.as_mut().unwrap().signature[0] ^= 1;
        assert_eq!(check(&allowed, &in_person, &coordinator, &me, NOW), Ok(()));
        let mut forged = forwarded.clone();
        forged.ticket.as_mut().unwrap().signature[0] ^= 1;
        refused(&forged, &head, &member, NOW, "signature");
        let mut rekeyed = forwarded.clone();
        rekeyed.ticket.as_mut().unwrap().public_key = stranger.public().encode_protobuf();
        refused(&rekeyed, &head, &member, NOW, "signature");
    }

    #[test]
    fn train_requests_are_bounded() {
        let s = spec();
        let good = TrainRequest {
            job: s.id(),
            round: 1,
            model: s.model.clone(),
            dataset: s.dataset.clone(),
            weights: Payload::dense(&[]),
            train: s.train,
            compression: s.compression,
            seed: 0,
            deadline_ms: 1000,
            members: Vec::new(),
            aggregator: s.aggregator,
            ticket: None,
            secure: None,
        };
        good.check().unwrap();
        let bad = |f: &dyn Fn(&mut TrainRequest)| {
            let mut r = good.clone();
            f(&mut r);
            r.check().is_err()
        };
        assert!(bad(&|r| r.train.epochs = 0));
        assert!(bad(&|r| r.train.batch = 1 << 20));
        assert!(bad(&|r| r.train.momentum = 1.5));
        assert!(bad(&|r| r.deadline_ms = 0));
        assert!(bad(&|r| r.aggregator = AggregatorSpec::Krum {
            f: usize::MAX,
            iqr: None
        }));
        assert!(bad(&|r| {
            r.model = ModelSpec::Mlp {
                layers: vec![1000, 1000],
            };
            r.members = (0..100)
                .map(|_| Member {
                    peer: PeerId::random(),
                    addrs: Vec::new(),
                })
                .collect();
        }));
    }

    #[test]
    fn attacks_poison_as_described() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut u = vec![1.0, -0.5];
        Attack::SignFlip.apply(&mut u, &mut rng);
        assert_eq!(u, vec![-4.0, 2.0]);
        let mut big = vec![0.0f32; 10_000];
        Attack::Noise.apply(&mut big, &mut rng);
        let var = big.iter().map(|v| v * v).sum::<f32>() / big.len() as f32;
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }
}
