//! The conformance suite every [`RunnerBackend`] must pass.
//!
//! A backend's tests implement [`Harness`] — the backend under test plus the few things only
//! the test environment can answer (which processes are still alive, whether a workspace is
//! still on disk, a repository to check out) — and call [`run_all`], or single cases, which
//! are public async functions that panic with a description of what went wrong.
//!
//! Each case uses its own job ids, so cases never see each other's events. [`run_all`] ends
//! with [`shutdown_cancels_everything_and_refuses_new_work`], after which the backend is
//! unusable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::pipeline::{Resources, Step};
use flotilla_core::runner::{
    Assignment, Checkout, RunnerBackend, RunnerError, RunnerEvent, RunnerEvents, Stream,
};
use flotilla_core::{Attempt, BuildId, Fence, JobId, ProjectId};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long any attempt in the suite may take to report `Finished`.
const FINISH_WITHIN: Duration = Duration::from_secs(60);
/// How soon a cancelled or timed-out attempt must report `Finished`.
const KILL_WITHIN: Duration = Duration::from_secs(10);
/// How long killed processes may take to disappear.
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// What the suite needs from the environment a backend runs in.
pub trait Harness: Send + Sync {
    /// The backend under test.
    fn backend(&self) -> Arc<dyn RunnerBackend>;

    /// How many live processes have `marker` in their command line, or `None` when this
    /// harness cannot see the backend's processes (the process checks are then skipped, with
    /// a message saying so).
    fn leftover_processes(&self, marker: &str) -> Option<usize>;

    /// Whether the workspace of `job`'s attempt under `fence` exists, or `None` when this
    /// harness cannot tell.
    fn workspace_exists(&self, job: JobId, fence: Fence) -> Option<bool>;

    /// A repository the backend can clone, with a known file at a known commit; `None`
    /// skips the checkout case.
    fn repo(&self) -> Option<RepoFixture>;

    /// True for a backend whose runners outlive it (kubernetes pods keep running through an
    /// agent restart and are taken over by the next agent): shutdown then leaves them
    /// running and reports nothing, instead of cancelling them.
    fn runners_outlive_the_backend(&self) -> bool {
        false
    }

    /// Adjusts an assignment before the suite starts it (an image or pool the backend
    /// needs). The default changes nothing.
    fn adjust(&self, assignment: &mut Assignment) {
        let _ = assignment;
    }
}

/// A repository for the checkout case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFixture {
    /// Where to check out from.
    pub checkout: Checkout,
    /// A file in the repository at `checkout.sha`, relative to its root.
    pub file: String,
    /// That file's only line.
    pub contents: String,
}

/// Records every event a backend reports, and waits for them.
#[derive(Debug)]
pub struct Collector {
    /// Per attempt, in the order reported.
    events: Mutex<HashMap<(JobId, Fence), Vec<RunnerEvent>>>,
    /// Counts events; waiters watch it.
    count: watch::Sender<usize>,
}

impl Default for Collector {
    fn default() -> Self {
        Self {
            events: Mutex::default(),
            count: watch::channel(0).0,
        }
    }
}

impl RunnerEvents for Collector {
    fn event(&self, job: JobId, fence: Fence, event: RunnerEvent) {
        self.lock().entry((job, fence)).or_default().push(event);
        self.count.send_modify(|n| *n += 1);
    }
}

impl Collector {
    /// An empty collector, ready to pass to [`RunnerBackend::start`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(JobId, Fence), Vec<RunnerEvent>>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The events of one attempt so far, in the order they were reported.
    pub fn events_of(&self, job: JobId, fence: Fence) -> Vec<RunnerEvent> {
        self.lock().get(&(job, fence)).cloned().unwrap_or_default()
    }

