//! GitLab webhooks: checking `X-Gitlab-Token` and reading `Push Hook`, `Tag Push Hook` and
//! `Merge Request Hook` deliveries.
//!
//! GitLab does not sign bodies; it sends the webhook's secret token as is. It is compared
//! with the project's secret through their SHA-256 digests, so the comparison takes the same
//! time whatever the token's length and wherever it first differs.
//!
//! Payload reference: <https://docs.gitlab.com/user/project/integrations/webhook_events/>.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    Commit, GitRef, Leaf, Parsed, PayloadError, SignatureError, changed_paths, commit_sha,
    first_name, is_zero_sha, opt_str, opt_u64, read, req_str, shown,
};
use flotilla_core::forge::ForgeEvent;

/// The secret token header (lowercase, as `http::HeaderName` spells it).
pub const TOKEN_HEADER: &str = "x-gitlab-token";
/// The event header: `Push Hook`, `Tag Push Hook`, `Merge Request Hook`, …
pub const EVENT_HEADER: &str = "x-gitlab-event";
/// A unique id per delivery (kept on retries), for deduplication and logs.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Merge request actions that may put new code on a merge request (`update` only when it
/// brought commits).
const BUILD_ACTIONS: [&str; 3] = ["open", "update", "reopen"];

/// Checks that `token_header` (the value of [`TOKEN_HEADER`]) is `secret`, in constant time.
///
/// An empty `secret` never verifies, so a project without one cannot be reached by a sender
/// that simply leaves the token empty.
pub fn verify(secret: &[u8], token_header: Option<&str>) -> Result<(), SignatureError> {
    let token = token_header
        .filter(|t| !t.is_empty())
        .ok_or(SignatureError::Missing)?;
    if secret.is_empty() {
        return Err(SignatureError::Mismatch);
    }
    let expected = Sha256::digest(secret);
    let given = Sha256::digest(token.as_bytes());
    if bool::from(expected.as_slice().ct_eq(given.as_slice())) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Reads a verified delivery of `event` (the value of [`EVENT_HEADER`]).
pub fn parse(event: &str, body: &[u8]) -> Result<Parsed, PayloadError> {
    match event {
        "" => Err(PayloadError::NoEvent {
            header: "X-Gitlab-Event",
        }),
        // Both carry the same fields; the ref says whether it was a branch or a tag.
        "Push Hook" | "Tag Push Hook" => push(read(body)?),
        "Merge Request Hook" => merge_request(read(body)?),
        other => Ok(Parsed::Ignored(format!(
            "event `{}` is not supported; Flotilla builds on Push Hook, Tag Push Hook and \
             Merge Request Hook",
            shown(other)
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a push payload object")]
struct Push {
    #[serde(rename = "ref")]
    git_ref: Leaf,
    after: Leaf,
    checkout_sha: Leaf,
    user_username: Leaf,
    user_name: Leaf,
    commits: Option<Vec<Commit>>,
    total_commits_count: Leaf,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a merge request payload object")]
struct MergeRequestEvent {
    object_attributes: Option<MergeRequest>,
    user: Option<User>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "the `object_attributes` object")]
struct MergeRequest {
    iid: Leaf,
    action: Leaf,
    source_branch: Leaf,
    target_branch: Leaf,
    oldrev: Leaf,
    last_commit: Option<LastCommit>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "the `object_attributes.last_commit` object")]
struct LastCommit {
    id: Leaf,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "the `user` object")]
struct User {
    username: Leaf,
}

fn push(p: Push) -> Result<Parsed, PayloadError> {
    let full_ref = req_str(p.git_ref, "ref")?;
    let Some(git_ref) = GitRef::parse(&full_ref, "ref")? else {
        return Ok(GitRef::ignored(&full_ref));
    };
    let after = req_str(p.after, "after")?;
    if is_zero_sha(&after) {
        return Ok(git_ref.deleted());
    }
    let actor = first_name([
        (p.user_username, "user_username"),
        (p.user_name, "user_name"),
    ])?;
    let event = match git_ref {
        GitRef::Branch(branch) => {
            let commits = p.commits.unwrap_or_default();
            // GitLab lists at most 20 commits and counts them all; empty on branch creation
            // (the files that differ are unknown, not none).
            let total = opt_u64(p.total_commits_count, "total_commits_count")?;
            let complete =
                !commits.is_empty() && total.is_some_and(|total| total <= commits.len() as u64);
            ForgeEvent::Push {
                branch,
                sha: commit_sha(after, "after")?,
                changed_paths: if complete {
                    Some(changed_paths(commits)?)
                } else {
                    None
                },
                actor,
            }
        }
        // For an annotated tag `after` is the tag object; `checkout_sha` is its commit.
        GitRef::Tag(name) => {
            let sha = match opt_str(p.checkout_sha, "checkout_sha")? {
                Some(sha) => commit_sha(sha, "checkout_sha")?,
                None => commit_sha(after, "after")?,
            };
            ForgeEvent::Tag { name, sha, actor }
        }
    };
    Ok(Parsed::Event(event))
}

fn merge_request(e: MergeRequestEvent) -> Result<Parsed, PayloadError> {
    let mr = e
        .object_attributes
        .ok_or_else(|| PayloadError::Missing("object_attributes".into()))?;
    let action = req_str(mr.action, "object_attributes.action")?;
    if !BUILD_ACTIONS.contains(&action.as_str()) {
        return Ok(Parsed::Ignored(format!(
            "merge request action `{}` does not start builds",
            shown(&action)
        )));
    }
    // GitLab sends `oldrev` on an update only when it pushed commits; other updates change the
    // title, labels, assignees and so on.
    let oldrev = opt_str(mr.oldrev, "object_attributes.oldrev")?;
    if action == "update" && oldrev.is_none_or(|rev| rev.is_empty()) {
        return Ok(Parsed::Ignored(
            "merge request updated without new commits".into(),
        ));
    }
    let number = opt_u64(mr.iid, "object_attributes.iid")?
        .ok_or_else(|| PayloadError::Missing("object_attributes.iid".into()))?;
    let last_commit = mr
        .last_commit
        .ok_or_else(|| PayloadError::Missing("object_attributes.last_commit".into()))?;
    Ok(Parsed::Event(ForgeEvent::PullRequest {
        number,
        source_branch: req_str(mr.source_branch, "object_attributes.source_branch")?,
        target_branch: req_str(mr.target_branch, "object_attributes.target_branch")?,
        sha: commit_sha(
            req_str(last_commit.id, "object_attributes.last_commit.id")?,
            "object_attributes.last_commit.id",
        )?,
        actor: first_name([(e.user.and_then(|u| u.username), "user.username")])?,
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    const PUSH: &str = include_str!("fixtures/gitlab/push.json");
    const TAG_PUSH: &str = include_str!("fixtures/gitlab/tag_push.json");
    const MR_OPEN: &str = include_str!("fixtures/gitlab/merge_request_open.json");
    const MR_UPDATE_WITH_OLDREV: &str =
        include_str!("fixtures/gitlab/merge_request_update_with_oldrev.json");
    const MR_UPDATE_WITHOUT_OLDREV: &str =
        include_str!("fixtures/gitlab/merge_request_update_without_oldrev.json");
    const MR_CLOSE: &str = include_str!("fixtures/gitlab/merge_request_close.json");
    const NOTE: &str = include_str!("fixtures/gitlab/note.json");

    const SECRET: &[u8] = b"glwht-4f1c0a9e2b7d";

    /// A fixture with one edit applied, as body bytes.
    fn edited(fixture: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut v: Value = serde_json::from_str(fixture).expect("fixtures are JSON");
        edit(&mut v);
        serde_json::to_vec(&v).expect("serialisable")
    }

    fn parse_ok(event: &str, body: &[u8]) -> Parsed {
        parse(event, body).unwrap_or_else(|e| panic!("{event} should parse: {e}"))
    }

    fn parse_err(event: &str, body: &[u8]) -> String {
        match parse(event, body) {
            Ok(p) => panic!("{event} should be refused, got {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn changed(body: &[u8]) -> Option<Vec<String>> {
        match parse_ok("Push Hook", body) {
            Parsed::Event(ForgeEvent::Push { changed_paths, .. }) => changed_paths,
            other => panic!("expected a push, got {other:?}"),
        }
    }

    #[test]
    fn the_right_token_verifies() {
        assert_eq!(verify(SECRET, Some("glwht-4f1c0a9e2b7d")), Ok(()));
    }

    #[test]
    fn a_wrong_token_or_a_prefix_or_extension_of_the_right_one_is_a_mismatch() {
        for token in [
            "glwht-4f1c0a9e2b7e",
            "glwht-4f1c0a9e2b7",
            "g",
            "glwht-4f1c0a9e2b7d ",
            "glwht-4f1c0a9e2b7dd",
            "GLWHT-4F1C0A9E2B7D",
        ] {
            assert_eq!(
                verify(SECRET, Some(token)),
                Err(SignatureError::Mismatch),
                "{token:?}"
            );
        }
    }

    #[test]
    fn a_missing_or_empty_token_is_missing() {
        assert_eq!(verify(SECRET, None), Err(SignatureError::Missing));
        assert_eq!(verify(SECRET, Some("")), Err(SignatureError::Missing));
        assert!(
            SignatureError::Missing
                .to_string()
                .contains("X-Gitlab-Token")
        );
    }

    #[test]
    fn an_empty_secret_verifies_nothing() {
        assert_eq!(verify(b"", Some("anything")), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_push_hook_becomes_a_push_with_the_sorted_union_of_changed_files() {
        assert_eq!(
            parse_ok("Push Hook", PUSH.as_bytes()),
            Parsed::Event(ForgeEvent::Push {
                branch: "master".into(),
                sha: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into(),
                changed_paths: Some(vec![
                    "CHANGELOG".into(),
                    "README".into(),
                    "app/controller/application.rb".into(),
                ]),
                actor: "jsmith".into(),
            })
        );
    }

    #[test]
    fn changed_files_are_unknown_when_gitlab_listed_fewer_commits_than_it_counted() {
        let truncated = edited(PUSH, |v| v["total_commits_count"] = 25.into());
        assert_eq!(changed(&truncated), None);
        let uncounted = edited(PUSH, |v| {
            v.as_object_mut().map(|o| o.remove("total_commits_count"));
        });
        assert_eq!(changed(&uncounted), None);
        // A new branch lists no commits: what differs is unknown, not nothing.
        let created = edited(PUSH, |v| {
            v["commits"] = Value::Array(vec![]);
            v["total_commits_count"] = 0.into();
        });
        assert_eq!(changed(&created), None);
    }

    #[test]
    fn the_username_is_the_actor_and_the_display_name_stands_in() {
        let body = edited(PUSH, |v| v["user_username"] = Value::Null);
        assert!(matches!(
            parse_ok("Push Hook", &body),
            Parsed::Event(ForgeEvent::Push { actor, .. }) if actor == "John Smith"
        ));
    }

    #[test]
    fn a_tag_push_hook_builds_the_checked_out_commit_not_the_tag_object() {
        assert_eq!(
            parse_ok("Tag Push Hook", TAG_PUSH.as_bytes()),
            Parsed::Event(ForgeEvent::Tag {
                name: "v1.0.0".into(),
                sha: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into(),
                actor: "jsmith".into(),
            })
        );
        let no_checkout = edited(TAG_PUSH, |v| v["checkout_sha"] = Value::Null);
        assert!(matches!(
            parse_ok("Tag Push Hook", &no_checkout),
            Parsed::Event(ForgeEvent::Tag { sha, .. })
                if sha == "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7"
        ));
    }

    #[test]
    fn a_deleted_branch_or_tag_is_ignored_and_named() {
        let zeros = "0".repeat(40);
        let branch = edited(PUSH, |v| {
            v["after"] = zeros.clone().into();
            v["checkout_sha"] = Value::Null;
            v["commits"] = Value::Array(vec![]);
            v["total_commits_count"] = 0.into();
        });
        assert_eq!(
            parse_ok("Push Hook", &branch),
            Parsed::Ignored("branch `master` was deleted".into())
        );
        let tag = edited(TAG_PUSH, |v| {
            v["before"] = v["after"].clone();
            v["after"] = zeros.clone().into();
            v["checkout_sha"] = Value::Null;
        });
        assert_eq!(
            parse_ok("Tag Push Hook", &tag),
            Parsed::Ignored("tag `v1.0.0` was deleted".into())
        );
    }

    #[test]
    fn push_payload_errors_name_the_field() {
        let bad_sha = edited(PUSH, |v| v["after"] = "da15608".into());
        assert_eq!(
            parse_err("Push Hook", &bad_sha),
            "`after` is not a commit sha (40 hex digits)"
        );
        let no_ref = edited(PUSH, |v| {
            v.as_object_mut().map(|o| o.remove("ref"));
        });
        assert_eq!(parse_err("Push Hook", &no_ref), "`ref` is missing");
        let bad_count = edited(PUSH, |v| v["total_commits_count"] = "2".into());
        assert_eq!(
            parse_err("Push Hook", &bad_count),
            "`total_commits_count` should be a non-negative integer"
        );
    }

    #[test]
    fn an_opened_merge_request_becomes_a_pull_request_event() {
        assert_eq!(
            parse_ok("Merge Request Hook", MR_OPEN.as_bytes()),
            Parsed::Event(ForgeEvent::PullRequest {
                number: 1,
                source_branch: "ms-viewport".into(),
                target_branch: "master".into(),
                sha: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into(),
                actor: "root".into(),
            })
        );
    }

    #[test]
    fn a_merge_request_update_with_new_commits_builds_the_new_head() {
        assert_eq!(
            parse_ok("Merge Request Hook", MR_UPDATE_WITH_OLDREV.as_bytes()),
            Parsed::Event(ForgeEvent::PullRequest {
                number: 1,
                source_branch: "ms-viewport".into(),
                target_branch: "master".into(),
                sha: "b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327".into(),
                actor: "user1".into(),
            })
        );
    }

    #[test]
    fn a_merge_request_update_without_new_commits_is_ignored() {
        assert_eq!(
            parse_ok("Merge Request Hook", MR_UPDATE_WITHOUT_OLDREV.as_bytes()),
            Parsed::Ignored("merge request updated without new commits".into())
        );
    }

    #[test]
    fn a_closed_merge_request_is_ignored_with_its_action_named() {
        assert_eq!(
            parse_ok("Merge Request Hook", MR_CLOSE.as_bytes()),
            Parsed::Ignored("merge request action `close` does not start builds".into())
        );
    }

    #[test]
    fn merge_request_payload_errors_name_the_field() {
        let no_iid = edited(MR_OPEN, |v| v["object_attributes"]["iid"] = Value::Null);
        assert_eq!(
            parse_err("Merge Request Hook", &no_iid),
            "`object_attributes.iid` is missing"
        );
        let no_last_commit = edited(MR_OPEN, |v| {
            v["object_attributes"]["last_commit"]["id"] = "".into();
        });
        assert_eq!(
            parse_err("Merge Request Hook", &no_last_commit),
            "`object_attributes.last_commit.id` is empty"
        );
    }

    #[test]
    fn other_events_such_as_notes_are_ignored_with_the_event_named() {
        assert_eq!(
            parse_ok("Note Hook", NOTE.as_bytes()),
            Parsed::Ignored(
                "event `Note Hook` is not supported; Flotilla builds on Push Hook, Tag Push \
                 Hook and Merge Request Hook"
                    .into()
            )
        );
    }

    #[test]
    fn a_delivery_without_an_event_header_is_a_payload_error() {
        assert_eq!(
            parse_err("", PUSH.as_bytes()),
            "the X-Gitlab-Event header is missing, so the delivery cannot be interpreted"
        );
    }
}
