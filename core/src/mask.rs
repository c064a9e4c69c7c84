//! Secret masking for job logs: the runner wrapper reads a job's stdout and stderr as byte
//! chunks cut at arbitrary write boundaries, and no secret the job was given may reach a log.
//!
//! A [`Masker`] is built once per job from the raw secret values. For each value `v` (see
//! [`MIN_SECRET_LEN`] for which values count) it masks these *forms*:
//!
//! - `v` itself, and `v` with surrounding whitespace trimmed (a value pasted with a trailing
//!   newline is usually printed without it) — every form below is made for both;
//! - each line of a multi-line `v` (a PEM key, a JSON key file), whitespace-trimmed, on its
//!   own: a job printing the value line by line, or a wrapper splitting at newlines, would
//!   otherwise show it whole;
//! - base64, standard and URL-safe alphabets, padded and unpadded; and `v` inside a larger
//!   base64'd string (`base64(prefix + v + suffix)`, as in `base64(user:password)`) at each
//!   of the three byte alignments: the characters that depend only on `v`, leaving out the
//!   first and last ones that also carry bits of the neighbouring bytes (GitHub Actions'
//!   masker does the same). Also the 76- and 64-column lines of its standard base64, as
//!   `base64` and `openssl base64` wrap it;
//! - percent-encoding with only what needs it encoded (RFC 3986 unreserved characters left
//!   alone): upper- and lower-case hex, with a space as `%20` or `+`, and the common
//!   variants that leave a few more characters alone (JavaScript's `encodeURIComponent`,
//!   Python's `quote`, HTML forms). A fully percent-encoded form is not covered: no encoder
//!   writes one unasked;
//! - JSON string escaping (without the quotes): as `serde_json` and `JSON.stringify` write
//!   it, with `/` as `\/`, with non-ASCII as `\uXXXX` (Python's `json.dumps`, PHP's
//!   `json_encode`), and with `<`, `>`, `&` as `\u003c`… (Go's `encoding/json`).
//!
//! Every occurrence of every form is replaced by [`MASK`] (`***`). Occurrences that overlap
//! (two secrets sharing text, or two forms of one) are masked as one: the union of all
//! occurrences is replaced, so no byte of any occurrence survives. One pass is made:
//! masking does not look again at its own output. A form can therefore appear in the output
//! only if it contains `*` and is assembled from a `***` and the text around it (the job
//! printing `x`, another secret, `y`, when `x***y` is a secret): that shows nothing the job
//! printed unmasked, and a fixed point cannot be streamed in bounded memory (`x…x S y…y`
//! would need the whole run of `x`s held back).
//!
//! [`MaskStream`] masks one output stream chunk by chunk, with the same result as masking
//! the whole output at once, however it is chunked. It holds back only the trailing bytes
//! that could still begin a form (at most [`Masker::holdback`]), so a job that prints a
//! prompt and waits is seen at once unless the prompt ends like the start of a secret.
//!
//! Cost: one Aho–Corasick pass over each chunk (plus the held-back tail), and one table
//! look-up (of its first two bytes) for each of the last [`Masker::holdback`] positions;
//! the output is built in one `Vec` per call, with no per-byte allocation. A job given a few
//! dozen secrets makes a few hundred patterns; a release build masks several hundred MiB/s
//! per core with them (4 KiB–64 KiB chunks of build-log text, including a 2 KiB PEM key).

use std::fmt;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};

/// What every masked occurrence is replaced by.
pub const MASK: &[u8] = b"***";

/// The shortest value that is masked, counted after trimming surrounding whitespace; shorter
/// values are ignored (and counted by [`Masker::too_short`], so the wrapper can warn).
///
/// GitHub Actions masks any non-empty value; GitLab refuses to mask variables shorter than
/// 8. A value of 1–3 bytes (`1`, `yes`, `on`) is no secret — it is guessed at once — and
/// masking it would shred the log (every `1` a `***`) while showing where it occurs anyway.
/// At 4 bytes the derived forms are still at least 4 characters (the shortest is the
/// base64 of a 4-byte value at byte offset 1), so they do not match ordinary text by
/// chance, and a real 4-byte credential (a PIN) is still hidden.
pub const MIN_SECRET_LEN: usize = 4;

/// The 76-column lines of MIME / GNU `base64` and the 64-column lines of PEM /
/// `openssl base64`.
const BASE64_LINE_WIDTHS: [usize; 2] = [76, 64];

