//! Membership: which peers are alive, which have failed, and what each offers.
//!
//! Evidence comes from three places, all passed in by the driver with the current time:
//! direct contact (connections and pings), signed announcements (a peer describing itself,
//! with a sequence number and expiry) and signed down reports (a neighbour that lost contact
//! with a peer tells the others). The rules follow SWIM's refutation idea: a report or a local
//! observation marks a peer failed only until the peer proves otherwise with a newer
//! announcement, and a report about ourselves is answered by re-announcing.
//!
//! A peer is declared failed when
//! - it missed [`Config::max_missed_pings`] pings in a row while connected, or answered none
//!   for [`Config::silence_limit_ms`],
//! - a probe dial after losing the connection failed ([`Membership::on_unreachable`]),
//! - its latest announcement expired while we had no connection to it, or
//! - down reports from [`Config::down_quorum`] independent reporters name its latest
//!   sequence number while this node has no direct evidence that it is alive.
//!
//! Hearsay is cheap for an attacker, so a down report counts only when it can be true: its
//! reporter is a peer this node holds alive, its subject is a peer this node knows, and it
//! names the subject's announcement this node holds (a report about an older one is stale; a
//! newer one this node has not seen), and it carries the subject's word that the reporter was
//! connected to it lately ([`Contact`]). Reporters are independent when the subject's words
//! name different blocks of addresses they were connected from (keys are free, addresses
//! are not; reporters the subject told apart by key alone count one each). Each reporter
//! counts once per subject and [`Config::report_window_ms`]. A report that does not count is not passed on either. A
//! report about this node is answered by re-announcing, at most once per
//! [`Config::refute_interval_ms`] (reports in between are answered by the same
//! announcement, see [`Membership::refute_due`]); one naming an announcement this node never
//! made is a lie its issuer pays for. Every statement that changes the table is also charged
//! to its issuer's rate ([`Config::issuer_rate_per_s`]), not to the neighbour that relayed
//! it: an honest relay of a flood is not the flood's author.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::peering::GOOD_STANDING;
use crate::probe::{probe_addrs, Candidate, Vantage};
use crate::ratelimit::RateLimiter;
use crate::reach::Reachability;
use crate::statement::{
    Capabilities, Contact, DownReport, SignedStatement, Statement, MAX_CLOCK_SKEW_MS,
};
use crate::wire::Rejection;
use crate::{PeerId, UnixMillis};

/// Membership tunables.
#[derive(Debug, Clone)]
pub struct Config {
    /// Consecutive failed pings after which a connected peer is declared failed.
    pub max_missed_pings: u32,
    /// How long a failed peer stays listed before it is forgotten.
    pub forget_after_ms: u64,
    /// Most peers tracked. A newcomer past it (or past [`Config::max_statement_bytes`])
    /// takes the place of the peer least worth keeping: a failed one (failed longest ago
    /// first), else one whose reputation fell out of good standing (the lowest first, see
    /// [`Membership::set_standing`]), else the unconnected one listed most recently (a flood
    /// of new keys displaces only newcomers, never the peers known longest); a connected peer
    /// is never evicted, and when all are connected the newcomer is ignored.
    pub max_peers: usize,
    /// Most bytes of announcements held (each up to 16 KiB: 10,000 peers could otherwise
    /// hold 160 MiB).
    pub max_statement_bytes: usize,
    /// A connected peer that has answered no ping for this long is declared failed (0: never
    /// by silence alone). A frozen process keeps its connection open while each ping to it
    /// waits out a stream-negotiation timeout, so counting failed pings alone takes many
    /// times the ping interval.
    pub silence_limit_ms: u64,
    /// Independent reporters (see the module's notes) whose down reports fail a peer this
    /// node does not observe itself.
    pub down_quorum: usize,
    /// How long a down report counts toward the quorum; one reporter counts once per subject
    /// in this time.
    pub report_window_ms: u64,
    /// Least time between two refutations of reports about this node.
    pub refute_interval_ms: u64,
    /// Statements one issuer may have applied a second, on average (announcements, counted
    /// down reports), wherever they came from.
    pub issuer_rate_per_s: f64,
    /// Statements one issuer may have applied in a burst.
    pub issuer_burst: f64,
    /// How often this node asks each connected peer for its word that the two are connected
    /// (a [`Contact`], which this node's down reports about the peer carry).
    pub contact_refresh_ms: u64,
    /// How soon an ask that brought no word is repeated (a connection that closed under it, a
    /// busy peer); a new connection is asked at once.
    pub contact_retry_ms: u64,
    /// The oldest contact, by its report's issue time, that lets a down report count.
    pub contact_max_age_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_missed_pings: 3,
            forget_after_ms: 10 * 60 * 1000,
            max_peers: 10_000,
            max_statement_bytes: 16 << 20,
            silence_limit_ms: 0,
            down_quorum: 2,
            report_window_ms: 30_000,
            refute_interval_ms: 1_000,
            issuer_rate_per_s: 2.0,
            issuer_burst: 20.0,
            contact_refresh_ms: 60_000,
            contact_retry_ms: 2_000,
            contact_max_age_ms: 180_000,
        }
    }
}

/// Whether `report` carries its subject's word that `reporter` was connected to it, fresh (at
/// most `max_age` before the report and before `now`, clocks differing a little): `Ok(false)`
/// without one, with one too old or given to another witness; an error for one the subject
/// never signed.
fn contact_holds(
    report: &DownReport,
    reporter: PeerId,
    now: UnixMillis,
    max_age: u64,
) -> Result<bool, Rejection> {
    let Some(contact) = &report.contact else {
        return Ok(false);
    };
    let fresh = contact.at <= report.issued_at.saturating_add(MAX_CLOCK_SKEW_MS)
        && report.issued_at.saturating_sub(contact.at) <= max_age
        && now.saturating_sub(contact.at) <= max_age.saturating_add(MAX_CLOCK_SKEW_MS);
    if contact.witness != reporter || !fresh {
        return Ok(false);
    }
    if !contact.signed_by(&report.subject) {
        return Err(Rejection::BadSignature);
    }
    Ok(true)
}

/// A down report counted within the window.
#[derive(Debug, Clone)]
struct Report {
    reporter: PeerId,
    /// The subject's announcement it named.
    seq: u64,
    at: UnixMillis,
    /// The block the reporter was connected to the subject from, as the subject's word names
    /// it (empty: told apart by key alone).
    from: Vec<u8>,
}

/// Most reporters remembered per subject (more than any quorum needs).
const MAX_REPORTS: usize = 8;

/// How long an announcement stays fresh for gossip: a copy of one held is passed on for this
/// long after it was accepted ([`Membership::holds_fresh`]), and the driver passes one that
/// anti-entropy brought on by gossip while it is younger than this. Well within gossipsub's
/// duplicate cache (60 s), so that no statement goes round twice.
pub const RELAY_WINDOW_MS: u64 = 30_000;

/// How far in the future an announcement's issue time may be and still count as young for
/// gossip (clocks differ a little).
const YOUNG_SKEW_MS: u64 = 5_000;

/// Whether an announcement issued at `issued_at` is young enough at `now` for a node that
/// learnt it by anti-entropy to pass it on by gossip: under [`RELAY_WINDOW_MS`] old by its
/// issuer's clock, and not dated more than a little skew ahead (a date set in the future must
/// not keep a statement young for longer).
pub fn young_for_gossip(issued_at: UnixMillis, now: UnixMillis) -> bool {
    issued_at <= now + YOUNG_SKEW_MS && now.saturating_sub(issued_at) < RELAY_WINDOW_MS
}

/// Issuers whose rate is tracked at once (full buckets are dropped first).
const MAX_RATED_ISSUERS: usize = 4096;

/// How many times an issuer's burst one neighbour may relay of it at once
/// ([`Membership::admit_relayed`]): a neighbour that restarted begins with a full bucket
/// again.
const RELAYED_BURSTS: f64 = 2.0;
/// How long a neighbour may have held statements back before passing them on all at once
/// (gossipsub's forward queue keeps a message up to 5 s).
const RELAY_DELAY_S: f64 = 5.0;
/// Neighbour and issuer pairs tracked at once (full buckets are dropped first).
const MAX_RATED_RELAYS: usize = 8192;

/// Whether a peer is considered alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Reachable, or vouched for by an unexpired announcement.
    Alive,
    /// Declared failed; see [`FailReason`].
    Failed,
}

impl PeerState {
    /// A short, stable label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Failed => "failed",
        }
    }
}

/// Why a peer was declared failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// It missed too many pings while connected.
    MissedPings,
    /// The connection dropped and it could not be dialled again.
    Unreachable,
    /// Its announcement expired.
    Expired,
    /// A neighbour reported it down (the reporter's peer id).
    Reported(String),
    /// This node's probe dial to the addresses it announced went unanswered while nothing
    /// else showed it alive (no connection, no newer announcement); see [`crate::probe`].
    /// Failed here only: nobody else is told.
    Unanswered,
}

impl FailReason {
    /// Whether this node tells others with a signed down report: only for what it saw of its
    /// own connection to the peer break. Expiry and hearsay need no retelling, and one
    /// unanswered probe is this node's view alone (a network path may be down here only).
    pub fn warrants_report(&self) -> bool {
        matches!(self, Self::MissedPings | Self::Unreachable)
    }

    /// A short, stable label (as serialised, without the reporter).
    pub fn label(&self) -> &'static str {
        match self {
            Self::MissedPings => "missed_pings",
            Self::Unreachable => "unreachable",
            Self::Expired => "expired",
            Self::Reported(_) => "reported",
            Self::Unanswered => "unanswered",
        }
    }
}

/// How this node is connected to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// At least one connection goes straight to the peer (dialled, or a punched hole).
    Direct,
    /// Every connection goes through a relay.
    Relayed,
}

