//! Blobs across the network: this node serves the blobs it holds over `/mycel/blob/1`,
//! announces itself as their DHT provider, and fetches blobs it lacks from every provider at
//! once.
//!
//! A fetch first takes the blob's outboard (chunk hashes) from a provider and checks that it
//! adds up to the content id; the store then reserves the room. Each provider then gets its
//! own workers that take the next missing chunks from a shared queue, a few per request:
//! faster providers take more. Every chunk is verified before a byte of it is written; a
//! provider that sends a bad one is penalised and dropped from the fetch, and its chunks go
//! back to the queue. A provider that fails or vanishes gives its chunks back too. When the
//! queue is empty but chunks are still missing, the providers are looked up again until the
//! deadline, so a fetch outlives providers that restart, and a fetch cut short (even by a
//! crash of this node) resumes from the chunks already verified.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use mycel_core::blob::{
    BlobFrame, BlobRequest, Outboard, TreeError, CHUNK_BYTES, MAX_BLOB_FRAME_BYTES,
    MAX_BLOB_REQUEST_BYTES,
};
use mycel_core::id::ContentId;
use mycel_core::wire::Rejection;
use mycel_net::task::{
    read_frame, write_frame, FrameError, IncomingStreams, Stream, BLOB_PROTOCOL,
};
use mycel_net::{now_ms, NetHandle, PeerId};
use mycel_store::{BlobError, BlobInfo, BlobStore, ChunkBuf, ChunkReader, Quarantine};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot::error::TryRecvError;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Blob streams answered at once, a quarter of them for one peer; streams beyond are dropped.
const MAX_INBOUND_STREAMS: usize = 64;

/// How long a blob stream may wait for its next request.
const STREAM_IDLE: Duration = Duration::from_secs(30);

/// Chunks of one request being verified and written at once while the next arrive.
const WRITES_IN_FLIGHT: usize = 3;

/// How often a fetch looks for more providers while chunks flow (at most; the first look
/// comes after [`FIRST_REFRESH`], and the wait doubles up to this).
const PROVIDER_REFRESH: Duration = Duration::from_secs(1);

/// When a fetch first looks again for providers.
const FIRST_REFRESH: Duration = Duration::from_millis(100);

/// Longest wait between two rounds of a fetch.
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// How blobs are kept, served and fetched.
#[derive(Debug, Clone)]
pub struct BlobConfig {
    /// Bytes the store may hold.
    pub quota: u64,
    /// Bytes per second this node uploads at most, to all peers together; `None`: no limit.
    pub upload_limit: Option<u64>,
    /// How long a fetch keeps trying before it gives up.
    pub fetch_deadline: Duration,
    /// Chunks asked for in one request.
    pub chunks_per_request: usize,
    /// Requests in flight to one provider at once.
    pub streams_per_provider: usize,
    /// How long one request may go without an answer frame.
    pub request_timeout: Duration,
    /// How long a fetch looks for a first provider before it says nobody holds the blob.
    pub lookup_deadline: Duration,
}

impl Default for BlobConfig {
    fn default() -> Self {
        Self {
            quota: 64 * 1024 * 1024 * 1024,
            upload_limit: None,
            fetch_deadline: Duration::from_secs(600),
            chunks_per_request: 16,
            streams_per_provider: 4,
            request_timeout: Duration::from_secs(20),
            lookup_deadline: Duration::from_secs(30),
        }
    }
}

/// Providers asked for an outboard at once.
const MAX_ASKED: usize = 8;

/// How long the other providers may take to answer for an outboard once one has: those
/// silent longer are left out of the fetch.
const OUTBOARD_GRACE: Duration = Duration::from_secs(1);

/// How asking a provider failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AskFailure {
    /// It is reachable only through a relay, and bulk data does not ride relays.
    RelayedOnly,
    /// It did not answer within the request timeout.
    Silent,
    /// It refused, failed or sent nonsense.
    Other,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The store refused (quota, disk).
    #[error(transparent)]
    Store(#[from] BlobError),
    /// Nobody supplied the blob before the deadline.
    #[error("{id} could not be fetched in {secs} s: {reason}")]
    Unavailable {
        /// The blob.
        id: ContentId,
        /// The deadline.
        secs: u64,
        /// What was seen.
        reason: String,
    },
    /// The blob is larger than the fetch allows (its size checked against its id).
    #[error("{id} is {size} bytes, more than the {limit} bytes this fetch allows")]
    TooLarge {
        /// The blob.
        id: ContentId,
        /// Its size.
        size: u64,
        /// What the fetch allowed.
        limit: u64,
    },
}

/// Bytes of a fetch done so far, for progress bars.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes verified and stored (including those a resumed fetch already had).
    pub done: AtomicU64,
    /// The blob's size, once its outboard is known.
    pub total: AtomicU64,
}

