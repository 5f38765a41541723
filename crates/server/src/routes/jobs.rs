//! Jobs as operators see them: submit, list, show (optionally waiting for
//! the end), logs (optionally following), cancel. Every job that is not
//! final says why it is waiting.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use drover_proto::api::{AgentStatus, DispatchState};
use drover_proto::jobs::{Attempt, Job, JobState, LogChunk, LogPage, Stream, SubmitJobRequest};
use drover_proto::ErrorBody;
use drover_store::fleet::FleetRecord;
use drover_store::jobs::{AttemptRecord, JobRecord};
use drover_store::AgentRecord;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Operator;
use crate::auth::UserAuth;
use crate::domain;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::hub::{wait_for_end, wait_for_job};
use crate::routes::audit::Audit;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit_job, list_jobs))
        .routes(routes!(show_job))
        .routes(routes!(job_logs))
        .routes(routes!(cancel_job))
}

/// Longest a request may wait for a job to change.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Run an action on the agents a target names: one attempt per agent.
#[utoipa::path(
    post, path = "/api/v1/jobs", tag = "jobs",
    request_body = SubmitJobRequest,
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an operator whose scope holds the action and agents"), (status = 201, body = Job), (status = 422, description = "Unknown action, bad parameter or target", body = ErrorBody))
)]
async fn submit_job(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiJson(req): ApiJson<SubmitJobRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let job = submit(&state, &user, &audit, &req, StatusCode::CREATED).await?;
    Ok((StatusCode::CREATED, Json(job)))
}

/// Submits a job for `user` (an operator whose scope holds the action and
/// the agents): checks, approval request, the job and its audit entry in
/// one commit; `answer` is the status the caller answers with when it
/// worked (the audit entry's). Shared by the API and the dashboard.
pub(crate) async fn submit(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    req: &SubmitJobRequest,
    answer: StatusCode,
) -> Result<Job, ApiError> {
    match submit_as(state, user, audit, req, answer, None).await? {
        Some(id) => load_job(state, &id).await,
        None => Err(ApiError::internal(
            "submitting a job",
            &"a job without a slot was not created",
        )),
    }
}

/// [`submit`], optionally for a schedule's slot: the slot is claimed in
/// the job's transaction, and `None` means another server process has it
/// (no job is created). Answers the new job's id.
pub(crate) async fn submit_as(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    req: &SubmitJobRequest,
    answer: StatusCode,
    slot: Option<&crate::schedules::Firing<'_>>,
) -> Result<Option<String>, ApiError> {
    user.require(drover_proto::api::Role::Operator)?;
    // Noted first: a refused job's entry says what was asked for too.
    audit.note("action", &req.action);
    audit.note("selector", &req.target);
    if let Some(t) = req.timeout_secs {
        if t == 0 || Duration::from_secs(t) > domain::MAX_TIMEOUT {
            return Err(ApiError::invalid(format!(
                "timeout_secs must be between 1 and {}, got {t}",
                domain::MAX_TIMEOUT.as_secs()
            )));
        }
    }
    let job = domain::Jobs::new(&state.store)
        .build(&domain::JobRequest {
            action: &req.action,
            params: &req.params,
            timeout: req.timeout_secs.map(Duration::from_secs),
            retries: req.retries,
            sandbox: req.sandbox.as_deref(),
            placement: domain::Placement::Target(&req.target),
            target: &req.target,
            artifacts: &[],
            who: "the job",
            env: &BTreeMap::new(),
            limits: &user.limits,
        })
        .await?;
    let request = crate::approvals::request_for_job(
        &state.store,
        &job,
        &user.username,
        state.config.approval_ttl,
    )
    .await?;
    let approval = request.as_ref().map(|r| r.as_new());
    let mut new_job = job.new_job(&user.username);
    new_job.approval = approval.as_ref();
    // The job and its audit entry in one commit.
    let id = drover_store::new_id();
    audit.target(format!("job:{id}"));
    audit.note("agents", job.agents.len().to_string());
    if request.is_some() {
        audit.note("approval", "required");
    }
    let mut tx = state.store.begin().await?;
    if let Some(slot) = slot {
        if !tx.claim_slot(&slot.claim(&format!("job:{id}"))).await? {
            return Ok(None);
        }
    }
    tx.insert_job(&id, &new_job, None, None, Utc::now()).await?;
    audit.write(&mut tx, answer).await?;
    tx.commit().await?;
    let (spec, sandbox, agents) = (&job, &job.sandbox, &job.agents);
    tracing::info!(job = %id, action = %spec.action, sandbox = %sandbox.name(), agents = agents.len(), by = %user.username, "job submitted");
    Ok(Some(id))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only jobs in this state.
    #[param(value_type = Option<drover_proto::jobs::JobState>)]
    state: Option<String>,
    /// At most this many, newest first [default 50, at most 1000].
    limit: Option<i64>,
}

