//! S3: a 100-task layered DAG (10 layers × 10 tasks, each task needing
//! every task of the layer before), of `noop` and of `true`.
//!
//! Figures per run: wall time from just before the submit to the event
//! that ends the run (read from the run's SSE stream), the critical path of
//! the work itself (the sum over layers of the longest attempt of the
//! layer, as the agents measured it), and the per-task overhead
//! `(wall − critical path) / tasks`. The hand-off of each layer (first
//! start of layer k minus last end of layer k−1, server times) shows how
//! fast the engine reacts to a finished layer.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use drover_proto::jobs::Job;
use drover_proto::workflows::{Run, RunEvent, RunState};
use serde_json::{json, Value};

use crate::stats::summarize;

/// PRODUCT.md: per-task overhead of a 100-task layered DAG ≤ 1 ms.
const TARGET_OVERHEAD_MS: f64 = 1.0;

/// The definition: `layers` × `width` tasks of `action`, alternating
/// between `agents` so that each layer is spread over all of them.
pub fn definition(action: &str, layers: usize, width: usize, agents: &[String]) -> String {
    let mut yaml = format!("name: bench-{action}-{layers}x{width}\ntasks:\n");
    for layer in 0..layers {
        for i in 0..width {
            let target = &agents[(layer * width + i) % agents.len()];
            yaml.push_str(&format!(
                "  - id: l{layer}-t{i}\n    action: {action}\n    target: '{target}'\n"
            ));
            if layer > 0 {
                let needs: Vec<String> =
                    (0..width).map(|j| format!("l{}-t{j}", layer - 1)).collect();
                yaml.push_str(&format!("    needs: [{}]\n", needs.join(", ")));
            }
        }
    }
    yaml
}

/// One run of the DAG, measured.
pub async fn run_once(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    yaml: &str,
    layers: usize,
    width: usize,
) -> Result<Value> {
    let start = Instant::now();
    let resp = http
        .post(format!("{url}/api/v1/workflows/runs"))
        .bearer_auth(token)
        .json(&json!({"definition": yaml}))
        .send()
        .await
        .context("submitting the DAG")?;
    if !resp.status().is_success() {
        let status = resp.status();
        bail!(
            "submitting the DAG: {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let run: Run = resp.json().await.context("reading the run")?;
    let submitted_ms = start.elapsed().as_secs_f64() * 1000.0;

    // Read the event stream until the run ends.
    let mut events = http
        .get(format!("{url}/api/v1/workflows/runs/{}/events", run.id))
        .bearer_auth(token)
        .send()
        .await
        .context("opening the event stream")?;
    let mut buf = String::new();
    let mut end: Option<RunState> = None;
    let mut count = 0usize;
    'read: while let Some(chunk) = events.chunk().await.context("reading events")? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let block: String = buf.drain(..pos + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                let ev: RunEvent = serde_json::from_str(data).context("an event")?;
                count += 1;
                if ev.ends_run() {
                    end = ev.state.as_deref().and_then(RunState::parse);
                    break 'read;
                }
            }
        }
    }
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    if end != Some(RunState::Succeeded) {
        bail!("run {} ended {end:?}", run.id);
    }

    let run: Run = http
        .get(format!("{url}/api/v1/workflows/runs/{}", run.id))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await
        .context("reading the finished run")?;
    let mut critical_ms = 0.0;
    let mut handoffs = Vec::new();
    let mut prev_end = None;
    for layer in 0..layers {
        let mut longest = 0u64;
        let mut first_start = None;
        let mut last_end = None;
        for i in 0..width {
            let id = format!("l{layer}-t{i}");
            let task = run
                .tasks
                .iter()
                .find(|t| t.id == id)
                .with_context(|| format!("task {id} missing"))?;
            let job_id = task.job_id.as_deref().context("a task without a job")?;
            let job: Job = http
                .get(format!("{url}/api/v1/jobs/{job_id}"))
                .bearer_auth(token)
                .send()
                .await?
                .json()
                .await
                .context("reading a job")?;
            for a in &job.attempts {
                longest = longest.max(a.duration_ms.unwrap_or(0));
            }
            first_start = first_start.min(task.started_at).or(task.started_at);
            last_end = last_end.max(task.finished_at);
        }
        critical_ms += longest as f64;
        if let (Some(prev), Some(start)) = (prev_end, first_start) {
            let d: chrono::Duration = start - prev;
            handoffs.push(d.num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
        prev_end = last_end;
    }
    let tasks = (layers * width) as f64;
    let overhead = (wall_ms - critical_ms) / tasks;
    Ok(json!({
        "run": run.id,
        "events": count,
        "submit_ms": round3(submitted_ms),
        "wall_ms": round3(wall_ms),
        "critical_path_ms": round3(critical_ms),
        "per_task_wall_ms": round3(wall_ms / tasks),
        "per_task_overhead_ms": round3(overhead),
        "layer_handoff": summarize(&handoffs),
    }))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// S3: `runs` runs of the DAG for each action; the median run is the
/// figure compared with the target.
pub async fn s3(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    agents: &[String],
    runs: usize,
) -> Result<Value> {
    let (layers, width) = (10, 10);
    let mut out = json!({
        "layers": layers,
        "tasks_per_layer": width,
        "agents": agents.len(),
        "runs_per_action": runs,
        "target": {"per_task_overhead_ms_max": TARGET_OVERHEAD_MS},
    });
    let mut met = true;
    for action in ["noop", "true"] {
        let yaml = definition(action, layers, width, agents);
        // One run to warm up (definition stored, caches filled), not counted.
        run_once(http, url, token, &yaml, layers, width).await?;
        let before = crate::store_stats(http, url).await?;
        let mut all = Vec::new();
        for n in 0..runs {
            eprintln!("S3 {action}: run {}/{runs}", n + 1);
            all.push(run_once(http, url, token, &yaml, layers, width).await?);
        }
        let mut overheads: Vec<f64> = all
            .iter()
            .filter_map(|r| r["per_task_overhead_ms"].as_f64())
            .collect();
        overheads.sort_by(f64::total_cmp);
        let median = overheads
            .get(overheads.len() / 2)
            .copied()
            .unwrap_or(f64::NAN);
        met &= median <= TARGET_OVERHEAD_MS;
        let after = crate::store_stats(http, url).await?;
        out[action] = json!({
            "median_per_task_overhead_ms": median,
            "store_per_task": crate::per_unit(before, after, runs * layers * width),
            "runs": all,
        });
    }
    out["met"] = json!(met);
    Ok(out)
}
