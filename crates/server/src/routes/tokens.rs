//! Bootstrap tokens (one-time agent enrollment) and API tokens (CI).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{Duration, Utc};
use drover_proto::access::TokenView;
use drover_proto::api::{CreateTokenRequest, CreatedToken, TokenKind};
use drover_proto::labels::{check_group, check_labels};
use drover_proto::ErrorBody;
use drover_store::{NewBootstrapToken, NewUserToken, TokenListing};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{hash_token, new_token, TokenPrefix, UserAuth};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::routes::audit::Audit;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
}

/// Default lifetime of a bootstrap token.
const BOOTSTRAP_TTL_SECS: u64 = 3600;
/// Longest lifetime of a bootstrap token (30 days): it is for the first
/// contact only.
pub const MAX_BOOTSTRAP_TTL_SECS: u64 = 30 * 24 * 3600;
/// Default lifetime of an API token (90 days).
pub const API_TTL_SECS: u64 = 90 * 24 * 3600;
/// Longest lifetime of an API token (one year).
pub const MAX_API_TTL_SECS: u64 = 365 * 24 * 3600;

/// Create a bootstrap token (default; admins only) or an API token (anyone:
/// with at most the creator's role, inside the creator's scope). The
/// secret is in the response only; the server keeps its hash.
#[utoipa::path(
    post, path = "/api/v1/tokens", tag = "tokens",
    request_body = CreateTokenRequest,
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "A bootstrap token needs an admin; an API token's role or scope would exceed the creator's"),
        (status = 201, body = CreatedToken),
        (status = 422, description = "Invalid labels, group, ttl or scope", body = ErrorBody),
    )
)]
async fn create_token(
    State(state): State<AppState>,
    user: UserAuth,
    audit: Audit,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    audit.note("kind", format!("{:?}", req.kind).to_lowercase());
    if let Some(role) = req.role {
        audit.note("role", role.as_str());
    }
    let created = create(&state, &user, &req).await?;
    audit.target(format!("token:{}", created.id));
    tracing::info!(by = %user.username, kind = ?created.kind, id = %created.id, "token created");
    Ok((StatusCode::CREATED, Json(created)))
}

fn check_ttl(ttl: Option<u64>, max: u64, kind: &str) -> Result<(), ApiError> {
    match ttl {
        Some(t) if t == 0 || t > max => Err(ApiError::invalid(format!(
            "ttl_secs of {kind} token must be between 1 and {max} ({}), got {t}",
            humantime::format_duration(std::time::Duration::from_secs(max))
        ))),
        _ => Ok(()),
    }
}

