//! `RepoSource` adapters: how the federator reads `.ci.yaml` at a pushed commit.
//!
//! Layout:
//! - `git.rs`: [`GitSource`], any `file://` or `http(s)://` git URL, through the `git` CLI and a
//!   cache of bare mirrors (one per repository URL).
//! - `github.rs`: [`GithubApi`], the GitHub (Enterprise) REST contents API.
//! - `gitlab.rs`: [`GitlabApi`], the GitLab (self-managed or gitlab.com) repository files API.
//! - here: [`RepoConfig`] (the `repo:` section of the federator's configuration),
//!   [`RoutedSource`] (what the federator holds: it picks an adapter per project), [`Token`],
//!   and the input checks and HTTP helpers the adapters share.
//!
//! Every value that reaches a command line or a URL (repository URL, ref, sha, path) passes a
//! check in this module first, so a project's configuration or an API caller cannot smuggle
//! options into `git` or extra segments into a forge URL. Tokens are read from files at
//! construction and never appear in `Debug` output, errors or logs.

mod git;
mod github;
mod gitlab;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::forge::Provider;
use flotilla_core::repo::{BoxFuture, FetchedFile, RepoError, RepoLocation, RepoSource, Revision};
use reqwest::header::HeaderMap;
use serde::Deserialize;
use url::Url;

pub use git::GitSource;
pub use github::GithubApi;
pub use gitlab::GitlabApi;

// ---------------------------------------------------------------------------------------------
// Configuration

/// How the federator reads repositories (the `repo:` section of its configuration).
///
/// A GitHub or GitLab project is read through its forge's file API when that forge is
/// configured here (with a token) and the project lives on the configured host; every other
/// project is read with git.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// The largest file that is read, in bytes; a larger `.ci.yaml` is refused as invalid
    /// rather than held in memory.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Reading with git (`file://`, `http://`, `https://` URLs).
    #[serde(default)]
    pub git: GitConfig,
    /// The GitHub contents API; when absent, GitHub projects are read with git.
    #[serde(default)]
    pub github: Option<GithubConfig>,
    /// The GitLab files API; when absent, GitLab projects are read with git.
    #[serde(default)]
    pub gitlab: Option<GitlabConfig>,
}

/// Reading with git.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitConfig {
    /// Seconds one `git` command (mostly a fetch) may run before it is stopped and the read
    /// reported as unavailable.
    #[serde(default = "default_fetch_timeout_secs")]
    pub fetch_timeout_secs: u64,
    /// How many commits of the ref are fetched when the server refuses to send a commit by
    /// its id: the asked-for commit must be among them.
    #[serde(default = "default_ref_fetch_depth")]
    pub ref_fetch_depth: u32,
    /// Credentials for `https://` git servers, one per host. They are sent only over https and
    /// only to the host they name.
    #[serde(default)]
    pub credentials: Vec<GitCredentialConfig>,
}

/// A token for one git host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitCredentialConfig {
    /// The host (with `:port` when not 443) the token is for, such as `github.com`.
    pub host: String,
    /// The user name sent with the token (HTTP Basic). `x-access-token` suits GitHub tokens;
    /// GitLab accepts any name with a personal or project access token (`oauth2` for OAuth).
    #[serde(default = "default_git_username")]
    pub username: String,
    /// A file holding the token (surrounding whitespace is ignored).
    pub token_file: PathBuf,
}

/// The GitHub contents API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// The host of the project URLs this API serves (`github.com`, or a GitHub Enterprise
    /// host); GitHub projects on other hosts are read with git.
    #[serde(default = "default_github_host")]
    pub host: String,
    /// The REST API base. Default: `https://api.github.com` for `github.com`, otherwise
    /// `https://<host>/api/v3` (GitHub Enterprise Server).
    #[serde(default)]
    pub api_base: Option<String>,
    /// A file holding the token (sent as `Authorization: Bearer`).
    pub token_file: PathBuf,
    /// Seconds one API request may take, from connecting to the end of the body.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

