//! Who may do what: roles (viewer < operator < admin) checked by the
//! `Operator` and `Admin` extractors before a handler runs, and scopes
//! (a target selector and action globs) checked where work is started,
//! stopped or cancelled. Pure, apart from the extractors.
//!
//! Key design decision: scopes limit what a user may *do* to agents and
//! actions, not what they may read; a scoped operator sees the whole fleet
//! and every job, and reaches only its own agents with its own actions. A
//! token's scope is applied on top of its user's: every scope in
//! [`Limits`] must allow, so a token never reaches further than its user.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use drover_proto::access::Scope;
use drover_proto::api::Role;
use drover_store::AgentRecord;

use crate::auth::UserAuth;
use crate::error::ApiError;
use crate::selector::Selector;
use crate::state::AppState;

/// Checks a scope's syntax (its target with the selector grammar).
pub fn check_scope(scope: &Scope) -> Result<(), String> {
    scope.check_actions()?;
    if let Some(t) = &scope.target {
        Selector::parse(t).map_err(|e| format!("scope.target: {e}"))?;
    }
    Ok(())
}

/// The scopes a request acts under; all of them must allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits(pub Vec<Scope>);

impl Limits {
    /// The limits of a user's scope and, on top, a token's.
    pub fn of(user: &Scope, token: &Scope) -> Limits {
        Limits(
            [user, token]
                .into_iter()
                .filter(|s| !s.is_everywhere())
                .cloned()
                .collect(),
        )
    }

    pub fn is_everywhere(&self) -> bool {
        self.0.is_empty()
    }

    pub fn allows_action(&self, action: &str) -> bool {
        self.0.iter().all(|s| s.allows_action(action))
    }

    /// Whether every scope's target names this agent. A stored target that
    /// no longer parses allows nothing.
    pub fn allows_agent(&self, agent: &AgentRecord) -> bool {
        self.0.iter().all(|s| match &s.target {
            None => true,
            Some(t) => Selector::parse(t).is_ok_and(|sel| sel.matches(agent)),
        })
    }

    /// Refuses an action outside the globs, or agents outside the targets
    /// (naming up to five of them).
    pub fn check(&self, action: &str, agents: &[&AgentRecord]) -> Result<(), String> {
        if self.is_everywhere() {
            return Ok(());
        }
        if !self.allows_action(action) {
            return Err(format!(
                "action '{action}' is outside your scope ({})",
                self.describe()
            ));
        }
        let outside: Vec<&str> = agents
            .iter()
            .filter(|a| !self.allows_agent(a))
            .map(|a| a.id.as_str())
            .collect();
        if !outside.is_empty() {
            let shown: Vec<&str> = outside.iter().take(5).copied().collect();
            let more = outside.len().saturating_sub(shown.len());
            return Err(format!(
                "{} agent(s) outside your scope ({}): {}{}",
                outside.len(),
                self.describe(),
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(Scope::to_string)
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// Stored with a workflow run, so its tasks stay inside the limits of
    /// whoever submitted it. `None` when unlimited.
    pub fn to_json(&self) -> Option<String> {
        (!self.is_everywhere()).then(|| serde_json::to_string(&self.0).unwrap_or_default())
    }

    /// Reads stored limits; unreadable ones allow nothing (a scope that
    /// matches no action).
    pub fn from_json(json: Option<&str>) -> Limits {
        match json {
            None => Limits::default(),
            Some(j) => serde_json::from_str(j).map(Limits).unwrap_or_else(|e| {
                tracing::error!(error = %e, "stored scope is unreadable: allowing nothing");
                Limits(vec![Scope {
                    target: None,
                    actions: vec!["\u{0}".to_owned()],
                }])
            }),
        }
    }
}

/// A user who is at least an operator (runs, stops, cancels).
#[derive(Debug, Clone)]
pub struct Operator(pub UserAuth);

/// A user who is an admin.
#[derive(Debug, Clone)]
pub struct Admin(pub UserAuth);

fn require(user: &UserAuth, needed: Role) -> Result<(), ApiError> {
    if user.role.at_least(needed) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "user '{}' acts as {}; this needs {}",
            user.username,
            user.role.as_str(),
            needed.as_str()
        )))
    }
}

