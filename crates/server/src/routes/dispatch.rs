//! The dispatch protocol agents speak: long-poll for work, report start,
//! stream output, renew leases, report results. An agent can only touch its
//! own attempts: anything else is 403 and changes nothing.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use drover_proto::api::DispatchState;
use drover_proto::jobs::{
    Assignment, AttemptResult, LeaseRequest, LeaseResponse, LogUpload, PollRequest, PollResponse,
    ResultAck, StartRequest, Stream,
};
use drover_proto::{ErrorBody, ErrorCode};
use drover_store::fleet::Gate;
use drover_store::jobs::{Ownership, Recorded};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{AgentClaims, AgentToken};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(poll))
        .routes(routes!(start))
        .routes(routes!(upload_log))
        .routes(routes!(renew_leases))
        .routes(routes!(report_result))
        .routes(routes!(upload_artifact))
}

use drover_proto::limits::{
    LOG_MARKER_ROOM, MAX_CAPACITY, MAX_KNOWN_ATTEMPTS, MAX_LOG_CHUNK, MAX_POLL_WAIT,
};

/// Refuses a revoked agent or an ended session (the JWT alone is not enough).
pub async fn require_live_agent(state: &AppState, claims: &AgentClaims) -> Result<(), ApiError> {
    match state.store.agent(&claims.sub).await? {
        Some(a)
            if a.revoked_at.is_none() && a.session_id.as_deref() == Some(claims.sid.as_str()) =>
        {
            Ok(())
        }
        _ => Err(crate::auth::explain_agent_refusal(state, claims).await),
    }
}

fn forbidden_attempt(id: &str) -> ApiError {
    ApiError::forbidden(format!("attempt {id} belongs to another agent"))
}

fn unknown_attempt(id: &str) -> ApiError {
    ApiError::not_found(format!("attempt {id} not found"))
}

/// A 503 that tells the agent when to come back.
struct Overloaded;

impl IntoResponse for Overloaded {
    fn into_response(self) -> Response {
        let mut resp = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "server is at its long-poll limit; retry later",
        )
        .into_response();
        let secs = 2 + fastrand::u64(0..4);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// Counts a held long-poll for the gauge while it lives.
struct Held<'a>(&'a AppState);

