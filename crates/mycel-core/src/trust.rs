//! What each peer's work has shown: a decayed record of its successes, failures, timeouts,
//! disagreements (the minority side of a settled quorum) and invalid answers, and isolation
//! of a peer whose record falls below a threshold, for a back-off that doubles with each
//! repeat offence.
//!
//! The score is `(successes + 1) / (successes + 1 + bad)`, where `bad` weighs a failure or a
//! timeout 1, an invalid answer 5 and a disagreement 10: a lie costs more than a long record
//! of honest work earns back quickly. A lie (a disagreement or an invalid answer) that
//! leaves the score below [`Config::isolate_below`] isolates the peer (no tasks are routed
//! to it, and it is cut off in the network, see `reputation::Reputation::isolate`) for
//! `base_isolation_ms · 2^offences`, capped. Failures and timeouts lower the score (and the
//! router's reliability ranks such peers last) but do not isolate on their own: a peer that
//! is down or slow is no liar, and isolating it for a minute would keep a recovering peer
//! (one behind a relay that is not ready yet, say) out for no gain. Pure: time comes in as
//! arguments.

use std::collections::HashMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

/// How a task involving a peer ended, for that peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered, and (where checked) its answer agreed with the accepted one.
    Success,
    /// It refused for a fault of its own or its stream broke.
    Failure,
    /// It went quiet.
    Timeout,
    /// Its answer lost a settled quorum: a lie, or a broken engine.
    Disagreement,
    /// Its answer was malformed or badly signed.
    Invalid,
}

/// Tunables.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Time for the record to fade halfway.
    pub half_life_ms: u64,
    /// Score below which a bad outcome isolates the peer.
    pub isolate_below: f64,
    /// First isolation.
    pub base_isolation_ms: u64,
    /// Longest isolation.
    pub max_isolation_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            half_life_ms: 30 * 60 * 1000,
            isolate_below: 0.5,
            base_isolation_ms: 60 * 1000,
            max_isolation_ms: 24 * 60 * 60 * 1000,
        }
    }
}

/// Decayed counts of outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Conduct {
    /// Tasks done (and agreed, where checked).
    pub successes: f64,
    /// Failed tasks.
    pub failures: f64,
    /// Tasks it went quiet on.
    pub timeouts: f64,
    /// Quorums it lost.
    pub disagreements: f64,
    /// Malformed or badly signed answers.
    pub invalid: f64,
}

impl Conduct {
    fn scaled(mut self, factor: f64) -> Self {
        self.successes *= factor;
        self.failures *= factor;
        self.timeouts *= factor;
        self.disagreements *= factor;
        self.invalid *= factor;
        self
    }

    /// The score, in (0, 1]: 1 for a peer with no bad outcomes.
    pub fn score(&self) -> f64 {
        let bad = self.failures + self.timeouts + 5.0 * self.invalid + 10.0 * self.disagreements;
        (self.successes + 1.0) / (self.successes + 1.0 + bad)
    }
}

/// One peer's record, as kept (and persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Counts as of `at`.
    pub conduct: Conduct,
    /// When the counts were last updated.
    pub at: UnixMillis,
    /// Times it was isolated.
    pub offences: u32,
    /// Isolated until then (0: never).
    pub isolated_until: UnixMillis,
}

/// The records of every peer that did work for this node.
#[derive(Debug, Clone, Default)]
pub struct Trust<P> {
    config: Config,
    records: HashMap<P, Record>,
}

/// A peer newly isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isolation {
    /// Until when.
    pub until: UnixMillis,
    /// Its how-many-th isolation (1 for the first).
    pub offences: u32,
}

