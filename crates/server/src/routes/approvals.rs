//! Approvals: the requests protected work makes (list, show, approve,
//! reject) and the protection rules that make them (admins).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use drover_proto::api::Role;
use drover_proto::approvals::{
    Approval, ApprovalState, DecideRequest, ProtectRequest, Protection, ProtectionKind,
    MAX_APPROVERS, MAX_REASON_BYTES,
};
use drover_proto::{ErrorBody, ErrorCode};
use drover_store::approvals::Vote;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::{Admin, Operator};
use crate::auth::UserAuth;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::routes::audit::Audit;
use crate::selector::Selector;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_approvals))
        .routes(routes!(approval_events))
        .routes(routes!(show_approval))
        .routes(routes!(approve))
        .routes(routes!(reject))
        .routes(routes!(list_protections, protect))
        .routes(routes!(unprotect))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only requests in this state (`pending`, `approved`, `rejected`,
    /// `expired`, `superseded`, `cancelled`) [default: every state].
    #[param(value_type = Option<ApprovalState>)]
    state: Option<String>,
    /// At most this many, newest first [default 100, at most 1000].
    limit: Option<i64>,
}

/// Approval requests, newest first.
#[utoipa::path(
    get, path = "/api/v1/approvals", tag = "approvals",
    params(ListQuery),
    security(("user" = [])),
    responses((status = 200, body = [Approval]))
)]
async fn list_approvals(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Approval>>, ApiError> {
    let filter = match q.state.as_deref() {
        Some(s) => Some(
            ApprovalState::parse(s)
                .ok_or_else(|| ApiError::invalid(format!("state: unknown approval state '{s}'")))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(state.store.list_approvals(filter, limit).await?))
}

/// How often the stream looks again when no commit woke it.
const STREAM_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Server-sent events of approval requests: first every pending one, then
/// each request whose state or approvals change, as they happen (event
/// `approval`, data the JSON `Approval`).
#[utoipa::path(
    get, path = "/api/v1/approvals/events", tag = "approvals",
    security(("user" = [])),
    responses((status = 200, description = "text/event-stream of Approval", content_type = "text/event-stream"))
)]
async fn approval_events(
    State(state): State<AppState>,
    _user: UserAuth,
) -> Result<
    axum::response::sse::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt;
    // Seen: id -> (state, approvals). The first round sends the pending.
    let seen: std::collections::HashMap<String, (ApprovalState, usize)> =
        std::collections::HashMap::new();
    let rx = state.hub.subscribe();
    let feed = futures_util::stream::unfold(
        (state, rx, seen, true),
        |(state, mut rx, mut seen, first)| async move {
            if !first {
                tokio::select! {
                    _ = state.shutdown.cancelled() => return None,
                    _ = rx.recv() => {}
                    _ = tokio::time::sleep(STREAM_POLL) => {}
                }
                // Coalesce a burst of commits into one look.
                while rx.try_recv().is_ok() {}
            }
            let list = match state.store.list_approvals(None, 200).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "approval stream: reading requests");
                    return Some((Vec::new(), (state, rx, seen, false)));
                }
            };
            let mut out = Vec::new();
            for a in list.into_iter().rev() {
                let now = (a.state, a.approved_by.len());
                let changed = match seen.get(&a.id) {
                    Some(before) => *before != now,
                    None => !first || a.state == ApprovalState::Pending,
                };
                seen.insert(a.id.clone(), now);
                if changed {
                    out.push(a);
                }
            }
            Some((out, (state, rx, seen, false)))
        },
    )
    .flat_map(futures_util::stream::iter)
    .map(|a| {
        let data = serde_json::to_string(&a).unwrap_or_default();
        Ok(Event::default()
            .event("approval")
            .id(a.id.clone())
            .data(data))
    });
    Ok(Sse::new(feed).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15))))
}

pub(crate) async fn load(state: &AppState, id: &str) -> Result<Approval, ApiError> {
    state
        .store
        .approval(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("approval '{id}' not found")))
}

/// One request, with exactly what will run.
#[utoipa::path(
    get, path = "/api/v1/approvals/{id}", tag = "approvals",
    params(("id" = String, Path, description = "Approval id or a unique prefix")),
    security(("user" = [])),
    responses((status = 200, body = Approval))
)]
async fn show_approval(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Approval>, ApiError> {
    Ok(Json(load(&state, &id).await?))
}

fn conflict(m: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, m)
}

