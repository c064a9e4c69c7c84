//! The openraft type configuration and the application state machine it replicates.
//!
//! The log carries opaque bytes ([`Request`], [`Response`]) so the Raft machinery is one
//! concrete type; [`StateMachine`] is the typed face an application implements, and
//! [`crate::Node`] encodes and decodes at the boundary.

use std::io;

use bytes::Bytes;
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
///
/// Reference-counted, because openraft clones every entry it reads from the log (once per
/// follower it replicates to, and again to apply it): a clone must not copy the payload.
/// `Bytes` serializes as a byte string, which postcard writes exactly as it wrote the
/// `Vec<u8>` this used to be (a varint length, then the bytes), so logs and snapshots written
/// before read back unchanged — only without a serde call per byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request(pub Bytes);

/// What applying a [`Request`] returned, encoded by the application. Same encoding as
/// [`Request`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Bytes);

/// A byte slice that serializes as one byte string rather than a sequence of `u8`s: the same
/// postcard bytes, written with one copy instead of one call per byte. Deserialize the other
/// side as `&[u8]` (borrowed) or [`Bytes`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ByteStr<'a>(pub(crate) &'a [u8]);

impl Serialize for ByteStr<'_> {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        s.serialize_bytes(self.0)
    }
}

/// `#[serde(with = "byte_string")]` for a `Vec<u8>` field: written as [`ByteStr`] (same
/// postcard bytes as a plain `Vec<u8>`), read back without a call per byte.
pub(crate) mod byte_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        bytes::Bytes::deserialize(d).map(Vec::from)
    }
}

/// Produces a snapshot's bytes; see [`StateMachine::snapshot`].
pub type SnapshotEncoder = Box<dyn FnOnce() -> Vec<u8> + Send>;

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

    /// Captures the state for a snapshot. Called with the state locked, so it should only
    /// take a cheap copy (shared or persistent data); the returned encoder produces the bytes
    /// later, off the lock and off the async runtime, while commands keep being applied.
    fn snapshot(&self) -> SnapshotEncoder;

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

/// [`decode`] into a type that borrows from `bytes` (byte strings as `&[u8]`, no copies).
pub(crate) fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, io::Error> {
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries and snapshots already on disk were written with `Vec<u8>` payloads; the byte
    /// string encodings must produce (and read) exactly the same bytes.
    #[test]
    fn byte_string_payloads_encode_exactly_as_the_vec_payloads_they_replaced() {
        let payload: Vec<u8> = (0..=255).collect();
        let old = encode(&payload).unwrap();
        assert_eq!(encode(&Request(Bytes::from(payload.clone()))).unwrap(), old);
        assert_eq!(
            encode(&Response(Bytes::from(payload.clone()))).unwrap(),
            old
        );
        assert_eq!(decode::<Request>(&old).unwrap().0, payload);

        let batch: Vec<Vec<u8>> = vec![vec![], vec![7], payload.clone()];
        let old = encode(&batch).unwrap();
        let new: Vec<ByteStr<'_>> = batch.iter().map(|c| ByteStr(c)).collect();
        assert_eq!(encode(&new).unwrap(), old);
        assert_eq!(decode_borrowed::<Vec<&[u8]>>(&old).unwrap(), batch);

        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Old {
            data: Vec<u8>,
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct New {
            #[serde(with = "byte_string")]
            data: Vec<u8>,
        }
        let old = encode(&Old {
            data: payload.clone(),
        })
        .unwrap();
        assert_eq!(
            encode(&New {
                data: payload.clone()
            })
            .unwrap(),
            old
        );
        assert_eq!(decode::<New>(&old).unwrap().data, payload);
    }
}
