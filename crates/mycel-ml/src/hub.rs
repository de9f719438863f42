//! Models named on the Hugging Face hub (`hf:ORG/REPO` for an embedding model's directory,
//! `hf:ORG/REPO/FILE.gguf` for a GGUF file), fetched with the `hf-hub` crate into its cache
//! (`HF_HOME`), from `HF_ENDPOINT` when set (a mirror, or a local server in tests).

use std::path::PathBuf;

use hf_hub::api::sync::{Api, ApiBuilder};

use crate::embed::EMBEDDER_FILES;
use crate::{MlError, Result};

/// Prefix of a hub model name.
pub const HUB_PREFIX: &str = "hf:";

/// Whether `name` names a model on the hub.
pub fn is_hub_name(name: &str) -> bool {
    name.starts_with(HUB_PREFIX)
}

/// Fetches the model `name` (see the module docs) with the environment's endpoint, cache and
/// token, and returns its local path.
pub fn fetch(name: &str) -> Result<PathBuf> {
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| MlError::Run(format!("cannot set up the hub client: {e}")))?;
    fetch_with(&api, name)
}

/// Fetches the model `name` with `api`.
pub fn fetch_with(api: &Api, name: &str) -> Result<PathBuf> {
    let bad = || {
        MlError::Input(format!(
            "{name:?} is not a hub model name: use hf:ORG/REPO (an embedding model) or \
             hf:ORG/REPO/FILE.gguf"
        ))
    };
    let rest = name.strip_prefix(HUB_PREFIX).ok_or_else(bad)?;
    let mut parts = rest.splitn(3, '/');
    let (org, repo) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
    if org.is_empty() || repo.is_empty() {
        return Err(bad());
    }
    let repo_api = api.model(format!("{org}/{repo}"));
    let get = |file: &str| {
        repo_api.get(file).map_err(|e| MlError::Model {
            path: format!("{name} ({file})"),
            reason: format!(
                "cannot fetch it from the hub ({e}); check the name, HF_ENDPOINT and HF_TOKEN"
            ),
        })
    };
    match parts.next() {
        Some(file) if !file.is_empty() => get(file),
        _ => {
            let mut dir = None;
            for file in EMBEDDER_FILES {
                dir = get(file)?.parent().map(PathBuf::from);
            }
            dir.ok_or_else(bad)
        }
    }
}
