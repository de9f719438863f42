//! Signed statements that nodes gossip about themselves and about others.
//!
//! A [`SignedStatement`] carries a CBOR-encoded [`Statement`], the signer's public key and an
//! ed25519 signature over a domain-separated copy of the body. Every statement names its issuer,
//! a sequence number and an expiry so that forgeries, replays and stale state are refused
//! ([`SignedStatement::verify`] and the sequence checks in [`crate::membership`]).

use serde::{Deserialize, Serialize};

use crate::id::ContentId;
use crate::reach::Reachability;
use crate::wire::{self, Rejection};
use crate::{Keypair, PeerId, PublicKey, UnixMillis};

/// Largest encoded statement accepted from a peer.
pub const MAX_STATEMENT_BYTES: usize = 16 * 1024;
/// Longest lifetime (expiry minus issue time) a statement may claim.
pub const MAX_LIFETIME_MS: u64 = 60 * 60 * 1000;
/// Most listen addresses in one announcement.
pub const MAX_ANNOUNCED_ADDRS: usize = 8;
/// Longest announced address.
pub const MAX_ADDR_LEN: usize = 256;
/// Most models in one announcement.
pub const MAX_ANNOUNCED_MODELS: usize = 32;
/// Longest model name or engine name in an announcement.
pub const MAX_MODEL_NAME_LEN: usize = 128;
/// How far in the future an issue time may lie before it is refused (clock skew allowance).
pub const MAX_CLOCK_SKEW_MS: u64 = 60 * 1000;

const SIGNING_DOMAIN: &[u8] = b"mycel/statement/v1\0";

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Text in, a vector out.
    Embedding,
    /// Text in, text out, token by token.
    Generation,
}

/// A model a node serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelOffer {
    /// Content id of the model's files.
    pub id: ContentId,
    /// Human name (a file or directory name); several ids may share one.
    pub name: String,
    /// What it does.
    pub kind: ModelKind,
    /// How it is run: replicas that must agree token for token need the same engine.
    pub engine: String,
}

/// What a node offers: models, hardware, current load and power state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The models this node serves.
    pub models: Vec<ModelOffer>,
    /// Static hardware description.
    pub hardware: Hardware,
    /// Current load.
    pub load: Load,
    /// Power state, where the platform exposes one.
    pub power: Option<PowerState>,
    /// Datasets held for federated training (tag and size only; the data stays).
    #[serde(default)]
    pub datasets: Vec<DatasetOffer>,
    /// Whether the node is on a metered network.
    #[serde(default)]
    pub metered: bool,
    /// Where the node's operator says it is (a data centre, a building, a region), for
    /// training jobs that gather nearby peers into clusters: peers of one site share clusters
    /// (see `fl::clusters`). Stated, not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// A dataset a node holds for federated training.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DatasetOffer {
    /// The tag jobs name.
    pub tag: String,
    /// Samples held.
    pub samples: u64,
    /// Digest of the data (never the data itself).
    pub digest: ContentId,
}

impl Capabilities {
    /// Checks what peers check of an announcement's capabilities (so that a node refuses,
    /// at start, a configuration its peers would reject): at most [`MAX_ANNOUNCED_MODELS`]
    /// models and datasets, names, engines, tags and the site of at most [`MAX_MODEL_NAME_LEN`]
    /// bytes, utilisation in [0, 1], a finite temperature.
    pub fn check(&self) -> Result<(), String> {
        let too_long = |what: &str, text: &str| {
            (text.len() > MAX_MODEL_NAME_LEN).then(|| {
                format!(
                    "{what} {text:?} is {} bytes; peers accept at most {MAX_MODEL_NAME_LEN}",
                    text.len()
                )
            })
        };
        if self.models.len() > MAX_ANNOUNCED_MODELS || self.datasets.len() > MAX_ANNOUNCED_MODELS {
            return Err(format!(
                "{} models and {} datasets; peers accept at most {MAX_ANNOUNCED_MODELS} of each",
                self.models.len(),
                self.datasets.len()
            ));
        }
        let names = self.models.iter().flat_map(|m| {
            [
                too_long("the model name", &m.name),
                too_long("the engine name", &m.engine),
            ]
        });
        let tags = self
            .datasets
            .iter()
            .map(|d| too_long("the dataset tag", &d.tag))
            .chain([self.site.as_deref().and_then(|s| {
                (s.is_empty() || s.chars().any(char::is_control))
                    .then(|| format!("the site {s:?} is empty or holds control characters"))
                    .or_else(|| too_long("the site", s))
            })]);
        if let Some(problem) = names.chain(tags).flatten().next() {
            return Err(problem);
        }
        let utilisation = self.load.utilisation;
        let temperature = self.power.as_ref().and_then(|p| p.temperature_c);
        if !(0.0..=1.0).contains(&utilisation) || temperature.is_some_and(|t| !t.is_finite()) {
            return Err(format!(
                "utilisation {utilisation} or temperature {temperature:?} out of range"
            ));
        }
        Ok(())
    }

