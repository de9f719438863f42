//! Verified results on real nodes on 127.0.0.1, with workers that lie (the `fault-injection`
//! feature, which these tests turn on): colluding liars never win a replicated task and are
//! isolated at their first lie, with evidence anyone can check; a quorum's certificate checks
//! offline and through /api/verify, and one changed byte fails it; forged and replayed
//! answers are refused and counted, and a worker refusing good input cannot stop a task; an
//! isolation ends after its back-off, doubles on a repeat offence, and the record survives a
//! restart; a result that could not be verified is an error, never an answer labelled
//! verified.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{addrs_of, local_config, post, restart, wait_offers, wait_until};
use mycel_core::statement::ModelKind;
use mycel_core::verify::{Certificate, Mode};
use mycel_ml::fixtures::{write_tiny_bert, write_tiny_llama};
use mycel_ml::Engine;
use mycel_net::{Multiaddr, PeerId};
use mycel_node::fault::Fault;
use mycel_node::inference::{RouteError, Target};
use mycel_node::models::{load_model, Served};
use mycel_node::Node;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

fn served(root: &Path, name: &str) -> Served {
    let path = root.join(name);
    if !path.exists() {
        if name.ends_with(".gguf") {
            write_tiny_llama(&path).unwrap();
        } else {
            write_tiny_bert(&path).unwrap();
        }
    }
    load_model(&path, Engine::Exact).unwrap()
}

async fn start(
    root: &Path,
    name: &str,
    bootstrap: Vec<Multiaddr>,
    model: &str,
    fault: Option<Fault>,
    configure: impl FnOnce(&mut mycel_node::NodeConfig),
) -> Node {
    let mut config = local_config(&root.join(name), bootstrap, true);
    config.preloaded = vec![served(root, model)];
    config.router.fault = fault;
    configure(&mut config);
    Node::start(config).await.unwrap()
}

/// Starts a serving node per entry of `faults` (the first is the one tests ask), each
/// bootstrapping from the first, and waits until the first sees all of them serving.
async fn network(root: &Path, model: &str, faults: &[Option<Fault>]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for (i, fault) in faults.iter().enumerate() {
        let bootstrap = nodes.first().map(addrs_of).unwrap_or_default();
        nodes.push(start(root, &format!("n{i}"), bootstrap, model, *fault, |_| {}).await);
    }
    wait_offers(&nodes[0], &nodes[1..].iter().collect::<Vec<_>>()).await;
    nodes
}

async fn target(node: &Node, name: &str, kind: ModelKind) -> Target {
    node.inference.resolve(name, kind).await.unwrap()
}

fn get(node: &Node, path: &str) -> Value {
    let url = format!("http://{}{path}", node.api_addr.unwrap());
    let mut response = ureq::get(&url)
        .header("Authorization", &format!("Bearer {}", node.token))
        .call()
        .expect("API reachable");
    serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
}

fn isolated(node: &Node, peer: &PeerId) -> bool {
    node.inference
        .trust_of(peer)
        .is_some_and(|t| t.isolated_until.is_some())
}

/// The workers whose signatures a checked result's certificate carries.
fn certified_workers(checked: mycel_node::inference::Checked) -> Vec<PeerId> {
    let certificate = checked.verification.certificate.expect("certified");
    certificate.check().expect("the certificate checks").workers
}

