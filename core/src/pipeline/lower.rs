//! From the document as written ([`super::raw`]) to a validated, expanded [`Pipeline`].
//!
//! Checks collect into a list instead of stopping at the first, so one run of
//! `flotilla validate` shows every problem. Where a value reaches jobs through `defaults`,
//! its problems are reported once, at the default.
//!
//! Templates (`${{ … }}`) have a *scope* per field. Fields that become part of the job the
//! runner receives (`image`, `run`, `env`, paths) may only use `matrix.<axis>`, filled in here.
//! Event values (branch, tag, …) are deliberately not allowed there: pasting a branch name into
//! a shell script lets whoever names the branch inject commands. Scripts read them from the
//! `FLOTILLA_*` environment variables instead. `if:`, `cache.key` and `concurrency.group` are
//! evaluated per build and may use them.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use serde_saphyr::Location;

use super::expr::{Expr, Func, Part, Template, Value};
use super::raw::{
    RawBranchFilter, RawDefaults, RawJob, RawMatrix, RawOn, RawPipeline, RawPlacement,
    RawResources, RawRetry, S, SMap,
};
use super::trigger::{self, BranchFilter, Triggers};
use super::units;
use super::*;
use crate::dag::{Cycle, Dag};
use crate::ids::PoolName;
use crate::job::RetryPolicy;
use crate::suggest;

/// Where a template is used, which decides what it may refer to.
#[derive(Clone, Copy)]
struct Scope<'a> {
    /// The field, for messages: "`image`", "`run`", …
    field: &'a str,
    /// The matrix axes available (`None`: no matrix in this context at all).
    axes: Option<&'a [String]>,
    /// Whether event variables (`branch`, …) may be used.
    events: bool,
    /// Whether `hash()` may be used.
    hash: bool,
    /// Whether the text runs in a shell (changes the advice about event variables).
    script: bool,
}

struct Lower<'a> {
    file: &'a str,
    source: &'a str,
    diags: Vec<Diagnostic>,
}

pub(super) fn lower(
    file: &str,
    source: &str,
    raw: RawPipeline,
) -> Result<Pipeline, Vec<Diagnostic>> {
    let mut cx = Lower {
        file,
        source,
        diags: Vec::new(),
    };
    let pipeline = cx.pipeline(raw);
    if cx.diags.is_empty() {
        return Ok(pipeline);
    }
    let mut seen = HashSet::new();
    let mut diags: Vec<Diagnostic> = cx
        .diags
        .into_iter()
        .filter(|d| seen.insert((d.line, d.column, d.message.clone())))
        .collect();
    diags.sort_by_key(|d| (d.line, d.column));
    Err(diags)
}

/// A job's `jobs:` entry together with what expanding it produced.
struct Expanded {
    key: S<String>,
    needs: Vec<S<String>>,
    specs: Vec<JobSpec>,
}

