//! The runner wrapper's commands (`flotilla runner exec`, `checkout`, `install`) as library
//! calls, in this process: a temporary directory for the spec and workspace, and the records
//! they write read back from memory. Signals are covered by the multi-process test in the
//! tests crate (`tests/tests/runner_cli.rs`).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_cell_agent::backend::conformance::assignment;
use flotilla_cell_agent::backend::conformance::git;
use flotilla_cell_agent::runner::checkout::{self, CheckoutOptions};
use flotilla_cell_agent::runner::exec::{self, ExecOptions};
use flotilla_cell_agent::runner::install;
use flotilla_cell_agent::runner::record::{
    EXIT_NOT_RUN, PROTOCOL_VERSION, Record, Termination, WireStream,
};
use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::{Assignment, Checkout};
use flotilla_core::{Fence, JobId};
use tempfile::TempDir;

const CRASH: Outcome = Outcome::Failed(FailureClass::Infra {
    reason: InfraReason::RunnerCrash,
});

/// An in-memory output the commands can own while the test keeps reading it.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Output {
    /// Every line, parsed back; panics on a line that is not a record (`parse_line` would
    /// keep it as a system line, which would hide a wrapper writing something else).
    fn records(&self) -> Vec<Record> {
        let bytes = self.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).expect("the output is UTF-8");
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|line| {
                let record = Record::parse_line(line, 0);
                let not_a_record = matches!(
                    &record,
                    Record::Line { ts: 0, s: WireStream::System, step: None, t } if t == line
                );
                assert!(!not_a_record, "not a record: {line}");
                record
            })
            .collect()
    }
}

/// What one command run left behind.
struct Run {
    code: u8,
    records: Vec<Record>,
    termination: Option<Termination>,
}

impl Run {
    fn finished(&self) -> Outcome {
        match self.records.last() {
            Some(Record::Finished { outcome, .. }) => *outcome,
            other => panic!(
                "the last record is {other:?}, not `finished`: {:#?}",
                self.records
            ),
        }
    }

    fn termination(&self) -> &Termination {
        self.termination.as_ref().expect("a termination message")
    }

    /// `(stream, step, text)` of every line record.
    fn lines(&self) -> Vec<(WireStream, Option<u32>, String)> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Line { s, step, t, .. } => Some((*s, *step, t.clone())),
                _ => None,
            })
            .collect()
    }

    /// The steps' own output, `(stream, step, text)`.
    fn output(&self) -> Vec<(WireStream, Option<u32>, String)> {
        self.lines()
            .into_iter()
            .filter(|(s, _, _)| *s != WireStream::System)
            .collect()
    }

    fn system_text(&self) -> String {
        self.lines()
            .into_iter()
            .filter(|(s, _, _)| *s == WireStream::System)
            .map(|(_, _, t)| t + "\n")
            .collect()
    }
}

/// A temporary directory with a spec, a workspace and a termination log in it.
struct Pod {
    dir: TempDir,
}

impl Pod {
    fn new(assignment: &Assignment) -> Self {
        let dir = TempDir::new().unwrap();
        std::fs::create_dir(dir.path().join("workspace")).unwrap();
        std::fs::write(
            dir.path().join("job.json"),
            serde_json::to_vec(assignment).unwrap(),
        )
        .unwrap();
        Self { dir }
    }

    fn workspace(&self) -> PathBuf {
        self.dir.path().join("workspace")
    }

    fn exec_options(&self) -> ExecOptions {
        ExecOptions {
            spec: self.dir.path().join("job.json"),
            workspace: self.workspace(),
            termination_log: Some(self.dir.path().join("termination-log")),
            protocol: PROTOCOL_VERSION,
        }
    }

    async fn exec_with(&self, opts: &ExecOptions) -> Run {
        let out = Output::default();
        let code = exec::exec(opts, out.clone()).await;
        self.run(code, &out)
    }

    async fn exec(&self) -> Run {
        self.exec_with(&self.exec_options()).await
    }

    async fn checkout(&self) -> Run {
        let out = Output::default();
        let opts = CheckoutOptions {
            spec: self.dir.path().join("job.json"),
            workspace: self.workspace(),
            termination_log: Some(self.dir.path().join("termination-log")),
            timeout: Duration::from_secs(60),
        };
        let code = checkout::checkout(&opts, out.clone()).await;
        self.run(code, &out)
    }

