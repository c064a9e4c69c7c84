//! Tests of the repository adapters against real things: repositories made with the `git` CLI
//! (served over `file://`) and `wiremock` servers standing in for the GitHub and GitLab APIs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla_core::forge::Provider;
use flotilla_core::repo::{FetchedFile, RepoError, RepoLocation, RepoSource, Revision};
use tempfile::TempDir;
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::*;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Runs the git CLI for a fixture, isolated from the machine's configuration.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "protocol.file.allow=always",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A bare "origin" and a work clone that commits and pushes to it:
/// - `main`: `first` (`.ci.yaml` = "one"), then `third` ("three");
/// - `feature` (from `first`): `second` (`.ci.yaml` = "two", plus `dir/.ci.yaml`).
struct Origin {
    tmp: TempDir,
    first: String,
    second: String,
    third: String,
}

impl Origin {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        git(root, &["init", "--quiet", "--bare", "origin.git"]);
        git(root, &["clone", "--quiet", "origin.git", "work"]);
        let work = root.join("work");
        let commit = |file: &str, text: &str, msg: &str| {
            let p = work.join(file);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
            git(&work, &["add", "."]);
            git(&work, &["commit", "--quiet", "-m", msg]);
            git(&work, &["rev-parse", "HEAD"])
        };
        let first = commit(".ci.yaml", "one", "first");
        git(&work, &["checkout", "--quiet", "-b", "feature"]);
        commit("dir/.ci.yaml", "nested", "nested");
        let second = commit(".ci.yaml", "two", "second");
        git(&work, &["checkout", "--quiet", "main"]);
        let third = commit(".ci.yaml", "three", "third");
        git(&work, &["push", "--quiet", "origin", "main", "feature"]);
        Origin {
            tmp,
            first,
            second,
            third,
        }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("origin.git")
    }

    fn location(&self) -> RepoLocation {
        RepoLocation {
            provider: Provider::Git,
            url: format!("file://{}", self.dir().display()),
        }
    }

    /// Commits and pushes a new `.ci.yaml` on `main`; returns the commit.
    fn push_main(&self, text: &str) -> String {
        let work = self.tmp.path().join("work");
        std::fs::write(work.join(".ci.yaml"), text).unwrap();
        git(&work, &["commit", "--quiet", "-am", text]);
        git(&work, &["push", "--quiet", "origin", "main"]);
        git(&work, &["rev-parse", "HEAD"])
    }
}

fn at(git_ref: &str, sha: &str) -> Revision {
    Revision {
        git_ref: git_ref.into(),
        sha: Some(sha.into()),
    }
}

fn head_of(git_ref: &str) -> Revision {
    Revision {
        git_ref: git_ref.into(),
        sha: None,
    }
}

fn contents(f: &FetchedFile) -> Option<&str> {
    f.contents
        .as_deref()
        .map(|b| std::str::from_utf8(b).unwrap())
}

fn git_source(cache: &TempDir) -> GitSource {
    GitSource::new(cache.path().join("repos")).unwrap()
}

/// A shell script standing in for `git`: runs `body` for fetches whose arguments match the
/// shell pattern `pattern`, and the real git otherwise.
fn git_wrapper(dir: &Path, pattern: &str, body: &str) -> PathBuf {
    let script = dir.join("fake-git");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncase \"$*\" in\n  {pattern}) {body} ;;\nesac\nexec git \"$@\"\n"),
    )
    .unwrap();
    git(dir, &["--version"]); // git is there for the wrapper to run.
    let status = Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success());
    script
}

// ---------------------------------------------------------------------------------------------
// GitSource

#[tokio::test]
async fn git_reads_the_file_at_the_first_commit_and_at_a_later_commit_on_another_branch() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache);
    let repo = origin.location();

    let f = src
        .read_file(&repo, &at("refs/heads/main", &origin.first), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(
        (f.sha.as_str(), contents(&f)),
        (origin.first.as_str(), Some("one"))
    );

    let f = src
        .read_file(&repo, &at("refs/heads/feature", &origin.second), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(
        (f.sha.as_str(), contents(&f)),
        (origin.second.as_str(), Some("two"))
    );

    let f = src
        .read_file(
            &repo,
            &at("refs/heads/feature", &origin.second),
            "dir/.ci.yaml",
        )
        .await
        .unwrap();
    assert_eq!(contents(&f), Some("nested"));
}

#[tokio::test]
async fn git_reports_a_missing_file_at_an_existing_commit_as_none() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache);
    for p in ["nope.yaml", "dir/.ci.yaml", "missing/dir/file"] {
        let f = src
            .read_file(&origin.location(), &at("refs/heads/main", &origin.first), p)
            .await
            .unwrap();
        assert_eq!(
            f,
            FetchedFile {
                sha: origin.first.clone(),
                contents: None
            },
            "{p}"
        );
    }
}

