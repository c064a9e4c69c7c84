//! Durable storage for Raft: one redb file per replica holding the log, the vote, the
//! committed index and the latest snapshot.

mod log;
mod state_machine;

use std::path::Path;
use std::sync::Arc;

pub use log::{LogStats, LogStore};
pub use state_machine::StateMachineStore;

use std::sync::Mutex;

use crate::types::StateMachine;

use openraft::{ErrorSubject, ErrorVerb};

use crate::types::{StorageError, storage_error};

/// Opens (or creates) the replica's database at `dir/raft.redb`.
pub fn open_db(dir: &Path) -> Result<Arc<redb::Database>, StorageError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
    redb::Database::create(dir.join("raft.redb"))
        .map(Arc::new)
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
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
}

/// Opens the replica's stores in `dir`, restoring `app` from the last snapshot if there is one.
pub fn open<S: StateMachine>(dir: &Path, app: S) -> Result<Stores<S>, StorageError> {
    let db = open_db(dir)?;
    let app = Arc::new(Mutex::new(app));
    let state_machine =
        StateMachineStore::open(db.clone(), Box::new(state_machine::Typed(app.clone())))?;
    Ok(Stores {
        log: LogStore::open(db)?,
        state_machine,
        app,
    })
}