impl<'a> Held<'a> {
    fn new(state: &'a AppState) -> Held<'a> {
        state
            .hub
            .polls_waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Held(state)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0
            .hub
            .polls_waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Ask for work. Answers the moment there is work or a cancel for this
/// agent, else after `wait_ms` with nothing.
#[utoipa::path(
    post, path = "/api/v1/agent/poll", tag = "agent",
    request_body = PollRequest,
    security(("agent" = [])),
    responses(
        (status = 200, body = PollResponse),
        (status = 503, description = "Overloaded: retry after the Retry-After header", body = ErrorBody),
    )
)]
async fn poll(
    State(state): State<AppState>,
    AgentToken(claims): AgentToken,
    ApiJson(req): ApiJson<PollRequest>,
) -> Result<Response, ApiError> {
    let Ok(_permit) = state.hub.poll_permits.clone().try_acquire_owned() else {
        return Ok(Overloaded.into_response());
    };
    if req.capacity > MAX_CAPACITY || req.free_slots > req.capacity {
        return Err(ApiError::invalid(format!(
            "free_slots ({}) must not exceed capacity ({}), which must not exceed {MAX_CAPACITY}",
            req.free_slots, req.capacity
        )));
    }
    require_live_agent(&state, &claims).await?;
    let agent = claims.sub.as_str();
    state.hub.note_capacity(agent, req.capacity, req.free_slots);
    let slot = state.hub.slot(agent);
    let _held = Held::new(&state);
    let wait = Duration::from_millis(req.wait_ms).min(MAX_POLL_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let lease = state.config.attempt_lease;
    if let Some(known) = &req.known {
        if known.len() > MAX_KNOWN_ATTEMPTS {
            return Err(ApiError::invalid(format!(
                "known lists {} attempts; at most {} are accepted",
                known.len(),
                MAX_KNOWN_ATTEMPTS
            )));
        }
        let requeued = state
            .store
            .requeue_unreceived(agent, known, Utc::now())
            .await?;
        for (attempt, job) in &requeued {
            tracing::warn!(attempt = %attempt, job = %job, agent = %agent, "assignment never reached the agent; queued again");
        }
    }
    loop {
        let now = Utc::now();
        // A drained or stopped agent, or a stopped fleet, gets no work: the
        // claim checks that itself, atomically. Only when it hands out
        // nothing is the gate read, to cancel what runs on a stop and not
        // to spin on work that may not be claimed.
        let claimed = state
            .store
            .claim_attempts(agent, req.free_slots, now + lease, now)
            .await?;
        let gate = if claimed.is_empty() {
            state.store.gate(agent).await?
        } else {
            Gate::open()
        };
        let paused = gate.fleet_stopped || gate.agent != DispatchState::Active;
        let stops = state.store.cancels_for_agent(agent, &gate).await?;
        let kill: Vec<String> = stops
            .iter()
            .filter(|(_, force)| *force)
            .map(|(id, _)| id.clone())
            .collect();
        let cancel: Vec<String> = stops.into_iter().map(|(id, _)| id).collect();
        if !claimed.is_empty() || !cancel.is_empty() || tokio::time::Instant::now() >= deadline {
            let mut assignments = Vec::with_capacity(claimed.len());
            let mut agent_record = None;
            let expires_at_ms = (Utc::now() + crate::sealing::ASSIGNMENT_TTL).timestamp_millis();
            for mut c in claimed {
                state.metrics.observe_dispatch(
                    (now - c.ready_at).num_microseconds().unwrap_or(0) as f64 / 1e6,
                );
                // Secrets are put in only now, for an agent their scope
                // allows; the job keeps the references.
                let mask = match with_secrets(&state, agent, &mut agent_record, &c.action, &c.env)
                    .await?
                {
                    Ok((env, values)) => {
                        c.env = env;
                        state.vault.remember(&c.attempt_id, values.clone());
                        values
                    }
                    Err(why) => {
                        refuse_attempt(&state, agent, &c.attempt_id, why).await?;
                        continue;
                    }
                };
                let mut a = Assignment {
                    attempt_id: c.attempt_id,
                    job_id: c.job_id,
                    action: c.action,
                    argv: c.argv,
                    env: c.env,
                    timeout_ms: c.timeout_ms as u64,
                    kill_grace_ms: c.kill_grace_ms as u64,
                    log_cap_bytes: state.config.log_cap_bytes,
                    lease_ms: lease.as_millis() as u64,
                    artifacts: c.artifacts,
                    sandbox: Some(c.sandbox),
                    workspace: c.workspace,
                    mask,
                    seal: None,
                };
                // Last, once the assignment is complete (anything injected
                // into it, such as secrets, must come before): the seal
                // covers what the agent receives.
                if let Err(e) =
                    state
                        .assignment_signer
                        .seal(&mut a, c.spec_sig.as_deref(), expires_at_ms)
                {
                    // Only a stored signature that is not hex gets here:
                    // the agent refuses the unsealed assignment.
                    tracing::error!(attempt = %a.attempt_id, job = %a.job_id, error = %e, "the job's stored spec signature is unusable");
                }
                assignments.push(a);
            }
            return Ok(Json(PollResponse {
                assignments,
                cancel,
                kill,
            })
            .into_response());
        }
        // Sleep until woken, until the next retry becomes due (unless
        // nothing may be claimed anyway), or the end.
        let mut until = deadline;
        let next_ready = if paused {
            None
        } else {
            state.store.next_ready_at(agent).await?
        };
        if let Some(ready) = next_ready {
            let in_ms = (ready - Utc::now()).num_milliseconds().max(0) as u64;
            until = until.min(tokio::time::Instant::now() + Duration::from_millis(in_ms));
        }
        tokio::select! {
            _ = slot.notify.notified() => {}
            _ = tokio::time::sleep_until(until) => {}
            _ = state.shutdown.cancelled() => return Ok(Json(PollResponse::default()).into_response()),
        }
    }
}

/// The attempt's environment with its secrets' values, and the values
/// (to mask its output); `Err` with the reason when one may not be given
/// to this agent or action.
async fn with_secrets(
    state: &AppState,
    agent: &str,
    record: &mut Option<drover_store::AgentRecord>,
    action: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<Result<(std::collections::BTreeMap<String, String>, Vec<String>), String>, ApiError> {
    if !env.values().any(|v| crate::vault::mentions_secret(v)) {
        return Ok(Ok((env.clone(), Vec::new())));
    }
    if record.is_none() {
        *record = state.store.agent(agent).await?;
    }
    let Some(rec) = record.as_ref() else {
        return Ok(Err(format!("agent {agent} not found")));
    };
    let values = match state.vault.resolve(&state.store, action, env, rec).await {
        Ok(Ok(v)) => v,
        Ok(Err(why)) => return Ok(Err(why)),
        Err(crate::vault::Error::Store(e)) => return Err(e.into()),
        Err(other) => return Ok(Err(other.to_string())),
    };
    let filled = env
        .iter()
        .map(|(k, v)| (k.clone(), crate::vault::substitute(v, &values)))
        .collect();
    Ok(Ok((filled, values.into_values().collect())))
}

/// Ends an attempt that may not be handed out (`rejected`, with why), as
/// if the agent had refused it; the job's policy decides what follows.
async fn refuse_attempt(
    state: &AppState,
    agent: &str,
    attempt: &str,
    why: String,
) -> Result<(), ApiError> {
    let now = Utc::now();
    tracing::warn!(attempt = %attempt, agent = %agent, reason = %why, "attempt refused at dispatch");
    let result = AttemptResult {
        attempt_id: attempt.to_owned(),
        outcome: drover_proto::jobs::Outcome::Rejected,
        exit_code: None,
        signal: None,
        started_at: None,
        finished_at: now,
        duration_ms: 0,
        error: Some(why),
        stdout_truncated: false,
        stderr_truncated: false,
        outputs: Default::default(),
        limit_exceeded: None,
    };
    state
        .store
        .record_result(agent, &result, fastrand::f64(), now)
        .await?;
    Ok(())
}

/// The attempt started running.
#[utoipa::path(
    post, path = "/api/v1/agent/attempts/{id}/start", tag = "agent",
    params(("id" = String, Path, description = "Attempt id")),
    request_body = StartRequest,
    security(("agent" = [])),
    responses((status = 200, body = ResultAck), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn start(
    State(state): State<AppState>,
    AgentToken(claims): AgentToken,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<StartRequest>,
) -> Result<Json<ResultAck>, ApiError> {
    require_live_agent(&state, &claims).await?;
    match state
        .store
        .mark_started(&id, &claims.sub, req.started_at, Utc::now())
        .await?
    {
        Ownership::Owned { .. } => Ok(Json(ResultAck { recorded: true })),
        Ownership::Foreign => Err(forbidden_attempt(&id)),
        Ownership::NotFound => Err(unknown_attempt(&id)),
    }
}

/// One chunk of an attempt's output.
#[utoipa::path(
    post, path = "/api/v1/agent/attempts/{id}/logs", tag = "agent",
    params(("id" = String, Path, description = "Attempt id")),
    request_body = LogUpload,
    security(("agent" = [])),
    responses(
        (status = 200, body = ResultAck),
        (status = 403, body = ErrorBody),
        (status = 413, description = "Chunk too large, or the stream's cap is reached", body = ErrorBody),
    )
)]
async fn upload_log(
    State(state): State<AppState>,
    AgentToken(claims): AgentToken,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<LogUpload>,
) -> Result<Json<ResultAck>, ApiError> {
    require_live_agent(&state, &claims).await?;
    if req.data.len() > MAX_LOG_CHUNK {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!(
                "log chunk is {} bytes; at most {MAX_LOG_CHUNK} allowed",
                req.data.len()
            ),
        ));
    }
    // Room for the agent's truncation marker beyond the cap.
    let cap = (state.config.log_cap_bytes + LOG_MARKER_ROOM) as i64;
    let seq = i64::try_from(req.seq).map_err(|_| ApiError::invalid("seq is too large"))?;
    // Where the attempt's output goes, and how much of it is stored, are
    // looked up once per attempt and kept until its result comes.
    let target = match state.hub.log_target(&id) {
        Some(t) => t,
        None => {
            let Some(t) = state.store.log_target(&id).await? else {
                return Err(unknown_attempt(&id));
            };
            state.hub.keep_log_target(&id, t.clone());
            t
        }
    };
    if target.agent_id != claims.sub {
        return Err(forbidden_attempt(&id));
    }
    let stream = usize::from(req.stream == Stream::Stderr);
    // Secrets are masked before anything is stored (the agent masks too,
    // and also where a value spans two chunks).
    let masks = state.vault.masks(&state.store, &id).await?;
    let data = if masks.is_empty() {
        req.data
    } else {
        crate::vault::mask(&req.data, &masks)
    };
    let len = data.len() as i64;
    if target.used[stream] + len > cap {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!(
                "the {} of attempt {id} reached its cap of {} bytes",
                req.stream.as_str(),
                state.config.log_cap_bytes
            ),
        ));
    }
    let mut tx = state.store.begin().await?;
    let stored = tx
        .append_log(&target, &id, req.stream, seq, &data, Utc::now())
        .await?;
    tx.commit().await?;
    if stored {
        state.hub.log_stored(&id, stream, len);
    }
    Ok(Json(ResultAck { recorded: stored }))
}

