//! Checking results against lying peers: the verification mode a caller asks for, the quorum
//! that accepts a replicated task's output, and certificates anyone can check offline.
//!
//! ## The rule, and why no wrong output is accepted
//!
//! A task whose model `n` peers serve (the candidates) runs on several of them; each returns
//! its output with a signed attestation (task, model, engine, input digest, output digest).
//! We assume fewer than a third of the candidates lie: at most `f = ⌈n/3⌉ − 1` of them
//! ([`max_faulty`]). Honest workers run the same deterministic task and return the same
//! output, so a set of answers that holds `f + 1` equal outputs contains at least one honest
//! answer, and that output is the right one, however the liars collude.
//!
//! - The first wave asks `max(r, f + 1)` distinct candidates (`r`: the replicas the caller
//!   asked for, a floor) and accepts only if they all agree: `f + 1` equal answers.
//! - On any disagreement the quorum rises to `max(2f + 1, first wave)` equal answers, and more
//!   candidates are asked, one not yet used each time, until one output reaches it or no
//!   output can (every candidate asked, or all that is left could not make up the
//!   difference): then the task fails with a clear error, never with an unverified answer.
//! - If two different outputs each hold `f + 1` answers, more than `f` candidates lied and
//!   the assumption is broken: that fails too.
//!
//! The property test at the end of this file draws candidates, liars (colluding on one wrong
//! output or each with its own), replicas that fail, and the order answers arrive in, and
//! checks that a wrong output is never accepted and that the right one is whenever enough
//! honest candidates answer.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::id::ContentId;
use crate::task::{TaskId, TaskInput, TaskOutput};
use crate::wire;
use crate::{Keypair, PeerId, PublicKey, UnixMillis};

/// Most replicas a caller may ask for.
pub const MAX_REPLICAS: u32 = 16;
/// Replicas of `replicate` when the caller names no number.
pub const DEFAULT_REPLICAS: u32 = 3;
/// Version of the certificate format (and of the attestation workers sign).
pub const CERTIFICATE_VERSION: u32 = 1;
/// Most candidates one replicated task draws from (the best ranked): the quorum, and so the
/// replicas asked and the signatures in a certificate, stay below 2/3 of this.
pub const MAX_CANDIDATES: usize = 64;
/// Longest engine name a worker may claim.
pub const MAX_ENGINE_BYTES: usize = 128;

/// How a task's result is checked.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Mode {
    /// The first worker's signed answer, unchecked.
    #[default]
    None,
    /// Run on at least `replicas` distinct peers and accept only a quorum of equal outputs.
    Replicate {
        /// The floor the caller asks for (more are used when the network needs them).
        replicas: u32,
    },
    /// Answer at once from the first worker, and re-run a fraction `rate` of tasks on another
    /// peer afterwards to compare (the comparison feeds reputation).
    SpotCheck {
        /// Fraction of tasks re-run, in (0, 1].
        rate: f64,
    },
}

impl Mode {
    /// Refuses a replica count or a rate no task can run with.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Self::None => Ok(()),
            Self::Replicate { replicas } if (1..=MAX_REPLICAS).contains(&replicas) => Ok(()),
            Self::Replicate { replicas } => Err(format!(
                "replicas must be between 1 and {MAX_REPLICAS}, not {replicas}"
            )),
            Self::SpotCheck { rate } if rate > 0.0 && rate <= 1.0 => Ok(()),
            Self::SpotCheck { rate } => {
                Err(format!("the spot-check rate must be in (0, 1], not {rate}"))
            }
        }
    }

    /// The mode named `verify` (`none`, `replicate`, `spot_check`) with its optional number,
    /// as the API's `mycel` object gives them.
    pub fn from_parts(
        verify: &str,
        replicas: Option<u32>,
        rate: Option<f64>,
    ) -> Result<Self, String> {
        let mode = match verify {
            "none" => Self::None,
            "replicate" => Self::Replicate {
                replicas: replicas.unwrap_or(DEFAULT_REPLICAS),
            },
            "spot_check" | "spot-check" => Self::SpotCheck {
                rate: rate.ok_or("spot_check needs a rate p, e.g. \"p\": 0.1")?,
            },
            other => {
                return Err(format!(
                    "verify must be none, replicate or spot_check, not {other:?}"
                ))
            }
        };
        mode.check()?;
        Ok(mode)
    }

    /// The mode's name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Replicate { .. } => "replicate",
            Self::SpotCheck { .. } => "spot_check",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Replicate { replicas } => write!(f, "replicate:{replicas}"),
            Self::SpotCheck { rate } => write!(f, "spot_check:{rate}"),
        }
    }
}

/// `none`, `replicate`, `replicate:3` (or `replicate(3)`), `spot_check:0.1`.
impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, arg) = match s.split_once([':', '(']) {
            Some((name, rest)) => (name, Some(rest.trim_end_matches(')'))),
            None => (s, None),
        };
        let bad = |what: &str| format!("{what} in verification mode {s:?}");
        match name {
            "replicate" => {
                let replicas = arg
                    .map(|a| a.parse::<u32>().map_err(|_| bad("not a replica count")))
                    .transpose()?;
                Self::from_parts(name, replicas, None)
            }
            "spot_check" | "spot-check" => {
                let rate = arg
                    .map(|a| a.parse::<f64>().map_err(|_| bad("not a rate")))
                    .transpose()?;
                Self::from_parts(name, None, rate)
            }
            _ if arg.is_some() => Err(bad("no number goes")),
            _ => Self::from_parts(name, None, None),
        }
    }
}

/// Whether this task is one of the fraction `rate` to re-run elsewhere (a draw in [0, 1)).
pub fn spot_checked(rate: f64, draw: f64) -> bool {
    draw < rate
}

