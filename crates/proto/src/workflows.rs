//! Durable workflows: definitions, runs, their tasks, live events,
//! artifacts and webhook deliveries.
//!
//! A *definition* is a set of tasks, each running an action of the catalog
//! on a target, ordered by `needs` (or by the mode). A *run* executes one
//! definition with its inputs; each task of a run becomes one job when its
//! needs are met. Definitions are stored by the hash of their canonical
//! JSON, so a run always sees the definition it started with.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::sandbox::GitSource;

/// How tasks are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Tasks run when every task they `need` has ended.
    #[default]
    Dag,
    /// Each task needs the one before it.
    Sequential,
    /// Every task starts at once; `needs` is not allowed.
    Parallel,
}

/// A workflow definition, canonical form (what is hashed and stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkflowDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub mode: Mode,
    /// Inputs the run takes, with their defaults (`None`: required).
    pub inputs: BTreeMap<String, InputSpec>,
    /// The whole run ends as timed out after this long.
    #[serde(with = "humantime_serde", default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "1h"))]
    pub timeout: Option<Duration>,
    pub webhooks: Vec<WebhookSpec>,
    pub tasks: Vec<TaskDef>,
    /// A workspace the tasks share on one agent, created before the first
    /// task and removed when the run ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceDef>,
    /// Leave the workspace in place when the run ends.
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_workspace: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The workspace of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkspaceDef {
    /// Which agents may hold it (one is chosen); every task of the run
    /// then runs on that agent.
    pub target: String,
    /// A sandbox profile: a docker one gives the workspace a long-lived
    /// container that the tasks run in. `process` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Check this out into the workspace before the first task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// Variables every task that runs in the workspace gets, beside its
    /// action's (a name both set is refused). Values may hold
    /// `${{ inputs.NAME }}` and `${{ run.id }}`. Left out of the canonical
    /// JSON when empty, so definitions without it keep their hash.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// One input of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InputSpec {
    pub default: Option<String>,
    #[serde(default)]
    pub description: String,
}

/// One task, with the definition's defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskDef {
    pub id: String,
    /// What the task is for, for people reading `workflow status`. Left
    /// out of the canonical JSON when empty, so definitions without one
    /// keep their hash.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub action: String,
    /// Values may hold `${{ inputs.NAME }}` and `${{ tasks.ID.outputs.NAME }}`.
    pub params: BTreeMap<String, serde_json::Value>,
    pub target: String,
    /// Tasks that must end before this one starts (after the mode applied).
    pub needs: Vec<String>,
    /// Per-attempt timeout; the action's when absent.
    #[serde(with = "humantime_serde", default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "30s"))]
    pub timeout: Option<Duration>,
    /// Retries after the first attempt; the action's when absent.
    pub retries: Option<u32>,
    /// A failure of this task does not fail the run.
    pub optional: bool,
    /// Paths (relative to the task's working dir) to collect.
    pub artifacts: Vec<String>,
    /// The sandbox profile it runs in; the action's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// Where to POST when a run ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookSpec {
    pub url: String,
    /// Key of the HMAC-SHA256 signature; never shown by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Which run endings to send (default both).
    pub events: Vec<WebhookEvent>,
}

/// The run endings a webhook can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    /// The run succeeded.
    Completed,
    /// The run failed, was cancelled or timed out.
    Failed,
}

impl WebhookEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Completed => "completed",
            WebhookEvent::Failed => "failed",
        }
    }

    pub fn of(state: RunState) -> WebhookEvent {
        if state == RunState::Succeeded {
            WebhookEvent::Completed
        } else {
            WebhookEvent::Failed
        }
    }
}

/// `POST /api/v1/workflows/runs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubmitRunRequest {
    /// The definition: YAML or JSON text, or a JSON object.
    /// A duplicate key in a JSON object is refused.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    #[serde(deserialize_with = "crate::unique::value")]
    pub definition: serde_json::Value,
    /// Where the definition came from, for error messages (e.g. the file name).
    #[serde(default)]
    pub source: Option<String>,
    /// A duplicate key is refused.
    #[serde(default, deserialize_with = "crate::unique::strings")]
    pub inputs: BTreeMap<String, String>,
}

/// Life of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waits for people to approve it (a protected workflow); no task
    /// starts until then.
    AwaitingApproval,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl RunState {
    pub const ALL: [RunState; 6] = [
        RunState::AwaitingApproval,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
        RunState::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        !matches!(self, RunState::Running | RunState::AwaitingApproval)
    }
}

