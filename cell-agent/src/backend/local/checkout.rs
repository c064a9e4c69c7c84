//! Checking a commit out into a workspace, from a bare mirror kept per repository.
//!
//! The first attempt of a repository clones a mirror; later ones fetch into it only when the
//! commit is missing. The workspace is a `--shared` clone of the mirror (its objects are read
//! through `objects/info/alternates`, nothing is copied), and the sandbox binds the mirror
//! read-only. That is deliberate: a `--local` clone would hard-link the mirror's object files
//! into the workspace, where a job (its own user owns them) could `chmod` and rewrite them
//! and so poison the checkouts of every later job of the repository.
//!
//! The cost of sharing: `git gc` in the mirror may prune objects a running workspace still
//! reads, but only unreachable ones older than two weeks (git's default prune expiry).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use flotilla_core::runner::Checkout;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

use super::output::Emitter;
use super::process::{KILL_GRACE, ProcessGroup, StopSignal};

/// Most of git's stderr kept for the failure message.
const MAX_GIT_STDERR: usize = 8 * 1024;

/// Why a checkout did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CheckoutError {
    /// The request is malformed; running it again cannot help.
    #[error("{0}")]
    Invalid(String),
    /// git failed (its stderr is in the message) or could not be run.
    #[error("{0}")]
    Failed(String),
    /// The checkout outlived `checkout_timeout`.
    #[error("the checkout did not finish within {0} s")]
    TimedOut(u64),
    /// The attempt was stopped meanwhile.
    #[error("the checkout was cancelled")]
    Cancelled,
}

/// The mirrors under one directory, with one lock per mirror so that two attempts never
/// clone or fetch into the same mirror at once.
#[derive(Debug)]
pub(super) struct Mirrors {
    dir: PathBuf,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// A deadline and a stop signal: what every git command is raced against.
pub(crate) struct Bounds<'a> {
    pub(crate) stop: &'a mut StopSignal,
    pub(crate) deadline: Instant,
    pub(crate) timeout_secs: u64,
}

