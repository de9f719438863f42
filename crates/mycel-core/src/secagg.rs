//! Secure aggregation's arithmetic (Bonawitz et al., "Practical Secure Aggregation for
//! Privacy-Preserving Machine Learning", CCS 2017): the aggregator learns the sum of the
//! participants' updates and nothing about any one of them, even when some drop out.
//!
//! Each participant `u` of a round holds two secrets: a mask key (X25519) whose public half
//! the others know, and a self-mask seed. Its update, in fixed point modulo 2³²
//! ([`encode`]), goes out masked ([`mask`]):
//!
//! `y_u = x_u + PRG(b_u) + Σ_{v > u} PRG(s_uv) − Σ_{v < u} PRG(s_uv)`
//!
//! where `s_uv` is derived from the X25519 agreement of `u`'s and `v`'s mask keys with HKDF
//! (the job and round as salt, both indices in the info) and `PRG` is ChaCha20's keystream
//! under a full 256-bit seed. The pairwise masks cancel in the sum over everyone who sent.
//! Before sending, each participant splits its mask key and its self-mask seed into Shamir
//! shares (threshold `t`, `vsss-rs` over GF(256)) for the others ([`Secrets::shares`]).
//! To unmask ([`unmask`]), the aggregator gathers from at least `t` survivors the self-mask
//! seed shares of every participant that sent, and the mask-key shares of every participant
//! that dropped after sharing, rebuilds those secrets and removes the masks. A holder of
//! shares never reveals both kinds for one participant ([`Holder::reveal`]): with both, the
//! aggregator could unmask that participant alone.
//!
//! The threshold must be a majority (`2t > n`): with `t` at most half, an aggregator could
//! tell one half that a participant dropped and the other half that it sent, and get both of
//! its secrets. A [`Holder`] serves one round. Shares travel through the aggregator sealed
//! ([`Secrets::seal_pair`]) with a third key, the sealing key: ChaCha20-Poly1305 under a key
//! derived from the two participants' sealing keys, so the aggregator reads none of them even
//! after it rebuilds a dropped participant's mask key. Everything here is pure: randomness
//! comes in as a caller's RNG; the messages of a round are [`crate::secround`]'s.
//!
//! Neighbourhoods (SecAgg+, Bell et al., "Secure Single-Server Aggregation with
//! (Poly)Logarithmic Overhead", CCS 2020): instead of every pair, each participant masks with
//! and shares its secrets among only its `k` neighbours in a [`Graph`] (a ring in an order no
//! participant picks), so a participant's key agreements, shares and mask expansions grow
//! with `k`, not with the round's size. The threshold is then a majority of a neighbourhood
//! (the participant and its `k` neighbours), and the sum stays one of many updates as long as
//! each sender keeps neighbours among the senders ([`crate::secround`] checks it).

use std::collections::{BTreeMap, BTreeSet};

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::Zeroizing;

/// Fractional bits of the fixed-point encoding.
pub const FRACTION_BITS: u32 = 16;

/// Bytes of one share of a 32-byte secret (its id, then the 32 bytes).
pub const SHARE_BYTES: usize = 33;

/// What goes wrong in secure aggregation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    /// Fewer shares than the threshold, or shares that do not combine.
    #[error("participant {0}'s secret cannot be rebuilt: {1}")]
    Rebuild(usize, String),
    /// A threshold or count out of range.
    #[error("threshold {threshold} of {count}: needs count / 2 < threshold <= count <= 255")]
    Threshold {
        /// The threshold asked.
        threshold: usize,
        /// Participants.
        count: usize,
    },
    /// Masked updates of different lengths.
    #[error("masked updates of {0} and {1} values cannot be summed")]
    Shape(usize, usize),
    /// A participant no public key was given for.
    #[error("no public mask key for participant {0}")]
    Unknown(usize),
    /// A share holder asked for both kinds of share of one participant.
    #[error("participant {0}'s other share was already revealed: both would unmask it alone")]
    BothShares(usize),
    /// A public mask key whose agreement with ours is not secret (all zero, or of low order).
    #[error("participant {0}'s public mask key is not a usable key")]
    WeakKey(usize),
    /// A value that is not a finite number.
    #[error("value {0} is not a finite number")]
    NotFinite(f32),
    /// Fewer participants sent their updates than the threshold.
    #[error("{0} participants sent their updates; the threshold is {1}")]
    TooFew(usize, usize),
    /// A neighbourhood graph that cannot be built.
    #[error("{0}")]
    Graph(String),
    /// A sealed pair of shares that does not open (altered, or not for this pair and round).
    #[error("the shares participant {0} sealed for participant {1} do not open")]
    Unsealed(usize, usize),
}

