//! The scripts library: upload a version, list scripts, list a script's
//! versions, show one version with its content. A version is named by the
//! SHA-256 of its content and never changes; uploading the same content
//! again answers the version there is. Uploads are audited in the same
//! commit as the version (`script.add`, target `script:NAME@SHA256`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use drover_proto::scripts::{
    is_interpreter, is_script_name, AddScriptRequest, AddedScript, ScriptContent, ScriptSummary,
    ScriptVersion, DEFAULT_INTERPRETER, MAX_SCRIPT_BYTES,
};
use drover_proto::ErrorBody;
use drover_store::scripts::{NewScript, ScriptRecord};
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::auth::UserAuth;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::routes::audit::Audit;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(add_script, list_scripts))
        .routes(routes!(script_versions))
        .routes(routes!(show_version))
}

pub fn to_api(r: ScriptRecord) -> ScriptVersion {
    ScriptVersion {
        name: r.name,
        sha256: r.sha256,
        interpreter: r.interpreter,
        size: r.size,
        created_by: r.created_by,
        created_at: r.created_at,
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if is_script_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "script name '{}' is invalid: a letter, then letters, digits, '-' and '_', at most 64",
            name.escape_debug()
        )))
    }
}

/// The SHA-256 of a script's content, in hex: its version's name.
pub fn content_hash(content: &str) -> String {
    hex::encode(Sha256::digest(content.as_bytes()))
}

/// Upload a version of a script (created with its first version).
#[utoipa::path(
    post, path = "/api/v1/scripts", tag = "scripts",
    request_body = AddScriptRequest,
    security(("user" = [])),
    responses(
        (status = 201, body = AddedScript, description = "A new version"),
        (status = 200, body = AddedScript, description = "This content is a version already"),
        (status = 403, body = ErrorBody, description = "Needs an admin"),
        (status = 409, body = ErrorBody, description = "This content is a version already, with another interpreter"),
        (status = 422, body = ErrorBody),
    )
)]
async fn add_script(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: Audit,
    ApiJson(req): ApiJson<AddScriptRequest>,
) -> Result<(StatusCode, Json<AddedScript>), ApiError> {
    check_name(&req.name)?;
    if req.content.is_empty() {
        return Err(ApiError::invalid("content is empty"));
    }
    if req.content.len() > MAX_SCRIPT_BYTES {
        return Err(ApiError::invalid(format!(
            "content is {} bytes; at most {MAX_SCRIPT_BYTES} are accepted",
            req.content.len()
        )));
    }
    if req.content.contains('\0') {
        return Err(ApiError::invalid(
            "content holds a NUL byte: scripts are text",
        ));
    }
    let interpreter = req.interpreter.as_deref().unwrap_or(DEFAULT_INTERPRETER);
    if !is_interpreter(interpreter) {
        return Err(ApiError::invalid(format!(
            "interpreter '{}' is invalid: an absolute path without spaces, at most 256 bytes",
            interpreter.escape_debug()
        )));
    }
    let sha256 = content_hash(&req.content);
    audit.target(format!("script:{}@{sha256}", req.name));
    let mut tx = state.store.begin().await?;
    let (rec, created) = tx
        .add_script(&NewScript {
            name: &req.name,
            sha256: &sha256,
            content: &req.content,
            interpreter,
            by: &user.username,
            now: Utc::now(),
        })
        .await?;
    if rec.interpreter != interpreter {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            drover_proto::ErrorCode::Conflict,
            format!(
                "script '{}' has this content as version {} with interpreter {}; \
                 a version's interpreter cannot change",
                req.name,
                &sha256[..12],
                rec.interpreter
            ),
        ));
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        audit.note("unchanged", "the content is a version already");
        StatusCode::OK
    };
    audit.write(&mut tx, status).await?;
    tx.commit().await?;
    if created {
        tracing::info!(script = %req.name, version = %sha256, by = %user.username, "script version added");
    }
    Ok((
        status,
        Json(AddedScript {
            version: to_api(rec),
            created,
        }),
    ))
}

/// Every script: its latest version and how many there are.
#[utoipa::path(
    get, path = "/api/v1/scripts", tag = "scripts",
    security(("user" = [])),
    responses((status = 200, body = [ScriptSummary]))
)]
async fn list_scripts(
    State(state): State<AppState>,
    _user: UserAuth,
) -> Result<Json<Vec<ScriptSummary>>, ApiError> {
    let list = state.store.list_scripts().await?;
    Ok(Json(
        list.into_iter()
            .map(|(latest, versions)| ScriptSummary {
                name: latest.name.clone(),
                latest: to_api(latest),
                versions,
            })
            .collect(),
    ))
}

/// A script's versions, newest first.
#[utoipa::path(
    get, path = "/api/v1/scripts/{name}", tag = "scripts",
    params(("name" = String, Path, description = "Script name")),
    security(("user" = [])),
    responses((status = 200, body = [ScriptVersion]), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody))
)]
async fn script_versions(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Vec<ScriptVersion>>, ApiError> {
    check_name(&name)?;
    let versions = state.store.script_versions(&name).await?;
    if versions.is_empty() {
        return Err(ApiError::not_found(format!("script '{name}' not found")));
    }
    Ok(Json(versions.into_iter().map(to_api).collect()))
}

/// One version with its content: `latest`, a full SHA-256, or a unique
/// prefix of one (at least 4 hex digits).
#[utoipa::path(
    get, path = "/api/v1/scripts/{name}/versions/{version}", tag = "scripts",
    params(
        ("name" = String, Path, description = "Script name"),
        ("version" = String, Path, description = "`latest`, a SHA-256 or a unique prefix of one"),
    ),
    security(("user" = [])),
    responses((status = 200, body = ScriptContent), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody, description = "Not a script name, or a prefix naming several versions"))
)]
async fn show_version(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath((name, version)): ApiPath<(String, String)>,
) -> Result<Json<ScriptContent>, ApiError> {
    check_name(&name)?;
    let sha256 = if version == "latest" {
        match state.store.script_versions(&name).await?.into_iter().next() {
            Some(v) => v.sha256,
            None => return Err(ApiError::not_found(format!("script '{name}' not found"))),
        }
    } else {
        state.store.resolve_script_version(&name, &version).await?
    };
    match state.store.script_content(&name, &sha256).await? {
        Some((rec, content)) => Ok(Json(ScriptContent {
            version: to_api(rec),
            content,
        })),
        None => Err(ApiError::not_found(format!(
            "script version '{name}@{version}' not found"
        ))),
    }
}
