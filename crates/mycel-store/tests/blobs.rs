//! The blob store on a real disk: streaming import and export, directories as manifests,
//! fetches verified chunk by chunk and resumed after a crash, the quota's eviction order.

use std::fs;
use std::io::Read;
use std::path::Path;

use mycel_core::blob::{TreeError, CHUNK_BYTES};
use mycel_core::id::ContentId;
use mycel_store::{BlobError, BlobStore};

const MIB: u64 = 1024 * 1024;

fn bytes(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// A reader that yields `len` bytes of [`bytes`] a few at a time, never holding them all.
struct Generated {
    at: u64,
    len: u64,
    seed: u8,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len - self.at).min(buf.len() as u64).min(70_000);
        for (i, b) in buf[..n as usize].iter_mut().enumerate() {
            *b = ((self.at + i as u64) as u32)
                .wrapping_mul(2654435761)
                .to_le_bytes()[3]
                ^ self.seed;
        }
        self.at += n;
        Ok(n as usize)
    }
}

fn open(dir: &Path, quota: u64) -> BlobStore {
    BlobStore::open(dir, quota).unwrap()
}

#[test]
fn imports_stream_in_and_export_byte_for_byte_under_their_blake3_id() {
    let root = tempfile::tempdir().unwrap();
    let store = open(&root.path().join("blobs"), 64 * MIB);
    for len in [0, 1, CHUNK_BYTES, 3 * CHUNK_BYTES + 11] {
        let blob = store
            .import(
                Generated {
                    at: 0,
                    len,
                    seed: 5,
                },
                1,
                false,
            )
            .unwrap();
        let data = bytes(len, 5);
        assert_eq!(blob.id, ContentId::of(&data), "{len} bytes");
        assert_eq!(blob.size, len);
        let out = root.path().join(format!("out-{len}"));
        store.export(&blob.id, &out, 2).unwrap();
        assert_eq!(fs::read(&out).unwrap(), data);
        // Each chunk read back verifies against the stored chunk hashes.
        let outboard = store.outboard(&blob.id).unwrap().unwrap();
        outboard.verify(&blob.id).unwrap();
        for index in 0..outboard.chunks() {
            let chunk = store.read_chunk(&blob.id, index).unwrap();
            outboard.verify_chunk(&blob.id, index, &chunk).unwrap();
        }
    }
    // The same bytes again: the same blob, stored once.
    let before = store.used().unwrap();
    store
        .import(
            Generated {
                at: 0,
                len: 1,
                seed: 5,
            },
            3,
            false,
        )
        .unwrap();
    assert_eq!(store.used().unwrap(), before);
    assert!(matches!(
        store.open_reader(&ContentId::of(b"absent"), 4),
        Err(BlobError::NotFound(_))
    ));
}

#[test]
fn a_directory_is_a_manifest_with_the_directorys_id_and_comes_back_whole() {
    let root = tempfile::tempdir().unwrap();
    let store = open(&root.path().join("blobs"), 64 * MIB);
    let dir = root.path().join("model");
    fs::create_dir_all(dir.join("weights")).unwrap();
    fs::write(dir.join("config.json"), b"{\"dim\": 4}").unwrap();
    fs::write(dir.join("weights/part-1.bin"), bytes(CHUNK_BYTES + 3, 1)).unwrap();
    fs::write(dir.join("weights/empty"), b"").unwrap();
    let id = store.import_path(&dir, 1, true).unwrap();
    let files = [
        ("config.json", ContentId::of(b"{\"dim\": 4}")),
        ("weights/empty", ContentId::of(b"")),
        (
            "weights/part-1.bin",
            ContentId::of(&bytes(CHUNK_BYTES + 3, 1)),
        ),
    ];
    assert_eq!(id, ContentId::of_manifest(files));
    let entries = store.manifest(&id).unwrap().expect("a manifest");
    assert_eq!(entries.len(), 3);
    // Pinning reached the files.
    assert!(entries
        .iter()
        .all(|e| store.info(&e.id).unwrap().unwrap().pinned));

    let out = root.path().join("copy");
    store.export(&id, &out, 2).unwrap();
    for (path, _) in files {
        assert_eq!(
            fs::read(out.join(path)).unwrap(),
            fs::read(dir.join(path)).unwrap()
        );
    }
    // Unpinning the directory unpins its files.
    store.set_pinned(&id, false).unwrap();
    assert!(entries
        .iter()
        .all(|e| !store.info(&e.id).unwrap().unwrap().pinned));
}

