//! Network configuration.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use mycel_core::statement::Capabilities;

/// Which transports the swarm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP (Noise + Yamux) and QUIC: what real nodes use.
    TcpQuic,
    /// libp2p's in-process memory transport (Noise + Yamux): for many nodes in one process,
    /// where sockets would exhaust the file-descriptor limit.
    Memory,
}

/// How often things happen. Defaults suit a real deployment; tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Interval between a node's own announcements in a small network (jittered by up to a
    /// fifth). Larger networks stretch it: see [`Timing::announce_schedule`].
    pub announce_interval: Duration,
    /// Lifetime of an announcement in a small network; a peer silent for this long is declared
    /// failed. Stretched in proportion to the interval.
    pub announce_ttl: Duration,
    /// Interval added per alive peer once the network outgrows `announce_interval`: every
    /// announcement reaches every node, so with a fixed interval the traffic each node handles
    /// would grow with the network; with this, each node handles about one periodic
    /// announcement per `announce_interval_per_peer` whatever the size. Failures are still
    /// found by pings and told by down reports; expiry is the backstop.
    pub announce_interval_per_peer: Duration,
    /// Interval between pings on each connection.
    pub ping_interval: Duration,
    /// Time a ping may take before it counts as missed.
    pub ping_timeout: Duration,
    /// Interval between Kademlia random walks once the node has peers.
    pub random_walk_interval: Duration,
    /// Longest interval between periodic anti-entropy syncs (the first ones come sooner).
    pub max_sync_interval: Duration,
    /// How often membership expiries are checked.
    pub tick_interval: Duration,
    /// Time a dial may take.
    pub dial_timeout: Duration,
    /// Idle connections are closed after this long.
    pub idle_connection_timeout: Duration,
    /// Gossipsub heartbeat (mesh maintenance and lazy gossip).
    pub gossip_heartbeat: Duration,
    /// A new connection is neither shed above the degree band nor evicted at the cap for
    /// this long: a newcomer needs time to sync and to find other peers through this one.
    pub connection_grace: Duration,
    /// One probe of a peer held alive without a connection (a dial to the addresses it
    /// announced; unanswered, it is failed here) per this long while nothing is wrong. Each
    /// costs both ends a handshake, and one node probing at random finds a given peer only
    /// after about half its table's worth of intervals: what finds failures is the probing
    /// after an alert and of peers named by reports, so the quiet pace stays slow.
    pub probe_interval: Duration,
    /// One probe per this long, for a bounded number of probes, after one of this node's
    /// connections went silent.
    pub probe_alert_interval: Duration,
    /// A peer is not probed again within this.
    pub probe_cooldown: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            announce_interval: Duration::from_secs(30),
            announce_ttl: Duration::from_secs(90),
            announce_interval_per_peer: Duration::from_secs(1),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
            random_walk_interval: Duration::from_secs(60),
            max_sync_interval: Duration::from_secs(60),
            tick_interval: Duration::from_secs(1),
            dial_timeout: Duration::from_secs(5),
            idle_connection_timeout: Duration::from_secs(60),
            gossip_heartbeat: Duration::from_secs(1),
            connection_grace: Duration::from_millis(mycel_core::peering::SHED_GRACE_MS),
            probe_interval: Duration::from_secs(60),
            probe_alert_interval: Duration::from_millis(500),
            probe_cooldown: Duration::from_secs(30),
        }
    }
}

/// Longest interval between periodic announcements, whatever the network's size; lifetimes
/// stay well under the one-hour limit receivers enforce.
const MAX_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// Longest stretched lifetime (receivers refuse statements that live over an hour).
const MAX_ANNOUNCE_TTL: Duration = Duration::from_secs(50 * 60);

impl Timing {
    /// Interval between periodic announcements and their lifetime when `alive_peers` others
    /// are alive: `announce_interval` and `announce_ttl` until the network outgrows them, then
    /// both stretched by the same factor.
    pub fn announce_schedule(&self, alive_peers: usize) -> (Duration, Duration) {
        let base = self.announce_interval.max(Duration::from_millis(1));
        let scaled = self
            .announce_interval_per_peer
            .saturating_mul(u32::try_from(alive_peers).unwrap_or(u32::MAX));
        let interval = base.max(scaled).min(MAX_ANNOUNCE_INTERVAL.max(base));
        let stretch = interval.as_secs_f64() / base.as_secs_f64();
        let ttl = self
            .announce_ttl
            .mul_f64(stretch)
            .min(MAX_ANNOUNCE_TTL.max(self.announce_ttl));
        (interval, ttl)
    }
}

