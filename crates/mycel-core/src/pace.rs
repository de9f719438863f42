//! How long a streamed answer may go quiet before its worker is taken for frozen.
//!
//! Before the first piece a worker may be reading a long prompt, so it gets the whole attempt
//! timeout. Once pieces come, the stream has a pace of its own: a worker that stops (frozen,
//! stopped with SIGSTOP, its machine swapping) is given [`FACTOR`] times the stream's median
//! gap between pieces, at least [`FLOOR_MS`] (a newcomer's prompt chunk in the worker's batch
//! may hold a piece back a while), never more than the attempt timeout. A fast model's stream then
//! moves to another worker within about a second and a half instead of the attempt timeout,
//! and a slow model's keeps the room its pace needs. A worker whose generation makes no piece
//! for a while (its batch reading a newcomer's long prompt, a large model's slow step) sends
//! an empty one every half second (`mycel_node::models::HEARTBEAT`): a busy worker is never
//! quiet that long, a frozen one is. Pure: times are given in milliseconds.

use std::collections::VecDeque;

/// Times the median gap a stream may go quiet for.
pub const FACTOR: u64 = 10;
/// The shortest quiet a stream that has begun is allowed.
pub const FLOOR_MS: u64 = 1_500;
/// Gaps the median is taken over (the latest).
const WINDOW: usize = 16;

/// A streamed answer's pace.
#[derive(Debug, Clone)]
pub struct Pace {
    first_ms: u64,
    last: Option<u64>,
    gaps: VecDeque<u64>,
}

impl Pace {
    /// A stream whose first piece may take `first_ms` (the attempt timeout).
    pub fn new(first_ms: u64) -> Self {
        Self {
            first_ms,
            last: None,
            gaps: VecDeque::with_capacity(WINDOW),
        }
    }

    /// A piece arrived at `now_ms`.
    pub fn piece(&mut self, now_ms: u64) {
        if let Some(last) = self.last {
            if self.gaps.len() == WINDOW {
                self.gaps.pop_front();
            }
            self.gaps.push_back(now_ms.saturating_sub(last));
        }
        self.last = Some(now_ms);
    }

    /// How long to wait for the next piece, in milliseconds.
    pub fn wait_ms(&self) -> u64 {
        if self.last.is_none() {
            return self.first_ms;
        }
        let mut gaps: Vec<u64> = self.gaps.iter().copied().collect();
        gaps.sort_unstable();
        let median = gaps.get(gaps.len() / 2).copied().unwrap_or(0);
        median
            .saturating_mul(FACTOR)
            .max(FLOOR_MS)
            .min(self.first_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_stream_gets_the_floor_a_slow_one_its_pace_and_the_first_piece_the_timeout() {
        let mut pace = Pace::new(10_000);
        assert_eq!(
            pace.wait_ms(),
            10_000,
            "the prompt may take the whole timeout"
        );
        pace.piece(5_000);
        assert_eq!(
            pace.wait_ms(),
            FLOOR_MS,
            "one piece: no pace yet, the floor"
        );
        for i in 1..=20 {
            pace.piece(5_000 + 10 * i);
        }
        assert_eq!(pace.wait_ms(), FLOOR_MS, "10 ms a piece: the floor");
        // A slow model: 600 ms a piece.
        let mut slow = Pace::new(10_000);
        for i in 0..20 {
            slow.piece(600 * i);
        }
        assert_eq!(slow.wait_ms(), 6_000);
        // One long pause (a newcomer's prompt in the worker's batch) does not move the median.
        slow.piece(600 * 19 + 5_000);
        assert_eq!(slow.wait_ms(), 6_000);
        // Slower than the timeout allows: capped by it.
        let mut crawl = Pace::new(10_000);
        for i in 0..5 {
            crawl.piece(3_000 * i);
        }
        assert_eq!(crawl.wait_ms(), 10_000);
        // Never longer than the timeout, even below the floor.
        let mut short = Pace::new(500);
        short.piece(0);
        assert_eq!(short.wait_ms(), 500);
    }
}
