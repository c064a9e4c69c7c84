//! The `LogStore` and `ArtifactStore` ports (ARCHITECTURE §8 Logs, Artifacts): where an
//! attempt's log lines and artifacts are kept for good. Production adapters keep them in S3,
//! embedded ones (for `flotilla dev`) in a directory; both pass one conformance suite (in the
//! `flotilla-stores` crate).
//!
//! Layout, the same in every adapter (object keys, or paths below the embedded root):
//! - `logs/{project}/{build}/{job}/{attempt}/chunk-{first_seq:020}.zst`: consecutive lines,
//!   written every few seconds while the job runs. A chunk is named by its first line's
//!   sequence number, so a chunk written again after a crash (the same lines, perhaps more)
//!   replaces the first, and readers drop repeated sequence numbers: nothing is lost or read
//!   twice.
//! - `logs/…/manifest.json`: written once the attempt's log is complete.
//! - `artifacts/{project}/{build}/{job}/{attempt}/{path}`: one object per artifact, visible
//!   only once wholly written, with its SHA-256 kept beside it.
//!
//! Everything here is plain data and traits: no I/O, no runtime. The futures are driven by
//! whatever runtime the adapter needs.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, BuildId, Fence, JobId, ProjectId};
use crate::repo::BoxFuture;
use crate::runner::Stream;

/// The version of [`LogManifest`] and of the chunk encoding written now.
pub const LOG_FORMAT_VERSION: u32 = 1;

/// Which attempt a log or an artifact belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttemptKey {
    /// The project (the tenant every read is checked against).
    pub project: ProjectId,
    /// The build.
    pub build: BuildId,
    /// The job.
    pub job: JobId,
    /// The attempt.
    pub attempt: Attempt,
}

impl AttemptKey {
    /// `logs/{project}/{build}/{job}/{attempt}/`.
    pub fn log_prefix(&self) -> String {
        format!("logs/{}", self.suffix())
    }

    /// `artifacts/{project}/{build}/{job}/{attempt}/`.
    pub fn artifact_prefix(&self) -> String {
        format!("artifacts/{}", self.suffix())
    }

    fn suffix(&self) -> String {
        format!(
            "{}/{}/{}/{}/",
            self.project, self.build, self.job, self.attempt
        )
    }
}

/// One line of an attempt's log, as the runner wrapper numbered it (secrets already masked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Position in the attempt's log, from 0, without gaps (the wrapper counts).
    pub seq: u64,
    /// When it was read (ms since the Unix epoch).
    pub ts: u64,
    /// Which stream.
    pub stream: Stream,
    /// The step that wrote it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// The text, without its line end.
    pub text: String,
}

/// Consecutive lines of one attempt, stored as one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The lines, by ascending `seq` (not necessarily starting where the last chunk ended:
    /// a chunk written again may overlap one before it).
    pub lines: Vec<LogLine>,
}

impl LogChunk {
    /// The first line's sequence number (the chunk's name), `None` for an empty chunk.
    pub fn first_seq(&self) -> Option<u64> {
        self.lines.first().map(|l| l.seq)
    }
}

/// A stored chunk, as listed in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Its first line's sequence number.
    pub first_seq: u64,
    /// Its last line's.
    pub last_seq: u64,
    /// Its size as stored (compressed).
    pub bytes: u64,
}

/// What is known of a complete log, written when the attempt ended and every line is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogManifest {
    /// [`LOG_FORMAT_VERSION`].
    pub v: u32,
    /// The fence the attempt ran under.
    pub fence: Fence,
    /// Lines in the log.
    pub lines: u64,
    /// The last line's sequence number (`None` for an empty log): the log holds every line
    /// from 0 to here, each once.
    pub last_seq: Option<u64>,
    /// Hex SHA-256 of the log as `text/plain` serves it ([`plain_text_line`] of every line
    /// in order), so a download can be checked.
    pub sha256: String,
    /// The chunks that hold it, in order, as far as the writer of the manifest knows them:
    /// informational (readers list the stored chunks themselves), and possibly short of
    /// chunks an earlier aggregator wrote before a restart.
    pub chunks: Vec<ChunkRef>,
}

/// A line as the plain-text log shows it: the text and a newline (stream and step are in
/// the JSON and SSE forms).
pub fn plain_text_line(line: &LogLine) -> String {
    let mut s = String::with_capacity(line.text.len() + 1);
    s.push_str(&line.text);
    s.push('\n');
    s
}

/// A stored artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredArtifact {
    /// Its path in the workspace it came from, `/`-separated and relative (`target/app`).
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Hex SHA-256 of its contents.
    pub sha256: String,
}

