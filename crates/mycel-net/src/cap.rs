//! Connection policy outside any protocol. Dials of ours, whoever makes them, are held to
//! two budgets: at a host where dials keep failing (refused, or another peer answering),
//! no more than 8 a minute (keys are free, so many "peers" can claim one victim's address);
//! and dials to peers whose addresses only another peer vouched for (a Kademlia answer
//! naming strangers that never announced themselves to us nor were met, whose addresses
//! this behaviour does not see) 1 a second, burst 32. Besides that it refuses inbound connections *before* their
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

use mycel_core::inbound::{Admission, InboundShares, SharesConfig, Strikes};
use mycel_core::peering::DialBudget;
use mycel_core::ratelimit::RateLimiter;
use std::task::{Context, Poll};

use libp2p::core::transport::{PortUse, TransportError};
use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
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
    /// Dials to peers known only from others' claims (see the module doc).
    stranger_dials: RateLimiter<()>,
    /// Hosts where dials failed: many keys claiming one address get a few dials there, not
    /// one each, whichever behaviour dials them (with addresses this behaviour sees).
    dial_budget: DialBudget<(PeerId, ConnectionId)>,
    /// Dials of ours in flight that the budget counts, with the hosts each may try.
    pending_dials: HashMap<ConnectionId, (PeerId, Vec<IpAddr>)>,
    /// Inbound connections refused before their handshake, by reason.
    refused: Family<ReasonLabel, Counter>,
    /// Hosts that keep sending banned peers.
    strikes: Strikes,
    /// This machine's connections are limited like any host's (see `Limits::limit_loopback`).
    limit_loopback: bool,
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("at the connection cap of {0}")]
pub(crate) struct AtCapacity(usize);

/// Reasons counted in `mycel_connections_refused_total`, beside those of
/// `mycel_core::inbound::ShareRefusal::reason`.
pub(crate) const REFUSED_AT_CAP: &str = "at_cap";
/// An inbound connection whose handshake showed a banned peer (counted in the same family).
pub(crate) const REFUSED_BANNED: &str = "banned_peer";
/// An inbound connection refused before its handshake: its host kept sending banned peers
/// (mycel-core's `inbound::Strikes`; counted in the same family).
pub(crate) const REFUSED_STRUCK: &str = "struck_host";
/// A dial of ours to a stranger past the budget (counted in the same family).
pub(crate) const REFUSED_STRANGER_DIAL: &str = "stranger_dial";
/// A dial of ours not made: other peers' dials failed at the host it claims (mycel-core's
/// `peering::DialBudget`; counted in the same family).
pub(crate) const REFUSED_ADDRESS_BUDGET: &str = "address_budget";
/// Dials that may fail (or be under way) at one host within a minute before further dials
/// there wait.
const DIAL_FAILURES_PER_HOST: usize = 8;
/// Dials to strangers a second, on average, and at once.
const STRANGER_DIALS_PER_SEC: f64 = 1.0;
const STRANGER_DIAL_BURST: f64 = 32.0;

/// Why an inbound connection was refused before its handshake.
#[derive(Debug, thiserror::Error)]
#[error("{0} kept sending banned peers; refused for a while")]
pub(crate) struct Struck(IpAddr);

/// Why a dial of ours was not made: others' dials failed at the host it claims.
#[derive(Debug, thiserror::Error)]
#[error("{0}: other peers' dials failed at the host it claims; it waits")]
pub(crate) struct AddressBudget(PeerId);

/// Why a dial of ours was not made.
#[derive(Debug, thiserror::Error)]
#[error("{0}: only other peers claim where it is, and this node's budget for such dials is spent")]
pub(crate) struct StrangerDial(PeerId);

/// Whether a dial's I/O error says nothing about who is at the address: it timed out (an
/// I/O timeout, or libp2p's `TransportTimeoutError::Timeout`, found by its Debug name as
/// `event_loop::refused_outright` explains), or the network is unreachable (a partition, not
/// a lie about the address).
fn says_nothing(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{HostUnreachable, NetworkUnreachable};
    crate::event_loop::timed_out(error)
        || crate::event_loop::error_shows(
            error,
            &[HostUnreachable, NetworkUnreachable],
            "NetworkUnreachable",
        )
}

/// The IP an inbound connection comes from, unless it is relayed (then the address is the
/// relay's) or from this machine.
pub(crate) fn limited_ip(remote: &Multiaddr) -> Option<IpAddr> {
    source_ip(remote).filter(|ip| !ip.is_loopback())
}

