//! The Raft log, vote and committed index: in memory for reads, in the log file
//! ([`super::wal`]) for durability.
//!
//! Appends return as soon as the entries are in memory (openraft requires them to be readable
//! by then) and are handed to one writer thread. The writer drains *everything* queued — the
//! appends of many concurrent proposals, votes, truncations — into one write and one
//! `fdatasync`, then tells openraft the entries are durable. That is group commit: under load
//! the number of fsyncs grows far slower than the number of entries.
//!
//! Logs written by earlier versions live in the replica's redb file; the first start of this
//! version moves them into the log file and clears them from redb ([`LogStore::open`]).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, Vote};
use redb::{Database, Durability, TableDefinition};

use super::Db;
use super::wal::{Contents, Wal};
use crate::early::EarlyHook;
use tokio::sync::oneshot;

use openraft::{ErrorSubject, ErrorVerb};

use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig, decode, encode, storage_error};

/// Log entries by index, postcard-encoded: where versions before the log file kept them.
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Small records, in versions before the log and snapshot files: vote, committed, last
/// purged, snapshot.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Counters for benchmarks and metrics: how well appends are batched.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Durable writes made by the writer (each one `fdatasync`).
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
    Vote {
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
    early: EarlyHook,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens the log in `dir` (moving it out of the replica's redb file `db` the first time,
    /// see the module docs), loading what is there, and starts its writer thread. The thread
    /// ends when the last clone of the store is dropped.
    pub fn open(dir: &Path, db: Arc<Db>) -> Result<Self, StorageError> {
        let read_error = |e: std::io::Error| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e);
        let (wal, contents) = if Wal::exists(dir) {
            Wal::open(dir).map_err(read_error)?
        } else {
            let contents = legacy_contents(&db).map_err(read_error)?;
            (Wal::create(dir, &contents).map_err(read_error)?, contents)
        };
        // Also after a crash between moving the log and clearing the old copy.
        clear_legacy(&db).map_err(read_error)?;
        let cache = cache_of(contents).map_err(read_error)?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(LogStats::default());
        let writer_stats = stats.clone();
        // The thread holds the database until it ends, so [`super::Stores::closed`] (which
        // fires when the database closes) also means no write of this log is still under way:
        // a replica restarted in the same process never opens the file under a live writer.
        thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || {
                writer(wal, &rx, &writer_stats);
                drop(db);
            })
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        Ok(Self {
            cache: Arc::new(Mutex::new(cache)),
            writer: tx,
            stats,
            early: EarlyHook::default(),
        })
    }

    /// Turns this replica's saved vote, if it is its own committed vote as the leader, into an
    /// uncommitted one, durably; call before openraft starts on the log.
    ///
    /// openraft 0.9 restores such a replica as the leader of the *same* term (its engine's
    /// `startup`). With early replication that is unsafe: followers may hold entries the
    /// leader sent before its own sync and then lost in a crash, and a leader re-leading the
    /// same term would append different entries under the very same log ids, which the
    /// followers would take for the ones they have. Stepping down makes the replica campaign
    /// in a new term, whose log ids nobody holds.
    pub(crate) async fn step_down_if_leader(&self, me: NodeId) -> Result<(), StorageError> {
        let vote = self.cache().vote;
        if let Some(vote) = vote
            && vote.is_committed()
            && vote.leader_id().node_id == me
        {
            let mut log = self.clone();
            log.save_vote(&Vote::new(vote.leader_id().term, me)).await?;
            tracing::info!(
                node = me,
                term = vote.leader_id().term,
                "Restarting as a follower rather than the leader it was; it campaigns in a new term."
            );
        }
        Ok(())
    }

    /// Where the leader's own appends are offered for early replication ([`crate::early`]).
    pub(crate) fn early_hook(&self) -> EarlyHook {
        self.early.clone()
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
}

/// Decodes what the log file holds.
fn cache_of(contents: Contents) -> Result<Cache, std::io::Error> {
    let mut entries = BTreeMap::new();
    for (index, bytes) in &contents.entries {
        entries.insert(*index, decode(bytes)?);
    }
    Ok(Cache {
        entries,
        vote: contents.vote.as_deref().map(decode).transpose()?,
        committed: contents
            .committed
            .as_deref()
            .map(decode)
            .transpose()?
            .flatten(),
        committed_unsaved: None,
        last_purged: contents
            .purged
            .as_ref()
            .map(|(_, id)| decode(id))
            .transpose()?
            .flatten(),
    })
}

