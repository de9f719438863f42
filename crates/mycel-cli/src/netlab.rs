//! Network namespaces for `mycel bench nat`, `mycel bench partition` and the tests that need
//! real kernels' networking between `mycel` processes: two namespaces joined by a veth pair
//! (whose link can turn into a blackhole), a lab with NAT routers (nftables translation), and
//! a home behind a router with a UPnP gateway (miniupnpd). Needs root; the namespaces are
//! deleted on drop.

use std::process::{Command, Stdio};

/// Runs `program args`, its stderr in the error.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    output(program, args).map(|_| ())
}

/// Runs `program args`: its stdout, or its stderr in the error.
pub fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// In namespace `ns`, adds the nftables table and input-hook chain `[family, table, chain]`
/// and one rule per entry of `rules` (the words after `add rule FAMILY TABLE CHAIN`).
pub fn nft_input_rules(ns: &str, names: [&str; 3], rules: &[&[&str]]) -> Result<(), String> {
    let [family, table, chain] = names;
    let nft = ["netns", "exec", ns, "nft"];
    run("ip", &[&nft[..], &["add", "table", family, table]].concat())?;
    let hook = [
        "add", "chain", family, table, chain, "{", "type", "filter", "hook", "input", "priority",
        "0", ";", "}",
    ];
    run("ip", &[&nft[..], &hook[..]].concat())?;
    for rule in rules {
        run(
            "ip",
            &[&nft[..], &["add", "rule", family, table, chain][..], rule].concat(),
        )?;
    }
    Ok(())
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

/// Adds the namespace `name` with its loopback up, first deleting one of that name left by a
/// run that was killed before it could clean up.
fn add_namespace(name: &str) -> Result<(), String> {
    let _ = ip(&["netns", "del", name]);
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Joins the namespaces `ns_a` and `ns_b` by a veth pair whose ends `dev_a` and `dev_b` (made
/// here, then moved; names unique on this host, at most 15 bytes) get `addr_a` and `addr_b`
/// (with their prefix length) and come up.
fn veth(
    ns_a: &str,
    ns_b: &str,
    dev_a: &str,
    dev_b: &str,
    addr_a: &str,
    addr_b: &str,
) -> Result<(), String> {
    ip(&["link", "add", dev_a, "type", "veth", "peer", "name", dev_b])?;
    for (ns, dev, addr) in [(ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)] {
        ip(&["link", "set", dev, "netns", ns])?;
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    Ok(())
}

/// Lets namespace `name` route between its interfaces.
fn forward(name: &str) -> Result<(), String> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )
}

impl NatLab {
    pub fn new(label: &str, symmetric: [bool; 2]) -> Result<Self, String> {
        let tag = std::process::id() % 100_000;
        let names = ["i", "ra", "rb", "ha", "hb"].map(|n| format!("mycel-{label}{n}-{tag}"));
        let lab = NatLab { names };
        for name in &lab.names {
            add_namespace(name)?;
        }
        let link = |a: usize, b: usize, dev_a: &str, dev_b: &str, addr_a: &str, addr_b: &str| {
            veth(
                &lab.names[a],
                &lab.names[b],
                &format!("{label}{dev_a}{tag}"),
                &format!("{label}{dev_b}{tag}"),
                addr_a,
                addr_b,
            )
        };
        link(0, 1, "wia", "wra", "198.51.100.1/24", "198.51.100.2/24")?;
        link(0, 2, "wib", "wrb", "203.0.113.1/24", "203.0.113.2/24")?;
        link(1, 3, "lra", "lha", "192.168.51.1/24", "192.168.51.2/24")?;
        link(2, 4, "lrb", "lhb", "192.168.52.1/24", "192.168.52.2/24")?;
        for ns in 0..3 {
            forward(&lab.names[ns])?;
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
            let rule = ["iifname", wan.as_str(), "ct", "state", "new", "drop"];
            nft_input_rules(&lab.names[ns], ["ip", "fw", "in"], &[&rule])?;
        }
        Ok(lab)
    }

    /// `ip netns exec NAME`, to prefix a command run in namespace `i` (for the tests; the
    /// benchmarks start nodes through `bench::lab`).
    #[allow(dead_code)]
    pub fn exec(&self, i: usize) -> [&str; 4] {
        ["ip", "netns", "exec", self.names[i].as_str()]
    }

    /// Drops every new connection to `port` (TCP and UDP) arriving in namespace `i`
    /// (nftables, input hook), as a black hole does: whoever dials there hears nothing, while
    /// what a node on that port dials out itself still flows. For the tests.
    #[allow(dead_code)]
    pub fn black_hole_port(&self, i: usize, port: u16) -> Result<(), String> {
        let port = port.to_string();
        let rule = |proto| [proto, "dport", port.as_str(), "ct", "state", "new", "drop"];
        nft_input_rules(
            &self.names[i],
            ["inet", "bh", "input"],
            &[&rule("tcp"), &rule("udp")],
        )
    }
}

/// A home behind a router that runs a UPnP IGD gateway (miniupnpd, nftables backend) on a
/// small "internet": three namespaces and the gateway's process.
///
/// ```text
///  home 192.168.77.2 ── router (NAT, miniupnpd) 11.22.33.2 ── internet 11.22.33.1
/// ```
///
/// The internet is 11.22.33.0/24, not a documentation range as in [`NatLab`]: miniupnpd will
/// not serve a WAN address that is private or reserved ("not public routable"), and
/// libp2p-upnp ignores a gateway whose external address is private, shared, documentation or
/// benchmarking. The namespaces have no link to the host, so nothing is ever sent to the real
/// holders of that range. The router masquerades the home's traffic and drops what comes in
/// from the internet unless a mapping lets it through: miniupnpd adds a dnat rule and an
/// accept rule to chains of the router's ruleset. It makes no tables or chains itself (and
/// Debian's nft_init.sh does not work on bookworm), so the lab loads them. Removed on drop:
/// the gateway killed, the namespaces deleted with the rules it left, its configuration and
/// leases with the temporary directory.
#[allow(dead_code)] // the tests use it, the benchmarks do not
pub struct UpnpLab {
    /// internet, router, home.
    pub names: [String; 3],
    /// The router's veth end on the internet side (miniupnpd's external interface).
    wan: String,
    /// The router's veth end on the home side (where miniupnpd listens).
    lan: String,
    gateway: Option<std::process::Child>,
    /// The router's ruleset, miniupnpd's configuration, pid file, leases and log.
    dir: tempfile::TempDir,
}

impl Drop for UpnpLab {
    fn drop(&mut self) {
        if let Some(mut gateway) = self.gateway.take() {
            let _ = gateway.kill();
            let _ = gateway.wait();
        }
        delete_namespaces(&self.names);
    }
}

#[allow(dead_code)] // the tests use it, the benchmarks do not
impl UpnpLab {
    /// Index of the internet namespace in [`UpnpLab::names`].
    pub const INTERNET: usize = 0;
    /// Index of the router.
    pub const ROUTER: usize = 1;
    /// Index of the home.
    pub const HOME: usize = 2;
    /// The internet's address.
    pub const INTERNET_ADDR: &'static str = "11.22.33.1";
    /// The router's address on the internet: where the gateway maps ports.
    pub const WAN_ADDR: &'static str = "11.22.33.2";
    /// The home's address behind the router.
    pub const HOME_ADDR: &'static str = "192.168.77.2";
    /// The router's address on the home's side.
    const LAN_ADDR: &'static str = "192.168.77.1";

    /// Namespaces named after `label` (6 bytes at most: the veth names hold it) and this
    /// process, and miniupnpd running in the router, ready to answer discovery. An error
    /// (nothing left behind) when miniupnpd is not installed or the namespaces cannot be made
    /// (not root).
    pub fn new(label: &str) -> Result<Self, String> {
        let miniupnpd = Self::find_program("miniupnpd")
            .ok_or("miniupnpd is not installed (apt-get install miniupnpd miniupnpd-nftables)")?;
        let tag = std::process::id() % 100_000;
        let dir = tempfile::Builder::new()
            .prefix("mycel-upnp-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let mut lab = UpnpLab {
            names: ["i", "r", "h"].map(|n| format!("mycel-upnp{label}{n}-{tag}")),
            wan: format!("up{label}wr{tag}"),
            lan: format!("up{label}lr{tag}"),
            gateway: None,
            dir,
        };
        for name in &lab.names {
            add_namespace(name)?;
        }
        let [inet, rtr, home] = lab.names.clone();
        veth(
            &inet,
            &rtr,
            &format!("up{label}wi{tag}"),
            &lab.wan,
            &format!("{}/24", Self::INTERNET_ADDR),
            &format!("{}/24", Self::WAN_ADDR),
        )?;
        veth(
            &rtr,
            &home,
            &lab.lan,
            &format!("up{label}lh{tag}"),
            &format!("{}/24", Self::LAN_ADDR),
            &format!("{}/24", Self::HOME_ADDR),
        )?;
        forward(&rtr)?;
        // The home's default route also carries the SSDP search (multicast) to the router.
        ip(&[
            "-n",
            &home,
            "route",
            "add",
            "default",
            "via",
            Self::LAN_ADDR,
        ])?;

        let path = |name: &str| lab.dir.path().join(name);
        let write = |file: &std::path::Path, text: String| {
            std::fs::write(file, text).map_err(|e| format!("{}: {e}", file.display()))
        };
        let ruleset = path("router.nft");
        write(&ruleset, Self::ruleset(&lab.wan, &lab.lan))?;
        let ruleset = ruleset.to_str().ok_or("temporary directory: not UTF-8")?;
        run("ip", &["netns", "exec", &rtr, "nft", "-f", ruleset])?;
        // Interfaces up and addressed first: miniupnpd reads them when it starts.
        let conf = path("miniupnpd.conf");
        write(
            &conf,
            Self::gateway_conf(&lab.wan, &lab.lan, tag, &path("upnp.leases")),
        )?;
        let log = std::fs::File::create(path("miniupnpd.log"))
            .map_err(|e| format!("miniupnpd's log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("miniupnpd's log: {e}"))?;
        // `ip netns exec` execs miniupnpd (no fork): killing this child kills the gateway.
        let gateway = Command::new("ip")
            .args(["netns", "exec", rtr.as_str()])
            .arg(&miniupnpd)
            .arg("-d") // foreground, logging to stderr
            .arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(path("miniupnpd.pid"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", miniupnpd.display()))?;
        lab.gateway = Some(gateway);
        lab.wait_gateway_ready()?;
        Ok(lab)
    }

    /// Waits (10 s at most) until miniupnpd listens: SSDP's UDP port 1900 bound (with its
    /// multicast membership) and its HTTP server (on a random port) listening. libp2p-upnp
    /// searches for a gateway once, when the node starts: a node started earlier would never
    /// find this one.
    fn wait_gateway_ready(&mut self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let rtr = self.names[Self::ROUTER].clone();
        let sockets =
            |flags: &str| output("ip", &["netns", "exec", &rtr, "ss", flags]).unwrap_or_default();
        loop {
            let exited = self
                .gateway
                .as_mut()
                .and_then(|g| g.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "miniupnpd exited ({status}):\n{}",
                    self.gateway_log()
                ));
            }
            // The router runs nothing else: any TCP listener there is miniupnpd's.
            if sockets("-lnu").contains(":1900 ") && sockets("-lnt").contains("LISTEN") {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "miniupnpd does not listen after 10 s:\n{}",
                    self.gateway_log()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// What miniupnpd logged so far (it runs with -d: everything, to stderr).
    pub fn gateway_log(&self) -> String {
        let file = self.dir.path().join("miniupnpd.log");
        std::fs::read_to_string(&file).unwrap_or_else(|e| format!("({}: {e})", file.display()))
    }

    /// The port forwards the gateway made: the router's chain of its dnat rules.
    pub fn gateway_forwards(&self) -> Result<String, String> {
        let rtr = self.names[Self::ROUTER].as_str();
        output(
            "ip",
            &[
                "netns",
                "exec",
                rtr,
                "nft",
                "list",
                "chain",
                "inet",
                "filter",
                "prerouting_miniupnpd",
            ],
        )
    }

    /// `ip netns exec NAME`, to prefix a command run in namespace `i`.
    pub fn exec(&self, i: usize) -> [&str; 4] {
        ["ip", "netns", "exec", self.names[i].as_str()]
    }

    /// The router's firewall and NAT, with the empty chains miniupnpd fills: port forwards
    /// (dnat) in `prerouting_miniupnpd`, the accepts that let them through the firewall in
    /// `miniupnpd`. Nothing new comes in from the internet otherwise.
    fn ruleset(wan: &str, lan: &str) -> String {
        format!(
            r#"flush ruleset
table inet filter {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "{lan}" oifname "{wan}" accept
        jump miniupnpd
    }}
    chain miniupnpd {{ }}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        oifname "{wan}" masquerade
    }}
    chain prerouting_miniupnpd {{ }}
    chain postrouting_miniupnpd {{ }}
}}
"#
        )
    }

    /// miniupnpd's configuration: UPnP IGD and NAT-PMP on the LAN side, mappings of ports
    /// 1024 and up for the home's hosts only (each for itself: secure mode), rules in the
    /// chains of [`Self::ruleset`], leases in `leases`.
    fn gateway_conf(wan: &str, lan: &str, tag: u32, leases: &std::path::Path) -> String {
        format!(
            "ext_ifname={wan}
listening_ip={lan}
http_port=0
enable_natpmp=yes
enable_upnp=yes
ipv6_disable=yes
secure_mode=yes
system_uptime=no
notify_interval=60
clean_ruleset_interval=600
uuid=6d796365-6c75-4e50-8000-{tag:012x}
lease_file={}
upnp_table_name=filter
upnp_nat_table_name=filter
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
allow 1024-65535 192.168.77.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
",
            leases.display()
        )
    }

    /// Where the program `name` is installed: on PATH, or in an sbin directory (where Debian
    /// puts miniupnpd) that a test's environment may leave off PATH.
    fn find_program(name: &str) -> Option<std::path::PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(
                ["/usr/local/sbin", "/usr/sbin", "/sbin"]
                    .into_iter()
                    .map(std::path::PathBuf::from),
            )
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }
}

/// A hub namespace (`names[0]`) whose bridge joins `n` leaf namespaces, each on its own veth:
/// every namespace has its own IPv4 address of 10.214.`net`.0/24 and an IPv6 address in its own
/// /64 of fd6d:`net` (in hex):0::/48, all on one link. Distinct source addresses of one operator's
/// block, which one namespace cannot show (libp2p does not bind a dial to the address a node
/// listens on). For the tests; removed on drop.
#[allow(dead_code)]
pub struct Star {
    pub names: Vec<String>,
    pub addrs4: Vec<String>,
    pub addrs6: Vec<String>,
}

impl Drop for Star {
    fn drop(&mut self) {
        delete_namespaces(&self.names);
    }
}

#[allow(dead_code)]
impl Star {
    /// The hub and `leaves` leaf namespaces, named after `label` and this process.
    pub fn new(label: &str, net: u8, leaves: usize) -> Result<Self, String> {
        let tag = std::process::id() % 100_000;
        let star = Star {
            names: (0..=leaves)
                .map(|i| format!("mycel-{label}{i}-{tag}"))
                .collect(),
            addrs4: (0..=leaves)
                .map(|i| format!("10.214.{net}.{}", i + 1))
                .collect(),
            addrs6: (0..=leaves)
                .map(|i| format!("fd6d:{net:x}:0:{i:x}::1"))
                .collect(),
        };
        let veth = |i: usize| (format!("s{label}{i}h{tag}"), format!("s{label}{i}l{tag}"));
        let built = (|| {
            let hub = &star.names[0];
            add_namespace(hub)?;
            ip(&["-n", hub, "link", "add", "hub", "type", "bridge"])?;
            ip(&["-n", hub, "link", "set", "hub", "up"])?;
            for (i, name) in star.names.iter().enumerate() {
                let dev = if i == 0 {
                    "hub".to_owned()
                } else {
                    add_namespace(name)?;
                    let (up, down) = veth(i);
                    ip(&["link", "add", &up, "type", "veth", "peer", "name", &down])?;
                    ip(&["link", "set", &up, "netns", hub])?;
                    ip(&["-n", hub, "link", "set", &up, "master", "hub", "up"])?;
                    ip(&["link", "set", &down, "netns", name])?;
                    ip(&["-n", name, "link", "set", &down, "up"])?;
                    down
                };
                let v4 = format!("{}/24", star.addrs4[i]);
                let v6 = format!("{}/48", star.addrs6[i]);
                ip(&["-n", name, "addr", "add", &v4, "dev", &dev])?;
                // No duplicate address detection: the address is usable at once.
                ip(&["-n", name, "addr", "add", &v6, "dev", &dev, "nodad"])?;
            }
            Ok(())
        })();
        if let Err(e) = built {
            // The namespaces go with `star`; a veth not yet moved into one is left here.
            for i in 1..star.names.len() {
                let _ = ip(&["link", "del", &veth(i).0]);
            }
            return Err(e);
        }
        Ok(star)
    }

    /// `ip netns exec NAME`, to prefix a command run in namespace `i`.
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
            let rule = ["iifname", self.devs[i].as_str(), "drop"];
            nft_input_rules(&self.names[i], ["inet", "cut", "input"], &[&rule])?;
        }
        Ok(())
    }

    /// Refuses new connections arriving over the veth in namespace `i` (nftables, input hook:
    /// packets of connections opened from inside still pass), as a home router does: nobody
    /// outside can dial a node there, it must dial out itself. For the tests.
    #[allow(dead_code)]
    pub fn refuse_inbound(&self, i: usize) -> Result<(), String> {
        let rule = [
            "iifname",
            self.devs[i].as_str(),
            "ct",
            "state",
            "new",
            "drop",
        ];
        nft_input_rules(&self.names[i], ["inet", "fw", "input"], &[&rule])
    }

    /// Takes the link down at both ends (as when a cable is pulled): the kernels see it go,
    /// routes through it are gone, and senders get errors at once instead of silence.
    pub fn link_down(&self) -> Result<(), String> {
        self.set_link("down")
    }

    /// Undoes [`Self::link_down`].
    pub fn link_up(&self) -> Result<(), String> {
        self.set_link("up")
    }

    fn set_link(&self, state: &str) -> Result<(), String> {
        for i in 0..2 {
            ip(&["-n", &self.names[i], "link", "set", &self.devs[i], state])?;
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