impl Mirrors {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            locks: Mutex::default(),
        }
    }

    /// Checks `checkout.sha` out into the empty directory `workspace`. Returns the mirror the
    /// workspace's objects live in (the sandbox must make it readable). `scratch` names the
    /// temporary directory of a first clone uniquely.
    pub(super) async fn checkout(
        &self,
        checkout: &Checkout,
        workspace: &Path,
        scratch: &str,
        bounds: &mut Bounds<'_>,
        emitter: &Emitter,
    ) -> Result<PathBuf, CheckoutError> {
        let sha = valid_sha(&checkout.sha)?;
        let git_ref = valid_ref(&checkout.git_ref)?;
        let shown_url = without_credentials(&checkout.repo_url);
        emitter.system(None, format!("Checking out {sha} from {shown_url}"));

        let mirror = self.dir.join(mirror_name(&checkout.repo_url));
        let lock = self.lock_for(&mirror);
        let guard = lock.lock().await;

        if !mirror.join("HEAD").is_file() {
            emitter.system(None, format!("Cloning a mirror of {shown_url}"));
            let tmp = self.dir.join(format!(".tmp-{scratch}"));
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            let cloned = git(
                None,
                [
                    os("clone"),
                    os("--mirror"),
                    os("--quiet"),
                    os("--"),
                    os(&checkout.repo_url),
                    tmp.clone().into(),
                ],
                bounds,
            )
            .await
            .and_then(|out| out.into_result(&format!("cloning {shown_url}")));
            if let Err(e) = cloned {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Err(e);
            }
            // Cloned aside and renamed, so an interrupted clone never looks like a mirror.
            let _ = tokio::fs::remove_dir_all(&mirror).await;
            tokio::fs::rename(&tmp, &mirror).await.map_err(|e| {
                CheckoutError::Failed(format!("could not move the new mirror in place: {e}"))
            })?;
        }

        if !has_commit(&mirror, &sha, bounds).await? {
            emitter.system(None, format!("Fetching {sha} from {shown_url}"));
            // By id first (exact, and works for commits no branch points at any more); the
            // ref when the server refuses fetching by id.
            for want in [sha.as_str(), git_ref.as_str()] {
                let fetched = git(
                    Some(&mirror),
                    [
                        os("fetch"),
                        os("--quiet"),
                        os("origin"),
                        os("--end-of-options"),
                        os(want),
                    ],
                    bounds,
                )
                .await?;
                if fetched.success && has_commit(&mirror, &sha, bounds).await? {
                    break;
                }
                if !fetched.success {
                    emitter.system(None, format!("git fetch {want}: {}", fetched.stderr.trim()));
                }
            }
            if !has_commit(&mirror, &sha, bounds).await? {
                return Err(CheckoutError::Failed(format!(
                    "commit {sha} is not in {shown_url}, not even after fetching {git_ref}"
                )));
            }
        }

        git(
            None,
            [
                os("clone"),
                os("--quiet"),
                os("--shared"),
                os("--no-checkout"),
                os("--"),
                mirror.clone().into(),
                workspace.into(),
            ],
            bounds,
        )
        .await?
        .into_result("cloning the mirror into the workspace")?;
        drop(guard);

        // The workspace's `origin` is the real repository (without credentials), not the
        // mirror, so `git fetch` in a job means what it says.
        git(
            Some(workspace),
            [os("remote"), os("set-url"), os("origin"), os(&shown_url)],
            bounds,
        )
        .await?
        .into_result("setting the workspace's origin")?;
        git(
            Some(workspace),
            [
                os("checkout"),
                os("--quiet"),
                os("--detach"),
                os("--end-of-options"),
                os(&sha),
            ],
            bounds,
        )
        .await?
        .into_result(&format!("checking out {sha}"))?;
        Ok(mirror)
    }

    fn lock_for(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(mirror.to_path_buf()).or_default().clone()
    }
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_owned()
}

async fn has_commit(
    mirror: &Path,
    sha: &str,
    bounds: &mut Bounds<'_>,
) -> Result<bool, CheckoutError> {
    let out = git(
        Some(mirror),
        [
            os("cat-file"),
            os("-e"),
            os("--end-of-options"),
            os(format!("{sha}^{{commit}}")),
        ],
        bounds,
    )
    .await?;
    Ok(out.success)
}

/// What a git command left behind.
pub(crate) struct GitOutput {
    pub(crate) success: bool,
    pub(crate) stderr: String,
}

impl GitOutput {
    pub(crate) fn into_result(self, what: &str) -> Result<(), CheckoutError> {
        if self.success {
            Ok(())
        } else {
            Err(CheckoutError::Failed(format!(
                "{what} failed: {}",
                self.stderr.trim()
            )))
        }
    }
}

/// Runs git (from the agent's `PATH`, with the agent's environment minus anything that
/// would point it at another repository, never prompting), in its own process group so
/// that a stop kills its helpers (`git-remote-https`, `index-pack`) too.
pub(crate) async fn git<I>(
    cwd: Option<&Path>,
    args: I,
    bounds: &mut Bounds<'_>,
) -> Result<GitOutput, CheckoutError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut command = Command::new("git");
    if let Some(cwd) = cwd {
        command.arg("-C").arg(cwd);
    }
    command
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for var in [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_CEILING_DIRECTORIES",
    ] {
        command.env_remove(var);
    }
    let mut child = command
        .spawn()
        .map_err(|e| CheckoutError::Failed(format!("could not run git: {e}")))?;
    let group = ProcessGroup::led_by(child.id());
    let stderr = child.stderr.take();
    let run = async {
        let (status, stderr) = tokio::join!(child.wait(), read_bounded(stderr));
        (status, stderr)
    };
    tokio::select! {
        (status, stderr) = run => {
            group.finish();
            let status = status
                .map_err(|e| CheckoutError::Failed(format!("waiting for git failed: {e}")))?;
            Ok(GitOutput { success: status.success(), stderr })
        }
        () = bounds.stop.stopped() => {
            group.kill();
            let _ = tokio::time::timeout(KILL_GRACE, child.wait()).await;
            Err(CheckoutError::Cancelled)
        }
        () = tokio::time::sleep_until(bounds.deadline) => {
            group.kill();
            let _ = tokio::time::timeout(KILL_GRACE, child.wait()).await;
            Err(CheckoutError::TimedOut(bounds.timeout_secs))
        }
    }
}

