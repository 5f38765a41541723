//! `drover schedules`: server-side schedules that start an action or a
//! workflow on a cron clock (`add` creates or replaces one), list, show
//! with recent slots, pause, resume, rm.

use std::path::PathBuf;

use anyhow::{bail, Context};
use drover_proto::jobs::SubmitJobRequest;
use drover_proto::schedules::{Missed, Overlap, PutScheduleRequest, Schedule, ScheduleDetail};
use drover_proto::scripts::is_script_name;
use drover_proto::workflows::SubmitRunRequest;
use reqwest::Method;

use crate::ops::Target;
use crate::output::{self, Output};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OverlapArg {
    /// Record the slot as skipped while the previous job or run goes on.
    Skip,
    /// Start anyway.
    Queue,
    /// Cancel the previous one, then start.
    Cancel,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MissedArg {
    /// Forget slots passed while no server ran.
    Skip,
    /// Fire once for all of them, then go on.
    RunOnce,
}

#[derive(Debug, clap::Subcommand)]
pub enum SchedulesCommand {
    /// Create schedule NAME, or replace the one of that name: an action on
    /// a target (--action, --target, --param) or a workflow (--workflow,
    /// --input), started by the server at each slot of --cron, as you.
    Add {
        /// The schedule's name: a letter, then letters, digits, '-' and '_'.
        name: String,
        /// Cron expression: five fields (minute hour day month weekday),
        /// e.g. '*/5 * * * *', or six with seconds first.
        #[arg(long)]
        cron: String,
        /// Time zone the cron expression is read in, e.g. Europe/Paris
        /// [default: UTC].
        #[arg(long)]
        timezone: Option<String>,
        /// The action to run at each slot (see drover actions list).
        #[arg(
            long,
            conflicts_with = "workflow",
            required_unless_present = "workflow"
        )]
        action: Option<String>,
        /// Which agents the action runs on (like drover run --target).
        #[arg(long, requires = "action")]
        target: Option<String>,
        /// An action parameter (repeatable): --param message='hello'.
        #[arg(long = "param", value_name = "KEY=VALUE", requires = "action")]
        params: Vec<String>,
        /// A workflow definition file to start a run of at each slot.
        #[arg(long, value_name = "FILE")]
        workflow: Option<PathBuf>,
        /// A workflow input (repeatable): --input version=1.2.
        #[arg(long = "input", value_name = "NAME=VALUE", requires = "workflow")]
        inputs: Vec<String>,
        /// What a slot does while the previous job or run has not ended.
        #[arg(long, value_enum, default_value = "skip")]
        overlap: OverlapArg,
        /// What to do with the slots passed while no server ran.
        #[arg(long, value_enum, default_value = "skip")]
        missed: MissedArg,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Every schedule.
    List {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// A schedule and its recent slots, with what each started.
    Show {
        /// The schedule's name.
        name: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Stop firing a schedule until it is resumed.
    Pause {
        /// The schedule's name.
        name: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Fire a paused schedule again, from its next slot on.
    Resume {
        /// The schedule's name.
        name: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove a schedule (what it started stays).
    Rm {
        /// The schedule's name.
        name: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if !is_script_name(name) {
        bail!(
            "schedule name '{}' is invalid: a letter, then letters, digits, '-' and '_', at most 64",
            name.escape_debug()
        );
    }
    Ok(())
}

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

fn what(s: &Schedule) -> String {
    match (&s.action, &s.workflow) {
        (Some(a), _) => format!("action {} on {}", a.action, a.target),
        (_, Some(w)) => format!("workflow {}", w.source.as_deref().unwrap_or("definition")),
        _ => s.kind.clone(),
    }
}

fn print_one(s: &Schedule, verb: &str) {
    let verb = if verb.is_empty() {
        String::new()
    } else {
        format!("{verb} ")
    };
    println!(
        "{verb}schedule {} ({}, cron '{}' {}, next {})",
        s.name,
        what(s),
        s.cron,
        s.timezone,
        if s.paused {
            "paused".to_owned()
        } else {
            time(s.next_slot)
        }
    );
}

pub async fn schedules(target: &Target, cmd: SchedulesCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        SchedulesCommand::Add {
            name,
            cron,
            timezone,
            action,
            target,
            params,
            workflow,
            inputs,
            overlap,
            missed,
            output,
        } => {
            check_name(&name)?;
            let (action, workflow) = match (action, workflow) {
                (Some(action), None) => {
                    let Some(target) = target else {
                        bail!("--action needs --target (which agents it runs on)");
                    };
                    let req = SubmitJobRequest {
                        action,
                        target,
                        params: crate::jobs::parse_params(&params)?,
                        ..SubmitJobRequest::default()
                    };
                    (Some(req), None)
                }
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let req = SubmitRunRequest {
                        definition: serde_json::Value::String(text),
                        source: Some(file.display().to_string()),
                        inputs: crate::workflow::parse_inputs(&inputs)?,
                    };
                    (None, Some(req))
                }
                _ => bail!("give either --action (with --target) or --workflow"),
            };
            let req = PutScheduleRequest {
                name,
                cron,
                timezone,
                overlap: match overlap {
                    OverlapArg::Skip => Overlap::Skip,
                    OverlapArg::Queue => Overlap::Queue,
                    OverlapArg::Cancel => Overlap::Cancel,
                },
                missed: match missed {
                    MissedArg::Skip => Missed::Skip,
                    MissedArg::RunOnce => Missed::RunOnce,
                },
                action,
                workflow,
            };
            let saved: Schedule = api.post("/schedules", &req).await?;
            match output {
                Output::Json => output::json(&saved)?,
                Output::Text => print_one(&saved, "saved"),
            }
        }
        SchedulesCommand::List { output } => {
            let list: Vec<Schedule> = api.get("/schedules").await?;
            match output {
                Output::Json => output::json(&list)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                format!("{} ({})", s.cron, s.timezone),
                                what(s),
                                if s.paused {
                                    "paused".to_owned()
                                } else {
                                    time(s.next_slot)
                                },
                                s.overlap.as_str().to_owned(),
                                s.missed.as_str().to_owned(),
                                s.created_by.clone(),
                            ]
                        })
                        .collect();
                    output::table(
                        &[
                            "SCHEDULE", "CRON", "STARTS", "NEXT", "OVERLAP", "MISSED", "BY",
                        ],
                        &rows,
                    );
                }
            }
        }
        SchedulesCommand::Show { name, output } => {
            check_name(&name)?;
            let detail: ScheduleDetail = api.get(&format!("/schedules/{name}")).await?;
            match output {
                Output::Json => output::json(&detail)?,
                Output::Text => {
                    let s = &detail.schedule;
                    print_one(s, "");
                    println!(
                        "overlap {}, missed {}, by {}",
                        s.overlap.as_str(),
                        s.missed.as_str(),
                        s.created_by
                    );
                    let rows: Vec<Vec<String>> = detail
                        .slots
                        .iter()
                        .map(|r| {
                            vec![
                                time(Some(r.slot_at)),
                                r.outcome.clone(),
                                r.target.clone().unwrap_or_else(|| "-".to_owned()),
                                r.state.clone().unwrap_or_else(|| "-".to_owned()),
                                if r.missed > 0 {
                                    format!("catch-up for {} missed; {}", r.missed, r.detail)
                                } else {
                                    r.detail.clone()
                                },
                            ]
                        })
                        .collect();
                    output::table(&["SLOT", "OUTCOME", "STARTED", "STATE", "DETAIL"], &rows);
                }
            }
        }
        SchedulesCommand::Pause { name, output } => {
            check_name(&name)?;
            let s: Schedule = api
                .post(&format!("/schedules/{name}/pause"), &serde_json::json!({}))
                .await?;
            match output {
                Output::Json => output::json(&s)?,
                Output::Text => println!("paused schedule {}", s.name),
            }
        }
        SchedulesCommand::Resume { name, output } => {
            check_name(&name)?;
            let s: Schedule = api
                .post(&format!("/schedules/{name}/resume"), &serde_json::json!({}))
                .await?;
            match output {
                Output::Json => output::json(&s)?,
                Output::Text => print_one(&s, "resumed"),
            }
        }
        SchedulesCommand::Rm { name, output } => {
            check_name(&name)?;
            let removed: Schedule = api
                .call::<(), Schedule>(Method::DELETE, &format!("/schedules/{name}"), None, true)
                .await?;
            match output {
                Output::Json => output::json(&removed)?,
                Output::Text => println!("removed schedule {}", removed.name),
            }
        }
    }
    Ok(())
}
