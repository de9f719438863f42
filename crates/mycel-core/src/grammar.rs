//! Constrained decoding, the pure part: the shapes an answer can be asked to take (OpenAI's
//! `response_format`: `json_object`, and `json_schema` compiled to a [`Shape`]), a byte-level
//! [`Matcher`] that says whether the bytes so far can still become such a value, and which
//! tokens of a vocabulary may come next ([`Grammar::allowed`]).
//!
//! The matcher is a pushdown automaton over bytes with a fixed-size stack of small frames, so
//! trying a token is a copy and a few steps; the tokens allowed in a state are remembered
//! ([`Constraint`]), so a long string costs one walk of the vocabulary, not one per token.
//! The answer begins with its value; whitespace between structural characters is allowed,
//! at most [`MAX_WHITESPACE`] bytes in a row, so a model cannot pad forever; an
//! object of a schema has its members in the schema's order, every one of them (what
//! OpenAI's strict mode asks of a schema too); strings are well-formed UTF-8 with JSON's
//! escapes; numbers follow JSON's grammar, at most [`MAX_NUMBER_BYTES`] long.
//!
//! The same matcher checks a finished answer ([`Grammar::matches`]): a requester runs a
//! worker's text through it, so a worker that ignored the constraint is caught.

use serde::{Deserialize, Serialize};

/// Most nodes a shape may have.
pub const MAX_SHAPE_NODES: usize = 256;
/// Deepest a shape may nest.
pub const MAX_SHAPE_DEPTH: usize = 8;
/// Longest key or literal of a shape, in bytes.
pub const MAX_LITERAL_BYTES: usize = 256;
/// Most values an `enum` may list.
pub const MAX_CHOICES: usize = 32;
/// Most whitespace bytes in a row between structural characters.
pub const MAX_WHITESPACE: u8 = 16;
/// Longest number, in bytes.
pub const MAX_NUMBER_BYTES: u8 = 32;
/// Frames the matcher's stack holds: how deep any JSON value (`json_object`) may nest.
pub const MAX_FRAMES: usize = 20;

/// What an answer must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Shape {
    /// Any JSON value.
    Any,
    /// An object with any members.
    AnyObject,
    /// An object with exactly these members, in this order.
    Object(Vec<(String, Shape)>),
    /// An array of values of one shape.
    Array(Box<Shape>),
    /// A string.
    String,
    /// A number.
    Number,
    /// A number without fraction or exponent.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// `null`.
    Null,
    /// One of these JSON texts (an `enum` or a `const`), in compact form.
    OneOf(Vec<String>),
}

impl Shape {
    /// Refuses a shape larger, deeper or odder than the limits above: one a hostile
    /// requester could send to make a worker's matcher slow or its state large.
    pub fn check(&self) -> Result<(), String> {
        Grammar::new(self).map(|_| ())
    }
}

/// A node of a compiled shape.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Any,
    AnyObject,
    /// Members `first..first + count` of [`Grammar::members`].
    Object {
        first: u16,
        count: u16,
    },
    Array(u16),
    String,
    Number,
    Integer,
    Boolean,
    Null,
    /// Literals `first..first + count` of [`Grammar::literals`].
    OneOf {
        first: u16,
        count: u16,
    },
}

/// The nodes every grammar has, at these places: an arbitrary value ([`Shape::Any`]), and
/// the object and array inside one.
const ANY: u16 = 0;
const ANY_OBJECT: u16 = 1;
const ANY_ARRAY: u16 = 2;
/// Literals every grammar has, at these places.
const TRUE: u16 = 0;
const FALSE: u16 = 1;
const NULL: u16 = 2;

/// A compiled shape: nodes, object members (key literal, value node) and literals.
#[derive(Debug, Clone, PartialEq)]
pub struct Grammar {
    nodes: Vec<Node>,
    members: Vec<(u16, u16)>,
    literals: Vec<Vec<u8>>,
    root: u16,
}

/// A JSON string literal of `s`, quotes included.
pub fn json_string(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out.push(b'"');
    out
}

impl Grammar {
    /// Compiles `shape`, refusing one past the limits (and an `enum` whose values are not
    /// JSON texts).
    pub fn new(shape: &Shape) -> Result<Self, String> {
        let mut grammar = Self {
            nodes: vec![Node::Any, Node::AnyObject, Node::Array(ANY)],
            members: Vec::new(),
            literals: vec![b"true".to_vec(), b"false".to_vec(), b"null".to_vec()],
            root: ANY,
        };
        grammar.root = grammar.add(shape, 0)?;
        Ok(grammar)
    }

