//! `flotilla runner standby` and `flotilla runner handoff`: the two halves of a *warm* runner
//! pod, one created before its job is known and given the job over HTTP.
//!
//! A warm pod has the init container `install` (as every runner pod), then two containers
//! that share the emptyDir volumes `workspace` (`/workspace`) and `handoff`
//! (`/flotilla/handoff`, read-write in `checkout`, read-only in `job`):
//! - `checkout` (the Flotilla image, with git and the token file from a Secret volume
//!   mounted in it alone) runs [`standby`]: it waits for the job over HTTP, checks its
//!   commit out into the workspace, and leaves the job (or why there is none) in `handoff`;
//! - `job` (the pool's image, started as `/flotilla/bin/flotilla runner handoff`) runs
//!   [`handoff`]: it waits for that file, then runs the job's steps as `runner exec` does.
//!
//! # The standby's HTTP interface
//!
//! HTTP/1.1 on `--listen` (default `0.0.0.0:7171`, [`DEFAULT_PORT`]):
//! - `GET /healthz` → `200 ok`, without authentication (the pod's readiness probe);
//! - `POST /v1/assign`, with the whole [`Assignment`] as JSON, clone URL credentials
//!   included, *sealed* with the token (the token file's contents, surrounding whitespace
//!   trimmed; [`super::sealed`]) as the body — the token itself never crosses the network:
//!   - `413` for a body over 1 MiB ([`MAX_ASSIGNMENT_BYTES`]): at once for a
//!     `Content-Length` over it, else once read past it;
//!   - `401` for a body not sealed with this pod's token (the answer does not say more);
//!   - `400` `{"error": "…"}` when the body is not an assignment (serde's message);
//!   - `202` `{"job": <id>, "fence": <fence>}` for the first assignment, and again for the
//!     same job under the same fence (the agent may resend after a timeout or a restart:
//!     the job is checked out once);
//!   - `409` `{"error": "this runner already took job X under fence Y"}` for any other job
//!     or fence once one was taken;
//!   - `503` `{"error": "…"}` when the standby is stopping without a job (a signal);
//! - anything else → `404`.
//!
//! The standby keeps answering (202 or 409 as above) while it checks the job out, then
//! stops listening, finishes the requests in flight (for at most [`CLOSE_GRACE`]) and exits.
//! Its readiness probe fails from then on: a warm pod is ready only while it waits.
//!
//! # The handoff directory
//!
//! The standby writes exactly one of these (unless the directory cannot be written),
//! atomically (`<name>.tmp`, fsync, rename), and the job container waits for either (polling
//! every 50 ms):
//! - `job.json` ([`JOB_FILE`]): the assignment, *without* its `checkout` (the job never sees
//!   the clone URL), once the commit is in the workspace (at once for a job without a
//!   repository);
//! - `abort.json` ([`ABORT_FILE`]): a [`Termination`] when there will be no job: the failed
//!   checkout's own (`Failed(Config)` for a malformed commit, ref or URL,
//!   `Failed(Infra{RunnerCrash})` when git fails or outlives `--checkout-timeout`,
//!   `Failed(Cancelled)` on SIGTERM or SIGINT), `Failed(Cancelled)` when stopped while
//!   waiting for a job, and `Failed(Infra{RunnerCrash})` when the standby cannot start (an
//!   empty or unreadable token file, an address it cannot listen on) or cannot write
//!   `job.json`.
//!
//! The assignment, with its credentials, is never written to disk. Should the standby die
//! without a word (killed, out of memory), neither file appears and the job container waits
//! until the pod is deleted: the backend reads the `checkout` container's state.
//! The pod's `restartPolicy` must be `Never`: a restarted standby would wait for a second job.
//!
//! # Output and exit statuses
//!
//! Both write [`record`](super::record)s on their output and a [`Termination`] to
//! `--termination-log`. The standby writes system lines only (`standby: waiting for a job
//! on ADDR`, `standby: took job J (NAME), attempt A, fence F`, the checkout's lines, why it
//! gave up), never the token or the clone URL's credentials. Its termination message is the
//! checkout's (`Succeeded` once checked out; none for a job without a repository) or why it
//! gave up, the same as abort.json. It exits 0 once `job.json` is written; 125 when it could
//! not start, the checkout failed (Config or Infra) or `job.json` could not be written; 130
//! when cancelled, while waiting or during the checkout. The handoff:
//! - with `job.json`: is `flotilla runner exec` of that spec, records (`started`, the
//!   steps' lines, `finished` last), termination and exit status alike;
//! - with `abort.json`: writes that termination to its own termination log unchanged (so
//!   the pod status carries the checkout's outcome), one system line `the checkout failed:
//!   …`, no `started` or `finished`, and exits [`exit_code_for`] its outcome (125, or 130);
//!   an unreadable one is `Failed(Infra{RunnerCrash})`, 125;
//! - stopped by SIGTERM or SIGINT while waiting: `Failed(Cancelled)`, one system line, 130;
//! - with a `--protocol` other than its own: refuses at once, before any job arrives,
//!   exactly as `runner exec` does (a system line, `finished`, 125).

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::Assignment;
use flotilla_core::{Fence, JobId};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tower_http::limit::RequestBodyLimitLayer;

