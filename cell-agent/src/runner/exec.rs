//! `flotilla runner exec`: runs a job's steps inside the job container of a runner pod.
//!
//! The cell agent renders the job's [`Assignment`] into the pod as a JSON file (the *spec*);
//! this reads it, runs its steps in the workspace with the local backend's step runner
//! ([`run_in_place`]: `bash -eo pipefail -c`, one process group per step, the timeout counted
//! from the first step), and reports the way [`record`](super::record) describes: every event
//! as one JSON record per line on its output (the pod's log), then the outcome in the
//! container's termination message. SIGTERM and SIGINT (the pod being deleted) stop the
//! attempt: the running step's whole process group is killed and the outcome is `Cancelled`.
//!
//! What goes where, in order:
//! 1. a system line naming the job (or, when the job cannot be run at all, why not);
//! 2. the events of [`run_in_place`] (step headers, `started`, the steps' output);
//! 3. the [`Termination`] written to `--termination-log` (a system line says so when that
//!    fails: outside Kubernetes there may be no such file);
//! 4. the `finished` record, always the last line.
//!
//! The exit status follows [`exit_code_for`]: 0, the failing step's code, 124 on timeout, 130
//! when cancelled, 125 when the wrapper could not run the job.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::{Assignment, RunnerEvent, RunnerEvents};
use flotilla_core::{Fence, JobId};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::record::{PROTOCOL_VERSION, Record, Termination, exit_code_for};
use crate::backend::local::{now_ms, run_in_place};

const CRASH: Outcome = Outcome::Failed(FailureClass::Infra {
    reason: InfraReason::RunnerCrash,
});

/// What `flotilla runner exec` is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOptions {
    /// The job spec: an [`Assignment`] as JSON.
    pub spec: PathBuf,
    /// The directory the steps run in; created when missing.
    pub workspace: PathBuf,
    /// Where to write the [`Termination`] (the container's `terminationMessagePath`);
    /// `None` writes none.
    pub termination_log: Option<PathBuf>,
    /// The record protocol the caller expects; anything but [`PROTOCOL_VERSION`] is refused.
    pub protocol: u32,
}

/// Runs the job `opts.spec` describes, writing its records to `out` (one per line, flushed
/// line by line), and returns the wrapper's exit status (see the module documentation).
///
/// Listens for SIGTERM and SIGINT for as long as it runs (must be called inside a Tokio
/// runtime with signals and timers enabled): either one cancels the attempt.
pub async fn exec<W: Write + Send + 'static>(opts: &ExecOptions, out: W) -> u8 {
    let sink = Arc::new(RecordSink::new(out));
    let (stop_tx, stop) = watch::channel(false);
    // Held here until the end: a dropped sender would count as a stop.
    let stop_tx = Arc::new(stop_tx);
    let signals = Signals::listen(&sink, &stop_tx);

    let (outcome, message) = match prepare(opts).await {
        Err(why) => {
            sink.system(why.clone());
            (CRASH, Some(why))
        }
        Ok((assignment, workspace)) => {
            sink.system(format!(
                "flotilla runner exec {}: job {} ({}), attempt {}, fence {}: {} step(s) in {}",
                env!("CARGO_PKG_VERSION"),
                assignment.job,
                assignment.name,
                assignment.attempt,
                assignment.fence,
                assignment.steps.len(),
                workspace.display(),
            ));
            let events: Arc<dyn RunnerEvents> = sink.clone();
            let outcome = run_in_place(&assignment, &workspace, events, stop).await;
            let message = failure_message(&assignment, outcome, &sink, signals.as_ref());
            (outcome, message)
        }
    };
    drop(signals);
    drop(stop_tx);
    write_termination(&sink, opts.termination_log.as_deref(), outcome, message);
    sink.finish(outcome);
    exit_code_for(outcome)
}

/// Checks the protocol, reads the spec and makes sure the workspace exists, returning the
/// assignment and the workspace as an absolute path (steps see it as `FLOTILLA_WORKSPACE`);
/// `Err` says in one sentence why the job cannot run.
async fn prepare(opts: &ExecOptions) -> Result<(Assignment, PathBuf), String> {
    if opts.protocol != PROTOCOL_VERSION {
        return Err(format!(
            "this wrapper writes record protocol {PROTOCOL_VERSION} but was asked for protocol \
             {}: the flotilla binary in the runner image and the cell agent are incompatible \
             versions",
            opts.protocol
        ));
    }
    let assignment = read_spec(&opts.spec).await?;
    let cannot = |e: std::io::Error| {
        format!(
            "could not create the workspace {}: {e}",
            opts.workspace.display()
        )
    };
    let workspace = std::path::absolute(&opts.workspace).map_err(cannot)?;
    tokio::fs::create_dir_all(&workspace)
        .await
        .map_err(cannot)?;
    Ok((assignment, workspace))
}

/// Reads the job spec; `Err` says why it cannot be used.
pub(super) async fn read_spec(path: &Path) -> Result<Assignment, String> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| format!("could not read the job spec {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "the job spec {} is not an assignment this wrapper understands: {e}",
            path.display()
        )
    })
}