#[tokio::test]
async fn git_reports_an_unknown_commit_as_not_found() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let unknown = "1111111111111111111111111111111111111111";
    let err = git_source(&cache)
        .read_file(
            &origin.location(),
            &at("refs/heads/main", unknown),
            ".ci.yaml",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn git_reports_an_unknown_ref_and_a_missing_repository_as_not_found() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache);
    let err = src
        .read_file(&origin.location(), &head_of("refs/heads/nope"), ".ci.yaml")
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");

    let missing = RepoLocation {
        provider: Provider::Git,
        url: format!("file://{}/absent.git", origin.tmp.path().display()),
    };
    let err = src
        .read_file(&missing, &at("refs/heads/main", &origin.first), ".ci.yaml")
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn git_reads_an_already_fetched_commit_again_without_touching_the_origin() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache);
    let repo = origin.location();
    let rev = at("refs/heads/main", &origin.first);
    src.read_file(&repo, &rev, ".ci.yaml").await.unwrap();

    // The origin is gone: a fetch would now fail.
    std::fs::rename(origin.dir(), origin.tmp.path().join("moved.git")).unwrap();
    let f = src.read_file(&repo, &rev, ".ci.yaml").await.unwrap();
    assert_eq!(contents(&f), Some("one"));
    let f = src.read_file(&repo, &rev, "nope.yaml").await.unwrap();
    assert_eq!(f.contents, None);
    // A commit not yet fetched does need the origin, which proves the reads above did not.
    let err = src
        .read_file(&repo, &at("refs/heads/main", &origin.third), ".ci.yaml")
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn git_resolves_a_ref_to_its_current_head_when_no_sha_is_given() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache);
    let repo = origin.location();

    let f = src
        .read_file(&repo, &head_of("refs/heads/main"), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(
        (f.sha.as_str(), contents(&f)),
        (origin.third.as_str(), Some("three"))
    );
    let f = src
        .read_file(&repo, &head_of("feature"), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(
        (f.sha.as_str(), contents(&f)),
        (origin.second.as_str(), Some("two"))
    );

    // A later push moves the head; the mirror fetches the new commit.
    let fourth = origin.push_main("four");
    let f = src
        .read_file(&repo, &head_of("refs/heads/main"), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(
        (f.sha.as_str(), contents(&f)),
        (fourth.as_str(), Some("four"))
    );
}

#[tokio::test]
async fn git_refuses_ssh_scp_ext_and_option_like_urls_without_running_anything() {
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache);
    let rev = at(
        "refs/heads/main",
        "1111111111111111111111111111111111111111",
    );
    for url in [
        "ssh://git@example.com/o/r.git",
        "git@example.com:o/r.git",
        "ext::sh -c touch% /tmp/flotilla-pwned",
        "-uhttps://x",
        "/srv/git/repo.git",
    ] {
        let repo = RepoLocation {
            provider: Provider::Git,
            url: url.into(),
        };
        let err = src.read_file(&repo, &rev, ".ci.yaml").await.unwrap_err();
        assert!(matches!(err, RepoError::Invalid(_)), "{url}: {err:?}");
    }
    // No mirror was made for any of them.
    assert_eq!(
        std::fs::read_dir(cache.path().join("repos"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn git_refuses_bad_paths_refs_and_shas() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache);
    let repo = origin.location();
    let good = at("refs/heads/main", &origin.first);
    for p in ["", "/etc/passwd", "../x", "a//b", "./.ci.yaml", "dir/"] {
        let err = src.read_file(&repo, &good, p).await.unwrap_err();
        assert!(matches!(err, RepoError::Invalid(_)), "{p:?}: {err:?}");
    }
    for r in [
        "--upload-pack=x",
        "+refs/heads/*:refs/x",
        "a:b",
        "^main",
        "a..b",
    ] {
        let err = src
            .read_file(&repo, &head_of(r), ".ci.yaml")
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::Invalid(_)), "{r:?}: {err:?}");
    }
    for sha in ["HEAD", "--all", "abc", &"g".repeat(40)] {
        let err = src
            .read_file(&repo, &at("refs/heads/main", sha), ".ci.yaml")
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::Invalid(_)), "{sha:?}: {err:?}");
    }
}

