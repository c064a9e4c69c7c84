//! A consumer of the Kafka stream: one `StreamConsumer` in the group, committing by hand, and
//! remembering the malformed messages it skipped so that commits cover them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{LogStreamConsumer, Shipped, StoreError, StreamPosition};
use futures::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::time::Instant;

/// Counts rebalances, so the consumer knows when its per-partition memory went stale.
#[derive(Debug, Default)]
pub(super) struct GroupContext {
    rebalances: AtomicU64,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalances.fetch_add(1, Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(partitions) => {
                tracing::debug!(
                    partitions = partitions.count(),
                    "Log stream partitions assigned."
                )
            }
            Rebalance::Revoke(partitions) => {
                tracing::debug!(
                    partitions = partitions.count(),
                    "Log stream partitions revoked."
                )
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Log stream rebalance failed."),
        }
    }
}

/// What the consumer knows of one partition since it was (last) assigned.
#[derive(Debug, Default, Clone, Copy)]
struct Partition {
    /// The offset of the last record returned.
    returned: Option<i64>,
    /// The last of the malformed messages skipped since the last record returned (or since
    /// the assignment, when none was returned).
    skipped: Option<i64>,
    /// The offset committed last (the next one to read).
    committed: Option<i64>,
}

struct KafkaStreamConsumer {
    consumer: Arc<StreamConsumer<GroupContext>>,
    topic: String,
    group: String,
    malformed: Arc<AtomicU64>,
    /// The rebalance count `partitions` is valid for.
    rebalances: u64,
    partitions: HashMap<i32, Partition>,
}

impl Drop for KafkaStreamConsumer {
    fn drop(&mut self) {
        // rdkafka's consumer drop leaves the group and waits for librdkafka to finish,
        // with no time limit (rust-rdkafka issue #509): done here, it would block whatever
        // task drops the consumer, and every future polled with it. The last reference goes
        // on a thread of its own instead, which ends when librdkafka has let go. Not a
        // runtime blocking task: the runtime's shutdown would wait for it.
        let consumer = Arc::clone(&self.consumer);
        let leave = std::thread::Builder::new()
            .name("kafka-consumer-close".into())
            .spawn(move || drop(consumer));
        if let Err(e) = leave {
            tracing::warn!(error = %e, "No thread to close a Kafka consumer on; closing it here.");
        }
    }
}

impl std::fmt::Debug for KafkaStreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaStreamConsumer")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

pub(super) fn subscribe(
    base: &ClientConfig,
    topic: &str,
    group: &str,
    malformed: Arc<AtomicU64>,
) -> Result<Box<dyn LogStreamConsumer>, StoreError> {
    if group.is_empty() {
        return Err(StoreError::Invalid(
            "a log stream group needs a name".into(),
        ));
    }
    // The consumer spawns its wake-up task on the current tokio runtime.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(StoreError::Invalid(
            "subscribing to the Kafka log stream needs a tokio runtime".into(),
        ));
    }
    let consumer: StreamConsumer<GroupContext> = base
        .clone()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create_with_context(GroupContext::default())
        .map_err(|e| {
            StoreError::Invalid(format!(
                "kafka consumer for group {group}: {}",
                super::without_value(&e)
            ))
        })?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| StoreError::Invalid(format!("kafka topic {topic}, group {group}: {e}")))?;
    Ok(Box::new(KafkaStreamConsumer {
        consumer: Arc::new(consumer),
        topic: topic.to_owned(),
        group: group.to_owned(),
        malformed,
        rebalances: 0,
        partitions: HashMap::new(),
    }))
}

impl KafkaStreamConsumer {
    /// Forgets what it knew of partitions if the group rebalanced since: partitions assigned
    /// again restart from the committed offsets.
    fn note_rebalances(&mut self) {
        let now = self.consumer.context().rebalances.load(Ordering::SeqCst);
        if now != self.rebalances {
            self.rebalances = now;
            self.partitions.clear();
        }
    }

