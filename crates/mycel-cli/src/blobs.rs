//! `mycel put`, `get`, `pin`, `unpin` and `blobs`: the blob API from the terminal.
//!
//! `put` streams a file to the node (a directory: each file, then the manifest of their ids,
//! whose id is the directory's); `get` has the node fetch the blob (a manifest with its files)
//! from the network with a progress bar, then streams it into place.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mycel_core::blob::{decode_manifest, encode_manifest, safe_path, ManifestEntry};
use mycel_core::id::ContentId;
use serde_json::Value;

use crate::client::ClientArgs;

#[derive(Args)]
pub(crate) struct PutArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The file or directory to store.
    path: PathBuf,
    /// Do not pin it (the store may then evict it when it needs room).
    #[arg(long)]
    no_pin: bool,
}

#[derive(Args)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The content id (blake3:...).
    cid: String,
    /// Where to write it (a directory for a manifest).
    #[arg(short, long)]
    output: PathBuf,
    /// Pin it on the node.
    #[arg(long)]
    pin: bool,
}

#[derive(Args)]
pub(crate) struct CidArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The content id (blake3:...).
    cid: String,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Uploads `reader` as one blob; returns its id.
fn upload(args: &PutArgs, reader: impl Read + Send + 'static) -> anyhow::Result<ContentId> {
    let client = &args.client;
    let request = client
        .agent()
        .post(client.url(&format!("/api/blobs?pin={}", !args.no_pin)))
        .header("Authorization", &client.auth()?)
        .send(ureq::SendBody::from_owned_reader(reader));
    let mut response = client.expect(request, 201)?;
    let answer: Value = response.body_mut().read_json()?;
    answer["id"]
        .as_str()
        .context("the node's answer has no id")?
        .parse()
        .context("the node answered a malformed id")
}

/// Uploads the file at `path`, advancing `bar`.
fn upload_file(args: &PutArgs, path: &Path, bar: &ProgressBar) -> anyhow::Result<ContentId> {
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    upload(
        args,
        Counted {
            inner: file,
            bar: bar.clone(),
        },
    )
}

