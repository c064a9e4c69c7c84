//! [`GitSource`]: reads a file at a commit from any `file://` or `http(s)://` git URL, keeping
//! one bare mirror per repository URL so a repository is fetched once and then only its new
//! objects.
//!
//! It runs the `git` CLI (`tokio::process`) rather than `gix`. Why: git is on every machine
//! that runs the federator and in CI, and it is the reference implementation of the protocol
//! (protocol v2 fetch of a commit by id, shallow fetches, smart HTTP with proxies and the
//! system's CA store). gix would add a large dependency tree (and an HTTP transport that pulls
//! in a second HTTP stack) for the same result, and its `file://` transport starts
//! `git-upload-pack` anyway.
//!
//! A read, serialised per repository (a per-URL async mutex, so concurrent loads never run two
//! `git` processes on one mirror):
//! 1. the mirror `<cache>/<sha256 of the URL>` is created bare if missing (in a temporary
//!    directory, then renamed, so a crash never leaves half a mirror);
//! 2. when a sha is given and the mirror has that commit, nothing is fetched;
//! 3. otherwise `git fetch --depth=1 <url> <sha>` (protocol v2 lets a client ask for any
//!    commit by id); if the server refuses, the ref is fetched `ref_fetch_depth` deep and the
//!    commit must be among those commits. Without a sha the ref is fetched and its head used;
//! 4. the file is located with `git ls-tree` (mode, size) and read with `git cat-file blob`.
//!
//! Each fetched commit is kept by a ref `refs/flotilla/c/<sha>`, so `git gc` (which fetch may
//! start) never prunes what step 2 relies on.
//!
//! Safety: only `file://`, `http://` and `https://` URLs are accepted (no `ssh://`, `git@`
//! scp syntax, `<transport>::` helpers such as `ext::`, bare local paths or anything starting
//! with `-`), and git is run with `protocol.allow=never` plus those three allowed, with a
//! cleared environment, no system or global config and terminal prompts off. Every command has
//! a timeout; a killed fetch's stale lock files are removed before the mirror is used again.
//! Tokens reach git through `GIT_CONFIG_*` environment variables (not the command line) as an
//! `http.extraHeader`, only over https and only for the host they are configured for.
//!
//! One process per cache directory: the per-URL lock is in memory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use flotilla_core::repo::{BoxFuture, FetchedFile, RepoError, RepoLocation, RepoSource, Revision};
use sha2::{Digest, Sha256};
use url::Url;

use super::{
    RepoSetupError, Token, authority, check_path, check_ref, check_sha, default_fetch_timeout_secs,
    default_max_file_bytes, default_ref_fetch_depth, redact_url,
};

/// Environment variables passed through to git; everything else is cleared.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
    "GIT_SSL_CAPATH",
];

/// `-c` options on every git command.
const GIT_CONFIG: &[&str] = &[
    "protocol.version=2",
    // Only these transports; `ext::`, `fd::`, `ssh` and friends are refused by git itself too.
    "protocol.allow=never",
    "protocol.file.allow=always",
    "protocol.http.allow=always",
    "protocol.https.allow=always",
    // A gc or maintenance run that fetch starts stays inside our timeout and our lock.
    "gc.autoDetach=false",
    "maintenance.autoDetach=false",
    "core.hooksPath=/dev/null",
    "credential.helper=",
];

/// A token for one https host.
#[derive(Debug, Clone)]
struct GitCredential {
    host: String,
    username: String,
    token: Token,
}

/// Reads files from git repositories by URL, through a cache of bare mirrors.
#[derive(Debug)]
pub struct GitSource {
    cache_dir: PathBuf,
    fetch_timeout: Duration,
    ref_fetch_depth: u32,
    max_file_bytes: u64,
    credentials: Vec<GitCredential>,
    git: PathBuf,
    /// One entry per mirror directory name; the mutex serialises all git work on it.
    mirrors: Mutex<HashMap<String, Arc<tokio::sync::Mutex<MirrorState>>>>,
}

/// What this process knows about one mirror.
#[derive(Debug, Default)]
struct MirrorState {
    /// Stale lock files (from a process that died mid-fetch) were cleared.
    checked: bool,
}

