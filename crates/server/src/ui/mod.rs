//! The dashboard: server-rendered HTML (maud) over the same store calls
//! and domain functions as the API, with one stylesheet and one small
//! script embedded in the binary. Every page works with JavaScript off.
//!
//! Key design decision: the dashboard authenticates with a session cookie
//! (`drover_session`, the same session tokens `drover login` gets), and
//! only the dashboard's routes read it — the API accepts bearer tokens
//! only, so a cross-site request can never act on the API. Every form
//! carries a CSRF token derived from the session (`csrf`), and every
//! response carries a strict Content-Security-Policy (`headers`).
//!
//! The pieces later pages reuse: `layout` (the page frame and the
//! navigation), `session` (the `UiUser` extractor, the cookie, form
//! bodies), `csrf`, `headers`, `error` (the error page), `widgets`
//! (pagination, `state_badge`).

pub mod agents;
pub mod approvals;
pub mod assets;
pub mod audit;
pub mod catalog;
pub mod csrf;
pub mod error;
pub mod headers;
pub mod jobs;
pub mod layout;
pub mod login;
pub mod overview;
pub mod session;
pub mod widgets;
pub mod workflows;

use axum::response::Redirect;
use axum::routing::{get, post};
use axum::Router;

use crate::state::AppState;

/// The dashboard's routes (not part of the OpenAPI document), with the
/// security headers on every answer, and `/` sending browsers to it.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(overview::page))
        .route("/ui/login", get(login::form).post(login::submit))
        .route("/ui/logout", post(login::logout))
        .route("/ui/agents", get(agents::list))
        .route("/ui/agents/{id}", get(agents::detail))
        .route("/ui/agents/{id}/drain", post(agents::drain))
        .route("/ui/agents/{id}/stop", post(agents::stop))
        .route("/ui/agents/{id}/resume", post(agents::resume))
        .route("/ui/approvals", get(approvals::list))
        .route("/ui/approvals/{id}", get(approvals::detail))
        .route("/ui/approvals/{id}/approve", post(approvals::approve))
        .route("/ui/approvals/{id}/reject", post(approvals::reject))
        .route("/ui/audit", get(audit::list))
        .route("/ui/audit/verify", get(audit::verify))
        .route("/ui/catalog", get(catalog::page))
        .route("/ui/catalog/actions/{name}", get(catalog::action))
        .route("/ui/jobs", get(jobs::list).post(jobs::create))
        .route("/ui/jobs/new", get(jobs::new))
        .route("/ui/jobs/{id}", get(jobs::detail))
        .route("/ui/jobs/{id}/cancel", post(jobs::cancel))
        .route("/ui/jobs/{id}/events", get(jobs::events))
        .route("/ui/workflows", get(workflows::list))
        .route("/ui/workflows/runs/{id}", get(workflows::detail))
        .route("/ui/workflows/runs/{id}/cancel", post(workflows::cancel))
        .route("/ui/workflows/runs/{id}/events", get(workflows::events))
        .route("/ui/workflows/runs/{id}/tasks/{task}", get(workflows::task))
        .route("/ui/artifacts/{id}", get(workflows::artifact))
        .route("/ui/static/{file}", get(assets::serve))
        .route(
            "/ui/{*rest}",
            get(|| async { error::UiError::not_found("no such page") }),
        )
        .layer(axum::middleware::from_fn(headers::secure))
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .with_state(state)
}