/// The GitLab files API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitlabConfig {
    /// The host (with `:port` when not the scheme's default) of the project URLs this API
    /// serves; GitLab projects on other hosts are read with git.
    #[serde(default = "default_gitlab_host")]
    pub host: String,
    /// The base the API lives under (`<base>/api/v4/...`). Default: the project URL's scheme
    /// and host, which is right for gitlab.com and for most self-managed servers.
    #[serde(default)]
    pub api_base: Option<String>,
    /// A file holding a personal, project or group access token (sent as
    /// `Authorization: Bearer`).
    pub token_file: PathBuf,
    /// Seconds one API request may take, from connecting to the end of the body.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

fn default_max_file_bytes() -> u64 {
    1024 * 1024
}

fn default_fetch_timeout_secs() -> u64 {
    60
}

fn default_ref_fetch_depth() -> u32 {
    50
}

fn default_git_username() -> String {
    "x-access-token".to_owned()
}

fn default_github_host() -> String {
    "github.com".to_owned()
}

fn default_gitlab_host() -> String {
    "gitlab.com".to_owned()
}

fn default_request_timeout_secs() -> u64 {
    30
}

impl Default for RepoConfig {
    fn default() -> Self {
        RepoConfig {
            max_file_bytes: default_max_file_bytes(),
            git: GitConfig::default(),
            github: None,
            gitlab: None,
        }
    }
}

impl Default for GitConfig {
    fn default() -> Self {
        GitConfig {
            fetch_timeout_secs: default_fetch_timeout_secs(),
            ref_fetch_depth: default_ref_fetch_depth(),
            credentials: Vec::new(),
        }
    }
}

impl RepoConfig {
    /// Checks what can be checked without touching the disk or the network.
    pub fn validate(&self) -> Result<(), RepoSetupError> {
        let bad = |msg: String| Err(RepoSetupError::Config(msg));
        if self.max_file_bytes == 0 {
            return bad("repo.max_file_bytes must be above 0".into());
        }
        if self.git.fetch_timeout_secs == 0 {
            return bad("repo.git.fetch_timeout_secs must be above 0".into());
        }
        if self.git.ref_fetch_depth == 0 {
            return bad("repo.git.ref_fetch_depth must be above 0".into());
        }
        for c in &self.git.credentials {
            check_host(&c.host, "repo.git.credentials[].host")?;
            if c.username.is_empty()
                || c.username.contains(':')
                || has_control_or_space(&c.username)
            {
                return bad(format!(
                    "repo.git.credentials[].username for {} must be non-empty, without ':' or \
                     spaces",
                    c.host
                ));
            }
        }
        if let Some(g) = &self.github {
            check_host(&g.host, "repo.github.host")?;
            if let Some(base) = &g.api_base {
                parse_api_base(base, "repo.github.api_base")?;
            }
            if g.request_timeout_secs == 0 {
                return bad("repo.github.request_timeout_secs must be above 0".into());
            }
        }
        if let Some(g) = &self.gitlab {
            check_host(&g.host, "repo.gitlab.host")?;
            if let Some(base) = &g.api_base {
                parse_api_base(base, "repo.gitlab.api_base")?;
            }
            if g.request_timeout_secs == 0 {
                return bad("repo.gitlab.request_timeout_secs must be above 0".into());
            }
        }
        Ok(())
    }
}

/// Why the repository adapters could not be built from their configuration.
#[derive(Debug, thiserror::Error)]
pub enum RepoSetupError {
    /// A configuration value is wrong.
    #[error("invalid repository configuration: {0}")]
    Config(String),
    /// A token file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A token is empty or cannot be sent in an HTTP header.
    #[error("the token {from} is empty or holds characters not allowed in an HTTP header")]
    BadToken {
        /// Where the token came from (a file name; never the token).
        from: String,
    },
    /// The cache directory could not be created.
    #[error("cannot create the repository cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built (TLS roots, …).
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
}

