//! Size-bounded CBOR encoding for every control message.
//!
//! A decoder that trusts a length prefix from a peer can be made to allocate without bound, so
//! every decode here first checks the input length against a caller-supplied maximum. Serde's
//! collection visitors cap their pre-allocation, so the allocation of a decode is bounded by the
//! size of its input.

use serde::{de::DeserializeOwned, Serialize};

/// Why a message from a peer was refused. Each reason is a label of the rejection counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Rejection {
    /// The message is larger than the protocol allows.
    #[error("message exceeds the size limit")]
    Oversized,
    /// The bytes do not decode as the expected message.
    #[error("message does not decode")]
    Malformed,
    /// The signature does not verify, or the signer is not the claimed issuer.
    #[error("signature does not verify for the claimed issuer")]
    BadSignature,
    /// A statement older than (or as old as) one already accepted from the same issuer.
    #[error("sequence number is not newer than the last accepted one")]
    Replayed,
    /// A statement whose expiry has passed, or whose lifetime is longer than allowed.
    #[error("statement has expired")]
    Expired,
    /// A statement issued further in the future than the allowed clock skew.
    #[error("statement is issued in the future")]
    FromFuture,
    /// The sender exceeded its message rate.
    #[error("sender exceeded its message rate")]
    RateLimited,
    /// The sender's reputation fell below the ban threshold.
    #[error("sender is banned")]
    Banned,
    /// Content that does not match the hash it was sent under.
    #[error("content does not match its hash")]
    Corrupt,
}

impl Rejection {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [Rejection; 9] = [
        Self::Oversized,
        Self::Malformed,
        Self::BadSignature,
        Self::Replayed,
        Self::Expired,
        Self::FromFuture,
        Self::RateLimited,
        Self::Banned,
        Self::Corrupt,
    ];

    /// A short, stable label (used in metrics and logs).
    pub fn label(self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Replayed => "replayed",
            Self::Expired => "expired",
            Self::FromFuture => "from_future",
            Self::RateLimited => "rate_limited",
            Self::Banned => "banned",
            Self::Corrupt => "corrupt",
        }
    }
}

/// Encodes `value` as CBOR.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_into(value, &mut out);
    out
}

/// Appends the CBOR of `value` to `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail for I/O reasons, and our types serialize infallibly.
    ciborium::into_writer(value, out).expect("CBOR encoding into a Vec does not fail");
}

/// Decodes CBOR bytes that came from outside, refusing inputs longer than `max_len`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, Rejection> {
    if bytes.len() > max_len {
        return Err(Rejection::Oversized);
    }
    ciborium::from_reader(bytes).map_err(|_| Rejection::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_oversized_input_before_parsing() {
        let bytes = encode(&vec![0u8; 100]);
        assert_eq!(decode::<Vec<u8>>(&bytes, 10), Err(Rejection::Oversized));
        assert_eq!(decode::<Vec<u8>>(&bytes, 1000).unwrap().len(), 100);
    }

    #[test]
    fn decode_reports_garbage_as_malformed() {
        assert_eq!(
            decode::<(u64, String)>(&[0xff, 0x00, 0x13], 100),
            Err(Rejection::Malformed)
        );
        // A CBOR array header claiming 2^32 elements with no body must not allocate it.
        let huge = [0x9a, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(decode::<Vec<u64>>(&huge, 100), Err(Rejection::Malformed));
    }
}