/// `values` in fixed point modulo 2³² (two's complement, [`FRACTION_BITS`] fractional bits),
/// each clamped to what `count` of them can sum to without wrapping (every participant must
/// encode with the same `count`).
pub fn encode(values: &[f32], count: usize) -> Result<Vec<u32>, SecAggError> {
    let limit = (i32::MAX as f64 / count.max(1) as f64).floor();
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                return Err(SecAggError::NotFinite(v));
            }
            let fixed = (f64::from(v) * f64::from(1u32 << FRACTION_BITS)).round();
            Ok(fixed.clamp(-limit, limit) as i32 as u32)
        })
        .collect()
}

/// The largest value (in absolute terms) [`encode`] keeps for `count` participants: beyond
/// it values are clamped.
pub fn range(count: usize) -> f64 {
    (i32::MAX as f64 / count.max(1) as f64).floor() / f64::from(1u32 << FRACTION_BITS)
}

/// A sum of [`encode`]d values back to floating point.
pub fn decode(sum: &[u32]) -> Vec<f32> {
    sum.iter()
        .map(|&v| (f64::from(v as i32) / f64::from(1u32 << FRACTION_BITS)) as f32)
        .collect()
}

/// `len` words of ChaCha20's keystream under `seed` (a zero nonce: every seed is used for one
/// stream only).
fn expand(seed: &[u8; 32], len: usize) -> Vec<u32> {
    let mut bytes = vec![0u8; len * 4];
    let mut cipher = chacha20::ChaCha20::new(&(*seed).into(), &[0u8; 12].into());
    cipher.apply_keystream(&mut bytes);
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The seed `u` and `v` share: HKDF-SHA256 over their X25519 agreement, salted with the
/// round's `context`, naming both and both their public keys (in index order, so both derive
/// the same). `v`'s key must make the agreement secret.
fn pair_seed(
    mine: &StaticSecret,
    theirs: &PublicKey,
    context: &[u8],
    u: usize,
    v: usize,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shared = agree(mine, theirs, v)?;
    let own = PublicKey::from(mine);
    let (low, high) = if u < v {
        ((u, &own), (v, theirs))
    } else {
        ((v, theirs), (u, &own))
    };
    Ok(derive(context, &shared, b"mycel/secagg/pair/v1", low, high))
}

/// The X25519 agreement of `mine` with `theirs` (participant `other`'s key), refused when a
/// small-order key makes it public.
fn agree(
    mine: &StaticSecret,
    theirs: &PublicKey,
    other: usize,
) -> Result<SharedSecret, SecAggError> {
    let shared = mine.diffie_hellman(theirs);
    if !shared.was_contributory() {
        return Err(SecAggError::WeakKey(other));
    }
    Ok(shared)
}

/// 32 bytes of HKDF-SHA256 from an agreement, salted with the round's `context`, for `label`
/// naming two participants and their public keys in the order given.
fn derive(
    context: &[u8],
    shared: &SharedSecret,
    label: &[u8],
    first: (usize, &PublicKey),
    second: (usize, &PublicKey),
) -> Zeroizing<[u8; 32]> {
    let info = [
        label,
        &(first.0 as u64).to_le_bytes(),
        first.1.as_bytes(),
        &(second.0 as u64).to_le_bytes(),
        second.1.as_bytes(),
    ]
    .concat();
    hkdf32(context, shared.as_bytes(), &info)
}

/// The round's self-mask seed, from a participant's self-mask secret: bound to the round, so
/// that a secret revealed to unmask one round unmasks no other.
fn self_mask_seed(secret: &[u8; 32], context: &[u8]) -> Zeroizing<[u8; 32]> {
    hkdf32(context, secret, b"mycel/secagg/self/v1")
}

/// 32 bytes of HKDF-SHA256 from `secret`, salted with the round's `context`, for `info`.
fn hkdf32(context: &[u8], secret: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(context), secret)
        .expand(info, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// Adds (`add` true) or subtracts `mask` from `into`, modulo 2³².
fn apply(into: &mut [u32], mask: &[u32], add: bool) {
    for (x, m) in into.iter_mut().zip(mask) {
        *x = if add {
            x.wrapping_add(*m)
        } else {
            x.wrapping_sub(*m)
        };
    }
}

/// Who masks with whom in a round: every pair ([`Graph::complete`]) or each participant
/// with its neighbours on a ring ([`Graph::ring`]). Symmetric: `u` masks with `v` exactly when
/// `v` masks with `u`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    count: usize,
    /// Each participant's neighbours; none: everyone is everyone's neighbour.
    neighbours: Option<Vec<BTreeSet<usize>>>,
}

impl Graph {
    /// Every pair of `count` participants.
    pub fn complete(count: usize) -> Self {
        Self {
            count,
            neighbours: None,
        }
    }

    /// Participants on a ring in the order `order` (a permutation of `0..order.len()`), each
    /// the neighbour of the `k / 2` before it and the `k / 2` after it. `k` must be even, at
    /// least 2 and less than the count minus one (more is [`Graph::complete`]).
    pub fn ring(order: &[usize], k: usize) -> Result<Self, SecAggError> {
        let count = order.len();
        let mut seen = vec![false; count];
        for &u in order {
            if u >= count || std::mem::replace(&mut seen[u], true) {
                return Err(SecAggError::Graph(
                    "the ring's order is not a permutation".into(),
                ));
            }
        }
        if k < 2 || !k.is_multiple_of(2) || k + 1 >= count {
            return Err(SecAggError::Graph(format!(
                "{k} neighbours of {count} participants: needs an even number from 2 to {}",
                count.saturating_sub(3)
            )));
        }
        let mut neighbours = vec![BTreeSet::new(); count];
        for (at, &u) in order.iter().enumerate() {
            for step in 1..=k / 2 {
                let v = order[(at + step) % count];
                neighbours[u].insert(v);
                neighbours[v].insert(u);
            }
        }
        Ok(Self {
            count,
            neighbours: Some(neighbours),
        })
    }

    /// Whether `u` and `v` (two participants) mask with each other.
    pub fn adjacent(&self, u: usize, v: usize) -> bool {
        u != v
            && u < self.count
            && v < self.count
            && self.neighbours.as_ref().is_none_or(|n| n[u].contains(&v))
    }

    /// How many hold one participant's shares: itself and its neighbours.
    pub fn holders(&self) -> usize {
        match &self.neighbours {
            None => self.count,
            Some(n) => n.first().map_or(1, |s| s.len() + 1),
        }
    }

    /// Whether `members` are joined by their pairwise masks: one part, each reachable from
    /// any other through neighbours among them. Masks join two participants only when both
    /// are summed, so a sum over members in several parts can be taken part by part.
    pub fn joined(&self, members: &BTreeSet<usize>) -> bool {
        // Everyone with everyone: any set is one part.
        let (Some(neighbours), Some(&first)) = (&self.neighbours, members.first()) else {
            return true;
        };
        let mut reached = BTreeSet::from([first]);
        let mut frontier = vec![first];
        while let Some(u) = frontier.pop() {
            for v in neighbours.get(u).into_iter().flatten().copied() {
                if members.contains(&v) && reached.insert(v) {
                    frontier.push(v);
                }
            }
        }
        reached.len() == members.len()
    }

    /// Whether everyone is everyone's neighbour.
    pub fn is_complete(&self) -> bool {
        self.neighbours.is_none()
    }
}

/// One participant's secrets for one round (never to be used for another: a dropped
/// participant's mask key is rebuilt by the aggregator).
pub struct Secrets {
    mask_key: StaticSecret,
    seal_key: StaticSecret,
    self_seed: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets")
    }
}

