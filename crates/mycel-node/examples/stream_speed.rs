//! Raw throughput of one libp2p stream between two nodes in this process (for profiling).
use std::time::Instant;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use mycel_net::task::BLOB_PROTOCOL;
use mycel_node::{Node, NodeConfig};

#[tokio::main]
async fn main() {
    let root = tempfile::tempdir().unwrap();
    let config = |name: &str, boot: Vec<mycel_net::Multiaddr>| {
        let mut c = NodeConfig::new(root.path().join(name));
        c.listen = vec![std::env::var("XL")
            .unwrap_or("/ip4/127.0.0.1/tcp/0".into())
            .parse()
            .unwrap()];
        c.bootstrap = boot;
        c.mdns = false;
        c.api = None;
        c
    };
    let a = Node::start(config("a", vec![])).await.unwrap();
    let addr = a.net.listen_addrs()[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(a.net.peer_id()));
    let b = Node::start(config("b", vec![addr])).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut incoming = a
        .net
        .accept_streams(libp2p::StreamProtocol::new("/speed/1"))
        .unwrap();
    let total: usize = std::env::args().nth(1).map_or(256, |s| s.parse().unwrap()) << 20;
    let streams: usize = std::env::args().nth(2).map_or(1, |s| s.parse().unwrap());
    tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            tokio::spawn(async move {
                let buf = vec![7u8; 1 << 20];
                let mut sent = 0;
                while sent < total / streams {
                    s.write_all(&buf).await.unwrap();
                    sent += buf.len();
                }
                s.close().await.unwrap();
            });
        }
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let net = b.net.clone();
        let peer = a.net.peer_id();
        tasks.push(tokio::spawn(async move {
            let mut s = net
                .open_stream(peer, libp2p::StreamProtocol::new("/speed/1"))
                .await
                .unwrap();
            s.write_all(b"go").await.unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got += n;
            }
            got
        }));
    }
    let mut got = 0;
    for t in tasks {
        got += t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} MiB over {streams} stream(s) in {secs:.2} s: {:.0} MB/s",
        got >> 20,
        got as f64 / secs / 1e6
    );
    let _ = BLOB_PROTOCOL;
}
