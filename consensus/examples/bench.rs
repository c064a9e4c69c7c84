//! Commit benchmark: a 3-replica Flotilla cluster against a 3-member etcd cluster, on loopback,
//! each replica with its own data directory on the same disk, fsync on.
//!
//! ```sh
//! cargo run --release -p flotilla-consensus --example bench -- --etcd-bin /usr/bin/etcd
//! ```
//! (`scripts/bench-consensus.sh` installs etcd and runs this.)
//!
//! Both systems get the same load generator over gRPC: a client sends a write to the leader
//! and waits for the commit. Workloads: 1 client writing 10,000 values of 256 B one after
//! another; 256 clients writing 100,000 values between them. Printed: ops/s, p50/p99 latency,
//! entries (and writes) per fsync, the measured cost of one fsync and one loopback round trip,
//! and on the last line the ratios to etcd.
#![allow(clippy::print_stdout, clippy::disallowed_methods, missing_docs)]

/// The same allocator as the `flotilla` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use flotilla_consensus::kv::{KvCommand, KvStore};
use flotilla_consensus::{Node, NodeConfig};
use flotilla_proto::etcd::PutRequest;
use flotilla_proto::etcd::kv_client::KvClient;
use flotilla_proto::raft::ProposeRequest;
use flotilla_proto::raft::admin_service_client::AdminServiceClient;
use tokio::net::TcpListener;
use tonic::transport::Channel;

const VALUE_BYTES: usize = 256;

struct Options {
    etcd_bin: Option<PathBuf>,
    data_dir: PathBuf,
    single_writes: usize,
    clients: usize,
    concurrent_writes: usize,
    early_replication: bool,
}

fn options() -> Options {
    let mut o = Options {
        etcd_bin: None,
        data_dir: std::env::temp_dir().join("flotilla-bench"),
        single_writes: 10_000,
        clients: 256,
        concurrent_writes: 100_000,
        early_replication: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--etcd-bin" => o.etcd_bin = Some(val().into()),
            "--data-dir" => o.data_dir = val().into(),
            "--single-writes" => o.single_writes = val().parse().expect("a number"),
            "--clients" => o.clients = val().parse().expect("a number"),
            "--concurrent-writes" => o.concurrent_writes = val().parse().expect("a number"),
            "--no-early-replication" => o.early_replication = false,
            "-h" | "--help" => {
                println!(
                    "bench [--etcd-bin PATH] [--data-dir DIR] [--single-writes N] [--clients N] [--concurrent-writes N] [--no-early-replication]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}; see --help"),
        }
    }
    o
}

/// Latencies and throughput of one workload.
struct Result {
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

impl Result {
    fn show(&self) -> String {
        format!(
            "{:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms",
            self.ops_per_sec,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3
        )
    }
}

type Put = Arc<dyn Fn(usize, Vec<u8>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Runs `writes` writes from `clients` concurrent clients through `put`.
async fn drive(put: Put, clients: usize, writes: usize) -> Result {
    let per_client = writes / clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let put = put.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let value = vec![(i % 251) as u8; VALUE_BYTES];
                let t = Instant::now();
                put(c * per_client + i, value).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(writes);
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let elapsed = start.elapsed();
    all.sort();
    Result {
        ops_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: all[all.len() / 2],
        p99: all[all.len() * 99 / 100],
    }
}

/// Channels shared round-robin by the clients, as applications share connections.
async fn channels(addr: &str, n: usize) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect"),
        );
    }
    out
}

fn flotilla_put(chans: Vec<Channel>) -> Put {
    Arc::new(move |i, value| {
        let mut client = AdminServiceClient::new(chans[i % chans.len()].clone());
        Box::pin(async move {
            let command = postcard::to_stdvec(&KvCommand::Put {
                key: format!("key-{i}"),
                value,
            })
            .unwrap();
            client
                .propose(ProposeRequest { command })
                .await
                .expect("flotilla write");
        })
    })
}

fn etcd_put(chans: Vec<Channel>) -> Put {
    Arc::new(move |i, value| {
        let mut client = KvClient::new(chans[i % chans.len()].clone());
        Box::pin(async move {
            client
                .put(PutRequest {
                    key: format!("key-{i}").into_bytes(),
                    value,
                    ..Default::default()
                })
                .await
                .expect("etcd write");
        })
    })
}