fn metric(node: &Node, name: &str) -> f64 {
    let url = format!("http://{}/metrics", node.api_addr.unwrap());
    let body = ureq::get(&url)
        .header("Authorization", &format!("Bearer {}", node.token))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colluding_liars_never_win_are_isolated_with_evidence_and_certificates_check() {
    let root = tempfile::tempdir().unwrap();
    // 7 candidates: at most 2 liars assumed. Nodes 5 and 6 collude on one wrong output.
    let liar = Some(Fault::Wrong { group: 1 });
    let nodes = network(
        root.path(),
        "tiny-bert",
        &[None, None, None, None, None, liar, liar],
    )
    .await;
    let client = &nodes[0];
    let liars = [nodes[5].net.peer_id(), nodes[6].net.peer_id()];
    let bert = target(client, "tiny-bert", ModelKind::Embedding).await;
    let texts = vec!["the cat sat".to_owned(), "the dog ran".to_owned()];
    // The right answer: this node's own model.
    let expected = client
        .inference
        .embed_on(&bert, texts.clone(), vec![client.net.peer_id()])
        .await
        .unwrap()
        .vectors;

    // Tasks until both liars were caught. The candidates are offered in a rotating order,
    // the liars first at the start (the router would rank peers that lied last: a test
    // needs them asked).
    let mut candidates: Vec<PeerId> = nodes.iter().rev().map(|n| n.net.peer_id()).collect();
    let mut tasks = 0;
    while liars.iter().any(|l| !isolated(client, l)) {
        tasks += 1;
        assert!(tasks <= 10, "liars still not isolated after 10 tasks");
        let input = mycel_core::task::TaskInput::Embed {
            texts: texts.clone(),
        };
        let checked = client
            .inference
            .run_checked_on(
                &bert,
                input,
                Mode::Replicate { replicas: 3 },
                candidates.clone(),
            )
            .await
            .expect("a quorum of honest nodes agrees");
        candidates.rotate_left(3);
        let verification = checked.verification;
        assert_eq!(
            checked.output.vectors(2).unwrap(),
            expected,
            "task {tasks}: a wrong output was accepted"
        );
        let certificate = verification.certificate.expect("replicated: certified");
        let checked = certificate.check().expect("the certificate checks");
        assert!(checked.workers.len() >= 3);
        assert!(
            checked.workers.iter().all(|w| !liars.contains(w)),
            "a liar signed the accepted output"
        );
    }
    for liar in &liars {
        let trust = client.inference.trust_of(liar).unwrap();
        // Isolated at its first lie: no task that involved it went unpunished.
        assert_eq!(trust.successes, 0.0, "{trust:?}");
        assert!(
            trust.disagreements > 0.9 && trust.offences == 1,
            "{trust:?}"
        );
        let evidence = client.inference.evidence(liar);
        assert!(!evidence.is_empty());
        for piece in &evidence {
            assert_eq!(piece.check(), Ok(*liar), "the evidence convicts the liar");
        }
    }
    // Cut off in the network too (told to the event loop as the lie is found): no training
    // would select them.
    wait_until(
        LIMIT,
        "the liars' reputation falls below training's floor",
        || async {
            for liar in &liars {
                if client.net.reputation(*liar).await.unwrap() >= -50.0 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    assert!(metric(client, "mycel_verify_disagreements") >= 2.0);
    assert!(metric(client, "mycel_verify_isolations") >= 2.0);

    // Isolated liars get no work, not even unchecked work.
    for _ in 0..10 {
        let embedded = client.inference.embed(&bert, texts.clone()).await.unwrap();
        assert!(!liars.contains(&embedded.worker));
    }

    // Through the API: the certificate comes with the answer, checks through /api/verify,
    // and one changed byte fails it there too.
    let body = json!({ "model": "tiny-bert", "input": texts,
                       "mycel": { "verify": "replicate", "replicas": 3 } });
    let (status, response) = post(client, "/v1/embeddings", body.to_string());
    assert_eq!(status, 200, "{response}");
    let response: Value = serde_json::from_str(&response).unwrap();
    assert_eq!(response["mycel"]["verified"], true);
    let certificate: Certificate =
        serde_json::from_value(response["mycel"]["certificate"].clone()).unwrap();
    certificate.check().unwrap();
    let (status, answer) = post(client, "/api/verify", response.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap()["valid"],
        true
    );
    // The vectors swapped between the inputs (their indexes too): not what was certified.
    let mut swapped = response.clone();
    swapped["data"].as_array_mut().unwrap().swap(0, 1);
    let (status, answer) = post(client, "/api/verify", swapped.to_string());
    assert_eq!(status, 422, "{answer}");
    let text = serde_json::to_string(&certificate).unwrap();
    let at = text.find("\"output\":\"blake3:").unwrap() + "\"output\":\"blake3:".len();
    let mut altered = text.into_bytes();
    altered[at] = if altered[at] == b'0' { b'1' } else { b'0' };
    let altered = String::from_utf8(altered).unwrap();
    assert!(serde_json::from_str::<Certificate>(&altered)
        .unwrap()
        .check()
        .is_err());
    let rejected_before = metric(client, "mycel_verify_certificates_rejected");
    let (status, answer) = post(client, "/api/verify", altered);
    assert_eq!(status, 422, "{answer}");
    assert!(answer.contains("does not verify"), "{answer}");
    // A certificate from workers this node never heard of.
    let stranger = {
        let keys: Vec<mycel_core::Keypair> = (0..3)
            .map(|_| mycel_core::Keypair::generate_ed25519())
            .collect();
        let claim = certificate.claim.clone();
        let signers = keys
            .iter()
            .map(|k| mycel_core::verify::Signer::sign(k, &claim.signed_bytes()))
            .collect();
        Certificate::issue(&keys[0], claim, certificate.rule, signers, 1)
    };
    stranger.check().expect("well formed");
    let (status, answer) = post(
        client,
        "/api/verify",
        serde_json::to_string(&stranger).unwrap(),
    );
    assert_eq!(status, 422, "{answer}");
    assert!(answer.contains("does not know"), "{answer}");
    assert_eq!(
        metric(client, "mycel_verify_certificates_rejected"),
        rejected_before + 2.0
    );
    // /api/peers shows each liar's record, and its evidence is served.
    let peers = get(client, "/api/peers");
    let shown = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == liars[0].to_base58())
        .unwrap();
    assert!(shown["trust"]["isolated_until"].is_u64(), "{shown}");
    let evidence = get(client, &format!("/api/peers/{}/evidence", liars[0]));
    assert!(!evidence.as_array().unwrap().is_empty());

    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_refusing_workers_cannot_stop_or_fool_a_task() {
    let root = tempfile::tempdir().unwrap();
    let nodes = network(
        root.path(),
        "tiny-bert",
        &[
            None,
            None,
            Some(Fault::BadSignature),
            Some(Fault::Replay),
            Some(Fault::RefuseInvalid),
        ],
    )
    .await;
    let client = &nodes[0];
    let (forger, replayer) = (nodes[2].net.peer_id(), nodes[3].net.peer_id());
    let refuser = nodes[4].net.peer_id();
    let bert = target(client, "tiny-bert", ModelKind::Embedding).await;
    // A peer that calls good input invalid cannot stop a replicated task: asked first, its
    // refusal counts as a failed replica and the others settle it (5 candidates, 1 liar
    // assumed: 2 equal answers).
    let mut ranking = vec![refuser, client.net.peer_id(), nodes[1].net.peer_id()];
    ranking.extend([forger, replayer]);
    let input = mycel_core::task::TaskInput::Embed {
        texts: vec!["good input".into()],
    };
    let checked = client
        .inference
        .run_checked_on(&bert, input, Mode::Replicate { replicas: 2 }, ranking)
        .await
        .expect("one refusal does not stop the task");
    let workers = certified_workers(checked);
    assert!(!workers.contains(&refuser));
    // Calling input invalid that a quorum then ran is a lie: the refuser is isolated.
    assert!(isolated(client, &refuser));
    // Each faulty worker is asked on its own until it is isolated: the forger's first answer
    // is refused.
    let forged = client
        .inference
        .embed_on(&bert, vec!["text 0".into()], vec![forger])
        .await;
    assert!(forged.is_err(), "a forged signature is refused");
    // The replayer answers its first task honestly (here, or in the replicated task above
    // when its seat there was drawn) and replays that answer to the next: refused by the
    // second ask at the latest.
    let mut replayed = false;
    for i in 0..2 {
        let outcome = client
            .inference
            .embed_on(&bert, vec![format!("text {i}")], vec![replayer])
            .await;
        if outcome.is_err() {
            replayed = true;
            break;
        }
    }
    assert!(replayed, "a replayed answer is refused");
    wait_until(LIMIT, "both are isolated", || async {
        isolated(client, &forger) && isolated(client, &replayer)
    })
    .await;
    for peer in [forger, replayer] {
        let trust = client.inference.trust_of(&peer).unwrap();
        assert!(trust.invalid > 0.9, "{trust:?}");
    }
    assert!(metric(client, "mycel_verify_invalid_results") >= 2.0);
    // The honest pair still verifies: the isolated ones are not candidates, and replicate(2)
    // between the two left needs both to agree.
    let (embedded, verification) = client
        .inference
        .embed_checked(&bert, vec!["x".into()], Mode::Replicate { replicas: 2 })
        .await
        .unwrap();
    let checked = verification.certificate.unwrap().check().unwrap();
    assert!(!checked.workers.contains(&forger) && !checked.workers.contains(&replayer));
    assert_eq!(embedded.vectors.len(), 1);
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_ends_doubles_on_a_repeat_and_survives_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let short = |config: &mut mycel_node::NodeConfig| {
        config.router.trust.base_isolation_ms = 3_000;
    };
    let client = start(root.path(), "n0", vec![], "tiny-bert", None, short).await;
    let mut others = Vec::new();
    for (i, fault) in [None, None, Some(Fault::Wrong { group: 9 })]
        .into_iter()
        .enumerate()
    {
        others.push(
            start(
                root.path(),
                &format!("n{}", i + 1),
                addrs_of(&client),
                "tiny-bert",
                fault,
                |_| {},
            )
            .await,
        );
    }
    wait_offers(&client, &others.iter().collect::<Vec<_>>()).await;
    let liar = others[2].net.peer_id();
    let bert = target(&client, "tiny-bert", ModelKind::Embedding).await;
    // 4 candidates, 1 liar assumed: a first wave of 2, a quorum of 3 after a disagreement.
    // The liar is asked first (a peer that lied ranks low, and a test needs it asked).
    let mut ranking = vec![liar, client.net.peer_id()];
    ranking.extend(others[..2].iter().map(|n| n.net.peer_id()));
    let run_until_isolated = |offences: u32| {
        let (client, bert, ranking) = (&client, &bert, ranking.clone());
        async move {
            let input = mycel_core::task::TaskInput::Embed {
                texts: vec!["a".into()],
            };
            let checked = client
                .inference
                .run_checked_on(bert, input, Mode::Replicate { replicas: 2 }, ranking)
                .await
                .expect("three honest nodes settle it");
            assert!(checked.verification.certificate.is_some());
            let trust = client.inference.trust_of(&liar).unwrap();
            assert_eq!(trust.offences, offences, "{trust:?}");
            assert!(trust.isolated_until.is_some());
            trust
        }
    };
    let first = run_until_isolated(1).await;
    assert!(
        !client.inference.ranking(&bert).await.contains(&liar),
        "isolated: not a candidate"
    );
    let now = mycel_net::now_ms();
    let length = first.isolated_until.unwrap().saturating_sub(now);
    assert!(length <= 3_000, "first isolation {length} ms");
    wait_until(LIMIT, "the first isolation ends", || async {
        !isolated(&client, &liar)
    })
    .await;
    // Its back-off over, it is a candidate again at once (the router has the network lift its
    // ban first) and reachable.
    assert!(client.inference.ranking(&bert).await.contains(&liar));
    let open = client.net.open_task_stream(liar);
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), open).await,
        Ok(Ok(_))
    ));
    let second = run_until_isolated(2).await;
    let length = second
        .isolated_until
        .unwrap()
        .saturating_sub(mycel_net::now_ms());
    assert!(
        length > 3_000 && length <= 6_000,
        "second isolation {length} ms"
    );

    // Restarted on the same data directory, the node remembers.
    let dir = root.path().join("n0");
    client.shutdown().await;
    let restarted = restart({
        let mut config = local_config(&dir, addrs_of(&others[0]), true);
        config.preloaded = vec![served(root.path(), "tiny-bert")];
        config
    })
    .await;
    let trust = restarted.inference.trust_of(&liar).expect("kept on disk");
    assert_eq!(trust.offences, 2);
    assert!(trust.disagreements > 1.5, "{trust:?}");
    assert!(!restarted.inference.evidence(&liar).is_empty());
    restarted.shutdown().await;
    for node in others {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_are_certified_and_an_unverifiable_one_is_an_error_not_an_answer() {
    let root = tempfile::tempdir().unwrap();
    let nodes = network(root.path(), "tiny.gguf", &[None, None, None]).await;
    let client = &nodes[0];
    let request = json!({ "model": "tiny", "max_tokens": 8, "temperature": 0,
                          "messages": [{ "role": "user", "content": "the dog" }],
                          "mycel": { "verify": "replicate", "replicas": 3 } });
    let (status, body) = post(client, "/v1/chat/completions", request.to_string());
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    let certificate: Certificate =
        serde_json::from_value(body["mycel"]["certificate"].clone()).unwrap();
    assert_eq!(certificate.check().unwrap().workers.len(), 3);
    // The certified output is the text returned: the whole response checks, and with one
    // word of its answer changed it does not.
    let (status, answer) = post(client, "/api/verify", body.to_string());
    assert_eq!(status, 200, "{answer}");
    let mut edited = body.clone();
    edited["choices"][0]["message"]["content"] = json!(format!("{text}!"));
    let (status, answer) = post(client, "/api/verify", edited.to_string());
    assert_eq!(status, 422, "{answer}");
    assert!(answer.contains("not the output"), "{answer}");
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let (status, events) = post(client, "/v1/chat/completions", streaming.to_string());
    assert_eq!(status, 200, "{events}");
    let chunks: Vec<Value> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = chunks
        .iter()
        .rev()
        .find(|c| c["mycel"].is_object())
        .expect("the final event carries the verification");
    let streamed_cert: Certificate =
        serde_json::from_value(last["mycel"]["certificate"].clone()).unwrap();
    streamed_cert.check().unwrap();
    assert_eq!(streamed_cert.claim.output, certificate.claim.output);

    // A liar among three: no quorum of 3 can form, and the answer is an error.
    let liar = start(
        root.path(),
        "liar",
        addrs_of(client),
        "tiny.gguf",
        Some(Fault::Wrong { group: 3 }),
        |_| {},
    )
    .await;
    wait_offers(client, &[&liar]).await;
    let chat = target(client, "tiny", ModelKind::Generation).await;
    // 4 candidates: replicate(4) needs all four to agree.
    let outcome = client
        .inference
        .generate_checked(
            &chat,
            vec![mycel_ml::ChatMessage {
                role: "user".into(),
                content: "the dog".into(),
            }],
            mycel_ml::GenerateParams {
                max_tokens: 8,
                ..Default::default()
            },
            Mode::Replicate { replicas: 4 },
        )
        .await;
    assert!(
        matches!(&outcome, Err(RouteError::Unverified(m)) if m.contains("disagreed")),
        "{outcome:?}"
    );
    liar.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// Two nodes run by one operator (one operator key) count as one candidate and never both
/// work on a checked task, whatever order they are offered in; a node's peers and
/// /api/peers show who runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operators_nodes_never_check_each_other() {
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("operator.key");
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..4 {
        let bootstrap = nodes.first().map(addrs_of).unwrap_or_default();
        let shared = (i >= 2).then(|| key.clone());
        nodes.push(
            start(
                root.path(),
                &format!("n{i}"),
                bootstrap,
                "tiny-bert",
                None,
                |c| c.operator_key = shared,
            )
            .await,
        );
    }
    wait_offers(&nodes[0], &nodes[1..].iter().collect::<Vec<_>>()).await;
    let client = &nodes[0];
    let operator = nodes[2].net.status().await.unwrap().operator.unwrap();
    assert_eq!(
        nodes[3].net.status().await.unwrap().operator.as_ref(),
        Some(&operator),
        "one key, one operator"
    );
    let peers = get(client, "/api/peers");
    let operators: Vec<&str> = peers
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["operator"].as_str())
        .collect();
    assert_eq!(operators, [operator.as_str(); 2], "{peers}");

    let pair = [nodes[2].net.peer_id(), nodes[3].net.peer_id()];
    let bert = target(client, "tiny-bert", ModelKind::Embedding).await;
    // The operator's two nodes offered first: a router that did not know would ask both.
    let mut candidates: Vec<PeerId> = nodes.iter().rev().map(|n| n.net.peer_id()).collect();
    let input = || mycel_core::task::TaskInput::Embed {
        texts: vec!["the cat sat".to_owned()],
    };
    for round in 0..4 {
        let checked = client
            .inference
            .run_checked_on(
                &bert,
                input(),
                Mode::Replicate { replicas: 3 },
                candidates.clone(),
            )
            .await
            .expect("three operators agree");
        let workers = certified_workers(checked);
        let theirs = workers.iter().filter(|w| pair.contains(w)).count();
        assert_eq!(theirs, 1, "round {round}: {workers:?}");
        candidates.swap(0, 1);
    }
    // Three operators cannot make four replicas.
    let four = client
        .inference
        .run_checked_on(&bert, input(), Mode::Replicate { replicas: 4 }, candidates)
        .await;
    assert!(matches!(four, Err(RouteError::Unverified(_))), "{four:?}");
    for node in nodes {
        node.shutdown().await;
    }
}
