//! Workflow runs: definitions by hash, runs and their tasks, each run's
//! event stream, artifacts, webhooks and their deliveries.
//!
//! Key design decision: every transition is one transaction guarded by the
//! state it leaves (`WHERE state = 'pending'`, `WHERE state = 'running'`),
//! so replaying a step after a crash, or two servers racing, changes
//! nothing twice. A task's job is inserted in the transaction that marks the
//! task started, so a task has at most one job. Each event takes the next
//! number of its run by bumping `workflow_runs.event_seq` in the same
//! transaction: the numbers have no gaps and are committed in order, so a
//! reader resuming after number N misses nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use drover_proto::workflows::{
    DeliveryAttempt, RunEvent, RunState, TaskState, WebhookEvent, WorkspaceState,
};

use crate::jobs::{in_json, to_json, NewJob};
use crate::tx::on_tx;
use crate::{from_ms, new_id, on_pool, to_ms, Error, Result, Store, Tx};

fn corrupt(what: &'static str) -> impl Fn(String) -> Error {
    move |detail| Error::Corrupt { what, detail }
}

/// A run to create.
#[derive(Debug, Clone)]
pub struct NewRun<'a> {
    pub name: &'a str,
    pub def_hash: &'a str,
    pub def_body: &'a str,
    pub inputs: &'a BTreeMap<String, String>,
    pub created_by: &'a str,
    pub deadline: Option<DateTime<Utc>>,
    /// Task ids in definition order.
    pub tasks: &'a [String],
    /// The definition asks for a workspace (created before the first task).
    pub workspace: bool,
    /// The submitter's scopes (JSON, the server's to read); `None`: none.
    pub scope: Option<&'a str>,
    /// Set when it needs approval: it is stored waiting, with this request.
    pub approval: Option<&'a crate::approvals::NewApproval<'a>>,
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: String,
    pub name: String,
    pub def_hash: String,
    pub state: RunState,
    pub reason: Option<String>,
    pub inputs: BTreeMap<String, String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// `None` when the run has no workspace.
    pub workspace_state: Option<WorkspaceState>,
    pub workspace_agent: Option<String>,
    pub workspace_reason: Option<String>,
    /// The jobs that create and remove the workspace.
    pub workspace_job: Option<String>,
    pub workspace_remove_job: Option<String>,
    /// The submitter's scopes (JSON); its tasks' jobs stay inside them.
    pub scope: Option<String>,
    /// The spec hash its approval holds for (protected runs only).
    pub approved_hash: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RunRow {
    id: String,
    name: String,
    def_hash: String,
    state: String,
    reason: Option<String>,
    inputs: String,
    created_by: String,
    created_at: i64,
    finished_at: Option<i64>,
    deadline_at: Option<i64>,
    cancel_requested_at: Option<i64>,
    workspace_state: Option<String>,
    workspace_agent: Option<String>,
    workspace_reason: Option<String>,
    workspace_job: Option<String>,
    workspace_remove_job: Option<String>,
    scope: Option<String>,
    approved_hash: Option<String>,
}

const RUN_COLUMNS: &str = "id, name, def_hash, state, reason, inputs, created_by, created_at, \
                           finished_at, deadline_at, cancel_requested_at, workspace_state, workspace_agent, \
                           workspace_reason, workspace_job, workspace_remove_job, scope, approved_hash";

impl TryFrom<RunRow> for RunRecord {
    type Error = Error;
    fn try_from(r: RunRow) -> Result<RunRecord> {
        let workspace_state = match r.workspace_state.as_deref() {
            Some(w) => Some(
                WorkspaceState::parse(w).ok_or_else(|| corrupt("workspace state")(w.to_owned()))?,
            ),
            None => None,
        };
        Ok(RunRecord {
            workspace_state,
            workspace_agent: r.workspace_agent,
            workspace_reason: r.workspace_reason,
            workspace_job: r.workspace_job,
            workspace_remove_job: r.workspace_remove_job,
            scope: r.scope,
            approved_hash: r.approved_hash,
            state: RunState::parse(&r.state)
                .ok_or_else(|| corrupt("run state")(r.state.clone()))?,
            inputs: serde_json::from_str(&r.inputs)
                .map_err(|e| corrupt("run inputs")(e.to_string()))?,
            id: r.id,
            name: r.name,
            def_hash: r.def_hash,
            reason: r.reason,
            created_by: r.created_by,
            created_at: from_ms(r.created_at),
            finished_at: r.finished_at.map(from_ms),
            deadline_at: r.deadline_at.map(from_ms),
            cancel_requested_at: r.cancel_requested_at.map(from_ms),
        })
    }
}

/// Which runs [`Store::page_runs`] shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunFilter<'a> {
    pub state: Option<RunState>,
    /// The workflow's name, exactly.
    pub name: Option<&'a str>,
}

/// A run in a list, with how many of its tasks have ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run: RunRecord,
    pub tasks_total: i64,
    /// Tasks in a final state (succeeded, failed, timed out, cancelled,
    /// skipped).
    pub tasks_done: i64,
}

#[derive(sqlx::FromRow)]
struct RunSummaryRow {
    #[sqlx(flatten)]
    run: RunRow,
    tasks_total: i64,
    tasks_done: i64,
}

