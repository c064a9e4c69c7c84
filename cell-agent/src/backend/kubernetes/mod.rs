//! The `kubernetes` runner backend: one isolated pod per attempt (ARCHITECTURE §8).
//!
//! Layout:
//! - `config`: [`KubeConfig`], the `backend.kubernetes` section of the agent's config.
//! - `render`: the pod and spec Secret of an attempt (pure; `render-pod` prints it).
//! - `status`: a pod's status read as an observation and a failure class (pure).
//! - `client`: the throttled kube client and the pod-create meter behind `api_budget`.
//! - `attempt`: the task that drives one attempt: create (or adopt), watch, follow the log,
//!   cancel, report, reap.
//!
//! Warm pools ([`WarmRunners`]): a warm pod is made at its pool's size with the pool's image
//! before any job (`render::warm_pod`), and is ready once it runs and its standby answers.
//! Handing it a job records the job in the pod's Secret, labels the pod as the attempt's, and
//! sends the job to the standby over the pod network; from there its attempt is followed like
//! any other. A job with another image, or asking for more, starts cold ([`WarmRunners::fits`]).
//! The pools' pre-pull lists become one DaemonSet per cell (`render::prepull_daemonset`).
//!
//! One watcher (kube-runtime) follows every pod of the cell (by label) and hands each pod's
//! latest state to its attempt's task; nothing polls. Pod names derive from job, attempt and
//! fence, so a second create of the same attempt is a conflict, never a second pod. Pods
//! outlive the agent: shutting down leaves them running, and the next agent takes them over
//! in [`RunnerBackend::recover`] by their labels and spec Secrets.

mod attempt;
pub mod client;
pub mod config;
pub mod render;
mod standby_client;
pub mod status;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::collections::BTreeMap;

use flotilla_core::autoscale::RunnerId;
use flotilla_core::ids::CellId;
use flotilla_core::runner::{
    Assignment, BoxFuture, RunnerBackend, RunnerError, RunnerEvents, RunnerInfo, WarmRunners,
};
use flotilla_core::{Fence, JobId};
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use client::{CreateMeter, ThrottleLayer};
pub use config::{KubeConfig, KubeConfigError, PoolPods, WarmPods};

use attempt::Mode;

/// Longest a finished pod is kept waiting for the acknowledgement of its report.
const HOLD_FINISHED: Duration = Duration::from_secs(600);

/// How long `start` and `recover` wait for the watcher's first complete list of pods
/// before refusing (the API server is unreachable).
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Runs attempts as pods. Cheap to clone: clones share the same attempts.
#[derive(Clone)]
pub struct KubeBackend {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: KubeConfig,
    cell: CellId,
    /// The pools with settings: warm pods' image and size, images to pre-pull.
    pools: BTreeMap<String, PoolPods>,
    /// A random tag in this agent's warm pod names.
    instance: String,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    daemonsets: Api<DaemonSet>,
    meter: CreateMeter,
    state: Mutex<State>,
    /// True once the watcher has listed the cell's pods at least once.
    ready: watch::Receiver<bool>,
    /// Set at shutdown: every task stops without touching pods.
    stop: watch::Sender<bool>,
    /// Pods to delete (finished, orphaned), for the reaper task.
    reap: mpsc::UnboundedSender<String>,
    /// The watcher and reaper tasks, joined at shutdown.
    background: Mutex<Vec<JoinHandle<()>>>,
}

/// What an attempt task knows of its pod.
#[derive(Debug, Clone)]
enum PodView {
    /// Not seen yet (just created, or the watcher has not caught up).
    Unseen,
    /// Its latest state.
    Present(Box<Pod>),
    /// Deleted: `certain` when the watch said so, not when a relist merely missed it
    /// (a pod created after the list was taken is missing from it too).
    Gone {
        /// Whether the pod is known to have existed and been deleted.
        certain: bool,
    },
}

#[derive(Default)]
struct State {
    closed: bool,
    /// `recover` ran: a pod nobody tracks from now on is an orphan.
    recovered: bool,
    attempts: HashMap<JobId, Tracked>,
    /// Attempts superseded by a newer fence of their job, by pod name, until their pods
    /// are gone and they have reported.
    retiring: HashMap<String, Tracked>,
    /// The watcher's view of the cell's pods, by name.
    pods: HashMap<String, Pod>,
    /// Finished attempts whose pods are kept until the federator acknowledges their final
    /// report (a restarted agent takes such a pod over and reports it again), with when
    /// they finished.
    awaiting: HashMap<(JobId, Fence), (String, Instant)>,
    /// Spec Secrets created without an owner reference, deleted with their pods.
    ownerless_secrets: std::collections::HashSet<String>,
    /// Pods being reaped, whose later updates are expected and ignored.
    reaping: std::collections::HashSet<String>,
    /// Warm pods without a job yet (being made, or ready), by pod name.
    warm: HashMap<String, WarmPod>,
    /// Warm runners handed a job, and the attempt.
    taken: HashMap<(String, RunnerId), (JobId, Fence)>,
    /// Prepared warm runners that died before taking a job, not yet told to the agent.
    lost: Vec<(String, RunnerId)>,
    tasks: Vec<JoinHandle<()>>,
}

