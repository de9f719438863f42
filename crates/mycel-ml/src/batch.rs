//! Continuous batching for the q4 engine: one thread per model owns the decoder and runs every
//! request that is decoding at once through each forward pass.
//!
//! A request joins between steps, when a slot is free and its whole context (prompt and
//! answer, at most) fits in what is left of the KV budget; it leaves at its last token, or
//! as soon as its caller stops listening. A newcomer's prompt is read in chunks of at most
//! [`BatchLimits::prefill_chunk`] tokens per step beside the others' next tokens, so a long
//! prompt holds the running answers back by one chunk's time per step, not the prompt's.
//! Each request samples with its own seeded sampler, and each row's arithmetic in a pass is
//! the arithmetic it gets alone (see [`crate::llama`]): an answer is the same tokens whatever
//! else was running.
//!
//! Prefix caching: the keys and values of a prompt once read, and of a whole request when it
//! leaves, are kept (up to [`BatchLimits::prefix_bytes`], least recently used out first); a
//! newcomer of the same requester (`Request::scope`) whose tokens start the same way (a
//! shared system prompt, the earlier turns of a conversation) starts from a copy of them and
//! reads only the rest. A position's keys and values depend only on the tokens up to it, and
//! on none of how they were read, so the answer is the same tokens. Between requesters nothing
//! is shared: how fast an answer starts would tell one how another's prompts begin.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::llama::{KvCache, Llama, Step};
use mycel_core::grammar::Constraint;

/// Why a generation held to a format stopped: the grammar admits no token of the vocabulary.
pub(crate) const NO_CONTINUATION: &str =
    "no token of the model's vocabulary can continue the answer in the requested format";
pub(crate) use crate::logprobs::Scored;
use crate::MlError;

/// How much a model decodes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Requests decoding together, at most; more wait for a slot.
    pub slots: usize,
    /// Bytes of KV cache the requests decoding together may hold; a request is given room for
    /// its prompt and its longest answer when it starts, and one that needs more than all of
    /// it is refused.
    pub kv_bytes: usize,
    /// Prompt tokens read per step, at most, across newcomers.
    pub prefill_chunk: usize,
    /// Bytes of KV cache kept from prompts and answers read before, for requests that start
    /// with the same tokens (0: none kept). Apart from `kv_bytes`.
    pub prefix_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            slots: 8,
            kv_bytes: 1 << 30,
            prefill_chunk: 128,
            prefix_bytes: 256 << 20,
        }
    }
}

/// The fewest tokens a cached start must share with a newcomer to be used.
const MIN_PREFIX: usize = 4;

/// One generation for the batch: read `context`, then sample up to `max_new` tokens.
pub(crate) struct Request {
    /// The prompt's tokens, then any tokens generated earlier (a resumed generation).
    pub(crate) context: Vec<u32>,
    /// Sampler draws to make before the first new token (one per resumed token).
    pub(crate) replay: usize,
    pub(crate) seed: u64,
    pub(crate) sampling: Sampling,
    /// Log-probabilities to send with each token, with this many alternatives.
    pub(crate) logprobs: Option<u8>,
    /// The grammar its answer is held to, at the start of the answer.
    pub(crate) constraint: Option<Constraint>,
    pub(crate) max_new: usize,
    /// Tokens that end the answer (it ends after sending one).
    pub(crate) ends: Vec<u32>,
    pub(crate) events: Sender<Event>,
    pub(crate) leave: Leave,
    /// Who asked: cached starts are shared only within a scope.
    pub(crate) scope: u64,
}

/// How a request's caller says it stopped listening: the request leaves at the next step.
pub(crate) struct Leave {
    /// Set when the caller is done with the request.
    pub(crate) gone: Arc<AtomicBool>,
    /// The caller's own stop (its client went away), which it may share with other work.
    pub(crate) stop: Arc<AtomicBool>,
}

impl Leave {
    fn left(&self) -> bool {
        self.gone.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed)
    }
}

