//! Verified tasks in a seeded, deterministic simulation (DESIGN §5): a client routes
//! replicated embedding tasks to ten simulated workers through the node's own decisions —
//! [`routing::rank`], [`Replication`], [`Trust`], [`TaskResult::verify`], [`Certificate`] —
//! over simulated links with latency and loss, workers that crash and restart, a client
//! that is killed and restarts from what it had persisted, and Byzantine workers: colluding
//! liars, independent liars, liars that lie on half their tasks, replayers of old answers and
//! workers that sign with another key. After every task and every run it checks the
//! invariants: no wrong output accepted, every accepted output's certificate checks offline,
//! every lie kept as evidence that checks and names the liar, no honest worker ever isolated,
//! every liar isolated within a few tasks that involved it with a back-off that doubles, and
//! isolations survive the client's restarts. The same seed gives the same run, event for
//! event (a digest of the trace).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use mycel_core::id::ContentId;
use mycel_core::routing::{self, Candidate, Reliability, Weights};
use mycel_core::task::{TaskId, TaskInput, TaskOutput, TaskRequest, TaskResult, Timings};
use mycel_core::trust::{self, Trust};
use mycel_core::verify::{
    self, Certificate, Claim, Evidence, Judged, Next, Replication, Signer, Verdict,
};
use mycel_core::{Keypair, PeerId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WORKERS: usize = 10;
const ENGINE: &str = "sim-engine/1";
/// How long the client waits for a task's quorum.
const DEADLINE_MS: u64 = 3_000;
/// A lost request is noticed this long after it was sent.
const TIMEOUT_MS: u64 = 1_000;
/// Share of requests or answers lost on the way.
const LOSS: f64 = 0.03;
/// Chance, after a task, that the client is killed and restarts.
const CLIENT_CRASH: f64 = 0.01;
/// The client persists its trust records every this many tasks (and at once on an
/// isolation, as the node does).
const FLUSH_EVERY: usize = 25;
/// First isolation, short enough that liars come back (and are caught again) within a run.
const BASE_ISOLATION_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Honest,
    /// Down now and then (honest when up).
    Flaky,
    /// Returns the wrong output every colluder returns.
    Colluding,
    /// Returns a wrong output of its own.
    Independent,
    /// Lies (with the colluders' output) on half its tasks.
    Sometimes,
    /// Answers with its signed answer to an earlier task.
    Replayer,
    /// Signs with a key that is not its own.
    ForgedKey,
    /// Calls every input invalid.
    Refuser,
}

impl Kind {
    fn lies(self) -> bool {
        !matches!(self, Kind::Honest | Kind::Flaky)
    }
}

struct Worker {
    key: Keypair,
    peer: PeerId,
    kind: Kind,
    /// Periods it is down, [from, to).
    down: Vec<(u64, u64)>,
    /// Its last signed answer (a replayer's stock).
    last: Option<TaskResult>,
}

impl Worker {
    fn up(&self, t: u64) -> bool {
        !self.down.iter().any(|(from, to)| (*from..*to).contains(&t))
    }
}

/// What reaches the client about one asked worker.
enum Reply {
    Answer(Box<TaskResult>),
    /// The connection was refused (the worker is down).
    Refused,
    /// Nothing came back in time.
    Timeout,
    /// The worker calls the input invalid.
    RefusesInput,
}

/// Everything a run found.
#[derive(Debug, Default)]
struct Report {
    accepted: usize,
    unverified: usize,
    /// Tasks ended because more workers than may lie called the input invalid.
    refused_input: usize,
    /// Accepted, or proven by an unverified task's answers, and wrong.
    wrong_accepted: usize,
    /// Unverified tasks whose answers still proved the right output (and judged the rest).
    judged_unverified: usize,
    /// Per liar: the most tasks that involved it between its coming back (or the start) and
    /// its next isolation.
    tasks_to_isolate: HashMap<usize, usize>,
    /// Per liar: the isolations it got, in order, as (length, offences).
    isolations: HashMap<usize, Vec<(u64, u32)>>,
    honest_isolated: usize,
    evidence: usize,
    restarts: usize,
    trace: [u8; 32],
}