/// A task of a run, with the state of its job when it has one.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub task_id: String,
    pub position: i64,
    pub state: TaskState,
    pub reason: Option<String>,
    pub job_id: Option<String>,
    /// The job's state, read in the same query.
    pub job_state: Option<drover_proto::jobs::JobState>,
    /// A cancel was asked for the task's job.
    pub job_cancel_requested: bool,
    pub outputs: BTreeMap<String, String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct TaskRow {
    task_id: String,
    position: i64,
    state: String,
    reason: Option<String>,
    job_id: Option<String>,
    job_state: Option<String>,
    job_cancel_requested_at: Option<i64>,
    outputs: String,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

impl TryFrom<TaskRow> for TaskRecord {
    type Error = Error;
    fn try_from(r: TaskRow) -> Result<TaskRecord> {
        let job_state = match r.job_state.as_deref() {
            Some(s) => Some(
                drover_proto::jobs::JobState::parse(s)
                    .ok_or_else(|| corrupt("job state")(s.to_owned()))?,
            ),
            None => None,
        };
        Ok(TaskRecord {
            state: TaskState::parse(&r.state)
                .ok_or_else(|| corrupt("task state")(r.state.clone()))?,
            outputs: serde_json::from_str(&r.outputs)
                .map_err(|e| corrupt("task outputs")(e.to_string()))?,
            job_state,
            job_cancel_requested: r.job_cancel_requested_at.is_some(),
            task_id: r.task_id,
            position: r.position,
            reason: r.reason,
            job_id: r.job_id,
            started_at: r.started_at.map(from_ms),
            finished_at: r.finished_at.map(from_ms),
        })
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    run_id: String,
    at: i64,
    kind: String,
    task_id: Option<String>,
    state: Option<String>,
    message: Option<String>,
    stream: Option<String>,
}

impl From<EventRow> for RunEvent {
    fn from(r: EventRow) -> RunEvent {
        RunEvent {
            id: r.seq,
            run_id: r.run_id,
            at: from_ms(r.at),
            kind: r.kind,
            task: r.task_id,
            state: r.state,
            message: r.message,
            stream: r.stream,
        }
    }
}

/// A collected file as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArtifactRecord {
    pub id: String,
    pub run_id: Option<String>,
    pub task_id: Option<String>,
    pub job_id: String,
    pub attempt_id: String,
    pub path: String,
    pub size: i64,
    pub sha256: String,
    pub store_key: String,
    pub created_at: i64,
}

/// What an upload for an attempt may do.
#[derive(Debug, Clone)]
pub struct UploadContext {
    pub job_id: String,
    pub run_id: Option<String>,
    pub task_id: Option<String>,
    /// The paths the job declared.
    pub artifacts: Vec<String>,
    /// The attempt has no result yet.
    pub open: bool,
}

/// A webhook notification to queue when a run ends.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub url: String,
    pub secret: Option<String>,
    pub event: WebhookEvent,
    /// Builds the body from the delivery id.
    pub payload: String,
    pub id: String,
}

/// A global webhook as stored (with its secret, for signing).
#[derive(Debug, Clone)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub secret: String,
    pub events: Vec<WebhookEvent>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// A delivery as stored.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub id: String,
    pub run_id: String,
    pub url: String,
    pub secret: Option<String>,
    pub event: WebhookEvent,
    pub payload: String,
    pub state: String,
    pub attempts: i64,
    pub next_at: Option<DateTime<Utc>>,
    pub history: Vec<DeliveryAttempt>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: String,
    run_id: String,
    url: String,
    secret: Option<String>,
    event: String,
    payload: String,
    state: String,
    attempts: i64,
    next_at: Option<i64>,
    history: String,
    created_at: i64,
    delivered_at: Option<i64>,
}

const DELIVERY_COLUMNS: &str =
    "id, run_id, url, secret, event, payload, state, attempts, next_at, \
                                history, created_at, delivered_at";

fn parse_event(s: &str) -> Result<WebhookEvent> {
    match s {
        "completed" => Ok(WebhookEvent::Completed),
        "failed" => Ok(WebhookEvent::Failed),
        other => Err(corrupt("webhook event")(other.to_owned())),
    }
}

impl TryFrom<DeliveryRow> for DeliveryRecord {
    type Error = Error;
    fn try_from(r: DeliveryRow) -> Result<DeliveryRecord> {
        Ok(DeliveryRecord {
            event: parse_event(&r.event)?,
            history: serde_json::from_str(&r.history)
                .map_err(|e| corrupt("delivery history")(e.to_string()))?,
            id: r.id,
            run_id: r.run_id,
            url: r.url,
            secret: r.secret,
            payload: r.payload,
            state: r.state,
            attempts: r.attempts,
            next_at: r.next_at.map(from_ms),
            created_at: from_ms(r.created_at),
            delivered_at: r.delivered_at.map(from_ms),
        })
    }
}

/// What becomes of a run's workspace when the run ends.
#[derive(Debug, Clone)]
pub enum WorkspaceEnd<'a> {
    /// The run has none.
    None,
    /// It was never created: nothing to remove.
    NeverCreated,
    /// `keep_workspace`: it stays.
    Keep,
    /// Queue this job to remove it.
    Remove(NewJob<'a>),
}

/// How one delivery attempt went.
#[derive(Debug, Clone)]
pub enum DeliveryOutcome {
    Delivered,
    /// Try again at this time.
    RetryAt(DateTime<Utc>),
    /// No more tries.
    GaveUp,
}

const FINAL_TASK_STATES: &str = "('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')";

/// One event of a run's stream, to append.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub kind: &'a str,
    pub task: Option<&'a str>,
    pub state: Option<&'a str>,
    pub message: Option<&'a str>,
    pub stream: Option<&'a str>,
}

