//! The replicated state machine's home: the application state in memory, its latest snapshot
//! in a file of its own ([`super::snapshot_file`]; versions before kept it in redb, and it is
//! moved out on the first start).
//!
//! Applying does not write to disk. On restart the state is restored from the last snapshot
//! and openraft re-applies the log from there up to the persisted committed index, so nothing
//! acknowledged is lost and applying stays fast.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Database, Durability};

use super::{Db, snapshot_file};
use serde::{Deserialize, Serialize};

use super::log::META;
use crate::types::{
    ByteStr, Entry, LogId, Response, SnapshotMeta, StateMachine, StorageError, StoredMembership,
    TypeConfig, decode, decode_borrowed, encode, storage_error,
};
use openraft::{ErrorSubject, ErrorVerb};

const SNAPSHOT: &str = "snapshot";
/// How much the snapshot thread lowers its CPU priority: to the lowest (nice 19). With three
/// replicas encoding at once on a busy 2-core machine, nice 10 still let snapshots push the
/// webhook benchmark's p99 to 28 ms; at 19 it stayed at 8–21 ms.
const SNAPSHOT_NICENESS: i32 = 19;

/// The application state machine with its bytes interface, so the store is not generic.
pub(crate) trait Erased: Send + Sync {
    fn apply(&mut self, index: u64, batch: &[u8]) -> Result<Vec<u8>, std::io::Error>;
    fn snapshot(&self) -> crate::types::SnapshotEncoder;
    fn restore(&mut self, bytes: &[u8]) -> Result<(), String>;
}

/// Adapts a typed [`StateMachine`] shared with [`crate::Node`], which reads it.
pub(crate) struct Typed<S: StateMachine>(pub(crate) Arc<Mutex<S>>);

impl<S: StateMachine> Typed<S> {
    fn state(&self) -> MutexGuard<'_, S> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: StateMachine> Erased for Typed<S> {
    /// An entry carries a batch of encoded commands (see `crate::batcher`); each is applied
    /// in order and answered in order.
    fn apply(&mut self, index: u64, batch: &[u8]) -> Result<Vec<u8>, std::io::Error> {
        let commands: Vec<&[u8]> = decode_borrowed(batch)?;
        let mut state = self.state();
        let mut responses = Vec::with_capacity(commands.len());
        for command in commands {
            let command: S::Command = decode(command)?;
            responses.push(encode(&state.apply(index, command))?);
        }
        drop(state);
        let responses: Vec<ByteStr<'_>> = responses.iter().map(|r| ByteStr(r)).collect();
        encode(&responses)
    }

    fn snapshot(&self) -> crate::types::SnapshotEncoder {
        self.state().snapshot()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.state().restore(bytes)
    }
}

/// A snapshot as stored: its metadata and the application's bytes.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    #[serde(with = "crate::types::byte_string")]
    data: Vec<u8>,
}

struct Inner {
    app: Box<dyn Erased>,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshots_built: u64,
}

/// openraft's state machine store. Clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Mutex<Inner>>,
    /// The data directory, where the snapshot file lives.
    dir: Arc<Path>,
    /// Held until the store is gone, so the database closes (and
    /// [`super::Stores::closed`] fires) only after the last snapshot write.
    _db: Arc<Db>,
    /// The last log id of the snapshot in the file. Its lock is held while a snapshot is
    /// written, so a snapshot built and one installed at the same time (openraft builds on
    /// a task of its own) never write the file together, and an older one never replaces a
    /// newer one.
    persisted: Arc<Mutex<Option<LogId>>>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore").finish_non_exhaustive()
    }
}