/// Why the attempt failed, in one sentence, for the termination message.
fn failure_message<W: Write>(
    assignment: &Assignment,
    outcome: Outcome,
    sink: &RecordSink<W>,
    signals: Option<&Signals>,
) -> Option<String> {
    let Outcome::Failed(class) = outcome else {
        return None;
    };
    Some(match class {
        FailureClass::Test { exit_code } => {
            let step = sink
                .lock()
                .last_step
                .and_then(|i| Some((i, assignment.steps.get(usize::try_from(i).ok()?)?)));
            match step {
                Some((i, step)) => format!(
                    "step {} ({}) failed with exit code {exit_code}",
                    u64::from(i) + 1,
                    step.name
                ),
                None => format!("a step failed with exit code {exit_code}"),
            }
        }
        FailureClass::Timeout => format!(
            "the job ran past its timeout of {} s",
            assignment.timeout_secs
        ),
        FailureClass::Cancelled => match signals.and_then(Signals::caught) {
            Some(signal) => format!("cancelled by {signal}"),
            None => "cancelled".to_owned(),
        },
        // The step runner says why in a system line before it gives up.
        FailureClass::Config | FailureClass::Infra { .. } => sink
            .lock()
            .last_system
            .clone()
            .unwrap_or_else(|| "the runner could not run the job".to_owned()),
    })
}

/// Writes the termination message to `path`; a failure becomes a system line, since the
/// records on the output carry the outcome too.
pub(super) fn write_termination<W: Write>(
    sink: &RecordSink<W>,
    path: Option<&Path>,
    outcome: Outcome,
    message: Option<String>,
) {
    let Some(path) = path else {
        return;
    };
    let termination = Termination {
        v: PROTOCOL_VERSION,
        outcome,
        message,
    };
    if let Err(e) = std::fs::write(path, termination.to_json()) {
        sink.system(format!(
            "could not write the termination message to {}: {e}",
            path.display()
        ));
    }
}

/// Writes records to the wrapper's output, one per line, flushed line by line, with stamps
/// that never go backwards. As a [`RunnerEvents`] sink it holds `Finished` back, so that
/// [`RecordSink::finish`] can still write system lines before the record that must be last.
///
/// Writes block (that is the backpressure on a step flooding its output) and their errors
/// are ignored: with the log gone, the termination message still carries the outcome.
pub(super) struct RecordSink<W> {
    state: Mutex<SinkState<W>>,
}

pub(super) struct SinkState<W> {
    out: W,
    /// The latest stamp written.
    last_ms: u64,
    /// The stamp of the held-back `Finished`.
    finished_ms: Option<u64>,
    /// The text of the latest system line.
    last_system: Option<String>,
    /// The step of the latest line that had one.
    last_step: Option<u32>,
}

impl<W: Write> RecordSink<W> {
    pub(super) fn new(out: W) -> Self {
        Self {
            state: Mutex::new(SinkState {
                out,
                last_ms: 0,
                finished_ms: None,
                last_system: None,
                last_step: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SinkState<W>> {
        // A panic half-way through a write leaves nothing inconsistent worth refusing.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a line from the wrapper itself, outside any step.
    pub(super) fn system(&self, text: impl Into<String>) {
        self.lock().write(Record::system(now_ms(), text));
    }

    /// Writes the `finished` record: the held-back one's stamp when the attempt reported
    /// one, now otherwise.
    pub(super) fn finish(&self, outcome: Outcome) {
        let mut state = self.lock();
        let ts = state.finished_ms.take().unwrap_or_else(now_ms);
        state.write(Record::Finished { ts, outcome });
    }
}

impl<W: Write> SinkState<W> {
    fn write(&mut self, mut record: Record) {
        let ts = record.ts().max(self.last_ms);
        match &mut record {
            Record::Line { ts: at, .. }
            | Record::Started { ts: at }
            | Record::Finished { ts: at, .. } => *at = ts,
        }
        self.last_ms = ts;
        if let Record::Line { s, step, t, .. } = &record {
            if *s == super::record::WireStream::System {
                self.last_system = Some(t.clone());
            }
            if step.is_some() {
                self.last_step = *step;
            }
        }
        let line = record.to_line();
        let _ = writeln!(self.out, "{line}").and_then(|()| self.out.flush());
    }
}

impl<W: Write + Send + 'static> RunnerEvents for RecordSink<W> {
    fn event(&self, _job: JobId, _fence: Fence, event: RunnerEvent) {
        let mut state = self.lock();
        match event {
            RunnerEvent::Finished { at_ms, .. } => state.finished_ms = Some(at_ms),
            other => state.write(Record::from_event(&other)),
        }
    }
}

/// Listens for SIGTERM and SIGINT until dropped; the first one received fires the stop.
pub(super) struct Signals {
    task: JoinHandle<()>,
    caught: Arc<OnceLock<&'static str>>,
}

impl Signals {
    /// Starts listening; when that is impossible, says so in a system line and returns
    /// `None` (a signal then ends the wrapper without a report).
    pub(super) fn listen<W: Write>(
        sink: &RecordSink<W>,
        stop: &Arc<watch::Sender<bool>>,
    ) -> Option<Self> {
        let listeners = signal(SignalKind::terminate())
            .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
        let (mut term, mut int) = match listeners {
            Ok(listeners) => listeners,
            Err(e) => {
                sink.system(format!(
                    "cannot listen for SIGTERM and SIGINT, so a stop ends the wrapper without \
                     a report: {e}"
                ));
                return None;
            }
        };
        let caught = Arc::new(OnceLock::new());
        let task = tokio::spawn({
            let caught = caught.clone();
            let stop = stop.clone();
            async move {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                let _ = caught.set(name);
                stop.send_replace(true);
            }
        });
        Some(Self { task, caught })
    }

    /// The signal that fired the stop, if one did.
    pub(super) fn caught(&self) -> Option<&'static str> {
        self.caught.get().copied()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals")
            .field("caught", &self.caught())
            .finish_non_exhaustive()
    }
}
