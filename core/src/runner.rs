//! The `RunnerBackend` port (ARCHITECTURE §8): how a cell agent runs one attempt of one job.
//!
//! A backend is given an [`Assignment`] — the resolved job, its attempt and fence, and where to
//! check the code out from — and runs it somewhere isolated: a sandboxed process tree on this
//! machine (`local`) or a pod (`kubernetes`). It reports what happens through a
//! [`RunnerEvents`] sink: [`RunnerEvent::Started`] once the first step is executing, every
//! output line, then exactly one [`RunnerEvent::Finished`] with the attempt's [`Outcome`].
//!
//! Every backend passes one conformance suite (in the cell agent crate): start, output, exit
//! codes, cancel and timeout killing the whole process tree, cleanup.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::autoscale::RunnerId;
use crate::ids::{Attempt, BuildId, Fence, JobId, ProjectId};
use crate::job::Outcome;
use crate::pipeline::{Resources, Step};
pub use crate::repo::BoxFuture;

/// Where a job's code comes from: the project's repository at the build's commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    /// The clone URL, from the project's configuration.
    pub repo_url: String,
    /// The full ref the build is for (fetched when the commit cannot be fetched by id).
    pub git_ref: String,
    /// The commit to check out (40 hex digits).
    pub sha: String,
}

/// One attempt of one job, as a cell is asked to run it. Its `Debug` shows the values of
/// secret variables as `***` (a debug print must not put a secret in a log).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The job.
    pub job: JobId,
    /// Its build.
    pub build: BuildId,
    /// Its project.
    pub project: ProjectId,
    /// Which attempt this is.
    pub attempt: Attempt,
    /// The placement's fence; every report about this attempt carries it.
    pub fence: Fence,
    /// The job's name within its pipeline (for logs and the UI).
    pub name: String,
    /// Container image (ignored by the local backend, which runs on the host's tools).
    pub image: String,
    /// The commands, run in order with `bash -eo pipefail`; the first failure ends the job.
    pub steps: Vec<Step>,
    /// Environment variables, in order (later entries win).
    pub env: Vec<(String, String)>,
    /// Names of the variables in `env` whose values are secrets: the runner masks them (and
    /// their encoded forms) in every line of output before it leaves the runner
    /// (ARCHITECTURE §10, [`crate::mask`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Longest the steps may run in total, counted from the start of the first step.
    pub timeout_secs: u64,
    /// Requested CPU and memory.
    pub resources: Resources,
    /// The runner pool it was placed in.
    pub pool: String,
    /// The code to check out into the workspace first; `None` runs in an empty workspace.
    pub checkout: Option<Checkout>,
}

impl std::fmt::Debug for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(name, value)| {
                let shown = if self.secrets.iter().any(|s| s == name) {
                    "***"
                } else {
                    value.as_str()
                };
                (name.as_str(), shown)
            })
            .collect();
        f.debug_struct("Assignment")
            .field("job", &self.job)
            .field("build", &self.build)
            .field("project", &self.project)
            .field("attempt", &self.attempt)
            .field("fence", &self.fence)
            .field("name", &self.name)
            .field("image", &self.image)
            .field("steps", &self.steps)
            .field("env", &env)
            .field("secrets", &self.secrets)
            .field("timeout_secs", &self.timeout_secs)
            .field("resources", &self.resources)
            .field("pool", &self.pool)
            .field("checkout", &self.checkout)
            .finish()
    }
}

impl Assignment {
    /// The masker for this attempt's output: every value of a variable named in `secrets`.
    pub fn masker(&self) -> crate::mask::Masker {
        crate::mask::Masker::new(
            self.env
                .iter()
                .filter(|(name, _)| self.secrets.iter().any(|s| s == name))
                .map(|(_, value)| value.as_bytes()),
        )
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A message from the runner itself (step headers, checkout, warnings).
    System,
}

/// Something a runner reports about an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunnerEvent {
    /// The first step is executing (the "runner's first instruction"). Sent at most once, and
    /// not at all when the attempt fails before any step starts.
    Started {
        /// When (ms since the Unix epoch).
        at_ms: u64,
    },
    /// One line of output, without its line terminator.
    Line {
        /// Which stream.
        stream: Stream,
        /// Index of the step that wrote it (0-based); `None` for lines outside any step.
        step: Option<u32>,
        /// The text (invalid UTF-8 replaced).
        text: String,
        /// When it was read (ms since the Unix epoch).
        at_ms: u64,
    },
    /// The attempt ended. Always the last event, sent exactly once per started attempt —
    /// including when it is cancelled, times out or cannot be spawned.
    Finished {
        /// How it ended: `Succeeded`; `Failed(Test{code})` for a non-zero exit;
        /// `Failed(Timeout)`; `Failed(Cancelled)`; `Failed(Infra{RunnerCrash})` when the runner
        /// could not be set up or spawned; `Failed(Config)` when the assignment itself cannot
        /// run anywhere (an invalid environment variable name, a malformed commit id).
        outcome: Outcome,
        /// When (ms since the Unix epoch).
        at_ms: u64,
    },
}