/// What the blob service has done since the node started.
#[derive(Debug, Default)]
pub struct BlobStats {
    /// Chunks sent to peers.
    pub chunks_served: AtomicU64,
    /// Chunks received, verified and stored.
    pub chunks_fetched: AtomicU64,
    /// Chunks received that failed verification.
    pub chunks_refused: AtomicU64,
    /// Blobs found corrupt on this node's disk (`mycel_blobs_corrupt_total`).
    pub corrupt: Counter,
    /// Corrupt blobs fetched whole again from peers (`mycel_blobs_repaired_total`).
    pub repaired: Counter,
}

/// The blob service of one node.
#[derive(Debug)]
pub struct BlobService {
    /// Counters.
    pub stats: BlobStats,
    /// What the node's defences turned away (shared with the other services).
    pub defences: crate::defences::Defences,
    store: Arc<BlobStore>,
    net: NetHandle,
    config: BlobConfig,
    /// When the upload budget is next free (uploads are paced to `upload_limit`).
    upload_free_at: Mutex<Instant>,
    /// Ids provided besides the blobs in the store (the models this node serves).
    also_provided: Mutex<BTreeSet<ContentId>>,
    /// Chunk buffers, shared by uploads and fetches.
    pool: Arc<ChunkPool>,
    /// Blobs being repaired after a corrupt chunk was found.
    repairing: Mutex<HashSet<ContentId>>,
}

impl BlobService {
    /// The service over `store`.
    pub fn new(store: Arc<BlobStore>, net: NetHandle, config: BlobConfig) -> Self {
        Self {
            stats: BlobStats::default(),
            defences: Default::default(),
            store,
            net,
            config,
            upload_free_at: Mutex::new(Instant::now()),
            also_provided: Mutex::new(BTreeSet::new()),
            pool: Arc::default(),
            repairing: Mutex::new(HashSet::new()),
        }
    }

    /// Counts what its defences turn away in `defences`.
    pub fn counting(mut self, defences: crate::defences::Defences) -> Self {
        self.defences = defences;
        self
    }

    /// Leaves `peer` out of the rest of a fetch, counted once; false when it already was.
    fn exclude(&self, excluded: &mut HashSet<PeerId>, peer: PeerId) -> bool {
        let new = excluded.insert(peer);
        if new {
            self.defences.count(crate::defences::BLOB_PROVIDER_EXCLUDED);
        }
        new
    }

