//! The handle the rest of the node uses to talk to the network task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use mycel_core::id::ContentId;
use mycel_core::membership::PeerInfo;
use mycel_core::statement::Capabilities;
use mycel_core::wire::Rejection;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::behaviour::build_swarm;
use crate::config::NetConfig;
use crate::event_loop::EventLoop;
use crate::metrics::NetMetrics;
use crate::task::{IncomingStreams, Stream, TASK_PROTOCOL};

/// How long a stream request may go unanswered before it is made again (see
/// [`NetHandle::open_stream`]).
pub const STREAM_REASK: Duration = Duration::from_millis(500);

/// Errors of the network layer, worded for the person running the node.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The swarm could not be built.
    #[error("cannot start networking: {0}")]
    Build(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}; is another node using that port? Pick another --listen port (or port 0 for any free one)")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// What went wrong.
        reason: String,
    },
    /// The network task has stopped.
    #[error("the network task has stopped")]
    Stopped,
    /// A request to a peer failed.
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// What went wrong.
        reason: String,
    },
    /// Bulk data would have to ride a relay: no direct connection to the peer could be made.
    #[error("{peer}: {reason}")]
    RelayedOnly {
        /// The peer.
        peer: PeerId,
        /// What was tried, and what to do.
        reason: String,
    },
    /// A dial or publish failed.
    #[error("{0}")]
    Other(String),
}

/// What the network tells the node.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// A peer told us where it listens (identify); worth remembering across restarts.
    PeerAddresses {
        /// The peer.
        peer: PeerId,
        /// Its listen addresses.
        addrs: Vec<Multiaddr>,
    },
}

