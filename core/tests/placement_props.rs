//! The scheduler (ARCHITECTURE §7) through the public API: states are built with commands as
//! the federator would commit them, `schedule` decides, and its decisions go back through
//! `State::apply` as `PlaceJobs` entries. Property tests check the invariants of one tick;
//! small deterministic simulations check fairness, fences and starvation over many.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_core::forge::{ForgeEvent, Provider};
use flotilla_core::job::{FailureClass, InfraReason, JobPhase, Outcome};
use flotilla_core::pipeline::{self, JobSpec, Placement as Constraints};
use flotilla_core::placement::{LiveCell, Schedule, Scheduler, Snapshot, home_cell, schedule};
use flotilla_core::state::{
    Applied, Cell, CellChange, CellSpec, CellState, Command, Event, Placement, ProjectPatch,
    ProjectSpec, Rejection, Resolution, Response, RunnerTimes, State,
};
use flotilla_core::{CellId, Fence, JobId, PoolName, ProjectId};
use proptest::prelude::*;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const TTL: u64 = 30_000;
/// Jobs per build when a test asks for many: keeps `apply`'s per-build work small.
const BUILD_SIZE: usize = 50;

fn cid(s: &str) -> CellId {
    CellId::new(s).unwrap()
}

fn pid(s: &str) -> ProjectId {
    ProjectId::new(s).unwrap()
}

fn constraints(region: Option<&str>, labels: &[(&str, &str)], pool: Option<&str>) -> Constraints {
    let mut c = Constraints {
        region: region.map(str::to_owned),
        pool: pool.map(|p| PoolName::new(p).unwrap()),
        ..Constraints::default()
    };
    for (k, v) in labels {
        c.labels.insert((*k).to_owned(), (*v).to_owned());
    }
    c
}

fn any_cell() -> Constraints {
    Constraints::default()
}

/// Every cell in `ids`, live, without a budget.
fn live(ids: &[&str]) -> Vec<LiveCell> {
    ids.iter()
        .map(|id| LiveCell {
            id: cid(id),
            budget: None,
        })
        .collect()
}

/// A replicated state driven by commands, with the leader's log index and clock, and the
/// leader's [`Scheduler`], kept across ticks as the federator keeps it.
struct World {
    state: State,
    index: u64,
    now: u64,
    template: JobSpec,
    scheduler: Scheduler,
}

impl World {
    fn new() -> Self {
        let yaml = "version: 1\ndefaults: { image: 'debian:12' }\njobs:\n  t: { run: 'true' }\n";
        let template = pipeline::parse(".ci.yaml", yaml).unwrap().jobs.remove(0);
        World {
            state: State::default(),
            index: 0,
            now: 1_000,
            template,
            scheduler: Scheduler::new(),
        }
    }