/// Most liars assumed among `candidates`: fewer than a third, `⌈n/3⌉ − 1`.
pub fn max_faulty(candidates: usize) -> usize {
    candidates.div_ceil(3).saturating_sub(1)
}

/// Equal answers needed: unanimous in the first wave, more after a disagreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Replicas the caller asked for (the floor).
    pub requested: u32,
    /// Peers that serve the model and could have been asked.
    pub candidates: u32,
    /// Liars assumed among them, `⌈candidates/3⌉ − 1`.
    pub faulty: u32,
    /// Equal answers the accepted output holds at least.
    pub quorum: u32,
}

impl Rule {
    /// Checks the numbers fit together: the assumed liars follow from the candidates and the
    /// quorum holds more answers than there can be liars, and at least as many as requested.
    pub fn check(&self) -> Result<(), CertError> {
        let bad = |why: String| Err(CertError::Rule(why));
        if self.candidates == 0 || self.requested == 0 {
            return bad("no candidates or no replicas".into());
        }
        if self.candidates as usize > MAX_CANDIDATES {
            return bad(format!(
                "{} candidates (a quorum draws from at most {MAX_CANDIDATES})",
                self.candidates
            ));
        }
        let faulty = max_faulty(self.candidates as usize) as u32;
        if self.faulty != faulty {
            return bad(format!(
                "{} candidates allow {faulty} liars, the certificate assumes {}",
                self.candidates, self.faulty
            ));
        }
        if self.quorum < self.faulty + 1 || self.quorum < self.requested {
            return bad(format!(
                "a quorum of {} is below {} liars + 1 or the {} replicas requested",
                self.quorum, self.faulty, self.requested
            ));
        }
        if self.quorum > self.candidates {
            return bad(format!(
                "a quorum of {} among {} candidates",
                self.quorum, self.candidates
            ));
        }
        Ok(())
    }
}

/// Why a replicated task found no answer to accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    /// Fewer peers serve the model than the replicas needed.
    #[error(
        "{needed} replicas are needed ({requested} requested, {faulty} liars assumed among \
         {candidates} candidates) but only {candidates} nodes serve the model"
    )]
    TooFewCandidates {
        /// Replicas needed in the first wave.
        needed: usize,
        /// Replicas requested.
        requested: usize,
        /// Liars assumed.
        faulty: usize,
        /// Peers serving the model.
        candidates: usize,
    },
    /// No replicas were asked for.
    #[error("replicate needs at least one replica")]
    NoReplicas,
    /// The replicas disagreed and no output reached the quorum with the candidates left.
    #[error(
        "the replicas disagreed and no output reached a quorum of {quorum} equal answers \
         ({answers} answers, the largest group {largest}, {failed} replicas failed, every usable \
         candidate asked)"
    )]
    NoQuorum {
        /// Equal answers needed.
        quorum: usize,
        /// Answers received.
        answers: usize,
        /// The largest group of equal answers.
        largest: usize,
        /// Replicas that gave no answer.
        failed: usize,
    },
    /// Two different outputs each hold more answers than there can be liars: more than a
    /// third of the candidates lie, and no answer can be trusted.
    #[error(
        "two different outputs each hold {faulty}+1 or more answers: more than {faulty} of the \
         {candidates} candidates lie"
    )]
    Contradiction {
        /// Liars assumed.
        faulty: usize,
        /// Peers serving the model.
        candidates: usize,
    },
}

/// What a replicated task does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<D> {
    /// Send the task to this many more candidates (not yet asked).
    Ask(usize),
    /// Wait for the answers outstanding.
    Wait,
    /// The output is verified.
    Accept {
        /// The agreed output.
        output: D,
        /// The rule it met.
        rule: Rule,
    },
    /// No answer can be verified.
    GiveUp(QuorumError),
}

/// The answers of one replicated task and the decision they lead to. Pure: the driver sends
/// the task where [`Quorum::step`] says, and feeds back each answer ([`Quorum::answered`]) or
/// failure ([`Quorum::failed`]).
#[derive(Debug, Clone)]
pub struct Quorum<P, D> {
    requested: usize,
    candidates: usize,
    faulty: usize,
    first_wave: usize,
    asked: usize,
    failed: usize,
    answers: Vec<(P, D)>,
}

impl<P: PartialEq + Clone, D: PartialEq + Clone> Quorum<P, D> {
    /// A task for which `candidates` distinct peers serve the model and the caller asked for
    /// at least `requested` replicas.
    pub fn new(candidates: usize, requested: usize) -> Result<Self, QuorumError> {
        if requested == 0 {
            return Err(QuorumError::NoReplicas);
        }
        let faulty = max_faulty(candidates);
        let first_wave = requested.max(faulty + 1);
        if first_wave > candidates {
            return Err(QuorumError::TooFewCandidates {
                needed: first_wave,
                requested,
                faulty,
                candidates,
            });
        }
        Ok(Self {
            requested,
            candidates,
            faulty,
            first_wave,
            asked: 0,
            failed: 0,
            answers: Vec::new(),
        })
    }

    /// Records that the driver sent the task to `count` more candidates.
    pub fn asked(&mut self, count: usize) {
        self.asked = (self.asked + count).min(self.candidates);
    }

    /// Records `peer`'s answer (a second answer from one peer is ignored).
    pub fn answered(&mut self, peer: P, output: D) {
        if self.answers.iter().all(|(p, _)| *p != peer) {
            self.answers.push((peer, output));
        }
    }

    /// Records that an asked replica gave no usable answer (error, timeout, bad signature).
    pub fn failed(&mut self) {
        self.failed += 1;
    }

    /// Whether two answers differ.
    pub fn disagreed(&self) -> bool {
        self.answers.windows(2).any(|w| w[0].1 != w[1].1)
    }

