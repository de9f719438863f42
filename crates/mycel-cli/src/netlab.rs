//! Network namespaces for `mycel bench nat`, `mycel bench partition` and the tests that need
//! real kernels' networking between `mycel` processes: two namespaces joined by a veth pair
//! (whose link can turn into a blackhole), and a lab with NAT routers (nftables translation).
//! Needs root; the namespaces are deleted on drop.

use std::process::Command;

/// Runs `program args`, its stderr in the error.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

/// Moves the calling thread into the network namespace `name` (made by `ip netns add`), as
/// `ip netns exec` does for a process: the sockets it opens from then on live there. Only
/// this thread moves; run it on a thread of its own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn enter(name: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{name}"))
        .map_err(|e| format!("network namespace {name}: {e}"))?;
    // SAFETY: setns only reads the descriptor, open for the whole call, and changes nothing
    // but this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "entering network namespace {name}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// See the Linux version: elsewhere there are no network namespaces to enter.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn enter(name: &str) -> Result<(), String> {
    Err(format!("network namespace {name}: needs Linux"))
}

/// Two homes behind NAT routers on a small "internet": five namespaces.
///
/// ```text
///  home A 192.168.51.2 ── router A (NAT) 198.51.100.2 ──┐
///                                                      internet: 198.51.100.1, 203.0.113.1
///  home B 192.168.52.2 ── router B (NAT) 203.0.113.2  ──┘
/// ```
///
/// The internet uses documentation ranges (TEST-NET-2 and -3), which nodes count as global
/// addresses as they would real ones, inside namespaces nothing outside can reach. It routes
/// between the routers and knows no route to either home: a home is reached only through its
/// router's translation. A symmetric router (`symmetric[0]` for router A, `[1]` for B) gives
/// every connection a new random port (`masquerade random`), as carrier-grade and some
/// corporate NATs do, where hole punching cannot work; otherwise a connection keeps its port
/// (a home router's endpoint-independent mapping, where it can). Removed on drop.
pub struct NatLab {
    /// internet, router A, router B, home A, home B.
    pub names: [String; 5],
}

/// The internet's addresses, on the side of router A and of router B.
pub const INTERNET_ADDRS: [&str; 2] = ["198.51.100.1", "203.0.113.1"];

/// Index of the internet namespace in [`NatLab::names`].
pub const INTERNET: usize = 0;
/// Index of home A.
pub const HOME_A: usize = 3;
/// Index of home B.
pub const HOME_B: usize = 4;

impl Drop for NatLab {
    fn drop(&mut self) {
        delete_namespaces(&self.names);
    }
}

/// Deletes the named namespaces (with the interfaces in them), ignoring those already gone.
pub fn delete_namespaces(names: &[String]) {
    for name in names {
        let _ = ip(&["netns", "del", name]);
    }
}

