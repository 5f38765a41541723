//! `drover-bench`: measures dispatch latency and throughput of trivial jobs
//! and the overhead of a layered workflow DAG on real `drover` and
//! `drover-agent` processes on loopback, next to the machine's raw
//! fork/exec rate, and prints the figures as one JSON object on stdout
//! (notes go to stderr).
//!
//! It is a harness, not a test: nothing here asserts, every figure is
//! reported with its target from PRODUCT.md and whether it was met. Every
//! loop is bounded in count and the whole run by `--max-secs`.

mod cluster;
mod dag;
mod stats;
mod ui;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use drover_proto::jobs::{Job, JobState, SubmitJobRequest};
use serde_json::{json, Value};

use crate::cluster::{Cluster, Setup};
use crate::stats::summarize;

/// Benchmarks Drover's job dispatch on loopback and prints JSON figures.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Which scenario to run: s1 (dispatch latency), s2 (throughput), s3
    /// (100-task layered workflow DAG) or all of those three; or ui (the
    /// dashboard's agents and jobs pages at fleet size, run on its own).
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Run the server against this database instead of SQLite in a temp dir,
    /// e.g. postgres://drover@127.0.0.1/bench. It must be empty.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Directory holding the drover and drover-agent binaries
    /// [default: the directory of this binary].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// S1: measured jobs, run one after another.
    #[arg(long, default_value_t = 200)]
    s1_jobs: usize,
    /// S1: jobs run first and not counted.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// S2: jobs per action (`true`, then `noop`).
    #[arg(long, default_value_t = 2000)]
    s2_jobs: usize,
    /// S2: agents the jobs alternate between.
    #[arg(long, default_value_t = 2)]
    s2_agents: usize,
    /// S3: measured runs of the DAG per action (`noop`, then `true`).
    #[arg(long, default_value_t = 5)]
    s3_runs: usize,
    /// ui: agents enrolled (through the agent API, with one heartbeat each).
    #[arg(long, default_value_t = 1000)]
    ui_agents: usize,
    /// ui: jobs submitted (queued on those agents, which never poll).
    #[arg(long, default_value_t = 10_000)]
    ui_jobs: usize,
    /// ui: timed GETs of each page.
    #[arg(long, default_value_t = 30)]
    ui_reps: usize,
    /// Slots of each agent (its `capacity`).
    #[arg(long, default_value_t = 8)]
    capacity: u32,
    /// S2: jobs in flight at once (submitted and not yet final).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Sequential spawns of /bin/true for the raw fork/exec rate (0: skip).
    #[arg(long, default_value_t = 2000)]
    raw_spawns: usize,
    /// Seconds the agents idle after enrollment before their RSS is read.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// Log level of the server and the agents.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Keep the temp dir (logs, SQLite database) and print its path.
    #[arg(long)]
    keep: bool,
    /// Give up when the whole run takes longer than this many seconds.
    #[arg(long, default_value_t = 900)]
    max_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    S1,
    S2,
    S3,
    All,
    Ui,
}

impl Scenario {
    fn s1(self) -> bool {
        matches!(self, Scenario::S1 | Scenario::All)
    }
    fn s2(self) -> bool {
        matches!(self, Scenario::S2 | Scenario::All)
    }
    fn s3(self) -> bool {
        matches!(self, Scenario::S3 | Scenario::All)
    }
}

/// PRODUCT.md's quality bars.
const TARGET_P50_MS: f64 = 2.0;
const TARGET_P99_MS: f64 = 10.0;
const TARGET_RATIO: f64 = 0.5;
const TARGET_AGENT_IDLE_RSS_KIB: u64 = 6 * 1024;

