//! A small key-value state machine.
//!
//! It is what the consensus tests and the commit benchmark replicate, and what
//! `flotilla federator` replicates until the federator's own state (in `flotilla-core`) plugs
//! in. Deterministic, as every [`StateMachine`] must be.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{StateMachine, decode, encode};

/// A change to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The new value.
        #[serde(with = "crate::types::byte_string")]
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: String,
    },
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvResponse {
    /// The log index the command was applied at.
    pub index: u64,
    /// The value the key had before.
    pub previous: Option<Vec<u8>>,
}

/// The replicated map, plus how many commands it has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStore {
    /// The data.
    pub map: BTreeMap<String, Vec<u8>>,
    /// Commands applied (not counting Raft's own entries).
    pub applied: u64,
}

impl StateMachine for KvStore {
    type Command = KvCommand;
    type Response = KvResponse;

    fn apply(&mut self, index: u64, command: KvCommand) -> KvResponse {
        self.applied += 1;
        let previous = match command {
            KvCommand::Put { key, value } => self.map.insert(key, value),
            KvCommand::Delete { key } => self.map.remove(&key),
        };
        KvResponse { index, previous }
    }

    fn snapshot(&self) -> crate::types::SnapshotEncoder {
        let copy = self.clone();
        Box::new(move || encode(&copy).unwrap_or_default())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        *self = decode(snapshot).map_err(|e| format!("unreadable kv snapshot: {e}"))?;
        Ok(())
    }
}
