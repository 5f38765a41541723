//! The `ui` scenario: how long the dashboard takes to answer its biggest
//! lists at fleet size. It enrolls `--ui-agents` agents through the real
//! agent API (each with one heartbeat carrying an inventory, so they show
//! online with labels, capacity and version), submits `--ui-jobs` jobs
//! through the jobs API, then times GETs of the agents and jobs pages (first
//! page, a deep page, a filtered page) with the admin's session as the
//! `drover_session` cookie, as a browser sends it.
//!
//! Each page is also timed next to the JSON API's answer for the same rows
//! where there is one (`ratio_to_api`), and next to the cheapest answer the
//! server gives (`/healthz`: the HTTP round trip the figures include).
//! Times are wall-clock from the client over loopback, so they bound the
//! server's render time from above.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_proto::agent::{EnrollResponse, HeartbeatRequest, Inventory};
use drover_proto::api::CreatedToken;
use serde_json::{json, Value};

use crate::stats::summarize;

/// PRODUCT.md / issue 15: each page renders in under this.
const TARGET_MS: f64 = 50.0;

/// Requests in flight while the fleet and the jobs are created.
const FILL_CONCURRENCY: usize = 8;

pub struct Sizes {
    pub agents: usize,
    pub jobs: usize,
    /// Timed GETs of each page (after 5 untimed ones).
    pub reps: usize,
}

/// Sends `make()` until it is not refused with 429 (the user rate limit),
/// waiting as Retry-After says; fails on any other error status.
async fn send(make: impl Fn() -> reqwest::RequestBuilder, what: &str) -> Result<Value> {
    for _ in 0..100 {
        let resp = make().send().await.with_context(|| what.to_owned())?;
        let status = resp.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let wait = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait.max(1))).await;
            continue;
        }
        let body = resp.text().await.with_context(|| what.to_owned())?;
        if !status.is_success() {
            bail!("{what}: {status}: {body}");
        }
        return serde_json::from_str(&body).with_context(|| format!("{what}: reading the answer"));
    }
    bail!("{what}: still rate limited after 100 tries")
}

/// Enrolls one agent with labels and a heartbeat; returns its id.
async fn enroll(http: &reqwest::Client, url: &str, token: &str, i: usize) -> Result<String> {
    let role = ["web", "api", "db", "cache"][i % 4];
    let labels = json!({
        "role": role,
        "rack": format!("r{:02}", i % 40),
        "env": if i % 10 == 0 { "staging" } else { "prod" },
    });
    let created: CreatedToken = serde_json::from_value(
        send(
            || {
                http.post(format!("{url}/api/v1/tokens"))
                    .bearer_auth(token)
                    .json(&json!({"kind": "bootstrap", "labels": labels, "group": format!("dc{}", i % 3)}))
            },
            "creating a bootstrap token",
        )
        .await?,
    )?;
    let hostname = format!("node-{i:05}");
    let enrolled: EnrollResponse = serde_json::from_value(
        send(
            || {
                http.post(format!("{url}/api/v1/agent/enroll"))
                    .json(&json!({
                        "token": created.token,
                        "hostname": hostname,
                        "agent_version": "0.1.0",
                    }))
            },
            "enrolling",
        )
        .await?,
    )?;
    let inventory = Inventory {
        hostname: hostname.clone(),
        os: "Debian GNU/Linux".into(),
        os_version: "12".into(),
        kernel: "6.1.0-18-amd64".into(),
        arch: "x86_64".into(),
        cpu_count: 8,
        load_avg: [0.4, 0.3, 0.2],
        memory_total_bytes: 16 << 30,
        memory_used_bytes: 5 << 30,
        disk_total_bytes: 200 << 30,
        disk_available_bytes: 120 << 30,
        agent_version: "0.1.0".into(),
        agent_uptime_secs: 3600,
        system_uptime_secs: 86400,
        capacity: 8,
        running: 0,
        sandboxes: vec!["process".into()],
        docker: None,
        problem: None,
    };
    let access = enrolled.credentials.access_token.clone();
    send(
        || {
            http.post(format!("{url}/api/v1/agent/heartbeat"))
                .bearer_auth(&access)
                .json(&HeartbeatRequest {
                    inventory: inventory.clone(),
                })
        },
        "sending a heartbeat",
    )
    .await?;
    Ok(enrolled.agent_id)
}

/// Runs `n` tasks `f(i)`, `FILL_CONCURRENCY` at a time; fails on the first
/// error.
async fn fill<F, Fut, T>(n: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut out = Vec::with_capacity(n);
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < n || !set.is_empty() {
        while next < n && set.len() < FILL_CONCURRENCY {
            let fut = f(next);
            set.spawn(async move { (next, fut.await) });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            let (i, r) = done.context("joining a task")?;
            out.push((i, r?));
        }
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, v)| v).collect())
}