fn keypair(seed: u64, i: usize) -> Keypair {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    bytes[31] = 1;
    Keypair::ed25519_from_bytes(bytes).unwrap()
}

/// The right answer to task `k`, and the liars' wrong ones.
fn output(k: usize, wrong: Option<usize>) -> TaskOutput {
    let shift = wrong.map_or(0.0, |w| 1_000.0 + w as f32);
    TaskOutput::embeddings(&[vec![k as f32 + shift, 0.5, -0.25]], 1)
}

fn run(seed: u64, kinds: &[Kind; WORKERS], replicas: usize, tasks: usize) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut trace = blake3::Hasher::new();
    let mut log = |line: String| {
        trace.update(line.as_bytes());
        trace.update(b"\n");
    };
    let mut workers: Vec<Worker> = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let key = keypair(seed, i);
            let mut down = Vec::new();
            if *kind == Kind::Flaky {
                let mut t = 0;
                for _ in 0..20 {
                    t += rng.gen_range(2_000..20_000);
                    let length = rng.gen_range(500..5_000);
                    down.push((t, t + length));
                    t += length;
                }
            }
            Worker {
                peer: key.public().to_peer_id(),
                key,
                kind: *kind,
                down,
                last: None,
            }
        })
        .collect();
    let index: HashMap<PeerId, usize> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| (w.peer, i))
        .collect();
    let client_key = keypair(seed, 1_000);
    let trust_config = trust::Config {
        base_isolation_ms: BASE_ISOLATION_MS,
        ..trust::Config::default()
    };
    let mut client = Client {
        trust: Trust::new(trust_config.clone()),
        persisted: Vec::new(),
        reliability: Reliability::new(60_000),
        report: Report::default(),
        involved: [0; WORKERS],
        index: index.clone(),
        kinds: *kinds,
    };
    let model = ContentId::of(b"sim model");
    let mut now: u64 = 1_000;

    for k in 0..tasks {
        now += rng.gen_range(1..50);
        let candidates: Vec<Candidate<PeerId>> = workers
            .iter()
            .filter(|w| !client.trust.isolated(&w.peer, now))
            .map(|w| Candidate {
                peer: w.peer,
                rtt_ms: None,
                queue_depth: 0,
                utilisation: 0.0,
            })
            .collect();
        let ranking = routing::rank(
            &candidates,
            |p| client.reliability.record(p, now),
            &Weights::default(),
            &mut rng,
        );
        let request = TaskRequest {
            id: TaskId(rng.gen()),
            model,
            budget_ms: DEADLINE_MS,
            input: TaskInput::Embed {
                texts: vec![format!("text {k}")],
            },
        };
        log(format!(
            "task {k} at {now}: ranking {:?}",
            ranking.iter().map(|p| index[p]).collect::<Vec<_>>()
        ));
        let mut replication = match Replication::new(&ranking, replicas, Vec::new(), rng.gen()) {
            Ok(replication) => replication,
            Err(e) => {
                log(format!("task {k}: {e}"));
                client.report.unverified += 1;
                continue;
            }
        };
        let start = now;
        let mut events: BinaryHeap<Reverse<(u64, usize, usize)>> = BinaryHeap::new();
        let mut replies: Vec<Reply> = Vec::new();
        let mut results: Vec<(PeerId, TaskResult, Claim)> = Vec::new();
        let mut asked = Vec::new();
        let mut input_refused = false;
        let settled = loop {
            match replication.step() {
                Next::Ask(peers) => {
                    for peer in peers {
                        let i = index[&peer];
                        asked.push(i);
                        let (delay, reply) = answer(&mut workers[i], &request, k, now, &mut rng);
                        log(format!("task {k}: ask {i} at {now}"));
                        events.push(Reverse((now + delay, replies.len(), i)));
                        replies.push(reply);
                    }
                }
                Next::Wait => {
                    let Some(Reverse((at, slot, i))) = events.pop() else {
                        panic!("seed {seed} task {k}: waiting with nothing outstanding");
                    };
                    if at > start + DEADLINE_MS {
                        now = start + DEADLINE_MS;
                        log(format!("task {k}: deadline"));
                        break replication.judged().map(|j| (j, false));
                    }
                    now = at;
                    let peer = workers[i].peer;
                    let failure = match std::mem::replace(&mut replies[slot], Reply::Timeout) {
                        Reply::Answer(result) => match result.verify(&peer, &request) {
                            Ok(claim) => {
                                log(format!(
                                    "task {k}: {i} answered {} at {now}",
                                    claim.output.short()
                                ));
                                replication.answered(peer, claim.clone());
                                results.push((peer, *result, claim));
                                None
                            }
                            Err(why) => {
                                Some((format!("invalid ({why:?})"), trust::Outcome::Invalid))
                            }
                        },
                        Reply::Refused => Some(("refused".to_owned(), trust::Outcome::Failure)),
                        Reply::Timeout => Some(("timed out".to_owned(), trust::Outcome::Timeout)),
                        Reply::RefusesInput => {
                            log(format!("task {k}: {i} refused the input at {now}"));
                            if replication.refused(peer) {
                                input_refused = true;
                                break None;
                            }
                            None
                        }
                    };
                    if let Some((what, outcome)) = failure {
                        log(format!("task {k}: {i} {what} at {now}"));
                        replication.failed();
                        client.reliability.failure(&peer, now);
                        client.note(peer, outcome, now);
                    }
                }
                Next::Accept(judged) => break Some((judged, true)),
                Next::GiveUp(why) => {
                    log(format!("task {k}: gave up: {why}"));
                    break replication.judged().map(|j| (j, false));
                }
            }
        };
        for i in &asked {
            if kinds[*i].lies() {
                client.involved[*i] += 1;
            }
        }
        if input_refused {
            client.report.refused_input += 1;
        }
        let verified = matches!(settled, Some((_, true)));
        if verified {
            client.report.accepted += 1;
        } else {
            client.report.unverified += 1;
        }
        // A verified output, or one the answers of an unverified task still prove, and the
        // verdicts it gives.
        if let Some((
            Judged {
                output: agreed,
                rule,
                verdicts,
            },
            verified,
        )) = settled
        {
            let right = verify::output_digest(&output(k, None));
            if agreed.output != right {
                client.report.wrong_accepted += 1;
            }
            if !verified {
                client.report.judged_unverified += 1;
            }
            let signers: Vec<Signer> = results
                .iter()
                .filter(|(_, _, claim)| *claim == agreed)
                .map(|(_, r, _)| Signer::from_parts(&r.public_key, &r.signature).unwrap())
                .collect();
            let certificate = Certificate::issue(&client_key, agreed.clone(), rule, signers, now);
            let checked = certificate.check().expect("an issued certificate checks");
            assert!(checked.workers.len() >= rule.quorum as usize);
            log(format!(
                "task {k}: {} {} under {rule:?}",
                if verified { "accepted" } else { "proven" },
                agreed.output.short()
            ));
            for (peer, verdict) in verdicts {
                let i = index[&peer];
                let outcome = match verdict {
                    Verdict::Agreed => {
                        client.reliability.success(&peer, now);
                        trust::Outcome::Success
                    }
                    Verdict::OtherEngine => trust::Outcome::Failure,
                    Verdict::RefusedValidInput => trust::Outcome::Invalid,
                    Verdict::Outvoted => {
                        client.reliability.failure(&peer, now);
                        let (_, result, claim) =
                            results.iter().find(|(p, _, _)| *p == peer).unwrap();
                        let evidence = Evidence {
                            lie: claim.clone(),
                            liar: Signer::from_parts(&result.public_key, &result.signature)
                                .unwrap(),
                            certificate: certificate.clone(),
                        };
                        assert_eq!(
                            evidence.check(),
                            Ok(peer),
                            "seed {seed} task {k}: evidence against {i}"
                        );
                        client.report.evidence += 1;
                        trust::Outcome::Disagreement
                    }
                };
                log(format!("task {k}: {i} {verdict:?}"));
                client.note(peer, outcome, now);
            }
        }
        if k % FLUSH_EVERY == 0 {
            client.persist();
        }
        if rng.gen_bool(CLIENT_CRASH) {
            // Killed: what was not client.persisted is gone; the records come back from disk.
            let isolated: Vec<usize> = (0..WORKERS)
                .filter(|i| client.trust.isolated(&workers[*i].peer, now))
                .collect();
            client.trust = Trust::new(trust_config.clone());
            for (peer, record) in &client.persisted {
                client.trust.restore(*peer, *record);
            }
            client.reliability = Reliability::new(60_000);
            client.report.restarts += 1;
            log(format!("client restarted after task {k}"));
            for i in isolated {
                assert!(
                    client.trust.isolated(&workers[i].peer, now),
                    "seed {seed}: worker {i}'s isolation was lost in a restart"
                );
            }
        }
    }
    client.report.trace = *trace.finalize().as_bytes();
    client.report
}

