//! The workspace of a run: which profile it is created in, which sandbox
//! its tasks run in, which agent holds it, and the built-in jobs that
//! create and remove it on that agent.
//!
//! Key design decision: creating and removing a workspace are jobs like any
//! other (action `workspace`, argv `builtin:workspace-create|remove`),
//! pinned to the workspace's agent. They get dispatch, leases, retries,
//! live output (the git checkout) and the agent's outbox for free, and a
//! crash anywhere resumes them like any attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_proto::api::{AgentStatus, DispatchState};
use drover_proto::jobs::{ActionSpec, RetryPolicy};
use drover_proto::sandbox::{
    GitSource, Sandbox, WorkspaceSpec, BUILTIN_WORKSPACE_CREATE, BUILTIN_WORKSPACE_REMOVE, PROCESS,
    WORKSPACE_ACTION,
};
use drover_proto::workflows::WorkflowDef;
use drover_store::jobs::NewJob;
use drover_store::AgentRecord;

use super::template::{self, Scope};
use crate::error::ApiError;
use crate::sandboxes;
use crate::state::AppState;

/// How long creating a workspace (a git checkout, an image pull) may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long removing one may take.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The profile a run's workspace is created in (`process` by default).
pub async fn profile(
    state: &AppState,
    def: &WorkflowDef,
) -> Result<Result<Sandbox, String>, ApiError> {
    let name = def
        .workspace
        .as_ref()
        .and_then(|w| w.sandbox.as_deref())
        .unwrap_or(PROCESS);
    Ok(match sandboxes::find(state, name).await? {
        Some(p) => Ok(p),
        None => Err(format!(
            "workspace: unknown sandbox '{name}': see drover sandboxes list"
        )),
    })
}

/// The sandbox a task of a run with a workspace in `ws` runs in. In a
/// docker workspace every task runs in its container, so a task may only
/// ask for that profile or leave the default; in a directory workspace it
/// runs in its own profile (a container gets the directory mounted).
/// `who` names the task in the message; `requested` is its own profile.
pub fn task_sandbox(
    who: &str,
    requested: Option<&str>,
    action: &ActionSpec,
    own: Sandbox,
    ws: &Sandbox,
) -> Result<Sandbox, String> {
    if ws.docker().is_none() {
        return Ok(own);
    }
    let asked = requested.or(action.sandbox.as_deref());
    match asked {
        None | Some(PROCESS) => Ok(ws.clone()),
        Some(name) if name == ws.name() => Ok(ws.clone()),
        Some(name) => Err(format!(
            "{who} runs in sandbox '{name}', but the tasks of this run run in the workspace's container (sandbox '{}')",
            ws.name()
        )),
    }
}

/// What the agent is told about the workspace of run `run_id`: the git
/// source with its `${{ inputs.NAME }}` and `${{ run.id }}` rendered, then
/// checked as if written out.
pub fn spec(
    run_id: &str,
    inputs: &BTreeMap<String, String>,
    def: &WorkflowDef,
    profile: &Sandbox,
) -> Result<WorkspaceSpec, String> {
    let no_outputs = BTreeMap::new();
    let scope = Scope {
        run_id,
        inputs,
        outputs: &no_outputs,
    };
    let git = match def.workspace.as_ref().and_then(|w| w.git.as_ref()) {
        Some(g) => {
            let rendered = GitSource {
                repo: template::render(&g.repo, &scope).map_err(|e| format!("git.repo: {e}"))?,
                reference: g
                    .reference
                    .as_deref()
                    .map(|r| template::render(r, &scope).map_err(|e| format!("git.ref: {e}")))
                    .transpose()?,
            };
            rendered.validate()?;
            Some(rendered)
        }
        None => None,
    };
    Ok(WorkspaceSpec {
        id: run_id.to_owned(),
        sandbox: profile.clone(),
        git,
    })
}

/// Which built-in job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Remove,
}