/// Why a `git` command did not succeed.
#[derive(Debug, thiserror::Error)]
enum GitFailure {
    #[error("cannot run git: {0}")]
    Spawn(std::io::Error),
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// git's whole stderr; shown summarised.
    #[error("{}", summary(.0))]
    Exit(String),
}

/// What a failed fetch means, from git's message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FetchFailure {
    /// The server has no such ref or refuses to send that commit.
    WantMissing(String),
    /// No repository at that URL.
    RepoMissing(String),
    /// Credentials missing or refused.
    Denied(String),
    /// The URL's transport is not allowed.
    Refused(String),
    /// Network, server error, timeout or anything else.
    Unavailable(String),
}

impl From<FetchFailure> for RepoError {
    fn from(f: FetchFailure) -> Self {
        match f {
            FetchFailure::WantMissing(m) | FetchFailure::RepoMissing(m) => RepoError::NotFound(m),
            FetchFailure::Denied(m) => RepoError::Denied(m),
            FetchFailure::Refused(m) => RepoError::Invalid(m),
            FetchFailure::Unavailable(m) => RepoError::Unavailable(m),
        }
    }
}

impl GitSource {
    /// A source keeping its mirrors under `cache_dir` (created if missing). Fetches time out
    /// after 60 s, refs are fetched 50 commits deep when a commit cannot be fetched by id, and
    /// files over 1 MiB are refused, unless set otherwise.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Result<Self, RepoSetupError> {
        let cache_dir = cache_dir.into();
        std::fs::create_dir_all(&cache_dir).map_err(|source| RepoSetupError::CacheDir {
            path: cache_dir.clone(),
            source,
        })?;
        Ok(GitSource {
            cache_dir,
            fetch_timeout: Duration::from_secs(default_fetch_timeout_secs()),
            ref_fetch_depth: default_ref_fetch_depth(),
            max_file_bytes: default_max_file_bytes(),
            credentials: Vec::new(),
            git: PathBuf::from("git"),
            mirrors: Mutex::new(HashMap::new()),
        })
    }

    /// How long one git command may run.
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// How many commits of the ref to fetch when the server refuses a commit by id.
    pub fn with_ref_fetch_depth(mut self, depth: u32) -> Self {
        self.ref_fetch_depth = depth.max(1);
        self
    }

    /// The largest file returned; a larger one is `Invalid`.
    pub fn with_max_file_bytes(mut self, max: u64) -> Self {
        self.max_file_bytes = max;
        self
    }

    /// Sends `username` and `token` (HTTP Basic) to `https://` URLs on `host` (`name` or
    /// `name:port`, as in the URL).
    pub fn with_credential(mut self, host: &str, username: &str, token: Token) -> Self {
        self.credentials.push(GitCredential {
            host: host.to_ascii_lowercase(),
            username: username.to_owned(),
            token,
        });
        self
    }

    /// The git binary to run (default: `git` on `PATH`); tests use a wrapper script to play a
    /// server that refuses or hangs.
    pub fn with_git_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.git = program.into();
        self
    }

    fn mirror_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<MirrorState>> {
        // A poisoned map only means another thread panicked while inserting; the map is
        // still usable.
        let mut mirrors = self
            .mirrors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        mirrors.entry(key.to_owned()).or_default().clone()
    }

    async fn read(
        &self,
        repo: &RepoLocation,
        rev: &Revision,
        path: &str,
    ) -> Result<FetchedFile, RepoError> {
        let url = check_git_url(&repo.url)?;
        check_path(path)?;
        check_ref(&rev.git_ref)?;
        let want = rev.sha.as_deref().map(check_sha).transpose()?;

        let key = mirror_key(&repo.url);
        let lock = self.mirror_lock(&key);
        let mut state = lock.lock().await;
        let mirror = Mirror {
            source: self,
            dir: self.cache_dir.join(&key),
            url: &repo.url,
            parsed: &url,
        };
        if !state.checked {
            mirror.clear_stale_locks().await;
            state.checked = true;
        }
        let result = mirror.read(want, &rev.git_ref, path).await;
        if matches!(&result, Err(RepoError::Unavailable(_))) {
            // A timed-out git was killed and may have left lock files behind.
            mirror.clear_stale_locks().await;
        }
        result
    }
}

