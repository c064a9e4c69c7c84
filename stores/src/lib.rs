//! Where attempts' logs and artifacts are kept for good: the adapters of the
//! [`LogStore`](flotilla_core::store::LogStore) and
//! [`ArtifactStore`](flotilla_core::store::ArtifactStore) ports (`core/src/store.rs` defines
//! them and the storage layout), and the one conformance suite every adapter must pass.
//!
//! Two adapters, so that `flotilla dev` needs nothing but a directory and production needs
//! nothing but a bucket, behaving the same (the suite is the contract):
//! - [`dir`]: files below a root directory, for the embedded mode. Every write is a
//!   temporary file, `fsync`, `rename` and a directory `fsync`, so a crash never leaves half
//!   an object visible.
//! - [`s3`]: an S3 bucket (AWS or any S3-compatible store), through `aws-sdk-s3` on hyper 1
//!   and rustls with ring. Artifacts go up as multipart uploads of 16 MiB parts, at most 4 in
//!   flight, so memory stays bounded whatever the file's size.
//!
//! Layout of the crate:
//! - [`chunk`]: the log chunk encoding both log adapters share (zstd-compressed JSON lines
//!   behind a magic and version, with zstd's content checksum).
//! - `manifest` (private): checks and (de)serializes `manifest.json`.
//! - `read` (private): the read path both log adapters share: which chunks a read needs (an
//!   in-memory cache of each chunk's last line spares following a live log from fetching
//!   every chunk again), merging them and dropping repeated lines.
//! - `sha` (private): SHA-256 in hex, and the check of a declared hash.
//! - `atomic` (private): temporary files renamed into place.
//! - [`stream`]: the adapters of the [`LogStream`](flotilla_core::store::LogStream) port
//!   (also in `core/src/store.rs`), which carries log lines in flight from the runners to the
//!   aggregator: an append-only file for the embedded mode, a Kafka topic in production.
//! - [`conformance`]: the suites (logs, artifacts, the log stream), one public function per
//!   case.

pub mod chunk;
pub mod conformance;
pub mod dir;
pub mod s3;
pub mod stream;

mod atomic;
mod manifest;
mod read;
mod sha;