    /// Waits until `check` finds what it looks for in the attempt's events.
    pub async fn wait_until<T>(
        &self,
        job: JobId,
        fence: Fence,
        within: Duration,
        mut check: impl FnMut(&[RunnerEvent]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + within;
        let mut changes = self.count.subscribe();
        loop {
            changes.borrow_and_update();
            let found = {
                let events = self.lock();
                check(events.get(&(job, fence)).map_or(&[], Vec::as_slice))
            };
            if let Some(found) = found {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Waits for the attempt's `Finished`, returning all its events and the outcome.
    /// Panics when it does not come within `within`.
    pub async fn wait_finished(
        &self,
        job: JobId,
        fence: Fence,
        within: Duration,
    ) -> (Vec<RunnerEvent>, Outcome) {
        let found = self
            .wait_until(job, fence, within, |events| {
                events.iter().rev().find_map(|e| match e {
                    RunnerEvent::Finished { outcome, .. } => Some(*outcome),
                    _ => None,
                })
            })
            .await;
        let events = self.events_of(job, fence);
        match found {
            Some(outcome) => (events, outcome),
            None => panic!(
                "job {job} (fence {fence}) did not finish within {within:?}; events: {events:#?}"
            ),
        }
    }

    /// Waits for an output line (stdout or stderr) equal to `text`. Panics when it does not
    /// come within `within`.
    pub async fn wait_for_line(&self, job: JobId, fence: Fence, text: &str, within: Duration) {
        let found = self
            .wait_until(job, fence, within, |events| {
                output_lines(events)
                    .iter()
                    .any(|(_, _, t)| t == text)
                    .then_some(())
            })
            .await;
        if found.is_none() {
            let events = self.events_of(job, fence);
            panic!(
                "job {job} (fence {fence}) did not print {text:?} within {within:?}; events: {events:#?}"
            );
        }
    }
}

/// The stdout and stderr lines among `events`: (stream, step, text), in order.
pub fn output_lines(events: &[RunnerEvent]) -> Vec<(Stream, Option<u32>, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Line {
                stream: stream @ (Stream::Stdout | Stream::Stderr),
                step,
                text,
                ..
            } => Some((*stream, *step, text.clone())),
            _ => None,
        })
        .collect()
}

/// The runner's own lines among `events`.
pub fn system_lines(events: &[RunnerEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Line {
                stream: Stream::System,
                text,
                ..
            } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

/// An assignment of `job` under `fence` running `scripts` as its steps (named `step 1`, …),
/// with a two-minute timeout, no checkout and no environment.
pub fn assignment(job: JobId, fence: Fence, scripts: &[&str]) -> Assignment {
    Assignment {
        job,
        build: BuildId(1),
        project: ProjectId::new("conformance").expect("a valid project id"),
        attempt: Attempt::FIRST,
        fence,
        name: format!("conformance-{job}"),
        image: "debian:12-slim".to_owned(),
        steps: scripts
            .iter()
            .enumerate()
            .map(|(i, run)| Step {
                name: format!("step {}", i + 1),
                run: (*run).to_owned(),
            })
            .collect(),
        env: Vec::new(),
        secrets: Vec::new(),
        timeout_secs: 120,
        resources: Resources {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
        },
        pool: "default".to_owned(),
        checkout: None,
    }
}

/// How many live processes on this machine have `marker` in their command line (zombies
/// have an empty one). For harnesses whose runners are processes here.
pub fn processes_named(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(marker))
        .count()
}

/// Runs the git CLI in `dir` as a test author; panics with git's message on failure.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=Flotilla Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository under `root` with two commits on `main`; the fixture names the first,
/// whose `hello.txt` differs from the branch tip's, so only a checkout of that very commit
/// passes. Needs `git` on `PATH`.
pub fn two_commit_repository(root: &std::path::Path) -> RepoFixture {
    let work = root.join("work");
    std::fs::create_dir_all(&work).expect("create the work tree");
    git(&work, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(work.join("hello.txt"), "hello from the first commit\n").expect("write");
    git(&work, &["add", "hello.txt"]);
    git(&work, &["commit", "--quiet", "-m", "first"]);
    let sha = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("hello.txt"), "changed later\n").expect("write");
    git(&work, &["commit", "--quiet", "-am", "second"]);
    git(root, &["clone", "--quiet", "--bare", "work", "origin.git"]);
    RepoFixture {
        checkout: Checkout {
            repo_url: root.join("origin.git").to_string_lossy().into_owned(),
            git_ref: "refs/heads/main".to_owned(),
            sha,
        },
        file: "hello.txt".to_owned(),
        contents: "hello from the first commit".to_owned(),
    }
}

/// A marker unique to this process and call, to find a case's processes by command line.
pub fn unique_marker() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "flotilla-conformance-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A script line that starts `sleep 300` in the background under the name `marker`. The
/// marker is written in two quoted halves so that the step's own command line (which holds
/// the script text) never contains it: only the sleeping grandchild does.
fn background_sleeper(marker: &str) -> String {
    let (head, tail) = marker.split_at(marker.len() / 2);
    format!("bash -c 'exec -a \"$1\" sleep 300' sleeper \"{head}\"'{tail}' &")
}

#[allow(
    clippy::print_stderr,
    reason = "a skipped check must be visible in the test output"
)]
fn skipped(case: &str, what: &str) {
    eprintln!("conformance {case}: skipped {what}: the harness cannot tell");
}

async fn start(h: &dyn Harness, mut a: Assignment, events: &Arc<Collector>) {
    h.adjust(&mut a);
    let (job, fence) = (a.job, a.fence);
    let sink: Arc<dyn RunnerEvents> = events.clone();
    if let Err(e) = h.backend().start(a, sink).await {
        panic!("starting job {job} under fence {fence} failed: {e}");
    }
}

async fn cancel(h: &dyn Harness, job: JobId, fence: Fence) {
    if let Err(e) = h.backend().cancel(job, fence).await {
        panic!("cancelling job {job} under fence {fence} failed: {e}");
    }
}

async fn is_listed(h: &dyn Harness, job: JobId, fence: Fence) -> bool {
    match h.backend().list().await {
        Ok(infos) => infos.iter().any(|i| i.job == job && i.fence == fence),
        Err(e) => panic!("list failed: {e}"),
    }
}

/// Polls `leftover_processes(marker)` until `done` says yes; returns the last count.
async fn poll_processes(
    h: &dyn Harness,
    marker: &str,
    within: Duration,
    done: impl Fn(usize) -> bool,
) -> Option<usize> {
    let deadline = Instant::now() + within;
    loop {
        let count = h.leftover_processes(marker)?;
        if done(count) || Instant::now() >= deadline {
            return Some(count);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn finished_count(events: &[RunnerEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, RunnerEvent::Finished { .. }))
        .count()
}

/// Runs every case, the destructive shutdown case last. A backend whose runners outlive it
/// (see [`Harness::runners_outlive_the_backend`]) is shut down without its runners being
/// cancelled.
pub async fn run_all(h: &dyn Harness) {
    starts_and_streams_output(h).await;
    non_zero_exit_is_a_test_failure_and_stops_the_job(h).await;
    environment_comes_from_the_assignment(h).await;
    pipefail_is_on(h).await;
    cancel_kills_the_whole_process_tree(h).await;
    timeout_kills_the_whole_process_tree(h).await;
    cleanup_leaves_nothing_behind(h).await;
    cancel_of_an_unknown_attempt_or_another_fence_is_harmless(h).await;
    a_second_start_is_refused_and_a_newer_fence_replaces_the_older(h).await;
    checks_out_the_commit(h).await;
    a_failed_checkout_is_an_infra_failure(h).await;
    secrets_are_masked_in_every_form_a_job_prints_them(h).await;
    shutdown_cancels_everything_and_refuses_new_work(h).await;
}

/// The masking red team (ARCHITECTURE §10): a job prints its secret raw, with a prefix and
/// suffix, base64'd with and without padding and inside a larger base64 blob, URL-encoded,
/// JSON-escaped, split across two writes, on stderr and through `env`. Each step prints one
/// line, and every one comes out masked.
pub async fn secrets_are_masked_in_every_form_a_job_prints_them(h: &dyn Harness) {
    const SECRET: &str = "Sup3r\"s3cret/Value+42 x";
    let url: String = SECRET
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let json = serde_json::to_string(SECRET).expect("a string");
    let json = &json[1..json.len() - 1];
    let cases: [(&str, String); 10] = [
        ("raw", r#"printf '%s\n' "$SECRET_TOKEN""#.to_owned()),
        (
            "around",
            r#"printf 'before-%s-after\n' "$SECRET_TOKEN""#.to_owned(),
        ),
        (
            "base64",
            r#"printf '%s' "$SECRET_TOKEN" | base64 -w0; echo"#.to_owned(),
        ),
        (
            "base64 unpadded",
            r#"printf '%s' "$SECRET_TOKEN" | base64 -w0 | tr -d '='; echo"#.to_owned(),
        ),
        (
            "inside base64",
            r#"printf 'ab%sz' "$SECRET_TOKEN" | base64 -w0; echo"#.to_owned(),
        ),
        ("url", format!("printf '%s\\n' '{url}'")),
        ("json", format!("printf '%s\\n' '{json}'")),
        (
            "split",
            r#"printf '%s' "${SECRET_TOKEN:0:9}"; sleep 0.3; printf '%s\n' "${SECRET_TOKEN:9}""#
                .to_owned(),
        ),
        ("stderr", r#"printf '%s\n' "$SECRET_TOKEN" >&2"#.to_owned()),
        ("env", "env | grep '^SECRET_TOKEN='".to_owned()),
    ];
    let (job, fence) = (JobId(1301), Fence(1));
    let scripts: Vec<&str> = cases.iter().map(|(_, s)| s.as_str()).collect();
    let mut a = assignment(job, fence, &scripts);
    a.env = vec![("SECRET_TOKEN".into(), SECRET.into())];
    a.secrets = vec!["SECRET_TOKEN".into()];
    let events = Collector::new();
    start(h, a, &events).await;
    let (all, outcome) = events.wait_finished(job, fence, FINISH_WITHIN).await;
    assert_eq!(outcome, Outcome::Succeeded, "events: {all:#?}");
    let lines = output_lines(&all);
    for (step, (what, _)) in cases.iter().enumerate() {
        let printed: Vec<&str> = lines
            .iter()
            .filter(|(_, s, _)| *s == Some(step as u32))
            .map(|(_, _, t)| t.as_str())
            .collect();
        let [line] = printed[..] else {
            panic!("{what}: one line expected, got {printed:?}");
        };
        let expected = match *what {
            "around" => "before-***-after",
            "env" => "SECRET_TOKEN=***",
            // The blob's first and last characters also encode the bytes around the secret.
            "inside base64" => {
                let shown = line.replace("***", "");
                assert!(
                    line.contains("***") && shown.len() <= 6,
                    "{what}: more than the neighbours' characters shown: {line:?}"
                );
                continue;
            }
            _ => "***",
        };
        assert_eq!(line, expected, "{what}");
    }
    for event in &all {
        if let RunnerEvent::Line { stream, text, .. } = event {
            assert!(
                !text.contains(SECRET) && !text.contains("s3cret"),
                "a secret leaked on {stream:?}: {text:?}"
            );
        }
    }
}

/// `Started` comes before any output, each stream's lines arrive in order with the right
/// step, stamps never go backwards, and `Finished(Succeeded)` comes last, once.
pub async fn starts_and_streams_output(h: &dyn Harness) {
    let (job, fence) = (JobId(101), Fence(1));
    let events = Collector::new();
    let scripts = [
        "echo out-1; echo err-1 >&2; echo out-2",
        "echo err-2 >&2; echo out-3",
    ];
    start(h, assignment(job, fence, &scripts), &events).await;
    let (all, outcome) = events.wait_finished(job, fence, FINISH_WITHIN).await;
    assert_eq!(outcome, Outcome::Succeeded, "events: {all:#?}");

    let started_at = all
        .iter()
        .position(|e| matches!(e, RunnerEvent::Started { .. }));
    let started_count = all
        .iter()
        .filter(|e| matches!(e, RunnerEvent::Started { .. }))
        .count();
    assert_eq!(started_count, 1, "exactly one Started: {all:#?}");
    let first_output = all.iter().position(|e| {
        matches!(
            e,
            RunnerEvent::Line {
                stream: Stream::Stdout | Stream::Stderr,
                ..
            }
        )
    });
    assert!(
        started_at < first_output,
        "Started must precede all output: {all:#?}"
    );
    assert_eq!(finished_count(&all), 1, "exactly one Finished: {all:#?}");
    assert!(
        matches!(all.last(), Some(RunnerEvent::Finished { .. })),
        "Finished must be last: {all:#?}"
    );

    let lines = output_lines(&all);
    let of = |stream: Stream| -> Vec<(Option<u32>, String)> {
        lines
            .iter()
            .filter(|(s, _, _)| *s == stream)
            .map(|(_, step, text)| (*step, text.clone()))
            .collect()
    };
    let owned = |v: &[(u32, &str)]| -> Vec<(Option<u32>, String)> {
        v.iter().map(|(s, t)| (Some(*s), (*t).to_owned())).collect()
    };
    assert_eq!(
        of(Stream::Stdout),
        owned(&[(0, "out-1"), (0, "out-2"), (1, "out-3")])
    );
    assert_eq!(of(Stream::Stderr), owned(&[(0, "err-1"), (1, "err-2")]));

    let stamps: Vec<u64> = all
        .iter()
        .map(|e| match e {
            RunnerEvent::Started { at_ms }
            | RunnerEvent::Line { at_ms, .. }
            | RunnerEvent::Finished { at_ms, .. } => *at_ms,
        })
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "timestamps must not decrease: {stamps:?}"
    );
}

/// A step exiting 3 fails the job as `Test{3}` and the next step never runs.
pub async fn non_zero_exit_is_a_test_failure_and_stops_the_job(h: &dyn Harness) {
    let (job, fence) = (JobId(201), Fence(1));
    let events = Collector::new();
    start(
        h,
        assignment(job, fence, &["echo before; exit 3", "echo must not run"]),
        &events,
    )
    .await;
    let (all, outcome) = events.wait_finished(job, fence, FINISH_WITHIN).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Test { exit_code: 3 }),
        "events: {all:#?}"
    );
    let lines = output_lines(&all);
    assert!(lines.iter().any(|(_, _, t)| t == "before"), "{all:#?}");
    assert!(
        !lines.iter().any(|(_, _, t)| t == "must not run"),
        "the second step ran: {all:#?}"
    );
}

/// The step sees the assignment's variables (later entries win) and the `FLOTILLA_*` ones,
/// and not the agent's own environment.
pub async fn environment_comes_from_the_assignment(h: &dyn Harness) {
    let (job, fence) = (JobId(301), Fence(4));
    let events = Collector::new();
    let mut a = assignment(
        job,
        fence,
        &[
            r#"echo "greeting=$GREETING"; echo "job=$FLOTILLA_JOB_ID"; echo "fence=$FLOTILLA_FENCE"; echo "leak=${CARGO_MANIFEST_DIR:-none}""#,
        ],
    );
    a.env = vec![
        ("GREETING".to_owned(), "first".to_owned()),
        ("OTHER".to_owned(), "x".to_owned()),
        ("GREETING".to_owned(), "second".to_owned()),
    ];
    start(h, a, &events).await;
    let (all, outcome) = events.wait_finished(job, fence, FINISH_WITHIN).await;
    assert_eq!(outcome, Outcome::Succeeded, "events: {all:#?}");
    let stdout: Vec<String> = output_lines(&all)
        .into_iter()
        .filter(|(s, _, _)| *s == Stream::Stdout)
        .map(|(_, _, t)| t)
        .collect();
    assert_eq!(
        stdout,
        [
            "greeting=second".to_owned(),
            format!("job={job}"),
            format!("fence={fence}"),
            "leak=none".to_owned()
        ]
    );
}

/// `false | cat` fails the step: scripts run with `-o pipefail`.
pub async fn pipefail_is_on(h: &dyn Harness) {
    let (job, fence) = (JobId(401), Fence(1));
    let events = Collector::new();
    start(
        h,
        assignment(job, fence, &["false | cat; echo after"]),
        &events,
    )
    .await;
    let (all, outcome) = events.wait_finished(job, fence, FINISH_WITHIN).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Test { exit_code: 1 }),
        "events: {all:#?}"
    );
    assert!(!output_lines(&all).iter().any(|(_, _, t)| t == "after"));
}

