//! `drover approvals …`: what waits for approval, deciding it, and the
//! protection rules (admins).

use chrono::Utc;
use drover_proto::approvals::{
    Approval, DecideRequest, ProtectRequest, Protection, ProtectionKind,
};

use crate::ops::Target;
use crate::output::{self, Output};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KindArg {
    Action,
    Sandbox,
    Target,
    Workflow,
}

impl From<KindArg> for ProtectionKind {
    fn from(k: KindArg) -> ProtectionKind {
        match k {
            KindArg::Action => ProtectionKind::Action,
            KindArg::Sandbox => ProtectionKind::Sandbox,
            KindArg::Target => ProtectionKind::Target,
            KindArg::Workflow => ProtectionKind::Workflow,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ApprovalsCommand {
    /// Requests, newest first [default: pending ones].
    List {
        /// Every state, not only pending.
        #[arg(long)]
        all: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Follow requests live: every pending one, then each change as it
    /// happens (one JSON object per line with -o json). Ends with Ctrl-C.
    Watch {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// One request with exactly what will run.
    Show {
        /// Approval request id (see drover approvals list).
        id: String,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Approve a request (never your own).
    Approve {
        /// Approval request id (see drover approvals list).
        id: String,
        /// Why: recorded with the approval in the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reject a request; its job or run is cancelled.
    Reject {
        /// Approval request id (see drover approvals list).
        id: String,
        /// Why (required): recorded, and shown to whoever asked.
        #[arg(long)]
        reason: String,
    },
    /// The protection rules.
    Rules {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Protect actions, sandboxes or workflows (a name glob) or agents (a
    /// target selector): work touching them waits for approval.
    Protect {
        /// What the rule protects.
        #[arg(value_enum)]
        kind: KindArg,
        /// A name glob (actions, sandboxes, workflows) or a target
        /// selector (agents), e.g. 'deploy-*' or role=db.
        pattern: String,
        /// Distinct people who must approve [default: 1].
        #[arg(long)]
        approvers: Option<u32>,
    },
    /// Remove a protection rule by id.
    Unprotect {
        /// Rule id (see drover approvals rules).
        id: String,
    },
}

fn print(a: &Approval) {
    let what = match (&a.job_id, &a.run_id) {
        (Some(j), _) => format!("job {j}"),
        (_, Some(r)) => format!("run {r}"),
        _ => "-".to_owned(),
    };
    output::row(12, "approval", &a.id);
    output::row(12, "state", a.state.as_str());
    output::row(12, "for", &what);
    output::row(
        12,
        "requested",
        &format!(
            "by {} at {}",
            a.requested_by,
            a.requested_at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    );
    output::row(
        12,
        "expires",
        &a.expires_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    );
    output::row(
        12,
        "approvals",
        &format!(
            "{} of {} ({})",
            a.approved_by.len(),
            a.approvers_needed,
            if a.approved_by.is_empty() {
                "none yet".to_owned()
            } else {
                a.approved_by.join(", ")
            }
        ),
    );
    for r in &a.reasons {
        output::row(12, "because", r);
    }
    if let (Some(by), Some(at)) = (&a.decided_by, a.decided_at) {
        output::row(
            12,
            "decided",
            &format!("by {by} at {}", at.format("%Y-%m-%d %H:%M:%S UTC")),
        );
    }
    if let Some(r) = &a.reason {
        output::row(12, "reason", r);
    }
    output::row(12, "spec sha256", &a.spec_hash);
    println!("will run:");
    let spec = serde_json::to_string_pretty(&a.spec).unwrap_or_default();
    for line in spec.lines() {
        println!("  {}", output::clean(line));
    }
}

pub async fn approvals(target: &Target, cmd: ApprovalsCommand) -> anyhow::Result<()> {
    let api = target.api()?;
    match cmd {
        ApprovalsCommand::List { all, output } => {
            let list: Vec<Approval> = api
                .get(if all {
                    "/approvals"
                } else {
                    "/approvals?state=pending"
                })
                .await?;
            match output {
                Output::Json => output::json(&list)?,
                Output::Text => {
                    let now = Utc::now();
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|a| {
                            vec![
                                a.id.clone(),
                                a.state.as_str().to_owned(),
                                a.job_id
                                    .as_ref()
                                    .map(|j| format!("job {j}"))
                                    .or_else(|| a.run_id.as_ref().map(|r| format!("run {r}")))
                                    .unwrap_or_default(),
                                a.requested_by.clone(),
                                format!("{}/{}", a.approved_by.len(), a.approvers_needed),
                                output::ago(Some(a.requested_at), now),
                                a.reasons.join("; "),
                            ]
                        })
                        .collect();
                    output::table(
                        &["ID", "STATE", "FOR", "BY", "APPROVALS", "REQUESTED", "WHY"],
                        &rows,
                    );
                }
            }
        }
        ApprovalsCommand::Watch { output } => return watch(&api, output).await,
        ApprovalsCommand::Show { id, output } => {
            let a: Approval = api
                .get(&format!("/approvals/{}", crate::client::segment(&id)?))
                .await?;
            match output {
                Output::Json => output::json(&a)?,
                Output::Text => print(&a),
            }
        }
        ApprovalsCommand::Approve { id, reason } => {
            let a: Approval = api
                .post(
                    &format!("/approvals/{}/approve", crate::client::segment(&id)?),
                    &DecideRequest { reason },
                )
                .await?;
            if a.state == drover_proto::approvals::ApprovalState::Approved {
                eprintln!("approval {} granted: the work is released", a.id);
            } else {
                eprintln!(
                    "approval {} counted: {} of {} approvals",
                    a.id,
                    a.approved_by.len(),
                    a.approvers_needed
                );
            }
        }
        ApprovalsCommand::Reject { id, reason } => {
            let a: Approval = api
                .post(
                    &format!("/approvals/{}/reject", crate::client::segment(&id)?),
                    &DecideRequest {
                        reason: Some(reason),
                    },
                )
                .await?;
            eprintln!("approval {} rejected: its work is cancelled", a.id);
        }
        ApprovalsCommand::Rules { output } => {
            let rules: Vec<Protection> = api.get("/protections").await?;
            match output {
                Output::Json => output::json(&rules)?,
                Output::Text => {
                    let rows: Vec<Vec<String>> = rules
                        .iter()
                        .map(|r| {
                            vec![
                                r.id.clone(),
                                r.kind.as_str().to_owned(),
                                r.pattern.clone(),
                                r.approvers.to_string(),
                                r.created_by.clone(),
                            ]
                        })
                        .collect();
                    output::table(&["ID", "KIND", "PATTERN", "APPROVERS", "BY"], &rows);
                }
            }
        }
        ApprovalsCommand::Protect {
            kind,
            pattern,
            approvers,
        } => {
            let _: Vec<Protection> = api
                .post(
                    "/protections",
                    &ProtectRequest {
                        kind: kind.into(),
                        pattern: pattern.clone(),
                        approvers,
                    },
                )
                .await?;
            eprintln!(
                "{} {pattern} is protected: work touching it waits for {} approval(s)",
                ProtectionKind::from(kind).as_str(),
                approvers.unwrap_or(1)
            );
        }
        ApprovalsCommand::Unprotect { id } => {
            api.delete(&format!("/protections/{}", crate::client::segment(&id)?))
                .await?;
            eprintln!("protection {id} removed");
        }
    }
    Ok(())
}

/// Prints approval events as the server sends them; reconnects when the
/// stream breaks (a restart), as the stream starts with what is pending.
async fn watch(api: &crate::client::Api, output: Output) -> anyhow::Result<()> {
    let mut failures = 0u32;
    loop {
        let mut resp = match api.open("/approvals/events", &[]).await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                if failures > 60 {
                    return Err(e.context("the approval stream stayed unavailable"));
                }
                eprintln!("approval stream unavailable ({e:#}); retrying");
                tokio::time::sleep(std::time::Duration::from_millis(
                    500 * u64::from(failures.min(10)),
                ))
                .await;
                continue;
            }
        };
        failures = 0;
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                let Ok(a) = serde_json::from_str::<Approval>(&data.join("\n")) else {
                    continue;
                };
                match output {
                    Output::Json => println!("{}", serde_json::to_string(&a)?),
                    Output::Text => println!(
                        "{} {} {} {}/{} by {}: {}",
                        Utc::now().format("%H:%M:%S"),
                        a.id,
                        a.state.as_str(),
                        a.approved_by.len(),
                        a.approvers_needed,
                        a.requested_by,
                        output::clean(&a.reasons.join("; "))
                    ),
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