/// Keep attempts alive; the answer lists those to stop.
#[utoipa::path(
    post, path = "/api/v1/agent/leases", tag = "agent",
    request_body = LeaseRequest,
    security(("agent" = [])),
    responses((status = 200, body = LeaseResponse), (status = 403, body = ErrorBody))
)]
async fn renew_leases(
    State(state): State<AppState>,
    AgentToken(claims): AgentToken,
    ApiJson(req): ApiJson<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    require_live_agent(&state, &claims).await?;
    // Running attempts and finished ones whose result waits.
    if req.attempt_ids.len() > MAX_KNOWN_ATTEMPTS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_KNOWN_ATTEMPTS} attempts per renewal"
        )));
    }
    if let Some(id) = state
        .store
        .foreign_attempt(&claims.sub, &req.attempt_ids)
        .await?
    {
        return Err(forbidden_attempt(&id));
    }
    let lease = state.config.attempt_lease;
    let gate = state.store.gate(&claims.sub).await?;
    let r = state
        .store
        .renew_leases(&claims.sub, &req.attempt_ids, Utc::now() + lease, &gate)
        .await?;
    Ok(Json(LeaseResponse {
        renewed: r.renewed,
        cancel: r.cancel,
        kill: r.kill,
        lease_ms: lease.as_millis() as u64,
    }))
}

