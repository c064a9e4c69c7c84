//! The pipeline spec v1 (`.ci.yaml`, ARCHITECTURE §5): parse, validate, expand.
//!
//! [`parse`] turns a file's text into a [`Pipeline`]: every matrix expanded into concrete
//! [`JobSpec`]s, defaults applied, durations and quantities in numbers, `needs` resolved to
//! expanded job names and proven acyclic. Anything wrong comes back as [`Diagnostic`]s, each
//! with `file:line:col` and a sentence on how to fix it, sorted by position.
//!
//! What depends on the build (branch, tag, commit…) is not resolved here: `if:` conditions,
//! cache keys and the concurrency group stay as expressions, checked for syntax and for the
//! variables they may use, and are evaluated later with an [`expr::Context`].
//!
//! Modules: [`expr`] (the expression language), `raw` (the document's shape), `yaml` (reading
//! with limits), `lower` (meaning and expansion), `units` (durations and quantities),
//! [`trigger`] (which events start a build).

pub mod expr;
mod lower;
mod raw;
pub mod trigger;
mod units;
mod yaml;

use std::fmt;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::dag::Dag;
use crate::ids::PoolName;
use crate::job::RetryPolicy;

pub use trigger::{TriggerEvent, Triggers};
pub use yaml::{MAX_ALIASES, MAX_DEPTH, MAX_NODES, MAX_REPLAYED_EVENTS, MAX_SOURCE_BYTES};

/// Most jobs one `jobs:` entry may expand to through its matrix.
pub const MAX_MATRIX_JOBS: usize = 256;
/// Most jobs in one pipeline after expansion: a monorepo's push can fan out to thousands of
/// jobs (the placement issue's burst is 5,000 from one push).
pub const MAX_JOBS: usize = 5000;
/// Longest `timeout` a job may ask for.
pub const MAX_TIMEOUT_SECS: u64 = 72 * 3600;
/// `timeout` when neither the job nor `defaults` sets one.
pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;
/// Longest artifact retention.
pub const MAX_EXPIRE_SECS: u64 = 365 * 86_400;
/// Artifact retention when `expire_in` is not set.
pub const DEFAULT_EXPIRE_SECS: u64 = 7 * 86_400;
/// CPU when neither the job nor `defaults` sets it: one core.
pub const DEFAULT_CPU_MILLIS: u64 = 1000;
/// Memory when neither the job nor `defaults` sets it: 2 GiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 2 << 30;

/// The variables an `if:` condition, a cache key or the concurrency group may use, besides
/// `matrix.<axis>`. Each is also given to every job as the environment variable
/// `FLOTILLA_<NAME>` (uppercased), which is how scripts should read them.
pub const EVENT_VARIABLES: [&str; 7] = ["event", "branch", "tag", "ref", "sha", "repo", "actor"];

/// One problem in a pipeline file, with where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// The file, as the caller named it.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// What is wrong, then how to fix it.
    pub message: String,
}

impl Diagnostic {
    pub(crate) fn new(file: &str, line: u32, column: u32, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    /// At a parser location, shifted `extra_columns` to the right; unknown positions become 1:1.
    pub(crate) fn at(
        file: &str,
        loc: serde_saphyr::Location,
        extra_columns: usize,
        message: impl Into<String>,
    ) -> Self {
        let clamp = |v: u64| u32::try_from(v.max(1)).unwrap_or(u32::MAX);
        let column =
            clamp(loc.column()).saturating_add(u32::try_from(extra_columns).unwrap_or(u32::MAX));
        Self::new(file, clamp(loc.line()), column, message)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for Diagnostic {}

/// A validated pipeline with every matrix expanded (versioned: this is spec v1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// The spec version the file declared (always 1 for now).
    pub version: u32,
    /// Which events start a build.
    pub triggers: Triggers,
    /// At most one build per group at a time, optionally cancelling older ones.
    pub concurrency: Option<Concurrency>,
    /// Every job, matrix-expanded, in the order the file declares them.
    pub jobs: Vec<JobSpec>,
}

/// `concurrency: {group, cancel_in_progress}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concurrency {
    /// A template over the event variables, such as `${{ ref }}`, rendered per build.
    pub group: String,
    /// Whether a new build in the group cancels the ones still running.
    pub cancel_in_progress: bool,
}

/// One job after matrix expansion and defaults: what a runner is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Unique within the pipeline: the `jobs:` key, plus `(values…)` for a matrix job.
    pub name: String,
    /// The `jobs:` key this job was expanded from.
    pub key: String,
    /// The matrix values of this expansion (empty without a matrix).
    pub matrix: IndexMap<String, String>,
    /// Container image.
    pub image: String,
    /// The commands, in order. `run:` becomes one step named `run`.
    pub steps: Vec<Step>,
    /// Names of the expanded jobs that must succeed first.
    pub needs: Vec<String>,
    /// Longest the job may run, counted from when it starts running (not from queueing).
    pub timeout_secs: u64,
    /// Requested CPU and memory.
    pub resources: Resources,
    /// Environment: the pipeline's `env`, overridden by the job's.
    pub env: IndexMap<String, String>,
    /// Build cache, kept per cell.
    pub cache: Option<CacheSpec>,
    /// Files to keep after the job.
    pub artifacts: Option<ArtifactSpec>,
    /// Names of the project secrets the job receives as environment variables.
    pub secrets: Vec<String>,
    /// Retry budget per failure class.
    pub retry: RetryPolicy,
    /// Where the job may run.
    pub placement: Placement,
    /// The `if:` condition, evaluated when the build is created; `None` means always.
    pub condition: Option<String>,
}

