//! One attempt's task: create (or adopt) its pod, follow the pod through the watcher's
//! updates and its log, cancel it on request, report `Finished` exactly once, then reap it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::{Assignment, RunnerEvent, RunnerEvents, Stream};
use futures::{AsyncBufReadExt as _, Stream as FuturesStream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, LogParams, Patch, PatchParams, PostParams, PropagationPolicy};
use tokio::sync::watch;
use tokio::time::Instant;

use super::status::{Ending, Observation, observe};
use super::{Inner, PodView, render};
use crate::runner::record::Record;

/// How long after the pod ended its log may take to drain.
const LOG_DRAIN: Duration = Duration::from_secs(10);
/// After asking for a cancelled pod's deletion, how long past its grace period to wait for
/// it to go before reporting it cancelled anyway (Kubernetes will kill it regardless).
const CANCEL_SLACK: Duration = Duration::from_secs(15);
/// How far ahead of this clock a record's stamp may be before it is treated as forged.
const FUTURE_SLACK_MS: u64 = 60_000;
/// Longest log line kept whole; longer ones are split (a step can write anything, and an
/// unbounded line would take the agent's memory with it).
const MAX_LOG_LINE: usize = 256 * 1024;
/// Pause before following the log again when the stream broke or could not open.
const LOG_RETRY: Duration = Duration::from_secs(1);
/// After a followed log ended while the pod still looks alive, how long to wait for the pod
/// update saying it exited before following again.
const LOG_REFOLLOW: Duration = Duration::from_secs(3);

const CRASH: Outcome = Outcome::Failed(FailureClass::Infra {
    reason: InfraReason::RunnerCrash,
});
const CANCELLED: Outcome = Outcome::Failed(FailureClass::Cancelled);

/// Wall-clock milliseconds since the Unix epoch, for event stamps.
#[allow(
    clippy::disallowed_methods,
    reason = "event stamps are wall-clock times shown to users; nothing here decides by them"
)]
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How the task comes by its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mode {
    /// Creates the attempt's own pod.
    Create,
    /// Takes over a pod a previous agent left; for a warm pod, with its standby token, to
    /// send the job again in case that agent stopped before the standby had it.
    Adopt { token: Option<String> },
    /// Gives the job to a prepared warm pod whose standby accepts `token`.
    Handoff { token: String },
}

/// How long a warm pod's standby has to accept its job (it is Ready when handed one; this
/// covers a slow network or a restarting agent).
const HANDOFF_WITHIN: Duration = Duration::from_secs(30);
/// Added to the checkout's time limit for a warm pod's steps to begin after the hand-off.
const START_SLACK: Duration = Duration::from_secs(60);
/// Pause between tries at sending a warm pod its job.
const HANDOFF_RETRY: Duration = Duration::from_millis(500);

type Lines = Pin<Box<dyn FuturesStream<Item = std::io::Result<String>> + Send>>;

pub(super) struct Task {
    pub(super) inner: Arc<Inner>,
    /// The pod's name: derived from the attempt, or a warm pod's.
    pub(super) name: String,
    /// Whether the pod is a warm pod (its job container ran before the job arrived).
    pub(super) warm: bool,
    pub(super) assignment: Assignment,
    pub(super) events: Arc<dyn RunnerEvents>,
    pub(super) view: watch::Receiver<PodView>,
    pub(super) cancel: watch::Receiver<bool>,
    pub(super) stop: watch::Receiver<bool>,
    /// When the backend accepted the attempt; no report of it predates this.
    pub(super) accepted_at_ms: u64,
}

