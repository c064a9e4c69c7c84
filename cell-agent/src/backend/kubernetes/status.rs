//! Reading a runner pod's status: what the attempt is doing and, once it ended, how — the
//! failure taxonomy of ARCHITECTURE §6 as Kubernetes expresses it. Pure: a pod in, an
//! [`Observation`] out; the attempt task adds time (image-pull deadlines) and intent (our own
//! cancel).

use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::render::{CHECKOUT_CONTAINER, JOB_CONTAINER};
use crate::runner::record::{Termination, outcome_for_exit_code};

/// What a pod says about its attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Scheduling, pulling, initialising: nothing to report yet.
    Waiting,
    /// A container's image cannot be pulled (yet): Kubernetes keeps retrying, the attempt
    /// fails as `Infra{ImagePull}` once this has lasted past the configured deadline.
    PullFailing {
        /// Kubernetes' explanation (`Back-off pulling image "…"`).
        message: String,
    },
    /// A container cannot be created (a missing Secret key, a bad mount); retried by the
    /// kubelet, failed as `Infra{RunnerCrash}` past the same deadline.
    Stuck {
        /// The reason and message.
        message: String,
    },
    /// No node can take the pod (yet); failed as `Infra{RunnerCrash}` past the configured
    /// unschedulable deadline, so the job is placed again.
    Unschedulable {
        /// The scheduler's explanation.
        message: String,
    },
    /// The job container is running (the wrapper is running the steps).
    Running {
        /// When it started (ms since the Unix epoch), if Kubernetes said.
        started_at_ms: Option<u64>,
    },
    /// The attempt is over.
    Ended(Ending),
}

/// How an attempt ended, and why in words when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The outcome to report.
    pub outcome: Outcome,
    /// A sentence for the job's log.
    pub message: Option<String>,
}

impl Ending {
    fn new(outcome: Outcome, message: impl Into<Option<String>>) -> Self {
        Self {
            outcome,
            message: message.into(),
        }
    }
}

const EVICTED: Outcome = Outcome::Failed(FailureClass::Infra {
    reason: InfraReason::Evicted,
});
const CRASH: Outcome = Outcome::Failed(FailureClass::Infra {
    reason: InfraReason::RunnerCrash,
});

/// Pod-level reasons that mean the node or the cluster took the pod away.
const EVICTION_REASONS: &[&str] = &[
    "Evicted",
    "NodeLost",
    "NodeShutdown",
    "Shutdown",
    "Terminated",
    "Preempting",
    "OutOfcpu",
    "OutOfmemory",
    "UnexpectedAdmissionError",
];

