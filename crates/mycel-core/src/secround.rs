//! One securely aggregated round (flat), as two state machines: the coordinator's
//! ([`Coordinator`]) and a participant's ([`Participant`]). The arithmetic is
//! [`crate::secagg`]'s; this is who sends what, in which order, and what each side checks.
//!
//! The round's request carries a [`Setup`] (the participants in index order, the threshold,
//! the weight scale), vouched for by the coordinator's ticket. Then, on each participant's
//! stream (Bonawitz et al. 2017, §4, with signed keys):
//!
//! 1. participant → coordinator: [`Keys`], its round's public mask and sealing keys and its
//!    self-mask commitment, signed by its node key;
//! 2. coordinator → all: the roster ([`ToParticipant::Roster`]), every set of keys that came
//!    in time; each participant checks every signature against the setup's peer ids;
//! 3. participant → coordinator: its secrets' shares for each other roster member, sealed
//!    for that member ([`Sealed`]); those that sent theirs are the round's sharers;
//! 4. coordinator → each sharer: the sealed shares addressed to it ([`ToParticipant::Inbox`]);
//!    it masks its update with the pairwise masks of exactly those senders and sends it
//!    ([`Masked`]), or, when a share does not open, names its sealer instead and leaves the
//!    round ([`FromParticipant::Unopened`], [`Coordinator::unopened`]: the sealer's update is
//!    left out; nobody can check the word, so nobody is blamed);
//! 5. coordinator → each that sent: who sent ([`ToParticipant::Confirm`]); each that finds
//!    the list a threshold of its own sharers, itself among them (with neighbourhoods: one
//!    part joined by masks, below), signs it
//!    ([`FromParticipant::Confirmed`]);
//! 6. coordinator → each that signed: the list with at least a threshold of those signatures
//!    ([`ToParticipant::Unmask`]); each checks them and answers with the self-mask share of
//!    every one that sent and the mask-key share of every sharer that did not ([`Reveal`]);
//! 7. the coordinator rebuilds the secrets from at least a threshold of answers and unmasks
//!    the sum ([`Coordinator::finish`]).
//!
//! Why the signed list (Bonawitz's consistency check): a coordinator that told different
//! holders different lists could collect one participant's self-mask secret from some and the
//! mask keys of the few sharers that participant masked with from others, and unmask it.
//! With a threshold of signatures from the list's own members on one list, and a majority
//! threshold, no two holders can be told two lists; the signatures cover the session's
//! roster, so those from another session of the same round count for nothing.
//!
//! Neighbourhoods (SecAgg+, Bell et al. 2020; [`Setup::neighbours`]): each participant
//! checks the keys of, shares its secrets with and masks with only its `k` neighbours on a
//! ring ([`secagg::Graph`], in an order set by hashing the peer ids with the job and round),
//! and the threshold is a majority of a neighbourhood (the participant and its neighbours).
//! Its key agreements, sealed shares and mask expansions grow with `k`; the roster and the
//! senders list stay the size of the round, and each participant checks the signatures on
//! the list (one per sender). What changes for safety: the coordinator learns the sum of a
//! set of senders only where their pairwise masks join them, so a participant signs the list
//! only if it is one part joined by masks ([`secagg::Graph::joined`]) and at least a
//! threshold of its neighbourhood (itself included) is on it (its update is then summed with
//! at least a threshold minus one of its neighbours'), and a holder reveals anything only
//! when **every** member of the list signed it: a member's own
//! signature vouches that the neighbours the list names are the ones it masked with (a
//! coordinator cannot name, beside a participant, peers that never shared with it, nor leave
//! out all its real partners). The price: a sender that leaves between sending its update
//! and signing stops the round (nothing is unmasked; it is named as not having signed).
//! Without neighbourhoods, a threshold of signatures suffices, as above. What is given up:
//! a coordinator colluding with a threshold minus one of a participant's neighbours (rather
//! than a majority of the round) can unmask it, and it names the job and round whose hash
//! orders the ring (docs/ARCHITECTURE.md says when to use neighbourhoods).
//!
//! An update goes in weighted by its samples over the setup's scale, with the weight and the
//! weighted loss as two more values ([`pack`]): the sum gives FedAvg's weighted mean and
//! mean loss over whoever sent ([`unpack`]), and no participant's own figures.
//!
//! What the coordinator cannot do within a round: read one participant's update, or read the
//! shares it relays. What it is still trusted for: a correct sum (a participant can add
//! anything to the sum, and no check of a masked value is possible), and not joining the
//! round under many identities of its own (peers it controls hold shares; the threshold is a
//! majority of the round's participants; a setup naming the coordinator itself, or of fewer
//! than three, is refused). Across rounds, sums over two sets of participants of the same
//! model, one set inside the other, give the difference: the driver reveals shares once per
//! coordinator, job and round, which stops a replayed round but not the same model under
//! another label (what differential privacy bounds).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::fl::JobId;
use crate::id::ContentId;
use crate::secagg::{self, Holder, SealPair, SecAggError, Secrets, ShareKind, SHARE_BYTES};
use crate::{wire, Keypair, PeerId, PublicKey};

/// Most participants of a securely aggregated round (shares are GF(256) points).
pub const MAX_PARTICIPANTS: usize = 255;

/// Fewest participants of a securely aggregated round: of two, each would learn the other's
/// update from the sum (and the next model).
pub const MIN_PARTICIPANTS: usize = 3;

/// Fewest neighbours with neighbourhoods: a participant's update is exposed to a coordinator
/// that colludes with a threshold minus one of its neighbours (2 of 4).
pub const MIN_NEIGHBOURS: usize = 4;

/// The most bytes of one step from the coordinator (a roster of 255 participants' signed
/// keys is about 80 KB); a participant's steps are bounded by [`crate::fl::MAX_UPDATE_BYTES`].
pub const MAX_STEP_BYTES: usize = 1 << 20;

/// A generator of a round's secrets.
pub type SecretRng = rand10::rngs::StdRng;

/// The generator of a round's secrets (keys, sharing polynomials), from a seed that must be
/// secret (the OS's).
pub fn secret_rng(seed: [u8; 32]) -> SecretRng {
    use rand10::SeedableRng;
    rand10::rngs::StdRng::from_seed(seed)
}

/// What the coordinator fixes for a securely aggregated round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// The round's participants in index order (peer id bytes).
    pub participants: Vec<ByteBuf>,
    /// Shares that rebuild a participant's secrets: a majority of the participants.
    pub threshold: u32,
    /// What an update's samples are divided by to weigh it (the samples the participants
    /// announced, together): keeps weighted values within the fixed-point range.
    pub scale: u64,
    /// Distributed differential privacy: each participant clips its update and adds its
    /// share of the noise ([`noised`]). Not encoded when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<Noise>,
    /// Neighbourhoods (SecAgg+): each participant masks with and shares its secrets among
    /// this many neighbours on a ring ([`secagg::Graph`]), and the threshold is a majority of
    /// a neighbourhood; 0: everyone with everyone. Not encoded when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub neighbours: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Each participant's part of distributed DP-FedAvg: clip its update to L2 norm `clip`, add
/// Gaussian noise of standard deviation `std` to each value, weigh it 1. With `std` =
/// σ·clip/√m and at least m updates in the sum, the sum carries noise of standard deviation
/// at least σ·clip, what central DP-FedAvg adds at the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Noise {
    /// L2 norm each update is clipped to.
    pub clip: f32,
    /// Standard deviation of the noise each participant adds to each value.
    pub std: f64,
    /// Fewest senders whose noise adds up to what the job promises: a participant signs no
    /// shorter senders list.
    pub senders: u32,
}

/// `delta` clipped and noised as `noise` says, packed with weight 1 and no loss (a private
/// job publishes none): what a participant masks in a differentially private round. `rng`
/// must be secret.
pub fn noised(delta: &[f32], noise: &Noise, rng: &mut impl rand::Rng) -> Vec<f32> {
    use rand_distr::Distribution;
    let mut clipped = delta.to_vec();
    crate::dp::clip(&mut clipped, noise.clip);
    if let Ok(normal) = rand_distr::Normal::new(0.0, noise.std) {
        for v in &mut clipped {
            *v = (f64::from(*v) + normal.sample(rng)) as f32;
        }
    }
    pack(&clipped, 1, 0.0, 1)
}

impl Setup {
    /// A setup for `participants`, with the threshold a `fraction` of them asks (at least a
    /// majority).
    pub fn new(participants: &[PeerId], fraction: f64, scale: u64) -> Self {
        Self {
            participants: participants
                .iter()
                .map(|p| ByteBuf::from(p.to_bytes()))
                .collect(),
            threshold: threshold(participants.len(), fraction) as u32,
            scale: scale.max(1),
            noise: None,
            neighbours: 0,
        }
    }

    /// A setup for `participants` as a job's `secure` settings ask (threshold and
    /// neighbourhoods).
    pub fn for_job(
        participants: &[PeerId],
        secure: &crate::fl::SecureAggregation,
        scale: u64,
    ) -> Self {
        Self::new(participants, secure.threshold, scale)
            .with_neighbours(secure.neighbours, secure.threshold)
    }

    /// The setup with neighbourhoods of `k` (SecAgg+), the threshold a `fraction` of a
    /// neighbourhood (at least a majority of it); unchanged when `k` is 0 or a neighbourhood
    /// would be everyone. `k` is rounded up to an even number.
    pub fn with_neighbours(self, k: u32, fraction: f64) -> Self {
        let k = k.saturating_add(k % 2);
        let k = if k == 0 {
            0
        } else {
            k.max(MIN_NEIGHBOURS as u32)
        };
        let count = self.participants.len();
        if k == 0 || k as usize + 1 >= count {
            return self;
        }
        Self {
            neighbours: k,
            threshold: threshold(k as usize + 1, fraction) as u32,
            ..self
        }
    }

    /// Fewest participants that must take each step of the round for it to go on (have keys
    /// in the roster, share, send, sign): the threshold with everyone as neighbours, a
    /// majority of the round with neighbourhoods.
    pub fn quorum(&self) -> usize {
        if self.neighbours == 0 {
            self.threshold as usize
        } else {
            self.participants.len() / 2 + 1
        }
    }

