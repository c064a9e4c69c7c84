//! The embedded adapters (`flotilla dev`): logs and artifacts as files below one root
//! directory, so a single-machine installation needs no object store.
//!
//! Layout below the root:
//! - `logs/{project}/{build}/{job}/{attempt}/chunk-{first_seq:020}.zst` and `manifest.json`:
//!   the layout of `core/src/store.rs`, chunks in the [`chunk`](crate::chunk) encoding.
//! - `artifacts/{project}/{build}/{job}/{attempt}/{path}`: an artifact's bytes, exactly as
//!   uploaded (so an operator can look at them).
//! - `.meta/artifacts/{project}/{build}/{job}/{attempt}/{path}`: the artifact's size and
//!   SHA-256 as JSON. This tree mirrors the artifact tree, so no artifact can collide with
//!   another's metadata (a `{path}.sha256` sidecar would, for an artifact named so), and
//!   it is outside `artifacts/`, so no artifact path can reach it. An artifact is visible
//!   (`list`, `get_file`, `open`) once its metadata file exists, and that is written after
//!   its bytes.
//! - `.tmp/`: files being written. Every write is a temporary file here, `fsync`, `rename`
//!   into place, then an `fsync` of the directory, so a crash never leaves half an object
//!   visible; what a crash leaves behind is only ever here, and may be deleted at leisure.
//!
//! File I/O is blocking, so each operation runs on tokio's blocking pool.

mod artifact;
mod log;

use std::io;
use std::path::{Path, PathBuf};

use flotilla_core::store::StoreError;

pub use artifact::DirArtifactStore;
pub use log::DirLogStore;

/// `.tmp/` below the root: same file system as the objects, so renames are atomic.
fn tmp_dir(root: &Path) -> PathBuf {
    root.join(".tmp")
}

/// Runs blocking file work off the async workers.
pub(crate) async fn blocking<T, F>(work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Unavailable(format!("file task failed: {e}")))?
}

/// An I/O error on object `key`: a missing file is [`StoreError::NotFound`] (so is a
/// directory, or a path through a file: `a` when only `a/b` was stored, `a/b/c` when `a/b`
/// was), anything else (permissions, a full disk) [`StoreError::Unavailable`].
fn io_error(what: &str, key: &str, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory => {
            StoreError::NotFound(key.to_owned())
        }
        _ => StoreError::Unavailable(format!("{what} {key}: {e}")),
    }
}
