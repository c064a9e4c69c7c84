//! A warm runner pod's two halves as library calls, in this process: `flotilla runner
//! standby` over real TCP on 127.0.0.1 checking real git repositories out, and `flotilla
//! runner handoff` waiting on the same real files, in a temporary directory standing for the
//! pod's volumes. The signals are stood for by the `stop` channels `serve` and
//! `handoff_or_stop` take.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_cell_agent::backend::conformance::{assignment, git, two_commit_repository};
use flotilla_cell_agent::runner::record::{
    EXIT_CANCELLED, EXIT_NOT_RUN, PROTOCOL_VERSION, Record, Termination, WireStream,
};
use flotilla_cell_agent::runner::sealed::{CONTENT_TYPE, seal};
use flotilla_cell_agent::runner::standby::{
    self, ABORT_FILE, HandoffOptions, JOB_FILE, MAX_ASSIGNMENT_BYTES, StandbyOptions,
};
use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::{Assignment, Checkout};
use flotilla_core::{Fence, JobId};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const CRASH: Outcome = Outcome::Failed(FailureClass::Infra {
    reason: InfraReason::RunnerCrash,
});
const CANCELLED: Outcome = Outcome::Failed(FailureClass::Cancelled);

/// The agent's token; the file holds it with whitespace around, as a mounted Secret may.
const TOKEN: &str = "warm-t0ken-that-must-never-leak";

/// Longest any one wait in these tests may take before it counts as a hang.
const PATIENCE: Duration = Duration::from_secs(60);

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
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("the output is UTF-8")
    }

    /// Every line, parsed back; panics on a line that is not a record.
    fn records(&self) -> Vec<Record> {
        let text = self.text();
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

    /// The texts of the system lines; panics on any other record (the standby writes no
    /// other kind).
    fn system_lines(&self) -> Vec<String> {
        self.records()
            .into_iter()
            .map(|r| match r {
                Record::Line {
                    s: WireStream::System,
                    step: None,
                    t,
                    ..
                } => t,
                other => panic!("not a system line: {other:?}"),
            })
            .collect()
    }
}

/// A temporary directory standing for a warm pod's volumes: the token, the handoff
/// directory, the workspace and each container's termination log.
struct Pod {
    dir: TempDir,
}

impl Pod {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join("token"), format!("  {TOKEN}\n")).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn handoff(&self) -> PathBuf {
        self.path("handoff")
    }

    fn workspace(&self) -> PathBuf {
        self.path("workspace")
    }

    fn standby_options(&self) -> StandbyOptions {
        StandbyOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            token_file: self.path("token"),
            handoff: self.handoff(),
            workspace: self.workspace(),
            termination_log: Some(self.path("checkout-termination-log")),
            checkout_timeout: Duration::from_secs(60),
        }
    }

    fn handoff_options(&self) -> HandoffOptions {
        HandoffOptions {
            handoff: self.handoff(),
            workspace: self.workspace(),
            termination_log: Some(self.path("job-termination-log")),
            protocol: PROTOCOL_VERSION,
        }
    }

    /// Starts the standby on a port of its own on 127.0.0.1.
    async fn standby(&self) -> Standby {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let out = Output::default();
        let opts = self.standby_options();
        let task = tokio::spawn({
            let out = out.clone();
            async move { standby::serve(&opts, listener, stop_rx, out).await }
        });
        Standby {
            addr,
            stop,
            out,
            task,
        }
    }

    /// Starts the job container's side; it waits for the handoff.
    fn handoff_task(&self, opts: HandoffOptions) -> (JoinHandle<u8>, Output) {
        let out = Output::default();
        let task = tokio::spawn({
            let out = out.clone();
            async move { standby::handoff(&opts, out).await }
        });
        (task, out)
    }

    /// The termination message in the named termination log.
    fn termination(&self, log: &str) -> Termination {
        let text = std::fs::read_to_string(self.path(log)).expect("a termination message");
        Termination::parse(&text).expect("a termination message of ours")
    }

    fn abort(&self) -> Termination {
        let text = std::fs::read_to_string(self.handoff().join(ABORT_FILE)).expect("abort.json");
        Termination::parse(&text).expect("abort.json is a termination message")
    }

    /// The names in the handoff directory (none when it does not exist).
    fn handed(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.handoff())
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Everything the pod wrote to files (handoff and termination logs), for leak checks.
    fn files_text(&self) -> String {
        let mut text = String::new();
        for name in self.handed() {
            text += &std::fs::read_to_string(self.handoff().join(name)).unwrap();
        }
        for log in ["checkout-termination-log", "job-termination-log"] {
            text += &std::fs::read_to_string(self.path(log)).unwrap_or_default();
        }
        text
    }
}