/// Where the attempt is.
struct Progress {
    seen: bool,
    gone: bool,
    started: bool,
    deleting: bool,
    delete_deadline: Option<Instant>,
    /// Since when the pod has been failing to pull, stuck or unschedulable, and why.
    trouble: Option<(Instant, Trouble, String)>,
    log: Option<Lines>,
    log_done: bool,
    log_retry_at: Option<Instant>,
    /// The newest record stamp read from the log, to skip repeats after re-following.
    last_ts: u64,
    /// The outcome the wrapper wrote in its log (the termination message usually agrees).
    logged_outcome: Option<Outcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trouble {
    Pull,
    Stuck,
    Unschedulable,
}

impl Task {
    pub(super) async fn run(mut self, mode: Mode) {
        let a = &self.assignment;
        let (job, fence) = (a.job, a.fence);
        let name = self.name.clone();
        // A warm pod's steps must begin by then (the standby's checkout has its own limit).
        let mut start_by: Option<Instant> = None;
        match mode {
            Mode::Create => {
                if let Err(ending) = self.create(&name).await {
                    self.finish(&name, ending, false);
                    return;
                }
            }
            Mode::Handoff { token } => {
                if let Err(ending) = self.handoff(&name, &token).await {
                    // The pod may hold a half-given job: it goes once this is reported.
                    self.finish(&name, ending, true);
                    return;
                }
                start_by = Some(Instant::now() + self.inner.cfg.checkout_timeout + START_SLACK);
            }
            Mode::Adopt { token: Some(token) } => {
                // The previous agent may have stopped between labelling the pod and the
                // standby taking the job. Sent again only while the standby still runs (the
                // standby accepts the same job twice); once it has gone, what listens on its
                // port is job code, which gets nothing anyway (the job is sealed).
                if standby_running(&self.view.borrow()) {
                    match self.send_job(&name, &token).await {
                        Ok(()) => {}
                        Err(why) => {
                            tracing::debug!(pod = %name, why = %why, "Could not send the job to an adopted warm pod again; following it as it is.");
                        }
                    }
                }
                start_by = Some(Instant::now() + self.inner.cfg.checkout_timeout + START_SLACK);
            }
            Mode::Adopt { token: None } => {}
        }
        let mut p = Progress {
            seen: false,
            gone: false,
            started: false,
            deleting: false,
            delete_deadline: None,
            trouble: None,
            log: None,
            log_done: false,
            log_retry_at: None,
            last_ts: 0,
            logged_outcome: None,
        };
        let mut view = self.view.clone();
        let mut cancel = self.cancel.clone();
        let mut stop = self.stop.clone();
        // Re-read the pod only when something may have changed (not for every log line).
        let mut dirty = true;
        let ending = loop {
            if std::mem::take(&mut dirty) {
                let current = view.borrow_and_update().clone();
                if let Some(ending) = self.evaluate(&name, current, &mut p).await {
                    break ending;
                }
            }
            let trouble_at = p
                .trouble
                .as_ref()
                .map(|(since, kind, _)| *since + self.deadline(*kind));
            let start_at = start_by.filter(|_| !p.started && !p.deleting);
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => return,
                changed = view.changed() => {
                    if changed.is_err() {
                        return; // The backend forgot the attempt (shut down).
                    }
                    dirty = true;
                }
                asked = async { cancel.wait_for(|c| *c).await.is_ok() }, if !p.deleting => {
                    if !asked {
                        return; // Forgotten without a cancel: the backend shut down.
                    }
                    p.deleting = true;
                    self.delete_for_cancel(&name, &mut p).await;
                    dirty = true;
                }
                line = next_line(&mut p.log), if p.log.is_some() => {
                    match line {
                        Some(Ok(line)) => self.on_log_line(&line, &mut p),
                        Some(Err(e)) => {
                            tracing::debug!(job = %job, error = %e, "The pod log stream broke.");
                            p.log = None;
                            p.log_retry_at = Some(Instant::now() + LOG_RETRY);
                            dirty = true;
                        }
                        None => {
                            // The API server ends a followed log when the container exits
                            // (the pod update follows), or when it drops a long stream: only
                            // the second needs following again, once the pod still runs.
                            p.log = None;
                            p.log_done = true;
                            p.log_retry_at = Some(Instant::now() + LOG_REFOLLOW);
                            dirty = true;
                        }
                    }
                }
                () = tokio::time::sleep_until(p.log_retry_at.unwrap_or(far)), if p.log_retry_at.is_some() && p.log.is_none() => dirty = true,
                () = tokio::time::sleep_until(trouble_at.unwrap_or(far)), if trouble_at.is_some() => {
                    let (_, kind, message) = p.trouble.clone().expect("deadline implies trouble");
                    break trouble_ending(kind, message, self.deadline(kind));
                }
                () = tokio::time::sleep_until(start_at.unwrap_or(far)), if start_at.is_some() => {
                    break Ending {
                        outcome: CRASH,
                        message: Some(format!(
                            "the warm runner did not start its job within {} of being given it",
                            humantime::format_duration(self.inner.cfg.checkout_timeout + START_SLACK)
                        )),
                    };
                }
                () = tokio::time::sleep_until(p.delete_deadline.unwrap_or(far)), if p.delete_deadline.is_some() => {
                    let message = (!p.gone).then(|| {
                        "the cancelled pod did not go away in time; Kubernetes is still deleting it".to_owned()
                    });
                    break Ending { outcome: CANCELLED, message };
                }
            }
        };
        // The pod ended: read what is left of its log, then report.
        if p.seen && !p.gone {
            self.drain_log(&name, &mut p).await;
        }
        let mut ending = ending;
        if p.deleting && ending.outcome != Outcome::Succeeded {
            ending.outcome = CANCELLED;
        }
        if let (Some(logged), Outcome::Failed(FailureClass::Infra { .. })) =
            (p.logged_outcome, ending.outcome)
            && !p.deleting
            && p.gone
            && logged != CANCELLED
        {
            // The pod vanished before its status was seen, but the wrapper had finished and
            // said how (a `Cancelled` here is the SIGTERM of the deletion, not a result).
            ending.outcome = logged;
        }
        if !p.started && needs_start(ending.outcome) {
            // The job ran but ended between two looks: the job state machine only lets a
            // started attempt succeed, fail a step or time out.
            self.mark_started(&mut p, self.accepted_at_ms);
        }
        tracing::info!(job = %job, fence = %fence, outcome = ?ending.outcome, "Attempt finished.");
        self.finish(&name, ending, !p.gone);
    }

