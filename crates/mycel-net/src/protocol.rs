//! Wire types of the `/mycel/sync/2` request-response protocol.

use mycel_core::statement::SignedStatement;
use serde::{Deserialize, Serialize};

/// Protocol name of anti-entropy and echo (2: digest summaries).
pub(crate) const SYNC_PROTOCOL: &str = "/mycel/sync/2";
/// Protocol name of Kademlia (private, so we never join a public DHT).
pub(crate) const KAD_PROTOCOL: &str = "/mycel/kad/1.0.0";
/// Protocol version told by identify.
pub(crate) const IDENTIFY_PROTOCOL: &str = "/mycel/id/1.0.0";
/// The gossipsub topic of signed statements.
pub(crate) const STATEMENTS_TOPIC: &str = "mycel/statements/1";
/// Most statements in one sync response.
pub(crate) const MAX_SYNC_STATEMENTS: usize = 2_000;
/// Most digest entries honoured in one sync request.
pub(crate) const MAX_DIGEST_ENTRIES: usize = 20_000;
/// Largest echo payload.
pub(crate) const MAX_ECHO_BYTES: usize = 64 * 1024;

/// One entry of a digest: a peer (multihash bytes) and the latest sequence number known for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DigestEntry {
    #[serde(with = "serde_bytes")]
    pub(crate) peer: Vec<u8>,
    pub(crate) seq: u64,
}

/// A request on `/mycel/sync/2`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SyncRequest {
    /// "Here is what I know; send me what is newer" (anti-entropy).
    Digest(Vec<DigestEntry>),
    /// "Here is a summary of what I know; do we differ?" (periodic anti-entropy: the full
    /// digest follows only when the summaries differ).
    Summary(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Echo the payload back (round-trip measurement).
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A response on `/mycel/sync/2`.
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
    /// The request was refused (rate limit, ban, bad request).
    Refused,
}
