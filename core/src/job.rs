//! The job lifecycle (ARCHITECTURE §6), the failure taxonomy and the retry decision.
//!
//! ```text
//! Pending(needs) → Queued → Leased(cell, attempt, fence, lease) → Running
//!    → Succeeded | Failed(class) | Cancelled | TimedOut
//! ```
//!
//! The legal moves are one table, [`TRANSITIONS`]; [`next_phase`] refuses everything else.
//! [`JobRun`] layers the data on top — attempts, fences, leases, retry budgets — and is what
//! the replicated state machine keeps per job.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, CellId, Fence};

/// Where a job is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Waiting for the jobs it needs.
    Pending,
    /// Runnable, waiting for a cell.
    Queued,
    /// Assigned to a cell under a fence and a lease; the runner is starting.
    Leased,
    /// The runner has started the job's steps.
    Running,
    /// Every step exited 0.
    Succeeded,
    /// Finished unsuccessfully, with a [`FailureClass`], and no retry is left.
    Failed,
    /// Cancelled by a user, a newer build in its concurrency group, or a failed need.
    Cancelled,
    /// Ran longer than its `timeout`.
    TimedOut,
}

impl JobPhase {
    /// Every phase, in lifecycle order.
    pub const ALL: [JobPhase; 8] = [
        JobPhase::Pending,
        JobPhase::Queued,
        JobPhase::Leased,
        JobPhase::Running,
        JobPhase::Succeeded,
        JobPhase::Failed,
        JobPhase::Cancelled,
        JobPhase::TimedOut,
    ];

    /// True once the job has finished, whatever the outcome.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled | JobPhase::TimedOut
        )
    }

    /// The lowercase name used in the API and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "pending",
            JobPhase::Queued => "queued",
            JobPhase::Leased => "leased",
            JobPhase::Running => "running",
            JobPhase::Succeeded => "succeeded",
            JobPhase::Failed => "failed",
            JobPhase::Cancelled => "cancelled",
            JobPhase::TimedOut => "timed_out",
        }
    }
}

impl fmt::Display for JobPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can happen to a job. Data-free: [`JobEvent`] carries the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// Every job it needs has succeeded.
    DepsSatisfied,
    /// The scheduler placed it on a cell.
    Place,
    /// The runner started the steps.
    Start,
    /// The steps finished with exit code 0.
    Succeed,
    /// It failed and will not be retried.
    Fail,
    /// It failed in a way its retry budget covers: back to the queue with a new attempt.
    Requeue,
    /// It ran past its timeout.
    TimeOut,
    /// Someone or something cancelled it.
    Cancel,
    /// A user asked to run a finished, unsuccessful job again.
    Retry,
}

impl Transition {
    /// Every transition.
    pub const ALL: [Transition; 9] = [
        Transition::DepsSatisfied,
        Transition::Place,
        Transition::Start,
        Transition::Succeed,
        Transition::Fail,
        Transition::Requeue,
        Transition::TimeOut,
        Transition::Cancel,
        Transition::Retry,
    ];
}

/// The legal moves: `(from, transition, to)`. Anything not listed is refused.
///
/// Notes on what is *not* here: a job cannot succeed or time out without having started (a
/// `Leased` job's runner must report `Start` first), and a finished job changes only through
/// an explicit user `Retry`, which sends it back to `Pending` so its needs are checked again.
pub const TRANSITIONS: &[(JobPhase, Transition, JobPhase)] = {
    use JobPhase::*;
    use Transition as T;
    &[
        (Pending, T::DepsSatisfied, Queued),
        (Pending, T::Cancel, Cancelled),
        (Queued, T::Place, Leased),
        (Queued, T::Cancel, Cancelled),
        (Leased, T::Start, Running),
        (Leased, T::Fail, Failed),
        (Leased, T::Requeue, Queued),
        (Leased, T::Cancel, Cancelled),
        (Running, T::Succeed, Succeeded),
        (Running, T::Fail, Failed),
        (Running, T::Requeue, Queued),
        (Running, T::TimeOut, TimedOut),
        (Running, T::Cancel, Cancelled),
        (Failed, T::Retry, Pending),
        (TimedOut, T::Retry, Pending),
        (Cancelled, T::Retry, Pending),
    ]
};