/// What the batch sends a request's caller.
#[derive(Debug)]
pub(crate) enum Event {
    /// It has a slot: its prompt is being read.
    Admitted,
    /// The next token, with its log-probabilities when they were asked for.
    Token(u32, Option<Scored>),
    /// The generation failed.
    Failed(String),
}

/// What a model's batch thread has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forward passes.
    pub passes: u64,
    /// Requests' steps in them (a pass of 3 requests counts 3).
    pub steps: u64,
    /// The most requests one pass has carried.
    pub widest: u64,
    /// Requests that started from a cached start of their context.
    pub prefix_hits: u64,
    /// The positions they did not read again.
    pub prefix_tokens: u64,
}

#[derive(Default)]
struct Counters {
    passes: AtomicU64,
    steps: AtomicU64,
    widest: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_tokens: AtomicU64,
}

/// The handle to a model's batch thread.
pub(crate) struct Batcher {
    requests: Sender<Request>,
    limits: BatchLimits,
    bytes_per_position: usize,
    /// Token ids the model reads.
    vocab: usize,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the batch thread for `model`.
    pub(crate) fn start(model: Llama, limits: BatchLimits) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel();
        let bytes_per_position = model.kv_bytes_per_position();
        let vocab = model.vocab();
        let limits = BatchLimits {
            slots: limits.slots.max(1),
            prefill_chunk: limits.prefill_chunk.max(1),
            ..limits
        };
        let counters = Arc::new(Counters::default());
        let counting = counters.clone();
        std::thread::Builder::new()
            .name("mycel-batch".into())
            .spawn(move || run(model, limits, incoming, &counting))?;
        Ok(Self {
            requests,
            limits,
            bytes_per_position,
            vocab,
            counters,
        })
    }

    /// What it has done so far.
    pub(crate) fn stats(&self) -> BatchStats {
        BatchStats {
            passes: self.counters.passes.load(Ordering::Relaxed),
            steps: self.counters.steps.load(Ordering::Relaxed),
            widest: self.counters.widest.load(Ordering::Relaxed),
            prefix_hits: self.counters.prefix_hits.load(Ordering::Relaxed),
            prefix_tokens: self.counters.prefix_tokens.load(Ordering::Relaxed),
        }
    }

    /// The limits it runs under.
    pub(crate) fn limits(&self) -> BatchLimits {
        self.limits
    }

    /// The most positions the KV budget holds (one request's, at most).
    pub(crate) fn positions(&self) -> usize {
        self.limits.kv_bytes / self.bytes_per_position.max(1)
    }

    /// Whether a request of `positions` positions can ever run: `Err` says why not.
    fn check(&self, positions: usize) -> Result<(), String> {
        let need = positions.saturating_mul(self.bytes_per_position);
        if need > self.limits.kv_bytes {
            let mib = |bytes: usize| bytes as f64 / f64::from(1 << 20);
            return Err(format!(
                "the prompt and max_tokens need {positions} positions of KV cache \
                 ({:.1} MiB); this node gives the model {:.1} MiB ({} positions) for all its \
                 requests together: shorten the prompt or lower max_tokens",
                mib(need),
                mib(self.limits.kv_bytes),
                self.positions()
            ));
        }
        Ok(())
    }

    /// Queues `request`; its events come on the sender it names.
    pub(crate) fn submit(&self, request: Request) -> Result<(), MlError> {
        if request.context.is_empty() || request.max_new == 0 {
            return Err(MlError::Input("nothing to read or nothing to make".into()));
        }
        if request.context.iter().any(|t| *t as usize >= self.vocab) {
            return Err(MlError::Input(format!(
                "a token id is outside the model's vocabulary of {}",
                self.vocab
            )));
        }
        self.check(request.context.len() + request.max_new)
            .map_err(MlError::Input)?;
        self.requests.send(request).map_err(|_| {
            MlError::Run(
                "the model's batch thread has stopped (see the node's log); reload the model"
                    .into(),
            )
        })
    }
}