    /// Creates the spec Secret's owner (the pod) and then the Secret. A pod that exists
    /// already (an agent restart between create and report) is taken over.
    async fn create(&mut self, name: &str) -> Result<(), Ending> {
        let inner = &self.inner;
        let pod = render::pod(&inner.cfg, &inner.cell, &self.assignment);
        let uid = match inner.pods.create(&PostParams::default(), &pod).await {
            Ok(created) => {
                inner.meter.record();
                created.metadata.uid
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::info!(pod = %name, "The attempt's pod exists already; taking it over.");
                self.existing_uid(name).await
            }
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                return Err(Ending {
                    outcome: Outcome::Failed(FailureClass::Config),
                    message: Some(format!("Kubernetes refused the runner pod: {}", e.message)),
                });
            }
            Err(e) => {
                return Err(Ending {
                    outcome: CRASH,
                    message: Some(format!("could not create the runner pod: {e}")),
                });
            }
        };
        if uid.is_none() {
            inner.state().ownerless_secrets.insert(name.to_owned());
        }
        let secret = render::spec_secret(&inner.cfg, &inner.cell, &self.assignment, uid.as_deref());
        match inner.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => {
                inner.reap(name.to_owned());
                Err(Ending {
                    outcome: CRASH,
                    message: Some(format!("could not create the job spec Secret: {e}")),
                })
            }
        }
    }

    /// Gives a prepared warm pod its job: records it in the pod's Secret (for a restarted
    /// agent), labels the pod as the attempt's and sets its deadline, then sends the job to
    /// the standby.
    async fn handoff(&self, name: &str, token: &str) -> Result<(), Ending> {
        let inner = &self.inner;
        let crash = |what: &str, e: &dyn std::fmt::Display| Ending {
            outcome: CRASH,
            message: Some(format!(
                "could not give the warm runner its job ({what}): {e}"
            )),
        };
        let params = PatchParams::default();
        let patch = render::handoff_secret_patch(&self.assignment);
        inner
            .secrets
            .patch(name, &params, &Patch::Merge(&patch))
            .await
            .map_err(|e| crash("recording the job in its Secret", &e))?;
        let age_secs = match &*self.view.borrow() {
            PodView::Present(pod) => pod
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| u64::try_from(t.0.timestamp_millis()).ok())
                .map_or(0, |created| now_ms().saturating_sub(created) / 1000),
            _ => 0,
        };
        let patch = render::handoff_pod_patch(&inner.cfg, &inner.cell, &self.assignment, age_secs);
        inner
            .pods
            .patch(name, &params, &Patch::Merge(&patch))
            .await
            .map_err(|e| crash("labelling the pod", &e))?;
        self.send_job(name, token).await.map_err(|why| {
            if *self.cancel.borrow() {
                Ending {
                    outcome: CANCELLED,
                    message: None,
                }
            } else {
                Ending {
                    outcome: CRASH,
                    message: Some(format!("the warm runner did not take its job: {why}")),
                }
            }
        })
    }

    /// Sends the job to the warm pod's standby, trying again for [`HANDOFF_WITHIN`] while it
    /// cannot be reached. `Err` says why it was not taken.
    async fn send_job(&self, name: &str, token: &str) -> Result<(), String> {
        let body = serde_json::to_vec(&self.assignment).expect("assignments always serialize");
        let deadline = Instant::now() + HANDOFF_WITHIN;
        let mut last = String::from("the pod has no IP address");
        loop {
            let ip = match &*self.view.borrow() {
                PodView::Present(pod) => pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
                _ => None,
            };
            if let Some(ip) = ip {
                match super::standby_client::assign(&ip, self.inner.cfg.standby_port, token, &body)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(pod = %name, job = %self.assignment.job, "The warm runner took its job.");
                        return Ok(());
                    }
                    Err(super::standby_client::SendError::Refused(why)) => return Err(why),
                    Err(super::standby_client::SendError::Unanswered(why)) => {
                        // It may have the job: never send it twice. The pod says the rest
                        // (the steps start, or the start deadline passes).
                        tracing::warn!(pod = %name, why = %why, "No answer from the warm runner after sending its job; following the pod.");
                        return Ok(());
                    }
                    Err(super::standby_client::SendError::Unreachable(why)) => last = why,
                }
            }
            if Instant::now() + HANDOFF_RETRY > deadline {
                return Err(format!(
                    "no answer within {}: {last}",
                    humantime::format_duration(HANDOFF_WITHIN)
                ));
            }
            let mut cancel = self.cancel.clone();
            let mut stop = self.stop.clone();
            tokio::select! {
                () = tokio::time::sleep(HANDOFF_RETRY) => {}
                _ = cancel.wait_for(|c| *c) => return Err("cancelled before the runner took it".into()),
                _ = stop.wait_for(|s| *s) => return Err("the agent is shutting down".into()),
            }
        }
    }

    async fn existing_uid(&self, name: &str) -> Option<String> {
        if let PodView::Present(p) = &*self.view.borrow() {
            return p.metadata.uid.clone();
        }
        match self.inner.pods.get(name).await {
            Ok(p) => p.metadata.uid,
            Err(e) => {
                tracing::warn!(pod = %name, error = %e, "Cannot read the existing pod.");
                None
            }
        }
    }

    fn deadline(&self, kind: Trouble) -> Duration {
        match kind {
            Trouble::Pull | Trouble::Stuck => self.inner.cfg.image_pull_deadline,
            Trouble::Unschedulable => self.inner.cfg.unschedulable_deadline,
        }
    }

    /// Looks at the pod's latest state; `Some` once the attempt is over.
    async fn evaluate(&self, name: &str, view: PodView, p: &mut Progress) -> Option<Ending> {
        let pod = match view {
            PodView::Unseen => return None,
            PodView::Gone { certain } => {
                if !p.seen && !certain {
                    // Listed before the create landed; the watch delivers it next.
                    return None;
                }
                p.gone = true;
                return Some(if p.deleting {
                    Ending {
                        outcome: CANCELLED,
                        message: None,
                    }
                } else {
                    Ending {
                        outcome: Outcome::Failed(FailureClass::Infra {
                            reason: InfraReason::Evicted,
                        }),
                        message: Some(
                            "the runner pod was deleted by someone other than this agent".into(),
                        ),
                    }
                });
            }
            PodView::Present(pod) => pod,
        };
        p.seen = true;
        let mut running = false;
        match observe(&pod, p.deleting, self.warm.then_some(p.started)) {
            Observation::Ended(ending) => return Some(ending),
            Observation::Waiting => p.trouble = None,
            Observation::PullFailing { message } => note_trouble(p, Trouble::Pull, message),
            Observation::Stuck { message } => note_trouble(p, Trouble::Stuck, message),
            Observation::Unschedulable { message } => {
                note_trouble(p, Trouble::Unschedulable, message);
            }
            Observation::Running { started_at_ms } => {
                p.trouble = None;
                running = true;
                // A warm pod's job container ran before its job: the wrapper's `started`
                // record says when the steps began.
                if !p.started && !self.warm {
                    self.mark_started(p, started_at_ms.unwrap_or_else(now_ms));
                }
            }
        }
        if p.log_retry_at.is_some_and(|at| Instant::now() >= at) {
            p.log_retry_at = None;
            if p.log_done && running {
                // The stream ended but the container still runs: follow it again.
                p.log_done = false;
            }
        }
        if running && p.log.is_none() && !p.log_done && p.log_retry_at.is_none() {
            p.log = self.follow(name, true, p.last_ts).await;
            if p.log.is_none() {
                p.log_retry_at = Some(Instant::now() + LOG_RETRY);
            }
        }
        None
    }

    fn mark_started(&self, p: &mut Progress, at_ms: u64) {
        // Kubernetes stamps container starts to the second: never report a start before
        // the attempt was accepted.
        let at_ms = at_ms.max(self.accepted_at_ms);
        p.started = true;
        let (job, fence) = (self.assignment.job, self.assignment.fence);
        self.inner.mark_started(&job, fence, at_ms);
        self.events
            .event(job, fence, RunnerEvent::Started { at_ms });
    }

    /// Opens the job container's log; `since_ms` skips what was read before.
    async fn follow(&self, name: &str, follow: bool, since_ms: u64) -> Option<Lines> {
        let params = LogParams {
            container: Some(render::JOB_CONTAINER.into()),
            follow,
            since_time: (since_ms > 0).then(|| chrono_from_ms(since_ms)).flatten(),
            ..LogParams::default()
        };
        match self.inner.pods.log_stream(name, &params).await {
            Ok(reader) => Some(bounded_lines(reader, MAX_LOG_LINE)),
            Err(e) => {
                tracing::debug!(pod = %name, error = %e, "Cannot follow the pod log yet.");
                None
            }
        }
    }

    fn on_log_line(&self, line: &str, p: &mut Progress) {
        let (job, fence) = (self.assignment.job, self.assignment.fence);
        let Ok(record) = serde_json::from_str::<Record>(line) else {
            // Not a record (a loader error, something written around the wrapper): kept as a
            // system line, stamped like the line before it so the order holds.
            self.events.event(
                job,
                fence,
                RunnerEvent::Line {
                    stream: Stream::System,
                    step: None,
                    text: line.to_owned(),
                    at_ms: p.last_ts.max(self.accepted_at_ms),
                },
            );
            return;
        };
        match record {
            Record::Started { ts } => {
                if !p.started {
                    self.mark_started(p, ts);
                }
            }
            Record::Finished { outcome, .. } => p.logged_outcome = Some(outcome),
            Record::Line { ts, .. } => {
                // After re-following from the last stamp, earlier lines were read already.
                if ts < p.last_ts {
                    return;
                }
                // A stamp far ahead of this clock is forged (steps can write to the wrapper's
                // stdout): it must not hide the lines after it.
                p.last_ts = ts.min(now_ms() + FUTURE_SLACK_MS);
                self.events.event(job, fence, record.into_event());
            }
        }
    }

    /// Reads the rest of the log once the pod ended: the open stream to its end, or the
    /// whole log when it was never followed (the pod ran and ended between two looks).
    async fn drain_log(&mut self, name: &str, p: &mut Progress) {
        let pod_ran = p.started || p.log.is_some();
        if p.log.is_none() && !p.log_done {
            if !pod_ran && !job_container_terminated(&self.view.borrow()) {
                return;
            }
            p.log = self.follow(name, false, p.last_ts).await;
        }
        let deadline = Instant::now() + LOG_DRAIN;
        while let Some(log) = &mut p.log {
            match tokio::time::timeout_at(deadline, log.next()).await {
                Ok(Some(Ok(line))) => self.on_log_line(&line, p),
                Ok(Some(Err(_)) | None) => break,
                Err(_) => {
                    tracing::warn!(pod = %name, "The pod's log did not end after the pod did.");
                    break;
                }
            }
        }
        p.log = None;
        p.log_done = true;
    }

    async fn delete_for_cancel(&self, name: &str, p: &mut Progress) {
        let grace = self.inner.cfg.cancel_grace;
        let params = DeleteParams {
            grace_period_seconds: Some(u32::try_from(grace.as_secs()).unwrap_or(u32::MAX)),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        p.delete_deadline = Some(Instant::now() + grace + CANCEL_SLACK);
        match self.inner.pods.delete(name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {
                // Already gone (it was created, or taken over, before this task got here).
                p.gone = true;
                p.delete_deadline = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(pod = %name, error = %e, "Could not delete the cancelled pod; the reaper retries.");
            }
        }
    }

    fn finish(&self, name: &str, ending: Ending, reap: bool) {
        let (job, fence) = (self.assignment.job, self.assignment.fence);
        if let Some(message) = ending.message {
            self.events.event(
                job,
                fence,
                RunnerEvent::Line {
                    stream: Stream::System,
                    step: None,
                    text: message,
                    at_ms: now_ms(),
                },
            );
        }
        self.inner.forget(&job, fence);
        if reap {
            // Kept until the federator has the report: it is the outcome's only durable
            // record should this agent restart first. Held before the report goes out, so
            // an acknowledgement can never arrive before there is something to release.
            self.inner.hold(job, fence, name.to_owned());
        }
        self.events.event(
            job,
            fence,
            RunnerEvent::Finished {
                outcome: ending.outcome,
                at_ms: now_ms(),
            },
        );
    }
}