/// The shares a participant hands out: for each other participant (by index), a share of its
/// mask key and a share of its self-mask seed (each a `vsss-rs` GF(256) share: an id byte,
/// then 32 bytes). The driver must hand each holder its own pair and keep them apart.
pub type Shares = BTreeMap<usize, (Vec<u8>, Vec<u8>)>;

impl Secrets {
    /// Fresh secrets from `rng`, which must be secret (the OS's).
    pub fn generate(rng: &mut impl rand10::CryptoRng) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        let mut seal = Zeroizing::new([0u8; 32]);
        let mut self_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(key.as_mut());
        rng.fill_bytes(seal.as_mut());
        rng.fill_bytes(self_seed.as_mut());
        Self {
            mask_key: StaticSecret::from(*key),
            seal_key: StaticSecret::from(*seal),
            self_seed,
        }
    }

    /// The public half of the mask key, for the others.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.mask_key).to_bytes()
    }

    /// The public half of the sealing key, for the others.
    pub fn seal_public(&self) -> [u8; 32] {
        PublicKey::from(&self.seal_key).to_bytes()
    }

    /// The ciphers participant `me` (this one) and participant `other`, whose sealing key is
    /// `theirs`, seal shares with in the round `context` names: one agreement of the two
    /// sealing keys, and from it, with HKDF salted with the round and naming the direction
    /// and both keys, one key for each direction (each used for one message: a zero nonce
    /// is safe).
    pub fn seal_pair(
        &self,
        me: usize,
        other: usize,
        theirs: &[u8; 32],
        context: &[u8],
    ) -> Result<SealPair, SecAggError> {
        let (outgoing, incoming) = seal_keys(&self.seal_key, me, other, theirs, context)?;
        Ok(SealPair {
            me,
            other,
            context: context.to_vec(),
            outgoing: ChaCha20Poly1305::new(&(*outgoing).into()),
            incoming: ChaCha20Poly1305::new(&(*incoming).into()),
        })
    }

    /// A commitment to the self-mask secret, advertised with the public key: a self-mask
    /// secret rebuilt from shares must match it (a holder's altered share would otherwise
    /// leave a wrong sum without a word).
    pub fn commitment(&self) -> [u8; 32] {
        commit(&self.self_seed)
    }

    /// Shares of both secrets for `participants` (indices, this one's included), any
    /// `threshold` of which rebuild them (a majority: `2 × threshold > participants`). The
    /// sharing polynomials come from `rng`, which must be secret: it could rebuild the
    /// secrets from one share.
    pub fn shares(
        &self,
        participants: &[usize],
        threshold: usize,
        rng: &mut impl rand10::CryptoRng,
    ) -> Result<Shares, SecAggError> {
        let count = participants.len();
        check_threshold(threshold, count)?;
        let mut split = |secret: &[u8; 32]| {
            vsss_rs::Gf256::split_bytes(threshold, count, secret, &mut *rng)
                .map_err(|_| SecAggError::Threshold { threshold, count })
        };
        let keys = split(&Zeroizing::new(self.mask_key.to_bytes()))?;
        let seeds = split(&self.self_seed)?;
        Ok(participants
            .iter()
            .copied()
            .zip(keys.into_iter().zip(seeds))
            .collect())
    }
}