/// Jobs, newest first (without their attempts).
#[utoipa::path(
    get, path = "/api/v1/jobs", tag = "jobs",
    params(ListQuery),
    security(("user" = [])),
    responses((status = 200, body = [Job]))
)]
async fn list_jobs(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Job>>, ApiError> {
    let filter = match q.state.as_deref() {
        Some(s) => Some(
            JobState::parse(s).ok_or_else(|| ApiError::invalid(format!("unknown state '{s}'")))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let jobs = state.store.list_jobs(filter, limit).await?;
    Ok(Json(
        jobs.into_iter()
            .map(|j| job_view(j, Vec::new(), &HashMap::new(), None, &state))
            .collect(),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Wait up to this many milliseconds (at most 30000) for the job to end.
    wait_ms: Option<u64>,
}

/// One job with its attempts; with `wait_ms`, answers when it ends or the
/// wait is over.
#[utoipa::path(
    get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id or a unique prefix"), WaitQuery),
    security(("user" = [])),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody))
)]
async fn show_job(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<Job>, ApiError> {
    // A full id is looked up as it is (a missing one is a 404 all the
    // same); only a prefix needs resolving.
    let id = if uuid::Uuid::try_parse(&id).is_ok_and(|u| u.hyphenated().to_string() == id) {
        id
    } else {
        state.store.resolve_job_id(&id).await?
    };
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let mut events = state.hub.subscribe();
    loop {
        let job = load_job(&state, &id).await?;
        if job.state.is_final() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(job));
        }
        // Only the end is worth another look: the answer waits for it.
        tokio::select! {
            ended = wait_for_end(&mut events, &id, deadline) => if !ended {
                // The wait is over: answer the job as it is now.
                return Ok(Json(load_job(&state, &id).await?));
            },
            _ = state.shutdown.cancelled() => return Ok(Json(job)),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    /// Return chunks after this cursor [default 0].
    after: Option<i64>,
    /// Wait up to this many milliseconds (at most 30000) for new output.
    wait_ms: Option<u64>,
    /// At most this many chunks [default 500].
    limit: Option<i64>,
}

/// Output of a job's attempts, in order. With `wait_ms`, waits for output
/// after the cursor; `complete` says the job ended and all was returned.
#[utoipa::path(
    get, path = "/api/v1/jobs/{id}/logs", tag = "jobs",
    params(("id" = String, Path, description = "Job id or a unique prefix"), LogQuery),
    security(("user" = [])),
    responses((status = 200, body = LogPage), (status = 404, body = ErrorBody))
)]
async fn job_logs(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Json<LogPage>, ApiError> {
    let id = state.store.resolve_job_id(&id).await?;
    let after = q.after.unwrap_or(0).max(0);
    let limit = q.limit.unwrap_or(500).clamp(1, 5000);
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    Ok(Json(
        follow_logs(&state, &id, after, limit, wait, false).await?,
    ))
}

/// The output of job `id` (a full id) after cursor `after`: at once when
/// there is some or the job has ended, else once some arrives or `wait`
/// is over; with `wake_on_change`, also as soon as anything about the job
/// changed (its state, an attempt's), so that a follower can tell. Shared
/// by the API's logs and the dashboard's live job page.
pub(crate) async fn follow_logs(
    state: &AppState,
    id: &str,
    after: i64,
    limit: i64,
    wait: Duration,
    wake_on_change: bool,
) -> Result<LogPage, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut events = state.hub.subscribe();
    let mut changed = false;
    loop {
        // Read the state first: output stored before the job ended is then
        // certainly in the page that follows.
        let final_state = state
            .store
            .job(id)
            .await?
            .map(|j| j.state.is_final())
            .unwrap_or(true);
        let records = state.store.logs_after(id, after, limit).await?;
        if !records.is_empty() || final_state || changed || tokio::time::Instant::now() >= deadline
        {
            let next = records.last().map(|r| r.id).unwrap_or(after);
            let complete = final_state && (records.len() as i64) < limit;
            let chunks = records
                .into_iter()
                .map(|r| LogChunk {
                    cursor: r.id,
                    attempt_id: r.attempt_id,
                    stream: if r.stream == "stderr" {
                        Stream::Stderr
                    } else {
                        Stream::Stdout
                    },
                    data: r.data,
                })
                .collect();
            return Ok(LogPage {
                chunks,
                next,
                complete,
            });
        }
        tokio::select! {
            woke = wait_for_job(&mut events, id, deadline) => changed = woke && wake_on_change,
            _ = state.shutdown.cancelled() => return Ok(LogPage { chunks: Vec::new(), next: after, complete: false }),
        }
    }
}