    /// Equal answers the accepted output must hold now.
    pub fn quorum(&self) -> usize {
        if self.disagreed() {
            (2 * self.faulty + 1).max(self.first_wave)
        } else {
            self.first_wave
        }
    }

    /// The answers so far, in arrival order.
    pub fn answers(&self) -> &[(P, D)] {
        &self.answers
    }

    /// Liars assumed.
    pub fn faulty(&self) -> usize {
        self.faulty
    }

    fn groups(&self) -> Vec<(&D, usize)> {
        let mut groups: Vec<(&D, usize)> = Vec::new();
        for (_, output) in &self.answers {
            match groups.iter_mut().find(|(d, _)| *d == output) {
                Some((_, count)) => *count += 1,
                None => groups.push((output, 1)),
            }
        }
        groups
    }

    /// What to do next.
    pub fn step(&self) -> Step<D> {
        let groups = self.groups();
        let trusted = groups.iter().filter(|(_, c)| *c > self.faulty).count();
        if trusted > 1 {
            return Step::GiveUp(QuorumError::Contradiction {
                faulty: self.faulty,
                candidates: self.candidates,
            });
        }
        let quorum = self.quorum();
        let largest = groups.iter().map(|(_, c)| *c).max().unwrap_or(0);
        if let Some((output, _)) = groups.iter().find(|(_, c)| *c >= quorum) {
            return Step::Accept {
                output: (*output).clone(),
                rule: Rule {
                    requested: self.requested as u32,
                    candidates: self.candidates as u32,
                    faulty: self.faulty as u32,
                    quorum: quorum as u32,
                },
            };
        }
        let outstanding = self.asked.saturating_sub(self.answers.len() + self.failed);
        let unasked = self.candidates - self.asked;
        let wanted = quorum - largest;
        if largest + outstanding + unasked < quorum {
            return Step::GiveUp(QuorumError::NoQuorum {
                quorum,
                answers: self.answers.len(),
                largest,
                failed: self.failed,
            });
        }
        if outstanding >= wanted {
            return Step::Wait;
        }
        let more = (wanted - outstanding).min(unasked);
        if more == 0 {
            Step::Wait
        } else {
            Step::Ask(more)
        }
    }
}

// ---- one replicated task, from its candidates to its verdicts ------------------------------

/// What a replicated task does next ([`Replication::step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<P> {
    /// Send the task to these candidates (none asked before).
    Ask(Vec<P>),
    /// Wait for an answer outstanding.
    Wait,
    /// The output is verified.
    Accept(Judged<P>),
    /// No answer can be verified, and why.
    GiveUp(String),
}

/// An output known right, and what that shows about each worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged<P> {
    /// The claim the agreeing workers signed.
    pub output: Claim,
    /// The rule it met.
    pub rule: Rule,
    /// Each worker that answered or refused the input, with what that shows.
    pub verdicts: Vec<(P, Verdict)>,
}

/// What a settled task shows about one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its answer is the agreed one.
    Agreed,
    /// It ran another engine (a target only the DHT knew of): a different output is no proof
    /// of a lie, but no use either.
    OtherEngine,
    /// It signed another output for the same task, model, engine and input, and a quorum
    /// that holds an honest answer outvoted it: a lie.
    Outvoted,
    /// It called an input invalid that a quorum ran: a lie.
    RefusedValidInput,
}

/// One replicated task: the candidates in the order to ask them, and the [`Quorum`] their
/// answers build. Pure: the driver sends the task where [`Replication::step`] says and
/// feeds back every asked candidate's end — an answer whose signature it checked
/// ([`Replication::answered`]), a refusal of the input ([`Replication::refused`]) or a
/// failure ([`Replication::failed`]) — and applies the verdicts of an accepted output.
#[derive(Debug, Clone)]
pub struct Replication<P> {
    quorum: Quorum<P, Claim>,
    unasked: std::collections::VecDeque<P>,
    refusers: Vec<P>,
}

impl<P: PartialEq + Clone> Replication<P> {
    /// A task for `ranking` (distinct candidates, best first) with at least `replicas`
    /// replicas; `prior` holds answers already in (a spot check's two differing ones).
    ///
    /// The last seat of the first wave goes to a candidate drawn (by `draw`, a random
    /// number) uniformly from the ranking past the seats before it: every candidate is asked
    /// now and then whatever its record. A peer with no record, honest or not, otherwise
    /// ranks below peers with long records and is never asked (so a liar among them is never
    /// caught, and an honest newcomer never earns a record), and a liar that ranks well by
    /// behaving cannot choose the company it is checked in.
    pub fn new(
        ranking: &[P],
        replicas: usize,
        prior: Vec<(P, Claim)>,
        draw: u64,
    ) -> Result<Self, QuorumError> {
        let mut quorum = Quorum::new(ranking.len(), replicas)?;
        let mut unasked: std::collections::VecDeque<P> = ranking
            .iter()
            .filter(|p| prior.iter().all(|(q, _)| q != *p))
            .cloned()
            .collect();
        let seats = quorum.first_wave.saturating_sub(prior.len());
        if seats > 0 && unasked.len() > seats {
            let pool = unasked.len() - (seats - 1);
            let drawn = seats - 1 + (draw % pool as u64) as usize;
            unasked.swap(seats - 1, drawn);
        }
        for (peer, claim) in prior {
            quorum.asked(1);
            quorum.answered(peer, claim);
        }
        Ok(Self {
            quorum,
            unasked,
            refusers: Vec::new(),
        })
    }

    /// `peer` answered with `claim` (its signature checked by the driver).
    pub fn answered(&mut self, peer: P, claim: Claim) {
        self.quorum.answered(peer, claim);
    }