/// The two ciphers one participant shares with another in a round ([`Secrets::seal_pair`]).
pub struct SealPair {
    me: usize,
    other: usize,
    context: Vec<u8>,
    outgoing: ChaCha20Poly1305,
    incoming: ChaCha20Poly1305,
}

impl std::fmt::Debug for SealPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealPair")
            .field("me", &self.me)
            .field("other", &self.other)
            .finish_non_exhaustive()
    }
}

impl SealPair {
    /// `share` (a mask-key share and a self-seed share, as [`Secrets::shares`] made them)
    /// sealed for the other participant.
    pub fn seal(&self, share: &(Vec<u8>, Vec<u8>)) -> Result<Vec<u8>, SecAggError> {
        if share.0.len() != SHARE_BYTES || share.1.len() != SHARE_BYTES {
            return Err(SecAggError::Unsealed(self.me, self.other));
        }
        let plain = Zeroizing::new([share.0.as_slice(), &share.1].concat());
        self.outgoing
            .encrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: &plain,
                    aad: &self.context,
                },
            )
            .map_err(|_| SecAggError::Unsealed(self.me, self.other))
    }

    /// The shares the other participant sealed for this one.
    pub fn open(&self, sealed: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SecAggError> {
        let plain = Zeroizing::new(
            self.incoming
                .decrypt(
                    &[0u8; 12].into(),
                    Payload {
                        msg: sealed,
                        aad: &self.context,
                    },
                )
                .map_err(|_| SecAggError::Unsealed(self.other, self.me))?,
        );
        if plain.len() != 2 * SHARE_BYTES {
            return Err(SecAggError::Unsealed(self.other, self.me));
        }
        Ok((plain[..SHARE_BYTES].to_vec(), plain[SHARE_BYTES..].to_vec()))
    }
}

