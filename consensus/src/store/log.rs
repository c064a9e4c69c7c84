//! The Raft log, vote and committed index: in memory for reads, in redb for durability.
//!
//! Appends return as soon as the entries are in memory (openraft requires them to be readable
//! by then) and are handed to one writer thread. The writer drains *everything* queued — the
//! appends of many concurrent proposals, votes, truncations — into one redb transaction and
//! one fsync, then tells openraft the entries are durable. That is group commit: under load
//! the number of fsyncs grows far slower than the number of entries.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, Vote};
use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::Db;
use tokio::sync::oneshot;

use openraft::{ErrorSubject, ErrorVerb};

use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig, decode, encode, storage_error};

/// Log entries by index, postcard-encoded.
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Small records: vote, committed, last purged, snapshot.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Counters for benchmarks and metrics: how well appends are batched.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Durable redb commits made by the writer (each one fsync).
    pub fsyncs: AtomicU64,
    /// Log entries made durable.
    pub entries: AtomicU64,
    /// Time spent in those durable commits (writes and fsync), in microseconds.
    pub commit_micros: AtomicU64,
}

/// What the writer thread does, in order.
enum Write {
    Append {
        entries: Vec<(u64, Vec<u8>)>,
        /// The newest committed index not yet on disk, riding along.
        committed: Option<Vec<u8>>,
        done: LogFlushed<TypeConfig>,
    },
    Meta {
        key: &'static str,
        value: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Truncate {
        from: u64,
        done: oneshot::Sender<Result<(), String>>,
    },
    Purge {
        upto: u64,
        record: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
}

struct Cache {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    /// `committed`, encoded, when it changed since it was last handed to the writer.
    committed_unsaved: Option<Vec<u8>>,
    last_purged: Option<LogId>,
}

/// The log store. Cheap to clone: clones share the cache and the writer (a clone is also the
/// log reader openraft asks for).
#[derive(Clone)]
pub struct LogStore {
    cache: Arc<Mutex<Cache>>,
    writer: mpsc::Sender<Write>,
    stats: Arc<LogStats>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens the log in `db`, loading what is there, and starts its writer thread. The thread
    /// ends when the last clone of the store is dropped.
    pub fn open(db: Arc<Db>) -> Result<Self, StorageError> {
        let cache = load(&db).map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(LogStats::default());
        let writer_stats = stats.clone();
        thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer(&db, &rx, &writer_stats))
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        Ok(Self {
            cache: Arc::new(Mutex::new(cache)),
            writer: tx,
            stats,
        })
    }

    /// Batching counters.
    pub fn stats(&self) -> Arc<LogStats> {
        self.stats.clone()
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // A poisoned lock means a panic while holding it; the cache is still consistent
        // because every mutation is a single map operation.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn send_and_wait(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Write,
    ) -> Result<(), std::io::Error> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(make(done))
            .map_err(|_| std::io::Error::other("the log writer has stopped"))?;
        wait.await
            .map_err(|_| std::io::Error::other("the log writer has stopped"))?
            .map_err(std::io::Error::other)
    }

    async fn save_meta(&self, key: &'static str, value: Vec<u8>) -> Result<(), std::io::Error> {
        self.send_and_wait(|done| Write::Meta { key, value, done })
            .await
    }
}

