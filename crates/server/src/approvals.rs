//! Which work needs approval, and the request it makes. Pure matching of
//! protection rules against a built job (its action, sandbox profile and
//! agents) or a run (its workflow's name); the store keeps the requests.
//!
//! Key design decision: a request is bound to the sha256 of the canonical
//! spec (`drover_proto::approvals::spec_hash`), computed here when the work
//! is submitted and again by the store when enough people approved and
//! when the work is handed out; any difference makes a new request, so an
//! approval holds for exactly what the approvers saw.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use drover_proto::approvals::{spec_hash, JobSpecView, Protection, ProtectionKind, RunSpecView};
use drover_proto::glob::glob_match;
use drover_store::AgentRecord;

use crate::domain::JobSpec;
use crate::selector::Selector;

/// What a protected piece of work must wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    /// The rules it matched, for people.
    pub reasons: Vec<String>,
    /// The most approvers any of them asks for.
    pub approvers: u32,
}

fn add(needed: &mut Option<Needed>, reason: String, approvers: u32) {
    let n = needed.get_or_insert_with(|| Needed {
        reasons: Vec::new(),
        approvers: 1,
    });
    n.reasons.push(reason);
    n.approvers = n.approvers.max(approvers);
}

/// The rules a job matches, if any.
pub fn for_job(rules: &[Protection], job: &JobSpec, agents: &[AgentRecord]) -> Option<Needed> {
    let mut needed = None;
    for r in rules {
        match r.kind {
            ProtectionKind::Action if glob_match(&r.pattern, &job.action) => add(
                &mut needed,
                format!("action '{}' is protected ({})", job.action, r.pattern),
                r.approvers,
            ),
            ProtectionKind::Sandbox if glob_match(&r.pattern, job.sandbox.name()) => add(
                &mut needed,
                format!(
                    "sandbox '{}' is protected ({})",
                    job.sandbox.name(),
                    r.pattern
                ),
                r.approvers,
            ),
            ProtectionKind::Target => {
                let Ok(sel) = Selector::parse(&r.pattern) else {
                    continue;
                };
                let hit: Vec<&str> = agents
                    .iter()
                    .filter(|a| job.agents.contains(&a.id) && sel.matches(a))
                    .map(|a| a.id.as_str())
                    .collect();
                if !hit.is_empty() {
                    add(
                        &mut needed,
                        format!(
                            "target {} is protected: agent(s) {}",
                            r.pattern,
                            hit.iter().take(5).copied().collect::<Vec<_>>().join(", ")
                        ),
                        r.approvers,
                    );
                }
            }
            _ => {}
        }
    }
    needed
}

/// The rules a run of workflow `name` matches, if any.
pub fn for_run(rules: &[Protection], name: &str) -> Option<Needed> {
    let mut needed = None;
    for r in rules {
        if r.kind == ProtectionKind::Workflow && glob_match(&r.pattern, name) {
            add(
                &mut needed,
                format!("workflow '{name}' is protected ({})", r.pattern),
                r.approvers,
            );
        }
    }
    needed
}

/// A request's owned parts, ready to borrow as a `NewApproval`.
#[derive(Debug, Clone)]
pub struct Request {
    pub hash: String,
    pub spec: String,
    pub needed: Needed,
    pub requested_by: String,
    pub expires_at: DateTime<Utc>,
}

impl Request {
    pub fn job(job: &JobSpec, needed: Needed, by: &str, expires_at: DateTime<Utc>) -> Request {
        let view = JobSpecView::new(&job.action, &job.argv, &job.env, &job.sandbox, &job.agents);
        Request {
            hash: spec_hash(&view),
            spec: serde_json::to_string(&view).unwrap_or_default(),
            needed,
            requested_by: by.to_owned(),
            expires_at,
        }
    }

    pub fn run(
        name: &str,
        def_hash: &str,
        inputs: &BTreeMap<String, String>,
        needed: Needed,
        by: &str,
        expires_at: DateTime<Utc>,
    ) -> Request {
        let view = RunSpecView {
            workflow: name,
            definition: def_hash,
            inputs,
        };
        Request {
            hash: spec_hash(&view),
            spec: serde_json::to_string(&view).unwrap_or_default(),
            needed,
            requested_by: by.to_owned(),
            expires_at,
        }
    }

    pub fn as_new(&self) -> drover_store::approvals::NewApproval<'_> {
        drover_store::approvals::NewApproval {
            spec_hash: &self.hash,
            spec: &self.spec,
            reasons: &self.needed.reasons,
            approvers_needed: self.needed.approvers,
            requested_by: &self.requested_by,
            expires_at: self.expires_at,
        }
    }
}

fn expiry(ttl: std::time::Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::hours(24))
}

/// The approval request a job needs, if it touches a protected action,
/// sandbox profile or agent. One read of the rules (and of the job's
/// agents when a target is protected).
pub async fn request_for_job(
    store: &drover_store::Store,
    job: &JobSpec,
    by: &str,
    ttl: std::time::Duration,
) -> Result<Option<Request>, drover_store::Error> {
    let rules = store.list_protections().await?;
    if rules.is_empty() {
        return Ok(None);
    }
    let mut agents = Vec::new();
    if rules.iter().any(|r| r.kind == ProtectionKind::Target) {
        for id in &job.agents {
            if let Some(a) = store.agent(id).await? {
                agents.push(a);
            }
        }
    }
    Ok(for_job(&rules, job, &agents).map(|needed| Request::job(job, needed, by, expiry(ttl))))
}

/// The approval request a run of workflow `name` needs, if protected.
pub async fn request_for_run(
    store: &drover_store::Store,
    name: &str,
    def_hash: &str,
    inputs: &BTreeMap<String, String>,
    by: &str,
    ttl: std::time::Duration,
) -> Result<Option<Request>, drover_store::Error> {
    let rules = store.list_protections().await?;
    Ok(for_run(&rules, name)
        .map(|needed| Request::run(name, def_hash, inputs, needed, by, expiry(ttl))))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(kind: ProtectionKind, pattern: &str, approvers: u32) -> Protection {
        Protection {
            id: "r".into(),
            kind,
            pattern: pattern.into(),
            approvers,
            created_by: "admin".into(),
            created_at: Utc::now(),
        }
    }

    #[test]
    fn workflows_match_by_name_glob() {
        let rules = [rule(ProtectionKind::Workflow, "deploy-*", 2)];
        let n = for_run(&rules, "deploy-web").unwrap();
        assert_eq!(n.approvers, 2);
        assert!(n.reasons[0].contains("deploy-web"));
        assert!(for_run(&rules, "build").is_none());
    }
}
