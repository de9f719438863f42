//! Model files and their content ids.

use std::fs::File;
use std::path::Path;

use mycel_core::id::ContentId;

use crate::{MlError, Result};

/// The id of one file: BLAKE3 of its bytes, read in a stream.
pub fn file_id(path: &Path) -> Result<ContentId> {
    let file = File::open(path).map_err(|e| MlError::model(path, e))?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(file)
        .map_err(|e| MlError::model(path, e))?;
    Ok(ContentId(*hasher.finalize().as_bytes()))
}

/// The id of a model: of the file itself for a single-file model (GGUF); for a directory, a
/// manifest over the `files` the model is loaded from (relative to `root`), so that a README
/// beside the weights does not change the model's identity.
pub fn model_id(root: &Path, files: &[&str]) -> Result<ContentId> {
    if root.is_file() {
        return file_id(root);
    }
    let mut ids = Vec::with_capacity(files.len());
    for name in files {
        ids.push((*name, file_id(&root.join(name))?));
    }
    Ok(ContentId::of_manifest(ids))
}

/// The model's name: the file stem or directory name.
pub fn model_name(path: &Path) -> String {
    let name = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}
