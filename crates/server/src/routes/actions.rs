//! The action catalog: apply (create or replace) and list.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use drover_proto::jobs::{Action, ActionCatalog, ActionSpec, ApplyActionsResponse};
use drover_proto::ErrorBody;
use drover_store::jobs::Upsert;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::UserAuth;
use crate::catalog::{noop_spec, spec_hash, validate_spec, NOOP};
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(apply_actions, list_actions))
}

/// Looks an action up, the built-in `noop` included.
pub async fn find(state: &AppState, name: &str) -> Result<Option<(ActionSpec, String)>, ApiError> {
    if name == NOOP {
        let spec = noop_spec();
        let hash = spec_hash(&spec);
        return Ok(Some((spec, hash)));
    }
    let Some(rec) = state.store.action(name).await? else {
        return Ok(None);
    };
    let spec: ActionSpec =
        serde_json::from_str(&rec.spec).map_err(|e| ApiError::internal("reading an action", &e))?;
    Ok(Some((spec, rec.hash)))
}

/// Create or replace actions. All are checked before any is stored.
#[utoipa::path(
    post, path = "/api/v1/actions", tag = "actions",
    request_body = ActionCatalog,
    security(("user" = [])),
    responses((status = 200, body = ApplyActionsResponse), (status = 422, body = ErrorBody))
)]
async fn apply_actions(
    State(state): State<AppState>,
    user: UserAuth,
    ApiJson(catalog): ApiJson<ActionCatalog>,
) -> Result<Json<ApplyActionsResponse>, ApiError> {
    user.require_admin()?;
    let mut seen = std::collections::HashSet::new();
    for spec in &catalog.actions {
        validate_spec(spec).map_err(ApiError::invalid)?;
        if !seen.insert(spec.name.as_str()) {
            return Err(ApiError::invalid(format!(
                "action '{}' is defined twice",
                spec.name
            )));
        }
    }
    let mut resp = ApplyActionsResponse {
        created: Vec::new(),
        updated: Vec::new(),
        unchanged: Vec::new(),
    };
    let now = Utc::now();
    for spec in &catalog.actions {
        let json = serde_json::to_string(spec)
            .map_err(|e| ApiError::internal("encoding an action", &e))?;
        let hash = spec_hash(spec);
        let name = spec.name.clone();
        match state
            .store
            .upsert_action(&spec.name, &json, &hash, &user.username, now)
            .await?
        {
            Upsert::Created => resp.created.push(name),
            Upsert::Updated => resp.updated.push(name),
            Upsert::Unchanged => resp.unchanged.push(name),
        }
    }
    Ok(Json(resp))
}

/// Every action, the built-in `noop` first.
#[utoipa::path(
    get, path = "/api/v1/actions", tag = "actions",
    security(("user" = [])),
    responses((status = 200, body = [Action]))
)]
async fn list_actions(
    State(state): State<AppState>,
    _user: UserAuth,
) -> Result<Json<Vec<Action>>, ApiError> {
    let noop = noop_spec();
    let mut out = vec![Action {
        hash: spec_hash(&noop),
        spec: noop,
        updated_at: chrono::DateTime::<Utc>::UNIX_EPOCH,
    }];
    for rec in state.store.list_actions().await? {
        let spec: ActionSpec = serde_json::from_str(&rec.spec)
            .map_err(|e| ApiError::internal("reading an action", &e))?;
        out.push(Action {
            spec,
            hash: rec.hash,
            updated_at: drover_store::time_from_ms(rec.updated_at),
        });
    }
    Ok(Json(out))
}
