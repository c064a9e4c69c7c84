//! The `local` runner backend: runs each attempt as process trees on this machine, one
//! workspace per attempt, sandboxed with bubblewrap (`bwrap`) when it is available.
//!
//! Layout:
//! - `config`: [`LocalConfig`] — directories, sandbox mode, limits.
//! - `sandbox`: finding and probing `bwrap`, the mount layout of a step.
//! - `checkout`: bare mirrors per repository and the workspace clone.
//! - `attempt`: the task that runs one attempt (workspace, checkout, steps, cleanup).
//! - `output`: line splitting and event stamps; `process`: process groups and stop signals.
//!
//! [`run_in_place`] runs an assignment's steps the same way but without any of the backend
//! around them: it is what `flotilla runner exec` runs inside a Kubernetes runner pod.
//!
//! Each step runs as `bash -eo pipefail -c <run>` in its own process group. Cancelling or
//! timing out kills that whole group with SIGKILL. Under bwrap that group holds bwrap,
//! whose PID namespace takes every process of the step down with it, whatever they did.
//! Without bwrap, a process that puts itself in another group or session (`setsid`,
//! daemonizing tools) escapes the kill; that is one more reason to run with the sandbox.

mod attempt;
mod checkout;
mod config;
mod output;
mod process;
mod sandbox;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_core::autoscale::RunnerId;
use flotilla_core::job::Outcome;
use flotilla_core::runner::{
    Assignment, BoxFuture, RunnerBackend, RunnerError, RunnerEvents, RunnerInfo, WarmRunners,
};
use flotilla_core::{Fence, JobId};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{Limits, LocalConfig, LocalConfigError, SandboxMode};
pub use output::MAX_LINE_BYTES;

use checkout::Mirrors;
use output::Emitter;
use process::StopSignal;
use sandbox::Isolation;

// For the runner wrapper (`crate::runner`), which checks code out and stamps records the
// same way.
pub(crate) use checkout::{Bounds, CheckoutError, git, valid_ref, valid_sha, without_credentials};
pub(crate) use output::now_ms;

/// `PATH` for steps when the agent itself has none.
const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `assignment`'s steps in the existing directory `workspace`, exactly as the backend
/// runs an attempt's steps — `bash -eo pipefail -c` per step, each in its own process group
/// that is killed whole on stop or timeout, the timeout counted from the first step — but
/// with nothing around them: no sandbox, no resource limits, no checkout, and the workspace
/// is left as it is. Made for a container that is itself the sandbox (`flotilla runner
/// exec` in a Kubernetes runner pod).
///
/// Steps see the process's own `PATH` (or the standard one) and `HOME` (or the workspace),
/// `LANG=C.UTF-8`, `CI=true`, `FLOTILLA_WORKSPACE`, `FLOTILLA_JOB_ID`, `FLOTILLA_ATTEMPT`,
/// `FLOTILLA_FENCE`, then the assignment's `env`. Where there is no `bash` they run with
/// `sh -e -c`, after a system line saying that pipefail is unavailable.
///
/// Every event goes to `events`, as a backend reports them: `Started` once the first step
/// runs, the output lines, then one `Finished` with the returned outcome. The attempt stops
/// (`Failed(Cancelled)`) once `stop` holds `true` — or once its sender is dropped, so keep
/// the sender alive for as long as the steps should run.
pub async fn run_in_place(
    assignment: &Assignment,
    workspace: &Path,
    events: Arc<dyn RunnerEvents>,
    stop: watch::Receiver<bool>,
) -> Outcome {
    let emitter = Emitter::new(assignment, events);
    let outcome = attempt::in_place(assignment, workspace, &emitter, stop.into()).await;
    emitter.finished(outcome);
    outcome
}

