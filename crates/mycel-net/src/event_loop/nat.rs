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
use libp2p::{dcutr, relay, upnp, Multiaddr, PeerId};
use mycel_core::autonat::{Answer, Finding, Probes};
use mycel_core::membership::{Link, PeerInfo, PeerState};
use mycel_core::reach::{Reach, ReachConfig, Reachability};
use mycel_core::wire::Rejection;
use tokio::sync::{mpsc, oneshot};
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

/// Our AutoNAT client: the decisions (mycel-core's `autonat`) and what carries them out.
pub(super) struct AutoNat {
    pub(super) probes: Probes<PeerId, Multiaddr, Reporter>,
    /// Opens dial-request streams.
    pub(super) control: libp2p_stream::Control,
    /// Where the probe tasks report.
    pub(super) inputs: mpsc::Sender<AutoNatInput>,
    /// Servers' dial-back streams, until the event loop starts answering them.
    pub(super) dial_backs: Option<crate::task::IncomingStreams>,
    /// Probes out, by nonce.
    pub(super) sent: HashMap<u64, Sent>,
}

/// A probe out, as a dial-back for it is checked.
pub(super) struct Sent {
    /// When it went out.
    at: u64,
    /// The connections its server already held with us then. A dial-back proves an address
    /// only over a new connection, not one the server had open before (a liar would hand
    /// the nonce over that).
    held: Vec<ConnectionId>,
    /// The address it tests.
    addr: Multiaddr,
}

/// Who vouches for an address a peer says it sees us at: the network the peer reports from
/// (its /24, or /48), so that keys made on one host or subnet, however many, count once when
/// candidates are ranked; a peer on this machine or met through a relay, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Reporter {
    Net(std::net::IpAddr),
    Peer(PeerId),
}

/// What a probe task learnt.
pub(super) enum AutoNatInput {
    /// `from` handed over `nonce` on `connection` (one it dialled to us directly).
    DialBack {
        from: PeerId,
        connection: ConnectionId,
        nonce: u64,
    },
    /// The server's verdict on the probe with `nonce`.
    Answer { nonce: u64, answer: Answer },
}

/// A whole probe (opening the stream, data the server may ask for, its dial, its answer) is
/// given up after this; mycel-core's timeout (30 s) is the backstop.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(25);
/// A dial-back stream must hand over its nonce within this.
const DIAL_BACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Dial-back streams answered at once at most, in all and from one peer; more are dropped
/// (the server then reports a dial-back error: no verdict).
const DIAL_BACKS_AT_ONCE: usize = 16;
const DIAL_BACKS_PER_PEER: usize = 2;

/// NAT traversal state of one node.
pub(super) struct Nat {
    pub(super) reach: Reach<PeerId>,
    /// `None` where the node does not probe (one process, or switched off).
    pub(super) autonat: Option<AutoNat>,
    /// Listeners on relays (`.../p2p/RELAY/p2p-circuit`), by the relay they go through.
    listeners: HashMap<ListenerId, PeerId>,
    /// Addresses others reach us at through a relay, by listener.
    relayed_addrs: Vec<(ListenerId, Multiaddr)>,
    /// Connections relayed through a third node, and their peer.
    relayed_conns: HashMap<ConnectionId, PeerId>,
    /// Direct (not relayed) connections per peer.
    direct: HashMap<PeerId, usize>,
    /// Direct connections each peer dialled to us, open now.
    inbound: HashMap<PeerId, Vec<ConnectionId>>,
    /// Where each of those arrived (our side's address).
    inbound_local: HashMap<ConnectionId, Multiaddr>,
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
    /// Reservations our relay server holds for others now, by peer (an upper bound: see
    /// `on_relay_server`).
    served: HashMap<PeerId, usize>,
}

