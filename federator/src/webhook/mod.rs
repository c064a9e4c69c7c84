//! Webhook deliveries from forges: is a delivery really from the forge (signature or token
//! check), and what does it mean for Flotilla (a normalised [`ForgeEvent`], a ping, or a
//! reason it starts nothing)?
//!
//! Everything here is a pure function over header values and body bytes; the HTTP layer
//! reads the headers, calls `verify` first and `parse` only when that succeeded (so no JSON
//! from an unauthenticated sender is ever parsed), and maps the outcome to an answer:
//! [`Parsed`] is a success of some kind, [`SignatureError`] a refusal, [`PayloadError`] a bad
//! request.
//!
//! - [`github`]: `X-Hub-Signature-256` (HMAC-SHA256 of the body) and the `push`,
//!   `pull_request` and `ping` events.
//! - [`gitlab`]: `X-Gitlab-Token` (a shared secret sent as is) and the `Push Hook`,
//!   `Tag Push Hook` and `Merge Request Hook` events.
//! - this file: the types both share, and the readers that turn a missing or mistyped field
//!   into an error naming it.
//!
//! Payloads are read with `serde_json::from_slice` into small structs holding only the fields
//! used, so the rest of a large payload is skipped rather than built into a tree. Scalar
//! fields are read as [`serde_json::Value`] and checked by hand, because serde's own message
//! for a wrong type ("expected a string at line 1 column 80") does not say which field it was.

use std::collections::BTreeSet;

use flotilla_core::forge::ForgeEvent;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub mod github;
pub mod gitlab;

/// What a verified delivery turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Starts (or may start, once triggers are checked) a build.
    Event(ForgeEvent),
    /// GitHub's `ping` on hook creation: answered 200 `{"pong":true}`-ish by the HTTP layer.
    Ping,
    /// A well-formed delivery that never starts a build; the string says why, in a sentence
    /// shown to users as `{"ignored": "..."}` (e.g. "pull_request action `closed` does not
    /// start builds", "branch `x` was deleted", "event `issues` is not supported").
    Ignored(String),
}

/// Why a delivery was refused before its body was looked at.
///
/// The messages never include the secret, the expected signature or the value received.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// No signature (GitHub) or token (GitLab) header, or an empty one.
    #[error(
        "the webhook signature header is missing (GitHub sends X-Hub-Signature-256 and GitLab \
         sends X-Gitlab-Token once the webhook has a secret)"
    )]
    Missing,
    /// The header is present but not in the expected form; the string says how.
    #[error("the webhook signature header is malformed: {0}")]
    Malformed(&'static str),
    /// Well-formed, but not made with this project's secret.
    #[error(
        "the webhook signature does not match; check that the forge and Flotilla have the \
         same webhook secret"
    )]
    Mismatch,
}

impl SignatureError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::Malformed(_) => "malformed",
            SignatureError::Mismatch => "mismatch",
        }
    }
}

/// Why a verified delivery could not be understood; the message names the field, for a 400
/// answer the forge shows in its delivery log.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The event header was absent or empty, so there is no telling what the body is.
    #[error("the {header} header is missing, so the delivery cannot be interpreted")]
    NoEvent {
        /// The header's name as the forge spells it.
        header: &'static str,
    },
    /// A GitHub webhook configured with content type `application/x-www-form-urlencoded`.
    #[error("the body is form-encoded; set the webhook's content type to application/json")]
    FormEncoded,
    /// The body is not JSON.
    #[error("the body is not valid JSON ({0}); send webhooks as application/json")]
    NotJson(serde_json::Error),
    /// JSON, but an object or list is where something else was expected (or the reverse).
    #[error("the payload does not have the expected shape: {0}")]
    Shape(serde_json::Error),
    /// A required field is absent or null; holds its path, such as `pull_request.head.sha`.
    #[error("`{0}` is missing")]
    Missing(String),
    /// A field has the wrong JSON type.
    #[error("`{field}` should be {expected}")]
    WrongType {
        /// Its path, such as `commits[2].added`.
        field: String,
        /// What it should be, such as "a string".
        expected: &'static str,
    },
    /// A field has the right type but an unusable value.
    #[error("`{field}` {reason}")]
    Invalid {
        /// Its path.
        field: String,
        /// What is wrong, as the rest of a sentence ("is empty").
        reason: &'static str,
    },
}

impl PayloadError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PayloadError::NoEvent { .. } => "no_event",
            PayloadError::FormEncoded => "form_encoded",
            PayloadError::NotJson(_) => "not_json",
            PayloadError::Shape(_) => "shape",
            PayloadError::Missing(_) => "missing_field",
            PayloadError::WrongType { .. } => "wrong_type",
            PayloadError::Invalid { .. } => "invalid_value",
        }
    }
}