/// Times `reps` GETs of `path` (after 5 untimed ones); the answer must be
/// 200. Returns the summary and the body size.
async fn time_get(
    make: impl Fn() -> reqwest::RequestBuilder,
    path: &str,
    reps: usize,
) -> Result<(Value, f64, usize)> {
    let mut samples = Vec::with_capacity(reps);
    let mut size = 0;
    for i in 0..reps + 5 {
        let started = Instant::now();
        let resp = make().send().await.with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let body = resp.bytes().await.with_context(|| format!("GET {path}"))?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if !status.is_success() {
            bail!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            );
        }
        size = body.len();
        if i >= 5 {
            samples.push(ms);
        }
    }
    let s = summarize(&samples).context("no samples")?;
    let p50 = s.p50_ms;
    Ok((serde_json::to_value(s)?, p50, size))
}

pub async fn run(http: &reqwest::Client, url: &str, token: &str, sizes: &Sizes) -> Result<Value> {
    let started = Instant::now();
    eprintln!("ui: enrolling {} agents", sizes.agents);
    let agents = fill(sizes.agents, |i| {
        let (http, url, token) = (http.clone(), url.to_owned(), token.to_owned());
        async move { enroll(&http, &url, &token, i).await }
    })
    .await?;
    let enroll_secs = started.elapsed().as_secs_f64();
    if agents.is_empty() {
        bail!("--ui-agents must be at least 1");
    }
    eprintln!(
        "ui: {} agents in {enroll_secs:.1} s; submitting {} jobs",
        agents.len(),
        sizes.jobs
    );
    let started = Instant::now();
    fill(sizes.jobs, |i| {
        let (http, url, token) = (http.clone(), url.to_owned(), token.to_owned());
        let target = agents[i % agents.len()].clone();
        async move {
            send(
                || {
                    http.post(format!("{url}/api/v1/jobs"))
                        .bearer_auth(&token)
                        .json(&json!({"action": "true", "target": target}))
                },
                "submitting a job",
            )
            .await
        }
    })
    .await?;
    let jobs_secs = started.elapsed().as_secs_f64();
    eprintln!("ui: {} jobs in {jobs_secs:.1} s; timing pages", sizes.jobs);

    let cookie = format!("drover_session={token}");
    let page = |path: &str| {
        let (http, cookie, full) = (http.clone(), cookie.clone(), format!("{url}{path}"));
        move || http.get(&full).header("Cookie", &cookie)
    };
    let api = |path: &str| {
        let (http, token, full) = (http.clone(), token.to_owned(), format!("{url}{path}"));
        move || http.get(&full).bearer_auth(&token)
    };
    let last_agents = sizes.agents.div_ceil(50).max(1);
    let last_jobs = sizes.jobs.div_ceil(50).max(1);
    let (floor, floor_p50, _) = time_get(api("/healthz"), "/healthz", sizes.reps).await?;
    // (page, the JSON API answer with the same rows where there is one)
    let pages: Vec<(String, Option<String>)> = vec![
        ("/ui/agents".into(), None),
        (format!("/ui/agents?page={last_agents}"), None),
        ("/ui/agents?status=online&page=2".into(), None),
        ("/ui/agents?target=role%3Dweb%2Cenv%3Dprod".into(), None),
        ("/ui/jobs".into(), Some("/api/v1/jobs?limit=50".into())),
        (format!("/ui/jobs?page={last_jobs}"), None),
        (
            "/ui/jobs?state=queued&page=2".into(),
            Some("/api/v1/jobs?state=queued&limit=100".into()),
        ),
    ];
    let mut results = Vec::new();
    let mut worst: f64 = 0.0;
    for (path, api_path) in pages {
        let (summary, p50, bytes) = time_get(page(&path), &path, sizes.reps).await?;
        worst = worst.max(p50);
        let mut row =
            json!({"page": path, "latency": summary, "bytes": bytes, "met": p50 < TARGET_MS});
        if let Some(a) = api_path {
            let (_, api_p50, _) = time_get(api(&a), &a, sizes.reps).await?;
            row["api"] = json!({"path": a, "p50_ms": api_p50});
            if api_p50 > 0.0 {
                row["ratio_to_api"] = json!((p50 / api_p50 * 100.0).round() / 100.0);
            }
        }
        eprintln!("ui: {path}: p50 {p50:.2} ms ({bytes} bytes)");
        results.push(row);
    }
    Ok(json!({
        "agents": sizes.agents,
        "jobs": sizes.jobs,
        "reps": sizes.reps,
        "fill": {"enroll_secs": round2(enroll_secs), "submit_secs": round2(jobs_secs)},
        "http_floor": {"path": "/healthz", "latency": floor, "p50_ms": floor_p50},
        "pages": results,
        "target": {"p50_ms_max": TARGET_MS},
        "met": worst < TARGET_MS,
    }))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