impl Lower<'_> {
    fn at(&mut self, loc: Location, message: impl Into<String>) {
        self.diags.push(Diagnostic::at(self.file, loc, 0, message));
    }

    /// Reports at character `offset` inside the scalar found at `loc`, stepping over an
    /// opening quote. For block scalars and multi-line values it points at the value itself.
    fn at_inside(&mut self, s: &S<String>, offset: usize, message: impl Into<String>) {
        let loc = s.referenced;
        let opener = loc
            .span()
            .byte_offset()
            .and_then(|b| self.source.get(usize::try_from(b).ok()?..))
            .and_then(|rest| rest.chars().next());
        let shift = match opener {
            Some('"' | '\'') => 1,
            Some('|' | '>') => {
                return self.at(loc, message);
            }
            _ => 0,
        };
        let before: String = s.value.chars().take(offset).collect();
        if before.contains('\n') {
            return self.at(loc, message);
        }
        self.diags
            .push(Diagnostic::at(self.file, loc, shift + offset, message));
    }

    fn pipeline(&mut self, raw: RawPipeline) -> Pipeline {
        if raw.version.value != 1 {
            self.at(
                raw.version.referenced,
                format!(
                    "unsupported pipeline version {}; this Flotilla reads `version: 1`",
                    raw.version.value
                ),
            );
        }
        let triggers = match &raw.on {
            Some(on) => self.triggers(on),
            None => Triggers::default_when_absent(),
        };
        let concurrency = raw.concurrency.as_ref().map(|c| {
            let group = &c.value.group;
            if group.value.trim().is_empty() {
                self.at(
                    group.referenced,
                    "`concurrency.group` is empty; name the group, for example `${{ ref }}`",
                );
            }
            let scope = Scope {
                field: "`concurrency.group`",
                axes: None,
                events: true,
                hash: false,
                script: false,
            };
            self.template(group, scope);
            Concurrency {
                group: group.value.clone(),
                cancel_in_progress: c.value.cancel_in_progress,
            }
        });
        let pipeline_env = raw.env.as_ref().map(|e| &e.value);
        self.check_env_names(pipeline_env);
        let defaults = raw.defaults.as_ref().map(|d| &d.value);
        let base = self.base_defaults(defaults);

        let jobs = &raw.jobs;
        if jobs.value.is_empty() {
            self.at(
                jobs.referenced,
                "the pipeline has no jobs; add at least one under `jobs:`",
            );
        }
        let keys: Vec<String> = jobs.value.keys().map(|k| k.value.clone()).collect();
        let mut expanded = Vec::new();
        for (key, job) in &jobs.value {
            self.check_job_name(key);
            let specs = self.job(key, &job.value, &base, defaults, pipeline_env);
            let needs = self.needs(key, &job.value, &keys);
            expanded.push(Expanded {
                key: key.clone(),
                needs,
                specs,
            });
        }

        let total: usize = expanded.iter().map(|e| e.specs.len()).sum();
        if total > MAX_JOBS {
            self.at(
                jobs.referenced,
                format!("the pipeline expands to {total} jobs, over the limit of {MAX_JOBS}; split it or shrink the matrices"),
            );
        }
        self.check_cycles(&expanded);
        self.check_unique_names(&expanded);

        // Resolve needs (job keys) to the expanded names of those jobs.
        let names_of: HashMap<&str, Vec<String>> = expanded
            .iter()
            .map(|e| {
                (
                    e.key.value.as_str(),
                    e.specs.iter().map(|s| s.name.clone()).collect(),
                )
            })
            .collect();
        let mut all = Vec::with_capacity(total);
        for e in &expanded {
            let needs: Vec<String> = e
                .needs
                .iter()
                .filter_map(|n| names_of.get(n.value.as_str()))
                .flatten()
                .cloned()
                .collect();
            for spec in &e.specs {
                let mut spec = spec.clone();
                spec.needs = needs.clone();
                all.push(spec);
            }
        }
        Pipeline {
            version: raw.version.value,
            triggers,
            concurrency,
            jobs: all,
        }
    }

    fn triggers(&mut self, on: &S<RawOn>) -> Triggers {
        let on_value = &on.value;
        let mut filter = |f: &S<Option<RawBranchFilter>>| -> BranchFilter {
            let Some(raw) = &f.value else {
                return BranchFilter::default();
            };
            BranchFilter {
                branches: self.patterns(raw.branches.as_deref(), "branches"),
                branches_ignore: self.patterns(raw.branches_ignore.as_deref(), "branches_ignore"),
                paths: self.patterns(raw.paths.as_deref(), "paths"),
                paths_ignore: self.patterns(raw.paths_ignore.as_deref(), "paths_ignore"),
            }
        };
        let push = on_value.push.as_ref().map(&mut filter);
        let pull_request = on_value.pull_request.as_ref().map(&mut filter);
        let tag = on_value
            .tag
            .as_ref()
            .map(|t| self.patterns(Some(&t.value), "tag"));
        if push.is_none() && pull_request.is_none() && tag.is_none() {
            self.at(
                on.referenced,
                "`on` has no triggers, so no build would ever start; add `push`, `pull_request` or `tag`",
            );
        }
        Triggers {
            push,
            pull_request,
            tag,
        }
    }

    fn patterns(&mut self, list: Option<&[S<String>]>, what: &str) -> Vec<String> {
        let mut out = Vec::new();
        for p in list.unwrap_or_default() {
            if let Some(rest) = p.value.strip_prefix('!') {
                let hint = if what.ends_with("_ignore") {
                    String::new()
                } else {
                    format!("; list `{rest}` under `{what}_ignore` instead")
                };
                self.at(
                    p.referenced,
                    format!("`!` negation is not supported in `{what}`{hint}"),
                );
            } else if p.value.is_empty() {
                self.at(p.referenced, format!("empty pattern in `{what}`; remove it or write a glob such as `main` or `src/**`"));
            } else if let Err(e) = trigger::compile(&p.value) {
                self.at(p.referenced, format!("{e}; fix the glob"));
            } else {
                out.push(p.value.clone());
            }
        }
        out
    }

    /// Values from `defaults:` that do not depend on the job, checked once.
    fn base_defaults(&mut self, d: Option<&RawDefaults>) -> Base {
        let mut base = Base {
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            resources: Resources {
                cpu_millis: DEFAULT_CPU_MILLIS,
                memory_bytes: DEFAULT_MEMORY_BYTES,
            },
            retry: RetryPolicy::default(),
            placement: Placement::default(),
        };
        let Some(d) = d else {
            return base;
        };
        if let Some(t) = &d.timeout {
            base.timeout_secs = self
                .duration(t, MAX_TIMEOUT_SECS)
                .unwrap_or(base.timeout_secs);
        }
        if let Some(r) = &d.resources {
            base.resources = self.resources(&r.value, base.resources);
        }
        if let Some(r) = &d.retry {
            base.retry = self.retry(&r.value, base.retry);
        }
        if let Some(p) = &d.placement {
            base.placement = self.placement(&p.value, &base.placement, None);
        }
        base
    }

    fn job(
        &mut self,
        key: &S<String>,
        job: &RawJob,
        base: &Base,
        defaults: Option<&RawDefaults>,
        pipeline_env: Option<&SMap>,
    ) -> Vec<JobSpec> {
        let name = key.value.as_str();
        let combos = match &job.matrix {
            Some(m) => self.matrix(name, m),
            None => vec![Combo::default()],
        };
        let has_matrix = job.matrix.is_some();
        let axes: Vec<String> = combos
            .iter()
            .flat_map(|c| c.values.keys().cloned())
            .collect::<indexmap::IndexSet<_>>()
            .into_iter()
            .collect();
        let axes_opt = has_matrix.then_some(axes.as_slice());
        let scope = |field, script| Scope {
            field,
            axes: axes_opt,
            events: false,
            hash: false,
            script,
        };

        // Parse every template once; failures are reported once, not per combination.
        let image_src = job
            .image
            .as_ref()
            .or(defaults.and_then(|d| d.image.as_ref()));
        let image =
            image_src.and_then(|s| self.template(s, scope("`image`", false)).map(|t| (s, t)));
        if image_src.is_none() {
            self.at(
                key.referenced,
                format!("job `{name}` has no image; set `image:` on the job or `defaults.image`"),
            );
        }
        let steps = self.steps(name, job, key, |cx, s| cx.template(s, scope("`run`", true)));
        let env = self.job_env(job, pipeline_env, scope("`env`", true));
        let cache = job.cache.as_ref().map(|c| {
            let key_scope = Scope {
                field: "`cache.key`",
                axes: axes_opt,
                events: true,
                hash: true,
                script: false,
            };
            let k = self.template(&c.value.key, key_scope);
            let paths = self.paths(&c.value.paths, "cache", scope("`cache.paths`", false));
            (k, paths)
        });
        let artifacts = job.artifacts.as_ref().map(|a| {
            let paths = self.paths(
                &a.value.paths,
                "artifacts",
                scope("`artifacts.paths`", false),
            );
            let expire = match &a.value.expire_in {
                Some(e) => self
                    .duration(e, MAX_EXPIRE_SECS)
                    .unwrap_or(DEFAULT_EXPIRE_SECS),
                None => DEFAULT_EXPIRE_SECS,
            };
            (paths, expire)
        });
        let condition = job
            .condition
            .as_ref()
            .and_then(|c| self.condition(c, axes_opt));

        let timeout_secs = match &job.timeout {
            Some(t) => self
                .duration(t, MAX_TIMEOUT_SECS)
                .unwrap_or(base.timeout_secs),
            None => base.timeout_secs,
        };
        let resources = match &job.resources {
            Some(r) => self.resources(&r.value, base.resources),
            None => base.resources,
        };
        let retry = match &job.retry {
            Some(r) => self.retry(&r.value, base.retry),
            None => base.retry,
        };
        let placement = match &job.placement {
            Some(p) => self.placement(&p.value, &base.placement, axes_opt),
            None => base.placement.clone(),
        };
        let secrets = self.secrets(job);

        let mut specs = Vec::with_capacity(combos.len());
        for combo in combos {
            let ctx = MatrixOnly(&combo.values);
            let mut placement = placement.clone();
            for (label, value) in &mut placement.labels {
                if value.contains("${{") {
                    let rendered = Template::parse(value)
                        .map(|t| t.render(&ctx))
                        .unwrap_or_default();
                    if !is_label_value(&rendered) || rendered.is_empty() {
                        self.at(key.referenced, format!("job `{name}` sets label `{label}` to `{rendered}` for one matrix combination, which is not a valid label value; use at most 63 letters, digits, `-`, `_` and `.`"));
                    }
                    *value = rendered;
                }
            }
            specs.push({
                let render = |t: &Template| t.render(&ctx);
                let job_name = if has_matrix {
                    format!("{name} ({})", combo.label.join(", "))
                } else {
                    name.to_owned()
                };
                JobSpec {
                    name: job_name,
                    key: name.to_owned(),
                    matrix: combo.values.clone(),
                    image: image.as_ref().map(|(_, t)| render(t)).unwrap_or_default(),
                    steps: steps
                        .iter()
                        .map(|(n, t)| Step {
                            name: n.clone(),
                            run: render(t),
                        })
                        .collect(),
                    needs: Vec::new(),
                    timeout_secs,
                    resources,
                    env: env.iter().map(|(k, t)| (k.clone(), render(t))).collect(),
                    cache: cache.as_ref().and_then(|(k, paths)| {
                        Some(CacheSpec {
                            key: k.as_ref()?.render_partially(&ctx, &|e| only_matrix(e)),
                            paths: paths.iter().map(render).collect(),
                        })
                    }),
                    artifacts: artifacts.as_ref().map(|(paths, expire)| ArtifactSpec {
                        paths: paths.iter().map(render).collect(),
                        expire_in_secs: *expire,
                    }),
                    secrets: secrets.clone(),
                    retry,
                    placement,
                    condition: condition.clone(),
                }
            });
        }
        specs
    }

    fn steps(
        &mut self,
        name: &str,
        job: &RawJob,
        key: &S<String>,
        mut template: impl FnMut(&mut Self, &S<String>) -> Option<Template>,
    ) -> Vec<(String, Template)> {
        match (&job.run, &job.steps) {
            (Some(_), Some(steps)) => {
                self.at(
                    steps.referenced,
                    format!("job `{name}` has both `run` and `steps`; keep one — move the `run` command into `steps`"),
                );
                Vec::new()
            }
            (None, None) => {
                self.at(
                    key.referenced,
                    format!(
                        "job `{name}` has nothing to run; add `run:` with a command, or `steps:`"
                    ),
                );
                Vec::new()
            }
            (Some(run), None) => {
                if run.value.trim().is_empty() {
                    self.at(
                        run.referenced,
                        format!("`run` of job `{name}` is empty; write the command to run"),
                    );
                }
                template(self, run)
                    .map(|t| vec![("run".to_owned(), t)])
                    .unwrap_or_default()
            }
            (None, Some(steps)) => {
                if steps.value.is_empty() {
                    self.at(
                        steps.referenced,
                        format!("`steps` of job `{name}` is empty; add at least one `- run:` step"),
                    );
                }
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                for (i, step) in steps.value.iter().enumerate() {
                    let step_name = match &step.value.name {
                        Some(n) => {
                            if !seen.insert(n.value.clone()) {
                                self.at(
                                    n.referenced,
                                    format!(
                                        "two steps of job `{name}` are named `{}`; rename one",
                                        n.value
                                    ),
                                );
                            }
                            n.value.clone()
                        }
                        None => format!("step {}", i + 1),
                    };
                    let run = &step.value.run;
                    if run.value.trim().is_empty() {
                        self.at(run.referenced, format!("step `{step_name}` of job `{name}` has an empty `run`; write the command to run"));
                    }
                    if let Some(t) = template(self, run) {
                        out.push((step_name, t));
                    }
                }
                out
            }
        }
    }

    fn job_env(
        &mut self,
        job: &RawJob,
        pipeline_env: Option<&SMap>,
        scope: Scope<'_>,
    ) -> Vec<(String, Template)> {
        let job_env = job.env.as_ref().map(|e| &e.value);
        self.check_env_names(job_env);
        let mut merged: IndexMap<String, Template> = IndexMap::new();
        for map in [pipeline_env, job_env].into_iter().flatten() {
            for (k, v) in map {
                // The pipeline's env is checked with the job's matrix in scope, as it ends up
                // in every job.
                if let Some(t) = self.template(v, scope) {
                    merged.insert(k.value.clone(), t);
                }
            }
        }
        merged.into_iter().collect()
    }

    fn check_env_names(&mut self, env: Option<&SMap>) {
        for k in env.into_iter().flat_map(|m| m.keys()) {
            if !is_env_name(&k.value) {
                self.at(k.referenced, format!("`{}` is not a valid environment variable name; use letters, digits and `_`, not starting with a digit", k.value));
            } else if k.value.starts_with("FLOTILLA_") {
                self.at(k.referenced, format!("`{}` is reserved: Flotilla sets FLOTILLA_* variables itself; choose another name", k.value));
            }
        }
    }

    fn secrets(&mut self, job: &RawJob) -> Vec<String> {
        let mut out = Vec::new();
        for s in job.secrets.iter().flat_map(|s| &s.value) {
            if !is_env_name(&s.value) {
                self.at(s.referenced, format!("`{}` is not a valid secret name; secrets become environment variables, so use letters, digits and `_`", s.value));
            } else if out.contains(&s.value) {
                self.at(
                    s.referenced,
                    format!("secret `{}` is listed twice; remove one", s.value),
                );
            } else {
                out.push(s.value.clone());
            }
        }
        out
    }

    fn paths(&mut self, list: &S<Vec<S<String>>>, what: &str, scope: Scope<'_>) -> Vec<Template> {
        if list.value.is_empty() {
            self.at(
                list.referenced,
                format!("`{what}.paths` is empty; list the workspace paths to keep"),
            );
        }
        let mut out = Vec::new();
        for p in &list.value {
            let v = &p.value;
            if v.trim().is_empty() {
                self.at(
                    p.referenced,
                    format!("empty path in `{what}.paths`; remove it"),
                );
            } else if v.starts_with('/') || v.starts_with('~') {
                self.at(p.referenced, format!("`{v}` is not inside the workspace; `{what}.paths` are relative to the repository root"));
            } else if v.split('/').any(|c| c == "..") {
                self.at(p.referenced, format!("`{v}` leaves the workspace through `..`; `{what}.paths` must stay inside the repository"));
            } else if let Some(t) = self.template(p, scope) {
                out.push(t);
            }
        }
        out
    }

    fn duration(&mut self, s: &S<String>, max: u64) -> Option<u64> {
        match units::parse_duration(&s.value, max) {
            Ok(v) => Some(v),
            Err(e) => {
                self.at(s.referenced, e);
                None
            }
        }
    }

    fn resources(&mut self, r: &RawResources, base: Resources) -> Resources {
        let mut out = base;
        if let Some(cpu) = &r.cpu {
            match units::parse_cpu(&cpu.value) {
                Ok(v) => out.cpu_millis = v,
                Err(e) => self.at(cpu.referenced, e),
            }
        }
        if let Some(mem) = &r.memory {
            match units::parse_memory(&mem.value) {
                Ok(v) => out.memory_bytes = v,
                Err(e) => self.at(mem.referenced, e),
            }
        }
        out
    }

    fn retry(&mut self, r: &RawRetry, base: RetryPolicy) -> RetryPolicy {
        let mut out = base;
        for (field, slot) in [(&r.infra, &mut out.infra), (&r.test, &mut out.test)] {
            if let Some(n) = field {
                if n.value > RetryPolicy::MAX_PER_CLASS {
                    self.at(
                        n.referenced,
                        format!(
                            "{} retries is more than the limit of {}; a job that fails this often needs fixing, not retrying",
                            n.value,
                            RetryPolicy::MAX_PER_CLASS
                        ),
                    );
                } else {
                    *slot = n.value;
                }
            }
        }
        out
    }

    /// Label values may use `matrix.<axis>` (a per-architecture build wants `arch:` from its
    /// matrix); they are kept as templates here and rendered per combination.
    fn placement(
        &mut self,
        p: &RawPlacement,
        base: &Placement,
        axes: Option<&[String]>,
    ) -> Placement {
        let mut out = base.clone();
        if let Some(region) = &p.region {
            if region.value.is_empty() || region.value.chars().any(char::is_whitespace) {
                self.at(
                    region.referenced,
                    format!(
                        "invalid region `{}`; write a region name such as eu-west",
                        region.value
                    ),
                );
            } else {
                out.region = Some(region.value.clone());
            }
        }
        if let Some(labels) = &p.labels {
            out.labels = IndexMap::new();
            for (k, v) in &labels.value {
                let templated = v.value.contains("${{");
                if !is_label_key(&k.value) {
                    self.at(k.referenced, format!("invalid label key `{}`; use letters, digits, `-`, `_`, `.` and one optional `prefix/`", k.value));
                } else if templated {
                    let scope = Scope {
                        field: "`placement.labels`",
                        axes,
                        events: false,
                        hash: false,
                        script: false,
                    };
                    if self.template(v, scope).is_some() {
                        out.labels.insert(k.value.clone(), v.value.clone());
                    }
                } else if !is_label_value(&v.value) {
                    self.at(v.referenced, format!("invalid label value `{}`; use at most 63 letters, digits, `-`, `_` and `.`", v.value));
                } else {
                    out.labels.insert(k.value.clone(), v.value.clone());
                }
            }
        }
        if let Some(pool) = &p.pool {
            match PoolName::new(pool.value.clone()) {
                Ok(name) => out.pool = Some(name),
                Err(e) => self.at(pool.referenced, format!("{e}")),
            }
        }
        out
    }

    fn check_job_name(&mut self, key: &S<String>) {
        let k = &key.value;
        let ok = !k.is_empty()
            && k.len() <= 64
            && k.starts_with(|c: char| c.is_ascii_alphanumeric())
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.at(key.referenced, format!("job name `{k}` is not allowed; use up to 64 letters, digits, `-`, `_` and `.`, starting with a letter or digit"));
        }
    }

    fn needs(&mut self, key: &S<String>, job: &RawJob, keys: &[String]) -> Vec<S<String>> {
        let mut out: Vec<S<String>> = Vec::new();
        for need in job.needs.iter().flat_map(|n| &n.value) {
            let n = &need.value;
            if n == &key.value {
                self.at(
                    need.referenced,
                    format!("job `{n}` needs itself; remove `{n}` from its `needs`"),
                );
            } else if !keys.contains(n) {
                let hint = suggest::hint(n, keys.iter().map(String::as_str));
                self.at(
                    need.referenced,
                    format!(
                        "job `{}` needs `{n}`, which is not a job in this pipeline{hint}",
                        key.value
                    ),
                );
            } else if !out.iter().any(|o| &o.value == n) {
                out.push(need.clone());
            }
        }
        out
    }

    fn check_cycles(&mut self, jobs: &[Expanded]) {
        let index: HashMap<&str, usize> = jobs
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key.value.as_str(), i))
            .collect();
        let needs = jobs
            .iter()
            .map(|e| e.needs.iter().map(|n| index[n.value.as_str()]).collect())
            .collect();
        if let Err(Cycle(cycle)) = Dag::new(needs) {
            let name = |i: usize| jobs[i].key.value.as_str();
            let links: Vec<String> = (0..cycle.len())
                .map(|k| {
                    format!(
                        "`{}` needs `{}`",
                        name(cycle[k]),
                        name(cycle[(k + 1) % cycle.len()])
                    )
                })
                .collect();
            let first = &jobs[cycle[0]];
            let second = name(cycle[1 % cycle.len()]);
            let loc = first
                .needs
                .iter()
                .find(|n| n.value == second)
                .map_or(first.key.referenced, |n| n.referenced);
            self.at(
                loc,
                format!(
                    "dependency cycle: {}; remove one of these needs",
                    links.join(", ")
                ),
            );
        }
    }

    fn check_unique_names(&mut self, jobs: &[Expanded]) {
        let mut seen = HashSet::new();
        for e in jobs {
            for spec in &e.specs {
                if !seen.insert(spec.name.clone()) {
                    self.at(
                        e.key.referenced,
                        format!("job `{}` expands to `{}` more than once; remove the repeated matrix value or `include` entry", e.key.value, spec.name),
                    );
                }
            }
        }
    }

    fn matrix(&mut self, name: &str, m: &S<RawMatrix>) -> Vec<Combo> {
        let raw = &m.value;
        let mut ok = true;
        for (axis, values) in &raw.axes {
            if !is_axis_name(&axis.value) {
                self.at(axis.referenced, format!("matrix axis `{}` is not a valid name; use letters, digits, `_` and `-`, starting with a letter", axis.value));
                ok = false;
            }
            if values.value.is_empty() {
                self.at(
                    values.referenced,
                    format!(
                        "matrix axis `{}` has no values; list at least one",
                        axis.value
                    ),
                );
                ok = false;
            }
        }
        if raw.axes.is_empty() && raw.include.is_empty() {
            self.at(m.referenced, format!("the matrix of job `{name}` has no axes; add `name: [values]` or remove `matrix`"));
            return vec![Combo::default()];
        }
        let product = raw
            .axes
            .iter()
            .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.value.len().max(1)));
        let limit = MAX_MATRIX_JOBS * 16;
        if product.is_none_or(|p| p > limit) {
            self.at(
                m.referenced,
                format!("the matrix of job `{name}` has more than {limit} combinations; the limit is {MAX_MATRIX_JOBS} jobs — split the job or use fewer values"),
            );
            return vec![Combo::default()];
        }
        if !ok {
            return vec![Combo::default()];
        }
        let axis_names: Vec<&str> = raw.axes.iter().map(|(a, _)| a.value.as_str()).collect();

        // Cartesian product, first axis varying slowest.
        let mut combos = if raw.axes.is_empty() {
            Vec::new()
        } else {
            vec![Combo::default()]
        };
        for (axis, values) in &raw.axes {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.value.iter().map(move |v| {
                        let mut c = c.clone();
                        c.values.insert(axis.value.clone(), v.value.clone());
                        c.label.push(v.value.clone());
                        c
                    })
                })
                .collect();
        }

        for entry in &raw.exclude {
            if !self.check_entry_keys(entry, &axis_names, "exclude") {
                continue;
            }
            for (k, v) in &entry.value {
                let axis_values = &raw
                    .axes
                    .iter()
                    .find(|(a, _)| a.value == k.value)
                    .expect("checked")
                    .1;
                if !axis_values.value.iter().any(|x| x.value == v.value) {
                    self.at(v.referenced, format!("`exclude` names `{}: {}`, but `{}` is not a value of that axis; fix the value or drop the entry", k.value, v.value, v.value));
                }
            }
            combos.retain(|c| {
                !entry
                    .value
                    .iter()
                    .all(|(k, v)| c.values.get(&k.value) == Some(&v.value))
            });
        }

        // `include`, as GitHub Actions defines it: an entry extends every combination it
        // agrees with on the original axes; an entry that agrees with none is a combination
        // of its own.
        for entry in &raw.include {
            if entry.value.is_empty() {
                self.at(
                    entry.referenced,
                    "empty `include` entry; give it `axis: value` pairs or remove it",
                );
                continue;
            }
            let on_axes: Vec<(&str, &str)> = entry
                .value
                .iter()
                .filter(|(k, _)| axis_names.contains(&k.value.as_str()))
                .map(|(k, v)| (k.value.as_str(), v.value.as_str()))
                .collect();
            let mut extended = false;
            for c in &mut combos {
                if on_axes
                    .iter()
                    .all(|(k, v)| c.values.get(*k).map(String::as_str) == Some(*v))
                {
                    for (k, v) in &entry.value {
                        if !axis_names.contains(&k.value.as_str()) {
                            c.values.insert(k.value.clone(), v.value.clone());
                        }
                    }
                    extended = true;
                }
            }
            if !extended {
                combos.push(Combo {
                    values: entry
                        .value
                        .iter()
                        .map(|(k, v)| (k.value.clone(), v.value.clone()))
                        .collect(),
                    label: entry.value.values().map(|v| v.value.clone()).collect(),
                });
            }
        }

        if combos.is_empty() {
            self.at(m.referenced, format!("the matrix of job `{name}` excludes every combination, so the job would never run; loosen `exclude`"));
            return vec![Combo::default()];
        }
        if combos.len() > MAX_MATRIX_JOBS {
            self.at(
                m.referenced,
                format!("the matrix of job `{name}` expands to {} jobs, over the limit of {MAX_MATRIX_JOBS}; split the job or use fewer values", combos.len()),
            );
            combos.truncate(MAX_MATRIX_JOBS);
        }
        combos
    }

    fn check_entry_keys(&mut self, entry: &S<SMap>, axes: &[&str], what: &str) -> bool {
        let mut ok = true;
        for k in entry.value.keys() {
            if !axes.contains(&k.value.as_str()) {
                let hint = suggest::hint(&k.value, axes.iter().copied());
                self.at(
                    k.referenced,
                    format!(
                        "`{what}` names `{}`, which is not a matrix axis{hint}",
                        k.value
                    ),
                );
                ok = false;
            }
        }
        ok
    }

    /// `if:` — an expression, optionally written as `${{ expression }}`.
    fn condition(&mut self, c: &S<String>, axes: Option<&[String]>) -> Option<String> {
        let text = c.value.as_str();
        let trimmed = text.trim();
        let (source, offset) = if trimmed.starts_with("${{") && trimmed.ends_with("}}") {
            let t = match Template::parse(text) {
                Ok(t) => t,
                Err(e) => {
                    self.at_inside(c, e.offset, e.message);
                    return None;
                }
            };
            match t.parts.as_slice() {
                [Part::Expr { offset, .. }] => {
                    let start = *offset;
                    let body: String = text.chars().skip(start).collect();
                    let end = body.rfind("}}").unwrap_or(body.len());
                    (body[..end].to_owned(), start)
                }
                _ => {
                    self.at(
                        c.referenced,
                        "`if` must be one expression; write it without text around the `${{ }}`",
                    );
                    return None;
                }
            }
        } else {
            (text.to_owned(), 0)
        };
        let expr = match Expr::parse(&source) {
            Ok(e) => e,
            Err(e) => {
                self.at_inside(c, offset + e.offset, e.message);
                return None;
            }
        };
        let scope = Scope {
            field: "`if`",
            axes,
            events: true,
            hash: false,
            script: false,
        };
        self.check_expr(c, &expr, offset, scope)
            .then(|| source.trim().to_owned())
    }

    /// Parses a template and checks what it refers to against `scope`.
    fn template(&mut self, s: &S<String>, scope: Scope<'_>) -> Option<Template> {
        let t = match Template::parse(&s.value) {
            Ok(t) => t,
            Err(e) => {
                self.at_inside(s, e.offset, e.message);
                return None;
            }
        };
        let mut ok = true;
        for part in &t.parts {
            if let Part::Expr { expr, offset, .. } = part {
                ok &= self.check_expr(s, expr, *offset, scope);
            }
        }
        ok.then_some(t)
    }

    fn check_expr(&mut self, s: &S<String>, expr: &Expr, base: usize, scope: Scope<'_>) -> bool {
        let mut problems: Vec<(usize, String)> = Vec::new();
        expr.visit_vars(&mut |path, at| {
            if let Some(msg) = var_problem(path, scope) {
                problems.push((base + at, msg));
            }
        });
        expr.visit_calls(&mut |f, at| {
            if f == Func::Hash && !scope.hash {
                problems.push((
                    base + at,
                    format!(
                        "`hash()` can only be used in `cache.key`, not in {}",
                        scope.field
                    ),
                ));
            }
        });
        let ok = problems.is_empty();
        for (at, msg) in problems {
            self.at_inside(s, at, msg);
        }
        ok
    }
}

