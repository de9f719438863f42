//! Network namespaces joined by a veth pair, for tests that need real kernels' networking
//! between `mycel` processes (mDNS, partitions). Needs root; the namespaces are deleted on drop.

// The NAT lab and the command helpers are shared with `mycel bench nat`.
#[path = "../../src/netlab.rs"]
mod netlab;
#[allow(unused_imports)]
pub use netlab::{ip, run, NatLab, HOME_A, HOME_B, INTERNET, INTERNET_ADDRS};

/// Two namespaces, `names[i]` holding the veth end `devs[i]` with the address `addrs[i]` of
/// 10.213.`net`.0/24. Removed on drop.
pub struct VethPair {
    pub names: [String; 2],
    pub devs: [String; 2],
    pub addrs: [String; 2],
}

impl Drop for VethPair {
    fn drop(&mut self) {
        netlab::delete_namespaces(&self.names);
    }
}

impl VethPair {
    /// Namespaces named after `label` and this process, on subnet 10.213.`net`.0/24.
    pub fn new(label: &str, net: u8) -> Result<Self, String> {
        let tag = std::process::id() % 100_000;
        let pair = VethPair {
            names: [
                format!("mycel-{label}a-{tag}"),
                format!("mycel-{label}b-{tag}"),
            ],
            devs: [format!("v{label}a{tag}"), format!("v{label}b{tag}")],
            addrs: [format!("10.213.{net}.1"), format!("10.213.{net}.2")],
        };
        let [na, nb] = &pair.names;
        let [va, vb] = &pair.devs;
        ip(&["netns", "add", na])?;
        ip(&["netns", "add", nb])?;
        ip(&["link", "add", va, "type", "veth", "peer", "name", vb])?;
        ip(&["link", "set", va, "netns", na])?;
        ip(&["link", "set", vb, "netns", nb])?;
        for i in 0..2 {
            let (name, dev) = (&pair.names[i], &pair.devs[i]);
            let addr = format!("{}/24", pair.addrs[i]);
            ip(&["-n", name, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", name, "link", "set", dev, "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            // A fresh namespace has no route for multicast; a LAN host has its default route.
            ip(&["-n", name, "route", "add", "default", "dev", dev])?;
        }
        Ok(pair)
    }

    /// `ip netns exec NAME`, to prefix a command run in namespace `i`.
    pub fn exec(&self, i: usize) -> [&str; 4] {
        ["ip", "netns", "exec", self.names[i].as_str()]
    }

    /// Drops every packet arriving over the veth in both namespaces (nftables, input hook):
    /// a blackhole, as when a link fails silently; senders see nothing but silence.
    pub fn blackhole(&self) -> Result<(), String> {
        for i in 0..2 {
            let name = self.names[i].as_str();
            let dev = self.devs[i].as_str();
            let ns = ["netns", "exec", name, "nft"];
            run("ip", &[&ns[..], &["add", "table", "inet", "cut"]].concat())?;
            run(
                "ip",
                &[
                    &ns[..],
                    &[
                        "add", "chain", "inet", "cut", "input", "{", "type", "filter", "hook",
                        "input", "priority", "0", ";", "}",
                    ],
                ]
                .concat(),
            )?;
            run(
                "ip",
                &[
                    &ns[..],
                    &[
                        "add", "rule", "inet", "cut", "input", "iifname", dev, "drop",
                    ],
                ]
                .concat(),
            )?;
        }
        Ok(())
    }

    /// Undoes [`Self::blackhole`].
    pub fn restore(&self) -> Result<(), String> {
        for name in &self.names {
            run(
                "ip",
                &[
                    "netns", "exec", name, "nft", "delete", "table", "inet", "cut",
                ],
            )?;
        }
        Ok(())
    }
}