    /// Whether `other` differs enough from `self` to be announced soon rather than with the
    /// next periodic announcement: models, hardware, queue depth, mains power; utilisation by
    /// a quarter, battery by 5 points, temperature by 5 °C.
    pub fn differs_significantly(&self, other: &Self) -> bool {
        const UTILISATION_STEP: f32 = 0.25;
        self.models != other.models
            || self.datasets != other.datasets
            || self.metered != other.metered
            || self.site != other.site
            || self.hardware != other.hardware
            || power_differs(self.power.as_ref(), other.power.as_ref())
            || self.load.queue_depth != other.load.queue_depth
            || (self.load.utilisation - other.load.utilisation).abs() >= UTILISATION_STEP
    }
}

fn power_differs(a: Option<&PowerState>, b: Option<&PowerState>) -> bool {
    const BATTERY_STEP: u8 = 5;
    const TEMPERATURE_STEP: f32 = 5.0;
    match (a, b) {
        (None, None) => false,
        (Some(a), Some(b)) => {
            a.on_mains != b.on_mains
                || match (a.battery_pct, b.battery_pct) {
                    (Some(x), Some(y)) => x.abs_diff(y) >= BATTERY_STEP,
                    (x, y) => x.is_some() != y.is_some(),
                }
                || match (a.temperature_c, b.temperature_c) {
                    (Some(x), Some(y)) => (x - y).abs() >= TEMPERATURE_STEP,
                    (x, y) => x.is_some() != y.is_some(),
                }
        }
        _ => true,
    }
}

/// Hardware a node runs on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    /// Logical CPU cores available to the node.
    pub cores: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Name of the GPU, if any.
    pub gpu: Option<String>,
}

/// How busy a node is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Tasks waiting in the node's queue.
    pub queue_depth: u32,
    /// Fraction of the node's compute in use, 0.0 to 1.0.
    pub utilisation: f32,
}

/// Power state read from the platform; each field is absent where the platform does not say.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PowerState {
    /// Whether the machine runs on mains power.
    pub on_mains: Option<bool>,
    /// Battery charge in percent.
    pub battery_pct: Option<u8>,
    /// Highest temperature reported by a thermal zone, in degrees Celsius.
    pub temperature_c: Option<f32>,
}

/// A node's signed description of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// Sequence number, strictly increasing per issuer (across restarts too).
    pub seq: u64,
    /// When it was issued.
    pub issued_at: UnixMillis,
    /// When it stops being valid; a peer whose latest announcement expired is failed.
    pub expires_at: UnixMillis,
    /// What the node offers.
    pub capabilities: Capabilities,
    /// Where the node listens (multiaddr strings), so that peers that are not connected to
    /// it can dial it: at most [`MAX_ANNOUNCED_ADDRS`], each at most [`MAX_ADDR_LEN`] bytes.
    #[serde(default)]
    pub addrs: Vec<String>,
    /// Whether the node can be dialled from outside (its AutoNAT verdict). A private node's
    /// addresses include relayed ones (`.../p2p/RELAY/p2p-circuit`).
    #[serde(default)]
    pub reachability: Reachability,
    /// Whether the node serves as a relay for nodes that cannot be dialled.
    #[serde(default)]
    pub relay: bool,
    /// The operator that runs the node, when it says so (checked by
    /// [`crate::membership::Membership::on_statement`], which charges the issuer for a word
    /// that fails: peers that do not know the field relay it): replicas of a verified task go
    /// to distinct operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<Operator>,
    /// Whether the node was at its connection cap when it announced: a node at its own cap
    /// refers newcomers to peers that were not (a hint, as fresh as the announcement; left
    /// out of the encoding when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
}

