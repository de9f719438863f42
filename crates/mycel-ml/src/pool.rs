//! A small pool for the decoder's matrix products: one helper thread per extra core, which
//! spins between products instead of sleeping.
//!
//! Decoding one token is about 120 products of a few hundred microseconds each, with a few
//! microseconds of serial work between them. Under rayon the workers went to sleep in those
//! gaps and were woken for the next product: measured on the 2-core machines, 12,000 context
//! switches a second and 17–19 % of the cores idle during decoding (llama.cpp's OpenMP
//! threads spin instead). Here a helper waits for the next job for up to [`SPIN`] (spinning,
//! then yielding the core between looks) before it parks (an idle model's helper then looks
//! once a second), and the calling thread does its own part of every product. Each model has
//! its own pool, so models decoding at once share the cores as their threads do. Results do not depend on the pool: each part writes its own rows, computed
//! exactly as they would be on one thread.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a helper waits for the next job before it parks.
const SPIN: Duration = Duration::from_millis(2);
/// How long a wait spins before it yields the core between looks (so that a thread it waits
/// for, or anything else, can run on a machine with few cores).
const PURE_SPIN: Duration = Duration::from_micros(50);

/// A job: part `p` of `parts`.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for every job.
    epoch: AtomicU64,
    /// The current job (a `*const Job`), valid while `remaining` is above 0.
    job: AtomicPtr<()>,
    /// Helpers that have not finished the current job.
    remaining: AtomicUsize,
    /// Helpers parked (or about to be).
    parked: AtomicUsize,
    /// A helper's part of the current job panicked.
    failed: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// The pool. One thread at a time may run jobs on it (`&mut self`).
pub(crate) struct SpinPool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl SpinPool {
    /// A pool with `helpers` helper threads (0: every job runs on the caller alone).
    pub(crate) fn new(helpers: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            remaining: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let helpers = (1..=helpers)
            .map(|part| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name("mycel-decode".into())
                    .spawn(move || help(&shared, part))
                    .expect("spawning a decoder thread")
            })
            .collect();
        Self { shared, helpers }
    }

    /// A pool with a helper for every core but the caller's.
    pub(crate) fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(cores.saturating_sub(1))
    }

    /// Parts a job is cut into: the helpers and the caller.
    pub(crate) fn parts(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `job(part)` for every part in `0..parts()`, part 0 on this thread, and returns
    /// when all are done.
    pub(crate) fn run(&mut self, job: Job<'_>) {
        if self.helpers.is_empty() {
            job(0);
            return;
        }
        let shared = &*self.shared;
        let slot: *const Job<'_> = &job;
        shared.job.store(slot as *mut (), Ordering::SeqCst);
        shared.remaining.store(self.helpers.len(), Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.parked.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        // A panic in part 0 must not leave the helpers reading a job that is gone.
        let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        let waiting = Instant::now();
        while shared.remaining.load(Ordering::SeqCst) != 0 {
            pause(waiting);
        }
        let helper_failed = shared.failed.swap(false, Ordering::SeqCst);
        if let Err(panic) = own {
            std::panic::resume_unwind(panic);
        }
        // Its rows were never written: no result rather than a wrong one.
        if helper_failed {
            panic!("a decoder thread panicked during a matrix product");
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for helper in self.helpers.drain(..) {
            let _ = helper.join();
        }
    }
}

/// One look of a wait begun at `since`: a spin at first, then a yield of the core.
fn pause(since: Instant) {
    if since.elapsed() < PURE_SPIN {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Counts a helper's part done when dropped, even if the part's panic could not be caught
/// cleanly, so that the caller never waits for ever.
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A helper's life: wait for a job (spinning, then parked), run its part, repeat.
fn help(shared: &Shared, part: usize) {
    let mut seen = 0;
    loop {
        let spun = Instant::now();
        let epoch = loop {
            let epoch = shared.epoch.load(Ordering::SeqCst);
            if epoch != seen {
                break epoch;
            }
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            if spun.elapsed() < SPIN {
                pause(spun);
                continue;
            }
            // Park: counted first, then the epoch checked again under the lock, so a job
            // posted in between is either seen here or woken for.
            shared.parked.fetch_add(1, Ordering::SeqCst);
            let guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            if shared.epoch.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::SeqCst) {
                let _ = shared
                    .wake
                    .wait_timeout(guard, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner());
            }
            shared.parked.fetch_sub(1, Ordering::SeqCst);
        };
        seen = epoch;
        let job = shared.job.load(Ordering::SeqCst) as *const Job<'_>;
        // SAFETY: `run` keeps the job alive until `remaining` is 0, which it is not before
        // this helper's decrement below.
        let job = unsafe { &*job };
        // A panicking part is the model's bug: counted done, so that the caller does not wait
        // for ever, and reported to it, which panics in turn.
        let _done = Done(&shared.remaining);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(part))).is_err() {
            shared.failed.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_that_panics_makes_the_caller_panic_and_the_pool_goes_on() {
        let mut pool = SpinPool::new(2);
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|part| assert_ne!(part, 2, "part 2 fails"));
        }));
        assert!(failed.is_err());
        // The caller's own part and a helper's fail together: the next job is not blamed.
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|part| assert_eq!(part, 1, "parts 0 and 2 fail"));
        }));
        assert!(failed.is_err());
        let done = AtomicUsize::new(0);
        pool.run(&|_| {
            done.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn every_part_runs_once_per_job_and_jobs_follow_each_other() {
        for helpers in [0, 1, 3] {
            let mut pool = SpinPool::new(helpers);
            let parts = pool.parts();
            let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            for round in 0..2_000 {
                pool.run(&|part| {
                    counts[part].fetch_add(1, Ordering::SeqCst);
                });
                for count in &counts {
                    assert_eq!(count.load(Ordering::SeqCst), round + 1);
                }
                if round == 1_000 {
                    // The helpers park when no job comes: they are woken for the next one.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while pool.shared.parked.load(Ordering::SeqCst) < helpers {
                        assert!(Instant::now() < deadline, "the helpers never parked");
                        std::thread::yield_now();
                    }
                }
            }
        }
    }
}