/// The forms of a set of secret values to hide, built once per job.
///
/// Cheap to clone (the patterns are shared), so each output stream's [`MaskStream`] can own
/// one and move into its own task. `Debug` shows counts only, never a secret.
#[derive(Clone, Default)]
pub struct Masker {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// All forms, in one automaton; `None` when there are none.
    matcher: Option<AhoCorasick>,
    /// The same forms, sorted and without duplicates: what a held-back tail could begin.
    patterns: Vec<Vec<u8>>,
    /// Whether some form starts with this byte.
    first_bytes: Vec<bool>,
    /// Whether some form starts with these two bytes (bit `256·first + second`): most
    /// positions of a tail are ruled out by one look-up.
    first_pairs: Vec<u64>,
    /// The longest form's length minus one.
    holdback: usize,
    /// Values masked.
    secrets: usize,
    /// Non-empty values ignored for being shorter than [`MIN_SECRET_LEN`].
    too_short: usize,
}

impl Masker {
    /// The masker of `secrets`, the raw values a job is given.
    ///
    /// Empty values are ignored; so are values shorter than [`MIN_SECRET_LEN`] once
    /// surrounding whitespace is trimmed ([`Masker::too_short`] counts those). Values need
    /// not be UTF-8; the JSON forms that decode characters are made only for those that are.
    ///
    /// # Panics
    ///
    /// Only if the forms exceed the Aho–Corasick automaton's limits (2³¹ states), gigabytes
    /// of secrets, far beyond what a process environment can hold.
    pub fn new<I, S>(secrets: I) -> Masker
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut patterns = Vec::new();
        let (mut count, mut too_short) = (0, 0);
        for secret in secrets {
            let value = secret.as_ref();
            if value.is_empty() {
                continue;
            }
            let trimmed = value.trim_ascii();
            if trimmed.len() < MIN_SECRET_LEN {
                too_short += 1;
                continue;
            }
            count += 1;
            forms(value, &mut patterns);
            if trimmed != value {
                forms(trimmed, &mut patterns);
            }
            if value.contains(&b'\n') {
                patterns.extend(
                    value
                        .split(|&b| b == b'\n')
                        .map(<[u8]>::trim_ascii)
                        .map(<[u8]>::to_vec),
                );
            }
        }
        patterns.retain(|p| p.len() >= MIN_SECRET_LEN);
        patterns.sort_unstable();
        patterns.dedup();
        let matcher = (!patterns.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(&patterns)
                .expect("the forms of a process's secrets are within the automaton's limits")
        });
        let mut first_bytes = vec![false; 256];
        let mut first_pairs = vec![0; 1024];
        for p in &patterns {
            first_bytes[usize::from(p[0])] = true;
            let pair = pair_index(p[0], p[1]);
            first_pairs[pair / 64] |= 1 << (pair % 64);
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        Masker {
            inner: Arc::new(Inner {
                matcher,
                holdback: longest.saturating_sub(1),
                patterns,
                first_bytes,
                first_pairs,
                secrets: count,
                too_short,
            }),
        }
    }

    /// Whether there is nothing to mask: masking is then the identity.
    pub fn is_empty(&self) -> bool {
        self.inner.matcher.is_none()
    }

    /// How many values are masked.
    pub fn secrets(&self) -> usize {
        self.inner.secrets
    }

    /// How many non-empty values were ignored for being shorter than [`MIN_SECRET_LEN`].
    pub fn too_short(&self) -> usize {
        self.inner.too_short
    }

    /// The longest form's length minus one: the most trailing bytes a [`MaskStream`] holds
    /// back between chunks.
    pub fn holdback(&self) -> usize {
        self.inner.holdback
    }

    /// `input` with every occurrence of every form replaced by [`MASK`] (overlapping
    /// occurrences as one). For a whole line, a whole message, a whole file.
    pub fn mask(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        self.inner
            .resolve(input, None, true, &mut Vec::new(), &mut out);
        out
    }

    /// A streaming masker for one output stream (stdout, stderr), owning a clone of this.
    pub fn stream(&self) -> MaskStream {
        MaskStream {
            masker: self.clone(),
            pending: Vec::new(),
            open: None,
            spans: Vec::new(),
        }
    }
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("secrets", &self.inner.secrets)
            .field("too_short", &self.inner.too_short)
            .field("forms", &self.inner.patterns.len())
            .finish()
    }
}

/// Masks one output stream chunk by chunk.
///
/// The outputs of all [`push`](MaskStream::push)es and the final
/// [`finish`](MaskStream::finish), concatenated, are exactly [`Masker::mask`] of the whole
/// input, however it was cut into chunks. Memory stays bounded: at most
/// [`Masker::holdback`] bytes are kept between calls.
#[derive(Clone)]
pub struct MaskStream {
    masker: Masker,
    /// Input not yet settled: the trailing bytes that could begin a form. Every occurrence
    /// starting before it has been seen.
    pending: Vec<u8>,
    /// When the last output was a `***` whose occurrence reaches into `pending`: where (in
    /// `pending`) that occurrence ends, as a later one overlapping it extends the same mask.
    open: Option<usize>,
    /// Scratch space for the occurrences of one call.
    spans: Vec<(usize, usize)>,
}

