//! Workflow runs as operators see them: submit a definition, list, show
//! (which tasks run, which wait and why), cancel, result, artifacts, and
//! the live event stream over SSE or WebSocket, resumable by event id.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use drover_proto::workflows::{
    Artifact, Run, RunEvent, RunResult, RunState, RunWorkspace, SubmitRunRequest, TaskRun,
    TaskState, WorkflowDef, WorkspaceState, SHA256_HEADER,
};
use drover_proto::ErrorBody;
use drover_store::workflows::{ArtifactRecord, NewRun, RunRecord};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Operator;
use crate::auth::UserAuth;
use crate::catalog::resolve_params;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::routes::audit::Audit;
use crate::selector::Selector;
use crate::state::AppState;
use crate::workflow::def::{self, Parsed};
use crate::workflow::template;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit_run, list_runs))
        .routes(routes!(show_run))
        .routes(routes!(cancel_run))
        .routes(routes!(run_result))
        .routes(routes!(run_artifacts))
        .routes(routes!(download_artifact))
        .routes(routes!(run_events))
        .routes(routes!(run_ws))
        .routes(routes!(remove_run_workspace))
}

/// Events read from the store per round.
const EVENT_BATCH: i64 = 500;
/// Longest a stream waits before looking at the store again.
const STREAM_POLL: Duration = Duration::from_secs(1);

/// Start a run of a workflow definition.
#[utoipa::path(
    post, path = "/api/v1/workflows/runs", tag = "workflows",
    request_body = SubmitRunRequest,
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an operator whose scope holds every task's action"), (status = 201, body = Run), (status = 422, description = "The definition or an input is invalid; the message names the line", body = ErrorBody))
)]
async fn submit_run(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiJson(req): ApiJson<SubmitRunRequest>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    match start_run(&state, &user, &audit, &req, None).await? {
        Some(id) => Ok((StatusCode::CREATED, Json(load_run(&state, &id).await?))),
        None => Err(ApiError::internal(
            "starting a run",
            &"a run without a slot was not created",
        )),
    }
}

/// Checks and starts a run for `user` (an operator whose scope holds every
/// task's action), the run and its audit entry in one commit; for a
/// schedule's slot, the slot is claimed in that commit too, and `None`
/// means another server process has it. Answers the new run's id.
pub(crate) async fn start_run(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    req: &SubmitRunRequest,
    slot: Option<&crate::schedules::Firing<'_>>,
) -> Result<Option<String>, ApiError> {
    user.require(drover_proto::api::Role::Operator)?;
    let (parsed, inputs) = check_run(state, user, req).await?;
    let active = state.store.count_running_runs().await?;
    if u64::try_from(active).unwrap_or(0) >= state.config.max_active_runs {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            drover_proto::ErrorCode::Unavailable,
            format!(
                "{active} runs are active, the most this server runs at once (max_active_runs): \
                 submit again when some have ended"
            ),
        ));
    }
    let (body, hash) = def::canonical(&parsed.def);
    let now = Utc::now();
    // Every run ends: one that waits for ever (on an offline agent, …)
    // times out after the default when its definition sets no timeout.
    let timeout = parsed
        .def
        .timeout
        .unwrap_or(state.config.default_run_timeout);
    let deadline = Some(
        now + chrono::Duration::milliseconds(timeout.as_millis().min(i64::MAX as u128) as i64),
    );
    let task_ids: Vec<String> = parsed.def.tasks.iter().map(|t| t.id.clone()).collect();
    let request = crate::approvals::request_for_run(
        &state.store,
        &parsed.def.name,
        &hash,
        &inputs,
        &user.username,
        state.config.approval_ttl,
    )
    .await?;
    let approval = request.as_ref().map(|r| r.as_new());
    audit.note("workflow", &parsed.def.name);
    audit.note("definition", &hash);
    if request.is_some() {
        audit.note("approval", "required");
    }
    // The run, the slot (for a schedule) and the audit entry in one commit.
    let mut tx = state.store.begin().await?;
    let id = tx
        .create_run(
            &NewRun {
                name: &parsed.def.name,
                def_hash: &hash,
                def_body: &body,
                inputs: &inputs,
                created_by: &user.username,
                deadline,
                tasks: &task_ids,
                workspace: parsed.def.workspace.is_some(),
                scope: user.limits.to_json().as_deref(),
                approval: approval.as_ref(),
            },
            now,
        )
        .await?;
    if let Some(slot) = slot {
        if !tx.claim_slot(&slot.claim(&format!("run:{id}"))).await? {
            return Ok(None);
        }
    }
    audit.target(format!("run:{id}"));
    audit.write(&mut tx, StatusCode::CREATED).await?;
    tx.commit().await?;
    tracing::info!(run = %id, workflow = %parsed.def.name, tasks = task_ids.len(), by = %user.username, "run submitted");
    Ok(Some(id))
}

