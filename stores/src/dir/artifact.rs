//! [`DirArtifactStore`]: artifacts as files, their size and SHA-256 in a mirrored metadata
//! tree (see [the module](super) for the layout and why).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{
    ArtifactStore, AttemptKey, ByteSource, StoreError, StoredArtifact, check_artifact_path,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::{blocking, io_error, tmp_dir};
use crate::atomic::{self, TmpPath};
use crate::sha;

/// The pieces [`ArtifactStore::open`] streams, and the copy buffer.
const PIECE: usize = 64 << 10;

/// The version of the metadata file's format.
const SIDECAR_VERSION: u32 = 1;

/// What is kept of an artifact beside its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    /// [`SIDECAR_VERSION`].
    v: u32,
    /// The artifact's size.
    size: u64,
    /// Hex SHA-256 of its bytes.
    sha256: String,
}

/// Artifacts below a root directory.
#[derive(Debug)]
pub struct DirArtifactStore {
    root: PathBuf,
}

impl DirArtifactStore {
    /// A store below `root`; directories are created as they are needed.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirArtifactStore { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an attempt's artifact bytes are.
    fn data_dir(&self, key: &AttemptKey) -> PathBuf {
        self.root.join(key.artifact_prefix())
    }

    /// Where an attempt's artifact metadata is.
    fn meta_dir(&self, key: &AttemptKey) -> PathBuf {
        self.root.join(".meta").join(key.artifact_prefix())
    }

    /// The sidecar of artifact `path`, or [`StoreError::NotFound`].
    fn read_sidecar(meta_dir: &Path, object_key: &str, path: &str) -> Result<Sidecar, StoreError> {
        let bytes =
            fs::read(meta_dir.join(path)).map_err(|e| io_error("reading", object_key, e))?;
        parse_sidecar(object_key, &bytes)
    }
}

fn parse_sidecar(object_key: &str, bytes: &[u8]) -> Result<Sidecar, StoreError> {
    let sidecar: Sidecar = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("metadata of artifact {object_key}: {e}")))?;
    if sidecar.v != SIDECAR_VERSION {
        return Err(StoreError::Corrupt(format!(
            "metadata of artifact {object_key}: version {} is not the supported {SIDECAR_VERSION}",
            sidecar.v
        )));
    }
    Ok(sidecar)
}

/// A failure to place artifact `object_key`: a path that clashes with another artifact (a
/// file where a directory is needed, or the reverse) cannot be stored in a directory tree.
fn place_error(object_key: &str, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory
        | io::ErrorKind::AlreadyExists => StoreError::Invalid(format!(
            "artifact {object_key} clashes with another artifact's path: {e}"
        )),
        _ => io_error("writing", object_key, e),
    }
}

/// Copies `src` to `dst`, returning the size and the hex SHA-256 of what was copied.
fn copy_hashing(src: &mut File, dst: &mut File) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; PIECE * 16];
    let mut size = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok((size, sha::finish(hasher)))
}