/// What worker `worker` does with `request` sent at `now`: the delay until the client hears,
/// and what it hears.
fn answer(
    worker: &mut Worker,
    request: &TaskRequest,
    k: usize,
    now: u64,
    rng: &mut StdRng,
) -> (u64, Reply) {
    if !worker.up(now) {
        return (rng.gen_range(1..5), Reply::Refused);
    }
    if rng.gen_bool(LOSS) {
        return (TIMEOUT_MS, Reply::Timeout);
    }
    let delay = 10 + rng.gen_range(0..60) + rng.gen_range(0..60);
    if !worker.up(now + delay) {
        // It crashed while computing.
        return (TIMEOUT_MS, Reply::Timeout);
    }
    if worker.kind == Kind::Refuser {
        return (delay, Reply::RefusesInput);
    }
    let wrong = match worker.kind {
        Kind::Colluding => Some(0),
        Kind::Independent => Some(1 + rng.gen_range(0..1_000)),
        Kind::Sometimes if rng.gen_bool(0.5) => Some(0),
        _ => None,
    };
    let signed = |key: &Keypair| {
        TaskResult::sign(key, request, ENGINE, output(k, wrong), Timings::default())
    };
    let result = match worker.kind {
        Kind::Replayer => match worker.last.replace(signed(&worker.key)) {
            Some(old) => old,
            None => return (delay, Reply::Answer(Box::new(signed(&worker.key)))),
        },
        Kind::ForgedKey => {
            let other = keypair(u64::MAX, k);
            let mut result = signed(&other);
            result.public_key = worker.key.public().encode_protobuf();
            result
        }
        _ => signed(&worker.key),
    };
    (delay, Reply::Answer(Box::new(result)))
}