    fn add(&mut self, shape: &Shape, depth: usize) -> Result<u16, String> {
        if depth > MAX_SHAPE_DEPTH {
            return Err(format!(
                "the schema nests deeper than {MAX_SHAPE_DEPTH} levels"
            ));
        }
        if self.nodes.len() >= MAX_SHAPE_NODES {
            return Err(format!("the schema has more than {MAX_SHAPE_NODES} parts"));
        }
        let node = match shape {
            Shape::Any => return Ok(ANY),
            Shape::AnyObject => return Ok(ANY_OBJECT),
            Shape::String => Node::String,
            Shape::Number => Node::Number,
            Shape::Integer => Node::Integer,
            Shape::Boolean => Node::Boolean,
            Shape::Null => Node::Null,
            Shape::Array(item) => Node::Array(self.add(item, depth + 1)?),
            Shape::Object(members) => {
                let mut compiled = Vec::with_capacity(members.len());
                for (i, (key, value)) in members.iter().enumerate() {
                    if members[..i].iter().any(|(k, _)| k == key) {
                        return Err(format!("the schema names property {key:?} twice"));
                    }
                    let key = self.literal(json_string(key))?;
                    compiled.push((key, self.add(value, depth + 1)?));
                }
                let first = self.members.len() as u16;
                self.members.extend(compiled);
                Node::Object {
                    first,
                    count: members.len() as u16,
                }
            }
            Shape::OneOf(choices) => {
                if choices.is_empty() || choices.len() > MAX_CHOICES {
                    return Err(format!(
                        "an enum takes 1 to {MAX_CHOICES} values, not {}",
                        choices.len()
                    ));
                }
                let any = Self::new(&Shape::Any).expect("the any shape compiles");
                let first = self.literals.len() as u16;
                for choice in choices {
                    if !any.matches(choice.as_bytes()) {
                        return Err(format!("enum value {choice:?} is not a JSON text"));
                    }
                    self.literal(choice.as_bytes().to_vec())?;
                }
                Node::OneOf {
                    first,
                    count: choices.len() as u16,
                }
            }
        };
        self.nodes.push(node);
        Ok((self.nodes.len() - 1) as u16)
    }

    fn literal(&mut self, bytes: Vec<u8>) -> Result<u16, String> {
        if bytes.len() > MAX_LITERAL_BYTES {
            return Err(format!(
                "a property name or enum value is longer than {MAX_LITERAL_BYTES} bytes"
            ));
        }
        if self.literals.len() >= MAX_SHAPE_NODES * 4 {
            return Err("the schema names too many properties and values".into());
        }
        self.literals.push(bytes);
        Ok((self.literals.len() - 1) as u16)
    }

    /// A matcher at the start of an answer.
    pub fn start(&self) -> Matcher {
        let mut matcher = Matcher {
            frames: [Frame::Done; MAX_FRAMES],
            len: 0,
            ws: 0,
        };
        matcher.push(Frame::Value(self.root));
        matcher
    }

    /// Whether `bytes` are a whole answer of this shape.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let mut matcher = self.start();
        matcher.feed_all(self, bytes) && matcher.can_end(self)
    }

    /// Whether `bytes` can still become an answer of this shape.
    pub fn begins(&self, bytes: &[u8]) -> bool {
        self.start().feed_all(self, bytes)
    }

    /// The tokens of `vocab` that may come after `matcher`: those whose bytes it takes, and
    /// the end tokens once the answer is whole. In increasing id order.
    pub fn allowed(&self, matcher: &Matcher, vocab: &Vocab) -> Vec<u32> {
        let mut allowed = Vec::new();
        // states[d]: the matcher after the first d bytes of the current token.
        let mut states: Vec<Matcher> = vec![*matcher];
        let mut i = 0;
        while i < vocab.tokens.len() {
            let (bytes, id) = &vocab.tokens[i];
            let shared = vocab.shared[i] as usize;
            states.truncate(shared + 1);
            let mut failed_at = None;
            for (d, &b) in bytes.iter().enumerate().skip(shared) {
                let mut next = states[d];
                if !next.feed(self, b) {
                    failed_at = Some(d);
                    break;
                }
                states.push(next);
            }
            match failed_at {
                None => {
                    allowed.push(*id);
                    i += 1;
                }
                Some(d) => {
                    // Every later token that begins with these d + 1 bytes fails too.
                    i += 1;
                    while i < vocab.tokens.len() && vocab.shared[i] as usize > d {
                        i += 1;
                    }
                }
            }
        }
        if matcher.can_end(self) {
            allowed.extend_from_slice(&vocab.ends);
        }
        allowed.sort_unstable();
        allowed
    }
}

/// A vocabulary as [`Grammar::allowed`] walks it: the tokens that stand for bytes, sorted by
/// their bytes, each with how many leading bytes it shares with the one before; and the
/// tokens that end an answer.
#[derive(Debug, Clone)]
pub struct Vocab {
    tokens: Vec<(Vec<u8>, u32)>,
    shared: Vec<u16>,
    ends: Vec<u32>,
    /// Where each id is in `tokens` (`u32::MAX`: nowhere).
    by_id: Vec<u32>,
}

