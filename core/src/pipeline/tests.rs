//! Tests of the whole parse → validate → expand path, as a pipeline author meets it.

use std::collections::HashMap;

use proptest::prelude::*;

use super::expr::{Context, Value};
use super::*;

/// The example from ARCHITECTURE §5, verbatim.
const ARCHITECTURE_EXAMPLE: &str = r#"version: 1
on: { push: { branches: [main, "release/*"] }, pull_request: { branches: [main] }, tag: ["v*"] }
concurrency: { group: "${{ ref }}", cancel_in_progress: true }
env: { RUST_LOG: info }
defaults: { image: "debian:12", timeout: 30m, resources: { cpu: "1", memory: 2Gi } }
jobs:
  lint: { run: "cargo clippy -- -D warnings" }
  test:
    needs: [lint]
    image: "rust:1.83"
    matrix: { toolchain: [stable, beta] }
    steps: [ { name: build, run: cargo build }, { run: cargo test } ]
    cache: { key: "cargo-${{ hash('Cargo.lock') }}", paths: [target/] }
    artifacts: { paths: [target/debug/app], expire_in: 7d }
    secrets: [CRATES_TOKEN]
    retry: { infra: 2, test: 0 }
    placement: { region: eu-west, labels: { arch: amd64 }, pool: large }
    if: "${{ branch == 'main' }}"
"#;

fn ok(src: &str) -> Pipeline {
    match parse(".ci.yaml", src) {
        Ok(p) => p,
        Err(d) => panic!("expected a valid pipeline, got:\n{}", render(&d)),
    }
}

fn errs(src: &str) -> Vec<Diagnostic> {
    match parse(".ci.yaml", src) {
        Ok(p) => panic!("expected errors, got a pipeline with {} jobs", p.jobs.len()),
        Err(d) => d,
    }
}

fn render(diags: &[Diagnostic]) -> String {
    diags.iter().map(|d| format!("{d}\n")).collect()
}

/// The first diagnostic as `line:col: message`.
fn first(src: &str) -> String {
    let d = &errs(src)[0];
    format!("{}:{}: {}", d.line, d.column, d.message)
}

struct Vars(HashMap<&'static str, &'static str>);

impl Context for Vars {
    fn var(&self, path: &[String]) -> Value {
        self.0
            .get(path.join(".").as_str())
            .map_or(Value::Null, |v| Value::Str((*v).into()))
    }
}

#[test]
fn the_architecture_example_expands_into_stages() {
    let p = ok(ARCHITECTURE_EXAMPLE);
    let names: Vec<Vec<&str>> = p
        .stages()
        .iter()
        .map(|s| s.iter().map(|j| j.name.as_str()).collect())
        .collect();
    assert_eq!(
        names,
        vec![vec!["lint"], vec!["test (stable)", "test (beta)"]]
    );

    let lint = p.job("lint").unwrap();
    assert_eq!(lint.image, "debian:12");
    assert_eq!(lint.timeout_secs, 1800);
    assert_eq!(lint.env["RUST_LOG"], "info");
    assert_eq!(
        lint.steps,
        vec![Step {
            name: "run".into(),
            run: "cargo clippy -- -D warnings".into()
        }]
    );

    let test = p.job("test (beta)").unwrap();
    assert_eq!(test.key, "test");
    assert_eq!(test.image, "rust:1.83");
    assert_eq!(test.needs, vec!["lint"]);
    assert_eq!(test.matrix["toolchain"], "beta");
    assert_eq!(test.steps[1].name, "step 2");
    assert_eq!(
        test.resources,
        Resources {
            cpu_millis: 1000,
            memory_bytes: 2 << 30
        }
    );
    let cache = test.cache.as_ref().unwrap();
    assert_eq!(cache.key, "cargo-${{ hash('Cargo.lock') }}");
    assert_eq!(test.artifacts.as_ref().unwrap().expire_in_secs, 7 * 86_400);
    assert_eq!(test.secrets, vec!["CRATES_TOKEN"]);
    assert_eq!(test.placement.pool.as_ref().unwrap().as_str(), "large");
    assert_eq!(test.placement.labels["arch"], "amd64");
    assert_eq!(p.concurrency.as_ref().unwrap().group, "${{ ref }}");

    let main = Vars(HashMap::from([("branch", "main")]));
    let dev = Vars(HashMap::from([("branch", "dev")]));
    assert!(test.runs_for(&main));
    assert!(!test.runs_for(&dev));
    assert!(lint.runs_for(&dev));

    assert!(
        p.triggers
            .matches(TriggerEvent::Push {
                branch: "release/2",
                changed_paths: None
            })
            .is_ok()
    );
    assert!(p.triggers.matches(TriggerEvent::Tag { name: "v1" }).is_ok());
}