impl RepoSource for GitSource {
    fn read_file<'a>(
        &'a self,
        repo: &'a RepoLocation,
        rev: &'a Revision,
        path: &'a str,
    ) -> BoxFuture<'a, Result<FetchedFile, RepoError>> {
        Box::pin(self.read(repo, rev, path))
    }
}

/// One repository's mirror, while its lock is held.
struct Mirror<'a> {
    source: &'a GitSource,
    dir: PathBuf,
    /// The URL exactly as configured (checked); passed to git as given.
    url: &'a str,
    /// The same URL parsed, to pick the credential (if any) for its host.
    parsed: &'a Url,
}

impl Mirror<'_> {
    async fn read(
        &self,
        want: Option<String>,
        git_ref: &str,
        path: &str,
    ) -> Result<FetchedFile, RepoError> {
        self.ensure_exists().await?;
        let sha = match want {
            Some(sha) => {
                if !self.has_commit(&sha).await? {
                    self.fetch_commit(&sha, git_ref).await?;
                }
                sha
            }
            None => self.fetch_ref_head(git_ref).await?,
        };
        let contents = self.read_blob(&sha, path).await?;
        Ok(FetchedFile { sha, contents })
    }

    /// Creates the bare mirror if it is missing.
    async fn ensure_exists(&self) -> Result<(), RepoError> {
        let dir = self.dir.clone();
        let exists = blocking(move || dir.join("HEAD").is_file()).await?;
        if exists {
            return Ok(());
        }
        let tmp = self.dir.with_extension("tmp");
        let tmp2 = tmp.clone();
        blocking(move || match std::fs::remove_dir_all(&tmp2) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await?
        .map_err(|e| local_error("cannot clear a half-made mirror", &e))?;
        let out = self
            .source
            .run(
                None,
                [
                    OsStr::new("init"),
                    OsStr::new("--bare"),
                    OsStr::new("--quiet"),
                    OsStr::new("--template="),
                    OsStr::new("--"),
                    tmp.as_os_str(),
                ],
                None,
            )
            .await;
        expect_success(out, "cannot create a mirror")?;
        let dir = self.dir.clone();
        blocking(move || std::fs::rename(&tmp, &dir))
            .await?
            .map_err(|e| local_error("cannot create a mirror", &e))
    }

    /// Removes lock files a killed git left; called only while holding the mirror's lock, when
    /// no git of ours runs on it.
    async fn clear_stale_locks(&self) {
        let dir = self.dir.clone();
        let _ = blocking(move || {
            for name in [
                "shallow.lock",
                "packed-refs.lock",
                "config.lock",
                "HEAD.lock",
                "FETCH_HEAD.lock",
                "index.lock",
                "gc.pid",
            ] {
                let _ = std::fs::remove_file(dir.join(name));
            }
            remove_lock_files(&dir.join("refs"), 0);
        })
        .await;
    }

    async fn has_commit(&self, sha: &str) -> Result<bool, RepoError> {
        let spec = format!("{sha}^{{commit}}");
        let out = self
            .source
            .run(
                Some(&self.dir),
                ["cat-file", "-e", &spec].map(OsStr::new),
                None,
            )
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(GitFailure::Exit(_)) => Ok(false),
            Err(e) => Err(git_error("cannot inspect the mirror", &e)),
        }
    }

    /// Fetches one commit: by id first, then through its ref.
    async fn fetch_commit(&self, sha: &str, git_ref: &str) -> Result<(), RepoError> {
        let refspec = format!("+{sha}:refs/flotilla/c/{sha}");
        match self.fetch("--depth=1", &refspec).await {
            Ok(()) if self.has_commit(sha).await? => return Ok(()),
            Ok(()) => {}
            // Fetching the ref would fail the same way.
            Err(
                e @ (FetchFailure::RepoMissing(_)
                | FetchFailure::Denied(_)
                | FetchFailure::Refused(_)),
            ) => return Err(e.into()),
            Err(e) => {
                tracing::debug!(error = ?e, "Fetching a commit by id failed; fetching its ref.");
            }
        }
        let depth = format!("--depth={}", self.source.ref_fetch_depth);
        self.fetch(&depth, git_ref)
            .await
            .map_err(|e| self.ref_error(e, git_ref))?;
        if !self.has_commit(sha).await? {
            return Err(RepoError::NotFound(format!(
                "commit {sha} is neither fetchable by id nor among the last {} commits of {git_ref}",
                self.source.ref_fetch_depth
            )));
        }
        self.keep(sha).await
    }

    /// Fetches a ref and returns its head commit.
    async fn fetch_ref_head(&self, git_ref: &str) -> Result<String, RepoError> {
        self.fetch("--depth=1", git_ref)
            .await
            .map_err(|e| self.ref_error(e, git_ref))?;
        let out = self
            .source
            .run(
                Some(&self.dir),
                ["rev-parse", "--verify", "--quiet", "FETCH_HEAD^{commit}"].map(OsStr::new),
                None,
            )
            .await;
        let out = out.map_err(|_| {
            RepoError::NotFound(format!("{git_ref} in {} does not name a commit", self.url))
        })?;
        let sha = check_sha(String::from_utf8_lossy(&out).trim())
            .map_err(|_| RepoError::Unavailable("git printed no commit id".into()))?;
        self.keep(&sha).await?;
        Ok(sha)
    }

    fn ref_error(&self, e: FetchFailure, git_ref: &str) -> RepoError {
        match e {
            FetchFailure::WantMissing(_) => {
                RepoError::NotFound(format!("{git_ref} not found in {}", self.url))
            }
            other => other.into(),
        }
    }

    /// Points `refs/flotilla/c/<sha>` at a commit so gc keeps it.
    async fn keep(&self, sha: &str) -> Result<(), RepoError> {
        let name = format!("refs/flotilla/c/{sha}");
        let out = self
            .source
            .run(
                Some(&self.dir),
                ["update-ref", &name, sha].map(OsStr::new),
                None,
            )
            .await;
        expect_success(out, "cannot record a fetched commit").map(drop)
    }

    /// `git fetch <depth> -- <url> <refspec>`: the URL and refspec come after `--`, so neither
    /// can be read as an option.
    async fn fetch(&self, depth: &str, refspec: &str) -> Result<(), FetchFailure> {
        let args = [
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-recurse-submodules",
            depth,
            "--",
            self.url,
            refspec,
        ]
        .map(OsStr::new);
        match self
            .source
            .run(Some(&self.dir), args, Some(self.parsed))
            .await
        {
            Ok(_) => Ok(()),
            Err(GitFailure::Exit(stderr)) => Err(classify_fetch_error(&stderr)),
            Err(e @ GitFailure::TimedOut(_)) => {
                tracing::warn!(error = %e, "A git fetch timed out.");
                Err(FetchFailure::Unavailable(format!(
                    "fetching {}: {e}",
                    self.url
                )))
            }
            Err(e) => Err(FetchFailure::Unavailable(e.to_string())),
        }
    }

    /// The bytes of `path` at `sha`; `None` when the commit has no such path.
    async fn read_blob(&self, sha: &str, path: &str) -> Result<Option<Vec<u8>>, RepoError> {
        let out = self
            .source
            .run(
                Some(&self.dir),
                [
                    "--literal-pathspecs",
                    "ls-tree",
                    "-l",
                    "-z",
                    sha,
                    "--",
                    path,
                ]
                .map(OsStr::new),
                None,
            )
            .await;
        let listing = expect_success(out, "cannot list the commit's files")?;
        let Some(entry) = parse_ls_tree(&listing, path) else {
            return Ok(None);
        };
        match entry.mode {
            "100644" | "100755" => {}
            "120000" => return Err(invalid_entry(path, sha, "a symbolic link")),
            "040000" => return Err(invalid_entry(path, sha, "a directory")),
            "160000" => return Err(invalid_entry(path, sha, "a submodule")),
            _ => return Err(invalid_entry(path, sha, "not a regular file")),
        }
        if entry.size > self.source.max_file_bytes {
            return Err(RepoError::Invalid(format!(
                "{path} at {sha} is {} bytes, over the limit of {}",
                entry.size, self.source.max_file_bytes
            )));
        }
        let out = self
            .source
            .run(
                Some(&self.dir),
                ["cat-file", "blob", entry.oid].map(OsStr::new),
                None,
            )
            .await;
        expect_success(out, "cannot read the file").map(Some)
    }
}

