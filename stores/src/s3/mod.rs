//! The production adapters: logs and artifacts in an S3 bucket (AWS, or any S3-compatible
//! store through [`S3Config::endpoint`] and [`S3Config::path_style`]).
//!
//! Keys are `{prefix}` followed by the layout of `core/src/store.rs`. Log chunks and
//! manifests are single `PutObject`s in the [`chunk`](crate::chunk) encoding. An artifact is
//! one object with its SHA-256 as user metadata (`x-amz-meta-sha256`), so it can never
//! disagree with a sidecar object; an upload is checked against the declared hash before it
//! becomes visible (see [`S3ArtifactStore`]).
//!
//! Both stores share one `aws_sdk_s3::Client` (one connection pool), built by
//! [`S3Stores::connect`]. Files: `config.rs` (the configuration), `client.rs` (the client
//! and error mapping), `log.rs`, `artifact.rs`.

mod artifact;
mod client;
mod config;
mod log;

use flotilla_core::store::StoreError;

pub use artifact::{MAX_PARTS_IN_FLIGHT, MAX_PRESIGN, PART_SIZE, S3ArtifactStore};
pub use config::{S3Config, S3ConfigError, default_region};
pub use log::S3LogStore;

use client::{S3Client, map_error};

/// The log store and the artifact store of one bucket, sharing one client.
#[derive(Debug)]
pub struct S3Stores {
    /// Where logs go.
    pub logs: S3LogStore,
    /// Where artifacts go.
    pub artifacts: S3ArtifactStore,
}

impl S3Stores {
    /// Validates `config`, reads the credentials and builds the client. Makes no request:
    /// see [`S3Stores::check_bucket`].
    pub fn connect(config: &S3Config) -> Result<S3Stores, S3ConfigError> {
        let client = S3Client::new(config)?;
        Ok(S3Stores {
            logs: S3LogStore::new(client.clone()),
            artifacts: S3ArtifactStore::new(client),
        })
    }

    /// Checks that the bucket exists and the credentials may use it (`HeadBucket`), so a
    /// misconfiguration shows at start-up rather than at the first build.
    pub async fn check_bucket(&self) -> Result<(), StoreError> {
        let client = self.artifacts.client();
        client
            .inner
            .head_bucket()
            .bucket(&*client.bucket)
            .send()
            .await
            .map_err(|e| map_error("HeadBucket", &format!("bucket {}", client.bucket), e))?;
        Ok(())
    }
}
