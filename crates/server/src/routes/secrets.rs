//! The secrets vault: set, list, remove, and re-wrap under a new master
//! key. Values go in and are never answered; the audit middleware records
//! each change by path, which names the secret only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use drover_proto::secrets::{RotateMasterKeyResponse, Secret, SetSecretRequest};
use drover_proto::ErrorBody;
use drover_store::vault::{NewSecret, SecretRecord};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::selector::Selector;
use crate::state::AppState;
use crate::vault::{is_secret_name, secret_aad, MAX_VALUE_BYTES};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_secrets))
        .routes(routes!(set_secret, delete_secret))
        .routes(routes!(rotate_master_key))
}

/// Most action globs a secret may list.
const MAX_GLOBS: usize = 64;

fn to_api(r: SecretRecord) -> Secret {
    Secret {
        name: r.name,
        actions: r.actions,
        target: r.target,
        version: r.version,
        created_at: r.created_at,
        created_by: r.created_by,
        updated_at: r.updated_at,
        updated_by: r.updated_by,
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if is_secret_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "secret name '{}' is invalid: a letter or '_', then letters, digits and '_', at most 128",
            name.escape_debug()
        )))
    }
}

/// Create or replace a secret (its value, action globs and target).
#[utoipa::path(
    put, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    request_body = SetSecretRequest,
    security(("user" = [])),
    responses(
        (status = 200, body = Secret),
        (status = 403, body = ErrorBody, description = "Needs an admin"),
        (status = 422, body = ErrorBody),
    )
)]
async fn set_secret(
    State(state): State<AppState>,
    Admin(user): Admin,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<SetSecretRequest>,
) -> Result<Json<Secret>, ApiError> {
    check_name(&name)?;
    if req.value.is_empty() {
        return Err(ApiError::invalid("value is empty"));
    }
    if req.value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::invalid(format!(
            "value is {} bytes; at most {MAX_VALUE_BYTES} are accepted",
            req.value.len()
        )));
    }
    if req.actions.len() > MAX_GLOBS {
        return Err(ApiError::invalid(format!(
            "actions lists {} globs; at most {MAX_GLOBS} are accepted",
            req.actions.len()
        )));
    }
    for (i, g) in req.actions.iter().enumerate() {
        let ok = !g.is_empty()
            && g.len() <= 256
            && g.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.*?".contains(c));
        if !ok {
            return Err(ApiError::invalid(format!(
                "actions[{i}]: '{}' is not an action glob (letters, digits, '-', '_', '.', '*', '?')",
                g.escape_debug()
            )));
        }
    }
    if let Some(t) = &req.target {
        Selector::parse(t).map_err(|e| ApiError::invalid(format!("target: {e}")))?;
    }
    let sealed = state
        .vault
        .seal(&secret_aad(&name), req.value.as_bytes())
        .map_err(|e| ApiError::internal("sealing a secret", &e))?;
    let rec = state
        .store
        .put_secret(&NewSecret {
            name: &name,
            sealed: &sealed,
            actions: &req.actions,
            target: req.target.as_deref(),
            by: &user.username,
            now: Utc::now(),
        })
        .await?;
    tracing::info!(secret = %name, version = rec.version, by = %user.username, "secret set");
    Ok(Json(to_api(rec)))
}

/// The secrets: names, scopes and history, never values.
#[utoipa::path(
    get, path = "/api/v1/secrets", tag = "secrets",
    security(("user" = [])),
    responses((status = 200, body = [Secret]), (status = 403, body = ErrorBody, description = "Needs an admin"))
)]
async fn list_secrets(
    State(state): State<AppState>,
    Admin(_user): Admin,
) -> Result<Json<Vec<Secret>>, ApiError> {
    let list = state.store.list_secrets().await?;
    Ok(Json(list.into_iter().map(to_api).collect()))
}

/// Remove a secret. Jobs that reference it fail at dispatch from now on.
#[utoipa::path(
    delete, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    security(("user" = [])),
    responses((status = 204), (status = 403, body = ErrorBody, description = "Needs an admin"), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "Not a valid secret name"))
)]
async fn delete_secret(
    State(state): State<AppState>,
    Admin(user): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    if state.store.delete_secret(&name).await? {
        tracing::info!(secret = %name, by = %user.username, "secret removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("secret '{name}' not found")))
    }
}

/// Re-wrap every data key under this server's current master key (the
/// first of its list). Values are not re-encrypted; servers that already
/// opened the vault keep working.
#[utoipa::path(
    post, path = "/api/v1/secrets/rotate-master-key", tag = "secrets",
    security(("user" = [])),
    responses((status = 200, body = RotateMasterKeyResponse), (status = 403, body = ErrorBody, description = "Needs an admin"))
)]
async fn rotate_master_key(
    State(state): State<AppState>,
    Admin(user): Admin,
) -> Result<Json<RotateMasterKeyResponse>, ApiError> {
    let r = state
        .vault
        .rotate(&state.store)
        .await
        .map_err(|e| match e {
            crate::vault::Error::Store(s) => ApiError::from(s),
            other => ApiError::internal("re-wrapping the vault's data keys", &other),
        })?;
    tracing::info!(master_key = %r.master_key_id, rewrapped = r.rewrapped, by = %user.username, "vault master key rotated");
    Ok(Json(RotateMasterKeyResponse {
        master_key_id: r.master_key_id,
        rewrapped: r.rewrapped,
    }))
}
