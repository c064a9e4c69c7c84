use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::ids::{Attempt, BuildId, JobId, ProjectId};
use crate::runner::Stream;

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
            text: format!("job {job} line {seq}"),
        },
    }
}

fn end(job: u64, last_seq: Option<u64>) -> Shipped {
    Shipped::End {
        key: key(job),
        fence: Fence(job),
        last_seq,
    }
}

/// The position of the `n`th record: offsets are opaque and need not be consecutive (the
/// file stream uses byte positions), so the tests space them out.
fn at(n: u64) -> StreamPosition {
    StreamPosition {
        partition: 0,
        offset: n * 10 + 7,
    }
}

fn small() -> AggregateConfig {
    AggregateConfig {
        max_chunk_bytes: 150,
        max_chunk_age_ms: 5_000,
    }
}

fn chunk_seqs(action: &Action) -> Vec<u64> {
    match action {
        Action::PutChunk { chunk, .. } => chunk.lines.iter().map(|l| l.seq).collect(),
        Action::Finish { .. } => Vec::new(),
    }
}

fn id_of(action: &Action) -> WriteId {
    match action {
        Action::PutChunk { id, .. } | Action::Finish { id, .. } => *id,
    }
}

#[test]
fn lines_are_written_when_the_buffer_is_full_when_it_is_old_and_at_the_end() {
    let mut agg = Aggregator::new(small());
    // Each line counts its text plus 32 bytes: four 12-byte lines fill 150 bytes.
    let mut actions = Vec::new();
    for seq in 0..4 {
        actions.extend(agg.offer(at(seq), line(1, seq), false, 0));
    }
    assert_eq!(actions.len(), 1, "full after the fourth line: {actions:?}");
    assert_eq!(chunk_seqs(&actions[0]), [0, 1, 2, 3]);
    assert!(agg.offer(at(4), line(1, 4), false, 100).is_empty());
    assert!(agg.tick(4_000).is_empty(), "not old yet");
    let aged = agg.tick(5_100);
    assert_eq!(aged.iter().map(chunk_seqs).collect::<Vec<_>>(), [vec![4]]);
    let ended = agg.offer(at(5), line(1, 5), false, 5_200);
    assert!(ended.is_empty());
    let ended = agg.offer(at(6), end(1, Some(5)), false, 5_300);
    assert_eq!(ended.iter().map(chunk_seqs).collect::<Vec<_>>(), [vec![5]]);
}

#[test]
fn a_position_is_committed_only_once_what_it_carried_is_stored() {
    let mut agg = Aggregator::new(small());
    let a = agg.offer(at(0), line(1, 0), false, 0);
    assert!(a.is_empty());
    assert!(agg.committable().is_empty(), "line 0 is only in memory");
    let stale = agg.offer(at(1), line(2, 0), true, 0);
    assert!(stale.is_empty());
    assert_eq!(agg.stats().stale, 1);
    assert!(agg.committable().is_empty(), "still behind line 0");
    let flushed = agg.tick(10_000);
    assert_eq!(flushed.len(), 1);
    assert!(
        agg.committable().is_empty(),
        "the chunk is not acknowledged yet"
    );
    agg.written(id_of(&flushed[0]), 10_001);
    assert_eq!(
        agg.committable(),
        [at(1)],
        "line 0 stored, the stale line dropped"
    );
    agg.committed(&[at(1)]);
    assert!(agg.committable().is_empty(), "nothing new");
}

#[test]
fn a_failed_write_holds_the_commit_back_and_is_written_again() {
    let mut agg = Aggregator::new(small());
    agg.offer(at(0), line(1, 0), false, 0);
    let first = agg.tick(6_000);
    agg.failed(id_of(&first[0]));
    assert!(agg.committable().is_empty());
    let again = agg.tick(6_001);
    assert_eq!(again.iter().map(chunk_seqs).collect::<Vec<_>>(), [vec![0]]);
    agg.written(id_of(&again[0]), 6_002);
    assert_eq!(agg.committable(), [at(0)]);
}

#[test]
fn the_end_is_finished_once_every_line_received_is_stored_and_late_lines_are_dropped() {
    let mut agg = Aggregator::new(small());
    agg.offer(at(0), line(1, 0), false, 0);
    let put = agg.offer(at(1), end(1, Some(0)), false, 1);
    assert_eq!(put.len(), 1, "the rest is written at the end: {put:?}");
    assert!(matches!(put[0], Action::PutChunk { .. }));
    let finish = agg.written(id_of(&put[0]), 2);
    assert!(
        matches!(
            finish[..],
            [Action::Finish {
                last_seq: Some(0),
                fence: Fence(1),
                ..
            }]
        ),
        "{finish:?}"
    );
    assert_eq!(
        agg.committable(),
        [at(0)],
        "the line is stored; the end waits for the manifest"
    );
    assert!(agg.written(id_of(&finish[0]), 3).is_empty());
    assert_eq!(agg.committable(), [at(1)]);
    assert_eq!(agg.open_attempts(), 0);
    assert!(agg.offer(at(2), line(1, 1), false, 4).is_empty());
    assert_eq!(agg.stats().late, 1);
    // An attempt that printed nothing finishes at once.
    let finish = agg.offer(at(3), end(2, None), false, 5);
    assert!(
        matches!(finish[..], [Action::Finish { last_seq: None, .. }]),
        "{finish:?}"
    );
}

