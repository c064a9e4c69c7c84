//! The read path both log adapters share: which chunks a `read(after, limit)` needs, fetching
//! and decoding them, merging their lines and dropping repeated ones.
//!
//! Why a cache: a chunk is named by its first line only, so whether an earlier chunk still
//! holds lines past `after` is unknown without reading it. Skipping a chunk because its
//! successor starts at or before `after + 1` is NOT safe: a chunk written again after a crash
//! may hold more lines than before and reach past the chunks that follow it (`chunk-0` now
//! holds 0..=25 while `chunk-11` holds 11..=20: lines 21..=25 are only in `chunk-0`). So each
//! store remembers the last line of every chunk it decoded, keyed by the chunk's name and a
//! fingerprint of the stored object (size, modification time, ETag, …): a chunk whose
//! remembered last line is below the wanted range, and whose object has not changed since,
//! is not fetched again. Following a live log then fetches only the new or rewritten chunks
//! and the one holding the next line. The cache is bounded (cleared when full), so a cold
//! store merely reads a log's earlier chunks once.
//!
//! Lines are returned only as an unbroken run from `after + 1`: lines past a gap wait until
//! the missing chunk is written (chunks may be put out of order), because a follower that
//! jumped the gap would never see the lines in it. Once the manifest exists the log must
//! hold every line up to its last: a gap then is [`StoreError::Corrupt`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;

use flotilla_core::store::{AttemptKey, LogLine, LogManifest, LogRead, StoreError};

use crate::chunk;

/// Entries the extent cache holds before it is cleared (about 100 bytes each).
const EXTENT_CACHE_ENTRIES: usize = 65_536;

/// A chunk object as a listing shows it.
#[derive(Debug, Clone)]
pub(crate) struct ListedChunk {
    /// Its layout key (`logs/…/chunk-….zst`): the name in errors and in the cache.
    pub(crate) key: String,
    /// The first line's sequence number, from the name.
    pub(crate) first_seq: u64,
    /// Changes whenever the object is replaced (size, modification time, ETag, inode…).
    pub(crate) fingerprint: String,
}

/// What the read path needs from a log adapter.
pub(crate) trait ChunkSource: Sync {
    /// The attempt's manifest, if the log is complete.
    fn manifest(
        &self,
        key: &AttemptKey,
    ) -> impl Future<Output = Result<Option<LogManifest>, StoreError>> + Send;

    /// The attempt's chunk objects, in any order.
    fn list_chunks(
        &self,
        key: &AttemptKey,
    ) -> impl Future<Output = Result<Vec<ListedChunk>, StoreError>> + Send;

    /// A chunk object's bytes.
    fn fetch_chunk(
        &self,
        chunk: &ListedChunk,
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;
}

/// The last line of each chunk a store has decoded, by key and fingerprint.
#[derive(Debug, Default)]
pub(crate) struct ExtentCache {
    last_seqs: Mutex<HashMap<String, (String, u64)>>,
}

impl ExtentCache {
    /// The chunk's last line, if it was decoded and has not changed since.
    fn last_seq(&self, chunk: &ListedChunk) -> Option<u64> {
        let map = self.last_seqs.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&chunk.key)
            .filter(|(fingerprint, _)| *fingerprint == chunk.fingerprint)
            .map(|&(_, last)| last)
    }

    fn remember(&self, chunk: &ListedChunk, last_seq: u64) {
        let mut map = self.last_seqs.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= EXTENT_CACHE_ENTRIES && !map.contains_key(&chunk.key) {
            map.clear();
        }
        map.insert(chunk.key.clone(), (chunk.fingerprint.clone(), last_seq));
    }
}

/// `LogStore::read` for any adapter.
pub(crate) async fn read_log<S: ChunkSource>(
    source: &S,
    cache: &ExtentCache,
    key: &AttemptKey,
    after: Option<u64>,
    limit: usize,
) -> Result<LogRead, StoreError> {
    // The manifest first: it is written after every chunk, so a listing taken after it
    // shows them all.
    let manifest = source.manifest(key).await?;
    let start = match after {
        None => Some(0),
        Some(a) => a.checked_add(1),
    };
    let mut lines = Vec::new();
    if let Some(start) = start {
        let mut end = start.saturating_add(u64::try_from(limit).unwrap_or(u64::MAX));
        if let Some(m) = &manifest {
            // Nothing past the manifest's last line belongs to the log.
            end = end.min(m.last_seq.map_or(0, |l| l.saturating_add(1)));
        }
        if start < end {
            lines = gather(source, cache, key, start, end).await?;
            let want = end - start;
            if manifest.is_some() && (lines.len() as u64) < want {
                let missing = start + lines.len() as u64;
                let last = manifest.as_ref().and_then(|m| m.last_seq).unwrap_or(0);
                return Err(StoreError::Corrupt(format!(
                    "log {}: line {missing} is in no chunk though manifest.json says the log \
                     ends at line {last}",
                    key.log_prefix()
                )));
            }
        }
    }
    let reached = lines.last().map(|l: &LogLine| l.seq).or(after);
    let complete = manifest.is_some_and(|m| match m.last_seq {
        None => true,
        Some(last) => reached.is_some_and(|r| r >= last),
    });
    Ok(LogRead { lines, complete })
}

/// The unbroken run of lines from `start` (inclusive) to at most `end` (exclusive).
async fn gather<S: ChunkSource>(
    source: &S,
    cache: &ExtentCache,
    key: &AttemptKey,
    start: u64,
    end: u64,
) -> Result<Vec<LogLine>, StoreError> {
    let mut chunks = source.list_chunks(key).await?;
    chunks.sort_by_key(|c| c.first_seq);
    let mut found: BTreeMap<u64, LogLine> = BTreeMap::new();
    for chunk in chunks.iter().take_while(|c| c.first_seq < end) {
        if cache.last_seq(chunk).is_some_and(|last| last < start) {
            continue;
        }
        let bytes = source.fetch_chunk(chunk).await?;
        let decoded = chunk::decode(&chunk.key, chunk.first_seq, &bytes)?;
        if let Some(last) = decoded.last() {
            cache.remember(chunk, last.seq);
        }
        for line in decoded {
            if (start..end).contains(&line.seq) {
                // A repeated line (overlapping chunks) is the same line: keep the first.
                found.entry(line.seq).or_insert(line);
            }
        }
        if found.len() as u64 == end - start {
            break;
        }
    }
    let mut lines = Vec::with_capacity(found.len());
    for (expected, (seq, line)) in (start..).zip(found) {
        if seq != expected {
            break;
        }
        lines.push(line);
    }
    Ok(lines)
}
