//! Errors as `application/problem+json` (RFC 9457), mapped once, here, at the edge.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_consensus::NodeError;
use flotilla_core::state::Rejection;
use serde::Serialize;

/// An HTTP error answer.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    detail: String,
    retry_after_secs: Option<u64>,
    location: Option<String>,
    authenticate: bool,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl Problem {
    /// An error with this status and a sentence saying what went wrong and what to do.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            retry_after_secs: None,
            location: None,
            authenticate: false,
        }
    }

    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    /// 401, with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self {
            authenticate: true,
            ..Self::new(StatusCode::UNAUTHORIZED, detail)
        }
    }

    /// 403.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, detail)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, detail)
        }
    }

    /// 429 with `Retry-After`.
    pub fn too_many(detail: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, detail)
        }
    }

    /// 307 to `location` (the leader, for a linearizable read on a follower).
    pub fn redirect(location: String) -> Self {
        Self {
            location: Some(location),
            ..Self::new(
                StatusCode::TEMPORARY_REDIRECT,
                "this replica is not the leader; linearizable reads are served by the leader",
            )
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The detail sentence.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl From<Rejection> for Problem {
    fn from(r: Rejection) -> Self {
        match &r {
            Rejection::NotFound(_) => Problem::not_found(r.to_string()),
            Rejection::Conflict(_) | Rejection::StaleFence { .. } => {
                Problem::new(StatusCode::CONFLICT, r.to_string())
            }
        }
    }
}

impl From<NodeError> for Problem {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::ForwardToLeader { .. } | NodeError::Timeout(_) => {
                Problem::unavailable(format!(
                    "the federator cluster has no reachable leader right now ({e}); retry shortly"
                ))
            }
            other => {
                tracing::error!(error = %other, "Replicated write failed.");
                Problem::unavailable(format!(
                    "the replicated write failed: {other}; retry shortly"
                ))
            }
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = Body {
            kind: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: &self.detail,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (self.status, bytes).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after_secs {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(l) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert(header::LOCATION, l);
        }
        if self.authenticate {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"flotilla\""),
            );
        }
        resp
    }
}
