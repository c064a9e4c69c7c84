//! Benchmark of the scheduler (`flotilla_core::placement::schedule`, ARCHITECTURE §7).
//!
//! ```text
//! cargo run --release -p flotilla-core --example bench_placement            # full size
//! cargo run -p flotilla-core --example bench_placement -- --quick          # smoke check
//! ```
//!
//! (`FLOTILLA_BENCH_QUICK=1` works like `--quick`.) The full run builds, through the same
//! commands the federator commits, 100 cells in 5 regions (labels `arch` and `disk`, pools
//! `default`, `large`, `gpu`), 600 projects in 500 fair-share tenants, 50,000 queued jobs
//! (one monorepo with 5,000, a long tail; a quarter with region, label or pool constraints)
//! and 5,000 running jobs. Then it runs 200 scheduler ticks: each is timed, its decisions are
//! committed and started, and about as many running jobs finish and new builds arrive, so the
//! state stays at that size. Cells have API budgets (some none), a few are cordoned, draining
//! or not connected, and a tick places at most 2,000 jobs. Finally it times placing a burst of
//! 5,000 jobs of one project on an idle fleet (a kept scheduler's first tick included). The
//! target is a p99 tick of at most 5 ms.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_core::forge::{ForgeEvent, Provider};
use flotilla_core::job::{JobPhase, Outcome};
use flotilla_core::pipeline::{self, JobSpec, Placement as Constraints};
use flotilla_core::placement::{LiveCell, Schedule, Scheduler, Snapshot, schedule};
use flotilla_core::state::{
    CellSpec, CellState, Command, ProjectSpec, Resolution, Response, RunnerTimes, State,
};
use flotilla_core::{CellId, JobId, PoolName, ProjectId};

const TARGET_P99: Duration = Duration::from_millis(5);
const LIMIT: usize = 2_000;
const TTL_MS: u64 = 30_000;
const BUILD_SIZE: usize = 50;
const REGIONS: [&str; 5] = ["eu-west", "eu-central", "us-east", "us-west", "ap-south"];
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// The sizes of a run.
struct Size {
    cells: usize,
    tenants: usize,
    queued: usize,
    running: usize,
    monorepo: usize,
    burst: usize,
    ticks: usize,
}

impl Size {
    fn full() -> Self {
        Size {
            cells: 100,
            tenants: 500,
            queued: 50_000,
            running: 5_000,
            monorepo: 5_000,
            burst: 5_000,
            ticks: 200,
        }
    }

    fn quick() -> Self {
        Size {
            cells: 10,
            tenants: 50,
            queued: 5_000,
            running: 500,
            monorepo: 500,
            burst: 500,
            ticks: 20,
        }
    }
}

/// SplitMix64: a small seeded generator, so every run builds the same world.
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

    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(u64::from(hi - lo + 1)) as u32
    }
}

/// The replicated state, driven by commands as the federator would commit them.
struct World {
    state: State,
    index: u64,
    now: u64,
    template: JobSpec,
}

impl World {
    fn new() -> Self {
        let yaml = "version: 1\ndefaults: { image: 'debian:12' }\njobs:\n  t: { run: 'true' }\n";
        let template = pipeline::parse(".ci.yaml", yaml)
            .expect("the template pipeline is valid")
            .jobs
            .remove(0);
        World {
            state: State::default(),
            index: 0,
            now: 1_700_000_000_000,
            template,
        }
    }

    fn apply(&mut self, c: Command) -> Response {
        self.index += 1;
        self.now += 1;
        self.state.apply(self.index, c).response
    }

    fn ok(&mut self, c: Command) -> Response {
        let r = self.apply(c);
        assert!(!matches!(r, Response::Rejected(_)), "refused: {r:?}");
        r
    }

