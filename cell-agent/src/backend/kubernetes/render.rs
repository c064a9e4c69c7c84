//! Rendering an attempt as Kubernetes objects: the runner [`Pod`] and the [`Secret`] holding
//! its resolved job spec. Pure functions of the configuration and the assignment, so
//! `flotilla cell-agent render-pod` prints exactly what the backend creates.
//!
//! The pod (ARCHITECTURE §8):
//! - init container `install` (the Flotilla image) copies the `flotilla` binary into the
//!   `flotilla-bin` emptyDir, the way Tekton injects its entrypoint;
//! - init container `checkout` (the Flotilla image, which has git; only when the job has code)
//!   fetches the commit into the `workspace` emptyDir;
//! - container `job` (the job's image) runs `flotilla runner exec`, which runs the steps and
//!   writes the output protocol of `crate::runner::record` to its log;
//! - the spec comes from a Secret named after the pod and owned by it, so it is deleted with
//!   the pod;
//! - Pod Security "restricted" everywhere, gVisor by default, no service-account token, no
//!   host namespaces or paths, Guaranteed QoS (requests = limits) so CI pods are evicted last.

use std::collections::BTreeMap;

use flotilla_core::autoscale::RunnerId;
use flotilla_core::ids::CellId;
use flotilla_core::pipeline::Resources;
use flotilla_core::runner::Assignment;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, KeyToPath,
    LocalObjectReference, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::{KubeConfig, WarmPods};
use crate::runner::record::PROTOCOL_VERSION;

/// Label: which cell's agent owns the pod. The agent watches only its own.
pub const LABEL_CELL: &str = "flotilla.dev/cell";
/// Label: the job id.
pub const LABEL_JOB: &str = "flotilla.dev/job";
/// Label: the attempt number.
pub const LABEL_ATTEMPT: &str = "flotilla.dev/attempt";
/// Label: the placement's fence.
pub const LABEL_FENCE: &str = "flotilla.dev/fence";
/// Label: the project.
pub const LABEL_PROJECT: &str = "flotilla.dev/project";
/// Label: the runner pool.
pub const LABEL_POOL: &str = "flotilla.dev/pool";
/// Label every runner pod carries (the NetworkPolicy in deploy/ selects on it).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Annotation: the build id.
pub const ANNOTATION_BUILD: &str = "flotilla.dev/build";
/// Annotation: the job's name in its pipeline.
pub const ANNOTATION_JOB_NAME: &str = "flotilla.dev/job-name";

/// The job container's name.
pub const JOB_CONTAINER: &str = "job";
/// The init container that installs the wrapper.
pub const INSTALL_CONTAINER: &str = "install";
/// The init container that checks the code out.
pub const CHECKOUT_CONTAINER: &str = "checkout";
/// The key of the job spec in the Secret.
pub const SPEC_KEY: &str = "job.json";
/// The key of the whole assignment, checkout included, in the Secret: only the checkout
/// init container mounts it, so a clone URL with credentials never reaches the job, and a
/// restarted agent reads it back to take the pod over.
pub const ATTEMPT_KEY: &str = "attempt.json";

const BIN_DIR: &str = "/flotilla/bin";
const SPEC_DIR: &str = "/flotilla/spec";
const CHECKOUT_SPEC_DIR: &str = "/flotilla/checkout";
const WORKSPACE: &str = "/workspace";
const TMP: &str = "/tmp";
/// Kubernetes' default `terminationMessagePath`.
const TERMINATION_LOG: &str = "/dev/termination-log";
/// Where the Flotilla image keeps the binary.
const IMAGE_BINARY: &str = "/usr/local/bin/flotilla";

/// The pod (and Secret) name of an attempt: derived from job, attempt and fence, so creating
/// it twice is a conflict, not a second pod.
pub fn pod_name(a: &Assignment) -> String {
    format!("flotilla-j{}-a{}-f{}", a.job, a.attempt, a.fence)
}

/// The selector for every pod of `cell`.
pub fn cell_selector(cell: &CellId) -> String {
    format!("{LABEL_MANAGED_BY}=flotilla,{LABEL_CELL}={cell}")
}

/// The labels of an attempt's pod and Secret.
pub fn labels(cfg: &KubeConfig, cell: &CellId, a: &Assignment) -> BTreeMap<String, String> {
    let mut labels = runner_labels(cfg, cell, &a.pool);
    labels.extend([
        (LABEL_JOB.to_owned(), a.job.to_string()),
        (LABEL_ATTEMPT.to_owned(), a.attempt.to_string()),
        (LABEL_FENCE.to_owned(), a.fence.to_string()),
        (LABEL_PROJECT.to_owned(), label_value(a.project.as_str())),
    ]);
    labels
}

/// What every runner pod of `cell`'s `pool` carries: the extra labels of the config, then
/// the ones the agent and the NetworkPolicies select on.
fn runner_labels(cfg: &KubeConfig, cell: &CellId, pool: &str) -> BTreeMap<String, String> {
    let mut labels = cfg.pod_labels.clone();
    labels.extend([
        (LABEL_MANAGED_BY.to_owned(), "flotilla".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "runner".to_owned(),
        ),
        (LABEL_CELL.to_owned(), cell.to_string()),
        (LABEL_POOL.to_owned(), label_value(pool)),
    ]);
    labels
}

