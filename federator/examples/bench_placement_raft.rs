//! Placement benchmark (issue: Placement), through Raft: a 3-replica federator cluster on
//! loopback (redb, fsync on), 100 cells, 500 projects in 100 tenant groups, 50,000 queued and
//! 5,000 leased jobs with region, label and pool constraints. The leader's own scheduler is
//! idle (no agent is connected); this program plays its loop — `core::placement::schedule`
//! on the leader's state, then one `PlaceJobs` entry per batch, committed by all replicas —
//! as if every cell were connected. Prints:
//!
//! 1. committed placement decisions per second while placing the 50,000 queued jobs, and the
//!    p50/p99 of one tick of the pure scheduler on the live state;
//! 2. a burst: one push of a 5,000-job pipeline, timed from the push's commit to the last of
//!    its 5,000 placements being durable (the pipeline is loaded by the federator itself from
//!    an in-memory repository, so loading is part of the time).
//!
//! Targets (the Placement issue): ≥ 10,000 committed decisions/s; p99 tick ≤ 5 ms; a burst of
//! 5,000 durable in ≤ 1 s.
//!
//! Run: `scripts/bench-placement.sh` (release build). `--quick` runs a tenth of the load.

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_core::forge::{ForgeEvent, Provider};
use flotilla_core::ids::{CellId, ProjectId};
use flotilla_core::job::JobPhase;
use flotilla_core::placement::{LiveCell, Scheduler, Snapshot};
use flotilla_core::repo::{BoxFuture, FetchedFile, RepoError, RepoLocation, RepoSource, Revision};
use flotilla_core::state::{CellSpec, Command, Entry, ProjectSpec, Response};
use flotilla_federator::clock::SystemClock;
use flotilla_federator::config::FederatorConfig;
use flotilla_federator::service::{Deps, Federator, Listeners};
use tokio::net::TcpListener;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
/// Decisions per `PlaceJobs` entry, as the federator's scheduler batches them.
const BATCH: usize = 512;

/// Pipelines by clone URL.
#[derive(Debug, Default)]
struct MemoryRepo {
    files: Mutex<HashMap<String, String>>,
}

impl RepoSource for MemoryRepo {
    fn read_file<'a>(
        &'a self,
        repo: &'a RepoLocation,
        rev: &'a Revision,
        _path: &'a str,
    ) -> BoxFuture<'a, Result<FetchedFile, RepoError>> {
        let contents = self.files.lock().unwrap().get(&repo.url).cloned();
        Box::pin(async move {
            Ok(FetchedFile {
                sha: rev.sha.clone().unwrap_or_else(|| SHA.into()),
                contents: contents.map(String::into_bytes),
            })
        })
    }
}

/// A pipeline of `n` jobs in matrix groups of at most 250; every tenth group asks for a
/// region, a label or the `large` pool.
fn pipeline(n: usize, salt: usize) -> String {
    let mut yaml = String::from("version: 1\ndefaults: { image: \"debian:12\" }\njobs:\n");
    let mut left = n;
    let mut g = 0;
    while left > 0 {
        let size = left.min(250);
        let values: Vec<String> = (1..=size).map(|i| i.to_string()).collect();
        let placement = match (g + salt) % 10 {
            0 => format!(", placement: {{ region: \"region-{}\" }}", (g + salt) % 5),
            1 => ", placement: { labels: { arch: arm64 } }".to_owned(),
            2 => ", placement: { pool: large }".to_owned(),
            _ => String::new(),
        };
        yaml.push_str(&format!(
            "  g{g}: {{ run: \"make\", matrix: {{ i: [{}] }}{placement} }}\n",
            values.join(", ")
        ));
        left -= size;
        g += 1;
    }
    yaml
}

async fn cluster(dir: &std::path::Path, repo: Arc<MemoryRepo>) -> Vec<Federator> {
    let mut addrs = Vec::new();
    for _ in 0..3 {
        addrs.push((
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ));
    }
    let members: BTreeMap<u64, String> = addrs
        .iter()
        .enumerate()
        .map(|(i, (r, _))| (i as u64 + 1, r.local_addr().unwrap().to_string()))
        .collect();
    let mut starting = Vec::new();
    for (i, (raft, http)) in addrs.into_iter().enumerate() {
        let id = i as u64 + 1;
        let mut c = FederatorConfig::new(id, dir.join(format!("r{id}")));
        c.raft_listen = raft.local_addr().unwrap();
        c.http_listen = http.local_addr().unwrap();
        c.cluster.initial_members = members.clone();
        // No agent heartbeats here: keep the cells from being declared lost meanwhile.
        c.cells.grace = Duration::from_secs(3600);
        let deps = Deps {
            clock: Arc::new(SystemClock),
            repos: repo.clone(),
            tls: None,
            cell_tls: None,
        };
        starting.push(tokio::spawn(Federator::start(
            c,
            Listeners {
                raft,
                http,
                cells: None,
            },
            deps,
        )));
    }
    let mut feds = Vec::new();
    for s in starting {
        feds.push(s.await.unwrap().unwrap());
    }
    feds
}

