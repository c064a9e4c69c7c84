//! `flotilla-proto`: the wire protocol between Flotilla processes.
//!
//! The `.proto` files live in `proto/`; `build.rs` compiles them with protox (pure Rust, so no
//! system `protoc`) into tonic clients and servers. Modules:
//! - [`raft`]: `RaftService` between federator replicas (append-entries, vote, streamed
//!   snapshot install) and `AdminService` for membership, metrics and forwarded writes.
//!
//! - [`etcd`]: a wire-compatible subset of etcd's KV API, used only by the consensus benchmark
//!   to drive etcd as its comparison peer.
//!
//! - [`cellpb`]: `CellService`, the session between a cell agent and the federator leader;
//!   [`cell`] converts its messages to and from `flotilla-core` types.

/// Raft peer and admin services (`flotilla.raft.v1`).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod raft {
    tonic::include_proto!("flotilla.raft.v1");
}

/// etcd's `KV.Put` (`etcdserverpb`), for the consensus benchmark.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The cell session service (`flotilla.cell.v1`).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod cellpb {
    tonic::include_proto!("flotilla.cell.v1");
}

pub mod cell;