impl Vocab {
    /// The vocabulary of `tokens` (id and bytes; control tokens, which stand for no text,
    /// left out by the caller) and the tokens that end an answer.
    pub fn new(tokens: impl IntoIterator<Item = (u32, Vec<u8>)>, ends: Vec<u32>) -> Self {
        let mut tokens: Vec<(Vec<u8>, u32)> = tokens
            .into_iter()
            .filter(|(_, bytes)| !bytes.is_empty() && bytes.len() <= u16::MAX as usize)
            .map(|(id, bytes)| (bytes, id))
            .collect();
        tokens.sort();
        let shared = (0..tokens.len())
            .map(|i| match i {
                0 => 0,
                _ => {
                    let (a, b) = (&tokens[i - 1].0, &tokens[i].0);
                    a.iter().zip(b).take_while(|(x, y)| x == y).count() as u16
                }
            })
            .collect();
        let size = tokens
            .iter()
            .map(|(_, id)| *id as usize + 1)
            .max()
            .unwrap_or(0);
        let mut by_id = vec![u32::MAX; size];
        for (at, (_, id)) in tokens.iter().enumerate() {
            by_id[*id as usize] = at as u32;
        }
        Self {
            tokens,
            shared,
            ends,
            by_id,
        }
    }

    /// The bytes token `id` stands for; `None` for a token that stands for none (a control
    /// token, or an id past the vocabulary).
    pub fn bytes(&self, id: u32) -> Option<&[u8]> {
        let at = *self.by_id.get(id as usize)?;
        self.tokens
            .get(at as usize)
            .map(|(bytes, _)| bytes.as_slice())
    }

    /// Whether `id` ends an answer.
    pub fn ends(&self, id: u32) -> bool {
        self.ends.contains(&id)
    }
}

/// Most token sets a [`Constraint`] remembers.
const REMEMBERED: usize = 64;

/// A generation held to a grammar: which tokens may come next, and the answer so far. The
/// tokens allowed in a state are remembered: inside a long string, or between the items of
/// a list, the state comes back token after token.
#[derive(Debug, Clone)]
pub struct Constraint {
    grammar: std::sync::Arc<Grammar>,
    vocab: std::sync::Arc<Vocab>,
    matcher: Matcher,
    /// Allowed tokens by state, one bit per token id.
    remembered: std::collections::HashMap<Matcher, std::sync::Arc<Vec<u64>>>,
}

impl Constraint {
    /// At the start of an answer.
    pub fn new(grammar: std::sync::Arc<Grammar>, vocab: std::sync::Arc<Vocab>) -> Self {
        let matcher = grammar.start();
        Self {
            grammar,
            vocab,
            matcher,
            remembered: std::collections::HashMap::new(),
        }
    }

    /// Keeps in `logits` only the tokens that may come next (the others become −∞);
    /// `false` when none may (the answer cannot go on).
    pub fn mask(&mut self, logits: &mut [f32]) -> bool {
        let allowed = match self.remembered.get(&self.matcher) {
            Some(allowed) => allowed.clone(),
            None => {
                let mut bits = vec![0u64; logits.len().div_ceil(64)];
                for id in self.grammar.allowed(&self.matcher, &self.vocab) {
                    if let Some(word) = bits.get_mut(id as usize / 64) {
                        *word |= 1 << (id % 64);
                    }
                }
                let allowed = std::sync::Arc::new(bits);
                if self.remembered.len() >= REMEMBERED {
                    self.remembered.clear();
                }
                self.remembered.insert(self.matcher, allowed.clone());
                allowed
            }
        };
        let mut any = false;
        for (id, logit) in logits.iter_mut().enumerate() {
            if allowed
                .get(id / 64)
                .is_some_and(|w| w & (1 << (id % 64)) != 0)
            {
                any = true;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        any
    }

    /// Moves past `token`; `false`, and no move, when it may not come here (an end token
    /// may, once the answer is whole).
    pub fn advance(&mut self, token: u32) -> bool {
        if self.vocab.ends(token) {
            return self.matcher.can_end(&self.grammar);
        }
        let mut next = self.matcher;
        let fits = self
            .vocab
            .bytes(token)
            .is_some_and(|bytes| next.feed_all(&self.grammar, bytes));
        if fits {
            self.matcher = next;
        }
        fits
    }
}

/// Where an object or array is, between its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    /// After the opening bracket.
    Open,
    /// After a key (an object's).
    Key,
    /// After a value.
    Value,
    /// After a comma.
    Comma,
}

/// One level of the matcher's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Frame {
    /// A value of this node comes next (whitespace first allowed).
    Value(u16),
    /// The rest of a literal: its bytes from `at` on.
    Literal { literal: u16, at: u16 },
    /// One of a node's literals, `at` bytes in, `live` those still matching.
    Choice { node: u16, at: u16, live: u32 },
    /// Inside a string ([`Text`]).
    String(Text),
    /// A number, in `state` (see [`Matcher::number`]), `len` bytes long.
    Number { integer: bool, state: u8, len: u8 },
    /// An object of this node (`AnyObject` or `Object`), at its `next` member.
    Object { node: u16, next: u16, phase: Phase },
    /// An array of this node.
    Array { node: u16, phase: Phase },
    /// Filler of unused places.
    Done,
}

