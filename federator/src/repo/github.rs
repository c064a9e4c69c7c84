//! [`GithubApi`]: reads one file through the GitHub REST contents API (github.com or GitHub
//! Enterprise Server), so a GitHub project needs no clone at all.
//!
//! - The file: `GET {base}/repos/{owner}/{repo}/contents/{path}?ref={sha}` with
//!   `Accept: application/vnd.github.raw+json`, which answers with the file's bytes.
//! - A ref (when no sha was given): `GET {base}/repos/{owner}/{repo}/commits/{ref}` with
//!   `Accept: application/vnd.github.sha`, which answers with the bare sha. `refs/heads/x` is
//!   asked as `heads/x`, GitHub's spelling.
//! - A 404 for the file means "no such file" only when the commit is known to exist: after
//!   resolving a ref, or after asking for the commit (one extra request, only on a miss).
//!   Otherwise a 404 means the commit or repository is missing: `NotFound`.
//!
//! Statuses map as: 401 and 403 → `Denied`, except a 403 that is rate limiting
//! (`x-ratelimit-remaining: 0` or `retry-after`) and 429 → `Unavailable`; 5xx and timeouts →
//! `Unavailable`. Retrying is the caller's job.

use std::time::Duration;

use flotilla_core::repo::{BoxFuture, FetchedFile, RepoError, RepoLocation, RepoSource, Revision};
use reqwest::StatusCode;
use url::Url;

use super::{
    RepoSetupError, Token, authority, check_host, check_path, check_ref, check_sha,
    default_max_file_bytes, default_request_timeout_secs, parse_api_base, project_segments,
    read_body, send, status_error,
};

/// The GitHub REST API version the requests are written against.
const API_VERSION: &str = "2022-11-28";
/// The raw file contents.
const ACCEPT_RAW: &str = "application/vnd.github.raw+json";
/// A commit's sha as plain text.
const ACCEPT_SHA: &str = "application/vnd.github.sha";

/// Reads files through the GitHub contents API with a token.
#[derive(Debug, Clone)]
pub struct GithubApi {
    client: reqwest::Client,
    /// `host[:port]` of the project URLs served, lowercase.
    host: String,
    api_base: Url,
    token: Token,
    timeout: Duration,
    max_file_bytes: u64,
}

impl GithubApi {
    /// An adapter for projects on `host` (`github.com` or a GitHub Enterprise host). `api_base`
    /// defaults to `https://api.github.com` for github.com and `https://<host>/api/v3`
    /// otherwise. Requests time out after 30 s and files over 1 MiB are refused unless set
    /// otherwise.
    pub fn new(host: &str, api_base: Option<&str>, token: Token) -> Result<Self, RepoSetupError> {
        check_host(host, "the GitHub host")?;
        let host = host.to_ascii_lowercase();
        let base = match api_base {
            Some(base) => base.to_owned(),
            None if host == "github.com" => "https://api.github.com".to_owned(),
            None => format!("https://{host}/api/v3"),
        };
        Ok(GithubApi {
            client: super::http_client()?,
            api_base: parse_api_base(&base, "the GitHub API base")?,
            host,
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

    /// `{base}/repos/{owner}/{repo}/{tail...}`, each segment percent-encoded on its own.
    fn endpoint<'s>(
        &self,
        owner: &str,
        repo: &str,
        tail: impl IntoIterator<Item = &'s str>,
    ) -> Result<Url, RepoError> {
        let mut url = self.api_base.clone();
        url.path_segments_mut()
            .map_err(|()| RepoError::Invalid("the GitHub API base cannot take a path".into()))?
            .pop_if_empty()
            .extend(["repos", owner, repo])
            .extend(tail);
        Ok(url)
    }

    fn get(&self, url: Url, accept: &'static str) -> reqwest::RequestBuilder {
        self.client
            .get(url)
            .timeout(self.timeout)
            .bearer_auth(self.token.expose())
            .header(reqwest::header::ACCEPT, accept)
            .header("X-GitHub-Api-Version", API_VERSION)
    }

    /// The commit a ref (or sha) names; 404 and 422 ("no commit found") are `NotFound`.
    async fn resolve(&self, owner: &str, repo: &str, r: &str) -> Result<String, RepoError> {
        let what = format!("GitHub {owner}/{repo} commit {r}");
        let url = self.endpoint(owner, repo, std::iter::once("commits").chain(r.split('/')))?;
        let resp = send(self.get(url, ACCEPT_SHA), &what).await?;
        match resp.status() {
            s if s.is_success() => {
                let body = read_body(resp, 1024, &what).await?;
                let text = String::from_utf8_lossy(&body);
                check_sha(text.trim()).map_err(|_| {
                    RepoError::Unavailable(format!("{what}: the answer is not a commit id"))
                })
            }
            StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY => Err(RepoError::NotFound(
                format!("{what}: no such commit or repository"),
            )),
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
        let (_, segments) = project_segments(&repo.url, &self.host, 2, 2)?;
        let (owner, name) = (&segments[0], &segments[1]);
        let (sha, commit_known) = match &rev.sha {
            Some(sha) => (check_sha(sha)?, false),
            None => {
                let r = rev.git_ref.strip_prefix("refs/").unwrap_or(&rev.git_ref);
                (self.resolve(owner, name, r).await?, true)
            }
        };
        let what = format!("GitHub {owner}/{name} {path} at {sha}");
        let mut url = self.endpoint(
            owner,
            name,
            std::iter::once("contents").chain(path.split('/')),
        )?;
        url.query_pairs_mut().append_pair("ref", &sha);
        let resp = send(self.get(url, ACCEPT_RAW), &what).await?;
        let contents = match resp.status() {
            s if s.is_success() => Some(read_body(resp, self.max_file_bytes, &what).await?),
            StatusCode::NOT_FOUND => {
                if !commit_known {
                    // Tells "no such file" from "no such commit or repository".
                    self.resolve(owner, name, &sha).await?;
                }
                None
            }
            s => return Err(status_error(s, resp.headers(), &what)),
        };
        Ok(FetchedFile { sha, contents })
    }
}

impl RepoSource for GithubApi {
    fn read_file<'a>(
        &'a self,
        repo: &'a RepoLocation,
        rev: &'a Revision,
        path: &'a str,
    ) -> BoxFuture<'a, Result<FetchedFile, RepoError>> {
        Box::pin(self.read(repo, rev, path))
    }
}
