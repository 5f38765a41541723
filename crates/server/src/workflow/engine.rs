//! The workflow engine: moves runs forward. It reacts to the runs commits
//! name (a task's job changed state, a run was submitted or asked to
//! stop), and sweeps every run not yet ended once a second, which is also
//! how runs resume after a restart or a crash.
//!
//! Key design decision: decide in a pure function, apply in one
//! transaction. A pass gathers a run's facts, asks `plan::plan` for the
//! due steps, applies them through the store's `Tx`, folds their effect
//! into the facts and plans again until nothing is due — then commits
//! once. Every step is guarded by the state it leaves, so a pass replayed
//! after a crash, or run by two servers at once, changes nothing twice. A
//! task's job is created in the transaction that starts the task; a job's
//! attempts keep their own at-least-once retries, and the task takes the
//! job's final state once. A task's state before then is its job's,
//! derived when read (`plan::live_state`), never written by the engine.
//!
//! A run with a workspace first picks the agent that holds it and creates
//! it there (a built-in job, `workspace::WorkspaceJob`); its tasks start
//! once it is ready, all on that agent. The run ends once every task has,
//! and never while the workspace is still being created; its end queues
//! the job that removes the workspace (unless `keep_workspace`), in the
//! same transaction, and the run is swept until that job has ended.

use std::collections::{BTreeMap, HashMap};
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
use drover_store::Tx;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::plan::{self, Facts, JobFacts, Step, TaskFacts, WorkspaceFacts};
use super::template::{self, Scope};
use super::workspace::{self, Step as WsStep, WorkspaceJob};
use crate::access::Limits;
use crate::domain;
use crate::hub::JobEvent;
use crate::state::AppState;

/// How often the engine looks for due runs without being woken (run
/// deadlines and expired claims are noticed this way).
const TICK: Duration = Duration::from_secs(1);
/// How long a claimed run is this engine's: past it (the engine died
/// mid-pass, or the pass failed), any engine claims it again.
const CLAIM_LEASE: Duration = Duration::from_secs(30);
/// Most runs claimed at once.
const CLAIM_BATCH: i64 = 64;
/// The slow safety sweep: a run not yet done is looked at again at least
/// this often, even if nothing marked it due.
const SAFETY_LOOK: Duration = Duration::from_secs(60);

pub use super::plan::mirror;

/// Runs the engine until `shutdown`: claims the runs whose look is due
/// (woken by commits that mark runs due, and at least every `TICK`), and
/// advances each.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let engine = Engine::new(state.clone());
    let mut rx = state.hub.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            ev = rx.recv() => match ev {
                Ok(JobEvent::RunChanged(_) | JobEvent::Everything) | Err(RecvError::Lagged(_)) => {}
                Ok(_) => continue,
                Err(RecvError::Closed) => return,
            },
        }
        // Whatever else is already there is covered by this round.
        while rx.try_recv().is_ok() {}
        loop {
            let now = Utc::now();
            let lease = now + chrono::Duration::from_std(CLAIM_LEASE).unwrap_or_default();
            let due = match state.store.claim_due_runs(now, lease, CLAIM_BATCH).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming due runs failed; will retry");
                    break;
                }
            };
            if due.is_empty() {
                break;
            }
            for run in &due {
                match engine.advance(run, lease).await {
                    Ok(moved) => tracing::trace!(run = %run, moved, "run looked at"),
                    // The claim runs out and the run is looked at again.
                    Err(e) => {
                        tracing::warn!(run = %run, error = %e, "advancing a run failed; will retry")
                    }
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
    }
}

/// Why a step of the engine failed (it is retried at the next sweep).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] drover_store::Error),
    #[error("stored definition {0} is unreadable: {1}")]
    Definition(String, String),
    #[error("sealing a webhook secret: {0}")]
    Vault(String),
}

/// Most waves of plan-and-apply in one pass; each wave changes something,
/// so a run of N tasks needs at most about N of them.
const MAX_WAVES: usize = 1_000;
/// Most definitions kept in memory (they are small and immutable; the
/// cache is emptied when full).
const MAX_CACHED_DEFS: usize = 256;