/// What a frame does with a byte.
enum Step {
    /// Took it; the frame is now this.
    Stay(Frame),
    /// Took it; the frame is now the first, and the second goes on top.
    Push(Frame, Frame),
    /// Took it, and is finished.
    Pop,
    /// Is finished without it: the frame below gets it.
    PopAgain,
    /// Becomes the second frame on top of the first, which gets the byte.
    Become(Frame, Frame),
    /// Cannot take it.
    Refuse,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

/// Number states: start, after a minus, a leading zero, integer digits, a dot, fraction
/// digits, an e, the exponent's sign, exponent digits.
const N_START: u8 = 0;
const N_MINUS: u8 = 1;
const N_ZERO: u8 = 2;
const N_INT: u8 = 3;
const N_DOT: u8 = 4;
const N_FRAC: u8 = 5;
const N_E: u8 = 6;
const N_SIGN: u8 = 7;
const N_EXP: u8 = 8;

fn number_complete(state: u8) -> bool {
    matches!(state, N_ZERO | N_INT | N_FRAC | N_EXP)
}

/// Where the automaton is in an answer. Small and `Copy`: trying a token copies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Matcher {
    frames: [Frame; MAX_FRAMES],
    len: u8,
    /// Whitespace bytes in a row so far.
    ws: u8,
}

impl Matcher {
    fn push(&mut self, frame: Frame) -> bool {
        if self.len as usize >= MAX_FRAMES {
            return false;
        }
        self.frames[self.len as usize] = frame;
        self.len += 1;
        true
    }

    /// Whether the answer may end here: the value is whole (a number or enum literal that
    /// could go on is whole too).
    pub fn can_end(&self, grammar: &Grammar) -> bool {
        match self.len {
            0 => true,
            1 => match self.frames[0] {
                Frame::Number { state, .. } => number_complete(state),
                Frame::Choice { node, at, live } => grammar.choice_complete(node, at, live),
                _ => false,
            },
            _ => false,
        }
    }

    /// Feeds `bytes`; whether every one was taken.
    pub fn feed_all(&mut self, grammar: &Grammar, bytes: &[u8]) -> bool {
        bytes.iter().all(|b| self.feed(grammar, *b))
    }

    /// Feeds one byte; whether it was taken (when not, the matcher may be left changed:
    /// callers try bytes on a copy).
    pub fn feed(&mut self, grammar: &Grammar, b: u8) -> bool {
        loop {
            let Some(top) = self.top() else {
                // The answer is whole: nothing may follow.
                return false;
            };
            // Whitespace between parts, counted (in a string or literal it is text, and a
            // number or enum value it ends hands it to the frame below).
            // (Not before the answer: it begins with its value.)
            let between = match top {
                Frame::Value(_) => self.len > 1,
                Frame::Object { .. } | Frame::Array { .. } => true,
                _ => false,
            };
            if is_ws(b) && between {
                if self.ws >= MAX_WHITESPACE {
                    return false;
                }
                self.ws += 1;
                return true;
            }
            match grammar.step(top, b) {
                Step::Stay(frame) => {
                    self.frames[self.len as usize - 1] = frame;
                    break;
                }
                Step::Push(frame, child) => {
                    self.frames[self.len as usize - 1] = frame;
                    if !self.push(child) {
                        return false;
                    }
                    break;
                }
                Step::Pop => {
                    self.pop();
                    break;
                }
                Step::PopAgain => self.pop(),
                Step::Become(frame, child) => {
                    self.frames[self.len as usize - 1] = frame;
                    if !self.push(child) {
                        return false;
                    }
                }
                Step::Refuse => return false,
            }
        }
        self.ws = 0;
        true
    }

    /// Drops the top frame; its place is left as an unused one, so that two matchers in
    /// the same state are equal (the memo of allowed tokens keys on them).
    fn pop(&mut self) {
        self.len -= 1;
        self.frames[self.len as usize] = Frame::Done;
    }

    fn top(&self) -> Option<Frame> {
        (self.len > 0).then(|| self.frames[self.len as usize - 1])
    }
}

impl Grammar {
    fn choice_complete(&self, node: u16, at: u16, live: u32) -> bool {
        let Node::OneOf { first, count } = self.nodes[node as usize] else {
            return false;
        };
        (0..count).any(|i| {
            live & (1 << i) != 0 && self.literals[(first + i) as usize].len() == at as usize
        })
    }

