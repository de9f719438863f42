//! The task that owns the swarm: turns swarm events into membership inputs and membership
//! decisions into network actions.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::memory::MemoryTransportError;
use libp2p::core::transport::TransportError;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{gossipsub, identify, kad, mdns, ping, Multiaddr, PeerId, StreamProtocol, Swarm};
use mycel_core::antientropy::{SyncKind, SyncSchedule};
use mycel_core::id::ContentId;
use mycel_core::membership::{
    self, Accepted, Change, Culprit, FailReason, Membership, PeerInfo, Refusal,
};
use mycel_core::peering::{
    self, BackoffConfig, Connected, Degree, DegreeConfig, Held, Referrals, Revival,
};
use mycel_core::probe::{Outcome, ProbeConfig, Prober, Vantage, Verdict};
use mycel_core::ratelimit::RateLimiter;
use mycel_core::reach::Reachability;
use mycel_core::reputation::{self, Reputation};
use mycel_core::statement::{
    Announcement, Capabilities, Contact, SignedStatement, Statement, MAX_ADDR_LEN,
    MAX_ANNOUNCED_ADDRS,
};
use mycel_core::wire::Rejection;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

mod nat;

use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::config::NetConfig;
use crate::handle::{now_ms, Command, NetError, NetEvent, NetStatus};
use crate::metrics::{NetMetrics, GOSSIP, IN, OUT, SYNC};
use crate::protocol::{
    self, DigestEntry, SyncRequest, SyncResponse, KAD_PROTOCOL, MAX_DIGEST_ENTRIES, MAX_ECHO_BYTES,
    MAX_REFERRALS, MAX_SYNC_STATEMENTS, STATEMENTS_TOPIC,
};

/// Providers that answer a lookup before its query has ended.
const ENOUGH_PROVIDERS: usize = 4;

/// Addresses remembered per peer.
const MAX_ADDRS_PER_PEER: usize = 8;
/// The reputation reported for a peer isolated for lying: far below any threshold.
const ISOLATED_SCORE: f64 = -1_000.0;
/// The block a word of contact names for a peer connected through a relay.
const RELAYED_BLOCK: [u8; 1] = [0];
/// Least time between two dials of a LAN peer found by mDNS.
const LAN_DIAL_COOLDOWN: Duration = Duration::from_secs(3);
/// Most LAN peers remembered.
const MAX_LAN_PEERS: usize = 256;
/// How often degree upkeep runs while the node is short of its degree.
const SHORT_UPKEEP: Duration = Duration::from_millis(250);
/// How long a peer that said goodbye is not dialled again to keep our degree up.
const GOODBYE_HOLD: Duration = Duration::from_secs(60);
/// Peers remembered as sent away at most (a flood of fresh keys cannot grow the table).
const MAX_SENT_AWAY: usize = 4096;
/// How long a goodbye may take before the connection is closed anyway.
const PARTING_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection closed this soon after its peer said goodbye is no reason to probe it.
const PARTED_MEMORY: Duration = Duration::from_secs(10);
/// How long a dial of ours may stay unresolved before it no longer counts as in flight (a dial
/// into a blackhole hangs until `Timing::dial_timeout`; it must not stop the node dialling others).
const DIAL_IN_FLIGHT: Duration = Duration::from_secs(5);
/// Least time between two probes of the same peer.
const PROBE_COOLDOWN: Duration = Duration::from_secs(10);
/// Referrals remembered until a dial settles them, and for how long.
const MAX_PENDING_REFERRALS: usize = 1_024;
const REFERRAL_TTL: Duration = Duration::from_secs(300);
/// Most peers asked for their word that this node is connected to them per tick.
const CONTACTS_PER_TICK: usize = 16;

/// First interval between periodic syncs; doubles up to `Timing::max_sync_interval` (see
/// [`SyncSchedule`]).
const FIRST_SYNC_INTERVAL: Duration = Duration::from_millis(500);

enum Pending {
    Echo(oneshot::Sender<Result<Vec<u8>, NetError>>),
    /// A test's sync request: the statements it got, or why not.
    SyncRaw(oneshot::Sender<Result<usize, NetError>>),
    Sync,
    Summary,
    Goodbye,
    Contact,
}

/// What degree upkeep dials: a configured bootstrap address, or a peer by id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Addr(Multiaddr),
    Peer(PeerId),
}

/// A connected peer's first connection.
#[derive(Debug, Clone, Copy)]
struct Link {
    since: u64,
    /// The peer dialled us.
    inbound: bool,
    /// The IP at the other end of its first connection (`None`: relayed): when it dialled
    /// us, the host that pays if it is banned.
    ip: Option<std::net::IpAddr>,
    /// Connections open to it now.
    conns: u32,
}

impl Link {
    /// The subnet it connected from (`None`: this machine, or relayed).
    fn subnet(&self) -> Option<std::net::IpAddr> {
        self.ip
            .filter(|ip| !ip.is_loopback())
            .map(mycel_core::inbound::subnet_of)
    }
}

/// Who opened a connection that arrives beyond the cap, which decides who makes room.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arrival {
    /// A peer dialled us.
    Inbound,
    /// Degree upkeep dialled it (to keep the node's degree and its own choices).
    Upkeep(Target),
    /// Another dial of ours (a Kademlia lookup, a stream opened by peer id).
    Other,
}

/// The workers' table the router reads without asking the event loop (`NetHandle::workers_now`).
pub(crate) type Workers = std::sync::Arc<Vec<PeerInfo>>;

