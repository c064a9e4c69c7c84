//! The conformance suites every [`LogStore`], [`ArtifactStore`] and [`LogStream`] adapter must
//! pass: the ports' contract, written once, so the embedded adapters and the production ones
//! (S3, Kafka) cannot drift apart.
//!
//! [`log_store_suite`], [`artifact_store_suite`] and [`log_stream_suite`] run every case; each
//! case is also its own public function, so an adapter's tests can run one test per case and
//! a failure names it. Every case uses its own [`AttemptKey`]s (build number = case number)
//! and, on a stream, its own consumer groups (`conformance-{case}-…`), so all cases can share
//! one store or stream.
//!
//! Some claims need more than the port: corrupting an object behind the store's back, and
//! fetching a presigned URL. A [`Harness`] supplies those for each adapter.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::RangeInclusive;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_core::ids::{Attempt, BuildId, Fence, JobId, ProjectId};
use flotilla_core::repo::BoxFuture;
use flotilla_core::runner::Stream;
use flotilla_core::store::{
    ArtifactStore, AttemptKey, ChunkRef, LOG_FORMAT_VERSION, LogChunk, LogLine, LogManifest,
    LogRead, LogStore, LogStream, LogStreamConsumer, Shipped, StoreError, StoredArtifact,
    StreamPosition, plain_text_line,
};
use futures::FutureExt;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::chunk::chunk_key;

/// A change made to a stored object's bytes behind the store's back.
pub type Damage = dyn Fn(Vec<u8>) -> Vec<u8> + Sync;

/// What the suite needs beside the store under test.
pub trait Harness: Sync {
    /// Replaces the bytes of the stored object at `key` (a layout key such as
    /// `logs/…/chunk-….zst` or `artifacts/…/{path}`) with `change(bytes)`, keeping whatever
    /// metadata the object carries, behind the store's back (as a failing disk or a careless
    /// operator would). Panics if the object does not exist.
    fn tamper<'a>(&'a self, key: &'a str, change: &'a Damage) -> BoxFuture<'a, ()>;

    /// Whether the store under test hands out presigned URLs.
    fn presigns(&self) -> bool;

    /// A plain HTTP GET of `url`: the status and the body. Only called when
    /// [`Harness::presigns`].
    fn http_get<'a>(&'a self, url: &'a str) -> BoxFuture<'a, (u16, Vec<u8>)>;
}

/// Calls macro `$m` with every log store case's name (the suite and the per-case tests of
/// each adapter share this one list).
#[macro_export]
macro_rules! for_each_log_store_case {
    ($m:ident) => {
        $m!(
            chunks_put_out_of_order_read_back_in_seq_order,
            a_chunk_written_again_with_more_lines_replaces_it,
            overlapping_chunks_are_read_once,
            lines_only_in_a_rewritten_earlier_chunk_are_not_skipped_when_following,
            reads_page_by_after_and_limit,
            lines_past_a_missing_chunk_wait_until_it_is_written,
            a_log_is_complete_only_after_finish_and_its_last_line_is_read,
            a_manifest_reads_back_as_written,
            empty_and_unordered_chunks_and_inconsistent_manifests_are_refused,
            attempts_are_isolated,
            a_corrupt_chunk_is_an_error_naming_it,
            a_corrupt_manifest_is_an_error_naming_it,
            a_complete_log_missing_lines_is_corrupt,
        );
    };
}

/// Calls macro `$m` with every artifact store case's name.
#[macro_export]
macro_rules! for_each_artifact_store_case {
    ($m:ident) => {
        $m!(
            put_list_and_get_round_trip_byte_identical,
            a_wrong_declared_sha256_is_corrupt_and_nothing_is_kept,
            unsafe_paths_are_refused,
            a_missing_artifact_is_not_found,
            a_corrupted_object_fails_get_and_open_and_leaves_no_file,
            open_streams_the_same_bytes,
            a_multi_part_file_round_trips,
            putting_a_path_again_replaces_it,
            delete_attempt_removes_only_that_attempt,
            presigned_urls_fetch_one_artifact_for_a_bounded_time,
        );
    };
}

/// Runs every log case, naming the one that fails.
pub async fn log_store_suite(store: &dyn LogStore, harness: &dyn Harness) {
    macro_rules! run {
        ($($case:ident),* $(,)?) => {
            $( named(stringify!($case), $case(store, harness)).await; )*
        };
    }
    crate::for_each_log_store_case!(run);
}

/// Runs every artifact case, naming the one that fails. `scratch` is an empty directory
/// for the files the cases upload and download.
pub async fn artifact_store_suite(
    store: &dyn ArtifactStore,
    harness: &dyn Harness,
    scratch: &Path,
) {
    macro_rules! run {
        ($($case:ident),* $(,)?) => {
            $(
                let dir = scratch.join(stringify!($case));
                named(stringify!($case), $case(store, harness, &dir)).await;
            )*
        };
    }
    crate::for_each_artifact_store_case!(run);
}

