//! The conformance suite on the S3 adapters, against an in-process S3-compatible server
//! (`s3s` + `s3s-fs` on 127.0.0.1, with signature checking) driven over real HTTP, one test
//! per case; and a 1 GiB artifact through the multipart path with bounded memory.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use flotilla_core::ids::{Attempt, BuildId, JobId, ProjectId};
use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{ArtifactStore, AttemptKey, LogStore, StoreError};
use flotilla_stores::conformance::{self, Damage, Harness, write_pseudo_random_file};
use flotilla_stores::s3::{PART_SIZE, S3Config, S3ConfigError, S3Stores};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::sync::RwLock;

const BUCKET: &str = "flotilla-test";
const ACCESS_KEY: &str = "AKIAFLOTILLATEST";
const SECRET_KEY: &str = "flotilla-test-secret-key";
const PREFIX: &str = "installation-1/";

/// The 1 GiB test takes this for writing, every other test for reading, so under
/// `cargo test` (one process, tests in parallel) its peak-memory figure is its own. Under
/// nextest every test is a process of its own anyway.
static ALONE: RwLock<()> = RwLock::const_new(());

/// An S3-compatible server on a loopback port, the stores under test, and a raw client for
/// going behind their backs.
struct Fixture {
    dir: TempDir,
    stores: S3Stores,
    raw: aws_sdk_s3::Client,
    endpoint: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs_root = dir.path().join("s3");
        std::fs::create_dir_all(fs_root.join(BUCKET)).expect("bucket directory");
        let fs = s3s_fs::FileSystem::new(&fs_root).expect("s3s-fs");
        let mut service = s3s::service::S3ServiceBuilder::new(fs);
        service.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = service.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        // Owned by the fixture (aborted on drop); connection tasks end with the runtime.
        let server = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });

        let (id_file, secret_file) = (dir.path().join("access-key-id"), dir.path().join("secret"));
        std::fs::write(&id_file, format!("{ACCESS_KEY}\n")).expect("write key id");
        std::fs::write(&secret_file, format!("{SECRET_KEY}\n")).expect("write secret");
        let config = S3Config {
            endpoint: Some(endpoint.clone()),
            path_style: true,
            prefix: Some(PREFIX.into()),
            access_key_id_file: Some(id_file),
            secret_access_key_file: Some(secret_file),
            ..S3Config::new(BUCKET)
        };
        let stores = S3Stores::connect(&config).expect("connect");
        stores.check_bucket().await.expect("the bucket exists");
        Fixture {
            raw: raw_client(&endpoint, SECRET_KEY),
            stores,
            endpoint,
            server,
            dir,
        }
    }

    fn scratch(&self) -> PathBuf {
        let scratch = self.dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).expect("scratch");
        scratch
    }
}

fn raw_client(endpoint: &str, secret: &str) -> aws_sdk_s3::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(ACCESS_KEY, secret, None, None, "test"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

impl Harness for Fixture {
    fn tamper<'a>(&'a self, key: &'a str, change: &'a Damage) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let object_key = format!("{PREFIX}{key}");
            let got = self
                .raw
                .get_object()
                .bucket(BUCKET)
                .key(&object_key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("get {object_key}: {e:?}"));
            let metadata = got.metadata().cloned();
            let bytes = got.body.collect().await.expect("body").to_vec();
            self.raw
                .put_object()
                .bucket(BUCKET)
                .key(&object_key)
                .set_metadata(metadata)
                .body(ByteStream::from(change(bytes)))
                .send()
                .await
                .unwrap_or_else(|e| panic!("put {object_key}: {e:?}"));
        })
    }

    fn presigns(&self) -> bool {
        true
    }

    fn http_get<'a>(&'a self, url: &'a str) -> BoxFuture<'a, (u16, Vec<u8>)> {
        Box::pin(async move {
            // reqwest is built without a default crypto provider; plain http needs none,
            // but the client's TLS configuration is made up front.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let response = reqwest::get(url).await.expect("GET");
            let status = response.status().as_u16();
            let body = response.bytes().await.expect("body").to_vec();
            (status, body)
        })
    }
}

macro_rules! log_cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let _shared = ALONE.read().await;
            let f = Fixture::start().await;
            conformance::$case(&f.stores.logs, &f).await;
        }
    )*};
}