#[test]
fn the_on_key_is_not_read_as_a_yaml_boolean() {
    let p = ok("version: 1\non:\n  push:\njobs:\n  a: { image: x, run: 'true' }\n");
    // `push:` with no value means every branch; no pull_request trigger was declared.
    assert_eq!(p.triggers.push, Some(trigger::BranchFilter::default()));
    assert_eq!(p.triggers.pull_request, None);
}

#[test]
fn a_pipeline_without_on_builds_every_push_and_pull_request() {
    let p = ok("version: 1\njobs:\n  a: { image: x, run: 'true' }\n");
    assert_eq!(p.triggers, Triggers::default_when_absent());
    let a = p.job("a").unwrap();
    assert_eq!(a.timeout_secs, DEFAULT_TIMEOUT_SECS);
    assert_eq!(a.retry, crate::job::RetryPolicy { infra: 2, test: 0 });
}

#[test]
fn unknown_keys_are_refused_with_a_suggestion_at_the_key() {
    let src = "version: 1\njobs:\n  build:\n    imgae: rust\n    run: make\n";
    assert_eq!(
        first(src),
        "4:5: unknown key `imgae` in a job; did you mean `image`?"
    );
    let src = "version: 1\nstages: [a]\njobs: {}\n";
    let msg = first(src);
    assert!(msg.starts_with("2:1: unknown key `stages` in the top level of the pipeline; the keys allowed here are version, on,"), "{msg}");
    let src = "version: 1\njobs:\n  a:\n    image: x\n    script: make\n";
    assert_eq!(
        first(src),
        "5:5: unknown key `script` in a job; write the commands under `run:` or `steps:`"
    );
}

#[test]
fn a_missing_version_says_what_to_add() {
    assert_eq!(
        first("jobs:\n  a: { image: x, run: y }\n"),
        "1:1: the pipeline has no `version`; add `version: 1` as its first line"
    );
    assert_eq!(
        first("version: 2\njobs:\n  a: { image: x, run: y }\n"),
        "1:10: unsupported pipeline version 2; this Flotilla reads `version: 1`"
    );
}

#[test]
fn unknown_needs_name_the_job_and_suggest_the_closest() {
    let src = "version: 1\ndefaults: { image: x }\njobs:\n  build: { run: make }\n  deploy:\n    needs: [biuld]\n    run: ./deploy\n";
    assert_eq!(
        first(src),
        "6:13: job `deploy` needs `biuld`, which is not a job in this pipeline; did you mean `build`?"
    );
}

#[test]
fn a_cycle_is_named_in_full_at_the_first_link() {
    let src = "version: 1\ndefaults: { image: x }\njobs:\n  a: { run: x, needs: [c] }\n  b: { run: x, needs: [a] }\n  c: { run: x, needs: [b] }\n";
    assert_eq!(
        first(src),
        "4:24: dependency cycle: `a` needs `c`, `c` needs `b`, `b` needs `a`; remove one of these needs"
    );
    let src = "version: 1\ndefaults: { image: x }\njobs:\n  a: { run: x, needs: [a] }\n";
    assert_eq!(
        first(src),
        "4:24: job `a` needs itself; remove `a` from its `needs`"
    );
}

#[test]
fn bad_durations_and_quantities_point_at_the_value() {
    let src = "version: 1\ndefaults: { image: x }\njobs:\n  a:\n    run: x\n    timeout: 30\n    resources: { cpu: two, memory: 512 }\n";
    let d = errs(src);
    assert_eq!(
        render(&d),
        "\
.ci.yaml:6:14: duration `30` has no unit; write it with one, such as 30m or 30s
.ci.yaml:7:23: invalid CPU quantity `two`; write cores such as 2 or 0.5, or millicores such as 500m
.ci.yaml:7:36: memory quantity `512` is only 512 bytes; add a unit, such as 512Mi
"
    );
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let src = "version: 1\njobs:\n  a: { run: x }\n  b: { image: x }\n";
    let d = errs(src);
    assert_eq!(
        render(&d),
        "\
.ci.yaml:3:3: job `a` has no image; set `image:` on the job or `defaults.image`
.ci.yaml:4:3: job `b` has nothing to run; add `run:` with a command, or `steps:`
"
    );
}

