//! The fleet-wide emergency stop: pause dispatch everywhere and stop every
//! running attempt (gracefully, or at once with `force`), then resume.
//! Both are state-changing calls of a person, so the audit log records
//! them.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use drover_proto::api::{FleetStatus, StopRequest, StopResponse};
use drover_proto::ErrorBody;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::auth::UserAuth;
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(fleet_status))
        .routes(routes!(stop_fleet))
        .routes(routes!(resume_fleet))
}

/// Whether dispatch is paused fleet-wide, and agents by dispatch state.
pub async fn status(state: &AppState) -> Result<FleetStatus, ApiError> {
    let f = state.store.fleet().await?;
    let agents = state
        .store
        .count_agents_by_dispatch()
        .await?
        .into_iter()
        .map(|(k, n)| (k, n.max(0) as u64))
        .collect();
    Ok(FleetStatus {
        stopped: f.stopped_at.is_some(),
        stopped_at: f.stopped_at,
        stopped_by: f.stopped_by,
        reason: f.reason,
        force: f.force,
        agents,
    })
}

/// Checks a reason given by a person.
pub fn check_reason(reason: Option<&str>) -> Result<(), ApiError> {
    match reason {
        Some(r) if r.len() > 500 => Err(ApiError::invalid("reason must be at most 500 bytes")),
        Some(r) if r.chars().any(|c| c.is_control()) => Err(ApiError::invalid(
            "reason must not contain control characters",
        )),
        _ => Ok(()),
    }
}

/// Whether dispatch is paused fleet-wide.
#[utoipa::path(
    get, path = "/api/v1/fleet", tag = "fleet",
    security(("user" = [])),
    responses((status = 200, body = FleetStatus))
)]
async fn fleet_status(
    State(state): State<AppState>,
    _user: UserAuth,
) -> Result<Json<FleetStatus>, ApiError> {
    Ok(Json(status(&state).await?))
}

/// Emergency stop: no agent is given work until `resume`, and every
/// attempt dispatched or running anywhere is cancelled — SIGTERM, then
/// SIGKILL after its kill grace; with `force`, SIGKILL at once. Queued work
/// waits.
#[utoipa::path(
    post, path = "/api/v1/fleet/stop", tag = "fleet",
    request_body(content = Option<StopRequest>),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), (status = 200, body = StopResponse), (status = 422, body = ErrorBody))
)]
async fn stop_fleet(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: crate::routes::audit::Audit,
    req: Option<ApiJson<StopRequest>>,
) -> Result<Json<StopResponse>, ApiError> {
    let req = req.map(|ApiJson(r)| r).unwrap_or_default();
    check_reason(req.reason.as_deref())?;
    audit.note("reason", req.reason.as_deref().unwrap_or_default());
    if req.force {
        audit.note("force", "true");
    }
    let how = if req.force {
        "forced emergency stop"
    } else {
        "emergency stop"
    };
    let reason = match &req.reason {
        Some(r) => format!("{how} by {}: {r}", user.username),
        None => format!("{how} by {}", user.username),
    };
    let stopped = state
        .store
        .stop_fleet(&user.username, req.force, &reason, Utc::now())
        .await?;
    let agents = stopped.agents();
    audit.note("cancelled", stopped.attempts.len().to_string());
    tracing::warn!(by = %user.username, force = req.force, attempts = stopped.attempts.len(), agents = agents.len(), %reason, "fleet stopped");
    Ok(Json(StopResponse {
        cancelled: stopped.attempts.len() as u64,
        agents: agents.len() as u64,
        fleet: status(&state).await?,
    }))
}

/// End the emergency stop: dispatch resumes everywhere. Attempts it
/// cancelled stay cancelled.
#[utoipa::path(
    post, path = "/api/v1/fleet/resume", tag = "fleet",
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), (status = 200, body = FleetStatus))
)]
async fn resume_fleet(
    State(state): State<AppState>,
    Admin(user): Admin,
) -> Result<Json<FleetStatus>, ApiError> {
    state.store.resume_fleet().await?;
    tracing::warn!(by = %user.username, "fleet resumed");
    Ok(Json(status(&state).await?))
}