/// A move the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} job cannot {transition:?}")]
pub struct IllegalTransition {
    /// The phase the job was in.
    pub from: JobPhase,
    /// What was attempted.
    pub transition: Transition,
}

/// The phase after `transition` from `from`, or why it is not allowed.
pub fn next_phase(from: JobPhase, transition: Transition) -> Result<JobPhase, IllegalTransition> {
    TRANSITIONS
        .iter()
        .find(|(f, t, _)| *f == from && *t == transition)
        .map(|(_, _, to)| *to)
        .ok_or(IllegalTransition { from, transition })
}

/// Why infrastructure, not the job's own code, ended an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InfraReason {
    /// The cell stopped heartbeating and its leases expired.
    CellLost,
    /// The node or kubelet evicted the runner (pressure, preemption, node drain).
    Evicted,
    /// The job's image could not be pulled.
    ImagePull,
    /// The runner died without reporting an exit code, or could not be spawned.
    RunnerCrash,
    /// The lease ran out without a renewal from the cell.
    LeaseExpired,
    /// The cell was drained and the job was still there at the deadline.
    Drained,
}

impl InfraReason {
    /// The name as written in `Infra{…}`.
    pub fn as_str(self) -> &'static str {
        match self {
            InfraReason::CellLost => "CellLost",
            InfraReason::Evicted => "Evicted",
            InfraReason::ImagePull => "ImagePull",
            InfraReason::RunnerCrash => "RunnerCrash",
            InfraReason::LeaseExpired => "LeaseExpired",
            InfraReason::Drained => "Drained",
        }
    }
}

/// Why an attempt did not succeed. This decides whether it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
// Externally tagged (serde's default) because the replicated state is written with postcard,
// which cannot read internally tagged enums; the API renders its own JSON shape.
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The platform failed the job; retried automatically up to the infra budget.
    Infra {
        /// What failed.
        reason: InfraReason,
    },
    /// A step exited non-zero; retried only if the job's `retry.test` asks for it.
    Test {
        /// The exit code of the failing step.
        exit_code: i32,
    },
    /// The job ran longer than its `timeout`; never retried.
    Timeout,
    /// The job was cancelled; never retried.
    Cancelled,
    /// The job's configuration is unusable (bad image reference, missing secret…); never
    /// retried, since running it again cannot help.
    Config,
}

impl FailureClass {
    /// A bounded label for metrics: `infra`, `test`, `timeout`, `cancelled` or `config`.
    pub fn kind(self) -> &'static str {
        match self {
            FailureClass::Infra { .. } => "infra",
            FailureClass::Test { .. } => "test",
            FailureClass::Timeout => "timeout",
            FailureClass::Cancelled => "cancelled",
            FailureClass::Config => "config",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureClass::Infra { reason } => write!(f, "Infra{{{}}}", reason.as_str()),
            FailureClass::Test { exit_code } => write!(f, "Test{{{exit_code}}}"),
            FailureClass::Timeout => f.write_str("Timeout"),
            FailureClass::Cancelled => f.write_str("Cancelled"),
            FailureClass::Config => f.write_str("Config"),
        }
    }
}

/// How many retries a job allows per failure class (`retry: {infra, test}` in the pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after infrastructure failures.
    pub infra: u32,
    /// Retries after a step exits non-zero.
    pub test: u32,
}

impl RetryPolicy {
    /// The most retries a pipeline may ask for, per class. A job that needs more is flaky in a
    /// way retries will not fix, and unbounded retries can hold a pool hostage.
    pub const MAX_PER_CLASS: u32 = 10;
}

impl Default for RetryPolicy {
    /// Infra failures are the platform's fault, so two are forgiven by default; a failing test
    /// is the code's, so it is not retried unless the pipeline asks.
    fn default() -> Self {
        Self { infra: 2, test: 0 }
    }
}

