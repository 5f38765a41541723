//! The action catalog, jobs, attempts (dispatch, leases, results, retries),
//! their output, and the audit log.
//!
//! Every transition of an attempt recomputes its job's state in the same
//! transaction, so a job's state never disagrees with its attempts.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use drover_proto::jobs::{
    aggregate_state, AttemptResult, JobState, LateResult, RetryPolicy, Stream,
};
use drover_proto::sandbox::{LimitExceeded, Sandbox, WorkspaceSpec};

use crate::tx::on_tx;
use crate::{from_ms, new_id, on_pool, on_write, to_ms, Error, Result, Store, Tx};

/// An action as stored: the spec as canonical JSON and its hash.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActionRecord {
    pub name: String,
    pub spec: String,
    pub hash: String,
    pub updated_at: i64,
}

/// What `upsert_action` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Created,
    Updated,
    Unchanged,
}

/// A job to create, with what every attempt runs.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub action: &'a str,
    pub action_hash: &'a str,
    pub target: &'a str,
    pub params_json: &'a str,
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub timeout_ms: i64,
    pub kill_grace_ms: i64,
    pub retry: &'a RetryPolicy,
    pub created_by: &'a str,
    /// One first attempt per agent.
    pub agent_ids: &'a [String],
    /// Paths each attempt uploads as artifacts.
    pub artifacts: &'a [String],
    /// The resolved sandbox profile every attempt runs in.
    pub sandbox: &'a Sandbox,
    /// The workspace the attempts run in, create or remove.
    pub workspace: Option<&'a WorkspaceSpec>,
    /// Set when it needs approval: it is stored waiting, with this request.
    pub approval: Option<&'a crate::approvals::NewApproval<'a>>,
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: String,
    pub action: String,
    pub target: String,
    pub params_json: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: i64,
    pub kill_grace_ms: i64,
    pub retry: RetryPolicy,
    pub state: JobState,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Set when the job runs a task of a workflow run.
    pub run_id: Option<String>,
    pub task_id: Option<String>,
    pub artifacts: Vec<String>,
    pub sandbox: Sandbox,
    pub workspace: Option<WorkspaceSpec>,
    /// The spec hash its approval holds for (protected jobs only).
    pub approved_hash: Option<String>,
    /// The Ed25519 signature of its spec, made when it was created (hex).
    pub spec_sig: Option<String>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    action: String,
    target: String,
    params: String,
    argv: String,
    env: String,
    timeout_ms: i64,
    kill_grace_ms: i64,
    retry: String,
    state: String,
    created_by: String,
    created_at: i64,
    finished_at: Option<i64>,
    cancel_requested_at: Option<i64>,
    run_id: Option<String>,
    task_id: Option<String>,
    artifacts: String,
    sandbox: Option<String>,
    workspace: Option<String>,
    approved_hash: Option<String>,
    spec_sig: Option<String>,
}

const JOB_COLUMNS: &str =
    "id, action, target, params, argv, env, timeout_ms, kill_grace_ms, retry, state, \
                           created_by, created_at, finished_at, cancel_requested_at, run_id, task_id, artifacts, \
                           sandbox, workspace, approved_hash, spec_sig";

fn corrupt(what: &'static str) -> impl Fn(String) -> Error {
    move |detail| Error::Corrupt { what, detail }
}

fn parse_state(s: &str) -> Result<JobState> {
    JobState::parse(s).ok_or_else(|| corrupt("job state")(s.to_owned()))
}

impl TryFrom<JobRow> for JobRecord {
    type Error = Error;
    fn try_from(r: JobRow) -> Result<JobRecord> {
        Ok(JobRecord {
            argv: serde_json::from_str(&r.argv).map_err(|e| corrupt("job argv")(e.to_string()))?,
            env: serde_json::from_str(&r.env).map_err(|e| corrupt("job env")(e.to_string()))?,
            retry: serde_json::from_str(&r.retry)
                .map_err(|e| corrupt("job retry")(e.to_string()))?,
            state: parse_state(&r.state)?,
            artifacts: serde_json::from_str(&r.artifacts)
                .map_err(|e| corrupt("job artifacts")(e.to_string()))?,
            // Jobs from before sandboxes ran as plain processes.
            sandbox: match &r.sandbox {
                Some(s) => {
                    serde_json::from_str(s).map_err(|e| corrupt("job sandbox")(e.to_string()))?
                }
                None => Sandbox::default_process(),
            },
            workspace: r
                .workspace
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| corrupt("job workspace")(e.to_string()))?,
            approved_hash: r.approved_hash,
            run_id: r.run_id,
            task_id: r.task_id,
            spec_sig: r.spec_sig,
            id: r.id,
            action: r.action,
            target: r.target,
            params_json: r.params,
            timeout_ms: r.timeout_ms,
            kill_grace_ms: r.kill_grace_ms,
            created_by: r.created_by,
            created_at: from_ms(r.created_at),
            finished_at: r.finished_at.map(from_ms),
            cancel_requested_at: r.cancel_requested_at.map(from_ms),
        })
    }
}

/// An attempt as stored.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub id: String,
    pub job_id: String,
    pub agent_id: String,
    pub number: i64,
    pub state: JobState,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub not_before: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub cancel_requested: bool,
    pub cancel_force: bool,
    pub limit_exceeded: Option<LimitExceeded>,
    /// A result reported after the attempt was declared lost.
    pub late_result: Option<LateResult>,
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    id: String,
    job_id: String,
    agent_id: String,
    number: i64,
    state: String,
    reason: Option<String>,
    created_at: i64,
    not_before: i64,
    dispatched_at: Option<i64>,
    started_at: Option<i64>,
    lease_expires_at: Option<i64>,
    finished_at: Option<i64>,
    exit_code: Option<i64>,
    signal: Option<i64>,
    duration_ms: Option<i64>,
    error: Option<String>,
    stdout_truncated: i64,
    stderr_truncated: i64,
    cancel_requested: i64,
    cancel_force: i64,
    limit_exceeded: Option<String>,
    late_result: Option<String>,
}

const ATTEMPT_COLUMNS: &str = "id, job_id, agent_id, number, state, reason, created_at, not_before, dispatched_at, \
     started_at, lease_expires_at, finished_at, exit_code, signal, duration_ms, error, stdout_truncated, \
     stderr_truncated, cancel_requested, cancel_force, limit_exceeded, late_result";