/// Bounds on what peers may make this node do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Established connections in total.
    pub max_connections: u32,
    /// Established connections to one peer: two where both sides dialled at once, and one
    /// for an AutoNAT dial-back (which comes over a new connection by design; with no room
    /// for it, our own limit would refuse it and the server would call us unreachable).
    pub max_connections_per_peer: u32,
    /// Connections being set up, each direction.
    pub max_pending: u32,
    /// Inbound connections one remote IP may have in their handshake at once (loopback is
    /// not limited).
    pub max_pending_per_ip: u32,
    /// Inbound connections one remote IP (an IPv6 /64) may hold, in their handshake or
    /// established (loopback and relayed connections are not limited).
    pub max_inbound_per_ip: u32,
    /// Inbound connections one subnet (an IPv4 /24, an IPv6 /48) may hold.
    pub max_inbound_per_subnet: u32,
    /// Messages a peer may send a second, on average (gossip and sync requests together).
    pub messages_per_sec: f64,
    /// Messages a peer may send in a burst.
    pub message_burst: f64,
    /// Statements (announcements, down reports) one issuer may have applied a second, on
    /// average, whichever neighbours relay them; past it the issuer is charged.
    pub statements_per_issuer_per_sec: f64,
    /// Statements one issuer may have applied in a burst.
    pub statement_burst_per_issuer: f64,
    /// Statements a peer's sync requests may pull a second, on average (a sync answer's
    /// cost is paid by the peer that asked).
    pub sync_statements_per_sec: f64,
    /// Statements a peer may pull at once (a snapshot for a joining node).
    pub sync_statement_burst: f64,
    /// Largest gossip message forwarded by gossipsub.
    pub max_gossip_bytes: usize,
    /// Largest sync request and response.
    pub max_sync_request_bytes: u64,
    /// Largest sync response.
    pub max_sync_response_bytes: u64,
    /// Consecutive missed pings before a connected peer is declared failed.
    pub max_missed_pings: u32,
    /// Peers a node keeps connections to: below this it dials known peers (from their
    /// announcements) so that gossip has a mesh to travel on.
    pub target_peers: usize,
    /// Probes of peers held alive without a connection in flight at once (0: no probes).
    pub max_probes_in_flight: usize,
    /// Holds this machine's own connections (loopback) to the per-host limits and refusals
    /// like any other host's. Off by default: nodes of a local cluster share 127.0.0.1. On
    /// for benchmarks and tests of those limits, where every process shares it.
    pub limit_loopback: bool,
    /// Most peers the membership table lists; a newcomer past it takes the place of the peer
    /// least worth keeping (mycel-core's `membership::Config::max_peers`).
    pub max_members: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 24,
            max_connections_per_peer: 3,
            max_pending: 32,
            max_pending_per_ip: 4,
            max_inbound_per_ip: 8,
            max_inbound_per_subnet: 16,
            messages_per_sec: 200.0,
            message_burst: 2_000.0,
            statements_per_issuer_per_sec: 2.0,
            sync_statements_per_sec: 500.0,
            sync_statement_burst: 4_000.0,
            statement_burst_per_issuer: 20.0,
            max_gossip_bytes: 64 * 1024,
            max_sync_request_bytes: 1 << 20,
            max_sync_response_bytes: 4 << 20,
            max_missed_pings: 2,
            target_peers: 8,
            max_probes_in_flight: 4,
            limit_loopback: false,
            max_members: 10_000,
        }
    }
}

/// When this node serves as a relay for nodes that cannot be dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayServer {
    /// Once an address of this node is confirmed reachable from outside (AutoNAT, a gateway's
    /// port mapping, or an address the operator declared).
    Auto,
    /// Always (an operator who knows the node is reachable).
    On,
    /// Never.
    Off,
}

/// NAT traversal. A node behind a NAT learns so from AutoNAT probes, reserves a slot on
/// public relays and announces the relayed addresses; peers reach it through a relay and
/// then punch a direct connection (DCUtR). Bulk data waits for the direct connection.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// Serve as a relay.
    pub relay_server: RelayServer,
    /// Reservations the relay holds at once.
    pub max_reservations: usize,
    /// Reservations one peer may hold.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the peer must renew it.
    pub reservation_duration: Duration,
    /// Relayed connections at once.
    pub max_circuits: usize,
    /// Relayed connections per peer.
    pub max_circuits_per_peer: usize,
    /// How long one relayed connection may last.
    pub max_circuit_duration: Duration,
    /// Bytes one relayed connection may carry (each direction counted together).
    pub max_circuit_bytes: u64,
    /// Reserve slots on relays when this node cannot be dialled.
    pub relay_client: bool,
    /// Hole punching over relayed connections (DCUtR).
    pub hole_punch: bool,
    /// AutoNAT v2: ask peers to dial us back, and dial back peers that ask.
    pub autonat: bool,
    /// Ask a UPnP gateway on the LAN to map our port (never on loopback-only nodes).
    pub upnp: bool,
    /// Addresses the operator declares reachable from outside: announced, and the node counts
    /// as public.
    pub external_addrs: Vec<Multiaddr>,
    /// Let bulk data (blobs, model files, training updates) use relayed connections. Off by
    /// default: bulk data waits for a direct connection or fails with a clear error.
    pub allow_relayed_data: bool,
    /// How long bulk data waits for a direct connection to a peer reached only by relay.
    pub direct_wait: Duration,
    /// Misbehave, for tests: keep announcing relay service with every reservation taken.
    #[doc(hidden)]
    pub lie_relay_room: bool,
}