/// Retries already spent, per class. Kept separately so a flaky test cannot use up the budget
/// that protects the job from a lost cell, and the other way round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RetriesUsed {
    /// Infra retries already spent.
    pub infra: u32,
    /// Test retries already spent.
    pub test: u32,
}

/// Whether an attempt that failed with `class` is retried, given the retries already `used`
/// and the job's `policy`. `Timeout`, `Cancelled` and `Config` never are. A drain always is,
/// and costs no budget: an operator taking a cell out of service must not fail anyone's job.
pub fn should_retry(class: FailureClass, used: RetriesUsed, policy: RetryPolicy) -> bool {
    match class {
        FailureClass::Infra {
            reason: InfraReason::Drained,
        } => true,
        FailureClass::Infra { .. } => used.infra < policy.infra,
        FailureClass::Test { .. } => used.test < policy.test,
        FailureClass::Timeout | FailureClass::Cancelled | FailureClass::Config => false,
    }
}

/// How an attempt ended, as reported by its runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step exited 0.
    Succeeded,
    /// The attempt failed for this reason.
    Failed(FailureClass),
}

/// Something that happened to a job, with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// Every job it needs has succeeded.
    DepsSatisfied,
    /// Placed on `cell` by the `PlaceJobs` entry at index `fence`.
    Placed {
        /// The chosen cell.
        cell: CellId,
        /// The placement's fence; must be newer than any earlier one of this job.
        fence: Fence,
        /// When the lease runs out unless renewed (milliseconds since the Unix epoch, stamped
        /// by the leader).
        lease_expires_at_ms: u64,
    },
    /// The runner reports the steps started.
    Started {
        /// The fence the runner was given.
        fence: Fence,
    },
    /// The runner reports the attempt ended.
    Finished {
        /// The fence the runner was given.
        fence: Fence,
        /// How it ended.
        outcome: Outcome,
    },
    /// The federator gave up on the attempt's cell (lost, lease expired, drained).
    LeaseLost {
        /// Why.
        reason: InfraReason,
    },
    /// Cancel the job.
    Cancel,
    /// A user asks to run a finished, unsuccessful job again.
    Retry,
}

/// Why a [`JobEvent`] was refused. A refused event changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The lifecycle does not allow this move.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The event carries a fence other than the job's current one: it comes from a previous
    /// attempt (a cell that was presumed lost, a drained runner…) and must be ignored. A fence
    /// from the future cannot come from a legitimate runner either and is refused the same way.
    #[error("fence {got} is not the job's current fence {current}")]
    StaleFence {
        /// The fence on the event.
        got: Fence,
        /// The job's current fence.
        current: Fence,
    },
    /// A placement must carry a fence newer than every earlier placement of the job.
    #[error("placement fence {got} is not newer than the job's last fence {last}")]
    FenceNotIncreasing {
        /// The fence on the placement.
        got: Fence,
        /// The newest fence the job has had.
        last: Fence,
    },
}

/// One job's lifecycle with its data: what the replicated state keeps per job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRun {
    phase: JobPhase,
    attempt: Attempt,
    /// The newest fence the job has been placed under; kept after the attempt ends so late
    /// messages from that attempt are still recognised as stale.
    fence: Option<Fence>,
    cell: Option<CellId>,
    lease_expires_at_ms: Option<u64>,
    failure: Option<FailureClass>,
    retries: RetriesUsed,
    policy: RetryPolicy,
}

impl JobRun {
    /// A new job waiting for its needs, with the pipeline's retry policy.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            phase: JobPhase::Pending,
            attempt: Attempt::FIRST,
            fence: None,
            cell: None,
            lease_expires_at_ms: None,
            failure: None,
            retries: RetriesUsed::default(),
            policy,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> JobPhase {
        self.phase
    }

    /// The current attempt (1 until the first retry).
    pub fn attempt(&self) -> Attempt {
        self.attempt
    }

