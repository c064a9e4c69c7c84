//! Cells end to end: a federator replica, cell agents with the local runner backend over real
//! gRPC on loopback (through a TCP proxy the test can cut), real git repositories, real
//! processes. Leases are short here (lost after 3 × 200 ms + 1 s of silence).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use flotilla_cell_agent::backend::{LocalBackend, LocalConfig};
use flotilla_cell_agent::{Agent, AgentAuth, AgentConfig};
use flotilla_core::ids::CellId;
use flotilla_core::runner::{
    Assignment, BoxFuture, RunnerBackend, RunnerError, RunnerEvent, RunnerEvents, RunnerInfo,
};
use flotilla_core::{Fence, JobId};
use serde_json::Value;
use tokio::time::Instant;

fn agent(c: &Cluster, cell: &str, federator: String, dir: &std::path::Path) -> Agent {
    let backend = LocalBackend::new(LocalConfig::new(dir.join(cell))).unwrap();
    agent_on(c, cell, federator, Arc::new(backend))
}

fn agent_on(c: &Cluster, cell: &str, federator: String, backend: Arc<dyn RunnerBackend>) -> Agent {
    let mut config = AgentConfig::new(
        CellId::new(cell).unwrap(),
        vec![federator],
        AgentAuth::Token(CELL_TOKEN.into()),
        c.logs_dir(),
    );
    config.reap_interval = Duration::from_millis(500);
    config.max_backoff = Duration::from_millis(300);
    Agent::start(config, backend)
}

/// A backend whose runners outlive the agent, as kubernetes pods do: the local backend
/// underneath, a shutdown that leaves it running, and a `recover` that hands the running
/// attempts (and their events) to the next agent.
#[derive(Debug)]
struct Surviving {
    local: LocalBackend,
    sink: Arc<Relay>,
    running: std::sync::Mutex<std::collections::HashMap<JobId, Assignment>>,
}

/// Forwards runner events to whichever agent currently holds the runners.
#[derive(Default)]
struct Relay(std::sync::Mutex<Option<Arc<dyn RunnerEvents>>>);

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Relay")
    }
}

impl RunnerEvents for Relay {
    fn event(&self, job: JobId, fence: Fence, event: RunnerEvent) {
        let to = self.0.lock().unwrap().clone();
        if let Some(to) = to {
            to.event(job, fence, event);
        }
    }
}

impl RunnerBackend for Surviving {
    fn name(&self) -> &'static str {
        "surviving"
    }

    fn start(
        &self,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        *self.sink.0.lock().unwrap() = Some(events);
        self.running
            .lock()
            .unwrap()
            .insert(assignment.job, assignment.clone());
        self.local.start(assignment, self.sink.clone())
    }

    fn cancel(&self, job: JobId, fence: Fence) -> BoxFuture<'_, Result<(), RunnerError>> {
        self.local.cancel(job, fence)
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, RunnerError>> {
        self.local.list()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        *self.sink.0.lock().unwrap() = None;
        Box::pin(async {})
    }

    fn recover(
        &self,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<Vec<Assignment>, RunnerError>> {
        *self.sink.0.lock().unwrap() = Some(events);
        Box::pin(async move {
            let live = self.local.list().await?;
            let running = self.running.lock().unwrap();
            Ok(live
                .iter()
                .filter_map(|info| running.get(&info.job).cloned())
                .collect())
        })
    }
}

async fn wait_connected(c: &Cluster, cells: &[&str]) {
    for _ in 0..200 {
        let (_, v) = c.get("/api/v1/cells", ADMIN).await;
        let up = cells.iter().all(|id| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|cell| cell["id"] == *id && cell["connected"] == true)
        });
        if up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cells {cells:?} never connected");
}

/// Polls a build until it ends; returns it.
async fn finished_build(c: &Cluster, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, b) = c.get(&format!("/api/v1/builds/{id}"), ADMIN).await;
        if ["succeeded", "failed", "cancelled", "skipped"]
            .contains(&b["status"].as_str().unwrap_or(""))
        {
            return b;
        }
        assert!(Instant::now() < deadline, "build did not finish: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn job_id(build: &Value, name: &str) -> String {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name} in {build}"))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn job(c: &Cluster, id: &str) -> Value {
    c.get(&format!("/api/v1/jobs/{id}"), ADMIN).await.1
}

