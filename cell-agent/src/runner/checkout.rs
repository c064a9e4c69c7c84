//! `flotilla runner checkout`: checks a job's commit out into the workspace of a runner pod.
//!
//! Runs in an init container of the Flotilla image (which has `git`), before the job's own
//! container, whose image may have no git at all. With the spec's [`Checkout`] it runs, in the
//! workspace: `git init`, `git fetch --depth 1 <url> <sha>` (when the server refuses to serve
//! a commit by id: a fetch of the ref, and a check that the commit came with it), and
//! `git checkout --detach <sha>`. The workspace's `origin` is set to the URL without its
//! credentials, so that a job's own `git fetch` means what it says and cannot read the token.
//!
//! Output: system line records on its output (never `started` or `finished`: the job
//! container's wrapper writes those), with credentials removed from every URL and git
//! message. The outcome goes to the termination message: `Failed(Config)` when the commit id,
//! ref or URL is malformed (running it again cannot help), `Failed(Infra{RunnerCrash})` when
//! the checkout fails otherwise or outlives its timeout (`--timeout`), `Failed(Cancelled)` on SIGTERM
//! or SIGINT. The exit status follows [`exit_code_for`]. A job without a checkout leaves the
//! workspace alone and exits 0.
//!
//! git never prompts (`GIT_TERMINAL_PROMPT=0`) and runs in its own process group, killed
//! whole on a stop or at the timeout. The workspace is usually owned by another user (a
//! volume owned by root, writable through the pod's `fsGroup`), which git refuses to work in
//! unless it is named in `safe.directory`: every command names it.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::{Assignment, Checkout};
use tokio::sync::watch;
use tokio::time::Instant;

use super::exec::{RecordSink, Signals, read_spec, write_termination};
use super::record::{PROTOCOL_VERSION, Termination, exit_code_for};
use crate::backend::local::{
    Bounds, CheckoutError, git, valid_ref, valid_sha, without_credentials,
};

/// What `flotilla runner checkout` is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutOptions {
    /// The job spec: an [`flotilla_core::runner::Assignment`] as JSON.
    pub spec: PathBuf,
    /// The directory to check the code out into; created when missing.
    pub workspace: PathBuf,
    /// Where to write the [`Termination`](super::record::Termination); `None` writes none.
    pub termination_log: Option<PathBuf>,
    /// Longest the whole checkout may take (`flotilla runner checkout` defaults to 10 min).
    pub timeout: Duration,
}

/// Checks out the commit the spec names, writing system line records to `out`, and returns
/// the exit status (see the module documentation). Listens for SIGTERM and SIGINT while it
/// runs (must be called inside a Tokio runtime with signals and timers enabled).
pub async fn checkout<W: Write + Send + 'static>(opts: &CheckoutOptions, out: W) -> u8 {
    let sink = RecordSink::new(out);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Held here until the end: a dropped sender would count as a stop.
    let stop_tx = Arc::new(stop_tx);
    let signals = Signals::listen(&sink, &stop_tx);
    let spec = read_spec(&opts.spec).await;
    let target = Target {
        workspace: &opts.workspace,
        termination_log: opts.termination_log.as_deref(),
        timeout: opts.timeout,
    };
    let termination = checkout_assignment(
        spec.as_ref().map_err(String::as_str),
        &target,
        stop_rx,
        signals.as_ref(),
        &sink,
    )
    .await;
    drop(signals);
    drop(stop_tx);
    exit_code_for(termination.outcome)
}

/// Where a checkout goes, where its outcome is written, and how long it may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target<'a> {
    /// The directory to check the code out into; created when missing.
    pub(super) workspace: &'a Path,
    /// Where to write the [`Termination`]; `None` writes none.
    pub(super) termination_log: Option<&'a Path>,
    /// Longest the whole checkout may take.
    pub(super) timeout: Duration,
}