/// Median cost of one `write + fdatasync` of 4 KiB on the benchmark's disk.
fn measure_fsync(dir: &Path) -> Duration {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&[7u8; 4096]).unwrap();
        f.sync_data().unwrap();
        times.push(t.elapsed());
    }
    let _ = std::fs::remove_file(path);
    times.sort();
    times[times.len() / 2]
}

/// Median loopback TCP round trip for a small message.
fn measure_rtt() -> Duration {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut times = Vec::new();
    let mut b = [1u8; 64];
    for _ in 0..2000 {
        let t = Instant::now();
        s.write_all(&b).unwrap();
        s.read_exact(&mut b).unwrap();
        times.push(t.elapsed());
    }
    drop(s);
    let _ = echo.join();
    times.sort();
    times[times.len() / 2]
}

struct Flotilla {
    nodes: Vec<Arc<Node<KvStore>>>,
    leader_addr: String,
}

async fn start_flotilla(dir: &Path, early_replication: bool) -> Flotilla {
    let mut nodes = Vec::new();
    let mut members = BTreeMap::new();
    let mut listeners = Vec::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        members.insert(id, l.local_addr().unwrap().to_string());
        listeners.push(l);
    }
    for (id, l) in (1..=3u64).zip(listeners) {
        let mut cfg = NodeConfig::new(id, dir.join(format!("flotilla-{id}")), members[&id].clone());
        cfg.early_replication = early_replication;
        nodes.push(Arc::new(
            Node::start(cfg, l, KvStore::default()).await.unwrap(),
        ));
    }
    nodes[0].bootstrap(members.clone()).await.unwrap();
    let leader = nodes[0]
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    Flotilla {
        nodes,
        leader_addr: members[&leader].clone(),
    }
}

/// A 3-member etcd cluster on loopback; killed when dropped.
struct Etcd {
    children: Vec<Child>,
    client_addrs: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_etcd(bin: &Path, dir: &Path) -> Etcd {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut children = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let data = dir.join(format!("etcd-{i}"));
        let log = std::fs::File::create(dir.join(format!("etcd-{i}.log"))).unwrap();
        children.push(
            Command::new(bin)
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(&data)
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "flotilla-bench"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start etcd"),
        );
    }
    Etcd {
        children,
        client_addrs: ports
            .iter()
            .map(|(c, _)| format!("127.0.0.1:{c}"))
            .collect(),
    }
}

/// `etcd_disk_wal_fsync_duration_seconds_count` from one member's /metrics.
fn etcd_wal_fsyncs(addr: &str) -> Option<u64> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with("etcd_disk_wal_fsync_duration_seconds_count"))?
        .split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

