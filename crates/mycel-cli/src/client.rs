//! `mycel status` and `mycel peers`: read a node's HTTP API.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub(crate) struct ClientArgs {
    /// Address of the node's API.
    #[arg(long, default_value = "127.0.0.1:7878")]
    api: String,
    /// Bearer token [default: $MYCEL_TOKEN, else api.token in --data-dir]
    #[arg(long)]
    token: Option<String>,
    /// The node's data directory, where its api.token is [default: the platform's data
    /// directory]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl ClientArgs {
    fn token(&self) -> anyhow::Result<String> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        if let Ok(token) = std::env::var("MYCEL_TOKEN") {
            return Ok(token);
        }
        let dir = self
            .data_dir
            .clone()
            .unwrap_or_else(crate::default_data_dir);
        let path = dir.join("api.token");
        std::fs::read_to_string(&path)
            .map(|t| t.trim().to_owned())
            .with_context(|| {
                format!(
                    "cannot read the API token from {}; pass --token, set MYCEL_TOKEN or point \
                 --data-dir at the node's data directory",
                    path.display()
                )
            })
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let token = self.token()?;
        let url = format!("http://{}{path}", self.api);
        let response = ureq::get(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .call();
        match response {
            Ok(mut r) => r.body_mut().read_json::<Value>().context("the node sent invalid JSON"),
            Err(ureq::Error::StatusCode(401)) => {
                bail!("the node at {} refused the token (401); use the token from its data directory's api.token", self.api)
            }
            Err(ureq::Error::StatusCode(code)) => bail!("the node at {} answered {code}", self.api),
            Err(e) => bail!(
                "cannot reach a node API at {} ({e}); is `mycel node` running? Pass --api HOST:PORT if it listens elsewhere",
                self.api
            ),
        }
    }
}

pub(crate) fn status(args: ClientArgs) -> anyhow::Result<()> {
    let status = args.get("/api/status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let net = &status["network"];
    println!("peer id      {}", net["peer_id"].as_str().unwrap_or("?"));
    println!("version      {}", status["version"].as_str().unwrap_or("?"));
    for addr in net["listen_addrs"].as_array().into_iter().flatten() {
        println!("listening    {}", addr.as_str().unwrap_or("?"));
    }
    println!("connections  {}", net["connections"]);
    println!(
        "peers        {} alive ({} with capabilities), {} failed",
        net["alive"], net["alive_with_capabilities"], net["failed"]
    );
    println!(
        "routing      {} peers in the DHT routing table",
        net["routing_table_peers"]
    );
    println!("rejected     {} messages", net["rejected_messages"]);
    Ok(())
}

pub(crate) fn peers(args: ClientArgs) -> anyhow::Result<()> {
    let peers = args.get("/api/peers")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    let list = peers.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        eprintln!(
            "no peers found yet: start the node with --bootstrap <multiaddr of another node>, \
             or check that mDNS (UDP 5353) is allowed on your LAN"
        );
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    println!(
        "{:<52} {:<7} {:>4} {:>9} {:>6} {:>8} {:>10}",
        "PEER", "STATE", "CONN", "RTT", "CORES", "MEM GiB", "LAST SEEN"
    );
    for peer in list {
        let caps = &peer["capabilities"];
        let rtt = peer["rtt_us"]
            .as_u64()
            .map_or("-".into(), |us| format!("{:.2}ms", us as f64 / 1000.0));
        let cores = caps["hardware"]["cores"]
            .as_u64()
            .map_or("-".into(), |c| c.to_string());
        let mem = caps["hardware"]["memory_bytes"]
            .as_u64()
            .map_or("-".into(), |b| {
                format!("{:.1}", b as f64 / (1u64 << 30) as f64)
            });
        let ago = peer["last_seen"].as_u64().map_or("-".into(), |t| {
            format!("{}s ago", now.saturating_sub(t) / 1000)
        });
        println!(
            "{:<52} {:<7} {:>4} {:>9} {:>6} {:>8} {:>10}",
            peer["peer_id"].as_str().unwrap_or("?"),
            peer["state"].as_str().unwrap_or("?"),
            if peer["connected"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            rtt,
            cores,
            mem,
            ago
        );
    }
    Ok(())
}
