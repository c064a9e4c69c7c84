//! `flotilla simulate`, run as a user runs it: the JSON report, a bad trace line, the plot.

use std::fs;

use flotilla_tests::run;

/// A small day: quick even in a debug build.
const SMALL: [&str; 6] = ["--builds", "400", "--cells", "3", "--projects", "20"];

#[test]
fn json_reports_the_figures_and_the_static_comparison_the_same_for_the_same_seed() {
    let mut args = vec!["simulate", "--profile", "spiky", "--json", "--seed", "9"];
    args.extend(SMALL);
    args.extend(["--compare", "static:auto"]);
    let r = run(&args);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("simulated in"), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON on stdout");
    assert_eq!(v["profile"], "spiky");
    assert_eq!(v["seed"], 9);
    let idle = v["idle_fraction"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&idle), "{idle}");
    let p95 = v["queue_wait_s"]["p95"].as_f64().unwrap();
    assert!(v["queue_wait_s"]["p50"].as_f64().unwrap() <= p95);
    assert!(p95 <= v["queue_wait_s"]["p99"].as_f64().unwrap());
    assert!(v["runner_hours"].as_f64().unwrap() > 0.0);
    assert_eq!(v["busy_runners_killed"], 0);
    assert!(v["jobs"].as_u64().unwrap() > 1_000);
    assert_eq!(v["jobs_never_started"], 0);
    assert!(v["scale_ups"].as_u64().unwrap() > 0);
    assert!(v["scale_downs"].as_u64().is_some());
    // The static side: same work, sized to the autoscaled p95, more idle.
    let s = &v["static"];
    assert_eq!(s["jobs"], v["jobs"]);
    assert!(s["queue_wait_s"]["p95"].as_f64().unwrap() <= p95 + 1e-9);
    assert!(s["idle_fraction"].as_f64().unwrap() > idle);
    assert!(v["static_runners"]["default"].as_u64().unwrap() >= 1);
    assert!(v["static_runners"]["large"].as_u64().unwrap() >= 1);
    // Deterministic: the same seed, the same bytes.
    let again = run(&args);
    assert_eq!(again.stdout, r.stdout);
}

#[test]
fn the_table_shows_both_columns_and_the_wall_time() {
    let mut args = vec!["simulate", "--profile", "busy", "--compare", "static:4"];
    args.extend(SMALL);
    let r = run(&args);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    for want in [
        "autoscaled",
        "static (default 4, large 4 per cell)",
        "queue wait p95 (s)",
        "idle runner-time",
        "runner-hours",
        "busy runners killed",
        "simulated in",
    ] {
        assert!(r.stdout.contains(want), "`{want}` missing:\n{}", r.stdout);
    }
}

#[test]
fn a_bad_trace_line_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.csv");
    let mut csv = String::from("submit_time,duration,pool,project\n");
    for i in 0..15 {
        csv.push_str(&format!("{},60,default,web\n", i * 10));
    }
    csv.push_str("200,abc,default,web\n");
    fs::write(&path, csv).unwrap();
    let r = run(&["simulate", "--trace", path.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let want = format!(
        "error: {}:17: duration \"abc\" is not a number of seconds",
        path.display()
    );
    assert!(r.stderr.starts_with(&want), "{}", r.stderr);
}

#[test]
fn a_good_trace_runs_every_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.csv");
    let mut csv = String::from("submit_time,duration,pool,project\n");
    for i in 0..50 {
        let pool = if i % 5 == 0 { "large" } else { "default" };
        csv.push_str(&format!(
            "{},{},{pool},team-{}\n",
            8 * 3600 + i * 37,
            30 + i,
            i % 4
        ));
    }
    csv.push_str("2026-11-23T17:00:00Z,90,default,web\n");
    fs::write(&path, csv).unwrap();
    let r = run(&["simulate", "--trace", path.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["profile"], "trace");
    assert_eq!(v["jobs"], 51);
    assert_eq!(v["jobs_never_started"], 0);
    assert_eq!(v["pools"]["large"]["jobs"], 10);
}

#[test]
fn plot_writes_an_svg_and_refuses_png_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("day.svg");
    let mut args = vec![
        "simulate",
        "--profile",
        "sparse",
        "--plot",
        svg.to_str().unwrap(),
    ];
    args.extend(SMALL);
    args.extend(["--compare", "static:3"]);
    let r = run(&args);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    let text = fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(200)]);
    for label in [
        "demand (busy + queued)",
        "runners (autoscaled)",
        "queued jobs",
        "runners (static)",
    ] {
        assert!(text.contains(label), "`{label}` missing from the plot");
    }
    assert!(text.contains("<polyline") || text.contains("<path"));

    let png = dir.path().join("day.png");
    let r = run(&["simulate", "--plot", png.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("PNG is not supported"), "{}", r.stderr);
    assert!(r.stderr.contains("day.svg"), "{}", r.stderr);
    assert!(!png.exists());
}