/// A label value: at most 63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn label_value(s: &str) -> String {
    let kept: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    kept.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// The Secret holding the attempt's resolved job spec. `owner_uid` is the pod's uid once it
/// exists: the Secret is then garbage-collected with the pod.
pub fn spec_secret(
    cfg: &KubeConfig,
    cell: &CellId,
    a: &Assignment,
    owner_uid: Option<&str>,
) -> Secret {
    let whole = serde_json::to_vec(a).expect("assignments always serialize");
    // What the job sees: no checkout (the clone URL may carry a token).
    let for_job = Assignment {
        checkout: None,
        ..a.clone()
    };
    let spec = serde_json::to_vec(&for_job).expect("assignments always serialize");
    Secret {
        metadata: ObjectMeta {
            name: Some(pod_name(a)),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(labels(cfg, cell, a)),
            owner_references: owner_uid.map(|uid| vec![owner(&pod_name(a), uid)]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        immutable: Some(true),
        data: Some(BTreeMap::from([
            (SPEC_KEY.to_owned(), ByteString(spec)),
            (ATTEMPT_KEY.to_owned(), ByteString(whole)),
        ])),
        ..Secret::default()
    }
}

/// The runner pod of an attempt.
pub fn pod(cfg: &KubeConfig, cell: &CellId, a: &Assignment) -> Pod {
    let name = pod_name(a);
    let resources = job_resources(&a.resources);
    let spec_arg = format!("{SPEC_DIR}/{SPEC_KEY}");
    let mut init = vec![install_container(cfg, resources.clone())];
    if a.checkout.is_some() {
        init.push(Container {
            name: CHECKOUT_CONTAINER.into(),
            image: Some(cfg.runner_image.clone()),
            image_pull_policy: Some("IfNotPresent".into()),
            command: Some(strings(&[
                IMAGE_BINARY,
                "runner",
                "checkout",
                "--spec",
                &format!("{CHECKOUT_SPEC_DIR}/{SPEC_KEY}"),
                "--workspace",
                WORKSPACE,
                "--timeout",
                &format!("{}s", cfg.checkout_timeout.as_secs().max(1)),
                "--termination-log",
                TERMINATION_LOG,
            ])),
            env: Some(vec![env("HOME", TMP)]),
            volume_mounts: Some(vec![
                mount("checkout-spec", CHECKOUT_SPEC_DIR, true),
                mount("workspace", WORKSPACE, false),
                mount("tmp", TMP, false),
            ]),
            resources: Some(resources.clone()),
            security_context: Some(container_security()),
            ..Container::default()
        });
    }
    let job = job_container(
        &a.image,
        ["exec", "--spec", &spec_arg],
        mount("spec", SPEC_DIR, true),
        resources,
    );
    Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(labels(cfg, cell, a)),
            annotations: Some(attempt_annotations(a)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            // Kubernetes' own backstop; the wrapper enforces the job's timeout from its
            // first step (queue time is not run time).
            active_deadline_seconds: Some(active_deadline(cfg, a, 0)),
            init_containers: Some(init),
            containers: vec![job],
            volumes: Some(vec![
                empty_dir("flotilla-bin", None),
                empty_dir("workspace", cfg.workspace_size_limit.clone()),
                empty_dir("tmp", None),
                secret_file("spec", &name, SPEC_KEY),
                secret_file("checkout-spec", &name, ATTEMPT_KEY),
            ]),
            ..runner_spec(cfg)
        }),
        status: None,
    }
}

