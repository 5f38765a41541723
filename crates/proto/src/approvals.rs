//! Approvals: protection rules, the requests a protected job or run makes,
//! and the canonical hash an approval is bound to.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::sandbox::Sandbox;

/// Longest rejection reason.
pub const MAX_REASON_BYTES: usize = 1000;
/// Most approvers a rule may ask for.
pub const MAX_APPROVERS: u32 = 10;

/// What a protection rule guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ProtectionKind {
    /// Actions whose name matches the glob.
    Action,
    /// Sandbox profiles whose name matches the glob.
    Sandbox,
    /// Agents the target selector names.
    Target,
    /// Workflow runs of definitions whose name matches the glob.
    Workflow,
}

impl ProtectionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtectionKind::Action => "action",
            ProtectionKind::Sandbox => "sandbox",
            ProtectionKind::Target => "target",
            ProtectionKind::Workflow => "workflow",
        }
    }

    pub fn parse(s: &str) -> Option<ProtectionKind> {
        [
            ProtectionKind::Action,
            ProtectionKind::Sandbox,
            ProtectionKind::Target,
            ProtectionKind::Workflow,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A protection rule: work that touches what it names waits for approval.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Protection {
    pub id: String,
    pub kind: ProtectionKind,
    /// A name glob (`*` is the wildcard) or, for `target`, a selector.
    pub pattern: String,
    /// Distinct people who must approve.
    pub approvers: u32,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// `POST /api/v1/protections`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProtectRequest {
    pub kind: ProtectionKind,
    pub pattern: String,
    /// Default 1, at most 10.
    #[serde(default)]
    pub approvers: Option<u32>,
}

/// Where an approval request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    Pending,
    Approved,
    Rejected,
    Expired,
    /// The spec changed after the request (or the approval): a new
    /// request replaced it.
    Superseded,
    /// The job or run was cancelled while it waited.
    Cancelled,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Rejected => "rejected",
            ApprovalState::Expired => "expired",
            ApprovalState::Superseded => "superseded",
            ApprovalState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<ApprovalState> {
        [
            ApprovalState::Pending,
            ApprovalState::Approved,
            ApprovalState::Rejected,
            ApprovalState::Expired,
            ApprovalState::Superseded,
            ApprovalState::Cancelled,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A request for approval of one job or run, with exactly what will run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Approval {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// sha256 of the canonical spec below: the approval holds for exactly it.
    pub spec_hash: String,
    /// What will run (a job: action, argv, environment names, sandbox,
    /// agents; a run: workflow, definition hash, inputs).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub spec: serde_json::Value,
    /// Why it needs approval: the rules it matched.
    pub reasons: Vec<String>,
    pub approvers_needed: u32,
    /// Who approved so far.
    pub approved_by: Vec<String>,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub state: ApprovalState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// A rejection's reason, or why it expired or was superseded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `POST /api/v1/approvals/{id}/approve` and `/reject` (where a reason is
/// required).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DecideRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// The canonical spec of a job, as approvers see it and as its hash binds.
#[derive(Debug, Clone, Serialize)]
pub struct JobSpecView<'a> {
    pub action: &'a str,
    pub argv: &'a [String],
    /// Names only: values may be secrets, and an approval of a name holds
    /// for the value the vault gives it.
    pub env: Vec<&'a str>,
    pub sandbox: &'a Sandbox,
    /// Sorted agent ids.
    pub agents: Vec<&'a str>,
}

impl<'a> JobSpecView<'a> {
    pub fn new(
        action: &'a str,
        argv: &'a [String],
        env: &'a BTreeMap<String, String>,
        sandbox: &'a Sandbox,
        agents: &'a [String],
    ) -> JobSpecView<'a> {
        let mut agents: Vec<&str> = agents.iter().map(String::as_str).collect();
        agents.sort_unstable();
        agents.dedup();
        JobSpecView {
            action,
            argv,
            env: env.keys().map(String::as_str).collect(),
            sandbox,
            agents,
        }
    }
}

/// The canonical spec of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSpecView<'a> {
    pub workflow: &'a str,
    pub definition: &'a str,
    pub inputs: &'a BTreeMap<String, String>,
}

/// sha256 (hex) of a spec's canonical JSON: fields in declaration order,
/// maps sorted, no whitespace.
pub fn spec_hash<T: Serialize>(spec: &T) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_changes_with_anything_that_runs() {
        let env: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        let sb = Sandbox::default_process();
        let argv = vec!["/bin/echo".to_string(), "hi".to_string()];
        let agents = vec!["b".to_string(), "a".to_string()];
        let base = spec_hash(&JobSpecView::new("echo", &argv, &env, &sb, &agents));
        // Agent order and env values do not matter.
        let agents2 = vec!["a".to_string(), "b".to_string()];
        let env2: BTreeMap<String, String> = [("A".to_string(), "2".to_string())].into();
        assert_eq!(
            base,
            spec_hash(&JobSpecView::new("echo", &argv, &env2, &sb, &agents2))
        );
        let argv2 = vec!["/bin/echo".to_string(), "bye".to_string()];
        assert_ne!(
            base,
            spec_hash(&JobSpecView::new("echo", &argv2, &env, &sb, &agents))
        );
        assert_ne!(
            base,
            spec_hash(&JobSpecView::new("echo2", &argv, &env, &sb, &agents))
        );
        let one = vec!["a".to_string()];
        assert_ne!(
            base,
            spec_hash(&JobSpecView::new("echo", &argv, &env, &sb, &one))
        );
        assert_eq!(base.len(), 64);
    }
}
