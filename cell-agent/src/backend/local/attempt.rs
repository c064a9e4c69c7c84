//! One attempt, start to finish: the task [`run`] that the backend spawns per attempt.
//!
//! Workspace → checkout → steps, one process group per step → cleanup → `Finished`. Every
//! path out of here, including set-up failures, ends in exactly one `Finished`.
//!
//! The steps themselves are run by `Steps`, shared with [`in_place`] (the runner wrapper's
//! `flotilla runner exec`, which runs them in a container's existing workspace).

use std::ffi::OsStr;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::pipeline::Step;
use flotilla_core::runner::{Assignment, RunnerEvents, Stream};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::checkout::{Bounds, CheckoutError};
use super::config::Limits;
use super::output::{Emitter, read_lines};
use super::process::{KILL_GRACE, ProcessGroup, StopSignal};
use super::sandbox::{Isolation, bwrap_args, find_in};
use super::{FALLBACK_PATH, Inner};

const CRASH: Outcome = Outcome::Failed(FailureClass::Infra {
    reason: InfraReason::RunnerCrash,
});
const CANCELLED: Outcome = Outcome::Failed(FailureClass::Cancelled);
const TIMED_OUT: Outcome = Outcome::Failed(FailureClass::Timeout);

/// Runs the attempt, cleans up after it, and reports `Finished` last — after the workspace
/// is gone and the backend has forgotten the attempt, so whoever reacts to `Finished` sees
/// a consistent backend.
pub(super) async fn run(
    inner: Arc<Inner>,
    assignment: Assignment,
    events: Arc<dyn RunnerEvents>,
    stop: StopSignal,
) {
    let job = assignment.job;
    let fence = assignment.fence;
    let emitter = Emitter::new(&assignment, events);
    let workspace = inner.workspace_path(&job, fence);
    let mut attempt = Attempt {
        inner: &inner,
        assignment: &assignment,
        emitter: &emitter,
        stop,
        workspace: &workspace,
    };
    let outcome = attempt.execute().await;

    if !inner.config.keep_workspaces
        && let Err(e) = remove_tree(&workspace).await
    {
        tracing::warn!(job = %job, fence = %fence, error = %e, "Could not remove the workspace.");
        emitter.system(None, format!("could not remove the workspace: {e}"));
    }
    inner.forget(&job, fence);
    tracing::info!(job = %job, fence = %fence, outcome = ?outcome, "Attempt finished.");
    emitter.finished(outcome);
}

struct Attempt<'a> {
    inner: &'a Inner,
    assignment: &'a Assignment,
    emitter: &'a Emitter,
    stop: StopSignal,
    workspace: &'a Path,
}

/// How one step's process ended.
enum StepEnd {
    Exited(ExitStatus),
    Cancelled,
    TimedOut,
    Lost(String),
}