/// Init container `install`: copies the static `flotilla` binary from the Flotilla image
/// into the `flotilla-bin` volume, the way Tekton injects its entrypoint.
fn install_container(cfg: &KubeConfig, resources: ResourceRequirements) -> Container {
    Container {
        name: INSTALL_CONTAINER.into(),
        image: Some(cfg.runner_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(strings(&[
            IMAGE_BINARY,
            "runner",
            "install",
            &format!("{BIN_DIR}/flotilla"),
        ])),
        volume_mounts: Some(vec![mount("flotilla-bin", BIN_DIR, false)]),
        resources: Some(resources),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

/// Container `job`: the job's (or the warm pool's) image running the copied wrapper as
/// `flotilla runner <how> … --workspace … --protocol … --termination-log …`, with `spec`
/// (where its job comes from) mounted read-only beside the wrapper, workspace and tmp.
fn job_container(
    image: &str,
    how: [&str; 3],
    spec: VolumeMount,
    resources: ResourceRequirements,
) -> Container {
    let wrapper = format!("{BIN_DIR}/flotilla");
    let protocol = PROTOCOL_VERSION.to_string();
    let mut command = vec![wrapper.as_str(), "runner"];
    command.extend(how);
    command.extend([
        "--workspace",
        WORKSPACE,
        "--protocol",
        &protocol,
        "--termination-log",
        TERMINATION_LOG,
    ]);
    Container {
        name: JOB_CONTAINER.into(),
        image: Some(image.to_owned()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(strings(&command)),
        working_dir: Some(WORKSPACE.into()),
        env: Some(job_env()),
        volume_mounts: Some(vec![
            mount("flotilla-bin", BIN_DIR, true),
            spec,
            mount("workspace", WORKSPACE, false),
            mount("tmp", TMP, false),
        ]),
        resources: Some(resources),
        security_context: Some(container_security()),
        termination_message_policy: Some("File".into()),
        ..Container::default()
    }
}

/// The job container's environment (the wrapper adds the job's own).
fn job_env() -> Vec<EnvVar> {
    vec![
        env("HOME", TMP),
        // The workspace belongs to root (an emptyDir shared through fsGroup): without
        // this, git in a step refuses it as a repository of "dubious ownership".
        env("GIT_CONFIG_COUNT", "1"),
        env("GIT_CONFIG_KEY_0", "safe.directory"),
        env("GIT_CONFIG_VALUE_0", WORKSPACE),
    ]
}

/// An owner reference to pod `name`: what it owns is garbage-collected with it.
fn owner(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        block_owner_deletion: Some(false),
        controller: Some(true),
    }
}

/// The annotations naming an attempt's build and job.
fn attempt_annotations(a: &Assignment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ANNOTATION_BUILD.to_owned(), a.build.to_string()),
        (ANNOTATION_JOB_NAME.to_owned(), a.name.clone()),
    ])
}

/// `activeDeadlineSeconds` for an attempt in a pod that has existed for `age_secs`.
fn active_deadline(cfg: &KubeConfig, a: &Assignment, age_secs: u64) -> i64 {
    i64::try_from(
        a.timeout_secs
            .saturating_add(cfg.startup_allowance.as_secs())
            .saturating_add(age_secs)
            .max(1),
    )
    .unwrap_or(i64::MAX)
}

/// What every runner pod's spec shares: no restarts, the sandboxing runtime class, no
/// service-account token or host namespaces, Pod Security "restricted".
fn runner_spec(cfg: &KubeConfig) -> PodSpec {
    let user = cfg.run_as_user;
    PodSpec {
        restart_policy: Some("Never".into()),
        runtime_class_name: cfg.runtime_class.clone(),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        // The pause container becomes PID 1 and reaps orphaned step processes; the
        // wrapper receives the SIGTERM of a delete like any container's main process.
        share_process_namespace: Some(true),
        host_network: Some(false),
        host_pid: Some(false),
        host_ipc: Some(false),
        termination_grace_period_seconds: Some(
            i64::try_from(cfg.cancel_grace.as_secs()).unwrap_or(i64::MAX),
        ),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(user),
            run_as_group: Some(user),
            fs_group: Some(user),
            seccomp_profile: Some(runtime_default()),
            ..PodSecurityContext::default()
        }),
        image_pull_secrets: (!cfg.image_pull_secrets.is_empty()).then(|| {
            cfg.image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        node_selector: (!cfg.node_selector.is_empty()).then(|| cfg.node_selector.clone()),
        tolerations: (!cfg.tolerations.is_empty()).then(|| cfg.tolerations.clone()),
        ..PodSpec::default()
    }
}

/// Requests equal to limits: Guaranteed QoS, so a CI pod is the last to be evicted under
/// node pressure, and CPU-hungry builds do not starve their neighbours.
fn job_resources(r: &Resources) -> ResourceRequirements {
    let amounts = BTreeMap::from([
        (
            "cpu".to_owned(),
            Quantity(format!("{}m", r.cpu_millis.max(1))),
        ),
        (
            "memory".to_owned(),
            Quantity(memory_quantity(r.memory_bytes.max(1))),
        ),
    ]);
    ResourceRequirements {
        requests: Some(amounts.clone()),
        limits: Some(amounts),
        claims: None,
    }
}

/// Bytes in the largest binary unit that divides them exactly (`4Gi`, `512Mi`), as people
/// write them in manifests.
fn memory_quantity(bytes: u64) -> String {
    for (shift, unit) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

/// Pod Security "restricted", stated on every container so it holds whatever the pod-level
/// context says.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default()),
        ..SecurityContext::default()
    }
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// A volume holding one key of the attempt's Secret as `job.json`, readable by the pod's
/// group only.
fn secret_file(volume: &str, secret: &str, key: &str) -> Volume {
    Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: SPEC_KEY.into(),
                mode: None,
            }]),
            default_mode: Some(0o440),
            optional: Some(false),
        }),
        ..Volume::default()
    }
}

fn empty_dir(name: &str, size_limit: Option<String>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit: size_limit.map(Quantity),
        }),
        ..Volume::default()
    }
}

