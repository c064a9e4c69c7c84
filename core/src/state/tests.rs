use proptest::prelude::*;

use super::*;
use crate::ids::CellId;
use crate::job::{FailureClass, InfraReason};
use crate::pipeline;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn project(id: &str) -> ProjectSpec {
    ProjectSpec {
        id: ProjectId::new(id).unwrap(),
        repo_url: format!("https://github.com/acme/{id}.git"),
        provider: Provider::Github,
        webhook_secret: "s3cret".into(),
        pipeline_path: ".ci.yaml".into(),
        tenant: None,
        weight: 1,
    }
}

fn cell_spec(id: &str) -> CellSpec {
    CellSpec {
        id: CellId::new(id).unwrap(),
        region: "eu".into(),
        labels: BTreeMap::new(),
        pools: BTreeMap::from([("default".to_owned(), 4)]),
        agent_version: "test".into(),
    }
}

fn push(branch: &str) -> ForgeEvent {
    ForgeEvent::Push {
        branch: branch.into(),
        sha: SHA.into(),
        changed_paths: None,
        actor: "octocat".into(),
    }
}

fn jobs(yaml: &str) -> Vec<JobSpec> {
    let yaml = yaml.replacen(
        "version: 1\n",
        "version: 1\ndefaults: { image: 'debian:12' }\n",
        1,
    );
    pipeline::parse(".ci.yaml", &yaml).unwrap().jobs
}

/// a; b needs a; c needs a; d needs b.
pub(super) const DIAMOND: &str = "version: 1\njobs:\n  a: { run: 'true' }\n  b: { run: 'true', needs: [a] }\n  c: { run: 'true', needs: [a] }\n  d: { run: 'true', needs: [b] }\n";

pub(super) struct World {
    pub(super) state: State,
    index: u64,
    now: u64,
}

impl World {
    pub(super) fn new() -> Self {
        let mut w = World {
            state: State::default(),
            index: 0,
            now: 1_000,
        };
        w.ok(Command::CreateProject {
            spec: project("web"),
            now_ms: 1,
        });
        w.register("eu-1");
        w
    }

    fn expire(&mut self, cell: &str) {
        let id = CellId::new(cell).unwrap();
        let (last_seen_ms, now_ms) = (self.state.cells[&id].last_seen_ms, self.now);
        self.ok(Command::ExpireLeases {
            cell: id,
            last_seen_ms,
            now_ms,
        });
    }

    fn register(&mut self, cell: &str) {
        let now_ms = self.now;
        self.ok(Command::RegisterCell {
            spec: cell_spec(cell),
            now_ms,
        });
    }

    fn apply(&mut self, c: Command) -> Applied {
        self.index += 1;
        self.now += 10;
        self.state.apply(self.index, c)
    }

    fn ok(&mut self, c: Command) -> Applied {
        let a = self.apply(c);
        assert!(
            !matches!(a.response, Response::Rejected(_)),
            "refused: {:?}",
            a.response
        );
        a
    }

    fn ingest(&mut self, delivery: Option<&str>, event: ForgeEvent) -> (BuildId, bool) {
        let now_ms = self.now;
        match self
            .ok(Command::IngestEvent {
                project: ProjectId::new("web").unwrap(),
                delivery: delivery.map(str::to_owned),
                event,
                now_ms,
            })
            .response
        {
            Response::Ingested { build, duplicate } => (build, duplicate),
            other => panic!("{other:?}"),
        }
    }

    pub(super) fn build_with(&mut self, yaml: &str, group: Option<(&str, bool)>) -> BuildId {
        let (b, _) = self.ingest(None, push("main"));
        let now_ms = self.now;
        self.ok(Command::ResolvePipeline {
            build: b,
            sha: Some(SHA.into()),
            resolution: Resolution::Jobs {
                jobs: jobs(yaml),
                concurrency: group.map(|(g, c)| (g.to_owned(), c)),
            },
            now_ms,
        });
        b
    }