/// The key of one direction's sealed shares.
type SealKey = Zeroizing<[u8; 32]>;

/// The keys of what participant `me`, whose sealing key is `mine`, seals for `other` (whose
/// public sealing key is `theirs`) and of what `other` seals for `me`, in the round `context`
/// names: one agreement, and from it, with HKDF salted with the round and naming the direction
/// and both keys, one key for each direction.
fn seal_keys(
    mine: &StaticSecret,
    me: usize,
    other: usize,
    theirs: &[u8; 32],
    context: &[u8],
) -> Result<(SealKey, SealKey), SecAggError> {
    let own = PublicKey::from(mine);
    let theirs = PublicKey::from(*theirs);
    let shared = agree(mine, &theirs, other)?;
    let key = |from, to| derive(context, &shared, b"mycel/secagg/seal/v1", from, to);
    Ok((
        key((me, &own), (other, &theirs)),
        key((other, &theirs), (me, &own)),
    ))
}

/// Whether a public key (mask or sealing) makes secret agreements: not of small order (an
/// agreement with it would be all zero, whoever the other party).
pub fn usable(public: &[u8; 32]) -> bool {
    // Any clamped scalar is a multiple of the cofactor: the agreement is zero exactly for
    // points of small order.
    StaticSecret::from([0x42; 32])
        .diffie_hellman(&PublicKey::from(*public))
        .was_contributory()
}

/// Whether `threshold` of `count` participants is a usable threshold: a majority, at least
/// two, of at most 255 (GF(256) shares).
pub fn check_threshold(threshold: usize, count: usize) -> Result<(), SecAggError> {
    if threshold < 2 || 2 * threshold <= count || threshold > count || count > 255 {
        return Err(SecAggError::Threshold { threshold, count });
    }
    Ok(())
}

/// `update` (from [`encode`]) masked by participant `me`, whose secrets are `secrets`, in a
/// round whose participants' public mask keys are `publics` (by index, `me`'s included) and
/// whose `context` names the job and round.
pub fn mask(
    me: usize,
    update: &[u32],
    secrets: &Secrets,
    publics: &BTreeMap<usize, [u8; 32]>,
    context: &[u8],
) -> Result<Vec<u32>, SecAggError> {
    let mut masked = update.to_vec();
    let own = self_mask_seed(&secrets.self_seed, context);
    apply(&mut masked, &expand(&own, update.len()), true);
    for (&v, public) in publics.iter().filter(|(&v, _)| v != me) {
        let seed = pair_seed(&secrets.mask_key, &PublicKey::from(*public), context, me, v)?;
        apply(&mut masked, &expand(&seed, update.len()), me < v);
    }
    Ok(masked)
}

