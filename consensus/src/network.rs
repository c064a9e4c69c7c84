//! The Raft network over tonic gRPC: how a replica reaches its peers.
//!
//! One HTTP/2 channel per peer, created lazily and shared by every replication stream to that
//! peer (the factory caches it), so there is one connection per pair of replicas however often
//! openraft restarts a stream. Each RPC carries openraft's deadline; a peer that cannot be
//! reached makes openraft back off exponentially (50 ms doubling to 2 s) instead of spinning.
//! Snapshots are streamed in 1 MiB chunks.
//!
//! [`Faults`] lets tests cut or slow individual directions between replicas, deterministically.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::raft::raft_service_client::RaftServiceClient;
use flotilla_proto::raft::{RaftRequest, SnapshotChunk};
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RPCTypes, Snapshot, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::node::describe;
use crate::tls::{self, TlsConfig};
use crate::types::{NodeId, TypeConfig, decode, encode};

/// Size of one snapshot chunk on the wire.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// What happens to traffic in one direction between two replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Messages are lost.
    Drop,
    /// Messages arrive this much later.
    Delay(Duration),
}

/// Fault rules per direction `(from, to)`, shared by every replica of a test cluster. A
/// request from `a` to `b` passes the `(a, b)` rule on the way out and its reply passes the
/// `(b, a)` rule on the way back, so one-way partitions behave as they do on a real network.
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<Mutex<BTreeMap<(NodeId, NodeId), Fault>>>);

impl Faults {
    /// Applies `fault` to messages from `from` to `to`.
    pub fn set(&self, from: NodeId, to: NodeId, fault: Fault) {
        self.rules().insert((from, to), fault);
    }

    /// Cuts `node` off from `others` in both directions.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        for &o in others {
            self.set(node, o, Fault::Drop);
            self.set(o, node, Fault::Drop);
        }
    }

    /// Removes every rule.
    pub fn heal(&self) {
        self.rules().clear();
    }

    fn get(&self, from: NodeId, to: NodeId) -> Option<Fault> {
        self.rules().get(&(from, to)).copied()
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, BTreeMap<(NodeId, NodeId), Fault>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Creates clients for peers; openraft calls it whenever it (re)starts replication.
#[derive(Debug, Clone)]
pub struct Network {
    me: NodeId,
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
    faults: Option<Faults>,
    tls: Option<Arc<TlsConfig>>,
}

impl Network {
    /// The network of replica `me`, optionally with injected faults.
    pub fn new(me: NodeId, faults: Option<Faults>) -> Self {
        Self {
            me,
            channels: Arc::default(),
            faults,
            tls: None,
        }
    }

    /// Dials peers over mutual TLS with this configuration (`None`: plaintext).
    pub fn with_tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls.map(Arc::new);
        self
    }

    /// The shared channel to `addr`, created on first use.
    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, String> {
        let key = (target, addr.to_owned());
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let channel = tls::endpoint(addr, self.tls.as_deref())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .connect_lazy();
        channels.insert(key, channel.clone());
        Ok(channel)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            me: self.me,
            target,
            client: self.channel(target, &node.addr).map(RaftServiceClient::new),
            faults: self.faults.clone(),
        }
    }
}

/// The connection to one peer.
#[derive(Debug)]
pub struct PeerClient {
    me: NodeId,
    target: NodeId,
    client: Result<RaftServiceClient<Channel>, String>,
    faults: Option<Faults>,
}

