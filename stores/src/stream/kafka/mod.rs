//! [`KafkaLogStream`]: the log stream as a Kafka topic, through rdkafka (librdkafka).
//!
//! Records: key = the job id as decimal text, value = the [`Shipped`] as JSON (the file
//! stream's record payload, byte for byte). The producer is idempotent with `acks=all`; a
//! consumer is a `StreamConsumer` in the group, committing by hand.
//!
//! **Order per job.** Every record of a job has the same key, and the partitioner maps a key
//! to one partition, so a job's records share a partition. `publish` hands the records to
//! librdkafka one after another, in the order given (a full queue makes it wait and retry the
//! same record, never the next), so they sit in the partition's queue in that order. With
//! `enable.idempotence=true`, librdkafka numbers each partition's messages and keeps at most
//! `max.in.flight.requests.per.connection` (5, set here) requests in flight; a broker refuses
//! a batch out of sequence, and librdkafka retries in sequence, so Kafka appends a partition's
//! messages in the order they were queued, without duplicates from retries. A `publish`
//! returns only after the delivery report of every one of its records, so the records of a
//! later call come after it too. What a failed `publish` is not: atomic. Some of its records
//! may be stored and later ones not; publishing the batch again stores them (again), and the
//! consumer drops repeated sequence numbers.
//!
//! **Consumers.** `enable.auto.commit=false` and `enable.auto.offset.store=false`: only
//! [`LogStreamConsumer::commit`] moves a group, to the offset after the highest position
//! given per partition, synchronously. `auto.offset.reset=earliest`: a new group reads the
//! topic from its start. Partitions the consumer no longer owns after a rebalance are left
//! out of a commit (their new owner commits them); after a rebalance, whatever was returned
//! but not committed is returned again. librdkafka's consumer errors are informational (it
//! recovers from them by itself, as its documentation says): `poll` logs them and goes on,
//! and fails only on a fatal error. A consumer must `poll` at least every
//! `max.poll.interval.ms` (5 minutes), or it leaves the group. Dropping it leaves the group
//! at once, on a thread of its own (librdkafka's close can take long; it never blocks the
//! task that drops the consumer).
//!
//! **Malformed messages.** Anything on the topic that is not a [`Shipped`] is skipped,
//! counted ([`KafkaLogStream::malformed_skipped`]) and logged. It is not returned, so the
//! caller never commits its position; the consumer remembers it instead: when the caller
//! commits everything returned on that partition, the commit extends over the skipped
//! messages that followed, so a malformed message at the end of a partition does not stay
//! uncommitted (and skipped again by every new consumer) until a good one follows it.
//!
//! Files: `config.rs` (the configuration), `consumer.rs` (a group's consumer), this one (the
//! producer side and error mapping).

mod config;
mod consumer;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{LogStream, LogStreamConsumer, Shipped, StoreError};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

pub use config::{KafkaConfig, KafkaConfigError, default_topic};

/// How long `publish` waits for room in librdkafka's queue before giving up.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(30);

/// librdkafka's defaults changed here: a `publish` that cannot be delivered fails after 30 s
/// (not 5 minutes), so the runner learns of an outage while it can still buffer; log lines
/// compress well. Both may be overridden in [`KafkaConfig::extra`].
const DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "flotilla"),
    ("message.timeout.ms", "30000"),
    ("compression.type", "lz4"),
];

/// The log stream in a Kafka topic (see [the module](self)).
pub struct KafkaLogStream {
    topic: String,
    brokers: String,
    /// Everything but the role's own properties: the base of the producer and of every
    /// consumer. Holds secrets: never shown.
    base: ClientConfig,
    /// Replaced after a fatal error (an idempotent producer that lost its sequence cannot
    /// go on).
    producer: RwLock<Arc<FutureProducer>>,
    malformed: Arc<AtomicU64>,
}

impl fmt::Debug for KafkaLogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaLogStream")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("malformed_skipped", &self.malformed_skipped())
            .finish_non_exhaustive()
    }
}