    fn run(&self, code: u8, out: &Output) -> Run {
        let termination = std::fs::read_to_string(self.dir.path().join("termination-log"))
            .ok()
            .map(|text| Termination::parse(&text).expect("a termination message of ours"));
        Run {
            code,
            records: out.records(),
            termination,
        }
    }
}

fn job(scripts: &[&str]) -> Assignment {
    assignment(JobId(7), Fence(3), scripts)
}

#[tokio::test]
async fn steps_run_in_order_in_the_workspace_and_every_record_names_its_step_and_stream() {
    let a = job(&[
        "echo one; echo err-one >&2; pwd",
        "echo two > made-by-step-2",
        "cat made-by-step-2",
    ]);
    let pod = Pod::new(&a);
    let run = pod.exec().await;
    let ws = pod.workspace().display().to_string();

    assert_eq!(run.code, 0, "{:#?}", run.records);
    assert_eq!(run.finished(), Outcome::Succeeded);
    assert_eq!(run.termination().outcome, Outcome::Succeeded);
    assert_eq!(run.termination().message, None);
    // Each stream in order (stdout and stderr are two pipes: no order between them).
    let stream = |wanted: WireStream| -> Vec<(Option<u32>, String)> {
        run.output()
            .into_iter()
            .filter(|(s, _, _)| *s == wanted)
            .map(|(_, step, t)| (step, t))
            .collect()
    };
    assert_eq!(
        stream(WireStream::Stdout),
        [
            (Some(0), "one".to_owned()),
            (Some(0), ws),
            (Some(2), "two".to_owned()),
        ]
    );
    assert_eq!(
        stream(WireStream::Stderr),
        [(Some(0), "err-one".to_owned())]
    );
    // Steps in order: no line of a step comes after a line of a later one.
    let steps: Vec<u32> = run
        .lines()
        .iter()
        .filter_map(|(_, step, _)| *step)
        .collect();
    assert!(steps.is_sorted(), "{steps:?}");
    assert_eq!(steps.first().zip(steps.last()), Some((&0, &2)));
    // In place: what a step leaves in the workspace stays there.
    assert!(pod.workspace().join("made-by-step-2").is_file());

    let started = run
        .records
        .iter()
        .position(|r| matches!(r, Record::Started { .. }))
        .expect("a started record");
    let first_output = run
        .records
        .iter()
        .position(|r| matches!(r, Record::Line { s, .. } if *s != WireStream::System))
        .expect("output");
    assert!(started < first_output, "{:#?}", run.records);
    let starts = run
        .records
        .iter()
        .filter(|r| matches!(r, Record::Started { .. }))
        .count();
    let finishes = run
        .records
        .iter()
        .filter(|r| matches!(r, Record::Finished { .. }))
        .count();
    assert_eq!((starts, finishes), (1, 1));
    let stamps: Vec<u64> = run.records.iter().map(Record::ts).collect();
    assert!(stamps.is_sorted(), "stamps go backwards: {stamps:?}");
}