    /// `peer` gave no usable answer (error, timeout, bad signature).
    pub fn failed(&mut self) {
        self.quorum.failed();
    }

    /// `peer` called the input invalid. A peer may lie to stop a task, so the input is the
    /// caller's fault only when more peers than may lie say so: true then, and the driver
    /// ends the task with the refusal.
    pub fn refused(&mut self, peer: P) -> bool {
        self.quorum.failed();
        self.refusers.push(peer);
        self.refusers.len() > self.quorum.faulty()
    }

    /// Liars assumed among the candidates.
    pub fn faulty(&self) -> usize {
        self.quorum.faulty()
    }

    /// What to do next.
    pub fn step(&mut self) -> Next<P> {
        match self.quorum.step() {
            Step::Ask(count) => {
                let take = count.min(self.unasked.len());
                if take == 0 {
                    return Next::GiveUp("no candidate left to ask".into());
                }
                self.quorum.asked(take);
                Next::Ask(self.unasked.drain(..take).collect())
            }
            Step::Wait => {
                let answered = self.quorum.answers.len() + self.quorum.failed;
                if self.quorum.asked <= answered {
                    return Next::GiveUp("no answer outstanding".into());
                }
                Next::Wait
            }
            Step::Accept { output, rule } => {
                let verdicts = self.verdicts(&output);
                Next::Accept(Judged {
                    output,
                    rule,
                    verdicts,
                })
            }
            Step::GiveUp(e) => Next::GiveUp(e.to_string()),
        }
    }

    /// What the answers prove when the task ends without a verified output (it gave up, or
    /// its deadline passed): an output that holds as many equal answers as a first wave
    /// needs (`f + 1` at least) is the right one, by the argument that accepts a unanimous
    /// first wave, so the answers that differ from it are lies even though the larger quorum
    /// a disagreement asks for was not reached. The output, the rule it meets (its quorum:
    /// the answers it holds) and the verdicts; `None` when no output holds that many, or when
    /// a second output holds more answers than there can be liars (more than `f` lied, and
    /// nothing is proven).
    pub fn judged(&self) -> Option<Judged<P>> {
        let groups = self.quorum.groups();
        let faulty = self.quorum.faulty;
        if groups.iter().filter(|(_, count)| *count > faulty).count() > 1 {
            return None;
        }
        let (output, count) = groups
            .iter()
            .find(|(_, count)| *count >= self.quorum.first_wave)?;
        let output = (*output).clone();
        let rule = Rule {
            requested: self.quorum.requested as u32,
            candidates: self.quorum.candidates as u32,
            faulty: self.quorum.faulty as u32,
            quorum: *count as u32,
        };
        let verdicts = self.verdicts(&output);
        Some(Judged {
            output,
            rule,
            verdicts,
        })
    }

    /// What each answer (and each refusal of the input) shows once `agreed` is known right.
    fn verdicts(&self, agreed: &Claim) -> Vec<(P, Verdict)> {
        let answers = self.quorum.answers.iter().map(|(peer, claim)| {
            let verdict = if claim == agreed {
                Verdict::Agreed
            } else if claim.engine != agreed.engine {
                Verdict::OtherEngine
            } else {
                Verdict::Outvoted
            };
            (peer.clone(), verdict)
        });
        let refusals = self
            .refusers
            .iter()
            .map(|peer| (peer.clone(), Verdict::RefusedValidInput));
        answers.chain(refusals).collect()
    }
}

// ---- attestations and certificates ---------------------------------------------------------

/// The digest of a task's input as a worker received it (CBOR of [`TaskInput`]).
pub fn input_digest(input: &TaskInput) -> ContentId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mycel/task-input/1\0");
    wire::hash_encoded(input, &mut hasher);
    ContentId(*hasher.finalize().as_bytes())
}

/// The digest of a task's output (CBOR of [`TaskOutput`]): replicas that computed the same
/// output have the same digest.
pub fn output_digest(output: &TaskOutput) -> ContentId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mycel/task-output/1\0");
    wire::hash_encoded(output, &mut hasher);
    ContentId(*hasher.finalize().as_bytes())
}

/// What a worker signs for an answer: the task, the model and the engine that ran it, the
/// input it read and the output it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The task (32 hex digits).
    pub task: String,
    /// The model's content id.
    pub model: ContentId,
    /// The engine (and its numeric version) that ran it.
    pub engine: String,
    /// Digest of the input ([`input_digest`]).
    pub input: ContentId,
    /// Digest of the output ([`output_digest`]).
    pub output: ContentId,
}

impl Claim {
    /// The claim for task `id` of `model` run by `engine` on `input` giving `output`.
    pub fn new(
        id: TaskId,
        model: ContentId,
        engine: &str,
        input: ContentId,
        output: ContentId,
    ) -> Self {
        Self {
            task: id.to_string(),
            model,
            engine: engine.to_owned(),
            input,
            output,
        }
    }

    /// Refuses a claim whose fields are not in their one canonical form (so that no two
    /// texts of one certificate check): a task of 32 lower-case hex digits, a bounded engine.
    pub fn check(&self) -> Result<(), CertError> {
        let task_ok = self.task.len() == 32
            && self
                .task
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !task_ok {
            return Err(CertError::Malformed(format!("task {:?}", self.task)));
        }
        if self.engine.len() > MAX_ENGINE_BYTES {
            return Err(CertError::Malformed("the engine name is too long".into()));
        }
        Ok(())
    }

    /// The bytes signed: BLAKE3 over a domain tag and the claim's fields.
    pub fn signed_bytes(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"mycel/attestation/1\0");
        hasher.update(self.task.as_bytes());
        hasher.update(b"\0");
        hasher.update(&self.model.0);
        hasher.update(&(self.engine.len() as u64).to_le_bytes());
        hasher.update(self.engine.as_bytes());
        hasher.update(&self.input.0);
        hasher.update(&self.output.0);
        *hasher.finalize().as_bytes()
    }
}

