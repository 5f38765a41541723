//! Actions, jobs and attempts: the operator API and the dispatch protocol.
//!
//! An *action* is a named command in the catalog: an argv template with typed
//! parameters. A *job* runs an action on the agents a selector matches; each
//! matched agent gets a chain of *attempts* (the first, then retries). The
//! agent pulls attempts by long-polling, runs them, streams their output and
//! reports one result per attempt id.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::sandbox::{LimitExceeded, Sandbox, WorkspaceSpec};

// Where the server has always imported them from; they are defined, with
// the other bounds of the protocol, in `limits`.

/// `actions.yaml`: the catalog file `drover actions apply -f` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ActionCatalog {
    #[serde(default)]
    pub actions: Vec<ActionSpec>,
    /// Sandbox profiles that actions, jobs and tasks name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sandboxes: Vec<Sandbox>,
}

/// One action: what runs, with which parameters, under which limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Program and arguments. `{{param}}` inside an element is replaced by
    /// the parameter's value; a value never becomes more than that element.
    /// `builtin:noop` runs inside the agent without a process.
    pub argv: Vec<String>,
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// Default timeout of a job, e.g. "30s".
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "30s"))]
    pub timeout: Duration,
    #[serde(default)]
    pub retries: RetryPolicy,
    /// Time between SIGTERM and SIGKILL on timeout or cancel.
    #[serde(default = "default_kill_grace", with = "humantime_serde")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "5s"))]
    pub kill_grace: Duration,
    /// Environment of the process (nothing else is inherited but PATH).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The sandbox profile it runs in (`process` when absent). A job or a
    /// task may name another, but not a process one for an action that
    /// asks for a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_kill_grace() -> Duration {
    Duration::from_secs(5)
}

/// A typed parameter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ParamSpec {
    String {
        #[serde(default)]
        max_length: Option<usize>,
        /// A regular expression the whole value must match.
        #[serde(default)]
        pattern: Option<String>,
        #[serde(default)]
        default: Option<String>,
        /// Whether a value may begin with '-' (which the program could
        /// read as an option); refused unless set.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        allow_leading_dash: bool,
    },
    Integer {
        #[serde(default)]
        min: Option<i64>,
        #[serde(default)]
        max: Option<i64>,
        #[serde(default)]
        default: Option<i64>,
    },
    Enum {
        values: Vec<String>,
        #[serde(default)]
        default: Option<String>,
    },
    Bool {
        #[serde(default)]
        default: Option<bool>,
    },
}

/// When and how often a failed attempt is tried again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: none).
    pub max: u32,
    /// Wait before the first retry; doubles each time, with jitter.
    #[serde(with = "humantime_serde")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "1s"))]
    pub backoff: Duration,
    #[serde(with = "humantime_serde")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "60s"))]
    pub max_backoff: Duration,
    /// Retry attempts that timed out.
    pub on_timeout: bool,
    /// Retry attempts whose agent vanished (lease expired).
    pub on_lost: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max: 0,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            on_timeout: false,
            on_lost: true,
        }
    }
}

/// An action as the catalog holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Action {
    #[serde(flatten)]
    pub spec: ActionSpec,
    /// sha256 of the canonical JSON of the spec.
    pub hash: String,
    pub updated_at: DateTime<Utc>,
}

/// Answer of `POST /api/v1/actions`: what became of each action, and of
/// each sandbox profile of the catalog.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplyActionsResponse {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    #[serde(default)]
    pub sandboxes: AppliedNames,
}

/// Names created, updated and left unchanged by an apply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AppliedNames {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
}

/// `POST /api/v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubmitJobRequest {
    pub action: String,
    /// An agent id (or unique prefix), `*`, or a selector such as
    /// `role in (web,api),!env=prod,os=Debian*` (docs/SELECTORS.md).
    pub target: String,
    /// A duplicate key is refused.
    #[serde(default, deserialize_with = "crate::unique::object")]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Overrides the action's timeout, in seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Overrides the action's number of retries.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Overrides the action's sandbox profile.
    #[serde(default)]
    pub sandbox: Option<String>,
}

/// Life of a job or an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waits for people to approve it (a protected action, profile or
    /// target); nothing is handed out until then.
    AwaitingApproval,
    Queued,
    Dispatched,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Rejected,
    Lost,
}