/// Life of a task within a run. While its job lives, a task mirrors the
/// job's state (queued, dispatched, running).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for the tasks it needs.
    Pending,
    Queued,
    Dispatched,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// Never ran: a task it needs failed, or the run ended first.
    Skipped,
}

impl TaskState {
    pub const ALL: [TaskState; 9] = [
        TaskState::Pending,
        TaskState::Queued,
        TaskState::Dispatched,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::TimedOut,
        TaskState::Cancelled,
        TaskState::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Queued => "queued",
            TaskState::Dispatched => "dispatched",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
            TaskState::Cancelled => "cancelled",
            TaskState::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Failed
                | TaskState::TimedOut
                | TaskState::Cancelled
                | TaskState::Skipped
        )
    }
}

/// A run, with its tasks when shown alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Run {
    pub id: String,
    pub workflow: String,
    /// sha256 of the canonical definition this run executes.
    pub definition_hash: String,
    pub state: RunState,
    /// Why it ended the way it did, or why it is still running.
    pub reason: Option<String>,
    pub inputs: BTreeMap<String, String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The run's workspace, if its definition asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<RunWorkspace>,
    pub tasks: Vec<TaskRun>,
}

/// Where a run's workspace is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunWorkspace {
    pub state: WorkspaceState,
    /// The agent that holds it; every task of the run runs there.
    pub agent_id: Option<String>,
    /// Why it waits, failed, or how it ended.
    pub reason: Option<String>,
    /// The sandbox profile it is created in (shown with the run alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// The jobs that create and remove it.
    pub create_job: Option<String>,
    pub remove_job: Option<String>,
}

/// Life of a workspace: pending → creating → ready → removing → removed,
/// or failed (creation), kept (`keep_workspace`), remove_failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceState {
    /// Waiting for an agent to hold it.
    Pending,
    Creating,
    Ready,
    /// Could not be created; the run fails.
    Failed,
    Removing,
    Removed,
    /// Left in place when the run ended.
    Kept,
    RemoveFailed,
}

impl WorkspaceState {
    pub const ALL: [WorkspaceState; 8] = [
        WorkspaceState::Pending,
        WorkspaceState::Creating,
        WorkspaceState::Ready,
        WorkspaceState::Failed,
        WorkspaceState::Removing,
        WorkspaceState::Removed,
        WorkspaceState::Kept,
        WorkspaceState::RemoveFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceState::Pending => "pending",
            WorkspaceState::Creating => "creating",
            WorkspaceState::Ready => "ready",
            WorkspaceState::Failed => "failed",
            WorkspaceState::Removing => "removing",
            WorkspaceState::Removed => "removed",
            WorkspaceState::Kept => "kept",
            WorkspaceState::RemoveFailed => "remove_failed",
        }
    }

    pub fn parse(s: &str) -> Option<WorkspaceState> {
        WorkspaceState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Nothing more happens to it by itself.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            WorkspaceState::Removed | WorkspaceState::Kept | WorkspaceState::RemoveFailed
        )
    }
}

/// One task of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskRun {
    pub id: String,
    /// The task's `description` in the run's definition (empty: none).
    #[serde(default)]
    pub description: String,
    pub action: String,
    pub state: TaskState,
    /// What it waits for, or why it ended so.
    pub reason: Option<String>,
    pub needs: Vec<String>,
    pub optional: bool,
    pub job_id: Option<String>,
    pub outputs: BTreeMap<String, String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// `GET /api/v1/workflows/runs/{id}/result`: the outcome and every
/// task's outputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunResult {
    pub id: String,
    pub state: RunState,
    pub reason: Option<String>,
    pub outputs: BTreeMap<String, BTreeMap<String, String>>,
    pub tasks: BTreeMap<String, TaskState>,
}

/// One entry of a run's event stream. `id` grows by one per event across
/// the server; a client resumes with the last `id` it saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunEvent {
    pub id: i64,
    pub run_id: String,
    pub at: DateTime<Utc>,
    /// `run`, `task` or `log`.
    pub kind: String,
    pub task: Option<String>,
    /// The new state of the run or task (absent for log lines).
    pub state: Option<String>,
    /// The reason of a state change, or the text of a log line.
    pub message: Option<String>,
    /// For log lines: `stdout` or `stderr`.
    pub stream: Option<String>,
}

