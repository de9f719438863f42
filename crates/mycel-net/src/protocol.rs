//! Wire types of the `/mycel/sync/4` request-response protocol.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{request_response, StreamProtocol};
use mycel_core::statement::{Contact, SignedStatement};
use mycel_core::wire::{self, Rejection};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Protocol name of anti-entropy and echo (2: digest summaries; 3: contacts; 4: contacts
/// naming the witness's block of addresses, which a node of 3 would read as a bad signature).
pub(crate) const SYNC_PROTOCOL: &str = "/mycel/sync/4";
/// Protocol name of Kademlia (private, so we never join a public DHT).
pub(crate) const KAD_PROTOCOL: &str = "/mycel/kad/1.0.0";
/// Protocol version told by identify.
pub(crate) const IDENTIFY_PROTOCOL: &str = "/mycel/id/1.0.0";
/// The gossipsub topic of signed statements (2: down reports whose contacts name a block of
/// addresses; a node reading the first version would take them for forgeries and charge
/// their issuers).
pub(crate) const STATEMENTS_TOPIC: &str = "mycel/statements/2";
/// Most statements in one sync response.
pub(crate) const MAX_SYNC_STATEMENTS: usize = 2_000;
/// Most digest entries honoured in one sync request.
pub(crate) const MAX_DIGEST_ENTRIES: usize = 20_000;
/// Largest echo payload.
pub(crate) const MAX_ECHO_BYTES: usize = 64 * 1024;
/// Most referrals in one goodbye.
pub(crate) const MAX_REFERRALS: usize = 16;

/// One entry of a digest: a peer (multihash bytes) and the latest sequence number known for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DigestEntry {
    #[serde(with = "serde_bytes")]
    pub(crate) peer: Vec<u8>,
    pub(crate) seq: u64,
}

/// A request on `/mycel/sync/4`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SyncRequest {
    /// "Here is what I know; send me what is newer" (anti-entropy).
    Digest(Vec<DigestEntry>),
    /// "Here is a summary of what I know; do we differ?" (periodic anti-entropy: the full
    /// digest follows only when the summaries differ).
    Summary(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Echo the payload back (round-trip measurement).
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    /// "I am closing our connection (I am at my cap, or shedding), not failing; dial these
    /// peers instead": the latest signed announcements of a few live peers, a peer exchange
    /// that keeps a newcomer from stranding at a full node.
    Goodbye(Vec<SignedStatement>),
    /// "Give me your word that we are connected": a [`Contact`] my down reports about you
    /// will carry.
    Contact,
}

/// A response on `/mycel/sync/4`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SyncResponse {
    /// Announcements the requester lacked.
    Statements(Vec<SignedStatement>),
    /// The summaries match: nothing to teach either way.
    InSync,
    /// The summaries differ: send the full digest.
    Differs,
    /// The echoed payload.
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The responder's word that the requester is connected to it.
    Contact(Contact),
    /// The request was refused (rate limit, ban, bad request).
    Refused,
}

/// The codec of `/mycel/sync/4`: one CBOR message per stream direction (the encoding libp2p's
/// cbor codec uses, so either end may run either codec), decoded with [`wire::decode`]. A
/// message that is too large or does not decode fails with an [`io::Error`] of kind
/// `InvalidData` carrying the [`Rejection`]: [`rejection`] gets it back, so the event loop
/// penalises a peer by the reason's type, not by an error message's text.
#[derive(Debug, Clone)]
pub(crate) struct SyncCodec {
    max_request: usize,
    max_response: usize,
}

impl SyncCodec {
    /// A codec refusing requests over `max_request` bytes and responses over `max_response`.
    pub(crate) fn new(max_request: u64, max_response: u64) -> Self {
        let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            max_request: clamp(max_request),
            max_response: clamp(max_response),
        }
    }
}

/// The reason a message was refused, when `error` is one of [`SyncCodec`]'s refusals (rather
/// than a failure of the stream).
pub(crate) fn rejection(error: &io::Error) -> Option<Rejection> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Rejection>())
        .copied()
}

async fn read_message<M: DeserializeOwned>(
    io: &mut (impl AsyncRead + Unpin + Send),
    max_len: usize,
) -> io::Result<M> {
    let mut bytes = Vec::new();
    // One byte past the limit tells an oversized message from one that fits exactly.
    io.take(u64::try_from(max_len).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)
        .await?;
    wire::decode(&bytes, max_len)
        .map_err(|reason| io::Error::new(io::ErrorKind::InvalidData, reason))
}

async fn write_message<M: Serialize>(
    io: &mut (impl AsyncWrite + Unpin + Send),
    message: &M,
) -> io::Result<()> {
    io.write_all(&wire::encode(message)).await
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_response).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: SyncRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: SyncResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use request_response::Codec as _;

    const PROTOCOL: StreamProtocol = StreamProtocol::new(SYNC_PROTOCOL);

    fn digest() -> SyncRequest {
        SyncRequest::Digest(vec![DigestEntry {
            peer: vec![1, 2, 3],
            seq: 7,
        }])
    }

    #[tokio::test]
    async fn refusals_carry_a_typed_rejection() {
        let mut codec = SyncCodec::new(64, 64);
        let mut big = futures::io::Cursor::new(wire::encode(&SyncRequest::Echo(vec![0; 100])));
        let error = codec.read_request(&PROTOCOL, &mut big).await.unwrap_err();
        assert_eq!(rejection(&error), Some(Rejection::Oversized));
        let mut junk = futures::io::Cursor::new(vec![0xff, 0x00, 0x13]);
        let error = codec.read_request(&PROTOCOL, &mut junk).await.unwrap_err();
        assert_eq!(rejection(&error), Some(Rejection::Malformed));
        // A failing stream is no refusal.
        assert_eq!(
            rejection(&io::Error::from(io::ErrorKind::ConnectionReset)),
            None
        );
        assert_eq!(rejection(&io::Error::other("x")), None);
    }

    #[tokio::test]
    async fn speaks_the_same_cbor_as_libp2ps_codec() {
        let mut ours = SyncCodec::new(1 << 20, 1 << 20);
        let mut theirs =
            request_response::cbor::codec::Codec::<SyncRequest, SyncResponse>::default();
        let mut bytes = Vec::new();
        theirs
            .write_request(&PROTOCOL, &mut bytes, digest())
            .await
            .unwrap();
        let request = ours
            .read_request(&PROTOCOL, &mut futures::io::Cursor::new(bytes))
            .await
            .unwrap();
        assert!(matches!(&request, SyncRequest::Digest(e) if e.len() == 1 && e[0].seq == 7));
        for response in [
            SyncResponse::InSync,
            SyncResponse::Echo(vec![9; 5]),
            SyncResponse::Statements(Vec::new()),
        ] {
            let mut bytes = Vec::new();
            ours.write_response(&PROTOCOL, &mut bytes, response.clone())
                .await
                .unwrap();
            let back = theirs
                .read_response(&PROTOCOL, &mut futures::io::Cursor::new(bytes))
                .await
                .unwrap();
            assert_eq!(format!("{back:?}"), format!("{response:?}"));
        }
    }
}