const OPERATOR_DOMAIN: &[u8] = b"mycel/operator/v1\0";

/// Longest encoded operator key or signature accepted.
pub const MAX_OPERATOR_FIELD: usize = 128;

/// An operator's word that it runs a node: the operator's public key and its signature over
/// the node's peer id. One key signs for every node an operator runs, so that peers can tell
/// them apart from other operators' nodes (a forged word fails the announcement; a node with
/// none is an operator of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// Protobuf encoding of the operator's public key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// The operator's signature over `OPERATOR_DOMAIN || the node's peer id`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Operator {
    /// `operator`'s word that it runs `node`.
    pub fn vouch(operator: &Keypair, node: &PeerId) -> Self {
        Self {
            public_key: operator.public().encode_protobuf(),
            signature: operator
                .sign(&Self::signing_input(node))
                .expect("ed25519 signing does not fail"),
        }
    }

    fn signing_input(node: &PeerId) -> Vec<u8> {
        [OPERATOR_DOMAIN, &node.to_bytes()].concat()
    }

    /// The operator's id, from its key alone: for a word already checked (with the
    /// announcement that carried it).
    pub fn id(&self) -> Option<PeerId> {
        PublicKey::try_decode_protobuf(&self.public_key)
            .ok()
            .map(|key| key.to_peer_id())
    }

    /// The operator's id, when its signature for `node` holds.
    pub fn check(&self, node: &PeerId) -> Result<PeerId, Rejection> {
        if self.public_key.len() > MAX_OPERATOR_FIELD || self.signature.len() > MAX_OPERATOR_FIELD {
            return Err(Rejection::Malformed);
        }
        let key = PublicKey::try_decode_protobuf(&self.public_key)
            .map_err(|_| Rejection::BadSignature)?;
        if !key.verify(&Self::signing_input(node), &self.signature) {
            return Err(Rejection::BadSignature);
        }
        Ok(key.to_peer_id())
    }
}

const CONTACT_DOMAIN: &[u8] = b"mycel/contact/v1\0";

/// A node's word that `witness` held a connection to it at `at`: signed when the witness asks
/// over that connection, and carried in the witness's down reports about the node, so that a
/// report counts only from a peer that was connected to its subject (a key that never reached
/// the subject has none to show). It names the block of addresses the witness was connected
/// from, as the subject saw it, so that reports count as independent only from witnesses in
/// different blocks (keys are free; addresses are not).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The peer that was connected.
    #[serde(with = "peer_id_bytes")]
    pub witness: PeerId,
    /// When the subject signed it.
    pub at: UnixMillis,
    /// The block the witness was connected from as the subject saw it (an IPv4 /24 or IPv6
    /// /48 network address, [`Contact::MAX_FROM`] bytes at most), empty where the subject
    /// tells its peers apart by key alone (this machine's, or relayed connections).
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<u8>,
    /// The subject's signature over `CONTACT_DOMAIN || witness || at || from`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contact")
            .field("witness", &self.witness)
            .field("at", &self.at)
            .field("from", &self.from)
            .finish()
    }
}

impl Contact {
    /// Most bytes of [`Contact::from`]: an IPv6 network address.
    pub const MAX_FROM: usize = 16;

    /// The signer's word that `witness` is connected to it at `at`, from no block it names.
    pub fn sign(subject: &Keypair, witness: PeerId, at: UnixMillis) -> Self {
        Self::sign_from(subject, witness, at, Vec::new())
    }

    /// The signer's word that `witness` is connected to it at `at`, from the block `from`.
    pub fn sign_from(subject: &Keypair, witness: PeerId, at: UnixMillis, from: Vec<u8>) -> Self {
        let signature = subject
            .sign(&Self::signing_input(&witness, at, &from))
            .expect("ed25519 signing does not fail");
        Self {
            witness,
            at,
            from,
            signature,
        }
    }

