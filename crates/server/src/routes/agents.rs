//! The fleet as operators see it: list (all, or those a target selects),
//! show, label, set the group, revoke, remove a revoked one, and whether
//! an agent takes work: drain (no new work; what runs finishes), stop (no
//! new work; what runs is cancelled, at once with `force`), resume.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use drover_proto::api::{
    Agent, AgentStatus, DispatchState, DrainAgentRequest, LabelAgentRequest, RevokeAgentRequest,
    SetGroupRequest, StopRequest, StopResponse,
};
use drover_proto::labels::{check_group, check_key, check_labels};
use drover_proto::ErrorBody;
use drover_store::AgentRecord;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::{Admin, Operator};
use crate::auth::UserAuth;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::routes::audit::Audit;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(show_agent, remove_agent))
        .routes(routes!(label_agent))
        .routes(routes!(set_group))
        .routes(routes!(revoke_agent))
        .routes(routes!(drain_agent))
        .routes(routes!(resume_agent))
        .routes(routes!(stop_agent))
}

/// Refuses labels an operator may not set: the names of facts a target
/// selects on (`hostname`, `os`, `arch`, `docker`, `runtime.*`, … and
/// `group`, which has its own command).
pub fn check_settable(labels: &drover_proto::labels::Labels) -> Result<(), ApiError> {
    for k in labels.keys() {
        check_settable_key(k)?;
    }
    Ok(())
}

fn check_settable_key(k: &str) -> Result<(), ApiError> {
    if k == "group" {
        return Err(ApiError::invalid(
            "'group' is not a label: set an agent's group with drover agents set-group ID GROUP",
        ));
    }
    if drover_proto::agent::is_fact_key(k) {
        return Err(ApiError::invalid(format!(
            "label '{k}' is reported by the agent itself and cannot be set (reserved: {}, runtime.*)",
            drover_proto::agent::FACT_KEYS.join(", ")
        )));
    }
    Ok(())
}

/// The API view of a stored agent, with its health as of `now`.
pub fn to_api(state: &AppState, a: AgentRecord, now: DateTime<Utc>) -> Agent {
    Agent {
        status: AgentStatus::derive(
            a.revoked_at.is_some(),
            a.last_seen_at,
            now,
            state.config.health(),
        ),
        id: a.id,
        hostname: a.hostname,
        labels: a.labels,
        group: a.group,
        agent_version: a.agent_version,
        enrolled_at: a.enrolled_at,
        last_seen_at: a.last_seen_at,
        revoked_at: a.revoked_at,
        revoked_reason: a.revoked_reason,
        inventory: a.inventory,
        dispatch: a.dispatch,
        dispatch_reason: a.dispatch_reason,
    }
}

pub(crate) async fn load(state: &AppState, id_or_prefix: &str) -> Result<AgentRecord, ApiError> {
    let id = state.store.resolve_agent_id(id_or_prefix).await?;
    state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("agent '{id}' not found")))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListAgentsQuery {
    /// Only the agents this target selects, as a job with the same
    /// `target` would (docs/SELECTORS.md): an agent id or prefix, `*`, or
    /// terms like `role in (web,api),!env=prod`. Revoked agents are listed
    /// only when named by id.
    target: Option<String>,
}

/// Every enrolled agent, oldest first; with `target`, those it selects.
#[utoipa::path(
    get, path = "/api/v1/agents", tag = "agents",
    params(ListAgentsQuery),
    security(("user" = [])),
    responses((status = 200, body = [Agent]), (status = 422, body = ErrorBody, description = "The target does not parse"))
)]
async fn list_agents(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiQuery(q): ApiQuery<ListAgentsQuery>,
) -> Result<Json<Vec<Agent>>, ApiError> {
    let now = Utc::now();
    let agents = match &q.target {
        None => state.store.list_agents().await?,
        Some(t) => {
            crate::selector::Selector::parse(t)
                .map_err(|e| ApiError::invalid(format!("target: {e}")))?;
            match crate::domain::matching_agents(&state.store, t).await {
                Ok(agents) => agents,
                // Matching nothing is an answer here, not an error.
                Err(crate::domain::Error::Target(_)) => Vec::new(),
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(Json(
        agents.into_iter().map(|a| to_api(&state, a, now)).collect(),
    ))
}

/// One agent, by id or a unique id prefix.
#[utoipa::path(
    get, path = "/api/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent id or a unique prefix of it")),
    security(("user" = [])),
    responses((status = 200, body = Agent), (status = 404, body = ErrorBody))
)]
async fn show_agent(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Agent>, ApiError> {
    let a = load(&state, &id).await?;
    Ok(Json(to_api(&state, a, Utc::now())))
}

/// Set and remove labels of an agent.
#[utoipa::path(
    patch, path = "/api/v1/agents/{id}/labels", tag = "agents",
    params(("id" = String, Path, description = "Agent id or a unique prefix of it")),
    request_body = LabelAgentRequest,
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), (status = 200, body = Agent), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody))
)]
async fn label_agent(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<LabelAgentRequest>,
) -> Result<Json<Agent>, ApiError> {
    check_labels(&req.set).map_err(|e| ApiError::invalid(e.to_string()))?;
    check_settable(&req.set)?;
    for k in &req.remove {
        check_key(k).map_err(|e| ApiError::invalid(e.to_string()))?;
        if req.set.contains_key(k) {
            return Err(ApiError::invalid(format!(
                "label '{k}' is both set and removed"
            )));
        }
    }
    let mut a = load(&state, &id).await?;
    audit.target(format!("agent:{}", a.id));
    let set: Vec<String> = req.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
    audit.note("set", set.join(","));
    audit.note("remove", req.remove.join(","));
    for k in &req.remove {
        a.labels.remove(k);
    }
    a.labels.extend(req.set.clone());
    state.store.set_agent_labels(&a.id, &a.labels).await?;
    tracing::info!(by = %user.username, agent = %a.id, labels = ?a.labels, "agent labels changed");
    Ok(Json(to_api(&state, a, Utc::now())))
}

