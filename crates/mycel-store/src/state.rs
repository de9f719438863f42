//! The redb database: peer book and counters.

use std::path::{Path, PathBuf};

use libp2p_identity::PeerId;
use mycel_core::id::ContentId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::StoreError;

const STATE_FILE: &str = "state.redb";
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
const TRUST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("trust");
const ON_DEMAND: TableDefinition<&[u8], ()> = TableDefinition::new("on_demand");
/// Digests of what a node revealed once (secure aggregation's shares of one round), with the
/// order they came in, and that order's index for forgetting the oldest.
const REVEALED: TableDefinition<&[u8], u64> = TableDefinition::new("revealed");
const REVEALED_ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("revealed_order");
const ANNOUNCE_SEQ: &str = "announce_seq";
/// Addresses kept per peer; more are dropped (the newest first in the list are kept).
const MAX_ADDRS_PER_PEER: usize = 8;
/// Largest peer-book record decoded.
const MAX_RECORD_BYTES: usize = 8 * 1024;

/// A peer remembered across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownPeer {
    /// The peer.
    #[serde(with = "mycel_core::statement::peer_id_bytes")]
    pub peer: PeerId,
    /// Its dialable addresses (multiaddr strings).
    pub addrs: Vec<String>,
    /// When it was last seen, Unix milliseconds.
    pub last_seen: u64,
}

/// The node's transactional state on disk.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    db: Database,
}

