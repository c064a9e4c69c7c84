//! The log aggregator against the real embedded engines: the file log stream and the
//! directory log store. Killing it mid-stream and starting it again leaves every line in the
//! archive exactly once, in order, with a manifest whose SHA-256 matches.

use std::sync::Arc;
use std::time::Duration;

use flotilla_cell_agent::logs::{AggregatorConfig, LogAggregator, StaleCheck};
use flotilla_core::aggregate::AggregateConfig;
use flotilla_core::ids::{Attempt, BuildId, Fence, JobId, ProjectId};
use flotilla_core::runner::Stream;
use flotilla_core::store::{AttemptKey, LogLine, LogStore, LogStream, Shipped, plain_text_line};
use flotilla_stores::dir::DirLogStore;
use flotilla_stores::stream::FileLogStream;
use sha2::{Digest, Sha256};

fn key(job: u64) -> AttemptKey {
    AttemptKey {
        project: ProjectId::new("web").expect("valid"),
        build: BuildId(1),
        job: JobId(job),
        attempt: Attempt::FIRST,
    }
}

fn line(job: u64, seq: u64) -> Shipped {
    Shipped::Line {
        key: key(job),
        fence: Fence(job),
        line: LogLine {
            seq,
            ts: seq,
            stream: Stream::Stdout,
            step: Some(0),
            text: format!(
                "job {job} says line {seq} {}",
                "x".repeat((seq % 50) as usize)
            ),
        },
    }
}

fn never_stale() -> StaleCheck {
    Arc::new(|_, _| false)
}

fn config() -> AggregatorConfig {
    AggregatorConfig {
        chunking: AggregateConfig {
            max_chunk_bytes: 4 << 10,
            max_chunk_age_ms: 100,
        },
        poll_max: 97,
        poll_wait: Duration::from_millis(20),
        retry_after: Duration::from_millis(50),
        ..AggregatorConfig::new("cell-a")
    }
}

async fn read_all(store: &DirLogStore, key: &AttemptKey) -> (Vec<LogLine>, bool) {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let read = store.read(key, after, 1_000).await.expect("read");
        let complete = read.complete;
        if read.lines.is_empty() {
            return (all, complete);
        }
        after = read.lines.last().map(|l| l.seq);
        all.extend(read.lines);
        if complete {
            return (all, true);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_aggregator_mid_stream_and_restarting_it_loses_and_duplicates_no_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = FileLogStream::open(dir.path().join("stream")).expect("stream");
    let store = Arc::new(DirLogStore::new(dir.path().join("store")));
    const JOBS: u64 = 3;
    const LINES: u64 = 3_000;

    // The first aggregator archives the first half, and is killed while the second half
    // streams in.
    let first =
        LogAggregator::start(&stream, store.clone(), never_stale(), config()).expect("start");
    for seq in 0..LINES / 2 {
        let batch: Vec<Shipped> = (1..=JOBS).map(|job| line(job, seq)).collect();
        stream.publish(&batch).await.expect("publish");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while read_all(&store, &key(1)).await.0.len() < 500 {
        assert!(tokio::time::Instant::now() < deadline, "nothing archived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for seq in LINES / 2..LINES * 3 / 4 {
        let batch: Vec<Shipped> = (1..=JOBS).map(|job| line(job, seq)).collect();
        stream.publish(&batch).await.expect("publish");
    }
    first.kill();
    // Also publish a line twice (a runner's retried publish).
    stream.publish(&[line(2, 10)]).await.expect("publish");

    let second = LogAggregator::start(&stream, store.clone(), never_stale(), config())
        .expect("a restarted aggregator joins the group again");
    for seq in LINES * 3 / 4..LINES {
        let batch: Vec<Shipped> = (1..=JOBS).map(|job| line(job, seq)).collect();
        stream.publish(&batch).await.expect("publish");
    }
    let ends: Vec<Shipped> = (1..=JOBS)
        .map(|job| Shipped::End {
            key: key(job),
            fence: Fence(job),
            last_seq: Some(LINES - 1),
        })
        .collect();
    stream.publish(&ends).await.expect("publish");

    for job in 1..=JOBS {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let manifest = loop {
            if let Some(m) = store.manifest(&key(job)).await.expect("manifest") {
                break m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {job}'s log never finished"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (lines, complete) = read_all(&store, &key(job)).await;
        assert!(complete, "job {job}");
        let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
        assert_eq!(
            seqs,
            (0..LINES).collect::<Vec<_>>(),
            "job {job}: every line once, in order"
        );
        let expected: Vec<LogLine> = (0..LINES)
            .map(|seq| match line(job, seq) {
                Shipped::Line { line, .. } => line,
                Shipped::End { .. } => unreachable!("a line"),
            })
            .collect();
        assert_eq!(lines, expected, "job {job}: the lines as published");
        let mut sha = Sha256::new();
        for l in &lines {
            sha.update(plain_text_line(l).as_bytes());
        }
        assert_eq!(manifest.sha256, hex::encode(sha.finalize()), "job {job}");
        assert_eq!(
            (manifest.lines, manifest.last_seq),
            (LINES, Some(LINES - 1))
        );
        assert_eq!(manifest.fence, Fence(job));
    }
    second.stop().await;
}