    fn job(&self, b: BuildId, name: &str) -> &Job {
        self.state.builds[&b]
            .jobs
            .iter()
            .map(|j| &self.state.jobs[j])
            .find(|j| j.spec.name == name)
            .unwrap()
    }

    fn phase(&self, b: BuildId, name: &str) -> JobPhase {
        self.job(b, name).phase()
    }

    fn status(&self, b: BuildId) -> BuildStatus {
        self.state.builds[&b].status
    }

    /// Places, starts and finishes a job; returns its fence.
    fn run(&mut self, b: BuildId, name: &str, outcome: Outcome) -> Fence {
        let fence = self.place(b, name);
        let job = self.job(b, name).id;
        let now_ms = self.now;
        self.ok(Command::JobStarted {
            job,
            fence,
            runner: RunnerTimes::default(),
            now_ms,
        });
        self.ok(Command::JobFinished {
            job,
            fence,
            outcome,
            now_ms,
        });
        fence
    }

    fn place(&mut self, b: BuildId, name: &str) -> Fence {
        let job = self.job(b, name).id;
        let now_ms = self.now;
        self.ok(Command::PlaceJobs {
            placements: vec![Placement {
                job,
                cell: CellId::new("eu-1").unwrap(),
                lease_expires_at_ms: now_ms + 10_000,
            }],
            now_ms,
        });
        self.job(b, name).run.fence().unwrap()
    }
}

#[test]
fn a_redelivered_webhook_returns_the_first_build_and_creates_nothing() {
    let mut w = World::new();
    let (first, dup) = w.ingest(Some("d-1"), push("main"));
    assert!(!dup);
    let before = w.state.clone();
    let (again, dup) = w.ingest(Some("d-1"), push("main"));
    assert_eq!((again, dup), (first, true));
    assert_eq!(w.state, before, "a duplicate changes nothing");
    let (other, dup) = w.ingest(Some("d-2"), push("main"));
    assert!(!dup && other != first);
    assert_eq!(w.state.builds[&other].number, 2);
}

#[test]
fn delivery_keys_are_forgotten_after_seven_days_and_not_before() {
    let mut w = World::new();
    w.ingest(Some("old"), push("main"));
    let t0 = w.now;
    w.ok(Command::Prune {
        now_ms: t0 + DELIVERY_RETENTION_MS - 100,
    });
    assert_eq!(w.state.deliveries.len(), 1);
    w.ok(Command::Prune {
        now_ms: t0 + DELIVERY_RETENTION_MS + 100,
    });
    assert!(w.state.deliveries.is_empty() && w.state.delivery_times.is_empty());
}

#[test]
fn events_for_unknown_projects_are_refused_without_changes() {
    let mut w = World::new();
    let before = w.state.clone();
    let a = w.apply(Command::IngestEvent {
        project: ProjectId::new("nope").unwrap(),
        delivery: Some("x".into()),
        event: push("main"),
        now_ms: 5,
    });
    assert!(matches!(
        a.response,
        Response::Rejected(Rejection::NotFound(_))
    ));
    assert_eq!(w.state, before);
}

#[test]
fn a_resolved_build_queues_only_the_jobs_without_needs() {
    let mut w = World::new();
    let b = w.build_with(DIAMOND, None);
    assert_eq!(w.status(b), BuildStatus::Queued);
    assert_eq!(w.phase(b, "a"), JobPhase::Queued);
    for n in ["b", "c", "d"] {
        assert_eq!(w.phase(b, n), JobPhase::Pending, "{n}");
    }
    assert_eq!(w.job(b, "d").needs, vec![w.job(b, "b").id]);
}

