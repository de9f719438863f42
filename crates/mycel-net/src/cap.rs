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
use std::net::IpAddr;
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
    /// Inbound connections one remote IP may have in their handshake at once: silent or
    /// stalled connections from one address cannot take every pending slot (loopback, this
    /// machine, is not limited).
    max_pending_per_ip: usize,
    /// The remote IP of each inbound connection in its handshake.
    pending: HashMap<ConnectionId, IpAddr>,
    pending_per_ip: HashMap<IpAddr, usize>,
    /// Inbound connections refused before their handshake, by reason.
    refused: Family<ReasonLabel, Counter>,
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("at the connection cap of {0}")]
pub(crate) struct AtCapacity(usize);

/// Why an inbound connection was refused: its address has too many in their handshake.
#[derive(Debug, thiserror::Error)]
#[error("{0} already has {1} connections in their handshake")]
pub(crate) struct PendingFromIp(IpAddr, usize);

/// Reasons counted in `mycel_connections_refused_total`.
pub(crate) const REFUSED_AT_CAP: &str = "at_cap";
/// See [`REFUSED_AT_CAP`].
pub(crate) const REFUSED_PENDING_PER_IP: &str = "pending_per_ip";

/// The IP an inbound connection comes from, unless it is relayed (then the address is the
/// relay's) or from this machine.
fn limited_ip(remote: &Multiaddr) -> Option<IpAddr> {
    if remote.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    let ip = match remote.iter().next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        // One IPv6 host usually holds a whole /64: that is the unit limited.
        Protocol::Ip6(ip) if !ip.is_loopback() => {
            IpAddr::V6((u128::from(ip) & !((1u128 << 64) - 1)).into())
        }
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    (!ip.is_loopback()).then_some(ip)
}

impl Behaviour {
    pub(crate) fn new(
        max_established: u32,
        max_pending_per_ip: u32,
        refused: Family<ReasonLabel, Counter>,
    ) -> Self {
        Self {
            max_established: max_established as usize,
            established: 0,
            dial_addrs: HashMap::new(),
            max_pending_per_ip: max_pending_per_ip as usize,
            pending: HashMap::new(),
            pending_per_ip: HashMap::new(),
            refused,
        }
    }

    fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An inbound connection left its handshake (established, failed or denied).
    fn settled(&mut self, connection_id: ConnectionId) {
        let Some(ip) = self.pending.remove(&connection_id) else {
            return;
        };
        if let Some(n) = self.pending_per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_ip.remove(&ip);
            }
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
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if self.established >= self.max_established + REFERRAL_SLOTS {
            self.refuse(REFUSED_AT_CAP);
            return Err(ConnectionDenied::new(AtCapacity(self.max_established)));
        }
        if let Some(ip) = limited_ip(remote_addr) {
            let n = self.pending_per_ip.get(&ip).copied().unwrap_or(0);
            if n >= self.max_pending_per_ip {
                self.refuse(REFUSED_PENDING_PER_IP);
                return Err(ConnectionDenied::new(PendingFromIp(ip, n)));
            }
            *self.pending_per_ip.entry(ip).or_default() += 1;
            self.pending.insert(connection_id, ip);
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
                self.settled(e.connection_id);
                self.established += 1;
            }
            FromSwarm::ListenFailure(f) => self.settled(f.connection_id),
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