/// Cancelling ends the attempt promptly as `Cancelled` and kills the step's background
/// grandchildren too, even one holding the output pipe.
pub async fn cancel_kills_the_whole_process_tree(h: &dyn Harness) {
    kill_case(h, JobId(501), KillBy::Cancel).await;
}

/// Running past the timeout ends the attempt as `Timeout` and kills the whole tree.
pub async fn timeout_kills_the_whole_process_tree(h: &dyn Harness) {
    kill_case(h, JobId(601), KillBy::Timeout).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillBy {
    Cancel,
    Timeout,
}

async fn kill_case(h: &dyn Harness, job: JobId, by: KillBy) {
    let case = match by {
        KillBy::Cancel => "cancel_kills_the_whole_process_tree",
        KillBy::Timeout => "timeout_kills_the_whole_process_tree",
    };
    let fence = Fence(1);
    let marker = unique_marker();
    let script = format!("{}\necho ready\nsleep 300", background_sleeper(&marker));
    let mut a = assignment(job, fence, &[&script]);
    if by == KillBy::Timeout {
        a.timeout_secs = 1;
    }
    let events = Collector::new();
    start(h, a, &events).await;
    events
        .wait_for_line(job, fence, "ready", FINISH_WITHIN)
        .await;
    if by == KillBy::Cancel {
        match poll_processes(h, &marker, GONE_WITHIN, |n| n >= 1).await {
            None => skipped(case, "the process checks"),
            Some(n) => assert!(n >= 1, "the background sleeper {marker} never showed up"),
        }
        cancel(h, job, fence).await;
    }
    let asked = Instant::now();
    let (all, outcome) = events.wait_finished(job, fence, FINISH_WITHIN).await;
    let expected = match by {
        KillBy::Cancel => FailureClass::Cancelled,
        KillBy::Timeout => FailureClass::Timeout,
    };
    assert_eq!(outcome, Outcome::Failed(expected), "events: {all:#?}");
    assert!(
        asked.elapsed() < KILL_WITHIN,
        "{case}: Finished took {:?}",
        asked.elapsed()
    );
    if by == KillBy::Timeout {
        let stamp = |want: fn(&RunnerEvent) -> bool| {
            all.iter().find(|e| want(e)).map(|e| match e {
                RunnerEvent::Started { at_ms }
                | RunnerEvent::Line { at_ms, .. }
                | RunnerEvent::Finished { at_ms, .. } => *at_ms,
            })
        };
        let started = stamp(|e| matches!(e, RunnerEvent::Started { .. }));
        let finished = stamp(|e| matches!(e, RunnerEvent::Finished { .. }));
        if let (Some(s), Some(f)) = (started, finished) {
            assert!(
                f >= s + 900,
                "timed out after {} ms, before the 1 s timeout",
                f - s
            );
        }
    }
    match poll_processes(h, &marker, GONE_WITHIN, |n| n == 0).await {
        None => skipped(case, "the process checks"),
        Some(n) => assert_eq!(n, 0, "{case}: {n} process(es) named {marker} survived"),
    }
    assert_eq!(finished_count(&all), 1);
}

/// While running, the attempt is listed and has a workspace; once `Finished` has been
/// reported, it is no longer listed and the workspace is gone.
pub async fn cleanup_leaves_nothing_behind(h: &dyn Harness) {
    let (job, fence) = (JobId(701), Fence(9));
    let events = Collector::new();
    let mut a = assignment(job, fence, &["echo data > file; echo ready; sleep 300"]);
    a.timeout_secs = 77;
    start(h, a, &events).await;
    events
        .wait_for_line(job, fence, "ready", FINISH_WITHIN)
        .await;
    let infos = h.backend().list().await.expect("list");
    let info = infos
        .iter()
        .find(|i| i.job == job && i.fence == fence)
        .unwrap_or_else(|| panic!("a running attempt is listed: {infos:?}"));
    assert_eq!(info.timeout_secs, 77);
    assert!(info.started_at_ms.is_some(), "started: {info:?}");
    assert!(info.started_at_ms >= Some(info.accepted_at_ms), "{info:?}");
    match h.workspace_exists(job, fence) {
        None => skipped("cleanup_leaves_nothing_behind", "the workspace checks"),
        Some(exists) => assert!(exists, "a running attempt has a workspace"),
    }

    cancel(h, job, fence).await;
    let (all, outcome) = events.wait_finished(job, fence, KILL_WITHIN).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Cancelled),
        "{all:#?}"
    );
    // No polling: the contract is that cleanup is done before Finished is reported.
    assert!(
        !is_listed(h, job, fence).await,
        "a finished attempt is still listed"
    );
    if let Some(exists) = h.workspace_exists(job, fence) {
        assert!(!exists, "the workspace outlived the attempt");
    }
}

