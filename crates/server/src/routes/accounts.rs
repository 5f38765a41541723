//! Users: add, list, show, change a role and scope, disable and enable,
//! set a password. Admins manage everyone; a user may see themselves and
//! change their own password. A change counts on the user's next request:
//! every request reads the user's role, scope and state.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use drover_proto::access::{
    CreateUserRequest, CreatedUser, PasswordChanged, Scope, SetPasswordRequest, SetRoleRequest,
    UserView, MAX_PASSWORD_BYTES, MAX_USERNAME_BYTES, MIN_PASSWORD_CHARS,
};
use drover_proto::api::Role;
use drover_proto::{ErrorBody, ErrorCode};
use drover_store::{User, UserChange};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::{check_scope, Admin};
use crate::auth::{hash_password, new_password, verify_password, UserAuth};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::routes::audit::Audit;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_user, list_users))
        .routes(routes!(show_user))
        .routes(routes!(set_role))
        .routes(routes!(disable_user))
        .routes(routes!(enable_user))
        .routes(routes!(set_password))
}

pub fn view(u: User) -> UserView {
    UserView {
        id: u.id,
        username: u.username,
        role: u.role,
        scope: (!u.scope.is_everywhere()).then_some(u.scope),
        created_at: u.created_at,
        disabled_at: u.disabled_at,
    }
}

fn check_username(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_USERNAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
        && !name.starts_with('-')
        && !name.bytes().all(|b| b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "username: '{name}' must be 1 to {MAX_USERNAME_BYTES} letters, digits, '.', '_', '-' or '@', not starting with '-' nor only dots"
        )))
    }
}

/// The password policy of every way to set one (also `crate::offline`).
pub(crate) fn check_password(p: &str) -> Result<(), ApiError> {
    if p.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::invalid(format!(
            "password: at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if p.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid(format!(
            "password: at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// A role with its scope, checked: only an operator has a scope.
fn role_scope(role: Role, scope: Option<Scope>) -> Result<Scope, ApiError> {
    let scope = scope.unwrap_or_default();
    if !scope.is_everywhere() && role != Role::Operator {
        return Err(ApiError::invalid(format!(
            "scope: only an operator has a scope ({} acts everywhere its role allows)",
            role.as_str()
        )));
    }
    check_scope(&scope).map_err(ApiError::invalid)?;
    Ok(scope)
}

/// The password to set: the given one, checked, or a new one to show once.
async fn password_hash(given: Option<String>) -> Result<(String, Option<String>), ApiError> {
    let (password, generated) = match given {
        Some(p) => {
            check_password(&p)?;
            (p, false)
        }
        None => (
            new_password().map_err(|e| ApiError::internal("making a password", &e))?,
            true,
        ),
    };
    let to_hash = password.clone();
    let hash = tokio::task::spawn_blocking(move || hash_password(&to_hash))
        .await
        .map_err(|e| ApiError::internal("hashing a password", &e))?
        .map_err(|e| ApiError::internal("hashing a password", &e))?;
    Ok((hash, generated.then_some(password)))
}

async fn load(state: &AppState, name: &str) -> Result<User, ApiError> {
    state
        .store
        .user_by_username(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user '{name}' not found")))
}

fn last_admin(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        ErrorCode::Conflict,
        format!("'{name}' is the last enabled admin: make another admin first"),
    )
}

/// Add a user.
#[utoipa::path(
    post, path = "/api/v1/users", tag = "users",
    request_body = CreateUserRequest,
    security(("user" = [])),
    responses((status = 201, body = CreatedUser), (status = 403, body = ErrorBody, description = "Needs an admin"),
        (status = 409, body = ErrorBody, description = "The name is taken"))
)]
async fn create_user(
    State(state): State<AppState>,
    Admin(by): Admin,
    audit: Audit,
    ApiJson(req): ApiJson<CreateUserRequest>,
) -> Result<(StatusCode, Json<CreatedUser>), ApiError> {
    audit.target(format!("user:{}", req.username));
    audit.note("role", req.role.as_str());
    check_username(&req.username)?;
    let scope = role_scope(req.role, req.scope)?;
    let (hash, shown) = password_hash(req.password).await?;
    let user = match state
        .store
        .create_user(&req.username, &hash, req.role, &scope, Utc::now())
        .await
    {
        Ok(u) => u,
        Err(e) if e.is_unique_violation() => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::Conflict,
                format!("user '{}' exists already", req.username),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(by = %by.username, user = %user.username, role = user.role.as_str(), "user added");
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            user: view(user),
            password: shown,
        }),
    ))
}

/// Every user, by name.
#[utoipa::path(
    get, path = "/api/v1/users", tag = "users",
    security(("user" = [])),
    responses((status = 200, body = [UserView]), (status = 403, body = ErrorBody, description = "Needs an admin"))
)]
async fn list_users(
    State(state): State<AppState>,
    Admin(_by): Admin,
) -> Result<Json<Vec<UserView>>, ApiError> {
    let users = state.store.list_users().await?;
    Ok(Json(users.into_iter().map(view).collect()))
}

