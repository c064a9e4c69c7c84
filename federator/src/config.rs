//! The federator's configuration: one typed struct, read from a YAML file
//! (`flotilla federator --config F`) or built from flags, validated before anything binds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::repo::RepoConfig;

/// One federator replica.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatorConfig {
    /// This replica's Raft id: positive, unique in the cluster, stable for the life of its
    /// data directory.
    pub node_id: u64,
    /// Where Raft and admin gRPC listen.
    #[serde(default = "default_raft_listen")]
    pub raft_listen: SocketAddr,
    /// How other replicas reach this one's gRPC (default: `raft_listen`).
    #[serde(default)]
    pub raft_advertise: Option<String>,
    /// Where the HTTP API and webhooks listen.
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// The base URL clients use to reach this replica's HTTP API, announced to the cluster so
    /// followers can redirect linearizable reads to the leader (default: `http://<http_listen>`).
    #[serde(default)]
    pub http_advertise: Option<String>,
    /// Where this replica keeps its Raft data and repository cache.
    pub data_dir: PathBuf,
    /// How the replica finds its cluster on first start.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// A file holding the bootstrap admin token (one line). Every replica should be given the
    /// same file. Without it, only tokens created through the API work (and none can be
    /// created), so set it on a new installation.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Webhook rate limiting, per project, applied after signature verification.
    #[serde(default)]
    pub webhook_rate: RateConfig,
    /// How pipelines are read from repositories.
    #[serde(default)]
    pub repos: RepoConfig,
    /// Sessions with cell agents.
    #[serde(default)]
    pub cells: CellsConfig,
    /// Where job output files are read from for `GET /api/v1/jobs/{id}/logs` (the local
    /// cells of `flotilla dev` write there). Unset: the endpoint says logs are not available
    /// on this installation yet.
    #[serde(default)]
    pub logs_dir: Option<PathBuf>,
}

/// Sessions with cell agents (ARCHITECTURE §6, §8).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellsConfig {
    /// Where the cell-session gRPC service listens.
    #[serde(default = "default_cells_listen")]
    pub listen: SocketAddr,
    /// How agents reach this replica's cell service, announced so followers can send agents
    /// to the leader (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// How often agents heartbeat, such as `2s`.
    #[serde(default = "default_heartbeat", deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// Heartbeats a cell may miss before it is suspect.
    #[serde(default = "default_missed")]
    pub missed_heartbeats: u32,
    /// How long a suspect cell has before its jobs are re-queued elsewhere, such as `10s`.
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub grace: Duration,
    /// A file holding the token agents without a client certificate present (one line).
    /// Meant for `flotilla dev` and trials; production cells use mutual TLS.
    #[serde(default)]
    pub bootstrap_token_file: Option<PathBuf>,
}

impl Default for CellsConfig {
    fn default() -> Self {
        Self {
            listen: default_cells_listen(),
            advertise: None,
            heartbeat_interval: default_heartbeat(),
            missed_heartbeats: default_missed(),
            grace: default_grace(),
            bootstrap_token_file: None,
        }
    }
}

fn default_cells_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7401))
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(2)
}

fn default_missed() -> u32 {
    3
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration like `2s`: {e}")))
}

/// Exactly one way to find the cluster on first start; ignored once the data directory holds
/// a cluster.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Form a new one-replica cluster.
    #[serde(default)]
    pub bootstrap: bool,
    /// Form a new cluster of these replicas (`id: host:port` of their gRPC), this one among
    /// them. The replica with the lowest id forms it.
    #[serde(default)]
    pub initial_members: BTreeMap<u64, String>,
    /// Join the cluster the replica at this gRPC address belongs to.
    #[serde(default)]
    pub join: Option<String>,
}

/// A token bucket.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Sustained deliveries per second per project.
    #[serde(default = "default_rate_per_second")]
    pub per_second: u32,
    /// Burst size.
    #[serde(default = "default_rate_burst")]
    pub burst: u32,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            per_second: default_rate_per_second(),
            burst: default_rate_burst(),
        }
    }
}

fn default_raft_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// A monorepo with many pushes a second is plausible; a runaway bot at thousands is not.
fn default_rate_per_second() -> u32 {
    100
}

fn default_rate_burst() -> u32 {
    500
}