/// The log as versions before the log file kept it in redb (empty for a new replica).
fn legacy_contents(db: &Database) -> Result<Contents, std::io::Error> {
    use redb::ReadableTable;
    let tx = db.begin_read().map_err(std::io::Error::other)?;
    let mut contents = Contents::default();
    match tx.open_table(LOG) {
        Ok(log) => {
            for row in log.iter().map_err(std::io::Error::other)? {
                let (k, v) = row.map_err(std::io::Error::other)?;
                contents.entries.insert(k.value(), v.value().to_vec());
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
            contents.vote = get(VOTE)?;
            contents.committed = get(COMMITTED)?;
            if let Some(id) = get(LAST_PURGED)? {
                let purged: Option<LogId> = decode(&id)?;
                if let Some(p) = purged {
                    contents.purged = Some((p.index, id));
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(std::io::Error::other(e)),
    }
    Ok(contents)
}

/// Removes the redb copy of the log once the log file holds it (a no-op when there is none).
fn clear_legacy(db: &Database) -> Result<(), std::io::Error> {
    let present = {
        let tx = db.begin_read().map_err(std::io::Error::other)?;
        match tx.open_table(LOG) {
            Ok(_) => true,
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(std::io::Error::other(e)),
        }
    };
    if !present {
        return Ok(());
    }
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate);
        tx.delete_table(LOG)?;
        {
            let mut meta = tx.open_table(META)?;
            for key in [VOTE, COMMITTED, LAST_PURGED] {
                meta.remove(key)?;
            }
        }
        tx.commit()?;
        Ok(())
    };
    run().map_err(|e| std::io::Error::other(e.to_string()))
}

/// The writer loop: take one write, then everything else already queued, make them durable
/// with one `fdatasync`, then acknowledge each.
fn writer(mut wal: Wal, rx: &mpsc::Receiver<Write>, stats: &LogStats) {
    // After a failed write or sync the file's state is unknown (a later sync could make it
    // look as if the lost pages were never written): every write after it fails too, and
    // openraft, which stops on the first storage error, restarts from what is on disk.
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // Measuring real disk time is the point here; no simulated clock could stand in.
        #[allow(clippy::disallowed_methods)]
        let started = std::time::Instant::now();
        let result = match &failed {
            Some(e) => Err(format!(
                "the log stopped writing after an earlier failure: {e}"
            )),
            None => commit(&mut wal, &batch).map_err(|e| e.to_string()),
        };
        if let (None, Err(e)) = (&failed, &result) {
            tracing::error!(error = %e, "Writing the Raft log failed; no further writes are accepted.");
            failed = Some(e.clone());
        }
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
                Write::Append { done, .. } => {
                    done.log_io_completed(result.clone().map_err(std::io::Error::other));
                }
                Write::Vote { done, .. }
                | Write::Truncate { done, .. }
                | Write::Purge { done, .. } => {
                    let _ = done.send(result.clone());
                }
            }
        }
    }
}

