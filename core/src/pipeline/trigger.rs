//! `on:` — which pushes, pull requests and tags start a build.
//!
//! Patterns are globs where `*` stays within one `/`-separated segment and `**` crosses them:
//! `release/*` matches `release/1.2` but not `release/1.2/hotfix`. Path filters look at the
//! files the event changed: `paths` needs at least one changed file that matches (and is not
//! ignored), `paths_ignore` skips the build when every changed file is ignored. When the forge
//! does not say which files changed, path filters let the build through: running an extra
//! build is cheaper than silently missing one.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

/// Which events start a build. `None` for an event kind means that kind never does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Triggers {
    /// Pushes to branches.
    pub push: Option<BranchFilter>,
    /// Pull/merge requests, filtered on their *target* branch.
    pub pull_request: Option<BranchFilter>,
    /// Tag pushes whose name matches one of these patterns.
    pub tag: Option<Vec<String>>,
}

/// Branch and path filters of a `push` or `pull_request` trigger. Empty lists filter nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchFilter {
    /// Branches that trigger (all when empty).
    pub branches: Vec<String>,
    /// Branches that never trigger, even if `branches` matches.
    pub branches_ignore: Vec<String>,
    /// At least one changed file must match one of these (when not empty).
    pub paths: Vec<String>,
    /// Changed files matching these do not count.
    pub paths_ignore: Vec<String>,
}

/// An event from a forge, as far as triggers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerEvent<'a> {
    /// Commits pushed to a branch.
    Push {
        /// The branch name, without `refs/heads/`.
        branch: &'a str,
        /// The files changed, if the forge said.
        changed_paths: Option<&'a [String]>,
    },
    /// A pull/merge request opened or updated.
    PullRequest {
        /// The branch it targets.
        target_branch: &'a str,
        /// The files changed, if the forge said.
        changed_paths: Option<&'a [String]>,
    },
    /// A tag pushed.
    Tag {
        /// The tag name, without `refs/tags/`.
        name: &'a str,
    },
}

/// Compiles one pattern the way triggers use it.
pub(crate) fn compile(pattern: &str) -> Result<Glob, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("invalid pattern `{pattern}`: {}", e.kind()))
}

fn set(patterns: &[String]) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        // Patterns were compiled once when the pipeline was parsed, so this cannot fail; a
        // pattern that somehow does is skipped rather than taking the federator down.
        if let Ok(g) = compile(p) {
            b.add(g);
        }
    }
    b.build().unwrap_or_else(|_| GlobSet::empty())
}

impl BranchFilter {
    fn check(&self, branch: &str, changed: Option<&[String]>, what: &str) -> Result<(), String> {
        if !self.branches.is_empty() && !set(&self.branches).is_match(branch) {
            return Err(format!("{what} branch `{branch}` is not in `branches`"));
        }
        if set(&self.branches_ignore).is_match(branch) {
            return Err(format!("{what} branch `{branch}` is in `branches_ignore`"));
        }
        let Some(changed) = changed else {
            return Ok(());
        };
        if self.paths.is_empty() && self.paths_ignore.is_empty() {
            return Ok(());
        }
        let ignore = set(&self.paths_ignore);
        let mut relevant = changed.iter().filter(|p| !ignore.is_match(p.as_str()));
        if self.paths.is_empty() {
            return match relevant.next() {
                Some(_) => Ok(()),
                None => Err("every changed file is in `paths_ignore`".into()),
            };
        }
        let wanted = set(&self.paths);
        if relevant.any(|p| wanted.is_match(p.as_str())) {
            Ok(())
        } else {
            Err("no changed file matches `paths`".into())
        }
    }
}

impl Triggers {
    /// The triggers used when a pipeline has no `on:`: every push and every pull request.
    pub fn default_when_absent() -> Self {
        Self {
            push: Some(BranchFilter::default()),
            pull_request: Some(BranchFilter::default()),
            tag: None,
        }
    }