    fn apply(&mut self, c: Command) -> Applied {
        self.index += 1;
        self.now += 1;
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

    fn project(&mut self, id: &str, tenant: Option<&str>, weight: u32) {
        let now_ms = self.now;
        self.ok(Command::CreateProject {
            spec: ProjectSpec {
                id: pid(id),
                repo_url: format!("https://github.com/acme/{id}.git"),
                provider: Provider::Github,
                webhook_secret: "s3cret".into(),
                pipeline_path: ".ci.yaml".into(),
                tenant: tenant.map(str::to_owned),
                weight,
            },
            now_ms,
        });
    }

    fn cell(&mut self, id: &str, region: &str, labels: &[(&str, &str)], pools: &[(&str, u32)]) {
        let now_ms = self.now;
        self.ok(Command::RegisterCell {
            spec: CellSpec {
                id: cid(id),
                region: region.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                pools: pools.iter().map(|(p, n)| ((*p).to_owned(), *n)).collect(),
                agent_version: "test".into(),
            },
            now_ms,
        });
    }

    /// Queues `n` jobs of `project` with constraints `c`, in builds of [`BUILD_SIZE`].
    fn jobs(&mut self, project: &str, n: usize, c: &Constraints) -> Vec<JobId> {
        let mut ids = Vec::new();
        let mut left = n;
        while left > 0 {
            let size = left.min(BUILD_SIZE);
            left -= size;
            let build = self
                .push(project, self.specs(size, |_| c.clone()))
                .expect("the push is accepted");
            ids.extend(self.state.builds[&build].jobs.iter().copied());
        }
        ids
    }

    /// `n` copies of the template named `j0`, `j1`, …, with `placement(i)` as constraints.
    fn specs(&self, n: usize, mut placement: impl FnMut(usize) -> Constraints) -> Vec<JobSpec> {
        (0..n)
            .map(|i| {
                let mut j = self.template.clone();
                j.name = format!("j{i}");
                j.key = j.name.clone();
                j.placement = placement(i);
                j
            })
            .collect()
    }

    /// A push of `project` whose pipeline resolves to `jobs`; `None` when the push is
    /// refused (say, a deleted project).
    fn push(&mut self, project: &str, jobs: Vec<JobSpec>) -> Option<flotilla_core::BuildId> {
        let now_ms = self.now;
        let Response::Ingested { build, .. } = self
            .apply(Command::IngestEvent {
                project: pid(project),
                delivery: None,
                event: ForgeEvent::Push {
                    branch: "main".into(),
                    sha: SHA.into(),
                    changed_paths: None,
                    actor: "octocat".into(),
                },
                now_ms,
            })
            .response
        else {
            return None;
        };
        let now_ms = self.now;
        self.ok(Command::ResolvePipeline {
            build,
            sha: Some(SHA.into()),
            resolution: Resolution::Jobs {
                jobs,
                concurrency: None,
            },
            now_ms,
        });
        Some(build)
    }

    /// One tick by the kept [`Scheduler`], which must decide exactly as the one-off
    /// [`schedule`] does whatever it remembers from earlier ticks.
    fn tick(&mut self, live: &[LiveCell], limit: usize) -> Schedule {
        let snapshot = Snapshot {
            state: &self.state,
            live,
            now_ms: self.now,
            lease_ttl_ms: TTL,
            limit,
        };
        let once = schedule(&snapshot);
        let kept = self.scheduler.schedule(&snapshot);
        assert_eq!(kept, once, "the kept scheduler decided differently");
        once
    }

    fn commit(&mut self, placements: Vec<Placement>) -> Applied {
        let now_ms = self.now;
        self.ok(Command::PlaceJobs { placements, now_ms })
    }

    fn place_on(&mut self, job: JobId, cell: &str) {
        let lease_expires_at_ms = self.now + TTL;
        self.commit(vec![Placement {
            job,
            cell: cid(cell),
            lease_expires_at_ms,
        }]);
        assert_eq!(self.state.jobs[&job].run.cell(), Some(&cid(cell)));
    }

    fn fence(&self, job: JobId) -> Fence {
        self.state.jobs[&job].run.fence().unwrap()
    }

    fn start(&mut self, job: JobId) {
        let (fence, now_ms) = (self.fence(job), self.now);
        self.ok(Command::JobStarted {
            job,
            fence,
            runner: RunnerTimes::default(),
            now_ms,
        });
    }

    fn finish_with(&mut self, job: JobId, fence: Fence) -> Applied {
        let now_ms = self.now;
        self.apply(Command::JobFinished {
            job,
            fence,
            outcome: Outcome::Succeeded,
            now_ms,
        })
    }

    fn phase(&self, job: JobId) -> JobPhase {
        self.state.jobs[&job].phase()
    }

    fn cell_of(&self, job: JobId) -> Option<&CellId> {
        self.state.jobs[&job].run.cell()
    }

    /// Jobs leased or running, by tenant (the project's group or the project).
    fn running_by_tenant(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for j in self.state.jobs.values() {
            if matches!(j.phase(), JobPhase::Leased | JobPhase::Running) {
                let p = &self.state.projects[&j.project];
                let t = p.tenant.clone().unwrap_or_else(|| p.id.to_string());
                *out.entry(t).or_default() += 1;
            }
        }
        out
    }
}

/// Whether `cell` meets `c`'s region and labels and has a non-empty pool of `c`'s.
fn meets(cell: &Cell, c: &Constraints) -> bool {
    let pool = c.pool.as_ref().map_or("default", |p| p.as_str());
    c.region.as_ref().is_none_or(|r| *r == cell.region)
        && c.labels.iter().all(|(k, v)| cell.labels.get(k) == Some(v))
        && cell.pools.get(pool).is_some_and(|n| *n > 0)
}

fn pool_of(c: &Constraints) -> &str {
    c.pool.as_ref().map_or("default", |p| p.as_str())
}

/// Everything one tick must respect, checked against the state it was computed from.
fn check_tick(state: &State, live: &[LiveCell], limit: usize, s: &Schedule) {
    let live_ids: BTreeSet<&CellId> = live.iter().map(|l| &l.id).collect();
    let budget = |c: &CellId| {
        live.iter()
            .filter(|l| &l.id == c)
            .map(|l| l.budget.unwrap_or(u32::MAX))
            .min()
            .unwrap_or(0)
    };
    let usable = |c: &Cell| c.state == CellState::Active && live_ids.contains(&c.id);
    assert!(s.placements.len() <= limit, "more decisions than the limit");

    let mut seen = BTreeSet::new();
    let mut per_pool: BTreeMap<(&CellId, &str), u32> = BTreeMap::new();
    let mut per_cell: BTreeMap<&CellId, u32> = BTreeMap::new();
    for p in &s.placements {
        assert!(seen.insert(p.job), "job {} placed twice", p.job);
        let job = &state.jobs[&p.job];
        assert_eq!(
            job.phase(),
            JobPhase::Queued,
            "job {} was not queued",
            p.job
        );
        let cell = &state.cells[&p.cell];
        assert!(
            usable(cell),
            "job {} went to unusable cell {}",
            p.job,
            p.cell
        );
        assert!(meets(cell, &job.spec.placement), "constraints broken");
        *per_pool
            .entry((&p.cell, pool_of(&job.spec.placement)))
            .or_default() += 1;
        *per_cell.entry(&p.cell).or_default() += 1;
    }
    let mut used: BTreeMap<(&CellId, &str), u32> = BTreeMap::new();
    for j in state.jobs.values() {
        if let Some(c) = j.run.cell() {
            *used.entry((c, pool_of(&j.spec.placement))).or_default() += 1;
        }
    }
    let free = |c: &Cell, pool: &str| {
        let used = used.get(&(&c.id, pool)).copied().unwrap_or(0);
        c.pools.get(pool).map_or(0, |n| n.saturating_sub(used))
    };
    for ((c, pool), n) in &per_pool {
        assert!(*n <= free(&state.cells[*c], pool), "{c}/{pool} overfilled");
    }
    for (c, n) in &per_cell {
        assert!(*n <= budget(c), "{c} got more than its budget");
    }

    // Waiting: unplaceable jobs match no usable cell, every other queued job is either
    // placed or counted as waiting for capacity.
    let queued: Vec<_> = state.queued_jobs().collect();
    let unplaceable: BTreeSet<JobId> = queued
        .iter()
        .filter(|j| {
            !state
                .cells
                .values()
                .any(|c| usable(c) && meets(c, &j.spec.placement))
        })
        .map(|j| j.id)
        .collect();
    assert_eq!(
        s.waiting.unplaceable,
        unplaceable.iter().copied().collect::<Vec<_>>()
    );
    assert_eq!(
        s.waiting.no_capacity,
        queued.len() - unplaceable.len() - s.placements.len()
    );

    // Work-conserving: below the limit, a placeable job is left behind only when none of its
    // cells has room and budget after this tick's decisions.
    if s.placements.len() < limit {
        for j in &queued {
            if seen.contains(&j.id) || unplaceable.contains(&j.id) {
                continue;
            }
            let pool = pool_of(&j.spec.placement);
            for c in state.cells.values() {
                if !usable(c) || !meets(c, &j.spec.placement) {
                    continue;
                }
                let room = free(c, pool) - per_pool.get(&(&c.id, pool)).copied().unwrap_or(0);
                let left = budget(&c.id) - per_cell.get(&c.id).copied().unwrap_or(0);
                assert!(
                    room == 0 || left == 0,
                    "job {} was left behind although {} had room",
                    j.id,
                    c.id
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Single ticks.

#[test]
fn a_small_project_behind_a_monorepo_with_5000_queued_jobs_is_placed_in_the_first_tick() {
    let mut w = World::new();
    w.project("a-monorepo", None, 5);
    w.project("z-small", None, 1);
    w.cell("eu-1", "eu", &[], &[("default", 8)]);
    w.cell("eu-2", "eu", &[], &[("default", 8)]);
    w.jobs("a-monorepo", 5_000, &any_cell());
    let small = w.jobs("z-small", 1, &any_cell())[0];

    let s = w.tick(&live(&["eu-1", "eu-2"]), 2_000);
    check_tick(&w.state, &live(&["eu-1", "eu-2"]), 2_000, &s);
    assert_eq!(s.placements.len(), 16);
    assert!(
        s.placements[..2].iter().any(|p| p.job == small),
        "the small project's job is one of the first two decisions"
    );
    assert_eq!(s.waiting.no_capacity, 5_000 - 15);
}

#[test]
fn within_a_tenant_boosted_jobs_go_first_then_the_oldest_queue_time_then_the_lower_id() {
    let mut w = World::new();
    w.project("web", None, 1);
    w.cell("eu-1", "eu", &[], &[("default", 1)]);
    let ids = w.jobs("web", 4, &any_cell());
    // ids[3] has waited longest (a retried attempt keeps its place by queue time, not id).
    w.state.jobs.get_mut(&ids[3]).unwrap().queued_at_ms = Some(1);
    w.state.jobs.get_mut(&ids[2]).unwrap().boost = 1;
    let order = |w: &mut World| {
        let mut out = Vec::new();
        while let Some(p) = w.tick(&live(&["eu-1"]), 10).placements.pop() {
            out.push(p.job);
            w.commit(vec![p.clone()]);
            let fence = w.fence(p.job);
            w.start(p.job);
            w.finish_with(p.job, fence);
        }
        out
    };
    assert_eq!(order(&mut w), vec![ids[2], ids[3], ids[0], ids[1]]);
}

#[test]
fn a_job_that_fits_nowhere_this_tick_does_not_block_the_jobs_behind_it() {
    let mut w = World::new();
    w.project("web", None, 1);
    w.cell("eu-1", "eu", &[], &[("default", 2), ("gpu", 1)]);
    let gpu = constraints(None, &[], Some("gpu"));
    let first_gpu = w.jobs("web", 1, &gpu)[0];
    w.place_on(first_gpu, "eu-1");
    // The oldest queued job wants the (full) gpu pool; the two after it fit.
    let blocked = w.jobs("web", 1, &gpu)[0];
    let behind = w.jobs("web", 2, &any_cell());
    let s = w.tick(&live(&["eu-1"]), 10);
    check_tick(&w.state, &live(&["eu-1"]), 10, &s);
    let placed: Vec<JobId> = s.placements.iter().map(|p| p.job).collect();
    assert_eq!(placed, behind);
    assert!(!placed.contains(&blocked));
    assert_eq!(s.waiting.no_capacity, 1);
    assert!(s.waiting.unplaceable.is_empty());
}

#[test]
fn jobs_no_live_active_cell_could_take_are_reported_unplaceable_by_id() {
    let mut w = World::new();
    w.project("web", None, 1);
    w.cell("eu-1", "eu", &[("arch", "amd64")], &[("default", 4)]);
    w.cell("us-1", "us", &[("arch", "arm64")], &[("default", 4)]);
    w.cell(
        "eu-2",
        "eu",
        &[("arch", "arm64")],
        &[("default", 4), ("big", 0)],
    );
    w.state.cells.get_mut(&cid("eu-2")).unwrap().state = CellState::Cordoned;
    let arm_eu = w.jobs(
        "web",
        1,
        &constraints(Some("eu"), &[("arch", "arm64")], None),
    );
    let arm = w.jobs("web", 1, &constraints(None, &[("arch", "arm64")], None));
    let big = w.jobs("web", 1, &constraints(None, &[], Some("big")));
    let mips = w.jobs("web", 1, &constraints(None, &[("arch", "mips")], None));
    let fine = w.jobs("web", 1, &any_cell());

    // us-1 is not live: the arm64 job has nowhere to go either.
    let cells = live(&["eu-1", "eu-2"]);
    let s = w.tick(&cells, 10);
    check_tick(&w.state, &cells, 10, &s);
    let expected = [arm_eu[0], arm[0], big[0], mips[0]];
    assert_eq!(s.waiting.unplaceable, expected);
    assert_eq!(s.placements.len(), 1);
    assert_eq!(s.placements[0].job, fine[0]);
    assert_eq!(s.placements[0].cell, cid("eu-1"));

    // With us-1 live, the arm64 job goes there.
    let cells = live(&["eu-1", "eu-2", "us-1"]);
    let s = w.tick(&cells, 10);
    check_tick(&w.state, &cells, 10, &s);
    assert_eq!(s.waiting.unplaceable, [arm_eu[0], big[0], mips[0]]);
    assert!(
        s.placements
            .iter()
            .any(|p| p.job == arm[0] && p.cell == cid("us-1"))
    );
}

#[test]
fn a_cell_is_never_given_more_than_its_api_budget_in_one_tick() {
    let mut w = World::new();
    w.project("web", None, 1);
    w.cell("eu-1", "eu", &[], &[("default", 50)]);
    w.cell("eu-2", "eu", &[], &[("default", 50)]);
    w.jobs("web", 40, &any_cell());
    let cells = vec![
        LiveCell {
            id: cid("eu-1"),
            budget: Some(3),
        },
        LiveCell {
            id: cid("eu-2"),
            budget: Some(0),
        },
    ];
    let s = w.tick(&cells, 100);
    check_tick(&w.state, &cells, 100, &s);
    assert_eq!(s.placements.len(), 3);
    assert!(s.placements.iter().all(|p| p.cell == cid("eu-1")));
    assert_eq!(s.waiting.no_capacity, 37);
}

#[test]
fn a_job_goes_to_its_project_home_cell_when_that_has_room() {
    let mut w = World::new();
    let names = ["c-1", "c-2", "c-3", "c-4", "c-5"];
    for n in names {
        w.cell(n, "eu", &[], &[("default", 10)]);
    }
    for p in 0..20 {
        let project = format!("p-{p}");
        w.project(&project, None, 1);
        let job = w.jobs(&project, 1, &any_cell())[0];
        let home = home_cell(&pid(&project), w.state.cells.values()).unwrap();
        let s = w.tick(&live(&names), 10);
        assert_eq!(s.placements.len(), 1);
        assert_eq!((s.placements[0].job, &s.placements[0].cell), (job, &home));
        w.commit(s.placements);
    }
}

#[test]
fn without_room_at_home_a_job_goes_to_the_home_region_then_to_the_most_headroom() {
    let mut w = World::new();
    w.project("web", None, 1);
    w.project("other", None, 1);
    for n in ["c-1", "c-2", "c-3", "c-4"] {
        w.cell(n, "eu", &[], &[("default", 4)]);
    }
    // Regions are chosen after the fact so the home's region holds it and one more cell.
    let home = home_cell(&pid("web"), w.state.cells.values()).unwrap();
    let mut others: Vec<CellId> = w
        .state
        .cells
        .keys()
        .filter(|c| **c != home)
        .cloned()
        .collect();
    let sibling = others.remove(2);
    for (c, region) in [(&home, "home"), (&sibling, "home")]
        .into_iter()
        .chain(others.iter().map(|c| (c, "away")))
    {
        w.cell(c.as_str(), region, &[], &[("default", 4)]);
    }
    // The away cell with the larger id runs one job already: less headroom.
    let busy = w.jobs("other", 1, &any_cell())[0];
    w.place_on(busy, others[1].as_str());

    let job = w.jobs("web", 1, &any_cell())[0];
    let all: Vec<LiveCell> = w
        .state
        .cells
        .keys()
        .map(|c| LiveCell {
            id: c.clone(),
            budget: None,
        })
        .collect();
    let without = |budget0: &[&CellId]| -> Vec<LiveCell> {
        all.iter()
            .map(|l| LiveCell {
                id: l.id.clone(),
                budget: budget0.contains(&&l.id).then_some(0),
            })
            .collect()
    };
    let mut to = |cells: Vec<LiveCell>| {
        let s = w.tick(&cells, 10);
        assert_eq!(s.placements[0].job, job);
        s.placements[0].cell.clone()
    };
    assert_eq!(to(without(&[])), home);
    assert_eq!(to(without(&[&home])), sibling);
    // Both away cells are in another region; others[0] is idle, others[1] is not.
    assert_eq!(to(without(&[&home, &sibling])), others[0]);
    assert_eq!(to(without(&[&home, &sibling, &others[0]])), others[1]);
}

#[test]
fn the_cell_a_job_was_taken_from_is_avoided_when_another_fits_and_used_when_none_does() {
    let mut w = World::new();
    w.project("web", None, 1);
    w.cell("c-1", "eu", &[], &[("default", 4)]);
    w.cell("c-2", "eu", &[], &[("default", 4)]);
    let home = home_cell(&pid("web"), w.state.cells.values()).unwrap();
    let other = if home == cid("c-1") { "c-2" } else { "c-1" };
    let job = w.jobs("web", 1, &any_cell())[0];
    w.place_on(job, home.as_str());
    // The home cell is lost: the job is re-queued with `avoid` set; then it comes back.
    let (last_seen_ms, now_ms) = (w.state.cells[&home].last_seen_ms, w.now);
    w.ok(Command::ExpireLeases {
        cell: home.clone(),
        last_seen_ms,
        now_ms,
    });
    w.cell(home.as_str(), "eu", &[], &[("default", 4)]);
    assert_eq!(w.state.jobs[&job].avoid.as_ref(), Some(&home));
    assert_eq!(w.phase(job), JobPhase::Queued);

    let both = live(&["c-1", "c-2"]);
    let s = w.tick(&both, 10);
    assert_eq!(s.placements[0].cell, cid(other), "home, but avoided");
    let s = w.tick(&live(&[home.as_str()]), 10);
    assert_eq!(s.placements[0].cell, home, "the only cell that fits");
    let mut other_full = live(&["c-1", "c-2"]);
    for l in &mut other_full {
        if l.id.as_str() == other {
            l.budget = Some(0);
        }
    }
    let s = w.tick(&other_full, 10);
    assert_eq!(
        s.placements[0].cell, home,
        "the other cell has no budget left"
    );
}

#[test]
fn the_schedule_does_not_depend_on_the_order_of_live_cells() {
    let mut w = World::new();
    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        w.project(t, Some(if i == 2 { "grp" } else { t }), i as u32 + 1);
        w.jobs(t, 30, &any_cell());
    }
    for i in 0..6 {
        w.cell(&format!("c-{i}"), ["x", "y"][i % 2], &[], &[("default", 3)]);
    }
    let mut cells = live(&["c-0", "c-1", "c-2", "c-3", "c-4", "c-5"]);
    let a = w.tick(&cells, 100);
    cells.reverse();
    assert_eq!(w.tick(&cells, 100), a);
    assert_eq!(a.placements.len(), 18);
}

#[test]
fn a_kept_scheduler_moved_to_another_state_decides_as_if_it_remembered_nothing() {
    // Two states whose jobs have the same ids but other constraints, projects and cells.
    let mut a = World::new();
    a.project("web", None, 1);
    a.cell("eu-1", "eu", &[], &[("default", 4)]);
    let first = a.jobs("web", 6, &any_cell());
    let s = a.tick(&live(&["eu-1"]), 10);
    a.commit(s.placements);
    a.start(first[0]);
    a.tick(&live(&["eu-1"]), 10);

    let mut b = World::new();
    b.project("api", None, 1);
    b.cell("eu-1", "eu", &[], &[("default", 100)]);
    b.cell("us-1", "us", &[], &[("default", 8)]);
    let other = b.jobs("api", 6, &constraints(Some("us"), &[], None));
    assert_eq!(other, first, "the same job ids");
    // Were `a`'s memory trusted, these jobs would go home, to eu-1.
    assert_eq!(
        home_cell(&pid("api"), b.state.cells.values()),
        Some(cid("eu-1"))
    );
    b.scheduler = std::mem::take(&mut a.scheduler);
    let cells = live(&["eu-1", "us-1"]);
    let s = b.tick(&cells, 10);
    check_tick(&b.state, &cells, 10, &s);
    assert_eq!(s.placements.len(), 6);
    assert!(s.placements.iter().all(|p| p.cell == cid("us-1")));
}

// ---------------------------------------------------------------------------------------
// Home cells.

fn cell(id: &str, capacity: u32) -> Cell {
    Cell {
        id: cid(id),
        region: "eu".into(),
        labels: BTreeMap::new(),
        pools: BTreeMap::from([("default".to_owned(), capacity)]),
        agent_version: "test".into(),
        state: CellState::Active,
        registered_at_ms: 0,
        last_seen_ms: 0,
        returns_as: None,
    }
}

fn homes(cells: &[Cell], projects: usize) -> Vec<CellId> {
    (0..projects)
        .map(|p| home_cell(&pid(&format!("project-{p}")), cells).unwrap())
        .collect()
}

#[test]
fn adding_a_fifth_cell_moves_about_a_fifth_of_the_projects_and_only_to_the_new_cell() {
    let mut cells: Vec<Cell> = (1..=4).map(|i| cell(&format!("cell-{i}"), 100)).collect();
    let before = homes(&cells, 2_000);
    cells.push(cell("cell-5", 100));
    let after = homes(&cells, 2_000);
    let moved: Vec<usize> = (0..2_000).filter(|i| before[*i] != after[*i]).collect();
    let share = moved.len() as f64 / 2_000.0;
    assert!((0.15..=0.25).contains(&share), "moved {share}");
    assert!(moved.iter().all(|i| after[*i] == cid("cell-5")));
    // And removing it again puts every project back where it was.
    cells.pop();
    assert_eq!(homes(&cells, 2_000), before);
}

#[test]
fn doubling_a_cells_capacity_about_doubles_its_share_of_home_cells() {
    let mut cells: Vec<Cell> = (1..=4).map(|i| cell(&format!("cell-{i}"), 50)).collect();
    let count = |homes: &[CellId]| homes.iter().filter(|c| c.as_str() == "cell-1").count();
    let before = homes(&cells, 2_000);
    cells[0].pools.insert("default".into(), 100);
    let after = homes(&cells, 2_000);
    let (b, a) = (count(&before) as f64, count(&after) as f64);
    // 1/4 of the weight before, 2/5 after; relative to the average other cell, 1× then 2×.
    assert!((b / 2_000.0 - 0.25).abs() < 0.04, "before {b}");
    assert!((a / 2_000.0 - 0.40).abs() < 0.04, "after {a}");
    let others = (2_000.0 - a) / 3.0;
    assert!((1.7..=2.3).contains(&(a / others)), "ratio {}", a / others);
    // Only cell-1 gained projects.
    assert!((0..2_000).all(|i| before[i] == after[i] || after[i] == cid("cell-1")));
}

#[test]
fn lost_cells_and_cells_without_capacity_are_never_home_and_order_does_not_matter() {
    let mut cells: Vec<Cell> = (1..=4).map(|i| cell(&format!("cell-{i}"), 10)).collect();
    cells[1].state = CellState::Lost;
    cells[2].pools.clear();
    cells[3].state = CellState::Draining { deadline_ms: 5 };
    let h = homes(&cells, 500);
    assert!(
        h.iter()
            .all(|c| c.as_str() == "cell-1" || c.as_str() == "cell-4")
    );
    assert!(
        h.iter().any(|c| c.as_str() == "cell-4"),
        "draining cells stay homes"
    );
    cells.reverse();
    assert_eq!(homes(&cells, 500), h);
    assert_eq!(home_cell(&pid("web"), &cells[1..3]), None);
}

// ---------------------------------------------------------------------------------------
// Simulations.

/// A small deterministic generator for simulations (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One tick of a simulation: finishes the jobs whose (random, 3–10 ticks) run time is over,
/// then schedules on the live cells, commits and starts what was placed. Returns the schedule.
fn sim_tick(
    w: &mut World,
    cells: &[LiveCell],
    ends: &mut BTreeMap<JobId, u64>,
    tick: u64,
    rng: &mut Rng,
) -> Schedule {
    let due: Vec<JobId> = ends
        .iter()
        .filter(|(_, t)| **t <= tick)
        .map(|(j, _)| *j)
        .collect();
    for j in due {
        ends.remove(&j);
        let fence = w.fence(j);
        assert!(!matches!(
            w.finish_with(j, fence).response,
            Response::Rejected(_)
        ));
    }
    let s = w.tick(cells, 2_000);
    // Checking is O(queued × cells); every few ticks is plenty in the long runs.
    if tick.is_multiple_of(4) {
        check_tick(&w.state, cells, 2_000, &s);
    }
    w.commit(s.placements.clone());
    for p in &s.placements {
        assert_eq!(w.cell_of(p.job), Some(&p.cell), "apply took the decision");
        w.start(p.job);
        ends.insert(p.job, tick + 3 + rng.below(8));
    }
    s
}

/// Runs a saturated simulation (the first tenant starts with every runner, the others queue
/// a tick later) and returns each tenant's mean share of running jobs over the second half of
/// the run, with its fair share `weight / Σ weights`.
fn saturated_shares(tenants: &[(&str, &[(&str, u32)])], seed: u64) -> Vec<(f64, f64)> {
    let mut w = World::new();
    let weight = |ps: &[(&str, u32)]| ps.iter().map(|(_, w)| *w).max().unwrap();
    let total: u32 = tenants.iter().map(|(_, ps)| weight(ps)).sum();
    // Capacity a multiple of the weights, so the fair split is whole runners.
    let names = ["c-1", "c-2", "c-3", "c-4"];
    for n in names {
        w.cell(n, "eu", &[], &[("default", 2 * total)]);
    }
    let capacity = 8 * total as usize;
    for (t, projects) in tenants {
        for (p, weight) in *projects {
            let group = (projects.len() > 1).then_some(*t);
            w.project(p, group, *weight);
        }
    }
    let ticks = 160u64;
    // More work than each tenant can run: jobs last 3–10 ticks, so a tenant's fair share of
    // runners finishes at most share × capacity / 3 jobs a tick; /4 with a margin of two
    // full fleets is plenty at the mean of 6.5.
    let queue = |w: &mut World, i: usize| {
        let (_, projects) = tenants[i];
        let need = weight(projects) as usize * capacity * ticks as usize / (total as usize * 4)
            + 2 * capacity;
        for (p, _) in projects {
            w.jobs(p, need.div_ceil(projects.len()), &any_cell());
        }
    };
    let cells = live(&names);
    let mut rng = Rng(seed);
    let mut ends = BTreeMap::new();
    queue(&mut w, 0);
    sim_tick(&mut w, &cells, &mut ends, 0, &mut rng);
    for i in 1..tenants.len() {
        queue(&mut w, i);
    }
    let mut sums = vec![0usize; tenants.len()];
    for tick in 1..ticks {
        sim_tick(&mut w, &cells, &mut ends, tick, &mut rng);
        if tick >= ticks / 2 {
            let running = w.running_by_tenant();
            assert_eq!(running.values().sum::<usize>(), capacity, "saturated");
            for (i, (t, projects)) in tenants.iter().enumerate() {
                let key = if projects.len() > 1 {
                    (*t).to_owned()
                } else {
                    projects[0].0.to_owned()
                };
                sums[i] += running.get(&key).copied().unwrap_or(0);
            }
        }
    }
    let samples = (ticks - ticks / 2) as f64;
    tenants
        .iter()
        .zip(sums)
        .map(|((_, ps), sum)| {
            (
                sum as f64 / samples / capacity as f64,
                f64::from(weight(ps)) / f64::from(total),
            )
        })
        .collect()
}

#[test]
fn under_saturation_each_tenant_gets_its_weighted_share_of_running_jobs() {
    // A group's weight is its largest project's (3), not the sum.
    let tenants: &[(&str, &[(&str, u32)])] = &[
        ("t-one", &[("t-one", 1)]),
        ("t-two", &[("t-two", 2)]),
        ("grp", &[("g-small", 1), ("g-big", 3)]),
    ];
    for (share, want) in saturated_shares(tenants, 7) {
        assert!(
            (share - want).abs() <= 0.05 * want,
            "share {share:.3}, want {want:.3}"
        );
    }
}

#[test]
fn a_job_is_never_held_by_two_cells_under_its_live_fence_while_cells_come_and_go() {
    let mut w = World::new();
    w.project("web", None, 2);
    w.project("api", None, 1);
    let names = ["c-1", "c-2", "c-3"];
    for n in names {
        w.cell(n, "eu", &[], &[("default", 6)]);
    }
    let mut jobs = w.jobs("web", 150, &any_cell());
    jobs.extend(w.jobs("api", 150, &any_cell()));
    let mut rng = Rng(11);
    // What each cell believes it holds (from the assignments it was sent), and when each
    // believed job finishes there.
    let mut held: BTreeMap<CellId, BTreeMap<JobId, (Fence, u64)>> = BTreeMap::new();
    // A cell that is down: (back at tick, leases expired yet).
    let mut down: BTreeMap<CellId, u64> = BTreeMap::new();
    let mut stale_rejected = 0;
    for tick in 0..400u64 {
        // Sometimes a cell goes down (its agent stops; its runners keep going).
        if rng.below(20) == 0 {
            let c = cid(names[rng.below(3) as usize]);
            down.entry(c).or_insert(tick + 8);
        }
        // Three ticks after going down, its leases expire; at `back` it registers again and
        // reports what its runners did, under the fences it holds.
        for (c, back) in down.clone() {
            if back == tick + 5 && w.state.cells[&c].state != CellState::Lost {
                let (last_seen_ms, now_ms) = (w.state.cells[&c].last_seen_ms, w.now);
                w.ok(Command::ExpireLeases {
                    cell: c.clone(),
                    last_seen_ms,
                    now_ms,
                });
            }
            if back == tick {
                down.remove(&c);
                w.cell(c.as_str(), "eu", &[], &[("default", 6)]);
                for (job, (fence, _)) in held.remove(&c).unwrap_or_default() {
                    let a = w.finish_with(job, fence);
                    if w.fence(job) != fence {
                        assert!(matches!(
                            a.response,
                            Response::Rejected(Rejection::StaleFence { .. })
                        ));
                        stale_rejected += 1;
                    }
                }
            }
        }
        let cells: Vec<LiveCell> = names
            .iter()
            .filter(|n| !down.contains_key(&cid(n)))
            .map(|n| LiveCell {
                id: cid(n),
                budget: Some(4),
            })
            .collect();
        let s = w.tick(&cells, 2_000);
        check_tick(&w.state, &cells, 2_000, &s);
        let applied = w.commit(s.placements);
        for e in applied.events {
            if let Event::JobAssigned { job, cell, fence } = e {
                held.entry(cell)
                    .or_default()
                    .insert(job, (fence, tick + 2 + rng.below(6)));
            }
        }
        // Live cells run and finish their jobs under the fences they were given.
        for (c, jobs) in held.iter_mut() {
            if down.contains_key(c) {
                continue;
            }
            let done: Vec<(JobId, Fence)> = jobs
                .iter()
                .filter(|(_, (_, end))| *end <= tick)
                .map(|(j, (f, _))| (*j, *f))
                .collect();
            for (job, fence) in done {
                jobs.remove(&job);
                if w.phase(job) == JobPhase::Leased {
                    let now_ms = w.now;
                    w.apply(Command::JobStarted {
                        job,
                        fence,
                        runner: RunnerTimes::default(),
                        now_ms,
                    });
                }
                w.finish_with(job, fence);
            }
        }
        // The invariant: under a job's current fence, at most one cell holds it, and it is
        // the cell the state says.
        for (job, j) in &w.state.jobs {
            if !matches!(j.phase(), JobPhase::Leased | JobPhase::Running) {
                continue;
            }
            let fence = j.run.fence().unwrap();
            let holders: Vec<&CellId> = held
                .iter()
                .filter(|(_, js)| js.get(job).is_some_and(|(f, _)| *f == fence))
                .map(|(c, _)| c)
                .collect();
            assert!(holders.len() <= 1, "job {job} held by {holders:?}");
            assert!(holders.iter().all(|c| Some(*c) == j.run.cell()));
        }
    }
    assert!(stale_rejected > 0, "the simulation re-placed some jobs");
    assert!(
        jobs.iter().all(|j| w.phase(*j).is_terminal()),
        "every job ended"
    );
}

#[test]
fn every_queued_job_is_eventually_placed_including_a_rare_label_and_a_light_tenant() {
    let mut w = World::new();
    w.project("heavy-a", None, 5);
    w.project("heavy-b", None, 5);
    w.project("light", None, 1);
    w.cell("c-1", "eu", &[], &[("default", 10)]);
    w.cell("c-2", "eu", &[], &[("default", 10)]);
    w.cell("c-rare", "us", &[("disk", "nvme")], &[("default", 2)]);
    let names = ["c-1", "c-2", "c-rare"];
    let rare = constraints(None, &[("disk", "nvme")], None);
    let mut heavy_a = w.jobs("heavy-a", 100, &any_cell());
    let heavy_rare = w.jobs("heavy-a", 1, &rare)[0];
    let heavy_b = w.jobs("heavy-b", 800, &any_cell());
    heavy_a.extend(w.jobs("heavy-a", 300, &any_cell()));
    let mut light = w.jobs("light", 3, &any_cell());
    light.extend(w.jobs("light", 1, &rare));

    let cells = live(&names);
    let mut rng = Rng(3);
    let mut ends = BTreeMap::new();
    let mut placed_at: BTreeMap<JobId, u64> = BTreeMap::new();
    let mut tick = 0;
    while w.state.queued_jobs().next().is_some() || !ends.is_empty() {
        assert!(tick < 2_000, "work was left behind");
        let s = sim_tick(&mut w, &cells, &mut ends, tick, &mut rng);
        for p in s.placements {
            placed_at.insert(p.job, tick);
        }
        tick += 1;
    }
    let all: Vec<JobId> = heavy_a
        .iter()
        .chain(&heavy_b)
        .chain(&light)
        .chain([&heavy_rare])
        .copied()
        .collect();
    assert!(all.iter().all(|j| w.phase(*j) == JobPhase::Succeeded));
    // The light tenant gets its share (1 in 11 runners) from the start, not after the
    // heavies' backlog of 1,200 jobs.
    let last = all.iter().map(|j| placed_at[j]).max().unwrap();
    for j in &light {
        assert!(
            placed_at[j] <= 25,
            "light job {j} waited {} ticks",
            placed_at[j]
        );
    }
    // The rare-label job of a heavy tenant is not overtaken by its tenant's whole backlog.
    let last_a = heavy_a.iter().map(|j| placed_at[j]).max().unwrap();
    assert!(
        placed_at[&heavy_rare] < last_a,
        "the rare-label job waited {} ticks; heavy-a's last job went at {last_a}, the run took {last}",
        placed_at[&heavy_rare]
    );
}

// ---------------------------------------------------------------------------------------
// Properties.

#[derive(Debug, Clone)]
struct CellGen {
    region: usize,
    arm: bool,
    default: u32,
    gpu: Option<u32>,
    /// 0–3 Active, 4 Cordoned, 5 Draining, 6 Lost.
    state: u8,
    live: bool,
    budget: Option<u32>,
}

#[derive(Debug, Clone)]
struct JobGen {
    project: usize,
    region: Option<usize>,
    arm: Option<bool>,
    /// 0 none, 1 `default`, 2 `gpu`, 3 `huge` (no cell has it).
    pool: u8,
    boost: u32,
}

fn cell_gen() -> impl Strategy<Value = CellGen> {
    (
        0..2usize,
        any::<bool>(),
        0..5u32,
        proptest::option::of(0..3u32),
        0..7u8,
        prop::bool::weighted(0.8),
        proptest::option::of(0..4u32),
    )
        .prop_map(|(region, arm, default, gpu, state, live, budget)| CellGen {
            region,
            arm,
            default,
            gpu,
            state,
            live,
            budget,
        })
}

fn job_gen() -> impl Strategy<Value = JobGen> {
    (
        0..4usize,
        proptest::option::weighted(0.2, 0..2usize),
        proptest::option::weighted(0.2, any::<bool>()),
        prop::sample::select(vec![0u8, 0, 0, 1, 2, 3]),
        prop::sample::select(vec![0u32, 0, 0, 1]),
    )
        .prop_map(|(project, region, arm, pool, boost)| JobGen {
            project,
            region,
            arm,
            pool,
            boost,
        })
}

const REGIONS: [&str; 2] = ["eu", "us"];
/// Project ids and their tenant groups: p-1 and p-2 share one.
const PROJECTS: [(&str, Option<&str>); 4] = [
    ("p-0", None),
    ("p-1", Some("grp")),
    ("p-2", Some("grp")),
    ("p-3", None),
];

/// Builds a world from generated cells and jobs: some jobs already placed and running (a
/// first tick with every cell live), then cells put in their generated states (a lost cell
/// re-queues its jobs with `avoid` set).
fn generated_world(
    cells: &[CellGen],
    jobs: &[JobGen],
    weights: &[u32],
    pre: usize,
) -> (World, Vec<LiveCell>) {
    let mut w = World::new();
    for ((p, group), weight) in PROJECTS.iter().zip(weights) {
        w.project(p, *group, *weight);
    }
    let names: Vec<String> = (0..cells.len()).map(|i| format!("c-{i}")).collect();
    for (c, name) in cells.iter().zip(&names) {
        let mut pools = vec![("default", c.default)];
        if let Some(n) = c.gpu {
            pools.push(("gpu", n));
        }
        let arch = if c.arm { "arm64" } else { "amd64" };
        w.cell(name, REGIONS[c.region], &[("arch", arch)], &pools);
    }
    let mut ids = Vec::new();
    for j in jobs {
        let arch = j.arm.map(|a| if a { "arm64" } else { "amd64" });
        let labels: Vec<(&str, &str)> = arch.into_iter().map(|a| ("arch", a)).collect();
        let pool = [None, Some("default"), Some("gpu"), Some("huge")][j.pool as usize];
        let c = constraints(j.region.map(|r| REGIONS[r]), &labels, pool);
        let id = w.jobs(PROJECTS[j.project].0, 1, &c)[0];
        w.state.jobs.get_mut(&id).unwrap().boost = j.boost;
        ids.push(id);
    }
    let everyone: Vec<LiveCell> = names
        .iter()
        .map(|n| LiveCell {
            id: cid(n),
            budget: None,
        })
        .collect();
    let first = w.tick(&everyone, pre);
    w.commit(first.placements.clone());
    for p in first.placements.iter().step_by(2) {
        w.start(p.job);
    }
    let mut live = Vec::new();
    for (c, name) in cells.iter().zip(&names) {
        let id = cid(name);
        match c.state {
            4 => w.state.cells.get_mut(&id).unwrap().state = CellState::Cordoned,
            5 => w.state.cells.get_mut(&id).unwrap().state = CellState::Draining { deadline_ms: 1 },
            6 => {
                let (last_seen_ms, now_ms) = (w.state.cells[&id].last_seen_ms, w.now);
                w.ok(Command::ExpireLeases {
                    cell: id.clone(),
                    last_seen_ms,
                    now_ms,
                });
            }
            _ => {}
        }
        if c.live {
            live.push(LiveCell {
                id,
                budget: c.budget,
            });
        }
    }
    (w, live)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn one_tick_respects_room_budgets_cell_states_constraints_and_accounts_for_every_job(
        cells in prop::collection::vec(cell_gen(), 0..6),
        jobs in prop::collection::vec(job_gen(), 0..40),
        weights in prop::collection::vec(1..4u32, 4),
        pre in 0..15usize,
        limit in 0..30usize,
    ) {
        let (mut w, live) = generated_world(&cells, &jobs, &weights, pre);
        let s = w.tick(&live, limit);
        check_tick(&w.state, &live, limit, &s);
        // Same snapshot, same decisions.
        prop_assert_eq!(&w.tick(&live, limit), &s);
        // `apply` takes every decision: each placed job is now leased there under the entry's
        // fence, and no job is out on two cells.
        let n = s.placements.len();
        let applied = w.commit(s.placements.clone());
        let assigned = applied
            .events
            .iter()
            .filter(|e| matches!(e, Event::JobAssigned { .. }))
            .count();
        prop_assert_eq!(assigned, n);
        for p in &s.placements {
            prop_assert_eq!(w.cell_of(p.job), Some(&p.cell));
            prop_assert_eq!(w.fence(p.job), Fence(w.index));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_job_some_cell_can_take_is_placed_eventually_whatever_the_mix(
        cells in prop::collection::vec(cell_gen(), 1..5),
        jobs in prop::collection::vec(job_gen(), 1..60),
        weights in prop::collection::vec(1..6u32, 4),
        seed in any::<u64>(),
    ) {
        let (mut w, live) = generated_world(&cells, &jobs, &weights, 0);
        // Jobs no usable cell can take wait for ever by design; the rest must all run.
        let usable: Vec<&Cell> = live
            .iter()
            .filter(|l| l.budget != Some(0))
            .map(|l| &w.state.cells[&l.id])
            .filter(|c| c.state == CellState::Active)
            .collect();
        let runnable: Vec<JobId> = w
            .state
            .queued_jobs()
            .filter(|j| usable.iter().any(|c| meets(c, &j.spec.placement)))
            .map(|j| j.id)
            .collect();
        let mut rng = Rng(seed);
        let mut ends = BTreeMap::new();
        let mut tick = 0;
        while runnable.iter().any(|j| w.phase(*j) == JobPhase::Queued) {
            // At worst one runner for all 60 jobs of up to 10 ticks each.
            prop_assert!(tick < 700, "a runnable job starved");
            sim_tick(&mut w, &live, &mut ends, tick, &mut rng);
            tick += 1;
        }
    }
}

proptest! {
    // Each case simulates 160 ticks over thousands of jobs.
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn under_saturation_shares_converge_to_the_weights_for_any_three_to_five_tenants(
        weights in prop::collection::vec(1..4u32, 3..=5),
        seed in any::<u64>(),
    ) {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("t-{i}")).collect();
        let projects: Vec<[(&str, u32); 1]> = names
            .iter()
            .zip(&weights)
            .map(|(n, w)| [(n.as_str(), *w)])
            .collect();
        let tenants: Vec<(&str, &[(&str, u32)])> = names
            .iter()
            .zip(&projects)
            .map(|(n, p)| (n.as_str(), &p[..]))
            .collect();
        for (share, want) in saturated_shares(&tenants, seed) {
            prop_assert!(
                (share - want).abs() <= 0.05 * want,
                "share {:.3}, want {:.3} (weights {:?})", share, want, weights
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The kept scheduler follows the state through any history.

/// One step of a generated history. Indices pick among what exists at that point (modulo).
#[derive(Debug, Clone)]
enum Step {
    /// A push of `jobs` jobs with one kind of constraint (0 none, 1 region, 2 label, 3 pool),
    /// each needing the one before when `chain`.
    Push {
        project: usize,
        jobs: usize,
        kind: u8,
        chain: bool,
    },
    /// A tick with some cells live, its decisions committed or (as when a proposal fails)
    /// dropped.
    Tick {
        live: u8,
        limit: usize,
        commit: bool,
    },
    Start(usize),
    /// 0 success, 1 test failure, 2 infra failure, 3 timeout.
    Finish(usize, u8),
    Cancel(usize),
    Retry(usize),
    Expire(usize),
    Register(usize),
    Cordon(usize),
    Uncordon(usize),
    Drain(usize),
    FinishDrain(usize),
    /// A project moves to tenant group 0, 1 or none (2), with a new weight.
    Regroup(usize, u8, u32),
    Delete(usize),
    Create(usize),
    /// A queued job's boost changed in place, outside `apply`.
    Boost(usize),
    /// The state is replaced by a copy, as a replica's is by a snapshot.
    Copy,
    /// The state goes through its serialized form.
    Reload,
}

fn step_gen() -> impl Strategy<Value = Step> {
    let i = || 0..64usize;
    prop_oneof![
        4 => (0..4usize, 1..6usize, 0..4u8, any::<bool>())
            .prop_map(|(project, jobs, kind, chain)| Step::Push { project, jobs, kind, chain }),
        4 => (any::<u8>(), 1..12usize, prop::bool::weighted(0.8))
            .prop_map(|(live, limit, commit)| Step::Tick { live, limit, commit }),
        3 => i().prop_map(Step::Start),
        3 => (i(), 0..4u8).prop_map(|(j, o)| Step::Finish(j, o)),
        1 => i().prop_map(Step::Cancel),
        1 => i().prop_map(Step::Retry),
        1 => i().prop_map(Step::Expire),
        1 => i().prop_map(Step::Register),
        1 => i().prop_map(Step::Cordon),
        1 => i().prop_map(Step::Uncordon),
        1 => i().prop_map(Step::Drain),
        1 => i().prop_map(Step::FinishDrain),
        1 => (i(), 0..3u8, 1..4u32).prop_map(|(p, g, w)| Step::Regroup(p, g, w)),
        1 => i().prop_map(Step::Delete),
        1 => i().prop_map(Step::Create),
        1 => i().prop_map(Step::Boost),
        1 => Just(Step::Copy),
        1 => Just(Step::Reload),
    ]
}

/// A cell of the histories: id, region, `arch` label, pools.
type HistoryCell = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, u32)],
);

const HISTORY_CELLS: [HistoryCell; 3] = [
    ("c-0", "eu", "amd64", &[("default", 3)]),
    ("c-1", "us", "arm64", &[("default", 2), ("gpu", 1)]),
    ("c-2", "eu", "arm64", &[("default", 2)]),
];

impl World {
    fn history_cell(&mut self, i: usize) {
        let (id, region, arch, pools) = HISTORY_CELLS[i % HISTORY_CELLS.len()];
        self.cell(id, region, &[("arch", arch)], pools);
    }

    fn pick(&self, i: usize, phases: &[JobPhase]) -> Option<JobId> {
        let ids: Vec<JobId> = self
            .state
            .jobs
            .values()
            .filter(|j| phases.contains(&j.phase()))
            .map(|j| j.id)
            .collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }

    fn pick_build(&self, i: usize) -> Option<flotilla_core::BuildId> {
        let ids: Vec<_> = self.state.builds.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }

    /// Plays one step; refusals are part of the history.
    fn play(&mut self, step: &Step) {
        let cell = |i: usize| cid(HISTORY_CELLS[i % HISTORY_CELLS.len()].0);
        let now_ms = self.now;
        match step {
            Step::Push {
                project,
                jobs,
                kind,
                chain,
            } => {
                let c = match kind {
                    0 => any_cell(),
                    1 => constraints(Some("eu"), &[], None),
                    2 => constraints(None, &[("arch", "arm64")], None),
                    _ => constraints(None, &[], Some("gpu")),
                };
                let project = PROJECTS[project % PROJECTS.len()].0;
                let mut specs = self.specs(*jobs, |_| c.clone());
                if *chain {
                    for (i, spec) in specs.iter_mut().enumerate().skip(1) {
                        spec.needs = vec![format!("j{}", i - 1)];
                    }
                }
                self.push(project, specs);
            }
            Step::Tick {
                live: mask,
                limit,
                commit,
            } => {
                let ids: Vec<&str> = HISTORY_CELLS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, c)| c.0)
                    .collect();
                let s = self.tick(&live(&ids), *limit);
                if *commit && !s.placements.is_empty() {
                    self.commit(s.placements);
                }
            }
            Step::Start(i) => {
                if let Some(job) = self.pick(*i, &[JobPhase::Leased]) {
                    self.start(job);
                }
            }
            Step::Finish(i, o) => {
                if let Some(job) = self.pick(*i, &[JobPhase::Leased, JobPhase::Running]) {
                    let outcome = match o {
                        0 => Outcome::Succeeded,
                        1 => Outcome::Failed(FailureClass::Test { exit_code: 1 }),
                        2 => Outcome::Failed(FailureClass::Infra {
                            reason: InfraReason::RunnerCrash,
                        }),
                        _ => Outcome::Failed(FailureClass::Timeout),
                    };
                    let fence = self.fence(job);
                    self.apply(Command::JobFinished {
                        job,
                        fence,
                        outcome,
                        now_ms,
                    });
                }
            }
            Step::Cancel(i) => {
                if let Some(build) = self.pick_build(*i) {
                    self.apply(Command::CancelBuild { build, now_ms });
                }
            }
            Step::Retry(i) => {
                if let Some(build) = self.pick_build(*i) {
                    self.apply(Command::RetryBuild { build, now_ms });
                }
            }
            Step::Expire(i) => {
                let cell = cell(*i);
                if let Some(c) = self.state.cells.get(&cell) {
                    let last_seen_ms = c.last_seen_ms;
                    self.apply(Command::ExpireLeases {
                        cell,
                        last_seen_ms,
                        now_ms,
                    });
                }
            }
            Step::Register(i) => self.history_cell(*i),
            Step::Cordon(i) | Step::Uncordon(i) | Step::Drain(i) => {
                let change = match step {
                    Step::Cordon(_) => CellChange::Cordon,
                    Step::Uncordon(_) => CellChange::Uncordon,
                    _ => CellChange::Drain {
                        deadline_ms: now_ms + 5,
                    },
                };
                self.apply(Command::SetCellState {
                    cell: cell(*i),
                    change,
                    now_ms,
                });
            }
            Step::FinishDrain(i) => {
                self.now += 10;
                let now_ms = self.now;
                self.apply(Command::FinishDrain {
                    cell: cell(*i),
                    now_ms,
                });
            }
            Step::Regroup(p, g, weight) => {
                let tenant = match g {
                    0 => Some("grp".to_owned()),
                    1 => Some("other".to_owned()),
                    _ => None,
                };
                self.apply(Command::UpdateProject {
                    id: pid(PROJECTS[p % PROJECTS.len()].0),
                    patch: ProjectPatch {
                        tenant: Some(tenant),
                        weight: Some(*weight),
                        ..ProjectPatch::default()
                    },
                    now_ms,
                });
            }
            Step::Delete(p) => {
                self.apply(Command::DeleteProject {
                    id: pid(PROJECTS[p % PROJECTS.len()].0),
                    now_ms,
                });
            }
            Step::Create(p) => {
                let (id, tenant) = PROJECTS[p % PROJECTS.len()];
                if !self.state.projects.contains_key(&pid(id)) {
                    self.project(id, tenant, 1);
                }
            }
            Step::Boost(i) => {
                if let Some(job) = self.pick(*i, &[JobPhase::Queued]) {
                    self.state.jobs.get_mut(&job).unwrap().boost += 1;
                }
            }
            Step::Copy => self.state = self.state.clone(),
            Step::Reload => {
                let json = serde_json::to_string(&self.state).unwrap();
                self.state = serde_json::from_str(&json).unwrap();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The kept scheduler reads only the jobs the change log names; whatever happened in
    /// between — placements committed or dropped, starts, failures and retries, cancels,
    /// lost and drained cells, projects regrouped, deleted and recreated, jobs changed
    /// outside `apply`, the state copied or reloaded — it decides exactly as the one-off
    /// schedule that reads the whole state (`World::tick` compares the two).
    #[test]
    fn a_kept_scheduler_decides_as_a_fresh_one_after_any_history(
        steps in prop::collection::vec(step_gen(), 1..80)
    ) {
        let mut w = World::new();
        for (id, tenant) in PROJECTS {
            w.project(id, tenant, 1);
        }
        for i in 0..HISTORY_CELLS.len() {
            w.history_cell(i);
        }
        let all = live(&["c-0", "c-1", "c-2"]);
        for step in &steps {
            w.play(step);
            w.tick(&all, 64);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The book starting over, and ids reused outside `apply`.

fn two_projects_with_different_homes(w: &World) -> ((String, CellId), (String, CellId)) {
    let mut ps: Vec<(String, CellId)> = Vec::new();
    for i in 0.. {
        let p = format!("p-{i}");
        let h = home_cell(&pid(&p), w.state.cells.values()).unwrap();
        if ps.iter().all(|(_, hh)| *hh != h) {
            ps.push((p, h));
        }
        if ps.len() == 2 {
            break;
        }
    }
    (ps[0].clone(), ps[1].clone())
}

impl World {
    /// One build per 50 jobs, each job with a unique label constraint; returns the builds.
    fn unique_class_builds(&mut self, project: &str, n: usize) -> Vec<flotilla_core::BuildId> {
        let mut builds = Vec::new();
        let mut k = 0;
        while k < n {
            let size = (n - k).min(BUILD_SIZE);
            let specs = self.specs(size, |i| {
                constraints(None, &[("uniq", format!("v{}", k + i).as_str())], None)
            });
            builds.push(self.push(project, specs).expect("the push is accepted"));
            k += size;
        }
        builds
    }
}

#[test]
fn a_kept_scheduler_that_starts_its_book_over_forgets_the_home_cells_it_knew() {
    let mut w = World::new();
    let names = ["c-1", "c-2", "c-3", "c-4"];
    for n in names {
        w.cell(n, "eu", &[], &[("default", 10)]);
    }
    let ((a, home_a), (b, home_b)) = two_projects_with_different_homes(&w);
    w.project(&a, None, 1);
    w.project(&b, None, 1);
    let cells = live(&names);
    // a is interned as project 0 and its home cached at index 0.
    let ja = w.jobs(&a, 1, &any_cell())[0];
    let s = w.tick(&cells, 10);
    assert_eq!(s.placements[0].cell, home_a);
    w.commit(s.placements);
    let f = w.fence(ja);
    w.start(ja);
    w.finish_with(ja, f);
    // Over 1,024 constraint classes come and go.
    let builds = w.unique_class_builds(&a, 1_100);
    let s = w.tick(&cells, 10);
    assert_eq!(s.waiting.unplaceable.len(), 1_100);
    for build in builds {
        let now_ms = w.now;
        w.ok(Command::CancelBuild { build, now_ms });
    }
    w.tick(&cells, 10);
    // The book now starts over; b is interned first, as project 0.
    let jb = w.jobs(&b, 1, &any_cell())[0];
    let fresh = schedule(&Snapshot {
        state: &w.state,
        live: &cells,
        now_ms: w.now,
        lease_ttl_ms: TTL,
        limit: 10,
    });
    assert_eq!(fresh.placements[0].job, jb);
    assert_eq!(fresh.placements[0].cell, home_b, "fresh goes to b's home");
    let kept = w.scheduler.schedule(&Snapshot {
        state: &w.state,
        live: &cells,
        now_ms: w.now,
        lease_ttl_ms: TTL,
        limit: 10,
    });
    assert_eq!(
        kept.placements[0].cell, home_b,
        "kept scheduler used a's cached home: {:?}",
        kept.placements
    );
}

#[test]
fn a_job_id_put_back_as_another_projects_job_is_read_afresh() {
    let mut w = World::new();
    w.cell("c-1", "eu", &[], &[("default", 2)]);
    w.project("a", None, 1);
    w.project("b", None, 1);
    let cells = live(&["c-1"]);
    // a runs one job; b and a each have one queued.
    let run = w.jobs("a", 1, &any_cell())[0];
    w.place_on(run, "c-1");
    let qa = w.jobs("a", 1, &any_cell())[0];
    let qb = w.jobs("b", 1, &any_cell())[0];
    let _ = (qa, qb);
    w.tick(&cells, 10);
    // Job `run` finishes; `qb` is swapped for an identical job of project "a" under the same id.
    let mut job = w.state.jobs.remove(&qb).unwrap();
    job.project = pid("a");
    w.state.jobs.insert(qb, job);
    w.tick(&cells, 10); // asserts kept == fresh
}