use super::checkout::{Target, checkout_assignment};
use super::exec::{self, ExecOptions, RecordSink, Signals, write_termination};
use super::record::{PROTOCOL_VERSION, Termination, exit_code_for};

/// The port `flotilla runner standby` listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7171;
/// The path the cell agent posts the assignment to.
pub const ASSIGN_PATH: &str = "/v1/assign";
/// The readiness probe's path.
pub const HEALTH_PATH: &str = "/healthz";
/// The largest assignment body accepted (`413` above).
pub const MAX_ASSIGNMENT_BYTES: usize = 1 << 20;
/// The file in the handoff directory holding the job to run (without its checkout).
pub const JOB_FILE: &str = "job.json";
/// The file in the handoff directory holding the [`Termination`] of a pod with no job to run.
pub const ABORT_FILE: &str = "abort.json";
/// How long the standby waits for requests in flight once it stops listening.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How often the job container looks for the handoff files.
const POLL: Duration = Duration::from_millis(50);

const CRASH: Outcome = Outcome::Failed(FailureClass::Infra {
    reason: InfraReason::RunnerCrash,
});
const CANCELLED: Outcome = Outcome::Failed(FailureClass::Cancelled);

/// What `flotilla runner standby` is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyOptions {
    /// The address to listen on (`0.0.0.0:7171` by default); port 0 picks a free one.
    /// Ignored by [`serve`], which is given its listener.
    pub listen: SocketAddr,
    /// The file holding the token the agent must present (surrounding whitespace ignored).
    pub token_file: PathBuf,
    /// The handoff directory shared with the job container; created when missing.
    pub handoff: PathBuf,
    /// The directory to check the code out into; created when missing.
    pub workspace: PathBuf,
    /// Where to write the [`Termination`]; `None` writes none.
    pub termination_log: Option<PathBuf>,
    /// Longest the checkout may take, counted from when it starts (not from the pod's start).
    pub checkout_timeout: Duration,
}

/// What `flotilla runner handoff` is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffOptions {
    /// The handoff directory the standby writes into.
    pub handoff: PathBuf,
    /// The directory the steps run in (the one the standby checked the code out into).
    pub workspace: PathBuf,
    /// Where to write the [`Termination`] (the container's `terminationMessagePath`);
    /// `None` writes none.
    pub termination_log: Option<PathBuf>,
    /// The record protocol the caller expects; anything but [`PROTOCOL_VERSION`] is refused.
    pub protocol: u32,
}

/// Runs the checkout container of a warm pod: listens on `opts.listen`, takes one job, checks
/// it out and hands it to the job container (see the module documentation), writing system
/// records to `out`. Returns the exit status. Listens for SIGTERM and SIGINT for as long as it
/// runs (must be called inside a Tokio runtime with signals and timers enabled).
pub async fn standby<W: Write + Send + 'static>(opts: &StandbyOptions, out: W) -> u8 {
    let sink = RecordSink::new(out);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Held here until the end: a dropped sender would count as a stop.
    let stop_tx = Arc::new(stop_tx);
    let signals = Signals::listen(&sink, &stop_tx);
    let code = match read_token(&opts.token_file) {
        Err(why) => give_up(opts, &sink, CRASH, why),
        Ok(token) => match TcpListener::bind(opts.listen).await {
            Err(e) => give_up(
                opts,
                &sink,
                CRASH,
                format!("standby: cannot listen on {}: {e}", opts.listen),
            ),
            Ok(listener) => take_one(opts, token, listener, stop_rx, signals.as_ref(), &sink).await,
        },
    };
    drop(signals);
    drop(stop_tx);
    code
}

/// [`standby`] on a listener the caller bound, with `stop` standing for the signals: `true`
/// on it (or dropping its sender) is a SIGTERM, while waiting for a job and during the
/// checkout alike. Listens for no signals itself.
pub async fn serve<W: Write + Send + 'static>(
    opts: &StandbyOptions,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    out: W,
) -> u8 {
    let sink = RecordSink::new(out);
    match read_token(&opts.token_file) {
        Err(why) => give_up(opts, &sink, CRASH, why),
        Ok(token) => take_one(opts, token, listener, stop, None, &sink).await,
    }
}

