//! The Kubernetes backend against a real cluster — opt-in, so it is `#[ignore]`d (reported as
//! ignored, not passed) and runs with `--ignored` when `KUBECONFIG` is set. docs/kubernetes.md
//! says how to run it on a kind cluster.
//!
//! Settings (environment):
//! - `KUBECONFIG`: the cluster to use.
//! - `FLOTILLA_TEST_RUNNER_IMAGE` (required): a Flotilla image built from deploy/Dockerfile
//!   that the cluster can pull (for kind: `kind load docker-image`).
//! - `FLOTILLA_TEST_NAMESPACE` (default `flotilla-test`): an existing namespace.
//! - `FLOTILLA_TEST_RUNTIME_CLASS` (default none): `gvisor` when the nodes have runsc.
//! - `FLOTILLA_TEST_JOB_IMAGE` (default `debian:12-slim`): the jobs' image (needs bash).

use std::sync::Arc;
use std::time::Duration;

use flotilla_cell_agent::backend::conformance::{self, Harness, RepoFixture};
use flotilla_cell_agent::backend::kubernetes::{KubeBackend, KubeConfig, client};
use flotilla_core::ids::CellId;
use flotilla_core::runner::{Assignment, RunnerBackend};
use flotilla_core::{Fence, JobId};

struct Cluster {
    backend: Arc<KubeBackend>,
    job_image: String,
}

impl Harness for Cluster {
    fn backend(&self) -> Arc<dyn RunnerBackend> {
        self.backend.clone()
    }

    fn leftover_processes(&self, _marker: &str) -> Option<usize> {
        None // Processes live on the cluster's nodes.
    }

    fn workspace_exists(&self, _job: JobId, _fence: Fence) -> Option<bool> {
        None
    }

    fn repo(&self) -> Option<RepoFixture> {
        None
    }

    fn runners_outlive_the_backend(&self) -> bool {
        true
    }

    fn adjust(&self, assignment: &mut Assignment) {
        assignment.image.clone_from(&self.job_image);
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: set KUBECONFIG and FLOTILLA_TEST_RUNNER_IMAGE, run with --ignored (docs/kubernetes.md)"]
async fn the_conformance_suite_passes_on_a_real_cluster() {
    assert!(
        env("KUBECONFIG").is_some(),
        "KUBECONFIG must name the cluster to test against (docs/kubernetes.md)"
    );
    let runner_image = env("FLOTILLA_TEST_RUNNER_IMAGE").expect(
        "FLOTILLA_TEST_RUNNER_IMAGE must name a Flotilla image the cluster can pull \
         (docker build -f deploy/Dockerfile; see docs/kubernetes.md)",
    );
    let cfg = KubeConfig {
        namespace: env("FLOTILLA_TEST_NAMESPACE").unwrap_or_else(|| "flotilla-test".into()),
        runner_image,
        runtime_class: env("FLOTILLA_TEST_RUNTIME_CLASS"),
        cancel_grace: Duration::from_secs(5),
        image_pull_deadline: Duration::from_secs(120),
        ..KubeConfig::default()
    };
    let client = client::connect(&cfg).await.expect("connect to the cluster");
    let cell = CellId::new(format!("conformance-{}", std::process::id() % 100_000))
        .expect("valid cell id");
    let backend = KubeBackend::new(client, cfg, cell).expect("backend");
    let cluster = Cluster {
        backend: Arc::new(backend),
        job_image: env("FLOTILLA_TEST_JOB_IMAGE").unwrap_or_else(|| "debian:12-slim".into()),
    };
    conformance::run_all(&cluster).await;
}
