//! `mycel bench secagg`: one securely aggregated round through the round's two state
//! machines (`mycel_core::secround`) in this process, for rounds of several sizes, with
//! everyone as everyone's neighbour and with neighbourhoods (SecAgg+): each participant's
//! CPU time and bytes, and the coordinator's. No network and no training: this measures how
//! the protocol's own work grows with the round's size (key agreements, shares, signatures,
//! mask expansion), which `bench fl` cannot show with ten nodes on one machine.

use std::time::Instant;

use anyhow::bail;
use clap::Args;
use mycel_core::fl::JobId;
use mycel_core::id::ContentId;
use mycel_core::secround::{self, Coordinator, FromParticipant, Participant, Setup, ToParticipant};
use mycel_core::{wire, Keypair, PeerId};
use serde_json::json;

#[derive(Args)]
pub(crate) struct SecaggBenchArgs {
    /// Round sizes (participants).
    #[arg(long, value_delimiter = ',', default_values_t = vec![10usize, 50, 100, 200])]
    participants: Vec<usize>,
    /// Values per update (2,410: the digits job's MLP).
    #[arg(long, default_value_t = 2410)]
    parameters: usize,
    /// Neighbours per participant with neighbourhoods; 0: 2⌈log₂ n⌉ for a round of n.
    #[arg(long, default_value_t = 0)]
    neighbours: u32,
    /// Every how many participants one leaves after sharing its secrets (0: none leaves).
    #[arg(long, default_value_t = 10)]
    drop_every: usize,
    /// Runs per size and mode; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object per size and mode on stdout.
    #[arg(long)]
    json: bool,
}

/// What one round cost.
struct Cost {
    /// CPU (wall, single-threaded) per participant, mean, in ms.
    participant_ms: f64,
    /// The same, the most any participant spent.
    participant_max_ms: f64,
    /// The coordinator's, in ms.
    coordinator_ms: f64,
    /// Bytes a participant sends and receives, mean.
    sent: f64,
    received: f64,
    /// Updates in the sum.
    summed: usize,
}