/// What the client keeps, and what its run found.
struct Client {
    trust: Trust<PeerId>,
    /// Its trust records as last written to disk.
    persisted: Vec<(PeerId, trust::Record)>,
    reliability: Reliability<PeerId>,
    report: Report,
    /// Tasks that involved each liar since it was last isolated (or since the start).
    involved: [usize; WORKERS],
    index: HashMap<PeerId, usize>,
    kinds: [Kind; WORKERS],
}

impl Client {
    /// Notes `outcome` for `peer` in the trust records, as the node does, and records the
    /// isolation it causes.
    fn note(&mut self, peer: PeerId, outcome: trust::Outcome, now: u64) {
        let Some(isolation) = self.trust.note(&peer, outcome, now) else {
            return;
        };
        let i = self.index[&peer];
        if !self.kinds[i].lies() {
            self.report.honest_isolated += 1;
            return;
        }
        let most = self.report.tasks_to_isolate.entry(i).or_default();
        *most = (*most).max(self.involved[i]);
        self.involved[i] = 0;
        self.report
            .isolations
            .entry(i)
            .or_default()
            .push((isolation.until - now, isolation.offences));
        // Written at once, as the node flushes on an isolation.
        self.persist();
    }

    fn persist(&mut self) {
        self.persisted = self.trust.records().map(|(p, r)| (*p, *r)).collect();
        self.persisted.sort_by_key(|(p, _)| self.index[p]);
    }
}