/// Serves until one job is taken, checks it out and leaves the handoff file.
async fn take_one<W: Write>(
    opts: &StandbyOptions,
    token: Token,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    signals: Option<&Signals>,
    sink: &RecordSink<W>,
) -> u8 {
    let address = listener
        .local_addr()
        .map_or_else(|_| opts.listen.to_string(), |a| a.to_string());
    let (deliver, delivered) = oneshot::channel();
    let desk = Arc::new(Desk {
        token,
        state: Mutex::new(DeskState {
            taken: None,
            deliver: Some(deliver),
        }),
    });
    let server = Server::start(listener, router(desk));
    sink.system(format!("standby: waiting for a job on {address}"));

    let assignment = tokio::select! {
        // A job accepted (and answered 202) as the stop comes is still checked out: the
        // stop then cancels the checkout, and the agent hears of it from abort.json.
        biased;
        taken = delivered => taken.ok(),
        () = stopped(stop.clone()) => None,
    };
    // From here on the desk answers 503 to a first assignment (its receiver is gone).
    let Some(assignment) = assignment else {
        server.close().await;
        let why = match signals.and_then(Signals::caught) {
            Some(signal) => format!("standby: cancelled by {signal} while waiting for a job"),
            None => "standby: cancelled while waiting for a job".to_owned(),
        };
        return give_up(opts, sink, CANCELLED, why);
    };

    sink.system(format!(
        "standby: took job {} ({}), attempt {}, fence {}",
        assignment.job, assignment.name, assignment.attempt, assignment.fence
    ));
    let target = Target {
        workspace: &opts.workspace,
        termination_log: opts.termination_log.as_deref(),
        timeout: opts.checkout_timeout,
    };
    let termination = checkout_assignment(Ok(&assignment), &target, stop, signals, sink).await;
    let code = if termination.outcome == Outcome::Succeeded {
        let job = Assignment {
            checkout: None,
            ..assignment
        };
        let json = serde_json::to_vec(&job).expect("assignments always serialize");
        match write_atomically(&opts.handoff, JOB_FILE, &json) {
            Ok(()) => 0,
            Err(e) => give_up(
                opts,
                sink,
                CRASH,
                format!(
                    "standby: could not hand the job over in {}: {e}",
                    opts.handoff.join(JOB_FILE).display()
                ),
            ),
        }
    } else {
        // The checkout wrote its termination log and said why in a system line already.
        leave_abort(opts, sink, &termination);
        exit_code_for(termination.outcome)
    };
    server.close().await;
    code
}

/// Ends the standby without a job: says why in a system line, the termination log and
/// abort.json, and returns the exit status for `outcome`.
fn give_up<W: Write>(
    opts: &StandbyOptions,
    sink: &RecordSink<W>,
    outcome: Outcome,
    why: String,
) -> u8 {
    sink.system(why.clone());
    write_termination(
        sink,
        opts.termination_log.as_deref(),
        outcome,
        Some(why.clone()),
    );
    leave_abort(
        opts,
        sink,
        &Termination {
            v: PROTOCOL_VERSION,
            outcome,
            message: Some(why),
        },
    );
    exit_code_for(outcome)
}

/// Writes abort.json; a failure becomes a system line (the job container then waits until
/// the pod is deleted, and the termination log still says what happened).
fn leave_abort<W: Write>(opts: &StandbyOptions, sink: &RecordSink<W>, termination: &Termination) {
    if let Err(e) = write_atomically(&opts.handoff, ABORT_FILE, termination.to_json().as_bytes()) {
        sink.system(format!(
            "standby: could not write {}: {e}",
            opts.handoff.join(ABORT_FILE).display()
        ));
    }
}

/// Writes `dir/name` so that a reader sees all of it or nothing: `name.tmp`, synced, renamed.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, dir.join(name))?;
    // The rename survives a crash of the node only once the directory is synced too; the
    // file is whole either way, so this is best effort.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Resolves once `stop` is `true` or its sender is gone.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// The shared secret the agent presents; never printed.
struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Reads the token file; `Err` says why it cannot be used, without its contents.
fn read_token(path: &Path) -> Result<Token, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "standby: cannot read the token file {}: {e}",
            path.display()
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "standby: the token file {} is empty",
            path.display()
        ));
    }
    Ok(Token(token.as_bytes().to_vec()))
}

