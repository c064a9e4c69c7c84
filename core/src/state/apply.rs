//! [`State::apply`]: every change to the replicated state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{
    Applied, Build, BuildStatus, CancelReason, Cell, CellChange, CellSpec, CellState, Command,
    DELIVERY_RETENTION_MS, Delivery, DeliveryKey, Event, Job, Project, ProjectPatch, ProjectSpec,
    Rejection, Resolution, Response, RunnerTimes, State,
};
use crate::forge::ForgeEvent;
use crate::ids::{BuildId, CellId, Fence, JobId, ProjectId};
use crate::job::{FailureClass, InfraReason, JobError, JobEvent, JobPhase, JobRun, Outcome};
use crate::pipeline::JobSpec;

type Reply = Result<Response, Rejection>;

impl State {
    /// Applies a committed command. `index` is its Raft log index (the fence of a placement).
    /// A refused command changes nothing and returns [`Response::Rejected`].
    pub fn apply(&mut self, index: u64, command: Command) -> Applied {
        let mut events = Vec::new();
        let reply = match command {
            Command::CreateProject { spec, now_ms } => self.create_project(spec, now_ms),
            Command::UpdateProject { id, patch, now_ms } => self.update_project(&id, patch, now_ms),
            Command::DeleteProject { id, now_ms } => self.delete_project(&id, now_ms, &mut events),
            Command::CreateToken {
                hash,
                scope,
                project,
                now_ms,
            } => self.create_token(hash, scope, project, now_ms),
            Command::RevokeToken { id } => match self.tokens.remove(&id) {
                Some(_) => Ok(Response::Ok),
                None => Err(Rejection::NotFound(format!("token {id}"))),
            },
            Command::IngestEvent {
                project,
                delivery,
                event,
                now_ms,
            } => self.ingest(project, delivery, event, now_ms, &mut events),
            Command::ResolvePipeline {
                build,
                sha,
                resolution,
                now_ms,
            } => self.resolve(build, sha, resolution, now_ms, &mut events),
            Command::PlaceJobs { placements, now_ms } => {
                let fence = Fence(index);
                // Each build's status once per entry, not once per job: a monorepo's build
                // of 5,000 jobs placed 512 at a time would otherwise be read 512 times.
                // The version still moves once per placed job, as it did when each placement
                // refreshed its build: replicas replaying the same log must agree.
                let mut builds: Vec<(BuildId, u64)> = Vec::new();
                for p in placements {
                    let placed = self.place(
                        p.job,
                        p.cell,
                        fence,
                        p.lease_expires_at_ms,
                        now_ms,
                        &mut events,
                    );
                    if let Some(b) = placed {
                        match builds.iter_mut().find(|(id, _)| *id == b) {
                            Some((_, n)) => *n += 1,
                            None => builds.push((b, 1)),
                        }
                    }
                }
                for (b, n) in builds {
                    self.refresh_build(b, now_ms, &mut events);
                    if let Some(build) = self.builds.get_mut(&b).map(Arc::make_mut) {
                        build.version += n - 1;
                    }
                }
                Ok(Response::Ok)
            }
            Command::JobStarted {
                job,
                fence,
                runner,
                now_ms,
            } => self.job_started(job, fence, runner, now_ms, &mut events),
            Command::JobFinished {
                job,
                fence,
                outcome,
                now_ms,
            } => self.job_finished(job, fence, outcome, now_ms, &mut events),
            Command::CancelBuild { build, now_ms } => {
                self.cancel_build(build, CancelReason::User, now_ms, &mut events)
            }
            Command::RetryBuild { build, now_ms } => self.retry_build(build, now_ms, &mut events),
            Command::AnnounceReplica { node_id, http_url } => {
                self.replicas.insert(node_id, http_url);
                Ok(Response::Ok)
            }
            Command::Prune { now_ms } => {
                self.prune_deliveries(now_ms);
                Ok(Response::Ok)
            }
            Command::RegisterCell { spec, now_ms } => {
                self.register_cell(spec, now_ms, &mut events);
                Ok(Response::Ok)
            }
            Command::ExpireLeases {
                cell,
                last_seen_ms,
                now_ms,
            } => self.expire_leases(&cell, last_seen_ms, now_ms, &mut events),
            Command::SetCellState {
                cell,
                change,
                now_ms: _,
            } => self.set_cell_state(&cell, change, &mut events),
            Command::FinishDrain { cell, now_ms } => self.finish_drain(&cell, now_ms, &mut events),
            Command::AnnounceCellEndpoint { node_id, addr } => {
                self.cell_endpoints.insert(node_id, addr);
                Ok(Response::Ok)
            }
        };
        match reply {
            Ok(response) => Applied { response, events },
            Err(rejection) => {
                debug_assert!(events.is_empty(), "a refused command must change nothing");
                Applied {
                    response: Response::Rejected(rejection),
                    events: Vec::new(),
                }
            }
        }
    }

