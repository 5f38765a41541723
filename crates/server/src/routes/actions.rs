//! The action catalog: apply (create or replace), list, show and remove.
//! A catalog file also carries sandbox profiles (`sandboxes:`), applied
//! with it.
//!
//! Removing an action never breaks work already created: a job stores what
//! it runs (argv, environment, sandbox profile), so its queued and running
//! attempts and its retries go on. What is refused is removing an action
//! that a run not yet ended names in a task, as that task would fail when
//! it starts. Protection rules match action names by glob and stay as they
//! are.

use axum::extract::State;
use axum::http::StatusCode;
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
use crate::catalog::{noop_spec, spec_hash, validate_spec, NOOP};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::routes::audit::Audit;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(apply_actions, list_actions))
        .routes(routes!(show_action, delete_action))
}

/// Ids (up to five) of the runs not yet ended whose definition `uses`.
pub async fn runs_using(
    state: &AppState,
    uses: impl Fn(&drover_proto::workflows::WorkflowDef) -> bool,
) -> Result<Vec<String>, ApiError> {
    let mut found = Vec::new();
    for id in state.store.active_runs().await? {
        let Some(run) = state.store.run(&id).await? else {
            continue;
        };
        if run.finished_at.is_some() {
            continue;
        }
        let Some(body) = state.store.definition(&run.def_hash).await? else {
            continue;
        };
        let def: drover_proto::workflows::WorkflowDef = serde_json::from_str(&body)
            .map_err(|e| ApiError::internal("reading a workflow definition", &e))?;
        if uses(&def) {
            found.push(id);
            if found.len() == 5 {
                break;
            }
        }
    }
    Ok(found)
}

fn conflict(message: String) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        drover_proto::ErrorCode::Conflict,
        message,
    )
}

/// One action, the built-in `noop` included.
#[utoipa::path(
    get, path = "/api/v1/actions/{name}", tag = "actions",
    params(("name" = String, Path, description = "Action name")),
    security(("user" = [])),
    responses((status = 200, body = Action), (status = 404, body = ErrorBody))
)]
async fn show_action(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Action>, ApiError> {
    Ok(Json(one(&state, &name).await?))
}

/// One action, the built-in `noop` included; 404 when there is none.
pub(crate) async fn one(state: &AppState, name: &str) -> Result<Action, ApiError> {
    if name == NOOP {
        let spec = noop_spec();
        return Ok(Action {
            hash: spec_hash(&spec),
            spec,
            updated_at: chrono::DateTime::<Utc>::UNIX_EPOCH,
        });
    }
    let rec = state.store.action(name).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "action '{name}' not found: see drover actions list"
        ))
    })?;
    let spec: ActionSpec =
        serde_json::from_str(&rec.spec).map_err(|e| ApiError::internal("reading an action", &e))?;
    Ok(Action {
        spec,
        hash: rec.hash,
        updated_at: drover_store::time_from_ms(rec.updated_at),
    })
}

/// Remove an action. Jobs made from it keep what they run; a run not yet
/// ended that names it in a task keeps it (409).
#[utoipa::path(
    delete, path = "/api/v1/actions/{name}", tag = "actions",
    params(("name" = String, Path, description = "Action name")),
    security(("user" = [])),
    responses(
        (status = 403, body = ErrorBody, description = "Needs an admin"),
        (status = 204),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A run not yet ended uses it"),
        (status = 422, body = ErrorBody, description = "The built-in noop"),
    )
)]
async fn delete_action(
    State(state): State<AppState>,
    Admin(user): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if name == NOOP {
        return Err(ApiError::invalid(format!(
            "action '{NOOP}' is built in and cannot be removed"
        )));
    }
    if state.store.action(&name).await?.is_none() {
        return Err(ApiError::not_found(format!("action '{name}' not found")));
    }
    let runs = runs_using(&state, |def| def.tasks.iter().any(|t| t.action == name)).await?;
    if !runs.is_empty() {
        return Err(conflict(format!(
            "action '{name}' is used by run(s) not yet ended: {}; wait for them or cancel them first",
            runs.join(", ")
        )));
    }
    if !state.store.delete_action(&name).await? {
        return Err(ApiError::not_found(format!("action '{name}' not found")));
    }
    tracing::info!(by = %user.username, action = %name, "action removed");
    Ok(StatusCode::NO_CONTENT)
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
    Ok(Json(all(&state).await?))
}

/// Every action, the built-in `noop` first (the API's list and the
/// dashboard's catalog).
pub(crate) async fn all(state: &AppState) -> Result<Vec<Action>, ApiError> {
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
    Ok(out)
}
