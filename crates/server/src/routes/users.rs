//! Logging in: a username and password traded for a session token.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use drover_proto::access::{TokenView, Whoami};
use drover_proto::api::{LoginRequest, LoginResponse};
use drover_proto::{ErrorBody, ErrorCode};
use drover_store::NewUserToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{hash_token, new_token, TokenPrefix, UserAuth};
use crate::connections::Peer;
use crate::error::{ApiError, ApiJson};
use crate::routes::audit::Audit;
use crate::state::AppState;
use crate::throttle::{Lockout, Refused};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(whoami))
        .layer(DefaultBodyLimit::max(MAX_LOGIN_BODY))
}

/// The token presented, as a token listing shows it.
async fn presented(state: &AppState, by: &UserAuth) -> Result<TokenView, ApiError> {
    let found = state
        .store
        .token_listing(&by.token_id)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized(ErrorCode::Unauthorized, "unknown token: log in again")
        })?;
    Ok(crate::routes::tokens::view(found, Utc::now()))
}

/// Who the presented token acts as: the user, the role requests act with,
/// the user's scope, and the token itself (kind, scope, expiry).
#[utoipa::path(
    get, path = "/api/v1/auth/whoami", tag = "auth",
    security(("user" = [])),
    responses((status = 200, body = Whoami), (status = 401, body = ErrorBody, description = "No valid user token"))
)]
async fn whoami(State(state): State<AppState>, by: UserAuth) -> Result<Json<Whoami>, ApiError> {
    let token = presented(&state, &by).await?;
    let user = state
        .store
        .user_by_username(&by.username)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized(ErrorCode::Unauthorized, "unknown user: log in again")
        })?;
    Ok(Json(Whoami {
        username: by.username,
        role: by.role,
        scope: (!user.scope.is_everywhere()).then_some(user.scope),
        token,
    }))
}

/// Log out: revoke the presented token (a session from a login, or an
/// API token) from its next request on. Returns it as revoked.
#[utoipa::path(
    post, path = "/api/v1/auth/logout", tag = "auth",
    security(("user" = [])),
    responses((status = 200, body = TokenView), (status = 401, body = ErrorBody, description = "No valid user token"))
)]
async fn logout(State(state): State<AppState>, by: UserAuth) -> Result<Json<TokenView>, ApiError> {
    end_session(&state, &by).await?;
    presented(&state, &by).await.map(Json)
}

/// Revokes the token `by` presented, from its next request on (the API's
/// logout and the dashboard's).
pub(crate) async fn end_session(state: &AppState, by: &UserAuth) -> Result<(), ApiError> {
    state.store.revoke_token(&by.token_id, Utc::now()).await?;
    tracing::info!(user = %by.username, token = %by.token_id, "logged out");
    Ok(())
}