/// Approve a pending request (operators and admins; never your own). The
/// work is released once enough distinct people approved — if its spec
/// still has the hash they approved; otherwise a new request replaces it.
#[utoipa::path(
    post, path = "/api/v1/approvals/{id}/approve", tag = "approvals",
    params(("id" = String, Path, description = "Approval id or a unique prefix")),
    request_body(content = Option<DecideRequest>),
    security(("user" = [])),
    responses((status = 200, body = Approval),
        (status = 403, body = ErrorBody, description = "Needs an operator; nobody approves their own request"),
        (status = 409, body = ErrorBody, description = "Not pending, approved by you already, or the spec changed (a new request replaces it)"))
)]
async fn approve(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
    req: Option<ApiJson<DecideRequest>>,
) -> Result<Json<Approval>, ApiError> {
    let reason = req.as_ref().and_then(|ApiJson(r)| r.reason.as_deref());
    Ok(Json(approve_as(&state, &user, &audit, &id, reason).await?))
}

/// Whether `user` may approve `a` at all: an operator or admin who did
/// not ask for it (four eyes: nobody approves their own request). The
/// dashboard shows its Approve form by this; `approve_as` decides.
pub fn may_approve(user: &UserAuth, a: &Approval) -> bool {
    user.role.at_least(Role::Operator)
        && a.state == ApprovalState::Pending
        && a.requested_by != user.username
}

/// Whether `user` may reject `a`: an operator or admin (the requester
/// too: rejecting their own request withdraws it).
pub fn may_reject(user: &UserAuth, a: &Approval) -> bool {
    user.role.at_least(Role::Operator) && a.state == ApprovalState::Pending
}

/// One approval vote of `user` on request `id`, with an optional comment;
/// returns the request as it is now. Shared by the API and the dashboard,
/// so roles, four eyes, the hash binding and the audit apply alike.
pub(crate) async fn approve_as(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    id: &str,
    reason: Option<&str>,
) -> Result<Approval, ApiError> {
    user.require(Role::Operator)?;
    check_reason(reason)?;
    audit.note("reason", reason.unwrap_or_default());
    let a = load(state, id).await?;
    note_approval(audit, &a);
    match state.store.approve(&a.id, &user.username, Utc::now()).await? {
        Vote::Granted => {
            tracing::info!(approval = %a.id, by = %user.username, "approval granted")
        }
        Vote::Counted { have, need } => {
            tracing::info!(approval = %a.id, by = %user.username, have, need, "approval counted")
        }
        Vote::Own => {
            return Err(ApiError::forbidden(format!(
                "approval {}: nobody approves their own request ({} asked for it)",
                a.id, a.requested_by
            )))
        }
        Vote::Again => {
            return Err(conflict(format!(
                "approval {}: you approved it already; it needs {} distinct approvers",
                a.id, a.approvers_needed
            )))
        }
        Vote::NotPending(s) => {
            return Err(conflict(format!(
                "approval {} is {}, not pending",
                a.id,
                s.as_str()
            )))
        }
        Vote::Changed { new_id } => {
            return Err(conflict(format!(
                "approval {}: what would run changed since it was requested; new request {new_id} replaces it (drover approvals show {new_id})",
                a.id
            )))
        }
    }
    load(state, &a.id).await
}

/// Names the request decided and the work it holds in the audit entry.
fn note_approval(audit: &Audit, a: &Approval) {
    audit.target(format!("approval:{}", a.id));
    if let Some(job) = &a.job_id {
        audit.note("job", job);
    }
    if let Some(run) = &a.run_id {
        audit.note("run", run);
    }
    audit.note("spec_hash", &a.spec_hash);
}