/// What this node knows about one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's id (base58).
    pub peer_id: String,
    /// Alive or failed.
    pub state: PeerState,
    /// When the state last changed.
    pub state_since: UnixMillis,
    /// Why it failed, when it did.
    pub fail_reason: Option<FailReason>,
    /// Whether we hold a connection to it now.
    pub connected: bool,
    /// Last measured round-trip time of a ping, in microseconds.
    pub rtt_us: Option<u64>,
    /// Last time we heard from or about it (connection, ping or announcement).
    pub last_seen: UnixMillis,
    /// Sequence number of its latest accepted announcement (0: none yet).
    pub seq: u64,
    /// When that announcement was received.
    pub announced_at: UnixMillis,
    /// When that announcement expires.
    pub expires_at: UnixMillis,
    /// What it offers, from its latest announcement.
    pub capabilities: Option<Capabilities>,
    /// Where it listens, from its latest announcement.
    pub addrs: Vec<String>,
    /// Whether it can be dialled from outside, as it announced.
    #[serde(default)]
    pub reachability: Reachability,
    /// Whether it serves as a relay, as it announced.
    #[serde(default)]
    pub relay: bool,
    /// The operator that runs it (base58 id of the operator's key), when its announcement
    /// carries the operator's signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// How we are connected to it now (none while not connected); filled in by the network
    /// driver, which knows its connections, when it answers a query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<Link>,
    /// Milliseconds from our first relayed connection to it to the first direct one (a
    /// punched hole, or a direct dial that got through), while connected; filled in by the
    /// network driver like `link`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_after_ms: Option<u64>,
    /// Whether it was at its connection cap when it announced (referrals skip it).
    #[serde(default)]
    pub full: bool,
    /// When the peer last gave its word that this node is connected to it (its time): this
    /// node's down reports about it count only with one lately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_at: Option<UnixMillis>,
    /// Whether this node holds the peer banned (its score below the threshold, or isolated
    /// for a lie): its messages are dropped unread. Filled in by the network driver.
    #[serde(default)]
    pub banned: bool,
}

/// A change of a peer's state, for the driver to act on (log, metrics, persist, notify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The peer became alive (new, or recovered).
    Alive(PeerId),
    /// The peer was declared failed.
    Failed(PeerId, FailReason),
}

/// The outcome of an accepted statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// A newer announcement was stored; `change` is set when the peer's state changed.
    Announcement {
        /// The state change it caused, if any.
        change: Option<Change>,
    },
    /// The same announcement again (normal with gossip plus anti-entropy).
    Duplicate,
    /// A down report was applied; `change` is set when it failed the subject.
    Down {
        /// The state change it caused, if any.
        change: Option<Change>,
    },
    /// A peer reported this node down: re-announce with a higher sequence number to refute.
    Refute,
    /// A valid statement that does not count here and is not to be passed on: a down report
    /// about a peer this node does not know, or about an announcement other than the one it
    /// holds, from a reporter it does not hold alive, repeated, or contradicted by this node's
    /// own contact with the subject; or a report about this node that the next refutation
    /// answers.
    Ignored,
}

/// Who pays for a refused statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    /// The neighbour that sent it: the statement itself is invalid (it does not decode, its
    /// signature fails, it expired), which an honest neighbour checks before relaying.
    Sender,
    /// Its verified issuer: the statement is genuine, and honest neighbours relay it, but its
    /// issuer is over its rate or lied.
    Issuer(PeerId),
}

/// A refused statement: why, and who pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Why it was refused.
    pub reason: Rejection,
    /// Who is charged for it.
    pub culprit: Culprit,
}

impl From<Rejection> for Refusal {
    fn from(reason: Rejection) -> Self {
        Self {
            reason,
            culprit: Culprit::Sender,
        }
    }
}

impl Refusal {
    fn issuer(reason: Rejection, issuer: PeerId) -> Self {
        Self {
            reason,
            culprit: Culprit::Issuer(issuer),
        }
    }
}

#[derive(Debug)]
struct Entry {
    info: PeerInfo,
    latest: Option<SignedStatement>,
    missed_pings: u32,
    /// When the peer last answered a ping (or connected).
    last_pong: UnixMillis,
    /// Down reports within the window: reporter, the announcement (sequence number) it
    /// named, and when it arrived. A reporter counts once per window whatever it names, so a
    /// refutation does not let the same reporters fail the peer again at once.
    reports: Vec<Report>,
    /// When this node first listed the peer.
    first_seen: UnixMillis,
    /// Its reputation score when it was last charged, and when, if that left it out of good
    /// standing (it decays as reputation does).
    bad_standing: Option<(f64, UnixMillis)>,
    /// This node dialled it and got through (probes try such peers before strangers).
    met: bool,
    /// The peer's latest word that this node is connected to it, and when it came (this
    /// node's clock).
    contact: Option<(Contact, UnixMillis)>,
    /// When this node last asked the peer for it, and how many asks since a word came or the
    /// connection opened (each waits twice as long as the one before).
    contact_asked: Option<(UnixMillis, u32)>,
}

/// The membership table of one node.
#[derive(Debug)]
pub struct Membership {
    local: PeerId,
    config: Config,
    peers: HashMap<PeerId, Entry>,
    own: Option<(u64, SignedStatement)>,
    /// When [`Membership::tick`] last ran.
    last_tick: Option<UnixMillis>,
    /// Statements applied per issuer.
    issuer_rate: RateLimiter<PeerId>,
    /// Statements relayed by gossip per neighbour and issuer.
    relayed: RateLimiter<(PeerId, PeerId)>,
    /// Bytes of the announcements held (see [`Config::max_statement_bytes`]).
    stored_bytes: usize,
    /// When this node last refuted a report about itself.
    last_refute: Option<UnixMillis>,
    /// A report about this node's announcement with this sequence number waits for the next
    /// refutation.
    refute_pending: Option<u64>,
    /// Peers evicted to make room for others so far.
    evicted: u64,
}

impl Membership {
    /// An empty table for the node `local`.
    pub fn new(local: PeerId, config: Config) -> Self {
        let issuer_rate = RateLimiter::new(
            config.issuer_rate_per_s,
            config.issuer_burst,
            MAX_RATED_ISSUERS,
        );
        let relayed = RateLimiter::new(
            config.issuer_rate_per_s,
            RELAYED_BURSTS * config.issuer_burst + RELAY_DELAY_S * config.issuer_rate_per_s,
            MAX_RATED_RELAYS,
        );
        Self {
            local,
            config,
            peers: HashMap::new(),
            own: None,
            last_tick: None,
            issuer_rate,
            relayed,
            stored_bytes: 0,
            last_refute: None,
            refute_pending: None,
            evicted: 0,
        }
    }

    /// Checks a statement claiming `issuer` that the neighbour `relay` passed on by gossip,
    /// before anything of it is decoded or verified. A node passes on only statements it
    /// accepted, and accepts each issuer's at most at the issuer's rate (announcements and
    /// counted down reports), so no node that checks what it relays passes on more of one
    /// issuer than that rate allows; twice the burst and five seconds' worth are allowed on
    /// top, for a neighbour that restarted or held messages back. Past it the neighbour is
    /// relaying what it never checked (or a flood of its own under another key): it pays
    /// ([`Rejection::OverRelayed`]) and the statement is dropped unread. A flood injected at
    /// several points therefore costs its injectors, never the honest nodes between them, who
    /// pass on only what each issuer's rate let through. Statements of the neighbour itself
    /// (charged to it as their issuer) and of this node are not counted here.
    pub fn admit_relayed(
        &mut self,
        relay: PeerId,
        issuer: PeerId,
        now: UnixMillis,
    ) -> Result<(), Rejection> {
        if issuer == relay || issuer == self.local || self.relayed.allow((relay, issuer), now) {
            Ok(())
        } else {
            Err(Rejection::OverRelayed)
        }
    }

    /// Whether `data`, decoded as `signed`, is exactly the encoding of the latest
    /// announcement held for its issuer, received less than [`RELAY_WINDOW_MS`] ago. Gossip
    /// delivers such a copy after anti-entropy brought the statement first; passing it on is
    /// what carries the statement past this node (a copy refused as a duplicate goes no
    /// further). Only the one encoding of what this node verified itself is passed on, so
    /// that variants of it (a byte appended, the fields reordered: each a new gossip message
    /// that decodes the same) cannot make the network forward a statement over and over; and
    /// only while gossip's duplicate cache still holds that copy, so a replay later on is
    /// not spread again.
    pub fn holds_fresh(&self, signed: &SignedStatement, data: &[u8], now: UnixMillis) -> bool {
        let Some(issuer) = signed.claimed_issuer() else {
            return false;
        };
        self.peers.get(&issuer).is_some_and(|e| {
            e.latest.as_ref() == Some(signed)
                && now.saturating_sub(e.info.announced_at) < RELAY_WINDOW_MS
                && signed.to_bytes() == data
        })
    }

    /// Records this node's own latest announcement (served to peers by anti-entropy).
    pub fn set_own(&mut self, seq: u64, signed: SignedStatement) {
        self.own = Some((seq, signed));
    }

    /// This node's latest announcement and its sequence number.
    pub fn own(&self) -> Option<&(u64, SignedStatement)> {
        self.own.as_ref()
    }

    /// Records `peer`'s reputation `score` at `now`, after it was charged: while it stays
    /// out of good standing (`peering::GOOD_STANDING`; it decays with a 10-minute half-life,
    /// as reputation does) the peer is among the first evicted when the table is full (after
    /// failed peers).
    pub fn set_standing(&mut self, peer: &PeerId, score: f64, now: UnixMillis) {
        if let Some(entry) = self.peers.get_mut(peer) {
            entry.bad_standing = (score <= GOOD_STANDING).then_some((score, now));
        }
    }

    /// Makes room for `extra` more bytes of announcements and, when `peer` is not listed, one
    /// more peer, by evicting the peers least worth keeping (never `peer`, never a connected
    /// one). False when there is no such room.
    fn make_room(&mut self, peer: PeerId, extra: usize, now: UnixMillis) -> bool {
        let new = !self.peers.contains_key(&peer);
        while (new && self.peers.len() >= self.config.max_peers)
            || self.stored_bytes.saturating_add(extra) > self.config.max_statement_bytes
        {
            // Failed first (longest ago first), then peers out of good standing (the lowest
            // score first), then the peer listed most recently: keys are free, so a flood of
            // new ones only displaces newcomers, never the peers known longest (whom a sybil
            // would have had to outlast).
            let victim = self
                .peers
                .iter()
                .filter(|(p, e)| **p != peer && !e.info.connected)
                .min_by_key(|(_, e)| {
                    let standing = e.bad_standing.map(|(score, at)| {
                        let elapsed = now.saturating_sub(at) as f64;
                        score
                            * 0.5f64.powf(elapsed / crate::reputation::DEFAULT_HALF_LIFE_MS as f64)
                    });
                    match (e.info.state, standing) {
                        (PeerState::Failed, _) => (0, e.info.state_since),
                        (PeerState::Alive, Some(score)) if score <= GOOD_STANDING => {
                            (1, ((score.max(-1e6) + 1e6) * 1e3) as u64)
                        }
                        (PeerState::Alive, _) => (2, u64::MAX - e.first_seen),
                    }
                })
                .map(|(p, _)| *p);
            let Some(victim) = victim else {
                return false;
            };
            if let Some(gone) = self.peers.remove(&victim) {
                self.stored_bytes -= gone.latest.as_ref().map_or(0, stored_len);
                self.evicted += 1;
            }
        }
        true
    }

