//! Decoders under attack: every decoder of bytes that come from peers is fed arbitrary bytes,
//! noise up to a bit past its frame limit, valid frames with random mutations (bit flips,
//! overwritten, inserted and deleted bytes, truncation, splices) and valid frames whose
//! length, count or integer fields are blown up — then the checks a receiver runs on what
//! decoded. Each must answer with a value or a typed error, never panic, and allocate no more
//! than a bound proportional to the input (checked by a counting allocator, on this thread,
//! around the decode and checks only).
//!
//! Cases per decoder: `MYCEL_FUZZ_CASES` (default 10,000). A longer run:
//! `MYCEL_FUZZ_CASES=1000000 cargo test -p mycel-core --release --test decoders -- --nocapture`
//! (`--nocapture` prints, per decoder, the time taken, how the cases ended and the largest
//! allocation relative to the input).

use std::cell::{Cell, RefCell};
mod counting;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use mycel_core::blob::{
    self, chunk_count, chunk_len, decode_manifest, encode_manifest, BlobFrame, BlobRequest,
    ManifestEntry, Outboard, CHUNK_BYTES, MAX_BLOB_FRAME_BYTES, MAX_BLOB_REQUEST_BYTES,
};
use mycel_core::compress::{Int8, Quantised, Sparse};
use mycel_core::fl::{
    self, AggregatorSpec, Compression, Gathered, JobId, LocalTraining, Member, ModelSpec, Payload,
    SignedUpdate, TrainReply, TrainRequest, MAX_PARAMETERS, MAX_UPDATE_BYTES,
};
use mycel_core::grammar::Shape;
use mycel_core::id::ContentId;
use mycel_core::membership::{Config as MembershipConfig, Membership};
use mycel_core::secround::{
    self, FromParticipant, Keys, Masked, Participant, Reveal, Sealed, Setup, ToParticipant,
};
use mycel_core::statement::{
    Announcement, Capabilities, Contact, DatasetOffer, DownReport, Hardware, Load, ModelKind,
    ModelOffer, PowerState, SignedStatement, Statement, MAX_STATEMENT_BYTES,
};
use mycel_core::task::{
    self, ChatMessage, FinishReason, GenerateParams, Logprob, Refusal, Resume, TaskFrame, TaskId,
    TaskInput, TaskOutput, TaskRequest, TaskResult, Timings, TokenLogprobs,
};
use mycel_core::wire::{self, Rejection};
use mycel_core::{Keypair, PeerId};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use counting::measured;

// ---------------------------------------------------------------------------------------------
/// A decode and its checks may allocate this many bytes per input byte, plus [`SLACK`] (plus
/// what a check is entitled to beyond its input, see [`Checked::extra`]). Values that decode
/// can be larger in memory than on the wire (an empty string is 1 byte there, 24 here; a
/// collection grows by doubling), so the factor is not 1 — but a header that merely claims a
/// large collection must not count.
const AMPLIFY: usize = 64;
/// Fixed allowance of a decode and its checks (hash maps, key decoding, small buffers).
const SLACK: usize = 64 << 10;

// ---------------------------------------------------------------------------------------------
// The runner.

fn cases() -> u32 {
    std::env::var("MYCEL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// How one case ended, for the tally printed at the end; and what its checks may allocate
/// beyond [`AMPLIFY`] times the input (a sparse update of a large model decodes to the
/// model's size from a few bytes, by design).
struct Checked {
    outcome: &'static str,
    extra: usize,
}

impl From<&'static str> for Checked {
    fn from(outcome: &'static str) -> Self {
        Self { outcome, extra: 0 }
    }
}

/// How a frame is encoded, which decides how it is blown up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// CBOR: a length, count or integer header is replaced by a huge one.
    Cbor,
    /// Raw bytes: 8 bytes somewhere are replaced by a huge little-endian integer.
    Raw,
}

/// One input of a fuzz case.
#[derive(Debug, Clone)]
enum Input {
    /// A valid frame.
    Valid(Vec<u8>),
    /// Arbitrary bytes.
    Bytes(Vec<u8>),
    /// The first `n` bytes of a fixed stream of noise (up to a bit past the limit).
    Noise(usize),
    /// A valid frame, mutated.
    Mutated(Vec<u8>),
    /// A valid frame with a field blown up.
    BlownUp(Vec<u8>),
}

impl Input {
    fn bytes(&self) -> &[u8] {
        match self {
            Input::Valid(b) | Input::Bytes(b) | Input::Mutated(b) | Input::BlownUp(b) => b,
            Input::Noise(n) => &noise()[..*n],
        }
    }
}

/// The largest limit of all decoders, and a bit.
const NOISE_BYTES: usize = (64 << 20) + 64;

fn noise() -> &'static [u8] {
    static NOISE: OnceLock<Vec<u8>> = OnceLock::new();
    NOISE.get_or_init(|| {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut out = Vec::with_capacity(NOISE_BYTES);
        while out.len() < NOISE_BYTES {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.truncate(NOISE_BYTES);
        out
    })
}

/// A random change to a frame.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    /// Copies `len` bytes from one place over another.
    Splice(Index, Index, usize),
    /// Repeats `len` bytes in place.
    Repeat(Index, usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<Index>(), vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), any::<Index>(), 1usize..32)
            .prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
        1 => (any::<Index>(), 1usize..16, 1u8..8).prop_map(|(i, n, k)| Mutation::Repeat(i, n, k)),
    ]
}

fn mutate(mut frame: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = frame.len();
        let at = |i: &Index| if len == 0 { 0 } else { i.index(len) };
        match m {
            Mutation::Flip(i, bit) if len > 0 => frame[at(i)] ^= 1 << *bit,
            Mutation::Set(i, byte) if len > 0 => frame[at(i)] = *byte,
            Mutation::Insert(i, bytes) => {
                let p = at(i);
                frame.splice(p..p, bytes.iter().copied());
            }
            Mutation::Delete(i, n) if len > 0 => {
                let p = at(i);
                frame.drain(p..(p + n).min(len));
            }
            Mutation::Truncate(i) => frame.truncate(at(i)),
            Mutation::Splice(from, to, n) if len > 0 => {
                let (from, to) = (at(from), at(to));
                let n = (*n).min(len - from).min(len - to);
                frame.copy_within(from..from + n, to);
            }
            Mutation::Repeat(i, n, times) if len > 0 => {
                let p = at(i);
                let piece: Vec<u8> = frame[p..(p + n).min(len)].to_vec();
                for _ in 0..*times {
                    frame.splice(p..p, piece.iter().copied());
                }
            }
            _ => {}
        }
    }
    frame
}

/// A CBOR header in a frame: where it starts, how long it is, its major type.
#[derive(Debug, Clone, Copy)]
struct Header {
    at: usize,
    len: usize,
    major: u8,
}

/// The headers of the CBOR items in `frame` (well-formed, as our encoder writes it), in order.
fn headers(frame: &[u8]) -> Vec<Header> {
    fn item(b: &[u8], pos: &mut usize, out: &mut Vec<Header>) -> Option<()> {
        let start = *pos;
        let initial = *b.get(start)?;
        let (major, info) = (initial >> 5, initial & 31);
        let (arg, len) = match info {
            0..=23 => (u64::from(info), 1),
            24 => (u64::from(*b.get(start + 1)?), 2),
            25 => (
                u64::from(u16::from_be_bytes(
                    b.get(start + 1..start + 3)?.try_into().ok()?,
                )),
                3,
            ),
            26 => (
                u64::from(u32::from_be_bytes(
                    b.get(start + 1..start + 5)?.try_into().ok()?,
                )),
                5,
            ),
            27 => (
                u64::from_be_bytes(b.get(start + 1..start + 9)?.try_into().ok()?),
                9,
            ),
            _ => return None,
        };
        *pos += len;
        out.push(Header {
            at: start,
            len,
            major,
        });
        match major {
            2 | 3 => *pos = pos.checked_add(usize::try_from(arg).ok()?)?,
            4 => {
                for _ in 0..arg {
                    item(b, pos, out)?;
                }
            }
            5 => {
                for _ in 0..arg.checked_mul(2)? {
                    item(b, pos, out)?;
                }
            }
            6 => item(b, pos, out)?,
            _ => {}
        }
        (*pos <= b.len()).then_some(())
    }
    let mut out = Vec::new();
    let mut pos = 0;
    let _ = item(frame, &mut pos, &mut out);
    out
}

