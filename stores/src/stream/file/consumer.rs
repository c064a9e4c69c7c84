//! A consumer of the file stream: reads synced records from its group's position on, and
//! writes the group's position file at every commit.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::repo::BoxFuture;
use flotilla_core::store::{LogStreamConsumer, Shipped, StoreError, StreamPosition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::format::{self, Parsed, Reader};
use super::{Shared, TMP_DIR, position};
use crate::atomic;
use crate::dir::blocking;

/// The version of the group position files written now.
const GROUP_FILE_VERSION: u32 = 1;

/// `groups/{group}.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    v: u32,
    /// Where the group's next consumer starts: the byte after the last committed record.
    next: u64,
}

/// The one live consumer of a group.
#[derive(Debug)]
struct FileStreamConsumer {
    shared: Arc<Shared>,
    group: String,
    durable: watch::Receiver<u64>,
    /// Where the next `poll` reads.
    cursor: u64,
    /// Where the group's next consumer would start.
    committed: u64,
}

/// Group names become file names: 1 to 128 ASCII letters, digits, `.`, `_` and `-`, not
/// starting with `.`.
fn check_group(group: &str) -> Result<(), StoreError> {
    let ok = (1..=128).contains(&group.len())
        && !group.starts_with('.')
        && group
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "log stream group `{group}`: use 1 to 128 ASCII letters, digits, `.`, `_` and `-`, \
             not starting with `.`"
        )))
    }
}

pub(super) fn subscribe(
    shared: &Arc<Shared>,
    group: &str,
) -> Result<Box<dyn LogStreamConsumer>, StoreError> {
    check_group(group)?;
    let mut live = shared.live_groups();
    if live.contains(group) {
        return Err(StoreError::Invalid(format!(
            "log stream group `{group}` already has a consumer: the file stream has one \
             partition, so a group has one consumer at a time (drop the first)"
        )));
    }
    let end = *shared.durable.borrow();
    let committed = read_group(shared, group, end)?;
    live.insert(group.to_owned());
    Ok(Box::new(FileStreamConsumer {
        shared: shared.clone(),
        group: group.to_owned(),
        durable: shared.durable.clone(),
        cursor: committed,
        committed,
    }))
}

/// The group's committed position, checked against the file: the start when it has none.
fn read_group(shared: &Shared, group: &str, end: u64) -> Result<u64, StoreError> {
    let path = shared.group_path(group);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(format::START),
        Err(e) => {
            return Err(StoreError::Unavailable(format!(
                "reading {}: {e}",
                path.display()
            )));
        }
    };
    let corrupt = |why: String| StoreError::Corrupt(format!("{}: {why}", path.display()));
    let file: GroupFile = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(format!("not a group position: {e}")))?;
    if file.v != GROUP_FILE_VERSION {
        return Err(corrupt(format!(
            "version {} (this Flotilla reads {GROUP_FILE_VERSION}): written by a newer Flotilla",
            file.v
        )));
    }
    let stream = shared.path.display();
    if file.next < format::START || file.next > end {
        return Err(corrupt(format!(
            "the group is at byte {}, but {stream} ends at byte {end}: the stream file was \
             replaced or cut short. Move the `groups` directory aside to read it from the start",
            file.next
        )));
    }
    let mut reader = Reader::new(&shared.file);
    match reader.record(file.next, end) {
        Ok(Parsed::End | Parsed::Record { .. }) => Ok(file.next),
        Ok(Parsed::Damaged(why)) => Err(corrupt(format!(
            "the group is at byte {}, where {stream} has no intact record ({why})",
            file.next
        ))),
        Err(e) => Err(read_error(shared, file.next, &e)),
    }
}

fn read_error(shared: &Shared, at: u64, e: &io::Error) -> StoreError {
    let what = format!("{}: reading at byte {at}: {e}", shared.path.display());
    if e.kind() == io::ErrorKind::UnexpectedEof {
        StoreError::Corrupt(format!("{what} (the file is shorter than was synced)"))
    } else {
        StoreError::Unavailable(what)
    }
}

/// Up to `max` records from `from` until `end`: the records, where the next read starts,
/// and the error that stopped it early, if one did.
type Read = (Vec<(StreamPosition, Shipped)>, u64, Option<StoreError>);

