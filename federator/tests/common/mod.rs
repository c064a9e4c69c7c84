//! Shared harness: federator replicas in-process on loopback (real Raft over gRPC, real HTTP,
//! real Raft data files), real git repositories made with the git CLI, and signed webhooks.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flotilla_federator::clock::SystemClock;
use flotilla_federator::config::FederatorConfig;
use flotilla_federator::repo::{RepoConfig, RoutedSource};
use flotilla_federator::service::{Deps, Federator, Listeners};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub const ADMIN: &str = "flt_test_admin_token_0123456789";
pub const SECRET: &str = "It's a Secret to Everybody";
pub const CELL_TOKEN: &str = "cell-bootstrap-token-for-tests";

/// One replica's fixed coordinates, so it can be restarted on the same ports and data.
pub struct Slot {
    pub id: u64,
    pub raft: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    pub fed: Option<Federator>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub slots: Vec<Slot>,
    pub client: reqwest::Client,
}

async fn free() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

impl Cluster {
    /// `n` replicas forming one cluster.
    pub async fn start(n: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin-token"), ADMIN).unwrap();
        std::fs::write(dir.path().join("cell-token"), CELL_TOKEN).unwrap();
        let mut slots = Vec::new();
        for id in 1..=n {
            slots.push(Slot {
                id,
                raft: free().await,
                http: free().await,
                fed: None,
            });
        }
        let mut c = Cluster {
            dir,
            slots,
            client: {
                // reqwest is built without a default TLS provider; the tests speak plain HTTP
                // but the builder still wants one installed.
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
            }
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        };
        let members: BTreeMap<u64, String> =
            c.slots.iter().map(|s| (s.id, s.raft.to_string())).collect();
        let starts: Vec<_> = (0..c.slots.len()).map(|i| c.config(i, &members)).collect();
        let mut feds = Vec::new();
        for (i, config) in starts.into_iter().enumerate() {
            let slot = &c.slots[i];
            let (raft, http) = (slot.raft, slot.http);
            feds.push(tokio::spawn(
                async move { start_at(config, raft, http).await },
            ));
        }
        for (i, f) in feds.into_iter().enumerate() {
            c.slots[i].fed = Some(f.await.unwrap());
        }
        c.wait_ready().await;
        c
    }

    fn config(&self, i: usize, members: &BTreeMap<u64, String>) -> FederatorConfig {
        let slot = &self.slots[i];
        let mut config =
            FederatorConfig::new(slot.id, self.dir.path().join(format!("r{}", slot.id)));
        config.raft_listen = slot.raft;
        config.http_listen = slot.http;
        config.admin_token_file = Some(self.dir.path().join("admin-token"));
        if members.len() == 1 {
            config.cluster.bootstrap = true;
        } else {
            config.cluster.initial_members = members.clone();
        }
        config.webhook_rate.per_second = 100_000;
        config.webhook_rate.burst = 100_000;
        // Short cell leases so failover tests take seconds: lost after 3 × 200 ms + 1 s.
        config.cells.bootstrap_token_file = Some(self.dir.path().join("cell-token"));
        config.cells.heartbeat_interval = Duration::from_millis(200);
        config.cells.grace = Duration::from_secs(1);
        config.logs_dir = Some(self.dir.path().join("logs"));
        config
    }

    /// Where replica `i` serves cell sessions.
    pub fn cells_addr(&self, i: usize) -> String {
        self.fed(i).cells_addr().unwrap().to_string()
    }

