//! The agent: one session with the federator leader, the attempts this cell runs, their
//! reports, and the reaper.
//!
//! Everything the agent knows lives in one owned task ([`Agent::start`]), so there are no
//! locks: runner events, federator messages, heartbeats and reaping are all handled in turn
//! by one `select!` loop. The session is optional state inside it — runners keep running and
//! reports keep queueing while the agent is disconnected.
//!
//! Reports are at-least-once: every `JobUpdate` stays in the outbox until the federator
//! acknowledges it (committed or refused), and the whole outbox is sent again after each
//! reconnect. A `Hello` lists every attempt the agent still runs or has unacknowledged reports
//! for, so the federator can revoke the ones that are no longer the cell's (ARCHITECTURE §6).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_core::autoscale::{Autoscaler, Policy, Retire, RunnerId, RunnerState};
use flotilla_core::ids::{CellId, Fence, JobId};
use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::pipeline::Resources;
use flotilla_core::runner::{
    Assignment, JobReport, ReportState, RunnerBackend, RunnerError, RunnerEvent, RunnerEvents,
    RunnerInfo,
};
use flotilla_proto::cell::{assign_from_pb, from_job_refs, job_refs, report_to_pb};
use flotilla_proto::cellpb as pb;
use flotilla_proto::cellpb::cell_service_client::CellServiceClient;
use futures::FutureExt as _;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::pools::{WarmPool, WarmPools, load_histories, save_histories};

use pb::agent_message::Msg as Out;
use pb::federator_message::Msg as In;

/// How the agent proves which cell it is.
#[derive(Clone)]
pub enum AgentAuth {
    /// The federator's cell bootstrap token (`flotilla dev`, trials).
    Token(String),
    /// Mutual TLS: the cell's certificate (naming the cell id as a DNS name), its key, and
    /// the CA the federators' certificates chain to. `server_name` overrides the name checked
    /// on the federator's certificate (default: the host dialled).
    Tls {
        /// PEM certificate chain.
        cert_chain_pem: Vec<u8>,
        /// PEM private key.
        private_key_pem: Vec<u8>,
        /// PEM CA bundle.
        ca_pem: Vec<u8>,
        /// Name to verify the federator's certificate against.
        server_name: Option<String>,
    },
}

impl std::fmt::Debug for AgentAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAuth::Token(_) => f.write_str("Token(<redacted>)"),
            AgentAuth::Tls { server_name, .. } => f
                .debug_struct("Tls")
                .field("server_name", server_name)
                .finish_non_exhaustive(),
        }
    }
}

/// One cell agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The cell's id (a DNS label).
    pub cell: CellId,
    /// Its region.
    pub region: String,
    /// Its labels, matched by jobs' placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Its runner pools: name → most attempts at once.
    pub pools: BTreeMap<String, u32>,
    /// Cell-session addresses (`host:port`) of any federator replicas; the agent follows
    /// leader hints from there.
    pub federators: Vec<String>,
    /// How it authenticates.
    pub auth: AgentAuth,
    /// Where job output files are written (`job-<id>.log`), until the log store lands.
    pub logs_dir: PathBuf,
    /// How often the reaper looks for runners that must not be running.
    pub reap_interval: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Warm pools: the pools (of `pools`) whose runners are started ahead of their jobs and
    /// sized by this policy (its `max` is the pool's size). Pools not named here start a
    /// runner per attempt. Needs a backend with warm runners (`local`).
    pub autoscale: BTreeMap<String, Policy>,
    /// Each pool's runner size (pools not named here run jobs at the size they ask for): a
    /// job asking for less is given this much.
    pub pool_resources: BTreeMap<String, Resources>,
    /// How often warm pools are sized again besides on every change.
    pub autoscale_interval: Duration,
    /// Where the warm pools' time-of-day floors keep what they learnt across restarts
    /// (written every minute and at shutdown); `None` forgets it with the process.
    pub history_file: Option<PathBuf>,
}

impl AgentConfig {
    /// Settings with defaults: one `default` pool of `slots`, reaping every 5 s.
    pub fn new(cell: CellId, federators: Vec<String>, auth: AgentAuth, logs_dir: PathBuf) -> Self {
        Self {
            cell,
            region: "local".into(),
            labels: BTreeMap::new(),
            pools: BTreeMap::from([(flotilla_core::state::DEFAULT_POOL.to_owned(), 4)]),
            federators,
            auth,
            logs_dir,
            reap_interval: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            autoscale: BTreeMap::new(),
            pool_resources: BTreeMap::new(),
            autoscale_interval: Duration::from_secs(1),
            history_file: None,
        }
    }
}

