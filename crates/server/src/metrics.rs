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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the server exports, registered once at start.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<HttpLabels>,
    agents: Family<AgentLabels, Gauge>,
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
        Metrics {
            registry,
            http_requests,
            http_duration,
            agents,
        }
    }

    /// Sets the number of agents in one health status.
    pub fn set_agents(&self, status: &'static str, n: i64) {
        self.agents.get_or_create(&AgentLabels { status }).set(n);
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
/// Content type of the classic Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text as the classic Prometheus text format (0.0.4),
/// for scrapers and tools (promtool) that do not ask for OpenMetrics. The two
/// differ in naming: OpenMetrics names a counter family `x` with samples
/// `x_total` and `x_created`; the classic format names the family `x_total`
/// and has no `_created` samples nor the closing `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                let is_created = name
                    .strip_suffix("_created")
                    .is_some_and(|family| counters.contains(family));
                if is_created {
                    continue;
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Middleware counting and timing every request by its route template.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counter_families_with_total() {
        let om = "# HELP drover_x Things.\n# TYPE drover_x counter\ndrover_x_total{a=\"1\"} 3\ndrover_x_created{a=\"1\"} 1.5\n# HELP drover_g Level.\n# TYPE drover_g gauge\ndrover_g 2\n# EOF\n";
        let want = "# HELP drover_x_total Things.\n# TYPE drover_x_total counter\ndrover_x_total{a=\"1\"} 3\n# HELP drover_g Level.\n# TYPE drover_g gauge\ndrover_g 2\n";
        assert_eq!(to_prometheus_text(om), want);
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
