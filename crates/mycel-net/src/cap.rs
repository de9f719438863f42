//! Connection policy outside any protocol: refuses inbound connections *before* their
//! handshake once the node is at its connection cap and its few referral slots are taken (a
//! connection in a referral slot makes room by evicting a low-value inbound one, or only
//! hears a goodbye with referrals; see the event loop), or once their source address or
//! subnet holds its share of inbound connections (mycel-core's `inbound`), and tells the swarm where to dial a peer
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
use std::net::IpAddr;

use mycel_core::inbound::{Admission, InboundShares, SharesConfig};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::ReasonLabel;

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
    /// Inbound connections per source host and subnet, pending and established: silent or
    /// stalled connections from one address cannot take every pending slot, nor keys made
    /// on one machine or block every established one (loopback, this machine, and relayed
    /// connections are not counted).
    shares: InboundShares<ConnectionId>,
    /// Inbound connections refused before their handshake, by reason.
    refused: Family<ReasonLabel, Counter>,
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("at the connection cap of {0}")]
pub(crate) struct AtCapacity(usize);

/// Reasons counted in `mycel_connections_refused_total`, beside those of
/// `mycel_core::inbound::ShareRefusal::reason`.
pub(crate) const REFUSED_AT_CAP: &str = "at_cap";

/// The IP an inbound connection comes from, unless it is relayed (then the address is the
/// relay's) or from this machine.
pub(crate) fn limited_ip(remote: &Multiaddr) -> Option<IpAddr> {
    if remote.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    let ip = match remote.iter().next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    (!ip.is_loopback()).then_some(ip)
}

impl Behaviour {
    pub(crate) fn new(
        max_established: u32,
        shares: SharesConfig,
        refused: Family<ReasonLabel, Counter>,
    ) -> Self {
        Self {
            max_established: max_established as usize,
            established: 0,
            dial_addrs: HashMap::new(),
            shares: InboundShares::new(shares),
            refused,
        }
    }

    fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Whether an inbound connection was let in past its source's share, only to be sent away
    /// with referrals.
    pub(crate) fn is_over_share(&self, connection_id: &ConnectionId) -> bool {
        self.shares.is_over_share(connection_id)
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
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if self.established >= self.max_established + REFERRAL_SLOTS {
            self.refuse(REFUSED_AT_CAP);
            return Err(ConnectionDenied::new(AtCapacity(self.max_established)));
        }
        if let Some(ip) = limited_ip(remote_addr) {
            match self.shares.admit(connection_id, ip) {
                Admission::Counted => {}
                // It hears a goodbye with referrals once established (the event loop asks
                // `is_over_share`), in one of the referral slots checked above.
                Admission::OverShare(refusal) => self.refuse(refusal.reason()),
                Admission::Refused(refusal) => {
                    self.refuse(refusal.reason());
                    return Err(ConnectionDenied::new(refusal));
                }
            }
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
            FromSwarm::ConnectionEstablished(e) => {
                self.shares.established(&e.connection_id);
                self.established += 1;
            }
            FromSwarm::ListenFailure(f) => self.shares.closed(&f.connection_id),
            FromSwarm::ConnectionClosed(c) => {
                self.shares.closed(&c.connection_id);
                self.established = self.established.saturating_sub(1);
            }
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
