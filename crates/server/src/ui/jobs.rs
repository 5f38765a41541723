//! The jobs: a list paginated in SQL (filters: state, action, who, id
//! prefix), one job with its attempts, output and a cancel form, its live
//! output and states as server-sent events, and the form that starts one.
//!
//! Starting and cancelling go through the same functions as the API
//! (`routes::jobs::{submit, cancel}`), so roles, scopes, approvals and the
//! audit apply alike; the live page follows the job with the API's
//! follower (`routes::jobs::follow_logs`). Parameters are values of the
//! action's typed parameters, checked by the server and passed to the
//! program as single arguments, never through a shell.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use drover_proto::api::Role;
use drover_proto::jobs::{ActionSpec, Job, JobState, ParamSpec, SubmitJobRequest};
use drover_store::jobs::JobFilter;
use maud::{html, Markup};
use serde::Deserialize;

use super::error::UiError;
use super::layout::{page as layout, Section};
use super::session::{Form, UiUser};
use super::widgets::{badge_look, job_link, pagination, state_badge, PageQuery, Paging};
use crate::routes::audit::Audit;
use crate::routes::jobs::{cancel as cancel_job, follow_logs, load_job, submit as submit_job};
use crate::state::AppState;

/// Most output chunks a job's page shows when it loads; the live stream
/// (or `drover jobs logs`) has the rest.
const SHOWN_CHUNKS: i64 = 5000;
/// Output chunks read per step of the live stream.
const STREAM_CHUNKS: i64 = 500;
/// Longest the live stream waits for news before it looks again.
const STREAM_WAIT: Duration = Duration::from_secs(20);

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "—".to_owned())
}

/// Whether `user` may start jobs at all (an operator; the scope is
/// checked per action and target).
pub fn may_start(user: &UiUser) -> bool {
    user.auth.role.at_least(Role::Operator)
}

// ---------------------------------------------------------------- list

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    page: Option<usize>,
    limit: Option<usize>,
    state: Option<String>,
    action: Option<String>,
    by: Option<String>,
    /// The start of a job id.
    id: Option<String>,
}

fn nonblank(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// `GET /ui/jobs?state=&action=&by=&id=&page=&limit=`.
pub async fn list(
    State(state): State<AppState>,
    user: UiUser,
    Query(q): Query<ListQuery>,
) -> Result<Response, UiError> {
    let mut problem = None;
    let job_state = match nonblank(&q.state) {
        None => None,
        Some(s) => match JobState::parse(s) {
            Some(js) => Some(js),
            None => {
                problem = Some(format!("state: unknown job state '{s}'"));
                None
            }
        },
    };
    let id_prefix = nonblank(&q.id);
    if let Some(p) = id_prefix {
        if !p.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            problem = Some(format!(
                "id: '{p}' is not the start of a job id (hex digits and '-')"
            ));
        }
    }
    let filter = JobFilter {
        state: job_state,
        action: nonblank(&q.action).map(str::to_owned),
        created_by: nonblank(&q.by).map(str::to_owned),
        id_prefix: id_prefix.map(str::to_owned),
    };
    let asked = PageQuery {
        page: q.page,
        limit: q.limit,
    };
    let (jobs, paging) = if problem.is_some() {
        (Vec::new(), Paging::new(&asked, 0))
    } else {
        // The page asked for; past the end, the last page there is.
        let first = Paging::new(&asked, usize::MAX / 2);
        let offset = ((first.page - 1) * first.limit) as i64;
        let (jobs, total) = state
            .store
            .page_jobs(&filter, offset, first.limit as i64)
            .await?;
        let paging = Paging::new(&asked, total.max(0) as usize);
        if paging.page == first.page {
            (jobs, paging)
        } else {
            let offset = ((paging.page - 1) * paging.limit) as i64;
            let (jobs, total) = state
                .store
                .page_jobs(&filter, offset, paging.limit as i64)
                .await?;
            (jobs, Paging::new(&asked, total.max(0) as usize))
        }
    };
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let counts = state.store.attempt_counts(&ids).await?;
    let state_name = job_state.map(JobState::as_str);
    let mut keep: Vec<(&str, &str)> = Vec::new();
    for (k, v) in [
        ("state", state_name),
        ("action", filter.action.as_deref()),
        ("by", filter.created_by.as_deref()),
        ("id", id_prefix),
    ] {
        if let Some(v) = v {
            keep.push((k, v));
        }
    }
    let content = html! {
        @if may_start(&user) {
            p.actions { a.button #start href="/ui/jobs/new" { "Start a job" } }
        }
        form.filter method="get" action="/ui/jobs" role="search" {
            label for="f-state" { "State" }
            select #f-state name="state" {
                option value="" { "any" }
                @for s in JobState::ALL {
                    option value=(s.as_str()) selected[job_state == Some(s)] { (s.as_str().replace('_', " ")) }
                }
            }
            label for="f-action" { "Action" }
            input #f-action name="action" type="text" value=(filter.action.as_deref().unwrap_or_default());
            label for="f-by" { "Created by" }
            input #f-by name="by" type="text" value=(filter.created_by.as_deref().unwrap_or_default());
            label for="f-id" { "Id starts with" }
            input #f-id name="id" type="text" value=(id_prefix.unwrap_or_default());
            button type="submit" { "Filter" }
        }
        @if let Some(p) = &problem {
            p.error role="alert" { (p) }
        }
        table #jobs {
            caption.visually-hidden { "Jobs, newest first" }
            thead { tr {
                th scope="col" { "Id" } th scope="col" { "Action" } th scope="col" { "Target" }
                th scope="col" { "State" } th scope="col" { "Agents / attempts" }
                th scope="col" { "Created by" } th scope="col" { "Created" } th scope="col" { "Ended" }
            } }
            tbody {
                @for j in &jobs {
                    @let c = counts.get(&j.id).copied().unwrap_or_default();
                    tr data-job=(j.id) {
                        th scope="row" { (job_link(&j.id)) }
                        td { (j.action) }
                        td { code { (j.target) } }
                        td { (state_badge(j.state.as_str())) }
                        td { (c.agents) " / " (c.attempts) " (" (c.succeeded) " succeeded)" }
                        td { (j.created_by) }
                        td { (time(Some(j.created_at))) }
                        td { (time(j.finished_at)) }
                    }
                }
            }
        }
        (pagination("/ui/jobs", paging, &keep))
    };
    let status = if problem.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    Ok((status, layout(&user, Section::Jobs, "Jobs", content)).into_response())
}

