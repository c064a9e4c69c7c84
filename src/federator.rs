//! `flotilla federator`: one replica of the federator — Raft, webhooks, REST API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use flotilla_consensus::NodeId;
use flotilla_federator::clock::SystemClock;
use flotilla_federator::config::FederatorConfig;
use flotilla_federator::repo::RoutedSource;
use flotilla_federator::service::{Deps, Federator, Listeners};

/// A replica is configured by `--config FILE` (YAML, every field documented in
/// docs/operations.md) or by these flags. How a new replica finds its cluster: exactly one of
/// --bootstrap, --initial-members, --join on first start; ignored on later starts.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Read the whole configuration from this YAML file (no other flags allowed with it).
    #[arg(long, conflicts_with_all = ["node_id", "bootstrap", "initial_members", "join"])]
    config: Option<PathBuf>,
    /// This replica's id: a positive number, unique in the cluster, stable for the life of
    /// its data directory.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), required_unless_present = "config")]
    node_id: Option<NodeId>,
    /// Address to serve Raft and admin gRPC on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Address other replicas use to reach this one's gRPC (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Address to serve the HTTP API and webhooks on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Base URL clients use to reach this replica's API (default: http://<--http>).
    #[arg(long)]
    http_advertise: Option<String>,
    /// Where this replica keeps its Raft data and repository cache
    /// (default: ./.flotilla/federator-<node-id>).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A file holding the bootstrap admin token (give every replica the same one).
    #[arg(long, env = "FLOTILLA_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Form a new one-replica cluster. Grow it later with `--join` on new replicas.
    #[arg(long, conflicts_with_all = ["initial_members", "join"])]
    bootstrap: bool,
    /// Form a new cluster of these replicas, as `id=host:port,…` (this replica among them).
    /// Start every listed replica with the same list; the one with the lowest id forms it.
    #[arg(long, value_delimiter = ',', conflicts_with = "join")]
    initial_members: Vec<String>,
    /// Join the existing cluster that the replica at this gRPC address belongs to; it is
    /// added as a learner, catches up, and is promoted to voter.
    #[arg(long)]
    join: Option<String>,
    /// Address to serve cell-agent sessions on (gRPC). Served only with --cell-token-file or
    /// --cell-tls-ca.
    #[arg(long, default_value = "127.0.0.1:7401")]
    cells_listen: std::net::SocketAddr,
    /// Address cell agents use to reach this replica's cell service (default: --cells-listen).
    #[arg(long)]
    cells_advertise: Option<String>,
    /// A file holding the token cell agents without a client certificate present.
    #[arg(long, env = "FLOTILLA_CELL_TOKEN_FILE")]
    cell_token_file: Option<PathBuf>,
    /// PEM CA bundle cell agents' client certificates must chain to (each certificate names
    /// its cell id as a DNS name). The cell service then presents --tls-cert/--tls-key.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    cell_tls_ca: Option<PathBuf>,
    #[command(flatten)]
    tls: crate::tls_args::TlsArgs,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::block_on(true, serve(args))
}

fn parse_members(list: &[String]) -> anyhow::Result<std::collections::BTreeMap<NodeId, String>> {
    let mut members = std::collections::BTreeMap::new();
    for item in list {
        let (id, addr) = item
            .split_once('=')
            .with_context(|| format!("`{item}` in --initial-members is not `id=host:port`"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .with_context(|| format!("`{id}` in --initial-members is not a node id"))?;
        if members.insert(id, addr.trim().to_owned()).is_some() {
            bail!("node {id} is listed twice in --initial-members");
        }
    }
    Ok(members)
}

fn config_from(args: &Args) -> anyhow::Result<FederatorConfig> {
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return FederatorConfig::from_yaml(&path.display().to_string(), &text)
            .map_err(anyhow::Error::msg);
    }
    let node_id = args.node_id.context("--node-id is required")?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!(".flotilla/federator-{node_id}")));
    let mut c = FederatorConfig::new(node_id, data_dir);
    c.raft_listen = args.listen;
    c.raft_advertise = args.advertise.clone();
    c.http_listen = args.http;
    c.http_advertise = args.http_advertise.clone();
    c.admin_token_file = args.admin_token_file.clone();
    c.cluster.bootstrap = args.bootstrap;
    c.cluster.initial_members = parse_members(&args.initial_members)?;
    c.cluster.join = args.join.clone();
    c.cells.listen = args.cells_listen;
    c.cells.advertise = args.cells_advertise.clone();
    c.cells.bootstrap_token_file = args.cell_token_file.clone();
    Ok(c)
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    let config = config_from(args)?;
    config.validate().map_err(anyhow::Error::msg)?;
    let c = &config.cluster;
    if !c.bootstrap
        && c.initial_members.is_empty()
        && c.join.is_none()
        && !config.raft_dir().exists()
    {
        bail!(
            "a new replica needs to know its cluster: pass --bootstrap, --initial-members or --join"
        );
    }
    let raft = tokio::net::TcpListener::bind(config.raft_listen)
        .await
        .with_context(|| format!("cannot listen on {} (gRPC)", config.raft_listen))?;
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {} (HTTP)", config.http_listen))?;
    let repos = RoutedSource::new(config.data_dir.join("repos"), &config.repos)
        .context("setting up repository access")?;
    let tls = args.tls.load()?;
    let cell_tls = match (&args.cell_tls_ca, &tls) {
        (Some(ca), Some(tls)) => {
            let mut t = tls.clone();
            t.ca_pem = std::fs::read(ca)
                .with_context(|| format!("cannot read the cell CA bundle {}", ca.display()))?;
            Some(t)
        }
        _ => None,
    };
    let cells = if cell_tls.is_some() || config.cells.bootstrap_token_file.is_some() {
        Some(
            tokio::net::TcpListener::bind(config.cells.listen)
                .await
                .with_context(|| format!("cannot listen on {} (cells)", config.cells.listen))?,
        )
    } else {
        tracing::warn!(
            "No cell sessions: pass --cell-token-file or --cell-tls-ca to let cell agents connect."
        );
        None
    };
    let deps = Deps {
        clock: Arc::new(SystemClock),
        repos: Arc::new(repos),
        tls,
        cell_tls,
    };
    let node_id = config.node_id;
    let listeners = Listeners { raft, http, cells };
    let federator = Federator::start(config, listeners, deps).await?;
    tracing::info!(node = node_id, http = %federator.http_addr(), "Ready.");
    crate::shutdown_signal().await;
    tracing::info!(node = node_id, "Shutting down.");
    federator.shutdown().await;
    Ok(())
}