/// A secret token. `Debug` never shows it; only the adapters read it, to put it in a header.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// Wraps a token given in code (tests, or a secret store). Surrounding whitespace is
    /// dropped; it must then be non-empty printable ASCII without spaces.
    pub fn new(value: &str) -> Result<Self, RepoSetupError> {
        Self::checked(value, "given in code")
    }

    /// Reads a token from a file.
    pub fn from_file(path: &Path) -> Result<Self, RepoSetupError> {
        let raw = std::fs::read_to_string(path).map_err(|source| RepoSetupError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        Self::checked(&raw, &format!("in {}", path.display()))
    }

    fn checked(value: &str, from: &str) -> Result<Self, RepoSetupError> {
        let value = value.trim();
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RepoSetupError::BadToken {
                from: from.to_owned(),
            });
        }
        Ok(Token(value.into()))
    }

    /// The secret itself, for building a header.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

/// Which adapter reads a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// [`GitSource`].
    Git,
    /// [`GithubApi`].
    GithubApi,
    /// [`GitlabApi`].
    GitlabApi,
}

impl Route {
    /// A bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Git => "git",
            Route::GithubApi => "github_api",
            Route::GitlabApi => "gitlab_api",
        }
    }
}

/// The `RepoSource` the federator uses: a forge API where one is configured for the project's
/// forge and host, git otherwise.
#[derive(Debug)]
pub struct RoutedSource {
    git: GitSource,
    github: Option<GithubApi>,
    gitlab: Option<GitlabApi>,
}

impl RoutedSource {
    /// Builds the adapters from `config`, keeping git mirrors under `cache_dir` (for example
    /// `<data-dir>/repos`). Reads the token files now, so a bad one stops startup.
    pub fn new(cache_dir: impl Into<PathBuf>, config: &RepoConfig) -> Result<Self, RepoSetupError> {
        config.validate()?;
        let mut git = GitSource::new(cache_dir)?
            .with_fetch_timeout(Duration::from_secs(config.git.fetch_timeout_secs))
            .with_ref_fetch_depth(config.git.ref_fetch_depth)
            .with_max_file_bytes(config.max_file_bytes);
        for c in &config.git.credentials {
            git = git.with_credential(&c.host, &c.username, Token::from_file(&c.token_file)?);
        }
        let github = match &config.github {
            Some(g) => Some(
                GithubApi::new(
                    &g.host,
                    g.api_base.as_deref(),
                    Token::from_file(&g.token_file)?,
                )?
                .with_timeout(Duration::from_secs(g.request_timeout_secs))
                .with_max_file_bytes(config.max_file_bytes),
            ),
            None => None,
        };
        let gitlab = match &config.gitlab {
            Some(g) => Some(
                GitlabApi::new(
                    &g.host,
                    g.api_base.as_deref(),
                    Token::from_file(&g.token_file)?,
                )?
                .with_timeout(Duration::from_secs(g.request_timeout_secs))
                .with_max_file_bytes(config.max_file_bytes),
            ),
            None => None,
        };
        Ok(Self::from_parts(git, github, gitlab))
    }

    /// Assembles already-built adapters.
    pub fn from_parts(
        git: GitSource,
        github: Option<GithubApi>,
        gitlab: Option<GitlabApi>,
    ) -> Self {
        RoutedSource {
            git,
            github,
            gitlab,
        }
    }

    /// The adapter that reads `repo`: `file://` URLs and `Provider::Git` always go to git;
    /// GitHub and GitLab projects go to their API when it is configured and serves the
    /// project's host.
    pub fn route(&self, repo: &RepoLocation) -> Route {
        let Ok(url) = Url::parse(&repo.url) else {
            return Route::Git; // git reports the bad URL as `Invalid`.
        };
        match repo.provider {
            Provider::Github if self.github.as_ref().is_some_and(|g| g.serves(&url)) => {
                Route::GithubApi
            }
            Provider::Gitlab if self.gitlab.as_ref().is_some_and(|g| g.serves(&url)) => {
                Route::GitlabApi
            }
            _ => Route::Git,
        }
    }
}