/// The standby's HTTP server, owned: [`Server::close`] stops it, and dropping it aborts it.
struct Server {
    task: JoinHandle<std::io::Result<()>>,
    close: Option<oneshot::Sender<()>>,
}

impl Server {
    fn start(listener: TcpListener, router: Router) -> Self {
        let (close, closed) = oneshot::channel::<()>();
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = closed.await;
        });
        Self {
            task: tokio::spawn(serve.into_future()),
            close: Some(close),
        }
    }

    /// Stops listening and lets the requests in flight finish, for at most [`CLOSE_GRACE`]
    /// (an idle or stalled connection must not keep the pod's container alive).
    async fn close(mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut self.task).await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where assignments arrive: the token, and which job was taken.
struct Desk {
    token: Token,
    state: Mutex<DeskState>,
}

struct DeskState {
    /// The job taken, once one was.
    taken: Option<(JobId, Fence)>,
    /// Hands the first assignment to [`take_one`]; gone once it was used or dropped.
    deliver: Option<oneshot::Sender<Assignment>>,
}

impl Desk {
    fn state(&self) -> MutexGuard<'_, DeskState> {
        // Nothing is left half-updated by a panic under this lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The assignment JSON sealed in `body`, if it was sealed with this pod's token.
    fn open(&self, body: &[u8]) -> Option<Vec<u8>> {
        super::sealed::open(&self.token.0, body).ok()
    }

    /// Takes `assignment` if no job was taken yet; answers a repeat of the taken one alike.
    fn take(&self, assignment: Assignment) -> Response {
        let wanted = (assignment.job, assignment.fence);
        let mut state = self.state();
        if let Some(taken) = state.taken {
            return if taken == wanted {
                accepted(taken)
            } else {
                error(
                    StatusCode::CONFLICT,
                    format!(
                        "this runner already took job {} under fence {}",
                        taken.0, taken.1
                    ),
                )
            };
        }
        let delivered = match state.deliver.take() {
            Some(deliver) => deliver.send(assignment).is_ok(),
            None => false,
        };
        if delivered {
            state.taken = Some(wanted);
            accepted(wanted)
        } else {
            // The standby stopped waiting: it is on its way out.
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this runner is shutting down".to_owned(),
            )
        }
    }
}

fn router(desk: Arc<Desk>) -> Router {
    Router::new()
        .route(HEALTH_PATH, get(|| async { "ok" }).fallback(not_found))
        .route(ASSIGN_PATH, post(assign).fallback(not_found))
        .fallback(not_found)
        // From the Content-Length when there is one, before anything is read; else as
        // the body is read.
        .layer(RequestBodyLimitLayer::new(MAX_ASSIGNMENT_BYTES))
        .with_state(desk)
}

/// `POST /v1/assign`: the body must open with the pod's token (that is the authentication),
/// then be an assignment.
async fn assign(State(desk): State<Arc<Desk>>, request: Request) -> Response {
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let Some(body) = desk.open(&body) else {
        return error(StatusCode::UNAUTHORIZED, "not authorized".to_owned());
    };
    match serde_json::from_slice::<Assignment>(&body) {
        Ok(assignment) => desk.take(assignment),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("the body is not an assignment: {e}"),
        ),
    }
}

async fn not_found() -> StatusCode {
    StatusCode::NOT_FOUND
}

fn accepted((job, fence): (JobId, Fence)) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "job": job, "fence": fence })),
    )
        .into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

// ---------------------------------------------------------------------------------------
// handoff

/// Runs the job container of a warm pod: waits for the standby's handoff file, then runs the
/// job in this process as `flotilla runner exec` would, or reports why there is none (see
/// the module documentation). Writes records to `out` and returns the exit status. Listens
/// for SIGTERM and SIGINT (must be called inside a Tokio runtime with signals and timers
/// enabled).
pub async fn handoff<W: Write + Send + 'static>(opts: &HandoffOptions, out: W) -> u8 {
    if opts.protocol != PROTOCOL_VERSION {
        return refuse_protocol(opts, out).await;
    }
    let out = SharedOutput::new(out);
    let sink = RecordSink::new(out.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    // Held here until the end: a dropped sender would count as a stop.
    let stop_tx = Arc::new(stop_tx);
    let signals = Signals::listen(&sink, &stop_tx);
    let code = receive(opts, stop_rx, signals.as_ref(), &sink, out).await;
    drop(signals);
    drop(stop_tx);
    code
}