/// What a blown-up field is set to.
#[derive(Debug, Clone, Copy)]
enum Huge {
    U32Max,
    U64Max,
    Pow31,
    Pow40,
    /// An indefinite length (for strings, arrays and maps).
    Indefinite,
    /// One past the decoder's frame limit.
    PastLimit,
}

fn huge() -> impl Strategy<Value = Huge> {
    prop_oneof![
        Just(Huge::U32Max),
        Just(Huge::U64Max),
        Just(Huge::Pow31),
        Just(Huge::Pow40),
        Just(Huge::Indefinite),
        Just(Huge::PastLimit),
    ]
}

fn blow_up(mut frame: Vec<u8>, format: Format, which: &Index, huge: Huge, limit: usize) -> Vec<u8> {
    let value = match huge {
        Huge::U32Max | Huge::Indefinite => u64::from(u32::MAX),
        Huge::U64Max => u64::MAX,
        Huge::Pow31 => 1 << 31,
        Huge::Pow40 => 1 << 40,
        Huge::PastLimit => limit as u64 + 1,
    };
    match format {
        Format::Raw => {
            if frame.len() >= 8 {
                let at = which.index(frame.len() - 7);
                frame[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            frame
        }
        Format::Cbor => {
            // Integers (0), strings (2, 3), arrays (4) and maps (5): lengths, counts, sizes.
            let targets: Vec<Header> = headers(&frame)
                .into_iter()
                .filter(|h| matches!(h.major, 0 | 2..=5))
                .collect();
            if targets.is_empty() {
                return frame;
            }
            let h = targets[which.index(targets.len())];
            let mut header = Vec::with_capacity(9);
            if matches!(huge, Huge::Indefinite) && h.major != 0 {
                header.push(h.major << 5 | 31);
            } else {
                header.push(h.major << 5 | 27);
                header.extend_from_slice(&value.to_be_bytes());
            }
            frame.splice(h.at..h.at + h.len, header);
            frame
        }
    }
}

/// Inputs for a decoder whose frames are `limit` bytes at most and whose valid frames come
/// from `valid`.
fn inputs(
    valid: BoxedStrategy<Vec<u8>>,
    format: Format,
    limit: usize,
) -> impl Strategy<Value = Input> {
    let near = limit.saturating_sub(64)..=limit + 64;
    let prefix = valid.clone();
    prop_oneof![
        1 => valid.clone().prop_map(Input::Valid),
        2 => vec(any::<u8>(), 0..512).prop_map(Input::Bytes),
        // A valid frame's start and random bytes: past the first headers more often.
        1 => (prefix, any::<Index>(), vec(any::<u8>(), 0..256)).prop_map(|(mut f, i, tail)| {
            f.truncate(i.index(f.len() + 1));
            f.extend(tail);
            Input::Bytes(f)
        }),
        1 => prop_oneof![0..=limit + 64, near].prop_map(Input::Noise),
        5 => (valid.clone(), vec(mutation(), 1..4))
            .prop_map(|(f, ms)| Input::Mutated(mutate(f, &ms))),
        2 => (valid, any::<Index>(), huge(), option::of((any::<Index>(), huge()))).prop_map(
            move |(f, which, huge, again)| {
                let mut f = blow_up(f, format, &which, huge, limit);
                if let Some((which, huge)) = again {
                    f = blow_up(f, format, &which, huge, limit);
                }
                Input::BlownUp(f)
            }
        ),
    ]
}

/// Runs the cases of one decoder: `check` decodes a case's bytes and runs the receiver's
/// checks, measured.
fn fuzz(
    name: &str,
    limit: usize,
    format: Format,
    valid: BoxedStrategy<Vec<u8>>,
    check: impl Fn(&[u8]) -> Checked,
) {
    fuzz_with(name, limit, format, valid, |_| (), |bytes, ()| check(bytes));
}

/// [`fuzz`] with a `setup` that prepares each case from its bytes outside the count (signs a
/// mutated body, say) for `check`.
fn fuzz_with<P>(
    name: &str,
    limit: usize,
    format: Format,
    valid: BoxedStrategy<Vec<u8>>,
    setup: impl Fn(&[u8]) -> P,
    check: impl Fn(&[u8], P) -> Checked,
) {
    noise();
    let started = Instant::now();
    let tally: RefCell<BTreeMap<&'static str, u32>> = RefCell::default();
    // The largest ratio of bytes allocated to input bytes (inputs of 256 bytes and more,
    // what checks may allocate beyond the input not counted), and the largest peak.
    let worst: Cell<(f64, usize, usize)> = Cell::new((0.0, 0, 0));
    let most = Cell::new(0usize);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&inputs(valid, format, limit), |input| {
        let bytes = input.bytes();
        let prepared = setup(bytes);
        let (checked, usage) = measured(|| check(bytes, prepared));
        let bound = AMPLIFY
            .saturating_mul(bytes.len())
            .saturating_add(SLACK)
            .saturating_add(checked.extra);
        if usage.peak > bound || usage.largest > bound {
            return Err(TestCaseError::fail(format!(
                "{name}: {} input bytes ({}) made {usage:?}, over the bound of {bound}",
                bytes.len(),
                checked.outcome
            )));
        }
        // Refused for its size: nothing allocated for its contents (checks may decode a
        // key first).
        if bytes.len() > limit && usage.peak > 4096 {
            return Err(TestCaseError::fail(format!(
                "{name}: an oversized input allocated {usage:?} before it was refused"
            )));
        }
        let beyond = usage.peak.saturating_sub(checked.extra);
        let ratio = beyond as f64 / bytes.len().max(1) as f64;
        if bytes.len() >= 256 && ratio > worst.get().0 {
            worst.set((ratio, beyond, bytes.len()));
        }
        most.set(most.get().max(usage.peak));
        *tally.borrow_mut().entry(checked.outcome).or_default() += 1;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let (ratio, peak, len) = worst.get();
    eprintln!(
        "{name}: {} cases in {:.1} s; {:?}; most allocated at once {} B; largest ratio \
         {ratio:.1} B per input byte ({peak} B for {len} bytes)",
        cases(),
        started.elapsed().as_secs_f64(),
        tally.into_inner(),
        most.get(),
    );
}

/// The outcome label of a wire decode, checking its error is the one its input deserves.
fn label<T>(result: &Result<T, Rejection>, len: usize, limit: usize) -> &'static str {
    match result {
        Ok(_) => "decoded",
        Err(Rejection::Oversized) => {
            assert!(len > limit, "Oversized for {len} of {limit} bytes");
            "oversized"
        }
        Err(Rejection::Malformed) => {
            assert!(
                len <= limit,
                "{len} of {limit} bytes not refused as oversized"
            );
            "malformed"
        }
        Err(other) => panic!("a decode failed with {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Valid frames.

const NOW: u64 = 1_700_000_000_000;
const HOUR: u64 = 60 * 60 * 1000;
const TASK: TaskId = TaskId(0x5eed);
const JOB: JobId = JobId(0x10b);
const ROUND: u32 = 3;

fn keys() -> &'static [Keypair; 3] {
    static KEYS: OnceLock<[Keypair; 3]> = OnceLock::new();
    KEYS.get_or_init(|| std::array::from_fn(|_| Keypair::generate_ed25519()))
}

fn key() -> &'static Keypair {
    &keys()[0]
}

fn signer() -> PeerId {
    key().public().to_peer_id()
}

fn model_id() -> ContentId {
    ContentId::of(b"the model")
}

/// The task every signed result in these tests answers.
fn answered_task() -> TaskRequest {
    TaskRequest {
        id: TASK,
        model: model_id(),
        budget_ms: 1_000,
        input: TaskInput::Embed {
            texts: vec!["the input".into()],
        },
    }
}

fn ascii(max: usize) -> impl Strategy<Value = String> {
    vec(0x20u8..0x7f, 0..=max).prop_map(|b| String::from_utf8(b).expect("ascii"))
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![3 => ascii(max), 1 => vec(any::<char>(), 0..=max / 4).prop_map(String::from_iter)]
}

fn content_id() -> impl Strategy<Value = ContentId> {
    any::<[u8; 32]>().prop_map(ContentId)
}

fn peer() -> impl Strategy<Value = PeerId> {
    (0usize..3).prop_map(|i| keys()[i].public().to_peer_id())
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![4 => -10.0f32..10.0, 1 => any::<f32>()]
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    let offer = (content_id(), text(20), any::<bool>(), ascii(12)).prop_map(
        |(id, name, generation, engine)| ModelOffer {
            id,
            name,
            kind: if generation {
                ModelKind::Generation
            } else {
                ModelKind::Embedding
            },
            engine,
        },
    );
    let power = (
        option::of(any::<bool>()),
        option::of(any::<u8>()),
        option::of(float()),
    )
        .prop_map(|(on_mains, battery_pct, temperature_c)| PowerState {
            on_mains,
            battery_pct,
            temperature_c,
        });
    let dataset =
        (ascii(12), any::<u64>(), content_id()).prop_map(|(tag, samples, digest)| DatasetOffer {
            tag,
            samples,
            digest,
        });
    (
        vec(offer, 0..3),
        (any::<u32>(), any::<u64>(), option::of(ascii(16))),
        (any::<u32>(), prop_oneof![0.0f32..=1.0, any::<f32>()]),
        option::of(power),
        vec(dataset, 0..2),
        (any::<bool>(), option::of(ascii(12))),
    )
        .prop_map(
            |(
                models,
                (cores, memory_bytes, gpu),
                (queue_depth, utilisation),
                power,
                datasets,
                (metered, site),
            )| {
                Capabilities {
                    models,
                    hardware: Hardware {
                        cores,
                        memory_bytes,
                        gpu,
                    },
                    load: Load {
                        queue_depth,
                        utilisation,
                    },
                    power,
                    datasets,
                    metered,
                    site,
                }
            },
        )
}

fn statement() -> impl Strategy<Value = Statement> {
    let times = (0..2 * HOUR, 0..2 * HOUR);
    prop_oneof![
        (
            any::<u64>(),
            times.clone(),
            capabilities(),
            vec(ascii(40), 0..4)
        )
            .prop_map(
                |(seq, (ago, life), capabilities, addrs)| Statement::Announce(Announcement {
                    seq,
                    issued_at: NOW - ago,
                    expires_at: NOW - ago + life,
                    capabilities,
                    addrs,
                    reachability: Default::default(),
                    relay: false,
                    operator: None,
                    full: false,
                })
            ),
        (peer(), any::<u64>(), times, option::of((0usize..3, peer())),).prop_map(
            |(subject, subject_seq, (ago, life), contact)| {
                Statement::Down(DownReport {
                    subject,
                    subject_seq,
                    issued_at: NOW - ago,
                    expires_at: NOW - ago + life,
                    contact: contact
                        .map(|(k, witness)| Contact::sign(&keys()[k], witness, NOW - ago)),
                })
            }
        ),
    ]
}

fn signed_statement() -> impl Strategy<Value = SignedStatement> {
    (statement(), 0usize..3).prop_map(|(s, k)| SignedStatement::sign(&keys()[k], &s))
}

fn shape() -> impl Strategy<Value = Shape> {
    let leaf = prop_oneof![
        Just(Shape::Any),
        Just(Shape::AnyObject),
        Just(Shape::String),
        Just(Shape::Number),
        Just(Shape::Integer),
        Just(Shape::Boolean),
        Just(Shape::Null),
        vec(ascii(6), 0..4).prop_map(Shape::OneOf),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|s| Shape::Array(Box::new(s))),
            vec((ascii(5), inner), 0..4).prop_map(Shape::Object),
        ]
    })
}

