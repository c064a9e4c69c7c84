//! The latest snapshot as a file of its own, `snapshot.bin`, written so that it does not
//! crowd out the log's syncs.
//!
//! A snapshot is megabytes written at once; the log's appends each wait for a sync of a few
//! hundred bytes on the same disk. Written and synced in one go, a 5–20 MB snapshot (three at
//! once in the all-in-one benchmark) queued behind the device's cache flushes and stalled
//! acknowledgements for up to half a second. Written in [`CHUNK`]-sized pieces, each synced
//! before the next and followed by as long a pause, it never puts more than one chunk ahead
//! of a log sync and leaves the disk to the log at least half the time.
//!
//! Format, version 1: the magic [`MAGIC`], the length of the data (`u64 LE`), its CRC-32
//! (`u32 LE`), then the data. A new snapshot goes to `snapshot.bin.tmp` first and is renamed
//! over the old one once synced, and the directory is synced, so the file is always whole.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// The first 8 bytes of a version-1 snapshot file.
pub(crate) const MAGIC: &[u8; 8] = b"FLTSNP01";
/// Bytes written between syncs.
pub(crate) const CHUNK: usize = 256 << 10;
const FILE: &str = "snapshot.bin";
const TMP: &str = "snapshot.bin.tmp";
const HEADER: usize = 8 + 8 + 4;

/// Whether `dir` has a snapshot file.
pub(crate) fn exists(dir: &Path) -> bool {
    dir.join(FILE).exists()
}

/// Replaces the snapshot file in `dir` with `data`, durably.
pub(crate) fn write(dir: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = dir.join(TMP);
    let mut file = File::create(&tmp)?;
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&(data.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    file.write_all(&header)?;
    for chunk in data.chunks(CHUNK) {
        // Real disk time is what is being shared out; no injected clock could stand in.
        #[allow(clippy::disallowed_methods)]
        let started = std::time::Instant::now();
        file.write_all(chunk)?;
        file.sync_data()?;
        // Leave the disk idle for as long again, so the log's syncs are never queued behind
        // a run of snapshot chunks: the snapshot takes twice as long, acknowledgements do not.
        std::thread::sleep(started.elapsed());
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(FILE))?;
    File::open(dir)?.sync_all()
}

/// The snapshot data in `dir`, if there is a snapshot file.
pub(crate) fn read(dir: &Path) -> io::Result<Option<Vec<u8>>> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a usable Flotilla snapshot: {what}. The log behind it is already \
                 purged, so the replica cannot rebuild its state alone: move the whole Raft \
                 directory aside and let the replica rejoin from its peers (docs/operations.md, \
                 The Raft data directory), or restore it from a backup",
                path.display()
            ),
        )
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(bad("it does not start with a version-1 snapshot header"));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let data = &bytes[HEADER..];
    if data.len() as u64 != len {
        return Err(bad("its length does not match its header"));
    }
    if crc32fast::hash(data) != crc {
        return Err(bad("its checksum does not match"));
    }
    Ok(Some(data.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_larger_than_a_chunk_reads_back_and_replaces_the_last() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let big: Vec<u8> = (0..CHUNK * 3 + 17).map(|i| (i % 251) as u8).collect();
        write(dir.path(), &big).unwrap();
        assert_eq!(read(dir.path()).unwrap().as_deref(), Some(&big[..]));
        write(dir.path(), b"small").unwrap();
        assert_eq!(read(dir.path()).unwrap().as_deref(), Some(&b"small"[..]));
        assert!(!dir.path().join(TMP).exists());
    }

    #[test]
    fn a_damaged_snapshot_file_is_refused_with_its_path_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), b"some state").unwrap();
        let path = dir.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("snapshot.bin"), "{err}");
        assert!(err.contains("checksum"), "{err}");
        assert!(err.contains("move the whole Raft directory aside"), "{err}");
    }
}
