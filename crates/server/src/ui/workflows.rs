//! Workflow runs: a paginated list (filtered by state and workflow), one
//! run with its task graph (`workflow::graph`, drawn on the server) and a
//! table of its tasks, one task with its output, outputs and artifacts.
//! The run page follows the run live over its own event stream
//! (`/ui/workflows/runs/{id}/events`, the API's `event_sse` behind the
//! session cookie); without JavaScript a reload shows the current state.
//! Cancel goes through the API's `routes::workflows::cancel`, so the
//! role, the scope rule and the audit apply alike.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use drover_proto::workflows::{Run, RunState, TaskRun, TaskState};
use drover_store::workflows::RunFilter;
use maud::{html, Markup};
use serde::Deserialize;

use super::error::UiError;
use super::layout::{page as layout, Section};
use super::session::{Form, UiUser};
use super::widgets::{badge_look, job_link, pagination, state_badge, PageQuery, Paging};
use crate::routes::audit::Audit;
use crate::routes::workflows as api;
use crate::state::AppState;
use crate::workflow::graph;

/// Most output rows (chunks) a task page shows.
const OUTPUT_ROWS: i64 = 5000;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    page: Option<usize>,
    limit: Option<usize>,
    /// Only runs in this state.
    state: Option<String>,
    /// Only runs of this workflow (its name, exactly).
    workflow: Option<String>,
}

fn time(t: Option<DateTime<Utc>>) -> Markup {
    html! {
        @match t {
            Some(t) => time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) },
            None => "—",
        }
    }
}

/// One path segment, percent-encoded.
fn seg(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

fn run_href(id: &str) -> String {
    format!("/ui/workflows/runs/{}", seg(id))
}

fn task_href(run: &str, task: &str) -> String {
    format!("/ui/workflows/runs/{}/tasks/{}", seg(run), seg(task))
}

/// `GET /ui/workflows?state=&workflow=&page=&limit=`.
pub async fn list(
    State(state): State<AppState>,
    user: UiUser,
    Query(q): Query<ListQuery>,
) -> Result<Markup, UiError> {
    let run_state = q.state.as_deref().and_then(RunState::parse);
    let workflow = q
        .workflow
        .as_deref()
        .map(str::trim)
        .filter(|w| !w.is_empty());
    let filter = RunFilter {
        state: run_state,
        name: workflow,
    };
    let pq = PageQuery {
        page: q.page,
        limit: q.limit,
    };
    // The page asked for; asked past the end, the last one.
    let want = Paging::new(&pq, usize::MAX / 2);
    let offset = |p: &Paging| i64::try_from(p.range().start).unwrap_or(i64::MAX);
    let limit = i64::try_from(want.limit).unwrap_or(50);
    let (mut runs, total) = state.store.page_runs(&filter, offset(&want), limit).await?;
    let paging = Paging::new(&pq, usize::try_from(total).unwrap_or(0));
    if paging.page != want.page {
        runs = state
            .store
            .page_runs(&filter, offset(&paging), limit)
            .await?
            .0;
    }
    let mut keep = Vec::new();
    if let Some(s) = run_state {
        keep.push(("state", s.as_str()));
    }
    if let Some(w) = workflow {
        keep.push(("workflow", w));
    }
    let content = html! {
        form.filter method="get" action="/ui/workflows" role="search" {
            label for="state" { "State" }
            select #state name="state" {
                option value="" { "any" }
                @for s in RunState::ALL {
                    option value=(s.as_str()) selected[run_state == Some(s)] { (s.as_str().replace('_', " ")) }
                }
            }
            label for="workflow" { "Workflow" }
            input #workflow name="workflow" type="text" value=(workflow.unwrap_or_default());
            button type="submit" { "Filter" }
        }
        table #runs {
            caption.visually-hidden { "Workflow runs, newest first" }
            thead { tr {
                th scope="col" { "Run" } th scope="col" { "Workflow" } th scope="col" { "State" }
                th scope="col" { "Tasks done" } th scope="col" { "Started by" }
                th scope="col" { "Started" } th scope="col" { "Ended" }
            } }
            tbody {
                @for r in &runs {
                    tr data-run=(r.run.id) {
                        th scope="row" { a href=(run_href(&r.run.id)) { code { (r.run.id) } } }
                        td { (r.run.name) }
                        td { (state_badge(r.run.state.as_str())) }
                        td { (r.tasks_done) " / " (r.tasks_total) }
                        td { (r.run.created_by) }
                        td { (time(Some(r.run.created_at))) }
                        td { (time(r.run.finished_at)) }
                    }
                }
            }
        }
        (pagination("/ui/workflows", paging, &keep))
    };
    Ok(layout(&user, Section::Workflows, "Workflow runs", content))
}

