//! `GET /api/v1/cells`, `GET /api/v1/jobs/{id}/logs` and `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State as AppState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use flotilla_core::ids::{CellId, JobId};
use flotilla_core::job::JobPhase;
use flotilla_core::state::{CellChange, CellState, Command};

use super::App;
use super::auth::Principal;
use super::problem::Problem;
use super::views::{CellView, DrainCell, PoolView};
use crate::clock::rfc3339;

type Shared = AppState<Arc<App>>;

/// Longest drain deadline accepted (beyond it, cordon the cell: a drain that long is a
/// mistake, and far-future times are where time formatting breaks).
const MAX_DRAIN: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// Largest log served in one response; the tail is kept (the end of a log is where a
/// failure is). The log store issue brings ranges and live tail.
const MAX_LOG_BYTES: u64 = 16 << 20;

fn operator(who: &Principal) -> Result<(), Problem> {
    if who.project.is_some() {
        return Err(Problem::forbidden(
            "cells are shared by every project: use a token that is not limited to one",
        ));
    }
    Ok(())
}

fn cell_views(app: &App, only: Option<&CellId>) -> Vec<CellView> {
    let live = app.cells.live();
    app.read(|s| {
        let mut homes: BTreeMap<CellId, usize> = BTreeMap::new();
        for p in s.projects.keys() {
            if let Some(home) = flotilla_core::placement::home_cell(p, s.cells.values()) {
                *homes.entry(home).or_default() += 1;
            }
        }
        s.cells
            .values()
            .filter(|c| only.is_none_or(|id| *id == c.id))
            .map(|c| {
                let live = live.get(&c.id);
                let load = live.and_then(|l| l.load.as_ref());
                CellView {
                    id: c.id.to_string(),
                    state: c.state.as_str(),
                    region: c.region.clone(),
                    labels: c.labels.clone(),
                    pools: c.pools.clone(),
                    agent_version: c.agent_version.clone(),
                    connected: live.is_some(),
                    jobs: s.jobs_on(&c.id).count(),
                    last_seen: rfc3339(c.last_seen_ms),
                    last_heartbeat_ms_ago: live
                        .map(|l| u64::try_from(l.since_heartbeat.as_millis()).unwrap_or(u64::MAX)),
                    drain_deadline: match c.state {
                        CellState::Draining { deadline_ms } => Some(rfc3339(deadline_ms)),
                        _ => None,
                    },
                    returns_as: c.returns_as.map(CellState::as_str),
                    capacity: load
                        .map(|l| {
                            l.pools
                                .iter()
                                .map(|(name, p)| {
                                    (
                                        name.clone(),
                                        PoolView {
                                            total: p.total,
                                            busy: p.busy,
                                            idle: p.idle,
                                            starting: p.starting,
                                            queued: p.queued,
                                            max: p.max,
                                            workload: p.workload(),
                                        },
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    api_budget: load.and_then(|l| l.api_budget),
                    home_projects: homes.get(&c.id).copied().unwrap_or(0),
                }
            })
            .collect()
    })
}

#[utoipa::path(get, path = "/api/v1/cells", tag = "cluster",
    responses((status = 200, body = Vec<CellView>), (status = 403)))]
pub(super) async fn list_cells(
    AppState(app): Shared,
    who: Principal,
) -> Result<Json<Vec<CellView>>, Problem> {
    operator(&who)?;
    Ok(Json(cell_views(&app, None)))
}

#[utoipa::path(get, path = "/api/v1/cells/{id}", tag = "cluster",
    params(("id" = String, Path, description = "Cell id")),
    responses((status = 200, body = CellView), (status = 403), (status = 404)))]
pub(super) async fn get_cell(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<CellView>, Problem> {
    operator(&who)?;
    let id = cell_id(&id)?;
    cell_views(&app, Some(&id))
        .pop()
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("cell `{id}` not found")))
}