/// The client address of the etcd leader, once the cluster is up and takes writes.
async fn etcd_leader(e: &Etcd) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(addr) = leader_by_metrics(e)
            && let Ok(ch) = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
        {
            let probe = PutRequest {
                key: b"probe".to_vec(),
                value: b"x".to_vec(),
                ..Default::default()
            };
            if KvClient::new(ch).put(probe).await.is_ok() {
                return addr;
            }
        }
        assert!(
            Instant::now() < deadline,
            "etcd did not start; see etcd-*.log in the data dir"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The member whose /metrics says `etcd_server_is_leader 1`.
fn leader_by_metrics(e: &Etcd) -> Option<String> {
    e.client_addrs.iter().find_map(|addr| {
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.lines()
            .any(|l| l.trim() == "etcd_server_is_leader 1")
            .then(|| addr.clone())
    })
}

/// Prints one system's two workloads.
fn report(system: &str, p: &Pair, o: &Options, fsync_kind: &str) {
    println!(
        "{system:<9} 1 client,  {} writes: {}; {:.2} writes per {fsync_kind}",
        o.single_writes,
        p.single.show(),
        o.single_writes as f64 / p.fsyncs.0.max(1) as f64
    );
    println!(
        "{system:<8} {} clients, {} writes: {}; {:.1} writes per {fsync_kind}",
        o.clients,
        o.concurrent_writes,
        p.many.show(),
        o.concurrent_writes as f64 / p.fsyncs.1.max(1) as f64
    );
}

struct Pair {
    single: Result,
    many: Result,
    fsyncs: (u64, u64),
}

async fn run_workloads(put: Put, o: &Options, fsyncs: impl Fn() -> u64) -> Pair {
    // Warm up connections and caches.
    drive(put.clone(), 16, 1_600).await;
    let before = fsyncs();
    let single = drive(put.clone(), 1, o.single_writes).await;
    let mid = fsyncs();
    let many = drive(put, o.clients, o.concurrent_writes).await;
    let after = fsyncs();
    Pair {
        single,
        many,
        fsyncs: (mid - before, after - mid),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let o = options();
    let _ = std::fs::remove_dir_all(&o.data_dir);
    std::fs::create_dir_all(&o.data_dir).expect("create the data dir");
    println!(
        "data dir: {} (fsync on); early replication {}",
        o.data_dir.display(),
        if o.early_replication { "on" } else { "off" }
    );
    let fsync = measure_fsync(&o.data_dir);
    let rtt = measure_rtt();
    println!(
        "one fsync (4 KiB write + fdatasync): {:.3} ms; loopback round trip: {:.3} ms",
        fsync.as_secs_f64() * 1e3,
        rtt.as_secs_f64() * 1e3
    );

    let f = start_flotilla(&o.data_dir, o.early_replication).await;
    let chans = channels(&f.leader_addr, 8).await;
    let leader = f
        .nodes
        .iter()
        .find(|n| n.addr() == f.leader_addr)
        .unwrap()
        .clone();
    let commits = |n: &Node<KvStore>| {
        let s = n.log_stats();
        (
            s.fsyncs.load(Relaxed),
            s.entries.load(Relaxed),
            s.commit_micros.load(Relaxed),
        )
    };
    let before: Vec<_> = f.nodes.iter().map(|n| commits(n)).collect();
    let fl = run_workloads(flotilla_put(chans), &o, || leader.log_batching().0).await;
    report("flotilla", &fl, &o, "leader fsync");
    for (n, b) in f.nodes.iter().zip(before) {
        let a = commits(n);
        let (fsyncs, entries, micros) = (a.0 - b.0, a.1 - b.1, a.2 - b.2);
        println!(
            "flotilla {} log: {entries} entries in {fsyncs} durable commits, {:.3} ms per commit",
            if Arc::ptr_eq(n, &leader) {
                "leader  "
            } else {
                "follower"
            },
            micros as f64 / 1e3 / fsyncs.max(1) as f64
        );
    }
    let early = leader.early_stats();
    println!(
        "flotilla early replication: {} batches offered, {} requests sent, {} accepted",
        early.offered.load(Relaxed),
        early.sent.load(Relaxed),
        early.accepted.load(Relaxed)
    );
    let floor = fsync + rtt * 2;
    println!(
        "single-client p50 {:.2} ms vs one fsync + two round trips {:.2} ms: {:.2}x",
        fl.single.p50.as_secs_f64() * 1e3,
        floor.as_secs_f64() * 1e3,
        fl.single.p50.as_secs_f64() / floor.as_secs_f64()
    );
    for n in &f.nodes {
        n.shutdown().await;
    }

    let Some(bin) = &o.etcd_bin else {
        println!(
            "consensus: single ops/s {:.0} (etcd not run) | {}-client ops/s {:.0} (etcd not run)",
            fl.single.ops_per_sec, o.clients, fl.many.ops_per_sec
        );
        return;
    };
    let etcd = start_etcd(bin, &o.data_dir);
    let leader = etcd_leader(&etcd).await;
    let chans = channels(&leader, 8).await;
    let leader_for_metrics = leader.clone();
    let et = run_workloads(etcd_put(chans), &o, move || {
        etcd_wal_fsyncs(&leader_for_metrics).unwrap_or(0)
    })
    .await;
    report("etcd", &et, &o, "leader WAL fsync");
    drop(etcd);
    println!(
        "consensus: single ops/s {:.0} (etcd {:.0}, ratio {:.2}) | {}-client ops/s {:.0} (etcd {:.0}, ratio {:.2})",
        fl.single.ops_per_sec,
        et.single.ops_per_sec,
        fl.single.ops_per_sec / et.single.ops_per_sec,
        o.clients,
        fl.many.ops_per_sec,
        et.many.ops_per_sec,
        fl.many.ops_per_sec / et.many.ops_per_sec
    );
}
