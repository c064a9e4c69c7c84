//! The API's JSON shapes, built from the replicated state. Ids are strings (JavaScript
//! numbers lose precision past 2^53); times are RFC 3339 in UTC.

use flotilla_core::forge::ForgeEvent;
use flotilla_core::job::{FailureClass, JobPhase};
use flotilla_core::state::{Build, Job, Project, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::clock::rfc3339;

/// A project. The webhook secret is never returned.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ProjectView {
    /// Its id (also its name).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Clone URL.
    pub repo_url: String,
    /// `github`, `gitlab` or `git`.
    pub provider: String,
    /// Pipeline file path in the repository.
    pub pipeline_path: String,
    /// Where the forge should send webhooks (relative to the federator's URL).
    pub webhook_path: Option<String>,
    /// Builds created so far.
    pub builds: u64,
    /// The fair-share tenant it is placed under (its own id unless grouped).
    pub tenant: String,
    /// Its share weight.
    pub weight: u32,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

impl ProjectView {
    pub(super) fn new(p: &Project) -> Self {
        let provider = p.provider.as_str();
        Self {
            id: p.id.to_string(),
            name: p.id.to_string(),
            repo_url: p.repo_url.clone(),
            provider: provider.to_owned(),
            pipeline_path: p.pipeline_path.clone(),
            webhook_path: (provider != "git").then(|| format!("/webhooks/{provider}/{}", p.id)),
            builds: p.builds,
            tenant: p.tenant.clone().unwrap_or_else(|| p.id.to_string()),
            weight: p.weight,
            created_at: rfc3339(p.created_at_ms),
            updated_at: rfc3339(p.updated_at_ms),
        }
    }
}

/// `POST /projects`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateProject {
    /// A slug: lowercase letters, digits and dashes.
    pub name: String,
    /// Clone URL (`https://…`, `http://…` or `file://…`).
    pub repo_url: String,
    /// `github`, `gitlab` or `git`.
    pub provider: String,
    /// The webhook secret configured on the forge.
    pub webhook_secret: String,
    /// Pipeline file path (default `.ci.yaml`).
    #[serde(default)]
    pub pipeline_path: Option<String>,
    /// The fair-share tenant (an org or team) whose share the project's jobs count against;
    /// default: the project is its own tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Share weight, 1–1000 (default 1): a tenant of weight 2 gets twice the runners of a
    /// tenant of weight 1 when both have work waiting.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// `PATCH /projects/{id}`: fields to change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateProject {
    /// New clone URL.
    pub repo_url: Option<String>,
    /// New provider.
    pub provider: Option<String>,
    /// New webhook secret.
    pub webhook_secret: Option<String>,
    /// New pipeline path.
    pub pipeline_path: Option<String>,
    /// New fair-share tenant; `""` makes the project its own tenant again.
    pub tenant: Option<String>,
    /// New share weight.
    pub weight: Option<u32>,
}

/// `POST /projects/{id}/builds`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TriggerBuild {
    /// A branch (`main`) or full ref (`refs/tags/v1`).
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// A commit; default: the ref's head when the pipeline is loaded.
    #[serde(default)]
    pub sha: Option<String>,
}

/// An accepted build.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BuildAccepted {
    /// The build.
    pub build_id: String,
    /// True when this delivery was seen before (its first build is returned).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// A webhook that starts nothing.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Ignored {
    /// Why.
    pub ignored: String,
}

/// Why a job failed.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FailureView {
    /// `infra`, `test`, `timeout`, `cancelled` or `config`.
    pub class: &'static str,
    /// For `test`: the failing step's exit code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// For `infra`: `CellLost`, `Evicted`, `ImagePull`, `RunnerCrash`, `LeaseExpired`, `Drained`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Compact form, such as `Test{3}`.
    pub summary: String,
}

impl FailureView {
    fn new(f: FailureClass) -> Self {
        Self {
            class: f.kind(),
            exit_code: match f {
                FailureClass::Test { exit_code } => Some(exit_code),
                _ => None,
            },
            reason: match f {
                FailureClass::Infra { reason } => Some(reason.as_str()),
                _ => None,
            },
            summary: f.to_string(),
        }
    }
}