/// A snapshot of the network's state.
#[derive(Debug, Clone, Serialize)]
pub struct NetStatus {
    /// This node's peer id.
    pub peer_id: String,
    /// Addresses this node listens on.
    pub listen_addrs: Vec<String>,
    /// Established connections.
    pub connections: usize,
    /// Peers with at least one connection.
    pub connected_peers: usize,
    /// Peers considered alive.
    pub alive: usize,
    /// Alive peers whose capabilities are known.
    pub alive_with_capabilities: usize,
    /// Peers declared failed.
    pub failed: usize,
    /// Sequence number of this node's latest announcement.
    pub announce_seq: u64,
    /// Peers in the Kademlia routing table.
    pub routing_table_peers: usize,
    /// Messages rejected since start.
    pub rejected_messages: u64,
    /// Connections established since start (churn shows as this growing while idle).
    pub connections_opened: u64,
    /// Dials that failed since start.
    pub dial_failures: u64,
    /// Whether other nodes can dial this one: `public`, `private` (behind a NAT: reached
    /// through relays) or `unknown`.
    pub reachability: String,
    /// Whether this node serves as a relay for nodes behind NATs.
    pub relay_server: bool,
    /// Reservations this node's relay holds for others (at most; see the relay's limits).
    pub relay_reservations: usize,
    /// Whether this node's announcement offers relay service (it serves and has room).
    pub relay_announced: bool,
    /// Relays this node holds a reservation with (peer ids).
    pub relays: Vec<String>,
    /// The addresses this node announces, best first: confirmed external, relayed, local.
    pub announced_addrs: Vec<String>,
    /// The operator that runs this node (base58 id of its key), when one vouches for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

pub(crate) enum Command {
    Status(oneshot::Sender<NetStatus>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Peer(PeerId, oneshot::Sender<Option<PeerInfo>>),
    SetCapabilities(Capabilities, oneshot::Sender<u64>),
    RefreshCapabilities(Capabilities),
    Echo {
        peer: PeerId,
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
    PublishRaw {
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    DownReport {
        subject: PeerId,
        reply: oneshot::Sender<Option<mycel_core::statement::SignedStatement>>,
    },
    SyncRaw {
        peer: PeerId,
        reply: oneshot::Sender<Result<usize, NetError>>,
    },
    ReferRaw {
        peer: PeerId,
        referrals: Vec<mycel_core::statement::SignedStatement>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Dial(Multiaddr, oneshot::Sender<Result<(), NetError>>),
    Listen(Multiaddr, oneshot::Sender<Result<(), NetError>>),
    AddAddresses(PeerId, Vec<Multiaddr>, oneshot::Sender<()>),
    DirectPath(PeerId, oneshot::Sender<Result<(), NetError>>),
    Penalise(PeerId, Rejection),
    Isolate(PeerId, u64),
    LiftIsolation(PeerId, oneshot::Sender<bool>),
    Reputation(PeerId, oneshot::Sender<f64>),
    Provide(Vec<ContentId>),
    FindProviders(ContentId, oneshot::Sender<Vec<PeerId>>),
    Shutdown,
}

impl Command {
    /// Whether the answer shows what the node knows of its peers.
    pub(crate) fn shows_peers(&self) -> bool {
        matches!(
            self,
            Command::Status(_) | Command::Peers(_) | Command::Peer(..) | Command::Reputation(..)
        )
    }
}

/// A cloneable handle to the network task.
#[derive(Clone, Debug)]
pub struct NetHandle {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    listen_addrs: Vec<Multiaddr>,
    metrics: NetMetrics,
    streams: Streams,
    acceptor: crate::accept::Acceptor,
    /// Acceptors registered at start ([`NetConfig::accept`]), not yet handed out.
    accepted: Accepted,
    /// The workers' table as the event loop last published it.
    workers: tokio::sync::watch::Receiver<crate::event_loop::Workers>,
}

/// Acceptors registered at start, by protocol.
#[derive(Clone, Default)]
struct Accepted(Arc<Mutex<HashMap<StreamProtocol, IncomingStreams>>>);

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Accepted")
    }
}

/// Opens and accepts raw protocol streams without going through the event loop.
#[derive(Clone)]
struct Streams(libp2p_stream::Control);

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Streams")
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

/// Builds the swarm, binds every listen address, dials the bootstrap and known peers and
/// spawns the event loop. Returns once every listener is bound (or failed to bind).
pub async fn spawn(
    config: NetConfig,
    mut seq_source: Box<dyn FnMut(u64) -> u64 + Send>,
    registry: &mut Registry,
) -> Result<(NetHandle, mpsc::Receiver<NetEvent>, JoinHandle<()>), NetError> {
    let metrics = NetMetrics::register(registry);
    let mut swarm =
        build_swarm(&config, registry, &metrics).map_err(|e| NetError::Build(e.to_string()))?;
    // Before the first listen or dial, so no peer ever finds these protocols unsupported.
    let acceptor = swarm.behaviour().accept.acceptor();
    let mut accepted = HashMap::new();
    for protocol in &config.accept {
        let incoming = acceptor
            .accept(protocol.clone())
            .map_err(|_| NetError::Other(format!("{protocol} is listed twice in `accept`")))?;
        accepted.insert(protocol.clone(), incoming);
    }
    let dial_backs = match config.probes_reachability() {
        true => Some(
            acceptor
                .accept_direct_inbound(crate::autonat::DIAL_BACK_PROTOCOL)
                .map_err(|_| NetError::Other("AutoNAT dial-backs are accepted twice".into()))?,
        ),
        false => None,
    };
    let libp2p_metrics = config
        .libp2p_metrics
        .then(|| libp2p::metrics::Metrics::new(registry));

    let mut pending = Vec::new();
    for addr in &config.listen {
        if let Some(reason) = tcp_port_taken(addr) {
            return Err(NetError::Listen {
                addr: addr.clone(),
                reason,
            });
        }
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        pending.push((id, addr.clone()));
    }
    let mut listen_addrs = Vec::new();
    // Events other than listener ones (an early mDNS discovery, say) are kept for the loop:
    // mDNS reports a peer once, so a dropped discovery would not come back for minutes.
    let mut early_events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pending.is_empty() {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| NetError::Other("timed out binding listen addresses".into()))?;
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                pending.retain(|(id, _)| *id != listener_id);
                listen_addrs.push(address);
            }
            SwarmEvent::ListenerError { listener_id, error }
            | SwarmEvent::ListenerClosed {
                listener_id,
                reason: Err(error),
                ..
            } => {
                let addr = pending
                    .iter()
                    .find(|(id, _)| *id == listener_id)
                    .map(|(_, a)| a.clone())
                    .unwrap_or_else(Multiaddr::empty);
                return Err(NetError::Listen {
                    addr,
                    reason: error.to_string(),
                });
            }
            other => early_events.push(other),
        }
    }

