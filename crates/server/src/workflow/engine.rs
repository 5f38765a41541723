//! The workflow engine: moves runs forward. It reacts to job changes (a
//! task's job ended) and run changes (submitted, cancel asked), and sweeps
//! every run not yet ended once a second, which is also how runs resume
//! after a restart or a crash.
//!
//! Key design decision: the engine holds nothing that matters. Each step
//! (`start_task`, `set_task_state`, `finish_run`) is one store transaction
//! guarded by the state it leaves, so a step replayed after a crash, or run
//! by two servers at once, happens once. A task's job is created in the
//! transaction that starts the task; a job's attempts keep their own
//! at-least-once retries, and the task takes the job's final state once.
//!
//! A run with a workspace first picks the agent that holds it and creates
//! it there (a built-in job, `workspace::WorkspaceJob`); its tasks start
//! once it is ready, all on that agent. The run ends once every task has,
//! and never while the workspace is still being created; its end queues
//! the job that removes the workspace (unless `keep_workspace`), in the
//! same transaction, and the run is swept until that job has ended.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use drover_proto::jobs::JobState;
use drover_proto::sandbox::WorkspaceSpec;
use drover_proto::workflows::WorkspaceState;
use drover_proto::workflows::{
    RunState, TaskDef, TaskState, WebhookEvent, WebhookPayload, WorkflowDef,
};
use drover_store::workflows::{NewDelivery, RunRecord, TaskRecord, WorkspaceEnd};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::template::{self, Scope};
use super::workspace::{self, Step, WorkspaceJob};
use crate::domain;
use crate::hub::JobEvent;
use crate::state::AppState;

/// How often every run not yet ended is looked at.
const SWEEP: Duration = Duration::from_secs(1);

/// The task state that mirrors a job's.
pub fn mirror(job: JobState) -> TaskState {
    match job {
        JobState::Queued => TaskState::Queued,
        JobState::Dispatched => TaskState::Dispatched,
        JobState::Running => TaskState::Running,
        JobState::Succeeded => TaskState::Succeeded,
        JobState::TimedOut => TaskState::TimedOut,
        JobState::Cancelled => TaskState::Cancelled,
        JobState::Failed | JobState::Rejected | JobState::Lost => TaskState::Failed,
    }
}

/// Runs the engine until `shutdown`.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let engine = Engine::new(state.clone());
    let mut rx = state.hub.subscribe();
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty: HashSet<String> = HashSet::new();
    loop {
        let mut sweep = false;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => sweep = true,
            ev = rx.recv() => match ev {
                Ok(ev) => sweep |= note(ev, &mut dirty),
                Err(RecvError::Lagged(_)) => sweep = true,
                Err(RecvError::Closed) => return,
            },
        }
        // Take whatever else is already there in the same round.
        loop {
            match rx.try_recv() {
                Ok(ev) => sweep |= note(ev, &mut dirty),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => sweep = true,
                Err(_) => break,
            }
        }
        if sweep {
            match state.store.active_runs().await {
                Ok(runs) => dirty.extend(runs),
                Err(e) => tracing::warn!(error = %e, "listing active runs failed"),
            }
        }
        for run in dirty.drain() {
            match engine.advance(&run).await {
                Ok(moved) => tracing::trace!(run = %run, moved, "run looked at"),
                Err(e) => {
                    tracing::warn!(run = %run, error = %e, "advancing a run failed; will retry")
                }
            }
        }
    }
}

/// Notes a run to look at; true when everything should be looked at. A
/// commit that changed a run's job also names the run.
fn note(ev: JobEvent, dirty: &mut HashSet<String>) -> bool {
    match ev {
        JobEvent::RunChanged(run) => {
            dirty.insert(run);
            false
        }
        JobEvent::Everything => true,
        JobEvent::Changed(_) | JobEvent::Log(_) | JobEvent::RunEvent(_) => false,
    }
}

/// Why a step of the engine failed (it is retried at the next sweep).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] drover_store::Error),
    #[error("stored definition {0} is unreadable: {1}")]
    Definition(String, String),
}

/// Where a workspace goes when the job of one of its steps ends.
struct WorkspaceStep {
    from: WorkspaceState,
    ok: WorkspaceState,
    ok_reason: String,
    failed: WorkspaceState,
}

