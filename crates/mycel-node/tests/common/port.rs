//! Ports for nodes under test. Shared by the test suites of mycel-node and mycel-cli.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port of the range tests pick from.
const LOW: u32 = 10_000;

/// A TCP port on 127.0.0.1 that was free a moment ago, to hand to a node that binds it later.
///
/// Picked below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), so the source
/// port of some test's outgoing connection cannot take it in between (a port from binding
/// `:0` can, and CI once saw a node fail to bind its API that way), and distinct within one
/// test process, so two tests running in parallel do not pick the same one.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let high = ephemeral_low().max(LOW + 1_000);
    let span = high - LOW;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + offset) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in {LOW}..{high}");
}

/// The first port of the kernel's ephemeral range (Linux's default when it cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
