//! The replicated control state (ARCHITECTURE §3, §4): projects, API tokens, webhook
//! delivery keys, builds and their jobs, cells.
//!
//! [`State::apply`] is the only way the state changes. It is deterministic — no clock, no
//! randomness, no I/O: the leader stamps the time into each [`Command`] and the Raft log index
//! comes in as an argument (it is the fence of a placement). Every replica applies the same
//! commands in the same order and ends in the same state. `apply` returns the proposer's
//! [`Response`] and the [`Event`]s the federator reacts to (load a pipeline, wake the
//! scheduler, tell a cell to stop a job).
//!
//! Persisted forms are versioned: log entries are [`Entry`] and snapshots [`Snapshot`], each an
//! enum with one variant per format version. The types of version 1 are in this module; a
//! future v2 adds variants and a migration, never reinterprets v1 bytes.
//!
//! Layout: this file holds the data model; `apply.rs` the transitions; `jobs.rs` the job table
//! and its change log; `tests.rs` the tests.

mod apply;
mod jobs;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::forge::{ForgeEvent, Provider};
use crate::ids::{BuildId, CellId, Fence, JobId, ProjectId};
use crate::job::{JobPhase, JobRun, Outcome};
use crate::pipeline::JobSpec;

pub use jobs::{JobCursor, Jobs};

/// How long a webhook delivery key is remembered, so a redelivery within it is recognised.
/// GitHub lets users redeliver for 3 days and GitLab retries for hours; 7 days covers both.
pub const DELIVERY_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// The pool a job runs in when its pipeline names none.
pub const DEFAULT_POOL: &str = "default";

/// A Raft log entry, versioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// Format version 1.
    V1(Command),
}

/// A snapshot of the whole state, versioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Snapshot {
    /// Format version 1.
    V1(State),
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Projects by id.
    pub projects: BTreeMap<ProjectId, Project>,
    /// API tokens by id (only their hashes).
    pub tokens: BTreeMap<u64, ApiToken>,
    /// Remembered webhook deliveries. Keys are shared with `delivery_times` and with the copy
    /// a snapshot takes, so that copy allocates no keys (a state read back from a snapshot
    /// holds separate copies until those deliveries are pruned).
    pub deliveries: BTreeMap<Arc<DeliveryKey>, Delivery>,
    /// The same deliveries ordered by when they arrived, for pruning.
    pub delivery_times: BTreeSet<(u64, Arc<DeliveryKey>)>,
    /// Builds not yet pruned.
    pub builds: BTreeMap<BuildId, Arc<Build>>,
    /// The jobs of those builds (a map that also notes which jobs changed, for the
    /// scheduler).
    pub jobs: Jobs,
    /// Cells that have registered.
    pub cells: BTreeMap<CellId, Cell>,
    /// Counters for ids handed out by `apply`.
    pub next_ids: NextIds,
    /// Each replica's HTTP base URL by Raft node id, so a follower can send a client to the
    /// leader (`307`) for reads that must be linearizable.
    pub replicas: BTreeMap<u64, String>,
    /// Each replica's cell-session gRPC address by Raft node id, so a follower can send a
    /// cell agent to the leader.
    pub cell_endpoints: BTreeMap<u64, String>,
}

/// The next id of each kind `apply` hands out (ids start at 1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextIds {
    /// Last build id used.
    pub build: u64,
    /// Last job id used.
    pub job: u64,
    /// Last token id used.
    pub token: u64,
}

/// A repository Flotilla builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// Its id, also its name (a slug).
    pub id: ProjectId,
    /// Where its code lives. Only this URL is ever fetched; payload URLs are ignored.
    pub repo_url: String,
    /// Which forge hosts it, deciding the webhook format.
    pub provider: Provider,
    /// The shared secret of its webhooks (GitHub HMAC key, GitLab token).
    pub webhook_secret: String,
    /// Where the pipeline file is, relative to the repository root.
    pub pipeline_path: String,
    /// The fair-share tenant it belongs to (an org or team grouping projects); `None` makes
    /// the project its own tenant.
    pub tenant: Option<String>,
    /// Its tenant's share weight (≥ 1) when it is its own tenant; a group's weight is the
    /// largest of its projects'.
    pub weight: u32,
    /// Builds created so far for this project; the next build is number `builds + 1`.
    pub builds: u64,
    /// When it was created (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When it last changed.
    pub updated_at_ms: u64,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Read builds, jobs, logs.
    Read,
    /// Also trigger, cancel and retry builds.
    Write,
    /// Also manage projects and tokens.
    Admin,
}