impl KafkaLogStream {
    /// Validates `config`, reads its secret files and creates the producer. Makes no
    /// request (librdkafka connects in the background): see [`KafkaLogStream::check_topic`].
    pub fn connect(config: &KafkaConfig) -> Result<KafkaLogStream, KafkaConfigError> {
        config.validate()?;
        let brokers = config.brokers.join(",");
        let mut base = ClientConfig::new();
        for (key, value) in DEFAULTS {
            base.set(*key, *value);
        }
        for (key, value) in config.pass_through()? {
            base.set(key, value.0);
        }
        base.set("bootstrap.servers", &brokers);
        // A mistyped topic must not be created with the brokers' defaults (one partition, one
        // replica on many clusters): it is an error at `check_topic` and in `publish`.
        base.set("allow.auto.create.topics", "false");
        let producer =
            create_producer(&base).map_err(|e| KafkaConfigError::Client(without_value(&e)))?;
        Ok(KafkaLogStream {
            topic: config.topic.clone(),
            brokers,
            base,
            producer: RwLock::new(Arc::new(producer)),
            malformed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// How many messages on the topic that were not a [`Shipped`] this stream's consumers
    /// have skipped.
    pub fn malformed_skipped(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Asks the cluster for the topic within `timeout`, so a wrong address or a missing topic
    /// shows at start-up rather than at the first build. Returns its number of partitions;
    /// [`StoreError::NotFound`] if it does not exist.
    pub async fn check_topic(&self, timeout: Duration) -> Result<usize, StoreError> {
        let producer = self.producer();
        let topic = self.topic.clone();
        crate::dir::blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| StoreError::Unavailable(format!("kafka topic {topic}: {e}")))?;
            match metadata.topics().iter().find(|t| t.name() == topic) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    Ok(t.partitions().len())
                }
                Some(t) => match t.error().map(RDKafkaErrorCode::from) {
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) | None => {
                        Err(StoreError::NotFound(format!("kafka topic {topic}")))
                    }
                    Some(code) => Err(StoreError::Unavailable(format!(
                        "kafka topic {topic}: {code}"
                    ))),
                },
                None => Err(StoreError::NotFound(format!("kafka topic {topic}"))),
            }
        })
        .await
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Queues every record in order, then awaits every delivery report.
    async fn send_all(
        &self,
        producer: &FutureProducer,
        records: &[Shipped],
    ) -> Result<(), StoreError> {
        let mut reports = Vec::with_capacity(records.len());
        let mut failed = None;
        for shipped in records {
            let key = shipped.key().job.to_string();
            let payload = match serde_json::to_vec(shipped) {
                Ok(payload) => payload,
                Err(e) => {
                    failed = Some(StoreError::Invalid(format!("encoding a record: {e}")));
                    break;
                }
            };
            match self.enqueue(producer, &key, &payload).await {
                Ok(report) => reports.push(report),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Await what was queued even after a failure: the caller learns of every outcome
        // before it publishes again.
        let outcomes = futures::future::join_all(reports).await;
        if let Some(e) = failed {
            return Err(e);
        }
        for outcome in outcomes {
            match outcome {
                Ok(Ok(_delivery)) => {}
                Ok(Err((e, _message))) => return Err(produce_error(&self.topic, &e)),
                Err(_canceled) => {
                    return Err(StoreError::Unavailable(
                        "the Kafka producer closed before reporting a delivery".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Hands one record to librdkafka. A full queue is waited out for the same record, so
    /// records are queued in order.
    async fn enqueue(
        &self,
        producer: &FutureProducer,
        key: &str,
        payload: &[u8],
    ) -> Result<DeliveryFuture, StoreError> {
        let deadline = Instant::now() + QUEUE_FULL_WAIT;
        let mut record = FutureRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match producer.send_result(record) {
                Ok(report) => return Ok(report),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    // Back-pressure, not a retry of a failed request: the queue drains as
                    // librdkafka's own thread delivers.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(produce_error(&self.topic, &e)),
            }
        }
    }

    /// Replaces `failed` if it hit a fatal error and is still the producer in use.
    fn replace_if_fatal(&self, failed: &Arc<FutureProducer>) {
        let Some((code, why)) = failed.client().fatal_error() else {
            return;
        };
        tracing::error!(topic = %self.topic, code = ?code, error = %why, "The Kafka producer hit a fatal error; replacing it.");
        match create_producer(&self.base) {
            Ok(fresh) => {
                let mut current = self
                    .producer
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if Arc::ptr_eq(&current, failed) {
                    *current = Arc::new(fresh);
                }
            }
            Err(e) => {
                tracing::error!(topic = %self.topic, error = %e, "Creating a new Kafka producer failed.");
            }
        }
    }
}

fn create_producer(base: &ClientConfig) -> Result<FutureProducer, KafkaError> {
    base.clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .create()
}

/// A producer's error: one about the record itself is [`StoreError::Invalid`] (sending it
/// again cannot help); everything else (brokers away, timeouts, a missing topic, refused
/// credentials) is [`StoreError::Unavailable`], so a runner keeps its lines and tries again.
fn produce_error(topic: &str, e: &KafkaError) -> StoreError {
    let message = format!("kafka topic {topic}: {e}");
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::BadMessage,
        ) => StoreError::Invalid(message),
        _ => StoreError::Unavailable(message),
    }
}

impl LogStream for KafkaLogStream {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn publish<'a>(&'a self, records: &'a [Shipped]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let producer = self.producer();
            let result = self.send_all(&producer, records).await;
            if result.is_err() {
                self.replace_if_fatal(&producer);
            }
            result
        })
    }

    fn subscribe(&self, group: &str) -> Result<Box<dyn LogStreamConsumer>, StoreError> {
        consumer::subscribe(&self.base, &self.topic, group, self.malformed.clone())
    }
}

/// An rdkafka error as text, without the value of a refused setting (it may be a secret
/// from `secret_files`: rdkafka's own message prints it).
pub(crate) fn without_value(e: &rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, _) => {
            format!("librdkafka refused setting `{key}`: {desc}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_level_errors_are_invalid_and_the_rest_retryable() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(
            produce_error("t", &too_large),
            StoreError::Invalid(_)
        ));
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::NotEnoughReplicas,
        ] {
            let e = produce_error("t", &KafkaError::MessageProduction(code));
            assert!(e.is_retryable(), "{code:?}: {e}");
        }
    }

    #[test]
    fn a_configuration_librdkafka_refuses_is_a_client_error_and_shows_no_secret() {
        let mut config = KafkaConfig::new(["127.0.0.1:9"]);
        config.extra.insert("no.such.property".into(), "1".into());
        let err = KafkaLogStream::connect(&config).unwrap_err();
        assert!(
            matches!(&err, KafkaConfigError::Client(m) if m.contains("no.such.property")),
            "{err}"
        );
        // A secret librdkafka refuses (this build has no OpenSSL for `ssl.key.password`, and
        // an unknown property is refused alike) is named, never shown.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "hunter2-very-secret").unwrap();
        for key in ["ssl.key.password", "no.such.secret.password"] {
            let mut config = KafkaConfig::new(["127.0.0.1:9"]);
            config.secret_files.insert(key.into(), file.clone());
            let err = KafkaLogStream::connect(&config).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            assert!(!err.contains("hunter2"), "the secret leaked: {err}");
        }
        let stream = KafkaLogStream::connect(&KafkaConfig::new(["127.0.0.1:9"])).unwrap();
        assert_eq!(stream.name(), "kafka");
        assert_eq!(stream.topic(), "flotilla.logs");
        assert!(format!("{stream:?}").contains("127.0.0.1:9"));
    }
}
