//! Bearer tokens and tenant checks (ARCHITECTURE §10).
//!
//! A token is 256 random bits (`flt_` + 64 hex digits). Only its SHA-256 is stored — in the
//! replicated state for API-created tokens, in memory for the bootstrap admin token read from
//! a file. A fast hash is right here: the secret has full entropy, so there is nothing to
//! brute-force, and a per-request argon2 would cost milliseconds on every call.
//!
//! Tenancy: a token limited to project A sees nothing of project B — B's project, builds and
//! jobs answer 404 exactly as if they did not exist, so a token cannot even probe which
//! projects exist. Within its project a token may still lack the scope for an action (403).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use flotilla_core::ids::ProjectId;
use flotilla_core::state::Scope;
use sha2::{Digest, Sha256};

use super::App;
use super::problem::Problem;

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A new random token.
pub(super) fn new_token() -> Result<String, Problem> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Problem::unavailable(format!("no randomness available: {e}")))?;
    Ok(format!("flt_{}", hex::encode(bytes)))
}

/// Who is asking.
#[derive(Debug, Clone)]
pub(super) struct Principal {
    /// The token's id (`None` for the bootstrap admin token).
    pub token: Option<u64>,
    /// What it may do.
    pub scope: Scope,
    /// The one project it may touch; `None` for all.
    pub project: Option<ProjectId>,
}

impl Principal {
    /// Whether this principal may see `project` at all. When not, answer 404.
    pub(super) fn sees(&self, project: &ProjectId) -> bool {
        self.project.as_ref().is_none_or(|p| p == project)
    }

    /// 404 unless the principal sees `project`; `what` names the thing asked for.
    pub(super) fn visible(&self, project: &ProjectId, what: &str) -> Result<(), Problem> {
        if self.sees(project) {
            Ok(())
        } else {
            Err(Problem::not_found(format!("{what} not found")))
        }
    }

    /// 404 unless the principal sees `project`, 403 unless it has `scope` there.
    pub(super) fn allowed(
        &self,
        project: &ProjectId,
        scope: Scope,
        what: &str,
    ) -> Result<(), Problem> {
        self.visible(project, what)?;
        if self.scope >= scope {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this token has `{}` scope; this needs `{}`",
                self.scope.as_str(),
                scope.as_str()
            )))
        }
    }

    /// 403 unless this is an admin token for every project.
    pub(super) fn global_admin(&self) -> Result<(), Problem> {
        if self.scope == Scope::Admin && self.project.is_none() {
            Ok(())
        } else {
            Err(Problem::forbidden(
                "this needs an `admin` token that is not limited to one project",
            ))
        }
    }

    /// Shown as the actor of builds it starts.
    pub(super) fn actor(&self) -> String {
        match self.token {
            Some(id) => format!("token:{id}"),
            None => "admin".into(),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, Problem> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        Problem::unauthorized("send an API token as `Authorization: Bearer <token>`")
    })?;
    let value = value
        .to_str()
        .map_err(|_| Problem::unauthorized("the Authorization header is not valid text"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| Problem::unauthorized("use `Authorization: Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Problem::unauthorized("use `Authorization: Bearer <token>`"));
    }
    Ok(token.trim())
}

impl FromRequestParts<Arc<App>> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Problem> {
        let hash = hash_token(bearer(&parts.headers)?);
        if app.admin_hash.as_deref() == Some(hash.as_str()) {
            return Ok(Principal {
                token: None,
                scope: Scope::Admin,
                project: None,
            });
        }
        app.read(|s| {
            s.tokens
                .values()
                .find(|t| t.hash == hash)
                .map(|t| Principal {
                    token: Some(t.id),
                    scope: t.scope,
                    project: t.project.clone(),
                })
        })
        .ok_or_else(|| Problem::unauthorized("the token is unknown or was revoked"))
    }
}

/// `?consistency=linearizable` (or header `X-Flotilla-Consistency: linearizable`): the read
/// must reflect every write acknowledged before it. On the leader this confirms leadership
/// with a quorum first; a follower redirects (307) to the leader's API. Without it, a replica
/// answers from its own applied state, which may trail the leader by a few milliseconds.
#[derive(Debug)]
pub(super) struct Fresh;

impl FromRequestParts<Arc<App>> for Fresh {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Problem> {
        let wanted = parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "consistency=linearizable"))
            || parts
                .headers
                .get("x-flotilla-consistency")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"linearizable"));
        if !wanted {
            return Ok(Fresh);
        }
        match app.node.linearizable_read(|_| ()).await {
            Ok(()) => Ok(Fresh),
            Err(flotilla_consensus::NodeError::ForwardToLeader {
                leader_id: Some(leader),
                ..
            }) => {
                let base = app
                    .read(|s| s.replicas.get(&leader).cloned())
                    .ok_or_else(|| {
                        Problem::unavailable("the leader has not announced its API address yet")
                    })?;
                // Inside the nested API router `parts.uri` has lost its `/api/v1` prefix.
                let uri = parts
                    .extensions
                    .get::<axum::extract::OriginalUri>()
                    .map_or(&parts.uri, |o| &o.0);
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                Err(Problem::redirect(format!(
                    "{}{path}",
                    base.trim_end_matches('/')
                )))
            }
            Err(e) => Err(e.into()),
        }
    }
}