impl NetConfig {
    /// Whether this node asks peers to dial it back (and dials back those that ask): not
    /// inside one process, where the memory transport has no NAT to find.
    pub(crate) fn probes_reachability(&self) -> bool {
        self.nat.autonat && self.transport == TransportKind::TcpQuic
    }
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            relay_server: RelayServer::Auto,
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(60 * 60),
            max_circuits: 16,
            max_circuits_per_peer: 4,
            max_circuit_duration: Duration::from_secs(10 * 60),
            max_circuit_bytes: 8 << 20,
            relay_client: true,
            hole_punch: true,
            autonat: true,
            upnp: true,
            external_addrs: Vec::new(),
            allow_relayed_data: false,
            // DCUtR makes 3 attempts about 5 s apart; the wait covers all three.
            direct_wait: Duration::from_secs(20),
            lie_relay_room: false,
        }
    }
}

/// Everything the network needs to start.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The node's identity.
    pub keypair: Keypair,
    /// Transports to use.
    pub transport: TransportKind,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap addresses to dial at start (with or without a `/p2p/` suffix).
    pub bootstrap: Vec<Multiaddr>,
    /// Peers remembered from earlier runs, dialled at start.
    pub known_peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Whether to discover peers on the LAN by mDNS.
    pub mdns: bool,
    /// Whether to record libp2p's own protocol metrics (kad, gossipsub, identify, ping).
    pub libp2p_metrics: bool,
    /// What this node offers at start.
    pub capabilities: Capabilities,
    /// Timing.
    pub timing: Timing,
    /// Limits.
    pub limits: Limits,
    /// Stream protocols accepted from the first connection on, before anything is announced:
    /// a peer that hears of this node must not find them unsupported while the node starts.
    /// [`crate::NetHandle::accept_streams`] hands each out once.
    pub accept: Vec<libp2p::StreamProtocol>,
    /// NAT traversal: relays, hole punching, reachability probes, gateway port mapping.
    pub nat: NatConfig,
    /// Seeds the event loop's random choices (jitter, whom to dial, whom to sync with), so a
    /// run can be replayed. Derived from the identity unless set.
    pub seed: u64,
    /// The operator's word that it runs this node, announced with it
    /// ([`mycel_core::statement::Operator`]).
    pub operator: Option<mycel_core::statement::Operator>,
}

impl NetConfig {
    /// TCP and QUIC on every interface, on `port`.
    pub fn default_listen(port: u16) -> Vec<Multiaddr> {
        vec![
            format!("/ip4/0.0.0.0/tcp/{port}")
                .parse()
                .expect("valid multiaddr"),
            format!("/ip4/0.0.0.0/udp/{port}/quic-v1")
                .parse()
                .expect("valid multiaddr"),
        ]
    }

    /// A configuration with defaults for everything but the identity.
    pub fn new(keypair: Keypair) -> Self {
        let identity = blake3::hash(&keypair.public().encode_protobuf());
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&identity.as_bytes()[..8]);
        Self {
            keypair,
            transport: TransportKind::TcpQuic,
            listen: Self::default_listen(4001),
            bootstrap: Vec::new(),
            known_peers: Vec::new(),
            mdns: true,
            libp2p_metrics: true,
            capabilities: Capabilities::default(),
            timing: Timing::default(),
            limits: Limits::default(),
            accept: Vec::new(),
            nat: NatConfig::default(),
            seed: u64::from_le_bytes(seed),
            operator: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_stretch_with_the_network() {
        let timing = Timing::default();
        let small = timing.announce_schedule(10);
        assert_eq!(small, (timing.announce_interval, timing.announce_ttl));

        // 200 peers at 1 s each: 200 s, the lifetime stretched by the same factor.
        let (interval, ttl) = timing.announce_schedule(200);
        assert_eq!(interval, Duration::from_secs(200));
        assert_eq!(ttl, Duration::from_secs(600));

        // Huge networks stop stretching before lifetimes reach the receivers' one-hour limit.
        let (interval, ttl) = timing.announce_schedule(1_000_000);
        assert_eq!(interval, MAX_ANNOUNCE_INTERVAL);
        assert!(ttl <= MAX_ANNOUNCE_TTL && ttl > interval);
    }
}
