//! NAT traversal in the event loop: AutoNAT verdicts, relay reservations, hole punches and
//! the rule that bulk data waits for a direct connection. What to do is decided by
//! mycel-core's `reach`; this turns libp2p's events into its inputs and its answers into
//! listeners, dials and closes.

use std::collections::HashMap;

use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError};
use libp2p::{autonat, dcutr, relay, upnp, Multiaddr, PeerId};
use mycel_core::membership::{Link, PeerInfo, PeerState};
use mycel_core::reach::{Reach, ReachConfig, Reachability};
use mycel_core::wire::Rejection;
use tokio::sync::oneshot;
use tracing::{debug, info};

use super::EventLoop;
use crate::config::RelayServer;
use crate::handle::{now_ms, NetError};

/// A request for a direct connection (bulk data), answered when one exists or at `deadline`.
pub(super) struct Waiter {
    peer: PeerId,
    deadline: u64,
    reply: oneshot::Sender<Result<(), NetError>>,
}

/// NAT traversal state of one node.
pub(super) struct Nat {
    pub(super) reach: Reach<PeerId>,
    /// Listeners on relays (`.../p2p/RELAY/p2p-circuit`), by the relay they go through.
    listeners: HashMap<ListenerId, PeerId>,
    /// Addresses others reach us at through a relay, by listener.
    relayed_addrs: Vec<(ListenerId, Multiaddr)>,
    /// Connections relayed through a third node, and their peer.
    relayed_conns: HashMap<ConnectionId, PeerId>,
    /// Direct (not relayed) connections per peer.
    direct: HashMap<PeerId, usize>,
    /// When the first relayed connection to each peer opened (no direct one yet).
    relayed_since: HashMap<PeerId, u64>,
    /// Milliseconds from a peer's first relayed connection to its first direct one.
    direct_after: HashMap<PeerId, u64>,
    /// Dials through a relay made for bulk data, still pending.
    relay_dials: HashMap<ConnectionId, PeerId>,
    /// Our direct dials of relays we want a reservation with, and when that request was
    /// made.
    relay_checks: HashMap<ConnectionId, (PeerId, u64)>,
    waiters: Vec<Waiter>,
}

impl Nat {
    pub(super) fn new(now: u64, forced_public: bool) -> Self {
        let mut reach = Reach::new(ReachConfig::default(), now);
        if forced_public {
            reach.force(Reachability::Public);
        }
        Self {
            reach,
            listeners: HashMap::new(),
            relayed_addrs: Vec::new(),
            relayed_conns: HashMap::new(),
            direct: HashMap::new(),
            relayed_since: HashMap::new(),
            direct_after: HashMap::new(),
            relay_dials: HashMap::new(),
            relay_checks: HashMap::new(),
            waiters: Vec::new(),
        }
    }

    /// Whether we hold a direct connection to `peer`.
    pub(super) fn has_direct(&self, peer: &PeerId) -> bool {
        self.direct.get(peer).is_some_and(|n| *n > 0)
    }

    /// Whether we hold a relayed connection to `peer`.
    fn has_relayed(&self, peer: &PeerId) -> bool {
        self.relayed_conns.values().any(|p| p == peer)
    }

    /// Whether a stream to `peer` can only go over a direct connection: libp2p-stream picks
    /// any of the peer's connections, so none may be relayed.
    fn direct_only(&self, peer: &PeerId) -> bool {
        self.has_direct(peer) && !self.has_relayed(peer)
    }

    /// Takes the waiting transfers `pick` chooses out of the queue.
    fn take_waiters(&mut self, pick: impl Fn(&Waiter) -> bool) -> Vec<Waiter> {
        let (taken, waiting) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| pick(w));
        self.waiters = waiting;
        taken
    }
}

/// Relayed addresses announced per reservation.
const MAX_ADDRS_PER_RELAY: usize = 2;
/// How long the start of a relayed wait is kept after the peer's last connection closed.
const RELAYED_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `addr` is on the internet: not loopback, private (RFC 1918, unique local),
/// link-local, shared (carrier-grade NAT, 100.64/10) or unspecified.
pub(crate) fn is_global(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => mycel_core::reach::is_global_ip(ip.into()),
        Protocol::Ip6(ip) => mycel_core::reach::is_global_ip(ip.into()),
        _ => false,
    })
}

