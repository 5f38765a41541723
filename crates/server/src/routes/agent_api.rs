//! The agent protocol: enroll with a bootstrap token, refresh credentials
//! (rotating the refresh token, with reuse detection), heartbeat.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use drover_proto::agent::{
    Credentials, EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, RefreshRequest,
};
use drover_proto::{ErrorBody, ErrorCode};
use drover_store::{EnrollOutcome, NewAgent, RefreshOutcome, RefreshRotation};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{
    explain_agent_refusal, hash_token, issue_agent_token, new_token, AgentToken, TokenPrefix,
};
use crate::error::{ApiError, ApiJson};
use crate::routes::audit::Audit;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enroll))
        .routes(routes!(refresh))
        .routes(routes!(heartbeat))
}

fn secret_err(e: crate::auth::SecretError) -> ApiError {
    ApiError::internal("making a token", &e)
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must be 1-{max} bytes of printable text"
        )));
    }
    Ok(())
}

/// Trade a one-time bootstrap token for an agent identity and credentials.
#[utoipa::path(
    post, path = "/api/v1/agent/enroll", tag = "agent",
    request_body = EnrollRequest,
    responses(
        (status = 200, body = EnrollResponse),
        (status = 401, description = "Bootstrap token unknown, already used or expired", body = ErrorBody),
    )
)]
async fn enroll(
    State(state): State<AppState>,
    audit: Audit,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    audit.note("hostname", &req.hostname);
    check_text("hostname", &req.hostname, 253)?;
    check_text("agent_version", &req.agent_version, 64)?;
    let now = Utc::now();
    let agent_id = uuid::Uuid::now_v7().to_string();
    let session_id = uuid::Uuid::new_v4().to_string();
    let refresh_token = new_token(TokenPrefix::Refresh).map_err(secret_err)?;
    let outcome = state
        .store
        .enroll_agent(
            &hash_token(&req.token),
            NewAgent {
                id: &agent_id,
                hostname: &req.hostname,
                agent_version: &req.agent_version,
                session_id: &session_id,
                refresh_token_hash: &hash_token(&refresh_token),
                refresh_expires_at: now + state.config.agent_refresh_ttl,
            },
            now,
        )
        .await?;
    let agent = match outcome {
        EnrollOutcome::Enrolled(a) => a,
        EnrollOutcome::TokenUnknown => {
            return Err(ApiError::unauthorized(
                ErrorCode::BootstrapTokenUnknown,
                "bootstrap token is unknown: check it was copied whole, or create one with drover token create",
            ))
        }
        EnrollOutcome::TokenUsed { used_at } => {
            return Err(ApiError::unauthorized(
                ErrorCode::BootstrapTokenUsed,
                format!("bootstrap token was already used at {}: each token enrolls one agent, create a new one", used_at.to_rfc3339()),
            ))
        }
        EnrollOutcome::TokenExpired { expired_at } => {
            return Err(ApiError::unauthorized(
                ErrorCode::BootstrapTokenExpired,
                format!("bootstrap token expired at {}: create a new one", expired_at.to_rfc3339()),
            ))
        }
        EnrollOutcome::TokenRevoked { revoked_at } => {
            return Err(ApiError::unauthorized(
                ErrorCode::BootstrapTokenRevoked,
                format!("bootstrap token was revoked at {}: create a new one", revoked_at.to_rfc3339()),
            ))
        }
    };
    let access_expires_at = now + state.config.agent_access_ttl;
    let access_token = issue_agent_token(
        &state.signing_key,
        &agent.id,
        &session_id,
        now,
        access_expires_at,
    )?;
    audit.target(format!("agent:{}", agent.id));
    tracing::info!(agent = %agent.id, hostname = %agent.hostname, labels = ?agent.labels, "agent enrolled");
    Ok(Json(EnrollResponse {
        agent_id: agent.id,
        credentials: Credentials {
            access_token,
            access_expires_at,
            refresh_token,
        },
        heartbeat_interval_secs: state.config.heartbeat_interval.as_secs(),
        assignment_key: Some(state.assignment_key.to_string()),
    }))
}