/// A request in the batch.
struct Sequence {
    cache: KvCache,
    /// Tokens still to read: the rest of the prompt, or the last sampled token.
    feed: Vec<u32>,
    pos: usize,
    /// Every token it has read or is about to read: the context, then the tokens it made.
    history: Vec<u32>,
    /// Tokens of its context.
    context: usize,
    scope: u64,
    sampler: LogitsProcessor,
    logprobs: Option<u8>,
    constraint: Option<Constraint>,
    made: usize,
    max_new: usize,
    ends: Vec<u32>,
    events: Sender<Event>,
    leave: Leave,
    /// Positions set aside for it.
    positions: usize,
}

impl Sequence {
    fn new(
        request: Request,
        model: &Llama,
        prefixes: &mut Prefixes,
        counters: &Counters,
    ) -> Result<Self, (Sender<Event>, String)> {
        let positions = request.context.len() + request.max_new;
        let mut sampler = LogitsProcessor::from_sampling(request.seed, request.sampling);
        if request.replay > 0 {
            let one = match Tensor::new(&[0f32], &Device::Cpu) {
                Ok(one) => one,
                Err(e) => return Err((request.events, e.to_string())),
            };
            for _ in 0..request.replay {
                if let Err(e) = sampler.sample(&one) {
                    return Err((request.events, e.to_string()));
                }
            }
        }
        if request.events.send(Event::Admitted).is_err() {
            return Err((request.events, "the caller has gone".into()));
        }
        // All of its room at once: what the budget counts is what it holds.
        let (cache, pos) = match prefixes.longest(request.scope, &request.context) {
            Some((cached, n)) => {
                let copy = cached.prefix(n, model.kv_dim(), positions);
                // What the copy holds (all n: an entry holds the keys and values of every
                // one of its tokens).
                let n = copy.len(model.kv_dim());
                counters.prefix_hits.fetch_add(1, Ordering::Relaxed);
                counters
                    .prefix_tokens
                    .fetch_add(n as u64, Ordering::Relaxed);
                (copy, n)
            }
            None => (model.kv_cache(positions), 0),
        };
        Ok(Self {
            cache,
            feed: request.context[pos..].to_vec(),
            pos,
            context: request.context.len(),
            history: request.context,
            scope: request.scope,
            sampler,
            logprobs: request.logprobs,
            constraint: request.constraint,
            made: 0,
            max_new: request.max_new,
            ends: request.ends,
            events: request.events,
            leave: request.leave,
            positions,
        })
    }

    /// Samples from `logits` and sends the token; whether the sequence goes on.
    fn next(&mut self, mut logits: Vec<f32>) -> bool {
        let vocab = logits.len();
        // The log-probabilities, when asked for, read the logits the sampler consumes.
        let kept = self.logprobs.map(|top| (top, logits.clone()));
        if let Some(constraint) = &mut self.constraint {
            if !constraint.mask(&mut logits) {
                let _ = self.events.send(Event::Failed(NO_CONTINUATION.into()));
                return false;
            }
        }
        let token = Tensor::from_vec(logits, vocab, &Device::Cpu)
            .and_then(|logits| self.sampler.sample(&logits));
        let token = match token {
            Ok(token) => token,
            Err(e) => {
                let _ = self.events.send(Event::Failed(e.to_string()));
                return false;
            }
        };
        self.made += 1;
        if let Some(constraint) = &mut self.constraint {
            // Drawn from the allowed tokens, it fits (unless the logits were not numbers).
            if !constraint.advance(token) {
                let _ = self.events.send(Event::Failed(NO_CONTINUATION.into()));
                return false;
            }
        }
        let scored = kept.map(|(top, logits)| Scored::of(&logits, token, usize::from(top)));
        if self.events.send(Event::Token(token, scored)).is_err() {
            // The caller stopped listening: the slot is free at once.
            return false;
        }
        if self.ends.contains(&token) || self.made >= self.max_new {
            return false;
        }
        self.feed = vec![token];
        self.history.push(token);
        true
    }