#[test]
fn jobs_run_in_dag_order_and_the_build_succeeds_when_all_do() {
    let mut w = World::new();
    let b = w.build_with(DIAMOND, None);
    w.run(b, "a", Outcome::Succeeded);
    assert_eq!(w.status(b), BuildStatus::Running);
    assert_eq!(
        (w.phase(b, "b"), w.phase(b, "c"), w.phase(b, "d")),
        (JobPhase::Queued, JobPhase::Queued, JobPhase::Pending)
    );
    w.run(b, "b", Outcome::Succeeded);
    w.run(b, "c", Outcome::Succeeded);
    w.run(b, "d", Outcome::Succeeded);
    assert_eq!(w.status(b), BuildStatus::Succeeded);
    assert!(w.state.builds[&b].finished_at_ms.is_some());
}

#[test]
fn a_failed_job_dooms_its_dependants_and_fails_the_build() {
    let mut w = World::new();
    let b = w.build_with(DIAMOND, None);
    w.run(b, "a", Outcome::Succeeded);
    w.run(b, "b", Outcome::Failed(FailureClass::Test { exit_code: 3 }));
    assert_eq!(w.phase(b, "d"), JobPhase::Cancelled);
    assert_eq!(w.job(b, "d").cancel_reason, Some(CancelReason::NeedFailed));
    assert_eq!(w.status(b), BuildStatus::Running, "c is still queued");
    w.run(b, "c", Outcome::Succeeded);
    assert_eq!(w.status(b), BuildStatus::Failed);
    assert_eq!(
        w.job(b, "b").run.failure(),
        Some(FailureClass::Test { exit_code: 3 })
    );
}

#[test]
fn retrying_a_failed_build_reruns_the_failed_job_and_what_it_doomed() {
    let mut w = World::new();
    let b = w.build_with(DIAMOND, None);
    w.run(b, "a", Outcome::Succeeded);
    w.run(b, "b", Outcome::Failed(FailureClass::Test { exit_code: 1 }));
    w.run(b, "c", Outcome::Succeeded);
    let refused = w.apply(Command::RetryBuild {
        build: BuildId(999),
        now_ms: 1,
    });
    assert!(matches!(refused.response, Response::Rejected(_)));
    w.ok(Command::RetryBuild {
        build: b,
        now_ms: 9,
    });
    assert_eq!(w.phase(b, "b"), JobPhase::Queued);
    assert_eq!(w.job(b, "b").run.attempt().get(), 2);
    assert_eq!(w.phase(b, "d"), JobPhase::Pending);
    assert_eq!(w.phase(b, "c"), JobPhase::Succeeded, "succeeded jobs stay");
    assert!(!w.status(b).is_terminal());
    w.run(b, "b", Outcome::Succeeded);
    w.run(b, "d", Outcome::Succeeded);
    assert_eq!(w.status(b), BuildStatus::Succeeded);
}

#[test]
fn infra_failures_are_retried_with_a_new_fence_and_stale_fences_are_refused() {
    let mut w = World::new();
    let b = w.build_with("version: 1\njobs:\n  a: { run: 'true' }\n", None);
    let old = w.place(b, "a");
    let job = w.job(b, "a").id;
    w.ok(Command::JobStarted {
        job,
        fence: old,
        runner: RunnerTimes::default(),
        now_ms: 1,
    });
    w.ok(Command::JobFinished {
        job,
        fence: old,
        outcome: Outcome::Failed(FailureClass::Infra {
            reason: InfraReason::RunnerCrash,
        }),
        now_ms: 2,
    });
    assert_eq!(
        w.phase(b, "a"),
        JobPhase::Queued,
        "infra budget 2 retries it"
    );
    let new = w.place(b, "a");
    assert!(new > old);
    let late = w.apply(Command::JobFinished {
        job,
        fence: old,
        outcome: Outcome::Succeeded,
        now_ms: 3,
    });
    assert_eq!(
        late.response,
        Response::Rejected(Rejection::StaleFence {
            job,
            got: old,
            current: new
        })
    );
    assert_eq!(w.phase(b, "a"), JobPhase::Leased);
}