impl NatLab {
    pub fn new(label: &str, symmetric: [bool; 2]) -> Result<Self, String> {
        let tag = std::process::id() % 100_000;
        let names = ["i", "ra", "rb", "ha", "hb"].map(|n| format!("mycel-{label}{n}-{tag}"));
        let lab = NatLab { names };
        for name in &lab.names {
            // Left by a run that was killed before it could clean up.
            let _ = ip(&["netns", "del", name]);
            ip(&["netns", "add", name])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        let link = |a: usize, b: usize, dev_a: &str, dev_b: &str, addr_a: &str, addr_b: &str| {
            let (da, db) = (
                format!("{label}{dev_a}{tag}"),
                format!("{label}{dev_b}{tag}"),
            );
            ip(&["link", "add", &da, "type", "veth", "peer", "name", &db])?;
            for (ns, dev, addr) in [(a, &da, addr_a), (b, &db, addr_b)] {
                ip(&["link", "set", dev, "netns", &lab.names[ns]])?;
                ip(&["-n", &lab.names[ns], "addr", "add", addr, "dev", dev])?;
                ip(&["-n", &lab.names[ns], "link", "set", dev, "up"])?;
            }
            Ok::<_, String>(())
        };
        link(0, 1, "wia", "wra", "198.51.100.1/24", "198.51.100.2/24")?;
        link(0, 2, "wib", "wrb", "203.0.113.1/24", "203.0.113.2/24")?;
        link(1, 3, "lra", "lha", "192.168.51.1/24", "192.168.51.2/24")?;
        link(2, 4, "lrb", "lhb", "192.168.52.1/24", "192.168.52.2/24")?;
        for ns in 0..3 {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &lab.names[ns],
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            )?;
        }
        ip(&[
            "-n",
            &lab.names[1],
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ])?;
        ip(&[
            "-n",
            &lab.names[2],
            "route",
            "add",
            "default",
            "via",
            "203.0.113.1",
        ])?;
        ip(&[
            "-n",
            &lab.names[3],
            "route",
            "add",
            "default",
            "via",
            "192.168.51.1",
        ])?;
        ip(&[
            "-n",
            &lab.names[4],
            "route",
            "add",
            "default",
            "via",
            "192.168.52.1",
        ])?;
        for (ns, wan) in [
            (1, format!("{label}wra{tag}")),
            (2, format!("{label}wrb{tag}")),
        ] {
            let symmetric = symmetric[ns - 1];
            let nft = ["netns", "exec", lab.names[ns].as_str(), "nft"];
            run("ip", &[&nft[..], &["add", "table", "ip", "nat"]].concat())?;
            run(
                "ip",
                &[
                    &nft[..],
                    &[
                        "add",
                        "chain",
                        "ip",
                        "nat",
                        "post",
                        "{",
                        "type",
                        "nat",
                        "hook",
                        "postrouting",
                        "priority",
                        "100",
                        ";",
                        "}",
                    ],
                ]
                .concat(),
            )?;
            let mut rule = vec![
                "add",
                "rule",
                "ip",
                "nat",
                "post",
                "oifname",
                &wan,
                "masquerade",
            ];
            if symmetric {
                rule.push("random");
            }
            run("ip", &[&nft[..], &rule[..]].concat())?;
            // A home router's firewall: nothing new comes in from the internet. Dropped before
            // conntrack confirms it, an unsolicited packet leaves no entry behind, so a hole
            // punched a moment later keeps its port (without this rule the router would pick
            // another port for it, as behind a symmetric NAT).
            run("ip", &[&nft[..], &["add", "table", "ip", "fw"]].concat())?;
            run(
                "ip",
                &[
                    &nft[..],
                    &[
                        "add", "chain", "ip", "fw", "in", "{", "type", "filter", "hook", "input",
                        "priority", "0", ";", "}",
                    ],
                ]
                .concat(),
            )?;
            run(
                "ip",
                &[
                    &nft[..],
                    &[
                        "add", "rule", "ip", "fw", "in", "iifname", &wan, "ct", "state", "new",
                        "drop",
                    ],
                ]
                .concat(),
            )?;
        }
        Ok(lab)
    }

    /// `ip netns exec NAME`, to prefix a command run in namespace `i` (for the tests; the
    /// benchmarks start nodes through `bench::lab`).
    #[allow(dead_code)]
    pub fn exec(&self, i: usize) -> [&str; 4] {
        ["ip", "netns", "exec", self.names[i].as_str()]
    }
}

/// Two namespaces, `names[i]` holding the veth end `devs[i]` with the address `addrs[i]` of
/// 10.213.`net`.0/24. Removed on drop.
pub struct VethPair {
    pub names: [String; 2],
    pub devs: [String; 2],
    pub addrs: [String; 2],
}

impl Drop for VethPair {
    fn drop(&mut self) {
        delete_namespaces(&self.names);
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

    /// `ip netns exec NAME`, to prefix a command run in namespace `i` (for the tests; the
    /// benchmarks start nodes through `bench::lab`).
    #[allow(dead_code)]
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
