//! [`KubeConfig`]: how the Kubernetes backend creates and talks to runner pods.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// The `backend.kubernetes` section of the agent's configuration. Every field has a default
/// except nothing: an empty section runs pods in `flotilla-runners` with gVisor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeConfig {
    /// The namespace runner pods (and their spec Secrets) are created in. The agent's Role
    /// must grant it pods, pods/log, secrets and events there (deploy/kubernetes).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The Flotilla image the init containers run (`flotilla runner install` and
    /// `flotilla runner checkout`); it must hold a static `flotilla` binary and `git`.
    #[serde(default = "default_runner_image")]
    pub runner_image: String,
    /// The `runtimeClassName` of runner pods. `null` runs them on the node's default runtime,
    /// without gVisor's kernel boundary: the agent then warns loudly at start.
    #[serde(default = "default_runtime_class")]
    pub runtime_class: Option<String>,
    /// Sustained requests per second to the API server (client-go's default of 5 is far too
    /// low for CI: every attempt costs a create, a secret, a log stream and a delete).
    #[serde(default = "default_qps")]
    pub qps: u32,
    /// Requests allowed in a burst above `qps`.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Pod creations per second this cell can afford; what is left after the agent's own
    /// measured create rate is reported to the federator as the cell's `api_budget`.
    #[serde(default = "default_pod_create_budget")]
    pub pod_create_budget: u32,
    /// How long an image may fail to pull (`ErrImagePull`, `ImagePullBackOff`) before the
    /// attempt fails as `Infra{ImagePull}`, such as `5m`.
    #[serde(default = "default_image_pull_deadline", deserialize_with = "duration")]
    pub image_pull_deadline: Duration,
    /// How long a runner pod may stay unschedulable (no node has room or matches) before the
    /// attempt fails as `Infra{RunnerCrash}` and is placed again, perhaps in another cell.
    #[serde(
        default = "default_unschedulable_deadline",
        deserialize_with = "duration"
    )]
    pub unschedulable_deadline: Duration,
    /// How long a cancelled pod gets between SIGTERM and SIGKILL.
    #[serde(default = "default_cancel_grace", deserialize_with = "duration")]
    pub cancel_grace: Duration,
    /// Time allowed for scheduling, image pulls and checkout on top of the job's timeout
    /// before Kubernetes itself kills the pod (`activeDeadlineSeconds`, a backstop: the
    /// runner wrapper enforces the job's timeout from its first step).
    #[serde(default = "default_startup_allowance", deserialize_with = "duration")]
    pub startup_allowance: Duration,
    /// How long the checkout init container may take.
    #[serde(default = "default_checkout_timeout", deserialize_with = "duration")]
    pub checkout_timeout: Duration,
    /// The user (and group, and fsGroup) every container runs as: Pod Security "restricted"
    /// requires a non-root user, and images whose default user is root would not start.
    #[serde(default = "default_run_as_user")]
    pub run_as_user: i64,
    /// `imagePullSecrets` for private job images.
    #[serde(default)]
    pub image_pull_secrets: Vec<String>,
    /// `nodeSelector` of runner pods (a node pool for CI, say).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// `tolerations` of runner pods, in the Kubernetes shape.
    #[serde(default)]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// Extra labels on every runner pod (for NetworkPolicies or cost reporting). The
    /// `flotilla.dev/` and `app.kubernetes.io/` prefixes are reserved.
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
    /// Largest workspace (`emptyDir.sizeLimit`), such as `20Gi`; unset means the node's.
    #[serde(default)]
    pub workspace_size_limit: Option<String>,
    /// The port a warm pod's standby listens on for its job (the agent connects to the pod's
    /// IP; deploy/kubernetes/networkpolicy-runners.yaml lets only the agent in).
    #[serde(default = "default_standby_port")]
    pub standby_port: u16,
    /// The image of the pre-pull DaemonSet's long-running container (the images to pre-pull
    /// run only as its init containers).
    #[serde(default = "default_pause_image")]
    pub pause_image: String,
}

/// What the backend knows of one pool with settings (from the agent file's `pools`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolPods {
    /// Its warm pods, when it is a warm pool.
    pub warm: Option<WarmPods>,
    /// Images to pull onto the runner nodes ahead of any job.
    pub prepull: Vec<String>,
}