/// The part of [`start_run`] that changes nothing: parses the definition
/// and checks it, its actions, the user's scope, its sandboxes and inputs.
/// Schedules check theirs with it when they are made.
pub(crate) async fn check_run(
    state: &AppState,
    user: &UserAuth,
    req: &SubmitRunRequest,
) -> Result<(Parsed, BTreeMap<String, String>), ApiError> {
    let source = req.source.as_deref().unwrap_or("definition");
    let text = match &req.definition {
        serde_json::Value::String(s) => s.clone(),
        obj @ serde_json::Value::Object(_) => serde_json::to_string_pretty(obj)
            .map_err(|e| ApiError::internal("encoding the definition", &e))?,
        _ => {
            return Err(ApiError::invalid(
                "definition must be YAML or JSON text, or a JSON object",
            ))
        }
    };
    let parsed = def::parse(&text, source).map_err(ApiError::invalid)?;
    let egress = crate::egress::EgressPolicy::new(&state.config.webhook_allow);
    for (i, hook) in parsed.def.webhooks.iter().enumerate() {
        egress
            .check_url(&hook.url)
            .map_err(|e| ApiError::invalid(format!("{source}: webhooks[{i}]: {e}")))?;
    }
    check_actions(state, &parsed).await?;
    for task in &parsed.def.tasks {
        if !user.limits.allows_action(&task.action) {
            return Err(ApiError::forbidden(format!(
                "{}: task '{}': action '{}' is outside your scope ({})",
                parsed.task_at[&task.id],
                task.id,
                task.action,
                user.limits.describe()
            )));
        }
    }
    check_sandboxes(state, &parsed).await?;
    let inputs = resolve_inputs(&parsed.def, &req.inputs).map_err(ApiError::invalid)?;
    Ok((parsed, inputs))
}

/// Whether `user` may cancel a run `created_by` submitted: an operator (or admin) without a
/// scope, or a scoped one who submitted it. The dashboard shows its
/// cancel form by this; [`cancel`] enforces it.
pub(crate) fn may_stop(user: &UserAuth, created_by: &str) -> bool {
    user.role.at_least(drover_proto::api::Role::Operator)
        && (user.limits.is_everywhere() || created_by == user.username)
}

/// A scoped operator stops only the runs it submitted; anyone else
/// acting as operator stops any run.
async fn check_run_owner(state: &AppState, user: &UserAuth, id: &str) -> Result<(), ApiError> {
    if user.limits.is_everywhere() {
        return Ok(());
    }
    let run = state
        .store
        .run(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run '{id}' not found")))?;
    if may_stop(user, &run.created_by) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "run {id} was submitted by {}; with a scope ({}) you may stop only your own runs",
        run.created_by,
        user.limits.describe()
    )))
}

