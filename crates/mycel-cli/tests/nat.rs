//! NAT traversal between real `mycel` processes in network namespaces with real NAT routers
//! (nftables masquerade), see `common::netns::NatLab`:
//!
//! - Behind ordinary NATs: two nodes each behind its own router learn from AutoNAT that they
//!   are private, reserve a slot on a public relay, announce the relayed address, reach each
//!   other through it, get a chat completion across, punch a direct connection (DCUtR) and
//!   move a blob over it. A public node on the internet learns from AutoNAT that it is public
//!   and serves as a relay.
//! - Behind symmetric NATs (a new port per connection) no hole can be punched: the nodes still
//!   see each other and chat through the relay, but bulk data (a blob, a training job's model
//!   and updates) refuses it with an error that says why and what to do, and travels over it
//!   only for a node that allows relayed data. A
//!   peer that lies about being a public relay costs a failed reservation, and pays for it in
//!   reputation.
//! - A relay bounds what it carries as its operator set it (`--relay-circuit-secs`,
//!   `--relay-circuit-bytes`): it cuts a relayed connection at either limit and counts why;
//!   the nodes reconnect through it, and a blob larger than one circuit's bytes still arrives.
//! - An AutoNAT server that calls a public node unreachable (lying, or unable to dial out)
//!   makes it private only while nobody else can be asked; the next server's dial-back makes
//!   it public again, and the liar pays.
//!
//! Needs root for `ip netns` and `nft`; where they are missing the tests say so and return,
//! unless MYCEL_REQUIRE_NETNS=1 (set by CI), where that is a failure.

mod common;

use std::time::Duration;

use common::netns::{
    cli, id_of, metrics, nat_events, peer, rejected, status, Lab, Member, NatLab, HOME_A, HOME_B,
    INTERNET, INTERNET_ADDRS,
};
use common::wait_until;
use mycel_ml::fixtures::write_tiny_llama;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

/// A node of this lab (see `common::netns::lab_node`), without UPnP: these routers have no
/// gateway to ask.
fn lab_node(lab: &NatLab, ns: usize, dir: &std::path::Path, port: u16, args: &[&str]) -> Member {
    let args: Vec<&str> = ["--no-upnp"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    common::netns::lab_node(lab, ns, dir, port, &args)
}

fn lab_or_skip(test: &str, label: &str, symmetric: bool) -> Option<NatLab> {
    match NatLab::new(label, [symmetric; 2]) {
        Ok(lab) => Some(lab),
        Err(e) => {
            mycel_ml::fixtures::skip_unless_required(
                test,
                "MYCEL_REQUIRE_NETNS",
                &format!("cannot build the namespaces and NAT routers ({e})"),
            );
            None
        }
    }
}

/// The relay R on the internet (its address declared by the operator), then homes A (serving
/// the tiny generation model) and B, each joining through R's QUIC address; `extra` adds to
/// the command lines of R, A and B.
fn start(
    lab: &NatLab,
    root: &std::path::Path,
    extra: [&[&str]; 3],
) -> (Member, Member, Member, String) {
    let [relay_args, a_args, b_args] = extra;
    let model = root.join("tiny-llama.gguf");
    write_tiny_llama(&model).unwrap();
    let args: Vec<&str> = [
        "--external-addr",
        "/ip4/198.51.100.1/udp/4001/quic-v1",
        "--external-addr",
        "/ip4/198.51.100.1/tcp/4001",
    ]
    .into_iter()
    .chain(relay_args.iter().copied())
    .collect();
    let relay = lab_node(lab, INTERNET, &root.join("r"), 4001, &args);
    let mut relay_id = String::new();
    wait_until(LIMIT, "the relay is up", || {
        relay_id = status(lab, &relay)["network"]["peer_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        !relay_id.is_empty()
    });
    // A and B are one operator's homes: B trusts the name A announces its model under.
    let operator = root.join("operator.key");
    let home = |ns: usize, name: &str, side: usize, args: &[&str]| {
        let boot = format!(
            "/ip4/{}/udp/4001/quic-v1/p2p/{relay_id}",
            INTERNET_ADDRS[side]
        );
        let args: Vec<&str> = ["--bootstrap", &boot]
            .into_iter()
            .chain(["--operator-key", operator.to_str().unwrap()])
            .chain(args.iter().copied())
            .collect();
        lab_node(lab, ns, &root.join(name), 4001, &args)
    };
    let a_args: Vec<&str> = ["--model", model.to_str().unwrap()]
        .into_iter()
        .chain(a_args.iter().copied())
        .collect();
    let a = home(HOME_A, "a", 0, &a_args);
    let b = home(HOME_B, "b", 1, b_args);
    (relay, a, b, relay_id)
}

/// Waits until `member` calls itself private and holds a reservation with the relay, and
/// returns its status.
fn wait_private_and_relayed(lab: &NatLab, member: &Member, relay_id: &str) -> Value {
    let mut s = Value::Null;
    let started = std::time::Instant::now();
    let mut shown = 0;
    wait_until(
        LIMIT,
        "a home node is private and holds a relay reservation",
        || {
            s = status(lab, member);
            if started.elapsed().as_secs() / 15 > shown {
                shown += 1;
                eprintln!("still waiting; status: {}", s["network"]);
            }
            let net = &s["network"];
            net["reachability"] == "private"
                && net["relays"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x == relay_id))
                && net["announced_addrs"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x.as_str().unwrap_or("").contains("p2p-circuit"))
                })
        },
    );
    s
}