/// Trade the current refresh token for new credentials. The presented token
/// stops working; presenting it again ends the agent's session — except
/// within `agent_refresh_grace` of its rotation while its successor was never
/// used (the answer was lost): then the same successor comes back, with a new
/// access token.
#[utoipa::path(
    post, path = "/api/v1/agent/refresh", tag = "agent",
    request_body = RefreshRequest,
    responses(
        (status = 200, body = Credentials),
        (status = 401, description = "Token reused, unknown or expired; agent revoked", body = ErrorBody),
    )
)]
async fn refresh(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> Result<Json<Credentials>, ApiError> {
    let now = Utc::now();
    let new_refresh = state
        .signing_key
        .successor_refresh_token(&req.refresh_token);
    let outcome = state
        .store
        .rotate_refresh_token(
            RefreshRotation {
                old_hash: &hash_token(&req.refresh_token),
                new_hash: &hash_token(&new_refresh),
                new_expires_at: now + state.config.agent_refresh_ttl,
                grace: state.config.agent_refresh_grace,
            },
            now,
        )
        .await?;
    let (agent_id, session_id) = match outcome {
        RefreshOutcome::Rotated {
            agent_id,
            session_id,
        } => {
            tracing::debug!(agent = %agent_id, "agent credentials refreshed");
            (agent_id, session_id)
        }
        RefreshOutcome::Repeated {
            agent_id,
            session_id,
        } => {
            tracing::info!(agent = %agent_id, "refresh token presented again before its successor was used: the answer was lost, the same successor is handed out again");
            (agent_id, session_id)
        }
        RefreshOutcome::Reused { agent_id } => {
            tracing::warn!(agent = %agent_id, "refresh token reused: session ended");
            return Err(ApiError::unauthorized(
                ErrorCode::RefreshTokenReused,
                format!("refresh token was already used: the session of agent {agent_id} is ended; enroll again with a new bootstrap token"),
            ));
        }
        RefreshOutcome::Unknown => {
            return Err(ApiError::unauthorized(
                ErrorCode::RefreshTokenUnknown,
                "refresh token is unknown",
            ))
        }
        RefreshOutcome::Expired => {
            return Err(ApiError::unauthorized(
                ErrorCode::RefreshTokenExpired,
                "refresh token expired: enroll again with a new bootstrap token",
            ))
        }
        RefreshOutcome::AgentRevoked { reason } => {
            return Err(ApiError::unauthorized(
                ErrorCode::AgentRevoked,
                format!(
                    "agent was revoked: {}",
                    reason.unwrap_or_else(|| "no reason given".to_owned())
                ),
            ))
        }
        RefreshOutcome::SessionEnded { reason } => {
            return Err(ApiError::unauthorized(
                ErrorCode::SessionRevoked,
                format!(
                    "agent session was ended: {}",
                    reason.unwrap_or_else(|| "superseded".to_owned())
                ),
            ))
        }
    };
    let access_expires_at = now + state.config.agent_access_ttl;
    let access_token = issue_agent_token(
        &state.signing_key,
        &agent_id,
        &session_id,
        now,
        access_expires_at,
    )?;
    Ok(Json(Credentials {
        access_token,
        access_expires_at,
        refresh_token: new_refresh,
    }))
}

/// Report liveness and inventory; the answer prescribes the next interval.
#[utoipa::path(
    post, path = "/api/v1/agent/heartbeat", tag = "agent",
    request_body = HeartbeatRequest,
    security(("agent" = [])),
    responses(
        (status = 200, body = HeartbeatResponse),
        (status = 401, description = "Token expired, agent revoked or session ended", body = ErrorBody),
    )
)]
async fn heartbeat(
    State(state): State<AppState>,
    AgentToken(claims): AgentToken,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    check_text("inventory.hostname", &req.inventory.hostname, 253)?;
    check_text("inventory.agent_version", &req.inventory.agent_version, 64)?;
    // Every other field is kept bounded and free of control characters.
    let inv = &req.inventory.bounded();
    let now = Utc::now();
    let recorded = state
        .store
        .record_heartbeat(&claims.sub, &claims.sid, inv, now)
        .await?;
    if !recorded {
        return Err(explain_agent_refusal(&state, &claims).await);
    }
    Ok(Json(HeartbeatResponse {
        heartbeat_interval_secs: state.config.heartbeat_interval.as_secs(),
        server_time: now,
        assignment_key: Some(state.assignment_key.to_string()),
    }))
}
