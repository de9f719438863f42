//! Yamux as libp2p's stream muxer, with our frame size.
//!
//! The wire protocol is `/yamux/1.0.0`, the same as libp2p-yamux's, and peers running stock
//! libp2p interoperate. What differs is a sender-side choice that libp2p-yamux does not expose:
//! the largest data frame it writes. Yamux's default, 16 KiB, meets TLS badly: each frame's
//! 12-byte header and its 16 KiB body become two TLS records and two socket writes, so a bulk
//! transfer (a blob) pays a syscall, a record and an AEAD operation per 8 KiB moved.
//! [`FRAME_SIZE`] frames cut that sixteen-fold. The price is head-of-line delay: other
//! streams' frames (pings, gossip, streamed tokens) may queue behind a bulk frame, and behind
//! what TLS holds (`tls::SEND_BUFFER`), about half a megabyte in all: under a millisecond on
//! loopback or a LAN, ~0.4 s on a 10 Mbit/s uplink that a blob transfer saturates. Receivers
//! accept frames up to 1 MiB (and within the stream's window) whatever they send themselves,
//! and a frame never exceeds the peer's window.
//!
//! Yamux also writes each frame in two calls (its header, then its body) and flushes after
//! every frame. Over TLS every call is a record, an AEAD operation and a socket write, and the
//! peer wakes for each: a small request and its answer (a stream opened, data, a close, a
//! window update each way) cost a dozen `writev`s. [`Corked`] gathers what yamux writes and
//! sends it when yamux next waits for input (or when [`CORK_LIMIT`] bytes wait), so the frames
//! of one turn of the connection leave as one record in one write.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::{ready, AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

/// Largest data frame this node writes.
pub const FRAME_SIZE: usize = 256 * 1024;

/// Bytes [`Corked`] gathers before it writes them without waiting for yamux to read.
const CORK_LIMIT: usize = 64 * 1024;

/// Inbound streams kept while nobody takes them (yamux's own ACK backlog): a peer opening
/// more has its new streams reset.
const INBOUND_BACKLOG: usize = 256;

/// The muxer upgrade: `/yamux/1.0.0` with [`FRAME_SIZE`] frames.
#[derive(Debug, Clone)]
pub struct Config(yamux::Config);

impl Default for Config {
    fn default() -> Self {
        let mut config = yamux::Config::default();
        config.set_split_send_size(FRAME_SIZE);
        Config(config)
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = futures::future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        futures::future::ready(Ok(Muxer::new(io, self.0, yamux::Mode::Server)))
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = futures::future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        futures::future::ready(Ok(Muxer::new(io, self.0, yamux::Mode::Client)))
    }
}

/// One yamux connection.
///
/// Yamux makes progress only inside `poll_next_inbound`, which [`StreamMuxer::poll`] calls
/// for the connection's sake; streams it yields there wait in `inbound` until the swarm asks
/// for them in [`StreamMuxer::poll_inbound`].
pub struct Muxer<C> {
    connection: yamux::Connection<Corked<C>>,
    inbound: VecDeque<Stream>,
    inbound_waker: Option<Waker>,
}