/// Cancel a job: queued attempts end at once; running ones are stopped by
/// their agents (SIGTERM, then SIGKILL after the kill grace). A job that
/// has ended is a conflict: there is nothing left to cancel.
#[utoipa::path(
    post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "Job id or a unique prefix")),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an operator whose scope holds the action and agents"), (status = 200, body = Job), (status = 404, body = ErrorBody), (status = 409, description = "The job has ended (code conflict)", body = ErrorBody))
)]
async fn cancel_job(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(cancel(&state, &user, &audit, &id, None).await?))
}

/// Cancels job `id` (or a unique prefix) for `user` (an operator whose
/// scope holds its action and agents), with an optional reason; a job
/// that has ended is a conflict (409). Shared by the API and the
/// dashboard.
pub(crate) async fn cancel(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    id: &str,
    reason: Option<&str>,
) -> Result<Job, ApiError> {
    user.require(drover_proto::api::Role::Operator)?;
    super::fleet::check_reason(reason)?;
    if let Some(r) = reason {
        audit.note("reason", r);
    }
    let id = state.store.resolve_job_id(id).await?;
    audit.target(format!("job:{id}"));
    let job = load_job(state, &id).await?;
    if !user.limits.is_everywhere() {
        let agents: Vec<String> = job.attempts.iter().map(|a| a.agent_id.clone()).collect();
        domain::Jobs::new(&state.store)
            .check_limits(&user.limits, &job.action, &agents)
            .await?;
    }
    // A job that ends between this read and the cancel below is let be:
    // the cancel of an ended job changes nothing.
    if job.state.is_final() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            drover_proto::ErrorCode::Conflict,
            format!(
                "job {id} already ended {}; nothing to cancel",
                job.state.as_str()
            ),
        ));
    }
    let reason = match reason {
        Some(r) => format!("cancelled by {}: {r}", user.username),
        None => format!("cancelled by {}", user.username),
    };
    let agents = state.store.cancel_job(&id, &reason, Utc::now()).await?;
    tracing::info!(job = %id, by = %user.username, running = agents.len(), "job cancel requested");
    load_job(state, &id).await
}

/// A job with its attempts and the reasons of whatever still waits.
pub async fn load_job(state: &AppState, id: &str) -> Result<Job, ApiError> {
    let job = state
        .store
        .job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job '{id}' not found")))?;
    let attempts = state.store.attempts(id).await?;
    let mut agents = HashMap::new();
    for a in &attempts {
        if !a.state.is_final() && !agents.contains_key(&a.agent_id) {
            if let Some(rec) = state.store.agent(&a.agent_id).await? {
                agents.insert(a.agent_id.clone(), rec);
            }
        }
    }
    // The fleet's stop explains why queued work waits (a running attempt
    // told to stop carries its own reason).
    let fleet = if attempts.iter().any(|a| a.state == JobState::Queued) {
        Some(state.store.fleet().await?)
    } else {
        None
    };
    let awaiting = job.state == JobState::AwaitingApproval;
    let mut view = job_view(job, attempts, &agents, fleet.as_ref(), state);
    if awaiting {
        if let Some(a) = state.store.approval_of(&view.id).await? {
            view.reason = Some(format!(
                "awaiting approval {} ({} of {} approvals): {}; drover approvals approve {}",
                short(&a.id),
                a.approved_by.len(),
                a.approvers_needed,
                a.reasons.join("; "),
                short(&a.id)
            ));
        }
    }
    Ok(view)
}