    /// Who masks with whom among `peers` (this setup's participants, checked) in `job`'s
    /// `round`: everyone, or a ring of neighbourhoods in an order set by hashing each peer id
    /// with the job and round (which neither a participant nor the order of the setup
    /// chooses).
    fn graph(&self, peers: &[PeerId], job: JobId, round: u32) -> Result<secagg::Graph, String> {
        if self.neighbours == 0 {
            return Ok(secagg::Graph::complete(peers.len()));
        }
        let order = Self::ring_order(peers, job, round);
        secagg::Graph::ring(&order, self.neighbours as usize).map_err(|e| e.to_string())
    }

    /// The participants' indices in ring order for `job`'s `round`.
    fn ring_order(peers: &[PeerId], job: JobId, round: u32) -> Vec<usize> {
        let mut order: Vec<(blake3::Hash, usize)> = peers
            .iter()
            .enumerate()
            .map(|(u, peer)| {
                let mut h = blake3::Hasher::new();
                h.update(b"mycel/secagg/ring/v1\0");
                wire::hash_encoded(&(job, round, ByteBuf::from(peer.to_bytes())), &mut h);
                (h.finalize(), u)
            })
            .collect();
        order.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        order.into_iter().map(|(_, u)| u).collect()
    }

    /// The setup with distributed differential privacy.
    pub fn with_noise(self, noise: Noise) -> Self {
        Self {
            noise: Some(noise),
            ..self
        }
    }

    /// The participants, once every field is checked.
    pub fn check(&self) -> Result<Vec<PeerId>, String> {
        let count = self.participants.len();
        if !(MIN_PARTICIPANTS..=MAX_PARTICIPANTS).contains(&count) {
            return Err(format!(
                "a securely aggregated round needs 3 to {MAX_PARTICIPANTS} participants, not {count}"
            ));
        }
        let holders = if self.neighbours == 0 {
            count
        } else {
            let k = self.neighbours as usize;
            if k < MIN_NEIGHBOURS || !k.is_multiple_of(2) || k + 1 >= count {
                return Err(format!(
                    "{k} neighbours in a round of {count}: needs an even number from \
                     {MIN_NEIGHBOURS} to {} (and a round of at least {})",
                    count.saturating_sub(2),
                    MIN_NEIGHBOURS + 2
                ));
            }
            k + 1
        };
        secagg::check_threshold(self.threshold as usize, holders).map_err(|e| e.to_string())?;
        if self.scale == 0 {
            return Err("the weight scale must be at least 1".into());
        }
        if let Some(noise) = &self.noise {
            let clip = f64::from(noise.clip);
            // Noised values must stay far inside the fixed-point range.
            let positive = |x: f64| x.is_finite() && x > 0.0;
            if !(positive(clip) && positive(noise.std)) {
                return Err("the noise's clip and standard deviation must be above 0".into());
            }
            // Noised values must not be clamped by the fixed point (six standard deviations).
            if clip + 6.0 * noise.std > secagg::range(count) {
                return Err(format!(
                    "the noise (clip {clip}, standard deviation {}) does not fit the fixed-point \
                     range of {count} participants, ±{:.0}",
                    noise.std,
                    secagg::range(count)
                ));
            }
            if noise.senders as usize > count {
                return Err("the noise needs more senders than the round has".into());
            }
        }
        let peers = self
            .participants
            .iter()
            .map(|b| {
                PeerId::from_bytes(b).map_err(|_| "a participant id does not decode".to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        if peers.iter().collect::<BTreeSet<_>>().len() != count {
            return Err("a participant is named twice".into());
        }
        Ok(peers)
    }

    /// What every key, share and mask of the round is bound to.
    fn context(&self, job: JobId, round: u32) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"mycel/secagg/round/v1\0");
        wire::hash_encoded(&(job, round, self), &mut h);
        *h.finalize().as_bytes()
    }
}

/// The threshold for `count` participants at `fraction`: at least a majority, at most all.
pub fn threshold(count: usize, fraction: f64) -> usize {
    let asked = (count as f64 * fraction).ceil() as usize;
    asked.max(count / 2 + 1).min(count)
}

/// Why a round cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoundError {
    /// A message that breaks the protocol: its sender pays.
    #[error("{0}")]
    Bad(String),
    /// Too few participants got through a step.
    #[error("{0}")]
    TooFew(String),
    /// The arithmetic failed (a secret that cannot be rebuilt, a weak key).
    #[error(transparent)]
    SecAgg(#[from] SecAggError),
}

/// Whether `count` participants that `did` something are at least `threshold`.
fn at_least(count: usize, threshold: usize, did: &str) -> Result<(), RoundError> {
    if count < threshold {
        return Err(RoundError::TooFew(format!(
            "{count} participants {did}, the threshold is {threshold}"
        )));
    }
    Ok(())
}

fn bad<T>(why: impl Into<String>) -> Result<T, RoundError> {
    Err(RoundError::Bad(why.into()))
}

/// A participant's keys for one round, signed by its node key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keys {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// The participant's index in the setup.
    pub index: u32,
    /// Its public mask key.
    pub mask: ByteBuf,
    /// Its public sealing key.
    pub seal: ByteBuf,
    /// Its commitment to its self-mask secret.
    pub commitment: ByteBuf,
    /// Its node's public key (protobuf encoding).
    pub public_key: ByteBuf,
    /// Ed25519 over the keys, bound to the round's context (job, round and setup).
    pub signature: ByteBuf,
}

impl Keys {
    /// What is signed: the keys, bound to the round's context (job, round and setup).
    fn digest(&self, context: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"mycel/secagg/keys/v1\0");
        h.update(context);
        wire::hash_encoded(
            &(
                self.job,
                self.round,
                self.index,
                &self.mask,
                &self.seal,
                &self.commitment,
            ),
            &mut h,
        );
        *h.finalize().as_bytes()
    }

    /// Checks the signature is `peer`'s, for `job`'s `round` (whose context is `context`),
    /// and returns the keys.
    fn verify(
        &self,
        peer: &PeerId,
        job: JobId,
        round: u32,
        context: &[u8; 32],
    ) -> Result<Verified, RoundError> {
        let signer = verify(
            &self.public_key,
            &self.signature,
            peer,
            &self.digest(context),
        )?;
        if self.job != job || self.round != round {
            return bad("keys of another round");
        }
        match (
            key32(&self.mask),
            key32(&self.seal),
            key32(&self.commitment),
        ) {
            (Some(mask), Some(seal), Some(commitment)) => Ok(Verified {
                mask,
                seal,
                commitment,
                signer,
            }),
            _ => bad("a key is not 32 bytes"),
        }
    }
}

/// A participant's keys, checked.
#[derive(Debug, Clone)]
struct Verified {
    mask: [u8; 32],
    seal: [u8; 32],
    commitment: [u8; 32],
    /// Its node's key, which signs the senders list.
    signer: PublicKey,
}

/// What a participant signs to confirm who sent: the list, in this session of the round
/// (its roster of fresh keys), so that a signature from another session of the same round
/// counts for nothing.
fn senders_digest(context: &[u8; 32], roster: &[u8; 32], senders: &[u32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"mycel/secagg/senders/v1\0");
    h.update(context);
    h.update(roster);
    wire::hash_encoded(&senders, &mut h);
    *h.finalize().as_bytes()
}

/// The digest of a roster: every member's keys, in index order.
fn roster_digest<'a>(roster: impl Iterator<Item = &'a Keys>) -> [u8; 32] {
    let mut entries: Vec<&Keys> = roster.collect();
    entries.sort_by_key(|k| k.index);
    let mut h = blake3::Hasher::new();
    h.update(b"mycel/secagg/roster/v1\0");
    for k in entries {
        wire::hash_encoded(&(k.index, &k.mask, &k.seal, &k.commitment), &mut h);
    }
    *h.finalize().as_bytes()
}

/// `senders` as a sorted list without repeats, or why not.
fn senders_list(senders: &[u32]) -> Result<Vec<u32>, RoundError> {
    let set: BTreeSet<u32> = senders.iter().copied().collect();
    if set.len() != senders.len() {
        return bad("a participant named twice among the senders");
    }
    Ok(set.into_iter().collect())
}

fn key32(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

fn sign(keypair: &Keypair, digest: &[u8; 32]) -> (ByteBuf, ByteBuf) {
    (
        ByteBuf::from(keypair.public().encode_protobuf()),
        ByteBuf::from(keypair.sign(digest).expect("ed25519 signing does not fail")),
    )
}

fn verify(
    public_key: &[u8],
    signature: &[u8],
    peer: &PeerId,
    digest: &[u8; 32],
) -> Result<PublicKey, RoundError> {
    let key = PublicKey::try_decode_protobuf(public_key)
        .map_err(|_| RoundError::Bad("a public key does not decode".into()))?;
    if key.to_peer_id() != *peer || !key.verify(digest, signature) {
        return bad("a signature does not verify for its participant");
    }
    Ok(key)
}

/// A pair of shares sealed by one participant for another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sealed {
    /// The sealer's index.
    pub from: u32,
    /// The index of the one it is for.
    pub to: u32,
    /// ChaCha20-Poly1305 ciphertext of a mask-key share and a self-seed share.
    pub ciphertext: ByteBuf,
}

/// A participant's masked update (unsigned: it goes to the coordinator alone, on a stream
/// the transport authenticates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Masked {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// The participant's index.
    pub index: u32,
    /// Samples behind the update.
    pub samples: u64,
    /// Digest of the data it trained on.
    pub data: ContentId,
    /// The masked values, little-endian u32 words.
    pub values: ByteBuf,
}

/// A participant's answer to the unmasking request: shares by owner index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reveal {
    /// Self-seed shares of those that sent their update.
    pub self_seeds: Vec<(u32, ByteBuf)>,
    /// Mask-key shares of sharers that did not.
    pub mask_keys: Vec<(u32, ByteBuf)>,
}

/// What the coordinator sends a participant after the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToParticipant {
    /// Every participant's keys that came in time.
    Roster(Vec<Keys>),
    /// The shares sealed for this participant by the round's sharers.
    Inbox(Vec<Sealed>),
    /// The indices of those that sent their masked update, to sign.
    Confirm(Vec<u32>),
    /// The same indices, with the signatures of at least a threshold of them.
    Unmask {
        /// Those that sent.
        senders: Vec<u32>,
        /// Signatures on the list by its members (index, signature).
        signatures: Vec<(u32, ByteBuf)>,
    },
}

