//! [`DirLogStore`]: an attempt's log chunks and manifest as files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{
    AttemptKey, ChunkRef, LogChunk, LogManifest, LogRead, LogStore, StoreError,
};

use super::{blocking, io_error, tmp_dir};
use crate::atomic;
use crate::chunk;
use crate::manifest;
use crate::read::{self, ChunkSource, ExtentCache, ListedChunk};

/// Logs below a root directory (see [the module](super) for the layout).
#[derive(Debug)]
pub struct DirLogStore {
    root: PathBuf,
    extents: ExtentCache,
}

impl DirLogStore {
    /// A store below `root`; directories are created as they are needed.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirLogStore {
            root: root.into(),
            extents: ExtentCache::default(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn write(&self, object_key: String, bytes: Vec<u8>) -> Result<(), StoreError> {
        let root = self.root.clone();
        blocking(move || {
            atomic::write_file(&tmp_dir(&root), &root.join(&object_key), &bytes)
                .map_err(|e| io_error("writing", &object_key, e))
        })
        .await
    }
}

impl ChunkSource for DirLogStore {
    async fn manifest(&self, key: &AttemptKey) -> Result<Option<LogManifest>, StoreError> {
        let object_key = manifest::manifest_key(key);
        let path = self.root.join(&object_key);
        let bytes = blocking(move || match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("reading", &object_key, e)),
        })
        .await?;
        bytes
            .map(|b| manifest::decode(&manifest::manifest_key(key), &b))
            .transpose()
    }

    async fn list_chunks(&self, key: &AttemptKey) -> Result<Vec<ListedChunk>, StoreError> {
        let prefix = key.log_prefix();
        let dir = self.root.join(&prefix);
        blocking(move || {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_error("listing", &prefix, e)),
            };
            let mut chunks = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_error("listing", &prefix, e))?;
                let name = entry.file_name();
                let Some(first_seq) = name.to_str().and_then(chunk::parse_chunk_name) else {
                    continue;
                };
                let key = format!("{prefix}{}", chunk::chunk_name(first_seq));
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    // Replaced between the listing and now: the new file is seen next time.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error("reading", &key, e)),
                };
                chunks.push(ListedChunk {
                    fingerprint: fingerprint(&meta),
                    key,
                    first_seq,
                });
            }
            Ok(chunks)
        })
        .await
    }

    async fn fetch_chunk(&self, chunk: &ListedChunk) -> Result<Vec<u8>, StoreError> {
        let key = chunk.key.clone();
        let path = self.root.join(&key);
        blocking(move || fs::read(&path).map_err(|e| io_error("reading", &key, e))).await
    }
}

/// Changes whenever a chunk file is replaced: a rename brings a new inode, a new size and
/// a new modification time.
fn fingerprint(meta: &fs::Metadata) -> String {
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let inode = 0u64;
    format!("{}:{:?}:{inode}", meta.len(), meta.modified().ok())
}

impl LogStore for DirLogStore {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn put_chunk<'a>(
        &'a self,
        key: &'a AttemptKey,
        chunk: &'a LogChunk,
    ) -> BoxFuture<'a, Result<ChunkRef, StoreError>> {
        Box::pin(async move {
            let (bytes, chunk_ref) = chunk::encode(chunk)?;
            self.write(chunk::chunk_key(key, chunk_ref.first_seq), bytes)
                .await?;
            Ok(chunk_ref)
        })
    }

    fn finish<'a>(
        &'a self,
        key: &'a AttemptKey,
        manifest: &'a LogManifest,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let bytes = manifest::encode(manifest)?;
            self.write(manifest::manifest_key(key), bytes).await
        })
    }

    fn manifest<'a>(
        &'a self,
        key: &'a AttemptKey,
    ) -> BoxFuture<'a, Result<Option<LogManifest>, StoreError>> {
        Box::pin(ChunkSource::manifest(self, key))
    }

    fn read<'a>(
        &'a self,
        key: &'a AttemptKey,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'a, Result<LogRead, StoreError>> {
        Box::pin(read::read_log(self, &self.extents, key, after, limit))
    }
}