/// A job.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct JobView {
    /// Its id.
    pub id: String,
    /// Its build.
    pub build: String,
    /// Its name in the pipeline (matrix values in parentheses).
    pub name: String,
    /// `pending`, `queued`, `leased`, `running`, `succeeded`, `failed`, `cancelled` or `timed_out`.
    pub status: &'static str,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Names of the jobs it needs.
    pub needs: Vec<String>,
    /// The cell running it, while leased or running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    /// When its current attempt was queued.
    pub queued_at: Option<String>,
    /// When its current attempt started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureView>,
}

impl JobView {
    pub(super) fn new(state: &State, j: &Job) -> Self {
        let failure = match j.phase() {
            JobPhase::Failed | JobPhase::TimedOut | JobPhase::Cancelled => j.run.failure(),
            _ => None,
        };
        Self {
            id: j.id.to_string(),
            build: j.build.to_string(),
            name: j.spec.name.clone(),
            status: j.phase().as_str(),
            attempt: j.run.attempt().get(),
            needs: j
                .needs
                .iter()
                .filter_map(|n| state.jobs.get(n).map(|n| n.spec.name.clone()))
                .collect(),
            cell: j.run.cell().map(ToString::to_string),
            queued_at: j.queued_at_ms.map(rfc3339),
            started_at: j.started_at_ms.map(rfc3339),
            finished_at: j.finished_at_ms.map(rfc3339),
            failure: failure.map(FailureView::new),
        }
    }
}

/// A job with what it runs (`GET /jobs/{id}`).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct JobDetail {
    /// The job.
    #[serde(flatten)]
    pub job: JobView,
    /// Its project.
    pub project: String,
    /// Container image.
    pub image: String,
    /// Step names, in order.
    pub steps: Vec<String>,
    /// Timeout in seconds, counted from when it starts running.
    pub timeout_secs: u64,
    /// The current placement's fence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// Where the current attempt's start time went.
    pub timings: JobTimings,
}

/// When the current attempt reached each step on its way to a runner. `placed_at` is the
/// leader's clock; `delivered_at` and `runner_started_at` are the cell's.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct JobTimings {
    /// When it was placed on a cell.
    pub placed_at: Option<String>,
    /// When the cell agent received the assignment.
    pub delivered_at: Option<String>,
    /// When the runner started the first step.
    pub runner_started_at: Option<String>,
    /// The same three, in milliseconds since the Unix epoch, for tools.
    pub placed_at_ms: Option<u64>,
    /// See `delivered_at`.
    pub delivered_at_ms: Option<u64>,
    /// See `runner_started_at`.
    pub runner_started_at_ms: Option<u64>,
}

/// A registered cell.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CellView {
    /// Its id.
    pub id: String,
    /// `active`, `cordoned`, `draining` or `lost`.
    pub state: &'static str,
    /// Its region.
    pub region: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its pools and their sizes.
    pub pools: std::collections::BTreeMap<String, u32>,
    /// The agent's version.
    pub agent_version: String,
    /// Whether its agent has a session with the leader right now (as this replica knows).
    pub connected: bool,
    /// Jobs leased to or running on it.
    pub jobs: usize,
    /// When it last registered.
    pub last_seen: String,
    /// Milliseconds since its last heartbeat reached the leader (connected cells only).
    pub last_heartbeat_ms_ago: Option<u64>,
    /// When a draining cell hands back what is left.
    pub drain_deadline: Option<String>,
    /// For a lost cell: the state it takes when its agent reconnects (`active` unless an
    /// operator cordoned it).
    pub returns_as: Option<&'static str>,
    /// Each pool as its last heartbeat reported it (connected cells only).
    pub capacity: std::collections::BTreeMap<String, PoolView>,
    /// Pod creations per second its API server can still afford, as it reported.
    pub api_budget: Option<u32>,
    /// Projects whose home cell it is (where their jobs go first, for cache locality).
    pub home_projects: usize,
}

/// A runner pool's figures from the cell's last heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PoolView {
    /// Runners.
    pub total: u32,
    /// Runners running a job.
    pub busy: u32,
    /// Runners waiting for a job (the warm pool).
    pub idle: u32,
    /// Runners being created (counted in `total`).
    pub starting: u32,
    /// Jobs waiting in the cell for a runner.
    pub queued: u32,
    /// Most runners the pool may have.
    pub max: u32,
    /// Total workload `(busy + queued) / total`.
    pub workload: Option<f64>,
}