/// What an agent has done, for tests and `/metrics`.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Sessions that reached `Welcome`.
    pub sessions: AtomicU64,
    /// Assignments accepted.
    pub assignments: AtomicU64,
    /// Attempts revoked by the federator while they still ran here.
    pub revoked: AtomicU64,
    /// Attempts named in `Revoke` messages received (running here or not).
    pub revocations: AtomicU64,
    /// Reports the federator refused because their fence was stale.
    pub stale_reports: AtomicU64,
    /// Runners the reaper killed.
    pub reaped: AtomicU64,
    /// Reports acknowledged.
    pub acked: AtomicU64,
    /// Warm runners created.
    pub runners_prepared: AtomicU64,
    /// Warm runners deleted by scale-down.
    pub runners_retired: AtomicU64,
    /// Fenced runners the backend found running a job, and so kept.
    pub runners_kept: AtomicU64,
    /// Idle warm runners that died (evicted, deleted by someone else) before taking a job.
    pub runners_lost: AtomicU64,
    /// Jobs of a warm pool started on a runner of their own because they did not fit its
    /// warm runners (another image, or more resources).
    pub cold_starts: AtomicU64,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<AgentStats>,
}

impl Agent {
    /// Starts the agent's task: it connects, says hello and runs what it is assigned.
    pub fn start(config: AgentConfig, backend: Arc<dyn RunnerBackend>) -> Self {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(AgentStats::default());
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut warm = warm_pools(&config, backend.as_ref());
        if let Some(file) = &config.history_file {
            match load_histories(file, &mut warm) {
                Ok(pools) if !pools.is_empty() => {
                    tracing::info!(cell = %config.cell, pools = ?pools, "Time-of-day floors resume what they learnt.");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(cell = %config.cell, error = %e, "Cannot read what the time-of-day floors learnt; they learn again.");
                }
            }
        }
        let worker = Worker {
            config,
            backend,
            sink: Arc::new(Sink(events_tx)),
            events,
            stats: stats.clone(),
            runs: HashMap::new(),
            outbox: VecDeque::new(),
            hint: None,
            next_federator: 0,
            done: Default::default(),
            done_order: VecDeque::new(),
            warm,
            prepares: JoinSet::new(),
        };
        let task = tokio::spawn(worker.run(stopped));
        Self { stop, task, stats }
    }

    /// What the agent has done so far.
    pub fn stats(&self) -> &Arc<AgentStats> {
        &self.stats
    }