/// Logs and audits the start of a lockout (once per lockout, not per
/// refused attempt).
async fn record_lockout(state: &AppState, username: &str, lockout: &Lockout) {
    let lasts = humantime::format_duration(state.config.login.lockout);
    let (action, target, source) = match lockout {
        Lockout::Account(name) => ("user.lockout", format!("user:{name}"), String::new()),
        Lockout::Address(ip) => ("address.lockout", format!("address:{ip}"), ip.to_string()),
    };
    let detail = serde_json::json!({ "for": lasts.to_string() }).to_string();
    tracing::warn!(%target, "login lockout after failed logins");
    if let Err(e) = state
        .store
        .audit(
            &drover_store::jobs::AuditEntry {
                actor: username,
                action,
                target: &target,
                status: StatusCode::TOO_MANY_REQUESTS.as_u16(),
                outcome: "refused",
                request: "POST /api/v1/auth/login",
                source: &source,
                detail: &detail,
            },
            Utc::now(),
        )
        .await
    {
        tracing::error!(error = %e, %target, "could not write the audit log");
    }
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

/// Largest login body: a name and a password need no more.
pub const MAX_LOGIN_BODY: usize = 8 * 1024;
/// Longest user name a login may give.
pub const MAX_USERNAME_BYTES: usize = 256;
/// Longest password a login may give.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// A login that failed: an API error, or the throttle's refusal (429 or
/// 503, with Retry-After).
pub(crate) enum LoginError {
    Api(ApiError),
    Refused(Refused),
}

impl From<ApiError> for LoginError {
    fn from(e: ApiError) -> LoginError {
        LoginError::Api(e)
    }
}

impl From<drover_store::Error> for LoginError {
    fn from(e: drover_store::Error) -> LoginError {
        LoginError::Api(e.into())
    }
}

/// The status of a refusal.
fn refused_status(r: Refused) -> StatusCode {
    match r {
        Refused::Locked { .. } => StatusCode::TOO_MANY_REQUESTS,
        Refused::Busy => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl LoginError {
    /// The status the API answers.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            LoginError::Api(e) => e.status,
            LoginError::Refused(r) => refused_status(*r),
        }
    }

    /// What the user is told.
    pub(crate) fn message(&self) -> String {
        match self {
            LoginError::Api(e) => e.message.clone(),
            LoginError::Refused(Refused::Locked { .. }) => {
                "too many failed logins for this account or address: try again later".to_owned()
            }
            LoginError::Refused(Refused::Busy) => {
                "too many logins at once: try again in a moment".to_owned()
            }
        }
    }
}

impl IntoResponse for LoginError {
    fn into_response(self) -> Response {
        let refused = match self {
            LoginError::Api(e) => return e.into_response(),
            LoginError::Refused(r) => r,
        };
        let (message, retry_after) = match refused {
            Refused::Locked { retry_after } => (
                "too many failed logins for this account or address: retry after the Retry-After header",
                retry_after.as_secs().max(1),
            ),
            Refused::Busy => (
                "too many logins at once: retry after the Retry-After header",
                1,
            ),
        };
        let code = match refused {
            Refused::Locked { .. } => ErrorCode::RateLimited,
            Refused::Busy => ErrorCode::Unavailable,
        };
        let mut resp = ApiError::new(refused_status(refused), code, message).into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        resp
    }
}

/// Log in with a password; returns a session token.
///
/// Failed logins are counted per account and per client address; past
/// the configured number within the lockout period, every login of that
/// account or from that address gets 429 until the period ends — the
/// right password too. 503 when too many password checks wait already.
#[utoipa::path(
    post, path = "/api/v1/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, body = LoginResponse),
        (status = 401, description = "Wrong username or password", body = ErrorBody),
        (status = 413, description = "Body larger than 8 KiB", body = ErrorBody),
        (status = 422, description = "Malformed body, or a name or password too long", body = ErrorBody),
        (status = 429, description = "Locked out after failed logins: retry after the Retry-After header", body = ErrorBody),
        (status = 503, description = "Too many logins at once: retry after the Retry-After header", body = ErrorBody),
    )
)]
async fn login(
    State(state): State<AppState>,
    Peer(peer): Peer,
    audit: Audit,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Json<LoginResponse>, LoginError> {
    password_login(&state, peer, &audit, req).await.map(Json)
}

/// Checks a user name and password and opens a session: the throttle
/// (lockouts, with their audit entries), argon2, a session token stored as
/// its hash. Shared by the API's login and the dashboard's.
pub(crate) async fn password_login(
    state: &AppState,
    peer: Option<std::net::SocketAddr>,
    audit: &Audit,
    req: LoginRequest,
) -> Result<LoginResponse, LoginError> {
    if req.username.len() > MAX_USERNAME_BYTES {
        return Err(
            ApiError::invalid(format!("username: longer than {MAX_USERNAME_BYTES} bytes")).into(),
        );
    }
    if req.password.len() > MAX_PASSWORD_BYTES {
        return Err(
            ApiError::invalid(format!("password: longer than {MAX_PASSWORD_BYTES} bytes")).into(),
        );
    }
    let address = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
    // The entry names the user tried, whether the login works or not.
    audit.actor(&req.username);
    audit.target(format!("user:{}", req.username));
    let attempt = match state.logins.begin(&req.username, address, Instant::now()) {
        Ok(attempt) => attempt,
        Err(refused) => {
            // Refusals stay cheap under a flood: no audit entry each (the
            // lockout that causes them has one) and no password check.
            audit.skip(refused_status(refused));
            state.metrics.login_refused(match refused {
                Refused::Locked { .. } => "locked",
                Refused::Busy => "busy",
            });
            return Err(LoginError::Refused(refused));
        }
    };
    let user = match state.store.user_by_username(&req.username).await {
        Ok(user) => user,
        Err(e) => {
            attempt.abandon();
            return Err(e.into());
        }
    };
    let known_hash = user.as_ref().map(|u| u.password_hash.clone());
    let ok = match attempt.verify(req.password, known_hash, dummy_hash).await {
        Ok(ok) => ok,
        Err(e) => {
            attempt.abandon();
            return Err(ApiError::internal("verifying a password", &e).into());
        }
    };
    let user = match user {
        Some(u) if ok => {
            attempt.finish(true);
            if u.disabled_at.is_some() {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::UserDisabled,
                    format!("user '{}' is disabled", u.username),
                )
                .into());
            }
            u
        }
        _ => {
            for lockout in attempt.finish(false) {
                record_lockout(state, &req.username, &lockout).await;
            }
            tracing::info!(username = ?req.username, %address, "failed login");
            return Err(ApiError::unauthorized(
                ErrorCode::InvalidCredentials,
                "wrong username or password",
            )
            .into());
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
                role: None,
                scope: &Default::default(),
                expires_at: Some(expires_at),
            },
            now,
        )
        .await?;
    tracing::info!(username = %user.username, "user logged in");
    Ok(LoginResponse {
        token,
        expires_at,
        username: user.username,
        role: user.role,
    })
}