#[test]
fn cancelling_a_build_revokes_the_jobs_out_on_cells() {
    let mut w = World::new();
    let b = w.build_with(DIAMOND, None);
    let fence = w.place(b, "a");
    let a = w.ok(Command::CancelBuild {
        build: b,
        now_ms: 5,
    });
    assert!(a.events.contains(&Event::JobRevoked {
        job: w.job(b, "a").id,
        cell: CellId::new("eu-1").unwrap(),
        fence
    }));
    assert_eq!(w.status(b), BuildStatus::Cancelled);
    assert!(
        w.state.builds[&b]
            .jobs
            .iter()
            .all(|j| w.state.jobs[j].phase() == JobPhase::Cancelled)
    );
    let again = w.apply(Command::CancelBuild {
        build: b,
        now_ms: 6,
    });
    assert!(matches!(
        again.response,
        Response::Rejected(Rejection::Conflict(_))
    ));
}

#[test]
fn a_newer_build_with_cancel_in_progress_cancels_older_builds_of_its_group() {
    let mut w = World::new();
    let old = w.build_with(DIAMOND, Some(("refs/heads/main", true)));
    let other = w.build_with(DIAMOND, Some(("refs/heads/dev", true)));
    let new = w.build_with(DIAMOND, Some(("refs/heads/main", true)));
    assert_eq!(w.status(old), BuildStatus::Cancelled);
    assert_eq!(
        w.job(old, "a").cancel_reason,
        Some(CancelReason::Superseded)
    );
    assert_eq!(
        w.status(other),
        BuildStatus::Queued,
        "another group is untouched"
    );
    assert_eq!(w.status(new), BuildStatus::Queued);
}

#[test]
fn a_group_without_cancel_in_progress_runs_one_build_at_a_time() {
    let mut w = World::new();
    let one = "version: 1\njobs:\n  a: { run: 'true' }\n";
    let first = w.build_with(one, Some(("deploy", false)));
    let second = w.build_with(one, Some(("deploy", false)));
    assert!(w.state.builds[&second].held);
    assert_eq!(w.phase(second, "a"), JobPhase::Pending);
    w.run(first, "a", Outcome::Succeeded);
    assert!(!w.state.builds[&second].held);
    assert_eq!(w.phase(second, "a"), JobPhase::Queued);
}

#[test]
fn a_broken_or_untriggered_pipeline_ends_the_build_with_the_reason() {
    let mut w = World::new();
    let (b, _) = w.ingest(None, push("main"));
    w.ok(Command::ResolvePipeline {
        build: b,
        sha: Some(SHA.into()),
        resolution: Resolution::Failed(".ci.yaml:3:5: unknown key `jobz`".into()),
        now_ms: 7,
    });
    assert_eq!(w.status(b), BuildStatus::Failed);
    assert_eq!(
        w.state.builds[&b].error.as_deref(),
        Some(".ci.yaml:3:5: unknown key `jobz`")
    );
    let retry = w.apply(Command::RetryBuild {
        build: b,
        now_ms: 8,
    });
    assert!(matches!(
        retry.response,
        Response::Rejected(Rejection::Conflict(_))
    ));

    let (s, _) = w.ingest(None, push("feature"));
    w.ok(Command::ResolvePipeline {
        build: s,
        sha: Some(SHA.into()),
        resolution: Resolution::Skipped("pushed branch `feature` is not in `branches`".into()),
        now_ms: 9,
    });
    assert_eq!(w.status(s), BuildStatus::Skipped);
    // A second resolution (a new leader re-loading) is refused and changes nothing.
    let again = w.apply(Command::ResolvePipeline {
        build: s,
        sha: Some(SHA.into()),
        resolution: Resolution::Jobs {
            jobs: jobs(DIAMOND),
            concurrency: None,
        },
        now_ms: 10,
    });
    assert!(matches!(again.response, Response::Rejected(_)));
    assert!(w.state.builds[&s].jobs.is_empty());
}