impl UserAuth {
    /// Refuses anyone below `needed`.
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        require(self, needed)
    }

    /// Refuses anyone but an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        require(self, Role::Admin)
    }

    /// Refuses an agent outside the caller's scope (403).
    pub fn check_agent(&self, agent: &AgentRecord) -> Result<(), ApiError> {
        if self.limits.allows_agent(agent) {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "agent {} is outside your scope ({})",
            agent.id,
            self.limits.describe()
        )))
    }

    /// Refuses work outside the caller's scope (403).
    pub fn check_scope(&self, action: &str, agents: &[&AgentRecord]) -> Result<(), ApiError> {
        self.limits
            .check(action, agents)
            .map_err(ApiError::forbidden)
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = UserAuth::from_request_parts(parts, state).await?;
        require(&user, Role::Operator)?;
        Ok(Operator(user))
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = UserAuth::from_request_parts(parts, state).await?;
        require(&user, Role::Admin)?;
        Ok(Admin(user))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn agent(id: &str, team: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            hostname: "h".into(),
            labels: [("team".to_string(), team.to_string())].into(),
            group: None,
            agent_version: None,
            enrolled_at: Utc::now(),
            last_seen_at: None,
            inventory: None,
            session_id: None,
            session_ended_reason: None,
            revoked_at: None,
            revoked_reason: None,
            dispatch: drover_proto::api::DispatchState::Active,
            dispatch_reason: None,
            dispatch_force: false,
            removed_at: None,
        }
    }

    fn scope(target: Option<&str>, actions: &[&str]) -> Scope {
        Scope {
            target: target.map(Into::into),
            actions: actions.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn every_scope_must_allow() {
        let (web, db) = (agent("a1", "web"), agent("a2", "db"));
        let none = Limits::of(&Scope::default(), &Scope::default());
        assert!(none.is_everywhere());
        assert!(none.check("anything", &[&web, &db]).is_ok());

        let user = Limits::of(&scope(Some("team=web"), &["web.*"]), &Scope::default());
        assert!(user.check("web.deploy", &[&web]).is_ok());
        let e = user.check("db.migrate", &[&web]).unwrap_err();
        assert!(
            e.contains("action 'db.migrate' is outside your scope"),
            "{e}"
        );
        let e = user.check("web.deploy", &[&web, &db]).unwrap_err();
        assert!(
            e.contains("1 agent(s) outside your scope") && e.contains("a2"),
            "{e}"
        );

        // A token narrower than its user narrows; it never widens.
        let token = Limits::of(
            &scope(Some("team=web"), &["web.*"]),
            &scope(None, &["web.restart"]),
        );
        assert!(token.check("web.restart", &[&web]).is_ok());
        assert!(token.check("web.deploy", &[&web]).is_err());
        let wider = Limits::of(&scope(Some("team=web"), &[]), &scope(Some("*"), &[]));
        assert!(wider.check("x", &[&db]).is_err());
    }

    #[test]
    fn stored_limits_round_trip_and_unreadable_ones_allow_nothing() {
        let l = Limits::of(&scope(Some("group:web"), &["a*"]), &Scope::default());
        assert_eq!(Limits::from_json(l.to_json().as_deref()), l);
        assert!(Limits::from_json(None).is_everywhere());
        let broken = Limits::from_json(Some("{"));
        assert!(!broken.allows_action("anything"));
    }

    #[test]
    fn scope_syntax_is_checked() {
        assert!(check_scope(&scope(Some("team=web"), &["web.*"])).is_ok());
        assert!(check_scope(&scope(Some("no good"), &[]))
            .unwrap_err()
            .starts_with("scope.target:"));
    }
}
