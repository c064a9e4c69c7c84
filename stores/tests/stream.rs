//! The log stream conformance suite on both adapters: [`FileLogStream`] in a temporary
//! directory (one test per case, and the whole suite on one stream) and [`KafkaLogStream`]
//! against librdkafka's in-process mock cluster (3 brokers, a topic of 3 partitions
//! replicated 3 times; the whole suite on one stream); plus what only each adapter can show (the file's crash recovery and damage, Kafka's
//! malformed messages).

use std::time::Duration;

use flotilla_core::ids::{Attempt, BuildId, Fence, JobId, ProjectId};
use flotilla_core::runner::Stream;
use flotilla_core::store::{
    AttemptKey, LogLine, LogStream, LogStreamConsumer, Shipped, StoreError, StreamPosition,
};
use flotilla_stores::conformance;
use tokio::time::Instant;

/// A line record of job `job` (build 900), sequence number `seq`.
fn record(job: u64, seq: u64) -> Shipped {
    Shipped::Line {
        key: AttemptKey {
            project: ProjectId::new("stream-tests").expect("valid"),
            build: BuildId(900),
            job: JobId(job),
            attempt: Attempt::FIRST,
        },
        fence: Fence(1),
        line: LogLine {
            seq,
            ts: 1_700_000_000_000 + seq,
            stream: Stream::Stdout,
            step: Some(1),
            text: format!("line {seq} of job {job}"),
        },
    }
}

fn records(job: u64, seqs: std::ops::Range<u64>) -> Vec<Shipped> {
    seqs.map(|seq| record(job, seq)).collect()
}

/// Polls until `want` records came, failing after 30 s.
async fn poll_n(
    consumer: &mut Box<dyn LogStreamConsumer>,
    want: usize,
) -> Vec<(StreamPosition, Shipped)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < want {
        assert!(Instant::now() < deadline, "{} of {want} records", got.len());
        got.extend(
            consumer
                .poll(1000, Duration::from_millis(200))
                .await
                .expect("poll"),
        );
    }
    got
}

fn shipped(records: &[(StreamPosition, Shipped)]) -> Vec<Shipped> {
    records.iter().map(|(_, r)| r.clone()).collect()
}

mod file {
    use std::fs::{self, OpenOptions};
    use std::os::unix::fs::FileExt;

    use flotilla_stores::stream::{FileLogStream, MAX_RECORD_BYTES};
    use tempfile::TempDir;

    use super::*;