    /// The newest placement fence, if the job was ever placed.
    pub fn fence(&self) -> Option<Fence> {
        self.fence
    }

    /// The cell holding the current attempt, while leased or running.
    pub fn cell(&self) -> Option<&CellId> {
        self.cell.as_ref()
    }

    /// When the current lease runs out, while leased or running.
    pub fn lease_expires_at_ms(&self) -> Option<u64> {
        self.lease_expires_at_ms
    }

    /// Why the last attempt failed, if it did.
    pub fn failure(&self) -> Option<FailureClass> {
        self.failure
    }

    /// Retries spent so far.
    pub fn retries(&self) -> RetriesUsed {
        self.retries
    }

    /// Renews the lease of a leased or running job (a heartbeat from its cell).
    pub fn renew_lease(&mut self, expires_at_ms: u64) {
        if matches!(self.phase, JobPhase::Leased | JobPhase::Running) {
            self.lease_expires_at_ms = Some(expires_at_ms);
        }
    }

    /// Applies `event`, returning the new phase. On error nothing changes.
    pub fn apply(&mut self, event: JobEvent) -> Result<JobPhase, JobError> {
        match event {
            JobEvent::DepsSatisfied => self.go(Transition::DepsSatisfied),
            JobEvent::Placed {
                cell,
                fence,
                lease_expires_at_ms,
            } => {
                if let Some(last) = self.fence.filter(|last| fence <= *last) {
                    return Err(JobError::FenceNotIncreasing { got: fence, last });
                }
                let phase = self.go(Transition::Place)?;
                self.fence = Some(fence);
                self.cell = Some(cell);
                self.lease_expires_at_ms = Some(lease_expires_at_ms);
                Ok(phase)
            }
            JobEvent::Started { fence } => {
                self.check_fence(fence)?;
                self.go(Transition::Start)
            }
            JobEvent::Finished { fence, outcome } => {
                self.check_fence(fence)?;
                match outcome {
                    Outcome::Succeeded => self.go(Transition::Succeed),
                    Outcome::Failed(class) => self.fail(class),
                }
            }
            JobEvent::LeaseLost { reason } => {
                // Only an attempt that is out on a cell can lose its lease.
                if !matches!(self.phase, JobPhase::Leased | JobPhase::Running) {
                    return Err(IllegalTransition {
                        from: self.phase,
                        transition: Transition::Requeue,
                    }
                    .into());
                }
                self.fail(FailureClass::Infra { reason })
            }
            JobEvent::Cancel => {
                let phase = self.go(Transition::Cancel)?;
                self.failure = Some(FailureClass::Cancelled);
                Ok(phase)
            }
            JobEvent::Retry => {
                let phase = self.go(Transition::Retry)?;
                self.attempt = self.attempt.next();
                self.failure = None;
                Ok(phase)
            }
        }
    }

    /// Routes a failure: timeouts and cancellations have their own phases; otherwise the
    /// retry budget decides between `Requeue` (new attempt) and `Fail`.
    fn fail(&mut self, class: FailureClass) -> Result<JobPhase, JobError> {
        let transition = match class {
            FailureClass::Timeout => Transition::TimeOut,
            FailureClass::Cancelled => Transition::Cancel,
            _ if should_retry(class, self.retries, self.policy) => Transition::Requeue,
            _ => Transition::Fail,
        };
        let phase = self.go(transition)?;
        self.failure = Some(class);
        if transition == Transition::Requeue {
            match class {
                FailureClass::Infra {
                    reason: InfraReason::Drained,
                } => {}
                FailureClass::Infra { .. } => self.retries.infra += 1,
                _ => self.retries.test += 1,
            }
            self.attempt = self.attempt.next();
        }
        Ok(phase)
    }