impl RunEvent {
    /// The last event of a run's stream.
    pub fn ends_run(&self) -> bool {
        self.kind == "run"
            && self
                .state
                .as_deref()
                .and_then(RunState::parse)
                .is_some_and(RunState::is_final)
    }
}

/// A collected file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Artifact {
    pub id: String,
    pub run_id: Option<String>,
    pub task: Option<String>,
    pub job_id: String,
    pub attempt_id: String,
    /// Path relative to the task's working dir.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
}

/// `POST /api/v1/webhooks`: a webhook for every run's end.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookRequest {
    pub url: String,
    pub secret: String,
    #[serde(default)]
    pub events: Vec<WebhookEvent>,
}

/// A global webhook (its secret is never shown).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub events: Vec<WebhookEvent>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// One notification and how its sending went.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookDelivery {
    pub id: String,
    pub run_id: String,
    pub url: String,
    pub event: WebhookEvent,
    /// `pending`, `delivered` or `failed` (gave up).
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub history: Vec<DeliveryAttempt>,
}

/// One POST of a delivery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryAttempt {
    pub at: DateTime<Utc>,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// The JSON body POSTed to a webhook.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookPayload {
    pub delivery_id: String,
    pub event: WebhookEvent,
    pub run_id: String,
    pub workflow: String,
    pub state: RunState,
    pub reason: Option<String>,
    pub finished_at: DateTime<Utc>,
    pub tasks: BTreeMap<String, TaskState>,
}

/// Header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-drover-signature";
/// Header carrying the event name.
pub const EVENT_HEADER: &str = "x-drover-event";
/// Header carrying the delivery id (the same on every retry).
pub const DELIVERY_HEADER: &str = "x-drover-delivery";
/// Header carrying the hex sha256 of an uploaded artifact.
pub const SHA256_HEADER: &str = "x-drover-sha256";

/// A stdout line `::set-output name=value` sets an output of the task.
pub const SET_OUTPUT_PREFIX: &str = "::set-output ";
/// Variable naming the JSON file a task may write its outputs to.
pub const OUTPUT_FILE_ENV: &str = "DROVER_OUTPUT";
/// Most outputs one attempt may set, and the longest value.
pub const MAX_OUTPUTS: usize = 64;
pub const MAX_OUTPUT_VALUE: usize = 16 * 1024;

/// Whether `name` may name an output: `[A-Za-z_][A-Za-z0-9_-]*`, ≤ 64.
pub fn valid_output_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 64
}

/// Parses one stdout line as `::set-output name=value`.
pub fn parse_set_output(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix(SET_OUTPUT_PREFIX)?;
    let rest = rest.strip_prefix("name=").unwrap_or(rest);
    let (name, value) = rest.split_once('=').or_else(|| rest.split_once("::"))?;
    let name = name.trim();
    valid_output_name(name).then_some((name, value))
}

/// Whether an artifact path is relative, plain and stays inside the
/// working dir: no `..`, no leading `/`, no empty or `.` segments.
pub fn valid_artifact_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 1024
        && !path.starts_with('/')
        && !path.contains('\0')
        && !path.contains('\\')
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn set_output_lines() {
        let table = [
            (
                "::set-output name=image=app:1.2",
                Some(("image", "app:1.2")),
            ),
            ("::set-output image=a=b", Some(("image", "a=b"))),
            ("::set-output name=image::v", Some(("image", "v"))),
            ("::set-output name=x=", Some(("x", ""))),
            ("::set-output name=9x=1", None),
            ("::set-output name=a b=1", None),
            ("set-output name=a=1", None),
            ("::set-output ", None),
        ];
        for (line, want) in table {
            assert_eq!(parse_set_output(line), want, "{line}");
        }
    }

    #[test]
    fn artifact_paths() {
        for ok in ["out.txt", "dist/app.tar", "a/b/c", ".hidden"] {
            assert!(valid_artifact_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a/",
            "a\\b",
        ] {
            assert!(!valid_artifact_path(bad), "{bad}");
        }
    }

    #[test]
    fn run_end_events() {
        let mut ev = RunEvent {
            id: 1,
            run_id: "r".into(),
            at: Utc::now(),
            kind: "run".into(),
            task: None,
            state: Some("running".into()),
            message: None,
            stream: None,
        };
        assert!(!ev.ends_run());
        ev.state = Some("timed_out".into());
        assert!(ev.ends_run());
        ev.kind = "task".into();
        assert!(!ev.ends_run());
    }
}