#[tokio::test]
async fn git_refuses_a_file_over_the_size_limit() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache).with_max_file_bytes(4);
    let repo = origin.location();
    let ok = src
        .read_file(&repo, &at("refs/heads/main", &origin.first), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(contents(&ok), Some("one"));
    let err = src
        .read_file(&repo, &at("refs/heads/main", &origin.third), ".ci.yaml")
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Invalid(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_reads_of_a_new_repository_all_succeed() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let src = git_source(&cache);
    let repo = origin.location();
    let revs: Vec<(Revision, &str)> = (0..8)
        .map(|i| match i % 3 {
            0 => (at("refs/heads/main", &origin.first), "one"),
            1 => (at("refs/heads/feature", &origin.second), "two"),
            _ => (head_of("refs/heads/main"), "three"),
        })
        .collect();
    let reads = revs
        .iter()
        .map(|(rev, _)| src.read_file(&repo, rev, ".ci.yaml"));
    let results = futures::future::join_all(reads).await;
    for (result, (_, want)) in results.iter().zip(&revs) {
        let f = result.as_ref().unwrap();
        assert_eq!(contents(f), Some(*want));
    }
    // One mirror, not one per read.
    assert_eq!(
        std::fs::read_dir(cache.path().join("repos"))
            .unwrap()
            .count(),
        1
    );
}

#[tokio::test]
async fn git_fetches_the_ref_when_the_server_refuses_a_commit_by_id() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    // A server that refuses every want by id (as protocol v0 servers without
    // allowReachableSHA1InWant do).
    let fake = git_wrapper(
        cache.path(),
        "*fetch*refs/flotilla/c/*",
        "echo 'fatal: remote error: upload-pack: not our ref' >&2; exit 128",
    );
    let src = git_source(&cache).with_git_program(fake);
    let repo = origin.location();
    // `first` is not the head of main: it comes within the ref's last commits.
    let f = src
        .read_file(&repo, &at("refs/heads/main", &origin.first), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(contents(&f), Some("one"));
    // A commit on another branch is not among main's commits.
    let err = src
        .read_file(&repo, &at("refs/heads/main", &origin.second), ".ci.yaml")
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn a_fetch_that_outlives_its_timeout_is_unavailable() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let fake = git_wrapper(cache.path(), "*fetch*", "exec sleep 30");
    let src = git_source(&cache)
        .with_git_program(fake)
        .with_fetch_timeout(Duration::from_millis(500));
    let err = src
        .read_file(
            &origin.location(),
            &at("refs/heads/main", &origin.first),
            ".ci.yaml",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Unavailable(_)), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn lock_files_left_by_a_killed_fetch_do_not_block_the_next_process() {
    let origin = Origin::new();
    let cache = tempfile::tempdir().unwrap();
    let repo = origin.location();
    git_source(&cache)
        .read_file(&repo, &at("refs/heads/main", &origin.first), ".ci.yaml")
        .await
        .unwrap();
    // What a fetch killed mid-way leaves behind.
    let mirror = std::fs::read_dir(cache.path().join("repos"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(mirror.join("shallow.lock"), "").unwrap();
    std::fs::create_dir_all(mirror.join("refs/flotilla/c")).unwrap();
    std::fs::write(
        mirror.join(format!("refs/flotilla/c/{}.lock", origin.third)),
        "",
    )
    .unwrap();

    // A restarted federator (a new source on the same cache) can still fetch.
    let f = git_source(&cache)
        .read_file(&repo, &at("refs/heads/main", &origin.third), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(contents(&f), Some("three"));
}

// ---------------------------------------------------------------------------------------------
// GitHub

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn github_project(url: &str) -> RepoLocation {
    RepoLocation {
        provider: Provider::Github,
        url: url.into(),
    }
}

async fn github(server: &MockServer) -> GithubApi {
    GithubApi::new(
        "github.com",
        Some(&server.uri()),
        Token::new("gh-token").unwrap(),
    )
    .unwrap()
    .with_timeout(Duration::from_secs(5))
}

/// The headers every GitHub request must carry.
fn github_get(p: &str, accept: &'static str) -> wiremock::MockBuilder {
    Mock::given(method("GET"))
        .and(path(p))
        .and(header("authorization", "Bearer gh-token"))
        .and(header("accept", accept))
        .and(header("x-github-api-version", "2022-11-28"))
        .and(header("user-agent", "flotilla"))
}

#[tokio::test]
async fn github_returns_the_raw_bytes_of_a_file_at_a_commit() {
    let server = MockServer::start().await;
    let bytes = b"on: push\n\xff\x00raw".to_vec();
    github_get(
        "/repos/o/r/contents/dir/.ci.yaml",
        "application/vnd.github.raw+json",
    )
    .and(query_param("ref", SHA))
    .respond_with(ResponseTemplate::new(200).set_body_bytes(bytes.clone()))
    .expect(1)
    .mount(&server)
    .await;
    let f = github(&server)
        .await
        .read_file(
            &github_project("https://github.com/o/r.git"),
            &at("refs/heads/main", SHA),
            "dir/.ci.yaml",
        )
        .await
        .unwrap();
    assert_eq!(
        f,
        FetchedFile {
            sha: SHA.into(),
            contents: Some(bytes)
        }
    );
}

#[tokio::test]
async fn github_reports_a_missing_file_at_an_existing_commit_as_none() {
    let server = MockServer::start().await;
    github_get(
        "/repos/o/r/contents/.ci.yaml",
        "application/vnd.github.raw+json",
    )
    .respond_with(ResponseTemplate::new(404))
    .expect(1)
    .mount(&server)
    .await;
    github_get(
        &format!("/repos/o/r/commits/{SHA}"),
        "application/vnd.github.sha",
    )
    .respond_with(ResponseTemplate::new(200).set_body_string(SHA))
    .expect(1)
    .mount(&server)
    .await;
    let f = github(&server)
        .await
        .read_file(
            &github_project("https://github.com/o/r"),
            &at("main", SHA),
            ".ci.yaml",
        )
        .await
        .unwrap();
    assert_eq!(
        f,
        FetchedFile {
            sha: SHA.into(),
            contents: None
        }
    );
}

#[tokio::test]
async fn github_reports_an_unknown_commit_as_not_found() {
    let server = MockServer::start().await;
    github_get(
        "/repos/o/r/contents/.ci.yaml",
        "application/vnd.github.raw+json",
    )
    .respond_with(ResponseTemplate::new(404))
    .mount(&server)
    .await;
    github_get(
        &format!("/repos/o/r/commits/{SHA}"),
        "application/vnd.github.sha",
    )
    .respond_with(ResponseTemplate::new(422))
    .mount(&server)
    .await;
    let err = github(&server)
        .await
        .read_file(
            &github_project("https://github.com/o/r"),
            &at("main", SHA),
            ".ci.yaml",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn github_resolves_a_ref_to_its_head_before_reading() {
    let server = MockServer::start().await;
    github_get(
        "/repos/o/r/commits/heads/feature/x",
        "application/vnd.github.sha",
    )
    .respond_with(ResponseTemplate::new(200).set_body_string(SHA))
    .expect(1)
    .mount(&server)
    .await;
    github_get(
        "/repos/o/r/contents/.ci.yaml",
        "application/vnd.github.raw+json",
    )
    .and(query_param("ref", SHA))
    .respond_with(ResponseTemplate::new(200).set_body_string("x: 1"))
    .expect(1)
    .mount(&server)
    .await;
    let f = github(&server)
        .await
        .read_file(
            &github_project("https://github.com/o/r.git"),
            &head_of("refs/heads/feature/x"),
            ".ci.yaml",
        )
        .await
        .unwrap();
    assert_eq!((f.sha.as_str(), contents(&f)), (SHA, Some("x: 1")));

    // An unknown ref is NotFound, not "no file".
    let err = github(&server)
        .await
        .read_file(
            &github_project("https://github.com/o/r"),
            &head_of("nope"),
            ".ci.yaml",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
}

/// Reads `.ci.yaml` from a GitHub server that answers every request with `resp`.
async fn github_error(resp: ResponseTemplate) -> RepoError {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(resp)
        .mount(&server)
        .await;
    github(&server)
        .await
        .read_file(
            &github_project("https://github.com/o/r"),
            &at("main", SHA),
            ".ci.yaml",
        )
        .await
        .unwrap_err()
}

#[tokio::test]
async fn github_statuses_map_to_denied_or_unavailable() {
    let denied = github_error(ResponseTemplate::new(401)).await;
    assert!(matches!(denied, RepoError::Denied(_)), "{denied:?}");
    let forbidden = github_error(ResponseTemplate::new(403)).await;
    assert!(matches!(forbidden, RepoError::Denied(_)), "{forbidden:?}");
    let limited = github_error(
        ResponseTemplate::new(403)
            .insert_header("x-ratelimit-remaining", "0")
            .insert_header("x-ratelimit-reset", "1700000000"),
    )
    .await;
    assert!(matches!(limited, RepoError::Unavailable(_)), "{limited:?}");
    let too_many = github_error(ResponseTemplate::new(429)).await;
    assert!(
        matches!(too_many, RepoError::Unavailable(_)),
        "{too_many:?}"
    );
    let broken = github_error(ResponseTemplate::new(500)).await;
    assert!(matches!(broken, RepoError::Unavailable(_)), "{broken:?}");
    // No message carries the token.
    for e in [denied, forbidden, limited, too_many, broken] {
        assert!(!e.to_string().contains("gh-token"), "{e}");
    }
}

#[tokio::test]
async fn github_requests_that_outlive_their_timeout_are_unavailable() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(10)))
        .mount(&server)
        .await;
    let err = github(&server)
        .await
        .with_timeout(Duration::from_millis(200))
        .read_file(
            &github_project("https://github.com/o/r"),
            &at("main", SHA),
            ".ci.yaml",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn github_refuses_a_file_over_the_size_limit() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string("0123456789"))
        .mount(&server)
        .await;
    let err = github(&server)
        .await
        .with_max_file_bytes(9)
        .read_file(
            &github_project("https://github.com/o/r"),
            &at("main", SHA),
            ".ci.yaml",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Invalid(_)), "{err:?}");
}

#[tokio::test]
async fn github_enterprise_api_bases_keep_their_path_and_other_hosts_are_refused() {
    let server = MockServer::start().await;
    github_get(
        "/api/v3/repos/o/r/contents/.ci.yaml",
        "application/vnd.github.raw+json",
    )
    .respond_with(ResponseTemplate::new(200).set_body_string("ok"))
    .expect(1)
    .mount(&server)
    .await;
    let api = GithubApi::new(
        "ghe.example.com",
        Some(&format!("{}/api/v3/", server.uri())),
        Token::new("gh-token").unwrap(),
    )
    .unwrap();
    let f = api
        .read_file(
            &github_project("https://ghe.example.com/o/r.git"),
            &at("main", SHA),
            ".ci.yaml",
        )
        .await
        .unwrap();
    assert_eq!(contents(&f), Some("ok"));
    for url in [
        "https://github.com/o/r",
        "https://ghe.example.com/o",
        "https://ghe.example.com/o/r/extra",
        "ssh://ghe.example.com/o/r",
    ] {
        let err = api
            .read_file(&github_project(url), &at("main", SHA), ".ci.yaml")
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::Invalid(_)), "{url}: {err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// GitLab

async fn gitlab_for(server: &MockServer) -> (GitlabApi, RepoLocation) {
    let host = server.address().to_string();
    let api = GitlabApi::new(&host, None, Token::new("gl-token").unwrap())
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let repo = RepoLocation {
        provider: Provider::Gitlab,
        url: format!("{}/group/sub/project.git", server.uri()),
    };
    (api, repo)
}

fn gitlab_get(p: &str) -> wiremock::MockBuilder {
    Mock::given(method("GET"))
        .and(path(p))
        .and(header("authorization", "Bearer gl-token"))
        .and(header("user-agent", "flotilla"))
}

const GITLAB_FILE: &str =
    "/api/v4/projects/group%2Fsub%2Fproject/repository/files/dir%2F.ci.yaml/raw";

#[tokio::test]
async fn gitlab_encodes_the_project_and_the_file_path_as_single_segments() {
    let server = MockServer::start().await;
    gitlab_get(GITLAB_FILE)
        .and(query_param("ref", SHA))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"a: \xfe".to_vec()))
        .expect(1)
        .mount(&server)
        .await;
    let (api, repo) = gitlab_for(&server).await;
    let f = api
        .read_file(&repo, &at("main", SHA), "dir/.ci.yaml")
        .await
        .unwrap();
    assert_eq!(
        f,
        FetchedFile {
            sha: SHA.into(),
            contents: Some(b"a: \xfe".to_vec())
        }
    );
}

#[tokio::test]
async fn gitlab_reports_a_missing_file_as_none_and_an_unknown_commit_as_not_found() {
    let server = MockServer::start().await;
    gitlab_get(GITLAB_FILE)
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    gitlab_get(&format!(
        "/api/v4/projects/group%2Fsub%2Fproject/repository/commits/{SHA}"
    ))
    .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "id": SHA })))
    .mount(&server)
    .await;
    let (api, repo) = gitlab_for(&server).await;
    let f = api
        .read_file(&repo, &at("main", SHA), "dir/.ci.yaml")
        .await
        .unwrap();
    assert_eq!(
        f,
        FetchedFile {
            sha: SHA.into(),
            contents: None
        }
    );

    let other = "fedcba9876543210fedcba9876543210fedcba98";
    let err = api
        .read_file(&repo, &at("main", other), "dir/.ci.yaml")
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn gitlab_resolves_a_ref_to_its_head_before_reading() {
    let server = MockServer::start().await;
    gitlab_get("/api/v4/projects/group%2Fsub%2Fproject/repository/commits/refs%2Fheads%2Fmain")
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "id": SHA, "short_id": "0123456" })),
        )
        .expect(1)
        .mount(&server)
        .await;
    gitlab_get(GITLAB_FILE)
        .and(query_param("ref", SHA))
        .respond_with(ResponseTemplate::new(200).set_body_string("b: 2"))
        .expect(1)
        .mount(&server)
        .await;
    let (api, repo) = gitlab_for(&server).await;
    let f = api
        .read_file(&repo, &head_of("refs/heads/main"), "dir/.ci.yaml")
        .await
        .unwrap();
    assert_eq!((f.sha.as_str(), contents(&f)), (SHA, Some("b: 2")));
}