impl Store {
    /// Opens (or creates) the database in the data directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(STATE_FILE);
        let db = crate::open_database(
            &path,
            "the peer book and the records of training jobs (peers are learnt again from the \
             network)",
        )
        .map_err(|reason| StoreError::Database {
            path: path.clone(),
            reason,
        })?;
        let store = Self { path, db };
        store.write(|txn| {
            txn.open_table(PEERS)?;
            txn.open_table(META)?;
            txn.open_table(JOBS)?;
            txn.open_table(TRUST)?;
            txn.open_table(ON_DEMAND)?;
            txn.open_table(REVEALED)?;
            txn.open_table(REVEALED_ORDER)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let value = f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(value)
    }

    /// Records (or refreshes) peers and their addresses in one transaction.
    pub fn put_peers(&self, peers: &[KnownPeer]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(PEERS)?;
            for peer in peers {
                let mut record = peer.clone();
                record.addrs.truncate(MAX_ADDRS_PER_PEER);
                let bytes = mycel_core::wire::encode(&record);
                table.insert(peer.peer.to_bytes().as_slice(), bytes.as_slice())?;
            }
            Ok(())
        })
    }

    /// Forgets a peer.
    pub fn remove_peer(&self, peer: &PeerId) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(PEERS)?.remove(peer.to_bytes().as_slice())?;
            Ok(())
        })
    }

    /// Every remembered peer, most recently seen first. Corrupt records are skipped.
    pub fn peers(&self) -> Result<Vec<KnownPeer>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(PEERS).map_err(|e| self.err(e))?;
        let mut peers = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (_, value) = row.map_err(|e| self.err(e))?;
            if let Ok(peer) = mycel_core::wire::decode::<KnownPeer>(value.value(), MAX_RECORD_BYTES)
            {
                peers.push(peer);
            }
        }
        peers.sort_by_key(|p| std::cmp::Reverse(p.last_seen));
        Ok(peers)
    }

    /// Records a training job's state (replacing what was kept under `id`), durably.
    pub fn put_job(&self, id: u128, record: &[u8]) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(JOBS)?.insert(id, record)?;
            Ok(())
        })
    }

    /// A training job's last recorded state.
    pub fn job(&self, id: u128) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
        let value = table.get(id).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Every training job recorded, by id.
    pub fn jobs(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
        let mut jobs = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            jobs.push((key.value(), value.value().to_vec()));
        }
        Ok(jobs)
    }

    /// Records what peers' work has shown (an encoded record per peer), in one transaction.
    pub fn put_trust(&self, records: &[(PeerId, Vec<u8>)]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(TRUST)?;
            for (peer, record) in records {
                table.insert(peer.to_bytes().as_slice(), record.as_slice())?;
            }
            Ok(())
        })
    }

    /// Every peer's recorded trust (peers whose id no longer parses are skipped).
    pub fn trust(&self) -> Result<Vec<(PeerId, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(TRUST).map_err(|e| self.err(e))?;
        let mut records = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            if let Ok(peer) = PeerId::from_bytes(key.value()) {
                records.push((peer, value.value().to_vec()));
            }
        }
        Ok(records)
    }

    /// Records that the model `id` is served on demand, so that it is served again after a
    /// restart (durably).
    pub fn put_on_demand(&self, id: &ContentId) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(ON_DEMAND)?.insert(id.0.as_slice(), ())?;
            Ok(())
        })
    }

    /// Forgets the model `id` served on demand.
    pub fn remove_on_demand(&self, id: &ContentId) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(ON_DEMAND)?.remove(id.0.as_slice())?;
            Ok(())
        })
    }

    /// The models served on demand when the node last ran (a row that is no id is skipped).
    pub fn on_demand(&self) -> Result<Vec<ContentId>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(ON_DEMAND).map_err(|e| self.err(e))?;
        let mut ids = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, _) = row.map_err(|e| self.err(e))?;
            if let Ok(bytes) = <[u8; 32]>::try_from(key.value()) {
                ids.push(ContentId(bytes));
            }
        }
        Ok(ids)
    }

    /// Records `digest` as revealed, durably, before the caller reveals anything: `false`
    /// when it was recorded before (so a restart does not make a node reveal twice). The
    /// newest `keep` digests are kept.
    pub fn reveal_once(&self, digest: &[u8; 32], keep: usize) -> Result<bool, StoreError> {
        self.write(|txn| {
            let mut revealed = txn.open_table(REVEALED)?;
            if revealed.get(digest.as_slice())?.is_some() {
                return Ok(false);
            }
            let mut order = txn.open_table(REVEALED_ORDER)?;
            let next = order.last()?.map_or(0, |(seq, _)| seq.value() + 1);
            revealed.insert(digest.as_slice(), next)?;
            order.insert(next, digest.as_slice())?;
            while order.len()? > keep as u64 {
                let Some((_, oldest)) = order.pop_first()? else {
                    break;
                };
                revealed.remove(oldest.value())?;
            }
            Ok(true)
        })
    }

    /// Reserves the next announcement sequence number: strictly greater than every one handed
    /// out before (persisted before it is returned) and at least `floor`.
    pub fn next_announce_seq(&self, floor: u64) -> Result<u64, StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(META)?;
            let last = table.get(ANNOUNCE_SEQ)?.map_or(0, |v| v.value());
            let next = last.saturating_add(1).max(floor);
            table.insert(ANNOUNCE_SEQ, next)?;
            Ok(next)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_revealed_once_stays_refused_after_reopen_and_the_oldest_go() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            for k in 0..5u8 {
                assert!(store.reveal_once(&[k; 32], 3).unwrap());
            }
            assert!(!store.reveal_once(&[4; 32], 3).unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        assert!(
            !store.reveal_once(&[2; 32], 3).unwrap(),
            "kept across reopening"
        );
        assert!(!store.reveal_once(&[3; 32], 3).unwrap());
        assert!(
            store.reveal_once(&[0; 32], 3).unwrap(),
            "the oldest were forgotten"
        );
        assert!(store.reveal_once(&[9; 32], 3).unwrap());
        assert!(!store.reveal_once(&[9; 32], 3).unwrap());
    }

    #[test]
    fn models_served_on_demand_survive_reopen_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (ContentId([1; 32]), ContentId([2; 32]));
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_on_demand(&a).unwrap();
            store.put_on_demand(&b).unwrap();
            store.put_on_demand(&a).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let mut ids = store.on_demand().unwrap();
        ids.sort_by_key(|id| id.0);
        assert_eq!(ids, vec![a, b]);
        store.remove_on_demand(&a).unwrap();
        drop(store);
        assert_eq!(
            Store::open(dir.path()).unwrap().on_demand().unwrap(),
            vec![b]
        );
    }

    #[test]
    fn peers_survive_reopen_and_are_sorted_by_recency() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (PeerId::random(), PeerId::random());
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .put_peers(&[
                    KnownPeer {
                        peer: a,
                        addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
                        last_seen: 1,
                    },
                    KnownPeer {
                        peer: b,
                        addrs: vec!["/ip4/127.0.0.1/tcp/2".into()],
                        last_seen: 2,
                    },
                ])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let peers = store.peers().unwrap();
        assert_eq!(peers.iter().map(|p| p.peer).collect::<Vec<_>>(), vec![b, a]);
        store.remove_peer(&b).unwrap();
        assert_eq!(store.peers().unwrap().len(), 1);
    }

    #[test]
    fn announce_seq_is_strictly_increasing_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path())
            .unwrap()
            .next_announce_seq(0)
            .unwrap();
        let second = Store::open(dir.path())
            .unwrap()
            .next_announce_seq(0)
            .unwrap();
        assert!(second > first);
        let floored = Store::open(dir.path())
            .unwrap()
            .next_announce_seq(1_000)
            .unwrap();
        assert_eq!(floored, 1_000);
    }

    #[test]
    fn jobs_survive_reopen_and_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_job(7, b"round 1").unwrap();
            store.put_job(7, b"round 2").unwrap();
            store.put_job(9, b"other").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.job(7).unwrap().as_deref(), Some(&b"round 2"[..]));
        assert_eq!(store.job(8).unwrap(), None);
        assert_eq!(store.jobs().unwrap().len(), 2);
    }
}
