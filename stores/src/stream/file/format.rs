//! The stream file's bytes (version 1, see [the module](super) for the layout): encoding
//! records and batches, reading them back, and telling a torn tail from damage.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use flotilla_core::store::{Shipped, StoreError};

/// The first 8 bytes of a version-1 stream file.
pub(super) const MAGIC: &[u8; 8] = b"FLTLOGS1";
/// Where the first record starts.
pub(super) const START: u64 = MAGIC.len() as u64;
/// `len: u32 LE | crc32: u32 LE`.
const HEADER: usize = 8;
/// The largest record body (kind byte and payload) read or written: a record claiming more is
/// damage, not data.
pub(super) const MAX_BODY: usize = 4 << 20;
/// A batch header: the length of the records that follow in one write, and their count.
pub(super) const BATCH: u8 = 1;
/// A [`Shipped`] as JSON.
pub(super) const RECORD: u8 = 2;
/// A batch header's body: kind, `u64` byte length, `u32` count.
const BATCH_BODY: usize = 1 + 8 + 4;
/// How much is read from the file at once.
const WINDOW: usize = 256 << 10;

/// Appends one record to `out`.
fn push(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let start = out.len();
    let len = u32::try_from(1 + payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(payload);
    let crc = checksum(&len.to_le_bytes(), &out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// CRC-32 (IEEE) of the length field and the body: a damaged length is caught even when the
/// bytes it then points at happen to look like a record.
fn checksum(len: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(body);
    hasher.finalize()
}

/// Appends `shipped` as a record; refuses one over [`MAX_BODY`].
pub(super) fn push_shipped(out: &mut Vec<u8>, shipped: &Shipped) -> Result<(), StoreError> {
    let json = serde_json::to_vec(shipped)
        .map_err(|e| StoreError::Invalid(format!("encoding a log stream record: {e}")))?;
    if json.len() + 1 > MAX_BODY {
        return Err(StoreError::Invalid(format!(
            "a log stream record of {} bytes is over the limit of {} (attempt {:?})",
            json.len(),
            MAX_BODY - 1,
            shipped.key()
        )));
    }
    push(out, RECORD, &json);
    Ok(())
}

/// The batch header for `count` records taking `records_len` bytes.
pub(super) fn batch_header(records_len: u64, count: u32) -> Vec<u8> {
    let mut payload = [0u8; BATCH_BODY - 1];
    payload[..8].copy_from_slice(&records_len.to_le_bytes());
    payload[8..].copy_from_slice(&count.to_le_bytes());
    let mut out = Vec::with_capacity(HEADER + BATCH_BODY);
    push(&mut out, BATCH, &payload);
    out
}

/// Decodes a [`RECORD`]'s payload.
pub(super) fn decode_shipped(payload: &[u8]) -> Result<Shipped, serde_json::Error> {
    serde_json::from_slice(payload)
}

/// What is at a position.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    /// The position is the limit: nothing more.
    End,
    /// An intact record.
    Record {
        /// Its kind.
        kind: u8,
        /// Its payload (the body after the kind byte).
        payload: Vec<u8>,
        /// Where the next record starts.
        next: u64,
    },
    /// Bytes that are not an intact record, and why.
    Damaged(&'static str),
}

/// Reads records from a file through a window, so a run of small records costs few reads.
#[derive(Debug)]
pub(super) struct Reader<'f> {
    file: &'f File,
    start: u64,
    buf: Vec<u8>,
}

impl<'f> Reader<'f> {
    pub(super) fn new(file: &'f File) -> Self {
        Reader {
            file,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// Bytes `at..at + len`, or `None` when they reach past `limit`. A file shorter than
    /// `limit` is an `UnexpectedEof` error.
    fn bytes(&mut self, at: u64, len: usize, limit: u64) -> io::Result<Option<&[u8]>> {
        let Some(end) = at.checked_add(len as u64).filter(|&end| end <= limit) else {
            return Ok(None);
        };
        if at < self.start || end > self.start + self.buf.len() as u64 {
            let want = (len.max(WINDOW) as u64).min(limit - at);
            self.buf.resize(usize::try_from(want).unwrap_or(len), 0);
            self.file.read_exact_at(&mut self.buf, at)?;
            self.start = at;
        }
        let from = usize::try_from(at - self.start).unwrap_or(usize::MAX);
        Ok(self.buf.get(from..from + len))
    }

    /// The record at `at`, reading nothing at or past `limit`.
    pub(super) fn record(&mut self, at: u64, limit: u64) -> io::Result<Parsed> {
        if at >= limit {
            return Ok(Parsed::End);
        }
        let Some(header) = self.bytes(at, HEADER, limit)? else {
            return Ok(Parsed::Damaged("an incomplete record header"));
        };
        let len_bytes: [u8; 4] = header[..4].try_into().unwrap_or_default();
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len == 0 || len > MAX_BODY {
            return Ok(Parsed::Damaged("an impossible record length"));
        }
        let Some(body) = self.bytes(at + HEADER as u64, len, limit)? else {
            return Ok(Parsed::Damaged("a record cut short"));
        };
        if checksum(&len_bytes, body) != crc {
            return Ok(Parsed::Damaged("a checksum mismatch"));
        }
        Ok(Parsed::Record {
            kind: body[0],
            payload: body[1..].to_vec(),
            next: at + (HEADER + len) as u64,
        })
    }

    /// The batch starting at `at`, checked whole: its header and every record it counts, which
    /// must fill it exactly.
    pub(super) fn batch(&mut self, at: u64, limit: u64) -> io::Result<Batch> {
        let damaged = |record: u64, why: String| Batch::Damaged {
            batch: at,
            record,
            why,
        };
        let (payload, first) = match self.record(at, limit)? {
            Parsed::End => return Ok(Batch::End),
            Parsed::Damaged(why) => return Ok(damaged(at, why.to_owned())),
            Parsed::Record {
                kind: BATCH,
                payload,
                next,
            } if payload.len() == BATCH_BODY - 1 => (payload, next),
            Parsed::Record { kind, .. } => {
                return Ok(damaged(
                    at,
                    format!("a record of kind {kind} where a batch starts"),
                ));
            }
        };
        let len = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
        let count = u32::from_le_bytes(payload[8..].try_into().unwrap_or_default());
        let end = first.saturating_add(len);
        let mut p = first;
        for _ in 0..count {
            match self.record(p, end.min(limit))? {
                Parsed::Record {
                    kind: RECORD, next, ..
                } => p = next,
                Parsed::Record { kind, .. } => {
                    return Ok(damaged(
                        p,
                        format!("a record of kind {kind} inside a batch"),
                    ));
                }
                Parsed::Damaged(why) => return Ok(damaged(p, why.to_owned())),
                Parsed::End => return Ok(damaged(p, "a batch cut short".to_owned())),
            }
        }
        if p != end {
            return Ok(damaged(p, "a batch its records do not fill".to_owned()));
        }
        Ok(Batch::Intact { next: end })
    }

    /// The first position in `from..limit` where an intact batch starts.
    pub(super) fn find_intact_batch(&mut self, from: u64, limit: u64) -> io::Result<Option<u64>> {
        let mut p = from;
        while p < limit {
            // A cheap look at the header first: almost every position fails it.
            let candidate = match self.bytes(p, HEADER + 1, limit)? {
                Some(h) => {
                    u32::from_le_bytes(h[..4].try_into().unwrap_or_default()) as usize == BATCH_BODY
                        && h[HEADER] == BATCH
                }
                None => return Ok(None),
            };
            if candidate && matches!(self.batch(p, limit)?, Batch::Intact { .. }) {
                return Ok(Some(p));
            }
            p += 1;
        }
        Ok(None)
    }
}

/// A batch as read back.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Batch {
    /// Nothing more.
    End,
    /// Whole and intact; the next batch starts at `next`.
    Intact {
        /// Where the next batch starts.
        next: u64,
    },
    /// The batch at `batch` is not whole: the record at `record` (perhaps its header) is not
    /// intact.
    Damaged {
        /// Where the batch starts.
        batch: u64,
        /// The first record of it that is not intact.
        record: u64,
        /// Why.
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, u64) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        (f, bytes.len() as u64)
    }

    /// A batch of `n` records with payloads `r0`, `r1`, …
    fn batch(n: u32) -> Vec<u8> {
        let mut records = Vec::new();
        for i in 0..n {
            push(&mut records, RECORD, format!("r{i}").as_bytes());
        }
        let mut out = batch_header(records.len() as u64, n);
        out.extend_from_slice(&records);
        out
    }

    #[test]
    fn records_and_batches_read_back_as_written() {
        let mut bytes = batch(3);
        let second = bytes.len() as u64;
        bytes.extend(batch(1));
        let (f, len) = file_with(&bytes);
        let mut r = Reader::new(f.as_file());
        assert_eq!(r.batch(0, len).unwrap(), Batch::Intact { next: second });
        assert_eq!(r.batch(second, len).unwrap(), Batch::Intact { next: len });
        assert_eq!(r.batch(len, len).unwrap(), Batch::End);
        let Parsed::Record { kind, next, .. } = r.record(0, len).unwrap() else {
            panic!("a batch header")
        };
        assert_eq!(kind, BATCH);
        match r.record(next, len).unwrap() {
            Parsed::Record { kind, payload, .. } => {
                assert_eq!((kind, payload.as_slice()), (RECORD, &b"r0"[..]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn any_flipped_bit_or_cut_makes_a_batch_damaged() {
        let bytes = batch(2);
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                let (f, len) = file_with(&bad);
                let got = Reader::new(f.as_file()).batch(0, len).unwrap();
                assert!(matches!(got, Batch::Damaged { .. }), "byte {i}: {got:?}");
            }
        }
        for cut in 1..bytes.len() {
            let (f, len) = file_with(&bytes[..cut]);
            let got = Reader::new(f.as_file()).batch(0, len).unwrap();
            assert!(
                matches!(got, Batch::Damaged { batch: 0, .. }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn the_next_intact_batch_is_found_past_damage_and_not_in_a_torn_tail() {
        let first = batch(2);
        let mut bytes = first.clone();
        bytes.extend(batch(2));
        bytes[first.len() / 2] ^= 0xff;
        let (f, len) = file_with(&bytes);
        assert_eq!(
            Reader::new(f.as_file()).find_intact_batch(1, len).unwrap(),
            Some(first.len() as u64)
        );
        let (f, len) = file_with(&bytes[..bytes.len() - 3]);
        assert_eq!(
            Reader::new(f.as_file()).find_intact_batch(1, len).unwrap(),
            None
        );
    }
}