    fn check_fence(&self, got: Fence) -> Result<(), JobError> {
        match self.fence {
            // The attempt under this fence was taken back (its cell was lost, or a user retried
            // the job) and the job waits for a new placement: whatever its old runner says is
            // stale, even though no newer fence exists yet.
            Some(current)
                if got == current && matches!(self.phase, JobPhase::Pending | JobPhase::Queued) =>
            {
                Err(JobError::StaleFence { got, current })
            }
            Some(current) if got == current => Ok(()),
            Some(current) => Err(JobError::StaleFence { got, current }),
            // Never placed: no runner can hold a fence for this job.
            None => Err(IllegalTransition {
                from: self.phase,
                transition: Transition::Start,
            }
            .into()),
        }
    }

    fn go(&mut self, transition: Transition) -> Result<JobPhase, JobError> {
        let to = next_phase(self.phase, transition)?;
        self.phase = to;
        if !matches!(to, JobPhase::Leased | JobPhase::Running) {
            self.cell = None;
            self.lease_expires_at_ms = None;
        }
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cell(name: &str) -> CellId {
        CellId::new(name).unwrap()
    }

    fn placed(fence: u64) -> JobEvent {
        JobEvent::Placed {
            cell: cell("c1"),
            fence: Fence(fence),
            lease_expires_at_ms: 10_000,
        }
    }

    fn run_to_running(job: &mut JobRun, fence: u64) {
        job.apply(placed(fence)).unwrap();
        job.apply(JobEvent::Started {
            fence: Fence(fence),
        })
        .unwrap();
    }

    #[test]
    fn a_report_from_an_attempt_taken_back_is_stale_before_any_new_placement() {
        let mut job = JobRun::new(RetryPolicy::default());
        job.apply(JobEvent::DepsSatisfied).unwrap();
        run_to_running(&mut job, 5);
        job.apply(JobEvent::LeaseLost {
            reason: InfraReason::CellLost,
        })
        .unwrap();
        // The old runner says it was cancelled or succeeded: neither may touch the queued job.
        for outcome in [Outcome::Failed(FailureClass::Cancelled), Outcome::Succeeded] {
            let late = JobEvent::Finished {
                fence: Fence(5),
                outcome,
            };
            assert_eq!(
                job.apply(late),
                Err(JobError::StaleFence {
                    got: Fence(5),
                    current: Fence(5)
                })
            );
        }
        assert_eq!(job.phase(), JobPhase::Queued);
    }

    #[test]
    fn a_job_walks_the_happy_path() {
        let mut job = JobRun::new(RetryPolicy::default());
        assert_eq!(job.apply(JobEvent::DepsSatisfied), Ok(JobPhase::Queued));
        run_to_running(&mut job, 5);
        assert_eq!(job.cell(), Some(&cell("c1")));
        let done = JobEvent::Finished {
            fence: Fence(5),
            outcome: Outcome::Succeeded,
        };
        assert_eq!(job.apply(done), Ok(JobPhase::Succeeded));
        assert_eq!(job.cell(), None);
        assert_eq!(job.attempt(), Attempt::FIRST);
    }

    #[test]
    fn lease_expiry_requeues_the_job_with_a_new_attempt_and_refuses_the_old_fence() {
        let mut job = JobRun::new(RetryPolicy::default());
        job.apply(JobEvent::DepsSatisfied).unwrap();
        run_to_running(&mut job, 5);
        let lost = JobEvent::LeaseLost {
            reason: InfraReason::CellLost,
        };
        assert_eq!(job.apply(lost), Ok(JobPhase::Queued));
        assert_eq!(job.attempt().get(), 2);
        assert_eq!(job.retries().infra, 1);
        run_to_running(&mut job, 9);

        // The old runner comes back and reports: refused, nothing changes.
        let late = JobEvent::Finished {
            fence: Fence(5),
            outcome: Outcome::Failed(FailureClass::Test { exit_code: 1 }),
        };
        assert_eq!(
            job.apply(late),
            Err(JobError::StaleFence {
                got: Fence(5),
                current: Fence(9)
            })
        );
        assert_eq!(job.phase(), JobPhase::Running);
    }

    #[test]
    fn infra_failures_stop_being_retried_when_the_budget_is_spent() {
        let mut job = JobRun::new(RetryPolicy { infra: 1, test: 0 });
        job.apply(JobEvent::DepsSatisfied).unwrap();
        run_to_running(&mut job, 1);
        let crash = |fence| JobEvent::Finished {
            fence: Fence(fence),
            outcome: Outcome::Failed(FailureClass::Infra {
                reason: InfraReason::RunnerCrash,
            }),
        };
        assert_eq!(job.apply(crash(1)), Ok(JobPhase::Queued));
        run_to_running(&mut job, 2);
        assert_eq!(job.apply(crash(2)), Ok(JobPhase::Failed));
        assert_eq!(
            job.failure().map(|f| f.to_string()).as_deref(),
            Some("Infra{RunnerCrash}")
        );
    }

    #[test]
    fn a_drain_requeues_the_job_without_spending_its_infra_budget() {
        let no_budget = RetryPolicy { infra: 0, test: 0 };
        let drained = FailureClass::Infra {
            reason: InfraReason::Drained,
        };
        assert!(should_retry(drained, RetriesUsed::default(), no_budget));
        let mut run = JobRun::new(no_budget);
        run.apply(JobEvent::DepsSatisfied).unwrap();
        for fence in 1..=3 {
            run.apply(placed(fence)).unwrap();
            assert_eq!(
                run.apply(JobEvent::LeaseLost {
                    reason: InfraReason::Drained
                }),
                Ok(JobPhase::Queued),
                "drain {fence}"
            );
        }
        assert_eq!(run.retries(), RetriesUsed::default());
        assert_eq!(run.attempt().get(), 4);
    }

    #[test]
    fn a_failing_test_is_not_retried_unless_asked() {
        let test_failure = FailureClass::Test { exit_code: 3 };
        assert!(!should_retry(
            test_failure,
            RetriesUsed::default(),
            RetryPolicy::default()
        ));
        assert!(should_retry(
            test_failure,
            RetriesUsed::default(),
            RetryPolicy { infra: 2, test: 1 }
        ));
        // Spending infra retries does not eat into the test budget.
        let used = RetriesUsed { infra: 2, test: 0 };
        assert!(should_retry(
            test_failure,
            used,
            RetryPolicy { infra: 2, test: 1 }
        ));
    }

    #[test]
    fn timeouts_cancellations_and_config_errors_are_never_retried() {
        let generous = RetryPolicy {
            infra: 10,
            test: 10,
        };
        for class in [
            FailureClass::Timeout,
            FailureClass::Cancelled,
            FailureClass::Config,
        ] {
            assert!(!should_retry(class, RetriesUsed::default(), generous));
        }
    }

    #[test]
    fn a_timeout_ends_in_timed_out_even_with_retries_left() {
        let mut job = JobRun::new(RetryPolicy { infra: 5, test: 5 });
        job.apply(JobEvent::DepsSatisfied).unwrap();
        run_to_running(&mut job, 3);
        let timeout = JobEvent::Finished {
            fence: Fence(3),
            outcome: Outcome::Failed(FailureClass::Timeout),
        };
        assert_eq!(job.apply(timeout), Ok(JobPhase::TimedOut));
    }

    #[test]
    fn placement_fences_must_increase() {
        let mut job = JobRun::new(RetryPolicy::default());
        job.apply(JobEvent::DepsSatisfied).unwrap();
        job.apply(placed(8)).unwrap();
        job.apply(JobEvent::LeaseLost {
            reason: InfraReason::LeaseExpired,
        })
        .unwrap();
        assert_eq!(
            job.apply(placed(8)),
            Err(JobError::FenceNotIncreasing {
                got: Fence(8),
                last: Fence(8)
            })
        );
        assert_eq!(job.phase(), JobPhase::Queued);
    }

    #[test]
    fn a_finished_job_moves_only_by_an_explicit_retry() {
        let mut job = JobRun::new(RetryPolicy::default());
        job.apply(JobEvent::Cancel).unwrap();
        assert!(job.apply(JobEvent::DepsSatisfied).is_err());
        assert_eq!(job.apply(JobEvent::Retry), Ok(JobPhase::Pending));
        assert_eq!(job.attempt().get(), 2);
        assert_eq!(job.failure(), None);
    }

    #[test]
    fn failure_classes_print_as_in_the_architecture() {
        assert_eq!(FailureClass::Test { exit_code: 3 }.to_string(), "Test{3}");
        let json = serde_json::to_string(&FailureClass::Infra {
            reason: InfraReason::ImagePull,
        })
        .unwrap();
        // Externally tagged, so postcard (the replicated state's format) can read it back.
        assert_eq!(json, r#"{"infra":{"reason":"image_pull"}}"#);
        let back: FailureClass = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_string(), "Infra{ImagePull}");
    }

    fn arb_phase() -> impl Strategy<Value = JobPhase> {
        proptest::sample::select(JobPhase::ALL.to_vec())
    }

    fn arb_transition() -> impl Strategy<Value = Transition> {
        proptest::sample::select(Transition::ALL.to_vec())
    }

    fn arb_event() -> impl Strategy<Value = JobEvent> {
        let class = prop_oneof![
            (0usize..6).prop_map(|i| FailureClass::Infra {
                reason: [
                    InfraReason::CellLost,
                    InfraReason::Evicted,
                    InfraReason::ImagePull,
                    InfraReason::RunnerCrash,
                    InfraReason::LeaseExpired,
                    InfraReason::Drained,
                ][i]
            }),
            (1i32..255).prop_map(|exit_code| FailureClass::Test { exit_code }),
            Just(FailureClass::Timeout),
            Just(FailureClass::Cancelled),
            Just(FailureClass::Config),
        ];
        let outcome = prop_oneof![Just(Outcome::Succeeded), class.prop_map(Outcome::Failed)];
        prop_oneof![
            Just(JobEvent::DepsSatisfied),
            (0u64..20).prop_map(placed),
            (0u64..20).prop_map(|f| JobEvent::Started { fence: Fence(f) }),
            ((0u64..20), outcome).prop_map(|(f, outcome)| JobEvent::Finished {
                fence: Fence(f),
                outcome
            }),
            Just(JobEvent::LeaseLost {
                reason: InfraReason::CellLost
            }),
            Just(JobEvent::Cancel),
            Just(JobEvent::Retry),
        ]
    }

    proptest! {
        #[test]
        fn only_transitions_in_the_table_are_allowed(from in arb_phase(), t in arb_transition()) {
            let listed = TRANSITIONS.iter().any(|(f, tr, _)| *f == from && *tr == t);
            prop_assert_eq!(next_phase(from, t).is_ok(), listed);
            if from.is_terminal() && t != Transition::Retry {
                prop_assert!(next_phase(from, t).is_err());
            }
        }

        #[test]
        fn refused_events_change_nothing_and_invariants_hold(
            events in proptest::collection::vec(arb_event(), 0..60)
        ) {
            let mut job = JobRun::new(RetryPolicy { infra: 2, test: 1 });
            let mut last_fence = None;
            for event in events {
                let before = job.clone();
                match job.apply(event) {
                    Err(_) => prop_assert_eq!(&job, &before),
                    Ok(phase) => {
                        prop_assert_eq!(phase, job.phase());
                        prop_assert!(job.attempt() >= before.attempt());
                        prop_assert!(job.fence() >= before.fence());
                        // A leased or running job is always somewhere, and nothing else is.
                        let out = matches!(phase, JobPhase::Leased | JobPhase::Running);
                        prop_assert_eq!(job.cell().is_some(), out);
                        prop_assert!(job.retries().infra <= 2 && job.retries().test <= 1);
                    }
                }
                if job.fence() != last_fence {
                    prop_assert!(job.fence() > last_fence, "fences only grow");
                    last_fence = job.fence();
                }
            }
        }
    }
}
