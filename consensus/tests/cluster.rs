//! Raft clusters of real replicas: gRPC over loopback, Raft data (log file and redb) in temporary directories.
//!
//! These tests measure real elapsed time across real replicas (a new leader within 2 s), so
//! they read the wall clock, which the project otherwise bans.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flotilla_consensus::kv::{KvCommand, KvStore};
use flotilla_consensus::network::{Fault, Faults};
use flotilla_consensus::{Node, NodeConfig, NodeError, NodeId, join_cluster};
use tokio::net::TcpListener;

type KvNode = Arc<Node<KvStore>>;

struct Cluster {
    dirs: BTreeMap<NodeId, tempfile::TempDir>,
    addrs: BTreeMap<NodeId, String>,
    nodes: BTreeMap<NodeId, KvNode>,
    faults: Faults,
    snapshot_after: u64,
}

fn put(key: impl Into<String>, value: &str) -> KvCommand {
    KvCommand::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

fn voters_of(node: &KvNode) -> BTreeSet<NodeId> {
    node.metrics()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

impl Cluster {
    /// Starts `n` replicas (ids 1..=n) and forms one cluster of them.
    async fn start(n: u64) -> Self {
        Self::start_with(n, 10_000).await
    }

    async fn start_with(n: u64, snapshot_after: u64) -> Self {
        let mut c = Cluster {
            dirs: BTreeMap::new(),
            addrs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            faults: Faults::default(),
            snapshot_after,
        };
        for id in 1..=n {
            c.dirs.insert(id, tempfile::tempdir().unwrap());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            c.addrs
                .insert(id, listener.local_addr().unwrap().to_string());
            c.launch(id, listener).await;
        }
        c.nodes[&1].bootstrap(c.addrs.clone()).await.unwrap();
        c.leader(Duration::from_secs(5)).await;
        c
    }

    fn config(&self, id: NodeId) -> NodeConfig {
        let mut cfg = NodeConfig::new(id, self.dirs[&id].path(), self.addrs[&id].clone());
        cfg.heartbeat_interval = Duration::from_millis(50);
        cfg.election_timeout = Duration::from_millis(250);
        cfg.snapshot_after_entries = self.snapshot_after;
        cfg.keep_entries_behind_snapshot = 10;
        cfg.faults = Some(self.faults.clone());
        cfg
    }

    async fn launch(&mut self, id: NodeId, listener: TcpListener) {
        let node = Node::start(self.config(id), listener, KvStore::default())
            .await
            .unwrap();
        self.nodes.insert(id, Arc::new(node));
    }

    /// Restarts a stopped replica from its data directory, at its old address.
    async fn restart(&mut self, id: NodeId) {
        let listener = TcpListener::bind(&self.addrs[&id]).await.unwrap();
        self.launch(id, listener).await;
    }

    /// Waits until every live replica agrees on one leader; returns it.
    async fn leader(&self, timeout: Duration) -> NodeId {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: BTreeSet<Option<NodeId>> = self
                .nodes
                .values()
                .map(|n| n.metrics().current_leader)
                .collect();
            if let [Some(l)] = leaders.iter().collect::<Vec<_>>()[..]
                && self.nodes.contains_key(l)
            {
                return *l;
            }
            assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every live replica has applied the same last index, then returns the
    /// states for comparison.
    async fn converged(&self, timeout: Duration) -> Vec<KvStore> {
        let deadline = Instant::now() + timeout;
        loop {
            let applied: BTreeSet<Option<u64>> = self
                .nodes
                .values()
                .map(|n| n.metrics().last_applied.map(|l| l.index))
                .collect();
            let logged: BTreeSet<Option<u64>> = self
                .nodes
                .values()
                .map(|n| n.metrics().last_log_index)
                .collect();
            if applied.len() == 1 && applied == logged {
                return self.nodes.values().map(|n| n.read(Clone::clone)).collect();
            }
            assert!(
                Instant::now() < deadline,
                "replicas did not converge: applied {applied:?}, logged {logged:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop_all(&self) {
        for n in self.nodes.values() {
            n.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_elect_replicate_ten_thousand_commands_and_agree() {
    let c = Cluster::start(3).await;
    let leader = c.nodes[&c.leader(Duration::from_secs(5)).await].clone();
    // 10,000 commands from 50 concurrent clients.
    let mut clients = Vec::new();
    for client in 0..50 {
        let leader = leader.clone();
        clients.push(tokio::spawn(async move {
            for i in 0..200 {
                leader
                    .propose(put(format!("k{client}-{i}"), "v"))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in clients {
        t.await.unwrap();
    }
    let states = c.converged(Duration::from_secs(10)).await;
    eprintln!("leader log: {:?} (fsyncs, entries)", leader.log_batching());
    assert_eq!(states[0].map.len(), 10_000);
    assert_eq!(states[0].applied, 10_000);
    assert!(states.iter().all(|s| s == &states[0]), "replicas differ");
    // 50 clients with at most 4 batches in flight: proposals must share entries and fsyncs.
    let (fsyncs, entries) = leader.log_batching();
    assert!(
        fsyncs * 2 < 10_000,
        "{fsyncs} leader fsyncs ({entries} entries) for 10,000 proposals"
    );
    // The leader sent fresh entries to followers while its own sync ran, and they took them.
    let early = leader.early_stats();
    let (offered, accepted) = (
        early.offered.load(Ordering::Relaxed),
        early.accepted.load(Ordering::Relaxed),
    );
    assert!(
        offered > 0 && accepted > 0,
        "early replication: {offered} batches offered, {accepted} requests accepted"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_forward_proposals_and_reads_are_linearizable_on_the_leader() {
    let c = Cluster::start(3).await;
    let leader_id = c.leader(Duration::from_secs(5)).await;
    let follower = c.nodes.values().find(|n| n.id() != leader_id).unwrap();
    match follower.propose(put("direct", "x")).await {
        Err(NodeError::ForwardToLeader {
            leader_id: Some(l),
            leader_addr: Some(addr),
        }) => {
            assert_eq!(l, leader_id);
            assert_eq!(addr, c.addrs[&leader_id]);
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    let r = follower
        .propose_via_leader(put("forwarded", "y"), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(r.index > 0);
    let seen = c.nodes[&leader_id]
        .linearizable_read(|s| s.map.get("forwarded").cloned())
        .await
        .unwrap();
    assert_eq!(seen, Some(b"y".to_vec()));
    assert!(matches!(
        follower.linearizable_read(|_| ()).await,
        Err(NodeError::ForwardToLeader { .. })
    ));
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_loses_no_acknowledged_write_and_writes_resume_within_two_seconds() {
    let mut c = Cluster::start(3).await;
    let old_leader = c.leader(Duration::from_secs(5)).await;
    let mut acked = Vec::new();
    let mut crashed_at = None;
    let mut resumed_after = None;
    for i in 0..400u32 {
        if i == 150 {
            c.nodes[&old_leader].crash().await;
            c.nodes.remove(&old_leader);
            crashed_at = Some(Instant::now());
        }
        // The client talks to any live replica; it forwards to the leader.
        let via = c
            .nodes
            .values()
            .nth(i as usize % c.nodes.len())
            .unwrap()
            .clone();
        let key = format!("w{i}");
        if via
            .propose_via_leader(put(key.clone(), "v"), Duration::from_secs(5))
            .await
            .is_ok()
        {
            acked.push(key);
            if let (Some(t), None) = (crashed_at, resumed_after) {
                resumed_after = Some(t.elapsed());
            }
        }
    }
    let resumed_after = resumed_after.expect("writes resumed after the crash");
    assert!(
        resumed_after < Duration::from_secs(2),
        "writes resumed only after {resumed_after:?}"
    );
    assert_ne!(c.leader(Duration::from_secs(5)).await, old_leader);
    let states = c.converged(Duration::from_secs(10)).await;
    for state in &states {
        for key in &acked {
            assert!(state.map.contains_key(key), "acknowledged {key} is missing");
        }
    }
    assert!(
        acked.len() >= 390,
        "only {} of 400 writes acknowledged",
        acked.len()
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_member_catches_up_from_its_data_directory() {
    let mut c = Cluster::start(3).await;
    let leader = c.leader(Duration::from_secs(5)).await;
    let follower = *c.nodes.keys().find(|&&id| id != leader).unwrap();
    for i in 0..50 {
        c.nodes[&leader]
            .propose(put(format!("a{i}"), "1"))
            .await
            .unwrap();
    }
    c.converged(Duration::from_secs(5)).await;
    c.nodes[&follower].shutdown().await;
    c.nodes.remove(&follower);
    for i in 0..50 {
        c.nodes[&leader]
            .propose(put(format!("b{i}"), "2"))
            .await
            .unwrap();
    }
    c.restart(follower).await;
    let states = c.converged(Duration::from_secs(10)).await;
    assert!(states.iter().all(|s| s == &states[0]));
    assert_eq!(states[0].map.len(), 100);
    c.stop_all().await;
}

/// With early replication, followers may hold entries a crashed leader never synced; a
/// leader restarted from its data must not lead the same term again (openraft 0.9 would
/// restore it as leader of that term and could reuse those log ids for other entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_campaigns_in_a_new_term_and_keeps_every_write() {
    let mut c = Cluster::start(3).await;
    let leader = c.leader(Duration::from_secs(5)).await;
    for i in 0..30 {
        c.nodes[&leader]
            .propose(put(format!("a{i}"), "1"))
            .await
            .unwrap();
    }
    let term = c.nodes[&leader].metrics().current_term;
    // Every replica down at once (the others' votes stay with the old leader), then back.
    let ids: Vec<NodeId> = c.nodes.keys().copied().collect();
    for id in &ids {
        c.nodes[id].crash().await;
    }
    c.nodes.clear();
    for id in &ids {
        c.restart(*id).await;
    }
    let new_leader = c.leader(Duration::from_secs(10)).await;
    let new_term = c.nodes[&new_leader].metrics().current_term;
    assert!(
        new_term > term,
        "the cluster came back in term {new_term}, the term it was led in before ({term})"
    );
    c.nodes[&new_leader]
        .propose(put("after", "2"))
        .await
        .unwrap();
    let states = c.converged(Duration::from_secs(10)).await;
    assert!(states.iter().all(|s| s == &states[0]));
    assert_eq!(states[0].map.len(), 31);
    c.stop_all().await;
}

/// Regression for openraft#1246: a lone member restarted must re-apply every committed entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_single_member_cluster_reapplies_every_committed_entry() {
    let mut c = Cluster::start(1).await;
    for i in 0..100 {
        c.nodes[&1]
            .propose(put(format!("k{i}"), "v"))
            .await
            .unwrap();
    }
    let before = c.nodes[&1].read(Clone::clone);
    c.nodes[&1].shutdown().await;
    c.nodes.remove(&1);
    c.restart(1).await;
    let node = c.nodes[&1].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.read(|s| s.applied) < 100 {
        assert!(
            Instant::now() < deadline,
            "only {} of 100 entries re-applied",
            node.read(|s| s.applied)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.read(Clone::clone), before);
    // And it still takes writes as leader of itself.
    node.propose(put("after", "restart")).await.unwrap();
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_cut_off_cannot_commit_alone_and_converges_after_healing() {
    let mut c = Cluster::start(3).await;
    let old = c.leader(Duration::from_secs(5)).await;
    c.nodes[&old].propose(put("before", "1")).await.unwrap();
    let others: Vec<NodeId> = c.nodes.keys().copied().filter(|&id| id != old).collect();
    c.faults.isolate(old, &others);

    // The cut-off leader cannot commit: it never gets a majority.
    let lone = tokio::time::timeout(
        Duration::from_millis(1500),
        c.nodes[&old].propose(put("lonely", "x")),
    )
    .await;
    assert!(
        !matches!(lone, Ok(Ok(_))),
        "an isolated replica committed a write: {lone:?}"
    );

    // The majority side elects a leader of its own and keeps working.
    let majority = c.nodes[&others[0]].clone();
    majority
        .propose_via_leader(put("majority", "2"), Duration::from_secs(5))
        .await
        .unwrap();

    c.faults.heal();
    let new_leader = c.leader(Duration::from_secs(5)).await;
    assert_ne!(new_leader, old);
    let states = c.converged(Duration::from_secs(10)).await;
    assert!(states.iter().all(|s| s == &states[0]));
    assert!(states[0].map.contains_key("before") && states[0].map.contains_key("majority"));
    assert!(
        !states[0].map.contains_key("lonely"),
        "the isolated write survived"
    );
    drop(c.nodes.remove(&old));
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_way_partition_is_survived() {
    let c = Cluster::start(3).await;
    let leader = c.leader(Duration::from_secs(5)).await;
    let follower = *c.nodes.keys().find(|&&id| id != leader).unwrap();
    // The follower's replies to the leader are delayed: the leader still hears from the third
    // replica, so it keeps committing.
    c.faults
        .set(follower, leader, Fault::Delay(Duration::from_millis(300)));
    for i in 0..20 {
        c.nodes[&leader]
            .propose(put(format!("d{i}"), "v"))
            .await
            .unwrap();
    }
    c.faults.heal();
    let states = c.converged(Duration::from_secs(10)).await;
    assert!(states.iter().all(|s| s.map.len() == 20));
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_far_behind_is_brought_back_by_snapshot() {
    let c = Cluster::start_with(3, 100).await;
    let leader = c.leader(Duration::from_secs(5)).await;
    let lagging = *c.nodes.keys().find(|&&id| id != leader).unwrap();
    let others: Vec<NodeId> = c
        .nodes
        .keys()
        .copied()
        .filter(|&id| id != lagging)
        .collect();
    c.faults.isolate(lagging, &others);
    for i in 0..500 {
        c.nodes[&leader]
            .propose(put(format!("s{i}"), "v"))
            .await
            .unwrap();
    }
    // The leader has snapshotted and purged the log the lagging replica would need.
    let deadline = Instant::now() + Duration::from_secs(5);
    let behind = c.nodes[&lagging].metrics().last_log_index.unwrap_or(0);
    loop {
        let purged = c.nodes[&leader].metrics().purged.map_or(0, |p| p.index);
        if purged > behind {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leader never purged past {behind} (purged {purged})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.faults.heal();
    let states = c.converged(Duration::from_secs(10)).await;
    assert!(states.iter().all(|s| s == &states[0]));
    assert_eq!(states[0].map.len(), 500);
    let snap = c.nodes[&lagging].metrics().snapshot.map_or(0, |s| s.index);
    assert!(
        snap > behind,
        "the lagging replica has no snapshot past {behind}"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_member_joins_through_any_replica_and_a_member_can_be_removed() {
    let mut c = Cluster::start(2).await;
    let leader = c.leader(Duration::from_secs(5)).await;
    let follower = *c.nodes.keys().find(|&&id| id != leader).unwrap();
    c.nodes[&leader].propose(put("x", "1")).await.unwrap();

    // Node 3 joins by asking the follower, which points it at the leader.
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    c.dirs.insert(3, dir);
    c.addrs.insert(3, addr.clone());
    c.launch(3, listener).await;
    join_cluster(&c.addrs[&follower], 3, &addr, Duration::from_secs(10))
        .await
        .unwrap();
    let voters = voters_of(&c.nodes[&leader]);
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));
    let states = c.converged(Duration::from_secs(10)).await;
    assert_eq!(states[2].map.get("x"), Some(&b"1".to_vec()));

    // Remove the follower.
    c.nodes[&leader]
        .change_membership(BTreeSet::from([leader, 3]), false)
        .await
        .unwrap();
    let voters = voters_of(&c.nodes[&leader]);
    assert_eq!(voters, BTreeSet::from([leader, 3]));
    c.stop_all().await;
}