// -------------------------------------------------------------- detail

/// The full id of `id_or_prefix`, or the 404 page.
async fn resolve(state: &AppState, id_or_prefix: &str) -> Result<String, UiError> {
    Ok(state.store.resolve_job_id(id_or_prefix).await?)
}

/// Host names of the agents of a job's attempts (the id when the agent
/// is gone), with their records when they exist.
async fn agent_names(
    state: &AppState,
    job: &Job,
) -> Result<HashMap<String, Option<drover_store::AgentRecord>>, UiError> {
    let mut out = HashMap::new();
    for a in &job.attempts {
        if !out.contains_key(&a.agent_id) {
            let rec = state.store.agent(&a.agent_id).await?;
            out.insert(a.agent_id.clone(), rec);
        }
    }
    Ok(out)
}

fn hostname<'a>(
    names: &'a HashMap<String, Option<drover_store::AgentRecord>>,
    agent_id: &'a str,
) -> &'a str {
    names
        .get(agent_id)
        .and_then(|r| r.as_ref())
        .map(|r| r.hostname.as_str())
        .unwrap_or(agent_id)
}

/// Whether `user` may cancel `job`: an operator whose scope holds its
/// action and every agent it runs on (the rule `routes::jobs::cancel`
/// applies).
fn may_cancel(
    user: &UiUser,
    job: &Job,
    agents: &HashMap<String, Option<drover_store::AgentRecord>>,
) -> bool {
    let limits = &user.auth.limits;
    user.auth.role.at_least(Role::Operator)
        && (limits.is_everywhere()
            || (limits.allows_action(&job.action)
                && agents
                    .values()
                    .all(|a| a.as_ref().is_some_and(|a| limits.allows_agent(a)))))
}

/// A chunk of output as the page shows it: with several agents, each line
/// begins with the agent's host name.
pub fn prefixed(prefix: Option<&str>, data: &str) -> String {
    match prefix {
        None => data.to_owned(),
        Some(p) => {
            let mut out = String::with_capacity(data.len() + 16);
            for line in data.split_inclusive('\n') {
                out.push('[');
                out.push_str(p);
                out.push_str("] ");
                out.push_str(line);
            }
            out
        }
    }
}

