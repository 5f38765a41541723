//! Server-side schedules: create or replace, list, show with recent
//! slots, pause, resume, remove. A schedule is checked as its first job or
//! run would be (action, parameters, target, scope; or the workflow
//! definition and inputs) when it is made, so a bad one is refused then
//! and nothing is stored. Every change is audited in its own commit
//! (`schedule.*`, target `schedule:NAME`).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use drover_proto::schedules::{
    Missed, Overlap, PutScheduleRequest, Schedule, ScheduleDetail, ScheduleSlot,
};
use drover_proto::scripts::is_script_name;
use drover_proto::ErrorBody;
use drover_store::schedules::{NewSchedule, ScheduleRecord};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Operator;
use crate::auth::UserAuth;
use crate::domain;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::routes::audit::Audit;
use crate::schedules::{Clock, Work};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(put_schedule, list_schedules))
        .routes(routes!(show_schedule, delete_schedule))
        .routes(routes!(pause_schedule))
        .routes(routes!(resume_schedule))
}

/// Slots shown with a schedule.
const SHOWN_SLOTS: i64 = 50;

fn check_name(name: &str) -> Result<(), ApiError> {
    if is_script_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "name: '{}' is invalid: a letter, then letters, digits, '-' and '_', at most 64",
            name.escape_debug()
        )))
    }
}

fn to_api(r: ScheduleRecord) -> Schedule {
    let work = Work::from_record(&r).ok();
    let (action, workflow) = match work {
        Some(Work::Action(a)) => (Some(a), None),
        Some(Work::Workflow(w)) => (None, Some(w)),
        None => (None, None),
    };
    Schedule {
        overlap: Overlap::parse(&r.overlap).unwrap_or_default(),
        missed: Missed::parse(&r.missed).unwrap_or_default(),
        name: r.name,
        kind: r.kind,
        cron: r.cron,
        timezone: r.timezone,
        paused: r.paused,
        created_by: r.created_by,
        created_at: r.created_at,
        updated_at: r.updated_at,
        next_slot: r.next_slot,
        action,
        workflow,
    }
}

async fn load(state: &AppState, name: &str) -> Result<ScheduleRecord, ApiError> {
    check_name(name)?;
    state
        .store
        .schedule(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("schedule '{name}' not found")))
}

/// Checks what a schedule starts as if it started now, changing nothing.
async fn check_work(state: &AppState, user: &UserAuth, work: &Work) -> Result<(), ApiError> {
    match work {
        Work::Action(req) => {
            if let Some(t) = req.timeout_secs {
                if t == 0 || Duration::from_secs(t) > domain::MAX_TIMEOUT {
                    return Err(ApiError::invalid(format!(
                        "action.timeout_secs must be between 1 and {}, got {t}",
                        domain::MAX_TIMEOUT.as_secs()
                    )));
                }
            }
            domain::Jobs::new(&state.store)
                .build(&domain::JobRequest {
                    action: &req.action,
                    params: &req.params,
                    timeout: req.timeout_secs.map(Duration::from_secs),
                    retries: req.retries,
                    sandbox: req.sandbox.as_deref(),
                    placement: domain::Placement::Target(&req.target),
                    target: &req.target,
                    artifacts: &[],
                    who: "the schedule's job",
                    env: &BTreeMap::new(),
                    limits: &user.limits,
                })
                .await?;
        }
        Work::Workflow(req) => {
            crate::routes::workflows::check_run(state, user, req).await?;
        }
    }
    Ok(())
}

/// Create a schedule, or replace the one of that name (it is resumed; its
/// slots stay).
#[utoipa::path(
    post, path = "/api/v1/schedules", tag = "schedules",
    request_body = PutScheduleRequest,
    security(("user" = [])),
    responses(
        (status = 201, body = Schedule, description = "A new schedule"),
        (status = 200, body = Schedule, description = "The schedule of that name, replaced"),
        (status = 403, body = ErrorBody, description = "Needs an operator whose scope holds the action and agents"),
        (status = 422, body = ErrorBody, description = "Bad cron, time zone, action, parameter, target or workflow; the message names the field"),
    )
)]
async fn put_schedule(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiJson(req): ApiJson<PutScheduleRequest>,
) -> Result<(StatusCode, Json<Schedule>), ApiError> {
    check_name(&req.name)?;
    audit.target(format!("schedule:{}", req.name));
    audit.note("cron", &req.cron);
    let timezone = req.timezone.as_deref().unwrap_or("UTC");
    let clock = Clock::parse(&req.cron, timezone).map_err(ApiError::invalid)?;
    let work = match (req.action, req.workflow) {
        (Some(a), None) => Work::Action(a),
        (None, Some(w)) => Work::Workflow(w),
        _ => {
            return Err(ApiError::invalid(
                "action, workflow: exactly one of them is needed",
            ))
        }
    };
    audit.note("kind", work.kind());
    check_work(&state, &user, &work).await?;
    let now = Utc::now();
    let scope = (user.token_scope != Default::default())
        .then(|| serde_json::to_string(&user.token_scope))
        .transpose()
        .map_err(|e| ApiError::internal("encoding a scope", &e))?;
    let spec = work.to_json();
    let mut tx = state.store.begin().await?;
    let created = tx
        .put_schedule(&NewSchedule {
            name: &req.name,
            kind: work.kind(),
            spec: &spec,
            cron: &req.cron,
            timezone,
            overlap: req.overlap.as_str(),
            missed: req.missed.as_str(),
            scope: scope.as_deref(),
            by: &user.username,
            next_slot: clock.next_after(now),
            now,
        })
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        audit.note("replaced", "true");
        StatusCode::OK
    };
    audit.write(&mut tx, status).await?;
    tx.commit().await?;
    tracing::info!(schedule = %req.name, cron = %req.cron, by = %user.username, created, "schedule saved");
    Ok((status, Json(to_api(load(&state, &req.name).await?))))
}