/// One command of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Shown in logs and the UI; `step N` when not given.
    pub name: String,
    /// The shell script, run with `bash -eo pipefail`.
    pub run: String,
}

/// CPU and memory, as Kubernetes requests and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Bytes.
    pub memory_bytes: u64,
}

impl Resources {
    /// Reads Kubernetes-style amounts, as a pipeline's `resources` does: CPU `"2"`, `"1.5"`
    /// or `"500m"`; memory `"2Gi"`, `"512Mi"`, `"1G"`. `Err` says what is wrong.
    pub fn parse(cpu: &str, memory: &str) -> Result<Self, String> {
        Ok(Self {
            cpu_millis: units::parse_cpu(cpu)?,
            memory_bytes: units::parse_memory(memory)?,
        })
    }

    /// Whether both amounts are at most `other`'s.
    pub fn fits_within(&self, other: &Resources) -> bool {
        self.cpu_millis <= other.cpu_millis && self.memory_bytes <= other.memory_bytes
    }

    /// The larger of each amount.
    pub fn max(&self, other: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.max(other.cpu_millis),
            memory_bytes: self.memory_bytes.max(other.memory_bytes),
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {}, memory {}",
            units::format_cpu(self.cpu_millis),
            units::format_memory(self.memory_bytes)
        )
    }
}

/// `cache: {key, paths}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// A template (matrix values already filled in); the runner renders the rest, including
    /// `hash(...)`.
    pub key: String,
    /// Workspace-relative paths to save and restore.
    pub paths: Vec<String>,
}

/// `artifacts: {paths, expire_in}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSpec {
    /// Workspace-relative paths or globs to upload.
    pub paths: Vec<String>,
    /// How long they are kept.
    pub expire_in_secs: u64,
}

/// `placement: {region, labels, pool}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Only cells in this region.
    pub region: Option<String>,
    /// Only cells carrying all of these labels.
    pub labels: IndexMap<String, String>,
    /// The runner pool within the cell.
    pub pool: Option<PoolName>,
}

impl Pipeline {
    /// The job graph over [`Pipeline::jobs`] (node `i` is `jobs[i]`).
    pub fn dag(&self) -> Dag {
        let index: std::collections::HashMap<&str, usize> = self
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.name.as_str(), i))
            .collect();
        let needs = self
            .jobs
            .iter()
            .map(|j| j.needs.iter().map(|n| index[n.as_str()]).collect())
            .collect();
        Dag::new(needs).expect("parse() rejects cycles")
    }

    /// The jobs grouped in stages: every job's needs are in earlier stages.
    pub fn stages(&self) -> Vec<Vec<&JobSpec>> {
        self.dag()
            .stages()
            .into_iter()
            .map(|stage| stage.into_iter().map(|i| &self.jobs[i]).collect())
            .collect()
    }

    /// Looks a job up by its expanded name.
    pub fn job(&self, name: &str) -> Option<&JobSpec> {
        self.jobs.iter().find(|j| j.name == name)
    }
}

impl JobSpec {
    /// Whether this job runs for a build with these event variables (its `if:`).
    pub fn runs_for(&self, vars: &dyn expr::Context) -> bool {
        let Some(cond) = &self.condition else {
            return true;
        };
        let expr = expr::Expr::parse(cond).expect("parse() validated the condition");
        let with_matrix = MatrixContext {
            matrix: &self.matrix,
            rest: vars,
        };
        expr.eval(&with_matrix).truthy()
    }
}

/// Adds `matrix.<axis>` to another context.
struct MatrixContext<'a> {
    matrix: &'a IndexMap<String, String>,
    rest: &'a dyn expr::Context,
}

impl expr::Context for MatrixContext<'_> {
    fn var(&self, path: &[String]) -> expr::Value {
        match path {
            [m, axis] if m == "matrix" => self
                .matrix
                .get(axis)
                .map_or(expr::Value::Null, |v| expr::Value::Str(v.clone())),
            _ => self.rest.var(path),
        }
    }
}

/// Parses, validates and expands the pipeline in `source`. `file` is used only in diagnostics.
pub fn parse(file: &str, source: &str) -> Result<Pipeline, Vec<Diagnostic>> {
    let raw: raw::RawPipeline = yaml::read(file, source).map_err(|d| vec![d])?;
    lower::lower(file, source, raw)
}

#[cfg(test)]
mod tests;
