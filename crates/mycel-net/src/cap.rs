//! Connection policy outside any protocol: refuses inbound connections *before* their
//! handshake once the node is at its connection cap and its few referral slots are taken (a
//! connection in a referral slot only hears a goodbye with referrals; see the event loop),
//! and tells the swarm where to dial a peer
//! when a protocol asks for a connection by peer id alone (a task stream opened by
//! libp2p-stream, say): the addresses the event loop learned from identify and announcements.
//!
//! `connection_limits` checks the established-connection cap only once a connection has
//! finished its Noise or TLS handshake, so a node at its cap pays a full handshake for every
//! connection it then drops, and in a dense network Kademlia lookups keep dialling such nodes
//! (measured: ~2 cores busy for several seconds after 50 nodes converged). Refusing at the
//! pending stage costs an accept and a close.

use std::collections::HashMap;
use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Most peers whose dial addresses are kept.
const MAX_DIAL_BOOK: usize = 8192;
/// Connections accepted beyond the cap, each only long enough to say goodbye with referrals
/// (the event loop closes them at once): a newcomer that reaches a full node still learns
/// where else to go.
pub(crate) const REFERRAL_SLOTS: usize = 4;

/// The inbound-connection gate and the dial-address book.
#[derive(Debug)]
pub(crate) struct Behaviour {
    max_established: usize,
    established: usize,
    dial_addrs: HashMap<PeerId, Vec<Multiaddr>>,
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("at the connection cap of {0}")]
pub(crate) struct AtCapacity(usize);

impl Behaviour {
    pub(crate) fn new(max_established: u32) -> Self {
        Self {
            max_established: max_established as usize,
            established: 0,
            dial_addrs: HashMap::new(),
        }
    }

    /// Replaces what is known about where `peer` can be dialled.
    pub(crate) fn set_dial_addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.dial_addrs.len() >= MAX_DIAL_BOOK && !self.dial_addrs.contains_key(&peer) {
            return;
        }
        self.dial_addrs.insert(peer, addrs);
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if self.established >= self.max_established + REFERRAL_SLOTS {
            return Err(ConnectionDenied::new(AtCapacity(self.max_established)));
        }
        Ok(())
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        _addresses: &[Multiaddr],
        _effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(maybe_peer
            .and_then(|peer| self.dial_addrs.get(&peer).cloned())
            .unwrap_or_default())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(_) => self.established += 1,
            FromSwarm::ConnectionClosed(_) => self.established = self.established.saturating_sub(1),
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
