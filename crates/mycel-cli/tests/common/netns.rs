//! Network namespaces for tests that need real kernels' networking between `mycel` processes
//! (mDNS, partitions, NAT). Needs root; the namespaces are deleted on drop.

// The namespaces and the command helpers are shared with `mycel bench nat` and `bench partition`.
#[path = "../../src/netlab.rs"]
mod netlab;
#[allow(unused_imports)]
pub use netlab::{ip, run, NatLab, VethPair, HOME_A, HOME_B, INTERNET, INTERNET_ADDRS};