/// A scalar field, kept as JSON until read by [`opt_str`] and friends so a wrong type can be
/// reported with the field's name. Absent and `null` both arrive as `None`.
type Leaf = Option<Value>;

/// One commit of a push, as far as changed files go; GitHub and GitLab use the same names.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a commit object in `commits`")]
struct Commit {
    added: Leaf,
    modified: Leaf,
    removed: Leaf,
}

/// Parses a body into `T`, telling "not JSON at all" from "JSON of the wrong shape".
fn read<T: DeserializeOwned>(body: &[u8]) -> Result<T, PayloadError> {
    serde_json::from_slice(body).map_err(|e| {
        if !e.is_data() && body.starts_with(b"payload=") {
            PayloadError::FormEncoded
        } else if e.is_data() {
            PayloadError::Shape(e)
        } else {
            PayloadError::NotJson(e)
        }
    })
}

/// A string field that may be absent or null.
fn opt_str(v: Leaf, field: &str) -> Result<Option<String>, PayloadError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_type(field, "a string")),
    }
}

/// A string field that must be present and not empty.
fn req_str(v: Leaf, field: &str) -> Result<String, PayloadError> {
    match opt_str(v, field)? {
        None => Err(PayloadError::Missing(field.to_owned())),
        Some(s) if s.is_empty() => Err(invalid(field, "is empty")),
        Some(s) => Ok(s),
    }
}

/// A non-negative integer field that may be absent or null.
fn opt_u64(v: Leaf, field: &str) -> Result<Option<u64>, PayloadError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong_type(field, "a non-negative integer")),
        Some(_) => Err(wrong_type(field, "a non-negative integer")),
    }
}

/// A boolean field that may be absent or null.
fn opt_bool(v: Leaf, field: &str) -> Result<Option<bool>, PayloadError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(wrong_type(field, "true or false")),
    }
}

/// The first of `candidates` that is a non-empty string: who caused an event, where forges
/// fill in one field or another depending on the account.
fn first_name<const N: usize>(candidates: [(Leaf, &str); N]) -> Result<String, PayloadError> {
    let mut first_field = None;
    for (v, field) in candidates {
        first_field.get_or_insert(field);
        if let Some(name) = opt_str(v, field)?
            && !name.is_empty()
        {
            return Ok(name);
        }
    }
    Err(PayloadError::Missing(
        first_field.unwrap_or("actor").to_owned(),
    ))
}

/// Checks a commit id: 40 hex digits (SHA-1 object names), returned lowercase.
fn commit_sha(s: String, field: &str) -> Result<String, PayloadError> {
    if s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(invalid(field, "is not a commit sha (40 hex digits)"))
    }
}

/// The all-zeros object name forges send as the new value of a deleted ref.
fn is_zero_sha(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == b'0')
}

/// A pushed ref that builds can run for.
#[derive(Debug, PartialEq, Eq)]
enum GitRef {
    /// `refs/heads/<name>`.
    Branch(String),
    /// `refs/tags/<name>`.
    Tag(String),
}

impl GitRef {
    /// Splits a full ref; `None` for other namespaces (`refs/notes/…`, `refs/pull/…`), which
    /// builds never run for (answer those with [`GitRef::ignored`]). A bare or empty name is
    /// a payload error rather than something to ignore.
    fn parse(full: &str, field: &str) -> Result<Option<Self>, PayloadError> {
        let (make, name): (fn(String) -> GitRef, &str) =
            if let Some(name) = full.strip_prefix("refs/heads/") {
                (GitRef::Branch, name)
            } else if let Some(name) = full.strip_prefix("refs/tags/") {
                (GitRef::Tag, name)
            } else if full.starts_with("refs/") {
                return Ok(None);
            } else {
                return Err(invalid(
                    field,
                    "is not a full ref such as `refs/heads/main`",
                ));
            };
        if name.is_empty() {
            return Err(invalid(field, "names no branch or tag"));
        }
        Ok(Some(make(name.to_owned())))
    }

    /// The answer to a push of a ref outside heads and tags.
    fn ignored(full: &str) -> Parsed {
        Parsed::Ignored(format!(
            "ref `{full}` is neither a branch nor a tag, so it does not start builds"
        ))
    }

    /// The answer to a push that deleted this ref.
    fn deleted(&self) -> Parsed {
        Parsed::Ignored(match self {
            GitRef::Branch(name) => format!("branch `{name}` was deleted"),
            GitRef::Tag(name) => format!("tag `{name}` was deleted"),
        })
    }
}