fn invalid_entry(path: &str, sha: &str, what: &str) -> RepoError {
    RepoError::Invalid(format!("{path} at {sha} is {what}"))
}

/// One `git ls-tree -l -z` entry.
#[derive(Debug, PartialEq, Eq)]
struct TreeEntry<'a> {
    mode: &'a str,
    oid: &'a str,
    size: u64,
}

/// Finds `path` in `git ls-tree -l -z` output: `<mode> <type> <oid> <size>\t<path>\0`…
fn parse_ls_tree<'a>(listing: &'a [u8], path: &str) -> Option<TreeEntry<'a>> {
    listing.split(|&b| b == 0).find_map(|record| {
        let record = std::str::from_utf8(record).ok()?;
        let (meta, name) = record.split_once('\t')?;
        if name != path {
            return None;
        }
        let mut fields = meta.split_whitespace();
        let mode = fields.next()?;
        let _kind = fields.next()?;
        let oid = fields.next()?;
        // Trees and submodules have `-` for a size.
        let size = fields.next()?.parse().unwrap_or(0);
        Some(TreeEntry { mode, oid, size })
    })
}

impl GitSource {
    /// Runs git with the fixed safe configuration; `remote` decides which credential (if any)
    /// is handed over. Returns stdout, or the last lines of stderr on failure.
    async fn run<I, S>(
        &self,
        git_dir: Option<&Path>,
        args: I,
        remote: Option<&Url>,
    ) -> Result<Vec<u8>, GitFailure>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = tokio::process::Command::new(&self.git);
        cmd.env_clear();
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_NO_REPLACE_OBJECTS", "1")
            .env("LC_ALL", "C");
        if let Some(dir) = git_dir {
            cmd.env("GIT_DIR", dir).current_dir(dir);
        }
        if let Some(header) = remote.and_then(|url| self.auth_header(url)) {
            // Through the environment, so the token is not on the command line for `ps` to
            // show.
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", header);
        }
        for c in GIT_CONFIG {
            cmd.arg("-c").arg(c);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(GitFailure::Spawn)?;
        // Dropping the future on timeout drops the child, which kills it (`kill_on_drop`).
        let out = tokio::time::timeout(self.fetch_timeout, child.wait_with_output())
            .await
            .map_err(|_| GitFailure::TimedOut(self.fetch_timeout))?
            .map_err(GitFailure::Spawn)?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(GitFailure::Exit(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    }

    /// `Authorization: Basic …` for a configured https host.
    fn auth_header(&self, url: &Url) -> Option<String> {
        if url.scheme() != "https" {
            return None;
        }
        let host = authority(url)?;
        let c = self.credentials.iter().find(|c| c.host == host)?;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            c.username,
            c.token.expose()
        ));
        Some(format!("Authorization: Basic {basic}"))
    }
}