impl MaskStream {
    /// Feeds `chunk`; returns the (masked) output that is now settled. Trailing bytes that
    /// could be the start of a form split across chunks are held back until the next chunk
    /// or [`finish`](MaskStream::finish).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let inner = &*self.masker.inner;
        let mut out = Vec::with_capacity(chunk.len() + self.pending.len());
        if self.pending.is_empty() && self.open.is_none() {
            // Nothing held: scan the chunk where it is, and copy only its unsettled tail.
            let (settled, open) = inner.resolve(chunk, None, false, &mut self.spans, &mut out);
            self.pending.extend_from_slice(&chunk[settled..]);
            self.open = open.map(|end| end - settled);
        } else {
            self.pending.extend_from_slice(chunk);
            let (settled, open) =
                inner.resolve(&self.pending, self.open, false, &mut self.spans, &mut out);
            self.pending.drain(..settled);
            self.open = open.map(|end| end - settled);
        }
        out
    }

    /// End of stream: returns the rest, masked. The stream is then empty and can be reused.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pending.len());
        self.masker
            .inner
            .resolve(&self.pending, self.open, true, &mut self.spans, &mut out);
        self.pending.clear();
        self.open = None;
        out
    }

    /// How many input bytes are held back, waiting for the next chunk.
    pub fn held(&self) -> usize {
        self.pending.len()
    }
}

impl fmt::Debug for MaskStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the held bytes: they may be the start of a secret.
        f.debug_struct("MaskStream")
            .field("masker", &self.masker)
            .field("held", &self.pending.len())
            .finish()
    }
}

impl Inner {
    /// Masks what of `text` is settled into `out`, and returns where the unsettled tail
    /// begins and, if the last mask written may still be extended, where its occurrences
    /// end (both offsets in `text`). With `at_end`, all of `text` is settled.
    ///
    /// `open`, when given, is a mask already written whose occurrences reach `text[..open]`.
    ///
    /// An occurrence that ends past `text` starts at a position whose suffix is a proper
    /// prefix of some form; the first such position bounds what is settled. Everything
    /// before it is final: no later occurrence can start there, and a masked run ending
    /// before it cannot be extended.
    fn resolve(
        &self,
        text: &[u8],
        open: Option<usize>,
        at_end: bool,
        spans: &mut Vec<(usize, usize)>,
        out: &mut Vec<u8>,
    ) -> (usize, Option<usize>) {
        let Some(matcher) = &self.matcher else {
            out.extend_from_slice(text);
            return (text.len(), None);
        };
        // The union of all occurrences, as disjoint runs sorted by start. Occurrences come
        // in order of their end, so only the last runs can overlap a new one.
        spans.clear();
        spans.extend(open.map(|end| (0, end)));
        for m in matcher.find_overlapping_iter(text) {
            let (mut start, mut end) = (m.start(), m.end());
            while let Some(&(s, e)) = spans.last() {
                if e <= start {
                    break;
                }
                start = start.min(s);
                end = end.max(e);
                spans.pop();
            }
            spans.push((start, end));
        }
        let settled = if at_end {
            text.len()
        } else {
            self.unsettled_from(text)
        };
        let mut cursor = 0;
        for (i, &(start, end)) in spans.iter().enumerate() {
            let continues = i == 0 && open.is_some();
            if !continues {
                if start >= settled {
                    // A later occurrence may start before it and overlap it.
                    break;
                }
                out.extend_from_slice(&text[cursor..start]);
                out.extend_from_slice(MASK);
            }
            cursor = end;
            if end > settled {
                // A later occurrence may overlap its end: the same mask, extended.
                return (settled, Some(end));
            }
        }
        out.extend_from_slice(&text[cursor..settled]);
        (settled, None)
    }

    /// The first position of `text` whose suffix is a proper prefix of some form (an
    /// occurrence of that form may start there and end in a later chunk), or its length.
    fn unsettled_from(&self, text: &[u8]) -> usize {
        let from = text.len().saturating_sub(self.holdback);
        (from..text.len())
            .find(|&p| {
                let possible = match text.get(p + 1) {
                    Some(&second) => {
                        let pair = pair_index(text[p], second);
                        self.first_pairs[pair / 64] & (1 << (pair % 64)) != 0
                    }
                    None => self.first_bytes[usize::from(text[p])],
                };
                possible && self.begins_a_form(&text[p..])
            })
            .unwrap_or(text.len())
    }