/// Longest time one job may take before the run is abandoned.
const JOB_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match tokio::time::timeout(Duration::from_secs(args.max_secs), run(&args)).await {
        Ok(Ok(report)) => {
            match serde_json::to_string_pretty(&report) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("error: encoding the report: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "error: the run took longer than --max-secs {}",
                args.max_secs
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<Value> {
    if args.concurrency == 0 || args.s2_agents == 0 || args.s1_jobs == 0 || args.s2_jobs == 0 {
        bail!("--concurrency, --s2-agents, --s1-jobs and --s2-jobs must be at least 1");
    }
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => cluster::default_bin_dir()?,
    };
    cluster::binary(&bin_dir, "drover")?;
    cluster::binary(&bin_dir, "drover-agent")?;
    if !bin_dir.ends_with("release") {
        eprintln!(
            "note: binaries from {} are not a release build; figures are not representative",
            bin_dir.display()
        );
    }
    let mut report = json!({
        "bench": "drover-bench",
        "date": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "git": git_info(),
        "machine": machine_info(),
        "binaries": {
            "dir": bin_dir.display().to_string(),
            "drover_bytes": std::fs::metadata(bin_dir.join("drover")).map(|m| m.len()).ok(),
            "drover_agent_bytes": std::fs::metadata(bin_dir.join("drover-agent")).map(|m| m.len()).ok(),
        },
    });

    let raw = if args.raw_spawns > 0 && args.scenario != Scenario::Ui {
        eprintln!(
            "raw fork/exec: {} sequential spawns of /bin/true",
            args.raw_spawns
        );
        let n = args.raw_spawns;
        let raw = tokio::task::spawn_blocking(move || raw_spawn_rate(n))
            .await
            .context("joining the spawn loop")??;
        report["raw_fork_exec"] = raw.0.clone();
        Some(raw.1)
    } else {
        None
    };

    let setup = Setup {
        bin_dir,
        database_url: args.database_url.clone(),
        log_level: args.log_level.clone(),
        keep: args.keep,
    };
    let mut cluster = Cluster::start(&setup).await?;
    report["backend"] = json!(cluster.backend);
    eprintln!(
        "server {} on {} ({}), temp dir {}",
        cluster.server_pid(),
        cluster.url,
        cluster.backend,
        cluster.root().display()
    );
    let api = Api {
        http: cluster.http.clone(),
        url: cluster.url.clone(),
        token: cluster.token.clone(),
    };
    api.apply_true_action().await?;
    if args.scenario == Scenario::Ui {
        let sizes = ui::Sizes {
            agents: args.ui_agents,
            jobs: args.ui_jobs,
            reps: args.ui_reps.max(1),
        };
        report["ui_pages"] = ui::run(&api.http, &api.url, &api.token, &sizes).await?;
        let server = cluster::memory(cluster.server_pid())?;
        report["memory"] = json!({
            "server_peak_rss_kib": server.peak_kib,
            "server_rss_kib_at_end": server.rss_kib,
        });
        return Ok(report);
    }

    let agents = if args.scenario.s2() || args.scenario.s3() {
        args.s2_agents
    } else {
        1
    };
    for _ in 0..agents {
        let agent = cluster.add_agent(args.capacity)?;
        eprintln!("agent {} enrolled (pid {})", agent.id, agent.pid());
    }
    cluster.wait_agents_online().await?;
    eprintln!(
        "agents online; idling {} s before reading their RSS",
        args.idle_secs
    );
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let mut idle = Vec::new();
    for agent in &cluster.agents {
        idle.push(cluster::memory(agent.pid())?);
    }
    let agent_ids: Vec<String> = cluster.agents.iter().map(|a| a.id.clone()).collect();
    let procs = Procs {
        server: cluster.server_pid(),
        agents: cluster.agents.iter().map(|a| a.pid()).collect(),
        ticks: cluster::clock_ticks(),
    };

    if args.scenario.s1() {
        report["s1_dispatch_latency"] = s1(&api, &procs, &agent_ids[0], args).await?;
    }
    if args.scenario.s2() {
        report["s2_throughput"] = s2(&api, &procs, &agent_ids, args, raw).await?;
    }
    if args.scenario.s3() {
        report["s3_workflow_dag"] = dag::s3(
            &api.http,
            &api.url,
            &api.token,
            &agent_ids,
            args.s3_runs.max(1),
        )
        .await?;
    }

    let server = cluster::memory(cluster.server_pid())?;
    let mut agent_mem = Vec::new();
    for (agent, idle_mem) in cluster.agents.iter().zip(&idle) {
        let m = cluster::memory(agent.pid())?;
        agent_mem.push(json!({
            "id": agent.id,
            "idle_rss_kib": idle_mem.rss_kib,
            "idle_rss_anon_kib": idle_mem.anon_kib,
            "idle_rss_file_kib": idle_mem.file_kib,
            "peak_rss_kib": m.peak_kib,
        }));
    }
    let worst_idle = idle.iter().map(|m| m.rss_kib).max().unwrap_or(0);
    report["memory"] = json!({
        "server_peak_rss_kib": server.peak_kib,
        "server_rss_kib_at_end": server.rss_kib,
        "agents": agent_mem,
        "agent_idle_after_secs": args.idle_secs,
        "target": {"agent_idle_rss_kib_max": TARGET_AGENT_IDLE_RSS_KIB},
        "met": worst_idle <= TARGET_AGENT_IDLE_RSS_KIB,
    });
    drop(cluster);
    Ok(report)
}

/// The processes whose CPU time is accounted per job.
#[derive(Debug)]
struct Procs {
    server: u32,
    agents: Vec<u32>,
    ticks: u64,
}

/// CPU milliseconds used so far by the server, all agents together, and
/// this bench (the HTTP client).
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    server: f64,
    agents: f64,
    client: f64,
    at: Instant,
}

impl Procs {
    fn snapshot(&self) -> Result<CpuSnapshot> {
        let mut agents = 0.0;
        for pid in &self.agents {
            agents += cluster::cpu_ms(*pid, self.ticks)?;
        }
        Ok(CpuSnapshot {
            server: cluster::cpu_ms(self.server, self.ticks)?,
            agents,
            client: cluster::cpu_ms(std::process::id(), self.ticks)?,
            at: Instant::now(),
        })
    }

    /// CPU per job between two snapshots, and how busy the machine's cores
    /// were with these processes. Clock ticks make this coarse (10 ms).
    fn cpu_per_job(&self, before: CpuSnapshot, jobs: usize) -> Result<Value> {
        let after = self.snapshot()?;
        let per_job = |a: f64, b: f64| ((a - b) / jobs as f64 * 1000.0).round() / 1000.0;
        let wall_ms = after.at.duration_since(before.at).as_secs_f64() * 1000.0;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let used = (after.server - before.server)
            + (after.agents - before.agents)
            + (after.client - before.client);
        Ok(json!({
            "server_ms_per_job": per_job(after.server, before.server),
            "agents_ms_per_job": per_job(after.agents, before.agents),
            "bench_client_ms_per_job": per_job(after.client, before.client),
            "cores_busy_fraction": (used / (wall_ms * cores) * 1000.0).round() / 1000.0,
        }))
    }
}

/// The REST calls the scenarios make, as the admin.
#[derive(Debug, Clone)]
struct Api {
    http: reqwest::Client,
    url: String,
    token: String,
}

/// The server's store counters (statements, commits, syncs) from /metrics.
pub(crate) async fn store_stats(http: &reqwest::Client, url: &str) -> Result<[f64; 3]> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .context("GET /metrics")?
        .text()
        .await
        .context("reading /metrics")?;
    let mut out = [f64::NAN; 3];
    for line in text.lines() {
        for (i, name) in [
            "drover_store_statements_total ",
            "drover_store_commits_total ",
            "drover_store_syncs_total ",
        ]
        .iter()
        .enumerate()
        {
            if let Some(v) = line.strip_prefix(name) {
                out[i] = v.trim().parse().unwrap_or(f64::NAN);
            }
        }
    }
    Ok(out)
}