/// The checkout of `assignment` (or, for `Err`, the report of why there is none to run),
/// shared by `flotilla runner checkout`, which reads the assignment from its spec file, and
/// `flotilla runner standby`, which is sent it and must never write its clone URL to disk.
///
/// Writes system lines to `sink` and the [`Termination`] to the target's termination log
/// (none for a job without a checkout, which leaves the workspace alone), and returns that
/// termination: its outcome decides the exit status. `stop` (fired by `true` or by dropping
/// its sender) cancels the checkout; `signals` names what fired it in the message.
pub(super) async fn checkout_assignment<W: Write>(
    assignment: Result<&Assignment, &str>,
    target: &Target<'_>,
    stop: watch::Receiver<bool>,
    signals: Option<&Signals>,
    sink: &RecordSink<W>,
) -> Termination {
    let mut stop = stop.into();
    let result = match assignment {
        Err(why) => Err(CheckoutError::Failed(why.to_owned())),
        Ok(assignment) => match &assignment.checkout {
            None => {
                sink.system("nothing to check out: the job has no repository");
                return Termination {
                    v: PROTOCOL_VERSION,
                    outcome: Outcome::Succeeded,
                    message: None,
                };
            }
            Some(checkout) => {
                let mut bounds = Bounds {
                    stop: &mut stop,
                    deadline: deadline_after(target.timeout),
                    timeout_secs: target.timeout.as_secs(),
                };
                fetch(checkout, target.workspace, &mut bounds, sink).await
            }
        },
    };
    let (outcome, message) = match result {
        Ok(()) => (Outcome::Succeeded, None),
        Err(e @ CheckoutError::Invalid(_)) => (
            Outcome::Failed(FailureClass::Config),
            Some(format!("checkout refused: {e}")),
        ),
        Err(CheckoutError::Cancelled) => (
            Outcome::Failed(FailureClass::Cancelled),
            Some(match signals.and_then(Signals::caught) {
                Some(signal) => format!("the checkout was cancelled by {signal}"),
                None => "the checkout was cancelled".to_owned(),
            }),
        ),
        Err(e) => (
            Outcome::Failed(FailureClass::Infra {
                reason: InfraReason::RunnerCrash,
            }),
            Some(format!("checkout failed: {e}")),
        ),
    };
    let message = message.map(|m| one_line(&m));
    if let Some(message) = &message {
        sink.system(message.clone());
    }
    write_termination(sink, target.termination_log, outcome, message.clone());
    Termination {
        v: PROTOCOL_VERSION,
        outcome,
        message,
    }
}

/// The checkout itself; every error message is free of the URL's credentials.
async fn fetch<W: Write>(
    checkout: &Checkout,
    workspace: &Path,
    bounds: &mut Bounds<'_>,
    sink: &RecordSink<W>,
) -> Result<(), CheckoutError> {
    let sha = valid_sha(&checkout.sha)?;
    let git_ref = valid_ref(&checkout.git_ref)?;
    let url = checkout.repo_url.as_str();
    valid_url(url)?;
    let shown_url = without_credentials(url);
    let clean = |e: CheckoutError| match e {
        CheckoutError::Failed(why) => CheckoutError::Failed(redact(&why, url)),
        other => other,
    };
    sink.system(format!(
        "Checking out {sha} ({git_ref}) from {shown_url} into {}",
        workspace.display()
    ));

    tokio::fs::create_dir_all(workspace).await.map_err(|e| {
        CheckoutError::Failed(format!(
            "could not create the workspace {}: {e}",
            workspace.display()
        ))
    })?;
    let workspace = workspace
        .canonicalize()
        .unwrap_or_else(|_| workspace.to_path_buf());
    let mut safe_directory = OsString::from("safe.directory=");
    safe_directory.push(&workspace);
    // `git -C <workspace> -c safe.directory=<workspace> <args>`.
    let in_workspace = |args: &[&str]| -> Vec<OsString> {
        let mut all = vec!["-c".into(), safe_directory.clone()];
        all.extend(args.iter().map(OsString::from));
        all
    };

    git(
        Some(&workspace),
        in_workspace(&["-c", "init.defaultBranch=main", "init", "--quiet"]),
        bounds,
    )
    .await?
    .into_result("git init")
    .map_err(clean)?;
    for (key, value) in [
        ("remote.origin.url", shown_url.as_str()),
        ("remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"),
    ] {
        git(
            Some(&workspace),
            in_workspace(&["config", key, value]),
            bounds,
        )
        .await?
        .into_result("setting the workspace's origin")
        .map_err(clean)?;
    }

    // By id first: exact, shallow, and it works for commits no branch points at any more.
    let by_id = git(
        Some(&workspace),
        in_workspace(&[
            "fetch",
            "--quiet",
            "--no-tags",
            "--depth",
            "1",
            "--end-of-options",
            url,
            &sha,
        ]),
        bounds,
    )
    .await?;
    if !by_id.success || !has_commit(&workspace, &in_workspace, &sha, bounds).await? {
        sink.system(one_line(&redact(
            &format!(
                "fetching {sha} by id failed ({}); fetching {git_ref} instead",
                by_id.stderr.trim()
            ),
            url,
        )));
        // The ref's whole history: the commit may be behind its tip by now.
        git(
            Some(&workspace),
            in_workspace(&[
                "fetch",
                "--quiet",
                "--no-tags",
                "--end-of-options",
                url,
                &git_ref,
            ]),
            bounds,
        )
        .await?
        .into_result(&format!("fetching {git_ref} from {shown_url}"))
        .map_err(clean)?;
        if !has_commit(&workspace, &in_workspace, &sha, bounds).await? {
            return Err(CheckoutError::Failed(format!(
                "commit {sha} is not in {shown_url}, not even after fetching {git_ref}"
            )));
        }
    }

    git(
        Some(&workspace),
        in_workspace(&[
            "checkout",
            "--quiet",
            "--force",
            "--detach",
            "--end-of-options",
            &sha,
        ]),
        bounds,
    )
    .await?
    .into_result(&format!("checking out {sha}"))
    .map_err(clean)?;
    sink.system(format!("Checked out {sha}"));
    Ok(())
}

