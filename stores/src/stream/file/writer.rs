//! The one thread that appends to the stream file, with group commit: every `publish` waiting
//! when a write starts goes into that write, as one batch, and one `fdatasync` covers them
//! all.
//!
//! A thread rather than a task: the work is blocking file I/O, and a write once started must
//! finish whatever happens to the `publish` that asked for it (a cancelled future must not
//! leave half a batch behind with the next one written after it). The thread is owned by
//! [`Writer`]: dropping it closes the queue, and the thread writes what is queued, then ends
//! and is joined.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;

use flotilla_core::store::StoreError;
use tokio::sync::{oneshot, watch};

use super::format;

/// A batch grows by whole `publish` calls up to about this size.
const MAX_GROUP_BYTES: usize = 16 << 20;

/// The records of one `publish`, encoded, and who to tell once they are durable.
#[derive(Debug)]
pub(super) struct Append {
    /// The encoded records.
    pub(super) bytes: Vec<u8>,
    /// How many.
    pub(super) count: u32,
    /// Told `Ok` once the records are synced.
    pub(super) done: oneshot::Sender<Result<(), StoreError>>,
}

/// The writer thread and its queue.
#[derive(Debug)]
pub(super) struct Writer {
    queue: Option<mpsc::Sender<Append>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread appending to `file` at `end`; it publishes the durable end of the
    /// file on `durable` after every sync.
    pub(super) fn start(
        file: File,
        path: PathBuf,
        end: u64,
        durable: watch::Sender<u64>,
    ) -> std::io::Result<Writer> {
        let (queue, requests) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("flotilla-log-stream-writer".into())
            .spawn(move || {
                run(
                    requests,
                    Appender {
                        file,
                        path,
                        end,
                        durable,
                        broken: None,
                    },
                )
            })?;
        Ok(Writer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues `append`; the order of calls is the order in the file.
    pub(super) fn append(&self, append: Append) -> Result<(), StoreError> {
        self.queue
            .as_ref()
            .and_then(|q| q.send(append).ok())
            .ok_or_else(|| StoreError::Unavailable("the log stream writer has stopped".into()))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written what was queued.
        self.queue.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("The log stream writer thread panicked.");
        }
    }
}

struct Appender {
    file: File,
    path: PathBuf,
    /// Where the next batch goes: everything below is synced.
    end: u64,
    durable: watch::Sender<u64>,
    /// Why the file takes no more writes, after a failed write or sync.
    broken: Option<String>,
}

fn run(requests: mpsc::Receiver<Append>, mut appender: Appender) {
    while let Ok(first) = requests.recv() {
        let mut size = first.bytes.len();
        let mut group = vec![first];
        while size < MAX_GROUP_BYTES {
            match requests.try_recv() {
                Ok(next) => {
                    size += next.bytes.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let result = appender.write(&group);
        for append in group {
            // A publish that stopped waiting does not care.
            let _ = append.done.send(result.clone());
        }
    }
}

impl Appender {
    fn write(&mut self, group: &[Append]) -> Result<(), StoreError> {
        if let Some(why) = &self.broken {
            return Err(StoreError::Unavailable(why.clone()));
        }
        let records: usize = group.iter().map(|a| a.bytes.len()).sum();
        let count: u32 = group.iter().map(|a| a.count).sum();
        let mut batch = format::batch_header(records as u64, count);
        batch.reserve(records);
        for append in group {
            batch.extend_from_slice(&append.bytes);
        }
        let written = self
            .file
            .write_all_at(&batch, self.end)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.end += batch.len() as u64;
                self.durable.send_replace(self.end);
                Ok(())
            }
            Err(e) => {
                // After a failed sync the kernel may have dropped the dirty pages, so what
                // the file holds is unknown: take no more writes until it is opened again
                // (which reads it back and drops a torn tail). Cutting off the partial batch
                // now is only a courtesy to that reader.
                let _ = self.file.set_len(self.end);
                let why = format!(
                    "writing the log stream file {} failed ({e}); it takes no more records \
                     until it is opened again",
                    self.path.display()
                );
                tracing::error!(file = %self.path.display(), error = %e, "Writing the log stream failed.");
                self.broken = Some(why.clone());
                Err(StoreError::Unavailable(why))
            }
        }
    }
}