/// Why a call did not produce the peer's answer.
enum CallError {
    /// Could not talk to the peer at all: back off.
    Unreachable(String),
    /// The exchange failed part-way: retry.
    Network(String),
    /// The deadline passed.
    Timeout,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

impl PeerClient {
    /// Applies the fault rule for one direction: `Err` when the message is lost.
    async fn pass(&self, from: NodeId, to: NodeId) -> Result<(), CallError> {
        match self.faults.as_ref().and_then(|f| f.get(from, to)) {
            Some(Fault::Drop) => Err(CallError::Unreachable(format!(
                "fault injected: messages from {from} to {to} are dropped"
            ))),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Sends an encoded request with `send`, within `ttl`, through the fault rules.
    async fn call<F, Fut>(&mut self, ttl: Duration, send: F) -> Result<Vec<u8>, CallError>
    where
        F: FnOnce(RaftServiceClient<Channel>) -> Fut,
        Fut: Future<
            Output = Result<tonic::Response<flotilla_proto::raft::RaftReply>, tonic::Status>,
        >,
    {
        let client = self.client.clone().map_err(CallError::Unreachable)?;
        let (me, target) = (self.me, self.target);
        let exchange = async {
            self.pass(me, target).await?;
            let reply = send(client).await.map_err(|status| match status.code() {
                tonic::Code::Unavailable => CallError::Unreachable(describe(&status)),
                tonic::Code::DeadlineExceeded => CallError::Timeout,
                _ => CallError::Network(format!("{}: {}", status.code(), describe(&status))),
            })?;
            self.pass(target, me).await?;
            Ok(reply.into_inner().payload)
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        e: CallError,
        action: RPCTypes,
        ttl: Duration,
    ) -> RPCError<NodeId, BasicNode, E> {
        match e {
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&Message(m))),
            CallError::Network(m) => RPCError::Network(NetworkError::new(&Message(m))),
            CallError::Timeout => RPCError::Timeout(Timeout {
                action,
                id: self.me,
                target: self.target,
                timeout: ttl,
            }),
        }
    }

    /// A unary Raft RPC: encode, send, decode the peer's `Result`.
    async fn unary<Req, Resp, E, F, Fut>(
        &mut self,
        request: &Req,
        option: &RPCOption,
        action: RPCTypes,
        send: F,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftServiceClient<Channel>, tonic::Request<RaftRequest>) -> Fut,
        Fut: Future<
            Output = Result<tonic::Response<flotilla_proto::raft::RaftReply>, tonic::Status>,
        >,
    {
        let ttl = option.hard_ttl();
        let payload = encode(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut req = tonic::Request::new(RaftRequest { payload });
        req.set_timeout(ttl);
        let bytes = self
            .call(ttl, |client| send(client, req))
            .await
            .map_err(|e| self.rpc_error(e, action, ttl))?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.unary(
            &rpc,
            &option,
            RPCTypes::AppendEntries,
            |mut c, r| async move { c.append_entries(r).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.unary(&rpc, &option, RPCTypes::Vote, |mut c, r| async move {
            c.vote(r).await
        })
        .await
    }

    /// Chunked snapshots are not used: with `generic-snapshot-data`, openraft sends whole
    /// snapshots through [`RaftNetwork::full_snapshot`]. Answer clearly if it ever asks.
    #[allow(deprecated)]
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(RPCError::Network(NetworkError::new(&Message(
            "chunked snapshot install is not supported; snapshots are streamed whole".into(),
        ))))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let ttl = option.hard_ttl().max(Duration::from_secs(30));
        let header = encode(&(vote, &snapshot.meta))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let data = *snapshot.snapshot;
        let mut chunks: Vec<SnapshotChunk> = data
            .chunks(SNAPSHOT_CHUNK_BYTES)
            .map(|c| SnapshotChunk {
                header: Vec::new(),
                data: c.to_vec(),
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(SnapshotChunk::default());
        }
        chunks[0].header = header;
        let stream = tokio_stream::iter(chunks);
        let send = self.call(ttl, |mut c| async move { c.install_snapshot(stream).await });
        let bytes = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = send => r,
        }
        .map_err(|e| match e {
            CallError::Unreachable(m) => StreamingError::Unreachable(Unreachable::new(&Message(m))),
            CallError::Network(m) => StreamingError::Network(NetworkError::new(&Message(m))),
            CallError::Timeout => StreamingError::Timeout(Timeout {
                action: RPCTypes::InstallSnapshot,
                id: self.me,
                target: self.target,
                timeout: ttl,
            }),
        })?;
        let result: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            decode(&bytes).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }

    fn backoff(&self) -> Backoff {
        let mut delay = Duration::from_millis(50);
        Backoff::new(std::iter::from_fn(move || {
            let d = delay;
            delay = (delay * 2).min(Duration::from_secs(2));
            Some(d)
        }))
    }
}
