//! Streams a serve loop answers at once: a cap in all and a share per peer, so that one peer
//! (which may be a stranger) cannot take every slot.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use mycel_net::task::{IncomingStreams, Stream};
use mycel_net::PeerId;
use tokio::sync::Notify;
use tokio::task::{Id, JoinError, JoinSet};
use tracing::debug;

/// Answers the streams of `incoming` with `answer` until the network stops, each in one of
/// `slots`; a stream past its peer's share (or the cap) is closed at once. The answers run in
/// a set owned by this task: when the node stops, they stop with it.
pub(crate) async fn serve<Fut>(
    mut incoming: IncomingStreams,
    mut slots: Slots,
    (what, past_share_label): (&'static str, &'static str),
    defences: crate::defences::Defences,
    mut answer: impl FnMut(PeerId, Stream) -> Fut,
) where
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            next = incoming.next() => {
                let Some((peer, stream)) = next else { break };
                let past_share = slots.is_past_share(&peer);
                if !slots.spawn(peer, answer(peer, stream)) {
                    // Only the peer's own share is a defence at work; the cap in all is load.
                    if past_share {
                        defences.count(past_share_label);
                    }
                    debug!(%peer, "too many {what} streams; dropping one");
                }
            }
            () = slots.next_done(), if !slots.is_empty() => {}
        }
    }
}

/// The slots of one serve loop, and the tasks that hold them.
#[derive(Debug)]
pub(crate) struct Slots {
    max: usize,
    per_peer: usize,
    held: HashMap<PeerId, usize>,
    whose: HashMap<Id, PeerId>,
    tasks: JoinSet<()>,
    idle: Idle,
}

/// The answers of a serve loop that hold a stream open only in case more comes on it (kept
/// task streams): how many wait so, and how to ask one of them to give its slot back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Idle {
    waiting: Arc<AtomicUsize>,
    crowded: Arc<Notify>,
}

impl Idle {
    /// Counts the caller as waiting until the guard drops.
    pub(crate) fn waiting(&self) -> IdleGuard {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        IdleGuard(self.waiting.clone())
    }

    /// Resolves when a newcomer needs the slot of one that waits.
    pub(crate) async fn crowded(&self) {
        self.crowded.notified().await
    }
}

/// One answer waiting (see [`Idle::waiting`]).
#[derive(Debug)]
pub(crate) struct IdleGuard(Arc<AtomicUsize>);

impl Drop for IdleGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Slots {
    /// At most `max` at once, `per_peer` of them for one peer.
    pub(crate) fn new(max: usize, per_peer: usize) -> Self {
        Self {
            max,
            per_peer,
            held: HashMap::new(),
            whose: HashMap::new(),
            tasks: JoinSet::new(),
            idle: Idle::default(),
        }
    }

    /// The answers that only wait: a newcomer past the cap in all takes the slot of one of
    /// them.
    pub(crate) fn idle(&self) -> Idle {
        self.idle.clone()
    }

    /// Whether `peer` holds its whole share of the slots.
    pub(crate) fn is_past_share(&self, peer: &PeerId) -> bool {
        self.held.get(peer).copied().unwrap_or(0) >= self.per_peer
    }

    /// Runs `work` for `peer` when a slot is free for it; false (and `work` dropped) when not.
    /// Past the cap in all, a newcomer is let in while answers only wait
    /// ([`Slots::idle`]), and one of them is asked to end: the cap is passed by at most the
    /// number that wait, and only until they have gone.
    pub(crate) fn spawn(
        &mut self,
        peer: PeerId,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> bool {
        if self.is_past_share(&peer) {
            return false;
        }
        if self.tasks.len() >= self.max {
            let waiting = self.idle.waiting.load(Ordering::Relaxed);
            if self.tasks.len() >= self.max + waiting {
                return false;
            }
            self.idle.crowded.notify_one();
        }
        *self.held.entry(peer).or_default() += 1;
        let task = self.tasks.spawn(work);
        self.whose.insert(task.id(), peer);
        true
    }

    /// Waits for a task to end (finished or panicked) and gives its slot back; pending
    /// forever while none runs (for a `select!` arm guarded by [`Slots::is_empty`]).
    pub(crate) async fn next_done(&mut self) {
        let Some(done) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => JoinError::id(e),
        };
        if let Some(peer) = self.whose.remove(&id) {
            if let Some(n) = self.held.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&peer);
                }
            }
        }
    }

    /// Whether no task runs.
    pub(crate) fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_peer_gets_its_share_and_slots_come_back() {
        let mut slots = Slots::new(4, 2);
        let (a, b) = (PeerId::random(), PeerId::random());
        let (release, wait) = tokio::sync::watch::channel(false);
        let work = || {
            let mut wait = wait.clone();
            async move {
                let _ = wait.wait_for(|go| *go).await;
            }
        };
        assert!(slots.spawn(a, work()));
        assert!(slots.spawn(a, work()));
        assert!(!slots.spawn(a, work()), "a's share is 2");
        assert!(slots.spawn(b, work()));
        assert!(slots.spawn(b, work()));
        assert!(!slots.spawn(PeerId::random(), work()), "4 in all");
        // One of them only waits for more: a newcomer takes its place, and it is asked to go.
        let idle = slots.idle();
        let crowded = idle.crowded();
        tokio::pin!(crowded);
        let waiting = idle.waiting();
        assert!(futures::poll!(crowded.as_mut()).is_pending());
        assert!(!slots.spawn(a, work()), "a is still past its share");
        assert!(futures::poll!(crowded.as_mut()).is_pending());
        assert!(
            slots.spawn(PeerId::random(), work()),
            "in, in the place of the waiting one"
        );
        assert!(futures::poll!(crowded.as_mut()).is_ready(), "asked to go");
        assert!(
            !slots.spawn(PeerId::random(), work()),
            "the cap is passed by at most those that wait"
        );
        drop(waiting);
        release.send(true).unwrap();
        for _ in 0..5 {
            slots.next_done().await;
        }
        assert!(slots.is_empty());
        assert!(
            slots.spawn(a, work()) && slots.spawn(a, work()),
            "given back"
        );
    }
}