/// A readable stream of bytes (an artifact being downloaded).
pub trait ByteSource: Send {
    /// The next piece; `None` at the end.
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>>;
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist (a miss, not a fault).
    #[error("not found: {0}")]
    NotFound(String),
    /// The bytes are not what they should be: a checksum mismatch, a truncated or
    /// undecodable chunk, a file that changed while it was uploaded.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The request cannot be right: a path that escapes its prefix, an empty chunk.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store could not be reached or failed; trying again may help.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) => "not_found",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Invalid(_) => "invalid",
            StoreError::Unavailable(_) => "unavailable",
        }
    }
}

/// Lines read from a log, and whether that is the end of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogRead {
    /// Lines after the asked-for sequence number, ascending, each once.
    pub lines: Vec<LogLine>,
    /// True when the manifest exists and the last line returned is its last: nothing more
    /// will come.
    pub complete: bool,
}

/// Where attempts' logs are archived.
pub trait LogStore: Send + Sync + fmt::Debug + 'static {
    /// The adapter's name (`s3`, `dir`), for logs and metrics.
    fn name(&self) -> &'static str;

    /// Stores `chunk` under its first line's sequence number. Writing a chunk with the same
    /// first line again replaces it (an aggregator restarted after a crash writes it again,
    /// perhaps with more lines). Empty chunks are refused.
    fn put_chunk<'a>(
        &'a self,
        key: &'a AttemptKey,
        chunk: &'a LogChunk,
    ) -> BoxFuture<'a, Result<ChunkRef, StoreError>>;

    /// Records that the log is complete. Written last, after every chunk.
    fn finish<'a>(
        &'a self,
        key: &'a AttemptKey,
        manifest: &'a LogManifest,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The manifest, once the log is complete.
    fn manifest<'a>(
        &'a self,
        key: &'a AttemptKey,
    ) -> BoxFuture<'a, Result<Option<LogManifest>, StoreError>>;

    /// Up to `limit` lines with sequence numbers above `after` (from the start with `None`),
    /// in order, each once. A corrupt chunk is an error naming it, never lines skipped in
    /// silence. Following a live log is calling this again with the last `seq` read until
    /// `complete`.
    fn read<'a>(
        &'a self,
        key: &'a AttemptKey,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'a, Result<LogRead, StoreError>>;
}

/// Where artifacts are kept.
pub trait ArtifactStore: Send + Sync + fmt::Debug + 'static {
    /// The adapter's name (`s3`, `dir`), for logs and metrics.
    fn name(&self) -> &'static str;

    /// Stores the file at `file` as artifact `path` of the attempt, with bounded memory
    /// whatever its size (multipart uploads of 16 MiB parts in S3). The SHA-256 of what was
    /// stored must equal `sha256` (the uploader's, taken before): otherwise nothing is kept
    /// and the error is [`StoreError::Corrupt`]. Visible to `list` and `get` only once
    /// complete. `path` is relative and `/`-separated; one that could escape the prefix
    /// (`..`, absolute, empty) is refused.
    fn put_file<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
        file: &'a Path,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<StoredArtifact, StoreError>>;

    /// The attempt's artifacts, by path.
    fn list<'a>(
        &'a self,
        key: &'a AttemptKey,
    ) -> BoxFuture<'a, Result<Vec<StoredArtifact>, StoreError>>;

    /// Writes artifact `path` to `dest` (through a temporary file renamed into place) and
    /// checks its SHA-256 against the stored one; returns its size.
    fn get_file<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// A URL that downloads artifact `path` (and nothing else) for `valid_for`, or `None`
    /// when the store has no such URLs (the embedded store: stream it with
    /// [`ArtifactStore::open`]).
    fn presign_get<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
        valid_for: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>>;

    /// Artifact `path`'s bytes, as a stream.
    fn open<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn ByteSource>, StoreError>>;

    /// Deletes every artifact of the attempt (expiry).
    fn delete_attempt<'a>(&'a self, key: &'a AttemptKey) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// What travels on the log stream from the runners to the aggregator (Kafka in production,
/// keyed by job; an append-only file in `flotilla dev`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Shipped {
    /// A line of an attempt's log.
    Line {
        /// Whose.
        key: AttemptKey,
        /// The fence the attempt runs under: a line under a stale fence is dropped.
        fence: Fence,
        /// The line, numbered.
        line: LogLine,
    },
    /// The attempt's log is over: nothing after `last_seq` will come.
    End {
        /// Whose.
        key: AttemptKey,
        /// The fence.
        fence: Fence,
        /// The last line's sequence number; `None` for an attempt that printed nothing.
        last_seq: Option<u64>,
    },
}