    /// What `frame` does with byte `b` (whitespace is handled before).
    fn step(&self, frame: Frame, b: u8) -> Step {
        match frame {
            Frame::Done => Step::Refuse,
            Frame::Value(node) => self.begin(node, b),
            Frame::Literal { literal, at } => {
                let bytes = &self.literals[literal as usize];
                match bytes.get(at as usize) {
                    Some(&expected) if expected == b => {
                        if at as usize + 1 == bytes.len() {
                            Step::Pop
                        } else {
                            Step::Stay(Frame::Literal {
                                literal,
                                at: at + 1,
                            })
                        }
                    }
                    _ => Step::Refuse,
                }
            }
            Frame::Choice { node, at, live } => {
                let Node::OneOf { first, count } = self.nodes[node as usize] else {
                    return Step::Refuse;
                };
                let mut next = 0u32;
                for i in 0..count {
                    let literal = &self.literals[(first + i) as usize];
                    if live & (1 << i) != 0 && literal.get(at as usize) == Some(&b) {
                        next |= 1 << i;
                    }
                }
                if next != 0 {
                    Step::Stay(Frame::Choice {
                        node,
                        at: at + 1,
                        live: next,
                    })
                } else if self.choice_complete(node, at, live) {
                    Step::PopAgain
                } else {
                    Step::Refuse
                }
            }
            Frame::String(text) => match text.step(b) {
                Some(None) => Step::Pop,
                Some(Some(text)) => Step::Stay(Frame::String(text)),
                None => Step::Refuse,
            },
            Frame::Number {
                integer,
                state,
                len,
            } => {
                let digit = b.is_ascii_digit();
                let next = match (state, b) {
                    _ if len >= MAX_NUMBER_BYTES => None,
                    (N_START, b'-') => Some(N_MINUS),
                    (N_START | N_MINUS, b'0') => Some(N_ZERO),
                    (N_START | N_MINUS, _) if digit => Some(N_INT),
                    (N_INT, _) if digit => Some(N_INT),
                    (N_ZERO | N_INT, b'.') if !integer => Some(N_DOT),
                    (N_DOT | N_FRAC, _) if digit => Some(N_FRAC),
                    (N_ZERO | N_INT | N_FRAC, b'e' | b'E') if !integer => Some(N_E),
                    (N_E, b'+' | b'-') => Some(N_SIGN),
                    (N_E | N_SIGN | N_EXP, _) if digit => Some(N_EXP),
                    _ => None,
                };
                // A number at its last byte must be whole there.
                let next = next.filter(|s| number_complete(*s) || len + 2 <= MAX_NUMBER_BYTES);
                match next {
                    Some(state) => Step::Stay(Frame::Number {
                        integer,
                        state,
                        len: len + 1,
                    }),
                    None if number_complete(state) => Step::PopAgain,
                    None => Step::Refuse,
                }
            }
            Frame::Object { node, next, phase } => self.object_step(node, next, phase, b),
            Frame::Array { node, phase } => {
                let Node::Array(item) = self.nodes[node as usize] else {
                    return Step::Refuse;
                };
                let array = |phase| Frame::Array { node, phase };
                match (phase, b) {
                    (Phase::Open | Phase::Value, b']') => Step::Pop,
                    (Phase::Value, b',') => Step::Stay(array(Phase::Comma)),
                    (Phase::Open | Phase::Comma, _) => {
                        Step::Become(array(Phase::Value), Frame::Value(item))
                    }
                    _ => Step::Refuse,
                }
            }
        }
    }

    /// The first byte of a value of `node`: the frame it becomes.
    fn begin(&self, node: u16, b: u8) -> Step {
        let literal = |literal: u16| Frame::Literal { literal, at: 1 };
        let string = Frame::String(Text::default());
        let number = |integer| Frame::Number {
            integer,
            state: N_START,
            len: 0,
        };
        let opened = |frame| Step::Stay(frame);
        match (&self.nodes[node as usize], b) {
            (Node::Any | Node::AnyObject | Node::Object { .. }, b'{') => {
                let node = match self.nodes[node as usize] {
                    Node::Any => ANY_OBJECT,
                    _ => node,
                };
                opened(Frame::Object {
                    node,
                    next: 0,
                    phase: Phase::Open,
                })
            }
            (Node::Any, b'[') => opened(Frame::Array {
                node: ANY_ARRAY,
                phase: Phase::Open,
            }),
            (Node::Array(_), b'[') => opened(Frame::Array {
                node,
                phase: Phase::Open,
            }),
            (Node::Any | Node::String, b'"') => opened(string),
            (Node::Any | Node::Number, b'-' | b'0'..=b'9') => self.step(number(false), b),
            (Node::Integer, b'-' | b'0'..=b'9') => self.step(number(true), b),
            (Node::Any | Node::Boolean, b't') => opened(literal(TRUE)),
            (Node::Any | Node::Boolean, b'f') => opened(literal(FALSE)),
            (Node::Any | Node::Null, b'n') => opened(literal(NULL)),
            (Node::OneOf { count, .. }, _) => self.step(
                Frame::Choice {
                    node,
                    at: 0,
                    live: if *count >= 32 {
                        u32::MAX
                    } else {
                        (1u32 << count) - 1
                    },
                },
                b,
            ),
            _ => Step::Refuse,
        }
    }

