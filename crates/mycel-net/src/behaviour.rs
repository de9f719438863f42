//! The composed libp2p behaviour and the swarm built around it.

use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns,
    memory_connection_limits, noise, ping, relay, request_response, tcp, upnp, StreamProtocol,
    Swarm, SwarmBuilder, Transport,
};
use prometheus_client::registry::Registry;
use rand_autonat::SeedableRng as _;

use crate::config::{NetConfig, RelayServer, TransportKind};
use crate::metrics::NetMetrics;
use crate::protocol::{
    SyncCodec, IDENTIFY_PROTOCOL, KAD_PROTOCOL, STATEMENTS_TOPIC, SYNC_PROTOCOL,
};

type BoxError = Box<dyn Error + Send + Sync>;

/// Limit and deny behaviours come first: the derive polls fields in declaration order.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) connections: crate::cap::Behaviour,
    pub(crate) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) memory: memory_connection_limits::Behaviour,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) relay: Toggle<relay::Behaviour>,
    pub(crate) dcutr: Toggle<dcutr::Behaviour>,
    pub(crate) autonat_server: Toggle<autonat::v2::server::Behaviour<rand_autonat::rngs::StdRng>>,
    pub(crate) upnp: Toggle<upnp::tokio::Behaviour>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) sync: request_response::Behaviour<SyncCodec>,
    pub(crate) accept: crate::accept::Behaviour,
    pub(crate) streams: libp2p_stream::Behaviour,
    pub(crate) kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
}

