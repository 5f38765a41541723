//! The action catalog, jobs, attempts (dispatch, leases, results, retries),
//! their output, and the audit log.
//!
//! Every transition of an attempt recomputes its job's state in the same
//! transaction, so a job's state never disagrees with its attempts.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use drover_proto::jobs::{aggregate_state, AttemptResult, JobState, RetryPolicy, Stream};
use drover_proto::sandbox::{LimitExceeded, Sandbox, WorkspaceSpec};

use crate::{from_ms, new_id, on_pool, to_ms, Error, Result, Store};

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
}

const JOB_COLUMNS: &str =
    "id, action, target, params, argv, env, timeout_ms, kill_grace_ms, retry, state, \
                           created_by, created_at, finished_at, cancel_requested_at, run_id, task_id, artifacts, \
                           sandbox, workspace";

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
            run_id: r.run_id,
            task_id: r.task_id,
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
}

const ATTEMPT_COLUMNS: &str = "id, job_id, agent_id, number, state, reason, created_at, not_before, dispatched_at, \
     started_at, lease_expires_at, finished_at, exit_code, signal, duration_ms, error, stdout_truncated, \
     stderr_truncated, cancel_requested, cancel_force, limit_exceeded";

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
}

/// Filters of `list_audit`.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    /// Substring of the action, e.g. "jobs".
    pub action: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// Recomputes and stores a job's state from the latest attempt per agent.
