//! A replica: openraft with Flotilla's storage, network and services, behind a typed API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::raft::admin_service_client::AdminServiceClient;
use flotilla_proto::raft::admin_service_server::AdminServiceServer;
use flotilla_proto::raft::raft_service_server::RaftServiceServer;
use flotilla_proto::raft::{AddLearnerRequest, ChangeMembershipRequest, Member, ProposeRequest};
use openraft::error::RaftError;
use openraft::{BasicNode, RaftMetrics, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::batcher::{self, Proposer};
use crate::early;
use crate::network::{Faults, Network};
use crate::server::{AdminGrpc, LEADER_ADDR_KEY, LEADER_ID_KEY, RaftGrpc};
use crate::store::{self, LogStats};
use crate::tls::{self, TlsConfig};
use crate::types::{NodeId, Raft, StateMachine, decode, encode};

/// How a replica runs. Defaults suit a production federator on a LAN.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This replica's id, unique and stable for its data directory's lifetime.
    pub node_id: NodeId,
    /// Where the replica keeps its Raft data (`raft.wal`, `snapshot.bin`).
    pub data_dir: PathBuf,
    /// The `host:port` peers and clients use to reach this replica's gRPC server.
    pub advertise_addr: String,
    /// How often the leader heartbeats.
    pub heartbeat_interval: Duration,
    /// The shortest election timeout; see [`NodeConfig::election_timeouts`].
    pub election_timeout: Duration,
    /// Take a snapshot after this many entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers catch up from
    /// the log rather than a whole snapshot.
    pub keep_entries_behind_snapshot: u64,
    /// Faults to inject into this replica's outgoing traffic (tests only).
    pub faults: Option<Faults>,
    /// Whether the leader sends freshly appended entries to followers while its own sync runs
    /// (see the `early` module); on by default. Off, a write waits for the leader's sync and
    /// then a follower's, in series.
    pub early_replication: bool,
    /// Mutual TLS for everything this replica serves and dials (peers, forwarded proposals);
    /// `None` (the default) is plaintext. Every replica of a cluster must agree. See
    /// [`TlsConfig`] for what the certificates must carry.
    pub tls: Option<TlsConfig>,
}

impl NodeConfig {
    /// A configuration with production defaults.
    pub fn new(
        node_id: NodeId,
        data_dir: impl Into<PathBuf>,
        advertise_addr: impl Into<String>,
    ) -> Self {
        Self {
            node_id,
            data_dir: data_dir.into(),
            advertise_addr: advertise_addr.into(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(500),
            snapshot_after_entries: 10_000,
            keep_entries_behind_snapshot: 1_000,
            faults: None,
            early_replication: true,
            tls: None,
        }
    }

    /// The election timeout range `[min, max)` in milliseconds for this replica.
    ///
    /// openraft 0.9 draws a replica's election timeout once per process and reuses it for
    /// every election (fixed upstream only in 0.10, openraft#1838). Two survivors whose
    /// timeouts happen to be close can then split the vote again and again after losing the
    /// leader. To rule that out, each replica draws from its own band, chosen by its id:
    /// bands are 100 ms wide and 150 ms apart, so survivors' timeouts differ by at least
    /// 50 ms — far more than a round trip — and the first to time out wins. Ids that are
    /// equal modulo 4 share a band; clusters of up to four voters never collide.
    pub fn election_timeouts(&self) -> (u64, u64) {
        let base = self.election_timeout.as_millis() as u64;
        let slot = self.node_id % 4;
        let min = base + slot * 150;
        (min, min + 100)
    }

    fn raft_config(&self) -> Result<openraft::Config, NodeError> {
        let (min, max) = self.election_timeouts();
        let heartbeat = self.heartbeat_interval.as_millis() as u64;
        if heartbeat * 3 > min {
            return Err(NodeError::Config(format!(
                "heartbeat interval {heartbeat} ms is too long for an election timeout of {min} ms; keep it under a third"
            )));
        }
        openraft::Config {
            cluster_name: "flotilla".into(),
            heartbeat_interval: heartbeat,
            election_timeout_min: min,
            election_timeout_max: max,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.keep_entries_behind_snapshot,
            max_payload_entries: 1024,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Config(e.to_string()))
    }
}

/// Why a replica could not start or do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    /// The configuration is unusable.
    #[error("invalid consensus configuration: {0}")]
    Config(String),
    /// The data directory could not be opened or read.
    #[error("cannot open the Raft data in the data directory: {0}")]
    Storage(String),
    /// The cluster refused or failed the operation.
    #[error("{0}")]
    Raft(String),
    /// A write or read must go to the leader.
    #[error("not the leader{}", match .leader_addr { Some(a) => format!("; the leader is at {a}"), None => "; no leader is known yet".into() })]
    ForwardToLeader {
        /// The leader's id, when known.
        leader_id: Option<NodeId>,
        /// The leader's address, when known.
        leader_addr: Option<String>,
    },
    /// The operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl NodeError {
    /// Whether trying again (possibly elsewhere) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            NodeError::ForwardToLeader { .. } | NodeError::Timeout(_)
        )
    }
}