fn task_request() -> impl Strategy<Value = TaskRequest> {
    let message = (ascii(10), text(40)).prop_map(|(role, content)| ChatMessage { role, content });
    let params = (
        prop_oneof![0usize..64, any::<usize>()],
        option::of(prop_oneof![0.0f64..2.5, any::<f64>()]),
        option::of(prop_oneof![0.0f64..1.5, any::<f64>()]),
        any::<u64>(),
        vec(ascii(6), 0..6),
        any::<bool>(),
        option::of(any::<u8>()),
        option::of(shape()),
    )
        .prop_map(
            |(max_tokens, temperature, top_p, seed, stop, fit_context, logprobs, format)| {
                GenerateParams {
                    max_tokens,
                    temperature,
                    top_p,
                    seed,
                    stop,
                    fit_context,
                    logprobs,
                    format,
                }
            },
        );
    let input = prop_oneof![
        vec(text(30), 0..5).prop_map(|texts| TaskInput::Embed { texts }),
        (
            vec(message, 0..4),
            params,
            (vec(any::<u32>(), 0..8), any::<u64>())
        )
            .prop_map(
                |(messages, params, (tokens, text_bytes))| TaskInput::Generate {
                    messages,
                    params,
                    resume: Resume { tokens, text_bytes },
                }
            ),
    ];
    (any::<u128>(), content_id(), any::<u64>(), input).prop_map(|(id, model, budget_ms, input)| {
        TaskRequest {
            id: TaskId(id),
            model,
            budget_ms,
            input,
        }
    })
}

fn logprob() -> impl Strategy<Value = Logprob> {
    (any::<u32>(), vec(any::<u8>(), 0..8), float()).prop_map(|(token, bytes, logprob)| Logprob {
        token,
        bytes,
        logprob,
    })
}

fn token_logprobs() -> impl Strategy<Value = Vec<TokenLogprobs>> {
    vec(
        (logprob(), vec(logprob(), 0..4)).prop_map(|(chosen, top)| TokenLogprobs { chosen, top }),
        0..4,
    )
}

fn task_frame() -> impl Strategy<Value = TaskFrame> {
    let output = prop_oneof![
        (1usize..4, 0usize..6, any::<usize>()).prop_map(|(count, dims, tokens)| {
            let vectors: Vec<Vec<f32>> = (0..count)
                .map(|i| (0..dims).map(|j| (i * dims + j) as f32 / 7.0).collect())
                .collect();
            TaskOutput::embeddings(&vectors, tokens)
        }),
        (
            text(40),
            vec(any::<u32>(), 0..8),
            any::<u32>(),
            any::<bool>(),
            token_logprobs(),
            option::of(any::<u32>()),
        )
            .prop_map(|(text, tokens, prompt_tokens, stop, logprobs, counted)| {
                TaskOutput::Generation {
                    text,
                    tokens,
                    prompt_tokens,
                    finish_reason: if stop {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    },
                    logprobs,
                    counted,
                }
            }),
    ];
    let timings = (float(), float(), float()).prop_map(|(q, p, d)| Timings {
        queue_ms: q.into(),
        prefill_ms: p.into(),
        decode_ms: d.into(),
    });
    prop_oneof![
        (text(40), vec(any::<u32>(), 0..8), token_logprobs()).prop_map(
            |(text, tokens, logprobs)| TaskFrame::Chunk {
                text,
                tokens,
                logprobs
            }
        ),
        (output, timings).prop_map(|(output, timings)| TaskFrame::Done(Box::new(
            TaskResult::sign(key(), &answered_task(), "engine/1", output, timings)
        ))),
        prop_oneof![
            any::<u32>().prop_map(|queue| Refusal::Busy { queue }),
            Just(Refusal::UnknownModel),
            text(30).prop_map(Refusal::Invalid),
            text(30).prop_map(Refusal::Failed),
            text(30).prop_map(Refusal::Unavailable),
        ]
        .prop_map(TaskFrame::Refused),
    ]
}

fn outboard() -> impl Strategy<Value = Outboard> {
    (0u64..8 * CHUNK_BYTES, any::<[u8; 32]>()).prop_map(|(size, seed)| {
        let count = chunk_count(size);
        let cvs = if count == 1 {
            Vec::new()
        } else {
            (0..count)
                .map(|i| *blake3::keyed_hash(&seed, &i.to_le_bytes()).as_bytes())
                .collect()
        };
        Outboard::new(size, cvs)
    })
}