#[test]
fn deleting_a_project_removes_its_builds_tokens_and_deliveries() {
    let mut w = World::new();
    w.ok(Command::CreateProject {
        spec: project("api"),
        now_ms: 2,
    });
    let b = w.build_with(DIAMOND, None);
    w.ingest(Some("k"), push("main"));
    let t = w.ok(Command::CreateToken {
        hash: "h".into(),
        scope: Scope::Read,
        project: Some(ProjectId::new("web").unwrap()),
        now_ms: 3,
    });
    assert_eq!(t.response, Response::TokenCreated(1));
    w.ok(Command::DeleteProject {
        id: ProjectId::new("web").unwrap(),
        now_ms: 4,
    });
    assert!(!w.state.builds.contains_key(&b));
    assert!(w.state.jobs.is_empty() && w.state.tokens.is_empty());
    assert!(w.state.deliveries.is_empty());
    assert!(
        w.state
            .projects
            .contains_key(&ProjectId::new("api").unwrap())
    );
}

#[derive(Debug, Clone)]
enum Step {
    Place(usize),
    Start(usize),
    Finish(usize, u8),
    Cancel,
    Retry,
    Expire,
    Register,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..4usize).prop_map(Step::Place),
        (0..4usize).prop_map(Step::Start),
        (0..4usize, 0..4u8).prop_map(|(j, o)| Step::Finish(j, o)),
        Just(Step::Cancel),
        Just(Step::Retry),
        Just(Step::Expire),
        Just(Step::Register),
    ]
}

proptest! {
    /// Whatever runners report, in whatever order: a job is only ever queued or out on a
    /// cell when all its needs succeeded, a finished build has only finished jobs, and a
    /// succeeded build has only succeeded jobs.
    #[test]
    fn builds_and_jobs_stay_consistent_under_any_sequence_of_reports(steps in prop::collection::vec(step(), 1..60)) {
        let mut w = World::new();
        let b = w.build_with(DIAMOND, None);
        let names = ["a", "b", "c", "d"];
        for s in steps {
            let cmd = match s {
                Step::Place(i) => Command::PlaceJobs {
                    placements: vec![Placement {
                        job: w.job(b, names[i]).id,
                        cell: CellId::new("eu-1").unwrap(),
                        lease_expires_at_ms: 1,
                    }],
                    now_ms: w.now,
                },
                Step::Start(i) => Command::JobStarted {
                    job: w.job(b, names[i]).id,
                    fence: w.job(b, names[i]).run.fence().unwrap_or(Fence(0)),
                    runner: RunnerTimes::default(),
                    now_ms: w.now,
                },
                Step::Finish(i, o) => Command::JobFinished {
                    job: w.job(b, names[i]).id,
                    fence: w.job(b, names[i]).run.fence().unwrap_or(Fence(0)),
                    outcome: match o {
                        0 => Outcome::Succeeded,
                        1 => Outcome::Failed(FailureClass::Test { exit_code: 1 }),
                        2 => Outcome::Failed(FailureClass::Infra { reason: InfraReason::Evicted }),
                        _ => Outcome::Failed(FailureClass::Timeout),
                    },
                    now_ms: w.now,
                },
                Step::Cancel => Command::CancelBuild { build: b, now_ms: w.now },
                Step::Retry => Command::RetryBuild { build: b, now_ms: w.now },
                Step::Expire => Command::ExpireLeases { cell: CellId::new("eu-1").unwrap(), last_seen_ms: w.state.cells[&CellId::new("eu-1").unwrap()].last_seen_ms, now_ms: w.now },
                Step::Register => Command::RegisterCell { spec: cell_spec("eu-1"), now_ms: w.now },
            };
            let before = w.state.clone();
            let applied = w.apply(cmd);
            if matches!(applied.response, Response::Rejected(_)) {
                prop_assert_eq!(&w.state, &before, "a refused command changed the state");
            }
            let build = &w.state.builds[&b];
            for j in &build.jobs {
                let job = &w.state.jobs[j];
                if matches!(job.phase(), JobPhase::Queued | JobPhase::Leased | JobPhase::Running) {
                    for n in &job.needs {
                        prop_assert_eq!(w.state.jobs[n].phase(), JobPhase::Succeeded);
                    }
                }
                if build.status.is_terminal() {
                    prop_assert!(job.phase().is_terminal(), "{:?} in a finished build", job.phase());
                }
                if build.status == BuildStatus::Succeeded {
                    prop_assert_eq!(job.phase(), JobPhase::Succeeded);
                }
            }
        }
    }
}

