//! Proposal batching: many concurrent proposals share one log entry and one fsync per replica.
//!
//! openraft 0.9 writes each client request as its own entry and waits for that entry's fsync
//! before taking the next request, so without batching every proposal costs a full fsync on
//! the leader. Up to [`MAX_IN_FLIGHT`] entries are written at once, so the leader's disk stays
//! busy while earlier entries replicate.
//!
//! A proposal that finds a free slot and nobody queued ahead of it is written at once, from
//! the proposer's own task: no hand-off to another task and back, which is most of what a lone
//! client waits for besides the two fsyncs. Otherwise it queues to one owned task, which waits
//! for a slot and packs whatever has accumulated meanwhile (up to [`MAX_BATCH_COMMANDS`]
//! commands or [`MAX_BATCH_BYTES`]) into one entry. Batching adds no delay; it only collects
//! what arrives while earlier entries are being written.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::node::NodeError;
use crate::types::{ByteStr, NodeId, Raft, Request, decode_borrowed, encode};

/// Most commands in one log entry.
pub(crate) const MAX_BATCH_COMMANDS: usize = 1024;
/// Most command bytes in one log entry.
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;
/// Most batches being written at once.
pub(crate) const MAX_IN_FLIGHT: usize = 4;

/// What a proposal resolves to: the index of the entry that carried it, and the encoded
/// response of the state machine.
pub(crate) type Outcome = Result<(u64, Vec<u8>), NodeError>;

/// One encoded command waiting to be proposed.
pub(crate) struct Proposal {
    pub(crate) command: Vec<u8>,
    pub(crate) reply: oneshot::Sender<Outcome>,
}

/// Where proposals go: cheap to clone, shared by the node and its admin service.
#[derive(Clone)]
pub(crate) struct Proposer {
    raft: Raft,
    queue: mpsc::Sender<Proposal>,
    /// One permit per batch being written, held by whoever writes it.
    slots: Arc<Semaphore>,
}

impl Proposer {
    /// Proposes one encoded command and waits for its outcome.
    pub(crate) async fn submit(&self, command: Vec<u8>) -> Outcome {
        // Nothing queued (so nobody is overtaken) and a free slot: write it here and now.
        if self.queue.capacity() == self.queue.max_capacity()
            && let Ok(slot) = self.slots.clone().try_acquire_owned()
        {
            let (reply, outcome) = oneshot::channel();
            write(self.raft.clone(), vec![Proposal { command, reply }], slot).await;
            return outcome.await.unwrap_or_else(|_| Err(stopped()));
        }
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(Proposal { command, reply })
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

fn stopped() -> NodeError {
    NodeError::Raft("this replica is shutting down".into())
}

/// Starts the batching task for `raft`. It ends when every [`Proposer`] is dropped.
pub(crate) fn spawn(raft: Raft, node: NodeId) -> (Proposer, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let task = tokio::spawn(run(raft.clone(), rx, slots.clone(), node));
    let proposer = Proposer {
        raft,
        queue: tx,
        slots,
    };
    (proposer, task)
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Proposal>, slots: Arc<Semaphore>, node: NodeId) {
    let mut in_flight = FuturesUnordered::new();
    // The oldest queued proposal, waiting for a free slot.
    let mut waiting: Option<Proposal> = None;
    loop {
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            next = rx.recv(), if waiting.is_none() => {
                let Some(first) = next else { break };
                waiting = Some(first);
            }
            slot = slots.clone().acquire_owned(), if waiting.is_some() => {
                let Ok(slot) = slot else { break };
                let Some(first) = waiting.take() else { continue };
                let mut bytes = first.command.len();
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(p) => {
                            bytes += p.command.len();
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                in_flight.push(write(raft.clone(), batch, slot));
            }
        }
    }
    while in_flight.next().await.is_some() {}
    tracing::debug!(node, "Proposal batcher stopped.");
}

/// Writes `batch` as one entry and answers each proposal; `slot` is released when done.
async fn write(raft: Raft, batch: Vec<Proposal>, slot: OwnedSemaphorePermit) {
    let commands: Vec<ByteStr<'_>> = batch.iter().map(|p| ByteStr(&p.command)).collect();
    let outcome = match encode(&commands) {
        Err(e) => Err(NodeError::Raft(e.to_string())),
        Ok(bytes) => match raft.client_write(Request(Bytes::from(bytes))).await {
            Ok(written) => Ok(written),
            Err(e) => Err(write_error(e)),
        },
    };
    drop(slot);
    let responses = outcome.and_then(|written| {
        decode_borrowed::<Vec<&[u8]>>(&written.data.0)
            .map(|responses| {
                let index = written.log_id.index;
                responses
                    .into_iter()
                    .map(|r| (index, r.to_vec()))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| NodeError::Raft(e.to_string()))
    });
    match responses {
        Ok(responses) => {
            for (p, r) in batch.into_iter().zip(responses) {
                let _ = p.reply.send(Ok(r));
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

/// openraft's write error as a [`NodeError`], keeping the leader hint.
pub(crate) fn write_error(
    e: RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>,
) -> NodeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => NodeError::ForwardToLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
        },
        other => NodeError::Raft(other.to_string()),
    }
}