/// Move an agent to a group (`group:NAME` in targets), or out of every
/// group with `null`.
#[utoipa::path(
    put, path = "/api/v1/agents/{id}/group", tag = "agents",
    params(("id" = String, Path, description = "Agent id or a unique prefix of it")),
    request_body = SetGroupRequest,
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), (status = 200, body = Agent), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody))
)]
async fn set_group(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SetGroupRequest>,
) -> Result<Json<Agent>, ApiError> {
    if let Some(g) = &req.group {
        check_group(g).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let a = load(&state, &id).await?;
    audit.target(format!("agent:{}", a.id));
    audit.note("group", req.group.as_deref().unwrap_or("-"));
    state
        .store
        .set_agent_group(&a.id, req.group.as_deref())
        .await?;
    tracing::info!(by = %user.username, agent = %a.id, group = ?req.group, "agent group changed");
    let a = load(&state, &a.id).await?;
    Ok(Json(to_api(&state, a, Utc::now())))
}

/// Remove a revoked agent: it leaves every listing and target; the
/// attempts it ran stay in their jobs' history under its id. A live
/// agent is refused: revoke it first.
#[utoipa::path(
    delete, path = "/api/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent id or a unique prefix of it")),
    security(("user" = [])),
    responses(
        (status = 403, body = ErrorBody, description = "Needs an admin"),
        (status = 204),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The agent is not revoked: revoke it first"),
    )
)]
async fn remove_agent(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let a = load(&state, &id).await?;
    audit.target(format!("agent:{}", a.id));
    if a.revoked_at.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            drover_proto::ErrorCode::Conflict,
            format!(
                "agent {} is not revoked: revoke it first (drover agents revoke {})",
                a.id, a.id
            ),
        ));
    }
    if !state.store.remove_agent(&a.id, Utc::now()).await? {
        return Err(ApiError::not_found(format!("agent '{}' not found", a.id)));
    }
    tracing::info!(by = %user.username, agent = %a.id, "agent removed");
    Ok(StatusCode::NO_CONTENT)
}

/// Revoke an agent: its next request is refused with 401.
#[utoipa::path(
    post, path = "/api/v1/agents/{id}/revoke", tag = "agents",
    params(("id" = String, Path, description = "Agent id or a unique prefix of it")),
    request_body(content = Option<RevokeAgentRequest>),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), (status = 200, body = Agent), (status = 404, body = ErrorBody))
)]
async fn revoke_agent(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
    req: Option<ApiJson<RevokeAgentRequest>>,
) -> Result<Json<Agent>, ApiError> {
    let reason = req
        .and_then(|ApiJson(r)| r.reason)
        .unwrap_or_else(|| format!("revoked by {}", user.username));
    if reason.len() > 500 {
        return Err(ApiError::invalid("reason must be at most 500 bytes"));
    }
    let id = state.store.resolve_agent_id(&id).await?;
    audit.target(format!("agent:{id}"));
    audit.note("reason", &reason);
    state.store.revoke_agent(&id, &reason, Utc::now()).await?;
    // Its unfinished attempts can never run now: end them, with the reason.
    state
        .store
        .abandon_agent_attempts(&id, &format!("agent revoked: {reason}"), Utc::now())
        .await?;
    tracing::info!(by = %user.username, agent = %id, %reason, "agent revoked");
    let a = load(&state, &id).await?;
    Ok(Json(to_api(&state, a, Utc::now())))
}

fn dispatch_reason(verb: &str, by: &str, reason: Option<&str>) -> String {
    match reason {
        Some(r) => format!("{verb} by {by}: {r}"),
        None => format!("{verb} by {by}"),
    }
}

