//! `flotilla validate [PATH] [--json]`: check pipeline files and show their expanded jobs.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use flotilla_core::pipeline::{self, Diagnostic, JobSpec, Pipeline};
use serde::Serialize;

/// Pipeline file names looked for in a directory before falling back to every YAML file in it.
const PIPELINE_FILES: [&str; 2] = [".ci.yaml", ".ci.yml"];

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A pipeline file, or a directory (default: the current directory).
    #[arg(default_value = ".")]
    path: PathBuf,
    /// Print the result as JSON: one object per file, with its jobs or its problems.
    #[arg(long)]
    json: bool,
}

/// The outcome for one file, as printed by `--json`.
#[derive(Debug, Serialize)]
struct Report {
    file: String,
    valid: bool,
    /// Expanded job names, stage by stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    stages: Option<Vec<Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pipeline: Option<Pipeline>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<Diagnostic>,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    match check(args) {
        Ok(all_valid) if all_valid => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            let _ = writeln!(io::stderr(), "error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn check(args: &Args) -> anyhow::Result<bool> {
    let files = pipeline_files(&args.path)?;
    let mut reports = Vec::new();
    for file in &files {
        let source =
            fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let name = file.display().to_string();
        reports.push((pipeline::parse(&name, &source), name, source));
    }
    let all_valid = reports.iter().all(|(r, _, _)| r.is_ok());

    let mut out = io::BufWriter::new(io::stdout().lock());
    if args.json {
        let json: Vec<Report> = reports
            .into_iter()
            .map(|(result, file, _)| match result {
                Ok(p) => Report {
                    file,
                    valid: true,
                    stages: Some(
                        p.stages()
                            .iter()
                            .map(|s| s.iter().map(|j| j.name.clone()).collect())
                            .collect(),
                    ),
                    pipeline: Some(p),
                    errors: Vec::new(),
                },
                Err(errors) => Report {
                    file,
                    valid: false,
                    stages: None,
                    pipeline: None,
                    errors,
                },
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &json)?;
        writeln!(out)?;
    } else {
        let mut err = io::stderr().lock();
        for (result, file, source) in &reports {
            match result {
                Ok(p) => print_pipeline(&mut out, file, p)?,
                Err(diags) => {
                    out.flush()?;
                    for d in diags {
                        print_diagnostic(&mut err, d, source)?;
                    }
                }
            }
        }
        if files.len() > 1 {
            let bad = reports.iter().filter(|(r, _, _)| r.is_err()).count();
            writeln!(
                out,
                "{} files checked: {} valid, {bad} with problems",
                files.len(),
                files.len() - bad
            )?;
        }
    }
    out.flush()?;
    Ok(all_valid)
}

/// The files PATH stands for (see the command's help).
fn pipeline_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    for name in PIPELINE_FILES {
        let candidate = path.join(name);
        if candidate.is_file() {
            return Ok(vec![candidate]);
        }
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))? {
        let p = entry?.path();
        let yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && p.is_file() {
            files.push(p);
        }
    }
    if files.is_empty() {
        bail!(
            "no pipeline in {}: it has no .ci.yaml and no *.yaml files; pass a file or another directory",
            path.display()
        );
    }
    files.sort();
    Ok(files)
}

fn print_pipeline(out: &mut impl Write, file: &str, p: &Pipeline) -> io::Result<()> {
    let stages = p.stages();
    writeln!(
        out,
        "{file}: valid — {} job{} in {} stage{}",
        p.jobs.len(),
        plural(p.jobs.len()),
        stages.len(),
        plural(stages.len())
    )?;
    let width = p
        .jobs
        .iter()
        .map(|j| j.name.chars().count())
        .max()
        .unwrap_or(0);
    for (i, stage) in stages.iter().enumerate() {
        writeln!(out, "  stage {}", i + 1)?;
        for job in stage {
            writeln!(out, "    {:width$}  {}", job.name, describe(p, job))?;
        }
    }
    Ok(())
}

/// One line of facts about a job: image, timeout, resources, and what it waits for.
fn describe(p: &Pipeline, job: &JobSpec) -> String {
    let mut parts = vec![
        job.image.clone(),
        format!("timeout {}", humanize(job.timeout_secs)),
        job.resources.to_string(),
    ];
    if let Some(pool) = &job.placement.pool {
        parts.push(format!("pool {pool}"));
    }
    if !job.needs.is_empty() {
        parts.push(format!("needs {}", needs_summary(p, job)));
    }
    if let Some(cond) = &job.condition {
        parts.push(format!("if {cond}"));
    }
    parts.join(" · ")
}

/// The job's needs, with every expansion of one matrix job written once as `key (×N)`.
fn needs_summary(p: &Pipeline, job: &JobSpec) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut done_keys: Vec<&str> = Vec::new();
    for need in &job.needs {
        let Some(spec) = p.job(need) else { continue };
        if spec.matrix.is_empty() {
            parts.push(need.clone());
            continue;
        }
        if done_keys.contains(&spec.key.as_str()) {
            continue;
        }
        let all: Vec<&JobSpec> = p.jobs.iter().filter(|j| j.key == spec.key).collect();
        if all.iter().all(|j| job.needs.contains(&j.name)) {
            done_keys.push(&spec.key);
            parts.push(format!("{} (×{})", spec.key, all.len()));
        } else {
            parts.push(need.clone());
        }
    }
    parts.join(", ")
}

fn humanize(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut t = String::new();
    if h > 0 {
        t.push_str(&format!("{h}h"));
    }
    if m > 0 {
        t.push_str(&format!("{m}m"));
    }
    if s > 0 || t.is_empty() {
        t.push_str(&format!("{s}s"));
    }
    t
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `file:line:col: message`, then the line and a caret under the column, as compilers do.
fn print_diagnostic(err: &mut impl Write, d: &Diagnostic, source: &str) -> io::Result<()> {
    writeln!(err, "{d}")?;
    let Some(line) = source.lines().nth(d.line as usize - 1) else {
        return Ok(());
    };
    let gutter = d.line.to_string().len();
    let caret_at: String = line
        .chars()
        .take(d.column as usize - 1)
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    writeln!(err, "{:gutter$} |", "")?;
    writeln!(err, "{} | {line}", d.line)?;
    writeln!(err, "{:gutter$} | {caret_at}^", "")?;
    Ok(())
}
