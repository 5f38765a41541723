//! Approvals: the pending requests (and, on a second tab, the decided
//! ones), a page at a time in SQL, and one request with exactly what will
//! run — the job's action, parameters, target and the agents it resolved
//! to (or the run's workflow, definition and inputs), the spec hash the
//! approval is bound to, the votes so far. Approve and Reject go through
//! the API's own functions (`routes::approvals::{approve_as, reject_as}`),
//! so roles, four eyes, the hash binding and the audit apply alike; their
//! forms are shown only to users who may use them, and refused (403) to
//! others however they are sent.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use drover_proto::approvals::{Approval, ApprovalState};
use maud::{html, Markup};
use serde::Deserialize;

use super::error::UiError;
use super::layout::{page as layout, Section};
use super::session::{Form, UiUser};
use super::widgets::{job_link, pagination, state_badge, PageQuery, Paging};
use crate::routes::approvals::{approve_as, may_approve, may_reject, reject_as};
use crate::routes::audit::Audit;
use crate::state::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    page: Option<usize>,
    limit: Option<usize>,
    /// `decided` for the decided requests; the pending ones otherwise.
    show: Option<String>,
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

/// One path segment, percent-encoded (ids are safe already; this keeps
/// it so).
pub(crate) fn segment(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

fn approval_href(id: &str) -> String {
    format!("/ui/approvals/{}", segment(id))
}

/// What a request holds, in a few words: a job's action or a run's
/// workflow.
fn what(a: &Approval) -> Markup {
    let field = |k: &str| a.spec.get(k).and_then(|v| v.as_str()).unwrap_or("?");
    html! {
        @if let Some(job) = &a.job_id {
            "job " (job_link(job)) " · action " code { (field("action")) }
        } @else if let Some(run) = &a.run_id {
            "run " code { (run) } " · workflow " code { (field("workflow")) }
        }
    }
}

/// `GET /ui/approvals?show=&page=&limit=`.
pub async fn list(
    State(state): State<AppState>,
    user: UiUser,
    Query(q): Query<ListQuery>,
) -> Result<Markup, UiError> {
    let pending = q.show.as_deref() != Some("decided");
    let limit = q
        .limit
        .unwrap_or(super::widgets::DEFAULT_LIMIT)
        .clamp(1, super::widgets::MAX_LIMIT);
    let page = q.page.unwrap_or(1).max(1);
    let offset = |page: usize| i64::try_from((page - 1) * limit).unwrap_or(i64::MAX);
    let (mut rows, total) = state
        .store
        .page_approvals(pending, offset(page), limit as i64)
        .await?;
    let paging = Paging::new(
        &PageQuery {
            page: Some(page),
            limit: Some(limit),
        },
        usize::try_from(total).unwrap_or(0),
    );
    if paging.page != page {
        // Past the end: the last page instead.
        rows = state
            .store
            .page_approvals(pending, offset(paging.page), limit as i64)
            .await?
            .0;
    }
    let keep: &[(&str, &str)] = if pending { &[] } else { &[("show", "decided")] };
    let content = html! {
        nav.tabs aria-label="Which requests" {
            ul {
                li { @if pending { a href="/ui/approvals" aria-current="page" { "Pending" } } @else { a href="/ui/approvals" { "Pending" } } }
                li { @if pending { a href="/ui/approvals?show=decided" { "Decided" } } @else { a href="/ui/approvals?show=decided" aria-current="page" { "Decided" } } }
            }
        }
        p #pending-count role="status" {
            @if pending { (total) " pending" } @else { (total) " decided" }
        }
        table #approvals {
            caption.visually-hidden { @if pending { "Pending approval requests" } @else { "Decided approval requests" } }
            thead { tr {
                th scope="col" { "Request" } th scope="col" { "State" } th scope="col" { "What" }
                th scope="col" { "Asked by" } th scope="col" { "Asked" }
                th scope="col" { @if pending { "Expires" } @else { "Decided" } }
                th scope="col" { "Approvals" }
            } }
            tbody {
                @for a in &rows {
                    tr data-approval=(a.id) {
                        th scope="row" { a href=(approval_href(&a.id)) { code { (a.id) } } }
                        td { (state_badge(a.state.as_str())) }
                        td { (what(a)) }
                        td { (a.requested_by) }
                        td { (time(&a.requested_at)) }
                        td {
                            @if pending { (time(&a.expires_at)) }
                            @else if let Some(at) = &a.decided_at {
                                (time(at))
                                @if let Some(by) = &a.decided_by { " by " (by) }
                            } @else { "—" }
                        }
                        td { (a.approved_by.len()) " of " (a.approvers_needed) }
                    }
                }
            }
        }
        (pagination("/ui/approvals", paging, keep))
    };
    Ok(layout(&user, Section::Approvals, "Approvals", content))
}