/// Drain an agent: it is given no new work; what it runs finishes. Work
/// for it waits, saying why.
#[utoipa::path(
    post, path = "/api/v1/agents/{id}/drain", tag = "agents",
    params(("id" = String, Path, description = "Agent id or a unique prefix of it")),
    request_body(content = Option<DrainAgentRequest>),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an operator whose scope holds the agent"), 
        (status = 200, body = Agent),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The agent is stopped: resume it first"),
    )
)]
async fn drain_agent(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
    req: Option<ApiJson<DrainAgentRequest>>,
) -> Result<Json<Agent>, ApiError> {
    let req = req.map(|ApiJson(r)| r).unwrap_or_default();
    let a = drain(&state, &user, &audit, &id, req.reason.as_deref()).await?;
    Ok(Json(to_api(&state, a, Utc::now())))
}

/// Drains an agent for `user` (an operator whose scope holds it); returns
/// it as it is now. Shared by the API and the dashboard.
pub(crate) async fn drain(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    id: &str,
    reason: Option<&str>,
) -> Result<AgentRecord, ApiError> {
    user.require(drover_proto::api::Role::Operator)?;
    super::fleet::check_reason(reason)?;
    audit.note("reason", reason.unwrap_or_default());
    let a = load(state, id).await?;
    audit.target(format!("agent:{}", a.id));
    user.check_agent(&a)?;
    if a.dispatch == DispatchState::Stopped {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            drover_proto::ErrorCode::Conflict,
            format!("agent {} is stopped; resume it first", a.id),
        ));
    }
    let reason = dispatch_reason("drained", &user.username, reason);
    state
        .store
        .set_agent_dispatch(&a.id, DispatchState::Draining, Some(&reason))
        .await?;
    tracing::info!(by = %user.username, agent = %a.id, %reason, "agent drained");
    load(state, &a.id).await
}

/// Let a drained or stopped agent take work again.
#[utoipa::path(
    post, path = "/api/v1/agents/{id}/resume", tag = "agents",
    params(("id" = String, Path, description = "Agent id or a unique prefix of it")),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an operator whose scope holds the agent"), (status = 200, body = Agent), (status = 404, body = ErrorBody))
)]
async fn resume_agent(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Agent>, ApiError> {
    let a = resume(&state, &user, &audit, &id).await?;
    Ok(Json(to_api(&state, a, Utc::now())))
}

/// Lets an agent take work again, for `user` (an operator whose scope
/// holds it); returns it as it is now. Shared by the API and the dashboard.
pub(crate) async fn resume(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    id: &str,
) -> Result<AgentRecord, ApiError> {
    user.require(drover_proto::api::Role::Operator)?;
    let a = load(state, id).await?;
    audit.target(format!("agent:{}", a.id));
    user.check_agent(&a)?;
    state
        .store
        .set_agent_dispatch(&a.id, DispatchState::Active, None)
        .await?;
    tracing::info!(by = %user.username, agent = %a.id, "agent resumed");
    load(state, &a.id).await
}

/// Stop an agent: it is given no new work, and what it runs is cancelled —
/// SIGTERM, then SIGKILL after each attempt's kill grace; with `force`,
/// SIGKILL at once. Work for it waits until `resume`.
#[utoipa::path(
    post, path = "/api/v1/agents/{id}/stop", tag = "agents",
    params(("id" = String, Path, description = "Agent id or a unique prefix of it")),
    request_body(content = Option<StopRequest>),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an operator whose scope holds the agent"), (status = 200, body = StopResponse), (status = 404, body = ErrorBody))
)]
async fn stop_agent(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
    req: Option<ApiJson<StopRequest>>,
) -> Result<Json<StopResponse>, ApiError> {
    let req = req.map(|ApiJson(r)| r).unwrap_or_default();
    stop(&state, &user, &audit, &id, &req).await.map(Json)
}

/// Stops an agent for `user` (an operator whose scope holds it). Shared
/// by the API and the dashboard.
pub(crate) async fn stop(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    id: &str,
    req: &StopRequest,
) -> Result<StopResponse, ApiError> {
    user.require(drover_proto::api::Role::Operator)?;
    super::fleet::check_reason(req.reason.as_deref())?;
    audit.note("reason", req.reason.as_deref().unwrap_or_default());
    if req.force {
        audit.note("force", "true");
    }
    let a = load(state, id).await?;
    audit.target(format!("agent:{}", a.id));
    user.check_agent(&a)?;
    let verb = if req.force {
        "stopped (forced)"
    } else {
        "stopped"
    };
    let reason = dispatch_reason(verb, &user.username, req.reason.as_deref());
    let stopped = state.store.stop_agent(&a.id, req.force, &reason).await?;
    tracing::warn!(by = %user.username, agent = %a.id, force = req.force, attempts = stopped.attempts.len(), "agent stopped");
    Ok(StopResponse {
        cancelled: stopped.attempts.len() as u64,
        agents: u64::from(!stopped.attempts.is_empty()),
        fleet: super::fleet::status(state).await?,
    })
}
