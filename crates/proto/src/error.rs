//! The error body every API endpoint returns, and its stable codes.

use serde::{Deserialize, Serialize};

/// The JSON body of every non-2xx API response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A stable machine-readable code and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// Stable error codes. Clients match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    InvalidCredentials,
    TokenExpired,
    Forbidden,
    /// The user is disabled: no login, no token works.
    UserDisabled,
    NotFound,
    Conflict,
    PayloadTooLarge,
    BootstrapTokenUnknown,
    BootstrapTokenUsed,
    BootstrapTokenExpired,
    BootstrapTokenRevoked,
    AgentRevoked,
    SessionRevoked,
    RefreshTokenReused,
    RefreshTokenUnknown,
    RefreshTokenExpired,
    Unavailable,
    /// Too many attempts (failed logins): retry after the Retry-After header.
    RateLimited,
    Internal,
    /// A code this client does not know yet (a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// True for the codes after which an agent's credentials can never work
    /// again, so the agent must stop using them.
    pub fn is_terminal_for_agent(self) -> bool {
        matches!(
            self,
            ErrorCode::AgentRevoked
                | ErrorCode::SessionRevoked
                | ErrorCode::RefreshTokenReused
                | ErrorCode::RefreshTokenUnknown
                | ErrorCode::RefreshTokenExpired
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".to_owned());
        f.write_str(&s)
    }
}