    fn open(dir: &TempDir) -> FileLogStream {
        FileLogStream::open(dir.path()).expect("open")
    }

    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let dir = tempfile::tempdir().expect("tempdir");
                conformance::$case(&open(&dir)).await;
            }
        )*};
    }

    cases!(
        records_of_many_jobs_come_back_complete_each_jobs_in_publish_order,
        a_new_consumer_of_a_group_starts_after_what_the_group_committed,
        records_returned_but_not_committed_are_delivered_again_to_the_next_consumer,
        two_groups_each_see_every_record_and_commit_independently,
        an_end_record_round_trips_with_its_last_seq,
        poll_with_nothing_new_returns_empty_after_about_wait_and_wakes_for_a_new_record,
    );

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_case_passes_with_all_cases_sharing_one_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = open(&dir);
        assert_eq!(stream.name(), "file");
        conformance::log_stream_suite(&stream).await;
    }

    fn file_len(stream: &FileLogStream) -> u64 {
        fs::metadata(stream.path()).expect("stat").len()
    }

    #[tokio::test]
    async fn a_torn_last_batch_is_dropped_on_reopen_and_publishing_continues_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = open(&dir);
        stream.publish(&records(1, 0..3)).await.expect("publish");
        stream.publish(&records(2, 0..2)).await.expect("publish");
        let intact = file_len(&stream);
        stream.publish(&records(1, 3..4)).await.expect("publish");
        let path = stream.path().to_owned();
        drop(stream);

        // A crash cut the last write short.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(fs::metadata(&path).expect("stat").len() - 3)
            .expect("truncate");
        drop(file);

        let stream = open(&dir);
        assert_eq!(file_len(&stream), intact, "the torn batch is cut off");
        let mut consumer = stream.subscribe("after-crash").expect("subscribe");
        let mut want = records(1, 0..3);
        want.extend(records(2, 0..2));
        assert_eq!(shipped(&poll_n(&mut consumer, 5).await), want);
        stream.publish(&records(3, 0..2)).await.expect("publish");
        assert_eq!(shipped(&poll_n(&mut consumer, 2).await), records(3, 0..2));
        let got = consumer
            .poll(10, Duration::from_millis(300))
            .await
            .expect("poll");
        assert_eq!(got, vec![]);
    }

    #[tokio::test]
    async fn damage_in_the_last_batch_is_taken_for_a_torn_write_and_the_batch_dropped_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = open(&dir);
        stream.publish(&records(1, 0..2)).await.expect("publish");
        let intact = file_len(&stream);
        stream.publish(&records(1, 2..5)).await.expect("publish");
        let path = stream.path().to_owned();
        drop(stream);
        // A flipped byte in the last batch's middle record: a torn write can leave exactly
        // this (later pages on disk, earlier ones not), and nothing after it was acknowledged
        // by a sync that completed... as far as the file can tell.
        let len = fs::metadata(&path).expect("stat").len();
        flip_byte(&path, intact + (len - intact) / 2);

        let stream = open(&dir);
        assert_eq!(file_len(&stream), intact);
        let mut consumer = stream.subscribe("g").expect("subscribe");
        assert_eq!(shipped(&poll_n(&mut consumer, 2).await), records(1, 0..2));
    }

    fn flip_byte(path: &std::path::Path, at: u64) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open");
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).expect("read");
        file.write_all_at(&[byte[0] ^ 0x20], at).expect("write");
        file.sync_all().expect("sync");
    }

    #[tokio::test]
    async fn a_damaged_record_before_intact_ones_is_corrupt_naming_the_file_and_its_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = open(&dir);
        stream.publish(&records(1, 0..2)).await.expect("publish");
        stream.publish(&records(1, 2..5)).await.expect("publish");
        stream.publish(&records(1, 5..7)).await.expect("publish");
        let mut probe = stream.subscribe("probe").expect("subscribe");
        let all = poll_n(&mut probe, 7).await;
        drop(probe);
        let victim = all[3].0;
        // Inside the record's JSON, well past its header.
        flip_byte(stream.path(), victim.offset + 20);
        let path = stream.path().display().to_string();
        let names_it =
            |msg: &str| msg.contains(&path) && msg.contains(&format!("byte {}", victim.offset));

        // While the stream is open: the records before it, then the error, never a skip.
        let mut reader = stream.subscribe("reader").expect("subscribe");
        let mut before = Vec::new();
        let error = loop {
            match reader.poll(100, Duration::from_millis(200)).await {
                Ok(got) if got.is_empty() => panic!("poll ended quietly at the damage"),
                Ok(got) => before.extend(got),
                Err(e) => break e,
            }
        };
        assert_eq!(before, all[..3].to_vec());
        assert!(
            matches!(&error, StoreError::Corrupt(m) if names_it(m)),
            "{error}"
        );
        // And again: it does not move past it.
        let again = reader.poll(100, Duration::from_millis(200)).await;
        assert!(matches!(again, Err(StoreError::Corrupt(_))), "{again:?}");
        drop(reader);
        drop(stream);

        // Reopening refuses, naming the damage, and leaves the file as it was.
        let len = fs::metadata(&path).expect("stat").len();
        match FileLogStream::open(dir.path()) {
            Err(StoreError::Corrupt(msg)) => {
                assert!(names_it(&msg), "{msg}");
                assert!(msg.contains("move the file"), "says what to do: {msg}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(fs::metadata(&path).expect("stat").len(), len);
    }

    #[tokio::test]
    async fn a_groups_committed_position_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = open(&dir);
        stream.publish(&records(1, 0..5)).await.expect("publish");
        let mut consumer = stream.subscribe("g").expect("subscribe");
        let got = poll_n(&mut consumer, 5).await;
        consumer.commit(&[got[2].0]).await.expect("commit");
        drop(consumer);
        drop(stream);
        let stream = open(&dir);
        let mut consumer = stream.subscribe("g").expect("subscribe");
        assert_eq!(shipped(&poll_n(&mut consumer, 2).await), records(1, 3..5));
        assert!(dir.path().join("groups/g.json").exists());
    }

    #[tokio::test]
    async fn a_group_has_one_consumer_at_a_time_and_a_directory_one_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = open(&dir);
        let first = stream.subscribe("g").expect("subscribe");
        assert!(matches!(stream.subscribe("g"), Err(StoreError::Invalid(_))));
        let other = stream.subscribe("h").expect("another group");
        drop(first);
        stream.subscribe("g").expect("once the first is gone");
        assert!(matches!(
            stream.subscribe("../g"),
            Err(StoreError::Invalid(_))
        ));
        drop(other);
        match FileLogStream::open(dir.path()) {
            Err(StoreError::Unavailable(msg)) => assert!(msg.contains("in use"), "{msg}"),
            other => panic!("a second open must be refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn commit_refuses_positions_it_did_not_return() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = open(&dir);
        stream.publish(&records(1, 0..3)).await.expect("publish");
        let mut consumer = stream.subscribe("g").expect("subscribe");
        let got = consumer
            .poll(2, Duration::from_secs(5))
            .await
            .expect("poll");
        assert_eq!(shipped(&got), records(1, 0..2), "at most max");
        let other_partition = StreamPosition {
            partition: 1,
            offset: got[0].0.offset,
        };
        let not_a_record = StreamPosition {
            partition: 0,
            offset: got[1].0.offset + 1,
        };
        let not_returned = StreamPosition {
            partition: 0,
            offset: 1 << 40,
        };
        for bad in [other_partition, not_a_record, not_returned] {
            let result = consumer.commit(&[bad]).await;
            assert!(
                matches!(result, Err(StoreError::Invalid(_))),
                "{bad:?}: {result:?}"
            );
        }
        consumer.commit(&[got[1].0]).await.expect("commit");
        consumer.commit(&[]).await.expect("nothing to commit");
    }

    #[tokio::test]
    async fn a_record_over_the_size_limit_is_refused_and_nothing_of_its_call_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = open(&dir);
        let before = file_len(&stream);
        let mut big = record(1, 1);
        if let Shipped::Line { line, .. } = &mut big {
            line.text = "x".repeat(MAX_RECORD_BYTES);
        }
        let result = stream.publish(&[record(1, 0), big]).await;
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
        assert_eq!(file_len(&stream), before);
    }
}