impl<'a> Event<'a> {
    pub(crate) fn new(kind: &'a str) -> Event<'a> {
        Event {
            kind,
            task: None,
            state: None,
            message: None,
            stream: None,
        }
    }
}

/// Domain steps of workflow runs. Each is guarded by the state it leaves,
/// so a replayed step changes nothing twice.
impl Tx {
    /// Appends one event to a run's stream; returns its number.
    pub async fn emit(&mut self, run_id: &str, ev: &Event<'_>, now: DateTime<Utc>) -> Result<i64> {
        let seq: i64 = on_tx!(self, c => sqlx::query_scalar(
            "UPDATE workflow_runs SET event_seq = event_seq + 1 WHERE id = $1 RETURNING event_seq",
        )
        .bind(run_id)
        .fetch_one(&mut *c)
        .await)?;
        on_tx!(self, c => sqlx::query(
            "INSERT INTO workflow_events (run_id, seq, at, kind, task_id, state, message, stream) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(run_id)
        .bind(seq)
        .bind(to_ms(now))
        .bind(ev.kind)
        .bind(ev.task)
        .bind(ev.state)
        .bind(ev.message)
        .bind(ev.stream)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        self.changes.run_events.insert(run_id.to_owned());
        Ok(seq)
    }

    /// Creates a run (storing its definition once per hash), its tasks as
    /// pending and its first event.
    pub async fn create_run(&mut self, run: &NewRun<'_>, now: DateTime<Utc>) -> Result<String> {
        let id = new_id();
        on_tx!(self, c => sqlx::query(
            "INSERT INTO workflow_defs (hash, name, body, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(run.def_hash)
        .bind(run.name)
        .bind(run.def_body)
        .bind(to_ms(now))
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        on_tx!(self, c => sqlx::query(
            "INSERT INTO workflow_runs (id, name, def_hash, state, inputs, created_by, created_at, deadline_at, \
             workspace_state, scope) VALUES ($1, $2, $3, $10, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&id)
        .bind(run.name)
        .bind(run.def_hash)
        .bind(to_json(run.inputs))
        .bind(run.created_by)
        .bind(to_ms(now))
        .bind(run.deadline.map(to_ms))
        .bind(run.workspace.then_some(WorkspaceState::Pending.as_str()))
        .bind(run.scope)
        .bind(if run.approval.is_some() { "awaiting_approval" } else { "running" })
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if !run.tasks.is_empty() {
            on_tx!(self, c => {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO workflow_tasks (run_id, task_id, position, state) ",
                );
                q.push_values(run.tasks.iter().enumerate(), |mut b, (position, task)| {
                    b.push_bind(&id)
                        .push_bind(task)
                        .push_bind(position as i64)
                        .push_bind("pending");
                });
                q.build().execute(&mut *c).await.map(|r| r.rows_affected())
            })?;
        }
        let ev = if run.approval.is_some() {
            Event {
                state: Some("awaiting_approval"),
                message: Some("submitted: waiting for approval"),
                ..Event::new("run")
            }
        } else {
            Event {
                state: Some("running"),
                message: Some("submitted"),
                ..Event::new("run")
            }
        };
        self.emit(&id, &ev, now).await?;
        if let Some(approval) = run.approval {
            self.request_approval(None, Some(&id), approval, now)
                .await?;
        } else {
            self.changes.runs.insert(id.clone());
        }
        Ok(id)
    }

    /// Starts creating a run's workspace on an agent: marks it creating
    /// and creates the job that does it. `None` when it was not pending.
    pub async fn start_workspace(
        &mut self,
        run_id: &str,
        agent_id: &str,
        job: &NewJob<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>> {
        let job_id = new_id();
        let marked = on_tx!(self, c => sqlx::query(
            "UPDATE workflow_runs SET workspace_state = 'creating', workspace_agent = $1, workspace_job = $2, \
             workspace_reason = NULL WHERE id = $3 AND workspace_state = 'pending' AND state = 'running'",
        )
        .bind(agent_id)
        .bind(&job_id)
        .bind(run_id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if marked == 0 {
            return Ok(None);
        }
        self.insert_job(&job_id, job, Some(run_id), None, now)
            .await?;
        let message = format!("on agent {agent_id} (job {job_id})");
        let ev = Event {
            state: Some("creating"),
            message: Some(&message),
            ..Event::new("workspace")
        };
        self.emit(run_id, &ev, now).await?;
        Ok(Some(job_id))
    }

    /// Moves a run's workspace from one of `from` to `to`, with a reason
    /// (for a pending one, also the reason it waits). True when it changed.
    pub async fn set_workspace_state(
        &mut self,
        run_id: &str,
        from: &[WorkspaceState],
        to: WorkspaceState,
        reason: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let from_json = to_json(&from);
        let sql = format!(
            "UPDATE workflow_runs SET workspace_state = $1, workspace_reason = $2 WHERE id = $3 \
             AND workspace_state {} \
             AND (workspace_state <> $1 OR COALESCE(workspace_reason, '') <> COALESCE($2, ''))",
            in_json(self.backend(), 4)
        );
        let changed = on_tx!(self, c => sqlx::query(&sql)
            .bind(to.as_str())
            .bind(reason)
            .bind(run_id)
            .bind(&from_json)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
        if changed == 0 {
            return Ok(false);
        }
        let ev = Event {
            state: Some(to.as_str()),
            message: reason,
            ..Event::new("workspace")
        };
        self.emit(run_id, &ev, now).await?;
        Ok(true)
    }

    /// Starts removing a kept workspace (or one whose removal failed) of
    /// an ended run. `None` when there is none to remove.
    pub async fn remove_workspace(
        &mut self,
        run_id: &str,
        job: &NewJob<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>> {
        let job_id = new_id();
        let marked = on_tx!(self, c => sqlx::query(
            "UPDATE workflow_runs SET workspace_state = 'removing', workspace_remove_job = $1, \
             workspace_reason = NULL WHERE id = $2 AND state <> 'running' \
             AND workspace_state IN ('kept', 'remove_failed')",
        )
        .bind(&job_id)
        .bind(run_id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if marked == 0 {
            return Ok(None);
        }
        self.insert_job(&job_id, job, Some(run_id), None, now)
            .await?;
        let message = format!("job {job_id}");
        let ev = Event {
            state: Some("removing"),
            message: Some(&message),
            ..Event::new("workspace")
        };
        self.emit(run_id, &ev, now).await?;
        Ok(Some(job_id))
    }

    /// Starts a pending task: marks it queued and creates its job. `None`
    /// when the task was not pending (started before).
    pub async fn start_task(
        &mut self,
        run_id: &str,
        task_id: &str,
        job: &NewJob<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>> {
        let job_id = new_id();
        let marked = on_tx!(self, c => sqlx::query(
            "UPDATE workflow_tasks SET state = 'queued', job_id = $1, started_at = $2, reason = NULL \
             WHERE run_id = $3 AND task_id = $4 AND state = 'pending'",
        )
        .bind(&job_id)
        .bind(to_ms(now))
        .bind(run_id)
        .bind(task_id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if marked == 0 {
            return Ok(None);
        }
        self.insert_job(&job_id, job, Some(run_id), Some(task_id), now)
            .await?;
        let message = format!("job {job_id}");
        let ev = Event {
            task: Some(task_id),
            state: Some("queued"),
            message: Some(&message),
            ..Event::new("task")
        };
        self.emit(run_id, &ev, now).await?;
        Ok(Some(job_id))
    }

    /// Moves a task that has not ended to `state` (once: a task already in
    /// that state, or ended, is left alone). Final states record the end
    /// time and, when given, the outputs. True when it changed.
    pub async fn set_task_state(
        &mut self,
        run_id: &str,
        task_id: &str,
        state: TaskState,
        reason: Option<&str>,
        outputs: Option<&BTreeMap<String, String>>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let finished = state.is_final().then(|| to_ms(now));
        let outputs = outputs.map(to_json);
        let sql = format!(
            "UPDATE workflow_tasks SET state = $1, reason = $2, finished_at = $3, outputs = COALESCE($4, outputs) \
             WHERE run_id = $5 AND task_id = $6 AND state <> $1 AND state NOT IN {FINAL_TASK_STATES}"
        );
        let changed = on_tx!(self, c => sqlx::query(&sql)
            .bind(state.as_str())
            .bind(reason)
            .bind(finished)
            .bind(&outputs)
            .bind(run_id)
            .bind(task_id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
        if changed == 0 {
            return Ok(false);
        }
        let ev = Event {
            task: Some(task_id),
            state: Some(state.as_str()),
            message: reason,
            ..Event::new("task")
        };
        self.emit(run_id, &ev, now).await?;
        Ok(true)
    }

    /// Ends a running run, queues its webhook deliveries and settles its
    /// workspace. False when it had ended before.
    pub async fn finish_run(
        &mut self,
        run_id: &str,
        state: RunState,
        reason: Option<&str>,
        deliveries: &[NewDelivery],
        workspace: &WorkspaceEnd<'_>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let changed = on_tx!(self, c => sqlx::query(
            "UPDATE workflow_runs SET state = $1, reason = $2, finished_at = $3 WHERE id = $4 AND state = 'running'",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(to_ms(now))
        .bind(run_id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if changed == 0 {
            return Ok(false);
        }
        if !deliveries.is_empty() {
            on_tx!(self, c => {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO webhook_deliveries (id, run_id, url, secret, event, payload, state, next_at, created_at) ",
                );
                q.push_values(deliveries, |mut b, d| {
                    b.push_bind(&d.id)
                        .push_bind(run_id)
                        .push_bind(&d.url)
                        .push_bind(&d.secret)
                        .push_bind(d.event.as_str())
                        .push_bind(&d.payload)
                        .push_bind("pending")
                        .push_bind(to_ms(now))
                        .push_bind(to_ms(now));
                });
                q.build().execute(&mut *c).await.map(|r| r.rows_affected())
            })?;
            self.changes.deliveries = true;
        }
        let (ws_state, ws_reason, remove_job) = match workspace {
            WorkspaceEnd::None => (None, None, None),
            WorkspaceEnd::NeverCreated => (
                Some(WorkspaceState::Removed),
                Some("the run ended before the workspace was created".to_owned()),
                None,
            ),
            WorkspaceEnd::Keep => (
                Some(WorkspaceState::Kept),
                Some("keep_workspace is set".to_owned()),
                None,
            ),
            WorkspaceEnd::Remove(job) => {
                let job_id = new_id();
                self.insert_job(&job_id, job, Some(run_id), None, now)
                    .await?;
                (
                    Some(WorkspaceState::Removing),
                    Some(format!("job {job_id}")),
                    Some(job_id),
                )
            }
        };
        if let Some(ws) = ws_state {
            on_tx!(self, c => sqlx::query(
                "UPDATE workflow_runs SET workspace_state = $1, workspace_reason = $2, \
                 workspace_remove_job = COALESCE($3, workspace_remove_job) WHERE id = $4",
            )
            .bind(ws.as_str())
            .bind(&ws_reason)
            .bind(&remove_job)
            .bind(run_id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            let ev = Event {
                state: Some(ws.as_str()),
                message: ws_reason.as_deref(),
                ..Event::new("workspace")
            };
            self.emit(run_id, &ev, now).await?;
        }
        let ev = Event {
            state: Some(state.as_str()),
            message: reason,
            ..Event::new("run")
        };
        self.emit(run_id, &ev, now).await?;
        self.changes.runs.insert(run_id.to_owned());
        Ok(true)
    }

    /// Asks a running run to stop. False when it has ended or a cancel was
    /// asked before.
    pub async fn request_run_cancel(
        &mut self,
        run_id: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let changed = on_tx!(self, c => sqlx::query(
            "UPDATE workflow_runs SET cancel_requested_at = $1, state = 'running' WHERE id = $2 \
             AND state IN ('running', 'awaiting_approval') AND cancel_requested_at IS NULL",
        )
        .bind(to_ms(now))
        .bind(run_id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if changed == 0 {
            return Ok(false);
        }
        let why = format!("cancel requested by {by}");
        self.cancel_approvals_of(run_id, &why, now).await?;
        let ev = Event {
            state: Some("running"),
            message: Some(&why),
            ..Event::new("run")
        };
        self.emit(run_id, &ev, now).await?;
        self.changes.runs.insert(run_id.to_owned());
        Ok(true)
    }

    /// Sets when the engine next looks at a run it claimed (`claimed`: the
    /// lease it claimed it with), unless a commit marked it due meanwhile:
    /// that one wins. `None`: never again (the run is done).
    pub async fn set_next_check(
        &mut self,
        run_id: &str,
        next: Option<DateTime<Utc>>,
        claimed: DateTime<Utc>,
    ) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "UPDATE workflow_runs SET next_check_at = $1 WHERE id = $2 AND next_check_at = $3",
        )
        .bind(next.map(to_ms))
        .bind(run_id)
        .bind(to_ms(claimed))
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected()))?;
        self.settled(run_id);
        Ok(())
    }

    /// Records an uploaded file; a repeated upload of the same path of the
    /// same attempt replaces the record.
    pub async fn record_artifact(&mut self, a: &ArtifactRecord) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO artifacts (id, run_id, task_id, job_id, attempt_id, path, size, sha256, store_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (attempt_id, path) DO UPDATE SET size = $7, sha256 = $8, store_key = $9, created_at = $10",
        )
        .bind(&a.id)
        .bind(&a.run_id)
        .bind(&a.task_id)
        .bind(&a.job_id)
        .bind(&a.attempt_id)
        .bind(&a.path)
        .bind(a.size)
        .bind(&a.sha256)
        .bind(&a.store_key)
        .bind(a.created_at)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Appends one attempt to a pending delivery's history and moves it on.
    pub async fn record_delivery_attempt(
        &mut self,
        id: &str,
        attempt: &DeliveryAttempt,
        outcome: &DeliveryOutcome,
    ) -> Result<()> {
        let (state, next_at, delivered_at) = match outcome {
            DeliveryOutcome::Delivered => ("delivered", None, Some(to_ms(attempt.at))),
            DeliveryOutcome::RetryAt(t) => ("pending", Some(to_ms(*t)), None),
            DeliveryOutcome::GaveUp => ("failed", None, None),
        };
        let history: Option<String> = on_tx!(self, c => sqlx::query_scalar(
            "UPDATE webhook_deliveries SET attempts = attempts + 1 WHERE id = $1 AND state = 'pending' RETURNING history",
        )
        .bind(id)
        .fetch_optional(&mut *c)
        .await)?;
        let Some(history) = history else {
            return Ok(());
        };
        let mut history: Vec<DeliveryAttempt> = serde_json::from_str(&history)
            .map_err(|e| corrupt("delivery history")(e.to_string()))?;
        history.push(attempt.clone());
        on_tx!(self, c => sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, next_at = $2, delivered_at = $3, history = $4 WHERE id = $5",
        )
        .bind(state)
        .bind(next_at)
        .bind(delivered_at)
        .bind(to_json(&history))
        .bind(id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        Ok(())
    }
}

impl Store {
    // ---- definitions and runs ----

    /// Creates a run (storing its definition once per hash), its tasks as
    /// pending and its first event, in one transaction.
    pub async fn create_run(&self, run: NewRun<'_>, now: DateTime<Utc>) -> Result<String> {
        let mut tx = self.begin().await?;
        let id = tx.create_run(&run, now).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The canonical JSON of a stored definition.
    pub async fn definition(&self, hash: &str) -> Result<Option<String>> {
        let sql = "SELECT body FROM workflow_defs WHERE hash = $1";
        Ok(on_pool!(self, p => sqlx::query_scalar(sql).bind(hash).fetch_optional(p).await)?)
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM workflow_runs WHERE id = $1");
        let row: Option<RunRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(id).fetch_optional(p).await)?;
        row.map(RunRecord::try_from).transpose()
    }

    pub async fn resolve_run_id(&self, id_or_prefix: &str) -> Result<String> {
        self.resolve_id("workflow_runs", "run", id_or_prefix).await
    }

    /// Runs, newest first, optionally only in one state.
    pub async fn list_runs(&self, state: Option<RunState>, limit: i64) -> Result<Vec<RunRecord>> {
        let rows: Vec<RunRow> = match state {
            Some(st) => {
                let sql = format!(
                    "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE state = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
                );
                on_pool!(self, p => sqlx::query_as(&sql).bind(st.as_str()).bind(limit).fetch_all(p).await)?
            }
            None => {
                let sql = format!(
                    "SELECT {RUN_COLUMNS} FROM workflow_runs ORDER BY created_at DESC, id DESC LIMIT $1"
                );
                on_pool!(self, p => sqlx::query_as(&sql).bind(limit).fetch_all(p).await)?
            }
        };
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    /// One page of runs, newest first, with how many match `filter` in
    /// all: `LIMIT`/`OFFSET` and a `COUNT` in SQL, and each run's task
    /// counts from the (run, task) primary key.
    pub async fn page_runs(
        &self,
        filter: &RunFilter<'_>,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<RunSummary>, i64)> {
        let mut conds = Vec::new();
        if filter.state.is_some() {
            conds.push(format!("state = ${}", conds.len() + 1));
        }
        if filter.name.is_some() {
            conds.push(format!("name = ${}", conds.len() + 1));
        }
        let where_ = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        let n = conds.len();
        let count_sql = format!("SELECT COUNT(*) FROM workflow_runs{where_}");
        let sql = format!(
            "SELECT {RUN_COLUMNS}, \
             (SELECT COUNT(*) FROM workflow_tasks t WHERE t.run_id = workflow_runs.id) AS tasks_total, \
             (SELECT COUNT(*) FROM workflow_tasks t WHERE t.run_id = workflow_runs.id \
              AND t.state IN {FINAL_TASK_STATES}) AS tasks_done \
             FROM workflow_runs{where_} ORDER BY created_at DESC, id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let state = filter.state.map(RunState::as_str);
        let total: i64 = on_pool!(self, p => {
            let mut q = sqlx::query_scalar(&count_sql);
            if let Some(s) = state {
                q = q.bind(s);
            }
            if let Some(name) = filter.name {
                q = q.bind(name);
            }
            q.fetch_one(p).await
        })?;
        let rows: Vec<RunSummaryRow> = on_pool!(self, p => {
            let mut q = sqlx::query_as(&sql);
            if let Some(s) = state {
                q = q.bind(s);
            }
            if let Some(name) = filter.name {
                q = q.bind(name);
            }
            q.bind(limit.max(0)).bind(offset.max(0)).fetch_all(p).await
        })?;
        let runs = rows
            .into_iter()
            .map(|r| {
                Ok(RunSummary {
                    run: RunRecord::try_from(r.run)?,
                    tasks_total: r.tasks_total,
                    tasks_done: r.tasks_done,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((runs, total))
    }

    /// The number of the run's latest event (0: none), for a reader that
    /// shows the run as it is now and then follows what changes.
    pub async fn run_event_seq(&self, run_id: &str) -> Result<Option<i64>> {
        let sql = "SELECT event_seq FROM workflow_runs WHERE id = $1";
        Ok(on_pool!(self, p => sqlx::query_scalar(sql).bind(run_id).fetch_optional(p).await)?)
    }

    /// Runs not yet ended.
    pub async fn count_running_runs(&self) -> Result<i64> {
        let sql = "SELECT COUNT(*) FROM workflow_runs WHERE state = 'running'";
        Ok(on_pool!(self, p => sqlx::query_scalar(sql).fetch_one(p).await)?)
    }

    pub async fn count_runs_by_state(&self) -> Result<Vec<(String, i64)>> {
        let sql = "SELECT state, COUNT(*) FROM workflow_runs GROUP BY state";
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?)
    }

    /// Claims up to `limit` runs whose look is due: each is pushed to
    /// `lease_until` (another engine takes it then if this one died) and
    /// returned with that value, for [`Tx::set_next_check`]. On PostgreSQL
    /// rows another replica is claiming are skipped.
    pub async fn claim_due_runs(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<String>> {
        // Usually nothing is due: find out with a read.
        let any: Option<String> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT id FROM workflow_runs WHERE next_check_at <= $1 LIMIT 1",
        )
        .bind(to_ms(now))
        .fetch_optional(p)
        .await)?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        let sql = match self.backend() {
            crate::Backend::Postgres => {
                "WITH picked AS MATERIALIZED (SELECT id FROM workflow_runs WHERE next_check_at <= $1 \
                 ORDER BY next_check_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 UPDATE workflow_runs SET next_check_at = $2 FROM picked \
                 WHERE workflow_runs.id = picked.id RETURNING workflow_runs.id"
            }
            crate::Backend::Sqlite => {
                "UPDATE workflow_runs SET next_check_at = $2 WHERE id IN \
                 (SELECT id FROM workflow_runs WHERE next_check_at <= $1 ORDER BY next_check_at LIMIT $3) \
                 RETURNING id"
            }
        };
        let mut tx = self.begin().await?;
        let ids: Vec<String> = on_tx!(&mut tx, c => sqlx::query_scalar(sql)
            .bind(to_ms(now))
            .bind(to_ms(lease_until))
            .bind(limit)
            .fetch_all(&mut *c)
            .await)?;
        tx.commit().await?;
        Ok(ids)
    }

    /// Ids of the runs not yet ended, and of ended runs whose workspace
    /// is being removed.
    pub async fn active_runs(&self) -> Result<Vec<String>> {
        let sql =
            "SELECT id FROM workflow_runs WHERE state = 'running' OR workspace_state = 'removing' \
                   ORDER BY created_at";
        Ok(on_pool!(self, p => sqlx::query_scalar(sql).fetch_all(p).await)?)
    }

    /// Starts creating a run's workspace on an agent: marks it creating and
    /// creates the job that does it, in one transaction. `None` when it was
    /// not pending (started before).
    pub async fn start_workspace(
        &self,
        run_id: &str,
        agent_id: &str,
        job: NewJob<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>> {
        let mut tx = self.begin().await?;
        let out = tx.start_workspace(run_id, agent_id, &job, now).await?;
        if out.is_some() {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }

    /// Moves a run's workspace from one of `from` to `to`, with a reason
    /// (for a pending one, also the reason it waits). True when it changed.
    pub async fn set_workspace_state(
        &self,
        run_id: &str,
        from: &[WorkspaceState],
        to: WorkspaceState,
        reason: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let out = tx
            .set_workspace_state(run_id, from, to, reason, now)
            .await?;
        if out {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }

    /// Starts removing a kept workspace (or one whose removal failed) of an
    /// ended run. `None` when there is none to remove.
    pub async fn remove_workspace(
        &self,
        run_id: &str,
        job: NewJob<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>> {
        let mut tx = self.begin().await?;
        let out = tx.remove_workspace(run_id, &job, now).await?;
        if out.is_some() {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }

    /// The run a job belongs to, if any.
    pub async fn run_of_job(&self, job_id: &str) -> Result<Option<String>> {
        let sql = "SELECT run_id FROM jobs WHERE id = $1";
        let r: Option<Option<String>> =
            on_pool!(self, p => sqlx::query_scalar(sql).bind(job_id).fetch_optional(p).await)?;
        Ok(r.flatten())
    }

    /// The tasks of a run in definition order, with their jobs' states.
    pub async fn run_tasks(&self, run_id: &str) -> Result<Vec<TaskRecord>> {
        let sql = "SELECT t.task_id, t.position, t.state, t.reason, t.job_id, j.state AS job_state, \
                   j.cancel_requested_at AS job_cancel_requested_at, t.outputs, \
                   t.started_at, t.finished_at FROM workflow_tasks t LEFT JOIN jobs j ON j.id = t.job_id \
                   WHERE t.run_id = $1 ORDER BY t.position";
        let rows: Vec<TaskRow> =
            on_pool!(self, p => sqlx::query_as(sql).bind(run_id).fetch_all(p).await)?;
        rows.into_iter().map(TaskRecord::try_from).collect()
    }

    /// Starts a pending task: marks it queued and creates its job, in one
    /// transaction. `None` when the task was not pending (started before).
    pub async fn start_task(
        &self,
        run_id: &str,
        task_id: &str,
        job: NewJob<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<String>> {
        let mut tx = self.begin().await?;
        let out = tx.start_task(run_id, task_id, &job, now).await?;
        if out.is_some() {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }

    /// Moves a task that has not ended to `state` (once: a task already in
    /// that state, or ended, is left alone). Final states record the end
    /// time and, when given, the outputs. True when it changed.
    pub async fn set_task_state(
        &self,
        run_id: &str,
        task_id: &str,
        state: TaskState,
        reason: Option<&str>,
        outputs: Option<&BTreeMap<String, String>>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let out = tx
            .set_task_state(run_id, task_id, state, reason, outputs, now)
            .await?;
        if out {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }

    /// Ends a running run, queues its webhook deliveries and settles its
    /// workspace (`workspace`), in one transaction. False when it had
    /// ended before.
    pub async fn finish_run(
        &self,
        run_id: &str,
        state: RunState,
        reason: Option<&str>,
        deliveries: &[NewDelivery],
        workspace: WorkspaceEnd<'_>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let out = tx
            .finish_run(run_id, state, reason, deliveries, &workspace, now)
            .await?;
        if out {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }

    /// Asks a running run to stop. False when it has ended or a cancel
    /// was asked before.
    pub async fn request_run_cancel(
        &self,
        run_id: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let out = tx.request_run_cancel(run_id, by, now).await?;
        if out {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(out)
    }

    /// Events of a run after number `after`, in order.
    pub async fn events_after(
        &self,
        run_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<RunEvent>> {
        let sql =
            "SELECT seq, run_id, at, kind, task_id, state, message, stream FROM workflow_events \
                   WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
        let rows: Vec<EventRow> = on_pool!(self, p => sqlx::query_as(sql)
            .bind(run_id)
            .bind(after)
            .bind(limit)
            .fetch_all(p)
            .await)?;
        Ok(rows.into_iter().map(RunEvent::from).collect())
    }

    /// Outputs of a job: those of its latest succeeded attempt per agent,
    /// merged in agent id order.
    pub async fn job_outputs(&self, job_id: &str) -> Result<BTreeMap<String, String>> {
        let sql = "SELECT a.outputs FROM attempts a WHERE a.job_id = $1 AND a.state = 'succeeded' \
                   ORDER BY a.agent_id, a.number";
        let rows: Vec<String> =
            on_pool!(self, p => sqlx::query_scalar(sql).bind(job_id).fetch_all(p).await)?;
        let mut merged = BTreeMap::new();
        for row in rows {
            let outputs: BTreeMap<String, String> = serde_json::from_str(&row)
                .map_err(|e| corrupt("attempt outputs")(e.to_string()))?;
            merged.extend(outputs);
        }
        Ok(merged)
    }

    // ---- artifacts ----

    /// What the agent owning `attempt_id` may upload for it.
    pub async fn upload_context(
        &self,
        attempt_id: &str,
        agent_id: &str,
    ) -> Result<Option<UploadContext>> {
        let sql = "SELECT j.id, j.run_id, j.task_id, j.artifacts, a.finished_at FROM attempts a \
                   JOIN jobs j ON j.id = a.job_id WHERE a.id = $1 AND a.agent_id = $2";
        type Row = (String, Option<String>, Option<String>, String, Option<i64>);
        let row: Option<Row> = on_pool!(self, p => sqlx::query_as(sql)
            .bind(attempt_id)
            .bind(agent_id)
            .fetch_optional(p)
            .await)?;
        row.map(|(job_id, run_id, task_id, artifacts, finished)| {
            Ok(UploadContext {
                job_id,
                run_id,
                task_id,
                artifacts: serde_json::from_str(&artifacts)
                    .map_err(|e| corrupt("job artifacts")(e.to_string()))?,
                open: finished.is_none(),
            })
        })
        .transpose()
    }

    /// Records an uploaded file; a repeated upload of the same path of the
    /// same attempt replaces the record.
    pub async fn record_artifact(&self, a: &ArtifactRecord) -> Result<()> {
        let mut tx = self.begin().await?;
        tx.record_artifact(a).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn run_artifacts(&self, run_id: &str) -> Result<Vec<ArtifactRecord>> {
        let sql = "SELECT id, run_id, task_id, job_id, attempt_id, path, size, sha256, store_key, created_at \
                   FROM artifacts WHERE run_id = $1 ORDER BY task_id, path, created_at";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(run_id).fetch_all(p).await)?)
    }

    pub async fn artifact(&self, id: &str) -> Result<Option<ArtifactRecord>> {
        let sql = "SELECT id, run_id, task_id, job_id, attempt_id, path, size, sha256, store_key, created_at \
                   FROM artifacts WHERE id = $1";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await)?)
    }

    // ---- webhooks ----

    pub async fn create_webhook(
        &self,
        url: &str,
        secret: &str,
        events: &[WebhookEvent],
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let id = new_id();
        let mut tx = self.begin().await?;
        on_tx!(&mut tx, c => sqlx::query(
            "INSERT INTO webhooks (id, url, secret, events, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(url)
        .bind(secret)
        .bind(to_json(events))
        .bind(by)
        .bind(to_ms(now))
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn list_webhooks(&self) -> Result<Vec<WebhookRecord>> {
        let sql = "SELECT id, url, secret, events, created_by, created_at FROM webhooks ORDER BY created_at, id";
        let rows: Vec<(String, String, String, String, String, i64)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        rows.into_iter()
            .map(|(id, url, secret, events, created_by, created_at)| {
                Ok(WebhookRecord {
                    events: serde_json::from_str(&events)
                        .map_err(|e| corrupt("webhook events")(e.to_string()))?,
                    id,
                    url,
                    secret,
                    created_by,
                    created_at: from_ms(created_at),
                })
            })
            .collect()
    }

    /// Resolves a full webhook id or a unique prefix of one.
    pub async fn resolve_webhook_id(&self, id_or_prefix: &str) -> Result<String> {
        self.resolve_id("webhooks", "webhook", id_or_prefix).await
    }

    /// Deletes a global webhook; false when there was none.
    pub async fn delete_webhook(&self, id: &str) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n = on_tx!(&mut tx, c => sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Pending deliveries whose time has come, oldest first.
    pub async fn due_deliveries(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE state = 'pending' AND next_at <= $1 \
             ORDER BY next_at, id LIMIT $2"
        );
        let rows: Vec<DeliveryRow> = on_pool!(self, p => sqlx::query_as(&sql).bind(to_ms(now)).bind(limit).fetch_all(p).await)?;
        rows.into_iter().map(DeliveryRecord::try_from).collect()
    }

    /// When the next pending delivery is due.
    pub async fn next_delivery_at(&self) -> Result<Option<DateTime<Utc>>> {
        let sql = "SELECT MIN(next_at) FROM webhook_deliveries WHERE state = 'pending'";
        let t: Option<i64> = on_pool!(self, p => sqlx::query_scalar(sql).fetch_one(p).await)?;
        Ok(t.map(from_ms))
    }

    /// Appends one attempt to a pending delivery's history and moves it on.
    pub async fn record_delivery_attempt(
        &self,
        id: &str,
        attempt: &DeliveryAttempt,
        outcome: &DeliveryOutcome,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        tx.record_delivery_attempt(id, attempt, outcome).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deliveries, newest first; of one run when given.
    pub async fn deliveries(
        &self,
        run_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>> {
        let rows: Vec<DeliveryRow> = match run_id {
            Some(run) => {
                let sql = format!(
                    "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE run_id = $1 \
                     ORDER BY created_at DESC, id DESC LIMIT $2"
                );
                on_pool!(self, p => sqlx::query_as(&sql).bind(run).bind(limit).fetch_all(p).await)?
            }
            None => {
                let sql = format!(
                    "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries ORDER BY created_at DESC, id DESC LIMIT $1"
                );
                on_pool!(self, p => sqlx::query_as(&sql).bind(limit).fetch_all(p).await)?
            }
        };
        rows.into_iter().map(DeliveryRecord::try_from).collect()
    }
}