/// What a participant sends the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromParticipant {
    /// Its keys.
    Keys(Keys),
    /// Its shares, sealed for each other roster member.
    Shares(Vec<Sealed>),
    /// Its masked update.
    Masked(Masked),
    /// Its signature on the senders list.
    Confirmed(ByteBuf),
    /// Instead of its masked update: the shares `from` sealed for it do not open. It shows
    /// no secret (its sealing secret would open every share sealed for it: a coordinator
    /// that garbled shares on their way could collect a threshold of holders' shares), sends
    /// no update in the round and takes no further step.
    Unopened {
        /// The sealer.
        from: u32,
    },
    /// Its shares for unmasking.
    Reveal(Reveal),
    /// Why it stops.
    Refused(String),
}

/// `delta` weighted by `samples / scale`, followed by the weight and the weighted loss.
pub fn pack(delta: &[f32], samples: u64, loss: f32, scale: u64) -> Vec<f32> {
    let weight = (samples as f64 / scale.max(1) as f64) as f32;
    delta
        .iter()
        .map(|v| v * weight)
        .chain([weight, loss * weight])
        .collect()
}

/// A sum of [`pack`]ed values back to the weighted mean update and the mean loss.
pub fn unpack(sum: &[f32]) -> Result<(Vec<f32>, f32), RoundError> {
    let [.., weight, loss] = sum else {
        return Err(RoundError::TooFew("an empty sum".into()));
    };
    if !(weight.is_finite() && *weight > 0.0) {
        return Err(RoundError::TooFew(format!(
            "the updates' weights sum to {weight}: nothing to average"
        )));
    }
    let delta = sum[..sum.len() - 2].iter().map(|v| v / weight).collect();
    Ok((delta, loss / weight))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Keyed,
    Shared,
    Masked,
    Confirmed,
    Revealed,
}

/// One participant's side of one round.
pub struct Participant {
    job: JobId,
    round: u32,
    index: usize,
    peers: Vec<PeerId>,
    threshold: usize,
    /// Fewest participants for each step ([`Setup::quorum`]).
    quorum: usize,
    /// Who masks with whom.
    graph: secagg::Graph,
    scale: u64,
    context: [u8; 32],
    secrets: Secrets,
    /// This participant's node key.
    me: PublicKey,
    /// Verified public mask keys by index (of this participant's neighbours, itself
    /// included).
    roster: BTreeMap<usize, [u8; 32]>,
    /// The roster members' node keys (this one's included), which sign the senders list.
    signers: BTreeMap<usize, PublicKey>,
    /// The senders list this participant signed.
    confirmed: Vec<u32>,
    /// Fewest senders the round's noise needs (0 without noise).
    noise_senders: usize,
    /// The digest of the roster it accepted (binds its signature to this session).
    roster_digest: [u8; 32],
    /// The ciphers shared with each other roster member.
    seals: BTreeMap<usize, SealPair>,
    /// Shares of each sharer this one holds (its own included).
    held: BTreeMap<usize, (Vec<u8>, Vec<u8>)>,
    holder: Holder,
    stage: Stage,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("index", &self.index)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl Participant {
    /// Joins `job`'s `round` as `keypair`'s node: fresh secrets from `rng` (which must be
    /// secret), and the keys to send.
    pub fn new(
        keypair: &Keypair,
        job: JobId,
        round: u32,
        setup: &Setup,
        rng: &mut impl rand10::CryptoRng,
    ) -> Result<(Self, Keys), RoundError> {
        let peers = setup.check().map_err(RoundError::Bad)?;
        let graph = setup.graph(&peers, job, round).map_err(RoundError::Bad)?;
        let me = keypair.public().to_peer_id();
        let Some(index) = peers.iter().position(|p| *p == me) else {
            return bad("the setup does not name this node");
        };
        let secrets = Secrets::generate(rng);
        let mut keys = Keys {
            job,
            round,
            index: index as u32,
            mask: ByteBuf::from(secrets.public().to_vec()),
            seal: ByteBuf::from(secrets.seal_public().to_vec()),
            commitment: ByteBuf::from(secrets.commitment().to_vec()),
            public_key: ByteBuf::new(),
            signature: ByteBuf::new(),
        };
        let context = setup.context(job, round);
        (keys.public_key, keys.signature) = sign(keypair, &keys.digest(&context));
        let participant = Self {
            job,
            round,
            index,
            threshold: setup.threshold as usize,
            quorum: setup.quorum(),
            graph,
            scale: setup.scale,
            context,
            peers,
            secrets,
            me: keypair.public(),
            roster: BTreeMap::new(),
            signers: BTreeMap::new(),
            confirmed: Vec::new(),
            noise_senders: setup.noise.map_or(0, |n| n.senders as usize),
            roster_digest: [0; 32],
            seals: BTreeMap::new(),
            held: BTreeMap::new(),
            holder: Holder::default(),
            stage: Stage::Keyed,
        };
        Ok((participant, keys))
    }

    /// The weight scale of the round (for [`pack`]).
    pub fn scale(&self) -> u64 {
        self.scale
    }

    /// Checks the roster and seals this participant's shares for each of its neighbours in
    /// it (every other member, without neighbourhoods). Of the others it checks only that
    /// their node keys are their peer ids' (they sign the senders list).
    pub fn share(
        &mut self,
        roster: &[Keys],
        rng: &mut impl rand10::CryptoRng,
    ) -> Result<Vec<Sealed>, RoundError> {
        if self.stage != Stage::Keyed {
            return bad("a roster out of turn");
        }
        // Checked whole before anything is kept: a bad roster changes nothing.
        let mut checked = BTreeMap::new();
        let mut signers = BTreeMap::new();
        let own = (self.secrets.public(), self.secrets.seal_public());
        for (seen, keys) in roster.iter().enumerate() {
            let index = keys.index as usize;
            let Some(peer) = self.peers.get(index) else {
                return bad("a roster entry for no participant");
            };
            let found = if index == self.index {
                // Its own keys it knows; no signature to check.
                match (key32(&keys.mask), key32(&keys.seal)) {
                    (Some(mask), Some(seal)) if (mask, seal) == own => {
                        signers.insert(index, self.me.clone());
                        Some(own)
                    }
                    _ => return bad("the roster does not hold this participant's keys"),
                }
            } else if self.graph.adjacent(self.index, index) {
                let verified = keys.verify(peer, self.job, self.round, &self.context)?;
                signers.insert(index, verified.signer);
                Some((verified.mask, verified.seal))
            } else {
                // Not a neighbour: its keys are never used here, its node key only to check
                // its signature on the senders list.
                let key = PublicKey::try_decode_protobuf(&keys.public_key)
                    .map_err(|_| RoundError::Bad("a public key does not decode".into()))?;
                if key.to_peer_id() != *peer {
                    return bad("a node key in the roster is not its participant's");
                }
                signers.insert(index, key);
                None
            };
            if signers.len() != seen + 1 {
                return bad("a participant is twice in the roster");
            }
            if let Some(found) = found {
                checked.insert(index, found);
            }
        }
        if !checked.contains_key(&self.index) {
            return bad("the roster does not hold this participant's keys");
        }
        at_least(signers.len(), self.quorum, "in the roster")?;
        at_least(
            checked.len(),
            self.threshold,
            "of this participant's neighbourhood in the roster",
        )?;
        let ids: Vec<usize> = checked.keys().copied().collect();
        let mut shares = self.secrets.shares(&ids, self.threshold, rng)?;
        let mine = shares
            .remove(&self.index)
            .expect("the roster holds this participant");
        let seals = shares
            .keys()
            .map(|&to| {
                let pair =
                    self.secrets
                        .seal_pair(self.index, to, &checked[&to].1, &self.context)?;
                Ok((to, pair))
            })
            .collect::<Result<BTreeMap<_, _>, SecAggError>>()?;
        let sealed = shares
            .iter()
            .map(|(&to, share)| {
                Ok(Sealed {
                    from: self.index as u32,
                    to: to as u32,
                    ciphertext: ByteBuf::from(seals[&to].seal(share)?),
                })
            })
            .collect::<Result<Vec<_>, SecAggError>>()?;
        self.held.insert(self.index, mine);
        self.roster = checked
            .into_iter()
            .map(|(u, (mask, _))| (u, mask))
            .collect();
        self.seals = seals;
        self.signers = signers;
        self.roster_digest = roster_digest(roster.iter());
        self.stage = Stage::Shared;
        Ok(sealed)
    }

    /// Opens the shares sealed for this participant, and masks `values` (from [`pack`]) with
    /// the masks it shares with their senders.
    pub fn mask(
        &mut self,
        inbox: &[Sealed],
        values: &[f32],
        samples: u64,
        data: ContentId,
    ) -> Result<Masked, RoundError> {
        if self.stage != Stage::Shared {
            return bad("an inbox out of turn");
        }
        // Opened whole before anything is kept: a bad inbox changes nothing.
        let mut held = self.held.clone();
        for sealed in inbox {
            let from = sealed.from as usize;
            if sealed.to as usize != self.index || from == self.index {
                return bad("a share sealed for another participant");
            }
            let Some(pair) = self.seals.get(&from) else {
                return bad("a share from outside this participant's neighbours in the roster");
            };
            let share = pair.open(&sealed.ciphertext)?;
            if held.insert(from, share).is_some() {
                return bad("two shares from one participant");
            }
        }
        at_least(held.len(), self.threshold, "shared their secrets")?;
        let publics: BTreeMap<usize, [u8; 32]> =
            held.keys().map(|u| (*u, self.roster[u])).collect();
        let encoded = secagg::encode(values, self.peers.len())?;
        let masked = secagg::mask(self.index, &encoded, &self.secrets, &publics, &self.context)?;
        let out = Masked {
            job: self.job,
            round: self.round,
            index: self.index as u32,
            samples,
            data,
            values: ByteBuf::from(
                masked
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>(),
            ),
        };
        self.held = held;
        self.stage = Stage::Masked;
        Ok(out)
    }

    /// After [`Participant::mask`] failed because the shares `from` sealed for this one do
    /// not open: the participant takes no further step in the round (it reveals nothing:
    /// see [`FromParticipant::Unopened`]).
    pub fn accuse(&mut self, from: usize) -> Result<(), RoundError> {
        if self.stage != Stage::Shared || !self.seals.contains_key(&from) {
            return bad("an accusation out of turn");
        }
        self.stage = Stage::Revealed;
        Ok(())
    }

    /// Signs who sent (`sent`), once, if they are a quorum of the roster, itself among them,
    /// every neighbour named shared with it, they are one part joined by their masks, and a
    /// threshold of its neighbourhood (itself included) is among them: its update is then summed with at least a threshold minus
    /// one of its neighbours', whose pairwise masks with it are never revealed.
    pub fn confirm(&mut self, keypair: &Keypair, sent: &[u32]) -> Result<ByteBuf, RoundError> {
        if self.stage != Stage::Masked {
            return bad("a senders list out of turn");
        }
        let list = senders_list(sent)?;
        let me = self.index;
        let neighbour = |u: usize| u == me || self.graph.adjacent(me, u);
        if list.iter().map(|&u| u as usize).any(|u| {
            !self.signers.contains_key(&u) || (neighbour(u) && !self.held.contains_key(&u))
        }) || !list.contains(&(me as u32))
        {
            return bad("the senders named are not this participant's sharers");
        }
        // A sum of fewer than three would let its coordinator and one more learn an update;
        // with distributed noise, fewer than the noise's senders would carry too little.
        let least = self.quorum.max(MIN_PARTICIPANTS).max(self.noise_senders);
        if list.len() < least {
            return Err(RoundError::TooFew(format!(
                "{} participants sent their update, the round needs {least}",
                list.len(),
            )));
        }
        // One sum, not several: the senders must be joined by their masks.
        let members: BTreeSet<usize> = list.iter().map(|&u| u as usize).collect();
        if !self.graph.joined(&members) {
            return bad("the senders named split into parts not joined by their masks");
        }
        let partners = list
            .iter()
            .filter(|&&u| self.held.contains_key(&(u as usize)))
            .count();
        if partners < self.threshold {
            return Err(RoundError::TooFew(format!(
                "{} of this participant's neighbourhood sent their update, the threshold is {}",
                partners, self.threshold
            )));
        }
        let signature = keypair
            .sign(&senders_digest(&self.context, &self.roster_digest, &list))
            .expect("ed25519 signing does not fail");
        self.confirmed = list;
        self.stage = Stage::Confirmed;
        Ok(ByteBuf::from(signature))
    }

    /// The shares for unmasking, given who sent (`sent`, the list this participant signed)
    /// and at least a threshold of its members' signatures on it (with neighbourhoods, every
    /// member's: each vouches that it was summed with enough of its neighbours): self-seed
    /// shares of the senders, mask-key shares of the other sharers. Answered once.
    pub fn reveal(
        &mut self,
        sent: &[u32],
        signatures: &[(u32, ByteBuf)],
    ) -> Result<Reveal, RoundError> {
        if self.stage != Stage::Confirmed {
            return bad("an unmasking request out of turn");
        }
        if senders_list(sent)? != self.confirmed {
            return bad("an unmasking request for another senders list than the one signed");
        }
        let digest = senders_digest(&self.context, &self.roster_digest, &self.confirmed);
        let needed = if self.graph.is_complete() {
            self.threshold
        } else {
            self.confirmed.len()
        };
        let mut signed = BTreeSet::new();
        for (u, signature) in signatures {
            if signed.len() >= needed {
                break;
            }
            if !self.confirmed.contains(u) || signed.contains(u) {
                return bad("a signature on the senders list from outside it, or twice");
            }
            let Some(signer) = self.signers.get(&(*u as usize)) else {
                return bad("a signature on the senders list from outside the roster");
            };
            if !signer.verify(&digest, signature) {
                return bad("a signature on the senders list does not verify");
            }
            signed.insert(*u);
        }
        if signed.len() < needed {
            return bad(format!(
                "{} signatures on the senders list, {needed} needed",
                signed.len(),
            ));
        }
        let sent: BTreeSet<usize> = self.confirmed.iter().map(|&u| u as usize).collect();
        let mut reveal = Reveal {
            self_seeds: Vec::new(),
            mask_keys: Vec::new(),
        };
        for (&owner, (key, seed)) in &self.held {
            if sent.contains(&owner) {
                self.holder.reveal(owner, ShareKind::SelfSeed)?;
                reveal
                    .self_seeds
                    .push((owner as u32, ByteBuf::from(seed.clone())));
            } else {
                self.holder.reveal(owner, ShareKind::MaskKey)?;
                reveal
                    .mask_keys
                    .push((owner as u32, ByteBuf::from(key.clone())));
            }
        }
        self.stage = Stage::Revealed;
        Ok(reveal)
    }
}

/// What the coordinator learns from a round: the sum's mean and who is behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Summed {
    /// The weighted mean update.
    pub delta: Vec<f32>,
    /// The weighted mean loss.
    pub loss: f32,
    /// Those whose update is in the sum (index, samples, data digest).
    pub contributors: Vec<(usize, u64, ContentId)>,
    /// A participant whose revealed shares did not rebuild a secret (left out to finish).
    pub blamed: Option<usize>,
    /// The updates' weights together (the mean times this is the sum).
    pub weight: f32,
}

