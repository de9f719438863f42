//! UPnP port mapping with a real gateway: a `mycel` node in a home behind a router that runs
//! miniupnpd (a UPnP IGD and NAT-PMP gateway) finds the gateway, gets its port mapped on the
//! router's internet address, announces that address, calls itself public, and is dialled
//! from the internet through the mapping. See `netlab::UpnpLab` for the namespaces.
//!
//! Needs root for `ip netns` and `nft`, and miniupnpd (with its nftables backend); where they
//! are missing the test says so and returns, unless MYCEL_REQUIRE_NETNS=1 (set by CI), where
//! that is a failure. MYCEL_TEST_LOG=info shows the nodes' logs ("gateway mapped a port").

mod common;

use std::time::{Duration, Instant};

use common::netns::{id_of, lab_node, metrics, nat_events, peer, status, UpnpLab};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);
/// The home node's port: libp2p-upnp asks the gateway for the same port outside.
const HOME_PORT: u16 = 4001;

/// Polls `condition` every 100 ms until it holds; after [`LIMIT`] fails with `what` and what
/// `explain` shows then (statuses, the router's rules, the gateway's log).
fn wait(what: &str, mut condition: impl FnMut() -> bool, explain: impl Fn() -> String) {
    let deadline = Instant::now() + LIMIT;
    while !condition() {
        if Instant::now() >= deadline {
            panic!("timed out waiting until {what}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the JSON list `addrs` holds an address that starts with `addr`.
fn lists(addrs: &Value, addr: &str) -> bool {
    addrs
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x.as_str().unwrap_or("").starts_with(addr)))
}

#[test]
fn node_behind_a_upnp_router_maps_its_port_and_is_dialled_from_the_internet() {
    const TEST: &str = "node_behind_a_upnp_router_maps_its_port_and_is_dialled_from_the_internet";
    let lab = match UpnpLab::new("") {
        Ok(lab) => lab,
        Err(e) => {
            mycel_ml::fixtures::skip_unless_required(
                TEST,
                "MYCEL_REQUIRE_NETNS",
                &format!("cannot build the namespaces and the UPnP gateway ({e})"),
            );
            return;
        }
    };
    let root = tempfile::tempdir().unwrap();
    let inet = UpnpLab::INTERNET;
    let mapped = format!("/ip4/{}/tcp/{HOME_PORT}", UpnpLab::WAN_ADDR);

    // P on the internet; no gateway there to ask.
    let p = lab_node(&lab, inet, &root.path().join("p"), 4001, &["--no-upnp"]);
    let p_id = id_of(&lab, &p);

    // H at home, listening on 0.0.0.0 (192.168.77.2 and loopback): UPnP stays on, and
    // libp2p-upnp asks the gateway to map its private address's TCP and UDP ports.
    let boot = format!("/ip4/{}/tcp/4001/p2p/{p_id}", UpnpLab::INTERNET_ADDR);
    let h = lab_node(
        &lab,
        UpnpLab::HOME,
        &root.path().join("h"),
        HOME_PORT,
        &["--bootstrap", &boot],
    );
    let h_id = id_of(&lab, &h);
    let h_explain = || {
        format!(
            "H's status: {}\nH's UPnP events: no_gateway {}, non_routable {}\n\
             router's forwards:\n{}\nminiupnpd's log:\n{}",
            status(&lab, &h)["network"],
            nat_events(&lab, &h, "upnp", "no_gateway"),
            nat_events(&lab, &h, "upnp", "non_routable"),
            lab.gateway_forwards().unwrap_or_else(|e| e),
            lab.gateway_log()
        )
    };

    // 1. The gateway forwards the router's port to H: a dnat rule in the router's ruleset.
    let forward = format!("{}:{HOME_PORT}", UpnpLab::HOME_ADDR);
    wait(
        &format!("the gateway forwards port {HOME_PORT} to {forward}"),
        || {
            lab.gateway_forwards()
                .is_ok_and(|rules| rules.contains("dnat") && rules.contains(&forward))
        },
        h_explain,
    );

    // 2. H heard of it from the gateway (libp2p-upnp's event, counted).
    wait(
        "H counts a mapping made by the gateway",
        || nat_events(&lab, &h, "upnp", "mapped") >= 1,
        || format!("{}\nH's metrics:\n{}", h_explain(), metrics(&lab, &h)),
    );

    // 3. The mapped address is confirmed: H calls itself public and announces it.
    wait(
        &format!("H is public and announces {mapped}"),
        || {
            let net = &status(&lab, &h)["network"];
            net["reachability"] == "public" && lists(&net["announced_addrs"], &mapped)
        },
        h_explain,
    );

    // 4. P has H's announcement: alive, public, at the mapped address.
    wait(
        &format!("P sees H alive and public at {mapped}"),
        || {
            let info = peer(&lab, &p, &h_id);
            info["state"] == "alive"
                && info["reachability"] == "public"
                && lists(&info["addrs"], &mapped)
        },
        || {
            format!(
                "P's record of H: {}\n{}",
                peer(&lab, &p, &h_id),
                h_explain()
            )
        },
    );

    // 5. The mapping carries inbound traffic: P2, a fresh node on the internet that knows only
    // the mapped address (no mDNS, no other peer), joins through it. Nothing else leads to H:
    // the internet has no route to the home, and H cannot dial a node it has not heard of.
    let boot = format!("{mapped}/p2p/{h_id}");
    let p2 = lab_node(
        &lab,
        inet,
        &root.path().join("p2"),
        4002,
        &["--no-upnp", "--bootstrap", &boot],
    );
    wait(
        &format!("P2, bootstrapped only with {boot}, sees H alive over a direct connection"),
        || {
            let info = peer(&lab, &p2, &h_id);
            info["state"] == "alive" && info["connected"] == true && info["link"] == "direct"
        },
        || {
            format!(
                "P2's record of H: {}\nP2's status: {}\n{}",
                peer(&lab, &p2, &h_id),
                status(&lab, &p2)["network"],
                h_explain()
            )
        },
    );
}