    /// Whether `tail` is a proper prefix of some form.
    fn begins_a_form(&self, tail: &[u8]) -> bool {
        // Forms starting with `tail` are contiguous in sorted order, from its lower bound.
        let at = self.patterns.partition_point(|p| p.as_slice() < tail);
        self.patterns[at..]
            .iter()
            .take_while(|p| p.starts_with(tail))
            .any(|p| p.len() > tail.len())
    }
}

/// The bit of two leading bytes in [`Inner::first_pairs`].
fn pair_index(first: u8, second: u8) -> usize {
    usize::from(first) << 8 | usize::from(second)
}

/// Appends the forms of `v` (other than its lines) to `out`.
fn forms(v: &[u8], out: &mut Vec<Vec<u8>>) {
    out.push(v.to_vec());
    for engine in [&STANDARD, &URL_SAFE] {
        base64_forms(v, engine, out);
    }
    let aligned = stable_base64(v, &STANDARD, 0);
    for width in BASE64_LINE_WIDTHS {
        if aligned.len() > width {
            out.extend(aligned.chunks(width).map(<[u8]>::to_vec));
        }
    }
    for style in URL_STYLES {
        out.push(percent_encode(v, style));
    }
    for style in JSON_STYLES {
        out.extend(json_escape(v, style));
    }
}

/// Base64 of `v` padded, unpadded, and its stable part at each byte alignment.
fn base64_forms(v: &[u8], engine: &GeneralPurpose, out: &mut Vec<Vec<u8>>) {
    let padded = engine.encode(v).into_bytes();
    let unpadded = padded.len() - padded.iter().rev().take_while(|&&b| b == b'=').count();
    out.push(padded[..unpadded].to_vec());
    out.push(padded);
    for offset in 0..3 {
        out.push(stable_base64(v, engine, offset));
    }
}

/// The base64 characters of `v` preceded by `offset` bytes (0–2) that depend on `v` alone:
/// character `i` carries bits `6i..6i+6`, and `v` is bits `8·offset..8·(offset+len)`.
fn stable_base64(v: &[u8], engine: &GeneralPurpose, offset: usize) -> Vec<u8> {
    let mut bytes = vec![0; offset];
    bytes.extend_from_slice(v);
    bytes.resize(bytes.len().div_ceil(3) * 3, 0);
    let encoded = engine.encode(&bytes).into_bytes();
    let first = (8 * offset).div_ceil(6);
    let end = 8 * (offset + v.len()) / 6;
    encoded.get(first..end).unwrap_or_default().to_vec()
}

/// One way of percent-encoding.
#[derive(Debug, Clone, Copy)]
struct UrlStyle {
    /// Punctuation left alone besides letters and digits.
    keep: &'static [u8],
    /// A space as `+` rather than `%20`.
    plus: bool,
    /// Lower-case hex digits.
    lower: bool,
}

/// RFC 3986's unreserved punctuation.
const UNRESERVED: &[u8] = b"-._~";

const URL_STYLES: [UrlStyle; 7] = [
    // RFC 3986: Rust's `percent-encoding` sets, Go's `PathEscape`, .NET's EscapeDataString.
    UrlStyle {
        keep: UNRESERVED,
        plus: false,
        lower: false,
    },
    UrlStyle {
        keep: UNRESERVED,
        plus: false,
        lower: true,
    },
    // Query strings: Go's `QueryEscape`, Python's `quote_plus`.
    UrlStyle {
        keep: UNRESERVED,
        plus: true,
        lower: false,
    },
    UrlStyle {
        keep: UNRESERVED,
        plus: true,
        lower: true,
    },
    // JavaScript's `encodeURIComponent`.
    UrlStyle {
        keep: b"-._~!'()*",
        plus: false,
        lower: false,
    },
    // Python's `quote` (`/` is safe by default).
    UrlStyle {
        keep: b"-._~/",
        plus: false,
        lower: false,
    },
    // HTML forms, `URLSearchParams` (application/x-www-form-urlencoded).
    UrlStyle {
        keep: b"*-._",
        plus: true,
        lower: false,
    },
];

/// `v` percent-encoded in `style`.
fn percent_encode(v: &[u8], style: UrlStyle) -> Vec<u8> {
    let hex: &[u8; 16] = if style.lower {
        b"0123456789abcdef"
    } else {
        b"0123456789ABCDEF"
    };
    let mut out = Vec::with_capacity(v.len() * 3);
    for &b in v {
        if b.is_ascii_alphanumeric() || style.keep.contains(&b) {
            out.push(b);
        } else if b == b' ' && style.plus {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
        }
    }
    out
}