impl Scope {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    /// Parses the API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// An API token. Only a hash of the secret is kept; the secret is shown once, at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Its id, used to revoke it.
    pub id: u64,
    /// Hex SHA-256 of the secret. Tokens are 256 random bits, so a fast hash is enough.
    pub hash: String,
    /// What it may do.
    pub scope: Scope,
    /// The one project it is limited to; `None` for every project.
    pub project: Option<ProjectId>,
    /// When it was created.
    pub created_at_ms: u64,
}

/// A webhook delivery id, per project (forges number deliveries per hook).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeliveryKey {
    /// The project whose hook delivered it.
    pub project: ProjectId,
    /// `X-GitHub-Delivery` or `Idempotency-Key`.
    pub key: String,
}

/// A remembered delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The build it created.
    pub build: BuildId,
    /// When it arrived.
    pub at_ms: u64,
}

/// A build's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BuildStatus {
    /// Accepted; the pipeline is being loaded.
    Pending,
    /// Loaded; no job has started yet.
    Queued,
    /// At least one job is out on a cell.
    Running,
    /// Every job succeeded.
    Succeeded,
    /// A job failed or timed out, or the pipeline could not be loaded.
    Failed,
    /// Cancelled by a user or a newer build in its concurrency group.
    Cancelled,
    /// No trigger of the pipeline matches the event, or no job's `if:` holds: nothing to run.
    Skipped,
}

impl BuildStatus {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Pending => "pending",
            BuildStatus::Queued => "queued",
            BuildStatus::Running => "running",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
            BuildStatus::Skipped => "skipped",
        }
    }

    /// Parses the API name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            BuildStatus::Pending,
            BuildStatus::Queued,
            BuildStatus::Running,
            BuildStatus::Succeeded,
            BuildStatus::Failed,
            BuildStatus::Cancelled,
            BuildStatus::Skipped,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
    }

    /// Whether the build is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildStatus::Succeeded
                | BuildStatus::Failed
                | BuildStatus::Cancelled
                | BuildStatus::Skipped
        )
    }
}

/// One pipeline run for one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    /// Its id.
    pub id: BuildId,
    /// Its project.
    pub project: ProjectId,
    /// Its number within the project (1, 2, …).
    pub number: u64,
    /// What started it.
    pub event: ForgeEvent,
    /// The webhook delivery that created it, if one did.
    pub delivery: Option<String>,
    /// The full ref it builds.
    pub git_ref: String,
    /// The commit; `None` until a manual build by ref is loaded.
    pub sha: Option<String>,
    /// Where it is.
    pub status: BuildStatus,
    /// Why it failed or was skipped (a pipeline error names `file:line:col`).
    pub error: Option<String>,
    /// Its concurrency group, once the pipeline is loaded.
    pub concurrency_group: Option<String>,
    /// True while it waits for an older build of its concurrency group to finish (groups
    /// without `cancel_in_progress` run one build at a time, oldest first).
    pub held: bool,
    /// Its jobs, in pipeline order.
    pub jobs: Vec<JobId>,
    /// When it was accepted.
    pub created_at_ms: u64,
    /// When its first job started.
    pub started_at_ms: Option<u64>,
    /// When it ended.
    pub finished_at_ms: Option<u64>,
    /// Bumped on every change, for consumers that upsert by version (history, status cache).
    pub version: u64,
}

/// Why a job was cancelled, which decides whether a build retry runs it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelReason {
    /// A user cancelled the build.
    User,
    /// A newer build in the same concurrency group replaced this one.
    Superseded,
    /// A job it needs failed, so it could never run.
    NeedFailed,
}

