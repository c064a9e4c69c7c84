//! Early replication: the leader offers the entries it has just appended to its followers
//! while its own `fdatasync` is still running.
//!
//! openraft 0.9's core waits for the leader's append to be durable before it starts
//! replicating it, so a lone write costs the leader's sync and then a follower's, in series.
//! The Raft thesis (§10.2.1) lets the leader write its log in parallel with replicating it,
//! as etcd does; only counting itself towards a quorum must wait for its own sync, and
//! openraft still does that. Here the log store hands every batch the leader appends for
//! itself to this module, which sends it to each follower as an ordinary AppendEntries
//! request (the leader's vote, the previous entry's id, the entries) and ignores the answer.
//! A follower handles it exactly like one from openraft's replication: it checks the vote and
//! the previous entry, appends, syncs. When openraft's own request for the same entries
//! arrives a moment later, the follower already has them — durable, or being synced — and
//! answers as soon as they are, so the follower's sync overlaps the leader's.
//!
//! Safety holds because every request is one the leader could legitimately send (a stale or
//! reordered one is refused by the vote check or is a no-op on entries already present, as
//! for any AppendEntries), and commitment is still decided by openraft from its own
//! replication. One openraft 0.9 behaviour needs a guard: it restores a restarted leader in
//! its old term, free to reuse the log ids of entries it sent early and never synced; a
//! replica therefore steps down at start (`LogStore::step_down_if_leader`). Offers are
//! dropped, never queued without bound: a follower still busy with the previous offer simply
//! gets the entries from openraft's replication.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{BasicNode, Vote};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::network::Network;
use crate::types::{Entry, LogId, NodeId, Raft};

/// Offers waiting for each follower's sender, at most.
const OFFERS_PER_FOLLOWER: usize = 2;
/// Batches waiting for the fan-out task, at most.
const OFFERS_WAITING: usize = 64;

/// How early replication went: for benchmarks and tests.
#[derive(Debug, Default)]
pub struct EarlyStats {
    /// Batches offered by the log store (this replica's own appends as the leader).
    pub offered: AtomicU64,
    /// Requests sent to followers.
    pub sent: AtomicU64,
    /// Requests a follower accepted (appended, or already had the entries).
    pub accepted: AtomicU64,
}

/// Entries the leader has just appended, with what a follower needs to place them.
#[derive(Debug)]
pub(crate) struct Fresh {
    vote: Vote<NodeId>,
    prev: Option<LogId>,
    entries: Vec<Entry>,
}

/// The log store's end: offers fresh entries without waiting. Unset (the default) it does
/// nothing, as in the storage tests.
#[derive(Debug, Clone, Default)]
pub(crate) struct EarlyHook(Arc<OnceLock<Wired>>);

/// What a started hook offers to: this replica's id, the fan-out task, the counters.
type Wired = (NodeId, mpsc::Sender<Fresh>, Arc<EarlyStats>);

impl EarlyHook {
    /// Offers `entries`, appended after `prev` under `vote`, if they are this replica's own
    /// entries as the leader; drops them if the sender is behind.
    pub(crate) fn offer(
        &self,
        vote: Option<&Vote<NodeId>>,
        prev: Option<LogId>,
        entries: &[Entry],
    ) {
        let (Some((me, tx, stats)), Some(vote)) = (self.0.get(), vote) else {
            return;
        };
        let leader = vote.leader_id();
        let own = vote.is_committed()
            && leader.node_id == *me
            && !entries.is_empty()
            && entries.iter().all(|e| e.log_id.leader_id == *leader);
        if own {
            stats.offered.fetch_add(1, Ordering::Relaxed);
            let _ = tx.try_send(Fresh {
                vote: *vote,
                prev,
                entries: entries.to_vec(),
            });
        }
    }
}