fn check_reason(reason: Option<&str>) -> Result<(), ApiError> {
    if let Some(r) = reason {
        if r.len() > MAX_REASON_BYTES {
            return Err(ApiError::invalid(format!(
                "reason: at most {MAX_REASON_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

/// Reject a pending request, with a reason: its job or run is cancelled.
#[utoipa::path(
    post, path = "/api/v1/approvals/{id}/reject", tag = "approvals",
    params(("id" = String, Path, description = "Approval id or a unique prefix")),
    request_body = DecideRequest,
    security(("user" = [])),
    responses((status = 200, body = Approval),
        (status = 403, body = ErrorBody, description = "Needs an operator"),
        (status = 409, body = ErrorBody, description = "Not pending"),
        (status = 422, body = ErrorBody, description = "No reason given"))
)]
async fn reject(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<DecideRequest>,
) -> Result<Json<Approval>, ApiError> {
    Ok(Json(
        reject_as(&state, &user, &audit, &id, req.reason.as_deref()).await?,
    ))
}

/// Rejects request `id` for `user`, with a reason (required); returns the
/// request as it is now. Shared by the API and the dashboard.
pub(crate) async fn reject_as(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    id: &str,
    reason: Option<&str>,
) -> Result<Approval, ApiError> {
    user.require(Role::Operator)?;
    check_reason(reason)?;
    let reason = reason
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| ApiError::invalid("reason: a rejection needs a reason"))?;
    audit.note("reason", reason);
    let a = load(state, id).await?;
    note_approval(audit, &a);
    if let Some(s) = state
        .store
        .reject(&a.id, &user.username, reason, Utc::now())
        .await?
    {
        return Err(conflict(format!(
            "approval {} is {}, not pending",
            a.id,
            s.as_str()
        )));
    }
    tracing::info!(approval = %a.id, by = %user.username, %reason, "approval rejected");
    load(state, &a.id).await
}

/// The protection rules.
#[utoipa::path(
    get, path = "/api/v1/protections", tag = "approvals",
    security(("user" = [])),
    responses((status = 200, body = [Protection]))
)]
async fn list_protections(
    State(state): State<AppState>,
    _user: UserAuth,
) -> Result<Json<Vec<Protection>>, ApiError> {
    Ok(Json(state.store.list_protections().await?))
}

/// Protect actions, sandbox profiles, workflows (a name glob) or agents
/// (a target selector): work touching them waits for approval. The same
/// kind and pattern again changes the number of approvers.
#[utoipa::path(
    post, path = "/api/v1/protections", tag = "approvals",
    request_body = ProtectRequest,
    security(("user" = [])),
    responses((status = 201, body = [Protection]), (status = 403, body = ErrorBody, description = "Needs an admin"))
)]
async fn protect(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: Audit,
    ApiJson(req): ApiJson<ProtectRequest>,
) -> Result<(StatusCode, Json<Vec<Protection>>), ApiError> {
    let approvers = req.approvers.unwrap_or(1);
    if approvers == 0 || approvers > MAX_APPROVERS {
        return Err(ApiError::invalid(format!(
            "approvers: between 1 and {MAX_APPROVERS}, got {approvers}"
        )));
    }
    let pattern = req.pattern.trim();
    if pattern.is_empty() || pattern.len() > 256 {
        return Err(ApiError::invalid("pattern: 1 to 256 bytes"));
    }
    match req.kind {
        ProtectionKind::Target => {
            Selector::parse(pattern).map_err(|e| ApiError::invalid(format!("pattern: {e}")))?;
        }
        _ => {
            let ok = pattern
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'));
            if !ok {
                return Err(ApiError::invalid(format!(
                    "pattern: '{pattern}' is not a name glob (letters, digits, '-', '_', '.', '*')"
                )));
            }
        }
    }
    state
        .store
        .protect(req.kind, pattern, approvers, &user.username, Utc::now())
        .await?;
    audit.note("kind", req.kind.as_str());
    audit.note("pattern", pattern);
    audit.note("approvers", approvers.to_string());
    tracing::info!(by = %user.username, kind = req.kind.as_str(), %pattern, approvers, "protection set");
    Ok((
        StatusCode::CREATED,
        Json(state.store.list_protections().await?),
    ))
}

/// Remove a protection rule. Work already waiting keeps its request.
#[utoipa::path(
    delete, path = "/api/v1/protections/{id}", tag = "approvals",
    params(("id" = String, Path, description = "Rule id")),
    security(("user" = [])),
    responses((status = 204), (status = 403, body = ErrorBody, description = "Needs an admin"))
)]
async fn unprotect(
    State(state): State<AppState>,
    Admin(user): Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if !state.store.unprotect(&id).await? {
        return Err(ApiError::not_found(format!("protection '{id}' not found")));
    }
    tracing::info!(by = %user.username, protection = %id, "protection removed");
    Ok(StatusCode::NO_CONTENT)
}
