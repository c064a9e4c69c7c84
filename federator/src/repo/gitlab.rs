//! [`GitlabApi`]: reads one file through the GitLab repository files API (gitlab.com or a
//! self-managed server), so a GitLab project needs no clone at all.
//!
//! - The file: `GET {base}/api/v4/projects/{namespace%2Fproject}/repository/files/
//!   {dir%2Ffile}/raw?ref={sha}`, which answers with the file's bytes. The project and the
//!   file path are each one URL-encoded segment, as GitLab requires.
//! - A ref (when no sha was given): `GET .../repository/commits/{ref}` → JSON `{"id": sha}`.
//! - `{base}` is the project URL's scheme and host unless configured, so one adapter serves a
//!   self-managed server without repeating its address.
//! - The token goes in `Authorization: Bearer`, which GitLab accepts for personal, project and
//!   group access tokens. `PRIVATE-TOKEN` would work too, but reqwest drops only the standard
//!   `Authorization` header on a redirect to another host, so Bearer keeps the token home.
//! - A 404 for the file means "no such file" only when the commit is known to exist (after
//!   resolving a ref, or after asking for the commit); otherwise `NotFound`. Other statuses map
//!   as in the GitHub adapter (401/403 → `Denied`, rate limiting, 429 and 5xx →
//!   `Unavailable`).

use std::time::Duration;

use flotilla_core::repo::{BoxFuture, FetchedFile, RepoError, RepoLocation, RepoSource, Revision};
use reqwest::StatusCode;
use serde::Deserialize;
use url::Url;

use super::{
    RepoSetupError, Token, authority, check_host, check_path, check_ref, check_sha,
    default_max_file_bytes, default_request_timeout_secs, parse_api_base, project_segments,
    read_body, send, status_error,
};

/// GitLab nests groups up to 20 deep; the project's own name makes 21.
const MAX_PROJECT_SEGMENTS: usize = 21;

/// Reads files through the GitLab files API with a token.
#[derive(Debug, Clone)]
pub struct GitlabApi {
    client: reqwest::Client,
    /// `host[:port]` of the project URLs served, lowercase.
    host: String,
    /// The configured base; `None` means the project URL's scheme and host.
    api_base: Option<Url>,
    token: Token,
    timeout: Duration,
    max_file_bytes: u64,
}

/// The part of `GET .../repository/commits/{ref}` we read.
#[derive(Deserialize)]
struct Commit {
    id: String,
}

impl GitlabApi {
    /// An adapter for projects on `host` (`gitlab.com`, or a self-managed server's
    /// `host[:port]`). `api_base` defaults to the project URL's scheme and host. Requests time
    /// out after 30 s and files over 1 MiB are refused unless set otherwise.
    pub fn new(host: &str, api_base: Option<&str>, token: Token) -> Result<Self, RepoSetupError> {
        check_host(host, "the GitLab host")?;
        Ok(GitlabApi {
            client: super::http_client()?,
            host: host.to_ascii_lowercase(),
            api_base: api_base
                .map(|b| parse_api_base(b, "the GitLab API base"))
                .transpose()?,
            token,
            timeout: Duration::from_secs(default_request_timeout_secs()),
            max_file_bytes: default_max_file_bytes(),
        })
    }

    /// How long one request may take, from connecting to the end of the body.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The largest file returned; a larger one is `Invalid`.
    pub fn with_max_file_bytes(mut self, max: u64) -> Self {
        self.max_file_bytes = max;
        self
    }

    /// Whether a project URL is on the host this adapter serves.
    pub(super) fn serves(&self, url: &Url) -> bool {
        matches!(url.scheme(), "http" | "https") && authority(url).as_deref() == Some(&self.host)
    }

    fn get(&self, url: Url) -> reqwest::RequestBuilder {
        self.client
            .get(url)
            .timeout(self.timeout)
            .bearer_auth(self.token.expose())
    }

    /// The commit a ref (or sha) names; 404 is `NotFound`.
    async fn resolve(&self, project: &Project, r: &str) -> Result<String, RepoError> {
        let what = format!("GitLab {} commit {r}", project.id);
        let url = project.endpoint(&["repository", "commits", r])?;
        let resp = send(self.get(url), &what).await?;
        match resp.status() {
            s if s.is_success() => {
                let body = read_body(resp, 64 * 1024, &what).await?;
                let commit: Commit = serde_json::from_slice(&body).map_err(|_| {
                    RepoError::Unavailable(format!("{what}: the answer is not a commit"))
                })?;
                check_sha(&commit.id).map_err(|_| {
                    RepoError::Unavailable(format!("{what}: the answer is not a commit id"))
                })
            }
            StatusCode::NOT_FOUND => Err(RepoError::NotFound(format!(
                "{what}: no such commit or project"
            ))),
            s => Err(status_error(s, resp.headers(), &what)),
        }
    }

    async fn read(
        &self,
        repo: &RepoLocation,
        rev: &Revision,
        path: &str,
    ) -> Result<FetchedFile, RepoError> {
        check_path(path)?;
        check_ref(&rev.git_ref)?;
        let (url, segments) = project_segments(&repo.url, &self.host, 2, MAX_PROJECT_SEGMENTS)?;
        let project = Project {
            base: match &self.api_base {
                Some(base) => base.clone(),
                None => {
                    let mut base = url;
                    base.set_path("/");
                    base
                }
            },
            id: segments.join("/"),
        };
        let (sha, commit_known) = match &rev.sha {
            Some(sha) => (check_sha(sha)?, false),
            None => (self.resolve(&project, &rev.git_ref).await?, true),
        };
        let what = format!("GitLab {} {path} at {sha}", project.id);
        let mut url = project.endpoint(&["repository", "files", path, "raw"])?;
        url.query_pairs_mut().append_pair("ref", &sha);
        let resp = send(self.get(url), &what).await?;
        let contents = match resp.status() {
            s if s.is_success() => Some(read_body(resp, self.max_file_bytes, &what).await?),
            StatusCode::NOT_FOUND => {
                if !commit_known {
                    // Tells "no such file" from "no such commit or project".
                    self.resolve(&project, &sha).await?;
                }
                None
            }
            s => return Err(status_error(s, resp.headers(), &what)),
        };
        Ok(FetchedFile { sha, contents })
    }
}

/// One project on one server.
struct Project {
    base: Url,
    /// `namespace/sub/project`, sent as one encoded segment.
    id: String,
}

impl Project {
    /// `{base}/api/v4/projects/{id}/{tail...}`; each piece is one path segment, so `/` inside
    /// the project id or a file path is sent as `%2F`.
    fn endpoint(&self, tail: &[&str]) -> Result<Url, RepoError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| RepoError::Invalid("the GitLab API base cannot take a path".into()))?
            .pop_if_empty()
            .extend(["api", "v4", "projects", &self.id])
            .extend(tail);
        Ok(url)
    }
}

impl RepoSource for GitlabApi {
    fn read_file<'a>(
        &'a self,
        repo: &'a RepoLocation,
        rev: &'a Revision,
        path: &'a str,
    ) -> BoxFuture<'a, Result<FetchedFile, RepoError>> {
        Box::pin(self.read(repo, rev, path))
    }
}
