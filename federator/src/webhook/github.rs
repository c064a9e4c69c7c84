//! GitHub webhooks: checking `X-Hub-Signature-256` and reading `push`, `pull_request` and
//! `ping` deliveries.
//!
//! GitHub signs the raw body with HMAC-SHA256 under the webhook's secret and sends
//! `sha256=<64 lowercase hex digits>`. The legacy `X-Hub-Signature` (`sha1=`) is refused: it
//! is only sent alongside the SHA-256 one, and accepting it would let a downgrade through.
//! Note that the `X-GitHub-Event` header is not covered by the signature; a captured delivery
//! could be replayed under another event name, which at worst reads a body as the wrong
//! event and fails or ignores it (the required fields differ).
//!
//! Payload reference: <https://docs.github.com/en/webhooks/webhook-events-and-payloads>.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde::de::IgnoredAny;
use sha2::Sha256;

use super::{
    Commit, GitRef, Leaf, Parsed, PayloadError, SignatureError, changed_paths, commit_sha,
    first_name, is_zero_sha, opt_bool, opt_str, opt_u64, read, req_str, shown,
};
use flotilla_core::forge::ForgeEvent;

/// The signature header (lowercase, as `http::HeaderName` spells it).
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// The event name header: `push`, `pull_request`, `ping`, …
pub const EVENT_HEADER: &str = "x-github-event";
/// A unique id per delivery (kept on redelivery), for deduplication and logs.
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// GitHub lists at most this many commits in a push; a push listing this many may have had
/// more, so its changed files are unknown.
const MAX_LISTED_COMMITS: usize = 2048;

/// `pull_request` actions that put new code on a pull request.
const BUILD_ACTIONS: [&str; 3] = ["opened", "synchronize", "reopened"];

/// Checks that `signature_header` (the value of [`SIGNATURE_HEADER`]) is the HMAC-SHA256 of
/// `body` under `secret`, in constant time.
///
/// An empty `secret` never verifies: anyone can compute an HMAC under the empty key, so a
/// project without a secret must not look like one whose deliveries are authenticated.
pub fn verify(
    secret: &[u8],
    body: &[u8],
    signature_header: Option<&str>,
) -> Result<(), SignatureError> {
    let header = signature_header
        .filter(|h| !h.is_empty())
        .ok_or(SignatureError::Missing)?;
    let Some(hex_digest) = header.strip_prefix("sha256=") else {
        return Err(SignatureError::Malformed(if header.starts_with("sha1=") {
            "only sha256= signatures are accepted"
        } else {
            "expected `sha256=` followed by 64 hex digits"
        }));
    };
    if hex_digest.len() != 64 {
        return Err(SignatureError::Malformed(
            "the sha256 digest must be 64 hex digits",
        ));
    }
    // GitHub sends lowercase; anything else did not come from GitHub.
    if !hex_digest
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(SignatureError::Malformed(
            "the sha256 digest must be lowercase hex digits",
        ));
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut digest)
        .map_err(|_| SignatureError::Malformed("the sha256 digest must be lowercase hex digits"))?;
    if secret.is_empty() {
        return Err(SignatureError::Mismatch);
    }
    // HMAC takes keys of any length, so this cannot fail; refusing is the safe answer if it did.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| SignatureError::Mismatch)?;
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&digest)
        .map_err(|_| SignatureError::Mismatch)
}