/// Both homes find themselves private (AutoNAT could not dial them back) and hold a
/// reservation on the relay; B sees A alive and private, through A's announcement. Returns
/// A's peer id.
fn homes_private_and_relayed(lab: &NatLab, a: &Member, b: &Member, relay_id: &str) -> String {
    let a_id = id_of(lab, a);
    wait_private_and_relayed(lab, a, relay_id);
    wait_private_and_relayed(lab, b, relay_id);
    wait_until(LIMIT, "B sees A alive and private", || {
        let info = peer(lab, b, &a_id);
        info["state"] == "alive" && info["reachability"] == "private"
    });
    a_id
}

/// C: a node behind B's NAT that accepts relayed data, joining through the relay.
fn accepting_relayed_data(lab: &NatLab, root: &std::path::Path, relay_id: &str) -> Member {
    let boot = format!("/ip4/{}/udp/4001/quic-v1/p2p/{relay_id}", INTERNET_ADDRS[1]);
    lab_node(
        lab,
        HOME_B,
        &root.join("c"),
        4003,
        &["--allow-relayed-data", "--bootstrap", &boot],
    )
}

/// `mycel put PATH` on `member`: the content id.
fn put(lab: &NatLab, member: &Member, path: &std::path::Path) -> String {
    let (ok, out, err) = cli(lab, member, &["put", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    out.trim().to_owned()
}

/// A greedy chat completion with the tiny model, asked of `member`.
fn chat(lab: &NatLab, member: &Member) -> (bool, String, String) {
    let args = [
        "chat",
        "--model",
        "tiny-llama",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "the",
    ];
    cli(lab, member, &args)
}

/// B, which serves no model, gets a chat completion from A (across the NATs, through whatever
/// connection B holds to A): the same greedy answer A gives itself.
fn b_chats_with_a(lab: &NatLab, a: &Member, b: &Member) {
    let (ok, local, err) = chat(lab, a);
    assert!(ok && !local.trim().is_empty(), "A answers itself: {err}");
    let mut last = (String::new(), String::new());
    wait_until(LIMIT, "B gets a chat completion from A", || {
        let (ok, out, err) = chat(lab, b);
        last = (out, err);
        ok
    });
    assert_eq!(last.0, local, "B's answer is A's: {}", last.1);
}

#[test]
fn nodes_behind_nats_meet_through_a_relay_punch_a_hole_and_move_data_directly() {
    const TEST: &str = "nodes_behind_nats_meet_through_a_relay_punch_a_hole_and_move_data_directly";
    let Some(lab) = lab_or_skip(TEST, "c", false) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (_relay, a, b, relay_id) = start(&lab, root.path(), [&[], &[], &[]]);

    // A public node beside the relay with nothing declared: AutoNAT finds it reachable.
    let boot = format!("/ip4/198.51.100.1/tcp/4001/p2p/{relay_id}");
    let p = lab_node(
        &lab,
        INTERNET,
        &root.path().join("p"),
        4002,
        &["--bootstrap", &boot],
    );
    wait_until(
        LIMIT,
        "AutoNAT finds the internet node public, and it serves as a relay",
        || {
            let net = &status(&lab, &p)["network"];
            net["reachability"] == "public" && net["relay_server"] == true
        },
    );

    let a_id = homes_private_and_relayed(&lab, &a, &b, &relay_id);
    b_chats_with_a(&lab, &a, &b);

    // A blob put on A travels to B: only over a direct connection (bulk data never rides
    // the relay, and neither home allows relayed data), so the hole was punched.
    let file = root.path().join("data.bin");
    let data: Vec<u8> = (0..9 * 1024 * 1024 + 17)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let id = put(&lab, &a, &file);
    let copy = root.path().join("copy.bin");
    let mut last = String::new();
    wait_until(LIMIT, "B fetches A's blob over a direct connection", || {
        let (ok, _, err) = cli(&lab, &b, &["get", &id, "-o", copy.to_str().unwrap()]);
        last = err;
        ok
    });
    assert_eq!(std::fs::read(&copy).unwrap(), data, "{last}");
    let b_sees_a = peer(&lab, &b, &a_id);
    assert_eq!(
        b_sees_a["link"], "direct",
        "B's peer list shows the direct connection"
    );
    // Behind routers that drop unsolicited traffic, the direct connection can only have
    // followed a relayed one: B timed the upgrade.
    assert!(
        b_sees_a["direct_after_ms"].is_u64(),
        "B records when its relayed connection to A became direct: {b_sees_a}"
    );
    let punched = [&a, &b]
        .iter()
        .any(|m| nat_events(&lab, m, "hole_punch", "direct") > 0);
    assert!(
        punched,
        "A or B counts a punched hole:\n{}\n{}",
        metrics(&lab, &a),
        metrics(&lab, &b)
    );
}

#[test]
fn behind_symmetric_nats_bulk_data_refuses_the_relay_and_says_why() {
    const TEST: &str = "behind_symmetric_nats_bulk_data_refuses_the_relay_and_says_why";
    let Some(lab) = lab_or_skip(TEST, "s", true) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    // A holds a dataset and trains for anyone; B waits 3 s for a hole punch (not 20).
    let (_relay, a, b, relay_id) = start(
        &lab,
        root.path(),
        [
            &[],
            &[
                "--dataset",
                "digits=sklearn-digits:train",
                "--train-for",
                "any",
            ],
            &["--direct-wait", "3"],
        ],
    );
    let a_id = homes_private_and_relayed(&lab, &a, &b, &relay_id);

    // A liar: a node behind B's NAT that declares a public address where nothing serves (a
    // closed port on the relay's host) and calls itself a public relay. A, which wants a
    // second relay, tries it, fails, keeps its reservation with the real relay only, and
    // charges the liar; nothing is announced through the liar.
    let boot = format!("/ip4/{}/udp/4001/quic-v1/p2p/{relay_id}", INTERNET_ADDRS[1]);
    let liar = lab_node(
        &lab,
        HOME_B,
        &root.path().join("liar"),
        4002,
        &[
            "--relay-server",
            "on",
            "--external-addr",
            "/ip4/198.51.100.1/tcp/4099",
            "--bootstrap",
            &boot,
        ],
    );
    let liar_id = id_of(&lab, &liar);
    wait_until(LIMIT, "A sees the liar as a public relay", || {
        let info = peer(&lab, &a, &liar_id);
        info["reachability"] == "public" && info["relay"] == true
    });
    wait_until(LIMIT, "A's reservation with the liar fails", || {
        nat_events(&lab, &a, "relay_reservation", "failed") > 0
    });
    wait_until(LIMIT, "A charges the liar", || {
        rejected(&lab, &a, "false_relay") >= 1
    });
    let net = &status(&lab, &a)["network"];
    assert_eq!(net["relays"], serde_json::json!([relay_id]), "{net}");
    assert!(
        !net["announced_addrs"].to_string().contains(&liar_id),
        "nothing is announced through the liar: {net}"
    );

    let file = root.path().join("data.bin");
    std::fs::write(&file, vec![7u8; 300_000]).unwrap();
    let id = put(&lab, &a, &file);
    // Control traffic uses the relay: B connects to A through it.
    wait_until(LIMIT, "B is connected to A through the relay", || {
        let info = peer(&lab, &b, &a_id);
        info["connected"] == true && info["link"] == "relayed"
    });
    let copy = root.path().join("copy.bin");
    let (ok, _, err) = cli(&lab, &b, &["get", &id, "-o", copy.to_str().unwrap()]);
    assert!(!ok, "the blob must not travel over the relay");
    assert!(
        err.contains("--allow-relayed-data"),
        "the error says what to do: {err}"
    );
    assert!(!copy.exists());

    // Task requests and streamed tokens may ride the relay: B chats with A through it.
    b_chats_with_a(&lab, &a, &b);

    // Training updates are bulk data too: B's job, with A its only participant, fails and
    // says why and what to do.
    wait_until(LIMIT, "B sees A's dataset", || {
        peer(&lab, &b, &a_id)["capabilities"]["datasets"][0]["tag"] == "digits"
    });
    let job = root.path().join("job.toml");
    std::fs::write(&job, JOB).unwrap();
    let (ok, out, err) = cli(&lab, &b, &["train", job.to_str().unwrap()]);
    assert!(
        !ok && err.contains("--allow-relayed-data"),
        "B's job over the relay: {out}{err}"
    );

    // An operator who accepts relayed data says so: C, also behind B's NAT, fetches the blob
    // through the relay.
    let c = accepting_relayed_data(&lab, root.path(), &relay_id);
    wait_until(LIMIT, "C sees A alive", || {
        peer(&lab, &c, &a_id)["state"] == "alive"
    });
    let mut last = String::new();
    wait_until(LIMIT, "C fetches A's blob through the relay", || {
        let (ok, _, err) = cli(&lab, &c, &["get", &id, "-o", copy.to_str().unwrap()]);
        last = err;
        ok
    });
    assert_eq!(std::fs::read(&copy).unwrap(), vec![7u8; 300_000], "{last}");

    // And C's job trains on A's data through the relay.
    let (ok, out, err) = cli(&lab, &c, &["train", job.to_str().unwrap()]);
    assert!(ok && out.contains("done: 2 rounds"), "C's job: {out}{err}");
}

/// Two rounds on A's digits, A the only participant needed.
const JOB: &str = r#"
name = "over-the-relay"
dataset = "digits"
rounds = 2
seed = 1
round_deadline_ms = 30000

[model]
kind = "mlp"
layers = [64, 10]

[train]
epochs = 1
batch = 8
lr = 0.05

[participants]
min = 1
"#;

/// A relay bounds what it carries, as its operator configured: a relayed connection lasts at
/// most `--relay-circuit-secs` and carries at most `--relay-circuit-bytes`; the relay cuts it
/// there and counts why, and the nodes behind symmetric NATs (no hole to punch) come back
/// through it.
#[test]
fn a_relay_cuts_circuits_at_their_duration_and_byte_limits() {
    const TEST: &str = "a_relay_cuts_circuits_at_their_duration_and_byte_limits";
    let Some(lab) = lab_or_skip(TEST, "k", true) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (relay, a, b, relay_id) = start(
        &lab,
        root.path(),
        [
            &["--relay-circuit-secs", "8", "--relay-circuit-bytes", "1MiB"],
            &[],
            &[],
        ],
    );
    let a_id = homes_private_and_relayed(&lab, &a, &b, &relay_id);
    let relayed_to_a = |member: &Member| {
        let info = peer(&lab, member, &a_id);
        info["connected"] == true && info["link"] == "relayed"
    };
    let served = |result: &str| nat_events(&lab, &relay, "relay_served", result);

    // Duration: B's relayed connection to A is cut by the relay after 8 s, and comes back.
    wait_until(LIMIT, "B is connected to A through the relay", || {
        relayed_to_a(&b)
    });
    wait_until(LIMIT, "the relay cuts a circuit at its duration", || {
        served("circuit_duration_limit") >= 1
    });
    let opened = served("circuit_accepted");
    wait_until(LIMIT, "B is connected to A through a new circuit", || {
        served("circuit_accepted") > opened && relayed_to_a(&b)
    });
    assert_eq!(
        served("circuit_bytes_limit"),
        0,
        "control traffic stays far below 1 MiB a circuit"
    );

    // Bytes: C, behind B's NAT and accepting relayed data, fetches a 2 MB blob of A's. No
    // circuit carries more than 1 MiB (four 256 KiB chunks), so the relay cuts the circuit
    // mid-transfer; C reconnects through it and the fetch resumes where it stopped, every
    // chunk verified. (`timeout` bounds the fetch: a node fetching keeps trying for minutes.)
    let file = root.path().join("data.bin");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let id = put(&lab, &a, &file);
    let c = accepting_relayed_data(&lab, root.path(), &relay_id);
    wait_until(LIMIT, "C is connected to A through the relay", || {
        relayed_to_a(&c)
    });
    let copy = root.path().join("copy.bin");
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.ns(c.ns),
            "timeout",
            "120",
            common::MYCEL,
        ])
        .args([
            "get",
            &id,
            "-o",
            copy.to_str().unwrap(),
            "--api",
            &c.process.api,
        ])
        .arg("--data-dir")
        .arg(&c.process.data_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "C's fetch: {err}");
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "C's copy is A's blob"
    );
    assert!(
        served("circuit_bytes_limit") >= 1,
        "2 MB cannot pass one circuit of 1 MiB: {}",
        metrics(&lab, &relay)
    );
}