/// How a warm pool's pods are made before their jobs are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPods {
    /// The job container's image; jobs with another image start cold.
    pub image: String,
    /// The pod's size; jobs asking for more start cold.
    pub resources: flotilla_core::pipeline::Resources,
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self {
            namespace: default_namespace(),
            runner_image: default_runner_image(),
            runtime_class: default_runtime_class(),
            qps: default_qps(),
            burst: default_burst(),
            pod_create_budget: default_pod_create_budget(),
            image_pull_deadline: default_image_pull_deadline(),
            unschedulable_deadline: default_unschedulable_deadline(),
            cancel_grace: default_cancel_grace(),
            startup_allowance: default_startup_allowance(),
            checkout_timeout: default_checkout_timeout(),
            run_as_user: default_run_as_user(),
            image_pull_secrets: Vec::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            pod_labels: BTreeMap::new(),
            workspace_size_limit: None,
            standby_port: default_standby_port(),
            pause_image: default_pause_image(),
        }
    }
}

/// Why a [`KubeConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend.kubernetes.{field}: {problem}")]
pub struct KubeConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong and what to do.
    pub problem: String,
}

impl KubeConfig {
    /// Checks everything that can be checked without a cluster.
    pub fn validate(&self) -> Result<(), KubeConfigError> {
        let bad = |field, problem: String| Err(KubeConfigError { field, problem });
        if !is_dns_label(&self.namespace) {
            return bad(
                "namespace",
                format!("`{}` is not a namespace name (a DNS label)", self.namespace),
            );
        }
        if self.runner_image.trim().is_empty() || self.runner_image.contains(char::is_whitespace) {
            return bad(
                "runner_image",
                format!("`{}` is not an image reference", self.runner_image),
            );
        }
        if let Some(rc) = &self.runtime_class
            && !is_dns_subdomain(rc)
        {
            return bad(
                "runtime_class",
                format!("`{rc}` is not a RuntimeClass name; use null to run without one"),
            );
        }
        if self.qps == 0 {
            return bad("qps", "must be at least 1".into());
        }
        if self.burst < self.qps {
            return bad(
                "burst",
                format!("must be at least qps ({}), got {}", self.qps, self.burst),
            );
        }
        if self.pod_create_budget == 0 {
            return bad("pod_create_budget", "must be at least 1".into());
        }
        if self.run_as_user <= 0 {
            return bad(
                "run_as_user",
                "must be a non-root user id (Pod Security \"restricted\")".into(),
            );
        }
        for key in self.pod_labels.keys() {
            if key.starts_with("flotilla.dev/") || key.starts_with("app.kubernetes.io/") {
                return bad(
                    "pod_labels",
                    format!("`{key}` uses a prefix the agent sets itself"),
                );
            }
        }
        if self.startup_allowance < self.checkout_timeout + self.image_pull_deadline {
            return bad(
                "startup_allowance",
                format!(
                    "must be at least checkout_timeout + image_pull_deadline ({}), or a slow \
                     pull and checkout would hit the pod's deadline before the job starts",
                    humantime::format_duration(self.checkout_timeout + self.image_pull_deadline)
                ),
            );
        }
        if self.standby_port == 0 {
            return bad("standby_port", "must be a port number (1-65535)".into());
        }
        if self.pause_image.trim().is_empty() || self.pause_image.contains(char::is_whitespace) {
            return bad(
                "pause_image",
                format!("`{}` is not an image reference", self.pause_image),
            );
        }
        if self.cancel_grace > Duration::from_secs(3600) {
            return bad("cancel_grace", "must be at most 1h".into());
        }
        Ok(())
    }
}

/// A DNS-1123 label: lowercase alphanumerics and `-`, 1–63 characters, alphanumeric ends.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn default_namespace() -> String {
    "flotilla-runners".into()
}

fn default_runner_image() -> String {
    concat!("ghcr.io/flotilla-ci/flotilla:", env!("CARGO_PKG_VERSION")).into()
}

#[allow(
    clippy::unnecessary_wraps,
    reason = "a serde default for an optional field: gVisor unless disabled"
)]
fn default_runtime_class() -> Option<String> {
    Some("gvisor".into())
}

fn default_qps() -> u32 {
    50
}

fn default_burst() -> u32 {
    100
}

fn default_pod_create_budget() -> u32 {
    20
}

fn default_image_pull_deadline() -> Duration {
    Duration::from_secs(300)
}

fn default_unschedulable_deadline() -> Duration {
    Duration::from_secs(600)
}

fn default_cancel_grace() -> Duration {
    Duration::from_secs(10)
}

fn default_startup_allowance() -> Duration {
    Duration::from_secs(1200)
}

fn default_checkout_timeout() -> Duration {
    Duration::from_secs(600)
}

fn default_standby_port() -> u16 {
    7171
}

fn default_pause_image() -> String {
    "registry.k8s.io/pause:3.10".into()
}

fn default_run_as_user() -> i64 {
    65532
}

pub(crate) fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration like `10s`: {e}")))
}