impl TryFrom<AttemptRow> for AttemptRecord {
    type Error = Error;
    fn try_from(r: AttemptRow) -> Result<AttemptRecord> {
        Ok(AttemptRecord {
            state: parse_state(&r.state)?,
            id: r.id,
            job_id: r.job_id,
            agent_id: r.agent_id,
            number: r.number,
            reason: r.reason,
            created_at: from_ms(r.created_at),
            not_before: from_ms(r.not_before),
            dispatched_at: r.dispatched_at.map(from_ms),
            started_at: r.started_at.map(from_ms),
            lease_expires_at: r.lease_expires_at.map(from_ms),
            finished_at: r.finished_at.map(from_ms),
            exit_code: r.exit_code,
            signal: r.signal,
            duration_ms: r.duration_ms,
            error: r.error,
            stdout_truncated: r.stdout_truncated != 0,
            stderr_truncated: r.stderr_truncated != 0,
            cancel_requested: r.cancel_requested != 0,
            cancel_force: r.cancel_force != 0,
            limit_exceeded: r.limit_exceeded.as_deref().and_then(LimitExceeded::parse),
            late_result: r
                .late_result
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| Error::Corrupt {
                    what: "attempt late result",
                    detail: e.to_string(),
                })?,
        })
    }
}

/// An attempt handed to an agent, with what it runs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub attempt_id: String,
    pub job_id: String,
    pub action: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: i64,
    pub kill_grace_ms: i64,
    pub artifacts: Vec<String>,
    pub sandbox: Sandbox,
    pub workspace: Option<WorkspaceSpec>,
    /// The spec signature made when the job was created (hex); `None` for
    /// a job from before assignments were signed.
    pub spec_sig: Option<String>,
    /// When it became runnable (queued, or its retry time).
    pub ready_at: DateTime<Utc>,
}

/// Whether an agent may act on an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// The attempt is this agent's; it belongs to this job.
    Owned {
        job_id: String,
    },
    NotFound,
    /// It is another agent's attempt.
    Foreign,
}

/// What recording a result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded now; `retry_agent` is set when a retry was queued.
    Recorded {
        job_id: String,
        retry_agent: Option<String>,
    },
    /// This attempt's result was recorded before: acknowledged, ignored.
    Duplicate {
        job_id: String,
    },
    /// The attempt had been declared lost: the result is kept as
    /// information and changes no state.
    Late {
        job_id: String,
    },
    NotFound,
    Foreign,
}

/// What a lease renewal did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Renewed {
    pub renewed: Vec<String>,
    /// To stop: final, cancelled, unknown, another agent's, or stopped.
    pub cancel: Vec<String>,
    /// Of those, to kill at once.
    pub kill: Vec<String>,
}

/// An attempt whose lease ran out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub attempt_id: String,
    pub job_id: String,
    pub agent_id: String,
    pub retried: bool,
}

/// A stored piece of output.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogRecord {
    pub id: i64,
    pub attempt_id: String,
    pub stream: String,
    pub data: String,
}

/// What appending output did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    Stored { job_id: String },
    Duplicate { job_id: String },
    OverCap,
    NotFound,
    Foreign,
}

/// An audit entry as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub status: i64,
    pub outcome: String,
    pub request: Option<String>,
    pub source: Option<String>,
    pub detail: Option<String>,
}

/// Filters of `list_audit`.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    /// Substring of the action or of the request, e.g. "job" or "jobs".
    pub action: Option<String>,
    /// The target or its start, e.g. `job:01J` or `agent:`.
    pub target: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Only entries older than this id (keyset paging, newest first).
    pub before: Option<i64>,
    pub limit: i64,
}

/// `IN (…)` over a JSON array of text bound as parameter `$n`, per engine.
pub(crate) fn in_json(backend: crate::Backend, n: u32) -> String {
    match backend {
        crate::Backend::Sqlite => format!("IN (SELECT value FROM json_each(${n}))"),
        crate::Backend::Postgres => format!("IN (SELECT jsonb_array_elements_text(${n}::jsonb))"),
    }
}

/// Where an attempt's output goes: looked up once per attempt by the
/// caller, which keeps it (and the bytes used) for the attempt's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTarget {
    pub agent_id: String,
    pub job_id: String,
    pub run_id: Option<String>,
    pub task_id: Option<String>,
    /// Bytes stored so far per stream (stdout, stderr).
    pub used: [i64; 2],
}

/// Domain steps of jobs and attempts, composed by callers in one
/// transaction.
impl Tx {
    /// Recomputes and stores a job's state from the latest attempt per
    /// agent. Returns the new state.
    pub async fn recompute_job(&mut self, job_id: &str, now: DateTime<Utc>) -> Result<JobState> {
        // On PostgreSQL, lock the job row first: two attempts of one job
        // ending at once would otherwise each read the other as still
        // running (READ COMMITTED) and leave the job running for good.
        // SQLite has one writer, so the read below already sees all.
        if self.backend() == crate::Backend::Postgres {
            on_tx!(self, c => sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(job_id)
                .execute(&mut *c)
                .await.map(|r| r.rows_affected()))?;
        }
        let states: Vec<String> = on_tx!(self, c => sqlx::query_scalar(
            "SELECT a.state FROM attempts a WHERE a.job_id = $1 AND a.number = \
             (SELECT MAX(b.number) FROM attempts b WHERE b.job_id = a.job_id AND b.agent_id = a.agent_id)",
        )
        .bind(job_id)
        .fetch_all(&mut *c)
        .await)?;
        let parsed = states
            .iter()
            .map(|s| parse_state(s))
            .collect::<Result<Vec<_>>>()?;
        let state = aggregate_state(&parsed);
        let finished = state.is_final().then(|| to_ms(now));
        // Only a change of state is written (and wakes the run's engine).
        let changed: Option<(Option<String>, Option<String>)> = on_tx!(self, c => sqlx::query_as(
            "UPDATE jobs SET state = $1, finished_at = CASE WHEN $2 IS NULL THEN NULL ELSE COALESCE(finished_at, $2) END \
             WHERE id = $3 AND state <> $1 RETURNING run_id, task_id",
        )
        .bind(state.as_str())
        .bind(finished)
        .bind(job_id)
        .fetch_optional(&mut *c)
        .await)?;
        self.changes.jobs.insert(job_id.to_owned());
        if changed.is_some() && state.is_final() {
            self.changes.ended.insert(job_id.to_owned());
        }
        if let Some((Some(run), task)) = changed {
            // A task that has not ended shows its job's live state: it is
            // derived when read, and its event is written here, in the
            // job's own transaction, instead of by the engine.
            if let (Some(task), false) = (task.as_deref(), state.is_final()) {
                let ev = crate::workflows::Event {
                    kind: "task",
                    task: Some(task),
                    state: Some(state.as_str()),
                    message: None,
                    stream: None,
                };
                self.emit(&run, &ev, now).await?;
            }
            self.changes.runs.insert(run);
        }
        Ok(state)
    }