/// One job of a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Its build.
    pub build: BuildId,
    /// Its build's project (kept here so tenant checks need one lookup).
    pub project: ProjectId,
    /// What to run, resolved for this build (shared, so copying the state for a snapshot does
    /// not copy every spec).
    pub spec: Arc<JobSpec>,
    /// The jobs it needs, by id.
    pub needs: Vec<JobId>,
    /// The jobs that need it.
    pub dependents: Vec<JobId>,
    /// Its lifecycle, attempt, fence and lease.
    pub run: JobRun,
    /// Why it was cancelled, if it was.
    pub cancel_reason: Option<CancelReason>,
    /// When it became runnable (its current attempt's queue time starts here).
    pub queued_at_ms: Option<u64>,
    /// When its current attempt started running.
    pub started_at_ms: Option<u64>,
    /// When it ended.
    pub finished_at_ms: Option<u64>,
    /// When its current attempt was placed on a cell (the `PlaceJobs` entry's time).
    pub placed_at_ms: Option<u64>,
    /// What the runner reported about the current attempt's start (the cell's clock).
    pub runner: RunnerTimes,
    /// Priority the platform added: raised each time it took an attempt back (a drain), so
    /// the job goes ahead of work that has not been disturbed.
    pub boost: u32,
    /// The cell its last attempt was taken from (lost, drained, evicted): the next placement
    /// prefers any other.
    pub avoid: Option<CellId>,
    /// Bumped on every change.
    pub version: u64,
}

/// When a cell received an assignment and its runner started the first step, as the cell
/// reports them (its own clock), so latency from webhook to runner can be broken down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerTimes {
    /// When the cell agent received the assignment (ms since the Unix epoch).
    pub delivered_at_ms: Option<u64>,
    /// When the runner started executing the first step.
    pub started_at_ms: Option<u64>,
}

impl Job {
    /// The job's phase.
    pub fn phase(&self) -> JobPhase {
        self.run.phase()
    }
}

/// A cell's placement state (ARCHITECTURE §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellState {
    /// Takes new work.
    Active,
    /// Takes no new work; running jobs finish.
    Cordoned,
    /// Takes no new work; at the deadline remaining jobs are re-queued.
    Draining {
        /// When remaining jobs are re-queued (ms since the Unix epoch).
        deadline_ms: u64,
    },
    /// Stopped heartbeating; its jobs were re-queued.
    Lost,
}

impl CellState {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            CellState::Active => "active",
            CellState::Cordoned => "cordoned",
            CellState::Draining { .. } => "draining",
            CellState::Lost => "lost",
        }
    }
}

/// What an operator does to a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellChange {
    /// No new work; running jobs carry on.
    Cordon,
    /// Takes new work again (from `Cordoned` or `Draining`).
    Uncordon,
    /// No new work; jobs still there at the deadline are re-queued elsewhere.
    Drain {
        /// When (ms since the Unix epoch).
        deadline_ms: u64,
    },
}

/// A registered cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Its id.
    pub id: CellId,
    /// Its region.
    pub region: String,
    /// Its labels, for placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Its runner pools: name → most runners it can run at once.
    pub pools: BTreeMap<String, u32>,
    /// The agent's version, as it said hello.
    pub agent_version: String,
    /// Whether it takes work.
    pub state: CellState,
    /// When it first registered.
    pub registered_at_ms: u64,
    /// When it last registered (said hello on a new session).
    pub last_seen_ms: u64,
    /// While `Lost`: the state an operator chose, which it returns to when its agent
    /// reconnects (`None`: `Active`). A cordon survives the cell dropping out.
    pub returns_as: Option<CellState>,
}

/// What a cell agent says about itself when it opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellSpec {
    /// Its id.
    pub id: CellId,
    /// Its region.
    pub region: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its pools: name → most runners at once.
    pub pools: BTreeMap<String, u32>,
    /// The agent's version.
    pub agent_version: String,
}

/// Settings of a project, as created or replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectSpec {
    /// Its id (a slug).
    pub id: ProjectId,
    /// Clone URL.
    pub repo_url: String,
    /// Forge.
    pub provider: Provider,
    /// Webhook secret.
    pub webhook_secret: String,
    /// Pipeline file path.
    pub pipeline_path: String,
    /// Fair-share tenant (group); `None`: the project is its own tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Fair-share weight, at least 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Changes to a project; `None` keeps a field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectPatch {
    /// New clone URL.
    pub repo_url: Option<String>,
    /// New forge.
    pub provider: Option<Provider>,
    /// New webhook secret.
    pub webhook_secret: Option<String>,
    /// New pipeline path.
    pub pipeline_path: Option<String>,
    /// New tenant: `Some(None)` makes the project its own tenant again.
    pub tenant: Option<Option<String>>,
    /// New weight.
    pub weight: Option<u32>,
}