impl Attempt<'_> {
    async fn execute(&mut self) -> Outcome {
        if let Err(why) = check_assignment(self.assignment) {
            self.emitter.system(None, why);
            return Outcome::Failed(FailureClass::Config);
        }
        if let Isolation::Refused(why) = &self.inner.isolation {
            self.emitter.system(
                None,
                format!("the sandbox is required but unavailable, so nothing was run: {why}"),
            );
            return CRASH;
        }
        if self.stop.is_stopped() {
            return CANCELLED;
        }
        let made = if self.inner.take_prepared(self.workspace) {
            Ok(())
        } else {
            fresh_dir(self.workspace).await
        };
        if let Err(e) = made {
            self.emitter
                .system(None, format!("could not create the workspace: {e}"));
            return CRASH;
        }
        let mut read_only = Vec::new();
        if let Some(checkout) = &self.assignment.checkout {
            let timeout = self.inner.config.checkout_timeout;
            let mut bounds = Bounds {
                stop: &mut self.stop,
                deadline: deadline_after(timeout),
                timeout_secs: timeout.as_secs(),
            };
            let scratch = format!("{}-{}", self.assignment.job, self.assignment.fence);
            let result = self
                .inner
                .mirrors
                .checkout(
                    checkout,
                    self.workspace,
                    &scratch,
                    &mut bounds,
                    self.emitter,
                )
                .await;
            match result {
                Ok(mirror) => read_only.push(mirror),
                Err(CheckoutError::Cancelled) => {
                    self.emitter.system(None, "cancelled during the checkout");
                    return CANCELLED;
                }
                Err(e @ CheckoutError::Invalid(_)) => {
                    self.emitter.system(None, format!("checkout refused: {e}"));
                    return Outcome::Failed(FailureClass::Config);
                }
                Err(e) => {
                    self.emitter.system(None, format!("checkout failed: {e}"));
                    return CRASH;
                }
            }
        }
        self.run_steps(&read_only).await
    }

    async fn run_steps(&mut self, read_only: &[PathBuf]) -> Outcome {
        let inner = self.inner;
        let sandbox = match &inner.isolation {
            Isolation::Bwrap(bwrap) => Some(Sandbox {
                bwrap,
                hidden: &inner.config.hidden_dirs,
                read_only,
            }),
            Isolation::Unsandboxed | Isolation::Refused(_) => None,
        };
        let steps = Steps {
            assignment: self.assignment,
            workspace: self.workspace,
            emitter: self.emitter,
            launch: Launch {
                sandbox,
                shell: Shell::Bash(&inner.bash, &inner.config.limits),
                path: &inner.path,
                home: self.workspace,
            },
        };
        let (job, fence) = (self.assignment.job, self.assignment.fence);
        steps
            .run(&mut self.stop, &|at_ms| {
                inner.mark_started(&job, fence, at_ms)
            })
            .await
    }
}

/// Runs `assignment`'s steps in `workspace` as it is: no sandbox, no checkout, no limits,
/// nothing removed afterwards (the body of [`super::run_in_place`], which reports
/// `Finished`). Steps get the process's own `PATH` and `HOME` (falling back to the standard
/// path and the workspace), and `bash -eo pipefail`, or `sh -e` where there is no bash.
pub(super) async fn in_place(
    assignment: &Assignment,
    workspace: &Path,
    emitter: &Emitter,
    mut stop: StopSignal,
) -> Outcome {
    if let Err(why) = check_assignment(assignment) {
        emitter.system(None, why);
        return Outcome::Failed(FailureClass::Config);
    }
    let path = std::env::var_os("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| FALLBACK_PATH.into());
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map_or_else(|| workspace.to_path_buf(), PathBuf::from);
    let bash = find_in(&path, "bash");
    let sh = find_in(&path, "sh");
    let shell = match (&bash, &sh) {
        (Some(bash), _) => Shell::Bash(bash, &NO_LIMITS),
        (None, Some(sh)) => {
            emitter.system(
                None,
                "bash is not installed in this image, so steps run with `sh -e` instead: \
                 pipefail is unavailable, and a failure early in a pipeline goes unnoticed",
            );
            Shell::Sh(sh)
        }
        (None, None) => {
            emitter.system(
                None,
                format!(
                    "neither bash nor sh is on PATH ({}), so no step can run",
                    path.to_string_lossy()
                ),
            );
            return CRASH;
        }
    };
    let steps = Steps {
        assignment,
        workspace,
        emitter,
        launch: Launch {
            sandbox: None,
            shell,
            path: &path,
            home: &home,
        },
    };
    steps.run(&mut stop, &|_| {}).await
}

/// No `ulimit`s: where steps run in place (a container), the container's own limits apply.
const NO_LIMITS: Limits = Limits {
    cpu_secs: None,
    open_files: None,
    processes: None,
};

/// How each step's process is started: what differs between the backend's attempts and
/// [`in_place`].
struct Launch<'a> {
    /// Run each step inside this sandbox; `None` runs it directly.
    sandbox: Option<Sandbox<'a>>,
    /// The shell that runs each step's script.
    shell: Shell<'a>,
    /// `PATH` for steps.
    path: &'a OsStr,
    /// `HOME` for steps.
    home: &'a Path,
}