#[tokio::test]
async fn steps_see_the_flotilla_variables_then_the_assignments_environment() {
    let mut a = job(&[
        "echo \"$FLOTILLA_JOB_ID $FLOTILLA_ATTEMPT $FLOTILLA_FENCE $CI $LANG\"; \
         echo \"$FLOTILLA_WORKSPACE\"; echo \"$HOME\"; echo \"$GREETING\"; \
         echo \"path-set=${PATH:+yes}\"",
    ]);
    a.env = vec![
        ("GREETING".to_owned(), "first".to_owned()),
        ("GREETING".to_owned(), "hello".to_owned()),
        ("CI".to_owned(), "overridden".to_owned()),
    ];
    let pod = Pod::new(&a);
    let run = pod.exec().await;
    assert_eq!(run.code, 0, "{:#?}", run.records);
    let home = std::env::var("HOME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.workspace().display().to_string());
    let out: Vec<String> = run.output().into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(
        out,
        [
            "7 1 3 overridden C.UTF-8".to_owned(),
            pod.workspace().display().to_string(),
            home,
            "hello".to_owned(),
            "path-set=yes".to_owned(),
        ]
    );
}

#[tokio::test]
async fn a_failure_early_in_a_pipeline_fails_the_step() {
    let pod = Pod::new(&job(&["false | cat; echo not reached"]));
    let run = pod.exec().await;
    assert_eq!(run.code, 1, "{:#?}", run.records);
    assert_eq!(
        run.finished(),
        Outcome::Failed(FailureClass::Test { exit_code: 1 })
    );
    assert!(run.output().is_empty(), "{:#?}", run.output());
}

#[tokio::test]
async fn a_failing_step_exits_with_its_code_and_the_later_steps_do_not_run() {
    let a = job(&["echo first", "echo second; exit 7", "touch never-ran"]);
    let pod = Pod::new(&a);
    let run = pod.exec().await;

    let failed = Outcome::Failed(FailureClass::Test { exit_code: 7 });
    assert_eq!(run.code, 7, "{:#?}", run.records);
    assert_eq!(run.finished(), failed);
    assert_eq!(run.termination().outcome, failed);
    let message = run.termination().message.clone().expect("a message");
    assert!(
        message.contains("step 2") && message.contains('7'),
        "{message}"
    );
    assert!(!pod.workspace().join("never-ran").exists());
    assert_eq!(
        run.output(),
        [
            (WireStream::Stdout, Some(0), "first".to_owned()),
            (WireStream::Stdout, Some(1), "second".to_owned()),
        ]
    );
    assert!(
        !run.lines().iter().any(|(_, step, _)| *step == Some(2)),
        "step 3 was never started: {:#?}",
        run.records
    );
}

#[tokio::test]
async fn a_job_past_its_timeout_exits_124_as_timed_out() {
    let mut a = job(&["echo ready; sleep 30", "touch never-ran"]);
    a.timeout_secs = 1;
    let pod = Pod::new(&a);
    let began = tokio::time::Instant::now();
    let run = pod.exec().await;

    assert!(
        began.elapsed() < Duration::from_secs(15),
        "took {:?}",
        began.elapsed()
    );
    assert_eq!(run.code, 124, "{:#?}", run.records);
    assert_eq!(run.finished(), Outcome::Failed(FailureClass::Timeout));
    assert_eq!(
        run.termination().outcome,
        Outcome::Failed(FailureClass::Timeout)
    );
    assert!(
        run.termination()
            .message
            .as_deref()
            .is_some_and(|m| m.contains("timeout of 1 s")),
        "{:?}",
        run.termination()
    );
    assert!(!pod.workspace().join("never-ran").exists());
}

#[tokio::test]
async fn a_wrong_protocol_is_refused_with_125_and_a_message_naming_both_versions() {
    let pod = Pod::new(&job(&["touch ran"]));
    let mut opts = pod.exec_options();
    opts.protocol = PROTOCOL_VERSION + 1;
    let run = pod.exec_with(&opts).await;

    assert_eq!(run.code, 125, "{:#?}", run.records);
    assert_eq!(run.finished(), CRASH);
    assert_eq!(run.termination().outcome, CRASH);
    let message = run.termination().message.clone().expect("a message");
    assert!(
        message.contains(&format!("protocol {PROTOCOL_VERSION}"))
            && message.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)),
        "{message}"
    );
    assert!(
        run.system_text().contains(&message),
        "{}",
        run.system_text()
    );
    assert!(!pod.workspace().join("ran").exists(), "nothing ran");
    assert!(
        !run.records
            .iter()
            .any(|r| matches!(r, Record::Started { .. }))
    );
}

#[tokio::test]
async fn an_unreadable_spec_is_refused_with_125_as_a_runner_crash() {
    let pod = Pod::new(&job(&["true"]));
    std::fs::write(pod.dir.path().join("job.json"), "{\"not\": \"a job\"}").unwrap();
    let run = pod.exec().await;
    assert_eq!(run.code, EXIT_NOT_RUN, "{:#?}", run.records);
    assert_eq!(run.finished(), CRASH);
    assert!(
        run.termination()
            .message
            .as_deref()
            .is_some_and(|m| m.contains("job spec")),
        "{:?}",
        run.termination()
    );

    let mut opts = pod.exec_options();
    opts.spec = pod.dir.path().join("missing.json");
    let run = pod.exec_with(&opts).await;
    assert_eq!(run.code, EXIT_NOT_RUN);
    assert_eq!(run.finished(), CRASH);
}

#[tokio::test]
async fn an_invalid_environment_variable_name_is_a_config_failure() {
    let mut a = job(&["touch ran"]);
    a.env = vec![("A=B".to_owned(), "x".to_owned())];
    let pod = Pod::new(&a);
    let run = pod.exec().await;
    assert_eq!(run.code, EXIT_NOT_RUN, "{:#?}", run.records);
    assert_eq!(run.finished(), Outcome::Failed(FailureClass::Config));
    assert!(
        run.termination()
            .message
            .as_deref()
            .is_some_and(|m| m.contains("\"A=B\"")),
        "{:?}",
        run.termination()
    );
    assert!(!pod.workspace().join("ran").exists());
}