/// What loading a build's pipeline came to, decided by the leader outside `apply` (it reads
/// git) and committed so every replica agrees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolution {
    /// The jobs to run (already filtered by `if:`), with `needs` naming other jobs of the list.
    Jobs {
        /// The jobs.
        jobs: Vec<JobSpec>,
        /// The rendered concurrency group and whether it cancels older builds.
        concurrency: Option<(String, bool)>,
    },
    /// Nothing to run; why.
    Skipped(String),
    /// The pipeline could not be loaded or is invalid; the message (with `file:line:col`).
    Failed(String),
}

/// One placement decision of a `PlaceJobs` batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The queued job.
    pub job: JobId,
    /// Where it goes.
    pub cell: CellId,
    /// When its lease runs out unless the cell heartbeats.
    pub lease_expires_at_ms: u64,
}

/// A change to the state, as proposed through Raft. `now_ms` fields are stamped by the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Creates a project; refused if the id is taken.
    CreateProject {
        /// Its settings.
        spec: ProjectSpec,
        /// Leader time.
        now_ms: u64,
    },
    /// Changes a project's settings.
    UpdateProject {
        /// Which.
        id: ProjectId,
        /// What changes.
        patch: ProjectPatch,
        /// Leader time.
        now_ms: u64,
    },
    /// Deletes a project, cancelling its unfinished builds and revoking its tokens.
    DeleteProject {
        /// Which.
        id: ProjectId,
        /// Leader time.
        now_ms: u64,
    },
    /// Stores a new API token's hash.
    CreateToken {
        /// Hex SHA-256 of the secret.
        hash: String,
        /// What it may do.
        scope: Scope,
        /// The project it is limited to.
        project: Option<ProjectId>,
        /// Leader time.
        now_ms: u64,
    },
    /// Revokes a token.
    RevokeToken {
        /// Which.
        id: u64,
    },
    /// Records an event that starts a build: a webhook delivery (deduplicated on its key) or
    /// a manual trigger (no key).
    IngestEvent {
        /// The project.
        project: ProjectId,
        /// The delivery id, for deduplication.
        delivery: Option<String>,
        /// What happened.
        event: ForgeEvent,
        /// Leader time.
        now_ms: u64,
    },
    /// Records what loading a pending build's pipeline came to.
    ResolvePipeline {
        /// The build.
        build: BuildId,
        /// The commit the pipeline was read at; `None` when it could not be read and the
        /// build did not name one (a manual build by ref).
        sha: Option<String>,
        /// Jobs, or why there are none.
        resolution: Resolution,
        /// Leader time.
        now_ms: u64,
    },
    /// Places queued jobs on cells; the entry's log index is their fence.
    PlaceJobs {
        /// The decisions.
        placements: Vec<Placement>,
        /// Leader time.
        now_ms: u64,
    },
    /// A runner started a job's steps.
    JobStarted {
        /// The job.
        job: JobId,
        /// The fence the runner holds.
        fence: Fence,
        /// What the cell reported about the start.
        runner: RunnerTimes,
        /// Leader time.
        now_ms: u64,
    },
    /// A runner finished a job's attempt.
    JobFinished {
        /// The job.
        job: JobId,
        /// The fence the runner holds.
        fence: Fence,
        /// How it ended.
        outcome: Outcome,
        /// Leader time.
        now_ms: u64,
    },
    /// Cancels a build's unfinished jobs.
    CancelBuild {
        /// The build.
        build: BuildId,
        /// Leader time.
        now_ms: u64,
    },
    /// Runs a failed build's failed jobs again (and the jobs they had doomed).
    RetryBuild {
        /// The build.
        build: BuildId,
        /// Leader time.
        now_ms: u64,
    },
    /// A replica announces the HTTP base URL it serves the API on.
    AnnounceReplica {
        /// Its Raft node id.
        node_id: u64,
        /// Its HTTP base URL, such as `http://10.0.0.5:8080`.
        http_url: String,
    },
    /// Forgets delivery keys older than [`DELIVERY_RETENTION_MS`].
    Prune {
        /// Leader time.
        now_ms: u64,
    },
    /// A cell agent opened a session: registers the cell or updates what it says about
    /// itself. A `Lost` cell becomes `Active` again; `Cordoned` and `Draining` stay.
    RegisterCell {
        /// What the agent said.
        spec: CellSpec,
        /// Leader time.
        now_ms: u64,
    },
    /// A cell missed its heartbeats past the grace period: it is `Lost`, and every job
    /// leased to it or running on it is re-queued as `Infra{CellLost}` with a new attempt
    /// (or fails, once its infra retries are spent).
    ExpireLeases {
        /// The cell.
        cell: CellId,
        /// The cell's `last_seen_ms` when the leader decided: refused if the cell has
        /// registered again since (its agent came back while this entry was in flight).
        last_seen_ms: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// A replica announces the address its cell-session gRPC service listens on.
    AnnounceCellEndpoint {
        /// Its Raft node id.
        node_id: u64,
        /// `host:port`.
        addr: String,
    },
    /// An operator changes whether a cell takes work (ARCHITECTURE §7).
    SetCellState {
        /// The cell.
        cell: CellId,
        /// The change.
        change: CellChange,
        /// Leader time.
        now_ms: u64,
    },
    /// A draining cell reached its deadline: every job still on it is re-queued as
    /// `Infra{Drained}` with a new attempt and fence, ahead of undisturbed work, and the cell
    /// stays out of service (`Cordoned`). Refused before the deadline.
    FinishDrain {
        /// The cell.
        cell: CellId,
        /// Leader time.
        now_ms: u64,
    },
}