/// The coordinator's side of one round (it holds only what participants sent it: public
/// keys, sealed shares, masked updates and revealed shares).
#[derive(Debug, Clone)]
pub struct Coordinator {
    job: JobId,
    round: u32,
    peers: Vec<PeerId>,
    threshold: usize,
    /// Fewest participants for each step ([`Setup::quorum`]).
    quorum: usize,
    /// Who masks with whom.
    graph: secagg::Graph,
    context: [u8; 32],
    values: usize,
    /// Verified keys by index: (mask, seal, commitment), and the message to pass on.
    keys: BTreeMap<usize, ([u8; 32], Keys)>,
    /// The node keys that signed them.
    signers: BTreeMap<usize, PublicKey>,
    /// Signatures on the senders list, by signer.
    confirmations: BTreeMap<usize, ByteBuf>,
    /// The digest of the roster sent, once sent (no keys are taken after it).
    roster_digest: Option<[u8; 32]>,
    commitments: BTreeMap<usize, [u8; 32]>,
    /// Sealed shares by sharer.
    sharers: BTreeMap<usize, Vec<Sealed>>,
    /// Masked updates by sender, with samples and data digest.
    masked: BTreeMap<usize, (Vec<u32>, u64, ContentId)>,
    /// Those whose update is summed, once fixed ([`Coordinator::senders`]).
    list: Option<Vec<usize>>,
    /// Participants that said shares sealed for them do not open.
    accusers: BTreeSet<usize>,
    /// Sealers said to have sealed shares that do not open, with who said so.
    accused: BTreeMap<usize, BTreeSet<usize>>,
    reveals: BTreeMap<usize, Reveal>,
}

impl Coordinator {
    /// A round of `setup` whose updates have `parameters` values (packed: two more).
    pub fn new(job: JobId, round: u32, setup: &Setup, parameters: usize) -> Result<Self, String> {
        let peers = setup.check()?;
        let graph = setup.graph(&peers, job, round)?;
        Ok(Self {
            job,
            round,
            peers,
            threshold: setup.threshold as usize,
            quorum: setup.quorum(),
            graph,
            context: setup.context(job, round),
            values: parameters + 2,
            keys: BTreeMap::new(),
            signers: BTreeMap::new(),
            confirmations: BTreeMap::new(),
            roster_digest: None,
            commitments: BTreeMap::new(),
            sharers: BTreeMap::new(),
            masked: BTreeMap::new(),
            list: None,
            accusers: BTreeSet::new(),
            accused: BTreeMap::new(),
            reveals: BTreeMap::new(),
        })
    }

    /// The participant at `index`.
    pub fn peer(&self, index: usize) -> Option<PeerId> {
        self.peers.get(index).copied()
    }

    /// `from`'s keys.
    pub fn keys(&mut self, from: usize, keys: Keys) -> Result<(), RoundError> {
        let Some(peer) = self.peers.get(from) else {
            return bad("keys from no participant");
        };
        if self.roster_digest.is_some() {
            return bad("keys after the roster was sent");
        }
        if keys.index as usize != from {
            return bad("keys under another participant's index");
        }
        let verified = keys.verify(peer, self.job, self.round, &self.context)?;
        if self.keys.contains_key(&from) {
            return bad("keys sent twice");
        }
        // A key whose agreement is public would make every other participant's step fail.
        if !secagg::usable(&verified.mask) || !secagg::usable(&verified.seal) {
            return bad("a public key of small order");
        }
        self.commitments.insert(from, verified.commitment);
        self.signers.insert(from, verified.signer);
        self.keys.insert(from, (verified.mask, keys));
        Ok(())
    }

    /// The roster to send every participant whose keys came; no keys are taken after it.
    pub fn roster(&mut self) -> Result<Vec<Keys>, RoundError> {
        at_least(self.keys.len(), self.quorum, "sent their keys")?;
        let roster: Vec<Keys> = self.keys.values().map(|(_, k)| k.clone()).collect();
        self.roster_digest = Some(roster_digest(roster.iter()));
        Ok(roster)
    }

    /// `from`'s sealed shares: one for each of its neighbours in the roster.
    pub fn shares(&mut self, from: usize, sealed: Vec<Sealed>) -> Result<(), RoundError> {
        if !self.keys.contains_key(&from) || self.sharers.contains_key(&from) {
            return bad("shares from outside the roster, or sent twice");
        }
        let to: BTreeSet<usize> = sealed.iter().map(|s| s.to as usize).collect();
        let others: BTreeSet<usize> = self
            .keys
            .keys()
            .copied()
            .filter(|&u| self.graph.adjacent(from, u))
            .collect();
        if to != others
            || sealed.len() != others.len()
            || sealed.iter().any(|s| s.from as usize != from)
            || sealed
                .iter()
                .any(|s| s.ciphertext.len() != 2 * SHARE_BYTES + 16)
        {
            return bad("the shares are not one sealed pair for each neighbour in the roster");
        }
        self.sharers.insert(from, sealed);
        Ok(())
    }

    /// Whether enough participants shared to go on.
    pub fn shared(&self) -> Result<(), RoundError> {
        at_least(self.sharers.len(), self.quorum, "shared their secrets")
    }

    /// The sharers (who are sent an inbox).
    pub fn sharers(&self) -> Vec<usize> {
        self.sharers.keys().copied().collect()
    }

    /// The shares sealed for `to` by the sharers.
    pub fn inbox(&self, to: usize) -> Vec<Sealed> {
        self.sharers
            .iter()
            .filter(|(from, _)| **from != to)
            .filter_map(|(_, sealed)| sealed.iter().find(|s| s.to as usize == to).cloned())
            .collect()
    }