#[test]
fn matrix_include_and_exclude_follow_github_semantics() {
    let src = r#"version: 1
defaults: { image: "node:${{ matrix.node }}" }
jobs:
  test:
    run: npm test
    matrix:
      os: [linux, mac]
      node: ["18", "20"]
      exclude: [{ os: mac, node: "18" }]
      include:
        - { os: linux, experimental: "true" }
        - { os: windows, node: "20" }
"#;
    let p = ok(src);
    let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "test (linux, 18)",
            "test (linux, 20)",
            "test (mac, 20)",
            "test (windows, 20)"
        ]
    );
    assert_eq!(
        p.jobs[0].matrix.get("experimental").map(String::as_str),
        Some("true")
    );
    assert_eq!(p.jobs[2].matrix.get("experimental"), None);
    assert_eq!(p.jobs[3].image, "node:20");
}

#[test]
fn matrix_values_keep_their_spelling() {
    let p = ok(
        "version: 1\njobs:\n  t:\n    image: \"rust:${{ matrix.v }}\"\n    run: cargo test\n    matrix: { v: [1.80, 1.9] }\n",
    );
    assert_eq!(p.jobs[0].image, "rust:1.80");
    assert_eq!(p.jobs[0].name, "t (1.80)");
}

#[test]
fn a_repeated_matrix_value_is_a_duplicate_job_name() {
    let src = "version: 1\ndefaults: { image: x }\njobs:\n  t:\n    run: x\n    matrix: { v: [a, b, a] }\n";
    assert_eq!(
        first(src),
        "4:3: job `t` expands to `t (a)` more than once; remove the repeated matrix value or `include` entry"
    );
}

#[test]
fn huge_matrices_are_refused_before_they_are_built() {
    let axis = (0..20)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let src = format!(
        "version: 1\ndefaults: {{ image: x }}\njobs:\n  t:\n    run: x\n    matrix: {{ a: [{axis}], b: [{axis}], c: [{axis}], d: [{axis}] }}\n"
    );
    let msg = first(&src);
    assert!(
        msg.starts_with("6:13: the matrix of job `t` has more than 4096 combinations"),
        "{msg}"
    );
    let src = format!(
        "version: 1\ndefaults: {{ image: x }}\njobs:\n  t:\n    run: x\n    matrix: {{ a: [{axis}], b: [{axis}] }}\n"
    );
    let msg = first(&src);
    assert!(
        msg.starts_with("6:13: the matrix of job `t` expands to 400 jobs, over the limit of 256"),
        "{msg}"
    );
}

