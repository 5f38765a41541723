//! The domain layer between the routes and the store: it decides, the
//! routes parse and authorise, the store stores. Here lives the one way a
//! job is built — catalog lookup, typed parameter checks, argv rendering,
//! sandbox resolution, target resolution and limits — used by
//! `POST /api/v1/jobs` and by the workflow engine alike, with typed errors
//! that the HTTP edge maps to `ApiError`.
//!
//! Key design decision: a [`Jobs`] builder caches the catalog, target and
//! sandbox look-ups it makes, so the engine, which may start a hundred
//! tasks in one pass, asks the store once per action, target and profile.
//! Build one per request or per pass: the caches never outlive it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use drover_proto::api::DispatchState;
use drover_proto::jobs::{ActionSpec, RetryPolicy};
use drover_proto::sandbox::{Sandbox, WorkspaceSpec, PROCESS};
use drover_store::jobs::NewJob;
use drover_store::{AgentRecord, Store};

use crate::access::Limits;
use crate::catalog::{noop_spec, render_argv, resolve_params, NOOP};
use crate::sandboxes::{check_floor, spec_hash};
use crate::selector::Selector;

/// Longest timeout an attempt may be given.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most retries a job may ask for.
pub const MAX_RETRIES: u32 = 100;

/// Why a job cannot be built. Every variant but `Store` is the
/// submitter's to fix, and its message says how.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown action '{0}': see drover actions list")]
    UnknownAction(String),
    /// A parameter is missing, unknown or of the wrong type, or the argv
    /// cannot be rendered.
    #[error("{0}")]
    Params(String),
    #[error("timeout must be between 1ms and {}, got {}", humantime::format_duration(MAX_TIMEOUT), humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("retries must be at most {MAX_RETRIES}, got {0}")]
    Retries(u32),
    /// An unknown profile, or a weaker kind than the action asks for.
    #[error("{0}")]
    Sandbox(String),
    /// The target names no agent that may be given work.
    #[error("{0}")]
    Target(String),
    /// The action or an agent is outside the submitter's scope.
    #[error("{0}")]
    OutOfScope(String),
    /// A referenced secret does not exist, or may not reach the action or
    /// one of the agents.
    #[error("{0}")]
    Secret(String),
    /// A stored catalog entry cannot be read.
    #[error("stored {what} '{name}' is unreadable: {detail}")]
    Corrupt {
        what: &'static str,
        name: String,
        detail: String,
    },
    #[error(transparent)]
    Store(#[from] drover_store::Error),
}

impl Error {
    /// True when the submitter can fix it (as opposed to the server).
    pub fn is_input(&self) -> bool {
        !matches!(self, Error::Store(_) | Error::Corrupt { .. })
    }
}

/// Where a job's attempts run.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// The agents a target names (an id or prefix, labels, a group, `*`).
    Target(&'a str),
    /// One agent holding a workspace: the attempt runs in it, in the
    /// sandbox the workspace allows for this task.
    Workspace {
        agent: &'a str,
        spec: &'a WorkspaceSpec,
    },
}

/// What a submitter asks for.
#[derive(Debug, Clone)]
pub struct JobRequest<'a> {
    pub action: &'a str,
    /// Parameter values; strings already rendered by the caller.
    pub params: &'a BTreeMap<String, serde_json::Value>,
    /// Overrides the action's timeout.
    pub timeout: Option<Duration>,
    /// Overrides the action's number of retries.
    pub retries: Option<u32>,
    /// Overrides the action's sandbox profile.
    pub sandbox: Option<&'a str>,
    pub placement: Placement<'a>,
    /// The target as the submitter wrote it (stored with the job).
    pub target: &'a str,
    /// Paths each attempt uploads as artifacts.
    pub artifacts: &'a [String],
    /// Names the submitter in messages ("task 'build'", "the job").
    pub who: &'a str,
    /// Variables beside the action's (a workspace's); a name the action
    /// sets too is refused.
    pub env: &'a BTreeMap<String, String>,
    /// The submitter's scopes: the action and every agent must be inside.
    pub limits: &'a Limits,
}

/// A job ready to store: everything its attempts run with.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub action: String,
    pub action_hash: String,
    pub target: String,
    pub params_json: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: i64,
    pub kill_grace_ms: i64,
    pub retry: RetryPolicy,
    pub agents: Vec<String>,
    pub artifacts: Vec<String>,
    pub sandbox: Sandbox,
    pub workspace: Option<WorkspaceSpec>,
}