    /// Peers evicted from the table to make room for others since the start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn entry(&mut self, peer: PeerId, now: UnixMillis) -> Option<&mut Entry> {
        if !self.make_room(peer, 0, now) {
            return None;
        }
        Some(self.peers.entry(peer).or_insert_with(|| Entry {
            info: PeerInfo {
                peer_id: peer.to_base58(),
                state: PeerState::Failed,
                state_since: now,
                fail_reason: None,
                connected: false,
                rtt_us: None,
                last_seen: now,
                seq: 0,
                announced_at: 0,
                expires_at: 0,
                capabilities: None,
                addrs: Vec::new(),
                reachability: Reachability::Unknown,
                relay: false,
                operator: None,
                link: None,
                direct_after_ms: None,
                full: false,
                contact_at: None,
                banned: false,
            },
            latest: None,
            missed_pings: 0,
            last_pong: now,
            reports: Vec::new(),
            first_seen: now,
            bad_standing: None,
            met: false,
            contact: None,
            contact_asked: None,
        }))
    }

    /// Verifies and applies a statement received from the network.
    pub fn on_statement(
        &mut self,
        signed: &SignedStatement,
        now: UnixMillis,
    ) -> Result<Accepted, Refusal> {
        // Gossip and anti-entropy deliver the same announcement many times: a copy of the one
        // held (verified when it came) is settled without decoding it again.
        if let Some(issuer) = signed.claimed_issuer() {
            let held = if issuer == self.local {
                self.own.as_ref().map(|(_, s)| s)
            } else {
                self.peers.get(&issuer).and_then(|e| e.latest.as_ref())
            };
            if held == Some(signed) {
                return Ok(Accepted::Duplicate);
            }
        }
        // Other duplicates are settled from the claimed sequence number before paying for
        // the signature check. An older one is checked: gossip and sync race, so an honest
        // neighbour relays a genuine statement after a newer one now and then (`Replayed`,
        // which costs nothing), while a forged one is a bad signature.
        let claimed = signed.peek()?;
        if let Statement::Announce(a) = &claimed.statement {
            if let Some(entry) = self.peers.get(&claimed.issuer) {
                if a.seq == entry.info.seq {
                    return Ok(Accepted::Duplicate);
                }
                if a.seq < entry.info.seq {
                    signed.verify(now)?;
                    return Err(Rejection::Replayed.into());
                }
            }
        }
        let verified = signed.verify(now)?;
        let issuer = verified.issuer;
        if issuer == self.local {
            return Ok(Accepted::Duplicate);
        }
        match verified.statement {
            Statement::Announce(announcement) => {
                // A sequence number of 0 (or not above the one held) is no news, and must not
                // make room by evicting anyone.
                let held_seq = self.peers.get(&issuer).map_or(0, |e| e.info.seq);
                if announcement.seq <= held_seq {
                    return Ok(Accepted::Duplicate);
                }
                // Only the issuer can make a newer announcement, so it pays for each.
                if !self.issuer_rate.allow(issuer, now) {
                    return Err(Refusal::issuer(Rejection::RateLimited, issuer));
                }
                // An operator's word that fails can only be the issuer's doing (its own
                // signature covers it), and neighbours that do not know the field relay it.
                if let Some(operator) = &announcement.operator {
                    operator
                        .check(&issuer)
                        .map_err(|reason| Refusal::issuer(reason, issuer))?;
                }
                let held = self
                    .peers
                    .get(&issuer)
                    .and_then(|e| e.latest.as_ref())
                    .map_or(0, stored_len);
                if !self.make_room(issuer, stored_len(signed).saturating_sub(held), now) {
                    return Ok(Accepted::Duplicate);
                }
                let Some(entry) = self.entry(issuer, now) else {
                    return Ok(Accepted::Duplicate);
                };
                // Settled before the signature check for a peer already listed.
                if announcement.seq <= entry.info.seq {
                    return Ok(Accepted::Duplicate);
                }
                let info = &mut entry.info;
                info.seq = announcement.seq;
                info.announced_at = now;
                info.expires_at = announcement.expires_at;
                info.capabilities = Some(announcement.capabilities);
                info.addrs = announcement.addrs;
                info.reachability = announcement.reachability;
                info.relay = announcement.relay;
                info.full = announcement.full;
                // The operator's signature was checked with the statement's.
                info.operator = announcement
                    .operator
                    .as_ref()
                    .and_then(|o| o.id())
                    .map(|id| id.to_base58());
                info.last_seen = now;
                let old = entry.latest.replace(signed.clone());
                self.stored_bytes =
                    self.stored_bytes - old.as_ref().map_or(0, stored_len) + stored_len(signed);
                let entry = self.peers.get_mut(&issuer).expect("just updated");
                Ok(Accepted::Announcement {
                    change: set_alive(entry, issuer, now),
                })
            }
            Statement::Down(report) => self.on_down_report(issuer, report, now),
        }
    }

    fn on_down_report(
        &mut self,
        reporter: PeerId,
        report: DownReport,
        now: UnixMillis,
    ) -> Result<Accepted, Refusal> {
        if report.subject == self.local {
            return self.on_report_about_self(reporter, &report, now);
        }
        let reporter_alive = self
            .peers
            .get(&reporter)
            .is_some_and(|e| e.info.state == PeerState::Alive && e.latest.is_some());
        if !reporter_alive {
            return Ok(Accepted::Ignored);
        }
        let window = self.config.report_window_ms;
        let quorum = self.config.down_quorum.max(1);
        let Some(entry) = self.peers.get_mut(&report.subject) else {
            return Ok(Accepted::Ignored);
        };
        // Direct evidence beats hearsay; a report about another announcement than the one
        // held is stale (older) or cannot be checked (newer).
        let directly_alive = entry.info.connected && entry.missed_pings == 0;
        if directly_alive || entry.latest.is_none() || report.subject_seq != entry.info.seq {
            return Ok(Accepted::Ignored);
        }
        entry.reports.retain(|r| now.saturating_sub(r.at) < window);
        if entry.reports.len() >= MAX_REPORTS
            || entry.reports.iter().any(|r| r.reporter == reporter)
        {
            return Ok(Accepted::Ignored);
        }
        if !self.issuer_rate.allow(reporter, now) {
            return Err(Refusal::issuer(Rejection::RateLimited, reporter));
        }
        // Only a peer that was connected to the subject lately has the subject's word for it.
        match contact_holds(&report, reporter, now, self.config.contact_max_age_ms) {
            Ok(true) => {}
            Ok(false) => return Ok(Accepted::Ignored),
            Err(reason) => return Err(Refusal::issuer(reason, reporter)),
        }
        let from = report.contact.map(|c| c.from).unwrap_or_default();
        // A block already heard from adds nothing, and must not take the room of reporters
        // from other blocks (eight keys of one block would otherwise fill it for the window).
        if !from.is_empty() && entry.reports.iter().any(|r| r.from == from) {
            return Ok(Accepted::Ignored);
        }
        entry.reports.push(Report {
            reporter,
            seq: report.subject_seq,
            at: now,
            from,
        });
        // Independent reporters: each block is held once (above), and each reporter told apart
        // by key alone counts on its own.
        let naming_this = entry
            .reports
            .iter()
            .filter(|r| r.seq == entry.info.seq)
            .count();
        if entry.info.state == PeerState::Failed || naming_this < quorum {
            return Ok(Accepted::Down { change: None });
        }
        let reason = FailReason::Reported(reporter.to_base58());
        Ok(Accepted::Down {
            change: set_failed(entry, report.subject, reason, now),
        })
    }

    /// A report that this node is down: refuted by a newer announcement, at most once per
    /// [`Config::refute_interval_ms`].
    fn on_report_about_self(
        &mut self,
        reporter: PeerId,
        report: &DownReport,
        now: UnixMillis,
    ) -> Result<Accepted, Refusal> {
        let subject_seq = report.subject_seq;
        let Some(own_seq) = self.own.as_ref().map(|(seq, _)| *seq) else {
            return Ok(Accepted::Ignored);
        };
        if subject_seq > own_seq {
            return Err(Refusal::issuer(Rejection::FalseReport, reporter));
        }
        if subject_seq < own_seq {
            return Ok(Accepted::Ignored);
        }
        // A report without this node's own word that its reporter was connected to it counts
        // nowhere: nothing to refute (no durable write for it). (A skew more than others
        // allow: a node whose clock is behind this one's still counts it that long.)
        let max_age = self
            .config
            .contact_max_age_ms
            .saturating_add(MAX_CLOCK_SKEW_MS);
        match contact_holds(report, reporter, now, max_age) {
            Ok(true) => {}
            Ok(false) => return Ok(Accepted::Ignored),
            Err(reason) => return Err(Refusal::issuer(reason, reporter)),
        }
        let recently = self
            .last_refute
            .is_some_and(|at| now.saturating_sub(at) < self.config.refute_interval_ms);
        if recently {
            self.refute_pending = Some(own_seq);
            return Ok(Accepted::Ignored);
        }
        self.last_refute = Some(now);
        self.refute_pending = None;
        Ok(Accepted::Refute)
    }

    /// Whether a report about this node that arrived too soon after the last refutation is
    /// due to be refuted now (re-announce when true). Call periodically.
    pub fn refute_due(&mut self, now: UnixMillis) -> bool {
        let Some(reported) = self.refute_pending else {
            return false;
        };
        let own_seq = self.own.as_ref().map_or(0, |(seq, _)| *seq);
        if own_seq > reported {
            // Announced since: that refuted it.
            self.refute_pending = None;
            return false;
        }
        if self
            .last_refute
            .is_some_and(|at| now.saturating_sub(at) < self.config.refute_interval_ms)
        {
            return false;
        }
        self.refute_pending = None;
        self.last_refute = Some(now);
        true
    }

    /// A connection to `peer` was established.
    pub fn on_connected(&mut self, peer: PeerId, now: UnixMillis) -> Option<Change> {
        let entry = self.entry(peer, now)?;
        if !entry.info.connected {
            // A new connection: ask for the peer's word over it at once.
            entry.contact_asked = None;
        }
        entry.info.connected = true;
        entry.info.last_seen = now;
        entry.missed_pings = 0;
        entry.last_pong = now;
        set_alive(entry, peer, now)
    }

    /// This node dialled `peer` and got through (probes try such peers before strangers: a
    /// stranger's key can connect to us, but cannot make us reach it where it is not).
    pub fn on_dialled(&mut self, peer: PeerId) {
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.met = true;
        }
    }

    /// The last connection to `peer` closed. The driver should probe it and report the outcome.
    pub fn on_disconnected(&mut self, peer: PeerId, now: UnixMillis) {
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.info.connected = false;
            entry.info.last_seen = now;
        }
    }

    /// A ping to `peer` succeeded with the given round-trip time.
    pub fn on_ping_ok(&mut self, peer: PeerId, rtt_us: u64, now: UnixMillis) -> Option<Change> {
        let entry = self.peers.get_mut(&peer)?;
        entry.info.rtt_us = Some(rtt_us);
        entry.info.last_seen = now;
        entry.missed_pings = 0;
        entry.last_pong = now;
        set_alive(entry, peer, now)
    }

    /// A ping to `peer` failed.
    pub fn on_ping_failure(&mut self, peer: PeerId, now: UnixMillis) -> Option<Change> {
        let max = self.config.max_missed_pings;
        let entry = self.peers.get_mut(&peer)?;
        entry.missed_pings = entry.missed_pings.saturating_add(1);
        if entry.missed_pings >= max && entry.info.state == PeerState::Alive {
            return set_failed(entry, peer, FailReason::MissedPings, now);
        }
        None
    }

    /// A probe dial to `peer` (after its connection dropped) failed.
    pub fn on_unreachable(&mut self, peer: PeerId, now: UnixMillis) -> Option<Change> {
        let entry = self.peers.get_mut(&peer)?;
        if entry.info.connected || entry.info.state == PeerState::Failed {
            return None;
        }
        set_failed(entry, peer, FailReason::Unreachable, now)
    }

    /// The peers a probe may test (see [`crate::probe`]): held alive on an announcement with no
    /// connection, with addresses that `vantage` can dial directly ([`probe_addrs`]).
    pub fn probe_candidates(&self, vantage: &Vantage) -> Vec<Candidate<PeerId>> {
        self.peers
            .iter()
            .filter(|(_, e)| {
                e.info.state == PeerState::Alive && !e.info.connected && e.latest.is_some()
            })
            .filter_map(|(peer, e)| {
                let addrs = probe_addrs(&e.info.addrs, e.info.reachability, vantage);
                (!addrs.is_empty()).then_some(Candidate {
                    peer: *peer,
                    seq: e.info.seq,
                    met: e.met,
                    addrs,
                })
            })
            .collect()
    }

    /// A probe of `peer`, picked while its announcement `seq` was held, went unanswered: it
    /// fails here ([`FailReason::Unanswered`]) unless something showed it alive since (a
    /// connection, a newer announcement). Nothing counts toward a quorum of reports.
    pub fn on_probe_unanswered(
        &mut self,
        peer: PeerId,
        seq: u64,
        now: UnixMillis,
    ) -> Option<Change> {
        let entry = self.peers.get_mut(&peer)?;
        if entry.info.state != PeerState::Alive
            || entry.info.connected
            || entry.latest.is_none()
            || entry.info.seq != seq
        {
            return None;
        }
        set_failed(entry, peer, FailReason::Unanswered, now)
    }

    /// Expires announcements and forgets long-failed peers. Call periodically.
    pub fn tick(&mut self, now: UnixMillis) -> Vec<Change> {
        let mut changes = Vec::new();
        let forget_after = self.config.forget_after_ms;
        let silence_limit = self.config.silence_limit_ms;
        // Ticks far apart mean this node did not run (stopped, starved of CPU): its peers'
        // silence over that time is its own, so their clocks start again.
        if self
            .last_tick
            .is_some_and(|last| now.saturating_sub(last) > silence_limit / 2)
        {
            for entry in self.peers.values_mut() {
                entry.last_pong = entry.last_pong.max(now);
            }
        }
        self.last_tick = Some(now);
        let mut forgotten = 0;
        self.peers.retain(|peer, entry| {
            let info = &entry.info;
            if silence_limit > 0
                && info.state == PeerState::Alive
                && info.connected
                && now.saturating_sub(entry.last_pong) > silence_limit
            {
                changes.extend(set_failed(entry, *peer, FailReason::MissedPings, now));
                return true;
            }
            if info.state == PeerState::Alive && !info.connected && info.expires_at <= now {
                changes.extend(set_failed(entry, *peer, FailReason::Expired, now));
                return true;
            }
            let keep = !(entry.info.state == PeerState::Failed
                && now.saturating_sub(entry.info.state_since) > forget_after);
            if !keep {
                forgotten += entry.latest.as_ref().map_or(0, stored_len);
            }
            keep
        });
        self.stored_bytes -= forgotten;
        changes
    }

    /// A down report about `subject` for this node to sign and gossip, if it knows the peer
    /// and holds its word that the two were connected (without it the report would count
    /// for nothing anywhere).
    pub fn down_report(&self, subject: PeerId, now: UnixMillis, ttl_ms: u64) -> Option<Statement> {
        let entry = self.peers.get(&subject)?;
        let contact = entry
            .contact
            .as_ref()
            .map(|(c, _)| c.clone())
            .filter(|c| now.saturating_sub(c.at) <= self.config.contact_max_age_ms)?;
        Some(Statement::Down(DownReport {
            subject,
            subject_seq: entry.info.seq,
            issued_at: now,
            expires_at: now + ttl_ms,
            contact: Some(contact),
        }))
    }

    /// Connected live peers to ask for their word that this node is connected to them (a
    /// [`Contact`]): those whose last word came more than [`Config::contact_refresh_ms`] ago
    /// (by this node's clock) or never, and whose last ask is past its wait:
    /// [`Config::contact_retry_ms`] after the first unanswered ask since a word came or the
    /// connection opened, twice that after the next, up to the refresh time (a peer that never
    /// answers is not asked every tick). At most `limit`, each marked asked.
    pub fn contacts_wanted(&mut self, now: UnixMillis, limit: usize) -> Vec<PeerId> {
        let (refresh, retry) = (self.config.contact_refresh_ms, self.config.contact_retry_ms);
        let mut wanted = Vec::new();
        for (peer, entry) in &mut self.peers {
            if wanted.len() >= limit {
                break;
            }
            let fresh = entry
                .contact
                .as_ref()
                .is_some_and(|(_, came)| now.saturating_sub(*came) < refresh);
            let (waiting, asks) = match entry.contact_asked {
                Some((at, asks)) => {
                    let wait = retry
                        .saturating_mul(1 << asks.saturating_sub(1).min(16))
                        .min(refresh);
                    (now.saturating_sub(at) < wait, asks)
                }
                None => (false, 0),
            };
            if entry.info.connected && entry.info.state == PeerState::Alive && !fresh && !waiting {
                entry.contact_asked = Some((now, asks.saturating_add(1)));
                wanted.push(*peer);
            }
        }
        wanted
    }

    /// Keeps `subject`'s word that this node is connected to it. One that names another
    /// witness or does not verify is refused (the subject's fault); one too old or dated too
    /// far ahead is not kept (`Ok(false)`: clocks differ).
    pub fn on_contact(
        &mut self,
        subject: PeerId,
        contact: Contact,
        now: UnixMillis,
    ) -> Result<bool, Rejection> {
        if contact.witness != self.local || !contact.signed_by(&subject) {
            return Err(Rejection::BadSignature);
        }
        if contact.at > now.saturating_add(MAX_CLOCK_SKEW_MS)
            || now.saturating_sub(contact.at) > self.config.contact_max_age_ms
        {
            return Ok(false);
        }
        let Some(entry) = self.peers.get_mut(&subject) else {
            return Ok(false);
        };
        if entry
            .contact
            .as_ref()
            .is_none_or(|(c, _)| c.at < contact.at)
        {
            entry.info.contact_at = Some(contact.at);
            entry.contact = Some((contact, now));
            // Answered: the next ask, a refresh away, starts the waits afresh.
            entry.contact_asked = None;
        }
        Ok(true)
    }

    /// The latest sequence number known for every announced peer, this node included.
    pub fn digest(&self) -> Vec<(PeerId, u64)> {
        let mut digest: Vec<(PeerId, u64)> = self
            .peers
            .iter()
            .filter(|(_, e)| e.latest.is_some())
            .map(|(p, e)| (*p, e.info.seq))
            .collect();
        if let Some((seq, _)) = &self.own {
            digest.push((self.local, *seq));
        }
        digest
    }

    /// A 32-byte summary of [`Membership::digest`]: two nodes with equal summaries have
    /// nothing to teach each other, so a periodic sync can stop after exchanging it.
    pub fn digest_summary(&self) -> [u8; 32] {
        let mut digest = self.digest();
        digest.sort_unstable_by_key(|(peer, _)| *peer);
        let mut hasher = blake3::Hasher::new();
        for (peer, seq) in digest {
            let bytes = peer.to_bytes();
            hasher.update(&[bytes.len() as u8]);
            hasher.update(&bytes);
            hasher.update(&seq.to_le_bytes());
        }
        *hasher.finalize().as_bytes()
    }

    /// Announcements this node holds that are newer than those in `digest` (anti-entropy),
    /// at most `limit` of them.
    pub fn newer_than(&self, digest: &[(PeerId, u64)], limit: usize) -> Vec<SignedStatement> {
        let known: HashMap<PeerId, u64> = digest.iter().copied().collect();
        let is_newer = |peer: &PeerId, seq: u64| known.get(peer).is_none_or(|k| *k < seq);
        let own = self
            .own
            .iter()
            .filter(|(seq, _)| is_newer(&self.local, *seq))
            .map(|(_, s)| s.clone());
        let others = self
            .peers
            .iter()
            .filter(|(p, e)| e.info.state == PeerState::Alive && is_newer(p, e.info.seq))
            .filter_map(|(_, e)| e.latest.clone());
        own.chain(others).take(limit).collect()
    }

    /// The latest announcement of `peer` held here (to refer a newcomer to it).
    pub fn latest(&self, peer: &PeerId) -> Option<&SignedStatement> {
        self.peers.get(peer).and_then(|e| e.latest.as_ref())
    }

    /// What is known about `peer`.
    pub fn get(&self, peer: &PeerId) -> Option<&PeerInfo> {
        self.peers.get(peer).map(|e| &e.info)
    }

    /// Every known peer.
    pub fn peers(&self) -> impl Iterator<Item = (&PeerId, &PeerInfo)> {
        self.peers.iter().map(|(p, e)| (p, &e.info))
    }

    /// Counts of (alive, alive with capabilities, failed) peers.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for entry in self.peers.values() {
            match entry.info.state {
                PeerState::Alive => {
                    counts.0 += 1;
                    if entry.info.capabilities.is_some() {
                        counts.1 += 1;
                    }
                }
                PeerState::Failed => counts.2 += 1,
            }
        }
        counts
    }
}

