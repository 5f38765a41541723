//! `drover actions`, `drover run`, `drover jobs` and `drover audit`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use chrono::Utc;
use drover_proto::jobs::{
    Action, ActionCatalog, ApplyActionsResponse, AuditEntry, Job, JobState, LogPage, Stream,
    SubmitJobRequest,
};

use crate::client::Api;
use crate::ops::Target;
use crate::output::{self, Output};

pub mod follow;

/// Exit status of `drover run --wait/--follow` when the job did not succeed.
pub const EXIT_JOB_FAILED: u8 = 4;

/// The job (or workflow run) ended but not in success; main turns this
/// into exit status 4.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {id} ended {state}{detail}")]
pub struct JobFailed {
    /// `job` or `run`.
    pub kind: &'static str,
    pub id: String,
    pub state: &'static str,
    pub detail: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum ActionsCommand {
    /// Create or replace the actions of a YAML catalog file.
    Apply {
        /// The catalog file (YAML): actions and sandbox profiles.
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List the catalog.
    List {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show one action: its argv, parameters, limits and sandbox.
    Show {
        /// The action's name (see drover actions list).
        name: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove an action. Jobs made from it go on (they keep what they
    /// run); a run not yet ended that uses it keeps it.
    Rm {
        /// The action's name.
        name: String,
    },
}

fn print_action(a: &Action) -> anyhow::Result<()> {
    let row = |k: &str, v: String| output::row(14, k, &v);
    let spec = &a.spec;
    row("name", spec.name.clone());
    if !spec.description.is_empty() {
        row("description", spec.description.clone());
    }
    row("argv", serde_json::to_string(&spec.argv)?);
    for (name, p) in &spec.params {
        row(&format!("param {name}"), serde_json::to_string(p)?);
    }
    for (k, v) in &spec.env {
        row(&format!("env {k}"), v.clone());
    }
    row(
        "timeout",
        humantime::format_duration(spec.timeout).to_string(),
    );
    row(
        "kill grace",
        humantime::format_duration(spec.kill_grace).to_string(),
    );
    row("retries", serde_json::to_string(&spec.retries)?);
    row(
        "sandbox",
        spec.sandbox
            .clone()
            .unwrap_or_else(|| drover_proto::sandbox::PROCESS.to_owned()),
    );
    row("hash", a.hash.clone());
    row("updated", a.updated_at.to_rfc3339());
    Ok(())
}

pub async fn actions(target: &Target, cmd: ActionsCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        ActionsCommand::Apply { file, output } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let catalog: ActionCatalog =
                drover_proto::yaml::from_str(&text, &file.display().to_string())?;
            let resp: ApplyActionsResponse = api.post("/actions", &catalog).await?;
            match output {
                Output::Json => output::json(&resp)?,
                Output::Text => {
                    for (what, names) in [
                        ("created", &resp.sandboxes.created),
                        ("updated", &resp.sandboxes.updated),
                        ("unchanged", &resp.sandboxes.unchanged),
                    ] {
                        for n in names {
                            println!("{what}\tsandbox {n}");
                        }
                    }
                    for (what, names) in [
                        ("created", &resp.created),
                        ("updated", &resp.updated),
                        ("unchanged", &resp.unchanged),
                    ] {
                        for n in names {
                            println!("{what}\t{n}");
                        }
                    }
                }
            }
        }
        ActionsCommand::Show { name, output } => {
            let a: Action = api
                .get(&format!("/actions/{}", crate::client::segment(&name)?))
                .await?;
            match output {
                Output::Json => output::json(&a)?,
                Output::Text => print_action(&a)?,
            }
        }
        ActionsCommand::Rm { name } => {
            api.delete(&format!("/actions/{}", crate::client::segment(&name)?))
                .await?;
            println!("removed action {name}");
        }
        ActionsCommand::List { output } => {
            let actions: Vec<Action> = api.get("/actions").await?;
            match output {
                Output::Json => output::json(&actions)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = actions
                        .iter()
                        .map(|a| {
                            vec![
                                a.spec.name.clone(),
                                a.spec.params.keys().cloned().collect::<Vec<_>>().join(","),
                                humantime::format_duration(a.spec.timeout).to_string(),
                                a.spec
                                    .sandbox
                                    .clone()
                                    .unwrap_or_else(|| drover_proto::sandbox::PROCESS.to_owned()),
                                a.hash[..12].to_owned(),
                                a.spec.description.clone(),
                            ]
                        })
                        .collect();
                    output::table(
                        &[
                            "NAME",
                            "PARAMS",
                            "TIMEOUT",
                            "SANDBOX",
                            "HASH",
                            "DESCRIPTION",
                        ],
                        &rows,
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The action to run (see drover actions list).
    action: String,
    /// Which agents: an agent id, * for every agent, or terms joined by
    /// commas, all of which must hold: role=web, os=Debian*, env!=prod,
    /// 'role in (web,api)', group:NAME, … (docs/SELECTORS.md; preview with
    /// drover agents list --target).
    #[arg(long)]
    target: String,
    /// A parameter (repeatable): --param message='hello'.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Overrides the action's timeout, e.g. 30s, 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Overrides the action's number of retries.
    #[arg(long)]
    retries: Option<u32>,
    /// Run in this sandbox profile instead of the action's (see drover
    /// sandboxes list).
    #[arg(long)]
    sandbox: Option<String>,
    /// Wait for the job to end; exit 4 unless it succeeded.
    #[arg(long, conflicts_with = "follow")]
    wait: bool,
    /// Stream the output live, then exit like --wait. With several agents,
    /// each line is prefixed with its agent and a per-agent summary ends
    /// it; with -o json, every line of stdout is one JSON event.
    #[arg(long)]
    follow: bool,
    /// With --follow: on Ctrl-C, cancel the job before exiting (without
    /// it, the job goes on and the command says how to cancel it).
    #[arg(long, requires = "follow")]
    cancel_on_interrupt: bool,
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub(crate) fn parse_params(
    pairs: &[String],
) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("'{p}' is not a parameter: write it as key=value"))?;
        if out
            .insert(k.to_owned(), serde_json::Value::String(v.to_owned()))
            .is_some()
        {
            bail!("parameter '{k}' is given twice");
        }
    }
    Ok(out)
}

pub async fn run(target: &Target, args: RunArgs) -> anyhow::Result<()> {
    let api = target.api()?;
    let req = SubmitJobRequest {
        action: args.action,
        target: args.target,
        params: parse_params(&args.params)?,
        timeout_secs: args.timeout.map(|d| d.as_secs().max(1)),
        retries: args.retries,
        sandbox: args.sandbox,
    };
    let job: Job = api.post("/jobs", &req).await?;
    if !args.wait && !args.follow {
        match args.output {
            Output::Json => output::json(&job)?,
            Output::Text => {
                println!("{}", job.id);
                eprintln!(
                    "job {} {} on {} agent(s); follow it with: drover jobs logs {} --follow",
                    job.id,
                    job.state.as_str(),
                    job.attempts.len(),
                    job.id
                );
            }
        }
        return Ok(());
    }
    eprintln!("job {} on {} agent(s)", job.id, job.attempts.len());
    if !args.follow {
        let job = wait_job(&api, &job.id).await?;
        if args.output == Output::Json {
            output::json(&job)?;
        } else {
            eprintln!("job {} {}", job.id, job.state.as_str());
        }
        return finish(job, &follow::Names::default());
    }
    let mut names = follow::Names::default();
    let followed = follow::follow_job(&api, &job.id, args.output, &mut names);
    let Some(ended) = follow::until_interrupted(followed).await? else {
        let cancel_path = format!("/jobs/{}/cancel", job.id);
        let what = follow::Interrupted {
            kind: "job",
            id: &job.id,
            cancel_command: &format!("drover jobs cancel {}", job.id),
            cancel_path: args.cancel_on_interrupt.then_some(cancel_path.as_str()),
        };
        follow::exit_interrupted(&api, what, args.output).await
    };
    follow::print_end(&ended, &names, args.output)?;
    finish(ended, &names)
}

/// Waits for a job to end, with long-polls.
async fn wait_job(api: &Api, id: &str) -> anyhow::Result<Job> {
    loop {
        let job: Job = api.get(&format!("/jobs/{id}?wait_ms=25000")).await?;
        if job.state.is_final() {
            return Ok(job);
        }
    }
}

/// A job that did not succeed is an error (exit 4) that says how it ended
/// (on which agents, when several ran it).
fn finish(job: Job, names: &follow::Names) -> anyhow::Result<()> {
    if job.state == JobState::Succeeded {
        return Ok(());
    }
    let detail = follow::failure_detail(&job, names);
    Err(JobFailed {
        kind: "job",
        id: job.id,
        state: job.state.as_str(),
        detail,
    }
    .into())
}

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, …).
        #[arg(long)]
        state: Option<String>,
        /// Show at most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show a job with every attempt, and why it waits if it does.
    Show {
        /// Job id or a unique prefix of it.
        id: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print a job's output; --follow streams it until the job ends.
    Logs {
        /// Job id or a unique prefix of it.
        id: String,
        /// Keep printing new output until the job ends.
        #[arg(long)]
        follow: bool,
        /// json: one JSON event per line (output lines; with --follow also
        /// state changes and the end).
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Cancel a job that has not ended (an ended one is an error).
    Cancel {
        /// Job id or a unique prefix of it.
        id: String,
        /// Wait for the job to end and print its final state.
        #[arg(long)]
        wait: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

fn job_path(id: &str) -> anyhow::Result<String> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("'{id}' is not a job id");
    }
    Ok(format!("/jobs/{id}"))
}

fn ms(d: Option<u64>) -> String {
    d.map(|d| format!("{d}ms"))
        .unwrap_or_else(|| "-".to_owned())
}

/// What `jobs show` says of a result that came after its attempt was
/// declared lost.
fn late_note(l: &drover_proto::jobs::LateResult) -> String {
    let mut s = format!(
        "result arrived after the attempt was declared lost: {}",
        l.outcome.state().as_str()
    );
    if let Some(c) = l.exit_code {
        s.push_str(&format!(", exit code {c}"));
    }
    if let Some(sig) = l.signal {
        s.push_str(&format!(", signal {sig}"));
    }
    s.push_str(" (not counted)");
    s
}

fn print_job(job: &Job) {
    let row = |k: &str, v: String| output::row(12, k, &v);
    row("id", job.id.clone());
    row("action", job.action.clone());
    row("target", job.target.clone());
    row("state", job.state.as_str().to_owned());
    if let Some(r) = &job.reason {
        row("waiting", r.clone());
    }
    if !job.params.is_empty() {
        row(
            "params",
            serde_json::to_string(&job.params).unwrap_or_default(),
        );
    }
    row(
        "created",
        format!("{} by {}", job.created_at.to_rfc3339(), job.created_by),
    );
    if let Some(t) = job.finished_at {
        row("finished", t.to_rfc3339());
    }
    row(
        "timeout",
        format!("{}s, {} retries", job.timeout_secs, job.max_retries),
    );
    row("sandbox", job.sandbox.clone());
    println!();
    let rows: Vec<Vec<String>> = job
        .attempts
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.agent_id.get(..13).unwrap_or(&a.agent_id).to_owned(),
                a.number.to_string(),
                a.state.as_str().to_owned(),
                a.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".to_owned()),
                ms(a.duration_ms),
                a.limit_exceeded
                    .map(|l| l.as_str().to_owned())
                    .unwrap_or_else(|| "-".to_owned()),
                {
                    let reason = a.reason.clone().or_else(|| a.error.clone());
                    match (&a.late_result, reason) {
                        (Some(l), Some(r)) => format!("{r}; {}", late_note(l)),
                        (Some(l), None) => late_note(l),
                        (None, r) => r.unwrap_or_default(),
                    }
                },
            ]
        })
        .collect();
    output::table(
        &[
            "ATTEMPT", "AGENT", "#", "STATE", "EXIT", "DURATION", "LIMIT", "REASON",
        ],
        &rows,
    );
}

#[derive(Debug, clap::Subcommand)]
pub enum SandboxesCommand {
    /// List sandbox profiles, the built-in `process` first.
    List {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove a sandbox profile; refused while an action names it.
    Rm {
        /// The profile's name.
        name: String,
    },
}

pub async fn sandboxes(target: &Target, cmd: SandboxesCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    let output = match cmd {
        SandboxesCommand::List { output } => output,
        SandboxesCommand::Rm { name } => {
            api.delete(&format!("/sandboxes/{}", crate::client::segment(&name)?))
                .await?;
            println!("removed sandbox {name}");
            return Ok(());
        }
    };
    let list: Vec<drover_proto::sandbox::SandboxEntry> = api.get("/sandboxes").await?;
    match output {
        Output::Json => output::json(&list)?,
        Output::Text => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|e| {
                    vec![
                        e.profile.name().to_owned(),
                        e.profile.kind().to_owned(),
                        e.profile.summary(),
                        e.hash[..12].to_owned(),
                    ]
                })
                .collect();
            output::table(&["NAME", "KIND", "LIMITS", "HASH"], &rows);
        }
    }
    Ok(())
}

pub async fn jobs(target: &Target, cmd: JobsCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        JobsCommand::List {
            state,
            limit,
            output,
        } => {
            let mut path = format!("/jobs?limit={limit}");
            if let Some(s) = state {
                if JobState::parse(&s).is_none() {
                    bail!("unknown state '{s}'");
                }
                path.push_str(&format!("&state={s}"));
            }
            let jobs: Vec<Job> = api.get(&path).await?;
            match output {
                Output::Json => output::json(&jobs)?,
                Output::Text => {
                    let now = Utc::now();
                    let rows: Vec<Vec<String>> = jobs
                        .iter()
                        .map(|j| {
                            vec![
                                j.id.clone(),
                                j.action.clone(),
                                j.target.clone(),
                                j.state.as_str().to_owned(),
                                output::ago(Some(j.created_at), now),
                                j.created_by.clone(),
                            ]
                        })
                        .collect();
                    output::table(&["ID", "ACTION", "TARGET", "STATE", "CREATED", "BY"], &rows);
                }
            }
        }
        JobsCommand::Show { id, output } => {
            let job: Job = api.get(&job_path(&id)?).await?;
            match output {
                Output::Json => output::json(&job)?,
                Output::Text => print_job(&job),
            }
        }
        JobsCommand::Logs { id, follow, output } => {
            job_path(&id)?;
            if follow {
                let mut names = follow::Names::default();
                let followed = follow::follow_job(&api, &id, output, &mut names);
                let Some(job) = follow::until_interrupted(followed).await? else {
                    let what = follow::Interrupted {
                        kind: "job",
                        id: &id,
                        cancel_command: &format!("drover jobs cancel {id}"),
                        cancel_path: None,
                    };
                    follow::exit_interrupted(&api, what, output).await
                };
                follow::print_end(&job, &names, output)?;
            } else if let Some(job) = Some(api.get::<Job>(&job_path(&id)?).await?)
                .filter(|j| output == Output::Json || follow::several_agents(j))
            {
                follow::print_logs(&api, &job, output).await?;
            } else {
                let mut after = 0;
                loop {
                    let page: LogPage = api
                        .get(&format!("/jobs/{id}/logs?after={after}&limit=5000"))
                        .await?;
                    for chunk in &page.chunks {
                        match chunk.stream {
                            Stream::Stdout => print!("{}", chunk.data),
                            Stream::Stderr => eprint!("{}", chunk.data),
                        }
                    }
                    if page.chunks.is_empty() {
                        break;
                    }
                    after = page.next;
                }
            }
        }
        JobsCommand::Cancel { id, wait, output } => {
            // The server refuses (409) to cancel a job that has ended.
            let mut job: Job = api
                .post(
                    &format!("{}/cancel", job_path(&id)?),
                    &serde_json::json!({}),
                )
                .await?;
            if wait {
                job = wait_job(&api, &job.id).await?;
            }
            match output {
                Output::Json => output::json(&job)?,
                Output::Text if wait => println!("job {} {}", job.id, job.state.as_str()),
                Output::Text => println!("cancel requested for job {}", job.id),
            }
        }
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// List audit entries, newest first.
    List {
        /// Only entries of this user (the name a login tried, for logins).
        #[arg(long, value_name = "USER")]
        actor: Option<String>,
        /// Only entries whose action or request contains this text, e.g.
        /// job.cancel, revoke or /api/v1/jobs.
        #[arg(long, value_name = "TEXT")]
        action: Option<String>,
        /// Only entries on this target or targets starting with it, e.g.
        /// job:01J8 (an id prefix), agent: or user:alice.
        #[arg(long, value_name = "KIND:ID")]
        target: Option<String>,
        /// Only entries at or after this time (RFC 3339), or this long ago (e.g. 1h).
        #[arg(long)]
        since: Option<String>,
        /// At most this many entries, newest first (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Check the audit log's hash chain: OK with the number of rows, or
    /// the first row that was edited, inserted or deleted (exit status 5).
    Verify {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Export audit rows with their hashes, oldest first, so that anyone
    /// can re-verify them (docs/SECURITY.md has the encoding).
    Export {
        /// Only rows at or after this time (RFC 3339), or this long ago (e.g. 24h).
        #[arg(long)]
        since: Option<String>,
        /// Only jsonl: one JSON object per line.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
        /// Write to this file instead of stdout (replaced only once the
        /// export is complete).
        #[arg(long = "out", short = 'o', value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `--since`: an RFC 3339 time or a duration ago (e.g. 1h).
fn parse_since(s: &str) -> anyhow::Result<chrono::DateTime<Utc>> {
    Ok(match humantime::parse_duration(s) {
        Ok(d) => Utc::now() - chrono::Duration::from_std(d).context("--since is too long")?,
        Err(_) => chrono::DateTime::parse_from_rfc3339(s)
            .with_context(|| {
                format!("--since '{s}' is neither a duration (1h) nor an RFC 3339 time")
            })?
            .with_timezone(&Utc),
    })
}

/// Percent-encodes a query value.
pub(crate) fn q(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub async fn audit(target: &Target, cmd: AuditCommand) -> anyhow::Result<()> {
    let (actor, action, audit_target, since, limit, output) = match cmd {
        AuditCommand::List {
            actor,
            action,
            target,
            since,
            limit,
            output,
        } => (actor, action, target, since, limit, output),
        AuditCommand::Verify { output } => return crate::audit::verify(target, output).await,
        AuditCommand::Export { since, format, out } => {
            let since = since.as_deref().map(parse_since).transpose()?;
            return crate::audit::export(target, since, &format, out.as_deref()).await;
        }
    };
    let api = target.api()?;
    let mut path = format!("/audit?limit={limit}");
    if let Some(a) = actor {
        path.push_str(&format!("&actor={}", q(&a)));
    }
    if let Some(a) = action {
        path.push_str(&format!("&action={}", q(&a)));
    }
    if let Some(t) = audit_target {
        path.push_str(&format!("&target={}", q(&t)));
    }
    if let Some(s) = since {
        let at = parse_since(&s)?;
        path.push_str(&format!("&since={}", q(&at.to_rfc3339())));
    }
    let entries: Vec<AuditEntry> = api.get(&path).await?;
    match output {
        Output::Json => output::json(&entries)?,
        Output::Text => {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    let detail: Vec<String> =
                        e.detail.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        e.actor.clone(),
                        e.source.clone().unwrap_or_else(|| "-".to_owned()),
                        e.action.clone(),
                        e.target.clone(),
                        format!("{} {}", e.status, e.outcome),
                        detail.join(" "),
                    ]
                })
                .collect();
            output::table(
                &[
                    "AT", "ACTOR", "FROM", "ACTION", "TARGET", "OUTCOME", "DETAIL",
                ],
                &rows,
            );
        }
    }
    Ok(())
}