/// A warm pod waiting for its job.
struct WarmPod {
    pool: String,
    runner: RunnerId,
    token: String,
    view: watch::Sender<PodView>,
    /// Prepared: from now on its death is reported through [`WarmRunners::take_lost`]
    /// (before, `prepare` reports it).
    ready: bool,
}

struct Tracked {
    info: RunnerInfo,
    pod_name: String,
    view: watch::Sender<PodView>,
    cancel: watch::Sender<bool>,
}

impl KubeBackend {
    /// Starts the backend on `client` (see [`client::connect`]) for `cell`: validates the
    /// configuration, starts watching the cell's pods, and warns loudly when pods will run
    /// without a sandboxing runtime class. Must be called inside a tokio runtime.
    pub fn new(client: kube::Client, cfg: KubeConfig, cell: CellId) -> Result<Self, RunnerError> {
        Self::start(client, cfg, cell, None)
    }

    /// [`KubeBackend::new`] for an agent with pools: warm pools get warm pods, and the pools'
    /// pre-pull lists are kept in the cell's pre-pull DaemonSet (applied now, and deleted
    /// when no pool has one).
    pub fn with_pools(
        client: kube::Client,
        cfg: KubeConfig,
        cell: CellId,
        pools: BTreeMap<String, PoolPods>,
    ) -> Result<Self, RunnerError> {
        Self::start(client, cfg, cell, Some(pools))
    }

    fn start(
        client: kube::Client,
        cfg: KubeConfig,
        cell: CellId,
        pools: Option<BTreeMap<String, PoolPods>>,
    ) -> Result<Self, RunnerError> {
        cfg.validate().map_err(|e| {
            RunnerError::Internal(format!("invalid kubernetes backend config: {e}"))
        })?;
        if cfg.runtime_class.is_none() {
            tracing::warn!(
                "backend.kubernetes.runtime_class is null: runner pods share the node's kernel \
                 with no gVisor boundary. Jobs run arbitrary code from pushes; only do this on \
                 nodes dedicated to trusted builds."
            );
        }
        let pods = Api::namespaced(client.clone(), &cfg.namespace);
        let secrets = Api::namespaced(client.clone(), &cfg.namespace);
        let daemonsets = Api::namespaced(client, &cfg.namespace);
        let mut tag = [0u8; 4];
        getrandom::fill(&mut tag)
            .map_err(|e| RunnerError::Internal(format!("no randomness for warm pod names: {e}")))?;
        let (ready_tx, ready) = watch::channel(false);
        let (stop, _) = watch::channel(false);
        let (reap, reap_rx) = mpsc::unbounded_channel();
        let reconcile_prepull = pools.is_some();
        let inner = Arc::new(Inner {
            cfg,
            cell,
            pools: pools.unwrap_or_default(),
            instance: hex(&tag),
            pods,
            secrets,
            daemonsets,
            meter: CreateMeter::new(Duration::from_secs(10)),
            state: Mutex::default(),
            ready,
            stop,
            reap,
            background: Mutex::default(),
        });
        let watcher = tokio::spawn(watch_pods(inner.clone(), ready_tx));
        let reaper = tokio::spawn(reap_pods(inner.clone(), reap_rx));
        inner.background().extend([watcher, reaper]);
        if reconcile_prepull {
            let prepull = tokio::spawn(keep_prepull(inner.clone()));
            inner.background().push(prepull);
        }
        tracing::info!(
            cell = %inner.cell,
            namespace = %inner.cfg.namespace,
            runtime_class = inner.cfg.runtime_class.as_deref().unwrap_or("(none)"),
            "Kubernetes runner backend ready."
        );
        Ok(Self { inner })
    }

    /// The configuration in use.
    pub fn config(&self) -> &KubeConfig {
        &self.inner.cfg
    }
}