/// Reads a file from a GitLab server that answers every request with `resp`.
async fn gitlab_error(resp: ResponseTemplate) -> RepoError {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(resp)
        .mount(&server)
        .await;
    let (api, repo) = gitlab_for(&server).await;
    api.read_file(&repo, &at("main", SHA), ".ci.yaml")
        .await
        .unwrap_err()
}

#[tokio::test]
async fn gitlab_statuses_map_to_denied_or_unavailable() {
    let denied = gitlab_error(ResponseTemplate::new(401)).await;
    assert!(matches!(denied, RepoError::Denied(_)), "{denied:?}");
    let limited =
        gitlab_error(ResponseTemplate::new(403).insert_header("ratelimit-remaining", "0")).await;
    assert!(matches!(limited, RepoError::Unavailable(_)), "{limited:?}");
    let too_many =
        gitlab_error(ResponseTemplate::new(429).insert_header("retry-after", "60")).await;
    assert!(
        matches!(too_many, RepoError::Unavailable(_)),
        "{too_many:?}"
    );
    let broken = gitlab_error(ResponseTemplate::new(502)).await;
    assert!(matches!(broken, RepoError::Unavailable(_)), "{broken:?}");
    for e in [denied, limited, too_many, broken] {
        assert!(!e.to_string().contains("gl-token"), "{e}");
    }
}

