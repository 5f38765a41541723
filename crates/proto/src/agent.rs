//! The agent protocol: enrollment, credential refresh and heartbeats.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::sandbox::DockerStatus;

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
    /// Most attempts the agent runs at once.
    #[serde(default)]
    pub capacity: u32,
    /// Attempts running now.
    #[serde(default)]
    pub running: u32,
    /// Sandbox kinds the agent accepts (`process`, `docker`).
    #[serde(default)]
    pub sandboxes: Vec<String>,
    /// The Docker engine the agent reaches, if it is configured to use one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerStatus>,
    /// Why the agent takes no new work, e.g. its state dir cannot be
    /// written (a full disk); absent when it takes work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Label keys whose values the agent reports rather than an operator sets:
/// `docker` and `runtime.*`.
pub fn is_reported_label(key: &str) -> bool {
    key == "docker" || key.starts_with("runtime.")
}

/// What an inventory says about the agent as labels a target can select
/// on: `docker=true|false`, and `runtime.runc=true` (runsc, kata) for each
/// sandbox runtime its engine offers.
pub fn reported_labels(inventory: Option<&Inventory>) -> Labels {
    let mut labels = Labels::new();
    let docker = inventory.and_then(|i| i.docker.as_ref());
    let available = docker.is_some_and(|d| d.available)
        && inventory.is_some_and(|i| i.sandboxes.iter().any(|s| s == "docker"));
    labels.insert("docker".to_owned(), available.to_string());
    if let (true, Some(d)) = (available, docker) {
        for r in &d.runtimes {
            labels.insert(format!("runtime.{r}"), "true".to_owned());
        }
    }
    labels
}
