//! Blobs as BLAKE3 trees: chunks that can be verified one at a time, and directory manifests.
//!
//! A blob's content id is the plain BLAKE3 hash of its bytes. BLAKE3 hashes a tree: the bytes
//! are split into 1 KiB chunks and every parent node hashes its two children's chaining
//! values; a left subtree always covers a power of two of chunks. Any aligned run of
//! [`CHUNK_BYTES`] is therefore one subtree (the last run may be short), so a blob's
//! *outboard* — the chaining values of its chunks, 32 bytes per 256 KiB — fixes every chunk:
//! merging the values up the tree must give the content id (checked once, before anything is
//! fetched), and each chunk that arrives must hash to its value (checked before a byte of it
//! is kept). A holder cannot send a chunk that does not belong to the id it was asked for.
//!
//! A directory is a manifest blob: its files' relative paths and content ids, in path order,
//! in exactly the bytes [`ContentId::of_manifest`] hashes — so a directory's id is the id of
//! its manifest blob.

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use serde::{Deserialize, Serialize};

use crate::id::ContentId;

/// Bytes per verifiable chunk (a power of two, at least BLAKE3's 1 KiB chunk).
pub const CHUNK_BYTES: u64 = 256 * 1024;

/// The first bytes of a manifest blob.
pub const MANIFEST_MAGIC: &[u8] = b"mycel-manifest-v1\n";

/// Paths in a manifest are at most this long.
pub const MAX_PATH_BYTES: usize = 4096;

/// Chunks asked for in one request of the blob protocol.
pub const MAX_CHUNKS_PER_REQUEST: usize = 64;

/// Largest request frame of the blob protocol.
pub const MAX_BLOB_REQUEST_BYTES: usize = 8 * 1024;

/// Largest answer frame of the blob protocol: an outboard of up to 32 MiB (a blob of 256 GiB).
pub const MAX_BLOB_FRAME_BYTES: usize = 32 * 1024 * 1024 + 64;

/// A request of the blob protocol `/mycel/blob/1`: one per stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// The blob's size and chunk hashes ([`Outboard::to_bytes`]).
    Outboard {
        /// The blob.
        id: ContentId,
    },
    /// The bytes of some chunks, answered in the order asked.
    Chunks {
        /// The blob.
        id: ContentId,
        /// Chunk indices: 1 to [`MAX_CHUNKS_PER_REQUEST`].
        chunks: Vec<u64>,
    },
}

impl BlobRequest {
    /// Checks the protocol's bounds.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Outboard { .. } => Ok(()),
            Self::Chunks { chunks, .. } if chunks.is_empty() => Err("no chunks asked for".into()),
            Self::Chunks { chunks, .. } if chunks.len() > MAX_CHUNKS_PER_REQUEST => Err(format!(
                "{} chunks asked for; at most {MAX_CHUNKS_PER_REQUEST}",
                chunks.len()
            )),
            Self::Chunks { .. } => Ok(()),
        }
    }
}

/// An answer frame of the blob protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobFrame {
    /// [`Outboard::to_bytes`] of the blob asked for.
    Outboard(#[serde(with = "serde_bytes")] Vec<u8>),
    /// One chunk: its `len` bytes follow this frame raw, outside the CBOR (no copies through
    /// the encoder); `len` is at most [`CHUNK_BYTES`].
    Chunk {
        /// Its index.
        index: u64,
        /// Bytes that follow.
        len: u32,
    },
    /// This node does not hold the blob (whole).
    NotFound,
    /// The request broke the protocol.
    Refused(String),
}

/// Chunks of a blob of `size` bytes (an empty blob has one, empty).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_BYTES).max(1)
}

/// Bytes of chunk `index` of a blob of `size` bytes (0 past its end, however far).
pub fn chunk_len(size: u64, index: u64) -> u64 {
    size.saturating_sub(index.saturating_mul(CHUNK_BYTES))
        .min(CHUNK_BYTES)
}

/// The chaining value of chunk `index` with bytes `data` (not the root: see
/// [`Outboard::verify_chunk`] for blobs of a single chunk).
pub fn chunk_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(index * CHUNK_BYTES);
    hasher.update(data);
    hasher.finalize_non_root()
}

/// The chaining values of a blob's chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboard {
    /// The blob's length in bytes.
    pub size: u64,
    /// One chaining value per chunk; empty for a blob of one chunk, whose only check is the
    /// content id itself.
    pub cvs: Vec<ChainingValue>,
}

