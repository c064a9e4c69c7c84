//! The OpenAPI 3.1 document at `/api/v1/openapi.json`, generated from the handlers' and
//! views' annotations so it cannot drift from the code.

use axum::Json;
use utoipa::OpenApi;

use super::{api, views};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flotilla API",
        version = "1",
        description = "Projects, builds, jobs, tokens and cluster status. Authenticate with `Authorization: Bearer <token>`. Errors are application/problem+json."
    ),
    paths(
        api::list_projects,
        api::create_project,
        api::get_project,
        api::update_project,
        api::delete_project,
        api::trigger_build,
        api::list_builds,
        api::get_build,
        api::cancel_build,
        api::retry_build,
        api::get_job,
        super::cells::job_logs,
        super::cells::list_cells,
        super::cells::get_cell,
        super::cells::cordon_cell,
        super::cells::uncordon_cell,
        super::cells::drain_cell,
        api::cluster,
        api::create_token,
        api::revoke_token,
    ),
    components(schemas(
        views::ProjectView,
        views::CreateProject,
        views::UpdateProject,
        views::TriggerBuild,
        views::BuildAccepted,
        views::BuildView,
        views::JobView,
        views::JobDetail,
        views::JobTimings,
        views::CellView,
        views::PoolView,
        views::DrainCell,
        views::FailureView,
        views::CreateToken,
        views::TokenCreated,
        views::ClusterView,
        views::MemberView,
        views::Ignored,
    ))
)]
struct Doc;

/// `GET /api/v1/openapi.json` (no token needed: it describes, it does not reveal).
pub(super) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(Doc::openapi())
}