    /// Stops the agent: closes the session and shuts the backend down. Runners that die with
    /// the agent (local) are killed, and the federator re-places their jobs once the cell's
    /// lease runs out; pods (kubernetes) keep running for the next agent to take over.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Forwards runner events into the agent's loop.
struct Sink(mpsc::UnboundedSender<(JobId, Fence, RunnerEvent)>);

impl RunnerEvents for Sink {
    fn event(&self, job: JobId, fence: Fence, event: RunnerEvent) {
        let _ = self.0.send((job, fence, event));
    }
}

/// One attempt this cell holds.
#[derive(Debug)]
struct Run {
    assignment: Assignment,
    delivered_at_ms: u64,
    started_at_ms: Option<u64>,
    /// The federator took it away: kill it, report nothing more, write no more output.
    revoked: bool,
    log: Option<std::fs::File>,
    /// The attempt's secrets, masked again in every line the backend reports (the runner
    /// masks what the steps print; this covers what else a backend forwards, such as a
    /// pod log's lines that are not the wrapper's records).
    masker: flotilla_core::mask::Masker,
}

/// A live session.
struct Session {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::FederatorMessage>,
    heartbeat_interval: Duration,
}

enum ConnectError {
    NotLeader(String),
    Failed(String),
}

struct Worker {
    config: AgentConfig,
    backend: Arc<dyn RunnerBackend>,
    sink: Arc<Sink>,
    events: mpsc::UnboundedReceiver<(JobId, Fence, RunnerEvent)>,
    stats: Arc<AgentStats>,
    runs: HashMap<JobId, Run>,
    outbox: VecDeque<pb::JobUpdate>,
    hint: Option<String>,
    next_federator: usize,
    /// Attempts that ended here recently, so an assignment sent again after a reconnect or
    /// a federator re-send does not run them a second time.
    done: std::collections::HashSet<(JobId, Fence)>,
    done_order: VecDeque<(JobId, Fence)>,
    /// Warm pools, by name.
    warm: WarmPools,
    /// Warm runners being created: (pool, runner, outcome).
    prepares: JoinSet<(String, RunnerId, Result<(), RunnerError>)>,
}

/// The warm pools `config` asks for, if the backend has warm runners.
fn warm_pools(config: &AgentConfig, backend: &dyn RunnerBackend) -> WarmPools {
    if config.autoscale.is_empty() {
        return WarmPools::new();
    }
    if backend.warm().is_none() {
        tracing::warn!(cell = %config.cell, backend = backend.name(), "This backend has no warm runners yet: every pool starts a runner per attempt, and the autoscaling settings are ignored.");
        return WarmPools::new();
    }
    config
        .autoscale
        .iter()
        .filter(|(pool, _)| config.pools.contains_key(*pool))
        .map(|(pool, policy)| {
            let policy = Policy {
                max: config.pools[pool],
                ..policy.clone()
            };
            (pool.clone(), WarmPool::new(Autoscaler::new(policy)))
        })
        .collect()
}

/// How many ended attempts the agent remembers.
const DONE_MEMORY: usize = 16_384;

/// Wall-clock time for the timestamps in reports and logs, which are compared with other
/// machines' clocks (the federator's); durations use tokio's clock.
#[allow(clippy::disallowed_methods)]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn out(msg: Out) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

/// How often the warm pools' demand histories are written down.
const HISTORY_EVERY: Duration = Duration::from_secs(60);
/// How long connecting and the hello exchange may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time past a job's timeout before the reaper kills what the backend did not.
const REAP_SLACK_MS: u64 = 30_000;

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        if let Err(e) = std::fs::create_dir_all(&self.config.logs_dir) {
            tracing::error!(dir = %self.config.logs_dir.display(), error = %e, "Cannot create the job log directory; output will not be kept.");
        }
        self.recover(&mut stop).await;
        let mut session: Option<Session> = None;
        let mut heartbeat: Option<tokio::time::Interval> = None;
        let mut backoff = Duration::from_millis(100);
        let mut retry_at = Instant::now();
        let mut reap = tokio::time::interval(self.config.reap_interval);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut autoscale = tokio::time::interval(self.config.autoscale_interval);
        autoscale.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let scaling = !self.warm.is_empty();
        let mut saved_at = Instant::now();
        loop {
            if session.is_none() && Instant::now() >= retry_at {
                let connected = tokio::select! {
                    _ = stopped(&mut stop) => break,
                    c = tokio::time::timeout(CONNECT_TIMEOUT, self.connect()) => c,
                };
                match connected {
                    Ok(Ok(s)) => {
                        backoff = Duration::from_millis(100);
                        let mut tick = tokio::time::interval(s.heartbeat_interval);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        heartbeat = Some(tick);
                        session = Some(s);
                        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(ConnectError::NotLeader(leader))) => {
                        tracing::info!(cell = %self.config.cell, leader = %leader, "Not the leader; following the hint.");
                        self.hint = (!leader.is_empty()).then_some(leader);
                        retry_at = Instant::now() + Duration::from_millis(50);
                    }
                    Ok(Err(ConnectError::Failed(e))) => {
                        tracing::info!(cell = %self.config.cell, error = %e, retry_in = ?backoff, "Cannot open the federation session.");
                        self.hint = None;
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(self.config.max_backoff);
                    }
                    Err(_) => {
                        tracing::info!(cell = %self.config.cell, "Opening the federation session timed out.");
                        self.hint = None;
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(self.config.max_backoff);
                    }
                }
            }
            tokio::select! {
                _ = stopped(&mut stop) => break,
                Some((job, fence, event)) = self.events.recv() => {
                    self.on_runner_event(job, fence, event, session.as_ref()).await;
                }
                msg = next_message(&mut session) => {
                    let keep = match msg {
                        Ok(Some(m)) => self.on_message(m, session.as_ref()).await,
                        Ok(None) => {
                            tracing::info!(cell = %self.config.cell, "The federator closed the session.");
                            false
                        }
                        Err(e) => {
                            tracing::info!(cell = %self.config.cell, error = %e, "The federation session broke.");
                            false
                        }
                    };
                    if !keep {
                        session = None;
                        heartbeat = None;
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(self.config.max_backoff);
                    }
                }
                _ = heartbeat_tick(&mut heartbeat) => {
                    let hb = out(Out::Heartbeat(self.capacity()));
                    if let Some(s) = &session
                        && s.tx.send(hb).await.is_err()
                    {
                        session = None;
                        heartbeat = None;
                    }
                }
                _ = reap.tick() => self.reap().await,
                _ = autoscale.tick(), if scaling => {
                    self.autoscale(session.as_ref()).await;
                    if saved_at.elapsed() >= HISTORY_EVERY {
                        saved_at = Instant::now();
                        self.save_histories();
                    }
                }
                Some(done) = self.prepares.join_next(), if !self.prepares.is_empty() => {
                    match done {
                        Ok((pool, runner, result)) => {
                            self.prepared(&pool, runner, result, session.as_ref()).await;
                        }
                        Err(e) => tracing::error!(error = %e, "A runner preparation task failed."),
                    }
                }
                _ = tokio::time::sleep_until(retry_at), if session.is_none() => {}
            }
        }
        drop(session);
        if scaling {
            self.save_histories();
        }
        self.prepares.shutdown().await;
        self.backend.shutdown().await;
        // Drain what the backend reported while shutting down, so logs are complete.
        while let Ok((job, fence, event)) = self.events.try_recv() {
            self.on_runner_event(job, fence, event, None).await;
        }
    }

    fn endpoint(&self, addr: &str) -> Result<Endpoint, String> {
        let tls = matches!(self.config.auth, AgentAuth::Tls { .. });
        let scheme = if tls { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("bad federator address `{addr}`: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        if let AgentAuth::Tls {
            cert_chain_pem,
            private_key_pem,
            ca_pem,
            server_name,
        } = &self.config.auth
        {
            let host = server_name.clone().unwrap_or_else(|| {
                addr.rsplit_once(':')
                    .map_or(addr, |(h, _)| h)
                    .trim_matches(['[', ']'])
                    .to_owned()
            });
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .identity(Identity::from_pem(cert_chain_pem, private_key_pem))
                .domain_name(host);
            ep = ep
                .tls_config(config)
                .map_err(|e| format!("unusable TLS configuration: {e}"))?;
        }
        Ok(ep)
    }

    /// Dials the hinted leader or the next configured replica, says hello and waits for
    /// `Welcome`; then sends the outbox again.
    async fn connect(&mut self) -> Result<Session, ConnectError> {
        let addr = match self.hint.take() {
            Some(h) => h,
            None => {
                if self.config.federators.is_empty() {
                    return Err(ConnectError::Failed(
                        "no federator address configured".into(),
                    ));
                }
                let i = self.next_federator % self.config.federators.len();
                self.next_federator += 1;
                self.config.federators[i].clone()
            }
        };
        let channel = self
            .endpoint(&addr)
            .map_err(ConnectError::Failed)?
            .connect()
            .await
            .map_err(|e| ConnectError::Failed(format!("{addr}: {e}")))?;
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
        let token = match &self.config.auth {
            AgentAuth::Token(t) => t.clone(),
            AgentAuth::Tls { .. } => String::new(),
        };
        let mut known: BTreeMap<JobId, Fence> = self
            .runs
            .iter()
            .filter(|(_, r)| !r.revoked)
            .map(|(j, r)| (*j, r.assignment.fence))
            .collect();
        for u in &self.outbox {
            known.entry(JobId(u.job)).or_insert(Fence(u.fence));
        }
        let hello = pb::Hello {
            cell: self.config.cell.to_string(),
            region: self.config.region.clone(),
            labels: self.config.labels.clone().into_iter().collect(),
            pools: self
                .config
                .pools
                .iter()
                .map(|(name, max)| pb::PoolInfo {
                    name: name.clone(),
                    max: *max,
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            bootstrap_token: token,
            known: job_refs(known),
            api_budget: self.backend.api_budget().unwrap_or(0),
        };
        tx.send(out(Out::Hello(hello)))
            .await
            .map_err(|_| ConnectError::Failed("session closed".into()))?;
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let mut inbound = CellServiceClient::new(channel)
            .session(stream)
            .await
            .map_err(|e| ConnectError::Failed(format!("{addr}: {}", e.message())))?
            .into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|e| ConnectError::Failed(format!("{addr}: {}", e.message())))?;
        let interval = match first.and_then(|m| m.msg) {
            Some(In::Welcome(w)) => Duration::from_millis(w.heartbeat_interval_ms.max(10)),
            Some(In::NotLeader(n)) => return Err(ConnectError::NotLeader(n.leader)),
            other => {
                return Err(ConnectError::Failed(format!(
                    "{addr}: expected Welcome, got {other:?}"
                )));
            }
        };
        tracing::info!(cell = %self.config.cell, federator = %addr, "Federation session open.");
        for u in &self.outbox {
            if tx.send(out(Out::JobUpdate(u.clone()))).await.is_err() {
                break;
            }
        }
        Ok(Session {
            tx,
            inbound,
            heartbeat_interval: interval,
        })
    }

    fn capacity(&self) -> pb::Heartbeat {
        let api_budget = self.backend.api_budget().unwrap_or(0);
        let pools = self
            .config
            .pools
            .iter()
            .map(|(name, max)| match self.warm.get(name) {
                Some(pool) => {
                    let load = pool.load();
                    pb::PoolCapacity {
                        pool: name.clone(),
                        total: load.total(),
                        busy: load.busy,
                        idle: load.idle,
                        queued: load.queued,
                        max: *max,
                        api_budget,
                        starting: load.starting,
                    }
                }
                None => {
                    let busy = self
                        .runs
                        .values()
                        .filter(|r| !r.revoked && &r.assignment.pool == name)
                        .count() as u32;
                    pb::PoolCapacity {
                        pool: name.clone(),
                        total: *max,
                        busy,
                        idle: max.saturating_sub(busy),
                        queued: 0,
                        max: *max,
                        api_budget,
                        starting: 0,
                    }
                }
            })
            .collect();
        pb::Heartbeat { pools }
    }

    /// Takes a job's assignment out of its warm pool's queue if it is still waiting there
    /// under `fence`.
    fn unqueue(&mut self, job: JobId, fence: Fence) -> bool {
        let Some(run) = self.runs.get(&job).filter(|r| r.assignment.fence == fence) else {
            return false;
        };
        let pool = run.assignment.pool.clone();
        self.warm
            .get_mut(&pool)
            .and_then(|p| p.dequeue(job, fence))
            .is_some()
    }

    /// Starts assignments on the warm runners the pool gave them.
    async fn start_on(
        &mut self,
        pool: &str,
        mut start: Vec<(RunnerId, Assignment)>,
        session: Option<&Session>,
    ) {
        while !start.is_empty() {
            let mut died = false;
            for (runner, a) in std::mem::take(&mut start) {
                let (job, fence) = (a.job, a.fence);
                tracing::info!(cell = %self.config.cell, job = %job, runner = %runner, pool, "Starting on a warm runner.");
                let started = match self.backend.warm() {
                    Some(w) => w.start_on(pool, runner, a.clone(), self.sink.clone()).await,
                    None => Err(RunnerError::Internal("no warm runners".into())),
                };
                match started {
                    Ok(()) => {}
                    Err(RunnerError::Unavailable(why)) if self.warm.contains_key(pool) => {
                        // The runner died before its job came (a warm pod evicted): the job
                        // waits for the next one, which the policy makes if need be.
                        tracing::warn!(job = %job, runner = %runner, why = %why, "A warm runner was gone when its job came; the job waits for another.");
                        self.stats.runners_lost.fetch_add(1, Ordering::Relaxed);
                        if let Some(p) = self.warm.get_mut(pool) {
                            p.runner_died_with(runner, a);
                        }
                        died = true;
                    }
                    Err(e) => {
                        tracing::warn!(job = %job, runner = %runner, error = %e, "The warm runner refused the attempt.");
                        let crash = Outcome::Failed(FailureClass::Infra {
                            reason: InfraReason::RunnerCrash,
                        });
                        self.finish(job, fence, crash, now_ms(), session).await;
                    }
                }
            }
            if died && let Some(p) = self.warm.get_mut(pool) {
                start = p.dispatch();
            }
        }
    }

    /// Keeps what the time-of-day floors learnt (see [`AgentConfig::history_file`]).
    fn save_histories(&self) {
        if let Some(file) = &self.config.history_file
            && let Err(e) = save_histories(file, &self.warm)
        {
            tracing::warn!(file = %file.display(), error = %e, "Cannot save what the time-of-day floors learnt.");
        }
    }

    /// Sizes every warm pool again and finishes pending retirements.
    async fn autoscale(&mut self, session: Option<&Session>) {
        let pools: Vec<String> = self.warm.keys().cloned().collect();
        for pool in pools {
            self.scale(&pool, session).await;
        }
    }

    /// Stops counting warm runners the backend says died while idle.
    fn absorb_lost(&mut self) {
        let lost = self
            .backend
            .warm()
            .map(|w| w.take_lost())
            .unwrap_or_default();
        for (name, runner) in lost {
            let Some(pool) = self.warm.get_mut(&name) else {
                continue;
            };
            // A runner with a job is its attempt's business (the attempt reports how it
            // ended, and the runner goes with it).
            if matches!(
                pool.runners.state(runner),
                Some(RunnerState::Idle | RunnerState::Fenced | RunnerState::Starting)
            ) {
                pool.runners.lost(runner);
                self.stats.runners_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cell = %self.config.cell, pool = %name, runner = %runner, "An idle warm runner died; it is replaced as the pool needs.");
            }
        }
    }

    /// Sizes one warm pool: starts runners, fences surplus idle ones and retires the fenced
    /// (phase two: the backend checks each is still idle before deleting it).
    async fn scale(&mut self, name: &str, session: Option<&Session>) {
        self.absorb_lost();
        let Some(pool) = self.warm.get_mut(name) else {
            return;
        };
        let work = pool.decide(now_ms());
        let fenced = pool.fenced();
        for runner in work.prepare {
            self.stats.runners_prepared.fetch_add(1, Ordering::Relaxed);
            let backend = self.backend.clone();
            let pool = name.to_owned();
            self.prepares.spawn(async move {
                let prepare = async {
                    match backend.warm() {
                        Some(w) => w.prepare(&pool, runner).await,
                        None => Err(RunnerError::Unavailable("no warm runners".into())),
                    }
                };
                // A panic must not lose which runner it was: it would count as starting
                // for ever.
                let result = std::panic::AssertUnwindSafe(prepare)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| Err(RunnerError::Internal("preparing panicked".into())));
                (pool, runner, result)
            });
        }
        self.start_on(name, work.start, session).await;
        for runner in fenced {
            let checked = match self.backend.warm() {
                Some(w) => w.retire(name, runner).await,
                None => return,
            };
            let Some(pool) = self.warm.get_mut(name) else {
                return;
            };
            match checked {
                Ok(busy_with) => match pool.runners.retire(runner, busy_with) {
                    Retire::Deleted => {
                        self.stats.runners_retired.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(cell = %self.config.cell, pool = name, runner = %runner, "Retired an idle runner.");
                    }
                    Retire::KeptBusy(job) => {
                        self.stats.runners_kept.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(cell = %self.config.cell, pool = name, runner = %runner, job = %job, "A fenced runner was found running a job; kept.");
                        // Released when that attempt ends; an attempt the agent does not
                        // know is the reaper's to kill, and its runner is not counted.
                        match self.runs.get(&job).map(|r| r.assignment.fence) {
                            Some(fence) => pool.kept(runner, job, fence),
                            None => {
                                pool.runners.lost(runner);
                            }
                        }
                    }
                    Retire::NotFenced => {}
                },
                Err(e) => {
                    tracing::warn!(pool = name, runner = %runner, error = %e, "Retiring a runner failed; will try again.");
                }
            }
        }
    }

    /// A warm runner finished preparing (or failed to).
    async fn prepared(
        &mut self,
        name: &str,
        runner: RunnerId,
        result: Result<(), RunnerError>,
        session: Option<&Session>,
    ) {
        let Some(pool) = self.warm.get_mut(name) else {
            return;
        };
        match result {
            Ok(()) => {
                pool.prepared(runner);
                let start = pool.dispatch();
                self.start_on(name, start, session).await;
            }
            Err(e) => {
                tracing::warn!(cell = %self.config.cell, pool = name, runner = %runner, error = %e, "Preparing a warm runner failed.");
                let stranded = pool.prepare_failed(runner, now_ms());
                // Jobs no runner is coming for go back to the federator, to be placed again
                // (on another cell where possible) rather than wait here.
                let crash = Outcome::Failed(FailureClass::Infra {
                    reason: InfraReason::RunnerCrash,
                });
                for a in stranded {
                    self.finish(a.job, a.fence, crash, now_ms(), session).await;
                }
            }
        }
    }

    /// Handles one federator message; false ends the session.
    async fn on_message(&mut self, m: pb::FederatorMessage, session: Option<&Session>) -> bool {
        match m.msg {
            Some(In::Assign(a)) => {
                let delivered = now_ms();
                match assign_from_pb(a) {
                    Ok(a) => self.assign(a, delivered, session).await,
                    Err(e) => tracing::warn!(error = %e, "Ignoring a malformed assignment."),
                }
            }
            Some(In::Cancel(c)) => {
                let (job, fence) = (JobId(c.job), Fence(c.fence));
                tracing::info!(job = %job, fence = %fence, "Cancelling.");
                if self.unqueue(job, fence) {
                    let outcome = Outcome::Failed(FailureClass::Cancelled);
                    self.finish(job, fence, outcome, now_ms(), session).await;
                    return true;
                }
                if let Err(e) = self.backend.cancel(job, fence).await {
                    tracing::warn!(job = %job, error = %e, "Cancelling failed.");
                }
            }
            Some(In::Revoke(r)) => {
                self.stats
                    .revocations
                    .fetch_add(r.jobs.len() as u64, Ordering::Relaxed);
                for (job, fence) in from_job_refs(&r.jobs) {
                    self.revoke(job, fence).await;
                }
            }
            Some(In::Ack(a)) => {
                if a.rejected == "stale fence" {
                    self.stats.stale_reports.fetch_add(1, Ordering::Relaxed);
                } else if !a.rejected.is_empty() {
                    tracing::debug!(job = a.job, reason = %a.rejected, "Report refused.");
                }
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
                if a.state != pb::JobState::Running as i32 {
                    self.backend.reported(JobId(a.job), Fence(a.fence));
                }
                if let Some(i) = self
                    .outbox
                    .iter()
                    .position(|u| u.job == a.job && u.fence == a.fence && u.state == a.state)
                {
                    self.outbox.remove(i);
                }
            }
            Some(In::NotLeader(n)) => {
                self.hint = (!n.leader.is_empty()).then_some(n.leader);
                return false;
            }
            Some(In::Welcome(_)) | None => {}
        }
        true
    }

    async fn assign(&mut self, mut a: Assignment, delivered_at_ms: u64, session: Option<&Session>) {
        let (job, fence) = (a.job, a.fence);
        if let Some(floor) = self.config.pool_resources.get(&a.pool) {
            // The pool's runner size: a job asking for less gets a whole runner.
            a.resources = a.resources.max(floor);
        }
        if self.done.contains(&(job, fence)) {
            return; // Already ran here; its report is in the outbox or acknowledged.
        }
        if let Some(existing) = self.runs.get(&job) {
            if existing.assignment.fence >= fence {
                return; // Sent again after a reconnect: already running.
            }
            // An older attempt of the same job is stale now.
            let old = existing.assignment.fence;
            self.revoke(job, old).await;
        }
        self.stats.assignments.fetch_add(1, Ordering::Relaxed);
        tracing::info!(cell = %self.config.cell, job = %job, fence = %fence, attempt = %a.attempt, name = %a.name, "Assigned.");
        let log = self.open_log(&a);
        self.runs.insert(
            job,
            Run {
                masker: a.masker(),
                assignment: a.clone(),
                delivered_at_ms,
                started_at_ms: None,
                revoked: false,
                log,
            },
        );
        let fits = self.backend.warm().is_some_and(|w| w.fits(&a.pool, &a));
        if let Some(pool) = self.warm.get_mut(&a.pool)
            && fits
        {
            // A warm pool: the job takes the next idle runner, now or once one is ready.
            let name = a.pool.clone();
            pool.enqueue(a);
            let start = pool.dispatch();
            self.start_on(&name, start, session).await;
            self.scale(&name, session).await;
            return;
        }
        if self.warm.contains_key(&a.pool) {
            // Another image, or more than the pool's runners have: a runner of its own.
            self.stats.cold_starts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(cell = %self.config.cell, job = %job, pool = %a.pool, image = %a.image, "The job does not fit the pool's warm runners; starting it on a runner of its own.");
        }
        if let Err(e) = self.backend.start(a, self.sink.clone()).await {
            tracing::warn!(job = %job, error = %e, "The runner backend refused the attempt.");
            self.finish(
                job,
                fence,
                Outcome::Failed(FailureClass::Infra {
                    reason: InfraReason::RunnerCrash,
                }),
                now_ms(),
                session,
            )
            .await;
        }
    }

    /// Remembers that the attempt of `job` under `fence` is over here, so a late re-send of
    /// its assignment is not run again.
    fn remember_done(&mut self, job: JobId, fence: Fence) {
        if self.done.insert((job, fence)) {
            self.done_order.push_back((job, fence));
            if self.done_order.len() > DONE_MEMORY
                && let Some(old) = self.done_order.pop_front()
            {
                self.done.remove(&old);
            }
        }
    }

    async fn revoke(&mut self, job: JobId, fence: Fence) {
        self.outbox
            .retain(|u| !(u.job == job.0 && u.fence == fence.0));
        let Some(run) = self
            .runs
            .get_mut(&job)
            .filter(|r| r.assignment.fence == fence)
        else {
            return;
        };
        tracing::warn!(cell = %self.config.cell, job = %job, fence = %fence, "Revoked: the job is no longer this cell's; killing its runner.");
        run.revoked = true;
        run.log = None;
        self.stats.revoked.fetch_add(1, Ordering::Relaxed);
        if self.unqueue(job, fence) {
            // It never reached a runner: nothing to kill, and nothing to report.
            self.runs.remove(&job);
            self.remember_done(job, fence);
            return;
        }
        if let Err(e) = self.backend.cancel(job, fence).await {
            tracing::warn!(job = %job, error = %e, "Killing a revoked runner failed; the reaper will retry.");
        }
    }

    /// Takes over what a previous run of the agent left running (kubernetes pods), so the
    /// first `Hello` names those attempts and the federator keeps them here instead of
    /// failing them as crashed.
    async fn recover(&mut self, stop: &mut watch::Receiver<bool>) {
        // Until it succeeds: saying hello without the runners that are still going would
        // have the federator run their jobs a second time elsewhere.
        let mut wait = Duration::from_millis(500);
        let recovered = loop {
            let r = tokio::select! {
                _ = stopped(stop) => return,
                r = self.backend.recover(self.sink.clone()) => r,
            };
            match r {
                Ok(assignments) => break assignments,
                Err(e) => {
                    tracing::error!(cell = %self.config.cell, error = %e, retry_in = ?wait, "Cannot take over the runners a previous agent left; the agent connects once it can.");
                    tokio::select! {
                        _ = stopped(stop) => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        };
        for a in recovered {
            tracing::info!(cell = %self.config.cell, job = %a.job, fence = %a.fence, "Resuming an attempt a previous agent started.");
            let log = self.open_log(&a);
            self.runs.insert(
                a.job,
                Run {
                    masker: a.masker(),
                    assignment: a,
                    delivered_at_ms: now_ms(),
                    started_at_ms: None,
                    revoked: false,
                    log,
                },
            );
        }
    }

    fn open_log(&self, a: &Assignment) -> Option<std::fs::File> {
        let path = self
            .config
            .logs_dir
            .join(flotilla_core::runner::log_file_name(a.job));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        match file {
            Ok(mut f) => {
                let _ = writeln!(
                    f,
                    "=== {} · attempt {} · cell {} · fence {} ===",
                    a.name, a.attempt, self.config.cell, a.fence
                );
                Some(f)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot open the job's log file.");
                None
            }
        }
    }

    async fn on_runner_event(
        &mut self,
        job: JobId,
        fence: Fence,
        event: RunnerEvent,
        session: Option<&Session>,
    ) {
        match event {
            RunnerEvent::Started { at_ms } => {
                let Some(run) = self
                    .runs
                    .get_mut(&job)
                    .filter(|r| r.assignment.fence == fence && !r.revoked)
                else {
                    return;
                };
                run.started_at_ms = Some(at_ms);
                let report = JobReport {
                    job,
                    attempt: run.assignment.attempt,
                    fence,
                    state: ReportState::Running,
                    delivered_at_ms: Some(run.delivered_at_ms),
                    started_at_ms: Some(at_ms),
                    finished_at_ms: None,
                };
                self.report(report, session).await;
            }
            RunnerEvent::Line {
                stream,
                text,
                at_ms,
                ..
            } => {
                // One file per job, every attempt in turn; stdout, stderr and the runner's
                // own lines interleaved as they were read (the log store keeps the stream).
                let _ = stream;
                if let Some(run) = self
                    .runs
                    .get_mut(&job)
                    .filter(|r| r.assignment.fence == fence)
                    && let Some(f) = run.log.as_mut()
                {
                    let text = if run.masker.is_empty() {
                        text
                    } else {
                        String::from_utf8_lossy(&run.masker.mask(text.as_bytes())).into_owned()
                    };
                    let _ = writeln!(f, "{} {text}", clock_of_day(at_ms));
                }
            }
            RunnerEvent::Finished { outcome, at_ms } => {
                self.finish(job, fence, outcome, at_ms, session).await;
            }
        }
    }

    async fn finish(
        &mut self,
        job: JobId,
        fence: Fence,
        outcome: Outcome,
        at_ms: u64,
        session: Option<&Session>,
    ) {
        // Whatever attempt this was (even one a newer fence replaced), its one-shot warm
        // runner is gone.
        for pool in self.warm.values_mut() {
            if pool.job_ended(job, fence).is_some() {
                break;
            }
        }
        if self.runs.get(&job).map(|r| r.assignment.fence) != Some(fence) {
            return;
        }
        let run = self.runs.remove(&job).expect("checked");
        self.remember_done(job, fence);
        if run.revoked {
            return;
        }
        if let Some(mut f) = run.log {
            let _ = writeln!(f, "{} ==> {}", clock_of_day(at_ms), describe(outcome));
        }
        let report = JobReport {
            job,
            attempt: run.assignment.attempt,
            fence,
            state: ReportState::Finished(outcome),
            delivered_at_ms: Some(run.delivered_at_ms),
            started_at_ms: run.started_at_ms,
            finished_at_ms: Some(at_ms),
        };
        tracing::info!(cell = %self.config.cell, job = %job, fence = %fence, outcome = %describe(outcome), "Attempt finished.");
        self.report(report, session).await;
    }

    async fn report(&mut self, report: JobReport, session: Option<&Session>) {
        let update = report_to_pb(&report);
        self.outbox.push_back(update.clone());
        if let Some(s) = session {
            // A failed send means the session is gone; the outbox is sent again on reconnect.
            let _ = s.tx.send(out(Out::JobUpdate(update))).await;
        }
    }

    /// Kills runners that must not run: unknown to the agent, revoked, or far past their
    /// timeout.
    async fn reap(&mut self) {
        let runners: Vec<RunnerInfo> = match self.backend.list().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "The reaper cannot list runners.");
                return;
            }
        };
        let now = now_ms();
        for r in runners {
            let why = match self.runs.get(&r.job) {
                None => Some("unknown to the agent"),
                Some(run) if run.assignment.fence != r.fence => Some("stale fence"),
                Some(run) if run.revoked => Some("revoked"),
                Some(_) => r
                    .started_at_ms
                    .filter(|s| now > s + r.timeout_secs * 1000 + REAP_SLACK_MS)
                    .map(|_| "past its timeout"),
            };
            if let Some(why) = why {
                tracing::warn!(job = %r.job, fence = %r.fence, why, "Reaping a runner.");
                self.stats.reaped.fetch_add(1, Ordering::Relaxed);
                let _ = self.backend.cancel(r.job, r.fence).await;
            }
        }
    }
}

/// Resolves once the agent is told to stop (the watch guard is not held across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn next_message(
    session: &mut Option<Session>,
) -> Result<Option<pb::FederatorMessage>, tonic::Status> {
    match session {
        Some(s) => s.inbound.message().await,
        None => std::future::pending().await,
    }
}

async fn heartbeat_tick(heartbeat: &mut Option<tokio::time::Interval>) {
    match heartbeat {
        Some(h) => {
            h.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn describe(outcome: Outcome) -> String {
    match outcome {
        Outcome::Succeeded => "succeeded".into(),
        Outcome::Failed(class) => format!("failed: {class}"),
    }
}

/// `HH:MM:SS.mmm` (UTC) of a wall-clock time, as log lines are stamped.
fn clock_of_day(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}
