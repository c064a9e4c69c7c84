//! A running federator replica: the Raft node, the HTTP server and the leader's reactor, each
//! an owned task with a shutdown path (house style: thin binary, `start(config, listeners,
//! deps)` so tests bind port 0 and stop replicas cleanly or crash them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_consensus::{Node, NodeConfig, NodeError, TlsConfig};
use flotilla_core::repo::RepoSource;
use flotilla_core::state::{Command, Entry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cells::CellHub;
use crate::clock::Clock;
use crate::config::FederatorConfig;
use crate::http::{self, App};
use crate::machine::Machine;
use crate::reactor::Reactor;

/// The sockets a replica serves, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// Raft and admin gRPC.
    pub raft: TcpListener,
    /// HTTP API and webhooks.
    pub http: TcpListener,
    /// The cell-session gRPC service; `None` serves no cells.
    pub cells: Option<TcpListener>,
}

/// What a replica needs from outside.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Pipeline reads.
    pub repos: Arc<dyn RepoSource>,
    /// Mutual TLS between replicas, if configured.
    pub tls: Option<TlsConfig>,
    /// Mutual TLS for cell sessions, if configured: this replica's server certificate and
    /// the CA that cell certificates must chain to.
    pub cell_tls: Option<TlsConfig>,
}

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The Raft node failed to start or to find its cluster.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A file could not be read.
    #[error("{0}")]
    Io(String),
}

/// A running replica.
#[derive(Debug)]
pub struct Federator {
    node: Arc<Node<Machine>>,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    http: JoinHandle<()>,
    reactor: JoinHandle<()>,
    announcer: JoinHandle<()>,
    cell_tasks: Vec<JoinHandle<()>>,
    cells: Arc<CellHub>,
    cells_addr: Option<SocketAddr>,
}

/// How long shutdown waits for in-flight HTTP requests.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

