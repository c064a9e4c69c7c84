//! The conformance suite on the embedded adapters ([`DirLogStore`], [`DirArtifactStore`]),
//! one test per case, plus what only the directory layout can show.

use std::path::{Path, PathBuf};

use flotilla_core::ids::{Attempt, BuildId, JobId, ProjectId};
use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{ArtifactStore, AttemptKey, LogStore, StoreError, StoredArtifact};
use flotilla_stores::conformance::{self, Damage, Harness, write_pseudo_random_file};
use flotilla_stores::dir::{DirArtifactStore, DirLogStore};
use tempfile::TempDir;

/// Both stores below one temporary root, and a scratch directory.
struct Fixture {
    root: TempDir,
    scratch: TempDir,
    logs: DirLogStore,
    artifacts: DirArtifactStore,
}

impl Fixture {
    fn new() -> Fixture {
        let root = tempfile::tempdir().expect("tempdir");
        Fixture {
            logs: DirLogStore::new(root.path()),
            artifacts: DirArtifactStore::new(root.path()),
            root,
            scratch: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn object(&self, key: &str) -> PathBuf {
        self.root.path().join(key)
    }
}

impl Harness for Fixture {
    fn tamper<'a>(&'a self, key: &'a str, change: &'a Damage) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // In place, as a failing disk would: no temporary file, no rename.
            let path = self.object(key);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            std::fs::write(&path, change(bytes)).expect("overwrite");
        })
    }

    fn presigns(&self) -> bool {
        false
    }

    fn http_get<'a>(&'a self, url: &'a str) -> BoxFuture<'a, (u16, Vec<u8>)> {
        panic!("the directory store presigns no URL, yet {url} was fetched")
    }
}

macro_rules! log_cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let f = Fixture::new();
            conformance::$case(&f.logs, &f).await;
        }
    )*};
}

macro_rules! artifact_cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let f = Fixture::new();
            conformance::$case(&f.artifacts, &f, f.scratch.path()).await;
        }
    )*};
}

flotilla_stores::for_each_log_store_case!(log_cases);

flotilla_stores::for_each_artifact_store_case!(artifact_cases);

#[tokio::test]
async fn every_case_passes_with_all_cases_sharing_one_store() {
    let f = Fixture::new();
    conformance::log_store_suite(&f.logs, &f).await;
    conformance::artifact_store_suite(&f.artifacts, &f, f.scratch.path()).await;
    assert_eq!(f.logs.name(), "dir");
    assert_eq!(f.artifacts.name(), "dir");
}

fn attempt() -> AttemptKey {
    AttemptKey {
        project: ProjectId::new("acme").expect("valid"),
        build: BuildId(1),
        job: JobId(1),
        attempt: Attempt::FIRST,
    }
}

fn file(dir: &Path, name: &str, len: u64, seed: u64) -> (PathBuf, String) {
    let path = dir.join(name);
    let sha = write_pseudo_random_file(&path, len, seed).expect("write");
    (path, sha)
}

#[tokio::test]
async fn artifacts_named_like_metadata_coexist_with_the_artifacts_they_shadow() {
    // A `{path}.sha256` sidecar, or a `.meta/` tree inside the attempt's prefix, would
    // collide with artifacts so named; the mirrored tree outside `artifacts/` cannot.
    let f = Fixture::new();
    let key = attempt();
    let mut expected = Vec::new();
    for (i, path) in ["a", "a.sha256", ".meta/a", "sub/.meta"]
        .into_iter()
        .enumerate()
    {
        let (src, sha256) = file(
            f.scratch.path(),
            &format!("in-{i}"),
            100 + i as u64,
            i as u64,
        );
        f.artifacts
            .put_file(&key, path, &src, &sha256)
            .await
            .expect("put_file");
        expected.push((
            StoredArtifact {
                path: path.into(),
                size: 100 + i as u64,
                sha256,
            },
            src,
        ));
    }
    let mut want: Vec<_> = expected.iter().map(|(a, _)| a.clone()).collect();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(f.artifacts.list(&key).await.expect("list"), want);
    for (artifact, src) in &expected {
        let dest = f.scratch.path().join("out");
        f.artifacts
            .get_file(&key, &artifact.path, &dest)
            .await
            .expect("get_file");
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(src).unwrap(),
            "{}",
            artifact.path
        );
    }
    // The bytes are stored as they are, at the layout's path.
    let stored = f.object(&format!("{}a.sha256", key.artifact_prefix()));
    assert_eq!(
        std::fs::read(stored).unwrap(),
        std::fs::read(&expected[1].1).unwrap()
    );
}

#[tokio::test]
async fn open_streams_pieces_of_at_most_64_kib() {
    let f = Fixture::new();
    let key = attempt();
    let (src, sha256) = file(f.scratch.path(), "in", 300 * 1024 + 1, 1);
    f.artifacts
        .put_file(&key, "x.bin", &src, &sha256)
        .await
        .expect("put_file");
    let mut source = f.artifacts.open(&key, "x.bin").await.expect("open");
    let mut sizes = Vec::new();
    while let Some(piece) = source.next_chunk().await.expect("piece") {
        sizes.push(piece.len());
    }
    assert_eq!(sizes, [65536, 65536, 65536, 65536, 45057]);
}

#[tokio::test]
async fn writes_leave_no_temporary_files_and_a_failed_put_leaves_nothing() {
    let f = Fixture::new();
    let key = attempt();
    let (src, sha256) = file(f.scratch.path(), "in", 5000, 2);
    f.artifacts
        .put_file(&key, "ok.bin", &src, &sha256)
        .await
        .expect("put_file");
    let wrong = "1".repeat(64);
    assert!(
        f.artifacts
            .put_file(&key, "bad.bin", &src, &wrong)
            .await
            .is_err()
    );
    let line = flotilla_core::store::LogLine {
        seq: 0,
        ts: 0,
        stream: flotilla_core::runner::Stream::Stdout,
        step: None,
        text: "x".into(),
    };
    let chunk = flotilla_core::store::LogChunk { lines: vec![line] };
    f.logs.put_chunk(&key, &chunk).await.expect("put_chunk");
    let tmp = f.root.path().join(".tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temporary files left"
    );
    assert!(
        !f.object(&format!("{}bad.bin", key.artifact_prefix()))
            .exists()
    );
}

#[tokio::test]
async fn a_directory_of_artifacts_is_not_found_as_an_artifact() {
    let f = Fixture::new();
    let key = attempt();
    let (src, sha256) = file(f.scratch.path(), "in", 10, 3);
    f.artifacts
        .put_file(&key, "dir/file.bin", &src, &sha256)
        .await
        .expect("put_file");
    let dest = f.scratch.path().join("out");
    let got = f.artifacts.get_file(&key, "dir", &dest).await;
    assert!(matches!(got, Err(StoreError::NotFound(_))), "{got:?}");
    let open = f.artifacts.open(&key, "dir").await.err();
    assert!(matches!(open, Some(StoreError::NotFound(_))), "{open:?}");
    assert!(!dest.exists());
}