    /// Where job output is kept (the agents write there, the API serves it).
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Waits until every running replica knows the leader and the leader's API address.
    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            let ready = self.slots.iter().filter_map(|s| s.fed.as_ref()).all(|f| {
                let leader = f.node().metrics().current_leader;
                leader.is_some_and(|l| f.node().read(|m| m.state().replicas.contains_key(&l)))
            });
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the cluster did not become ready");
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.slots[i].http)
    }

    /// Replica `i`'s `/metrics` text.
    pub async fn metrics(&self, i: usize) -> String {
        let resp = self.client.get(self.url(i, "/metrics")).send().await;
        resp.unwrap().text().await.unwrap()
    }

    pub fn leader_index(&self) -> Option<usize> {
        let f = self.slots.iter().find_map(|s| s.fed.as_ref())?;
        let leader = f.node().metrics().current_leader?;
        self.slots.iter().position(|s| s.id == leader)
    }

    pub fn fed(&self, i: usize) -> &Federator {
        self.slots[i].fed.as_ref().unwrap()
    }

    /// Kills replica `i` abruptly.
    pub async fn crash(&mut self, i: usize) {
        if let Some(f) = self.slots[i].fed.take() {
            f.crash().await;
        }
    }

    pub async fn shutdown(mut self) {
        for s in &mut self.slots {
            if let Some(f) = s.fed.take() {
                f.shutdown().await;
            }
        }
    }

    /// A JSON API call with a bearer token; returns status and body.
    pub async fn call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, self.url(i, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&b).unwrap());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(0, reqwest::Method::GET, path, Some(token), None)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call(0, reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }

    /// Creates a project as admin.
    pub async fn project(&self, name: &str, repo_url: &str, provider: &str) {
        let (status, body) = self
            .post(
                "/api/v1/projects",
                ADMIN,
                json!({"name": name, "repo_url": repo_url, "provider": provider, "webhook_secret": SECRET}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Polls a build until its status is not `pending`.
    pub async fn loaded_build(&self, id: &str) -> Value {
        for _ in 0..300 {
            let (status, b) = self.get(&format!("/api/v1/builds/{id}"), ADMIN).await;
            assert_eq!(status, 200, "{b}");
            if b["status"] != "pending" {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("build {id} stayed pending");
    }
}

pub async fn start_at(
    config: FederatorConfig,
    raft: std::net::SocketAddr,
    http: std::net::SocketAddr,
) -> Federator {
    let repos = RoutedSource::new(config.data_dir.join("repos"), &RepoConfig::default()).unwrap();
    let deps = Deps {
        clock: Arc::new(SystemClock),
        repos: Arc::new(repos),
        tls: None,
        cell_tls: None,
    };
    let listeners = Listeners {
        raft: TcpListener::bind(raft).await.unwrap(),
        http: TcpListener::bind(http).await.unwrap(),
        cells: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
    };
    Federator::start(config, listeners, deps).await.unwrap()
}

/// `sha256=<hex>` of `body` under `secret`, as GitHub signs.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A GitHub push payload.
pub fn push_payload(branch: &str, sha: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000001",
        "after": sha,
        "deleted": false,
        "repository": {"full_name": "acme/web", "clone_url": "https://evil.example/repo.git"},
        "pusher": {"name": "octocat"},
        "sender": {"login": "octocat"},
        "commits": [{"id": sha, "added": [".ci.yaml"], "modified": [], "removed": []}],
        "head_commit": {"id": sha}
    }))
    .unwrap()
}

/// Sends a signed GitHub push to replica `i`; returns status and body.
pub async fn github_push(
    c: &Cluster,
    i: usize,
    project: &str,
    delivery: &str,
    body: &[u8],
) -> Result<(u16, Value), reqwest::Error> {
    let resp = c
        .client
        .post(c.url(i, &format!("/webhooks/github/{project}")))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", sign(SECRET, body))
        .body(body.to_vec())
        .send()
        .await?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// A bare git repository with a work tree that pushes to it.
pub struct GitRepo {
    pub bare: PathBuf,
    work: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=t@example.com"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git is installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl GitRepo {
    pub fn new(root: &Path) -> GitRepo {
        let bare = root.join("origin.git");
        let work = root.join("work");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "--initial-branch=main", "."]);
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "--initial-branch=main", "."]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        GitRepo { bare, work }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Commits `files` on `branch` and pushes; returns the commit id.
    pub fn commit(&self, branch: &str, files: &[(&str, &str)]) -> String {
        let _ = Command::new("git")
            .current_dir(&self.work)
            .args(["checkout", "-q", "-B", branch])
            .output();
        for (path, text) in files {
            let p = self.work.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", "change"],
        );
        git(&self.work, &["push", "-q", "origin", branch]);
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

/// A TCP proxy in front of the federator's cell service that the test can cut (every
/// connection dropped, new ones refused) and heal: a cell partitioned from its federator.
pub struct Proxy {
    pub addr: String,
    cut: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<AbortHandle>>> = Arc::default();
        let (c, k) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                k.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            addr,
            cut,
            conns,
            accept,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