fn leader(feds: &[Federator]) -> &Federator {
    loop {
        if let Some(l) = feds
            .iter()
            .find(|f| f.node().metrics().current_leader == Some(f.node().id()))
        {
            return l;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn propose(fed: &Federator, c: Command) -> Response {
    fed.node().propose(Entry::V1(c)).await.expect("commit")
}

fn queued(fed: &Federator) -> usize {
    fed.node().read(|m| m.state().queued_jobs().count())
}

/// Places every queued job (through Raft, a batch per entry) until none is left or none
/// fits; returns (decisions, elapsed, tick latencies in µs).
async fn place_all(
    fed: &Federator,
    scheduler: &mut Scheduler,
    live: &[LiveCell],
    stop_at: usize,
) -> (usize, Duration, Vec<u64>) {
    let start = Instant::now();
    let mut placed = 0;
    let mut ticks = Vec::new();
    while placed < stop_at {
        let now = now_ms();
        let (placements, took) = fed.node().read(|m| {
            let t = Instant::now();
            let s = scheduler.schedule(&Snapshot {
                state: m.state(),
                live,
                now_ms: now,
                lease_ttl_ms: 3_600_000,
                limit: BATCH.min(stop_at - placed),
            });
            (s.placements, t.elapsed())
        });
        ticks.push(took.as_micros() as u64);
        if placements.is_empty() {
            let (unplaceable, waiting) = fed.node().read(|m| {
                let w = scheduler
                    .schedule(&Snapshot {
                        state: m.state(),
                        live,
                        now_ms: now,
                        lease_ttl_ms: 3_600_000,
                        limit: 1,
                    })
                    .waiting;
                (w.unplaceable.len(), w.no_capacity)
            });
            println!(
                "  (stopped: nothing more fits; {unplaceable} queued jobs match no cell, {waiting} wait for room)"
            );
            break;
        }
        placed += placements.len();
        propose(
            fed,
            Command::PlaceJobs {
                placements,
                now_ms: now,
            },
        )
        .await;
    }
    (placed, start.elapsed(), ticks)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let (cells_n, projects_n, per_project) = (100, 500 / scale, 110);
    let queued_target = 50_000 / scale;
    let running_target = 5_000 / scale;
    let burst = 5_000 / scale;

    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(MemoryRepo::default());
    let feds = cluster(dir.path(), repo.clone()).await;
    let fed = leader(&feds);
    println!("3 replicas on loopback, leader {}", fed.node().id());

    // 100 cells in 5 regions, a fifth of them arm64, each with a default and a large pool.
    let mut live = Vec::new();
    for i in 0..cells_n {
        let id = CellId::new(format!("cell-{i:03}")).unwrap();
        let arch = if i % 5 == 0 { "arm64" } else { "amd64" };
        propose(
            fed,
            Command::RegisterCell {
                spec: CellSpec {
                    id: id.clone(),
                    region: format!("region-{}", i % 5),
                    labels: BTreeMap::from([("arch".to_owned(), arch.to_owned())]),
                    pools: BTreeMap::from([
                        ("default".to_owned(), 1000),
                        ("large".to_owned(), 150),
                    ]),
                    agent_version: "bench".into(),
                },
                now_ms: now_ms(),
            },
        )
        .await;
        live.push(LiveCell { id, budget: None });
    }

    // 500 projects in 100 tenant groups with weights 1–3, each pushing 110 jobs.
    let t = Instant::now();
    let mut pushes = Vec::new();
    for p in 0..projects_n {
        let url = format!("mem://project-{p}");
        repo.files
            .lock()
            .unwrap()
            .insert(url.clone(), pipeline(per_project, p));
        let id = ProjectId::new(format!("project-{p}")).unwrap();
        propose(
            fed,
            Command::CreateProject {
                spec: ProjectSpec {
                    id: id.clone(),
                    repo_url: url,
                    provider: Provider::Git,
                    webhook_secret: "bench".into(),
                    pipeline_path: ".ci.yaml".into(),
                    tenant: Some(format!("tenant-{}", p % 100)),
                    weight: 1 + (p % 3) as u32,
                },
                now_ms: now_ms(),
            },
        )
        .await;
        pushes.push(id);
    }
    let mut ingesting = tokio::task::JoinSet::new();
    for id in pushes {
        let node = fed.node().clone();
        ingesting.spawn(async move {
            node.propose(Entry::V1(Command::IngestEvent {
                project: id,
                delivery: None,
                event: ForgeEvent::Push {
                    branch: "main".into(),
                    sha: SHA.into(),
                    changed_paths: None,
                    actor: "bench".into(),
                },
                now_ms: now_ms(),
            }))
            .await
            .expect("commit")
        });
    }
    while ingesting.join_next().await.is_some() {}
    let total = projects_n * per_project;
    while queued(fed) < total {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "setup: {cells_n} cells, {projects_n} projects in {} tenants, {total} jobs loaded and queued in {:.1} s",
        projects_n.min(100),
        t.elapsed().as_secs_f64()
    );

    // The leader's scheduler keeps what it learnt about jobs between ticks, as here.
    let mut scheduler = Scheduler::new();
    // 5,000 of them go out first (leased, occupying runners), then the rest is measured.
    let (pre, _, _) = place_all(fed, &mut scheduler, &live, running_target).await;
    assert_eq!(pre, running_target);
    println!("{pre} jobs leased; {} queued", queued(fed));
    let (placed, took, mut ticks) = place_all(fed, &mut scheduler, &live, queued_target).await;
    ticks.sort_unstable();
    let rate = placed as f64 / took.as_secs_f64();
    println!("\n== committed placement decisions ==");
    println!(
        "{placed} decisions in {:.2} s through Raft ({} entries of ≤ {BATCH}): {rate:.0} decisions/s  (target ≥ 10,000/s: {:.2}×)",
        took.as_secs_f64(),
        ticks.len(),
        rate / 10_000.0
    );
    println!(
        "pure scheduler tick on the live state (≤ {BATCH} decisions each, {} ticks): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms  (target p99 ≤ 5 ms: {:.2}×)",
        ticks.len(),
        pct(&ticks, 0.5),
        pct(&ticks, 0.99),
        pct(&ticks, 1.0),
        5.0 / pct(&ticks, 0.99)
    );

    // The burst: one push of a 5,000-job pipeline.
    let url = "mem://monorepo".to_owned();
    repo.files
        .lock()
        .unwrap()
        .insert(url.clone(), pipeline(burst, 3));
    let mono = ProjectId::new("monorepo").unwrap();
    propose(
        fed,
        Command::CreateProject {
            spec: ProjectSpec {
                id: mono.clone(),
                repo_url: url,
                provider: Provider::Git,
                webhook_secret: "bench".into(),
                pipeline_path: ".ci.yaml".into(),
                tenant: None,
                weight: 1,
            },
            now_ms: now_ms(),
        },
    )
    .await;
    let before = queued(fed);
    let t = Instant::now();
    let build = match propose(
        fed,
        Command::IngestEvent {
            project: mono,
            delivery: None,
            event: ForgeEvent::Push {
                branch: "main".into(),
                sha: SHA.into(),
                changed_paths: None,
                actor: "bench".into(),
            },
            now_ms: now_ms(),
        },
    )
    .await
    {
        Response::Ingested { build, .. } => build,
        other => panic!("{other:?}"),
    };
    let acked = t.elapsed();
    while fed.node().read(|m| {
        m.state()
            .builds
            .get(&build)
            .is_none_or(|b| b.jobs.is_empty())
    }) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let loaded = t.elapsed();
    let (placed, _, _) = place_all(fed, &mut scheduler, &live, before + burst).await;
    let durable = t.elapsed();
    let burst_out = fed.node().read(|m| {
        let s = m.state();
        s.builds[&build]
            .jobs
            .iter()
            .filter(|j| s.jobs[j].phase() == JobPhase::Leased)
            .count()
    });
    println!("\n== burst: one push of {burst} jobs ==");
    println!(
        "push committed {:.0} ms, pipeline loaded and {burst} jobs queued {:.0} ms, all {burst_out} of them placed and durable {:.0} ms ({placed} decisions in that pass)  (target ≤ 1,000 ms: {:.2}×)",
        acked.as_secs_f64() * 1000.0,
        loaded.as_secs_f64() * 1000.0,
        durable.as_secs_f64() * 1000.0,
        1.0 / durable.as_secs_f64()
    );
    for f in feds {
        f.shutdown().await;
    }
}
