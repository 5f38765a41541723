//! The action catalog: apply (create or replace) and list. A catalog file
//! also carries sandbox profiles (`sandboxes:`), applied with it.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use drover_proto::jobs::{Action, ActionCatalog, ActionSpec, AppliedNames, ApplyActionsResponse};
use drover_proto::sandbox::PROCESS;
use drover_proto::ErrorBody;
use drover_store::jobs::Upsert;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::auth::UserAuth;
use crate::catalog::{noop_spec, spec_hash, validate_spec};
use crate::error::{ApiError, ApiJson};
use crate::routes::audit::Audit;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(apply_actions, list_actions))
}

/// Looks an action up, the built-in `noop` included.
pub async fn find(state: &AppState, name: &str) -> Result<Option<(ActionSpec, String)>, ApiError> {
    Ok(crate::domain::find_action(&state.store, name)
        .await?
        .map(|(spec, hash)| (ActionSpec::clone(&spec), hash)))
}

/// Create or replace the actions and sandbox profiles of a catalog. All
/// are checked before any is stored; an action may name a profile of the
/// same catalog or one stored before.
#[utoipa::path(
    post, path = "/api/v1/actions", tag = "actions",
    request_body = ActionCatalog,
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), (status = 200, body = ApplyActionsResponse), (status = 422, body = ErrorBody))
)]
async fn apply_actions(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: Audit,
    ApiJson(catalog): ApiJson<ActionCatalog>,
) -> Result<Json<ApplyActionsResponse>, ApiError> {
    let mut profiles = std::collections::HashSet::new();
    for profile in &catalog.sandboxes {
        profile.validate().map_err(ApiError::invalid)?;
        if profile.name() == PROCESS {
            return Err(ApiError::invalid(format!(
                "sandbox '{PROCESS}' is built in and cannot be redefined"
            )));
        }
        if !profiles.insert(profile.name()) {
            return Err(ApiError::invalid(format!(
                "sandbox '{}' is defined twice",
                profile.name()
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for spec in &catalog.actions {
        validate_spec(spec).map_err(ApiError::invalid)?;
        if !seen.insert(spec.name.as_str()) {
            return Err(ApiError::invalid(format!(
                "action '{}' is defined twice",
                spec.name
            )));
        }
        if let Some(name) = &spec.sandbox {
            let known = profiles.contains(name.as_str())
                || crate::sandboxes::find(&state, name).await?.is_some();
            if !known {
                return Err(ApiError::invalid(format!(
                    "action '{}': sandbox: unknown sandbox '{name}' (define it under 'sandboxes')",
                    spec.name
                )));
            }
        }
    }
    let mut resp = ApplyActionsResponse {
        created: Vec::new(),
        updated: Vec::new(),
        unchanged: Vec::new(),
        sandboxes: AppliedNames::default(),
    };
    let now = Utc::now();
    // Profiles first: the actions that name them must never be stored
    // without them.
    for profile in &catalog.sandboxes {
        let json = serde_json::to_string(profile)
            .map_err(|e| ApiError::internal("encoding a sandbox profile", &e))?;
        let hash = crate::sandboxes::spec_hash(profile);
        let name = profile.name().to_owned();
        let names = &mut resp.sandboxes;
        match state
            .store
            .upsert_sandbox(&name, &json, &hash, &user.username, now)
            .await?
        {
            Upsert::Created => names.created.push(name),
            Upsert::Updated => names.updated.push(name),
            Upsert::Unchanged => names.unchanged.push(name),
        }
    }
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
    audit.note("created", resp.created.join(","));
    audit.note("updated", resp.updated.join(","));
    audit.note("sandboxes_created", resp.sandboxes.created.join(","));
    audit.note("sandboxes_updated", resp.sandboxes.updated.join(","));
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