/// Why an outboard or a chunk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The outboard has the wrong number of values for the size.
    #[error("{got} chunk hashes for {size} bytes (expected {expected})")]
    Count {
        /// The claimed size.
        size: u64,
        /// Values given.
        got: usize,
        /// Values a blob of that size has.
        expected: u64,
    },
    /// The chunk hashes do not add up to the content id.
    #[error("the chunk hashes do not belong to {0}")]
    Root(ContentId),
    /// A chunk index past the end.
    #[error("chunk {index} of a blob of {count} chunks")]
    Index {
        /// The index.
        index: u64,
        /// Chunks in the blob.
        count: u64,
    },
    /// A chunk whose bytes do not hash to its value (or have the wrong length).
    #[error("chunk {0} does not match its hash")]
    Chunk(u64),
}

impl Outboard {
    /// The outboard of a blob whose chunk chaining values are `cvs` (as computed by
    /// [`chunk_cv`]); for a single chunk, pass no values.
    pub fn new(size: u64, cvs: Vec<ChainingValue>) -> Self {
        Self { size, cvs }
    }

    /// Chunks in the blob.
    pub fn chunks(&self) -> u64 {
        chunk_count(self.size)
    }

    /// The content id the chunk values add up to.
    pub fn root(&self) -> Result<Option<ContentId>, TreeError> {
        let count = self.chunks();
        if count == 1 {
            if !self.cvs.is_empty() {
                return Err(TreeError::Count {
                    size: self.size,
                    got: self.cvs.len(),
                    expected: 0,
                });
            }
            return Ok(None);
        }
        if self.cvs.len() as u64 != count {
            return Err(TreeError::Count {
                size: self.size,
                got: self.cvs.len(),
                expected: count,
            });
        }
        let (left, right) = self.children(0, self.size);
        Ok(Some(ContentId(
            *hazmat::merge_subtrees_root(&left, &right, Mode::Hash).as_bytes(),
        )))
    }

    /// The chaining values of the two children of the subtree over bytes `start..start+len`
    /// (`len` more than one chunk).
    fn children(&self, start: u64, len: u64) -> (ChainingValue, ChainingValue) {
        let left = hazmat::left_subtree_len(len);
        (
            self.subtree(start, left),
            self.subtree(start + left, len - left),
        )
    }

    fn subtree(&self, start: u64, len: u64) -> ChainingValue {
        if len <= CHUNK_BYTES {
            return self.cvs[(start / CHUNK_BYTES) as usize];
        }
        let (left, right) = self.children(start, len);
        hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash)
    }

    /// Checks that the outboard belongs to `id`: its values add up to it.
    pub fn verify(&self, id: &ContentId) -> Result<(), TreeError> {
        match self.root()? {
            Some(root) if root == *id => Ok(()),
            Some(_) => Err(TreeError::Root(*id)),
            // One chunk: the chunk itself is checked against the id.
            None => Ok(()),
        }
    }

    /// Checks chunk `index` of the blob `id` (whose outboard this is, verified).
    pub fn verify_chunk(&self, id: &ContentId, index: u64, data: &[u8]) -> Result<(), TreeError> {
        let count = self.chunks();
        if index >= count {
            return Err(TreeError::Index { index, count });
        }
        if data.len() as u64 != chunk_len(self.size, index) {
            return Err(TreeError::Chunk(index));
        }
        let good = if count == 1 {
            ContentId::of(data) == *id
        } else {
            chunk_cv(index, data) == self.cvs[index as usize]
        };
        good.then_some(()).ok_or(TreeError::Chunk(index))
    }

    /// The outboard as bytes: the size (u64 LE) then the values.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 * self.cvs.len());
        out.extend_from_slice(&self.size.to_le_bytes());
        for cv in &self.cvs {
            out.extend_from_slice(cv);
        }
        out
    }

    /// Reads [`Outboard::to_bytes`]; the count of values is checked against the size.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TreeError> {
        let size_bytes: [u8; 8] =
            bytes
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or(TreeError::Count {
                    size: 0,
                    got: 0,
                    expected: 0,
                })?;
        let size = u64::from_le_bytes(size_bytes);
        let rest = &bytes[8..];
        let count = chunk_count(size);
        let expected = if count == 1 { 0 } else { count };
        if !rest.len().is_multiple_of(32) || (rest.len() / 32) as u64 != expected {
            return Err(TreeError::Count {
                size,
                got: rest.len() / 32,
                expected,
            });
        }
        let cvs = rest
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        Ok(Self { size, cvs })
    }
}

/// Hashes a blob chunk by chunk as its bytes stream past: the content id and the outboard at
/// the end, nothing kept but one chaining value per chunk.
#[derive(Debug, Default)]
pub struct TreeHasher {
    size: u64,
    cvs: Vec<ChainingValue>,
    /// The whole blob so far, while it is within its first chunk (for the root hash of a
    /// single-chunk blob).
    first: Option<blake3::Hasher>,
    current: Option<blake3::Hasher>,
    in_chunk: u64,
}

