//! `flotilla validate`, run as a user runs it.

use std::fs;

use flotilla_core::pipeline;
use flotilla_tests::{run, workspace_root};

fn example_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = fs::read_dir(workspace_root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    files.sort();
    files
}

#[test]
fn validating_the_examples_lists_every_job_under_its_stage() {
    let r = run(&["validate", "examples"]);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let files = example_files("examples");
    for file in &files {
        let source = fs::read_to_string(workspace_root().join(file)).unwrap();
        let p = pipeline::parse(file, &source).unwrap();
        let block = r
            .stdout
            .split(&format!("{file}: valid"))
            .nth(1)
            .unwrap_or_else(|| panic!("{file} missing from:\n{}", r.stdout));
        for (i, stage) in p.stages().iter().enumerate() {
            let from = block
                .find(&format!("  stage {}\n", i + 1))
                .unwrap_or_else(|| panic!("{file}: no stage {}", i + 1));
            let to = block
                .find(&format!("  stage {}\n", i + 2))
                .unwrap_or(block.len());
            for job in stage {
                assert!(
                    block[from..to].contains(&format!("    {} ", job.name)),
                    "{file}: `{}` not listed under stage {}",
                    job.name,
                    i + 1
                );
            }
        }
    }
    assert!(r.stdout.ends_with(&format!(
        "{} files checked: {} valid, 0 with problems\n",
        files.len(),
        files.len()
    )));
}

#[test]
fn each_invalid_example_fails_with_its_position_and_exit_status_1() {
    for file in example_files("examples/invalid") {
        let r = run(&["validate", &file]);
        assert_eq!(r.code, 1, "{file} should fail");
        let source = fs::read_to_string(workspace_root().join(&file)).unwrap();
        let expected = source
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap();
        let first = r.stderr.lines().next().unwrap_or_default();
        assert_eq!(first, format!("{file}:{expected}"));
        // Then the offending line, with a caret under the column.
        let line: usize = expected.split(':').next().unwrap().parse().unwrap();
        let text = source.lines().nth(line - 1).unwrap();
        assert!(
            r.stderr.contains(&format!("{line} | {text}\n")),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn json_output_carries_the_expanded_pipeline_or_the_problems() {
    let r = run(&["validate", "--json", "examples/release.yaml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["valid"], true);
    assert_eq!(
        v[0]["stages"][1],
        serde_json::json!(["build (amd64)", "build (arm64)"])
    );
    assert_eq!(
        v[0]["pipeline"]["jobs"][1]["placement"]["labels"]["arch"],
        "amd64"
    );

    let r = run(&["validate", "--json", "examples/invalid/cycle.yaml"]);
    assert_eq!(r.code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["valid"], false);
    assert_eq!(v[0]["errors"][0]["line"], 5);
    assert_eq!(v[0]["errors"][0]["column"], 31);
}

#[test]
fn a_directory_with_a_ci_yaml_is_checked_through_that_file() {
    let dir = std::env::temp_dir().join(format!("flotilla-validate-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join(".ci.yaml"),
        "version: 1\njobs:\n  a: { image: x, run: 'true' }\n",
    )
    .unwrap();
    fs::write(dir.join("other.yaml"), "not: a pipeline\n").unwrap();
    let r = run(&["validate", dir.to_str().unwrap()]);
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(".ci.yaml: valid — 1 job in 1 stage\n"),
        "{}",
        r.stdout
    );
}

#[test]
fn a_missing_file_is_an_error_with_status_2() {
    let r = run(&["validate", "no/such/file.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .starts_with("error: cannot read no/such/file.yaml: "),
        "{}",
        r.stderr
    );
}

#[test]
fn a_cell_agent_without_credentials_says_how_to_authenticate() {
    let r = run(&["cell-agent", "--cell", "c1", "--federator", "127.0.0.1:1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("--token-file") && r.stderr.contains("--tls-cert"),
        "{}",
        r.stderr
    );
}
