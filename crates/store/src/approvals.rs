//! Protection rules and approval requests. A job or run that touches a
//! protected action, profile, target or workflow is stored waiting
//! (`awaiting_approval`) with a request bound to the sha256 of its
//! canonical spec; enough distinct approvals (never the requester's own)
//! release it, a rejection or the request's expiry cancels it. A job's
//! spec is checked against the approved hash again when its attempts are
//! handed out (`claim_attempts`), so a spec changed after approval waits
//! for a new one.

use chrono::{DateTime, Utc};
use drover_proto::approvals::{
    spec_hash, Approval, ApprovalState, JobSpecView, Protection, ProtectionKind,
};

use crate::jobs::{in_json, to_json, JobRecord};
use crate::tx::{on_tx, Tx};
use crate::{from_ms, new_id, on_pool, on_write, to_ms, Error, Result, Store};

/// A request to store with the work that waits for it.
#[derive(Debug, Clone)]
pub struct NewApproval<'a> {
    pub spec_hash: &'a str,
    /// The canonical spec as JSON text.
    pub spec: &'a str,
    pub reasons: &'a [String],
    pub approvers_needed: u32,
    pub requested_by: &'a str,
    pub expires_at: DateTime<Utc>,
}

/// What an approval vote did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    /// Counted; more approvals are needed.
    Counted { have: u32, need: u32 },
    /// Enough approvals: the work is released.
    Granted,
    /// The request is no longer pending.
    NotPending(ApprovalState),
    /// The requester cannot approve their own request.
    Own,
    /// The voter approved it already.
    Again,
    /// The spec changed since the request: a new request replaces it.
    Changed { new_id: String },
}

const APPROVAL_COLUMNS: &str =
    "id, job_id, run_id, spec_hash, spec, reasons, approvers_needed, requested_by, \
     requested_at, expires_at, state, decided_at, decided_by, reason";

#[derive(sqlx::FromRow)]
struct ApprovalRow {
    id: String,
    job_id: Option<String>,
    run_id: Option<String>,
    spec_hash: String,
    spec: String,
    reasons: String,
    approvers_needed: i64,
    requested_by: String,
    requested_at: i64,
    expires_at: i64,
    state: String,
    decided_at: Option<i64>,
    decided_by: Option<String>,
    reason: Option<String>,
}

fn corrupt(what: &'static str) -> impl Fn(String) -> Error {
    move |detail| Error::Corrupt { what, detail }
}

