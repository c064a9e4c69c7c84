//! The log aggregator's bookkeeping (ARCHITECTURE §8 Logs): what to write to the
//! [`LogStore`](crate::store::LogStore), and which stream positions may be committed, as
//! [`Shipped`] records come off the [`LogStream`](crate::store::LogStream). Pure: the cell
//! agent's aggregator task does the I/O and reports back.
//!
//! The rules that make a restart lose and duplicate nothing:
//! - Lines are buffered per attempt and written as a chunk once the buffer holds
//!   [`AggregateConfig::max_chunk_bytes`] or its oldest line is
//!   [`AggregateConfig::max_chunk_age_ms`] old, and at the attempt's `End`.
//! - A stream position is committed only once every record at or before it (in its
//!   partition) is stored for good: in a chunk the store acknowledged, in a manifest, or
//!   dropped on purpose (a stale fence, a line already stored). A crash before that
//!   redelivers the records, which are buffered and written again: a chunk is named by its
//!   first line, so the same chunk replaces itself, and readers drop repeated lines.
//! - `End` is acted on once every line of the attempt this incarnation received is stored.
//!   The lines it did not receive came before the stream position it started from, so they
//!   were stored before (a position is committed only then), and per-job order puts every
//!   line before its `End`. The driver then reads the log back from the store to write the
//!   manifest (line count, SHA-256), so the manifest describes what is stored, whoever wrote
//!   it, and a log missing a line is found there, not papered over.
//! - Lines under a stale fence (the attempt was superseded: the driver asks the agent) are
//!   dropped and counted, as are lines of an attempt whose `End` was already handled.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crate::ids::Fence;
use crate::store::{AttemptKey, LogChunk, LogLine, Shipped, StreamPosition};

/// How many finished attempts are remembered, to drop their late lines.
const FINISHED_MEMORY: usize = 65_536;

/// When buffered lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateConfig {
    /// A chunk is written once an attempt's buffer holds this many bytes of text (1 MiB).
    pub max_chunk_bytes: usize,
    /// … or once its oldest line has waited this long (5 s).
    pub max_chunk_age_ms: u64,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            max_chunk_bytes: 1 << 20,
            max_chunk_age_ms: 5_000,
        }
    }
}

/// Names a write the driver was asked to do, to report how it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Store this chunk, then report [`Aggregator::written`] (or [`Aggregator::failed`]).
    PutChunk {
        /// Which write.
        id: WriteId,
        /// The attempt.
        key: AttemptKey,
        /// Its lines.
        chunk: LogChunk,
    },
    /// Every line of the attempt is stored: read the log back, write its manifest (lines,
    /// SHA-256, chunks), then report [`Aggregator::written`].
    Finish {
        /// Which write.
        id: WriteId,
        /// The attempt.
        key: AttemptKey,
        /// Its fence.
        fence: Fence,
        /// Its last line (`None`: it printed nothing).
        last_seq: Option<u64>,
    },
}

/// What was dropped, and why (exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregateStats {
    /// Lines and ends under a stale fence.
    pub stale: u64,
    /// Lines delivered again after they were stored (a redelivery after a restart, or a
    /// runner that sent a line twice).
    pub repeated: u64,
    /// Records of an attempt whose log was already finished.
    pub late: u64,
}

#[derive(Debug, Default)]
struct Buffer {
    fence: Option<Fence>,
    lines: BTreeMap<u64, LogLine>,
    bytes: usize,
    oldest_ms: Option<u64>,
    /// Stream positions whose records are in `lines` (or are this attempt's `End`).
    positions: Vec<StreamPosition>,
    /// Every line at or below this is stored (`None`: nothing known yet).
    stored_through: Option<u64>,
    /// Lines stored out of order, above `stored_through` + 1.
    stored_above: BTreeSet<u64>,
    /// The `End` seen: its last line, and its position.
    end: Option<(Option<u64>, StreamPosition)>,
    finishing: bool,
    /// Chunk writes in flight.
    writing: usize,
    /// Lines in chunk writes in flight.
    in_flight: BTreeSet<u64>,
}

impl Buffer {
    fn is_stored(&self, seq: u64) -> bool {
        self.stored_through.is_some_and(|t| seq <= t) || self.stored_above.contains(&seq)
    }

    fn mark_stored(&mut self, seq: u64) {
        self.stored_above.insert(seq);
        loop {
            let next = self.stored_through.map_or(0, |t| t + 1);
            if !self.stored_above.remove(&next) {
                break;
            }
            self.stored_through = Some(next);
        }
    }

    /// Whether every line received is stored.
    fn complete(&self) -> bool {
        self.lines.is_empty() && self.writing == 0
    }
}

/// An in-flight write: which attempt, which lines, which positions it makes durable.
#[derive(Debug)]
struct InFlight {
    key: AttemptKey,
    seqs: Vec<u64>,
    positions: Vec<StreamPosition>,
    lines: Vec<LogLine>,
    finish: bool,
}