/// A relay announces itself one only while it has room: R, limited to 2 reservations, stops
/// once A and B hold them, and nobody asks it again. L announces room it never gives (one
/// reservation, and it keeps saying it has room once that is taken): the home it refuses
/// charges it at every request, and holds no reservation with it. H black-holes the
/// addresses it announces: it is charged too.
#[test]
fn a_relay_that_announces_room_it_does_not_give_pays() {
    const TEST: &str = "a_relay_that_announces_room_it_does_not_give_pays";
    let Some(lab) = lab_or_skip(TEST, "r", false) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (relay, a, b, relay_id) = start(
        &lab,
        root.path(),
        [&["--relay-max-reservations", "2"], &[], &[]],
    );
    let a_id = homes_private_and_relayed(&lab, &a, &b, &relay_id);
    wait_until(LIMIT, "R, full, no longer announces itself a relay", || {
        let info = peer(&lab, &b, &relay_id);
        info["state"] == "alive" && info["relay"] == false
    });
    let net = &status(&lab, &relay)["network"];
    assert!(
        net["relay_server"] == true && net["relay_reservations"] == 2,
        "R serves, full: {net}"
    );

    let boot = format!("/ip4/198.51.100.1/tcp/4001/p2p/{relay_id}");
    let liar = lab_node(
        &lab,
        INTERNET,
        &root.path().join("l"),
        4005,
        &[
            "--relay-server",
            "on",
            "--relay-max-reservations",
            "1",
            "--lie-relay-room",
            "--external-addr",
            "/ip4/198.51.100.1/udp/4005/quic-v1",
            "--external-addr",
            "/ip4/198.51.100.1/tcp/4005",
            "--bootstrap",
            &boot,
        ],
    );
    let liar_id = id_of(&lab, &liar);
    let refused = |m: &Member| rejected(&lab, m, "relay_refused");
    wait_until(
        LIMIT,
        "one home holds L's one reservation, the other is refused twice and charges L",
        || {
            let holds = |m: &Member| {
                status(&lab, m)["network"]["relays"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x == liar_id.as_str()))
            };
            let (ha, hb) = (holds(&a), holds(&b));
            (ha != hb) && refused(if ha { &b } else { &a }) >= 2
        },
    );
    assert_eq!(
        nat_events(&lab, &relay, "relay_served", "reservation_denied"),
        0,
        "R announced it was full: nobody asked it again"
    );

    // A peer without a reservation comes and goes: R still holds 2 and stays full (libp2p
    // reports a "reservation closed" for every connection that closes).
    let q = lab_node(
        &lab,
        INTERNET,
        &root.path().join("q"),
        4006,
        &["--relay-server", "off", "--bootstrap", &boot],
    );
    let q_id = id_of(&lab, &q);
    wait_until(LIMIT, "R is connected to Q", || {
        peer(&lab, &relay, &q_id)["connected"] == true
    });
    drop(q); // SIGKILL
    wait_until(LIMIT, "R's connections to Q are gone", || {
        peer(&lab, &relay, &q_id)["connected"] == false
    });
    let net = &status(&lab, &relay)["network"];
    assert!(
        net["relay_reservations"] == 2 && net["relay_announced"] == false,
        "R still full: {net}"
    );

    // A relay that black-holes the addresses it announces: H, on the internet, where every
    // new connection to its port is dropped (it dials out itself, so it joins). The home
    // still wanting a second relay asks it, hears nothing at any address while its other
    // peers answer, and charges it `false_relay`.
    lab.black_hole_port(INTERNET, 4007).unwrap();
    let _hole = lab_node(
        &lab,
        INTERNET,
        &root.path().join("h"),
        4007,
        &[
            "--relay-server",
            "on",
            "--external-addr",
            "/ip4/198.51.100.1/udp/4007/quic-v1",
            "--external-addr",
            "/ip4/198.51.100.1/tcp/4007",
            "--bootstrap",
            &boot,
        ],
    );
    let false_relay = |m: &Member| rejected(&lab, m, "false_relay");
    wait_until(LIMIT, "a home charges the black-holing relay", || {
        false_relay(&a) + false_relay(&b) >= 1
    });
    assert!(
        peer(&lab, &b, &a_id)["state"] == "alive",
        "the homes still see each other"
    );
}

