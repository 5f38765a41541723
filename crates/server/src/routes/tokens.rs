//! Bootstrap tokens (one-time agent enrollment) and API tokens (CI).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{Duration, Utc};
use drover_proto::api::{CreateTokenRequest, CreatedToken, TokenKind};
use drover_proto::labels::{check_group, check_labels};
use drover_proto::ErrorBody;
use drover_store::{NewBootstrapToken, NewUserToken};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{hash_token, new_token, TokenPrefix, UserAuth};
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_token))
}

/// Default lifetime of a bootstrap token.
const BOOTSTRAP_TTL_SECS: u64 = 3600;
/// Longest lifetime any token may be given (10 years).
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// Create a bootstrap token (default) or an API token. The secret is in the
/// response only; the server keeps its hash.
#[utoipa::path(
    post, path = "/api/v1/tokens", tag = "tokens",
    request_body = CreateTokenRequest,
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), 
        (status = 201, body = CreatedToken),
        (status = 422, description = "Invalid labels, group or ttl", body = ErrorBody),
    )
)]
async fn create_token(
    State(state): State<AppState>,
    user: UserAuth,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    user.require_admin()?;
    let created = create(&state, &user.user_id, &req).await?;
    tracing::info!(by = %user.username, kind = ?created.kind, id = %created.id, "token created");
    Ok((StatusCode::CREATED, Json(created)))
}

/// Creates a token for `user_id`; shared by the API and `drover up`.
pub async fn create(
    state: &AppState,
    user_id: &str,
    req: &CreateTokenRequest,
) -> Result<CreatedToken, ApiError> {
    if let Some(ttl) = req.ttl_secs {
        if ttl == 0 || ttl > MAX_TTL_SECS {
            return Err(ApiError::invalid(format!(
                "ttl_secs must be between 1 and {MAX_TTL_SECS}, got {ttl}"
            )));
        }
    }
    let now = Utc::now();
    let ttl = |secs: u64| Duration::seconds(secs as i64);
    let secret_err = |e: crate::auth::SecretError| ApiError::internal("making a token", &e);
    match req.kind {
        TokenKind::Bootstrap => {
            check_labels(&req.labels).map_err(|e| ApiError::invalid(e.to_string()))?;
            super::agents::check_settable(&req.labels)?;
            if let Some(g) = &req.group {
                check_group(g).map_err(|e| ApiError::invalid(e.to_string()))?;
            }
            let token = new_token(TokenPrefix::Bootstrap).map_err(secret_err)?;
            let expires_at = now + ttl(req.ttl_secs.unwrap_or(BOOTSTRAP_TTL_SECS));
            let stored = state
                .store
                .insert_bootstrap_token(
                    NewBootstrapToken {
                        token_hash: &hash_token(&token),
                        labels: &req.labels,
                        group: req.group.as_deref(),
                        name: req.name.as_deref(),
                        created_by: user_id,
                        expires_at,
                    },
                    now,
                )
                .await?;
            Ok(CreatedToken {
                id: stored.id,
                kind: TokenKind::Bootstrap,
                token,
                expires_at: Some(expires_at),
                labels: stored.labels,
                group: stored.group,
                tls_fingerprint: state.tls_fingerprint.clone(),
            })
        }
        TokenKind::Api => {
            if !req.labels.is_empty() || req.group.is_some() {
                return Err(ApiError::invalid(
                    "labels and group apply to bootstrap tokens only",
                ));
            }
            let token = new_token(TokenPrefix::Api).map_err(secret_err)?;
            let expires_at = req.ttl_secs.map(|s| now + ttl(s));
            let id = state
                .store
                .insert_user_token(
                    NewUserToken {
                        user_id,
                        kind: "api",
                        token_hash: &hash_token(&token),
                        name: req.name.as_deref(),
                        expires_at,
                    },
                    now,
                )
                .await?;
            Ok(CreatedToken {
                id,
                kind: TokenKind::Api,
                token,
                expires_at,
                labels: Default::default(),
                group: None,
                tls_fingerprint: None,
            })
        }
    }
}