/// Waiting reasons that mean the image will not come (retrying cannot help).
const BAD_IMAGE_REASONS: &[&str] = &["InvalidImageName", "ErrImageNeverPull"];
/// Waiting reasons that mean an image pull is failing (Kubernetes retries with back-off).
const PULL_REASONS: &[&str] = &["ErrImagePull", "ImagePullBackOff", "RegistryUnavailable"];
/// Waiting reasons that mean a container cannot be created.
const STUCK_REASONS: &[&str] = &[
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Reads the pod. `deleting_by_us` is true once the agent asked for the pod to be deleted
/// (a cancel); a deletion nobody here asked for is an eviction (a node drain, preemption,
/// someone's `kubectl delete`).
///
/// `warm_started` is `None` for a pod made for its attempt, whose job container starts with
/// the steps. A warm pod's job container runs from before its job arrived (waiting for the
/// hand-off), so for it the caller says whether the wrapper has reported the first step
/// (`Some(started)`), and a running job container means only that the pod is alive.
pub fn observe(pod: &Pod, deleting_by_us: bool, warm_started: Option<bool>) -> Observation {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let reason = status.and_then(|s| s.reason.as_deref()).unwrap_or("");
    let status_message = status.and_then(|s| s.message.clone()).unwrap_or_default();

    let job = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == JOB_CONTAINER));
    let job_ran = warm_started.unwrap_or_else(|| {
        job.and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
    });
    let from_outside = pod_ending(pod, deleting_by_us, phase, reason, &status_message, job_ran);
    if let Some((ending, killed)) = job.and_then(job_ended) {
        // A job that ended by itself (success, a failing step, its own timeout) keeps its
        // result whatever happens to the pod afterwards. A job container that was killed
        // (the wrapper reports `Cancelled` on SIGTERM; SIGKILL leaves no message) ended
        // because of something outside it: the pod-level reason says what.
        if killed && !deleting_by_us {
            return Observation::Ended(from_outside.unwrap_or_else(|| {
                Ending::new(
                    EVICTED,
                    "Kubernetes killed the job container (node shutdown or kubelet restart)"
                        .to_owned(),
                )
            }));
        }
        return Observation::Ended(ending);
    }
    if let Some(ending) = from_outside {
        return Observation::Ended(ending);
    }
    if warm_started.is_some()
        && let Some(ending) = standby_failed(pod)
    {
        return Observation::Ended(ending);
    }
    if phase == "Failed" || phase == "Succeeded" {
        if let Some(ending) = init_failed(pod) {
            return Observation::Ended(ending);
        }
        if phase == "Succeeded" {
            return Observation::Ended(Ending::new(Outcome::Succeeded, None));
        }
        return Observation::Ended(Ending::new(
            CRASH,
            format!("the runner pod failed without a job result ({reason}): {status_message}"),
        ));
    }
    if let Some(ending) = init_failed(pod) {
        return Observation::Ended(ending);
    }
    // Anything waiting, init containers first (they run first).
    let all = status
        .into_iter()
        .flat_map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
        })
        .collect::<Vec<_>>();
    for c in &all {
        let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let why = waiting.reason.as_deref().unwrap_or("");
        let message = waiting.message.clone().unwrap_or_default();
        if BAD_IMAGE_REASONS.contains(&why) {
            return Observation::Ended(Ending::new(
                Outcome::Failed(FailureClass::Config),
                format!(
                    "the image of container `{}` cannot be used ({why}): {message}",
                    c.name
                ),
            ));
        }
        if PULL_REASONS.contains(&why) {
            return Observation::PullFailing {
                message: format!("container `{}`: {why}: {message}", c.name),
            };
        }
        if STUCK_REASONS.contains(&why) {
            return Observation::Stuck {
                message: format!("container `{}`: {why}: {message}", c.name),
            };
        }
    }
    let unschedulable = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
        cs.iter().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
    });
    if let Some(c) = unschedulable {
        return Observation::Unschedulable {
            message: c.message.clone().unwrap_or_default(),
        };
    }
    if let Some(running) = job
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.running.as_ref())
    {
        return Observation::Running {
            started_at_ms: running
                .started_at
                .as_ref()
                .and_then(|t| u64::try_from(t.0.timestamp_millis()).ok()),
        };
    }
    Observation::Waiting
}

/// The ending of a terminated job container, and whether it was killed rather than ending by
/// itself. The wrapper's termination message is authoritative; without one (the wrapper was
/// killed, or never started) the exit code and Kubernetes' reason decide.
fn job_ended(c: &ContainerStatus) -> Option<(Ending, bool)> {
    let t = c.state.as_ref()?.terminated.as_ref()?;
    let reason = t.reason.as_deref().unwrap_or("");
    if reason == "OOMKilled" {
        return Some((
            Ending::new(
                Outcome::Failed(FailureClass::Test {
                    exit_code: if t.exit_code == 0 { 137 } else { t.exit_code },
                }),
                "the job ran out of memory (OOMKilled): raise its resources.memory".to_owned(),
            ),
            false,
        ));
    }
    if let Some(term) = t.message.as_deref().and_then(Termination::parse) {
        let killed = term.outcome == Outcome::Failed(FailureClass::Cancelled);
        return Some((Ending::new(term.outcome, term.message), killed));
    }
    // Killed by a signal (SIGKILL 137, SIGTERM 143) or lost with its node.
    let killed = matches!(t.exit_code, 137 | 143) || reason == "ContainerStatusUnknown";
    match (t.exit_code, reason) {
        (0, _) => Some((Ending::new(Outcome::Succeeded, None), false)),
        (code, "Error" | "" | "ContainerStatusUnknown") => {
            let outcome = outcome_for_exit_code(code);
            let killed = killed || outcome == Outcome::Failed(FailureClass::Cancelled);
            Some((Ending::new(outcome, None), killed))
        }
        // ContainerCannotRun, StartError: the wrapper never ran (an image without a usable
        // filesystem for it, a binary it cannot execute).
        (code, other) => Some((
            Ending::new(
                CRASH,
                format!(
                    "the job container could not run the Flotilla wrapper ({other}, exit code \
                     {code}): {}",
                    t.message.as_deref().unwrap_or("no message")
                ),
            ),
            false,
        )),
    }
}