    /// (Without a block, the input of the first version of this word, which named none.)
    fn signing_input(witness: &PeerId, at: UnixMillis, from: &[u8]) -> Vec<u8> {
        [CONTACT_DOMAIN, &witness.to_bytes(), &at.to_be_bytes(), from].concat()
    }

    /// Whether `subject` signed it (its key read from its peer id: an Ed25519 id holds it).
    pub fn signed_by(&self, subject: &PeerId) -> bool {
        let multihash = subject.as_ref();
        if multihash.code() != 0 || self.signature.len() > 128 || self.from.len() > Self::MAX_FROM {
            return false;
        }
        PublicKey::try_decode_protobuf(multihash.digest()).is_ok_and(|key| {
            key.verify(
                &Self::signing_input(&self.witness, self.at, &self.from),
                &self.signature,
            )
        })
    }
}

/// A node's signed observation that another node is unreachable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownReport {
    /// The peer observed down.
    #[serde(with = "peer_id_bytes")]
    pub subject: PeerId,
    /// The subject's latest sequence number the reporter had seen; a newer announcement from
    /// the subject refutes the report.
    pub subject_seq: u64,
    /// When it was issued.
    pub issued_at: UnixMillis,
    /// When it stops being valid.
    pub expires_at: UnixMillis,
    /// The subject's word that the reporter was connected to it (see [`Contact`]); a report
    /// without one counts for nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<Contact>,
}

/// The body of a signed statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Statement {
    /// The issuer describes itself.
    Announce(Announcement),
    /// The issuer reports another peer down.
    Down(DownReport),
}

impl Statement {
    fn validity(&self) -> (UnixMillis, UnixMillis) {
        match self {
            Self::Announce(a) => (a.issued_at, a.expires_at),
            Self::Down(d) => (d.issued_at, d.expires_at),
        }
    }
}

/// A statement with its issuer's public key and signature, as sent on the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStatement {
    /// CBOR encoding of a [`Statement`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Protobuf encoding of the issuer's public key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Signature over `SIGNING_DOMAIN || body`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for SignedStatement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedStatement")
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The longest protobuf key encoding a peer id holds as it is (libp2p's rule; an Ed25519
/// key's is 36 bytes).
const MAX_INLINE_KEY_LEN: usize = 42;

/// A statement whose signature has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The issuer (derived from the verified public key).
    pub issuer: PeerId,
    /// The decoded statement.
    pub statement: Statement,
}

fn signing_input(body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(SIGNING_DOMAIN.len() + body.len());
    input.extend_from_slice(SIGNING_DOMAIN);
    input.extend_from_slice(body);
    input
}

impl SignedStatement {
    /// Signs `statement` with `keypair`.
    pub fn sign(keypair: &Keypair, statement: &Statement) -> Self {
        let body = wire::encode(statement);
        let signature = keypair
            .sign(&signing_input(&body))
            .expect("ed25519 signing does not fail");
        Self {
            body,
            public_key: keypair.public().encode_protobuf(),
            signature,
        }
    }