/// Creates a token for `by`; shared by the API and `drover up`.
pub async fn create(
    state: &AppState,
    by: &UserAuth,
    req: &CreateTokenRequest,
) -> Result<CreatedToken, ApiError> {
    let now = Utc::now();
    let ttl = |secs: u64| Duration::seconds(secs as i64);
    let secret_err = |e: crate::auth::SecretError| ApiError::internal("making a token", &e);
    match req.kind {
        TokenKind::Bootstrap => {
            by.require_admin()?;
            if req.role.is_some() || req.scope.is_some() {
                return Err(ApiError::invalid(
                    "role and scope apply to API tokens only: an agent's reach is its allow-list",
                ));
            }
            check_ttl(req.ttl_secs, MAX_BOOTSTRAP_TTL_SECS, "a bootstrap")?;
            check_labels(&req.labels).map_err(|e| ApiError::invalid(e.to_string()))?;
            if req.labels.contains_key("group") {
                return Err(ApiError::invalid(
                    "'group' is not a label: give the enrolled agent its group with --group (the API's `group`)",
                ));
            }
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
                        created_by: &by.user_id,
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
                role: None,
                scope: None,
                tls_fingerprint: state.tls_fingerprint.clone(),
            })
        }
        TokenKind::Api => {
            if !req.labels.is_empty() || req.group.is_some() {
                return Err(ApiError::invalid(
                    "labels and group apply to bootstrap tokens only",
                ));
            }
            check_ttl(req.ttl_secs, MAX_API_TTL_SECS, "an API")?;
            let role = req.role.unwrap_or(by.role);
            if !by.role.at_least(role) {
                return Err(ApiError::forbidden(format!(
                    "a token cannot have more than its creator's role: you act as {}, the token asks for {}",
                    by.role.as_str(),
                    role.as_str()
                )));
            }
            // The user's own scope always applies on top; a token acting
            // under its own scope passes it on and cannot swap it.
            let scope = match (&req.scope, &by.token_scope) {
                (Some(asked), own) if !own.is_everywhere() && asked != own => {
                    return Err(ApiError::forbidden(format!(
                        "this token acts under its own scope ({own}) and can only create tokens with that scope"
                    )))
                }
                (Some(asked), _) => {
                    crate::access::check_scope(asked).map_err(ApiError::invalid)?;
                    asked.clone()
                }
                (None, own) => own.clone(),
            };
            let token = new_token(TokenPrefix::Api).map_err(secret_err)?;
            let expires_at = now + ttl(req.ttl_secs.unwrap_or(API_TTL_SECS));
            let id = state
                .store
                .insert_user_token(
                    NewUserToken {
                        user_id: &by.user_id,
                        kind: "api",
                        token_hash: &hash_token(&token),
                        name: req.name.as_deref(),
                        role: Some(role),
                        scope: &scope,
                        expires_at: Some(expires_at),
                    },
                    now,
                )
                .await?;
            Ok(CreatedToken {
                id,
                kind: TokenKind::Api,
                token,
                expires_at: Some(expires_at),
                labels: Default::default(),
                group: None,
                role: Some(role),
                scope: (!scope.is_everywhere()).then_some(scope),
                tls_fingerprint: None,
            })
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Every user's tokens (admins only); otherwise the caller's own.
    #[serde(default)]
    all: bool,
}

pub(crate) fn view(t: TokenListing, now: chrono::DateTime<Utc>) -> TokenView {
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if t.used_at.is_some() {
        "used"
    } else if t.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    };
    TokenView {
        id: t.id,
        kind: t.kind,
        name: t.name,
        username: t.username,
        role: t.role,
        scope: (!t.scope.is_everywhere()).then_some(t.scope),
        created_at: t.created_at,
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
        used_at: t.used_at,
        state: state.to_owned(),
    }
}

/// Tokens (sessions, API tokens, bootstrap tokens made) of the caller,
/// or of everyone with `all` (admins). Never the secrets.
#[utoipa::path(
    get, path = "/api/v1/tokens", tag = "tokens",
    params(ListQuery),
    security(("user" = [])),
    responses((status = 200, body = [TokenView]), (status = 403, body = ErrorBody, description = "`all` needs an admin"))
)]
async fn list_tokens(
    State(state): State<AppState>,
    user: UserAuth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    if q.all {
        user.require_admin()?;
    }
    let owner = (!q.all).then_some(user.user_id.as_str());
    let now = Utc::now();
    let tokens = state.store.list_tokens(owner).await?;
    Ok(Json(tokens.into_iter().map(|t| view(t, now)).collect()))
}

/// Revoke a token: it stops working on its next request (a bootstrap
/// token can no longer enroll). Your own tokens, or anyone's as an admin.
#[utoipa::path(
    post, path = "/api/v1/tokens/{id}/revoke", tag = "tokens",
    params(("id" = String, Path, description = "Token id (see drover token list)")),
    security(("user" = [])),
    responses((status = 200, body = TokenView), (status = 403, body = ErrorBody, description = "Another user's token needs an admin"), (status = 409, body = ErrorBody, description = "Revoked already"))
)]
async fn revoke_token(
    State(state): State<AppState>,
    user: UserAuth,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TokenView>, ApiError> {
    let found = state
        .store
        .token_listing(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("token '{id}' not found")))?;
    audit.note("owner", &found.username);
    if found.user_id != user.user_id {
        user.require_admin()?;
    }
    let now = Utc::now();
    if !state.store.revoke_token(&found.id, now).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            drover_proto::ErrorCode::Conflict,
            format!("token {id} was revoked already"),
        ));
    }
    tracing::info!(by = %user.username, token = %found.id, kind = %found.kind, owner = %found.username, "token revoked");
    let found = state.store.token_listing(&found.id).await?.unwrap_or(found);
    Ok(Json(view(found, now)))
}