/// What is wrong with referring to `path` in `scope`, if anything.
fn var_problem(path: &[String], scope: Scope<'_>) -> Option<String> {
    let full = path.join(".");
    match path {
        [m, axis] if m == "matrix" => match scope.axes {
            None => Some(format!(
                "`{full}` has no value here: {} is not inside a job with a matrix",
                scope.field
            )),
            Some(axes) if !axes.contains(axis) => Some(format!(
                "`{full}` is not an axis of this job's matrix{}",
                suggest::hint(axis, axes.iter().map(String::as_str))
            )),
            Some(_) => None,
        },
        [m, ..] if m == "matrix" => Some(format!(
            "write a matrix value as `matrix.<axis>`, not `{full}`"
        )),
        [v] if EVENT_VARIABLES.contains(&v.as_str()) => {
            if scope.events {
                None
            } else if scope.script {
                Some(format!(
                    "`{v}` cannot be pasted into {}: it is chosen by whoever pushes, so it could inject commands; read the environment variable $FLOTILLA_{} instead",
                    scope.field,
                    v.to_uppercase()
                ))
            } else {
                Some(format!(
                    "`{v}` cannot be used in {}; only `matrix.<axis>` values can",
                    scope.field
                ))
            }
        }
        _ => {
            let mut known: Vec<&str> = EVENT_VARIABLES.to_vec();
            known.push("matrix");
            let hint = suggest::hint(&full, known.iter().copied());
            let hint = if hint.is_empty() {
                format!(
                    "; the variables are {} and matrix.<axis>",
                    EVENT_VARIABLES.join(", ")
                )
            } else {
                hint
            };
            Some(format!("unknown variable `{full}`{hint}"))
        }
    }
}