/// One way of escaping a JSON string.
#[derive(Debug, Clone, Copy)]
struct JsonStyle {
    /// `/` as `\/`.
    slash: bool,
    /// Everything outside printable ASCII as `\uXXXX`.
    ascii: bool,
    /// `<`, `>`, `&`, U+2028 and U+2029 as `\uXXXX`.
    html: bool,
}

const JSON_STYLES: [JsonStyle; 5] = [
    // serde_json, JavaScript's JSON.stringify.
    JsonStyle {
        slash: false,
        ascii: false,
        html: false,
    },
    JsonStyle {
        slash: true,
        ascii: false,
        html: false,
    },
    // Python's json.dumps.
    JsonStyle {
        slash: false,
        ascii: true,
        html: false,
    },
    // PHP's json_encode.
    JsonStyle {
        slash: true,
        ascii: true,
        html: false,
    },
    // Go's encoding/json.
    JsonStyle {
        slash: false,
        ascii: false,
        html: true,
    },
];

/// `v` escaped as the inside of a JSON string in `style`; `None` when the style needs
/// characters and `v` is not UTF-8.
fn json_escape(v: &[u8], style: JsonStyle) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(v.len() + 8);
    if !style.ascii && !style.html {
        for &b in v {
            json_ascii(&mut out, b, style);
        }
        return Some(out);
    }
    for c in std::str::from_utf8(v).ok()?.chars() {
        if c.is_ascii() {
            json_ascii(&mut out, c as u8, style);
        } else if style.ascii || matches!(c, '\u{2028}' | '\u{2029}') {
            for &unit in c.encode_utf16(&mut [0; 2]).iter() {
                json_unit(&mut out, unit);
            }
        } else {
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        }
    }
    Some(out)
}

/// Appends byte `b` (ASCII, or any byte of a value escaped bytewise) escaped in `style`.
fn json_ascii(out: &mut Vec<u8>, b: u8, style: JsonStyle) {
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'/' if style.slash => out.extend_from_slice(b"\\/"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        b'<' | b'>' | b'&' if style.html => json_unit(out, u16::from(b)),
        0x7f if style.ascii => json_unit(out, 0x7f),
        ..0x20 => json_unit(out, u16::from(b)),
        _ => out.push(b),
    }
}