/// The sorted, deduplicated union of the files the commits added, modified or removed.
///
/// The caller decides whether the list is complete; this only reads it.
fn changed_paths(commits: Vec<Commit>) -> Result<Vec<String>, PayloadError> {
    let mut paths = BTreeSet::new();
    for (i, commit) in commits.into_iter().enumerate() {
        for (list, name) in [
            (commit.added, "added"),
            (commit.modified, "modified"),
            (commit.removed, "removed"),
        ] {
            let wrong = || wrong_type(&format!("commits[{i}].{name}"), "a list of file paths");
            match list {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for item in items {
                        match item {
                            Value::String(path) => {
                                paths.insert(path);
                            }
                            _ => return Err(wrong()),
                        }
                    }
                }
                Some(_) => return Err(wrong()),
            }
        }
    }
    Ok(paths.into_iter().collect())
}

/// An untrusted header value quoted back in a message, cut short so a huge one cannot bloat
/// the answer or the build history. (Event headers are not covered by GitHub's signature.)
fn shown(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

fn wrong_type(field: &str, expected: &'static str) -> PayloadError {
    PayloadError::WrongType {
        field: field.to_owned(),
        expected,
    }
}

fn invalid(field: &str, reason: &'static str) -> PayloadError {
    PayloadError::Invalid {
        field: field.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commits(json: Value) -> Vec<Commit> {
        serde_json::from_value(json).expect("test commits are well-formed")
    }

    #[test]
    fn changed_paths_are_the_sorted_union_of_added_modified_and_removed() {
        let c = commits(serde_json::json!([
            {"added": ["b.txt"], "modified": ["a.txt"], "removed": []},
            {"added": [], "modified": ["a.txt", "c/d.rs"], "removed": ["b.txt"]},
            {"added": null},
        ]));
        assert_eq!(
            changed_paths(c).expect("valid lists"),
            ["a.txt", "b.txt", "c/d.rs"]
        );
    }

    #[test]
    fn a_non_string_path_is_reported_with_its_commit_and_list() {
        let c = commits(serde_json::json!([{}, {"modified": ["ok", 7]}]));
        let err = changed_paths(c).expect_err("7 is not a path");
        assert_eq!(
            err.to_string(),
            "`commits[1].modified` should be a list of file paths"
        );
    }

    #[test]
    fn commit_shas_must_be_forty_hex_digits_and_come_back_lowercase() {
        let upper = "3F786850E387550FDAB836ED7E6DC881DE23001B".to_owned();
        assert_eq!(
            commit_sha(upper, "after").expect("hex"),
            "3f786850e387550fdab836ed7e6dc881de23001b"
        );
        for bad in [
            "3f78",
            "3f786850e387550fdab836ed7e6dc881de23001bff",
            "zz786850e387550fdab836ed7e6dc881de23001b",
        ] {
            let err = commit_sha(bad.to_owned(), "after").expect_err(bad);
            assert_eq!(
                err.to_string(),
                "`after` is not a commit sha (40 hex digits)"
            );
        }
    }

    #[test]
    fn refs_split_into_branches_tags_and_others_and_bare_names_are_refused() {
        let p = |s: &str| GitRef::parse(s, "ref");
        assert_eq!(
            p("refs/heads/feature/x").ok(),
            Some(Some(GitRef::Branch("feature/x".into())))
        );
        assert_eq!(p("refs/tags/v1").ok(), Some(Some(GitRef::Tag("v1".into()))));
        assert_eq!(p("refs/notes/commits").ok(), Some(None));
        assert_eq!(
            p("main").expect_err("bare").to_string(),
            "`ref` is not a full ref such as `refs/heads/main`"
        );
        assert_eq!(
            p("refs/heads/").expect_err("empty").to_string(),
            "`ref` names no branch or tag"
        );
    }

    #[test]
    fn long_header_values_are_cut_short_when_quoted() {
        assert_eq!(shown("push"), "push");
        let long = "é".repeat(100);
        assert_eq!(shown(&long), format!("{}…", "é".repeat(64)));
    }

    #[test]
    fn the_first_non_empty_candidate_names_the_actor() {
        let s = |v: &str| Some(Value::String(v.into()));
        assert_eq!(
            first_name([(s(""), "a"), (s("bob"), "b")]).ok(),
            Some("bob".into())
        );
        assert_eq!(
            first_name([(None, "pusher.name"), (None, "sender.login")])
                .expect_err("none")
                .to_string(),
            "`pusher.name` is missing"
        );
    }
}