#[tokio::test]
async fn an_unwritable_termination_log_is_reported_and_the_job_still_runs() {
    let pod = Pod::new(&job(&["echo ran"]));
    let mut opts = pod.exec_options();
    let nowhere = pod.dir.path().join("no-such-dir/termination-log");
    opts.termination_log = Some(nowhere.clone());
    let run = pod.exec_with(&opts).await;
    assert_eq!(run.code, 0, "{:#?}", run.records);
    assert_eq!(run.finished(), Outcome::Succeeded);
    assert!(
        run.system_text().contains(&format!(
            "could not write the termination message to {}",
            nowhere.display()
        )),
        "{}",
        run.system_text()
    );

    opts.termination_log = None;
    let run = pod.exec_with(&opts).await;
    assert_eq!(run.code, 0);
    assert_eq!(run.finished(), Outcome::Succeeded);
}

// ---------------------------------------------------------------------------------------
// checkout

fn with_checkout(checkout: Checkout) -> Assignment {
    let mut a = job(&["true"]);
    a.checkout = Some(checkout);
    a
}

#[tokio::test]
async fn checkout_puts_the_named_commit_into_the_workspace() {
    let repos = TempDir::new().unwrap();
    let checkout = repository(repos.path());
    let pod = Pod::new(&with_checkout(checkout.clone()));
    let run = pod.checkout().await;

    assert_eq!(run.code, 0, "{:#?}", run.records);
    assert_eq!(run.termination().outcome, Outcome::Succeeded);
    assert_eq!(
        std::fs::read_to_string(pod.workspace().join("hello.txt")).unwrap(),
        "hello from the first commit\n"
    );
    assert_eq!(git(&pod.workspace(), &["rev-parse", "HEAD"]), checkout.sha);
    assert_eq!(
        git(&pod.workspace(), &["remote", "get-url", "origin"]),
        checkout.repo_url
    );
    // Output: system lines only; `started` and `finished` belong to the job's wrapper.
    assert!(!run.records.is_empty());
    assert!(
        run.lines().len() == run.records.len()
            && run
                .lines()
                .iter()
                .all(|(s, step, _)| *s == WireStream::System && step.is_none()),
        "{:#?}",
        run.records
    );
}