/// A standby running in a task of this test.
struct Standby {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    out: Output,
    task: JoinHandle<u8>,
}

impl Standby {
    async fn assign(&self, token: &str, assignment: &Assignment) -> Reply {
        let body = serde_json::to_vec(assignment).unwrap();
        self.post(&seal(token.as_bytes(), &body).unwrap()).await
    }

    /// Posts `body` as it is (sealed or not) to the assign endpoint.
    async fn post(&self, body: &[u8]) -> Reply {
        let mut head = format!(
            "POST /v1/assign HTTP/1.1\r\nHost: standby\r\nConnection: close\r\n\
             Content-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n",
            body.len()
        );
        head += "\r\n";
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        exchange(self.addr, &request).await
    }

    async fn get(&self, path: &str) -> Reply {
        let request = format!("GET {path} HTTP/1.1\r\nHost: standby\r\nConnection: close\r\n\r\n");
        exchange(self.addr, request.as_bytes()).await
    }

    /// Waits for the standby to end and returns its exit status.
    async fn exit(self) -> u8 {
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the standby ends")
            .expect("the standby does not panic")
    }
}

/// An HTTP response, as read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `request` on a new connection and reads the response until the server closes it.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    let talk = async {
        let mut stream = TcpStream::connect(addr).await.expect("the standby listens");
        stream.write_all(request).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(PATIENCE, talk)
        .await
        .expect("the standby answers");
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Reply {
        status,
        body: body.to_owned(),
    }
}

fn job(scripts: &[&str]) -> Assignment {
    assignment(JobId(7), Fence(3), scripts)
}

fn with_checkout(checkout: Checkout, scripts: &[&str]) -> Assignment {
    let mut a = job(scripts);
    a.checkout = Some(checkout);
    a
}

/// A git server that takes connections and never answers: a checkout from it waits until
/// stopped. Resolves `first` once git has connected.
struct SilentGitServer {
    url: String,
    connected: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl SilentGitServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("git://{}/acme/app.git", listener.local_addr().unwrap());
        let (count, connected) = watch::channel(0);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
                count.send_replace(held.len());
            }
        });
        Self {
            url,
            connected,
            task,
        }
    }

    async fn wait_for_git(&mut self) {
        tokio::time::timeout(PATIENCE, self.connected.wait_for(|n| *n > 0))
            .await
            .expect("git connects")
            .unwrap();
    }
}

impl Drop for SilentGitServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// standby

#[tokio::test]
async fn the_probe_needs_no_token_and_an_assignment_without_the_right_token_is_refused_with_401() {
    let pod = Pod::new();
    let repos = TempDir::new().unwrap();
    let a = with_checkout(two_commit_repository(repos.path()).checkout, &["true"]);
    let standby = pod.standby().await;

    let probe = standby.get("/healthz").await;
    assert_eq!((probe.status, probe.body.as_str()), (200, "ok"));

    let body = serde_json::to_vec(&a).unwrap();
    let not_quite = &TOKEN[..TOKEN.len() - 1];
    let mut tampered = seal(TOKEN.as_bytes(), &body).unwrap();
    tampered[20] ^= 1;
    let wrong: [(&str, Vec<u8>); 6] = [
        ("not sealed", body.clone()),
        ("another token", seal(b"wrong", &body).unwrap()),
        (
            "a token one short",
            seal(not_quite.as_bytes(), &body).unwrap(),
        ),
        (
            "a token one long",
            seal(format!("{TOKEN}x").as_bytes(), &body).unwrap(),
        ),
        ("altered on the way", tampered),
        ("empty", Vec::new()),
    ];
    for (what, sent) in wrong {
        let reply = standby.post(&sent).await;
        assert_eq!(reply.status, 401, "{what}: {reply:?}");
        assert!(
            !reply.body.to_lowercase().contains("token"),
            "the refusal says nothing about the token: {reply:?}"
        );
    }
    // Anything but the two endpoints, with the token or not.
    assert_eq!(standby.get("/v1/assign").await.status, 404);
    assert_eq!(standby.get("/").await.status, 404);
    assert_eq!(standby.get("/v1/assign/again").await.status, 404);

    assert!(pod.handed().is_empty(), "{:?}", pod.handed());
    assert!(
        !pod.workspace().join(".git").exists(),
        "nothing checked out"
    );
    assert!(
        !standby.out.text().contains("took job"),
        "{}",
        standby.out.text()
    );
    // And it still waits: the right token gets the job.
    assert_eq!(standby.assign(TOKEN, &a).await.status, 202);
    assert_eq!(standby.exit().await, 0);
}

