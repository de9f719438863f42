//! Identity and API token files, owner-only.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p_identity::Keypair;
use rand::RngCore;

use crate::StoreError;

const IDENTITY_FILE: &str = "identity.key";
const TOKEN_FILE: &str = "api.token";

fn dir_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::DataDir {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the data directory (owner-only) if needed and checks that it is writable.
pub fn prepare_data_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(|e| dir_error(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| dir_error(dir, e))?;
    let probe = dir.join(".write-probe");
    fs::write(&probe, b"ok").map_err(|e| dir_error(dir, e))?;
    fs::remove_file(&probe).map_err(|e| dir_error(dir, e))?;
    Ok(())
}

/// Creates `path` with `bytes`, atomically and with mode 0600: a temporary file of this
/// call's own, fsync, then a hard link that fails when `path` exists. Returns false when
/// another process created `path` meanwhile (nodes sharing an operator key start at once):
/// the caller reads that one instead.
fn write_private(path: &Path, bytes: &[u8]) -> Result<bool, StoreError> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nth = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp: PathBuf = path.with_extension(format!("tmp.{}.{nth}", std::process::id()));
    let write = || -> std::io::Result<bool> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        let linked = match fs::hard_link(&tmp, path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::remove_file(&tmp)?;
        fs::File::open(dir)?.sync_all()?;
        Ok(linked)
    };
    write().map_err(|e| dir_error(dir, e))
}

/// Reads a secret file, if it exists: one that users other than its owner may read or
/// write is refused (an API token anyone on the machine can read is no protection).
fn read_existing(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => {
            let mode = fs::metadata(path)
                .map_err(|e| StoreError::CorruptFile {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(StoreError::LoosePermissions {
                    path: path.to_path_buf(),
                    mode: mode & 0o7777,
                });
            }
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::CorruptFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Loads the node's identity from `dir`, creating one on first start.
pub fn load_or_create_identity(dir: &Path) -> Result<Keypair, StoreError> {
    load_or_create_key(&dir.join(IDENTITY_FILE))
}

/// Loads a key (protobuf-encoded, readable by its owner only) from `path`, creating one
/// there when there is none: an operator's key, shared by the nodes it runs.
pub fn load_or_create_key(path: &Path) -> Result<Keypair, StoreError> {
    let path = path.to_path_buf();
    if let Some(bytes) = read_existing(&path)? {
        return Keypair::from_protobuf_encoding(&bytes).map_err(|e| StoreError::CorruptFile {
            path: path.clone(),
            reason: e.to_string(),
        });
    }
    let keypair = Keypair::generate_ed25519();
    let encoded = keypair
        .to_protobuf_encoding()
        .map_err(|e| StoreError::CorruptFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if write_private(&path, &encoded)? {
        Ok(keypair)
    } else {
        load_or_create_key(&path)
    }
}

/// Loads the API bearer token from `dir`, creating a random one on first start.
pub fn load_or_create_token(dir: &Path) -> Result<String, StoreError> {
    let path = dir.join(TOKEN_FILE);
    if let Some(bytes) = read_existing(&path)? {
        let token = String::from_utf8(bytes)
            .map(|t| t.trim().to_owned())
            .map_err(|e| StoreError::CorruptFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if token.len() < 16 {
            return Err(StoreError::CorruptFile {
                path,
                reason: "token too short".into(),
            });
        }
        return Ok(token);
    }
    let mut raw = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut raw);
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    if write_private(&path, token.as_bytes())? {
        Ok(token)
    } else {
        load_or_create_token(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_and_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        prepare_data_dir(dir.path()).unwrap();
        let first = load_or_create_identity(dir.path()).unwrap();
        let second = load_or_create_identity(dir.path()).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        let mode = fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[test]
    fn token_is_stable_and_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_token(dir.path()).unwrap();
        assert_eq!(first, load_or_create_token(dir.path()).unwrap());
        assert_eq!(first.len(), 48);
        let mode = fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn nodes_creating_one_operator_key_at_once_all_get_the_one_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator.key");
        let keys: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create_key(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let on_disk = load_or_create_key(&path).unwrap().public();
        assert!(keys.iter().all(|k| k.public() == on_disk));
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn corrupt_identity_is_a_clear_error_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(IDENTITY_FILE), b"garbage").unwrap();
        fs::set_permissions(
            dir.path().join(IDENTITY_FILE),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let err = load_or_create_identity(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::CorruptFile { .. }), "{err}");
        assert!(err.to_string().contains("identity.key"));
        assert_eq!(
            fs::read(dir.path().join(IDENTITY_FILE)).unwrap(),
            b"garbage"
        );
    }

    #[test]
    fn a_secret_file_others_may_read_is_refused_with_the_fix_named() {
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create_token(dir.path()).unwrap();
        let identity = load_or_create_identity(dir.path()).unwrap();
        for file in [TOKEN_FILE, IDENTITY_FILE] {
            let path = dir.path().join(file);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            let err = match file {
                TOKEN_FILE => load_or_create_token(dir.path()).unwrap_err(),
                _ => load_or_create_identity(dir.path()).map(|_| ()).unwrap_err(),
            };
            assert!(
                matches!(err, StoreError::LoosePermissions { mode: 0o644, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        // Fixed as told, both load as before (nothing was rewritten).
        assert_eq!(load_or_create_token(dir.path()).unwrap(), token);
        assert_eq!(
            load_or_create_identity(dir.path()).unwrap().public(),
            identity.public()
        );
    }

    #[test]
    fn unwritable_data_dir_is_reported() {
        let err = prepare_data_dir(Path::new("/proc/mycel-cannot-exist")).unwrap_err();
        assert!(err.to_string().contains("--data-dir"), "{err}");
    }
}