/// Every task's action must exist, its parameters must be known to the
/// action, and those without references must already be valid.
async fn check_actions(state: &AppState, parsed: &Parsed) -> Result<(), ApiError> {
    for task in &parsed.def.tasks {
        let at = &parsed.task_at[&task.id];
        let fail = |m: String| ApiError::invalid(format!("{at}: task '{}': {m}", task.id));
        Selector::parse(&task.target).map_err(|e| fail(format!("target: {e}")))?;
        let Some((spec, _)) = super::actions::find(state, &task.action).await? else {
            return Err(fail(format!(
                "unknown action '{}': see drover actions list",
                task.action
            )));
        };
        for name in task.params.keys() {
            if !spec.params.contains_key(name) {
                let known: Vec<&str> = spec.params.keys().map(String::as_str).collect();
                return Err(fail(format!(
                    "action '{}' has no parameter '{name}' (it takes: {})",
                    spec.name,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        let has_refs = task.params.values().any(|v| {
            v.as_str()
                .is_some_and(|s| !template::refs(s).unwrap_or_default().is_empty())
        });
        if !has_refs {
            resolve_params(&spec, &task.params).map_err(fail)?;
        }
    }
    Ok(())
}

/// Every sandbox a task or the workspace names must exist; an action that
/// asks for a container is never run as a process; in a docker workspace
/// every task runs in the workspace's container.
async fn check_sandboxes(state: &AppState, parsed: &Parsed) -> Result<(), ApiError> {
    let ws_profile = match &parsed.def.workspace {
        Some(w) => {
            Selector::parse(&w.target)
                .map_err(|e| ApiError::invalid(format!("workspace: target: {e}")))?;
            Some(
                crate::workflow::workspace::profile(state, &parsed.def)
                    .await?
                    .map_err(ApiError::invalid)?,
            )
        }
        None => None,
    };
    for task in &parsed.def.tasks {
        let at = &parsed.task_at[&task.id];
        let fail = |m: String| ApiError::invalid(format!("{at}: task '{}': {m}", task.id));
        let Some((spec, _)) = super::actions::find(state, &task.action).await? else {
            continue;
        };
        let own = crate::sandboxes::resolve(state, &spec, task.sandbox.as_deref())
            .await?
            .map_err(fail)?;
        if let Some(ws) = &parsed.def.workspace {
            if let Some(name) = ws.env.keys().find(|k| spec.env.contains_key(*k)) {
                return Err(fail(format!(
                    "variable '{name}' is set both by the workspace and by action '{}'",
                    spec.name
                )));
            }
        }
        if let Some(ws) = &ws_profile {
            let who = format!("task '{}'", task.id);
            crate::workflow::workspace::task_sandbox(&who, task.sandbox.as_deref(), &spec, own, ws)
                .map_err(fail)?;
        }
    }
    Ok(())
}

/// The run's inputs: given values over defaults; unknown or missing ones
/// are refused by name.
fn resolve_inputs(
    def: &WorkflowDef,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    for (k, v) in given {
        if !def.inputs.contains_key(k) {
            let known: Vec<&str> = def.inputs.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown input '{k}'; workflow '{}' takes: {}",
                def.name,
                if known.is_empty() {
                    "no inputs".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        }
        if v.contains('\0') {
            return Err(format!("input '{k}' contains a NUL byte"));
        }
    }
    let mut out = BTreeMap::new();
    for (k, spec) in &def.inputs {
        match given.get(k).or(spec.default.as_ref()) {
            Some(v) => {
                out.insert(k.clone(), v.clone());
            }
            None => return Err(format!("input '{k}' is required (--input {k}=VALUE)")),
        }
    }
    Ok(out)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only runs in this state.
    #[param(value_type = Option<drover_proto::workflows::RunState>)]
    state: Option<String>,
    /// At most this many, newest first [default 50, at most 1000].
    limit: Option<i64>,
}

/// Runs, newest first (without their tasks).
#[utoipa::path(
    get, path = "/api/v1/workflows/runs", tag = "workflows",
    params(ListQuery),
    security(("user" = [])),
    responses((status = 200, body = [Run]))
)]
async fn list_runs(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Run>>, ApiError> {
    let filter = match q.state.as_deref() {
        Some(s) => Some(
            RunState::parse(s).ok_or_else(|| ApiError::invalid(format!("unknown state '{s}'")))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let runs = state.store.list_runs(filter, limit).await?;
    Ok(Json(
        runs.into_iter()
            .map(|r| run_view(r, Vec::new(), None))
            .collect(),
    ))
}

fn run_view(r: RunRecord, tasks: Vec<TaskRun>, def: Option<&WorkflowDef>) -> Run {
    let reason = r.reason.or_else(|| {
        r.cancel_requested_at
            .filter(|_| !r.state.is_final())
            .map(|at| format!("cancelling (asked at {})", at.to_rfc3339()))
    });
    let workspace = r.workspace_state.map(|state| RunWorkspace {
        state,
        agent_id: r.workspace_agent.clone(),
        reason: r.workspace_reason.clone(),
        sandbox: def.and_then(|d| d.workspace.as_ref()).map(|w| {
            w.sandbox
                .clone()
                .unwrap_or_else(|| drover_proto::sandbox::PROCESS.to_owned())
        }),
        create_job: r.workspace_job.clone(),
        remove_job: r.workspace_remove_job.clone(),
    });
    Run {
        id: r.id,
        workflow: r.name,
        definition_hash: r.def_hash,
        state: r.state,
        reason,
        inputs: r.inputs,
        created_by: r.created_by,
        created_at: r.created_at,
        finished_at: r.finished_at,
        deadline_at: r.deadline_at,
        cancel_requested_at: r.cancel_requested_at,
        workspace,
        tasks,
    }
}

pub(crate) async fn definition_of(state: &AppState, hash: &str) -> Result<WorkflowDef, ApiError> {
    let body = state
        .store
        .definition(hash)
        .await?
        .ok_or_else(|| ApiError::internal("reading a definition", &"missing"))?;
    serde_json::from_str(&body).map_err(|e| ApiError::internal("reading a definition", &e))
}

/// A run with every task and what each waits for.
pub async fn load_run(state: &AppState, id: &str) -> Result<Run, ApiError> {
    let run = state
        .store
        .run(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run '{id}' not found")))?;
    let def = definition_of(state, &run.def_hash).await?;
    let records: HashMap<String, _> = state
        .store
        .run_tasks(id)
        .await?
        .into_iter()
        .map(|t| (t.task_id.clone(), t))
        .collect();
    let mut tasks = Vec::with_capacity(def.tasks.len());
    for d in &def.tasks {
        let Some(t) = records.get(&d.id) else {
            continue;
        };
        let reason = if t.state.is_final() {
            t.reason.clone()
        } else if t.state == TaskState::Pending {
            let waiting: Vec<&str> = d
                .needs
                .iter()
                .filter(|n| records.get(*n).is_some_and(|r| !r.state.is_final()))
                .map(String::as_str)
                .collect();
            let workspace = run.workspace_state.filter(|s| *s != WorkspaceState::Ready);
            Some(if let (true, Some(ws)) = (waiting.is_empty(), workspace) {
                match &run.workspace_reason {
                    Some(why) => format!("waiting for the workspace ({}: {why})", ws.as_str()),
                    None => format!("waiting for the workspace ({})", ws.as_str()),
                }
            } else if waiting.is_empty() {
                "about to start".to_owned()
            } else {
                format!("waiting for {}", waiting.join(", "))
            })
        } else if let Some(job_id) = &t.job_id {
            super::jobs::load_job(state, job_id).await?.reason
        } else {
            None
        };
        tasks.push(TaskRun {
            id: d.id.clone(),
            description: d.description.clone(),
            action: d.action.clone(),
            // Until it ends, a task shows its job's live state.
            state: crate::workflow::plan::live_state(t.state, t.job_state),
            reason,
            needs: d.needs.clone(),
            optional: d.optional,
            job_id: t.job_id.clone(),
            outputs: t.outputs.clone(),
            started_at: t.started_at,
            finished_at: t.finished_at,
        });
    }
    Ok(run_view(run, tasks, Some(&def)))
}

/// One run with its tasks: which run, which wait and why.
#[utoipa::path(
    get, path = "/api/v1/workflows/runs/{id}", tag = "workflows",
    params(("id" = String, Path, description = "Run id or a unique prefix")),
    security(("user" = [])),
    responses((status = 200, body = Run), (status = 404, body = ErrorBody))
)]
async fn show_run(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Run>, ApiError> {
    let id = state.store.resolve_run_id(&id).await?;
    Ok(Json(load_run(&state, &id).await?))
}

/// Stop a run: running tasks are cancelled, waiting ones skipped.
#[utoipa::path(
    post, path = "/api/v1/workflows/runs/{id}/cancel", tag = "workflows",
    params(("id" = String, Path, description = "Run id or a unique prefix")),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an operator; a scoped one stops only its own runs"), (status = 200, body = Run), (status = 404, body = ErrorBody), (status = 409, description = "The run has ended", body = ErrorBody))
)]
async fn cancel_run(
    State(state): State<AppState>,
    Operator(user): Operator,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Run>, ApiError> {
    Ok(Json(cancel(&state, &user, &audit, &id, None).await?))
}

/// Cancels run `id` (or a unique prefix) for `user`: the API's route and
/// the dashboard's form both come here, so the role, the scope rule
/// ([`may_stop`]) and the audit apply alike. `reason`, when given, is
/// noted in the audit and the log.
pub(crate) async fn cancel(
    state: &AppState,
    user: &UserAuth,
    audit: &Audit,
    id: &str,
    reason: Option<&str>,
) -> Result<Run, ApiError> {
    user.require(drover_proto::api::Role::Operator)?;
    super::fleet::check_reason(reason)?;
    let id = state.store.resolve_run_id(id).await?;
    audit.target(format!("run:{id}"));
    if let Some(r) = reason {
        audit.note("reason", r);
    }
    check_run_owner(state, user, &id).await?;
    if !state
        .store
        .request_run_cancel(&id, &user.username, Utc::now())
        .await?
    {
        let run = load_run(state, &id).await?;
        if run.state.is_final() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                drover_proto::ErrorCode::Conflict,
                format!("run {id} has ended ({})", run.state.as_str()),
            ));
        }
        return Ok(run);
    }
    tracing::info!(run = %id, by = %user.username, reason = reason.unwrap_or_default(), "run cancel requested");
    load_run(state, &id).await
}

/// Remove the workspace of an ended run that was kept (`keep_workspace`)
/// or whose removal failed: the removal job is queued on its agent.
#[utoipa::path(
    post, path = "/api/v1/workflows/runs/{id}/workspace/remove", tag = "workflows",
    params(("id" = String, Path, description = "Run id or a unique prefix")),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an operator; a scoped one stops only its own runs"), (status = 200, body = Run), (status = 404, body = ErrorBody), (status = 409, description = "No kept workspace to remove", body = ErrorBody))
)]
async fn remove_run_workspace(
    State(state): State<AppState>,
    Operator(user): Operator,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Run>, ApiError> {
    use crate::workflow::workspace::{Step, WorkspaceJob};
    let id = state.store.resolve_run_id(&id).await?;
    check_run_owner(&state, &user, &id).await?;
    let run = state
        .store
        .run(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run '{id}' not found")))?;
    let conflict =
        |m: String| ApiError::new(StatusCode::CONFLICT, drover_proto::ErrorCode::Conflict, m);
    let removable = matches!(
        run.workspace_state,
        Some(WorkspaceState::Kept | WorkspaceState::RemoveFailed)
    );
    if run.state == RunState::Running || !removable {
        return Err(conflict(format!(
            "run {id} has no kept workspace to remove (workspace: {})",
            run.workspace_state.map(|s| s.as_str()).unwrap_or("none")
        )));
    }
    let spec = match &run.workspace_job {
        Some(job) => state.store.job(job).await?.and_then(|j| j.workspace),
        None => None,
    };
    let (Some(spec), Some(agent)) = (spec, &run.workspace_agent) else {
        return Err(conflict(format!("run {id}'s workspace was never created")));
    };
    let job = WorkspaceJob::new(Step::Remove, agent, spec);
    let created = state
        .store
        .remove_workspace(&id, job.new_job(&user.username), Utc::now())
        .await?;
    if created.is_none() {
        return Err(conflict(format!(
            "run {id}'s workspace is already being removed"
        )));
    }
    tracing::info!(run = %id, by = %user.username, agent = %agent, "workspace removal requested");
    Ok(Json(load_run(&state, &id).await?))
}

/// The run's outcome and the outputs of its tasks.
#[utoipa::path(
    get, path = "/api/v1/workflows/runs/{id}/result", tag = "workflows",
    params(("id" = String, Path, description = "Run id or a unique prefix")),
    security(("user" = [])),
    responses((status = 200, body = RunResult), (status = 404, body = ErrorBody))
)]
async fn run_result(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunResult>, ApiError> {
    let id = state.store.resolve_run_id(&id).await?;
    let run = load_run(&state, &id).await?;
    Ok(Json(RunResult {
        id: run.id,
        state: run.state,
        reason: run.reason,
        outputs: run
            .tasks
            .iter()
            .filter(|t| !t.outputs.is_empty())
            .map(|t| (t.id.clone(), t.outputs.clone()))
            .collect(),
        tasks: run.tasks.iter().map(|t| (t.id.clone(), t.state)).collect(),
    }))
}

fn artifact_view(a: ArtifactRecord) -> Artifact {
    Artifact {
        id: a.id,
        run_id: a.run_id,
        task: a.task_id,
        job_id: a.job_id,
        attempt_id: a.attempt_id,
        path: a.path,
        size: a.size.max(0) as u64,
        sha256: a.sha256,
        created_at: drover_store::time_from_ms(a.created_at),
    }
}

/// The files the run's tasks collected.
#[utoipa::path(
    get, path = "/api/v1/workflows/runs/{id}/artifacts", tag = "workflows",
    params(("id" = String, Path, description = "Run id or a unique prefix")),
    security(("user" = [])),
    responses((status = 200, body = [Artifact]), (status = 404, body = ErrorBody))
)]
async fn run_artifacts(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<Artifact>>, ApiError> {
    let id = state.store.resolve_run_id(&id).await?;
    let list = state.store.run_artifacts(&id).await?;
    Ok(Json(list.into_iter().map(artifact_view).collect()))
}

/// The content of one artifact; its sha256 is in `x-drover-sha256`.
#[utoipa::path(
    get, path = "/api/v1/artifacts/{id}", tag = "workflows",
    params(("id" = String, Path, description = "Artifact id")),
    security(("user" = [])),
    responses((status = 200, description = "The file", content_type = "application/octet-stream"), (status = 404, body = ErrorBody))
)]
async fn download_artifact(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    artifact_download(&state, &id).await
}