#[tokio::test]
async fn gitlab_uses_a_configured_api_base_instead_of_the_project_host() {
    let server = MockServer::start().await;
    gitlab_get("/gitlab/api/v4/projects/team%2Fapp/repository/files/.ci.yaml/raw")
        .and(query_param("ref", SHA))
        .respond_with(ResponseTemplate::new(200).set_body_string("c: 3"))
        .expect(1)
        .mount(&server)
        .await;
    let api = GitlabApi::new(
        "gitlab.example.com",
        Some(&format!("{}/gitlab", server.uri())),
        Token::new("gl-token").unwrap(),
    )
    .unwrap();
    let repo = RepoLocation {
        provider: Provider::Gitlab,
        url: "https://gitlab.example.com/team/app".into(),
    };
    let f = api
        .read_file(&repo, &at("main", SHA), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(contents(&f), Some("c: 3"));
}

// ---------------------------------------------------------------------------------------------
// RoutedSource and configuration

fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p
}

#[tokio::test]
async fn a_github_project_without_a_configured_token_is_read_with_git() {
    let server = MockServer::start().await;
    let cache = tempfile::tempdir().unwrap();
    let routed = RoutedSource::new(cache.path().join("repos"), &RepoConfig::default()).unwrap();
    let repo = github_project(&format!("{}/o/r.git", server.uri()));
    assert_eq!(routed.route(&repo), Route::Git);
    // The mock server answers 404 to everything, so git finds no repository there.
    let err = routed
        .read_file(&repo, &at("main", SHA), ".ci.yaml")
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotFound(_)), "{err:?}");
    let requests = server.received_requests().await.unwrap();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.url.path() == "/o/r.git/info/refs"),
        "only git's smart-HTTP discovery was asked: {:?}",
        requests
            .iter()
            .map(|r| r.url.path().to_owned())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_github_project_on_the_configured_host_is_read_through_the_api() {
    let server = MockServer::start().await;
    let cache = tempfile::tempdir().unwrap();
    Mock::given(method("GET"))
        .and(path("/repos/o/r/contents/.ci.yaml"))
        .and(header("authorization", "Bearer from-file"))
        .respond_with(ResponseTemplate::new(200).set_body_string("api"))
        .expect(1)
        .mount(&server)
        .await;
    let config = RepoConfig {
        github: Some(GithubConfig {
            host: server.address().to_string(),
            api_base: Some(server.uri()),
            token_file: token_file(cache.path(), "gh", "from-file"),
            request_timeout_secs: 5,
        }),
        ..RepoConfig::default()
    };
    let routed = RoutedSource::new(cache.path().join("repos"), &config).unwrap();
    let repo = github_project(&format!("{}/o/r", server.uri()));
    assert_eq!(routed.route(&repo), Route::GithubApi);
    let f = routed
        .read_file(&repo, &at("main", SHA), ".ci.yaml")
        .await
        .unwrap();
    assert_eq!(contents(&f), Some("api"));
}

