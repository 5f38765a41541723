//! Types of the operator-facing REST API (`/api/v1/...`), used by the CLI.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::agent::Inventory;
use crate::labels::Labels;

/// `POST /api/v1/auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

/// A session token for a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoginResponse {
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub username: String,
    pub role: Role,
}

/// What a user may do: a viewer reads; an operator also runs, stops and
/// cancels work (within its scope); an admin also changes the catalog, the
/// fleet, users and tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Operator,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// The kind of token `drover token create` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// One-time token an agent trades for its identity at enrollment.
    #[default]
    Bootstrap,
    /// Long-lived API token for a user (CI, scripts).
    Api,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    #[serde(default)]
    pub kind: TokenKind,
    /// Lifetime in seconds. Bootstrap tokens default to one hour (at most
    /// 30 days); API tokens to 90 days (at most one year).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// An API token's role: at most (and by default) its creator's.
    #[serde(default)]
    pub role: Option<Role>,
    /// An API token's scope, applied on top of its user's.
    #[serde(default)]
    pub scope: Option<crate::access::Scope>,
    /// Labels baked into a bootstrap token and given to the agent it enrolls.
    #[serde(default)]
    pub labels: Labels,
    /// Group given to the agent a bootstrap token enrolls.
    #[serde(default)]
    pub group: Option<String>,
    /// A note for people, e.g. "ci-deploy".
    #[serde(default)]
    pub name: Option<String>,
}

/// A token as created: the secret is shown once and never again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    pub id: String,
    pub kind: TokenKind,
    pub token: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub labels: Labels,
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<crate::access::Scope>,
    /// The fingerprint (`sha256:HEX`) of the certificate the server serves
    /// HTTPS with, for `drover-agent enroll --ca-fingerprint`; absent on
    /// plain HTTP (also behind a proxy that terminates TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
}

/// Health of an agent, derived from its last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Online,
    Stale,
    Offline,
    Revoked,
}

impl AgentStatus {
    pub const ALL: [AgentStatus; 4] = [
        AgentStatus::Online,
        AgentStatus::Stale,
        AgentStatus::Offline,
        AgentStatus::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Online => "online",
            AgentStatus::Stale => "stale",
            AgentStatus::Offline => "offline",
            AgentStatus::Revoked => "revoked",
        }
    }

    /// Derives the status from the last time the agent was heard from.
    /// An agent that never sent a heartbeat is offline.
    pub fn derive(
        revoked: bool,
        last_seen: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        thresholds: HealthThresholds,
    ) -> AgentStatus {
        if revoked {
            return AgentStatus::Revoked;
        }
        let Some(seen) = last_seen else {
            return AgentStatus::Offline;
        };
        let age = (now - seen).num_milliseconds().max(0) as u64;
        if age <= thresholds.stale_after_ms {
            AgentStatus::Online
        } else if age <= thresholds.offline_after_ms {
            AgentStatus::Stale
        } else {
            AgentStatus::Offline
        }
    }
}

/// How long after its last heartbeat an agent turns stale, then offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthThresholds {
    pub stale_after_ms: u64,
    pub offline_after_ms: u64,
}

/// An enrolled agent as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Agent {
    pub id: String,
    pub hostname: String,
    pub status: AgentStatus,
    pub labels: Labels,
    pub group: Option<String>,
    pub agent_version: Option<String>,
    pub enrolled_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_reason: Option<String>,
    /// The last inventory the agent reported.
    pub inventory: Option<Inventory>,
    /// Whether the agent takes new work.
    pub dispatch: DispatchState,
    /// Who drained or stopped it, when and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_reason: Option<String>,
}

/// Whether an agent is given new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DispatchState {
    /// Takes work.
    #[default]
    Active,
    /// Takes no new work; what runs finishes.
    Draining,
    /// Takes no new work; what ran was cancelled.
    Stopped,
}

impl DispatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            DispatchState::Active => "active",
            DispatchState::Draining => "draining",
            DispatchState::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<DispatchState> {
        match s {
            "active" => Some(DispatchState::Active),
            "draining" => Some(DispatchState::Draining),
            "stopped" => Some(DispatchState::Stopped),
            _ => None,
        }
    }
}

/// `POST /api/v1/agents/{id}/drain` and `/resume`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DrainAgentRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /api/v1/agents/{id}/stop` and `POST /api/v1/fleet/stop`: take no
/// new work and cancel what runs — SIGTERM, then SIGKILL after each
/// attempt's kill grace; with `force`, SIGKILL at once.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer to a stop: what it stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StopResponse {
    /// Attempts that were told to stop.
    pub cancelled: u64,
    /// Agents that ran them.
    pub agents: u64,
    pub fleet: FleetStatus,
}

/// Whether dispatch is paused fleet-wide (an emergency stop).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetStatus {
    pub stopped: bool,
    pub stopped_at: Option<DateTime<Utc>>,
    pub stopped_by: Option<String>,
    pub reason: Option<String>,
    pub force: bool,
    /// Agents by whether they take work.
    #[serde(default)]
    pub agents: std::collections::BTreeMap<String, u64>,
}

/// `PATCH /api/v1/agents/{id}/labels`: set some labels, remove others.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LabelAgentRequest {
    #[serde(default)]
    pub set: Labels,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `PUT /api/v1/agents/{id}/group`: move an agent to a group, or out of
/// every group with `null`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetGroupRequest {
    pub group: Option<String>,
}

/// `POST /api/v1/agents/{id}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RevokeAgentRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn status_from_last_seen() {
        let now = Utc::now();
        let t = HealthThresholds {
            stale_after_ms: 30_000,
            offline_after_ms: 90_000,
        };
        let cases = [
            (false, None, AgentStatus::Offline),
            (false, Some(now), AgentStatus::Online),
            (
                false,
                Some(now - Duration::seconds(30)),
                AgentStatus::Online,
            ),
            (false, Some(now - Duration::seconds(31)), AgentStatus::Stale),
            (false, Some(now - Duration::seconds(90)), AgentStatus::Stale),
            (
                false,
                Some(now - Duration::seconds(91)),
                AgentStatus::Offline,
            ),
            // A clock slightly ahead on the agent's side is still online.
            (false, Some(now + Duration::seconds(5)), AgentStatus::Online),
            (true, Some(now), AgentStatus::Revoked),
        ];
        for (revoked, seen, want) in cases {
            assert_eq!(AgentStatus::derive(revoked, seen, now, t), want, "{seen:?}");
        }
    }
}