#[test]
fn a_fetch_keeps_only_verified_chunks_and_resumes_after_a_crash() {
    let root = tempfile::tempdir().unwrap();
    let holder = open(&root.path().join("holder"), 64 * MIB);
    let len = 6 * CHUNK_BYTES + 100;
    let blob = holder
        .import(
            Generated {
                at: 0,
                len,
                seed: 9,
            },
            1,
            false,
        )
        .unwrap();
    let outboard = holder.outboard(&blob.id).unwrap().unwrap();

    let dir = root.path().join("fetcher");
    let fetcher = open(&dir, 64 * MIB);
    // Chunk hashes that do not add up to the id are refused before anything is reserved.
    let mut forged = outboard.clone();
    forged.cvs[3][5] ^= 1;
    assert!(matches!(
        fetcher.begin_fetch(&blob.id, &forged),
        Err(BlobError::Tree(TreeError::Root(_)))
    ));
    assert_eq!(fetcher.used().unwrap(), 0);

    let missing = fetcher.begin_fetch(&blob.id, &outboard).unwrap();
    assert_eq!(missing, (0..7).collect::<Vec<_>>());
    // A corrupted chunk is refused and not kept.
    let mut bad = holder.read_chunk(&blob.id, 2).unwrap();
    bad[1000] ^= 0x40;
    assert!(matches!(
        fetcher.write_chunk(&blob.id, 2, &bad),
        Err(BlobError::Tree(TreeError::Chunk(2)))
    ));
    copy_chunks(&holder, &fetcher, &blob.id, [0, 1, 2, 5]);
    assert_eq!(fetcher.missing(&blob.id).unwrap().unwrap(), vec![3, 4, 6]);
    // Not complete: never served as a blob.
    assert!(fetcher.info(&blob.id).unwrap().is_none());
    assert!(fetcher.open_reader(&blob.id, 2).is_err());
    assert!(fetcher.finish_fetch(&blob.id, 2, false).is_err());

    // A crash: the store is dropped without any cleanup, and chunk 1's bytes never reached
    // the disk (the partial file is damaged where they were).
    drop(fetcher);
    let partial = dir.join("partial").join(hex(&blob.id));
    let file = fs::OpenOptions::new().write(true).open(&partial).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0u8; 64], CHUNK_BYTES + 10).unwrap();
    fs::write(dir.join("tmp").join("import-dead"), b"half an import").unwrap();

    let fetcher = open(&dir, 64 * MIB);
    // The damaged chunk is missing again; the others survived and are not fetched again.
    assert_eq!(
        fetcher.missing(&blob.id).unwrap().unwrap(),
        vec![1, 3, 4, 6]
    );
    assert!(!dir.join("tmp").join("import-dead").exists());
    let missing = fetcher.missing(&blob.id).unwrap().unwrap();
    copy_chunks(&holder, &fetcher, &blob.id, missing);
    let done = fetcher.finish_fetch(&blob.id, 3, false).unwrap();
    assert_eq!(done.id, blob.id);
    let out = root.path().join("out");
    fetcher.export(&blob.id, &out, 4).unwrap();
    assert_eq!(fs::read(out).unwrap(), bytes(len, 9));
    assert!(!partial.exists());
}

