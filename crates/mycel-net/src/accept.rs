//! Inbound raw streams, queued per protocol for the part of the node that accepts them.
//!
//! libp2p-stream (which the node keeps for opening streams) hands each inbound stream to its
//! acceptor through a channel of one slot and drops the stream when that slot is taken: a
//! burst (one peer opening many streams, or several peers at once on a busy machine) lost
//! other peers' streams without a word. Here each protocol has its own queue, bounded in all
//! ([`QUEUE_MAX`]) and per peer ([`QUEUE_PER_PEER`]), so that one peer's burst cannot push
//! another's streams out. A stream past a bound is dropped (its opener sees it closed) and
//! counted in `mycel_inbound_streams_dropped_total`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{DeniedUpgrade, InboundUpgrade, UpgradeInfo};
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use prometheus_client::metrics::counter::Counter;

/// Streams of one protocol waiting for its acceptor, at most.
pub(crate) const QUEUE_MAX: usize = 512;

/// Streams of one protocol from one peer waiting for its acceptor, at most.
pub(crate) const QUEUE_PER_PEER: usize = 64;

/// Why a protocol could not be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AlreadyAccepted;

/// The waiting streams of one protocol.
#[derive(Default)]
struct Queue {
    streams: VecDeque<(PeerId, ConnectionId, Stream)>,
    per_peer: HashMap<PeerId, usize>,
    waker: Option<Waker>,
}

/// The queues of the protocols accepted now, shared by the behaviour, its connection handlers
/// and the acceptors.
#[derive(Default)]
struct Queues {
    by_protocol: HashMap<StreamProtocol, Queue>,
    /// The keys of `by_protocol`, kept beside them: every connection asks for them after each
    /// of its polls, and an `Arc` is cheaper to hand out than a fresh list. Without the
    /// protocols accepted only on direct inbound connections (below).
    protocols: Arc<[StreamProtocol]>,
    /// All the keys, for direct inbound connections.
    protocols_inbound: Arc<[StreamProtocol]>,
    /// Protocols offered only on connections the peer dialled directly (not through a
    /// relay): AutoNAT's dial-back, which proves an address only over such a connection.
    inbound_only: Vec<StreamProtocol>,
    dropped: Counter,
}

impl Queues {
    fn list_protocols(&mut self) {
        self.protocols_inbound = self.by_protocol.keys().cloned().collect();
        self.protocols = self
            .by_protocol
            .keys()
            .filter(|p| !self.inbound_only.contains(p))
            .cloned()
            .collect();
    }
}

fn lock(queues: &Mutex<Queues>) -> MutexGuard<'_, Queues> {
    queues.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queues {
    /// Queues `stream` for its acceptor, or drops it past a bound or with no acceptor.
    fn push(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        stream: Stream,
        protocol: StreamProtocol,
    ) {
        let Some(queue) = self.by_protocol.get_mut(&protocol) else {
            tracing::debug!(%peer, %protocol, "no acceptor; inbound stream dropped");
            self.dropped.inc();
            return;
        };
        let mine = queue.per_peer.get(&peer).copied().unwrap_or(0);
        if queue.streams.len() >= QUEUE_MAX || mine >= QUEUE_PER_PEER {
            tracing::debug!(%peer, %protocol, mine, "inbound queue full; stream dropped");
            self.dropped.inc();
            return;
        }
        *queue.per_peer.entry(peer).or_default() += 1;
        queue.streams.push_back((peer, connection, stream));
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    }
}

/// Streams of one protocol opened by peers, in the order they arrived. Dropping it stops
/// accepting the protocol: peers then find it unsupported.
pub struct IncomingStreams {
    queues: Arc<Mutex<Queues>>,
    protocol: StreamProtocol,
}

