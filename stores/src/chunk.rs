//! The log chunk encoding, the same in every log adapter so a chunk can be copied between
//! stores (or read by hand) without knowing who wrote it.
//!
//! A chunk object is:
//!
//! ```text
//! b"FLOG" | version (1 byte, = LOG_FORMAT_VERSION) | one zstd frame
//! ```
//!
//! The zstd frame (level 3) records its content size and carries zstd's XXH64 content
//! checksum, and holds the chunk's lines as JSON lines: one [`LogLine`] JSON object per
//! line, each ended by `\n` (a line's text cannot break the framing: JSON escapes newlines).
//!
//! Decoding refuses, as [`StoreError::Corrupt`] naming the object, anything that is not
//! exactly that: a wrong magic or unknown version (a persisted format is never silently
//! reinterpreted), a frame without a checksum or content size, a truncated frame or trailing
//! bytes, a checksum mismatch, a decoded size above [`MAX_DECODED_BYTES`], a line that is not
//! a `LogLine`, an empty chunk, lines not strictly ascending, or a first line other than the
//! one the object's name says.

use flotilla_core::store::{
    AttemptKey, ChunkRef, LOG_FORMAT_VERSION, LogChunk, LogLine, StoreError,
};

/// The first bytes of every chunk object.
pub const MAGIC: [u8; 4] = *b"FLOG";

/// The largest decoded chunk accepted (64 MiB): a chunk holds a few seconds of output, and a
/// bound keeps a garbled size field from allocating without limit.
pub const MAX_DECODED_BYTES: u64 = 64 << 20;

/// The zstd level: cheap to write every few seconds, still a good ratio on build logs.
const ZSTD_LEVEL: i32 = 3;

/// The magic and the version byte.
const HEADER_LEN: usize = MAGIC.len() + 1;

/// The zstd frame magic number, little-endian.
const ZSTD_FRAME_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The object name of the chunk whose first line is `first_seq`: `chunk-{first_seq:020}.zst`
/// (zero-padded so names sort as the numbers do).
pub fn chunk_name(first_seq: u64) -> String {
    format!("chunk-{first_seq:020}.zst")
}

/// The layout key of a chunk: `logs/{project}/{build}/{job}/{attempt}/chunk-….zst`.
pub fn chunk_key(key: &AttemptKey, first_seq: u64) -> String {
    format!("{}{}", key.log_prefix(), chunk_name(first_seq))
}

/// The first line's sequence number named by a chunk object's name, `None` for any other
/// name (the manifest, a stray file).
pub fn parse_chunk_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("chunk-")?.strip_suffix(".zst")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Encodes a chunk; returns the bytes to store and the chunk's [`ChunkRef`]. An empty chunk,
/// or one whose lines are not strictly ascending, is refused as [`StoreError::Invalid`].
pub fn encode(chunk: &LogChunk) -> Result<(Vec<u8>, ChunkRef), StoreError> {
    let (Some(first), Some(last)) = (chunk.lines.first(), chunk.lines.last()) else {
        return Err(StoreError::Invalid(
            "a log chunk needs at least one line".into(),
        ));
    };
    if let Some(pair) = chunk.lines.windows(2).find(|w| w[0].seq >= w[1].seq) {
        return Err(StoreError::Invalid(format!(
            "log chunk lines must be strictly ascending: {} is followed by {}",
            pair[0].seq, pair[1].seq
        )));
    }
    let mut json = Vec::with_capacity(chunk.lines.iter().map(|l| l.text.len() + 64).sum());
    for line in &chunk.lines {
        serde_json::to_writer(&mut json, line)
            .map_err(|e| StoreError::Invalid(format!("log line {}: {e}", line.seq)))?;
        json.push(b'\n');
    }
    if json.len() as u64 > MAX_DECODED_BYTES {
        return Err(StoreError::Invalid(format!(
            "log chunk from line {} is {} bytes as JSON lines, above the {MAX_DECODED_BYTES} limit",
            first.seq,
            json.len()
        )));
    }
    let frame = compress(&json)
        .map_err(|e| StoreError::Invalid(format!("compressing log chunk {}: {e}", first.seq)))?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + frame.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.push(format_version_byte());
    bytes.extend_from_slice(&frame);
    let chunk_ref = ChunkRef {
        first_seq: first.seq,
        last_seq: last.seq,
        bytes: bytes.len() as u64,
    };
    Ok((bytes, chunk_ref))
}

/// Decodes the chunk object `name` (its key, used in errors), which its name says starts at
/// line `first_seq`.
pub fn decode(name: &str, first_seq: u64, bytes: &[u8]) -> Result<Vec<LogLine>, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt(format!("log chunk {name}: {why}"));
    if bytes.len() < HEADER_LEN || bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt(format!(
            "not a chunk object (no `FLOG` header; {} bytes)",
            bytes.len()
        )));
    }
    if bytes[MAGIC.len()] != format_version_byte() {
        return Err(corrupt(format!(
            "format version {} is not the supported {LOG_FORMAT_VERSION}",
            bytes[MAGIC.len()]
        )));
    }
    let frame = &bytes[HEADER_LEN..];
    // Frame header: magic, then the descriptor byte whose bit 2 is the checksum flag.
    if frame.len() < 5 || frame[..4] != ZSTD_FRAME_MAGIC || frame[4] & 0b100 == 0 {
        return Err(corrupt("no zstd frame with a content checksum".into()));
    }
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size <= MAX_DECODED_BYTES => size,
        Ok(Some(size)) => return Err(corrupt(format!("decodes to {size} bytes, above the limit"))),
        Ok(None) | Err(_) => return Err(corrupt("zstd frame without a content size".into())),
    };
    // `decompress` refuses a truncated frame, trailing bytes and a checksum mismatch.
    let json =
        zstd::bulk::decompress(frame, size as usize).map_err(|e| corrupt(format!("zstd: {e}")))?;
    if json.len() as u64 != size {
        return Err(corrupt(format!(
            "decoded {} bytes, the frame says {size}",
            json.len()
        )));
    }
    let Some(body) = json.strip_suffix(b"\n") else {
        return Err(corrupt("the last line has no line end".into()));
    };
    let mut lines: Vec<LogLine> = Vec::new();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line: LogLine = serde_json::from_slice(raw)
            .map_err(|e| corrupt(format!("line {} of the chunk: {e}", i + 1)))?;
        if let Some(prev) = lines.last()
            && prev.seq >= line.seq
        {
            return Err(corrupt(format!(
                "lines not ascending: {} is followed by {}",
                prev.seq, line.seq
            )));
        }
        lines.push(line);
    }
    match lines.first() {
        Some(first) if first.seq == first_seq => Ok(lines),
        Some(first) => Err(corrupt(format!(
            "starts at line {}, its name says {first_seq}",
            first.seq
        ))),
        None => Err(corrupt("holds no lines".into())),
    }
}

