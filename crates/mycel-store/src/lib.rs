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
pub use files::{
    load_or_create_identity, load_or_create_key, load_or_create_token, prepare_data_dir,
};
pub use state::{KnownPeer, Store};

use std::path::{Path, PathBuf};

/// Opens (or creates) the redb database at `path`, which keeps `holds`, with what to do next
/// in the error: the file is held by another node, corrupt (move it away), on a full disk, or
/// written by a newer version. redb checks some invariants with panics in debug builds; a
/// file that trips one is reported as corrupt too, never a crash.
pub(crate) fn open_database(path: &Path, holds: &str) -> Result<redb::Database, String> {
    let shown = path.display();
    let corrupt = |why: &str| {
        format!(
            "the database file is corrupt ({why}); restore it from a backup, or move it away \
             (`mv {shown} {shown}.corrupt`) and start again with a fresh one, losing {holds}"
        )
    };
    // redb would take an empty file for a new database and start afresh without a word:
    // one that was cut to nothing (a copy gone wrong, a disk full at the wrong moment) held
    // something, and its loss is said, not hidden.
    if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
        return Err(corrupt(
            "it is empty: truncated to nothing, or the node stopped while creating it",
        ));
    }
    let opened = std::panic::catch_unwind(|| redb::Database::create(path));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Err(_) => Err(corrupt("it failed redb's own checks")),
        Ok(Err(e)) => Err(match e {
            redb::DatabaseError::DatabaseAlreadyOpen
            | redb::DatabaseError::LockProtocolMismatch => {
                "the database is already open: another mycel node is using this --data-dir \
                 (stop it, or pass another --data-dir)"
                    .to_owned()
            }
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)) => corrupt(&why),
            redb::DatabaseError::Storage(redb::StorageError::Io(io))
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                corrupt(&io.to_string())
            }
            redb::DatabaseError::Storage(redb::StorageError::Io(io)) => io_advice(&io),
            redb::DatabaseError::UpgradeRequired(v) => format!(
                "the database was written in file format {v}, which this build does not read; \
                 run the mycel version that wrote it, or move the file away to start afresh"
            ),
            e => e.to_string(),
        }),
    }
}

/// An I/O error said with what to do: a full disk and a short file are the common ones.
pub(crate) fn io_advice(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::StorageFull => {
            format!("no space left on the device ({e}); free some space and try again")
        }
        std::io::ErrorKind::QuotaExceeded => {
            format!("the disk quota is exceeded ({e}); free some space and try again")
        }
        std::io::ErrorKind::UnexpectedEof => format!(
            "the file is shorter than its contents say ({e}): it is truncated or corrupt; move \
             it away and start again"
        ),
        _ => e.to_string(),
    }
}

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
