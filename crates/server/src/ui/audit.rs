//! The audit log (admins, like `/api/v1/audit`): entries newest first,
//! filtered by actor, action, target and time with the same `AuditFilter`
//! as the API and `drover audit list`, a page at a time by id (`before`),
//! and the hash chain's state (`Store::verify_audit`, as `drover audit
//! verify`) on its own page: the walk reads every row, which takes seconds
//! on a large log, so it runs when asked, not on every page of entries.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, Utc};
use drover_store::jobs::{AuditFilter, AuditRecord};
use maud::{html, Markup};
use serde::Deserialize;

use super::error::UiError;
use super::layout::{page as layout, Section};
use super::session::UiUser;
use super::widgets::{state_badge, DEFAULT_LIMIT, MAX_LIMIT};
use crate::state::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    actor: Option<String>,
    /// Part of the action (`job.cancel`) or of the request (`/ui/`).
    action: Option<String>,
    /// A target or its start (`job:01J`, `agent:`).
    target: Option<String>,
    /// RFC 3339, or a day (`2026-12-01`, from midnight UTC).
    since: Option<String>,
    /// Only entries older than this id (the next page).
    before: Option<i64>,
    limit: Option<usize>,
}

fn blank(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A time as RFC 3339 or a day at midnight UTC.
fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| format!("since: '{s}' is not a time (2026-12-01 or RFC 3339)"))
}

/// An entry's details (`{"reason": "…"}`) as `key=value` items.
fn detail(r: &AuditRecord) -> Markup {
    let map = r
        .detail
        .as_deref()
        .filter(|d| !d.is_empty())
        .and_then(|d| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(d).ok())
        .unwrap_or_default();
    html! {
        @if !map.is_empty() {
            ul.detail {
                @for (k, v) in &map {
                    li { code { (k) "=" (v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())) } }
                }
            }
        }
    }
}

fn outcome(r: &AuditRecord) -> Markup {
    let tone = match r.outcome.as_str() {
        "ok" => "succeeded",
        "refused" => "rejected",
        _ => "failed",
    };
    html! {
        span class={ "badge badge-" (match tone { "succeeded" => "good", _ => "bad" }) } data-state=(r.outcome) {
            span.icon aria-hidden="true" { (if tone == "succeeded" { "●" } else { "✕" }) }
            " " (r.outcome) " (" (r.status) ")"
        }
    }
}

/// `GET /ui/audit?actor=&action=&target=&since=&before=&limit=`.
pub async fn list(
    State(state): State<AppState>,
    user: UiUser,
    Query(q): Query<ListQuery>,
) -> Result<Response, UiError> {
    user.auth.require_admin()?;
    let (actor, action, target, since_text) = (
        blank(&q.actor),
        blank(&q.action),
        blank(&q.target),
        blank(&q.since),
    );
    let mut problem = None;
    let since = match since_text.as_deref().map(parse_since) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            problem = Some(e);
            None
        }
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let rows = if problem.is_some() {
        Vec::new()
    } else {
        state
            .store
            .list_audit(&AuditFilter {
                actor: actor.clone(),
                action: action.clone(),
                target: target.clone(),
                since,
                before: q.before,
                // One more than shown tells whether there is a next page.
                limit: limit as i64 + 1,
            })
            .await?
    };
    let more = rows.len() > limit;
    let shown = &rows[..rows.len().min(limit)];
    let next = shown.last().filter(|_| more).map(|r| {
        let mut qs = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("actor", &actor),
            ("action", &action),
            ("target", &target),
            ("since", &since_text),
        ] {
            if let Some(v) = v {
                qs.append_pair(k, v);
            }
        }
        qs.append_pair("before", &r.id.to_string());
        qs.append_pair("limit", &limit.to_string());
        format!("/ui/audit?{}", qs.finish())
    });
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let content = html! {
        p #chain-link {
            "The entries form a hash chain. "
            a href="/ui/audit/verify" { "Verify the chain" }
            " (walks every row, like " code { "drover audit verify" } ")."
        }
        form.filter method="get" action="/ui/audit" role="search" {
            label for="actor" { "Actor" }
            input #actor name="actor" type="text" value=(value(&actor));
            label for="action" { "Action" }
            input #action name="action" type="text" placeholder="job.cancel" value=(value(&action));
            label for="target" { "Target" }
            input #target name="target" type="text" placeholder="job:01J" value=(value(&target));
            label for="since" { "Since" }
            input #since name="since" type="text" placeholder="2026-12-01" value=(value(&since_text));
            button type="submit" { "Filter" }
        }
        @if let Some(p) = &problem {
            p.error role="alert" { (p) }
        }
        table #audit {
            caption.visually-hidden { "Audit entries, newest first" }
            thead { tr {
                th scope="col" { "Id" } th scope="col" { "Time" } th scope="col" { "Actor" }
                th scope="col" { "Action" } th scope="col" { "Target" } th scope="col" { "Outcome" }
                th scope="col" { "Source" } th scope="col" { "Request" } th scope="col" { "Detail" }
            } }
            tbody {
                @for r in shown {
                    @let at = drover_store::time_from_ms(r.at);
                    tr data-entry=(r.id) {
                        th scope="row" { (r.id) }
                        td { time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S UTC")) } }
                        td.actor { (r.actor) }
                        td.action { code { (r.action) } }
                        td.target { code { (r.target) } }
                        td { (outcome(r)) }
                        td { (r.source.as_deref().filter(|s| !s.is_empty()).unwrap_or("—")) }
                        td.request { (r.request.as_deref().unwrap_or("—")) }
                        td { (detail(r)) }
                    }
                }
            }
        }
        nav.pagination aria-label="Pages" {
            @if q.before.is_some() {
                a href="/ui/audit" { "← Newest" }
            }
            span { @if shown.is_empty() { "Nothing to show" } @else { (shown.len()) " entries" } }
            @if let Some(href) = &next {
                a rel="next" href=(href) { "Older →" }
            }
        }
    };
    let status = if problem.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    Ok((status, layout(&user, Section::Audit, "Audit log", content)).into_response())
}

/// `GET /ui/audit/verify`: the hash chain's state, as `drover audit
/// verify` reports it.
pub async fn verify(State(state): State<AppState>, user: UiUser) -> Result<Markup, UiError> {
    user.auth.require_admin()?;
    let started = std::time::Instant::now();
    let v = crate::routes::audit::verify(&state).await?;
    let took = started.elapsed();
    let content = html! {
        @match &v.broken {
            None => {
                p.banner.banner-good #chain role="status" data-chain="ok" {
                    (state_badge("ok")) " The chain is intact: "
                    (v.count) " entries checked, up to entry " (v.head_id) "."
                }
            }
            Some(b) => {
                p.banner.banner-bad #chain role="alert" data-chain="broken" data-row=(b.row()) {
                    (state_badge("failed")) " The chain is BROKEN at entry " (b.row()) ": " (b.to_string())
                    " (" (b.kind()) "; " (v.count) " entries before it are sound)."
                }
            }
        }
        dl.facts {
            dt { "Head" } dd { "entry " (v.head_id) }
            dt { "Head hash" } dd { code { (v.head_hash) } }
            dt { "Checked in" } dd { (format!("{:.0} ms", took.as_secs_f64() * 1000.0)) }
        }
        p { a href="/ui/audit" { "Back to the entries" } }
    };
    Ok(layout(&user, Section::Audit, "Audit chain", content))
}
