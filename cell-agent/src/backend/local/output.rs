//! Turning a step's output pipes into [`RunnerEvent::Line`]s, and stamping events.
//!
//! Secrets are masked here, on the bytes as they come out of the pipe and before they are
//! split into lines ([`flotilla_core::mask`]): a secret split across two writes, or across
//! the cut of an over-long line, is masked whole. Every line a runner reports goes through
//! here (the `local` backend, and `flotilla runner exec` in a pod), so no secret value the
//! job was given leaves the runner.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_core::job::Outcome;
use flotilla_core::mask::Masker;
use flotilla_core::runner::{Assignment, RunnerEvent, RunnerEvents, Stream};
use flotilla_core::{Fence, JobId};
use tokio::io::{AsyncRead, AsyncReadExt};

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
    /// The attempt's secrets, masked in every line.
    masker: Masker,
}

impl Emitter {
    pub(super) fn new(a: &Assignment, sink: Arc<dyn RunnerEvents>) -> Self {
        let masker = a.masker();
        if masker.too_short() > 0 {
            tracing::warn!(job = %a.job, secrets = masker.too_short(), "Secrets shorter than 4 bytes are not masked.");
        }
        Self {
            job: a.job,
            fence: a.fence,
            sink,
            last_ms: AtomicU64::new(0),
            masker,
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

    /// A message from the runner itself (masked too: it may quote what a step printed).
    pub(super) fn system(&self, step: Option<u32>, text: impl Into<String>) {
        let text = text.into();
        let text = if self.masker.is_empty() {
            text
        } else {
            String::from_utf8_lossy(&self.masker.mask(text.as_bytes())).into_owned()
        };
        self.line(Stream::System, step, text);
    }

    /// A line already masked.
    fn line(&self, stream: Stream, step: Option<u32>, text: String) {
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
/// replaced, lines longer than [`MAX_LINE_BYTES`] split), with the attempt's secrets
/// masked. A read error ends the stream with a system line rather than failing the step:
/// the step's exit code is what decides.
pub(super) async fn read_lines<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: Stream,
    step: u32,
    emitter: &Emitter,
) {
    let mut mask = emitter.masker.stream();
    let mut lines = Lines::default();
    let mut buf = vec![0u8; MAX_LINE_BYTES];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                emitter.system(Some(step), format!("reading the step's output failed: {e}"));
                break;
            }
        };
        let safe = mask.push(&buf[..n]);
        lines.feed(&safe, |line| emit(emitter, stream, step, line));
    }
    let rest = mask.finish();
    lines.feed(&rest, |line| emit(emitter, stream, step, line));
    lines.finish(|line| emit(emitter, stream, step, line));
}

/// Splits bytes into lines of at most [`MAX_LINE_BYTES`], whatever the pieces they come in.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, mut bytes: &[u8], mut out: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let room = MAX_LINE_BYTES - self.partial.len();
            let window = &bytes[..bytes.len().min(room)];
            if let Some(end) = window.iter().position(|b| *b == b'\n') {
                self.partial.extend_from_slice(&window[..end]);
                out(&self.partial);
                self.partial.clear();
                bytes = &bytes[end + 1..];
            } else {
                self.partial.extend_from_slice(window);
                bytes = &bytes[window.len()..];
                if self.partial.len() >= MAX_LINE_BYTES {
                    // Split where no UTF-8 character is cut in two, so the pieces read back
                    // as the original text; the incomplete tail starts the next piece.
                    let cut = utf8_safe_cut(&self.partial);
                    out(&self.partial[..cut]);
                    self.partial.drain(..cut);
                }
            }
        }
    }

    fn finish(&mut self, mut out: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            out(&self.partial);
            self.partial.clear();
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
