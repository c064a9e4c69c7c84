//! REST handlers under `/api/v1`. Reads come from this replica's applied state (or, with
//! `consistency=linearizable`, after the leader confirms it leads); writes are committed
//! through the leader before answering.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State as AppState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_core::forge::Provider;
use flotilla_core::ids::{BuildId, JobId, ProjectId};
use flotilla_core::state::{
    BuildStatus, Command, ProjectPatch, ProjectSpec, Response as Reply, Scope,
};
use serde::Deserialize;

use super::App;
use super::auth::{Fresh, Principal, hash_token, new_token};
use super::problem::Problem;
use super::views::{
    BuildAccepted, BuildView, ClusterView, CreateProject, CreateToken, JobDetail, MemberView, Page,
    ProjectView, TokenCreated, TriggerBuild, UpdateProject,
};

type Shared = AppState<Arc<App>>;

/// Default and largest page sizes.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, Problem> {
    json.map(|Json(v)| v).map_err(|e| {
        Problem::bad_request(format!(
            "the request body is not what this endpoint expects: {}",
            e.body_text()
        ))
    })
}

fn project_id(s: &str) -> Result<ProjectId, Problem> {
    // An id that cannot exist is simply not found.
    ProjectId::new(s).map_err(|_| Problem::not_found(format!("project `{s}` not found")))
}

fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, Problem> {
    s.parse()
        .map_err(|_| Problem::not_found(format!("{what} `{s}` not found")))
}

fn check_repo_url(url: &str) -> Result<(), Problem> {
    let ok = ["https://", "http://", "file://"]
        .iter()
        .any(|p| url.starts_with(p) && url.len() > p.len());
    if ok && !url.chars().any(char::is_whitespace) {
        Ok(())
    } else {
        Err(Problem::bad_request(format!(
            "repo_url `{url}` is not supported; use an https://, http:// or file:// clone URL"
        )))
    }
}

fn check_pipeline_path(p: &str) -> Result<(), Problem> {
    if p.is_empty() || p.starts_with('/') || p.split('/').any(|s| s == ".." || s.is_empty()) {
        return Err(Problem::bad_request(format!(
            "pipeline_path `{p}` must be a relative path inside the repository, such as `.ci.yaml`"
        )));
    }
    Ok(())
}

/// A tenant name: like a project id (a slug).
fn check_tenant(t: &str) -> Result<String, Problem> {
    ProjectId::new(t)
        .map(|id| id.to_string())
        .map_err(|e| Problem::bad_request(format!("tenant: {e}")))
}

fn check_weight(w: u32) -> Result<u32, Problem> {
    if (1..=1000).contains(&w) {
        Ok(w)
    } else {
        Err(Problem::bad_request(format!(
            "weight {w} must be between 1 and 1000"
        )))
    }
}

fn provider(s: &str) -> Result<Provider, Problem> {
    Provider::parse(s).ok_or_else(|| {
        Problem::bad_request(format!(
            "provider `{s}` is not one of `github`, `gitlab`, `git`"
        ))
    })
}

fn check_secret(s: &str) -> Result<(), Problem> {
    if s.len() < 8 {
        return Err(Problem::bad_request(
            "webhook_secret must be at least 8 characters; use a long random string",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
pub(super) struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/projects", tag = "projects",
    params(("limit" = Option<usize>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = Page<ProjectView>)))]
pub(super) async fn list_projects(
    AppState(app): Shared,
    who: Principal,
    _fresh: Fresh,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page<ProjectView>>, Problem> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    Ok(Json(app.read(|s| {
        let mut items: Vec<ProjectView> = s
            .projects
            .values()
            .filter(|p| who.sees(&p.id))
            .filter(|p| q.cursor.as_deref().is_none_or(|c| p.id.as_str() > c))
            .take(limit + 1)
            .map(ProjectView::new)
            .collect();
        let next_cursor = (items.len() > limit).then(|| {
            items.truncate(limit);
            items.last().map(|p| p.id.clone()).unwrap_or_default()
        });
        Page { items, next_cursor }
    })))
}

#[utoipa::path(post, path = "/api/v1/projects", tag = "projects", request_body = CreateProject,
    responses((status = 201, body = ProjectView), (status = 400), (status = 409)))]