    /// Queues the next attempt on the same agent when the job's retry
    /// policy asks for it (and the job is not being cancelled). Returns
    /// whether a retry was queued.
    pub async fn queue_retry(
        &mut self,
        job_id: &str,
        agent_id: &str,
        number: i64,
        state: JobState,
        jitter: f64,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (retry, cancelled): (String, Option<i64>) = on_tx!(self, c => sqlx::query_as(
            "SELECT retry, cancel_requested_at FROM jobs WHERE id = $1",
        )
        .bind(job_id)
        .fetch_one(&mut *c)
        .await)?;
        let policy: RetryPolicy =
            serde_json::from_str(&retry).map_err(|e| corrupt("job retry")(e.to_string()))?;
        let delay = if cancelled.is_some() {
            None
        } else {
            policy.next_delay(u32::try_from(number).unwrap_or(u32::MAX), state, jitter)
        };
        let Some(d) = delay else {
            return Ok(false);
        };
        let at = now + chrono::Duration::milliseconds(d.as_millis() as i64);
        on_tx!(self, c => sqlx::query(
            "INSERT INTO attempts (id, job_id, agent_id, number, state, reason, created_at, not_before) \
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7)",
        )
        .bind(new_id())
        .bind(job_id)
        .bind(agent_id)
        .bind(number + 1)
        .bind(format!("awaiting retry at {}", at.to_rfc3339()))
        .bind(to_ms(now))
        .bind(to_ms(at))
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        self.changes.agents.insert(agent_id.to_owned());
        Ok(true)
    }

    /// Inserts job `id` and one queued attempt per agent (one statement
    /// for all of them).
    pub async fn insert_job(
        &mut self,
        id: &str,
        job: &NewJob<'_>,
        run_id: Option<&str>,
        task_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let initial = if job.approval.is_some() {
            JobState::AwaitingApproval
        } else {
            JobState::Queued
        };
        // Signed before the row is written: what the agent will verify is
        // what the job was created with, whatever happens to the row.
        let spec_sig = match self.job_signer() {
            Some(signer) => Some(
                signer
                    .sign_spec(&drover_proto::signing::Spec {
                        job_id: id,
                        action: job.action,
                        argv: job.argv,
                        env: job.env,
                        timeout_ms: job.timeout_ms as u64,
                        kill_grace_ms: job.kill_grace_ms as u64,
                        artifacts: job.artifacts,
                        sandbox: Some(job.sandbox),
                        workspace: job.workspace,
                    })
                    .map_err(|e| Error::Corrupt {
                        what: "job spec",
                        detail: e.to_string(),
                    })?,
            ),
            None => None,
        };
        on_tx!(self, c => sqlx::query(
            "INSERT INTO jobs (id, action, action_hash, target, params, argv, env, timeout_ms, kill_grace_ms, \
             retry, state, created_by, created_at, run_id, task_id, artifacts, sandbox, workspace, spec_sig) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        )
        .bind(id)
        .bind(job.action)
        .bind(job.action_hash)
        .bind(job.target)
        .bind(job.params_json)
        .bind(to_json(job.argv))
        .bind(to_json(job.env))
        .bind(job.timeout_ms)
        .bind(job.kill_grace_ms)
        .bind(to_json(job.retry))
        .bind(initial.as_str())
        .bind(job.created_by)
        .bind(to_ms(now))
        .bind(run_id)
        .bind(task_id)
        .bind(to_json(job.artifacts))
        .bind(to_json(job.sandbox))
        .bind(job.workspace.map(to_json))
        .bind(&spec_sig)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if !job.agent_ids.is_empty() {
            on_tx!(self, c => {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO attempts (id, job_id, agent_id, number, state, created_at, not_before) ",
                );
                q.push_values(job.agent_ids, |mut b, agent| {
                    b.push_bind(new_id())
                        .push_bind(id)
                        .push_bind(agent)
                        .push_bind(1_i64)
                        .push_bind(initial.as_str())
                        .push_bind(to_ms(now))
                        .push_bind(to_ms(now));
                });
                q.build().execute(&mut *c).await.map(|r| r.rows_affected())
            })?;
        }
        self.changes.jobs.insert(id.to_owned());
        if let Some(approval) = job.approval {
            self.request_approval(Some(id), None, approval, now).await?;
        } else {
            self.changes.agents.extend(job.agent_ids.iter().cloned());
        }
        if let Some(run) = run_id {
            self.changes.runs.insert(run.to_owned());
        }
        Ok(())
    }

    /// Records an attempt's result once, queues a retry if the job's
    /// policy asks for one, and updates the job.
    pub async fn record_result(
        &mut self,
        agent_id: &str,
        result: &AttemptResult,
        jitter: f64,
        now: DateTime<Utc>,
    ) -> Result<Recorded> {
        let state = result.outcome.state();
        // A lost attempt stays lost (its retry may already run, its job may
        // have ended): a result arriving after that is kept beside it.
        let updated: Option<(String, i64)> = on_tx!(self, c => sqlx::query_as(
            "UPDATE attempts SET state = $1, finished_at = $2, exit_code = $3, signal = $4, duration_ms = $5, \
             error = $6, stdout_truncated = $7, stderr_truncated = $8, started_at = COALESCE(started_at, $9), \
             reason = NULL, lease_expires_at = NULL, outputs = $12, limit_exceeded = $13 \
             WHERE id = $10 AND agent_id = $11 AND state IN ('dispatched', 'running') \
             RETURNING job_id, number",
        )
        .bind(state.as_str())
        .bind(to_ms(result.finished_at))
        .bind(result.exit_code.map(i64::from))
        .bind(result.signal.map(i64::from))
        .bind(result.duration_ms as i64)
        .bind(&result.error)
        .bind(i64::from(result.stdout_truncated))
        .bind(i64::from(result.stderr_truncated))
        .bind(result.started_at.map(to_ms))
        .bind(&result.attempt_id)
        .bind(agent_id)
        .bind(to_json(&result.outputs))
        .bind(result.limit_exceeded.map(LimitExceeded::as_str))
        .fetch_optional(&mut *c)
        .await)?;
        let Some((job_id, number)) = updated else {
            let late = LateResult {
                outcome: result.outcome,
                exit_code: result.exit_code,
                signal: result.signal,
                duration_ms: result.duration_ms,
                error: result.error.clone(),
                finished_at: result.finished_at,
                received_at: now,
            };
            let kept: Option<String> = on_tx!(self, c => sqlx::query_scalar(
                "UPDATE attempts SET late_result = $1 \
                 WHERE id = $2 AND agent_id = $3 AND state = 'lost' AND late_result IS NULL \
                 RETURNING job_id",
            )
            .bind(to_json(&late))
            .bind(&result.attempt_id)
            .bind(agent_id)
            .fetch_optional(&mut *c)
            .await)?;
            if let Some(job_id) = kept {
                self.changes.jobs.insert(job_id.clone());
                return Ok(Recorded::Late { job_id });
            }
            return Ok(
                match self.attempt_owner(&result.attempt_id, agent_id).await? {
                    Ownership::Owned { job_id } => Recorded::Duplicate { job_id },
                    Ownership::NotFound => Recorded::NotFound,
                    Ownership::Foreign => Recorded::Foreign,
                },
            );
        };
        let retried = self
            .queue_retry(&job_id, agent_id, number, state, jitter, now)
            .await?;
        self.recompute_job(&job_id, now).await?;
        Ok(Recorded::Recorded {
            job_id,
            retry_agent: retried.then(|| agent_id.to_owned()),
        })
    }

    /// Whose attempt this is, read inside the transaction.
    pub async fn attempt_owner(&mut self, attempt_id: &str, agent_id: &str) -> Result<Ownership> {
        let row: Option<(String, String)> = on_tx!(self, c => sqlx::query_as(
            "SELECT agent_id, job_id FROM attempts WHERE id = $1",
        )
        .bind(attempt_id)
        .fetch_optional(&mut *c)
        .await)?;
        Ok(ownership(row, agent_id))
    }

    /// Marks a dispatched attempt running.
    pub async fn mark_started(
        &mut self,
        attempt_id: &str,
        agent_id: &str,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Ownership> {
        let job: Option<String> = on_tx!(self, c => sqlx::query_scalar(
            "UPDATE attempts SET state = 'running', started_at = $1 \
             WHERE id = $2 AND agent_id = $3 AND state = 'dispatched' RETURNING job_id",
        )
        .bind(to_ms(started_at))
        .bind(attempt_id)
        .bind(agent_id)
        .fetch_optional(&mut *c)
        .await)?;
        match job {
            Some(job_id) => {
                self.recompute_job(&job_id, now).await?;
                Ok(Ownership::Owned { job_id })
            }
            None => self.attempt_owner(attempt_id, agent_id).await,
        }
    }

    /// Stores one chunk of output once per (attempt, stream, seq); a
    /// workflow task's output is also an event of its run, so a stream
    /// resumed by event id misses none. True when it was new.
    pub async fn append_log(
        &mut self,
        target: &LogTarget,
        attempt_id: &str,
        stream: Stream,
        seq: i64,
        data: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let inserted = on_tx!(self, c => sqlx::query(
            "INSERT INTO attempt_logs (job_id, attempt_id, stream, seq, data) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (attempt_id, stream, seq) DO NOTHING",
        )
        .bind(&target.job_id)
        .bind(attempt_id)
        .bind(stream.as_str())
        .bind(seq)
        .bind(data)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if inserted == 0 {
            return Ok(false);
        }
        self.changes.logs.insert(target.job_id.clone());
        if let Some(run_id) = &target.run_id {
            self.emit(
                run_id,
                &crate::workflows::Event {
                    kind: "log",
                    task: target.task_id.as_deref(),
                    state: None,
                    message: Some(data),
                    stream: Some(stream.as_str()),
                },
                now,
            )
            .await?;
        }
        Ok(true)
    }
}

fn ownership(row: Option<(String, String)>, agent_id: &str) -> Ownership {
    match row {
        None => Ownership::NotFound,
        Some((owner, _)) if owner != agent_id => Ownership::Foreign,
        Some((_, job_id)) => Ownership::Owned { job_id },
    }
}

impl Store {
    /// Creates or replaces an action; unchanged when the hash is the same.
    pub async fn upsert_action(
        &self,
        name: &str,
        spec_json: &str,
        hash: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Upsert> {
        self.upsert_by_hash("actions", name, spec_json, hash, by, now)
            .await
    }

    /// Creates or replaces a row of a catalog table (`actions`,
    /// `sandboxes`: a name fixed in the code) by name; unchanged when the
    /// hash is the same.
    pub(crate) async fn upsert_by_hash(
        &self,
        table: &'static str,
        name: &str,
        spec_json: &str,
        hash: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Upsert> {
        let update = format!(
            "UPDATE {table} SET spec = $1, hash = $2, updated_at = $3, updated_by = $4 \
             WHERE name = $5 AND hash <> $2"
        );
        let insert = format!(
            "INSERT INTO {table} (name, spec, hash, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (name) DO NOTHING"
        );
        let mut tx = self.begin().await?;
        let updated = on_tx!(&mut tx, c => sqlx::query(&update)
            .bind(spec_json)
            .bind(hash)
            .bind(to_ms(now))
            .bind(by)
            .bind(name)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
        if updated == 1 {
            tx.commit().await?;
            return Ok(Upsert::Updated);
        }
        let inserted = on_tx!(&mut tx, c => sqlx::query(&insert)
            .bind(name)
            .bind(spec_json)
            .bind(hash)
            .bind(to_ms(now))
            .bind(by)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
        tx.commit().await?;
        Ok(if inserted == 1 {
            Upsert::Created
        } else {
            Upsert::Unchanged
        })
    }

    pub async fn list_actions(&self) -> Result<Vec<ActionRecord>> {
        let sql = "SELECT name, spec, hash, updated_at FROM actions ORDER BY name";
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?)
    }

    /// Deletes an action; false when there was none. Jobs made from it
    /// keep what they run (argv, env, sandbox are stored with the job).
    pub async fn delete_action(&self, name: &str) -> Result<bool> {
        self.delete_by_name("actions", name).await
    }

    /// Deletes the row of a catalog table (`actions`, `sandboxes`: a name
    /// fixed in the code) by name; false when there was none.
    pub(crate) async fn delete_by_name(&self, table: &'static str, name: &str) -> Result<bool> {
        let sql = format!("DELETE FROM {table} WHERE name = $1");
        let n = on_write!(self, c => sqlx::query(&sql)
            .bind(name)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    pub async fn action(&self, name: &str) -> Result<Option<ActionRecord>> {
        let sql = "SELECT name, spec, hash, updated_at FROM actions WHERE name = $1";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(name).fetch_optional(p).await)?)
    }

    /// Creates a job and one queued attempt per agent, atomically.
    pub async fn create_job(&self, job: NewJob<'_>, now: DateTime<Utc>) -> Result<String> {
        let id = new_id();
        let mut tx = self.begin().await?;
        tx.insert_job(&id, &job, None, None, now).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Hands up to `limit` runnable attempts to an agent: they become
    /// dispatched with a lease until `lease_until`.
    pub async fn claim_attempts(
        &self,
        agent_id: &str,
        limit: u32,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Claimed>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Most polls find nothing: find out with a read, so that an empty
        // poll costs no write (and on SQLite does not wait for the writer).
        let any: Option<String> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT id FROM attempts WHERE agent_id = $1 AND state = 'queued' AND not_before <= $2 LIMIT 1",
        )
        .bind(agent_id)
        .bind(to_ms(now))
        .fetch_optional(p)
        .await)?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        // PostgreSQL may run an `IN (SELECT … LIMIT n)` sub-select more than
        // once, so the LIMIT would not bound the update: pick the rows once
        // in a materialized CTE (skipping rows another replica has locked).
        // SQLite has one writer and evaluates the sub-select once. Nothing
        // is handed out while the fleet is stopped or the agent does not
        // take work (drained, stopped): checked in the claim itself, so no
        // stop can slip between a check and the claim.
        let claim = match self.backend() {
            crate::Backend::Postgres => {
                "WITH picked AS MATERIALIZED (SELECT id FROM attempts WHERE agent_id = $3 AND state = 'queued' \
                 AND not_before <= $1 \
                 AND EXISTS (SELECT 1 FROM fleet WHERE id = 1 AND stopped_at IS NULL) \
                 AND EXISTS (SELECT 1 FROM agents WHERE id = $3 AND dispatch = 'active') \
                 ORDER BY not_before, id LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 UPDATE attempts SET state = 'dispatched', dispatched_at = $1, lease_expires_at = $2, reason = NULL \
                 FROM picked WHERE attempts.id = picked.id AND attempts.state = 'queued' \
                 RETURNING attempts.id, attempts.job_id, attempts.not_before"
            }
            crate::Backend::Sqlite => {
                "UPDATE attempts SET state = 'dispatched', dispatched_at = $1, lease_expires_at = $2, reason = NULL \
                 WHERE id IN (SELECT id FROM attempts WHERE agent_id = $3 AND state = 'queued' AND not_before <= $1 \
                 ORDER BY not_before, id LIMIT $4) AND state = 'queued' \
                 AND EXISTS (SELECT 1 FROM fleet WHERE id = 1 AND stopped_at IS NULL) \
                 AND EXISTS (SELECT 1 FROM agents WHERE id = $3 AND dispatch = 'active') \
                 RETURNING id, job_id, not_before"
            }
        };
        let mut tx = self.begin().await?;
        let rows: Vec<(String, String, i64)> = on_tx!(&mut tx, c => sqlx::query_as(claim)
            .bind(to_ms(now))
            .bind(to_ms(lease_until))
            .bind(agent_id)
            .bind(i64::from(limit))
            .fetch_all(&mut *c)
            .await)?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let mut ids: Vec<&String> = rows.iter().map(|(_, j, _)| j).collect();
        ids.sort();
        ids.dedup();
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id {}",
            in_json(self.backend(), 1)
        );
        let ids_json = to_json(&ids);
        let job_rows: Vec<JobRow> = on_tx!(&mut tx, c => sqlx::query_as(&sql)
            .bind(&ids_json)
            .fetch_all(&mut *c)
            .await)?;
        let mut jobs: BTreeMap<String, JobRecord> = BTreeMap::new();
        for row in job_rows {
            let job = JobRecord::try_from(row)?;
            jobs.insert(job.id.clone(), job);
        }
        // A protected job is handed out only while its spec still has the
        // hash its approval holds for; changed, it waits for a new one.
        let mut changed = std::collections::BTreeSet::new();
        for job in jobs.values() {
            if let Some(approved) = &job.approved_hash {
                let (hash, spec) = tx.job_spec_hash(job).await?;
                if hash != *approved {
                    tracing::warn!(job = %job.id, "spec changed after approval: the job waits for a new approval");
                    tx.reapprove_job(job, &hash, &spec, now).await?;
                    changed.insert(job.id.clone());
                }
            }
        }
        for id in &ids {
            if !changed.contains(*id) {
                tx.recompute_job(id, now).await?;
            }
        }
        let rows: Vec<(String, String, i64)> = rows
            .into_iter()
            .filter(|(_, job_id, _)| !changed.contains(job_id))
            .collect();
        let mut claimed = Vec::with_capacity(rows.len());
        for (attempt_id, job_id, not_before) in rows {
            let job = jobs.get(&job_id).ok_or_else(|| Error::NotFound {
                what: "job",
                id: job_id.clone(),
            })?;
            claimed.push(Claimed {
                attempt_id,
                job_id: job_id.clone(),
                action: job.action.clone(),
                argv: job.argv.clone(),
                env: job.env.clone(),
                timeout_ms: job.timeout_ms,
                kill_grace_ms: job.kill_grace_ms,
                artifacts: job.artifacts.clone(),
                sandbox: job.sandbox.clone(),
                workspace: job.workspace.clone(),
                spec_sig: job.spec_sig.clone(),
                ready_at: from_ms(not_before),
            });
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// Puts back in the queue the attempts dispatched to this agent before
    /// `now` that it does not hold (`known` lists all it holds) and that it
    /// never reported started: the answer carrying them was lost. Returns
    /// (attempt, job) of each.
    pub async fn requeue_unreceived(
        &self,
        agent_id: &str,
        known: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, String)>> {
        // Usually every dispatched attempt is known: find out with a read,
        // so that a poll costs no write.
        let dispatched: Vec<String> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT id FROM attempts WHERE agent_id = $1 AND state = 'dispatched' AND started_at IS NULL \
             AND dispatched_at < $2",
        )
        .bind(agent_id)
        .bind(to_ms(now))
        .fetch_all(p)
        .await)?;
        if dispatched.iter().all(|id| known.contains(id)) {
            return Ok(Vec::new());
        }
        let sql = format!(
            "UPDATE attempts SET state = 'queued', dispatched_at = NULL, lease_expires_at = NULL, \
             reason = 'queued again: the assignment never reached the agent' \
             WHERE agent_id = $1 AND state = 'dispatched' AND started_at IS NULL AND dispatched_at < $2 \
             AND NOT (id {}) RETURNING id, job_id",
            in_json(self.backend(), 3)
        );
        let known_json = to_json(known);
        let mut tx = self.begin().await?;
        let rows: Vec<(String, String)> = on_tx!(&mut tx, c => sqlx::query_as(&sql)
            .bind(agent_id)
            .bind(to_ms(now))
            .bind(&known_json)
            .fetch_all(&mut *c)
            .await)?;
        let jobs: std::collections::BTreeSet<&String> = rows.iter().map(|(_, j)| j).collect();
        for job in jobs {
            tx.recompute_job(job, now).await?;
        }
        if !rows.is_empty() {
            tx.changes.agents.insert(agent_id.to_owned());
        }
        tx.commit().await?;
        Ok(rows)
    }

    /// The earliest time a queued attempt of this agent becomes runnable.
    pub async fn next_ready_at(&self, agent_id: &str) -> Result<Option<DateTime<Utc>>> {
        let sql = "SELECT MIN(not_before) FROM attempts WHERE agent_id = $1 AND state = 'queued'";
        let t: Option<i64> =
            on_pool!(self, p => sqlx::query_scalar(sql).bind(agent_id).fetch_one(p).await)?;
        Ok(t.map(from_ms))
    }

    /// Attempts of this agent that must be cancelled, each with whether
    /// to kill it at once: those asked to stop, and every one while the
    /// agent or the fleet is stopped (`gate`).
    pub async fn cancels_for_agent(
        &self,
        agent_id: &str,
        gate: &crate::fleet::Gate,
    ) -> Result<Vec<(String, bool)>> {
        let sql = "SELECT id, cancel_force FROM attempts WHERE agent_id = $1 \
                   AND (cancel_requested = 1 OR $2 = 1) \
                   AND state IN ('dispatched', 'running') ORDER BY id";
        let rows: Vec<(String, i64)> = on_pool!(self, p => sqlx::query_as(sql)
            .bind(agent_id)
            .bind(i64::from(gate.stopping()))
            .fetch_all(p)
            .await)?;
        Ok(rows
            .into_iter()
            .map(|(id, force)| (id, force != 0 || gate.killing()))
            .collect())
    }

    /// Whose attempt this is.
    /// The first of `attempt_ids` that belongs to another agent than
    /// `agent_id`, if any: one statement for the whole batch.
    pub async fn foreign_attempt(
        &self,
        agent_id: &str,
        attempt_ids: &[String],
    ) -> Result<Option<String>> {
        if attempt_ids.is_empty() {
            return Ok(None);
        }
        let sql = format!(
            "SELECT id FROM attempts WHERE agent_id <> $1 AND id {} ORDER BY id LIMIT 1",
            in_json(self.backend(), 2)
        );
        let ids = to_json(attempt_ids);
        Ok(
            on_pool!(self, p => sqlx::query_scalar(&sql).bind(agent_id).bind(&ids).fetch_optional(p).await)?,
        )
    }

    pub async fn attempt_owner(&self, attempt_id: &str, agent_id: &str) -> Result<Ownership> {
        let sql = "SELECT agent_id, job_id FROM attempts WHERE id = $1";
        let row: Option<(String, String)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(attempt_id).fetch_optional(p).await)?;
        Ok(ownership(row, agent_id))
    }

    /// Marks a dispatched attempt running.
    pub async fn mark_started(
        &self,
        attempt_id: &str,
        agent_id: &str,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Ownership> {
        let mut tx = self.begin().await?;
        let owner = tx
            .mark_started(attempt_id, agent_id, started_at, now)
            .await?;
        tx.commit().await?;
        Ok(owner)
    }

    /// Extends the leases of this agent's live attempts among `ids`, in one
    /// statement. Attempts that are final, cancelled, unknown or another
    /// agent's are to be cancelled, and every one while the agent or the
    /// fleet is stopped (`gate`); forced stops are also to be killed.
    pub async fn renew_leases(
        &self,
        agent_id: &str,
        ids: &[String],
        until: DateTime<Utc>,
        gate: &crate::fleet::Gate,
    ) -> Result<Renewed> {
        let mut out = Renewed::default();
        if gate.stopping() {
            out.cancel = ids.to_vec();
            if gate.killing() {
                out.kill = ids.to_vec();
            }
            return Ok(out);
        }
        if ids.is_empty() {
            return Ok(out);
        }
        let ids_json = to_json(ids);
        let sql = format!(
            "UPDATE attempts SET lease_expires_at = $1 WHERE agent_id = $2 \
             AND state IN ('dispatched', 'running') AND cancel_requested = 0 AND id {} RETURNING id",
            in_json(self.backend(), 3)
        );
        let mut tx = self.begin().await?;
        let renewed: Vec<String> = on_tx!(&mut tx, c => sqlx::query_scalar(&sql)
            .bind(to_ms(until))
            .bind(agent_id)
            .bind(&ids_json)
            .fetch_all(&mut *c)
            .await)?;
        tx.commit().await?;
        for id in ids {
            if renewed.contains(id) {
                out.renewed.push(id.clone());
            } else {
                out.cancel.push(id.clone());
            }
        }
        if !out.cancel.is_empty() {
            out.kill = self.forced_among(agent_id, &out.cancel).await?;
        }
        Ok(out)
    }

    /// Which of these attempts of an agent were asked to stop at once.
    async fn forced_among(&self, agent_id: &str, ids: &[String]) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT id FROM attempts WHERE agent_id = $1 AND cancel_force <> 0 AND id {} ORDER BY id",
            in_json(self.backend(), 2)
        );
        let ids_json = to_json(ids);
        Ok(on_pool!(self, p => sqlx::query_scalar(&sql)
            .bind(agent_id)
            .bind(&ids_json)
            .fetch_all(p)
            .await)?)
    }

    /// Records an attempt's result once, queues a retry if the job's policy
    /// asks for one, and updates the job, all in one transaction.
    pub async fn record_result(
        &self,
        agent_id: &str,
        result: &AttemptResult,
        jitter: f64,
        now: DateTime<Utc>,
    ) -> Result<Recorded> {
        let mut tx = self.begin().await?;
        let recorded = tx.record_result(agent_id, result, jitter, now).await?;
        match recorded {
            Recorded::Recorded { .. } | Recorded::Late { .. } => {
                tx.commit().await?;
            }
            _ => tx.rollback().await?,
        }
        Ok(recorded)
    }

    /// Marks attempts whose lease ran out as lost and queues retries.
    pub async fn expire_leases(&self, jitter: f64, now: DateTime<Utc>) -> Result<Vec<Expired>> {
        // Usually nothing expired: find out with a read.
        let any: Option<String> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT id FROM attempts WHERE state IN ('dispatched', 'running') AND lease_expires_at < $1 LIMIT 1",
        )
        .bind(to_ms(now))
        .fetch_optional(p)
        .await)?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let rows: Vec<(String, String, String, i64)> = on_tx!(&mut tx, c => sqlx::query_as(
            "UPDATE attempts SET state = 'lost', reason = 'agent stopped renewing its lease', \
             lease_expires_at = NULL \
             WHERE state IN ('dispatched', 'running') AND lease_expires_at < $1 \
             RETURNING id, job_id, agent_id, number",
        )
        .bind(to_ms(now))
        .fetch_all(&mut *c)
        .await)?;
        let mut out = Vec::with_capacity(rows.len());
        for (attempt_id, job_id, agent_id, number) in rows {
            let retried = tx
                .queue_retry(&job_id, &agent_id, number, JobState::Lost, jitter, now)
                .await?;
            tx.recompute_job(&job_id, now).await?;
            out.push(Expired {
                attempt_id,
                job_id,
                agent_id,
                retried,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Ends every unfinished attempt of an agent that can no longer run
    /// them (it was revoked): they become lost with `reason`, without retry.
    /// Returns the jobs that changed.
    pub async fn abandon_agent_attempts(
        &self,
        agent_id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let mut tx = self.begin().await?;
        let jobs = tx.abandon_agent_attempts(agent_id, reason, now).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    /// Requests cancellation: queued attempts end at once, running ones are
    /// flagged for their agents. Returns the agents to wake.
    pub async fn cancel_job(
        &self,
        job_id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let mut tx = self.begin().await?;
        let agents = tx.cancel_job(job_id, reason, now).await?;
        tx.commit().await?;
        Ok(agents)
    }

    /// Where the output of an attempt goes, with the bytes stored so far;
    /// `None` when there is no such attempt.
    pub async fn log_target(&self, attempt_id: &str) -> Result<Option<LogTarget>> {
        /// agent, job, run, task, stdout bytes, stderr bytes
        type Row = (String, String, Option<String>, Option<String>, i64, i64);
        let row: Option<Row> = on_pool!(self, p => sqlx::query_as(
                "SELECT a.agent_id, a.job_id, j.run_id, j.task_id, \
                 COALESCE((SELECT SUM(LENGTH(data)) FROM attempt_logs l WHERE l.attempt_id = a.id AND l.stream = 'stdout'), 0), \
                 COALESCE((SELECT SUM(LENGTH(data)) FROM attempt_logs l WHERE l.attempt_id = a.id AND l.stream = 'stderr'), 0) \
                 FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.id = $1",
            )
            .bind(attempt_id)
            .fetch_optional(p)
            .await)?;
        Ok(
            row.map(|(agent_id, job_id, run_id, task_id, out, err)| LogTarget {
                agent_id,
                job_id,
                run_id,
                task_id,
                used: [out, err],
            }),
        )
    }

    /// Stores one chunk of output, once per (attempt, stream, seq), while the
    /// stream is under `cap` bytes. Callers on the hot path keep the
    /// [`LogTarget`] and use `Tx::append_log`.
    pub async fn append_log(
        &self,
        agent_id: &str,
        attempt_id: &str,
        stream: Stream,
        seq: i64,
        data: &str,
        cap: i64,
    ) -> Result<Appended> {
        let Some(target) = self.log_target(attempt_id).await? else {
            return Ok(Appended::NotFound);
        };
        if target.agent_id != agent_id {
            return Ok(Appended::Foreign);
        }
        let used = target.used[usize::from(stream == Stream::Stderr)];
        if used + data.len() as i64 > cap {
            return Ok(Appended::OverCap);
        }
        let mut tx = self.begin().await?;
        let inserted = tx
            .append_log(&target, attempt_id, stream, seq, data, Utc::now())
            .await?;
        tx.commit().await?;
        Ok(if inserted {
            Appended::Stored {
                job_id: target.job_id,
            }
        } else {
            Appended::Duplicate {
                job_id: target.job_id,
            }
        })
    }
}

impl Tx {
    /// Ends every unfinished attempt of an agent that can no longer run
    /// them (it was revoked): they become lost with `reason`, without
    /// retry. Returns the jobs that changed.
    pub async fn abandon_agent_attempts(
        &mut self,
        agent_id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let mut jobs: Vec<String> = on_tx!(self, c => sqlx::query_scalar(
            "UPDATE attempts SET state = 'lost', reason = $1, finished_at = $2, lease_expires_at = NULL \
             WHERE agent_id = $3 AND state IN ('queued', 'dispatched', 'running') RETURNING job_id",
        )
        .bind(reason)
        .bind(to_ms(now))
        .bind(agent_id)
        .fetch_all(&mut *c)
        .await)?;
        jobs.sort();
        jobs.dedup();
        for job_id in &jobs {
            self.recompute_job(job_id, now).await?;
        }
        Ok(jobs)
    }

    /// A job as this transaction sees it.
    pub async fn job_record(&mut self, job_id: &str) -> Result<JobRecord> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row: Option<JobRow> =
            on_tx!(self, c => sqlx::query_as(&sql).bind(job_id).fetch_optional(&mut *c).await)?;
        row.map(JobRecord::try_from)
            .transpose()?
            .ok_or_else(|| Error::NotFound {
                what: "job",
                id: job_id.to_owned(),
            })
    }

    /// Requests cancellation: queued attempts end at once, running ones
    /// are flagged for their agents. Returns the agents to tell.
    pub async fn cancel_job(
        &mut self,
        job_id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let found = on_tx!(self, c => sqlx::query(
            "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, $1) WHERE id = $2",
        )
        .bind(to_ms(now))
        .bind(job_id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if found == 0 {
            return Err(Error::NotFound {
                what: "job",
                id: job_id.to_owned(),
            });
        }
        on_tx!(self, c => sqlx::query(
            "UPDATE attempts SET state = 'cancelled', reason = $1, finished_at = $2 \
             WHERE job_id = $3 AND state IN ('queued', 'awaiting_approval')",
        )
        .bind(reason)
        .bind(to_ms(now))
        .bind(job_id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        self.cancel_approvals_of(job_id, reason, now).await?;
        let agents: Vec<String> = on_tx!(self, c => sqlx::query_scalar(
            "UPDATE attempts SET cancel_requested = 1, reason = $1 \
             WHERE job_id = $2 AND state IN ('dispatched', 'running') RETURNING agent_id",
        )
        .bind(reason)
        .bind(job_id)
        .fetch_all(&mut *c)
        .await)?;
        self.changes.agents.extend(agents.iter().cloned());
        self.recompute_job(job_id, now).await?;
        Ok(agents)
    }

    /// Appends to the audit log's hash chain (`crate::audit`). Make it the
    /// transaction's last write: it holds the chain's head until the commit.
    pub async fn audit(&mut self, entry: &AuditEntry<'_>, now: DateTime<Utc>) -> Result<()> {
        self.append_audit(entry, to_ms(now)).await
    }
}

/// One audit entry to append: who (`actor`, from `source`) did what
/// (`action`, e.g. `job.cancel`) to what (`target`, e.g. `job:ID`), with
/// which details (`detail`, a JSON object: reason, action, selector …),
/// through which call (`request`, e.g. `POST /api/v1/jobs/{id}/cancel`;
/// empty outside the API), and how it ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditEntry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub request: &'a str,
    pub source: &'a str,
    pub detail: &'a str,
}

impl Store {
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row: Option<JobRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(id).fetch_optional(p).await)?;
        row.map(JobRecord::try_from).transpose()
    }

    /// Resolves a full job id or a unique prefix (at least 4 characters).
    pub async fn resolve_job_id(&self, id_or_prefix: &str) -> Result<String> {
        self.resolve_id("jobs", "job", id_or_prefix).await
    }

    /// Jobs, newest first, optionally in one state.
    pub async fn list_jobs(&self, state: Option<JobState>, limit: i64) -> Result<Vec<JobRecord>> {
        let rows: Vec<JobRow> = match state {
            Some(s) => {
                let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state = $1 ORDER BY created_at DESC, id DESC LIMIT $2");
                on_pool!(self, p => sqlx::query_as(&sql).bind(s.as_str()).bind(limit).fetch_all(p).await)?
            }
            None => {
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, id DESC LIMIT $1"
                );
                on_pool!(self, p => sqlx::query_as(&sql).bind(limit).fetch_all(p).await)?
            }
        };
        rows.into_iter().map(JobRecord::try_from).collect()
    }

    /// Every attempt of a job, in order.
    pub async fn attempts(&self, job_id: &str) -> Result<Vec<AttemptRecord>> {
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = $1 ORDER BY agent_id, number"
        );
        let rows: Vec<AttemptRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(job_id).fetch_all(p).await)?;
        rows.into_iter().map(AttemptRecord::try_from).collect()
    }

    /// Attempts of this agent that hold a slot (dispatched or running).
    pub async fn busy_attempts(&self, agent_id: &str) -> Result<i64> {
        let sql = "SELECT COUNT(*) FROM attempts WHERE agent_id = $1 AND state IN ('dispatched', 'running')";
        Ok(on_pool!(self, p => sqlx::query_scalar(sql).bind(agent_id).fetch_one(p).await)?)
    }

    /// Output of a job after cursor `after`, in order.
    pub async fn logs_after(&self, job_id: &str, after: i64, limit: i64) -> Result<Vec<LogRecord>> {
        let sql =
            "SELECT id, attempt_id, stream, data FROM attempt_logs WHERE job_id = $1 AND id > $2 \
                   ORDER BY id LIMIT $3";
        Ok(
            on_pool!(self, p => sqlx::query_as(sql).bind(job_id).bind(after).bind(limit).fetch_all(p).await)?,
        )
    }

    /// Number of jobs in each state.
    pub async fn count_jobs_by_state(&self) -> Result<Vec<(String, i64)>> {
        let sql = "SELECT state, COUNT(*) FROM jobs GROUP BY state";
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?)
    }

    /// Attempts waiting to be dispatched.
    pub async fn queue_depth(&self) -> Result<i64> {
        let sql = "SELECT COUNT(*) FROM attempts WHERE state = 'queued'";
        Ok(on_pool!(self, p => sqlx::query_scalar(sql).fetch_one(p).await)?)
    }

    /// Appends to the audit log.
    pub async fn audit(&self, entry: &AuditEntry<'_>, now: DateTime<Utc>) -> Result<()> {
        let mut tx = self.begin().await?;
        tx.audit(entry, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Audit entries, newest first.
    pub async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let sql = "SELECT id, at, actor, action, target, status, outcome, request, source, detail \
                   FROM audit WHERE ($1 IS NULL OR actor = $1) \
                   AND ($2 IS NULL OR LOWER(action) LIKE $2 OR LOWER(request) LIKE $2) AND ($3 IS NULL OR at >= $3) \
                   AND ($4 IS NULL OR target LIKE $4 ESCAPE '\\') \
                   AND ($6 IS NULL OR id < $6) \
                   ORDER BY id DESC LIMIT $5";
        // Case-insensitive on both engines (SQLite's LIKE is, PostgreSQL's
        // is not).
        let action = f.action.as_ref().map(|a| format!("%{}%", a.to_lowercase()));
        // `job:01J` matches `job:01J…`: a target given with an id prefix.
        let target = f.target.as_ref().map(|t| {
            let escaped: String = t
                .chars()
                .flat_map(|c| match c {
                    '%' | '_' | '\\' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            format!("{escaped}%")
        });
        Ok(on_pool!(self, p => sqlx::query_as(sql)
            .bind(&f.actor)
            .bind(&action)
            .bind(f.since.map(to_ms))
            .bind(&target)
            .bind(f.limit)
            .bind(f.before)
            .fetch_all(p)
            .await)?)
    }
}

/// Filters of `page_jobs`; `None` is no filter.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    /// The action's exact name.
    pub action: Option<String>,
    /// The user who submitted it, exactly.
    pub created_by: Option<String>,
    /// The start of its id (case-insensitive).
    pub id_prefix: Option<String>,
}

/// How many agents and attempts a job has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptCounts {
    pub agents: i64,
    pub attempts: i64,
    /// Attempts that ended succeeded.
    pub succeeded: i64,
}

impl Store {
    /// One page of jobs, newest first, and how many match in all: the
    /// dashboard's list. Only the filters given become SQL conditions, so
    /// the unfiltered page walks the `(created_at, id)` index.
    pub async fn page_jobs(
        &self,
        f: &JobFilter,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<JobRecord>, i64)> {
        let mut binds: Vec<String> = Vec::new();
        let mut conditions: Vec<String> = Vec::new();
        let mut add = |column: &str, op: &str, value: String| {
            binds.push(value);
            conditions.push(format!("{column} {op} ${}", binds.len()));
        };
        if let Some(s) = f.state {
            add("state", "=", s.as_str().to_owned());
        }
        if let Some(a) = &f.action {
            add("action", "=", a.clone());
        }
        if let Some(u) = &f.created_by {
            add("created_by", "=", u.clone());
        }
        if let Some(p) = &f.id_prefix {
            add(
                "id",
                "LIKE",
                format!("{}%", like_escape(&p.to_ascii_lowercase())),
            );
            if let Some(c) = conditions.last_mut() {
                c.push_str(" ESCAPE '\\'");
            }
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let n = binds.len();
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY created_at DESC, id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let count = format!("SELECT COUNT(*) FROM jobs {filter}");
        let rows: Vec<JobRow> = on_pool!(self, p => {
            let mut q = sqlx::query_as(&sql);
            for b in &binds {
                q = q.bind(b);
            }
            q.bind(limit.max(0)).bind(offset.max(0)).fetch_all(p).await
        })?;
        let total: i64 = on_pool!(self, p => {
            let mut q = sqlx::query_scalar(&count);
            for b in &binds {
                q = q.bind(b);
            }
            q.fetch_one(p).await
        })?;
        let jobs = rows
            .into_iter()
            .map(JobRecord::try_from)
            .collect::<Result<Vec<_>>>()?;
        Ok((jobs, total))
    }

    /// Agents and attempts of each of these jobs (absent: none).
    pub async fn attempt_counts(
        &self,
        job_ids: &[String],
    ) -> Result<std::collections::HashMap<String, AttemptCounts>> {
        if job_ids.is_empty() {
            return Ok(Default::default());
        }
        let sql = format!(
            "SELECT job_id, COUNT(DISTINCT agent_id), COUNT(*), \
             SUM(CASE WHEN state = 'succeeded' THEN 1 ELSE 0 END) \
             FROM attempts WHERE job_id {} GROUP BY job_id",
            in_json(self.backend(), 1)
        );
        let ids = to_json(job_ids);
        let rows: Vec<(String, i64, i64, i64)> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(&ids).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(id, agents, attempts, succeeded)| {
                (
                    id,
                    AttemptCounts {
                        agents,
                        attempts,
                        succeeded,
                    },
                )
            })
            .collect())
    }

    /// The latest `limit` attempts handed to an agent, newest first.
    pub async fn attempts_of_agent(
        &self,
        agent_id: &str,
        limit: i64,
    ) -> Result<Vec<AttemptRecord>> {
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE agent_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        );
        let rows: Vec<AttemptRow> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(agent_id)
            .bind(limit.max(0))
            .fetch_all(p)
            .await)?;
        rows.into_iter().map(AttemptRecord::try_from).collect()
    }
}

/// `s` with LIKE's wildcards and the escape character escaped (`\`).
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// JSON text of a value stored as text; these types always serialize.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}