/// Every schedule, by name.
#[utoipa::path(
    get, path = "/api/v1/schedules", tag = "schedules",
    security(("user" = [])),
    responses((status = 200, body = [Schedule]))
)]
async fn list_schedules(
    State(state): State<AppState>,
    _user: UserAuth,
) -> Result<Json<Vec<Schedule>>, ApiError> {
    let list = state.store.list_schedules().await?;
    Ok(Json(list.into_iter().map(to_api).collect()))
}

/// A schedule with its recent slots (newest first) and the state of what
/// each started.
#[utoipa::path(
    get, path = "/api/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name")),
    security(("user" = [])),
    responses((status = 200, body = ScheduleDetail), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody))
)]
async fn show_schedule(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ScheduleDetail>, ApiError> {
    let rec = load(&state, &name).await?;
    let mut slots = Vec::new();
    for s in state.store.schedule_slots(&name, SHOWN_SLOTS).await? {
        let target = s.target.as_deref().unwrap_or_default();
        let now = if let Some(id) = target.strip_prefix("job:") {
            state
                .store
                .job(id)
                .await?
                .map(|j| j.state.as_str().to_owned())
        } else if let Some(id) = target.strip_prefix("run:") {
            state
                .store
                .run(id)
                .await?
                .map(|r| r.state.as_str().to_owned())
        } else {
            None
        };
        slots.push(ScheduleSlot {
            slot_at: s.slot_at,
            outcome: s.outcome,
            target: s.target,
            detail: s.detail,
            missed: s.missed,
            claimed_at: s.claimed_at,
            state: now,
        });
    }
    Ok(Json(ScheduleDetail {
        schedule: to_api(rec),
        slots,
    }))
}

/// Stop firing a schedule's slots until it is resumed.
#[utoipa::path(
    post, path = "/api/v1/schedules/{name}/pause", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name")),
    security(("user" = [])),
    responses((status = 200, body = Schedule), (status = 403, body = ErrorBody, description = "Needs an operator"), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody))
)]
async fn pause_schedule(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Schedule>, ApiError> {
    set_paused(&state, &user, &audit, &name, true).await
}

/// Fire a paused schedule's slots again, from the next one to come (the
/// slots it passed while paused are not fired).
#[utoipa::path(
    post, path = "/api/v1/schedules/{name}/resume", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name")),
    security(("user" = [])),
    responses((status = 200, body = Schedule), (status = 403, body = ErrorBody, description = "Needs an operator"), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody))
)]
async fn resume_schedule(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Schedule>, ApiError> {
    set_paused(&state, &user, &audit, &name, false).await
}

async fn set_paused(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    name: &str,
    paused: bool,
) -> Result<Json<Schedule>, ApiError> {
    let rec = load(state, name).await?;
    let now = Utc::now();
    let next = if paused {
        None
    } else {
        Clock::parse(&rec.cron, &rec.timezone)
            .map_err(|e| ApiError::internal("reading a schedule's clock", &e))?
            .next_after(now)
    };
    let mut tx = state.store.begin().await?;
    if !tx.set_schedule_paused(name, paused, next, now).await? {
        return Err(ApiError::not_found(format!("schedule '{name}' not found")));
    }
    audit.write(&mut tx, StatusCode::OK).await?;
    tx.commit().await?;
    tracing::info!(schedule = %name, paused, by = %user.username, "schedule paused or resumed");
    Ok(Json(to_api(load(state, name).await?)))
}

/// Remove a schedule and its slots' records (what they started stays).
#[utoipa::path(
    delete, path = "/api/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name")),
    security(("user" = [])),
    responses((status = 200, body = Schedule, description = "The schedule removed"), (status = 403, body = ErrorBody, description = "Needs an operator"), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody))
)]
async fn delete_schedule(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Schedule>, ApiError> {
    let rec = load(&state, &name).await?;
    let mut tx = state.store.begin().await?;
    if !tx.delete_schedule(&name).await? {
        return Err(ApiError::not_found(format!("schedule '{name}' not found")));
    }
    audit.write(&mut tx, StatusCode::OK).await?;
    tx.commit().await?;
    tracing::info!(schedule = %name, by = %user.username, "schedule removed");
    Ok(Json(to_api(rec)))
}
