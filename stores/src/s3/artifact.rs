//! [`S3ArtifactStore`]: one object per artifact, its SHA-256 as object metadata.
//!
//! Uploads keep memory bounded whatever the file's size: a file under [`PART_SIZE`] is one
//! `PutObject`; a larger one is a multipart upload whose parts are read one after another
//! from the file at their offsets (and hashed in that order), then uploaded concurrently,
//! at most [`MAX_PARTS_IN_FLIGHT`] at a time: at most 5 part buffers (80 MiB) exist at once,
//! 4 uploading and 1 being read, and they are reused from part to part (a buffer comes back
//! once its upload is done), so the allocator is not asked for 16 MiB again and again (glibc
//! keeps such freed blocks resident in per-thread arenas: peak memory then depends on
//! thread timing rather than on this code). The hash of what was sent is compared with the declared one
//! before `CompleteMultipartUpload`: on a mismatch the upload is aborted and nothing becomes
//! visible. A failed upload is aborted too (a bucket lifecycle rule that aborts incomplete
//! multipart uploads after a day catches what a crash leaves).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::Bytes;
use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{
    ArtifactStore, AttemptKey, ByteSource, StoreError, StoredArtifact, check_artifact_path,
};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use super::client::{S3Client, map_error};
use crate::atomic::{self, TmpPath};
use crate::sha;

/// The size of every multipart part but the last; files under it are one `PutObject`.
pub const PART_SIZE: usize = 16 << 20;

/// Parts uploading at once.
pub const MAX_PARTS_IN_FLIGHT: usize = 4;

/// The longest a presigned URL may stay valid.
pub const MAX_PRESIGN: Duration = Duration::from_secs(15 * 60);

/// S3's limit on parts per upload (so at most 160 GiB per artifact).
const MAX_PARTS: u64 = 10_000;

/// The user metadata key holding the hex SHA-256 (`x-amz-meta-sha256`).
const SHA256_META: &str = "sha256";

/// `HeadObject`s in flight while listing.
const LIST_HEADS_IN_FLIGHT: usize = 8;

/// Keys per `DeleteObjects` request (S3's limit).
const DELETE_BATCH: usize = 1000;

/// Artifacts in an S3 bucket; made by [`S3Stores::connect`](super::S3Stores::connect).
#[derive(Debug)]
pub struct S3ArtifactStore {
    client: S3Client,
}

impl S3ArtifactStore {
    /// GetObject of artifact `path`: its layout key, the response (the body still to read)
    /// and the SHA-256 recorded with it.
    async fn get_object(
        &self,
        key: &AttemptKey,
        path: &str,
    ) -> Result<
        (
            String,
            aws_sdk_s3::operation::get_object::GetObjectOutput,
            String,
        ),
        StoreError,
    > {
        let path = check_artifact_path(path)?;
        let object_key = format!("{}{path}", key.artifact_prefix());
        let out = self
            .client
            .inner
            .get_object()
            .bucket(&*self.client.bucket)
            .key(self.client.object_key(&object_key))
            .send()
            .await
            .map_err(|e| map_error("GetObject", &object_key, e))?;
        let expected = recorded_sha256(&object_key, out.metadata())?;
        Ok((object_key, out, expected))
    }

    pub(crate) fn new(client: S3Client) -> Self {
        S3ArtifactStore { client }
    }

    pub(crate) fn client(&self) -> &S3Client {
        &self.client
    }

