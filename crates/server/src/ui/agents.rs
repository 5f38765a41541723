//! The agents: a paginated list (optionally what a target selects, or one
//! health state), and one agent's inventory, labels and dispatch controls.
//! Drain, stop and resume go through the same functions as the API
//! (`routes::agents::{drain, stop, resume}`), so roles, scopes and the
//! audit apply alike; their forms are shown only to users who may use
//! them, and refused (403) to others however they are sent.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use drover_proto::api::{AgentStatus, DispatchState, Role, StopRequest};
use drover_store::{AgentHealth, AgentRecord};
use maud::{html, Markup};
use serde::Deserialize;

use super::error::UiError;
use super::layout::{page as layout, Section};
use super::session::{Form, UiUser};
use super::widgets::{pagination, state_badge, PageQuery, Paging};
use crate::routes::audit::Audit;
use crate::state::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    page: Option<usize>,
    limit: Option<usize>,
    /// A target selector, as jobs use (docs/SELECTORS.md).
    target: Option<String>,
    /// Only agents in this health state.
    status: Option<String>,
}

fn health(state: &AppState, a: &AgentRecord) -> AgentStatus {
    AgentStatus::derive(
        a.revoked_at.is_some(),
        a.last_seen_at,
        Utc::now(),
        state.config.health(),
    )
}

/// Whether `user` may drain, stop and resume `a`: an operator whose scope
/// holds it, or an admin (the same rule the API applies).
pub fn may_control(user: &UiUser, a: &AgentRecord) -> bool {
    user.auth.role.at_least(Role::Operator) && user.auth.limits.allows_agent(a)
}

fn labels(a: &AgentRecord) -> Markup {
    html! {
        ul.labels {
            @for (k, v) in &a.labels {
                li { code { (k) "=" (v) } }
            }
        }
    }
}

