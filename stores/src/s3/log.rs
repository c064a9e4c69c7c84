//! [`S3LogStore`]: an attempt's log chunks and manifest as objects.

use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{
    AttemptKey, ChunkRef, LogChunk, LogManifest, LogRead, LogStore, StoreError,
};

use super::client::S3Client;
use crate::chunk;
use crate::manifest;
use crate::read::{self, ChunkSource, ExtentCache, ListedChunk};

/// Logs in an S3 bucket; made by [`S3Stores::connect`](super::S3Stores::connect).
#[derive(Debug)]
pub struct S3LogStore {
    client: S3Client,
    extents: ExtentCache,
}

impl S3LogStore {
    pub(crate) fn new(client: S3Client) -> Self {
        S3LogStore {
            client,
            extents: ExtentCache::default(),
        }
    }
}

impl ChunkSource for S3LogStore {
    async fn manifest(&self, key: &AttemptKey) -> Result<Option<LogManifest>, StoreError> {
        let object_key = manifest::manifest_key(key);
        match self.client.get_bytes(&object_key).await? {
            Some(bytes) => manifest::decode(&object_key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    async fn list_chunks(&self, key: &AttemptKey) -> Result<Vec<ListedChunk>, StoreError> {
        // Listing by `…/chunk-` leaves out the manifest; S3 lists in key order, and the
        // zero-padded names sort by first line.
        let prefix = key.log_prefix();
        let objects = self.client.list(&format!("{prefix}chunk-")).await?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let first_seq = o
                    .layout_key
                    .strip_prefix(&prefix)
                    .and_then(chunk::parse_chunk_name)?;
                Some(ListedChunk {
                    key: o.layout_key,
                    first_seq,
                    fingerprint: o.fingerprint,
                })
            })
            .collect())
    }

    async fn fetch_chunk(&self, chunk: &ListedChunk) -> Result<Vec<u8>, StoreError> {
        // Listed a moment ago: gone now means deleted behind our back.
        self.client
            .get_bytes(&chunk.key)
            .await?
            .ok_or_else(|| StoreError::NotFound(chunk.key.clone()))
    }
}

impl LogStore for S3LogStore {
    fn name(&self) -> &'static str {
        "s3"
    }

    fn put_chunk<'a>(
        &'a self,
        key: &'a AttemptKey,
        chunk: &'a LogChunk,
    ) -> BoxFuture<'a, Result<ChunkRef, StoreError>> {
        Box::pin(async move {
            let (bytes, chunk_ref) = chunk::encode(chunk)?;
            let object_key = chunk::chunk_key(key, chunk_ref.first_seq);
            self.client
                .put_bytes(&object_key, bytes, "application/octet-stream")
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
            self.client
                .put_bytes(&manifest::manifest_key(key), bytes, "application/json")
                .await
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