fn forward(f: &openraft::error::ForwardToLeader<NodeId, BasicNode>) -> NodeError {
    NodeError::ForwardToLeader {
        leader_id: f.leader_id,
        leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
    }
}

/// One replica. Dropping it without [`Node::shutdown`] leaves its tasks running until the
/// runtime ends; tests that simulate a crash call [`Node::crash`].
pub struct Node<S: StateMachine> {
    config: NodeConfig,
    raft: Raft,
    app: Arc<Mutex<S>>,
    log_stats: Arc<LogStats>,
    storage_closed: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    proposals: Proposer,
    early_stats: Arc<early::EarlyStats>,
    /// The proposal batcher and the early-replication sender.
    background: Mutex<Vec<JoinHandle<()>>>,
    /// One lazily-connected channel per leader address, for forwarded proposals.
    leader_channels: Mutex<BTreeMap<String, tonic::transport::Channel>>,
    server: Mutex<Option<JoinHandle<()>>>,
    stop_server: Mutex<Option<oneshot::Sender<()>>>,
}

impl<S: StateMachine> std::fmt::Debug for Node<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.config.node_id)
            .field("addr", &self.config.advertise_addr)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> Node<S> {
    /// Opens the replica's data (restoring `app` from its snapshot and log) and serves the Raft
    /// and admin services on `listener`. A new replica joins nothing until [`Node::bootstrap`]
    /// or a leader adds it.
    pub async fn start(
        config: NodeConfig,
        listener: TcpListener,
        app: S,
    ) -> Result<Self, NodeError> {
        let raft_config = Arc::new(config.raft_config()?);
        if let Some(tls) = &config.tls {
            tls.validate()
                .map_err(|e| NodeError::Config(e.to_string()))?;
        }
        let stores =
            store::open(&config.data_dir, app).map_err(|e| NodeError::Storage(e.to_string()))?;
        let log_stats = stores.log.stats();
        let early_hook = stores.log.early_hook();
        if config.early_replication {
            stores
                .log
                .step_down_if_leader(config.node_id)
                .await
                .map_err(|e| NodeError::Storage(e.to_string()))?;
        }
        let network =
            Network::new(config.node_id, config.faults.clone()).with_tls(config.tls.clone());
        let raft = Raft::new(
            config.node_id,
            raft_config,
            network.clone(),
            stores.log,
            stores.state_machine,
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;

        let (proposals, batcher) = batcher::spawn(raft.clone(), config.node_id);
        let mut background = vec![batcher];
        let early_stats = Arc::new(early::EarlyStats::default());
        if config.early_replication {
            background.push(early::spawn(
                &early_hook,
                config.node_id,
                raft.clone(),
                network,
                config.election_timeout,
                early_stats.clone(),
            ));
        }
        let (stop_server, stopped) = oneshot::channel::<()>();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &config.tls {
            server = server
                .tls_config(tls.server())
                .map_err(|e| NodeError::Config(format!("unusable TLS configuration: {e}")))?;
        }
        let router = server
            .tcp_nodelay(true)
            .add_service(
                RaftServiceServer::new(RaftGrpc { raft: raft.clone() })
                    .max_decoding_message_size(64 << 20),
            )
            .add_service(AdminServiceServer::new(AdminGrpc {
                raft: raft.clone(),
                proposals: proposals.clone(),
            }));
        // Raft messages are small and latency-bound: no Nagle delay on accepted connections
        // (the builder's own nodelay setting applies only to listeners tonic binds itself).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let id = config.node_id;
        let server = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                tracing::error!(node = id, error = %e, "Raft gRPC server failed.");
            }
        });
        Ok(Self {
            config,
            raft,
            app: stores.app,
            log_stats,
            storage_closed: tokio::sync::Mutex::new(Some(stores.closed)),
            proposals,
            background: Mutex::new(background),
            early_stats,
            leader_channels: Mutex::default(),
            server: Mutex::new(Some(server)),
            stop_server: Mutex::new(Some(stop_server)),
        })
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.config.node_id
    }

    /// This replica's advertised address.
    pub fn addr(&self) -> &str {
        &self.config.advertise_addr
    }

    /// The underlying openraft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The latest metrics.
    pub fn metrics(&self) -> RaftMetrics<NodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// `(fsyncs, entries)` made durable by this replica's log so far.
    pub fn log_batching(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.log_stats.fsyncs.load(Relaxed),
            self.log_stats.entries.load(Relaxed),
        )
    }

    /// How this replica's early replication went (see [`NodeConfig::early_replication`]).
    pub fn early_stats(&self) -> &early::EarlyStats {
        &self.early_stats
    }

    /// This replica's log-writing counters: fsyncs, entries, and time spent committing.
    pub fn log_stats(&self) -> &LogStats {
        &self.log_stats
    }

    /// Forms a new cluster with these voters (`id → address`), this replica among them. Run
    /// once, on one replica, for a brand-new cluster; the others are started and wait.
    pub async fn bootstrap(&self, voters: BTreeMap<NodeId, String>) -> Result<(), NodeError> {
        let members: BTreeMap<NodeId, BasicNode> = voters
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr }))
            .collect();
        self.raft
            .initialize(members)
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))
    }

    /// Waits until some replica is leader and returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, NodeError> {
        let m = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|e| NodeError::Timeout(e.to_string()))?;
        m.current_leader
            .ok_or_else(|| NodeError::Timeout("no leader".into()))
    }

    /// Proposes `command` on this replica, which must be the leader; returns once it is
    /// committed and applied here. On a follower: [`NodeError::ForwardToLeader`].
    pub async fn propose(&self, command: S::Command) -> Result<S::Response, NodeError> {
        let bytes = encode(&command).map_err(|e| NodeError::Raft(e.to_string()))?;
        let (_, response) = self.submit(bytes).await?;
        decode(&response).map_err(|e| NodeError::Raft(e.to_string()))
    }

    /// Hands an encoded command to the batcher and waits for its outcome.
    async fn submit(&self, command: Vec<u8>) -> batcher::Outcome {
        self.proposals.submit(command).await
    }

    /// Proposes `command` wherever the leader is: here if this replica leads, otherwise
    /// forwarded to the leader over the admin service, following leader changes for up to
    /// `timeout`.
    pub async fn propose_via_leader(
        &self,
        command: S::Command,
        timeout: Duration,
    ) -> Result<S::Response, NodeError> {
        let bytes = encode(&command).map_err(|e| NodeError::Raft(e.to_string()))?;
        let attempt = async {
            let mut delay = Duration::from_millis(20);
            loop {
                // One look at the metrics per attempt: the leader and its address together.
                let (leader, addr) = {
                    let m = self.raft.metrics();
                    let m = m.borrow();
                    let leader = m.current_leader;
                    let addr = leader.and_then(|l| {
                        m.membership_config
                            .membership()
                            .get_node(&l)
                            .map(|n| n.addr.clone())
                    });
                    (leader, addr)
                };
                let result = if leader == Some(self.id()) {
                    self.submit(bytes.clone()).await.map(|(_, r)| r)
                } else {
                    match addr {
                        None => Err(NodeError::ForwardToLeader {
                            leader_id: None,
                            leader_addr: None,
                        }),
                        Some(addr) => self.forward_propose(&addr, bytes.clone()).await,
                    }
                };
                match result {
                    Ok(resp) => return decode(&resp).map_err(|e| NodeError::Raft(e.to_string())),
                    Err(e) if e.is_retryable() => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(200));
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| NodeError::Timeout("no leader accepted the proposal".into()))?
    }

    /// Sends a proposal to the leader's admin service over a reused channel.
    async fn forward_propose(&self, addr: &str, command: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        let channel = {
            let mut channels = self
                .leader_channels
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match channels.get(addr) {
                Some(c) => c.clone(),
                None => {
                    let c = tls::endpoint(addr, self.config.tls.as_ref())
                        .map_err(NodeError::Raft)?
                        .connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true)
                        .connect_lazy();
                    channels.insert(addr.to_owned(), c.clone());
                    c
                }
            }
        };
        match AdminServiceClient::new(channel)
            .propose(ProposeRequest { command })
            .await
        {
            Ok(r) => Ok(r.into_inner().response),
            Err(status) => Err(status_error(&status)),
        }
    }

    /// Joins the cluster reachable at `seed` as this replica (its id, advertised address and
    /// TLS configuration): [`join_cluster_tls`].
    pub async fn join(&self, seed: &str, timeout: Duration) -> Result<(), NodeError> {
        let c = &self.config;
        join_cluster_tls(seed, c.node_id, &c.advertise_addr, timeout, c.tls.as_ref()).await
    }

    /// Reads the local state without coordination: fast, possibly stale on a follower.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.app.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the state linearizably: this replica must be the leader; it confirms its
    /// leadership with a quorum and waits until everything committed before the read is
    /// applied, so the read sees every write acknowledged before it started.
    pub async fn linearizable_read<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, NodeError> {
        self.raft.ensure_linearizable().await.map_err(|e| match e {
            RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => {
                forward(&f)
            }
            other => NodeError::Raft(other.to_string()),
        })?;
        Ok(self.read(f))
    }

    /// Adds a non-voting member; with `blocking`, waits until it has caught up.
    pub async fn add_learner(
        &self,
        id: NodeId,
        addr: &str,
        blocking: bool,
    ) -> Result<(), NodeError> {
        self.raft
            .add_learner(
                id,
                BasicNode {
                    addr: addr.to_owned(),
                },
                blocking,
            )
            .await
            .map(|_| ())
            .map_err(batcher::write_error)
    }

    /// Makes exactly `voters` the voting members (learners are promoted; voters not listed are
    /// removed, or kept as learners with `retain`).
    pub async fn change_membership(
        &self,
        voters: BTreeSet<NodeId>,
        retain: bool,
    ) -> Result<(), NodeError> {
        self.raft
            .change_membership(voters, retain)
            .await
            .map(|_| ())
            .map_err(batcher::write_error)
    }

    /// Stops the replica cleanly: Raft first, then the server; returns once the data
    /// directory is released, so the replica can be started again in the same process.
    /// Idempotent.
    pub async fn shutdown(&self) {
        self.stop_background();
        let _ = self.raft.shutdown().await;
        self.await_storage_closed().await;
        let stop = self
            .stop_server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut server) = server {
            // Peers hold HTTP/2 connections open; do not wait for them to hang up.
            if tokio::time::timeout(Duration::from_secs(1), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
    }

    /// Stops the replica abruptly, as a crash would: the server and Raft tasks are cut off
    /// mid-flight. Everything acknowledged is already durable, so this loses nothing that a
    /// client was told succeeded.
    pub async fn crash(&self) {
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
        self.stop_background();
        let _ = self.raft.shutdown().await;
        self.await_storage_closed().await;
    }

    fn stop_background(&self) {
        let tasks = std::mem::take(&mut *self.background.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            task.abort();
        }
    }

    /// openraft's tasks and the log writer thread let go of the database shortly after Raft
    /// stops; wait for that (bounded), so the file lock is free for a restart.
    async fn await_storage_closed(&self) {
        let Some(closed) = self.storage_closed.lock().await.take() else {
            return;
        };
        if tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .is_err()
        {
            tracing::warn!(
                node = self.config.node_id,
                "Raft storage still open 5 s after shutdown."
            );
        }
    }
}

