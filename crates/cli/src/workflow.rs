//! `drover workflow` (runs of workflow definitions) and `drover webhooks`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use drover_proto::workflows::{
    Artifact, CreateWebhookRequest, Run, RunEvent, RunResult, RunState, SubmitRunRequest,
    TaskState, Webhook, WebhookDelivery, WebhookEvent, SHA256_HEADER,
};

use crate::client::Api;
use crate::jobs::{follow, JobFailed};
use crate::ops::Target;
use crate::output::{self, Output};

#[derive(Debug, clap::Subcommand)]
pub enum WorkflowCommand {
    /// Start a run of a workflow definition (YAML or JSON).
    Submit {
        /// The workflow definition (YAML or JSON).
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
        /// An input of the run, NAME=VALUE (repeatable).
        #[arg(long = "input", short = 'i', value_name = "NAME=VALUE")]
        inputs: Vec<String>,
        /// Show task states and output live; exit 4 unless the run succeeds.
        /// With -o json, every line of stdout is one JSON event.
        #[arg(long)]
        follow: bool,
        /// With --follow: on Ctrl-C, cancel the run before exiting (without
        /// it, the run goes on and the command says how to cancel it).
        #[arg(long, requires = "follow")]
        cancel_on_interrupt: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Runs, newest first.
    List {
        /// Only runs in this state (running, succeeded, failed, cancelled, timed_out).
        #[arg(long)]
        state: Option<String>,
        /// Show at most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// A run's tasks: which run, which wait and why.
    Status {
        /// Run id or unique prefix.
        id: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Follow a run's events until it ends (exit 4 unless it succeeds).
    Follow {
        /// Run id or unique prefix.
        id: String,
        /// json: one JSON event per line.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Stop a run: running tasks are cancelled, waiting ones skipped.
    Cancel {
        /// Run id or unique prefix.
        id: String,
        /// Wait for the run to end and print its final state.
        #[arg(long)]
        wait: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove the workspace an ended run kept (keep_workspace), or whose
    /// removal failed.
    Cleanup {
        /// Run id or unique prefix.
        id: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// A run's outcome and the outputs of its tasks.
    Result {
        /// Run id or unique prefix.
        id: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The files a run's tasks collected; --download fetches them.
    Artifacts {
        /// Run id or unique prefix.
        id: String,
        /// Save every artifact under DIR/TASK/PATH, checking its sha256.
        #[arg(long, value_name = "DIR")]
        download: Option<PathBuf>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum WebhooksCommand {
    /// Add a webhook POSTed for every run that ends.
    Add {
        /// The URL to POST to (http or https).
        #[arg(long)]
        url: String,
        /// Key of the HMAC-SHA256 signature (x-drover-signature), 16+ bytes.
        #[arg(long, env = "DROVER_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// completed and/or failed [default: both].
        #[arg(long = "event", value_name = "EVENT")]
        events: Vec<String>,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The global webhooks.
    List {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove a global webhook.
    Rm {
        /// Webhook id (see drover webhooks list).
        id: String,
    },
    /// Deliveries with every attempt, newest first.
    Deliveries {
        /// Only those of this run.
        #[arg(long)]
        run: Option<String>,
        /// Show at most this many deliveries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

fn run_path(id: &str) -> anyhow::Result<String> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        bail!("'{id}' is not a run id (hex digits and dashes)");
    }
    Ok(format!("/workflows/runs/{id}"))
}

pub(crate) fn parse_inputs(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--input '{pair}' must be NAME=VALUE"))?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            bail!("--input {k} is given twice");
        }
    }
    Ok(out)
}

pub async fn workflow(target: &Target, cmd: WorkflowCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        WorkflowCommand::Submit {
            file,
            inputs,
            follow,
            cancel_on_interrupt,
            output,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let req = SubmitRunRequest {
                definition: serde_json::Value::String(text),
                source: Some(file.display().to_string()),
                inputs: parse_inputs(&inputs)?,
            };
            let run: Run = api.post("/workflows/runs", &req).await?;
            if follow {
                eprintln!("run {} of {} started", run.id, run.workflow);
                if output == Output::Json {
                    output::event(&serde_json::json!({
                        "event": "submitted",
                        "run": run.id,
                        "workflow": run.workflow,
                    }))?;
                }
                return follow_run(&api, &run.id, output, cancel_on_interrupt).await;
            }
            match output {
                Output::Json => output::json(&run)?,
                Output::Text => println!("{}", run.id),
            }
        }
        WorkflowCommand::List {
            state,
            limit,
            output,
        } => {
            let mut path = format!("/workflows/runs?limit={limit}");
            if let Some(s) = state {
                if RunState::parse(&s).is_none() {
                    bail!("unknown state '{s}'");
                }
                path.push_str(&format!("&state={s}"));
            }
            let runs: Vec<Run> = api.get(&path).await?;
            match output {
                Output::Json => output::json(&runs)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = runs
                        .iter()
                        .map(|r| {
                            vec![
                                r.id.clone(),
                                r.workflow.clone(),
                                r.state.as_str().to_owned(),
                                r.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                                r.created_by.clone(),
                                r.reason.clone().unwrap_or_default(),
                            ]
                        })
                        .collect();
                    output::table(
                        &["RUN", "WORKFLOW", "STATE", "CREATED", "BY", "REASON"],
                        &rows,
                    );
                }
            }
        }
        WorkflowCommand::Status { id, output } => {
            let run: Run = api.get(&run_path(&id)?).await?;
            match output {
                Output::Json => output::json(&run)?,
                Output::Text => print_run(&run),
            }
        }
        WorkflowCommand::Follow { id, output } => {
            let run: Run = api.get(&run_path(&id)?).await?;
            return follow_run(&api, &run.id, output, false).await;
        }
        WorkflowCommand::Cancel { id, wait, output } => {
            // The server refuses (409) to cancel a run that has ended.
            let mut run: Run = api.post(&format!("{}/cancel", run_path(&id)?), &()).await?;
            while wait && !run.state.is_final() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                run = api.get(&run_path(&run.id)?).await?;
            }
            match output {
                Output::Json => output::json(&run)?,
                Output::Text if wait => println!("run {} {}", run.id, run.state.as_str()),
                Output::Text => println!("cancel requested for run {}", run.id),
            }
        }
        WorkflowCommand::Cleanup { id, output } => {
            let run: Run = api
                .post(&format!("{}/workspace/remove", run_path(&id)?), &())
                .await?;
            match output {
                Output::Json => output::json(&run)?,
                Output::Text => println!("removing the workspace of run {}", run.id),
            }
        }
        WorkflowCommand::Result { id, output } => {
            let result: RunResult = api.get(&format!("{}/result", run_path(&id)?)).await?;
            match output {
                Output::Json => output::json(&result)?,
                Output::Text => {
                    println!("{:<8} {}", "state:", result.state.as_str());
                    if let Some(r) = &result.reason {
                        println!("{:<8} {r}", "reason:");
                    }
                    let rows: Vec<Vec<String>> = result
                        .outputs
                        .iter()
                        .flat_map(|(task, outs)| {
                            outs.iter()
                                .map(move |(k, v)| vec![task.clone(), k.clone(), v.clone()])
                        })
                        .collect();
                    if !rows.is_empty() {
                        println!();
                        output::table(&["TASK", "OUTPUT", "VALUE"], &rows);
                    }
                }
            }
            if result.state != RunState::Succeeded && result.state.is_final() {
                let detail = result
                    .reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                return Err(JobFailed {
                    kind: "run",
                    id: result.id,
                    state: result.state.as_str(),
                    detail,
                }
                .into());
            }
        }
        WorkflowCommand::Artifacts {
            id,
            download,
            output,
        } => {
            let list: Vec<Artifact> = api.get(&format!("{}/artifacts", run_path(&id)?)).await?;
            if let Some(dir) = download {
                // Every destination is checked before anything is written.
                let dests = list
                    .iter()
                    .map(|a| download_dest(&dir, a))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                for (a, dest) in list.iter().zip(&dests) {
                    download_artifact(&api, a, dest).await?;
                    eprintln!("saved {} ({} bytes, sha256 ok)", dest.display(), a.size);
                }
            }
            match output {
                Output::Json => output::json(&list)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|a| {
                            vec![
                                a.id.clone(),
                                a.task.clone().unwrap_or_default(),
                                a.path.clone(),
                                a.size.to_string(),
                                a.sha256.clone(),
                            ]
                        })
                        .collect();
                    output::table(&["ARTIFACT", "TASK", "PATH", "BYTES", "SHA256"], &rows);
                }
            }
        }
    }
    Ok(())
}

/// Where `--download` saves an artifact: `DIR/<task>/<path>` (`job` for
/// one of a job outside a run's tasks). Every part taken from the
/// server's answer is checked — the task is one plain name, the path is
/// relative without `..`, the id (which goes into a URL) is plain — so
/// nothing is written outside `DIR` and nothing else is fetched, whatever
/// the server sends.
fn download_dest(dir: &std::path::Path, a: &Artifact) -> anyhow::Result<PathBuf> {
    let task = a.task.as_deref().unwrap_or("job");
    if !plain_name(task) {
        bail!(
            "the server named an artifact's task '{}', which is not a plain name; nothing was downloaded",
            task.escape_debug()
        );
    }
    if !drover_proto::workflows::valid_artifact_path(&a.path) {
        bail!(
            "the server named an artifact '{}', which is not a plain relative path; nothing was downloaded",
            a.path.escape_debug()
        );
    }
    let id_ok = (1..=128).contains(&a.id.len())
        && a.id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        bail!(
            "the server named an artifact by the id '{}', which is not a plain id; nothing was downloaded",
            a.id.escape_debug()
        );
    }
    Ok(dir.join(task).join(&a.path))
}

/// One path segment that names a child, never the dir itself, its parent
/// or a path of its own.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

/// Streams one artifact to `dest` (through a temp file), checking its
/// sha256 against the server's before the file takes its name.
async fn download_artifact(api: &Api, a: &Artifact, dest: &std::path::Path) -> anyhow::Result<()> {
    use sha2::Digest;
    let parent = dest
        .parent()
        .context("artifact destination has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut resp = api.open(&format!("/artifacts/{}", a.id), &[]).await?;
    let announced = resp
        .headers()
        .get(SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(&a.sha256)
        .to_owned();
    let mut tmp = tempfile::NamedTempFile::new_in(parent)?;
    let mut hasher = sha2::Sha256::new();
    while let Some(chunk) = resp.chunk().await.context("downloading an artifact")? {
        hasher.update(&chunk);
        tmp.write_all(&chunk)?;
    }
    let got = hex::encode(hasher.finalize());
    if got != announced {
        bail!(
            "artifact {}: sha256 is {got}, the server says {announced}",
            a.path
        );
    }
    tmp.persist(dest)
        .with_context(|| format!("saving {}", dest.display()))?;
    Ok(())
}

fn print_run(run: &Run) {
    let row = |k: &str, v: String| output::row(10, k, &v);
    row("run", run.id.clone());
    row("workflow", run.workflow.clone());
    row("state", run.state.as_str().to_owned());
    if let Some(r) = &run.reason {
        row("reason", r.clone());
    }
    if !run.inputs.is_empty() {
        row(
            "inputs",
            serde_json::to_string(&run.inputs).unwrap_or_default(),
        );
    }
    row(
        "created",
        format!("{} by {}", run.created_at.to_rfc3339(), run.created_by),
    );
    if let Some(t) = run.finished_at {
        row("finished", t.to_rfc3339());
    }
    if let Some(ws) = &run.workspace {
        let mut text = ws.state.as_str().to_owned();
        if let Some(a) = &ws.agent_id {
            text.push_str(&format!(" on agent {}", a.get(..13).unwrap_or(a)));
        }
        if let Some(s) = &ws.sandbox {
            text.push_str(&format!(", sandbox {s}"));
        }
        if let Some(r) = &ws.reason {
            text.push_str(&format!(" ({r})"));
        }
        row("workspace", text);
    }
    println!();
    // The column is there only when some task has a description; a
    // table cell holds its first line (`-o json` has all of it).
    let described = run.tasks.iter().any(|t| !t.description.trim().is_empty());
    let rows: Vec<Vec<String>> = run
        .tasks
        .iter()
        .map(|t| {
            let mut row = vec![
                t.id.clone(),
                t.state.as_str().to_owned(),
                t.action.clone(),
                t.job_id
                    .as_deref()
                    .map(|j| j.get(..13).unwrap_or(j).to_owned())
                    .unwrap_or_else(|| "-".to_owned()),
                if t.optional { "yes" } else { "" }.to_owned(),
            ];
            if described {
                let first = t.description.trim().lines().next().unwrap_or_default();
                row.push(first.trim_end().to_owned());
            }
            row.push(t.reason.clone().unwrap_or_default());
            row
        })
        .collect();
    let mut headers = vec!["TASK", "STATE", "ACTION", "JOB", "OPTIONAL"];
    if described {
        headers.push("DESCRIPTION");
    }
    headers.push("REASON");
    output::table(&headers, &rows);
}

/// Prints a run's events as they come, reconnecting with the last event
/// id when the stream breaks, until the run ends; then its task table
/// (with `-o json`: one JSON event per line, the last an `end` event).
/// Ctrl-C leaves the run going (or cancels it, `cancel_on_interrupt`).
pub async fn follow_run(
    api: &Api,
    run_id: &str,
    output: Output,
    cancel_on_interrupt: bool,
) -> anyhow::Result<()> {
    let followed = follow_events(api, run_id, output);
    if follow::until_interrupted(followed).await?.is_none() {
        let cancel_path = format!("{}/cancel", run_path(run_id)?);
        let what = follow::Interrupted {
            kind: "run",
            id: run_id,
            cancel_command: &format!("drover workflow cancel {run_id}"),
            cancel_path: cancel_on_interrupt.then_some(cancel_path.as_str()),
        };
        follow::exit_interrupted(api, what, output).await
    }
    let run: Run = api.get(&run_path(run_id)?).await?;
    match output {
        Output::Json => output::event(&serde_json::json!({
            "event": "end",
            "run": run.id,
            "state": run.state.as_str(),
            "reason": run.reason,
            "tasks": run.tasks.iter().map(|t| serde_json::json!({
                "task": t.id,
                "state": t.state.as_str(),
                "job": t.job_id,
                "reason": t.reason,
            })).collect::<Vec<_>>(),
        }))?,
        Output::Text => {
            println!();
            print_run(&run);
        }
    }
    if run.state != RunState::Succeeded {
        let detail = run_failure_detail(&run);
        return Err(JobFailed {
            kind: "run",
            id: run.id,
            state: run.state.as_str(),
            detail,
        }
        .into());
    }
    Ok(())
}

/// What the error of a run that did not succeed says after its state: the
/// required tasks that failed (and how), else the run's reason.
fn run_failure_detail(run: &Run) -> String {
    let failed: Vec<String> = run
        .tasks
        .iter()
        .filter(|t| {
            !t.optional
                && matches!(
                    t.state,
                    TaskState::Failed | TaskState::TimedOut | TaskState::Cancelled
                )
        })
        .map(|t| match &t.reason {
            Some(r) => format!("task {} {} ({r})", t.id, t.state.as_str()),
            None => format!("task {} {}", t.id, t.state.as_str()),
        })
        .collect();
    if !failed.is_empty() {
        return format!(": {}", failed.join("; "));
    }
    run.reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}

/// The event loop of [`follow_run`]; returns when the run has ended.
async fn follow_events(api: &Api, run_id: &str, output: Output) -> anyhow::Result<()> {
    let path = format!("{}/events", run_path(run_id)?);
    let mut last: i64 = 0;
    let mut failures = 0u32;
    let mut ended: Option<RunState> = None;
    while ended.is_none() {
        let headers = [("last-event-id", last.to_string())];
        let mut resp = match api.open(&path, &headers).await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                if failures > 60 {
                    return Err(e.context("the event stream stayed unavailable"));
                }
                eprintln!("event stream unavailable ({e:#}); retrying");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(failures.min(10)))).await;
                continue;
            }
        };
        failures = 0;
        let mut buf = String::new();
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("event stream broke ({e}); resuming after event {last}");
                    break;
                }
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                if let Some(ev) = parse_sse(&block) {
                    last = ev.id;
                    match output {
                        Output::Json => event_json(&ev)?,
                        Output::Text => print_event(&ev),
                    }
                    if ev.ends_run() {
                        ended = ev.state.as_deref().and_then(RunState::parse);
                    }
                }
            }
        }
        if ended.is_none() {
            // The server closed the stream: the run may have ended while
            // we were away, or the server restarted.
            if let Ok(run) = api.get::<Run>(&run_path(run_id)?).await {
                if run.state.is_final() {
                    // Read the rest of the events before leaving.
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    Ok(())
}

/// One event of a run as JSON lines: a log event gives one `output` event
/// per line; the others keep their kind (`task`, `run`, `workspace`).
fn event_json(ev: &RunEvent) -> anyhow::Result<()> {
    if ev.kind == "log" {
        for line in ev.message.as_deref().unwrap_or("").lines() {
            output::event(&serde_json::json!({
                "event": "output",
                "run": ev.run_id,
                "at": ev.at,
                "task": ev.task,
                "stream": ev.stream.as_deref().unwrap_or("stdout"),
                "line": line,
            }))?;
        }
        return Ok(());
    }
    output::event(&serde_json::json!({
        "event": ev.kind,
        "run": ev.run_id,
        "at": ev.at,
        "task": ev.task,
        "state": ev.state,
        "message": ev.message,
    }))
}

/// One server-sent event block into a `RunEvent` (comments and keep-alives
/// give `None`).
fn parse_sse(block: &str) -> Option<RunEvent> {
    let data: Vec<&str> = block
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return None;
    }
    serde_json::from_str(&data.join("\n")).ok()
}

fn print_event(ev: &RunEvent) {
    let at = ev.at.format("%H:%M:%S");
    let mut out = std::io::stdout().lock();
    let _ = match ev.kind.as_str() {
        "log" => {
            // Output of no task is the workspace's (its git checkout).
            let task = ev.task.as_deref().unwrap_or("workspace");
            let text = ev.message.as_deref().unwrap_or("");
            let mut r = Ok(());
            for line in text.lines() {
                r = writeln!(out, "{at} [{task}] {line}");
            }
            r
        }
        "task" => writeln!(
            out,
            "{at} task {:<16} {:<10} {}",
            ev.task.as_deref().unwrap_or("?"),
            ev.state.as_deref().unwrap_or(""),
            ev.message.as_deref().unwrap_or("")
        ),
        "workspace" => writeln!(
            out,
            "{at} workspace {:<11} {:<10} {}",
            "",
            ev.state.as_deref().unwrap_or(""),
            ev.message.as_deref().unwrap_or("")
        ),
        _ => writeln!(
            out,
            "{at} run  {:<16} {:<10} {}",
            "",
            ev.state.as_deref().unwrap_or(""),
            ev.message.as_deref().unwrap_or("")
        ),
    };
}

pub async fn webhooks(target: &Target, cmd: WebhooksCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        WebhooksCommand::Add {
            url,
            secret,
            events,
            output,
        } => {
            let events = events
                .iter()
                .map(|e| match e.as_str() {
                    "completed" => Ok(WebhookEvent::Completed),
                    "failed" => Ok(WebhookEvent::Failed),
                    other => bail!("unknown event '{other}': completed or failed"),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let hook: Webhook = api
                .post(
                    "/webhooks",
                    &CreateWebhookRequest {
                        url,
                        secret,
                        events,
                    },
                )
                .await?;
            match output {
                Output::Json => output::json(&hook)?,
                Output::Text => println!("{}", hook.id),
            }
        }
        WebhooksCommand::List { output } => {
            let hooks: Vec<Webhook> = api.get("/webhooks").await?;
            match output {
                Output::Json => output::json(&hooks)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = hooks
                        .iter()
                        .map(|h| {
                            vec![
                                h.id.clone(),
                                h.url.clone(),
                                h.events
                                    .iter()
                                    .map(|e| e.as_str())
                                    .collect::<Vec<_>>()
                                    .join(","),
                                h.created_by.clone(),
                            ]
                        })
                        .collect();
                    output::table(&["WEBHOOK", "URL", "EVENTS", "BY"], &rows);
                }
            }
        }
        WebhooksCommand::Rm { id } => {
            if !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                bail!("'{id}' is not a webhook id");
            }
            api.delete(&format!("/webhooks/{id}")).await?;
            println!("removed webhook {id}");
        }
        WebhooksCommand::Deliveries { run, limit, output } => {
            let mut path = format!("/webhooks/deliveries?limit={limit}");
            if let Some(r) = run {
                run_path(&r)?;
                path.push_str(&format!("&run={r}"));
            }
            let list: Vec<WebhookDelivery> = api.get(&path).await?;
            match output {
                Output::Json => output::json(&list)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|d| {
                            let last = d.history.last();
                            vec![
                                d.id.clone(),
                                d.run_id.get(..13).unwrap_or(&d.run_id).to_owned(),
                                d.event.as_str().to_owned(),
                                d.url.clone(),
                                d.state.clone(),
                                d.attempts.to_string(),
                                last.and_then(|a| a.status)
                                    .map(|s| s.to_string())
                                    .or_else(|| last.and_then(|a| a.error.clone()))
                                    .unwrap_or_default(),
                            ]
                        })
                        .collect();
                    output::table(
                        &[
                            "DELIVERY", "RUN", "EVENT", "URL", "STATE", "ATTEMPTS", "LAST",
                        ],
                        &rows,
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn download_destinations_stay_in_the_dir() {
        let artifact = |task: Option<&str>, path: &str, id: &str| Artifact {
            id: id.to_owned(),
            run_id: Some("r".to_owned()),
            task: task.map(str::to_owned),
            job_id: "j".to_owned(),
            attempt_id: "a".to_owned(),
            path: path.to_owned(),
            size: 1,
            sha256: String::new(),
            created_at: chrono::Utc::now(),
        };
        let dir = std::path::Path::new("/dl");
        // (task, path, id, the destination or the start of the error)
        let cases = [
            (
                Some("build"),
                "out/a.txt",
                "0192-ab_c",
                Ok("/dl/build/out/a.txt"),
            ),
            (None, "a.txt", "x", Ok("/dl/job/a.txt")),
            (
                Some("../../x"),
                "a.txt",
                "x",
                Err("the server named an artifact's task '../../x'"),
            ),
            (
                Some("/etc"),
                "a.txt",
                "x",
                Err("the server named an artifact's task '/etc'"),
            ),
            (
                Some(".."),
                "a.txt",
                "x",
                Err("the server named an artifact's task '..'"),
            ),
            (
                Some("."),
                "a.txt",
                "x",
                Err("the server named an artifact's task '.'"),
            ),
            (
                Some(""),
                "a.txt",
                "x",
                Err("the server named an artifact's task ''"),
            ),
            (
                Some("a\\b"),
                "a.txt",
                "x",
                Err("the server named an artifact's task 'a\\\\b'"),
            ),
            (
                Some("a\nb"),
                "a.txt",
                "x",
                Err("the server named an artifact's task 'a\\nb'"),
            ),
            (
                Some("t"),
                "../a.txt",
                "x",
                Err("the server named an artifact '../a.txt'"),
            ),
            (
                Some("t"),
                "/etc/passwd",
                "x",
                Err("the server named an artifact '/etc/passwd'"),
            ),
            (
                Some("t"),
                "a.txt",
                "../../api/v1/x",
                Err("the server named an artifact by the id '../../api/v1/x'"),
            ),
            (
                Some("t"),
                "a.txt",
                "",
                Err("the server named an artifact by the id ''"),
            ),
        ];
        for (task, path, id, want) in cases {
            let got = download_dest(dir, &artifact(task, path, id));
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, PathBuf::from(want), "{task:?} {path}"),
                (Err(e), Err(want)) => {
                    let e = e.to_string();
                    assert!(e.starts_with(want), "{task:?} {path} {id}: {e}");
                    assert!(e.ends_with("nothing was downloaded"), "{e}");
                }
                (got, want) => panic!("{task:?} {path} {id}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn sse_blocks_parse_into_events() {
        let block = "id: 7\nevent: task\ndata: {\"id\":7,\"run_id\":\"r\",\"at\":\"2026-11-22T10:00:00Z\",\"kind\":\"task\",\"task\":\"a\",\"state\":\"running\",\"message\":null,\"stream\":null}\n\n";
        let ev = parse_sse(block).expect("an event");
        assert_eq!((ev.id, ev.task.as_deref()), (7, Some("a")));
        assert!(parse_sse(": keep-alive\n\n").is_none());
        assert!(parse_inputs(&["a=1".into(), "a=2".into()]).is_err());
        assert_eq!(parse_inputs(&["x=a=b".into()]).expect("ok")["x"], "a=b");
    }
}