impl JobState {
    pub const ALL: [JobState; 10] = [
        JobState::AwaitingApproval,
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::TimedOut,
        JobState::Cancelled,
        JobState::Rejected,
        JobState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::AwaitingApproval => "awaiting_approval",
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            JobState::Rejected => "rejected",
            JobState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobState::AwaitingApproval
                | JobState::Queued
                | JobState::Dispatched
                | JobState::Running
        )
    }
}

/// A job with its attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Job {
    pub id: String,
    pub action: String,
    pub target: String,
    pub params: BTreeMap<String, serde_json::Value>,
    pub state: JobState,
    /// Why a job that is not final is waiting, e.g. "agent 0192… is offline".
    pub reason: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub timeout_secs: u64,
    pub max_retries: u32,
    /// The sandbox profile its attempts run in.
    pub sandbox: String,
    pub attempts: Vec<Attempt>,
}

/// One try of a job on one agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Attempt {
    pub id: String,
    pub agent_id: String,
    /// 1 for the first try on this agent, 2 for the first retry, …
    pub number: u32,
    pub state: JobState,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub not_before: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The sandbox limit that stopped it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_exceeded: Option<LimitExceeded>,
    /// A result the agent reported after the attempt was declared lost:
    /// kept to be seen, without changing any state (a lost attempt stays
    /// lost, and its job, task and run keep what they became).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_result: Option<LateResult>,
}

/// A result that arrived after its attempt was declared lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LateResult {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// When the attempt ended, by the agent's clock.
    pub finished_at: DateTime<Utc>,
    /// When the server received it.
    pub received_at: DateTime<Utc>,
}

/// Which output stream a log chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A piece of output, as served to operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogChunk {
    /// Position in the job's log; pass the last one seen as `after`.
    pub cursor: i64,
    pub attempt_id: String,
    pub stream: Stream,
    /// Output bytes, lossily decoded as UTF-8.
    pub data: String,
}

/// `GET /api/v1/jobs/{id}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogPage {
    pub chunks: Vec<LogChunk>,
    /// The cursor to pass next time.
    pub next: i64,
    /// The job is final and every chunk has been returned.
    pub complete: bool,
}

// ---- the dispatch protocol (agent side) ----

/// `POST /api/v1/agent/poll`: the agent asks for work. The server answers at
/// once if there is work or a cancel for it, else within `wait_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PollRequest {
    /// How many more attempts the agent can run now.
    pub free_slots: u32,
    /// Longest time the server may hold the request; it holds it at most
    /// `limits::MAX_POLL_WAIT`.
    pub wait_ms: u64,
    /// The agent's capacity, for "at capacity" reasons; at most
    /// `limits::MAX_CAPACITY`.
    pub capacity: u32,
    /// Every attempt the agent holds (running, or its result not yet
    /// acknowledged), when it can list them all. An attempt dispatched to
    /// the agent earlier but not in this list never reached it (the answer
    /// was lost with a connection or a server crash): it is queued again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<Vec<String>>,
}

/// Work and cancels for an agent.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PollResponse {
    pub assignments: Vec<Assignment>,
    /// Attempts the agent runs that must be cancelled.
    pub cancel: Vec<String>,
    /// Of those, the ones to kill at once (a forced stop): SIGKILL without
    /// waiting for the kill grace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kill: Vec<String>,
}

/// One attempt for the agent to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    pub attempt_id: String,
    pub job_id: String,
    pub action: String,
    /// Fully substituted; run as is, never through a shell.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: u64,
    pub kill_grace_ms: u64,
    /// Bytes kept per stream; the rest is dropped after a marker (the
    /// server keeps `limits::LOG_MARKER_ROOM` more for it).
    pub log_cap_bytes: u64,
    /// Renew the lease at least this often.
    pub lease_ms: u64,
    /// Paths (relative to the working dir) to upload as artifacts before
    /// the result is reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// Where it runs and under which limits; a plain process when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// The workspace it runs in (its working dir), or that it creates or
    /// removes (`builtin:workspace-create`, `builtin:workspace-remove`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceSpec>,
    /// Values of the secrets in `env`: the agent replaces them with `***`
    /// in the output it sends (the server masks again before storing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<String>,
    /// The server's signatures (`signing`); an agent that knows the
    /// server's key refuses an assignment without a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<crate::signing::Seal>,
}

