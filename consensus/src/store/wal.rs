//! The Raft log on disk: one append-only file of checksummed records, `raft.wal`.
//!
//! Why not redb, where earlier versions kept it: a redb commit rewrites several B-tree and
//! allocator pages before its one `fdatasync`, and measured 0.22–0.36 ms per commit on the
//! build machines, while appending one record to a preallocated file and syncing it costs
//! 0.11–0.15 ms. A commit on the single-client path is one of these on the leader and one on
//! a follower, so the file halves the storage share of every write's latency (decision 50 in
//! docs/ARCHITECTURE.md, figures in docs/benchmarks.md).
//!
//! Format, version 1: the file starts with the 8-byte magic [`MAGIC`], then records, each
//! `len: u32 LE | crc32: u32 LE | body` where `body` is `len` bytes, `kind: u8` then the
//! payload, and the CRC-32 (IEEE) covers the body:
//!
//! | kind | payload |
//! |---|---|
//! | 1 entry | index `u64 LE`, then the postcard-encoded entry |
//! | 2 vote | the postcard-encoded vote |
//! | 3 committed | the postcard-encoded `Option<LogId>` |
//! | 4 truncate | index `u64 LE`: entries from it on are gone |
//! | 5 purged | index `u64 LE`, then the postcard-encoded `Option<LogId>`: entries up to it are gone |
//! | 6 batch | the length `u64 LE` of the records that follow and belong to this batch |
//!
//! Each write of queued records starts with a batch record, and one sync follows each
//! write: so at most the last batch can be unsynced at a crash. Its records are applied only
//! if the whole batch reads back. A batch that does not is dropped whole (it was never
//! acknowledged) if nothing follows it; if an intact batch follows it, the damage is not a
//! torn write but corruption of synced data, and opening fails rather than dropping
//! acknowledged entries. (A damaged batch *header* hides its length and so whether anything
//! follows; that case ends the log there. Files rewritten whole, by a purge or a move, are
//! synced before use and carry no batch records.)
//! The file is allocated ahead in [`ALLOCATE_STEP`] steps, so an append changes no file size
//! (the first write into an allocated extent still marks it written, which the sync
//! carries). Reading stops at the first record that is incomplete or fails its checksum: the
//! tail of a write that a crash tore, which was never acknowledged (see the batch records
//! above for how that is told apart from damage to synced data). What follows it is zeroed before anything new is written, so leftovers of
//! the torn write can never be read as records later. A purge is a record too; once purged
//! records take more than [`COMPACT_AFTER`] and more than the live ones, the file is
//! rewritten: the live records are copied into `raft.wal.tmp`, which is synced and renamed
//! over `raft.wal`, and the directory is synced. Rewriting at every purge (after every
//! snapshot) held appends up for 5–35 ms each time; this way it happens a few times as
//! rarely, and never while the log is mostly live.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The first 8 bytes of a version-1 log file.
pub(crate) const MAGIC: &[u8; 8] = b"FLTWAL01";
/// How far ahead the file is allocated.
pub(crate) const ALLOCATE_STEP: u64 = 64 << 20;
/// Purged records may take this much of the file before it is rewritten without them.
pub(crate) const COMPACT_AFTER: u64 = 64 << 20;
const FILE: &str = "raft.wal";
const TMP: &str = "raft.wal.tmp";
const HEADER: usize = 8;

const ENTRY: u8 = 1;
const VOTE: u8 = 2;
const COMMITTED: u8 = 3;
const TRUNCATE: u8 = 4;
const PURGED: u8 = 5;
const BATCH: u8 = 6;
/// A batch header's whole length: record header, kind, `u64` length.
const BATCH_HEADER: usize = HEADER + 1 + 8;

/// What a log file holds, as encoded bytes (the caller decodes).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Contents {
    /// Live entries by index.
    pub(crate) entries: BTreeMap<u64, Vec<u8>>,
    pub(crate) vote: Option<Vec<u8>>,
    pub(crate) committed: Option<Vec<u8>>,
    /// The last purged index and its encoded log id.
    pub(crate) purged: Option<(u64, Vec<u8>)>,
}