fn cell_id(id: &str) -> Result<CellId, Problem> {
    CellId::new(id).map_err(|e| Problem::bad_request(e.to_string()))
}

/// Commits `change` to cell `id` and answers with the cell as it is then.
async fn change_cell(
    app: &App,
    who: &Principal,
    id: &str,
    change: CellChange,
) -> Result<Json<CellView>, Problem> {
    who.global_admin()?;
    let id = cell_id(id)?;
    if !app.read(|s| s.cells.contains_key(&id)) {
        return Err(Problem::not_found(format!("cell `{id}` not found")));
    }
    let now_ms = app.now_ms();
    app.propose(Command::SetCellState {
        cell: id.clone(),
        change,
        now_ms,
    })
    .await?;
    // Wait until this replica has applied the change itself (a follower may lag): the cell
    // in the state asked for — or already past it (a drain with no time left is finished at
    // once), or lost meanwhile.
    app.read_after_write(
        |s| {
            s.cells.get(&id).is_some_and(|c| match (change, c.state) {
                (_, CellState::Lost) => true,
                (CellChange::Cordon, CellState::Cordoned)
                | (CellChange::Uncordon, CellState::Active) => true,
                (CellChange::Drain { deadline_ms }, CellState::Draining { deadline_ms: d }) => {
                    d == deadline_ms
                }
                (CellChange::Drain { deadline_ms }, CellState::Cordoned) => {
                    deadline_ms <= app.now_ms()
                }
                _ => false,
            })
        },
        |_| (),
    )
    .await;
    tracing::info!(cell = %id, change = ?change, "Cell state changed by an operator.");
    cell_views(app, Some(&id))
        .pop()
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("cell `{id}` not found")))
}

#[utoipa::path(post, path = "/api/v1/cells/{id}/cordon", tag = "cluster",
    params(("id" = String, Path, description = "Cell id")),
    responses((status = 200, body = CellView, description = "No new work goes to the cell; running jobs carry on"), (status = 403), (status = 404)))]
pub(super) async fn cordon_cell(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<CellView>, Problem> {
    change_cell(&app, &who, &id, CellChange::Cordon).await
}

#[utoipa::path(post, path = "/api/v1/cells/{id}/uncordon", tag = "cluster",
    params(("id" = String, Path, description = "Cell id")),
    responses((status = 200, body = CellView, description = "The cell takes new work again"), (status = 403), (status = 404), (status = 409)))]
pub(super) async fn uncordon_cell(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<CellView>, Problem> {
    change_cell(&app, &who, &id, CellChange::Uncordon).await
}

#[utoipa::path(post, path = "/api/v1/cells/{id}/drain", tag = "cluster", request_body = DrainCell,
    params(("id" = String, Path, description = "Cell id")),
    responses((status = 200, body = CellView, description = "No new work; what is still there at the deadline is placed elsewhere"), (status = 400), (status = 403), (status = 404), (status = 409)))]
