//! `flotilla-consensus`: the Raft-replicated log under the federator (ARCHITECTURE §2, §4).
//!
//! Built on openraft 0.9 (pinned exactly) rather than a home-made Raft. Layout:
//! - [`types`]: the openraft type configuration and the [`StateMachine`] trait an
//!   application implements (the federator plugs in `flotilla-core`'s deterministic `apply`).
//! - [`store`]: the log, vote and committed index in an append-only file with group commit;
//!   the latest snapshot in a file of its own (redb only for moving older data out).
//! - [`early`]: the leader offers fresh entries to followers while its own sync runs.
//! - [`kv`]: a small key-value state machine for tests, benchmarks and bring-up.
//!
//! - [`network`]: the tonic client side (one channel per peer, deadlines, backoff, streamed
//!   snapshots) and [`network::Faults`] for partition tests.
//! - [`server`]: the `RaftService` and `AdminService` a replica serves.
//! - [`tls`]: optional mutual TLS (rustls, ring) for all of it: [`TlsConfig`].
//! - [`Node`]: a replica behind a typed API — bootstrap, propose (with `ForwardToLeader`),
//!   forwarding to the leader, linearizable reads, membership changes, shutdown and crash.

// openraft's `StorageError` is large, and its storage traits must return it; boxing it in our
// own constructors would only add conversions at every call.
#![allow(clippy::result_large_err)]

mod batcher;
pub mod early;
pub mod kv;
pub mod network;
mod node;
pub mod server;
pub mod store;
pub mod tls;
pub mod types;

pub use node::{Node, NodeConfig, NodeError, admin_client, join_cluster, join_cluster_tls};
pub use tls::{TlsConfig, TlsError};
pub use types::{NodeId, StateMachine};
