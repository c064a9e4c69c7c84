//! The `RepoSource` port: reading one file of a repository at one commit.
//!
//! The federator loads `.ci.yaml` through it after a webhook is acknowledged. Adapters (in the
//! federator): git over `file://`/`http(s)://`, and the GitHub and GitLab file APIs. The URL
//! always comes from the project's configuration, never from a webhook payload.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::forge::Provider;

/// A boxed, sendable future, so the port can be used as `dyn RepoSource`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which repository to read, from the project's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoLocation {
    /// The forge, which decides the API adapter.
    pub provider: Provider,
    /// The clone URL (`https://github.com/org/repo.git`, `file:///srv/git/repo.git`, …).
    pub url: String,
}

/// One commit to read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The full ref the commit was pushed to (`refs/heads/main`, `refs/tags/v1`); fetched
    /// when the commit cannot be fetched by id, and resolved when `sha` is `None`.
    pub git_ref: String,
    /// The commit (40 hex digits); `None` means "the ref's current head".
    pub sha: Option<String>,
}

/// A file read at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFile {
    /// The commit actually read (the ref's head when no sha was asked for).
    pub sha: String,
    /// The file's bytes, or `None` when the commit has no such file.
    pub contents: Option<Vec<u8>>,
}

/// Why a file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoError {
    /// The repository, ref or commit does not exist (or we may not see it).
    #[error("not found: {0}")]
    NotFound(String),
    /// Credentials were refused.
    #[error("access denied: {0}")]
    Denied(String),
    /// The forge or server failed or timed out; worth trying again.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The project's configuration cannot work (bad URL, unsupported scheme…).
    #[error("invalid repository configuration: {0}")]
    Invalid(String),
}

impl RepoError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RepoError::Unavailable(_))
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RepoError::NotFound(_) => "not_found",
            RepoError::Denied(_) => "denied",
            RepoError::Unavailable(_) => "unavailable",
            RepoError::Invalid(_) => "invalid",
        }
    }
}

/// Reads files from repositories at a commit.
pub trait RepoSource: Send + Sync + std::fmt::Debug + 'static {
    /// Reads `path` (relative to the repository root) at `rev` of `repo`.
    fn read_file<'a>(
        &'a self,
        repo: &'a RepoLocation,
        rev: &'a Revision,
        path: &'a str,
    ) -> BoxFuture<'a, Result<FetchedFile, RepoError>>;
}
