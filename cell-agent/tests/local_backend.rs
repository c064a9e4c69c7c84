//! The local backend against the conformance suite (sandboxed when bwrap works here, and
//! unsandboxed), plus what only the local backend promises: sandbox isolation between jobs,
//! refusing to run unsandboxed when the sandbox is required, and output handling.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flotilla_cell_agent::backend::conformance::{
    self, Collector, Harness, RepoFixture, assignment, output_lines, system_lines,
};
use flotilla_cell_agent::backend::local::{LocalBackend, LocalConfig, MAX_LINE_BYTES, SandboxMode};
use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::{RunnerBackend, RunnerEvent, RunnerEvents, Stream};
use flotilla_core::{Fence, JobId};
use tempfile::TempDir;

const WITHIN: Duration = Duration::from_secs(60);

struct LocalHarness {
    backend: Arc<LocalBackend>,
    repo: Option<RepoFixture>,
    _dirs: Vec<TempDir>,
}

impl LocalHarness {
    fn new(sandbox: SandboxMode) -> Self {
        let data = TempDir::new().unwrap();
        let mut config = LocalConfig::new(data.path());
        config.sandbox = sandbox;
        let backend = Arc::new(LocalBackend::new(config).unwrap());
        let repos = TempDir::new().unwrap();
        let repo = conformance::two_commit_repository(repos.path());
        Self {
            backend,
            repo: Some(repo),
            _dirs: vec![data, repos],
        }
    }
}

impl Harness for LocalHarness {
    fn backend(&self) -> Arc<dyn RunnerBackend> {
        self.backend.clone()
    }

    fn leftover_processes(&self, marker: &str) -> Option<usize> {
        Some(conformance::processes_named(marker))
    }

    fn workspace_exists(&self, job: JobId, fence: Fence) -> Option<bool> {
        Some(self.backend.workspace_path(&job, fence).exists())
    }

    fn repo(&self) -> Option<RepoFixture> {
        self.repo.clone()
    }
}

