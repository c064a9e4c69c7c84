//! `flotilla simulate`'s engine: a deterministic, virtual-time simulation of days of CI load
//! through the real scheduler and the real autoscaler policy.
//!
//! A run drives one replicated [`State`](crate::state::State) with the commands the
//! federator and the cells would commit — a push is ingested and its pipeline resolved at
//! once, the leader's kept [`Scheduler`](crate::placement::Scheduler) places queued jobs on
//! cells in batches, cells start and finish them — and sizes every (cell, pool) with its own
//! [`Autoscaler`](crate::autoscale::Autoscaler) over a [`RunnerPool`](crate::autoscale::RunnerPool)
//! of one-shot runners. Or, for comparison, gives every cell pool a static set of runners.
//!
//! The model, in short (`docs/simulate.md` has it in full):
//! - Time is virtual milliseconds from [`EPOCH_MS`] (a Monday, 00:00 UTC); an event queue
//!   ordered by (time, sequence) drives everything, so nothing sleeps and a day takes
//!   seconds.
//! - A job's queue wait is its start minus when it became runnable: the federator's queue,
//!   the cell's queue and the runner's start-up all count.
//! - Placement capacity of a cell pool is the pool's `max` (a static pool's size); placed
//!   jobs wait at the cell for a runner. A placed job takes the longest-waiting idle runner;
//!   runners start in `startup`; a finished runner is gone (one-shot).
//! - Each pool's autoscaler decides whenever the pool changed (at the end of that virtual
//!   millisecond) and at least every `autoscale_interval`. Scale-down fences idle runners,
//!   then after `retire_check` asks the backend (the engine's own truth about each runner)
//!   and retires; a deletion of a runner that was running a job is counted, never assumed
//!   away.
//! - Finished builds are removed from the state, so it stays small over 500,000 jobs.
//!
//! Everything is a function of the [`Config`], the [`Workload`] and the seed: a SplitMix64
//! stream, `BTreeMap`s only, no clock and no I/O. The same inputs give an equal [`Report`].
//!
//! Layout: this file holds the API; `workload.rs` the profiles and traces ([`Plan`]);
//! `engine.rs` the event loop; `report.rs` the measurements; `rng.rs` the random numbers.

mod engine;
mod report;
mod rng;
mod workload;

use std::collections::BTreeMap;

pub use report::{HourReport, PoolReport, Report, Sample, Waits};
pub use workload::{LARGE_POOL, Plan, Profile, ProfileLoad, TraceJob, Workload};

use crate::autoscale::{Policy, PolicyError};
use crate::ids::PoolName;

/// 2026-11-23 00:00:00 UTC, a Monday: the start of the first simulated day (so a weekly
/// time-of-day floor sees Monday as Monday).
pub const EPOCH_MS: u64 = 1_795_392_000_000;

/// A day in milliseconds.
pub const DAY_MS: u64 = 24 * HOUR_MS;
/// An hour in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;
/// A minute in milliseconds.
pub const MINUTE_MS: u64 = 60_000;

/// How a run is set up (everything but the runners and the workload).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The seed of every random draw.
    pub seed: u64,
    /// Cells, each with every pool the workload uses.
    pub cells: u32,
    /// How long a runner takes from creation to ready.
    pub startup_ms: u64,
    /// The shortest time between two scheduler ticks.
    pub tick_ms: u64,
    /// The longest time between two autoscaler decisions of a pool.
    pub autoscale_interval_ms: u64,
    /// How long after fencing an idle runner the backend is asked and the runner retired.
    pub retire_check_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 1,
            cells: 20,
            startup_ms: 5_000,
            tick_ms: 100,
            autoscale_interval_ms: 5_000,
            retire_check_ms: 1_000,
        }
    }
}

impl Config {
    /// Checks the configuration makes sense.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.cells == 0 || self.cells > 1_000 {
            return Err(SimError::Invalid(format!(
                "cells must be between 1 and 1000, not {}",
                self.cells
            )));
        }
        if self.tick_ms == 0 {
            return Err(SimError::Invalid("tick must be at least 1ms".into()));
        }
        if self.autoscale_interval_ms == 0 {
            return Err(SimError::Invalid(
                "the autoscale interval must be at least 1ms".into(),
            ));
        }
        Ok(())
    }
}

/// How the cell pools get their runners.
#[derive(Debug, Clone, PartialEq)]
pub enum Runners {
    /// Every (cell, pool) sized by its own autoscaler with this policy; placement capacity
    /// is the policy's `max`.
    Autoscaled(Policy),
    /// Every cell's pool has this many runners, always (placement capacity too), by pool.
    Static(BTreeMap<PoolName, u32>),
}

impl Runners {
    /// The same static size for every pool of `plan`.
    pub fn static_all(plan: &Plan, n: u32) -> Runners {
        Runners::Static(plan.pools.iter().map(|p| (p.clone(), n)).collect())
    }
}

