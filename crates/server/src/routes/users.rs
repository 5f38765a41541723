//! Logging in: a username and password traded for a session token.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use drover_proto::api::{LoginRequest, LoginResponse};
use drover_proto::{ErrorBody, ErrorCode};
use drover_store::NewUserToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{hash_token, new_token, verify_password, TokenPrefix};
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(login))
}

/// A real hash of a random password, checked when the user does not exist
/// so that a wrong name takes as long as a wrong password.
fn dummy_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        crate::auth::new_password()
            .and_then(|p| crate::auth::hash_password(&p))
            .unwrap_or_default()
    })
    .clone()
}

/// Log in with a password; returns a session token.
#[utoipa::path(
    post, path = "/api/v1/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, body = LoginResponse),
        (status = 401, description = "Wrong username or password", body = ErrorBody),
    )
)]
async fn login(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let user = state.store.user_by_username(&req.username).await?;
    let known_hash = user.as_ref().map(|u| u.password_hash.clone());
    let password = req.password;
    let ok = tokio::task::spawn_blocking(move || {
        let hash = known_hash.unwrap_or_else(dummy_hash);
        verify_password(&password, &hash)
    })
    .await
    .map_err(|e| ApiError::internal("verifying a password", &e))?;
    let user = match user {
        Some(u) if ok => u,
        _ => {
            tracing::info!(username = %req.username, "failed login");
            return Err(ApiError::unauthorized(
                ErrorCode::InvalidCredentials,
                "wrong username or password",
            ));
        }
    };
    let token =
        new_token(TokenPrefix::Session).map_err(|e| ApiError::internal("making a token", &e))?;
    let now = Utc::now();
    let expires_at = now + state.config.session_ttl;
    state
        .store
        .insert_user_token(
            NewUserToken {
                user_id: &user.id,
                kind: "session",
                token_hash: &hash_token(&token),
                name: None,
                expires_at: Some(expires_at),
            },
            now,
        )
        .await?;
    tracing::info!(username = %user.username, "user logged in");
    Ok(Json(LoginResponse {
        token,
        expires_at,
        username: user.username,
        role: user.role,
    }))
}
