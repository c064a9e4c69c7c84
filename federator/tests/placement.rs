//! Placement across cells at scale (ARCHITECTURE §7): a federator replica, cell agents over
//! real gRPC, and a timer runner backend (an attempt "runs" for the milliseconds its job's
//! `RUN_MS` says, with no process), so hundreds of jobs fit in a test. Leases are short here
//! (lost after 3 × 200 ms + 1 s of silence).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flotilla_cell_agent::{Agent, AgentAuth, AgentConfig};
use flotilla_core::ids::CellId;
use flotilla_core::job::{FailureClass, Outcome};
use flotilla_core::runner::{
    Assignment, BoxFuture, RunnerBackend, RunnerError, RunnerEvent, RunnerEvents, RunnerInfo,
};
use flotilla_core::{Fence, JobId};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

/// The attempts a timer backend runs, with the means to stop each.
type Timers = HashMap<JobId, (RunnerInfo, watch::Sender<bool>)>;

/// Runs attempts as timers: `Started` at once, `Finished(Succeeded)` after the job's
/// `RUN_MS`, `Finished(Cancelled)` when cancelled or shut down.
#[derive(Debug, Default)]
struct TimerBackend {
    running: Arc<Mutex<Timers>>,
    closed: Mutex<bool>,
    /// The API budget it reports (pod creations per second).
    budget: Option<u32>,
}