/// Store work per job (or task) between two snapshots. The scrapes
/// themselves add a few reads, spread over every unit.
pub(crate) fn per_unit(before: [f64; 3], after: [f64; 3], units: usize) -> Value {
    let per = |i: usize| ((after[i] - before[i]) / units.max(1) as f64 * 100.0).round() / 100.0;
    json!({
        "statements": per(0),
        "commits": per(1),
        "syncs": per(2),
    })
}

/// One job, run to its end.
#[derive(Debug)]
struct Finished {
    job: Job,
    /// From just before the submit to the answer showing the job final.
    latency_ms: f64,
}

impl Api {
    async fn check(resp: reqwest::Response, what: &str) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        bail!("{what}: {status}: {body}");
    }

    /// Puts the `true` action (argv `/bin/true`) into the catalog.
    async fn apply_true_action(&self) -> Result<()> {
        let catalog = json!({"actions": [{
            "name": "true",
            "description": "/bin/true, for drover-bench",
            "argv": ["/bin/true"],
        }]});
        let resp = self
            .http
            .post(format!("{}/api/v1/actions", self.url))
            .bearer_auth(&self.token)
            .json(&catalog)
            .send()
            .await
            .context("applying the action catalog")?;
        Self::check(resp, "applying the action catalog").await?;
        Ok(())
    }

    async fn submit(&self, action: &str, target: &str) -> Result<Job> {
        let req = SubmitJobRequest {
            action: action.to_owned(),
            target: target.to_owned(),
            ..SubmitJobRequest::default()
        };
        let resp = self
            .http
            .post(format!("{}/api/v1/jobs", self.url))
            .bearer_auth(&self.token)
            .json(&req)
            .send()
            .await
            .context("submitting a job")?;
        Self::check(resp, "submitting a job")
            .await?
            .json()
            .await
            .context("reading the submitted job")
    }

    /// Long-polls the job until it is final.
    async fn wait_final(&self, mut job: Job) -> Result<Job> {
        let deadline = Instant::now() + JOB_DEADLINE;
        while !job.state.is_final() {
            if Instant::now() > deadline {
                bail!(
                    "job {} is still {} after {:?}: {}",
                    job.id,
                    job.state.as_str(),
                    JOB_DEADLINE,
                    job.reason.unwrap_or_default()
                );
            }
            let resp = self
                .http
                .get(format!("{}/api/v1/jobs/{}?wait_ms=30000", self.url, job.id))
                .bearer_auth(&self.token)
                .send()
                .await
                .context("waiting for a job")?;
            job = Self::check(resp, "waiting for a job")
                .await?
                .json()
                .await
                .context("reading a job")?;
        }
        Ok(job)
    }

    /// Submits a job, waits for its end and requires it to have succeeded.
    async fn run(&self, action: &str, target: &str) -> Result<Finished> {
        let start = Instant::now();
        let job = self.submit(action, target).await?;
        let job = self.wait_final(job).await?;
        let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
        if job.state != JobState::Succeeded {
            let why = job
                .attempts
                .iter()
                .find_map(|a| a.error.clone().or_else(|| a.reason.clone()))
                .unwrap_or_default();
            bail!(
                "job {} ({action} on {target}) ended {}: {why}",
                job.id,
                job.state.as_str()
            );
        }
        Ok(Finished { job, latency_ms })
    }
}

