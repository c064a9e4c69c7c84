//! The event loop: virtual time, one [`State`] driven by the commands the federator and the
//! cells would commit, one kept [`Scheduler`], and per (cell, pool) a [`RunnerPool`] with an
//! [`Autoscaler`] (or a static pool).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use super::report::{Sample, Stats};
use super::workload::{Plan, PlannedBuild};
use super::{Config, DAY_MS, EPOCH_MS, MINUTE_MS, Report, Runners, SimError};
use crate::autoscale::{Autoscaler, Change, PoolLoad, Retire, RunnerId, RunnerPool};
use crate::forge::{ForgeEvent, Provider};
use crate::ids::{CellId, JobId};
use crate::job::{JobPhase, Outcome};
use crate::pipeline::{self, JobSpec};
use crate::placement::{LiveCell, Scheduler, Snapshot};
use crate::state::{
    CellSpec, Command, Event, ProjectSpec, Resolution, Response, RunnerTimes, State,
};

/// Decisions per `PlaceJobs` entry, as the federator batches them.
const BATCH: usize = 512;
/// The lease a placement carries. Nothing expires in the simulation (cells never go away),
/// so it only stamps the leases.
const LEASE_TTL_MS: u64 = 30_000;
/// The commit every simulated push builds.
const SHA: &str = "5151515151515151515151515151515151515151";

/// Runner states, as indices into the counters.
const STARTING: usize = 0;
const IDLE: usize = 1;
const FENCED: usize = 2;
const BUSY: usize = 3;

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// The leader's scheduler tick.
    Tick,
    /// A runner finished starting.
    Ready { cp: u32, runner: RunnerId },
    /// A job finished on its runner.
    Done {
        cp: u32,
        runner: RunnerId,
        job: JobId,
    },
    /// Phase two of a scale-down: the backend check and the deletion.
    Retire { cp: u32, runner: RunnerId },
    /// Every pool's autoscaler, on the clock (the delays need one).
    Periodic,
    /// A sample for the per-minute series.
    Sample,
}

/// An event at a time; ordered so the heap pops the earliest, then the first scheduled.
#[derive(Debug)]
struct Timed {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timed {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// One pool of one cell.
#[derive(Debug)]
struct CellPool {
    /// Index into the plan's pools.
    pool: usize,
    runners: RunnerPool,
    /// `None` for a static pool.
    scaler: Option<Autoscaler>,
    /// The backend's truth about each runner: the job it runs, if any. The pool's view is
    /// checked against it at phase two of a scale-down, as the cell agent checks the pod.
    truth: BTreeMap<RunnerId, Option<JobId>>,
    /// Jobs placed here waiting for a runner, first come first served.
    queue: VecDeque<JobId>,
    /// Runners by state (`STARTING`…`BUSY`).
    counts: [u32; 4],
    dirty: bool,
}

impl CellPool {
    fn alive(&self) -> u32 {
        self.counts.iter().sum()
    }
}

/// What the simulator knows of a job besides the state.
#[derive(Debug, Clone, Copy)]
struct JobInfo {
    duration_ms: u32,
    pool: u8,
}

pub(super) struct Engine<'a> {
    config: &'a Config,
    plan: &'a Plan,
    state: State,
    index: u64,
    scheduler: Scheduler,
    live: Vec<LiveCell>,
    cell_index: BTreeMap<CellId, u32>,
    npools: usize,
    pools: Vec<CellPool>,
    /// By job id − 1 (`apply` hands out job ids 1, 2, … in order).
    jobs: Vec<JobInfo>,
    /// Job specs by (pool, position in the build), cloned into each resolution.
    templates: Vec<Vec<JobSpec>>,
    events: BinaryHeap<Timed>,
    seq: u64,
    next_build: usize,
    now: u64,
    tick_pending: bool,
    last_tick: Option<u64>,
    /// Queued jobs not yet placed (waiting at the federator).
    fed_queued: u64,
    /// Placed jobs waiting at a cell for a runner, over all cells.
    cell_queued: u64,
    /// Runners by pool and state, over all cells.
    counts: Vec<[u32; 4]>,
    /// Pools changed since the autoscalers last looked.
    dirty: Vec<u32>,
    /// Up to when runner time has been accounted.
    accounted: u64,
    window: (u64, u64),
    stats: Stats,
    /// Set for a probe of [`size_static`](super::size_static): stop as soon as every pool's
    /// p95 is sure to be over the target.
    probe: Option<Probe>,
}

/// When a run can stop early: once every pool has more waits over the target than 5 % of
/// an upper bound on its jobs, its p95 is over the target whatever comes next.
#[derive(Debug)]
pub(super) struct Probe {
    target_ms: u64,
    /// Per pool: waits over the target that make its p95 miss it for sure.
    limit: Vec<u64>,
    /// Per pool: waits over the target so far.
    over: Vec<u64>,
}

impl Probe {
    pub(super) fn new(plan: &Plan, target_ms: u64) -> Probe {
        // Every job of the plan bounds the jobs of the reported day. Nearest-rank p95 of n
        // waits exceeds the target once n - ceil(0.95 n) + 1 of them do, and that count only
        // grows with n.
        let mut jobs = vec![0u64; plan.pools.len()];
        for j in &plan.jobs {
            jobs[usize::from(j.pool)] += 1;
        }
        let limit = jobs
            .iter()
            .map(|n| n - (0.95 * *n as f64).ceil() as u64 + 1)
            .collect();
        Probe {
            target_ms,
            limit,
            over: vec![0; plan.pools.len()],
        }
    }