impl JobSpec {
    /// The store's view of it.
    pub fn new_job<'a>(&'a self, created_by: &'a str) -> NewJob<'a> {
        NewJob {
            action: &self.action,
            action_hash: &self.action_hash,
            target: &self.target,
            params_json: &self.params_json,
            argv: &self.argv,
            env: &self.env,
            timeout_ms: self.timeout_ms,
            kill_grace_ms: self.kill_grace_ms,
            retry: &self.retry,
            created_by,
            agent_ids: &self.agents,
            artifacts: &self.artifacts,
            sandbox: &self.sandbox,
            workspace: self.workspace.as_ref(),
            approval: None,
        }
    }
}

/// An action and the hash of its stored spec.
pub type Action = (Arc<ActionSpec>, String);

/// Builds jobs, caching its look-ups for its own life.
pub struct Jobs<'s> {
    store: &'s Store,
    actions: HashMap<String, Option<Action>>,
    targets: HashMap<String, Result<Vec<String>, String>>,
    profiles: HashMap<String, Option<Sandbox>>,
}

impl std::fmt::Debug for Jobs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("actions", &self.actions.len())
            .field("targets", &self.targets.len())
            .finish_non_exhaustive()
    }
}

impl<'s> Jobs<'s> {
    pub fn new(store: &'s Store) -> Jobs<'s> {
        Jobs {
            store,
            actions: HashMap::new(),
            targets: HashMap::new(),
            profiles: HashMap::new(),
        }
    }

    /// An action of the catalog (or the built-in `noop`).
    pub async fn action(&mut self, name: &str) -> Result<Option<Action>, Error> {
        if let Some(found) = self.actions.get(name) {
            return Ok(found.clone());
        }
        let found = find_action(self.store, name).await?;
        self.actions.insert(name.to_owned(), found.clone());
        Ok(found)
    }

    /// A sandbox profile by name, the built-in `process` included.
    pub async fn profile(&mut self, name: &str) -> Result<Option<Sandbox>, Error> {
        if let Some(found) = self.profiles.get(name) {
            return Ok(found.clone());
        }
        let found = find_profile(self.store, name).await?;
        self.profiles.insert(name.to_owned(), found.clone());
        Ok(found)
    }

    /// The profile a job of `action` runs in: the one `requested` by the
    /// job or task, else the action's, else `process`; never a weaker kind
    /// than the action asks for.
    pub async fn sandbox(
        &mut self,
        action: &ActionSpec,
        requested: Option<&str>,
    ) -> Result<Sandbox, Error> {
        let action_profile = match action.sandbox.as_deref() {
            Some(name) => match self.profile(name).await? {
                Some(p) => Some(p),
                None => {
                    return Err(Error::Sandbox(format!(
                        "action '{}' names sandbox '{name}', which is not in the catalog",
                        action.name
                    )))
                }
            },
            None => None,
        };
        let Some(name) = requested else {
            return Ok(action_profile.unwrap_or_else(Sandbox::default_process));
        };
        let Some(chosen) = self.profile(name).await? else {
            return Err(Error::Sandbox(format!(
                "unknown sandbox '{name}': see drover sandboxes list"
            )));
        };
        if let Some(floor) = &action_profile {
            check_floor(&action.name, floor, &chosen).map_err(Error::Sandbox)?;
        }
        Ok(chosen)
    }

    /// The agents a target names (never revoked ones). A label, group or
    /// `*` selector leaves out agents that take no new work (drained or
    /// stopped); an agent named by id is kept, and its work waits.
    pub async fn resolve_target(&mut self, target: &str) -> Result<Vec<String>, Error> {
        if let Some(found) = self.targets.get(target) {
            return found.clone().map_err(Error::Target);
        }
        let found = match resolve_target(self.store, target).await {
            Ok(agents) => Ok(agents),
            Err(Error::Target(why)) => Err(why),
            Err(other) => return Err(other),
        };
        self.targets.insert(target.to_owned(), found.clone());
        found.map_err(Error::Target)
    }

    /// Refuses an action or agents outside `limits` (no look-up when
    /// they allow everything).
    pub async fn check_limits(
        &mut self,
        limits: &Limits,
        action: &str,
        agents: &[String],
    ) -> Result<(), Error> {
        if limits.is_everywhere() {
            return Ok(());
        }
        if !limits.allows_action(action) {
            return limits.check(action, &[]).map_err(Error::OutOfScope);
        }
        let records = self.agent_records(agents).await?;
        let refs: Vec<&AgentRecord> = records.iter().collect();
        limits.check(action, &refs).map_err(Error::OutOfScope)
    }

    async fn agent_records(&mut self, agents: &[String]) -> Result<Vec<AgentRecord>, Error> {
        let mut records = Vec::with_capacity(agents.len());
        for id in agents {
            if let Some(a) = self.store.agent(id).await? {
                records.push(a);
            }
        }
        Ok(records)
    }

    /// Every secret the variables reference exists and may reach the
    /// action and each agent (dispatch checks again, as the secret may
    /// change meanwhile). Values are not read here.
    async fn check_secrets(
        &mut self,
        action: &str,
        env: &BTreeMap<String, String>,
        agents: &[String],
        who: &str,
    ) -> Result<(), Error> {
        let names = crate::vault::env_refs(env).map_err(Error::Secret)?;
        if names.is_empty() {
            return Ok(());
        }
        let records = self.agent_records(agents).await?;
        for name in names {
            let Some(secret) = self.store.secret(&name).await? else {
                return Err(Error::Secret(format!(
                    "{who} uses secret '{name}', which does not exist: see drover secrets list"
                )));
            };
            let scope = crate::vault::Scope {
                name: &name,
                actions: &secret.actions,
                target: secret.target.as_deref(),
            };
            for agent in &records {
                if let Some(why) = scope.refusal(action, agent) {
                    return Err(Error::Secret(format!("{who}: {why}")));
                }
            }
        }
        Ok(())
    }

    /// Checks and renders everything a job needs; stores nothing.
    pub async fn build(&mut self, req: &JobRequest<'_>) -> Result<JobSpec, Error> {
        let (spec, hash) = self
            .action(req.action)
            .await?
            .ok_or_else(|| Error::UnknownAction(req.action.to_owned()))?;
        let values = resolve_params(&spec, req.params).map_err(Error::Params)?;
        let argv = render_argv(&spec, &values).map_err(Error::Params)?;
        let timeout = req.timeout.unwrap_or(spec.timeout);
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(Error::Timeout(timeout));
        }
        let mut retry = spec.retries.clone();
        if let Some(n) = req.retries {
            if n > MAX_RETRIES {
                return Err(Error::Retries(n));
            }
            retry.max = n;
        }
        let own = self.sandbox(&spec, req.sandbox).await?;
        let (agents, sandbox, workspace) = match req.placement {
            Placement::Target(target) => (self.resolve_target(target).await?, own, None),
            Placement::Workspace { agent, spec: ws } => {
                let sandbox = crate::workflow::workspace::task_sandbox(
                    req.who,
                    req.sandbox,
                    &spec,
                    own,
                    &ws.sandbox,
                )
                .map_err(Error::Sandbox)?;
                (vec![agent.to_owned()], sandbox, Some(ws.clone()))
            }
        };
        self.check_limits(req.limits, &spec.name, &agents).await?;
        let mut env = spec.env.clone();
        for (name, value) in req.env {
            if env.insert(name.clone(), value.clone()).is_some() {
                return Err(Error::Params(format!(
                    "variable '{name}' is set both by the workspace and by action '{}'",
                    spec.name
                )));
            }
        }
        self.check_secrets(&spec.name, &env, &agents, req.who)
            .await?;
        let params_json = serde_json::to_string(&typed_params(&spec, req.params, &values))
            .map_err(|e| Error::Corrupt {
                what: "parameters",
                name: req.action.to_owned(),
                detail: e.to_string(),
            })?;
        Ok(JobSpec {
            action: spec.name.clone(),
            action_hash: hash,
            target: req.target.to_owned(),
            params_json,
            argv,
            env,
            timeout_ms: timeout.as_millis() as i64,
            kill_grace_ms: spec.kill_grace.as_millis() as i64,
            retry,
            agents,
            artifacts: req.artifacts.to_vec(),
            sandbox,
            workspace,
        })
    }
}