#[tokio::test]
async fn routing_sends_file_urls_plain_git_projects_and_other_hosts_to_git() {
    let cache = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        github: Some(GithubConfig {
            host: "github.com".into(),
            api_base: None,
            token_file: token_file(cache.path(), "gh", "t1"),
            request_timeout_secs: 5,
        }),
        gitlab: Some(GitlabConfig {
            host: "gitlab.example.com".into(),
            api_base: None,
            token_file: token_file(cache.path(), "gl", "t2"),
            request_timeout_secs: 5,
        }),
        ..RepoConfig::default()
    };
    let routed = RoutedSource::new(cache.path().join("repos"), &config).unwrap();
    let route = |provider, url: &str| {
        routed.route(&RepoLocation {
            provider,
            url: url.into(),
        })
    };
    assert_eq!(
        route(Provider::Github, "https://github.com/o/r.git"),
        Route::GithubApi
    );
    assert_eq!(
        route(Provider::Github, "https://GitHub.com/o/r"),
        Route::GithubApi
    );
    assert_eq!(
        route(Provider::Gitlab, "https://gitlab.example.com/g/p"),
        Route::GitlabApi
    );
    assert_eq!(route(Provider::Github, "file:///srv/git/r.git"), Route::Git);
    assert_eq!(route(Provider::Gitlab, "file:///srv/git/r.git"), Route::Git);
    assert_eq!(
        route(Provider::Git, "https://github.com/o/r.git"),
        Route::Git
    );
    assert_eq!(
        route(Provider::Github, "https://ghe.corp.example/o/r"),
        Route::Git
    );
    assert_eq!(
        route(Provider::Gitlab, "https://gitlab.com/g/p"),
        Route::Git
    );
    assert_eq!(
        route(Provider::Gitlab, "https://github.com/o/r"),
        Route::Git
    );
    assert_eq!(route(Provider::Github, "not a url"), Route::Git);

    let shown = format!("{routed:?}");
    assert!(!shown.contains("t1") && !shown.contains("t2"), "{shown}");
    assert!(shown.contains("<redacted>"));
}

