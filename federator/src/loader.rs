//! Pipeline loading (ARCHITECTURE §9): after a delivery is committed, the leader reads the
//! pipeline file at the pushed commit, checks the triggers, evaluates `if:` and the
//! concurrency group, and commits the outcome as a [`Resolution`].
//!
//! [`resolve`] is the pure part (file bytes in, resolution out); [`load`] adds the
//! repository read with retries. Nothing is dropped silently: an unreadable or broken
//! pipeline fails the build with a message naming `file:line:col`, an event no trigger
//! matches skips it with the reason.

use std::collections::BTreeSet;
use std::time::Duration;

use flotilla_core::forge::{EventVars, ForgeEvent};
use flotilla_core::pipeline::{self, EVENT_VARIABLES, expr};
use flotilla_core::repo::{RepoError, RepoLocation, RepoSource, Revision};
use flotilla_core::state::{Build, Project, Resolution};

/// Tries for a repository that answers `Unavailable` before the build fails.
const READ_ATTEMPTS: u32 = 5;

/// Reads the project's pipeline at the build's commit and resolves it. Returns the commit
/// read (`None` if nothing could be read and the build named none) and the resolution.
pub async fn load(
    repos: &dyn RepoSource,
    project: &Project,
    build: &Build,
) -> (Option<String>, Resolution) {
    let location = RepoLocation {
        provider: project.provider,
        url: project.repo_url.clone(),
    };
    let rev = Revision {
        git_ref: build.git_ref.clone(),
        sha: build.sha.clone(),
    };
    let path = project.pipeline_path.as_str();
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    let fetched = loop {
        match repos.read_file(&location, &rev, path).await {
            Err(e) if e.is_retryable() && attempt < READ_ATTEMPTS => {
                tracing::warn!(build = %build.id, attempt, error = %e, "Pipeline read failed; retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 3).min(Duration::from_secs(10));
                attempt += 1;
            }
            other => break other,
        }
    };
    match fetched {
        Ok(file) => {
            let resolution = resolve(
                path,
                file.contents.as_deref(),
                &build.event,
                &file.sha,
                &project.repo_url,
            );
            (Some(file.sha), resolution)
        }
        Err(e) => (
            build.sha.clone(),
            Resolution::Failed(read_error(path, &build.git_ref, &project.repo_url, &e)),
        ),
    }
}

fn read_error(path: &str, git_ref: &str, url: &str, e: &RepoError) -> String {
    let hint = match e {
        RepoError::NotFound(_) => "check the project's repo_url and that the commit was pushed",
        RepoError::Denied(_) => "check the credentials configured for this forge",
        RepoError::Unavailable(_) => "the repository did not answer; retry the build later",
        RepoError::Invalid(_) => "fix the project's repo_url (file://, http:// or https://)",
    };
    format!("could not read {path} at {git_ref} from {url}: {e}; {hint}")
}

/// Resolves a pipeline file's contents for an event: parse, triggers, `if:`, concurrency.
pub fn resolve(
    path: &str,
    contents: Option<&[u8]>,
    event: &ForgeEvent,
    sha: &str,
    repo_url: &str,
) -> Resolution {
    let Some(bytes) = contents else {
        return Resolution::Failed(format!(
            "{path}: no such file at commit {sha}; add a pipeline file there or change the project's pipeline_path"
        ));
    };
    let Ok(source) = std::str::from_utf8(bytes) else {
        return Resolution::Failed(format!(
            "{path}: the file is not UTF-8 text; save it as UTF-8"
        ));
    };
    let mut pipeline = match pipeline::parse(path, source) {
        Ok(p) => p,
        Err(diagnostics) => {
            let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
            return Resolution::Failed(lines.join("\n"));
        }
    };
    if let Some(trigger) = event.trigger()
        && let Err(reason) = pipeline.triggers.matches(trigger)
    {
        return Resolution::Skipped(reason);
    }
    let vars = EventVars {
        event,
        sha,
        repo: repo_url,
    };
    // `if:` first, then drop jobs whose needs were dropped (transitively): a job that needs a
    // skipped job cannot run either.
    let mut kept: BTreeSet<String> = BTreeSet::new();
    for job in &pipeline.jobs {
        // Jobs come in dependency-respecting declaration order only sometimes, so iterate to a
        // fixed point below instead of relying on order.
        if job.runs_for(&vars) {
            kept.insert(job.name.clone());
        }
    }
    loop {
        let before = kept.len();
        let drop: Vec<String> = pipeline
            .jobs
            .iter()
            .filter(|j| kept.contains(&j.name) && j.needs.iter().any(|n| !kept.contains(n)))
            .map(|j| j.name.clone())
            .collect();
        for d in drop {
            kept.remove(&d);
        }
        if kept.len() == before {
            break;
        }
    }
    pipeline.jobs.retain(|j| kept.contains(&j.name));
    for job in &mut pipeline.jobs {
        for name in EVENT_VARIABLES {
            let value = expr::Context::var(&vars, &[name.to_owned()]);
            let value = match value {
                expr::Value::Str(s) => s,
                _ => String::new(),
            };
            job.env
                .insert(format!("FLOTILLA_{}", name.to_ascii_uppercase()), value);
        }
    }
    let concurrency = pipeline.concurrency.as_ref().map(|c| {
        let group = expr::Template::parse(&c.group)
            .map(|t| t.render(&vars))
            .unwrap_or_else(|_| c.group.clone());
        (group, c.cancel_in_progress)
    });
    Resolution::Jobs {
        jobs: pipeline.jobs,
        concurrency,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn push(branch: &str) -> ForgeEvent {
        ForgeEvent::Push {
            branch: branch.into(),
            sha: SHA.into(),
            changed_paths: None,
            actor: "dev".into(),
        }
    }

    const PIPELINE: &str = r#"version: 1
on: { push: { branches: [main] } }
concurrency: { group: "deploy-${{ branch }}", cancel_in_progress: true }
defaults: { image: "debian:12" }
jobs:
  build: { run: make }
  deploy:
    needs: [build]
    run: ./deploy
    if: "${{ branch == 'release' }}"
  notify: { needs: [deploy], run: ./notify }
"#;

    #[test]
    fn a_matching_push_gets_its_jobs_filtered_by_if_and_the_group_rendered() {
        let r = resolve(
            ".ci.yaml",
            Some(PIPELINE.as_bytes()),
            &push("main"),
            SHA,
            "u",
        );
        let Resolution::Jobs { jobs, concurrency } = r else {
            panic!("{r:?}")
        };
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(
            names,
            ["build"],
            "deploy's if is false and notify needs deploy"
        );
        assert_eq!(concurrency, Some(("deploy-main".into(), true)));
        assert_eq!(jobs[0].env["FLOTILLA_SHA"], SHA);
        assert_eq!(jobs[0].env["FLOTILLA_BRANCH"], "main");
        assert_eq!(jobs[0].env["FLOTILLA_TAG"], "");
    }

    #[test]
    fn a_push_no_trigger_matches_is_skipped_with_the_reason() {
        let r = resolve(
            ".ci.yaml",
            Some(PIPELINE.as_bytes()),
            &push("dev"),
            SHA,
            "u",
        );
        assert_eq!(
            r,
            Resolution::Skipped("pushed branch `dev` is not in `branches`".into())
        );
    }

    #[test]
    fn a_broken_pipeline_fails_with_file_line_and_column() {
        let r = resolve(
            "ci/pipeline.yaml",
            Some(b"version: 1\njobs:\n  a: { run: x, imag: y }\n"),
            &push("main"),
            SHA,
            "u",
        );
        let Resolution::Failed(msg) = r else {
            panic!("{r:?}")
        };
        assert!(msg.starts_with("ci/pipeline.yaml:3:"), "{msg}");
        assert!(msg.contains("imag"), "{msg}");
    }

    #[test]
    fn a_missing_or_binary_pipeline_file_fails_the_build_and_says_what_to_do() {
        let Resolution::Failed(m) = resolve(".ci.yaml", None, &push("main"), SHA, "u") else {
            panic!()
        };
        assert!(
            m.contains("no such file") && m.contains("pipeline_path"),
            "{m}"
        );
        let Resolution::Failed(m) =
            resolve(".ci.yaml", Some(&[0xff, 0xfe]), &push("main"), SHA, "u")
        else {
            panic!()
        };
        assert!(m.contains("UTF-8"), "{m}");
    }
}