/// Label on warm pods: the pod was made before its job (its job labels come at hand-off).
pub const LABEL_WARM: &str = "flotilla.dev/warm";
/// Label on warm pods: the runner id within its pool.
pub const LABEL_RUNNER: &str = "flotilla.dev/runner";
/// Label on the pre-pull DaemonSet's pods: the cell whose nodes they pull for. (Not
/// [`LABEL_CELL`]: the agent's watcher would take them for runner pods.)
pub const LABEL_PREPULL: &str = "flotilla.dev/prepull";
/// The key of a warm pod's standby token in its Secret.
pub const TOKEN_KEY: &str = "token";
/// The standby's container in a warm pod: it checks the code out once the job arrives.
pub const STANDBY_CONTAINER: &str = CHECKOUT_CONTAINER;

const HANDOFF_DIR: &str = "/flotilla/handoff";
const STANDBY_DIR: &str = "/flotilla/standby";
/// CPU and memory of a warm pod's standby container, which runs the checkout. It sits
/// beside the job container, so the pod asks for both.
const STANDBY_RESOURCES: Resources = Resources {
    cpu_millis: 500,
    memory_bytes: 512 << 20,
};

/// A warm pod's name (and its Secret's): the agent instance (a random tag per agent start,
/// so a new agent never collides with pods an old one is still deleting), the pool and the
/// runner.
pub fn warm_pod_name(instance: &str, pool: &str, runner: RunnerId) -> String {
    format!("flotilla-w{instance}-{pool}-{}", runner.0)
}

/// The labels of a warm pod before its job is known.
pub fn warm_labels(
    cfg: &KubeConfig,
    cell: &CellId,
    pool: &str,
    runner: RunnerId,
) -> BTreeMap<String, String> {
    let mut labels = runner_labels(cfg, cell, pool);
    labels.extend([
        (LABEL_WARM.to_owned(), "true".to_owned()),
        (LABEL_RUNNER.to_owned(), runner.0.to_string()),
    ]);
    labels
}

/// Whether a pod's labels say it is a warm pod.
pub fn is_warm(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_WARM))
        .is_some_and(|v| v == "true")
}

/// A warm runner pod (ARCHITECTURE §8, warm pools): made before its job, at the pool's size,
/// with the pool's image pulled and running. Container `checkout` (the Flotilla image) runs
/// `flotilla runner standby`, which waits for the agent to send the job, checks it out and
/// hands the job spec over through the `handoff` volume; container `job` (the pool's image)
/// runs `flotilla runner handoff`, which waits for that spec and then runs the steps exactly
/// as a cold pod's job container does. The pod is Ready once both run and the standby
/// answers its probe.
pub fn warm_pod(
    cfg: &KubeConfig,
    cell: &CellId,
    pool: &str,
    runner: RunnerId,
    instance: &str,
    spec: &WarmPods,
) -> Pod {
    let name = warm_pod_name(instance, pool, runner);
    let port = i32::from(cfg.standby_port);
    let install = install_container(cfg, job_resources(&STANDBY_RESOURCES));
    let standby = Container {
        name: STANDBY_CONTAINER.into(),
        image: Some(cfg.runner_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(strings(&[
            IMAGE_BINARY,
            "runner",
            "standby",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--token-file",
            &format!("{STANDBY_DIR}/{TOKEN_KEY}"),
            "--handoff",
            HANDOFF_DIR,
            "--workspace",
            WORKSPACE,
            "--checkout-timeout",
            &format!("{}s", cfg.checkout_timeout.as_secs().max(1)),
            "--termination-log",
            TERMINATION_LOG,
        ])),
        env: Some(vec![env("HOME", TMP)]),
        ports: Some(vec![ContainerPort {
            name: Some("standby".into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(port),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(2),
            ..Probe::default()
        }),
        volume_mounts: Some(vec![
            mount("standby", STANDBY_DIR, true),
            mount("handoff", HANDOFF_DIR, false),
            mount("workspace", WORKSPACE, false),
            mount("tmp", TMP, false),
        ]),
        resources: Some(job_resources(&STANDBY_RESOURCES)),
        security_context: Some(container_security()),
        termination_message_policy: Some("File".into()),
        ..Container::default()
    };
    let job = job_container(
        &spec.image,
        ["handoff", "--handoff", HANDOFF_DIR],
        mount("handoff", HANDOFF_DIR, true),
        job_resources(&spec.resources),
    );
    Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(warm_labels(cfg, cell, pool, runner)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            // No deadline yet: an idle warm pod waits as long as the pool wants it. The
            // hand-off sets one from the job's timeout (Kubernetes lets a deadline be added).
            active_deadline_seconds: None,
            init_containers: Some(vec![install]),
            containers: vec![standby, job],
            volumes: Some(vec![
                empty_dir("flotilla-bin", None),
                empty_dir("workspace", cfg.workspace_size_limit.clone()),
                empty_dir("tmp", None),
                empty_dir("handoff", Some("1Mi".into())),
                Volume {
                    name: "standby".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(name),
                        items: Some(vec![KeyToPath {
                            key: TOKEN_KEY.into(),
                            path: TOKEN_KEY.into(),
                            mode: None,
                        }]),
                        default_mode: Some(0o440),
                        optional: Some(false),
                    }),
                    ..Volume::default()
                },
            ]),
            ..runner_spec(cfg)
        }),
        status: None,
    }
}

