//! `flotilla-consensus`: the Raft-replicated log under the federator (ARCHITECTURE §2, §4).
//!
//! Built on openraft 0.9 (pinned exactly) rather than a home-made Raft. Layout:
//! - [`types`]: the openraft type configuration and the [`StateMachine`] trait an
//!   application implements (the federator plugs in `flotilla-core`'s deterministic `apply`).
//! - [`store`]: redb-backed log, vote, committed index and snapshots, with group commit.
//! - [`kv`]: a small key-value state machine for tests, benchmarks and bring-up.
//!
//! The network (tonic), the node API (propose, linearizable reads, membership) and the admin
//! service build on these.

// openraft's `StorageError` is large, and its storage traits must return it; boxing it in our
// own constructors would only add conversions at every call.
#![allow(clippy::result_large_err)]

pub mod kv;
pub mod store;
pub mod types;

pub use types::{NodeId, StateMachine};