impl StateMachineStore {
    /// Opens the store in `dir`, restoring the application from the last snapshot, if any
    /// (moving one that an older version kept in the database `db` into its file first).
    pub(crate) fn open(
        dir: &Path,
        db: Arc<Db>,
        mut app: Box<dyn Erased>,
    ) -> Result<Self, StorageError> {
        let read_error = |e: &dyn std::fmt::Display| {
            storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e.to_string())
        };
        if !snapshot_file::exists(dir)
            && let Some(legacy) = legacy_snapshot(&db).map_err(|e| read_error(&e))?
        {
            snapshot_file::write(dir, &legacy).map_err(|e| read_error(&e))?;
        }
        clear_legacy_snapshot(&db).map_err(|e| read_error(&e))?;
        let current = match snapshot_file::read(dir).map_err(|e| read_error(&e))? {
            Some(bytes) => Some(decode::<StoredSnapshot>(&bytes).map_err(|e| read_error(&e))?),
            None => None,
        };
        let current_id = current.as_ref().and_then(|s| s.meta.last_log_id);
        let (last_applied, last_membership) = match &current {
            Some(s) => {
                app.restore(&s.data)
                    .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
                (s.meta.last_log_id, s.meta.last_membership.clone())
            }
            None => (None, StoredMembership::default()),
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                app,
                last_applied,
                last_membership,
                snapshots_built: 0,
            })),
            persisted: Arc::new(Mutex::new(current_id)),
            dir: dir.into(),
            _db: db,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The index of the last applied entry.
    pub fn last_applied_index(&self) -> Option<u64> {
        self.inner().last_applied.map(|l| l.index)
    }

    /// Writes `snapshot` to the file unless the file already holds one as new; says whether
    /// it wrote.
    fn persist(&self, snapshot: &StoredSnapshot) -> Result<bool, StorageError> {
        let mut persisted = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        if persisted.is_some() && *persisted >= snapshot.meta.last_log_id {
            return Ok(false);
        }
        let sig = Some(snapshot.meta.signature());
        let err = |e: &dyn std::fmt::Display| {
            storage_error(
                ErrorSubject::Snapshot(sig.clone()),
                ErrorVerb::Write,
                e.to_string(),
            )
        };
        let bytes = encode(snapshot).map_err(|e| err(&e))?;
        snapshot_file::write(&self.dir, &bytes).map_err(|e| err(&e))?;
        *persisted = snapshot.meta.last_log_id;
        Ok(true)
    }

    /// Writes `snapshot` on a blocking thread (unless a newer one is already written).
    async fn persist_off_runtime(&self, snapshot: StoredSnapshot) -> Result<(), StorageError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.persist(&snapshot))
            .await
            .map_err(|e| {
                storage_error(
                    ErrorSubject::Snapshot(None),
                    ErrorVerb::Write,
                    format!("snapshot writer task failed: {e}"),
                )
            })?
            .map(|_| ())
    }
}

/// The encoded snapshot an older version kept in redb, if any.
fn legacy_snapshot(db: &Database) -> Result<Option<Vec<u8>>, std::io::Error> {
    let tx = db.begin_read().map_err(std::io::Error::other)?;
    let meta = match tx.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(std::io::Error::other(e)),
    };
    Ok(meta
        .get(SNAPSHOT)
        .map_err(std::io::Error::other)?
        .map(|v| v.value().to_vec()))
}