#[tokio::test]
async fn a_workspace_owned_by_another_user_is_checked_out_all_the_same() {
    if !rustix::process::geteuid().is_root() {
        #[allow(clippy::print_stderr, reason = "a skipped test must say so")]
        {
            eprintln!("skipped: only root can give the workspace to another user");
        }
        return;
    }
    let repos = TempDir::new().unwrap();
    let pod = Pod::new(&with_checkout(repository(repos.path())));
    // As in a pod: the volume belongs to someone else (root, with an fsGroup) and is
    // writable by all; git refuses such a repository unless told it is safe.
    std::os::unix::fs::chown(pod.workspace(), Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(pod.workspace(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = pod.checkout().await;
    assert_eq!(run.code, 0, "{:#?}", run.records);
    assert_eq!(
        std::fs::read_to_string(pod.workspace().join("hello.txt")).unwrap(),
        "hello from the first commit\n"
    );
}

#[tokio::test]
async fn a_malformed_commit_id_fails_the_checkout_as_config() {
    let repos = TempDir::new().unwrap();
    let mut checkout = repository(repos.path());
    checkout.sha = "--upload-pack=touch pwned".to_owned();
    let pod = Pod::new(&with_checkout(checkout));
    let run = pod.checkout().await;

    assert_eq!(run.code, EXIT_NOT_RUN, "{:#?}", run.records);
    let termination = run.termination();
    assert_eq!(termination.outcome, Outcome::Failed(FailureClass::Config));
    assert!(
        termination
            .message
            .as_deref()
            .is_some_and(|m| m.contains("is not a commit id")),
        "{termination:?}"
    );
    assert!(!pod.workspace().join(".git").exists(), "git never ran");
}

#[tokio::test]
async fn a_missing_repository_fails_the_checkout_as_a_runner_crash() {
    let repos = TempDir::new().unwrap();
    let checkout = Checkout {
        repo_url: repos.path().join("nothing-here.git").display().to_string(),
        git_ref: "refs/heads/main".to_owned(),
        sha: "a".repeat(40),
    };
    let pod = Pod::new(&with_checkout(checkout));
    let run = pod.checkout().await;

    assert_eq!(run.code, EXIT_NOT_RUN, "{:#?}", run.records);
    let termination = run.termination();
    assert_eq!(termination.outcome, CRASH);
    let message = termination.message.as_deref().expect("a message");
    assert!(
        message.starts_with("checkout failed:") && message.contains("nothing-here.git"),
        "{message}"
    );
}

#[tokio::test]
async fn a_commit_missing_from_the_repository_is_looked_for_in_the_ref_then_fails() {
    let repos = TempDir::new().unwrap();
    let mut checkout = repository(repos.path());
    checkout.sha = "0123456789abcdef0123456789abcdef01234567".to_owned();
    let pod = Pod::new(&with_checkout(checkout.clone()));
    let run = pod.checkout().await;

    assert_eq!(run.code, EXIT_NOT_RUN, "{:#?}", run.records);
    assert_eq!(run.termination().outcome, CRASH);
    assert!(
        run.system_text()
            .contains("fetching refs/heads/main instead"),
        "{}",
        run.system_text()
    );
    assert!(
        run.termination()
            .message
            .as_deref()
            .is_some_and(|m| m.contains("not even after fetching refs/heads/main")),
        "{:?}",
        run.termination()
    );
}

#[tokio::test]
async fn credentials_in_the_repository_url_never_reach_the_output() {
    // Nothing listens on port 1: the fetch fails at once, and git's messages name the URL.
    let checkout = Checkout {
        repo_url: "https://x-access-token:s3cr3t-t0ken@127.0.0.1:1/acme/app.git".to_owned(),
        git_ref: "refs/heads/main".to_owned(),
        sha: "a".repeat(40),
    };
    let pod = Pod::new(&with_checkout(checkout));
    let run = pod.checkout().await;

    assert_eq!(run.code, EXIT_NOT_RUN, "{:#?}", run.records);
    assert_eq!(run.termination().outcome, CRASH);
    let everything = format!("{:?}{:?}", run.records, run.termination);
    assert!(
        everything.contains("127.0.0.1:1/acme/app.git"),
        "{everything}"
    );
    assert!(!everything.contains("s3cr3t"), "{everything}");
    let origin = git(&pod.workspace(), &["config", "remote.origin.url"]);
    assert_eq!(origin, "https://127.0.0.1:1/acme/app.git");
}

#[tokio::test]
async fn a_job_without_a_checkout_leaves_the_workspace_alone() {
    let pod = Pod::new(&job(&["true"]));
    std::fs::write(pod.workspace().join("keep"), "kept").unwrap();
    let run = pod.checkout().await;
    assert_eq!(run.code, 0, "{:#?}", run.records);
    assert!(!pod.workspace().join(".git").exists());
    assert_eq!(
        std::fs::read_to_string(pod.workspace().join("keep")).unwrap(),
        "kept"
    );
}

// ---------------------------------------------------------------------------------------
// install

#[test]
fn install_copies_the_running_binary_as_an_executable_with_mode_0755() {
    let dir = TempDir::new().unwrap();
    let dest = dir.path().join("flotilla/bin/flotilla");
    let out = Output::default();
    assert_eq!(install::install(&dest, out.clone()), 0);

    let meta = std::fs::metadata(&dest).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(std::fs::read(&dest).unwrap() == me, "the copy differs");
    let names: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["flotilla"], "no temporary file is left behind");
    let records = out.records();
    assert!(
        matches!(&records[..], [Record::Line { s: WireStream::System, t, .. }]
            if t.contains(&dest.display().to_string())),
        "{records:?}"
    );

    // Installing again replaces the file.
    std::fs::write(&dest, "stale").unwrap();
    assert_eq!(install::install(&dest, Output::default()), 0);
    assert!(std::fs::read(&dest).unwrap() == me);
}

#[test]
fn install_into_a_path_that_cannot_be_a_directory_fails_with_125() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let out = Output::default();
    let code = install::install(&dir.path().join("file/flotilla"), out.clone());
    assert_eq!(code, EXIT_NOT_RUN);
    let records = out.records();
    assert!(
        matches!(&records[..], [Record::Line { t, .. }] if t.starts_with("could not install")),
        "{records:?}"
    );
}

/// The two-commit repository of the conformance suite: only a checkout of its first commit
/// has `hello.txt` as that commit wrote it.
fn repository(root: &Path) -> Checkout {
    flotilla_cell_agent::backend::conformance::two_commit_repository(root).checkout
}