/// The sum of the updates of the participants that sent (`masked`, by index): their self-masks
/// are removed with their rebuilt secrets (`self_seed_shares`, at least `threshold` shares
/// for each of them, each checked against its commitment), and the pairwise masks they
/// share with participants that dropped after sharing (in `publics`, which holds exactly the
/// participants that shared, but not in `masked`) with those participants' rebuilt mask keys
/// (`mask_key_shares`). A rebuilt mask key must match its public key. `graph` says who masked
/// with whom.
#[allow(clippy::too_many_arguments)]
pub fn unmask(
    masked: &BTreeMap<usize, Vec<u32>>,
    publics: &BTreeMap<usize, [u8; 32]>,
    commitments: &BTreeMap<usize, [u8; 32]>,
    self_seed_shares: &BTreeMap<usize, Vec<Vec<u8>>>,
    mask_key_shares: &BTreeMap<usize, Vec<Vec<u8>>>,
    threshold: usize,
    graph: &Graph,
    context: &[u8],
) -> Result<Vec<u32>, SecAggError> {
    check_threshold(threshold, publics.len().min(graph.holders()))?;
    if masked.len() < threshold {
        return Err(SecAggError::TooFew(masked.len(), threshold));
    }
    if let Some(&u) = masked.keys().find(|u| !publics.contains_key(u)) {
        return Err(SecAggError::Unknown(u));
    }
    let len = masked.values().next().map_or(0, Vec::len);
    let mut sum = vec![0u32; len];
    for (&u, y) in masked {
        if y.len() != len {
            return Err(SecAggError::Shape(y.len(), len));
        }
        apply(&mut sum, y, true);
        let secret = rebuild(u, self_seed_shares.get(&u), threshold)?;
        if commitments.get(&u) != Some(&commit(&secret)) {
            return Err(SecAggError::Rebuild(
                u,
                "the rebuilt self-mask secret does not match its commitment".into(),
            ));
        }
        apply(
            &mut sum,
            &expand(&self_mask_seed(&secret, context), len),
            false,
        );
    }
    for (&dropped, public) in publics.iter().filter(|(u, _)| !masked.contains_key(u)) {
        if !masked.keys().any(|&v| graph.adjacent(dropped, v)) {
            // No sender masked with it: nothing of its to take out.
            continue;
        }
        let key = StaticSecret::from(*rebuild(dropped, mask_key_shares.get(&dropped), threshold)?);
        if PublicKey::from(&key).as_bytes() != public {
            return Err(SecAggError::Rebuild(
                dropped,
                "the rebuilt mask key does not match its public key".into(),
            ));
        }
        for &v in masked.keys().filter(|&&v| graph.adjacent(dropped, v)) {
            let theirs = PublicKey::from(publics[&v]);
            let seed = pair_seed(&key, &theirs, context, dropped, v)?;
            // v added the mask when v < dropped, subtracted it otherwise: undo that.
            apply(&mut sum, &expand(&seed, len), v > dropped);
        }
    }
    Ok(sum)
}

fn commit(secret: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    Sha256::new()
        .chain_update(b"mycel/secagg/commit/v1")
        .chain_update(secret)
        .finalize()
        .into()
}

/// A 32-byte secret of participant `u` from at least `threshold` of its shares (fewer would
/// combine into wrong bytes without an error).
fn rebuild(
    u: usize,
    shares: Option<&Vec<Vec<u8>>>,
    threshold: usize,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shares = shares.ok_or_else(|| SecAggError::Rebuild(u, "no shares".into()))?;
    if shares.len() < threshold {
        return Err(SecAggError::Rebuild(
            u,
            format!("{} shares, the threshold is {threshold}", shares.len()),
        ));
    }
    let bytes = Zeroizing::new(
        vsss_rs::Gf256::combine_bytes(shares)
            .map_err(|e| SecAggError::Rebuild(u, e.to_string()))?,
    );
    let secret: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| SecAggError::Rebuild(u, "not 32 bytes".into()))?;
    Ok(Zeroizing::new(secret))
}

/// Which share of a participant a holder is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareKind {
    /// Of its self-mask seed (it sent its update).
    SelfSeed,
    /// Of its mask key (it dropped).
    MaskKey,
}

/// A participant's rule for the shares it holds in one round: one kind per participant, never
/// both.
#[derive(Debug, Default)]
pub struct Holder {
    revealed: BTreeMap<usize, ShareKind>,
}