    fn object_step(&self, node: u16, next: u16, phase: Phase, b: u8) -> Step {
        let object = |next, phase| Frame::Object { node, next, phase };
        let key_string = Frame::String(Text::default());
        match self.nodes[node as usize] {
            Node::AnyObject => match (phase, b) {
                (Phase::Open | Phase::Value, b'}') => Step::Pop,
                (Phase::Open | Phase::Comma, b'"') => Step::Push(object(0, Phase::Key), key_string),
                (Phase::Key, b':') => Step::Push(object(0, Phase::Value), Frame::Value(ANY)),
                (Phase::Value, b',') => Step::Stay(object(0, Phase::Comma)),
                _ => Step::Refuse,
            },
            Node::Object { first, count } => {
                let member = |i: u16| self.members[(first + i) as usize];
                match (phase, b) {
                    (Phase::Open, b'}') if count == 0 => Step::Pop,
                    (Phase::Value, b'}') if next == count => Step::Pop,
                    (Phase::Open | Phase::Comma, b'"') if next < count => Step::Push(
                        object(next, Phase::Key),
                        Frame::Literal {
                            literal: member(next).0,
                            at: 1,
                        },
                    ),
                    (Phase::Key, b':') => {
                        Step::Push(object(next + 1, Phase::Value), Frame::Value(member(next).1))
                    }
                    (Phase::Value, b',') if next < count => Step::Stay(object(next, Phase::Comma)),
                    _ => Step::Refuse,
                }
            }
            _ => Step::Refuse,
        }
    }
}

/// Where a string is: after a backslash, in the hex digits of a `\u` escape (their value so
/// far), after a high surrogate that a low one must follow, or in a UTF-8 character (the
/// continuation bytes to go, and the range the next one must be in: JSON text is UTF-8 with
/// no overlong forms, no surrogates, nothing past U+10FFFF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct Text {
    /// 1: after a backslash.
    escape: u8,
    /// Hex digits still to come, and the value so far.
    hex: u8,
    code: u16,
    /// A high surrogate was read: a `\u` escape of a low one must come next (1: its
    /// backslash, 2: its `u`, 3: its digits).
    low: u8,
    /// UTF-8 continuation bytes to go, and the range of the next.
    utf8: u8,
    lo: u8,
    hi: u8,
}