/// Reads a pipe to its end, keeping the first [`MAX_GIT_STDERR`] bytes (reading on so that
/// the writer never blocks on a full pipe).
async fn read_bounded<R: AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = MAX_GIT_STDERR.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The commit id, checked to be what git prints (SHA-1 or SHA-256 hex), so that it can
/// never be read as an option or a revision expression.
pub(crate) fn valid_sha(sha: &str) -> Result<String, CheckoutError> {
    let sha = sha.to_ascii_lowercase();
    if matches!(sha.len(), 40 | 64) && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha)
    } else {
        Err(CheckoutError::Invalid(format!(
            "{sha:?} is not a commit id (40 or 64 hex digits)"
        )))
    }
}

/// The ref, checked to be something git cannot read as an option.
pub(crate) fn valid_ref(git_ref: &str) -> Result<String, CheckoutError> {
    let fine = !git_ref.is_empty()
        && !git_ref.starts_with('-')
        && !git_ref.chars().any(|c| c.is_whitespace() || c.is_control());
    if fine {
        Ok(git_ref.to_owned())
    } else {
        Err(CheckoutError::Invalid(format!(
            "{git_ref:?} is not a git ref"
        )))
    }
}

/// `url` without the user-info part (`https://user:token@host/…` → `https://host/…`), for
/// logs and for the workspace's `origin`, which the job can read.
pub(crate) fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // `host:path` and plain paths: `git@` names an ssh user, not a secret.
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// A directory name for the mirror of `url`: a readable prefix plus a hash of the whole URL,
/// so that names are unique, short enough for any file system, and free of credentials.
fn mirror_name(url: &str) -> String {
    let readable: String = without_credentials(url)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let tail_start = readable.len().saturating_sub(80);
    format!(
        "{}-{:016x}.git",
        &readable[tail_start..],
        fnv1a64(url.as_bytes())
    )
}

/// FNV-1a, written out because the name must never change between releases (std's hasher
/// may) and a cryptographic hash would be a dependency for a cache key.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_logs_or_mirror_names() {
        let url = "https://x-access-token:s3cret@github.com/acme/app.git";
        assert_eq!(without_credentials(url), "https://github.com/acme/app.git");
        assert!(!mirror_name(url).contains("s3cret"));
        assert_eq!(
            without_credentials("git@github.com:acme/app.git"),
            "git@github.com:acme/app.git"
        );
    }

    #[test]
    fn mirror_names_are_stable_distinct_and_bounded() {
        let a = mirror_name("https://github.com/acme/app.git");
        assert_eq!(a, mirror_name("https://github.com/acme/app.git"));
        assert_ne!(a, mirror_name("https://github.com/acme/app_git"));
        assert!(a.starts_with("https___github.com_acme_app.git-"));
        let long = format!("https://example.com/{}", "x".repeat(1000));
        assert!(mirror_name(&long).len() < 120);
    }

    #[test]
    fn commit_ids_and_refs_that_could_be_options_are_refused() {
        assert!(valid_sha(&"a".repeat(40)).is_ok());
        assert!(valid_sha("--upload-pack=touch /tmp/x").is_err());
        assert!(valid_sha("HEAD~1").is_err());
        assert!(valid_ref("refs/heads/main").is_ok());
        assert!(valid_ref("--upload-pack=x").is_err());
    }
}
