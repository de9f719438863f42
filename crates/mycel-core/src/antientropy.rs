//! When, and with whom, a node runs anti-entropy syncs.
//!
//! A sync sends the node's digest (who it knows, at which sequence number) and gets back the
//! statements the neighbour holds newer. Both ends of a new connection sync, so that a
//! joining node learns the network at once and its neighbour learns the joiner's view; then
//! the node syncs with one neighbour at a time on a timer that starts at `first` and doubles
//! (after each firing that started a sync) up to `max` while syncs teach nothing, and falls
//! back to `first` when one does.
//!
//! One sync is in flight at a time: each digest then carries what the sync before taught.
//! With four at once, a 200-node join pulled 75,000 statements by sync, 53,000 of them copies
//! of news another sync or gossip was bringing at the same moment. Unless it stalls: once the
//! syncs in flight have all waited [`STALL_MS`], another may start beside them (at most
//! [`MAX_IN_FLIGHT`], never two to one neighbour), so a neighbour that is slow to answer, or
//! silent until the request times out, cannot stop a node's anti-entropy.
//!
//! A new neighbour that connects while a sync is in flight is *owed* one: the timer is
//! brought forward to within `first` (jittered by the driver), and its firings serve an owed
//! neighbour and a random one by turns (owed neighbours that reconnect again and again cannot
//! starve the others). Owed neighbours do not keep the timer at `first`: measured, the dozen
//! or so each node is owed at the end of a 200-node join then kept every node syncing twice a
//! second for half a minute (idle CPU 29–32 % instead of 19–21 %). Owed syncs are not started back to back as soon as the
//! one in flight settles: measured, that pulled mostly what gossip was bringing too, and the
//! 200-node join was about 10% slower than with them on the timer.
//!
//! Generic over the peer type; the driver sends the requests, keeps the timer and draws the
//! jitter.

use std::collections::VecDeque;

use rand::Rng;

use crate::UnixMillis;

/// Most neighbours remembered as owed a sync.
pub const MAX_OWED: usize = 64;
/// How long a sync may wait for its answer before another may start beside it.
pub const STALL_MS: u64 = 2_000;
/// Most syncs in flight, stalled ones included.
pub const MAX_IN_FLIGHT: usize = 4;
/// A sync in flight this long is forgotten (the driver's request times out before: this only
/// keeps a lost answer from holding a place for ever).
pub const ABANDON_MS: u64 = 30_000;

/// What a sync sends first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// The full digest: recent syncs taught something, the answer is likely news.
    Digest,
    /// A summary of the digest; the full digest follows only if the neighbour's differs
    /// (converged, a sync costs two small messages).
    Summary,
}

/// The sync schedule of one node.
#[derive(Debug)]
pub struct SyncSchedule<P> {
    first_ms: u64,
    max_ms: u64,
    interval_ms: u64,
    /// The neighbours asked and when.
    in_flight: Vec<(P, UnixMillis)>,
    owed: VecDeque<P>,
    teach: bool,
    soon: bool,
    /// The last timer pick went to an owed neighbour: the next goes to a random one (owed
    /// neighbours that reconnect again and again cannot starve the others).
    served_owed: bool,
}

impl<P: Clone + PartialEq> SyncSchedule<P> {
    /// A schedule whose timer starts at `first_ms` and doubles up to `max_ms`.
    pub fn new(first_ms: u64, max_ms: u64) -> Self {
        Self {
            first_ms,
            max_ms: max_ms.max(first_ms),
            interval_ms: first_ms,
            in_flight: Vec::new(),
            owed: VecDeque::new(),
            teach: true,
            soon: false,
            served_owed: false,
        }
    }

    /// Whether another sync may start at `now`: none in flight, or all of them stalled.
    fn may_start(&mut self, now: UnixMillis) -> bool {
        self.in_flight
            .retain(|(_, at)| now.saturating_sub(*at) < ABANDON_MS);
        self.in_flight.len() < MAX_IN_FLIGHT
            && self
                .in_flight
                .iter()
                .all(|(_, at)| now.saturating_sub(*at) >= STALL_MS)
    }

    /// A full sync with `peer` is wanted at `now` (a new connection, or a neighbour whose
    /// summary differs). True: send it now. False: another is in flight, `peer` is owed one.
    pub fn want(&mut self, peer: P, now: UnixMillis) -> bool {
        let asked = self.in_flight.iter().any(|(p, _)| *p == peer);
        if !asked && self.may_start(now) {
            self.owed.retain(|p| *p != peer);
            self.in_flight.push((peer, now));
            return true;
        }
        if !self.owed.contains(&peer) {
            // Full: the newest connections matter most (a link just back), the oldest may
            // well be gone.
            if self.owed.len() >= MAX_OWED {
                self.owed.pop_front();
            }
            self.owed.push_back(peer);
        }
        self.soon = true;
        false
    }