/// `GET /ui/agents?page=&limit=&target=&status=`.
pub async fn list(
    State(state): State<AppState>,
    user: UiUser,
    Query(q): Query<ListQuery>,
) -> Result<Response, UiError> {
    let target = q.target.as_deref().map(str::trim).filter(|t| !t.is_empty());
    let status = q
        .status
        .as_deref()
        .and_then(|s| AgentStatus::ALL.into_iter().find(|a| a.as_str() == s));
    let mut problem = None;
    let page_q = PageQuery {
        page: q.page,
        limit: q.limit,
    };
    let (agents, paging) = match target {
        // The whole fleet: paged in SQL.
        None => {
            let now = Utc::now();
            let cut = drover_store::HealthCut {
                online_since: now - state.config.stale_after,
                stale_since: now - state.config.offline_after,
            };
            let only = status.map(|s| match s {
                AgentStatus::Online => AgentHealth::Online,
                AgentStatus::Stale => AgentHealth::Stale,
                AgentStatus::Offline => AgentHealth::Offline,
                AgentStatus::Revoked => AgentHealth::Revoked,
            });
            // The page asked for; past the end, the last one (a second
            // query, only then).
            let asked = Paging::new(&page_q, usize::MAX);
            let at = |p: Paging| {
                (
                    i64::try_from(p.range().start).unwrap_or(i64::MAX),
                    i64::try_from(p.limit).unwrap_or(0),
                )
            };
            let (offset, limit) = at(asked);
            let (mut rows, total) = state.store.page_agents(only, cut, offset, limit).await?;
            let paging = Paging::new(&page_q, usize::try_from(total).unwrap_or(0));
            if paging.page != asked.page {
                let (offset, limit) = at(paging);
                rows = state.store.page_agents(only, cut, offset, limit).await?.0;
            }
            (rows, paging)
        }
        // A selector is matched in memory (docs/SELECTORS.md), then paged.
        Some(t) => {
            let mut agents = match crate::selector::Selector::parse(t) {
                Err(e) => {
                    problem = Some(format!("target: {e}"));
                    Vec::new()
                }
                Ok(_) => match crate::domain::matching_agents(&state.store, t).await {
                    Ok(agents) => agents,
                    Err(crate::domain::Error::Target(_)) => Vec::new(),
                    Err(e) => return Err(crate::error::ApiError::from(e).into()),
                },
            };
            if let Some(s) = status {
                agents.retain(|a| health(&state, a) == s);
            }
            let paging = Paging::new(&page_q, agents.len());
            let range = paging.range();
            agents.truncate(range.end);
            agents.drain(..range.start);
            (agents, paging)
        }
    };
    let shown = &agents;
    let mut keep = Vec::new();
    if let Some(t) = target {
        keep.push(("target", t));
    }
    if let Some(s) = status {
        keep.push(("status", s.as_str()));
    }
    let content = html! {
        form.filter method="get" action="/ui/agents" role="search" {
            label for="target" { "Target" }
            input #target name="target" type="text" placeholder="role=web,!env=prod" value=(target.unwrap_or_default());
            label for="status" { "Health" }
            select #status name="status" {
                option value="" { "any" }
                @for s in AgentStatus::ALL {
                    option value=(s.as_str()) selected[status == Some(s)] { (s.as_str()) }
                }
            }
            button type="submit" { "Filter" }
        }
        @if let Some(p) = &problem {
            p.error role="alert" { (p) }
        }
        table #agents {
            caption.visually-hidden { "Agents" }
            thead { tr {
                th scope="col" { "Health" } th scope="col" { "Hostname" } th scope="col" { "Labels" }
                th scope="col" { "Group" } th scope="col" { "Running / capacity" }
                th scope="col" { "Version" } th scope="col" { "Dispatch" }
            } }
            tbody {
                @for a in shown {
                    tr data-agent=(a.id) {
                        td { (state_badge(health(&state, a).as_str())) }
                        th scope="row" { a href={ "/ui/agents/" (a.id) } { (a.hostname) } }
                        td { (labels(a)) }
                        td { (a.group.as_deref().unwrap_or("—")) }
                        td {
                            @match &a.inventory {
                                Some(i) => { (i.running) " / " (i.capacity) }
                                None => { "—" }
                            }
                        }
                        td { (a.agent_version.as_deref().unwrap_or("—")) }
                        td { (state_badge(a.dispatch.as_str())) }
                    }
                }
            }
        }
        (pagination("/ui/agents", paging, &keep))
    };
    let status_code = if problem.is_some() {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY
    } else {
        axum::http::StatusCode::OK
    };
    Ok((
        status_code,
        layout(&user, Section::Agents, "Agents", content),
    )
        .into_response())
}

fn bytes(n: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    format!("{:.1} GiB", n as f64 / GIB)
}

