//! `mycel status`, `peers`, `models`, `embed` and `chat`: a node's HTTP API from the terminal.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub(crate) struct ClientArgs {
    /// Address of the node's API.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub(crate) api: String,
    /// Bearer token [default: $MYCEL_TOKEN, else api.token in --data-dir]
    #[arg(long)]
    token: Option<String>,
    /// The node's data directory, where its api.token is [default: the platform's data
    /// directory]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

impl ClientArgs {
    pub(crate) fn token(&self) -> anyhow::Result<String> {
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

    pub(crate) fn get(&self, path: &str) -> anyhow::Result<Value> {
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

    /// An HTTP agent that hands back error statuses as responses (for [`ClientArgs::expect`]).
    pub(crate) fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// `http://<api><path>`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// The `Authorization` header's value.
    pub(crate) fn auth(&self) -> anyhow::Result<String> {
        Ok(format!("Bearer {}", self.token()?))
    }

    /// The response if it has the `expected` status; else the node's refusal, or advice when
    /// the node could not be reached.
    pub(crate) fn expect(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        expected: u16,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let mut response = response.with_context(|| self.unreachable())?;
        let status = response.status().as_u16();
        if status != expected {
            return Err(self.refusal(status, &mut response));
        }
        Ok(response)
    }

    /// The advice for a node that cannot be reached.
    pub(crate) fn unreachable(&self) -> String {
        format!(
            "cannot reach a node API at {}; is `mycel node` running? Pass --api HOST:PORT if it \
             listens elsewhere",
            self.api
        )
    }

    /// The error for a non-success `status`, with the API's own message.
    pub(crate) fn refusal(
        &self,
        status: u16,
        response: &mut ureq::http::Response<ureq::Body>,
    ) -> anyhow::Error {
        let answer: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        let message = answer["error"]["message"].as_str().unwrap_or("no details");
        match status {
            401 => anyhow::anyhow!("the node at {} refused the token (401); use the token from its data directory's api.token", self.api),
            _ => anyhow::anyhow!("the node at {} answered {status}: {message}", self.api),
        }
    }

    /// POSTs `body` and returns the response, with the API's own error message on failure.
    fn post(&self, path: &str, body: &Value) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let token = self.token()?;
        let url = format!("http://{}{path}", self.api);
        let response = ureq::post(&url)
            .config()
            .http_status_as_error(false)
            .build()
            .header("Authorization", &format!("Bearer {token}"))
            .send_json(body)
            .with_context(|| {
                format!(
                    "cannot reach a node API at {}; is `mycel node` running? Pass --api \
                     HOST:PORT if it listens elsewhere",
                    self.api
                )
            })?;
        let status = response.status().as_u16();
        if status == 200 {
            return Ok(response);
        }
        let mut response = response;
        let answer: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        let message = answer["error"]["message"].as_str().unwrap_or("no details");
        match status {
            401 => bail!("the node at {} refused the token (401); use the token from its data directory's api.token", self.api),
            404 => bail!("{message}; `mycel models` lists what is served"),
            _ => bail!("the node at {} answered {status}: {message}", self.api),
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
    if let Some(operator) = net["operator"].as_str() {
        println!("operator     {operator}");
    }
    for addr in net["listen_addrs"].as_array().into_iter().flatten() {
        println!("listening    {}", addr.as_str().unwrap_or("?"));
    }
    println!(
        "reachable    {}{}",
        net["reachability"].as_str().unwrap_or("?"),
        match (
            net["relay_server"].as_bool(),
            net["relay_announced"].as_bool(),
        ) {
            (Some(true), Some(false)) => format!(
                " (serving as a relay, full: {} reservations)",
                net["relay_reservations"]
            ),
            (Some(true), _) => format!(
                " (serving as a relay: {} reservations)",
                net["relay_reservations"]
            ),
            _ => String::new(),
        }
    );
    for relay in net["relays"].as_array().into_iter().flatten() {
        println!("relayed via  {}", relay.as_str().unwrap_or("?"));
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
    for model in status["models"].as_array().into_iter().flatten() {
        println!(
            "serving      {} ({}, {})",
            model["name"].as_str().unwrap_or("?"),
            model["kind"].as_str().unwrap_or("?"),
            model["engine"].as_str().unwrap_or("?")
        );
    }
    println!("queue        {} requests", status["queue_depth"]);
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
        "{:<52} {:<7} {:>5} {:<7} {:>9} {:>6} {:>8} {:>10} {:>12}",
        "PEER", "STATE", "CONN", "REACH", "RTT", "CORES", "MEM GiB", "LAST SEEN", "TRUST"
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
        // What this node's tasks showed of it: its score, or how long it stays isolated.
        let trust = &peer["trust"];
        let trust = match (trust["isolated_until"].as_u64(), trust["score"].as_f64()) {
            (Some(until), _) => format!("isolated {}s", until.saturating_sub(now) / 1000),
            (None, Some(score)) => format!("{score:.2}"),
            _ => "-".into(),
        };
        println!(
            "{:<52} {:<7} {:>5} {:<7} {:>9} {:>6} {:>8} {:>10} {:>12}",
            peer["peer_id"].as_str().unwrap_or("?"),
            peer["state"].as_str().unwrap_or("?"),
            match peer["link"].as_str() {
                Some("relayed") => "relay",
                Some(_) => "yes",
                None => "no",
            },
            peer["reachability"].as_str().unwrap_or("?"),
            rtt,
            cores,
            mem,
            ago,
            trust
        );
    }
    Ok(())
}

pub(crate) fn models(args: ClientArgs) -> anyhow::Result<()> {
    let models = args.get("/v1/models")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
        return Ok(());
    }
    let list = models["data"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        eprintln!(
            "no models served: start a node with --model PATH (bash scripts/fetch-models.sh \
             fetches the reference models into .cache/models)"
        );
        return Ok(());
    }
    // A model whose name this node does not trust is asked for by its content id.
    println!(
        "{:<32} {:<7} {:<10} {:<11} {:<6} {:>5}  CONTENT ID",
        "MODEL", "BY NAME", "KIND", "ENGINE", "LOCAL", "PEERS"
    );
    for model in list {
        let m = &model["mycel"];
        let name = m["name"].as_str().unwrap_or("?");
        println!(
            "{:<32} {:<7} {:<10} {:<11} {:<6} {:>5}  {}",
            name,
            if model["id"].as_str() == Some(name) {
                "yes"
            } else {
                "no"
            },
            m["kind"].as_str().unwrap_or("?"),
            m["engine"].as_str().unwrap_or("?"),
            if m["local"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            m["peers"],
            m["content_id"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct EmbedArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Model name or content id.
    #[arg(long, default_value = "all-minilm-l6-v2")]
    model: String,
    /// Texts to embed.
    #[arg(required = true)]
    texts: Vec<String>,
    /// How the result is checked: none, replicate[:R] or spot_check:P (default: the node's).
    #[arg(long, value_name = "MODE")]
    verify: Option<mycel_core::verify::Mode>,
}

/// The `mycel` object asking for `mode`.
fn verify_options(mode: mycel_core::verify::Mode) -> Value {
    use mycel_core::verify::Mode;
    match mode {
        Mode::None => serde_json::json!({ "verify": "none" }),
        Mode::Replicate { replicas } => {
            serde_json::json!({ "verify": "replicate", "replicas": replicas })
        }
        Mode::SpotCheck { rate } => serde_json::json!({ "verify": "spot_check", "p": rate }),
    }
}

/// One line on how an answer was checked, for the terminal: the certificate, and the answer
/// against it, are checked here, not taken on the node's word.
fn describe_verification(response: &Value) -> Option<String> {
    let mycel = &response["mycel"];
    let verify = mycel["verify"].as_str()?;
    if mycel["certificate"].is_null() {
        return Some(format!("not verified (mode {verify})"));
    }
    Some(match mycel_node::openai::check_certificate(response) {
        Ok((certificate, checked)) => format!(
            "verified: {} workers agreed (quorum {} of {} candidates); certificate issued \
                 by {}",
            checked.workers.len(),
            certificate.rule.quorum,
            certificate.rule.candidates,
            checked.issuer,
        ),
        Err(e) => format!("NOT verified: the certificate does not check: {e}"),
    })
}

#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// The certificate (or a response holding one under mycel.certificate); - reads stdin.
    file: std::path::PathBuf,
}

/// Checks a certificate offline: signatures, quorum rule, issuer, and the content of a whole
/// response against it.
pub(crate) fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", args.file.display()))?;
    let (certificate, checked) = mycel_node::openai::check_certificate(&value)
        .map_err(|e| anyhow::anyhow!("INVALID: {e}"))?;
    let claim = &certificate.claim;
    println!("valid certificate");
    println!("  task    {}", claim.task);
    println!("  model   {} ({})", claim.model, claim.engine);
    println!("  input   {}", claim.input);
    println!("  output  {}", claim.output);
    println!(
        "  quorum  {} of {} agreed ({} requested, {} liars assumed among {} candidates)",
        checked.workers.len(),
        certificate.rule.quorum,
        certificate.rule.requested,
        certificate.rule.faulty,
        certificate.rule.candidates
    );
    for worker in &checked.workers {
        println!("  worker  {worker}");
    }
    println!("  issuer  {}", checked.issuer);
    Ok(())
}

pub(crate) fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    let mut body = serde_json::json!({ "model": args.model, "input": args.texts });
    if let Some(mode) = args.verify {
        body["mycel"] = verify_options(mode);
    }
    let mut response = args.client.post("/v1/embeddings", &body)?;
    let answer: Value = response
        .body_mut()
        .read_json()
        .context("the node sent invalid JSON")?;
    if args.client.json {
        println!("{}", serde_json::to_string(&answer)?);
        return Ok(());
    }
    for (text, item) in args
        .texts
        .iter()
        .zip(answer["data"].as_array().into_iter().flatten())
    {
        let vector: Vec<String> = item["embedding"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{:.4}", x.as_f64().unwrap_or(f64::NAN)))
            .collect();
        let shown = vector
            .iter()
            .take(6)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        println!("{text:?}: [{shown}, ...] ({} dimensions)", vector.len());
    }
    if let Some(line) = describe_verification(&answer) {
        println!("{line}");
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Model name or content id.
    #[arg(long, default_value = "SmolLM2-135M-Instruct.Q4_1")]
    model: String,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Sampling temperature (0: greedy, the same answer every time).
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Seed of the sampler.
    #[arg(long)]
    seed: Option<u64>,
    /// How the answer is checked: none, replicate[:R] or spot_check:P (default: the
    /// node's). A verified answer comes whole once a quorum agreed.
    #[arg(long, value_name = "MODE")]
    verify: Option<mycel_core::verify::Mode>,
    /// What to say.
    prompt: String,
}

/// The events of a streamed chat or text completion (server-sent events, up to `[DONE]`),
/// each parsed; an error event ends them with its message.
pub(crate) fn chat_events(body: impl std::io::Read) -> impl Iterator<Item = anyhow::Result<Value>> {
    // A node's events are pieces of text: a line of 16 MiB is none.
    mycel_node::upstream::events(body, 16 << 20)
        .map(|event| event.map_err(|e| anyhow::anyhow!("from the node: {e}")))
}

/// Streams the answer to the terminal as it is generated.
pub(crate) fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(serde_json::json!({ "role": "system", "content": system }));
    }
    messages.push(serde_json::json!({ "role": "user", "content": args.prompt }));
    let mut body = serde_json::json!({
        "model": args.model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": true,
    });
    if let Some(seed) = args.seed {
        body["seed"] = seed.into();
    }
    if let Some(mode) = args.verify {
        body["mycel"] = verify_options(mode);
        // The prompt's token count is part of what the workers signed.
        body["stream_options"] = serde_json::json!({ "include_usage": true });
    }
    let response = args.client.post("/v1/chat/completions", &body)?;
    let mut streamed = String::new();
    let (mut mycel, mut finish, mut usage) = (Value::Null, Value::Null, Value::Null);
    let mut out = std::io::stdout().lock();
    for chunk in chat_events(response.into_body().into_reader()) {
        let chunk = chunk?;
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            write!(out, "{text}")?;
            out.flush()?;
            streamed.push_str(text);
        }
        if chunk["mycel"].is_object() {
            mycel = chunk["mycel"].clone();
            finish = chunk["choices"][0]["finish_reason"].clone();
        }
        if chunk["usage"].is_object() {
            usage = chunk["usage"].clone();
        }
    }
    writeln!(out)?;
    // The streamed answer, put together as a whole response, checked against the certificate.
    let whole = serde_json::json!({
        "object": "chat.completion",
        "choices": [{ "message": { "content": streamed }, "finish_reason": finish }],
        "usage": usage,
        "mycel": mycel,
    });
    if let Some(line) = describe_verification(&whole) {
        eprintln!("{line}");
    }
    Ok(())
}