/// A JSON value as people read it: strings bare, the rest as JSON.
fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What a job's request will run: the spec the hash binds (action, argv,
/// environment names, sandbox, agents) and, from the job, its parameters,
/// target and timeout.
async fn job_facts(state: &AppState, a: &Approval, job_id: &str) -> Result<Markup, UiError> {
    let job = state.store.job(job_id).await?;
    let spec = &a.spec;
    let list = |k: &str| -> Vec<String> {
        spec.get(k)
            .and_then(|v| v.as_array())
            .map(|xs| xs.iter().map(plain).collect())
            .unwrap_or_default()
    };
    let params: Vec<(String, String)> = job
        .as_ref()
        .and_then(|j| serde_json::from_str::<serde_json::Value>(&j.params_json).ok())
        .and_then(|v| v.as_object().cloned())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), plain(v))).collect())
        .unwrap_or_default();
    let sandbox = spec.get("sandbox");
    let sandbox_json = sandbox
        .map(|s| serde_json::to_string_pretty(s).unwrap_or_default())
        .unwrap_or_default();
    Ok(html! {
        dl.facts #what-runs {
            dt { "Job" } dd { (job_link(job_id)) }
            dt { "Action" } dd #action { code { (spec.get("action").map(plain).unwrap_or_default()) } }
            dt { "Parameters" }
            dd #params {
                @if params.is_empty() { "none" } @else {
                    ul { @for (k, v) in &params { li { code { (k) "=" (v) } } } }
                }
            }
            dt { "Command" } dd #argv { code { (list("argv").join(" ")) } }
            dt { "Environment" } dd {
                @let env = list("env");
                @if env.is_empty() { "none" } @else { (env.join(", ")) " (names; values from the vault)" }
            }
            @if let Some(j) = &job {
                dt { "Target" } dd #target { code { (j.target) } }
                dt { "Timeout" } dd #timeout { (humantime::format_duration(std::time::Duration::from_millis(u64::try_from(j.timeout_ms).unwrap_or(0)))) }
            }
            dt { "Agents" }
            dd #agents {
                ul { @for id in list("agents") { li { a href={ "/ui/agents/" (segment(&id)) } { code { (id) } } } } }
            }
            dt { "Sandbox" }
            dd #sandbox {
                (sandbox.and_then(|s| s.get("name")).map(plain).unwrap_or_default())
                " (" (sandbox.and_then(|s| s.get("type")).map(plain).unwrap_or_default()) ")"
                details { summary { "Profile" } pre { code { (sandbox_json) } } }
            }
        }
    })
}

/// What a run's request will run: the workflow, its definition's hash
/// and the inputs.
fn run_facts(a: &Approval, run_id: &str) -> Markup {
    let spec = &a.spec;
    let inputs: Vec<(String, String)> = spec
        .get("inputs")
        .and_then(|v| v.as_object())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), plain(v))).collect())
        .unwrap_or_default();
    html! {
        dl.facts #what-runs {
            dt { "Run" } dd { code { (run_id) } }
            dt { "Workflow" } dd { code { (spec.get("workflow").map(plain).unwrap_or_default()) } }
            dt { "Definition" } dd { code { (spec.get("definition").map(plain).unwrap_or_default()) } }
            dt { "Inputs" }
            dd #params {
                @if inputs.is_empty() { "none" } @else {
                    ul { @for (k, v) in &inputs { li { code { (k) "=" (v) } } } }
                }
            }
        }
    }
}