    fn create_project(&mut self, spec: ProjectSpec, now_ms: u64) -> Reply {
        if self.projects.contains_key(&spec.id) {
            return Err(Rejection::Conflict(format!(
                "project `{}` already exists",
                spec.id
            )));
        }
        let project = Project {
            id: spec.id.clone(),
            repo_url: spec.repo_url,
            provider: spec.provider,
            webhook_secret: spec.webhook_secret,
            pipeline_path: spec.pipeline_path,
            tenant: spec.tenant,
            weight: spec.weight.max(1),
            builds: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        self.projects.insert(spec.id, project);
        Ok(Response::Ok)
    }

    fn update_project(&mut self, id: &ProjectId, patch: ProjectPatch, now_ms: u64) -> Reply {
        let p = self
            .projects
            .get_mut(id)
            .ok_or_else(|| Rejection::NotFound(format!("project `{id}`")))?;
        if let Some(v) = patch.repo_url {
            p.repo_url = v;
        }
        if let Some(v) = patch.provider {
            p.provider = v;
        }
        if let Some(v) = patch.webhook_secret {
            p.webhook_secret = v;
        }
        if let Some(v) = patch.pipeline_path {
            p.pipeline_path = v;
        }
        if let Some(v) = patch.tenant {
            p.tenant = v;
        }
        if let Some(v) = patch.weight {
            p.weight = v.max(1);
        }
        p.updated_at_ms = now_ms;
        Ok(Response::Ok)
    }

    fn delete_project(&mut self, id: &ProjectId, now_ms: u64, events: &mut Vec<Event>) -> Reply {
        if !self.projects.contains_key(id) {
            return Err(Rejection::NotFound(format!("project `{id}`")));
        }
        let active: Vec<BuildId> = self.active_builds(id).map(|b| b.id).collect();
        for b in active {
            // Cannot fail: the build exists and is active.
            let _ = self.cancel_build(b, CancelReason::User, now_ms, events);
        }
        let builds: Vec<BuildId> = self
            .builds
            .values()
            .filter(|b| &b.project == id)
            .map(|b| b.id)
            .collect();
        for b in builds {
            if let Some(build) = self.builds.remove(&b) {
                for j in &build.jobs {
                    self.jobs.remove(j);
                }
            }
        }
        self.tokens.retain(|_, t| t.project.as_ref() != Some(id));
        self.deliveries.retain(|k, _| &k.project != id);
        self.delivery_times.retain(|(_, k)| &k.project != id);
        self.projects.remove(id);
        Ok(Response::Ok)
    }

    fn create_token(
        &mut self,
        hash: String,
        scope: super::Scope,
        project: Option<ProjectId>,
        now_ms: u64,
    ) -> Reply {
        if let Some(p) = &project
            && !self.projects.contains_key(p)
        {
            return Err(Rejection::NotFound(format!("project `{p}`")));
        }
        self.next_ids.token += 1;
        let id = self.next_ids.token;
        self.tokens.insert(
            id,
            super::ApiToken {
                id,
                hash,
                scope,
                project,
                created_at_ms: now_ms,
            },
        );
        Ok(Response::TokenCreated(id))
    }

    fn ingest(
        &mut self,
        project: ProjectId,
        delivery: Option<String>,
        event: ForgeEvent,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let p = self
            .projects
            .get_mut(&project)
            .ok_or_else(|| Rejection::NotFound(format!("project `{project}`")))?;
        if let Some(key) = &delivery {
            let k = DeliveryKey {
                project: project.clone(),
                key: key.clone(),
            };
            if let Some(d) = self.deliveries.get(&k) {
                return Ok(Response::Ingested {
                    build: d.build,
                    duplicate: true,
                });
            }
        }
        p.builds += 1;
        let number = p.builds;
        self.next_ids.build += 1;
        let id = BuildId(self.next_ids.build);
        if let Some(key) = &delivery {
            let k = Arc::new(DeliveryKey {
                project: project.clone(),
                key: key.clone(),
            });
            self.delivery_times.insert((now_ms, k.clone()));
            self.deliveries.insert(
                k,
                Delivery {
                    build: id,
                    at_ms: now_ms,
                },
            );
        }
        let build = Build {
            id,
            project,
            number,
            git_ref: event.git_ref(),
            sha: event.sha().map(str::to_owned),
            event,
            delivery,
            status: BuildStatus::Pending,
            error: None,
            concurrency_group: None,
            held: false,
            jobs: Vec::new(),
            created_at_ms: now_ms,
            started_at_ms: None,
            finished_at_ms: None,
            version: 1,
        };
        self.builds.insert(id, Arc::new(build));
        events.push(Event::BuildCreated(id));
        Ok(Response::Ingested {
            build: id,
            duplicate: false,
        })
    }

    fn resolve(
        &mut self,
        id: BuildId,
        sha: Option<String>,
        resolution: Resolution,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let build = self
            .builds
            .get(&id)
            .ok_or_else(|| Rejection::NotFound(format!("build {id}")))?;
        if build.status != BuildStatus::Pending {
            // A new leader may load a build its predecessor already resolved.
            return Err(Rejection::Conflict(format!(
                "build {id} is {}, not pending",
                build.status.as_str()
            )));
        }
        let project = build.project.clone();
        let (jobs, concurrency) = match resolution {
            Resolution::Failed(message) => {
                self.finish_without_jobs(id, sha, BuildStatus::Failed, message, now_ms, events);
                return Ok(Response::Ok);
            }
            Resolution::Skipped(reason) => {
                self.finish_without_jobs(id, sha, BuildStatus::Skipped, reason, now_ms, events);
                return Ok(Response::Ok);
            }
            Resolution::Jobs { jobs, .. } if jobs.is_empty() => {
                let why = "no job's `if:` condition holds for this event".to_owned();
                self.finish_without_jobs(id, sha, BuildStatus::Skipped, why, now_ms, events);
                return Ok(Response::Ok);
            }
            Resolution::Jobs { jobs, concurrency } => (jobs, concurrency),
        };
        if let Err(message) = check_needs(&jobs) {
            self.finish_without_jobs(id, sha, BuildStatus::Failed, message, now_ms, events);
            return Ok(Response::Ok);
        }

        // Concurrency group: cancel or wait for older builds of the same group.
        let mut held = false;
        if let Some((group, cancel_in_progress)) = &concurrency {
            let older: Vec<BuildId> = self
                .active_builds(&project)
                .filter(|b| b.id < id && b.concurrency_group.as_ref() == Some(group))
                .map(|b| b.id)
                .collect();
            if *cancel_in_progress {
                for b in older {
                    let _ = self.cancel_build(b, CancelReason::Superseded, now_ms, events);
                }
            } else {
                held = !older.is_empty();
            }
        }

        let first = self.next_ids.job + 1;
        self.next_ids.job += jobs.len() as u64;
        let ids: Vec<JobId> = (0..jobs.len() as u64).map(|i| JobId(first + i)).collect();
        let by_name: BTreeMap<&str, JobId> = jobs
            .iter()
            .zip(&ids)
            .map(|(j, id)| (j.name.as_str(), *id))
            .collect();
        let needs: Vec<Vec<JobId>> = jobs
            .iter()
            .map(|j| j.needs.iter().map(|n| by_name[n.as_str()]).collect())
            .collect();
        let mut dependents: BTreeMap<JobId, Vec<JobId>> = BTreeMap::new();
        for (job, needs) in ids.iter().zip(&needs) {
            for n in needs {
                dependents.entry(*n).or_default().push(*job);
            }
        }
        for ((spec, job), needs) in jobs.into_iter().zip(&ids).zip(needs) {
            let run = JobRun::new(spec.retry);
            self.jobs.insert(
                *job,
                Job {
                    id: *job,
                    build: id,
                    project: project.clone(),
                    spec: std::sync::Arc::new(spec),
                    needs,
                    dependents: dependents.remove(job).unwrap_or_default(),
                    run,
                    cancel_reason: None,
                    queued_at_ms: None,
                    started_at_ms: None,
                    finished_at_ms: None,
                    placed_at_ms: None,
                    runner: RunnerTimes::default(),
                    boost: 0,
                    avoid: None,
                    version: 1,
                },
            );
        }
        let build = self
            .builds
            .get_mut(&id)
            .map(Arc::make_mut)
            .expect("checked above");
        if sha.is_some() {
            build.sha = sha;
        }
        build.jobs = ids;
        build.concurrency_group = concurrency.map(|(g, _)| g);
        build.held = held;
        build.status = BuildStatus::Queued;
        build.version += 1;
        events.push(Event::BuildChanged(id));
        if !held {
            self.queue_ready(id, now_ms, events);
        }
        Ok(Response::Ok)
    }

    fn finish_without_jobs(
        &mut self,
        id: BuildId,
        sha: Option<String>,
        status: BuildStatus,
        message: String,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let build = self
            .builds
            .get_mut(&id)
            .map(Arc::make_mut)
            .expect("caller checked");
        if sha.is_some() {
            build.sha = sha;
        }
        build.status = status;
        build.error = Some(message);
        build.finished_at_ms = Some(now_ms);
        build.version += 1;
        events.push(Event::BuildChanged(id));
    }

    /// Queues every pending job of `build` whose needs have all succeeded.
    fn queue_ready(&mut self, build: BuildId, now_ms: u64, events: &mut Vec<Event>) {
        let Some(b) = self.builds.get(&build) else {
            return;
        };
        if b.held {
            return;
        }
        let ready: Vec<JobId> = b
            .jobs
            .iter()
            .copied()
            .filter(|j| {
                let job = &self.jobs[j];
                job.phase() == JobPhase::Pending
                    && job
                        .needs
                        .iter()
                        .all(|n| self.jobs[n].phase() == JobPhase::Succeeded)
            })
            .collect();
        for j in &ready {
            let job = self.jobs.get_mut(j).expect("listed above");
            if job.run.apply(JobEvent::DepsSatisfied).is_ok() {
                job.queued_at_ms = Some(now_ms);
                job.version += 1;
                events.push(Event::JobChanged(*j));
            }
        }
        if !ready.is_empty() {
            events.push(Event::JobsQueued(ready));
        }
    }

    /// Places one job; returns its build, whose status the caller refreshes.
    fn place(
        &mut self,
        job: JobId,
        cell: crate::ids::CellId,
        fence: Fence,
        lease_expires_at_ms: u64,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Option<BuildId> {
        // The scheduler only picks active cells; this guards against a cell lost or cordoned
        // between its snapshot and this entry.
        if self.cells.get(&cell).map(|c| c.state) != Some(CellState::Active) {
            return None;
        }
        let j = self.jobs.get_mut(&job)?;
        let placed = j.run.apply(JobEvent::Placed {
            cell: cell.clone(),
            fence,
            lease_expires_at_ms,
        });
        if placed.is_err() {
            // The job was cancelled or placed since the scheduler's snapshot: skip it.
            return None;
        }
        j.version += 1;
        j.placed_at_ms = Some(now_ms);
        j.runner = RunnerTimes::default();
        // Both served this placement: the next one starts from scratch.
        j.boost = 0;
        j.avoid = None;
        let build = j.build;
        events.push(Event::JobChanged(job));
        events.push(Event::JobAssigned { job, cell, fence });
        Some(build)
    }

    fn job_started(
        &mut self,
        job: JobId,
        fence: Fence,
        runner: RunnerTimes,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let j = self
            .jobs
            .get_mut(&job)
            .ok_or_else(|| Rejection::NotFound(format!("job {job}")))?;
        j.run
            .apply(JobEvent::Started { fence })
            .map_err(|e| job_rejection(job, e))?;
        j.started_at_ms = Some(now_ms);
        j.runner = runner;
        j.version += 1;
        let build = j.build;
        events.push(Event::JobChanged(job));
        if let Some(b) = self.builds.get_mut(&build).map(Arc::make_mut)
            && b.started_at_ms.is_none()
        {
            b.started_at_ms = Some(now_ms);
        }
        self.refresh_build(build, now_ms, events);
        Ok(Response::Ok)
    }

    fn job_finished(
        &mut self,
        job: JobId,
        fence: Fence,
        outcome: Outcome,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let j = self
            .jobs
            .get_mut(&job)
            .ok_or_else(|| Rejection::NotFound(format!("job {job}")))?;
        let from = j.run.cell().cloned();
        // Only a drain the federator itself finished hands an attempt back as `Drained` (which
        // is retried for free); a cell saying so is treated as the crash it is.
        let outcome = match outcome {
            Outcome::Failed(FailureClass::Infra {
                reason: InfraReason::Drained,
            }) => Outcome::Failed(FailureClass::Infra {
                reason: InfraReason::RunnerCrash,
            }),
            other => other,
        };
        let phase = j
            .run
            .apply(JobEvent::Finished { fence, outcome })
            .map_err(|e| job_rejection(job, e))?;
        j.version += 1;
        let build = j.build;
        if phase == JobPhase::Queued {
            // Retried under the job's budget: a new attempt waits for a cell, preferably
            // another one when the platform failed it there.
            j.queued_at_ms = Some(now_ms);
            j.started_at_ms = None;
            if matches!(outcome, Outcome::Failed(FailureClass::Infra { .. })) {
                j.avoid = from;
            }
            events.push(Event::JobChanged(job));
            events.push(Event::JobsQueued(vec![job]));
        } else {
            j.finished_at_ms = Some(now_ms);
            events.push(Event::JobChanged(job));
            if phase == JobPhase::Succeeded {
                self.queue_ready(build, now_ms, events);
            } else {
                self.doom_dependents(job, now_ms, events);
            }
        }
        self.refresh_build(build, now_ms, events);
        Ok(Response::Ok)
    }

    /// Cancels every job that (transitively) needs `job`, which can now never run.
    fn doom_dependents(&mut self, job: JobId, now_ms: u64, events: &mut Vec<Event>) {
        let mut stack = self.jobs[&job].dependents.clone();
        let mut seen = BTreeSet::new();
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            let dj = self.jobs.get_mut(&d).expect("dependents exist");
            if dj.phase() == JobPhase::Pending && dj.run.apply(JobEvent::Cancel).is_ok() {
                dj.cancel_reason = Some(CancelReason::NeedFailed);
                dj.finished_at_ms = Some(now_ms);
                dj.version += 1;
                events.push(Event::JobChanged(d));
                stack.extend(dj.dependents.iter().copied());
            }
        }
    }

    fn cancel_build(
        &mut self,
        id: BuildId,
        reason: CancelReason,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let build = self
            .builds
            .get_mut(&id)
            .map(Arc::make_mut)
            .ok_or_else(|| Rejection::NotFound(format!("build {id}")))?;
        if build.status.is_terminal() {
            return Err(Rejection::Conflict(format!(
                "build {id} already ended ({})",
                build.status.as_str()
            )));
        }
        if build.status == BuildStatus::Pending {
            build.status = BuildStatus::Cancelled;
            build.finished_at_ms = Some(now_ms);
            build.version += 1;
            events.push(Event::BuildChanged(id));
            return Ok(Response::Ok);
        }
        for j in build.jobs.clone() {
            let job = self.jobs.get_mut(&j).expect("build jobs exist");
            if job.phase().is_terminal() {
                continue;
            }
            let out_on = job.run.cell().cloned().zip(job.run.fence());
            if job.run.apply(JobEvent::Cancel).is_ok() {
                job.cancel_reason = Some(reason);
                job.finished_at_ms = Some(now_ms);
                job.version += 1;
                events.push(Event::JobChanged(j));
                if let Some((cell, fence)) = out_on {
                    events.push(Event::JobRevoked {
                        job: j,
                        cell,
                        fence,
                    });
                }
            }
        }
        self.refresh_build(id, now_ms, events);
        Ok(Response::Ok)
    }

    fn retry_build(&mut self, id: BuildId, now_ms: u64, events: &mut Vec<Event>) -> Reply {
        let build = self
            .builds
            .get(&id)
            .ok_or_else(|| Rejection::NotFound(format!("build {id}")))?;
        if build.status != BuildStatus::Failed {
            return Err(Rejection::Conflict(format!(
                "build {id} is {}; only failed builds can be retried",
                build.status.as_str()
            )));
        }
        if build.jobs.is_empty() {
            return Err(Rejection::Conflict(format!(
                "build {id} failed before any job was created ({}); push a fix or start a new build",
                build.error.as_deref().unwrap_or("pipeline error")
            )));
        }
        for j in build.jobs.clone() {
            let job = self.jobs.get_mut(&j).expect("build jobs exist");
            let again = match job.phase() {
                JobPhase::Failed | JobPhase::TimedOut => true,
                JobPhase::Cancelled => job.cancel_reason == Some(CancelReason::NeedFailed),
                _ => false,
            };
            if again && job.run.apply(JobEvent::Retry).is_ok() {
                job.cancel_reason = None;
                job.queued_at_ms = None;
                job.started_at_ms = None;
                job.finished_at_ms = None;
                job.version += 1;
                events.push(Event::JobChanged(j));
            }
        }
        let build = self
            .builds
            .get_mut(&id)
            .map(Arc::make_mut)
            .expect("checked above");
        build.finished_at_ms = None;
        build.error = None;
        build.status = BuildStatus::Queued;
        build.version += 1;
        self.queue_ready(id, now_ms, events);
        self.refresh_build(id, now_ms, events);
        Ok(Response::Ok)
    }

    /// Recomputes a loaded build's status from its jobs; when it ends, releases the next
    /// build waiting in its concurrency group.
    fn refresh_build(&mut self, id: BuildId, now_ms: u64, events: &mut Vec<Event>) {
        let Some(build) = self.builds.get(&id) else {
            return;
        };
        if build.jobs.is_empty() {
            return;
        }
        let phases: Vec<JobPhase> = build.jobs.iter().map(|j| self.jobs[j].phase()).collect();
        let status = if phases.iter().any(|p| !p.is_terminal()) {
            if phases
                .iter()
                .any(|p| matches!(p, JobPhase::Leased | JobPhase::Running))
                || build.started_at_ms.is_some()
            {
                BuildStatus::Running
            } else {
                BuildStatus::Queued
            }
        } else if phases
            .iter()
            .any(|p| matches!(p, JobPhase::Failed | JobPhase::TimedOut))
        {
            BuildStatus::Failed
        } else if phases.contains(&JobPhase::Cancelled) {
            BuildStatus::Cancelled
        } else {
            BuildStatus::Succeeded
        };
        let build = self
            .builds
            .get_mut(&id)
            .map(Arc::make_mut)
            .expect("checked above");
        let ended = status.is_terminal() && !build.status.is_terminal();
        build.status = status;
        build.version += 1;
        if ended {
            build.finished_at_ms = Some(now_ms);
            build.held = false;
        }
        events.push(Event::BuildChanged(id));
        if ended && let Some(group) = build.concurrency_group.clone() {
            let project = build.project.clone();
            let next = self
                .active_builds(&project)
                .find(|b| b.held && b.concurrency_group.as_ref() == Some(&group))
                .map(|b| b.id);
            if let Some(next) = next {
                let b = self
                    .builds
                    .get_mut(&next)
                    .map(Arc::make_mut)
                    .expect("found above");
                b.held = false;
                b.version += 1;
                events.push(Event::BuildChanged(next));
                self.queue_ready(next, now_ms, events);
            }
        }
    }

    fn register_cell(&mut self, spec: CellSpec, now_ms: u64, events: &mut Vec<Event>) {
        let cell = self.cells.entry(spec.id.clone()).or_insert_with(|| Cell {
            id: spec.id.clone(),
            region: String::new(),
            labels: BTreeMap::new(),
            pools: BTreeMap::new(),
            agent_version: String::new(),
            state: CellState::Active,
            registered_at_ms: now_ms,
            last_seen_ms: now_ms,
            returns_as: None,
        });
        cell.region = spec.region;
        cell.labels = spec.labels;
        cell.pools = spec.pools;
        cell.agent_version = spec.agent_version;
        cell.last_seen_ms = now_ms;
        if cell.state == CellState::Lost {
            cell.state = cell.returns_as.take().unwrap_or(CellState::Active);
        }
        events.push(Event::CellChanged(spec.id));
    }

    /// Marks a cell lost and takes every job it holds away from it (ARCHITECTURE §6).
    fn expire_leases(
        &mut self,
        cell: &CellId,
        last_seen_ms: u64,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let c = self
            .cells
            .get_mut(cell)
            .ok_or_else(|| Rejection::NotFound(format!("cell `{cell}`")))?;
        if c.last_seen_ms != last_seen_ms {
            return Err(Rejection::Conflict(format!(
                "cell `{cell}` registered again since its leases were judged expired"
            )));
        }
        if c.state != CellState::Lost {
            // An operator's cordon survives the cell dropping out; a drain is over (its jobs
            // go back now, as lost), and the cell returns cordoned.
            c.returns_as = match c.state {
                CellState::Cordoned | CellState::Draining { .. } => Some(CellState::Cordoned),
                _ => None,
            };
            c.state = CellState::Lost;
            events.push(Event::CellChanged(cell.clone()));
        }
        self.take_back(cell, InfraReason::CellLost, now_ms, events);
        Ok(Response::Ok)
    }

    fn set_cell_state(
        &mut self,
        cell: &CellId,
        change: CellChange,
        events: &mut Vec<Event>,
    ) -> Reply {
        let c = self
            .cells
            .get_mut(cell)
            .ok_or_else(|| Rejection::NotFound(format!("cell `{cell}`")))?;
        let next = match (change, c.state) {
            // A lost cell's jobs are gone already. Cordoning it keeps it out of service when
            // its agent returns; uncordoning lets it take work then; there is nothing to drain.
            (CellChange::Drain { .. }, CellState::Lost) => {
                return Err(Rejection::Conflict(format!(
                    "cell `{cell}` is lost and holds no jobs: cordon it to keep it out of \
                     service when its agent returns"
                )));
            }
            (CellChange::Cordon, CellState::Lost) => {
                if c.returns_as != Some(CellState::Cordoned) {
                    c.returns_as = Some(CellState::Cordoned);
                    events.push(Event::CellChanged(cell.clone()));
                }
                return Ok(Response::Ok);
            }
            (CellChange::Uncordon, CellState::Lost) => {
                if c.returns_as.take().is_some() {
                    events.push(Event::CellChanged(cell.clone()));
                }
                return Ok(Response::Ok);
            }
            (CellChange::Cordon, _) => CellState::Cordoned,
            (CellChange::Uncordon, _) => CellState::Active,
            (CellChange::Drain { deadline_ms }, _) => CellState::Draining { deadline_ms },
        };
        if c.state != next {
            c.state = next;
            events.push(Event::CellChanged(cell.clone()));
        }
        Ok(Response::Ok)
    }

    fn finish_drain(&mut self, cell: &CellId, now_ms: u64, events: &mut Vec<Event>) -> Reply {
        let c = self
            .cells
            .get_mut(cell)
            .ok_or_else(|| Rejection::NotFound(format!("cell `{cell}`")))?;
        match c.state {
            CellState::Draining { deadline_ms } if now_ms >= deadline_ms => {}
            CellState::Draining { deadline_ms } => {
                return Err(Rejection::Conflict(format!(
                    "cell `{cell}` drains until {deadline_ms}, not {now_ms}"
                )));
            }
            other => {
                return Err(Rejection::Conflict(format!(
                    "cell `{cell}` is {}, not draining",
                    other.as_str()
                )));
            }
        }
        c.state = CellState::Cordoned;
        events.push(Event::CellChanged(cell.clone()));
        self.take_back(cell, InfraReason::Drained, now_ms, events);
        Ok(Response::Ok)
    }

    /// Takes every attempt `cell` holds away from it for `reason`: each job is re-queued with
    /// a new attempt (or fails, once its infra budget is spent), avoids the cell next time,
    /// and goes ahead of undisturbed work after a drain; the cell is told to kill them.
    fn take_back(
        &mut self,
        cell: &CellId,
        reason: InfraReason,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        let held: Vec<JobId> = self.jobs_on(cell).map(|j| j.id).collect();
        let mut requeued = Vec::new();
        let mut builds = BTreeSet::new();
        for id in held {
            let j = self.jobs.get_mut(&id).expect("listed above");
            let fence = j.run.fence().expect("a job on a cell has a fence");
            let Ok(phase) = j.run.apply(JobEvent::LeaseLost { reason }) else {
                continue;
            };
            j.version += 1;
            j.started_at_ms = None;
            j.placed_at_ms = None;
            j.avoid = Some(cell.clone());
            if reason == InfraReason::Drained {
                j.boost += 1;
            }
            builds.insert(j.build);
            events.push(Event::JobChanged(id));
            events.push(Event::JobRevoked {
                job: id,
                cell: cell.clone(),
                fence,
            });
            if phase == JobPhase::Queued {
                j.queued_at_ms = Some(now_ms);
                requeued.push(id);
            } else {
                j.finished_at_ms = Some(now_ms);
                self.doom_dependents(id, now_ms, events);
            }
        }
        if !requeued.is_empty() {
            events.push(Event::JobsQueued(requeued));
        }
        for b in builds {
            self.refresh_build(b, now_ms, events);
        }
    }

    fn prune_deliveries(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(DELIVERY_RETENTION_MS);
        while let Some(first) = self.delivery_times.first() {
            if first.0 >= cutoff {
                break;
            }
            let (_, key) = self.delivery_times.pop_first().expect("checked");
            self.deliveries.remove(&key);
        }
    }
}

/// Every `needs` names a job of the list, and the graph has no cycle.
fn check_needs(jobs: &[JobSpec]) -> Result<(), String> {
    let index: BTreeMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    let mut needs = Vec::with_capacity(jobs.len());
    for j in jobs {
        let mut n = Vec::new();
        for name in &j.needs {
            match index.get(name.as_str()) {
                Some(i) => n.push(*i),
                None => {
                    return Err(format!(
                        "job `{}` needs `{name}`, which is not part of this build",
                        j.name
                    ));
                }
            }
        }
        needs.push(n);
    }
    crate::dag::Dag::new(needs)
        .map(|_| ())
        .map_err(|_| "the jobs' `needs` form a cycle".to_owned())
}

fn job_rejection(job: JobId, e: JobError) -> Rejection {
    match e {
        JobError::StaleFence { got, current } => Rejection::StaleFence { job, got, current },
        other => Rejection::Conflict(format!("job {job}: {other}")),
    }
}