async fn has_commit(
    workspace: &Path,
    in_workspace: &impl Fn(&[&str]) -> Vec<OsString>,
    sha: &str,
    bounds: &mut Bounds<'_>,
) -> Result<bool, CheckoutError> {
    let commit = format!("{sha}^{{commit}}");
    let out = git(
        Some(workspace),
        in_workspace(&["cat-file", "-e", "--end-of-options", &commit]),
        bounds,
    )
    .await?;
    Ok(out.success)
}

/// Refuses what git could read as an option, and control characters.
fn valid_url(url: &str) -> Result<(), CheckoutError> {
    if url.is_empty() || url.starts_with('-') || url.chars().any(char::is_control) {
        Err(CheckoutError::Invalid(format!(
            "{:?} is not a repository URL",
            without_credentials(url)
        )))
    } else {
        Ok(())
    }
}

/// `text` (a git message) with the credentials of `url` removed: the URL itself is replaced
/// by its credential-free form, any other `user:secret@` of it dropped, and the secret
/// (the password, or a user part long enough to be a token) masked wherever it appears.
fn redact(text: &str, url: &str) -> String {
    let shown = without_credentials(url);
    if shown == url {
        return text.to_owned();
    }
    let userinfo = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once('@'))
        .map(|(userinfo, _)| userinfo)
        .unwrap_or_default();
    let mut text = text.replace(url, &shown);
    if userinfo.is_empty() {
        return text;
    }
    text = text.replace(&format!("{userinfo}@"), "");
    let secret = match userinfo.split_once(':') {
        Some((_, password)) => password,
        None if userinfo.len() >= 8 => userinfo,
        None => "",
    };
    if !secret.is_empty() {
        text = text.replace(secret, "***");
    }
    text
}

/// `text` on one line, with its whitespace runs collapsed: a message and a record line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `now + after`, or a century from now when that overflows.
fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_messages_lose_the_credentials_of_the_url() {
        let url = "https://x-access-token:s3cr3t-t0ken@github.com/acme/app.git";
        let message = format!(
            "fatal: unable to access '{url}/': The requested URL returned error: 403\n\
             remote: invalid password s3cr3t-t0ken for x-access-token:s3cr3t-t0ken@github.com"
        );
        let clean = redact(&message, url);
        assert!(!clean.contains("s3cr3t"), "{clean}");
        assert!(
            clean.contains("https://github.com/acme/app.git/"),
            "{clean}"
        );
        let token_only = "https://ghp_abcdefghijklmnop@github.com/acme/app.git";
        let clean = redact(&format!("cannot fetch {token_only}"), token_only);
        assert_eq!(clean, "cannot fetch https://github.com/acme/app.git");
        assert_eq!(redact("plain", "/srv/git/app.git"), "plain");
    }

    #[test]
    fn urls_that_git_could_read_as_options_are_refused() {
        assert!(valid_url("https://github.com/acme/app.git").is_ok());
        assert!(valid_url("/srv/git/app.git").is_ok());
        assert!(valid_url("--upload-pack=touch /tmp/x").is_err());
        assert!(valid_url("").is_err());
        assert!(valid_url("https://host/a\nb").is_err());
    }
}