impl fmt::Debug for KubeBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeBackend")
            .field("cell", &self.inner.cell)
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every change to the state is a single map operation, so it stays consistent
        // across a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn background(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.background.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn wait_ready(&self) -> Result<(), RunnerError> {
        let mut ready = self.ready.clone();
        match tokio::time::timeout(READY_WITHIN, ready.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(unavailable()),
            Err(_) => Err(RunnerError::Unavailable(format!(
                "cannot list the cell's pods in namespace {} (is the API server reachable and \
                 the agent's Role in place?)",
                self.cfg.namespace
            ))),
        }
    }

    /// Called by an attempt's task when its first step started.
    fn mark_started(&self, job: &JobId, fence: Fence, at_ms: u64) {
        if let Some(t) = self.state().attempts.get_mut(job)
            && t.info.fence == fence
        {
            t.info.started_at_ms = Some(at_ms);
        }
    }

    /// Called by an attempt's task just before it reports `Finished`.
    fn forget(&self, job: &JobId, fence: Fence) {
        let mut state = self.state();
        if state
            .attempts
            .get(job)
            .is_some_and(|t| t.info.fence == fence)
        {
            state.attempts.remove(job);
        }
        state
            .retiring
            .retain(|_, t| !(t.info.job == *job && t.info.fence == fence));
        state.taken.retain(|_, taken| *taken != (*job, fence));
    }

    /// Every attempt whose task wants updates of pod `name`.
    fn watching<'s>(state: &'s State, name: &'s str) -> impl Iterator<Item = &'s Tracked> {
        state
            .attempts
            .values()
            .filter(move |t| t.pod_name == name)
            .chain(state.retiring.get(name))
    }

    /// Keeps a finished attempt's pod until its report is acknowledged.
    fn hold(&self, job: JobId, fence: Fence, name: String) {
        self.state()
            .awaiting
            .insert((job, fence), (name, Instant::now()));
    }

    /// Deletes a pod in the background (its Secret goes with it).
    fn reap(&self, name: String) {
        self.state().reaping.insert(name.clone());
        let _ = self.reap.send(name);
    }

    fn view_of(&self, state: &State, name: &str) -> PodView {
        state
            .pods
            .get(name)
            .map_or(PodView::Unseen, |p| PodView::Present(Box::new(p.clone())))
    }

    /// Registers an attempt and spawns its task. The caller holds the state lock.
    fn track(
        self: &Arc<Self>,
        state: &mut State,
        name: String,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
        mode: Mode,
    ) {
        let warm = !matches!(mode, Mode::Create | Mode::Adopt { token: None });
        let (view, view_rx) = watch::channel(self.view_of(state, &name));
        let (cancel, cancel_rx) = watch::channel(false);
        let accepted_at_ms = attempt::now_ms();
        let info = RunnerInfo {
            job: assignment.job,
            fence: assignment.fence,
            accepted_at_ms,
            started_at_ms: None,
            timeout_secs: assignment.timeout_secs,
        };
        state.attempts.insert(
            assignment.job,
            Tracked {
                info,
                pod_name: name.clone(),
                view,
                cancel,
            },
        );
        state.tasks.retain(|t| !t.is_finished());
        let task = attempt::Task {
            inner: self.clone(),
            name,
            warm,
            assignment,
            events,
            view: view_rx,
            cancel: cancel_rx,
            stop: self.stop.subscribe(),
            accepted_at_ms,
        };
        state.tasks.push(tokio::spawn(task.run(mode)));
    }

    /// The watcher saw `pod` (added or changed).
    fn pod_seen(&self, pod: Pod) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        let mut state = self.state();
        let tracked = Self::watching(&state, &name).next();
        if let Some(w) = state.warm.get(&name) {
            let failed = w.ready
                && matches!(
                    status::observe_warm(&pod),
                    status::WarmObservation::Failed(_)
                );
            w.view.send_replace(PodView::Present(Box::new(pod.clone())));
            state.pods.insert(name.clone(), pod);
            if failed {
                self.lose_warm(&mut state, &name);
            }
            return;
        }
        match tracked {
            Some(t) => {
                t.view.send_replace(PodView::Present(Box::new(pod.clone())));
            }
            None if state.recovered
                && !state.closed
                && !state.reaping.contains(&name)
                && !state.awaiting.values().any(|(n, _)| *n == name) =>
            {
                tracing::warn!(pod = %name, "Deleting a runner pod no attempt of this agent owns.");
                state.reaping.insert(name.clone());
                let _ = self.reap.send(name.clone());
            }
            None => {}
        }
        state.pods.insert(name, pod);
    }

    /// The watcher saw `name` deleted.
    fn pod_gone(&self, name: &str) {
        let mut state = self.state();
        state.pods.remove(name);
        state.reaping.remove(name);
        for t in Self::watching(&state, name) {
            t.view.send_replace(PodView::Gone { certain: true });
        }
        if let Some(w) = state.warm.get(name) {
            w.view.send_replace(PodView::Gone { certain: true });
            if w.ready {
                self.lose_warm(&mut state, name);
            }
        }
    }

    /// A prepared warm pod died before its job: forgotten, deleted (if anything is left of
    /// it), and noted for the agent.
    fn lose_warm(&self, state: &mut State, name: &str) {
        if let Some(w) = state.warm.remove(name) {
            tracing::warn!(pod = %name, pool = %w.pool, runner = %w.runner, "An idle warm pod died.");
            state.lost.push((w.pool, w.runner));
            if state.pods.contains_key(name) {
                state.reaping.insert(name.to_owned());
                let _ = self.reap.send(name.to_owned());
            }
        }
    }

    /// The watcher (re)listed every pod: replace the view wholesale. A tracked pod missing
    /// from the list was deleted while the watch was down.
    fn pods_listed(&self, pods: HashMap<String, Pod>) {
        let mut state = self.state();
        for t in state.attempts.values().chain(state.retiring.values()) {
            let view = match pods.get(&t.pod_name) {
                Some(p) => PodView::Present(Box::new(p.clone())),
                None => PodView::Gone { certain: false },
            };
            t.view.send_replace(view);
        }
        let mut gone = Vec::new();
        for (name, w) in &state.warm {
            let view = match pods.get(name) {
                Some(p) => PodView::Present(Box::new(p.clone())),
                None => {
                    if w.ready {
                        gone.push(name.clone());
                    }
                    PodView::Gone { certain: false }
                }
            };
            w.view.send_replace(view);
        }
        for name in gone {
            self.lose_warm(&mut state, &name);
        }
        state.reaping.retain(|name| pods.contains_key(name));
        if state.recovered && !state.closed {
            // A relist is also the reaper's second chance: a pod whose delete failed, or
            // that appeared while the watch was down, and that no attempt owns.
            let owned: std::collections::HashSet<String> = state
                .attempts
                .values()
                .chain(state.retiring.values())
                .map(|t| t.pod_name.clone())
                .chain(state.awaiting.values().map(|(n, _)| n.clone()))
                .chain(state.warm.keys().cloned())
                .collect();
            let orphans: Vec<String> = pods
                .keys()
                .filter(|name| !owned.contains(*name) && !state.reaping.contains(*name))
                .cloned()
                .collect();
            for name in orphans {
                tracing::warn!(pod = %name, "Deleting a runner pod no attempt of this agent owns.");
                state.reaping.insert(name.clone());
                let _ = self.reap.send(name);
            }
        }
        state.pods = pods;
    }
}