/// Turns an admin-service status into a [`NodeError`], keeping the leader hint.
pub(crate) fn status_error(status: &tonic::Status) -> NodeError {
    let md = status.metadata();
    let get = |k| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match status.code() {
        tonic::Code::FailedPrecondition if status.message().starts_with("not the leader") => {
            NodeError::ForwardToLeader {
                leader_id: get(LEADER_ID_KEY).and_then(|v| v.parse().ok()),
                leader_addr: get(LEADER_ADDR_KEY),
            }
        }
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            NodeError::Timeout(describe(status))
        }
        _ => NodeError::Raft(describe(status)),
    }
}

/// A status's message with the errors beneath it: a refused TLS handshake surfaces only as
/// "transport error", with the reason (say, "received fatal alert: UnknownCA") in its sources.
pub(crate) fn describe(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let e_text = e.to_string();
        if !text.contains(&e_text) {
            text = format!("{text}: {e_text}");
        }
        source = e.source();
    }
    text
}

/// A client of the admin service of the replica at `addr` (`host:port`), over mutual TLS when
/// `tls` is set. The connection is made on first use, so errors (unreachable, refused
/// certificate) show up as the first call's `tonic::Status`.
pub fn admin_client(
    addr: &str,
    tls: Option<&TlsConfig>,
) -> Result<AdminServiceClient<tonic::transport::Channel>, NodeError> {
    let channel = tls::endpoint(addr, tls)
        .map_err(NodeError::Config)?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(AdminServiceClient::new(channel))
}