fn note_trouble(p: &mut Progress, kind: Trouble, message: String) {
    match &mut p.trouble {
        Some((_, k, m)) if *k == kind => *m = message,
        _ => p.trouble = Some((Instant::now(), kind, message)),
    }
}

fn trouble_ending(kind: Trouble, message: String, after: Duration) -> Ending {
    let after = humantime::format_duration(after);
    match kind {
        Trouble::Pull => Ending {
            outcome: Outcome::Failed(FailureClass::Infra {
                reason: InfraReason::ImagePull,
            }),
            message: Some(format!(
                "the image could not be pulled for {after}: {message}"
            )),
        },
        Trouble::Stuck => Ending {
            outcome: CRASH,
            message: Some(format!(
                "the runner could not be created for {after}: {message}"
            )),
        },
        Trouble::Unschedulable => Ending {
            outcome: CRASH,
            message: Some(format!(
                "no node could take the runner for {after}: {message}"
            )),
        },
    }
}

/// Whether a warm pod's standby container is running (it has not handed a job over yet).
fn standby_running(view: &PodView) -> bool {
    let PodView::Present(pod) = view else {
        return false;
    };
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.name == render::STANDBY_CONTAINER
                    && c.state.as_ref().is_some_and(|s| s.running.is_some())
            })
        })
}