#[tokio::test]
async fn a_stop_while_waiting_for_a_job_ends_the_standby_as_cancelled_and_tells_the_job_container()
{
    let pod = Pod::new();
    let standby = pod.standby().await;
    // Serving: the stop comes while it waits, not before it listens.
    assert_eq!(standby.get("/healthz").await.status, 200);
    standby.stop.send_replace(true);
    let out = standby.out.clone();
    assert_eq!(standby.exit().await, EXIT_CANCELLED);

    assert_eq!(pod.handed(), [ABORT_FILE]);
    assert_eq!(pod.abort().outcome, CANCELLED);
    assert_eq!(pod.termination("checkout-termination-log"), pod.abort());
    let lines = out.system_lines();
    assert!(
        lines[0].starts_with("standby: waiting for a job on 127.0.0.1:"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("cancelled while waiting")),
        "{lines:?}"
    );

    // The job container, told so, ends the same way without running anything.
    let (task, out) = pod.handoff_task(pod.handoff_options());
    assert_eq!(finish(task).await, EXIT_CANCELLED);
    assert_eq!(pod.termination("job-termination-log"), pod.abort());
    assert!(no_attempt_records(&out.records()), "{:?}", out.records());
}

#[tokio::test]
async fn a_body_that_is_not_an_assignment_is_refused_with_400_and_one_over_a_mebibyte_with_413() {
    let pod = Pod::new();
    let standby = pod.standby().await;
    let sealed = |body: &[u8]| seal(TOKEN.as_bytes(), body).unwrap();

    let reply = standby.post(&sealed(br#"{"not": "a job"}"#)).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    let error = reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("missing field"), "serde says why: {error}");

    let reply = standby.post(&sealed(b"not json at all")).await;
    assert_eq!(reply.status, 400, "{reply:?}");

    // A body over the limit is refused from its length, before it is read.
    let request = format!(
        "POST /v1/assign HTTP/1.1\r\nHost: standby\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        MAX_ASSIGNMENT_BYTES + 1
    );
    let reply = exchange(standby.addr, request.as_bytes()).await;
    assert_eq!(reply.status, 413, "{reply:?}");

    // One just under the limit is read: a valid assignment padded with spaces is taken.
    let mut body = serde_json::to_vec(&job(&["true"])).unwrap();
    // The seal adds a 12-byte nonce and a 16-byte tag.
    body.resize(MAX_ASSIGNMENT_BYTES - 28, b' ');
    let reply = standby.post(&sealed(&body)).await;
    assert_eq!(reply.status, 202, "nothing was taken before: {reply:?}");
    assert_eq!(standby.exit().await, 0);
}

#[tokio::test]
async fn a_taken_job_is_checked_out_and_handed_over_without_its_clone_url_or_the_token() {
    let pod = Pod::new();
    let repos = TempDir::new().unwrap();
    let checkout = two_commit_repository(repos.path()).checkout;
    let a = with_checkout(checkout.clone(), &["cat hello.txt"]);
    let standby = pod.standby().await;

    let reply = standby.assign(TOKEN, &a).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(reply.json(), serde_json::json!({"job": 7, "fence": 3}));
    let out = standby.out.clone();
    assert_eq!(standby.exit().await, 0, "{}", out.text());

    assert_eq!(
        std::fs::read_to_string(pod.workspace().join("hello.txt")).unwrap(),
        "hello from the first commit\n"
    );
    assert_eq!(git(&pod.workspace(), &["rev-parse", "HEAD"]), checkout.sha);
    assert_eq!(pod.handed(), [JOB_FILE], "no temporary file, no abort.json");
    let handed = std::fs::read_to_string(pod.handoff().join(JOB_FILE)).unwrap();
    let expected = Assignment {
        checkout: None,
        ..a.clone()
    };
    assert_eq!(
        serde_json::from_str::<Assignment>(&handed).unwrap(),
        expected
    );
    assert!(!handed.contains(&checkout.repo_url), "{handed}");
    assert_eq!(
        pod.termination("checkout-termination-log").outcome,
        Outcome::Succeeded
    );

    let lines = out.system_lines();
    assert!(
        lines.contains(&"standby: took job 7 (conformance-7), attempt 1, fence 3".to_owned()),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("Checked out {}", checkout.sha)),
        "{lines:?}"
    );
    let everything = out.text() + &pod.files_text();
    assert!(!everything.contains(TOKEN), "{everything}");
}

#[tokio::test]
async fn the_same_job_posted_again_is_accepted_again_and_checked_out_once_and_another_is_refused_with_409()
 {
    let pod = Pod::new();
    let mut server = SilentGitServer::start().await;
    let a = with_checkout(
        Checkout {
            repo_url: server.url.clone(),
            git_ref: "refs/heads/main".to_owned(),
            sha: "a".repeat(40),
        },
        &["true"],
    );
    let standby = pod.standby().await;

    let first = standby.assign(TOKEN, &a).await;
    assert_eq!(first.status, 202, "{first:?}");
    // The checkout is under way (and stays so: the server never answers).
    server.wait_for_git().await;
    let again = standby.assign(TOKEN, &a).await;
    assert_eq!((again.status, again.json()), (202, first.json()));

    let mut other_fence = a.clone();
    other_fence.fence = Fence(4);
    let mut other_job = a.clone();
    other_job.job = JobId(8);
    for other in [other_fence, other_job] {
        let reply = standby.assign(TOKEN, &other).await;
        assert_eq!(reply.status, 409, "{reply:?}");
        assert_eq!(
            reply.json(),
            serde_json::json!({"error": "this runner already took job 7 under fence 3"})
        );
    }
    // The token still comes first.
    assert_eq!(standby.assign("wrong", &a).await.status, 401);

    // A stop during the checkout cancels it.
    standby.stop.send_replace(true);
    let out = standby.out.clone();
    assert_eq!(standby.exit().await, EXIT_CANCELLED, "{}", out.text());
    let lines = out.system_lines();
    let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(
        (count("standby: took job"), count("Checking out")),
        (1, 1),
        "{lines:?}"
    );
    assert_eq!(pod.handed(), [ABORT_FILE]);
    assert_eq!(pod.abort().outcome, CANCELLED);
    assert_eq!(pod.termination("checkout-termination-log"), pod.abort());

    let (task, _) = pod.handoff_task(pod.handoff_options());
    assert_eq!(finish(task).await, EXIT_CANCELLED);
    assert_eq!(pod.termination("job-termination-log").outcome, CANCELLED);
}

#[tokio::test]
async fn a_failed_checkout_leaves_its_outcome_in_abort_json_and_the_job_container_exits_with_it() {
    let repos = TempDir::new().unwrap();
    let good = two_commit_repository(repos.path()).checkout;
    let cases = [
        // A commit the repository does not have: git fails.
        (
            "0123456789abcdef0123456789abcdef01234567",
            CRASH,
            "not even after fetching refs/heads/main",
        ),
        // Not a commit id at all: running it again cannot help.
        (
            "--upload-pack=touch pwned",
            Outcome::Failed(FailureClass::Config),
            "is not a commit id",
        ),
    ];
    for (sha, outcome, why) in cases {
        let pod = Pod::new();
        let mut checkout = good.clone();
        checkout.sha = sha.to_owned();
        let standby = pod.standby().await;
        let (job_task, job_out) = pod.handoff_task(pod.handoff_options());

        let reply = standby
            .assign(TOKEN, &with_checkout(checkout, &["touch ran"]))
            .await;
        assert_eq!(reply.status, 202, "{reply:?}");
        let out = standby.out.clone();
        assert_eq!(standby.exit().await, EXIT_NOT_RUN, "{}", out.text());

        assert_eq!(pod.handed(), [ABORT_FILE], "{sha}");
        let abort = pod.abort();
        assert_eq!(abort.outcome, outcome, "{sha}");
        let message = abort.message.clone().expect("a message");
        assert!(message.contains(why), "{sha}: {message}");
        assert_eq!(pod.termination("checkout-termination-log"), abort);

        // The job container, already waiting, ends with the checkout's outcome.
        assert_eq!(finish(job_task).await, EXIT_NOT_RUN, "{sha}");
        assert_eq!(pod.termination("job-termination-log"), abort);
        let said = job_out.system_lines();
        assert_eq!(
            said.len(),
            1,
            "one system line and no started or finished: {said:?}"
        );
        assert!(
            said[0].contains(&message) && said[0].starts_with("the checkout failed")
                || said[0] == message && message.starts_with("checkout failed"),
            "{said:?}"
        );
        assert!(
            !said[0].contains("failed: checkout failed"),
            "said once: {said:?}"
        );
        assert!(!pod.workspace().join("ran").exists());
    }
}

#[tokio::test]
async fn credentials_in_the_clone_url_reach_neither_the_output_nor_the_handoff() {
    let pod = Pod::new();
    // Nothing listens on port 1: the fetch fails at once, and git's messages name the URL.
    let a = with_checkout(
        Checkout {
            repo_url: "https://x-access-token:s3cr3t-t0ken@127.0.0.1:1/acme/app.git".to_owned(),
            git_ref: "refs/heads/main".to_owned(),
            sha: "a".repeat(40),
        },
        &["true"],
    );
    let standby = pod.standby().await;
    assert_eq!(standby.assign(TOKEN, &a).await.status, 202);
    let out = standby.out.clone();
    assert_eq!(standby.exit().await, EXIT_NOT_RUN);
    let (task, job_out) = pod.handoff_task(pod.handoff_options());
    assert_eq!(finish(task).await, EXIT_NOT_RUN);

    let everything = out.text() + &job_out.text() + &pod.files_text();
    assert!(
        everything.contains("127.0.0.1:1/acme/app.git"),
        "{everything}"
    );
    assert!(!everything.contains("s3cr3t"), "{everything}");
    assert!(!everything.contains(TOKEN), "{everything}");
}

#[tokio::test]
async fn an_empty_token_file_is_refused_with_125_and_the_job_container_is_told() {
    let pod = Pod::new();
    std::fs::write(pod.path("token"), " \n").unwrap();
    let standby = pod.standby().await;
    let out = standby.out.clone();
    assert_eq!(standby.exit().await, EXIT_NOT_RUN);

    let termination = pod.termination("checkout-termination-log");
    assert_eq!(termination.outcome, CRASH);
    assert!(
        termination
            .message
            .as_deref()
            .is_some_and(|m| m.contains("token file") && m.contains("is empty")),
        "{termination:?}"
    );
    assert_eq!(pod.abort(), termination);
    assert!(
        !out.text().contains("waiting for a job"),
        "it never served: {}",
        out.text()
    );
}

// ---------------------------------------------------------------------------------------
// handoff

/// Waits for a handoff task and returns its exit status.
async fn finish(task: JoinHandle<u8>) -> u8 {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the handoff ends")
        .expect("the handoff does not panic")
}

/// Whether `records` hold no `started` and no `finished`.
fn no_attempt_records(records: &[Record]) -> bool {
    !records
        .iter()
        .any(|r| matches!(r, Record::Started { .. } | Record::Finished { .. }))
}

#[tokio::test]
async fn a_warm_pod_runs_its_job_in_the_workspace_the_standby_checked_out() {
    let pod = Pod::new();
    let repos = TempDir::new().unwrap();
    let a = with_checkout(
        two_commit_repository(repos.path()).checkout,
        &["cat hello.txt"],
    );
    // As in the pod: the job container waits from the start.
    let (job_task, job_out) = pod.handoff_task(pod.handoff_options());
    let standby = pod.standby().await;
    assert_eq!(standby.assign(TOKEN, &a).await.status, 202);
    assert_eq!(standby.exit().await, 0);
    assert_eq!(finish(job_task).await, 0, "{}", job_out.text());

    let records = job_out.records();
    let started = records
        .iter()
        .position(|r| matches!(r, Record::Started { .. }))
        .expect("a started record");
    let line = records
        .iter()
        .position(|r| {
            matches!(r, Record::Line { s: WireStream::Stdout, step: Some(0), t, .. }
                if t == "hello from the first commit")
        })
        .expect("the step's output");
    assert!(started < line, "{records:?}");
    assert!(
        matches!(
            records.last(),
            Some(Record::Finished {
                outcome: Outcome::Succeeded,
                ..
            })
        ),
        "{records:?}"
    );
    assert_eq!(
        pod.termination("job-termination-log").outcome,
        Outcome::Succeeded
    );
}

#[tokio::test]
async fn a_failing_step_run_by_the_handoff_exits_with_its_code() {
    let pod = Pod::new();
    std::fs::create_dir_all(pod.handoff()).unwrap();
    std::fs::write(
        pod.handoff().join(JOB_FILE),
        serde_json::to_vec(&job(&["echo before; exit 7", "touch never-ran"])).unwrap(),
    )
    .unwrap();
    let (task, out) = pod.handoff_task(pod.handoff_options());
    assert_eq!(finish(task).await, 7, "{}", out.text());

    let failed = Outcome::Failed(FailureClass::Test { exit_code: 7 });
    let records = out.records();
    assert!(
        matches!(records.last(), Some(Record::Finished { outcome, .. }) if *outcome == failed),
        "{records:?}"
    );
    assert!(records.iter().any(|r| matches!(r, Record::Started { .. })));
    assert_eq!(pod.termination("job-termination-log").outcome, failed);
    assert!(!pod.workspace().join("never-ran").exists());
}

#[tokio::test]
async fn the_handoff_refuses_another_protocol_at_once_before_any_job_arrives() {
    let pod = Pod::new();
    let mut opts = pod.handoff_options();
    opts.protocol = PROTOCOL_VERSION + 1;
    // No standby and no handoff directory: a handoff that waited would wait forever.
    let (task, out) = pod.handoff_task(opts);
    let code = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("refused at once, without waiting for a job")
        .unwrap();

    assert_eq!(code, EXIT_NOT_RUN, "{}", out.text());
    let termination = pod.termination("job-termination-log");
    assert_eq!(termination.outcome, CRASH);
    let message = termination.message.expect("a message");
    assert!(
        message.contains(&format!("protocol {PROTOCOL_VERSION}"))
            && message.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)),
        "{message}"
    );
    assert!(
        !out.records()
            .iter()
            .any(|r| matches!(r, Record::Started { .. }))
    );
}