    /// A single `PutObject` of a small file.
    async fn put_small(
        &self,
        object_key: &str,
        file: Arc<File>,
        declared: &str,
    ) -> Result<u64, StoreError> {
        let (bytes, hasher) = read_part(file, 0, Sha256::new(), Vec::new(), object_key).await?;
        let actual = sha::finish(hasher);
        if actual != declared {
            return Err(mismatch(object_key, &actual, declared));
        }
        let size = bytes.len() as u64;
        self.client
            .inner
            .put_object()
            .bucket(&*self.client.bucket)
            .key(self.client.object_key(object_key))
            .content_type("application/octet-stream")
            .metadata(SHA256_META, declared)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| map_error("PutObject", object_key, e))?;
        Ok(size)
    }

    /// A multipart upload of a large file, aborted on any failure.
    async fn put_multipart(
        &self,
        object_key: &str,
        file: Arc<File>,
        declared: &str,
    ) -> Result<u64, StoreError> {
        let bucket_key = self.client.object_key(object_key);
        let created = self
            .client
            .inner
            .create_multipart_upload()
            .bucket(&*self.client.bucket)
            .key(&bucket_key)
            .content_type("application/octet-stream")
            .metadata(SHA256_META, declared)
            .send()
            .await
            .map_err(|e| map_error("CreateMultipartUpload", object_key, e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(StoreError::Unavailable(format!(
                "s3 CreateMultipartUpload {object_key}: no upload id in the response"
            )));
        };
        let uploaded = self
            .upload_parts(object_key, &bucket_key, &upload_id, file, declared)
            .await;
        let completed = match uploaded {
            Ok((parts, size)) => self
                .client
                .inner
                .complete_multipart_upload()
                .bucket(&*self.client.bucket)
                .key(&bucket_key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| size)
                .map_err(|e| map_error("CompleteMultipartUpload", object_key, e)),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            let aborted = self
                .client
                .inner
                .abort_multipart_upload()
                .bucket(&*self.client.bucket)
                .key(&bucket_key)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(e) = aborted {
                tracing::warn!(
                    key = %object_key,
                    error = %map_error("AbortMultipartUpload", object_key, e),
                    "Could not abort a failed multipart upload; a lifecycle rule must remove it."
                );
            }
        }
        completed
    }

    /// Reads and hashes the parts in order and uploads them, at most
    /// [`MAX_PARTS_IN_FLIGHT`] at once. Returns the parts and the size once the hash of
    /// what was sent is the declared one.
    async fn upload_parts(
        &self,
        object_key: &str,
        bucket_key: &str,
        upload_id: &str,
        file: Arc<File>,
        declared: &str,
    ) -> Result<(Vec<CompletedPart>, u64), StoreError> {
        // Dropping the set (on an error) aborts the uploads still running.
        let mut in_flight: JoinSet<Result<Uploaded, StoreError>> = JoinSet::new();
        let mut parts = Vec::new();
        // Buffers of finished uploads, for the next parts.
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        for part_number in 1u64.. {
            while in_flight.len() >= MAX_PARTS_IN_FLIGHT {
                let (part, buffer) = next_part(&mut in_flight).await?;
                parts.push(part);
                spare.extend(buffer);
            }
            let buffer = spare.pop().unwrap_or_default();
            let (bytes, h) = read_part(file.clone(), offset, hasher, buffer, object_key).await?;
            hasher = h;
            let len = bytes.len();
            if len == 0 && part_number > 1 {
                break;
            }
            if part_number > MAX_PARTS {
                return Err(StoreError::Invalid(format!(
                    "artifact {object_key}: larger than {MAX_PARTS} parts of {PART_SIZE} bytes"
                )));
            }
            offset += len as u64;
            let body = Bytes::from(bytes);
            let request = self
                .client
                .inner
                .upload_part()
                .bucket(&*self.client.bucket)
                .key(bucket_key)
                .upload_id(upload_id)
                .part_number(i32::try_from(part_number).unwrap_or(i32::MAX))
                .content_length(len as i64)
                .body(ByteStream::from(body.clone()));
            let layout_key = object_key.to_owned();
            in_flight.spawn(async move {
                let out = request
                    .send()
                    .await
                    .map_err(|e| map_error("UploadPart", &layout_key, e))?;
                let part = CompletedPart::builder()
                    .part_number(i32::try_from(part_number).unwrap_or(i32::MAX))
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build();
                // The request is done, so the SDK holds no copy of the body any more: the
                // buffer is ours again (should it not be, the next part allocates one).
                Ok((part, body.try_into_mut().ok().map(Vec::from)))
            });
            if len < PART_SIZE {
                break;
            }
        }
        while !in_flight.is_empty() {
            parts.push(next_part(&mut in_flight).await?.0);
        }
        parts.sort_by_key(|p| p.part_number());
        let actual = sha::finish(hasher);
        if actual != declared {
            return Err(mismatch(object_key, &actual, declared));
        }
        Ok((parts, offset))
    }

    /// `HeadObject`: the size and recorded SHA-256 of an artifact.
    async fn head(&self, object_key: &str) -> Result<(u64, String), StoreError> {
        let out = self
            .client
            .inner
            .head_object()
            .bucket(&*self.client.bucket)
            .key(self.client.object_key(object_key))
            .send()
            .await
            .map_err(|e| map_error("HeadObject", object_key, e))?;
        let sha256 = recorded_sha256(object_key, out.metadata())?;
        let size = u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0);
        Ok((size, sha256))
    }
}

/// An uploaded part, and its buffer when it can be reused.
type Uploaded = (CompletedPart, Option<Vec<u8>>);

/// Waits for one upload to end.
async fn next_part(
    in_flight: &mut JoinSet<Result<Uploaded, StoreError>>,
) -> Result<Uploaded, StoreError> {
    match in_flight.join_next().await {
        Some(Ok(part)) => part,
        Some(Err(e)) => Err(StoreError::Unavailable(format!(
            "part upload task failed: {e}"
        ))),
        None => Err(StoreError::Unavailable("no part upload to wait for".into())),
    }
}