    /// Encodes for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        wire::encode(self)
    }

    /// Decodes bytes received from a peer, bounded by [`MAX_STATEMENT_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Rejection> {
        wire::decode(bytes, MAX_STATEMENT_BYTES)
    }

    /// The issuer this statement claims, read from its key's bytes without decoding the key
    /// (no curve arithmetic): an Ed25519 key's peer id holds the key's protobuf encoding
    /// itself. `None` for a key too long to be held so. Unchecked: only [`Self::verify`]
    /// proves it, and it accepts only the canonical encoding, so a statement that verifies
    /// claims the issuer it proves.
    pub fn claimed_issuer(&self) -> Option<PeerId> {
        if self.public_key.len() > MAX_INLINE_KEY_LEN {
            return None;
        }
        // The multihash of the identity function: code 0, the length, the bytes (on the
        // stack: this runs for every copy of every statement that arrives).
        let len = self.public_key.len();
        let mut id = [0u8; 2 + MAX_INLINE_KEY_LEN];
        id[1] = len as u8;
        id[2..2 + len].copy_from_slice(&self.public_key);
        PeerId::from_bytes(&id[..2 + len]).ok()
    }

    /// Decodes the claimed issuer and body *without* checking the signature. Cheaper than
    /// [`Self::verify`]; lets a receiver drop statements it already has before paying for a
    /// signature check.
    pub fn peek(&self) -> Result<Verified, Rejection> {
        let issuer = self.claimed_issuer().ok_or(Rejection::BadSignature)?;
        let statement: Statement = wire::decode(&self.body, MAX_STATEMENT_BYTES)?;
        Ok(Verified { issuer, statement })
    }

    /// Checks the signature and the validity window at `now`, and decodes the body.
    pub fn verify(&self, now: UnixMillis) -> Result<Verified, Rejection> {
        if self.body.len() > MAX_STATEMENT_BYTES {
            return Err(Rejection::Oversized);
        }
        let key = PublicKey::try_decode_protobuf(&self.public_key)
            .map_err(|_| Rejection::BadSignature)?;
        // Another encoding of the same key would claim another issuer (see
        // `claimed_issuer`): a statement names its issuer one way only.
        if key.encode_protobuf() != self.public_key {
            return Err(Rejection::BadSignature);
        }
        if !key.verify(&signing_input(&self.body), &self.signature) {
            return Err(Rejection::BadSignature);
        }
        let statement: Statement = wire::decode(&self.body, MAX_STATEMENT_BYTES)?;
        let issuer = key.to_peer_id();
        if let Statement::Announce(a) = &statement {
            if a.addrs.len() > MAX_ANNOUNCED_ADDRS
                || a.addrs.iter().any(|x| x.len() > MAX_ADDR_LEN)
                || a.capabilities.check().is_err()
            {
                return Err(Rejection::Malformed);
            }
        }
        let (issued_at, expires_at) = statement.validity();
        if issued_at > now.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(Rejection::FromFuture);
        }
        if expires_at <= now || expires_at.saturating_sub(issued_at) > MAX_LIFETIME_MS {
            return Err(Rejection::Expired);
        }
        Ok(Verified { issuer, statement })
    }
}