impl FederatorConfig {
    /// A configuration with defaults for everything but the id and data directory.
    pub fn new(node_id: u64, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            raft_listen: default_raft_listen(),
            raft_advertise: None,
            http_listen: default_http_listen(),
            http_advertise: None,
            data_dir: data_dir.into(),
            cluster: ClusterConfig::default(),
            admin_token_file: None,
            webhook_rate: RateConfig::default(),
            repos: RepoConfig::default(),
            cells: CellsConfig::default(),
            logs_dir: None,
        }
    }

    /// Reads a YAML configuration file.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("{file}:{}:{}: ", l.line(), l.column()))
                .unwrap_or_else(|| format!("{file}: "));
            format!("{at}{}", e.without_snippet())
        })
    }

    /// Checks what can be checked before binding anything.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id must be a positive number".into());
        }
        let c = &self.cluster;
        let ways = usize::from(c.bootstrap)
            + usize::from(!c.initial_members.is_empty())
            + usize::from(c.join.is_some());
        if ways > 1 {
            return Err(
                "choose one of cluster.bootstrap, cluster.initial_members and cluster.join".into(),
            );
        }
        if !c.initial_members.is_empty() {
            match c.initial_members.get(&self.node_id) {
                None => {
                    return Err(format!(
                        "cluster.initial_members does not list this replica (node {}); add it with its advertise address {}",
                        self.node_id,
                        self.raft_advertise()
                    ));
                }
                Some(addr) if *addr != self.raft_advertise() => {
                    return Err(format!(
                        "cluster.initial_members gives node {} the address {addr}, but it advertises {}; make them match",
                        self.node_id,
                        self.raft_advertise()
                    ));
                }
                Some(_) => {}
            }
        }
        if self.cells.heartbeat_interval.is_zero() || self.cells.missed_heartbeats == 0 {
            return Err(
                "cells.heartbeat_interval and cells.missed_heartbeats must be positive".into(),
            );
        }
        if self.webhook_rate.per_second == 0 || self.webhook_rate.burst == 0 {
            return Err("webhook_rate.per_second and webhook_rate.burst must be positive".into());
        }
        Ok(())
    }

    /// Where the Raft log and snapshots live, inside `data_dir`.
    pub fn raft_dir(&self) -> PathBuf {
        self.data_dir.join("raft")
    }

    /// The gRPC address peers use.
    pub fn raft_advertise(&self) -> String {
        self.raft_advertise
            .clone()
            .unwrap_or_else(|| self.raft_listen.to_string())
    }

    /// The cell-session address agents use, given the address actually bound.
    pub fn cells_advertise(&self, bound: SocketAddr) -> String {
        self.cells
            .advertise
            .clone()
            .unwrap_or_else(|| bound.to_string())
    }

    /// The timing of cell sessions.
    pub fn cell_timing(&self) -> crate::cells::CellTiming {
        crate::cells::CellTiming {
            heartbeat_interval: self.cells.heartbeat_interval,
            missed_heartbeats: self.cells.missed_heartbeats,
            grace: self.cells.grace,
        }
    }

    /// The HTTP base URL clients use, given the address actually bound.
    pub fn http_advertise(&self, bound: SocketAddr) -> String {
        self.http_advertise
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yaml_config_with_an_unknown_key_names_the_line() {
        let e = FederatorConfig::from_yaml("f.yaml", "node_id: 1\ndata_dir: /x\nlisten: y\n")
            .unwrap_err();
        assert!(e.starts_with("f.yaml:3:"), "{e}");
        let ok = FederatorConfig::from_yaml(
            "f.yaml",
            "node_id: 1\ndata_dir: /x\ncluster: { bootstrap: true }\n",
        )
        .unwrap();
        assert!(ok.cluster.bootstrap && ok.validate().is_ok());
    }

    #[test]
    fn the_example_in_the_operations_guide_is_a_valid_configuration() {
        let doc = include_str!("../../docs/operations.md");
        let start = doc.find("```yaml\n").unwrap() + "```yaml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let c = FederatorConfig::from_yaml("operations.md", &doc[start..end]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.cluster.initial_members.len(), 3);
        assert!(c.repos.github.is_some() && c.repos.gitlab.is_some());
    }

    #[test]
    fn two_ways_to_find_the_cluster_are_refused() {
        let mut c = FederatorConfig::new(1, "/x");
        c.cluster.bootstrap = true;
        c.cluster.join = Some("a:1".into());
        assert!(c.validate().unwrap_err().contains("choose one"));
    }
}