/// `GET /ui/agents/{id}`.
pub async fn detail(
    State(state): State<AppState>,
    user: UiUser,
    Path(id): Path<String>,
) -> Result<Markup, UiError> {
    let a = crate::routes::agents::load(&state, &id).await?;
    let title = format!("Agent {}", a.hostname);
    let controls = may_control(&user, &a) && a.revoked_at.is_none();
    let recent = super::jobs::recent_attempts(&state, &a.id).await?;
    let action = |verb: &str| format!("/ui/agents/{}/{verb}", a.id);
    let content = html! {
        dl.facts {
            dt { "Id" } dd { code { (a.id) } }
            dt { "Health" } dd { (state_badge(health(&state, &a).as_str())) }
            dt { "Dispatch" } dd #dispatch {
                (state_badge(a.dispatch.as_str()))
                @if let Some(r) = &a.dispatch_reason { " — " (r) }
            }
            dt { "Group" } dd { (a.group.as_deref().unwrap_or("—")) }
            dt { "Version" } dd { (a.agent_version.as_deref().unwrap_or("—")) }
            dt { "Enrolled" } dd { (a.enrolled_at.to_rfc3339()) }
            dt { "Last seen" } dd { (a.last_seen_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".to_owned())) }
            @if let Some(r) = &a.revoked_reason { dt { "Revoked" } dd { (r) } }
        }
        section aria-labelledby="labels-h" {
            h2 #labels-h { "Labels" }
            @if a.labels.is_empty() { p { "None." } } @else { (labels(&a)) }
        }
        section aria-labelledby="inventory-h" {
            h2 #inventory-h { "Inventory" }
            @match &a.inventory {
                None => p { "Not reported yet." },
                Some(i) => table.inventory {
                    tbody {
                        tr { th scope="row" { "OS" } td { (i.os) " " (i.os_version) " (" (i.kernel) ", " (i.arch) ")" } }
                        tr { th scope="row" { "CPUs" } td { (i.cpu_count) } }
                        tr { th scope="row" { "Load" } td { (format!("{:.2} {:.2} {:.2}", i.load_avg[0], i.load_avg[1], i.load_avg[2])) } }
                        tr { th scope="row" { "Memory used" } td { (bytes(i.memory_used_bytes)) " of " (bytes(i.memory_total_bytes)) } }
                        tr { th scope="row" { "Disk free" } td { (bytes(i.disk_available_bytes)) " of " (bytes(i.disk_total_bytes)) } }
                        tr { th scope="row" { "Running / capacity" } td { (i.running) " / " (i.capacity) } }
                        tr { th scope="row" { "Sandboxes" } td { (i.sandboxes.join(", ")) } }
                        @if let Some(p) = &i.problem { tr { th scope="row" { "Problem" } td.error { (p) } } }
                    }
                },
            }
        }
        (recent)
        @if controls {
            section aria-labelledby="controls-h" #controls {
                h2 #controls-h { "Dispatch controls" }
                @if a.dispatch != DispatchState::Stopped {
                    form method="post" action=(action("drain")) {
                        (super::csrf::field(&user))
                        label for="drain-reason" { "Reason" }
                        input #drain-reason name="reason" type="text" maxlength="500";
                        button type="submit" name="do" value="drain" { "Drain" }
                    }
                }
                form method="post" action=(action("stop")) {
                    (super::csrf::field(&user))
                    label for="stop-reason" { "Reason" }
                    input #stop-reason name="reason" type="text" maxlength="500";
                    label { input name="force" type="checkbox" value="on"; " Kill at once (force)" }
                    button.danger type="submit" name="do" value="stop" { "Stop" }
                }
                @if a.dispatch != DispatchState::Active {
                    form method="post" action=(action("resume")) {
                        (super::csrf::field(&user))
                        button type="submit" name="do" value="resume" { "Resume" }
                    }
                }
            }
        }
    };
    Ok(layout(&user, Section::Agents, &title, content))
}

fn back(id: &str) -> Response {
    Redirect::to(&format!("/ui/agents/{}", urlencode(id))).into_response()
}

/// One path segment, percent-encoded (ids are safe already; this keeps
/// it so).
fn urlencode(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// `POST /ui/agents/{id}/drain`.
pub async fn drain(
    State(state): State<AppState>,
    audit: Audit,
    user: UiUser,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    let a =
        crate::routes::agents::drain(&state, &user.auth, &audit, &id, form.text("reason")).await?;
    Ok(back(&a.id))
}

/// `POST /ui/agents/{id}/stop`.
pub async fn stop(
    State(state): State<AppState>,
    audit: Audit,
    user: UiUser,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    let req = StopRequest {
        reason: form.text("reason").map(str::to_owned),
        force: form.checked("force"),
    };
    crate::routes::agents::stop(&state, &user.auth, &audit, &id, &req).await?;
    let a = crate::routes::agents::load(&state, &id).await?;
    Ok(back(&a.id))
}

/// `POST /ui/agents/{id}/resume`.
pub async fn resume(
    State(state): State<AppState>,
    audit: Audit,
    user: UiUser,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    let a = crate::routes::agents::resume(&state, &user.auth, &audit, &id).await?;
    Ok(back(&a.id))
}