fn blob_request() -> impl Strategy<Value = BlobRequest> {
    prop_oneof![
        content_id().prop_map(|id| BlobRequest::Outboard { id }),
        (
            content_id(),
            vec(prop_oneof![0u64..64, any::<u64>()], 0..70)
        )
            .prop_map(|(id, chunks)| BlobRequest::Chunks { id, chunks }),
    ]
}

fn blob_frame() -> impl Strategy<Value = BlobFrame> {
    prop_oneof![
        outboard().prop_map(|o| BlobFrame::Outboard(o.to_bytes())),
        (any::<u64>(), any::<u32>()).prop_map(|(index, len)| BlobFrame::Chunk { index, len }),
        Just(BlobFrame::NotFound),
        text(30).prop_map(BlobFrame::Refused),
    ]
}

fn manifest() -> impl Strategy<Value = Vec<u8>> {
    let part = vec(prop_oneof![b'a'..=b'z', Just(b'.'), Just(b'-')], 1..8)
        .prop_map(|p| String::from_utf8(p).expect("ascii"));
    let path = vec(part, 1..4).prop_map(|parts| parts.join("/"));
    vec((path, content_id()), 0..6).prop_map(|files| {
        let mut entries: Vec<ManifestEntry> = files
            .into_iter()
            .filter(|(path, _)| blob::safe_path(path))
            .map(|(path, id)| ManifestEntry { path, id })
            .collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        encode_manifest(&entries)
    })
}

fn model_spec() -> impl Strategy<Value = ModelSpec> {
    prop_oneof![
        (0usize..40, 0usize..10)
            .prop_map(|(inputs, classes)| ModelSpec::Logistic { inputs, classes }),
        vec(mostly(1usize..20, any::<usize>()), 0..5).prop_map(|layers| ModelSpec::Mlp { layers }),
        (
            mostly((1usize..8).prop_map(|h| 2 * h), 0usize..300),
            0usize..6,
            0usize..10
        )
            .prop_map(|(side, channels, classes)| ModelSpec::Cnn {
                side,
                channels,
                classes
            }),
    ]
}

/// `n` values from `seed`, one of them replaced by `special` (a NaN, say) if given.
fn values(n: usize, seed: u64, special: Option<(Index, f32)>) -> Vec<f32> {
    let mut state = seed | 1;
    let mut out: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f32 / 100.0 - 10.0
        })
        .collect();
    if let Some((at, value)) = special {
        if n > 0 {
            out[at.index(n)] = value;
        }
    }
    out
}

/// A payload of `n` values (or of a wrong length, sometimes).
fn payload(n: usize) -> impl Strategy<Value = Payload> {
    let n = n.min(1024);
    let special = option::weighted(0.2, (any::<Index>(), any::<f32>()));
    (
        0usize..3,
        (any::<u64>(), special),
        any::<bool>(),
        0.0f64..1.0,
    )
        .prop_map(move |(kind, (seed, special), wrong, fraction)| {
            let values = values(n, seed, special);
            let values = if wrong { &values[..n / 2] } else { &values[..] };
            match kind {
                0 => Payload::dense(values),
                1 => Payload::Sparse(fl_topk(values, fraction)),
                _ => Payload::Int8(Int8::compress(values)),
            }
        })
}

fn fl_topk(values: &[f32], fraction: f64) -> Sparse {
    mycel_core::compress::TopK::default().compress(values, fraction)
}

/// Mostly values a check accepts, sometimes anything.
fn mostly<T: std::fmt::Debug + Clone + 'static>(
    good: impl Strategy<Value = T> + 'static,
    any: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![6 => good, 1 => any].boxed()
}

fn local_training() -> impl Strategy<Value = LocalTraining> {
    (
        mostly(1u32..5, any::<u32>()),
        mostly(1u32..64, any::<u32>()),
        mostly(0.001f32..1.0, any::<f32>()),
        mostly(0.0f32..0.99, any::<f32>()),
        mostly(0.0f32..10.0, any::<f32>()),
    )
        .prop_map(|(epochs, batch, lr, momentum, prox)| LocalTraining {
            epochs,
            batch,
            lr,
            momentum,
            prox,
        })
}

fn aggregator() -> impl Strategy<Value = AggregatorSpec> {
    let iqr = option::of(mostly(0.5f64..3.0, any::<f64>()));
    prop_oneof![
        iqr.clone().prop_map(|iqr| AggregatorSpec::Fedavg { iqr }),
        iqr.clone().prop_map(|iqr| AggregatorSpec::Median { iqr }),
        (mostly(0.0f64..0.5, any::<f64>()), iqr.clone())
            .prop_map(|(beta, iqr)| AggregatorSpec::TrimmedMean { beta, iqr }),
        (0usize..300, iqr.clone()).prop_map(|(f, iqr)| AggregatorSpec::Krum { f, iqr }),
        (0usize..300, 0usize..300, iqr).prop_map(|(f, m, iqr)| AggregatorSpec::MultiKrum {
            f,
            m,
            iqr
        }),
    ]
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        mostly(0.01f64..1.0, any::<f64>()).prop_map(|fraction| Compression::TopK { fraction }),
        Just(Compression::Int8),
    ]
}

fn train_request() -> impl Strategy<Value = TrainRequest> {
    let member = || (peer(), vec(ascii(30), 0..3)).prop_map(|(peer, addrs)| Member { peer, addrs });
    model_spec().prop_flat_map(move |model| {
        let parameters = model.parameters();
        (
            (any::<u128>(), any::<u32>(), ascii(12), payload(parameters)),
            (
                local_training(),
                compression(),
                any::<u64>(),
                mostly(1u64..3_600_000, any::<u64>()),
            ),
            (vec(member(), 0..3), aggregator(), secure_setup()),
        )
            .prop_map(
                move |(
                    (job, round, dataset, weights),
                    (train, compression, seed, deadline_ms),
                    (members, aggregator, secure),
                )| {
                    TrainRequest {
                        job: JobId(job),
                        round,
                        model: model.clone(),
                        dataset,
                        weights,
                        train,
                        compression,
                        seed,
                        deadline_ms,
                        members,
                        aggregator,
                        ticket: None,
                        secure,
                    }
                },
            )
    })
}

fn secure_setup() -> impl Strategy<Value = Option<Setup>> {
    option::of(
        (
            vec(peer(), 0..4),
            mostly(1u32..4, any::<u32>()),
            any::<u64>(),
        )
            .prop_map(|(peers, threshold, scale)| {
                let mut setup = Setup::new(&peers, 0.5, scale);
                setup.threshold = threshold;
                setup
            }),
    )
}

/// One securely aggregated round of the three test keys, run once: what each step sends,
/// and the coordinator's state before each kind of message. Participant 0's secrets come
/// from a fixed seed, so a case can make the same participant 0 again.
struct SecureRound {
    setup: Setup,
    keys: Vec<Keys>,
    sealed: Vec<Vec<Sealed>>,
    masked: Vec<Masked>,
    confirmations: Vec<ByteBuf>,
    unmasking: ToParticipant,
    reveals: Vec<Reveal>,
    /// Before any keys; with all keys; with all shares; with every masked update; with
    /// every signature on the senders list.
    coordinators: [secround::Coordinator; 5],
}

const SECURE_VALUES: usize = 3;

fn first_participant(setup: &Setup) -> (Participant, Keys) {
    Participant::new(key(), JOB, ROUND, setup, &mut secround::secret_rng([7; 32])).unwrap()
}