/// The workspace of a run whose tasks may start: where and what.
struct ReadyWorkspace {
    agent: String,
    spec: WorkspaceSpec,
}

struct Engine {
    state: AppState,
    defs: std::sync::Mutex<HashMap<String, Arc<WorkflowDef>>>,
}

/// Where a workspace goes when the job of one of its steps ends.
struct WorkspaceStep {
    from: WorkspaceState,
    ok: WorkspaceState,
    ok_reason: String,
    failed: WorkspaceState,
}

impl Engine {
    fn new(state: AppState) -> Engine {
        Engine {
            state,
            defs: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A stored definition by hash, from a bounded cache.
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
        let mut defs = self.defs.lock().unwrap_or_else(|p| p.into_inner());
        if defs.len() >= MAX_CACHED_DEFS {
            defs.clear();
        }
        defs.insert(hash.to_owned(), def.clone());
        Ok(def)
    }

    /// Looks at one run: gathers its facts, then plans and applies the
    /// due steps, wave after wave, in one transaction. True when
    /// something changed.
    async fn advance(
        &self,
        run_id: &str,
        claimed: chrono::DateTime<Utc>,
    ) -> Result<bool, EngineError> {
        let store = &self.state.store;
        let Some(run) = store.run(run_id).await? else {
            return Ok(false);
        };
        let safety = Utc::now() + chrono::Duration::from_std(SAFETY_LOOK).unwrap_or_default();
        if run.state == RunState::AwaitingApproval {
            // Nothing starts before approval; the decision marks it due.
            let mut tx = store.begin().await?;
            tx.set_next_check(run_id, None, claimed).await?;
            tx.commit().await?;
            return Ok(false);
        }
        if run.state.is_final() {
            // Only the removal of its workspace can still be under way.
            let mut tx = store.begin().await?;
            let mut moved = false;
            let mut next = None;
            if run.workspace_state == Some(WorkspaceState::Removing) {
                moved = self.settle_removal(&mut tx, &run).await?;
                next = (!moved).then_some(safety);
            }
            tx.set_next_check(run_id, next, claimed).await?;
            tx.commit().await?;
            return Ok(moved);
        }
        let def = self.definition(&run.def_hash).await?;
        let records: HashMap<String, TaskRecord> = store
            .run_tasks(run_id)
            .await?
            .into_iter()
            .map(|t| (t.task_id.clone(), t))
            .collect();
        let mut outputs: BTreeMap<String, BTreeMap<String, String>> = records
            .iter()
            .filter(|(_, t)| t.state == TaskState::Succeeded)
            .map(|(id, t)| (id.clone(), t.outputs.clone()))
            .collect();
        let (workspace, mut ready) = self.workspace_facts(&run).await?;
        let mut facts = Facts {
            def: &def,
            tasks: records
                .iter()
                .map(|(id, t)| {
                    let job = match (&t.job_id, t.job_state) {
                        (Some(id), Some(state)) => Some(JobFacts {
                            id: id.clone(),
                            state,
                            cancel_requested: t.job_cancel_requested,
                        }),
                        _ => None,
                    };
                    (
                        id.clone(),
                        TaskFacts {
                            state: t.state,
                            job,
                        },
                    )
                })
                .collect(),
            workspace,
            cancel_requested_at: run.cancel_requested_at,
            deadline_at: run.deadline_at,
            now: Utc::now(),
        };

        let mut tx = store.begin().await?;
        let mut jobs = domain::Jobs::new(store);
        let mut moved = false;
        let mut finished = false;
        'waves: for _ in 0..MAX_WAVES {
            let steps = plan::plan(&facts);
            if steps.is_empty() {
                break;
            }
            let now = Utc::now();
            for step in steps {
                moved = true;
                match step {
                    Step::EndTask { task, job, state } => {
                        let js = facts
                            .tasks
                            .get(&task)
                            .and_then(|t| t.job.as_ref())
                            .map_or(JobState::Failed, |j| j.state);
                        let (reason, outs) = if state == TaskState::Succeeded {
                            (None, store.job_outputs(&job).await?)
                        } else {
                            (self.job_outcome(&job, js).await?, BTreeMap::new())
                        };
                        tx.set_task_state(
                            run_id,
                            &task,
                            state,
                            reason.as_deref(),
                            Some(&outs),
                            now,
                        )
                        .await?;
                        if state == TaskState::Succeeded {
                            outputs.insert(task.clone(), outs);
                        }
                        set_task(&mut facts, &task, state);
                    }
                    Step::Skip { task, reason } => {
                        tx.set_task_state(
                            run_id,
                            &task,
                            TaskState::Skipped,
                            Some(&reason),
                            None,
                            now,
                        )
                        .await?;
                        set_task(&mut facts, &task, TaskState::Skipped);
                    }
                    Step::Start { task } => {
                        let Some(def_task) = def.tasks.iter().find(|t| t.id == task) else {
                            continue;
                        };
                        match self
                            .start(
                                &mut tx,
                                &run,
                                def_task,
                                &outputs,
                                ready.as_ref().zip(def.workspace.as_ref()),
                                &mut jobs,
                            )
                            .await?
                        {
                            Ok(job) => {
                                if let Some(t) = facts.tasks.get_mut(&task) {
                                    t.state = TaskState::Queued;
                                    t.job = job.map(|id| JobFacts {
                                        id,
                                        state: JobState::Queued,
                                        cancel_requested: false,
                                    });
                                }
                            }
                            Err(why) => {
                                tracing::info!(run = %run_id, task = %task, reason = %why, "task cannot start");
                                tx.set_task_state(
                                    run_id,
                                    &task,
                                    TaskState::Failed,
                                    Some(&why),
                                    None,
                                    now,
                                )
                                .await?;
                                set_task(&mut facts, &task, TaskState::Failed);
                            }
                        }
                    }
                    Step::CancelJob { job, reason } => {
                        tx.cancel_job(&job, &reason, now).await?;
                        mark_cancelled(&mut facts, &job);
                    }
                    Step::CreateWorkspace => {
                        facts.workspace = self.create_workspace(&mut tx, &run, &def).await?;
                    }
                    Step::WorkspaceCreated { job, ok } => {
                        let agent = run.workspace_agent.as_deref().unwrap_or("?");
                        let done = WorkspaceStep {
                            from: WorkspaceState::Creating,
                            ok: WorkspaceState::Ready,
                            ok_reason: format!("on agent {agent}"),
                            failed: WorkspaceState::Failed,
                        };
                        let state = if ok {
                            JobState::Succeeded
                        } else {
                            JobState::Failed
                        };
                        let why = self
                            .settle_workspace_job(&mut tx, &run, &job, state, done)
                            .await?;
                        facts.workspace = match why {
                            None => match self.ready_workspace(&run).await? {
                                Some(r) => {
                                    ready = Some(r);
                                    WorkspaceFacts::Ready
                                }
                                None => WorkspaceFacts::Failed(
                                    "the workspace's job or agent is missing".to_owned(),
                                ),
                            },
                            Some(why) => WorkspaceFacts::Failed(why),
                        };
                    }
                    Step::Finish { state, reason } => {
                        let tasks: BTreeMap<String, TaskState> = facts
                            .tasks
                            .iter()
                            .map(|(k, t)| (k.clone(), t.state))
                            .collect();
                        self.finish(&mut tx, &run, &def, &tasks, state, reason)
                            .await?;
                        finished = true;
                        break 'waves;
                    }
                }
            }
        }
        // The next look: when its deadline comes, and at least at the
        // safety sweep; an ended run removing its workspace is looked at
        // when that job ends (its commit marks the run due).
        let next = if finished {
            (def.workspace.is_some() && !def.keep_workspace).then_some(safety)
        } else {
            Some(run.deadline_at.map_or(safety, |d| d.min(safety)))
        };
        tx.set_next_check(run_id, next, claimed).await?;
        tx.commit().await?;
        Ok(moved)
    }