/// A warm pod's Secret: the token the standby accepts a job with, and (added at hand-off,
/// so it is not immutable) the job spec a restarted agent reads back to take the pod over.
pub fn warm_secret(
    cfg: &KubeConfig,
    cell: &CellId,
    pool: &str,
    runner: RunnerId,
    instance: &str,
    token: &str,
    owner_uid: Option<&str>,
) -> Secret {
    let name = warm_pod_name(instance, pool, runner);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(warm_labels(cfg, cell, pool, runner)),
            owner_references: owner_uid.map(|uid| vec![owner(&name, uid)]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The merge patch that records the job in a warm pod's Secret, before the job is sent.
pub fn handoff_secret_patch(a: &Assignment) -> serde_json::Value {
    let whole = serde_json::to_vec(a).expect("assignments always serialize");
    serde_json::json!({
        "data": {
            ATTEMPT_KEY: ByteString(whole),
        }
    })
}

/// The merge patch that gives a warm pod its job: the attempt's labels (so the agent's
/// recovery and `kubectl get pods -l flotilla.dev/job=…` find it like any runner pod), its
/// annotations, and an active deadline counted from the pod's start (`age_secs` ago).
pub fn handoff_pod_patch(
    cfg: &KubeConfig,
    cell: &CellId,
    a: &Assignment,
    age_secs: u64,
) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "labels": labels(cfg, cell, a),
            "annotations": attempt_annotations(a),
        },
        "spec": {
            "activeDeadlineSeconds": active_deadline(cfg, a, age_secs),
        }
    })
}

/// The pre-pull DaemonSet's name for `cell`.
pub fn prepull_name(cell: &CellId) -> String {
    format!("flotilla-prepull-{cell}")
}

/// The DaemonSet that keeps `images` pulled on every node runner pods may land on (the
/// backend's node selector and tolerations): an init container per image runs the static
/// `flotilla --version` (so the image needs nothing of its own), then a pause container
/// holds the pod. Changing the list rolls the DaemonSet, pulling the new images.
pub fn prepull_daemonset(cfg: &KubeConfig, cell: &CellId, images: &[String]) -> DaemonSet {
    let name = prepull_name(cell);
    let mut labels = cfg.pod_labels.clone();
    labels.extend([
        (LABEL_MANAGED_BY.to_owned(), "flotilla".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "prepull".to_owned(),
        ),
        (LABEL_PREPULL.to_owned(), cell.to_string()),
    ]);
    let selector = BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), "flotilla".to_owned()),
        (LABEL_PREPULL.to_owned(), cell.to_string()),
    ]);
    let small = job_resources(&Resources {
        cpu_millis: 10,
        memory_bytes: 32 << 20,
    });
    let mut init = vec![install_container(cfg, small.clone())];
    let mut seen = std::collections::BTreeSet::new();
    for image in images.iter().filter(|i| seen.insert(i.as_str())) {
        init.push(Container {
            name: format!("pull-{}", init.len()),
            image: Some(image.clone()),
            image_pull_policy: Some("IfNotPresent".into()),
            command: Some(strings(&[&format!("{BIN_DIR}/flotilla"), "--version"])),
            volume_mounts: Some(vec![mount("flotilla-bin", BIN_DIR, true)]),
            resources: Some(small.clone()),
            security_context: Some(container_security()),
            ..Container::default()
        });
    }
    let pause = Container {
        name: "pause".into(),
        image: Some(cfg.pause_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        resources: Some(small),
        security_context: Some(container_security()),
        ..Container::default()
    };
    DaemonSet {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Always".into()),
                    share_process_namespace: Some(false),
                    termination_grace_period_seconds: Some(1),
                    init_containers: Some(init),
                    containers: vec![pause],
                    volumes: Some(vec![empty_dir("flotilla-bin", None)]),
                    ..runner_spec(cfg)
                }),
            },
            ..DaemonSetSpec::default()
        }),
        status: None,
    }
}