/// Ten workers: `liars` at 2, 5 and 8, two honest workers that go down now and then, the
/// rest honest.
fn workers(liars: [Kind; 3]) -> [Kind; WORKERS] {
    let mut kinds = [Kind::Honest; WORKERS];
    kinds[0] = Kind::Flaky;
    kinds[9] = Kind::Flaky;
    for (i, liar) in [2, 5, 8].into_iter().zip(liars) {
        kinds[i] = liar;
    }
    kinds
}

#[test]
fn no_wrong_output_is_accepted_and_every_liar_is_isolated_within_a_few_tasks() {
    use Kind::*;
    let (mut restarts, mut judged) = (0, 0);
    // Three replicas asked for (a first wave of f + 1 = 4), and five (more than f + 1).
    for (liars, replicas) in [
        ([Colluding; 3], 3),
        ([Independent; 3], 3),
        ([Sometimes, Replayer, ForgedKey], 3),
        ([Refuser, Colluding, Independent], 5),
    ] {
        let kinds = workers(liars);
        for seed in 1..=4 {
            let report = run(seed, &kinds, replicas, 300);
            let what = format!("{liars:?}, seed {seed}: {report:?}");
            eprintln!(
                "{liars:?} seed {seed}: accepted {}, unverified {} ({} judged), most tasks to \
                 isolate {:?}, isolations {:?}, restarts {}",
                report.accepted,
                report.unverified,
                report.judged_unverified,
                report.tasks_to_isolate.values().max(),
                report.isolations.values().map(Vec::len).sum::<usize>(),
                report.restarts
            );
            assert_eq!(report.wrong_accepted, 0, "{what}");
            assert_eq!(report.honest_isolated, 0, "{what}");
            // Refusing liars never stop a task with a valid input.
            assert_eq!(report.refused_input, 0, "{what}");
            // Lost messages and crashes cost a few tasks, never most of them.
            assert!(report.accepted >= 270, "{what}");
            for i in [2, 5, 8] {
                let isolations = &report.isolations[&i];
                assert!(report.tasks_to_isolate[&i] <= 10, "{what}");
                // Each isolation is the next offence, twice as long as the one before (the
                // client's restarts forget none).
                for (n, (length, offences)) in isolations.iter().enumerate() {
                    assert_eq!(*offences, n as u32 + 1, "{what}");
                    assert_eq!(*length, BASE_ISOLATION_MS << n, "{what}");
                }
                // Liars come back after their isolation and are caught again.
                assert!(isolations.len() >= 2, "{what}");
            }
            if liars[1] != Replayer {
                assert!(report.evidence > 0, "{what}");
            }
            restarts += report.restarts;
            judged += report.judged_unverified;
        }
    }
    assert!(restarts > 0, "the client was never restarted");
    // Unverified tasks whose answers still proved the right output judged their liars.
    assert!(judged > 0, "no unverified task judged anyone");
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let kinds = workers([Kind::Colluding, Kind::Sometimes, Kind::Replayer]);
    let a = run(7, &kinds, 3, 150);
    let b = run(7, &kinds, 3, 150);
    let c = run(8, &kinds, 3, 150);
    assert_eq!(a.trace, b.trace);
    assert_ne!(a.trace, c.trace);
}

/// The invariant check is not vacuous: with more colluders than a third of the workers the
/// assumption is broken, and a wrong output does get accepted.
#[test]
fn with_more_than_a_third_colluding_a_wrong_output_wins() {
    let mut kinds = workers([Kind::Colluding; 3]);
    kinds[3] = Kind::Colluding;
    kinds[4] = Kind::Colluding;
    let wrong: usize = (1..=4)
        .map(|seed| run(seed, &kinds, 3, 100).wrong_accepted)
        .sum();
    assert!(wrong > 0);
}
