//! `futures_timer::Delay`, served by tokio's timer wheel.
//!
//! libp2p (swarm, gossipsub, kad, request-response, relay, ...) times everything with
//! `futures_timer::Delay`: every stream negotiation, every queued gossip message, every idle
//! connection. Upstream, each `Delay` lives in a heap owned by one global helper thread, and
//! creating, resetting or dropping one wakes that thread (a futex wake and a context switch).
//! A 200-node join spent about 13 % of all its CPU there (profiled on an AMD EPYC, 2 cores:
//! 7.4 % in the wake-ups, 6 % in the helper thread). This crate keeps the upstream API
//! (`Delay::new`, `Delay::reset`, `Future`) and puts the deadline on the timer wheel of the
//! tokio runtime that polls it, which the runtime's own workers drive: no helper thread, the
//! driver is woken only when a new deadline comes before its next one, and a delay dropped
//! before it is first polled costs nothing at all.
//!
//! Differences from upstream, none of which libp2p relies on: deadlines are rounded up to
//! tokio's millisecond and capped 30 years ahead; a delay polled outside any tokio runtime is
//! served by a small runtime of its own (one worker thread, started on first such use); a
//! delay polled by another runtime than before is moved to that runtime's wheel (so one whose
//! runtime has shut down still fires, where a bare tokio timer would panic); under tokio's
//! paused clock (`tokio::time::pause`, used by no test here) the wheel follows tokio's clock
//! while the already-due check reads the real one; and, like any tokio timer, a poll may
//! return `Pending` once the task's co-operative budget is spent (the task is woken again
//! straight away).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Id};
use tokio::time::Sleep;

/// The furthest ahead a deadline is set.
const FAR: Duration = Duration::from_secs(60 * 60 * 24 * 365 * 30);

/// A future that completes once a duration has elapsed.
pub struct Delay {
    deadline: Instant,
    /// Made on the first poll that finds the deadline in the future.
    armed: Option<Armed>,
}

/// A deadline on one runtime's timer wheel.
struct Armed {
    sleep: Pin<Box<Sleep>>,
    /// The runtime whose wheel holds it (`None`: the fallback runtime).
    runtime: Option<Id>,
}

impl Delay {
    /// A delay that completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        Delay {
            deadline: deadline_in(dur),
            armed: None,
        }
    }

    /// Moves the deadline to `dur` from now, whether or not the delay has completed.
    pub fn reset(&mut self, dur: Duration) {
        self.deadline = deadline_in(dur);
        if let Some(armed) = self.armed.as_mut() {
            armed.sleep.as_mut().reset(self.deadline.into());
        }
    }
}

fn deadline_in(dur: Duration) -> Instant {
    Instant::now() + dur.min(FAR)
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
        let current = Handle::try_current().ok();
        let runtime = current.as_ref().map(Handle::id);
        if this.armed.as_ref().is_some_and(|a| a.runtime != runtime) {
            this.armed = None;
        }
        let armed = match this.armed.as_mut() {
            Some(armed) => armed,
            None => {
                if Instant::now() >= this.deadline {
                    return Poll::Ready(());
                }
                let deadline = this.deadline.into();
                let _entered = match &current {
                    Some(handle) => handle.enter(),
                    None => fallback().handle().enter(),
                };
                this.armed.insert(Armed {
                    sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    runtime,
                })
            }
        };
        armed.sleep.as_mut().poll(cx)
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

    /// Long enough that a loaded machine never reaches it between two lines of a test.
    const LONG: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(30);

    #[tokio::test]
    async fn completes_after_its_duration_and_not_before() {
        let mut delay = Delay::new(LONG);
        assert!((&mut delay).now_or_never().is_none(), "not yet due");
        let start = Instant::now();
        let delay = Delay::new(SHORT);
        delay.await;
        assert!(start.elapsed() >= SHORT);
    }

    #[tokio::test]
    async fn reset_moves_the_deadline_even_after_completion() {
        let mut delay = Delay::new(Duration::from_millis(1));
        (&mut delay).await;
        assert!((&mut delay).now_or_never().is_some(), "stays complete");
        delay.reset(LONG);
        assert!((&mut delay).now_or_never().is_none(), "re-armed");
        let start = Instant::now();
        delay.reset(SHORT);
        (&mut delay).await;
        assert!(start.elapsed() >= SHORT);
        // Reset to later while armed: it does not complete at the earlier deadline.
        delay.reset(SHORT);
        assert!((&mut delay).now_or_never().is_none());
        let start = Instant::now();
        delay.reset(SHORT * 3);
        delay.await;
        assert!(start.elapsed() >= SHORT * 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_past_deadline_completes_without_a_timer() {
        let mut delay = Delay::new(Duration::ZERO);
        assert!((&mut delay).now_or_never().is_some());
        assert!(delay.armed.is_none(), "no timer registered for a due delay");
    }

    /// Runs `f` on a thread and fails the test if it has not finished within 10 s (a broken
    /// delay would otherwise hang the test for its whole duration).
    fn within_10s(f: impl FnOnce() + Send + 'static) {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the delay completed in time");
    }

    #[test]
    fn works_outside_any_runtime() {
        within_10s(|| {
            let start = Instant::now();
            futures::executor::block_on(Delay::new(SHORT));
            assert!(start.elapsed() >= SHORT);
            let mut delay = Delay::new(Duration::from_secs(3600));
            assert!((&mut delay).now_or_never().is_none());
            delay.reset(SHORT);
            futures::executor::block_on(delay);
        });
    }

    #[test]
    fn a_delay_outlives_the_runtime_that_first_polled_it() {
        within_10s(|| {
            let first = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let mut delay = Delay::new(LONG);
            first.block_on(async { assert!((&mut delay).now_or_never().is_none()) });
            drop(first);
            delay.reset(SHORT);
            // Another runtime, then none at all: neither panics nor waits on the dead one.
            let second = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            second.block_on(&mut delay);
            delay.reset(SHORT);
            drop(second);
            futures::executor::block_on(delay);
        });
    }

    #[tokio::test]
    async fn a_huge_duration_does_not_panic() {
        let mut delay = Delay::new(Duration::MAX);
        assert!((&mut delay).now_or_never().is_none());
        delay.reset(Duration::MAX);
        assert!((&mut delay).now_or_never().is_none());
        within_10s(|| {
            let mut delay = Delay::new(Duration::MAX);
            assert!((&mut delay).now_or_never().is_none());
        });
    }
}