#[test]
fn a_line_sent_again_while_its_chunk_is_being_written_is_a_repeat() {
    let mut agg = Aggregator::new(small());
    agg.offer(at(0), line(1, 8), false, 0);
    agg.offer(at(1), line(1, 9), false, 0);
    let first = agg.tick(10_000);
    assert_eq!(
        first.iter().map(chunk_seqs).collect::<Vec<_>>(),
        [vec![8, 9]]
    );
    // A retried publish delivers 8 and 9 again while chunk-8 is in flight.
    assert!(agg.offer(at(2), line(1, 8), false, 10_001).is_empty());
    assert!(agg.offer(at(3), line(1, 9), false, 10_001).is_empty());
    assert_eq!(agg.stats().repeated, 2);
    agg.offer(at(4), line(1, 10), false, 10_002);
    let next = agg.tick(20_000);
    assert_eq!(
        next.iter().map(chunk_seqs).collect::<Vec<_>>(),
        [vec![10]],
        "never a second chunk-8 with fewer lines racing the first"
    );
    assert!(
        agg.committable().is_empty(),
        "chunk-8 is not acknowledged yet"
    );
    agg.written(id_of(&first[0]), 20_001);
    assert_eq!(
        agg.committable(),
        [at(3)],
        "the repeats are done with chunk-8"
    );
}

/// A store with the chunk semantics of the real ones: a chunk replaces the chunk with the
/// same first line; reading drops repeated lines.
#[derive(Debug, Default)]
struct Store {
    chunks: BTreeMap<(u64, u64), Vec<LogLine>>,
    manifests: BTreeMap<u64, Option<u64>>,
}

impl Store {
    fn lines(&self, job: u64) -> Vec<u64> {
        let mut seqs: Vec<u64> = self
            .chunks
            .iter()
            .filter(|((j, _), _)| *j == job)
            .flat_map(|(_, lines)| lines.iter().map(|l| l.seq))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs
    }
}

/// Runs `records` (job, line count) through an aggregator that crashes and fails writes as
/// `faults` says; returns the store.
fn run(jobs: &[(u64, u64)], faults: &[u8]) -> Store {
    // The stream: every job's lines then its end, interleaved round-robin in one partition.
    // Some lines are published twice (a retried publish), right after the first copy.
    let mut stream = Vec::new();
    let longest = jobs.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let mut dup = faults.iter().copied().cycle();
    for seq in 0..=longest {
        for (job, n) in jobs {
            if seq < *n {
                stream.push(line(*job, seq));
                if dup.next().unwrap_or(0) % 5 == 0 {
                    stream.push(line(*job, seq));
                }
            } else if seq == *n {
                stream.push(end(*job, n.checked_sub(1)));
            }
        }
    }
    let mut store = Store::default();
    let mut committed: Option<u64> = None;
    let mut fault = faults.iter().copied().cycle();
    let (mut crashes, mut failures) = (0, 0);
    let mut now = 0u64;
    'incarnation: loop {
        let mut agg = Aggregator::new(small());
        let mut queue: Vec<Action> = Vec::new();
        // Writes still in flight when the next record comes (they land later, in any order).
        let mut deferred: Vec<Action> = Vec::new();
        let start = committed.map_or(0, |c| c + 1) as usize;
        let mut next = start;
        loop {
            now += 700;
            if next < stream.len() {
                queue.extend(agg.offer(at(next as u64), stream[next].clone(), false, now));
                next += 1;
            }
            queue.extend(agg.tick(now));
            queue.extend(agg.retry_finishes(now));
            queue.append(&mut deferred);
            // Do (or fail, or crash during) the writes asked for.
            while let Some(action) = queue.pop() {
                match fault.next().unwrap_or(2) % 8 {
                    0 if crashes < 6 => {
                        crashes += 1;
                        continue 'incarnation; // the action is lost with the process
                    }
                    1 if failures < 20 => {
                        failures += 1;
                        agg.failed(id_of(&action));
                        continue;
                    }
                    2 | 3 if next < stream.len() => {
                        deferred.push(action);
                        continue;
                    }
                    _ => {}
                }
                match &action {
                    Action::PutChunk { key, chunk, .. } => {
                        let first = chunk.first_seq().expect("not empty");
                        store.chunks.insert((key.job.0, first), chunk.lines.clone());
                    }
                    Action::Finish { key, last_seq, .. } => {
                        // The driver reads the log back: it must be whole.
                        let n = last_seq.map_or(0, |l| l + 1);
                        assert_eq!(
                            store.lines(key.job.0),
                            (0..n).collect::<Vec<_>>(),
                            "finishing job {} with lines missing",
                            key.job
                        );
                        store.manifests.insert(key.job.0, *last_seq);
                    }
                }
                queue.extend(agg.written(id_of(&action), now));
            }
            let commit = agg.committable();
            if let Some(p) = commit.first() {
                assert_eq!(p.offset % 10, 7, "a commit names a received offset: {p:?}");
                committed = Some((p.offset - 7) / 10);
                agg.committed(&commit);
            }
            if next >= stream.len()
                && agg.open_attempts() == 0
                && queue.is_empty()
                && deferred.is_empty()
            {
                return store;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever crashes and failed writes happen, every line ends up stored exactly once
    /// (as a reader sees it) and every log gets its manifest.
    #[test]
    fn crashes_and_failed_writes_lose_and_duplicate_nothing(
        lines in proptest::collection::vec(0u64..12, 1..5),
        faults in proptest::collection::vec(any::<u8>(), 1..40),
    ) {
        let jobs: Vec<(u64, u64)> = lines.iter().enumerate().map(|(i, n)| (i as u64 + 1, *n)).collect();
        let store = run(&jobs, &faults);
        for (job, n) in &jobs {
            prop_assert_eq!(store.lines(*job), (0..*n).collect::<Vec<_>>(), "job {}", job);
            prop_assert_eq!(store.manifests.get(job), Some(&n.checked_sub(1)), "job {}", job);
        }
    }
}
