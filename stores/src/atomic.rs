//! Files that appear whole or not at all: written under a temporary name, `fsync`ed, renamed
//! into place, and the directory `fsync`ed so the rename itself survives a crash. A
//! temporary file is removed when its guard is dropped unpersisted (an error, a cancelled
//! future); one left by a crash is only ever under a temporary name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Tells temporary files of one process apart (with the process id, between processes).
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// A temporary file's path, removed on drop unless [`TmpPath::persist`] moved it into place.
#[derive(Debug)]
pub(crate) struct TmpPath {
    path: PathBuf,
    armed: bool,
}

impl TmpPath {
    /// A fresh name in `dir` (created if missing) for a file that will become `dest`. The
    /// file itself is not created.
    pub(crate) fn new_in(dir: &Path, dest: &Path) -> io::Result<TmpPath> {
        fs::create_dir_all(dir)?;
        let stem = dest
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(64).collect::<String>())
            .unwrap_or_default();
        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{stem}.{}.{n}.flotilla-tmp", std::process::id()));
        Ok(TmpPath { path, armed: true })
    }

    /// The temporary path.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the temporary file (it must not exist).
    pub(crate) fn create(&self) -> io::Result<File> {
        File::options()
            .write(true)
            .create_new(true)
            .open(&self.path)
    }

    /// Renames the (already `fsync`ed) temporary file to `dest`, creating `dest`'s directory
    /// if needed, then `fsync`s that directory.
    pub(crate) fn persist(mut self, dest: &Path) -> io::Result<()> {
        let parent = parent_of(dest);
        create_dirs_durably(parent)?;
        fs::rename(&self.path, dest)?;
        self.armed = false;
        sync_dir(parent)
    }
}

impl Drop for TmpPath {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the file may never have been created.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Creates `dir` and the missing directories above it, `fsync`ing the parent of each one
/// made: a directory entry not yet on disk would take every file below it with it at a
/// power loss (POSIX promises nothing else, whatever ext4's journal usually does), and the
/// aggregator commits stream positions as soon as a chunk is stored.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.is_dir() {
        missing.push(at);
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => break,
        }
    }
    for made in missing.into_iter().rev() {
        match fs::create_dir(made) {
            Ok(()) => sync_dir(parent_of(made))?,
            // Another writer made it meanwhile; it syncs its own.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `bytes` to `dest` atomically, through a temporary file in `tmp_dir` (which must be
/// on the same file system).
pub(crate) fn write_file(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = TmpPath::new_in(tmp_dir, dest)?;
    let mut file = tmp.create()?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    tmp.persist(dest)
}

/// `fsync`s a directory, so the entries just renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory a path is in (`.` for a bare name).
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_replaces_the_old_one_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let tmp_dir = dir.path().join(".tmp");
        let dest = dir.path().join("a/b/file");
        write_file(&tmp_dir, &dest, b"one").unwrap();
        write_file(&tmp_dir, &dest, b"two").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        assert_eq!(fs::read_dir(&tmp_dir).unwrap().count(), 0);
    }

    #[test]
    fn an_unpersisted_temporary_file_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = TmpPath::new_in(dir.path(), Path::new("x")).unwrap();
        let path = tmp.path().to_owned();
        drop(tmp.create().unwrap());
        assert!(path.exists());
        drop(tmp);
        assert!(!path.exists());
    }
}
