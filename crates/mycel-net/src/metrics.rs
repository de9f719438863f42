//! The network's Prometheus metrics.

use mycel_core::wire::Rejection;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    pub(crate) state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TrafficLabel {
    pub(crate) protocol: &'static str,
    pub(crate) direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

/// Counters and gauges of one node's network, registered under the `mycel` prefix.
#[derive(Debug, Clone, Default)]
pub struct NetMetrics {
    pub(crate) peers: Family<StateLabel, Gauge>,
    pub(crate) connections: Gauge,
    pub(crate) connections_inbound: Gauge,
    pub(crate) messages: Family<TrafficLabel, Counter>,
    pub(crate) bytes: Family<TrafficLabel, Counter>,
    pub(crate) rejected: Family<ReasonLabel, Counter>,
    pub(crate) goodbyes_sent: Counter,
    pub(crate) goodbyes_received: Counter,
    pub(crate) referred: Counter,
    pub(crate) evicted: Counter,
    pub(crate) refutations: Counter,
    pub(crate) connections_refused: Family<ReasonLabel, Counter>,
    pub(crate) reports_ignored: Counter,
    pub(crate) reports_counted: Counter,
    pub(crate) members_evicted: Counter,
    /// Inbound raw streams dropped: past their queue's bounds, or of a protocol not accepted.
    pub(crate) streams_dropped: Counter,
    /// NAT traversal events by kind and result (see `nat_event` labels).
    pub(crate) nat: Family<NatLabel, Counter>,
    /// Probes of peers held alive without a connection, by outcome.
    pub(crate) probes: Family<OutcomeLabel, Counter>,
    /// Peers declared failed, by reason.
    pub(crate) peer_failures: Family<ReasonLabel, Counter>,
    /// Down reports this node published.
    pub(crate) down_reports_sent: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub(crate) outcome: &'static str,
}

/// Outcomes counted in `mycel_probes_total`.
pub(crate) const PROBE_OUTCOMES: [&str; 3] = ["answered", "unanswered", "inconclusive"];

/// Reasons counted in `mycel_peer_failures_total` (`FailReason`'s).
pub(crate) const FAIL_REASONS: [&str; 5] = [
    "missed_pings",
    "unreachable",
    "expired",
    "reported",
    "unanswered",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NatLabel {
    pub(crate) event: &'static str,
    pub(crate) result: &'static str,
}

/// NAT events counted in `mycel_nat_events_total`.
pub(crate) const NAT_EVENTS: [(&str, &str); 21] = [
    ("autonat_probe", "reachable"),
    ("autonat_probe", "unreachable"),
    ("relay_reservation", "accepted"),
    ("relay_reservation", "failed"),
    ("relay_reservation", "refused"),
    ("relay_served", "reservation_accepted"),
    ("relay_served", "reservation_denied"),
    ("relay_served", "circuit_accepted"),
    ("relay_served", "circuit_denied"),
    ("relay_served", "circuit_closed"),
    ("relay_served", "circuit_duration_limit"),
    ("relay_served", "circuit_bytes_limit"),
    ("relay_served", "circuit_broken"),
    ("hole_punch", "direct"),
    ("hole_punch", "failed"),
    ("bulk_over_relay", "refused"),
    ("relayed_connection", "opened"),
    ("upnp", "mapped"),
    ("upnp", "expired"),
    ("upnp", "no_gateway"),
    ("upnp", "non_routable"),
];

pub(crate) const GOSSIP: &str = "gossip";
pub(crate) const SYNC: &str = "sync";
pub(crate) const IN: &str = "in";
pub(crate) const OUT: &str = "out";

impl NetMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry_with_prefix("mycel");
        sub.register("peers", "Known peers by state", metrics.peers.clone());
        sub.register(
            "connections",
            "Established connections",
            metrics.connections.clone(),
        );
        sub.register(
            "messages",
            "Protocol messages by protocol and direction",
            metrics.messages.clone(),
        );
        sub.register(
            "message_bytes",
            "Protocol message payload bytes by protocol and direction",
            metrics.bytes.clone(),
        );
        sub.register(
            "rejected_messages",
            "Messages from peers rejected, by reason",
            metrics.rejected.clone(),
        );
        sub.register(
            "goodbyes_sent",
            "Connections closed on purpose with a goodbye and referrals (cap or shedding)",
            metrics.goodbyes_sent.clone(),
        );
        sub.register(
            "goodbyes_received",
            "Goodbyes with referrals received from peers closing a connection",
            metrics.goodbyes_received.clone(),
        );
        sub.register(
            "referred",
            "Connections beyond the cap answered only with referrals",
            metrics.referred.clone(),
        );
        sub.register(
            "connections_inbound",
            "Open connections that peers dialled (those the per-address shares count)",
            metrics.connections_inbound.clone(),
        );
        sub.register(
            "connections_evicted",
            "Inbound connections closed at the cap to make room for a newcomer (the lowest \
             value among those not dialled by this node, not long-lived and not new)",
            metrics.evicted.clone(),
        );
        sub.register(
            "connections_refused",
            "Connections refused before their handshake, by reason (at_cap: at the \
             connection cap and its referral slots; pending_per_ip: the remote address already \
             has its share of connections in their handshake; inbound_per_ip, \
             inbound_per_subnet: the remote address, or its /24 or /48, already holds its \
             share of inbound connections; stranger_dial: a dial of ours to a peer only \
             others claimed to know the address of, past the budget of 1 a second; \
             address_budget: a dial of ours not made because 8 dials failed at the host it \
             claims within a minute; banned_peer: an inbound connection whose handshake \
             showed a banned peer; struck_host: refused before its handshake because its \
             host sent more than 3 banned peers within a minute)",
            metrics.connections_refused.clone(),
        );
        let shares = mycel_core::inbound::ShareRefusal::REASONS;
        let ours = [
            crate::cap::REFUSED_AT_CAP,
            crate::cap::REFUSED_STRANGER_DIAL,
            crate::cap::REFUSED_ADDRESS_BUDGET,
            crate::cap::REFUSED_BANNED,
            crate::cap::REFUSED_STRUCK,
        ];
        for reason in ours.into_iter().chain(shares) {
            let _ = metrics
                .connections_refused
                .get_or_create(&ReasonLabel { reason });
        }
        sub.register(
            "inbound_streams_dropped",
            "Inbound task, blob and training streams dropped before their acceptor took them: \
             past the queue of a protocol (512 in all, 64 per peer), or of a protocol not \
             accepted",
            metrics.streams_dropped.clone(),
        );
        sub.register(
            "refutations",
            "Announcements made to refute reports that this node is down",
            metrics.refutations.clone(),
        );
        sub.register(
            "down_reports_ignored",
            "Down reports neither counted nor passed on (unknown reporter or subject, an \
             announcement other than the one held, a repeat, contradicted by direct contact, \
             or about this node and answered by the next refutation)",
            metrics.reports_ignored.clone(),
        );
        sub.register(
            "members_evicted",
            "Peers evicted from the full membership table to make room for others (failed ones \
             first, then those out of good standing, then the ones listed last)",
            metrics.members_evicted.clone(),
        );
        sub.register(
            "down_reports_counted",
            "Down reports about other peers counted toward their quorum (from a live reporter \
             carrying the subject's word that it was connected to it)",
            metrics.reports_counted.clone(),
        );
        sub.register(
            "nat_events",
            "NAT traversal: AutoNAT probes, relay reservations, hole punches, bulk data refused a \
             relay, UPnP port mappings (mapped, expired, no gateway, gateway not on the internet)",
            metrics.nat.clone(),
        );
        for (event, result) in NAT_EVENTS {
            let _ = metrics.nat.get_or_create(&NatLabel { event, result });
        }
        sub.register(
            "probes",
            "Probe dials of peers held alive without a connection, by outcome (answered; \
             unanswered: every address refused or timed out while this node ran, and the peer \
             is failed here only; inconclusive: this node's limits, a stall, another peer \
             answering, no outcome in time)",
            metrics.probes.clone(),
        );
        for outcome in PROBE_OUTCOMES {
            let _ = metrics.probes.get_or_create(&OutcomeLabel { outcome });
        }
        sub.register(
            "peer_failures",
            "Peers declared failed, by reason (missed_pings, unreachable: this node's own \
             connection broke, and it tells others; expired: no newer announcement in time; \
             reported: a quorum of down reports; unanswered: a probe went unanswered)",
            metrics.peer_failures.clone(),
        );
        for reason in FAIL_REASONS {
            let _ = metrics.peer_failures.get_or_create(&ReasonLabel { reason });
        }
        sub.register(
            "down_reports_sent",
            "Signed down reports this node published about peers whose connection to it broke",
            metrics.down_reports_sent.clone(),
        );
        // Pre-create every label so the series exist (at zero) from the start.
        for state in ["alive", "failed"] {
            let _ = metrics.peers.get_or_create(&StateLabel { state });
        }
        for reason in Rejection::ALL {
            let _ = metrics.rejected.get_or_create(&ReasonLabel {
                reason: reason.label(),
            });
        }
        for protocol in [GOSSIP, SYNC] {
            for direction in [IN, OUT] {
                let _ = metrics.messages.get_or_create(&TrafficLabel {
                    protocol,
                    direction,
                });
                let _ = metrics.bytes.get_or_create(&TrafficLabel {
                    protocol,
                    direction,
                });
            }
        }
        metrics
    }

    pub(crate) fn traffic(&self, protocol: &'static str, direction: &'static str, bytes: usize) {
        let label = TrafficLabel {
            protocol,
            direction,
        };
        self.messages.get_or_create(&label).inc();
        self.bytes.get_or_create(&label).inc_by(bytes as u64);
    }

    pub(crate) fn set_peers(&self, alive: usize, failed: usize) {
        self.peers
            .get_or_create(&StateLabel { state: "alive" })
            .set(alive as i64);
        self.peers
            .get_or_create(&StateLabel { state: "failed" })
            .set(failed as i64);
    }

    pub(crate) fn reject(&self, reason: Rejection) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    pub(crate) fn nat_event(&self, event: &'static str, result: &'static str) {
        self.nat.get_or_create(&NatLabel { event, result }).inc();
    }

    /// Connections beyond the cap answered only with a goodbye and referrals.
    pub fn referred_total(&self) -> u64 {
        self.referred.get()
    }

    /// Connections refused before their handshake, or dials of ours not made, for `reason`
    /// (`mycel_connections_refused_total`).
    pub fn refused_total(&self, reason: &'static str) -> u64 {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Inbound raw streams dropped before their acceptor took them
    /// (`mycel_inbound_streams_dropped_total`).
    pub fn streams_dropped_total(&self) -> u64 {
        self.streams_dropped.get()
    }

    /// Inbound connections closed at the cap to make room for a newcomer.
    pub fn evicted_total(&self) -> u64 {
        self.evicted.get()
    }

    /// Connections this node closed on purpose with a goodbye (at its cap, or shedding).
    pub fn goodbyes_sent_total(&self) -> u64 {
        self.goodbyes_sent.get()
    }

    /// Goodbyes (with referrals) received from peers closing a connection.
    pub fn goodbyes_received_total(&self) -> u64 {
        self.goodbyes_received.get()
    }

    /// Inbound connections refused before their handshake for `reason` (see
    /// `mycel_connections_refused_total`).
    pub fn connections_refused(&self, reason: &'static str) -> u64 {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Announcements made to refute reports that this node is down.
    pub fn refutations_total(&self) -> u64 {
        self.refutations.get()
    }

    /// Down reports neither counted nor passed on.
    pub fn down_reports_ignored_total(&self) -> u64 {
        self.reports_ignored.get()
    }

    /// Peers evicted from the full membership table.
    pub fn members_evicted_total(&self) -> u64 {
        self.members_evicted.get()
    }

    /// Down reports about other peers counted toward their quorum.
    pub fn down_reports_counted_total(&self) -> u64 {
        self.reports_counted.get()
    }

    /// Probes of peers held alive without a connection that ended with `outcome`
    /// (`answered`, `unanswered` or `inconclusive`).
    pub fn probes_total(&self, outcome: &'static str) -> u64 {
        self.probes.get_or_create(&OutcomeLabel { outcome }).get()
    }

    /// Peers declared failed for `reason` (`missed_pings`, `unreachable`, `expired`,
    /// `reported` or `unanswered`).
    pub fn peer_failures_total(&self, reason: &'static str) -> u64 {
        self.peer_failures
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    /// Down reports this node published.
    pub fn down_reports_sent_total(&self) -> u64 {
        self.down_reports_sent.get()
    }

    /// Total rejected messages (all reasons).
    pub fn rejected_total(&self) -> u64 {
        Rejection::ALL
            .iter()
            .map(|r| {
                self.rejected
                    .get_or_create(&ReasonLabel { reason: r.label() })
                    .get()
            })
            .sum()
    }

    /// NAT events of one kind and result (the labels of `mycel_nat_events_total`).
    pub fn nat_events(&self, event: &'static str, result: &'static str) -> u64 {
        self.nat.get_or_create(&NatLabel { event, result }).get()
    }

    /// Rejected messages for one reason.
    pub fn rejected_for(&self, reason: Rejection) -> u64 {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .get()
    }
}
