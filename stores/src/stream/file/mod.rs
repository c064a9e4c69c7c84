//! [`FileLogStream`]: the log stream as one append-only file, for `flotilla dev`.
//!
//! Layout of the directory:
//! - `stream.log`: the records, in publish order (the one partition, `0`).
//! - `groups/{group}.json`: a consumer group's position, `{"v":1,"next":<byte>}`, written
//!   whole (temporary file, `fsync`, rename, directory `fsync`) at every commit.
//! - `.tmp/`: those temporary files.
//!
//! Format of `stream.log`, version 1 ([`FILE_FORMAT_VERSION`]): the 8-byte magic `FLTLOGS1`,
//! then records, each `len: u32 LE | crc32: u32 LE | body`, where `body` is `len` bytes, a kind
//! byte then the payload, and the CRC-32 (IEEE) covers the length field and the body:
//!
//! | kind | payload |
//! |---|---|
//! | 1 batch | the byte length `u64 LE` and the count `u32 LE` of the records that follow and belong to it |
//! | 2 record | a [`Shipped`] as JSON (the same bytes as a Kafka message's value) |
//!
//! Every write appends one batch (a batch header, then the records of every `publish` waiting
//! at that moment: group commit) and is followed by one `fdatasync`; `publish` returns once its
//! batch is synced, and consumers read only synced batches. A [`StreamPosition`] is
//! `{partition: 0, offset: <byte position of the record's length field>}`: byte positions need
//! no index in memory, and they order records as the file does (they are not consecutive).
//!
//! Opening reads the file back batch by batch. A crash can only tear the last batch (nothing
//! is written after a batch until it is synced), and that batch was never acknowledged: if
//! the first batch that is not whole and intact has no intact batch after it, it is the torn
//! tail, and the file is cut back to where it starts before anything new is written. If an
//! intact batch follows it, synced data was damaged, and opening fails with
//! [`StoreError::Corrupt`] naming the file and the damaged record rather than dropping
//! acknowledged records (the Raft WAL's rule, `consensus/src/store/wal.rs`). Damage to the last
//! batch after it was synced looks like a torn write and is dropped as one: a checksum can
//! tell damage, not when it happened. A record damaged after opening makes `poll` fail with
//! [`StoreError::Corrupt`] at it, never skip it.
//!
//! Consumer groups: a group's consumer starts at its committed position (or at the start
//! of the file: `earliest`). With one partition there is nothing to share between two
//! consumers of a group, so a group has at most one consumer at a time in the process: a
//! second `subscribe` while the first lives is [`StoreError::Invalid`]. Only one process may
//! have the directory open (an advisory lock on `stream.log`).
//!
//! The file only grows: `flotilla dev` keeps what it streamed. Deleting the directory
//! while nothing runs starts afresh.

mod consumer;
mod format;
mod writer;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{LogStream, LogStreamConsumer, Shipped, StoreError, StreamPosition};
use tokio::sync::{oneshot, watch};

use crate::atomic;
use format::{Batch, Reader};
use writer::{Append, Writer};

/// The version of the stream file's format written now.
pub const FILE_FORMAT_VERSION: u32 = 1;

/// The largest record (a [`Shipped`] as JSON) the file stream takes; `publish` refuses a
/// larger one with [`StoreError::Invalid`].
pub const MAX_RECORD_BYTES: usize = format::MAX_BODY - 1;

const STREAM_FILE: &str = "stream.log";
const GROUPS_DIR: &str = "groups";
const TMP_DIR: &str = ".tmp";

/// The log stream as an append-only file in a directory (see [the module](self)).
#[derive(Debug)]
pub struct FileLogStream {
    shared: Arc<Shared>,
    writer: Writer,
}

/// What the stream and its consumers share.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    path: PathBuf,
    /// For reading: positioned reads from several threads at once.
    file: File,
    /// The end of what is synced.
    durable: watch::Receiver<u64>,
    /// Groups with a live consumer.
    live_groups: Mutex<HashSet<String>>,
}

