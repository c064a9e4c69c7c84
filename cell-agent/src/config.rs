//! The agent's configuration file (`flotilla cell-agent --config FILE`): one YAML document,
//! every field documented in docs/operations.md, unknown fields refused, checked before
//! anything connects. `flotilla dev` and quick trials use flags instead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_core::ids::CellId;
use serde::Deserialize;

use crate::backend::SandboxMode;
use crate::backend::kubernetes::KubeConfig;
use crate::backend::kubernetes::config::duration;
pub use crate::backend::kubernetes::config::{PoolPods, WarmPods};
use flotilla_core::autoscale::{FloorPolicy, Period, Policy};
use flotilla_core::pipeline::Resources;

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
    /// Runner pools: name → most runners at once (`default: 4`, the default), or a pool
    /// with settings (`large: { max: 20, min: 2, resources: { cpu: 4, memory: 16Gi } }`, see
    /// [`PoolSpecFile`]), warm (sized by total workload) unless it says `warm: false`.
    #[serde(default = "default_pools")]
    pub pools: BTreeMap<String, PoolFile>,
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

fn default_pools() -> BTreeMap<String, PoolFile> {
    BTreeMap::from([(
        flotilla_core::state::DEFAULT_POOL.to_owned(),
        PoolFile::Size(4),
    )])
}

/// One pool: a size, or a pool with settings.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolFile {
    /// At most this many runners, each started when its job arrives.
    Size(u32),
    /// A pool with settings: runner size, images to pre-pull, and (unless `warm: false`)
    /// runners started ahead of their jobs, as many as the total workload needs.
    Spec(PoolSpecFile),
}

impl PoolFile {
    /// The most runners at once.
    pub fn max(&self) -> u32 {
        match self {
            PoolFile::Size(n) => *n,
            PoolFile::Spec(w) => w.max,
        }
    }

    /// The settings, when the pool has any beyond its size.
    pub fn spec(&self) -> Option<&PoolSpecFile> {
        match self {
            PoolFile::Size(_) => None,
            PoolFile::Spec(w) => Some(w),
        }
    }
}