/// Returns the new state. Must run inside the caller's transaction.
macro_rules! recompute_job {
    ($tx:expr, $job_id:expr, $now:expr) => {{
        // Lock the job row first. Two attempts of one job ending at once
        // would otherwise each read the other as still running (under
        // PostgreSQL's READ COMMITTED) and leave the job running for good;
        // after the lock, the read below sees the other's committed change.
        sqlx::query("UPDATE jobs SET state = state WHERE id = $1")
            .bind($job_id)
            .execute(&mut *$tx)
            .await?;
        let states: Vec<String> = sqlx::query_scalar(
            "SELECT a.state FROM attempts a WHERE a.job_id = $1 AND a.number = \
             (SELECT MAX(b.number) FROM attempts b WHERE b.job_id = a.job_id AND b.agent_id = a.agent_id)",
        )
        .bind($job_id)
        .fetch_all(&mut *$tx)
        .await?;
        let parsed = states.iter().map(|s| parse_state(s)).collect::<Result<Vec<_>>>()?;
        let state = aggregate_state(&parsed);
        let finished = state.is_final().then(|| to_ms($now));
        sqlx::query(
            "UPDATE jobs SET state = $1, finished_at = CASE WHEN $2 IS NULL THEN NULL ELSE COALESCE(finished_at, $2) END \
             WHERE id = $3",
        )
        .bind(state.as_str())
        .bind(finished)
        .bind($job_id)
        .execute(&mut *$tx)
        .await?;
        Ok::<JobState, Error>(state)
    }};
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
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let updated = sqlx::query(&update)
                .bind(spec_json)
                .bind(hash)
                .bind(to_ms(now))
                .bind(by)
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if updated == 1 {
                tx.commit().await?;
                return Ok(Upsert::Updated);
            }
            let inserted = sqlx::query(&insert)
                .bind(name)
                .bind(spec_json)
                .bind(hash)
                .bind(to_ms(now))
                .bind(by)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(if inserted == 1 { Upsert::Created } else { Upsert::Unchanged })
        })
    }

    pub async fn list_actions(&self) -> Result<Vec<ActionRecord>> {
        let sql = "SELECT name, spec, hash, updated_at FROM actions ORDER BY name";
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?)
    }

    pub async fn action(&self, name: &str) -> Result<Option<ActionRecord>> {
        let sql = "SELECT name, spec, hash, updated_at FROM actions WHERE name = $1";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(name).fetch_optional(p).await)?)
    }

    /// Creates a job and one queued attempt per agent, atomically.
    pub async fn create_job(&self, job: NewJob<'_>, now: DateTime<Utc>) -> Result<String> {
        let id = new_id();
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            insert_job!(tx, &id, &job, None::<&str>, None::<&str>, now);
            tx.commit().await?;
            Ok::<(), Error>(())
        })?;
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
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let rows: Vec<(String, String, i64)> = sqlx::query_as(claim)
                .bind(to_ms(now))
                .bind(to_ms(lease_until))
                .bind(agent_id)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            let mut claimed = Vec::with_capacity(rows.len());
            let mut jobs: BTreeMap<String, JobRecord> = BTreeMap::new();
            for (attempt_id, job_id, not_before) in rows {
                if !jobs.contains_key(&job_id) {
                    let row: JobRow = sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
                        .bind(&job_id)
                        .fetch_one(&mut *tx)
                        .await?;
                    jobs.insert(job_id.clone(), JobRecord::try_from(row)?);
                    recompute_job!(tx, &job_id, now)?;
                }
                let job = &jobs[&job_id];
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
                    ready_at: from_ms(not_before),
                });
            }
            tx.commit().await?;
            Ok(claimed)
        })
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
        let known_json = to_json(known);
        let sql = match self.backend() {
            crate::Backend::Sqlite => {
                "UPDATE attempts SET state = 'queued', dispatched_at = NULL, lease_expires_at = NULL, \
                 reason = 'queued again: the assignment never reached the agent' \
                 WHERE agent_id = $1 AND state = 'dispatched' AND started_at IS NULL AND dispatched_at < $2 \
                 AND id NOT IN (SELECT value FROM json_each($3)) RETURNING id, job_id"
            }
            crate::Backend::Postgres => {
                "UPDATE attempts SET state = 'queued', dispatched_at = NULL, lease_expires_at = NULL, \
                 reason = 'queued again: the assignment never reached the agent' \
                 WHERE agent_id = $1 AND state = 'dispatched' AND started_at IS NULL AND dispatched_at < $2 \
                 AND id <> ALL (SELECT jsonb_array_elements_text($3::jsonb)) RETURNING id, job_id"
            }
        };
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let rows: Vec<(String, String)> = sqlx::query_as(sql)
                .bind(agent_id)
                .bind(to_ms(now))
                .bind(&known_json)
                .fetch_all(&mut *tx)
                .await?;
            let jobs: std::collections::BTreeSet<&String> = rows.iter().map(|(_, j)| j).collect();
            for job in jobs {
                recompute_job!(tx, job, now)?;
            }
            tx.commit().await?;
            Ok(rows)
        })
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
    pub async fn attempt_owner(&self, attempt_id: &str, agent_id: &str) -> Result<Ownership> {
        let sql = "SELECT agent_id, job_id FROM attempts WHERE id = $1";
        let row: Option<(String, String)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(attempt_id).fetch_optional(p).await)?;
        Ok(match row {
            None => Ownership::NotFound,
            Some((owner, _)) if owner != agent_id => Ownership::Foreign,
            Some((_, job_id)) => Ownership::Owned { job_id },
        })
    }

    /// Marks a dispatched attempt running.
    pub async fn mark_started(
        &self,
        attempt_id: &str,
        agent_id: &str,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Ownership> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let job: Option<String> = sqlx::query_scalar(
                "UPDATE attempts SET state = 'running', started_at = $1 \
                 WHERE id = $2 AND agent_id = $3 AND state = 'dispatched' RETURNING job_id",
            )
            .bind(to_ms(started_at))
            .bind(attempt_id)
            .bind(agent_id)
            .fetch_optional(&mut *tx)
            .await?;
            match job {
                Some(job_id) => {
                    recompute_job!(tx, &job_id, now)?;
                    tx.commit().await?;
                    Ok(Ownership::Owned { job_id })
                }
                None => {
                    tx.rollback().await?;
                    self.attempt_owner(attempt_id, agent_id).await
                }
            }
        })
    }

    /// Extends the leases of this agent's live attempts among `ids`.
    /// Attempts that are final, cancelled, unknown or another agent's are
    /// to be cancelled, and every one while the agent or the fleet is
    /// stopped (`gate`); forced stops are also to be killed.
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
        }
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for id in ids {
                if gate.stopping() {
                    break;
                }
                let ok = sqlx::query(
                    "UPDATE attempts SET lease_expires_at = $1 WHERE id = $2 AND agent_id = $3 \
                     AND state IN ('dispatched', 'running') AND cancel_requested = 0",
                )
                .bind(to_ms(until))
                .bind(id)
                .bind(agent_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if ok == 1 {
                    out.renewed.push(id.clone());
                } else {
                    out.cancel.push(id.clone());
                }
            }
            tx.commit().await?;
            Ok::<(), Error>(())
        })?;
        if !gate.killing() && !out.cancel.is_empty() {
            out.kill = self.forced_among(agent_id, &out.cancel).await?;
        }
        Ok(out)
    }

    /// Which of these attempts of an agent were asked to stop at once.
    async fn forced_among(&self, agent_id: &str, ids: &[String]) -> Result<Vec<String>> {
        let mut forced = Vec::new();
        for id in ids {
            let sql = "SELECT cancel_force FROM attempts WHERE id = $1 AND agent_id = $2";
            let f: Option<i64> = on_pool!(self, p => sqlx::query_scalar(sql)
                .bind(id)
                .bind(agent_id)
                .fetch_optional(p)
                .await)?;
            if f.is_some_and(|f| f != 0) {
                forced.push(id.clone());
            }
        }
        Ok(forced)
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
        let state = result.outcome.state();
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            // A result also counts for an attempt already marked lost: the
            // agent was only out of touch, and its report is the truth.
            let updated: Option<(String, i64)> = sqlx::query_as(
                "UPDATE attempts SET state = $1, finished_at = $2, exit_code = $3, signal = $4, duration_ms = $5, \
                 error = $6, stdout_truncated = $7, stderr_truncated = $8, started_at = COALESCE(started_at, $9), \
                 reason = NULL, lease_expires_at = NULL, outputs = $12, limit_exceeded = $13 \
                 WHERE id = $10 AND agent_id = $11 AND state IN ('dispatched', 'running', 'lost') \
                 AND finished_at IS NULL \
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
            .fetch_optional(&mut *tx)
            .await?;
            let Some((job_id, number)) = updated else {
                tx.rollback().await?;
                return Ok(match self.attempt_owner(&result.attempt_id, agent_id).await? {
                    Ownership::Owned { job_id } => Recorded::Duplicate { job_id },
                    Ownership::NotFound => Recorded::NotFound,
                    Ownership::Foreign => Recorded::Foreign,
                });
            };
            let retry_agent = queue_retry!(tx, &job_id, agent_id, number, state, jitter, now);
            recompute_job!(tx, &job_id, now)?;
            tx.commit().await?;
            Ok(Recorded::Recorded { job_id, retry_agent })
        })
    }

    /// Marks attempts whose lease ran out as lost and queues retries.
    pub async fn expire_leases(&self, jitter: f64, now: DateTime<Utc>) -> Result<Vec<Expired>> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
                "UPDATE attempts SET state = 'lost', reason = 'agent stopped renewing its lease', \
                 lease_expires_at = NULL \
                 WHERE state IN ('dispatched', 'running') AND lease_expires_at < $1 \
                 RETURNING id, job_id, agent_id, number",
            )
            .bind(to_ms(now))
            .fetch_all(&mut *tx)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for (attempt_id, job_id, agent_id, number) in rows {
                let retried = queue_retry!(tx, &job_id, &agent_id, number, JobState::Lost, jitter, now).is_some();
                recompute_job!(tx, &job_id, now)?;
                out.push(Expired { attempt_id, job_id, agent_id, retried });
            }
            tx.commit().await?;
            Ok(out)
        })
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
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let mut jobs: Vec<String> = sqlx::query_scalar(
                "UPDATE attempts SET state = 'lost', reason = $1, finished_at = $2, lease_expires_at = NULL \
                 WHERE agent_id = $3 AND state IN ('queued', 'dispatched', 'running') RETURNING job_id",
            )
            .bind(reason)
            .bind(to_ms(now))
            .bind(agent_id)
            .fetch_all(&mut *tx)
            .await?;
            jobs.sort();
            jobs.dedup();
            for job_id in &jobs {
                recompute_job!(tx, job_id, now)?;
            }
            tx.commit().await?;
            Ok(jobs)
        })
    }

    /// Requests cancellation: queued attempts end at once, running ones are
    /// flagged for their agents. Returns the agents to wake.
    pub async fn cancel_job(
        &self,
        job_id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let found = sqlx::query(
                "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, $1) WHERE id = $2",
            )
            .bind(to_ms(now))
            .bind(job_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if found == 0 {
                tx.rollback().await?;
                return Err(Error::NotFound { what: "job", id: job_id.to_owned() });
            }
            sqlx::query(
                "UPDATE attempts SET state = 'cancelled', reason = $1, finished_at = $2 \
                 WHERE job_id = $3 AND state = 'queued'",
            )
            .bind(reason)
            .bind(to_ms(now))
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            let agents: Vec<String> = sqlx::query_scalar(
                "UPDATE attempts SET cancel_requested = 1, reason = $1 \
                 WHERE job_id = $2 AND state IN ('dispatched', 'running') RETURNING agent_id",
            )
            .bind(reason)
            .bind(job_id)
            .fetch_all(&mut *tx)
            .await?;
            recompute_job!(tx, job_id, now)?;
            tx.commit().await?;
            Ok(agents)
        })
    }

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

    /// Stores one chunk of output, once per (attempt, stream, seq), while the
    /// stream is under `cap` bytes.
    pub async fn append_log(
        &self,
        agent_id: &str,
        attempt_id: &str,
        stream: Stream,
        seq: i64,
        data: &str,
        cap: i64,
    ) -> Result<Appended> {
        let job_id = match self.attempt_owner(attempt_id, agent_id).await? {
            Ownership::Owned { job_id } => job_id,
            Ownership::NotFound => return Ok(Appended::NotFound),
            Ownership::Foreign => return Ok(Appended::Foreign),
        };
        let used: i64 = on_pool!(self, p => sqlx::query_scalar(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM attempt_logs WHERE attempt_id = $1 AND stream = $2",
        )
        .bind(attempt_id)
        .bind(stream.as_str())
        .fetch_one(p)
        .await)?;
        if used + data.len() as i64 > cap {
            return Ok(Appended::OverCap);
        }
        let run: Option<(Option<String>, Option<String>)> = on_pool!(self, p => sqlx::query_as(
            "SELECT run_id, task_id FROM jobs WHERE id = $1",
        )
        .bind(&job_id)
        .fetch_optional(p)
        .await)?;
        let now = Utc::now();
        let inserted = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO attempt_logs (job_id, attempt_id, stream, seq, data) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (attempt_id, stream, seq) DO NOTHING",
            )
            .bind(&job_id)
            .bind(attempt_id)
            .bind(stream.as_str())
            .bind(seq)
            .bind(data)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            // A workflow task's output is also an event of its run, in the
            // same transaction, so a stream resumed by event id misses none.
            if let (1, Some((Some(run_id), task_id))) = (inserted, &run) {
                crate::workflows::emit!(tx, run_id, "log", task_id.as_deref(), None::<&str>,
                    Some(data), Some(stream.as_str()), now);
            }
            tx.commit().await?;
            Ok::<u64, Error>(inserted)
        })?;
        Ok(if inserted == 1 {
            Appended::Stored { job_id }
        } else {
            Appended::Duplicate { job_id }
        })
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
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        status: u16,
        outcome: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let sql = "INSERT INTO audit (at, actor, action, target, status, outcome) VALUES ($1, $2, $3, $4, $5, $6)";
        on_pool!(self, p => sqlx::query(sql)
            .bind(to_ms(now))
            .bind(actor)
            .bind(action)
            .bind(target)
            .bind(i64::from(status))
            .bind(outcome)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Audit entries, newest first.
    pub async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let sql = "SELECT id, at, actor, action, target, status, outcome FROM audit \
                   WHERE ($1 IS NULL OR actor = $1) AND ($2 IS NULL OR action LIKE $2) AND ($3 IS NULL OR at >= $3) \
                   ORDER BY id DESC LIMIT $4";
        let action = f.action.as_ref().map(|a| format!("%{a}%"));
        Ok(on_pool!(self, p => sqlx::query_as(sql)
            .bind(&f.actor)
            .bind(&action)
            .bind(f.since.map(to_ms))
            .bind(f.limit)
            .fetch_all(p)
            .await)?)
    }
}

