//! The gRPC services a replica serves: `RaftService` to its peers, `AdminService` to operators
//! and to followers forwarding writes.

use std::collections::BTreeSet;

use flotilla_proto::raft::admin_service_server::AdminService;
use flotilla_proto::raft::raft_service_server::RaftService;
use flotilla_proto::raft::{
    AddLearnerRequest, ChangeMembershipRequest, ClusterMetrics, LinearizableReadReply,
    LinearizableReadRequest, Member, MetricsRequest, ProposeReply, ProposeRequest, RaftReply,
    RaftRequest, SnapshotChunk,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{BasicNode, Snapshot, Vote};
use serde::Serialize;
use tonic::{Request, Response, Status, Streaming};

use crate::types::{NodeId, Raft, SnapshotMeta, TypeConfig, decode, encode};

/// Metadata keys naming the leader on a "not the leader" answer.
pub const LEADER_ID_KEY: &str = "flotilla-leader-id";
/// See [`LEADER_ID_KEY`].
pub const LEADER_ADDR_KEY: &str = "flotilla-leader-addr";

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftReply>, Status> {
    let payload = encode(result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftReply { payload }))
}

fn bad_request(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable Raft message: {e}"))
}

/// Serves openraft's RPCs from peers.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub(crate) struct RaftGrpc {
    pub(crate) raft: Raft,
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let rpc: VoteRequest<NodeId> =
            decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        let mut stream = request.into_inner();
        let mut header: Option<(Vote<NodeId>, SnapshotMeta)> = None;
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if header.is_none() {
                header = Some(decode(&chunk.header).map_err(bad_request)?);
            }
            data.extend_from_slice(&chunk.data);
        }
        let (vote, meta) = header.ok_or_else(|| bad_request("snapshot stream had no header"))?;
        let snapshot = Snapshot {
            meta,
            snapshot: Box::new(data),
        };
        reply(&self.raft.install_full_snapshot(vote, snapshot).await)
    }
}

/// Serves membership changes, metrics and forwarded writes.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub(crate) struct AdminGrpc {
    pub(crate) raft: Raft,
    /// The leader batches forwarded proposals with its own.
    pub(crate) proposals: crate::batcher::Proposer,
}

/// The cluster as this replica sees it.
pub(crate) fn cluster_metrics(raft: &Raft) -> ClusterMetrics {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voter_ids: BTreeSet<NodeId> = membership.voter_ids().collect();
    let mut voters = Vec::new();
    let mut learners = Vec::new();
    for (id, node) in membership.nodes() {
        let member = Member {
            node_id: *id,
            addr: node.addr.clone(),
        };
        if voter_ids.contains(id) {
            voters.push(member);
        } else {
            learners.push(member);
        }
    }
    ClusterMetrics {
        node_id: m.id,
        state: format!("{:?}", m.state),
        current_term: m.current_term,
        leader_id: m.current_leader,
        last_log_index: m.last_log_index,
        last_applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        voters,
        learners,
    }
}

/// "Not the leader" as a gRPC status carrying the leader, when known.
pub(crate) fn not_leader(leader: Option<(NodeId, String)>) -> Status {
    let mut status = Status::failed_precondition(match &leader {
        Some((id, addr)) => format!("not the leader; the leader is node {id} at {addr}"),
        None => "not the leader, and no leader is known yet; retry shortly".to_owned(),
    });
    if let Some((id, addr)) = leader {
        let md = status.metadata_mut();
        if let Ok(v) = id.to_string().parse() {
            md.insert(LEADER_ID_KEY, v);
        }
        if let Ok(v) = addr.parse() {
            md.insert(LEADER_ADDR_KEY, v);
        }
    }
    status
}

fn leader_of(f: &openraft::error::ForwardToLeader<NodeId, BasicNode>) -> Option<(NodeId, String)> {
    Some((f.leader_id?, f.leader_node.as_ref()?.addr.clone()))
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(leader_of(&f)),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Status::failed_precondition(c.to_string())
        }
        RaftError::Fatal(f) => Status::unavailable(format!("this replica has stopped: {f}")),
    }
}

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn add_learner(
        &self,
        request: Request<AddLearnerRequest>,
    ) -> Result<Response<ClusterMetrics>, Status> {
        let req = request.into_inner();
        let member = req
            .member
            .ok_or_else(|| Status::invalid_argument("add_learner needs a member"))?;
        self.raft
            .add_learner(
                member.node_id,
                BasicNode { addr: member.addr },
                req.blocking,
            )
            .await
            .map_err(write_error)?;
        Ok(Response::new(cluster_metrics(&self.raft)))
    }

    async fn change_membership(
        &self,
        request: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ClusterMetrics>, Status> {
        let req = request.into_inner();
        if req.voters.is_empty() {
            return Err(Status::invalid_argument(
                "a cluster needs at least one voter",
            ));
        }
        let voters: BTreeSet<NodeId> = req.voters.into_iter().collect();
        self.raft
            .change_membership(voters, req.retain_as_learners)
            .await
            .map_err(write_error)?;
        Ok(Response::new(cluster_metrics(&self.raft)))
    }

    async fn metrics(
        &self,
        _request: Request<MetricsRequest>,
    ) -> Result<Response<ClusterMetrics>, Status> {
        Ok(Response::new(cluster_metrics(&self.raft)))
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeReply>, Status> {
        let command = request.into_inner().command;
        match self.proposals.submit(command).await {
            Ok((log_index, response)) => Ok(Response::new(ProposeReply {
                response,
                log_index,
            })),
            Err(crate::NodeError::ForwardToLeader {
                leader_id,
                leader_addr,
            }) => Err(not_leader(leader_id.zip(leader_addr))),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn linearizable_read(
        &self,
        _request: Request<LinearizableReadRequest>,
    ) -> Result<Response<LinearizableReadReply>, Status> {
        match self.raft.ensure_linearizable().await {
            Ok(read) => Ok(Response::new(LinearizableReadReply {
                read_index: read.map_or(0, |l| l.index),
            })),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(not_leader(leader_of(&f)))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}