fn job_container_terminated(view: &PodView) -> bool {
    let PodView::Present(pod) = view else {
        return false;
    };
    terminated(pod)
}

fn terminated(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.name == render::JOB_CONTAINER
                    && c.state.as_ref().is_some_and(|s| s.terminated.is_some())
            })
        })
}

/// Lines of at most `max` bytes (longer ones split), invalid UTF-8 replaced: what a job can
/// write cannot exhaust the agent's memory or wedge the reader.
fn bounded_lines<R>(reader: R, max: usize) -> Lines
where
    R: futures::AsyncBufRead + Send + 'static,
{
    use futures::AsyncReadExt as _;
    let reader = Box::pin(reader);
    Box::pin(futures::stream::unfold(
        reader,
        move |mut reader| async move {
            let mut buf = Vec::new();
            let read = (&mut reader)
                .take(max as u64)
                .read_until(b'\n', &mut buf)
                .await;
            match read {
                Ok(0) => None,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                        if buf.last() == Some(&b'\r') {
                            buf.pop();
                        }
                    }
                    Some((Ok(String::from_utf8_lossy(&buf).into_owned()), reader))
                }
                Err(e) => Some((Err(e), reader)),
            }
        },
    ))
}

/// Outcomes the job state machine accepts only from a started attempt.
fn needs_start(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Succeeded | Outcome::Failed(FailureClass::Test { .. } | FailureClass::Timeout)
    )
}

async fn next_line(log: &mut Option<Lines>) -> Option<std::io::Result<String>> {
    match log {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

fn chrono_from_ms(ms: u64) -> Option<k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>> {
    // Kubernetes' sinceTime has second precision: step back a second and let the stamps
    // skip what was already read.
    let secs = i64::try_from(ms / 1000).ok()?.saturating_sub(1);
    k8s_openapi::chrono::DateTime::from_timestamp(secs, 0)
}