fn secure_round() -> &'static SecureRound {
    static ROUND_RUN: OnceLock<SecureRound> = OnceLock::new();
    ROUND_RUN.get_or_init(|| {
        let peers: Vec<PeerId> = keys().iter().map(|k| k.public().to_peer_id()).collect();
        let setup = Setup::new(&peers, 0.5, 100);
        let mut parts = vec![first_participant(&setup)];
        for (i, k) in keys().iter().enumerate().skip(1) {
            let rng = &mut secround::secret_rng([i as u8; 32]);
            parts.push(Participant::new(k, JOB, ROUND, &setup, rng).unwrap());
        }
        let mut c = secround::Coordinator::new(JOB, ROUND, &setup, SECURE_VALUES).unwrap();
        let empty = c.clone();
        for (i, (_, k)) in parts.iter().enumerate() {
            c.keys(i, k.clone()).unwrap();
        }
        let keyed = c.clone();
        let keys: Vec<Keys> = parts.iter().map(|(_, k)| k.clone()).collect();
        let roster = c.roster().unwrap();
        let mut sealed = Vec::new();
        for (i, (p, _)) in parts.iter_mut().enumerate() {
            let s = p
                .share(&roster, &mut secround::secret_rng([8 + i as u8; 32]))
                .unwrap();
            c.shares(i, s.clone()).unwrap();
            sealed.push(s);
        }
        let shared = c.clone();
        let mut masked = Vec::new();
        for (i, (p, _)) in parts.iter_mut().enumerate() {
            let values = secround::pack(&[0.5; SECURE_VALUES], 10, 0.1, 100);
            let m = p
                .mask(&c.inbox(i), &values, 10, ContentId([i as u8; 32]))
                .unwrap();
            c.masked(i, m.clone()).unwrap();
            masked.push(m);
        }
        let senders = c.senders().unwrap();
        let all_masked = c.clone();
        let mut confirmations = Vec::new();
        for (i, (p, _)) in parts.iter_mut().enumerate() {
            let signature = p.confirm(&self::keys()[i], &senders).unwrap();
            c.confirmed(i, signature.clone()).unwrap();
            confirmations.push(signature);
        }
        let unmasking = c.unmasking().unwrap();
        let ToParticipant::Unmask {
            senders,
            signatures,
        } = &unmasking
        else {
            unreachable!()
        };
        let reveals = parts
            .iter_mut()
            .map(|(p, _)| p.reveal(senders, signatures).unwrap())
            .collect();
        SecureRound {
            setup,
            keys,
            sealed,
            masked,
            confirmations,
            reveals,
            unmasking,
            coordinators: [empty, keyed, shared, all_masked, c],
        }
    })
}

/// The shares sealed for participant 0 in the round.
fn first_inbox() -> Vec<Sealed> {
    secure_round()
        .sealed
        .iter()
        .flatten()
        .filter(|s| s.to == 0)
        .cloned()
        .collect()
}

fn to_participant() -> impl Strategy<Value = ToParticipant> {
    let round = secure_round();
    prop_oneof![
        proptest::sample::subsequence(round.keys.clone(), 0..=3).prop_map(ToParticipant::Roster),
        proptest::sample::subsequence(first_inbox(), 0..=2).prop_map(ToParticipant::Inbox),
        vec(mostly(0u32..3, any::<u32>()), 0..5).prop_map(ToParticipant::Confirm),
        Just(round.unmasking.clone()),
    ]
}

fn from_participant() -> impl Strategy<Value = FromParticipant> {
    let round = secure_round();
    prop_oneof![
        proptest::sample::select(round.keys.clone()).prop_map(FromParticipant::Keys),
        proptest::sample::select(round.sealed.clone()).prop_map(FromParticipant::Shares),
        proptest::sample::select(round.masked.clone()).prop_map(FromParticipant::Masked),
        proptest::sample::select(round.confirmations.clone()).prop_map(FromParticipant::Confirmed),
        (0u32..4).prop_map(|from| FromParticipant::Unopened { from }),
        proptest::sample::select(round.reveals.clone()).prop_map(FromParticipant::Reveal),
        text(30).prop_map(FromParticipant::Refused),
    ]
}

fn gathered() -> impl Strategy<Value = Gathered> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(bytes_up, bytes_down, asked, dropped, rejected)| Gathered {
                bytes_up,
                bytes_down,
                asked,
                dropped,
                rejected,
            },
        )
}

fn signed_update() -> impl Strategy<Value = SignedUpdate> {
    (0usize..300).prop_flat_map(|n| {
        (payload(n), any::<u64>(), float(), content_id(), 0u32..4).prop_map(
            |(payload, samples, loss, data, contributors)| {
                SignedUpdate::sign(
                    key(),
                    JOB,
                    ROUND,
                    samples,
                    loss,
                    data,
                    contributors,
                    payload,
                )
            },
        )
    })
}

fn train_reply() -> impl Strategy<Value = TrainReply> {
    prop_oneof![
        4 => (signed_update(), gathered()).prop_map(|(update, gathered)| TrainReply::Update { update, gathered }),
        1 => text(30).prop_map(TrainReply::Refused),
    ]
}

fn encoded<T: Serialize + std::fmt::Debug>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Vec<u8>> {
    s.prop_map(|v| wire::encode(&v)).boxed()
}

// ---------------------------------------------------------------------------------------------
// The checks a receiver runs on what decoded.

/// What a node does with a statement from gossip or a sync response.
fn receive_statement(signed: &SignedStatement, local: PeerId) -> &'static str {
    let _ = signed.peek();
    for now in [0, u64::MAX] {
        let _ = signed.verify(now);
    }
    let mut membership = Membership::new(local, MembershipConfig::default());
    match membership.on_statement(signed, NOW).map_err(|r| r.reason) {
        Ok(_) => "accepted",
        Err(Rejection::BadSignature) => "bad signature",
        Err(Rejection::Malformed) => "body malformed",
        Err(_) => "refused",
    }
}

/// The values a payload decodes to for a model of the size it claims (clamped to what a
/// model may have), and what that may allocate.
fn open_payload(payload: &Payload) -> Checked {
    let claimed = match payload {
        Payload::Dense(bytes) => bytes.len() / 4,
        Payload::Sparse(s) => usize::try_from(s.len).unwrap_or(usize::MAX),
        Payload::Int8(q) => usize::try_from(q.len).unwrap_or(usize::MAX),
    };
    let parameters = claimed.min(MAX_PARAMETERS);
    let _ = payload.decode(7);
    let outcome = match payload.decode(parameters) {
        Ok(_) => "payload decoded",
        Err(_) => "payload refused",
    };
    Checked {
        outcome,
        extra: 4 * parameters,
    }
}

// ---------------------------------------------------------------------------------------------
// The decoders.

#[test]
fn signed_statements_from_gossip() {
    let local = PeerId::random();
    fuzz(
        "SignedStatement",
        MAX_STATEMENT_BYTES,
        Format::Cbor,
        signed_statement().prop_map(|s| s.to_bytes()).boxed(),
        |bytes| {
            let decoded = SignedStatement::from_bytes(bytes);
            let outcome = label(&decoded, bytes.len(), MAX_STATEMENT_BYTES);
            match decoded {
                Ok(signed) => receive_statement(&signed, local).into(),
                Err(_) => outcome.into(),
            }
        },
    );
}

#[test]
fn statement_bodies_with_good_signatures() {
    // The body is mutated before it is signed, so the statement decoder and the checks after
    // the signature see every mutation.
    let local = PeerId::random();
    fuzz_with(
        "Statement (signed body)",
        MAX_STATEMENT_BYTES,
        Format::Cbor,
        encoded(statement()),
        |bytes| sign_body(key(), bytes.to_vec()),
        |_, signed| {
            let direct = wire::decode::<Statement>(&signed.body, MAX_STATEMENT_BYTES);
            label(&direct, signed.body.len(), MAX_STATEMENT_BYTES);
            receive_statement(&signed, local).into()
        },
    );
}

/// A statement whose body is `body`, whatever it holds, signed by `key`.
fn sign_body(key: &Keypair, body: Vec<u8>) -> SignedStatement {
    let mut input = b"mycel/statement/v1\0".to_vec();
    input.extend_from_slice(&body);
    SignedStatement {
        signature: key.sign(&input).expect("ed25519 signs"),
        public_key: key.public().encode_protobuf(),
        body,
    }
}

#[test]
fn task_requests() {
    fuzz(
        "TaskRequest",
        task::MAX_REQUEST_BYTES,
        Format::Cbor,
        encoded(task_request()),
        |bytes| {
            let request = wire::decode::<TaskRequest>(bytes, task::MAX_REQUEST_BYTES);
            let outcome = label(&request, bytes.len(), task::MAX_REQUEST_BYTES);
            match request {
                Ok(r) if r.check().is_ok() => "checked",
                Ok(_) => "refused by check",
                Err(_) => outcome,
            }
            .into()
        },
    );
}