/// The bytes a held statement takes.
fn stored_len(signed: &SignedStatement) -> usize {
    signed.body.len() + signed.public_key.len() + signed.signature.len()
}

fn set_alive(entry: &mut Entry, peer: PeerId, now: UnixMillis) -> Option<Change> {
    if entry.info.state == PeerState::Alive {
        return None;
    }
    entry.info.state = PeerState::Alive;
    entry.info.state_since = now;
    entry.info.fail_reason = None;
    Some(Change::Alive(peer))
}

fn set_failed(
    entry: &mut Entry,
    peer: PeerId,
    reason: FailReason,
    now: UnixMillis,
) -> Option<Change> {
    if entry.info.state == PeerState::Failed && entry.info.fail_reason.is_some() {
        return None;
    }
    entry.info.state = PeerState::Failed;
    entry.info.state_since = now;
    entry.info.fail_reason = Some(reason.clone());
    Some(Change::Failed(peer, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statement::{Announcement, Hardware, Operator};
    use crate::Keypair;

    const TTL: u64 = 10_000;

    fn announce(key: &Keypair, seq: u64, now: UnixMillis) -> SignedStatement {
        let caps = Capabilities {
            hardware: Hardware {
                cores: seq as u32,
                memory_bytes: 1,
                gpu: None,
            },
            ..Default::default()
        };
        SignedStatement::sign(
            key,
            &Statement::Announce(Announcement {
                seq,
                issued_at: now,
                expires_at: now + TTL,
                capabilities: caps,
                addrs: vec![format!("/ip4/127.0.0.1/tcp/{seq}")],
                reachability: Default::default(),
                relay: false,
                operator: None,
                full: false,
            }),
        )
    }

    #[test]
    fn an_operators_word_is_kept_and_a_false_one_is_charged_to_its_issuer() {
        let (_, mut table) = table();
        let (node, liar, operator) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        let with_word = |key: &Keypair, word: Operator| {
            let mut statement = announce(key, 1, 100).verify(100).unwrap().statement;
            if let Statement::Announce(a) = &mut statement {
                a.operator = Some(word);
            }
            SignedStatement::sign(key, &statement)
        };
        let node_id = node.public().to_peer_id();
        let word = Operator::vouch(&operator, &node_id);
        table
            .on_statement(&with_word(&node, word.clone()), 100)
            .unwrap();
        assert_eq!(
            table.get(&node_id).unwrap().operator,
            Some(operator.public().to_peer_id().to_base58())
        );
        // Another node's word: the liar pays, not whoever relayed it, and is not stored.
        let liar_id = liar.public().to_peer_id();
        let refusal = table
            .on_statement(&with_word(&liar, word), 100)
            .unwrap_err();
        assert_eq!(refusal.reason, Rejection::BadSignature);
        assert_eq!(refusal.culprit, Culprit::Issuer(liar_id));
        assert!(table.get(&liar_id).is_none());
    }

    fn table() -> (Keypair, Membership) {
        let local = Keypair::generate_ed25519();
        let table = Membership::new(local.public().to_peer_id(), Config::default());
        (local, table)
    }

    #[test]
    fn announcement_makes_a_peer_alive_with_capabilities() {
        let (_, mut table) = table();
        let peer = Keypair::generate_ed25519();
        let id = peer.public().to_peer_id();
        let accepted = table.on_statement(&announce(&peer, 1, 100), 100).unwrap();
        assert_eq!(
            accepted,
            Accepted::Announcement {
                change: Some(Change::Alive(id))
            }
        );
        let info = table.get(&id).unwrap();
        assert_eq!(info.state, PeerState::Alive);
        assert_eq!(info.capabilities.as_ref().unwrap().hardware.cores, 1);
        assert_eq!(info.addrs, vec!["/ip4/127.0.0.1/tcp/1".to_owned()]);
        assert_eq!(table.counts(), (1, 1, 0));
    }

    #[test]
    fn only_the_exact_copy_of_a_fresh_held_announcement_is_passed_on() {
        let (_, mut table) = table();
        let peer = Keypair::generate_ed25519();
        let first = announce(&peer, 1, 100);
        let bytes = first.to_bytes();
        // Nothing held for a stranger: its copies are for `on_statement` to judge.
        assert!(!table.holds_fresh(&first, &bytes, 100));
        // Accepted (by anti-entropy, say) well after it was issued: freshness runs from here.
        table.on_statement(&first, 4_000).unwrap();
        // The same bytes again (gossip after anti-entropy): a duplicate, passed on.
        assert_eq!(
            table.on_statement(&first, 4_100).unwrap(),
            Accepted::Duplicate
        );
        assert!(table.holds_fresh(&first, &bytes, 4_100));
        assert!(table.holds_fresh(&first, &bytes, 4_000 + RELAY_WINDOW_MS - 1));
        // A variant that decodes the same (a byte appended): a new gossip message each time,
        // never passed on.
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(!table.holds_fresh(&first, &padded, 4_100));
        // The same sequence number with another body (an issuer saying two things), or the
        // held body under a signature that is not the issuer's: never passed on unchecked.
        let other_body = announce(&peer, 1, 150);
        assert_ne!(other_body, first);
        assert!(!table.holds_fresh(&other_body, &other_body.to_bytes(), 4_100));
        let mut forged = first.clone();
        forged.signature[0] ^= 1;
        assert!(!table.holds_fresh(&forged, &forged.to_bytes(), 4_100));
        // Long after it arrived, gossip's duplicate cache has let it go: a replay then is not
        // spread again.
        assert!(!table.holds_fresh(&first, &bytes, 4_000 + RELAY_WINDOW_MS));
        // Superseded: the older copy is no longer what is held.
        let second = announce(&peer, 2, 4_200);
        table.on_statement(&second, 4_200).unwrap();
        assert!(!table.holds_fresh(&first, &bytes, 4_200));
        assert!(table.holds_fresh(&second, &second.to_bytes(), 4_200));
    }

    #[test]
    fn an_announcement_is_young_for_gossip_within_the_window_and_a_little_skew() {
        let now = 100_000;
        assert!(young_for_gossip(now, now));
        assert!(young_for_gossip(now - RELAY_WINDOW_MS + 1, now));
        assert!(!young_for_gossip(now - RELAY_WINDOW_MS, now));
        assert!(young_for_gossip(now + YOUNG_SKEW_MS, now));
        assert!(!young_for_gossip(now + YOUNG_SKEW_MS + 1, now));
    }

    #[test]
    fn same_sequence_is_a_duplicate_and_older_is_a_replay() {
        let (_, mut table) = table();
        let peer = Keypair::generate_ed25519();
        table.on_statement(&announce(&peer, 5, 100), 100).unwrap();
        assert_eq!(
            table.on_statement(&announce(&peer, 5, 100), 101),
            Ok(Accepted::Duplicate)
        );
        assert_eq!(
            table.on_statement(&announce(&peer, 4, 100), 102),
            Err(Rejection::Replayed.into())
        );
        // An older statement that was never signed by its issuer is a forgery, not a replay.
        let mut forged = announce(&peer, 3, 100);
        forged.signature[0] ^= 0xff;
        assert_eq!(
            table.on_statement(&forged, 103),
            Err(Rejection::BadSignature.into())
        );
        assert_eq!(table.get(&peer.public().to_peer_id()).unwrap().seq, 5);
    }

    #[test]
    fn expired_announcement_fails_an_unconnected_peer_and_a_newer_one_revives_it() {
        let (_, mut table) = table();
        let peer = Keypair::generate_ed25519();
        let id = peer.public().to_peer_id();
        table.on_statement(&announce(&peer, 1, 0), 0).unwrap();
        assert!(table.tick(TTL - 1).is_empty());
        assert_eq!(
            table.tick(TTL),
            vec![Change::Failed(id, FailReason::Expired)]
        );
        assert!(table.tick(TTL + 1).is_empty(), "a failure is reported once");
        let revived = table
            .on_statement(&announce(&peer, 2, TTL + 5), TTL + 5)
            .unwrap();
        assert_eq!(
            revived,
            Accepted::Announcement {
                change: Some(Change::Alive(id))
            }
        );
    }

    #[test]
    fn missed_pings_fail_a_connected_peer_after_the_configured_count() {
        let (_, mut table) = table();
        let id = Keypair::generate_ed25519().public().to_peer_id();
        table.on_connected(id, 0);
        assert_eq!(table.on_ping_failure(id, 1), None);
        assert_eq!(table.on_ping_failure(id, 2), None);
        assert_eq!(
            table.on_ping_failure(id, 3),
            Some(Change::Failed(id, FailReason::MissedPings))
        );
        assert_eq!(table.on_ping_ok(id, 150, 4), Some(Change::Alive(id)));
        assert_eq!(table.get(&id).unwrap().rtt_us, Some(150));
    }

    #[test]
    fn a_connected_peer_silent_past_the_limit_fails_and_its_next_pong_revives_it() {
        let local = Keypair::generate_ed25519().public().to_peer_id();
        let config = Config {
            silence_limit_ms: 3_000,
            ..Config::default()
        };
        let mut table = Membership::new(local, config);
        let id = Keypair::generate_ed25519().public().to_peer_id();
        table.on_connected(id, 0);
        assert_eq!(table.on_ping_ok(id, 100, 1_000), None);
        // No ping answered, none failed either (each one still negotiating a stream).
        for t in (1_000..4_000).step_by(500) {
            assert!(table.tick(t).is_empty());
        }
        assert!(table.tick(4_000).is_empty(), "3 s since the last pong");
        assert_eq!(
            table.tick(4_001),
            vec![Change::Failed(id, FailReason::MissedPings)]
        );
        assert!(table.tick(5_000).is_empty(), "reported once");
        assert_eq!(table.on_ping_ok(id, 100, 5_100), Some(Change::Alive(id)));
        // This node itself stalled for 10 s: nobody is failed for the silence it caused.
        for t in (15_100..=18_100).step_by(500) {
            assert!(table.tick(t).is_empty(), "at {t}");
        }
        assert_eq!(
            table.tick(18_101),
            vec![Change::Failed(id, FailReason::MissedPings)],
            "a fresh window from the stall on"
        );
        // Without a limit, silence alone fails nobody.
        let mut quiet = Membership::new(local, Config::default());
        quiet.on_connected(id, 0);
        assert!(quiet.tick(1_000_000).is_empty());
    }

    /// `reporter`'s report that `subject` is down, carrying the subject's word (signed at
    /// `now`) that the reporter was connected to it.
    fn down(reporter: &Keypair, subject: &Keypair, seq: u64, now: UnixMillis) -> SignedStatement {
        let witness = reporter.public().to_peer_id();
        let contact = Contact::sign(subject, witness, now);
        report_with(
            reporter,
            subject.public().to_peer_id(),
            seq,
            now,
            Some(contact),
        )
    }

    fn report_with(
        reporter: &Keypair,
        subject: PeerId,
        seq: u64,
        now: UnixMillis,
        contact: Option<Contact>,
    ) -> SignedStatement {
        SignedStatement::sign(
            reporter,
            &Statement::Down(DownReport {
                subject,
                subject_seq: seq,
                issued_at: now,
                expires_at: now + TTL,
                contact,
            }),
        )
    }

    #[test]
    fn a_down_report_counts_only_with_the_subjects_word_that_its_reporter_was_connected() {
        let (_, mut table) = table();
        let [r1, r2, subject, other] = [(); 4].map(|_| Keypair::generate_ed25519());
        let [r1id, r2id, sid] = [&r1, &r2, &subject].map(|k| k.public().to_peer_id());
        for key in [&r1, &r2, &subject] {
            table.on_statement(&announce(key, 1, 0), 0).unwrap();
        }
        let max_age = Config::default().contact_max_age_ms;
        // Without the subject's word, with the word it gave another witness, or with one too
        // old: the report counts for nothing.
        let late = max_age + 20;
        for (report, now, what) in [
            (report_with(&r1, sid, 1, 10, None), 10, "no contact"),
            (
                report_with(&r1, sid, 1, 10, Some(Contact::sign(&subject, r2id, 10))),
                10,
                "another witness's contact",
            ),
            (
                report_with(&r1, sid, 1, late, Some(Contact::sign(&subject, r1id, 10))),
                late,
                "a contact too old",
            ),
        ] {
            assert_eq!(
                table.on_statement(&report, now),
                Ok(Accepted::Ignored),
                "{what}"
            );
        }
        // A report dated back to a contact long past, applied later: still too old.
        let backdated = SignedStatement::sign(
            &r1,
            &Statement::Down(DownReport {
                subject: sid,
                subject_seq: 1,
                issued_at: 10,
                expires_at: 10 + crate::statement::MAX_LIFETIME_MS,
                contact: Some(Contact::sign(&subject, r1id, 10)),
            }),
        );
        let much_later = 10 + max_age + MAX_CLOCK_SKEW_MS + 1;
        assert_eq!(
            table.on_statement(&backdated, much_later),
            Ok(Accepted::Ignored),
            "a backdated report"
        );
        // A contact the subject never signed is a lie its carrier pays for.
        assert_eq!(
            table.on_statement(
                &report_with(&r1, sid, 1, 30, Some(Contact::sign(&other, r1id, 30))),
                30
            ),
            Err(Refusal::issuer(Rejection::BadSignature, r1id))
        );
        assert_eq!(table.get(&sid).unwrap().state, PeerState::Alive);
        // With the subject's word, two reporters make the quorum.
        assert_eq!(
            table.on_statement(&down(&r1, &subject, 1, 40), 40),
            Ok(Accepted::Down { change: None })
        );
        let reason = FailReason::Reported(r2id.to_base58());
        assert_eq!(
            table.on_statement(&down(&r2, &subject, 1, 41), 41),
            Ok(Accepted::Down {
                change: Some(Change::Failed(sid, reason))
            })
        );
    }

    #[test]
    fn contacts_are_asked_of_connected_peers_once_per_refresh_and_kept_only_when_true() {
        let (local, mut table) = table();
        let me = local.public().to_peer_id();
        let [a, b] = [(); 2].map(|_| Keypair::generate_ed25519());
        let [aid, bid] = [&a, &b].map(|k| k.public().to_peer_id());
        for key in [&a, &b] {
            table.on_statement(&announce(key, 1, 0), 0).unwrap();
        }
        table.on_connected(aid, 0);
        let refresh = Config::default().contact_refresh_ms;
        assert_eq!(
            table.contacts_wanted(1, 16),
            vec![aid],
            "only the connected peer"
        );
        assert!(table.contacts_wanted(2, 16).is_empty(), "asked once");
        assert!(
            table.down_report(aid, 2, TTL).is_none(),
            "no word, no report"
        );
        // A word naming another witness, or signed by another key, is refused.
        assert_eq!(
            table.on_contact(aid, Contact::sign(&a, bid, 3), 3),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            table.on_contact(aid, Contact::sign(&b, me, 3), 3),
            Err(Rejection::BadSignature)
        );
        // Nothing kept: asked again later.
        let t = 1 + refresh / 4;
        assert_eq!(table.contacts_wanted(t, 16), vec![aid]);
        assert_eq!(table.on_contact(aid, Contact::sign(&a, me, t), t), Ok(true));
        assert!(
            table.contacts_wanted(t + refresh / 2, 16).is_empty(),
            "fresh"
        );
        assert_eq!(
            table.contacts_wanted(t + refresh, 16),
            vec![aid],
            "refreshed"
        );
        let Some(Statement::Down(report)) = table.down_report(aid, t + 1, TTL) else {
            panic!("a report")
        };
        assert_eq!(report.contact.map(|c| (c.witness, c.at)), Some((me, t)));
        assert!(table.down_report(bid, t, TTL).is_none(), "never connected");
        let max_age = Config::default().contact_max_age_ms;
        assert!(
            table.down_report(aid, t + max_age + 1, TTL).is_none(),
            "a word too old to count"
        );
        // An ask that got no answer is repeated after the retry time, then after twice it,
        // or at once over a new connection.
        let retry = Config::default().contact_retry_ms;
        table.on_connected(bid, t + 2);
        assert_eq!(table.contacts_wanted(t + 3, 16), vec![bid]);
        assert!(table.contacts_wanted(t + 4, 16).is_empty());
        let again = t + 3 + retry;
        assert_eq!(table.contacts_wanted(again, 16), vec![bid], "retried");
        assert!(
            table.contacts_wanted(again + retry, 16).is_empty(),
            "backs off"
        );
        assert_eq!(
            table.contacts_wanted(again + 2 * retry, 16),
            vec![bid],
            "after twice the wait"
        );
        let later = again + 2 * retry + 1;
        table.on_disconnected(bid, later);
        table.on_connected(bid, later + 1);
        assert_eq!(
            table.contacts_wanted(later + 2, 16),
            vec![bid],
            "a new connection"
        );
    }

    /// Keys are free, addresses are not: reporters the subject saw connected from one block
    /// of addresses count as one toward the quorum, however many keys it is; a reporter from
    /// another block makes the quorum; one the subject told apart by key alone counts too.
    #[test]
    fn reporters_from_one_block_of_addresses_count_once_toward_the_quorum() {
        let (_, mut table) = table();
        let [s1, s2, s3, other, unblocked] = [(); 5].map(|_| Keypair::generate_ed25519());
        let subject = Keypair::generate_ed25519();
        let sid = subject.public().to_peer_id();
        for key in [&s1, &s2, &s3, &other, &unblocked] {
            table.on_statement(&announce(key, 1, 0), 0).unwrap();
        }
        table.on_statement(&announce(&subject, 3, 0), 0).unwrap();
        let alive = |t: &Membership| t.get(&sid).unwrap().state == PeerState::Alive;
        let from = |reporter: &Keypair, block: &[u8], now: UnixMillis| {
            let witness = reporter.public().to_peer_id();
            let contact = Contact::sign_from(&subject, witness, now, block.to_vec());
            report_with(reporter, sid, 3, now, Some(contact))
        };
        let sybils = [10, 0, 0, 0];
        assert_eq!(
            table.on_statement(&from(&s1, &sybils, 10), 10),
            Ok(Accepted::Down { change: None })
        );
        // More keys of that block are set aside (not passed on, taking no room).
        for (k, key) in [&s2, &s3].into_iter().enumerate() {
            let t = 11 + k as u64;
            assert_eq!(
                table.on_statement(&from(key, &sybils, t), t),
                Ok(Accepted::Ignored),
                "sybil {k}"
            );
        }
        assert_eq!(table.peers[&sid].reports.len(), 1);
        assert!(
            alive(&table),
            "three keys from one block failed the subject"
        );
        // A block the subject names differently (another word would not verify: the block is
        // signed with it).
        let mut contact =
            Contact::sign_from(&subject, other.public().to_peer_id(), 20, sybils.to_vec());
        contact.from = vec![10, 0, 1, 0];
        let forged = report_with(&other, sid, 3, 20, Some(contact));
        assert_eq!(
            table.on_statement(&forged, 20),
            Err(Refusal::issuer(
                Rejection::BadSignature,
                other.public().to_peer_id()
            ))
        );
        assert!(alive(&table));
        let reason = FailReason::Reported(other.public().to_peer_id().to_base58());
        assert_eq!(
            table.on_statement(&from(&other, &[10, 0, 1, 0], 21), 21),
            Ok(Accepted::Down {
                change: Some(Change::Failed(sid, reason))
            })
        );
        // Elsewhere, a sybil of the first block and a reporter told apart by key alone make
        // a quorum.
        let (_, mut fresh) = self::table();
        for key in [&s1, &unblocked] {
            fresh.on_statement(&announce(key, 1, 0), 0).unwrap();
        }
        fresh.on_statement(&announce(&subject, 3, 0), 0).unwrap();
        fresh.on_statement(&from(&s1, &sybils, 40), 40).unwrap();
        assert!(alive(&fresh));
        let reason = FailReason::Reported(unblocked.public().to_peer_id().to_base58());
        assert_eq!(
            fresh.on_statement(&down(&unblocked, &subject, 3, 41), 41),
            Ok(Accepted::Down {
                change: Some(Change::Failed(sid, reason))
            })
        );
    }

    #[test]
    fn down_reports_fail_a_subject_only_from_a_quorum_of_live_reporters_naming_its_announcement() {
        let (_, mut table) = table();
        let [r1, r2, stranger] = [(); 3].map(|_| Keypair::generate_ed25519());
        let subject = Keypair::generate_ed25519();
        let sid = subject.public().to_peer_id();
        table.on_statement(&announce(&r1, 1, 0), 0).unwrap();
        table.on_statement(&announce(&r2, 1, 0), 0).unwrap();
        table.on_statement(&announce(&subject, 3, 0), 0).unwrap();
        let alive = |t: &Membership| t.get(&sid).unwrap().state == PeerState::Alive;

        // Reports that cannot be true, or cannot be checked, count for nothing and go no
        // further: from a key nobody knows, about an older or a newer announcement than the
        // one held (u64::MAX included), about a peer nobody knows.
        for (report, what) in [
            (down(&stranger, &subject, 3, 10), "an unknown reporter"),
            (down(&r1, &subject, 2, 10), "an older announcement"),
            (down(&r1, &subject, 4, 10), "an announcement not seen here"),
            (down(&r1, &subject, u64::MAX, 10), "u64::MAX"),
            (down(&r1, &stranger, 1, 10), "an unknown subject"),
        ] {
            assert_eq!(
                table.on_statement(&report, 10),
                Ok(Accepted::Ignored),
                "{what}"
            );
        }
        assert!(alive(&table));

        // While we are connected and pings succeed, hearsay is ignored.
        table.on_connected(sid, 11);
        assert_eq!(
            table.on_statement(&down(&r1, &subject, 3, 12), 12),
            Ok(Accepted::Ignored)
        );
        table.on_disconnected(sid, 13);

        // One live reporter is not enough, and counts once however often it repeats itself.
        assert_eq!(
            table.on_statement(&down(&r1, &subject, 3, 14), 14),
            Ok(Accepted::Down { change: None })
        );
        assert_eq!(
            table.on_statement(&down(&r1, &subject, 3, 15), 15),
            Ok(Accepted::Ignored)
        );
        assert!(alive(&table));
        // A second one makes the quorum.
        let reason = FailReason::Reported(r2.public().to_peer_id().to_base58());
        assert_eq!(
            table.on_statement(&down(&r2, &subject, 3, 16), 16),
            Ok(Accepted::Down {
                change: Some(Change::Failed(sid, reason))
            })
        );

        // The subject refutes with a newer announcement.
        let back = table.on_statement(&announce(&subject, 4, 20), 20).unwrap();
        assert_eq!(
            back,
            Accepted::Announcement {
                change: Some(Change::Alive(sid))
            }
        );
        // The same reporters cannot fail it again at once: each counts once per window.
        for r in [&r1, &r2] {
            assert_eq!(
                table.on_statement(&down(r, &subject, 4, 21), 21),
                Ok(Accepted::Ignored)
            );
        }
        assert!(
            alive(&table),
            "refuted, and not failed again by the same two"
        );
    }

    #[test]
    fn probe_candidates_are_peers_held_alive_on_an_announcement_without_a_connection() {
        let (_, mut table) = table();
        let [quiet, connected, failed, met] = [(); 4].map(|_| Keypair::generate_ed25519());
        let id = |k: &Keypair| k.public().to_peer_id();
        for key in [&quiet, &connected, &failed, &met] {
            table.on_statement(&announce(key, 1, 0), 0).unwrap();
        }
        // A peer known only from a connection has no announcement to probe by.
        let bare = Keypair::generate_ed25519();
        table.on_connected(id(&bare), 0);
        table.on_disconnected(id(&bare), 0);
        table.on_connected(id(&connected), 0);
        table.on_connected(id(&met), 0);
        table.on_dialled(id(&met));
        table.on_disconnected(id(&met), 1);
        // Inbound only: still a stranger.
        table.on_connected(id(&quiet), 0);
        table.on_disconnected(id(&quiet), 1);
        table.on_connected(id(&failed), 0);
        table.on_ping_failure(id(&failed), 1);
        table.on_ping_failure(id(&failed), 2);
        table.on_ping_failure(id(&failed), 3);
        table.on_disconnected(id(&failed), 3);
        let here = Vantage::of(["/ip4/127.0.0.1/tcp/9"]);
        let mut found: Vec<(PeerId, bool, Vec<String>)> = table
            .probe_candidates(&here)
            .into_iter()
            .map(|c| (c.peer, c.met, c.addrs))
            .collect();
        found.sort_unstable_by_key(|(p, ..)| *p);
        let mut expected = vec![
            (id(&quiet), false, vec!["/ip4/127.0.0.1/tcp/1".to_string()]),
            (id(&met), true, vec!["/ip4/127.0.0.1/tcp/1".to_string()]),
        ];
        expected.sort_unstable_by_key(|(p, ..)| *p);
        assert_eq!(found, expected);
        // Loopback addresses are no way in from a node on a network.
        let lan = Vantage::of(["/ip4/10.0.0.1/tcp/9"]);
        assert!(table.probe_candidates(&lan).is_empty());
    }

    #[test]
    fn an_unanswered_probe_fails_a_peer_here_only_and_counts_toward_no_quorum() {
        let (_, mut table) = table();
        let [r1, r2, subject] = [(); 3].map(|_| Keypair::generate_ed25519());
        let (r2id, sid) = (r2.public().to_peer_id(), subject.public().to_peer_id());
        for key in [&r1, &r2, &subject] {
            table.on_statement(&announce(key, 1, 0), 0).unwrap();
        }
        // Unknown peers, and an announcement other than the one probed: nothing.
        let stranger = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(table.on_probe_unanswered(stranger, 1, 10), None);
        assert_eq!(table.on_probe_unanswered(sid, 2, 10), None);
        // One counted report, below the quorum of two.
        let accepted = table.on_statement(&down(&r1, &subject, 1, 10), 10).unwrap();
        assert_eq!(accepted, Accepted::Down { change: None });
        // A connection shows it alive: the probe's silence means nothing.
        table.on_connected(sid, 20);
        assert_eq!(table.on_probe_unanswered(sid, 1, 20), None);
        table.on_disconnected(sid, 30);
        assert_eq!(
            table.on_probe_unanswered(sid, 1, 40),
            Some(Change::Failed(sid, FailReason::Unanswered))
        );
        assert_eq!(table.on_probe_unanswered(sid, 1, 41), None, "once");
        // No retelling, and the probe was no report: a newer announcement revives it, and a
        // second reporter naming it then does not fail it (r1's report named the old one).
        assert!(!FailReason::Unanswered.warrants_report());
        let revived = table.on_statement(&announce(&subject, 2, 50), 50).unwrap();
        assert_eq!(
            revived,
            Accepted::Announcement {
                change: Some(Change::Alive(sid))
            }
        );
        table.on_statement(&down(&r2, &subject, 2, 60), 60).unwrap();
        assert_eq!(table.get(&sid).unwrap().state, PeerState::Alive);
        assert_eq!(table.peers[&sid].reports.len(), 2);
        assert!(table.peers[&sid].reports.iter().any(|r| r.reporter == r2id));
    }

    #[test]
    fn only_a_broken_connection_of_this_node_warrants_a_down_report() {
        let told: Vec<bool> = [
            FailReason::MissedPings,
            FailReason::Unreachable,
            FailReason::Expired,
            FailReason::Reported("x".into()),
            FailReason::Unanswered,
        ]
        .iter()
        .map(FailReason::warrants_report)
        .collect();
        assert_eq!(told, [true, true, false, false, false]);
    }

    #[test]
    fn reports_past_the_window_no_longer_count_toward_the_quorum() {
        let (_, mut table) = table();
        let [r1, r2, subject] = [(); 3].map(|_| Keypair::generate_ed25519());
        let sid = subject.public().to_peer_id();
        for key in [&r1, &r2, &subject] {
            table.on_statement(&announce(key, 1, 0), 0).unwrap();
        }
        let window = Config::default().report_window_ms;
        // Announcements that outlive the window, so that expiry stays out of it.
        let long = |key: &Keypair, seq, now: UnixMillis| {
            SignedStatement::sign(
                key,
                &Statement::Announce(Announcement {
                    seq,
                    issued_at: now,
                    expires_at: now + 3 * window,
                    capabilities: Capabilities::default(),
                    addrs: Vec::new(),
                    reachability: Default::default(),
                    relay: false,
                    operator: None,
                    full: false,
                }),
            )
        };
        for key in [&r1, &r2, &subject] {
            table.on_statement(&long(key, 2, 1), 1).unwrap();
        }
        let report = |key: &Keypair, now: UnixMillis| {
            SignedStatement::sign(
                key,
                &Statement::Down(DownReport {
                    subject: sid,
                    subject_seq: 2,
                    issued_at: now,
                    expires_at: now + 3 * window,
                    contact: Some(Contact::sign(&subject, key.public().to_peer_id(), now)),
                }),
            )
        };
        assert_eq!(
            table.on_statement(&report(&r1, 10), 10),
            Ok(Accepted::Down { change: None })
        );
        let later = 10 + window;
        assert_eq!(
            table.on_statement(&report(&r2, later), later),
            Ok(Accepted::Down { change: None }),
            "the first report has lapsed"
        );
        assert_eq!(table.get(&sid).unwrap().state, PeerState::Alive);
        // The first reporter may speak again, and now the two make a quorum.
        assert!(matches!(
            table.on_statement(&report(&r1, later + 1), later + 1),
            Ok(Accepted::Down {
                change: Some(Change::Failed(..))
            })
        ));
    }

    #[test]
    fn a_report_about_self_is_refuted_at_most_once_per_interval_and_a_false_one_costs_its_issuer() {
        let (local, mut table) = table();
        let reporter = Keypair::generate_ed25519();
        let rid = reporter.public().to_peer_id();
        // Before this node has announced, there is nothing to refute.
        assert_eq!(
            table.on_statement(&down(&reporter, &local, 7, 1), 1),
            Ok(Accepted::Ignored)
        );
        table.set_own(7, announce(&local, 7, 0));
        // Without this node's own word that the reporter was connected to it, a report counts
        // nowhere: nothing to refute.
        assert_eq!(
            table.on_statement(
                &report_with(&reporter, local.public().to_peer_id(), 7, 2, None),
                2
            ),
            Ok(Accepted::Ignored)
        );
        assert_eq!(
            table.on_statement(&down(&reporter, &local, 7, 2), 2),
            Ok(Accepted::Refute)
        );
        // This node re-announced (seq 8); a report about seq 7 is stale now.
        table.set_own(8, announce(&local, 8, 3));
        assert_eq!(
            table.on_statement(&down(&reporter, &local, 7, 4), 4),
            Ok(Accepted::Ignored)
        );
        // A report about seq 8 within the interval waits; many of them make one refutation.
        for t in 5..50 {
            assert_eq!(
                table.on_statement(&down(&reporter, &local, 8, t), t),
                Ok(Accepted::Ignored)
            );
        }
        let interval = Config::default().refute_interval_ms;
        assert!(!table.refute_due(2 + interval - 1));
        assert!(table.refute_due(2 + interval));
        assert!(!table.refute_due(2 + interval + 1), "once");
        // A pending refutation is dropped when this node announced meanwhile.
        table.set_own(9, announce(&local, 9, 2 + interval));
        let t = 2 + interval + 10;
        assert_eq!(
            table.on_statement(&down(&reporter, &local, 9, t), t),
            Ok(Accepted::Ignored)
        );
        table.set_own(10, announce(&local, 10, t + 1));
        assert!(!table.refute_due(t + 10 * interval));
        // Nobody can have seen an announcement this node never made.
        assert_eq!(
            table.on_statement(&down(&reporter, &local, 11, t + 2), t + 2),
            Err(Refusal {
                reason: Rejection::FalseReport,
                culprit: Culprit::Issuer(rid)
            })
        );
    }

    #[test]
    fn an_issuer_over_its_rate_pays_and_replays_of_its_statements_cost_it_nothing() {
        let (_, mut table) = table();
        let flooder = Keypair::generate_ed25519();
        let fid = flooder.public().to_peer_id();
        let burst = Config::default().issuer_burst as u64;
        for seq in 1..=burst {
            assert!(table.on_statement(&announce(&flooder, seq, 0), 0).is_ok());
        }
        assert_eq!(
            table.on_statement(&announce(&flooder, burst + 1, 0), 0),
            Err(Refusal {
                reason: Rejection::RateLimited,
                culprit: Culprit::Issuer(fid)
            })
        );
        // Copies of what it already said (a relay passing them on again) are not charged.
        for _ in 0..100 {
            assert_eq!(
                table.on_statement(&announce(&flooder, burst, 0), 1),
                Ok(Accepted::Duplicate)
            );
        }
        // Its rate refills.
        assert!(table
            .on_statement(&announce(&flooder, burst + 1, 1_000), 1_000)
            .is_ok());
    }

    #[test]
    fn honest_relays_of_a_flood_pass_the_relay_check_and_its_injector_does_not() {
        let issuer = Keypair::generate_ed25519();
        let iid = issuer.public().to_peer_id();
        let (honest, injector) = (
            Keypair::generate_ed25519().public().to_peer_id(),
            Keypair::generate_ed25519().public().to_peer_id(),
        );
        let (_, mut victim) = table();
        // The issuer floods an honest relay with 100 announcements a second for 30 s; the
        // relay restarts (its buckets full again) halfway. What it accepts it passes on, each
        // held back by up to 5 s in its queue (a made-up spread of delays, late ones bunched).
        let mut arrivals = Vec::new();
        let (_, mut relay) = table();
        let mut seq = 0;
        for step in 0..3_000u64 {
            let now = step * 10;
            if step == 1_500 {
                relay = table().1;
            }
            seq += 1;
            if let Ok(Accepted::Announcement { .. }) =
                relay.on_statement(&announce(&issuer, seq, now), now)
            {
                let delay = (step * 7_919) % 5_001;
                arrivals.push(now + delay);
            }
        }
        assert!(arrivals.len() > 60, "the relay accepted {}", arrivals.len());
        arrivals.sort_unstable();
        for at in arrivals {
            assert_eq!(victim.admit_relayed(honest, iid, at), Ok(()));
        }
        // The injector passes on everything: past twice the burst and five seconds' worth it
        // pays, and the honest relay's standing for the same issuer is its own.
        let bound = (2.0 * 20.0 + 5.0 * 2.0) as usize;
        let admitted = (0..1_000)
            .filter(|_| victim.admit_relayed(injector, iid, 40_000).is_ok())
            .count();
        assert_eq!(admitted, bound);
        assert_eq!(
            victim.admit_relayed(injector, iid, 40_000),
            Err(Rejection::OverRelayed)
        );
        assert_eq!(victim.admit_relayed(honest, iid, 40_000), Ok(()));
        // A neighbour's own statements are charged to it as their issuer, not here.
        assert!((0..1_000).all(|_| victim.admit_relayed(injector, injector, 40_000).is_ok()));
    }

    #[test]
    fn anti_entropy_returns_only_what_the_requester_lacks() {
        let (local, mut table) = table();
        let local_id = local.public().to_peer_id();
        table.set_own(1, announce(&local, 1, 0));
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        table.on_statement(&announce(&a, 2, 0), 0).unwrap();
        table.on_statement(&announce(&b, 5, 0), 0).unwrap();

        let mut digest = table.digest();
        digest.sort_by_key(|(_, seq)| *seq);
        assert_eq!(digest.len(), 3);

        let requester = [(a.public().to_peer_id(), 2), (b.public().to_peer_id(), 4)];
        let mut missing: Vec<PeerId> = table
            .newer_than(&requester, 100)
            .iter()
            .map(|s| s.verify(1).unwrap().issuer)
            .collect();
        missing.sort();
        let mut expected = vec![local_id, b.public().to_peer_id()];
        expected.sort();
        assert_eq!(missing, expected);
        assert_eq!(
            table.newer_than(&[], 1).len(),
            1,
            "the limit bounds the answer"
        );
    }

    #[test]
    fn digest_summaries_match_exactly_when_the_digests_do() {
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        let local = Keypair::generate_ed25519().public().to_peer_id();
        let mut first = Membership::new(local, Config::default());
        let mut second = Membership::new(local, Config::default());
        // Learned in different orders.
        first.on_statement(&announce(&a, 1, 0), 0).unwrap();
        first.on_statement(&announce(&b, 3, 0), 0).unwrap();
        second.on_statement(&announce(&b, 3, 0), 0).unwrap();
        second.on_statement(&announce(&a, 1, 0), 0).unwrap();
        assert_eq!(first.digest_summary(), second.digest_summary());

        second.on_statement(&announce(&a, 2, 1), 1).unwrap();
        assert_ne!(first.digest_summary(), second.digest_summary());
        first.on_statement(&announce(&a, 2, 1), 1).unwrap();
        assert_eq!(first.digest_summary(), second.digest_summary());
    }

    #[test]
    fn a_full_table_evicts_the_peers_least_worth_keeping_instead_of_ignoring_newcomers() {
        let local = Keypair::generate_ed25519().public().to_peer_id();
        let config = Config {
            max_peers: 3,
            ..Config::default()
        };
        let mut table = Membership::new(local, config);
        let keys: Vec<Keypair> = (0..6).map(|_| Keypair::generate_ed25519()).collect();
        let id = |k: usize| keys[k].public().to_peer_id();
        // 0 connected, 1 listed early, 2 listed later.
        table.on_connected(id(0), 0);
        table.on_statement(&announce(&keys[1], 1, 10), 10).unwrap();
        table.on_statement(&announce(&keys[2], 1, 20), 20).unwrap();
        // A newcomer takes the place of the unconnected peer listed most recently (2): the
        // peer known longest (1) stays, and so does the connected one.
        assert!(matches!(
            table.on_statement(&announce(&keys[3], 1, 30), 30),
            Ok(Accepted::Announcement { .. })
        ));
        assert!(table.get(&id(2)).is_none());
        assert!(table.get(&id(0)).is_some() && table.get(&id(1)).is_some());
        // A failed peer goes before any alive one.
        table.on_disconnected(id(0), 31);
        table.on_unreachable(id(0), 32);
        table.on_statement(&announce(&keys[4], 1, 40), 40).unwrap();
        assert!(table.get(&id(0)).is_none(), "the failed peer was evicted");
        assert!(table.get(&id(1)).is_some() && table.get(&id(3)).is_some());
        // An announcement with sequence number 0 evicts nobody.
        let zero = Keypair::generate_ed25519();
        assert_eq!(
            table.on_statement(&announce(&zero, 0, 41), 41),
            Ok(Accepted::Duplicate)
        );
        assert!(table.get(&id(4)).is_some());
        // A peer out of good standing goes before the newest, even though it was listed
        // early (1 is older than 3 and 4).
        table.set_standing(&id(1), -30.0, 41);
        table.set_standing(&id(3), -5.0, 41);
        let late = Keypair::generate_ed25519();
        table.on_statement(&announce(&late, 1, 42), 42).unwrap();
        assert!(
            table.get(&id(1)).is_none(),
            "the peer in bad standing was evicted"
        );
        assert!(table.get(&id(3)).is_some() && table.get(&id(4)).is_some());
        // Everyone connected: the newcomer is ignored, nobody evicted.
        for peer in [id(3), id(4), late.public().to_peer_id()] {
            table.on_connected(peer, 50);
        }
        assert_eq!(
            table.on_statement(&announce(&keys[5], 1, 60), 60),
            Ok(Accepted::Duplicate)
        );
        assert_eq!(table.peers().count(), 3);
    }

    #[test]
    fn the_bytes_of_announcements_held_are_bounded() {
        let local = Keypair::generate_ed25519().public().to_peer_id();
        let one = stored_len(&announce(&Keypair::generate_ed25519(), 1, 0));
        let config = Config {
            max_statement_bytes: 4 * one + one / 2,
            ..Config::default()
        };
        let mut table = Membership::new(local, config);
        let keys: Vec<Keypair> = (0..20).map(|_| Keypair::generate_ed25519()).collect();
        for (t, key) in keys.iter().enumerate() {
            let t = t as u64;
            table.on_statement(&announce(key, 1, t), t).unwrap();
            assert!(table.stored_bytes <= 4 * one + one / 2);
        }
        assert_eq!(table.peers().count(), 4);
        // The three known longest stayed; newcomers displaced newcomers.
        for key in &keys[..3] {
            assert!(table.get(&key.public().to_peer_id()).is_some());
        }
        // Evicted peers gave their bytes back: the count is exactly what the four hold.
        assert_eq!(table.stored_bytes, 4 * one);
    }

    #[test]
    fn failed_peers_are_forgotten_after_the_configured_time() {
        let (_, mut table) = table();
        let id = Keypair::generate_ed25519().public().to_peer_id();
        table.on_connected(id, 0);
        table.on_disconnected(id, 1);
        assert!(table.on_unreachable(id, 2).is_some());
        table.tick(3);
        assert!(table.get(&id).is_some());
        table.tick(2 + Config::default().forget_after_ms + 1);
        assert!(table.get(&id).is_none());
    }
}
