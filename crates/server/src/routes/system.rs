//! Probes and metrics: `/healthz`, `/readyz`, `/metrics`.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use drover_proto::api::DispatchState;

use crate::metrics::{to_prometheus_text, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The server can do its work: the database answers, and it can write.
/// While the last write failed (a full disk, an I/O error), each check
/// tries a no-op write, so readiness returns once the store recovered.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if let Err(e) = state.store.ping().await {
        tracing::warn!(error = %e, "readiness check failed");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "database unavailable\n".to_owned(),
        );
    }
    if let Some(why) = state.store.write_failure() {
        if let Err(e) = state.store.probe_write().await {
            tracing::warn!(error = %e, was = %why, "readiness check: the database still cannot write");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database cannot write: {e}\n"),
            );
        }
    }
    (StatusCode::OK, "ready\n".to_owned())
}

/// Metrics in OpenMetrics when the scraper asks for it (Prometheus does),
/// else in the classic Prometheus text format.
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let now = Utc::now();
    match state
        .store
        .count_agents(
            now - state.config.stale_after,
            now - state.config.offline_after,
        )
        .await
    {
        Ok(c) => {
            state.metrics.set_agents("online", c.online);
            state.metrics.set_agents("stale", c.stale);
            state.metrics.set_agents("offline", c.offline);
            state.metrics.set_agents("revoked", c.revoked);
        }
        Err(e) => tracing::warn!(error = %e, "counting agents for metrics failed"),
    }
    match state.store.count_jobs_by_state().await {
        Ok(counts) => {
            for st in drover_proto::jobs::JobState::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == st.as_str())
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                state.metrics.set_jobs(st.as_str(), n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "counting jobs for metrics failed"),
    }
    match state.store.count_runs_by_state().await {
        Ok(counts) => {
            for st in drover_proto::workflows::RunState::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == st.as_str())
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                state.metrics.set_runs(st.as_str(), n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "counting runs for metrics failed"),
    }
    match state.store.count_agents_by_dispatch().await {
        Ok(counts) => {
            for st in [
                DispatchState::Active,
                DispatchState::Draining,
                DispatchState::Stopped,
            ] {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == st.as_str())
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                state.metrics.set_dispatch(st.as_str(), n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "counting agents by dispatch for metrics failed"),
    }
    match state.store.fleet().await {
        Ok(f) => state.metrics.set_fleet_stopped(f.stopped_at.is_some()),
        Err(e) => tracing::warn!(error = %e, "reading the fleet state for metrics failed"),
    }
    match state.store.queue_depth().await {
        Ok(n) => state.metrics.set_queue_depth(n),
        Err(e) => tracing::warn!(error = %e, "measuring the queue for metrics failed"),
    }
    state.metrics.set_store_stats(&state.store.stats());
    state.metrics.set_long_polls(
        state
            .hub
            .polls_waiting
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match state.metrics.encode() {
        Ok(body) if wants_openmetrics => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            to_prometheus_text(&body),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