/// Reads up to [`PART_SIZE`] bytes at `offset` (fewer only at the end of the file) into
/// `buf` (reused, or empty) and adds them to `hasher`, on the blocking pool.
async fn read_part(
    file: Arc<File>,
    offset: u64,
    mut hasher: Sha256,
    mut buf: Vec<u8>,
    object_key: &str,
) -> Result<(Vec<u8>, Sha256), StoreError> {
    let read = tokio::task::spawn_blocking(move || -> io::Result<(Vec<u8>, Sha256)> {
        // A reused full buffer needs no zeroing; a fresh one is zeroed lazily by the OS.
        buf.resize(PART_SIZE, 0);
        let mut filled = 0;
        while filled < PART_SIZE {
            match read_at(&file, &mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        buf.truncate(filled);
        hasher.update(&buf);
        Ok((buf, hasher))
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("file task failed: {e}")))?;
    read.map_err(|e| {
        StoreError::Unavailable(format!(
            "artifact {object_key}: reading the file to upload: {e}"
        ))
    })
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

fn mismatch(object_key: &str, actual: &str, declared: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "artifact {object_key}: the uploaded bytes have SHA-256 {actual}, not the declared {declared}"
    ))
}

/// The SHA-256 an object's metadata records; an object without one was not stored by us.
fn recorded_sha256(
    object_key: &str,
    metadata: Option<&HashMap<String, String>>,
) -> Result<String, StoreError> {
    metadata
        .and_then(|m| m.get(SHA256_META))
        .and_then(|s| sha::parse_declared(s).ok())
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "artifact {object_key}: no SHA-256 in its metadata (x-amz-meta-{SHA256_META})"
            ))
        })
}