/// What the pod itself says ended the attempt from outside the job: a deletion nobody here
/// asked for, an eviction or preemption, the active deadline.
fn pod_ending(
    pod: &Pod,
    deleting_by_us: bool,
    phase: &str,
    reason: &str,
    status_message: &str,
    job_ran: bool,
) -> Option<Ending> {
    if pod.metadata.deletion_timestamp.is_some() && !deleting_by_us {
        return Some(Ending::new(
            EVICTED,
            "the runner pod was deleted by someone other than this agent (node drain, \
             preemption or a manual delete)"
                .to_owned(),
        ));
    }
    let over = phase == "Failed" || phase == "Succeeded";
    if over && reason == "DeadlineExceeded" {
        return Some(if job_ran {
            Ending::new(
                Outcome::Failed(FailureClass::Timeout),
                "Kubernetes stopped the pod at its active deadline (the job's timeout plus \
                 the startup allowance)"
                    .to_owned(),
            )
        } else {
            // Queue time is not run time: a pod that never got to its steps did not time out.
            Ending::new(
                CRASH,
                "the runner pod did not get to its job within the startup allowance (image \
                 pulls or the checkout took too long)"
                    .to_owned(),
            )
        });
    }
    if (over && EVICTION_REASONS.contains(&reason)) || disrupted(pod) {
        return Some(Ending::new(
            EVICTED,
            format!("the runner pod was evicted ({reason}): {status_message}"),
        ));
    }
    None
}

/// The ending of a pod whose init container failed: the checkout says why in its
/// termination message (`Config` for a commit that cannot be fetched by design, otherwise
/// `Infra{RunnerCrash}`); an install failure is the platform's.
fn init_failed(pod: &Pod) -> Option<Ending> {
    let statuses = pod.status.as_ref()?.init_container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        container_failed(
            c,
            c.name == CHECKOUT_CONTAINER,
            &format!("init container `{}`", c.name),
        )
    })
}

/// The ending of a warm pod whose standby container (which runs the checkout) ended badly:
/// it hands its failure to the job container, which ends with it, so this matters only when
/// the standby died without a word (killed, out of memory) and the job container would wait
/// for a job that never comes.
fn standby_failed(pod: &Pod) -> Option<Ending> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let c = statuses
        .iter()
        .find(|c| c.name == super::render::STANDBY_CONTAINER)?;
    container_failed(c, true, "the warm runner's standby container")
}

/// The ending of a container that exited non-zero: with the outcome its termination message
/// names when `trusted` (our checkout's), a crash otherwise.
fn container_failed(c: &ContainerStatus, trusted: bool, what: &str) -> Option<Ending> {
    let t = c.state.as_ref()?.terminated.as_ref()?;
    if t.exit_code == 0 {
        return None;
    }
    let term = t.message.as_deref().and_then(Termination::parse);
    let outcome = match &term {
        Some(term) if trusted => term.outcome,
        _ => CRASH,
    };
    let why = term
        .and_then(|t| t.message)
        .or_else(|| t.reason.clone())
        .unwrap_or_default();
    Some(Ending::new(
        outcome,
        format!("{what} failed with exit code {}: {why}", t.exit_code),
    ))
}

/// Where a warm pod is before it has a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmObservation {
    /// Scheduling, pulling, starting.
    Starting,
    /// Pulling, creating or scheduling is failing (for how long decides).
    Trouble(Observation),
    /// Both containers run and the standby answers its probe: the pod can take its job.
    Ready {
        /// The pod's IP, where the standby listens.
        ip: String,
    },
    /// The pod died or can never run: the runner is lost.
    Failed(String),
}