    /// What to commit for each partition, given the highest position handled in each.
    fn plan(&mut self, handled: &BTreeMap<i32, i64>, assigned: &BTreeSet<i32>) -> Vec<(i32, i64)> {
        let candidates: BTreeSet<i32> = handled
            .keys()
            .copied()
            .chain(
                self.partitions
                    .iter()
                    .filter(|(_, p)| p.skipped.is_some())
                    .map(|(&id, _)| id),
            )
            .collect();
        let mut plan = Vec::new();
        for id in candidates {
            if !assigned.contains(&id) {
                tracing::debug!(group = %self.group, partition = id, "Not committing a partition this consumer no longer owns.");
                continue;
            }
            let state = self.partitions.entry(id).or_default();
            let mut target = handled.get(&id).map(|offset| offset + 1);
            if let Some(skipped) = state.skipped {
                // Everything returned on the partition is handled: the malformed messages
                // after it may be committed with it.
                let caught_up = match state.returned {
                    None => true,
                    Some(returned) => target.max(state.committed).is_some_and(|t| t > returned),
                };
                if caught_up {
                    target = Some(target.map_or(skipped + 1, |t| t.max(skipped + 1)));
                }
            }
            match target {
                Some(t) if state.committed.is_none_or(|c| c < t) => plan.push((id, t)),
                _ => {}
            }
        }
        plan
    }
}

impl LogStreamConsumer for KafkaStreamConsumer {
    fn poll(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<(StreamPosition, Shipped)>, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let deadline = Instant::now() + wait;
            while out.len() < max {
                // Wait for the first; after it, take only what librdkafka already holds.
                let received = if out.is_empty() {
                    match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                        Ok(received) => received,
                        Err(_elapsed) => break,
                    }
                } else {
                    match self.consumer.recv().now_or_never() {
                        Some(received) => received,
                        None => break,
                    }
                };
                let (partition, offset, decoded) = match received {
                    Ok(message) => {
                        let decoded: Result<Shipped, String> = match message.payload() {
                            Some(value) => serde_json::from_slice(value).map_err(|e| e.to_string()),
                            None => Err("no value".into()),
                        };
                        (message.partition(), message.offset(), decoded)
                    }
                    Err(e) => {
                        if let Some((code, why)) = self.consumer.client().fatal_error() {
                            return Err(StoreError::Unavailable(format!(
                                "kafka consumer of group {} hit a fatal error ({code:?}: {why}): \
                                 subscribe again",
                                self.group
                            )));
                        }
                        tracing::warn!(group = %self.group, error = %e, "Kafka consumer error; librdkafka recovers by itself.");
                        continue;
                    }
                };
                self.note_rebalances();
                let (Ok(p), Ok(o)) = (u32::try_from(partition), u64::try_from(offset)) else {
                    tracing::warn!(group = %self.group, partition, offset, "Skipped a Kafka message with an impossible position.");
                    continue;
                };
                let state = self.partitions.entry(partition).or_default();
                match decoded {
                    Ok(shipped) => {
                        state.returned = Some(offset);
                        state.skipped = None;
                        out.push((
                            StreamPosition {
                                partition: p,
                                offset: o,
                            },
                            shipped,
                        ));
                    }
                    Err(error) => {
                        state.skipped = Some(offset);
                        self.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            group = %self.group,
                            partition,
                            offset,
                            error = %error,
                            "Skipped a malformed message on the log stream (not a shipped log record)."
                        );
                    }
                }
            }
            Ok(out)
        })
    }

    fn commit<'a>(
        &'a mut self,
        done: &'a [StreamPosition],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut handled: BTreeMap<i32, i64> = BTreeMap::new();
            for position in done {
                let (Ok(partition), Ok(offset)) = (
                    i32::try_from(position.partition),
                    i64::try_from(position.offset),
                ) else {
                    return Err(StoreError::Invalid(format!(
                        "{position:?} is not a Kafka position"
                    )));
                };
                let highest = handled.entry(partition).or_insert(offset);
                *highest = (*highest).max(offset);
            }
            self.note_rebalances();
            let assigned: BTreeSet<i32> = self
                .consumer
                .assignment()
                .map_err(|e| StoreError::Unavailable(format!("kafka assignment: {e}")))?
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            let plan = self.plan(&handled, &assigned);
            if plan.is_empty() {
                return Ok(());
            }
            let mut offsets = TopicPartitionList::new();
            for &(partition, next) in &plan {
                offsets
                    .add_partition_offset(&self.topic, partition, Offset::Offset(next))
                    .map_err(|e| StoreError::Invalid(format!("kafka offset {next}: {e}")))?;
            }
            let consumer = self.consumer.clone();
            let group = self.group.clone();
            crate::dir::blocking(move || {
                consumer.commit(&offsets, CommitMode::Sync).map_err(|e| {
                    StoreError::Unavailable(format!("committing kafka group {group}: {e}"))
                })
            })
            .await?;
            for (partition, next) in plan {
                let state = self.partitions.entry(partition).or_default();
                state.committed = Some(next);
                if state.skipped.is_some_and(|s| s < next) {
                    state.skipped = None;
                }
            }
            Ok(())
        })
    }
}
