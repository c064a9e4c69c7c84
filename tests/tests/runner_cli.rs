//! `flotilla runner exec` as a runner pod runs it: the real binary, its records on a pipe, and
//! stopped the way Kubernetes stops a container, with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use flotilla_cell_agent::backend::conformance::{assignment, processes_named};
use flotilla_cell_agent::runner::record::{PROTOCOL_VERSION, Record, Termination};
use flotilla_core::job::{FailureClass, Outcome};
use flotilla_core::{Fence, JobId};
use flotilla_tests::flotilla_bin;

/// Cleans up after a failed run: kills the wrapper and every process named with the
/// test's marker (a PID-unique name only this test's steps carry).
struct Cleanup<'a> {
    child: &'a mut Child,
    marker: &'a str,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            let named = std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(self.marker));
            if named && pid.bytes().all(|b| b.is_ascii_digit()) {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }
}

/// Polls until `done(processes_named(marker))` or `within` passes; returns the last count.
fn poll_processes(marker: &str, within: Duration, done: impl Fn(usize) -> bool) -> usize {
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    loop {
        let n = processes_named(marker);
        if done(n) || waited >= within {
            return n;
        }
        thread::sleep(step);
        waited += step;
    }
}

/// Waits for the child to exit, up to `within`; fails the test otherwise.
fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let step = Duration::from_millis(20);
    let mut waited = Duration::ZERO;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code().expect("exited, not killed by a signal");
        }
        if waited >= within {
            panic!("flotilla runner exec did not exit within {within:?} of SIGTERM");
        }
        thread::sleep(step);
        waited += step;
    }
}

#[test]
fn sigterm_cancels_the_job_kills_its_processes_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("flotilla-runner-cli-{}", std::process::id());
    // The marker in two quoted halves, so that only the sleepers' own command lines hold it
    // whole: one in the background, and the step's shell replaced by the other.
    let (head, tail) = marker.split_at(marker.len() / 2);
    let script = format!(
        "bash -c 'exec -a \"$0\" sleep 300' {head}'{tail}' &\n\
         echo ready\n\
         exec -a {head}'{tail}' sleep 300"
    );
    let job = assignment(JobId(1), Fence(1), &[&script]);
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, serde_json::to_vec(&job).unwrap()).unwrap();
    let termination_log = dir.path().join("termination-log");

    let mut child = Command::new(flotilla_bin())
        .args(["runner", "exec", "--spec"])
        .arg(&spec)
        .arg("--workspace")
        .arg(dir.path().join("workspace"))
        .arg("--termination-log")
        .arg(&termination_log)
        .args(["--protocol", &PROTOCOL_VERSION.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start flotilla runner exec");
    let stdout = child.stdout.take().expect("stdout");
    let pid = child.id().to_string();
    let guard = Cleanup {
        child: &mut child,
        marker: &marker,
    };
    let (lines_tx, lines) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut records = Vec::new();
    loop {
        let line = match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(e) => panic!("no `ready` line ({e}); records so far: {records:#?}"),
        };
        let record = Record::parse_line(&line, 0);
        let ready = matches!(&record, Record::Line { t, .. } if t == "ready");
        records.push(record);
        if ready {
            break;
        }
    }
    let running = poll_processes(&marker, Duration::from_secs(5), |n| n >= 2);
    assert_eq!(running, 2, "both sleepers named {marker} should be running");

    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(term.success());
    let code = wait_exit(guard.child, Duration::from_secs(5));
    reader.join().expect("the reader thread");
    records.extend(lines.try_iter().map(|line| Record::parse_line(&line, 0)));

    let cancelled = Outcome::Failed(FailureClass::Cancelled);
    assert_eq!(code, 130, "records: {records:#?}");
    match records.last() {
        Some(Record::Finished { outcome, .. }) => assert_eq!(*outcome, cancelled),
        other => panic!("the last record is {other:?}: {records:#?}"),
    }
    let termination = std::fs::read_to_string(&termination_log).expect("a termination log");
    let termination = Termination::parse(&termination).expect("a termination message");
    assert_eq!(termination.outcome, cancelled);
    assert_eq!(termination.message.as_deref(), Some("cancelled by SIGTERM"));
    let left = poll_processes(&marker, Duration::from_secs(5), |n| n == 0);
    assert_eq!(left, 0, "{left} process(es) named {marker} survived");
}

#[test]
fn an_image_without_bash_runs_steps_with_sh_e_and_says_pipefail_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    // The wrapper's PATH holds `sh` and nothing else, as in an image without bash.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink("/bin/sh", bin.join("sh")).unwrap();
    let job = assignment(
        JobId(2),
        Fence(1),
        &[
            "echo via-sh; false | true; echo after-pipe",
            "false; echo not-reached",
        ],
    );
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, serde_json::to_vec(&job).unwrap()).unwrap();

    let out = Command::new(flotilla_bin())
        .args(["runner", "exec", "--spec"])
        .arg(&spec)
        .arg("--workspace")
        .arg(dir.path().join("workspace"))
        .args(["--protocol", &PROTOCOL_VERSION.to_string()])
        .env_clear()
        .env("PATH", &bin)
        .stdin(Stdio::null())
        .output()
        .expect("run flotilla runner exec");
    let records: Vec<Record> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| Record::parse_line(line, 0))
        .collect();
    let lines: Vec<(Option<u32>, String)> = records
        .iter()
        .filter_map(|r| match r {
            Record::Line { step, t, .. } => Some((*step, t.clone())),
            _ => None,
        })
        .collect();

    assert_eq!(out.status.code(), Some(1), "records: {records:#?}");
    assert!(
        lines
            .iter()
            .any(|(step, t)| step.is_none() && t.contains("pipefail is unavailable")),
        "{lines:#?}"
    );
    // `-e` holds; pipefail does not, and the line above says so.
    let texts: Vec<&str> = lines.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        texts.contains(&"via-sh") && texts.contains(&"after-pipe"),
        "{texts:?}"
    );
    assert!(!texts.contains(&"not-reached"), "{texts:?}");
    match records.last() {
        Some(Record::Finished { outcome, .. }) => assert_eq!(
            *outcome,
            Outcome::Failed(FailureClass::Test { exit_code: 1 })
        ),
        other => panic!("the last record is {other:?}"),
    }
}