impl<'de> Deserialize<'de> for PoolFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PoolFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of runners, or a warm pool such as `{ max: 20, min: 2 }`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PoolFile, E> {
                u32::try_from(v)
                    .map(PoolFile::Size)
                    .map_err(|_| E::custom(format!("{v} runners is too many")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PoolFile, E> {
                Err(E::custom(format!("a pool needs a positive size, not {v}")))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<PoolFile, A::Error> {
                PoolSpecFile::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(PoolFile::Spec)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A pool with settings (ARCHITECTURE §8, docs/operations.md "Runner pools"). Unless it
/// says `warm: false` it is a warm pool: runners are started before their jobs and sized by
/// the pool's total workload, `(busy + queued) / total`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpecFile {
    /// Most runners at once (the pool's size as placement sees it).
    pub max: u32,
    /// Whether runners are started ahead of their jobs (the default) or each when its job
    /// arrives (`false`: the autoscaling settings below are then unused).
    #[serde(default = "default_warm")]
    pub warm: bool,
    /// Each runner's CPU and memory, such as `{ cpu: 4, memory: 16Gi }`: a job asking for
    /// less gets this much, a job asking for more gets what it asks (and, in a warm pool,
    /// starts cold on a runner of its own). Required for a warm pool on `kubernetes`, whose
    /// pods are created at this size before their jobs are known.
    #[serde(default)]
    pub resources: Option<ResourcesFile>,
    /// `kubernetes`, warm pools: the image warm pods run. A job with another image starts
    /// cold, on a pod of its own. Ignored by `local`, which runs on the host's tools.
    #[serde(default)]
    pub image: Option<String>,
    /// `kubernetes`: images to pull onto the cell's runner nodes ahead of any job (a
    /// DaemonSet per cell), so cold pods with these images start without a pull. Ignored by
    /// `local`.
    #[serde(default)]
    pub prepull: Vec<String>,
    /// Runners kept even with no work.
    #[serde(default)]
    pub min: u32,
    /// Share of runners that should be busy (0–1]; 0.8 keeps a fifth warm.
    #[serde(default = "default_target")]
    pub target_utilisation: f64,
    /// Most runners started by one decision.
    #[serde(default = "default_step")]
    pub scale_up_step: u32,
    /// Wait after starting runners before starting more, such as `2s`.
    #[serde(default = "default_cooldown", deserialize_with = "duration")]
    pub scale_up_cooldown: Duration,
    /// How long the pool must be larger than needed before idle runners go, such as `2m`.
    #[serde(default = "default_scale_down_delay", deserialize_with = "duration")]
    pub scale_down_delay: Duration,
    /// The time-of-day floor learnt from the demand of earlier weeks; `null` turns it off.
    #[serde(default = "default_floor")]
    pub floor: Option<FloorFile>,
}

/// How the time-of-day floor is learnt.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloorFile {
    /// `week` (the same hour of the week) or `day` (the same hour every day).
    #[serde(default = "default_period")]
    pub period: Period,
    /// Quantile of the hour's past mean demands to keep warm (0–1).
    #[serde(default = "default_quantile")]
    pub quantile: f64,
    /// Past periods to learn from.
    #[serde(default = "default_periods")]
    pub periods: u32,
    /// How far ahead to look, such as `15m`.
    #[serde(default = "default_lookahead", deserialize_with = "duration")]
    pub lookahead: Duration,
}

/// CPU and memory in Kubernetes' notation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    /// Cores: `4`, `0.5` or `500m`.
    #[serde(deserialize_with = "string_or_number")]
    pub cpu: String,
    /// Memory: `16Gi`, `512Mi`.
    pub memory: String,
}

impl ResourcesFile {
    /// The amounts; `Err` says which is wrong.
    pub fn resources(&self) -> Result<Resources, String> {
        Resources::parse(&self.cpu, &self.memory)
    }
}

/// A quantity written as a string or a bare number (`cpu: 4`).
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        S(String),
        U(u64),
        F(f64),
    }
    Ok(match Either::deserialize(d)? {
        Either::S(s) => s,
        Either::U(n) => n.to_string(),
        Either::F(f) => f.to_string(),
    })
}

fn default_warm() -> bool {
    true
}
fn default_target() -> f64 {
    Policy::default().target_utilisation
}
fn default_step() -> u32 {
    Policy::default().scale_up_step
}
fn default_cooldown() -> Duration {
    Duration::from_millis(Policy::default().scale_up_cooldown_ms)
}
fn default_scale_down_delay() -> Duration {
    Duration::from_millis(Policy::default().scale_down_delay_ms)
}
fn default_floor() -> Option<FloorFile> {
    Some(FloorFile {
        period: default_period(),
        quantile: default_quantile(),
        periods: default_periods(),
        lookahead: default_lookahead(),
    })
}
fn default_period() -> Period {
    FloorPolicy::default().period
}
fn default_quantile() -> f64 {
    FloorPolicy::default().quantile
}
fn default_periods() -> u32 {
    FloorPolicy::default().periods
}
fn default_lookahead() -> Duration {
    Duration::from_millis(FloorPolicy::default().lookahead_ms)
}

impl PoolSpecFile {
    /// The core policy.
    pub fn policy(&self) -> Policy {
        Policy {
            min: self.min,
            max: self.max,
            target_utilisation: self.target_utilisation,
            scale_up_step: self.scale_up_step,
            scale_up_cooldown_ms: self.scale_up_cooldown.as_millis() as u64,
            scale_down_delay_ms: self.scale_down_delay.as_millis() as u64,
            floor: self.floor.as_ref().map(|f| FloorPolicy {
                period: f.period,
                quantile: f.quantile,
                periods: f.periods,
                lookahead_ms: f.lookahead.as_millis() as u64,
            }),
        }
    }
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

    /// Each pool's size.
    pub fn pool_sizes(&self) -> BTreeMap<String, u32> {
        self.pools
            .iter()
            .map(|(name, p)| (name.clone(), p.max()))
            .collect()
    }

    /// The warm pools' policies.
    pub fn autoscale(&self) -> BTreeMap<String, Policy> {
        self.pools
            .iter()
            .filter_map(|(name, p)| match p {
                PoolFile::Spec(w) if w.warm => Some((name.clone(), w.policy())),
                _ => None,
            })
            .collect()
    }