/// Reads a warm pod waiting for its job.
pub fn observe_warm(pod: &Pod) -> WarmObservation {
    if pod.metadata.deletion_timestamp.is_some() {
        return WarmObservation::Failed("the warm pod is being deleted".into());
    }
    match observe(pod, false, Some(false)) {
        Observation::Ended(e) => WarmObservation::Failed(
            e.message
                .unwrap_or_else(|| format!("the warm pod ended ({:?})", e.outcome)),
        ),
        o @ (Observation::PullFailing { .. }
        | Observation::Stuck { .. }
        | Observation::Unschedulable { .. }) => WarmObservation::Trouble(o),
        Observation::Waiting => WarmObservation::Starting,
        Observation::Running { .. } => {
            let status = pod.status.as_ref();
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            match status.and_then(|s| s.pod_ip.clone()) {
                Some(ip) if ready => WarmObservation::Ready { ip },
                _ => WarmObservation::Starting,
            }
        }
    }
}

/// The `DisruptionTarget` condition: Kubernetes is about to take the pod away (preemption,
/// taint-based eviction of a lost node, the eviction API, kubelet shutdown).
fn disrupted(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        })
}

/// True once Kubernetes considers the pod finished (nothing of it runs any more).
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::runner::record::PROTOCOL_VERSION;

    fn container(name: &str, state: ContainerState) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(state),
            ..ContainerStatus::default()
        }
    }

    fn waiting(reason: &str) -> ContainerState {
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(format!("{reason} happened")),
            }),
            ..ContainerState::default()
        }
    }

    fn terminated(code: i32, reason: &str, message: Option<String>) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.into()),
                message,
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        }
    }

    fn pod(
        phase: &str,
        reason: Option<&str>,
        init: Vec<ContainerStatus>,
        job: Vec<ContainerStatus>,
    ) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                reason: reason.map(Into::into),
                init_container_statuses: Some(init),
                container_statuses: Some(job),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn term(outcome: Outcome, message: Option<&str>) -> Option<String> {
        Some(
            Termination {
                v: PROTOCOL_VERSION,
                outcome,
                message: message.map(Into::into),
            }
            .to_json(),
        )
    }

    fn ended(o: Observation) -> Outcome {
        match o {
            Observation::Ended(e) => e.outcome,
            other => panic!("not ended: {other:?}"),
        }
    }

    #[test]
    fn container_states_map_to_the_failure_taxonomy() {
        let job = |s| vec![container(JOB_CONTAINER, s)];
        let cases: Vec<(&str, Pod, Outcome)> = vec![
            (
                "exit 0",
                pod(
                    "Succeeded",
                    None,
                    vec![],
                    job(terminated(0, "Completed", None)),
                ),
                Outcome::Succeeded,
            ),
            (
                "exit 2 without a message",
                pod("Failed", None, vec![], job(terminated(2, "Error", None))),
                Outcome::Failed(FailureClass::Test { exit_code: 2 }),
            ),
            (
                "the wrapper's timeout",
                pod(
                    "Failed",
                    None,
                    vec![],
                    job(terminated(
                        124,
                        "Error",
                        term(Outcome::Failed(FailureClass::Timeout), None),
                    )),
                ),
                Outcome::Failed(FailureClass::Timeout),
            ),
            (
                "OOMKilled",
                pod(
                    "Failed",
                    None,
                    vec![],
                    job(terminated(137, "OOMKilled", None)),
                ),
                Outcome::Failed(FailureClass::Test { exit_code: 137 }),
            ),
            (
                "the wrapper could not start",
                pod(
                    "Failed",
                    None,
                    vec![],
                    job(terminated(128, "StartError", None)),
                ),
                CRASH,
            ),
            (
                "the active deadline before the job ever ran",
                pod("Failed", Some("DeadlineExceeded"), vec![], vec![]),
                CRASH,
            ),
            (
                "the active deadline while the job ran (the wrapper saw SIGTERM)",
                pod(
                    "Failed",
                    Some("DeadlineExceeded"),
                    vec![],
                    job(terminated(
                        130,
                        "Error",
                        term(Outcome::Failed(FailureClass::Cancelled), None),
                    )),
                ),
                Outcome::Failed(FailureClass::Timeout),
            ),
            (
                "an eviction that SIGKILLed the job container",
                pod(
                    "Failed",
                    Some("Evicted"),
                    vec![],
                    job(terminated(137, "Error", None)),
                ),
                EVICTED,
            ),
            (
                "a kill with no explanation on the pod (node shutdown)",
                pod("Failed", None, vec![], job(terminated(143, "Error", None))),
                EVICTED,
            ),
            (
                "a job that failed by itself before its pod was evicted keeps its result",
                pod(
                    "Failed",
                    Some("Evicted"),
                    vec![],
                    job(terminated(
                        1,
                        "Error",
                        term(Outcome::Failed(FailureClass::Test { exit_code: 1 }), None),
                    )),
                ),
                Outcome::Failed(FailureClass::Test { exit_code: 1 }),
            ),
            (
                "exit 124 without a message is the wrapper's timeout",
                pod("Failed", None, vec![], job(terminated(124, "Error", None))),
                Outcome::Failed(FailureClass::Timeout),
            ),
            (
                "eviction",
                pod("Failed", Some("Evicted"), vec![], vec![]),
                EVICTED,
            ),
            (
                "a bad image name",
                pod("Pending", None, vec![], job(waiting("InvalidImageName"))),
                Outcome::Failed(FailureClass::Config),
            ),
            (
                "a checkout of a commit that cannot exist",
                pod(
                    "Pending",
                    None,
                    vec![container(
                        CHECKOUT_CONTAINER,
                        terminated(
                            1,
                            "Error",
                            term(Outcome::Failed(FailureClass::Config), Some("bad sha")),
                        ),
                    )],
                    vec![],
                ),
                Outcome::Failed(FailureClass::Config),
            ),
            (
                "a checkout that failed without saying why",
                pod(
                    "Pending",
                    None,
                    vec![container(
                        CHECKOUT_CONTAINER,
                        terminated(128, "Error", None),
                    )],
                    vec![],
                ),
                CRASH,
            ),
            (
                "an install failure is the platform's whatever it says",
                pod(
                    "Pending",
                    None,
                    vec![container(
                        super::super::render::INSTALL_CONTAINER,
                        terminated(
                            1,
                            "Error",
                            term(Outcome::Failed(FailureClass::Config), None),
                        ),
                    )],
                    vec![],
                ),
                CRASH,
            ),
        ];
        for (what, pod, outcome) in cases {
            assert_eq!(ended(observe(&pod, false, None)), outcome, "{what}");
        }
    }

    #[test]
    fn a_deletion_is_an_eviction_unless_the_agent_asked_for_it() {
        let mut p = pod(
            "Running",
            None,
            vec![],
            vec![container(
                JOB_CONTAINER,
                ContainerState {
                    running: Some(ContainerStateRunning { started_at: None }),
                    ..ContainerState::default()
                },
            )],
        );
        assert_eq!(
            observe(&p, false, None),
            Observation::Running {
                started_at_ms: None
            }
        );
        p.metadata.deletion_timestamp = Some(Time(
            k8s_openapi::chrono::DateTime::from_timestamp(1, 0).expect("time"),
        ));
        assert_eq!(ended(observe(&p, false, None)), EVICTED);
        assert_eq!(
            observe(&p, true, None),
            Observation::Running {
                started_at_ms: None
            }
        );
        // The wrapper then reports the SIGTERM as a cancel: ours is a cancel, theirs is not.
        p.status.as_mut().expect("status").container_statuses = Some(vec![container(
            JOB_CONTAINER,
            terminated(
                130,
                "Error",
                term(Outcome::Failed(FailureClass::Cancelled), None),
            ),
        )]);
        assert_eq!(ended(observe(&p, false, None)), EVICTED);
        assert_eq!(
            ended(observe(&p, true, None)),
            Outcome::Failed(FailureClass::Cancelled)
        );
    }

    #[test]
    fn pull_trouble_stuck_containers_and_unschedulable_pods_wait_for_their_deadline() {
        let p = pod(
            "Pending",
            None,
            vec![],
            vec![container(JOB_CONTAINER, waiting("ImagePullBackOff"))],
        );
        assert!(
            matches!(observe(&p, false, None), Observation::PullFailing { message } if message.contains("ImagePullBackOff"))
        );
        let p = pod(
            "Pending",
            None,
            vec![container(
                super::super::render::INSTALL_CONTAINER,
                waiting("ErrImagePull"),
            )],
            vec![],
        );
        assert!(
            matches!(observe(&p, false, None), Observation::PullFailing { .. }),
            "the runner image too"
        );
        let p = pod(
            "Pending",
            None,
            vec![],
            vec![container(
                JOB_CONTAINER,
                waiting("CreateContainerConfigError"),
            )],
        );
        assert!(matches!(
            observe(&p, false, None),
            Observation::Stuck { .. }
        ));
        let mut p = pod("Pending", None, vec![], vec![]);
        p.status.as_mut().expect("status").conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/3 nodes are available".into()),
            ..PodCondition::default()
        }]);
        assert_eq!(
            observe(&p, false, None),
            Observation::Unschedulable {
                message: "0/3 nodes are available".into()
            }
        );
        p.status.as_mut().expect("status").conditions = Some(vec![PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            reason: Some("PreemptionByScheduler".into()),
            ..PodCondition::default()
        }]);
        p.status.as_mut().expect("status").phase = Some("Failed".into());
        assert_eq!(ended(observe(&p, false, None)), EVICTED, "preemption");
    }

    fn running() -> ContainerState {
        ContainerState {
            running: Some(ContainerStateRunning { started_at: None }),
            ..ContainerState::default()
        }
    }

    #[test]
    fn a_warm_pods_running_job_container_is_not_a_started_job_and_its_deadline_counts_from_the_steps()
     {
        let standby = container(super::super::render::STANDBY_CONTAINER, running());
        let mut p = pod(
            "Running",
            None,
            vec![],
            vec![standby.clone(), container(JOB_CONTAINER, running())],
        );
        assert_eq!(
            observe_warm(&p),
            WarmObservation::Starting,
            "no Ready condition, no IP"
        );
        let status = p.status.as_mut().expect("status");
        status.pod_ip = Some("10.1.2.3".into());
        status.conditions = Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..PodCondition::default()
        }]);
        assert_eq!(
            observe_warm(&p),
            WarmObservation::Ready {
                ip: "10.1.2.3".into()
            }
        );
        // At the active deadline: a warm pod whose steps never began did not time out.
        let mut late = p.clone();
        let status = late.status.as_mut().expect("status");
        status.phase = Some("Failed".into());
        status.reason = Some("DeadlineExceeded".into());
        assert_eq!(ended(observe(&late, false, Some(false))), CRASH);
        assert_eq!(
            ended(observe(&late, false, Some(true))),
            Outcome::Failed(FailureClass::Timeout)
        );
        // The standby died without handing anything over: the job container would wait for
        // ever, so the attempt ends with the standby's word (or as a crash).
        let mut dead = p.clone();
        dead.status.as_mut().expect("status").container_statuses = Some(vec![
            container(
                super::super::render::STANDBY_CONTAINER,
                terminated(
                    125,
                    "Error",
                    term(
                        Outcome::Failed(FailureClass::Config),
                        Some("no such commit"),
                    ),
                ),
            ),
            container(JOB_CONTAINER, running()),
        ]);
        assert_eq!(
            ended(observe(&dead, false, Some(false))),
            Outcome::Failed(FailureClass::Config)
        );
        assert!(
            matches!(observe_warm(&dead), WarmObservation::Failed(m) if m.contains("no such commit"))
        );
        // A standby that finished its hand-off (exit 0) is no failure.
        let mut handed = p;
        handed.status.as_mut().expect("status").container_statuses = Some(vec![
            container(
                super::super::render::STANDBY_CONTAINER,
                terminated(0, "Completed", None),
            ),
            container(JOB_CONTAINER, running()),
        ]);
        assert!(matches!(
            observe(&handed, false, Some(true)),
            Observation::Running { .. }
        ));
    }
}
