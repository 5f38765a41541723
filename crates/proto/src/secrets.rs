//! The secrets vault's API: values go in, never come out. A listing shows
//! names, scopes and history only.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `PUT /api/v1/secrets/{name}`: creates or replaces a secret.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetSecretRequest {
    /// The value (UTF-8, at most 64 KiB). Stored sealed; never returned.
    pub value: String,
    /// Action globs (`*`, `?`) whose jobs may use it [default: any action].
    #[serde(default)]
    pub actions: Vec<String>,
    /// Selector of the agents that may receive it [default: any agent].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl std::fmt::Debug for SetSecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecretRequest")
            .field("value", &"***")
            .field("actions", &self.actions)
            .field("target", &self.target)
            .finish()
    }
}

/// A secret as listed: everything but its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Secret {
    pub name: String,
    /// Action globs that may use it; empty means any.
    pub actions: Vec<String>,
    /// Agents that may receive it; absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// 1 when created, one more each time its value or scope is set.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

/// `POST /api/v1/secrets/rotate-master-key`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RotateMasterKeyResponse {
    /// Id of the master key that now wraps every data key.
    pub master_key_id: String,
    /// Data keys re-wrapped by this call (0 when all were already).
    pub rewrapped: u64,
}