/// Follows every pod of the cell and hands each change to its attempt.
async fn watch_pods(inner: Arc<Inner>, ready: watch::Sender<bool>) {
    let config = watcher::Config::default().labels(&render::cell_selector(&inner.cell));
    let stream = watcher(inner.pods.clone(), config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut stop = inner.stop.subscribe();
    let mut listing: Option<HashMap<String, Pod>> = None;
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            event = stream.next() => event,
        };
        match event {
            None => break,
            Some(Ok(watcher::Event::Init)) => listing = Some(HashMap::new()),
            Some(Ok(watcher::Event::InitApply(pod))) => {
                if let (Some(list), Some(name)) = (&mut listing, pod.metadata.name.clone()) {
                    list.insert(name, pod);
                }
            }
            Some(Ok(watcher::Event::InitDone)) => {
                inner.pods_listed(listing.take().unwrap_or_default());
                ready.send_replace(true);
            }
            Some(Ok(watcher::Event::Apply(pod))) => inner.pod_seen(pod),
            Some(Ok(watcher::Event::Delete(pod))) => {
                if let Some(name) = &pod.metadata.name {
                    inner.pod_gone(name);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Watching the cell's runner pods failed; retrying.");
            }
        }
    }
}

/// Deletes finished and orphaned pods, one at a time, with no grace period; retries failed
/// deletes with back-off; lets go of finished pods whose report was never acknowledged
/// after [`HOLD_FINISHED`].
async fn reap_pods(inner: Arc<Inner>, mut names: mpsc::UnboundedReceiver<String>) {
    let mut stop = inner.stop.subscribe();
    let mut retry: std::collections::VecDeque<(Instant, String, u32)> = Default::default();
    let mut sweep = tokio::time::interval(Duration::from_secs(30));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = || Instant::now() + Duration::from_secs(3600);
    loop {
        let next_retry = retry.front().map(|(at, _, _)| *at);
        let (name, attempt) = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            name = names.recv() => match name {
                Some(name) => (name, 0),
                None => break,
            },
            () = tokio::time::sleep_until(next_retry.unwrap_or_else(far)), if next_retry.is_some() => {
                let (_, name, attempt) = retry.pop_front().expect("a retry is due");
                (name, attempt)
            }
            _ = sweep.tick() => {
                let expired: Vec<String> = {
                    let mut state = inner.state();
                    let old: Vec<(JobId, Fence)> = state
                        .awaiting
                        .iter()
                        .filter(|(_, (_, at))| at.elapsed() > HOLD_FINISHED)
                        .map(|(k, _)| *k)
                        .collect();
                    old.iter()
                        .filter_map(|k| state.awaiting.remove(k))
                        .map(|(name, _)| name)
                        .collect()
                };
                for name in expired {
                    tracing::warn!(pod = %name, "No acknowledgement of the attempt's report came; deleting its pod anyway.");
                    inner.reap(name);
                }
                continue;
            }
        };
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        match inner.pods.delete(&name, &params).await {
            Ok(_) => tracing::debug!(pod = %name, "Reaped a runner pod."),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                let wait = Duration::from_millis(500 << attempt.min(6));
                tracing::warn!(pod = %name, error = %e, retry_in = ?wait, "Could not delete a runner pod.");
                retry.push_back((Instant::now() + wait, name, attempt + 1));
                retry.make_contiguous().sort_by_key(|(at, _, _)| *at);
                continue;
            }
        }
        let ownerless = inner.state().ownerless_secrets.remove(&name);
        if ownerless {
            // Created without an owner (the pod's uid was unknown): not garbage-collected.
            match inner.secrets.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "Could not delete a job spec Secret without an owner.");
                }
            }
        }
    }
}