/// Queues the next attempt on the same agent when the job's retry policy
/// asks for it (and the job is not being cancelled). Evaluates to the agent
/// id when a retry was queued. Runs inside the caller's transaction.
macro_rules! queue_retry {
    ($tx:expr, $job_id:expr, $agent_id:expr, $number:expr, $state:expr, $jitter:expr, $now:expr) => {{
        let (retry, cancelled): (String, Option<i64>) =
            sqlx::query_as("SELECT retry, cancel_requested_at FROM jobs WHERE id = $1")
                .bind($job_id)
                .fetch_one(&mut *$tx)
                .await?;
        let policy: RetryPolicy =
            serde_json::from_str(&retry).map_err(|e| corrupt("job retry")(e.to_string()))?;
        let delay = if cancelled.is_some() {
            None
        } else {
            policy.next_delay(u32::try_from($number).unwrap_or(u32::MAX), $state, $jitter)
        };
        match delay {
            Some(d) => {
                let at = $now + chrono::Duration::milliseconds(d.as_millis() as i64);
                sqlx::query(
                    "INSERT INTO attempts (id, job_id, agent_id, number, state, reason, created_at, not_before) \
                     VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7)",
                )
                .bind(new_id())
                .bind($job_id)
                .bind($agent_id)
                .bind($number + 1)
                .bind(format!("awaiting retry at {}", at.to_rfc3339()))
                .bind(to_ms($now))
                .bind(to_ms(at))
                .execute(&mut *$tx)
                .await?;
                Some($agent_id.to_owned())
            }
            None => None,
        }
    }};
}
use queue_retry;