    fn missed(&self) -> bool {
        self.over.iter().zip(&self.limit).all(|(o, l)| o >= l)
    }
}

impl<'a> Engine<'a> {
    pub(super) fn new(
        config: &'a Config,
        plan: &'a Plan,
        runners: &Runners,
    ) -> Result<Self, SimError> {
        config.validate()?;
        let npools = plan.pools.len();
        let (sizes, policy) = match runners {
            Runners::Autoscaled(policy) => {
                policy.validate().map_err(SimError::Policy)?;
                if policy.max == 0 {
                    return Err(SimError::Invalid("max must be at least 1".into()));
                }
                (vec![policy.max; npools], Some(policy))
            }
            Runners::Static(sizes) => {
                let mut v = Vec::with_capacity(npools);
                for p in &plan.pools {
                    match sizes.get(p) {
                        Some(n) if *n > 0 => v.push(*n),
                        _ => {
                            return Err(SimError::Invalid(format!(
                                "the static pool `{p}` needs at least 1 runner per cell"
                            )));
                        }
                    }
                }
                (v, None)
            }
        };
        let window = (
            EPOCH_MS + u64::from(plan.days - 1) * DAY_MS,
            EPOCH_MS + u64::from(plan.days) * DAY_MS,
        );
        let mut e = Engine {
            config,
            plan,
            state: State::default(),
            index: 0,
            scheduler: Scheduler::new(),
            live: Vec::new(),
            cell_index: BTreeMap::new(),
            npools,
            pools: Vec::new(),
            jobs: Vec::with_capacity(plan.jobs.len().min(1 << 22)),
            templates: templates(plan),
            events: BinaryHeap::new(),
            seq: 0,
            next_build: 0,
            now: EPOCH_MS,
            tick_pending: false,
            last_tick: None,
            fed_queued: 0,
            cell_queued: 0,
            counts: vec![[0; 4]; npools],
            dirty: Vec::new(),
            accounted: EPOCH_MS,
            window,
            stats: Stats::new(npools, window),
            probe: None,
        };
        for project in &plan.projects {
            e.apply(Command::CreateProject {
                spec: ProjectSpec {
                    id: project.clone(),
                    repo_url: format!("https://git.example.com/{project}.git"),
                    provider: Provider::Github,
                    webhook_secret: "simulated".into(),
                    pipeline_path: ".ci.yaml".into(),
                    tenant: None,
                    weight: 1,
                },
                now_ms: EPOCH_MS,
            })?;
        }
        for c in 0..config.cells {
            let id = CellId::new(format!("c{c:03}")).expect("a valid cell id");
            e.apply(Command::RegisterCell {
                spec: CellSpec {
                    id: id.clone(),
                    region: format!("region-{}", c % 4 + 1),
                    labels: BTreeMap::new(),
                    pools: plan
                        .pools
                        .iter()
                        .zip(&sizes)
                        .map(|(p, n)| (p.as_str().to_owned(), *n))
                        .collect(),
                    agent_version: "simulated".into(),
                },
                now_ms: EPOCH_MS,
            })?;
            e.cell_index.insert(id.clone(), c);
            e.live.push(LiveCell { id, budget: None });
            for (pool, size) in sizes.iter().enumerate() {
                let mut cp = CellPool {
                    pool,
                    runners: RunnerPool::new(),
                    scaler: policy.map(|p| Autoscaler::new(p.clone())),
                    truth: BTreeMap::new(),
                    queue: VecDeque::new(),
                    counts: [0; 4],
                    dirty: false,
                };
                if policy.is_none() {
                    // A static pool: every runner up from the start.
                    for _ in 0..*size {
                        let r = cp.runners.start();
                        cp.runners.ready(r);
                        cp.truth.insert(r, None);
                        cp.counts[IDLE] += 1;
                        e.counts[pool][IDLE] += 1;
                    }
                }
                e.pools.push(cp);
            }
        }
        if policy.is_some() {
            e.push(EPOCH_MS, Ev::Periodic);
        }
        e.push(window.0, Ev::Sample);
        Ok(e)
    }

