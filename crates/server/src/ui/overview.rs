//! The overview: fleet health, queue depth, running work, recent
//! failures, and the fleet-wide stop — from the same store calls as
//! `/metrics` and `drover fleet`.

use axum::extract::State;
use chrono::Utc;
use drover_proto::jobs::JobState;
use maud::{html, Markup};

use super::error::UiError;
use super::layout::{page as layout, Section};
use super::session::UiUser;
use super::widgets::state_badge;
use crate::state::AppState;

/// Failed jobs the overview lists.
const RECENT_FAILURES: usize = 10;

/// `GET /ui/`.
pub async fn page(State(state): State<AppState>, user: UiUser) -> Result<Markup, UiError> {
    let now = Utc::now();
    let counts = state
        .store
        .count_agents(
            now - state.config.stale_after,
            now - state.config.offline_after,
        )
        .await?;
    let queued = state.store.queue_depth().await?;
    let by_state = state.store.count_jobs_by_state().await?;
    let jobs_in = |s: JobState| {
        by_state
            .iter()
            .filter(|(k, _)| k == s.as_str())
            .map(|(_, n)| *n)
            .sum::<i64>()
    };
    let running = jobs_in(JobState::Running) + jobs_in(JobState::Dispatched);
    let awaiting = jobs_in(JobState::AwaitingApproval);
    let mut failed = Vec::new();
    for s in [JobState::Failed, JobState::TimedOut, JobState::Lost] {
        failed.extend(
            state
                .store
                .list_jobs(Some(s), RECENT_FAILURES as i64)
                .await?,
        );
    }
    failed.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    failed.truncate(RECENT_FAILURES);
    let fleet = crate::routes::fleet::status(&state).await?;
    let health = [
        ("online", counts.online),
        ("stale", counts.stale),
        ("offline", counts.offline),
        ("revoked", counts.revoked),
    ];
    let content = html! {
        section aria-labelledby="fleet-stop" {
            h2 #fleet-stop { "Dispatch" }
            @if fleet.stopped {
                p.banner.banner-bad role="status" {
                    (state_badge("stopped")) " Fleet-wide stop"
                    @if let Some(by) = &fleet.stopped_by { " by " (by) }
                    @if let Some(at) = &fleet.stopped_at { " at " (at.to_rfc3339()) }
                    @if fleet.force { " (forced)" }
                    @if let Some(r) = &fleet.reason { ": " q { (r) } }
                }
            } @else {
                p role="status" { (state_badge("active")) " Dispatch is running fleet-wide." }
            }
        }
        section aria-labelledby="health" {
            h2 #health { "Fleet health" }
            dl.counts #agent-counts {
                @for (name, n) in health {
                    div data-count=(name) {
                        dt { (state_badge(name)) }
                        dd { a href={ "/ui/agents?status=" (name) } { (n) } }
                    }
                }
            }
        }
        section aria-labelledby="work" {
            h2 #work { "Work" }
            dl.counts #work-counts {
                div data-count="queued" { dt { "Queued attempts" } dd { (queued) } }
                div data-count="running" { dt { "Running jobs" } dd { (running) } }
                div data-count="awaiting_approval" { dt { "Awaiting approval" } dd { (awaiting) } }
            }
        }
        section aria-labelledby="failures" {
            h2 #failures { "Recent failures" }
            @if failed.is_empty() {
                p { "No failed jobs." }
            } @else {
                table {
                    thead { tr {
                        th scope="col" { "Job" } th scope="col" { "Action" }
                        th scope="col" { "State" } th scope="col" { "Started by" } th scope="col" { "Created" }
                    } }
                    tbody {
                        @for j in &failed {
                            tr {
                                th scope="row" { (super::widgets::job_link(&j.id)) }
                                td { (j.action) }
                                td { (state_badge(j.state.as_str())) }
                                td { (j.created_by) }
                                td { time datetime=(j.created_at.to_rfc3339()) { (j.created_at.format("%Y-%m-%d %H:%M:%S UTC")) } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&user, Section::Overview, "Overview", content))
}
