//! Webhook intake benchmark (issue: Federator): signed GitHub `push` deliveries against a
//! 3-replica federator cluster on loopback, each with its own redb data directory, fsync on.
//!
//! 1. Open loop at a fixed rate (default 1,200/s, 100× the design peak of 12/s): requests are
//!    sent on a schedule whatever the latency, and each latency is measured from its scheduled
//!    time, so a stall is not hidden (no coordinated omission). Prints p50/p99/max ack latency.
//! 2. Open loop to saturation: the offered rate steps up until the cluster acknowledges less
//!    than 95% of it (or errors appear); prints the highest rate sustained.
//!
//! Requests go to all three replicas in turn, so two thirds are forwarded to the leader, as
//! behind a load balancer (`--leader-only` sends everything to the leader). Pipelines are read from an in-memory repository by default (this
//! measures intake, not git); `--git` reads them from a real bare repository instead.
//!
//! Run: `cargo run --release -p flotilla-federator --example bench_webhooks -- --help`

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::disallowed_methods)]

/// The same allocator as the `flotilla` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::repo::{BoxFuture, FetchedFile, RepoError, RepoLocation, RepoSource, Revision};
use flotilla_federator::clock::SystemClock;
use flotilla_federator::config::FederatorConfig;
use flotilla_federator::repo::{RepoConfig, RoutedSource};
use flotilla_federator::service::{Deps, Federator, Listeners};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;

const ADMIN: &str = "flt_bench_admin";
const SECRET: &str = "bench-webhook-secret";
const PIPELINE: &str = "version: 1\ndefaults: { image: 'debian:12' }\njobs:\n  build: { run: make }\n  test: { run: make test, needs: [build] }\n";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Debug)]
struct MemoryRepo;

impl RepoSource for MemoryRepo {
    fn read_file<'a>(
        &'a self,
        _repo: &'a RepoLocation,
        rev: &'a Revision,
        _path: &'a str,
    ) -> BoxFuture<'a, Result<FetchedFile, RepoError>> {
        Box::pin(async move {
            Ok(FetchedFile {
                sha: rev.sha.clone().unwrap_or_else(|| SHA.into()),
                contents: Some(PIPELINE.as_bytes().to_vec()),
            })
        })
    }
}

struct Opts {
    rate: u64,
    secs: u64,
    start_rate: u64,
    step: u64,
    git: bool,
    leader_only: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        rate: 1200,
        secs: 10,
        start_rate: 2000,
        step: 1000,
        git: false,
        leader_only: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| -> u64 {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--rate" => o.rate = val(i),
            "--secs" => o.secs = val(i),
            "--start-rate" => o.start_rate = val(i),
            "--step" => o.step = val(i),
            "--git" => {
                o.git = true;
                i += 1;
                continue;
            }
            "--leader-only" => {
                o.leader_only = true;
                i += 1;
                continue;
            }
            "--help" | "-h" => {
                println!(
                    "bench_webhooks [--rate N (1200)] [--secs S (10)] [--start-rate N (2000)] [--step N (1000)] [--git] [--leader-only]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}; see --help"),
        }
        i += 2;
    }
    o
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn payload(n: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ref": "refs/heads/main", "before": SHA, "after": SHA, "deleted": false,
        "pusher": {"name": format!("dev{}", n % 100)}, "sender": {"login": "dev"},
        "commits": [{"id": SHA, "added": [], "modified": ["src/lib.rs"], "removed": []}],
        "head_commit": {"id": SHA}
    }))
    .unwrap()
}

