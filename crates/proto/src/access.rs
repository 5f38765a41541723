//! Users, their roles and scopes, and the tokens that act for them
//! (`/api/v1/users`, `/api/v1/tokens`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::Role;
use crate::glob::glob_match;

/// Longest user name.
pub const MAX_USERNAME_BYTES: usize = 64;
/// Shortest password a user may be given.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password (the login refuses longer ones).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Most action globs in a scope.
pub const MAX_SCOPE_ACTIONS: usize = 64;

/// Where an operator may act: the agents a target selector names and the
/// actions its globs match. Empty (no target, no globs) means everywhere.
/// Scopes limit what a user may run, stop or cancel, not what they may read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// A target selector (`role=web`, `role in (web,api),!env=prod`,
    /// `group:NAME`, an agent id; docs/SELECTORS.md):
    /// only agents it names may be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Only actions matching one of these globs (`*` is the wildcard) may
    /// be run. Empty: every action.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
}

impl Scope {
    /// True when it restricts nothing.
    pub fn is_everywhere(&self) -> bool {
        self.target.is_none() && self.actions.is_empty()
    }

    /// Whether its globs allow `action`.
    pub fn allows_action(&self, action: &str) -> bool {
        self.actions.is_empty() || self.actions.iter().any(|g| glob_match(g, action))
    }

    /// Checks the globs' syntax (the target is checked by the server, which
    /// owns the selector grammar).
    pub fn check_actions(&self) -> Result<(), String> {
        if self.actions.len() > MAX_SCOPE_ACTIONS {
            return Err(format!(
                "scope.actions: at most {MAX_SCOPE_ACTIONS} globs, got {}",
                self.actions.len()
            ));
        }
        for g in &self.actions {
            let ok = !g.is_empty()
                && g.len() <= 128
                && g.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'));
            if !ok {
                return Err(format!(
                    "scope.actions: '{g}' is not an action glob (letters, digits, '-', '_', '.', and '*' as the wildcard)"
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_everywhere() {
            return f.write_str("everywhere");
        }
        let mut parts = Vec::new();
        if let Some(t) = &self.target {
            parts.push(format!("target {t}"));
        }
        if !self.actions.is_empty() {
            parts.push(format!("actions {}", self.actions.join(",")));
        }
        f.write_str(&parts.join("; "))
    }
}

impl Role {
    /// How much a role may do: viewer < operator < admin.
    pub fn rank(self) -> u8 {
        match self {
            Role::Viewer => 0,
            Role::Operator => 1,
            Role::Admin => 2,
        }
    }

    /// Whether this role can do what `needed` can.
    pub fn at_least(self, needed: Role) -> bool {
        self.rank() >= needed.rank()
    }
}

/// A user as the API shows it (never the password hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub role: Role,
    /// Where an operator may act; absent: everywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    pub created_at: DateTime<Utc>,
    /// Set while the user is disabled: no login, every token refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<DateTime<Utc>>,
}

/// `POST /api/v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub username: String,
    pub role: Role,
    /// At least 12 characters. Absent: the server makes one and shows it
    /// once in the answer.
    #[serde(default)]
    pub password: Option<String>,
    /// Only for operators.
    #[serde(default)]
    pub scope: Option<Scope>,
}

/// A user as created; `password` is there only when the server made it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedUser {
    pub user: UserView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `PUT /api/v1/users/{name}/role`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetRoleRequest {
    pub role: Role,
    /// Only for operators; absent: everywhere.
    #[serde(default)]
    pub scope: Option<Scope>,
}

/// `POST /api/v1/users/{name}/password`. A user changing their own password
/// gives the current one; an admin setting another's does not. Absent
/// `password`: the server makes one and shows it once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetPasswordRequest {
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub current_password: Option<String>,
}

/// Answer of a password change: the new password only when the server
/// made it; how many sessions were ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PasswordChanged {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    pub sessions_ended: u64,
}

/// What a token listing shows of a token: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenView {
    pub id: String,
    /// `session`, `api` or `bootstrap`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whose it is (for a bootstrap token: who made it).
    pub username: String,
    /// The role it acts with (never more than its user's current role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// A bootstrap token: when it enrolled an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<DateTime<Utc>>,
    /// `active`, `expired`, `revoked` or `used`.
    pub state: String,
}

/// Who the presented token acts as (`GET /api/v1/auth/whoami`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Whoami {
    pub username: String,
    /// The role requests act with: the token's, capped by the user's.
    pub role: Role,
    /// The user's own scope; none: everywhere the role allows. The
    /// token's own scope, on top, is in `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// The token presented.
    pub token: TokenView,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.at_least(Role::Operator));
        assert!(Role::Operator.at_least(Role::Operator));
        assert!(!Role::Viewer.at_least(Role::Operator));
        assert!(!Role::Operator.at_least(Role::Admin));
    }

    #[test]
    fn scope_globs() {
        let s = Scope {
            target: None,
            actions: vec!["web.*".into(), "ping".into()],
        };
        assert!(s.allows_action("web.deploy"));
        assert!(s.allows_action("ping"));
        assert!(!s.allows_action("db.migrate"));
        assert!(Scope::default().allows_action("anything"));
        assert!(s.check_actions().is_ok());
        let bad = Scope {
            target: None,
            actions: vec!["a b".into()],
        };
        assert!(bad.check_actions().unwrap_err().contains("'a b'"));
    }
}