/// Inserts a job and one queued attempt per agent. Runs inside the
/// caller's transaction.
macro_rules! insert_job {
    ($tx:expr, $id:expr, $job:expr, $run_id:expr, $task_id:expr, $now:expr) => {{
        let job: &NewJob<'_> = $job;
        sqlx::query(
            "INSERT INTO jobs (id, action, action_hash, target, params, argv, env, timeout_ms, kill_grace_ms, \
             retry, state, created_by, created_at, run_id, task_id, artifacts, sandbox, workspace) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .bind($id)
        .bind(job.action)
        .bind(job.action_hash)
        .bind(job.target)
        .bind(job.params_json)
        .bind($crate::jobs::to_json(job.argv))
        .bind($crate::jobs::to_json(job.env))
        .bind(job.timeout_ms)
        .bind(job.kill_grace_ms)
        .bind($crate::jobs::to_json(job.retry))
        .bind(drover_proto::jobs::JobState::Queued.as_str())
        .bind(job.created_by)
        .bind($crate::to_ms($now))
        .bind($run_id)
        .bind($task_id)
        .bind($crate::jobs::to_json(job.artifacts))
        .bind($crate::jobs::to_json(job.sandbox))
        .bind(job.workspace.map(|w| $crate::jobs::to_json(w)))
        .execute(&mut *$tx)
        .await?;
        for agent in job.agent_ids {
            sqlx::query(
                "INSERT INTO attempts (id, job_id, agent_id, number, state, created_at, not_before) \
                 VALUES ($1, $2, $3, 1, $4, $5, $5)",
            )
            .bind($crate::new_id())
            .bind($id)
            .bind(agent)
            .bind(drover_proto::jobs::JobState::Queued.as_str())
            .bind($crate::to_ms($now))
            .execute(&mut *$tx)
            .await?;
        }
    }};
}
pub(crate) use insert_job;

/// JSON text of a value stored as text; these types always serialize.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}