fn job_view(
    job: JobRecord,
    attempts: Vec<AttemptRecord>,
    agents: &HashMap<String, AgentRecord>,
    fleet: Option<&FleetRecord>,
    state: &AppState,
) -> Job {
    let now = Utc::now();
    let attempts: Vec<Attempt> = attempts
        .into_iter()
        .map(|a| {
            let reason = if a.state.is_final() {
                a.reason.clone()
            } else {
                Some(waiting_reason(
                    &a,
                    agents.get(&a.agent_id),
                    fleet,
                    state,
                    now,
                ))
            };
            attempt_view(a, reason)
        })
        .collect();
    let reason = if job.state.is_final() {
        None
    } else {
        let reasons: Vec<(&str, &str)> = attempts
            .iter()
            .filter(|a| !a.state.is_final())
            .filter_map(|a| Some((a.reason.as_deref()?, short(&a.agent_id))))
            .collect();
        Some(if reasons.is_empty() {
            "waiting for its attempts".to_owned()
        } else {
            distinct_reasons(&reasons)
        })
    };
    let params: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&job.params_json).unwrap_or_default();
    Job {
        id: job.id,
        action: job.action,
        target: job.target,
        params,
        state: job.state,
        reason,
        created_by: job.created_by,
        created_at: job.created_at,
        finished_at: job.finished_at,
        timeout_secs: (job.timeout_ms / 1000) as u64,
        max_retries: job.retry.max,
        sandbox: job.sandbox.name().to_owned(),
        attempts,
    }
}

/// At most this many distinct waiting reasons in a job's `reason`.
const MAX_REASONS: usize = 3;

/// The waiting reasons of a job's live attempts, given with the short id
/// of each attempt's agent, said once per cause in the order first seen: a
/// cause several agents share (a fleet stop holds every queued attempt)
/// says how many agents, or which others, it holds too.
fn distinct_reasons(reasons: &[(&str, &str)]) -> String {
    // Attempts with the same text once their agent's id is taken out
    // wait for the same cause.
    let mut causes: Vec<(String, Vec<(&str, &str)>)> = Vec::new();
    for &(reason, agent) in reasons {
        let key = if agent.is_empty() {
            reason.to_owned()
        } else {
            reason.replace(agent, "\u{0}")
        };
        match causes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, list)) => list.push((reason, agent)),
            None => causes.push((key, vec![(reason, agent)])),
        }
    }
    let more = causes.len().saturating_sub(MAX_REASONS);
    let mut parts: Vec<String> = causes
        .iter()
        .take(MAX_REASONS)
        .map(|(key, list)| {
            let (first, _) = list[0];
            if list.len() == 1 {
                first.to_owned()
            } else if !key.contains('\u{0}') {
                format!("{first} ({} agents)", list.len())
            } else {
                let others: Vec<&str> = list[1..].iter().map(|(_, a)| *a).collect();
                format!("{first} (also agents {})", others.join(", "))
            }
        })
        .collect();
    if more > 0 {
        parts.push(format!("and {more} more (see the attempts)"));
    }
    parts.join("; ")
}

