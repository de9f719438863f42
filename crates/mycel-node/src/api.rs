//! The node's local HTTP API: status, peers, Prometheus metrics, the OpenAI API, the blob
//! API and the training API, behind a bearer token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mycel_net::{NetHandle, Registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::blob_api;
use crate::blobs::BlobService;
use crate::inference::Inference;
use crate::models::ModelService;
use crate::openai;
use crate::train_api;
use crate::training::Training;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// API connections served at once. When all are taken, a newcomer takes the slot of the
/// connection that has waited longest without sending an authorised request; when every one
/// has sent one, the newcomer waits (and those behind it in the listen backlog) until one
/// closes.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// A client must send a request's headers within this time; a connection idle this long
/// between requests is closed too. Silent or trickling connections cannot hold the
/// connection slots for longer.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API's accept loop did with connections, counted in `/metrics`: a flood of
/// connections shows as many closed for newcomers or timed out.
#[derive(Clone, Default)]
pub(crate) struct ConnMetrics {
    accepted: Counter,
    made_room: Counter,
    timed_out: Counter,
    open: Gauge,
}

impl ConnMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "mycel_api_connections_accepted",
            "Connections the API accepted",
            self.accepted.clone(),
        );
        registry.register(
            "mycel_api_connections_closed_for_newcomer",
            "API connections that had sent no authorised request, closed to make room for a \
             newcomer with every slot taken",
            self.made_room.clone(),
        );
        registry.register(
            "mycel_api_connections_timed_out",
            "API connections that never sent an authorised request, closed because headers or \
             a TLS handshake did not arrive in time",
            self.timed_out.clone(),
        );
        registry.register(
            "mycel_api_connections_open",
            "API connections open now",
            self.open.clone(),
        );
    }
}

