//! Mycel's on-disk state.
//!
//! A data directory holds the node's ed25519 identity (`identity.key`), the bearer token of its
//! HTTP API (`api.token`), both readable by the owner only, and a redb database (`state.redb`)
//! with the peer book and the node's announcement sequence counter. redb commits are
//! transactional and survive `kill -9`; the key files are written to a temporary file, synced
//! and renamed into place, so a crash never leaves a half-written identity.
//!
//! [`BlobStore`] keeps content-addressed blobs under `blobs/` with its own index (see
//! [`blobs`]).

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod blobs;
mod direct;
mod files;
mod state;

pub use blobs::{BlobError, BlobInfo, BlobStore, ChunkReader, Quarantine};
pub use direct::{preallocate, ChunkBuf, DirectWriter};
pub use files::{load_or_create_identity, load_or_create_token, prepare_data_dir};
pub use state::{KnownPeer, Store};

use std::path::PathBuf;

/// Errors of the store, each saying which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory cannot be created or written.
    #[error("data directory {path} is not usable ({source}); pass a writable --data-dir or fix its permissions")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key or token file exists but cannot be read or decoded.
    #[error("{path} is unreadable or corrupt ({reason}); restore it from a backup or move it away to create a new one (a new identity means a new peer id)")]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A secret file others may read or write.
    #[error("{path} may be read or written by other users (mode {mode:04o}), and it holds a secret; run `chmod 600 {path}` (and check who read it), then start again")]
    LoosePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The database failed.
    #[error("state database {path}: {reason}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}