/// A lying AutoNAT server cannot make a public node private for good, and pays for trying.
///
/// libp2p's servers answer only on connections the asker dialled, so every node here is on
/// the internet: P in the internet's namespace, L and R in the routers' (each router's
/// firewall opened for that node's port), and P is seen at one address by both. P's first
/// and only server is L, whose firewall refuses every new connection to P but from L's own
/// port: each of L's dial-backs fails, and L calls P unreachable (as a liar would, or a
/// server that cannot dial out). With nobody else to ask, P believes it. Then R, an honest
/// server, joins; P dials it, asks it, R's dial-back reaches P, P is public again, and L,
/// contradicted, is charged (`false_verdict`). libp2p's own client kept L's verdict for good
/// and charged nobody.
#[test]
fn a_lying_autonat_server_cannot_make_a_public_node_private_for_good() {
    const TEST: &str = "a_lying_autonat_server_cannot_make_a_public_node_private_for_good";
    const ROUTER_A: usize = 1;
    const ROUTER_B: usize = 2;
    let Some(lab) = lab_or_skip(TEST, "v", false) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let nft = |ns: usize, rule: &str| {
        let mut args = vec!["netns", "exec", lab.names[ns].as_str(), "nft"];
        args.extend(rule.split(' '));
        common::netns::run("ip", &args).unwrap();
    };
    // P is seen at one address by everyone: its packets towards router A's side leave from
    // its address on router B's side too (the kernel picks the source by the route). So the
    // address L fails is the one R is asked about.
    let route = common::netns::output(
        "ip",
        &[
            "-n",
            &lab.names[INTERNET],
            "-o",
            "route",
            "show",
            "198.51.100.0/24",
        ],
    )
    .unwrap();
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_else(|| panic!("no device in {route:?}"))
        .to_owned();
    common::netns::ip(&[
        "-n",
        &lab.names[INTERNET],
        "route",
        "replace",
        "198.51.100.0/24",
        "dev",
        &dev,
        "src",
        INTERNET_ADDRS[1],
    ])
    .unwrap();
    // The routers' own firewalls let L and R be dialled.
    nft(ROUTER_B, "insert rule ip fw in tcp dport 4002 accept");
    nft(ROUTER_A, "insert rule ip fw in tcp dport 4003 accept");
    // L's lie: new connections to P's port only from L's own (where libp2p dials from, to
    // keep one mapping); its dial-backs come from new ports and are refused.
    nft(ROUTER_B, "add table inet liar");
    nft(
        ROUTER_B,
        "add chain inet liar out { type filter hook output priority 0 ; policy accept ; }",
    );
    nft(
        ROUTER_B,
        &format!(
            "add rule inet liar out ip daddr {} tcp dport 4001 tcp sport != 4002 ct state new \
             reject with tcp reset",
            INTERNET_ADDRS[1]
        ),
    );

    // R does not dial P itself (only its dial-backs, from new ports, go through): P must be
    // the one that dials R, or R would not serve P (see above).
    nft(ROUTER_A, "add table inet honest");
    nft(
        ROUTER_A,
        "add chain inet honest out { type filter hook output priority 0 ; policy accept ; }",
    );
    nft(
        ROUTER_A,
        "add rule inet honest out tcp dport 4001 tcp sport 4003 ct state new reject with tcp reset",
    );
    nft(
        ROUTER_A,
        "add rule inet honest out udp dport 4001 udp sport 4003 reject",
    );

    let l = lab_node(&lab, ROUTER_B, &root.path().join("l"), 4002, &[]);
    let l_id = id_of(&lab, &l);
    let p = lab_node(
        &lab,
        INTERNET,
        &root.path().join("p"),
        4001,
        &[
            "--bootstrap",
            &format!("/ip4/203.0.113.2/tcp/4002/p2p/{l_id}"),
        ],
    );
    let mut last = Value::Null;
    wait_until(
        LIMIT,
        "P believes its only server and calls itself private",
        || {
            last = status(&lab, &p)["network"].clone();
            last["reachability"] == "private"
        },
    );
    assert_eq!(
        nat_events(&lab, &p, "autonat_probe", "reachable"),
        0,
        "{last}"
    );

    // R joins through L; P hears of it and dials it (short of its degree).
    let _r = lab_node(
        &lab,
        ROUTER_A,
        &root.path().join("r"),
        4003,
        &[
            "--bootstrap",
            &format!("/ip4/203.0.113.2/tcp/4002/p2p/{l_id}"),
        ],
    );
    wait_until(
        LIMIT,
        "P, asked again by an honest server, is public",
        || {
            last = status(&lab, &p)["network"].clone();
            last["reachability"] == "public"
        },
    );
    // The very address L failed (libp2p's client never asked about it again).
    assert!(
        nat_events(&lab, &p, "autonat_probe", "reachable") >= 1,
        "{last}"
    );
    wait_until(
        LIMIT,
        "P charges the server that called it unreachable",
        || rejected(&lab, &p, "false_verdict") >= 1,
    );
}