/// Where a pod breaks the Pod Security "restricted" profile (Kubernetes 1.34), one sentence
/// per problem; empty when it complies. Used by the tests over every rendered pod and by
/// `render-pod` as a last check before printing.
pub fn restricted_violations(pod: &Pod) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(spec) = &pod.spec else {
        return vec!["the pod has no spec".into()];
    };
    for (what, on) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ] {
        if on == Some(true) {
            problems.push(format!("{what} is true"));
        }
    }
    if spec.automount_service_account_token != Some(false) {
        problems.push("automountServiceAccountToken is not false".into());
    }
    for v in spec.volumes.iter().flatten() {
        let allowed = v.empty_dir.is_some()
            || v.secret.is_some()
            || v.config_map.is_some()
            || v.projected.is_some()
            || v.downward_api.is_some()
            || v.persistent_volume_claim.is_some()
            || v.ephemeral.is_some()
            || v.csi.is_some();
        if !allowed {
            problems.push(format!(
                "volume `{}` is of a type restricted forbids",
                v.name
            ));
        }
    }
    let pod_ctx = spec.security_context.as_ref();
    let pod_non_root = pod_ctx.and_then(|c| c.run_as_non_root);
    let pod_seccomp = pod_ctx
        .and_then(|c| c.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    if pod_ctx.and_then(|c| c.run_as_user) == Some(0) {
        problems.push("the pod runs as user 0".into());
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        let ctx = c.security_context.as_ref();
        let name = &c.name;
        if ctx.and_then(|x| x.privileged) == Some(true) {
            problems.push(format!("container `{name}` is privileged"));
        }
        if ctx.and_then(|x| x.allow_privilege_escalation) != Some(false) {
            problems.push(format!(
                "container `{name}` does not set allowPrivilegeEscalation: false"
            ));
        }
        let drops_all = ctx
            .and_then(|x| x.capabilities.as_ref())
            .and_then(|caps| caps.drop.as_ref())
            .is_some_and(|d| d.iter().any(|c| c == "ALL"));
        if !drops_all {
            problems.push(format!("container `{name}` does not drop ALL capabilities"));
        }
        let adds = ctx
            .and_then(|x| x.capabilities.as_ref())
            .and_then(|caps| caps.add.as_ref())
            .map(|a| a.iter().filter(|c| *c != "NET_BIND_SERVICE").count())
            .unwrap_or(0);
        if adds > 0 {
            problems.push(format!(
                "container `{name}` adds capabilities other than NET_BIND_SERVICE"
            ));
        }
        let non_root = ctx.and_then(|x| x.run_as_non_root).or(pod_non_root);
        if non_root != Some(true) {
            problems.push(format!("container `{name}` may run as root"));
        }
        if ctx.and_then(|x| x.run_as_user) == Some(0) {
            problems.push(format!("container `{name}` runs as user 0"));
        }
        let seccomp = ctx
            .and_then(|x| x.seccomp_profile.as_ref())
            .map(|p| p.type_.as_str())
            .or(pod_seccomp);
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            problems.push(format!(
                "container `{name}` has no RuntimeDefault or Localhost seccomp profile"
            ));
        }
        if c.ports.iter().flatten().any(|p| p.host_port.is_some()) {
            problems.push(format!("container `{name}` uses a host port"));
        }
    }
    problems
}

/// Reads a resolved job spec (the JSON mounted as `job.json`, or the same in YAML) for
/// `render-pod`; errors name `file:line:column`.
pub fn read_job_spec(file: &str, text: &str) -> Result<Assignment, String> {
    serde_saphyr::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("{file}:{}:{}: ", l.line(), l.column()))
            .unwrap_or_else(|| format!("{file}: "));
        format!(
            "{at}{} (a job spec is the JSON mounted as /flotilla/spec/job.json; see \
             deploy/job-spec.example.yaml)",
            e.without_snippet()
        )
    })
}

/// The pod as YAML, as `render-pod` prints it (and `kubectl apply -f` reads it).
pub fn to_yaml(pod: &Pod) -> String {
    serde_saphyr::to_string(pod).expect("pods always serialize")
}

#[cfg(test)]
mod tests {
    use flotilla_core::pipeline::{Resources, Step};
    use flotilla_core::runner::Checkout;
    use flotilla_core::{Attempt, BuildId, Fence, JobId, ProjectId};

    use super::*;

    fn cell() -> CellId {
        CellId::new("eu-west-1a").expect("valid")
    }

    fn sample(checkout: bool) -> Assignment {
        Assignment {
            job: JobId(42),
            build: BuildId(7),
            project: ProjectId::new("acme-web").expect("valid"),
            attempt: Attempt::new(2).expect("valid"),
            fence: Fence(1234),
            name: "test (stable)".into(),
            image: "rust:1.83".into(),
            steps: vec![Step {
                name: "test".into(),
                run: "cargo test".into(),
            }],
            env: vec![("RUST_LOG".into(), "info".into())],
            secrets: Vec::new(),
            timeout_secs: 1800,
            resources: Resources {
                cpu_millis: 2000,
                memory_bytes: 4 << 30,
            },
            pool: "large".into(),
            checkout: checkout.then(|| Checkout {
                repo_url: "https://git.example.com/acme/web.git".into(),
                git_ref: "refs/heads/main".into(),
                sha: "0123456789abcdef0123456789abcdef01234567".into(),
            }),
        }
    }

    fn configs() -> Vec<KubeConfig> {
        let mut without_gvisor = KubeConfig {
            runtime_class: None,
            ..KubeConfig::default()
        };
        without_gvisor.image_pull_secrets = vec!["registry".into()];
        without_gvisor.node_selector = BTreeMap::from([("pool".into(), "ci".into())]);
        without_gvisor.workspace_size_limit = Some("20Gi".into());
        without_gvisor.pod_labels = BTreeMap::from([("team".into(), "platform".into())]);
        vec![KubeConfig::default(), without_gvisor]
    }

    #[test]
    fn every_rendered_pod_meets_the_restricted_pod_security_profile() {
        for cfg in configs() {
            for checkout in [false, true] {
                let pod = pod(&cfg, &cell(), &sample(checkout));
                assert_eq!(
                    restricted_violations(&pod),
                    Vec::<String>::new(),
                    "checkout {checkout}, config {cfg:?}"
                );
                let spec = pod.spec.as_ref().expect("spec");
                assert!(spec.volumes.iter().flatten().all(|v| v.host_path.is_none()));
                assert_eq!(spec.automount_service_account_token, Some(false));
            }
        }
    }

