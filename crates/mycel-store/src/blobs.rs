//! The blob store: content-addressed blobs on disk, verified chunk by chunk.
//!
//! Layout under the store's directory:
//! - `index.redb`: per complete blob its size, pin and last access; per blob its outboard
//!   (the chunk hashes, [`mycel_core::blob::Outboard`]); per fetch in progress the chunks
//!   verified so far;
//! - `data/<2 hex>/<64 hex>`: a complete blob's bytes;
//! - `partial/<64 hex>`: a blob being fetched, full size, chunks written where they belong;
//! - `tmp/`: imports in progress.
//!
//! Bytes stream through: an import hashes and writes 256 KiB at a time, an export or a served
//! chunk reads from the file, so a blob is never held whole in memory.
//!
//! Bit rot: every chunk read to be served, exported or returned by the API is hashed
//! against the blob's outboard first. A chunk that no longer matches is never handed out
//! ([`BlobError::Corrupt`]); [`BlobStore::quarantine`] then turns the blob back into a fetch
//! holding only its chunks that still verify, so the node can repair it from peers (or, if
//! no peer has it, it is simply no longer here).
//!
//! Crash safety: a complete blob is written, synced and renamed into `data/` before its index
//! entry is committed, and only blobs with an entry are served. On open, the store drops
//! imports in progress, data files without an entry and entries without their file, and
//! re-hashes every chunk of each fetch in progress (the marks of verified chunks are saved
//! lazily, and a chunk's bytes may not have reached the disk), so a `kill -9` at any moment
//! leaves a consistent store and a fetch that resumes with every chunk that did arrive.
//!
//! A quota bounds the bytes of complete blobs plus fetches in progress: admitting a blob
//! evicts unpinned blobs least recently used first; pinned blobs are never evicted, and a blob
//! larger than the quota is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::direct::{preallocate, ChunkBuf, DirectWriter};
use mycel_core::blob::{
    chunk_count, chunk_len, decode_manifest, encode_manifest, safe_path, ManifestEntry,
    ManifestError, Outboard, TreeError, TreeHasher, CHUNK_BYTES, MANIFEST_MAGIC,
};
use mycel_core::id::ContentId;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const INDEX_FILE: &str = "index.redb";
const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
const OUTBOARDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("outboards");
const PARTIAL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("partial");
/// Fetches that repair a blob found corrupt, and whether it was pinned.
const REPAIRS: TableDefinition<&[u8], bool> = TableDefinition::new("repairs");
/// Largest index record decoded.
const MAX_META_BYTES: usize = 1024;
/// Deepest directory imported (symbolic links are followed; this stops loops).
const MAX_DEPTH: usize = 32;
/// Largest manifest read into memory (a directory of ~100 000 files).
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// What went wrong in the blob store, saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A file could not be read or written.
    #[error("{}: {}", path.display(), crate::io_advice(source))]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The index failed.
    #[error("blob index: {0}")]
    Index(String),
    /// The blob can never fit.
    #[error("the blob is {size} bytes, more than the store's whole quota of {quota} bytes; raise --blob-quota")]
    TooLarge {
        /// The blob's size.
        size: u64,
        /// The quota.
        quota: u64,
    },
    /// The blob would fit the quota, but pinned blobs take the room.
    #[error("{size} bytes do not fit: pinned blobs hold {pinned} of the quota of {quota} bytes; unpin some (`mycel unpin CID`) or raise --blob-quota")]
    Full {
        /// The blob's size.
        size: u64,
        /// Bytes held by pinned blobs and fetches in progress.
        pinned: u64,
        /// The quota.
        quota: u64,
    },
    /// No such blob here.
    #[error("no blob {0} in this store")]
    NotFound(ContentId),
    /// A stored chunk no longer matches its hash (the disk changed it).
    #[error("blob {id} is corrupt on this disk (chunk {chunk} no longer matches its hash): it is not served; the node repairs it from peers that hold it (`mycel fetch {id}` to retry)")]
    Corrupt {
        /// The blob.
        id: ContentId,
        /// The first chunk found corrupt.
        chunk: u64,
    },
    /// Hashes or bytes that do not belong to the id.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// A blob taken for a manifest is not one.
    #[error("bad manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// Something that cannot be imported.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn index_error(e: impl std::fmt::Display) -> BlobError {
    BlobError::Index(e.to_string())
}

/// A blob's index entry.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Meta {
    size: u64,
    pinned: bool,
    last_access: u64,
}

/// A complete blob in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its content id.
    pub id: ContentId,
    /// Its length in bytes.
    pub size: u64,
    /// Whether eviction leaves it alone.
    pub pinned: bool,
    /// When it was last imported, fetched or read (Unix milliseconds).
    pub last_access: u64,
}

