//! `flotilla federator`: one replica of the federator's Raft cluster.
//!
//! Today the replica runs the consensus layer only, replicating a key-value store; the
//! federator's own state, webhooks and API plug in with the Federator issue.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use flotilla_consensus::kv::KvStore;
use flotilla_consensus::{Node, NodeConfig, NodeId, join_cluster};

/// How a replica finds its cluster: exactly one of these on first start. On later starts
/// (the data directory already holds a cluster) they are ignored.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// This replica's id: a positive number, unique in the cluster, stable for the life of
    /// its data directory.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    node_id: NodeId,
    /// Address to serve Raft and admin gRPC on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Address other replicas use to reach this one (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Where this replica keeps its Raft log and snapshots
    /// (default: ./.flotilla/federator-<node-id>).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Form a new one-replica cluster. Grow it later with `--join` on new replicas.
    #[arg(long, conflicts_with_all = ["initial_members", "join"])]
    bootstrap: bool,
    /// Form a new cluster of these replicas, as `id=host:port,…` (this replica among them).
    /// Start every listed replica with the same list; the one with the lowest id forms it.
    #[arg(long, value_delimiter = ',', conflicts_with = "join")]
    initial_members: Vec<String>,
    /// Join the existing cluster that the replica at this address belongs to; it is added
    /// as a learner, catches up, and is promoted to voter.
    #[arg(long)]
    join: Option<String>,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::block_on(true, serve(args))
}

fn parse_members(list: &[String]) -> anyhow::Result<BTreeMap<NodeId, String>> {
    let mut members = BTreeMap::new();
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

async fn serve(args: &Args) -> anyhow::Result<()> {
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| args.listen.to_string());
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!(".flotilla/federator-{}", args.node_id)));
    let members = parse_members(&args.initial_members)?;
    if !members.is_empty() {
        match members.get(&args.node_id) {
            None => bail!(
                "--initial-members does not list this replica (node {}); add `{}={advertise}`",
                args.node_id,
                args.node_id
            ),
            Some(addr) if *addr != advertise => bail!(
                "--initial-members gives node {} the address {addr}, but it advertises {advertise}; make them match",
                args.node_id
            ),
            Some(_) => {}
        }
    }
    if !args.bootstrap && members.is_empty() && args.join.is_none() && !data_dir.exists() {
        bail!(
            "a new replica needs to know its cluster: pass --bootstrap, --initial-members or --join"
        );
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let config = NodeConfig::new(args.node_id, &data_dir, advertise.clone());
    let node = Node::start(config, listener, KvStore::default()).await?;
    tracing::info!(
        node = args.node_id,
        listen = %args.listen,
        advertise = %advertise,
        data_dir = %data_dir.display(),
        "Federator replica serving Raft and admin gRPC."
    );

    let initialized = node.raft().is_initialized().await.unwrap_or(false);
    if !initialized {
        if args.bootstrap {
            node.bootstrap(BTreeMap::from([(args.node_id, advertise.clone())]))
                .await?;
            tracing::info!(node = args.node_id, "Formed a new one-replica cluster.");
        } else if members.keys().next() == Some(&args.node_id) {
            node.bootstrap(members.clone()).await?;
            tracing::info!(node = args.node_id, members = ?members, "Formed a new cluster.");
        } else if let Some(seed) = &args.join {
            join_cluster(seed, args.node_id, &advertise, Duration::from_secs(60))
                .await
                .with_context(|| format!("joining the cluster through {seed}"))?;
            tracing::info!(node = args.node_id, seed = %seed, "Joined the cluster as a voter.");
        }
    }

    shutdown_signal().await;
    tracing::info!(node = args.node_id, "Shutting down.");
    node.shutdown().await;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