impl TreeHasher {
    /// A hasher at the start of a blob.
    pub fn new() -> Self {
        Self {
            first: Some(blake3::Hasher::new()),
            ..Self::default()
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.in_chunk == CHUNK_BYTES {
                self.close_chunk();
            }
            let take = ((CHUNK_BYTES - self.in_chunk) as usize).min(data.len());
            let (now, rest) = data.split_at(take);
            let index = self.size / CHUNK_BYTES;
            let current = self.current.get_or_insert_with(|| {
                let mut hasher = blake3::Hasher::new();
                hasher.set_input_offset(index * CHUNK_BYTES);
                hasher
            });
            current.update(now);
            if let Some(first) = &mut self.first {
                first.update(now);
            }
            self.size += take as u64;
            self.in_chunk += take as u64;
            data = rest;
        }
    }

    fn close_chunk(&mut self) {
        if let Some(hasher) = self.current.take() {
            self.cvs.push(hasher.finalize_non_root());
        }
        // Past the first chunk: the blob is a tree, not a single chunk.
        self.first = None;
        self.in_chunk = 0;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The content id and the outboard.
    pub fn finish(mut self) -> (ContentId, Outboard) {
        if let Some(first) = self.first.take() {
            // A single chunk: its root hash is the id; no values.
            return (
                ContentId(*first.finalize().as_bytes()),
                Outboard::new(self.size, Vec::new()),
            );
        }
        self.close_chunk();
        let outboard = Outboard::new(self.size, self.cvs);
        let id = outboard
            .root()
            .expect("the hasher made one value per chunk")
            .expect("more than one chunk");
        (id, outboard)
    }
}

/// One file of a directory manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Path relative to the directory, `/`-separated, no `.` or `..` parts.
    pub path: String,
    /// The file's content id.
    pub id: ContentId,
}

/// Why bytes are not a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The bytes do not start like a manifest.
    #[error("not a manifest")]
    NotAManifest,
    /// The bytes end in the middle of an entry.
    #[error("the manifest is truncated")]
    Truncated,
    /// A path that could escape the directory or is not UTF-8.
    #[error("bad path in the manifest: {0:?}")]
    BadPath(String),
    /// Entries out of order or repeated.
    #[error("manifest entries are not in strict path order at {0:?}")]
    Order(String),
}

/// Whether `path` is a safe relative path: non-empty `/`-separated parts, none `.`, `..` or
/// empty, no NUL or backslash.
pub fn safe_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH_BYTES
        && !path.contains(['\0', '\\'])
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// The manifest bytes of `entries` (sorted by path here); its blob id equals
/// [`ContentId::of_manifest`] over the same files.
pub fn encode_manifest(entries: &[ManifestEntry]) -> Vec<u8> {
    let mut sorted: Vec<&ManifestEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut out = MANIFEST_MAGIC.to_vec();
    for entry in sorted {
        out.extend_from_slice(entry.path.as_bytes());
        out.push(0);
        out.extend_from_slice(&entry.id.0);
        out.push(b'\n');
    }
    out
}