/// `GET /ui/jobs/{id}` (an id or a unique prefix).
pub async fn detail(
    State(state): State<AppState>,
    user: UiUser,
    Path(id): Path<String>,
) -> Result<Markup, UiError> {
    let id = resolve(&state, &id).await?;
    let job = load_job(&state, &id).await?;
    let names = agent_names(&state, &job).await?;
    let several = names.len() > 1;
    let agent_of: HashMap<&str, &str> = job
        .attempts
        .iter()
        .map(|a| (a.id.as_str(), a.agent_id.as_str()))
        .collect();
    let records = state.store.logs_after(&id, 0, SHOWN_CHUNKS).await?;
    let cursor = records.last().map(|r| r.id).unwrap_or(0);
    let mut output = String::new();
    for r in &records {
        let prefix = several.then(|| {
            hostname(
                &names,
                agent_of.get(r.attempt_id.as_str()).copied().unwrap_or(""),
            )
        });
        output.push_str(&prefixed(prefix, &r.data));
    }
    let approval = state.store.approval_of(&id).await?;
    let ended = job.state.is_final();
    let cancel = !ended && may_cancel(&user, &job, &names);
    let title = format!("Job {}", &job.id[..job.id.len().min(13)]);
    let content = html! {
        dl.facts #job {
            dt { "Id" } dd { code { (job.id) } }
            dt { "Action" } dd { (job.action) }
            dt { "Target" } dd { code { (job.target) } }
            dt { "Parameters" } dd {
                @if job.params.is_empty() { "none" } @else {
                    ul.params {
                        @for (k, v) in &job.params {
                            li { code { (k) "=" (match v { serde_json::Value::String(s) => s.clone(), other => other.to_string() }) } }
                        }
                    }
                }
            }
            dt { "Sandbox" } dd { (job.sandbox) }
            dt { "Timeout" } dd { (job.timeout_secs) " s" }
            dt { "Retries" } dd { (job.max_retries) }
            dt { "State" } dd #job-state { (state_badge(job.state.as_str())) }
            dt { "Why" } dd #job-reason { (job.reason.as_deref().unwrap_or("—")) }
            dt { "Created by" } dd { (job.created_by) }
            dt { "Created" } dd { (time(Some(job.created_at))) }
            dt { "Ended" } dd #job-ended { (time(job.finished_at)) }
        }
        @if let Some(a) = &approval {
            section aria-labelledby="approval-h" #approval {
                h2 #approval-h { "Approval" }
                dl.facts {
                    dt { "State" } dd { (state_badge(a.state.as_str())) }
                    dt { "Approvals" } dd { (a.approved_by.len()) " of " (a.approvers_needed) @if !a.approved_by.is_empty() { " (" (a.approved_by.join(", ")) ")" } }
                    dt { "Why" } dd { (a.reasons.join("; ")) }
                    dt { "Requested by" } dd { (a.requested_by) " at " (time(Some(a.requested_at))) }
                    dt { "Expires" } dd { (time(Some(a.expires_at))) }
                }
            }
        }
        @if cancel {
            section aria-labelledby="cancel-h" #cancel {
                h2 #cancel-h { "Cancel" }
                form method="post" action={ "/ui/jobs/" (job.id) "/cancel" } {
                    (super::csrf::field(&user))
                    label for="cancel-reason" { "Reason" }
                    input #cancel-reason name="reason" type="text" maxlength="500";
                    button.danger-job type="submit" name="do" value="cancel" { "Cancel the job" }
                }
            }
        }
        section aria-labelledby="attempts-h" {
            h2 #attempts-h { "Attempts" }
            table #attempts {
                thead { tr {
                    th scope="col" { "Agent" } th scope="col" { "Number" } th scope="col" { "State" }
                    th scope="col" { "Exit code" } th scope="col" { "Started" } th scope="col" { "Ended" }
                    th scope="col" { "Error or reason" }
                } }
                tbody {
                    @for a in &job.attempts {
                        tr data-attempt=(a.id) {
                            th scope="row" { a href={ "/ui/agents/" (a.agent_id) } { (hostname(&names, &a.agent_id)) } }
                            td { (a.number) }
                            td.attempt-state { (state_badge(a.state.as_str())) }
                            td.exit-code {
                                @match (a.exit_code, a.signal) {
                                    (Some(c), _) => { (c) }
                                    (None, Some(s)) => { "signal " (s) }
                                    _ => { "—" }
                                }
                            }
                            td.attempt-started { (time(a.started_at)) }
                            td.attempt-ended { (time(a.finished_at)) }
                            td.attempt-reason { (a.error.as_deref().or(a.reason.as_deref()).unwrap_or("—")) }
                        }
                    }
                }
            }
        }
        section aria-labelledby="output-h" #output {
            h2 #output-h { "Output" }
            @if ended {
                pre #log tabindex="0" { (output) }
            } @else {
                p.live #live-note aria-live="polite" { "Output appears here as it is written (reload to see more without JavaScript)." }
                pre #log tabindex="0" data-live-job=(job.id) data-after=(cursor) { (output) }
            }
            @if records.len() as i64 >= SHOWN_CHUNKS {
                p { "Only the first " (SHOWN_CHUNKS) " pieces of output are shown; " code { "drover jobs logs " (job.id) } " prints all of it." }
            }
        }
    };
    Ok(layout(&user, Section::Jobs, &title, content))
}