    /// Where the run's workspace stands, read once per pass, and where
    /// its tasks go when it is ready.
    async fn workspace_facts(
        &self,
        run: &RunRecord,
    ) -> Result<(WorkspaceFacts, Option<ReadyWorkspace>), EngineError> {
        let Some(ws) = run.workspace_state else {
            return Ok((WorkspaceFacts::None, None));
        };
        Ok(match ws {
            WorkspaceState::Pending => (WorkspaceFacts::Pending, None),
            WorkspaceState::Creating => {
                let job = match &run.workspace_job {
                    Some(id) => self.state.store.job(id).await?,
                    None => None,
                };
                match job {
                    Some(j) => (
                        WorkspaceFacts::Creating(JobFacts {
                            id: j.id,
                            state: j.state,
                            cancel_requested: j.cancel_requested_at.is_some(),
                        }),
                        None,
                    ),
                    None => (
                        WorkspaceFacts::Failed("the workspace's job is missing".to_owned()),
                        None,
                    ),
                }
            }
            WorkspaceState::Ready => match self.ready_workspace(run).await? {
                Some(r) => (WorkspaceFacts::Ready, Some(r)),
                None => (
                    WorkspaceFacts::Failed("the workspace's job or agent is missing".to_owned()),
                    None,
                ),
            },
            _ => (
                WorkspaceFacts::Failed(
                    run.workspace_reason
                        .clone()
                        .unwrap_or_else(|| "it could not be created".to_owned()),
                ),
                None,
            ),
        })
    }

