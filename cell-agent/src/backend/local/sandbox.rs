//! Finding and checking `bwrap`, and building the command line a step runs under.
//!
//! The sandbox, when on, gives each step:
//! - the host's file system read-only, with a private `/dev`, `/proc` and `/tmp`;
//! - every hidden directory (the agent's data directory by default) replaced by an empty
//!   tmpfs, then its own workspace bound back read-write and, read-only, the git mirror its
//!   checkout's objects live in;
//! - its own PID, IPC and UTS namespaces, a new session (no controlling terminal to inject
//!   keystrokes into) and **no capabilities**: `bwrap` started by root keeps every capability
//!   unless told otherwise, and root with `CAP_SYS_ADMIN` simply unmounts the tmpfs that hides
//!   the other workspaces.
//!
//! The network is shared with the host (jobs fetch dependencies), and jobs run as the agent's
//! user: run the agent as a dedicated user, not root, for anything stronger than that.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::config::SandboxMode;

/// How steps are isolated, decided once when the backend is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Isolation {
    /// Run under this `bwrap`.
    Bwrap(PathBuf),
    /// Run unsandboxed (mode `Off`, or `Auto` without a working `bwrap`).
    Unsandboxed,
    /// Mode `Required` without a working `bwrap`: fail every attempt with this reason.
    Refused(String),
}

/// Decides how steps will run: finds `bwrap` and checks it can actually build a sandbox
/// here (in containers without the needed privileges it is installed but fails), so that
/// `Auto` falls back up front instead of failing every job.
pub(super) fn resolve(mode: SandboxMode, bwrap_path: Option<&Path>) -> Isolation {
    if mode == SandboxMode::Off {
        return Isolation::Unsandboxed;
    }
    let problem = match bwrap_path
        .map(Path::to_path_buf)
        .or_else(|| find_in_path("bwrap"))
    {
        None => "bwrap was not found on PATH".to_owned(),
        Some(bwrap) if !is_executable(&bwrap) => {
            format!("bwrap was not found at {}", bwrap.display())
        }
        Some(bwrap) => match probe(&bwrap) {
            Ok(()) => return Isolation::Bwrap(bwrap),
            Err(why) => format!("{} cannot build a sandbox here: {why}", bwrap.display()),
        },
    };
    match mode {
        SandboxMode::Required => Isolation::Refused(problem),
        _ => {
            tracing::warn!(
                reason = %problem,
                "SANDBOX DISABLED: job steps will run unsandboxed, with full access to this \
                 host as the agent's user, including other jobs' workspaces. Install a \
                 working bwrap or set sandbox to Required to refuse jobs instead."
            );
            Isolation::Unsandboxed
        }
    }
}

/// Runs `bwrap` once with the options every step uses. Blocking, but it takes milliseconds
/// and happens once, when the backend is built.
fn probe(bwrap: &Path) -> Result<(), String> {
    let mut args = isolation_args();
    // The sandboxed command is bwrap itself: the one program known to exist.
    args.extend([OsString::from("--"), bwrap.into(), "--version".into()]);
    let output = std::process::Command::new(bwrap)
        .args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Namespaces, session and capabilities, shared by the probe and every step.
fn isolation_args() -> Vec<OsString> {
    [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        // bwrap's own child (PID 1 of the namespace) dies when bwrap does, and with it every
        // process in the namespace: killing bwrap's process group is enough to end a step.
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

/// The `bwrap` arguments for one step, up to and including the `--` before the command.
///
/// Mount order matters: bwrap applies them in order, so tmpfs mounts that hide directories
/// come before the binds that put the workspace (inside a hidden directory) back, and
/// parents before children. bwrap creates missing mount points inside the tmpfs.
pub(super) fn bwrap_args(
    workspace: &Path,
    hidden: &[PathBuf],
    read_only: &[PathBuf],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        .into_iter()
        .map(OsString::from)
        .collect();
    let mut tmpfs: Vec<&Path> = vec![Path::new("/tmp")];
    // A hidden directory that does not exist has nothing to hide, and bwrap could not create
    // a mount point for it on the read-only root.
    tmpfs.extend(hidden.iter().map(PathBuf::as_path).filter(|p| p.is_dir()));
    tmpfs.sort_by_key(|p| p.components().count());
    tmpfs.dedup();
    for dir in tmpfs {
        args.extend(["--tmpfs".into(), dir.into()]);
    }
    for dir in read_only {
        args.extend(["--ro-bind".into(), dir.into(), dir.into()]);
    }
    args.extend([
        "--bind".into(),
        workspace.into(),
        workspace.into(),
        "--chdir".into(),
        workspace.into(),
    ]);
    args.extend(isolation_args());
    args.push("--".into());
    args
}

/// The first executable called `name` on the agent's `PATH`.
pub(super) fn find_in_path(name: &str) -> Option<PathBuf> {
    find_in(&std::env::var_os("PATH")?, name)
}

/// The first executable called `name` in the directories of `path` (a `PATH` value).
pub(super) fn find_in(path: &OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hiding_mounts_come_before_the_workspace_bind_and_parents_before_children() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let inner = data.join("secrets");
        std::fs::create_dir_all(&inner).unwrap();
        let ws = data.join("workspaces/1-1");
        let missing = root.path().join("missing");
        let args = bwrap_args(&ws, &[inner.clone(), data.clone(), missing.clone()], &[]);
        let pos = |needle: &Path| {
            args.iter()
                .position(|a| Path::new(a) == needle)
                .unwrap_or_else(|| panic!("{} not in {args:?}", needle.display()))
        };
        assert!(pos(Path::new("/tmp")) < pos(&data));
        assert!(pos(&data) < pos(&inner));
        assert!(pos(&inner) < pos(&ws));
        assert!(!args.iter().any(|a| Path::new(a) == missing));
        assert!(args.iter().any(|a| a == "ALL"), "capabilities are dropped");
        assert_eq!(args.last().map(OsString::as_os_str), Some("--".as_ref()));
    }

    #[test]
    fn a_missing_bwrap_is_refused_when_required_and_tolerated_in_auto() {
        let nowhere = Path::new("/nonexistent/bwrap");
        assert!(matches!(
            resolve(SandboxMode::Required, Some(nowhere)),
            Isolation::Refused(why) if why.contains("/nonexistent/bwrap")
        ));
        assert_eq!(
            resolve(SandboxMode::Auto, Some(nowhere)),
            Isolation::Unsandboxed
        );
        assert_eq!(resolve(SandboxMode::Off, None), Isolation::Unsandboxed);
    }
}