pub(crate) async fn run(args: SecaggBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    eprintln!(
        "{:>5} {:>11} {:>10} {:>14} {:>13} {:>15} {:>12} {:>12}",
        "n",
        "neighbours",
        "threshold",
        "participant ms",
        "(most) ms",
        "coordinator ms",
        "sent KB",
        "received KB"
    );
    for &n in &args.participants {
        if !(secround::MIN_PARTICIPANTS..=secround::MAX_PARTICIPANTS).contains(&n) {
            bail!(
                "rounds have {} to {} participants, not {n}",
                secround::MIN_PARTICIPANTS,
                secround::MAX_PARTICIPANTS
            );
        }
        let k = if args.neighbours == 0 {
            2 * (n as f64).log2().ceil() as u32
        } else {
            args.neighbours
        };
        let keypairs: Vec<Keypair> = (0..n).map(|_| Keypair::generate_ed25519()).collect();
        let peers: Vec<PeerId> = keypairs.iter().map(|k| k.public().to_peer_id()).collect();
        let complete = Setup::new(&peers, 0.5, n as u64 * 100);
        let ringed = complete.clone().with_neighbours(k, 0.5);
        let mut setups = vec![&complete];
        // Neighbourhoods as large as the round are everyone: measured once.
        if ringed.neighbours != 0 {
            setups.push(&ringed);
        }
        for setup in setups {
            let mut costs = Vec::new();
            for run in 0..args.runs {
                costs.push(round(
                    &keypairs,
                    setup,
                    args.parameters,
                    args.drop_every,
                    run as u8,
                )?);
            }
            let median = |f: &dyn Fn(&Cost) -> f64| {
                let mut v: Vec<f64> = costs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let runs = |f: &dyn Fn(&Cost) -> f64| costs.iter().map(f).collect::<Vec<f64>>();
            let participant_ms = median(&|c| c.participant_ms);
            let participant_max_ms = median(&|c| c.participant_max_ms);
            let coordinator_ms = median(&|c| c.coordinator_ms);
            let sent = median(&|c| c.sent);
            let received = median(&|c| c.received);
            eprintln!(
                "{n:>5} {:>11} {:>10} {participant_ms:>14.2} {participant_max_ms:>13.2} \
                 {coordinator_ms:>15.1} {:>12.1} {:>12.1}",
                if setup.neighbours == 0 {
                    "everyone".to_string()
                } else {
                    setup.neighbours.to_string()
                },
                setup.threshold,
                sent / 1e3,
                received / 1e3
            );
            if args.json {
                super::emit_json(json!({
                    "bench": "secagg",
                    "participants": n,
                    "neighbours": setup.neighbours,
                    "threshold": setup.threshold,
                    "parameters": args.parameters,
                    "dropped": costs[0].summed.abs_diff(n),
                    "runs": args.runs,
                    "participant_ms": participant_ms,
                    "participant_ms_runs": runs(&|c| c.participant_ms),
                    "participant_max_ms": participant_max_ms,
                    "coordinator_ms": coordinator_ms,
                    "coordinator_ms_runs": runs(&|c| c.coordinator_ms),
                    "participant_sent_bytes": sent,
                    "participant_received_bytes": received,
                }));
            }
        }
    }
    Ok(())
}

/// `f`'s result, its wall time (ms) added to `into`.
fn timed<T>(into: &mut f64, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    let out = f();
    *into += start.elapsed().as_secs_f64() * 1e3;
    out
}

/// A seed of its own for run `run`, participant `u` and `step`.
fn seed32(run: u8, u: usize, step: u8) -> [u8; 32] {
    let mut seed = [0u8; 32];
    seed[0] = run;
    seed[1..9].copy_from_slice(&(u as u64).to_le_bytes());
    seed[9] = step;
    seed
}

/// One round of `setup` among `keypairs`, every `drop_every`-th participant leaving after it
/// shared: what it cost.
fn round(
    keypairs: &[Keypair],
    setup: &Setup,
    parameters: usize,
    drop_every: usize,
    seed: u8,
) -> anyhow::Result<Cost> {
    let n = keypairs.len();
    let job = JobId(1);
    let round = 1;
    let mut spent = vec![0f64; n];
    let mut sent = vec![0usize; n];
    let mut received = vec![0usize; n];
    let mut coordinator = 0f64;
    let from_size = |m: FromParticipant| wire::encode(&m).len();
    let to_size = |m: ToParticipant| wire::encode(&m).len();

    let mut c = timed(&mut coordinator, || {
        Coordinator::new(job, round, setup, parameters).map_err(anyhow::Error::msg)
    })?;
    let mut parts = Vec::new();
    let mut keys = Vec::new();
    for (u, kp) in keypairs.iter().enumerate() {
        let mut rng = secround::secret_rng(seed32(seed, u, 0));
        let (p, k) = timed(&mut spent[u], || {
            Ok(Participant::new(kp, job, round, setup, &mut rng)?)
        })?;
        sent[u] += from_size(FromParticipant::Keys(k.clone()));
        parts.push(p);
        keys.push(k);
    }
    for (u, k) in keys.into_iter().enumerate() {
        timed(&mut coordinator, || Ok(c.keys(u, k)?))?;
    }
    let roster = timed(&mut coordinator, || Ok(c.roster()?))?;
    let roster_bytes = to_size(ToParticipant::Roster(roster.clone()));
    for (u, p) in parts.iter_mut().enumerate() {
        received[u] += roster_bytes;
        let mut rng = secround::secret_rng(seed32(seed, u, 1));
        let sealed = timed(&mut spent[u], || Ok(p.share(&roster, &mut rng)?))?;
        sent[u] += from_size(FromParticipant::Shares(sealed.clone()));
        timed(&mut coordinator, || Ok(c.shares(u, sealed)?))?;
    }
    timed(&mut coordinator, || Ok(c.shared()?))?;
    let gone = |u: usize| drop_every > 0 && u % drop_every == drop_every - 1;
    let update: Vec<f32> = (0..parameters).map(|i| (i % 17) as f32 * 1e-3).collect();
    for u in c.sharers() {
        if gone(u) {
            continue;
        }
        let inbox = timed(&mut coordinator, || Ok(c.inbox(u)))?;
        received[u] += to_size(ToParticipant::Inbox(inbox.clone()));
        let masked = timed(&mut spent[u], || {
            let values = secround::pack(&update, 100, 0.5, setup.scale);
            Ok(parts[u].mask(&inbox, &values, 100, ContentId([u as u8; 32]))?)
        })?;
        sent[u] += from_size(FromParticipant::Masked(masked.clone()));
        timed(&mut coordinator, || Ok(c.masked(u, masked)?))?;
    }
    let senders = timed(&mut coordinator, || Ok(c.senders()?))?;
    let confirm_bytes = to_size(ToParticipant::Confirm(senders.clone()));
    for &u in &senders {
        let u = u as usize;
        received[u] += confirm_bytes;
        let signature = timed(&mut spent[u], || {
            Ok(parts[u].confirm(&keypairs[u], &senders)?)
        })?;
        sent[u] += from_size(FromParticipant::Confirmed(signature.clone()));
        timed(&mut coordinator, || Ok(c.confirmed(u, signature)?))?;
    }
    let unmasking = timed(&mut coordinator, || Ok(c.unmasking()?))?;
    let unmask_bytes = wire::encode(&unmasking).len();
    let ToParticipant::Unmask {
        senders,
        signatures,
    } = unmasking
    else {
        bail!("the coordinator asked for something else than unmasking");
    };
    for &u in &senders {
        let u = u as usize;
        received[u] += unmask_bytes;
        let reveal = timed(
            &mut spent[u],
            || Ok(parts[u].reveal(&senders, &signatures)?),
        )?;
        sent[u] += from_size(FromParticipant::Reveal(reveal.clone()));
        timed(&mut coordinator, || Ok(c.reveal(u, reveal)?))?;
    }
    let summed = timed(&mut coordinator, || Ok(c.finish()?))?;
    // Every update is the same: the mean is it, up to the fixed point's rounding (each of
    // the summed weighted values within 2^-17, the weights together at least a half).
    let tolerance = n as f32 * (-16f32).exp2();
    if let Some((got, want)) = summed
        .delta
        .iter()
        .zip(&update)
        .find(|(got, want)| (*got - *want).abs() > tolerance)
    {
        bail!("the unmasked mean is wrong: {got} against {want}");
    }
    let active: Vec<usize> = (0..n).filter(|&u| !gone(u)).collect();
    let mean = |v: &[f64]| active.iter().map(|&u| v[u]).sum::<f64>() / active.len() as f64;
    let as_f64 = |v: &[usize]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    Ok(Cost {
        participant_ms: mean(&spent),
        participant_max_ms: active.iter().map(|&u| spent[u]).fold(0.0, f64::max),
        coordinator_ms: coordinator,
        sent: mean(&as_f64(&sent)),
        received: mean(&as_f64(&received)),
        summed: summed.contributors.len(),
    })
}