/// The IP a connection comes from, this machine's included, unless it is relayed.
pub(crate) fn source_ip(remote: &Multiaddr) -> Option<IpAddr> {
    if remote.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    match remote.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

impl Behaviour {
    pub(crate) fn new(
        max_established: u32,
        shares: SharesConfig,
        refused: Family<ReasonLabel, Counter>,
        limit_loopback: bool,
    ) -> Self {
        Self {
            max_established: max_established as usize,
            established: 0,
            dial_addrs: HashMap::new(),
            shares: InboundShares::new(shares),
            stranger_dials: RateLimiter::new(STRANGER_DIALS_PER_SEC, STRANGER_DIAL_BURST, 1),
            dial_budget: DialBudget::new(DIAL_FAILURES_PER_HOST, 60_000, 4_096),
            pending_dials: HashMap::new(),
            refused,
            strikes: Strikes::default(),
            limit_loopback,
        }
    }

    /// Whether connections from `ip` are held to the per-host limits: not this machine's
    /// unless told to.
    fn limits(&self, ip: IpAddr) -> bool {
        self.limit_loopback || !ip.is_loopback()
    }

    /// A connection from `ip` showed a banned peer: its handshake was wasted, or the
    /// peer it brought was just banned. Hosts that keep doing so are refused before the
    /// handshake for a while.
    pub(crate) fn strike(&mut self, ip: IpAddr) {
        if self.limits(ip) {
            self.strikes.strike(ip, crate::handle::now_ms());
        }
    }

    /// Counts a connection refused, for `reason`.
    pub(crate) fn refuse(&self, reason: &'static str) {
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
        // Relayed connections (the address is the relay's) are not limited here.
        if let Some(ip) = source_ip(remote_addr).filter(|ip| self.limits(*ip)) {
            if !self.strikes.admits(ip, crate::handle::now_ms()) {
                self.refuse(REFUSED_STRUCK);
                return Err(ConnectionDenied::new(Struck(ip)));
            }
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
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        _effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        let Some(peer) = maybe_peer else {
            return Ok(Vec::new());
        };
        let now = crate::handle::now_ms();
        let known = self.dial_addrs.get(&peer).cloned();
        if known.is_none() && addresses.is_empty() {
            // No address of our own for it (nothing it announced, nothing we met), and none
            // given with the dial: whatever addresses the dial uses, another peer claimed them.
            if !self.stranger_dials.allow((), now) {
                self.refuse(REFUSED_STRANGER_DIAL);
                return Err(ConnectionDenied::new(StrangerDial(peer)));
            }
            return Ok(Vec::new());
        }
        // The addresses this dial uses: those it was given (the swarm then leaves out what
        // behaviours add), else ours. At a host where dials keep failing, further dials wait
        // (mycel-core's `peering::DialBudget`); a dial counts once as failed at each host it
        // tries until the peer answers there, so a burst of dials to many keys claiming one
        // host is held to the budget too.
        let ours = addresses.is_empty();
        let candidates = if ours {
            known.unwrap_or_default()
        } else {
            addresses.to_vec()
        };
        let mut hosts: Vec<IpAddr> = Vec::new();
        let mut kept = Vec::new();
        for addr in candidates {
            match limited_ip(&addr) {
                None => kept.push(addr),
                Some(ip) if self.dial_budget.allows(ip, now) => {
                    let host = mycel_core::inbound::host_of(ip);
                    if !hosts.contains(&host) {
                        hosts.push(host);
                    }
                    kept.push(addr);
                }
                Some(_) => {}
            }
        }
        if kept.is_empty() {
            self.refuse(REFUSED_ADDRESS_BUDGET);
            return Err(ConnectionDenied::new(AddressBudget(peer)));
        }
        for host in &hosts {
            self.dial_budget.failed(*host, (peer, connection_id), now);
        }
        if !hosts.is_empty() {
            self.pending_dials.insert(connection_id, (peer, hosts));
        }
        Ok(if ours { kept } else { Vec::new() })
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
                // The peer answered: the hosts this dial counted (the one it answered at, and
                // those whose attempts were cancelled) are forgotten.
                if let Some((peer, hosts)) = self.pending_dials.remove(&e.connection_id) {
                    for host in hosts {
                        self.dial_budget.forget(host, |(p, _)| *p == peer);
                    }
                }
            }
            FromSwarm::DialFailure(f) => {
                let Some((peer, hosts)) = self.pending_dials.remove(&f.connection_id) else {
                    return;
                };
                // Hosts where something other than the peer answered (refused, another peer,
                // a failed handshake) keep the failure; hosts that only timed out or were
                // unreachable (a partition, not a lie), or were never tried, are forgotten.
                let host = |a: &Multiaddr| limited_ip(a).map(mycel_core::inbound::host_of);
                let mut answered: Vec<IpAddr> = Vec::new();
                match f.error {
                    DialError::WrongPeerId { address, .. } => answered.extend(host(address)),
                    DialError::Transport(attempts) => {
                        for (addr, error) in attempts {
                            let silent = match error {
                                TransportError::Other(e) => says_nothing(e),
                                TransportError::MultiaddrNotSupported(_) => true,
                            };
                            if !silent {
                                answered.extend(host(addr));
                            }
                        }
                    }
                    _ => {}
                }
                let now = crate::handle::now_ms();
                let key = (peer, f.connection_id);
                for h in hosts {
                    if answered.contains(&h) {
                        self.dial_budget.failed(h, key, now);
                    } else {
                        self.dial_budget.forget(h, |k| *k == key);
                    }
                }
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