impl FileLogStream {
    /// Opens the stream in `dir` (created if missing), reading the file back: a torn tail
    /// is cut off; damage before intact records is [`StoreError::Corrupt`], and the file is
    /// left as it was. Blocking file I/O: call it at start-up, or on a blocking thread.
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileLogStream, StoreError> {
        let dir = dir.into();
        let path = dir.join(STREAM_FILE);
        let io = |what: &str, e: std::io::Error| {
            StoreError::Unavailable(format!("{what} {}: {e}", path.display()))
        };
        fs::create_dir_all(dir.join(GROUPS_DIR)).map_err(|e| io("creating the directory of", e))?;
        let fresh = match fs::metadata(&path) {
            Ok(meta) => meta.len() == 0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(io("reading", e)),
        };
        if fresh {
            atomic::write_file(&dir.join(TMP_DIR), &path, format::MAGIC)
                .map_err(|e| io("creating", e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Unavailable(format!(
                    "{} is in use by another Flotilla process (or another FileLogStream)",
                    path.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(io("locking", e)),
        }
        let end = recover(&file, &path)?;
        let reader = File::open(&path).map_err(|e| io("opening", e))?;
        let (durable_tx, durable) = watch::channel(end);
        let writer = Writer::start(file, path.clone(), end, durable_tx)
            .map_err(|e| io("starting the writer of", e))?;
        Ok(FileLogStream {
            shared: Arc::new(Shared {
                dir,
                path,
                file: reader,
                durable,
                live_groups: Mutex::new(HashSet::new()),
            }),
            writer,
        })
    }

    /// The stream file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

/// Reads the file back and cuts off a torn tail; returns where the next batch goes.
fn recover(file: &File, path: &Path) -> Result<u64, StoreError> {
    let io =
        |e: std::io::Error| StoreError::Unavailable(format!("reading {}: {e}", path.display()));
    let len = file.metadata().map_err(io)?.len();
    let mut reader = Reader::new(file);
    let mut magic = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut magic, 0).map_err(|e| {
        StoreError::Corrupt(format!("{}: no stream file header ({e})", path.display()))
    })?;
    if &magic != format::MAGIC {
        return Err(StoreError::Corrupt(format!(
            "{} is not a Flotilla log stream file (version {FILE_FORMAT_VERSION}): its first bytes \
             are not {:?}",
            path.display(),
            String::from_utf8_lossy(format::MAGIC)
        )));
    }
    let mut at = format::START;
    loop {
        match reader.batch(at, len).map_err(io)? {
            Batch::End => return Ok(at),
            Batch::Intact { next } => at = next,
            Batch::Damaged { batch, record, why } => {
                if let Some(later) = reader.find_intact_batch(batch + 1, len).map_err(io)? {
                    return Err(StoreError::Corrupt(format!(
                        "{}: the record at byte {record} is damaged ({why}), yet an intact batch \
                         of records follows at byte {later}: the disk damaged records that had \
                         been synced (a crash only ever tears the last batch). Refusing to drop \
                         acknowledged records. To start again, stop Flotilla and move the file \
                         and the `groups` directory beside it aside: the log lines in it that \
                         were not archived yet are lost, so the logs of the jobs that ran then \
                         stay incomplete",
                        path.display()
                    )));
                }
                tracing::warn!(
                    file = %path.display(),
                    at = batch,
                    bytes = len - batch,
                    reason = %why,
                    "Dropping the torn tail of the log stream file (a write a crash cut short)."
                );
                file.set_len(batch).map_err(io)?;
                file.sync_all().map_err(io)?;
                return Ok(batch);
            }
        }
    }
}

impl LogStream for FileLogStream {
    fn name(&self) -> &'static str {
        "file"
    }

    fn publish<'a>(&'a self, records: &'a [Shipped]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let mut bytes = Vec::new();
            for record in records {
                format::push_shipped(&mut bytes, record)?;
            }
            let count = u32::try_from(records.len())
                .map_err(|_| StoreError::Invalid("too many records in one publish".into()))?;
            let (done, synced) = oneshot::channel();
            self.writer.append(Append { bytes, count, done })?;
            synced.await.map_err(|_| {
                StoreError::Unavailable("the log stream writer stopped before syncing".into())
            })?
        })
    }

    fn subscribe(&self, group: &str) -> Result<Box<dyn LogStreamConsumer>, StoreError> {
        consumer::subscribe(&self.shared, group)
    }
}

impl Shared {
    fn group_path(&self, group: &str) -> PathBuf {
        self.dir.join(GROUPS_DIR).join(format!("{group}.json"))
    }

    fn live_groups(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.live_groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The position of the record at `offset` in the one partition.
fn position(offset: u64) -> StreamPosition {
    StreamPosition {
        partition: 0,
        offset,
    }
}