    /// Each pool's runner size, for the pools that give one.
    pub fn pool_resources(&self) -> BTreeMap<String, Resources> {
        self.pools
            .iter()
            .filter_map(|(name, p)| {
                let r = p.spec()?.resources.as_ref()?.resources().ok()?;
                Some((name.clone(), r))
            })
            .collect()
    }

    /// What the kubernetes backend needs to know of each pool with settings: the warm
    /// pods' image and size, and the images to pre-pull.
    pub fn pool_pods(&self) -> BTreeMap<String, PoolPods> {
        self.pools
            .iter()
            .filter_map(|(name, p)| {
                let spec = p.spec()?;
                let warm = match (&spec.image, &spec.resources) {
                    (Some(image), Some(r)) if spec.warm => Some(WarmPods {
                        image: image.clone(),
                        resources: r.resources().ok()?,
                    }),
                    _ => None,
                };
                Some((
                    name.clone(),
                    PoolPods {
                        warm,
                        prepull: spec.prepull.clone(),
                    },
                ))
            })
            .collect()
    }

    /// Checks what can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), String> {
        CellId::new(&self.cell).map_err(|e| format!("cell: {e}"))?;
        if self.federators.is_empty() {
            return Err("federators: list at least one replica's cell-session address".into());
        }
        if self.pools.is_empty() || self.pools.values().any(|p| p.max() == 0) {
            return Err("pools: give at least one pool, each with a positive size".into());
        }
        let kubernetes = matches!(self.backend, BackendFile::Kubernetes(_));
        for (name, pool) in &self.pools {
            flotilla_core::ids::PoolName::new(name).map_err(|e| format!("pools: {e}"))?;
            let PoolFile::Spec(w) = pool else { continue };
            if let Some(r) = &w.resources {
                r.resources()
                    .map_err(|e| format!("pools.{name}.resources: {e}"))?;
            }
            for image in w.image.iter().chain(&w.prepull) {
                if image.trim().is_empty() || image.contains(char::is_whitespace) {
                    return Err(format!(
                        "pools.{name}: `{image}` is not an image reference (such as rust:1.83 or ghcr.io/org/ci:1)"
                    ));
                }
            }
            if !w.warm {
                continue;
            }
            w.policy()
                .validate()
                .map_err(|e| format!("pools.{name}: {e}"))?;
            if kubernetes && (w.image.is_none() || w.resources.is_none()) {
                return Err(format!(
                    "pools.{name}: a warm pool on kubernetes creates its pods before their jobs are known, so it needs the `image` they run and their `resources`, such as `image: rust:1.83` and `resources: {{ cpu: 2, memory: 4Gi }}` (jobs with another image, or asking for more, start cold); or make it `warm: false`"
                ));
            }
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
        assert_eq!(f.pool_sizes(), BTreeMap::from([("default".to_owned(), 4)]));
        assert!(f.autoscale().is_empty());
    }

    #[test]
    fn a_pool_is_a_size_or_a_warm_pool_with_its_policy() {
        let text = "cell: a\nfederators: [x]\ndata_dir: /d\nauth: { token_file: /t }\n\
                    backend: { local: {} }\npools:\n  default: 4\n  large:\n    max: 20\n    min: 2\n\
                    \x20   scale_down_delay: 5m\n    floor: { period: day, lookahead: 30m }\n  quick: { max: 3, floor: null }\n";
        let f = AgentFile::from_yaml("agent.yaml", text).expect("valid");
        assert_eq!(
            f.pool_sizes(),
            BTreeMap::from([
                ("default".to_owned(), 4),
                ("large".to_owned(), 20),
                ("quick".to_owned(), 3)
            ])
        );
        let policies = f.autoscale();
        assert_eq!(policies.len(), 2);
        let large = &policies["large"];
        assert_eq!((large.min, large.max), (2, 20));
        assert_eq!(large.scale_down_delay_ms, 300_000);
        let floor = large.floor.as_ref().unwrap();
        assert_eq!((floor.period, floor.lookahead_ms), (Period::Day, 1_800_000));
        assert_eq!(floor.quantile, FloorPolicy::default().quantile);
        assert_eq!(policies["quick"].floor, None);
    }