/// `bwrap` and what it hides and binds (see `sandbox::bwrap_args`).
struct Sandbox<'a> {
    bwrap: &'a Path,
    hidden: &'a [PathBuf],
    read_only: &'a [PathBuf],
}

/// The shell a step's script runs in.
enum Shell<'a> {
    /// `bash -eo pipefail -c`, with these limits applied first.
    Bash(&'a Path, &'a Limits),
    /// `sh -e -c`, for images without bash: no pipefail, no limits.
    Sh(&'a Path),
}

/// An assignment's steps, run in order in one workspace, one process group per step.
struct Steps<'a> {
    assignment: &'a Assignment,
    workspace: &'a Path,
    emitter: &'a Emitter,
    launch: Launch<'a>,
}

impl Steps<'_> {
    /// Runs the steps until one fails, the attempt is stopped or the timeout (counted from
    /// the first step's start) passes. Emits `Started` once the first step is spawned and
    /// then calls `on_started` with its stamp; does not emit `Finished`.
    async fn run(&self, stop: &mut StopSignal, on_started: &(dyn Fn(u64) + Sync)) -> Outcome {
        let mark_started = || on_started(self.emitter.started());
        let steps = &self.assignment.steps;
        if steps.is_empty() {
            // Nothing to execute, but the job state machine only lets a started job succeed.
            mark_started();
            return Outcome::Succeeded;
        }
        let timeout_secs = self.assignment.timeout_secs;
        // Set when the first step starts: the timeout does not count checkout time.
        let mut deadline: Option<Instant> = None;
        for (i, step) in steps.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            if stop.is_stopped() {
                return CANCELLED;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.emitter.system(
                    None,
                    format!("the job ran past its timeout of {timeout_secs} s"),
                );
                return TIMED_OUT;
            }
            self.emitter.system(
                Some(index),
                format!("==> step {}/{}: {}", i + 1, steps.len(), step.name),
            );
            let child = match self.command(step).spawn() {
                Ok(child) => child,
                Err(e) => {
                    self.emitter
                        .system(Some(index), format!("could not start the step: {e}"));
                    return CRASH;
                }
            };
            let group = ProcessGroup::led_by(child.id());
            let deadline =
                *deadline.get_or_insert_with(|| deadline_after(Duration::from_secs(timeout_secs)));
            if i == 0 {
                mark_started();
            }
            let end = supervise(child, group, index, deadline, self.emitter, stop).await;
            match end {
                StepEnd::Exited(status) if status.success() => {}
                StepEnd::Exited(status) => {
                    let exit_code = status
                        .code()
                        .or_else(|| status.signal().map(|sig| 128 + sig))
                        .unwrap_or(128);
                    self.emitter.system(
                        Some(index),
                        format!("step {} failed with exit code {exit_code}", i + 1),
                    );
                    return Outcome::Failed(FailureClass::Test { exit_code });
                }
                StepEnd::Cancelled => {
                    self.emitter
                        .system(Some(index), "cancelled: the step's processes were killed");
                    return CANCELLED;
                }
                StepEnd::TimedOut => {
                    self.emitter.system(
                        Some(index),
                        format!(
                            "the job ran past its timeout of {timeout_secs} s: the step's \
                             processes were killed"
                        ),
                    );
                    return TIMED_OUT;
                }
                StepEnd::Lost(why) => {
                    self.emitter.system(Some(index), why);
                    return CRASH;
                }
            }
        }
        Outcome::Succeeded
    }

    /// The step's process: `bash -eo pipefail -c <run>` (or `sh -e -c <run>`), inside bwrap
    /// when sandboxed, with a clean environment, no stdin, and its own process group.
    fn command(&self, step: &Step) -> Command {
        let launch = &self.launch;
        let ws = self.workspace;
        let shell = match launch.shell {
            Shell::Bash(path, _) | Shell::Sh(path) => path,
        };
        let mut command = match &launch.sandbox {
            Some(sandbox) => {
                let mut command = Command::new(sandbox.bwrap);
                command.args(bwrap_args(ws, sandbox.hidden, sandbox.read_only));
                command.arg(shell);
                command
            }
            None => Command::new(shell),
        };
        match launch.shell {
            Shell::Bash(bash, limits) => command.args(bash_args(bash, limits, &step.run)),
            Shell::Sh(_) => command.args(["-e", "-c", &step.run]),
        };
        let a = self.assignment;
        command
            .current_dir(ws)
            .env_clear()
            .env("PATH", launch.path)
            .env("HOME", launch.home)
            .env("LANG", "C.UTF-8")
            .env("CI", "true")
            .env("FLOTILLA_WORKSPACE", ws)
            .env("FLOTILLA_JOB_ID", a.job.to_string())
            .env("FLOTILLA_ATTEMPT", a.attempt.to_string())
            .env("FLOTILLA_FENCE", a.fence.to_string())
            .envs(a.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        command
    }
}