#[test]
fn a_lost_cell_gives_up_its_jobs_with_a_new_attempt_and_they_are_revoked_there() {
    let mut w = World::new();
    w.register("eu-2");
    let b = w.build_with(DIAMOND, None);
    let fence = w.place(b, "a");
    let job = w.job(b, "a").id;
    let now_ms = w.now;
    w.ok(Command::JobStarted {
        job,
        fence,
        runner: RunnerTimes::default(),
        now_ms,
    });

    let cell = CellId::new("eu-1").unwrap();
    let seen = w.state.cells[&cell].last_seen_ms;
    let applied = w.ok(Command::ExpireLeases {
        cell: cell.clone(),
        last_seen_ms: seen,
        now_ms,
    });
    assert_eq!(w.state.cells[&cell].state, CellState::Lost);
    assert_eq!(w.phase(b, "a"), JobPhase::Queued);
    let a = w.job(b, "a");
    assert_eq!(a.run.attempt().get(), 2);
    assert_eq!(
        a.run.failure(),
        Some(FailureClass::Infra {
            reason: InfraReason::CellLost
        })
    );
    assert!(applied.events.contains(&Event::JobRevoked {
        job,
        cell: cell.clone(),
        fence
    }));
    assert!(applied.events.contains(&Event::JobsQueued(vec![job])));

    // Nothing can be placed on the lost cell; the other cell takes the job under a new fence.
    let stale = w.apply(Command::PlaceJobs {
        placements: vec![Placement {
            job,
            cell: cell.clone(),
            lease_expires_at_ms: 0,
        }],
        now_ms,
    });
    assert!(stale.events.is_empty(), "placed on a lost cell: {stale:?}");
    assert_eq!(w.phase(b, "a"), JobPhase::Queued);
    w.ok(Command::PlaceJobs {
        placements: vec![Placement {
            job,
            cell: CellId::new("eu-2").unwrap(),
            lease_expires_at_ms: 0,
        }],
        now_ms,
    });
    let new_fence = w.job(b, "a").run.fence().unwrap();
    assert!(new_fence > fence);

    // The old runner's report is refused; the cell comes back active.
    let late = w.apply(Command::JobFinished {
        job,
        fence,
        outcome: Outcome::Succeeded,
        now_ms,
    });
    assert!(matches!(
        late.response,
        Response::Rejected(Rejection::StaleFence { .. })
    ));
    w.register("eu-1");
    assert_eq!(w.state.cells[&cell].state, CellState::Active);
}

#[test]
fn a_job_whose_infra_retries_are_spent_fails_when_its_cell_is_lost_and_dooms_its_dependents() {
    let mut w = World::new();
    let b = w.build_with(
        "version: 1\njobs:\n  a: { run: 'true', retry: { infra: 0 } }\n  b: { run: 'true', needs: [a] }\n",
        None,
    );
    w.place(b, "a");
    w.expire("eu-1");
    assert_eq!(w.phase(b, "a"), JobPhase::Failed);
    assert_eq!(w.phase(b, "b"), JobPhase::Cancelled);
    assert_eq!(w.status(b), BuildStatus::Failed);
}

#[test]
fn expiring_an_unknown_cell_is_refused() {
    let mut w = World::new();
    let a = w.apply(Command::ExpireLeases {
        cell: CellId::new("nowhere").unwrap(),
        last_seen_ms: 0,
        now_ms: 1,
    });
    assert!(matches!(
        a.response,
        Response::Rejected(Rejection::NotFound(_))
    ));
}