/// A signature by one node: its peer id, public key and signature, hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signer {
    /// The signer's peer id.
    pub peer: String,
    /// Its public key (protobuf encoding), hex.
    pub public_key: String,
    /// Its signature, hex.
    pub signature: String,
}

impl Signer {
    /// `keypair`'s signature over `bytes`.
    pub fn sign(keypair: &Keypair, bytes: &[u8]) -> Self {
        let signature = keypair.sign(bytes).expect("ed25519 signing does not fail");
        Self {
            peer: keypair.public().to_peer_id().to_string(),
            public_key: to_hex(&keypair.public().encode_protobuf()),
            signature: to_hex(&signature),
        }
    }

    /// A signature already made by the holder of `public_key` (protobuf encoding).
    pub fn from_parts(public_key: &[u8], signature: &[u8]) -> Result<Self, CertError> {
        let key = PublicKey::try_decode_protobuf(public_key)
            .map_err(|_| CertError::Malformed("a public key does not decode".into()))?;
        Ok(Self {
            peer: key.to_peer_id().to_string(),
            public_key: to_hex(public_key),
            signature: to_hex(signature),
        })
    }

    /// The signer's peer id, once its key and signature over `bytes` check out.
    pub fn verify(&self, bytes: &[u8]) -> Result<PeerId, CertError> {
        // Bounded before any parsing: base58 decoding is quadratic in its input.
        if self.peer.len() > 128 || self.public_key.len() > 256 || self.signature.len() > 256 {
            return Err(CertError::Malformed("a signer's field is too long".into()));
        }
        let peer: PeerId = self
            .peer
            .parse()
            .map_err(|_| CertError::Malformed(format!("{:?} is not a peer id", self.peer)))?;
        let key = from_hex(&self.public_key)
            .and_then(|k| PublicKey::try_decode_protobuf(&k).ok())
            .ok_or_else(|| {
                CertError::Malformed(format!("the public key of {peer} does not decode"))
            })?;
        if key.to_peer_id() != peer {
            return Err(CertError::KeyMismatch(peer.to_string()));
        }
        let signature = from_hex(&self.signature)
            .ok_or_else(|| CertError::Malformed(format!("the signature of {peer} is not hex")))?;
        if !key.verify(bytes, &signature) {
            return Err(CertError::BadSignature(peer.to_string()));
        }
        Ok(peer)
    }
}

/// Proof that a quorum of workers returned one output for one task: the claim they signed,
/// their signatures, the rule the quorum met, and the node that ran the quorum, which signs
/// the whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// [`CERTIFICATE_VERSION`].
    pub version: u32,
    /// How the output was verified (`replicate`).
    pub mode: String,
    /// What every worker listed signed.
    pub claim: Claim,
    /// The numbers the quorum met.
    pub rule: Rule,
    /// The workers that returned the output, each with its signature over the claim.
    pub workers: Vec<Signer>,
    /// When the certificate was made.
    pub issued_at: UnixMillis,
    /// The node that ran the quorum, signing everything above.
    pub issuer: Signer,
}

/// Why a certificate does not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// It does not parse, or a field is not what it must be.
    #[error("the certificate is malformed: {0}")]
    Malformed(String),
    /// A signature does not verify.
    #[error("the signature of {0} does not verify")]
    BadSignature(String),
    /// A public key is not the named peer's.
    #[error("the public key given for {0} is not that peer's")]
    KeyMismatch(String),
    /// A worker is listed twice.
    #[error("worker {0} is listed twice")]
    DuplicateWorker(String),
    /// The numbers do not fit or too few workers signed.
    #[error("the quorum rule does not hold: {0}")]
    Rule(String),
}

/// What a checked certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The workers whose signatures verified.
    pub workers: Vec<PeerId>,
    /// The node that issued it.
    pub issuer: PeerId,
}

impl Certificate {
    /// The certificate for `claim`, signed by `workers` (signatures already checked by the
    /// caller), under `rule`, issued by `keypair` at `now`.
    pub fn issue(
        keypair: &Keypair,
        claim: Claim,
        rule: Rule,
        workers: Vec<Signer>,
        now: UnixMillis,
    ) -> Self {
        let mut certificate = Self {
            version: CERTIFICATE_VERSION,
            mode: "replicate".into(),
            claim,
            rule,
            workers,
            issued_at: now,
            issuer: Signer {
                peer: keypair.public().to_peer_id().to_string(),
                public_key: to_hex(&keypair.public().encode_protobuf()),
                signature: String::new(),
            },
        };
        certificate.issuer = Signer::sign(keypair, &certificate.body());
        certificate
    }

    /// The bytes the issuer signs: the CBOR of the certificate with the issuer's signature
    /// left empty.
    fn body(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.issuer.signature.clear();
        wire::encode(&unsigned)
    }

    /// Checks everything a certificate claims, offline: the format, the rule's numbers, every
    /// worker's key and signature over the claim (distinct workers, at least the quorum), and
    /// the issuer's signature over the whole.
    pub fn check(&self) -> Result<Checked, CertError> {
        if self.version != CERTIFICATE_VERSION {
            return Err(CertError::Malformed(format!(
                "version {} (this node reads {CERTIFICATE_VERSION})",
                self.version
            )));
        }
        if self.mode != "replicate" {
            return Err(CertError::Malformed(format!("mode {:?}", self.mode)));
        }
        self.rule.check()?;
        if self.workers.len() > self.rule.candidates as usize {
            return Err(CertError::Malformed(format!(
                "{} workers among {} candidates",
                self.workers.len(),
                self.rule.candidates
            )));
        }
        self.claim.check()?;
        let signed = self.claim.signed_bytes();
        let mut workers = Vec::with_capacity(self.workers.len());
        for worker in &self.workers {
            let peer = worker.verify(&signed)?;
            if workers.contains(&peer) {
                return Err(CertError::DuplicateWorker(peer.to_string()));
            }
            workers.push(peer);
        }
        if workers.len() < self.rule.quorum as usize {
            return Err(CertError::Rule(format!(
                "{} workers signed, the quorum is {}",
                workers.len(),
                self.rule.quorum
            )));
        }
        let issuer = self.issuer.verify(&self.body())?;
        Ok(Checked { workers, issuer })
    }
}