/// Runs attempts as local process trees. Cheap to clone: clones share the same attempts.
#[derive(Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// The configuration, with directories created and made canonical (bwrap binds paths by
    /// name, so a symlink in them would bind the wrong place).
    config: LocalConfig,
    isolation: Isolation,
    /// The `bash` steps run with, resolved on the agent's `PATH` (a job's own `PATH` must not
    /// decide which shell bwrap starts).
    bash: PathBuf,
    /// The agent's `PATH`, which steps inherit.
    path: OsString,
    mirrors: Mirrors,
    state: Mutex<State>,
    /// Serializes `start` and `shutdown`: starting may wait for a superseded attempt to end,
    /// and nothing may be accepted once shutdown has begun.
    admission: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    closed: bool,
    running: HashMap<JobId, Running>,
    /// Every attempt task not yet awaited; finished ones are pruned on the next start.
    tasks: Vec<AttemptTask>,
    /// Warm runners by (pool, runner): pre-created, empty workspaces waiting for one
    /// attempt each.
    warm: HashMap<(String, RunnerId), PathBuf>,
    /// Names the warm workspaces (pool names do not go into paths).
    next_warm: u64,
    /// Workspaces a warm runner's sandbox was moved to: the attempt keeps them as they are.
    prepared: std::collections::HashSet<PathBuf>,
}

struct Running {
    info: RunnerInfo,
    stop: watch::Sender<bool>,
}

struct AttemptTask {
    job: JobId,
    fence: Fence,
    handle: JoinHandle<()>,
}