fn unavailable() -> RunnerError {
    RunnerError::Unavailable("the kubernetes runner backend is shutting down".to_owned())
}

impl RunnerBackend for KubeBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn start(
        &self,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async move {
            self.inner.wait_ready().await?;
            let job = assignment.job;
            let fence = assignment.fence;
            let mut state = self.inner.state();
            if state.closed {
                return Err(unavailable());
            }
            supersede(&mut state, job, fence)?;
            let name = render::pod_name(&assignment);
            self.inner
                .track(&mut state, name, assignment, events, Mode::Create);
            tracing::info!(job = %job, fence = %fence, "Attempt accepted.");
            Ok(())
        })
    }

    fn cancel(&self, job: JobId, fence: Fence) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async move {
            let held = {
                let mut state = self.inner.state();
                if let Some(t) = state.attempts.get(&job)
                    && t.info.fence == fence
                {
                    tracing::info!(job = %job, fence = %fence, "Cancelling attempt.");
                    t.cancel.send_replace(true);
                }
                state.awaiting.remove(&(job, fence))
            };
            if let Some((name, _)) = held {
                self.inner.reap(name); // Finished already; its pod is not needed any more.
            }
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, RunnerError>> {
        Box::pin(async move {
            let mut infos: Vec<RunnerInfo> = self
                .inner
                .state()
                .attempts
                .values()
                .map(|t| t.info.clone())
                .collect();
            infos.sort_by_key(|i| i.job);
            Ok(infos)
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (tasks, idle) = {
                let mut state = self.inner.state();
                state.closed = true;
                state.attempts.clear();
                state.retiring.clear();
                let idle: Vec<String> = state.warm.drain().map(|(name, _)| name).collect();
                (std::mem::take(&mut state.tasks), idle)
            };
            // Idle warm pods are no use to the next agent (it makes its own, and deletes
            // these if they are still there): they go now, in case no agent comes back.
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            };
            let deletes = idle
                .iter()
                .map(|name| self.inner.pods.delete(name, &params));
            let left = match tokio::time::timeout(
                Duration::from_secs(10),
                futures::future::join_all(deletes),
            )
            .await
            {
                Ok(results) => results.iter().filter(|r| r.is_err()).count(),
                Err(_) => idle.len(),
            };
            if left > 0 {
                tracing::warn!(
                    pods = left,
                    "Could not delete every idle warm pod at shutdown; the next agent will."
                );
            }
            self.inner.stop.send_replace(true);
            tracing::info!(
                attempts = tasks.len(),
                "Kubernetes runner backend shutting down; runner pods keep running for the next agent."
            );
            let background = std::mem::take(&mut *self.inner.background());
            for task in tasks.into_iter().chain(background) {
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "A kubernetes backend task failed.");
                }
            }
        })
    }

    fn recover(
        &self,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<Vec<Assignment>, RunnerError>> {
        Box::pin(async move {
            self.inner.wait_ready().await?;
            let candidates: Vec<String> = {
                let state = self.inner.state();
                let tracked: std::collections::HashSet<&str> = state
                    .attempts
                    .values()
                    .chain(state.retiring.values())
                    .map(|t| t.pod_name.as_str())
                    .collect();
                let mut names: Vec<String> = state
                    .pods
                    .keys()
                    .filter(|n| !tracked.contains(n.as_str()))
                    .cloned()
                    .collect();
                names.sort();
                names
            };
            let mut recovered = Vec::new();
            for name in candidates {
                match self.inner.adoptable(&name).await {
                    Ok((assignment, token)) => {
                        let mut state = self.inner.state();
                        if state.closed {
                            return Err(unavailable());
                        }
                        if state.attempts.contains_key(&assignment.job) {
                            continue;
                        }
                        tracing::info!(pod = %name, job = %assignment.job, fence = %assignment.fence, "Took over a runner pod left by the previous agent.");
                        self.inner.track(
                            &mut state,
                            name.clone(),
                            assignment.clone(),
                            events.clone(),
                            Mode::Adopt { token },
                        );
                        recovered.push(assignment);
                    }
                    Err(Unadoptable::Invalid(why)) => {
                        tracing::warn!(pod = %name, why = %why, "Deleting a runner pod that cannot be taken over.");
                        self.inner.reap(name);
                    }
                    Err(Unadoptable::Unreadable(why)) => {
                        // Not now, but maybe on the agent's next try: never delete a pod
                        // that may still be someone's running job because of a hiccup.
                        return Err(RunnerError::Unavailable(format!(
                            "cannot read runner pod {name}'s spec: {why}"
                        )));
                    }
                }
            }
            self.inner.state().recovered = true;
            Ok(recovered)
        })
    }

    fn reported(&self, job: JobId, fence: Fence) {
        let held = self.inner.state().awaiting.remove(&(job, fence));
        if let Some((name, _)) = held {
            self.inner.reap(name);
        }
    }

    fn api_budget(&self) -> Option<u32> {
        Some(self.inner.meter.remaining(self.inner.cfg.pod_create_budget))
    }

    fn warm(&self) -> Option<&dyn WarmRunners> {
        self.inner
            .pools
            .values()
            .any(|p| p.warm.is_some())
            .then_some(self as &dyn WarmRunners)
    }
}