/// `POST /cells/{id}/drain`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DrainCell {
    /// How long running jobs may go on before what is left is placed elsewhere, such as
    /// `10m` (`0s`: hand everything back at once).
    pub deadline: String,
}

impl JobDetail {
    pub(super) fn new(state: &State, j: &Job) -> Self {
        Self {
            job: JobView::new(state, j),
            project: j.project.to_string(),
            image: j.spec.image.clone(),
            steps: j.spec.steps.iter().map(|s| s.name.clone()).collect(),
            timeout_secs: j.spec.timeout_secs,
            fence: j.run.fence().map(|f| f.0),
            timings: JobTimings {
                placed_at: j.placed_at_ms.map(rfc3339),
                delivered_at: j.runner.delivered_at_ms.map(rfc3339),
                runner_started_at: j.runner.started_at_ms.map(rfc3339),
                placed_at_ms: j.placed_at_ms,
                delivered_at_ms: j.runner.delivered_at_ms,
                runner_started_at_ms: j.runner.started_at_ms,
            },
        }
    }
}

/// A build with its jobs.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BuildView {
    /// Its id.
    pub id: String,
    /// Its project.
    pub project: String,
    /// Its number within the project.
    pub number: u64,
    /// `pending`, `queued`, `running`, `succeeded`, `failed`, `cancelled` or `skipped`.
    pub status: &'static str,
    /// The full ref built.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit, once known.
    pub sha: Option<String>,
    /// `push`, `pull_request`, `tag` or `manual`.
    pub event: &'static str,
    /// For a pull request: its number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<u64>,
    /// Who caused it.
    pub actor: String,
    /// Acceptance time.
    pub created_at: String,
    /// When its first job started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Why it failed or was skipped; pipeline errors name `file:line:col`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its concurrency group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_group: Option<String>,
    /// Its jobs, in pipeline order (empty until the pipeline is loaded).
    pub jobs: Vec<JobView>,
}

impl BuildView {
    pub(super) fn new(state: &State, b: &Build, with_jobs: bool) -> Self {
        Self {
            id: b.id.to_string(),
            project: b.project.to_string(),
            number: b.number,
            status: b.status.as_str(),
            git_ref: b.git_ref.clone(),
            sha: b.sha.clone(),
            event: b.event.kind(),
            pull_request: match &b.event {
                ForgeEvent::PullRequest { number, .. } => Some(*number),
                _ => None,
            },
            actor: b.event.actor().to_owned(),
            created_at: rfc3339(b.created_at_ms),
            started_at: b.started_at_ms.map(rfc3339),
            finished_at: b.finished_at_ms.map(rfc3339),
            error: b.error.clone(),
            concurrency_group: b.concurrency_group.clone(),
            jobs: if with_jobs {
                b.jobs
                    .iter()
                    .filter_map(|j| state.jobs.get(j))
                    .map(|j| JobView::new(state, j))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// A page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Page<T> {
    /// This page.
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `POST /tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateToken {
    /// The project it is limited to; `null` for every project.
    #[serde(default)]
    pub project: Option<String>,
    /// `read`, `write` or `admin`.
    pub scope: String,
}

/// A new token, shown once.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TokenCreated {
    /// Its id, to revoke it.
    pub id: String,
    /// The secret. Store it now: it cannot be shown again.
    pub token: String,
    /// Its scope.
    pub scope: &'static str,
    /// Its project, if limited to one.
    pub project: Option<String>,
}

/// One replica.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MemberView {
    /// Raft node id.
    pub id: u64,
    /// gRPC address.
    pub raft_addr: String,
    /// HTTP API base URL, once announced.
    pub http_url: Option<String>,
    /// Voter (or learner).
    pub voter: bool,
}

/// `GET /cluster`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ClusterView {
    /// The replica that answered.
    pub node_id: u64,
    /// The leader's id, if known.
    pub leader: Option<u64>,
    /// Current Raft term.
    pub term: u64,
    /// The last log index applied on the answering replica (everything up to it is committed).
    pub commit_index: u64,
    /// The last log index the answering replica holds.
    pub last_log_index: u64,
    /// Members.
    pub members: Vec<MemberView>,
}