/// The blob store of one node.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    db: Database,
    quota: u64,
    /// Held while room is made for a blob and it is entered, so that two admissions do not
    /// both count the same free space.
    admission: Mutex<()>,
    /// Fetches in progress: the outboard and the open partial file, read once per fetch
    /// rather than once per chunk.
    fetching: Mutex<std::collections::HashMap<ContentId, Arc<Fetching>>>,
}

/// A fetch's outboard and partial file, kept open while chunks arrive.
#[derive(Debug)]
struct Fetching {
    outboard: Outboard,
    file: File,
    /// The same file, for chunks written past the page cache.
    direct: DirectWriter,
    /// Held while writing to `file` (not for direct writes).
    writing: Mutex<()>,
    /// Which chunks are verified (1) or not (0): kept here and saved to the index every
    /// [`MARKS_SAVED_EVERY`] chunks and at the end, not once per chunk. Marks lost in a crash
    /// only mean chunks fetched again.
    marks: Mutex<(Vec<u8>, usize)>,
}

/// Verified chunks between two saves of a fetch's marks.
const MARKS_SAVED_EVERY: usize = 32;

impl BlobStore {
    /// Opens (or creates) the store in `dir` with a quota of `quota` bytes, and brings it back
    /// to a consistent state after a crash (see the module docs).
    pub fn open(dir: &Path, quota: u64) -> Result<Self, BlobError> {
        for sub in ["data", "partial"] {
            fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub)))?;
        }
        let tmp = dir.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let path = dir.join(INDEX_FILE);
        let db = crate::open_database(
            &path,
            "the blob index (the blobs must then be put or fetched again)",
        )
        .map_err(|reason| BlobError::Index(format!("{}: {reason}", path.display())))?;
        let store = Self {
            dir: dir.to_path_buf(),
            db,
            quota,
            admission: Mutex::new(()),
            fetching: Mutex::new(std::collections::HashMap::new()),
        };
        store.write(Durability::Immediate, |txn| {
            txn.open_table(BLOBS)?;
            txn.open_table(OUTBOARDS)?;
            txn.open_table(PARTIAL)?;
            txn.open_table(REPAIRS)?;
            Ok(())
        })?;
        store.recover()?;
        Ok(store)
    }

    fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, BlobError> {
        let mut txn = self.db.begin_write().map_err(index_error)?;
        txn.set_durability(durability).map_err(index_error)?;
        let value = f(&txn).map_err(index_error)?;
        txn.commit().map_err(index_error)?;
        Ok(value)
    }

    fn data_path(&self, id: &ContentId) -> PathBuf {
        let hex = hex(id);
        self.dir.join("data").join(&hex[..2]).join(hex)
    }

    fn partial_path(&self, id: &ContentId) -> PathBuf {
        self.dir.join("partial").join(hex(id))
    }

    /// Drops what a crash left half-done; see the module docs.
    fn recover(&self) -> Result<(), BlobError> {
        // Entries whose file is missing or has the wrong size.
        let entries = self.entries()?;
        let broken: Vec<ContentId> = entries
            .iter()
            .filter(|b| fs::metadata(self.data_path(&b.id)).map_or(true, |m| m.len() != b.size))
            .map(|b| b.id)
            .collect();
        self.write(Durability::Immediate, |txn| {
            let mut blobs = txn.open_table(BLOBS)?;
            let mut outboards = txn.open_table(OUTBOARDS)?;
            for id in &broken {
                blobs.remove(id.0.as_slice())?;
                outboards.remove(id.0.as_slice())?;
            }
            Ok(())
        })?;
        // Data files without an entry: renamed into place just before a crash.
        let known: std::collections::HashSet<String> = entries
            .iter()
            .filter(|b| !broken.contains(&b.id))
            .map(|b| hex(&b.id))
            .collect();
        let data = self.dir.join("data");
        for shard in fs::read_dir(&data).map_err(io(&data))? {
            let shard = shard.map_err(io(&data))?.path();
            for file in fs::read_dir(&shard).map_err(io(&shard))? {
                let file = file.map_err(io(&shard))?.path();
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
                if !name.is_some_and(|n| known.contains(&n)) {
                    fs::remove_file(&file).map_err(io(&file))?;
                }
            }
        }
        // Fetches in progress: the chunks whose bytes are really there, whatever the saved
        // marks say (marks are saved lazily, and a marked chunk's bytes may not have reached
        // the disk).
        let partial_dir = self.dir.join("partial");
        let mut partial = Vec::new();
        {
            let txn = self.db.begin_read().map_err(index_error)?;
            let table = txn.open_table(PARTIAL).map_err(index_error)?;
            for row in table.iter().map_err(index_error)? {
                let (key, marks) = row.map_err(index_error)?;
                if let Ok(id) = <[u8; 32]>::try_from(key.value()) {
                    partial.push((ContentId(id), marks.value().to_vec()));
                }
            }
        }
        for (id, _saved) in partial {
            let file = File::open(self.partial_path(&id)).ok();
            let outboard = self.outboard(&id)?;
            let (Some(file), Some(outboard)) = (file, outboard) else {
                self.forget_partial(&id)?;
                continue;
            };
            let marks = verified_marks(&file, &outboard, &id);
            self.write(Durability::Immediate, |txn| {
                txn.open_table(PARTIAL)?
                    .insert(id.0.as_slice(), marks.as_slice())?;
                Ok(())
            })?;
        }
        let fetching: std::collections::HashSet<String> =
            self.fetches()?.iter().map(|(id, _)| hex(id)).collect();
        for file in fs::read_dir(&partial_dir).map_err(io(&partial_dir))? {
            let file = file.map_err(io(&partial_dir))?.path();
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
            if !name.is_some_and(|n| fetching.contains(&n)) {
                fs::remove_file(&file).map_err(io(&file))?;
            }
        }
        Ok(())
    }

    fn forget_partial(&self, id: &ContentId) -> Result<(), BlobError> {
        self.fetch_done(id);
        self.write(Durability::Immediate, |txn| {
            txn.open_table(PARTIAL)?.remove(id.0.as_slice())?;
            txn.open_table(REPAIRS)?.remove(id.0.as_slice())?;
            if txn.open_table(BLOBS)?.get(id.0.as_slice())?.is_none() {
                txn.open_table(OUTBOARDS)?.remove(id.0.as_slice())?;
            }
            Ok(())
        })?;
        let path = self.partial_path(id);
        if path.exists() {
            fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(())
    }

    /// The quota in bytes.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Every complete blob.
    pub fn entries(&self) -> Result<Vec<BlobInfo>, BlobError> {
        let txn = self.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(BLOBS).map_err(index_error)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(index_error)? {
            let (key, value) = row.map_err(index_error)?;
            let (Ok(id), Ok(meta)) = (
                <[u8; 32]>::try_from(key.value()),
                mycel_core::wire::decode::<Meta>(value.value(), MAX_META_BYTES),
            ) else {
                continue;
            };
            out.push(info(ContentId(id), meta));
        }
        Ok(out)
    }

    /// Fetches in progress: each blob's id and outboard size.
    fn fetches(&self) -> Result<Vec<(ContentId, u64)>, BlobError> {
        let txn = self.db.begin_read().map_err(index_error)?;
        let partial = txn.open_table(PARTIAL).map_err(index_error)?;
        let mut out = Vec::new();
        for row in partial.iter().map_err(index_error)? {
            let (key, _) = row.map_err(index_error)?;
            if let Ok(id) = <[u8; 32]>::try_from(key.value()) {
                let id = ContentId(id);
                if let Some(outboard) = self.outboard(&id)? {
                    out.push((id, outboard.size));
                }
            }
        }
        Ok(out)
    }

    /// Bytes held: complete blobs and fetches in progress.
    pub fn used(&self) -> Result<u64, BlobError> {
        let complete: u64 = self.entries()?.iter().map(|b| b.size).sum();
        let fetching: u64 = self.fetches()?.iter().map(|(_, size)| size).sum();
        Ok(complete + fetching)
    }

    /// The complete blob `id`, if the store has it.
    pub fn info(&self, id: &ContentId) -> Result<Option<BlobInfo>, BlobError> {
        let txn = self.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(BLOBS).map_err(index_error)?;
        let meta = table.get(id.0.as_slice()).map_err(index_error)?;
        Ok(meta
            .and_then(|m| mycel_core::wire::decode::<Meta>(m.value(), MAX_META_BYTES).ok())
            .map(|m| info(*id, m)))
    }

    /// The outboard of `id` (complete or being fetched).
    pub fn outboard(&self, id: &ContentId) -> Result<Option<Outboard>, BlobError> {
        let txn = self.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(OUTBOARDS).map_err(index_error)?;
        let bytes = table.get(id.0.as_slice()).map_err(index_error)?;
        bytes
            .map(|b| Outboard::from_bytes(b.value()).map_err(BlobError::from))
            .transpose()
    }

    /// Makes room for `size` more bytes (evicting unpinned blobs, least recently used first,
    /// never `keep`) and runs `enter` while the room is held.
    fn admit<T>(
        &self,
        size: u64,
        keep: &ContentId,
        enter: impl FnOnce() -> Result<T, BlobError>,
    ) -> Result<T, BlobError> {
        if size > self.quota {
            return Err(BlobError::TooLarge {
                size,
                quota: self.quota,
            });
        }
        let _held = self.admission.lock().unwrap_or_else(|e| e.into_inner());
        let mut used = self.used()?;
        if used + size > self.quota {
            let mut evictable: Vec<BlobInfo> = self
                .entries()?
                .into_iter()
                .filter(|b| !b.pinned && b.id != *keep)
                .collect();
            evictable.sort_by_key(|b| b.last_access);
            let room: u64 = evictable.iter().map(|b| b.size).sum();
            if used - room + size > self.quota {
                return Err(BlobError::Full {
                    size,
                    pinned: used - room,
                    quota: self.quota,
                });
            }
            for blob in evictable {
                if used + size <= self.quota {
                    break;
                }
                self.remove(&blob.id)?;
                used -= blob.size;
            }
        }
        enter()
    }

    /// Deletes the complete blob `id` (pinned or not).
    pub fn remove(&self, id: &ContentId) -> Result<bool, BlobError> {
        let existed = self.write(Durability::Immediate, |txn| {
            let existed = txn.open_table(BLOBS)?.remove(id.0.as_slice())?.is_some();
            if txn.open_table(PARTIAL)?.get(id.0.as_slice())?.is_none() {
                txn.open_table(OUTBOARDS)?.remove(id.0.as_slice())?;
            }
            Ok(existed)
        })?;
        let path = self.data_path(id);
        if path.exists() {
            fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(existed)
    }

    fn put_meta(
        &self,
        id: &ContentId,
        meta: Meta,
        durability: Durability,
    ) -> Result<(), BlobError> {
        let bytes = mycel_core::wire::encode(&meta);
        self.write(durability, |txn| {
            let mut blobs = txn.open_table(BLOBS)?;
            // Only a blob still here: one quarantined meanwhile stays out.
            if blobs.get(id.0.as_slice())?.is_some() {
                blobs.insert(id.0.as_slice(), bytes.as_slice())?;
            }
            Ok(())
        })
    }

    /// Marks a present blob used now (and pinned, when `pin`).
    fn touch(&self, id: &ContentId, now: u64, pin: bool) -> Result<BlobInfo, BlobError> {
        let mut blob = self.info(id)?.ok_or(BlobError::NotFound(*id))?;
        blob.last_access = blob.last_access.max(now);
        blob.pinned |= pin;
        let durability = if pin {
            Durability::Immediate
        } else {
            Durability::None
        };
        self.put_meta(id, meta(&blob), durability)?;
        Ok(blob)
    }

    /// Stores the bytes `reader` yields: hashed and written 256 KiB at a time. Returns the
    /// blob (already present or new), pinned when `pin`.
    pub fn import(
        &self,
        mut reader: impl Read,
        now: u64,
        pin: bool,
    ) -> Result<BlobInfo, BlobError> {
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("import-{:016x}", rand::random::<u64>()));
        let result = (|| {
            let file = File::create(&tmp).map_err(io(&tmp))?;
            let mut out = BufWriter::with_capacity(CHUNK_BYTES as usize, file);
            let mut hasher = TreeHasher::new();
            let mut buffer = vec![0u8; CHUNK_BYTES as usize];
            loop {
                let n = match reader.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io(&tmp)(e)),
                };
                hasher.update(&buffer[..n]);
                if hasher.len() > self.quota {
                    return Err(BlobError::TooLarge {
                        size: hasher.len(),
                        quota: self.quota,
                    });
                }
                out.write_all(&buffer[..n]).map_err(io(&tmp))?;
            }
            let file = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
            file.sync_all().map_err(io(&tmp))?;
            let (id, outboard) = hasher.finish();
            if self.info(&id)?.is_some() {
                return self.touch(&id, now, pin);
            }
            self.admit(outboard.size, &id, || {
                self.enter(&id, &tmp, &outboard, now, pin)
            })
        })();
        if tmp.exists() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Moves the synced file `from` into place as blob `id` and commits its entry.
    fn enter(
        &self,
        id: &ContentId,
        from: &Path,
        outboard: &Outboard,
        now: u64,
        pin: bool,
    ) -> Result<BlobInfo, BlobError> {
        let path = self.data_path(id);
        let shard = path.parent().expect("data/<shard>/<id>");
        fs::create_dir_all(shard).map_err(io(shard))?;
        fs::rename(from, &path).map_err(io(&path))?;
        File::open(shard)
            .and_then(|d| d.sync_all())
            .map_err(io(shard))?;
        let blob = BlobInfo {
            id: *id,
            size: outboard.size,
            pinned: pin,
            last_access: now,
        };
        let meta = mycel_core::wire::encode(&meta(&blob));
        let outboard = outboard.to_bytes();
        self.write(Durability::Immediate, |txn| {
            txn.open_table(BLOBS)?
                .insert(id.0.as_slice(), meta.as_slice())?;
            txn.open_table(OUTBOARDS)?
                .insert(id.0.as_slice(), outboard.as_slice())?;
            txn.open_table(PARTIAL)?.remove(id.0.as_slice())?;
            Ok(())
        })?;
        Ok(blob)
    }

    /// Stores a file, or a directory as a manifest of its files (symbolic links followed);
    /// returns the id of the file or of the manifest. Everything imported is pinned when `pin`.
    pub fn import_path(&self, path: &Path, now: u64, pin: bool) -> Result<ContentId, BlobError> {
        let meta = fs::metadata(path).map_err(io(path))?;
        if meta.is_file() {
            let file = File::open(path).map_err(io(path))?;
            return Ok(self.import(file, now, pin)?.id);
        }
        let mut files = Vec::new();
        walk(path, path, 0, &mut files)?;
        let mut entries = Vec::with_capacity(files.len());
        for (relative, full) in files {
            let file = File::open(&full).map_err(io(&full))?;
            let id = self.import(file, now, pin)?.id;
            entries.push(ManifestEntry { path: relative, id });
        }
        Ok(self
            .import(encode_manifest(&entries).as_slice(), now, pin)?
            .id)
    }

    /// Stores the files `names` of directory `root` and a manifest of exactly those (a
    /// model's files without what lies beside them); returns the manifest's id.
    pub fn import_files(
        &self,
        root: &Path,
        names: &[&str],
        now: u64,
        pin: bool,
    ) -> Result<ContentId, BlobError> {
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let full = root.join(name);
            let file = File::open(&full).map_err(io(&full))?;
            let id = self.import(file, now, pin)?.id;
            entries.push(ManifestEntry {
                path: (*name).to_owned(),
                id,
            });
        }
        Ok(self
            .import(encode_manifest(&entries).as_slice(), now, pin)?
            .id)
    }

    /// The bytes of chunk `index` of the complete blob `id`.
    pub fn read_chunk(&self, id: &ContentId, index: u64) -> Result<Vec<u8>, BlobError> {
        let mut data = ChunkBuf::new();
        self.reader(id)?.read_chunk_into(index, &mut data)?;
        Ok(data.bytes().to_vec())
    }

    /// Like [`BlobStore::reader`], marking the blob used at `now`.
    pub fn open_reader(&self, id: &ContentId, now: u64) -> Result<ChunkReader, BlobError> {
        self.touch(id, now, false)?;
        self.reader(id)
    }

    /// The complete blob `id` opened for reading chunks, each verified against its hash
    /// as it is read (one lookup and one open for many chunks).
    pub fn reader(&self, id: &ContentId) -> Result<ChunkReader, BlobError> {
        let blob = self.info(id)?.ok_or(BlobError::NotFound(*id))?;
        let outboard = self.outboard(id)?.ok_or(BlobError::NotFound(*id))?;
        let path = self.data_path(id);
        let file = File::open(&path).map_err(io(&path))?;
        Ok(ChunkReader {
            id: *id,
            outboard,
            file,
            size: blob.size,
            path,
        })
    }

    /// After [`BlobError::Corrupt`]: re-hashes every chunk of the complete blob `id` and, if
    /// any fails, takes it out of the store's complete blobs and makes it a fetch holding
    /// the chunks that still verify, so that only the rest need fetching again.
    pub fn quarantine(&self, id: &ContentId) -> Result<Quarantine, BlobError> {
        if self.info(id)?.is_none() {
            return Ok(Quarantine::Gone);
        }
        let outboard = self.outboard(id)?.ok_or(BlobError::NotFound(*id))?;
        let path = self.data_path(id);
        let file = File::open(&path).map_err(io(&path))?;
        let marks = verified_marks(&file, &outboard, id);
        let missing: Vec<u64> = (0..marks.len() as u64)
            .filter(|i| marks[*i as usize] == 0)
            .collect();
        if missing.is_empty() {
            return Ok(Quarantine::Intact);
        }
        // Hashed above without the lock (a large blob takes a while); settled under it.
        let _held = self.admission.lock().unwrap_or_else(|e| e.into_inner());
        let Some(blob) = self.info(id)? else {
            return Ok(Quarantine::Gone);
        };
        // Moved first: a crash before the commit leaves an entry without its file and a
        // partial file without a fetch, both dropped on open (the blob is then simply gone).
        let partial = self.partial_path(id);
        fs::rename(&path, &partial).map_err(io(&path))?;
        self.write(Durability::Immediate, |txn| {
            txn.open_table(BLOBS)?.remove(id.0.as_slice())?;
            txn.open_table(PARTIAL)?
                .insert(id.0.as_slice(), marks.as_slice())?;
            txn.open_table(REPAIRS)?
                .insert(id.0.as_slice(), blob.pinned)?;
            Ok(())
        })?;
        Ok(Quarantine::Repair {
            missing,
            pinned: blob.pinned,
        })
    }

    /// The entries of the manifest blob `id`, or `None` when `id` is a plain blob.
    pub fn manifest(&self, id: &ContentId) -> Result<Option<Vec<ManifestEntry>>, BlobError> {
        let reader = self.reader(id)?;
        if reader.size > MAX_MANIFEST_BYTES || reader.size < MANIFEST_MAGIC.len() as u64 {
            return Ok(None);
        }
        // The first chunk says whether it is one (each chunk verified as it is read).
        let mut data = ChunkBuf::new();
        reader.read_chunk_into(0, &mut data)?;
        if !data.bytes().starts_with(MANIFEST_MAGIC) {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(reader.size as usize);
        bytes.extend_from_slice(data.bytes());
        reader.each_chunk(1, |chunk| {
            bytes.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(Some(decode_manifest(&bytes)?))
    }

    /// The whole of blob `id`, each chunk verified as it is read, marked used at `now`; `None`
    /// when it is over `max` bytes.
    pub fn read_verified(
        &self,
        id: &ContentId,
        max: u64,
        now: u64,
    ) -> Result<Option<Vec<u8>>, BlobError> {
        let reader = self.open_reader(id, now)?;
        if reader.size > max {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(reader.size as usize);
        reader.each_chunk(0, |chunk| {
            bytes.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(Some(bytes))
    }

    /// Pins or unpins `id` and, for a manifest, the files it lists that are here.
    pub fn set_pinned(&self, id: &ContentId, pinned: bool) -> Result<(), BlobError> {
        let mut ids = vec![*id];
        if let Some(entries) = self.manifest(id)? {
            ids.extend(entries.iter().map(|e| e.id));
        }
        for id in ids {
            if let Some(mut blob) = self.info(&id)? {
                blob.pinned = pinned;
                self.put_meta(&id, meta(&blob), Durability::Immediate)?;
            }
        }
        Ok(())
    }

    /// Writes blob `id` to `path`: a file, or for a manifest a directory of its files (each
    /// written to a temporary name and renamed into place).
    pub fn export(&self, id: &ContentId, path: &Path, now: u64) -> Result<(), BlobError> {
        match self.manifest(id)? {
            None => self.export_file(id, path, now),
            Some(entries) => {
                for entry in entries {
                    // Checked in decode_manifest too; a path must never leave `path`.
                    if !safe_path(&entry.path) {
                        return Err(ManifestError::BadPath(entry.path).into());
                    }
                    self.export_file(&entry.id, &path.join(&entry.path), now)?;
                }
                Ok(())
            }
        }
    }

    /// Like [`BlobStore::export`], but with hard links to the stored files instead of copies
    /// where the file system allows (the blobs should stay pinned: a link outlives eviction,
    /// but the quota no longer counts it).
    pub fn link_out(&self, id: &ContentId, path: &Path) -> Result<(), BlobError> {
        let link = |id: &ContentId, to: &Path| -> Result<(), BlobError> {
            if self.info(id)?.is_none() {
                return Err(BlobError::NotFound(*id));
            }
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(io(parent))?;
            }
            match fs::hard_link(self.data_path(id), to) {
                Ok(()) => Ok(()),
                Err(_) => self.export_file(id, to, 0),
            }
        };
        match self.manifest(id)? {
            None => link(id, path),
            Some(entries) => {
                for entry in entries {
                    if !safe_path(&entry.path) {
                        return Err(ManifestError::BadPath(entry.path).into());
                    }
                    link(&entry.id, &path.join(&entry.path))?;
                }
                Ok(())
            }
        }
    }

    fn export_file(&self, id: &ContentId, path: &Path, now: u64) -> Result<(), BlobError> {
        let reader = self.open_reader(id, now)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let tmp = path.with_extension("mycel-part");
        let mut out = File::create(&tmp).map_err(io(&tmp))?;
        let copied = reader
            .each_chunk(0, |chunk| out.write_all(chunk).map_err(io(&tmp)))
            .and_then(|()| out.sync_all().map_err(io(&tmp)));
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, path).map_err(io(path))
    }

    // ---- fetching ----------------------------------------------------------------------

    /// Starts (or resumes) fetching blob `id` whose chunk hashes are `outboard`: the outboard
    /// must add up to `id`, and its size is reserved in the quota. Returns the chunks still
    /// missing.
    pub fn begin_fetch(&self, id: &ContentId, outboard: &Outboard) -> Result<Vec<u64>, BlobError> {
        outboard.verify(id)?;
        if self.info(id)?.is_some() {
            return Ok(Vec::new());
        }
        if let Some(missing) = self.missing(id)? {
            return Ok(missing);
        }
        let count = outboard.chunks();
        self.admit(outboard.size, id, || {
            let path = self.partial_path(id);
            let file = File::create(&path).map_err(io(&path))?;
            file.set_len(outboard.size).map_err(io(&path))?;
            if let Err(e) = preallocate(&file, outboard.size) {
                let _ = fs::remove_file(&path);
                return Err(io(&path)(e));
            }
            let bytes = outboard.to_bytes();
            let marks = vec![0u8; count as usize];
            self.write(Durability::Immediate, |txn| {
                txn.open_table(OUTBOARDS)?
                    .insert(id.0.as_slice(), bytes.as_slice())?;
                txn.open_table(PARTIAL)?
                    .insert(id.0.as_slice(), marks.as_slice())?;
                Ok(())
            })
        })?;
        Ok((0..count).collect())
    }

    /// The chunks of the fetch of `id` not yet verified, or `None` if no fetch is under way.
    pub fn missing(&self, id: &ContentId) -> Result<Option<Vec<u64>>, BlobError> {
        let cached = self
            .fetching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        let unmarked = |marks: &[u8]| -> Vec<u64> {
            marks
                .iter()
                .enumerate()
                .filter(|(_, mark)| **mark == 0)
                .map(|(i, _)| i as u64)
                .collect()
        };
        if let Some(fetching) = cached {
            let marks = fetching.marks.lock().unwrap_or_else(|e| e.into_inner());
            return Ok(Some(unmarked(&marks.0)));
        }
        Ok(self.saved_marks(id)?.map(|marks| unmarked(&marks)))
    }

    /// The marks of the fetch of `id` as last saved.
    fn saved_marks(&self, id: &ContentId) -> Result<Option<Vec<u8>>, BlobError> {
        let txn = self.db.begin_read().map_err(index_error)?;
        let table = txn.open_table(PARTIAL).map_err(index_error)?;
        let marks = table.get(id.0.as_slice()).map_err(index_error)?;
        Ok(marks.map(|m| m.value().to_vec()))
    }

    /// Saves `marks` for the fetch of `id` (without waiting for the disk: recovery re-checks
    /// marked chunks).
    fn save_marks(&self, id: &ContentId, marks: &[u8]) -> Result<(), BlobError> {
        self.write(Durability::None, |txn| {
            let mut table = txn.open_table(PARTIAL)?;
            if table.get(id.0.as_slice())?.is_some() {
                table.insert(id.0.as_slice(), marks)?;
            }
            Ok(())
        })
    }

    /// Verifies chunk `index` of the fetch of `id` and, only if it matches, writes it.
    pub fn write_chunk(&self, id: &ContentId, index: u64, data: &[u8]) -> Result<(), BlobError> {
        let fetching = self.fetching(id)?;
        fetching.outboard.verify_chunk(id, index, data)?;
        let offset = index * CHUNK_BYTES;
        if !fetching.direct.write_at(data, offset) {
            // One write at a time: concurrent buffered writes to one file only contend for
            // its lock.
            let _writing = fetching.writing.lock().unwrap_or_else(|e| e.into_inner());
            fetching
                .file
                .write_all_at(data, offset)
                .map_err(io(&self.partial_path(id)))?;
        }
        let save = {
            let mut marks = fetching.marks.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mark) = marks.0.get_mut(index as usize) {
                *mark = 1;
            }
            marks.1 += 1;
            (marks.1 % MARKS_SAVED_EVERY == 0).then(|| marks.0.clone())
        };
        if save.is_some() {
            // Written data goes to disk while the rest arrives, not all at the end: the
            // final sync then has little left to do. (Not under the write lock: other
            // chunks keep being written meanwhile.)
            fetching
                .file
                .sync_data()
                .map_err(io(&self.partial_path(id)))?;
        }
        match save {
            Some(marks) => self.save_marks(id, &marks),
            None => Ok(()),
        }
    }

    /// The outboard, open partial file and marks of the fetch of `id`.
    fn fetching(&self, id: &ContentId) -> Result<Arc<Fetching>, BlobError> {
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = fetching.get(id) {
            return Ok(f.clone());
        }
        let marks = self.saved_marks(id)?.ok_or(BlobError::NotFound(*id))?;
        let outboard = self.outboard(id)?.ok_or(BlobError::NotFound(*id))?;
        let path = self.partial_path(id);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let f = Arc::new(Fetching {
            outboard,
            direct: DirectWriter::open(&path),
            file,
            writing: Mutex::new(()),
            marks: Mutex::new((marks, 0)),
        });
        fetching.insert(*id, f.clone());
        Ok(f)
    }

    /// Saves the marks of the fetch of `id` and forgets its cached state.
    fn fetch_done(&self, id: &ContentId) {
        let cached = self
            .fetching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(fetching) = cached {
            let marks = fetching.marks.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self.save_marks(id, &marks.0);
        }
    }

    /// Completes the fetch of `id` once every chunk is verified: the file is synced and
    /// becomes a complete blob (pinned when `pin`).
    pub fn finish_fetch(&self, id: &ContentId, now: u64, pin: bool) -> Result<BlobInfo, BlobError> {
        if let Some(blob) = self.info(id)? {
            return Ok(blob);
        }
        let missing = self.missing(id)?.ok_or(BlobError::NotFound(*id))?;
        if let Some(first) = missing.first() {
            return Err(BlobError::Unsupported {
                path: self.partial_path(id),
                reason: format!(
                    "{} chunks still missing (the first: {first})",
                    missing.len()
                ),
            });
        }
        let outboard = self.outboard(id)?.ok_or(BlobError::NotFound(*id))?;
        let path = self.partial_path(id);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
        self.fetch_done(id);
        let _held = self.admission.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(blob) = self.info(id)? {
            // Another fetch of the same blob finished first.
            return Ok(blob);
        }
        // A repaired blob is pinned again if it was.
        let repaired_pinned = {
            let txn = self.db.begin_read().map_err(index_error)?;
            let table = txn.open_table(REPAIRS).map_err(index_error)?;
            let pinned = table.get(id.0.as_slice()).map_err(index_error)?;
            pinned.is_some_and(|p| p.value())
        };
        let blob = self.enter(id, &path, &outboard, now, pin || repaired_pinned)?;
        self.write(Durability::Immediate, |txn| {
            txn.open_table(REPAIRS)?.remove(id.0.as_slice())?;
            Ok(())
        })?;
        Ok(blob)
    }

    /// Gives up the fetch of `id`, dropping what it had.
    pub fn cancel_fetch(&self, id: &ContentId) -> Result<(), BlobError> {
        self.forget_partial(id)
    }
}

/// Which chunks of the blob in `file` match `outboard` (1) and which do not (0).
fn verified_marks(file: &File, outboard: &Outboard, id: &ContentId) -> Vec<u8> {
    let mut data = ChunkBuf::new();
    (0..outboard.chunks())
        .map(|index| {
            let good = read_chunk_into(file, outboard.size, index, &mut data)
                .is_ok_and(|()| outboard.verify_chunk(id, index, data.bytes()).is_ok());
            u8::from(good)
        })
        .collect()
}

/// Reads chunk `index` of the `size`-byte blob in `file` into `data`.
fn read_chunk_into(file: &File, size: u64, index: u64, data: &mut ChunkBuf) -> std::io::Result<()> {
    let out = data.sized(chunk_len(size, index) as usize);
    file.read_exact_at(out, index * CHUNK_BYTES)
}

/// What [`BlobStore::quarantine`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quarantine {
    /// Every chunk verifies (the fault was passing): the blob stays as it was.
    Intact,
    /// The blob is no longer complete here: these chunks must be fetched again (it was
    /// pinned: pin it again once repaired).
    Repair {
        /// The chunks that failed.
        missing: Vec<u64>,
        /// Whether it was pinned.
        pinned: bool,
    },
    /// No complete blob by that id (already quarantined, or removed).
    Gone,
}

/// A complete blob open for reading chunks; see [`BlobStore::reader`].
#[derive(Debug)]
pub struct ChunkReader {
    id: ContentId,
    outboard: Outboard,
    file: File,
    size: u64,
    path: PathBuf,
}

impl ChunkReader {
    /// The blob's id.
    pub fn id(&self) -> ContentId {
        self.id
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Calls `f` with every chunk from `from` on, in order, each verified; stops at the first
    /// error.
    pub fn each_chunk(
        &self,
        from: u64,
        mut f: impl FnMut(&[u8]) -> Result<(), BlobError>,
    ) -> Result<(), BlobError> {
        let mut data = ChunkBuf::new();
        for index in from..chunk_count(self.size) {
            self.read_chunk_into(index, &mut data)?;
            f(data.bytes())?;
        }
        Ok(())
    }

    /// Reads chunk `index` into `data`, verified against its hash.
    pub fn read_chunk_into(&self, index: u64, data: &mut ChunkBuf) -> Result<(), BlobError> {
        let count = chunk_count(self.size);
        if index >= count {
            return Err(TreeError::Index { index, count }.into());
        }
        read_chunk_into(&self.file, self.size, index, data).map_err(io(&self.path))?;
        self.outboard
            .verify_chunk(&self.id, index, data.bytes())
            .map_err(|_| BlobError::Corrupt {
                id: self.id,
                chunk: index,
            })
    }
}

fn info(id: ContentId, meta: Meta) -> BlobInfo {
    BlobInfo {
        id,
        size: meta.size,
        pinned: meta.pinned,
        last_access: meta.last_access,
    }
}

fn meta(blob: &BlobInfo) -> Meta {
    Meta {
        size: blob.size,
        pinned: blob.pinned,
        last_access: blob.last_access,
    }
}

fn hex(id: &ContentId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// The regular files under `dir` as (`/`-separated path relative to `root`, full path).
fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), BlobError> {
    if depth > MAX_DEPTH {
        return Err(BlobError::Unsupported {
            path: dir.to_path_buf(),
            reason: format!("more than {MAX_DEPTH} directories deep (a symbolic link loop?)"),
        });
    }
    let mut children: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    children.sort();
    for child in children {
        let meta = fs::metadata(&child).map_err(io(&child))?;
        if meta.is_dir() {
            walk(root, &child, depth + 1, out)?;
        } else if meta.is_file() {
            let relative = child
                .strip_prefix(root)
                .expect("under the root")
                .components()
                .map(|c| c.as_os_str().to_str())
                .collect::<Option<Vec<_>>>()
                .map(|parts| parts.join("/"))
                .filter(|p| safe_path(p))
                .ok_or_else(|| BlobError::Unsupported {
                    path: child.clone(),
                    reason: "the name is not UTF-8 or not a plain relative path".into(),
                })?;
            out.push((relative, child));
        } else {
            return Err(BlobError::Unsupported {
                path: child,
                reason: "neither a file nor a directory".into(),
            });
        }
    }
    Ok(())
}
