//! The runners of one pool, and the two-phase scale-down.
//!
//! A runner is one-shot: it starts, waits idle (warm) for exactly one job, runs it and is
//! gone. Scale-down takes idle runners away in two phases, because the backend's view of a
//! runner can lag the pool's (a pod handed a job a moment ago):
//!
//! 1. [`RunnerPool::fence`] an idle runner: from then on [`RunnerPool::assign`] never picks
//!    it. A runner that is not idle at that moment is not fenced.
//! 2. Check with the backend that it is still idle, then [`RunnerPool::retire`] it: only a
//!    fenced runner the backend confirms idle is removed; one that took a job in between
//!    (the check says busy) becomes busy and is kept.
//!
//! There is no way to remove a busy runner through scale-down: `retire` refuses anything but
//! a fenced, confirmed-idle runner. Busy runners leave only by [`RunnerPool::finished`] or
//! [`RunnerPool::lost`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::PoolLoad;
use crate::ids::JobId;

/// A runner, numbered by its pool in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunnerId(pub u64);

impl std::fmt::Display for RunnerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// Where a runner is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunnerState {
    /// Being created.
    Starting,
    /// Started, waiting for one job.
    Idle,
    /// Idle and chosen for deletion: takes no job.
    Fenced,
    /// Running this job.
    Busy(JobId),
}

/// What [`RunnerPool::retire`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// The runner was fenced and idle: it is gone from the pool; delete it.
    Deleted,
    /// It took a job in between (the backend said so): kept, now busy with it.
    KeptBusy(JobId),
    /// It was not fenced (never, or no longer): nothing happened.
    NotFenced,
}

/// The runners of one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerPool {
    next: u64,
    runners: BTreeMap<RunnerId, RunnerState>,
}

impl RunnerPool {
    /// An empty pool.
    pub fn new() -> Self {
        RunnerPool::default()
    }

    /// A new runner, starting.
    pub fn start(&mut self) -> RunnerId {
        self.next += 1;
        let id = RunnerId(self.next);
        self.runners.insert(id, RunnerState::Starting);
        id
    }

    /// A starting runner is up: it waits for a job. False if it is not starting.
    pub fn ready(&mut self, id: RunnerId) -> bool {
        match self.runners.get_mut(&id) {
            Some(s @ RunnerState::Starting) => {
                *s = RunnerState::Idle;
                true
            }
            _ => false,
        }
    }

    /// Gives `job` to the oldest idle runner (the first created) that is not fenced.
    pub fn assign(&mut self, job: JobId) -> Option<RunnerId> {
        let (id, s) = self
            .runners
            .iter_mut()
            .find(|(_, s)| **s == RunnerState::Idle)?;
        *s = RunnerState::Busy(job);
        Some(*id)
    }

    /// Phase one: fences an idle runner. False (and nothing changes) unless it is idle.
    pub fn fence(&mut self, id: RunnerId) -> bool {
        match self.runners.get_mut(&id) {
            Some(s @ RunnerState::Idle) => {
                *s = RunnerState::Fenced;
                true
            }
            _ => false,
        }
    }