impl Nat {
    pub(super) fn new(now: u64, forced_public: bool, autonat: Option<AutoNat>) -> Self {
        let mut reach = Reach::new(ReachConfig::default(), now);
        if forced_public {
            reach.force(Reachability::Public);
        }
        Self {
            reach,
            autonat,
            listeners: HashMap::new(),
            relayed_addrs: Vec::new(),
            relayed_conns: HashMap::new(),
            direct: HashMap::new(),
            inbound: HashMap::new(),
            inbound_local: HashMap::new(),
            relayed_since: HashMap::new(),
            direct_after: HashMap::new(),
            relay_dials: HashMap::new(),
            relay_checks: HashMap::new(),
            waiters: Vec::new(),
            served: HashMap::new(),
        }
    }

    /// Reservations our relay holds for others (an upper bound).
    pub(super) fn served_reservations(&self) -> usize {
        self.served.values().sum()
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

/// Whether a failed dial met only silence: every address timed out (a black hole, or a
/// network down, ours included: the caller tells them apart).
fn silent_there(error: &DialError) -> bool {
    match error {
        DialError::Transport(attempts) => {
            !attempts.is_empty()
                && attempts.iter().all(|(_, e)| match e {
                    libp2p::TransportError::Other(e) => super::timed_out(e),
                    libp2p::TransportError::MultiaddrNotSupported(_) => false,
                })
        }
        _ => false,
    }
}

/// Opens a dial-request stream to `server`. libp2p's server answers only on connections the
/// asker dialled, and libp2p-stream picks one of a peer's connections at random: where both
/// sides dialled, a few tries find the right one.
async fn open_dial_request(
    control: &mut libp2p_stream::Control,
    server: PeerId,
) -> std::io::Result<libp2p::Stream> {
    const TRIES: usize = 4;
    let mut tries = 0;
    loop {
        tries += 1;
        match control
            .open_stream(server, crate::autonat::DIAL_REQUEST_PROTOCOL)
            .await
        {
            Ok(stream) => return Ok(stream),
            Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) if tries < TRIES => {}
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}

/// Whether a dial-back that arrived at our `arrived` (the connection's local address) can
/// have been dialled to `tested`: the same transport (TCP, or QUIC) and port (candidates carry
/// our listening port) and, where we sit on a public address ourselves (no NAT between), the
/// same IP. A server that dials us where we are to "confirm" an address that is not ours (a
/// victim's, to be announced) or another transport's port proves nothing.
fn dial_back_reached(tested: &Multiaddr, arrived: &Multiaddr) -> bool {
    fn parts(addr: &Multiaddr) -> (Option<std::net::IpAddr>, Option<(bool, u16)>) {
        let mut ip = None;
        let mut port = None;
        for p in addr.iter() {
            match p {
                Protocol::Ip4(a) => ip = Some(a.into()),
                Protocol::Ip6(a) => ip = Some(a.into()),
                Protocol::Tcp(n) => port = Some((false, n)),
                Protocol::Udp(n) => port = Some((true, n)),
                _ => {}
            }
        }
        (ip, port)
    }
    let ((tested_ip, tested_port), (arrived_ip, arrived_port)) = (parts(tested), parts(arrived));
    if tested_port.is_none() || tested_port != arrived_port {
        return false;
    }
    match arrived_ip {
        Some(ip) if mycel_core::reach::is_global_ip(ip) => tested_ip == Some(ip),
        _ => true,
    }
}

/// Whether a relay listener failed because the relay refused the reservation (refused, or
/// its limits reached), as against a broken connection or a timeout. The refusal sits a few
/// errors deep (the swarm's and the relay transport's wrap it).
fn reservation_refused(error: &std::io::Error) -> bool {
    use libp2p::relay::outbound::hop::ReserveError;
    let mut next: Option<&(dyn std::error::Error + 'static)> = error
        .get_ref()
        .map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = next {
        if let Some(refusal) = e.downcast_ref::<ReserveError>() {
            return matches!(
                refusal,
                ReserveError::Refused | ReserveError::ResourceLimitExceeded
            );
        }
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

/// How a circuit this node relayed ended, as counted: closed by either side, cut by the
/// relay at its duration or byte limit, or broken. libp2p-relay tells the limits apart only by
/// the error it ends the copy with (`TimedOut`; an error with its own message for bytes).
fn circuit_end(error: Option<&std::io::Error>) -> &'static str {
    match error {
        None => "circuit_closed",
        Some(e) if e.kind() == std::io::ErrorKind::TimedOut => "circuit_duration_limit",
        Some(e) if e.to_string().contains("circuit bytes") => "circuit_bytes_limit",
        Some(_) => "circuit_broken",
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

    /// Whether this node serves as a relay now (full or not: those holding reservations keep
    /// renewing them and opening circuits).
    pub(super) fn serves_relay(&self) -> bool {
        match self.config.nat.relay_server {
            RelayServer::Off => false,
            RelayServer::On => true,
            RelayServer::Auto => self.nat.reach.status() == Reachability::Public,
        }
    }

    /// Whether this node announces itself a relay: it serves one and has room for another
    /// reservation (a full relay that announced itself would refuse whoever believed it).
    pub(super) fn announces_relay(&self) -> bool {
        let room = self.nat.served_reservations() < self.config.nat.max_reservations;
        self.serves_relay() && (room || self.config.nat.lie_relay_room)
    }

    /// Starts answering servers' dial-backs: each hands over its nonce on a stream of its
    /// own, read with a deadline, a bounded number at once.
    pub(super) fn serve_dial_backs(&mut self) {
        let Some(auto) = self.nat.autonat.as_mut() else {
            return;
        };
        let Some(mut incoming) = auto.dial_backs.take() else {
            return;
        };
        let inputs = auto.inputs.clone();
        tokio::spawn(async move {
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(DIAL_BACKS_AT_ONCE));
            let per_peer: std::sync::Arc<std::sync::Mutex<HashMap<PeerId, usize>>> =
                Default::default();
            loop {
                let (from, connection, stream) = tokio::select! {
                    next = futures::future::poll_fn(|cx| incoming.poll_next_on(cx)) => match next {
                        Some(next) => next,
                        None => return,
                    },
                    // The event loop is gone.
                    _ = inputs.closed() => return,
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                {
                    let mut held = per_peer.lock().unwrap_or_else(|e| e.into_inner());
                    let mine = held.entry(from).or_default();
                    if *mine >= DIAL_BACKS_PER_PEER {
                        continue;
                    }
                    *mine += 1;
                }
                let inputs = inputs.clone();
                let per_peer = per_peer.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let answered = tokio::time::timeout(
                        DIAL_BACK_TIMEOUT,
                        crate::autonat::answer_dial_back(stream),
                    )
                    .await;
                    {
                        let mut held = per_peer.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(n) = held.get_mut(&from) {
                            *n -= 1;
                            if *n == 0 {
                                held.remove(&from);
                            }
                        }
                    }
                    if let Ok(Ok(nonce)) = answered {
                        let dial_back = AutoNatInput::DialBack {
                            from,
                            connection,
                            nonce,
                        };
                        let _ = inputs.send(dial_back).await;
                    }
                });
            }
        });
    }

    /// `reporter` says where it sees us (identify's observed address): an address on the
    /// internet, not through a relay, is a candidate to have dialled back, with the port we
    /// listen on for its transport (as libp2p's identify translates it): a connection we
    /// dialled may have left from another port, or a NAT may have given it another, and
    /// what counts is whether the internet reaches our listener. A LAN address or a relayed
    /// one says nothing about whether the internet reaches us.
    pub(super) fn on_observed_addr(&mut self, reporter: PeerId, addr: Multiaddr) {
        if is_relayed(&addr) || !is_global(&addr) {
            return;
        }
        let listening = |tcp: bool| {
            self.listen_addrs.iter().find_map(|l| {
                l.iter().find_map(|p| match p {
                    Protocol::Tcp(port) if tcp => Some(port),
                    Protocol::Udp(port) if !tcp => Some(port),
                    _ => None,
                })
            })
        };
        let mut translated = Multiaddr::empty();
        for p in addr.iter() {
            translated.push(match p {
                Protocol::Tcp(_) => match listening(true) {
                    Some(port) => Protocol::Tcp(port),
                    None => return,
                },
                Protocol::Udp(_) => match listening(false) {
                    Some(port) => Protocol::Udp(port),
                    None => return,
                },
                // Only what names the address and transport: a trailing /p2p/ID is ours.
                Protocol::P2p(_) => continue,
                p => p,
            });
        }
        let reporter = match self.since.get(&reporter).and_then(|link| link.subnet()) {
            Some(net) => Reporter::Net(net),
            None => Reporter::Peer(reporter),
        };
        if let Some(auto) = self.nat.autonat.as_mut() {
            auto.probes.add_candidate(translated, reporter);
        }
    }

    /// A confirmed address expired: it is tested again like a new candidate.
    pub(super) fn on_external_addr_expired(&mut self, addr: &Multiaddr) {
        if let Some(auto) = self.nat.autonat.as_mut() {
            auto.probes.reopen(addr);
        }
    }

    /// `peer` speaks AutoNAT as a server. Asked only over a direct connection: over a relay
    /// it would see the relay's address, not ours.
    pub(super) fn autonat_server_up(&mut self, peer: PeerId) {
        if !self.nat.has_direct(&peer) {
            return;
        }
        if let Some(auto) = self.nat.autonat.as_mut() {
            auto.probes.server_up(peer);
        }
    }

    /// Sends the probes that are due, each in a task of its own that reports its answer.
    fn autonat_tick(&mut self, now: u64) {
        let Some(auto) = self.nat.autonat.as_mut() else {
            return;
        };
        let settled = auto.probes.expire(now, &mut self.rng);
        for finding in settled {
            self.on_autonat_finding(finding);
        }
        let Nat {
            autonat: Some(auto),
            inbound,
            ..
        } = &mut self.nat
        else {
            return;
        };
        // A server we hold as many connections with as the limit allows could not dial us
        // back: our limit would refuse its new connection, and it would call us unreachable.
        let links = &self.since;
        let per_peer = self.config.limits.max_connections_per_peer;
        let usable = |p: &PeerId| links.get(p).map_or(0, |l| l.conns) < per_peer;
        let probes = auto.probes.poll(now, usable, &mut self.rng);
        // Probes long settled (the core's timeout is 30 s) need no record.
        auto.sent
            .retain(|_, sent| now.saturating_sub(sent.at) < 60_000);
        for probe in probes {
            debug!(server = %probe.server, addr = %probe.addr, "AutoNAT probe sent");
            let held = inbound.get(&probe.server).cloned().unwrap_or_default();
            let sent = Sent {
                at: now,
                held,
                addr: probe.addr.clone(),
            };
            auto.sent.insert(probe.nonce, sent);
            let mut control = auto.control.clone();
            let inputs = auto.inputs.clone();
            tokio::spawn(async move {
                let asked = tokio::time::timeout(PROBE_TIMEOUT, async {
                    let stream = open_dial_request(&mut control, probe.server).await?;
                    crate::autonat::ask(stream, &probe.addr, probe.nonce).await
                })
                .await;
                let answer = match asked {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(e)) => {
                        debug!(server = %probe.server, "AutoNAT probe failed: {e}");
                        Answer::Inconclusive
                    }
                    Err(_) => Answer::Inconclusive,
                };
                let nonce = probe.nonce;
                let _ = inputs.send(AutoNatInput::Answer { nonce, answer }).await;
            });
        }
    }

    pub(super) fn on_autonat_input(&mut self, input: AutoNatInput) {
        let now = now_ms();
        let Some(auto) = self.nat.autonat.as_mut() else {
            return;
        };
        let finding = match input {
            AutoNatInput::DialBack {
                from,
                connection,
                nonce,
            } => {
                if let Some(sent) = auto.sent.get(&nonce) {
                    if sent.held.contains(&connection) {
                        info!(server = %from, "AutoNAT nonce handed over on an old connection");
                        return;
                    }
                    let arrived = self.nat.inbound_local.get(&connection);
                    if let Some(arrived) = arrived.filter(|a| !dial_back_reached(&sent.addr, a)) {
                        info!(server = %from, tested = %sent.addr, %arrived,
                            "AutoNAT dial-back arrived where the tested address does not lead");
                        return;
                    }
                }
                auto.probes.on_dial_back(nonce, &from, now)
            }
            AutoNatInput::Answer { nonce, answer } => {
                debug!(?answer, "AutoNAT answer");
                auto.probes.on_answer(nonce, answer, now, &mut self.rng)
            }
        };
        if let Some(finding) = finding {
            self.on_autonat_finding(finding);
        }
    }

    fn on_autonat_finding(&mut self, finding: Finding<PeerId, Multiaddr>) {
        match finding {
            Finding::Confirmed { addr, wrong } => {
                info!(%addr, "address confirmed by a dial-back");
                self.metrics.nat_event("autonat_probe", "reachable");
                for server in wrong {
                    info!(%server, %addr, "AutoNAT server called a reachable address unreachable");
                    self.reject(server, Rejection::FalseVerdict);
                }
                let before = self.nat.reach.status();
                self.nat.reach.on_probe(true);
                // Announced from the swarm's list (which tells the behaviours, not us).
                self.swarm.add_external_address(addr);
                self.external_addrs_changed_since(before);
            }
            Finding::Refuted { addr } => {
                info!(%addr, "address not reachable from outside");
                self.metrics.nat_event("autonat_probe", "unreachable");
                if self.nat.reach.on_probe(false) {
                    self.reachability_changed();
                }
            }
        }
    }

    /// The swarm's confirmed external addresses changed (AutoNAT, a gateway, a relay).
    pub(super) fn on_external_addrs_changed(&mut self) {
        self.external_addrs_changed_since(self.nat.reach.status());
    }

    /// As [`Self::on_external_addrs_changed`], for a node whose status was `before`.
    fn external_addrs_changed_since(&mut self, before: Reachability) {
        // An address confirmed by a neighbour on the LAN says nothing about the internet.
        let confirmed = self
            .swarm
            .external_addresses()
            .filter(|a| !is_relayed(a) && is_global(a))
            .count();
        self.nat.reach.set_confirmed(confirmed);
        if self.nat.reach.status() != before {
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
    ///
    /// Reservations held are counted per peer: one more for each accepted (not renewed), one
    /// less when one times out. libp2p-relay reports `ReservationClosed` for every connection
    /// of a peer that closes, with or without a reservation, and names no connection; a
    /// reservation lives on one connection, so a peer's count is cut to the connections it
    /// has left (an upper bound: a full relay may announce itself full a little longer).
    pub(super) fn on_relay_server(&mut self, event: relay::Event) {
        let announced = self.announces_relay();
        let (outcome, refused) = match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                if renewed {
                    return;
                }
                *self.nat.served.entry(src_peer_id).or_default() += 1;
                ("reservation_accepted", None)
            }
            relay::Event::ReservationTimedOut { src_peer_id } => {
                self.unserve(src_peer_id, |n| n.saturating_sub(1), announced);
                return;
            }
            relay::Event::ReservationClosed { src_peer_id } => {
                let left = self.since.get(&src_peer_id).map_or(0, |l| l.conns as usize);
                self.unserve(src_peer_id, |n| n.min(left), announced);
                return;
            }
            relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                ("reservation_denied", Some(src_peer_id))
            }
            relay::Event::CircuitReqAccepted { .. } => ("circuit_accepted", None),
            relay::Event::CircuitClosed { error, .. } => (circuit_end(error.as_ref()), None),
            relay::Event::CircuitReqDenied { src_peer_id, .. } => {
                ("circuit_denied", Some(src_peer_id))
            }
            other => {
                debug!(?other, "relay server");
                return;
            }
        };
        self.metrics.nat_event("relay_served", outcome);
        if self.announces_relay() != announced {
            // Full now (or room again): said at once, not at the next announcement.
            self.announce();
        }
        if let Some(peer) = refused {
            debug!(%peer, outcome, "relay server refused a request");
            self.reject(peer, Rejection::RateLimited);
        }
    }

    /// Lowers `peer`'s count of reservations held by `lower`, and announces at once if that
    /// gave the relay room again.
    fn unserve(&mut self, peer: PeerId, lower: impl Fn(usize) -> usize, announced: bool) {
        if let Some(n) = self.nat.served.get_mut(&peer) {
            *n = lower(*n);
            if *n == 0 {
                self.nat.served.remove(&peer);
            }
        }
        if self.announces_relay() != announced {
            self.announce();
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

    /// What the UPnP gateway did, logged and counted. The mapped address itself reaches us as
    /// a confirmed external address (libp2p-upnp confirms it to the swarm), which
    /// `on_external_addrs_changed` turns into reachability; the count tells an operator (and
    /// the tests) that it was the gateway, not AutoNAT, that made the node public.
    pub(super) fn on_upnp(&mut self, event: upnp::Event) {
        let result = match event {
            upnp::Event::NewExternalAddr { external_addr, .. } => {
                info!(%external_addr, "gateway mapped a port");
                "mapped"
            }
            upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                info!(%external_addr, "gateway mapping expired");
                "expired"
            }
            upnp::Event::GatewayNotFound => {
                debug!("no UPnP gateway");
                "no_gateway"
            }
            upnp::Event::NonRoutableGateway => {
                debug!("UPnP gateway is not on the internet");
                "non_routable"
            }
        };
        self.metrics.nat_event("upnp", result);
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

    /// A listener closed (`error`: why, if it failed); a relay's is asked again later. A
    /// relay that refused the reservation we asked for, while announcing room for it, pays.
    pub(super) fn on_listener_closed(
        &mut self,
        listener: ListenerId,
        error: Option<&std::io::Error>,
    ) {
        self.nat.relayed_addrs.retain(|(id, _)| *id != listener);
        if let Some(relay) = self.nat.listeners.remove(&listener) {
            let why = error.map_or_else(|| "closed".to_owned(), |e| e.to_string());
            info!(%relay, "relay reservation ended: {why}");
            self.metrics.nat_event("relay_reservation", "failed");
            let now = now_ms();
            let announced_room = self.membership.get(&relay).is_some_and(|info| info.relay);
            if error.is_some_and(reservation_refused) && announced_room {
                self.metrics.nat_event("relay_reservation", "refused");
                if self.nat.reach.on_false_relay(relay, now, &mut self.rng) {
                    self.reject(relay, Rejection::RelayRefused);
                }
            } else {
                self.nat.reach.on_failed(relay, now, &mut self.rng);
            }
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
        if let ConnectedPoint::Listener { local_addr, .. } = endpoint {
            self.nat.inbound.entry(peer).or_default().push(connection);
            self.nat
                .inbound_local
                .insert(connection, local_addr.clone());
        }
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
        // serves, and pays, as a referral to a peer that is not there does; so does one
        // whose every address is silent (a black hole) while this node's own network works.
        // Any other failure (an unreachable network, our own limits, a timeout while we
        // heard from nobody) proves nothing: the request just failed. An honest relay that
        // went down pays a little per try until its announcement lapses.
        if let Some((relay, asked)) = self.nat.relay_checks.remove(&connection) {
            let now = now_ms();
            if self.nat.reach.asked_at(&relay) == Some(asked) {
                self.metrics.nat_event("relay_reservation", "failed");
                // Silence at every address is a black hole where this node's own network
                // works: it heard from a peer within a ping interval before it asked.
                let ping = self.config.timing.ping_interval.as_millis() as u64;
                let black_hole =
                    silent_there(error) && self.prober.heard_since(asked.saturating_sub(ping));
                if nobody_serves_there(error) || black_hole {
                    info!(%relay, "relay not found at its announced addresses: {error}");
                    if self.nat.reach.on_false_relay(relay, now, &mut self.rng) {
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
        self.nat.inbound_local.remove(&connection);
        if self.nat.relayed_conns.remove(&connection).is_some() {
            self.settle_waiters(peer);
        } else if let Some(n) = self.nat.direct.get_mut(&peer) {
            if let Some(inbound) = self.nat.inbound.get_mut(&peer) {
                inbound.retain(|c| *c != connection);
                if inbound.is_empty() {
                    self.nat.inbound.remove(&peer);
                }
            }
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.nat.direct.remove(&peer);
                if let Some(auto) = self.nat.autonat.as_mut() {
                    auto.probes.server_down(&peer);
                }
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
        self.autonat_tick(now);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_dial_back_counts_only_where_the_tested_address_leads() {
        // Behind a NAT: our side's address is private; transport and port must match.
        let tested = addr("/ip4/203.0.113.7/tcp/4001");
        assert!(dial_back_reached(
            &tested,
            &addr("/ip4/192.168.1.2/tcp/4001")
        ));
        assert!(!dial_back_reached(
            &tested,
            &addr("/ip4/192.168.1.2/udp/4001/quic-v1")
        ));
        assert!(!dial_back_reached(
            &tested,
            &addr("/ip4/192.168.1.2/tcp/4002")
        ));
        // On a public address: the IP must be the tested one (a server cannot confirm a
        // victim's address for us by dialling ours).
        assert!(dial_back_reached(
            &tested,
            &addr("/ip4/203.0.113.7/tcp/4001")
        ));
        assert!(!dial_back_reached(
            &tested,
            &addr("/ip4/198.51.100.9/tcp/4001")
        ));
        let quic = addr("/ip4/203.0.113.7/udp/4001/quic-v1");
        assert!(dial_back_reached(
            &quic,
            &addr("/ip4/0.0.0.0/udp/4001/quic-v1")
        ));
        assert!(!dial_back_reached(
            &quic,
            &addr("/ip4/203.0.113.7/tcp/4001")
        ));
        assert!(!dial_back_reached(&addr("/ip4/203.0.113.7"), &tested));
    }

    #[test]
    fn refusals_are_told_from_other_reservation_failures() {
        use libp2p::relay::outbound::hop::ReserveError;
        // As the swarm hands it over: the relay transport's error inside an io::Error.
        let wrapped = |e: ReserveError| {
            std::io::Error::other(libp2p::relay::client::transport::Error::Reservation(e))
        };
        assert!(reservation_refused(&wrapped(ReserveError::Refused)));
        assert!(reservation_refused(&wrapped(
            ReserveError::ResourceLimitExceeded
        )));
        assert!(reservation_refused(&std::io::Error::other(wrapped(
            ReserveError::Refused
        ))));
        assert!(!reservation_refused(&wrapped(ReserveError::Unsupported)));
        assert!(!reservation_refused(&wrapped(ReserveError::Io(
            std::io::ErrorKind::TimedOut.into()
        ))));
        assert!(!reservation_refused(&std::io::Error::other("closed")));
    }

    #[test]
    fn circuit_ends_are_told_apart() {
        assert_eq!(circuit_end(None), "circuit_closed");
        let timed_out: std::io::Error = std::io::ErrorKind::TimedOut.into();
        assert_eq!(circuit_end(Some(&timed_out)), "circuit_duration_limit");
        let bytes = std::io::Error::other("Max circuit bytes reached.");
        assert_eq!(circuit_end(Some(&bytes)), "circuit_bytes_limit");
        let reset: std::io::Error = std::io::ErrorKind::ConnectionReset.into();
        assert_eq!(circuit_end(Some(&reset)), "circuit_broken");
    }
}
