//! `futures_timer::Delay`, served by tokio's timer wheel.
//!
//! libp2p (swarm, gossipsub, kad, request-response, relay, ...) times everything with
//! `futures_timer::Delay`: every stream negotiation, every queued gossip message, every idle
//! connection. Upstream, each `Delay` lives in a heap owned by one global helper thread, and
//! creating, resetting or dropping one wakes that thread (a futex wake and a context switch).
//! A 200-node join spent about 13 % of all its CPU there (profiled on an AMD EPYC, 2 cores:
//! 7.4 % in the wake-ups, 6 % in the helper thread). This crate keeps the upstream API
//! (`Delay::new`, `Delay::reset`, `Future`) and puts the deadline on the timer wheel of the
//! tokio runtime that polls it, which the runtime's own workers drive: no helper thread, no
//! wake-up to register, and nothing at all for a delay dropped before it is first polled.
//!
//! Differences from upstream, none of which libp2p relies on: deadlines are rounded up to
//! tokio's millisecond; a delay created and polled outside any tokio runtime is served by a
//! small runtime of its own (one worker thread, started on first such use); and, like any
//! tokio timer, a poll may return `Pending` once the task's co-operative budget is spent (the
//! task is woken again straight away).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

/// A future that completes once a duration has elapsed.
pub struct Delay {
    deadline: Instant,
    /// Made on the first poll that finds the deadline in the future.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Delay {
    /// A delay that completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        Delay {
            deadline: deadline_in(dur),
            sleep: None,
        }
    }

    /// Moves the deadline to `dur` from now, whether or not the delay has completed.
    pub fn reset(&mut self, dur: Duration) {
        self.deadline = deadline_in(dur);
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(self.deadline.into());
        }
    }
}

/// `now + dur`, saturating far in the future (upstream panics on overflow).
fn deadline_in(dur: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(dur)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}

/// The runtime for delays polled outside any tokio runtime.
fn fallback() -> &'static tokio::runtime::Runtime {
    static FALLBACK: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    FALLBACK.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("futures-timer")
            .enable_time()
            .build()
            .expect("futures-timer: cannot start the runtime for delays outside tokio")
    })
}

impl Future for Delay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.sleep.is_none() {
            if Instant::now() >= this.deadline {
                return Poll::Ready(());
            }
            let deadline = this.deadline.into();
            let sleep = match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::time::sleep_until(deadline),
                Err(_) => {
                    let _entered = fallback().enter();
                    tokio::time::sleep_until(deadline)
                }
            };
            this.sleep = Some(Box::pin(sleep));
        }
        match this.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delay")
            .field("deadline", &self.deadline)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    const SHORT: Duration = Duration::from_millis(30);

    #[tokio::test]
    async fn completes_after_its_duration_and_not_before() {
        let start = Instant::now();
        let mut delay = Delay::new(SHORT);
        assert!((&mut delay).now_or_never().is_none(), "not yet due");
        delay.await;
        assert!(start.elapsed() >= SHORT);
    }

    #[tokio::test]
    async fn reset_moves_the_deadline_even_after_completion() {
        let mut delay = Delay::new(Duration::from_millis(1));
        (&mut delay).await;
        assert!((&mut delay).now_or_never().is_some(), "stays complete");
        let start = Instant::now();
        delay.reset(SHORT);
        assert!((&mut delay).now_or_never().is_none(), "re-armed");
        (&mut delay).await;
        assert!(start.elapsed() >= SHORT);
        // Reset to later while armed: it must not complete at the earlier deadline.
        let start = Instant::now();
        delay.reset(Duration::from_millis(5));
        assert!((&mut delay).now_or_never().is_none());
        delay.reset(SHORT * 2);
        delay.await;
        assert!(start.elapsed() >= SHORT * 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_past_deadline_completes_without_a_timer() {
        let mut delay = Delay::new(Duration::ZERO);
        assert!((&mut delay).now_or_never().is_some());
        assert!(delay.sleep.is_none(), "no timer registered for a due delay");
    }

    #[test]
    fn works_outside_any_runtime() {
        let start = Instant::now();
        futures::executor::block_on(Delay::new(SHORT));
        assert!(start.elapsed() >= SHORT);
        let mut delay = Delay::new(Duration::from_secs(3600));
        assert!((&mut delay).now_or_never().is_none());
        delay.reset(SHORT);
        futures::executor::block_on(delay);
    }

    #[test]
    fn a_huge_duration_does_not_panic() {
        let mut delay = Delay::new(Duration::MAX);
        assert!((&mut delay).now_or_never().is_none());
        delay.reset(Duration::MAX);
        assert!((&mut delay).now_or_never().is_none());
    }
}