/// Cancelling an attempt the backend does not run — an unknown job, or a known job under
/// another fence — succeeds and changes nothing; cancelling twice is harmless.
pub async fn cancel_of_an_unknown_attempt_or_another_fence_is_harmless(h: &dyn Harness) {
    let (job, fence) = (JobId(801), Fence(5));
    cancel(h, JobId(899), Fence(1)).await;
    let events = Collector::new();
    start(
        h,
        assignment(job, fence, &["echo ready; sleep 300"]),
        &events,
    )
    .await;
    events
        .wait_for_line(job, fence, "ready", FINISH_WITHIN)
        .await;
    cancel(h, job, Fence(4)).await;
    cancel(h, job, Fence(6)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        is_listed(h, job, fence).await,
        "cancelling another fence stopped the attempt"
    );
    assert_eq!(finished_count(&events.events_of(job, fence)), 0);

    cancel(h, job, fence).await;
    cancel(h, job, fence).await;
    let (all, outcome) = events.wait_finished(job, fence, KILL_WITHIN).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Cancelled),
        "{all:#?}"
    );
    cancel(h, job, fence).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(finished_count(&events.events_of(job, fence)), 1);
}

/// Starting a running attempt again, or an older one, is refused as `AlreadyRunning` with
/// the running fence; a newer fence stops the stale attempt and runs.
pub async fn a_second_start_is_refused_and_a_newer_fence_replaces_the_older(h: &dyn Harness) {
    let job = JobId(901);
    let events = Collector::new();
    let sleeper = |fence| assignment(job, Fence(fence), &["echo ready; sleep 300"]);
    start(h, sleeper(5), &events).await;
    let backend = h.backend();
    for again in [5, 4] {
        let mut a = sleeper(again);
        h.adjust(&mut a);
        let sink: Arc<dyn RunnerEvents> = events.clone();
        let refused = backend.start(a, sink).await;
        assert_eq!(
            refused,
            Err(RunnerError::AlreadyRunning {
                job,
                fence: Fence(5)
            }),
            "starting fence {again} while fence 5 runs"
        );
    }
    events
        .wait_for_line(job, Fence(5), "ready", FINISH_WITHIN)
        .await;

    start(h, sleeper(6), &events).await;
    let (old, outcome) = events.wait_finished(job, Fence(5), KILL_WITHIN).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Cancelled),
        "the stale attempt: {old:#?}"
    );
    assert_eq!(finished_count(&old), 1);
    events
        .wait_for_line(job, Fence(6), "ready", FINISH_WITHIN)
        .await;
    assert!(events.events_of(job, Fence(4)).is_empty());
    cancel(h, job, Fence(6)).await;
    let (_, outcome) = events.wait_finished(job, Fence(6), KILL_WITHIN).await;
    assert_eq!(outcome, Outcome::Failed(FailureClass::Cancelled));
}

