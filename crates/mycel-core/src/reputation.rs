//! A per-peer reputation: misbehaviour subtracts from a score that decays back towards zero.
//!
//! Penalties are weighted by how clearly a rejection shows intent: a bad signature or a
//! malformed message cannot happen by accident between honest nodes, while a late (expired)
//! statement can. A peer whose score falls below the ban threshold is disconnected and ignored
//! until the score has decayed back above it. A peer caught lying (`trust`) is banned until
//! a time whatever its score.

use std::collections::HashMap;

use crate::wire::Rejection;
use crate::{PeerId, UnixMillis};

/// How fast a score decays back towards 0 by default.
pub const DEFAULT_HALF_LIFE_MS: u64 = 10 * 60 * 1000;

/// Reputation tunables.
#[derive(Debug, Clone)]
pub struct Config {
    /// Time for a score to decay halfway back to zero.
    pub half_life_ms: u64,
    /// Score below which a peer is banned.
    pub ban_below: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            half_life_ms: DEFAULT_HALF_LIFE_MS,
            ban_below: -100.0,
        }
    }
}

/// How much a rejection costs the sender.
pub fn penalty(reason: Rejection) -> f64 {
    match reason {
        Rejection::BadSignature | Rejection::Corrupt => 25.0,
        Rejection::Oversized | Rejection::Malformed => 20.0,
        // A referred peer may have left since: a few such cost little, a goodbye full of
        // them (16 referrals) costs most of the way to a ban.
        Rejection::FromFuture | Rejection::BadReferral => 5.0,
        // Only its issuer can have signed it, and no honest node would.
        Rejection::FalseReport => 10.0,
        // As a referral to a peer that is not there: a relay that is down for a while pays a
        // little (asked again after 2 s doubling to 2 min), one that is never where it says
        // pays at every try.
        Rejection::FalseRelay => 5.0,
        // A server that cannot dial out (a firewall of its own) errs as a liar does; it is
        // named only when another server's dial-back proved it wrong within minutes.
        Rejection::FalseVerdict => 5.0,
        // A relay stops announcing itself one once its reservations are full; one that just
        // filled up may refuse before that announcement arrives (a little, now and then), one
        // that announces room it never gives pays at every request (2 s doubling to 2 min).
        Rejection::RelayRefused => 2.0,
        // No node that checks what it relays passes on more of one issuer than that issuer's
        // rate (with room for delays and a restart): a relay of a flood it never checked.
        Rejection::OverRelayed => 5.0,
        // A genuine statement that arrived after a newer one (gossip and anti-entropy race;
        // forgeries fail as bad signatures), or a training update for a round already
        // counted: news to nobody, harm to nobody.
        Rejection::Replayed => 0.0,
        Rejection::Expired | Rejection::RateLimited => 1.0,
        Rejection::Banned => 0.0,
    }
}

#[derive(Debug, Clone, Copy)]
struct Score {
    value: f64,
    at: UnixMillis,
}

/// Scores of the peers that misbehaved (everyone else is at zero), and peers isolated for
/// lying (see `trust`) until a time.
#[derive(Debug, Default)]
pub struct Reputation {
    config: Config,
    scores: HashMap<PeerId, Score>,
    isolated: HashMap<PeerId, UnixMillis>,
}

impl Reputation {
    /// An empty table.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            scores: HashMap::new(),
            isolated: HashMap::new(),
        }
    }

    fn decayed(&self, score: Score, now: UnixMillis) -> f64 {
        let elapsed = now.saturating_sub(score.at) as f64;
        score.value * 0.5f64.powf(elapsed / self.config.half_life_ms.max(1) as f64)
    }

    /// The peer's score at `now` (0 for a peer with no record).
    pub fn score(&self, peer: &PeerId, now: UnixMillis) -> f64 {
        self.scores.get(peer).map_or(0.0, |s| self.decayed(*s, now))
    }

    /// Charges `peer` for a rejected message; returns true when this crossed the ban threshold.
    pub fn penalise(&mut self, peer: PeerId, reason: Rejection, now: UnixMillis) -> bool {
        if penalty(reason) == 0.0 {
            // Nothing to charge: no record for a peer that did no harm.
            return false;
        }
        let before = self.score(&peer, now);
        let after = before - penalty(reason);
        self.scores.insert(
            peer,
            Score {
                value: after,
                at: now,
            },
        );
        before >= self.config.ban_below && after < self.config.ban_below
    }

    /// Whether `peer` is banned at `now`: its score is below the threshold, or it is
    /// isolated.
    pub fn is_banned(&self, peer: &PeerId, now: UnixMillis) -> bool {
        self.score(peer, now) < self.config.ban_below || self.isolated(peer, now)
    }

    /// Bans `peer` until `until` whatever its score: a worker caught lying.
    pub fn isolate(&mut self, peer: PeerId, until: UnixMillis) {
        let entry = self.isolated.entry(peer).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Whether `peer` is isolated at `now`.
    pub fn isolated(&self, peer: &PeerId, now: UnixMillis) -> bool {
        self.isolated.get(peer).is_some_and(|until| *until > now)
    }

    /// Drops records that have decayed to almost nothing.
    pub fn prune(&mut self, now: UnixMillis) {
        self.isolated.retain(|_, until| *until > now);
        let config_half_life = self.config.half_life_ms.max(1) as f64;
        self.scores.retain(|_, s| {
            let elapsed = now.saturating_sub(s.at) as f64;
            (s.value * 0.5f64.powf(elapsed / config_half_life)).abs() > 0.5
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_isolation_bans_until_its_time() {
        let mut rep = Reputation::new(Config::default());
        let peer = PeerId::random();
        rep.isolate(peer, 1_000);
        rep.isolate(peer, 500);
        assert!(rep.is_banned(&peer, 999), "the later time holds");
        assert!(!rep.is_banned(&peer, 1_000));
        rep.prune(1_000);
        assert!(!rep.isolated(&peer, 0), "forgotten once over");
    }

    #[test]
    fn repeated_forgeries_ban_and_decay_lifts_the_ban() {
        let mut rep = Reputation::new(Config::default());
        let peer = PeerId::random();
        let crossings: Vec<bool> = (0..5)
            .map(|_| rep.penalise(peer, Rejection::BadSignature, 0))
            .collect();
        assert_eq!(crossings, vec![false, false, false, false, true]);
        assert!(rep.is_banned(&peer, 0));
        assert!(!rep.is_banned(&PeerId::random(), 0));
        // -125 halves to -62.5 after one half-life.
        assert!(!rep.is_banned(&peer, Config::default().half_life_ms));
        assert!((rep.score(&peer, Config::default().half_life_ms) + 62.5).abs() < 1e-6);
    }
}