/// How stale the workers' table may get while events come (it is also rebuilt before every
/// command whose answer shows peers).
const WORKERS_EVERY: Duration = Duration::from_millis(50);

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    config: NetConfig,
    seq_source: Box<dyn FnMut(u64) -> u64 + Send>,
    own_seq: u64,
    capabilities: Capabilities,
    /// When we last announced and the lifetime that announcement was given.
    last_announce: tokio::time::Instant,
    last_ttl: Duration,
    /// The periodic interval for the network's current size, and this round's jitter factor.
    announce_interval: Duration,
    announce_jitter: f64,
    /// Load or power changed significantly since the last announcement.
    capabilities_changed: bool,
    /// Whether the last announcement said this node was at its connection cap.
    announced_full: bool,
    /// Our latest announcement could not be published (no subscribed peer yet).
    announce_pending: Option<Vec<u8>>,
    membership: Membership,
    reputation: Reputation,
    rate: RateLimiter<PeerId>,
    /// Gossip each neighbour relays (dropped past it, charged to nobody).
    relayed: RateLimiter<PeerId>,
    /// Statements each peer's sync requests pulled (answers are cut to what is left).
    served: RateLimiter<PeerId>,
    metrics: NetMetrics,
    libp2p_metrics: Option<libp2p::metrics::Metrics>,
    listen_addrs: Vec<Multiaddr>,
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    probing: HashSet<PeerId>,
    /// When each peer was last dialled by a probe or from the LAN list.
    last_dial: HashMap<PeerId, u64>,
    /// Degree upkeep with back-off per target (bootstrap addresses, peers).
    degree: Degree<Target>,
    /// Re-dialling peers last seen failed (a healed partition), one at a time.
    revival: Revival<PeerId>,
    /// Peers met through goodbyes' referrals, with who referred them.
    referrals: Referrals<PeerId>,
    /// Upkeep dials in flight, and when each started.
    dialing: HashMap<ConnectionId, (Target, u64)>,
    /// Each connected peer's first connection: when, which way, from which subnet.
    since: HashMap<PeerId, Link>,
    /// Inbound connections counted in `mycel_connections_inbound` (not those let in past
    /// their address's share only to hear a goodbye).
    counted_inbound: HashSet<ConnectionId>,
    /// Peers we said goodbye to, and when the connection is closed at the latest.
    parting: HashMap<PeerId, u64>,
    /// Peers that said goodbye to us, and when.
    parted: HashMap<PeerId, u64>,
    /// Peers we sent away, and when: one that comes back within [`GOODBYE_HOLD`] (a probe
    /// of its, a lookup) finds no room made for it at the others' expense. Older entries are
    /// pruned when the table is full.
    sent_away: HashMap<PeerId, u64>,
    rng: StdRng,
    pending: HashMap<OutboundRequestId, Pending>,
    /// When, and with whom, to sync (one sync in flight at a time, another beside it only
    /// once those in flight have stalled), on the clock of `sync_clock`.
    syncs: SyncSchedule<PeerId>,
    /// The origin of the sync schedule's clock: monotonic, so that a step of the wall clock
    /// cannot make every sync look stalled, or none.
    sync_clock: tokio::time::Instant,
    /// Peers found on the LAN by mDNS (with an address), redialled while unconnected.
    lan_peers: HashMap<PeerId, Multiaddr>,
    /// Whether the Kademlia routing table has been seeded (see `random_walk`).
    kad_seeded: bool,
    topic: gossipsub::IdentTopic,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    /// Where the workers' table is published, and when it last was.
    workers: tokio::sync::watch::Sender<Workers>,
    workers_built: tokio::time::Instant,
    connections: usize,
    connections_opened: u64,
    dial_failures: u64,
    /// Content ids this node announces as a DHT provider of.
    providing: HashSet<kad::RecordKey>,
    /// Provider lookups in flight: who asked, and the providers found so far.
    provider_queries: HashMap<kad::QueryId, (oneshot::Sender<Vec<PeerId>>, HashSet<PeerId>)>,
    /// Reachability, relay reservations, direct connections.
    nat: nat::Nat,
    /// Dial-backs and servers' answers of our AutoNAT probes, from their tasks.
    autonat_inputs: mpsc::Receiver<nat::AutoNatInput>,
    /// Probes of peers held alive without a connection (mycel-core's `probe`).
    prober: Prober<PeerId>,
    /// Their dials in flight.
    probe_dials: HashMap<ConnectionId, PeerId>,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        config: NetConfig,
        seq_source: Box<dyn FnMut(u64) -> u64 + Send>,
        first_seq: u64,
        metrics: NetMetrics,
        libp2p_metrics: Option<libp2p::metrics::Metrics>,
        listen_addrs: Vec<Multiaddr>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<NetEvent>,
        dial_backs: Option<crate::task::IncomingStreams>,
    ) -> Self {
        let local = *swarm.local_peer_id();
        let timing = &config.timing;
        let membership_config = membership::Config {
            max_missed_pings: config.limits.max_missed_pings,
            // A frozen peer: failed once it has answered no ping for the misses allowed.
            silence_limit_ms: (timing.ping_interval * config.limits.max_missed_pings
                + timing.ping_timeout)
                .as_millis() as u64,
            issuer_rate_per_s: config.limits.statements_per_issuer_per_sec,
            issuer_burst: config.limits.statement_burst_per_issuer,
            max_peers: config.limits.max_members,
            ..Default::default()
        };
        let relayed = RateLimiter::new(
            config.limits.messages_per_sec,
            config.limits.message_burst,
            4096,
        );
        let rate = RateLimiter::new(
            config.limits.messages_per_sec,
            config.limits.message_burst,
            4096,
        );
        let (autonat_tx, autonat_inputs) = mpsc::channel(64);
        let nat = nat::Nat::new(
            now_ms(),
            !config.nat.external_addrs.is_empty(),
            dial_backs.map(|incoming| nat::AutoNat {
                probes: mycel_core::autonat::Probes::new(Default::default()),
                control: swarm.behaviour().streams.new_control(),
                inputs: autonat_tx,
                dial_backs: Some(incoming),
                sent: HashMap::new(),
            }),
        );
        let prober = Prober::new(ProbeConfig {
            quiet_interval_ms: timing.probe_interval.as_millis() as u64,
            alert_interval_ms: timing.probe_alert_interval.as_millis() as u64,
            cooldown_ms: timing.probe_cooldown.as_millis() as u64,
            max_in_flight: config.limits.max_probes_in_flight,
            // Two addresses' dial timeouts, and slack: only lost events reach it.
            deadline_ms: 3 * timing.dial_timeout.as_millis() as u64,
            // Probes are settled between ticks: a gap of three ticks is this node stalling.
            stall_ms: (3 * timing.tick_interval.as_millis() as u64).max(2_000),
            ..Default::default()
        });
        Self {
            nat,
            autonat_inputs,
            prober,
            probe_dials: HashMap::new(),
            capabilities: config.capabilities.clone(),
            last_announce: tokio::time::Instant::now(),
            last_ttl: config.timing.announce_ttl,
            announce_interval: config.timing.announce_interval,
            announce_jitter: 1.0,
            capabilities_changed: false,
            announced_full: false,
            swarm,
            seq_source,
            own_seq: first_seq,
            announce_pending: None,
            membership: Membership::new(local, membership_config),
            reputation: Reputation::new(reputation::Config::default()),
            rate,
            relayed,
            served: RateLimiter::new(
                config.limits.sync_statements_per_sec,
                config.limits.sync_statement_burst,
                4096,
            ),
            metrics,
            libp2p_metrics,
            listen_addrs,
            addresses: HashMap::new(),
            probing: HashSet::new(),
            last_dial: HashMap::new(),
            degree: Degree::new(
                DegreeConfig {
                    grace_ms: config.timing.connection_grace.as_millis() as u64,
                    ..DegreeConfig::for_target(config.limits.target_peers)
                },
                BackoffConfig::default(),
            ),
            revival: Revival::new(Revival::<PeerId>::default_backoff()),
            referrals: Referrals::new(MAX_PENDING_REFERRALS, REFERRAL_TTL.as_millis() as u64),
            dialing: HashMap::new(),
            since: HashMap::new(),
            counted_inbound: HashSet::new(),
            parting: HashMap::new(),
            parted: HashMap::new(),
            sent_away: HashMap::new(),
            // Decisions take this generator, never a thread-local one: runs can be replayed.
            rng: StdRng::seed_from_u64(config.seed),
            pending: HashMap::new(),
            sync_clock: tokio::time::Instant::now(),
            syncs: SyncSchedule::new(
                FIRST_SYNC_INTERVAL.as_millis() as u64,
                config.timing.max_sync_interval.as_millis() as u64,
            ),
            lan_peers: HashMap::new(),
            kad_seeded: false,
            topic: gossipsub::IdentTopic::new(STATEMENTS_TOPIC),
            commands,
            events,
            connections: 0,
            connections_opened: 0,
            dial_failures: 0,
            providing: HashSet::new(),
            provider_queries: HashMap::new(),
            workers: tokio::sync::watch::channel(std::sync::Arc::new(Vec::new())).0,
            workers_built: tokio::time::Instant::now(),
            config,
        }
    }

    /// Publishes the workers' table ([`EventLoop::workers_list`]) to `to` from now on.
    pub(crate) fn publish_workers_to(&mut self, to: tokio::sync::watch::Sender<Workers>) {
        self.workers = to;
        self.publish_workers();
    }

    /// Everything known about the alive peers that announce a model or the operator that runs
    /// them (see `NetHandle::workers_now`).
    fn workers_list(&self) -> Vec<PeerInfo> {
        self.membership
            .peers()
            .filter(|(_, info)| {
                info.state == membership::PeerState::Alive
                    && (info.operator.is_some()
                        || info
                            .capabilities
                            .as_ref()
                            .is_some_and(|c| !c.models.is_empty()))
            })
            .map(|(peer, info)| self.view_of(peer, info))
            .collect()
    }

    fn publish_workers(&mut self) {
        let workers = std::sync::Arc::new(self.workers_list());
        self.workers.send_replace(workers);
        self.workers_built = tokio::time::Instant::now();
    }

    pub(crate) async fn run(mut self, early_events: Vec<SwarmEvent<BehaviourEvent>>) {
        for event in early_events {
            self.on_swarm_event(event);
        }
        for addr in self.config.nat.external_addrs.clone() {
            self.swarm.add_external_address(addr);
        }
        self.apply_relay_status();
        self.serve_dial_backs();
        self.dial_initial_peers();
        self.announce();

        let timing = self.config.timing.clone();
        let mut tick = tokio::time::interval(timing.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While short of its degree a node looks again every 250 ms, not once a tick: nodes
        // started together find their bootstrap peers not listening yet, and their first
        // retries (back-off from 250 ms) should not wait for the next whole tick.
        let mut short_tick = tokio::time::interval(SHORT_UPKEEP.min(timing.tick_interval));
        short_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let announce_sleep = tokio::time::sleep_until(self.next_announce());
        tokio::pin!(announce_sleep);
        // Kademlia bootstraps by itself once its table is seeded (from identify and from
        // announcements); our random walks keep it fresh afterwards.
        let walk_sleep = tokio::time::sleep(jittered(timing.random_walk_interval, &mut self.rng));
        tokio::pin!(walk_sleep);
        let sync_sleep = tokio::time::sleep(FIRST_SYNC_INTERVAL);
        tokio::pin!(sync_sleep);

        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(command) => {
                        // Whatever a caller reads of the peers in an answer is in the table
                        // the router reads by the time the answer arrives. (Only then: other
                        // commands, some of them one per bad message a peer sends, do not
                        // each pay for a copy of the table.)
                        if command.shows_peers() {
                            self.publish_workers();
                        }
                        self.on_command(command);
                    }
                },
                _ = tick.tick() => self.on_tick(),
                Some(input) = self.autonat_inputs.recv() => self.on_autonat_input(input),
                _ = short_tick.tick() => {
                    if self.swarm.connected_peers().count() < self.config.limits.target_peers {
                        self.maintain_degree();
                    }
                }
                _ = &mut announce_sleep => self.announce(),
                _ = &mut walk_sleep => {
                    self.random_walk();
                    walk_sleep.as_mut().reset(
                        tokio::time::Instant::now() + jittered(timing.random_walk_interval, &mut self.rng));
                }
                _ = &mut sync_sleep => {
                    let started = self.periodic_sync();
                    let wait = Duration::from_millis(self.syncs.next_wait_ms(started));
                    sync_sleep.as_mut().reset(
                        tokio::time::Instant::now() + jittered(wait, &mut self.rng));
                }
            }
            // A sync deferred (another in flight) brings the next one forward.
            if let Some(wait) = self.syncs.take_soon() {
                let soon = tokio::time::Instant::now()
                    + jittered(Duration::from_millis(wait), &mut self.rng);
                if sync_sleep.deadline() > soon {
                    sync_sleep.as_mut().reset(soon);
                }
            }
            if self.workers_built.elapsed() >= WORKERS_EVERY {
                self.publish_workers();
            }
            // Announcing (periodically, on a command, to refute), a change of load and the
            // network's growth move the next announcement.
            let next_announce = self.next_announce();
            if announce_sleep.deadline() != next_announce {
                announce_sleep.as_mut().reset(next_announce);
            }
        }
        debug!(peer = %self.swarm.local_peer_id(), "network task stopped");
    }

    /// Dials every bootstrap address and remembered peer once at start; degree upkeep
    /// retries them with back-off until the node has its target degree.
    fn dial_initial_peers(&mut self) {
        let local = *self.swarm.local_peer_id();
        for (peer, addrs) in self.config.known_peers.clone() {
            if peer != local && !addrs.is_empty() {
                self.remember_addrs(peer, addrs);
            }
        }
        // A bootstrap address that names its peer is dialled as that peer (all its addresses
        // in one dial, not one connection per address).
        for addr in self.config.bootstrap.clone() {
            let mut bare = addr.clone();
            if let Some(Protocol::P2p(peer)) = bare.pop() {
                if peer != local {
                    self.remember_addrs(peer, vec![bare]);
                }
            }
        }
        let now = now_ms();
        let mut targets = self.bootstrap_targets();
        for peer in self.peer_book() {
            if !targets.contains(&Target::Peer(peer)) {
                targets.push(Target::Peer(peer));
            }
        }
        for target in targets {
            self.degree
                .backoff_mut()
                .tried(target.clone(), now, &mut self.rng);
            self.dial_target(target, now);
        }
    }

    /// The configured bootstrap list, other than ourselves: the peers it names, and the
    /// addresses that name none.
    fn bootstrap_targets(&self) -> Vec<Target> {
        let local = *self.swarm.local_peer_id();
        let mut targets = Vec::new();
        for addr in &self.config.bootstrap {
            let target = match addr.iter().last() {
                Some(Protocol::P2p(peer)) if peer == local => continue,
                Some(Protocol::P2p(peer)) => Target::Peer(peer),
                _ => Target::Addr(addr.clone()),
            };
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        targets
    }

    /// Peers remembered from earlier runs.
    fn peer_book(&self) -> impl Iterator<Item = PeerId> + '_ {
        let local = *self.swarm.local_peer_id();
        self.config
            .known_peers
            .iter()
            .filter(move |(peer, addrs)| *peer != local && !addrs.is_empty())
            .map(|(peer, _)| *peer)
    }

    /// Dials a degree-upkeep target and counts it in flight.
    fn dial_target(&mut self, target: Target, now: u64) {
        let opts = match &target {
            Target::Addr(addr) => DialOpts::unknown_peer_id().address(addr.clone()).build(),
            Target::Peer(peer) => {
                let addrs = self.dial_addrs(peer);
                if addrs.is_empty() {
                    return;
                }
                DialOpts::peer_id(*peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build()
            }
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dialing.insert(id, (target, now));
            }
            Err(e) => debug!(?target, "not dialled: {e}"),
        }
    }

    // ---- own statements ------------------------------------------------------------------

    /// Republishes, unchanged, the announcement that could not be published yet (no peer had
    /// subscribed to the topic).
    fn retry_pending_announcement(&mut self) {
        if let Some(bytes) = self.announce_pending.take() {
            self.publish_own(bytes);
        }
    }

    /// Signs and publishes a new announcement with the next sequence number, and schedules
    /// the next periodic one (the interval and lifetime stretch with the network).
    fn announce(&mut self) {
        let now = now_ms();
        let (alive, _, _) = self.membership.counts();
        let (interval, ttl) = self.config.timing.announce_schedule(alive);
        self.announce_interval = interval;
        self.announce_jitter = self.rng.gen_range(0.8..=1.2);
        self.last_announce = tokio::time::Instant::now();
        self.last_ttl = ttl;
        self.capabilities_changed = false;
        self.own_seq = (self.seq_source)(now).max(self.own_seq + 1);
        let full = self.at_cap();
        let statement = Statement::Announce(Announcement {
            seq: self.own_seq,
            issued_at: now,
            expires_at: now + ttl.as_millis() as u64,
            capabilities: self.capabilities.clone(),
            addrs: self
                .announced_addrs()
                .iter()
                .map(|a| a.to_string())
                .filter(|a| a.len() <= MAX_ADDR_LEN)
                .take(MAX_ANNOUNCED_ADDRS)
                .collect(),
            reachability: self.nat.reach.status(),
            relay: self.announces_relay(),
            operator: self.config.operator.clone(),
            full,
        });
        self.announced_full = full;
        let signed = SignedStatement::sign(&self.config.keypair, &statement);
        self.membership.set_own(self.own_seq, signed.clone());
        self.publish_own(signed.to_bytes());
    }

    /// Takes freshly read capabilities. New models or hardware are announced at once; a
    /// significant change of load or power at most once per half interval (every node on a
    /// busy host would otherwise re-announce together); small moves ride along with the next
    /// periodic announcement.
    fn refresh_capabilities(&mut self, capabilities: Capabilities) {
        let urgent = capabilities.models != self.capabilities.models
            || capabilities.hardware != self.capabilities.hardware;
        let significant = capabilities.differs_significantly(&self.capabilities);
        if !urgent && !significant {
            // Keep what was announced, so that small moves cannot add up unannounced.
            return;
        }
        self.capabilities = capabilities;
        if urgent {
            self.announce();
        } else {
            self.capabilities_changed = true;
        }
    }

    /// When the next announcement is due: one interval (for the network's current size,
    /// jittered) after the last, but before the last one's lifetime would run out (a node's
    /// first announcement is made before it knows how large the network is), and half an
    /// interval after the last when load or power changed significantly.
    fn next_announce(&self) -> tokio::time::Instant {
        let timing = &self.config.timing;
        let lifetime_per_interval =
            timing.announce_ttl.as_secs_f64() / timing.announce_interval.as_secs_f64().max(1e-3);
        let covered = self.last_ttl.div_f64(lifetime_per_interval.max(1.0));
        let periodic = self
            .announce_interval
            .min(covered)
            .mul_f64(self.announce_jitter);
        let mut due = self.last_announce + periodic;
        if self.capabilities_changed {
            due = due.min(self.last_announce + self.announce_interval / 2);
        }
        due
    }

    /// Publishes `bytes` on the statements topic, counting the traffic when it went out.
    fn publish(&mut self, bytes: Vec<u8>) -> Result<(), gossipsub::PublishError> {
        let len = bytes.len();
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), bytes)?;
        self.metrics.traffic(GOSSIP, OUT, len);
        Ok(())
    }

    fn publish_own(&mut self, bytes: Vec<u8>) {
        match self.publish(bytes.clone()) {
            Ok(()) => self.announce_pending = None,
            Err(gossipsub::PublishError::Duplicate) => self.announce_pending = None,
            Err(e) => {
                debug!("announcement not published yet: {e}");
                self.announce_pending = Some(bytes);
            }
        }
    }

    /// Passes an announcement that anti-entropy brought as news on by gossip too, while it is
    /// young. Its issuer published it to the few peers subscribed then, and gossipsub never
    /// sends a message to peers that join the mesh later: without this, such an announcement
    /// spreads only by syncs, one neighbour at a time (measured at 200 nodes joining at once:
    /// the slowest announcements took 8-10 s to reach everyone that way). It is news to a
    /// node once, so each node publishes it at most once (to every subscribed peer, as
    /// gossipsub publishes), and gossip's duplicate cache drops the copies of nodes that had
    /// it; an old one is left to anti-entropy, which is how a newcomer learns the network
    /// without flooding it.
    fn pass_on_news(&mut self, signed: &SignedStatement, now: u64) {
        let Ok(claimed) = signed.peek() else {
            return;
        };
        let Statement::Announce(announcement) = &claimed.statement else {
            return;
        };
        if membership::young_for_gossip(announcement.issued_at, now) {
            let _ = self.publish(signed.to_bytes());
        }
    }

    /// This node's signed report that `subject` is down, if it can make one that counts.
    fn down_report(&self, subject: PeerId) -> Option<SignedStatement> {
        let now = now_ms();
        let ttl = self.config.timing.announce_ttl.as_millis() as u64;
        let statement = self.membership.down_report(subject, now, ttl)?;
        Some(SignedStatement::sign(&self.config.keypair, &statement))
    }

    fn publish_down_report(&mut self, subject: PeerId) {
        let Some(report) = self.down_report(subject) else {
            return;
        };
        let bytes = report.to_bytes();
        match self.publish(bytes) {
            Ok(()) => {
                self.metrics.down_reports_sent.inc();
            }
            Err(e) => debug!(%subject, "down report not published: {e}"),
        }
    }

    // ---- membership plumbing ---------------------------------------------------------------

    fn on_change(&mut self, change: Change) {
        self.update_gauges();
        match change {
            Change::Alive(peer) => {
                debug!(%peer, "peer alive");
                // A peer listed again (after it made room for others) keeps the standing its
                // record earned: evicted first again, not listed with a clean slate.
                let now = now_ms();
                let score = self.reputation.score(&peer, now);
                if score <= mycel_core::peering::GOOD_STANDING {
                    self.membership.set_standing(&peer, score, now);
                }
            }
            Change::Failed(peer, reason) => {
                info!(%peer, ?reason, "peer failed");
                self.metrics
                    .peer_failures
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: reason.label(),
                    })
                    .inc();
                // Neighbours tell everyone what they saw; expiry, hearsay and this node's own
                // unanswered probes need no retelling.
                if reason.warrants_report() {
                    self.publish_down_report(peer);
                }
                // One of this node's own connections went silent (a partition, a machine
                // gone): look at the peers held alive without a connection sooner.
                if reason == FailReason::MissedPings {
                    self.prober.alert(now_ms());
                }
                if reason == FailReason::MissedPings {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
    }

    /// Applies a statement that arrived from `source`; returns the gossip verdict.
    /// `gossip_copy` is the message as gossip delivered it, when it came by gossip.
    fn on_statement(
        &mut self,
        source: PeerId,
        signed: &SignedStatement,
        gossip_copy: Option<&[u8]>,
    ) -> gossipsub::MessageAcceptance {
        let now = now_ms();
        let issuer = signed.claimed_issuer();
        // A banned issuer's statements are dropped unread, whoever relays them (a forger
        // naming a banned issuer only gets its own message dropped).
        if issuer.is_some_and(|issuer| self.reputation.is_banned(&issuer, now)) {
            self.metrics.reject(Rejection::Banned);
            return gossipsub::MessageAcceptance::Ignore;
        }
        let addrs_before = issuer
            .and_then(|peer| self.membership.get(&peer))
            .map(|info| info.addrs.clone());
        match self.membership.on_statement(signed, now) {
            // A gossip copy of what anti-entropy brought first is a duplicate here, but
            // gossip must still pass it on: a copy ignored here goes no further, and nodes
            // that sync on connecting would otherwise stop every early announcement one hop
            // from its issuer (measured: two thirds of a 50-node join then arrived by sync
            // alone). Only the exact bytes of what this node verified and holds, while fresh.
            Ok(Accepted::Duplicate)
                if gossip_copy
                    .is_some_and(|data| self.membership.holds_fresh(signed, data, now)) =>
            {
                gossipsub::MessageAcceptance::Accept
            }
            Ok(Accepted::Duplicate) => gossipsub::MessageAcceptance::Ignore,
            Ok(Accepted::Ignored) => {
                self.metrics.reports_ignored.inc();
                gossipsub::MessageAcceptance::Ignore
            }
            Ok(Accepted::Announcement { change }) => {
                // Periodic re-announcements repeat the same addresses: only news goes to
                // Kademlia and to the peer book on disk.
                if let Some(peer) = issuer {
                    let addrs_now = self.membership.get(&peer).map(|info| &info.addrs);
                    if addrs_now != addrs_before.as_ref() {
                        self.learn_announced_addrs(peer);
                    }
                }
                if let Some(change) = change {
                    self.on_change(change);
                }
                gossipsub::MessageAcceptance::Accept
            }
            Ok(Accepted::Down { change }) => {
                self.metrics.reports_counted.inc();
                // A report that counts names a peer: probe it once soon if this node holds it
                // alive without a connection (the answer is this node's view alone). Only
                // from a reporter this node is connected to: one report must not make every
                // node of the network dial its subject at once.
                if let Ok(claimed) = signed.peek() {
                    if let Statement::Down(report) = claimed.statement {
                        let held = self.membership.get(&report.subject).is_some_and(|p| {
                            p.state == membership::PeerState::Alive && !p.connected
                        });
                        if held && self.swarm.is_connected(&claimed.issuer) {
                            self.prober.suspect(report.subject, now);
                        }
                    }
                }
                if let Some(change) = change {
                    self.on_change(change);
                }
                gossipsub::MessageAcceptance::Accept
            }
            // Refuted, not passed on: the report is about this node, and wrong.
            Ok(Accepted::Refute) => {
                info!(reporter = ?issuer, "refuting a report that this node is down");
                self.metrics.refutations.inc();
                self.announce();
                gossipsub::MessageAcceptance::Ignore
            }
            // A rejection that costs nothing (a stale copy honest neighbours relay now and
            // then) is not held against the neighbour by gossipsub's own score either.
            Err(Refusal {
                reason,
                culprit: Culprit::Sender,
            }) => {
                self.reject(source, reason);
                if reputation::penalty(reason) > 0.0 {
                    gossipsub::MessageAcceptance::Reject
                } else {
                    gossipsub::MessageAcceptance::Ignore
                }
            }
            // A genuine statement its issuer pays for (over its rate, or a lie only it can
            // have signed): the neighbour that relayed it is not to blame, and it goes no
            // further.
            Err(Refusal {
                reason,
                culprit: Culprit::Issuer(issuer),
            }) => {
                self.reject(issuer, reason);
                gossipsub::MessageAcceptance::Ignore
            }
        }
    }

    /// The block of addresses `peer` is connected from, as this node's word of contact names
    /// it (see [`Contact::from`]), from its first connection's address: its /24 or /48 on the
    /// internet; on a private network (private, link-local or unique-local addresses) its own
    /// address (/64 for IPv6), as a LAN's hosts share a block; one marker for every relayed
    /// peer (keys reaching this node through relays count as one, as they hold no slot of an
    /// address either); empty for this machine's peers unless they are limited like any
    /// host's (told apart by key alone).
    fn block_of(&self, peer: &PeerId) -> Vec<u8> {
        use mycel_core::inbound::{host_of, subnet_of};
        use std::net::IpAddr;
        let Some(ip) = self.since.get(peer).and_then(|l| l.ip) else {
            return RELAYED_BLOCK.to_vec();
        };
        if ip.is_loopback() && !self.config.limits.limit_loopback {
            return Vec::new();
        }
        let local = match ip {
            IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unique_local() || v6.is_unicast_link_local(),
        };
        match if local { host_of(ip) } else { subnet_of(ip) } {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    }

    /// `info` as this node sees `peer` now: how they are connected, and whether it is banned.
    fn view_of(&self, peer: &PeerId, info: &PeerInfo) -> PeerInfo {
        let mut info = self.with_link(peer, info);
        info.banned = self.reputation.is_banned(peer, now_ms());
        info
    }

    /// Counts a rejected message against `peer`, banning it when its reputation runs out.
    fn reject(&mut self, peer: PeerId, reason: Rejection) {
        debug!(%peer, %reason, "rejected message");
        self.metrics.reject(reason);
        let now = now_ms();
        let banned = self.reputation.penalise(peer, reason, now);
        let score = self.reputation.score(&peer, now);
        self.membership.set_standing(&peer, score, now);
        self.swarm
            .behaviour_mut()
            .gossipsub
            .set_application_score(&peer, score);
        if banned {
            warn!(%peer, "banning peer for repeated invalid messages");
            self.swarm.behaviour_mut().blocked.block_peer(peer);
            // The host that sent it pays too: keys are free, addresses are not.
            let link = self.since.get(&peer).filter(|l| l.inbound);
            if let Some(source) = link.and_then(|l| l.ip) {
                self.swarm.behaviour_mut().connections.strike(source);
            }
        }
    }

    /// Checks the ban list and the rate limit for a gossip message `peer` relays. Past its
    /// rate the message is dropped but nobody is charged: a neighbour relays what others
    /// issued, and statements are charged to their issuers (see `Membership::on_statement`).
    fn admit_gossip(&mut self, peer: PeerId) -> Result<(), Rejection> {
        admit(&self.reputation, &mut self.relayed, peer, now_ms())
    }

    /// Checks the ban list and the rate limit for a message from `peer`.
    fn admit(&mut self, peer: PeerId) -> Result<(), Rejection> {
        admit(&self.reputation, &mut self.rate, peer, now_ms())
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        for change in self.membership.tick(now) {
            self.on_change(change);
        }
        // The word of connected peers that this node is connected to them, for its down
        // reports about them.
        for peer in self.membership.contacts_wanted(now, CONTACTS_PER_TICK) {
            // Only over a connection that is open now: a request to a peer without one would
            // dial it (one this node just shed, say, would come back as a peer it chose).
            if !self.swarm.is_connected(&peer) {
                continue;
            }
            let id = self
                .swarm
                .behaviour_mut()
                .sync
                .send_request(&peer, SyncRequest::Contact);
            self.pending.insert(id, Pending::Contact);
        }
        if self.membership.refute_due(now) {
            info!("refuting reports that this node is down");
            self.metrics.refutations.inc();
            self.announce();
        }
        let (alive, _, _) = self.membership.counts();
        self.announce_interval = self.config.timing.announce_schedule(alive).0;
        // Forget scores decayed to nothing and isolations over (a stranger's key penalised
        // once must not stay in memory for good).
        self.reputation.prune(now);
        // Lift bans whose reputation has decayed back above the threshold.
        let blocked: Vec<PeerId> = self
            .swarm
            .behaviour()
            .blocked
            .blocked_peers()
            .iter()
            .copied()
            .collect();
        for peer in blocked {
            if !self.reputation.is_banned(&peer, now) {
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
        }
        self.update_gauges();
        self.maintain_degree();
        self.upkeep();
        self.probe_sweep(now);
        self.nat_tick(now);
        self.dial_lan_peers();
    }

    /// mDNS announces a peer once per record lifetime, so a first dial that fails (the peer
    /// was still starting, or both dialled at once) is retried here, every few seconds.
    fn dial_lan_peers(&mut self) {
        let now = now_ms();
        let cooldown = LAN_DIAL_COOLDOWN.as_millis() as u64;
        let due: Vec<(PeerId, Multiaddr)> = self
            .lan_peers
            .iter()
            .filter(|(peer, _)| !self.swarm.is_connected(peer))
            .filter(|(peer, _)| {
                self.last_dial
                    .get(*peer)
                    .is_none_or(|t| now.saturating_sub(*t) >= cooldown)
            })
            .map(|(peer, addr)| (*peer, addr.clone()))
            .collect();
        for (peer, addr) in due {
            self.last_dial.insert(peer, now);
            let _ = self.dial_peer(peer, vec![addr]);
        }
    }

    fn update_gauges(&self) {
        let (alive, _, failed) = self.membership.counts();
        self.metrics.set_peers(alive, failed);
        let evicted = self.membership.evicted();
        let counted = self.metrics.members_evicted.get();
        if evicted > counted {
            self.metrics.members_evicted.inc_by(evicted - counted);
        }
        self.metrics.connections.set(self.connections as i64);
    }

    fn remember_addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let entry = self.addresses.entry(peer).or_default();
        for addr in addrs {
            if !entry.contains(&addr) {
                entry.insert(0, addr);
            }
        }
        entry.truncate(MAX_ADDRS_PER_PEER);
        self.update_dial_addrs(peer);
    }

    /// Hands the swarm the addresses to dial `peer` at when a protocol asks for it by id.
    fn update_dial_addrs(&mut self, peer: PeerId) {
        let addrs = self.known_addrs(&peer);
        self.swarm
            .behaviour_mut()
            .connections
            .set_dial_addrs(peer, addrs);
    }

    /// After losing the last connection to a peer it believed alive, the node dials it once:
    /// success keeps it alive, failure declares it failed and tells the others.
    fn probe(&mut self, peer: PeerId) {
        let now = now_ms();
        let cooldown = PROBE_COOLDOWN.as_millis() as u64;
        if self
            .last_dial
            .get(&peer)
            .is_some_and(|t| now.saturating_sub(*t) < cooldown)
        {
            return;
        }
        if self.last_dial.len() >= 4096 {
            self.last_dial
                .retain(|_, t| now.saturating_sub(*t) < cooldown);
        }
        self.last_dial.insert(peer, now);
        let addrs = self.known_addrs(&peer);
        // A dead TCP port refuses at once, while QUIC would wait for the handshake timeout.
        let tcp: Vec<Multiaddr> = addrs
            .iter()
            .filter(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
            .cloned()
            .collect();
        let opts = if tcp.is_empty() {
            DialOpts::peer_id(peer)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
        } else {
            DialOpts::peer_id(peer).addresses(tcp)
        };
        let opts = opts
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        // With no address to try (identify has not told us any yet) the probe proves nothing;
        // the peer's announcement expiry still bounds how long it may stay alive.
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.probing.insert(peer);
            }
            Err(e) => debug!(%peer, "probe not dialled: {e}"),
        }
    }

    /// Starts the probes mycel-core's `Prober` picks among the peers held alive without a
    /// connection: one dial each, to the addresses the peer signed that this node can reach
    /// directly, through the same per-host dial budget as every dial.
    fn probe_sweep(&mut self, now: u64) {
        let (want, released) = self.prober.advance(now);
        for peer in released {
            debug!(%peer, "probe had no outcome in time");
            self.count_probe("inconclusive");
        }
        let prober = &self.prober;
        self.probe_dials.retain(|_, peer| prober.probing(peer));
        if want == 0 {
            return;
        }
        let own: Vec<String> = self
            .listen_addrs
            .iter()
            .chain(self.swarm.external_addresses())
            .map(|a| a.to_string())
            .collect();
        let vantage = Vantage::of(own.iter().map(String::as_str));
        let candidates = self
            .membership
            .probe_candidates(&vantage)
            .into_iter()
            .filter(|c| {
                !self.swarm.is_connected(&c.peer)
                    && !self.probing.contains(&c.peer)
                    && !self.reputation.is_banned(&c.peer, now)
            })
            .filter_map(|mut c| {
                // An address that does not parse would make a dial with none (inconclusive,
                // and retried sooner).
                c.addrs.retain(|a| a.parse::<Multiaddr>().is_ok());
                (!c.addrs.is_empty()).then_some(c)
            })
            .collect();
        for candidate in self.prober.pick(now, want, candidates, &mut self.rng) {
            let peer = candidate.peer;
            let addrs: Vec<Multiaddr> = candidate
                .addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            // Not "...AndNotDialing": an upkeep dial hanging in a blackhole must not hold the
            // probe back, nor the probe an upkeep dial.
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::Disconnected)
                .build();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    debug!(%peer, "probing a peer held alive without a connection");
                    self.probe_dials.insert(id, peer);
                }
                Err(e) => {
                    debug!(%peer, "probe not dialled: {e}");
                    self.settle_probe(peer, Outcome::Inconclusive, now);
                }
            }
        }
    }

    /// Applies the outcome of a probe of `peer`: an unanswered one fails it here only.
    fn settle_probe(&mut self, peer: PeerId, outcome: Outcome, now: u64) {
        let Some(verdict) = self.prober.settle(&peer, outcome, now) else {
            return;
        };
        match verdict {
            Verdict::Answered => self.count_probe("answered"),
            Verdict::Inconclusive => self.count_probe("inconclusive"),
            Verdict::Unanswered { seq } => {
                self.count_probe("unanswered");
                info!(%peer, "probe unanswered");
                if let Some(change) = self.membership.on_probe_unanswered(peer, seq, now) {
                    self.on_change(change);
                }
            }
        }
    }

    fn count_probe(&self, outcome: &'static str) {
        self.metrics
            .probes
            .get_or_create(&crate::metrics::OutcomeLabel { outcome })
            .inc();
    }

    /// Addresses of `peer` from identify and from its announcements, stream transports first.
    fn known_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let mut addrs = self.addresses.get(peer).cloned().unwrap_or_default();
        if let Some(info) = self.membership.get(peer) {
            for addr in info
                .addrs
                .iter()
                .filter_map(|a| a.parse::<Multiaddr>().ok())
            {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
        }
        // Relayed addresses last: a direct dial is tried first.
        addrs.sort_by_key(|a| (nat::is_relayed(a), !is_stream_addr(a)));
        addrs
    }

    /// Where upkeep and revival dial `peer`: its stream addresses if it has any (a refused TCP
    /// dial fails at once, a QUIC one waits for its handshake timeout), else all it has.
    fn dial_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let mut addrs = self.known_addrs(peer);
        if addrs.iter().any(is_stream_addr) {
            // Relayed addresses stay whatever transport reaches the relay: behind a NAT they
            // may be the only way in.
            addrs.retain(|a| is_stream_addr(a) || nat::is_relayed(a));
        }
        addrs
    }

    /// Feeds a peer's announced addresses (as membership just stored them) to Kademlia and the
    /// peer book. Filling the routing table from announcements, without dialling, is what keeps
    /// Kademlia from bootstrapping over and over while its table holds fewer than 20 peers.
    fn learn_announced_addrs(&mut self, peer: PeerId) {
        let addrs = self.addrs_announced_by(&peer);
        if addrs.is_empty() {
            return;
        }
        self.update_dial_addrs(peer);
        self.kad_add(peer, &addrs);
        let _ = self
            .events
            .try_send(NetEvent::PeerAddresses { peer, addrs });
    }

    /// The addresses of `peer`'s announcement held by membership (none if unknown).
    fn addrs_announced_by(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.membership
            .get(peer)
            .map(|info| info.addrs.iter().filter_map(|a| a.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Dials `peer` at `addrs` unless it is connected or being dialled already.
    fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), DialError> {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        self.swarm.dial(opts)
    }

    /// Dials while this node has fewer connections than it wants, a few per step, each target
    /// retried with capped exponential back-off (mycel-core's `peering`): bootstrap addresses
    /// and remembered peers until the node has its degree, announced peers to spread out.
    /// Losing every connection starts over from the bootstrap list at once.
    fn maintain_degree(&mut self) {
        let now = now_ms();
        let stale = DIAL_IN_FLIGHT.as_millis() as u64;
        self.dialing
            .retain(|_, (_, at)| now.saturating_sub(*at) < stale);
        let connected = self.swarm.connected_peers().count();
        let held = Held {
            connected,
            outbound: self.since.values().filter(|l| !l.inbound).count(),
            dialing: self.dialing.len(),
        };
        let candidates = if self.degree.shortfall(held) > 0 {
            self.dial_candidates(connected, now)
        } else {
            Vec::new()
        };
        let step = self.degree.step(now, held, candidates, &mut self.rng);
        if step.rebootstrap {
            info!("every connection lost; dialling the bootstrap list and known peers again");
        }
        for target in step.dial {
            self.dial_target(target, now);
        }
    }

    /// Once a tick: revival of failed peers, shedding, overdue goodbyes.
    fn upkeep(&mut self) {
        let now = now_ms();
        let failed: Vec<PeerId> = self
            .membership
            .peers()
            .filter(|(peer, info)| {
                info.state == membership::PeerState::Failed
                    && !info.addrs.is_empty()
                    && !self.swarm.is_connected(peer)
                    && !self.reputation.is_banned(peer, now)
            })
            .map(|(peer, _)| *peer)
            .collect();
        if let Some(peer) = self.revival.step(now, failed, &mut self.rng) {
            let addrs = self.dial_addrs(&peer);
            let _ = self.dial_peer(peer, addrs);
        }
        self.shed(now);
        // Goodbyes unanswered in time: close anyway.
        let overdue: Vec<PeerId> = self
            .parting
            .iter()
            .filter(|(_, deadline)| now >= **deadline)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in overdue {
            self.part(peer);
        }
        let memory = PARTED_MEMORY.as_millis() as u64;
        self.parted.retain(|_, at| now.saturating_sub(*at) < memory);
        // Reaching the cap, or leaving it, rides with the next announcement that a change
        // of load would bring (at most one each half interval): referrals are a hint.
        if self.at_cap() != self.announced_full {
            self.capabilities_changed = true;
        }
    }

    /// Whether this node holds as many connections as its cap allows.
    fn at_cap(&self) -> bool {
        self.held_connection_count() >= self.config.limits.max_connections as usize
    }

    /// Whom degree upkeep could dial, by tier.
    fn dial_candidates(&self, connected: usize, now: u64) -> Vec<(Target, u8)> {
        let mut candidates: Vec<(Target, u8)> = Vec::new();
        // Tier 0: bootstrap addresses while the node is short of its degree and not connected
        // to the peer they name (an address without a peer id only while it has no peer).
        let bootstrap = self.bootstrap_targets();
        let mut listed: HashSet<PeerId> = bootstrap
            .iter()
            .filter_map(|t| match t {
                Target::Peer(peer) => Some(*peer),
                Target::Addr(_) => None,
            })
            .collect();
        for target in bootstrap {
            let wanted = match &target {
                Target::Peer(peer) => !self.swarm.is_connected(peer),
                Target::Addr(_) => connected == 0,
            };
            if wanted {
                candidates.push((target, 0));
            }
        }
        // Tier 1: peers announced alive; tier 2: remembered ones and those last seen failed
        // (a partition that healed shows up here first).
        let book: HashSet<PeerId> = self.peer_book().collect();
        for (peer, info) in self.membership.peers() {
            if listed.contains(peer)
                || info.connected
                || self.swarm.is_connected(peer)
                || self.reputation.is_banned(peer, now)
                || info.addrs.is_empty() && !self.addresses.contains_key(peer)
            {
                continue;
            }
            let tier = if info.state == membership::PeerState::Alive {
                1
            } else {
                2
            };
            candidates.push((Target::Peer(*peer), tier));
        }
        listed.extend(self.membership.peers().map(|(peer, _)| *peer));
        for peer in book {
            if !listed.contains(&peer) && !self.swarm.is_connected(&peer) {
                candidates.push((Target::Peer(peer), 2));
            }
        }
        candidates
    }

    /// Above the high-water mark, says goodbye to the connections mycel-core's `peering::shed`
    /// picks (inbound, low score, youngest first; never in their first seconds).
    fn shed(&mut self, now: u64) {
        let conns = self.held_connections(now, None);
        for peer in peering::shed(&self.degree.config(), now, &conns) {
            debug!(%peer, "shedding a connection above the high-water mark");
            self.send_away(peer, now);
        }
    }

    /// The connected peers as mycel-core's `peering` sees them, but for those we are parting
    /// from and `except`.
    fn held_connections(&self, now: u64, except: Option<PeerId>) -> Vec<Connected<PeerId>> {
        self.swarm
            .connected_peers()
            .filter(|peer| !self.parting.contains_key(peer) && Some(**peer) != except)
            .map(|peer| {
                let link = self.since.get(peer).copied().unwrap_or(Link {
                    since: now,
                    inbound: true,
                    ip: None,
                    conns: 1,
                });
                Connected {
                    peer: *peer,
                    since: link.since,
                    inbound: link.inbound,
                    protected: false,
                    score: self.reputation.score(peer, now),
                    subnet: link.subnet(),
                }
            })
            .collect()
    }

    /// Connections held, less those of peers this node is parting from (they close within
    /// [`PARTING_TIMEOUT`] and must not make room at others' expense meanwhile).
    fn held_connection_count(&self) -> usize {
        let parting: usize = self
            .parting
            .keys()
            .filter_map(|peer| self.since.get(peer))
            .map(|link| link.conns as usize)
            .sum();
        self.connections.saturating_sub(parting)
    }

    /// A connection beyond the cap: an inbound connection of low value makes room for a peer
    /// that dialled us or one degree upkeep dialled (mycel-core's `peering::evict`); where none
    /// may be evicted, for other dials of ours, or for a peer that dials again after we sent
    /// it away, the newcomer itself only hears a goodbye with referrals (and an upkeep target
    /// is not dialled again for a while).
    fn make_room(&mut self, newcomer: PeerId, arrival: Arrival, now: u64) {
        let hold = GOODBYE_HOLD.as_millis() as u64;
        let sent_away = self
            .sent_away
            .get(&newcomer)
            .is_some_and(|at| now.saturating_sub(*at) < hold);
        let victim = match &arrival {
            Arrival::Other => None,
            // A peer sent away lately that comes back (its probe, a lookup, a bootstrap
            // address of ours) was judged of less value than those held: it does not evict
            // one of them.
            Arrival::Inbound | Arrival::Upkeep(_) if sent_away => None,
            Arrival::Inbound | Arrival::Upkeep(_) => {
                let conns = self.held_connections(now, Some(newcomer));
                let own = matches!(arrival, Arrival::Upkeep(_));
                peering::evict(&self.degree.config(), now, &conns, own)
            }
        };
        match victim {
            Some(victim) => {
                debug!(%victim, %newcomer, "evicting an inbound connection at the cap");
                self.metrics.evicted.inc();
                self.send_away(victim, now);
            }
            None => {
                self.metrics.referred.inc();
                self.send_away(newcomer, now);
                if let Arrival::Upkeep(target) = arrival {
                    let until = now + GOODBYE_HOLD.as_millis() as u64;
                    self.degree.backoff_mut().hold(target, now, until);
                }
            }
        }
    }

    /// Closes the connections to a peer we said goodbye to (once: the entry stays, with no
    /// deadline, until the close is seen, so that the close is not taken for a failure).
    fn part(&mut self, peer: PeerId) {
        if let Some(deadline) = self.parting.get_mut(&peer) {
            *deadline = u64::MAX;
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Says goodbye to `peer` as one judged of less value than those held (evicted, refused
    /// at the cap, shed): should it come back within [`GOODBYE_HOLD`] it makes no room.
    fn send_away(&mut self, peer: PeerId, now: u64) {
        if self.sent_away.len() >= MAX_SENT_AWAY {
            let hold = GOODBYE_HOLD.as_millis() as u64;
            self.sent_away
                .retain(|_, at| now.saturating_sub(*at) < hold);
        }
        if self.sent_away.len() < MAX_SENT_AWAY {
            self.sent_away.insert(peer, now);
        }
        self.say_goodbye(peer, now);
    }

    /// Tells `peer` we are closing our connection and where else to go (a few live peers'
    /// signed announcements), then closes it once it has the message.
    fn say_goodbye(&mut self, peer: PeerId, now: u64) {
        // Degree upkeep does not dial it again for a while (it would take the place of the one
        // it made room for).
        let until = now + GOODBYE_HOLD.as_millis() as u64;
        self.degree
            .backoff_mut()
            .hold(Target::Peer(peer), now, until);
        // Live neighbours whose signed announcement we hold, those with free slots first.
        let mut live: Vec<(PeerId, bool)> = self
            .swarm
            .connected_peers()
            .filter(|p| **p != peer && !self.parting.contains_key(*p))
            .filter(|p| self.membership.latest(p).is_some())
            .map(|p| (*p, self.membership.get(p).is_some_and(|info| info.full)))
            .collect();
        // The swarm's order is a hash map's: sorted, so that the seeded choice is repeatable.
        live.sort_unstable_by_key(|(p, _)| *p);
        let referrals: Vec<SignedStatement> =
            peering::referrals(live, MAX_REFERRALS, &mut self.rng)
                .iter()
                .filter_map(|p| self.membership.latest(p).cloned())
                .collect();
        let request = SyncRequest::Goodbye(referrals);
        self.metrics.traffic(SYNC, OUT, request_len(&request));
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.pending.insert(id, Pending::Goodbye);
        self.metrics.goodbyes_sent.inc();
        self.parting
            .insert(peer, now + PARTING_TIMEOUT.as_millis() as u64);
    }

    fn digest(&self) -> Vec<DigestEntry> {
        self.membership
            .digest()
            .into_iter()
            .map(|(peer, seq)| DigestEntry {
                peer: peer.to_bytes(),
                seq,
            })
            .collect()
    }

    /// Syncs with `peer` now or, while another sync is in flight, soon after (see
    /// [`SyncSchedule`]).
    fn start_sync(&mut self, peer: PeerId) {
        // A peer we are parting from would only take the place of one that stays.
        if self.parting.contains_key(&peer) {
            return;
        }
        if self.syncs.want(peer, self.sync_now()) {
            self.send_digest(peer);
        }
    }

    /// Milliseconds on the sync schedule's monotonic clock.
    fn sync_now(&self) -> u64 {
        self.sync_clock.elapsed().as_millis() as u64
    }

    fn send_digest(&mut self, peer: PeerId) {
        let request = SyncRequest::Digest(self.digest());
        self.metrics.traffic(SYNC, OUT, 0);
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.pending.insert(id, Pending::Sync);
    }

    /// Syncs with a neighbour owed a sync or a random one, by turns; true when one started.
    fn periodic_sync(&mut self) -> bool {
        let parting = &self.parting;
        let peers: Vec<PeerId> = self
            .swarm
            .connected_peers()
            .filter(|p| !parting.contains_key(p))
            .copied()
            .collect();
        let now = self.sync_now();
        let swarm = &self.swarm;
        let Some((peer, kind)) = self.syncs.on_timer(
            &peers,
            |p| swarm.is_connected(p) && !parting.contains_key(p),
            now,
            &mut self.rng,
        ) else {
            return false;
        };
        match kind {
            SyncKind::Digest => self.send_digest(peer),
            SyncKind::Summary => {
                let request = SyncRequest::Summary(self.membership.digest_summary().to_vec());
                self.metrics.traffic(SYNC, OUT, request_len(&request));
                let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
                self.pending.insert(id, Pending::Summary);
            }
        }
        true
    }

    /// Adds addresses to the Kademlia routing table once it has been seeded. Kademlia dials
    /// what it is given, and QUIC handshakes refused by peers at their cap are the expensive
    /// kind, so it gets the stream (TCP, memory) addresses.
    fn kad_add(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        if !self.kad_seeded {
            return;
        }
        // A peer behind a NAT cannot answer lookups: walks would only wait on dials of its
        // private addresses. (It runs Kademlia as a client, see `nat.rs`.)
        let private = self
            .membership
            .get(&peer)
            .is_some_and(|info| info.reachability == Reachability::Private);
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            if private {
                kad.remove_peer(&peer);
                return;
            }
            for addr in addrs
                .iter()
                .filter(|a| is_stream_addr(a) && !nat::is_relayed(a))
            {
                kad.add_address(&peer, addr.clone());
            }
        }
    }

    /// The first walk seeds the routing table with every peer known by then (from identify
    /// and announcements) in one batch: Kademlia bootstraps by itself after insertions while
    /// its table holds fewer than 20 peers, and each bootstrap dials peers, so a table filled
    /// one connection at a time during a join means a storm of lookups (measured: with 200
    /// nodes in one process the joins did not quiesce within 90 s). Membership does not need
    /// the DHT, so the DHT joins after it, staggered by the walk's jitter. Later walks look up
    /// a random key.
    fn random_walk(&mut self) {
        if !self.kad_seeded {
            self.seed_kad();
            return;
        }
        if self.swarm.connected_peers().next().is_some() {
            if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                kad.get_closest_peers(PeerId::random());
            }
        }
    }

    /// Seeds the routing table with every peer known by now (see [`Self::random_walk`]).
    /// Also done on demand, when the node provides or looks up content before its first walk:
    /// a node asked for a blob joins the DHT then rather than a minute later. Provider records
    /// made before the seeding only reached the local store; they are published again.
    fn seed_kad(&mut self) {
        if self.kad_seeded {
            return;
        }
        self.kad_seeded = true;
        let local = *self.swarm.local_peer_id();
        let mut known: HashSet<PeerId> = self.addresses.keys().copied().collect();
        known.extend(self.membership.peers().map(|(peer, _)| *peer));
        known.remove(&local);
        for peer in known {
            let addrs = self.known_addrs(&peer);
            self.kad_add(peer, &addrs);
        }
        let providing: Vec<kad::RecordKey> = self.providing.iter().cloned().collect();
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            for key in providing {
                if let Err(e) = kad.start_providing(key) {
                    warn!("cannot record a provider record: {e}");
                }
            }
        }
    }

    // ---- commands --------------------------------------------------------------------------

    fn status(&mut self) -> NetStatus {
        let (alive, alive_with_capabilities, failed) = self.membership.counts();
        let routing_table_peers = self
            .swarm
            .behaviour_mut()
            .kad
            .as_mut()
            .map_or(0, |kad| kad.kbuckets().map(|b| b.num_entries()).sum());
        NetStatus {
            peer_id: self.swarm.local_peer_id().to_base58(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            connections: self.connections,
            connected_peers: self.swarm.connected_peers().count(),
            alive,
            alive_with_capabilities,
            failed,
            announce_seq: self.own_seq,
            routing_table_peers,
            rejected_messages: self.metrics.rejected_total(),
            connections_opened: self.connections_opened,
            dial_failures: self.dial_failures,
            reachability: self.nat.reach.status().as_str().to_owned(),
            relay_server: self.serves_relay(),
            relay_reservations: self.nat.served_reservations(),
            relay_announced: self.announces_relay(),
            relays: self
                .nat
                .reach
                .held()
                .iter()
                .map(|p| p.to_base58())
                .collect(),
            announced_addrs: self
                .announced_addrs()
                .iter()
                .map(|a| a.to_string())
                .collect(),
            operator: self
                .config
                .operator
                .as_ref()
                .and_then(|o| o.id())
                .map(|id| id.to_base58()),
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let _ = reply.send(
                    self.membership
                        .peers()
                        .map(|(peer, info)| self.view_of(peer, info))
                        .collect(),
                );
            }
            Command::Peer(peer, reply) => {
                let _ = reply.send(self.membership.get(&peer).map(|i| self.view_of(&peer, i)));
            }
            Command::SetCapabilities(capabilities, reply) => {
                self.capabilities = capabilities;
                self.announce();
                let _ = reply.send(self.own_seq);
            }
            Command::RefreshCapabilities(capabilities) => self.refresh_capabilities(capabilities),
            Command::Echo {
                peer,
                payload,
                reply,
            } => {
                self.metrics.traffic(SYNC, OUT, payload.len());
                let id = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_request(&peer, SyncRequest::Echo(payload));
                self.pending.insert(id, Pending::Echo(reply));
            }
            Command::SyncRaw { peer, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_request(&peer, SyncRequest::Digest(Vec::new()));
                self.pending.insert(id, Pending::SyncRaw(reply));
            }
            Command::DownReport { subject, reply } => {
                let _ = reply.send(self.down_report(subject));
            }
            Command::PublishRaw { bytes, reply } => {
                let len = bytes.len();
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), bytes)
                    .map(|_| self.metrics.traffic(GOSSIP, OUT, len))
                    .map_err(|e| NetError::Other(format!("publish failed: {e}")));
                let _ = reply.send(result);
            }
            Command::ReferRaw {
                peer,
                referrals,
                reply,
            } => {
                let result = if self.swarm.is_connected(&peer) {
                    let request = SyncRequest::Goodbye(referrals);
                    self.metrics.traffic(SYNC, OUT, request_len(&request));
                    // The answer is not awaited: no pending entry, so nothing closes.
                    self.swarm.behaviour_mut().sync.send_request(&peer, request);
                    Ok(())
                } else {
                    Err(NetError::Other(format!("not connected to {peer}")))
                };
                let _ = reply.send(result);
            }
            Command::Listen(addr, reply) => {
                let result = self
                    .swarm
                    .listen_on(addr)
                    .map(|_| ())
                    .map_err(|e| NetError::Other(format!("cannot listen: {e}")));
                let _ = reply.send(result);
            }
            Command::Dial(addr, reply) => {
                let result = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| NetError::Other(format!("cannot dial {addr}: {e}")));
                let _ = reply.send(result);
            }
            Command::DirectPath(peer, reply) => self.direct_path(peer, reply),
            Command::AddAddresses(peer, addrs, reply) => {
                if peer != *self.swarm.local_peer_id() {
                    self.remember_addrs(peer, addrs);
                }
                let _ = reply.send(());
            }
            Command::Penalise(peer, reason) => self.reject(peer, reason),
            Command::Isolate(peer, until) => {
                warn!(%peer, "isolating a peer caught lying");
                self.reputation.isolate(peer, until);
                self.swarm.behaviour_mut().blocked.block_peer(peer);
            }
            Command::LiftIsolation(peer, reply) => {
                let free = !self.reputation.is_banned(&peer, now_ms());
                if free {
                    self.swarm.behaviour_mut().blocked.unblock_peer(peer);
                }
                let _ = reply.send(free);
            }
            Command::Reputation(peer, reply) => {
                let now = now_ms();
                let score = if self.reputation.isolated(&peer, now) {
                    ISOLATED_SCORE
                } else {
                    self.reputation.score(&peer, now)
                };
                let _ = reply.send(score);
            }
            Command::Provide(ids) => {
                let something = !ids.is_empty();
                self.provide(ids);
                if something && self.swarm.connected_peers().next().is_some() {
                    self.seed_kad();
                }
            }
            Command::FindProviders(id, reply) => {
                self.seed_kad();
                let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
                    let _ = reply.send(Vec::new());
                    return;
                };
                let query = kad.get_providers(kad::RecordKey::new(&id.to_string()));
                self.provider_queries.insert(query, (reply, HashSet::new()));
            }
            Command::Shutdown => {}
        }
    }

    /// Starts providing the listed ids and stops providing the others.
    fn provide(&mut self, ids: Vec<ContentId>) {
        let wanted: HashSet<kad::RecordKey> = ids
            .iter()
            .map(|id| kad::RecordKey::new(&id.to_string()))
            .collect();
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
            return;
        };
        for key in self.providing.difference(&wanted) {
            kad.stop_providing(key);
        }
        for key in wanted.difference(&self.providing) {
            if let Err(e) = kad.start_providing(key.clone()) {
                warn!("cannot record a provider record: {e}");
            }
        }
        self.providing = wanted;
    }

    /// Answers the provider lookup `id` with what it found and ends the query.
    fn answer_providers(&mut self, id: kad::QueryId) {
        let Some((reply, found)) = self.provider_queries.remove(&id) else {
            return;
        };
        let _ = reply.send(found.into_iter().collect());
        if let Some(mut query) = self
            .swarm
            .behaviour_mut()
            .kad
            .as_mut()
            .and_then(|k| k.query_mut(&id))
        {
            query.finish();
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        match result {
            kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                providers,
                ..
            })) => {
                // Every peer's answer is reported, also the answers of peers that know no
                // provider. The lookup is answered when the query ends, or as soon as enough
                // providers are known: a router or a fetch needs candidates now, not the
                // complete list, but a fetch wants several to pull from at once.
                let Some((_, found)) = self.provider_queries.get_mut(&id) else {
                    return;
                };
                found.extend(providers);
                if found.len() >= ENOUGH_PROVIDERS || step.last {
                    self.answer_providers(id);
                }
            }
            kad::QueryResult::GetProviders(_) if step.last => self.answer_providers(id),
            kad::QueryResult::StartProviding(Err(e)) => debug!("providing failed: {e}"),
            _ => {}
        }
    }

    // ---- swarm events ----------------------------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(m) = &self.libp2p_metrics {
            use libp2p::metrics::Recorder;
            m.record(&event);
        }
        let now = now_ms();
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.connections += 1;
                self.connections_opened += 1;
                self.nat_connection_established(peer_id, connection_id, &endpoint);
                self.metrics.connections.set(self.connections as i64);
                self.probing.remove(&peer_id);
                self.referrals.confirmed(&peer_id);
                let upkeep = self
                    .dialing
                    .remove(&connection_id)
                    .map(|(target, _)| target);
                if let Some(target) = &upkeep {
                    self.degree.backoff_mut().succeeded(target);
                }
                self.degree.backoff_mut().succeeded(&Target::Peer(peer_id));
                self.revival.revived(&peer_id);
                // A probe is answered by any connection to its peer, whichever way it came.
                let probe = self.probe_dials.remove(&connection_id).is_some();
                self.prober.heard(now);
                self.settle_probe(peer_id, Outcome::Answered, now);
                let over_share = self
                    .swarm
                    .behaviour()
                    .connections
                    .is_over_share(&connection_id);
                if !endpoint.is_dialer() && !over_share {
                    self.metrics.connections_inbound.inc();
                    self.counted_inbound.insert(connection_id);
                }

                if let Some(link) = self.since.get_mut(&peer_id) {
                    link.conns = num_established.get();
                }
                if over_share && num_established.get() > 1 {
                    // A second connection from a peer already held: only this one goes.
                    self.swarm.close_connection(connection_id);
                }
                if num_established.get() == 1 {
                    let inbound = !endpoint.is_dialer();
                    let link = Link {
                        since: now,
                        inbound,
                        ip: crate::cap::source_ip(endpoint.get_remote_address()),
                        conns: 1,
                    };
                    self.since.insert(peer_id, link);
                    if over_share {
                        // Past its address's share of inbound slots: referrals only.
                        self.metrics.referred.inc();
                        self.send_away(peer_id, now);
                    } else if self.held_connection_count()
                        > self.config.limits.max_connections as usize
                    {
                        // Beyond the cap (in a referral slot): someone makes room, or the
                        // newcomer only gets a goodbye with referrals.
                        let arrival = match upkeep {
                            _ if inbound => Arrival::Inbound,
                            Some(target) => Arrival::Upkeep(target),
                            None => Arrival::Other,
                        };
                        self.make_room(peer_id, arrival, now);
                    }
                    if let Some(change) = self.membership.on_connected(peer_id, now) {
                        self.on_change(change);
                    }
                    if endpoint.is_dialer() {
                        self.membership.on_dialled(peer_id);
                    }
                    if probe
                        && !self.parting.contains_key(&peer_id)
                        && self.held_connection_count() > self.config.limits.target_peers
                    {
                        // The probe's answer is all this node wanted of the connection (the
                        // goodbye tells the peer the close is no failure). It was not judged
                        // of less value than others: should it dial in, it may take a place.
                        self.say_goodbye(peer_id, now);
                        return;
                    }
                    // Both sides pull what the other knows: a joining node learns the
                    // network at once, and its neighbour learns the joiner's view.
                    self.start_sync(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                if self.counted_inbound.remove(&connection_id) {
                    self.metrics.connections_inbound.dec();
                }
                if let Some(link) = self.since.get_mut(&peer_id) {
                    link.conns = num_established;
                }
                self.nat_connection_closed(peer_id, connection_id);
                self.connections = self.connections.saturating_sub(1);
                self.metrics.connections.set(self.connections as i64);
                if num_established == 0 {
                    debug!(%peer_id, ?cause, "last connection closed");
                    self.membership.on_disconnected(peer_id, now);
                    self.rate.remove(&peer_id);
                    self.since.remove(&peer_id);
                    let parting = self.parting.remove(&peer_id).is_some();
                    let alive = self
                        .membership
                        .get(&peer_id)
                        .is_some_and(|p| p.state == membership::PeerState::Alive);
                    // A close either side announced with a goodbye is no sign of failure.
                    let parted = parting || self.parted.contains_key(&peer_id);
                    if alive && !parted && !self.reputation.is_banned(&peer_id, now) {
                        self.probe(peer_id);
                    }
                }
            }
            // A banned peer dialled again: its handshake was wasted, and its host pays.
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error: libp2p::swarm::ListenError::Denied { cause },
                ..
            } if cause
                .downcast_ref::<libp2p::allow_block_list::Blocked>()
                .is_some() =>
            {
                let connections = &mut self.swarm.behaviour_mut().connections;
                connections.refuse(crate::cap::REFUSED_BANNED);
                if let Some(source) = crate::cap::source_ip(&send_back_addr) {
                    connections.strike(source);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id: None,
                error,
            } => {
                self.dial_failures += 1;
                if let Some((target, _)) = self.dialing.remove(&connection_id) {
                    debug!(?target, "dial failed: {error}");
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id: Some(peer),
                error,
            } => {
                self.dial_failures += 1;
                self.dialing.remove(&connection_id);
                debug!(%peer, "dial failed: {error}");
                if self.probe_dials.remove(&connection_id).is_some() {
                    self.settle_probe(peer, probe_outcome(&error), now);
                }

                self.nat_dial_failed(peer, connection_id, &error);
                let elsewhere = matches!(
                    error,
                    DialError::WrongPeerId { .. } | DialError::LocalPeerId { .. }
                );
                if elsewhere || nobody_listens(&error) {
                    if let Some(referrer) = self.referrals.bogus(&peer, now) {
                        debug!(%peer, %referrer, "referred peer is not at its addresses");
                        self.reject(referrer, Rejection::BadReferral);
                    }
                }
                if self.probing.remove(&peer) {
                    // Our own limits refusing the dial says nothing about the peer.
                    if nobody_listens(&error) {
                        info!(%peer, "probe after disconnect failed: {error}");
                        if let Some(change) = self.membership.on_unreachable(peer, now) {
                            self.on_change(change);
                        }
                    }
                }
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                let relayed = self.on_relay_listen_addr(listener_id, &address);
                if !relayed && !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => self.on_listener_closed(listener_id, reason.as_ref().err()),
            SwarmEvent::ListenerError { listener_id, error } => {
                self.on_listener_closed(listener_id, Some(&error))
            }
            SwarmEvent::ExternalAddrConfirmed { .. } => self.on_external_addrs_changed(),
            SwarmEvent::ExternalAddrExpired { address } => {
                self.on_external_addr_expired(&address);
                self.on_external_addrs_changed()
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(event) => self.on_gossip_event(event),
            BehaviourEvent::Sync(event) => self.on_sync_event(event),
            BehaviourEvent::Identify(event) => {
                if let Some(m) = &self.libp2p_metrics {
                    use libp2p::metrics::Recorder;
                    m.record(&event);
                }
                if let identify::Event::Received { peer_id, info, .. } = event {
                    self.on_identify(peer_id, info);
                }
            }
            BehaviourEvent::Ping(event) => {
                if let Some(m) = &self.libp2p_metrics {
                    use libp2p::metrics::Recorder;
                    m.record(&event);
                }
                self.on_ping(event);
            }
            BehaviourEvent::Kad(event) => {
                if let Some(m) = &self.libp2p_metrics {
                    use libp2p::metrics::Recorder;
                    m.record(&event);
                }
                self.on_kad_event(event);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let local = *self.swarm.local_peer_id();
                for (peer, addr) in found {
                    if peer == local {
                        continue;
                    }
                    self.kad_add(peer, std::slice::from_ref(&addr));
                    self.remember_addrs(peer, vec![addr.clone()]);
                    if self.lan_peers.len() < MAX_LAN_PEERS {
                        self.lan_peers.insert(peer, addr);
                    }
                }
                self.dial_lan_peers();
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(expired)) => {
                for (peer, addr) in expired {
                    if self.lan_peers.get(&peer) == Some(&addr) {
                        self.lan_peers.remove(&peer);
                    }
                }
            }
            BehaviourEvent::RelayClient(event) => self.on_relay_client(event),
            BehaviourEvent::Dcutr(event) => self.on_dcutr(event),
            BehaviourEvent::Upnp(event) => self.on_upnp(event),
            BehaviourEvent::Relay(event) => self.on_relay_server(event),
            BehaviourEvent::AutonatServer(event) => {
                debug!(client = %event.client, addr = %event.tested_addr, ok = event.result.is_ok(), "AutoNAT dial-back")
            }
            BehaviourEvent::Connections(_)
            | BehaviourEvent::Streams(())
            | BehaviourEvent::Blocked(_)
            | BehaviourEvent::Limits(_)
            | BehaviourEvent::Memory(_) => {}
        }
    }

    fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        // Unspecified (0.0.0.0) listen addresses are not dialable, and a peer's loopback
        // addresses lead back to ourselves unless it is on this host (it sees us at a loopback
        // address); everything else is a referral.
        let same_host = is_loopback(&info.observed_addr);
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .into_iter()
            .filter(|a| {
                !a.iter().any(|p| match p {
                    Protocol::Ip4(ip) => ip.is_unspecified(),
                    Protocol::Ip6(ip) => ip.is_unspecified(),
                    _ => false,
                }) && (same_host || !is_loopback(a))
            })
            .take(MAX_ADDRS_PER_PEER)
            .collect();
        if info
            .protocols
            .iter()
            .any(|p| *p == StreamProtocol::new(KAD_PROTOCOL))
        {
            self.kad_add(peer, &addrs);
        }
        if info
            .protocols
            .contains(&crate::autonat::DIAL_REQUEST_PROTOCOL)
        {
            self.autonat_server_up(peer);
        }
        self.on_observed_addr(peer, info.observed_addr.clone());
        self.remember_addrs(peer, addrs.clone());
        if !addrs.is_empty() {
            let _ = self
                .events
                .try_send(NetEvent::PeerAddresses { peer, addrs });
        }
    }

    fn on_ping(&mut self, event: ping::Event) {
        let now = now_ms();
        let change = match event.result {
            Ok(rtt) => {
                self.prober.heard(now);
                self.membership
                    .on_ping_ok(event.peer, rtt.as_micros() as u64, now)
            }
            Err(e) => {
                debug!(peer = %event.peer, "ping failed: {e}");
                self.membership.on_ping_failure(event.peer, now)
            }
        };
        if let Some(change) = change {
            self.on_change(change);
        }
    }

    fn on_gossip_event(&mut self, event: gossipsub::Event) {
        if let Some(m) = &self.libp2p_metrics {
            use libp2p::metrics::Recorder;
            m.record(&event);
        }
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                self.metrics.traffic(GOSSIP, IN, message.data.len());
                let verdict = match self.admit_gossip(propagation_source) {
                    Err(reason) => {
                        self.metrics.reject(reason);
                        gossipsub::MessageAcceptance::Ignore
                    }
                    Ok(()) => match SignedStatement::from_bytes(&message.data) {
                        // Nodes publish and pass on only the one encoding of a statement;
                        // another that decodes the same (fields reordered, lengths written
                        // long) would be a second gossip message for one statement, passed
                        // on as news once and then as a copy of the one held.
                        Ok(signed) if signed.to_bytes() != message.data => {
                            self.reject(propagation_source, Rejection::Malformed);
                            gossipsub::MessageAcceptance::Reject
                        }
                        Ok(signed) => {
                            // More of one issuer than any checking node passes on: the
                            // neighbour pays, and nothing of it is verified.
                            let over = signed.claimed_issuer().and_then(|issuer| {
                                self.membership
                                    .admit_relayed(propagation_source, issuer, now_ms())
                                    .err()
                            });
                            match over {
                                Some(reason) => {
                                    self.reject(propagation_source, reason);
                                    gossipsub::MessageAcceptance::Ignore
                                }
                                None => self.on_statement(
                                    propagation_source,
                                    &signed,
                                    Some(&message.data),
                                ),
                            }
                        }
                        Err(reason) => {
                            self.reject(propagation_source, reason);
                            gossipsub::MessageAcceptance::Reject
                        }
                    },
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, verdict);
            }
            gossipsub::Event::Subscribed { .. } if self.announce_pending.is_some() => {
                self.retry_pending_announcement();
            }
            _ => {}
        }
    }

    fn on_sync_event(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    self.metrics.traffic(SYNC, IN, request_len(&request));
                    let response = match self.admit(peer) {
                        Err(reason) => {
                            self.reject(peer, reason);
                            SyncResponse::Refused
                        }
                        Ok(()) => self.answer(peer, request),
                    };
                    let len = response_len(&response);
                    if self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel, response)
                        .is_ok()
                    {
                        self.metrics.traffic(SYNC, OUT, len);
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    self.metrics.traffic(SYNC, IN, response_len(&response));
                    match (self.pending.remove(&request_id), response) {
                        (Some(Pending::Echo(reply)), SyncResponse::Echo(payload)) => {
                            let _ = reply.send(Ok(payload));
                        }
                        (Some(Pending::SyncRaw(reply)), SyncResponse::Statements(s)) => {
                            let _ = reply.send(Ok(s.len()));
                        }
                        (Some(Pending::SyncRaw(reply)), _) => {
                            let _ = reply.send(Err(NetError::Request {
                                peer,
                                reason: "refused".into(),
                            }));
                        }
                        (Some(Pending::Echo(reply)), _) => {
                            let _ = reply.send(Err(NetError::Request {
                                peer,
                                reason: "unexpected response to echo".into(),
                            }));
                        }
                        (Some(Pending::Sync), SyncResponse::Statements(statements)) => {
                            if statements.len() > MAX_SYNC_STATEMENTS {
                                self.syncs.settled(&peer);
                                self.reject(peer, Rejection::Oversized);
                                return;
                            }
                            let mut learned = false;
                            let mut issuers = HashSet::new();
                            for signed in &statements {
                                if self.admit(peer).is_err() {
                                    break;
                                }
                                // An answer holds the latest statement of each peer: several
                                // of one issuer are a flood of it, each to be verified.
                                if signed
                                    .claimed_issuer()
                                    .is_some_and(|issuer| !issuers.insert(issuer))
                                {
                                    self.reject(peer, Rejection::Malformed);
                                    break;
                                }
                                let news = self.on_statement(peer, signed, None)
                                    == gossipsub::MessageAcceptance::Accept;
                                if news {
                                    self.pass_on_news(signed, now_ms());
                                }
                                learned |= news;
                            }
                            // While syncs still teach us something the network is converging:
                            // keep syncing often. Once they come back empty, back off.
                            self.syncs.answered(&peer, learned);
                        }
                        (Some(Pending::Summary), SyncResponse::Differs) => {
                            self.syncs.settled(&peer);
                            self.start_sync(peer);
                        }
                        (Some(Pending::Sync | Pending::Summary), _) => self.syncs.settled(&peer),
                        (Some(Pending::Goodbye), _) => self.part(peer),
                        (Some(Pending::Contact), SyncResponse::Contact(contact)) => {
                            match self.membership.on_contact(peer, contact, now_ms()) {
                                Ok(kept) => debug!(%peer, kept, "contact"),
                                Err(reason) => self.reject(peer, reason),
                            }
                        }
                        (Some(Pending::Contact), other) => {
                            debug!(%peer, ?other, "no contact in the answer");
                        }
                        (None, _) => {}
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                peer,
                error,
                ..
            } => match self.pending.remove(&request_id) {
                Some(Pending::Echo(reply)) => {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
                Some(Pending::SyncRaw(reply)) => {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
                Some(Pending::Sync | Pending::Summary) => self.syncs.settled(&peer),
                Some(Pending::Goodbye) => self.part(peer),
                Some(Pending::Contact) => debug!(%peer, %error, "contact request failed"),
                None => {}
            },
            request_response::Event::InboundFailure { peer, error, .. } => {
                // A request our codec refused (too large, or does not decode) is the peer's
                // fault; a stream that failed or closed early is not necessarily.
                if let request_response::InboundFailure::Io(e) = &error {
                    match protocol::rejection(e) {
                        Some(reason) => {
                            debug!(%peer, "bad sync request: {e}");
                            self.reject(peer, reason);
                        }
                        None => debug!(%peer, "sync request failed: {e}"),
                    }
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn answer(&mut self, peer: PeerId, request: SyncRequest) -> SyncResponse {
        match request {
            SyncRequest::Contact => SyncResponse::Contact(Contact::sign_from(
                &self.config.keypair,
                peer,
                now_ms(),
                self.block_of(&peer),
            )),
            SyncRequest::Echo(payload) if payload.len() <= MAX_ECHO_BYTES => {
                SyncResponse::Echo(payload)
            }
            SyncRequest::Echo(_) => {
                self.reject(peer, Rejection::Oversized);
                SyncResponse::Refused
            }
            SyncRequest::Digest(entries) if entries.len() <= MAX_DIGEST_ENTRIES => {
                let digest: Vec<(PeerId, u64)> = entries
                    .iter()
                    .filter_map(|e| PeerId::from_bytes(&e.peer).ok().map(|p| (p, e.seq)))
                    .collect();
                // A few bytes of request can ask for the whole table: the answer is cut to
                // what the asker has left to pull, and paid from it.
                let budget = self.served.available(peer, now_ms());
                if budget == 0 {
                    self.reject(peer, Rejection::RateLimited);
                    return SyncResponse::Refused;
                }
                let limit = MAX_SYNC_STATEMENTS.min(usize::try_from(budget).unwrap_or(usize::MAX));
                let statements = self.membership.newer_than(&digest, limit);
                self.served.spend(peer, statements.len() as u64);
                // Cut short by the asker's budget (not by the answer's own limit): it asks
                // faster than it may, and pays for it.
                if statements.len() == limit && limit < MAX_SYNC_STATEMENTS {
                    self.reject(peer, Rejection::RateLimited);
                }
                SyncResponse::Statements(statements)
            }
            SyncRequest::Digest(_) => {
                self.reject(peer, Rejection::Oversized);
                SyncResponse::Refused
            }
            SyncRequest::Summary(summary) if summary.len() == 32 => {
                if summary[..] == self.membership.digest_summary() {
                    SyncResponse::InSync
                } else {
                    SyncResponse::Differs
                }
            }
            SyncRequest::Summary(_) => {
                self.reject(peer, Rejection::Malformed);
                SyncResponse::Refused
            }
            SyncRequest::Goodbye(referrals) if referrals.len() <= MAX_REFERRALS => {
                let now = now_ms();
                self.metrics.goodbyes_received.inc();
                // Not dialled again for a while (it has no room for us), and not probed
                // when it closes the connection.
                self.parted.insert(peer, now);
                let until = now + GOODBYE_HOLD.as_millis() as u64;
                self.degree
                    .backoff_mut()
                    .hold(Target::Peer(peer), now, until);
                // Referrals are announcements like any other: checked, stored, then dialled
                // by degree upkeep with its back-off. A stranger's referral is remembered with
                // its referrer, who pays if a dial finds the stranger is not at its addresses
                // (nobody listens, or another peer answers: us, say).
                for signed in &referrals {
                    if self.admit(peer).is_err() {
                        break;
                    }
                    let stranger = signed
                        .claimed_issuer()
                        .filter(|issuer| self.membership.get(issuer).is_none());
                    let accepted = self.on_statement(peer, signed, None)
                        == gossipsub::MessageAcceptance::Accept;
                    if let (Some(stranger), true) = (stranger, accepted) {
                        self.referrals.referred(stranger, peer, now);
                    }
                }
                SyncResponse::InSync
            }
            SyncRequest::Goodbye(_) => {
                self.reject(peer, Rejection::Oversized);
                SyncResponse::Refused
            }
        }
    }
}

/// Whether a failed dial proves the peer is gone: every address was refused outright (no
/// process listens there). A reset, a timeout or a refusal by the peer's connection cap says
/// nothing certain, and our own limits refusing the dial says nothing about the peer at all.
fn nobody_listens(error: &DialError) -> bool {
    let DialError::Transport(attempts) = error else {
        return false;
    };
    !attempts.is_empty()
        && attempts.iter().all(|(_, e)| match e {
            TransportError::Other(e) => refused_outright(e),
            TransportError::MultiaddrNotSupported(_) => false,
        })
}

/// What a failed probe dial says about its peer: unanswered only when every address refused
/// it (a connection refused, an in-memory address nobody listens on) or let it time out (the
/// same silence a missed ping is). Anything else (our own limits, another peer answering, a
/// reset or a broken handshake, which a peer at its cap causes too, an unreachable network or
/// host, which may be this node's own network) proves nothing.
fn probe_outcome(error: &DialError) -> Outcome {
    let DialError::Transport(attempts) = error else {
        return Outcome::Inconclusive;
    };
    let silent = |e: &TransportError<io::Error>| match e {
        TransportError::Other(inner) => refused(e) || timed_out(inner),
        TransportError::MultiaddrNotSupported(_) => false,
    };
    if attempts.is_empty() || !attempts.iter().all(|(_, e)| silent(e)) {
        Outcome::Inconclusive
    } else if attempts.iter().all(|(_, e)| refused(e)) {
        Outcome::Refused
    } else {
        Outcome::Unanswered
    }
}

/// Whether a dial attempt's error is the address refusing the connection: the connection
/// refused outright, or an in-memory address nobody listens on. Not an unreachable network or
/// host, which may be this node's own.
fn refused(error: &TransportError<io::Error>) -> bool {
    match error {
        TransportError::Other(e) => {
            error_shows(e, &[io::ErrorKind::ConnectionRefused], "ConnectionRefused")
                || nobody_in_memory(e)
        }
        TransportError::MultiaddrNotSupported(_) => false,
    }
}

/// Whether a dial's I/O error is the memory transport's `Unreachable` (nobody listens at the
/// address), found by its Debug name as a word of its own (not the tail of `HostUnreachable`
/// or `NetworkUnreachable`).
fn nobody_in_memory(error: &io::Error) -> bool {
    let name = format!("{:?}", MemoryTransportError::Unreachable);
    let debug = format!("{error:?}");
    debug.match_indices(&name).any(|(at, _)| {
        !debug[..at]
            .chars()
            .next_back()
            .is_some_and(char::is_alphanumeric)
    })
}

/// Whether a dial's I/O error is a timeout: an I/O one, or libp2p's
/// `TransportTimeoutError::Timeout` (found by its Debug name, see [`refused_outright`]).
pub(crate) fn timed_out(error: &io::Error) -> bool {
    use libp2p::core::transport::timeout::TransportTimeoutError;
    let timeout = format!("{:?}", TransportTimeoutError::<io::Error>::Timeout);
    error_shows(error, &[io::ErrorKind::TimedOut], &timeout)
}

/// The kinds of a dial's I/O error that say no process listens at the address.
const REFUSED_KINDS: [io::ErrorKind; 3] = [
    io::ErrorKind::ConnectionRefused,
    io::ErrorKind::HostUnreachable,
    io::ErrorKind::NetworkUnreachable,
];

/// Whether a transport's dial error is a refusal by the address itself: an I/O error of one of
/// [`REFUSED_KINDS`], or the memory transport's [`MemoryTransportError::Unreachable`].
///
/// Both are typed values, but libp2p keeps them out of typed reach: the transports its
/// `SwarmBuilder` composes wrap the dial's error in `either::Either`s, whose `Error::source`
/// skips the error they hold (it returns that error's own source), and in libp2p-core's
/// `UpgradeError`, which is not public, so the refusal can neither be reached through
/// `source()` nor named for a downcast. Its Debug form shows it (`Os { kind:
/// ConnectionRefused, .. }`, `Kind(ConnectionRefused)`, `Unreachable`), so that is searched for
/// the Debug names of those typed values, never for a message's wording.
fn refused_outright(error: &io::Error) -> bool {
    let unreachable = format!("{:?}", MemoryTransportError::Unreachable);
    error_shows(error, &REFUSED_KINDS, &unreachable)
}

/// Whether `error` is of one of `kinds`, or holds one (or a typed value whose Debug name is
/// `also`) somewhere libp2p's wrappers keep out of typed reach (see [`refused_outright`]).
pub(crate) fn error_shows(error: &io::Error, kinds: &[io::ErrorKind], also: &str) -> bool {
    if kinds.contains(&error.kind()) {
        return true;
    }
    let debug = format!("{error:?}");
    kinds
        .iter()
        .any(|kind| debug.contains(&format!("{kind:?}")))
        || debug.contains(also)
}

/// TCP and memory addresses: a dial to a dead one fails at once (QUIC waits for a timeout),
/// and their refusal by a peer at its cap costs no handshake.
/// Whether `addr` is on this host only (127.0.0.0/8, ::1, or libp2p's memory transport).
pub(crate) fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        Protocol::Memory(_) => true,
        _ => false,
    })
}

fn is_stream_addr(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::Tcp(_) | Protocol::Memory(_)))
}