pub(super) async fn drain_cell(
    AppState(app): Shared,
    who: Principal,
    Path(id): Path<String>,
    json: Result<Json<DrainCell>, JsonRejection>,
) -> Result<Json<CellView>, Problem> {
    who.global_admin()?;
    let req = json.map(|Json(v)| v).map_err(|e| {
        Problem::bad_request(format!(
            "the request body is not what this endpoint expects: {}",
            e.body_text()
        ))
    })?;
    let grace = humantime::parse_duration(&req.deadline).map_err(|e| {
        Problem::bad_request(format!(
            "deadline `{}` is not a duration like `10m`: {e}",
            req.deadline
        ))
    })?;
    if grace > MAX_DRAIN {
        return Err(Problem::bad_request(format!(
            "deadline `{}` is longer than {}: drain in steps, or cordon the cell instead",
            req.deadline,
            humantime::format_duration(MAX_DRAIN)
        )));
    }
    let deadline_ms = app
        .now_ms()
        .saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
    change_cell(&app, &who, &id, CellChange::Drain { deadline_ms }).await
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
    counter(
        "flotilla_drained_jobs_total",
        "Jobs handed back by drains that reached their deadline.",
        m.drained_jobs.load(Ordering::Relaxed),
    );
    out.push_str(&format!(
        "# HELP flotilla_jobs_unplaceable Queued jobs no connected active cell matches (region, labels, pool), at the last scheduler tick.\n# TYPE flotilla_jobs_unplaceable gauge\nflotilla_jobs_unplaceable {}\n",
        m.unplaceable.load(Ordering::Relaxed)
    ));
    out.push_str(&format!(
        "# HELP flotilla_jobs_waiting_for_room Queued jobs that match a cell but found no free runner, at the last scheduler tick.\n# TYPE flotilla_jobs_waiting_for_room gauge\nflotilla_jobs_waiting_for_room {}\n",
        m.waiting_for_room.load(Ordering::Relaxed)
    ));
    out.push_str("# HELP flotilla_cells Registered cells by state.\n# TYPE flotilla_cells gauge\n");
    for (state, n) in ["active", "cordoned", "draining", "lost"].iter().zip(cells) {
        out.push_str(&format!("flotilla_cells{{state=\"{state}\"}} {n}\n"));
    }
    out.push_str(&format!(
        "# HELP flotilla_jobs Jobs by phase group.\n# TYPE flotilla_jobs gauge\nflotilla_jobs{{phase=\"queued\"}} {queued}\nflotilla_jobs{{phase=\"out\"}} {running}\n"
    ));
    // Per connected cell and pool, from the last heartbeats: cells and pools are configured
    // by operators, so the labels stay a small set.
    let mut live: Vec<_> = app.cells.live().into_iter().collect();
    live.sort_by(|a, b| a.0.cmp(&b.0));
    out.push_str("# HELP flotilla_pool_workload Total workload (busy + queued) / total of each pool, as its cell last reported.\n# TYPE flotilla_pool_workload gauge\n");
    for (cell, l) in &live {
        for (pool, p) in l.load.iter().flat_map(|l| &l.pools) {
            // No runners: any demand at all is an infinite workload.
            let w = match p.workload() {
                Some(w) => w.to_string(),
                None if p.busy + p.queued > 0 => "+Inf".to_owned(),
                None => "0".to_owned(),
            };
            let pool = label(pool);
            out.push_str(&format!(
                "flotilla_pool_workload{{cell=\"{cell}\",pool=\"{pool}\"}} {w}\n"
            ));
        }
    }
    out.push_str("# HELP flotilla_pool_runners Runners of each pool by state, as its cell last reported.\n# TYPE flotilla_pool_runners gauge\n");
    for (cell, l) in &live {
        for (pool, p) in l.load.iter().flat_map(|l| &l.pools) {
            let pool = label(pool);
            for (state, n) in [("busy", p.busy), ("idle", p.idle), ("starting", p.starting)] {
                out.push_str(&format!(
                    "flotilla_pool_runners{{cell=\"{cell}\",pool=\"{pool}\",state=\"{state}\"}} {n}\n"
                ));
            }
        }
    }
    out.push_str("# HELP flotilla_pool_queued_jobs Jobs waiting in each cell for a runner of the pool.\n# TYPE flotilla_pool_queued_jobs gauge\n");
    for (cell, l) in &live {
        for (pool, p) in l.load.iter().flat_map(|l| &l.pools) {
            out.push_str(&format!(
                "flotilla_pool_queued_jobs{{cell=\"{cell}\",pool=\"{}\"}} {}\n",
                label(pool),
                p.queued
            ));
        }
    }
    out.push_str(&format!(
        "# HELP flotilla_raft_leader Whether this replica leads.\n# TYPE flotilla_raft_leader gauge\nflotilla_raft_leader {}\n",
        u8::from(leader)
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A Prometheus label value, escaped (pool names come from agents' heartbeats).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