fn commit(wal: &mut Wal, batch: &[Write]) -> Result<(), std::io::Error> {
    for w in batch {
        match w {
            Write::Append {
                entries, committed, ..
            } => {
                for (index, bytes) in entries {
                    wal.push_entry(*index, bytes);
                }
                if let Some(c) = committed {
                    wal.push_committed(c);
                }
            }
            Write::Vote { value, .. } => wal.push_vote(value),
            Write::Truncate { from, .. } => wal.push_truncate(*from),
            Write::Purge { upto, record, .. } => wal.push_purge(*upto, record),
        }
    }
    // Only a purge makes records dead, and checking walks every live entry: not per append.
    let purged = batch.iter().any(|w| matches!(w, Write::Purge { .. }));
    if purged && wal.wasteful() {
        wal.compact()?;
    }
    wal.sync()
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
        self.send_and_wait(|done| Write::Vote { value: bytes, done })
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        let (committed, vote, prev);
        {
            let mut c = self.cache();
            committed = c.committed_unsaved.take();
            vote = c.vote;
            // The id of the entry before these (`Some(None)`: they start the log; `None`:
            // unknown here, so they are not offered early).
            prev = match entries.first().map(|e| e.log_id.index) {
                Some(0) => Some(None),
                Some(first) => c
                    .entries
                    .get(&(first - 1))
                    .map(|e| e.log_id)
                    .or(c.last_purged.filter(|p| p.index == first - 1))
                    .map(Some),
                None => None,
            };
            for entry in &entries {
                let bytes = encode(entry).map_err(|e| {
                    storage_error(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, &e)
                })?;
                encoded.push((entry.log_id.index, bytes));
                c.entries.insert(entry.log_id.index, entry.clone());
            }
        }
        self.writer
            .send(Write::Append {
                entries: encoded,
                committed,
                done: callback,
            })
            .map_err(|_| {
                storage_error(ErrorSubject::Logs, ErrorVerb::Write, "log writer stopped")
            })?;
        // Offered after the hand-off, so the followers' syncs run alongside this one. (openraft
        // 0.9 appends on the leader one batch at a time, waiting for each to be durable, so
        // there is never an earlier append of ours still syncing to skip the offer for.)
        if let Some(prev) = prev {
            self.early.offer(vote.as_ref(), prev, &entries);
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::store::open_db;
    use crate::types::Request;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), index),
            payload: EntryPayload::Normal(Request(bytes::Bytes::from(format!("command {index}")))),
        }
    }

    #[tokio::test]
    async fn a_leader_restarting_steps_down_to_an_uncommitted_vote_and_others_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _closed) = open_db(dir.path()).unwrap();
        let mut log = LogStore::open(dir.path(), db.clone()).unwrap();
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        // Replica 2 voted for leader 1: nothing to step down from.
        log.step_down_if_leader(2).await.unwrap();
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(3, 1))
        );
        // Replica 1 was the leader: it steps down, durably.
        log.step_down_if_leader(1).await.unwrap();
        drop(log);
        let mut log = LogStore::open(dir.path(), db).unwrap();
        let vote = log.read_vote().await.unwrap().unwrap();
        assert_eq!(vote, Vote::new(3, 1));
        assert!(!vote.is_committed());
    }

    /// A replica upgraded from a version that kept its log in redb keeps every entry, its
    /// vote, committed index and purge point, and the redb copy is gone afterwards.
    #[tokio::test]
    async fn a_log_kept_in_redb_by_an_earlier_version_moves_into_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new_committed(3, 1);
        let committed = Some(entry(7).log_id);
        let purged = Some(entry(4).log_id);
        {
            let (db, _closed) = open_db(dir.path()).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut log = tx.open_table(LOG).unwrap();
                for i in 5..=9 {
                    log.insert(i, encode(&entry(i)).unwrap().as_slice())
                        .unwrap();
                }
                let mut meta = tx.open_table(META).unwrap();
                meta.insert(VOTE, encode(&vote).unwrap().as_slice())
                    .unwrap();
                meta.insert(COMMITTED, encode(&committed).unwrap().as_slice())
                    .unwrap();
                meta.insert(LAST_PURGED, encode(&purged).unwrap().as_slice())
                    .unwrap();
            }
            tx.commit().unwrap();
        }

        let (db, _closed) = open_db(dir.path()).unwrap();
        let mut log = LogStore::open(dir.path(), db.clone()).unwrap();
        let read = |log: &mut LogStore| {
            let mut log = log.clone();
            async move {
                let entries = log.try_get_log_entries(0..100).await.unwrap();
                let state = log.get_log_state().await.unwrap();
                (
                    entries,
                    log.read_vote().await.unwrap(),
                    log.read_committed().await.unwrap(),
                    state.last_purged_log_id,
                )
            }
        };
        let expected = (
            (5..=9).map(entry).collect::<Vec<_>>(),
            Some(vote),
            committed,
            purged,
        );
        assert_eq!(read(&mut log).await, expected);
        assert!(Wal::exists(dir.path()));
        {
            let tx = db.begin_read().unwrap();
            assert!(matches!(
                tx.open_table(LOG),
                Err(redb::TableError::TableDoesNotExist(_))
            ));
            let meta = tx.open_table(META).unwrap();
            assert!(meta.get(VOTE).unwrap().is_none());
        }
        drop(log);

        // And a restart reads it from the log file.
        let mut log = LogStore::open(dir.path(), db).unwrap();
        assert_eq!(read(&mut log).await, expected);
    }
}