/// A reader that advances a progress bar.
struct Counted<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// The regular files under `dir`, as (`/`-separated relative path, full path), sorted.
fn files_under(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> anyhow::Result<()> {
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    children.sort();
    for child in children {
        let meta = std::fs::metadata(&child)?;
        if meta.is_dir() {
            files_under(root, &child, out)?;
        } else if meta.is_file() {
            let relative = child
                .strip_prefix(root)?
                .to_str()
                .map(|p| p.replace(std::path::MAIN_SEPARATOR, "/"))
                .filter(|p| safe_path(p))
                .with_context(|| format!("{}: the name is not UTF-8", child.display()))?;
            out.push((relative, child));
        }
    }
    Ok(())
}

pub(crate) fn put(args: PutArgs) -> anyhow::Result<()> {
    let meta = std::fs::metadata(&args.path)
        .with_context(|| format!("cannot read {}", args.path.display()))?;
    let id = if meta.is_file() {
        let bar = bar(meta.len(), "put");
        let id = upload_file(&args, &args.path, &bar)?;
        bar.finish_and_clear();
        id
    } else {
        let mut files = Vec::new();
        files_under(&args.path, &args.path, &mut files)?;
        let total = files
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum();
        let bar = bar(total, "put");
        let mut entries = Vec::with_capacity(files.len());
        for (relative, full) in files {
            let id = upload_file(&args, &full, &bar)?;
            entries.push(ManifestEntry { path: relative, id });
        }
        bar.finish_and_clear();
        upload(&args, std::io::Cursor::new(encode_manifest(&entries)))?
    };
    println!("{id}");
    Ok(())
}

/// Has the node fetch `cid` (and a manifest's files), showing progress.
fn fetch(client: &ClientArgs, cid: &str, pin: bool) -> anyhow::Result<()> {
    let request = client
        .agent()
        .post(client.url(&format!("/api/blobs/{cid}/fetch?pin={pin}")))
        .header("Authorization", &client.auth()?)
        .send_empty();
    let response = client.expect(request, 200)?;
    let bar = bar(0, "fetch");
    let reader = BufReader::new(response.into_body().into_reader());
    for line in reader.lines() {
        let line = line.context("the node stopped answering")?;
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let event: Value = serde_json::from_str(data.trim())?;
        if let Some(e) = event["error"].as_str() {
            bar.abandon();
            bail!("the node could not fetch {cid}: {e}");
        }
        bar.set_length(event["total"].as_u64().unwrap_or(0));
        bar.set_position(event["done"].as_u64().unwrap_or(0));
        if event["complete"].as_bool() == Some(true) {
            bar.finish_and_clear();
            return Ok(());
        }
    }
    bail!("the node closed the fetch of {cid} without finishing it")
}

/// Streams blob `id` from the node into `path` (written aside, then renamed into place).
fn download(client: &ClientArgs, id: &ContentId, path: &Path) -> anyhow::Result<()> {
    let request = client
        .agent()
        .get(client.url(&format!("/api/blobs/{id}")))
        .header("Authorization", &client.auth()?)
        .call();
    let response = client.expect(request, 200)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let part = path.with_extension("mycel-part");
    let mut out =
        File::create(&part).with_context(|| format!("cannot write {}", part.display()))?;
    let mut body = response
        .into_body()
        .into_with_config()
        .limit(u64::MAX)
        .reader();
    std::io::copy(&mut body, &mut out).context("the download broke off")?;
    out.sync_all()?;
    std::fs::rename(&part, path)?;
    Ok(())
}

pub(crate) fn get(args: GetArgs) -> anyhow::Result<()> {
    let id: ContentId = args.cid.parse().with_context(|| {
        format!(
            "{:?} is not a content id (blake3:<64 hex digits>)",
            args.cid
        )
    })?;
    fetch(&args.client, &args.cid, args.pin)?;
    // A manifest is small: read it to see whether this is a directory.
    let manifest_path = args.output.with_extension("mycel-manifest");
    download(&args.client, &id, &manifest_path)?;
    let bytes = std::fs::read(&manifest_path)?;
    match decode_manifest(&bytes) {
        Ok(entries) => {
            std::fs::remove_file(&manifest_path)?;
            for entry in entries {
                download(&args.client, &entry.id, &args.output.join(&entry.path))?;
            }
        }
        Err(_) => std::fs::rename(&manifest_path, &args.output)?,
    }
    println!("{}", args.output.display());
    Ok(())
}

fn pin_request(args: &CidArgs, pin: bool) -> anyhow::Result<()> {
    let client = &args.client;
    let (agent, path, auth) = (
        client.agent(),
        client.url(&format!("/api/blobs/{}", args.cid)),
        client.auth()?,
    );
    let request = if pin {
        agent
            .post(format!("{path}/pin"))
            .header("Authorization", &auth)
            .send_empty()
    } else {
        agent.delete(&path).header("Authorization", &auth).call()
    };
    client.expect(request, 200)?;
    println!("{} {}", if pin { "pinned" } else { "unpinned" }, args.cid);
    Ok(())
}

pub(crate) fn pin(args: CidArgs) -> anyhow::Result<()> {
    pin_request(&args, true)
}

pub(crate) fn unpin(args: CidArgs) -> anyhow::Result<()> {
    pin_request(&args, false)
}

pub(crate) fn list(args: ClientArgs) -> anyhow::Result<()> {
    let listed = args.get("/api/blobs")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(());
    }
    println!("{:<71}  {:>12}  pinned", "id", "bytes");
    for blob in listed["blobs"].as_array().into_iter().flatten() {
        println!(
            "{:<71}  {:>12}  {}",
            blob["id"].as_str().unwrap_or("?"),
            blob["size"],
            if blob["pinned"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
        );
    }
    println!("{} of {} bytes used", listed["used"], listed["quota"]);
    Ok(())
}
