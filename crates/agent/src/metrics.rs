//! The agent's own Prometheus metrics, served at `/metrics` on a loopback
//! address when `metrics_listen` is set (off by default: the endpoint has
//! no authentication, and most fleets watch agents through the server).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drover_proto::jobs::Outcome;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Every metric of the agent.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    attempts: Counter,
    attempts_failed: Family<OutcomeLabels, Counter>,
    poll_duration: Histogram,
    outbox: Gauge,
    running: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("drover_agent");
        let attempts = Counter::default();
        let attempts_failed = Family::<OutcomeLabels, Counter>::default();
        let poll_duration = Histogram::new(poll_buckets());
        let outbox = Gauge::default();
        let running = Gauge::default();
        registry.register(
            "attempts",
            "Attempts that ended on this agent, rejected ones included",
            attempts.clone(),
        );
        registry.register(
            "attempts_failed",
            "Attempts that did not succeed, by outcome",
            attempts_failed.clone(),
        );
        registry.register(
            "poll_duration_seconds",
            "Time a poll for work took, held by the server included",
            poll_duration.clone(),
        );
        registry.register(
            "outbox_results",
            "Results written but not yet acknowledged by the server",
            outbox.clone(),
        );
        registry.register("running_attempts", "Attempts running now", running.clone());
        Metrics {
            registry,
            attempts,
            attempts_failed,
            poll_duration,
            outbox,
            running,
        }
    }

    pub fn attempt_ended(&self, outcome: Outcome) {
        self.attempts.inc();
        let outcome = match outcome {
            Outcome::Succeeded => return,
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
        };
        self.attempts_failed
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn poll_took(&self, d: Duration) {
        self.poll_duration.observe(d.as_secs_f64());
    }

    pub fn set_outbox(&self, n: usize) {
        self.outbox.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_running(&self, n: usize) {
        self.running.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Every metric in the classic Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(to_prometheus_text(&out))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The bounds of the poll duration histogram: 10 ms doubling up to ~80 s
/// (a poll is held up to 25 s). The same values as prometheus-client's
/// `exponential_buckets(0.01, 2.0, 14)`, by doubling instead of `powf`:
/// that one call was the agent's only use of libm, so without it the
/// dynamic linker no longer maps libm.so into the agent (~0.35 MiB of idle
/// RSS, docs/BENCHMARKS.md).
fn poll_buckets() -> impl Iterator<Item = f64> {
    std::iter::successors(Some(0.01_f64), |b| Some(b * 2.0)).take(14)
}

/// Content type of the classic Prometheus text format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub use drover_proto::metrics_text::to_prometheus_text;

/// Binds the metrics address; refused unless it is loopback (the config
/// checks it too).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a loopback address",
        ));
    }
    TcpListener::bind(addr).await
}

/// Serves `/metrics` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&metrics, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics: connection ended");
                },
            }
        });
    }
}

fn answer(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        resp
    };
    let text = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, text, "not found\n".to_owned());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, text, "use GET\n".to_owned());
    }
    match metrics.encode() {
        Ok(body) => reply(StatusCode::OK, PROMETHEUS_CONTENT_TYPE, body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, text, format!("{e}\n")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn poll_buckets_are_the_exponential_ones() {
        let want = prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 14);
        assert_eq!(poll_buckets().collect::<Vec<_>>(), want.collect::<Vec<_>>());
    }

    #[test]
    fn metrics_encode_and_are_served() {
        let m = Arc::new(Metrics::new());
        m.attempt_ended(Outcome::Succeeded);
        m.attempt_ended(Outcome::TimedOut);
        m.poll_took(Duration::from_millis(30));
        m.set_outbox(2);
        m.set_running(1);
        let text = m.encode().unwrap();
        for want in [
            "# TYPE drover_agent_attempts_total counter",
            "drover_agent_attempts_total 2",
            "drover_agent_attempts_failed_total{outcome=\"timed_out\"} 1",
            "drover_agent_poll_duration_seconds_count 1",
            "drover_agent_outbox_results 2",
            "drover_agent_running_attempts 1",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
        assert!(!text.contains("# EOF"));

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = CancellationToken::new();
            tokio::spawn(serve(listener, m.clone(), stop.clone()));
            let http = reqwest::Client::new();
            let resp = http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert!(resp
                .text()
                .await
                .unwrap()
                .contains("drover_agent_outbox_results 2"));
            let resp = http.get(format!("http://{addr}/")).send().await.unwrap();
            assert_eq!(resp.status(), 404);
            stop.cancel();
            assert!(bind("0.0.0.0:0".parse().unwrap()).await.is_err());
        });
    }
}