#[test]
fn repo_config_has_named_defaults_and_refuses_unknown_fields() {
    let c: RepoConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c.max_file_bytes, 1024 * 1024);
    assert_eq!(c.git.fetch_timeout_secs, 60);
    assert_eq!(c.git.ref_fetch_depth, 50);
    assert!(c.github.is_none() && c.gitlab.is_none());
    assert!(c.validate().is_ok());

    let c: RepoConfig = serde_json::from_str(
        r#"{"github": {"token_file": "/run/secrets/gh"},
            "git": {"credentials": [{"host": "git.example.com", "token_file": "/t"}]}}"#,
    )
    .unwrap();
    let gh = c.github.as_ref().unwrap();
    assert_eq!(
        (gh.host.as_str(), gh.api_base.as_deref()),
        ("github.com", None)
    );
    assert_eq!(gh.request_timeout_secs, 30);
    assert_eq!(c.git.credentials[0].username, "x-access-token");

    for bad in [
        r#"{"max_file_byte": 1}"#,
        r#"{"github": {"token_file": "/t", "token": "inline"}}"#,
        r#"{"git": {"timeout": 1}}"#,
    ] {
        assert!(serde_json::from_str::<RepoConfig>(bad).is_err(), "{bad}");
    }
}

#[test]
fn repo_config_validation_refuses_values_that_cannot_work() {
    let mut c = RepoConfig::default();
    c.git.fetch_timeout_secs = 0;
    assert!(c.validate().is_err());

    let c = RepoConfig {
        github: Some(GithubConfig {
            host: "github.com".into(),
            api_base: Some("ftp://api.example.com".into()),
            token_file: "/t".into(),
            request_timeout_secs: 5,
        }),
        ..RepoConfig::default()
    };
    assert!(c.validate().is_err());

    let c = RepoConfig {
        gitlab: Some(GitlabConfig {
            host: "https://gitlab.com/".into(),
            api_base: None,
            token_file: "/t".into(),
            request_timeout_secs: 5,
        }),
        ..RepoConfig::default()
    };
    assert!(c.validate().is_err());
}

