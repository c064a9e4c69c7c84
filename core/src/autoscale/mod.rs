//! Runner pools and their autoscaling (ARCHITECTURE §8, the total-workload method of
//! `../shared/seeds/autoscaling-build-agents.txt`), as pure functions the cell agent and
//! `flotilla simulate` both run.
//!
//! - [`PoolLoad`]: what a pool is doing: busy, idle, starting and fenced runners, and the
//!   runnable jobs waiting for one. Its [total workload](PoolLoad::workload) is
//!   `W = (busy + queued) / total`.
//! - [`Policy`] and [`Autoscaler`]: how many runners a pool should have. The demand
//!   (`busy + queued`) over a target utilisation, kept within `min`/`max`, raised to a
//!   *time-of-day floor* learnt from the demand of the same hour on earlier days or weeks
//!   ([`DemandHistory`]), added at most `scale_up_step` at a time with a cooldown, and given
//!   back only after demand stayed lower for `scale_down_delay`.
//! - [`RunnerPool`]: the runners of one pool and the two-phase scale-down: an idle runner is
//!   *fenced* first (nothing can be assigned to it from then on), checked again, and only
//!   then deleted; a runner that took a job in between is kept. A busy runner is never
//!   deleted by scale-down — [`RunnerPool`] makes that impossible to express, not merely
//!   unlikely.
//!
//! Time comes in as milliseconds since the Unix epoch; nothing here reads a clock.

mod floor;
mod policy;
mod pool;

pub use floor::{DemandHistory, FloorPolicy, Period};
pub use policy::{Autoscaler, Change, Decision, Policy, PolicyError, Why};
pub use pool::{Retire, RunnerId, RunnerPool, RunnerState};

/// What one pool is doing at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolLoad {
    /// Runners running a job.
    pub busy: u32,
    /// Started runners waiting for a job (the warm pool).
    pub idle: u32,
    /// Runners being created (pod scheduled, image pulling, sandbox being prepared).
    pub starting: u32,
    /// Idle runners fenced for deletion: no longer counted as capacity.
    pub fenced: u32,
    /// Runnable jobs of the pool waiting for a runner (all their `needs` finished).
    pub queued: u32,
}

impl PoolLoad {
    /// Runners that are or will soon be able to run a job: busy, idle and starting (fenced
    /// runners are on their way out).
    pub fn total(&self) -> u32 {
        self.busy + self.idle + self.starting
    }

    /// What the pool is asked to run now: busy runners plus runnable queued jobs.
    pub fn demand(&self) -> u32 {
        self.busy + self.queued
    }

    /// The total workload `W = (busy + queued) / total`; `None` for a pool with no runners
    /// (where any demand is an infinite workload).
    pub fn workload(&self) -> Option<f64> {
        let total = self.total();
        (total > 0).then(|| f64::from(self.demand()) / f64::from(total))
    }
}

const HOUR_MS: u64 = 3_600_000;