fn short(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

/// Why an attempt that is not final is waiting.
fn waiting_reason(
    a: &AttemptRecord,
    agent: Option<&AgentRecord>,
    fleet: Option<&FleetRecord>,
    state: &AppState,
    now: DateTime<Utc>,
) -> String {
    let who = short(&a.agent_id);
    let stopping = a.cancel_requested
        || fleet.is_some_and(|f| f.stopped_at.is_some())
        || agent.is_some_and(|g| g.dispatch == DispatchState::Stopped);
    match a.state {
        JobState::AwaitingApproval => a
            .reason
            .clone()
            .unwrap_or_else(|| "awaiting approval".to_owned()),
        JobState::Running | JobState::Dispatched if stopping => match &a.reason {
            Some(why) => format!("cancel sent to agent {who} ({why})"),
            None => format!("cancel sent to agent {who}"),
        },
        JobState::Running => format!("running on agent {who}"),
        JobState::Dispatched => format!("dispatched to agent {who}, waiting for it to start"),
        _ => {
            if let Some(f) = fleet.filter(|f| f.stopped_at.is_some()) {
                return format!(
                    "dispatch is paused fleet-wide since {} ({}); drover fleet resume lets it go",
                    f.stopped_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    f.reason.as_deref().unwrap_or("emergency stop")
                );
            }
            if a.not_before > now {
                return format!("awaiting retry at {}", a.not_before.to_rfc3339());
            }
            let Some(agent) = agent else {
                return format!("agent {who} no longer exists");
            };
            if agent.dispatch != DispatchState::Active && agent.revoked_at.is_none() {
                return format!(
                    "agent {who} is {} ({}); drover agents resume {who} lets it take work",
                    agent.dispatch.as_str(),
                    agent.dispatch_reason.as_deref().unwrap_or("by an admin")
                );
            }
            let status = AgentStatus::derive(
                agent.revoked_at.is_some(),
                agent.last_seen_at,
                now,
                state.config.health(),
            );
            match status {
                AgentStatus::Revoked => format!("agent {who} is revoked"),
                AgentStatus::Offline | AgentStatus::Stale => format!(
                    "agent {who} is {} (last seen {})",
                    status.as_str(),
                    agent
                        .last_seen_at
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "never".to_owned())
                ),
                AgentStatus::Online => match state.hub.capacity_of(&a.agent_id) {
                    Some((cap, 0)) => format!("agent {who} is at capacity ({cap} running)"),
                    _ => format!("waiting for agent {who} to poll"),
                },
            }
        }
    }
}

fn attempt_view(a: AttemptRecord, reason: Option<String>) -> Attempt {
    Attempt {
        id: a.id,
        agent_id: a.agent_id,
        number: a.number as u32,
        state: a.state,
        reason,
        created_at: a.created_at,
        not_before: a.not_before,
        dispatched_at: a.dispatched_at,
        started_at: a.started_at,
        finished_at: a.finished_at,
        exit_code: a.exit_code.map(|c| c as i32),
        signal: a.signal.map(|s| s as i32),
        duration_ms: a.duration_ms.map(|d| d as u64),
        error: a.error,
        stdout_truncated: a.stdout_truncated,
        stderr_truncated: a.stderr_truncated,
        limit_exceeded: a.limit_exceeded,
        late_result: a.late_result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_waiting_reason_is_said_once() {
        let stop = "dispatch is paused fleet-wide since T (drill); drover fleet resume lets it go";
        let sent = |a: &str| format!("cancel sent to agent {a} (fleet stopped by admin: drill)");
        let (sa, sb, sc) = (sent("a1"), sent("b2"), sent("c3"));
        // (reasons of the live attempts with their agents, the job's reason)
        let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
            (
                vec![("running on agent a1", "a1")],
                "running on agent a1".to_owned(),
            ),
            (
                vec![(stop, "a1"), (stop, "b2"), (stop, "c3")],
                format!("{stop} (3 agents)"),
            ),
            (
                vec![(&sa, "a1"), (&sb, "b2"), (&sc, "c3")],
                format!("{sa} (also agents b2, c3)"),
            ),
            (
                vec![("running on agent a1", "a1"), (stop, "b2"), (stop, "c3")],
                format!("running on agent a1; {stop} (2 agents)"),
            ),
            (
                vec![
                    ("agent a1 is offline (last seen 1)", "a1"),
                    ("agent b2 is offline (last seen 2)", "b2"),
                ],
                "agent a1 is offline (last seen 1); agent b2 is offline (last seen 2)".to_owned(),
            ),
            (
                vec![
                    ("p", ""),
                    ("q", ""),
                    ("p", ""),
                    ("r", ""),
                    ("s", ""),
                    ("t", ""),
                ],
                "p (2 agents); q; r; and 2 more (see the attempts)".to_owned(),
            ),
        ];
        for (reasons, want) in cases {
            assert_eq!(distinct_reasons(&reasons), want, "{reasons:?}");
        }
    }
}
