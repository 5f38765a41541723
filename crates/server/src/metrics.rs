//! Prometheus metrics of the server: HTTP traffic by route and status, and
//! agents by health. Exposed at `/metrics` in the OpenMetrics text format.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the server exports, registered once at start.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<HttpLabels>,
    agents: Family<AgentLabels, Gauge>,
    jobs: Family<StateLabels, Gauge>,
    results: Family<StateLabels, Counter>,
    queue_depth: Gauge,
    long_polls: Gauge,
    dispatch_latency: Histogram,
    runs: Family<StateLabels, Gauge>,
    webhooks: Family<OutcomeLabels, Counter>,
    artifact_bytes: Counter,
    dispatch: Family<StateLabels, Gauge>,
    fleet_stopped: Gauge,
    limits: Family<LimitLabels, Counter>,
    store_statements: Counter,
    store_commits: Counter,
    store_syncs: Counter,
    store_commit_failures: Counter,
    store_write_failing: Gauge,
    logins_refused: Family<ReasonLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    audit_verify_failures: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

fn http_buckets() -> Histogram {
    // 0.25 ms .. ~8 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("drover");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration: HistogramFamily<HttpLabels> = Family::new_with_constructor(http_buckets);
        let agents = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "http_requests",
            "HTTP requests handled, by method, route and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests, by method, route and status",
            http_duration.clone(),
        );
        registry.register("agents", "Enrolled agents by health status", agents.clone());
        let jobs = Family::<StateLabels, Gauge>::default();
        registry.register("jobs", "Jobs by state", jobs.clone());
        let results = Family::<StateLabels, Counter>::default();
        registry.register(
            "attempt_results",
            "Attempt results recorded, by state",
            results.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Attempts waiting to be dispatched",
            queue_depth.clone(),
        );
        let long_polls = Gauge::default();
        registry.register(
            "long_polls_waiting",
            "Agent long-polls held open",
            long_polls.clone(),
        );
        // 0.1 ms .. ~6.5 s
        let dispatch_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        registry.register(
            "dispatch_latency_seconds",
            "Time from an attempt becoming runnable to its dispatch to an agent",
            dispatch_latency.clone(),
        );
        let runs = Family::<StateLabels, Gauge>::default();
        registry.register("workflow_runs", "Workflow runs by state", runs.clone());
        let webhooks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook POSTs sent, by outcome (delivered or failed)",
            webhooks.clone(),
        );
        let artifact_bytes = Counter::default();
        registry.register(
            "artifact_bytes",
            "Bytes of artifacts stored",
            artifact_bytes.clone(),
        );
        let dispatch = Family::<StateLabels, Gauge>::default();
        registry.register(
            "agents_dispatch",
            "Agents (not revoked) by whether they take work: active, draining, stopped",
            dispatch.clone(),
        );
        let fleet_stopped = Gauge::default();
        registry.register(
            "fleet_stopped",
            "1 while dispatch is paused fleet-wide (emergency stop)",
            fleet_stopped.clone(),
        );
        let limits = Family::<LimitLabels, Counter>::default();
        registry.register(
            "attempt_limits_exceeded",
            "Attempts stopped by a sandbox limit, by limit",
            limits.clone(),
        );
        let store_statements = Counter::default();
        registry.register(
            "store_statements",
            "SQL statements the store sent (reads and writes)",
            store_statements.clone(),
        );
        let store_commits = Counter::default();
        registry.register(
            "store_commits",
            "Transactions the store committed",
            store_commits.clone(),
        );
        let store_syncs = Counter::default();
        registry.register(
            "store_syncs",
            "Durable database commits (on SQLite one per commit group: commits minus syncs shared another's fsync)",
            store_syncs.clone(),
        );
        let store_commit_failures = Counter::default();
        registry.register(
            "store_commit_failures",
            "Transactions whose commit failed (none of them was acknowledged)",
            store_commit_failures.clone(),
        );
        let store_write_failing = Gauge::default();
        registry.register(
            "store_write_failing",
            "1 while the store cannot write (the last write failed on a full disk, an I/O error or a failed commit; the log says why), else 0",
            store_write_failing.clone(),
        );
        let logins_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "logins_refused",
            "Logins refused before their password was checked: locked (429, after failed logins) or busy (503, too many at once)",
            logins_refused.clone(),
        );
        let rate_limited = Family::<LimitLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused (429) by a per-user or per-token rate limit, by limit (user or token)",
            rate_limited.clone(),
        );
        let audit_verify_failures = Counter::default();
        registry.register(
            "audit_verify_failures",
            "Audit verifications that found the hash chain broken",
            audit_verify_failures.clone(),
        );
        Metrics {
            rate_limited,
            audit_verify_failures,
            logins_refused,
            store_write_failing,
            store_statements,
            store_commits,
            store_syncs,
            store_commit_failures,
            dispatch,
            fleet_stopped,
            limits,
            runs,
            webhooks,
            artifact_bytes,
            registry,
            http_requests,
            http_duration,
            agents,
            jobs,
            results,
            queue_depth,
            long_polls,
            dispatch_latency,
        }
    }

    /// Sets the number of agents in one health status.
    pub fn set_agents(&self, status: &'static str, n: i64) {
        self.agents.get_or_create(&AgentLabels { status }).set(n);
    }

    pub fn set_jobs(&self, state: &str, n: i64) {
        self.jobs
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .set(n);
    }

    pub fn result_recorded(&self, state: &str) {
        self.results
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .inc();
    }

    pub fn set_runs(&self, state: &str, n: i64) {
        self.runs
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .set(n);
    }

    /// A login refused by the throttle: `locked` or `busy`.
    pub fn login_refused(&self, reason: &'static str) {
        self.logins_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A request refused by a rate limit: `user` or `token`.
    pub fn rate_limited(&self, limit: &'static str) {
        self.rate_limited
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// An audit verification found the chain broken.
    pub fn audit_verify_failed(&self) {
        self.audit_verify_failures.inc();
    }

    pub fn webhook_attempt(&self, delivered: bool) {
        let outcome = if delivered { "delivered" } else { "failed" };
        self.webhooks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn set_dispatch(&self, state: &str, n: i64) {
        self.dispatch
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .set(n);
    }

    pub fn set_fleet_stopped(&self, stopped: bool) {
        self.fleet_stopped.set(i64::from(stopped));
    }

    pub fn limit_exceeded(&self, limit: &'static str) {
        self.limits.get_or_create(&LimitLabels { limit }).inc();
    }

    pub fn artifact_stored(&self, bytes: u64) {
        self.artifact_bytes.inc_by(bytes);
    }

    pub fn set_queue_depth(&self, n: i64) {
        self.queue_depth.set(n);
    }

    pub fn set_long_polls(&self, n: i64) {
        self.long_polls.set(n);
    }

    /// Brings the store's counters up to its snapshot.
    pub fn set_store_stats(&self, s: &drover_store::StatsSnapshot) {
        for (counter, value) in [
            (&self.store_statements, s.statements),
            (&self.store_commits, s.commits),
            (&self.store_syncs, s.syncs),
            (&self.store_commit_failures, s.commit_failures),
        ] {
            counter.inc_by(value.saturating_sub(counter.get()));
        }
        self.store_write_failing.set(i64::from(s.write_failing));
    }

    pub fn observe_dispatch(&self, seconds: f64) {
        self.dispatch_latency.observe(seconds.max(0.0));
    }

    /// Renders every metric in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub use drover_proto::metrics_text::to_prometheus_text;

/// Content type of the classic Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Middleware counting and timing every request by its route template.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method()).to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The method as a label: the standard ones by name, anything else a
/// client makes up (`curl -X M1`) as `other`, so that no request can add
/// series.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_share_one_label() {
        use axum::http::Method;
        assert_eq!(method_label(&Method::POST), "POST");
        for m in ["M1", "M2", "PROPFIND", "TRACE", "CONNECT"] {
            let m = Method::from_bytes(m.as_bytes()).unwrap_or(Method::TRACE);
            assert_eq!(method_label(&m), "other", "{m}");
        }
    }

    #[test]
    fn registered_metrics_encode() {
        let m = Metrics::new();
        m.set_agents("online", 2);
        let text = m.encode().unwrap_or_default();
        assert!(
            text.contains("drover_agents{status=\"online\"} 2"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