/// How an attempt ended. Recorded once per attempt id; a repeat is
/// acknowledged with `recorded: false`.
#[utoipa::path(
    post, path = "/api/v1/agent/attempts/{id}/result", tag = "agent",
    params(("id" = String, Path, description = "Attempt id")),
    request_body = AttemptResult,
    security(("agent" = [])),
    responses((status = 200, body = ResultAck), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn report_result(
    State(state): State<AppState>,
    AgentToken(claims): AgentToken,
    ApiPath(id): ApiPath<String>,
    ApiJson(result): ApiJson<AttemptResult>,
) -> Result<Json<ResultAck>, ApiError> {
    require_live_agent(&state, &claims).await?;
    if result.attempt_id != id {
        return Err(ApiError::invalid(format!(
            "attempt_id '{}' does not match the path's '{id}'",
            result.attempt_id
        )));
    }
    result.check().map_err(ApiError::invalid)?;
    let mut result = result;
    let masks = state.vault.masks(&state.store, &id).await?;
    if !masks.is_empty() {
        result.error = result.error.map(|e| crate::vault::mask(&e, &masks));
        for v in result.outputs.values_mut() {
            *v = crate::vault::mask(v, &masks);
        }
    }
    match state
        .store
        .record_result(&claims.sub, &result, fastrand::f64(), Utc::now())
        .await?
    {
        Recorded::Recorded { .. } => {
            state.hub.forget_log_target(&id);
            state.vault.forget(&id);
            state
                .metrics
                .result_recorded(result.outcome.state().as_str());
            if let Some(limit) = result.limit_exceeded {
                state.metrics.limit_exceeded(limit.as_str());
            }
            Ok(Json(ResultAck { recorded: true }))
        }
        Recorded::Duplicate { .. } => Ok(Json(ResultAck { recorded: false })),
        Recorded::Late { job_id } => {
            state.hub.forget_log_target(&id);
            state.vault.forget(&id);
            tracing::warn!(attempt = %id, job = %job_id, outcome = ?result.outcome, "result arrived after the attempt was declared lost; kept as information, no state changed");
            Ok(Json(ResultAck { recorded: false }))
        }
        Recorded::Foreign => Err(forbidden_attempt(&id)),
        Recorded::NotFound => Err(unknown_attempt(&id)),
    }
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ArtifactQuery {
    /// The declared path (relative to the working dir) of this file.
    path: String,
}

/// Upload one collected file of an attempt, streamed; `x-drover-sha256`
/// carries its hex digest, checked against the bytes received. Only paths
/// the job declared (or files under a declared directory) are accepted.
#[utoipa::path(
    put, path = "/api/v1/agent/attempts/{id}/artifacts", tag = "agent",
    params(("id" = String, Path, description = "Attempt id"), ArtifactQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security(("agent" = [])),
    responses(
        (status = 200, body = ResultAck),
        (status = 403, description = "Another agent's attempt", body = ErrorBody),
        (status = 413, description = "Larger than max_artifact_bytes", body = ErrorBody),
        (status = 422, description = "Undeclared path or digest mismatch", body = ErrorBody),
    )
)]
async fn upload_artifact(
    State(state): State<AppState>,
    AgentToken(claims): AgentToken,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ArtifactQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Json<ResultAck>, ApiError> {
    use crate::artifacts::ArtifactError;
    require_live_agent(&state, &claims).await?;
    let Some(ctx) = state.store.upload_context(&id, &claims.sub).await? else {
        return Err(match state.store.attempt_owner(&id, &claims.sub).await? {
            Ownership::Foreign => forbidden_attempt(&id),
            _ => unknown_attempt(&id),
        });
    };
    if !drover_proto::workflows::valid_artifact_path(&q.path) {
        return Err(ApiError::invalid(format!(
            "artifact path '{}' must be relative and stay inside the working dir",
            q.path
        )));
    }
    let declared = ctx
        .artifacts
        .iter()
        .any(|d| q.path == *d || q.path.starts_with(&format!("{d}/")));
    if !declared {
        return Err(ApiError::invalid(format!(
            "artifact path '{}' was not declared by the task (declared: {})",
            q.path,
            ctx.artifacts.join(", ")
        )));
    }
    if !ctx.open {
        // The result is in: the artifacts were uploaded before it.
        return Ok(Json(ResultAck { recorded: false }));
    }
    let sha = headers
        .get(drover_proto::workflows::SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "header {} must carry the hex sha256 of the file",
                drover_proto::workflows::SHA256_HEADER
            ))
        })?
        .to_ascii_lowercase();
    let key = crate::artifacts::key(
        ctx.run_id.as_deref(),
        ctx.task_id.as_deref(),
        &ctx.job_id,
        &id,
        &q.path,
    );
    let max = state.config.max_artifact_bytes;
    let (size, digest) = state
        .artifacts
        .put(&key, body.into_data_stream(), max, &sha)
        .await
        .map_err(|e| match e {
            ArtifactError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("artifact '{}': {e}", q.path),
            ),
            ArtifactError::Digest { .. } | ArtifactError::Body(_) | ArtifactError::Key(_) => {
                ApiError::invalid(format!("artifact '{}': {e}", q.path))
            }
            other => ApiError::internal("storing an artifact", &other),
        })?;
    state
        .store
        .record_artifact(&drover_store::workflows::ArtifactRecord {
            id: drover_store::new_id(),
            run_id: ctx.run_id,
            task_id: ctx.task_id,
            job_id: ctx.job_id,
            attempt_id: id.clone(),
            path: q.path.clone(),
            size: size as i64,
            sha256: digest,
            store_key: key,
            created_at: Utc::now().timestamp_millis(),
        })
        .await?;
    state.metrics.artifact_stored(size);
    tracing::info!(attempt = %id, path = %q.path, size, "artifact stored");
    Ok(Json(ResultAck { recorded: true }))
}