#[tokio::test]
async fn a_handoff_stopped_while_waiting_is_cancelled_with_130_and_runs_nothing() {
    let pod = Pod::new();
    std::fs::create_dir_all(pod.handoff()).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let out = Output::default();
    let opts = pod.handoff_options();
    let task = tokio::spawn({
        let out = out.clone();
        async move { standby::handoff_or_stop(&opts, stop_rx, out).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!task.is_finished(), "it waits for the standby");
    stop.send_replace(true);
    assert_eq!(finish(task).await, EXIT_CANCELLED);

    assert_eq!(pod.termination("job-termination-log").outcome, CANCELLED);
    assert_eq!(out.system_lines().len(), 1, "{}", out.text());
}

#[tokio::test]
async fn an_abort_file_that_is_not_a_failure_is_a_runner_crash() {
    let succeeded = Termination {
        v: PROTOCOL_VERSION,
        outcome: Outcome::Succeeded,
        message: None,
    };
    for garbled in ["{\"half\": ".to_owned(), succeeded.to_json()] {
        let pod = Pod::new();
        std::fs::create_dir_all(pod.handoff()).unwrap();
        std::fs::write(pod.handoff().join(ABORT_FILE), &garbled).unwrap();
        let (task, out) = pod.handoff_task(pod.handoff_options());
        assert_eq!(finish(task).await, EXIT_NOT_RUN, "{garbled}");
        let termination = pod.termination("job-termination-log");
        assert_eq!(termination.outcome, CRASH, "{garbled}");
        assert!(
            termination
                .message
                .as_deref()
                .is_some_and(|m| m.contains(ABORT_FILE)),
            "{termination:?}"
        );
        assert!(no_attempt_records(&out.records()), "{}", out.text());
    }
}