fn read_records(shared: &Shared, from: u64, end: u64, max: usize) -> Read {
    let mut reader = Reader::new(&shared.file);
    let mut records = Vec::new();
    let mut at = from;
    let corrupt = |at: u64, why: &str| {
        StoreError::Corrupt(format!(
            "{}: the record at byte {at} is damaged ({why})",
            shared.path.display()
        ))
    };
    while records.len() < max {
        match reader.record(at, end) {
            Ok(Parsed::End) => break,
            Ok(Parsed::Record {
                kind: format::BATCH,
                next,
                ..
            }) => at = next,
            Ok(Parsed::Record {
                kind: format::RECORD,
                payload,
                next,
            }) => match format::decode_shipped(&payload) {
                Ok(shipped) => {
                    records.push((position(at), shipped));
                    at = next;
                }
                Err(e) => {
                    let why = format!(
                        "its checksum holds but it does not decode ({e}): written by a newer Flotilla?"
                    );
                    return (records, at, Some(corrupt(at, &why)));
                }
            },
            Ok(Parsed::Record { kind, .. }) => {
                let why = format!("a record of unknown kind {kind}");
                return (records, at, Some(corrupt(at, &why)));
            }
            Ok(Parsed::Damaged(why)) => return (records, at, Some(corrupt(at, why))),
            Err(e) => return (records, at, Some(read_error(shared, at, &e))),
        }
    }
    (records, at, None)
}

/// Where the record at `offset` ends, checking that one starts there.
fn record_end(shared: &Shared, offset: u64, end: u64) -> Result<u64, StoreError> {
    match Reader::new(&shared.file).record(offset, end) {
        Ok(Parsed::Record {
            kind: format::RECORD,
            next,
            ..
        }) => Ok(next),
        // Positions come from `poll`, which read an intact record there: one that is not is
        // most likely a position from elsewhere.
        Ok(Parsed::Damaged(why)) => Err(StoreError::Invalid(format!(
            "byte {offset} of {} is not the position of an intact record ({why})",
            shared.path.display()
        ))),
        Ok(Parsed::End | Parsed::Record { .. }) => Err(StoreError::Invalid(format!(
            "byte {offset} of {} is not the position of a record",
            shared.path.display()
        ))),
        Err(e) => Err(read_error(shared, offset, &e)),
    }
}

impl LogStreamConsumer for FileStreamConsumer {
    fn poll(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<(StreamPosition, Shipped)>, StoreError>> {
        Box::pin(async move {
            if max == 0 {
                return Ok(Vec::new());
            }
            let deadline = Instant::now() + wait;
            loop {
                let end = *self.durable.borrow_and_update();
                if self.cursor < end {
                    let (shared, from) = (self.shared.clone(), self.cursor);
                    let (records, next, error) =
                        blocking(move || Ok(read_records(&shared, from, end, max))).await?;
                    // Nothing was awaited since the read: a cancelled poll reads again.
                    self.cursor = next;
                    match (records.is_empty(), error) {
                        // What came before the damage first; the next poll reports it.
                        (false, _) => return Ok(records),
                        (true, Some(e)) => return Err(e),
                        // Only a batch header was left.
                        (true, None) => continue,
                    }
                }
                match tokio::time::timeout_at(deadline, self.durable.changed()).await {
                    Ok(Ok(())) => {}
                    Err(_elapsed) => return Ok(Vec::new()),
                    // The stream was closed: nothing more will come.
                    Ok(Err(_closed)) => {
                        tokio::time::sleep_until(deadline).await;
                        return Ok(Vec::new());
                    }
                }
            }
        })
    }

    fn commit<'a>(
        &'a mut self,
        done: &'a [StreamPosition],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if let Some(other) = done.iter().find(|p| p.partition != 0) {
                return Err(StoreError::Invalid(format!(
                    "the file log stream has one partition, 0, not {}",
                    other.partition
                )));
            }
            let Some(last) = done.iter().map(|p| p.offset).max() else {
                return Ok(());
            };
            if last < self.committed {
                return Ok(());
            }
            if last >= self.cursor {
                return Err(StoreError::Invalid(format!(
                    "log stream position {last} was not returned to this consumer of group `{}`",
                    self.group
                )));
            }
            let shared = self.shared.clone();
            let group = self.group.clone();
            let end = self.cursor;
            let next = blocking(move || {
                let next = record_end(&shared, last, end)?;
                let bytes = serde_json::to_vec(&GroupFile {
                    v: GROUP_FILE_VERSION,
                    next,
                })
                .map_err(|e| StoreError::Invalid(format!("encoding a group position: {e}")))?;
                let path = shared.group_path(&group);
                atomic::write_file(&shared.dir.join(TMP_DIR), &path, &bytes).map_err(|e| {
                    StoreError::Unavailable(format!("writing {}: {e}", path.display()))
                })?;
                Ok(next)
            })
            .await?;
            self.committed = self.committed.max(next);
            Ok(())
        })
    }
}

impl Drop for FileStreamConsumer {
    fn drop(&mut self) {
        self.shared.live_groups().remove(&self.group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_that_are_not_plain_file_names_are_refused() {
        for ok in ["aggregator", "a.b_c-1", &"g".repeat(128)] {
            check_group(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "ü", &"g".repeat(129)] {
            assert!(
                matches!(check_group(bad), Err(StoreError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
