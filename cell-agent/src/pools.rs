//! Warm runner pools in the agent: per pool with an autoscaling policy, the runners
//! ([`RunnerPool`]), the policy's memory ([`Autoscaler`]) and the assignments waiting for a
//! runner. The agent's loop owns them and does the backend calls; this file holds the
//! bookkeeping, which never awaits.
//!
//! A pool without a policy (or on a backend without warm runners) works as before: the
//! backend starts a runner per attempt when the assignment arrives.

use std::collections::{BTreeMap, HashMap, VecDeque};

use std::path::Path;

use flotilla_core::autoscale::{Autoscaler, Change, DemandHistory, PoolLoad, RunnerId, RunnerPool};
use flotilla_core::ids::{Fence, JobId};
use flotilla_core::runner::Assignment;

/// One warm pool.
#[derive(Debug)]
pub(crate) struct WarmPool {
    pub(crate) runners: RunnerPool,
    scaler: Autoscaler,
    /// Assignments waiting for a runner, oldest first.
    waiting: VecDeque<Assignment>,
    /// The runner each started attempt runs on.
    by_job: HashMap<(JobId, Fence), RunnerId>,
    /// Runner preparations that failed in a row, and until when no new ones are tried.
    failures: u32,
    backoff_until_ms: u64,
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
            failures: 0,
            backoff_until_ms: 0,
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
    pub(crate) fn dequeue(&mut self, job: JobId, fence: Fence) -> Option<Assignment> {
        let at = self
            .waiting
            .iter()
            .position(|a| a.job == job && a.fence == fence)?;
        self.waiting.remove(at)
    }

    /// A runner could not be prepared: it is dropped, new ones wait a while (doubling to a
    /// minute), and the waiting jobs no runner is coming for are handed back (oldest first)
    /// so the federator can place them elsewhere.
    pub(crate) fn prepare_failed(&mut self, runner: RunnerId, now_ms: u64) -> Vec<Assignment> {
        self.runners.lost(runner);
        self.failures = self.failures.saturating_add(1);
        let wait = 1_000u64 << self.failures.min(6);
        self.backoff_until_ms = now_ms + wait.min(60_000);
        let load = self.load();
        let coming = (load.idle + load.starting) as usize;
        let stranded = self.waiting.len().saturating_sub(coming);
        self.waiting.drain(..stranded).collect()
    }

    /// A runner was prepared: failures are forgotten.
    pub(crate) fn prepared(&mut self, runner: RunnerId) {
        if self.runners.ready(runner) {
            self.failures = 0;
            self.backoff_until_ms = 0;
        }
    }

    /// A runner the backend found running `job`'s attempt under `fence` while it was being
    /// retired: kept, and released when that attempt ends.
    pub(crate) fn kept(&mut self, runner: RunnerId, job: JobId, fence: Fence) {
        self.by_job.insert((job, fence), runner);
    }

    /// Hands waiting assignments to idle runners, oldest first.
    pub(crate) fn dispatch(&mut self) -> Vec<(RunnerId, Assignment)> {
        let mut out = Vec::new();
        while let Some(a) = self.waiting.front() {
            let Some(r) = self.runners.assign(a.job) else {
                break;
            };
            let a = self.waiting.pop_front().expect("front exists");
            self.by_job.insert((a.job, a.fence), r);
            out.push((r, a));
        }
        out
    }

    /// Runner `runner` turned out dead when `a` was handed to it: it is dropped, and `a`
    /// goes back to the front of the queue for the next runner.
    pub(crate) fn runner_died_with(&mut self, runner: RunnerId, a: Assignment) {
        self.by_job.remove(&(a.job, a.fence));
        self.runners.lost(runner);
        self.waiting.push_front(a);
    }

    /// The attempt of `job` under `fence` ended (or never started on its runner): its
    /// one-shot runner is gone.
    pub(crate) fn job_ended(&mut self, job: JobId, fence: Fence) -> Option<RunnerId> {
        let r = self.by_job.remove(&(job, fence))?;
        self.runners.finished(r);
        Some(r)
    }