/// A step can read a file of the repository at the assigned commit, on the first checkout
/// of the repository and on the next (from whatever the backend cached).
pub async fn checks_out_the_commit(h: &dyn Harness) {
    let Some(repo) = h.repo() else {
        skipped("checks_out_the_commit", "the checkout case (no repository)");
        return;
    };
    for (job, fence) in [(JobId(1001), Fence(1)), (JobId(1002), Fence(1))] {
        let events = Collector::new();
        let mut a = assignment(job, fence, &[&format!("cat '{}'", repo.file)]);
        a.checkout = Some(repo.checkout.clone());
        start(h, a, &events).await;
        let (all, outcome) = events.wait_finished(job, fence, FINISH_WITHIN).await;
        assert_eq!(outcome, Outcome::Succeeded, "events: {all:#?}");
        assert!(
            output_lines(&all)
                .iter()
                .any(|(s, _, t)| *s == Stream::Stdout && *t == repo.contents),
            "the step did not print {:?}: {all:#?}",
            repo.contents
        );
    }
}

/// A commit that is not in the repository fails the attempt as `Infra{RunnerCrash}`,
/// with an explanation, before any step starts.
pub async fn a_failed_checkout_is_an_infra_failure(h: &dyn Harness) {
    let Some(repo) = h.repo() else {
        skipped(
            "a_failed_checkout_is_an_infra_failure",
            "the checkout case (no repository)",
        );
        return;
    };
    let (job, fence) = (JobId(1101), Fence(1));
    let events = Collector::new();
    let mut a = assignment(job, fence, &["echo must not run"]);
    a.checkout = Some(Checkout {
        sha: "0123456789abcdef0123456789abcdef01234567".to_owned(),
        ..repo.checkout
    });
    start(h, a, &events).await;
    let (all, outcome) = events.wait_finished(job, fence, FINISH_WITHIN).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Infra {
            reason: InfraReason::RunnerCrash
        }),
        "events: {all:#?}"
    );
    assert!(
        !all.iter().any(|e| matches!(e, RunnerEvent::Started { .. })),
        "no step started: {all:#?}"
    );
    assert!(!system_lines(&all).is_empty(), "the failure is explained");
    assert!(output_lines(&all).is_empty(), "{all:#?}");
}