impl ArtifactStore for DirArtifactStore {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn put_file<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
        file: &'a Path,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<StoredArtifact, StoreError>> {
        Box::pin(async move {
            let path = check_artifact_path(path)?.to_owned();
            let declared = sha::parse_declared(sha256)?;
            let object_key = format!("{}{path}", key.artifact_prefix());
            let (root, data, meta) = (
                self.root.clone(),
                self.data_dir(key).join(&path),
                self.meta_dir(key).join(&path),
            );
            let file = file.to_owned();
            blocking(move || {
                let mut src = File::open(&file).map_err(|e| {
                    StoreError::Invalid(format!("cannot read {}: {e}", file.display()))
                })?;
                let tmp = TmpPath::new_in(&tmp_dir(&root), &data)
                    .map_err(|e| io_error("writing", &object_key, e))?;
                let mut out = tmp.create().map_err(|e| io_error("writing", &object_key, e))?;
                let (size, actual) = copy_hashing(&mut src, &mut out)
                    .map_err(|e| io_error("writing", &object_key, e))?;
                if actual != declared {
                    return Err(StoreError::Corrupt(format!(
                        "artifact {object_key}: {} has SHA-256 {actual}, not the declared {declared}",
                        file.display()
                    )));
                }
                out.sync_all().map_err(|e| io_error("writing", &object_key, e))?;
                drop(out);
                tmp.persist(&data).map_err(|e| place_error(&object_key, e))?;
                let sidecar = Sidecar {
                    v: SIDECAR_VERSION,
                    size,
                    sha256: actual.clone(),
                };
                let json = serde_json::to_vec(&sidecar)
                    .map_err(|e| StoreError::Invalid(format!("artifact {object_key}: {e}")))?;
                atomic::write_file(&tmp_dir(&root), &meta, &json)
                    .map_err(|e| place_error(&object_key, e))?;
                Ok(StoredArtifact {
                    path,
                    size,
                    sha256: actual,
                })
            })
            .await
        })
    }

    fn list<'a>(
        &'a self,
        key: &'a AttemptKey,
    ) -> BoxFuture<'a, Result<Vec<StoredArtifact>, StoreError>> {
        Box::pin(async move {
            let meta_dir = self.meta_dir(key);
            let prefix = key.artifact_prefix();
            blocking(move || {
                let mut found = Vec::new();
                // (directory, its path relative to the attempt's, with a trailing `/`)
                let mut pending = vec![(meta_dir, String::new())];
                while let Some((dir, rel)) = pending.pop() {
                    let entries = match fs::read_dir(&dir) {
                        Ok(entries) => entries,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_error("listing", &prefix, e)),
                    };
                    for entry in entries {
                        let entry = entry.map_err(|e| io_error("listing", &prefix, e))?;
                        // Every name was stored from a UTF-8 artifact path.
                        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                            continue;
                        };
                        let path = format!("{rel}{name}");
                        let file_type = entry
                            .file_type()
                            .map_err(|e| io_error("listing", &prefix, e))?;
                        if file_type.is_dir() {
                            pending.push((entry.path(), format!("{path}/")));
                            continue;
                        }
                        let object_key = format!("{prefix}{path}");
                        let bytes = match fs::read(entry.path()) {
                            Ok(bytes) => bytes,
                            // Deleted while listing.
                            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(io_error("reading", &object_key, e)),
                        };
                        let sidecar = parse_sidecar(&object_key, &bytes)?;
                        found.push(StoredArtifact {
                            path,
                            size: sidecar.size,
                            sha256: sidecar.sha256,
                        });
                    }
                }
                found.sort_by(|a, b| a.path.cmp(&b.path));
                Ok(found)
            })
            .await
        })
    }

    fn get_file<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let path = check_artifact_path(path)?.to_owned();
            let object_key = format!("{}{path}", key.artifact_prefix());
            let (data, meta_dir, dest) = (
                self.data_dir(key).join(&path),
                self.meta_dir(key),
                dest.to_owned(),
            );
            blocking(move || {
                let sidecar = Self::read_sidecar(&meta_dir, &object_key, &path)?;
                let mut src = File::open(&data).map_err(|e| io_error("reading", &object_key, e))?;
                let local = |e: io::Error| {
                    StoreError::Unavailable(format!("writing {}: {e}", dest.display()))
                };
                let tmp = TmpPath::new_in(atomic::parent_of(&dest), &dest).map_err(local)?;
                let mut out = tmp.create().map_err(local)?;
                let (size, actual) = copy_hashing(&mut src, &mut out).map_err(local)?;
                if size != sidecar.size || actual != sidecar.sha256 {
                    return Err(StoreError::Corrupt(format!(
                        "artifact {object_key}: stored bytes are {size} bytes with SHA-256 \
                         {actual}, its metadata says {} bytes with {}",
                        sidecar.size, sidecar.sha256
                    )));
                }
                out.sync_all().map_err(local)?;
                drop(out);
                tmp.persist(&dest).map_err(local)?;
                Ok(size)
            })
            .await
        })
    }

    fn presign_get<'a>(
        &'a self,
        _key: &'a AttemptKey,
        path: &'a str,
        _valid_for: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        // Files have no URLs: the server streams them with `open`.
        Box::pin(async move { check_artifact_path(path).map(|_| None) })
    }

    fn open<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn ByteSource>, StoreError>> {
        Box::pin(async move {
            let path = check_artifact_path(path)?.to_owned();
            let object_key = format!("{}{path}", key.artifact_prefix());
            let meta_dir = self.meta_dir(key);
            let sidecar = {
                let (object_key, path) = (object_key.clone(), path.clone());
                blocking(move || Self::read_sidecar(&meta_dir, &object_key, &path)).await?
            };
            let file = tokio::fs::File::open(self.data_dir(key).join(&path))
                .await
                .map_err(|e| io_error("reading", &object_key, e))?;
            Ok(Box::new(DirSource {
                file,
                object_key,
                expected: sidecar,
                hasher: Sha256::new(),
                size: 0,
                done: false,
            }) as Box<dyn ByteSource>)
        })
    }

    fn delete_attempt<'a>(&'a self, key: &'a AttemptKey) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let prefix = key.artifact_prefix();
            // Metadata first: an artifact disappears from `list` before its bytes go.
            let dirs = [self.meta_dir(key), self.data_dir(key)];
            blocking(move || {
                for dir in dirs {
                    match fs::remove_dir_all(&dir) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_error("deleting", &prefix, e)),
                    }
                    atomic::sync_dir(atomic::parent_of(&dir))
                        .map_err(|e| io_error("deleting", &prefix, e))?;
                }
                Ok(())
            })
            .await
        })
    }
}

/// An artifact file read in [`PIECE`]s; its size and SHA-256 are checked at the end, so a
/// file changed behind the store's back ends the stream with [`StoreError::Corrupt`]
/// rather than a clean end.
struct DirSource {
    file: tokio::fs::File,
    object_key: String,
    expected: Sidecar,
    hasher: Sha256,
    size: u64,
    done: bool,
}

impl ByteSource for DirSource {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            if self.done {
                return Ok(None);
            }
            let mut piece = Vec::with_capacity(PIECE);
            while piece.len() < PIECE {
                let n = (&mut self.file)
                    .take((PIECE - piece.len()) as u64)
                    .read_buf(&mut piece)
                    .await
                    .map_err(|e| io_error("reading", &self.object_key, e))?;
                if n == 0 {
                    break;
                }
            }
            if !piece.is_empty() {
                self.hasher.update(&piece);
                self.size += piece.len() as u64;
                return Ok(Some(piece));
            }
            self.done = true;
            let actual = sha::finish(std::mem::take(&mut self.hasher));
            if self.size != self.expected.size || actual != self.expected.sha256 {
                return Err(StoreError::Corrupt(format!(
                    "artifact {}: stored bytes are {} bytes with SHA-256 {actual}, its metadata \
                     says {} bytes with {}",
                    self.object_key, self.size, self.expected.size, self.expected.sha256
                )));
            }
            Ok(None)
        })
    }
}