#[test]
fn missing_or_empty_token_files_stop_construction_without_showing_the_token() {
    let cache = tempfile::tempdir().unwrap();
    let github = |token_file: PathBuf| RepoConfig {
        github: Some(GithubConfig {
            host: "github.com".into(),
            api_base: None,
            token_file,
            request_timeout_secs: 5,
        }),
        ..RepoConfig::default()
    };
    let missing = RoutedSource::new(cache.path().join("r"), &github(cache.path().join("absent")));
    assert!(matches!(missing, Err(RepoSetupError::TokenFile { .. })));
    let empty = RoutedSource::new(
        cache.path().join("r"),
        &github(token_file(cache.path(), "empty", "  ")),
    );
    assert!(matches!(empty, Err(RepoSetupError::BadToken { .. })));
    let spaced = RoutedSource::new(
        cache.path().join("r"),
        &github(token_file(cache.path(), "spaced", "sec ret")),
    );
    let err = spaced.unwrap_err().to_string();
    assert!(!err.contains("sec ret") && !err.contains("sec"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Shared checks

#[test]
fn forge_project_urls_name_owner_and_repository() {
    let (_, s) = project_segments("https://github.com/o/r.git", "github.com", 2, 2).unwrap();
    assert_eq!(s, ["o", "r"]);
    let (_, s) = project_segments("https://github.com/o/r/", "github.com", 2, 2).unwrap();
    assert_eq!(s, ["o", "r"]);
    let (_, s) =
        project_segments("https://gl.example:8443/a/b/c", "gl.example:8443", 2, 21).unwrap();
    assert_eq!(s, ["a", "b", "c"]);
    let (_, s) = project_segments("https://gl.example/a/my%20app", "gl.example", 2, 21).unwrap();
    assert_eq!(s, ["a", "my app"]);
    for bad in [
        "https://github.com/o",
        "https://github.com/o/r/tree",
        "https://github.com/o/../r",
        "https://gitlab.com/o/r",
        "https://u:p@github.com/o/r",
        "https://github.com/o/r?x",
        "file:///o/r",
    ] {
        assert!(project_segments(bad, "github.com", 2, 2).is_err(), "{bad}");
    }
}

#[test]
fn urls_in_errors_have_their_credentials_hidden() {
    assert_eq!(
        redact_url("https://user:hunter2@example.com/r"),
        r#""https://***@example.com/r""#
    );
    assert_eq!(
        redact_url("https://a:b/c@d@e.com/r"),
        r#""https://***@e.com/r""#
    );
    assert_eq!(
        redact_url("https://example.com/r"),
        r#""https://example.com/r""#
    );
    let err = project_segments("https://u:hunter2@github.com/o/r", "github.com", 2, 2)
        .unwrap_err()
        .to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn shas_refs_and_paths_are_checked() {
    assert_eq!(check_sha(&"A".repeat(40)).unwrap(), "a".repeat(40));
    assert!(check_sha(&"a".repeat(64)).is_ok());
    assert!(check_sha(&"a".repeat(41)).is_err());
    for ok in [
        "refs/heads/main",
        "main",
        "refs/heads/feature/x",
        "refs/pull/1/head",
        "v1.2",
    ] {
        assert!(check_ref(ok).is_ok(), "{ok}");
    }
    for bad in [
        "", "-x", "+x", "^x", "a:b", "a b", "a..b", "a@{1}", "x.lock", "a/.b", "/a", "a/",
    ] {
        assert!(check_ref(bad).is_err(), "{bad:?}");
    }
    for ok in [".ci.yaml", "dir/.ci.yaml", "a b/c"] {
        assert!(check_path(ok).is_ok(), "{ok}");
    }
    for bad in ["", "/a", "a/../b", "a//b", "./a", "a\nb", "a/"] {
        assert!(check_path(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn tokens_are_trimmed_checked_and_never_shown() {
    let t = Token::new("  abc123\n").unwrap();
    assert_eq!(t.expose(), "abc123");
    assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    assert!(Token::new("").is_err());
    assert!(Token::new("a b").is_err());
    assert!(Token::new("a\u{e9}").is_err());
}