macro_rules! artifact_cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let _shared = ALONE.read().await;
            let f = Fixture::start().await;
            conformance::$case(&f.stores.artifacts, &f, &f.scratch()).await;
        }
    )*};
}

flotilla_stores::for_each_log_store_case!(log_cases);

flotilla_stores::for_each_artifact_store_case!(artifact_cases);

fn attempt(build: u64) -> AttemptKey {
    AttemptKey {
        project: ProjectId::new("acme").expect("valid"),
        build: BuildId(build),
        job: JobId(1),
        attempt: Attempt::FIRST,
    }
}

/// Every key in the bucket.
async fn bucket_keys(raw: &aws_sdk_s3::Client) -> Vec<String> {
    let page = raw
        .list_objects_v2()
        .bucket(BUCKET)
        .send()
        .await
        .expect("list");
    let mut keys: Vec<String> = page
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_go_under_the_prefix_with_the_sha256_as_metadata() {
    let _shared = ALONE.read().await;
    let f = Fixture::start().await;
    let key = attempt(1);
    let scratch = f.scratch();
    let src = scratch.join("in");
    let sha256 = write_pseudo_random_file(&src, 1000, 1).expect("write");
    f.stores
        .artifacts
        .put_file(&key, "dist/app", &src, &sha256)
        .await
        .expect("put_file");
    let line = flotilla_core::store::LogLine {
        seq: 0,
        ts: 0,
        stream: flotilla_core::runner::Stream::Stdout,
        step: None,
        text: "hello".into(),
    };
    f.stores
        .logs
        .put_chunk(&key, &flotilla_core::store::LogChunk { lines: vec![line] })
        .await
        .expect("put_chunk");
    assert_eq!(
        bucket_keys(&f.raw).await,
        [
            "installation-1/artifacts/acme/1/1/1/dist/app",
            "installation-1/logs/acme/1/1/1/chunk-00000000000000000000.zst",
        ]
    );
    let head = f
        .raw
        .head_object()
        .bucket(BUCKET)
        .key("installation-1/artifacts/acme/1/1/1/dist/app")
        .send()
        .await
        .expect("head");
    assert_eq!(head.metadata().and_then(|m| m.get("sha256")), Some(&sha256));
    assert_eq!(f.stores.logs.name(), "s3");
    assert_eq!(f.stores.artifacts.name(), "s3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_multipart_upload_is_aborted_and_leaves_no_parts_behind() {
    let _shared = ALONE.read().await;
    let f = Fixture::start().await;
    let key = attempt(2);
    let src = f.scratch().join("in");
    write_pseudo_random_file(&src, (PART_SIZE * 2 + 10) as u64, 2).expect("write");
    let result = f
        .stores
        .artifacts
        .put_file(&key, "big.bin", &src, &"ab".repeat(32))
        .await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    assert_eq!(bucket_keys(&f.raw).await, Vec::<String>::new());
    // s3s-fs keeps uploads' parts as `.upload_id-*` files in its root until completed or
    // aborted.
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.path().join("s3"))
        .expect("root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload_id-"))
        .collect();
    assert_eq!(
        leftovers,
        Vec::<String>::new(),
        "parts of an aborted upload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_as_unavailable_not_as_missing_objects() {
    let _shared = ALONE.read().await;
    let f = Fixture::start().await;
    let dir = f.dir.path();
    std::fs::write(dir.join("wrong-secret"), "not-the-secret").expect("write");
    let config = S3Config {
        endpoint: Some(f.endpoint.clone()),
        path_style: true,
        access_key_id_file: Some(dir.join("access-key-id")),
        secret_access_key_file: Some(dir.join("wrong-secret")),
        ..S3Config::new(BUCKET)
    };
    let stores = S3Stores::connect(&config).expect("connect makes no request");
    let read = stores.logs.read(&attempt(3), None, 10).await;
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    assert!(stores.check_bucket().await.is_err());
}

#[tokio::test]
async fn connect_refuses_an_invalid_config_and_missing_credential_files() {
    let bad = S3Config {
        prefix: Some("/abs".into()),
        ..S3Config::new(BUCKET)
    };
    assert!(matches!(
        S3Stores::connect(&bad),
        Err(S3ConfigError::Invalid {
            field: "prefix",
            ..
        })
    ));
    let missing = S3Config {
        access_key_id_file: Some("/nonexistent/id".into()),
        secret_access_key_file: Some("/nonexistent/secret".into()),
        ..S3Config::new(BUCKET)
    };
    match S3Stores::connect(&missing) {
        Err(S3ConfigError::Credentials(msg)) => assert!(msg.contains("/nonexistent/id"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// Resets this process's peak resident memory (`VmHWM`) to its current resident memory
/// (Linux: `5` to `/proc/self/clear_refs`), so a later `VmHWM` is the peak since now, not a
/// peak earlier tests of this process reached. Returns the current resident memory, in KiB.
fn reset_peak_rss_kib() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5")
        .expect("reset VmHWM through /proc/self/clear_refs");
    status_kib("VmRSS:")
}

/// Whether two files hold the same bytes, compared in 1 MiB pieces (no hashing: the store
/// already checked the SHA-256, this checks the store).
fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut a, mut b) = (
        File::open(a).expect("open a"),
        File::open(b).expect("open b"),
    );
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut a, &mut x);
        if n != read_full(&mut b, &mut y) || x[..n] != y[..n] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]).expect("read") {
            0 => break,
            n => filled += n,
        }
    }
    filled
}