impl Shipped {
    /// The attempt it belongs to.
    pub fn key(&self) -> &AttemptKey {
        match self {
            Shipped::Line { key, .. } | Shipped::End { key, .. } => key,
        }
    }

    /// The fence it was sent under.
    pub fn fence(&self) -> Fence {
        match self {
            Shipped::Line { fence, .. } | Shipped::End { fence, .. } => *fence,
        }
    }
}

/// Where a consumer is in a stream: a partition and the offset of a record in it. Offsets
/// are ordered within a partition but opaque: not necessarily consecutive (the file adapter
/// uses byte positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamPosition {
    /// The partition (records of one job always go to the same one, in order).
    pub partition: u32,
    /// The record's offset in it.
    pub offset: u64,
}

/// The log stream in flight (ARCHITECTURE §3): durable, ordered per job, at least once.
pub trait LogStream: Send + Sync + fmt::Debug + 'static {
    /// The adapter's name (`kafka`, `file`), for logs and metrics.
    fn name(&self) -> &'static str;

    /// Appends `records`; `Ok` only once every one is durable (Kafka: an idempotent producer
    /// with `acks=all`). Records of one job stay in the order given, also across calls made
    /// one after another.
    fn publish<'a>(&'a self, records: &'a [Shipped]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Joins consumer group `group`: between them, the group's consumers see every record;
    /// a new consumer starts after what the group committed.
    fn subscribe(&self, group: &str) -> Result<Box<dyn LogStreamConsumer>, StoreError>;
}

/// One consumer of a [`LogStream`] group.
pub trait LogStreamConsumer: Send {
    /// Up to `max` records after those already returned (each with its position), waiting
    /// at most `wait` for the first and then taking only what is already at hand. Records of
    /// one job come in the order published. Dropping a consumer may block briefly (Kafka
    /// leaves the group).
    fn poll(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<(StreamPosition, Shipped)>, StoreError>>;

    /// Everything up to and including each of `done` (positions this consumer's `poll`
    /// returned, per partition) is handled: a consumer
    /// of the group that starts later begins after it. Called only once what those records
    /// carried is stored for good, so a crash before it redelivers, never loses.
    fn commit<'a>(
        &'a mut self,
        done: &'a [StreamPosition],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Checks an artifact path: relative, `/`-separated, no `.`/`..`/empty components, no
/// backslashes or NULs, at most 1,024 bytes. Returns it unchanged when it is safe to put
/// under a prefix.
pub fn check_artifact_path(path: &str) -> Result<&str, StoreError> {
    let bad = |why: &str| {
        Err(StoreError::Invalid(format!(
            "artifact path `{path}`: {why}"
        )))
    };
    if path.is_empty() || path.len() > 1024 {
        return bad("must be 1 to 1024 bytes");
    }
    if path.starts_with('/') {
        return bad("must be relative to the workspace");
    }
    if path.contains('\\') || path.contains('\0') {
        return bad("must not contain backslashes or NUL");
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("must not have empty, `.` or `..` components");
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AttemptKey {
        AttemptKey {
            project: ProjectId::new("acme-web").expect("valid"),
            build: BuildId(7),
            job: JobId(42),
            attempt: Attempt::new(2).expect("valid"),
        }
    }

    #[test]
    fn logs_and_artifacts_live_under_the_attempts_prefix() {
        assert_eq!(key().log_prefix(), "logs/acme-web/7/42/2/");
        assert_eq!(key().artifact_prefix(), "artifacts/acme-web/7/42/2/");
    }

    #[test]
    fn artifact_paths_that_could_escape_their_prefix_are_refused() {
        for ok in ["a", "target/debug/app", "dist/app-1.0.tar.gz", "a/.hidden"] {
            assert_eq!(check_artifact_path(ok), Ok(ok));
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\\b",
            "a\0b",
            "a/",
        ] {
            assert!(
                matches!(check_artifact_path(bad), Err(StoreError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(check_artifact_path(&"a".repeat(1025)).is_err());
    }

    #[test]
    fn a_line_reads_back_from_its_json_and_shows_as_text_and_newline() {
        let line = LogLine {
            seq: 3,
            ts: 10,
            stream: Stream::Stderr,
            step: Some(1),
            text: "warning: x".into(),
        };
        let json = serde_json::to_string(&line).expect("json");
        assert_eq!(serde_json::from_str::<LogLine>(&json).expect("back"), line);
        assert_eq!(plain_text_line(&line), "warning: x\n");
        assert_eq!(StoreError::Unavailable("x".into()).kind(), "unavailable");
        assert!(StoreError::Unavailable("x".into()).is_retryable());
        assert!(!StoreError::Corrupt("x".into()).is_retryable());
    }
}