fn compress(json: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
    compressor.include_checksum(true)?;
    compressor.include_contentsize(true)?;
    compressor.compress(json)
}

fn format_version_byte() -> u8 {
    // The version is 1 today; a format past 255 would need a new header anyway.
    u8::try_from(LOG_FORMAT_VERSION).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use flotilla_core::runner::Stream;

    use super::*;

    fn line(seq: u64, text: &str) -> LogLine {
        LogLine {
            seq,
            ts: 1_700_000_000_000 + seq,
            stream: Stream::Stdout,
            step: Some(1),
            text: text.into(),
        }
    }

    fn chunk(seqs: std::ops::Range<u64>) -> LogChunk {
        LogChunk {
            lines: seqs
                .map(|s| line(s, &format!("line {s}\nwith \"quotes\"")))
                .collect(),
        }
    }

    #[test]
    fn a_chunk_decodes_to_the_lines_it_was_encoded_from() {
        let c = chunk(5..105);
        let (bytes, r) = encode(&c).unwrap();
        assert_eq!(
            r,
            ChunkRef {
                first_seq: 5,
                last_seq: 104,
                bytes: bytes.len() as u64
            }
        );
        assert_eq!(&bytes[..5], b"FLOG\x01");
        assert_eq!(decode("k", 5, &bytes).unwrap(), c.lines);
    }

    #[test]
    fn every_truncation_of_a_chunk_is_corrupt_and_names_the_object() {
        let (bytes, _) = encode(&chunk(0..50)).unwrap();
        for len in 0..bytes.len() {
            match decode("logs/x/chunk-0.zst", 0, &bytes[..len]) {
                Err(StoreError::Corrupt(msg)) => {
                    assert!(msg.contains("logs/x/chunk-0.zst"), "{msg}")
                }
                other => panic!("truncated to {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_chunk_never_reads_back_as_other_lines() {
        // A flip in a header field that does not change the content (say, a window size)
        // may decode to the same lines; everything else is caught.
        let c = chunk(0..50);
        let (bytes, _) = encode(&c).unwrap();
        let mut caught = 0;
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut garbled = bytes.clone();
                garbled[i] ^= 1 << bit;
                match decode("k", 0, &garbled) {
                    Err(StoreError::Corrupt(_)) => caught += 1,
                    Ok(lines) => assert_eq!(lines, c.lines, "byte {i} bit {bit}"),
                    Err(other) => panic!("byte {i} bit {bit}: {other:?}"),
                }
            }
        }
        assert!(
            caught > bytes.len() * 8 * 9 / 10,
            "{caught} of {}",
            bytes.len() * 8
        );
    }

    #[test]
    fn trailing_bytes_an_unknown_version_and_a_misnamed_chunk_are_corrupt() {
        let (bytes, _) = encode(&chunk(3..6)).unwrap();
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"junk");
        assert!(matches!(
            decode("k", 3, &trailing),
            Err(StoreError::Corrupt(_))
        ));
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(
            matches!(decode("k", 3, &v2), Err(StoreError::Corrupt(m)) if m.contains("version 2"))
        );
        assert!(
            matches!(decode("k", 0, &bytes), Err(StoreError::Corrupt(m)) if m.contains("name says 0"))
        );
    }

    #[test]
    fn empty_and_unordered_chunks_are_refused() {
        assert!(matches!(
            encode(&LogChunk { lines: vec![] }),
            Err(StoreError::Invalid(_))
        ));
        let unordered = LogChunk {
            lines: vec![line(2, "b"), line(1, "a")],
        };
        assert!(matches!(encode(&unordered), Err(StoreError::Invalid(_))));
        let repeated = LogChunk {
            lines: vec![line(1, "a"), line(1, "a")],
        };
        assert!(matches!(encode(&repeated), Err(StoreError::Invalid(_))));
    }

    #[test]
    fn chunk_names_sort_as_their_numbers_and_parse_back() {
        assert_eq!(chunk_name(42), "chunk-00000000000000000042.zst");
        assert!(chunk_name(9) < chunk_name(10));
        assert_eq!(parse_chunk_name(&chunk_name(u64::MAX)), Some(u64::MAX));
        for other in [
            "manifest.json",
            "chunk-1.zst",
            "chunk-0000000000000000004x.zst",
            "chunk-00000000000000000042.zst.tmp",
        ] {
            assert_eq!(parse_chunk_name(other), None, "{other}");
        }
    }
}