    #[test]
    fn a_warm_pool_that_cannot_work_is_refused_with_where_and_what_to_do() {
        let base = "cell: a\nfederators: [x]\ndata_dir: /d\nauth: { token_file: /t }\n";
        let text =
            format!("{base}backend: {{ local: {{}} }}\npools:\n  large: {{ max: 2, min: 5 }}\n");
        let err = AgentFile::from_yaml("agent.yaml", &text).expect_err("min above max");
        assert!(
            err.contains("pools.large") && err.contains("lower min"),
            "{err}"
        );
        let text =
            format!("{base}backend: {{ local: {{}} }}\npools:\n  large: {{ max: 2, mni: 1 }}\n");
        let err = AgentFile::from_yaml("agent.yaml", &text).expect_err("typo");
        assert!(
            err.starts_with("agent.yaml:7:") && err.contains("mni"),
            "{err}"
        );
        let text =
            format!("{base}backend: {{ kubernetes: {{}} }}\npools:\n  large: {{ max: 2 }}\n");
        let err = AgentFile::from_yaml("agent.yaml", &text).expect_err("kubernetes");
        assert!(
            err.contains("pools.large") && err.contains("image") && err.contains("warm: false"),
            "{err}"
        );
        let text = format!(
            "{base}backend: {{ local: {{}} }}\npools:\n  large: {{ max: 2, resources: {{ cpu: 2, memory: 4 }} }}\n"
        );
        let err = AgentFile::from_yaml("agent.yaml", &text).expect_err("memory without a unit");
        assert!(
            err.contains("pools.large.resources") && err.contains("add a unit"),
            "{err}"
        );
        let text = format!(
            "{base}backend: {{ kubernetes: {{}} }}\npools:\n  large: {{ max: 2, warm: false, prepull: [\"rust 1.83\"] }}\n"
        );
        let err = AgentFile::from_yaml("agent.yaml", &text).expect_err("bad image");
        assert!(err.contains("`rust 1.83` is not an image"), "{err}");
    }

    #[test]
    fn a_kubernetes_pool_gives_its_warm_pods_image_and_size_and_its_pre_pull_list() {
        let text = "cell: a\nfederators: [x]\ndata_dir: /d\nauth: { token_file: /t }\n\
                    backend: { kubernetes: {} }\npools:\n  default: 8\n\
                    \x20 large:\n    max: 20\n    min: 2\n    image: rust:1.83\n\
                    \x20   resources: { cpu: 4, memory: 16Gi }\n    prepull: [rust:1.83, node:22]\n\
                    \x20 arm: { max: 5, warm: false, resources: { cpu: 500m, memory: 1Gi }, prepull: [debian:12] }\n";
        let f = AgentFile::from_yaml("agent.yaml", text).expect("valid");
        assert_eq!(
            f.pool_sizes(),
            BTreeMap::from([
                ("arm".to_owned(), 5),
                ("default".to_owned(), 8),
                ("large".to_owned(), 20)
            ])
        );
        // Only `large` is autoscaled: `arm` starts a pod per job.
        assert_eq!(f.autoscale().keys().collect::<Vec<_>>(), ["large"]);
        let large = Resources {
            cpu_millis: 4000,
            memory_bytes: 16 << 30,
        };
        let arm = Resources {
            cpu_millis: 500,
            memory_bytes: 1 << 30,
        };
        assert_eq!(
            f.pool_resources(),
            BTreeMap::from([("arm".to_owned(), arm), ("large".to_owned(), large)])
        );
        let pods = f.pool_pods();
        assert_eq!(
            pods["large"],
            PoolPods {
                warm: Some(WarmPods {
                    image: "rust:1.83".into(),
                    resources: large
                }),
                prepull: vec!["rust:1.83".into(), "node:22".into()],
            }
        );
        assert_eq!(
            pods["arm"],
            PoolPods {
                warm: None,
                prepull: vec!["debian:12".into()],
            }
        );
        assert!(!pods.contains_key("default"));
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
