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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use drover_proto::jobs::JobState;
use drover_proto::workflows::{
    RunState, TaskDef, TaskState, WebhookEvent, WebhookPayload, WorkflowDef,
};
use drover_store::jobs::NewJob;
use drover_store::workflows::{NewDelivery, RunRecord, TaskRecord};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::template::{self, Scope};
use crate::catalog::{render_argv, resolve_params};
use crate::hub::JobEvent;
use crate::routes::jobs::resolve_target;
use crate::state::AppState;

/// How often every run not yet ended is looked at.
const SWEEP: Duration = Duration::from_secs(1);
/// Longest per-attempt timeout a task may have (7 days), as for jobs.
const MAX_TIMEOUT_MS: u128 = 7 * 24 * 3600 * 1000;

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
    let mut jobs: HashSet<String> = HashSet::new();
    loop {
        let mut sweep = false;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => sweep = true,
            ev = rx.recv() => match ev {
                Ok(ev) => note(ev, &mut dirty, &mut jobs),
                Err(RecvError::Lagged(_)) => sweep = true,
                Err(RecvError::Closed) => return,
            },
        }
        // Take whatever else is already there in the same round.
        loop {
            match rx.try_recv() {
                Ok(ev) => note(ev, &mut dirty, &mut jobs),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => sweep = true,
                Err(_) => break,
            }
        }
        for job in jobs.drain() {
            match state.store.run_of_job(&job).await {
                Ok(Some(run)) => {
                    dirty.insert(run);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(job = %job, error = %e, "looking up a job's run failed"),
            }
        }
        if sweep {
            match state.store.active_runs().await {
                Ok(runs) => dirty.extend(runs),
                Err(e) => tracing::warn!(error = %e, "listing active runs failed"),
            }
        }
        for run in dirty.drain() {
            if let Err(e) = engine.advance(&run).await {
                tracing::warn!(run = %run, error = %e, "advancing a run failed; will retry");
            }
        }
    }
}

fn note(ev: JobEvent, dirty: &mut HashSet<String>, jobs: &mut HashSet<String>) {
    match ev {
        JobEvent::Changed(job) => {
            jobs.insert(job);
        }
        JobEvent::RunChanged(run) => {
            dirty.insert(run);
        }
        JobEvent::Log(_) | JobEvent::RunEvent(_) => {}
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

/// Actions and targets looked up once per pass over a run: the tasks of a
/// layer usually share them.
#[derive(Default)]
struct StartCache {
    actions: HashMap<String, Result<(drover_proto::jobs::ActionSpec, String), String>>,
    targets: HashMap<String, Result<Vec<String>, String>>,
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
    async fn advance(&self, run_id: &str) -> Result<(), EngineError> {
        let store = &self.state.store;
        let Some(run) = store.run(run_id).await? else {
            return Ok(());
        };
        if run.state.is_final() {
            return Ok(());
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
            for t in tasks.values_mut() {
                if t.state.is_final() {
                    continue;
                }
                match &t.job_id {
                    Some(job_id) => {
                        let agents = store.cancel_job(job_id, &why, Utc::now()).await?;
                        for agent in &agents {
                            self.state.hub.wake(agent);
                        }
                        self.state.hub.job_changed(job_id);
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
            if tasks.values().all(|t| t.state.is_final()) {
                changed |= self.finish(&run, &def, &tasks, end, Some(why)).await?;
            }
            if changed {
                self.state.hub.run_event(run_id);
            }
            return Ok(());
        }

        // 3. Start (or skip) every pending task whose needs have ended,
        //    until nothing more moves.
        let mut cache = StartCache::default();
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
                let now = Utc::now();
                let new_state = if !blocking.is_empty() {
                    let why = format!("needs {}", blocking.join(", "));
                    store
                        .set_task_state(run_id, &task.id, TaskState::Skipped, Some(&why), None, now)
                        .await?;
                    TaskState::Skipped
                } else {
                    match self.start(&run, task, &tasks, &mut cache).await? {
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
            let (end, why) = if failed.is_empty() {
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
        if changed {
            self.state.hub.run_event(run_id);
        }
        Ok(())
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

    /// Renders a task's parameters and creates its job. The outer error is
    /// the store's; the inner one says why the task cannot run at all.
    async fn start(
        &self,
        run: &RunRecord,
        task: &TaskDef,
        tasks: &HashMap<String, TaskRecord>,
        cache: &mut StartCache,
    ) -> Result<Result<(), String>, EngineError> {
        let state = &self.state;
        if !cache.actions.contains_key(&task.action) {
            let found = match crate::routes::actions::find(state, &task.action).await {
                Ok(Some(found)) => Ok(found),
                Ok(None) => Err(format!("unknown action '{}'", task.action)),
                Err(e) => Err(e.message),
            };
            cache.actions.insert(task.action.clone(), found);
        }
        let (spec, hash) = match &cache.actions[&task.action] {
            Ok(found) => found.clone(),
            Err(e) => return Ok(Err(e.clone())),
        };
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
        let values = match resolve_params(&spec, &params) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let argv = match render_argv(&spec, &values) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        if !cache.targets.contains_key(&task.target) {
            let agents = resolve_target(state, &task.target)
                .await
                .map_err(|e| e.message);
            cache.targets.insert(task.target.clone(), agents);
        }
        let agents = match &cache.targets[&task.target] {
            Ok(a) => a.clone(),
            Err(e) => return Ok(Err(e.clone())),
        };
        let timeout = task.timeout.unwrap_or(spec.timeout);
        if timeout.as_millis() == 0 || timeout.as_millis() > MAX_TIMEOUT_MS {
            return Ok(Err(format!(
                "timeout {} is out of range",
                humantime::format_duration(timeout)
            )));
        }
        let mut retry = spec.retries.clone();
        if let Some(n) = task.retries {
            retry.max = n.min(100);
        }
        let params_json = serde_json::to_string(&params).unwrap_or_else(|_| "{}".into());
        let created = state
            .store
            .start_task(
                &run.id,
                &task.id,
                NewJob {
                    action: &spec.name,
                    action_hash: &hash,
                    target: &task.target,
                    params_json: &params_json,
                    argv: &argv,
                    env: &spec.env,
                    timeout_ms: timeout.as_millis() as i64,
                    kill_grace_ms: spec.kill_grace.as_millis() as i64,
                    retry: &retry,
                    created_by: &run.created_by,
                    agent_ids: &agents,
                    artifacts: &task.artifacts,
                },
                Utc::now(),
            )
            .await?;
        if let Some(job_id) = created {
            tracing::debug!(run = %run.id, task = %task.id, job = %job_id, "task started");
            for agent in &agents {
                state.hub.wake(agent);
            }
            state.hub.job_changed(&job_id);
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
        let ended = self
            .state
            .store
            .finish_run(&run.id, end, why.as_deref(), &deliveries, now)
            .await?;
        if ended {
            tracing::info!(run = %run.id, workflow = %run.name, state = end.as_str(), "run ended");
            if !deliveries.is_empty() {
                self.state.hub.deliveries_queued();
            }
        }
        Ok(ended)
    }
}