/// `POST /ui/jobs/{id}/cancel`.
pub async fn cancel(
    State(state): State<AppState>,
    audit: Audit,
    user: UiUser,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    let job = cancel_job(&state, &user.auth, &audit, &id, form.text("reason")).await?;
    Ok(Redirect::to(&format!("/ui/jobs/{}", job.id)).into_response())
}

// ---------------------------------------------------------- live events

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Output after this cursor (the page's last); `Last-Event-ID` wins.
    after: Option<i64>,
}

/// What the live stream has said so far about one job.
struct Follower {
    state: AppState,
    id: String,
    after: i64,
    /// The last `state` event's content, to send only changes.
    last: Option<String>,
    names: HashMap<String, String>,
    done: bool,
}

impl Follower {
    async fn hostname(&mut self, agent_id: &str) -> String {
        if let Some(n) = self.names.get(agent_id) {
            return n.clone();
        }
        let name = match self.state.store.agent(agent_id).await {
            Ok(Some(a)) => a.hostname,
            _ => agent_id.to_owned(),
        };
        self.names.insert(agent_id.to_owned(), name.clone());
        name
    }

    /// The next events: new output, then the states if they changed, then
    /// `end` once the job ended and all its output was sent.
    async fn step(&mut self) -> Vec<Event> {
        let page = match follow_logs(
            &self.state,
            &self.id,
            self.after,
            STREAM_CHUNKS,
            STREAM_WAIT,
            true,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(job = %self.id, error = %e.message, "live job page: reading output");
                self.done = true;
                return Vec::new();
            }
        };
        let job = match load_job(&self.state, &self.id).await {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(job = %self.id, error = %e.message, "live job page: reading the job");
                self.done = true;
                return Vec::new();
            }
        };
        let mut agents: Vec<&str> = job.attempts.iter().map(|a| a.agent_id.as_str()).collect();
        agents.sort_unstable();
        agents.dedup();
        let several = agents.len() > 1;
        let mut out = Vec::new();
        for c in &page.chunks {
            let agent_id = job
                .attempts
                .iter()
                .find(|a| a.id == c.attempt_id)
                .map(|a| a.agent_id.clone())
                .unwrap_or_default();
            let host = self.hostname(&agent_id).await;
            let text = prefixed(several.then_some(host.as_str()), &c.data);
            let data = serde_json::json!({
                "cursor": c.cursor,
                "attempt": c.attempt_id,
                "agent": agent_id,
                "hostname": host,
                "stream": c.stream,
                "data": c.data,
                "text": text,
            });
            out.push(
                Event::default()
                    .event("log")
                    .id(c.cursor.to_string())
                    .data(data.to_string()),
            );
            self.after = c.cursor;
        }
        let badge = |s: JobState| {
            let (icon, tone) = badge_look(s.as_str());
            serde_json::json!({
                "state": s.as_str(),
                "icon": icon,
                "tone": tone,
                "label": s.as_str().replace('_', " "),
            })
        };
        let states = serde_json::json!({
            "job": badge(job.state),
            "ended": job.state.is_final(),
            "reason": job.reason,
            "finished_at": job.finished_at.map(|t| time(Some(t))),
            "attempts": job.attempts.iter().map(|a| serde_json::json!({
                "id": a.id,
                "badge": badge(a.state),
                "exit_code": a.exit_code,
                "started_at": a.started_at.map(|t| time(Some(t))),
                "finished_at": a.finished_at.map(|t| time(Some(t))),
                "reason": a.error.as_deref().or(a.reason.as_deref()),
            })).collect::<Vec<_>>(),
        })
        .to_string();
        if self.last.as_deref() != Some(states.as_str()) {
            out.push(Event::default().event("state").data(states.clone()));
            self.last = Some(states);
        }
        if page.complete {
            out.push(Event::default().event("end").data("{}"));
            self.done = true;
        } else if self.state.shutdown.is_cancelled() {
            self.done = true;
        }
        out
    }
}