/// Makes way for the attempt of `job` under `fence`: refused when this or a newer fence
/// runs already; an older attempt is stale, and its task deletes its pod and reports it
/// cancelled (the new attempt's pod has another name).
fn supersede(state: &mut State, job: JobId, fence: Fence) -> Result<(), RunnerError> {
    if let Some(t) = state.attempts.get(&job) {
        if t.info.fence >= fence {
            return Err(RunnerError::AlreadyRunning {
                job,
                fence: t.info.fence,
            });
        }
        tracing::info!(job = %job, fence = %t.info.fence, newer = %fence, "Stopping a stale attempt.");
        t.cancel.send_replace(true);
        let old = state.attempts.remove(&job).expect("just seen");
        state.retiring.insert(old.pod_name.clone(), old);
    }
    Ok(())
}

impl WarmRunners for KubeBackend {
    fn fits(&self, pool: &str, assignment: &Assignment) -> bool {
        self.inner
            .pools
            .get(pool)
            .and_then(|p| p.warm.as_ref())
            .is_some_and(|w| {
                w.image == assignment.image && assignment.resources.fits_within(&w.resources)
            })
    }

    fn prepare(&self, pool: &str, runner: RunnerId) -> BoxFuture<'_, Result<(), RunnerError>> {
        let pool = pool.to_owned();
        Box::pin(async move { self.inner.clone().prepare(&pool, runner).await })
    }

    fn start_on(
        &self,
        pool: &str,
        runner: RunnerId,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        let pool = pool.to_owned();
        Box::pin(async move {
            let name = render::warm_pod_name(&self.inner.instance, &pool, runner);
            let (job, fence) = (assignment.job, assignment.fence);
            let mut state = self.inner.state();
            if state.closed {
                return Err(unavailable());
            }
            let alive = state.pods.get(&name).is_some_and(|p| {
                matches!(
                    status::observe_warm(p),
                    status::WarmObservation::Ready { .. }
                )
            });
            let Some(warm) = state.warm.remove(&name) else {
                return Err(RunnerError::Unavailable(format!(
                    "warm runner {runner} of pool {pool} is gone"
                )));
            };
            if !warm.ready || !alive {
                // Died (or went unready) since the agent last heard: the agent drops the
                // runner and gives the job to another.
                tracing::warn!(pod = %name, "A warm pod was not ready when its job came; deleting it.");
                drop(state);
                self.inner.reap(name);
                return Err(RunnerError::Unavailable(format!(
                    "warm runner {runner} of pool {pool} is not ready any more"
                )));
            }
            if let Err(e) = supersede(&mut state, job, fence) {
                // The runner was given this job: it is used up either way.
                drop(state);
                self.inner.reap(name);
                return Err(e);
            }
            state.taken.insert((pool.clone(), runner), (job, fence));
            tracing::info!(job = %job, fence = %fence, pod = %name, "Attempt handed to a warm pod.");
            self.inner.track(
                &mut state,
                name,
                assignment,
                events,
                Mode::Handoff { token: warm.token },
            );
            Ok(())
        })
    }

    fn take_lost(&self) -> Vec<(String, RunnerId)> {
        std::mem::take(&mut self.inner.state().lost)
    }

    fn retire(
        &self,
        pool: &str,
        runner: RunnerId,
    ) -> BoxFuture<'_, Result<Option<JobId>, RunnerError>> {
        let pool = pool.to_owned();
        Box::pin(async move {
            let name = render::warm_pod_name(&self.inner.instance, &pool, runner);
            let removed = {
                let mut state = self.inner.state();
                if let Some((job, _)) = state.taken.get(&(pool.clone(), runner)) {
                    return Ok(Some(*job));
                }
                state.warm.remove(&name).is_some()
            };
            if removed {
                tracing::debug!(pod = %name, "Deleting an idle warm pod.");
                self.inner.reap(name);
            }
            Ok(None)
        })
    }
}

