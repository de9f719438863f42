//! One blob fetched between two nodes in this process (for profiling the transfer).
use std::io::Write;
use std::time::Instant;

use mycel_node::blobs::Progress;
use mycel_node::{Node, NodeConfig};

#[tokio::main]
async fn main() {
    let root = tempfile::tempdir().unwrap();
    let config = |name: &str, boot: Vec<mycel_net::Multiaddr>| {
        let mut c = NodeConfig::new(root.path().join(name));
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        c.bootstrap = boot;
        c.mdns = false;
        c.api = None;
        c
    };
    let mib: usize = std::env::args().nth(1).map_or(256, |s| s.parse().unwrap());
    let file = root.path().join("data.bin");
    let mut out = std::fs::File::create(&file).unwrap();
    let mut xof = blake3::Hasher::new().update(b"x").finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        xof.fill(&mut buf);
        out.write_all(&buf).unwrap();
    }
    drop(out);
    let a = Node::start(config("a", vec![])).await.unwrap();
    let id = a.blobs.import_path(&file, true).await.unwrap();
    let addr = a.net.listen_addrs()[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(a.net.peer_id()));
    let b = Node::start(config("b", vec![addr])).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let started = Instant::now();
    b.blobs
        .fetch(id, &[a.net.peer_id()], false, &Progress::default())
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{mib} MiB fetched in {secs:.2} s: {:.0} MB/s",
        (mib << 20) as f64 / secs / 1e6
    );
}