/// An open log file, written by one thread.
#[derive(Debug)]
pub(crate) struct Wal {
    dir: PathBuf,
    file: File,
    /// Where the next record goes.
    end: u64,
    /// The file's length: everything below it is allocated.
    allocated: u64,
    /// Live entries: index → (offset, length) of their record.
    entries: BTreeMap<u64, (u64, usize)>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<(u64, Vec<u8>)>,
    /// Records not yet written, to go at `end`.
    pending: Vec<u8>,
    /// Whether bytes were written since the last sync.
    unsynced: bool,
}

impl Wal {
    /// Whether `dir` has a log file.
    pub(crate) fn exists(dir: &Path) -> bool {
        dir.join(FILE).exists()
    }

    /// Opens the log file in `dir`, which must exist, and reads it back.
    pub(crate) fn open(dir: &Path) -> io::Result<(Self, Contents)> {
        let path = dir.join(FILE);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let bytes = std::fs::read(&path)?;
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a Flotilla Raft log (version 1): its first bytes are not {:?}",
                    path.display(),
                    String::from_utf8_lossy(MAGIC)
                ),
            ));
        }
        let mut wal = Self {
            dir: dir.to_owned(),
            file,
            end: MAGIC.len() as u64,
            allocated: bytes.len() as u64,
            entries: BTreeMap::new(),
            vote: None,
            committed: None,
            purged: None,
            pending: Vec::new(),
            unsynced: false,
        };
        let mut contents = Contents::default();
        let mut at = MAGIC.len();
        while let Some((kind, payload, len)) = record_at(&bytes, at) {
            if kind != BATCH {
                wal.replay(kind, payload, at as u64, len, &mut contents)?;
                at += len;
                continue;
            }
            let body = u64_at(payload)? as usize;
            let (start, end) = (at + len, at + len + body);
            let records = match records_in(&bytes, start, end) {
                Some(records) => records,
                None if record_at(&bytes, end).is_some_and(|(k, _, _)| k == BATCH) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: the batch of records at byte {at} is damaged, yet an intact one \
                             follows it at byte {end}: the disk corrupted data that had been \
                             synced (a crash only ever tears the last batch). Refusing to drop \
                             acknowledged entries; move the data directory aside and let the \
                             replica rejoin from its peers, or restore it from a backup",
                            path.display()
                        ),
                    ));
                }
                // The last batch, torn by a crash before its sync: never acknowledged.
                None => break,
            };
            for (offset, kind, payload, len) in records {
                wal.replay(kind, payload, offset as u64, len, &mut contents)?;
            }
            at = end;
        }
        wal.end = at as u64;
        // Only the last batch can be torn, and nothing is ever written after it: an intact
        // batch record past where reading stopped means synced data was damaged, not torn.
        let tail = bytes[at..]
            .iter()
            .rposition(|&b| b != 0)
            .map(|last| at + last + 1);
        if let Some(later) = tail.and_then(|end| batch_after(&bytes[..end], at)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the record at byte {at} is damaged, yet an intact batch of records \
                     follows at byte {later}: the disk corrupted data that had been synced (a \
                     crash only ever tears the last batch). Refusing to drop acknowledged \
                     entries; move the data directory aside and let the replica rejoin from \
                     its peers, or restore it from a backup",
                    path.display()
                ),
            ));
        }
        // Zero whatever a torn write left behind the last good record.
        if let Some(end) = tail {
            wal.file.write_all_at(&vec![0; end - at], at as u64)?;
            wal.file.sync_data()?;
        }
        Ok((wal, contents))
    }

    /// Creates the log file in `dir` holding `contents`, durably (used once, to move a log
    /// out of an older layout). Replaces any log file there.
    pub(crate) fn create(dir: &Path, contents: &Contents) -> io::Result<Self> {
        let mut records = head_records(&contents.vote, &contents.committed, &contents.purged);
        for (index, entry) in &contents.entries {
            push(&mut records, ENTRY, &[&index.to_le_bytes(), entry]);
        }
        let file = write_new(dir, &records)?;
        let (wal, _) = Self::open(dir)?;
        drop(file);
        Ok(wal)
    }

    fn replay(
        &mut self,
        kind: u8,
        payload: &[u8],
        offset: u64,
        len: usize,
        contents: &mut Contents,
    ) -> io::Result<()> {
        let index = || u64_at(payload);
        match kind {
            ENTRY => {
                let i = index()?;
                self.entries.insert(i, (offset, len));
                contents.entries.insert(i, payload[8..].to_vec());
            }
            VOTE => {
                self.vote = Some(payload.to_vec());
                contents.vote = self.vote.clone();
            }
            COMMITTED => {
                self.committed = Some(payload.to_vec());
                contents.committed = self.committed.clone();
            }
            TRUNCATE => {
                let from = index()?;
                self.entries.split_off(&from);
                contents.entries.split_off(&from);
            }
            PURGED => {
                let upto = index()?;
                self.entries = self.entries.split_off(&(upto + 1));
                contents.entries = contents.entries.split_off(&(upto + 1));
                self.purged = Some((upto, payload[8..].to_vec()));
                contents.purged = self.purged.clone();
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the Raft log has a record of unknown kind {other} at byte {offset}: \
                         it was written by a newer Flotilla"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Starts the queued records with a batch record, its length filled in when written.
    fn open_batch(&mut self) {
        if self.pending.is_empty() {
            push(&mut self.pending, BATCH, &[&0u64.to_le_bytes()]);
        }
    }

    fn next_offset(&self) -> u64 {
        self.end + self.pending.len() as u64
    }

    /// Queues an entry; durable after the next [`Wal::sync`].
    pub(crate) fn push_entry(&mut self, index: u64, entry: &[u8]) {
        self.open_batch();
        let offset = self.next_offset();
        let len = push(&mut self.pending, ENTRY, &[&index.to_le_bytes(), entry]);
        self.entries.insert(index, (offset, len));
    }

    /// Queues the vote.
    pub(crate) fn push_vote(&mut self, vote: &[u8]) {
        self.open_batch();
        push(&mut self.pending, VOTE, &[vote]);
        self.vote = Some(vote.to_vec());
    }

    /// Queues the committed index.
    pub(crate) fn push_committed(&mut self, committed: &[u8]) {
        self.open_batch();
        push(&mut self.pending, COMMITTED, &[committed]);
        self.committed = Some(committed.to_vec());
    }

    /// Queues the removal of the entries from `from` on.
    pub(crate) fn push_truncate(&mut self, from: u64) {
        self.open_batch();
        push(&mut self.pending, TRUNCATE, &[&from.to_le_bytes()]);
        self.entries.split_off(&from);
    }

    /// Queues the removal of the entries up to `upto` (`id` is its encoded log id).
    pub(crate) fn push_purge(&mut self, upto: u64, id: &[u8]) {
        self.open_batch();
        push(&mut self.pending, PURGED, &[&upto.to_le_bytes(), id]);
        self.entries = self.entries.split_off(&(upto + 1));
        self.purged = Some((upto, id.to_vec()));
    }

    /// Whether purged records take up enough of the file that it should be rewritten: more
    /// than [`COMPACT_AFTER`] and more than the live entries. Walks every live entry: ask
    /// after a purge, not after every append.
    pub(crate) fn wasteful(&self) -> bool {
        let live: u64 = self.entries.values().map(|(_, len)| *len as u64).sum();
        let dead = self.next_offset() - MAGIC.len() as u64 - live;
        dead > COMPACT_AFTER && dead > live
    }

    /// Rewrites the file with only what is live (the queued records included); durable when
    /// it returns.
    pub(crate) fn compact(&mut self) -> io::Result<()> {
        self.write_pending()?;
        let mut records = head_records(&self.vote, &self.committed, &self.purged);
        let mut entries = BTreeMap::new();
        for (index, (offset, len)) in &self.entries {
            let start = records.len();
            records.resize(start + len, 0);
            self.file.read_exact_at(&mut records[start..], *offset)?;
            entries.insert(*index, ((MAGIC.len() + start) as u64, *len));
        }
        self.file = write_new(&self.dir, &records)?;
        self.end = (MAGIC.len() + records.len()) as u64;
        self.allocated = self.file.metadata()?.len();
        self.entries = entries;
        self.unsynced = false;
        Ok(())
    }

    /// Writes the queued records and makes everything written durable.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        self.write_pending()?;
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Seal the batch record at the front with the length of what follows.
        let body = (self.pending.len() - BATCH_HEADER) as u64;
        self.pending[HEADER + 1..BATCH_HEADER].copy_from_slice(&body.to_le_bytes());
        let crc = crc32fast::hash(&self.pending[HEADER..BATCH_HEADER]);
        self.pending[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        let needed = self.end + self.pending.len() as u64;
        if needed > self.allocated {
            let target = needed.div_ceil(ALLOCATE_STEP) * ALLOCATE_STEP;
            allocate(&self.file, target)?;
            // The new length is metadata: make it durable with everything else.
            self.file.sync_all()?;
            self.allocated = target;
        }
        self.file.write_all_at(&self.pending, self.end)?;
        self.end = needed;
        self.pending.clear();
        self.unsynced = true;
        Ok(())
    }
}

/// The records a file written whole starts with: vote, committed index, purge point.
fn head_records(
    vote: &Option<Vec<u8>>,
    committed: &Option<Vec<u8>>,
    purged: &Option<(u64, Vec<u8>)>,
) -> Vec<u8> {
    let mut records = Vec::new();
    if let Some(v) = vote {
        push(&mut records, VOTE, &[v]);
    }
    if let Some(c) = committed {
        push(&mut records, COMMITTED, &[c]);
    }
    if let Some((upto, id)) = purged {
        push(&mut records, PURGED, &[&upto.to_le_bytes(), id]);
    }
    records
}

/// Appends one record to `out`; returns its length.
fn push(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) -> usize {
    let body_len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    for p in parts {
        out.extend_from_slice(p);
    }
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    HEADER + body_len
}

/// The record at `at`: its kind, payload and whole length; `None` at the end of what was
/// completely written.
fn record_at(bytes: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let header = bytes.get(at..at + HEADER)?;
    let body_len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if body_len == 0 {
        return None;
    }
    let body = bytes.get(at + HEADER..at + HEADER + body_len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some((body[0], &body[1..], HEADER + body_len))
}

/// The `u64 LE` a payload starts with.
fn u64_at(payload: &[u8]) -> io::Result<u64> {
    let raw = payload
        .get(..8)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a log record is too short"))?;
    Ok(u64::from_le_bytes(raw.try_into().expect("8 bytes")))
}

/// The offset of an intact batch record after `from` (not one starting exactly there, which
/// is the torn batch itself), if any.
fn batch_after(bytes: &[u8], from: usize) -> Option<usize> {
    let body = (BATCH_HEADER - HEADER) as u32;
    (from + 1..bytes.len().saturating_sub(BATCH_HEADER - 1)).find(|&o| {
        bytes[o..o + 4] == body.to_le_bytes()
            && bytes[o + HEADER] == BATCH
            && record_at(bytes, o).is_some()
    })
}

/// A record read back: its offset, kind, payload and whole length.
type Record<'a> = (usize, u8, &'a [u8], usize);

/// The records exactly filling `start..end`; `None` if any is damaged or missing.
fn records_in(bytes: &[u8], start: usize, end: usize) -> Option<Vec<Record<'_>>> {
    let mut records = Vec::new();
    let mut at = start;
    while at < end {
        let (kind, payload, len) = record_at(bytes, at)?;
        if kind == BATCH {
            return None;
        }
        records.push((at, kind, payload, len));
        at += len;
    }
    (at == end).then_some(records)
}

/// Writes a new log file with `records` through a temporary file, durably, and returns it
/// open for writing.
fn write_new(dir: &Path, records: &[u8]) -> io::Result<File> {
    let tmp = dir.join(TMP);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let len = (MAGIC.len() + records.len()) as u64;
    allocate(&file, len.div_ceil(ALLOCATE_STEP).max(1) * ALLOCATE_STEP)?;
    file.write_all_at(MAGIC, 0)?;
    file.write_all_at(records, MAGIC.len() as u64)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(FILE))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Extends `file` to `len` bytes with the space really allocated (so later writes inside it
/// need no allocation), or as a sparse extension where the file system cannot.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let current = file.metadata()?.len();
    if len <= current {
        return Ok(());
    }
    match rustix::fs::fallocate(
        file,
        rustix::fs::FallocateFlags::empty(),
        current,
        len - current,
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => file.set_len(len),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(wal_dir: &Path) -> Contents {
        Wal::open(wal_dir).unwrap().1
    }

    fn sample() -> Contents {
        let mut c = Contents {
            vote: Some(b"vote-1".to_vec()),
            committed: Some(b"c-3".to_vec()),
            ..Contents::default()
        };
        for i in 1..=5 {
            c.entries.insert(i, format!("entry {i}").into_bytes());
        }
        c
    }

    #[test]
    fn what_was_synced_reads_back_after_truncate_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &sample()).unwrap();
        wal.push_truncate(4);
        wal.push_entry(4, b"entry 4'");
        wal.push_vote(b"vote-2");
        wal.sync().unwrap();
        let mut expect = sample();
        expect.entries.remove(&5);
        expect.entries.insert(4, b"entry 4'".to_vec());
        expect.vote = Some(b"vote-2".to_vec());
        assert_eq!(contents(dir.path()), expect);

        wal.push_entry(5, b"entry 5'");
        wal.push_committed(b"c-4");
        wal.push_purge(2, b"id-2");
        wal.push_entry(6, b"entry 6");
        wal.sync().unwrap();
        assert!(!wal.wasteful());
        let got = contents(dir.path());
        assert_eq!(
            got.entries.keys().copied().collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        // Rewriting keeps exactly what is live.
        wal.compact().unwrap();
        wal.push_entry(7, b"entry 7");
        wal.sync().unwrap();
        drop(wal);
        let mut got = contents(dir.path());
        assert_eq!(got.entries.remove(&7).as_deref(), Some(&b"entry 7"[..]));
        assert_eq!(
            got.entries.keys().copied().collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        assert_eq!(got.entries[&4], b"entry 4'");
        assert_eq!(got.entries[&5], b"entry 5'");
        assert_eq!(got.committed.as_deref(), Some(&b"c-4"[..]));
        assert_eq!(got.purged, Some((2, b"id-2".to_vec())));
        assert_eq!(got.vote.as_deref(), Some(&b"vote-2"[..]));
        assert!(!dir.path().join(TMP).exists());
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_never_read_back_as_a_record_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &Contents::default()).unwrap();
        wal.push_entry(1, b"first");
        wal.sync().unwrap();
        let torn_at = wal.end;
        // A long record whose write the crash cut short: header and half the body.
        let mut record = Vec::new();
        push(&mut record, ENTRY, &[&2u64.to_le_bytes(), &[7u8; 200]]);
        wal.file
            .write_all_at(&record[..100], torn_at)
            .expect("write");
        drop(wal);

        let (mut wal, got) = Wal::open(dir.path()).unwrap();
        assert_eq!(got.entries.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(wal.end, torn_at);
        // A short record where the torn one began; the torn bytes behind it must not parse.
        wal.push_entry(2, b"x");
        wal.sync().unwrap();
        drop(wal);
        let got = contents(dir.path());
        assert_eq!(got.entries.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(got.entries[&2], b"x");
    }

    #[test]
    fn a_batch_torn_by_a_crash_is_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &Contents::default()).unwrap();
        wal.push_entry(1, b"one");
        wal.sync().unwrap();
        // One batch of two entries, written but cut short before its sync.
        let torn_at = wal.end;
        wal.push_entry(2, &[2; 300]);
        wal.push_entry(3, &[3; 300]);
        wal.write_pending().unwrap();
        wal.file.write_all_at(&[0; 200], torn_at + 400).unwrap();
        drop(wal);
        let (wal, got) = Wal::open(dir.path()).unwrap();
        assert_eq!(got.entries.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            wal.end, torn_at,
            "entry 2 was intact, but its batch was not"
        );
    }

    #[test]
    fn damage_to_a_synced_batch_with_more_after_it_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &Contents::default()).unwrap();
        let mut starts = Vec::new();
        for i in 1..=3 {
            starts.push(wal.end);
            wal.push_entry(i, format!("entry {i}").as_bytes());
            wal.sync().unwrap();
        }
        // Flip a byte of entry 2, whose batch was synced and followed by entry 3's.
        wal.file
            .write_all_at(b"X", starts[1] + BATCH_HEADER as u64 + 20)
            .unwrap();
        drop(wal);
        let err = Wal::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("raft.wal"), "{err}");
        assert!(err.contains("corrupted data that had been synced"), "{err}");
        assert!(err.contains("rejoin from its peers"), "{err}");
    }

    #[test]
    fn damage_to_records_written_whole_with_batches_after_them_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        // A file written whole (as a purge or a move writes it), then one appended batch.
        let mut wal = Wal::create(dir.path(), &sample()).unwrap();
        wal.push_entry(6, b"entry 6");
        wal.sync().unwrap();
        // Damage entry 2, in the part written whole.
        let (offset, _) = wal.entries[&2];
        wal.file.write_all_at(b"X", offset + 12).unwrap();
        drop(wal);
        let err = Wal::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("intact batch of records"), "{err}");
    }

    #[test]
    fn a_corrupted_record_ends_the_log_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &Contents::default()).unwrap();
        wal.push_entry(1, b"one");
        wal.sync().unwrap();
        let second = wal.end;
        wal.push_entry(2, b"two");
        wal.sync().unwrap();
        // Flip a payload byte of the second record.
        wal.file.write_all_at(b"T", second + 9 + 8).unwrap();
        drop(wal);
        let got = contents(dir.path());
        assert_eq!(got.entries.keys().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"hello world").unwrap();
        let err = Wal::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("raft.wal"), "{err}");
        assert!(err.to_string().contains("not a Flotilla Raft log"), "{err}");
    }

    #[test]
    fn appends_past_the_allocation_grow_the_file_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &Contents::default()).unwrap();
        assert_eq!(wal.allocated, ALLOCATE_STEP);
        let big = vec![1u8; 1 << 20];
        for i in 1..=70 {
            wal.push_entry(i, &big);
            wal.sync().unwrap();
        }
        assert_eq!(wal.allocated, 2 * ALLOCATE_STEP);
        drop(wal);
        assert_eq!(contents(dir.path()).entries.len(), 70);
    }

    #[test]
    fn a_file_mostly_purged_is_found_wasteful_and_rewritten_small() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &Contents::default()).unwrap();
        let big = vec![1u8; 1 << 20];
        for i in 1..=70 {
            wal.push_entry(i, &big);
        }
        wal.sync().unwrap();
        wal.push_purge(30, b"id-30");
        assert!(!wal.wasteful(), "30 MiB purged, 40 MiB live");
        wal.push_purge(69, b"id-69");
        assert!(wal.wasteful(), "69 MiB purged, 1 MiB live");
        wal.compact().unwrap();
        assert_eq!(wal.allocated, ALLOCATE_STEP);
        assert!(!wal.wasteful());
        drop(wal);
        let got = contents(dir.path());
        assert_eq!(got.entries.keys().copied().collect::<Vec<_>>(), vec![70]);
        assert_eq!(got.purged, Some((69, b"id-69".to_vec())));
    }
}