    /// Asks the policy, then starts runners or fences idle ones (phase one). Returns the
    /// runners to prepare and what can start.
    pub(crate) fn decide(&mut self, now_ms: u64) -> Work {
        let mut work = Work::default();
        if now_ms < self.backoff_until_ms {
            // Preparing runners keeps failing: the policy is not asked (it would take a
            // scale-up that does not happen for one, and cool down).
            work.start = self.dispatch();
            return work;
        }
        let decision = self.scaler.decide(now_ms, self.load());
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

/// Writes the warm pools' demand histories (what their time-of-day floors learnt) to
/// `path`, atomically (a temporary file renamed over it), so a restarted agent does not
/// start learning again — a weekly floor needs weeks.
pub(crate) fn save_histories(path: &Path, pools: &WarmPools) -> std::io::Result<()> {
    let histories: BTreeMap<&str, &DemandHistory> = pools
        .iter()
        .filter_map(|(name, p)| p.scaler.history().map(|h| (name.as_str(), h)))
        .collect();
    if histories.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec(&histories).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// Reads what [`save_histories`] wrote into the pools whose floors learn the same way;
/// returns the pools restored. A missing file is no history; an unreadable one is reported
/// and ignored (the floor learns again).
pub(crate) fn load_histories(path: &Path, pools: &mut WarmPools) -> Result<Vec<String>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let histories: BTreeMap<String, DemandHistory> =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut restored = Vec::new();
    for (name, history) in histories {
        if let Some(pool) = pools.get_mut(&name)
            && pool.scaler.restore_history(history)
        {
            restored.push(name);
        }
    }
    Ok(restored)
}

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
            secrets: Vec::new(),
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
        assert_eq!(p.job_ended(JobId(7), Fence(8)), None, "another attempt");
        assert_eq!(p.job_ended(JobId(7), Fence(7)), Some(work.prepare[1]));
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
        p.job_ended(JobId(1), Fence(1));
        p.job_ended(JobId(2), Fence(2));
        p.decide(500);
        assert!(p.fenced().is_empty(), "not before the scale-down delay");
        p.decide(1_600);
        assert_eq!(p.fenced(), vec![extra], "only the idle one, never job 3's");
        assert_eq!(p.runners.retire(extra, None), Retire::Deleted);
        assert_eq!(p.load().busy, 1);
        assert_eq!(p.load().total(), 1);
    }

    #[test]
    fn a_failed_preparation_hands_back_the_jobs_no_runner_is_coming_for_and_backs_off() {
        let mut p = pool(0);
        for j in 1..=3 {
            p.enqueue(assignment(j));
        }
        let work = p.decide(0);
        assert_eq!(work.prepare.len(), 4);
        // One of four fails: three are still coming for three jobs.
        assert!(p.prepare_failed(work.prepare[0], 10).is_empty());
        // Each further failure hands back the oldest job no runner is coming for.
        let back = p.prepare_failed(work.prepare[1], 20);
        assert_eq!(back.iter().map(|a| a.job).collect::<Vec<_>>(), [JobId(1)]);
        let back = p.prepare_failed(work.prepare[2], 30);
        assert_eq!(back.iter().map(|a| a.job).collect::<Vec<_>>(), [JobId(2)]);
        // No new runners during the back-off (8 s after the third failure).
        assert!(p.decide(5_000).prepare.is_empty());
        p.prepared(work.prepare[3]);
        assert_eq!(p.dispatch().len(), 1);
        assert!(
            !p.decide(5_100).prepare.is_empty(),
            "a success ends the back-off"
        );
    }

    #[test]
    fn what_a_floor_learnt_survives_a_restart_of_the_agent() {
        use flotilla_core::autoscale::{FloorPolicy, Period};
        const HOUR: u64 = 3_600_000;
        let floored = |period| Policy {
            min: 0,
            max: 100,
            floor: Some(FloorPolicy {
                period,
                lookahead_ms: 0,
                ..FloorPolicy::default()
            }),
            ..Policy::default()
        };
        let mut pools = WarmPools::new();
        pools.insert(
            "default".into(),
            WarmPool::new(Autoscaler::new(floored(Period::Day))),
        );
        // 40 jobs waiting all through nine o'clock.
        let p = pools.get_mut("default").unwrap();
        for j in 1..=40 {
            p.enqueue(assignment(j));
        }
        p.decide(9 * HOUR);
        p.waiting.clear();
        p.decide(10 * HOUR);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("demand-history.json");
        save_histories(&file, &pools).unwrap();

        // A new agent: its pool knows nothing until it reads the file.
        let fresh = || {
            let mut pools = WarmPools::new();
            pools.insert(
                "default".into(),
                WarmPool::new(Autoscaler::new(floored(Period::Day))),
            );
            pools.insert(
                "other".into(),
                WarmPool::new(Autoscaler::new(floored(Period::Day))),
            );
            pools
        };
        let mut again = fresh();
        let tomorrow_nine = 33 * HOUR;
        let before = again.get_mut("default").unwrap().decide(tomorrow_nine);
        assert!(before.prepare.is_empty(), "nothing learnt yet");
        let mut again = fresh();
        assert_eq!(load_histories(&file, &mut again).unwrap(), ["default"]);
        let after = again.get_mut("default").unwrap().decide(tomorrow_nine);
        assert_eq!(after.prepare.len(), 40, "yesterday's nine o'clock, ready");
        // A floor that learns per week does not take a daily history.
        let mut weekly = WarmPools::new();
        weekly.insert(
            "default".into(),
            WarmPool::new(Autoscaler::new(floored(Period::Week))),
        );
        assert!(load_histories(&file, &mut weekly).unwrap().is_empty());
        // No file, no history; a damaged one is an error the agent reports.
        assert!(
            load_histories(&dir.path().join("none"), &mut fresh())
                .unwrap()
                .is_empty()
        );
        std::fs::write(&file, "{").unwrap();
        assert!(
            load_histories(&file, &mut fresh())
                .unwrap_err()
                .contains("demand-history.json")
        );
    }
}
