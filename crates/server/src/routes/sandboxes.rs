//! Sandbox profiles: listed and removed here, applied with the action
//! catalog. A job stores the whole profile it runs in, so removing one
//! changes no job; an action (or a run not yet ended) that names it keeps
//! it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use drover_proto::jobs::ActionSpec;
use drover_proto::sandbox::{Sandbox, SandboxEntry, PROCESS};
use drover_proto::ErrorBody;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::auth::UserAuth;
use crate::error::{ApiError, ApiPath};
use crate::sandboxes::spec_hash;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sandboxes))
        .routes(routes!(delete_sandbox))
}

/// Remove a sandbox profile no action and no run not yet ended names.
#[utoipa::path(
    delete, path = "/api/v1/sandboxes/{name}", tag = "actions",
    params(("name" = String, Path, description = "Sandbox profile name")),
    security(("user" = [])),
    responses(
        (status = 403, body = ErrorBody, description = "Needs an admin"),
        (status = 204),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Actions or runs not yet ended name it (named in the message)"),
        (status = 422, body = ErrorBody, description = "The built-in process"),
    )
)]
async fn delete_sandbox(
    State(state): State<AppState>,
    Admin(user): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if name == PROCESS {
        return Err(ApiError::invalid(format!(
            "sandbox '{PROCESS}' is built in and cannot be removed"
        )));
    }
    if state.store.sandbox(&name).await?.is_none() {
        return Err(ApiError::not_found(format!("sandbox '{name}' not found")));
    }
    let conflict =
        |m: String| ApiError::new(StatusCode::CONFLICT, drover_proto::ErrorCode::Conflict, m);
    let mut users = Vec::new();
    for rec in state.store.list_actions().await? {
        let spec: ActionSpec = serde_json::from_str(&rec.spec)
            .map_err(|e| ApiError::internal("reading an action", &e))?;
        if spec.sandbox.as_deref() == Some(name.as_str()) {
            users.push(spec.name);
        }
    }
    if !users.is_empty() {
        return Err(conflict(format!(
            "sandbox '{name}' is used by action(s) {}: change or remove them first",
            users.join(", ")
        )));
    }
    let named = Some(name.as_str());
    let runs = super::actions::runs_using(&state, |def| {
        def.tasks.iter().any(|t| t.sandbox.as_deref() == named)
            || def
                .workspace
                .as_ref()
                .is_some_and(|w| w.sandbox.as_deref() == named)
    })
    .await?;
    if !runs.is_empty() {
        return Err(conflict(format!(
            "sandbox '{name}' is used by run(s) not yet ended: {}; wait for them or cancel them first",
            runs.join(", ")
        )));
    }
    if !state.store.delete_sandbox(&name).await? {
        return Err(ApiError::not_found(format!("sandbox '{name}' not found")));
    }
    tracing::info!(by = %user.username, sandbox = %name, "sandbox removed");
    Ok(StatusCode::NO_CONTENT)
}

/// Every sandbox profile, the built-in `process` first.
#[utoipa::path(
    get, path = "/api/v1/sandboxes", tag = "actions",
    security(("user" = [])),
    responses((status = 200, body = [SandboxEntry]))
)]
async fn list_sandboxes(
    State(state): State<AppState>,
    _user: UserAuth,
) -> Result<Json<Vec<SandboxEntry>>, ApiError> {
    Ok(Json(all(&state).await?))
}

/// Every sandbox profile, the built-in `process` first (the API's list
/// and the dashboard's catalog).
pub(crate) async fn all(state: &AppState) -> Result<Vec<SandboxEntry>, ApiError> {
    let builtin = Sandbox::default_process();
    let mut out = vec![SandboxEntry {
        hash: spec_hash(&builtin),
        profile: builtin,
        builtin: true,
        updated_at: chrono::DateTime::<Utc>::UNIX_EPOCH,
    }];
    for rec in state.store.list_sandboxes().await? {
        let profile: Sandbox = serde_json::from_str(&rec.spec)
            .map_err(|e| ApiError::internal("reading a sandbox profile", &e))?;
        out.push(SandboxEntry {
            profile,
            hash: rec.hash,
            builtin: false,
            updated_at: drover_store::time_from_ms(rec.updated_at),
        });
    }
    Ok(out)
}