#[test]
fn first_fit_fills_live_active_cells_up_to_their_pool_size_oldest_job_first() {
    let mut w = World::new();
    w.register("eu-2");
    let b = w.build_with(
        "version: 1\njobs:\n  a: { run: 'true' }\n  b: { run: 'true' }\n  c: { run: 'true' }\n  d: { run: 'true', placement: { pool: gpu } }\n",
        None,
    );
    let eu1 = CellId::new("eu-1").unwrap();
    let eu2 = CellId::new("eu-2").unwrap();
    // Pool `default` holds 4 per cell; eu-1 already runs one job of another build.
    let other = w.build_with("version: 1\njobs:\n  x: { run: 'true' }\n", None);
    let cell_specs = [("eu-1", 2u32), ("eu-2", 4)];
    for (c, n) in cell_specs {
        let mut spec = cell_spec(c);
        spec.pools = BTreeMap::from([("default".to_owned(), n)]);
        let now_ms = w.now;
        w.ok(Command::RegisterCell { spec, now_ms });
    }
    w.place(other, "x");

    // Only eu-1 has a session: one free runner there, so only the oldest job goes.
    let live = BTreeSet::from([eu1.clone()]);
    let p = crate::placement::first_fit(&w.state, &live, 5, 100, 10);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].job, w.job(b, "a").id);
    assert_eq!(p[0].cell, eu1);
    assert_eq!(p[0].lease_expires_at_ms, 105);

    // Both live: a to eu-1, b and c to eu-2; d wants a pool no cell has.
    let live = BTreeSet::from([eu1.clone(), eu2.clone()]);
    let p = crate::placement::first_fit(&w.state, &live, 5, 100, 10);
    let cells: Vec<(JobId, CellId)> = p.into_iter().map(|p| (p.job, p.cell)).collect();
    assert_eq!(
        cells,
        vec![
            (w.job(b, "a").id, eu1.clone()),
            (w.job(b, "b").id, eu2.clone()),
            (w.job(b, "c").id, eu2.clone()),
        ]
    );

    // A cordoned or lost cell takes nothing; the limit caps the batch.
    w.expire("eu-1");
    let p = crate::placement::first_fit(&w.state, &live, 5, 100, 2);
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|p| p.cell == eu2));
}

#[test]
fn a_cell_that_registered_again_is_not_expired_by_an_entry_decided_before() {
    let mut w = World::new();
    let b = w.build_with("version: 1\njobs:\n  a: { run: 'true' }\n", None);
    w.place(b, "a");
    let cell = CellId::new("eu-1").unwrap();
    let judged = w.state.cells[&cell].last_seen_ms;
    w.register("eu-1");
    let late = w.apply(Command::ExpireLeases {
        cell: cell.clone(),
        last_seen_ms: judged,
        now_ms: w.now,
    });
    assert!(matches!(
        late.response,
        Response::Rejected(Rejection::Conflict(_))
    ));
    assert_eq!(w.state.cells[&cell].state, CellState::Active);
    assert_eq!(w.phase(b, "a"), JobPhase::Leased);
}