impl RepoSource for RoutedSource {
    fn read_file<'a>(
        &'a self,
        repo: &'a RepoLocation,
        rev: &'a Revision,
        path: &'a str,
    ) -> BoxFuture<'a, Result<FetchedFile, RepoError>> {
        match (self.route(repo), &self.github, &self.gitlab) {
            (Route::GithubApi, Some(g), _) => g.read_file(repo, rev, path),
            (Route::GitlabApi, _, Some(g)) => g.read_file(repo, rev, path),
            _ => self.git.read_file(repo, rev, path),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Input checks shared by the adapters

/// A file path inside the repository: relative, `/`-separated, no empty, `.` or `..`
/// segments, no control characters.
fn check_path(path: &str) -> Result<(), RepoError> {
    let ok = !path.is_empty()
        && path.len() <= 4096
        && !has_control(path)
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    if ok {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!(
            "file path {:?} must be relative, without empty, '.' or '..' segments",
            truncate(path, 200)
        )))
    }
}

/// A commit id: 40 (SHA-1) or 64 (SHA-256) hex digits; returned in lowercase.
fn check_sha(sha: &str) -> Result<String, RepoError> {
    if matches!(sha.len(), 40 | 64) && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha.to_ascii_lowercase())
    } else {
        Err(RepoError::Invalid(format!(
            "commit {:?} is not 40 or 64 hex digits",
            truncate(sha, 80)
        )))
    }
}

/// A ref name as `git check-ref-format` would take it, and nothing a refspec treats specially
/// (`:`, `*`, a leading `+` or `^`, a leading `-`).
fn check_ref(r: &str) -> Result<(), RepoError> {
    let ok = !r.is_empty()
        && r.len() <= 1024
        && !r.starts_with(['-', '+', '^', '/'])
        && !r.ends_with(['/', '.'])
        && !r.ends_with(".lock")
        && !r.contains("..")
        && !r.contains("@{")
        && !r.contains("//")
        && r != "@"
        && !r.bytes().any(|b| {
            b.is_ascii_control()
                || matches!(b, b' ' | b'~' | b'^' | b':' | b'?' | b'*' | b'[' | b'\\')
        })
        && r.split('/').all(|s| !s.starts_with('.'));
    if ok {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!(
            "{:?} is not a valid git ref",
            truncate(r, 200)
        )))
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn has_control_or_space(s: &str) -> bool {
    s.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// A configured host (`name` or `name:port`).
fn check_host(host: &str, field: &str) -> Result<(), RepoSetupError> {
    let ok = !host.is_empty()
        && Url::parse(&format!("https://{host}/"))
            .ok()
            .is_some_and(|u| authority(&u).is_some_and(|a| a == host.to_ascii_lowercase()));
    if ok {
        Ok(())
    } else {
        Err(RepoSetupError::Config(format!(
            "{field} {host:?} must be a host name with an optional :port"
        )))
    }
}

/// An API base: an `http(s)` URL without credentials, query or fragment.
fn parse_api_base(base: &str, field: &str) -> Result<Url, RepoSetupError> {
    let url = Url::parse(base)
        .map_err(|e| RepoSetupError::Config(format!("{field} {base:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(RepoSetupError::Config(format!(
            "{field} {base:?} must be an http(s) URL without credentials, query or fragment"
        )));
    }
    Ok(url)
}

