//! `mycel train JOB.toml` and `mycel jobs`: federated training jobs through a node's API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mycel_core::fl::JobSpec;
use serde_json::Value;

use crate::client::ClientArgs;

#[derive(Args)]
pub(crate) struct TrainArgs {
    /// The job spec: a TOML (or .json) file; see README.md for the fields.
    job: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
    /// Start the job and return at once (follow it with `mycel jobs`).
    #[arg(long)]
    detach: bool,
}

/// Reads and checks a job spec file.
pub(crate) fn read_spec(path: &std::path::Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the job spec {}", path.display()))?;
    let spec: JobSpec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a job spec", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{} is not a job spec", path.display()))?
    };
    spec.check()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(spec)
}

pub(crate) fn train(args: TrainArgs) -> anyhow::Result<()> {
    let spec = read_spec(&args.job)?;
    let client = &args.client;
    let response = client
        .agent()
        .post(&client.url("/api/train"))
        .header("Authorization", &client.auth()?)
        .send_json(&spec);
    let mut response = client.expect(response, 202)?;
    let started: Value = response
        .body_mut()
        .read_json()
        .context("the node sent invalid JSON")?;
    let id = started["id"]
        .as_str()
        .context("the node sent no job id")?
        .to_owned();
    if args.detach {
        println!("{id}");
        return Ok(());
    }
    let bar = ProgressBar::new(u64::from(spec.rounds));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] round {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("training {}", short(&id)));
    if let Some(secure) = &spec.secure_aggregation {
        bar.println(format!(
            "secure aggregation: the coordinator sees only each round's sum; a round \
             completes while {:.0}% of its participants (at least a majority) remain",
            secure.threshold * 100.0
        ));
    }
    let job = loop {
        let job = client.get(&format!("/api/train/{id}"))?;
        let round = job["round"].as_u64().unwrap_or(0);
        bar.set_position(round);
        if let Some(last) = job["metrics"].as_array().and_then(|m| m.last()) {
            let spent = match last["epsilon"].as_f64() {
                Some(eps) => format!(" ε {eps:.3}"),
                None => String::new(),
            };
            bar.set_message(format!(
                "loss {} acc {}{spent}",
                num(&last["train_loss"], 4),
                num(&last["accuracy"], 3)
            ));
        }
        match job["state"].as_str() {
            Some("done") => break job,
            Some("failed") => {
                bar.abandon();
                bail!(
                    "the job failed after {round} rounds: {}; run the same command again to \
                     resume it from there",
                    job["error"].as_str().unwrap_or("no details")
                );
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    bar.finish();
    if client.json {
        println!("{job}");
    } else {
        print_table(&job);
    }
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".into(),
    }
}

fn print_table(job: &Value) {
    // A differentially private job shows the ε spent after each round.
    let private = job["spec"]["privacy"].is_object();
    let epsilon = |v: &Value| {
        if private {
            format!(" {:>8}", num(v, 3))
        } else {
            String::new()
        }
    };
    println!(
        "{:>5} {:>6} {:>7} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8}{}",
        "round",
        "peers",
        "dropped",
        "loss",
        "accuracy",
        "bytes up",
        "bytes down",
        "bytes root",
        "ms",
        if private {
            format!(" {:>8}", "ε")
        } else {
            String::new()
        }
    );
    for m in job["metrics"].as_array().into_iter().flatten() {
        println!(
            "{:>5} {:>6} {:>7} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8}{}",
            m["round"],
            m["participants"],
            m["dropped"],
            num(&m["train_loss"], 4),
            num(&m["accuracy"], 4),
            m["bytes_up"],
            m["bytes_down"],
            m["bytes_root"],
            num(&m["ms"], 1),
            epsilon(&m["epsilon"])
        );
    }
    if let Some(why) = job["stopped"].as_str() {
        println!("{why}");
    }
    println!(
        "job {} done: {} rounds in {} ms; model {}",
        job["id"].as_str().unwrap_or("?"),
        job["round"],
        num(&job["elapsed_ms"], 0),
        job["model"].as_str().unwrap_or("-")
    );
}

pub(crate) fn jobs(args: ClientArgs) -> anyhow::Result<()> {
    let jobs = args.get("/api/train")?;
    if args.json {
        println!("{jobs}");
        return Ok(());
    }
    let list = jobs.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no training jobs on this node; start one with `mycel train JOB.toml`");
        return Ok(());
    }
    println!(
        "{:<32} {:<16} {:<8} {:>9} {:>9}",
        "id", "name", "state", "round", "accuracy"
    );
    for job in list {
        let acc = job["metrics"]
            .as_array()
            .and_then(|m| m.last())
            .map(|m| num(&m["accuracy"], 4))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:<16} {:<8} {:>4}/{:<4} {:>9}",
            job["id"].as_str().unwrap_or("?"),
            job["name"].as_str().unwrap_or(""),
            job["state"].as_str().unwrap_or("?"),
            job["round"],
            job["rounds"],
            acc
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_job_in_the_readme_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../jobs/digits.toml");
        let spec = read_spec(&path).unwrap();
        assert_eq!((spec.dataset.as_str(), spec.rounds), ("digits", 20));
        assert!(spec.privacy.is_none());
        // Its privacy section, uncommented, is a valid private job.
        let text = std::fs::read_to_string(&path).unwrap();
        let private = text
            .replace("# [privacy]", "[privacy]")
            .replace("# clip", "clip");
        let private = private
            .replace("# noise_multiplier", "noise_multiplier")
            .replace("# delta", "delta")
            .replace("# epsilon", "epsilon");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("private.toml");
        std::fs::write(&file, private).unwrap();
        let spec = read_spec(&file).unwrap();
        assert_eq!(spec.privacy.map(|p| p.epsilon), Some(Some(8.0)));
        spec.check().unwrap();
        // So is its secure aggregation section, with at least three participants.
        let secure = text
            .replace("# [secure_aggregation]", "[secure_aggregation]")
            .replace("# threshold", "threshold")
            .replace("# neighbours =", "neighbours =")
            .replace("min = 2 ", "min = 3 ");
        let file = dir.path().join("secure.toml");
        std::fs::write(&file, &secure).unwrap();
        let spec = read_spec(&file).unwrap();
        assert_eq!(
            spec.secure_aggregation.map(|s| (s.threshold, s.neighbours)),
            Some((0.5, 0))
        );
        // And both at once: distributed noise under secure aggregation.
        let both = secure
            .replace("# [privacy]", "[privacy]")
            .replace("# clip", "clip")
            .replace("# noise_multiplier", "noise_multiplier")
            .replace("# delta", "delta")
            .replace("# epsilon", "epsilon");
        let file = dir.path().join("both.toml");
        std::fs::write(&file, both).unwrap();
        let spec = read_spec(&file).unwrap();
        assert!(spec.privacy.is_some() && spec.secure_aggregation.is_some());
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "dataset = \"digits\"\ncolour = 1\n").unwrap();
        assert!(read_spec(&bad).is_err());
    }
}