    /// Its scope, tokens and their keys and values, for the cache of prefixes.
    fn leave(mut self, kv_dim: usize) -> (u64, Vec<u32>, KvCache) {
        // The token sampled last was never read.
        self.history.truncate(self.cache.len(kv_dim));
        (self.scope, self.history, self.cache)
    }
}

/// Keys and values of token sequences read before (prompts, and whole requests), kept for
/// requests of the same scope that start the same way; least recently used out first, and a
/// scope past half the room makes room from its own entries, so one requester cannot take
/// it all.
struct Prefixes {
    entries: Vec<Prefix>,
    /// Bytes the entries hold.
    bytes: usize,
    limit: usize,
    /// Bytes one position takes.
    per_position: usize,
    clock: u64,
}

struct Prefix {
    scope: u64,
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    used: u64,
}

impl Prefixes {
    fn new(limit: usize, per_position: usize) -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            limit,
            per_position: per_position.max(1),
            clock: 0,
        }
    }

    /// The entry of `scope` sharing the longest start with `context` (of at least
    /// [`MIN_PREFIX`] tokens, and leaving at least the last token to read: its logits are the
    /// first token's), and how many tokens they share.
    fn longest(&mut self, scope: u64, context: &[u32]) -> Option<(&KvCache, usize)> {
        let most = context.len().saturating_sub(1);
        let (best, shared) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope)
            .map(|(i, e)| {
                let shared = e.tokens.iter().zip(context).take_while(|(a, b)| a == b);
                (i, shared.count().min(most))
            })
            .max_by_key(|(_, shared)| *shared)?;
        if shared < MIN_PREFIX {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[best];
        entry.used = self.clock;
        Some((&entry.cache, shared))
    }

    /// The most bytes one scope's entries hold together.
    fn share(&self) -> usize {
        self.limit / 2
    }

    /// Whether `tokens` would be worth keeping for `scope`: not too short, within a scope's
    /// share, not already held as (the start of) an entry of it. Asked before anything is
    /// copied for it.
    fn wants(&self, scope: u64, tokens: &[u32]) -> bool {
        tokens.len() >= MIN_PREFIX
            && tokens.len().saturating_mul(self.per_position) <= self.share()
            && !self
                .entries
                .iter()
                .any(|e| e.scope == scope && e.tokens.starts_with(tokens))
    }

    /// Removes entry `i`.
    fn remove(&mut self, i: usize) {
        self.bytes -= self.entries.swap_remove(i).bytes;
    }

    /// The least recently used entry, of `scope` alone when given.
    fn oldest(&self, scope: Option<u64>) -> Option<usize> {
        (0..self.entries.len())
            .filter(|&i| scope.is_none_or(|s| self.entries[i].scope == s))
            .min_by_key(|&i| self.entries[i].used)
    }

    /// Keeps `cache`, which holds the keys and values of `tokens`, for `scope`, if it is
    /// wanted.
    fn keep(&mut self, (scope, tokens, mut cache): (u64, Vec<u32>, KvCache)) {
        if !self.wants(scope, &tokens) {
            return;
        }
        cache.shrink();
        let bytes = cache.bytes();
        if bytes > self.share() {
            return;
        }
        // Entries it starts with are of no more use.
        let held = &mut self.bytes;
        self.entries.retain(|e| {
            let covered = e.scope == scope && tokens.starts_with(&e.tokens);
            if covered {
                *held -= e.bytes;
            }
            !covered
        });
        let own = |entries: &[Prefix]| -> usize {
            entries
                .iter()
                .filter(|e| e.scope == scope)
                .map(|e| e.bytes)
                .sum()
        };
        while own(&self.entries) + bytes > self.share() {
            let Some(oldest) = self.oldest(Some(scope)) else {
                break;
            };
            self.remove(oldest);
        }
        while self.bytes + bytes > self.limit {
            let Some(oldest) = self.oldest(None) else {
                break;
            };
            self.remove(oldest);
        }
        self.clock += 1;
        self.bytes += bytes;
        self.entries.push(Prefix {
            scope,
            tokens,
            cache,
            bytes,
            used: self.clock,
        });
    }
}