    /// Queues `n` jobs of `project`, each with constraints drawn by `constraints`.
    fn jobs(
        &mut self,
        project: &ProjectId,
        n: usize,
        constraints: &mut impl FnMut() -> Constraints,
    ) {
        let mut left = n;
        while left > 0 {
            let size = left.min(BUILD_SIZE);
            left -= size;
            let now_ms = self.now;
            let Response::Ingested { build, .. } = self.ok(Command::IngestEvent {
                project: project.clone(),
                delivery: None,
                event: ForgeEvent::Push {
                    branch: "main".into(),
                    sha: SHA.into(),
                    changed_paths: None,
                    actor: "bench".into(),
                },
                now_ms,
            }) else {
                unreachable!("an ingest answers Ingested")
            };
            let jobs = (0..size)
                .map(|i| {
                    let mut j = self.template.clone();
                    j.name = format!("j{i}");
                    j.key = j.name.clone();
                    j.placement = constraints();
                    j
                })
                .collect();
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
        }
    }

    fn snapshot<'a>(&'a self, live: &'a [LiveCell], limit: usize) -> Snapshot<'a> {
        Snapshot {
            state: &self.state,
            live,
            now_ms: self.now,
            lease_ttl_ms: TTL_MS,
            limit,
        }
    }

    /// One timed tick, by `scheduler` or, without one, by the one-off `schedule`.
    fn tick(
        &self,
        live: &[LiveCell],
        limit: usize,
        scheduler: Option<&mut Scheduler>,
    ) -> (Schedule, Duration) {
        let snapshot = self.snapshot(live, limit);
        let start = now();
        let s = match scheduler {
            Some(sch) => sch.schedule(&snapshot),
            None => schedule(&snapshot),
        };
        (s, start.elapsed())
    }

    /// Commits a schedule and starts every job it placed.
    fn commit_and_start(&mut self, s: Schedule) {
        let jobs: Vec<JobId> = s.placements.iter().map(|p| p.job).collect();
        let now_ms = self.now;
        self.ok(Command::PlaceJobs {
            placements: s.placements,
            now_ms,
        });
        for job in jobs {
            let fence = self.state.jobs[&job].run.fence().expect("just placed");
            let now_ms = self.now;
            self.ok(Command::JobStarted {
                job,
                fence,
                runner: RunnerTimes::default(),
                now_ms,
            });
        }
    }

    fn finish(&mut self, job: JobId) {
        let fence = self.state.jobs[&job].run.fence().expect("running");
        let now_ms = self.now;
        self.ok(Command::JobFinished {
            job,
            fence,
            outcome: Outcome::Succeeded,
            now_ms,
        });
    }

    /// Drops finished builds and their jobs, as the history projector's pruning would.
    fn prune(&mut self) {
        let done: Vec<_> = self
            .state
            .builds
            .values()
            .filter(|b| b.status.is_terminal())
            .map(|b| b.id)
            .collect();
        for b in done {
            if let Some(build) = self.state.builds.remove(&b) {
                for j in &build.jobs {
                    self.state.jobs.remove(j);
                }
            }
        }
    }

    fn count(&self, phase: &[JobPhase]) -> usize {
        self.state
            .jobs
            .values()
            .filter(|j| phase.contains(&j.phase()))
            .count()
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "a benchmark measures wall-clock time"
)]
fn now() -> Instant {
    Instant::now()
}

fn cell_name(i: usize) -> String {
    format!("{}-{i:03}", REGIONS[i % REGIONS.len()])
}

/// Registers the fleet; returns the live cells with their budgets.
fn fleet(w: &mut World, size: &Size, rng: &mut Rng, budgets: bool) -> Vec<LiveCell> {
    let mut live = Vec::new();
    for i in 0..size.cells {
        let id = cell_name(i);
        let arch = if i % 5 == 4 { "arm64" } else { "amd64" };
        let mut labels = BTreeMap::from([("arch".to_owned(), arch.to_owned())]);
        if i % 10 == 3 {
            labels.insert("disk".into(), "nvme".into());
        }
        let mut pools = BTreeMap::from([("default".to_owned(), rng.range(40, 80))]);
        if i % 2 == 0 {
            pools.insert("large".into(), rng.range(8, 16));
        }
        if i % 10 == 7 {
            pools.insert("gpu".into(), 4);
        }
        let now_ms = w.now;
        w.ok(Command::RegisterCell {
            spec: CellSpec {
                id: CellId::new(&id).expect("valid"),
                region: REGIONS[i % REGIONS.len()].into(),
                labels,
                pools,
                agent_version: "bench".into(),
            },
            now_ms,
        });
        // A few cells take no work: one in 25 is not connected.
        if i % 25 != 24 {
            // Four in five report an API budget of 10–40 pod creations a tick.
            let budget = (budgets && i % 5 != 0).then(|| rng.range(10, 40));
            live.push(LiveCell {
                id: CellId::new(&id).expect("valid"),
                budget,
            });
        }
    }
    live
}