fn only_matrix(e: &Expr) -> bool {
    let mut ok = true;
    e.visit_vars(&mut |p, _| ok &= p.first().is_some_and(|m| m == "matrix"));
    e.visit_calls(&mut |f, _| ok &= f != Func::Hash);
    ok
}

/// Job-independent values from `defaults:`.
struct Base {
    timeout_secs: u64,
    resources: Resources,
    retry: RetryPolicy,
    placement: Placement,
}

/// One matrix combination: its values, and the values that name it.
#[derive(Debug, Clone, Default)]
struct Combo {
    values: IndexMap<String, String>,
    label: Vec<String>,
}

/// Evaluates `matrix.<axis>` from one combination; nothing else has a value at parse time.
struct MatrixOnly<'a>(&'a IndexMap<String, String>);

impl super::expr::Context for MatrixOnly<'_> {
    fn var(&self, path: &[String]) -> Value {
        match path {
            [m, axis] if m == "matrix" => self
                .0
                .get(axis)
                .map_or(Value::Null, |v| Value::Str(v.clone())),
            _ => Value::Null,
        }
    }
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_axis_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_label_key(s: &str) -> bool {
    let name = s.rsplit_once('/').map_or(s, |(_, n)| n);
    !name.is_empty()
        && name.len() <= 63
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