/// Checks a repository URL for git: `file://`, `http://` or `https://` only, no credentials,
/// query or fragment, nothing git would read as an option or a transport helper.
pub(super) fn check_git_url(raw: &str) -> Result<Url, RepoError> {
    let invalid =
        |why: &str| RepoError::Invalid(format!("repository URL {} {why}", redact_url(raw)));
    if raw.starts_with('-') {
        return Err(invalid("must not start with '-'"));
    }
    if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid("must not contain spaces or control characters"));
    }
    if raw.contains("::") {
        return Err(invalid(
            "uses a git transport helper ('::'), which is not allowed",
        ));
    }
    let lower = raw.to_ascii_lowercase();
    if !["file://", "http://", "https://"]
        .iter()
        .any(|p| lower.starts_with(p))
    {
        return Err(invalid(
            "must be a file://, http:// or https:// URL (ssh and scp-style addresses are not \
             supported)",
        ));
    }
    let url = Url::parse(raw).map_err(|e| invalid(&format!("is not a URL ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "must not hold credentials (configure a token file instead)",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must not have a query or fragment"));
    }
    match url.scheme() {
        "file" => {
            if url.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(invalid("must name a local path (file:///path)"));
            }
            if url.path().len() <= 1 {
                return Err(invalid("must name a repository"));
            }
        }
        "http" | "https" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err(invalid("must name a host"));
            }
        }
        _ => return Err(invalid("must be a file://, http:// or https:// URL")),
    }
    Ok(url)
}