/// Runs in CI like every other test. In a debug build on 2 cores it takes about 95 s
/// (writing and hashing the file 21 s, upload 54 s, download 19 s), nearly all of it
/// SHA-256, MD5 and CRC in unoptimized code: the test's hash of the file it writes, the
/// store's on upload and download, SigV4's payload hash over plain HTTP, the server's MD5
/// ETags. With `opt-level = 3` for `sha2`, `md-5`, `crc-fast`, `crc32fast` and `crc32c`
/// alone it takes about 25 s.
///
/// The memory bound: the uploader holds at most 5 parts of 16 MiB (4 uploading, 1 being
/// read: 80 MiB); the in-process server (s3s-fs) streams request bodies to files, though
/// hyper and the SDK buffer some of each part in flight; the download streams through a
/// 1 MiB buffer. 300 MiB leaves room for all that and still fails loudly if anything holds
/// the whole file (1 GiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_artifact_uploads_with_bounded_memory_and_downloads_byte_identical() {
    let _alone = ALONE.write().await;
    let f = Fixture::start().await;
    let key = attempt(4);
    let scratch = f.scratch();
    let src = scratch.join("one-gib.bin");
    let len: u64 = 1 << 30;
    #[allow(clippy::disallowed_methods)] // Reporting how long it took, not deciding anything.
    let clock = std::time::Instant::now;
    let written = clock();
    let sha256 = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || write_pseudo_random_file(&src, len, 42))
            .await
            .expect("task")
            .expect("write")
    };
    let written = written.elapsed();
    let before = reset_peak_rss_kib();
    let started = clock();
    let stored = f
        .stores
        .artifacts
        .put_file(&key, "one-gib.bin", &src, &sha256)
        .await
        .expect("put_file");
    let uploaded = started.elapsed();
    assert_eq!(
        (stored.size, stored.sha256.as_str()),
        (len, sha256.as_str())
    );
    let dest = scratch.join("one-gib.out");
    let size = f
        .stores
        .artifacts
        .get_file(&key, "one-gib.bin", &dest)
        .await
        .expect("get_file");
    let downloaded = started.elapsed() - uploaded;
    assert_eq!(size, len);
    let growth_mib = status_kib("VmHWM:").saturating_sub(before) / 1024;
    let same = tokio::task::spawn_blocking(move || same_bytes(&src, &dest))
        .await
        .expect("task");
    assert!(same, "the download differs from the upload");
    eprintln!(
        "1 GiB: writing and hashing the file {written:.1?}, upload {uploaded:.1?}, download \
         {downloaded:.1?}, comparing {:.1?}; peak RSS growth {growth_mib} MiB",
        started.elapsed() - uploaded - downloaded
    );
    assert!(growth_mib < 300, "peak RSS grew by {growth_mib} MiB");
}