/// Asks the cluster reachable at `seed` to add the replica `(id, addr)` as a learner and then
/// promote it to voter, in plaintext; see [`join_cluster_tls`].
pub async fn join_cluster(
    seed: &str,
    id: NodeId,
    addr: &str,
    timeout: Duration,
) -> Result<(), NodeError> {
    join_cluster_tls(seed, id, addr, timeout, None).await
}

/// Asks the cluster reachable at `seed` to add the replica `(id, addr)` as a learner and then
/// promote it to voter: how `flotilla federator --join` joins an existing cluster. Follows the
/// leader hint if `seed` is a follower, and retries while no leader answers, until `timeout`.
/// With `tls`, talks mutual TLS (the joining replica's own [`NodeConfig::tls`]).
pub async fn join_cluster_tls(
    seed: &str,
    id: NodeId,
    addr: &str,
    timeout: Duration,
    tls: Option<&TlsConfig>,
) -> Result<(), NodeError> {
    let mut last_error = None;
    let attempt = async {
        let mut target = seed.to_owned();
        loop {
            let mut client = admin_client(&target, tls)?;
            let added = client
                .add_learner(AddLearnerRequest {
                    member: Some(Member {
                        node_id: id,
                        addr: addr.to_owned(),
                    }),
                    blocking: true,
                })
                .await;
            let metrics = match added {
                Ok(m) => m.into_inner(),
                Err(status) => match status_error(&status) {
                    NodeError::ForwardToLeader {
                        leader_addr: Some(l),
                        ..
                    } => {
                        target = l;
                        continue;
                    }
                    e if e.is_retryable() => {
                        last_error = Some(format!("{target}: {e}"));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    e => return Err(e),
                },
            };
            let mut voters: Vec<NodeId> = metrics.voters.iter().map(|m| m.node_id).collect();
            if !voters.contains(&id) {
                voters.push(id);
            }
            client
                .change_membership(ChangeMembershipRequest {
                    voters,
                    retain_as_learners: false,
                })
                .await
                .map_err(|s| status_error(&s))?;
            return Ok(());
        }
    };
    let outcome = tokio::time::timeout(timeout, attempt).await;
    outcome.map_err(|_| {
        NodeError::Timeout(match last_error {
            Some(e) => format!("joining the cluster at {seed}; last error from {e}"),
            None => format!("joining the cluster at {seed}"),
        })
    })?
}