/// `GET /ui/jobs/{id}/events`: the job's new output (`log`, JSON with the
/// attempt, agent, stream, data and cursor, which is also the event id:
/// a reconnect resumes after `Last-Event-ID`), its and its attempts'
/// states when they change (`state`), and `end` when it has ended and all
/// was sent.
pub async fn events(
    State(state): State<AppState>,
    _user: UiUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, UiError> {
    let id = resolve(&state, &id).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(q.after)
        .unwrap_or(0)
        .max(0);
    let follower = Follower {
        state,
        id,
        after,
        last: None,
        names: HashMap::new(),
        done: false,
    };
    use futures_util::StreamExt;
    let feed = futures_util::stream::unfold(follower, |mut f| async move {
        if f.done {
            return None;
        }
        let events = f.step().await;
        Some((events, f))
    })
    .flat_map(futures_util::stream::iter)
    .map(Ok::<Event, Infallible>);
    Ok(Sse::new(feed)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

// ------------------------------------------------------------ start form

#[derive(Debug, Default, Deserialize)]
pub struct NewQuery {
    action: Option<String>,
}

/// What the form holds: the user's values, and what was wrong with them.
#[derive(Debug, Default)]
struct Filled {
    params: BTreeMap<String, String>,
    target: String,
    timeout: String,
    retries: String,
    sandbox: String,
    /// The server's message, and the field it is about (`param.NAME`,
    /// `target`, `timeout`, `retries`, `sandbox`) when it names one.
    error: Option<(String, Option<String>)>,
}

impl Filled {
    fn error_for(&self, field: &str) -> Option<&str> {
        match &self.error {
            Some((m, Some(f))) if f == field => Some(m.as_str()),
            _ => None,
        }
    }
}

/// Actions `user` may run: the built-in `noop` and the catalog's, those
/// the scope allows.
async fn actions_for(state: &AppState, user: &UiUser) -> Result<Vec<ActionSpec>, UiError> {
    let mut out = vec![crate::catalog::noop_spec()];
    for rec in state.store.list_actions().await? {
        match serde_json::from_str::<ActionSpec>(&rec.spec) {
            Ok(spec) => out.push(spec),
            Err(e) => tracing::error!(action = %rec.name, error = %e, "reading an action"),
        }
    }
    out.retain(|a| user.auth.limits.allows_action(&a.name));
    Ok(out)
}

async fn sandbox_names(state: &AppState) -> Result<Vec<String>, UiError> {
    let mut out = vec![drover_proto::sandbox::Sandbox::default_process()
        .name()
        .to_owned()];
    for rec in state.store.list_sandboxes().await? {
        if !out.contains(&rec.name) {
            out.push(rec.name);
        }
    }
    Ok(out)
}

/// The help line of a parameter: its type and limits.
fn param_help(ps: &ParamSpec) -> String {
    let mut parts = Vec::new();
    match ps {
        ParamSpec::String {
            max_length,
            pattern,
            default,
            allow_leading_dash,
        } => {
            parts.push("text".to_owned());
            if let Some(m) = max_length {
                parts.push(format!("at most {m} characters"));
            }
            if let Some(p) = pattern {
                parts.push(format!("must match {p}"));
            }
            if !allow_leading_dash {
                parts.push("may not begin with '-'".to_owned());
            }
            if let Some(d) = default {
                parts.push(format!("default '{d}'"));
            }
        }
        ParamSpec::Integer { min, max, default } => {
            parts.push("whole number".to_owned());
            match (min, max) {
                (Some(a), Some(b)) => parts.push(format!("from {a} to {b}")),
                (Some(a), None) => parts.push(format!("at least {a}")),
                (None, Some(b)) => parts.push(format!("at most {b}")),
                _ => {}
            }
            if let Some(d) = default {
                parts.push(format!("default {d}"));
            }
        }
        ParamSpec::Enum { values, default } => {
            parts.push(format!("one of {}", values.join(", ")));
            if let Some(d) = default {
                parts.push(format!("default {d}"));
            }
        }
        ParamSpec::Bool { default } => {
            parts.push("yes or no".to_owned());
            if let Some(d) = default {
                parts.push(format!("default {}", if *d { "yes" } else { "no" }));
            }
        }
    }
    if !matches!(
        ps,
        ParamSpec::String {
            default: Some(_),
            ..
        } | ParamSpec::Integer {
            default: Some(_),
            ..
        } | ParamSpec::Enum {
            default: Some(_),
            ..
        } | ParamSpec::Bool { .. }
    ) {
        parts.push("required".to_owned());
    }
    parts.join("; ")
}

fn field_error(f: &Filled, field: &str, id: &str) -> Markup {
    html! {
        @if let Some(m) = f.error_for(field) {
            p.error.field-error #(format!("{id}-error")) { (m) }
        }
    }
}

fn param_input(name: &str, ps: &ParamSpec, f: &Filled) -> Markup {
    let field = format!("param.{name}");
    let id = format!("p-{name}");
    let help_id = format!("{id}-help");
    let invalid = f.error_for(&field).is_some();
    let describedby = if invalid {
        format!("{help_id} {id}-error")
    } else {
        help_id.clone()
    };
    let given = f.params.get(name).map(String::as_str);
    html! {
        div.field {
            @match ps {
                ParamSpec::Bool { default } => {
                    @let on = given.map(|v| v == "true").unwrap_or(default.unwrap_or(false));
                    label for=(id) {
                        input #(id) type="checkbox" name=(field) value="true" checked[on] aria-describedby=(describedby) aria-invalid=[invalid.then_some("true")];
                        " " (name)
                    }
                }
                ParamSpec::Integer { min, max, default } => {
                    label for=(id) { (name) }
                    input #(id) type="number" step="1" name=(field) min=[*min] max=[*max]
                        value=(given.map(str::to_owned).or(default.map(|d| d.to_string())).unwrap_or_default())
                        required[default.is_none()] aria-describedby=(describedby) aria-invalid=[invalid.then_some("true")];
                }
                ParamSpec::Enum { values, default } => {
                    label for=(id) { (name) }
                    @let chosen = given.or(default.as_deref());
                    select #(id) name=(field) required[default.is_none()] aria-describedby=(describedby) aria-invalid=[invalid.then_some("true")] {
                        @if default.is_none() { option value="" { "choose…" } }
                        @for v in values {
                            option value=(v) selected[chosen == Some(v.as_str())] { (v) }
                        }
                    }
                }
                ParamSpec::String { max_length, default, .. } => {
                    label for=(id) { (name) }
                    input #(id) type="text" name=(field) maxlength=[*max_length]
                        value=(given.or(default.as_deref()).unwrap_or_default())
                        required[default.is_none()] aria-describedby=(describedby) aria-invalid=[invalid.then_some("true")];
                }
            }
            p.help #(help_id) { (param_help(ps)) }
            (field_error(f, &field, &id))
        }
    }
}

async fn form_page(
    state: &AppState,
    user: &UiUser,
    spec: &ActionSpec,
    f: &Filled,
) -> Result<Markup, UiError> {
    let sandboxes = sandbox_names(state).await?;
    let text_input = |field: &str, label: &str, kind: &str, value: &str, help: String| {
        let id = format!("f-{field}");
        let invalid = f.error_for(field).is_some();
        let describedby = if invalid {
            format!("{id}-help {id}-error")
        } else {
            format!("{id}-help")
        };
        html! {
            div.field {
                label for=(id) { (label) }
                input #(id) type=(kind) name=(field) value=(value) min=[(kind == "number").then_some("0")]
                    required[field == "target"]
                    aria-describedby=(describedby)
                    aria-invalid=[invalid.then_some("true")];
                p.help #(format!("{id}-help")) { (help) }
                (field_error(f, field, &id))
            }
        }
    };
    let content = html! {
        @if let Some((m, _)) = &f.error {
            p.error role="alert" #form-error { (m) }
        }
        @if !spec.description.is_empty() { p.description { (spec.description) } }
        form.start method="post" action="/ui/jobs" {
            (super::csrf::field(user))
            input type="hidden" name="action" value=(spec.name);
            fieldset {
                legend { "Parameters" }
                @if spec.params.is_empty() { p { "This action takes none." } }
                @for (name, ps) in &spec.params { (param_input(name, ps, f)) }
            }
            fieldset {
                legend { "Where and how" }
                (text_input("target", "Target", "text", &f.target,
                    "an agent id, * for every agent, or a selector such as role=web,!env=prod".to_owned()))
                (text_input("timeout", "Timeout (seconds)", "number", &f.timeout,
                    format!("optional; the action's is {} s", spec.timeout.as_secs())))
                (text_input("retries", "Retries", "number", &f.retries,
                    format!("optional; the action's is {}", spec.retries.max)))
                div.field {
                    label for="f-sandbox" { "Sandbox profile" }
                    select #f-sandbox name="sandbox" aria-describedby="f-sandbox-help" {
                        option value="" { "the action's (" (spec.sandbox.as_deref().unwrap_or("process")) ")" }
                        @for s in &sandboxes {
                            option value=(s) selected[f.sandbox == *s] { (s) }
                        }
                    }
                    p.help #f-sandbox-help { "optional; another profile than the action's" }
                    (field_error(f, "sandbox", "f-sandbox"))
                }
            }
            button type="submit" #start-job { "Start" }
        }
    };
    Ok(layout(
        user,
        Section::Jobs,
        &format!("Start {}", spec.name),
        content,
    ))
}

/// `GET /ui/jobs/new?action=NAME`: the catalog's actions to choose from,
/// then the chosen one's form.
pub async fn new(
    State(state): State<AppState>,
    user: UiUser,
    Query(q): Query<NewQuery>,
) -> Result<Markup, UiError> {
    user.auth.require(Role::Operator)?;
    let Some(name) = nonblank(&q.action) else {
        let actions = actions_for(&state, &user).await?;
        let content = html! {
            @if actions.is_empty() {
                p { "Your scope allows no action of the catalog." }
            } @else {
                form.choose method="get" action="/ui/jobs/new" {
                    label for="f-action" { "Action" }
                    select #f-action name="action" {
                        @for a in &actions { option value=(a.name) { (a.name) } }
                    }
                    button type="submit" { "Next" }
                }
                table #actions {
                    caption.visually-hidden { "Actions" }
                    thead { tr { th scope="col" { "Action" } th scope="col" { "What it does" } } }
                    tbody {
                        @for a in &actions {
                            tr {
                                th scope="row" { a href={ "/ui/jobs/new?action=" (urlencoding(&a.name)) } { (a.name) } }
                                td { (a.description) }
                            }
                        }
                    }
                }
            }
        };
        return Ok(layout(&user, Section::Jobs, "Start a job", content));
    };
    let spec = find(&state, &user, name).await?;
    form_page(&state, &user, &spec, &Filled::default()).await
}