#[test]
fn task_frames() {
    let worker = signer();
    fuzz(
        "TaskFrame",
        task::MAX_FRAME_BYTES,
        Format::Cbor,
        encoded(task_frame()),
        |bytes| {
            let frame = wire::decode::<TaskFrame>(bytes, task::MAX_FRAME_BYTES);
            let outcome = label(&frame, bytes.len(), task::MAX_FRAME_BYTES);
            match frame {
                Ok(TaskFrame::Done(result)) => {
                    for count in [1, 2, 3, task::MAX_EMBED_INPUTS] {
                        let _ = result.output.vectors(count);
                    }
                    match result.verify(&worker, &answered_task()) {
                        Ok(_) => "result verified",
                        Err(_) => "result refused",
                    }
                }
                Ok(TaskFrame::Refused(refusal)) => {
                    let _ = (refusal.retry_elsewhere(), refusal.to_string());
                    "refusal"
                }
                Ok(TaskFrame::Chunk { .. }) => "chunk",
                Err(_) => outcome,
            }
            .into()
        },
    );
}

#[test]
fn blob_requests() {
    fuzz(
        "BlobRequest",
        MAX_BLOB_REQUEST_BYTES,
        Format::Cbor,
        encoded(blob_request()),
        |bytes| {
            let request = wire::decode::<BlobRequest>(bytes, MAX_BLOB_REQUEST_BYTES);
            let outcome = label(&request, bytes.len(), MAX_BLOB_REQUEST_BYTES);
            match request {
                Ok(r) if r.check().is_ok() => "checked",
                Ok(_) => "refused by check",
                Err(_) => outcome,
            }
            .into()
        },
    );
}

/// What a fetcher does with an outboard a peer sent for `id`.
fn receive_outboard(bytes: &[u8], id: &ContentId) -> &'static str {
    let Ok(outboard) = Outboard::from_bytes(bytes) else {
        return "outboard refused";
    };
    let _ = outboard.verify(id);
    let count = outboard.chunks();
    for index in [0, 1, count.saturating_sub(1), count, u64::MAX] {
        let _ = chunk_len(outboard.size, index);
        let _ = outboard.verify_chunk(id, index, &[]);
        let _ = outboard.verify_chunk(id, index, &bytes[..bytes.len().min(1024)]);
    }
    "outboard read"
}

#[test]
fn blob_frames() {
    let id = ContentId::of(b"a blob");
    fuzz(
        "BlobFrame",
        MAX_BLOB_FRAME_BYTES,
        Format::Cbor,
        encoded(blob_frame()),
        |bytes| {
            let frame = wire::decode::<BlobFrame>(bytes, MAX_BLOB_FRAME_BYTES);
            let outcome = label(&frame, bytes.len(), MAX_BLOB_FRAME_BYTES);
            match frame {
                Ok(BlobFrame::Outboard(outboard)) => receive_outboard(&outboard, &id),
                Ok(BlobFrame::Chunk { index, len }) => {
                    let _ = (u64::from(len) <= CHUNK_BYTES, chunk_len(u64::MAX, index));
                    "chunk"
                }
                Ok(_) => "decoded",
                Err(_) => outcome,
            }
            .into()
        },
    );
}

#[test]
fn outboards() {
    let id = ContentId::of(b"a blob");
    fuzz(
        "Outboard",
        MAX_BLOB_FRAME_BYTES,
        Format::Raw,
        outboard().prop_map(|o| o.to_bytes()).boxed(),
        |bytes| receive_outboard(bytes, &id).into(),
    );
}

#[test]
fn manifests() {
    // Manifest blobs are verified against their id before they are read, but the id came
    // from whoever named the directory.
    const MAX_MANIFEST_BYTES: usize = 16 << 20;
    fuzz(
        "manifest",
        MAX_MANIFEST_BYTES,
        Format::Raw,
        manifest().boxed(),
        |bytes| {
            {
                match decode_manifest(bytes) {
                    Ok(_) => "decoded",
                    Err(_) => "refused",
                }
                .into()
            }
        },
    );
}

#[test]
fn train_requests() {
    fuzz(
        "TrainRequest",
        fl::MAX_REQUEST_BYTES,
        Format::Cbor,
        encoded(train_request()),
        |bytes| {
            {
                let request = wire::decode::<TrainRequest>(bytes, fl::MAX_REQUEST_BYTES);
                let outcome = label(&request, bytes.len(), fl::MAX_REQUEST_BYTES);
                let Ok(request) = request else {
                    return outcome.into();
                };
                // What a participant computes before and after its check.
                let _ = (request.model.widths(), request.model.io());
                let parameters = request.model.parameters();
                if request.check().is_err() {
                    return "refused by check".into();
                }
                let _ = request.model.shapes();
                let outcome = match request.weights.decode(parameters) {
                    Ok(_) => "weights decoded",
                    Err(_) => "weights refused",
                };
                Checked {
                    outcome,
                    extra: 4 * parameters,
                }
            }
        },
    );
}

/// How a secure round's state machine took a decoded step.
fn round_outcome(result: Result<(), secround::RoundError>) -> Checked {
    match result {
        Ok(()) => "accepted",
        Err(_) => "refused by the round",
    }
    .into()
}

#[test]
fn secure_round_steps_to_a_participant() {
    let round = secure_round();
    let values = secround::pack(&[0.5; SECURE_VALUES], 10, 0.1, 100);
    fuzz_with(
        "ToParticipant",
        secround::MAX_STEP_BYTES,
        Format::Cbor,
        encoded(to_participant()),
        // Participant 0 again, fresh and past each step, made outside the count.
        |_| {
            let fresh = first_participant(&round.setup).0;
            let mut shared = first_participant(&round.setup).0;
            let rng = &mut secround::secret_rng([8; 32]);
            shared.share(&round.keys, rng).unwrap();
            let mut masked = first_participant(&round.setup).0;
            masked.share(&round.keys, rng).unwrap();
            masked
                .mask(&first_inbox(), &values, 10, ContentId([0; 32]))
                .unwrap();
            let mut confirmed = first_participant(&round.setup).0;
            confirmed.share(&round.keys, rng).unwrap();
            confirmed
                .mask(&first_inbox(), &values, 10, ContentId([0; 32]))
                .unwrap();
            confirmed.confirm(key(), &[0, 1, 2]).unwrap();
            (fresh, shared, masked, confirmed)
        },
        |bytes, (mut fresh, mut shared, mut masked, mut confirmed)| {
            let step = wire::decode::<ToParticipant>(bytes, secround::MAX_STEP_BYTES);
            let outcome = label(&step, bytes.len(), secround::MAX_STEP_BYTES);
            let result = match step {
                Ok(ToParticipant::Roster(roster)) => fresh
                    .share(&roster, &mut secround::secret_rng([8; 32]))
                    .map(drop),
                Ok(ToParticipant::Inbox(inbox)) => shared
                    .mask(&inbox, &values, 10, ContentId([0; 32]))
                    .map(drop),
                Ok(ToParticipant::Confirm(senders)) => masked.confirm(key(), &senders).map(drop),
                Ok(ToParticipant::Unmask {
                    senders,
                    signatures,
                }) => confirmed.reveal(&senders, &signatures).map(drop),
                Err(_) => return outcome.into(),
            };
            round_outcome(result)
        },
    );
}

#[test]
fn secure_round_steps_from_a_participant() {
    let round = secure_round();
    fuzz_with(
        "FromParticipant",
        MAX_UPDATE_BYTES,
        Format::Cbor,
        encoded(from_participant()),
        |_| round.coordinators.clone(),
        |bytes, [mut empty, mut keyed, mut shared, mut masked, mut confirmed]| {
            let reply = wire::decode::<FromParticipant>(bytes, MAX_UPDATE_BYTES);
            let outcome = label(&reply, bytes.len(), MAX_UPDATE_BYTES);
            let result = match reply {
                Ok(FromParticipant::Keys(keys)) => empty.keys(keys.index as usize, keys),
                Ok(FromParticipant::Shares(sealed)) => {
                    let from = sealed.first().map_or(0, |s| s.from as usize);
                    // Again from one that shared: refused; where it has not yet: checked.
                    let _ = shared.shares(from, sealed.clone());
                    keyed.shares(from, sealed)
                }
                Ok(FromParticipant::Masked(m)) => shared.masked(m.index as usize, m),
                Ok(FromParticipant::Confirmed(signature)) => masked.confirmed(0, signature),
                Ok(FromParticipant::Unopened { from }) => shared.unopened(0, from),
                Ok(FromParticipant::Reveal(reveal)) => confirmed
                    .reveal(0, reveal)
                    .and_then(|()| confirmed.finish().map(drop)),
                Ok(FromParticipant::Refused(_)) => return "refused".into(),
                Err(_) => return outcome.into(),
            };
            round_outcome(result)
        },
    );
}