fn load(db: &Database) -> Result<Cache, std::io::Error> {
    let tx = db.begin_read().map_err(std::io::Error::other)?;
    let mut cache = Cache {
        entries: BTreeMap::new(),
        vote: None,
        committed: None,
        committed_unsaved: None,
        last_purged: None,
    };
    match tx.open_table(LOG) {
        Ok(log) => {
            for row in log.iter().map_err(std::io::Error::other)? {
                let (k, v) = row.map_err(std::io::Error::other)?;
                cache.entries.insert(k.value(), decode(v.value())?);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(std::io::Error::other(e)),
    }
    match tx.open_table(META) {
        Ok(meta) => {
            let get = |key: &str| -> Result<Option<Vec<u8>>, std::io::Error> {
                Ok(meta
                    .get(key)
                    .map_err(std::io::Error::other)?
                    .map(|v| v.value().to_vec()))
            };
            if let Some(v) = get(VOTE)? {
                cache.vote = Some(decode(&v)?);
            }
            if let Some(v) = get(COMMITTED)? {
                cache.committed = decode(&v)?;
            }
            if let Some(v) = get(LAST_PURGED)? {
                cache.last_purged = decode(&v)?;
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(std::io::Error::other(e)),
    }
    Ok(cache)
}

/// The writer loop: take one write, then everything else already queued, commit them in one
/// durable transaction, then acknowledge each.
fn writer(db: &Database, rx: &mpsc::Receiver<Write>, stats: &LogStats) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // Measuring real disk time is the point here; no simulated clock could stand in.
        #[allow(clippy::disallowed_methods)]
        let started = std::time::Instant::now();
        let result = commit(db, &batch);
        let took = started.elapsed().as_micros() as u64;
        let entries: u64 = batch
            .iter()
            .map(|w| match w {
                Write::Append { entries, .. } => entries.len() as u64,
                _ => 0,
            })
            .sum();
        if result.is_ok() {
            stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            stats.entries.fetch_add(entries, Ordering::Relaxed);
            stats.commit_micros.fetch_add(took, Ordering::Relaxed);
        }
        for w in batch {
            match w {
                Write::Append { done, .. } => done
                    .log_io_completed(result.clone().map_err(|e| std::io::Error::other(e.clone()))),
                Write::Meta { done, .. }
                | Write::Truncate { done, .. }
                | Write::Purge { done, .. } => {
                    let _ = done.send(result.clone());
                }
            }
        }
    }
}

fn commit(db: &Database, batch: &[Write]) -> Result<(), String> {
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate);
        {
            let mut log = tx.open_table(LOG)?;
            let mut meta = tx.open_table(META)?;
            for w in batch {
                match w {
                    Write::Append {
                        entries, committed, ..
                    } => {
                        for (index, bytes) in entries {
                            log.insert(*index, bytes.as_slice())?;
                        }
                        if let Some(c) = committed {
                            meta.insert(COMMITTED, c.as_slice())?;
                        }
                    }
                    Write::Meta { key, value, .. } => {
                        meta.insert(*key, value.as_slice())?;
                    }
                    Write::Truncate { from, .. } => {
                        log.retain_in(*from.., |_, _| false)?;
                    }
                    Write::Purge { upto, record, .. } => {
                        log.retain_in(..=*upto, |_, _| false)?;
                        meta.insert(LAST_PURGED, record.as_slice())?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    };
    run().map_err(|e| e.to_string())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        Ok(self
            .cache()
            .entries
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let c = self.cache();
        let last = c
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(c.last_purged);
        Ok(LogState {
            last_purged_log_id: c.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes =
            encode(vote).map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, &e))?;
        self.save_meta(VOTE, bytes)
            .await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, &e))?;
        self.cache().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.cache().vote)
    }

    /// Persisting `committed` lets a restarted node re-apply every committed entry to its
    /// in-memory state machine at once, even as the only member (openraft issue #1246). It
    /// rides along with the next append instead of costing an fsync of its own: losing the
    /// newest committed index in a crash only means re-learning it from the leader (a lone
    /// member re-commits everything when it becomes leader again).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = encode(&committed)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        let mut c = self.cache();
        c.committed = committed;
        c.committed_unsaved = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.cache().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        let committed;
        {
            let mut c = self.cache();
            committed = c.committed_unsaved.take();
            for entry in entries {
                let bytes = encode(&entry).map_err(|e| {
                    storage_error(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, &e)
                })?;
                encoded.push((entry.log_id.index, bytes));
                c.entries.insert(entry.log_id.index, entry);
            }
        }
        self.writer
            .send(Write::Append {
                entries: encoded,
                committed,
                done: callback,
            })
            .map_err(|_| storage_error(ErrorSubject::Logs, ErrorVerb::Write, "log writer stopped"))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().entries.split_off(&log_id.index);
        self.send_and_wait(|done| Write::Truncate {
            from: log_id.index,
            done,
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let record = encode(&Some(log_id))
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        {
            let mut c = self.cache();
            let keep = c.entries.split_off(&(log_id.index + 1));
            c.entries = keep;
            c.last_purged = Some(log_id);
        }
        self.send_and_wait(|done| Write::Purge {
            upto: log_id.index,
            record,
            done,
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
    }
}