/// The answer carrying artifact `id`'s content, for the API and the
/// dashboard.
pub(crate) async fn artifact_download(state: &AppState, id: &str) -> Result<Response, ApiError> {
    let a = state
        .store
        .artifact(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("artifact '{id}' not found")))?;
    let stream = state
        .artifacts
        .get(&a.store_key)
        .await
        .map_err(|e| ApiError::internal("reading an artifact", &e))?;
    let name = a
        .path
        .rsplit('/')
        .next()
        .unwrap_or("artifact")
        .replace('"', "");
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, a.size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (header::HeaderName::from_static(SHA256_HEADER), a.sha256),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    /// Resume after this event id (the `Last-Event-ID` header does the same).
    after: Option<i64>,
}

/// Where a stream resumes: after `Last-Event-ID` when the client sent one
/// (a reconnecting `EventSource` does), else after `after`.
pub(crate) fn resume_point(headers: &HeaderMap, after: Option<i64>) -> Result<i64, ApiError> {
    if let Some(v) = headers.get("last-event-id") {
        let s = v
            .to_str()
            .map_err(|_| ApiError::invalid("Last-Event-ID must be a number"))?;
        return s
            .trim()
            .parse()
            .map_err(|_| ApiError::invalid(format!("Last-Event-ID '{s}' is not a number")));
    }
    Ok(after.unwrap_or(0).max(0))
}