impl<P: Eq + Hash + Clone> Trust<P> {
    /// No records.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            records: HashMap::new(),
        }
    }

    fn decay(&self, record: Record, now: UnixMillis) -> Record {
        let elapsed = now.saturating_sub(record.at) as f64;
        let factor = 0.5f64.powf(elapsed / self.config.half_life_ms.max(1) as f64);
        Record {
            conduct: record.conduct.scaled(factor),
            at: now.max(record.at),
            ..record
        }
    }

    /// `peer`'s record at `now` (an empty one if it has none).
    pub fn record(&self, peer: &P, now: UnixMillis) -> Record {
        self.records.get(peer).map_or(
            Record {
                at: now,
                ..Record::default()
            },
            |r| self.decay(*r, now),
        )
    }

    /// Whether `peer` has a record.
    pub fn knows(&self, peer: &P) -> bool {
        self.records.contains_key(peer)
    }

    /// `peer`'s score at `now`.
    pub fn score(&self, peer: &P, now: UnixMillis) -> f64 {
        self.record(peer, now).conduct.score()
    }

    /// Whether `peer` is isolated at `now`.
    pub fn isolated(&self, peer: &P, now: UnixMillis) -> bool {
        self.records
            .get(peer)
            .is_some_and(|r| r.isolated_until > now)
    }

    /// Notes how a task ended for `peer`; returns the isolation it caused, if any.
    pub fn note(&mut self, peer: &P, outcome: Outcome, now: UnixMillis) -> Option<Isolation> {
        let mut record = self.record(peer, now);
        let conduct = &mut record.conduct;
        match outcome {
            Outcome::Success => conduct.successes += 1.0,
            Outcome::Failure => conduct.failures += 1.0,
            Outcome::Timeout => conduct.timeouts += 1.0,
            Outcome::Disagreement => conduct.disagreements += 1.0,
            Outcome::Invalid => conduct.invalid += 1.0,
        }
        let mut isolation = None;
        let lie = matches!(outcome, Outcome::Disagreement | Outcome::Invalid);
        if lie && record.isolated_until <= now && conduct.score() < self.config.isolate_below {
            let factor = 1u64 << record.offences.min(32);
            let length = self
                .config
                .base_isolation_ms
                .saturating_mul(factor)
                .min(self.config.max_isolation_ms);
            record.offences += 1;
            record.isolated_until = now + length;
            isolation = Some(Isolation {
                until: record.isolated_until,
                offences: record.offences,
            });
        }
        self.records.insert(peer.clone(), record);
        isolation
    }

    /// `peer`'s record as of its last update (to persist), if it has one.
    pub fn stored(&self, peer: &P) -> Option<Record> {
        self.records.get(peer).copied()
    }

    /// Puts back a record read from disk.
    pub fn restore(&mut self, peer: P, record: Record) {
        self.records.insert(peer, record);
    }

    /// Every record, as of its last update (to persist).
    pub fn records(&self) -> impl Iterator<Item = (&P, &Record)> {
        self.records.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60 * 1000;

    #[test]
    fn a_lie_isolates_at_once_and_repeat_offences_double_the_back_off() {
        let mut trust = Trust::new(Config::default());
        let liar = 1u8;
        assert!(!trust.isolated(&liar, 0));
        let first = trust
            .note(&liar, Outcome::Disagreement, 0)
            .expect("isolated");
        assert_eq!(
            first,
            Isolation {
                until: MIN,
                offences: 1
            }
        );
        assert!(trust.isolated(&liar, MIN - 1));
        assert!(!trust.isolated(&liar, MIN), "the back-off ends");
        // Lies again after its isolation: twice as long.
        let second = trust
            .note(&liar, Outcome::Disagreement, MIN)
            .expect("again");
        assert_eq!(
            second,
            Isolation {
                until: 3 * MIN,
                offences: 2
            }
        );
        let third = trust
            .note(&liar, Outcome::Disagreement, 3 * MIN)
            .expect("again");
        assert_eq!(third.until, 3 * MIN + 4 * MIN);
        // While isolated, more bad news does not restart the clock.
        assert_eq!(trust.note(&liar, Outcome::Invalid, 3 * MIN + 1), None);
        // However late the next lie, the back-off keeps doubling.
        let later = 7 * MIN + 24 * 60 * MIN;
        let again = trust
            .note(&liar, Outcome::Disagreement, later)
            .expect("isolated");
        assert_eq!(again.offences, 4);
        assert_eq!(again.until, later + 8 * MIN);
    }

    #[test]
    fn honest_work_is_not_isolated_and_earns_slack() {
        let mut trust = Trust::new(Config::default());
        let peer = 2u8;
        for t in 0..50 {
            assert_eq!(trust.note(&peer, Outcome::Success, t), None);
        }
        // A timeout and a failure among many successes: still trusted.
        assert_eq!(trust.note(&peer, Outcome::Timeout, 60), None);
        assert_eq!(trust.note(&peer, Outcome::Failure, 61), None);
        assert!(trust.score(&peer, 62) > 0.9);
        // A peer that only fails is scored low but not isolated: down is not lying.
        let flaky = 3u8;
        for t in 0..10 {
            assert_eq!(trust.note(&flaky, Outcome::Failure, t), None);
            assert_eq!(trust.note(&flaky, Outcome::Timeout, t), None);
        }
        assert!(trust.score(&flaky, 10) < 0.1);
        assert!(!trust.isolated(&flaky, 10));
        // One invalid answer then isolates it: its record has nothing to offset a lie.
        assert!(trust.note(&flaky, Outcome::Invalid, 11).is_some());
    }

    #[test]
    fn records_fade_and_survive_a_round_trip() {
        let mut trust = Trust::new(Config::default());
        // At a real clock's time: a first record starts its fading then, not at 0.
        let start = 1_800_000_000_000;
        trust.note(&7u8, Outcome::Disagreement, start);
        assert_eq!(
            trust.record(&7, start + 1).conduct.disagreements.round(),
            1.0
        );
        let mut trust = Trust::new(Config::default());
        trust.note(&7u8, Outcome::Disagreement, 0);
        let half = Config::default().half_life_ms;
        let record = trust.record(&7, half);
        assert!((record.conduct.disagreements - 0.5).abs() < 1e-9);
        let mut restored = Trust::new(Config::default());
        for (peer, record) in trust.records() {
            let bytes = crate::wire::encode(record);
            restored.restore(*peer, crate::wire::decode(&bytes, 1024).unwrap());
        }
        assert!(restored.isolated(&7, 1));
        assert_eq!(restored.record(&7, half), record);
    }
}