/// The argv of the built-in action that runs without a process.
pub const BUILTIN_NOOP: &str = "builtin:noop";

/// `POST /api/v1/agent/attempts/{id}/start`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub started_at: DateTime<Utc>,
}

/// `POST /api/v1/agent/attempts/{id}/logs`: one chunk of output. `seq`
/// counts chunks per stream from 0, so a resent chunk is stored once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogUpload {
    pub stream: Stream,
    pub seq: u64,
    pub data: String,
}

/// `POST /api/v1/agent/leases`: keep these attempts alive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub attempt_ids: Vec<String>,
}

/// Answer to a lease renewal.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseResponse {
    /// Attempts whose lease was extended.
    pub renewed: Vec<String>,
    /// Attempts to stop: cancelled, already final, or not this agent's.
    pub cancel: Vec<String>,
    /// Of those, the ones to kill at once (a forced stop).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kill: Vec<String>,
    pub lease_ms: u64,
}

/// How an attempt ended, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Rejected,
}

impl Outcome {
    pub fn state(self) -> JobState {
        match self {
            Outcome::Succeeded => JobState::Succeeded,
            Outcome::Failed => JobState::Failed,
            Outcome::TimedOut => JobState::TimedOut,
            Outcome::Cancelled => JobState::Cancelled,
            Outcome::Rejected => JobState::Rejected,
        }
    }
}

/// `POST /api/v1/agent/attempts/{id}/result`. Kept in the agent's outbox
/// until the server acknowledges it; a repeat is acknowledged and ignored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AttemptResult {
    pub attempt_id: String,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// Why it failed to run, was rejected, timed out, …; at most
    /// `limits::MAX_RESULT_ERROR` bytes.
    pub error: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Named outputs the process set (`::set-output` lines, `$DROVER_OUTPUT`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
    /// The sandbox limit that stopped it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_exceeded: Option<LimitExceeded>,
}

impl AttemptResult {
    /// Checks the bounds of the protocol: the agent keeps to them, and the
    /// server refuses a result that does not (whatever sent it).
    pub fn check(&self) -> Result<(), String> {
        use crate::limits::MAX_RESULT_ERROR;
        use crate::workflows::{valid_output_name, MAX_OUTPUTS, MAX_OUTPUT_VALUE};
        if self
            .error
            .as_ref()
            .is_some_and(|e| e.len() > MAX_RESULT_ERROR)
        {
            return Err(format!("error must be at most {MAX_RESULT_ERROR} bytes"));
        }
        if self.outputs.len() > MAX_OUTPUTS {
            return Err(format!(
                "outputs has {} entries; at most {MAX_OUTPUTS} are accepted",
                self.outputs.len()
            ));
        }
        for (name, value) in &self.outputs {
            if !valid_output_name(name) {
                return Err(format!(
                    "output name {:?} is invalid (letters, digits, '_' and '-', at most 64)",
                    name.chars().take(80).collect::<String>()
                ));
            }
            if value.len() > MAX_OUTPUT_VALUE {
                return Err(format!(
                    "output '{name}' is {} bytes; at most {MAX_OUTPUT_VALUE} are accepted",
                    value.len()
                ));
            }
        }
        Ok(())
    }
}

/// Answer to a result report.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResultAck {
    /// False when this attempt's result had been recorded before.
    pub recorded: bool,
}

// ---- audit ----

/// One entry of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The user (the name tried, for a login), or `anonymous`,
    /// `unauthenticated`, `bootstrap-token`.
    pub actor: String,
    /// What was done, `KIND.VERB`: `job.create`, `job.cancel`,
    /// `agent.revoke`, `user.login` … (older entries: the request, e.g.
    /// "POST /api/v1/jobs").
    pub action: String,
    /// What it was done to, `KIND:ID`: `job:01J…`, `agent:01J…`,
    /// `user:alice` (older entries: the path).
    pub target: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// `ok`, `refused` (4xx) or `error` (5xx).
    pub outcome: String,
    /// The call behind it, e.g. `POST /api/v1/jobs/{id}/cancel` (empty
    /// for one made outside the API, e.g. `drover admin reset-password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The caller's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Details: the reason given, the action and selector of a job, the
    /// role given …
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub detail: BTreeMap<String, String>,
}

