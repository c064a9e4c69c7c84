//! `GET /api/v1/cells`, `GET /api/v1/jobs/{id}/logs` and `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State as AppState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_core::ids::JobId;
use flotilla_core::job::JobPhase;
use flotilla_core::state::CellState;

use super::App;
use super::auth::Principal;
use super::problem::Problem;
use super::views::CellView;
use crate::clock::rfc3339;

type Shared = AppState<Arc<App>>;

/// Largest log served in one response; the tail is kept (the end of a log is where a
/// failure is). The log store issue brings ranges and live tail.
const MAX_LOG_BYTES: u64 = 16 << 20;

#[utoipa::path(get, path = "/api/v1/cells", tag = "cluster",
    responses((status = 200, body = Vec<CellView>), (status = 403)))]
pub(super) async fn list_cells(
    AppState(app): Shared,
    who: Principal,
) -> Result<Json<Vec<CellView>>, Problem> {
    if who.project.is_some() {
        return Err(Problem::forbidden(
            "cells are shared by every project: use a token that is not limited to one",
        ));
    }
    let connected = app.cells.connected();
    Ok(Json(app.read(|s| {
        s.cells
            .values()
            .map(|c| CellView {
                id: c.id.to_string(),
                state: c.state.as_str(),
                region: c.region.clone(),
                labels: c.labels.clone(),
                pools: c.pools.clone(),
                agent_version: c.agent_version.clone(),
                connected: connected.contains(&c.id),
                jobs: s.jobs_on(&c.id).count(),
                last_seen: rfc3339(c.last_seen_ms),
            })
            .collect()
    })))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs", tag = "builds",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job's output, every attempt in turn", content_type = "text/plain"),
        (status = 404), (status = 501)))]
pub(super) async fn job_logs(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id: JobId = id
        .parse()
        .map_err(|_| Problem::bad_request(format!("`{id}` is not a job id")))?;
    let placed = app
        .read(|s| {
            s.jobs
                .get(&id)
                .filter(|j| who.sees(&j.project))
                .map(|j| j.run.fence().is_some())
        })
        .ok_or_else(|| Problem::not_found(format!("job `{id}` not found")))?;
    let Some(dir) = &app.logs_dir else {
        return Err(Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "job logs are not served by this installation yet: the log store (Kafka to S3) is \
             still to come; `flotilla dev` serves the output of its local cells",
        ));
    };
    let path = dir.join(flotilla_core::runner::log_file_name(id));
    let text = match read_tail(&path).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !placed {
                // Never sent to a cell: nothing has run, so there is no output yet.
                String::new()
            } else {
                return Err(Problem::not_found(format!(
                    "no output was kept for job `{id}` on this replica"
                )));
            }
        }
        Err(e) => {
            return Err(Problem::unavailable(format!(
                "cannot read the output of job `{id}`: {e}"
            )));
        }
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

async fn read_tail(path: &std::path::Path) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    let len = f.metadata().await?.len();
    let mut prefix = String::new();
    if len > MAX_LOG_BYTES {
        f.seek(std::io::SeekFrom::Start(len - MAX_LOG_BYTES))
            .await?;
        prefix = format!("[… {} earlier bytes not shown …]\n", len - MAX_LOG_BYTES);
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).await?;
    Ok(prefix + &String::from_utf8_lossy(&bytes))
}

/// `GET /metrics`: Prometheus text format. Names follow `flotilla_<noun>_<unit>[_total]`.
pub(super) async fn metrics(AppState(app): Shared) -> Response {
    let m = app.cells.metrics();
    let raft = app.node.metrics();
    let leader = raft.current_leader == Some(app.node.id());
    let (cells, queued, running) = app.read(|s| {
        let mut by_state = [0usize; 4];
        for c in s.cells.values() {
            let i = match c.state {
                CellState::Active => 0,
                CellState::Cordoned => 1,
                CellState::Draining { .. } => 2,
                CellState::Lost => 3,
            };
            by_state[i] += 1;
        }
        let queued = s.queued_jobs().count();
        let running = s
            .jobs
            .values()
            .filter(|j| matches!(j.phase(), JobPhase::Leased | JobPhase::Running))
            .count();
        (by_state, queued, running)
    });
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    };
    counter(
        "flotilla_cell_stale_updates_total",
        "Job updates refused because they carried a stale fence.",
        m.stale_updates.load(Ordering::Relaxed),
    );
    counter(
        "flotilla_cell_lease_expiries_total",
        "Cells declared lost by this replica while it led.",
        m.lease_expiries.load(Ordering::Relaxed),
    );
    counter(
        "flotilla_cell_sessions_opened_total",
        "Cell sessions opened on this replica while it led.",
        m.sessions_opened.load(Ordering::Relaxed),
    );
    counter(
        "flotilla_placements_total",
        "Placement decisions this replica committed.",
        m.placements.load(Ordering::Relaxed),
    );
    out.push_str("# HELP flotilla_cells Registered cells by state.\n# TYPE flotilla_cells gauge\n");
    for (state, n) in ["active", "cordoned", "draining", "lost"].iter().zip(cells) {
        out.push_str(&format!("flotilla_cells{{state=\"{state}\"}} {n}\n"));
    }
    out.push_str(&format!(
        "# HELP flotilla_jobs Jobs by phase group.\n# TYPE flotilla_jobs gauge\nflotilla_jobs{{phase=\"queued\"}} {queued}\nflotilla_jobs{{phase=\"out\"}} {running}\n"
    ));
    out.push_str(&format!(
        "# HELP flotilla_raft_leader Whether this replica leads.\n# TYPE flotilla_raft_leader gauge\nflotilla_raft_leader {}\n",
        u8::from(leader)
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