pub(super) async fn create_project(
    AppState(app): Shared,
    who: Principal,
    json: Result<Json<CreateProject>, JsonRejection>,
) -> Result<Response, Problem> {
    who.global_admin()?;
    let req = body(json)?;
    let id = ProjectId::new(&req.name).map_err(|e| Problem::bad_request(format!("name: {e}")))?;
    check_repo_url(&req.repo_url)?;
    check_secret(&req.webhook_secret)?;
    let pipeline_path = req.pipeline_path.unwrap_or_else(|| ".ci.yaml".into());
    check_pipeline_path(&pipeline_path)?;
    let spec = ProjectSpec {
        id: id.clone(),
        repo_url: req.repo_url,
        provider: provider(&req.provider)?,
        webhook_secret: req.webhook_secret,
        pipeline_path,
        tenant: req.tenant.map(|t| check_tenant(&t)).transpose()?,
        weight: check_weight(req.weight.unwrap_or(1))?,
    };
    app.propose(Command::CreateProject {
        spec,
        now_ms: app.now_ms(),
    })
    .await?;
    let view = app
        .read_after_write(
            |s| s.projects.contains_key(&id),
            |s| s.projects.get(&id).map(ProjectView::new),
        )
        .await
        .ok_or_else(|| Problem::not_found(format!("project `{id}` was deleted meanwhile")))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/projects/{id}"))],
        Json(view),
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/v1/projects/{id}", tag = "projects",
    responses((status = 200, body = ProjectView), (status = 404)))]
pub(super) async fn get_project(
    AppState(app): Shared,
    who: Principal,
    _fresh: Fresh,
    Path(id): Path<String>,
) -> Result<Json<ProjectView>, Problem> {
    let id = project_id(&id)?;
    who.visible(&id, &format!("project `{id}`"))?;
    app.read(|s| s.projects.get(&id).map(ProjectView::new))
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("project `{id}` not found")))
}

#[utoipa::path(patch, path = "/api/v1/projects/{id}", tag = "projects", request_body = UpdateProject,
    responses((status = 200, body = ProjectView), (status = 404)))]
pub(super) async fn update_project(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
    json: Result<Json<UpdateProject>, JsonRejection>,
) -> Result<Json<ProjectView>, Problem> {
    let id = project_id(&id)?;
    who.allowed(&id, Scope::Admin, &format!("project `{id}`"))?;
    let req = body(json)?;
    if let Some(u) = &req.repo_url {
        check_repo_url(u)?;
    }
    if let Some(s) = &req.webhook_secret {
        check_secret(s)?;
    }
    if let Some(p) = &req.pipeline_path {
        check_pipeline_path(p)?;
    }
    let patch = ProjectPatch {
        repo_url: req.repo_url,
        provider: req.provider.as_deref().map(provider).transpose()?,
        webhook_secret: req.webhook_secret,
        pipeline_path: req.pipeline_path,
        tenant: req
            .tenant
            .map(|t| {
                if t.is_empty() {
                    Ok(None)
                } else {
                    check_tenant(&t).map(Some)
                }
            })
            .transpose()?,
        weight: req.weight.map(check_weight).transpose()?,
    };
    let now_ms = app.now_ms();
    app.propose(Command::UpdateProject {
        id: id.clone(),
        patch,
        now_ms,
    })
    .await?;
    app.read_after_write(
        |s| {
            s.projects
                .get(&id)
                .is_none_or(|p| p.updated_at_ms >= now_ms)
        },
        |s| s.projects.get(&id).map(ProjectView::new),
    )
    .await
    .map(Json)
    .ok_or_else(|| Problem::not_found(format!("project `{id}` not found")))
}

#[utoipa::path(delete, path = "/api/v1/projects/{id}", tag = "projects",
    responses((status = 204), (status = 404)))]
