//! Mycel's libp2p driver.
//!
//! One task, the [`event_loop`], owns the libp2p `Swarm` and the node's pure membership state
//! (`mycel_core::membership`); the rest of the program talks to it through a bounded command
//! channel ([`NetHandle`]) and hears back through a bounded event channel ([`NetEvent`]). This
//! is the shape of rust-libp2p's file-sharing example and of commonware's actors.
//!
//! Protocols (all under private protocol names, so we never join a public network):
//! - TCP and QUIC transports (or the in-process memory transport for large benchmarks); TLS 1.3
//!   preferring AES-GCM on TCP ([`tls`]; Noise still accepted), Yamux;
//! - Kademlia `/mycel/kad/1.0.0` with periodic random walks, identify `/mycel/id/1.0.0` whose
//!   listen addresses feed the routing table (referrals), ping for liveness and RTT, mDNS;
//! - gossipsub topic `mycel/statements/2` carrying signed announcements and down reports;
//! - request-response `/mycel/sync/4` for anti-entropy snapshots and echo round trips;
//! - raw streams `/mycel/task/4` for inference tasks, `/mycel/blob/1` for blobs and
//!   `/mycel/train/2` for federated training rounds ([`task`]), opened and accepted through
//!   the [`NetHandle`] without passing through the event loop;
//! - Kademlia provider records keyed by the content ids of the models a node serves.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod accept;
mod autonat;
mod behaviour;
mod cap;
mod config;
mod event_loop;
mod handle;
mod metrics;
pub mod mux;
mod protocol;
pub mod task;
pub mod tls;

pub use config::{Limits, NatConfig, NetConfig, RelayServer, Timing, TransportKind};
pub use handle::{now_ms, spawn, NetError, NetEvent, NetHandle, NetStatus, STREAM_REASK};
pub use metrics::NetMetrics;

pub use libp2p::{Multiaddr, PeerId};
pub use prometheus_client::registry::Registry;