#[test]
fn exclude_must_name_real_axes_and_values() {
    let src = "version: 1\ndefaults: { image: x }\njobs:\n  t:\n    run: x\n    matrix: { os: [linux], exclude: [{ oss: linux }, { os: bsd }] }\n";
    let d = errs(src);
    assert_eq!(render(&d), "\
.ci.yaml:6:40: `exclude` names `oss`, which is not a matrix axis; did you mean `os`?
.ci.yaml:6:60: `exclude` names `os: bsd`, but `bsd` is not a value of that axis; fix the value or drop the entry
");
}

#[test]
fn event_values_cannot_be_pasted_into_scripts() {
    let src = "version: 1\njobs:\n  a:\n    image: x\n    run: \"echo ${{ branch }}\"\n";
    assert_eq!(
        first(src),
        "5:20: `branch` cannot be pasted into `run`: it is chosen by whoever pushes, so it could inject commands; read the environment variable $FLOTILLA_BRANCH instead"
    );
    let src = "version: 1\njobs:\n  a:\n    image: \"app:${{ tag }}\"\n    run: x\n";
    assert_eq!(
        first(src),
        "4:21: `tag` cannot be used in `image`; only `matrix.<axis>` values can"
    );
}

#[test]
fn matrix_values_are_substituted_into_scripts_and_env() {
    let src = "version: 1\nenv: { TARGET: \"${{ matrix.arch }}-linux\" }\njobs:\n  b:\n    image: x\n    matrix: { arch: [x86_64, aarch64] }\n    steps: [{ run: \"cargo build --target ${{ matrix.arch }}\" }]\n";
    let p = ok(src);
    assert_eq!(p.jobs[1].steps[0].run, "cargo build --target aarch64");
    assert_eq!(p.jobs[1].env["TARGET"], "aarch64-linux");
}

#[test]
fn placement_labels_can_follow_the_matrix() {
    let src = "version: 1\njobs:\n  b:\n    image: x\n    run: make\n    matrix: { arch: [amd64, arm64] }\n    placement: { labels: { arch: \"${{ matrix.arch }}\" } }\n";
    let p = ok(src);
    assert_eq!(p.jobs[0].placement.labels["arch"], "amd64");
    assert_eq!(p.jobs[1].placement.labels["arch"], "arm64");
    let src = "version: 1\njobs:\n  b:\n    image: x\n    run: make\n    matrix: { arch: [amd64, \"arm 64\"] }\n    placement: { labels: { arch: \"${{ matrix.arch }}\" } }\n";
    assert_eq!(
        first(src),
        "3:3: job `b` sets label `arch` to `arm 64` for one matrix combination, which is not a valid label value; use at most 63 letters, digits, `-`, `_` and `.`"
    );
}

#[test]
fn expression_errors_point_inside_the_string() {
    let src =
        "version: 1\njobs:\n  a:\n    image: x\n    run: x\n    if: \"${{ branch = 'main' }}\"\n";
    assert_eq!(
        first(src),
        "6:21: `=` is not an operator; compare with `==`"
    );
    let src = "version: 1\njobs:\n  a:\n    image: x\n    run: x\n    if: brnch == 'main'\n";
    assert_eq!(
        first(src),
        "6:9: unknown variable `brnch`; did you mean `branch`?"
    );
    let src = "version: 1\njobs:\n  a:\n    image: x\n    run: x\n    if: matrix.os == 'linux'\n";
    assert_eq!(
        first(src),
        "6:9: `matrix.os` has no value here: `if` is not inside a job with a matrix"
    );
    let src = "version: 1\njobs:\n  a:\n    image: x\n    run: x\n    cache: { key: \"k-${{ hsh('x') }}\", paths: [t] }\n";
    assert_eq!(
        first(src),
        "6:26: unknown function `hsh`; did you mean `hash`?"
    );
    let src = "version: 1\njobs:\n  a:\n    image: x\n    run: \"make ${{ hash('x') }}\"\n";
    assert_eq!(
        first(src),
        "5:20: `hash()` can only be used in `cache.key`, not in `run`"
    );
}

#[test]
fn workspace_paths_must_stay_in_the_workspace() {
    let src = "version: 1\njobs:\n  a:\n    image: x\n    run: x\n    artifacts: { paths: [../secrets, /etc/passwd] }\n";
    let d = errs(src);
    assert_eq!(render(&d), "\
.ci.yaml:6:26: `../secrets` leaves the workspace through `..`; `artifacts.paths` must stay inside the repository
.ci.yaml:6:38: `/etc/passwd` is not inside the workspace; `artifacts.paths` are relative to the repository root
");
}

#[test]
fn secret_env_and_pool_names_are_checked() {
    let src = "version: 1\nenv: { FLOTILLA_SHA: x, 1BAD: y }\njobs:\n  a:\n    image: x\n    run: x\n    secrets: [TOKEN, TOKEN, bad-name]\n    placement: { pool: Large }\n";
    let d = errs(src);
    assert_eq!(render(&d), "\
.ci.yaml:2:8: `FLOTILLA_SHA` is reserved: Flotilla sets FLOTILLA_* variables itself; choose another name
.ci.yaml:2:25: `1BAD` is not a valid environment variable name; use letters, digits and `_`, not starting with a digit
.ci.yaml:7:22: secret `TOKEN` is listed twice; remove one
.ci.yaml:7:29: `bad-name` is not a valid secret name; secrets become environment variables, so use letters, digits and `_`
.ci.yaml:8:24: invalid pool name `Large`: use only lowercase letters, digits and `-`
");
}

#[test]
fn type_mismatches_say_what_to_write() {
    assert_eq!(
        first("version: 1\njobs:\n  a:\n    needs: b\n"),
        "4:12: expected a list here; write `[a, b]` or one `- item` per line"
    );
    assert_eq!(
        first("version: 1\njobs:\n  a:\n    retry: { infra: -1 }\n"),
        "4:21: expected a whole number here, such as 2"
    );
    assert_eq!(
        first("version: 1\njobs:\n  a: {}\n  a: {}\n"),
        "4:3: duplicate mapping key: a; remove or rename one of them"
    );
    assert_eq!(
        first(""),
        "1:1: the document is empty; a pipeline needs at least `version: 1` and `jobs:`"
    );
    assert_eq!(
        first("version: 1\njobs:\n\ta: {}\n"),
        "3:2: tabs cannot indent YAML; indent with spaces"
    );
}

#[test]
fn retry_budgets_are_capped() {
    let src = "version: 1\njobs:\n  a:\n    image: x\n    run: x\n    retry: { test: 50 }\n";
    assert_eq!(
        first(src),
        "6:20: 50 retries is more than the limit of 10; a job that fails this often needs fixing, not retrying"
    );
}

/// The classic "billion laughs": nine levels of nine aliases, 9^9 leaves if expanded.
fn alias_bomb() -> String {
    let mut s = String::from(
        "version: 1\nenv:\n  A: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for c in "bcdefghi".chars() {
        let refs = vec![format!("*{prev}"); 9].join(",");
        s.push_str(&format!("  {}: &{c} [{refs}]\n", c.to_ascii_uppercase()));
        prev = c;
    }
    s.push_str("jobs:\n  a: { image: x, run: x }\n");
    s
}

#[test]
fn an_alias_bomb_is_refused_with_a_clear_error() {
    let msg = first(&alias_bomb());
    assert!(
        msg.contains("YAML aliases (`*name`) expand into too much data (an alias bomb)"),
        "{msg}"
    );
}

#[test]
fn a_thousand_levels_of_nesting_are_refused_with_a_clear_error() {
    let flow = format!(
        "version: 1\njobs: {}{}\n",
        "[".repeat(1000),
        "]".repeat(1000)
    );
    assert!(
        first(&flow).contains("nests deeper than 32 levels"),
        "{}",
        first(&flow)
    );
    let mut block = String::from("version: 1\njobs:\n");
    for i in 0..1000 {
        block.push_str(&" ".repeat(i + 1));
        block.push_str("k:\n");
    }
    assert!(
        first(&block).contains("nests deeper than 32 levels"),
        "{}",
        first(&block)
    );
}

#[test]
fn oversized_files_are_refused_before_parsing() {
    let big = format!(
        "version: 1\n# {}\njobs: {{}}\n",
        "x".repeat(MAX_SOURCE_BYTES)
    );
    assert!(first(&big).starts_with("1:1: the file is 1024 KiB, over the limit of 1024 KiB"));
}

#[test]
fn expanded_pipelines_serialise_and_read_back_unchanged() {
    let p = ok(ARCHITECTURE_EXAMPLE);
    let json = serde_json::to_string(&p).unwrap();
    let back: Pipeline = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_random_yaml_makes_the_parser_panic(s in "[a-z:{}\\[\\]&*!|>'\" \n\t,#$-]{0,300}") {
        let _ = parse("fuzz.yaml", &s);
    }

    #[test]
    fn no_mutation_of_a_real_pipeline_makes_the_parser_panic(
        cut in 0usize..ARCHITECTURE_EXAMPLE.len(),
        len in 0usize..40,
        insert in "[a-z:{}\\[\\]&*'\" \n,$-]{0,20}",
    ) {
        let mut s = ARCHITECTURE_EXAMPLE.to_owned();
        let start = cut.min(s.len());
        let end = (start + len).min(s.len());
        if s.is_char_boundary(start) && s.is_char_boundary(end) {
            s.replace_range(start..end, &insert);
        }
        if let Err(diags) = parse("m.yaml", &s) {
            prop_assert!(!diags.is_empty());
            for d in diags {
                prop_assert!(d.line >= 1 && d.column >= 1);
                prop_assert!(!d.message.is_empty());
            }
        }
    }
}