pub(super) async fn delete_project(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let id = project_id(&id)?;
    who.allowed(&id, Scope::Admin, &format!("project `{id}`"))?;
    app.propose(Command::DeleteProject {
        id,
        now_ms: app.now_ms(),
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/projects/{id}/builds", tag = "builds", request_body = TriggerBuild,
    responses((status = 201, body = BuildAccepted), (status = 404)))]
pub(super) async fn trigger_build(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
    json: Result<Json<TriggerBuild>, JsonRejection>,
) -> Result<Response, Problem> {
    let id = project_id(&id)?;
    who.allowed(&id, Scope::Write, &format!("project `{id}`"))?;
    let req = body(json)?;
    if req.git_ref.trim().is_empty()
        || req
            .git_ref
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Problem::bad_request(
            "ref must be a branch name or a full ref such as refs/tags/v1",
        ));
    }
    if let Some(sha) = &req.sha
        && (sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(Problem::bad_request(
            "sha must be a full 40-digit commit id",
        ));
    }
    let reply = app
        .propose(Command::IngestEvent {
            project: id,
            delivery: None,
            event: flotilla_core::forge::ForgeEvent::Manual {
                git_ref: req.git_ref,
                sha: req.sha.map(|s| s.to_ascii_lowercase()),
                actor: who.actor(),
            },
            now_ms: app.now_ms(),
        })
        .await?;
    let Reply::Ingested { build, .. } = reply else {
        return Err(Problem::unavailable(
            "unexpected reply from the state machine",
        ));
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/builds/{build}"))],
        Json(BuildAccepted {
            build_id: build.to_string(),
            duplicate: false,
        }),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct BuildQuery {
    project: Option<String>,
    status: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/builds", tag = "builds",
    params(("project" = Option<String>, Query), ("status" = Option<String>, Query), ("ref" = Option<String>, Query),
           ("limit" = Option<usize>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = Page<BuildView>)))]
pub(super) async fn list_builds(
    AppState(app): Shared,
    who: Principal,
    _fresh: Fresh,
    Query(q): Query<BuildQuery>,
) -> Result<Json<Page<BuildView>>, Problem> {
    let project = match &q.project {
        Some(p) => {
            let id = project_id(p)?;
            who.visible(&id, &format!("project `{id}`"))?;
            Some(id)
        }
        None => None,
    };
    let status = match &q.status {
        Some(s) => Some(BuildStatus::parse(s).ok_or_else(|| {
            Problem::bad_request(format!(
                "status `{s}` is not one of pending, queued, running, succeeded, failed, cancelled, skipped"
            ))
        })?),
        None => None,
    };
    let git_ref = q.git_ref.as_deref().map(flotilla_core::forge::full_ref);
    let cursor: Option<u64> = match &q.cursor {
        Some(c) => Some(
            c.parse()
                .map_err(|_| Problem::bad_request("cursor is not one this API gave out"))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    Ok(Json(app.read(|s| {
        let upper = cursor.map_or(u64::MAX, |c| c.saturating_sub(1));
        let mut items: Vec<BuildView> = s
            .builds
            .range(..=BuildId(upper))
            .rev()
            .map(|(_, b)| b)
            .filter(|b| who.sees(&b.project))
            .filter(|b| project.as_ref().is_none_or(|p| &b.project == p))
            .filter(|b| status.is_none_or(|st| b.status == st))
            .filter(|b| git_ref.as_ref().is_none_or(|r| &b.git_ref == r))
            .take(limit + 1)
            .map(|b| BuildView::new(s, b, false))
            .collect();
        let next_cursor = (items.len() > limit).then(|| {
            items.truncate(limit);
            items.last().map(|b| b.id.clone()).unwrap_or_default()
        });
        Page { items, next_cursor }
    })))
}

/// `GET /projects/{id}/builds`: the project's builds (same filters as `/builds`).
pub(super) async fn list_project_builds(
    app: Shared,
    who: Principal,
    fresh: Fresh,
    Path(id): Path<String>,
    Query(mut q): Query<BuildQuery>,
) -> Result<Json<Page<BuildView>>, Problem> {
    q.project = Some(id);
    list_builds(app, who, fresh, Query(q)).await
}

#[utoipa::path(get, path = "/api/v1/builds/{id}", tag = "builds",
    responses((status = 200, body = BuildView), (status = 404)))]
pub(super) async fn get_build(
    AppState(app): Shared,
    who: Principal,
    _fresh: Fresh,
    Path(id): Path<String>,
) -> Result<Json<BuildView>, Problem> {
    let id: BuildId = parse_id(&id, "build")?;
    app.read(|s| {
        s.builds
            .get(&id)
            .filter(|b| who.sees(&b.project))
            .map(|b| BuildView::new(s, b, true))
    })
    .map(Json)
    .ok_or_else(|| Problem::not_found(format!("build `{id}` not found")))
}

async fn build_write(
    app: &App,
    who: &Principal,
    id: &str,
    command: impl FnOnce(BuildId, u64) -> Command,
) -> Result<Json<BuildView>, Problem> {
    let id: BuildId = parse_id(id, "build")?;
    let (project, version) = app
        .read(|s| s.builds.get(&id).map(|b| (b.project.clone(), b.version)))
        .ok_or_else(|| Problem::not_found(format!("build `{id}` not found")))?;
    who.allowed(&project, Scope::Write, &format!("build `{id}`"))?;
    app.propose(command(id, app.now_ms())).await?;
    app.read_after_write(
        |s| s.builds.get(&id).is_none_or(|b| b.version > version),
        |s| s.builds.get(&id).map(|b| BuildView::new(s, b, true)),
    )
    .await
    .map(Json)
    .ok_or_else(|| Problem::not_found(format!("build `{id}` not found")))
}