/// One user: yourself, or anyone as an admin.
#[utoipa::path(
    get, path = "/api/v1/users/{name}", tag = "users",
    params(("name" = String, Path, description = "User name")),
    security(("user" = [])),
    responses((status = 200, body = UserView), (status = 403, body = ErrorBody, description = "Another user needs an admin"))
)]
async fn show_user(
    State(state): State<AppState>,
    by: UserAuth,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<UserView>, ApiError> {
    if name != by.username {
        by.require_admin()?;
    }
    Ok(Json(view(load(&state, &name).await?)))
}

/// Give a user a role (and an operator a scope). Refused for the last
/// enabled admin.
#[utoipa::path(
    put, path = "/api/v1/users/{name}/role", tag = "users",
    params(("name" = String, Path, description = "User name")),
    request_body = SetRoleRequest,
    security(("user" = [])),
    responses((status = 200, body = UserView), (status = 403, body = ErrorBody, description = "Needs an admin"),
        (status = 409, body = ErrorBody, description = "The last enabled admin"))
)]
async fn set_role(
    State(state): State<AppState>,
    Admin(by): Admin,
    audit: Audit,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<SetRoleRequest>,
) -> Result<Json<UserView>, ApiError> {
    audit.note("role", req.role.as_str());
    let scope = role_scope(req.role, req.scope)?;
    let user = load(&state, &name).await?;
    match state
        .store
        .set_user_role(&user.id, req.role, &scope)
        .await?
    {
        UserChange::Done => {}
        UserChange::NotFound => {
            return Err(ApiError::not_found(format!("user '{name}' not found")))
        }
        UserChange::LastAdmin => return Err(last_admin(&name)),
    }
    tracing::info!(by = %by.username, user = %name, role = req.role.as_str(), %scope, "role changed");
    Ok(Json(view(load(&state, &name).await?)))
}

/// Disable a user: no login, and every token of theirs is refused from
/// the next request on. Refused for the last enabled admin.
#[utoipa::path(
    post, path = "/api/v1/users/{name}/disable", tag = "users",
    params(("name" = String, Path, description = "User name")),
    security(("user" = [])),
    responses((status = 200, body = UserView), (status = 403, body = ErrorBody, description = "Needs an admin"),
        (status = 409, body = ErrorBody, description = "The last enabled admin"))
)]
async fn disable_user(
    State(state): State<AppState>,
    Admin(by): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<UserView>, ApiError> {
    let user = load(&state, &name).await?;
    if user.disabled_at.is_none() {
        match state
            .store
            .set_user_disabled(&user.id, Some(Utc::now()))
            .await?
        {
            UserChange::Done => {}
            UserChange::NotFound => {
                return Err(ApiError::not_found(format!("user '{name}' not found")))
            }
            UserChange::LastAdmin => return Err(last_admin(&name)),
        }
        tracing::warn!(by = %by.username, user = %name, "user disabled");
    }
    Ok(Json(view(load(&state, &name).await?)))
}

/// Enable a disabled user again.
#[utoipa::path(
    post, path = "/api/v1/users/{name}/enable", tag = "users",
    params(("name" = String, Path, description = "User name")),
    security(("user" = [])),
    responses((status = 200, body = UserView), (status = 403, body = ErrorBody, description = "Needs an admin"))
)]
async fn enable_user(
    State(state): State<AppState>,
    Admin(by): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<UserView>, ApiError> {
    let user = load(&state, &name).await?;
    if user.disabled_at.is_some() {
        state.store.set_user_disabled(&user.id, None).await?;
        tracing::info!(by = %by.username, user = %name, "user enabled");
    }
    Ok(Json(view(load(&state, &name).await?)))
}

/// Set a password: your own (giving the current one), or anyone's as an
/// admin. Ends the user's other sessions; API tokens stay.
#[utoipa::path(
    post, path = "/api/v1/users/{name}/password", tag = "users",
    params(("name" = String, Path, description = "User name")),
    request_body = SetPasswordRequest,
    security(("user" = [])),
    responses((status = 200, body = PasswordChanged), (status = 403, body = ErrorBody, description = "Another user's password needs an admin; your own needs the current one"))
)]
async fn set_password(
    State(state): State<AppState>,
    by: UserAuth,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<SetPasswordRequest>,
) -> Result<Json<PasswordChanged>, ApiError> {
    let own = name == by.username;
    if !own {
        by.require_admin()?;
    }
    let user = load(&state, &name).await?;
    if own && !by.role.at_least(Role::Admin) {
        let current = req.current_password.clone().unwrap_or_default();
        let stored = user.password_hash.clone();
        let ok = tokio::task::spawn_blocking(move || verify_password(&current, &stored))
            .await
            .map_err(|e| ApiError::internal("verifying a password", &e))?;
        if !ok {
            return Err(ApiError::forbidden(
                "current_password: give your current password to change it",
            ));
        }
    }
    let (hash, shown) = password_hash(req.password).await?;
    let keep = own.then_some(by.token_id.as_str());
    let ended = state
        .store
        .set_user_password(&user.id, &hash, keep, Utc::now())
        .await?;
    tracing::info!(by = %by.username, user = %name, sessions_ended = ended, "password set");
    Ok(Json(PasswordChanged {
        password: shown,
        sessions_ended: ended,
    }))
}