    fn warm_spec() -> WarmPods {
        WarmPods {
            image: "rust:1.83".into(),
            resources: Resources {
                cpu_millis: 4000,
                memory_bytes: 16 << 30,
            },
        }
    }

    fn container<'p>(pod: &'p Pod, name: &str) -> &'p Container {
        pod.spec
            .as_ref()
            .expect("spec")
            .containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    fn mounts(c: &Container) -> Vec<(&str, bool)> {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.read_only == Some(true)))
            .collect()
    }

    #[test]
    fn a_warm_pod_runs_the_pools_image_at_the_pools_size_behind_a_standby_only_it_can_reach() {
        for cfg in configs() {
            let pod = warm_pod(
                &cfg,
                &cell(),
                "large",
                RunnerId(3),
                "0a1b2c3d",
                &warm_spec(),
            );
            assert_eq!(restricted_violations(&pod), Vec::<String>::new(), "{cfg:?}");
            assert_eq!(
                pod.metadata.name.as_deref(),
                Some("flotilla-w0a1b2c3d-large-3")
            );
            let labels = pod.metadata.labels.as_ref().expect("labels");
            assert_eq!(labels[LABEL_WARM], "true");
            assert_eq!(labels[LABEL_CELL], "eu-west-1a");
            assert!(!labels.contains_key(LABEL_JOB), "no job until the hand-off");
            let spec = pod.spec.as_ref().expect("spec");
            assert_eq!(spec.active_deadline_seconds, None, "an idle warm pod waits");
            assert_eq!(spec.automount_service_account_token, Some(false));
            let job = container(&pod, JOB_CONTAINER);
            assert_eq!(job.image.as_deref(), Some("rust:1.83"));
            assert_eq!(
                job.command.as_ref().expect("command")[..3],
                [
                    "/flotilla/bin/flotilla".to_owned(),
                    "runner".into(),
                    "handoff".into()
                ]
            );
            let limits = job
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .expect("limits");
            assert_eq!(limits["cpu"].0, "4000m");
            assert_eq!(limits["memory"].0, "16Gi");
            assert_eq!(
                job.resources.as_ref().and_then(|r| r.requests.as_ref()),
                Some(limits),
                "Guaranteed QoS"
            );
            // The job reads its spec from the hand-off volume but cannot write it, and never
            // sees the standby's token.
            assert!(
                mounts(job).contains(&("handoff", true)),
                "{:?}",
                mounts(job)
            );
            assert!(!mounts(job).iter().any(|(v, _)| *v == "standby"));
            let standby = container(&pod, STANDBY_CONTAINER);
            assert_eq!(standby.image.as_deref(), Some(cfg.runner_image.as_str()));
            assert!(mounts(standby).contains(&("standby", true)));
            assert!(mounts(standby).contains(&("handoff", false)));
            let port = standby.ports.as_ref().expect("ports")[0].container_port;
            assert_eq!(port, i32::from(cfg.standby_port));
            let probe = standby
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref());
            assert_eq!(probe.and_then(|g| g.path.as_deref()), Some("/healthz"));
            let command = standby.command.as_ref().expect("command").join(" ");
            assert!(
                command.contains(&format!("runner standby --listen 0.0.0.0:{port}")),
                "{command}"
            );
        }
    }

    #[test]
    fn the_hand_off_labels_the_warm_pod_as_the_attempts_and_sets_its_deadline() {
        let cfg = KubeConfig::default();
        let a = sample(true);
        let patch = handoff_pod_patch(&cfg, &cell(), &a, 90);
        assert_eq!(patch["metadata"]["labels"][LABEL_JOB], "42");
        assert_eq!(patch["metadata"]["labels"][LABEL_FENCE], "1234");
        assert_eq!(patch["metadata"]["labels"][LABEL_ATTEMPT], "2");
        assert_eq!(patch["metadata"]["annotations"][ANNOTATION_BUILD], "7");
        assert_eq!(
            patch["spec"]["activeDeadlineSeconds"],
            serde_json::json!(1800 + cfg.startup_allowance.as_secs() + 90),
            "counted from the pod's start, 90 s ago"
        );
        let secret = handoff_secret_patch(&a);
        let b64 = secret["data"][ATTEMPT_KEY].as_str().expect("base64");
        let bytes: ByteString = serde_json::from_value(serde_json::json!(b64)).expect("b64");
        let back: Assignment = serde_json::from_slice(&bytes.0).expect("assignment");
        assert_eq!(back, a);
        let token = warm_secret(
            &cfg,
            &cell(),
            "large",
            RunnerId(3),
            "0a1b2c3d",
            "t0k",
            Some("u1"),
        );
        assert_ne!(
            token.immutable,
            Some(true),
            "the hand-off adds the job to it"
        );
        assert_eq!(token.metadata.owner_references.expect("owner")[0].uid, "u1");
    }

    #[test]
    fn the_restricted_check_finds_what_breaks_the_profile() {
        let mut pod = pod(&KubeConfig::default(), &cell(), &sample(true));
        let spec = pod.spec.as_mut().expect("spec");
        spec.host_network = Some(true);
        spec.automount_service_account_token = None;
        let job = &mut spec.containers[0];
        let ctx = job.security_context.as_mut().expect("ctx");
        ctx.allow_privilege_escalation = None;
        ctx.capabilities = None;
        ctx.run_as_user = Some(0);
        spec.volumes.get_or_insert_default().push(Volume {
            name: "docker".into(),
            host_path: Some(Default::default()),
            ..Volume::default()
        });
        let problems = restricted_violations(&pod);
        for expected in [
            "hostNetwork is true",
            "automountServiceAccountToken is not false",
            "container `job` does not set allowPrivilegeEscalation: false",
            "container `job` does not drop ALL capabilities",
            "container `job` runs as user 0",
            "volume `docker` is of a type restricted forbids",
        ] {
            assert!(
                problems.iter().any(|p| p == expected),
                "{expected:?} not in {problems:#?}"
            );
        }
    }

    #[test]
    fn the_pod_carries_the_attempt_in_its_name_labels_and_limits() {
        let cfg = KubeConfig::default();
        let a = sample(true);
        let pod = pod(&cfg, &cell(), &a);
        assert_eq!(pod.metadata.name.as_deref(), Some("flotilla-j42-a2-f1234"));
        let labels = pod.metadata.labels.as_ref().expect("labels");
        for (key, value) in [
            (LABEL_CELL, "eu-west-1a"),
            (LABEL_JOB, "42"),
            (LABEL_ATTEMPT, "2"),
            (LABEL_FENCE, "1234"),
            (LABEL_PROJECT, "acme-web"),
            (LABEL_POOL, "large"),
            (LABEL_MANAGED_BY, "flotilla"),
        ] {
            assert_eq!(labels.get(key).map(String::as_str), Some(value), "{key}");
        }
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(spec.active_deadline_seconds, Some(1800 + 1200));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let job = &spec.containers[0];
        assert_eq!(job.image.as_deref(), Some("rust:1.83"));
        let resources = job.resources.as_ref().expect("resources");
        assert_eq!(resources.requests, resources.limits, "Guaranteed QoS");
        let limits = resources.limits.as_ref().expect("limits");
        assert_eq!(limits["cpu"].0, "2000m");
        assert_eq!(limits["memory"].0, "4Gi");
        assert_eq!(memory_quantity(1536 << 20), "1536Mi");
        assert_eq!(memory_quantity(1000), "1000");
        let init: Vec<&str> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(init, [INSTALL_CONTAINER, CHECKOUT_CONTAINER]);
        let without_code = super::pod(&cfg, &cell(), &sample(false));
        assert_eq!(
            without_code
                .spec
                .expect("spec")
                .init_containers
                .expect("init")
                .len(),
            1,
            "no checkout container without code to check out"
        );
        assert_eq!(
            label_value("-weird/project."),
            "weird_project",
            "label values are made valid"
        );
    }

    #[test]
    fn the_spec_secret_holds_the_assignment_and_is_owned_by_the_pod() {
        let a = sample(true);
        let secret = spec_secret(&KubeConfig::default(), &cell(), &a, Some("u-1"));
        let owner = &secret.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "u-1"));
        let data = secret.data.as_ref().expect("data");
        let whole: Assignment = serde_json::from_slice(&data[ATTEMPT_KEY].0).expect("json");
        assert_eq!(whole, a);
        let for_job: Assignment = serde_json::from_slice(&data[SPEC_KEY].0).expect("json");
        assert_eq!(
            for_job.checkout, None,
            "the clone URL never reaches the job"
        );
        assert_eq!(for_job.steps, a.steps);
        // Only the checkout container mounts the whole assignment.
        let pod = pod(&KubeConfig::default(), &cell(), &a);
        let spec = pod.spec.expect("spec");
        let mounts = |c: &k8s_openapi::api::core::v1::Container| -> Vec<String> {
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| m.name.clone())
                .collect()
        };
        assert!(!mounts(&spec.containers[0]).contains(&"checkout-spec".to_owned()));
        let checkout = spec
            .init_containers
            .expect("init")
            .into_iter()
            .find(|c| c.name == CHECKOUT_CONTAINER)
            .expect("checkout");
        assert!(mounts(&checkout).contains(&"checkout-spec".to_owned()));
    }

    #[test]
    fn the_rendered_pod_yaml_is_stable_and_parses_back_into_the_same_pod() {
        let cfg = KubeConfig {
            runner_image: "ghcr.io/flotilla-ci/flotilla:test".into(),
            ..KubeConfig::default()
        };
        let pod = pod(&cfg, &cell(), &sample(true));
        let yaml = to_yaml(&pod);
        let back: Pod = serde_saphyr::from_str(&yaml).expect("the YAML parses as a Pod");
        assert_eq!(back, pod);
        insta::assert_snapshot!("rendered_pod", yaml);
    }
}