/// `GET /ui/approvals/{id}`.
pub async fn detail(
    State(state): State<AppState>,
    user: UiUser,
    Path(id): Path<String>,
) -> Result<Markup, UiError> {
    let a = crate::routes::approvals::load(&state, &id).await?;
    let what_runs = match (&a.job_id, &a.run_id) {
        (Some(job), _) => job_facts(&state, &a, job).await?,
        (None, Some(run)) => run_facts(&a, run),
        (None, None) => html! { p { "This request holds no work." } },
    };
    let approve = may_approve(&user.auth, &a);
    let reject = may_reject(&user.auth, &a);
    let own = a.requested_by == user.auth.username;
    let action = |verb: &str| format!("{}/{verb}", approval_href(&a.id));
    let title = format!("Approval {}", a.id);
    let content = html! {
        dl.facts #request {
            dt { "State" } dd #state { (state_badge(a.state.as_str())) }
            dt { "Asked by" } dd #requested-by { (a.requested_by) }
            dt { "Asked" } dd { (time(&a.requested_at)) }
            dt { "Expires" } dd #expires { (time(&a.expires_at)) }
            dt { "Why" } dd #reasons { ul { @for r in &a.reasons { li { (r) } } } }
            dt { "Approvals" }
            dd #votes {
                (a.approved_by.len()) " of " (a.approvers_needed) " needed"
                @if !a.approved_by.is_empty() { ": " (a.approved_by.join(", ")) }
            }
            dt { "Spec hash" } dd #spec-hash { code { (a.spec_hash) } }
            @if let Some(at) = &a.decided_at {
                dt { "Decided" } dd #decided {
                    (time(at))
                    @if let Some(by) = &a.decided_by { " by " (by) }
                }
            }
            @if let Some(r) = &a.reason { dt { "Reason" } dd #reason { (r) } }
        }
        section aria-labelledby="runs-h" {
            h2 #runs-h { "What will run" }
            p { "The approval holds for exactly this: if any of it changes, a new request replaces this one." }
            (what_runs)
            details {
                summary { "The spec the hash is computed over" }
                pre #spec { code { (serde_json::to_string_pretty(&a.spec).unwrap_or_default()) } }
            }
        }
        @if approve || reject {
            section aria-labelledby="decide-h" #decide {
                h2 #decide-h { "Decide" }
                @if approve {
                    form.approve method="post" action=(action("approve")) {
                        (super::csrf::field(&user))
                        label for="approve-comment" { "Comment (optional)" }
                        input #approve-comment name="comment" type="text" maxlength="1000";
                        button type="submit" name="do" value="approve" { "Approve" }
                    }
                }
                form.reject method="post" action=(action("reject")) {
                    (super::csrf::field(&user))
                    label for="reject-reason" { "Reason (required)" }
                    input #reject-reason name="reason" type="text" maxlength="1000" required;
                    button type="submit" name="do" value="reject" { "Reject" }
                }
            }
        }
        @if own && a.state == ApprovalState::Pending {
            p.note #own { "You asked for this: someone else must approve it (four eyes)." }
        }
    };
    Ok(layout(&user, Section::Approvals, &title, content))
}

fn back(id: &str) -> Response {
    Redirect::to(&approval_href(id)).into_response()
}

/// `POST /ui/approvals/{id}/approve`.
pub async fn approve(
    State(state): State<AppState>,
    audit: Audit,
    user: UiUser,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    let a = approve_as(&state, &user.auth, &audit, &id, form.text("comment")).await?;
    Ok(back(&a.id))
}

/// `POST /ui/approvals/{id}/reject`.
pub async fn reject(
    State(state): State<AppState>,
    audit: Audit,
    user: UiUser,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    let a = reject_as(&state, &user.auth, &audit, &id, form.text("reason")).await?;
    Ok(back(&a.id))
}
