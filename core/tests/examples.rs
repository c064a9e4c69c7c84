//! Every pipeline under `examples/` is valid, and every file under `examples/invalid/` fails
//! with exactly the diagnostics written at its end as `# expect: LINE:COL: message` lines.

use std::fs;
use std::path::{Path, PathBuf};

use flotilla_core::pipeline;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_pipeline_is_valid_and_has_jobs_in_stages() {
    let files = yaml_files(&examples_dir());
    assert!(
        files.len() >= 6,
        "expected at least six examples, found {}",
        files.len()
    );
    for file in files {
        let source = fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let p = pipeline::parse(&name, &source).unwrap_or_else(|d| {
            panic!(
                "{name} is invalid:\n{}",
                d.iter().map(|d| format!("{d}\n")).collect::<String>()
            )
        });
        assert!(!p.jobs.is_empty(), "{name} has no jobs");
        let staged: usize = p.stages().iter().map(Vec::len).sum();
        assert_eq!(
            staged,
            p.jobs.len(),
            "{name}: every job is in exactly one stage"
        );
    }
}

#[test]
fn every_invalid_example_fails_at_its_expected_positions() {
    let files = yaml_files(&examples_dir().join("invalid"));
    assert!(
        files.len() >= 8,
        "expected the invalid cases, found {}",
        files.len()
    );
    for file in files {
        let source = fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let expected: Vec<&str> = source
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(!expected.is_empty(), "{name} has no `# expect:` lines");
        let diags = match pipeline::parse(&name, &source) {
            Ok(_) => panic!("{name} was accepted"),
            Err(d) => d,
        };
        let got: Vec<String> = diags
            .iter()
            .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
            .collect();
        assert_eq!(got, expected, "{name}");
    }
}
