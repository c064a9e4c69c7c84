//! What arrives: the built-in day profiles (`busy`, `sparse`, `spiky`) drawn as a
//! non-homogeneous Poisson process over a per-minute rate curve, or a trace replayed as it is.
//! Either becomes a [`Plan`]: every build of every simulated day, in arrival order, with its
//! jobs' pools and durations, so the autoscaled run and every static run see the very same
//! work.

use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::{DAY_MS, MINUTE_MS, SimError};
use crate::ids::{PoolName, ProjectId};
use crate::state::DEFAULT_POOL;

/// The pool a profile sends its heavy jobs to.
pub const LARGE_POOL: &str = "large";

/// The shortest and longest job a profile draws (seconds): a job shorter than a runner's
/// start-up is rare in CI, and a 30-minute cap keeps one draw from the tail dominating a day.
const MIN_JOB_S: f64 = 5.0;
const MAX_JOB_S: f64 = 1_800.0;

/// A built-in shape of a day of CI load, after the three pool types of
/// `../shared/seeds/autoscaling-build-agents.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Dense load through business hours: ramps up from 07:00, a plateau from 09:00 to
    /// 18:00 with a lunch dip, low at night.
    Busy,
    /// A low background with a few short spikes.
    Sparse,
    /// A busier background with frequent tall spikes.
    Spiky,
}

impl Profile {
    /// Every profile.
    pub const ALL: [Profile; 3] = [Profile::Busy, Profile::Sparse, Profile::Spiky];

    /// Its name on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Busy => "busy",
            Profile::Sparse => "sparse",
            Profile::Spiky => "spiky",
        }
    }

    /// The profile called `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Profile::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A profile at a given scale.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileLoad {
    /// The shape.
    pub profile: Profile,
    /// Builds per day (each ≈ 5 jobs: one setup job, then 2–6 jobs that need it).
    pub builds_per_day: u32,
    /// Projects (each its own tenant), with a mildly skewed share of the builds.
    pub projects: u32,
    /// The share of jobs that run in the `large` pool (0–1).
    pub large_share: f64,
}

/// One row of a trace: a build of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceJob {
    /// When it is pushed, from the start of the day (ms, below 24 h).
    pub submit_ms: u64,
    /// How long it runs once started (ms).
    pub duration_ms: u64,
    /// Its pool.
    pub pool: PoolName,
    /// Its project (each project is its own tenant).
    pub project: ProjectId,
}

/// What arrives each simulated day.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// A built-in profile, drawn afresh each day from the seed.
    Profile(ProfileLoad),
    /// A trace, replayed identically each day.
    Trace(Vec<TraceJob>),
}

impl Workload {
    /// The name reports give it: the profile's, or `trace`.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Profile(p) => p.profile.as_str(),
            Workload::Trace(_) => "trace",
        }
    }
}

/// A planned job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlannedJob {
    pub(crate) duration_ms: u32,
    /// Index into [`Plan::pools`]. The first job of a build needs nothing; every later one
    /// needs the first.
    pub(crate) pool: u8,
}

/// A planned build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlannedBuild {
    /// When it is pushed, from the start of the simulation.
    pub(crate) at_ms: u64,
    /// Index into [`Plan::projects`].
    pub(crate) project: u32,
    /// Its jobs: `Plan::jobs[first..first + len]`.
    pub(crate) first: u32,
    pub(crate) len: u32,
}

/// Every build of every simulated day, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub(crate) name: &'static str,
    pub(crate) days: u32,
    pub(crate) pools: Vec<PoolName>,
    pub(crate) projects: Vec<ProjectId>,
    pub(crate) builds: Vec<PlannedBuild>,
    pub(crate) jobs: Vec<PlannedJob>,
}

impl Plan {
    /// Draws (or lays out) `days` days of `workload` from `seed`.
    pub fn new(workload: &Workload, seed: u64, days: u32) -> Result<Plan, SimError> {
        if days == 0 {
            return Err(SimError::Invalid("days must be at least 1".into()));
        }
        match workload {
            Workload::Profile(p) => profile_plan(p, seed, days),
            Workload::Trace(rows) => trace_plan(rows, days),
        }
    }

