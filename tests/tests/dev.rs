//! `flotilla dev` as users run it: a real process, a real bare git repository, signed
//! webhooks, jobs run by the local cell, Ctrl-C, and a restart on the same data directory.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::dev::Dev;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::time::Instant;

const SECRET: &str = "dev-test-secret";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=t@example.com"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git is installed");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn get(c: &reqwest::Client, dev: &Dev, path: &str) -> (u16, String) {
    let r = c
        .get(format!("{}{path}", dev.url))
        .bearer_auth(&dev.token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn get_json(c: &reqwest::Client, dev: &Dev, path: &str) -> Value {
    let (status, body) = get(c, dev, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn push(c: &reqwest::Client, dev: &Dev, delivery: &str, sha: &str) -> String {
    let body = serde_json::to_vec(&json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000001",
        "after": sha,
        "head_commit": {"id": sha},
        "repository": {"full_name": "acme/web"},
        "sender": {"login": "octocat"},
        "pusher": {"name": "octocat"},
        "commits": []
    }))
    .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let r = c
        .post(format!("{}/webhooks/github/web", dev.url))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    v["build_id"].as_str().unwrap().to_owned()
}

async fn finished(c: &reqwest::Client, dev: &Dev, build: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let b = get_json(c, dev, &format!("/api/v1/builds/{build}")).await;
        if ["succeeded", "failed", "cancelled", "skipped"].contains(&b["status"].as_str().unwrap())
        {
            return b;
        }
        assert!(Instant::now() < deadline, "build never finished: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn job_of<'a>(build: &'a Value, name: &str) -> &'a Value {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flotilla_dev_runs_a_pushed_dag_in_order_serves_its_logs_and_keeps_everything_across_a_restart()
 {
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("web.git");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    git(
        &bare,
        &["init", "-q", "--bare", "--initial-branch=main", "."],
    );
    git(&work, &["init", "-q", "--initial-branch=main", "."]);
    std::fs::write(
        work.join(".ci.yaml"),
        r#"version: 1
defaults: { image: "debian:12" }
jobs:
  a: { run: "echo compiled > out.txt && cat out.txt && date +%s%N" }
  b: { run: "echo testing-b", needs: [a] }
  c: { run: "echo testing-c && exit 3", needs: [a] }
  d: { run: "echo never", needs: [c] }
"#,
    )
    .unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "pipeline"]);
    git(&work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    let sha = git(&work, &["rev-parse", "HEAD"]);

    let data = tmp.path().join("data");
    let c = client();
    let dev = Dev::start(&data, &[]).await;
    let r = c
        .post(format!("{}/api/v1/projects", dev.url))
        .bearer_auth(&dev.token)
        .json(
            &json!({"name": "web", "repo_url": format!("file://{}", bare.display()),
            "provider": "github", "webhook_secret": SECRET}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let build_id = push(&c, &dev, "delivery-1", &sha).await;
    let build = finished(&c, &dev, &build_id).await;

    // a and b succeed, c exits 3 and fails the build, d (needs c) never runs.
    assert_eq!(build["status"], "failed", "{build}");
    assert_eq!(job_of(&build, "a")["status"], "succeeded");
    assert_eq!(job_of(&build, "b")["status"], "succeeded");
    assert_eq!(
        job_of(&build, "c")["failure"]["summary"],
        "Test{3}",
        "{build}"
    );
    assert_eq!(job_of(&build, "d")["status"], "cancelled");
    let a_finished = job_of(&build, "a")["finished_at"]
        .as_str()
        .unwrap()
        .to_owned();
    for later in ["b", "c"] {
        let started = job_of(&build, later)["started_at"].as_str().unwrap();
        assert!(
            started >= a_finished.as_str(),
            "{later} started {started} before a finished {a_finished}"
        );
    }
    let a_id = job_of(&build, "a")["id"].as_str().unwrap().to_owned();
    let (status, log) = get(&c, &dev, &format!("/api/v1/jobs/{a_id}/logs")).await;
    assert_eq!(status, 200);
    assert!(log.contains("compiled"), "{log}");
    let c_id = job_of(&build, "c")["id"].as_str().unwrap();
    let (_, log) = get(&c, &dev, &format!("/api/v1/jobs/{c_id}/logs")).await;
    assert!(
        log.contains("testing-c") && log.contains("Test{3}"),
        "{log}"
    );

    // Ctrl-C stops it cleanly; a restart on the same directory keeps the project and build.
    dev.stop().await;
    let dev = Dev::start(&data, &[]).await;
    let again = get_json(&c, &dev, &format!("/api/v1/builds/{build_id}")).await;
    assert_eq!(again["status"], "failed");
    let projects = get_json(&c, &dev, "/api/v1/projects").await;
    assert!(projects.to_string().contains("\"web\""), "{projects}");
    let (_, log) = get(&c, &dev, &format!("/api/v1/jobs/{a_id}/logs")).await;
    assert!(log.contains("compiled"));
    dev.stop().await;
}
