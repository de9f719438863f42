//! Pure protocol logic of Mycel.
//!
//! Nothing in this crate performs I/O, reads a clock or draws randomness on its own: time
//! arrives as [`UnixMillis`] arguments and decisions come back as return values, so every
//! rule here can be tested exhaustively and driven by a simulator (see `docs/ARCHITECTURE.md`
//! in the repository). The libp2p driver in `mycel-net` feeds events in and carries decisions
//! out.
//!
//! - [`secagg`]: secure aggregation's arithmetic (pairwise and self masks, Shamir shares
//!   for dropouts): the aggregator learns only the sum.
//! - [`statement`]: signed, attributable statements nodes gossip (capability announcements,
//!   failure reports) and their bounded decoding.
//! - [`id`]: content ids (BLAKE3) of blobs and models.
//! - [`aggregate`]: combining federated-training updates (FedAvg and Byzantine-robust rules)
//!   and server optimizers.
//! - [`compress`]: top-k sparsification with error feedback and int8 quantisation of
//!   updates.
//! - [`dp`]: privacy accounting for differentially private federated averaging (Rényi DP
//!   of the sampled Gaussian mechanism, converted to (ε, δ)).
//! - [`fl`]: federated training jobs, participant selection and the training protocol's
//!   messages.
//! - [`blob`]: blobs as BLAKE3 trees (chunks verified one at a time against the id) and
//!   directory manifests.
//! - [`keepalive`]: which task streams a requester keeps open between tasks.
//! - [`membership`]: who is alive, who has failed, and what each peer offers.
//! - [`antientropy`]: when, and with whom, a node runs anti-entropy syncs.
//! - [`peering`]: staying joined: dial back-off, degree upkeep, shedding connections.
//! - [`ratelimit`]: per-peer token buckets.
//! - [`reputation`]: a decayed per-peer score fed by misbehaviour.
//! - [`routing`]: ranking the peers that could run a task (reliability, load, RTT,
//!   Thompson-sampling exploration).
//! - [`task`]: the inference task protocol's messages, their bounds and signed results.
//! - [`trust`]: what peers' work has shown (successes, failures, timeouts, disagreements,
//!   invalid answers) and isolation of liars with a doubling back-off.
//! - [`verify`]: verification modes, the quorum that accepts a replicated task's output
//!   (no wrong output while fewer than a third of the candidates lie) and certificates.
//! - [`wire`]: size-bounded CBOR encoding shared by every protocol message.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod aggregate;
pub mod antientropy;
pub mod autonat;
pub mod blob;
pub mod compress;
pub mod dp;
pub mod fl;
pub mod grammar;
pub mod id;
pub mod inbound;
pub mod keepalive;
pub mod membership;
pub mod naming;
pub mod pace;
pub mod peering;
pub mod probe;
pub mod queue;
pub mod ratelimit;
pub mod reach;
pub mod reputation;
pub mod routing;
pub mod secagg;
pub mod secround;
pub mod statement;
pub mod task;
pub mod trust;
pub mod verify;
pub mod wire;

pub use libp2p_identity::{Keypair, PeerId, PublicKey};

/// Milliseconds since the Unix epoch. Passed in by drivers; never read from a clock here.
pub type UnixMillis = u64;