/// Everything a workspace job borrows, owned.
#[derive(Debug, Clone)]
pub struct WorkspaceJob {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    retry: RetryPolicy,
    agents: Vec<String>,
    spec: WorkspaceSpec,
    timeout: Duration,
}

impl WorkspaceJob {
    pub fn new(step: Step, agent: &str, spec: WorkspaceSpec) -> WorkspaceJob {
        let (argv, timeout, max) = match step {
            Step::Create => (BUILTIN_WORKSPACE_CREATE, CREATE_TIMEOUT, 2),
            Step::Remove => (BUILTIN_WORKSPACE_REMOVE, REMOVE_TIMEOUT, 5),
        };
        WorkspaceJob {
            argv: vec![argv.to_owned()],
            env: BTreeMap::new(),
            retry: RetryPolicy {
                max,
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(60),
                on_timeout: false,
                on_lost: true,
            },
            agents: vec![agent.to_owned()],
            spec,
            timeout,
        }
    }

    pub fn new_job<'a>(&'a self, created_by: &'a str) -> NewJob<'a> {
        NewJob {
            action: WORKSPACE_ACTION,
            action_hash: "builtin",
            target: &self.agents[0],
            params_json: "{}",
            argv: &self.argv,
            env: &self.env,
            timeout_ms: self.timeout.as_millis() as i64,
            kill_grace_ms: 10_000,
            retry: &self.retry,
            created_by,
            agent_ids: &self.agents,
            artifacts: &[],
            sandbox: &self.spec.sandbox,
            workspace: Some(&self.spec),
            approval: None,
        }
    }
}

/// Picks the agent to hold a workspace among those the target names: one
/// that is online, takes work, and (for a docker workspace) offers the
/// engine and runtime; the least busy first. `Ok(None)` while none is
/// online but some could be; an error when none ever could.
pub fn choose_agent(
    candidates: &[AgentRecord],
    profile: &Sandbox,
    state: &AppState,
    busy: impl Fn(&str) -> i64,
) -> Result<Option<String>, String> {
    let now = chrono::Utc::now();
    let mut unable = Vec::new();
    let mut waiting = 0;
    let mut able: Vec<(i64, &str)> = Vec::new();
    for a in candidates {
        if a.revoked_at.is_some() {
            continue;
        }
        if let Err(why) = offers(a, profile) {
            unable.push(format!("{} ({why})", &a.id[..a.id.len().min(13)]));
            continue;
        }
        let status = AgentStatus::derive(false, a.last_seen_at, now, state.config.health());
        if status != AgentStatus::Online || a.dispatch != DispatchState::Active {
            waiting += 1;
            continue;
        }
        able.push((busy(&a.id), &a.id));
    }
    able.sort();
    if let Some((_, id)) = able.first() {
        return Ok(Some((*id).to_owned()));
    }
    if waiting > 0 {
        return Ok(None);
    }
    Err(format!(
        "no agent of the target can hold the workspace: {}",
        if unable.is_empty() {
            "none matched".to_owned()
        } else {
            unable.join(", ")
        }
    ))
}

/// Whether an agent's last inventory offers what the profile needs.
fn offers(a: &AgentRecord, profile: &Sandbox) -> Result<(), String> {
    let Some(inv) = a.inventory.as_ref() else {
        return Ok(());
    };
    let Some(d) = profile.docker() else {
        return if inv.sandboxes.is_empty() || inv.sandboxes.iter().any(|s| s == "process") {
            Ok(())
        } else {
            Err("does not accept process sandboxes".to_owned())
        };
    };
    if !inv.sandboxes.iter().any(|s| s == "docker") {
        return Err("does not accept docker sandboxes".to_owned());
    }
    let Some(engine) = inv.docker.as_ref().filter(|e| e.available) else {
        return Err("no Docker engine".to_owned());
    };
    if let Some(r) = &d.runtime {
        let known =
            engine.runtimes.iter().any(|x| x == r) || engine.engine_runtimes.iter().any(|x| x == r);
        if !known {
            return Err(format!("no runtime {r}"));
        }
    }
    Ok(())
}