#[test]
fn after_a_crash_only_whole_blobs_with_an_entry_are_listed() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("blobs");
    let store = open(&dir, 64 * MIB);
    let kept = store.import(&b"kept"[..], 1, false).unwrap();
    let lost = store.import(&b"lost"[..], 1, false).unwrap();
    drop(store);
    // The file of one entry vanished; a file with no entry appeared (renamed into place
    // just before a crash, its entry never committed).
    let lost_path = dir
        .join("data")
        .join(&hex(&lost.id)[..2])
        .join(hex(&lost.id));
    fs::remove_file(&lost_path).unwrap();
    let orphan = ContentId::of(b"orphan");
    let orphan_path = dir.join("data").join(&hex(&orphan)[..2]).join(hex(&orphan));
    fs::create_dir_all(orphan_path.parent().unwrap()).unwrap();
    fs::write(&orphan_path, b"orphan").unwrap();

    let store = open(&dir, 64 * MIB);
    let ids: Vec<ContentId> = store.entries().unwrap().iter().map(|b| b.id).collect();
    assert_eq!(ids, vec![kept.id]);
    assert!(!orphan_path.exists());
    assert!(matches!(
        store.open_reader(&lost.id, 2),
        Err(BlobError::NotFound(_))
    ));
}

#[test]
fn the_quota_evicts_the_least_recently_used_unpinned_blobs_and_refuses_what_cannot_fit() {
    let root = tempfile::tempdir().unwrap();
    let store = open(&root.path().join("blobs"), 4 * MIB);
    let import = |seed: u8, now: u64, pin: bool| {
        store
            .import(
                Generated {
                    at: 0,
                    len: MIB,
                    seed,
                },
                now,
                pin,
            )
            .unwrap()
            .id
    };
    let a = import(1, 10, false);
    let b = import(2, 20, true);
    let c = import(3, 30, false);
    let d = import(4, 40, false);
    // Reading `a` makes `c` the least recently used unpinned blob.
    store.open_reader(&a, 50).unwrap();
    let e = import(5, 60, false);
    let present = |id: &ContentId| store.info(id).unwrap().is_some();
    assert!(!present(&c), "the least recently used goes first");
    assert!(present(&a) && present(&b) && present(&d) && present(&e));
    assert!(store.used().unwrap() <= 4 * MIB);

    // Larger than the whole quota: refused, and nothing evicted for it.
    let too_large = store.import(
        Generated {
            at: 0,
            len: 4 * MIB + 1,
            seed: 6,
        },
        70,
        false,
    );
    assert!(
        matches!(too_large, Err(BlobError::TooLarge { .. })),
        "{too_large:?}"
    );
    assert!(present(&a) && present(&d) && present(&e));

    // Pinned blobs are never evicted: with 3 MiB pinned, 2 MiB cannot fit.
    store.set_pinned(&a, true).unwrap();
    store.set_pinned(&d, true).unwrap();
    let full = store.import(
        Generated {
            at: 0,
            len: 2 * MIB,
            seed: 7,
        },
        80,
        false,
    );
    assert!(matches!(full, Err(BlobError::Full { .. })), "{full:?}");
    assert!(present(&a) && present(&b) && present(&d));
    // 1 MiB fits by evicting the one unpinned blob.
    let f = import(8, 90, false);
    assert!(!present(&e) && present(&f));
    assert!(fs::read_dir(root.path().join("blobs/tmp"))
        .unwrap()
        .next()
        .is_none());
}

/// Hands chunks of `id` from `holder` to `fetcher`, as a peer would.
fn copy_chunks(
    holder: &BlobStore,
    fetcher: &BlobStore,
    id: &ContentId,
    indices: impl IntoIterator<Item = u64>,
) {
    for index in indices {
        let chunk = holder.read_chunk(id, index).unwrap();
        fetcher.write_chunk(id, index, &chunk).unwrap();
    }
}

