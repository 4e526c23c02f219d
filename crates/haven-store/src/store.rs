//! The openraft storage traits over one redb database.

// openraft fixes the error type of every storage method; its size is not ours to change.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{ClusterState, NodeId, NodeInfo, Response, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
const SM: &str = "state_machine";
const SNAPSHOT: &str = "snapshot";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the cluster state database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("the cluster state database {path} is unreadable: {reason}")]
    Corrupt { path: String, reason: String },
}

type SErr = StorageError<NodeId>;

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

fn read_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::read(any(e)).into()
}

fn write_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write(any(e)).into()
}

fn get_meta<T: for<'a> Deserialize<'a>>(db: &Database, key: &str) -> Result<Option<T>, SErr> {
    let txn = db.begin_read().map_err(read_err)?;
    let table = txn.open_table(META).map_err(read_err)?;
    match table.get(key).map_err(read_err)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(read_err),
    }
}

fn put_meta<T: Serialize>(db: &Database, key: &str, value: &T) -> Result<(), SErr> {
    put_meta_with(db, key, value, Durability::Immediate)
}

/// As [`put_meta`], with the given durability. The applied state may be written
/// without an fsync: the log it was applied from is durable, and after a crash openraft
/// re-applies whatever the persisted state machine has not seen (apply is deterministic).
fn put_meta_with<T: Serialize>(
    db: &Database,
    key: &str,
    value: &T,
    durability: Durability,
) -> Result<(), SErr> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    let mut txn = db.begin_write().map_err(write_err)?;
    txn.set_durability(durability).map_err(write_err)?;
    {
        let mut table = txn.open_table(META).map_err(write_err)?;
        table.insert(key, bytes.as_slice()).map_err(write_err)?;
    }
    txn.commit().map_err(write_err)
}

/// Opens (creating if absent) the database at `path`, returning the two halves openraft
/// wants. They share the database.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let open_err = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
    };
    let db = Database::create(path).map_err(|e| open_err(e.to_string()))?;
    // Tables are created up front so that read transactions never meet a missing one.
    let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
    txn.open_table(LOG).map_err(|e| open_err(e.to_string()))?;
    txn.open_table(META).map_err(|e| open_err(e.to_string()))?;
    txn.commit().map_err(|e| open_err(e.to_string()))?;
    let db = Arc::new(db);
    let corrupt = |e: SErr| StoreError::Corrupt {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let data: SmData = get_meta(&db, SM).map_err(corrupt)?.unwrap_or_default();
    let sm = StateMachineStore {
        db: db.clone(),
        data: Arc::new(RwLock::new(data)),
    };
    Ok((LogStore { db }, sm))
}

/// The Raft log, the vote and the committed index.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, SErr> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let last = table.last().map_err(read_err)?;
        match last {
            None => Ok(None),
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(read_err)?;
                Ok(Some(e.log_id))
            }
        }
    }

    fn remove_range(&self, range: impl RangeBounds<u64>) -> Result<(), SErr> {
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            table.retain_in(range, |_, _| false).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(s) => Bound::Included(*s),
            Bound::Excluded(s) => Bound::Excluded(*s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for item in table.range::<u64>((start, end)).map_err(read_err)? {
            let (_, v) = item.map_err(read_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged_log_id: Option<LogId<NodeId>> = get_meta(&self.db, PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        put_meta(&self.db, VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        get_meta(&self.db, VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        put_meta(&self.db, COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(get_meta::<Option<LogId<NodeId>>>(&self.db, COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(write_err)?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(write_err)?;
            }
        }
        // redb's commit is durable (fsync) before it returns, which is what the callback
        // promises openraft.
        let result = txn
            .commit()
            .map_err(|e| std::io::Error::other(e.to_string()));
        let failed = result.as_ref().err().map(|e| e.to_string());
        callback.log_io_completed(result);
        match failed {
            Some(reason) => Err(write_err(reason)),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.remove_range(log_id.index..)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        // The purge point is recorded first: a crash between the two steps leaves extra
        // entries below it, which is harmless, never a hole above it.
        put_meta(&self.db, PURGED, &log_id)?;
        self.remove_range(..=log_id.index)
    }
}

/// What the state machine persists: the state and how far the log has been applied.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, NodeInfo>,
    state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

/// The state machine. Clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    data: Arc<RwLock<SmData>>,
}

/// A read handle on the applied cluster state, for status and the coordinator.
#[derive(Clone)]
pub struct StateView {
    data: Arc<RwLock<SmData>>,
}

impl StateView {
    /// A copy of the state as last applied on this node.
    pub fn state(&self) -> ClusterState {
        self.data
            .read()
            .map(|d| d.state.clone())
            .unwrap_or_default()
    }

    /// The index of the last applied entry (0 when none).
    pub fn applied_index(&self) -> u64 {
        self.data
            .read()
            .ok()
            .and_then(|d| d.last_applied.map(|l| l.index))
            .unwrap_or(0)
    }
}

impl StateMachineStore {
    pub fn view(&self) -> StateView {
        StateView {
            data: self.data.clone(),
        }
    }

    fn snapshot_of(&self) -> Result<Snapshot<TypeConfig>, SErr> {
        let data = self.data.read().map_err(read_err)?.clone();
        let bytes = serde_json::to_vec(&data).map_err(read_err)?;
        let snapshot_id = match data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, bytes.len()),
            None => format!("empty-{}", bytes.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.last_membership.clone(),
            snapshot_id,
        };
        put_meta(
            &self.db,
            SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data: bytes.clone(),
            },
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        self.snapshot_of()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), SErr> {
        let d = self.data.read().map_err(read_err)?;
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let snapshot = {
            let mut d = self.data.write().map_err(write_err)?;
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                let reply = match &entry.payload {
                    EntryPayload::Blank => Response::Done,
                    EntryPayload::Normal(req) => d.state.apply(req),
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Response::Done
                    }
                };
                replies.push(reply);
            }
            d.clone()
        };
        put_meta_with(&self.db, SM, &snapshot, Durability::None)?;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let bytes = snapshot.into_inner();
        let mut data: SmData = serde_json::from_slice(&bytes).map_err(write_err)?;
        // The meta is authoritative for where the snapshot stands in the log.
        data.last_applied = meta.last_log_id;
        data.last_membership = meta.last_membership.clone();
        put_meta(&self.db, SM, &data)?;
        put_meta(
            &self.db,
            SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data: bytes,
            },
        )?;
        *self.data.write().map_err(write_err)? = data;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let stored: Option<StoredSnapshot> = get_meta(&self.db, SNAPSHOT)?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