    /// Phase one for `n` runners: fences up to `n` idle runners, the most recently created
    /// first (the oldest stay, as they are the next to be assigned).
    pub fn fence_idle(&mut self, n: u32) -> Vec<RunnerId> {
        let ids: Vec<RunnerId> = self
            .runners
            .iter()
            .rev()
            .filter(|(_, s)| **s == RunnerState::Idle)
            .take(n as usize)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.fence(*id);
        }
        ids
    }

    /// Phase two: `busy_with` is what the backend says the fenced runner is doing (`None`:
    /// idle). An idle fenced runner is removed ([`Retire::Deleted`]: delete it now); one the
    /// backend found running a job is kept as busy with it.
    pub fn retire(&mut self, id: RunnerId, busy_with: Option<JobId>) -> Retire {
        match (self.runners.get_mut(&id), busy_with) {
            (Some(RunnerState::Fenced), None) => {
                self.runners.remove(&id);
                Retire::Deleted
            }
            (Some(s @ RunnerState::Fenced), Some(job)) => {
                *s = RunnerState::Busy(job);
                Retire::KeptBusy(job)
            }
            _ => Retire::NotFenced,
        }
    }

    /// The fenced runners: phase one done, phase two pending. A runner whose deletion failed
    /// stays fenced and is retired again from here (unfencing it would race with a deletion
    /// that may still happen).
    pub fn fenced(&self) -> impl Iterator<Item = RunnerId> + '_ {
        self.runners
            .iter()
            .filter(|(_, s)| **s == RunnerState::Fenced)
            .map(|(id, _)| *id)
    }

    /// A busy runner finished its job: one-shot, it is gone. Returns the job, or `None` when
    /// the runner was not busy.
    pub fn finished(&mut self, id: RunnerId) -> Option<JobId> {
        match self.runners.get(&id) {
            Some(RunnerState::Busy(job)) => {
                let job = *job;
                self.runners.remove(&id);
                Some(job)
            }
            _ => None,
        }
    }

    /// A runner died or was deleted by someone else, in whatever state.
    pub fn lost(&mut self, id: RunnerId) -> Option<RunnerState> {
        self.runners.remove(&id)
    }

    /// A runner's state.
    pub fn state(&self, id: RunnerId) -> Option<RunnerState> {
        self.runners.get(&id).copied()
    }

    /// Every runner, in creation order.
    pub fn runners(&self) -> impl Iterator<Item = (RunnerId, RunnerState)> + '_ {
        self.runners.iter().map(|(id, s)| (*id, *s))
    }

    /// The pool's load, with `queued` runnable jobs waiting for a runner.
    pub fn load(&self, queued: u32) -> PoolLoad {
        let mut load = PoolLoad {
            queued,
            ..PoolLoad::default()
        };
        for s in self.runners.values() {
            match s {
                RunnerState::Starting => load.starting += 1,
                RunnerState::Idle => load.idle += 1,
                RunnerState::Fenced => load.fenced += 1,
                RunnerState::Busy(_) => load.busy += 1,
            }
        }
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_lives_starting_idle_busy_then_gone() {
        let mut p = RunnerPool::new();
        let r = p.start();
        assert_eq!(p.assign(JobId(1)), None, "a starting runner takes no job");
        assert!(p.ready(r));
        assert!(!p.ready(r), "only once");
        assert_eq!(p.assign(JobId(1)), Some(r));
        assert_eq!(p.assign(JobId(2)), None, "one job per runner");
        assert_eq!(p.load(1).busy, 1);
        assert_eq!(p.finished(r), Some(JobId(1)));
        assert_eq!(p.load(0), PoolLoad::default());
    }

    #[test]
    fn scale_down_fences_then_deletes_only_what_is_still_idle() {
        let mut p = RunnerPool::new();
        let [a, b, c] = [p.start(), p.start(), p.start()];
        for r in [a, b, c] {
            p.ready(r);
        }
        assert_eq!(p.assign(JobId(7)), Some(a), "the longest waiting first");
        // Two too many: the newest idle are fenced, the busy one is never a candidate.
        assert_eq!(p.fence_idle(5), vec![c, b]);
        assert!(!p.fence(a), "a busy runner is not fenced");
        assert_eq!(p.assign(JobId(8)), None, "fenced runners take no job");
        // b took a job the pool had not heard of yet: kept.
        assert_eq!(p.retire(b, Some(JobId(9))), Retire::KeptBusy(JobId(9)));
        assert_eq!(p.retire(c, None), Retire::Deleted);
        assert_eq!(p.retire(a, None), Retire::NotFenced, "never a busy runner");
        assert_eq!(p.state(a), Some(RunnerState::Busy(JobId(7))));
        assert_eq!(p.load(0).busy, 2);
    }
}