async fn named(case: &str, run: impl Future<Output = ()>) {
    if let Err(panic) = AssertUnwindSafe(run).catch_unwind().await {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!("conformance case `{case}` failed: {why}");
    }
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

/// Chunks put in any order read back as one log in sequence order.
pub async fn chunks_put_out_of_order_read_back_in_seq_order(store: &dyn LogStore, _: &dyn Harness) {
    let key = key_of(1, 1);
    let later = put(store, &key, 10..=19).await;
    assert_eq!(
        later,
        ChunkRef {
            first_seq: 10,
            last_seq: 19,
            bytes: later.bytes
        }
    );
    assert!(later.bytes > 0);
    put(store, &key, 0..=9).await;
    put(store, &key, 20..=24).await;
    assert_eq!(read_all(store, &key).await, lines(0..=24));
}

/// A chunk written again from the same first line, with more lines, replaces the first.
pub async fn a_chunk_written_again_with_more_lines_replaces_it(
    store: &dyn LogStore,
    _: &dyn Harness,
) {
    let key = key_of(2, 1);
    put(store, &key, 0..=4).await;
    assert_eq!(read_all(store, &key).await, lines(0..=4));
    put(store, &key, 0..=9).await;
    assert_eq!(read_all(store, &key).await, lines(0..=9));
}

/// Chunks that overlap (a rewrite reaching into the next chunk) yield each line once.
pub async fn overlapping_chunks_are_read_once(store: &dyn LogStore, _: &dyn Harness) {
    let key = key_of(3, 1);
    put(store, &key, 0..=9).await;
    put(store, &key, 5..=14).await;
    put(store, &key, 10..=12).await;
    assert_eq!(read_all(store, &key).await, lines(0..=14));
}

/// A follower past the end of later chunks still gets lines that only a rewritten earlier
/// chunk holds (`chunk-0` rewritten to 0..=25 while `chunk-11` holds 11..=20): skipping a
/// chunk because the next one starts before the wanted line would lose them.
pub async fn lines_only_in_a_rewritten_earlier_chunk_are_not_skipped_when_following(
    store: &dyn LogStore,
    _: &dyn Harness,
) {
    let key = key_of(4, 1);
    put(store, &key, 0..=10).await;
    put(store, &key, 11..=20).await;
    let first = read(store, &key, None, 1000).await;
    assert_eq!(first.lines, lines(0..=20));
    put(store, &key, 0..=25).await;
    let next = read(store, &key, Some(20), 1000).await;
    assert_eq!(
        next.lines,
        lines(21..=25),
        "lines only in the rewritten chunk-0"
    );
    put(store, &key, 26..=30).await;
    assert_eq!(
        read(store, &key, Some(25), 1000).await.lines,
        lines(26..=30)
    );
    assert_eq!(read(store, &key, Some(30), 1000).await.lines, vec![]);
}

/// `read(after, limit)` returns at most `limit` lines after `after`, and paging by the last
/// line read visits every line once.
pub async fn reads_page_by_after_and_limit(store: &dyn LogStore, _: &dyn Harness) {
    let key = key_of(5, 1);
    for range in [0..=9, 10..=19, 20..=29] {
        put(store, &key, range).await;
    }
    assert_eq!(read(store, &key, None, 7).await.lines, lines(0..=6));
    assert_eq!(read(store, &key, Some(6), 7).await.lines, lines(7..=13));
    assert_eq!(read(store, &key, Some(8), 1).await.lines, lines(9..=9));
    assert_eq!(read(store, &key, Some(25), 100).await.lines, lines(26..=29));
    assert_eq!(read(store, &key, Some(29), 100).await.lines, vec![]);
    assert_eq!(read(store, &key, Some(u64::MAX), 100).await.lines, vec![]);
    assert_eq!(read(store, &key, None, 0).await.lines, vec![]);
    assert_eq!(read_all(store, &key).await, lines(0..=29));
}

/// Lines after a chunk not yet written are held back until it is: a follower that jumped
/// the gap would never see the lines in it.
pub async fn lines_past_a_missing_chunk_wait_until_it_is_written(
    store: &dyn LogStore,
    _: &dyn Harness,
) {
    let key = key_of(6, 1);
    put(store, &key, 10..=19).await;
    let early = read(store, &key, None, 100).await;
    assert_eq!(early, LogRead::default(), "nothing before line 0 is stored");
    put(store, &key, 0..=9).await;
    assert_eq!(read(store, &key, None, 100).await.lines, lines(0..=19));
}

/// `complete` is false until the manifest exists and the reader has its last line.
pub async fn a_log_is_complete_only_after_finish_and_its_last_line_is_read(
    store: &dyn LogStore,
    _: &dyn Harness,
) {
    let key = key_of(7, 1);
    let chunk = put(store, &key, 0..=9).await;
    assert!(
        !read(store, &key, None, 100).await.complete,
        "no manifest yet"
    );
    store
        .finish(&key, &manifest_for(&lines(0..=9), vec![chunk]))
        .await
        .expect("finish");
    let head = read(store, &key, None, 5).await;
    assert_eq!((head.lines, head.complete), (lines(0..=4), false));
    let tail = read(store, &key, Some(4), 100).await;
    assert_eq!((tail.lines, tail.complete), (lines(5..=9), true));
    let after = read(store, &key, Some(9), 100).await;
    assert_eq!((after.lines, after.complete), (vec![], true));

    let empty = key_of(7, 2);
    store
        .finish(&empty, &manifest_for(&[], vec![]))
        .await
        .expect("finish an empty log");
    let read_empty = read(store, &empty, None, 100).await;
    assert_eq!((read_empty.lines, read_empty.complete), (vec![], true));
}

/// The manifest reads back exactly as written, and is absent before `finish`.
pub async fn a_manifest_reads_back_as_written(store: &dyn LogStore, _: &dyn Harness) {
    let key = key_of(8, 1);
    assert_eq!(store.manifest(&key).await.expect("manifest"), None);
    let a = put(store, &key, 0..=3).await;
    let b = put(store, &key, 4..=6).await;
    let manifest = manifest_for(&lines(0..=6), vec![a, b]);
    store.finish(&key, &manifest).await.expect("finish");
    assert_eq!(
        store.manifest(&key).await.expect("manifest"),
        Some(manifest.clone())
    );
    // Finishing again (a retried request) is harmless.
    store.finish(&key, &manifest).await.expect("finish again");
    assert_eq!(
        store.manifest(&key).await.expect("manifest"),
        Some(manifest)
    );
}

/// An empty chunk, a chunk out of order and a manifest that contradicts itself are refused,
/// and nothing of them is stored.
pub async fn empty_and_unordered_chunks_and_inconsistent_manifests_are_refused(
    store: &dyn LogStore,
    _: &dyn Harness,
) {
    let key = key_of(9, 1);
    let empty = store.put_chunk(&key, &LogChunk { lines: vec![] }).await;
    assert!(matches!(empty, Err(StoreError::Invalid(_))), "{empty:?}");
    let unordered = LogChunk {
        lines: vec![line(1), line(0)],
    };
    let result = store.put_chunk(&key, &unordered).await;
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    let mut wrong_count = manifest_for(&lines(0..=9), vec![]);
    wrong_count.lines = 9;
    let result = store.finish(&key, &wrong_count).await;
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    assert_eq!(read(store, &key, None, 100).await, LogRead::default());
    assert_eq!(store.manifest(&key).await.expect("manifest"), None);
}

/// Another attempt, job or project sees nothing of an attempt's log.
pub async fn attempts_are_isolated(store: &dyn LogStore, _: &dyn Harness) {
    let key = key_of(10, 1);
    let chunk = put(store, &key, 0..=4).await;
    store
        .finish(&key, &manifest_for(&lines(0..=4), vec![chunk]))
        .await
        .expect("finish");
    let others = [
        key_of(10, 2),
        AttemptKey {
            job: JobId(2),
            ..key.clone()
        },
        AttemptKey {
            project: ProjectId::new("conformance-other").expect("valid"),
            ..key.clone()
        },
    ];
    for other in others {
        assert_eq!(
            read(store, &other, None, 100).await,
            LogRead::default(),
            "{other:?}"
        );
        assert_eq!(
            store.manifest(&other).await.expect("manifest"),
            None,
            "{other:?}"
        );
    }
    assert_eq!(read_all(store, &key).await, lines(0..=4));
}

/// A chunk object truncated, garbled or replaced behind the store's back makes `read` fail
/// with [`StoreError::Corrupt`] naming the object, never lines skipped in silence.
pub async fn a_corrupt_chunk_is_an_error_naming_it(store: &dyn LogStore, harness: &dyn Harness) {
    let key = key_of(11, 1);
    put(store, &key, 0..=9).await;
    put(store, &key, 10..=19).await;
    let victim = chunk_key(&key, 10);
    let damages: [(&str, &Damage); 4] = [
        ("truncated", &|mut b: Vec<u8>| {
            b.truncate(b.len() / 2);
            b
        }),
        ("garbled", &|mut b: Vec<u8>| {
            let mid = b.len() / 2;
            b[mid] ^= 0x5a;
            b
        }),
        ("emptied", &|_| Vec::new()),
        ("replaced", &|_| {
            b"{\"seq\":10,\"text\":\"not a chunk\"}\n".to_vec()
        }),
    ];
    for (what, damage) in damages {
        harness.tamper(&victim, damage).await;
        match store.read(&key, None, 100).await {
            Err(StoreError::Corrupt(msg)) => {
                assert!(
                    msg.contains(&victim),
                    "{what}: the error names {victim}: {msg}"
                )
            }
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
        // Writing the chunk again repairs the log.
        put(store, &key, 10..=19).await;
        assert_eq!(
            read_all(store, &key).await,
            lines(0..=19),
            "{what}: repaired"
        );
    }
}

/// A manifest garbled behind the store's back is [`StoreError::Corrupt`] naming it.
pub async fn a_corrupt_manifest_is_an_error_naming_it(store: &dyn LogStore, harness: &dyn Harness) {
    let key = key_of(12, 1);
    let chunk = put(store, &key, 0..=4).await;
    store
        .finish(&key, &manifest_for(&lines(0..=4), vec![chunk]))
        .await
        .expect("finish");
    let manifest_key = format!("{}manifest.json", key.log_prefix());
    harness
        .tamper(&manifest_key, &|mut b: Vec<u8>| {
            b.truncate(b.len() / 2);
            b
        })
        .await;
    match store.manifest(&key).await {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains(&manifest_key), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        store.read(&key, None, 10).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// Once the manifest says the log is complete, a line missing from every chunk is
/// [`StoreError::Corrupt`], not a log that silently never completes.
pub async fn a_complete_log_missing_lines_is_corrupt(store: &dyn LogStore, _: &dyn Harness) {
    let key = key_of(13, 1);
    let a = put(store, &key, 0..=4).await;
    let b = put(store, &key, 10..=14).await;
    store
        .finish(&key, &manifest_for(&lines(0..=14), vec![a, b]))
        .await
        .expect("finish");
    match store.read(&key, None, 100).await {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("line 5"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------------------

/// Artifacts put read back byte-identical with their size and SHA-256, and `list` shows
/// them by path.
pub async fn put_list_and_get_round_trip_byte_identical(
    store: &dyn ArtifactStore,
    _: &dyn Harness,
    scratch: &Path,
) {
    let key = key_of(101, 1);
    let files = [
        ("dist/bin/app", 100 * 1024 + 3),
        ("docs/Read me ü.txt", 1000),
        ("empty.txt", 0),
    ];
    let mut expected = Vec::new();
    for (i, (path, len)) in files.into_iter().enumerate() {
        let (file, sha256) = scratch_file(scratch, &format!("in-{i}"), len, i as u64);
        let stored = store
            .put_file(&key, path, &file, &sha256)
            .await
            .expect("put_file");
        let want = StoredArtifact {
            path: path.to_owned(),
            size: len,
            sha256,
        };
        assert_eq!(stored, want);
        expected.push((want, file));
    }
    let listed = store.list(&key).await.expect("list");
    assert_eq!(
        listed,
        expected.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>()
    );
    for (i, (artifact, original)) in expected.iter().enumerate() {
        let dest = scratch.join(format!("out/{i}"));
        let size = store
            .get_file(&key, &artifact.path, &dest)
            .await
            .expect("get_file");
        assert_eq!(size, artifact.size);
        assert_eq!(read_bytes(&dest), read_bytes(original), "{}", artifact.path);
    }
}

/// A file whose SHA-256 is not the declared one is refused as [`StoreError::Corrupt`] and
/// nothing is kept (nor is an earlier version at the same path disturbed), whether it goes
/// up in one piece or in parts; a malformed hash is [`StoreError::Invalid`].
pub async fn a_wrong_declared_sha256_is_corrupt_and_nothing_is_kept(
    store: &dyn ArtifactStore,
    _: &dyn Harness,
    scratch: &Path,
) {
    let key = key_of(102, 1);
    let wrong = "0".repeat(64);
    for (name, len) in [("small.bin", 5000), ("large.bin", 20 << 20)] {
        let (file, _) = scratch_file(scratch, name, len, 7);
        let result = store.put_file(&key, name, &file, &wrong).await;
        assert!(
            matches!(result, Err(StoreError::Corrupt(_))),
            "{name}: {result:?}"
        );
    }
    assert_eq!(store.list(&key).await.expect("list"), vec![]);
    let dest = scratch.join("out");
    let got = store.get_file(&key, "small.bin", &dest).await;
    assert!(matches!(got, Err(StoreError::NotFound(_))), "{got:?}");
    assert!(!dest.exists());

    let (good, good_sha) = scratch_file(scratch, "good", 3000, 8);
    let (bad, _) = scratch_file(scratch, "bad", 3000, 9);
    store
        .put_file(&key, "kept.bin", &good, &good_sha)
        .await
        .expect("put_file");
    let result = store.put_file(&key, "kept.bin", &bad, &wrong).await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    store
        .get_file(&key, "kept.bin", &dest)
        .await
        .expect("the earlier version is still there");
    assert_eq!(read_bytes(&dest), read_bytes(&good));

    let result = store.put_file(&key, "x.bin", &good, "not-a-hash").await;
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
}

/// Paths that could escape the attempt's prefix are refused by every operation.
pub async fn unsafe_paths_are_refused(store: &dyn ArtifactStore, _: &dyn Harness, scratch: &Path) {
    let key = key_of(103, 1);
    let (file, sha256) = scratch_file(scratch, "in", 10, 1);
    let dest = scratch.join("out");
    for path in [
        "../escape",
        "/etc/passwd",
        "a//b",
        "",
        "a/../../b",
        "./a",
        "a\\b",
        "a/",
    ] {
        let put = store.put_file(&key, path, &file, &sha256).await;
        assert!(
            matches!(put, Err(StoreError::Invalid(_))),
            "put {path:?}: {put:?}"
        );
        let get = store.get_file(&key, path, &dest).await;
        assert!(
            matches!(get, Err(StoreError::Invalid(_))),
            "get {path:?}: {get:?}"
        );
        let open = store.open(&key, path).await.err();
        assert!(
            matches!(open, Some(StoreError::Invalid(_))),
            "open {path:?}: {open:?}"
        );
        let url = store.presign_get(&key, path, Duration::from_secs(60)).await;
        assert!(
            matches!(url, Err(StoreError::Invalid(_))),
            "presign {path:?}: {url:?}"
        );
    }
    assert_eq!(store.list(&key).await.expect("list"), vec![]);
    assert!(!dest.exists());
}

/// A path never put is [`StoreError::NotFound`], and no file is written; so is a path
/// through an artifact (`dir/file.bin/x`). (A directory of artifacts, `dir` here, is not
/// asked for: S3 says `NoSuchKey`, but the file-backed test server answers 500.)
pub async fn a_missing_artifact_is_not_found(
    store: &dyn ArtifactStore,
    _: &dyn Harness,
    scratch: &Path,
) {
    let key = key_of(104, 1);
    let (file, sha256) = scratch_file(scratch, "in", 10, 1);
    store
        .put_file(&key, "dir/file.bin", &file, &sha256)
        .await
        .expect("put_file");
    let out = scratch.join("out");
    fs_create_dir(&out);
    let dest = out.join("dest");
    for path in ["nope/missing.bin", "dir/file.bin/x", "dir/file"] {
        let got = store.get_file(&key, path, &dest).await;
        assert!(
            matches!(got, Err(StoreError::NotFound(_))),
            "get {path}: {got:?}"
        );
        let open = store.open(&key, path).await.err();
        assert!(
            matches!(open, Some(StoreError::NotFound(_))),
            "open {path}: {open:?}"
        );
    }
    assert_eq!(
        dir_entries(&out),
        Vec::<String>::new(),
        "no file, temporary or not"
    );
}

/// An object changed behind the store's back fails `get_file` as [`StoreError::Corrupt`],
/// leaving no file at the destination (nor a temporary one), and ends `open`'s stream
/// with the same error rather than a clean end.
pub async fn a_corrupted_object_fails_get_and_open_and_leaves_no_file(
    store: &dyn ArtifactStore,
    harness: &dyn Harness,
    scratch: &Path,
) {
    let key = key_of(105, 1);
    let (file, sha256) = scratch_file(scratch, "in", 100 * 1024, 3);
    let out_dir = scratch.join("out");
    fs_create_dir(&out_dir);
    let damages: [(&str, &Damage); 2] = [
        ("garbled", &|mut b: Vec<u8>| {
            let mid = b.len() / 2;
            b[mid] ^= 0x01;
            b
        }),
        ("truncated", &|mut b: Vec<u8>| {
            b.truncate(b.len() - 1);
            b
        }),
    ];
    for (what, damage) in damages {
        let path = format!("{what}.bin");
        store
            .put_file(&key, &path, &file, &sha256)
            .await
            .expect("put_file");
        harness
            .tamper(&format!("{}{path}", key.artifact_prefix()), damage)
            .await;
        let dest = out_dir.join(&path);
        let got = store.get_file(&key, &path, &dest).await;
        assert!(
            matches!(got, Err(StoreError::Corrupt(_))),
            "{what}: {got:?}"
        );
        assert_eq!(
            dir_entries(&out_dir),
            Vec::<String>::new(),
            "{what}: no file left"
        );
        match drain(store, &key, &path).await {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!(
                "{what}: open's stream must end Corrupt, got {:?}",
                other.map(|b| b.len())
            ),
        }
    }
}

/// `open` streams exactly the artifact's bytes.
pub async fn open_streams_the_same_bytes(
    store: &dyn ArtifactStore,
    _: &dyn Harness,
    scratch: &Path,
) {
    let key = key_of(106, 1);
    let (file, sha256) = scratch_file(scratch, "in", 200 * 1024 + 17, 4);
    store
        .put_file(&key, "stream.bin", &file, &sha256)
        .await
        .expect("put_file");
    let bytes = drain(store, &key, "stream.bin")
        .await
        .expect("open and read");
    assert_eq!(bytes, read_bytes(&file));
}

/// A file of several parts (40 MiB: three 16 MiB parts in S3) round-trips.
pub async fn a_multi_part_file_round_trips(
    store: &dyn ArtifactStore,
    _: &dyn Harness,
    scratch: &Path,
) {
    let key = key_of(107, 1);
    let len = (40 << 20) + 5;
    let (file, sha256) = scratch_file(scratch, "in", len, 5);
    let stored = store
        .put_file(&key, "big/image.tar", &file, &sha256)
        .await
        .expect("put_file");
    assert_eq!(
        (stored.size, stored.sha256.as_str()),
        (len, sha256.as_str())
    );
    assert_eq!(store.list(&key).await.expect("list"), vec![stored]);
    let dest = scratch.join("out.tar");
    let size = store
        .get_file(&key, "big/image.tar", &dest)
        .await
        .expect("get_file");
    assert_eq!(size, len);
    assert_eq!(sha256_file(&dest), sha256);
    let streamed = drain(store, &key, "big/image.tar").await.expect("open");
    assert_eq!(hex::encode(Sha256::digest(&streamed)), sha256);
}

/// Putting a path again replaces its bytes and hash; `list` shows it once.
pub async fn putting_a_path_again_replaces_it(
    store: &dyn ArtifactStore,
    _: &dyn Harness,
    scratch: &Path,
) {
    let key = key_of(108, 1);
    let (v1, sha1) = scratch_file(scratch, "v1", 4000, 10);
    let (v2, sha2) = scratch_file(scratch, "v2", 6000, 11);
    store
        .put_file(&key, "same.txt", &v1, &sha1)
        .await
        .expect("put v1");
    store
        .put_file(&key, "same.txt", &v2, &sha2)
        .await
        .expect("put v2");
    let listed = store.list(&key).await.expect("list");
    assert_eq!(
        listed,
        vec![StoredArtifact {
            path: "same.txt".into(),
            size: 6000,
            sha256: sha2
        }]
    );
    let dest = scratch.join("out");
    store
        .get_file(&key, "same.txt", &dest)
        .await
        .expect("get_file");
    assert_eq!(read_bytes(&dest), read_bytes(&v2));
}

/// `delete_attempt` removes that attempt's artifacts and no other's; deleting again is fine.
pub async fn delete_attempt_removes_only_that_attempt(
    store: &dyn ArtifactStore,
    _: &dyn Harness,
    scratch: &Path,
) {
    let doomed = key_of(109, 1);
    let kept = [
        key_of(109, 2),
        AttemptKey {
            job: JobId(2),
            ..doomed.clone()
        },
    ];
    let (file, sha256) = scratch_file(scratch, "in", 1234, 12);
    for key in std::iter::once(&doomed).chain(&kept) {
        for path in ["a.txt", "dir/b.txt"] {
            store
                .put_file(key, path, &file, &sha256)
                .await
                .expect("put_file");
        }
    }
    store.delete_attempt(&doomed).await.expect("delete_attempt");
    assert_eq!(store.list(&doomed).await.expect("list"), vec![]);
    let got = store.get_file(&doomed, "a.txt", &scratch.join("out")).await;
    assert!(matches!(got, Err(StoreError::NotFound(_))), "{got:?}");
    for key in &kept {
        let paths: Vec<String> = store
            .list(key)
            .await
            .expect("list")
            .into_iter()
            .map(|a| a.path)
            .collect();
        assert_eq!(paths, ["a.txt", "dir/b.txt"], "{key:?}");
    }
    store.delete_attempt(&doomed).await.expect("delete again");
}

/// A store with URLs presigns one that a plain HTTP GET downloads byte-identically, that
/// fetches no other key, for at most 15 minutes; a store without returns `None`.
pub async fn presigned_urls_fetch_one_artifact_for_a_bounded_time(
    store: &dyn ArtifactStore,
    harness: &dyn Harness,
    scratch: &Path,
) {
    let key = key_of(110, 1);
    let (one, one_sha) = scratch_file(scratch, "one", 50_000, 13);
    let (two, two_sha) = scratch_file(scratch, "two", 50_000, 14);
    store
        .put_file(&key, "presign/one.bin", &one, &one_sha)
        .await
        .expect("put one");
    store
        .put_file(&key, "presign/two.bin", &two, &two_sha)
        .await
        .expect("put two");
    let five_minutes = Duration::from_secs(300);
    let url = store
        .presign_get(&key, "presign/one.bin", five_minutes)
        .await
        .expect("presign_get");
    if !harness.presigns() {
        assert_eq!(url, None);
        return;
    }
    let url = url.expect("a presigned URL");
    let (status, body) = harness.http_get(&url).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, read_bytes(&one));

    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    assert!(path.ends_with("presign/one.bin"), "{url}");
    let other = format!("{}two.bin?{query}", path.trim_end_matches("one.bin"));
    let (status, body) = harness.http_get(&other).await;
    assert!(
        (400..500).contains(&status),
        "a URL signed for one.bin must not fetch two.bin: {status} {}",
        String::from_utf8_lossy(&body)
    );

    let too_long = store
        .presign_get(&key, "presign/one.bin", Duration::from_secs(15 * 60 + 1))
        .await;
    assert!(
        matches!(too_long, Err(StoreError::Invalid(_))),
        "{too_long:?}"
    );
    let fifteen = store
        .presign_get(&key, "presign/one.bin", Duration::from_secs(15 * 60))
        .await;
    assert!(matches!(fifteen, Ok(Some(_))), "{fifteen:?}");
    let missing = store
        .presign_get(&key, "presign/none.bin", five_minutes)
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Log stream
// ---------------------------------------------------------------------------------------

/// Runs every log stream case, naming the one that fails. The cases share `stream`: each
/// publishes under its own build number (its case number) and reads in its own groups,
/// passing over the others' records. All but one run at once, so publishers and consumers of
/// several groups overlap; the case that needs a quiet stream runs alone after them.
pub async fn log_stream_suite(stream: &dyn LogStream) {
    macro_rules! case {
        ($case:ident) => {
            named(stringify!($case), $case(stream))
        };
    }
    futures::join!(
        case!(records_of_many_jobs_come_back_complete_each_jobs_in_publish_order),
        case!(a_new_consumer_of_a_group_starts_after_what_the_group_committed),
        case!(records_returned_but_not_committed_are_delivered_again_to_the_next_consumer),
        case!(two_groups_each_see_every_record_and_commit_independently),
        case!(an_end_record_round_trips_with_its_last_seq),
    );
    case!(poll_with_nothing_new_returns_empty_after_about_wait_and_wakes_for_a_new_record).await;
}

/// Records of 20 jobs × 200 lines (and an `End` each), published by 5 concurrent publishers
/// in calls that mix the lines of 4 jobs, all come back, each job's in the order published,
/// none twice.
pub async fn records_of_many_jobs_come_back_complete_each_jobs_in_publish_order(
    stream: &dyn LogStream,
) {
    const CASE: u64 = 201;
    const PUBLISHERS: u64 = 5;
    const JOBS_EACH: u64 = 4;
    const LINES: u64 = 200;
    const PER_CALL: u64 = 10;
    let mut consumer = subscribe(stream, CASE, "a");
    let mut expected = BTreeMap::new();
    let publishers = (0..PUBLISHERS).map(|publisher| {
        let jobs: Vec<u64> = (0..JOBS_EACH)
            .map(|i| 1 + publisher * JOBS_EACH + i)
            .collect();
        let mut calls = Vec::new();
        for start in (0..LINES).step_by(PER_CALL as usize) {
            let mut call = Vec::new();
            for seq in start..start + PER_CALL {
                call.extend(jobs.iter().map(|&job| shipped_line(CASE, job, 1, seq)));
            }
            if start + PER_CALL == LINES {
                call.extend(
                    jobs.iter()
                        .map(|&job| shipped_end(CASE, job, 1, Some(LINES - 1))),
                );
            }
            calls.push(call);
        }
        for call in &calls {
            for record in call {
                expected
                    .entry(job_of(record))
                    .or_insert_with(Vec::new)
                    .push(record.clone());
            }
        }
        async move {
            for call in &calls {
                stream
                    .publish(call)
                    .await
                    .unwrap_or_else(|e| panic!("publisher {publisher}: publish: {e}"));
            }
        }
    });
    futures::future::join_all(publishers.collect::<Vec<_>>()).await;
    let total = (PUBLISHERS * JOBS_EACH * (LINES + 1)) as usize;
    let got = own(
        CASE,
        poll_until(&mut consumer, CASE, "every record", total).await,
    );
    assert_eq!(got.len(), total, "no record twice");
    let got = by_job(&got);
    assert_eq!(got.len(), expected.len(), "every job");
    for (job, records) in &expected {
        assert!(
            got.get(job) == Some(records),
            "job {job:?}: {} records back, {} published, or out of order",
            got.get(job).map_or(0, Vec::len),
            records.len()
        );
    }
}

/// A consumer that commits part of what it read, then a new consumer of the same group:
/// the new one gets exactly the records after the committed positions, and none at or
/// before them.
pub async fn a_new_consumer_of_a_group_starts_after_what_the_group_committed(
    stream: &dyn LogStream,
) {
    const CASE: u64 = 202;
    let mut published = Vec::new();
    for part in 0..3 {
        let call: Vec<Shipped> = (part * 10..part * 10 + 10)
            .flat_map(|seq| (1..=3).map(move |job| shipped_line(CASE, job, 1, seq)))
            .collect();
        publish(stream, &call).await;
        published.extend(call);
    }
    let mut first = subscribe(stream, CASE, "g");
    let all = poll_until(&mut first, CASE, "the first consumer", 90).await;
    // Commit everything returned up to the case's 45th record.
    let mut seen = 0;
    let cut = all
        .iter()
        .position(|(_, r)| {
            seen += usize::from(r.key().build == BuildId(CASE));
            seen == 45
        })
        .expect("45 records of the case");
    let mut committed: BTreeMap<u32, u64> = BTreeMap::new();
    for (position, _) in &all[..=cut] {
        let highest = committed
            .entry(position.partition)
            .or_insert(position.offset);
        *highest = (*highest).max(position.offset);
    }
    let done: Vec<StreamPosition> = committed
        .iter()
        .map(|(&partition, &offset)| StreamPosition { partition, offset })
        .collect();
    first.commit(&done).await.expect("commit");
    let is_committed =
        |p: &StreamPosition| committed.get(&p.partition).is_some_and(|&c| p.offset <= c);
    let expected: Vec<_> = own(CASE, all)
        .into_iter()
        .filter(|(p, _)| !is_committed(p))
        .collect();
    assert!((1..90).contains(&expected.len()), "{} left", expected.len());
    drop(first);

    let mut second = subscribe(stream, CASE, "g");
    let again = own(
        CASE,
        poll_until(&mut second, CASE, "the second consumer", expected.len()).await,
    );
    for (position, record) in &again {
        assert!(
            !is_committed(position),
            "{record:?} at {position:?} was committed, yet delivered again"
        );
    }
    assert_eq!(positions(&again), positions(&expected));
    assert_eq!(by_job(&again), by_job(&expected));
    assert_nothing_more(&mut second, CASE, "the second consumer").await;
}

/// What a consumer returned but its group never committed is returned again, complete and
/// in order, to the group's next consumer (an aggregator that restarts loses nothing).
pub async fn records_returned_but_not_committed_are_delivered_again_to_the_next_consumer(
    stream: &dyn LogStream,
) {
    const CASE: u64 = 203;
    let published: Vec<Shipped> = (0..20)
        .flat_map(|seq| (1..=2).map(move |job| shipped_line(CASE, job, 1, seq)))
        .collect();
    publish(stream, &published).await;
    let mut first = subscribe(stream, CASE, "g");
    let got = own(
        CASE,
        poll_until(&mut first, CASE, "the first consumer", 40).await,
    );
    assert_eq!(by_job(&got), by_job_of(&published));
    drop(first);
    let mut second = subscribe(stream, CASE, "g");
    let again = own(
        CASE,
        poll_until(&mut second, CASE, "the second consumer", 40).await,
    );
    assert_eq!(positions(&again), positions(&got));
    assert_eq!(by_job(&again), by_job_of(&published));
}

/// Two groups each get every record; a commit in one does not move the other.
pub async fn two_groups_each_see_every_record_and_commit_independently(stream: &dyn LogStream) {
    const CASE: u64 = 204;
    let mut published = Vec::new();
    for part in 0..5 {
        let call: Vec<Shipped> = (part * 5..part * 5 + 5)
            .flat_map(|seq| (1..=4).map(move |job| shipped_line(CASE, job, 1, seq)))
            .collect();
        publish(stream, &call).await;
        published.extend(call);
    }
    let want = by_job_of(&published);
    let mut a = subscribe(stream, CASE, "a");
    let mut b = subscribe(stream, CASE, "b");
    let (got_a, got_b) = futures::join!(
        poll_until(&mut a, CASE, "group a", 100),
        poll_until(&mut b, CASE, "group b", 100)
    );
    assert_eq!(by_job(&own(CASE, got_a.clone())), want, "group a");
    assert_eq!(by_job(&own(CASE, got_b)), want, "group b");
    a.commit(&highest_per_partition(&got_a))
        .await
        .expect("commit a");
    drop((a, b));

    let mut a = subscribe(stream, CASE, "a");
    let mut b = subscribe(stream, CASE, "b");
    let (_, got_b) = futures::join!(
        assert_nothing_more(&mut a, CASE, "group a after its commit"),
        poll_until(&mut b, CASE, "group b again", 100)
    );
    assert_eq!(by_job(&own(CASE, got_b)), want, "group b again");
}

/// `End` records, with and without a last line, come back exactly as published, after the
/// lines before them.
pub async fn an_end_record_round_trips_with_its_last_seq(stream: &dyn LogStream) {
    const CASE: u64 = 206;
    let published = vec![
        shipped_line(CASE, 1, 1, 0),
        shipped_line(CASE, 1, 1, 1),
        shipped_end(CASE, 1, 1, Some(1)),
        shipped_end(CASE, 1, 2, None),
    ];
    publish(stream, &published).await;
    let mut consumer = subscribe(stream, CASE, "g");
    let got = own(
        CASE,
        poll_until(&mut consumer, CASE, "the records", 4).await,
    );
    let got: Vec<Shipped> = got.into_iter().map(|(_, r)| r).collect();
    assert_eq!(got, published);
}

/// Once a consumer has read everything, `poll` returns nothing after about `wait` (it
/// neither spins nor hangs), and a record published while it waits ends the wait early.
pub async fn poll_with_nothing_new_returns_empty_after_about_wait_and_wakes_for_a_new_record(
    stream: &dyn LogStream,
) {
    const CASE: u64 = 205;
    let mut consumer = subscribe(stream, CASE, "g");
    publish(stream, &[shipped_line(CASE, 1, 1, 0)]).await;
    poll_until(&mut consumer, CASE, "the first record", 1).await;
    // Whatever else the stream holds (other cases' records) first.
    let deadline = Instant::now() + STREAM_DEADLINE;
    while !poll(&mut consumer, Duration::from_secs(1)).await.is_empty() {
        assert!(Instant::now() < deadline, "the stream never ran dry");
    }

    let wait = Duration::from_millis(700);
    let start = Instant::now();
    let got = poll(&mut consumer, wait).await;
    let took = start.elapsed();
    assert!(got.is_empty(), "nothing was published: {got:?}");
    assert!(
        took >= wait / 2 && took < wait + Duration::from_secs(2),
        "poll({wait:?}) with nothing new took {took:?}"
    );

    let record = shipped_line(CASE, 1, 1, 1);
    let waiting = async {
        let start = Instant::now();
        let got = poll(&mut consumer, Duration::from_secs(10)).await;
        (got, start.elapsed())
    };
    let publishing = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        publish(stream, std::slice::from_ref(&record)).await;
    };
    let ((got, took), ()) = futures::join!(waiting, publishing);
    let got: Vec<Shipped> = got.into_iter().map(|(_, r)| r).collect();
    assert_eq!(got, [record]);
    assert!(
        took < Duration::from_secs(8),
        "a record published 200 ms into a 10 s wait came back after {took:?}"
    );
}

/// How long a case waits for records before failing (a new Kafka consumer takes seconds to
/// join its group).
const STREAM_DEADLINE: Duration = Duration::from_secs(60);
/// `poll`'s `max` in the cases: smaller than what most cases read, so they take several.
const POLL_MAX: usize = 256;

type Polled = Vec<(StreamPosition, Shipped)>;

fn stream_key(case: u64, job: u64, attempt: u32) -> AttemptKey {
    AttemptKey {
        job: JobId(job),
        attempt: Attempt::new(attempt).expect("valid attempt"),
        ..key_of(case, 1)
    }
}

fn shipped_line(case: u64, job: u64, attempt: u32, seq: u64) -> Shipped {
    Shipped::Line {
        key: stream_key(case, job, attempt),
        fence: Fence(case),
        line: line(seq),
    }
}

fn shipped_end(case: u64, job: u64, attempt: u32, last_seq: Option<u64>) -> Shipped {
    Shipped::End {
        key: stream_key(case, job, attempt),
        fence: Fence(case),
        last_seq,
    }
}

fn subscribe(stream: &dyn LogStream, case: u64, name: &str) -> Box<dyn LogStreamConsumer> {
    let group = format!("conformance-{case}-{name}");
    stream
        .subscribe(&group)
        .unwrap_or_else(|e| panic!("subscribe {group}: {e}"))
}

async fn publish(stream: &dyn LogStream, records: &[Shipped]) {
    stream
        .publish(records)
        .await
        .unwrap_or_else(|e| panic!("publish {} records: {e}", records.len()));
}

async fn poll(consumer: &mut Box<dyn LogStreamConsumer>, wait: Duration) -> Polled {
    let got = consumer
        .poll(POLL_MAX, wait)
        .await
        .unwrap_or_else(|e| panic!("poll: {e}"));
    assert!(
        got.len() <= POLL_MAX,
        "{} records from poll({POLL_MAX})",
        got.len()
    );
    got
}

/// Polls until `want` records of case `case` have come; returns every record returned (the
/// case's and others'), in order. Checks that positions only grow within a partition.
async fn poll_until(
    consumer: &mut Box<dyn LogStreamConsumer>,
    case: u64,
    what: &str,
    want: usize,
) -> Polled {
    let deadline = Instant::now() + STREAM_DEADLINE;
    let mut all: Polled = Vec::new();
    let mut mine = 0;
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    while mine < want {
        assert!(
            Instant::now() < deadline,
            "{what}: {mine} of {want} records after {STREAM_DEADLINE:?}"
        );
        for (position, record) in poll(consumer, Duration::from_millis(250)).await {
            if let Some(before) = last.insert(position.partition, position.offset) {
                assert!(
                    position.offset > before,
                    "{what}: {position:?} came after offset {before} of its partition"
                );
            }
            mine += usize::from(record.key().build == BuildId(case));
            all.push((position, record));
        }
    }
    all
}

/// Polls for a while and fails if a record of case `case` comes.
async fn assert_nothing_more(consumer: &mut Box<dyn LogStreamConsumer>, case: u64, what: &str) {
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let got = own(case, poll(consumer, Duration::from_millis(250)).await);
        assert!(got.is_empty(), "{what}: more came: {got:?}");
    }
}

/// The records of case `case`.
fn own(case: u64, records: Polled) -> Polled {
    records
        .into_iter()
        .filter(|(_, r)| r.key().build == BuildId(case))
        .collect()
}

fn job_of(record: &Shipped) -> (u64, u32) {
    (record.key().job.0, record.key().attempt.get())
}

/// Each attempt's records, in the order they came.
fn by_job(records: &[(StreamPosition, Shipped)]) -> BTreeMap<(u64, u32), Vec<Shipped>> {
    by_job_of(&records.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>())
}

fn by_job_of(records: &[Shipped]) -> BTreeMap<(u64, u32), Vec<Shipped>> {
    let mut jobs: BTreeMap<(u64, u32), Vec<Shipped>> = BTreeMap::new();
    for record in records {
        jobs.entry(job_of(record)).or_default().push(record.clone());
    }
    jobs
}

fn positions(records: &[(StreamPosition, Shipped)]) -> Vec<StreamPosition> {
    let mut positions: Vec<StreamPosition> = records.iter().map(|(p, _)| *p).collect();
    positions.sort();
    positions
}

/// The highest position returned in each partition: what a commit of everything passes.
fn highest_per_partition(records: &[(StreamPosition, Shipped)]) -> Vec<StreamPosition> {
    let mut highest: BTreeMap<u32, u64> = BTreeMap::new();
    for (p, _) in records {
        let h = highest.entry(p.partition).or_insert(p.offset);
        *h = (*h).max(p.offset);
    }
    highest
        .into_iter()
        .map(|(partition, offset)| StreamPosition { partition, offset })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Writes `len` bytes of pseudo-random content (a seeded SplitMix64, never constant) to
/// `path` in 1 MiB pieces, and returns its hex SHA-256.
pub fn write_pseudo_random_file(path: &Path, len: u64, seed: u64) -> io::Result<String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = io::BufWriter::new(File::create(path)?);
    let mut hasher = Sha256::new();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef;
    let mut piece = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(piece.len() as u64)).unwrap_or(piece.len());
        for word in piece[..n].chunks_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
        }
        hasher.update(&piece[..n]);
        file.write_all(&piece[..n])?;
        left -= n as u64;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(hex::encode(hasher.finalize()))
}

/// The hex SHA-256 of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> String {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}

/// The attempt key of case `case`, attempt `attempt`.
fn key_of(case: u64, attempt: u32) -> AttemptKey {
    AttemptKey {
        project: ProjectId::new("conformance").expect("valid project id"),
        build: BuildId(case),
        job: JobId(1),
        attempt: Attempt::new(attempt).expect("valid attempt"),
    }
}

/// A line with every field set, and text that needs escaping.
fn line(seq: u64) -> LogLine {
    LogLine {
        seq,
        ts: 1_700_000_000_000 + seq * 10,
        stream: match seq % 3 {
            0 => Stream::Stdout,
            1 => Stream::Stderr,
            _ => Stream::System,
        },
        step: (!seq.is_multiple_of(7)).then_some((seq / 10) as u32),
        text: format!("line {seq}: \"quoted\", tab\there, ünïcödé, \\ and \u{1b}[31mred"),
    }
}

fn lines(range: RangeInclusive<u64>) -> Vec<LogLine> {
    range.map(line).collect()
}

async fn put(store: &dyn LogStore, key: &AttemptKey, range: RangeInclusive<u64>) -> ChunkRef {
    let (first, last) = (*range.start(), *range.end());
    let chunk_ref = store
        .put_chunk(
            key,
            &LogChunk {
                lines: lines(range),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("put_chunk {first}..={last}: {e}"));
    assert_eq!((chunk_ref.first_seq, chunk_ref.last_seq), (first, last));
    chunk_ref
}

async fn read(store: &dyn LogStore, key: &AttemptKey, after: Option<u64>, limit: usize) -> LogRead {
    let read = store
        .read(key, after, limit)
        .await
        .unwrap_or_else(|e| panic!("read after {after:?}: {e}"));
    assert!(read.lines.len() <= limit, "at most {limit} lines");
    read
}

/// Every line, following the log in pages of 7 as a reader would.
async fn read_all(store: &dyn LogStore, key: &AttemptKey) -> Vec<LogLine> {
    let mut all: Vec<LogLine> = Vec::new();
    let mut after = None;
    for _ in 0..10_000 {
        let page = read(store, key, after, 7).await;
        let Some(last) = page.lines.last() else {
            return all;
        };
        after = Some(last.seq);
        all.extend(page.lines);
    }
    panic!("reading never ended");
}

fn manifest_for(lines: &[LogLine], chunks: Vec<ChunkRef>) -> LogManifest {
    let mut hasher = Sha256::new();
    for line in lines {
        hasher.update(plain_text_line(line).as_bytes());
    }
    LogManifest {
        v: LOG_FORMAT_VERSION,
        fence: Fence(1),
        lines: lines.len() as u64,
        last_seq: lines.last().map(|l| l.seq),
        sha256: hex::encode(hasher.finalize()),
        chunks,
    }
}

/// A scratch file of `len` pseudo-random bytes, and its SHA-256.
fn scratch_file(scratch: &Path, name: &str, len: u64, seed: u64) -> (PathBuf, String) {
    let path = scratch.join("files").join(name);
    let sha256 = write_pseudo_random_file(&path, len, seed)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    (path, sha256)
}

fn read_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn fs_create_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Everything `open` streams, or the error that ended the stream.
async fn drain(
    store: &dyn ArtifactStore,
    key: &AttemptKey,
    path: &str,
) -> Result<Vec<u8>, StoreError> {
    let mut source = store.open(key, path).await?;
    let mut bytes = Vec::new();
    while let Some(piece) = source.next_chunk().await? {
        assert!(!piece.is_empty(), "pieces are never empty");
        bytes.extend_from_slice(&piece);
    }
    Ok(bytes)
}