/// Why a simulation could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// A setting or a workload that cannot work.
    #[error("{0}")]
    Invalid(String),
    /// The pool policy cannot work.
    #[error(transparent)]
    Policy(PolicyError),
    /// The state refused a command the simulator sent (a bug in the simulator).
    #[error("the state refused a simulated command: {0}")]
    Refused(String),
}

/// Runs `plan` with `runners` and reports on its last day.
pub fn run(config: &Config, plan: &Plan, runners: &Runners) -> Result<Report, SimError> {
    engine::Engine::new(config, plan, runners)?.run()
}

/// What [`size_static`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticSizing {
    /// Runners per cell, by pool.
    pub runners: BTreeMap<PoolName, u32>,
    /// The run with those runners.
    pub report: Report,
    /// Whether every pool's p95 queue wait met the target (false when even the largest size
    /// tried did not).
    pub met: bool,
    /// Simulations it took.
    pub runs: u32,
}

/// The most runners per cell pool [`size_static`] tries.
const STATIC_MAX: u32 = 1 << 16;

/// How many times [`size_static`] grows a pool that misses in the final combination.
const STATIC_REPAIRS: u32 = 20;

/// Finds, for each pool, the smallest static size (runners per cell) whose queue-wait p95
/// over the pool's jobs is at most `target_p95_ms`, by binary search. All pools are searched
/// together (one run per step): they share little (the scheduler's batches and fair-share
/// order), and a pool that misses in the final combination is grown by 2 % steps until it
/// meets, so the sizes are the smallest found, not proven minimal.
/// `hint` is a run of the same plan (the autoscaled one) whose per-cell peaks start the
/// search.
pub fn size_static(
    config: &Config,
    plan: &Plan,
    target_p95_ms: u64,
    hint: Option<&Report>,
) -> Result<StaticSizing, SimError> {
    let names: Vec<String> = plan.pools.iter().map(|p| p.to_string()).collect();
    let meets = |r: &Report, pool: &str| {
        r.pools
            .get(pool)
            .is_none_or(|p| p.queue_wait_s.p95_ms() <= target_p95_ms)
    };
    let sizes = |v: &[u32]| {
        Runners::Static(
            plan.pools
                .iter()
                .zip(v)
                .map(|(p, n)| (p.clone(), *n))
                .collect(),
        )
    };
    let mut runs = 0;
    // An upper bound that meets the target: the autoscaled peak, doubled until it does.
    let mut hi: Vec<u32> = names
        .iter()
        .map(|n| {
            hint.and_then(|h| h.pools.get(n))
                .map_or(8, |p| p.peak_runners.max(1))
        })
        .collect();
    let mut lo = vec![1u32; names.len()];
    // The latest run and the sizes it had.
    let mut last: (Vec<u32>, Report);
    loop {
        let r = run(config, plan, &sizes(&hi))?;
        runs += 1;
        let mut grew = false;
        for (i, n) in names.iter().enumerate() {
            if !meets(&r, n) && hi[i] < STATIC_MAX {
                grew = true;
                lo[i] = hi[i] + 1;
                hi[i] = (hi[i] * 2).min(STATIC_MAX);
            }
        }
        last = (hi.clone(), r);
        if !grew {
            break;
        }
    }
    // Binary search each pool between lo (1, or known too small plus one) and hi (meets).
    while lo.iter().zip(&hi).any(|(l, h)| l < h) {
        let mid: Vec<u32> = lo.iter().zip(&hi).map(|(l, h)| (l + h) / 2).collect();
        // A probe: sizes far too small (a day of growing queues, the slowest runs there
        // are) stop as soon as every pool is sure to miss.
        let probe = engine::Probe::new(plan, target_p95_ms);
        let r = engine::Engine::new(config, plan, &sizes(&mid))?
            .probe(probe)
            .run_probe()?;
        runs += 1;
        for (i, n) in names.iter().enumerate() {
            if lo[i] >= hi[i] {
                continue;
            }
            if r.as_ref().is_some_and(|r| meets(r, n)) {
                hi[i] = mid[i];
            } else {
                lo[i] = mid[i] + 1;
            }
        }
        if let Some(r) = r {
            last = (mid, r);
        }
    }
    let mut report = if last.0 == hi {
        last.1
    } else {
        runs += 1;
        run(config, plan, &sizes(&hi))?
    };
    // Each pool's size was found in runs where the other pools had other sizes, and pools
    // are not quite independent (a tick places at most one batch, shared by every pool): a
    // pool that misses with its neighbours at their final sizes grows until it meets.
    for _ in 0..STATIC_REPAIRS {
        let missing: Vec<usize> = (0..names.len())
            .filter(|i| !meets(&report, &names[*i]) && hi[*i] < STATIC_MAX)
            .collect();
        if missing.is_empty() {
            break;
        }
        for i in missing {
            hi[i] = (hi[i] + (hi[i] / 50).max(1)).min(STATIC_MAX);
        }
        runs += 1;
        report = run(config, plan, &sizes(&hi))?;
    }
    let met = names.iter().all(|n| meets(&report, n));
    Ok(StaticSizing {
        runners: plan.pools.iter().cloned().zip(hi).collect(),
        report,
        met,
        runs,
    })
}