    /// Registers the service's counters in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mycel_blobs_corrupt",
            "Blobs found corrupt on this node's disk (never served; repaired from peers)",
            self.stats.corrupt.clone(),
        );
        registry.register(
            "mycel_blobs_repaired",
            "Corrupt blobs made whole again from peers",
            self.stats.repaired.clone(),
        );
    }

    /// Handles `e` from reading a stored blob: when a chunk was found corrupt, the blob is
    /// taken out of service and what it lost is fetched again from peers, in the background
    /// (once at a time per blob).
    pub fn on_read_error(self: &Arc<Self>, e: &BlobError) {
        let BlobError::Corrupt { id, chunk } = *e else {
            return;
        };
        if !self
            .repairing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id)
        {
            return;
        }
        let service = self.clone();
        tokio::spawn(async move {
            warn!(%id, chunk, "a stored chunk no longer matches its hash; checking the whole blob");
            match service.blocking(move |s| s.quarantine(&id)).await {
                Ok(Quarantine::Repair { missing, pinned }) => {
                    service.stats.corrupt.inc();
                    service.announce().await;
                    warn!(%id, chunks = missing.len(), "blob corrupt on disk: no longer served; fetching the lost chunks from peers");
                    match service.fetch(id, &[], pinned, &Progress::default()).await {
                        Ok(_) => {
                            service.stats.repaired.inc();
                            service.announce().await;
                            info!(%id, "corrupt blob repaired from peers");
                        }
                        // Its good chunks stay, as a fetch `mycel fetch` resumes (pinned again
                        // on completion if it was).
                        Err(e) => {
                            warn!(%id, "cannot repair the corrupt blob yet ({e}); its good chunks are kept: `mycel fetch {id}` resumes the repair")
                        }
                    }
                }
                Ok(Quarantine::Intact | Quarantine::Gone) => {}
                Err(e) => warn!(%id, "cannot check the blob: {e}"),
            }
            service
                .repairing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    /// The store.
    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    /// Provides `ids` in the DHT too, beside the blobs held.
    pub async fn provide_also(&self, ids: impl IntoIterator<Item = ContentId>) {
        self.also_provided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
        self.announce().await;
    }

    /// Stops offering `id` beyond the blobs held (undoes [`BlobService::provide_also`]).
    pub async fn provide_no_longer(&self, id: ContentId) {
        self.also_provided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.announce().await;
    }

    /// Brings the DHT provider records in line with the blobs held.
    pub async fn announce(&self) {
        let store = self.store.clone();
        let held = tokio::task::spawn_blocking(move || store.entries())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut ids: BTreeSet<ContentId> = held.iter().map(|b| b.id).collect();
        ids.extend(
            self.also_provided
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter(),
        );
        if self.net.provide(ids.into_iter().collect()).await.is_err() {
            debug!("the network stopped; provider records not updated");
        }
    }

    /// Runs `f` on the store off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BlobStore) -> Result<T, BlobError> + Send + 'static,
    ) -> Result<T, BlobError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or_else(|e| Err(BlobError::Index(format!("store task failed: {e}"))))
    }

    /// Imports a file or directory (pinned) and provides it.
    pub async fn import_path(&self, path: &Path, pin: bool) -> Result<ContentId, BlobError> {
        let path = path.to_path_buf();
        let id = self
            .blocking(move |s| s.import_path(&path, now_ms(), pin))
            .await?;
        self.announce().await;
        Ok(id)
    }

    // ---- serving -----------------------------------------------------------------------

    /// Answers the blob streams peers open, until the network stops. The answers run in a
    /// set owned by this task: when the node stops, they stop with it.
    pub async fn serve(self: Arc<Self>, incoming: IncomingStreams) {
        let slots = crate::slots::Slots::new(MAX_INBOUND_STREAMS, MAX_INBOUND_STREAMS / 4);
        let past_share = ("blob", crate::defences::BLOB_STREAMS_PAST_SHARE);
        let defences = self.defences.clone();
        crate::slots::serve(incoming, slots, past_share, defences, |peer, stream| {
            let service = self.clone();
            async move {
                if let Err(e) = service.answer(peer, stream).await {
                    debug!(%peer, "blob request ended: {e}");
                }
            }
        })
        .await;
    }

    /// Answers the requests of one stream in turn (a fetcher keeps its stream for many: a
    /// fresh yamux stream starts with a 256 KiB window and grows it only as data flows),
    /// until the peer closes it, goes quiet for [`STREAM_IDLE`], or is refused.
    async fn answer(self: &Arc<Self>, peer: PeerId, mut stream: Stream) -> std::io::Result<()> {
        let mut reader = None;
        loop {
            let next = read_frame::<BlobRequest>(&mut stream, MAX_BLOB_REQUEST_BYTES);
            let request = match tokio::time::timeout(STREAM_IDLE, next).await {
                Err(_) | Ok(Ok(None)) => break,
                Ok(Ok(Some(request))) => request,
                Ok(Err(FrameError::Io(e))) => return Err(e),
                Ok(Err(FrameError::Rejected(reason))) => {
                    self.net.penalise(peer, reason).await;
                    let refusal = BlobFrame::Refused(format!("bad request: {reason}"));
                    write_frame(&mut stream, &refusal).await?;
                    break;
                }
            };
            if let Err(reason) = request.check() {
                self.net.penalise(peer, Rejection::Malformed).await;
                write_frame(&mut stream, &BlobFrame::Refused(reason)).await?;
                break;
            }
            if !self.answer_one(request, &mut stream, &mut reader).await? {
                break;
            }
        }
        futures::AsyncWriteExt::close(&mut stream).await
    }

    /// Answers one request; `false` when the stream should end after it. `reader` keeps the
    /// blob last read open for the stream's next request: a fetcher asks one stream for
    /// many chunks of one blob, and opening it reads its whole outboard (32 bytes a chunk).
    async fn answer_one(
        self: &Arc<Self>,
        request: BlobRequest,
        stream: &mut Stream,
        reader: &mut Option<Arc<ChunkReader>>,
    ) -> std::io::Result<bool> {
        match request {
            BlobRequest::Outboard { id } => {
                let outboard = self
                    .blocking(move |s| match s.info(&id)? {
                        Some(_) => s.outboard(&id),
                        None => Ok(None),
                    })
                    .await;
                let frame = match outboard {
                    Ok(Some(outboard)) => BlobFrame::Outboard(outboard.to_bytes()),
                    _ => BlobFrame::NotFound,
                };
                write_frame(stream, &frame).await?;
                futures::AsyncWriteExt::flush(stream).await?;
                Ok(true)
            }
            BlobRequest::Chunks { id, chunks } => {
                let open = match reader.take().filter(|r| r.id() == id) {
                    Some(open) => open,
                    None => match self.blocking(move |s| s.reader(&id)).await {
                        Ok(opened) => Arc::new(opened),
                        Err(e) => {
                            write_frame(stream, &chunk_error(id, e)).await?;
                            return Ok(false);
                        }
                    },
                };
                *reader = Some(open.clone());
                let reader = open;
                // One blocking task reads the chunks in order, a couple ahead of the one sent.
                let (ready, mut chunks_read) = tokio::sync::mpsc::channel(2);
                let pool = self.pool.clone();
                tokio::task::spawn_blocking(move || {
                    for index in chunks {
                        let mut data = pool.take();
                        let read = reader.read_chunk_into(index, &mut data).map(|()| data);
                        let failed = read.is_err();
                        if ready.blocking_send((index, read)).is_err() || failed {
                            break;
                        }
                    }
                });
                while let Some((index, read)) = chunks_read.recv().await {
                    match read {
                        Ok(data) => {
                            let bytes = data.bytes();
                            self.pace(bytes.len() as u64).await;
                            let len = bytes.len() as u32;
                            write_frame(stream, &BlobFrame::Chunk { index, len }).await?;
                            futures::AsyncWriteExt::write_all(stream, bytes).await?;
                            futures::AsyncWriteExt::flush(stream).await?;
                            self.pool.put(data);
                            self.stats.chunks_served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            self.on_read_error(&e);
                            write_frame(stream, &chunk_error(id, e)).await?;
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            }
        }
    }

    /// Waits until `bytes` more fit the upload limit.
    async fn pace(&self, bytes: u64) {
        let Some(rate) = self.config.upload_limit.filter(|r| *r > 0) else {
            return;
        };
        let start = {
            let mut free_at = self
                .upload_free_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let start = (*free_at).max(Instant::now());
            *free_at = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }

    // ---- fetching ----------------------------------------------------------------------

    /// Fetches blob `id` unless it is here, from the DHT's providers and `hints`; pinned
    /// when `pin`. Progress goes to `progress`.
    pub async fn fetch(
        &self,
        id: ContentId,
        hints: &[PeerId],
        pin: bool,
        progress: &Progress,
    ) -> Result<BlobInfo, FetchError> {
        self.fetch_within(id, hints, pin, progress, u64::MAX).await
    }

    /// [`BlobService::fetch`] of a blob of at most `limit` bytes: one found larger (its size
    /// checked against its id before any of its data is asked for) is not fetched.
    pub async fn fetch_within(
        &self,
        id: ContentId,
        hints: &[PeerId],
        pin: bool,
        progress: &Progress,
        limit: u64,
    ) -> Result<BlobInfo, FetchError> {
        if let Some(blob) = self.blocking(move |s| s.info(&id)).await? {
            progress.total.store(blob.size, Ordering::Relaxed);
            progress.done.store(blob.size, Ordering::Relaxed);
            if pin && !blob.pinned {
                self.blocking(move |s| s.set_pinned(&id, true)).await?;
            }
            return Ok(blob);
        }
        let started = Instant::now();
        let deadline = started + self.config.fetch_deadline;
        let own = self.net.peer_id();
        let mut excluded: HashSet<PeerId> = HashSet::new();
        let mut last_problem = "no provider found".to_owned();
        let mut outboard: Option<Outboard> = None;
        // Waits between rounds: short at first (a lookup right after joining the DHT can come
        // back empty), then longer.
        let mut pause = Duration::from_millis(20);
        let mut ever_found = false;
        while Instant::now() < deadline {
            let mut providers: Vec<PeerId> = hints.to_vec();
            let lookup = self.net.find_providers(id);
            if let Ok(Ok(found)) = tokio::time::timeout(Duration::from_secs(5), lookup).await {
                providers.extend(found);
            }
            let mut seen = HashSet::new();
            providers.retain(|p| *p != own && !excluded.contains(p) && seen.insert(*p));
            debug!(%id, providers = providers.len(), after = ?started.elapsed(), "providers found");
            if providers.is_empty() {
                // An id nobody holds: said soon, not after the whole fetch deadline.
                if !ever_found && started.elapsed() >= self.config.lookup_deadline {
                    return Err(FetchError::Unavailable {
                        id,
                        secs: started.elapsed().as_secs(),
                        reason: "no peer holds it (no provider found)".into(),
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
                continue;
            }
            ever_found = true;
            if outboard.is_none() {
                let mut relayed_only = 0;
                // Every provider is asked at once: provider records are anyone's claim, and
                // asked one after another each silent one would cost a whole request timeout.
                // Once one has answered, the others get a moment more; those still silent
                // then are not waited for (nor pulled from) in this fetch.
                // At most a few at once: each answer may be a large frame, and provider
                // records are anyone's claim (the rest are asked in later rounds).
                let asked: Vec<PeerId> = providers.iter().copied().take(MAX_ASKED).collect();
                let mut asks: futures::stream::FuturesUnordered<_> = asked
                    .iter()
                    .map(|peer| async move { (*peer, self.outboard_from(*peer, id).await) })
                    .collect();
                let mut unanswered: HashSet<PeerId> = asked.iter().copied().collect();
                let mut grace: Option<Instant> = None;
                loop {
                    let next = match grace {
                        None => asks.next().await,
                        Some(until) => match tokio::time::timeout_at(until, asks.next()).await {
                            Ok(next) => next,
                            Err(_) => break,
                        },
                    };
                    let Some((peer, answer)) = next else { break };
                    unanswered.remove(&peer);
                    match answer {
                        Ok(Some(_)) if outboard.is_some() => {}
                        Ok(Some(found)) => {
                            let candidate = found.clone();
                            // Over the limit: only checked (a liar's size must not stop
                            // the fetch), never begun.
                            let begun = self
                                .blocking(move |s| {
                                    if candidate.size > limit {
                                        candidate.verify(&id)?;
                                        return Ok(false);
                                    }
                                    s.begin_fetch(&id, &candidate).map(|_| true)
                                })
                                .await;
                            match begun {
                                Ok(false) => {
                                    return Err(FetchError::TooLarge {
                                        id,
                                        size: found.size,
                                        limit,
                                    })
                                }
                                Ok(true) => {
                                    outboard = Some(found);
                                    grace = Some(Instant::now() + OUTBOARD_GRACE);
                                }
                                Err(BlobError::Tree(e)) => {
                                    last_problem = format!("{peer} sent chunk hashes that do not belong to the blob ({e})");
                                    self.net.penalise(peer, Rejection::Corrupt).await;
                                    self.exclude(&mut excluded, peer);
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                        Ok(None) => last_problem = format!("{peer} does not hold it"),
                        Err((e, failure)) => {
                            relayed_only += usize::from(failure == AskFailure::RelayedOnly);
                            // A provider that stays silent (a record pointing at a peer that
                            // never holds it) is not waited for again in this fetch; one that
                            // refused (restarting, say) is asked again.
                            if failure == AskFailure::Silent {
                                self.exclude(&mut excluded, peer);
                            }
                            last_problem = e;
                        }
                    }
                }
                drop(asks);
                if outboard.is_some() {
                    // Still silent a grace after another holder answered: left out (an
                    // honest but slow holder is counted with the fake providers).
                    for peer in unanswered {
                        self.exclude(&mut excluded, peer);
                    }
                }
                // Every holder is reachable only through a relay: waiting would not help, and
                // the error says what would.
                if outboard.is_none()
                    && relayed_only == asked.len()
                    && asked.len() == providers.len()
                {
                    return Err(FetchError::Unavailable {
                        id,
                        secs: started.elapsed().as_secs(),
                        reason: last_problem,
                    });
                }
            }
            let Some(outboard) = &outboard else {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
                continue;
            };
            debug!(%id, after = ?started.elapsed(), "outboard verified, room reserved");
            let missing = self
                .blocking(move |s| s.missing(&id))
                .await?
                .unwrap_or_default();
            progress.total.store(outboard.size, Ordering::Relaxed);
            let missing_bytes: u64 = missing
                .iter()
                .map(|i| mycel_core::blob::chunk_len(outboard.size, *i))
                .sum();
            progress
                .done
                .store(outboard.size - missing_bytes, Ordering::Relaxed);
            if !missing.is_empty() {
                let writer = Writer::start(self.store.clone(), self.pool.clone(), id);
                let writer = &writer;
                let queue = Mutex::new(missing.into_iter().collect::<VecDeque<u64>>());
                let mut workers = futures::stream::FuturesUnordered::new();
                let mut working: HashSet<PeerId> = HashSet::new();
                for peer in joining(&providers, &mut working, &excluded) {
                    for _ in 0..self.config.streams_per_provider {
                        workers.push(self.pull(peer, &queue, progress, writer));
                    }
                }
                // Providers that turn up while the chunks flow join in: looked up soon after
                // the start (a first lookup may have heard only the quickest holders), then
                // less often. The lookup runs beside the transfers, never in their way.
                let mut every = FIRST_REFRESH;
                let refresh = tokio::time::sleep(every);
                tokio::pin!(refresh);
                let mut lookup: Option<futures::future::BoxFuture<'static, Vec<PeerId>>> = None;
                loop {
                    tokio::select! {
                        outcome = workers.next() => {
                            let Some((peer, outcome)) = outcome else { break };
                            match outcome {
                                Pulled::Done => {}
                                Pulled::Failed(reason) => last_problem = reason,
                                Pulled::Corrupt(index) => {
                                    last_problem = format!("{peer} sent a corrupt chunk {index}");
                                    if self.exclude(&mut excluded, peer) {
                                        self.net.penalise(peer, Rejection::Corrupt).await;
                                    }
                                }
                                Pulled::Store(e) => return Err(e.into()),
                            }
                        }
                        () = &mut refresh, if lookup.is_none() => {
                            let net = self.net.clone();
                            lookup = Some(Box::pin(async move {
                                tokio::time::timeout(PROVIDER_REFRESH, net.find_providers(id))
                                    .await
                                    .ok()
                                    .and_then(Result::ok)
                                    .unwrap_or_default()
                            }));
                        }
                        found = async { lookup.as_mut().expect("a lookup under way").await },
                            if lookup.is_some() =>
                        {
                            lookup = None;
                            every = (every * 2).min(PROVIDER_REFRESH);
                            refresh.as_mut().reset(Instant::now() + every);
                            let found: Vec<PeerId> =
                                found.into_iter().filter(|p| *p != own).collect();
                            for peer in joining(&found, &mut working, &excluded) {
                                debug!(%id, %peer, "another provider joins the fetch");
                                for _ in 0..self.config.streams_per_provider {
                                    workers.push(self.pull(peer, &queue, progress, writer));
                                }
                            }
                        }
                    }
                }
            }
            let left = self
                .blocking(move |s| s.missing(&id))
                .await?
                .unwrap_or_default();
            if left.is_empty() {
                debug!(%id, after = ?started.elapsed(), "every chunk verified");
                let blob = self
                    .blocking(move |s| s.finish_fetch(&id, now_ms(), pin))
                    .await?;
                debug!(%id, after = ?started.elapsed(), "fetched");
                self.announce().await;
                return Ok(blob);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(FetchError::Unavailable {
            id,
            secs: self.config.fetch_deadline.as_secs(),
            reason: last_problem,
        })
    }

    /// Fetches `id` and, when it is a manifest, every file it lists.
    pub async fn fetch_tree(
        &self,
        id: ContentId,
        hints: &[PeerId],
        pin: bool,
        progress: &Progress,
    ) -> Result<BlobInfo, FetchError> {
        self.fetch_tree_within(id, hints, pin, progress, u64::MAX)
            .await
    }

    /// [`BlobService::fetch_tree`] of at most `limit` bytes in all (the root and every file its
    /// manifest lists): a file that would pass it is not fetched.
    pub async fn fetch_tree_within(
        &self,
        id: ContentId,
        hints: &[PeerId],
        pin: bool,
        progress: &Progress,
        limit: u64,
    ) -> Result<BlobInfo, FetchError> {
        let root = self.fetch_within(id, hints, pin, progress, limit).await?;
        let mut room = limit.saturating_sub(root.size);
        let entries = self.blocking(move |s| s.manifest(&id)).await?;
        for entry in entries.unwrap_or_default() {
            let part = Progress::default();
            let file = self.fetch_within(entry.id, hints, pin, &part, room).await?;
            room = room.saturating_sub(file.size);
        }
        Ok(root)
    }

    /// Asks `peer` for the outboard of `id`. The error says what went wrong, and whether the
    /// peer is reachable only through a relay (bulk data refuses relays).
    async fn outboard_from(
        &self,
        peer: PeerId,
        id: ContentId,
    ) -> Result<Option<Outboard>, (String, AskFailure)> {
        // The wait for a direct connection (a hole punch) is bounded by the network's own
        // `direct_wait`, not by the request's timeout.
        self.net.direct_path(peer).await.map_err(|e| {
            let failure = match e {
                mycel_net::NetError::RelayedOnly { .. } => AskFailure::RelayedOnly,
                _ => AskFailure::Other,
            };
            (format!("{peer}: {e}"), failure)
        })?;
        let ask = async {
            // The path is direct now (checked above): a plain stream.
            let mut stream = self
                .net
                .open_stream(peer, BLOB_PROTOCOL)
                .await
                .map_err(|e| (e.to_string(), AskFailure::Other))?;
            write_frame(&mut stream, &BlobRequest::Outboard { id })
                .await
                .map_err(|e| (e.to_string(), AskFailure::Other))?;
            read_frame::<BlobFrame>(&mut stream, MAX_BLOB_FRAME_BYTES)
                .await
                .map_err(|e| (e.to_string(), AskFailure::Other))
        };
        match tokio::time::timeout(self.config.request_timeout, ask).await {
            Err(_) => Err((format!("{peer} did not answer in time"), AskFailure::Silent)),
            Ok(Err((e, failure))) => Err((format!("{peer}: {e}"), failure)),
            Ok(Ok(Some(BlobFrame::Outboard(bytes)))) => match Outboard::from_bytes(&bytes) {
                Ok(outboard) => Ok(Some(outboard)),
                Err(e) => {
                    self.net.penalise(peer, Rejection::Malformed).await;
                    Err((
                        format!("{peer} sent a malformed outboard: {e}"),
                        AskFailure::Other,
                    ))
                }
            },
            Ok(Ok(_)) => Ok(None),
        }
    }

    /// One worker of a fetch: takes chunks from `queue` and pulls them from `peer` until the
    /// queue is empty or the peer fails; chunks not delivered go back to the queue.
    async fn pull(
        &self,
        peer: PeerId,
        queue: &Mutex<VecDeque<u64>>,
        progress: &Progress,
        writer: &Writer,
    ) -> (PeerId, Pulled) {
        // One stream for all the worker's requests: its flow-control window, once grown,
        // stays grown.
        let mut stream = None;
        loop {
            let batch: Vec<u64> = {
                let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
                let n = queue.len().min(self.config.chunks_per_request);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                return (peer, Pulled::Done);
            }
            let mut pending: VecDeque<u64> = batch.iter().copied().collect();
            let outcome = self
                .pull_batch(peer, batch, &mut pending, progress, &mut stream, writer)
                .await;
            if !pending.is_empty() {
                let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
                queue.extend(pending);
            }
            if let Some(outcome) = outcome {
                return (peer, outcome);
            }
        }
    }

    /// Pulls `batch` from `peer` over `open` (opened first if `None`; left `None` when the
    /// stream failed), removing each verified chunk from `pending`. `None` when the whole
    /// batch arrived.
    async fn pull_batch(
        &self,
        peer: PeerId,
        batch: Vec<u64>,
        pending: &mut VecDeque<u64>,
        progress: &Progress,
        open: &mut Option<Stream>,
        writer: &Writer,
    ) -> Option<Pulled> {
        let id = writer.id;
        let timeout = self.config.request_timeout;
        let kept = open.take();
        let opened = tokio::time::timeout(timeout, async {
            let mut stream = match kept {
                Some(stream) => stream,
                None => self.net.open_bulk_stream(peer, BLOB_PROTOCOL).await?,
            };
            write_frame(&mut stream, &BlobRequest::Chunks { id, chunks: batch })
                .await
                .map_err(|e| mycel_net::NetError::Other(e.to_string()))?;
            Ok::<_, mycel_net::NetError>(stream)
        })
        .await;
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Some(Pulled::Failed(format!("{peer}: {e}"))),
            Err(_) => return Some(Pulled::Failed(format!("{peer} did not answer in time"))),
        };
        // Chunks are verified and written while the next ones arrive: a few writes in
        // flight, settled in order.
        let order: Vec<u64> = pending.iter().copied().collect();
        let mut writes: VecDeque<(u64, Written)> = VecDeque::new();
        let mut next = 0;
        let mut ended: Option<Pulled> = None;
        loop {
            let reading = ended.is_none() && next < order.len();
            loop {
                let in_flight = writes.len();
                let Some((_, done)) = writes.front_mut() else {
                    break;
                };
                let written = match done.try_recv() {
                    Ok(written) => written,
                    Err(TryRecvError::Empty) if reading && in_flight < WRITES_IN_FLIGHT => break,
                    Err(TryRecvError::Empty) => done.await.unwrap_or_else(|_| Err(writer_gone())),
                    Err(TryRecvError::Closed) => Err(writer_gone()),
                };
                let (index, _) = writes.pop_front().expect("a write in flight");
                match written {
                    Ok(()) => {
                        pending.retain(|i| *i != index);
                        let len = mycel_core::blob::chunk_len(
                            progress.total.load(Ordering::Relaxed),
                            index,
                        );
                        progress.done.fetch_add(len, Ordering::Relaxed);
                        self.stats.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(BlobError::Tree(TreeError::Chunk(_) | TreeError::Index { .. })) => {
                        self.stats.chunks_refused.fetch_add(1, Ordering::Relaxed);
                        ended.get_or_insert(Pulled::Corrupt(index));
                    }
                    Err(e) => {
                        ended.get_or_insert(Pulled::Store(e));
                    }
                }
            }
            if ended.is_some() || next == order.len() {
                if writes.is_empty() {
                    if ended.is_none() {
                        *open = Some(stream);
                    }
                    return ended;
                }
                continue;
            }
            let expected = order[next];
            let frame =
                match within(timeout, peer, read_frame(&mut stream, MAX_BLOB_FRAME_BYTES)).await {
                    Ok(frame) => frame,
                    Err(failed) => {
                        ended = Some(failed);
                        continue;
                    }
                };
            let data = match frame {
                Some(BlobFrame::Chunk { index, len })
                    if index == expected && u64::from(len) <= CHUNK_BYTES =>
                {
                    let mut data = self.pool.take();
                    let buf = data.sized(len as usize);
                    let read = futures::AsyncReadExt::read_exact(&mut stream, buf);
                    if let Err(failed) = within(timeout, peer, read).await {
                        ended = Some(failed);
                        continue;
                    }
                    data
                }
                // Not the chunk asked for next: as bad as a corrupt one.
                Some(BlobFrame::Chunk { index, .. }) => {
                    ended = Some(Pulled::Corrupt(index));
                    continue;
                }
                Some(BlobFrame::Refused(reason)) => {
                    ended = Some(Pulled::Failed(format!("{peer} refused: {reason}")));
                    continue;
                }
                Some(_) | None => {
                    ended = Some(Pulled::Failed(format!("{peer} stopped serving {id}")));
                    continue;
                }
            };
            writes.push_back((expected, writer.write(expected, data).await));
            next += 1;
        }
    }
}

/// How a chunk's verification and write ended.
type Written = tokio::sync::oneshot::Receiver<Result<(), BlobError>>;

/// A chunk for the writer, and where to say how it went.
type WriteJob = (
    u64,
    ChunkBuf,
    tokio::sync::oneshot::Sender<Result<(), BlobError>>,
);

/// The threads that verify and write the chunks of one fetch. A few long-lived threads fed
/// from a queue rather than a blocking task per chunk: under load they never sleep between
/// chunks, so chunks cost no thread wake-ups, and there are two so that one can sync while
/// the other writes.
struct Writer {
    /// The blob fetched.
    id: ContentId,
    jobs: tokio::sync::mpsc::Sender<WriteJob>,
}

/// Threads per fetch that verify and write.
const WRITER_THREADS: usize = 2;

impl Writer {
    fn start(store: Arc<BlobStore>, pool: Arc<ChunkPool>, id: ContentId) -> Self {
        let (jobs, queue) = tokio::sync::mpsc::channel::<WriteJob>(16);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..WRITER_THREADS {
            let (store, pool, queue) = (store.clone(), pool.clone(), queue.clone());
            tokio::task::spawn_blocking(move || loop {
                let job = queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .blocking_recv();
                let Some((index, data, done)) = job else {
                    break;
                };
                let written = store.write_chunk(&id, index, data.bytes());
                pool.put(data);
                let _ = done.send(written);
            });
        }
        Self { id, jobs }
    }

    /// Queues chunk `index` to be verified and written.
    async fn write(&self, index: u64, data: ChunkBuf) -> Written {
        let (done, written) = tokio::sync::oneshot::channel();
        // The threads live as long as this sender; a failed send shows as a closed `done`.
        let _ = self.jobs.send((index, data, done)).await;
        written
    }
}

fn writer_gone() -> BlobError {
    BlobError::Index("the chunk writer stopped".into())
}

/// The frame that tells a fetcher why a chunk of `id` cannot be served.
fn chunk_error(id: ContentId, e: BlobError) -> BlobFrame {
    match e {
        BlobError::NotFound(_) | BlobError::Corrupt { .. } => BlobFrame::NotFound,
        BlobError::Tree(e) => BlobFrame::Refused(e.to_string()),
        e => {
            warn!("cannot read a chunk of {id}: {e}");
            BlobFrame::NotFound
        }
    }
}

/// Chunk buffers used again rather than allocated per chunk.
#[derive(Debug, Default)]
struct ChunkPool(Mutex<Vec<ChunkBuf>>);

/// Buffers a pool keeps (8 MiB).
const POOLED_BUFFERS: usize = 32;

impl ChunkPool {
    fn take(&self) -> ChunkBuf {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    fn put(&self, buffer: ChunkBuf) {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOLED_BUFFERS {
            free.push(buffer);
        }
    }
}

/// The providers in `peers` not yet `working` on a fetch nor `excluded` from it (now
/// counted as working).
fn joining(
    peers: &[PeerId],
    working: &mut HashSet<PeerId>,
    excluded: &HashSet<PeerId>,
) -> Vec<PeerId> {
    peers
        .iter()
        .filter(|p| !excluded.contains(p) && working.insert(**p))
        .copied()
        .collect()
}

/// `work`'s outcome within `timeout`, a failure of `peer` otherwise.
async fn within<T, E: std::fmt::Display>(
    timeout: Duration,
    peer: PeerId,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Pulled> {
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Pulled::Failed(format!("{peer}: {e}"))),
        Err(_) => Err(Pulled::Failed(format!("{peer} stalled"))),
    }
}

/// How a fetch worker ended.
enum Pulled {
    /// The queue ran dry.
    Done,
    /// The provider failed (stream error, timeout, refusal).
    Failed(String),
    /// The provider sent a chunk that does not verify.
    Corrupt(u64),
    /// The local store failed.
    Store(BlobError),
}