impl LocalBackend {
    /// Validates `config`, creates its directories and decides how steps are isolated
    /// (probing `bwrap` once, which blocks for a few milliseconds). With
    /// [`SandboxMode::Auto`] and no working `bwrap` this logs one loud warning.
    pub fn new(config: LocalConfig) -> Result<Self, RunnerError> {
        config
            .validate()
            .map_err(|e| RunnerError::Internal(format!("invalid local backend config: {e}")))?;
        let mut config = config;
        for dir in [&mut config.work_dir, &mut config.mirror_dir] {
            std::fs::create_dir_all(&*dir)
                .and_then(|()| dir.canonicalize())
                .map(|canonical| *dir = canonical)
                .map_err(|e| RunnerError::Internal(format!("cannot use {}: {e}", dir.display())))?;
        }
        for dir in &mut config.hidden_dirs {
            if let Ok(canonical) = dir.canonicalize() {
                *dir = canonical;
            }
        }
        // Whatever else is configured, jobs never see other workspaces or the mirrors.
        for dir in [config.work_dir.clone(), config.mirror_dir.clone()] {
            if !config
                .hidden_dirs
                .iter()
                .any(|hidden| dir.starts_with(hidden))
            {
                config.hidden_dirs.push(dir);
            }
        }
        // Warm sandboxes a previous agent left behind are no runner of this one's.
        if let Ok(entries) = std::fs::read_dir(&config.work_dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("warm-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let isolation = sandbox::resolve(config.sandbox, config.bwrap_path.as_deref());
        if let Isolation::Refused(why) = &isolation {
            tracing::error!(
                reason = %why,
                "The sandbox is required but unavailable: every attempt will fail."
            );
        }
        let bash = sandbox::find_in_path("bash").unwrap_or_else(|| PathBuf::from("bash"));
        let path = std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into());
        tracing::info!(
            work_dir = %config.work_dir.display(),
            sandboxed = matches!(isolation, Isolation::Bwrap(_)),
            "Local runner backend ready."
        );
        Ok(Self {
            inner: Arc::new(Inner {
                mirrors: Mirrors::new(config.mirror_dir.clone()),
                config,
                isolation,
                bash,
                path,
                state: Mutex::default(),
                admission: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// True when steps run inside `bwrap`.
    pub fn sandboxed(&self) -> bool {
        matches!(self.inner.isolation, Isolation::Bwrap(_))
    }

    /// The configuration in use, with directories made absolute and canonical.
    pub fn config(&self) -> &LocalConfig {
        &self.inner.config
    }

    /// Where the workspace of `job`'s attempt under `fence` lives while it runs.
    pub fn workspace_path(&self, job: &JobId, fence: Fence) -> PathBuf {
        self.inner.workspace_path(job, fence)
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (every change is one map operation).
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn workspace_path(&self, job: &JobId, fence: Fence) -> PathBuf {
        self.config.work_dir.join(format!("{job}-{fence}"))
    }

    /// A new warm workspace's path.
    fn warm_path(&self) -> PathBuf {
        let n = {
            let mut state = self.state();
            state.next_warm += 1;
            state.next_warm
        };
        self.config.work_dir.join(format!("warm-{n}"))
    }

    /// Whether `workspace` is a warm runner's sandbox just moved into place (asked once).
    pub(super) fn take_prepared(&self, workspace: &Path) -> bool {
        self.state().prepared.remove(workspace)
    }

    /// Called by an attempt's task when its first step started.
    fn mark_started(&self, job: &JobId, fence: Fence, at_ms: u64) {
        if let Some(running) = self.state().running.get_mut(job)
            && running.info.fence == fence
        {
            running.info.started_at_ms = Some(at_ms);
        }
    }

    /// Called by an attempt's task just before it reports `Finished`.
    fn forget(&self, job: &JobId, fence: Fence) {
        let workspace = self.workspace_path(job, fence);
        let mut state = self.state();
        state.prepared.remove(&workspace);
        if state
            .running
            .get(job)
            .is_some_and(|r| r.info.fence == fence)
        {
            state.running.remove(job);
        }
    }
}

impl fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBackend")
            .field("config", &self.inner.config)
            .field("isolation", &self.inner.isolation)
            .finish_non_exhaustive()
    }
}

fn unavailable() -> RunnerError {
    RunnerError::Unavailable("the local runner backend is shutting down".to_owned())
}

impl RunnerBackend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn start(
        &self,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async move {
            let _admission = self.inner.admission.lock().await;
            let job = assignment.job;
            let fence = assignment.fence;

            // A newer fence means the older attempt is stale (the job was placed again):
            // it is killed and fully cleaned up before the new one begins.
            let stale = {
                let mut state = self.inner.state();
                if state.closed {
                    return Err(unavailable());
                }
                state.tasks.retain(|task| !task.handle.is_finished());
                match state.running.get(&job) {
                    Some(running) if running.info.fence >= fence => {
                        return Err(RunnerError::AlreadyRunning {
                            job,
                            fence: running.info.fence,
                        });
                    }
                    Some(running) => {
                        let old = running.info.fence;
                        running.stop.send_replace(true);
                        state.running.remove(&job);
                        let at = state
                            .tasks
                            .iter()
                            .position(|task| task.job == job && task.fence == old);
                        at.map(|at| (old, state.tasks.swap_remove(at).handle))
                    }
                    None => None,
                }
            };
            if let Some((old, handle)) = stale {
                tracing::info!(job = %job, fence = %old, newer = %fence, "Stopping a stale attempt.");
                if let Err(e) = handle.await {
                    tracing::error!(job = %job, fence = %old, error = %e, "Attempt task failed.");
                }
            }

            let (stop_tx, stop) = StopSignal::new();
            let mut state = self.inner.state();
            if state.closed {
                return Err(unavailable());
            }
            let info = RunnerInfo {
                job,
                fence,
                accepted_at_ms: output::now_ms(),
                started_at_ms: None,
                timeout_secs: assignment.timeout_secs,
            };
            state.running.insert(
                job,
                Running {
                    info,
                    stop: stop_tx,
                },
            );
            let handle = tokio::spawn(attempt::run(self.inner.clone(), assignment, events, stop));
            state.tasks.push(AttemptTask { job, fence, handle });
            tracing::info!(job = %job, fence = %fence, "Attempt accepted.");
            Ok(())
        })
    }

    fn cancel(&self, job: JobId, fence: Fence) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async move {
            let state = self.inner.state();
            if let Some(running) = state.running.get(&job)
                && running.info.fence == fence
            {
                tracing::info!(job = %job, fence = %fence, "Cancelling attempt.");
                running.stop.send_replace(true);
            }
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, RunnerError>> {
        Box::pin(async move {
            let mut infos: Vec<RunnerInfo> = self
                .inner
                .state()
                .running
                .values()
                .map(|r| r.info.clone())
                .collect();
            infos.sort_by_key(|info| info.job);
            Ok(infos)
        })
    }

    fn warm(&self) -> Option<&dyn WarmRunners> {
        Some(self)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _admission = self.inner.admission.lock().await;
            let (tasks, warm) = {
                let mut state = self.inner.state();
                state.closed = true;
                for running in state.running.values() {
                    running.stop.send_replace(true);
                }
                (
                    std::mem::take(&mut state.tasks),
                    std::mem::take(&mut state.warm),
                )
            };
            for dir in warm.into_values() {
                let _ = tokio::fs::remove_dir(&dir).await;
            }
            tracing::info!(
                attempts = tasks.len(),
                "Local runner backend shutting down."
            );
            for task in tasks {
                if let Err(e) = task.handle.await {
                    tracing::error!(job = %task.job, fence = %task.fence, error = %e, "Attempt task failed.");
                }
            }
        })
    }
}

/// Warm local runners are pre-created sandboxes: an empty workspace directory made (and so
/// checked writable) ahead of the job, which the attempt then runs in. Runners are only
/// handed out by the agent's pool, so one can never be taken behind its back: `retire`
/// finds a runner idle or gone.
impl WarmRunners for LocalBackend {
    fn prepare(&self, pool: &str, runner: RunnerId) -> BoxFuture<'_, Result<(), RunnerError>> {
        let pool = pool.to_owned();
        Box::pin(async move {
            if self.inner.state().closed {
                return Err(unavailable());
            }
            let dir = self.inner.warm_path();
            let made = async {
                attempt::clear_dir(&dir).await?;
                tokio::fs::create_dir_all(&dir).await
            };
            made.await.map_err(|e| {
                RunnerError::Internal(format!("cannot prepare {}: {e}", dir.display()))
            })?;
            let mut state = self.inner.state();
            if state.closed {
                drop(state);
                let _ = std::fs::remove_dir(&dir);
                return Err(unavailable());
            }
            tracing::debug!(runner = %runner, pool = %pool, "Warm runner ready.");
            state.warm.insert((pool, runner), dir);
            Ok(())
        })
    }

    fn start_on(
        &self,
        pool: &str,
        runner: RunnerId,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        let key = (pool.to_owned(), runner);
        Box::pin(async move {
            let dir = self.inner.state().warm.remove(&key).ok_or_else(|| {
                RunnerError::Internal(format!(
                    "warm runner {runner} of {} is not ready here",
                    key.0
                ))
            })?;
            // The sandbox becomes the attempt's workspace, which the attempt then keeps as
            // it is rather than making afresh.
            let workspace = self.inner.workspace_path(&assignment.job, assignment.fence);
            match tokio::fs::rename(&dir, &workspace).await {
                Ok(()) => {
                    self.inner.state().prepared.insert(workspace.clone());
                }
                Err(e) => {
                    tracing::warn!(runner = %runner, error = %e, "Could not move a warm workspace into place; starting afresh.");
                    let _ = tokio::fs::remove_dir(&dir).await;
                }
            }
            let started = self.start(assignment, events).await;
            if started.is_err() && self.inner.state().prepared.remove(&workspace) {
                let _ = tokio::fs::remove_dir(&workspace).await;
            }
            started
        })
    }

    fn retire(
        &self,
        pool: &str,
        runner: RunnerId,
    ) -> BoxFuture<'_, Result<Option<JobId>, RunnerError>> {
        let key = (pool.to_owned(), runner);
        Box::pin(async move {
            let dir = self.inner.state().warm.remove(&key);
            if let Some(dir) = dir
                && let Err(e) = attempt::clear_dir(&dir).await
            {
                // Put it back: it is still a runner until its directory is gone.
                self.inner.state().warm.insert(key, dir.clone());
                return Err(RunnerError::Internal(format!(
                    "cannot remove {}: {e}",
                    dir.display()
                )));
            }
            Ok(None)
        })
    }
}