impl<C> std::fmt::Debug for Muxer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("waiting_inbound", &self.inbound.len())
            .finish()
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + 'static> Muxer<C> {
    fn new(io: C, config: yamux::Config, mode: yamux::Mode) -> Self {
        Muxer {
            connection: yamux::Connection::new(Corked::new(io), config, mode),
            inbound: VecDeque::new(),
            inbound_waker: None,
        }
    }

    fn next_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Result<Stream, Error>> {
        match ready!(self.connection.poll_next_inbound(cx)) {
            Some(Ok(stream)) => Poll::Ready(Ok(Stream(stream))),
            Some(Err(e)) => Poll::Ready(Err(Error(e))),
            None => Poll::Ready(Err(Error(yamux::ConnectionError::Closed))),
        }
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + 'static> StreamMuxer for Muxer<C> {
    type Substream = Stream;
    type Error = Error;

    fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Stream, Error>> {
        let this = self.get_mut();
        if let Some(stream) = this.inbound.pop_front() {
            return Poll::Ready(Ok(stream));
        }
        if let Poll::Ready(next) = this.next_inbound(cx) {
            return Poll::Ready(next);
        }
        this.inbound_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_outbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Stream, Error>> {
        let stream = ready!(self.get_mut().connection.poll_new_outbound(cx)).map_err(Error)?;
        Poll::Ready(Ok(Stream(stream)))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().connection.poll_close(cx).map_err(Error)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, Error>> {
        let this = self.get_mut();
        let stream = ready!(this.next_inbound(cx))?;
        if this.inbound.len() < INBOUND_BACKLOG {
            this.inbound.push_back(stream);
            if let Some(waker) = this.inbound_waker.take() {
                waker.wake();
            }
        } else {
            tracing::warn!("inbound stream reset: {INBOUND_BACKLOG} already wait to be taken");
        }
        // Come back at once: the connection has more to do than this stream.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The connection under yamux, with its writes gathered.
///
/// Yamux drives a connection in one loop: it writes the frames its streams queued (flushing
/// after each), then reads, and returns `Pending` only once a read does. So `Corked` keeps
/// what is written and a flush does nothing; the bytes go out, in one write, before a read
/// (the turn's frames are all written by then), when [`CORK_LIMIT`] bytes wait, or on close.
/// A write that would pass the limit waits for the gathered bytes to leave: back-pressure is
/// the socket's, as without the cork.
struct Corked<C> {
    io: C,
    out: Vec<u8>,
    /// How much of `out` the connection has taken.
    sent: usize,
    /// Bytes went to the connection and its flush has not finished (TLS and Noise hold what
    /// they took until it does).
    unflushed: bool,
}

impl<C: AsyncRead + AsyncWrite + Unpin> Corked<C> {
    fn new(io: C) -> Self {
        Corked {
            io,
            out: Vec::new(),
            sent: 0,
            unflushed: false,
        }
    }

    /// Writes what is gathered and flushes the connection (again after a flush that could
    /// not finish).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
            self.unflushed = true;
        }
        if !self.out.is_empty() {
            self.out.clear();
            self.sent = 0;
            // A burst's buffer is not kept for an idle connection's lifetime.
            if self.out.capacity() > CORK_LIMIT / 4 {
                self.out = Vec::new();
            }
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }

    /// Whether anything waits to be written or flushed.
    fn waiting(&self) -> bool {
        !self.out.is_empty() || self.unflushed
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.waiting() {
            // A full socket leaves the rest for the next turn (its waker is registered);
            // reading goes on meanwhile.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Corked<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() + buf.len() > CORK_LIMIT {
            ready!(this.poll_drain(cx))?;
            if buf.len() >= CORK_LIMIT {
                // A bulk frame's body goes straight through rather than copied.
                let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
                this.unflushed = true;
                return Poll::Ready(Ok(n));
            }
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Deferred to the next read (see the type's comment).
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}

/// A yamux stream.
#[derive(Debug)]
pub struct Stream(yamux::Stream);

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_read_vectored(cx, bufs)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_close(cx)
    }
}

/// A yamux connection error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(yamux::ConnectionError);

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e.0 {
            yamux::ConnectionError::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::poll_fn;
    use futures::{AsyncReadExt, AsyncWriteExt, Future};
    use libp2p::core::muxing::StreamMuxerExt;
    use tokio_util::compat::TokioAsyncReadCompatExt;

    /// Runs `work` while driving `muxer` (yamux moves bytes only while its connection is
    /// polled).
    async fn driving<M: StreamMuxer + Unpin, T>(muxer: &mut M, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        poll_fn(|cx| {
            let _ = muxer.poll_unpin(cx);
            work.as_mut().poll(cx)
        })
        .await
    }

    /// A connection that records each write it takes, and has nothing to read.
    #[derive(Default)]
    struct Recording {
        writes: Vec<usize>,
        /// Whether the socket is full: writes wait.
        full: bool,
        /// Flushes that wait (as TLS's does while the socket is full), then finish.
        stuck_flushes: usize,
        flushes: usize,
        closed: bool,
    }

    impl AsyncRead for Recording {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.full {
                return Poll::Pending;
            }
            this.writes.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.stuck_flushes > 0 {
                this.stuck_flushes -= 1;
                return Poll::Pending;
            }
            this.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().closed = true;
            Poll::Ready(Ok(()))
        }
    }

    /// Frames written and flushed one by one leave in one write when the connection turns to
    /// reading; a full socket holds them back (and the writer past the limit) until it drains;
    /// a bulk write goes straight through; close sends what is left.
    #[test]
    fn corked_writes_leave_together_before_a_read() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut corked = Pin::new(Box::new(Corked::new(Recording::default())));
        let mut buf = [0u8; 16];
        for frame in [12, 100, 12, 12] {
            assert!(
                matches!(corked.as_mut().poll_write(&mut cx, &vec![1; frame]), Poll::Ready(Ok(n)) if n == frame)
            );
            assert!(matches!(
                corked.as_mut().poll_flush(&mut cx),
                Poll::Ready(Ok(()))
            ));
        }
        assert!(
            corked.io.writes.is_empty(),
            "written before the turn ended: {:?}",
            corked.io.writes
        );
        assert!(corked.as_mut().poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!(corked.io.writes, vec![136]);
        assert_eq!(corked.io.flushes, 1);
        // Nothing gathered: a read writes nothing.
        assert!(corked.as_mut().poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!(corked.io.writes, vec![136]);

        // A full socket: the turn's bytes wait, and a write past the limit waits for them.
        corked.io.full = true;
        assert!(corked.as_mut().poll_write(&mut cx, &[2; 1000]).is_ready());
        assert!(corked.as_mut().poll_read(&mut cx, &mut buf).is_pending());
        assert!(corked
            .as_mut()
            .poll_write(&mut cx, &vec![3; CORK_LIMIT])
            .is_pending());
        corked.io.full = false;
        assert!(
            matches!(corked.as_mut().poll_write(&mut cx, &vec![3; CORK_LIMIT]), Poll::Ready(Ok(n)) if n == CORK_LIMIT)
        );
        assert_eq!(
            corked.io.writes,
            vec![136, 1000, CORK_LIMIT],
            "the bulk write went through on its own"
        );

        assert!(corked.as_mut().poll_write(&mut cx, &[4; 7]).is_ready());
        assert!(matches!(
            corked.as_mut().poll_close(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(corked.io.writes, vec![136, 1000, CORK_LIMIT, 7]);
        assert!(corked.io.closed);

        // A flush that waits is tried again at the next read, with nothing new written.
        let mut corked = Pin::new(Box::new(Corked::new(Recording::default())));
        corked.io.stuck_flushes = 1;
        assert!(corked.as_mut().poll_write(&mut cx, &[5; 20]).is_ready());
        assert!(corked.as_mut().poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!((corked.io.writes.clone(), corked.io.flushes), (vec![20], 0));
        assert!(corked.as_mut().poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!((corked.io.writes.clone(), corked.io.flushes), (vec![20], 1));
        // Once flushed, a read flushes nothing more.
        assert!(corked.as_mut().poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!(corked.io.flushes, 1);
    }

    /// Our muxer and stock libp2p-yamux exchange a megabyte each way on one stream: ours
    /// writes 256 KiB frames, which stock yamux accepts, and reads its 16 KiB ones.
    #[tokio::test]
    async fn our_frames_interoperate_with_stock_libp2p_yamux() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let ours = Config::default().upgrade_outbound(a.compat(), "/yamux/1.0.0");
        let stock = libp2p_yamux::Config::default().upgrade_inbound(b.compat(), "/yamux/1.0.0");
        let (mut ours, mut stock) = (ours.await.unwrap(), stock.await.unwrap());
        let sent: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = sent.clone();
        let (read_tx, read_rx) = futures::channel::oneshot::channel();
        // The stock side echoes what it read and keeps its connection going (what it wrote
        // may still be on its way when it is done).
        let echo = tokio::spawn(async move {
            let mut stream = poll_fn(|cx| stock.poll_inbound_unpin(cx)).await.unwrap();
            driving(&mut stock, async {
                let mut got = Vec::new();
                stream.read_to_end(&mut got).await.unwrap();
                stream.write_all(&got).await.unwrap();
                stream.close().await.unwrap();
                let _ = read_tx.send(got);
                futures::future::pending::<()>().await
            })
            .await
        });
        let mut stream = poll_fn(|cx| ours.poll_outbound_unpin(cx)).await.unwrap();
        let back = driving(&mut ours, async {
            stream.write_all(&sent).await.unwrap();
            stream.close().await.unwrap();
            let mut back = Vec::new();
            stream.read_to_end(&mut back).await.unwrap();
            back
        })
        .await;
        echo.abort();
        let read = read_rx.await.unwrap();
        assert!(
            read == expected,
            "stock yamux read {} bytes of ours",
            read.len()
        );
        assert!(
            back == expected,
            "we read {} bytes of stock yamux's",
            back.len()
        );
    }
}
