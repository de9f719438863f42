//! The blob API: `POST /api/blobs` (streaming upload), `GET /api/blobs` (list),
//! `GET /api/blobs/{cid}` (streaming download with Range; fetched from peers first when it is
//! not here), `POST /api/blobs/{cid}/fetch` (fetch with progress as server-sent events,
//! the files of a manifest included), `POST /api/blobs/{cid}/pin`, `DELETE /api/blobs/{cid}`
//! (unpins: the blob stays until the quota needs its room).
//!
//! Bytes stream both ways through bounded channels to the store's blocking reads and writes,
//! so neither an upload nor a download is ever held whole in memory.

use std::convert::Infallible;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use mycel_core::blob::CHUNK_BYTES;
use mycel_core::id::ContentId;
use mycel_net::now_ms;
use mycel_store::{BlobError, BlobInfo, ChunkBuf};
use serde::Deserialize;
use serde_json::json;

use crate::api::{error, ApiState};
use crate::blobs::{FetchError, Progress};

fn blob_error(e: BlobError) -> Response {
    let status = match &e {
        BlobError::NotFound(_) => StatusCode::NOT_FOUND,
        BlobError::TooLarge { .. } | BlobError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
        BlobError::Tree(_) | BlobError::Manifest(_) | BlobError::Unsupported { .. } => {
            StatusCode::BAD_REQUEST
        }
        BlobError::Corrupt { .. } => StatusCode::SERVICE_UNAVAILABLE,
        BlobError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) =>
        {
            StatusCode::INSUFFICIENT_STORAGE
        }
        BlobError::Io { .. } | BlobError::Index(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::SERVICE_UNAVAILABLE => "blob_corrupt",
        StatusCode::INSUFFICIENT_STORAGE => "insufficient_storage",
        StatusCode::BAD_REQUEST => "invalid_request_error",
        _ => "internal",
    };
    error(status, kind, e.to_string())
}

fn fetch_error(e: FetchError) -> Response {
    match e {
        FetchError::Store(e) => blob_error(e),
        unavailable @ FetchError::Unavailable { .. } => {
            error(StatusCode::NOT_FOUND, "not_found", unavailable.to_string())
        }
        too_large @ FetchError::TooLarge { .. } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            too_large.to_string(),
        ),
    }
}

fn parse_cid(cid: &str) -> Result<ContentId, Box<Response>> {
    cid.parse().map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("{cid:?} is not a content id ({e}); ids look like blake3:<64 hex digits>"),
        ))
    })
}

