//! What a forge (GitHub, GitLab, a plain git server) tells us: the normalised event a webhook
//! or a manual trigger becomes, and how it maps onto pipeline triggers and event variables.
//!
//! Webhook payloads are parsed into [`ForgeEvent`] at the edge (the federator); from there on
//! nothing depends on which forge sent it.

use serde::{Deserialize, Serialize};

use crate::pipeline::TriggerEvent;
use crate::pipeline::expr::{Context, Value};

/// Where a project's repository lives, which decides the webhook format and the API used to
/// read files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// GitHub or GitHub Enterprise.
    Github,
    /// GitLab.com or self-managed GitLab.
    Gitlab,
    /// Any git server reachable by URL; builds are started manually or by the API.
    Git,
}

impl Provider {
    /// The lowercase name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Git => "git",
        }
    }

    /// Parses the API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "github" => Some(Provider::Github),
            "gitlab" => Some(Provider::Gitlab),
            "git" => Some(Provider::Git),
            _ => None,
        }
    }
}

/// What started a build, normalised across forges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForgeEvent {
    /// Commits pushed to a branch.
    Push {
        /// The branch, without `refs/heads/`.
        branch: String,
        /// The new head commit (40 hex digits).
        sha: String,
        /// Files the pushed commits changed, when the forge said (GitHub and GitLab list them
        /// per commit; the union is kept). `None` when unknown or truncated.
        changed_paths: Option<Vec<String>>,
        /// Who pushed.
        actor: String,
    },
    /// A pull/merge request opened, reopened or updated.
    PullRequest {
        /// The PR/MR number (GitLab: the `iid`).
        number: u64,
        /// Its source branch.
        source_branch: String,
        /// The branch it targets.
        target_branch: String,
        /// The head commit of the source branch.
        sha: String,
        /// Who opened or updated it.
        actor: String,
    },
    /// A tag pushed.
    Tag {
        /// The tag, without `refs/tags/`.
        name: String,
        /// The commit it points at.
        sha: String,
        /// Who pushed it.
        actor: String,
    },
    /// Started through the API (`POST /projects/{id}/builds`).
    Manual {
        /// The full ref, such as `refs/heads/main`, or a bare branch name.
        git_ref: String,
        /// The commit, when the caller gave one; otherwise the ref's head when loaded.
        sha: Option<String>,
        /// The token that asked.
        actor: String,
    },
}

impl ForgeEvent {
    /// The `event` variable: `push`, `pull_request`, `tag` or `manual`.
    pub fn kind(&self) -> &'static str {
        match self {
            ForgeEvent::Push { .. } => "push",
            ForgeEvent::PullRequest { .. } => "pull_request",
            ForgeEvent::Tag { .. } => "tag",
            ForgeEvent::Manual { .. } => "manual",
        }
    }

    /// The full git ref the build runs: `refs/heads/<branch>`, `refs/tags/<tag>`, or for a
    /// pull request its source branch. Loaders fetch the commit by sha first (forges serve
    /// pull-request heads, fork ones included, by id) and use this ref only as a fallback.
    pub fn git_ref(&self) -> String {
        match self {
            ForgeEvent::Push { branch, .. } => format!("refs/heads/{branch}"),
            ForgeEvent::PullRequest { source_branch, .. } => format!("refs/heads/{source_branch}"),
            ForgeEvent::Tag { name, .. } => format!("refs/tags/{name}"),
            ForgeEvent::Manual { git_ref, .. } => full_ref(git_ref),
        }
    }

    /// The commit, if known before loading (always, except a manual build by ref).
    pub fn sha(&self) -> Option<&str> {
        match self {
            ForgeEvent::Push { sha, .. }
            | ForgeEvent::PullRequest { sha, .. }
            | ForgeEvent::Tag { sha, .. } => Some(sha),
            ForgeEvent::Manual { sha, .. } => sha.as_deref(),
        }
    }

    /// Who caused it.
    pub fn actor(&self) -> &str {
        match self {
            ForgeEvent::Push { actor, .. }
            | ForgeEvent::PullRequest { actor, .. }
            | ForgeEvent::Tag { actor, .. }
            | ForgeEvent::Manual { actor, .. } => actor,
        }
    }

    /// The branch the build is for (a PR's source branch), if it is for one.
    pub fn branch(&self) -> Option<&str> {
        match self {
            ForgeEvent::Push { branch, .. } => Some(branch),
            ForgeEvent::PullRequest { source_branch, .. } => Some(source_branch),
            ForgeEvent::Tag { .. } => None,
            ForgeEvent::Manual { git_ref, .. } => match git_ref.strip_prefix("refs/heads/") {
                Some(branch) => Some(branch),
                None if !git_ref.starts_with("refs/") => Some(git_ref),
                None => None,
            },
        }
    }

    /// The tag the build is for, if any.
    pub fn tag(&self) -> Option<&str> {
        match self {
            ForgeEvent::Tag { name, .. } => Some(name),
            ForgeEvent::Manual { git_ref, .. } => git_ref.strip_prefix("refs/tags/"),
            _ => None,
        }
    }

    /// The event as `on:` triggers see it; `None` for manual builds, which always run.
    pub fn trigger(&self) -> Option<TriggerEvent<'_>> {
        match self {
            ForgeEvent::Push {
                branch,
                changed_paths,
                ..
            } => Some(TriggerEvent::Push {
                branch,
                changed_paths: changed_paths.as_deref(),
            }),
            ForgeEvent::PullRequest { target_branch, .. } => Some(TriggerEvent::PullRequest {
                target_branch,
                changed_paths: None,
            }),
            ForgeEvent::Tag { name, .. } => Some(TriggerEvent::Tag { name }),
            ForgeEvent::Manual { .. } => None,
        }
    }
}

/// `main` → `refs/heads/main`; full refs are kept.
pub fn full_ref(r: &str) -> String {
    if r.starts_with("refs/") {
        r.to_owned()
    } else {
        format!("refs/heads/{r}")
    }
}

/// The event variables of a build (`event`, `branch`, `tag`, `ref`, `sha`, `repo`, `actor`;
/// see [`crate::pipeline::EVENT_VARIABLES`]) for `if:` conditions and templates.
#[derive(Debug, Clone)]
pub struct EventVars<'a> {
    /// The event.
    pub event: &'a ForgeEvent,
    /// The resolved commit.
    pub sha: &'a str,
    /// The project's repository URL.
    pub repo: &'a str,
}

impl Context for EventVars<'_> {
    fn var(&self, path: &[String]) -> Value {
        let [name] = path else {
            return Value::Null;
        };
        let s = |v: &str| Value::Str(v.to_owned());
        match name.as_str() {
            "event" => s(self.event.kind()),
            "branch" => self.event.branch().map_or(Value::Null, s),
            "tag" => self.event.tag().map_or(Value::Null, s),
            "ref" => Value::Str(self.event.git_ref()),
            "sha" => s(self.sha),
            "repo" => s(self.repo),
            "actor" => s(self.event.actor()),
            _ => Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_builds_name_their_branch_whether_given_short_or_full() {
        for r in ["main", "refs/heads/main"] {
            let e = ForgeEvent::Manual {
                git_ref: r.into(),
                sha: None,
                actor: "a".into(),
            };
            assert_eq!(e.branch(), Some("main"));
            assert_eq!(e.git_ref(), "refs/heads/main");
        }
        let t = ForgeEvent::Manual {
            git_ref: "refs/tags/v1".into(),
            sha: None,
            actor: "a".into(),
        };
        assert_eq!((t.branch(), t.tag()), (None, Some("v1")));
    }
}