/// [`handoff`] with `stop` standing for the signals while it waits (`true` on it, or
/// dropping its sender, is a SIGTERM). Once the job runs, `runner exec`'s own signal
/// handling applies.
pub async fn handoff_or_stop<W: Write + Send + 'static>(
    opts: &HandoffOptions,
    stop: watch::Receiver<bool>,
    out: W,
) -> u8 {
    if opts.protocol != PROTOCOL_VERSION {
        return refuse_protocol(opts, out).await;
    }
    let out = SharedOutput::new(out);
    let sink = RecordSink::new(out.clone());
    receive(opts, stop, None, &sink, out).await
}

/// The protocol check of `runner exec`, by `runner exec` itself: it refuses a protocol before
/// it reads its spec, so a mismatch shows at the pod's start with exec's very records,
/// message and status.
async fn refuse_protocol<W: Write + Send + 'static>(opts: &HandoffOptions, out: W) -> u8 {
    exec::exec(&exec_options(opts), out).await
}

fn exec_options(opts: &HandoffOptions) -> ExecOptions {
    ExecOptions {
        spec: opts.handoff.join(JOB_FILE),
        workspace: opts.workspace.clone(),
        termination_log: opts.termination_log.clone(),
        protocol: opts.protocol,
    }
}

/// What turned up in the handoff directory.
enum Handed {
    Job,
    Abort(Result<Termination, String>),
    Stopped,
}

async fn receive<W: Write + Send + 'static>(
    opts: &HandoffOptions,
    stop: watch::Receiver<bool>,
    signals: Option<&Signals>,
    sink: &RecordSink<SharedOutput<W>>,
    out: SharedOutput<W>,
) -> u8 {
    let handed = tokio::select! {
        handed = wait_for_handoff(&opts.handoff) => handed,
        () = stopped(stop.clone()) => Handed::Stopped,
    };
    match handed {
        // A stop that came with the job still ends the attempt before it starts.
        Handed::Job if !*stop.borrow() => exec::exec(&exec_options(opts), out).await,
        Handed::Job | Handed::Stopped => {
            let why = match signals.and_then(Signals::caught) {
                Some(signal) => format!("cancelled by {signal} while waiting for a job"),
                None => "cancelled while waiting for a job".to_owned(),
            };
            sink.system(why.clone());
            write_termination(sink, opts.termination_log.as_deref(), CANCELLED, Some(why));
            exit_code_for(CANCELLED)
        }
        Handed::Abort(Ok(termination)) => {
            let why = termination
                .message
                .clone()
                .unwrap_or_else(|| format!("{:?}", termination.outcome));
            // The checkout's own message usually says "checkout failed: …" already.
            let line = if why.starts_with("checkout failed") {
                why.clone()
            } else {
                format!("the checkout failed: {why}")
            };
            sink.system(line);
            write_termination(
                sink,
                opts.termination_log.as_deref(),
                termination.outcome,
                termination.message,
            );
            exit_code_for(termination.outcome)
        }
        Handed::Abort(Err(why)) => {
            sink.system(why.clone());
            write_termination(sink, opts.termination_log.as_deref(), CRASH, Some(why));
            exit_code_for(CRASH)
        }
    }
}

/// Polls `dir` until the standby leaves job.json or abort.json (abort.json first: a pod
/// must never run a job whose checkout it was told failed).
async fn wait_for_handoff(dir: &Path) -> Handed {
    let (job, abort) = (dir.join(JOB_FILE), dir.join(ABORT_FILE));
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tokio::fs::try_exists(&abort).await.unwrap_or(false) {
            return Handed::Abort(read_abort(&abort).await);
        }
        if tokio::fs::try_exists(&job).await.unwrap_or(false) {
            return Handed::Job;
        }
    }
}

/// Reads abort.json; `Err` says why it is no use. A "failure" that succeeded is no use
/// either: exiting 0 would report a job that never ran as passed.
async fn read_abort(path: &Path) -> Result<Termination, String> {
    let text = tokio::fs::read_to_string(path).await.map_err(|e| {
        format!(
            "the checkout failed, but {} cannot be read: {e}",
            path.display()
        )
    })?;
    match Termination::parse(&text) {
        Some(termination) if termination.outcome != Outcome::Succeeded => Ok(termination),
        _ => Err(format!(
            "the checkout failed, but {} is not a failure's termination message",
            path.display()
        )),
    }
}

/// One output written by the handoff's own records and then by the `exec` it runs.
struct SharedOutput<W>(Arc<Mutex<W>>);

impl<W> SharedOutput<W> {
    fn new(out: W) -> Self {
        Self(Arc::new(Mutex::new(out)))
    }

    fn lock(&self) -> MutexGuard<'_, W> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<W> Clone for SharedOutput<W> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<W: Write> Write for SharedOutput<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lock().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.lock().flush()
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.lock().write_all(buf)
    }
}