/// Serves the batch until every handle is gone. A panic fails the requests in the batch and
/// waiting (their callers see their channel close) and the batch starts again.
fn run(mut model: Llama, limits: BatchLimits, incoming: Receiver<Request>, counters: &Counters) {
    loop {
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve(&mut model, limits, &incoming, counters)
        }));
        match served {
            Ok(()) => return,
            Err(_) => tracing::error!("the batch thread panicked; its requests failed"),
        }
    }
}

fn serve(
    model: &mut Llama,
    limits: BatchLimits,
    incoming: &Receiver<Request>,
    counters: &Counters,
) {
    let budget = limits.kv_bytes / model.kv_bytes_per_position().max(1);
    let kv_dim = model.kv_dim();
    let mut prefixes = Prefixes::new(limits.prefix_bytes, model.kv_bytes_per_position());
    let mut waiting: VecDeque<Request> = VecDeque::new();
    let mut active: Vec<Sequence> = Vec::new();
    let mut reserved = 0usize;
    let mut open = true;
    loop {
        if active.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match incoming.recv() {
                Ok(request) => waiting.push_back(request),
                Err(_) => return,
            }
        }
        while open {
            match incoming.try_recv() {
                Ok(request) => waiting.push_back(request),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // Callers that stopped listening free their slots and places now.
        waiting.retain(|r| !r.leave.left());
        let (gone, staying): (Vec<Sequence>, Vec<Sequence>) =
            active.drain(..).partition(|s| s.leave.left());
        active = staying;
        for s in gone {
            reserved -= s.positions;
            prefixes.keep(s.leave(kv_dim));
        }
        // Newcomers in order of arrival, while a slot and their room are free.
        while active.len() < limits.slots {
            let Some(request) = waiting.front() else {
                break;
            };
            let positions = request.context.len() + request.max_new;
            if reserved + positions > budget && !active.is_empty() {
                break;
            }
            let request = waiting.pop_front().expect("a front");
            match Sequence::new(request, model, &mut prefixes, counters) {
                Ok(sequence) => {
                    reserved += sequence.positions;
                    active.push(sequence);
                }
                Err((events, e)) => {
                    let _ = events.send(Event::Failed(e));
                }
            }
        }
        if active.is_empty() {
            continue;
        }
        // This step: every decoding request's next token, and prompt chunks within the
        // step's budget, oldest newcomer first.
        let mut chunk = limits.prefill_chunk;
        let take: Vec<usize> = active
            .iter()
            .map(|s| {
                if s.feed.len() <= 1 {
                    s.feed.len()
                } else {
                    let n = s.feed.len().min(chunk);
                    chunk -= n;
                    n
                }
            })
            .collect();
        let mut steps: Vec<Step<'_>> = active
            .iter_mut()
            .zip(&take)
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| Step {
                cache: &mut s.cache,
                tokens: &s.feed[..*n],
                pos: s.pos,
            })
            .collect();
        let width = steps.len() as u64;
        counters.passes.fetch_add(1, Ordering::Relaxed);
        counters.steps.fetch_add(width, Ordering::Relaxed);
        counters.widest.fetch_max(width, Ordering::Relaxed);
        let pass = model.forward_batch(&mut steps);
        drop(steps);
        let mut logits = match pass {
            Ok(logits) => logits.into_iter(),
            Err(e) => {
                let why = e.to_string();
                tracing::error!("a batched forward pass failed: {why}");
                for s in active.drain(..) {
                    let _ = s.events.send(Event::Failed(why.clone()));
                }
                reserved = 0;
                continue;
            }
        };
        let mut kept = Vec::with_capacity(active.len());
        for (mut s, n) in active.drain(..).zip(take) {
            let mut going = true;
            if n > 0 {
                let row = logits.next().expect("a row of logits per step");
                let reading = s.pos < s.context;
                s.pos += n;
                s.feed.drain(..n);
                if s.feed.is_empty() {
                    going = s.next(row);
                }
                // Its context read, and the request goes on (one that ends now is kept
                // whole just below): a copy kept for newcomers that start the same way.
                let context = &s.history[..s.context];
                if going && reading && s.pos >= s.context && prefixes.wants(s.scope, context) {
                    let copy = s.cache.prefix(s.context, kv_dim, s.context);
                    prefixes.keep((s.scope, context.to_vec(), copy));
                }
            }
            if going {
                kept.push(s);
            } else {
                reserved -= s.positions;
                prefixes.keep(s.leave(kv_dim));
            }
        }
        active = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` tokens from `first` on.
    fn tokens(first: u32, n: u32) -> Vec<u32> {
        (first..first + n).collect()
    }

    /// The keys and values of `positions` positions, 8 bytes each (one block of width 1).
    fn cache(positions: usize) -> KvCache {
        KvCache::zeros(1, positions, 1)
    }

    fn holds(prefixes: &Prefixes, scope: u64, first: u32) -> bool {
        prefixes
            .entries
            .iter()
            .any(|e| e.scope == scope && e.tokens[0] == first)
    }

    #[test]
    fn prefixes_keep_within_their_room_and_each_scope_within_half() {
        // Room for 40 positions; a scope's share is 20.
        let mut p = Prefixes::new(320, 8);
        let counted = |p: &Prefixes| p.entries.iter().map(|e| e.bytes).sum::<usize>();
        p.keep((1, tokens(0, 10), cache(10)));
        p.keep((1, tokens(100, 10), cache(10)));
        assert_eq!((p.entries.len(), p.bytes), (2, 160));
        // A third of scope 1 would pass its share: its own oldest makes room.
        p.keep((1, tokens(200, 10), cache(10)));
        assert!(!holds(&p, 1, 0) && holds(&p, 1, 100) && holds(&p, 1, 200));
        // Another scope takes the rest; past the room, the oldest of all goes.
        p.keep((2, tokens(0, 10), cache(10)));
        p.keep((2, tokens(300, 10), cache(10)));
        assert_eq!((p.entries.len(), p.bytes), (4, 320));
        p.longest(1, &tokens(100, 11)).expect("a hit");
        p.keep((3, tokens(0, 10), cache(10)));
        assert!(
            !holds(&p, 1, 200) && holds(&p, 1, 100),
            "the least recently used went, not the one just used"
        );
        assert_eq!(p.bytes, counted(&p));
        // An entry that extends another replaces it; one held already is not kept twice.
        p.keep((3, tokens(0, 12), cache(12)));
        assert_eq!(
            p.entries.iter().filter(|e| e.scope == 3).count(),
            1,
            "the longer one only"
        );
        assert!(!p.wants(3, &tokens(0, 8)));
        assert!(
            p.wants(2, &tokens(0, 12)),
            "another scope's entry is not its"
        );
        // Longer than a scope's share, or too short: not wanted, so never copied.
        assert!(!p.wants(4, &tokens(0, 21)));
        assert!(!p.wants(4, &tokens(0, MIN_PREFIX as u32 - 1)));
        assert_eq!(p.bytes, counted(&p));
        assert!(p.bytes <= 320);
        // A hit leaves at least the last token to read, and needs MIN_PREFIX in common.
        assert_eq!(p.longest(3, &tokens(0, 12)).map(|(_, n)| n), Some(11));
        assert!(p.longest(3, &tokens(0, 3)).is_none());
        assert!(
            p.longest(5, &tokens(0, 12)).is_none(),
            "no entry of scope 5"
        );
        // Nothing kept without room.
        let mut none = Prefixes::new(0, 8);
        none.keep((1, tokens(0, 10), cache(10)));
        assert!(none.entries.is_empty());
    }
}