impl RetryPolicy {
    /// The wait before retrying attempt `number` (1-based) that ended in
    /// `state`, or `None` when it is not retried. `jitter` in [0, 1) spreads
    /// retries between half and all of the doubled backoff.
    pub fn next_delay(&self, number: u32, state: JobState, jitter: f64) -> Option<Duration> {
        let retryable = match state {
            JobState::Failed => true,
            JobState::TimedOut => self.on_timeout,
            JobState::Lost => self.on_lost,
            _ => false,
        };
        if !retryable || number > self.max {
            return None;
        }
        let doubled = self
            .backoff
            .saturating_mul(1u32 << (number - 1).min(20))
            .min(self.max_backoff);
        let half = doubled / 2;
        Some(half + half.mul_f64(jitter.clamp(0.0, 1.0)))
    }
}

/// The state of a job from the latest attempt on each of its agents: not
/// final while any is not final; succeeded when all succeeded; else the
/// common final state, or failed when they differ.
pub fn aggregate_state(latest: &[JobState]) -> JobState {
    if latest.is_empty() {
        return JobState::Queued;
    }
    if latest.contains(&JobState::AwaitingApproval) {
        return JobState::AwaitingApproval;
    }
    if latest.contains(&JobState::Running) {
        return JobState::Running;
    }
    if latest.contains(&JobState::Dispatched) {
        return JobState::Dispatched;
    }
    if latest.contains(&JobState::Queued) {
        return if latest.iter().any(|s| s.is_final()) {
            JobState::Running
        } else {
            JobState::Queued
        };
    }
    let first = latest[0];
    if latest.iter().all(|s| *s == first) {
        first
    } else {
        JobState::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    #[test]
    fn retry_delays() {
        let p = RetryPolicy {
            max: 3,
            backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(5),
            on_timeout: false,
            on_lost: true,
        };
        let cases = [
            (1, Failed, 0.0, Some(1000)),
            (1, Failed, 1.0, Some(2000)),
            (2, Failed, 1.0, Some(4000)),
            (3, Failed, 1.0, Some(5000)), // capped
            (4, Failed, 1.0, None),       // out of retries
            (1, TimedOut, 1.0, None),
            (1, Lost, 1.0, Some(2000)),
            (1, Rejected, 1.0, None),
            (1, Cancelled, 1.0, None),
            (1, Succeeded, 1.0, None),
        ];
        for (n, st, j, want) in cases {
            let got = p.next_delay(n, st, j).map(|d| d.as_millis() as u64);
            assert_eq!(got, want, "attempt {n} {st:?}");
        }
    }

    #[test]
    fn job_state_from_attempts() {
        let cases: &[(&[JobState], JobState)] = &[
            (&[], Queued),
            (&[Queued], Queued),
            (&[Queued, Queued], Queued),
            (&[Dispatched, Queued], Dispatched),
            (&[Running, Succeeded], Running),
            (&[Queued, Succeeded], Running),
            (&[Succeeded, Succeeded], Succeeded),
            (&[TimedOut], TimedOut),
            (&[Succeeded, Failed], Failed),
            (&[Cancelled, Cancelled], Cancelled),
            (&[Cancelled, Succeeded], Failed),
        ];
        for (states, want) in cases {
            assert_eq!(aggregate_state(states), *want, "{states:?}");
        }
    }

    #[test]
    fn catalog_yaml_shape() {
        let json = serde_json::json!({
            "name": "echo", "argv": ["/bin/echo", "{{message}}"],
            "params": {"message": {"type": "string", "max_length": 10}},
            "timeout": "5s", "retries": {"max": 2, "backoff": "1s"}
        });
        let spec: ActionSpec = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.timeout, Duration::from_secs(5));
        assert_eq!(spec.retries.max, 2);
        assert_eq!(spec.kill_grace, Duration::from_secs(5));
        let bad = serde_json::json!({"name": "x", "argv": ["a"], "params": {"p": {"type": "string", "maxlen": 1}}});
        assert!(serde_json::from_value::<ActionSpec>(bad).is_err());
    }
}
