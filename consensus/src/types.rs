//! The openraft type configuration and the application state machine it replicates.
//!
//! The log carries opaque bytes ([`Request`], [`Response`]) so the Raft machinery is one
//! concrete type; [`StateMachine`] is the typed face an application implements, and
//! [`crate::Node`] encodes and decodes at the boundary.

use std::io;

use openraft::BasicNode;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

openraft::declare_raft_types!(
    /// Flotilla's Raft types: u64 node ids, nodes known by their gRPC address, opaque
    /// commands, and snapshots as whole byte buffers (streamed in chunks on the wire).
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = Vec<u8>,
);

/// A replica's id.
pub type NodeId = u64;
/// openraft's handle, with Flotilla's types.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log position.
pub type LogId = openraft::LogId<NodeId>;
/// Where the state machine's membership came from.
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
/// A storage failure, as openraft wants it.
pub type StorageError = openraft::StorageError<NodeId>;

/// An application command as it travels through the log: encoded by the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request(pub Vec<u8>);

/// What applying a [`Request`] returned, encoded by the application.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Vec<u8>);

/// The deterministic state machine a cluster replicates.
///
/// `apply` must be a pure function of the state and the command (no clock, no randomness,
/// no I/O): every replica applies the same commands in the same order and must end in the same
/// state. Snapshots are the state's bytes; `restore` replaces the state with them.
pub trait StateMachine: Send + Sync + 'static {
    /// A command proposed by a client.
    type Command: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What applying a command returns to the proposer.
    type Response: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Applies a committed command; `index` is its log index.
    fn apply(&mut self, index: u64, command: Self::Command) -> Self::Response;

    /// The whole state, encoded.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the state with a snapshot made by [`StateMachine::snapshot`].
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
}

/// A storage failure about `subject` while doing `verb`, from any error.
pub(crate) fn storage_error(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    StorageError::from_io_error(subject, verb, io::Error::other(e.to_string()))
}

/// Encodes with postcard, the format of everything this crate writes.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, io::Error> {
    postcard::to_stdvec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Decodes what [`encode`] wrote.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, io::Error> {
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