#[test]
fn a_draining_cell_takes_no_new_work_lets_jobs_finish_and_hands_the_rest_back_at_its_deadline() {
    let mut w = World::new();
    w.register("eu-2");
    let b = w.build_with(
        "version: 1\njobs:\n  quick: { run: 'true', retry: { infra: 0 } }\n  slow: { run: 'true', retry: { infra: 0 } }\n  later: { run: 'true' }\n",
        None,
    );
    let cell = CellId::new("eu-1").unwrap();
    let mut fences = BTreeMap::new();
    for name in ["quick", "slow"] {
        let fence = w.place(b, name);
        let job = w.job(b, name).id;
        let now_ms = w.now;
        w.ok(Command::JobStarted {
            job,
            fence,
            runner: RunnerTimes::default(),
            now_ms,
        });
        fences.insert(name, (job, fence));
    }
    let deadline_ms = w.now + 1_000;
    let now_ms = w.now;
    let applied = w.ok(Command::SetCellState {
        cell: cell.clone(),
        change: CellChange::Drain { deadline_ms },
        now_ms,
    });
    assert_eq!(
        w.state.cells[&cell].state,
        CellState::Draining { deadline_ms }
    );
    assert!(applied.events.contains(&Event::CellChanged(cell.clone())));

    // No new work goes there.
    let later = w.job(b, "later").id;
    let refused = w.apply(Command::PlaceJobs {
        placements: vec![Placement {
            job: later,
            cell: cell.clone(),
            lease_expires_at_ms: 0,
        }],
        now_ms,
    });
    assert!(refused.events.is_empty(), "placed on a draining cell");
    // Too early to hand anything back.
    let early = w.apply(Command::FinishDrain {
        cell: cell.clone(),
        now_ms: deadline_ms - 1,
    });
    assert!(matches!(early.response, Response::Rejected(_)), "{early:?}");
    // A job that ends before the deadline is not disturbed.
    let (quick, quick_fence) = fences["quick"];
    w.ok(Command::JobFinished {
        job: quick,
        fence: quick_fence,
        outcome: Outcome::Succeeded,
        now_ms,
    });
    assert_eq!(w.phase(b, "quick"), JobPhase::Succeeded);

    // At the deadline the rest is re-queued — even with no infra budget left — ahead of
    // undisturbed work, elsewhere, and revoked on the drained cell.
    let (slow, slow_fence) = fences["slow"];
    let done = w.ok(Command::FinishDrain {
        cell: cell.clone(),
        now_ms: deadline_ms,
    });
    assert_eq!(w.state.cells[&cell].state, CellState::Cordoned);
    assert_eq!(w.phase(b, "slow"), JobPhase::Queued);
    let j = w.job(b, "slow");
    assert_eq!(j.run.attempt().get(), 2);
    assert_eq!(j.boost, 1);
    assert_eq!(j.avoid.as_ref(), Some(&cell));
    assert_eq!(
        j.run.failure(),
        Some(FailureClass::Infra {
            reason: InfraReason::Drained
        })
    );
    assert!(done.events.contains(&Event::JobRevoked {
        job: slow,
        cell: cell.clone(),
        fence: slow_fence
    }));

    // Back in service on request; a lost cell cannot be uncordoned, only cordoned.
    w.ok(Command::SetCellState {
        cell: cell.clone(),
        change: CellChange::Uncordon,
        now_ms,
    });
    assert_eq!(w.state.cells[&cell].state, CellState::Active);
    w.expire("eu-2");
    let eu2 = CellId::new("eu-2").unwrap();
    let refused = w.apply(Command::SetCellState {
        cell: eu2.clone(),
        change: CellChange::Drain { deadline_ms },
        now_ms,
    });
    assert!(matches!(refused.response, Response::Rejected(_)));
    w.ok(Command::SetCellState {
        cell: eu2.clone(),
        change: CellChange::Cordon,
        now_ms,
    });
    assert_eq!(
        w.state.cells[&eu2].state,
        CellState::Lost,
        "still lost: its leases stay expired"
    );
    w.register("eu-2");
    assert_eq!(
        w.state.cells[&eu2].state,
        CellState::Cordoned,
        "a cell cordoned while lost stays out of service when it returns"
    );
    // A cordoned cell that drops out comes back cordoned too.
    w.expire("eu-2");
    w.register("eu-2");
    assert_eq!(w.state.cells[&eu2].state, CellState::Cordoned);
    // Uncordoned while lost: it takes work again when it returns.
    w.expire("eu-2");
    w.ok(Command::SetCellState {
        cell: eu2.clone(),
        change: CellChange::Uncordon,
        now_ms,
    });
    w.register("eu-2");
    assert_eq!(w.state.cells[&eu2].state, CellState::Active);
}