/// Starts sending what `hook` is offered to the members of `raft`'s cluster other than `me`;
/// each request may take `timeout`. The task (and the per-follower senders it owns) ends when
/// its handle is aborted.
pub(crate) fn spawn(
    hook: &EarlyHook,
    me: NodeId,
    raft: Raft,
    mut network: Network,
    timeout: Duration,
    stats: Arc<EarlyStats>,
) -> JoinHandle<()> {
    let (tx, mut rx) = mpsc::channel::<Fresh>(OFFERS_WAITING);
    if hook.0.set((me, tx, stats.clone())).is_err() {
        tracing::warn!(
            node = me,
            "Early replication was already started for this log."
        );
    }
    tokio::spawn(async move {
        let mut followers: HashMap<NodeId, (String, mpsc::Sender<Arc<Fresh>>)> = HashMap::new();
        let mut senders = JoinSet::new();
        while let Some(fresh) = rx.recv().await {
            let fresh = Arc::new(fresh);
            let members: Vec<(NodeId, BasicNode)> = {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                m.membership_config
                    .nodes()
                    .filter(|(id, _)| **id != me)
                    .map(|(id, n)| (*id, n.clone()))
                    .collect()
            };
            followers.retain(|id, _| members.iter().any(|(m, _)| m == id));
            for (id, node) in members {
                let stale = followers
                    .get(&id)
                    .is_none_or(|(addr, _)| *addr != node.addr);
                if stale {
                    let (tx, rx) = mpsc::channel(OFFERS_PER_FOLLOWER);
                    let client = network.new_client(id, &node).await;
                    senders.spawn(send_to(client, rx, timeout, stats.clone()));
                    followers.insert(id, (node.addr.clone(), tx));
                }
                if let Some((_, tx)) = followers.get(&id) {
                    let _ = tx.try_send(fresh.clone());
                }
            }
            // Reap senders whose follower left (their channel closed).
            while senders.try_join_next().is_some() {}
        }
    })
}

/// One follower's sender: requests in order, one at a time; answers are not needed.
async fn send_to(
    mut client: crate::network::PeerClient,
    mut offers: mpsc::Receiver<Arc<Fresh>>,
    timeout: Duration,
    stats: Arc<EarlyStats>,
) {
    while let Some(fresh) = offers.recv().await {
        let request = AppendEntriesRequest {
            vote: fresh.vote,
            prev_log_id: fresh.prev,
            entries: fresh.entries.clone(),
            leader_commit: None,
        };
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let reply = client
            .append_entries(request, RPCOption::new(timeout))
            .await;
        if matches!(reply, Ok(AppendEntriesResponse::Success)) {
            stats.accepted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entries(term: u64, leader: NodeId, from: u64, n: u64) -> Vec<Entry> {
        (from..from + n)
            .map(|index| Entry {
                log_id: LogId::new(CommittedLeaderId::new(term, leader), index),
                payload: EntryPayload::Blank,
            })
            .collect()
    }

    /// Only a leader's own fresh entries leave early: a follower storing the leader's
    /// entries, a candidate, or a leader storing an older term's entries offers nothing.
    #[test]
    fn only_the_leaders_own_entries_under_its_committed_vote_are_offered() {
        let hook = EarlyHook::default();
        let (tx, mut rx) = mpsc::channel(8);
        let stats = Arc::new(EarlyStats::default());
        hook.0.set((1, tx, stats.clone())).unwrap();
        let prev = Some(LogId::new(CommittedLeaderId::new(2, 1), 9));

        // This replica (1) leads term 3 and appends its own entries: offered.
        let leading = Vote::new_committed(3, 1);
        hook.offer(Some(&leading), prev, &entries(3, 1, 10, 2));
        let fresh = rx.try_recv().expect("offered");
        assert_eq!(
            (fresh.vote, fresh.prev, fresh.entries.len()),
            (leading, prev, 2)
        );

        // A follower of 2, storing 2's entries.
        hook.offer(
            Some(&Vote::new_committed(3, 2)),
            prev,
            &entries(3, 2, 10, 2),
        );
        // A candidate: its vote for itself is not committed.
        hook.offer(Some(&Vote::new(4, 1)), prev, &entries(4, 1, 10, 1));
        // The leader of term 3 storing entries of term 2 (not what it appends as leader).
        hook.offer(Some(&leading), prev, &entries(2, 1, 10, 1));
        // No vote yet, or nothing to offer.
        hook.offer(None, prev, &entries(3, 1, 10, 1));
        hook.offer(Some(&leading), prev, &[]);
        assert!(rx.try_recv().is_err());
        assert_eq!(stats.offered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_unset_hook_offers_nothing_and_does_not_panic() {
        let hook = EarlyHook::default();
        hook.offer(Some(&Vote::new_committed(1, 1)), None, &entries(1, 1, 0, 1));
    }
}