    /// Makes the run a probe that stops early when every pool misses `probe`'s target.
    pub(super) fn probe(mut self, probe: Probe) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Runs to the end of the last day and reports on it; `None` when a probe stopped early.
    pub(super) fn run_probe(self) -> Result<Option<Report>, SimError> {
        self.run_inner()
    }

    /// Runs to the end of the last day and reports on it.
    pub(super) fn run(self) -> Result<Report, SimError> {
        self.run_inner()?
            .ok_or_else(|| SimError::Refused("a full run stopped early".into()))
    }

    fn run_inner(mut self) -> Result<Option<Report>, SimError> {
        let end = self.window.1;
        loop {
            let arrival = self
                .plan
                .builds
                .get(self.next_build)
                .map(|b| EPOCH_MS + b.at_ms);
            let event = self.events.peek().map(|t| t.at);
            let at = match (arrival, event) {
                (Some(a), Some(e)) => a.min(e),
                (Some(a), None) => a,
                (None, Some(e)) => e,
                (None, None) => break,
            };
            if at >= end {
                break;
            }
            if self.probe.as_ref().is_some_and(Probe::missed) {
                return Ok(None);
            }
            if at > self.now {
                self.autoscale_dirty()?;
                self.account(at);
                self.now = at;
            }
            if arrival == Some(at) {
                let b = self.plan.builds[self.next_build];
                self.next_build += 1;
                self.arrive(b)?;
            } else {
                let t = self.events.pop().expect("peeked");
                self.handle(t.ev)?;
            }
        }
        self.autoscale_dirty()?;
        self.account(end);
        self.now = end;
        Ok(Some(self.report()))
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Timed {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn apply(&mut self, command: Command) -> Result<Vec<Event>, SimError> {
        self.index += 1;
        let applied = self.state.apply(self.index, command);
        match applied.response {
            Response::Rejected(r) => Err(SimError::Refused(r.to_string())),
            _ => Ok(applied.events),
        }
    }

    fn in_window(&self, t: u64) -> bool {
        (self.window.0..self.window.1).contains(&t)
    }

    /// Adds runner time from the last accounting up to `to`, clipped to the window.
    fn account(&mut self, to: u64) {
        let from = self.accounted.max(self.window.0);
        let to_c = to.min(self.window.1);
        if to_c > from {
            self.stats.add_runner_time(from, to_c, &self.counts);
        }
        self.accounted = to;
    }

    fn request_tick(&mut self) {
        if self.tick_pending {
            return;
        }
        let at = match self.last_tick {
            Some(t) => self.now.max(t + self.config.tick_ms),
            None => self.now,
        };
        self.tick_pending = true;
        self.push(at, Ev::Tick);
    }

    fn mark(&mut self, cp: u32) {
        let p = &mut self.pools[cp as usize];
        if !p.dirty && p.scaler.is_some() {
            p.dirty = true;
            self.dirty.push(cp);
        }
    }

    /// A build is pushed: the webhook is ingested and its pipeline resolved at once.
    fn arrive(&mut self, b: PlannedBuild) -> Result<(), SimError> {
        let now = self.now;
        let events = self.apply(Command::IngestEvent {
            project: self.plan.projects[b.project as usize].clone(),
            delivery: None,
            event: ForgeEvent::Push {
                branch: "main".into(),
                sha: SHA.into(),
                changed_paths: None,
                actor: "simulated".into(),
            },
            now_ms: now,
        })?;
        let Some(build) = events.iter().find_map(|e| match e {
            Event::BuildCreated(b) => Some(*b),
            _ => None,
        }) else {
            return Err(SimError::Refused("a push created no build".into()));
        };
        let planned = &self.plan.jobs[b.first as usize..(b.first + b.len) as usize];
        let jobs: Vec<JobSpec> = planned
            .iter()
            .enumerate()
            .map(|(i, j)| self.templates[usize::from(j.pool)][i].clone())
            .collect();
        let first_id = self.state.next_ids.job + 1;
        if first_id != self.jobs.len() as u64 + 1 {
            return Err(SimError::Refused("job ids out of step".into()));
        }
        for j in planned {
            self.jobs.push(JobInfo {
                duration_ms: j.duration_ms,
                pool: j.pool,
            });
        }
        let events = self.apply(Command::ResolvePipeline {
            build,
            sha: Some(SHA.into()),
            resolution: Resolution::Jobs {
                jobs,
                concurrency: None,
            },
            now_ms: now,
        })?;
        if self.in_window(now) {
            self.stats.builds += 1;
        }
        self.queued(&events);
        Ok(())
    }

    /// Counts the jobs `apply` made runnable.
    fn queued(&mut self, events: &[Event]) {
        let mut any = false;
        for e in events {
            if let Event::JobsQueued(ids) = e {
                for id in ids {
                    any = true;
                    self.fed_queued += 1;
                    if self.in_window(self.now) {
                        let pool = self.info(*id).pool;
                        self.stats.queued[usize::from(pool)] += 1;
                    }
                }
            }
        }
        if any {
            self.request_tick();
        }
    }

    fn info(&self, id: JobId) -> JobInfo {
        self.jobs[(id.0 - 1) as usize]
    }

    fn handle(&mut self, ev: Ev) -> Result<(), SimError> {
        match ev {
            Ev::Tick => self.tick(),
            Ev::Ready { cp, runner } => {
                let p = &mut self.pools[cp as usize];
                if p.runners.ready(runner) {
                    p.counts[STARTING] -= 1;
                    p.counts[IDLE] += 1;
                    self.counts[p.pool][STARTING] -= 1;
                    self.counts[p.pool][IDLE] += 1;
                }
                self.drain(cp)?;
                self.mark(cp);
                Ok(())
            }
            Ev::Done { cp, runner, job } => self.done(cp, runner, job),
            Ev::Retire { cp, runner } => {
                self.retire(cp, runner);
                self.mark(cp);
                Ok(())
            }
            Ev::Periodic => {
                for cp in 0..self.pools.len() as u32 {
                    self.mark(cp);
                }
                let next = self.now + self.config.autoscale_interval_ms;
                self.push(next, Ev::Periodic);
                Ok(())
            }
            Ev::Sample => {
                let busy: u64 = self.counts.iter().map(|c| u64::from(c[BUSY])).sum();
                let alive: u64 = self.counts.iter().flatten().map(|n| u64::from(*n)).sum();
                let queued = self.fed_queued + self.cell_queued;
                self.stats.series.push(Sample {
                    minute: ((self.now - self.window.0) / MINUTE_MS) as u32,
                    demand: busy + queued,
                    runners: alive,
                    queued,
                });
                let next = self.now + MINUTE_MS;
                self.push(next, Ev::Sample);
                Ok(())
            }
        }
    }

    /// The leader's scheduler tick: one `PlaceJobs` batch, handed to the cells.
    fn tick(&mut self) -> Result<(), SimError> {
        self.tick_pending = false;
        self.last_tick = Some(self.now);
        if self.fed_queued == 0 {
            return Ok(());
        }
        if self.in_window(self.now) {
            self.stats.ticks += 1;
        }
        let schedule = self.scheduler.schedule(&Snapshot {
            state: &self.state,
            live: &self.live,
            now_ms: self.now,
            lease_ttl_ms: LEASE_TTL_MS,
            limit: BATCH,
        });
        if schedule.placements.is_empty() {
            return Ok(());
        }
        let full = schedule.placements.len() == BATCH;
        let events = self.apply(Command::PlaceJobs {
            placements: schedule.placements,
            now_ms: self.now,
        })?;
        let mut touched = Vec::new();
        for e in &events {
            if let Event::JobAssigned { job, cell, .. } = e {
                let cell = self.cell_index[cell];
                let cp = cell * self.npools as u32 + u32::from(self.info(*job).pool);
                self.pools[cp as usize].queue.push_back(*job);
                self.fed_queued -= 1;
                self.cell_queued += 1;
                if touched.last() != Some(&cp) {
                    touched.push(cp);
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for cp in touched {
            self.drain(cp)?;
            self.mark(cp);
        }
        if full {
            self.request_tick();
        }
        Ok(())
    }

    /// Gives the jobs waiting at a cell pool its idle runners, first come first served.
    fn drain(&mut self, cp: u32) -> Result<(), SimError> {
        loop {
            let p = &mut self.pools[cp as usize];
            let Some(&job) = p.queue.front() else {
                return Ok(());
            };
            let Some(runner) = p.runners.assign(job) else {
                return Ok(());
            };
            p.queue.pop_front();
            p.truth.insert(runner, Some(job));
            p.counts[IDLE] -= 1;
            p.counts[BUSY] += 1;
            let pool = p.pool;
            self.counts[pool][IDLE] -= 1;
            self.counts[pool][BUSY] += 1;
            self.cell_queued -= 1;
            self.start(cp, runner, job)?;
        }
    }

    fn start(&mut self, cp: u32, runner: RunnerId, job: JobId) -> Result<(), SimError> {
        let j = &self.state.jobs[&job];
        let (Some(fence), Some(queued_at)) = (j.run.fence(), j.queued_at_ms) else {
            return Err(SimError::Refused(format!(
                "job {job} started without a placement"
            )));
        };
        let info = self.info(job);
        if self.in_window(queued_at) {
            let wait = self.now - queued_at;
            self.stats.started(usize::from(info.pool), queued_at, wait);
            if let Some(p) = &mut self.probe
                && wait > p.target_ms
            {
                p.over[usize::from(info.pool)] += 1;
            }
        }
        self.apply(Command::JobStarted {
            job,
            fence,
            runner: RunnerTimes::default(),
            now_ms: self.now,
        })?;
        let at = self.now + u64::from(info.duration_ms);
        self.push(at, Ev::Done { cp, runner, job });
        Ok(())
    }

    fn done(&mut self, cp: u32, runner: RunnerId, job: JobId) -> Result<(), SimError> {
        let p = &mut self.pools[cp as usize];
        let pool = p.pool;
        if p.runners.finished(runner) == Some(job) {
            p.counts[BUSY] -= 1;
            self.counts[pool][BUSY] -= 1;
        }
        p.truth.remove(&runner);
        if p.scaler.is_none() {
            // A static agent goes back to idle: its one-shot runner is replaced at once.
            let r = p.runners.start();
            p.runners.ready(r);
            p.truth.insert(r, None);
            p.counts[IDLE] += 1;
            self.counts[pool][IDLE] += 1;
            if self.in_window(self.now) {
                self.stats.runners_started += 1;
            }
        }
        let j = &self.state.jobs[&job];
        let (Some(fence), build) = (j.run.fence(), j.build) else {
            return Err(SimError::Refused(format!(
                "job {job} finished without a fence"
            )));
        };
        let events = self.apply(Command::JobFinished {
            job,
            fence,
            outcome: Outcome::Succeeded,
            now_ms: self.now,
        })?;
        self.queued(&events);
        if self
            .state
            .builds
            .get(&build)
            .is_some_and(|b| b.status.is_terminal())
            && let Some(b) = self.state.builds.remove(&build)
        {
            for j in &b.jobs {
                self.state.jobs.remove(j);
            }
        }
        self.drain(cp)?;
        self.mark(cp);
        if self.fed_queued > 0 {
            // A slot came free on a cell: the federator may place more.
            self.request_tick();
        }
        Ok(())
    }

    /// Phase two of a scale-down: asks the backend (the engine's truth) what the fenced
    /// runner is doing and retires it; counts a deletion of a runner that had a job.
    fn retire(&mut self, cp: u32, runner: RunnerId) {
        let in_window = self.in_window(self.now);
        let p = &mut self.pools[cp as usize];
        let busy_with = p.truth.get(&runner).copied().flatten();
        match p.runners.retire(runner, busy_with) {
            Retire::Deleted => {
                p.counts[FENCED] -= 1;
                self.counts[p.pool][FENCED] -= 1;
                // The backend deletes the runner: whatever it was really running dies with it.
                if let Some(Some(_job)) = p.truth.remove(&runner) {
                    self.stats.busy_runners_killed += 1;
                }
                if in_window {
                    self.stats.runners_retired += 1;
                }
            }
            Retire::KeptBusy(_) => {
                p.counts[FENCED] -= 1;
                p.counts[BUSY] += 1;
                self.counts[p.pool][FENCED] -= 1;
                self.counts[p.pool][BUSY] += 1;
                self.stats.retirements_kept_busy += 1;
            }
            Retire::NotFenced => {}
        }
    }

    /// Runs the autoscaler of every pool that changed, at the current time.
    fn autoscale_dirty(&mut self) -> Result<(), SimError> {
        let dirty = std::mem::take(&mut self.dirty);
        let in_window = self.in_window(self.now);
        for &cp in &dirty {
            let now = self.now;
            let startup = self.config.startup_ms;
            let retire_at = now + self.config.retire_check_ms;
            let p = &mut self.pools[cp as usize];
            p.dirty = false;
            let Some(scaler) = &mut p.scaler else {
                continue;
            };
            // The pool's load as `RunnerPool::load` counts it, from the counters kept beside
            // the pool (the same numbers without walking every runner at every decision;
            // debug builds, hence the tests, check they agree).
            let load = PoolLoad {
                busy: p.counts[BUSY],
                idle: p.counts[IDLE],
                starting: p.counts[STARTING],
                fenced: p.counts[FENCED],
                queued: p.queue.len() as u32,
            };
            debug_assert_eq!(load, p.runners.load(load.queued));
            let pool = p.pool;
            match scaler.decide(now, load).change {
                Change::Hold => {}
                Change::Add(n) => {
                    let mut started = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        let r = p.runners.start();
                        p.truth.insert(r, None);
                        started.push(r);
                    }
                    p.counts[STARTING] += n;
                    self.counts[pool][STARTING] += n;
                    if in_window {
                        self.stats.scale_ups += 1;
                        self.stats.runners_started += u64::from(n);
                    }
                    for runner in started {
                        self.push(now + startup, Ev::Ready { cp, runner });
                    }
                }
                Change::Retire(n) => {
                    let fenced = p.runners.fence_idle(n);
                    let k = fenced.len() as u32;
                    p.counts[IDLE] -= k;
                    p.counts[FENCED] += k;
                    self.counts[pool][IDLE] -= k;
                    self.counts[pool][FENCED] += k;
                    if in_window && k > 0 {
                        self.stats.scale_downs += 1;
                    }
                    for runner in fenced {
                        self.push(retire_at, Ev::Retire { cp, runner });
                    }
                }
            }
            let alive = self.pools[cp as usize].alive();
            if in_window {
                let peak = &mut self.stats.peak[pool];
                *peak = (*peak).max(alive);
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
        Ok(())
    }

    fn report(mut self) -> Report {
        // Runnable jobs of the reported day still waiting at the end: their wait so far.
        let end = self.window.1;
        let mut waiting = Vec::new();
        for j in self.state.jobs.values() {
            if matches!(j.phase(), JobPhase::Queued | JobPhase::Leased)
                && let Some(q) = j.queued_at_ms
                && self.in_window(q)
            {
                waiting.push((usize::from(self.info(j.id).pool), end - q));
            }
        }
        for (pool, wait) in waiting {
            self.stats.never_started(pool, wait);
        }
        // A static pool's size is its peak.
        for p in &self.pools {
            let peak = &mut self.stats.peak[p.pool];
            *peak = (*peak).max(p.alive());
        }
        let mode = if self.pools.iter().any(|p| p.scaler.is_some()) {
            "autoscaled"
        } else {
            "static"
        };
        self.stats.report(self.config, self.plan, mode)
    }
}

/// The job specs every build is made of: per pool, the first job (`setup`) and the fan-out
/// jobs (`test-1`, … needing `setup`). A trace's one-job builds use the first.
fn templates(plan: &Plan) -> Vec<Vec<JobSpec>> {
    let yaml = "version: 1\ndefaults: { image: 'debian:12' }\njobs:\n  setup: { run: 'true' }\n";
    let base = pipeline::parse(".ci.yaml", yaml)
        .expect("the built-in pipeline is valid")
        .jobs
        .remove(0);
    let widest = plan.builds.iter().map(|b| b.len).max().unwrap_or(1) as usize;
    plan.pools
        .iter()
        .map(|pool| {
            (0..widest)
                .map(|i| {
                    let mut j = base.clone();
                    if i > 0 {
                        j.name = format!("test-{i}");
                        j.key = j.name.clone();
                        j.needs = vec!["setup".into()];
                    }
                    j.placement.pool =
                        (pool.as_str() != crate::state::DEFAULT_POOL).then(|| pool.clone());
                    j
                })
                .collect()
        })
        .collect()
}
