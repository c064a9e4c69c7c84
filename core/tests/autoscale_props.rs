//! The two-phase scale-down under any interleaving: an assigner and a scaler act on one
//! [`RunnerPool`] step by step, the way the cell agent's tasks do, while runners start and
//! jobs finish. Whatever the order, no busy runner is ever deleted and no job lands on a
//! fenced runner.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_core::JobId;
use flotilla_core::autoscale::{Retire, RunnerId, RunnerPool, RunnerState};
use proptest::prelude::*;

/// One step of one actor.
#[derive(Debug, Clone)]
enum Step {
    /// A new runner starts.
    Start,
    /// The oldest starting runner is up.
    Ready,
    /// The assigner takes an idle runner for the next job (the pool picks it)…
    Assign,
    /// …and, later, hands assignment `n` of those in flight to the backend.
    Hand(usize),
    /// The backend reports fenced runner `n` running a job the pool never gave it (a claim
    /// from before an agent restart, learnt on recovery).
    BackendClaims(usize),
    /// The scaler fences up to `n` idle runners (phase one).
    Fence(u32),
    /// The scaler checks fenced runner `n` with the backend and retires it (phase two).
    Retire(usize),
    /// Busy runner `n` finishes its job.
    Finish(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Start),
        3 => Just(Step::Ready),
        3 => Just(Step::Assign),
        3 => (0..8usize).prop_map(Step::Hand),
        1 => (0..8usize).prop_map(Step::BackendClaims),
        2 => (1..4u32).prop_map(Step::Fence),
        3 => (0..8usize).prop_map(Step::Retire),
        2 => (0..8usize).prop_map(Step::Finish),
    ]
}

fn pick(ids: Vec<RunnerId>, n: usize) -> Option<RunnerId> {
    (!ids.is_empty()).then(|| ids[n % ids.len()])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn no_busy_runner_is_deleted_and_no_job_lands_on_a_fenced_runner(
        steps in prop::collection::vec(step(), 1..200)
    ) {
        let mut pool = RunnerPool::new();
        // What the backend knows: the job each runner is really running.
        let mut backend: BTreeMap<RunnerId, JobId> = BTreeMap::new();
        let mut deleted: BTreeSet<RunnerId> = BTreeSet::new();
        // Assignments decided by the pool, not yet handed to the backend.
        let mut in_flight: Vec<(RunnerId, JobId)> = Vec::new();
        let mut next_job = 0u64;
        let ids = |pool: &RunnerPool, want: fn(RunnerState) -> bool| -> Vec<RunnerId> {
            pool.runners().filter(|(_, s)| want(*s)).map(|(id, _)| id).collect()
        };
        for step in &steps {
            match step {
                Step::Start => {
                    pool.start();
                }
                Step::Ready => {
                    if let Some(r) = ids(&pool, |s| s == RunnerState::Starting).first() {
                        pool.ready(*r);
                    }
                }
                Step::Assign => {
                    next_job += 1;
                    let fenced_before: Vec<RunnerId> =
                        ids(&pool, |s| s == RunnerState::Fenced);
                    if let Some(r) = pool.assign(JobId(next_job)) {
                        prop_assert!(!fenced_before.contains(&r), "job given to fenced {r}");
                        prop_assert!(!deleted.contains(&r), "job given to deleted {r}");
                        prop_assert!(!backend.contains_key(&r), "{r} given a second job");
                        prop_assert!(
                            in_flight.iter().all(|(f, _)| *f != r),
                            "{r} given a second job"
                        );
                        in_flight.push((r, JobId(next_job)));
                    }
                }
                Step::Hand(n) => {
                    if !in_flight.is_empty() {
                        let (r, job) = in_flight.remove(n % in_flight.len());
                        prop_assert!(!deleted.contains(&r), "{r} deleted before its job arrived");
                        backend.insert(r, job);
                    }
                }
                Step::BackendClaims(n) => {
                    let r = pick(
                        ids(&pool, |s| s == RunnerState::Fenced)
                            .into_iter()
                            .filter(|r| !backend.contains_key(r))
                            .collect(),
                        *n,
                    );
                    if let Some(r) = r {
                        next_job += 1;
                        backend.insert(r, JobId(next_job));
                    }
                }
                Step::Fence(n) => {
                    for r in pool.fence_idle(*n) {
                        prop_assert!(!matches!(pool.state(r), Some(RunnerState::Busy(_))));
                    }
                }
                Step::Retire(n) => {
                    if let Some(r) = pick(pool.fenced().collect(), *n) {
                        // Phase two re-checks with the backend.
                        let busy_with = backend.get(&r).copied();
                        match pool.retire(r, busy_with) {
                            Retire::Deleted => {
                                prop_assert!(busy_with.is_none(), "deleted busy {r}");
                                deleted.insert(r);
                            }
                            Retire::KeptBusy(job) => prop_assert_eq!(Some(job), busy_with),
                            Retire::NotFenced => prop_assert!(false, "{r} was listed fenced"),
                        }
                    }
                }
                Step::Finish(n) => {
                    // Only a runner whose job arrived can finish it.
                    let busy = ids(&pool, |s| matches!(s, RunnerState::Busy(_)))
                        .into_iter()
                        .filter(|r| backend.contains_key(r))
                        .collect();
                    if let Some(r) = pick(busy, *n) {
                        let job = pool.finished(r);
                        prop_assert_eq!(job, backend.remove(&r));
                    }
                }
            }
            // Every runner the backend runs a job on is still in the pool, never deleted.
            for r in backend.keys().chain(in_flight.iter().map(|(r, _)| r)) {
                prop_assert!(!deleted.contains(r), "{r} was deleted while running a job");
                prop_assert!(pool.state(*r).is_some(), "{r} vanished while running a job");
            }
        }
    }
}