impl Holder {
    /// Whether the share of `kind` of participant `owner` may be revealed; once one kind is,
    /// the other never is.
    pub fn reveal(&mut self, owner: usize, kind: ShareKind) -> Result<(), SecAggError> {
        match self.revealed.get(&owner) {
            Some(k) if *k != kind => Err(SecAggError::BothShares(owner)),
            _ => {
                self.revealed.insert(owner, kind);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand10::SeedableRng;
    use std::collections::BTreeSet;

    fn rng(seed: u8) -> rand10::rngs::StdRng {
        rand10::rngs::StdRng::from_seed([seed; 32])
    }

    const CONTEXT: &[u8] = b"job 1 round 3";

    /// A round of `n` participants with threshold `t`, where those in `dropped` share their
    /// secrets but never send their update, and the first `t` survivors answer with shares:
    /// the unmasked sum, and the survivors' plain sum.
    fn round(
        n: usize,
        t: usize,
        dropped: &BTreeSet<usize>,
        values: &[Vec<f32>],
    ) -> (Vec<u32>, Vec<u32>) {
        let ids: Vec<usize> = (0..n).collect();
        let secrets: Vec<Secrets> = (0..n)
            .map(|u| Secrets::generate(&mut rng(u as u8 + 1)))
            .collect();
        let publics: BTreeMap<usize, [u8; 32]> =
            ids.iter().map(|&u| (u, secrets[u].public())).collect();
        let commitments: BTreeMap<usize, [u8; 32]> =
            ids.iter().map(|&u| (u, secrets[u].commitment())).collect();
        // shares[u][v]: u's shares held by v.
        let shares: Vec<Shares> = secrets
            .iter()
            .enumerate()
            .map(|(u, s)| s.shares(&ids, t, &mut rng(u as u8 + 100)).unwrap())
            .collect();
        let survivors: Vec<usize> = ids
            .iter()
            .copied()
            .filter(|u| !dropped.contains(u))
            .collect();
        let masked: BTreeMap<usize, Vec<u32>> = survivors
            .iter()
            .map(|&u| {
                let x = encode(&values[u], n).unwrap();
                (u, mask(u, &x, &secrets[u], &publics, CONTEXT).unwrap())
            })
            .collect();
        let answering = &survivors[..t];
        let mut holders: BTreeMap<usize, Holder> =
            answering.iter().map(|&v| (v, Holder::default())).collect();
        let mut seed_shares = BTreeMap::new();
        let mut key_shares = BTreeMap::new();
        for &v in answering {
            for (u, held) in shares.iter().enumerate() {
                let (key, seed) = &held[&v];
                let holder = holders.get_mut(&v).unwrap();
                if dropped.contains(&u) {
                    holder.reveal(u, ShareKind::MaskKey).unwrap();
                    key_shares
                        .entry(u)
                        .or_insert_with(Vec::new)
                        .push(key.clone());
                } else {
                    holder.reveal(u, ShareKind::SelfSeed).unwrap();
                    seed_shares
                        .entry(u)
                        .or_insert_with(Vec::new)
                        .push(seed.clone());
                }
            }
        }
        let sum = unmask(
            &masked,
            &publics,
            &commitments,
            &seed_shares,
            &key_shares,
            t,
            &Graph::complete(n),
            CONTEXT,
        )
        .unwrap();
        // One altered share: the rebuilt secret fails its commitment, not the sum silently.
        let mut altered = seed_shares.clone();
        let first = altered.values_mut().next().unwrap();
        first[0][5] ^= 1;
        assert!(matches!(
            unmask(
                &masked,
                &publics,
                &commitments,
                &altered,
                &key_shares,
                t,
                &Graph::complete(n),
                CONTEXT
            ),
            Err(SecAggError::Rebuild(..))
        ));
        let mut plain = vec![0u32; values[0].len()];
        for &u in &survivors {
            apply(&mut plain, &encode(&values[u], n).unwrap(), true);
        }
        (sum, plain)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn the_masked_sum_is_the_plain_sum_whoever_drops(
            (n, t) in (3usize..9).prop_flat_map(|n| (Just(n), (n / 2 + 1)..=n)),
            drop_bits in any::<u16>(),
            values in proptest::collection::vec(-4.0f32..4.0, 16),
        ) {
            // At most n - t dropouts: t survivors must answer.
            let dropped: BTreeSet<usize> =
                (0..n).filter(|u| drop_bits & (1 << u) != 0).take(n - t).collect();
            let per: Vec<Vec<f32>> = (0..n)
                .map(|u| values.iter().map(|v| v * (u as f32 + 1.0) / 3.0).collect())
                .collect();
            let (sum, plain) = round(n, t, &dropped, &per);
            prop_assert_eq!(sum, plain);
        }
    }

    #[test]
    fn the_sum_decodes_to_the_real_sum_within_the_rounding() {
        let values = vec![vec![0.5f32, -1.25, 3.0]; 4];
        let (sum, _) = round(4, 3, &BTreeSet::from([2]), &values);
        let decoded = decode(&sum);
        for (d, want) in decoded.iter().zip([1.5f32, -3.75, 9.0]) {
            assert!((d - want).abs() < 1e-4, "{d} vs {want}");
        }
        assert!(matches!(
            encode(&[1.0, f32::INFINITY], 4),
            Err(SecAggError::NotFinite(_))
        ));
    }

    #[test]
    fn the_pairwise_masks_of_one_update_look_uniform_and_belong_to_the_round() {
        let n = 3;
        let secrets: Vec<Secrets> = (0..n)
            .map(|u| Secrets::generate(&mut rng(u as u8 + 7)))
            .collect();
        let publics: BTreeMap<usize, [u8; 32]> = (0..n).map(|u| (u, secrets[u].public())).collect();
        let update = vec![12345u32; 65536];
        let masked = mask(0, &update, &secrets[0], &publics, CONTEXT).unwrap();
        // What is left once the update and the self mask (revealed at unmasking) are
        // removed: the pairwise masks, which alone hide the update.
        let mut pairwise = masked.clone();
        apply(&mut pairwise, &update, false);
        let own = self_mask_seed(&secrets[0].self_seed, CONTEXT);
        apply(&mut pairwise, &expand(&own, update.len()), false);
        let mut counts = [0f64; 256];
        for v in &pairwise {
            counts[(v >> 24) as usize] += 1.0;
        }
        let expected = pairwise.len() as f64 / 256.0;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        // 255 degrees of freedom: the 99.9th percentile is about 330.
        assert!(chi2 < 330.0, "chi-square {chi2}");
        // Another round, other masks.
        let other = mask(0, &update, &secrets[0], &publics, b"job 1 round 4").unwrap();
        assert_ne!(other, masked);
    }

    #[test]
    fn a_holder_never_reveals_both_shares_of_one_participant() {
        let mut holder = Holder::default();
        holder.reveal(4, ShareKind::SelfSeed).unwrap();
        holder.reveal(4, ShareKind::SelfSeed).unwrap();
        assert_eq!(
            holder.reveal(4, ShareKind::MaskKey),
            Err(SecAggError::BothShares(4))
        );
        holder.reveal(5, ShareKind::MaskKey).unwrap();
        assert_eq!(
            holder.reveal(5, ShareKind::SelfSeed),
            Err(SecAggError::BothShares(5))
        );
    }

    #[test]
    fn thresholds_below_a_majority_and_too_few_shares_are_refused() {
        let secrets = Secrets::generate(&mut rng(9));
        let ids = [0, 1, 2, 3];
        for t in [1, 2, 5] {
            assert!(
                matches!(
                    secrets.shares(&ids, t, &mut rng(1)),
                    Err(SecAggError::Threshold { .. })
                ),
                "{t} of 4"
            );
        }
        let shares = secrets.shares(&ids, 3, &mut rng(1)).unwrap();
        let seeds: Vec<Vec<u8>> = shares.values().map(|(_, s)| s.clone()).collect();
        assert_eq!(
            *rebuild(0, Some(&seeds[..3].to_vec()), 3).unwrap(),
            *secrets.self_seed
        );
        assert!(matches!(
            rebuild(0, Some(&seeds[..2].to_vec()), 3),
            Err(SecAggError::Rebuild(..))
        ));
    }

    #[test]
    fn a_public_key_that_makes_the_agreement_public_is_refused() {
        let secrets = Secrets::generate(&mut rng(3));
        let publics = BTreeMap::from([(0, secrets.public()), (1, [0u8; 32])]);
        assert_eq!(
            mask(0, &[1, 2, 3], &secrets, &publics, CONTEXT),
            Err(SecAggError::WeakKey(1))
        );
    }
}
