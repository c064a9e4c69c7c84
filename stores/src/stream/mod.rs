//! The adapters of the [`LogStream`](flotilla_core::store::LogStream) port (ARCHITECTURE §3,
//! "log stream in flight"): how runners' log lines travel to the aggregator, durably, in order
//! per job, at least once.
//!
//! - [`FileLogStream`] ([`file`](mod@file)): the embedded adapter for `flotilla dev`. One partition, an
//!   append-only file of checksummed records, consumer groups' positions in small JSON files.
//! - [`KafkaLogStream`] ([`kafka`]): the production adapter, a Kafka topic keyed by job through
//!   rdkafka (librdkafka).
//!
//! Both pass [`log_stream_suite`](crate::conformance::log_stream_suite). What they share:
//! - A [`StreamPosition`](flotilla_core::store::StreamPosition) is opaque to callers: only
//!   this consumer's `poll` makes them, and `commit` takes them back. (The file's are byte
//!   positions, Kafka's are partition offsets.)
//! - `poll(max, wait)` waits at most `wait` for a first record, then takes whatever more is
//!   already at hand (up to `max`) without waiting again: a steady stream is returned in
//!   batches as fast as it is read, a trickle one record at a time, and an idle stream
//!   costs one wake-up per `wait`.
//! - `commit(done)` takes, per partition, the highest of `done`: everything up to it is
//!   handled. A commit at or below what the consumer committed before changes nothing.
//! - Delivery is at least once: whatever a consumer returned but its group did not commit is
//!   returned again to the group's next consumer. A `publish` that failed may have stored
//!   some of its records; publishing them again is right (consumers drop repeated sequence
//!   numbers).

pub mod file;
pub mod kafka;

pub use file::{FILE_FORMAT_VERSION, FileLogStream, MAX_RECORD_BYTES};
pub use kafka::{KafkaConfig, KafkaConfigError, KafkaLogStream, default_topic};