    /// The agent and spec of a created workspace (the spec is stored with
    /// the job that created it).
    async fn ready_workspace(
        &self,
        run: &RunRecord,
    ) -> Result<Option<ReadyWorkspace>, EngineError> {
        let spec = match &run.workspace_job {
            Some(job) => self.state.store.job(job).await?.and_then(|j| j.workspace),
            None => None,
        };
        Ok(match (spec, &run.workspace_agent) {
            (Some(spec), Some(agent)) => Some(ReadyWorkspace {
                agent: agent.clone(),
                spec,
            }),
            _ => None,
        })
    }

    /// Picks the agent that will hold the workspace and creates the job
    /// that makes it; or notes why it waits, or why it cannot be.
    async fn create_workspace(
        &self,
        tx: &mut Tx,
        run: &RunRecord,
        def: &WorkflowDef,
    ) -> Result<WorkspaceFacts, EngineError> {
        let store = &self.state.store;
        let Some(ws_def) = &def.workspace else {
            return Ok(WorkspaceFacts::None);
        };
        let now = Utc::now();
        let profile = match workspace::profile(&self.state, def).await {
            Ok(Ok(p)) => p,
            Ok(Err(why)) => return self.workspace_failed(tx, run, why).await,
            Err(e) => return self.workspace_failed(tx, run, e.message).await,
        };
        let candidates = match self.candidates(&ws_def.target).await? {
            Ok(c) => c,
            Err(why) => return self.workspace_failed(tx, run, why).await,
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
                    Err(why) => return self.workspace_failed(tx, run, why).await,
                };
                let job = WorkspaceJob::new(WsStep::Create, &agent, spec);
                match tx
                    .start_workspace(&run.id, &agent, &job.new_job(&run.created_by), now)
                    .await?
                {
                    Some(job_id) => {
                        tracing::info!(run = %run.id, agent = %agent, job = %job_id, sandbox = %profile.name(), "creating the workspace");
                        Ok(WorkspaceFacts::Creating(JobFacts {
                            id: job_id,
                            state: JobState::Queued,
                            cancel_requested: false,
                        }))
                    }
                    None => Ok(WorkspaceFacts::Waiting),
                }
            }
            Ok(None) => {
                let why = format!(
                    "waiting for an online agent of '{}' to hold the workspace",
                    ws_def.target
                );
                tx.set_workspace_state(
                    &run.id,
                    &[WorkspaceState::Pending],
                    WorkspaceState::Pending,
                    Some(&why),
                    now,
                )
                .await?;
                Ok(WorkspaceFacts::Waiting)
            }
            Err(why) => self.workspace_failed(tx, run, why).await,
        }
    }

    /// The agents a workspace target names (revoked ones left out of a
    /// selector's).
    async fn candidates(
        &self,
        target: &str,
    ) -> Result<Result<Vec<drover_store::AgentRecord>, String>, EngineError> {
        match domain::matching_agents(&self.state.store, target).await {
            Ok(agents) => Ok(Ok(agents)),
            Err(domain::Error::Store(e)) => Err(e.into()),
            Err(e) => Ok(Err(format!("workspace: {e}"))),
        }
    }

    async fn workspace_failed(
        &self,
        tx: &mut Tx,
        run: &RunRecord,
        why: String,
    ) -> Result<WorkspaceFacts, EngineError> {
        tracing::info!(run = %run.id, reason = %why, "the workspace cannot be created");
        tx.set_workspace_state(
            &run.id,
            &[WorkspaceState::Pending, WorkspaceState::Creating],
            WorkspaceState::Failed,
            Some(&why),
            Utc::now(),
        )
        .await?;
        Ok(WorkspaceFacts::Failed(why))
    }

    /// Notes the end of the job removing an ended run's workspace. True
    /// when it changed.
    async fn settle_removal(&self, tx: &mut Tx, run: &RunRecord) -> Result<bool, EngineError> {
        let Some(job_id) = run.workspace_remove_job.as_deref() else {
            return Ok(false);
        };
        let Some(job) = self.state.store.job(job_id).await? else {
            return Ok(false);
        };
        if !job.state.is_final() {
            return Ok(false);
        }
        let done = WorkspaceStep {
            from: WorkspaceState::Removing,
            ok: WorkspaceState::Removed,
            ok_reason: format!("removed by job {job_id}"),
            failed: WorkspaceState::RemoveFailed,
        };
        self.settle_workspace_job(tx, run, job_id, job.state, done)
            .await?;
        Ok(true)
    }

    /// Moves the workspace on once its job has ended: to `done.ok` when it
    /// succeeded, else to `done.failed` with the job's outcome, which it
    /// returns.
    async fn settle_workspace_job(
        &self,
        tx: &mut Tx,
        run: &RunRecord,
        job_id: &str,
        state: JobState,
        done: WorkspaceStep,
    ) -> Result<Option<String>, EngineError> {
        let (to, why, failure) = if state == JobState::Succeeded {
            (done.ok, Some(done.ok_reason), None)
        } else {
            let js = self
                .state
                .store
                .job(job_id)
                .await?
                .map_or(state, |j| j.state);
            let why = self
                .job_outcome(job_id, js)
                .await?
                .unwrap_or_else(|| format!("job {job_id} {}", js.as_str()));
            (done.failed, Some(why.clone()), Some(why))
        };
        tracing::info!(run = %run.id, job = %job_id, state = to.as_str(), "workspace job ended");
        tx.set_workspace_state(&run.id, &[done.from], to, why.as_deref(), Utc::now())
            .await?;
        Ok(failure)
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
    /// the pass's transaction, with the task marked started. An `Err`
    /// inside is the task's failure, meant for the operator; `Ok(None)`
    /// when it had started before.
    async fn start(
        &self,
        tx: &mut Tx,
        run: &RunRecord,
        task: &TaskDef,
        outputs: &BTreeMap<String, BTreeMap<String, String>>,
        ws: Option<(&ReadyWorkspace, &drover_proto::workflows::WorkspaceDef)>,
        jobs: &mut domain::Jobs<'_>,
    ) -> Result<Result<Option<String>, String>, EngineError> {
        let scope = Scope {
            run_id: &run.id,
            inputs: &run.inputs,
            outputs,
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
            Some((ReadyWorkspace { agent, spec }, _)) => {
                domain::Placement::Workspace { agent, spec }
            }
            None => domain::Placement::Target(&task.target),
        };
        // The workspace's variables, rendered from the run's inputs.
        let mut env = BTreeMap::new();
        if let Some((_, ws_def)) = ws {
            for (name, value) in &ws_def.env {
                match template::render(value, &scope) {
                    Ok(v) => {
                        env.insert(name.clone(), v);
                    }
                    Err(e) => return Ok(Err(format!("workspace env.{name}: {e}"))),
                }
            }
        }
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
                env: &env,
                limits: &Limits::from_json(run.scope.as_deref()),
            })
            .await;
        let job = match built {
            Ok(job) => job,
            Err(domain::Error::Store(e)) => return Err(e.into()),
            Err(e) => return Ok(Err(e.to_string())),
        };
        // A task touching something protected waits for approval, unless
        // its run was approved as a whole (the approvers saw the
        // definition and inputs).
        let request = if run.approved_hash.is_none() {
            crate::approvals::request_for_job(
                &self.state.store,
                &job,
                &run.created_by,
                self.state.config.approval_ttl,
            )
            .await?
        } else {
            None
        };
        let approval = request.as_ref().map(|r| r.as_new());
        let mut new_job = job.new_job(&run.created_by);
        new_job.approval = approval.as_ref();
        let created = tx
            .start_task(&run.id, &task.id, &new_job, Utc::now())
            .await?;
        if let Some(job_id) = &created {
            tracing::debug!(run = %run.id, task = %task.id, job = %job_id, "task started");
        }
        Ok(Ok(created))
    }

    /// Ends the run, queues its webhooks and settles its workspace, in
    /// the pass's transaction.
    async fn finish(
        &self,
        tx: &mut Tx,
        run: &RunRecord,
        def: &WorkflowDef,
        task_states: &BTreeMap<String, TaskState>,
        end: RunState,
        why: Option<String>,
    ) -> Result<bool, EngineError> {
        let now = Utc::now();
        let event = WebhookEvent::of(end);
        // A delivery keeps its secret sealed, as global webhooks do.
        let mut hooks: Vec<(String, Option<String>)> = Vec::new();
        for h in def.webhooks.iter().filter(|h| h.events.contains(&event)) {
            let sealed = match &h.secret {
                Some(s) => Some(
                    self.state
                        .vault
                        .seal_webhook_secret(s)
                        .map_err(|e| EngineError::Vault(e.to_string()))?,
                ),
                None => None,
            };
            hooks.push((h.url.clone(), sealed));
        }
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
        // The workspace goes with the run, unless it is to be kept. Its
        // state is read again: this pass may have moved it.
        let current = self.state.store.run(&run.id).await?;
        let run_now = current.as_ref().unwrap_or(run);
        let remove = match (
            run_now.workspace_state,
            &run_now.workspace_job,
            &run_now.workspace_agent,
        ) {
            (Some(_), Some(job), Some(agent)) if !def.keep_workspace => self
                .state
                .store
                .job(job)
                .await?
                .and_then(|j| j.workspace)
                .map(|spec| WorkspaceJob::new(WsStep::Remove, agent, spec)),
            _ => None,
        };
        let workspace = match (run_now.workspace_state, &run_now.workspace_job, &remove) {
            (None, _, _) => WorkspaceEnd::None,
            (Some(_), None, _) => WorkspaceEnd::NeverCreated,
            (Some(_), Some(_), Some(job)) => WorkspaceEnd::Remove(job.new_job(&run.created_by)),
            (Some(_), Some(_), None) => WorkspaceEnd::Keep,
        };
        let ended = tx
            .finish_run(&run.id, end, why.as_deref(), &deliveries, &workspace, now)
            .await?;
        if ended {
            tracing::info!(run = %run.id, workflow = %run.name, state = end.as_str(), "run ended");
        }
        Ok(ended)
    }
}

fn set_task(facts: &mut Facts<'_>, task: &str, state: TaskState) {
    if let Some(t) = facts.tasks.get_mut(task) {
        t.state = state;
    }
}

fn mark_cancelled(facts: &mut Facts<'_>, job: &str) {
    for t in facts.tasks.values_mut() {
        if let Some(j) = t.job.as_mut().filter(|j| j.id == job) {
            j.cancel_requested = true;
        }
    }
    if let WorkspaceFacts::Creating(j) = &mut facts.workspace {
        if j.id == job {
            j.cancel_requested = true;
        }
    }
}