impl Federator {
    /// Starts a replica: opens its Raft data, finds or forms its cluster, and serves.
    pub async fn start(
        config: FederatorConfig,
        listeners: Listeners,
        deps: Deps,
    ) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        let admin_token = match &config.admin_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        StartError::Io(format!(
                            "cannot read admin_token_file {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        if admin_token.as_deref() == Some("") {
            return Err(StartError::Config("the admin token file is empty".into()));
        }
        let cell_token = match &config.cells.bootstrap_token_file {
            Some(path) => {
                let t = std::fs::read_to_string(path)
                    .map_err(|e| {
                        StartError::Io(format!(
                            "cannot read cells.bootstrap_token_file {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_owned();
                if t.is_empty() {
                    return Err(StartError::Config(
                        "the cell bootstrap token file is empty".into(),
                    ));
                }
                Some(t)
            }
            None => None,
        };
        if listeners.cells.is_some() && cell_token.is_none() && deps.cell_tls.is_none() {
            return Err(StartError::Config(
                "cell sessions need mutual TLS or cells.bootstrap_token_file; neither is set"
                    .into(),
            ));
        }
        let advertise = config.raft_advertise();
        let mut node_config = NodeConfig::new(config.node_id, config.raft_dir(), advertise.clone());
        node_config.tls = deps.tls.clone();
        let (machine, events) = Machine::new();
        let node = Arc::new(Node::start(node_config, listeners.raft, machine).await?);
        join_cluster(&node, &config, &advertise).await?;

        let http_addr = listeners
            .http
            .local_addr()
            .map_err(|e| StartError::Io(e.to_string()))?;
        let (stop, stopped) = watch::channel(false);
        let cells = CellHub::new(
            node.clone(),
            deps.clock.clone(),
            config.cell_timing(),
            cell_token,
        );
        let mut cell_tasks = vec![
            tokio::spawn(cells.clone().run_scheduler(stopped.clone())),
            tokio::spawn(cells.clone().run_lease_monitor(stopped.clone())),
        ];
        let mut cells_addr = None;
        if let Some(listener) = listeners.cells {
            let bound = listener
                .local_addr()
                .map_err(|e| StartError::Io(e.to_string()))?;
            cells_addr = Some(bound);
            cell_tasks.push(tokio::spawn(crate::cells::serve(
                cells.clone(),
                listener,
                deps.cell_tls.clone(),
                stopped.clone(),
            )));
            cell_tasks.push(tokio::spawn(announce(
                node.clone(),
                config.node_id,
                Announced::Cells,
                config.cells_advertise(bound),
                stopped.clone(),
            )));
        }
        let app = Arc::new(App::new(
            node.clone(),
            deps.clock.clone(),
            admin_token.as_deref(),
            config.webhook_rate,
            cells.clone(),
            config.logs_dir.clone(),
        ));
        let router = http::router(app);
        let mut http_stop = stopped.clone();
        let http = tokio::spawn(async move {
            let shutdown = async move {
                let _ = http_stop.wait_for(|s| *s).await;
            };
            // Webhook acks are small and latency-bound: no Nagle delay on accepted sockets.
            let listener = axum::serve::ListenerExt::tap_io(listeners.http, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed.");
            }
        });
        let reactor = Reactor {
            node: node.clone(),
            repos: deps.repos.clone(),
            clock: deps.clock.clone(),
            events,
            cells: cells.clone(),
        };
        let reactor = tokio::spawn(reactor.run(stopped.clone()));
        let announcer = tokio::spawn(announce(
            node.clone(),
            config.node_id,
            Announced::Http,
            config.http_advertise(http_addr),
            stopped,
        ));
        tracing::info!(
            node = config.node_id,
            raft = %advertise,
            http = %http_addr,
            "Federator replica serving."
        );
        Ok(Self {
            node,
            http_addr,
            stop,
            http,
            reactor,
            announcer,
            cell_tasks,
            cells,
            cells_addr,
        })
    }

    /// Where the cell-session service listens, if it does.
    pub fn cells_addr(&self) -> Option<SocketAddr> {
        self.cells_addr
    }

    /// Cell sessions on this replica.
    pub fn cells(&self) -> &Arc<CellHub> {
        &self.cells
    }

    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The Raft node.
    pub fn node(&self) -> &Arc<Node<Machine>> {
        &self.node
    }

    /// Stops serving, waits (briefly) for in-flight requests, and closes the Raft data.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(HTTP_DRAIN, self.http).await;
        let _ = self.reactor.await;
        let _ = self.announcer.await;
        for t in self.cell_tasks {
            let _ = tokio::time::timeout(HTTP_DRAIN, t).await;
        }
        self.node.shutdown().await;
    }

    /// Stops everything abruptly, as a killed process would (tests).
    pub async fn crash(self) {
        self.http.abort();
        self.reactor.abort();
        self.announcer.abort();
        for t in &self.cell_tasks {
            t.abort();
        }
        self.node.crash().await;
    }
}

async fn join_cluster(
    node: &Node<Machine>,
    config: &FederatorConfig,
    advertise: &str,
) -> Result<(), StartError> {
    let initialized = node.raft().is_initialized().await.unwrap_or(false);
    if initialized {
        return Ok(());
    }
    let c = &config.cluster;
    if c.bootstrap {
        node.bootstrap(BTreeMap::from([(config.node_id, advertise.to_owned())]))
            .await?;
        tracing::info!(node = config.node_id, "Formed a new one-replica cluster.");
    } else if c.initial_members.keys().next() == Some(&config.node_id) {
        node.bootstrap(c.initial_members.clone()).await?;
        tracing::info!(node = config.node_id, members = ?c.initial_members, "Formed a new cluster.");
    } else if let Some(seed) = &c.join {
        node.join(seed, Duration::from_secs(60)).await?;
        tracing::info!(node = config.node_id, seed = %seed, "Joined the cluster as a voter.");
    } else if c.initial_members.is_empty() {
        return Err(StartError::Config(
            "a new replica needs to know its cluster: bootstrap, initial members or join".into(),
        ));
    }
    Ok(())
}

/// An address this replica announces to the cluster: its HTTP API (for redirects to the
/// leader) or its cell service (for agents sent to the leader).
#[derive(Debug, Clone, Copy)]
enum Announced {
    Http,
    Cells,
}

/// Tells the cluster where this replica serves `what`, retrying until it sticks.
async fn announce(
    node: Arc<Node<Machine>>,
    node_id: u64,
    what: Announced,
    addr: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let known = node.read(|m| {
            let s = m.state();
            let table = match what {
                Announced::Http => &s.replicas,
                Announced::Cells => &s.cell_endpoints,
            };
            table.get(&node_id) == Some(&addr)
        });
        if known {
            return;
        }
        let command = match what {
            Announced::Http => Command::AnnounceReplica {
                node_id,
                http_url: addr.clone(),
            },
            Announced::Cells => Command::AnnounceCellEndpoint {
                node_id,
                addr: addr.clone(),
            },
        };
        match node
            .propose_via_leader(Entry::V1(command), Duration::from_secs(10))
            .await
        {
            Ok(_) => return,
            Err(e) => tracing::debug!(error = %e, ?what, "Announcing an address failed; retrying."),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