/// Where a run's workspace stands for its tasks.
enum Workspace {
    /// The run has none.
    None,
    /// Tasks wait.
    NotReady,
    /// Tasks run on this agent, in this workspace.
    Ready {
        agent: String,
        spec: Box<WorkspaceSpec>,
    },
    /// It could not be created: tasks are skipped, the run fails.
    Failed(String),
}

struct Engine {
    state: AppState,
    defs: std::sync::Mutex<HashMap<String, Arc<WorkflowDef>>>,
}

impl Engine {
    fn new(state: AppState) -> Engine {
        Engine {
            state,
            defs: std::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn definition(&self, hash: &str) -> Result<Arc<WorkflowDef>, EngineError> {
        if let Some(d) = self
            .defs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
        {
            return Ok(d.clone());
        }
        let body = self
            .state
            .store
            .definition(hash)
            .await?
            .ok_or_else(|| EngineError::Definition(hash.to_owned(), "missing".into()))?;
        let def: WorkflowDef = serde_json::from_str(&body)
            .map_err(|e| EngineError::Definition(hash.to_owned(), e.to_string()))?;
        let def = Arc::new(def);
        self.defs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash.to_owned(), def.clone());
        Ok(def)
    }

    /// Looks at one run and takes every step that is due.
    async fn advance(&self, run_id: &str) -> Result<bool, EngineError> {
        let store = &self.state.store;
        let Some(run) = store.run(run_id).await? else {
            return Ok(false);
        };
        if run.state.is_final() {
            // Only the removal of its workspace can still be under way.
            if run.workspace_state == Some(WorkspaceState::Removing) {
                self.settle_removal(&run).await?;
            }
            return Ok(false);
        }
        let def = self.definition(&run.def_hash).await?;
        let mut tasks: HashMap<String, TaskRecord> = store
            .run_tasks(run_id)
            .await?
            .into_iter()
            .map(|t| (t.task_id.clone(), t))
            .collect();
        let mut changed = false;

        // 1. Tasks take their jobs' states.
        for t in tasks.values_mut() {
            if t.state.is_final() {
                continue;
            }
            let (Some(job_id), Some(js)) = (t.job_id.clone(), t.job_state) else {
                continue;
            };
            let now = Utc::now();
            let target = mirror(js);
            if js.is_final() {
                let outputs = if js == JobState::Succeeded {
                    store.job_outputs(&job_id).await?
                } else {
                    BTreeMap::new()
                };
                let reason = self.job_outcome(&job_id, js).await?;
                if store
                    .set_task_state(
                        run_id,
                        &t.task_id,
                        target,
                        reason.as_deref(),
                        Some(&outputs),
                        now,
                    )
                    .await?
                {
                    changed = true;
                }
                t.state = target;
                t.outputs = outputs;
            } else if target != t.state {
                if store
                    .set_task_state(run_id, &t.task_id, target, None, None, now)
                    .await?
                {
                    changed = true;
                }
                t.state = target;
            }
        }

        // 2. A run asked to stop, or out of time, cancels what runs and
        //    skips what waits.
        let stop = if let Some(at) = run.cancel_requested_at {
            Some((
                RunState::Cancelled,
                format!("cancelled at {}", at.to_rfc3339()),
            ))
        } else if let Some(deadline) = run.deadline_at.filter(|d| *d <= Utc::now()) {
            let limit = def
                .timeout
                .map(|t| humantime::format_duration(t).to_string())
                .unwrap_or_default();
            Some((
                RunState::TimedOut,
                format!(
                    "the run timed out after {limit} (at {})",
                    deadline.to_rfc3339()
                ),
            ))
        } else {
            None
        };
        if let Some((end, why)) = stop {
            // A workspace being created is stopped too; the run ends (and
            // its removal is queued) only once that job has ended.
            let mut creating = false;
            if run.workspace_state == Some(WorkspaceState::Creating) {
                if let Some(job_id) = &run.workspace_job {
                    let job = store.job(job_id).await?;
                    if job.as_ref().is_some_and(|j| !j.state.is_final()) {
                        creating = true;
                        if job.is_some_and(|j| j.cancel_requested_at.is_none()) {
                            store.cancel_job(job_id, &why, Utc::now()).await?;
                        }
                    } else {
                        changed |= self.workspace_created(&run).await?;
                    }
                }
            }
            for t in tasks.values_mut() {
                if t.state.is_final() {
                    continue;
                }
                match &t.job_id {
                    Some(job_id) => {
                        store.cancel_job(job_id, &why, Utc::now()).await?;
                    }
                    None => {
                        store
                            .set_task_state(
                                run_id,
                                &t.task_id,
                                TaskState::Skipped,
                                Some(&why),
                                None,
                                Utc::now(),
                            )
                            .await?;
                        t.state = TaskState::Skipped;
                        changed = true;
                    }
                }
            }
            if !creating && tasks.values().all(|t| t.state.is_final()) {
                let run = store.run(run_id).await?.unwrap_or(run);
                changed |= self.finish(&run, &def, &tasks, end, Some(why)).await?;
            }
            return Ok(changed);
        }

        // 2b. The workspace, if any, comes before every task.
        let ws = self.workspace(&run, &def, &mut changed).await?;

        // 3. Start (or skip) every pending task whose needs have ended,
        //    until nothing more moves.
        let mut jobs = domain::Jobs::new(&self.state.store);
        loop {
            let mut moved = false;
            for task in &def.tasks {
                let Some(t) = tasks.get(&task.id) else {
                    continue;
                };
                if t.state != TaskState::Pending {
                    continue;
                }
                let ended = task
                    .needs
                    .iter()
                    .all(|n| tasks.get(n).is_some_and(|d| d.state.is_final()));
                if !ended {
                    continue;
                }
                let blocking: Vec<String> = task
                    .needs
                    .iter()
                    .filter(|n| {
                        let done = &tasks[*n];
                        let optional = def.tasks.iter().any(|d| &d.id == *n && d.optional);
                        done.state != TaskState::Succeeded
                            && !(optional && done.state != TaskState::Skipped)
                    })
                    .map(|n| format!("{n} ({})", tasks[n].state.as_str()))
                    .collect();
                if matches!(ws, Workspace::NotReady) {
                    continue;
                }
                let now = Utc::now();
                let new_state = if let Workspace::Failed(why) = &ws {
                    let why = format!("the workspace could not be created: {why}");
                    store
                        .set_task_state(run_id, &task.id, TaskState::Skipped, Some(&why), None, now)
                        .await?;
                    TaskState::Skipped
                } else if !blocking.is_empty() {
                    let why = format!("needs {}", blocking.join(", "));
                    store
                        .set_task_state(run_id, &task.id, TaskState::Skipped, Some(&why), None, now)
                        .await?;
                    TaskState::Skipped
                } else {
                    match self.start(&run, task, &tasks, &ws, &mut jobs).await? {
                        Ok(()) => TaskState::Queued,
                        Err(why) => {
                            tracing::info!(run = %run_id, task = %task.id, reason = %why, "task cannot start");
                            store
                                .set_task_state(
                                    run_id,
                                    &task.id,
                                    TaskState::Failed,
                                    Some(&why),
                                    None,
                                    now,
                                )
                                .await?;
                            TaskState::Failed
                        }
                    }
                };
                if let Some(t) = tasks.get_mut(&task.id) {
                    t.state = new_state;
                }
                moved = true;
                changed = true;
            }
            if !moved {
                break;
            }
        }

        // 4. Every task ended: so does the run.
        if tasks.values().all(|t| t.state.is_final()) {
            let failed: Vec<String> = def
                .tasks
                .iter()
                .filter(|d| !d.optional && tasks[&d.id].state != TaskState::Succeeded)
                .map(|d| format!("{} ({})", d.id, tasks[&d.id].state.as_str()))
                .collect();
            let (end, why) = if let Workspace::Failed(why) = &ws {
                (
                    RunState::Failed,
                    Some(format!("the workspace could not be created: {why}")),
                )
            } else if failed.is_empty() {
                (RunState::Succeeded, None)
            } else {
                (
                    RunState::Failed,
                    Some(format!(
                        "required tasks did not succeed: {}",
                        failed.join(", ")
                    )),
                )
            };
            changed |= self.finish(&run, &def, &tasks, end, why).await?;
        }
        Ok(changed)
    }

    /// Moves the run's workspace forward and says where it stands: picks
    /// the agent and creates the job that makes it, notes when that job
    /// has ended.
    async fn workspace(
        &self,
        run: &RunRecord,
        def: &WorkflowDef,
        changed: &mut bool,
    ) -> Result<Workspace, EngineError> {
        let store = &self.state.store;
        let (Some(ws_def), Some(ws_state)) = (&def.workspace, run.workspace_state) else {
            return Ok(Workspace::None);
        };
        let now = Utc::now();
        match ws_state {
            WorkspaceState::Pending => {
                let profile = match workspace::profile(&self.state, def).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(why)) => return self.workspace_failed(run, why, changed).await,
                    Err(e) => return self.workspace_failed(run, e.message, changed).await,
                };
                let candidates = match self.candidates(&ws_def.target).await? {
                    Ok(c) => c,
                    Err(why) => return self.workspace_failed(run, why, changed).await,
                };
                let mut busy = HashMap::new();
                for a in &candidates {
                    busy.insert(a.id.clone(), store.busy_attempts(&a.id).await?);
                }
                let chosen = workspace::choose_agent(&candidates, &profile, &self.state, |id| {
                    busy.get(id).copied().unwrap_or(0)
                });
                match chosen {
                    Ok(Some(agent)) => {
                        let spec = match workspace::spec(&run.id, &run.inputs, def, &profile) {
                            Ok(s) => s,
                            Err(why) => return self.workspace_failed(run, why, changed).await,
                        };
                        let job = WorkspaceJob::new(Step::Create, &agent, spec);
                        if let Some(job_id) = store
                            .start_workspace(&run.id, &agent, job.new_job(&run.created_by), now)
                            .await?
                        {
                            tracing::info!(run = %run.id, agent = %agent, job = %job_id, sandbox = %profile.name(), "creating the workspace");
                            *changed = true;
                        }
                        Ok(Workspace::NotReady)
                    }
                    Ok(None) => {
                        let why = format!(
                            "waiting for an online agent of '{}' to hold the workspace",
                            ws_def.target
                        );
                        *changed |= store
                            .set_workspace_state(
                                &run.id,
                                &[WorkspaceState::Pending],
                                WorkspaceState::Pending,
                                Some(&why),
                                now,
                            )
                            .await?;
                        Ok(Workspace::NotReady)
                    }
                    Err(why) => self.workspace_failed(run, why, changed).await,
                }
            }
            WorkspaceState::Creating => {
                if self.workspace_created(run).await? {
                    *changed = true;
                    // Ready or failed now: take that into account at once.
                    if let Some(run) = store.run(&run.id).await? {
                        return Box::pin(self.workspace(&run, def, changed)).await;
                    }
                }
                Ok(Workspace::NotReady)
            }
            WorkspaceState::Ready => {
                let spec = match &run.workspace_job {
                    Some(job) => store.job(job).await?.and_then(|j| j.workspace),
                    None => None,
                };
                match (spec, &run.workspace_agent) {
                    (Some(spec), Some(agent)) => Ok(Workspace::Ready {
                        agent: agent.clone(),
                        spec: Box::new(spec),
                    }),
                    _ => Ok(Workspace::Failed(
                        "the workspace's job or agent is missing".to_owned(),
                    )),
                }
            }
            _ => Ok(Workspace::Failed(
                run.workspace_reason
                    .clone()
                    .unwrap_or_else(|| "it could not be created".to_owned()),
            )),
        }
    }

    /// The agents a workspace target names (revoked ones left out).
    async fn candidates(
        &self,
        target: &str,
    ) -> Result<Result<Vec<drover_store::AgentRecord>, String>, EngineError> {
        let selector = match crate::selector::Selector::parse(target) {
            Ok(s) => s,
            Err(e) => return Ok(Err(format!("workspace target: {e}"))),
        };
        let store = &self.state.store;
        if let crate::selector::Selector::Agent(prefix) = &selector {
            let id = match store.resolve_agent_id(prefix).await {
                Ok(id) => id,
                Err(drover_store::Error::NotFound { .. }) => {
                    return Ok(Err(format!("target '{target}' matches no agent")))
                }
                Err(e) => return Err(e.into()),
            };
            return Ok(Ok(store.agent(&id).await?.into_iter().collect()));
        }
        let agents: Vec<_> = store
            .list_agents()
            .await?
            .into_iter()
            .filter(|a| a.revoked_at.is_none() && selector.matches(a))
            .collect();
        if agents.is_empty() {
            return Ok(Err(format!("target '{target}' matches no agent")));
        }
        Ok(Ok(agents))
    }

    async fn workspace_failed(
        &self,
        run: &RunRecord,
        why: String,
        changed: &mut bool,
    ) -> Result<Workspace, EngineError> {
        tracing::info!(run = %run.id, reason = %why, "the workspace cannot be created");
        *changed |= self
            .state
            .store
            .set_workspace_state(
                &run.id,
                &[WorkspaceState::Pending, WorkspaceState::Creating],
                WorkspaceState::Failed,
                Some(&why),
                Utc::now(),
            )
            .await?;
        Ok(Workspace::Failed(why))
    }

    /// Notes the end of the job creating the workspace. True when the
    /// workspace changed state.
    async fn workspace_created(&self, run: &RunRecord) -> Result<bool, EngineError> {
        let agent = run.workspace_agent.as_deref().unwrap_or("?");
        let done = WorkspaceStep {
            from: WorkspaceState::Creating,
            ok: WorkspaceState::Ready,
            ok_reason: format!("on agent {agent}"),
            failed: WorkspaceState::Failed,
        };
        self.settle_workspace_job(run, run.workspace_job.as_deref(), done)
            .await
    }

    /// Notes the end of the job removing an ended run's workspace. True
    /// when it changed.
    async fn settle_removal(&self, run: &RunRecord) -> Result<bool, EngineError> {
        let job = run.workspace_remove_job.as_deref();
        let done = WorkspaceStep {
            from: WorkspaceState::Removing,
            ok: WorkspaceState::Removed,
            ok_reason: format!("removed by job {}", job.unwrap_or("?")),
            failed: WorkspaceState::RemoveFailed,
        };
        self.settle_workspace_job(run, job, done).await
    }

    /// Moves the workspace on once its job has ended: to `done.ok` when it
    /// succeeded, else to `done.failed` with the job's outcome. True when
    /// it changed.
    async fn settle_workspace_job(
        &self,
        run: &RunRecord,
        job_id: Option<&str>,
        done: WorkspaceStep,
    ) -> Result<bool, EngineError> {
        let Some(job_id) = job_id else {
            return Ok(false);
        };
        let Some(job) = self.state.store.job(job_id).await? else {
            return Ok(false);
        };
        if !job.state.is_final() {
            return Ok(false);
        }
        let (to, why) = if job.state == JobState::Succeeded {
            (done.ok, Some(done.ok_reason))
        } else {
            (done.failed, self.job_outcome(job_id, job.state).await?)
        };
        tracing::info!(run = %run.id, job = %job_id, state = to.as_str(), "workspace job ended");
        Ok(self
            .state
            .store
            .set_workspace_state(&run.id, &[done.from], to, why.as_deref(), Utc::now())
            .await?)
    }

    /// Why a job ended as it did, from its last attempt.
    async fn job_outcome(&self, job_id: &str, js: JobState) -> Result<Option<String>, EngineError> {
        if js == JobState::Succeeded {
            return Ok(None);
        }
        let attempts = self.state.store.attempts(job_id).await?;
        let last = attempts.iter().max_by_key(|a| (a.finished_at, a.number));
        let detail = last.map(|a| {
            let mut parts = vec![format!("attempt {} {}", a.number, a.state.as_str())];
            if let Some(code) = a.exit_code {
                parts.push(format!("exit code {code}"));
            }
            if let Some(e) = a.error.as_ref().or(a.reason.as_ref()) {
                parts.push(e.clone());
            }
            parts.join(": ")
        });
        Ok(Some(match detail {
            Some(d) => format!("job {job_id} {}: {d}", js.as_str()),
            None => format!("job {job_id} {}", js.as_str()),
        }))
    }

    /// Starts a task: renders its parameters from the run's inputs and
    /// the outputs of the tasks before it, builds its job (the domain
    /// layer's checks, as for a job submitted over HTTP) and creates it in
    /// the transaction that marks the task started. An `Err` inside is
    /// the task's failure, meant for the operator.
    async fn start(
        &self,
        run: &RunRecord,
        task: &TaskDef,
        tasks: &HashMap<String, TaskRecord>,
        ws: &Workspace,
        jobs: &mut domain::Jobs<'_>,
    ) -> Result<Result<(), String>, EngineError> {
        let outputs: BTreeMap<String, BTreeMap<String, String>> = tasks
            .iter()
            .filter(|(_, t)| t.state == TaskState::Succeeded)
            .map(|(id, t)| (id.clone(), t.outputs.clone()))
            .collect();
        let scope = Scope {
            run_id: &run.id,
            inputs: &run.inputs,
            outputs: &outputs,
        };
        let mut params = BTreeMap::new();
        for (name, value) in &task.params {
            let v = match value {
                serde_json::Value::String(s) => match template::render(s, &scope) {
                    Ok(r) => serde_json::Value::String(r),
                    Err(e) => return Ok(Err(format!("param '{name}': {e}"))),
                },
                other => other.clone(),
            };
            params.insert(name.clone(), v);
        }
        let placement = match ws {
            // Pinned to the workspace's agent, in its sandbox.
            Workspace::Ready { agent, spec } => domain::Placement::Workspace { agent, spec },
            _ => domain::Placement::Target(&task.target),
        };
        let who = format!("task '{}'", task.id);
        let built = jobs
            .build(&domain::JobRequest {
                action: &task.action,
                params: &params,
                timeout: task.timeout,
                retries: task.retries,
                sandbox: task.sandbox.as_deref(),
                placement,
                target: &task.target,
                artifacts: &task.artifacts,
                who: &who,
            })
            .await;
        let job = match built {
            Ok(job) => job,
            Err(e) if e.is_input() => return Ok(Err(e.to_string())),
            Err(domain::Error::Store(e)) => return Err(e.into()),
            Err(e) => return Ok(Err(e.to_string())),
        };
        let created = self
            .state
            .store
            .start_task(&run.id, &task.id, job.new_job(&run.created_by), Utc::now())
            .await?;
        if let Some(job_id) = created {
            tracing::debug!(run = %run.id, task = %task.id, job = %job_id, "task started");
        }
        Ok(Ok(()))
    }

    /// Ends the run and queues its webhooks. True when it ended now.
    async fn finish(
        &self,
        run: &RunRecord,
        def: &WorkflowDef,
        tasks: &HashMap<String, TaskRecord>,
        end: RunState,
        why: Option<String>,
    ) -> Result<bool, EngineError> {
        let now = Utc::now();
        let event = WebhookEvent::of(end);
        let task_states: BTreeMap<String, TaskState> =
            tasks.iter().map(|(k, t)| (k.clone(), t.state)).collect();
        let mut hooks: Vec<(String, Option<String>)> = def
            .webhooks
            .iter()
            .filter(|h| h.events.contains(&event))
            .map(|h| (h.url.clone(), h.secret.clone()))
            .collect();
        for h in self.state.store.list_webhooks().await? {
            if h.events.is_empty() || h.events.contains(&event) {
                hooks.push((h.url, Some(h.secret)));
            }
        }
        let deliveries: Vec<NewDelivery> = hooks
            .into_iter()
            .map(|(url, secret)| {
                let id = drover_store::new_id();
                let payload = WebhookPayload {
                    delivery_id: id.clone(),
                    event,
                    run_id: run.id.clone(),
                    workflow: run.name.clone(),
                    state: end,
                    reason: why.clone(),
                    finished_at: now,
                    tasks: task_states.clone(),
                };
                NewDelivery {
                    url,
                    secret,
                    event,
                    payload: serde_json::to_string(&payload).unwrap_or_default(),
                    id,
                }
            })
            .collect();
        // The workspace goes with the run, unless it is to be kept.
        let remove = match (
            run.workspace_state,
            &run.workspace_job,
            &run.workspace_agent,
        ) {
            (Some(_), Some(job), Some(agent)) if !def.keep_workspace => self
                .state
                .store
                .job(job)
                .await?
                .and_then(|j| j.workspace)
                .map(|spec| WorkspaceJob::new(Step::Remove, agent, spec)),
            _ => None,
        };
        let workspace = match (run.workspace_state, &run.workspace_job, &remove) {
            (None, _, _) => WorkspaceEnd::None,
            (Some(_), None, _) => WorkspaceEnd::NeverCreated,
            (Some(_), Some(_), Some(job)) => WorkspaceEnd::Remove(job.new_job(&run.created_by)),
            (Some(_), Some(_), None) => WorkspaceEnd::Keep,
        };
        let ended = self
            .state
            .store
            .finish_run(&run.id, end, why.as_deref(), &deliveries, workspace, now)
            .await?;
        if ended {
            tracing::info!(run = %run.id, workflow = %run.name, state = end.as_str(), "run ended");
        }
        Ok(ended)
    }
}