/// Shutdown cancels every running attempt (each reports `Cancelled` before shutdown
/// returns) — or, for runners that outlive the backend, leaves them unreported for the next
/// agent — and new attempts are refused as `Unavailable`.
pub async fn shutdown_cancels_everything_and_refuses_new_work(h: &dyn Harness) {
    let events = Collector::new();
    let jobs = [JobId(1201), JobId(1202)];
    for job in jobs {
        start(
            h,
            assignment(job, Fence(1), &["echo ready; sleep 300"]),
            &events,
        )
        .await;
    }
    for job in jobs {
        events
            .wait_for_line(job, Fence(1), "ready", FINISH_WITHIN)
            .await;
    }
    let backend = h.backend();
    tokio::time::timeout(KILL_WITHIN, backend.shutdown())
        .await
        .expect("shutdown finishes promptly");
    for job in jobs {
        let all = events.events_of(job, Fence(1));
        if h.runners_outlive_the_backend() {
            assert_eq!(
                finished_count(&all),
                0,
                "job {job}'s runner outlives the backend, so nothing may report it ended: {all:#?}"
            );
            continue;
        }
        assert!(
            matches!(
                all.last(),
                Some(RunnerEvent::Finished {
                    outcome: Outcome::Failed(FailureClass::Cancelled),
                    ..
                })
            ),
            "job {job} was not reported cancelled by the time shutdown returned: {all:#?}"
        );
    }
    let mut late = assignment(JobId(1203), Fence(1), &["echo too late"]);
    h.adjust(&mut late);
    let sink: Arc<dyn RunnerEvents> = events.clone();
    let refused = backend.start(late, sink).await;
    assert!(
        matches!(refused, Err(RunnerError::Unavailable(_))),
        "a start after shutdown: {refused:?}"
    );
    assert!(backend.list().await.expect("list").is_empty());
}