async fn logs(c: &Cluster, id: &str) -> String {
    let resp = c
        .client
        .get(c.url(0, &format!("/api/v1/jobs/{id}/logs")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

fn ms(v: &Value, field: &str) -> u64 {
    v["timings"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

const DAG: &str = r#"version: 1
defaults: { image: "debian:12" }
jobs:
  a: { run: "cat README.md && echo built-by-a" }
  b: { run: "echo from-b", needs: [a] }
  c: { run: "echo from-c", needs: [a] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_runs_every_job_on_a_local_cell_in_dag_order_and_a_failing_job_fails_the_build() {
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(dir.path());
    let sha = repo.commit(
        "main",
        &[
            (".ci.yaml", DAG),
            ("README.md", "checked out at the pushed commit\n"),
        ],
    );
    c.project("web", &repo.url(), "github").await;
    let a = agent(&c, "local-1", c.cells_addr(0), dir.path());
    wait_connected(&c, &["local-1"]).await;

    let (status, ack) = github_push(&c, 0, "web", "d-1", &push_payload("main", &sha))
        .await
        .unwrap();
    assert_eq!(status, 202, "{ack}");
    let id = ack["build_id"].as_str().unwrap();
    let build = finished_build(&c, id, Duration::from_secs(60)).await;
    assert_eq!(build["status"], "succeeded", "{build}");

    let (ja, jb, jc) = (
        job(&c, &job_id(&build, "a")).await,
        job(&c, &job_id(&build, "b")).await,
        job(&c, &job_id(&build, "c")).await,
    );
    for j in [&ja, &jb, &jc] {
        assert_eq!(j["status"], "succeeded", "{j}");
        assert_eq!(j["attempt"], 1);
    }
    // DAG order, on the runner's own clock: b and c start only after a has finished.
    let a_done = rfc_ms(&ja["finished_at"]);
    assert!(
        ms(&jb, "runner_started_at_ms") >= a_done.saturating_sub(5),
        "{ja} {jb}"
    );
    assert!(
        ms(&jc, "runner_started_at_ms") >= a_done.saturating_sub(5),
        "{ja} {jc}"
    );
    let out = logs(&c, &job_id(&build, "a")).await;
    assert!(out.contains("checked out at the pushed commit"), "{out}");
    assert!(out.contains("built-by-a"), "{out}");
    assert!(out.contains("attempt 1 · cell local-1"), "{out}");
    assert!(logs(&c, &job_id(&build, "b")).await.contains("from-b"));

    // A job that exits 3 fails the build with Test{3}; what needs it never runs.
    let sha = repo.commit(
        "main",
        &[(
            ".ci.yaml",
            "version: 1\ndefaults: { image: \"debian:12\" }\njobs:\n  a: { run: \"echo failing; exit 3\" }\n  b: { run: \"echo must-not-run\", needs: [a] }\n",
        )],
    );
    let (_, ack) = github_push(&c, 0, "web", "d-2", &push_payload("main", &sha))
        .await
        .unwrap();
    let build = finished_build(
        &c,
        ack["build_id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(build["status"], "failed", "{build}");
    let ja = job(&c, &job_id(&build, "a")).await;
    assert_eq!(ja["failure"]["summary"], "Test{3}", "{ja}");
    let jb = job(&c, &job_id(&build, "b")).await;
    assert_eq!(jb["status"], "cancelled", "{jb}");
    assert!(jb["started_at"].is_null(), "{jb}");
    assert!(
        !logs(&c, &job_id(&build, "b"))
            .await
            .contains("must-not-run")
    );

    a.shutdown().await;
    c.shutdown().await;
}

fn rfc_ms(v: &Value) -> u64 {
    let t = humantime::parse_rfc3339(v.as_str().unwrap()).unwrap();
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_cells_job_moves_to_another_cell_and_the_returning_agent_is_fenced_off() {
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(dir.path());
    let sha = repo.commit(
        "main",
        &[(
            ".ci.yaml",
            "version: 1\ndefaults: { image: \"debian:12\" }\njobs:\n  long: { run: \"echo started; sleep 3; echo done\" }\n",
        )],
    );
    c.project("web", &repo.url(), "github").await;
    let (pa, pb) = (
        Proxy::start(c.cells_addr(0)).await,
        Proxy::start(c.cells_addr(0)).await,
    );
    let cell_a = agent(&c, "cell-a", pa.addr.clone(), dir.path());
    let cell_b = agent(&c, "cell-b", pb.addr.clone(), dir.path());
    wait_connected(&c, &["cell-a", "cell-b"]).await;

    let (_, ack) = github_push(&c, 0, "web", "d-1", &push_payload("main", &sha))
        .await
        .unwrap();
    let build_id = ack["build_id"].as_str().unwrap().to_owned();
    let build = c.loaded_build(&build_id).await;
    let jid = job_id(&build, "long");
    let first = loop {
        let j = job(&c, &jid).await;
        if j["status"] == "running" {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        first["cell"], "cell-a",
        "first fit picks the first cell: {first}"
    );
    let old_fence = first["fence"].as_u64().unwrap();

    // Cut cell-a off without a word to the federator.
    pa.cut();
    let cut_at = Instant::now();
    let moved = loop {
        let j = job(&c, &jid).await;
        if j["cell"] == "cell-b" && j["status"] == "running" {
            break j;
        }
        assert!(
            cut_at.elapsed() < Duration::from_millis(600 + 1000 + 5000),
            "not re-placed within heartbeat timeout + grace + 5 s: {j}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(moved["attempt"], 2, "{moved}");
    assert!(moved["fence"].as_u64().unwrap() > old_fence);
    let (_, cells) = c.get("/api/v1/cells", ADMIN).await;
    let a_state = cells
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "cell-a")
        .unwrap()["state"]
        .clone();
    assert_eq!(a_state, "lost");

    // cell-a's runner finishes during the partition; its report waits in the outbox. When it
    // comes back, the report (old fence) is refused and the attempt revoked.
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(cut_at.elapsed())).await;
    pa.heal();
    let fenced = Instant::now();
    loop {
        let stats = cell_a.stats();
        let stale = c
            .fed(0)
            .cells()
            .metrics()
            .stale_updates
            .load(Ordering::Relaxed);
        if stats.stale_reports.load(Ordering::Relaxed) >= 1
            && stats.revocations.load(Ordering::Relaxed) >= 1
            && stale >= 1
        {
            break;
        }
        assert!(
            fenced.elapsed() < Duration::from_secs(10),
            "cell-a was not fenced off: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let build = finished_build(&c, &build_id, Duration::from_secs(30)).await;
    assert_eq!(build["status"], "succeeded", "{build}");
    let done = job(&c, &jid).await;
    assert_eq!(
        done["attempt"], 2,
        "the stale success must not count: {done}"
    );
    let metrics = c.metrics(0).await;
    assert!(
        metrics.contains("flotilla_cell_stale_updates_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flotilla_cell_lease_expiries_total 1"),
        "{metrics}"
    );

    cell_a.shutdown().await;
    cell_b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_restarts_gets_its_lost_runners_retried_at_once() {
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(dir.path());
    let sha = repo.commit(
        "main",
        &[(
            ".ci.yaml",
            "version: 1\ndefaults: { image: \"debian:12\" }\njobs:\n  slow: { run: \"sleep 2; echo finished\" }\n",
        )],
    );
    c.project("web", &repo.url(), "github").await;
    let first = agent(&c, "cell-a", c.cells_addr(0), dir.path());
    wait_connected(&c, &["cell-a"]).await;
    let (_, ack) = github_push(&c, 0, "web", "d-1", &push_payload("main", &sha))
        .await
        .unwrap();
    let build_id = ack["build_id"].as_str().unwrap().to_owned();
    let jid = job_id(&c.loaded_build(&build_id).await, "slow");
    while job(&c, &jid).await["status"] != "running" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The agent stops (its runners die with it) and a new one comes back as the same cell
    // before the lease runs out: the attempt it no longer knows fails as RunnerCrash and is
    // retried, without waiting for the lease.
    first.shutdown().await;
    let second = agent(&c, "cell-a", c.cells_addr(0), dir.path());
    let back = Instant::now();
    loop {
        let j = job(&c, &jid).await;
        if j["attempt"] == 2 && j["status"] == "running" {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(10), "not retried: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let build = finished_build(&c, &build_id, Duration::from_secs(30)).await;
    assert_eq!(build["status"], "succeeded", "{build}");
    let (_, cells) = c.get("/api/v1/cells", ADMIN).await;
    assert_eq!(cells[0]["state"], "active", "{cells}");
    assert_eq!(
        c.fed(0)
            .cells()
            .metrics()
            .lease_expiries
            .load(Ordering::Relaxed),
        0,
        "the retry must come from the reconnect, not from a lease expiry"
    );
    second.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_restarts_takes_over_runners_that_outlived_it_and_the_attempt_goes_on() {
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(dir.path());
    let sha = repo.commit(
        "main",
        &[(
            ".ci.yaml",
            "version: 1\ndefaults: { image: \"debian:12\" }\njobs:\n  slow: { run: \"sleep 2; echo finished\" }\n",
        )],
    );
    c.project("web", &repo.url(), "github").await;
    let backend = Arc::new(Surviving {
        local: LocalBackend::new(LocalConfig::new(dir.path().join("cell-a"))).unwrap(),
        sink: Arc::default(),
        running: Default::default(),
    });
    let first = agent_on(&c, "cell-a", c.cells_addr(0), backend.clone());
    wait_connected(&c, &["cell-a"]).await;
    let (_, ack) = github_push(&c, 0, "web", "d-1", &push_payload("main", &sha))
        .await
        .unwrap();
    let build_id = ack["build_id"].as_str().unwrap().to_owned();
    let jid = job_id(&c.loaded_build(&build_id).await, "slow");
    while job(&c, &jid).await["status"] != "running" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The agent restarts while its runner keeps going (a pod survives an agent rollout):
    // the new agent names the attempt in its hello, so the federator keeps it there.
    first.shutdown().await;
    let second = agent_on(&c, "cell-a", c.cells_addr(0), backend.clone());
    let build = finished_build(&c, &build_id, Duration::from_secs(30)).await;
    assert_eq!(build["status"], "succeeded", "{build}");
    let j = job(&c, &jid).await;
    assert_eq!(
        j["attempt"], 1,
        "the attempt went on, it was not retried: {j}"
    );
    assert!(
        logs(&c, &jid).await.contains("finished"),
        "the new agent reported the runner's output"
    );
    second.shutdown().await;
    backend.local.shutdown().await;
    c.shutdown().await;
}

const TWO_SLOW: &str = r#"version: 1
defaults: { image: "debian:12" }
jobs:
  one: { run: "sleep 1 && echo one-done" }
  two: { run: "sleep 4 && echo two-done" }
"#;

/// The warm runners' sandboxes the local backend holds ready.
fn warm_dirs(work_dir: &std::path::Path) -> usize {
    std::fs::read_dir(work_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("warm-"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_runs_jobs_on_ready_runners_scales_with_the_workload_and_retires_only_idle_ones()
 {
    use flotilla_core::autoscale::Policy;
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(dir.path());
    let sha = repo.commit("main", &[(".ci.yaml", TWO_SLOW)]);
    c.project("web", &repo.url(), "github").await;
    let backend = LocalBackend::new(LocalConfig::new(dir.path().join("warm-cell"))).unwrap();
    let work_dir = backend.config().work_dir.clone();
    let mut config = AgentConfig::new(
        CellId::new("warm-cell").unwrap(),
        vec![c.cells_addr(0)],
        AgentAuth::Token(CELL_TOKEN.into()),
        c.logs_dir(),
    );
    // Two runners always warm; at half utilisation, two busy runners want four.
    config.autoscale = [(
        "default".to_owned(),
        Policy {
            min: 2,
            max: 8,
            target_utilisation: 0.5,
            scale_up_cooldown_ms: 0,
            scale_down_delay_ms: 300,
            floor: None,
            ..Policy::default()
        },
    )]
    .into();
    config.pools = [("default".to_owned(), 8)].into();
    config.autoscale_interval = Duration::from_millis(100);
    let agent = Agent::start(config, Arc::new(backend));
    wait_connected(&c, &["warm-cell"]).await;
    let stats = agent.stats().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while warm_dirs(&work_dir) < 2 {
        assert!(Instant::now() < deadline, "the minimum never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.runners_prepared.load(Ordering::Relaxed), 2);

    let (status, ack) = github_push(&c, 0, "web", "d-1", &push_payload("main", &sha))
        .await
        .unwrap();
    assert_eq!(status, 202, "{ack}");
    let id = ack["build_id"].as_str().unwrap().to_owned();
    // Both jobs take the two warm runners and the pool grows by two for the workload; once
    // `one` is done, one runner too many is idle and goes while `two` still runs — the idle
    // one, never `two`'s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.runners_retired.load(Ordering::Relaxed) < 1 {
        assert!(
            Instant::now() < deadline,
            "no scale-down while the jobs ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let build = finished_build(&c, &id, Duration::from_secs(30)).await;
    assert_eq!(build["status"], "succeeded", "{build}");
    for name in ["one", "two"] {
        let j = job(&c, &job_id(&build, name)).await;
        assert_eq!(j["status"], "succeeded", "a busy runner was killed: {j}");
        assert_eq!(j["attempt"], 1, "{j}");
        assert!(
            logs(&c, &job_id(&build, name))
                .await
                .contains(&format!("{name}-done"))
        );
    }
    let (_, two) = c
        .get(&format!("/api/v1/jobs/{}", job_id(&build, "two")), ADMIN)
        .await;
    assert_eq!(two["status"], "succeeded", "{two}");
    assert_eq!(stats.runners_kept.load(Ordering::Relaxed), 0);
    // Back to the minimum: two warm sandboxes, as the federator sees it too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, cells) = c.get("/api/v1/cells", ADMIN).await;
        let pool = &cells[0]["capacity"]["default"];
        if warm_dirs(&work_dir) == 2 && pool["idle"] == 2 && pool["busy"] == 0 {
            assert_eq!(pool["workload"], 0.0, "{pool}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back to two warm runners: {} dirs, {pool}",
            warm_dirs(&work_dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two at first, two more for the workload, one to get back to the minimum.
    assert_eq!(stats.runners_prepared.load(Ordering::Relaxed), 5);
    let metrics = c.metrics(0).await;
    let lines: Vec<&str> = metrics.lines().collect();
    assert!(
        lines.contains(
            &"flotilla_pool_runners{cell=\"warm-cell\",pool=\"default\",state=\"idle\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        lines.contains(&"flotilla_pool_workload{cell=\"warm-cell\",pool=\"default\"} 0"),
        "{metrics}"
    );
    agent.shutdown().await;
    assert_eq!(
        warm_dirs(&work_dir),
        0,
        "warm sandboxes are removed on shutdown"
    );
    c.shutdown().await;
}

/// The local backend with a warm pool whose runners take only `debian:12` jobs, as a
/// kubernetes warm pool takes only its image; it notes how each job was started.
#[derive(Debug)]
struct Picky {
    local: LocalBackend,
    started: std::sync::Mutex<Vec<(String, Assignment)>>,
    /// The first warm runner handed a job turns out dead (a warm pod evicted while idle).
    die_once: std::sync::atomic::AtomicBool,
}

impl RunnerBackend for Picky {
    fn name(&self) -> &'static str {
        "picky"
    }
    fn start(
        &self,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        self.started
            .lock()
            .unwrap()
            .push(("cold".into(), assignment.clone()));
        self.local.start(assignment, events)
    }
    fn cancel(&self, job: JobId, fence: Fence) -> BoxFuture<'_, Result<(), RunnerError>> {
        self.local.cancel(job, fence)
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, RunnerError>> {
        self.local.list()
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.local.shutdown()
    }
    fn warm(&self) -> Option<&dyn flotilla_core::runner::WarmRunners> {
        Some(self)
    }
}

impl flotilla_core::runner::WarmRunners for Picky {
    fn fits(&self, _pool: &str, assignment: &Assignment) -> bool {
        assignment.image == "debian:12"
    }
    fn prepare(
        &self,
        pool: &str,
        runner: flotilla_core::autoscale::RunnerId,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        self.local
            .warm()
            .expect("local has warm runners")
            .prepare(pool, runner)
    }
    fn start_on(
        &self,
        pool: &str,
        runner: flotilla_core::autoscale::RunnerId,
        assignment: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        let warm = self.local.warm().expect("local has warm runners");
        if self.die_once.swap(false, Ordering::Relaxed) {
            let pool = pool.to_owned();
            return Box::pin(async move {
                let _ = warm.retire(&pool, runner).await;
                Err(RunnerError::Unavailable("the warm runner died".into()))
            });
        }
        self.started
            .lock()
            .unwrap()
            .push(("warm".into(), assignment.clone()));
        warm.start_on(pool, runner, assignment, events)
    }
    fn retire(
        &self,
        pool: &str,
        runner: flotilla_core::autoscale::RunnerId,
    ) -> BoxFuture<'_, Result<Option<JobId>, RunnerError>> {
        self.local
            .warm()
            .expect("local has warm runners")
            .retire(pool, runner)
    }
}

const TWO_IMAGES: &str = r#"version: 1
on: { push: { branches: [main] } }
defaults: { image: "debian:12", resources: { cpu: "500m", memory: 512Mi } }
jobs:
  fits: { run: "echo fits-done" }
  other: { image: "node:22", run: "echo other-done", resources: { cpu: "8", memory: 1Gi } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_warm_runners_cannot_take_starts_cold_a_dead_runner_is_replaced_and_every_job_gets_at_least_the_pools_runner_size()
 {
    use flotilla_core::autoscale::Policy;
    use flotilla_core::pipeline::Resources;
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(dir.path());
    let sha = repo.commit("main", &[(".ci.yaml", TWO_IMAGES)]);
    c.project("web", &repo.url(), "github").await;
    let backend = Arc::new(Picky {
        local: LocalBackend::new(LocalConfig::new(dir.path().join("picky-cell"))).unwrap(),
        started: Default::default(),
        die_once: true.into(),
    });
    let mut config = AgentConfig::new(
        CellId::new("picky-cell").unwrap(),
        vec![c.cells_addr(0)],
        AgentAuth::Token(CELL_TOKEN.into()),
        c.logs_dir(),
    );
    config.autoscale = [(
        "default".to_owned(),
        Policy {
            min: 1,
            max: 4,
            floor: None,
            ..Policy::default()
        },
    )]
    .into();
    config.pools = [("default".to_owned(), 4)].into();
    let runner_size = Resources {
        cpu_millis: 2000,
        memory_bytes: 4 << 30,
    };
    config.pool_resources = [("default".to_owned(), runner_size)].into();
    config.autoscale_interval = Duration::from_millis(100);
    let agent = Agent::start(config, backend.clone());
    wait_connected(&c, &["picky-cell"]).await;
    let (status, ack) = github_push(&c, 0, "web", "d-picky", &push_payload("main", &sha))
        .await
        .unwrap();
    assert_eq!(status, 202, "{ack}");
    let id = ack["build_id"].as_str().unwrap().to_owned();
    let build = finished_build(&c, &id, Duration::from_secs(30)).await;
    assert_eq!(build["status"], "succeeded", "{build}");
    assert!(
        logs(&c, &job_id(&build, "other"))
            .await
            .contains("other-done")
    );
    let started = backend.started.lock().unwrap().clone();
    let how = |name: &str| {
        started
            .iter()
            .find(|(_, a)| a.name == name)
            .unwrap_or_else(|| panic!("{name} never started: {started:?}"))
            .clone()
    };
    let (path, fits) = how("fits");
    assert_eq!(path, "warm", "the job the warm runners take runs on one");
    assert_eq!(
        job(&c, &job_id(&build, "fits")).await["attempt"],
        1,
        "a runner found dead when its job came is replaced, not the job failed"
    );
    assert_eq!(agent.stats().runners_lost.load(Ordering::Relaxed), 1);
    assert_eq!(
        fits.resources, runner_size,
        "a small job gets a whole runner"
    );
    let (path, other) = how("other");
    assert_eq!(path, "cold", "another image starts on a runner of its own");
    assert_eq!(
        other.resources,
        Resources {
            cpu_millis: 8000,
            memory_bytes: 4 << 30
        },
        "more than the pool's size where the job asks for more, the pool's size elsewhere"
    );
    assert_eq!(agent.stats().cold_starts.load(Ordering::Relaxed), 1);
    agent.shutdown().await;
    c.shutdown().await;
}