/// Removes the redb copy of the snapshot once the file holds it (a no-op when there is none).
fn clear_legacy_snapshot(db: &Database) -> Result<(), std::io::Error> {
    if legacy_snapshot(db)?.is_none() {
        return Ok(());
    }
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate);
        tx.open_table(META)?.remove(SNAPSHOT)?;
        tx.commit()?;
        Ok(())
    };
    run().map_err(|e| std::io::Error::other(e.to_string()))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Under the lock: only the metadata and a cheap capture of the state, so applying
        // (and with it every client's answer) pauses for as short a time as possible.
        let (meta, encoder) = {
            let mut inner = self.inner();
            inner.snapshots_built += 1;
            let last = inner.last_applied;
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshots_built),
                None => format!("--{}", inner.snapshots_built),
            };
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: inner.last_membership.clone(),
                snapshot_id,
            };
            (meta, inner.app.snapshot())
        };
        // Encoding and writing a large snapshot (megabytes, one fsync) is blocking work: keep
        // it off the runtime's worker threads, which carry replication and client traffic, on
        // a thread of its own at a lower CPU priority, so that on a busy machine the snapshot
        // takes longer rather than every client's answer.
        let store = self.clone();
        let (done, finished) = tokio::sync::oneshot::channel();
        let writer = std::thread::Builder::new()
            .name("raft-snapshot".into())
            .spawn(move || {
                // Linux nice values are per thread; failing to lower it only costs latency.
                let _ = rustix::process::nice(SNAPSHOT_NICENESS);
                let stored = StoredSnapshot {
                    meta,
                    data: encoder(),
                };
                let _ = done.send(store.persist(&stored).map(|_| stored));
            });
        let failed = |e: &dyn std::fmt::Display| {
            storage_error(
                ErrorSubject::Snapshot(None),
                ErrorVerb::Write,
                format!("snapshot writer thread failed: {e}"),
            )
        };
        writer.map_err(|e| failed(&e))?;
        // Not kept in memory: the file is the current snapshot (read back only when a follower
        // needs one). Not written if a newer one was installed meanwhile; openraft only uses
        // this one's metadata (to purge the log up to it), which stays true.
        let stored = finished.await.map_err(|e| failed(&e))??;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(stored.data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.inner();
        Ok((inner.last_applied, inner.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner();
        let mut out = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(request) => Response(
                    inner
                        .app
                        .apply(entry.log_id.index, &request.0)
                        .map_err(|e| {
                            storage_error(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write, &e)
                        })?
                        .into(),
                ),
                EntryPayload::Membership(m) => {
                    inner.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::default()
                }
            };
            out.push(response);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: *snapshot,
        };
        {
            let mut inner = self.inner();
            inner.app.restore(&stored.data).map_err(|e| {
                storage_error(
                    ErrorSubject::Snapshot(Some(meta.signature())),
                    ErrorVerb::Read,
                    e,
                )
            })?;
            inner.last_applied = meta.last_log_id;
            inner.last_membership = meta.last_membership.clone();
        }
        self.persist_off_runtime(stored).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // No lock: a snapshot is renamed into place whole, so this reads the old or the new one.
        let read_error = |e: &dyn std::fmt::Display| {
            storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e.to_string())
        };
        let Some(bytes) = snapshot_file::read(&self.dir).map_err(|e| read_error(&e))? else {
            return Ok(None);
        };
        let stored: StoredSnapshot = decode(&bytes).map_err(|e| read_error(&e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(stored.data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::kv::KvStore;
    use crate::store::open_db;

    fn stored(index: u64, value: &str) -> StoredSnapshot {
        let mut kv = KvStore::default();
        kv.map.insert("k".into(), value.as_bytes().to_vec());
        kv.applied = index;
        StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
                last_membership: StoredMembership::default(),
                snapshot_id: format!("1-{index}"),
            },
            data: kv.snapshot()(),
        }
    }

    /// openraft may finish building a snapshot after it installed a newer one from the
    /// leader: the older one must not replace it, on disk or as the current snapshot.
    #[tokio::test]
    async fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _closed) = open_db(dir.path()).unwrap();
        let app = Arc::new(Mutex::new(KvStore::default()));
        let mut store =
            StateMachineStore::open(dir.path(), db.clone(), Box::new(Typed(app))).unwrap();
        let newer = stored(20, "new");
        store
            .install_snapshot(&newer.meta, Box::new(newer.data.clone()))
            .await
            .unwrap();
        assert!(!store.persist(&stored(10, "old")).unwrap());
        let current = store.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(20));
        drop(store);
        let app = Arc::new(Mutex::new(KvStore::default()));
        let store = StateMachineStore::open(dir.path(), db, Box::new(Typed(app.clone()))).unwrap();
        assert_eq!(store.last_applied_index(), Some(20));
        assert_eq!(
            app.lock().unwrap().map.get("k").map(Vec::as_slice),
            Some(&b"new"[..])
        );
    }

    /// A replica upgraded from a version that kept its snapshot in redb restores from it, and
    /// the snapshot is in its file afterwards, gone from redb.
    #[test]
    fn a_snapshot_kept_in_redb_by_an_earlier_version_moves_into_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut kv = KvStore::default();
        kv.map.insert("k".into(), b"v".to_vec());
        kv.applied = 5;
        let stored = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 5)),
                last_membership: StoredMembership::default(),
                snapshot_id: "1-5-1".into(),
            },
            data: kv.snapshot()(),
        };
        let (db, _closed) = open_db(dir.path()).unwrap();
        {
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert(SNAPSHOT, encode(&stored).unwrap().as_slice())
                .unwrap();
            tx.commit().unwrap();
        }

        let app = Arc::new(Mutex::new(KvStore::default()));
        let store =
            StateMachineStore::open(dir.path(), db.clone(), Box::new(Typed(app.clone()))).unwrap();
        assert_eq!(store.last_applied_index(), Some(5));
        assert_eq!(
            app.lock().unwrap().map.get("k").map(Vec::as_slice),
            Some(&b"v"[..])
        );
        assert!(snapshot_file::exists(dir.path()));
        assert_eq!(legacy_snapshot(&db).unwrap(), None);
        drop(store);

        // A restart reads it from the file.
        let app = Arc::new(Mutex::new(KvStore::default()));
        let store = StateMachineStore::open(dir.path(), db, Box::new(Typed(app.clone()))).unwrap();
        assert_eq!(store.last_applied_index(), Some(5));
        assert_eq!(app.lock().unwrap().applied, 5);
    }
}