#[test]
fn train_replies() {
    let participant = signer();
    fuzz(
        "TrainReply",
        MAX_UPDATE_BYTES,
        Format::Cbor,
        encoded(train_reply()),
        |bytes| {
            let reply = wire::decode::<TrainReply>(bytes, MAX_UPDATE_BYTES);
            let outcome = label(&reply, bytes.len(), MAX_UPDATE_BYTES);
            match reply {
                Ok(TrainReply::Update { update, gathered }) => {
                    let mut total = Gathered::default();
                    total.add(&gathered.capped(4));
                    total.add(&gathered);
                    let _ = update.open(&participant, JOB, ROUND, 300);
                    open_payload(&update.payload)
                }
                Ok(TrainReply::Refused(_)) => "refused".into(),
                Err(_) => outcome.into(),
            }
        },
    );
}

#[test]
fn update_payloads_with_good_signatures() {
    // The payload is mutated before the update is signed, so `open` gets past the signature.
    let participant = signer();
    fuzz_with(
        "SignedUpdate (signed payload)",
        MAX_UPDATE_BYTES,
        Format::Cbor,
        encoded((0usize..300).prop_flat_map(payload)),
        |bytes| {
            wire::decode::<Payload>(bytes, MAX_UPDATE_BYTES)
                .ok()
                .map(|payload| {
                    let data = ContentId::of(b"data");
                    SignedUpdate::sign(key(), JOB, ROUND, 10, 0.5, data, 1, payload)
                })
        },
        |_, update| {
            let Some(update) = update else {
                return "payload malformed".into();
            };
            let parameters = match &update.payload {
                Payload::Dense(b) => b.len() / 4,
                Payload::Sparse(s) => s.len.min(MAX_PARAMETERS as u64) as usize,
                Payload::Int8(q) => q.len.min(MAX_PARAMETERS as u64) as usize,
            };
            let outcome = match update.open(&participant, JOB, ROUND, parameters) {
                Ok(_) => "opened",
                Err(Rejection::Malformed) => "malformed",
                Err(_) => "refused",
            };
            Checked {
                outcome,
                extra: 4 * parameters,
            }
        },
    );
}

#[test]
fn compressed_payloads_as_values() {
    // Sparse and int8 payloads built field by field, with none of the encoder's invariants.
    let sparse = (
        prop_oneof![0u64..64, any::<u64>()],
        vec(prop_oneof![0u32..64, any::<u32>()], 0..16),
        vec(float(), 0..16),
    )
        .prop_map(|(len, indices, values)| {
            Payload::Sparse(Sparse {
                len,
                indices,
                values,
            })
        });
    let int8 = (
        prop_oneof![0u64..600, any::<u64>()],
        vec(float(), 0..4),
        vec(any::<u8>(), 0..600),
    )
        .prop_map(|(len, scales, values)| {
            Payload::Int8(Quantised {
                len,
                scales,
                values,
            })
        });
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (prop_oneof![sparse, int8], 0usize..700);
    let result = runner.run(&strategy, |(payload, expected)| {
        let (_, usage) = measured(|| {
            let _ = payload.decode(expected);
            open_payload(&payload)
        });
        let bound = SLACK + 8 * expected.max(MAX_PARAMETERS.min(payload_len(&payload)));
        prop_assert!(usage.largest <= bound, "{usage:?}");
        Ok(())
    });
    if let Err(e) = result {
        panic!("compressed payloads: {e}");
    }
}

fn payload_len(payload: &Payload) -> usize {
    match payload {
        Payload::Dense(b) => b.len(),
        Payload::Sparse(s) => s.len as usize,
        Payload::Int8(q) => q.len as usize,
    }
}

// The request and response of `/mycel/sync/4`, as mycel-net's `protocol.rs` defines them (its
// types are private to that crate; the serde shapes here must stay the same), decoded with
// `wire::decode` as its codec does, at its default limits (`NetConfig`).

