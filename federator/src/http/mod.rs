//! The HTTP face of a replica (axum): webhooks, the REST API under `/api/v1`, the OpenAPI
//! document, health.
//!
//! Layout: [`problem`] (errors as problem+json), `auth` (bearer tokens and tenant checks),
//! `webhooks` (intake), `api` (REST handlers), `views` (JSON shapes), `openapi`.

mod api;
mod auth;
mod cells;
mod openapi;
pub mod problem;
mod views;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use flotilla_consensus::Node;
use flotilla_core::ids::ProjectId;
use flotilla_core::state::{Command, Entry, Response, State};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::cells::CellHub;
use crate::clock::Clock;
use crate::config::RateConfig;
use crate::machine::Machine;
use problem::Problem;

pub use auth::hash_token;

/// Largest webhook body accepted; GitHub caps payloads at 25 MB.
pub const MAX_WEBHOOK_BYTES: usize = 25 << 20;
/// Largest API request body.
const MAX_API_BYTES: usize = 1 << 20;
/// How long a write waits for the cluster before answering 503.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every handler shares.
#[derive(Debug)]
pub struct App {
    node: Arc<Node<Machine>>,
    clock: Arc<dyn Clock>,
    admin_hash: Option<String>,
    limiter: DefaultKeyedRateLimiter<ProjectId>,
    cells: Arc<CellHub>,
    logs_dir: Option<std::path::PathBuf>,
}

impl App {
    /// Handler state for a replica.
    pub fn new(
        node: Arc<Node<Machine>>,
        clock: Arc<dyn Clock>,
        admin_token: Option<&str>,
        rate: RateConfig,
        cells: Arc<CellHub>,
        logs_dir: Option<std::path::PathBuf>,
    ) -> Self {
        let per_second =
            std::num::NonZeroU32::new(rate.per_second).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(rate.burst).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            node,
            clock,
            admin_hash: admin_token.map(hash_token),
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            cells,
            logs_dir,
        }
    }

    /// Reads this replica's applied state.
    fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        self.node.read(|m| f(m.state()))
    }

    /// Commits a command through the leader and returns its response; a refusal becomes
    /// the matching problem.
    async fn propose(&self, command: Command) -> Result<Response, Problem> {
        match self
            .node
            .propose_via_leader(Entry::V1(command), WRITE_TIMEOUT)
            .await?
        {
            Response::Rejected(r) => Err(r.into()),
            other => Ok(other),
        }
    }

    /// Reads this replica's state once `ready` holds on it. A write forwarded to the leader
    /// returns when the leader has applied it; this replica applies it a moment later, and an
    /// answer read from here must show the write. Gives up (and reads anyway) after 2 s.
    async fn read_after_write<R>(
        &self,
        ready: impl Fn(&State) -> bool,
        f: impl FnOnce(&State) -> R,
    ) -> R {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.read(&ready) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.read(f)
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// The whole HTTP surface.
pub fn router(app: Arc<App>) -> Router {
    let webhooks = Router::new()
        .route("/webhooks/github/{project}", post(webhooks::github))
        .route("/webhooks/gitlab/{project}", post(webhooks::gitlab))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES));
    let api = Router::new()
        .route(
            "/projects",
            get(api::list_projects).post(api::create_project),
        )
        .route(
            "/projects/{id}",
            get(api::get_project)
                .patch(api::update_project)
                .delete(api::delete_project),
        )
        .route(
            "/projects/{id}/builds",
            post(api::trigger_build).get(api::list_project_builds),
        )
        .route("/builds", get(api::list_builds))
        .route("/builds/{id}", get(api::get_build))
        .route("/builds/{id}/cancel", post(api::cancel_build))
        .route("/builds/{id}/retry", post(api::retry_build))
        .route("/jobs/{id}", get(api::get_job))
        .route("/jobs/{id}/logs", get(cells::job_logs))
        .route("/cells", get(cells::list_cells))
        .route("/cells/{id}", get(cells::get_cell))
        .route("/cells/{id}/cordon", post(cells::cordon_cell))
        .route("/cells/{id}/uncordon", post(cells::uncordon_cell))
        .route("/cells/{id}/drain", post(cells::drain_cell))
        .route("/cluster", get(api::cluster))
        .route("/tokens", post(api::create_token))
        .route("/tokens/{id}", axum::routing::delete(api::revoke_token))
        .route("/openapi.json", get(openapi::document))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(MAX_API_BYTES));
    Router::new()
        .merge(webhooks)
        .nest("/api/v1", api)
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(cells::metrics))
        .route("/readyz", get(api::ready))
        .with_state(app)
}