impl Text {
    /// Takes `b`: `Some(None)` when it closes the string, `None` when it may not come.
    fn step(self, b: u8) -> Option<Option<Text>> {
        let mut next = self;
        if self.hex > 0 {
            let digit = (b as char).to_digit(16)? as u16;
            next.hex -= 1;
            next.code = (self.code << 4) | digit;
            if next.hex == 0 {
                let high = (0xD800..0xDC00).contains(&next.code);
                let low = (0xDC00..0xE000).contains(&next.code);
                match (self.low, high, low) {
                    (3, _, true) => next.low = 0,
                    (3, _, false) => return None,
                    (_, true, _) => next.low = 1,
                    (_, _, true) => return None,
                    _ => {}
                }
                next.code = 0;
            }
            return Some(Some(next));
        }
        match self.low {
            1 => return (b == b'\\').then_some(Some(Text { low: 2, ..self })),
            2 => {
                return (b == b'u').then_some(Some(Text {
                    low: 3,
                    hex: 4,
                    ..self
                }))
            }
            _ => {}
        }
        if self.escape == 1 {
            next.escape = 0;
            return match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(Some(next)),
                b'u' => Some(Some(Text { hex: 4, ..next })),
                _ => None,
            };
        }
        if self.utf8 > 0 {
            if !(self.lo..=self.hi).contains(&b) {
                return None;
            }
            next.utf8 -= 1;
            (next.lo, next.hi) = (0x80, 0xBF);
            return Some(Some(next));
        }
        let lead = |utf8: u8, lo: u8, hi: u8| {
            Some(Some(Text {
                utf8,
                lo,
                hi,
                ..self
            }))
        };
        match b {
            b'"' => Some(None),
            b'\\' => Some(Some(Text { escape: 1, ..self })),
            0x00..=0x1F => None,
            0x20..=0x7F => Some(Some(self)),
            0xC2..=0xDF => lead(1, 0x80, 0xBF),
            0xE0 => lead(2, 0xA0, 0xBF),
            0xED => lead(2, 0x80, 0x9F),
            0xE1..=0xEF => lead(2, 0x80, 0xBF),
            0xF0 => lead(3, 0x90, 0xBF),
            0xF1..=0xF3 => lead(3, 0x80, 0xBF),
            0xF4 => lead(3, 0x80, 0x8F),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammar(shape: Shape) -> Grammar {
        Grammar::new(&shape).unwrap()
    }

    fn person() -> Shape {
        Shape::Object(vec![
            ("name".into(), Shape::String),
            ("age".into(), Shape::Integer),
            ("tags".into(), Shape::Array(Box::new(Shape::String))),
            (
                "mood".into(),
                Shape::OneOf(vec![
                    "\"calm\"".into(),
                    "\"cross\"".into(),
                    "1".into(),
                    "12".into(),
                ]),
            ),
            ("ok".into(), Shape::Boolean),
            ("none".into(), Shape::Null),
            ("score".into(), Shape::Number),
            ("extra".into(), Shape::Any),
        ])
    }

    #[test]
    fn json_values_match_their_shape_and_nothing_else_does() {
        let any = grammar(Shape::Any);
        for good in [
            "{}",
            "[]",
            "\"a\\n\\u00e9\\\"\"",
            "-0.5e+10",
            "0",
            "true",
            "null",
            "{\"a\": [1, 2.5, {\"b\": null}], \"c\": \"é\"}",
            "[ [ ] , { } ]",
            "\"日本\"",
        ] {
            assert!(any.matches(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "01",
            "1.",
            "-",
            "\"\\x\"",
            "tru",
            "{}}",
            "{} ",
            " {}",
            "\"a\u{1}\"",
            "{'a': 1}",
            "[1 2]",
            "1e",
            "+1",
        ] {
            assert!(!any.matches(bad.as_bytes()), "{bad:?}");
        }
        // Whitespace between parts is fine.
        assert!(any.matches(b"[ 1 ,\n 2 ]"));
        // Invalid UTF-8 never passes.
        assert!(!any.matches(b"\"\xff\""));
        assert!(!any.matches(b"\"\xc3\""));

        let object = grammar(Shape::AnyObject);
        assert!(object.matches(b"{\"k\": [true]}"));
        assert!(!object.matches(b"[1]"));
        assert!(!object.matches(b"\"x\""));

        let person = grammar(person());
        let good = "{\"name\": \"Ann\", \"age\": -12, \"tags\": [\"a\", \"b\"], \
                    \"mood\": \"calm\", \"ok\": false, \"none\": null, \"score\": 2.5e3, \
                    \"extra\": {\"x\": [1]}}";
        assert!(person.matches(good.as_bytes()));
        for bad in [
            // Out of order, missing, extra, wrong types, a value outside the enum.
            good.replace(
                "\"name\": \"Ann\", \"age\": -12",
                "\"age\": -12, \"name\": \"Ann\"",
            ),
            good.replace(", \"extra\": {\"x\": [1]}", ""),
            good.replace("}}", "}, \"more\": 1}"),
            good.replace("-12", "1.5"),
            good.replace("\"Ann\"", "7"),
            good.replace("\"calm\"", "\"happy\""),
            good.replace("false", "0"),
        ] {
            assert!(!person.matches(bad.as_bytes()), "{bad}");
        }
        // The enum's numbers: 1 and 12, each whole only where it ends.
        for (mood, ok) in [("1", true), ("12", true), ("123", false), ("2", false)] {
            let text = good.replace("\"calm\"", mood);
            assert_eq!(person.matches(text.as_bytes()), ok, "{mood}");
        }
    }

    #[test]
    fn prefixes_of_an_answer_begin_it_and_it_ends_only_when_whole() {
        let person = grammar(person());
        let good = b"{\"name\": \"A\", \"age\": 3, \"tags\": [], \"mood\": 12, \"ok\": true, \
                     \"none\": null, \"score\": 0, \"extra\": 1}";
        let mut matcher = person.start();
        for (i, b) in good.iter().enumerate() {
            assert!(!matcher.can_end(&person), "not whole after {i} bytes");
            assert!(matcher.feed(&person, *b), "byte {i}");
        }
        assert!(matcher.can_end(&person));
        assert!(
            !matcher.clone().feed(&person, b' '),
            "nothing after the answer"
        );
        // A number alone may end, or go on.
        let number = grammar(Shape::Number);
        let mut m = number.start();
        assert!(m.feed_all(&number, b"12"));
        assert!(m.can_end(&number));
        assert!(m.feed_all(&number, b".5"));
        assert!(m.can_end(&number));
        assert!(!m.feed(&number, b'.'));
    }

    #[test]
    fn whitespace_and_numbers_cannot_run_on_forever() {
        let any = grammar(Shape::Any);
        let mut m = any.start();
        assert!(m.feed(&any, b'['));
        for _ in 0..MAX_WHITESPACE {
            assert!(m.feed(&any, b' '));
        }
        assert!(!m.clone().feed(&any, b'\n'));
        let mut m = any.start();
        for _ in 0..MAX_NUMBER_BYTES {
            assert!(m.feed(&any, b'7'));
        }
        assert!(!m.clone().feed(&any, b'7'));
        assert!(m.can_end(&any));
        // Nesting past the stack is refused, not a panic.
        let deep = "[".repeat(MAX_FRAMES + 5);
        assert!(!any.begins(deep.as_bytes()));
        assert!(any.begins("[".repeat(MAX_FRAMES - 1).as_bytes()));
    }

    #[test]
    fn numbers_end_within_their_cap_and_strings_are_strict_utf8() {
        let number = grammar(Shape::Number);
        let mut m = number.start();
        assert!(
            m.feed_all(&number, b"1000000000000000000000000000000"),
            "31 bytes"
        );
        assert!(!m.clone().feed(&number, b'.'), "could not end within 32");
        assert!(!m.clone().feed(&number, b'e'));
        assert!(m.feed(&number, b'0'));
        assert!(m.can_end(&number));
        let mut m = number.start();
        assert!(
            m.feed_all(&number, b"100000000000000000000000000000"),
            "30 bytes"
        );
        assert!(m.feed_all(&number, b"e5"), "ends at 32");
        assert!(m.can_end(&number));

        let any = grammar(Shape::Any);
        assert!(any.matches(b"\"a\x7fb\""), "DEL is text");
        for good in [
            &b"\"\xe0\xa0\x80\""[..],
            b"\"\xed\x9f\xbf\"",
            b"\"\xf4\x8f\xbf\xbf\"",
            b"\"\\ud83d\\ude00\"",
            b"\"\\u00e9\"",
        ] {
            assert!(any.matches(good), "{}", String::from_utf8_lossy(good));
        }
        for bad in [
            &b"\"\xe0\x80\x80\""[..],
            b"\"\xed\xa0\x80\"",
            b"\"\xf4\x90\x80\x80\"",
            b"\"\xc0\xaf\"",
            b"\"\\ud800\"",
            b"\"\\udc00\"",
            b"\"\\ud800x\"",
            b"\"\\ud800\\u0041\"",
            b"\"\\u12g4\"",
        ] {
            assert!(!any.matches(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn shapes_past_the_limits_are_refused() {
        let mut deep = Shape::String;
        for _ in 0..=MAX_SHAPE_DEPTH {
            deep = Shape::Array(Box::new(deep));
        }
        assert!(deep.check().unwrap_err().contains("nests"));
        let wide = Shape::Object(
            (0..MAX_SHAPE_NODES + 1)
                .map(|i| (format!("k{i}"), Shape::Null))
                .collect(),
        );
        assert!(wide.check().is_err());
        let twice = Shape::Object(vec![("a".into(), Shape::Null), ("a".into(), Shape::Null)]);
        assert!(twice.check().unwrap_err().contains("twice"));
        assert!(Shape::OneOf(vec![]).check().is_err());
        assert!(Shape::OneOf(vec!["not json".into()]).check().is_err());
        assert!(Shape::OneOf(vec!["x".repeat(MAX_LITERAL_BYTES + 1)])
            .check()
            .is_err());
        assert!(person().check().is_ok());
        // A key that needs escaping is written escaped.
        let odd = grammar(Shape::Object(vec![("a\"b".into(), Shape::Null)]));
        assert!(odd.matches(b"{\"a\\\"b\": null}"));
    }

    #[test]
    fn a_constraint_masks_what_the_grammar_refuses_and_remembers_rightly() {
        let pieces: Vec<&[u8]> = vec![b"{\"", b"a", b"\"", b":", b"1", b"}", b" ", b"[", b","];
        let vocab = std::sync::Arc::new(Vocab::new(
            pieces
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u32, p.to_vec())),
            vec![9],
        ));
        let grammar = std::sync::Arc::new(grammar(Shape::AnyObject));
        let mut constraint = Constraint::new(grammar.clone(), vocab.clone());
        let mut matcher = grammar.start();
        // `{"aaaa…a": 1}`: the same state inside the key, again and again.
        let mut tokens = vec![0];
        tokens.extend([1; 40]);
        tokens.extend([2, 3, 6, 4, 5, 9]);
        for token in tokens {
            let mut logits = vec![0.5f32; 10];
            assert!(constraint.mask(&mut logits));
            let allowed: Vec<u32> = (0..10).filter(|i| logits[*i as usize] == 0.5).collect();
            assert_eq!(allowed, grammar.allowed(&matcher, &vocab));
            assert!(allowed.contains(&token));
            assert!(constraint.advance(token));
            if token != 9 {
                assert!(matcher.feed_all(&grammar, pieces[token as usize]));
            }
        }
        // A token it refuses, and an end before the value is whole, do not advance it.
        let mut fresh = Constraint::new(grammar, vocab);
        assert!(!fresh.clone().advance(9));
        assert!(!fresh.clone().advance(4));
        assert!(fresh.advance(0));
    }

    #[test]
    fn allowed_tokens_are_exactly_those_the_matcher_takes() {
        let pieces: Vec<&[u8]> = vec![
            b"{", b"}", b"{\"", b"\"", b"name", b"\":", b" ", b"\n", b"1", b"12", b"a", b"\xc3",
            b"\xa9", b"\"a", b"true", b"tr", b"ue", b",", b":", b"[", b"]", b"x\"", b"\"}",
        ];
        let vocab = Vocab::new(
            pieces
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u32, p.to_vec())),
            vec![99],
        );
        let any = grammar(Shape::AnyObject);
        let brute = |m: &Matcher| -> Vec<u32> {
            let mut ids: Vec<u32> = pieces
                .iter()
                .enumerate()
                .filter(|(_, p)| m.clone().feed_all(&any, p))
                .map(|(i, _)| i as u32)
                .collect();
            if m.can_end(&any) {
                ids.push(99);
            }
            ids
        };
        // Walk a few answers, comparing at every step.
        for text in [
            &b"{\"name\": 12, \"a\": true}"[..],
            b"{\"\xc3\xa9x\": [1, \"a\"]}",
            b"{}",
        ] {
            let mut m = any.start();
            for b in text {
                assert_eq!(any.allowed(&m, &vocab), brute(&m), "at {:?}", m);
                assert!(m.feed(&any, *b));
            }
            assert_eq!(any.allowed(&m, &vocab), vec![99], "only the end once whole");
        }
    }
}