/// Serde adapter writing a [`PeerId`] as its multihash bytes.
pub mod peer_id_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use crate::PeerId;

    /// Serializes a peer id as bytes.
    pub fn serialize<S: Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&peer.to_bytes())
    }

    /// Deserializes a peer id from bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        PeerId::from_bytes(&bytes).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(seq: u64, now: UnixMillis) -> Statement {
        Statement::Announce(Announcement {
            seq,
            issued_at: now,
            expires_at: now + 10_000,
            capabilities: Capabilities {
                hardware: Hardware {
                    cores: 2,
                    memory_bytes: 1 << 30,
                    gpu: None,
                },
                ..Default::default()
            },
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            reachability: Reachability::Private,
            relay: false,
            operator: None,
            full: false,
        })
    }

    #[test]
    fn the_claimed_issuer_is_read_without_decoding_and_only_the_canonical_key_verifies() {
        let key = Keypair::generate_ed25519();
        let signed = SignedStatement::sign(&key, &announce(1, 1_000));
        assert_eq!(signed.claimed_issuer(), Some(key.public().to_peer_id()));
        assert_eq!(signed.peek().unwrap().issuer, key.public().to_peer_id());
        // The same key with its two protobuf fields swapped: it decodes to the same key, and
        // the signature is over the body alone, but it would claim another issuer.
        let canonical = &signed.public_key;
        assert_eq!(canonical[..4], [0x08, 0x01, 0x12, 0x20]);
        let mut swapped = canonical[2..].to_vec();
        swapped.extend_from_slice(&canonical[..2]);
        assert_eq!(
            PublicKey::try_decode_protobuf(&swapped).unwrap(),
            key.public()
        );
        let other = SignedStatement {
            public_key: swapped,
            ..signed.clone()
        };
        assert_ne!(other.claimed_issuer(), signed.claimed_issuer());
        assert_eq!(other.verify(1_500), Err(Rejection::BadSignature));
        // A key too long to be held in a peer id claims no issuer.
        let long = SignedStatement {
            public_key: vec![0; 43],
            ..signed
        };
        assert_eq!(long.claimed_issuer(), None);
        assert_eq!(long.peek(), Err(Rejection::BadSignature));
    }

    #[test]
    fn signed_statement_round_trips_and_verifies() {
        let key = Keypair::generate_ed25519();
        let signed = SignedStatement::sign(&key, &announce(1, 1_000));
        let decoded = SignedStatement::from_bytes(&signed.to_bytes()).unwrap();
        let verified = decoded.verify(1_500).unwrap();
        assert_eq!(verified.issuer, key.public().to_peer_id());
        assert_eq!(verified.statement, announce(1, 1_000));
    }

    #[test]
    fn tampered_body_or_foreign_key_is_a_bad_signature() {
        let key = Keypair::generate_ed25519();
        let mut signed = SignedStatement::sign(&key, &announce(1, 1_000));
        let last = signed.body.len() - 1;
        signed.body[last] ^= 1;
        assert_eq!(signed.verify(1_500), Err(Rejection::BadSignature));

        // Somebody else's key attached to a statement: the signature no longer matches.
        let mut stolen = SignedStatement::sign(&key, &announce(2, 1_000));
        stolen.public_key = Keypair::generate_ed25519().public().encode_protobuf();
        assert_eq!(stolen.verify(1_500), Err(Rejection::BadSignature));

        let mut junk_key = SignedStatement::sign(&key, &announce(3, 1_000));
        junk_key.public_key = vec![1, 2, 3];
        assert_eq!(junk_key.verify(1_500), Err(Rejection::BadSignature));
    }

    #[test]
    fn expiry_lifetime_and_future_issue_are_enforced() {
        let key = Keypair::generate_ed25519();
        let signed = SignedStatement::sign(&key, &announce(1, 1_000));
        assert_eq!(signed.verify(11_000), Err(Rejection::Expired));

        let long = Statement::Announce(Announcement {
            seq: 1,
            issued_at: 0,
            expires_at: MAX_LIFETIME_MS + 1,
            capabilities: Capabilities::default(),
            addrs: Vec::new(),
            reachability: Default::default(),
            relay: false,
            operator: None,
            full: false,
        });
        assert_eq!(
            SignedStatement::sign(&key, &long).verify(1),
            Err(Rejection::Expired)
        );

        let future = SignedStatement::sign(&key, &announce(1, 10 * MAX_CLOCK_SKEW_MS));
        assert_eq!(future.verify(0), Err(Rejection::FromFuture));
    }

    #[test]
    fn small_utilisation_moves_are_not_significant() {
        let base = Capabilities::default();
        let mut nudged = base.clone();
        nudged.load.utilisation = 0.1;
        assert!(!base.differs_significantly(&nudged));
        nudged.load.utilisation = 0.3;
        assert!(base.differs_significantly(&nudged));
        let mut battery = base.clone();
        battery.power = Some(PowerState {
            battery_pct: Some(40),
            ..Default::default()
        });
        assert!(base.differs_significantly(&battery));
        // Sensor noise is not news; a real change is.
        let warm = |battery_pct, temperature_c| Capabilities {
            power: Some(PowerState {
                on_mains: Some(false),
                battery_pct: Some(battery_pct),
                temperature_c: Some(temperature_c),
            }),
            ..Default::default()
        };
        assert!(!warm(40, 51.0).differs_significantly(&warm(42, 52.5)));
        assert!(warm(40, 51.0).differs_significantly(&warm(35, 51.0)));
        assert!(warm(40, 51.0).differs_significantly(&warm(40, 58.0)));
    }

    /// A signed announcement valid at t = 1 with these capabilities and addresses.
    fn announce_with(
        key: &Keypair,
        capabilities: Capabilities,
        addrs: Vec<String>,
    ) -> SignedStatement {
        announce_by(key, capabilities, addrs, None)
    }

    /// Like `announce_with`, with an operator's word.
    fn announce_by(
        key: &Keypair,
        capabilities: Capabilities,
        addrs: Vec<String>,
        operator: Option<Operator>,
    ) -> SignedStatement {
        SignedStatement::sign(
            key,
            &Statement::Announce(Announcement {
                seq: 1,
                issued_at: 0,
                expires_at: 1_000,
                capabilities,
                addrs,
                reachability: Default::default(),
                relay: false,
                operator,
                full: false,
            }),
        )
    }

    #[test]
    fn an_operators_word_holds_only_for_the_node_it_was_given_to() {
        let (node, other, operator) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        let (node_id, other_id) = (node.public().to_peer_id(), other.public().to_peer_id());
        let word = Operator::vouch(&operator, &node_id);
        // It travels in the announcement unchanged.
        let signed = announce_by(
            &node,
            Capabilities::default(),
            Vec::new(),
            Some(word.clone()),
        );
        let Statement::Announce(a) = signed.verify(1).unwrap().statement else {
            panic!("an announcement")
        };
        assert_eq!(a.operator.as_ref(), Some(&word));
        assert_eq!(word.check(&node_id), Ok(operator.public().to_peer_id()));
        // Another node claiming the word (to pass for one of that operator's nodes, or to
        // keep them out of a replica set) is refused.
        assert_eq!(word.check(&other_id), Err(Rejection::BadSignature));
        let mut forged = word.clone();
        forged.signature[0] ^= 1;
        assert_eq!(forged.check(&node_id), Err(Rejection::BadSignature));
        let mut huge = word;
        huge.signature = vec![0; MAX_OPERATOR_FIELD + 1];
        assert_eq!(huge.check(&node_id), Err(Rejection::Malformed));
    }

    #[test]
    fn impossible_load_figures_are_malformed() {
        let key = Keypair::generate_ed25519();
        for utilisation in [f32::NAN, -0.5, 1.5, f32::INFINITY] {
            let mut capabilities = Capabilities::default();
            capabilities.load.utilisation = utilisation;
            let signed = announce_with(&key, capabilities, vec![]);
            assert_eq!(signed.verify(1), Err(Rejection::Malformed), "{utilisation}");
        }
    }

    #[test]
    fn too_many_or_too_long_addresses_are_malformed() {
        let key = Keypair::generate_ed25519();
        let with_addrs = |addrs| announce_with(&key, Capabilities::default(), addrs);
        assert!(
            with_addrs(vec!["/ip4/1.2.3.4/tcp/1".into(); MAX_ANNOUNCED_ADDRS])
                .verify(1)
                .is_ok()
        );
        let many = with_addrs(vec!["/ip4/1.2.3.4/tcp/1".into(); MAX_ANNOUNCED_ADDRS + 1]);
        assert_eq!(many.verify(1), Err(Rejection::Malformed));
        let long = with_addrs(vec!["x".repeat(MAX_ADDR_LEN + 1)]);
        assert_eq!(long.verify(1), Err(Rejection::Malformed));
    }

    #[test]
    fn too_many_or_too_long_model_offers_are_malformed() {
        let key = Keypair::generate_ed25519();
        let offer = |name: String| ModelOffer {
            id: ContentId::of(name.as_bytes()),
            name,
            kind: ModelKind::Generation,
            engine: "candle-f32".into(),
        };
        let with_models = |models| {
            let capabilities = Capabilities {
                models,
                ..Default::default()
            };
            announce_with(&key, capabilities, vec![])
        };
        let fine = with_models(vec![offer("smollm2".into())])
            .verify(1)
            .unwrap();
        let Statement::Announce(a) = fine.statement else {
            panic!()
        };
        assert_eq!(a.capabilities.models[0].name, "smollm2");
        let many = with_models(vec![offer("m".into()); MAX_ANNOUNCED_MODELS + 1]);
        assert_eq!(many.verify(1), Err(Rejection::Malformed));
        let long = with_models(vec![offer("x".repeat(MAX_MODEL_NAME_LEN + 1))]);
        assert_eq!(long.verify(1), Err(Rejection::Malformed));
    }

    #[test]
    fn garbage_bytes_are_malformed_and_huge_ones_oversized() {
        assert_eq!(
            SignedStatement::from_bytes(&[1, 2, 3]),
            Err(Rejection::Malformed)
        );
        let huge = vec![0u8; MAX_STATEMENT_BYTES + 1];
        assert_eq!(
            SignedStatement::from_bytes(&huge),
            Err(Rejection::Oversized)
        );
    }
}