/// Arguments after `bash`. With limits, a first shell applies them and `exec`s the real one,
/// so the job's script is passed through untouched and bash's `line N` messages match the
/// user's own line numbers. `ulimit` failures are ignored: they only happen when the
/// current hard limit is already stricter (raising it needs a capability the sandbox
/// drops), and the stricter limit then stays in force.
fn bash_args(bash: &Path, limits: &Limits, run: &str) -> Vec<String> {
    let mut prelude = String::new();
    for (flag, value) in [
        ("-t", limits.cpu_secs),
        ("-n", limits.open_files),
        ("-u", limits.processes),
    ] {
        if let Some(value) = value {
            prelude.push_str(&format!("ulimit {flag} {value} 2>/dev/null; "));
        }
    }
    let strict = ["-eo".to_owned(), "pipefail".into(), "-c".into()];
    if prelude.is_empty() {
        return strict.into_iter().chain([run.to_owned()]).collect();
    }
    prelude.push_str(r#"exec "$0" -eo pipefail -c "$1""#);
    vec![
        "-c".into(),
        prelude,
        bash.to_string_lossy().into_owned(),
        run.to_owned(),
    ]
}

/// Waits for the step's process while streaming its output, and kills its whole process
/// group when the attempt is stopped or times out. Also kills the group when the step's
/// shell exits: background processes do not outlive their step (under bwrap the PID
/// namespace ends with the shell anyway; without it this keeps both modes alike and stops a
/// forgotten `sleep 1000 &` from holding the output pipes open).
async fn supervise(
    mut child: Child,
    group: ProcessGroup,
    step: u32,
    deadline: Instant,
    emitter: &Emitter,
    stop: &mut StopSignal,
) -> StepEnd {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let output = async {
        let out = async {
            if let Some(pipe) = stdout {
                read_lines(pipe, Stream::Stdout, step, emitter).await;
            }
        };
        let err = async {
            if let Some(pipe) = stderr {
                read_lines(pipe, Stream::Stderr, step, emitter).await;
            }
        };
        tokio::join!(out, err);
    };
    tokio::pin!(output);

    let mut output_done = false;
    let mut status: Option<io::Result<ExitStatus>> = None;
    let mut stopped: Option<StepEnd> = None;
    // Once the group is killed, how long to wait for the process and its pipes.
    let mut give_up: Option<Instant> = None;
    while !(output_done && status.is_some()) {
        tokio::select! {
            () = &mut output, if !output_done => output_done = true,
            exited = child.wait(), if status.is_none() => {
                status = Some(exited);
                group.kill();
                give_up.get_or_insert_with(|| Instant::now() + KILL_GRACE);
            }
            () = stop.stopped(), if stopped.is_none() && status.is_none() => {
                group.kill();
                stopped = Some(StepEnd::Cancelled);
                give_up.get_or_insert_with(|| Instant::now() + KILL_GRACE);
            }
            () = tokio::time::sleep_until(deadline), if stopped.is_none() && status.is_none() => {
                group.kill();
                stopped = Some(StepEnd::TimedOut);
                give_up.get_or_insert_with(|| Instant::now() + KILL_GRACE);
            }
            () = tokio::time::sleep_until(give_up.unwrap_or(deadline)), if give_up.is_some() => {
                if !output_done {
                    emitter.system(
                        Some(step),
                        "a process that left the step's process group still holds its output \
                         open; it was not killed and its further output is not collected",
                    );
                }
                break;
            }
        }
    }
    if status.is_some() {
        group.finish();
    }
    if let Some(end) = stopped {
        return end;
    }
    match status {
        Some(Ok(status)) => StepEnd::Exited(status),
        Some(Err(e)) => StepEnd::Lost(format!("waiting for the step's process failed: {e}")),
        None => StepEnd::Lost(format!(
            "the step's process did not exit within {} s of being killed",
            KILL_GRACE.as_secs()
        )),
    }
}

/// Refuses what the operating system cannot pass on: environment names that are empty or
/// hold `=`, and NUL bytes anywhere.
fn check_assignment(assignment: &Assignment) -> Result<(), String> {
    for (name, value) in &assignment.env {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(format!("{name:?} is not a valid environment variable name"));
        }
        if value.contains('\0') {
            return Err(format!("environment variable {name} contains a NUL byte"));
        }
    }
    if let Some(step) = assignment.steps.iter().find(|s| s.run.contains('\0')) {
        return Err(format!("step {:?} contains a NUL byte", step.name));
    }
    Ok(())
}

