//! The one `aws_sdk_s3::Client` both S3 adapters share, the key prefix, the few requests both
//! make, and the mapping of S3 failures onto [`StoreError`].

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use flotilla_core::store::StoreError;

use super::config::{S3Config, S3ConfigError};

/// How long connecting may take before the attempt counts as failed (and is retried).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for one bucket below one key prefix.
#[derive(Debug, Clone)]
pub(crate) struct S3Client {
    pub(crate) inner: aws_sdk_s3::Client,
    pub(crate) bucket: Arc<str>,
    prefix: Arc<str>,
}

/// An object as `ListObjectsV2` shows it.
#[derive(Debug, Clone)]
pub(crate) struct ListedObject {
    /// Its layout key (the prefix removed).
    pub(crate) layout_key: String,
    /// Changes whenever the object is replaced: ETag, size and modification time (S3's ETag
    /// alone would do; some S3-compatible stores list no ETag).
    pub(crate) fingerprint: String,
}

impl S3Client {
    /// Builds the client: HTTP 1 over hyper 1, TLS by rustls with ring, the SDK's standard
    /// retries (3 attempts with backoff) and stalled-stream protection. Makes no request.
    pub(crate) fn new(config: &S3Config) -> Result<Self, S3ConfigError> {
        config.validate()?;
        let keys = config.credentials()?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(config.region.clone()))
            .credentials_provider(Credentials::new(
                keys.access_key_id,
                keys.secret_access_key,
                None,
                None,
                "flotilla-config",
            ))
            .force_path_style(config.path_style)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(S3Client {
            inner: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: config.bucket.as_str().into(),
            prefix: config.key_prefix().into(),
        })
    }

    /// The bucket key of a layout key.
    pub(crate) fn object_key(&self, layout_key: &str) -> String {
        format!("{}{layout_key}", self.prefix)
    }

    /// An object's bytes, `None` when it does not exist.
    pub(crate) async fn get_bytes(&self, layout_key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let result = self
            .inner
            .get_object()
            .bucket(&*self.bucket)
            .key(self.object_key(layout_key))
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                return match map_error("GetObject", layout_key, e) {
                    StoreError::NotFound(_) => Ok(None),
                    other => Err(other),
                };
            }
        };
        let bytes = out.body.collect().await.map_err(|e| {
            StoreError::Unavailable(format!("s3 GetObject {layout_key}: reading the body: {e}"))
        })?;
        Ok(Some(bytes.to_vec()))
    }

    /// Stores `bytes` as one object.
    pub(crate) async fn put_bytes(
        &self,
        layout_key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), StoreError> {
        self.inner
            .put_object()
            .bucket(&*self.bucket)
            .key(self.object_key(layout_key))
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| map_error("PutObject", layout_key, e))?;
        Ok(())
    }

    /// Every object whose layout key starts with `layout_prefix`, in key order (every page).
    pub(crate) async fn list(&self, layout_prefix: &str) -> Result<Vec<ListedObject>, StoreError> {
        let mut pages = self
            .inner
            .list_objects_v2()
            .bucket(&*self.bucket)
            .prefix(self.object_key(layout_prefix))
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| map_error("ListObjectsV2", layout_prefix, e))?;
            for object in page.contents() {
                let Some(layout_key) = object.key().and_then(|k| k.strip_prefix(&*self.prefix))
                else {
                    continue;
                };
                objects.push(ListedObject {
                    layout_key: layout_key.to_owned(),
                    fingerprint: format!(
                        "{}:{}:{:?}",
                        object.e_tag().unwrap_or(""),
                        object.size().unwrap_or(-1),
                        object.last_modified()
                    ),
                });
            }
        }
        Ok(objects)
    }
}

/// Maps a failed request on object `layout_key` onto the port's errors: a missing key is
/// [`StoreError::NotFound`]; what trying again may cure (5xx, throttling, timeouts, failed
/// connections, a bad response, and 403s, which a fixed policy or clock cures: a log chunk
/// must be kept and retried, not dropped) is [`StoreError::Unavailable`]; any other refusal
/// is [`StoreError::Invalid`].
pub(crate) fn map_error<E>(op: &str, layout_key: &str, err: SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let text = format!("s3 {op} {layout_key}: {}", DisplayErrorContext(&err));
    match err {
        SdkError::ConstructionFailure(_) => StoreError::Invalid(text),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Unavailable(text)
        }
        _ => match (status, code.as_deref()) {
            (_, Some("NoSuchBucket")) => StoreError::Unavailable(text),
            (Some(404), _) | (_, Some("NoSuchKey" | "NotFound" | "NoSuchUpload")) => {
                StoreError::NotFound(layout_key.to_owned())
            }
            (Some(403 | 408 | 429), _)
            | (Some(500..), _)
            | (_, Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")) => {
                StoreError::Unavailable(text)
            }
            _ => StoreError::Invalid(text),
        },
    }
}