/// JSON of each state's badge icon and tone, for the script that redraws
/// badges live.
fn badges_json() -> String {
    let mut m: BTreeMap<&str, [&str; 2]> = BTreeMap::new();
    for s in TaskState::ALL {
        let (icon, tone) = badge_look(s.as_str());
        m.insert(s.as_str(), [icon, tone]);
    }
    for s in RunState::ALL {
        let (icon, tone) = badge_look(s.as_str());
        m.insert(s.as_str(), [icon, tone]);
    }
    serde_json::to_string(&m).unwrap_or_default()
}

async fn load(state: &AppState, id: &str) -> Result<Run, UiError> {
    let id = state.store.resolve_run_id(id).await?;
    Ok(api::load_run(state, &id).await?)
}

fn tasks_table(state_attempts: &[(TaskRun, usize)], run: &Run) -> Markup {
    html! {
        table #tasks data-badges=(badges_json()) {
            caption { "Tasks" }
            thead { tr {
                th scope="col" { "Task" } th scope="col" { "State" } th scope="col" { "Job" }
                th scope="col" { "Attempts" } th scope="col" { "Started" } th scope="col" { "Ended" }
                th scope="col" { "Why" }
            } }
            tbody {
                @for (t, attempts) in state_attempts {
                    tr data-task=(t.id) {
                        th scope="row" { a href=(task_href(&run.id, &t.id)) { (t.id) } }
                        td.state { (state_badge(t.state.as_str())) }
                        td.job { @match &t.job_id { Some(j) => (job_link(j)), None => "—" } }
                        td { (attempts) }
                        td.started { (time(t.started_at)) }
                        td.ended { (time(t.finished_at)) }
                        td.why { (t.reason.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

/// `GET /ui/workflows/runs/{id}` (an id or a unique prefix).
pub async fn detail(
    State(state): State<AppState>,
    user: UiUser,
    Path(id): Path<String>,
) -> Result<Markup, UiError> {
    let id = state.store.resolve_run_id(&id).await?;
    // The event number first: whatever changes after it reaches the page
    // over the stream, so nothing is missed between render and stream.
    let seq = state.store.run_event_seq(&id).await?.unwrap_or(0);
    let run = api::load_run(&state, &id).await?;
    let description = match state.store.run(&id).await? {
        Some(r) => api::definition_of(&state, &r.def_hash).await?.description,
        None => String::new(),
    };
    let mut rows = Vec::with_capacity(run.tasks.len());
    for t in &run.tasks {
        let attempts = match &t.job_id {
            Some(j) => state.store.attempts(j).await?.len(),
            None => 0,
        };
        rows.push((t.clone(), attempts));
    }
    let nodes = run
        .tasks
        .iter()
        .map(|t| graph::TaskNode {
            id: t.id.clone(),
            needs: t.needs.clone(),
            state: t.state,
            description: t.description.clone(),
        })
        .collect();
    let run_id = run.id.clone();
    let link = move |task: &str| task_href(&run_id, task);
    let drawn = graph::layout(nodes).map(|l| {
        graph::render(
            &l,
            &graph::RenderOptions {
                name: &run.workflow,
                description: &description,
                link: Some(&link),
                embed_style: false,
            },
        )
    });
    let ended = run.state.is_final();
    let may_cancel = !ended && api::may_stop(&user.auth, &run.created_by);
    let outputs: Vec<(&str, &str, &str)> = run
        .tasks
        .iter()
        .flat_map(|t| {
            t.outputs
                .iter()
                .map(move |(k, v)| (t.id.as_str(), k.as_str(), v.as_str()))
        })
        .collect();
    let events = format!("{}/events?after={seq}", run_href(&run.id));
    let title = format!("Run of {}", run.workflow);
    let content = html! {
        dl.facts #run {
            dt { "Id" } dd { code { (run.id) } }
            dt { "Workflow" } dd { a href={ "/ui/workflows?workflow=" (seg(&run.workflow)) } { (run.workflow) } }
            dt { "State" } dd #run-state { (state_badge(run.state.as_str())) }
            @if let Some(r) = &run.reason { dt { "Why" } dd #run-reason { (r) } }
            dt { "Started by" } dd { (run.created_by) }
            dt { "Started" } dd { (time(Some(run.created_at))) }
            dt { "Ended" } dd #run-ended { (time(run.finished_at)) }
            @if run.deadline_at.is_some() { dt { "Deadline" } dd { (time(run.deadline_at)) } }
            @if let Some(at) = run.cancel_requested_at { dt { "Cancel asked" } dd { (time(Some(at))) } }
        }
        section aria-labelledby="graph-h" {
            h2 #graph-h { "Task graph" }
            @match &drawn {
                Ok(svg) => {
                    @if ended {
                        div.graph #graph { (svg) }
                    } @else {
                        div.graph #graph data-live-run=(run.id) data-events=(events) { (svg) }
                    }
                }
                Err(e) => p.error role="alert" { "The task graph cannot be drawn: " (e.to_string()) },
            }
            (tasks_table(&rows, &run))
        }
        @if may_cancel {
            section aria-labelledby="cancel-h" #cancel {
                h2 #cancel-h { "Cancel" }
                form method="post" action={ (run_href(&run.id)) "/cancel" } {
                    (super::csrf::field(&user))
                    label for="cancel-reason" { "Reason" }
                    input #cancel-reason name="reason" type="text" maxlength="500";
                    button.cancel-run type="submit" { "Cancel run" }
                }
                p.hint { "Running tasks are cancelled; waiting ones are skipped." }
            }
        }
        section aria-labelledby="inputs-h" {
            h2 #inputs-h { "Inputs" }
            @if run.inputs.is_empty() { p { "None." } } @else {
                table.kv #inputs {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Value" } } }
                    tbody { @for (k, v) in &run.inputs { tr { th scope="row" { (k) } td { code { (v) } } } } }
                }
            }
        }
        section aria-labelledby="outputs-h" {
            h2 #outputs-h { "Outputs" }
            @if outputs.is_empty() { p { "None yet." } } @else {
                table.kv #outputs {
                    thead { tr { th scope="col" { "Task" } th scope="col" { "Name" } th scope="col" { "Value" } } }
                    tbody { @for (t, k, v) in &outputs { tr { td { (t) } th scope="row" { (k) } td { code { (v) } } } } }
                }
            }
        }
    };
    Ok(layout(&user, Section::Workflows, &title, content))
}

/// `POST /ui/workflows/runs/{id}/cancel`.
pub async fn cancel(
    State(state): State<AppState>,
    audit: Audit,
    user: UiUser,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    let run = api::cancel(&state, &user.auth, &audit, &id, form.text("reason")).await?;
    Ok(Redirect::to(&run_href(&run.id)).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Resume after this event number (`Last-Event-ID` wins).
    after: Option<i64>,
}

/// `GET /ui/workflows/runs/{id}/events`: the run's events as SSE, the
/// API's stream behind the session cookie.
pub async fn events(
    State(state): State<AppState>,
    _user: UiUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, UiError> {
    let id = state.store.resolve_run_id(&id).await?;
    let after = api::resume_point(&headers, q.after)?;
    Ok(api::event_sse(state, id, after).into_response())
}

/// `GET /ui/workflows/runs/{id}/tasks/{task}`.
pub async fn task(
    State(state): State<AppState>,
    user: UiUser,
    Path((id, task)): Path<(String, String)>,
) -> Result<Markup, UiError> {
    let run = load(&state, &id).await?;
    let Some(t) = run.tasks.iter().find(|t| t.id == task) else {
        return Err(UiError::not_found(format!(
            "run {} has no task '{task}'",
            run.id
        )));
    };
    let (attempts, logs) = match &t.job_id {
        Some(j) => (
            state.store.attempts(j).await?,
            state.store.logs_after(j, 0, OUTPUT_ROWS).await?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let artifacts: Vec<_> = state
        .store
        .run_artifacts(&run.id)
        .await?
        .into_iter()
        .filter(|a| a.task_id.as_deref() == Some(t.id.as_str()))
        .collect();
    let title = format!("Task {}", t.id);
    let content = html! {
        p { "Of run " a href=(run_href(&run.id)) { code { (run.id) } } " (" (run.workflow) ")" }
        dl.facts #task {
            dt { "State" } dd #task-state { (state_badge(t.state.as_str())) }
            @if let Some(r) = &t.reason { dt { "Why" } dd { (r) } }
            @if !t.description.is_empty() { dt { "Description" } dd { (t.description) } }
            dt { "Action" } dd { code { (t.action) } }
            dt { "Needs" } dd {
                @if t.needs.is_empty() { "nothing" }
                @for (i, n) in t.needs.iter().enumerate() {
                    @if i > 0 { ", " }
                    a href=(task_href(&run.id, n)) { (n) }
                }
            }
            dt { "Job" } dd #task-job { @match &t.job_id { Some(j) => (job_link(j)), None => "not started" } }
            dt { "Started" } dd { (time(t.started_at)) }
            dt { "Ended" } dd { (time(t.finished_at)) }
        }
        @if !attempts.is_empty() {
            section aria-labelledby="attempts-h" {
                h2 #attempts-h { "Attempts" }
                table #attempts {
                    thead { tr {
                        th scope="col" { "#" } th scope="col" { "Agent" } th scope="col" { "State" }
                        th scope="col" { "Exit" } th scope="col" { "Started" } th scope="col" { "Ended" }
                    } }
                    tbody { @for a in &attempts { tr {
                        th scope="row" { (a.number) }
                        td { a href={ "/ui/agents/" (seg(&a.agent_id)) } { code { (a.agent_id) } } }
                        td { (state_badge(a.state.as_str())) }
                        td { @match (a.exit_code, a.signal) {
                            (Some(c), _) => (c),
                            (None, Some(s)) => { "signal " (s) },
                            _ => "—",
                        } }
                        td { (time(a.started_at)) }
                        td { (time(a.finished_at)) }
                    } } }
                }
            }
        }
        section aria-labelledby="output-h" {
            h2 #output-h { "Output" }
            @if logs.is_empty() { p { "No output." } } @else {
                pre #output tabindex="0" {
                    @for l in &logs {
                        @if l.stream == "stderr" { span.stderr { (l.data) } } @else { (l.data) }
                    }
                }
                @if i64::try_from(logs.len()).unwrap_or(0) >= OUTPUT_ROWS {
                    p.hint { "Only the beginning is shown." }
                }
            }
        }
        section aria-labelledby="values-h" {
            h2 #values-h { "Outputs" }
            @if t.outputs.is_empty() { p { "None." } } @else {
                table.kv #values {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Value" } } }
                    tbody { @for (k, v) in &t.outputs { tr { th scope="row" { (k) } td { code { (v) } } } } }
                }
            }
        }
        section aria-labelledby="artifacts-h" {
            h2 #artifacts-h { "Artifacts" }
            @if artifacts.is_empty() { p { "None." } } @else {
                table #artifacts {
                    thead { tr { th scope="col" { "Path" } th scope="col" { "Size" } th scope="col" { "SHA-256" } } }
                    tbody { @for a in &artifacts { tr {
                        th scope="row" { a href={ "/ui/artifacts/" (seg(&a.id)) } download { (a.path) } }
                        td { (a.size.max(0)) " bytes" }
                        td { code { (a.sha256) } }
                    } } }
                }
            }
        }
    };
    Ok(layout(&user, Section::Workflows, &title, content))
}

/// `GET /ui/artifacts/{id}`: an artifact's content for a logged-in user,
/// through the API's download code.
pub async fn artifact(
    State(state): State<AppState>,
    _user: UiUser,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    Ok(api::artifact_download(&state, &id).await?)
}