/// The mirror's directory name: the SHA-256 of the URL as configured.
fn mirror_key(url: &str) -> String {
    let digest = Sha256::digest(url.as_bytes());
    let mut key = String::with_capacity(64);
    for b in digest {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// Reads git's stderr for why a fetch failed. git is run with `LC_ALL=C`, so the messages are
/// the untranslated ones.
fn classify_fetch_error(stderr: &str) -> FetchFailure {
    let s = stderr.to_ascii_lowercase();
    let msg = summary(stderr);
    let any = |needles: &[&str]| needles.iter().any(|n| s.contains(n));
    if any(&["transport '", "unsupported protocol"]) && s.contains("not allowed")
        || s.contains("unable to find remote helper")
    {
        FetchFailure::Refused(msg)
    } else if any(&[
        "could not read username",
        "could not read password",
        "authentication failed",
        "returned error: 401",
        "returned error: 403",
        "permission denied",
    ]) {
        FetchFailure::Denied(msg)
    } else if any(&[
        "does not appear to be a git repository",
        "repository not found",
        "' not found",
        "returned error: 404",
    ]) && !s.contains("remote ref")
    {
        FetchFailure::RepoMissing(msg)
    } else if any(&[
        "not our ref",
        "couldn't find remote ref",
        "no such remote ref",
        "unadvertised object",
        "no matching remote head",
        "invalid refspec",
    ]) {
        FetchFailure::WantMissing(msg)
    } else {
        FetchFailure::Unavailable(msg)
    }
}

/// git's own complaints (`fatal:`/`error:` lines, else the last lines) from its stderr,
/// bounded, for an error message.
fn summary(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let complaints: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("fatal:") || l.starts_with("error:"))
        .collect();
    let chosen = if complaints.is_empty() {
        &lines
    } else {
        &complaints
    };
    let tail = chosen[chosen.len().saturating_sub(3)..].join(" / ");
    let mut start = tail.len().saturating_sub(600);
    while !tail.is_char_boundary(start) {
        start += 1;
    }
    tail[start..].to_owned()
}

fn expect_success(out: Result<Vec<u8>, GitFailure>, what: &str) -> Result<Vec<u8>, RepoError> {
    out.map_err(|e| git_error(what, &e))
}

fn git_error(what: &str, e: &GitFailure) -> RepoError {
    match e {
        GitFailure::Spawn(_) | GitFailure::TimedOut(_) => {
            RepoError::Unavailable(format!("{what}: {e}"))
        }
        GitFailure::Exit(_) => RepoError::Unavailable(format!("{what}: git failed: {e}")),
    }
}

fn local_error(what: &str, e: &std::io::Error) -> RepoError {
    RepoError::Unavailable(format!("{what}: {e}"))
}

/// Runs filesystem work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RepoError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RepoError::Unavailable(format!("a blocking task failed: {e}")))
}