    /// The timer fired at `now`: the neighbour to sync with and what to send, or `None` (a
    /// sync in flight has not stalled, or no neighbour is free). Owed neighbours and random
    /// ones by turns (owed neighbours that `connected` no longer says are connected are
    /// forgotten), a random one being one of `neighbours` not asked already.
    pub fn on_timer<R: Rng>(
        &mut self,
        neighbours: &[P],
        connected: impl Fn(&P) -> bool,
        now: UnixMillis,
        rng: &mut R,
    ) -> Option<(P, SyncKind)> {
        if !self.may_start(now) {
            return None;
        }
        let asked = |p: &P| self.in_flight.iter().any(|(q, _)| q == p);
        self.owed.retain(|p| connected(p));
        let free: Vec<&P> = neighbours.iter().filter(|p| !asked(p)).collect();
        let owed = self.owed.iter().position(|p| !asked(p));
        let peer = match owed {
            Some(i) if !self.served_owed || free.is_empty() => {
                self.served_owed = true;
                self.owed.remove(i).expect("a position in the queue")
            }
            _ if free.is_empty() => return None,
            _ => {
                self.served_owed = false;
                free[rng.gen_range(0..free.len())].clone()
            }
        };
        self.in_flight.push((peer.clone(), now));
        let kind = if self.teach {
            SyncKind::Digest
        } else {
            SyncKind::Summary
        };
        Some((peer, kind))
    }

    /// How long the timer waits next (before jitter); when the firing just past `started` a
    /// sync, the one after waits twice as long, up to the maximum.
    pub fn next_wait_ms(&mut self, started: bool) -> u64 {
        let wait = self.interval_ms;
        if started {
            self.interval_ms = (self.interval_ms.saturating_mul(2)).min(self.max_ms);
        }
        wait
    }

    /// A sync was deferred since the last call: the timer should fire within the first
    /// interval (returned), whatever it was waiting for.
    pub fn take_soon(&mut self) -> Option<u64> {
        if !std::mem::take(&mut self.soon) {
            return None;
        }
        self.interval_ms = self.first_ms;
        Some(self.first_ms)
    }

    /// The sync with `peer` was answered with statements; `learned` whether any was news.
    pub fn answered(&mut self, peer: &P, learned: bool) {
        self.settled(peer);
        self.teach = learned;
        if learned {
            self.interval_ms = self.first_ms;
        }
    }

    /// The sync with `peer` ended without statements (in sync, refused, failed).
    pub fn settled(&mut self, peer: &P) {
        if let Some(i) = self.in_flight.iter().position(|(p, _)| p == peer) {
            self.in_flight.swap_remove(i);
        }
    }