fn urlencoding(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn find(state: &AppState, user: &UiUser, name: &str) -> Result<ActionSpec, UiError> {
    let Some((spec, _)) = crate::routes::actions::find(state, name).await? else {
        return Err(UiError::not_found(format!("action '{name}' not found")));
    };
    if !user.auth.limits.allows_action(&spec.name) {
        return Err(UiError::forbidden(format!(
            "action '{name}' is outside your scope ({})",
            user.auth.limits.describe()
        )));
    }
    Ok(spec)
}

/// Which field of the form an error message of the server is about.
fn field_of(message: &str, spec: &ActionSpec) -> Option<String> {
    for name in spec.params.keys() {
        if message.contains(&format!("'{name}'")) {
            return Some(format!("param.{name}"));
        }
    }
    let m = message.to_ascii_lowercase();
    if m.contains("timeout") {
        Some("timeout".to_owned())
    } else if m.contains("sandbox") {
        Some("sandbox".to_owned())
    } else if m.contains("retr") {
        Some("retries".to_owned())
    } else if m.contains("target") || m.contains("selector") || m.contains("agent") {
        Some("target".to_owned())
    } else {
        None
    }
}

/// `POST /ui/jobs`: starts a job through the API's submit; on a bad value
/// the form again (422) with what the user typed and the server's word.
pub async fn create(
    State(state): State<AppState>,
    audit: Audit,
    user: UiUser,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    user.auth.require(Role::Operator)?;
    let name = form.text("action").unwrap_or_default().to_owned();
    let spec = find(&state, &user, &name).await?;
    let mut filled = Filled {
        target: form.text("target").unwrap_or_default().to_owned(),
        timeout: form.text("timeout").unwrap_or_default().to_owned(),
        retries: form.text("retries").unwrap_or_default().to_owned(),
        sandbox: form.text("sandbox").unwrap_or_default().to_owned(),
        ..Filled::default()
    };
    let mut params = BTreeMap::new();
    for (pname, ps) in &spec.params {
        let field = format!("param.{pname}");
        match ps {
            ParamSpec::Bool { .. } => {
                let on = form.checked(&field);
                filled.params.insert(pname.clone(), on.to_string());
                params.insert(pname.clone(), serde_json::Value::Bool(on));
            }
            _ => {
                // Text as typed (a blank one takes the default).
                let raw = form.get(&field).unwrap_or_default();
                filled.params.insert(pname.clone(), raw.to_owned());
                if !raw.trim().is_empty() {
                    params.insert(pname.clone(), serde_json::Value::String(raw.to_owned()));
                }
            }
        }
    }
    let number = |field: &str, v: &str| -> Result<Option<u64>, (String, Option<String>)> {
        if v.is_empty() {
            return Ok(None);
        }
        v.parse::<u64>().map(Some).map_err(|_| {
            (
                format!("{field} must be a whole number, got '{v}'"),
                Some(field.to_owned()),
            )
        })
    };
    let parsed = number("timeout", &filled.timeout).and_then(|t| {
        let r = number("retries", &filled.retries)?;
        let r = r.map(u32::try_from).transpose().map_err(|_| {
            (
                "retries is too large".to_owned(),
                Some("retries".to_owned()),
            )
        })?;
        Ok((t, r))
    });
    let result: Result<(), (String, Option<String>)> = match parsed {
        Err(e) => Err(e),
        Ok((timeout_secs, retries)) => {
            let req = SubmitJobRequest {
                action: spec.name.clone(),
                target: filled.target.clone(),
                params,
                timeout_secs,
                retries,
                sandbox: (!filled.sandbox.is_empty()).then(|| filled.sandbox.clone()),
            };
            match submit_job(&state, &user.auth, &audit, &req, StatusCode::SEE_OTHER).await {
                Ok(job) => return Ok(Redirect::to(&format!("/ui/jobs/{}", job.id)).into_response()),
                Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
                    // A target that does not parse is the target's fault,
                    // whatever its error says.
                    let field = field_of(&e.message, &spec).or_else(|| {
                        crate::selector::Selector::parse(&filled.target)
                            .is_err()
                            .then(|| "target".to_owned())
                    });
                    Err((e.message, field))
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    if let Err(e) = result {
        filled.error = Some(e);
    }
    let page = form_page(&state, &user, &spec, &filled).await?;
    Ok((StatusCode::UNPROCESSABLE_ENTITY, page).into_response())
}

// ------------------------------------------------------- agent's attempts

/// The "Recent attempts" of an agent's page: its latest attempts, linked
/// to their jobs.
pub async fn recent_attempts(state: &AppState, agent_id: &str) -> Result<Markup, UiError> {
    let attempts = state.store.attempts_of_agent(agent_id, 20).await?;
    Ok(html! {
        section aria-labelledby="attempts-h" {
            h2 #attempts-h { "Recent attempts" }
            @if attempts.is_empty() { p { "None yet." } } @else {
                table #recent-attempts {
                    thead { tr {
                        th scope="col" { "Job" } th scope="col" { "Number" } th scope="col" { "State" }
                        th scope="col" { "Created" } th scope="col" { "Started" } th scope="col" { "Ended" }
                    } }
                    tbody {
                        @for a in &attempts {
                            tr data-attempt=(a.id) {
                                th scope="row" { (job_link(&a.job_id)) }
                                td { (a.number) }
                                td { (state_badge(a.state.as_str())) }
                                td { (time(Some(a.created_at))) }
                                td { (time(a.started_at)) }
                                td { (time(a.finished_at)) }
                            }
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_of_several_agents_names_them_per_line() {
        assert_eq!(prefixed(None, "a\nb\n"), "a\nb\n");
        assert_eq!(prefixed(Some("web-1"), "a\nb\n"), "[web-1] a\n[web-1] b\n");
        assert_eq!(prefixed(Some("h"), "partial"), "[h] partial");
    }

    #[test]
    fn server_errors_point_at_their_field() {
        let Ok(spec) = serde_json::from_value::<ActionSpec>(serde_json::json!({
            "name": "echo", "argv": ["/bin/echo", "{{message}}"],
            "params": {"message": {"type": "string"}, "count": {"type": "integer"}}
        })) else {
            panic!("the spec parses")
        };
        assert_eq!(
            field_of("parameter 'count' must be an integer, got 'x'", &spec).as_deref(),
            Some("param.count")
        );
        assert_eq!(
            field_of("target: unknown label operator", &spec).as_deref(),
            Some("target")
        );
        assert_eq!(
            field_of("timeout_secs must be between 1 and 86400, got 0", &spec).as_deref(),
            Some("timeout")
        );
        assert_eq!(field_of("something else", &spec), None);
    }
}