/// `host[:port]` in lowercase, the port only when it is not the scheme's default.
fn authority(url: &Url) -> Option<String> {
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())?
        .to_ascii_lowercase();
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// The repository path of a forge project URL (`https://host/group/sub/project(.git)`) as
/// segments, for the API adapters: an http(s) URL without credentials, query or fragment, on
/// the expected host, with at least `min_segments` non-empty segments.
fn project_segments(
    url: &str,
    host: &str,
    min_segments: usize,
    max_segments: usize,
) -> Result<(Url, Vec<String>), RepoError> {
    let invalid = |why: &str| RepoError::Invalid(format!("project URL {} {why}", redact_url(url)));
    let parsed = Url::parse(url).map_err(|_| invalid("is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("is not an http(s) URL"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "must not hold credentials (configure a token file instead)",
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("must not have a query or fragment"));
    }
    if authority(&parsed).as_deref() != Some(host) {
        return Err(invalid(&format!("is not on {host}")));
    }
    let mut segments: Vec<String> = parsed
        .path_segments()
        .map(|s| s.map(str::to_owned).collect())
        .unwrap_or_default();
    if segments.last().is_some_and(String::is_empty) {
        segments.pop();
    }
    if let Some(last) = segments.last_mut()
        && let Some(stripped) = last.strip_suffix(".git")
    {
        *last = stripped.to_owned();
    }
    // Percent-encoded segments are decoded so they are encoded exactly once again when the
    // API URL is built.
    let segments = segments
        .iter()
        .map(|s| percent_decode(s).ok_or_else(|| invalid("has a segment that is not valid UTF-8")))
        .collect::<Result<Vec<_>, _>>()?;
    let count_ok = (min_segments..=max_segments).contains(&segments.len());
    if !count_ok
        || segments
            .iter()
            .any(|s| s.is_empty() || s == "." || s == ".." || s == "-" || has_control(s))
    {
        return Err(invalid("does not name a repository (owner/name)"));
    }
    Ok((parsed, segments))
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// A URL for an error message: quoted, cut to 200 bytes, with anything between `://` and the
/// last `@` (user info, which may be a password or token) replaced by `***`.
fn redact_url(raw: &str) -> String {
    let shown = match raw.split_once("://") {
        // The last `@` anywhere: a password may itself hold `/`, `?` or `@`, and hiding a
        // little too much of an odd path costs nothing.
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
            None => raw.to_owned(),
        },
        None => raw.to_owned(),
    };
    format!("{:?}", truncate(&shown, 200))
}

/// Cuts `s` to at most `max` bytes (on a character boundary) for an error message.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers shared by the API adapters

/// The client for forge APIs: rustls with the ring provider (no aws-lc build), the platform's
/// trust store, `User-Agent: flotilla`, at most 5 redirects. reqwest drops `Authorization` on a
/// redirect to another host, which is why both API adapters send their token in it.
fn http_client() -> Result<reqwest::Client, RepoSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .map_err(|e| RepoSetupError::HttpClient(e.to_string()))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RepoSetupError::HttpClient(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .user_agent("flotilla")
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .map_err(|e| RepoSetupError::HttpClient(e.to_string()))
}

/// Sends a request; transport failures and timeouts are `Unavailable`.
async fn send(req: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response, RepoError> {
    req.send().await.map_err(|e| transport_error(&e, what))
}

fn transport_error(e: &reqwest::Error, what: &str) -> RepoError {
    if e.is_timeout() {
        RepoError::Unavailable(format!("{what}: timed out"))
    } else if e.is_builder() {
        RepoError::Invalid(format!("{what}: {e}"))
    } else {
        RepoError::Unavailable(format!("{what}: {e}"))
    }
}

/// Whether a 403 is GitHub's or GitLab's rate limiting rather than a refusal.
fn is_rate_limited(headers: &HeaderMap) -> bool {
    let exhausted = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == "0")
    };
    exhausted("x-ratelimit-remaining")
        || exhausted("ratelimit-remaining")
        || headers.contains_key(reqwest::header::RETRY_AFTER)
}

/// Maps an unexpected status to an error. `what` names the request (never a token).
fn status_error(status: reqwest::StatusCode, headers: &HeaderMap, what: &str) -> RepoError {
    let code = status.as_u16();
    match code {
        401 => RepoError::Denied(format!("{what}: 401, the token was refused")),
        403 if is_rate_limited(headers) => {
            RepoError::Unavailable(format!("{what}: 403, rate limited"))
        }
        403 => RepoError::Denied(format!("{what}: 403, the token may not read this")),
        404 => RepoError::NotFound(format!("{what}: 404")),
        408 | 429 => RepoError::Unavailable(format!("{what}: {code}, try again later")),
        500..=599 => RepoError::Unavailable(format!("{what}: server error {code}")),
        _ => RepoError::Invalid(format!("{what}: unexpected status {code}")),
    }
}

/// Reads a response body, refusing one over `max` bytes.
async fn read_body(
    mut resp: reqwest::Response,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, RepoError> {
    let too_large = || RepoError::Invalid(format!("{what}: larger than the limit of {max} bytes"));
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(&e, what))? {
        if (body.len() + chunk.len()) as u64 > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