impl ArtifactStore for S3ArtifactStore {
    fn name(&self) -> &'static str {
        "s3"
    }

    fn put_file<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
        file: &'a Path,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<StoredArtifact, StoreError>> {
        Box::pin(async move {
            let path = check_artifact_path(path)?;
            let declared = sha::parse_declared(sha256)?;
            let object_key = format!("{}{path}", key.artifact_prefix());
            let local = file.to_owned();
            let (file, len) = tokio::task::spawn_blocking(move || {
                let f = File::open(&local)?;
                let len = f.metadata()?.len();
                Ok::<_, io::Error>((f, len))
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("file task failed: {e}")))?
            .map_err(|e| StoreError::Invalid(format!("cannot read {}: {e}", file.display())))?;
            if len > MAX_PARTS * PART_SIZE as u64 {
                return Err(StoreError::Invalid(format!(
                    "artifact {object_key}: {len} bytes is above the {} byte limit",
                    MAX_PARTS * PART_SIZE as u64
                )));
            }
            let file = Arc::new(file);
            let size = if len < PART_SIZE as u64 {
                self.put_small(&object_key, file, &declared).await?
            } else {
                self.put_multipart(&object_key, file, &declared).await?
            };
            Ok(StoredArtifact {
                path: path.to_owned(),
                size,
                sha256: declared,
            })
        })
    }

    fn list<'a>(
        &'a self,
        key: &'a AttemptKey,
    ) -> BoxFuture<'a, Result<Vec<StoredArtifact>, StoreError>> {
        Box::pin(async move {
            let prefix = key.artifact_prefix();
            let objects = self.client.list(&prefix).await?;
            // One HeadObject per artifact for its metadata (ListObjectsV2 shows none): no
            // index object to keep consistent with the artifacts themselves.
            let heads = futures::stream::iter(objects)
                .map(|o| async move {
                    let result = self.head(&o.layout_key).await;
                    (o.layout_key, result)
                })
                .buffered(LIST_HEADS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await;
            let mut found = Vec::with_capacity(heads.len());
            for (layout_key, head) in heads {
                let (size, sha256) = match head {
                    Ok(head) => head,
                    // Deleted between the listing and the head.
                    Err(StoreError::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                let path = layout_key.strip_prefix(&prefix).unwrap_or(&layout_key);
                found.push(StoredArtifact {
                    path: path.to_owned(),
                    size,
                    sha256,
                });
            }
            found.sort_by(|a, b| a.path.cmp(&b.path));
            Ok(found)
        })
    }

    fn get_file<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let (object_key, out, expected) = self.get_object(key, path).await?;
            let local =
                |e: io::Error| StoreError::Unavailable(format!("writing {}: {e}", dest.display()));
            let tmp = TmpPath::new_in(atomic::parent_of(dest), dest).map_err(local)?;
            let file = tokio::fs::File::from_std(tmp.create().map_err(local)?);
            let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
            let mut body = out.body;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(bytes) = body.try_next().await.map_err(|e| {
                StoreError::Unavailable(format!("s3 GetObject {object_key}: reading the body: {e}"))
            })? {
                hasher.update(&bytes);
                size += bytes.len() as u64;
                writer.write_all(&bytes).await.map_err(local)?;
            }
            let actual = sha::finish(hasher);
            if actual != expected {
                return Err(StoreError::Corrupt(format!(
                    "artifact {object_key}: the stored bytes have SHA-256 {actual}, its metadata \
                     says {expected}"
                )));
            }
            writer.flush().await.map_err(local)?;
            let file = writer.into_inner();
            file.sync_all().await.map_err(local)?;
            drop(file);
            let dest = dest.to_owned();
            tokio::task::spawn_blocking(move || tmp.persist(&dest).map_err(local_owned(&dest)))
                .await
                .map_err(|e| StoreError::Unavailable(format!("file task failed: {e}")))??;
            Ok(size)
        })
    }

    fn presign_get<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
        valid_for: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let path = check_artifact_path(path)?;
            if valid_for.is_zero() || valid_for > MAX_PRESIGN {
                return Err(StoreError::Invalid(format!(
                    "a download URL may be valid for 1 s to {} s, not {} s",
                    MAX_PRESIGN.as_secs(),
                    valid_for.as_secs()
                )));
            }
            let object_key = format!("{}{path}", key.artifact_prefix());
            // A URL for a missing artifact would only 404 later: say so now.
            self.head(&object_key).await?;
            let config = PresigningConfig::expires_in(valid_for)
                .map_err(|e| StoreError::Invalid(format!("presigning {object_key}: {e}")))?;
            let request = self
                .client
                .inner
                .get_object()
                .bucket(&*self.client.bucket)
                .key(self.client.object_key(&object_key))
                .presigned(config)
                .await
                .map_err(|e| map_error("GetObject (presign)", &object_key, e))?;
            Ok(Some(request.uri().to_owned()))
        })
    }

    fn open<'a>(
        &'a self,
        key: &'a AttemptKey,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn ByteSource>, StoreError>> {
        Box::pin(async move {
            let (object_key, out, expected) = self.get_object(key, path).await?;
            Ok(Box::new(S3Source {
                body: out.body,
                object_key,
                expected,
                hasher: Sha256::new(),
                done: false,
            }) as Box<dyn ByteSource>)
        })
    }

    fn delete_attempt<'a>(&'a self, key: &'a AttemptKey) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let prefix = key.artifact_prefix();
            let objects = self.client.list(&prefix).await?;
            for batch in objects.chunks(DELETE_BATCH) {
                let ids = batch
                    .iter()
                    .map(|o| {
                        ObjectIdentifier::builder()
                            .key(self.client.object_key(&o.layout_key))
                            .build()
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| StoreError::Invalid(format!("deleting {prefix}: {e}")))?;
                let delete = Delete::builder()
                    .set_objects(Some(ids))
                    .quiet(true)
                    .build()
                    .map_err(|e| StoreError::Invalid(format!("deleting {prefix}: {e}")))?;
                let out = self
                    .client
                    .inner
                    .delete_objects()
                    .bucket(&*self.client.bucket)
                    .delete(delete)
                    .send()
                    .await
                    .map_err(|e| map_error("DeleteObjects", &prefix, e))?;
                if let Some(failed) = out.errors().first() {
                    return Err(StoreError::Unavailable(format!(
                        "s3 DeleteObjects {prefix}: {} of {} keys not deleted, the first {} ({})",
                        out.errors().len(),
                        batch.len(),
                        failed.key().unwrap_or("?"),
                        failed.code().unwrap_or("?")
                    )));
                }
            }
            Ok(())
        })
    }
}

fn local_owned(dest: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("writing {}: {e}", dest.display()))
}

/// An object's body as it arrives; its SHA-256 is checked at the end, so an object changed
/// behind the store's back ends the stream with [`StoreError::Corrupt`] rather than a clean
/// end.
struct S3Source {
    body: ByteStream,
    object_key: String,
    expected: String,
    hasher: Sha256,
    done: bool,
}

impl ByteSource for S3Source {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            if self.done {
                return Ok(None);
            }
            let next = self.body.try_next().await.map_err(|e| {
                StoreError::Unavailable(format!(
                    "s3 GetObject {}: reading the body: {e}",
                    self.object_key
                ))
            })?;
            if let Some(bytes) = next {
                self.hasher.update(&bytes);
                return Ok(Some(bytes.to_vec()));
            }
            self.done = true;
            let actual = sha::finish(std::mem::take(&mut self.hasher));
            if actual != self.expected {
                return Err(StoreError::Corrupt(format!(
                    "artifact {}: the stored bytes have SHA-256 {actual}, its metadata says {}",
                    self.object_key, self.expected
                )));
            }
            Ok(None)
        })
    }
}
