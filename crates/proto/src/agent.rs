//! The agent protocol: enrollment, credential refresh and heartbeats.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `POST /api/v1/agent/enroll`: trade a bootstrap token for an identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    pub hostname: String,
    pub agent_version: String,
}

/// The identity and first credentials of a newly enrolled agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    pub agent_id: String,
    pub credentials: Credentials,
    pub heartbeat_interval_secs: u64,
}

/// A short-lived access JWT and the refresh token that renews it. The refresh
/// token rotates on every use; presenting a rotated one revokes the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Credentials {
    pub access_token: String,
    pub access_expires_at: DateTime<Utc>,
    pub refresh_token: String,
}

/// `POST /api/v1/agent/refresh`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// `POST /api/v1/agent/heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub inventory: Inventory,
}

/// What the server prescribes in answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    pub heartbeat_interval_secs: u64,
    pub server_time: DateTime<Utc>,
}

/// What an agent knows about its machine, sent with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub hostname: String,
    /// e.g. "Debian GNU/Linux".
    pub os: String,
    pub os_version: String,
    pub kernel: String,
    pub arch: String,
    pub cpu_count: u32,
    /// 1, 5 and 15 minute load averages.
    pub load_avg: [f64; 3],
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// Size and free space of the filesystem holding the agent's state dir.
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
    pub agent_version: String,
    /// Seconds since this agent process started.
    pub agent_uptime_secs: u64,
    /// Seconds since the machine booted.
    pub system_uptime_secs: u64,
}