fn ms_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

/// Server-side timings of finished jobs: the whole span and its phases
/// (mean of each, since the store keeps milliseconds).
fn server_side(done: &[Finished]) -> Value {
    let mut total = Vec::new();
    let mut phases: [Vec<f64>; 4] = Default::default();
    for f in done {
        let job = &f.job;
        let Some(finished) = job.finished_at else {
            continue;
        };
        total.push(ms_between(job.created_at, finished));
        let Some(a) = job.attempts.first() else {
            continue;
        };
        if let (Some(d), Some(s), Some(e)) = (a.dispatched_at, a.started_at, a.finished_at) {
            phases[0].push(ms_between(job.created_at, d));
            phases[1].push(ms_between(d, s));
            phases[2].push(ms_between(s, e));
            phases[3].push(ms_between(e, finished));
        }
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            Value::Null
        } else {
            json!((v.iter().sum::<f64>() / v.len() as f64 * 1000.0).round() / 1000.0)
        }
    };
    json!({
        "created_to_finished": summarize(&total),
        "phases_mean_ms": {
            "created_to_dispatched": mean(&phases[0]),
            "dispatched_to_started": mean(&phases[1]),
            "started_to_attempt_finished": mean(&phases[2]),
            "attempt_finished_to_job_finished": mean(&phases[3]),
        },
        "note": "timestamps are stored with millisecond resolution; started/attempt-finished come from the agent's clock",
    })
}

/// S1: sequential jobs of `true` on one agent; latency of each.
async fn s1(api: &Api, procs: &Procs, agent: &str, args: &Args) -> Result<Value> {
    eprintln!(
        "s1: {} warm-up jobs, then {} measured jobs of `true` on agent {agent}",
        args.warmup, args.s1_jobs
    );
    for _ in 0..args.warmup {
        api.run("true", agent).await?;
    }
    let mut done = Vec::with_capacity(args.s1_jobs);
    let cpu = procs.snapshot()?;
    let store_before = store_stats(&api.http, &api.url).await?;
    for _ in 0..args.s1_jobs {
        done.push(api.run("true", agent).await?);
    }
    let cpu = procs.cpu_per_job(cpu, args.s1_jobs)?;
    let store = per_unit(
        store_before,
        store_stats(&api.http, &api.url).await?,
        args.s1_jobs,
    );
    let latencies: Vec<f64> = done.iter().map(|f| f.latency_ms).collect();
    let client = summarize(&latencies).context("no S1 samples")?;
    eprintln!(
        "s1: p50 {:.2} ms, p99 {:.2} ms",
        client.p50_ms, client.p99_ms
    );
    Ok(json!({
        "action": "true",
        "agents": 1,
        "warmup_jobs": args.warmup,
        "jobs": args.s1_jobs,
        "submit_to_final_ms": client,
        "server": server_side(&done),
        "cpu": cpu,
        "store_per_job": store,
        "target": {"p50_ms_max": TARGET_P50_MS, "p99_ms_max": TARGET_P99_MS},
        "met": {
            "p50": client.p50_ms <= TARGET_P50_MS,
            "p99": client.p99_ms <= TARGET_P99_MS,
        },
    }))
}