// Sync traffic is counted in bytes estimated from what the messages hold (the codec encodes
// them out of sight), rather than by encoding every message a second time.
fn request_len(request: &SyncRequest) -> usize {
    match request {
        SyncRequest::Digest(entries) => entries.len() * 48,
        SyncRequest::Echo(payload) | SyncRequest::Summary(payload) => payload.len(),
        SyncRequest::Goodbye(s) => s.iter().map(|s| s.body.len() + 100).sum(),
        SyncRequest::Contact => 1,
    }
}

fn response_len(response: &SyncResponse) -> usize {
    match response {
        SyncResponse::Statements(s) => s.iter().map(|s| s.body.len() + 100).sum(),
        SyncResponse::Echo(payload) => payload.len(),
        SyncResponse::Contact(contact) => 48 + contact.from.len() + contact.signature.len(),
        SyncResponse::Refused | SyncResponse::InSync | SyncResponse::Differs => 1,
    }
}

/// `base` plus or minus up to a fifth, so that nodes started together spread out.
fn jittered(base: Duration, rng: &mut impl Rng) -> Duration {
    let fifth = base.as_millis() as u64 / 5;
    if fifth == 0 {
        return base;
    }
    let offset = rng.gen_range(0..=2 * fifth);
    Duration::from_millis(base.as_millis() as u64 - fifth + offset)
}

