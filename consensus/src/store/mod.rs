//! Durable storage for Raft, in the replica's data directory: the log, the vote and the
//! committed index in an append-only log file (`raft.wal`, see [`wal`]), the latest snapshot
//! in `snapshot.bin` (see [`snapshot_file`]). The redb file `raft.redb` is where versions
//! before kept both; they are moved out of it on the first start.

mod log;
mod snapshot_file;
mod state_machine;
mod wal;

use std::path::Path;
use std::sync::Arc;

pub use log::{LogStats, LogStore};
pub use state_machine::StateMachineStore;

use std::sync::Mutex;

use crate::types::StateMachine;

use openraft::{ErrorSubject, ErrorVerb};

use crate::types::{StorageError, storage_error};

/// The replica's redb database, shared by the stores. When the last holder drops it, the
/// file (and its lock) is closed first and only then is the close announced, so a restart in
/// the same process can wait for the lock to be free.
pub struct Db {
    inner: Option<redb::Database>,
    closed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

impl std::ops::Deref for Db {
    type Target = redb::Database;
    fn deref(&self) -> &redb::Database {
        self.inner
            .as_ref()
            .expect("the database is open until Db is dropped")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        drop(self.inner.take());
        if let Some(closed) = self.closed.take() {
            let _ = closed.send(());
        }
    }
}

/// Opens (or creates) the replica's database at `dir/raft.redb`; the receiver fires once it
/// is closed again.
pub fn open_db(dir: &Path) -> Result<(Arc<Db>, tokio::sync::oneshot::Receiver<()>), StorageError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
    let db = redb::Database::create(dir.join("raft.redb"))
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let db = Db {
        inner: Some(db),
        closed: Some(tx),
    };
    Ok((Arc::new(db), rx))
}

/// The two stores openraft needs for one replica, plus a shared handle on the application
/// state for reads.
#[derive(Debug)]
pub struct Stores<S> {
    /// The log store.
    pub log: LogStore,
    /// The state machine store.
    pub state_machine: StateMachineStore,
    /// The application state the state machine store applies to.
    pub app: Arc<Mutex<S>>,
    /// Fires once the database is closed (its file lock released), after the stores and their
    /// writer thread are gone; [`crate::Node`] waits for it on shutdown.
    pub closed: tokio::sync::oneshot::Receiver<()>,
}

/// Opens the replica's stores in `dir`, restoring `app` from the last snapshot if there is one.
pub fn open<S: StateMachine>(dir: &Path, app: S) -> Result<Stores<S>, StorageError> {
    let (db, closed) = open_db(dir)?;
    let app = Arc::new(Mutex::new(app));
    let state_machine =
        StateMachineStore::open(dir, db.clone(), Box::new(state_machine::Typed(app.clone())))?;
    Ok(Stores {
        log: LogStore::open(dir, db)?,
        state_machine,
        app,
        closed,
    })
}