/// A run's events from `after` on, ending after the event that ends the
/// run (or when the server stops).
fn event_feed(state: AppState, run_id: String, after: i64) -> impl Stream<Item = RunEvent> {
    let rx = state.hub.subscribe();
    futures_util::stream::unfold(
        (state, run_id, after, rx, false),
        |(state, run_id, mut after, mut rx, done)| async move {
            if done {
                return None;
            }
            loop {
                let events = match state.store.events_after(&run_id, after, EVENT_BATCH).await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(run = %run_id, error = %e, "reading run events failed");
                        return None;
                    }
                };
                if let Some(last) = events.last() {
                    after = last.id;
                    let ended = events.iter().any(RunEvent::ends_run);
                    return Some((events, (state, run_id, after, rx, ended)));
                }
                match state.store.run(&run_id).await {
                    Ok(Some(r)) if !r.state.is_final() => {}
                    // It ended after the read above: its last events
                    // committed with its end, so read them before ending.
                    Ok(Some(_)) => {
                        return match state.store.events_after(&run_id, after, EVENT_BATCH).await {
                            Ok(events) if !events.is_empty() => {
                                let last = events.last().map_or(after, |e| e.id);
                                let ended = events.iter().any(RunEvent::ends_run);
                                Some((events, (state, run_id, last, rx, ended)))
                            }
                            _ => None,
                        };
                    }
                    _ => return None,
                }
                tokio::select! {
                    _ = state.shutdown.cancelled() => return None,
                    _ = rx.recv() => {}
                    _ = tokio::time::sleep(STREAM_POLL) => {}
                }
            }
        },
    )
    .flat_map(futures_util::stream::iter)
}