const MAX_SYNC_REQUEST_BYTES: usize = 1 << 20;
const MAX_SYNC_RESPONSE_BYTES: usize = 4 << 20;
const MAX_SYNC_STATEMENTS: usize = 2_000;
const MAX_DIGEST_ENTRIES: usize = 20_000;
const MAX_ECHO_BYTES: usize = 64 * 1024;
const MAX_REFERRALS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DigestEntry {
    #[serde(with = "serde_bytes")]
    peer: Vec<u8>,
    seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum SyncRequest {
    Digest(Vec<DigestEntry>),
    Summary(#[serde(with = "serde_bytes")] Vec<u8>),
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    Goodbye(Vec<SignedStatement>),
    Contact,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum SyncResponse {
    Statements(Vec<SignedStatement>),
    InSync,
    Differs,
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    Contact(Contact),
    Refused,
}

#[test]
fn sync_requests() {
    let local = PeerId::random();
    let digest_entry = (peer(), any::<u64>()).prop_map(|(p, seq)| DigestEntry {
        peer: p.to_bytes(),
        seq,
    });
    let request = prop_oneof![
        vec(digest_entry, 0..6).prop_map(SyncRequest::Digest),
        vec(any::<u8>(), 30..34).prop_map(SyncRequest::Summary),
        vec(any::<u8>(), 0..64).prop_map(SyncRequest::Echo),
        vec(signed_statement(), 0..3).prop_map(SyncRequest::Goodbye),
        Just(SyncRequest::Contact),
    ];
    fuzz(
        "SyncRequest",
        MAX_SYNC_REQUEST_BYTES,
        Format::Cbor,
        encoded(request),
        |bytes| {
            {
                let request = wire::decode::<SyncRequest>(bytes, MAX_SYNC_REQUEST_BYTES);
                let outcome = label(&request, bytes.len(), MAX_SYNC_REQUEST_BYTES);
                // What the event loop answers with.
                match request {
                    Ok(SyncRequest::Digest(entries)) if entries.len() <= MAX_DIGEST_ENTRIES => {
                        let digest: Vec<(PeerId, u64)> = entries
                            .iter()
                            .filter_map(|e| PeerId::from_bytes(&e.peer).ok().map(|p| (p, e.seq)))
                            .collect();
                        let membership = Membership::new(local, MembershipConfig::default());
                        let _ = membership.newer_than(&digest, MAX_SYNC_STATEMENTS);
                        "digest"
                    }
                    Ok(SyncRequest::Summary(s)) if s.len() == 32 => "summary",
                    Ok(SyncRequest::Contact) => "contact",
                    Ok(SyncRequest::Echo(p)) if p.len() <= MAX_ECHO_BYTES => "echo",
                    Ok(SyncRequest::Goodbye(s)) if s.len() <= MAX_REFERRALS => {
                        for signed in &s {
                            receive_statement(signed, local);
                        }
                        "goodbye"
                    }
                    Ok(_) => "refused",
                    Err(_) => outcome,
                }
                .into()
            }
        },
    );
}

#[test]
fn sync_responses() {
    let local = PeerId::random();
    let response = prop_oneof![
        vec(signed_statement(), 0..3).prop_map(SyncResponse::Statements),
        Just(SyncResponse::InSync),
        Just(SyncResponse::Differs),
        vec(any::<u8>(), 0..64).prop_map(SyncResponse::Echo),
        (0usize..3, peer(), any::<u64>()).prop_map(|(k, witness, at)| SyncResponse::Contact(
            Contact::sign(&keys()[k], witness, at)
        )),
        Just(SyncResponse::Refused),
    ];
    fuzz(
        "SyncResponse",
        MAX_SYNC_RESPONSE_BYTES,
        Format::Cbor,
        encoded(response),
        |bytes| {
            let response = wire::decode::<SyncResponse>(bytes, MAX_SYNC_RESPONSE_BYTES);
            let outcome = label(&response, bytes.len(), MAX_SYNC_RESPONSE_BYTES);
            match response {
                Ok(SyncResponse::Statements(s)) if s.len() <= MAX_SYNC_STATEMENTS => {
                    for signed in &s {
                        receive_statement(signed, local);
                    }
                    "statements"
                }
                Ok(SyncResponse::Contact(contact)) => {
                    // What the event loop does with it.
                    let mut membership = Membership::new(local, MembershipConfig::default());
                    let _ = membership.on_contact(PeerId::random(), contact, NOW);
                    "contact"
                }
                Ok(_) => "decoded",
                Err(_) => outcome,
            }
            .into()
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Limits and regressions.

#[test]
fn every_decoder_refuses_a_frame_one_byte_past_its_limit_before_allocating() {
    fn at_limit<T: serde::de::DeserializeOwned>(limit: usize) {
        let over = &noise()[..limit + 1];
        let (result, usage) = measured(|| wire::decode::<T>(over, limit).err());
        assert_eq!(result, Some(Rejection::Oversized));
        assert_eq!(usage.peak, 0, "{usage:?}");
        // Exactly at the limit it is parsed (and, being noise, refused as malformed).
        let (result, _) = measured(|| wire::decode::<T>(&noise()[..limit], limit).err());
        assert_eq!(result, Some(Rejection::Malformed));
    }
    at_limit::<SignedStatement>(MAX_STATEMENT_BYTES);
    at_limit::<Statement>(MAX_STATEMENT_BYTES);
    at_limit::<TaskRequest>(task::MAX_REQUEST_BYTES);
    at_limit::<TaskFrame>(task::MAX_FRAME_BYTES);
    at_limit::<BlobRequest>(MAX_BLOB_REQUEST_BYTES);
    at_limit::<BlobFrame>(MAX_BLOB_FRAME_BYTES);
    at_limit::<TrainRequest>(fl::MAX_REQUEST_BYTES);
    at_limit::<TrainReply>(MAX_UPDATE_BYTES);
    at_limit::<ToParticipant>(secround::MAX_STEP_BYTES);
    at_limit::<FromParticipant>(MAX_UPDATE_BYTES);
    at_limit::<SyncRequest>(MAX_SYNC_REQUEST_BYTES);
    at_limit::<SyncResponse>(MAX_SYNC_RESPONSE_BYTES);
}

#[test]
fn a_frame_filling_its_limit_decodes_within_the_bound() {
    // A valid training request of almost 64 MiB of dense weights.
    let values = vec![0.25f32; (fl::MAX_REQUEST_BYTES - 1024) / 4];
    let request = TrainRequest {
        job: JOB,
        round: ROUND,
        model: ModelSpec::Logistic {
            inputs: values.len() - 1,
            classes: 1,
        },
        dataset: "d".into(),
        weights: Payload::dense(&values),
        train: LocalTraining {
            epochs: 1,
            batch: 1,
            lr: 0.1,
            momentum: 0.0,
            prox: 0.0,
        },
        compression: Compression::None,
        seed: 0,
        deadline_ms: 1000,
        members: Vec::new(),
        aggregator: AggregatorSpec::default(),
        ticket: None,
        secure: None,
    };
    let bytes = wire::encode(&request);
    assert!(bytes.len() <= fl::MAX_REQUEST_BYTES);
    let (back, usage) = measured(|| wire::decode::<TrainRequest>(&bytes, fl::MAX_REQUEST_BYTES));
    assert_eq!(back.unwrap(), request);
    // The weights' buffer grows by doubling up to 64 MiB: its last move holds both blocks.
    assert!(usage.peak <= 2 * bytes.len() + SLACK, "{usage:?}");
}

/// The bytes of a signed announcement whose address list claims `claimed` entries (the
/// header only: the entries are not there).
fn announcement_claiming_addrs(claimed: u32) -> SignedStatement {
    let statement = Statement::Announce(Announcement {
        seq: 1,
        issued_at: NOW,
        expires_at: NOW + 1000,
        capabilities: Capabilities::default(),
        addrs: vec!["/ip4/1.2.3.4/tcp/1".into()],
        reachability: Default::default(),
        relay: false,
        operator: None,
        full: false,
    });
    let mut body = wire::encode(&statement);
    let key_at = body
        .windows(6)
        .position(|w| w == b"\x65addrs")
        .expect("the addrs key");
    body.truncate(key_at + 6);
    body.push(0x9a);
    body.extend_from_slice(&claimed.to_be_bytes());
    sign_body(key(), body)
}

#[test]
fn a_header_claiming_a_huge_collection_reserves_little() {
    // Regression: serde reserves room for what a header claims, up to 1 MiB per collection,
    // so a 60-byte statement made its receiver allocate a megabyte (16 KiB frame limit).
    let signed = announcement_claiming_addrs(u32::MAX);
    let len = signed.to_bytes().len();
    let local = PeerId::random();
    let (outcome, usage) = measured(|| receive_statement(&signed, local));
    assert_eq!(outcome, "body malformed");
    assert!(usage.largest < 8 << 10, "{len} bytes made {usage:?}");

    for huge in [
        &[0x9a, 0xff, 0xff, 0xff, 0xff][..],
        &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        &[0xba, 0xff, 0xff, 0xff, 0xff],
    ] {
        let (result, usage) = measured(|| {
            (
                wire::decode::<Vec<String>>(huge, 100).is_err(),
                wire::decode::<Vec<ModelOffer>>(huge, 100).is_err(),
                wire::decode::<BTreeMap<String, u64>>(huge, 100).is_err(),
                wire::decode::<ModelSpec>(huge, 100).is_err(),
                wire::decode::<SyncResponse>(huge, 100).is_err(),
            )
        });
        assert_eq!(result, (true, true, true, true, true));
        assert!(usage.largest < 8 << 10, "{usage:?}");
    }
    // The cap is a hint only: long collections still decode whole.
    let long: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    assert_eq!(
        wire::decode::<Vec<String>>(&wire::encode(&long), 1 << 20).unwrap(),
        long
    );
}

#[test]
fn deep_nesting_is_refused_without_exhausting_the_stack() {
    // Arrays in arrays where the decoder reads any value: an unknown field (skipped), a
    // field of an internally tagged enum (buffered); on a small stack.
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(|| {
            let mut deep = vec![0x81u8; 100_000];
            deep.push(0);
            let mut unknown = vec![0xa1, 0x61, b'x'];
            unknown.extend_from_slice(&deep);
            assert_eq!(
                wire::decode::<TrainRequest>(&unknown, fl::MAX_REQUEST_BYTES),
                Err(Rejection::Malformed)
            );
            let mut spec = vec![0xa2, 0x64];
            spec.extend_from_slice(b"kind");
            spec.push(0x63);
            spec.extend_from_slice(b"mlp");
            spec.push(0x66);
            spec.extend_from_slice(b"layers");
            spec.extend_from_slice(&deep);
            assert_eq!(
                wire::decode::<ModelSpec>(&spec, fl::MAX_REQUEST_BYTES),
                Err(Rejection::Malformed)
            );
            // Tags are followed in a loop, not by recursion.
            let mut tags = vec![0xc6u8; 10_000];
            tags.push(0);
            assert_eq!(
                wire::decode::<Statement>(&tags, MAX_STATEMENT_BYTES),
                Err(Rejection::Malformed)
            );
            // Nesting within the limit still decodes.
            let nested: Vec<Vec<Vec<u8>>> = vec![vec![vec![1, 2]]];
            let bytes = wire::encode(&nested);
            assert_eq!(wire::decode::<Vec<Vec<Vec<u8>>>>(&bytes, 100), Ok(nested));
        })
        .expect("a thread")
        .join()
        .expect("no stack overflow");
}

#[test]
fn chunk_arithmetic_saturates() {
    // Regression: `chunk_len` multiplied a peer's chunk index unchecked.
    assert_eq!(chunk_len(10, u64::MAX), 0);
    assert_eq!(chunk_len(u64::MAX, u64::MAX), 0);
    assert_eq!(chunk_len(CHUNK_BYTES + 1, 1), 1);
}