/// What `apply` tells the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// A token was stored under this id.
    TokenCreated(u64),
    /// An event was recorded.
    Ingested {
        /// The build it created, or the one its delivery created before.
        build: BuildId,
        /// True when the delivery key was seen before and nothing new was created.
        duplicate: bool,
    },
    /// The command was refused and changed nothing.
    Rejected(Rejection),
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// The thing named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with the current state (an id taken, a build not failed…).
    #[error("{0}")]
    Conflict(String),
    /// A runner's message carries a fence other than the job's current one.
    #[error("stale fence {got} for job {job} (current {current})")]
    StaleFence {
        /// The job.
        job: JobId,
        /// The fence on the message.
        got: Fence,
        /// The job's fence.
        current: Fence,
    },
}

/// Something the federator reacts to, returned by `apply` on every replica (only the leader
/// acts on most of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A build was created and its pipeline must be loaded.
    BuildCreated(BuildId),
    /// A build changed (status, jobs, error).
    BuildChanged(BuildId),
    /// Jobs became runnable and wait for placement.
    JobsQueued(Vec<JobId>),
    /// A job changed phase.
    JobChanged(JobId),
    /// A job that was out on a cell must stop there (cancelled, or re-placed elsewhere).
    JobRevoked {
        /// The job.
        job: JobId,
        /// The cell holding it.
        cell: CellId,
        /// The fence it was running under.
        fence: Fence,
    },
    /// A cell registered or changed state.
    CellChanged(CellId),
    /// A job was placed on a cell under a fence: tell the cell.
    JobAssigned {
        /// The job.
        job: JobId,
        /// The cell.
        cell: CellId,
        /// The fence.
        fence: Fence,
    },
}

/// What [`State::apply`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// For the proposer.
    pub response: Response,
    /// For the federator.
    pub events: Vec<Event>,
}

impl State {
    /// The project a build belongs to, when both exist.
    pub fn build_of(&self, id: BuildId) -> Option<&Build> {
        self.builds.get(&id).map(|b| &**b)
    }

    /// The builds of a project that have not finished, oldest first.
    pub fn active_builds(&self, project: &ProjectId) -> impl Iterator<Item = &Build> {
        self.builds
            .values()
            .map(|b| &**b)
            .filter(move |b| &b.project == project && !b.status.is_terminal())
    }

    /// Builds whose pipeline has not been loaded yet (the leader loads them; a new leader
    /// picks up the ones its predecessor did not finish).
    pub fn pending_builds(&self) -> impl Iterator<Item = &Build> {
        self.builds
            .values()
            .map(|b| &**b)
            .filter(|b| b.status == BuildStatus::Pending)
    }

    /// Jobs waiting for a cell, oldest first.
    pub fn queued_jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs
            .values()
            .map(|j| &**j)
            .filter(|j| j.phase() == JobPhase::Queued)
    }

    /// Jobs leased to or running on `cell`.
    pub fn jobs_on<'a>(&'a self, cell: &'a CellId) -> impl Iterator<Item = &'a Job> + 'a {
        self.jobs
            .values()
            .map(|j| &**j)
            .filter(move |j| j.run.cell() == Some(cell))
    }

    /// The pool a job runs in: its `placement.pool`, or `default`.
    pub fn pool_of(job: &Job) -> &str {
        job.spec
            .placement
            .pool
            .as_ref()
            .map_or(DEFAULT_POOL, |p| p.as_str())
    }
}