impl Behaviour {
    fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        config: &NetConfig,
        metrics: &NetMetrics,
    ) -> Result<Self, BoxError> {
        let peer_id = key.public().to_peer_id();
        let limits = &config.limits;
        let timing = &config.timing;

        let connection_limits = connection_limits::ConnectionLimits::default()
            // Beyond the cap, a few connections only long enough for a goodbye (see cap.rs);
            // room above that for the dials that keep the node's own choices
            // (`DegreeConfig::min_outbound`) whoever fills the inbound slots.
            .with_max_established_incoming(Some(
                limits.max_connections + crate::cap::REFERRAL_SLOTS as u32,
            ))
            .with_max_established(Some(
                limits.max_connections
                    + crate::cap::REFERRAL_SLOTS as u32
                    + mycel_core::peering::DegreeConfig::for_target(limits.target_peers)
                        .min_outbound as u32,
            ))
            .with_max_established_per_peer(Some(limits.max_connections_per_peer))
            .with_max_pending_incoming(Some(limits.max_pending))
            .with_max_pending_outgoing(Some(limits.max_pending));

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(format!("mycel/{}", env!("CARGO_PKG_VERSION")))
                .with_interval(Duration::from_secs(300))
                .with_push_listen_addr_updates(true)
                .with_cache_size(0),
        );

        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(timing.ping_interval)
                .with_timeout(timing.ping_timeout),
        );

        // Statements carry their own ed25519 signatures (checked in mycel-core), so gossipsub's
        // per-message signing would only verify the same thing twice. Message ids are content
        // hashes: the same statement relayed by several peers is delivered once.
        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            .validate_messages()
            .message_id_fn(|m: &gossipsub::Message| {
                gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
            })
            .max_transmit_size(limits.max_gossip_bytes)
            .heartbeat_interval(timing.gossip_heartbeat)
            .heartbeat_initial_delay(Duration::from_millis(100))
            .mesh_n(6)
            .mesh_n_low(4)
            .mesh_n_high(12)
            .mesh_outbound_min(2)
            .history_length(5)
            .history_gossip(3)
            // A message to forward may wait as long as one to publish (libp2p's default for
            // forwarding is 1 s). Announcements stay news for minutes, and on a busy host the
            // queues run longer than a second: with 1 s, 200 nodes joining at once dropped
            // 14-20 thousand forwards, and what gossip dropped only syncs carried on.
            .forward_queue_duration(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("gossipsub config: {e}"))?;
        let mut gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_config)?;
        // Many peers on one host would otherwise score each other below the graylist
        // threshold (P6 IP colocation: weight -5, threshold 10, so with 50 peers on 127.0.0.1
        // each scores -5*(50-10)^2 = -8000, far below the graylist's -80).
        let mut score = gossipsub::PeerScoreParams::default();
        score.ip_colocation_factor_whitelist.extend([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
        // Our reputation bans at -100; at half weight gossipsub stops gossiping to a peer at
        // -20 and would graylist it only at -160, so our ban (and its counting) comes first.
        score.app_specific_weight = 0.5;
        gossipsub.with_peer_score(score, gossipsub::PeerScoreThresholds::default())?;
        gossipsub.subscribe(&gossipsub::IdentTopic::new(STATEMENTS_TOPIC))?;

        let sync = request_response::Behaviour::with_codec(
            SyncCodec::new(
                limits.max_sync_request_bytes,
                limits.max_sync_response_bytes,
            ),
            [(
                StreamProtocol::new(SYNC_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(10))
                .with_max_concurrent_streams(64),
        );

        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        // Our own random walks replace kad's periodic bootstrap.
        kad_config.set_periodic_bootstrap_interval(None);
        kad_config.set_query_timeout(Duration::from_secs(10));
        kad_config.set_parallelism(NonZeroUsize::new(3).expect("nonzero"));
        // Lookups aim for the 8 closest peers instead of 20: each random walk or bootstrap
        // dials fewer peers, which keeps joins of dense local networks from turning into a
        // storm of lookups and connections (measured: 200 nodes in one process did not
        // quiesce within 90 s with the defaults).
        kad_config.set_replication_factor(NonZeroUsize::new(8).expect("nonzero"));
        // Kademlia would insert every peer we connect to and bootstrap after each insertion
        // while its table is small; the event loop seeds the table itself, in one batch.
        kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // Auto mode stays a client until an external address is confirmed, which never happens
        // on loopback or without autonat; Mycel nodes are meant to be reachable, so serve.
        kad.set_mode(Some(kad::Mode::Server));

        let mdns = if config.mdns {
            let mdns_config = mdns::Config {
                query_interval: Duration::from_secs(5),
                ..Default::default()
            };
            Some(mdns::tokio::Behaviour::new(mdns_config, peer_id)?)
        } else {
            None
        };

        let nat = &config.nat;
        let relay = (nat.relay_server != RelayServer::Off).then(|| {
            relay::Behaviour::new(
                peer_id,
                relay::Config {
                    max_reservations: nat.max_reservations,
                    max_reservations_per_peer: nat.max_reservations_per_peer,
                    reservation_duration: nat.reservation_duration,
                    max_circuits: nat.max_circuits,
                    max_circuits_per_peer: nat.max_circuits_per_peer,
                    max_circuit_duration: nat.max_circuit_duration,
                    max_circuit_bytes: nat.max_circuit_bytes,
                    ..Default::default()
                },
            )
        });
        // libp2p's AutoNAT v2 server dials back the peers that ask; our own client asks
        // (autonat.rs: libp2p's keeps one server's "unreachable" for good).
        let autonat_server = config.probes_reachability().then(|| {
            autonat::v2::server::Behaviour::new(rand_autonat::rngs::StdRng::seed_from_u64(
                config.seed ^ 0x7365_7276,
            ))
        });
        // SSDP goes to the LAN's multicast group: never from a node that only listens on
        // loopback (tests, a node kept to one machine).
        let upnp = (nat.upnp
            && config.transport == TransportKind::TcpQuic
            && !config.listen.iter().all(crate::event_loop::is_loopback))
        .then(upnp::tokio::Behaviour::default);

        Ok(Self {
            relay_client,
            relay: relay.into(),
            dcutr: nat
                .hole_punch
                .then(|| dcutr::Behaviour::new(peer_id))
                .into(),
            autonat_server: autonat_server.into(),
            upnp: upnp.into(),
            connections: crate::cap::Behaviour::new(
                limits.max_connections,
                mycel_core::inbound::SharesConfig {
                    pending_per_host: limits.max_pending_per_ip as usize,
                    per_host: limits.max_inbound_per_ip as usize,
                    per_subnet: limits.max_inbound_per_subnet as usize,
                },
                metrics.connections_refused.clone(),
                limits.limit_loopback,
            ),
            blocked: Default::default(),
            limits: connection_limits::Behaviour::new(connection_limits),
            memory: memory_connection_limits::Behaviour::with_max_percentage(0.9),
            identify,
            ping,
            gossipsub,
            sync,
            accept: crate::accept::Behaviour::new(metrics.streams_dropped.clone()),
            streams: libp2p_stream::Behaviour::new(),
            kad: Some(kad).into(),
            mdns: mdns.into(),
        })
    }
}

/// Builds the swarm with the configured transports.
pub(crate) fn build_swarm(
    config: &NetConfig,
    registry: &mut Registry,
    metrics: &NetMetrics,
) -> Result<Swarm<Behaviour>, BoxError> {
    let idle = config.timing.idle_connection_timeout;
    let dial_timeout = config.timing.dial_timeout;
    let keypair = config.keypair.clone();
    let swarm = match config.transport {
        TransportKind::TcpQuic => SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                // TLS first (AES-GCM: the cipher bounds one connection's throughput), Noise
                // for peers that only speak Noise.
                (crate::tls::Config::new, noise::Config::new),
                crate::mux::Config::default,
            )?
            .with_quic()
            .with_relay_client(
                (crate::tls::Config::new, noise::Config::new),
                crate::mux::Config::default,
            )?
            .with_bandwidth_metrics(registry)
            .with_behaviour(|key, relay| Behaviour::new(key, relay, config, metrics))?
            .with_swarm_config(|c| {
                // One address at a time: concurrent dials of a peer's TCP and QUIC addresses
                // both succeed on loopback and leave duplicate connections to tear down.
                c.with_idle_connection_timeout(idle)
                    .with_dial_concurrency_factor(NonZeroU8::new(1).expect("nonzero"))
            })
            .with_connection_timeout(dial_timeout)
            .build(),
        TransportKind::Memory => SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_other_transport(|key| -> Result<_, BoxError> {
                Ok(MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(crate::mux::Config::default()))
            })?
            .with_relay_client(noise::Config::new, crate::mux::Config::default)?
            .with_bandwidth_metrics(registry)
            .with_behaviour(|key, relay| Behaviour::new(key, relay, config, metrics))?
            .with_swarm_config(|c| {
                // One address at a time: concurrent dials of a peer's TCP and QUIC addresses
                // both succeed on loopback and leave duplicate connections to tear down.
                c.with_idle_connection_timeout(idle)
                    .with_dial_concurrency_factor(NonZeroU8::new(1).expect("nonzero"))
            })
            .with_connection_timeout(dial_timeout)
            .build(),
    };
    Ok(swarm)
}