/// Whether a failed dial found nobody serving the peer where it was dialled: every address
/// refused the connection outright (not a timeout, nor an unreachable network or host, which
/// may be our own), or another peer answered.
fn nobody_serves_there(error: &DialError) -> bool {
    match error {
        DialError::Transport(attempts) => {
            !attempts.is_empty() && attempts.iter().all(|(_, e)| super::refused(e))
        }
        DialError::WrongPeerId { .. } => true,
        _ => false,
    }
}

/// Whether `addr` goes through a relay.
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

impl EventLoop {
    /// Addresses announced, best first: confirmed external ones (AutoNAT, a gateway, the
    /// operator), then relayed ones, then what we listen on (for the LAN and this host).
    pub(super) fn announced_addrs(&self) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> = self.config.nat.external_addrs.clone();
        for addr in self.swarm.external_addresses() {
            if !is_relayed(addr) && !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
        }
        for (_, addr) in &self.nat.relayed_addrs {
            if !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
        }
        // Loopback addresses only from a node kept to this host: to anyone else they lead
        // back to themselves.
        let local_only = self.listen_addrs.iter().all(super::is_loopback);
        for addr in &self.listen_addrs {
            if !addrs.contains(addr) && (local_only || !super::is_loopback(addr)) {
                addrs.push(addr.clone());
            }
        }
        addrs
    }

    /// The relay server serves once we are public (in auto mode), and the node announces the
    /// change.
    fn reachability_changed(&mut self) {
        let status = self.nat.reach.status();
        info!(reachability = status.as_str(), "reachability changed");
        self.apply_relay_status();
        // Behind a NAT nobody can reach our Kademlia server: be a client, so that peers do
        // not put us in their routing tables and wait on dials of our private addresses.
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            kad.set_mode(Some(if status == Reachability::Private {
                libp2p::kad::Mode::Client
            } else {
                libp2p::kad::Mode::Server
            }));
        }
        if status == Reachability::Public {
            // Reachable directly: relayed addresses would only slow others down.
            let listeners: Vec<ListenerId> = self.nat.listeners.keys().copied().collect();
            for id in listeners {
                self.swarm.remove_listener(id);
            }
            self.nat.listeners.clear();
            self.nat.relayed_addrs.clear();
            self.nat.reach.release_all();
        }
        self.announce();
    }

    /// Tells the relay server whether to serve (advertise the hop protocol) now. Called before
    /// the first event and on every change of reachability: libp2p would serve as soon as
    /// any external address is confirmed, a relayed one included.
    pub(super) fn apply_relay_status(&mut self) {
        let serve = self.serves_relay();
        if let Some(relay) = self.swarm.behaviour_mut().relay.as_mut() {
            relay.set_status(Some(if serve {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
        }
    }

    /// Whether this node serves as a relay now.
    pub(super) fn serves_relay(&self) -> bool {
        match self.config.nat.relay_server {
            RelayServer::Off => false,
            RelayServer::On => true,
            RelayServer::Auto => self.nat.reach.status() == Reachability::Public,
        }
    }

    pub(super) fn on_autonat_client(&mut self, event: autonat::v2::client::Event) {
        let ok = event.result.is_ok();
        debug!(addr = %event.tested_addr, server = %event.server, ok, "AutoNAT probe");
        // Only a dial-back to an address of our own on the internet says whether we can be
        // reached: relayed candidates and bare peer ids (both seen from libp2p) say nothing.
        if is_relayed(&event.tested_addr) || !is_global(&event.tested_addr) {
            return;
        }
        self.metrics.nat_event(
            "autonat_probe",
            if ok { "reachable" } else { "unreachable" },
        );
        if self.nat.reach.on_probe(ok) {
            self.reachability_changed();
        }
    }

    /// The swarm's confirmed external addresses changed (AutoNAT, a gateway, a relay).
    pub(super) fn on_external_addrs_changed(&mut self) {
        // An address confirmed by a neighbour on the LAN says nothing about the internet.
        let confirmed = self
            .swarm
            .external_addresses()
            .filter(|a| !is_relayed(a) && is_global(a))
            .count();
        if self.nat.reach.set_confirmed(confirmed) {
            self.reachability_changed();
        } else {
            self.announce();
        }
    }

    pub(super) fn on_relay_client(&mut self, event: relay::client::Event) {
        if let relay::client::Event::ReservationReqAccepted {
            relay_peer_id,
            renewal,
            ..
        } = event
        {
            if !renewal {
                info!(relay = %relay_peer_id, "relay reservation accepted");
                self.metrics.nat_event("relay_reservation", "accepted");
            }
            if !self.nat.reach.on_reserved(relay_peer_id) {
                // A late answer to a request given up on.
                self.drop_relay(relay_peer_id);
            }
        }
    }

    /// What this node's relay server did, counted; a peer whose request the server refused
    /// (reservations or circuits past the limits, or asked for too fast) pays a little for it:
    /// an honest client is refused now and then by a full relay, a flood is refused many times.
    pub(super) fn on_relay_server(&mut self, event: relay::Event) {
        let (outcome, refused) = match event {
            relay::Event::ReservationReqAccepted { renewed, .. } => {
                if renewed {
                    return;
                }
                ("reservation_accepted", None)
            }
            relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                ("reservation_denied", Some(src_peer_id))
            }
            relay::Event::CircuitReqAccepted { .. } => ("circuit_accepted", None),
            relay::Event::CircuitReqDenied { src_peer_id, .. } => {
                ("circuit_denied", Some(src_peer_id))
            }
            other => {
                debug!(?other, "relay server");
                return;
            }
        };
        self.metrics.nat_event("relay_served", outcome);
        if let Some(peer) = refused {
            debug!(%peer, outcome, "relay server refused a request");
            self.reject(peer, Rejection::RateLimited);
        }
    }

    pub(super) fn on_dcutr(&mut self, event: dcutr::Event) {
        match event.result {
            Ok(_) => {
                info!(peer = %event.remote_peer_id, "hole punched: direct connection");
                self.metrics.nat_event("hole_punch", "direct");
            }
            Err(e) => {
                info!(peer = %event.remote_peer_id, "hole punch failed: {e}");
                self.metrics.nat_event("hole_punch", "failed");
            }
        }
    }

    pub(super) fn on_upnp(&mut self, event: upnp::Event) {
        match event {
            upnp::Event::NewExternalAddr { external_addr, .. } => {
                info!(%external_addr, "gateway mapped a port")
            }
            upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                info!(%external_addr, "gateway mapping expired")
            }
            upnp::Event::GatewayNotFound => debug!("no UPnP gateway"),
            upnp::Event::NonRoutableGateway => debug!("UPnP gateway is not on the internet"),
        }
    }

    /// `info` with how we are connected to `peer` now.
    pub(super) fn with_link(&self, peer: &PeerId, info: &PeerInfo) -> PeerInfo {
        let mut info = info.clone();
        info.link = if self.nat.has_direct(peer) {
            Some(Link::Direct)
        } else if self.nat.has_relayed(peer) {
            Some(Link::Relayed)
        } else {
            None
        };
        info.direct_after_ms = self.nat.direct_after.get(peer).copied();
        info
    }

    /// Closes our listeners through `relay` (their addresses are no longer announced).
    fn drop_relay(&mut self, relay: PeerId) {
        let ids: Vec<ListenerId> = self
            .nat
            .listeners
            .iter()
            .filter(|(_, r)| **r == relay)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.nat.listeners.remove(&id);
            self.swarm.remove_listener(id);
        }
        let before = self.nat.relayed_addrs.len();
        let listeners = &self.nat.listeners;
        self.nat
            .relayed_addrs
            .retain(|(id, _)| listeners.contains_key(id));
        if self.nat.relayed_addrs.len() != before {
            self.announce();
        }
    }

    /// A listener came up; true when it is a relay's. The relay chooses what the address
    /// says: only the address through that very relay is announced, at most
    /// [`MAX_ADDRS_PER_RELAY`] per reservation.
    pub(super) fn on_relay_listen_addr(&mut self, listener: ListenerId, addr: &Multiaddr) -> bool {
        let Some(relay) = self.nat.listeners.get(&listener).copied() else {
            // Not ours to announce (or not through a relay at all).
            return is_relayed(addr);
        };
        let through = addr
            .iter()
            .take_while(|p| *p != Protocol::P2pCircuit)
            .last();
        let own = self
            .nat
            .relayed_addrs
            .iter()
            .filter(|(id, _)| *id == listener)
            .count();
        if through != Some(Protocol::P2p(relay)) || !is_relayed(addr) || own >= MAX_ADDRS_PER_RELAY
        {
            debug!(%relay, %addr, "relayed address not announced");
            return true;
        }
        if !self.nat.relayed_addrs.iter().any(|(_, a)| a == addr) {
            self.nat.relayed_addrs.push((listener, addr.clone()));
            self.announce();
        }
        true
    }

    /// A listener closed; a relay's is asked again later.
    pub(super) fn on_listener_closed(&mut self, listener: ListenerId, why: &str) {
        self.nat.relayed_addrs.retain(|(id, _)| *id != listener);
        if let Some(relay) = self.nat.listeners.remove(&listener) {
            info!(%relay, "relay reservation ended: {why}");
            self.metrics.nat_event("relay_reservation", "failed");
            let now = now_ms();
            self.nat.reach.on_failed(relay, now, &mut self.rng);
            self.announce();
        }
    }

    pub(super) fn nat_connection_established(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        self.nat.relay_dials.remove(&connection);
        if let Some((relay, asked)) = self.nat.relay_checks.remove(&connection) {
            // Only for the request the dial was made for (a later one dials anew).
            if self.nat.reach.asked_at(&relay) == Some(asked) {
                self.ask_relay(relay, now_ms());
            }
        }
        if endpoint.is_relayed() {
            self.metrics.nat_event("relayed_connection", "opened");
            self.nat.relayed_conns.insert(connection, peer);
            // Both sides dialled at once: the direct connection is already there.
            if self.nat.has_direct(&peer) {
                self.swarm.close_connection(connection);
            } else {
                self.nat.relayed_since.entry(peer).or_insert_with(now_ms);
            }
            return;
        }
        *self.nat.direct.entry(peer).or_default() += 1;
        if let Some(since) = self.nat.relayed_since.remove(&peer) {
            let after = now_ms().saturating_sub(since);
            self.nat.direct_after.insert(peer, after);
            self.metrics.nat_event("relayed_to_direct", "upgraded");
        }
        // A direct connection replaces relayed ones: streams must not pick the relay.
        let relayed: Vec<ConnectionId> = self
            .nat
            .relayed_conns
            .iter()
            .filter(|(_, p)| **p == peer)
            .map(|(c, _)| *c)
            .collect();
        for c in relayed {
            self.swarm.close_connection(c);
        }
        self.settle_waiters(peer);
    }

    /// Answers the transfers waiting for `peer` once only direct connections to it are left.
    fn settle_waiters(&mut self, peer: PeerId) {
        if !self.nat.direct_only(&peer) {
            return;
        }
        for w in self.nat.take_waiters(|w| w.peer == peer) {
            let _ = w.reply.send(Ok(()));
        }
    }

    /// A dial of `peer` failed: transfers waiting for it fail now unless another connection
    /// (a relayed one, still to be upgraded) is up.
    pub(super) fn nat_dial_failed(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        error: &DialError,
    ) {
        self.nat.relay_dials.remove(&connection);
        // Our dial of a relay for a reservation request still pending: a relay that nobody
        // serves at any public address its announcement names is not where it says it
        // serves, and pays, as a referral to a peer that is not there does. Any other
        // failure (a timeout, an unreachable network, our own limits) proves nothing: the
        // request just failed.
        if let Some((relay, asked)) = self.nat.relay_checks.remove(&connection) {
            let now = now_ms();
            if self.nat.reach.asked_at(&relay) == Some(asked) {
                self.metrics.nat_event("relay_reservation", "failed");
                if nobody_serves_there(error) {
                    info!(%relay, "relay not found at its announced addresses: {error}");
                    if self.nat.reach.on_unreachable(relay, now, &mut self.rng) {
                        self.reject(relay, Rejection::FalseRelay);
                    }
                } else {
                    self.nat.reach.on_failed(relay, now, &mut self.rng);
                }
            }
        }
        // Connected, or still dialling it through a relay: the transfer may yet go.
        if self.swarm.is_connected(&peer) || self.nat.relay_dials.values().any(|p| *p == peer) {
            return;
        }
        for w in self.nat.take_waiters(|w| w.peer == peer) {
            let _ = w.reply.send(Err(NetError::Request {
                peer,
                reason: format!("cannot connect: {error}"),
            }));
        }
    }

    pub(super) fn nat_connection_closed(&mut self, peer: PeerId, connection: ConnectionId) {
        if self.nat.relayed_conns.remove(&connection).is_some() {
            self.settle_waiters(peer);
        } else if let Some(n) = self.nat.direct.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.nat.direct.remove(&peer);
            }
        }
        // A hole punch's timing is kept while connected. When the last connection closes,
        // the start of a relayed wait outlives it a little: the peer may close the relayed
        // connection just before our side sees the direct one open (`nat_tick` forgets it
        // after `RELAYED_MEMORY`).
        if self.nat.direct_after.contains_key(&peer)
            && !self.nat.has_direct(&peer)
            && !self.nat.has_relayed(&peer)
        {
            self.nat.direct_after.remove(&peer);
        }
    }

    /// Once a tick: expire waiters, ask relays for reservations while we need them.
    pub(super) fn nat_tick(&mut self, now: u64) {
        let memory = RELAYED_MEMORY.as_millis() as u64;
        let swarm = &self.swarm;
        self.nat
            .relayed_since
            .retain(|peer, since| swarm.is_connected(peer) || now.saturating_sub(*since) < memory);
        let waited = self.config.nat.direct_wait;
        for w in self.nat.take_waiters(|w| now >= w.deadline) {
            let error = if self.nat.has_relayed(&w.peer) {
                self.metrics.nat_event("bulk_over_relay", "refused");
                relayed_only(w.peer, waited)
            } else {
                NetError::Request {
                    peer: w.peer,
                    reason: format!("no connection within {waited:?}"),
                }
            };
            let _ = w.reply.send(Err(error));
        }
        // A node kept to this host (loopback, memory transport) has no NAT to get around.
        if !self.config.nat.relay_client || self.config.listen.iter().all(super::is_loopback) {
            return;
        }
        for relay in self.nat.reach.expire(now, &mut self.rng) {
            self.drop_relay(relay);
        }
        let candidates: Vec<PeerId> = self
            .membership
            .peers()
            .filter(|(_, info)| {
                info.state == PeerState::Alive
                    && info.relay
                    && info.reachability == Reachability::Public
            })
            .map(|(peer, _)| *peer)
            .collect();
        // A relay that stopped serving (or failed) is left at once, not when its reservation
        // would have been renewed: its address would be announced dead meanwhile.
        for relay in self.nat.reach.held() {
            if !candidates.contains(&relay) {
                info!(%relay, "relay no longer serves; leaving it");
                self.drop_relay(relay);
                self.nat.reach.on_failed(relay, now, &mut self.rng);
            }
        }
        for relay in self.nat.reach.reserve(now, &candidates, &mut self.rng) {
            if self.nat.has_direct(&relay) {
                self.ask_relay(relay, now);
                continue;
            }
            // Not directly connected: dial it ourselves at the public addresses its current
            // announcement names, and ask once that connection is up
            // (`nat_connection_established`). Our own dial is the one whose failure says the
            // relay is not where it claims (`nat_dial_failed`); libp2p's relay client would
            // also not dial a relay reached only through another relay (it counts as
            // connected), and a reservation needs a direct connection.
            let public: Vec<Multiaddr> = self
                .addrs_announced_by(&relay)
                .into_iter()
                .filter(|a| !is_relayed(a) && super::is_stream_addr(a) && is_global(a))
                .collect();
            if public.is_empty() {
                self.nat.reach.on_failed(relay, now, &mut self.rng);
                continue;
            }
            let opts = DialOpts::peer_id(relay)
                .addresses(public)
                .condition(PeerCondition::Always)
                .build();
            let connection = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.nat.relay_checks.insert(connection, (relay, now));
                }
                Err(e) => {
                    debug!(%relay, "cannot dial relay directly: {e}");
                    self.nat.reach.on_failed(relay, now, &mut self.rng);
                }
            }
        }
    }

    /// Listens through `relay`, to which we hold a direct connection (asked for a reservation
    /// by `reach`): libp2p's relay client asks over that connection.
    fn ask_relay(&mut self, relay: PeerId, now: u64) {
        let Some(base) = self
            .dial_addrs(&relay)
            .into_iter()
            .find(|a| !is_relayed(a) && super::is_stream_addr(a))
        else {
            self.nat.reach.on_failed(relay, now, &mut self.rng);
            return;
        };
        let addr = base.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
        match self.swarm.listen_on(addr.clone()) {
            Ok(id) => {
                debug!(%addr, "asking for a relay reservation");
                self.nat.listeners.insert(id, relay);
            }
            Err(e) => {
                debug!(%addr, "cannot listen through relay: {e}");
                self.nat.reach.on_failed(relay, now, &mut self.rng);
            }
        }
    }

    /// Answers `reply` once a direct connection to `peer` exists (dialling it if there is no
    /// connection at all), or with an error after `NatConfig::direct_wait`. Bulk data uses
    /// this before it opens a stream.
    pub(super) fn direct_path(
        &mut self,
        peer: PeerId,
        reply: oneshot::Sender<Result<(), NetError>>,
    ) {
        if self.config.nat.allow_relayed_data || self.nat.direct_only(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        if !self.swarm.is_connected(&peer) {
            // Direct and relayed addresses are dialled side by side: one dial tries its
            // addresses one after the other, and dead direct ones (a home's private address)
            // could use up the wait before the relay is tried. A relayed connection that
            // comes up is then upgraded by a hole punch.
            let (relayed, direct): (Vec<Multiaddr>, Vec<Multiaddr>) =
                self.known_addrs(&peer).into_iter().partition(is_relayed);
            let opts = DialOpts::peer_id(peer)
                .addresses(direct)
                .extend_addresses_through_behaviour()
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            let direct_failed = match self.swarm.dial(opts) {
                Err(DialError::DialPeerConditionFalse(_)) | Ok(()) => None,
                Err(e) => Some(e),
            };
            let mut relay_dialled = false;
            if !relayed.is_empty() {
                let opts = DialOpts::peer_id(peer)
                    .addresses(relayed)
                    .condition(PeerCondition::Always)
                    .build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.nat.relay_dials.insert(id, peer);
                        relay_dialled = true;
                    }
                    Err(e) => debug!(%peer, "relayed dial for a direct path: {e}"),
                }
            }
            if let (Some(e), false) = (direct_failed, relay_dialled) {
                let _ = reply.send(Err(NetError::Request {
                    peer,
                    reason: format!("cannot dial: {e}"),
                }));
                return;
            }
        } else if !self.nat.has_direct(&peer) {
            // Reached through a relay only: its direct addresses may work by now (it moved,
            // or it is on our LAN), beside the hole punch of the relayed connection.
            let direct: Vec<Multiaddr> = self
                .known_addrs(&peer)
                .into_iter()
                .filter(|a| !is_relayed(a))
                .collect();
            if !direct.is_empty() {
                let opts = DialOpts::peer_id(peer)
                    .addresses(direct)
                    .condition(PeerCondition::NotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    debug!(%peer, "direct dial beside the relay: {e}");
                }
            }
        }
        if self.nat.waiters.len() >= 1024 {
            let _ = reply.send(Err(NetError::Other(
                "too many transfers waiting for direct connections; try again later".into(),
            )));
            return;
        }
        let deadline = now_ms() + self.config.nat.direct_wait.as_millis() as u64;
        self.nat.waiters.push(Waiter {
            peer,
            deadline,
            reply,
        });
    }
}

fn relayed_only(peer: PeerId, waited: std::time::Duration) -> NetError {
    NetError::RelayedOnly {
        peer,
        reason: format!(
            "no direct connection within {waited:?}: the peer is reachable only through a relay \
             and hole punching did not succeed (both sides may be behind NATs that change ports). \
             Bulk data does not ride relays; run the node with --allow-relayed-data to allow it"
        ),
    }
}