/// Runs `n` jobs of `action` with `concurrency` in flight, alternating the
/// target between the agents; returns the figures.
async fn throughput(
    api: &Api,
    procs: &Procs,
    action: &'static str,
    agents: &[String],
    args: &Args,
) -> Result<Value> {
    let n = args.s2_jobs;
    eprintln!(
        "s2: {n} jobs of `{action}` over {} agents, {} in flight",
        agents.len(),
        args.concurrency
    );
    let next = Arc::new(AtomicUsize::new(0));
    let agents: Arc<Vec<String>> = Arc::new(agents.to_vec());
    let cpu = procs.snapshot()?;
    let store_before = store_stats(&api.http, &api.url).await?;
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.min(n) {
        let (api, next, agents) = (api.clone(), next.clone(), agents.clone());
        workers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(done);
                }
                done.push(api.run(action, &agents[i % agents.len()]).await?);
            }
        });
    }
    let mut done = Vec::with_capacity(n);
    while let Some(joined) = workers.join_next().await {
        done.extend(joined.context("joining a worker")??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = procs.cpu_per_job(cpu, n)?;
    let store = per_unit(store_before, store_stats(&api.http, &api.url).await?, n);
    let rate = n as f64 / elapsed;
    let first = done.iter().map(|f| f.job.created_at).min();
    let last = done.iter().filter_map(|f| f.job.finished_at).max();
    let server_rate = match (first, last) {
        (Some(a), Some(b)) if b > a => {
            json!((n as f64 / (ms_between(a, b) / 1000.0) * 10.0).round() / 10.0)
        }
        _ => Value::Null,
    };
    let latencies: Vec<f64> = done.iter().map(|f| f.latency_ms).collect();
    eprintln!("s2: `{action}`: {rate:.1} jobs/s");
    Ok(json!({
        "action": action,
        "jobs": n,
        "seconds": (elapsed * 1000.0).round() / 1000.0,
        "jobs_per_sec": (rate * 10.0).round() / 10.0,
        "server_jobs_per_sec": server_rate,
        "submit_to_final_ms": summarize(&latencies),
        "cpu": cpu,
        "store_per_job": store,
    }))
}

/// S2: throughput of `true` and of the built-in `noop`.
async fn s2(
    api: &Api,
    procs: &Procs,
    agents: &[String],
    args: &Args,
    raw_rate: Option<f64>,
) -> Result<Value> {
    let t = throughput(api, procs, "true", agents, args).await?;
    let noop = throughput(api, procs, "noop", agents, args).await?;
    let rate = t["jobs_per_sec"].as_f64().unwrap_or(0.0);
    let ratio = raw_rate.map(|raw| (rate / raw * 1000.0).round() / 1000.0);
    Ok(json!({
        "agents": agents.len(),
        "capacity_per_agent": args.capacity,
        "in_flight": args.concurrency,
        "true": t,
        "noop": noop,
        "ratio_true_to_raw_fork_exec": ratio,
        "target": {"ratio_min": TARGET_RATIO},
        "met": ratio.map(|r| r >= TARGET_RATIO),
    }))
}

/// Spawns `/bin/true` `n` times in a row; returns the figures and the rate.
fn raw_spawn_rate(n: usize) -> Result<(Value, f64)> {
    let mut each = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let status = Command::new("/bin/true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("spawning /bin/true")?;
        if !status.success() {
            bail!("/bin/true exited with {status}");
        }
        each.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rate = n as f64 / elapsed;
    eprintln!("raw fork/exec: {rate:.0} spawns/s");
    Ok((
        json!({
            "spawns": n,
            "seconds": (elapsed * 1000.0).round() / 1000.0,
            "spawns_per_sec": rate.round(),
            "spawn_ms": summarize(&each),
        }),
        rate,
    ))
}

fn first_line_with(path: &str, prefix: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn machine_info() -> Value {
    let kernel = std::fs::read_to_string("/proc/version")
        .map(|v| v.trim().to_owned())
        .ok();
    let mem_mib = first_line_with("/proc/meminfo", "MemTotal")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024);
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu": first_line_with("/proc/cpuinfo", "model name"),
        "mem_total_mib": mem_mib,
        "kernel": kernel,
        // Other work on the machine skews every figure; this shows how much.
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").ok().map(|l| l.trim().to_owned()),
    })
}

/// The commit of the workspace this binary was built from, and whether the
/// tree had uncommitted changes when the bench ran.
fn git_info() -> Value {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    json!({
        "commit": git(&["rev-parse", "--short", "HEAD"]),
        "dirty": git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
    })
}
