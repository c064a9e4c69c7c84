//! `flotilla cell-agent render-pod`: the exact runner Pod for a job spec, as operators review
//! and policy-test it.

use flotilla_cell_agent::backend::kubernetes::{KubeConfig, render};
use flotilla_core::ids::CellId;
use flotilla_tests::{flotilla, workspace_root};
use k8s_openapi::api::core::v1::Pod;

#[test]
fn render_pod_prints_a_restricted_pod_that_parses_back_and_matches_the_backend() {
    let out = flotilla()
        .args([
            "cell-agent",
            "render-pod",
            "--job",
            "deploy/job-spec.example.yaml",
            "--cell",
            "eu-west-1a",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("utf-8");
    let pod: Pod = serde_saphyr::from_str(&yaml).expect("the output parses as a Pod");
    assert_eq!(render::restricted_violations(&pod), Vec::<String>::new());
    let text = std::fs::read_to_string(workspace_root().join("deploy/job-spec.example.yaml"))
        .expect("example");
    let job = render::read_job_spec("example", &text).expect("the example is a job spec");
    assert_eq!(
        pod,
        render::pod(
            &KubeConfig::default(),
            &CellId::new("eu-west-1a").expect("cell"),
            &job
        ),
        "render-pod prints what the backend creates"
    );
}

#[test]
fn render_pod_follows_the_agent_config_and_names_the_line_of_a_bad_job_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        "cell: edge-1\nfederators: [\"f:7401\"]\ndata_dir: /d\nauth: { token_file: /t }\n\
         backend:\n  kubernetes:\n    namespace: ci-runners\n    runtime_class: kata\n",
    )
    .expect("write");
    let out = flotilla()
        .args([
            "cell-agent",
            "render-pod",
            "--job",
            "deploy/job-spec.example.yaml",
            "--config",
        ])
        .arg(&config)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod: Pod = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout)).expect("a Pod");
    assert_eq!(pod.metadata.namespace.as_deref(), Some("ci-runners"));
    assert_eq!(
        pod.metadata.labels.expect("labels")["flotilla.dev/cell"],
        "edge-1"
    );
    assert_eq!(
        pod.spec.expect("spec").runtime_class_name.as_deref(),
        Some("kata")
    );

    let bad = dir.path().join("job.yaml");
    std::fs::write(&bad, "job: 1\nbuild: 1\nproject: p\nattempt: one\n").expect("write");
    let out = flotilla()
        .args(["cell-agent", "render-pod", "--job"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:4:", bad.display())),
        "the error names the file and line: {stderr}"
    );
}