/// Reads a manifest, refusing unsafe paths and entries out of order.
pub fn decode_manifest(bytes: &[u8]) -> Result<Vec<ManifestEntry>, ManifestError> {
    let mut rest = bytes
        .strip_prefix(MANIFEST_MAGIC)
        .ok_or(ManifestError::NotAManifest)?;
    let mut entries: Vec<ManifestEntry> = Vec::new();
    while !rest.is_empty() {
        let end = rest
            .iter()
            .take(MAX_PATH_BYTES + 1)
            .position(|b| *b == 0)
            .ok_or(ManifestError::Truncated)?;
        let path = std::str::from_utf8(&rest[..end])
            .map_err(|_| ManifestError::BadPath(String::from_utf8_lossy(&rest[..end]).into()))?;
        if !safe_path(path) {
            return Err(ManifestError::BadPath(path.into()));
        }
        let tail = &rest[end + 1..];
        if tail.len() < 33 || tail[32] != b'\n' {
            return Err(ManifestError::Truncated);
        }
        if entries
            .last()
            .is_some_and(|last| last.path.as_str() >= path)
        {
            return Err(ManifestError::Order(path.into()));
        }
        entries.push(ManifestEntry {
            path: path.into(),
            id: ContentId(tail[..32].try_into().expect("32 bytes")),
        });
        rest = &tail[33..];
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    fn hash_in_pieces(data: &[u8], piece: usize) -> (ContentId, Outboard) {
        let mut hasher = TreeHasher::new();
        for part in data.chunks(piece.max(1)) {
            hasher.update(part);
        }
        hasher.finish()
    }

    #[test]
    fn ids_are_plain_blake3_at_every_size_and_chunks_verify() {
        let c = CHUNK_BYTES as usize;
        for len in [
            0,
            1,
            1024,
            c - 1,
            c,
            c + 1,
            2 * c,
            3 * c + 17,
            5 * c,
            8 * c + 1,
        ] {
            let data = bytes(len, 7);
            let (id, outboard) = hash_in_pieces(&data, 100_000);
            assert_eq!(id, ContentId::of(&data), "{len} bytes");
            outboard.verify(&id).unwrap();
            assert_eq!(
                Outboard::from_bytes(&outboard.to_bytes()).unwrap(),
                outboard
            );
            for (i, chunk) in data.chunks(c).enumerate() {
                outboard.verify_chunk(&id, i as u64, chunk).unwrap();
            }
            if len == 0 {
                outboard.verify_chunk(&id, 0, &[]).unwrap();
            }
        }
    }

    #[test]
    fn a_changed_byte_a_wrong_length_or_a_foreign_outboard_is_refused() {
        let c = CHUNK_BYTES as usize;
        let data = bytes(3 * c + 5, 1);
        let (id, outboard) = hash_in_pieces(&data, c);
        let mut bad = data[c..2 * c].to_vec();
        bad[77] ^= 1;
        assert_eq!(
            outboard.verify_chunk(&id, 1, &bad),
            Err(TreeError::Chunk(1))
        );
        assert_eq!(
            outboard.verify_chunk(&id, 1, &data[c..2 * c - 1]),
            Err(TreeError::Chunk(1))
        );
        // A chunk sent for another index.
        assert_eq!(
            outboard.verify_chunk(&id, 0, &data[c..2 * c]),
            Err(TreeError::Chunk(0))
        );
        assert!(matches!(
            outboard.verify_chunk(&id, 4, &[]),
            Err(TreeError::Index { .. })
        ));
        // An outboard with one value changed does not add up to the id.
        let mut forged = outboard.clone();
        forged.cvs[2][0] ^= 1;
        assert_eq!(forged.verify(&id), Err(TreeError::Root(id)));
        // The right values under another id.
        let other = ContentId::of(b"other");
        assert_eq!(outboard.verify(&other), Err(TreeError::Root(other)));
        // Value counts that do not fit the size.
        let mut short = outboard.to_bytes();
        short.truncate(short.len() - 32);
        assert!(Outboard::from_bytes(&short).is_err());
        // A single-chunk blob is checked against the id itself.
        let small = bytes(100, 3);
        let (small_id, small_outboard) = hash_in_pieces(&small, 7);
        assert!(small_outboard.cvs.is_empty());
        assert!(small_outboard.verify_chunk(&small_id, 0, &small).is_ok());
        assert!(small_outboard
            .verify_chunk(&small_id, 0, &bad[..100])
            .is_err());
    }

    #[test]
    fn a_manifest_blob_has_the_id_of_the_directory() {
        let entries = vec![
            ManifestEntry {
                path: "weights/model.safetensors".into(),
                id: ContentId::of(b"w"),
            },
            ManifestEntry {
                path: "config.json".into(),
                id: ContentId::of(b"c"),
            },
        ];
        let encoded = encode_manifest(&entries);
        assert_eq!(
            ContentId::of(&encoded),
            ContentId::of_manifest(entries.iter().map(|e| (e.path.as_str(), e.id)))
        );
        let decoded = decode_manifest(&encoded).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].path, "config.json");
        assert!(decode_manifest(&encoded[..encoded.len() - 1]).is_err());
        assert_eq!(decode_manifest(b"hello"), Err(ManifestError::NotAManifest));
        for path in ["../etc/passwd", "/abs", "a//b", "a/./b", "", "a\\b"] {
            let evil = encode_manifest(&[ManifestEntry {
                path: path.into(),
                id: ContentId::of(b"x"),
            }]);
            assert!(decode_manifest(&evil).is_err(), "{path:?}");
        }
        // Repeated paths.
        let mut twice = encode_manifest(&entries[..1]);
        twice.extend_from_slice(&encode_manifest(&entries[..1])[MANIFEST_MAGIC.len()..]);
        assert!(matches!(
            decode_manifest(&twice),
            Err(ManifestError::Order(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_split_of_the_stream_gives_the_same_tree(
            len in 0usize..(3 * CHUNK_BYTES as usize + 100),
            piece in 1usize..300_000,
        ) {
            let data = bytes(len, 9);
            let (id, outboard) = hash_in_pieces(&data, piece);
            prop_assert_eq!(id, ContentId::of(&data));
            prop_assert!(outboard.verify(&id).is_ok());
        }
    }
}