fn now_ms() -> u64 {
    #[allow(clippy::disallowed_methods, reason = "event stamps only")]
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl TimerBackend {
    fn count(&self) -> usize {
        self.running.lock().unwrap().len()
    }
}

impl RunnerBackend for TimerBackend {
    fn name(&self) -> &'static str {
        "timer"
    }

    fn start(
        &self,
        a: Assignment,
        events: Arc<dyn RunnerEvents>,
    ) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async move {
            if *self.closed.lock().unwrap() {
                return Err(RunnerError::Unavailable("closed".into()));
            }
            let run_ms: u64 = a
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == "RUN_MS")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let (stop, mut stopped) = watch::channel(false);
            let info = RunnerInfo {
                job: a.job,
                fence: a.fence,
                accepted_at_ms: now_ms(),
                started_at_ms: Some(now_ms()),
                timeout_secs: a.timeout_secs,
            };
            let mut running = self.running.lock().unwrap();
            if let Some((old, _)) = running.get(&a.job)
                && old.fence >= a.fence
            {
                return Err(RunnerError::AlreadyRunning {
                    job: a.job,
                    fence: old.fence,
                });
            }
            if let Some((_, old_stop)) = running.insert(a.job, (info, stop)) {
                old_stop.send_replace(true);
            }
            drop(running);
            let (job, fence) = (a.job, a.fence);
            events.event(job, fence, RunnerEvent::Started { at_ms: now_ms() });
            let table = Arc::clone(&self.running);
            tokio::spawn(async move {
                let outcome = tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(run_ms)) => Outcome::Succeeded,
                    _ = stopped.wait_for(|s| *s) => Outcome::Failed(FailureClass::Cancelled),
                };
                {
                    let mut table = table.lock().unwrap();
                    if table.get(&job).is_some_and(|(i, _)| i.fence == fence) {
                        table.remove(&job);
                    }
                }
                events.event(
                    job,
                    fence,
                    RunnerEvent::Finished {
                        outcome,
                        at_ms: now_ms(),
                    },
                );
            });
            Ok(())
        })
    }

    fn cancel(&self, job: JobId, fence: Fence) -> BoxFuture<'_, Result<(), RunnerError>> {
        let mut running = self.running.lock().unwrap();
        if running.get(&job).is_some_and(|(i, _)| i.fence == fence) {
            let (_, stop) = running.remove(&job).expect("checked");
            stop.send_replace(true);
        }
        Box::pin(async { Ok(()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, RunnerError>> {
        let infos = self
            .running
            .lock()
            .unwrap()
            .values()
            .map(|(i, _)| i.clone())
            .collect();
        Box::pin(async { Ok(infos) })
    }

    fn api_budget(&self) -> Option<u32> {
        self.budget
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        *self.closed.lock().unwrap() = true;
        for (_, (_, stop)) in self.running.lock().unwrap().drain() {
            stop.send_replace(true);
        }
        Box::pin(async {})
    }
}

fn agent(c: &Cluster, cell: &str, federator: String, backend: Arc<TimerBackend>) -> Agent {
    let mut config = AgentConfig::new(
        CellId::new(cell).unwrap(),
        vec![federator],
        AgentAuth::Token(CELL_TOKEN.into()),
        c.logs_dir(),
    );
    config.pools = BTreeMap::from([("default".to_owned(), 600)]);
    config.reap_interval = Duration::from_millis(500);
    config.max_backoff = Duration::from_millis(300);
    Agent::start(config, backend)
}

async fn cells(c: &Cluster) -> BTreeMap<String, Value> {
    let (status, v) = c.get("/api/v1/cells", ADMIN).await;
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|cell| (cell["id"].as_str().unwrap().to_owned(), cell.clone()))
        .collect()
}

async fn wait_connected(c: &Cluster, ids: &[&str]) {
    for _ in 0..200 {
        let all = cells(c).await;
        if ids
            .iter()
            .all(|id| all.get(*id).is_some_and(|v| v["connected"] == true))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cells {ids:?} never connected");
}

async fn set_state(c: &Cluster, cell: &str, action: &str, body: Value) -> Value {
    let (status, v) = c
        .post(&format!("/api/v1/cells/{cell}/{action}"), ADMIN, body)
        .await;
    assert_eq!(status, 200, "{action} {cell}: {v}");
    v
}

/// A pipeline of `short` jobs that run `short_ms` and `long` jobs that run `long_ms` with
/// `long_infra` infra retries.
fn pipeline(short: usize, short_ms: u64, long: usize, long_ms: u64, long_infra: u32) -> String {
    let list = |n: usize| {
        (1..=n)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut yaml = String::from("version: 1\ndefaults: { image: \"debian:12\" }\njobs:\n");
    if short > 0 {
        yaml.push_str(&format!(
            "  short: {{ run: \"true\", env: {{ RUN_MS: \"{short_ms}\" }}, matrix: {{ i: [{}] }} }}\n",
            list(short)
        ));
    }
    if long > 0 {
        yaml.push_str(&format!(
            "  long: {{ run: \"true\", env: {{ RUN_MS: \"{long_ms}\" }}, retry: {{ infra: {long_infra} }}, matrix: {{ i: [{}] }} }}\n",
            list(long)
        ));
    }
    yaml
}

async fn build(c: &Cluster, dir: &std::path::Path, yaml: &str) -> String {
    let repo = GitRepo::new(dir);
    let sha = repo.commit("main", &[(".ci.yaml", yaml)]);
    c.project("web", &repo.url(), "github").await;
    push(c, "d-1", &sha).await
}

/// Another push of `sha` (a new delivery, so a new build); waits until it is loaded.
async fn push(c: &Cluster, delivery: &str, sha: &str) -> String {
    let (_, ack) = github_push(c, 0, "web", delivery, &push_payload("main", sha))
        .await
        .unwrap();
    let id = ack["build_id"].as_str().unwrap().to_owned();
    c.loaded_build(&id).await;
    id
}

async fn jobs(c: &Cluster, build: &str) -> Vec<Value> {
    let (_, b) = c.get(&format!("/api/v1/builds/{build}"), ADMIN).await;
    b["jobs"].as_array().cloned().unwrap_or_default()
}

/// Waits until `check` holds for the build's jobs; returns them.
async fn jobs_until(
    c: &Cluster,
    build: &str,
    within: Duration,
    what: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let js = jobs(c, build).await;
        if check(&js) {
            return js;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}; jobs: {}",
            summary(&js)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Counts jobs by (status, cell, attempt), for failure messages.
fn summary(js: &[Value]) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for j in js {
        *by.entry(format!(
            "{} on {} attempt {}",
            j["status"], j["cell"], j["attempt"]
        ))
        .or_default() += 1;
    }
    format!("{by:?}")
}

fn on(js: &[Value], status: &str, cell: &str) -> usize {
    js.iter()
        .filter(|j| j["status"] == status && j["cell"] == cell)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_cell_with_50_running_jobs_has_them_all_running_elsewhere_within_its_lease_and_5_s()
{
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(c.cells_addr(0)).await;
    let (a_backend, b_backend) = (
        Arc::new(TimerBackend::default()),
        Arc::new(TimerBackend::default()),
    );
    let a = agent(&c, "cell-a", proxy.addr.clone(), a_backend.clone());
    let b = agent(&c, "cell-b", c.cells_addr(0), b_backend.clone());
    wait_connected(&c, &["cell-a", "cell-b"]).await;
    // Everything starts on cell-a.
    set_state(&c, "cell-b", "cordon", json!({})).await;
    let id = build(&c, dir.path(), &pipeline(0, 0, 50, 600_000, 2)).await;
    jobs_until(
        &c,
        &id,
        Duration::from_secs(20),
        "50 jobs running on cell-a",
        |js| on(js, "running", "cell-a") == 50,
    )
    .await;
    set_state(&c, "cell-b", "uncordon", json!({})).await;

    // cell-a is cut off: heartbeats stop, its lease (3 × 200 ms + 1 s) runs out.
    proxy.cut();
    let cut = Instant::now();
    let js = jobs_until(
        &c,
        &id,
        Duration::from_millis(600 + 1_000 + 5_000),
        "all 50 running on cell-b",
        |js| on(js, "running", "cell-b") == 50,
    )
    .await;
    assert!(
        cut.elapsed() < Duration::from_secs(7),
        "took {:?}",
        cut.elapsed()
    );
    // One live attempt each: the federator holds every job on cell-b, attempt 2.
    assert!(
        js.iter()
            .all(|j| j["cell"] == "cell-b" && j["attempt"] == 2),
        "{}",
        summary(&js)
    );
    assert_eq!(b_backend.count(), 50);
    // When cell-a comes back it is told its attempts are no longer its own, and kills them.
    proxy.heal();
    let back = Instant::now();
    while a_backend.count() > 0 {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "cell-a still runs {} revoked attempts",
            a_backend.count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = c
        .post(&format!("/api/v1/builds/{id}/cancel"), ADMIN, json!({}))
        .await;
    assert_eq!(status, 200);
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_cell_with_500_running_jobs_places_nothing_new_there_lets_jobs_finish_and_moves_the_rest_at_the_deadline()
 {
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let (a_backend, b_backend) = (
        Arc::new(TimerBackend::default()),
        Arc::new(TimerBackend::default()),
    );
    let a = agent(&c, "cell-a", c.cells_addr(0), a_backend.clone());
    let b = agent(&c, "cell-b", c.cells_addr(0), b_backend.clone());
    wait_connected(&c, &["cell-a", "cell-b"]).await;
    set_state(&c, "cell-b", "cordon", json!({})).await;
    // 250 jobs end 6 s after they start, 250 would run for 10 minutes and have no infra
    // retries: only a drain (which costs none) can move them without failing them.
    let id = build(&c, dir.path(), &pipeline(250, 6_000, 250, 600_000, 0)).await;
    jobs_until(
        &c,
        &id,
        Duration::from_secs(30),
        "500 jobs running on cell-a",
        |js| on(js, "running", "cell-a") == 500,
    )
    .await;
    set_state(&c, "cell-b", "uncordon", json!({})).await;

    // Drain cell-a with a deadline after the short jobs end.
    let drained = set_state(&c, "cell-a", "drain", json!({ "deadline": "9s" })).await;
    assert_eq!(drained["state"], "draining");
    let acked = Instant::now();
    // New work arrives while cell-b is cordoned too: it must wait, not land on cell-a.
    set_state(&c, "cell-b", "cordon", json!({})).await;
    let sha = c.get(&format!("/api/v1/builds/{id}"), ADMIN).await.1["sha"]
        .as_str()
        .unwrap()
        .to_owned();
    let later = push(&c, "d-2", &sha).await;
    let mut seen_a = usize::MAX;
    while acked.elapsed() < Duration::from_secs(3) {
        let on_a = cells(&c).await["cell-a"]["jobs"].as_u64().unwrap() as usize;
        assert!(on_a <= seen_a, "a job was placed on the draining cell");
        seen_a = on_a;
        let waiting = jobs(&c, &later).await;
        assert!(
            waiting.iter().all(|j| j["status"] == "queued"),
            "new work went somewhere: {}",
            summary(&waiting)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    set_state(&c, "cell-b", "uncordon", json!({})).await;
    // Until the deadline the drained cell only loses jobs.
    while acked.elapsed() < Duration::from_secs(7) {
        let on_a = cells(&c).await["cell-a"]["jobs"].as_u64().unwrap() as usize;
        assert!(on_a <= seen_a, "a job was placed on the draining cell");
        seen_a = on_a;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let later_jobs = jobs(&c, &later).await;
    assert!(
        later_jobs.iter().all(|j| j["cell"] != "cell-a"),
        "{}",
        summary(&later_jobs)
    );
    let js = jobs(&c, &id).await;
    assert_eq!(
        js.iter()
            .filter(|j| j["name"].as_str().unwrap().starts_with("short")
                && j["status"] == "succeeded"
                && j["attempt"] == 1)
            .count(),
        250,
        "the jobs that finish before the deadline are not disturbed: {}",
        summary(&js)
    );
    assert_eq!(on(&js, "running", "cell-a"), 250, "{}", summary(&js));
    // At the deadline the rest moves to cell-b as new attempts.
    let js = jobs_until(
        &c,
        &id,
        Duration::from_secs(15),
        "the 250 long jobs running on cell-b",
        |js| on(js, "running", "cell-b") == 250,
    )
    .await;
    let long: Vec<&Value> = js
        .iter()
        .filter(|j| j["name"].as_str().unwrap().starts_with("long"))
        .collect();
    assert_eq!(long.len(), 250);
    assert!(long.iter().all(|j| j["attempt"] == 2), "{}", summary(&js));

    // 0 lost: every one of the 500 is either done or running.
    assert_eq!(
        js.iter()
            .filter(|j| j["status"] == "succeeded" || j["status"] == "running")
            .count(),
        500
    );
    let cell_a = &cells(&c).await["cell-a"];
    assert_eq!(cell_a["state"], "cordoned", "{cell_a}");
    assert_eq!(cell_a["jobs"], 0);
    for b in [&id, &later] {
        let (status, _) = c
            .post(&format!("/api/v1/builds/{b}/cancel"), ADMIN, json!({}))
            .await;
        assert_eq!(status, 200);
    }
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cells_api_budget_paces_its_pods_from_the_moment_it_connects() {
    let c = Cluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    // 60 jobs wait for a cell before any connects.
    let id = build(&c, dir.path(), &pipeline(0, 0, 60, 600_000, 0)).await;
    let backend = Arc::new(TimerBackend {
        budget: Some(10),
        ..TimerBackend::default()
    });
    let a = agent(&c, "cell-a", c.cells_addr(0), backend.clone());
    // From its first tick the cell gets at most a second's worth (10), then 10 a second:
    // a new session must not open the floodgates until its first heartbeat.
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let js = jobs(&c, &id).await;
        let placed = js.iter().filter(|j| j["cell"] == "cell-a").count();
        if placed > 0 {
            let since = first.get_or_insert_with(Instant::now).elapsed();
            // `since` starts when the test first saw a placement, up to a poll (and a
            // loaded machine's delay) after the first one: room for 8 more.
            let allowed = 10 + (10.0 * since.as_secs_f64()).floor() as usize + 8;
            assert!(
                placed <= allowed,
                "{placed} placed {since:?} after the first, budget allows {allowed}: {}",
                summary(&js)
            );
        }
        if placed == 60 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all placed: {}",
            summary(&js)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = first.unwrap().elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "60 jobs at 10/s after a burst of 10 take about 5 s, not {took:?}"
    );
    assert_eq!(backend.count(), 60);
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_cell_that_drops_out_comes_back_cordoned() {
    let c = Cluster::start(1).await;
    let proxy = Proxy::start(c.cells_addr(0)).await;
    let a = agent(
        &c,
        "cell-a",
        proxy.addr.clone(),
        Arc::new(TimerBackend::default()),
    );
    wait_connected(&c, &["cell-a"]).await;
    set_state(&c, "cell-a", "cordon", json!({})).await;
    proxy.cut();
    let cut = Instant::now();
    loop {
        let cell = &cells(&c).await["cell-a"];
        if cell["state"] == "lost" {
            assert_eq!(cell["returns_as"], "cordoned", "{cell}");
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "never lost: {cell}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Well past another lease: the monitor must not expire it again and lose the cordon.
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.heal();
    let back = Instant::now();
    loop {
        let cell = &cells(&c).await["cell-a"];
        if cell["connected"] == true && cell["state"] != "lost" {
            assert_eq!(cell["state"], "cordoned", "{cell}");
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "never back: {cell}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_admin_token_for_every_project_may_cordon_drain_or_uncordon_a_cell() {
    let c = Cluster::start(1).await;
    let a = agent(
        &c,
        "cell-a",
        c.cells_addr(0),
        Arc::new(TimerBackend::default()),
    );
    wait_connected(&c, &["cell-a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(dir.path());
    c.project("web", &repo.url(), "github").await;
    let mut tokens = Vec::new();
    for (project, scope) in [(json!("web"), "admin"), (json!(null), "write")] {
        let (s, v) = c
            .post(
                "/api/v1/tokens",
                ADMIN,
                json!({"project": project, "scope": scope}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        tokens.push(v["token"].as_str().unwrap().to_owned());
    }
    for token in &tokens {
        for (action, body) in [
            ("cordon", json!({})),
            ("uncordon", json!({})),
            ("drain", json!({"deadline": "1m"})),
        ] {
            let (s, v) = c
                .post(&format!("/api/v1/cells/cell-a/{action}"), token, body)
                .await;
            assert_eq!(s, 403, "{action}: {v}");
        }
    }
    // A project's token does not even see the cells; the refusals changed nothing.
    let (s, _) = c.get("/api/v1/cells", &tokens[0]).await;
    assert_eq!(s, 403);
    assert_eq!(cells(&c).await["cell-a"]["state"], "active");
    a.shutdown().await;
    c.shutdown().await;
}
