//! Protocols on raw streams (opened with libp2p-stream, accepted by [`crate::accept`]),
//! carrying length-prefixed CBOR frames:
//! - the inference task protocol `/mycel/task/4`: one stream per task attempt, the
//!   requester's one request (`mycel_core::task`), then the worker's chunks and its final
//!   answer;
//! - the blob protocol `/mycel/blob/1`: one stream per request (`mycel_core::blob`), answered
//!   by an outboard or by the chunks asked for, one frame each;
//! - the training protocol `/mycel/train/2`: one stream per round and participant, the
//!   request (`mycel_core::fl`) with the global weights, then the signed update.
//!
//! Raw streams rather than request-response, so that tokens and chunks travel as they are
//! made and the event loop is not on the data path.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use mycel_core::wire::{self, Rejection};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Protocol name of inference tasks.
pub const TASK_PROTOCOL: StreamProtocol = StreamProtocol::new("/mycel/task/4");

/// Protocol name of blob transfers.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/mycel/blob/1");

/// Protocol name of federated training rounds.
///
/// Version 2: secure rounds with neighbourhoods, and accusations that show no secret (a
/// version-1 participant would show its sealing secret, and ignore neighbourhoods).
pub const TRAIN_PROTOCOL: StreamProtocol = StreamProtocol::new("/mycel/train/2");

pub use crate::accept::IncomingStreams;
pub use libp2p::Stream;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or closed mid-frame.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// The frame was too large or did not decode.
    #[error("bad frame: {0}")]
    Rejected(Rejection),
}

/// Writes `value` as one frame: its CBOR length as 4 little-endian bytes, then the CBOR.
pub async fn write_frame<T: Serialize>(
    io: &mut (impl AsyncWrite + Unpin),
    value: &T,
) -> std::io::Result<()> {
    write_framed(io, &frame(value)?).await
}

/// `value` as one frame, to be written (to several streams, say) with [`write_framed`]:
/// encoded once.
pub fn frame<T: Serialize>(value: &T) -> std::io::Result<Vec<u8>> {
    // The length prefix is written in place of 4 reserved bytes: one buffer, one write.
    let mut frame = vec![0u8; 4];
    wire::encode_into(value, &mut frame);
    let len = u32::try_from(frame.len() - 4)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Writes a frame made by [`frame`].
pub async fn write_framed(io: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> std::io::Result<()> {
    io.write_all(frame).await?;
    io.flush().await
}

/// Reads one frame of at most `max_len` bytes; `Ok(None)` when the stream ended cleanly
/// before a frame began. The length is checked before anything is allocated.
pub async fn read_frame<T: DeserializeOwned>(
    io: &mut (impl AsyncRead + Unpin),
    max_len: usize,
) -> Result<Option<T>, FrameError> {
    Ok(read_frame_sized(io, max_len).await?.map(|(value, _)| value))
}

/// [`read_frame`], with the frame's length (without its 4-byte prefix).
pub async fn read_frame_sized<T: DeserializeOwned>(
    io: &mut (impl AsyncRead + Unpin),
    max_len: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = io.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max_len {
        return Err(FrameError::Rejected(Rejection::Oversized));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    wire::decode(&body, max_len)
        .map(|value| Some((value, len)))
        .map_err(FrameError::Rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &("hello".to_owned(), 7u32))
            .await
            .unwrap();
        write_frame(&mut buf, &vec![1u8; 100]).await.unwrap();
        let mut reader = futures::io::Cursor::new(buf.clone());
        let first: Option<(String, u32)> = read_frame(&mut reader, 1000).await.unwrap();
        assert_eq!(first, Some(("hello".to_owned(), 7)));
        assert!(matches!(
            read_frame::<Vec<u8>>(&mut reader, 50).await,
            Err(FrameError::Rejected(Rejection::Oversized))
        ));
        let mut empty = futures::io::Cursor::new(Vec::new());
        assert!(read_frame::<u32>(&mut empty, 10).await.unwrap().is_none());
        let mut cut = futures::io::Cursor::new(buf[..6].to_vec());
        assert!(matches!(
            read_frame::<(String, u32)>(&mut cut, 1000).await,
            Err(FrameError::Io(_))
        ));
        let mut garbage = futures::io::Cursor::new(vec![3, 0, 0, 0, 0xff, 0xff, 0xff]);
        assert!(matches!(
            read_frame::<(String, u32)>(&mut garbage, 1000).await,
            Err(FrameError::Rejected(Rejection::Malformed))
        ));
    }
}