/// The aggregator's state. See the module documentation.
#[derive(Debug, Default)]
pub struct Aggregator {
    cfg: AggregateConfig,
    attempts: HashMap<AttemptKey, Buffer>,
    /// Attempts finished in this incarnation, the last [`FINISHED_MEMORY`] (a late line for
    /// one is dropped).
    finished: HashSet<AttemptKey>,
    finished_order: VecDeque<AttemptKey>,
    in_flight: BTreeMap<WriteId, InFlight>,
    next_id: u64,
    /// Positions whose records are not yet stored for good, per partition.
    pending: BTreeMap<u32, BTreeSet<u64>>,
    /// Offsets received and not yet committed, per partition (offsets are opaque: a commit
    /// must name one that was received).
    received: BTreeMap<u32, BTreeSet<u64>>,
    /// The last offset committed, per partition.
    committed: BTreeMap<u32, u64>,
    stats: AggregateStats,
}

impl Aggregator {
    /// An aggregator writing chunks as `cfg` says.
    pub fn new(cfg: AggregateConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// What was dropped so far.
    pub fn stats(&self) -> AggregateStats {
        self.stats
    }

    /// Attempts with lines or an end not yet stored.
    pub fn open_attempts(&self) -> usize {
        self.attempts.len()
    }

    /// Takes in one record. `stale` says the attempt was superseded (its fence is not the
    /// job's current one): its records are dropped. Returns what to write now.
    pub fn offer(
        &mut self,
        pos: StreamPosition,
        record: Shipped,
        stale: bool,
        now_ms: u64,
    ) -> Vec<Action> {
        self.received
            .entry(pos.partition)
            .or_default()
            .insert(pos.offset);
        let key = record.key().clone();
        if stale {
            self.stats.stale += 1;
            return self.after_change(&key, now_ms);
        }
        if self.finished.contains(&key) {
            self.stats.late += 1;
            return Vec::new();
        }
        let buffer = self.attempts.entry(key.clone()).or_default();
        let fence = record.fence();
        match buffer.fence {
            Some(f) if f > fence => {
                self.stats.stale += 1;
                return Vec::new();
            }
            _ => buffer.fence = Some(fence),
        }
        match record {
            Shipped::Line { line, .. } => {
                // A line already stored, buffered or being written is a repeat (a publish
                // retried, a redelivery): taking it again could write a chunk of the same
                // name with fewer lines over one in flight.
                if buffer.is_stored(line.seq)
                    || buffer.lines.contains_key(&line.seq)
                    || buffer.in_flight.contains(&line.seq)
                {
                    self.stats.repeated += 1;
                    return Vec::new();
                }
                buffer.bytes += line.text.len() + 32;
                buffer.oldest_ms.get_or_insert(now_ms);
                buffer.lines.insert(line.seq, line);
                buffer.positions.push(pos);
                self.pending
                    .entry(pos.partition)
                    .or_default()
                    .insert(pos.offset);
            }
            Shipped::End { last_seq, .. } => {
                if buffer.end.is_none() {
                    buffer.end = Some((last_seq, pos));
                    self.pending
                        .entry(pos.partition)
                        .or_default()
                        .insert(pos.offset);
                } else {
                    self.stats.repeated += 1;
                }
            }
        }
        self.after_change(&key, now_ms)
    }

    /// Writes due by age.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let due: Vec<AttemptKey> = self
            .attempts
            .iter()
            .filter(|(_, b)| {
                b.oldest_ms
                    .is_some_and(|t| now_ms.saturating_sub(t) >= self.cfg.max_chunk_age_ms)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut actions = Vec::new();
        for key in due {
            actions.extend(self.flush(&key));
        }
        actions
    }

    /// The write `id` is stored for good.
    pub fn written(&mut self, id: WriteId, now_ms: u64) -> Vec<Action> {
        let Some(w) = self.in_flight.remove(&id) else {
            return Vec::new();
        };
        self.release(&w.positions);
        if w.finish {
            self.attempts.remove(&w.key);
            if self.finished.insert(w.key.clone()) {
                self.finished_order.push_back(w.key);
                if self.finished_order.len() > FINISHED_MEMORY
                    && let Some(old) = self.finished_order.pop_front()
                {
                    self.finished.remove(&old);
                }
            }
            return Vec::new();
        }
        if let Some(buffer) = self.attempts.get_mut(&w.key) {
            buffer.writing = buffer.writing.saturating_sub(1);
            for seq in w.seqs {
                buffer.in_flight.remove(&seq);
                buffer.mark_stored(seq);
            }
        }
        self.after_change(&w.key, now_ms)
    }

    /// The write `id` failed: its lines go back into the buffer, to be written again with
    /// the next flush (the driver retries with back-off by ticking later).
    pub fn failed(&mut self, id: WriteId) {
        let Some(w) = self.in_flight.remove(&id) else {
            return;
        };
        let Some(buffer) = self.attempts.get_mut(&w.key) else {
            return;
        };
        if w.finish {
            buffer.finishing = false;
            return;
        }
        buffer.writing = buffer.writing.saturating_sub(1);
        for seq in &w.seqs {
            buffer.in_flight.remove(seq);
        }
        for line in w.lines {
            buffer.bytes += line.text.len() + 32;
            buffer.lines.insert(line.seq, line);
        }
        buffer.positions.extend(w.positions);
        buffer.oldest_ms.get_or_insert(0);
    }

    /// A failed finish is tried again at the next change or [`Aggregator::retry_finishes`].
    pub fn retry_finishes(&mut self, now_ms: u64) -> Vec<Action> {
        let keys: Vec<AttemptKey> = self
            .attempts
            .iter()
            .filter(|(_, b)| b.end.is_some() && !b.finishing)
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter()
            .flat_map(|k| self.after_change(k, now_ms))
            .collect()
    }

    /// Per partition, the last position that may be committed now (every record at or
    /// before it is stored for good), where that is past what was committed before.
    pub fn committable(&self) -> Vec<StreamPosition> {
        let mut out = Vec::new();
        for (&partition, received) in &self.received {
            let first_pending = self
                .pending
                .get(&partition)
                .and_then(|p| p.iter().next().copied());
            // The last offset received below the first still pending (every record up to it
            // is stored or dropped), or the last received when nothing is pending.
            let upto = match first_pending {
                Some(p) => received.range(..p).next_back().copied(),
                None => received.iter().next_back().copied(),
            };
            let Some(upto) = upto else { continue };
            if self.committed.get(&partition).is_none_or(|c| upto > *c) {
                out.push(StreamPosition {
                    partition,
                    offset: upto,
                });
            }
        }
        out
    }

    /// The driver committed `positions`.
    pub fn committed(&mut self, positions: &[StreamPosition]) {
        for p in positions {
            let c = self.committed.entry(p.partition).or_insert(p.offset);
            *c = (*c).max(p.offset);
            if let Some(received) = self.received.get_mut(&p.partition) {
                // Only what may still be named by a later commit is kept.
                let keep = received.split_off(&(*c + 1));
                *received = keep;
            }
        }
    }

    fn release(&mut self, positions: &[StreamPosition]) {
        for p in positions {
            if let Some(set) = self.pending.get_mut(&p.partition) {
                set.remove(&p.offset);
            }
        }
    }

    /// After a change to `key`'s buffer: a chunk when it is full, the finish when complete.
    fn after_change(&mut self, key: &AttemptKey, now_ms: u64) -> Vec<Action> {
        let _ = now_ms;
        let Some(buffer) = self.attempts.get(key) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        if buffer.bytes >= self.cfg.max_chunk_bytes || buffer.end.is_some() {
            actions.extend(self.flush(key));
        }
        let Some(buffer) = self.attempts.get_mut(key) else {
            return actions;
        };
        if let Some((last_seq, pos)) = buffer.end
            && !buffer.finishing
            && buffer.complete()
        {
            buffer.finishing = true;
            let fence = buffer.fence.unwrap_or(Fence(0));
            let id = self.id();
            self.in_flight.insert(
                id,
                InFlight {
                    key: key.clone(),
                    seqs: Vec::new(),
                    positions: vec![pos],
                    lines: Vec::new(),
                    finish: true,
                },
            );
            actions.push(Action::Finish {
                id,
                key: key.clone(),
                fence,
                last_seq,
            });
        }
        actions
    }

    /// Writes `key`'s buffered lines as one chunk (lines not already in flight).
    fn flush(&mut self, key: &AttemptKey) -> Option<Action> {
        let buffer = self.attempts.get_mut(key)?;
        if buffer.lines.is_empty() {
            buffer.oldest_ms = None;
            return None;
        }
        let lines: Vec<LogLine> = std::mem::take(&mut buffer.lines).into_values().collect();
        let positions = std::mem::take(&mut buffer.positions);
        buffer.bytes = 0;
        buffer.oldest_ms = None;
        buffer.writing += 1;
        buffer.in_flight.extend(lines.iter().map(|l| l.seq));
        let id = self.id();
        self.in_flight.insert(
            id,
            InFlight {
                key: key.clone(),
                seqs: lines.iter().map(|l| l.seq).collect(),
                positions,
                lines: lines.clone(),
                finish: false,
            },
        );
        Some(Action::PutChunk {
            id,
            key: key.clone(),
            chunk: LogChunk { lines },
        })
    }

    fn id(&mut self) -> WriteId {
        self.next_id += 1;
        WriteId(self.next_id)
    }
}

#[cfg(test)]
mod tests;