/// Receives the events of every attempt a backend runs. Called from the backend's own tasks;
/// must not block.
pub trait RunnerEvents: Send + Sync + 'static {
    /// `event` happened to the attempt of `job` under `fence`.
    fn event(&self, job: JobId, fence: Fence, event: RunnerEvent);
}

/// An attempt a backend is currently running (or cleaning up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerInfo {
    /// The job.
    pub job: JobId,
    /// Its fence.
    pub fence: Fence,
    /// When the backend accepted it (ms since the Unix epoch).
    pub accepted_at_ms: u64,
    /// When its first step started, once it has.
    pub started_at_ms: Option<u64>,
    /// Its timeout.
    pub timeout_secs: u64,
}

/// Why a backend refused or failed an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerError {
    /// The backend is already running this job under this or a newer fence.
    #[error("job {job} is already running here under fence {fence}")]
    AlreadyRunning {
        /// The job.
        job: JobId,
        /// The fence it runs under.
        fence: Fence,
    },
    /// The backend is shutting down or has no room.
    #[error("the runner backend is unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("runner backend failure: {0}")]
    Internal(String),
}

impl RunnerError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RunnerError::AlreadyRunning { .. } => "already_running",
            RunnerError::Unavailable(_) => "unavailable",
            RunnerError::Internal(_) => "internal",
        }
    }
}

