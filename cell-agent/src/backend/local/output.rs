//! Turning a step's output pipes into [`RunnerEvent::Line`]s, and stamping events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_core::job::Outcome;
use flotilla_core::runner::{RunnerEvent, RunnerEvents, Stream};
use flotilla_core::{Fence, JobId};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Longest line delivered as one event; longer lines are split into several. Bounds the
/// memory one runaway `cat /dev/urandom` can take and keeps log chunks a sane size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Wall-clock milliseconds since the Unix epoch, for event stamps.
#[allow(
    clippy::disallowed_methods,
    reason = "event stamps are wall-clock times shown to users; nothing here decides by them"
)]
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Sends one attempt's events, stamped with a clock that never goes backwards within the
/// attempt (the wall clock can, when NTP steps it; consumers sort log lines by stamp).
pub(super) struct Emitter {
    job: JobId,
    fence: Fence,
    sink: Arc<dyn RunnerEvents>,
    last_ms: AtomicU64,
}

impl Emitter {
    pub(super) fn new(job: JobId, fence: Fence, sink: Arc<dyn RunnerEvents>) -> Self {
        Self {
            job,
            fence,
            sink,
            last_ms: AtomicU64::new(0),
        }
    }

    /// Now, but never earlier than the previous stamp.
    pub(super) fn stamp(&self) -> u64 {
        let now = now_ms();
        self.last_ms.fetch_max(now, Ordering::Relaxed).max(now)
    }

    fn send(&self, event: RunnerEvent) {
        self.sink.event(self.job, self.fence, event);
    }

    /// A message from the runner itself.
    pub(super) fn system(&self, step: Option<u32>, text: impl Into<String>) {
        self.line(Stream::System, step, text.into());
    }

    pub(super) fn line(&self, stream: Stream, step: Option<u32>, text: String) {
        let at_ms = self.stamp();
        self.send(RunnerEvent::Line {
            stream,
            step,
            text,
            at_ms,
        });
    }

    pub(super) fn started(&self) -> u64 {
        let at_ms = self.stamp();
        self.send(RunnerEvent::Started { at_ms });
        at_ms
    }

    pub(super) fn finished(&self, outcome: Outcome) {
        let at_ms = self.stamp();
        self.send(RunnerEvent::Finished { outcome, at_ms });
    }
}

/// Reads `pipe` to its end, emitting one event per line (terminator removed, invalid UTF-8
/// replaced, lines longer than [`MAX_LINE_BYTES`] split). A read error ends the stream with a
/// system line rather than failing the step: the step's exit code is what decides.
pub(super) async fn read_lines<R: AsyncRead + Unpin>(
    pipe: R,
    stream: Stream,
    step: u32,
    emitter: &Emitter,
) {
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, pipe);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                emitter.system(Some(step), format!("reading the step's output failed: {e}"));
                break;
            }
        };
        if buf.is_empty() {
            if !line.is_empty() {
                emit(emitter, stream, step, &line);
            }
            break;
        }
        let room = MAX_LINE_BYTES - line.len();
        let window = &buf[..buf.len().min(room)];
        if let Some(end) = window.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&window[..end]);
            reader.consume(end + 1);
            emit(emitter, stream, step, &line);
            line.clear();
        } else {
            let taken = window.len();
            line.extend_from_slice(window);
            reader.consume(taken);
            if line.len() >= MAX_LINE_BYTES {
                // Split where no UTF-8 character is cut in two, so the pieces read back as
                // the original text; the incomplete tail starts the next piece.
                let cut = utf8_safe_cut(&line);
                emit(emitter, stream, step, &line[..cut]);
                line.drain(..cut);
            }
        }
    }
}

fn emit(emitter: &Emitter, stream: Stream, step: u32, raw: &[u8]) {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    emitter.line(
        stream,
        Some(step),
        String::from_utf8_lossy(raw).into_owned(),
    );
}

/// The length of the longest prefix of `buf` that does not end inside a multi-byte UTF-8
/// sequence (invalid bytes count as complete: they are replaced either way).
fn utf8_safe_cut(buf: &[u8]) -> usize {
    let n = buf.len();
    for back in 1..=n.min(3) {
        let byte = buf[n - back];
        if byte & 0xC0 != 0x80 {
            // The last non-continuation byte: a lead byte says how long its sequence is.
            let needed = match byte {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => 1,
            };
            return if needed > back { n - back } else { n };
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_never_splits_a_character() {
        let text = "aé€😀";
        let bytes = text.as_bytes();
        for len in 1..=bytes.len() {
            let cut = utf8_safe_cut(&bytes[..len]);
            assert!(text.is_char_boundary(cut), "len {len} cut {cut}");
            assert!(len - cut < 4);
        }
        // Invalid bytes are not held back.
        assert_eq!(utf8_safe_cut(b"ab\xff"), 3);
    }
}
