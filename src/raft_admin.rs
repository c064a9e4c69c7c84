//! `flotilla raft …`: look at and change a federator cluster's membership.

use std::process::ExitCode;

use anyhow::Context as _;
use flotilla_proto::raft::{
    AddLearnerRequest, ChangeMembershipRequest, ClusterMetrics, Member, MetricsRequest,
};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Admin gRPC address of any federator replica.
    #[arg(
        long,
        env = "FLOTILLA_RAFT_ADDR",
        default_value = "127.0.0.1:7400",
        global = true
    )]
    addr: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    tls: crate::tls_args::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Show this replica's view: state, term, leader, log and the members.
    Status,
    /// Add a replica as a learner (it receives the log but does not vote).
    AddLearner {
        /// The new replica's id.
        #[arg(long)]
        node_id: u64,
        /// The new replica's advertised address.
        #[arg(long)]
        node_addr: String,
    },
    /// Make exactly these replicas the voters (learners are promoted, others removed).
    SetVoters {
        /// Comma-separated replica ids.
        #[arg(value_delimiter = ',', required = true)]
        voters: Vec<u64>,
    },
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::block_on(false, async {
        print(&call(args).await?, args.json);
        Ok(())
    })
}

async fn call(args: &Args) -> anyhow::Result<ClusterMetrics> {
    let tls = args.tls.load()?;
    let mut client = flotilla_consensus::admin_client(&args.addr, tls.as_ref())
        .with_context(|| format!("cannot reach a federator replica at {}", args.addr))?;
    let status = |s: tonic::Status| anyhow::anyhow!("{}", s.message());
    let reply = match &args.command {
        Command::Status => client.metrics(MetricsRequest {}).await.map_err(status)?,
        Command::AddLearner { node_id, node_addr } => client
            .add_learner(AddLearnerRequest {
                member: Some(Member {
                    node_id: *node_id,
                    addr: node_addr.clone(),
                }),
                blocking: true,
            })
            .await
            .map_err(status)?,
        Command::SetVoters { voters } => client
            .change_membership(ChangeMembershipRequest {
                voters: voters.clone(),
                retain_as_learners: false,
            })
            .await
            .map_err(status)?,
    };
    Ok(reply.into_inner())
}

fn print(m: &ClusterMetrics, json: bool) {
    use std::io::Write;
    let members = |list: &[Member]| -> Vec<serde_json::Value> {
        list.iter()
            .map(|m| serde_json::json!({"node_id": m.node_id, "addr": m.addr}))
            .collect()
    };
    let text = if json {
        serde_json::json!({
            "node_id": m.node_id,
            "state": m.state,
            "term": m.current_term,
            "leader_id": m.leader_id,
            "last_log_index": m.last_log_index,
            "last_applied_index": m.last_applied_index,
            "snapshot_index": m.snapshot_index,
            "voters": members(&m.voters),
            "learners": members(&m.learners),
        })
        .to_string()
    } else {
        let show = |list: &[Member]| {
            list.iter()
                .map(|m| format!("{}@{}", m.node_id, m.addr))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        format!(
            "node {}: {} in term {}, leader {}\nlog: last index {}, applied {}, snapshot {}\nvoters: {}\nlearners: {}",
            m.node_id,
            m.state.to_lowercase(),
            m.current_term,
            opt(m.leader_id),
            opt(m.last_log_index),
            opt(m.last_applied_index),
            opt(m.snapshot_index),
            show(&m.voters),
            if m.learners.is_empty() {
                "none".to_owned()
            } else {
                show(&m.learners)
            },
        )
    };
    let _ = writeln!(std::io::stdout(), "{text}");
}