/// Whether `peer` may be heard at `now`: not banned, and within `limiter`'s rate.
fn admit(
    reputation: &Reputation,
    limiter: &mut RateLimiter<PeerId>,
    peer: PeerId,
    now: u64,
) -> Result<(), Rejection> {
    if reputation.is_banned(&peer, now) {
        return Err(Rejection::Banned);
    }
    if !limiter.allow(peer, now) {
        return Err(Rejection::RateLimited);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use libp2p::core::transport::timeout::TransportTimeoutError;

    use super::*;

    fn dial_error(errors: Vec<TransportError<io::Error>>) -> DialError {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        DialError::Transport(errors.into_iter().map(|e| (addr.clone(), e)).collect())
    }

    /// Wrapped as the swarm's boxed transport wraps a dial's error.
    fn boxed(kind: io::ErrorKind) -> TransportError<io::Error> {
        let timeout = TransportTimeoutError::Other(io::Error::from(kind));
        TransportError::Other(io::Error::other(timeout))
    }

    #[test]
    fn a_probe_is_unanswered_only_when_every_address_refused_or_timed_out() {
        use io::ErrorKind::*;
        let probe = |errors| probe_outcome(&dial_error(errors));
        let timeout = || {
            TransportError::Other(io::Error::other(
                TransportTimeoutError::<io::Error>::Timeout,
            ))
        };
        assert_eq!(probe(vec![boxed(ConnectionRefused)]), Outcome::Refused);
        assert_eq!(probe(vec![boxed(TimedOut)]), Outcome::Unanswered);
        assert_eq!(probe(vec![timeout()]), Outcome::Unanswered);
        let memory = io::Error::other(MemoryTransportError::Unreachable);
        assert_eq!(probe(vec![TransportError::Other(memory)]), Outcome::Refused);
        assert_eq!(
            probe(vec![boxed(ConnectionRefused), timeout()]),
            Outcome::Unanswered
        );
        // A reset or a broken handshake (a peer at its cap), our own refusals, another peer.
        for kind in [
            ConnectionReset,
            PermissionDenied,
            UnexpectedEof,
            Other,
            HostUnreachable,
            NetworkUnreachable,
        ] {
            assert_eq!(probe(vec![boxed(kind)]), Outcome::Inconclusive, "{kind:?}");
        }
        assert_eq!(
            probe(vec![timeout(), boxed(ConnectionReset)]),
            Outcome::Inconclusive
        );
        let unsupported = TransportError::MultiaddrNotSupported("/dns/x".parse().unwrap());
        assert_eq!(probe(vec![unsupported]), Outcome::Inconclusive);
        assert_eq!(probe(Vec::new()), Outcome::Inconclusive);
        assert_eq!(probe_outcome(&DialError::Aborted), Outcome::Inconclusive);
        assert_eq!(
            probe_outcome(&DialError::NoAddresses),
            Outcome::Inconclusive
        );
    }

    #[test]
    fn only_refusals_by_every_address_prove_nobody_listens() {
        use io::ErrorKind::*;
        for kind in [ConnectionRefused, HostUnreachable, NetworkUnreachable] {
            assert!(nobody_listens(&dial_error(vec![boxed(kind)])), "{kind:?}");
            assert!(nobody_listens(&dial_error(vec![TransportError::Other(
                kind.into()
            )])));
        }
        let memory = io::Error::other(MemoryTransportError::Unreachable);
        assert!(nobody_listens(&dial_error(vec![TransportError::Other(
            memory
        )])));
        for kind in [ConnectionReset, TimedOut, PermissionDenied, Other] {
            assert!(!nobody_listens(&dial_error(vec![boxed(kind)])), "{kind:?}");
        }
        let timeout = io::Error::other(TransportTimeoutError::<io::Error>::Timeout);
        assert!(!nobody_listens(&dial_error(vec![TransportError::Other(
            timeout
        )])));
        let unsupported = TransportError::MultiaddrNotSupported("/dns/x".parse().unwrap());
        assert!(!nobody_listens(&dial_error(vec![unsupported])));
        // One address refusing while another times out proves nothing.
        assert!(!nobody_listens(&dial_error(vec![
            boxed(ConnectionRefused),
            boxed(TimedOut)
        ])));
        assert!(!nobody_listens(&dial_error(Vec::new())));
        assert!(!nobody_listens(&DialError::Aborted));
    }
}