/// Appends `\uXXXX` (lower-case hex, as every common encoder writes it).
fn json_unit(out: &mut Vec<u8>, unit: u16) {
    out.extend_from_slice(format!("\\u{unit:04x}").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "hunter2-Pa55w0rd!";

    fn masker() -> Masker {
        Masker::new([SECRET])
    }

    fn masked(text: &str) -> String {
        String::from_utf8(masker().mask(text.as_bytes())).expect("UTF-8 in, UTF-8 out")
    }

    fn b64(engine: &GeneralPurpose, v: &[u8]) -> String {
        engine.encode(v)
    }

    /// Pushes `chunks` through one stream and returns everything it wrote.
    fn streamed<'a>(m: &Masker, chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut s = m.stream();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(s.push(chunk));
            assert!(
                s.held() <= m.holdback(),
                "held {} > {}",
                s.held(),
                m.holdback()
            );
        }
        out.extend(s.finish());
        out
    }

    /// The reference: every occurrence of every form found by brute force, overlapping
    /// ones merged, each run replaced.
    fn reference(m: &Masker, input: &[u8]) -> Vec<u8> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for start in 0..input.len() {
            let longest = m
                .inner
                .patterns
                .iter()
                .filter(|p| input[start..].starts_with(p))
                .map(Vec::len)
                .max();
            let Some(len) = longest else { continue };
            match runs.last_mut() {
                Some(run) if run.1 > start => run.1 = run.1.max(start + len),
                _ => runs.push((start, start + len)),
            }
        }
        let mut out = Vec::new();
        let mut at = 0;
        for (start, end) in runs {
            out.extend_from_slice(&input[at..start]);
            out.extend_from_slice(MASK);
            at = end;
        }
        out.extend_from_slice(&input[at..]);
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    // The red team: what a job might print.

    #[test]
    fn a_secret_printed_raw_is_masked() {
        assert_eq!(masked(&format!("token={SECRET}\n")), "token=***\n");
        assert_eq!(masked(SECRET), "***");
    }

    #[test]
    fn a_secret_with_a_prefix_and_suffix_is_masked() {
        assert_eq!(masked(&format!("xx{SECRET}yy")), "xx***yy");
        assert_eq!(masked(&format!("{SECRET}{SECRET} {SECRET}")), "****** ***");
    }

    #[test]
    fn a_secret_base64_encoded_with_padding_is_masked() {
        for secret in ["abcd", "abcde", "abcdef", SECRET] {
            let m = Masker::new([secret]);
            for engine in [&STANDARD, &URL_SAFE] {
                let encoded = b64(engine, secret.as_bytes());
                let out = m.mask(format!("echo {encoded}.").as_bytes());
                assert_eq!(out, b"echo ***.", "{secret} as {encoded}");
            }
        }
    }

    #[test]
    fn a_secret_base64_encoded_without_padding_is_masked() {
        for secret in ["abcd", "abcde", SECRET] {
            let m = Masker::new([secret]);
            for engine in [&STANDARD, &URL_SAFE] {
                let encoded = b64(engine, secret.as_bytes());
                let encoded = encoded.trim_end_matches('=');
                assert_eq!(m.mask(format!("[{encoded}]").as_bytes()), b"[***]");
            }
        }
    }

    #[test]
    fn a_secret_inside_a_larger_base64_blob_is_masked_at_every_alignment() {
        let m = masker();
        for engine in [&STANDARD, &URL_SAFE] {
            for prefix_len in 0..9 {
                for suffix_len in 0..4 {
                    let mut blob = b"user:".repeat(2)[..prefix_len].to_vec();
                    blob.extend_from_slice(SECRET.as_bytes());
                    blob.extend_from_slice(&b"?>~\x01"[..suffix_len]);
                    let encoded = b64(engine, &blob);
                    let out = m.mask(encoded.as_bytes());
                    // Every character carrying only the secret's bits is under one mask:
                    // what is left is the neighbours' characters (and the two that mix
                    // their bits with the secret's).
                    let first = (8 * prefix_len).div_ceil(6);
                    let end = 8 * (prefix_len + SECRET.len()) / 6;
                    assert_eq!(out.iter().filter(|&&b| b == b'*').count(), 3, "{out:?}");
                    assert!(
                        out.len() - MASK.len() <= encoded.len() - (end - first),
                        "{encoded} → {out:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_secret_url_encoded_is_masked_in_upper_and_lower_case_hex() {
        let m = Masker::new(["p@ss/w:rd?&="]);
        for encoded in [
            "p%40ss%2Fw%3Ard%3F%26%3D",
            "p%40ss%2fw%3ard%3f%26%3d",
            "p%40ss/w%3Ard%3F%26%3D", // Python's quote
        ] {
            let out = m.mask(format!("GET /login?pw={encoded} HTTP/1.1").as_bytes());
            assert_eq!(out, b"GET /login?pw=*** HTTP/1.1", "{encoded}");
        }
    }

    #[test]
    fn a_secret_with_a_space_url_encoded_with_plus_or_percent_20_is_masked() {
        let m = Masker::new(["correct horse battery*"]);
        for encoded in [
            "correct%20horse%20battery%2A",
            "correct+horse+battery%2A",
            "correct%20horse%20battery*", // encodeURIComponent
            "correct+horse+battery*",     // HTML forms
        ] {
            assert_eq!(
                m.mask(format!("q={encoded}&").as_bytes()),
                b"q=***&",
                "{encoded}"
            );
        }
    }

    #[test]
    fn a_secret_json_escaped_is_masked_as_serde_json_writes_it() {
        let secret = "a\"b\\c/d\n\te\u{1}f\u{7f}é✓𝄞<&>";
        let m = Masker::new([secret]);
        let json =
            serde_json::to_string(&serde_json::json!({ "password": secret })).expect("serializes");
        assert_eq!(m.mask(json.as_bytes()), br#"{"password":"***"}"#);
        let quoted = serde_json::to_string(secret).expect("serializes");
        let inner = &quoted[1..quoted.len() - 1];
        for form in [
            inner.to_owned(),
            inner.replace('/', "\\/"),
            // Python's json.dumps.
            r#"a\"b\\c/d\n\te\u0001f\u007f\u00e9\u2713\ud834\udd1e<&>"#.to_owned(),
            // Go's encoding/json.
            inner
                .replace('<', "\\u003c")
                .replace('&', "\\u0026")
                .replace('>', "\\u003e"),
        ] {
            assert_eq!(m.mask(form.as_bytes()), MASK, "{form}");
        }
    }

    #[test]
    fn a_secret_split_across_two_writes_is_masked() {
        let m = masker();
        let text = format!("login with {SECRET} now\n");
        for cut in 0..=text.len() {
            let (a, b) = text.as_bytes().split_at(cut);
            assert_eq!(
                streamed(&m, [a, b]),
                b"login with *** now\n",
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_secret_split_byte_by_byte_is_masked() {
        let m = masker();
        let encoded = b64(&STANDARD, SECRET.as_bytes());
        let text = format!("{SECRET} {encoded} x{SECRET}{SECRET}\n");
        let out = streamed(&m, text.as_bytes().chunks(1));
        assert_eq!(out, b"*** *** x******\n");
    }

    #[test]
    fn each_line_of_a_multi_line_secret_is_masked_on_its_own() {
        let pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\r\n  bKcwggSjAgEAAoIBAQC7\n}\n-----END KEY-----\n";
        let m = Masker::new([pem]);
        assert_eq!(m.mask(pem.as_bytes()), MASK);
        let log = "line: MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nline: bKcwggSjAgEAAoIBAQC7\n";
        assert_eq!(m.mask(log.as_bytes()), b"line: ***\nline: ***\n");
        // Lines shorter than the minimum (`}`) are not masked on their own.
        assert_eq!(m.mask(b"}\n"), b"}\n");
    }

    #[test]
    fn a_secret_with_a_trailing_newline_is_masked_in_every_form_without_it() {
        let m = Masker::new([format!("{SECRET}\n")]);
        let encoded = b64(&STANDARD, SECRET.as_bytes());
        assert_eq!(m.mask(format!("{SECRET}.{encoded}").as_bytes()), b"***.***");
    }

    #[test]
    fn base64_wrapped_at_76_or_64_columns_is_masked_line_by_line() {
        let secret: Vec<u8> = (0..=255).collect();
        let m = Masker::new([&secret]);
        let encoded = b64(&STANDARD, &secret);
        for width in BASE64_LINE_WIDTHS {
            let wrapped: Vec<_> = encoded.as_bytes().chunks(width).collect();
            let wrapped = wrapped.join(&b'\n');
            let out = m.mask(&wrapped);
            // Only the last line's final character (mixing in the padding) and `==` remain:
            // the last byte, 0xff, is `/w==`.
            let lines = encoded.len().div_ceil(width);
            let expected = format!("{}w==", vec!["***"; lines].join("\n"));
            assert_eq!(String::from_utf8_lossy(&out), expected, "width {width}");
        }
    }

    // Who is masked, and what is left alone.

    #[test]
    fn values_shorter_than_the_minimum_are_ignored_and_counted() {
        let m = Masker::new(["", "1", "yes", " on \n", "four"]);
        assert_eq!((m.secrets(), m.too_short()), (1, 3));
        assert_eq!(m.mask(b"1 yes on four"), b"1 yes on ***");
    }

    #[test]
    fn a_masker_with_no_secrets_is_the_identity() {
        for m in [
            Masker::new(Vec::<&str>::new()),
            Masker::default(),
            Masker::new(["", "ab"]),
        ] {
            assert!(m.is_empty());
            assert_eq!(m.holdback(), 0);
            let text = b"anything at all *** \x00\xff";
            assert_eq!(m.mask(text), text);
            assert_eq!(streamed(&m, text.chunks(3)), text);
        }
    }

    #[test]
    fn text_without_secrets_passes_through_byte_identical() {
        let m = Masker::new([
            SECRET,
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "x y/z+w==",
        ]);
        let log = "   Compiling flotilla-core v0.1.0 (/work/main/core)\n\
                   warning: unused variable: `hunter`\n\
                   {\"password\": \"\", \"token\": null}\n\
                   GET /x?y=z%20w HTTP/1.1 200\n\
                   aHVudGVyMi1QYTU1dzByZA (a near miss), hunter2-Pa55w0rd (a prefix)\n\
                   \x00\x01\x7f\n";
        let mut log = log.as_bytes().to_vec();
        log.extend_from_slice(b"\xfe\xff\xc3(\n");
        assert_eq!(m.mask(&log), log);
        assert_eq!(streamed(&m, log.chunks(7)), log);
    }

    #[test]
    fn the_debug_output_contains_no_secret() {
        let m = Masker::new([SECRET, "0123456789"]);
        let mut s = m.stream();
        s.push(&SECRET.as_bytes()[..10]);
        assert!(s.held() > 0);
        for debug in [format!("{m:?}"), format!("{s:?}"), format!("{m:#?} {s:#?}")] {
            assert!(
                !debug.contains("hunter") && !debug.contains("0123"),
                "{debug}"
            );
            assert!(!debug.contains("aHVudGVy"), "{debug}");
        }
        assert!(format!("{m:?}").contains("secrets: 2"));
    }

    // How occurrences combine.

    #[test]
    fn overlapping_secrets_are_masked_as_one_run() {
        let m = Masker::new(["password123", "123456789"]);
        // Leftmost-longest alone would leave `456789`, most of the second secret.
        assert_eq!(m.mask(b"[password123456789]"), b"[***]");
        assert_eq!(m.mask(b"[password123 123456789]"), b"[*** ***]");
    }

    #[test]
    fn a_long_run_of_overlapping_occurrences_streams_in_bounded_memory() {
        let m = Masker::new(["aaaa"]);
        let mut s = m.stream();
        let mut out = s.push(b"x");
        for _ in 0..10_000 {
            out.extend(s.push(b"aaaaaaa"));
            assert!(s.held() <= m.holdback());
        }
        out.extend(s.push(b"y"));
        out.extend(s.finish());
        assert_eq!(out, b"x***y");
    }

    #[test]
    fn a_mask_still_open_at_a_chunk_boundary_keeps_covering_what_it_covered() {
        // After `abcdefghij`, `efghij` could begin the third secret, so it is held back
        // under an open mask; `efgh`, found again in it, must not cut that mask short.
        let m = Masker::new(["abcdefghij", "efgh", "efghijXYZW"]);
        let mut s = m.stream();
        assert_eq!(s.push(b"abcdefghij"), MASK);
        assert_eq!(s.held(), 6);
        assert_eq!(s.push(b"!"), b"!");
        assert_eq!(s.finish(), b"");
        assert_eq!(m.mask(b"abcdefghij!"), b"***!");
    }

    #[test]
    fn a_form_with_a_star_may_be_assembled_around_a_mask_but_none_printed_survives() {
        // `x***y` is a secret; the job prints `x`, another secret, `y`: the output shows
        // `x***y`, but only text the job printed unmasked and a mask.
        let m = Masker::new(["x***y", "secret"]);
        assert_eq!(m.mask(b"xsecrety"), b"x***y");
        assert_eq!(m.mask(b"x***y"), MASK);
    }

    #[test]
    fn a_stream_holds_back_only_what_could_begin_a_secret() {
        let m = masker();
        let mut s = m.stream();
        assert_eq!(s.push(b"Password: "), b"Password: ");
        assert_eq!(s.held(), 0);
        assert_eq!(s.push(b"ok\nhunt"), b"ok\n");
        assert_eq!(s.held(), 4);
        assert_eq!(s.push(b"ing\n"), b"hunting\n");
        assert_eq!(s.finish(), b"");
    }

    #[test]
    fn streaming_matches_the_reference_on_a_dense_case() {
        let m = Masker::new(["abab", "baba", "aab*", "b*aa"]);
        let text = b"aababababb*aab*aaxabab*baba";
        let whole = m.mask(text);
        assert_eq!(whole, reference(&m, text));
        for n in 1..text.len() {
            assert_eq!(streamed(&m, text.chunks(n)), whole, "chunks of {n}");
        }
    }

    /// Bytes from a small alphabet, so that secrets overlap each other and the filler.
    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop::sample::select(b"ab+/ *\n\"%=\xc3\xa9".to_vec()),
            0..max,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_chunking_gives_the_same_output_as_masking_the_whole(
            secrets in prop::collection::vec(bytes(10), 0..4),
            pieces in prop::collection::vec((any::<prop::sample::Index>(), bytes(6)), 0..12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let m = Masker::new(&secrets);
            // Text: filler with forms of the secrets embedded.
            let mut text = Vec::new();
            for (form, filler) in &pieces {
                text.extend_from_slice(filler);
                if !m.inner.patterns.is_empty() {
                    let form: &Vec<u8> = form.get(&m.inner.patterns);
                    text.extend_from_slice(form);
                }
            }
            let whole = m.mask(&text);
            prop_assert_eq!(&whole, &reference(&m, &text));
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(text.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([text.len()]) {
                chunks.push(&text[at..cut]);
                at = cut;
            }
            prop_assert_eq!(&streamed(&m, chunks), &whole);
            for form in m.inner.patterns.iter().filter(|p| !p.contains(&b'*')) {
                prop_assert!(!contains(&whole, form), "{:?} in {:?}", form, whole);
            }
        }

        #[test]
        fn text_without_secret_bytes_is_untouched(
            secrets in prop::collection::vec("[a-z]{4,12}", 1..4),
            text in prop::collection::vec(prop::sample::select(b" \n-!#$&()<>,;[]".to_vec()), 0..200),
            chunk in 1usize..20,
        ) {
            let m = Masker::new(&secrets);
            prop_assert_eq!(&m.mask(&text), &text);
            prop_assert_eq!(&streamed(&m, text.chunks(chunk)), &text);
        }
    }
}