/// The parameters given, as the job records and shows them: each value
/// checked and typed as its parameter is (`--param count=3` of an integer
/// parameter is the number 3, not the text "3").
fn typed_params(
    spec: &ActionSpec,
    given: &BTreeMap<String, serde_json::Value>,
    values: &BTreeMap<String, String>,
) -> BTreeMap<String, serde_json::Value> {
    use drover_proto::jobs::ParamSpec;
    given
        .iter()
        .map(|(name, raw)| {
            let text = values.get(name);
            let typed = match (spec.params.get(name), text) {
                (Some(ParamSpec::Integer { .. }), Some(t)) => t
                    .parse::<i64>()
                    .map(serde_json::Value::from)
                    .unwrap_or_else(|_| raw.clone()),
                (Some(ParamSpec::Bool { .. }), Some(t)) => t
                    .parse::<bool>()
                    .map(serde_json::Value::from)
                    .unwrap_or_else(|_| raw.clone()),
                (Some(_), Some(t)) => serde_json::Value::String(t.clone()),
                _ => raw.clone(),
            };
            (name.clone(), typed)
        })
        .collect()
}

/// Looks an action up (the built-in `noop` included), uncached.
pub async fn find_action(store: &Store, name: &str) -> Result<Option<Action>, Error> {
    if name == NOOP {
        let spec = noop_spec();
        let hash = crate::catalog::spec_hash(&spec);
        return Ok(Some((Arc::new(spec), hash)));
    }
    let Some(rec) = store.action(name).await? else {
        return Ok(None);
    };
    let spec: ActionSpec = serde_json::from_str(&rec.spec).map_err(|e| Error::Corrupt {
        what: "action",
        name: name.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(Some((Arc::new(spec), rec.hash)))
}

/// Looks a sandbox profile up (the built-in `process` included), uncached.
pub async fn find_profile(store: &Store, name: &str) -> Result<Option<Sandbox>, Error> {
    if name == PROCESS {
        return Ok(Some(Sandbox::default_process()));
    }
    let Some(rec) = store.sandbox(name).await? else {
        return Ok(None);
    };
    let profile: Sandbox = serde_json::from_str(&rec.spec).map_err(|e| Error::Corrupt {
        what: "sandbox profile",
        name: name.to_owned(),
        detail: e.to_string(),
    })?;
    debug_assert!(!spec_hash(&profile).is_empty());
    Ok(Some(profile))
}

/// The agents a target names: the one an id (or unique prefix) names,
/// revoked or not (never a removed one), or every agent not revoked that
/// a selector matches.
/// An error when there is none.
pub async fn matching_agents(store: &Store, target: &str) -> Result<Vec<AgentRecord>, Error> {
    let none = || Error::Target(format!("target '{target}' matches no agent"));
    let selector = Selector::parse(target).map_err(Error::Target)?;
    if let Selector::Agent(prefix) = &selector {
        // A full id is read at once; only a prefix needs resolving first.
        if let Some(agent) = store.agent(prefix).await? {
            if agent.removed_at.is_some() {
                return Err(none());
            }
            return Ok(vec![agent]);
        }
        let id = store.resolve_agent_id(prefix).await.map_err(|e| match e {
            drover_store::Error::NotFound { .. } => none(),
            other => other.into(),
        })?;
        return store.agent(&id).await?.map(|a| vec![a]).ok_or_else(none);
    }
    let matched: Vec<AgentRecord> = store
        .list_agents()
        .await?
        .into_iter()
        .filter(|a| a.revoked_at.is_none() && selector.matches(a))
        .collect();
    if matched.is_empty() {
        return Err(none());
    }
    Ok(matched)
}

/// Resolves a target to the agents it names, uncached (see
/// [`Jobs::resolve_target`]).
pub async fn resolve_target(store: &Store, target: &str) -> Result<Vec<String>, Error> {
    let matched = matching_agents(store, target).await?;
    if let [one] = matched.as_slice() {
        if matches!(Selector::parse(target), Ok(Selector::Agent(_))) {
            if one.revoked_at.is_some() {
                return Err(Error::Target(format!("agent {} is revoked", one.id)));
            }
            return Ok(vec![one.id.clone()]);
        }
    }
    let (active, paused): (Vec<AgentRecord>, Vec<AgentRecord>) = matched
        .into_iter()
        .partition(|a| a.dispatch == DispatchState::Active);
    if active.is_empty() {
        let names: Vec<String> = paused
            .iter()
            .take(5)
            .map(|a| format!("{} ({})", short(&a.id), a.dispatch.as_str()))
            .collect();
        return Err(Error::Target(format!(
            "target '{target}' matches only agents that take no new work: {}",
            names.join(", ")
        )));
    }
    Ok(active.into_iter().map(|a| a.id).collect())
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_errors_name_the_limit_and_the_value() {
        assert_eq!(
            Error::Retries(101).to_string(),
            "retries must be at most 100, got 101"
        );
        assert_eq!(
            Error::Timeout(Duration::from_secs(8 * 24 * 3600)).to_string(),
            "timeout must be between 1ms and 7days, got 8days"
        );
        assert!(Error::Target("x".into()).is_input());
        assert!(!Error::Store(drover_store::Error::Unavailable("x".into())).is_input());
    }
}
