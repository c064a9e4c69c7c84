//! Proposal batching: many concurrent proposals share one log entry and one fsync per replica.
//!
//! openraft 0.9 writes each client request as its own entry and waits for that entry's fsync
//! before taking the next request, so without batching every proposal costs a full fsync on
//! the leader. Here proposals queue to one owned task, which packs whatever has accumulated
//! (up to [`MAX_BATCH_COMMANDS`] commands or [`MAX_BATCH_BYTES`]) into one entry, keeping up
//! to [`MAX_IN_FLIGHT`] entries in flight so the leader's disk stays busy while earlier entries
//! replicate. A lone proposal is sent at once: batching adds no delay, it only collects what
//! arrives while the previous entries are being written.

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::node::NodeError;
use crate::types::{NodeId, Raft, Request, decode, encode};

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

/// Starts the batching task for `raft`. It ends when every sender is dropped.
pub(crate) fn spawn(raft: Raft, node: NodeId) -> (mpsc::Sender<Proposal>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4 * MAX_BATCH_COMMANDS);
    let task = tokio::spawn(run(raft, rx, node));
    (tx, task)
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Proposal>, node: NodeId) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            next = rx.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(first) = next else { break };
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
                in_flight.push(write(raft.clone(), batch));
            }
        }
    }
    while in_flight.next().await.is_some() {}
    tracing::debug!(node, "Proposal batcher stopped.");
}

async fn write(raft: Raft, batch: Vec<Proposal>) {
    let commands: Vec<&[u8]> = batch.iter().map(|p| p.command.as_slice()).collect();
    let outcome = match encode(&commands) {
        Err(e) => Err(NodeError::Raft(e.to_string())),
        Ok(bytes) => match raft.client_write(Request(bytes)).await {
            Ok(written) => decode::<Vec<Vec<u8>>>(&written.data.0)
                .map(|responses| (written.log_id.index, responses))
                .map_err(|e| NodeError::Raft(e.to_string())),
            Err(e) => Err(write_error(e)),
        },
    };
    match outcome {
        Ok((index, responses)) => {
            for (p, r) in batch.into_iter().zip(responses) {
                let _ = p.reply.send(Ok((index, r)));
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
