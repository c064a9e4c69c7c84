//! Warm runner pools in the agent: per pool with an autoscaling policy, the runners
//! ([`RunnerPool`]), the policy's memory ([`Autoscaler`]) and the assignments waiting for a
//! runner. The agent's loop owns them and does the backend calls; this file holds the
//! bookkeeping, which never awaits.
//!
//! A pool without a policy (or on a backend without warm runners) works as before: the
//! backend starts a runner per attempt when the assignment arrives.

use std::collections::{BTreeMap, HashMap, VecDeque};

use flotilla_core::autoscale::{Autoscaler, Change, PoolLoad, RunnerId, RunnerPool};
use flotilla_core::ids::JobId;
use flotilla_core::runner::Assignment;

/// One warm pool.
#[derive(Debug)]
pub(crate) struct WarmPool {
    pub(crate) runners: RunnerPool,
    scaler: Autoscaler,
    /// Assignments waiting for a runner, oldest first.
    waiting: VecDeque<Assignment>,
    /// The runner each started job runs on.
    by_job: HashMap<JobId, RunnerId>,
}

/// What the agent must do for one pool after a decision.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Work {
    /// Runners to create (already `Starting` in the pool).
    pub(crate) prepare: Vec<RunnerId>,
    /// Assignments to start, each on its runner (already `Busy` in the pool).
    pub(crate) start: Vec<(RunnerId, Assignment)>,
}

impl WarmPool {
    pub(crate) fn new(scaler: Autoscaler) -> Self {
        WarmPool {
            runners: RunnerPool::new(),
            scaler,
            waiting: VecDeque::new(),
            by_job: HashMap::new(),
        }
    }

    /// The pool's load now.
    pub(crate) fn load(&self) -> PoolLoad {
        self.runners.load(self.waiting.len() as u32)
    }

    /// Queues an assignment for the next idle runner.
    pub(crate) fn enqueue(&mut self, a: Assignment) {
        self.waiting.push_back(a);
    }

    /// Takes a waiting assignment out of the queue (revoked or cancelled before it started).
    pub(crate) fn dequeue(&mut self, job: JobId) -> Option<Assignment> {
        let at = self.waiting.iter().position(|a| a.job == job)?;
        self.waiting.remove(at)
    }

    /// Hands waiting assignments to idle runners, oldest first.
    pub(crate) fn dispatch(&mut self) -> Vec<(RunnerId, Assignment)> {
        let mut out = Vec::new();
        while let Some(a) = self.waiting.front() {
            let Some(r) = self.runners.assign(a.job) else {
                break;
            };
            let a = self.waiting.pop_front().expect("front exists");
            self.by_job.insert(a.job, r);
            out.push((r, a));
        }
        out
    }

    /// The job's attempt ended (or never started on its runner): its one-shot runner is gone.
    pub(crate) fn job_ended(&mut self, job: JobId) -> Option<RunnerId> {
        let r = self.by_job.remove(&job)?;
        self.runners.finished(r);
        Some(r)
    }

    /// Asks the policy, then starts runners or fences idle ones (phase one). Returns the
    /// runners to prepare and what can start.
    pub(crate) fn decide(&mut self, now_ms: u64) -> Work {
        let decision = self.scaler.decide(now_ms, self.load());
        let mut work = Work::default();
        match decision.change {
            Change::Add(n) => {
                for _ in 0..n {
                    work.prepare.push(self.runners.start());
                }
            }
            Change::Retire(n) => {
                self.runners.fence_idle(n);
            }
            Change::Hold => {}
        }
        work.start = self.dispatch();
        work
    }

    /// Fenced runners waiting for phase two.
    pub(crate) fn fenced(&self) -> Vec<RunnerId> {
        self.runners.fenced().collect()
    }
}

/// Every warm pool, by name.
pub(crate) type WarmPools = BTreeMap<String, WarmPool>;

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::autoscale::{Policy, Retire};
    use flotilla_core::ids::{Attempt, BuildId, Fence, ProjectId};
    use flotilla_core::pipeline::Resources;

    fn assignment(job: u64) -> Assignment {
        Assignment {
            job: JobId(job),
            build: BuildId(1),
            project: ProjectId::new("web").unwrap(),
            attempt: Attempt::FIRST,
            fence: Fence(job),
            name: format!("j{job}"),
            image: "debian:12".into(),
            steps: Vec::new(),
            env: Vec::new(),
            timeout_secs: 60,
            resources: Resources {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
            },
            pool: "default".into(),
            checkout: None,
        }
    }

    fn pool(min: u32) -> WarmPool {
        WarmPool::new(Autoscaler::new(Policy {
            min,
            max: 4,
            floor: None,
            scale_down_delay_ms: 1_000,
            ..Policy::default()
        }))
    }

    #[test]
    fn the_minimum_is_prepared_and_a_queued_job_takes_the_first_ready_runner() {
        let mut p = pool(2);
        let work = p.decide(0);
        assert_eq!(work.prepare.len(), 2);
        assert!(work.start.is_empty());
        p.enqueue(assignment(7));
        assert!(p.dispatch().is_empty(), "nothing is ready yet");
        p.runners.ready(work.prepare[1]);
        let started = p.dispatch();
        assert_eq!(started.len(), 1);
        assert_eq!(
            (started[0].0, started[0].1.job),
            (work.prepare[1], JobId(7))
        );
        assert_eq!(p.load().busy, 1);
        assert_eq!(p.job_ended(JobId(7)), Some(work.prepare[1]));
        assert_eq!(p.load().busy, 0);
    }

    #[test]
    fn surplus_idle_runners_are_fenced_after_the_delay_and_busy_ones_never() {
        let mut p = WarmPool::new(Autoscaler::new(Policy {
            min: 0,
            max: 4,
            target_utilisation: 1.0,
            floor: None,
            scale_down_delay_ms: 1_000,
            ..Policy::default()
        }));
        for j in 1..=3 {
            p.enqueue(assignment(j));
        }
        let work = p.decide(0);
        assert_eq!(work.prepare.len(), 3);
        for r in &work.prepare {
            p.runners.ready(*r);
        }
        assert_eq!(p.dispatch().len(), 3);
        // One more runner than needed once two jobs are done and one still runs.
        let extra = p.runners.start();
        p.runners.ready(extra);
        p.job_ended(JobId(1));
        p.job_ended(JobId(2));
        p.decide(500);
        assert!(p.fenced().is_empty(), "not before the scale-down delay");
        p.decide(1_600);
        assert_eq!(p.fenced(), vec![extra], "only the idle one, never job 3's");
        assert_eq!(p.runners.retire(extra, None), Retire::Deleted);
        assert_eq!(p.load().busy, 1);
        assert_eq!(p.load().total(), 1);
    }
}