#[utoipa::path(post, path = "/api/v1/builds/{id}/cancel", tag = "builds",
    responses((status = 200, body = BuildView), (status = 404), (status = 409)))]
pub(super) async fn cancel_build(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<BuildView>, Problem> {
    build_write(&app, &who, &id, |build, now_ms| Command::CancelBuild {
        build,
        now_ms,
    })
    .await
}

#[utoipa::path(post, path = "/api/v1/builds/{id}/retry", tag = "builds",
    responses((status = 200, body = BuildView), (status = 404), (status = 409)))]
pub(super) async fn retry_build(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<BuildView>, Problem> {
    build_write(&app, &who, &id, |build, now_ms| Command::RetryBuild {
        build,
        now_ms,
    })
    .await
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "builds",
    responses((status = 200, body = JobDetail), (status = 404)))]
pub(super) async fn get_job(
    AppState(app): Shared,
    who: Principal,
    _fresh: Fresh,
    Path(id): Path<String>,
) -> Result<Json<JobDetail>, Problem> {
    let id: JobId = parse_id(&id, "job")?;
    app.read(|s| {
        s.jobs
            .get(&id)
            .filter(|j| who.sees(&j.project))
            .map(|j| JobDetail::new(s, j))
    })
    .map(Json)
    .ok_or_else(|| Problem::not_found(format!("job `{id}` not found")))
}

#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses((status = 200, body = ClusterView)))]
pub(super) async fn cluster(
    AppState(app): Shared,
    who: Principal,
) -> Result<Json<ClusterView>, Problem> {
    if who.project.is_some() {
        return Err(Problem::forbidden(
            "cluster status needs a token that is not limited to one project",
        ));
    }
    let m = app.node.metrics();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let http = app.read(|s| s.replicas.clone());
    let members = membership
        .nodes()
        .map(|(id, node)| MemberView {
            id: *id,
            raft_addr: node.addr.clone(),
            http_url: http.get(id).cloned(),
            voter: voters.contains(id),
        })
        .collect();
    Ok(Json(ClusterView {
        node_id: m.id,
        leader: m.current_leader,
        term: m.current_term,
        commit_index: m.last_applied.map_or(0, |l| l.index),
        last_log_index: m.last_log_index.unwrap_or(0),
        members,
    }))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = TokenCreated), (status = 403)))]
pub(super) async fn create_token(
    AppState(app): Shared,
    who: Principal,
    json: Result<Json<CreateToken>, JsonRejection>,
) -> Result<Response, Problem> {
    who.global_admin()?;
    let req = body(json)?;
    let scope = Scope::parse(&req.scope).ok_or_else(|| {
        Problem::bad_request(format!(
            "scope `{}` is not one of read, write, admin",
            req.scope
        ))
    })?;
    let project = req.project.as_deref().map(project_id).transpose()?;
    let token = new_token()?;
    let reply = app
        .propose(Command::CreateToken {
            hash: hash_token(&token),
            scope,
            project: project.clone(),
            now_ms: app.now_ms(),
        })
        .await?;
    let Reply::TokenCreated(id) = reply else {
        return Err(Problem::unavailable(
            "unexpected reply from the state machine",
        ));
    };
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            id: id.to_string(),
            token,
            scope: scope.as_str(),
            project: project.map(|p| p.to_string()),
        }),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    responses((status = 204), (status = 404)))]
pub(super) async fn revoke_token(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    who.global_admin()?;
    let id: u64 = parse_id(&id, "token")?;
    app.propose(Command::RevokeToken { id }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /readyz`: 200 once this replica knows a leader (it can accept writes), else 503.
pub(super) async fn ready(AppState(app): Shared) -> Result<&'static str, Problem> {
    match app.node.metrics().current_leader {
        Some(_) => Ok("ready"),
        None => Err(Problem::unavailable("no leader is known yet")),
    }
}

/// Unknown API paths.
pub(super) async fn not_found() -> Problem {
    Problem::not_found("no such API endpoint; see /api/v1/openapi.json")
}