    /// `Ok` when `event` starts a build; otherwise the reason it does not, for the
    /// `{"ignored": …}` answer and the build history.
    pub fn matches(&self, event: TriggerEvent<'_>) -> Result<(), String> {
        match event {
            TriggerEvent::Push {
                branch,
                changed_paths,
            } => match &self.push {
                None => Err("the pipeline has no `on.push` trigger".into()),
                Some(f) => f.check(branch, changed_paths, "pushed"),
            },
            TriggerEvent::PullRequest {
                target_branch,
                changed_paths,
            } => match &self.pull_request {
                None => Err("the pipeline has no `on.pull_request` trigger".into()),
                Some(f) => f.check(target_branch, changed_paths, "target"),
            },
            TriggerEvent::Tag { name } => match &self.tag {
                None => Err("the pipeline has no `on.tag` trigger".into()),
                Some(patterns) if set(patterns).is_match(name) => Ok(()),
                Some(_) => Err(format!("tag `{name}` matches no pattern in `on.tag`")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(branches: &[&str], paths: &[&str], paths_ignore: &[&str]) -> BranchFilter {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        BranchFilter {
            branches: v(branches),
            branches_ignore: vec![],
            paths: v(paths),
            paths_ignore: v(paths_ignore),
        }
    }

    fn push<'a>(branch: &'a str, changed: Option<&'a [String]>) -> TriggerEvent<'a> {
        TriggerEvent::Push {
            branch,
            changed_paths: changed,
        }
    }

    #[test]
    fn branch_globs_stay_within_one_segment() {
        let t = Triggers {
            push: Some(filter(&["main", "release/*"], &[], &[])),
            ..Triggers::default()
        };
        assert!(t.matches(push("main", None)).is_ok());
        assert!(t.matches(push("release/1.2", None)).is_ok());
        assert_eq!(
            t.matches(push("release/1.2/hotfix", None)),
            Err("pushed branch `release/1.2/hotfix` is not in `branches`".into())
        );
    }

    #[test]
    fn path_filters_need_one_relevant_changed_file() {
        let t = Triggers {
            push: Some(filter(&[], &["services/api/**"], &["**/*.md"])),
            ..Triggers::default()
        };
        let docs_only = vec!["services/api/README.md".to_string()];
        let code = vec![
            "services/api/src/main.go".to_string(),
            "README.md".to_string(),
        ];
        assert!(t.matches(push("dev", Some(&docs_only))).is_err());
        assert!(t.matches(push("dev", Some(&code))).is_ok());
        // Unknown changes: build rather than miss one.
        assert!(t.matches(push("dev", None)).is_ok());
    }

    #[test]
    fn paths_ignore_alone_skips_only_when_everything_is_ignored() {
        let t = Triggers {
            push: Some(filter(&[], &[], &["docs/**"])),
            ..Triggers::default()
        };
        let docs = vec!["docs/a.md".to_string()];
        let mixed = vec!["docs/a.md".to_string(), "src/lib.rs".to_string()];
        assert_eq!(
            t.matches(push("main", Some(&docs))),
            Err("every changed file is in `paths_ignore`".into())
        );
        assert!(t.matches(push("main", Some(&mixed))).is_ok());
    }

    #[test]
    fn tags_and_pull_requests_need_their_own_triggers() {
        let t = Triggers {
            tag: Some(vec!["v*".into()]),
            ..Triggers::default()
        };
        assert!(t.matches(TriggerEvent::Tag { name: "v1.2.0" }).is_ok());
        assert!(t.matches(TriggerEvent::Tag { name: "nightly" }).is_err());
        assert!(t.matches(push("main", None)).is_err());
        let pr = TriggerEvent::PullRequest {
            target_branch: "main",
            changed_paths: None,
        };
        assert!(t.matches(pr).is_err());
        assert!(Triggers::default_when_absent().matches(pr).is_ok());
    }
}