/// How long a warm pod may take to become ready when nothing is visibly wrong (scheduling
/// and pulls have their own deadlines).
const WARM_READY_WITHIN: Duration = Duration::from_secs(600);

impl Inner {
    /// Makes warm pod `runner` of `pool` and waits until it is ready for a job.
    async fn prepare(self: Arc<Self>, pool: &str, runner: RunnerId) -> Result<(), RunnerError> {
        let spec = self
            .pools
            .get(pool)
            .and_then(|p| p.warm.clone())
            .ok_or_else(|| {
                RunnerError::Internal(format!(
                    "pool {pool} has no warm pods configured (an image and resources)"
                ))
            })?;
        self.wait_ready().await?;
        let name = render::warm_pod_name(&self.instance, pool, runner);
        let mut token = [0u8; 32];
        getrandom::fill(&mut token)
            .map_err(|e| RunnerError::Internal(format!("no randomness for a token: {e}")))?;
        let token = hex(&token);
        let mut view = {
            let mut state = self.state();
            if state.closed {
                return Err(unavailable());
            }
            let (tx, rx) = watch::channel(self.view_of(&state, &name));
            state.warm.insert(
                name.clone(),
                WarmPod {
                    pool: pool.to_owned(),
                    runner,
                    token: token.clone(),
                    view: tx,
                    ready: false,
                },
            );
            rx
        };
        let mut result = self
            .make_warm(pool, runner, &name, &token, &spec, &mut view)
            .await;
        if result.is_ok() {
            let mut state = self.state();
            // Looked at again under the lock: a failure that came in since the pod looked
            // ready would otherwise be missed (the pod was not `ready` yet to report it).
            let still_ready = state.pods.get(&name).is_some_and(|p| {
                matches!(
                    status::observe_warm(p),
                    status::WarmObservation::Ready { .. }
                )
            });
            match state.warm.get_mut(&name) {
                Some(w) if still_ready => w.ready = true,
                Some(_) => {
                    result = Err(RunnerError::Internal(format!(
                        "warm pod {name} stopped being ready as it became ready"
                    )));
                }
                None => {
                    result = Err(RunnerError::Unavailable(format!(
                        "warm pod {name} was retired while starting"
                    )));
                }
            }
        }
        if let Err(e) = &result {
            tracing::warn!(pod = %name, error = %e, "A warm pod could not be made ready; deleting it.");
            let known = self.state().warm.remove(&name).is_some();
            if known {
                self.reap(name);
            }
        }
        result
    }

    async fn make_warm(
        &self,
        pool: &str,
        runner: RunnerId,
        name: &str,
        token: &str,
        spec: &WarmPods,
        view: &mut watch::Receiver<PodView>,
    ) -> Result<(), RunnerError> {
        let pod = render::warm_pod(&self.cfg, &self.cell, pool, runner, &self.instance, spec);
        let uid = match self.pods.create(&PostParams::default(), &pod).await {
            Ok(created) => {
                self.meter.record();
                created.metadata.uid
            }
            Err(e) => {
                return Err(RunnerError::Internal(format!(
                    "could not create warm pod {name}: {e}"
                )));
            }
        };
        {
            let mut state = self.state();
            if !state.warm.contains_key(name) || state.closed {
                // Retired (or the backend shut down) while the create was on its way: the
                // pod was made for nobody.
                drop(state);
                self.reap(name.to_owned());
                return Err(RunnerError::Unavailable(format!(
                    "warm pod {name} was retired while starting"
                )));
            }
            if uid.is_none() {
                state.ownerless_secrets.insert(name.to_owned());
            }
        }
        let secret = render::warm_secret(
            &self.cfg,
            &self.cell,
            pool,
            runner,
            &self.instance,
            token,
            uid.as_deref(),
        );
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                return Err(RunnerError::Internal(format!(
                    "could not create warm pod {name}'s Secret: {e}"
                )));
            }
        }
        let mut stop = self.stop.subscribe();
        let mut trouble: Option<(Instant, Duration, String)> = None;
        let mut seen = false;
        let gave_up = Instant::now() + WARM_READY_WITHIN;
        loop {
            let current = view.borrow_and_update().clone();
            match current {
                PodView::Unseen => {}
                PodView::Gone { certain } => {
                    // Missing from a relist taken before the create landed is not gone.
                    if certain || seen {
                        return Err(RunnerError::Internal(format!(
                            "warm pod {name} was deleted before it was ready"
                        )));
                    }
                }
                PodView::Present(pod) => {
                    seen = true;
                    match status::observe_warm(&pod) {
                        status::WarmObservation::Ready { ip } => {
                            tracing::debug!(pod = %name, ip = %ip, "Warm pod ready.");
                            return Ok(());
                        }
                        status::WarmObservation::Starting => trouble = None,
                        status::WarmObservation::Failed(why) => {
                            return Err(RunnerError::Internal(format!("warm pod {name}: {why}")));
                        }
                        status::WarmObservation::Trouble(o) => {
                            let (limit, message) = match o {
                                status::Observation::Unschedulable { message } => {
                                    (self.cfg.unschedulable_deadline, message)
                                }
                                status::Observation::PullFailing { message }
                                | status::Observation::Stuck { message } => {
                                    (self.cfg.image_pull_deadline, message)
                                }
                                other => (self.cfg.image_pull_deadline, format!("{other:?}")),
                            };
                            match &mut trouble {
                                Some((_, _, m)) => *m = message,
                                None => trouble = Some((Instant::now(), limit, message)),
                            }
                        }
                    }
                }
            }
            let deadline = trouble
                .as_ref()
                .map_or(gave_up, |(since, limit, _)| (*since + *limit).min(gave_up));
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return Err(unavailable()),
                changed = view.changed() => {
                    if changed.is_err() {
                        return Err(RunnerError::Unavailable(format!("warm pod {name} was retired while starting")));
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    let why = trouble.map_or_else(
                        || format!("not ready within {}", humantime::format_duration(WARM_READY_WITHIN)),
                        |(_, limit, m)| format!("{m} (for {})", humantime::format_duration(limit)),
                    );
                    return Err(RunnerError::Internal(format!("warm pod {name}: {why}")));
                }
            }
        }
    }
}