    let first_seq = seq_source(now_ms());
    let (command_tx, command_rx) = mpsc::channel(256);
    let (event_tx, event_rx) = mpsc::channel(256);
    let peer_id = *swarm.local_peer_id();
    let (workers_tx, workers_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    let handle = NetHandle {
        commands: command_tx,
        peer_id,
        listen_addrs: listen_addrs.clone(),
        metrics: metrics.clone(),
        streams: Streams(swarm.behaviour().streams.new_control()),
        acceptor,
        accepted: Accepted(Arc::new(Mutex::new(accepted))),
        workers: workers_rx,
    };
    let mut event_loop = EventLoop::new(
        swarm,
        config,
        seq_source,
        first_seq,
        metrics,
        libp2p_metrics,
        listen_addrs,
        command_rx,
        event_tx,
        dial_backs,
    );
    event_loop.publish_workers_to(workers_tx);
    // Several nodes may share a process (tests, `mycel bench net`): each one's debug lines
    // name it.
    let span = tracing::debug_span!("node", id = %peer_id);
    let task = tokio::spawn(event_loop.run(early_events).instrument(span));
    Ok((handle, event_rx, task))
}

/// Why a TCP listen address with a fixed port cannot be ours: libp2p listens with
/// SO_REUSEPORT, so a second node given a port another node holds would bind it too, without
/// an error, and the kernel would split the incoming connections between them. A plain bind
/// (no SO_REUSEPORT) finds the port taken first.
fn tcp_port_taken(addr: &Multiaddr) -> Option<String> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let Some(Protocol::Tcp(port)) = parts.next() else {
        return None;
    };
    if port == 0 {
        return None;
    }
    match std::net::TcpListener::bind((ip, port)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(format!(
            "TCP port {port} is already in use (another mycel node, or another program); \
             choose another port with --listen"
        )),
        _ => None,
    }
}