/// Runs job attempts in isolation. Implementations own their background work (one task per
/// attempt) and stop it in [`RunnerBackend::shutdown`].
pub trait RunnerBackend: Send + Sync + std::fmt::Debug + 'static {
    /// The backend's name (`local`, `kubernetes`), for logs and metrics.
    fn name(&self) -> &'static str;

    /// Accepts an attempt and begins running it in the background. Returns once it is
    /// accepted; from then on every event goes to `events`, ending with one
    /// [`RunnerEvent::Finished`]. Set-up failures after acceptance (checkout, spawn) are
    /// reported as `Finished(Failed(Infra{RunnerCrash}))`, not as an error here.
    fn start(
        &self,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>>;

    /// Stops the attempt of `job` under `fence`, killing every process it started; it then
    /// reports `Finished(Failed(Cancelled))` (unless it had already finished). Unknown
    /// attempts are ignored, so cancelling twice is harmless.
    fn cancel(&self, job: JobId, fence: Fence) -> BoxFuture<'_, Result<(), RunnerError>>;

    /// The attempts currently running or being cleaned up.
    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, RunnerError>>;

    /// Stops the backend and waits for its background work. A backend whose runners die with
    /// the agent (`local`) kills every attempt first, reporting them cancelled; one whose
    /// runners outlive it (`kubernetes` pods) leaves them running, reports nothing more, and
    /// the next agent takes them over with [`RunnerBackend::recover`].
    fn shutdown(&self) -> BoxFuture<'_, ()>;

    /// Takes over the attempts a previous run of the agent left running (pods survive an
    /// agent restart), sending their events to `events` from now on, and returns their
    /// assignments so the agent can tell the federator it still holds them. Called once,
    /// before the agent's first session. Backends whose runners die with the agent have
    /// nothing to recover.
    fn recover(
        &self,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<Vec<Assignment>, RunnerError>> {
        let _ = events;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The federator has acknowledged the final report of `job`'s attempt under `fence`: a
    /// backend that kept the finished runner as the durable record of its outcome (a
    /// kubernetes pod, which a restarted agent could take over and report again) may now
    /// delete it.
    fn reported(&self, job: JobId, fence: Fence) {
        let _ = (job, fence);
    }

    /// Runner creations per second the backend can still afford (the cell's `api_budget`),
    /// or `None` when nothing limits it.
    fn api_budget(&self) -> Option<u32> {
        None
    }

    /// The backend's warm runners, if it keeps runners started ahead of their job (ARCHITECTURE
    /// §8, warm pools). A backend without them starts a runner per attempt in [`start`].
    ///
    /// [`start`]: RunnerBackend::start
    fn warm(&self) -> Option<&dyn WarmRunners> {
        None
    }
}

/// Runners started before there is a job for them, each taking exactly one job. The cell
/// agent decides how many there are ([`crate::autoscale`]) and keeps their
/// [`RunnerPool`](crate::autoscale::RunnerPool); the backend only creates, hands over and
/// deletes them.
pub trait WarmRunners: Send + Sync {
    /// Whether a prepared runner of `pool` can run `assignment` (a warm pod runs the pool's
    /// image at the pool's size: a job with another image, or asking for more, cannot use
    /// it). An assignment that does not fit is started with [`RunnerBackend::start`] on a
    /// runner of its own instead.
    fn fits(&self, pool: &str, assignment: &Assignment) -> bool {
        let _ = (pool, assignment);
        true
    }

    /// Creates runner `runner` for `pool` and resolves once it can take a job at once (a pod
    /// running with its image pulled, a sandbox ready), or with why it could not.
    fn prepare(&self, pool: &str, runner: RunnerId) -> BoxFuture<'_, Result<(), RunnerError>>;

    /// Runs `assignment` on the prepared runner `runner` of `pool`, as
    /// [`RunnerBackend::start`] would on a new one; the runner is used up. (Runner ids are
    /// numbered per pool: a runner is named by both.)
    fn start_on(
        &self,
        pool: &str,
        runner: RunnerId,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>>;

    /// Prepared runners that died or were deleted while waiting for a job (a warm pod evicted
    /// with its node, deleted by hand) since the last call, as `(pool, runner)`: the agent
    /// stops counting them and makes new ones as the policy asks. Backends whose idle runners
    /// cannot die have none.
    fn take_lost(&self) -> Vec<(String, RunnerId)> {
        Vec::new()
    }

    /// Phase two of scale-down: deletes `runner` of `pool` if it is still idle (`Ok(None)`; also when
    /// it is already gone), or leaves it alone and says which job it is running
    /// (`Ok(Some(job))`). An error leaves it as it was, to be retired again later.
    fn retire(
        &self,
        pool: &str,
        runner: RunnerId,
    ) -> BoxFuture<'_, Result<Option<JobId>, RunnerError>>;
}

/// Where an attempt got to, as a cell reports it to the federator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportState {
    /// The first step started.
    Running,
    /// The attempt ended.
    Finished(Outcome),
}

/// A cell's report about one attempt (`JobUpdate` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// The job.
    pub job: JobId,
    /// The attempt.
    pub attempt: Attempt,
    /// The fence the attempt runs under.
    pub fence: Fence,
    /// What happened.
    pub state: ReportState,
    /// When the agent received the assignment (ms since the Unix epoch, the agent's clock).
    pub delivered_at_ms: Option<u64>,
    /// When the first step started.
    pub started_at_ms: Option<u64>,
    /// When the attempt ended.
    pub finished_at_ms: Option<u64>,
}

/// The file name a job's output is kept under in a local log directory (`flotilla dev`),
/// every attempt appended in turn. Until the log store lands, the cell agent writes it and
/// the federator serves it.
pub fn log_file_name(job: JobId) -> String {
    format!("job-{job}.log")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Attempt, BuildId, Fence, JobId, ProjectId};

    #[test]
    fn an_assignment_printed_for_debugging_shows_no_secret_value() {
        let a = Assignment {
            job: JobId(1),
            build: BuildId(1),
            project: ProjectId::new("web").expect("valid"),
            attempt: Attempt::FIRST,
            fence: Fence(1),
            name: "test".into(),
            image: "debian:12".into(),
            steps: Vec::new(),
            env: vec![
                ("TOKEN".into(), "s3cret-value".into()),
                ("MODE".into(), "fast".into()),
            ],
            secrets: vec!["TOKEN".into()],
            timeout_secs: 60,
            resources: Resources {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
            },
            pool: "default".into(),
            checkout: None,
        };
        let shown = format!("{a:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("(\"TOKEN\", \"***\")") && shown.contains("\"fast\""),
            "{shown}"
        );
    }
}