/// Keeps the cell's pre-pull DaemonSet as the pools' lists say: applied (server-side apply,
/// so a changed list rolls it) when any pool has one, deleted when none has; retried with
/// back-off until it works or the backend stops.
async fn keep_prepull(inner: Arc<Inner>) {
    let mut images: Vec<String> = inner
        .pools
        .values()
        .flat_map(|p| p.prepull.iter().cloned())
        .collect();
    let mut seen = std::collections::HashSet::new();
    images.retain(|i| seen.insert(i.clone()));
    let name = render::prepull_name(&inner.cell);
    let mut stop = inner.stop.subscribe();
    let mut wait = Duration::from_secs(1);
    loop {
        let result = if images.is_empty() {
            match inner
                .daemonsets
                .delete(&name, &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    tracing::info!(daemonset = %name, "No pool pre-pulls images any more: deleted the pre-pull DaemonSet.");
                    Ok(())
                }
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            let ds = render::prepull_daemonset(&inner.cfg, &inner.cell, &images);
            let params = PatchParams::apply("flotilla-agent").force();
            match inner
                .daemonsets
                .patch(&name, &params, &Patch::Apply(&ds))
                .await
            {
                Ok(_) => {
                    tracing::info!(daemonset = %name, images = images.len(), "Pre-pulling the pools' images on the runner nodes.");
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(daemonset = %name, error = %e, retry_in = ?wait, "Could not update the pre-pull DaemonSet (does the agent's Role grant daemonsets?).");
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(300));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Inner {
    /// The assignment a left-over pod runs, read back from its spec Secret and checked
    /// against the pod's labels.
    async fn adoptable(&self, name: &str) -> Result<(Assignment, Option<String>), Unadoptable> {
        let (labels, warm) = {
            let state = self.state();
            let pod = state
                .pods
                .get(name)
                .ok_or_else(|| Unadoptable::Invalid("the pod is gone".into()))?;
            (
                pod.metadata.labels.clone().unwrap_or_default(),
                render::is_warm(pod),
            )
        };
        if warm && !labels.contains_key(render::LABEL_JOB) {
            return Err(Unadoptable::Invalid(
                "an idle warm pod of an earlier agent".into(),
            ));
        }
        let secret = match self.secrets.get(name).await {
            Ok(s) => s,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                return Err(Unadoptable::Invalid("its spec Secret is missing".into()));
            }
            Err(e) => return Err(Unadoptable::Unreadable(e.to_string())),
        };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(render::ATTEMPT_KEY))
            .ok_or_else(|| Unadoptable::Invalid("its spec Secret has no job spec".into()))?;
        let a: Assignment = serde_json::from_slice(&bytes.0)
            .map_err(|e| Unadoptable::Invalid(format!("its job spec does not parse: {e}")))?;
        let label = |key: &str| labels.get(key).map(String::as_str).unwrap_or("");
        if (!warm && render::pod_name(&a) != name)
            || label(render::LABEL_JOB) != a.job.to_string()
            || label(render::LABEL_FENCE) != a.fence.to_string()
        {
            return Err(Unadoptable::Invalid(
                "its job spec does not match its name and labels".into(),
            ));
        }
        let token = warm.then(|| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(render::TOKEN_KEY))
                .map(|t| String::from_utf8_lossy(&t.0).into_owned())
                .unwrap_or_default()
        });
        Ok((a, token))
    }
}

/// Why a left-over pod was not taken over.
#[derive(Debug)]
enum Unadoptable {
    /// It never can be (no spec, a spec that does not match): delete it.
    Invalid(String),
    /// Its spec could not be read just now: try again later.
    Unreadable(String),
}