/// Wall-clock milliseconds since the Unix epoch: the `now` the drivers pass to mycel-core.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NetHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses bound at start.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// The node's network metrics.
    pub fn metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// A snapshot of the network's state.
    pub async fn status(&self) -> Result<NetStatus, NetError> {
        self.ask(Command::Status).await
    }

    /// Everything known about every peer.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        self.ask(Command::Peers).await
    }

    /// Everything known about the alive peers that announce a model or the operator that runs
    /// them: what a request needs to find where a model runs and who runs it, without copying
    /// every peer the table holds (strangers that announce neither cost a request nothing).
    /// No round trip to the event loop: it is the table the loop publishes before it answers
    /// any command that shows peers and at least every 50 ms while events come, so it holds
    /// whatever an earlier answer of this handle showed of the peers.
    pub fn workers_now(&self) -> Arc<Vec<PeerInfo>> {
        self.workers.borrow().clone()
    }

    /// Everything known about one peer.
    pub async fn peer(&self, peer: PeerId) -> Result<Option<PeerInfo>, NetError> {
        self.ask(|tx| Command::Peer(peer, tx)).await
    }

    /// Replaces this node's capabilities and announces them at once; returns the new sequence
    /// number.
    pub async fn set_capabilities(&self, capabilities: Capabilities) -> Result<u64, NetError> {
        self.ask(|tx| Command::SetCapabilities(capabilities, tx))
            .await
    }

    /// Hands over freshly read capabilities: new models or hardware are announced at once,
    /// a significant change of load or power soon (at most once per half announcement
    /// interval), small moves with the next periodic announcement.
    pub async fn refresh_capabilities(&self, capabilities: Capabilities) -> Result<(), NetError> {
        self.commands
            .send(Command::RefreshCapabilities(capabilities))
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Sends `payload` to `peer` on the sync protocol and returns the echo.
    pub async fn echo(&self, peer: PeerId, payload: Vec<u8>) -> Result<Vec<u8>, NetError> {
        self.ask(|reply| Command::Echo {
            peer,
            payload,
            reply,
        })
        .await?
    }

    /// Asks `peer` for every statement it holds (a sync request with an empty digest) and
    /// returns how many it sent. For tests of what a peer's few bytes of request may cost.
    pub async fn sync_raw(&self, peer: PeerId) -> Result<usize, NetError> {
        self.ask(|reply| Command::SyncRaw { peer, reply }).await?
    }

    /// The down report about `subject` this node would sign and gossip if it saw it fail now,
    /// without publishing it: `None` when it knows no such peer or holds no word from it that
    /// the two were connected (see [`mycel_core::statement::Contact`]). For tests and tools.
    pub async fn down_report(
        &self,
        subject: PeerId,
    ) -> Result<Option<mycel_core::statement::SignedStatement>, NetError> {
        self.ask(|reply| Command::DownReport { subject, reply })
            .await
    }

    /// Publishes raw bytes on the statements topic, bypassing every local check. For tests
    /// and tools that exercise how peers treat bad input.
    pub async fn publish_raw(&self, bytes: Vec<u8>) -> Result<(), NetError> {
        self.ask(|reply| Command::PublishRaw { bytes, reply })
            .await?
    }

    /// Sends `peer` a goodbye carrying `referrals` as they are (any statements, any number),
    /// without closing the connection. For tests and tools that exercise how peers treat
    /// referrals they cannot trust.
    pub async fn refer_raw(
        &self,
        peer: PeerId,
        referrals: Vec<mycel_core::statement::SignedStatement>,
    ) -> Result<(), NetError> {
        self.ask(|reply| Command::ReferRaw {
            peer,
            referrals,
            reply,
        })
        .await?
    }

    /// Listens on one more address: a relay's circuit address (`.../p2p/RELAY/p2p-circuit`)
    /// asks that relay for a reservation.
    pub async fn listen(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|tx| Command::Listen(addr, tx)).await?
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|tx| Command::Dial(addr, tx)).await?
    }

    /// Tells the swarm where `peer` listens (learnt from elsewhere: a job's coordinator, say),
    /// so that opening a stream to it can dial it.
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), NetError> {
        self.ask(|tx| Command::AddAddresses(peer, addrs, tx)).await
    }

    /// Opens a stream of `protocol` to `peer` (dialling it if need be).
    ///
    /// libp2p-stream can lose a request made in the instant between a new connection's
    /// handler and the swarm's report of that connection: it dials, the dial is dropped (the
    /// peer is connected) and the request waits for another connection. So a request not
    /// answered within [`STREAM_REASK`] is made again, which finds the connection; callers
    /// bound the whole wait with their own deadlines.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, NetError> {
        loop {
            let mut control = self.streams.0.clone();
            let open = control.open_stream(peer, protocol.clone());
            match tokio::time::timeout(STREAM_REASK, open).await {
                Ok(result) => {
                    return result.map_err(|e| NetError::Request {
                        peer,
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    tracing::debug!(%peer, %protocol, "no stream after {STREAM_REASK:?}; asking again")
                }
            }
        }
    }

    /// Streams of `protocol` opened by peers. Only one part of the node may accept them.
    pub fn accept_streams(&self, protocol: StreamProtocol) -> Result<IncomingStreams, NetError> {
        let registered = self
            .accepted
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&protocol);
        if let Some(incoming) = registered {
            return Ok(incoming);
        }
        self.acceptor
            .accept(protocol.clone())
            .map_err(|_| NetError::Other(format!("{protocol} streams are already being accepted")))
    }

    /// Opens a stream for bulk data (blob chunks, model files, training updates): only over a
    /// direct connection. A peer reached only through a relay gets `NatConfig::direct_wait`
    /// for a hole punch; then this fails with an error that says so, unless the node allows
    /// relayed data (`NatConfig::allow_relayed_data`).
    pub async fn open_bulk_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, NetError> {
        self.direct_path(peer).await?;
        self.open_stream(peer, protocol).await
    }

    /// Returns once every connection to `peer` is direct (dialling it if need be), or fails
    /// after `NatConfig::direct_wait` (see [`NetHandle::open_bulk_stream`]).
    pub async fn direct_path(&self, peer: PeerId) -> Result<(), NetError> {
        self.ask(|tx| Command::DirectPath(peer, tx)).await?
    }

    /// Opens a task stream to `peer` (dialling it if need be).
    pub async fn open_task_stream(&self, peer: PeerId) -> Result<Stream, NetError> {
        self.open_stream(peer, TASK_PROTOCOL).await
    }

    /// Task streams opened by peers. Only one part of the node may accept them.
    pub fn accept_task_streams(&self) -> Result<IncomingStreams, NetError> {
        self.accept_streams(TASK_PROTOCOL)
    }

    /// Counts misbehaviour seen outside the event loop (a malformed task, a bad result)
    /// against `peer`'s reputation.
    pub async fn penalise(&self, peer: PeerId, reason: Rejection) {
        let _ = self.commands.send(Command::Penalise(peer, reason)).await;
    }

    /// Cuts `peer` off until `until` (Unix ms) whatever its score: disconnected, its gossip
    /// and statements ignored, its reputation the lowest there is (a worker caught lying).
    pub async fn isolate(&self, peer: PeerId, until: u64) {
        let _ = self.commands.send(Command::Isolate(peer, until)).await;
    }

    /// Lifts `peer`'s ban now if its isolation is over and its score is above the ban
    /// threshold (the event loop would otherwise lift it at its next tick); true when the
    /// peer may be dialled.
    pub async fn lift_isolation(&self, peer: PeerId) -> bool {
        self.ask(|tx| Command::LiftIsolation(peer, tx))
            .await
            .unwrap_or(false)
    }

    /// `peer`'s reputation score now (0 is neutral, lower is worse; an isolated peer has
    /// -1000).
    pub async fn reputation(&self, peer: PeerId) -> Result<f64, NetError> {
        self.ask(|tx| Command::Reputation(peer, tx)).await
    }

    /// Announces this node in the DHT as a provider of each of `ids` (and stops for ids no
    /// longer listed).
    pub async fn provide(&self, ids: Vec<ContentId>) -> Result<(), NetError> {
        self.commands
            .send(Command::Provide(ids))
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Peers the DHT lists as providers of `id` (empty when the lookup finds none in time).
    pub async fn find_providers(&self, id: ContentId) -> Result<Vec<PeerId>, NetError> {
        self.ask(|tx| Command::FindProviders(id, tx)).await
    }

    /// Stops the network task (connections are closed).
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_tcp_port_held_by_another_listener_is_found_taken() {
        // The first holder listens as libp2p does, with SO_REUSEPORT.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.set_reuse_port(true).unwrap();
        socket
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.listen(8).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        let taken: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let reason = tcp_port_taken(&taken).expect("the port is held");
        assert!(
            reason.contains(&port.to_string()) && reason.contains("--listen"),
            "{reason}"
        );

        drop(socket);
        assert_eq!(tcp_port_taken(&taken), None, "free once its holder is gone");
        let any: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        assert_eq!(tcp_port_taken(&any), None, "port 0 is never taken");
        let quic: Multiaddr = format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            .parse()
            .unwrap();
        assert_eq!(tcp_port_taken(&quic), None, "not TCP");
    }
}