    /// The workload's name (`busy`, `sparse`, `spiky`, `trace`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The pools the jobs ask for, in name order.
    pub fn pools(&self) -> &[PoolName] {
        &self.pools
    }

    /// Builds over all days.
    pub fn builds(&self) -> usize {
        self.builds.len()
    }

    /// Jobs over all days.
    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }
}

fn profile_plan(p: &ProfileLoad, seed: u64, days: u32) -> Result<Plan, SimError> {
    if p.projects == 0 {
        return Err(SimError::Invalid("projects must be at least 1".into()));
    }
    if !(0.0..=1.0).contains(&p.large_share) {
        return Err(SimError::Invalid(format!(
            "the large pool's share of jobs must be between 0 and 1, not {}",
            p.large_share
        )));
    }
    let root = Rng::new(seed);
    let projects: Vec<ProjectId> = (0..p.projects)
        .map(|i| ProjectId::new(format!("p{i:04}")).expect("a valid slug"))
        .collect();
    // Zipf-like shares with a mild exponent: a few projects push several times more than the
    // median one, as monorepos do, without one project being most of the load.
    let mut cumulative = Vec::with_capacity(projects.len());
    let mut sum = 0.0;
    for i in 0..projects.len() {
        sum += 1.0 / ((i + 1) as f64).powf(0.6);
        cumulative.push(sum);
    }
    let mut pools = vec![PoolName::new(DEFAULT_POOL).expect("valid")];
    if p.large_share > 0.0 {
        pools.push(PoolName::new(LARGE_POOL).expect("valid"));
    }
    let large = (pools.len() - 1) as u8;
    // Spikes that come back at the same time every day (scheduled pipelines, the merge rush
    // after a stand-up) are drawn once; the others afresh each day.
    let recurring = spikes(p.profile, &mut root.fork(0x5ca1_ab1e), true);
    let mut builds = Vec::new();
    let mut jobs = Vec::new();
    for day in 0..days {
        let mut rng = root.fork(u64::from(day) + 1);
        let mut curve = base_curve(p.profile, &mut rng);
        for s in recurring.iter().chain(&spikes(p.profile, &mut rng, false)) {
            for m in s.start..(s.start + s.len).min(curve.len()) {
                curve[m] += s.height;
            }
        }
        let total: f64 = curve.iter().sum();
        let day_start = u64::from(day) * DAY_MS;
        for (minute, w) in curve.iter().enumerate() {
            let per_minute = f64::from(p.builds_per_day) * w / total;
            if per_minute <= 0.0 {
                continue;
            }
            let gap = MINUTE_MS as f64 / per_minute;
            let mut t = rng.exp(gap);
            while t < MINUTE_MS as f64 {
                let at_ms = day_start + minute as u64 * MINUTE_MS + t as u64;
                let u = rng.unit() * sum;
                let project = cumulative
                    .partition_point(|c| *c <= u)
                    .min(projects.len() - 1);
                let first = jobs.len() as u32;
                let fan_out = rng.range(2, 6);
                for j in 0..=fan_out {
                    let (median, sigma) = if j == 0 { (60.0, 0.6) } else { (180.0, 0.8) };
                    let secs = rng.lognormal(median, sigma).clamp(MIN_JOB_S, MAX_JOB_S);
                    let pool = if rng.chance(p.large_share) { large } else { 0 };
                    jobs.push(PlannedJob {
                        duration_ms: (secs * 1000.0) as u32,
                        pool,
                    });
                }
                builds.push(PlannedBuild {
                    at_ms,
                    project: project as u32,
                    first,
                    len: fan_out + 1,
                });
                t += rng.exp(gap);
            }
        }
    }
    Ok(Plan {
        name: p.profile.as_str(),
        days,
        pools,
        projects,
        builds,
        jobs,
    })
}

/// A burst of extra arrivals.
#[derive(Debug, Clone, Copy)]
struct Spike {
    /// Minute of the day it starts.
    start: usize,
    /// Minutes it lasts.
    len: usize,
    /// Added to the curve's weight for those minutes.
    height: f64,
}