    /// Syncs in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Neighbours owed a sync, oldest first.
    pub fn owed(&self) -> impl Iterator<Item = &P> {
        self.owed.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn one_sync_at_a_time_and_newcomers_meanwhile_are_owed_one_each() {
        let mut s = SyncSchedule::new(500, 60_000);
        assert!(s.want(1, 0));
        assert!(!s.want(2, 10));
        assert!(!s.want(3, 20));
        assert!(!s.want(2, 30), "owed once");
        assert_eq!(s.owed().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.take_soon(), Some(500));
        assert_eq!(s.take_soon(), None);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(s.on_timer(&[1, 2, 3], |_| true, 500, &mut rng), None);
        s.settled(&1);
        assert_eq!(
            s.on_timer(&[1, 2, 3], |_| true, 600, &mut rng),
            Some((2, SyncKind::Digest))
        );
        s.answered(&2, false);
        assert!(s.want(4, 700), "nothing in flight: at once, not owed");
        assert!(!s.want(5, 710));
        s.answered(&4, true);
        assert_eq!(s.owed().copied().collect::<Vec<_>>(), vec![3, 5]);
        // Random and owed neighbours take turns; the owed one that left is forgotten.
        let (random, _) = s.on_timer(&[1, 2, 5], |p| *p != 3, 800, &mut rng).unwrap();
        assert!([1, 2, 5].contains(&random));
        assert_eq!(s.owed().copied().collect::<Vec<_>>(), vec![5]);
        s.settled(&random);
        assert_eq!(
            s.on_timer(&[1, 2, 5], |_| true, 900, &mut rng),
            Some((5, SyncKind::Digest))
        );
        assert!(!s.want(6, 1_000));
        assert_eq!(s.in_flight(), 1);
    }

    #[test]
    fn neighbours_that_keep_reconnecting_cannot_starve_the_others() {
        let mut s = SyncSchedule::new(500, 60_000);
        let mut rng = StdRng::seed_from_u64(5);
        let mut now = 0;
        assert!(s.want(100, now));
        let mut last = 100;
        let mut picks = Vec::new();
        for flapper in 200..210 {
            now += 100;
            assert!(!s.want(flapper, now), "a sync is in flight");
            s.settled(&last);
            let (peer, _) = s.on_timer(&[1, 2, 3], |_| true, now, &mut rng).unwrap();
            picks.push(peer);
            last = peer;
        }
        let random = picks.iter().filter(|p| **p < 100).count();
        assert_eq!(
            random, 5,
            "every other pick is a random neighbour: {picks:?}"
        );
    }

    #[test]
    fn a_stalled_sync_does_not_stop_the_next() {
        let mut s = SyncSchedule::new(500, 60_000);
        let mut rng = StdRng::seed_from_u64(4);
        assert!(s.want(1, 0));
        assert!(!s.want(2, STALL_MS - 1));
        // Neighbour 1 never answers: after the stall time another sync starts beside it, and
        // never a second one to the neighbour already asked.
        assert_eq!(
            s.on_timer(&[1, 2], |_| true, STALL_MS, &mut rng),
            Some((2, SyncKind::Digest))
        );
        assert_eq!(s.on_timer(&[1, 2], |_| true, 3 * STALL_MS, &mut rng), None);
        assert!(!s.want(1, 3 * STALL_MS), "asked already");
        assert_eq!(
            s.on_timer(&[1, 2, 3], |_| true, 3 * STALL_MS, &mut rng),
            Some((3, SyncKind::Digest)),
            "not 1 again, though owed"
        );
        for (i, peer) in (4..10).enumerate() {
            let now = (4 + i as u64) * STALL_MS;
            let room = s.in_flight() < MAX_IN_FLIGHT;
            assert_eq!(s.want(peer, now), room);
        }
        assert_eq!(s.in_flight(), MAX_IN_FLIGHT, "stalled ones included");
        s.settled(&1);
        assert_eq!(s.in_flight(), MAX_IN_FLIGHT - 1);
    }

    #[test]
    fn a_sync_that_has_not_stalled_holds_the_next() {
        let mut s = SyncSchedule::new(500, 60_000);
        assert!(s.want(1, 0));
        assert!(s.want(2, STALL_MS), "1 has stalled");
        assert!(!s.want(3, STALL_MS + 1), "2 has not");
        // A lost answer does not hold a place for ever.
        assert!(s.want(4, ABANDON_MS + STALL_MS));
        assert_eq!(s.in_flight(), 1);
    }

    #[test]
    fn owed_neighbours_are_bounded_and_the_newest_kept() {
        let mut s = SyncSchedule::new(500, 60_000);
        assert!(s.want(0u32, 0));
        for p in 1..1_000u32 {
            assert!(!s.want(p, 1));
        }
        assert_eq!(s.owed().count(), MAX_OWED);
        assert_eq!(s.owed().last(), Some(&999));
        assert!(!s.owed().any(|p| *p == 1));
    }

    #[test]
    fn the_timer_doubles_while_syncs_teach_nothing_and_summaries_replace_digests() {
        let mut s: SyncSchedule<u32> = SyncSchedule::new(500, 3_000);
        let waits: Vec<u64> = (0..5).map(|_| s.next_wait_ms(true)).collect();
        assert_eq!(waits, vec![500, 1_000, 2_000, 3_000, 3_000]);
        let mut rng = StdRng::seed_from_u64(2);
        let (_, kind) = s.on_timer(&[7], |_| true, 0, &mut rng).unwrap();
        assert_eq!(kind, SyncKind::Digest, "a node starts by pulling");
        s.answered(&7, false);
        let (_, kind) = s.on_timer(&[7], |_| true, 1, &mut rng).unwrap();
        assert_eq!(kind, SyncKind::Summary);
        s.answered(&7, true);
        assert_eq!(
            s.next_wait_ms(true),
            500,
            "news brings the timer back to the start"
        );
        assert_eq!(s.next_wait_ms(false), 1_000);
        assert_eq!(s.next_wait_ms(false), 1_000, "no sync started, no doubling");
        // A deferred sync brings the timer forward too.
        assert!(s.want(8, 2));
        assert!(!s.want(9, 3));
        s.next_wait_ms(true);
        s.next_wait_ms(true);
        assert_eq!(s.take_soon(), Some(500));
        assert_eq!(s.next_wait_ms(true), 500);
    }

    #[test]
    fn no_neighbour_no_sync() {
        let mut s: SyncSchedule<u32> = SyncSchedule::new(500, 60_000);
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(s.on_timer(&[], |_| true, 0, &mut rng), None);
        assert_eq!(s.in_flight(), 0);
    }
}