fn hex(id: &ContentId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_chunk_the_disk_changed_is_never_handed_out_and_the_blob_becomes_a_fetch_of_what_it_lost() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("blobs");
    let store = open(&dir, 64 * MIB);
    let original = bytes(3 * CHUNK_BYTES + 11, 9);
    let blob = store.import(&original[..], 1, true).unwrap();
    let id = blob.id;
    // Bit rot in chunk 1 of the stored file.
    let path = dir.join("data").join(&hex(&id)[..2]).join(hex(&id));
    let mut on_disk = fs::read(&path).unwrap();
    on_disk[(CHUNK_BYTES + 77) as usize] ^= 0x10;
    fs::write(&path, &on_disk).unwrap();

    assert_eq!(
        store.read_chunk(&id, 0).unwrap(),
        &original[..CHUNK_BYTES as usize]
    );
    assert!(matches!(
        store.read_chunk(&id, 1),
        Err(BlobError::Corrupt { chunk: 1, .. })
    ));
    assert!(matches!(
        store.read_verified(&id, u64::MAX, 2),
        Err(BlobError::Corrupt { chunk: 1, .. })
    ));
    let out = root.path().join("out");
    assert!(matches!(
        store.export(&id, &out, 2),
        Err(BlobError::Corrupt { chunk: 1, .. })
    ));
    assert!(!out.exists() && !out.with_extension("mycel-part").exists());

    // Quarantined: no longer a complete blob, a fetch missing only chunk 1, and so across a
    // restart.
    let quarantined = store.quarantine(&id).unwrap();
    assert_eq!(
        quarantined,
        mycel_store::Quarantine::Repair {
            missing: vec![1],
            pinned: true
        }
    );
    assert!(store.info(&id).unwrap().is_none());
    assert!(matches!(
        store.read_chunk(&id, 0),
        Err(BlobError::NotFound(_))
    ));
    drop(store);
    let store = open(&dir, 64 * MIB);
    assert_eq!(store.missing(&id).unwrap(), Some(vec![1]));
    // Repaired with the right bytes, it is whole and pinned again.
    let chunk = &original[CHUNK_BYTES as usize..2 * CHUNK_BYTES as usize];
    store.write_chunk(&id, 1, chunk).unwrap();
    let blob = store.finish_fetch(&id, 3, false).unwrap();
    assert!(blob.pinned, "pinned again, as it was before the repair");
    store.export(&id, &out, 4).unwrap();
    assert_eq!(fs::read(&out).unwrap(), original);
    assert_eq!(
        store.quarantine(&id).unwrap(),
        mycel_store::Quarantine::Intact
    );
}

#[test]
fn a_corrupt_or_truncated_database_says_so_and_how_to_recover() {
    let root = tempfile::tempdir().unwrap();
    // A good store first, so the files are real redb files.
    let dir = root.path().join("node");
    std::fs::create_dir_all(&dir).unwrap();
    drop(mycel_store::Store::open(&dir).unwrap());
    drop(open(&dir.join("blobs"), 64 * MIB));
    let state = dir.join("state.redb");
    let good = fs::read(&state).unwrap();
    let garbage: Vec<u8> = bytes(good.len() as u64, 3);
    for (what, contents) in [
        ("truncated", good[..good.len() / 3].to_vec()),
        ("truncated to nothing", Vec::new()),
        ("overwritten", garbage),
        ("header overwritten", {
            let mut c = good.clone();
            c[..64].copy_from_slice(&bytes(64, 1));
            c
        }),
    ] {
        fs::write(&state, &contents).unwrap();
        let e = mycel_store::Store::open(&dir).unwrap_err().to_string();
        assert!(!e.contains("another mycel node"), "{what}: {e}");
        assert!(e.contains("corrupt") && e.contains("mv "), "{what}: {e}");
    }
    // The blob index likewise.
    let index = dir.join("blobs/index.redb");
    let len = fs::metadata(&index).unwrap().len();
    fs::write(&index, bytes(len, 5)).unwrap();
    let e = BlobStore::open(&dir.join("blobs"), 64 * MIB)
        .unwrap_err()
        .to_string();
    assert!(e.contains("corrupt") && e.contains("blob index"), "{e}");
    // And a database another node holds open says that, not "corrupt".
    fs::remove_file(&state).unwrap();
    let held = mycel_store::Store::open(&dir).unwrap();
    let e = mycel_store::Store::open(&dir).unwrap_err().to_string();
    assert!(e.contains("another mycel node"), "{e}");
    drop(held);
}