fn describe(blob: &BlobInfo) -> serde_json::Value {
    json!({
        "id": blob.id.to_string(),
        "size": blob.size,
        "pinned": blob.pinned,
        "last_access": blob.last_access,
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct PinQuery {
    pin: Option<bool>,
}

/// A blocking reader over the pieces an async task hands it.
struct ChannelReader {
    pieces: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.pieces.blocking_recv() {
                Some(Ok(piece)) => self.current = piece,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// `POST /api/blobs`: stores the request body as a blob (pinned unless `?pin=false`).
pub(crate) async fn upload(
    State(state): State<ApiState>,
    Query(query): Query<PinQuery>,
    body: Body,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let store = state.blobs.store().clone();
    let pin = query.pin.unwrap_or(true);
    let import = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            pieces: rx,
            current: Bytes::new(),
        };
        store.import(reader, now_ms(), pin)
    });
    let mut stream = body.into_data_stream();
    // Once the import failed (a full disk, say), the rest of the upload is read and dropped,
    // up to a bound: a client still sending would otherwise see the connection cut instead
    // of the answer that says why. Past the bound the answer goes out and the connection
    // closes.
    let mut drained: Option<(u64, tokio::time::Instant)> = None;
    let mut cut_short = false;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| format!("the upload broke off: {e}"));
        let Ok(bytes) = piece else {
            let _ = tx.send(piece).await;
            break;
        };
        match &mut drained {
            // A full channel holds the upload back until the import thread has caught up.
            None => {
                let len = bytes.len() as u64;
                if tx.send(Ok(bytes)).await.is_err() {
                    drained = Some((len, tokio::time::Instant::now()));
                }
            }
            Some((bytes_dropped, since)) => {
                *bytes_dropped += bytes.len() as u64;
                if *bytes_dropped > MAX_DRAIN_BYTES || since.elapsed() > MAX_DRAIN_TIME {
                    cut_short = true;
                    break;
                }
            }
        }
    }
    drop(tx);
    match import.await {
        Ok(Ok(blob)) => {
            state.blobs.announce().await;
            (StatusCode::CREATED, Json(describe(&blob))).into_response()
        }
        Ok(Err(e)) => {
            let mut response = blob_error(e);
            if cut_short {
                response.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
            }
            response
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// How much of an upload is read and dropped after its import failed, so that the client
/// hears why instead of a cut connection.
const MAX_DRAIN_BYTES: u64 = 256 * 1024 * 1024;
/// And for how long at most.
const MAX_DRAIN_TIME: Duration = Duration::from_secs(30);

/// `GET /api/blobs`: every complete blob, with the store's use and quota.
pub(crate) async fn list(State(state): State<ApiState>) -> Response {
    let store = state.blobs.store().clone();
    let listed = tokio::task::spawn_blocking(move || {
        let mut blobs = store.entries()?;
        blobs.sort_by_key(|b| std::cmp::Reverse(b.last_access));
        Ok::<_, BlobError>((blobs, store.used()?, store.quota()))
    })
    .await;
    match listed {
        Ok(Ok((blobs, used, quota))) => Json(json!({
            "blobs": blobs.iter().map(describe).collect::<Vec<_>>(),
            "used": used,
            "quota": quota,
        }))
        .into_response(),
        Ok(Err(e)) => blob_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// The byte range a `Range` header asks for within `size` bytes: `Ok(None)` for the whole,
/// `Err(())` when it cannot be satisfied. One range only (`bytes=a-b`, `a-`, `-n`).
fn range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let spec = value.strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        // Several ranges: served whole, as the standard allows.
        return Ok(None);
    }
    let (start, end) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
        }
        (start, "") => (
            start.parse().map_err(|_| ())?,
            size.checked_sub(1).ok_or(())?,
        ),
        (start, end) => {
            let end: u64 = end.parse().map_err(|_| ())?;
            (
                start.parse().map_err(|_| ())?,
                end.min(size.saturating_sub(1)),
            )
        }
    };
    if start > end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// `GET /api/blobs/{cid}`: the blob's bytes, fetched from peers first if need be.
pub(crate) async fn download(
    State(state): State<ApiState>,
    Path(cid): Path<String>,
    headers: HeaderMap,
) -> Response {
    let id = match parse_cid(&cid) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    if let Err(e) = state
        .blobs
        .fetch(id, &[], false, &Progress::default())
        .await
    {
        return fetch_error(e);
    }
    let store = state.blobs.store().clone();
    let opened = tokio::task::spawn_blocking(move || store.open_reader(&id, now_ms())).await;
    let reader = match opened {
        Ok(Ok(reader)) => reader,
        Ok(Err(e)) => return blob_error(e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let size = reader.size();
    let (status, start, len) = match range(&headers, size) {
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Err(()) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response()
        }
    };
    // Whole chunks are read, each verified against its hash before any of it is sent. The
    // first is read before the status goes out: a blob of one chunk the disk changed (or
    // whose first chunk it changed) is answered 503 `blob_corrupt`, and goes for repair. A
    // later chunk the disk changed ends the response early, short of its Content-Length: the
    // client sees a failed transfer, never wrong bytes, and the blob goes for repair.
    let end = start + len;
    let piece = move |reader: &mycel_store::ChunkReader, data: &mut ChunkBuf, index: u64| {
        reader.read_chunk_into(index, data).map(|()| {
            let at = index * CHUNK_BYTES;
            let from = (start.max(at) - at) as usize;
            let to = (end.min(at + data.bytes().len() as u64) - at) as usize;
            Bytes::copy_from_slice(&data.bytes()[from..to])
        })
    };
    let first = start / CHUNK_BYTES;
    let read_first = tokio::task::spawn_blocking(move || {
        let mut data = ChunkBuf::new();
        let head = if len == 0 {
            Ok(Bytes::new())
        } else {
            piece(&reader, &mut data, first)
        };
        (reader, data, head)
    })
    .await;
    let (reader, mut data, head) = match read_first {
        Ok((reader, data, Ok(head))) => (reader, data, head),
        Ok((_, _, Err(e))) => {
            state.blobs.on_read_error(&e);
            return blob_error(e);
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, BlobError>>(4);
    tokio::task::spawn_blocking(move || {
        if tx.blocking_send(Ok(head)).is_err() {
            return;
        }
        for index in first + 1..end.div_ceil(CHUNK_BYTES) {
            let piece = piece(&reader, &mut data, index);
            let failed = piece.is_err();
            if tx.blocking_send(piece).is_err() || failed {
                // The client went away, or the chunk was not served.
                return;
            }
        }
    });
    let blobs = state.blobs.clone();
    let body = Body::from_stream(futures::stream::unfold(rx, move |mut rx| {
        let blobs = blobs.clone();
        async move {
            let piece = rx.recv().await?.map_err(|e| {
                blobs.on_read_error(&e);
                std::io::Error::other(e.to_string())
            });
            Some((piece, rx))
        }
    }));
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{id}\""));
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    response
        .body(body)
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// `POST /api/blobs/{cid}/fetch`: fetches the blob (and a manifest's files) from peers,
/// reporting progress as server-sent events: `{"done", "total"}` a few times a second, then
/// `{"done", "total", "id", "complete": true}` or `{"error"}`.
pub(crate) async fn fetch(
    State(state): State<ApiState>,
    Path(cid): Path<String>,
    Query(query): Query<PinQuery>,
) -> Response {
    let id = match parse_cid(&cid) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let progress = Arc::new(Progress::default());
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    let blobs = state.blobs.clone();
    let pin = query.pin.unwrap_or(false);
    let shown = progress.clone();
    let work = tokio::spawn(async move { blobs.fetch_tree(id, &[], pin, &shown).await });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let report = |progress: &Progress| {
            json!({
                "done": progress.done.load(Ordering::Relaxed),
                "total": progress.total.load(Ordering::Relaxed),
            })
        };
        tokio::pin!(work);
        loop {
            tokio::select! {
                outcome = &mut work => {
                    let last = match outcome {
                        Ok(Ok(blob)) => {
                            let mut last = report(&progress);
                            last["id"] = json!(blob.id.to_string());
                            last["complete"] = json!(true);
                            last
                        }
                        Ok(Err(e)) => json!({ "error": e.to_string() }),
                        Err(e) => json!({ "error": e.to_string() }),
                    };
                    let _ = tx.send(Event::default().data(last.to_string())).await;
                    return;
                }
                _ = tick.tick() => {
                    let event = Event::default().data(report(&progress).to_string());
                    if tx.send(event).await.is_err() {
                        // Nobody is watching; the fetch goes on.
                    }
                }
            }
        }
    });
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn set_pin(state: &ApiState, cid: &str, pinned: bool) -> Response {
    let id = match parse_cid(cid) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let store = state.blobs.store().clone();
    let result = tokio::task::spawn_blocking(move || {
        if store.info(&id)?.is_none() {
            return Err(BlobError::NotFound(id));
        }
        store.set_pinned(&id, pinned)?;
        store.info(&id)
    })
    .await;
    match result {
        Ok(Ok(Some(blob))) => Json(describe(&blob)).into_response(),
        Ok(Ok(None)) => blob_error(BlobError::NotFound(id)),
        Ok(Err(e)) => blob_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// `POST /api/blobs/{cid}/pin`.
pub(crate) async fn pin(State(state): State<ApiState>, Path(cid): Path<String>) -> Response {
    set_pin(&state, &cid, true).await
}

/// `DELETE /api/blobs/{cid}`: unpins.
pub(crate) async fn unpin(State(state): State<ApiState>, Path(cid): Path<String>) -> Response {
    set_pin(&state, &cid, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(value: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, value.parse().unwrap());
        range(&headers, size)
    }

    #[test]
    fn ranges_are_read_as_the_standard_says() {
        assert_eq!(range(&HeaderMap::new(), 10), Ok(None));
        assert_eq!(ask("bytes=0-3", 10), Ok(Some((0, 3))));
        assert_eq!(ask("bytes=4-", 10), Ok(Some((4, 9))));
        assert_eq!(ask("bytes=-3", 10), Ok(Some((7, 9))));
        assert_eq!(ask("bytes=-30", 10), Ok(Some((0, 9))));
        assert_eq!(ask("bytes=5-100", 10), Ok(Some((5, 9))));
        assert_eq!(ask("bytes=0-1,4-5", 10), Ok(None));
        for bad in [
            "bytes=10-",
            "bytes=7-3",
            "bytes=-0",
            "items=0-1",
            "bytes=a-b",
            "bytes=0-1",
        ] {
            let size = if bad == "bytes=0-1" { 0 } else { 10 };
            assert_eq!(ask(bad, size), Err(()), "{bad}");
        }
    }
}
