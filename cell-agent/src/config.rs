//! The agent's configuration file (`flotilla cell-agent --config FILE`): one YAML document,
//! every field documented in docs/operations.md, unknown fields refused, checked before
//! anything connects. `flotilla dev` and quick trials use flags instead.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flotilla_core::ids::CellId;
use serde::Deserialize;

use crate::backend::SandboxMode;
use crate::backend::kubernetes::KubeConfig;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// The cell's id: a DNS label, unique in the installation, stable across restarts.
    pub cell: String,
    /// The cell's region, matched by jobs' `placement.region`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Labels matched by jobs' `placement.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Runner pools: name → most runners at once (default `default: 4`).
    #[serde(default = "default_pools")]
    pub pools: BTreeMap<String, u32>,
    /// Cell-session addresses (`host:port`) of federator replicas.
    pub federators: Vec<String>,
    /// Where the agent keeps job logs (and, for `local`, workspaces and git mirrors).
    pub data_dir: PathBuf,
    /// How the agent proves which cell it is.
    pub auth: AuthFile,
    /// Where jobs run.
    pub backend: BackendFile,
}

/// Exactly one way to authenticate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AuthFile {
    /// Mutual TLS with a certificate naming the cell (production).
    Tls {
        /// PEM certificate chain.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
        /// PEM CA bundle the federators' certificates chain to.
        ca: PathBuf,
        /// The name the federators' certificates are checked against (default: the host
        /// dialled).
        #[serde(default)]
        server_name: Option<String>,
    },
    /// A file holding the federators' cell bootstrap token (trials).
    TokenFile(PathBuf),
}

/// Exactly one runner backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum BackendFile {
    /// One pod per attempt in this cluster.
    Kubernetes(#[serde(default)] Box<KubeConfig>),
    /// Sandboxed processes on this machine.
    Local(#[serde(default)] LocalFile),
}

/// The `local` backend's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    /// `auto` (bubblewrap when available), `required` or `off`.
    #[serde(default)]
    pub sandbox: SandboxFile,
}

/// How local jobs are isolated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxFile {
    /// bubblewrap when installed, otherwise plain processes with a loud warning.
    #[default]
    Auto,
    /// bubblewrap or nothing.
    Required,
    /// Plain processes (trusted code only).
    Off,
}

impl From<SandboxFile> for SandboxMode {
    fn from(s: SandboxFile) -> Self {
        match s {
            SandboxFile::Auto => SandboxMode::Auto,
            SandboxFile::Required => SandboxMode::Required,
            SandboxFile::Off => SandboxMode::Off,
        }
    }
}

fn default_region() -> String {
    "local".into()
}

fn default_pools() -> BTreeMap<String, u32> {
    BTreeMap::from([(flotilla_core::state::DEFAULT_POOL.to_owned(), 4)])
}

impl AgentFile {
    /// Reads the file's text; errors name `file:line:column`.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, String> {
        let parsed: Self = serde_saphyr::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("{file}:{}:{}: ", l.line(), l.column()))
                .unwrap_or_else(|| format!("{file}: "));
            format!("{at}{}", e.without_snippet())
        })?;
        parsed.validate().map_err(|e| format!("{file}: {e}"))?;
        Ok(parsed)
    }

    /// Checks what can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), String> {
        CellId::new(&self.cell).map_err(|e| format!("cell: {e}"))?;
        if self.federators.is_empty() {
            return Err("federators: list at least one replica's cell-session address".into());
        }
        if self.pools.is_empty() || self.pools.values().any(|n| *n == 0) {
            return Err("pools: give at least one pool, each with a positive size".into());
        }
        if let BackendFile::Kubernetes(k) = &self.backend {
            k.validate().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubernetes_agent_file_reads_with_defaults_filled_in() {
        let text = "cell: eu-west-1a\nregion: eu-west\nfederators: [\"f0:7401\"]\ndata_dir: /var/lib/a\n\
                    auth:\n  tls: { cert: /t/c, key: /t/k, ca: /t/ca }\n\
                    backend:\n  kubernetes:\n    namespace: ci\n    image_pull_deadline: 2m\n";
        let f = AgentFile::from_yaml("agent.yaml", text).expect("valid");
        let BackendFile::Kubernetes(k) = &f.backend else {
            panic!("kubernetes expected: {f:?}");
        };
        assert_eq!(k.namespace, "ci");
        assert_eq!(k.image_pull_deadline, std::time::Duration::from_secs(120));
        assert_eq!(k.runtime_class.as_deref(), Some("gvisor"));
        assert_eq!(f.pools, default_pools());
    }

    #[test]
    fn mistakes_are_reported_with_file_line_and_column() {
        let text = "cell: a\nfederators: [x]\ndata_dir: /d\nauth: { token_file: /t }\n\
                    backend:\n  kubernetes:\n    namspace: ci\n";
        let err = AgentFile::from_yaml("agent.yaml", text).expect_err("typo");
        assert!(err.starts_with("agent.yaml:7:"), "{err}");
        assert!(err.contains("namspace"), "{err}");
        let text = "cell: a\nfederators: []\ndata_dir: /d\nauth: { token_file: /t }\nbackend: { local: {} }\n";
        let err = AgentFile::from_yaml("agent.yaml", text).expect_err("no federators");
        assert!(err.contains("federators"), "{err}");
        let text = "cell: a\nfederators: [x]\ndata_dir: /d\nauth: { token_file: /t }\n\
                    backend: { kubernetes: { runtime_class: \"Not Valid\" } }\n";
        let err = AgentFile::from_yaml("agent.yaml", text).expect_err("bad runtime class");
        assert!(err.contains("runtime_class"), "{err}");
    }
}
