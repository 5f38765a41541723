//! Sandbox profiles: listed here, applied with the action catalog.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use drover_proto::sandbox::{Sandbox, SandboxEntry};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::UserAuth;
use crate::error::ApiError;
use crate::sandboxes::spec_hash;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_sandboxes))
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
    Ok(Json(out))
}