/// Reads a verified delivery of `event` (the value of [`EVENT_HEADER`]).
pub fn parse(event: &str, body: &[u8]) -> Result<Parsed, PayloadError> {
    match event {
        "" => Err(PayloadError::NoEvent {
            header: "X-GitHub-Event",
        }),
        "push" => push(read(body)?),
        "pull_request" => pull_request(read(body)?),
        // The body is not needed, but a ping is the moment to tell a hook configured as
        // form-encoded that every later delivery would fail.
        "ping" => read::<IgnoredAny>(body).map(|_| Parsed::Ping),
        other => Ok(Parsed::Ignored(format!(
            "event `{}` is not supported; Flotilla builds on push and pull_request",
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
    deleted: Leaf,
    commits: Option<Vec<Commit>>,
    head_commit: Option<HeadCommit>,
    pusher: Option<Pusher>,
    sender: Option<Sender>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "the `head_commit` object")]
struct HeadCommit {
    id: Leaf,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "the `pusher` object")]
struct Pusher {
    name: Leaf,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "the `sender` object")]
struct Sender {
    login: Leaf,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a pull_request payload object")]
struct PullRequestEvent {
    action: Leaf,
    number: Leaf,
    pull_request: Option<PullRequest>,
    sender: Option<Sender>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "the `pull_request` object")]
struct PullRequest {
    number: Leaf,
    head: Option<Branch>,
    base: Option<Branch>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a branch object (`pull_request.head` or `pull_request.base`)")]
struct Branch {
    #[serde(rename = "ref")]
    git_ref: Leaf,
    sha: Leaf,
}

fn push(p: Push) -> Result<Parsed, PayloadError> {
    let full_ref = req_str(p.git_ref, "ref")?;
    let Some(git_ref) = GitRef::parse(&full_ref, "ref")? else {
        return Ok(GitRef::ignored(&full_ref));
    };
    let after = req_str(p.after, "after")?;
    if opt_bool(p.deleted, "deleted")?.unwrap_or(false) || is_zero_sha(&after) {
        return Ok(git_ref.deleted());
    }
    let actor = first_name([
        (p.pusher.and_then(|x| x.name), "pusher.name"),
        (p.sender.and_then(|x| x.login), "sender.login"),
    ])?;
    let event = match git_ref {
        GitRef::Branch(branch) => ForgeEvent::Push {
            branch,
            sha: commit_sha(after, "after")?,
            changed_paths: match p.commits {
                // Empty on branch creation and on a force push to an older commit: the files
                // that differ are unknown, not none.
                Some(c) if !c.is_empty() && c.len() < MAX_LISTED_COMMITS => Some(changed_paths(c)?),
                _ => None,
            },
            actor,
        },
        // For an annotated tag `after` is the tag object, not a commit; `head_commit` is the
        // commit it points at (GitHub has sent it on every tag push since October 2021).
        GitRef::Tag(name) => {
            let head = p.head_commit.and_then(|c| c.id);
            let sha = match opt_str(head, "head_commit.id")? {
                Some(id) => commit_sha(id, "head_commit.id")?,
                None => commit_sha(after, "after")?,
            };
            ForgeEvent::Tag { name, sha, actor }
        }
    };
    Ok(Parsed::Event(event))
}

fn pull_request(e: PullRequestEvent) -> Result<Parsed, PayloadError> {
    let action = req_str(e.action, "action")?;
    if !BUILD_ACTIONS.contains(&action.as_str()) {
        return Ok(Parsed::Ignored(format!(
            "pull_request action `{}` does not start builds",
            shown(&action)
        )));
    }
    let pr = e
        .pull_request
        .ok_or_else(|| PayloadError::Missing("pull_request".into()))?;
    let number = match opt_u64(e.number, "number")? {
        Some(n) => n,
        None => opt_u64(pr.number, "pull_request.number")?
            .ok_or_else(|| PayloadError::Missing("number".into()))?,
    };
    let head = pr
        .head
        .ok_or_else(|| PayloadError::Missing("pull_request.head".into()))?;
    let base = pr
        .base
        .ok_or_else(|| PayloadError::Missing("pull_request.base".into()))?;
    Ok(Parsed::Event(ForgeEvent::PullRequest {
        number,
        source_branch: req_str(head.git_ref, "pull_request.head.ref")?,
        target_branch: req_str(base.git_ref, "pull_request.base.ref")?,
        sha: commit_sha(
            req_str(head.sha, "pull_request.head.sha")?,
            "pull_request.head.sha",
        )?,
        actor: first_name([(e.sender.and_then(|s| s.login), "sender.login")])?,
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    const PUSH_BRANCH: &str = include_str!("fixtures/github/push_branch.json");
    const PUSH_TAG: &str = include_str!("fixtures/github/push_tag.json");
    const PUSH_BRANCH_DELETED: &str = include_str!("fixtures/github/push_branch_deleted.json");
    const PR_OPENED: &str = include_str!("fixtures/github/pull_request_opened.json");
    const PR_SYNCHRONIZE: &str = include_str!("fixtures/github/pull_request_synchronize.json");
    const PR_CLOSED: &str = include_str!("fixtures/github/pull_request_closed.json");
    const PING: &str = include_str!("fixtures/github/ping.json");
    const ISSUES: &str = include_str!("fixtures/github/issues_opened.json");

    /// GitHub's documented example ("Validating webhook deliveries").
    const DOC_SECRET: &[u8] = b"It's a Secret to Everybody";
    const DOC_BODY: &[u8] = b"Hello, World!";
    const DOC_SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

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

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn githubs_published_example_verifies() {
        assert_eq!(verify(DOC_SECRET, DOC_BODY, Some(DOC_SIGNATURE)), Ok(()));
        assert_eq!(sign(DOC_SECRET, DOC_BODY), DOC_SIGNATURE);
    }

    #[test]
    fn a_signature_with_one_digit_changed_is_a_mismatch() {
        let forged = DOC_SIGNATURE.replace("757107ea", "757107eb");
        assert_eq!(
            verify(DOC_SECRET, DOC_BODY, Some(&forged)),
            Err(SignatureError::Mismatch)
        );
        let last_digit = format!("{}6", &DOC_SIGNATURE[..DOC_SIGNATURE.len() - 1]);
        assert_eq!(
            verify(DOC_SECRET, DOC_BODY, Some(&last_digit)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_signature_made_with_another_secret_or_for_another_body_is_a_mismatch() {
        assert_eq!(
            verify(b"another secret", DOC_BODY, Some(DOC_SIGNATURE)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(DOC_SECRET, b"Hello, World?", Some(DOC_SIGNATURE)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_truncated_or_overlong_signature_is_malformed() {
        let short = &DOC_SIGNATURE[..DOC_SIGNATURE.len() - 2];
        let long = format!("{DOC_SIGNATURE}00");
        for sig in [short, long.as_str(), "sha256="] {
            assert_eq!(
                verify(DOC_SECRET, DOC_BODY, Some(sig)),
                Err(SignatureError::Malformed(
                    "the sha256 digest must be 64 hex digits"
                )),
                "{sig}"
            );
        }
    }

    #[test]
    fn sha1_signatures_are_refused_as_malformed() {
        let err = verify(
            DOC_SECRET,
            DOC_BODY,
            Some("sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59"),
        )
        .expect_err("sha1 is refused");
        assert_eq!(
            err,
            SignatureError::Malformed("only sha256= signatures are accepted")
        );
        assert_eq!(
            err.to_string(),
            "the webhook signature header is malformed: only sha256= signatures are accepted"
        );
    }

    #[test]
    fn a_missing_or_empty_signature_header_is_missing() {
        for header in [None, Some("")] {
            assert_eq!(
                verify(DOC_SECRET, DOC_BODY, header),
                Err(SignatureError::Missing)
            );
        }
        assert!(
            SignatureError::Missing
                .to_string()
                .contains("X-Hub-Signature-256")
        );
    }

    #[test]
    fn uppercase_or_garbage_signatures_are_malformed() {
        let upper_digest = format!("sha256={}", DOC_SIGNATURE[7..].to_ascii_uppercase());
        let upper_prefix = DOC_SIGNATURE.replace("sha256=", "SHA256=");
        let non_hex = format!("sha256={}", "g".repeat(64));
        let cases = [
            (
                upper_digest.as_str(),
                "the sha256 digest must be lowercase hex digits",
            ),
            (
                non_hex.as_str(),
                "the sha256 digest must be lowercase hex digits",
            ),
            (
                upper_prefix.as_str(),
                "expected `sha256=` followed by 64 hex digits",
            ),
            (
                &DOC_SIGNATURE[7..],
                "expected `sha256=` followed by 64 hex digits",
            ),
            ("garbage", "expected `sha256=` followed by 64 hex digits"),
        ];
        for (sig, why) in cases {
            assert_eq!(
                verify(DOC_SECRET, DOC_BODY, Some(sig)),
                Err(SignatureError::Malformed(why)),
                "{sig}"
            );
        }
    }

    #[test]
    fn an_empty_secret_verifies_nothing_even_a_signature_made_with_it() {
        let sig = sign(b"", DOC_BODY);
        assert_eq!(
            verify(b"", DOC_BODY, Some(&sig)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refusals_never_quote_the_secret_or_the_signature() {
        let forged = DOC_SIGNATURE.replace('7', "8");
        let err = verify(DOC_SECRET, DOC_BODY, Some(&forged)).expect_err("forged");
        let shown = err.to_string();
        assert!(!shown.contains("Secret to Everybody") && !shown.contains(&forged[7..]));
    }

    #[test]
    fn a_branch_push_becomes_a_push_with_the_sorted_union_of_changed_files() {
        assert_eq!(
            parse_ok("push", PUSH_BRANCH.as_bytes()),
            Parsed::Event(ForgeEvent::Push {
                branch: "main".into(),
                sha: "89e6c98d92887913cadf06b2adb97f26cde4849b".into(),
                changed_paths: Some(vec![
                    "CHANGELOG.old".into(),
                    "README.md".into(),
                    "docs/CONTRIBUTING.md".into(),
                    "src/main.rs".into(),
                ]),
                actor: "Codertocat".into(),
            })
        );
    }

    #[test]
    fn an_annotated_tag_push_builds_the_tagged_commit_not_the_tag_object() {
        assert_eq!(
            parse_ok("push", PUSH_TAG.as_bytes()),
            Parsed::Event(ForgeEvent::Tag {
                name: "v1.2.0".into(),
                sha: "89e6c98d92887913cadf06b2adb97f26cde4849b".into(),
                actor: "Codertocat".into(),
            })
        );
        // Without `head_commit` (older GitHub Enterprise), `after` is all there is.
        let body = edited(PUSH_TAG, |v| v["head_commit"] = Value::Null);
        assert!(matches!(
            parse_ok("push", &body),
            Parsed::Event(ForgeEvent::Tag { sha, .. })
                if sha == "2b66fd261ee5c6cfc8de7fa466bab600bcfe4f69"
        ));
    }

    #[test]
    fn a_deleted_branch_or_tag_is_ignored_and_named() {
        assert_eq!(
            parse_ok("push", PUSH_BRANCH_DELETED.as_bytes()),
            Parsed::Ignored("branch `feature/old-login` was deleted".into())
        );
        let tag_deleted = edited(PUSH_TAG, |v| {
            v["deleted"] = true.into();
            v["after"] = "0".repeat(40).into();
            v["head_commit"] = Value::Null;
        });
        assert_eq!(
            parse_ok("push", &tag_deleted),
            Parsed::Ignored("tag `v1.2.0` was deleted".into())
        );
        // The flag alone is enough.
        let flagged = edited(PUSH_BRANCH, |v| v["deleted"] = true.into());
        assert_eq!(
            parse_ok("push", &flagged),
            Parsed::Ignored("branch `main` was deleted".into())
        );
    }

    #[test]
    fn changed_files_are_unknown_when_commits_are_absent_empty_or_at_githubs_limit() {
        let changed = |body: &[u8]| match parse_ok("push", body) {
            Parsed::Event(ForgeEvent::Push { changed_paths, .. }) => changed_paths,
            other => panic!("expected a push, got {other:?}"),
        };
        let absent = edited(PUSH_BRANCH, |v| {
            v.as_object_mut().map(|o| o.remove("commits"));
        });
        assert_eq!(changed(&absent), None);
        let empty = edited(PUSH_BRANCH, |v| v["commits"] = Value::Array(vec![]));
        assert_eq!(changed(&empty), None);
        let commit = serde_json::json!({"added": [], "removed": [], "modified": ["a.txt"]});
        let at_limit = edited(PUSH_BRANCH, |v| {
            v["commits"] = Value::Array(vec![commit.clone(); MAX_LISTED_COMMITS]);
        });
        assert_eq!(changed(&at_limit), None);
        let below = edited(PUSH_BRANCH, |v| {
            v["commits"] = Value::Array(vec![commit.clone(); MAX_LISTED_COMMITS - 1]);
        });
        assert_eq!(changed(&below), Some(vec!["a.txt".into()]));
    }

    #[test]
    fn the_pusher_is_the_actor_and_the_sender_stands_in_when_it_is_absent() {
        let body = edited(PUSH_BRANCH, |v| {
            v["pusher"] = Value::Null;
            v["sender"]["login"] = "octocat".into();
        });
        assert!(matches!(
            parse_ok("push", &body),
            Parsed::Event(ForgeEvent::Push { actor, .. }) if actor == "octocat"
        ));
        let neither = edited(PUSH_BRANCH, |v| {
            v["pusher"] = Value::Null;
            v["sender"] = Value::Null;
        });
        assert_eq!(parse_err("push", &neither), "`pusher.name` is missing");
    }

    #[test]
    fn pushes_outside_branches_and_tags_are_ignored() {
        let body = edited(PUSH_BRANCH, |v| v["ref"] = "refs/notes/commits".into());
        assert_eq!(
            parse_ok("push", &body),
            Parsed::Ignored(
                "ref `refs/notes/commits` is neither a branch nor a tag, so it does not start builds"
                    .into()
            )
        );
    }

    #[test]
    fn push_payload_errors_name_the_field() {
        let no_after = edited(PUSH_BRANCH, |v| {
            v.as_object_mut().map(|o| o.remove("after"));
        });
        assert_eq!(parse_err("push", &no_after), "`after` is missing");
        let bad_sha = edited(PUSH_BRANCH, |v| v["after"] = "89e6c98d".into());
        assert_eq!(
            parse_err("push", &bad_sha),
            "`after` is not a commit sha (40 hex digits)"
        );
        let numeric_ref = edited(PUSH_BRANCH, |v| v["ref"] = 7.into());
        assert_eq!(parse_err("push", &numeric_ref), "`ref` should be a string");
        let bad_deleted = edited(PUSH_BRANCH, |v| v["deleted"] = "no".into());
        assert_eq!(
            parse_err("push", &bad_deleted),
            "`deleted` should be true or false"
        );
        let bad_paths = edited(PUSH_BRANCH, |v| v["commits"][1]["removed"] = "x".into());
        assert_eq!(
            parse_err("push", &bad_paths),
            "`commits[1].removed` should be a list of file paths"
        );
        let pusher_string = edited(PUSH_BRANCH, |v| v["pusher"] = "Codertocat".into());
        assert!(parse_err("push", &pusher_string).contains("expected the `pusher` object"));
    }

    #[test]
    fn a_body_that_is_not_json_is_refused_with_a_hint_at_the_content_type() {
        let form = b"payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%7D";
        let err = parse("push", form).expect_err("form-encoded");
        assert!(matches!(err, PayloadError::FormEncoded));
        assert_eq!(
            err.to_string(),
            "the body is form-encoded; set the webhook's content type to application/json"
        );
        let truncated = &PUSH_BRANCH.as_bytes()[..100];
        let err = parse("push", truncated).expect_err("cut short");
        assert!(matches!(err, PayloadError::NotJson(_)), "{err:?}");
        assert!(
            err.to_string()
                .ends_with("send webhooks as application/json")
        );
        let err = parse("push", b"[1, 2]").expect_err("a list");
        assert!(matches!(err, PayloadError::Shape(_)), "{err:?}");
    }

    #[test]
    fn opened_and_synchronized_pull_requests_become_pull_request_events() {
        assert_eq!(
            parse_ok("pull_request", PR_OPENED.as_bytes()),
            Parsed::Event(ForgeEvent::PullRequest {
                number: 2,
                source_branch: "changes".into(),
                target_branch: "main".into(),
                sha: "094e3afb2fe8dfe82f63731cdcd3b999f4856cff".into(),
                actor: "Codertocat".into(),
            })
        );
        assert_eq!(
            parse_ok("pull_request", PR_SYNCHRONIZE.as_bytes()),
            Parsed::Event(ForgeEvent::PullRequest {
                number: 2,
                source_branch: "changes".into(),
                target_branch: "main".into(),
                sha: "a9fcd54b25e7e863d72cd47c08af46e61b74b561".into(),
                actor: "octocat".into(),
            })
        );
        let reopened = edited(PR_OPENED, |v| v["action"] = "reopened".into());
        assert!(matches!(
            parse_ok("pull_request", &reopened),
            Parsed::Event(ForgeEvent::PullRequest { number: 2, .. })
        ));
    }

    #[test]
    fn a_closed_pull_request_is_ignored_with_its_action_named() {
        assert_eq!(
            parse_ok("pull_request", PR_CLOSED.as_bytes()),
            Parsed::Ignored("pull_request action `closed` does not start builds".into())
        );
    }

    #[test]
    fn pull_request_payload_errors_name_the_field() {
        let no_head_sha = edited(PR_OPENED, |v| {
            v["pull_request"]["head"]
                .as_object_mut()
                .map(|o| o.remove("sha"));
        });
        assert_eq!(
            parse_err("pull_request", &no_head_sha),
            "`pull_request.head.sha` is missing"
        );
        let negative = edited(PR_OPENED, |v| {
            v["number"] = (-2).into();
        });
        assert_eq!(
            parse_err("pull_request", &negative),
            "`number` should be a non-negative integer"
        );
        // The top-level `number` is preferred, the pull request's own stands in.
        let nested_only = edited(PR_OPENED, |v| {
            v.as_object_mut().map(|o| o.remove("number"));
        });
        assert!(matches!(
            parse_ok("pull_request", &nested_only),
            Parsed::Event(ForgeEvent::PullRequest { number: 2, .. })
        ));
    }

    #[test]
    fn a_ping_is_answered_as_a_ping_unless_the_hook_sends_form_encoded_bodies() {
        assert_eq!(parse_ok("ping", PING.as_bytes()), Parsed::Ping);
        assert!(matches!(
            parse("ping", b"payload=%7B%22zen%22%3A%22x%22%7D"),
            Err(PayloadError::FormEncoded)
        ));
    }

    #[test]
    fn unsupported_events_are_ignored_with_the_event_named() {
        assert_eq!(
            parse_ok("issues", ISSUES.as_bytes()),
            Parsed::Ignored(
                "event `issues` is not supported; Flotilla builds on push and pull_request".into()
            )
        );
    }

    #[test]
    fn a_delivery_without_an_event_header_is_a_payload_error() {
        assert_eq!(
            parse_err("", PUSH_BRANCH.as_bytes()),
            "the X-GitHub-Event header is missing, so the delivery cannot be interpreted"
        );
    }
}