/// Keeps `mycel_api_connections_open` while a connection's task lives.
struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The TLS side of an HTTPS API, from the PEM files in `tls`; errors name the file and what
/// is wrong with it.
pub(crate) fn tls_acceptor(tls: &crate::ApiTls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .with_context(|| {
            format!(
                "cannot read the API's certificate chain from {} (a PEM file, leaf first)",
                tls.cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no certificate (a PEM file with BEGIN CERTIFICATE blocks, leaf first)",
        tls.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&tls.key).with_context(|| {
        format!(
            "cannot read the API's private key from {} (a PEM file: PKCS#8, PKCS#1 or SEC1)",
            tls.key.display()
        )
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "the key in {} does not fit the certificate in {}",
                tls.key.display(),
                tls.cert.display()
            )
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` until the task is dropped: HTTP/1.1 (over TLS with `tls`), at
/// most [`MAX_CONNECTIONS`] connections at once, the TLS handshake and then the headers each
/// within [`HEADER_READ_TIMEOUT`]. With every slot taken, the connection that has waited
/// longest without sending an authorised request is closed for a newcomer: a flood of
/// connections that send nothing, or only requests without the token, cannot lock clients
/// out for the header timeout (a connection that has sent an authorised request keeps its
/// slot; its requests are the operator's). What it does is counted in `metrics`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: ConnMetrics,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let silent = Arc::new(std::sync::Mutex::new(Silent::default()));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok((stream, from)) => (stream, from.ip()),
            Err(e) => {
                // Out of file descriptors, say: give the others time to close.
                warn!("API cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                if let Some(close) = lock(&silent).oldest() {
                    // Its task ends and frees its slot (and counts it).
                    let _ = close.send(());
                }
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                slot
            }
        };
        let (close, closed) = tokio::sync::oneshot::channel();
        let id = lock(&silent).add(from, close);
        let spoken = Arc::new(AtomicBool::new(false));
        let service = Spoken {
            inner: hyper_util::service::TowerToHyperService::new(app.clone()),
            speaker: Speaker {
                silent: silent.clone(),
                id,
                spoken: spoken.clone(),
            },
        };
        let tls = tls.clone();
        let connections = silent.clone();
        metrics.accepted.inc();
        metrics.open.inc();
        let open = OpenConnection(metrics.open.clone());
        let timed_out = metrics.timed_out.clone();
        let made_room = metrics.made_room.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _open = open;
            let serving = async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                let served = match tls {
                    None => {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        builder.serve_connection(io, service).await
                    }
                    Some(tls) => {
                        let handshake =
                            tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream));
                        match handshake.await {
                            Ok(Ok(stream)) => {
                                let io = hyper_util::rt::TokioIo::new(stream);
                                builder.serve_connection(io, service).await
                            }
                            Ok(Err(e)) => return debug!("API TLS handshake failed: {e}"),
                            Err(_) => {
                                timed_out.inc();
                                return debug!("API TLS handshake timed out");
                            }
                        }
                    }
                };
                if let Err(e) = served {
                    // hyper's header timeout also ends an idle kept-alive connection: only
                    // one that never sent an authorised request counts.
                    if e.is_timeout() && !spoken.load(Ordering::Relaxed) {
                        timed_out.inc();
                    }
                    debug!("API connection ended: {e}");
                }
            };
            tokio::select! {
                () = serving => {}
                // Only a sent signal closes it (the sender is dropped once it has spoken).
                Ok(()) = closed => {
                    made_room.inc();
                    debug!("API connection that sent nothing closed for a newcomer");
                }
            }
            lock(&connections).forget(id);
        });
    }
}

/// The API's connections that have not sent an authorised request yet, oldest first, each
/// with the address it came from and the signal that closes it.
#[derive(Default)]
struct Silent {
    next: u64,
    waiting: std::collections::BTreeMap<u64, (IpAddr, tokio::sync::oneshot::Sender<()>)>,
}

impl Silent {
    /// A new connection from `from`; returns its id.
    fn add(&mut self, from: IpAddr, close: tokio::sync::oneshot::Sender<()>) -> u64 {
        let id = self.next;
        self.next += 1;
        self.waiting.insert(id, (from, close));
        id
    }

    /// Connection `id` sent an authorised request, or ended: it is no longer one to close.
    /// False when it was not waiting (it was chosen to close, or has spoken before).
    fn forget(&mut self, id: u64) -> bool {
        self.waiting.remove(&id).is_some()
    }

    /// The signal that closes the connection silent longest from the host that holds the
    /// most silent connections, taken out of the list: a flood from one host makes room from
    /// its own connections, not by closing a client elsewhere in its TLS handshake. A host is
    /// an IPv4 address or an IPv6 /64 (one machine holds a /64), and this machine's loopback
    /// is one host whatever address of it is used.
    fn oldest(&mut self) -> Option<tokio::sync::oneshot::Sender<()>> {
        let host = |ip: &IpAddr| match ip.to_canonical() {
            ip if ip.is_loopback() => IpAddr::from([127, 0, 0, 1]),
            ip => mycel_core::inbound::host_of(ip),
        };
        let mut counts: HashMap<IpAddr, usize> = HashMap::new();
        for (from, _) in self.waiting.values() {
            *counts.entry(host(from)).or_default() += 1;
        }
        let most = counts.values().copied().max()?;
        let id = self
            .waiting
            .iter()
            .find(|(_, (from, _))| counts[&host(from)] == most)
            .map(|(id, _)| *id)?;
        self.waiting.remove(&id).map(|(_, close)| close)
    }
}

fn lock(silent: &std::sync::Mutex<Silent>) -> std::sync::MutexGuard<'_, Silent> {
    silent.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request's connection, in the request's extensions: [`require_token`] marks it as one
/// that keeps its slot once the request is authorised.
#[derive(Clone)]
struct Speaker {
    silent: Arc<std::sync::Mutex<Silent>>,
    id: u64,
    spoken: Arc<AtomicBool>,
}

impl Speaker {
    /// Marks the connection as one that keeps its slot; false when it has already been
    /// chosen to close (its request must not start: the connection is going).
    fn spoke(&self) -> bool {
        if self.spoken.load(Ordering::Relaxed) {
            return true;
        }
        let kept = lock(&self.silent).forget(self.id);
        self.spoken.store(kept, Ordering::Relaxed);
        kept
    }
}

/// The connection's service: each request carries its connection's [`Speaker`].
struct Spoken<S> {
    inner: S,
    speaker: Speaker,
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for Spoken<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: hyper::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.speaker.clone());
        self.inner.call(request)
    }
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) net: NetHandle,
    pub(crate) token: Arc<str>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) api_addr: String,
    pub(crate) models: Arc<ModelService>,
    pub(crate) inference: Arc<Inference>,
    pub(crate) blobs: Arc<BlobService>,
    pub(crate) training: Arc<Training>,
}

/// An OpenAI-style error body.
pub(crate) fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "message": message.into(), "type": kind } });
    (status, Json(body)).into_response()
}

pub(crate) fn router(state: ApiState, open_metrics: bool) -> Router {
    let guarded = Router::new()
        .route("/api/status", get(status))
        .route("/api/peers", get(peers))
        .route("/api/peers/{peer}/evidence", get(evidence))
        .route("/api/verify", post(verify))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/api/blobs", post(blob_api::upload).get(blob_api::list))
        .route(
            "/api/blobs/{cid}",
            get(blob_api::download).delete(blob_api::unpin),
        )
        .route("/api/blobs/{cid}/fetch", post(blob_api::fetch))
        .route("/api/blobs/{cid}/pin", post(blob_api::pin))
        .route("/api/train", post(train_api::start).get(train_api::list))
        .route("/api/train/{id}", get(train_api::show));
    let guarded = if open_metrics {
        guarded
    } else {
        guarded.route("/metrics", get(metrics))
    };
    let guarded = guarded.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let open = if open_metrics {
        Router::new().route("/metrics", get(metrics))
    } else {
        Router::new()
    };
    guarded.merge(open).with_state(state)
}

/// Compares in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    match presented {
        Some(token) if constant_time_eq(token.trim().as_bytes(), state.token.as_bytes()) => {
            // Authorised: its connection keeps its slot from now on, unless it was already
            // chosen to make room (then nothing of the request runs).
            if let Some(speaker) = request.extensions().get::<Speaker>() {
                if !speaker.spoke() {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "connection_closing",
                        "this connection sent no request for a while and was closed to make \
                         room for another; send the request again",
                    );
                }
            }
            next.run(request).await
        }
        _ => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token \
             from api.token in the node's data directory",
        ),
    }
}

async fn status(State(state): State<ApiState>) -> Response {
    match state.net.status().await {
        Ok(status) => Json(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "api": state.api_addr,
            "network": status,
            "models": state.models.offers(),
            "queue_depth": state.models.queue_depth(),
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

async fn peers(State(state): State<ApiState>) -> Response {
    match state.net.peers().await {
        Ok(mut peers) => {
            peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
            // With what this node's tasks have shown about each (see `mycel_core::trust`).
            let peers: Vec<serde_json::Value> = peers
                .into_iter()
                .map(|peer| {
                    let trust = peer
                        .peer_id
                        .parse()
                        .ok()
                        .and_then(|id| state.inference.trust_of(&id));
                    let mut value = json!(peer);
                    value["trust"] = json!(trust);
                    value
                })
                .collect();
            Json(peers).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

/// GET /api/peers/{peer}/evidence: the signed lies of `peer` this node kept, each checkable
/// by anyone (its claim, its signature and the certificate of the quorum it lost).
async fn evidence(
    State(state): State<ApiState>,
    axum::extract::Path(peer): axum::extract::Path<String>,
) -> Response {
    match peer.parse::<mycel_net::PeerId>() {
        Ok(peer) => Json(state.inference.evidence(&peer)).into_response(),
        Err(_) => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("{peer:?} is not a peer id"),
        ),
    }
}

/// POST /api/verify: checks a certificate (alone, or inside the response that carried it
/// under `mycel.certificate`, whose content must then be the certified output): its
/// signatures and quorum rule, offline, and that its workers and issuer are peers this node
/// knows. A certificate is the issuer's account of its quorum: trust it as far as the issuer.
async fn verify(State(state): State<ApiState>, body: axum::body::Bytes) -> Response {
    let rejected = |status: StatusCode, message: String| {
        state.inference.metrics.certificates_rejected.inc();
        (status, Json(json!({ "valid": false, "error": message }))).into_response()
    };
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => {
            return rejected(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        }
    };
    let checked = tokio::task::spawn_blocking(move || crate::openai::check_certificate(&value))
        .await
        .unwrap_or_else(|e| Err(format!("the check failed: {e}")));
    let (certificate, checked) = match checked {
        Ok(checked) => checked,
        Err(message) => return rejected(StatusCode::UNPROCESSABLE_ENTITY, message),
    };
    let known: std::collections::HashSet<String> = state
        .net
        .peers()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.peer_id)
        .chain([state.net.peer_id().to_string()])
        .collect();
    let unknown: Vec<String> = checked
        .workers
        .iter()
        .chain([&checked.issuer])
        .map(ToString::to_string)
        .filter(|peer| !known.contains(peer))
        .collect();
    if !unknown.is_empty() {
        return rejected(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the certificate names peers this node does not know: {}",
                unknown.join(", ")
            ),
        );
    }
    Json(json!({
        "valid": true,
        "claim": certificate.claim,
        "rule": certificate.rule,
        "workers": checked.workers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "issuer": checked.issuer.to_string(),
    }))
    .into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_silent_longest_goes_first_and_one_that_spoke_never() {
        let mut silent = Silent::default();
        let (mut closes, mut signals) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (close, closed) = tokio::sync::oneshot::channel();
            closes.push(silent.add(IpAddr::from([127, 0, 0, 1]), close));
            signals.push(closed);
        }
        // The oldest has spoken: the next oldest goes, then the last, then nobody.
        assert!(silent.forget(closes[0]));
        assert!(!silent.forget(closes[0]), "spoke before");
        assert!(silent.oldest().unwrap().send(()).is_ok());
        assert_eq!(signals[1].try_recv(), Ok(()));
        // Chosen to close, it cannot claim its slot any more.
        assert!(!silent.forget(closes[1]));
        assert!(silent.oldest().unwrap().send(()).is_ok());
        assert_eq!(signals[2].try_recv(), Ok(()));
        assert!(silent.oldest().is_none());
        // The one that spoke was never signalled: its sender is gone, nothing was sent.
        assert!(matches!(
            signals[0].try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        ));
    }
    #[test]
    fn room_is_made_from_the_address_holding_the_most_silent_connections() {
        let mut silent = Silent::default();
        let client = IpAddr::from([192, 0, 2, 1]);
        let (close, mut client_closed) = tokio::sync::oneshot::channel();
        silent.add(client, close);
        let mut flooded = Vec::new();
        for i in 0..4u16 {
            // One address each, all in one /64: one host.
            let (close, closed) = tokio::sync::oneshot::channel();
            silent.add(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i]), close);
            flooded.push(closed);
        }
        // The client's connection is the oldest, but the flood's address holds more.
        for closed in &mut flooded[..3] {
            assert!(silent.oldest().unwrap().send(()).is_ok());
            assert_eq!(closed.try_recv(), Ok(()));
            assert!(client_closed.try_recv().is_err());
        }
        // As many from each: the oldest goes.
        assert!(silent.oldest().unwrap().send(()).is_ok());
        assert_eq!(client_closed.try_recv(), Ok(()));
    }
}