/// Waits up to two seconds for the processes named `marker` to disappear (the kernel ends
/// the processes of a PID namespace asynchronously); returns how many are left.
async fn processes_gone(marker: &str) -> usize {
    for _ in 0..40 {
        if conformance::processes_named(marker) == 0 {
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    conformance::processes_named(marker)
}

fn stdout_of(events: &[RunnerEvent]) -> Vec<String> {
    output_lines(events)
        .into_iter()
        .filter(|(s, _, _)| *s == Stream::Stdout)
        .map(|(_, _, t)| t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)]
async fn the_local_backend_passes_the_conformance_suite_sandboxed_when_bwrap_works() {
    let harness = LocalHarness::new(SandboxMode::Auto);
    if !harness.backend.sandboxed() {
        eprintln!("note: bwrap is unavailable here, so this run is unsandboxed too");
    }
    conformance::run_all(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_backend_passes_the_conformance_suite_unsandboxed() {
    let harness = LocalHarness::new(SandboxMode::Off);
    assert!(!harness.backend.sandboxed());
    conformance::run_all(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)]
async fn a_job_in_one_sandbox_cannot_read_another_jobs_workspace() {
    // Wherever bwrap is missing, Auto must say it is not sandboxing.
    let data = TempDir::new().unwrap();
    let mut config = LocalConfig::new(data.path());
    config.bwrap_path = Some(PathBuf::from("/nonexistent/bwrap"));
    assert!(!LocalBackend::new(config).unwrap().sandboxed());

    let data = TempDir::new().unwrap();
    let backend = LocalBackend::new(LocalConfig::new(data.path())).unwrap();
    if !backend.sandboxed() {
        eprintln!("skipped: bwrap is not installed or cannot build a sandbox here");
        return;
    }
    let events = Collector::new();
    let sink: Arc<dyn RunnerEvents> = events.clone();
    let (a, b) = (JobId(1), JobId(2));
    let fence = Fence(1);
    backend
        .start(
            assignment(a, fence, &["echo s3cret > secret; echo ready; sleep 300"]),
            sink.clone(),
        )
        .await
        .unwrap();
    events.wait_for_line(a, fence, "ready", WITHIN).await;
    let secret = backend.workspace_path(&a, fence).join("secret");
    assert!(secret.exists(), "job A wrote its secret");

    let work_dir = backend.config().work_dir.clone();
    let data_dir = data.path().canonicalize().unwrap();
    let probe = format!(
        "set +e\n\
         cat '{secret}'\n\
         echo \"cat exited $?\"\n\
         ls -1 '{work}'\n\
         # root in the sandbox must not be able to lift the tmpfs that hides the data dir\n\
         umount -l '{data}' 2>/dev/null\n\
         umount -l /tmp 2>/dev/null\n\
         cat '{secret}' 2>/dev/null\n\
         echo done",
        secret = secret.display(),
        work = work_dir.display(),
        data = data_dir.display(),
    );
    backend
        .start(assignment(b, fence, &[&probe]), sink)
        .await
        .unwrap();
    let (b_events, outcome) = events.wait_finished(b, fence, WITHIN).await;
    assert_eq!(outcome, Outcome::Succeeded, "{b_events:#?}");
    let out = stdout_of(&b_events);
    assert!(
        !out.iter().any(|l| l.contains("s3cret")),
        "job B read job A's secret: {out:?}"
    );
    assert_eq!(
        out,
        ["cat exited 1", &format!("{b}-{fence}"), "done"],
        "job B sees only its own workspace"
    );

    backend.cancel(a, fence).await.unwrap();
    let (_, outcome) = events.wait_finished(a, fence, WITHIN).await;
    assert_eq!(outcome, Outcome::Failed(FailureClass::Cancelled));
    backend.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)]
async fn a_sandboxed_job_cannot_alter_the_shared_git_mirror() {
    let data = TempDir::new().unwrap();
    let backend = LocalBackend::new(LocalConfig::new(data.path())).unwrap();
    if !backend.sandboxed() {
        eprintln!("skipped: bwrap is not installed or cannot build a sandbox here");
        return;
    }
    let repos = TempDir::new().unwrap();
    let repo = conformance::two_commit_repository(repos.path());
    // The workspace reads its objects from the mirror; altering them would poison the
    // checkouts of every later job of the repository. The job tries every file it can find.
    let poison = "set +e\n\
                  mirror=$(cat .git/objects/info/alternates 2>/dev/null)\n\
                  touch \"$mirror/poison\" 2>/dev/null && echo wrote into the mirror\n\
                  for f in $(find .git/objects $mirror -type f 2>/dev/null); do\n\
                  chmod u+w \"$f\" 2>/dev/null; printf x >> \"$f\" 2>/dev/null\n\
                  done\n\
                  cat hello.txt";
    let events = Collector::new();
    let (job, fence) = (JobId(31), Fence(1));
    let mut a = assignment(job, fence, &[poison]);
    a.checkout = Some(repo.checkout.clone());
    backend.start(a, events.clone()).await.unwrap();
    let (all, outcome) = events.wait_finished(job, fence, WITHIN).await;
    assert_eq!(outcome, Outcome::Succeeded, "{all:#?}");
    assert_eq!(stdout_of(&all), [repo.contents.as_str()]);

    let mirrors: Vec<PathBuf> = std::fs::read_dir(&backend.config().mirror_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(mirrors.len(), 1, "one mirror: {mirrors:?}");
    assert!(!mirrors[0].join("objects/poison").exists());
    let fsck = Command::new("git")
        .arg("-C")
        .arg(&mirrors[0])
        .args(["fsck", "--strict", "--no-dangling"])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "the mirror was altered: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    backend.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_sandbox_without_bwrap_fails_the_attempt_as_infra() {
    let data = TempDir::new().unwrap();
    let mut config = LocalConfig::new(data.path());
    config.sandbox = SandboxMode::Required;
    config.bwrap_path = Some(PathBuf::from("/nonexistent/bwrap"));
    let backend = LocalBackend::new(config).unwrap();
    assert!(!backend.sandboxed());

    let events = Collector::new();
    let (job, fence) = (JobId(7), Fence(3));
    backend
        .start(
            assignment(job, fence, &["echo must not run"]),
            events.clone(),
        )
        .await
        .unwrap();
    let (all, outcome) = events.wait_finished(job, fence, WITHIN).await;
    assert_eq!(
        outcome,
        Outcome::Failed(FailureClass::Infra {
            reason: InfraReason::RunnerCrash
        })
    );
    assert!(output_lines(&all).is_empty(), "nothing ran: {all:#?}");
    assert!(!all.iter().any(|e| matches!(e, RunnerEvent::Started { .. })));
    let why = system_lines(&all).join("\n");
    assert!(
        why.contains("sandbox is required") && why.contains("/nonexistent/bwrap"),
        "the reason is given: {why}"
    );
    assert!(!backend.workspace_path(&job, fence).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lines_are_split_invalid_utf8_is_replaced_and_every_line_arrives_in_order() {
    let data = TempDir::new().unwrap();
    let backend = LocalBackend::new(LocalConfig::new(data.path())).unwrap();
    let events = Collector::new();
    let (job, fence) = (JobId(11), Fence(1));
    // 200 000 bytes of `a`; then one `a` and 70 000 two-byte `é`, so the 64 KiB boundary
    // falls inside a character; then bad bytes, CRLF, and a last line without a newline.
    let shapes = "head -c 200000 /dev/zero | tr '\\0' a; echo\n\
                  printf a; head -c 70000 /dev/zero | tr '\\0' x | sed 's/x/é/g'; echo\n\
                  printf 'bad \\xff\\xfe bytes\\n'\n\
                  printf 'crlf\\r\\n'\n\
                  printf 'no newline at the end'";
    backend
        .start(
            assignment(job, fence, &[shapes, "seq 1 20000"]),
            events.clone(),
        )
        .await
        .unwrap();
    let (all, outcome) = events.wait_finished(job, fence, WITHIN).await;
    assert_eq!(outcome, Outcome::Succeeded);
    let lines = output_lines(&all);
    assert!(
        lines.iter().all(|(s, _, _)| *s == Stream::Stdout),
        "nothing on stderr"
    );

    let first: Vec<&str> = lines
        .iter()
        .filter(|(_, step, _)| *step == Some(0))
        .map(|(_, _, t)| t.as_str())
        .collect();
    let a_pieces: Vec<usize> = first.iter().take(4).map(|t| t.len()).collect();
    assert_eq!(
        a_pieces,
        [MAX_LINE_BYTES, MAX_LINE_BYTES, MAX_LINE_BYTES, 3392]
    );
    assert!(first[..4].iter().all(|t| t.bytes().all(|b| b == b'a')));
    let accents: Vec<&str> = first[4..]
        .iter()
        .take_while(|t| t.starts_with('a') || t.starts_with('é'))
        .copied()
        .collect();
    assert_eq!(accents.len(), 3, "141 001 bytes make three pieces");
    assert!(accents.iter().all(|t| t.len() <= MAX_LINE_BYTES));
    assert_eq!(accents.concat(), format!("a{}", "é".repeat(70_000)));
    assert_eq!(
        first[7..],
        [
            "bad \u{FFFD}\u{FFFD} bytes",
            "crlf",
            "no newline at the end"
        ]
    );

    let numbers: Vec<&str> = lines
        .iter()
        .filter(|(_, step, _)| *step == Some(1))
        .map(|(_, _, t)| t.as_str())
        .collect();
    let expected: Vec<String> = (1..=20_000).map(|n| n.to_string()).collect();
    assert_eq!(numbers, expected);
    backend.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_process_does_not_outlive_its_step_or_hold_its_output_open() {
    for sandbox in [SandboxMode::Auto, SandboxMode::Off] {
        let data = TempDir::new().unwrap();
        let mut config = LocalConfig::new(data.path());
        config.sandbox = sandbox;
        let backend = LocalBackend::new(config).unwrap();
        let marker = conformance::unique_marker();
        let (head, tail) = marker.split_at(marker.len() / 2);
        let spawn = format!(
            "bash -c 'exec -a \"$1\" sleep 300' sleeper \"{head}\"'{tail}' &\necho spawned"
        );
        let events = Collector::new();
        let (job, fence) = (JobId(21), Fence(1));
        backend
            .start(
                assignment(job, fence, &[&spawn, "echo second"]),
                events.clone(),
            )
            .await
            .unwrap();
        let (all, outcome) = events.wait_finished(job, fence, WITHIN).await;
        assert_eq!(outcome, Outcome::Succeeded, "{sandbox:?}: {all:#?}");
        assert_eq!(stdout_of(&all), ["spawned", "second"], "{sandbox:?}");
        assert!(
            !system_lines(&all)
                .iter()
                .any(|l| l.contains("holds its output open")),
            "{sandbox:?}: the step waited on a leftover process: {all:#?}"
        );
        assert_eq!(
            processes_gone(&marker).await,
            0,
            "{sandbox:?}: the sleeper survived"
        );
        backend.shutdown().await;
    }
}
