//! Webhook intake (ARCHITECTURE §9): one URL per project, so the secret is known before
//! anything is parsed.
//!
//! Order of checks: the project exists (404) → the body fits in 25 MiB (413, read with a
//! bounded buffer) → the signature or token (401) → the project's rate limit (429; after the
//! signature, so forged traffic spends no one's budget) → the payload (400 / 202 ignored) →
//! the delivery is committed through Raft → 202 `{"build_id"}`, or 200 with the same build for
//! a delivery key seen before.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State as AppState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flotilla_core::forge::Provider;
use flotilla_core::ids::ProjectId;
use flotilla_core::state::{Command, Response as Reply};

use super::App;
use super::problem::Problem;
use super::views::{BuildAccepted, Ignored};
use crate::webhook::{Parsed, github, gitlab};

type Shared = AppState<Arc<App>>;

/// `POST /webhooks/github/{project}`.
pub(super) async fn github(
    AppState(app): Shared,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    intake(&app, Provider::Github, &project, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /webhooks/gitlab/{project}`.
pub(super) async fn gitlab(
    AppState(app): Shared,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    intake(&app, Provider::Gitlab, &project, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn intake(
    app: &App,
    provider: Provider,
    project: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let unknown = || {
        Problem::not_found(format!(
            "no {} project `{project}`; create it first, or check the webhook URL",
            provider.as_str()
        ))
    };
    let id = ProjectId::new(project).map_err(|_| unknown())?;
    let secret = app
        .read(|s| {
            s.projects
                .get(&id)
                .filter(|p| p.provider == provider)
                .map(|p| p.webhook_secret.clone())
        })
        .ok_or_else(unknown)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "webhook bodies are limited to {} MiB",
                    super::MAX_WEBHOOK_BYTES >> 20
                ),
            )
        } else {
            Problem::bad_request(format!("could not read the body: {}", e.body_text()))
        }
    })?;

    let (event, delivery) = match provider {
        Provider::Github => {
            github::verify(
                secret.as_bytes(),
                &body,
                header(headers, github::SIGNATURE_HEADER),
            )
            .map_err(|e| Problem::unauthorized(e.to_string()))?;
            (
                header(headers, github::EVENT_HEADER),
                header(headers, github::DELIVERY_HEADER),
            )
        }
        _ => {
            gitlab::verify(secret.as_bytes(), header(headers, gitlab::TOKEN_HEADER))
                .map_err(|e| Problem::unauthorized(e.to_string()))?;
            (
                header(headers, gitlab::EVENT_HEADER),
                header(headers, gitlab::IDEMPOTENCY_HEADER),
            )
        }
    };

    if let Err(not_until) = app.limiter.check_key(&id) {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        tracing::warn!(project = %id, "Webhook rate limit exceeded.");
        return Err(Problem::too_many(
            format!("project `{id}` is over its webhook rate limit; the forge will retry"),
            wait.as_secs() + 1,
        ));
    }

    let event_name = event.unwrap_or_default();
    let parsed = match provider {
        Provider::Github => github::parse(event_name, &body),
        _ => gitlab::parse(event_name, &body),
    }
    .map_err(|e| Problem::bad_request(e.to_string()))?;

    let event = match parsed {
        Parsed::Ping => {
            return Ok((StatusCode::OK, Json(serde_json::json!({"pong": true}))).into_response());
        }
        Parsed::Ignored(why) => {
            tracing::info!(project = %id, reason = %why, "Webhook ignored.");
            return Ok((StatusCode::ACCEPTED, Json(Ignored { ignored: why })).into_response());
        }
        Parsed::Event(e) => e,
    };
    let delivery = delivery
        .map(str::trim)
        .filter(|d| !d.is_empty() && d.len() <= 200)
        .map(str::to_owned);
    let reply = app
        .propose(Command::IngestEvent {
            project: id,
            delivery,
            event,
            now_ms: app.now_ms(),
        })
        .await?;
    let Reply::Ingested { build, duplicate } = reply else {
        return Err(Problem::unavailable(
            "unexpected reply from the state machine",
        ));
    };
    let status = if duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        Json(BuildAccepted {
            build_id: build.to_string(),
            duplicate,
        }),
    )
        .into_response())
}