    /// `from`'s masked update.
    pub fn masked(&mut self, from: usize, masked: Masked) -> Result<(), RoundError> {
        if !self.sharers.contains_key(&from) || self.masked.contains_key(&from) {
            return bad("a masked update from outside the sharers, or sent twice");
        }
        if self.list.is_some() || self.accusers.contains(&from) {
            return bad("a masked update after the senders list was fixed, or after accusing");
        }
        if masked.job != self.job || masked.round != self.round || masked.index as usize != from {
            return bad("a masked update of another round or participant");
        }
        if masked.values.len() != self.values * 4 {
            return bad(format!(
                "a masked update of {} bytes, not {}",
                masked.values.len(),
                self.values * 4
            ));
        }
        let values = masked
            .values
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        self.masked
            .insert(from, (values, masked.samples, masked.data));
        Ok(())
    }

    /// `accuser`'s word that the shares `from` sealed for it do not open. Nobody can check
    /// it (the accuser shows no secret): the accuser sends no update, and the sealer's update
    /// is left out of the sum (it counts as dropped). Neither is to be penalised for it: the
    /// sealer may be framed, and the accuser may be the victim of a coordinator (or of a
    /// sealer) garbling its shares.
    pub fn unopened(&mut self, accuser: usize, from: u32) -> Result<(), RoundError> {
        let from = from as usize;
        let sealed_to_it = self
            .sharers
            .get(&from)
            .is_some_and(|sealed| sealed.iter().any(|s| s.to as usize == accuser));
        if !sealed_to_it
            || !self.sharers.contains_key(&accuser)
            || self.masked.contains_key(&accuser)
            || self.accusers.contains(&accuser)
            || self.list.is_some()
        {
            return bad("an accusation about shares that were not sent to it, or out of turn");
        }
        self.accusers.insert(accuser);
        self.accused.entry(from).or_default().insert(accuser);
        Ok(())
    }

    /// The sealers accused in the round, each with who accused it.
    pub fn accusations(&self) -> Vec<(usize, Vec<usize>)> {
        self.accused
            .iter()
            .map(|(u, by)| (*u, by.iter().copied().collect()))
            .collect()
    }

    /// Whether `u` sent its masked update.
    pub fn sent(&self, u: usize) -> bool {
        self.masked.contains_key(&u)
    }

    /// How many participants accused a sealer (they send no update).
    pub fn accusers(&self) -> usize {
        self.accusers.len()
    }

    /// Those whose update is summed, to ask for signatures (fixed at the first call; no
    /// masked update is taken after it): those that sent theirs, less any sealer accused of
    /// shares that do not open. With neighbourhoods, it also checks what the participants
    /// will check before they sign, and what unmasking will need, so that the round stops
    /// before anyone is asked: each sender summed with at least a threshold minus one of its
    /// neighbours (leaving one out would not help: its mask key could not be rebuilt from so
    /// few), the senders one part joined by their masks, and each sharer left out that is a
    /// sender's neighbour with a threshold of holders among the senders.
    pub fn senders(&mut self) -> Result<Vec<u32>, RoundError> {
        // An accused sealer's update is left out: some participant could not take its
        // shares, so its sum with that participant's mask is not to be had.
        let list: Vec<usize> = self
            .masked
            .keys()
            .copied()
            .filter(|u| !self.accused.contains_key(u))
            .collect();
        self.list = Some(list.clone());
        at_least(list.len(), self.quorum, "sent their masked update")?;
        // What the participants will check before they sign (with neighbourhoods; without,
        // all of it follows from the quorum): each summed with a threshold minus one of its
        // neighbours, and all joined by their masks into one sum...
        for &u in &list {
            let partners = list.iter().filter(|&&v| self.graph.adjacent(u, v)).count();
            if partners + 1 < self.threshold {
                return Err(RoundError::TooFew(format!(
                    "participant {u} sent with {partners} of its neighbours, the threshold is {} \
                     with itself",
                    self.threshold
                )));
            }
        }
        if !self.graph.joined(&list.iter().copied().collect()) {
            return Err(RoundError::TooFew(
                "the senders split into parts not joined by their masks".into(),
            ));
        }
        // ...and what unmasking needs: the mask key of each sharer left out whose masks are
        // on a summed update, rebuilt from a threshold of its neighbours among the senders.
        for &d in self.sharers.keys().filter(|d| !list.contains(d)) {
            let holders = list.iter().filter(|&&v| self.graph.adjacent(d, v)).count();
            if holders > 0 && holders < self.threshold {
                return Err(RoundError::TooFew(format!(
                    "participant {d} left with {holders} of its neighbours among the senders, \
                     its mask key needs {}",
                    self.threshold
                )));
            }
        }
        Ok(list.into_iter().map(|u| u as u32).collect())
    }

    /// The senders list once fixed (empty before).
    fn list(&self) -> &[usize] {
        self.list.as_deref().unwrap_or_default()
    }

    /// `from`'s signature on the senders list.
    pub fn confirmed(&mut self, from: usize, signature: ByteBuf) -> Result<(), RoundError> {
        if !self.list().contains(&from) || self.confirmations.contains_key(&from) {
            return bad("a signature on the senders list from one not asked, or twice");
        }
        let senders: Vec<u32> = self.list().iter().map(|&u| u as u32).collect();
        let roster = self.roster_digest.unwrap_or_default();
        let digest = senders_digest(&self.context, &roster, &senders);
        if !self.signers[&from].verify(&digest, &signature) {
            return bad("a signature on the senders list does not verify");
        }
        self.confirmations.insert(from, signature);
        Ok(())
    }

    /// The unmasking request: the senders list and at least a threshold of its members'
    /// signatures on it (with neighbourhoods, all of them), and those that signed are asked.
    pub fn unmasking(&self) -> Result<ToParticipant, RoundError> {
        let needed = if self.graph.is_complete() {
            self.quorum
        } else {
            self.list().len()
        };
        at_least(self.confirmations.len(), needed, "signed the senders list")?;
        Ok(ToParticipant::Unmask {
            senders: self.list().iter().map(|&u| u as u32).collect(),
            signatures: self
                .confirmations
                .iter()
                .map(|(&u, s)| (u as u32, s.clone()))
                .collect(),
        })
    }

    /// `from`'s shares for unmasking: exactly the self-seed shares of the senders and the
    /// mask-key shares of the other sharers, of those whose shares it holds (itself and
    /// its neighbours).
    pub fn reveal(&mut self, from: usize, reveal: Reveal) -> Result<(), RoundError> {
        if !self.confirmations.contains_key(&from) || self.reveals.contains_key(&from) {
            return bad("shares from a participant not asked, or sent twice");
        }
        let seeds: BTreeSet<usize> = reveal.self_seeds.iter().map(|(u, _)| *u as usize).collect();
        let keys: BTreeSet<usize> = reveal.mask_keys.iter().map(|(u, _)| *u as usize).collect();
        let held = |u: &usize| *u == from || self.graph.adjacent(*u, from);
        let senders: BTreeSet<usize> = self.list().iter().copied().filter(held).collect();
        let dropped: BTreeSet<usize> = self
            .sharers
            .keys()
            .copied()
            .filter(|u| held(u) && !senders.contains(u))
            .collect();
        if seeds != senders
            || keys != dropped
            || seeds.len() != reveal.self_seeds.len()
            || keys.len() != reveal.mask_keys.len()
            || reveal
                .self_seeds
                .iter()
                .chain(&reveal.mask_keys)
                .any(|(_, s)| s.len() != SHARE_BYTES)
        {
            return bad("the shares revealed are not one for each sharer, of the kind asked");
        }
        self.reveals.insert(from, reveal);
        Ok(())
    }

    /// Participants that answered the unmasking request.
    pub fn revealed(&self) -> usize {
        self.reveals.len()
    }

