//! The federator end to end: webhooks into builds from real git repositories, the REST API
//! and its tenant checks, and a 3-replica cluster losing its leader under webhook load.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const PIPELINE: &str = "version: 1\non: { push: { branches: [main] } }\ndefaults: { image: 'debian:12' }\njobs:\n  a: { run: 'true' }\n  b: { run: 'true', needs: [a] }\n  c: { run: 'true', needs: [a] }\n";

fn job<'a>(build: &'a Value, name: &str) -> &'a Value {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name} in {build}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_push_becomes_a_build_with_its_dag_and_a_redelivery_returns_the_same_build() {
    let c = Cluster::start(1).await;
    let git_dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(git_dir.path());
    let sha = repo.commit("main", &[(".ci.yaml", PIPELINE)]);
    c.project("web", &repo.url(), "github").await;

    let body = push_payload("main", &sha);
    let (status, first) = github_push(&c, 0, "web", "delivery-1", &body)
        .await
        .unwrap();
    assert_eq!(status, 202, "{first}");
    let id = first["build_id"].as_str().unwrap().to_owned();

    let build = c.loaded_build(&id).await;
    assert_eq!(build["status"], "queued", "{build}");
    assert_eq!(build["sha"], sha.as_str());
    assert_eq!(build["ref"], "refs/heads/main");
    assert_eq!(build["event"], "push");
    let names: Vec<&str> = build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(job(&build, "a")["status"], "queued");
    assert_eq!(job(&build, "b")["status"], "pending");
    assert_eq!(job(&build, "b")["needs"], json!(["a"]));
    assert_eq!(job(&build, "c")["needs"], json!(["a"]));

    // GitHub redelivers with the same delivery id: same build, 200, nothing new.
    let (status, again) = github_push(&c, 0, "web", "delivery-1", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["build_id"], id.as_str());
    let (_, list) = c.get("/api/v1/builds?project=web", ADMIN).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");

    // A broken pipeline fails the build with the parser's position.
    let broken = repo.commit(
        "main",
        &[(
            ".ci.yaml",
            "version: 1\njobs:\n  a: { run: x, imgae: 'debian:12' }\n",
        )],
    );
    let (status, resp) = github_push(&c, 0, "web", "delivery-2", &push_payload("main", &broken))
        .await
        .unwrap();
    assert_eq!(status, 202, "{resp}");
    let failed = c.loaded_build(resp["build_id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.starts_with(".ci.yaml:3:"), "{error}");
    assert!(error.contains("imgae"), "{error}");

    // A push to a branch no trigger matches is skipped, with the reason recorded.
    let side = repo.commit("feature", &[(".ci.yaml", PIPELINE)]);
    let (_, resp) = github_push(&c, 0, "web", "delivery-3", &push_payload("feature", &side))
        .await
        .unwrap();
    let skipped = c.loaded_build(resp["build_id"].as_str().unwrap()).await;
    assert_eq!(skipped["status"], "skipped", "{skipped}");
    assert!(
        skipped["error"].as_str().unwrap().contains("feature"),
        "{skipped}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_refused_unless_signed_known_supported_and_small() {
    let c = Cluster::start(1).await;
    c.project("web", "file:///nonexistent/repo.git", "github")
        .await;
    c.project("lab", "file:///nonexistent/lab.git", "gitlab")
        .await;
    let body = push_payload("main", "0123456789abcdef0123456789abcdef01234567");
    let url = c.url(0, "/webhooks/github/web");
    let send = |sig: Option<String>, event: &str, body: Vec<u8>, url: String| {
        let mut r = c
            .client
            .post(url)
            .header("x-github-event", event.to_owned())
            .header("x-github-delivery", "d")
            .body(body);
        if let Some(s) = sig {
            r = r.header("x-hub-signature-256", s);
        }
        r.send()
    };

    // Forged, truncated, sha1= and missing signatures: 401 before the body is parsed.
    let good = sign(SECRET, &body);
    let mut forged = good.clone();
    forged.replace_range(
        good.len() - 1..,
        if good.ends_with('0') { "1" } else { "0" },
    );
    for sig in [
        Some(forged),
        Some(good[..good.len() - 2].to_owned()),
        Some(format!("sha1={}", &good[7..47])),
        None,
    ] {
        let r = send(sig.clone(), "push", body.clone(), url.clone())
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{sig:?}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    // Garbage that is correctly signed is a 400, never a 401.
    let r = send(
        Some(sign(SECRET, b"{not json")),
        "push",
        b"{not json".to_vec(),
        url.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);

    // Unknown project, or a GitLab project on the GitHub URL: 404.
    for u in ["/webhooks/github/nope", "/webhooks/github/lab"] {
        let r = send(Some(good.clone()), "push", body.clone(), c.url(0, u))
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{u}");
    }

    // Unsupported events: 202 with the reason; ping: 200.
    let issue = br#"{"action":"opened"}"#.to_vec();
    let r = send(Some(sign(SECRET, &issue)), "issues", issue, url.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json_body().await;
    assert!(v["ignored"].as_str().unwrap().contains("issues"), "{v}");
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#.to_vec();
    let r = send(Some(sign(SECRET, &ping)), "ping", ping, url.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Over 25 MiB: 413, without the server holding more than the limit.
    let huge = vec![b' '; (25 << 20) + 1];
    let r = send(Some("sha256=00".into()), "push", huge, url.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // GitLab: the token is the secret.
    let gl = serde_json::to_vec(&json!({
        "object_kind": "push", "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000001",
        "after": "0123456789abcdef0123456789abcdef01234567",
        "checkout_sha": "0123456789abcdef0123456789abcdef01234567",
        "user_username": "dev", "user_name": "Dev",
        "total_commits_count": 1,
        "commits": [{"id": "0123456789abcdef0123456789abcdef01234567", "added": ["a"], "modified": [], "removed": []}]
    }))
    .unwrap();
    let gitlab = |token: &str, key: &str| {
        c.client
            .post(c.url(0, "/webhooks/gitlab/lab"))
            .header("x-gitlab-event", "Push Hook")
            .header("x-gitlab-token", token.to_owned())
            .header("idempotency-key", key.to_owned())
            .body(gl.clone())
            .send()
    };
    assert_eq!(gitlab("wrong", "k1").await.unwrap().status(), 401);
    let r = gitlab(SECRET, "k1").await.unwrap();
    assert_eq!(r.status(), 202);
    let first: Value = r.json_body().await;
    let r = gitlab(SECRET, "k1").await.unwrap();
    assert_eq!(r.status(), 200);
    let second: Value = r.json_body().await;
    assert_eq!(first["build_id"], second["build_id"]);
    c.shutdown().await;
}

trait JsonBody {
    async fn json_body(self) -> Value;
}

impl JsonBody for reqwest::Response {
    async fn json_body(self) -> Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_token_sees_nothing_of_another_project_on_any_endpoint() {
    let c = Cluster::start(1).await;
    let git_dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new(git_dir.path());
    repo.commit("main", &[(".ci.yaml", PIPELINE)]);
    c.project("alpha", &repo.url(), "github").await;
    c.project("beta", &repo.url(), "gitlab").await;

    let token = |project: &'static str, scope: &'static str| {
        let c = &c;
        async move {
            let (s, v) = c
                .post(
                    "/api/v1/tokens",
                    ADMIN,
                    json!({"project": project, "scope": scope}),
                )
                .await;
            assert_eq!(s, 201, "{v}");
            assert!(v["token"].as_str().unwrap().starts_with("flt_"));
            (
                v["id"].as_str().unwrap().to_owned(),
                v["token"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (_, a_read) = token("alpha", "read").await;
    let (_, a_write) = token("alpha", "write").await;
    let (_, a_admin) = token("alpha", "admin").await;
    let (b_read_id, b_read) = token("beta", "read").await;

    // One build in each project, loaded so that jobs exist.
    let (s, a_build) = c
        .post(
            "/api/v1/projects/alpha/builds",
            &a_write,
            json!({"ref": "main"}),
        )
        .await;
    assert_eq!(s, 201, "{a_build}");
    let a_build = c.loaded_build(a_build["build_id"].as_str().unwrap()).await;
    let (s, b_build) = c
        .post(
            "/api/v1/projects/beta/builds",
            ADMIN,
            json!({"ref": "main"}),
        )
        .await;
    assert_eq!(s, 201, "{b_build}");
    let b_build = c.loaded_build(b_build["build_id"].as_str().unwrap()).await;
    assert_eq!(b_build["status"], "queued", "{b_build}");
    let bb = b_build["id"].as_str().unwrap();
    let bj = b_build["jobs"][0]["id"].as_str().unwrap();

    // Every endpoint that names project beta's things: 404 for each of alpha's tokens.
    let beta_endpoints: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/api/v1/projects/beta".into(), None),
        (
            Method::PATCH,
            "/api/v1/projects/beta".into(),
            Some(json!({"pipeline_path": "x.yaml"})),
        ),
        (Method::DELETE, "/api/v1/projects/beta".into(), None),
        (
            Method::POST,
            "/api/v1/projects/beta/builds".into(),
            Some(json!({"ref": "main"})),
        ),
        (Method::GET, "/api/v1/projects/beta/builds".into(), None),
        (Method::GET, "/api/v1/builds?project=beta".into(), None),
        (Method::GET, format!("/api/v1/builds/{bb}"), None),
        (Method::POST, format!("/api/v1/builds/{bb}/cancel"), None),
        (Method::POST, format!("/api/v1/builds/{bb}/retry"), None),
        (Method::GET, format!("/api/v1/jobs/{bj}"), None),
    ];
    for t in [&a_read, &a_write, &a_admin] {
        for (m, path, body) in &beta_endpoints {
            let (s, v) = c.call(0, m.clone(), path, Some(t), body.clone()).await;
            assert_eq!(s, 404, "{m} {path} with an alpha token: {v}");
        }
    }
    // ... while beta's own read token sees them, and the admin token sees everything.
    for (m, path, _) in beta_endpoints.iter().filter(|(m, ..)| *m == Method::GET) {
        let (s, v) = c.call(0, m.clone(), path, Some(&b_read), None).await;
        assert_eq!(s, 200, "{m} {path} with beta's token: {v}");
    }

    // Lists only show the token's own project.
    let (_, projects) = c.get("/api/v1/projects", &a_read).await;
    let names: Vec<&str> = projects["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha"]);
    let (_, all) = c.get("/api/v1/projects", ADMIN).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let (_, builds) = c.get("/api/v1/builds", &a_read).await;
    let ids: BTreeSet<&str> = builds["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([a_build["id"].as_str().unwrap()]));
    assert!(
        !projects.to_string().contains(SECRET),
        "secrets are never returned"
    );

    // Scopes within the own project: read cannot write; write cannot administer.
    let ab = a_build["id"].as_str().unwrap();
    let (s, _) = c
        .post(&format!("/api/v1/builds/{ab}/cancel"), &a_read, json!({}))
        .await;
    assert_eq!(s, 403);
    let (s, _) = c
        .call(
            0,
            Method::PATCH,
            "/api/v1/projects/alpha",
            Some(&a_write),
            Some(json!({"pipeline_path": "ci.yaml"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, v) = c
        .post(&format!("/api/v1/builds/{ab}/cancel"), &a_write, json!({}))
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("cancelled")), "{v}");

    // Global endpoints need a global admin token.
    for t in [&a_read, &a_admin] {
        let (s, _) = c.post("/api/v1/projects", t, json!({"name": "x", "repo_url": "https://e/x", "provider": "git", "webhook_secret": "12345678"})).await;
        assert_eq!(s, 403);
        let (s, _) = c
            .post(
                "/api/v1/tokens",
                t,
                json!({"project": null, "scope": "admin"}),
            )
            .await;
        assert_eq!(s, 403);
        let (s, _) = c.get("/api/v1/cluster", t).await;
        assert_eq!(s, 403);
    }

    // No token, a wrong token, a revoked token: 401.
    let (s, _) = c.call(0, Method::GET, "/api/v1/builds", None, None).await;
    assert_eq!(s, 401);
    let (s, _) = c.get("/api/v1/builds", "flt_wrong").await;
    assert_eq!(s, 401);
    let (s, _) = c
        .call(
            0,
            Method::DELETE,
            &format!("/api/v1/tokens/{b_read_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = c.get("/api/v1/builds", &b_read).await;
    assert_eq!(s, 401);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_validates_input_paginates_and_documents_itself() {
    let c = Cluster::start(1).await;
    let (s, v) = c.post("/api/v1/projects", ADMIN, json!({"name": "Bad Name", "repo_url": "https://e/x", "provider": "github", "webhook_secret": "12345678"})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = c.post("/api/v1/projects", ADMIN, json!({"name": "ok", "repo_url": "ssh://git@e/x", "provider": "github", "webhook_secret": "12345678"})).await;
    assert_eq!(s, 400);
    assert!(v["detail"].as_str().unwrap().contains("repo_url"), "{v}");
    let (s, _) = c.post("/api/v1/projects", ADMIN, json!({"name": "ok", "repo_url": "https://e/x", "provider": "svn", "webhook_secret": "12345678"})).await;
    assert_eq!(s, 400);
    let (s, v) = c.post("/api/v1/projects", ADMIN, json!({"name": "ok", "repo_url": "https://e/x", "provider": "git", "webhook_secret": "12345678", "colour": 1})).await;
    assert_eq!(s, 400, "unknown fields are refused: {v}");
    c.project("ok", "file:///nonexistent/x.git", "git").await;
    let (s, _) = c.post("/api/v1/projects", ADMIN, json!({"name": "ok", "repo_url": "https://e/x", "provider": "git", "webhook_secret": "12345678"})).await;
    assert_eq!(s, 409);

    for _ in 0..5 {
        let (s, _) = c
            .post("/api/v1/projects/ok/builds", ADMIN, json!({"ref": "main"}))
            .await;
        assert_eq!(s, 201);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor
            .as_ref()
            .map(|c| format!("&cursor={c}"))
            .unwrap_or_default();
        let (s, page) = c.get(&format!("/api/v1/builds?limit=2{q}"), ADMIN).await;
        assert_eq!(s, 200);
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["number"].as_u64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, [5, 4, 3, 2, 1], "newest first, each exactly once");
    // The repository does not exist: every build fails with a message saying what to fix.
    let b = c.loaded_build("1").await;
    assert_eq!(b["status"], "failed");
    assert!(b["error"].as_str().unwrap().contains("repo_url"), "{b}");
    let (_, failed) = c.get("/api/v1/builds?status=failed&ref=main", ADMIN).await;
    assert!(!failed["items"].as_array().unwrap().is_empty());
    let (s, _) = c.get("/api/v1/builds?status=bogus", ADMIN).await;
    assert_eq!(s, 400);

    let (s, doc) = c
        .call(0, Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/api/v1/builds/{id}",
        "/api/v1/projects",
        "/api/v1/tokens",
        "/api/v1/cluster",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the OpenAPI document"
        );
    }
    let (s, cluster) = c.get("/api/v1/cluster", ADMIN).await;
    assert_eq!(s, 200);
    assert_eq!(cluster["leader"], 1);
    assert!(cluster["commit_index"].as_u64().unwrap() > 5);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_during_deliveries_loses_no_acknowledged_delivery_and_duplicates_none() {
    let mut c = Cluster::start(3).await;
    c.project("web", "file:///nonexistent/web.git", "github")
        .await;
    c.wait_ready().await;

    // A write through a follower is forwarded, and its answer already shows it; a
    // linearizable read on a follower is redirected to the leader's API.
    let leader = c.leader_index().expect("a leader");
    let follower = (leader + 1) % 3;
    let (s, v) = c
        .call(follower, Method::POST, "/api/v1/projects", Some(ADMIN), Some(json!({
            "name": "via-follower", "repo_url": "https://e/x.git", "provider": "git", "webhook_secret": "12345678"
        })))
        .await;
    assert_eq!((s, v["id"].as_str()), (201, Some("via-follower")), "{v}");
    let fresh = "/api/v1/projects/via-follower?consistency=linearizable";
    let r = c
        .client
        .get(c.url(follower, fresh))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        c.url(leader, fresh)
    );
    let (s, _) = c.call(leader, Method::GET, fresh, Some(ADMIN), None).await;
    assert_eq!(s, 200);

    // 1,000 deliveries, 10% of them sent a second time, spread over the replicas by 16
    // concurrent senders; the leader is killed a third of the way through.
    let mut plan: Vec<String> = (0..1000).map(|i| format!("d-{i}")).collect();
    for i in (0..1000).step_by(10) {
        plan.push(format!("d-{i}"));
    }
    let plan = std::sync::Arc::new(plan);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(
        BTreeMap::<String, BTreeSet<String>>::new(),
    ));
    let body = std::sync::Arc::new(push_payload(
        "main",
        "0123456789abcdef0123456789abcdef01234567",
    ));
    let urls: Vec<String> = (0..3).map(|i| c.url(i, "/webhooks/github/web")).collect();
    let client = c.client.clone();
    let mut senders = tokio::task::JoinSet::new();
    for w in 0..16usize {
        let (plan, next, acked, body, urls, client) = (
            plan.clone(),
            next.clone(),
            acked.clone(),
            body.clone(),
            urls.clone(),
            client.clone(),
        );
        senders.spawn(async move {
            let mut failures = 0u32;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(key) = plan.get(i) else { break };
                // Like a forge: retry a failed delivery (against any replica) until acknowledged.
                for attempt in 0..200usize {
                    let url = &urls[(w + i + attempt) % urls.len()];
                    let resp = client
                        .post(url)
                        .header("x-github-event", "push")
                        .header("x-github-delivery", key.as_str())
                        .header("x-hub-signature-256", sign(SECRET, &body))
                        .body(body.to_vec())
                        .timeout(Duration::from_secs(15))
                        .send()
                        .await;
                    if let Ok(r) = resp
                        && r.status().is_success()
                    {
                        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .entry(key.clone())
                            .or_default()
                            .insert(v["build_id"].as_str().unwrap().to_owned());
                        break;
                    }
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            failures
        });
    }
    while next.load(std::sync::atomic::Ordering::SeqCst) < 350 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let leader = c.leader_index().expect("a leader");
    c.crash(leader).await;
    let mut failures = 0;
    while let Some(f) = senders.join_next().await {
        failures += f.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    assert_eq!(
        acked.len(),
        1000,
        "every delivery was eventually acknowledged"
    );
    for (key, builds) in &acked {
        assert_eq!(
            builds.len(),
            1,
            "delivery {key} was answered with two builds: {builds:?}"
        );
    }
    // On every surviving replica: each acknowledged delivery has exactly one build, and no
    // delivery has two.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in (0..3).filter(|i| *i != leader) {
        let by_delivery = c.fed(i).node().read(|m| {
            let mut map: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for b in m.state().builds.values() {
                if let Some(d) = &b.delivery {
                    map.entry(d.clone()).or_default().push(b.id.0);
                }
            }
            map
        });
        for (key, builds) in &acked {
            let ids = &by_delivery[key];
            assert_eq!(
                ids.len(),
                1,
                "replica {i}: delivery {key} has builds {ids:?}"
            );
            assert_eq!(ids[0].to_string(), *builds.iter().next().unwrap());
        }
        assert!(by_delivery.values().all(|v| v.len() == 1));
    }
    eprintln!("requests that failed and were retried during the failover: {failures}");
    c.shutdown().await;
}