/// `now + after`, or a century from now when that overflows (a timeout of `u64::MAX`).
fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// An empty directory at `path`, replacing whatever a previous run left there.
/// An empty directory at `path`, replacing whatever was there.
async fn fresh_dir(path: &Path) -> io::Result<()> {
    remove_tree(path).await?;
    tokio::fs::create_dir_all(path).await
}

/// Removes whatever is at `path` (a directory tree), if anything.
pub(super) async fn clear_dir(path: &Path) -> io::Result<()> {
    remove_tree(path).await
}

/// Removes a directory tree, including the read-only directories some tools create on
/// purpose (Go's module cache): the agent's user owns them, so it can make them writable.
async fn remove_tree(path: &Path) -> io::Result<()> {
    match tokio::fs::remove_dir_all(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || {
                make_writable(&path);
                std::fs::remove_dir_all(&path)
            })
            .await
            .map_err(io::Error::other)?
        }
    }
}

/// Adds owner `rwx` to every directory under `root` (without following symlinks).
fn make_writable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let mode = meta.permissions().mode();
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o700));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            pending.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_applied_by_a_prelude_that_hands_the_script_over_untouched() {
        let bash = Path::new("/usr/bin/bash");
        let none = Limits {
            cpu_secs: None,
            open_files: None,
            processes: None,
        };
        assert_eq!(
            bash_args(bash, &none, "echo hi"),
            ["-eo", "pipefail", "-c", "echo hi"]
        );
        let some = Limits {
            cpu_secs: Some(60),
            ..none
        };
        let args = bash_args(bash, &some, "echo hi");
        assert_eq!(args[0], "-c");
        assert!(args[1].starts_with("ulimit -t 60 2>/dev/null; exec "));
        assert_eq!(args[2..], ["/usr/bin/bash", "echo hi"]);
    }

    #[tokio::test]
    async fn read_only_directories_do_not_stop_cleanup() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let locked = root.path().join("ws/pkg/mod");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("file"), "x").unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        remove_tree(&root.path().join("ws")).await.unwrap();
        assert!(!root.path().join("ws").exists());
    }
}