mod kafka {
    use flotilla_stores::stream::{KafkaConfig, KafkaLogStream};
    use rdkafka::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};

    use super::*;

    const TOPIC: &str = "flotilla.logs.test";

    /// A stream on a fresh mock cluster of 3 brokers with the topic (3 partitions, 3
    /// replicas): the mock broker has no CreateTopics API, so the cluster makes it.
    struct Kafka {
        // Dropped before the cluster.
        stream: KafkaLogStream,
        cluster: MockCluster<'static, DefaultProducerContext>,
    }

    async fn kafka() -> Kafka {
        let cluster = MockCluster::new(3).expect("mock cluster");
        cluster.create_topic(TOPIC, 3, 3).expect("create topic");
        let brokers: Vec<String> = cluster
            .bootstrap_servers()
            .split(',')
            .map(str::to_owned)
            .collect();
        let mut config = KafkaConfig::new(brokers);
        config.topic = TOPIC.into();
        // The mock broker waits a session timeout less a second for the members of a group
        // to rejoin after one left: 44 s with librdkafka's default. These tests start a new
        // consumer of a group right after the last one left.
        config
            .extra
            .insert("session.timeout.ms".into(), "3000".into());
        config
            .extra
            .insert("heartbeat.interval.ms".into(), "500".into());
        // A JoinGroup request waits up to this + 3 s: the default (5 min) would turn one
        // slow rebalance into a test that seems to hang.
        config
            .extra
            .insert("max.poll.interval.ms".into(), "10000".into());
        let stream = KafkaLogStream::connect(&config).expect("connect");
        let partitions = stream
            .check_topic(Duration::from_secs(20))
            .await
            .expect("topic metadata");
        assert_eq!(partitions, 3);
        Kafka { stream, cluster }
    }

    // The whole suite in one test rather than one test per case: every new consumer group
    // waits out the mock broker's initial rebalance delay (3 s), and the suite runs its cases
    // concurrently (naming the one that fails), so this takes 13 s where one test per case
    // took 32 s of the two test threads' time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_case_passes_with_all_cases_sharing_one_stream() {
        let k = kafka().await;
        assert_eq!(k.stream.name(), "kafka");
        conformance::log_stream_suite(&k.stream).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_topic_is_not_found() {
        let k = kafka().await;
        let mut config = KafkaConfig::new(
            k.cluster
                .bootstrap_servers()
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
        config.topic = "no.such.topic".into();
        let other = KafkaLogStream::connect(&config).expect("connect");
        let got = other.check_topic(Duration::from_secs(10)).await;
        assert!(matches!(got, Err(StoreError::NotFound(_))), "{got:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_messages_are_skipped_and_counted_and_commits_cover_them() {
        let k = kafka().await;
        let raw: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", k.cluster.bootstrap_servers())
            .create()
            .expect("raw producer");
        // Keyed like job 7's records, so they land in its partition, between and after them.
        let send_raw = |value: Option<&'static str>| {
            let raw = &raw;
            async move {
                let mut message = FutureRecord::<str, str>::to(TOPIC).key("7");
                if let Some(value) = value {
                    message = message.payload(value);
                }
                raw.send(message, Duration::from_secs(10))
                    .await
                    .map_err(|(e, _)| e)
                    .expect("raw send");
            }
        };
        k.stream.publish(&[record(7, 0)]).await.expect("publish");
        send_raw(Some("not json")).await;
        k.stream.publish(&[record(7, 1)]).await.expect("publish");
        send_raw(Some(r#"{"t":"line"}"#)).await;
        send_raw(None).await;

        let mut first = k.stream.subscribe("malformed").expect("subscribe");
        let got = poll_n(&mut first, 2).await;
        assert_eq!(shipped(&got), records(7, 0..2));
        let deadline = Instant::now() + Duration::from_secs(30);
        while k.stream.malformed_skipped() < 3 {
            assert!(Instant::now() < deadline, "{:?}", k.stream);
            let more = first
                .poll(10, Duration::from_millis(200))
                .await
                .expect("poll");
            assert_eq!(more, vec![], "only malformed messages are left");
        }
        // Committing the last record returned covers the malformed messages after it.
        first.commit(&[got[1].0]).await.expect("commit");
        drop(first);

        let mut second = k.stream.subscribe("malformed").expect("subscribe");
        k.stream.publish(&[record(7, 2)]).await.expect("publish");
        let again = poll_n(&mut second, 1).await;
        assert_eq!(
            shipped(&again),
            records(7, 2..3),
            "nothing committed came back"
        );
        assert_eq!(
            k.stream.malformed_skipped(),
            3,
            "the malformed messages were committed, not read again"
        );
    }
}
