//! The replicated state machine's home: the application state in memory, its snapshots in redb.
//!
//! Applying does not write to disk. On restart the state is restored from the last snapshot
//! and openraft re-applies the log from there up to the persisted committed index, so nothing
//! acknowledged is lost and applying stays fast.

use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Database, Durability};

use super::Db;
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
    current: Option<StoredSnapshot>,
    snapshots_built: u64,
}

/// openraft's state machine store. Clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Mutex<Inner>>,
    db: Arc<Db>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore").finish_non_exhaustive()
    }
}

impl StateMachineStore {
    /// Opens the store, restoring the application from the last snapshot in `db`, if any.
    pub(crate) fn open(db: Arc<Db>, mut app: Box<dyn Erased>) -> Result<Self, StorageError> {
        let current = load_snapshot(&db)
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, &e))?;
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
                current,
                snapshots_built: 0,
            })),
            db,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The index of the last applied entry.
    pub fn last_applied_index(&self) -> Option<u64> {
        self.inner().last_applied.map(|l| l.index)
    }

    fn persist(&self, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        let sig = Some(snapshot.meta.signature());
        let err = |e: &dyn std::fmt::Display| {
            storage_error(
                ErrorSubject::Snapshot(sig.clone()),
                ErrorVerb::Write,
                e.to_string(),
            )
        };
        let bytes = encode(snapshot).map_err(|e| err(&e))?;
        let mut tx = self.db.begin_write().map_err(|e| err(&e))?;
        tx.set_durability(Durability::Immediate);
        {
            let mut meta = tx.open_table(META).map_err(|e| err(&e))?;
            meta.insert(SNAPSHOT, bytes.as_slice())
                .map_err(|e| err(&e))?;
        }
        tx.commit().map_err(|e| err(&e))
    }
}

fn load_snapshot(db: &Database) -> Result<Option<StoredSnapshot>, std::io::Error> {
    let tx = db.begin_read().map_err(std::io::Error::other)?;
    let meta = match tx.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(std::io::Error::other(e)),
    };
    match meta.get(SNAPSHOT).map_err(std::io::Error::other)? {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Ok(None),
    }
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
                let _ = done.send(store.persist(&stored).map(|()| stored));
            });
        let failed = |e: &dyn std::fmt::Display| {
            storage_error(
                ErrorSubject::Snapshot(None),
                ErrorVerb::Write,
                format!("snapshot writer thread failed: {e}"),
            )
        };
        writer.map_err(|e| failed(&e))?;
        let stored = finished.await.map_err(|e| failed(&e))??;
        let snapshot = Snapshot {
            meta: stored.meta.clone(),
            snapshot: Box::new(stored.data.clone()),
        };
        self.inner().current = Some(stored);
        Ok(snapshot)
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
        self.persist(&stored)?;
        self.inner().current = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.inner().current.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(s.data.clone()),
        }))
    }
}