/// Server-sent events of a run: `id` is the event id, `event` its kind
/// (`run`, `task`, `log`), `data` the JSON `RunEvent`. Reconnecting with
/// `Last-Event-ID` resumes after that event; the stream ends with the run.
#[utoipa::path(
    get, path = "/api/v1/workflows/runs/{id}/events", tag = "workflows",
    params(("id" = String, Path, description = "Run id or a unique prefix"), StreamQuery),
    security(("user" = [])),
    responses((status = 200, description = "text/event-stream of RunEvent", content_type = "text/event-stream"), (status = 404, body = ErrorBody))
)]
async fn run_events(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = state.store.resolve_run_id(&id).await?;
    let after = resume_point(&headers, q.after)?;
    Ok(event_sse(state, id, after))
}

/// Run `run_id`'s events after `after` as server-sent events (`id`,
/// `event` = kind, `data` = the JSON `RunEvent`), ending with the run:
/// the API's stream and the dashboard's.
pub(crate) fn event_sse(
    state: AppState,
    run_id: String,
    after: i64,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = event_feed(state, run_id, after).map(|ev| {
        let data = serde_json::to_string(&ev).unwrap_or_default();
        Ok(Event::default()
            .id(ev.id.to_string())
            .event(ev.kind.clone())
            .data(data))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The same events over a WebSocket: one JSON `RunEvent` per text message;
/// `?after=` resumes. The server closes the socket when the run ends.
#[utoipa::path(
    get, path = "/api/v1/workflows/runs/{id}/ws", tag = "workflows",
    params(("id" = String, Path, description = "Run id or a unique prefix"), StreamQuery),
    security(("user" = [])),
    responses(
        (status = 101, description = "WebSocket of RunEvent messages"),
        (status = 400, body = ErrorBody, description = "Not a WebSocket handshake"),
        (status = 404, body = ErrorBody),
        (status = 426, body = ErrorBody, description = "The connection cannot be upgraded"),
    )
)]
async fn run_ws(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|r| {
        ApiError::new(
            r.status(),
            drover_proto::ErrorCode::InvalidRequest,
            r.body_text(),
        )
    })?;
    let id = state.store.resolve_run_id(&id).await?;
    let after = resume_point(&headers, q.after)?;
    Ok(ws.on_upgrade(move |socket| stream_ws(socket, state, id, after)))
}

async fn stream_ws(mut socket: WebSocket, state: AppState, run_id: String, after: i64) {
    let feed = event_feed(state, run_id, after);
    futures_util::pin_mut!(feed);
    loop {
        tokio::select! {
            ev = feed.next() => match ev {
                Some(ev) => {
                    let text = serde_json::to_string(&ev).unwrap_or_default();
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                None => break,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked_by_name() {
        let parsed = def::parse(
            "name: w\ninputs:\n  env: {}\n  tag: {default: latest}\ndefaults: {target: '*'}\ntasks:\n  - {id: a, action: noop}\n",
            "w.yaml",
        )
        .expect("valid");
        let given = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        let ok = resolve_inputs(&parsed.def, &given(&[("env", "prod")])).expect("valid");
        assert_eq!(ok["tag"], "latest");
        let missing = resolve_inputs(&parsed.def, &given(&[])).expect_err("env required");
        assert!(missing.contains("input 'env' is required"), "{missing}");
        let unknown = resolve_inputs(&parsed.def, &given(&[("env", "x"), ("colour", "red")]))
            .expect_err("unknown");
        assert!(unknown.contains("unknown input 'colour'"), "{unknown}");
    }
}