/// The profile's spikes of one kind: `recurring` ones (the same every day) or one day's own.
fn spikes(profile: Profile, rng: &mut Rng, recurring: bool) -> Vec<Spike> {
    // (how many, first and last minute they may start, length range, height range)
    let (n, from, to, len, height) = match (profile, recurring) {
        (Profile::Busy, _) => return Vec::new(),
        (Profile::Sparse, true) => (3, 8 * 60, 18 * 60, (5, 15), (1.5, 3.0)),
        (Profile::Sparse, false) => (3, 7 * 60, 20 * 60, (5, 15), (1.5, 3.0)),
        (Profile::Spiky, true) => (12, 7 * 60, 20 * 60, (3, 10), (1.5, 4.0)),
        (Profile::Spiky, false) => (12, 0, 23 * 60, (3, 10), (1.5, 4.0)),
    };
    (0..n)
        .map(|_| Spike {
            start: rng.range(from, to) as usize,
            len: rng.range(len.0, len.1) as usize,
            height: height.0 + rng.unit() * (height.1 - height.0),
        })
        .collect()
}

/// The profile's background weight for each minute of one day, with a little day-to-day
/// noise (a factor per ten minutes).
fn base_curve(profile: Profile, rng: &mut Rng) -> Vec<f64> {
    let minutes = (DAY_MS / MINUTE_MS) as usize;
    let mut curve = Vec::with_capacity(minutes);
    let mut factor = 1.0;
    for m in 0..minutes {
        if m % 10 == 0 {
            factor = (0.1 * rng.normal()).exp();
        }
        let h = m as f64 / 60.0;
        let w = match profile {
            Profile::Busy => {
                let lerp =
                    |from: f64, to: f64, a: f64, b: f64| a + (b - a) * (h - from) / (to - from);
                match h {
                    h if h < 7.0 => 0.08,
                    h if h < 9.0 => lerp(7.0, 9.0, 0.08, 1.0),
                    h if (12.0..13.0).contains(&h) => 0.85,
                    h if h < 18.0 => 1.0,
                    h if h < 20.0 => lerp(18.0, 20.0, 1.0, 0.15),
                    _ => lerp(20.0, 24.0, 0.15, 0.08),
                }
            }
            Profile::Sparse => {
                if (8.0..19.0).contains(&h) {
                    0.12
                } else {
                    0.05
                }
            }
            Profile::Spiky => {
                if (7.0..20.0).contains(&h) {
                    0.3
                } else {
                    0.1
                }
            }
        };
        curve.push(w * factor);
    }
    curve
}

fn trace_plan(rows: &[TraceJob], days: u32) -> Result<Plan, SimError> {
    if rows.is_empty() {
        return Err(SimError::Invalid("the trace has no rows".into()));
    }
    let mut pools: Vec<PoolName> = rows.iter().map(|r| r.pool.clone()).collect();
    pools.sort();
    pools.dedup();
    if pools.len() > usize::from(u8::MAX) {
        return Err(SimError::Invalid(format!(
            "the trace names {} pools; at most 255 are supported",
            pools.len()
        )));
    }
    let mut projects: Vec<ProjectId> = rows.iter().map(|r| r.project.clone()).collect();
    projects.sort();
    projects.dedup();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|i| (rows[*i].submit_ms, *i));
    let mut builds = Vec::with_capacity(rows.len() * days as usize);
    let mut jobs = Vec::with_capacity(rows.len() * days as usize);
    for day in 0..days {
        for &i in &order {
            let r = &rows[i];
            if r.submit_ms >= DAY_MS {
                return Err(SimError::Invalid(format!(
                    "trace row {} is submitted {} s into the day; a trace is one day (below 86400 s)",
                    i + 1,
                    r.submit_ms / 1000
                )));
            }
            let first = jobs.len() as u32;
            jobs.push(PlannedJob {
                duration_ms: u32::try_from(r.duration_ms).unwrap_or(u32::MAX),
                pool: pools.binary_search(&r.pool).expect("collected above") as u8,
            });
            builds.push(PlannedBuild {
                at_ms: u64::from(day) * DAY_MS + r.submit_ms,
                project: projects.binary_search(&r.project).expect("collected above") as u32,
                first,
                len: 1,
            });
        }
    }
    Ok(Plan {
        name: "trace",
        days,
        pools,
        projects,
        builds,
        jobs,
    })
}
