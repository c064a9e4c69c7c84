//! The log aggregator (ARCHITECTURE §8 Logs): consumes the log stream (Kafka, or a file in
//! `flotilla dev`), writes each attempt's lines to the log store in chunks, writes the
//! manifest when the attempt ends, and commits stream positions only once what they carried
//! is stored. The decisions are `flotilla_core::aggregate`'s; this task does the I/O.
//!
//! Killing it at any point and starting it again loses and duplicates nothing: records after
//! the last commit are delivered again and written again in place (chunks are named by their
//! first line; readers drop repeated lines).

use std::sync::Arc;
use std::time::Duration;

use flotilla_core::aggregate::{Action, AggregateConfig, Aggregator};
use flotilla_core::ids::{Fence, JobId};
use flotilla_core::store::{
    AttemptKey, LOG_FORMAT_VERSION, LogManifest, LogStore, LogStream, LogStreamConsumer,
    StoreError, plain_text_line,
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Says whether an attempt of `job` under `fence` was superseded (its lines are dropped).
pub type StaleCheck = Arc<dyn Fn(JobId, Fence) -> bool + Send + Sync>;

/// How the aggregator consumes and writes.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// The consumer group (one per cell: every cell archives its own attempts' logs).
    pub group: String,
    /// Most records taken per poll.
    pub poll_max: usize,
    /// Longest wait for a record before looking at the clock again.
    pub poll_wait: Duration,
    /// When chunks are written.
    pub chunking: AggregateConfig,
    /// Pause after a failed store or stream call.
    pub retry_after: Duration,
}

impl AggregatorConfig {
    /// Defaults (1 MiB or 5 s chunks) for consumer group `group`.
    pub fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            poll_max: 1_000,
            poll_wait: Duration::from_millis(200),
            chunking: AggregateConfig::default(),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// The running aggregator.
#[derive(Debug)]
pub struct LogAggregator {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl LogAggregator {
    /// Joins the stream's consumer group and starts archiving. Must be called inside a Tokio
    /// runtime.
    pub fn start(
        stream: &dyn LogStream,
        store: Arc<dyn LogStore>,
        stale: StaleCheck,
        cfg: AggregatorConfig,
    ) -> Result<Self, StoreError> {
        let consumer = stream.subscribe(&cfg.group)?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(consumer, store, stale, cfg, stop_rx));
        Ok(Self { stop, task })
    }

    /// Stops after the current step (what is not committed is delivered again to the next).
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }

    /// Stops at once, as a crash would (for tests of what a crash loses: nothing).
    pub fn kill(self) {
        self.task.abort();
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "chunk ages are wall-clock times compared with the lines' own stamps"
)]
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn run(
    mut consumer: Box<dyn LogStreamConsumer>,
    store: Arc<dyn LogStore>,
    stale: StaleCheck,
    cfg: AggregatorConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut agg = Aggregator::new(cfg.chunking);
    loop {
        if *stop.borrow() {
            return;
        }
        let polled = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            polled = consumer.poll(cfg.poll_max, cfg.poll_wait) => polled,
        };
        let now = now_ms();
        let mut actions = Vec::new();
        match polled {
            Ok(records) => {
                for (pos, record) in records {
                    let old = stale(record.key().job, record.fence());
                    actions.extend(agg.offer(pos, record, old, now));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Reading the log stream failed; trying again.");
                tokio::time::sleep(cfg.retry_after).await;
            }
        }
        actions.extend(agg.tick(now));
        actions.extend(agg.retry_finishes(now));
        let mut failed = false;
        while let Some(action) = actions.pop() {
            let (id, result) = match &action {
                Action::PutChunk { id, key, chunk } => {
                    (*id, store.put_chunk(key, chunk).await.map(|_| ()))
                }
                Action::Finish {
                    id,
                    key,
                    fence,
                    last_seq,
                } => (*id, finish(store.as_ref(), key, *fence, *last_seq).await),
            };
            match result {
                Ok(()) => actions.extend(agg.written(id, now_ms())),
                Err(e) => {
                    tracing::warn!(error = %e, kind = e.kind(), "Archiving a job log failed; trying again.");
                    agg.failed(id);
                    failed = true;
                }
            }
        }
        let done = agg.committable();
        if !done.is_empty() {
            match consumer.commit(&done).await {
                Ok(()) => agg.committed(&done),
                Err(e) => {
                    tracing::warn!(error = %e, "Committing log stream positions failed; trying again.");
                    failed = true;
                }
            }
        }
        if failed {
            tokio::time::sleep(cfg.retry_after).await;
        }
    }
}

/// Reads the stored log back and writes its manifest: the line count, the SHA-256 of the
/// plain text, and the last line, all as stored (a line missing is an error, not a manifest).
async fn finish(
    store: &dyn LogStore,
    key: &AttemptKey,
    fence: Fence,
    last_seq: Option<u64>,
) -> Result<(), StoreError> {
    let mut sha = Sha256::new();
    let mut lines = 0u64;
    let mut after: Option<u64> = None;
    if last_seq.is_some() {
        loop {
            let read = store.read(key, after, 10_000).await?;
            let Some(last) = read.lines.last().map(|l| l.seq) else {
                return Err(StoreError::Unavailable(format!(
                    "the log of job {} attempt {} is not all stored yet (after line {after:?})",
                    key.job, key.attempt
                )));
            };
            for line in &read.lines {
                sha.update(plain_text_line(line).as_bytes());
            }
            lines += read.lines.len() as u64;
            after = Some(last);
            if Some(last) >= last_seq {
                break;
            }
        }
    }
    let manifest = LogManifest {
        v: LOG_FORMAT_VERSION,
        fence,
        lines,
        last_seq,
        sha256: hex::encode(sha.finalize()),
        chunks: Vec::new(),
    };
    store.finish(key, &manifest).await
}