async fn start_cluster(
    dir: &std::path::Path,
    git_url: Option<String>,
) -> (Vec<Federator>, Vec<String>) {
    std::fs::write(dir.join("admin"), ADMIN).unwrap();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let r = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let h = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push((r, h));
    }
    let members: BTreeMap<u64, String> = addrs
        .iter()
        .enumerate()
        .map(|(i, (r, _))| (i as u64 + 1, r.local_addr().unwrap().to_string()))
        .collect();
    let mut feds = Vec::new();
    let mut urls = Vec::new();
    let mut starting = Vec::new();
    for (i, (raft, http)) in addrs.into_iter().enumerate() {
        let id = i as u64 + 1;
        let mut c = FederatorConfig::new(id, dir.join(format!("r{id}")));
        c.raft_listen = raft.local_addr().unwrap();
        c.http_listen = http.local_addr().unwrap();
        c.cluster.initial_members = members.clone();
        c.admin_token_file = Some(dir.join("admin"));
        c.webhook_rate.per_second = 1_000_000;
        c.webhook_rate.burst = 1_000_000;
        urls.push(format!("http://{}", http.local_addr().unwrap()));
        let repos: Arc<dyn RepoSource> = if git_url.is_some() {
            Arc::new(RoutedSource::new(c.data_dir.join("repos"), &RepoConfig::default()).unwrap())
        } else {
            Arc::new(MemoryRepo)
        };
        let deps = Deps {
            clock: Arc::new(SystemClock),
            repos,
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
    for s in starting {
        feds.push(s.await.unwrap().unwrap());
    }
    for _ in 0..200 {
        if feds
            .iter()
            .all(|f| f.node().metrics().current_leader.is_some())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (feds, urls)
}

struct Run {
    sent: u64,
    ok: u64,
    errors: u64,
    latencies_us: Vec<u64>,
    elapsed: Duration,
}

/// Sends `rate` requests per second for `secs` seconds on a fixed schedule.
async fn open_loop(
    client: &reqwest::Client,
    urls: &[String],
    rate: u64,
    secs: u64,
    first: u64,
) -> Run {
    let total = rate * secs;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let due = start + interval * u32::try_from(n).unwrap();
        tokio::time::sleep_until(due).await;
        let client = client.clone();
        let url = format!(
            "{}/webhooks/github/bench",
            urls[(n % urls.len() as u64) as usize]
        );
        tasks.spawn(async move {
            let body = payload(first + n);
            let sig = sign(&body);
            let resp = client
                .post(url)
                .header("x-github-event", "push")
                .header("x-github-delivery", format!("bench-{}", first + n))
                .header("x-hub-signature-256", sig)
                .body(body)
                .send()
                .await;
            let ok = matches!(&resp, Ok(r) if r.status().is_success());
            (ok, due.elapsed())
        });
    }
    let mut run = Run {
        sent: total,
        ok: 0,
        errors: 0,
        latencies_us: Vec::with_capacity(total as usize),
        elapsed: Duration::ZERO,
    };
    while let Some(r) = tasks.join_next().await {
        let (ok, latency) = r.unwrap();
        if ok {
            run.ok += 1;
            run.latencies_us.push(latency.as_micros() as u64);
        } else {
            run.errors += 1;
        }
    }
    run.elapsed = start.elapsed();
    run.latencies_us.sort_unstable();
    run
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let repo_url = if o.git {
            let bare = dir.path().join("origin.git");
            let work = dir.path().join("work");
            let run = |d: &std::path::Path, a: &[&str]| {
                let s = std::process::Command::new("git").current_dir(d)
                    .args(["-c", "user.name=b", "-c", "user.email=b@e"]).args(a).status().unwrap();
                assert!(s.success(), "git {a:?}");
            };
            std::fs::create_dir_all(&bare).unwrap();
            std::fs::create_dir_all(&work).unwrap();
            run(&bare, &["init", "-q", "--bare", "--initial-branch=main", "."]);
            run(&work, &["init", "-q", "--initial-branch=main", "."]);
            std::fs::write(work.join(".ci.yaml"), PIPELINE).unwrap();
            run(&work, &["add", "-A"]);
            run(&work, &["commit", "-q", "-m", "ci"]);
            run(&work, &["push", "-q", bare.to_str().unwrap(), "main"]);
            Some(format!("file://{}", bare.display()))
        } else {
            None
        };
        let (feds, mut urls) = start_cluster(dir.path(), repo_url.clone()).await;
        if o.leader_only {
            let leader = feds[0].node().metrics().current_leader.unwrap_or(1);
            urls = vec![urls[(leader - 1) as usize].clone()];
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let create = client
            .post(format!("{}/api/v1/projects", urls[0]))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&serde_json::json!({
                "name": "bench", "provider": "github", "webhook_secret": SECRET,
                "repo_url": repo_url.unwrap_or_else(|| "https://github.com/acme/bench.git".into()),
            })).unwrap())
            .send()
            .await
            .unwrap();
        assert!(create.status().is_success(), "creating the project: {}", create.status());

        // Warm up connections and the leader's caches.
        let _ = open_loop(&client, &urls, 200, 2, 10_000_000).await;

        let fixed = open_loop(&client, &urls, o.rate, o.secs, 0).await;
        let fixed_line = format!(
            "fixed {} req/s for {} s: acked {}/{} (errors {}), ack latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            o.rate, o.secs, fixed.ok, fixed.sent, fixed.errors,
            pct(&fixed.latencies_us, 0.50), pct(&fixed.latencies_us, 0.99),
            pct(&fixed.latencies_us, 1.0)
        );
        println!("{fixed_line}");

        let mut rate = o.start_rate;
        let mut sustained = 0u64;
        let mut next_id = 1_000_000u64;
        loop {
            let secs = 5;
            let r = open_loop(&client, &urls, rate, secs, next_id).await;
            next_id += rate * secs;
            let achieved = r.ok as f64 / r.elapsed.as_secs_f64();
            println!(
                "offered {rate}/s: acked {:.0}/s over {:.1} s (errors {}), p50 {:.2} ms, p99 {:.2} ms",
                achieved, r.elapsed.as_secs_f64(), r.errors,
                pct(&r.latencies_us, 0.50), pct(&r.latencies_us, 0.99)
            );
            if achieved < 0.95 * rate as f64 || r.errors * 100 > r.sent {
                break;
            }
            sustained = rate;
            rate += o.step;
        }
        let p99 = pct(&fixed.latencies_us, 0.99);
        println!(
            "webhooks: p99 {:.2} ms at {}/s (target <= 20 ms, {}) | sustained {}/s (target >= 5000, {})",
            p99, o.rate, if p99 <= 20.0 { "met" } else { "missed" },
            sustained, if sustained >= 5000 { "met" } else { "missed" }
        );
        for f in feds {
            f.shutdown().await;
        }
    });
}