impl ApprovalRow {
    fn into_approval(self, approved_by: Vec<String>) -> Result<Approval> {
        Ok(Approval {
            state: ApprovalState::parse(&self.state)
                .ok_or_else(|| corrupt("approval state")(self.state.clone()))?,
            spec: serde_json::from_str(&self.spec)
                .map_err(|e| corrupt("approval spec")(e.to_string()))?,
            reasons: serde_json::from_str(&self.reasons)
                .map_err(|e| corrupt("approval reasons")(e.to_string()))?,
            id: self.id,
            job_id: self.job_id,
            run_id: self.run_id,
            spec_hash: self.spec_hash,
            approvers_needed: u32::try_from(self.approvers_needed).unwrap_or(1),
            approved_by,
            requested_by: self.requested_by,
            requested_at: from_ms(self.requested_at),
            expires_at: from_ms(self.expires_at),
            decided_at: self.decided_at.map(from_ms),
            decided_by: self.decided_by,
            reason: self.reason,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ProtectionRow {
    id: String,
    kind: String,
    pattern: String,
    approvers: i64,
    created_by: String,
    created_at: i64,
}

impl TryFrom<ProtectionRow> for Protection {
    type Error = Error;
    fn try_from(r: ProtectionRow) -> Result<Protection> {
        Ok(Protection {
            kind: ProtectionKind::parse(&r.kind)
                .ok_or_else(|| corrupt("protection kind")(r.kind.clone()))?,
            id: r.id,
            pattern: r.pattern,
            approvers: u32::try_from(r.approvers).unwrap_or(1),
            created_by: r.created_by,
            created_at: from_ms(r.created_at),
        })
    }
}

impl Store {
    pub async fn list_protections(&self) -> Result<Vec<Protection>> {
        let sql = "SELECT id, kind, pattern, approvers, created_by, created_at FROM protections \
                   ORDER BY kind, pattern";
        let rows: Vec<ProtectionRow> = on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        rows.into_iter().map(Protection::try_from).collect()
    }

    /// Adds a rule, or changes the approvers of the same kind and pattern.
    pub async fn protect(
        &self,
        kind: ProtectionKind,
        pattern: &str,
        approvers: u32,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let sql = "INSERT INTO protections (id, kind, pattern, approvers, created_by, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6) \
                   ON CONFLICT (kind, pattern) DO UPDATE SET approvers = excluded.approvers";
        on_write!(self, c => sqlx::query(sql)
            .bind(new_id())
            .bind(kind.as_str())
            .bind(pattern)
            .bind(i64::from(approvers))
            .bind(by)
            .bind(to_ms(now))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Removes a rule by id; false when there was none. Work already
    /// waiting keeps waiting for its request.
    pub async fn unprotect(&self, id: &str) -> Result<bool> {
        let n = on_write!(self, c => sqlx::query("DELETE FROM protections WHERE id = $1")
            .bind(id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    async fn votes(&self, ids: &[&str]) -> Result<Vec<(String, String)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT approval_id, username FROM approval_votes WHERE approval_id {} ORDER BY at, username",
            in_json(self.backend(), 1)
        );
        let json = to_json(ids);
        Ok(on_pool!(self, p => sqlx::query_as(&sql).bind(&json).fetch_all(p).await)?)
    }

    async fn with_votes(&self, rows: Vec<ApprovalRow>) -> Result<Vec<Approval>> {
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let votes = self.votes(&ids).await?;
        rows.into_iter()
            .map(|r| {
                let by = votes
                    .iter()
                    .filter(|(a, _)| *a == r.id)
                    .map(|(_, u)| u.clone())
                    .collect();
                r.into_approval(by)
            })
            .collect()
    }

    /// Requests, newest first; only those in `state` when given.
    pub async fn list_approvals(
        &self,
        state: Option<ApprovalState>,
        limit: i64,
    ) -> Result<Vec<Approval>> {
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE ($1 IS NULL OR state = $1) \
             ORDER BY requested_at DESC, id LIMIT $2"
        );
        let rows: Vec<ApprovalRow> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(state.map(ApprovalState::as_str))
            .bind(limit)
            .fetch_all(p)
            .await)?;
        self.with_votes(rows).await
    }

    /// A page of the pending requests (`pending`) or of the decided ones
    /// (every other state), newest first, and how many there are in all.
    pub async fn page_approvals(
        &self,
        pending: bool,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<Approval>, i64)> {
        let which = "(($1 AND state = 'pending') OR (NOT $1 AND state <> 'pending'))";
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE {which} \
             ORDER BY requested_at DESC, id LIMIT $2 OFFSET $3"
        );
        let rows: Vec<ApprovalRow> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(pending)
            .bind(limit)
            .bind(offset)
            .fetch_all(p)
            .await)?;
        let count = format!("SELECT COUNT(*) FROM approvals WHERE {which}");
        let total: i64 =
            on_pool!(self, p => sqlx::query_scalar(&count).bind(pending).fetch_one(p).await)?;
        Ok((self.with_votes(rows).await?, total))
    }

    /// One request by id or a unique prefix of one.
    pub async fn approval(&self, id: &str) -> Result<Option<Approval>> {
        let id = match self.resolve_id("approvals", "approval", id).await {
            Ok(id) => id,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let sql = format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1");
        let rows: Vec<ApprovalRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(&id).fetch_all(p).await)?;
        Ok(self.with_votes(rows).await?.pop())
    }

    /// The latest request of a job or run.
    pub async fn approval_of(&self, job_or_run: &str) -> Result<Option<Approval>> {
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE job_id = $1 OR run_id = $1 \
             ORDER BY requested_at DESC, id DESC LIMIT 1"
        );
        let rows: Vec<ApprovalRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(job_or_run).fetch_all(p).await)?;
        Ok(self.with_votes(rows).await?.pop())
    }

    /// Approves (one vote of `username`); releases the work once enough
    /// distinct people approved and its spec still has the approved hash.
    pub async fn approve(&self, id: &str, username: &str, now: DateTime<Utc>) -> Result<Vote> {
        let mut tx = self.begin().await?;
        let vote = tx.approve(id, username, now).await?;
        tx.commit().await?;
        Ok(vote)
    }

    /// Rejects a pending request: its work is cancelled with the reason.
    /// `None` when it was pending no more (its state is returned).
    pub async fn reject(
        &self,
        id: &str,
        username: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ApprovalState>> {
        let mut tx = self.begin().await?;
        let out = tx
            .close_approval(id, ApprovalState::Rejected, Some(username), reason, now)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Expires pending requests past their time (their work is cancelled);
    /// returns how many.
    pub async fn expire_approvals(&self, now: DateTime<Utc>) -> Result<usize> {
        let due: Vec<String> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT id FROM approvals WHERE state = 'pending' AND expires_at <= $1 LIMIT 100",
        )
        .bind(to_ms(now))
        .fetch_all(p)
        .await)?;
        let mut n = 0;
        for id in due {
            let mut tx = self.begin().await?;
            let out = tx
                .close_approval(
                    &id,
                    ApprovalState::Expired,
                    None,
                    "the approval request expired",
                    now,
                )
                .await?;
            tx.commit().await?;
            n += usize::from(out.is_none());
        }
        Ok(n)
    }
}

impl Tx {
    /// Stores a request for a job or a run.
    pub async fn request_approval(
        &mut self,
        job_id: Option<&str>,
        run_id: Option<&str>,
        a: &NewApproval<'_>,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let id = new_id();
        on_tx!(self, c => sqlx::query(
            "INSERT INTO approvals (id, job_id, run_id, spec_hash, spec, reasons, approvers_needed, requested_by, \
             requested_at, expires_at, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending')",
        )
        .bind(&id)
        .bind(job_id)
        .bind(run_id)
        .bind(a.spec_hash)
        .bind(a.spec)
        .bind(to_json(a.reasons))
        .bind(i64::from(a.approvers_needed))
        .bind(a.requested_by)
        .bind(to_ms(now))
        .bind(to_ms(a.expires_at))
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        Ok(id)
    }

    /// The pending request's row, locked against concurrent votes.
    async fn approval_row(&mut self, id: &str) -> Result<Option<ApprovalRow>> {
        let lock = if self.backend() == crate::Backend::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let sql = format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1{lock}");
        Ok(on_tx!(self, c => sqlx::query_as(&sql).bind(id).fetch_optional(&mut *c).await)?)
    }

    async fn set_approval_state(
        &mut self,
        id: &str,
        state: ApprovalState,
        by: Option<&str>,
        reason: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "UPDATE approvals SET state = $1, decided_at = $2, decided_by = $3, reason = $4 WHERE id = $5",
        )
        .bind(state.as_str())
        .bind(to_ms(now))
        .bind(by)
        .bind(reason)
        .bind(id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// The spec hash a job has now: what runs and where.
    pub async fn job_spec_hash(&mut self, job: &JobRecord) -> Result<(String, String)> {
        let agents: Vec<String> = on_tx!(self, c => sqlx::query_scalar(
            "SELECT DISTINCT agent_id FROM attempts WHERE job_id = $1",
        )
        .bind(&job.id)
        .fetch_all(&mut *c)
        .await)?;
        let view = JobSpecView::new(&job.action, &job.argv, &job.env, &job.sandbox, &agents);
        Ok((spec_hash(&view), to_json(&view)))
    }

    async fn run_spec_hash(&mut self, run_id: &str) -> Result<Option<(String, String)>> {
        let row: Option<(String, String, String)> = on_tx!(self, c => sqlx::query_as(
            "SELECT name, def_hash, inputs FROM workflow_runs WHERE id = $1",
        )
        .bind(run_id)
        .fetch_optional(&mut *c)
        .await)?;
        let Some((name, def_hash, inputs)) = row else {
            return Ok(None);
        };
        let inputs: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&inputs).map_err(|e| corrupt("run inputs")(e.to_string()))?;
        let view = drover_proto::approvals::RunSpecView {
            workflow: &name,
            definition: &def_hash,
            inputs: &inputs,
        };
        Ok(Some((spec_hash(&view), to_json(&view))))
    }

    pub async fn approve(&mut self, id: &str, username: &str, now: DateTime<Utc>) -> Result<Vote> {
        let Some(row) = self.approval_row(id).await? else {
            return Err(Error::NotFound {
                what: "approval",
                id: id.to_owned(),
            });
        };
        let state = ApprovalState::parse(&row.state)
            .ok_or_else(|| corrupt("approval state")(row.state.clone()))?;
        if state != ApprovalState::Pending {
            return Ok(Vote::NotPending(state));
        }
        if row.expires_at <= to_ms(now) {
            self.close_approval(
                id,
                ApprovalState::Expired,
                None,
                "the approval request expired",
                now,
            )
            .await?;
            return Ok(Vote::NotPending(ApprovalState::Expired));
        }
        if row.requested_by == username {
            return Ok(Vote::Own);
        }
        let added = on_tx!(self, c => sqlx::query(
            "INSERT INTO approval_votes (approval_id, username, at) VALUES ($1, $2, $3) \
             ON CONFLICT (approval_id, username) DO NOTHING",
        )
        .bind(id)
        .bind(username)
        .bind(to_ms(now))
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        if added == 0 {
            return Ok(Vote::Again);
        }
        let have: i64 = on_tx!(self, c => sqlx::query_scalar(
            "SELECT COUNT(*) FROM approval_votes WHERE approval_id = $1",
        )
        .bind(id)
        .fetch_one(&mut *c)
        .await)?;
        let need = row.approvers_needed.max(1);
        // Watchers of the job or run (and of approvals) look again.
        if let Some(job_id) = &row.job_id {
            self.changes.jobs.insert(job_id.clone());
        }
        if let Some(run_id) = &row.run_id {
            self.changes.run_events.insert(run_id.clone());
        }
        if have < need {
            return Ok(Vote::Counted {
                have: u32::try_from(have).unwrap_or(0),
                need: u32::try_from(need).unwrap_or(1),
            });
        }
        // Enough people approved: the work is released only if it is still
        // exactly what they saw.
        let current = match (&row.job_id, &row.run_id) {
            (Some(job_id), _) => {
                let job = self.job_record(job_id).await?;
                Some(self.job_spec_hash(&job).await?)
            }
            (None, Some(run_id)) => self.run_spec_hash(run_id).await?,
            (None, None) => None,
        };
        let Some((hash, spec)) = current else {
            return Err(Error::NotFound {
                what: "job or run of approval",
                id: id.to_owned(),
            });
        };
        if hash != row.spec_hash {
            let new_id = self.supersede(&row, &hash, &spec, now).await?;
            return Ok(Vote::Changed { new_id });
        }
        self.set_approval_state(id, ApprovalState::Approved, Some(username), None, now)
            .await?;
        if let Some(job_id) = &row.job_id {
            on_tx!(self, c => sqlx::query("UPDATE jobs SET approved_hash = $1 WHERE id = $2")
                .bind(&hash)
                .bind(job_id)
                .execute(&mut *c)
                .await.map(|r| r.rows_affected()))?;
            let agents: Vec<String> = on_tx!(self, c => sqlx::query_scalar(
                "UPDATE attempts SET state = 'queued', reason = NULL, not_before = $1 \
                 WHERE job_id = $2 AND state = 'awaiting_approval' RETURNING agent_id",
            )
            .bind(to_ms(now))
            .bind(job_id)
            .fetch_all(&mut *c)
            .await)?;
            self.changes.agents.extend(agents);
            self.recompute_job(job_id, now).await?;
        }
        if let Some(run_id) = &row.run_id {
            on_tx!(self, c => sqlx::query(
                "UPDATE workflow_runs SET state = 'running', approved_hash = $1 WHERE id = $2 \
                 AND state = 'awaiting_approval'",
            )
            .bind(&hash)
            .bind(run_id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            let why = format!("approved by {}", approvers_text(self, id).await?);
            let ev = crate::workflows::Event {
                state: Some("running"),
                message: Some(&why),
                ..crate::workflows::Event::new("run")
            };
            self.emit(run_id, &ev, now).await?;
            self.changes.runs.insert(run_id.clone());
        }
        Ok(Vote::Granted)
    }

    /// Replaces a request whose work's spec changed with a new one for the
    /// new spec (same reasons and approvers); the work waits again.
    async fn supersede(
        &mut self,
        old: &ApprovalRow,
        hash: &str,
        spec: &str,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let why = "the spec changed after the request: a new approval is needed";
        self.set_approval_state(&old.id, ApprovalState::Superseded, None, Some(why), now)
            .await?;
        let reasons: Vec<String> = serde_json::from_str(&old.reasons).unwrap_or_default();
        let lifetime = old.expires_at - old.requested_at;
        let new = NewApproval {
            spec_hash: hash,
            spec,
            reasons: &reasons,
            approvers_needed: u32::try_from(old.approvers_needed).unwrap_or(1),
            requested_by: &old.requested_by,
            expires_at: from_ms(to_ms(now) + lifetime.max(1)),
        };
        self.request_approval(old.job_id.as_deref(), old.run_id.as_deref(), &new, now)
            .await
    }

    /// A job's attempts were handed out with a spec that no longer has its
    /// approved hash: they wait again, under a new request.
    pub async fn reapprove_job(
        &mut self,
        job: &JobRecord,
        hash: &str,
        spec: &str,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let why = "the spec changed after approval: waiting for a new approval";
        on_tx!(self, c => sqlx::query(
            "UPDATE attempts SET state = 'awaiting_approval', reason = $1, dispatched_at = NULL, \
             lease_expires_at = NULL WHERE job_id = $2 AND state IN ('queued', 'dispatched')",
        )
        .bind(why)
        .bind(&job.id)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        on_tx!(self, c => sqlx::query("UPDATE jobs SET approved_hash = NULL WHERE id = $1")
            .bind(&job.id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE job_id = $1 ORDER BY requested_at DESC, id DESC LIMIT 1"
        );
        let last: Option<ApprovalRow> =
            on_tx!(self, c => sqlx::query_as(&sql).bind(&job.id).fetch_optional(&mut *c).await)?;
        let id = match last {
            Some(old) => self.supersede(&old, hash, spec, now).await?,
            None => {
                let reasons = vec!["the spec changed after approval".to_owned()];
                self.request_approval(
                    Some(&job.id),
                    None,
                    &NewApproval {
                        spec_hash: hash,
                        spec,
                        reasons: &reasons,
                        approvers_needed: 1,
                        requested_by: &job.created_by,
                        expires_at: now + chrono::Duration::hours(24),
                    },
                    now,
                )
                .await?
            }
        };
        self.recompute_job(&job.id, now).await?;
        Ok(id)
    }

    /// Ends a pending request (rejected, expired, cancelled) and cancels
    /// the work waiting for it. `Some(state)` when it was not pending.
    pub async fn close_approval(
        &mut self,
        id: &str,
        state: ApprovalState,
        by: Option<&str>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ApprovalState>> {
        let Some(row) = self.approval_row(id).await? else {
            return Err(Error::NotFound {
                what: "approval",
                id: id.to_owned(),
            });
        };
        let current = ApprovalState::parse(&row.state)
            .ok_or_else(|| corrupt("approval state")(row.state.clone()))?;
        if current != ApprovalState::Pending {
            return Ok(Some(current));
        }
        self.set_approval_state(id, state, by, Some(reason), now)
            .await?;
        let why = match (state, by) {
            (ApprovalState::Rejected, Some(who)) => format!("approval rejected by {who}: {reason}"),
            _ => reason.to_owned(),
        };
        if let Some(job_id) = &row.job_id {
            on_tx!(self, c => sqlx::query(
                "UPDATE attempts SET state = 'cancelled', reason = $1, finished_at = $2 \
                 WHERE job_id = $3 AND state = 'awaiting_approval'",
            )
            .bind(&why)
            .bind(to_ms(now))
            .bind(job_id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            self.recompute_job(job_id, now).await?;
        }
        if let Some(run_id) = &row.run_id {
            // The engine ends it as any cancelled run: tasks skipped,
            // webhooks sent.
            on_tx!(self, c => sqlx::query(
                "UPDATE workflow_runs SET state = 'running', cancel_requested_at = $1 \
                 WHERE id = $2 AND state = 'awaiting_approval'",
            )
            .bind(to_ms(now))
            .bind(run_id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            let ev = crate::workflows::Event {
                state: Some("running"),
                message: Some(&why),
                ..crate::workflows::Event::new("run")
            };
            self.emit(run_id, &ev, now).await?;
            self.changes.runs.insert(run_id.clone());
        }
        Ok(None)
    }

    /// Cancels the pending request of a job or run being cancelled.
    pub async fn cancel_approvals_of(
        &mut self,
        job_or_run: &str,
        why: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "UPDATE approvals SET state = 'cancelled', decided_at = $1, reason = $2 \
             WHERE (job_id = $3 OR run_id = $3) AND state = 'pending'",
        )
        .bind(to_ms(now))
        .bind(why)
        .bind(job_or_run)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        Ok(())
    }
}

async fn approvers_text(tx: &mut Tx, id: &str) -> Result<String> {
    let names: Vec<String> = on_tx!(tx, c => sqlx::query_scalar(
        "SELECT username FROM approval_votes WHERE approval_id = $1 ORDER BY at, username",
    )
    .bind(id)
    .fetch_all(&mut *c)
    .await)?;
    Ok(names.join(", "))
}