impl std::fmt::Debug for IncomingStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingStreams")
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl IncomingStreams {
    /// The next stream, with the connection it came on.
    pub(crate) fn poll_next_on(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(PeerId, ConnectionId, Stream)>> {
        let mut queues = lock(&self.queues);
        let Some(queue) = queues.by_protocol.get_mut(&self.protocol) else {
            return Poll::Ready(None);
        };
        match queue.streams.pop_front() {
            Some((peer, connection, stream)) => {
                if let Some(n) = queue.per_peer.get_mut(&peer) {
                    *n -= 1;
                    if *n == 0 {
                        queue.per_peer.remove(&peer);
                    }
                }
                Poll::Ready(Some((peer, connection, stream)))
            }
            None => {
                queue.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl futures::Stream for IncomingStreams {
    type Item = (PeerId, Stream);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_next_on(cx)
            .map(|next| next.map(|(peer, _, stream)| (peer, stream)))
    }
}

impl Drop for IncomingStreams {
    fn drop(&mut self) {
        let mut queues = lock(&self.queues);
        queues.by_protocol.remove(&self.protocol);
        let protocol = &self.protocol;
        queues.inbound_only.retain(|p| p != protocol);
        queues.list_protocols();
    }
}

/// Accepts the inbound streams of the protocols registered with [`Behaviour::accept`]. It
/// opens nothing: outbound streams go through libp2p-stream, whose handler lists no inbound
/// protocol.
pub(crate) struct Behaviour {
    queues: Arc<Mutex<Queues>>,
}

impl Behaviour {
    /// A behaviour that counts the streams it drops in `dropped`.
    pub(crate) fn new(dropped: Counter) -> Self {
        Self {
            queues: Arc::new(Mutex::new(Queues {
                dropped,
                ..Queues::default()
            })),
        }
    }

    /// A handle for accepting registrations later (the behaviour itself moves into the swarm).
    pub(crate) fn acceptor(&self) -> Acceptor {
        Acceptor {
            queues: self.queues.clone(),
        }
    }
}

/// Registers protocols to accept, from outside the swarm.
#[derive(Clone)]
pub(crate) struct Acceptor {
    queues: Arc<Mutex<Queues>>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

impl Acceptor {
    /// Starts accepting `protocol`: connections list it from their next inbound stream on.
    pub(crate) fn accept(
        &self,
        protocol: StreamProtocol,
    ) -> Result<IncomingStreams, AlreadyAccepted> {
        self.accept_where(protocol, false)
    }

    /// As [`Acceptor::accept`], on connections the peer dialled directly only.
    pub(crate) fn accept_direct_inbound(
        &self,
        protocol: StreamProtocol,
    ) -> Result<IncomingStreams, AlreadyAccepted> {
        self.accept_where(protocol, true)
    }

    fn accept_where(
        &self,
        protocol: StreamProtocol,
        direct_inbound_only: bool,
    ) -> Result<IncomingStreams, AlreadyAccepted> {
        let mut queues = lock(&self.queues);
        if queues.by_protocol.contains_key(&protocol) {
            return Err(AlreadyAccepted);
        }
        queues
            .by_protocol
            .insert(protocol.clone(), Queue::default());
        if direct_inbound_only {
            queues.inbound_only.push(protocol.clone());
        }
        queues.list_protocols();
        Ok(IncomingStreams {
            queues: self.queues.clone(),
            protocol,
        })
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler {
            peer,
            connection,
            queues: self.queues.clone(),
            direct_inbound: !remote.iter().any(|p| p == Protocol::P2pCircuit),
        })
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler {
            peer,
            connection,
            queues: self.queues.clone(),
            direct_inbound: false,
        })
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One connection's side: offers the accepted protocols to each inbound stream and queues
/// the negotiated ones.
pub(crate) struct Handler {
    peer: PeerId,
    connection: ConnectionId,
    queues: Arc<Mutex<Queues>>,
    /// The peer dialled this connection, not through a relay.
    direct_inbound: bool,
}

/// The inbound upgrade: any of the protocols accepted when the stream was opened.
pub(crate) struct Protocols(Arc<[StreamProtocol]>);

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.iter().cloned().collect::<Vec<_>>().into_iter()
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Protocols> {
        let queues = lock(&self.queues);
        let protocols = if self.direct_inbound {
            queues.protocols_inbound.clone()
        } else {
            queues.protocols.clone()
        };
        SubstreamProtocol::new(Protocols(protocols), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, Infallible, Infallible>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, Protocols, DeniedUpgrade, (), Infallible>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol),
            ..
        }) = event
        {
            lock(&self.queues).push(self.peer, self.connection, stream, protocol);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_acceptor_of_one_protocol_is_refused_until_the_first_is_dropped() {
        let behaviour = Behaviour::new(Counter::default());
        let acceptor = behaviour.acceptor();
        let protocol = StreamProtocol::new("/test/1");
        let first = acceptor.accept(protocol.clone()).unwrap();
        assert_eq!(
            acceptor.accept(protocol.clone()).unwrap_err(),
            AlreadyAccepted
        );
        drop(first);
        assert!(acceptor.accept(protocol).is_ok());
    }

    #[test]
    fn a_direct_inbound_protocol_is_offered_only_on_connections_the_peer_dialled_directly() {
        let mut behaviour = Behaviour::new(Counter::default());
        let acceptor = behaviour.acceptor();
        let everywhere = StreamProtocol::new("/test/any");
        let inbound = StreamProtocol::new("/test/dial-back");
        let _a = acceptor.accept(everywhere.clone()).unwrap();
        let _b = acceptor.accept_direct_inbound(inbound.clone()).unwrap();
        let peer = PeerId::random();
        let local: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let offered = |handler: Handler| -> Vec<String> {
            let mut list: Vec<String> = handler
                .listen_protocol()
                .upgrade()
                .protocol_info()
                .map(|p| p.to_string())
                .collect();
            list.sort();
            list
        };
        let direct: Multiaddr = "/ip4/198.51.100.1/tcp/2".parse().unwrap();
        let relayed: Multiaddr = format!("/ip4/198.51.100.1/tcp/2/p2p/{}/p2p-circuit", peer)
            .parse()
            .unwrap();
        let id = ConnectionId::new_unchecked(0);
        let h = behaviour
            .handle_established_inbound_connection(id, peer, &local, &direct)
            .unwrap();
        assert_eq!(
            offered(h),
            vec![everywhere.to_string(), inbound.to_string()]
        );
        let h = behaviour
            .handle_established_inbound_connection(id, peer, &local, &relayed)
            .unwrap();
        assert_eq!(offered(h), vec![everywhere.to_string()]);
        let h = behaviour
            .handle_established_outbound_connection(
                id,
                peer,
                &direct,
                Endpoint::Dialer,
                PortUse::Reuse,
            )
            .unwrap();
        assert_eq!(offered(h), vec![everywhere.to_string()]);
    }
}