/// A job's constraints: three in four have none; the rest name a region, an arch, a pool, or
/// a fast disk (only some cells in `us-west` have one); one in 500 asks for an arch no cell
/// has, so the unplaceable report has something to say.
fn draw_constraints(rng: &mut Rng) -> Constraints {
    let mut c = Constraints::default();
    match rng.below(1000) {
        0..750 => {}
        750..830 => c.region = Some(REGIONS[rng.below(5) as usize].into()),
        830..900 => {
            c.labels.insert("arch".into(), "arm64".into());
        }
        900..970 => c.pool = Some(PoolName::new("large").expect("valid")),
        // GPUs are scarce (4 runners on one cell in ten): demand to match.
        970..975 => c.pool = Some(PoolName::new("gpu").expect("valid")),
        975..998 => {
            c.labels.insert("disk".into(), "nvme".into());
            c.region = Some("us-west".into());
        }
        _ => {
            c.labels.insert("arch".into(), "mips".into());
        }
    }
    c
}

/// Projects: one per tenant, plus a second project in every fifth tenant (a group).
fn projects(w: &mut World, size: &Size, rng: &mut Rng) -> Vec<ProjectId> {
    let mut ids = Vec::new();
    for t in 0..size.tenants {
        let group = (t % 5 == 0).then(|| format!("org-{t:03}"));
        let n = if group.is_some() { 2 } else { 1 };
        for k in 0..n {
            let id = ProjectId::new(format!("p-{t:03}-{k}")).expect("valid");
            let now_ms = w.now;
            w.ok(Command::CreateProject {
                spec: ProjectSpec {
                    id: id.clone(),
                    repo_url: format!("https://git.example.com/{id}.git"),
                    provider: Provider::Git,
                    webhook_secret: "s".into(),
                    pipeline_path: ".ci.yaml".into(),
                    tenant: group.clone(),
                    weight: rng.range(1, 4),
                },
                now_ms,
            });
            ids.push(id);
        }
    }
    ids
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The world of the steady-state run: fleet, projects, the queue, the running set.
fn setup(size: &Size) -> (World, Vec<LiveCell>, Vec<ProjectId>, Rng) {
    let setup = now();
    let mut rng = Rng(0x5eed);
    let mut w = World::new();
    let live = fleet(&mut w, size, &mut rng, true);
    let projects = projects(&mut w, size, &mut rng);
    // The queue: the monorepo first, then a long tail (project k gets a share ∝ 1/(k+1)),
    // in interleaved builds so queue times and ids mix across tenants.
    let total = size.queued + size.running;
    let tail = total - size.monorepo;
    let harmonic: f64 = (1..projects.len()).map(|k| 1.0 / k as f64).sum();
    let mut want: Vec<usize> = (0..projects.len())
        .map(|k| {
            if k == 0 {
                size.monorepo
            } else {
                ((tail as f64 / harmonic) / k as f64).ceil() as usize
            }
        })
        .collect();
    let mut queued = 0;
    while queued < total {
        for (k, p) in projects.iter().enumerate() {
            let n = want[k].min(BUILD_SIZE).min(total - queued);
            if n == 0 {
                continue;
            }
            want[k] -= n;
            queued += n;
            w.jobs(p, n, &mut || draw_constraints(&mut rng));
        }
        if want.iter().all(|n| *n == 0) && queued < total {
            // Rounding left a few: give them to the tail.
            want[1] += total - queued;
        }
    }
    // Start the running set: ticks without budgets until `running` jobs are out.
    let unlimited: Vec<LiveCell> = live
        .iter()
        .map(|l| LiveCell {
            id: l.id.clone(),
            budget: None,
        })
        .collect();
    while w.count(&[JobPhase::Running]) < size.running {
        let want = size.running - w.count(&[JobPhase::Running]);
        let (s, _) = w.tick(&unlimited, want, None);
        assert!(!s.placements.is_empty(), "the fleet is too small");
        w.commit_and_start(s);
    }
    // Some cells take no new work.
    for (i, c) in w.state.cells.values_mut().enumerate() {
        match i % 33 {
            10 => c.state = CellState::Cordoned,
            20 => {
                c.state = CellState::Draining {
                    deadline_ms: u64::MAX,
                }
            }
            _ => {}
        }
    }
    let capacity: u64 = w
        .state
        .cells
        .values()
        .flat_map(|c| c.pools.values())
        .map(|n| u64::from(*n))
        .sum();
    println!(
        "  setup: {:.1} s; {} queued, {} running, fleet capacity {capacity}, {} live cells",
        setup.elapsed().as_secs_f64(),
        w.count(&[JobPhase::Queued]),
        w.count(&[JobPhase::Running]),
        live.len()
    );

    (w, live, projects, rng)
}

/// The steady state: tick, commit, start; then finish jobs and queue new builds so the
/// state keeps its size. With `remember`, ticks go through one `Scheduler`.
fn steady(size: &Size, remember: bool) {
    let (mut w, live, projects, mut rng) = setup(size);
    let mut scheduler = remember.then(Scheduler::new);
    let label = if remember {
        "Scheduler (kept across ticks)"
    } else {
        "schedule (one-off, reads every job)"
    };

    // First the set-up snapshot as it is (exactly the queued and running jobs, nothing
    // finished), decided again and again: a kept scheduler remembers it after the first.
    // The first tick of a kept scheduler reads every job (as after a leader change).
    let repeats = size.ticks / 4;
    let first = w.tick(&live, LIMIT, scheduler.as_mut()).1;
    let mut same: Vec<Duration> = (1..repeats)
        .map(|_| w.tick(&live, LIMIT, scheduler.as_mut()).1)
        .collect();
    same.sort();
    println!(
        "{label}, the set-up snapshot ({} jobs): first tick {:.3} ms, then {} more: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        w.state.jobs.len(),
        ms(first),
        repeats - 1,
        ms(percentile(&same, 0.50)),
        ms(percentile(&same, 0.99)),
        ms(*same.last().unwrap_or(&Duration::ZERO)),
    );

    // Then the run.
    let mut times = Vec::with_capacity(size.ticks);
    let mut decisions = Vec::with_capacity(size.ticks);
    let (mut unplaceable, mut no_capacity) = (0, 0);
    let mut changes = 0;
    let mut cursor = w.state.jobs.cursor();
    for i in 0..size.ticks {
        changes += w
            .state
            .jobs
            .changed_since(cursor)
            .map_or(0, Iterator::count);
        cursor = w.state.jobs.cursor();
        let (s, took) = w.tick(&live, LIMIT, scheduler.as_mut());
        // Now and then (untimed), the one-off `schedule` must agree with the scheduler.
        if scheduler.is_some() && i % 10 == 0 {
            assert_eq!(schedule(&w.snapshot(&live, LIMIT)), s, "tick {i}");
        }
        times.push(took);
        decisions.push(s.placements.len());
        unplaceable = s.waiting.unplaceable.len();
        no_capacity = s.waiting.no_capacity;
        let placed = s.placements.len();
        w.commit_and_start(s);
        // Jobs finish roughly in the order they started (oldest first, a random few hundred
        // more than keep `running` out), so builds complete and the state keeps its size.
        let mut running: Vec<(u64, JobId)> = w
            .state
            .jobs
            .values()
            .filter(|j| j.phase() == JobPhase::Running)
            .map(|j| (j.started_at_ms.unwrap_or(0), j.id))
            .collect();
        running.sort_unstable();
        let finish = (running.len().saturating_sub(size.running)
            + rng.below(size.running as u64 / 6) as usize)
            .min(running.len());
        for (_, job) in &running[..finish] {
            w.finish(*job);
        }
        w.prune();
        let refill = placed;
        let mut left = refill;
        while left > 0 {
            let p = projects[rng.below(projects.len() as u64) as usize].clone();
            let n = left.min(1 + rng.below(BUILD_SIZE as u64) as usize);
            left -= n;
            w.jobs(&p, n, &mut || draw_constraints(&mut rng));
        }
    }
    let mut sorted = times.clone();
    sorted.sort();
    let sum: Duration = times.iter().sum();
    let total_decisions: usize = decisions.iter().sum();
    let p50 = percentile(&sorted, 0.50);
    let p99 = percentile(&sorted, 0.99);
    let max = *sorted.last().unwrap_or(&Duration::ZERO);
    println!(
        "{label}, {} ticks: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        size.ticks,
        ms(p50),
        ms(p99),
        ms(max)
    );
    println!(
        "  changes to jobs before each tick (placed, started, finished, new): mean {:.0}",
        changes as f64 / size.ticks as f64
    );
    println!(
        "  decisions per tick: mean {:.0}, min {}, max {}; {:.0} decisions/s of scheduler time",
        total_decisions as f64 / size.ticks as f64,
        decisions.iter().min().unwrap_or(&0),
        decisions.iter().max().unwrap_or(&0),
        total_decisions as f64 / sum.as_secs_f64().max(1e-9)
    );
    println!(
        "  last tick: {unplaceable} unplaceable, {no_capacity} waiting for capacity; {} queued, {} running, {} jobs in {} builds in the state",
        w.count(&[JobPhase::Queued]),
        w.count(&[JobPhase::Running]),
        w.state.jobs.len(),
        w.state.builds.len(),
    );
    println!(
        "  p99 / target: {:.2} ({:.3} ms of {} ms){}",
        p99.as_secs_f64() / TARGET_P99.as_secs_f64(),
        ms(p99),
        TARGET_P99.as_millis(),
        if p99 <= TARGET_P99 {
            ""
        } else {
            "  ABOVE TARGET"
        }
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("FLOTILLA_BENCH_QUICK").is_some_and(|v| v != "0");
    let size = if quick { Size::quick() } else { Size::full() };
    let profile = if cfg!(debug_assertions) {
        "debug: a smoke check, the times mean nothing"
    } else {
        "release"
    };
    println!(
        "bench_placement ({profile}{}): {} cells, {} tenants, {} queued, {} running, limit {LIMIT}",
        if quick { ", quick" } else { "" },
        size.cells,
        size.tenants,
        size.queued,
        size.running
    );

    steady(&size, false);
    steady(&size, true);

    // A burst: one project queues `burst` jobs on an idle fleet without budgets.
    let mut b = World::new();
    let mut brng = Rng(0xb0057);
    let fleet_live = fleet(&mut b, &size, &mut brng, false);
    let burst = ProjectId::new("burst").expect("valid");
    let now_ms = b.now;
    b.ok(Command::CreateProject {
        spec: ProjectSpec {
            id: burst.clone(),
            repo_url: "https://git.example.com/burst.git".into(),
            provider: Provider::Git,
            webhook_secret: "s".into(),
            pipeline_path: ".ci.yaml".into(),
            tenant: None,
            weight: 1,
        },
        now_ms,
    });
    b.jobs(&burst, size.burst, &mut Constraints::default);
    let (mut ticks, mut spent, mut placed) = (0, Duration::ZERO, 0);
    let mut scheduler = Scheduler::new();
    while b.count(&[JobPhase::Queued]) > 0 {
        let (s, took) = b.tick(&fleet_live, LIMIT, Some(&mut scheduler));
        if s.placements.is_empty() {
            break;
        }
        ticks += 1;
        spent += took;
        placed += s.placements.len();
        b.commit_and_start(s);
    }
    println!(
        "burst of {} jobs from one project: {placed} placed in {ticks} ticks of at most {LIMIT}, {:.3} ms of scheduler time ({:.0} decisions/s)",
        size.burst,
        ms(spent),
        placed as f64 / spent.as_secs_f64().max(1e-9)
    );
}