    /// The unmasked sum's mean, from the shares revealed. When the shares of all who answered
    /// do not rebuild every secret and more than a threshold answered, the answer of each in
    /// turn is left out: one participant's bad shares do not fail the round (it is named).
    pub fn finish(&self) -> Result<Summed, RoundError> {
        at_least(
            self.reveals.len(),
            self.quorum,
            "answered the unmasking request",
        )?;
        let first = self.unmask(None);
        let (sum, blamed) = match first {
            Ok(sum) => (sum, None),
            Err(e) if self.reveals.len() > self.threshold => {
                let retried = self
                    .reveals
                    .keys()
                    .find_map(|&left| self.unmask(Some(left)).ok().map(|sum| (sum, left)));
                match retried {
                    Some((sum, left)) => (sum, Some(left)),
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let decoded = secagg::decode(&sum);
        let weight = decoded[decoded.len().saturating_sub(2)];
        let (delta, loss) = unpack(&decoded)?;
        Ok(Summed {
            delta,
            loss,
            weight,
            contributors: self
                .list()
                .iter()
                .map(|u| {
                    let (_, samples, data) = &self.masked[u];
                    (*u, *samples, *data)
                })
                .collect(),
            blamed,
        })
    }

    fn unmask(&self, without: Option<usize>) -> Result<Vec<u32>, RoundError> {
        let mut seeds: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
        let mut keys: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
        for (_, reveal) in self.reveals.iter().filter(|(v, _)| Some(**v) != without) {
            for (owner, share) in &reveal.self_seeds {
                seeds
                    .entry(*owner as usize)
                    .or_default()
                    .push(share.to_vec());
            }
            for (owner, share) in &reveal.mask_keys {
                keys.entry(*owner as usize)
                    .or_default()
                    .push(share.to_vec());
            }
        }
        let publics: BTreeMap<usize, [u8; 32]> =
            self.sharers.keys().map(|u| (*u, self.keys[u].0)).collect();
        let masked: BTreeMap<usize, Vec<u32>> = self
            .list()
            .iter()
            .map(|u| (*u, self.masked[u].0.clone()))
            .collect();
        Ok(secagg::unmask(
            &masked,
            &publics,
            &self.commitments,
            &seeds,
            &keys,
            self.threshold,
            &self.graph,
            &self.context,
        )?)
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use rand10::SeedableRng;

    fn rng(seed: u8) -> rand10::rngs::StdRng {
        rand10::rngs::StdRng::from_seed([seed; 32])
    }

    const JOB: JobId = JobId(7);

    struct Round {
        keypairs: Vec<Keypair>,
        setup: Setup,
        updates: Vec<Vec<f32>>,
    }

    fn round(n: usize) -> Round {
        let keypairs: Vec<Keypair> = (0..n).map(|_| Keypair::generate_ed25519()).collect();
        let peers: Vec<PeerId> = keypairs.iter().map(|k| k.public().to_peer_id()).collect();
        let setup = Setup::new(&peers, 0.5, 100 * n as u64);
        let updates = (0..n)
            .map(|u| {
                (0..5)
                    .map(|i| (u as f32 - 1.5) * 0.01 * (i as f32 + 1.0))
                    .collect()
            })
            .collect();
        Round {
            keypairs,
            setup,
            updates,
        }
    }

    /// Runs a round through both state machines; participants in `gone_before_mask` leave
    /// after sharing, those in `gone_before_reveal` after sending their update.
    fn run(
        r: &Round,
        gone_before_mask: &[usize],
        gone_before_reveal: &[usize],
    ) -> Result<Summed, RoundError> {
        let n = r.keypairs.len();
        let mut c = Coordinator::new(JOB, 3, &r.setup, 5).unwrap();
        let mut parts = Vec::new();
        for (u, kp) in r.keypairs.iter().enumerate() {
            let (p, keys) = Participant::new(kp, JOB, 3, &r.setup, &mut rng(u as u8)).unwrap();
            c.keys(u, keys)?;
            parts.push(p);
        }
        let roster = c.roster()?;
        for (u, p) in parts.iter_mut().enumerate() {
            let sealed = p.share(&roster, &mut rng(50 + u as u8))?;
            c.shares(u, sealed)?;
        }
        c.shared()?;
        for u in c.sharers() {
            if gone_before_mask.contains(&u) {
                continue;
            }
            let inbox = c.inbox(u);
            let values = pack(&r.updates[u], 100, 0.5 + u as f32, r.setup.scale);
            let masked = parts[u].mask(&inbox, &values, 100, ContentId([u as u8; 32]))?;
            c.masked(u, masked)?;
        }
        let answering: Vec<usize> = c
            .senders()?
            .iter()
            .map(|&u| u as usize)
            .filter(|u| !gone_before_reveal.contains(u))
            .collect();
        unmask(&mut c, &mut parts, &r.keypairs, &answering)?;
        assert!(c.revealed() <= n);
        c.finish()
    }

    /// The senders list signed by `answering`, and their shares: the unmasking request.
    fn unmask(
        c: &mut Coordinator,
        parts: &mut [Participant],
        keypairs: &[Keypair],
        answering: &[usize],
    ) -> Result<ToParticipant, RoundError> {
        let senders = c.senders()?;
        for &u in answering {
            let signature = parts[u].confirm(&keypairs[u], &senders)?;
            c.confirmed(u, signature)?;
        }
        let request = c.unmasking()?;
        let ToParticipant::Unmask {
            senders,
            signatures,
        } = &request
        else {
            unreachable!()
        };
        for &u in answering {
            let reveal = parts[u].reveal(senders, signatures)?;
            c.reveal(u, reveal)?;
        }
        Ok(request)
    }

    /// A session of round 3 of `r` past its shares (participant u's secrets seeded by `seed`
    /// and u): the coordinator and the participants.
    fn shared(r: &Round, seed: u8) -> (Coordinator, Vec<Participant>) {
        let mut c = Coordinator::new(JOB, 3, &r.setup, 5).unwrap();
        let mut parts = Vec::new();
        for (u, kp) in r.keypairs.iter().enumerate() {
            let secret = &mut rng(seed.wrapping_mul(3).wrapping_add(100 + u as u8));
            let (p, keys) = Participant::new(kp, JOB, 3, &r.setup, secret).unwrap();
            c.keys(u, keys).unwrap();
            parts.push(p);
        }
        let roster = c.roster().unwrap();
        for (u, p) in parts.iter_mut().enumerate() {
            c.shares(u, p.share(&roster, &mut rng(seed + u as u8)).unwrap())
                .unwrap();
        }
        (c, parts)
    }

    /// Participant `u` masks its update with its inbox and sends it.
    fn send_masked(r: &Round, c: &mut Coordinator, parts: &mut [Participant], u: usize) {
        let values = pack(&r.updates[u], 10, 0.1, r.setup.scale);
        let masked = parts[u]
            .mask(&c.inbox(u), &values, 10, ContentId([0; 32]))
            .unwrap();
        c.masked(u, masked).unwrap();
    }

    fn plain_mean(r: &Round, senders: &[usize]) -> Vec<f32> {
        let mut mean = vec![0f32; 5];
        for &u in senders {
            for (m, v) in mean.iter_mut().zip(&r.updates[u]) {
                *m += v / senders.len() as f32;
            }
        }
        mean
    }

    #[test]
    fn a_round_gives_the_mean_of_those_that_sent_whoever_drops() {
        let r = round(7);
        for (before_mask, before_reveal) in [
            (vec![], vec![]),
            (vec![1, 4], vec![]),
            (vec![0], vec![2, 6]),
            (vec![], vec![3, 5, 6]),
        ] {
            let summed = run(&r, &before_mask, &before_reveal).unwrap();
            let senders: Vec<usize> = (0..7).filter(|u| !before_mask.contains(u)).collect();
            let want = plain_mean(&r, &senders);
            for (got, want) in summed.delta.iter().zip(&want) {
                assert!(
                    (got - want).abs() < 1e-3,
                    "{got} vs {want} ({before_mask:?})"
                );
            }
            let loss = senders.iter().map(|&u| 0.5 + u as f32).sum::<f32>() / senders.len() as f32;
            assert!((summed.loss - loss).abs() < 1e-3);
            assert_eq!(summed.contributors.len(), senders.len());
            assert_eq!(summed.blamed, None);
        }
    }

    #[test]
    fn too_many_dropouts_fail_the_round_instead_of_unmasking_anyone() {
        let r = round(5);
        // Threshold 3: two may leave, three may not.
        assert!(run(&r, &[0, 1], &[]).is_ok());
        assert!(matches!(
            run(&r, &[0, 1, 2], &[]),
            Err(RoundError::TooFew(_))
        ));
        assert!(matches!(run(&r, &[0], &[1, 2]), Err(RoundError::TooFew(_))));
    }

    #[test]
    fn a_participant_refuses_to_reveal_both_shares_and_rosters_it_cannot_check() {
        let r = round(4);
        let mut c = Coordinator::new(JOB, 3, &r.setup, 5).unwrap();
        let mut parts = Vec::new();
        let mut roster = Vec::new();
        for (u, kp) in r.keypairs.iter().enumerate() {
            let (p, keys) = Participant::new(kp, JOB, 3, &r.setup, &mut rng(u as u8)).unwrap();
            c.keys(u, keys.clone()).unwrap();
            roster.push(keys);
            parts.push(p);
        }
        // A roster entry signed by someone else, or for another round, is refused.
        let mut forged = roster.clone();
        forged[2].mask = ByteBuf::from(vec![9u8; 32]);
        assert!(matches!(
            parts[0].share(&forged, &mut rng(1)),
            Err(RoundError::Bad(_))
        ));
        let mut parts0 = Participant::new(&r.keypairs[0], JOB, 3, &r.setup, &mut rng(0))
            .unwrap()
            .0;
        let mut wrong_round = roster.clone();
        wrong_round.iter_mut().for_each(|k| k.round = 4);
        assert!(parts0.share(&wrong_round, &mut rng(1)).is_err());
        // A coordinator's keys under another index are refused too.
        let mut c2 = Coordinator::new(JOB, 3, &r.setup, 5).unwrap();
        let mut moved = roster[1].clone();
        moved.index = 2;
        assert!(c2.keys(2, moved).is_err());

        let roster = c.roster().unwrap();
        for (u, p) in parts.iter_mut().enumerate() {
            c.shares(u, p.share(&roster, &mut rng(9)).unwrap()).unwrap();
        }
        for u in 0..4 {
            send_masked(&r, &mut c, &mut parts, u);
        }
        // A list below the threshold is not signed.
        assert!(matches!(
            parts[1].confirm(&r.keypairs[1], &[1, 2]),
            Err(RoundError::TooFew(_))
        ));
        // Everyone signs that all four sent; participant 0 reveals 1's self-seed share once.
        let everyone = [0, 1, 2, 3];
        let signatures: Vec<(u32, ByteBuf)> = (0..4)
            .map(|u| {
                let s = parts[u].confirm(&r.keypairs[u], &everyone).unwrap();
                (u as u32, s)
            })
            .collect();
        parts[0].reveal(&everyone, &signatures).unwrap();
        // A second request, now saying 1 dropped, is refused: with both shares 1 would be
        // unmasked alone.
        assert!(parts[0].reveal(&[0, 2, 3], &signatures).is_err());
        // Another holder told a list other than the one it signed, or shown too few
        // signatures, or a signature passed off as another member's, refuses.
        assert!(parts[1].reveal(&[0, 1, 2], &signatures).is_err());
        assert!(parts[1].reveal(&everyone, &signatures[..2]).is_err());
        let mut passed_off = signatures.clone();
        passed_off[1].1 = passed_off[2].1.clone();
        assert!(parts[1].reveal(&everyone, &passed_off).is_err());
        parts[1].reveal(&everyone, &signatures).unwrap();
        // A participant's holder alone refuses both kinds too.
        let mut holder = Holder::default();
        holder.reveal(1, ShareKind::SelfSeed).unwrap();
        assert!(holder.reveal(1, ShareKind::MaskKey).is_err());
    }

    #[test]
    fn a_signature_from_another_session_of_the_round_counts_for_nothing() {
        let r = round(4);
        let everyone = [0, 1, 2, 3];
        let masked = |seed: u8| {
            let (mut c, mut parts) = shared(&r, seed);
            for u in 0..4 {
                send_masked(&r, &mut c, &mut parts, u);
            }
            (c, parts)
        };
        // A first session of the round stopped after everyone signed the list.
        let (_, mut first) = masked(40);
        let old: Vec<(u32, ByteBuf)> = (0..4)
            .map(|u| {
                (
                    u as u32,
                    first[u].confirm(&r.keypairs[u], &everyone).unwrap(),
                )
            })
            .collect();
        // In a second session those signatures neither pass the coordinator nor a holder.
        let (mut c, mut second) = masked(60);
        assert!(c.confirmed(1, old[1].1.clone()).is_err());
        second[0].confirm(&r.keypairs[0], &everyone).unwrap();
        assert!(second[0].reveal(&everyone, &old).is_err());
        let fresh: Vec<(u32, ByteBuf)> = (1..4)
            .map(|u| {
                (
                    u as u32,
                    second[u].confirm(&r.keypairs[u], &everyone).unwrap(),
                )
            })
            .collect();
        second[0].reveal(&everyone, &fresh).unwrap();
    }

    #[test]
    fn shares_that_do_not_open_are_named_without_a_secret_and_left_out_unblamed() {
        let r = round(5);
        let (mut c, mut parts) = shared(&r, 70);
        // Participant 3 sealed garbage for participant 1 (or its coordinator garbled it).
        let mut inbox = c.inbox(1);
        let garbage = inbox.iter_mut().find(|s| s.from == 3).unwrap();
        garbage.ciphertext[0] ^= 0xff;
        let values = pack(&r.updates[1], 10, 0.1, r.setup.scale);
        let Err(RoundError::SecAgg(SecAggError::Unsealed(3, 1))) =
            parts[1].mask(&inbox, &values, 10, ContentId([0; 32]))
        else {
            panic!("the garbage does not open")
        };
        parts[1].accuse(3).unwrap();
        c.unopened(1, 3).unwrap();
        // After accusing, 1 takes no further step, and its word counts once.
        assert!(parts[1].accuse(3).is_err());
        assert!(parts[1]
            .mask(&c.inbox(1), &values, 10, ContentId([0; 32]))
            .is_err());
        assert!(c.unopened(1, 3).is_err());
        assert!(c.unopened(1, 9).is_err(), "no such sealer");
        // Nobody is blamed (the accuser may be lying); 3's update is left out of the sum.
        for u in [0, 2, 3, 4] {
            send_masked(&r, &mut c, &mut parts, u);
        }
        assert!(c
            .masked(
                1,
                Masked {
                    job: JOB,
                    round: 3,
                    index: 1,
                    samples: 1,
                    data: ContentId([0; 32]),
                    values: ByteBuf::new()
                }
            )
            .is_err());
        let senders = unmask(&mut c, &mut parts, &r.keypairs, &[0, 2, 4]).unwrap();
        let ToParticipant::Unmask { senders, .. } = senders else {
            unreachable!()
        };
        assert_eq!(senders, vec![0, 2, 4]);
        let summed = c.finish().unwrap();
        let want = plain_mean(&r, &[0, 2, 4]);
        for (got, want) in summed.delta.iter().zip(&want) {
            assert!((got - want).abs() < 1e-3);
        }
        assert_eq!((c.accusations(), c.accusers()), (vec![(3, vec![1])], 1));
        assert!(
            !c.sent(1) && c.sent(3),
            "3 sent, and its update was left out"
        );
        // Two accusers name the same sealer: counted, and its update left out all the same.
        let (mut c, _) = shared(&r, 71);
        c.unopened(1, 3).unwrap();
        c.unopened(2, 3).unwrap();
        assert_eq!((c.accusations(), c.accusers()), (vec![(3, vec![1, 2])], 2));
    }

    #[test]
    fn different_senders_lists_for_different_holders_unmask_nobody() {
        // The attack the signed list stops (n = 5, t = 3): participant 0 masks with 1 and 2
        // only (its inbox trimmed); holders 3 and 4 are told "0, 3, 4 sent", holder 1 "0, 1,
        // 3", holder 2 "0, 2, 3": each list gets 0's self-seed shares and the others' the
        // mask keys of 1 and 2, which is all it takes to strip 0's masks.
        let r = round(5);
        let (mut c, mut parts) = shared(&r, 30);
        for u in 0..5 {
            let mut inbox = c.inbox(u);
            if u == 0 {
                inbox.retain(|s| s.from == 1 || s.from == 2);
            }
            let values = pack(&r.updates[u], 10, 0.1, r.setup.scale);
            let m = parts[u]
                .mask(&inbox, &values, 10, ContentId([0; 32]))
                .unwrap();
            c.masked(u, m).unwrap();
        }
        // Participant 0 signs no list naming one it does not share with.
        assert!(parts[0].confirm(&r.keypairs[0], &[0, 3, 4]).is_err());
        // The others each sign the list they are told; no list has a threshold of its own
        // members' signatures, so no holder reveals anything.
        let lists: [(usize, [u32; 3]); 4] = [
            (3, [0, 3, 4]),
            (4, [0, 3, 4]),
            (1, [0, 1, 3]),
            (2, [0, 2, 3]),
        ];
        let signed: Vec<(usize, [u32; 3], ByteBuf)> = lists
            .iter()
            .map(|&(u, list)| (u, list, parts[u].confirm(&r.keypairs[u], &list).unwrap()))
            .collect();
        for &(u, list) in &lists {
            let signatures: Vec<(u32, ByteBuf)> = signed
                .iter()
                .map(|(v, _, s)| (*v as u32, s.clone()))
                .collect();
            assert!(
                parts[u].reveal(&list, &signatures).is_err(),
                "holder {u} revealed for {list:?}"
            );
            let own: Vec<(u32, ByteBuf)> = signed
                .iter()
                .filter(|(_, l, _)| *l == list)
                .map(|(v, _, s)| (*v as u32, s.clone()))
                .collect();
            assert!(parts[u].reveal(&list, &own).is_err());
        }
    }

    #[test]
    fn a_sealed_share_opens_only_for_its_receiver_and_round() {
        let r = round(3);
        let (c, mut parts) = shared(&r, 9);
        let mut inbox = c.inbox(0);
        inbox[0].ciphertext[3] ^= 1;
        let values = pack(&r.updates[0], 10, 0.1, r.setup.scale);
        assert!(matches!(
            parts[0].mask(&inbox, &values, 10, ContentId([0; 32])),
            Err(RoundError::SecAgg(SecAggError::Unsealed(..)))
        ));
        // Participant 1's inbox handed to participant 2: not for it.
        let values = pack(&r.updates[2], 10, 0.1, r.setup.scale);
        assert!(parts[2]
            .mask(&c.inbox(1), &values, 10, ContentId([0; 32]))
            .is_err());
    }

    #[test]
    fn one_participants_bad_shares_are_left_out_and_named() {
        let r = round(5);
        let (mut c, mut parts) = shared(&r, 20);
        for u in 0..4 {
            send_masked(&r, &mut c, &mut parts, u);
        }
        let senders = c.senders().unwrap();
        for u in 0..4 {
            let signature = parts[u].confirm(&r.keypairs[u], &senders).unwrap();
            c.confirmed(u, signature).unwrap();
        }
        let Ok(ToParticipant::Unmask {
            senders,
            signatures,
        }) = c.unmasking()
        else {
            panic!("an unmasking request")
        };
        for u in 0..4 {
            let mut reveal = parts[u].reveal(&senders, &signatures).unwrap();
            if u == 2 {
                reveal.self_seeds[1].1[4] ^= 0x40;
                reveal.mask_keys[0].1[7] ^= 0x01;
            }
            c.reveal(u, reveal).unwrap();
        }
        let summed = c.finish().unwrap();
        assert_eq!(summed.blamed, Some(2));
        let want = plain_mean(&r, &[0, 1, 2, 3]);
        for (got, want) in summed.delta.iter().zip(&want) {
            assert!((got - want).abs() < 1e-3);
        }
    }

    #[test]
    fn malformed_messages_are_refused_without_changing_the_round() {
        let r = round(3);
        let mut c = Coordinator::new(JOB, 3, &r.setup, 5).unwrap();
        let (mut p0, keys0) =
            Participant::new(&r.keypairs[0], JOB, 3, &r.setup, &mut rng(0)).unwrap();
        // Keys signed by participant 0 claimed by participant 1.
        let mut stolen = keys0.clone();
        stolen.index = 1;
        assert!(c.keys(1, stolen).is_err());
        c.keys(0, keys0.clone()).unwrap();
        assert!(c.keys(0, keys0).is_err(), "keys twice");
        for u in 1..3 {
            let (_, k) =
                Participant::new(&r.keypairs[u], JOB, 3, &r.setup, &mut rng(u as u8)).unwrap();
            c.keys(u, k).unwrap();
        }
        let roster = c.roster().unwrap();
        let sealed = p0.share(&roster, &mut rng(1)).unwrap();
        // Missing one recipient, or a share claimed by another sender.
        assert!(c.shares(0, sealed[..1].to_vec()).is_err());
        let mut other = sealed.clone();
        other[0].from = 2;
        assert!(c.shares(0, other).is_err());
        c.shares(0, sealed).unwrap();
        // Out of turn: an inbox before a roster, a reveal before masking.
        let (mut p1, _) = Participant::new(&r.keypairs[1], JOB, 3, &r.setup, &mut rng(1)).unwrap();
        assert!(p1.mask(&[], &[0.0; 7], 1, ContentId([0; 32])).is_err());
        assert!(p1.reveal(&[0, 1], &[]).is_err());
        assert!(p1.confirm(&r.keypairs[1], &[0, 1]).is_err());
        // A setup that names nobody twice, has a majority threshold and at least two.
        let mut twice = r.setup.clone();
        twice.participants[1] = twice.participants[0].clone();
        assert!(twice.check().is_err());
        let mut minority = r.setup.clone();
        minority.threshold = 1;
        assert!(minority.check().is_err());
        assert!(
            Participant::new(&Keypair::generate_ed25519(), JOB, 3, &r.setup, &mut rng(3)).is_err()
        );
    }

    /// A round of `n` with neighbourhoods of `k`.
    fn ring_round(n: usize, k: u32) -> Round {
        let mut r = round(n);
        r.setup = r.setup.with_neighbours(k, 0.5);
        r
    }

    /// The graph of round 3 of `r`.
    fn graph3(r: &Round) -> secagg::Graph {
        let peers = r.setup.check().unwrap();
        r.setup.graph(&peers, JOB, 3).unwrap()
    }

    #[test]
    fn neighbourhoods_are_a_ring_no_setup_order_chooses() {
        let r = ring_round(12, 4);
        assert_eq!((r.setup.neighbours, r.setup.threshold), (4, 3));
        assert_eq!(r.setup.quorum(), 7, "a majority of the round for each step");
        let graph = graph3(&r);
        let peers = r.setup.check().unwrap();
        for u in 0..12 {
            let mine: Vec<usize> = (0..12).filter(|&v| graph.adjacent(u, v)).collect();
            assert_eq!(mine.len(), 4, "{u}'s neighbours: {mine:?}");
            assert!(mine.iter().all(|&v| graph.adjacent(v, u)), "symmetric");
        }
        // The same peers in another order: the same neighbours, by peer id.
        let mut reversed = r.setup.clone();
        reversed.participants.reverse();
        let rpeers = reversed.check().unwrap();
        let rgraph = reversed.graph(&rpeers, JOB, 3).unwrap();
        let at = |p: &PeerId| rpeers.iter().position(|q| q == p).unwrap();
        for u in 0..12 {
            for v in 0..12 {
                assert_eq!(
                    graph.adjacent(u, v),
                    rgraph.adjacent(at(&peers[u]), at(&peers[v]))
                );
            }
        }
        // Another round, other neighbours.
        let other = r.setup.graph(&peers, JOB, 4).unwrap();
        assert_ne!(graph, other);
        // Neighbourhoods as large as the round are everyone; odd counts round up.
        assert_eq!(round(6).setup.with_neighbours(5, 0.5).neighbours, 0);
        assert_eq!(round(9).setup.with_neighbours(3, 0.5).neighbours, 4);
        assert_eq!(
            round(12).setup.with_neighbours(2, 0.5).neighbours,
            4,
            "at least 4"
        );
        let mut two = r.setup.clone();
        two.neighbours = 2;
        assert!(two.check().is_err());
        let mut odd = r.setup.clone();
        odd.neighbours = 3;
        assert!(odd.check().is_err());
        let mut minority = r.setup.clone();
        minority.threshold = 2;
        assert!(
            minority.check().is_err(),
            "2 of 5 is no majority of a neighbourhood"
        );
    }

    #[test]
    fn with_neighbourhoods_a_participant_works_only_with_its_neighbours() {
        let r = ring_round(12, 4);
        let graph = graph3(&r);
        let (mut c, parts) = shared(&r, 9);
        let _ = parts;
        // Each sealed for its four neighbours only; the coordinator takes no more.
        for u in c.sharers() {
            let inbox = c.inbox(u);
            assert_eq!(inbox.len(), 4);
            assert!(inbox.iter().all(|s| graph.adjacent(u, s.from as usize)));
        }
        let mut c2 = Coordinator::new(JOB, 3, &r.setup, 5).unwrap();
        let mut p0 = None;
        for (u, kp) in r.keypairs.iter().enumerate() {
            let (p, keys) = Participant::new(kp, JOB, 3, &r.setup, &mut rng(u as u8)).unwrap();
            c2.keys(u, keys).unwrap();
            if u == 0 {
                p0 = Some(p);
            }
        }
        let roster = c2.roster().unwrap();
        let mut sealed = p0.unwrap().share(&roster, &mut rng(40)).unwrap();
        assert_eq!(sealed.len(), 4);
        let stranger = (1..12).find(|&v| !graph.adjacent(0, v)).unwrap();
        let mut extra = sealed[0].clone();
        extra.to = stranger as u32;
        sealed.push(extra);
        assert!(c2.shares(0, sealed).is_err(), "a share for a non-neighbour");
        let _ = c.senders();
    }

    mod ring_sums {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]
            #[test]
            fn with_neighbourhoods_the_sum_is_the_mean_of_the_senders_list(
                (n, k) in (6usize..14).prop_flat_map(|n| (Just(n), 2u32..=((n as u32 - 2) / 2))),
                drops in proptest::collection::btree_set(0usize..14, 0..4),
            ) {
                let r = ring_round(n, 2 * k);
                let graph = graph3(&r);
                let gone: Vec<usize> = drops.into_iter().filter(|&u| u < n).collect();
                let t = r.setup.threshold as usize;
                match run(&r, &gone, &[]) {
                    Ok(summed) => {
                        let list: Vec<usize> = summed.contributors.iter().map(|c| c.0).collect();
                        // Every contributor sent, and was summed with at least t - 1 neighbours.
                        for &u in &list {
                            prop_assert!(!gone.contains(&u));
                            let partners = list.iter().filter(|&&v| graph.adjacent(u, v)).count();
                            prop_assert!(partners + 1 >= t);
                        }
                        let want = plain_mean(&r, &list);
                        for (got, want) in summed.delta.iter().zip(&want) {
                            prop_assert!((got - want).abs() < 1e-3, "{} vs {}", got, want);
                        }
                    }
                    Err(RoundError::TooFew(_)) | Err(RoundError::SecAgg(SecAggError::Rebuild(..))) => {
                        // Only when too many left: fewer than a quorum sent, or some owner lost
                        // its holders.
                        let alive = n - gone.len();
                        let lost = (0..n).any(|u| {
                            let holders = (0..n)
                                .filter(|&v| (v == u || graph.adjacent(u, v)) && !gone.contains(&v))
                                .count();
                            holders < t
                        });
                        let left: BTreeSet<usize> = (0..n).filter(|u| !gone.contains(u)).collect();
                        prop_assert!(
                            alive < r.setup.quorum() || lost || !graph.joined(&left),
                            "failed with {gone:?}"
                        );
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
                if gone.is_empty() {
                    prop_assert!(run(&r, &[], &[]).is_ok());
                }
            }
        }
    }

    #[test]
    fn with_neighbourhoods_a_sender_without_enough_neighbours_stops_the_round() {
        let r = ring_round(10, 4);
        let graph = graph3(&r);
        // Three of participant 0's four neighbours leave: it would be summed with one, short
        // of the threshold (3 of 5 with itself). Nothing is unmasked.
        let mine: Vec<usize> = (1..10).filter(|&v| graph.adjacent(0, v)).collect();
        let err = run(&r, &mine[..3], &[]).unwrap_err();
        assert!(
            matches!(&err, RoundError::TooFew(why) if why.contains("participant 0")),
            "{err}"
        );
        // Two of them leave: it is summed with two, and the round completes without them.
        let summed = run(&r, &mine[..2], &[]).unwrap();
        let list: Vec<usize> = summed.contributors.iter().map(|c| c.0).collect();
        assert_eq!(list.len(), 8);
        let want = plain_mean(&r, &list);
        for (got, want) in summed.delta.iter().zip(&want) {
            assert!((got - want).abs() < 1e-3);
        }
    }

    #[test]
    fn with_neighbourhoods_senders_in_two_parts_are_refused() {
        // Two gaps of two on a ring of 12 with 4 neighbours each: every sender keeps two
        // neighbours, but the senders are two parts whose sums could be unmasked apart.
        let r = ring_round(12, 4);
        let peers = r.setup.check().unwrap();
        let order = Setup::ring_order(&peers, JOB, 3);
        let gone = [order[0], order[1], order[6], order[7]];
        let err = run(&r, &gone, &[]).unwrap_err();
        assert!(
            matches!(&err, RoundError::TooFew(why) if why.contains("split")),
            "{err}"
        );
        // A participant refuses to sign such a list too.
        let (mut c, mut parts) = shared(&r, 5);
        for u in c.sharers() {
            send_masked(&r, &mut c, &mut parts, u);
        }
        let split: Vec<u32> = (0..12)
            .filter(|u| !gone.contains(u))
            .map(|u| u as u32)
            .collect();
        let me = order[2];
        assert!(matches!(
            parts[me].confirm(&r.keypairs[me], &split),
            Err(RoundError::Bad(why)) if why.contains("split")
        ));
        // One gap: still one sum.
        let summed = run(&r, &gone[..2], &[]).unwrap();
        assert_eq!(summed.contributors.len(), 10);
    }

    #[test]
    fn with_neighbourhoods_no_member_is_unmasked_without_its_own_signature() {
        let r = ring_round(10, 4);
        let graph = graph3(&r);
        let (mut c, mut parts) = shared(&r, 3);
        for u in c.sharers() {
            let inbox = c.inbox(u);
            let values = pack(&r.updates[u], 100, 1.0, r.setup.scale);
            let masked = parts[u]
                .mask(&inbox, &values, 100, ContentId([0; 32]))
                .unwrap();
            c.masked(u, masked).unwrap();
        }
        let senders = c.senders().unwrap();
        assert_eq!(senders.len(), 10);
        // A list that leaves out all of 0's neighbours: 0 will not sign it.
        let mine: Vec<u32> = (1..10)
            .filter(|&v| graph.adjacent(0, v))
            .map(|v| v as u32)
            .collect();
        let isolating: Vec<u32> = senders
            .iter()
            .copied()
            .filter(|u| !mine.contains(u))
            .collect();
        assert!(parts[0].confirm(&r.keypairs[0], &isolating).is_err());
        // One joined part in which 0 keeps one neighbour of four: it will not sign either.
        let short: Vec<u32> = senders
            .iter()
            .copied()
            .filter(|u| !mine[..3].contains(u))
            .collect();
        assert!(graph.joined(&short.iter().map(|&u| u as usize).collect()));
        assert!(matches!(
            parts[0].confirm(&r.keypairs[0], &short),
            Err(RoundError::TooFew(why)) if why.contains("neighbourhood")
        ));
        // Everyone but 5 signs the full list: without 5's signature nobody reveals.
        let mut signatures = Vec::new();
        for u in 0..10 {
            let s = parts[u].confirm(&r.keypairs[u], &senders).unwrap();
            if u != 5 {
                c.confirmed(u, s.clone()).unwrap();
                signatures.push((u as u32, s));
            }
        }
        assert!(matches!(c.unmasking(), Err(RoundError::TooFew(_))));
        for u in 0..10 {
            assert!(parts[u].reveal(&senders, &signatures).is_err());
        }
    }

    #[test]
    fn a_private_update_is_clipped_noised_and_weighs_one() {
        use rand::SeedableRng;
        let noise = Noise {
            clip: 1.0,
            std: 0.5,
            senders: 3,
        };
        let big = vec![3.0f32; 10_000];
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let out = noised(&big, &noise, &mut rng);
        assert_eq!(out.len(), 10_002);
        assert_eq!(&out[10_000..], &[1.0, 0.0], "weight 1, no loss");
        // Clipped to norm 1 (each value 0.01), then noise of standard deviation 0.5.
        let values = &out[..10_000];
        let mean = values.iter().map(|v| f64::from(*v)).sum::<f64>() / 1e4;
        let var = values
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / 1e4;
        assert!((mean - 0.01).abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.02, "std {}", var.sqrt());
        let mut setup = round(3).setup.with_noise(noise);
        setup.check().unwrap();
        setup.noise = Some(Noise {
            clip: f32::NAN,
            std: 1.0,
            senders: 3,
        });
        assert!(setup.check().is_err());
        // Noise the fixed point would clamp, or more senders than the round has: refused.
        setup.noise = Some(Noise {
            clip: 1.0,
            std: 5000.0,
            senders: 3,
        });
        assert!(setup.check().is_err());
        setup.noise = Some(Noise {
            clip: 1.0,
            std: 0.5,
            senders: 4,
        });
        assert!(setup.check().is_err());
    }

    #[test]
    fn thresholds_are_at_least_a_majority() {
        assert_eq!(threshold(10, 0.5), 6);
        assert_eq!(threshold(10, 0.7), 7);
        assert_eq!(threshold(3, 0.0), 2);
        assert_eq!(threshold(4, 1.0), 4);
    }
}