/// Removes `*.lock` files under `dir` (the refs tree), a few levels deep.
fn remove_lock_files(dir: &Path, depth: u32) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => remove_lock_files(&path, depth + 1),
            Ok(_) if path.extension().is_some_and(|e| e == "lock") => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn only_file_and_http_urls_are_accepted() {
        for ok in [
            "file:///srv/git/repo.git",
            "http://git.example.com/repo.git",
            "https://github.com/o/r.git",
            "HTTPS://GitHub.com/o/r",
        ] {
            assert!(check_git_url(ok).is_ok(), "{ok} should be accepted");
        }
        for bad in [
            "ssh://git@github.com/o/r.git",
            "git@github.com:o/r.git",
            "ext::sh -c touch% /tmp/pwned",
            "ext::sh",
            "fd::17",
            "https::https://example.com/r",
            "-uhttps://x",
            "--upload-pack=touch /tmp/x",
            "/srv/git/repo.git",
            "./repo",
            "git://example.com/r.git",
            "file://otherhost/srv/repo",
            "https://user:secret@example.com/r.git",
            "https://example.com/r.git?x=1",
            "https://example.com/r.git#frag",
            "https://exa mple.com/r",
            "file:///",
            "",
        ] {
            assert!(
                matches!(check_git_url(bad), Err(RepoError::Invalid(_))),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn refused_urls_never_echo_credentials() {
        for url in [
            "https://user:hunter2@example.com/r",
            "https://hunter2@example.com/r",
            "https://user:hunter2@exa mple.com/r",
            "ssh://user:hunter2@example.com/r",
        ] {
            let Err(RepoError::Invalid(msg)) = check_git_url(url) else {
                panic!("{url} must be refused");
            };
            assert!(!msg.contains("hunter2"), "{msg}");
            assert!(msg.contains("***@"), "{msg}");
        }
    }

    #[test]
    fn fetch_errors_are_classified_from_git_messages() {
        let cases = [
            ("fatal: remote error: upload-pack: not our ref 1111", "want"),
            ("fatal: couldn't find remote ref refs/heads/nope", "want"),
            (
                "fatal: '/tmp/x.git' does not appear to be a git repository / fatal: Could not \
                 read from remote repository.",
                "repo",
            ),
            (
                "fatal: repository 'http://127.0.0.1:8765/x.git/' not found",
                "repo",
            ),
            (
                "fatal: could not read Username for 'http://h': terminal prompts disabled",
                "denied",
            ),
            (
                "fatal: unable to access 'http://h/a.git/': The requested URL returned error: 403",
                "denied",
            ),
            (
                "fatal: unable to access 'http://h/a.git/': The requested URL returned error: 500",
                "unavailable",
            ),
            (
                "fatal: unable to access 'https://x/': Could not resolve host: x",
                "unavailable",
            ),
            ("fatal: transport 'ssh' not allowed", "refused"),
        ];
        for (stderr, want) in cases {
            let got = match classify_fetch_error(stderr) {
                FetchFailure::WantMissing(_) => "want",
                FetchFailure::RepoMissing(_) => "repo",
                FetchFailure::Denied(_) => "denied",
                FetchFailure::Refused(_) => "refused",
                FetchFailure::Unavailable(_) => "unavailable",
            };
            assert_eq!(got, want, "{stderr}");
        }
    }

    #[test]
    fn ls_tree_entries_are_found_by_exact_path() {
        let listing = b"100644 blob 5626abf0f72e58d7a153368ba57db4c673c0e171       4\t.ci.yaml\0\
040000 tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904       -\tdir\0";
        assert_eq!(
            parse_ls_tree(listing, ".ci.yaml"),
            Some(TreeEntry {
                mode: "100644",
                oid: "5626abf0f72e58d7a153368ba57db4c673c0e171",
                size: 4
            })
        );
        assert_eq!(
            parse_ls_tree(listing, "dir").map(|e| e.mode),
            Some("040000")
        );
        assert_eq!(parse_ls_tree(listing, ".ci"), None);
        assert_eq!(parse_ls_tree(b"", ".ci.yaml"), None);
    }

    #[test]
    fn credentials_go_only_to_their_https_host() {
        let src = GitSource::new(tempfile::tempdir().unwrap().path().join("c"))
            .unwrap()
            .with_credential(
                "git.example.com",
                "x-access-token",
                Token::new("s3cret").unwrap(),
            );
        let header = |u: &str| src.auth_header(&Url::parse(u).unwrap());
        let h = header("https://git.example.com/o/r.git").unwrap();
        // base64("x-access-token:s3cret")
        assert_eq!(h, "Authorization: Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0");
        assert_eq!(header("http://git.example.com/o/r.git"), None);
        assert_eq!(header("https://git.example.com:8443/o/r.git"), None);
        assert_eq!(header("https://evil.example.com/o/r.git"), None);
        assert!(!format!("{src:?}").contains("s3cret"));
    }
}