/// Evidence that a worker lied: its signed claim for a task, and the certificate of the
/// output a quorum agreed on for the same task, model and input. Anyone can check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// What the liar signed.
    pub lie: Claim,
    /// Its signature.
    pub liar: Signer,
    /// The quorum's certificate.
    pub certificate: Certificate,
}

impl Evidence {
    /// The liar's peer id, once the evidence holds: the liar signed its claim, the
    /// certificate checks, both are about the same task, model, engine and input, and the
    /// outputs differ.
    pub fn check(&self) -> Result<PeerId, CertError> {
        let liar = self.liar.verify(&self.lie.signed_bytes())?;
        self.certificate.check()?;
        let agreed = &self.certificate.claim;
        let same_task = self.lie.task == agreed.task
            && self.lie.model == agreed.model
            && self.lie.engine == agreed.engine
            && self.lie.input == agreed.input;
        if !same_task || self.lie.output == agreed.output {
            return Err(CertError::Malformed(
                "the claim is not a different answer to the certified task".into(),
            ));
        }
        Ok(liar)
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lower-case hex, or `None`.
pub fn from_hex(hex: &str) -> Option<Vec<u8>> {
    // Lower case only: one text per value, so that no changed byte leaves a value the same.
    let canonical = hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex.len().is_multiple_of(2) || !canonical {
        return None;
    }
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn modes_parse_and_refuse_nonsense() {
        assert_eq!("none".parse::<Mode>(), Ok(Mode::None));
        assert_eq!(
            "replicate".parse::<Mode>(),
            Ok(Mode::Replicate { replicas: 3 })
        );
        assert_eq!(
            "replicate(5)".parse::<Mode>(),
            Ok(Mode::Replicate { replicas: 5 })
        );
        assert_eq!(
            "spot_check:0.1".parse::<Mode>(),
            Ok(Mode::SpotCheck { rate: 0.1 })
        );
        for bad in [
            "replicate:0",
            "replicate:17",
            "spot_check",
            "spot_check:1.5",
            "quorum",
            "none:2",
        ] {
            assert!(bad.parse::<Mode>().is_err(), "{bad}");
        }
        let mode = Mode::Replicate { replicas: 4 };
        assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
    }

    #[test]
    fn liars_assumed_are_fewer_than_a_third() {
        let f: Vec<usize> = (1..=10).map(max_faulty).collect();
        assert_eq!(f, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3]);
        for n in 1..200 {
            assert!(3 * max_faulty(n) < n, "{n}");
        }
    }

    /// Runs a quorum to its end: `answers[i]` is what the i-th candidate asked returns
    /// (`None`: it fails).
    fn drive(candidates: usize, requested: usize, answers: &[Option<u8>]) -> Step<u8> {
        let mut quorum = match Quorum::new(candidates, requested) {
            Ok(q) => q,
            Err(e) => return Step::GiveUp(e),
        };
        let mut next = 0;
        let mut pending = std::collections::VecDeque::new();
        loop {
            match quorum.step() {
                Step::Ask(k) => {
                    quorum.asked(k);
                    for _ in 0..k {
                        pending.push_back(next);
                        next += 1;
                    }
                }
                Step::Wait => {
                    let i = pending
                        .pop_front()
                        .expect("waits only with answers outstanding");
                    match answers[i] {
                        Some(output) => quorum.answered(i, output),
                        None => quorum.failed(),
                    }
                }
                end => return end,
            }
        }
    }

    #[test]
    fn unanimous_first_wave_is_accepted_and_disagreement_escalates() {
        // 10 candidates: f = 3, a first wave of 4 (at least f + 1 even when 3 are asked).
        let honest = [Some(1); 10];
        match drive(10, 3, &honest) {
            Step::Accept { output, rule } => {
                assert_eq!(output, 1);
                assert_eq!(rule.quorum, 4);
            }
            other => panic!("{other:?}"),
        }
        // One liar in the first wave: the quorum rises to 2f + 1 = 7.
        let mut one_liar = honest;
        one_liar[0] = Some(9);
        match drive(10, 3, &one_liar) {
            Step::Accept { output, rule } => {
                assert_eq!((output, rule.quorum), (1, 7));
            }
            other => panic!("{other:?}"),
        }
        // Three colluding liars (f) asked first: the first wave of f + 1 holds an honest
        // answer, the disagreement escalates, and the liars' output never reaches 7.
        let mut three = honest;
        for a in three.iter_mut().take(3) {
            *a = Some(9);
        }
        assert!(matches!(
            drive(10, 3, &three),
            Step::Accept { output: 1, .. }
        ));
        // With a fourth honest node gone quiet, 6 honest answers cannot make 7: it gives up.
        three[9] = None;
        assert!(matches!(
            drive(10, 3, &three),
            Step::GiveUp(QuorumError::NoQuorum { quorum: 7, .. })
        ));
        // Fewer candidates than the first wave needs.
        assert!(matches!(
            drive(2, 3, &honest),
            Step::GiveUp(QuorumError::TooFewCandidates { .. })
        ));
        // A replica that fails is replaced.
        let mut failing = honest;
        failing[1] = None;
        assert!(matches!(
            drive(10, 3, &failing),
            Step::Accept { output: 1, .. }
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the candidates, the liars (up to f, colluding or not), the failures and
        /// the order of answers: a wrong output is never accepted, and the right one is
        /// whenever the honest candidates that answer can make up the quorum.
        #[test]
        fn no_wrong_output_is_ever_accepted(
            candidates in 1usize..25,
            requested in 1usize..8,
            liar_share in 0.0f64..1.0,
            colluding in any::<bool>(),
            seed in any::<u64>(),
            fail_share in 0.0f64..0.5,
        ) {
            use rand::{seq::SliceRandom, Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let faulty = max_faulty(candidates);
            let liars = ((faulty as f64 + 1.0) * liar_share) as usize; // 0..=f
            const RIGHT: u8 = 0;
            let mut answers: Vec<Option<u8>> = (0..candidates)
                .map(|i| {
                    if i < liars {
                        Some(if colluding { 200 } else { 100 + i as u8 })
                    } else {
                        Some(RIGHT)
                    }
                })
                .collect();
            for a in &mut answers {
                if rng.gen_bool(fail_share) {
                    *a = None;
                }
            }
            answers.shuffle(&mut rng);
            let honest_answering = answers.iter().filter(|a| **a == Some(RIGHT)).count();
            match drive(candidates, requested, &answers) {
                Step::Accept { output, rule } => {
                    prop_assert_eq!(output, RIGHT);
                    prop_assert!(rule.check().is_ok());
                }
                Step::GiveUp(_) => {
                    // Only when the honest answers could not reach the highest quorum.
                    let quorum = (2 * faulty + 1).max(requested.max(faulty + 1));
                    prop_assert!(
                        honest_answering < quorum || requested.max(faulty + 1) > candidates,
                        "gave up with {} honest answers for a quorum of {}", honest_answering, quorum
                    );
                }
                other => prop_assert!(false, "ended with {:?}", other),
            }
        }
    }

    fn claim_of(output: &[u8], engine: &str) -> Claim {
        Claim::new(
            TaskId(7),
            ContentId::of(b"model"),
            engine,
            ContentId::of(b"input"),
            ContentId::of(output),
        )
    }

    #[test]
    fn a_replication_asks_in_rank_order_and_judges_every_answer() {
        // 7 candidates, 2 liars assumed: a first wave of 3.
        let ranking: Vec<u32> = (0..7).collect();
        let mut replication = Replication::new(&ranking, 2, Vec::new(), 0).unwrap();
        assert_eq!(replication.step(), Next::Ask(vec![0, 1, 2]));
        assert_eq!(replication.step(), Next::Wait);
        let right = claim_of(b"right", "e");
        replication.answered(0, right.clone());
        replication.answered(1, claim_of(b"wrong", "e"));
        // One peer calling the input invalid is not believed (2 may lie).
        assert!(!replication.refused(2));
        // The disagreement asks for 2f + 1 = 5 equal answers: four more candidates.
        assert_eq!(replication.step(), Next::Ask(vec![3, 4, 5, 6]));
        for peer in [3, 4, 5] {
            replication.answered(peer, right.clone());
        }
        replication.answered(6, claim_of(b"other", "another engine"));
        // Four equal answers: not the 5 a disagreement asks for, and nobody left to ask.
        assert!(matches!(replication.step(), Next::GiveUp(_)));
        // But more than the 2 liars assumed: the right output, proven, and what each shows.
        let Judged {
            output,
            rule,
            verdicts,
        } = replication.judged().expect("proven");
        assert_eq!(output, right);
        assert_eq!(rule.quorum, 4);
        assert!(rule.check().is_ok());
        assert_eq!(
            verdicts,
            vec![
                (0, Verdict::Agreed),
                (1, Verdict::Outvoted),
                (3, Verdict::Agreed),
                (4, Verdict::Agreed),
                (5, Verdict::Agreed),
                (6, Verdict::OtherEngine),
                (2, Verdict::RefusedValidInput),
            ]
        );
    }

    #[test]
    fn the_first_waves_last_seat_is_drawn_from_the_rest() {
        // 10 candidates, 3 liars assumed: a first wave of 4, its last seat drawn from 3..10.
        let ranking: Vec<u32> = (0..10).collect();
        let mut seated = std::collections::BTreeSet::new();
        for draw in 0..50 {
            let mut replication = Replication::new(&ranking, 3, Vec::new(), draw).unwrap();
            let Next::Ask(first) = replication.step() else {
                panic!("asks first")
            };
            assert_eq!(first[..3], [0, 1, 2], "the best ranked keep their seats");
            seated.insert(first[3]);
        }
        assert_eq!(seated, (3..10).collect(), "every other candidate is drawn");
    }

    #[test]
    fn a_contradiction_proves_nothing() {
        // 7 candidates (2 liars assumed), 4 replicas asked for: a first wave of 4.
        let ranking: Vec<u32> = (0..7).collect();
        let mut replication = Replication::new(&ranking, 4, Vec::new(), 0).unwrap();
        let (a, b) = (claim_of(b"a", "e"), claim_of(b"b", "e"));
        assert_eq!(replication.step(), Next::Ask(vec![0, 1, 2, 3]));
        for (peer, claim) in [(0, &a), (1, &a), (2, &a), (3, &b)] {
            replication.answered(peer, claim.clone());
        }
        assert_eq!(replication.step(), Next::Ask(vec![4, 5]));
        replication.answered(4, a.clone());
        replication.answered(5, b.clone());
        assert_eq!(replication.step(), Next::Ask(vec![6]));
        replication.answered(6, b.clone());
        // 4 against 3: both above the 2 liars assumed, so more lied; neither side is proven
        // (a first wave's worth of `a` is no proof here).
        assert!(matches!(replication.step(), Next::GiveUp(_)));
        assert_eq!(replication.judged(), None);
    }

    #[test]
    fn an_unverified_task_proves_nothing_below_a_first_wave() {
        let ranking: Vec<u32> = (0..7).collect();
        let mut replication = Replication::new(&ranking, 2, Vec::new(), 0).unwrap();
        let Next::Ask(first) = replication.step() else {
            panic!("asks first")
        };
        replication.answered(first[0], claim_of(b"right", "e"));
        replication.answered(first[1], claim_of(b"right", "e"));
        replication.answered(first[2], claim_of(b"wrong", "e"));
        // Two equal answers may both be liars' (2 assumed): nothing is proven.
        assert_eq!(replication.judged(), None);
        // More refusals than there can be liars: the input is at fault.
        let mut refused = Replication::new(&ranking, 2, Vec::new(), 0).unwrap();
        let _ = refused.step();
        assert!(!refused.refused(0));
        assert!(!refused.refused(1));
        assert!(refused.refused(2));
    }

    fn certificate() -> (Certificate, Vec<Keypair>) {
        let workers: Vec<Keypair> = (0..4).map(|_| Keypair::generate_ed25519()).collect();
        let claim = Claim::new(
            TaskId(42),
            ContentId::of(b"model"),
            "mycel-q4/1",
            ContentId::of(b"input"),
            ContentId::of(b"output"),
        );
        let signed = claim.signed_bytes();
        let signers = workers.iter().map(|k| Signer::sign(k, &signed)).collect();
        let rule = Rule {
            requested: 3,
            candidates: 10,
            faulty: 3,
            quorum: 4,
        };
        let issuer = Keypair::generate_ed25519();
        (
            Certificate::issue(&issuer, claim, rule, signers, 1_000),
            workers,
        )
    }

    #[test]
    fn a_certificate_checks_offline_and_any_changed_byte_fails_it() {
        let (cert, workers) = certificate();
        let checked = cert.check().expect("an honest certificate checks");
        assert_eq!(checked.workers.len(), 4);
        assert_eq!(checked.workers[0], workers[0].public().to_peer_id());
        // Through JSON, as `mycel verify` reads it.
        let json = serde_json::to_string_pretty(&cert).unwrap();
        let back: Certificate = serde_json::from_str(&json).unwrap();
        assert!(back.check().is_ok());
        // Change every byte inside a value, one at a time: parsing or checking fails.
        let bytes = json.as_bytes();
        let mut changed_values = 0;
        for i in 0..bytes.len() {
            let c = bytes[i];
            let replacements: &[u8] = match c {
                b'0'..=b'8' => &[c + 1],
                b'9' => b"0",
                // Another letter, and the same letter in the other case.
                b'a'..=b'y' => &[c + 1, c.to_ascii_uppercase()],
                b'A'..=b'Y' => &[c + 1, c.to_ascii_lowercase()],
                _ => continue,
            };
            for &replacement in replacements {
                let mut altered = bytes.to_vec();
                altered[i] = replacement;
                let Ok(text) = std::str::from_utf8(&altered) else {
                    continue;
                };
                let Ok(cert) = serde_json::from_str::<Certificate>(text) else {
                    continue;
                };
                changed_values += 1;
                assert!(
                    cert.check().is_err(),
                    "byte {i} ({}) changed to {} and it still checks",
                    c as char,
                    replacement as char
                );
            }
        }
        assert!(
            changed_values > 500,
            "{changed_values} altered certificates parsed"
        );
    }

    #[test]
    fn evidence_of_a_lie_checks_and_cannot_be_made_up() {
        let (cert, _) = certificate();
        let liar = Keypair::generate_ed25519();
        let mut lie = cert.claim.clone();
        lie.output = ContentId::of(b"something else");
        let evidence = Evidence {
            liar: Signer::sign(&liar, &lie.signed_bytes()),
            lie: lie.clone(),
            certificate: cert.clone(),
        };
        assert_eq!(evidence.check(), Ok(liar.public().to_peer_id()));
        // The agreed output itself is no lie.
        let same = Evidence {
            liar: Signer::sign(&liar, &cert.claim.signed_bytes()),
            lie: cert.claim.clone(),
            certificate: cert.clone(),
        };
        assert!(same.check().is_err());
        // A claim the accused never signed.
        let framed = Evidence {
            liar: Signer {
                peer: liar.public().to_peer_id().to_string(),
                ..evidence.liar.clone()
            },
            lie: Claim {
                engine: "another".into(),
                ..lie
            },
            certificate: cert,
        };
        assert!(framed.check().is_err());
    }

    #[test]
    fn forged_or_short_certificates_fail() {
        let (cert, _) = certificate();
        let mut short = cert.clone();
        short.workers.pop();
        assert!(short.check().is_err(), "3 workers for a quorum of 4");
        let mut doubled = cert.clone();
        doubled.workers[1] = doubled.workers[0].clone();
        assert!(doubled.check().is_err());
        // A worker's signature moved to another claim (a replay onto another task).
        let mut replayed = cert.clone();
        replayed.claim.task = TaskId(43).to_string();
        assert!(replayed.check().is_err());
        // A key that is not the named peer's.
        let mut swapped = cert.clone();
        swapped.workers[0].public_key = swapped.workers[1].public_key.clone();
        assert!(matches!(swapped.check(), Err(CertError::KeyMismatch(_))));
        // A rule that assumes fewer liars than its candidates allow.
        let mut lax = cert;
        lax.rule.faulty = 1;
        lax.rule.quorum = 2;
        assert!(lax.check().is_err());
    }
}
