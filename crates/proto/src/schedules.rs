//! Server-side schedules (issue 16, point 5): an action on a target, or a
//! workflow, started by the server on a cron clock as the schedule's
//! creator. Each slot fires once, even with several server processes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::jobs::SubmitJobRequest;
use crate::workflows::SubmitRunRequest;

/// What a slot does while the previous job or run of its schedule has not
/// ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Overlap {
    /// Record the slot as skipped.
    #[default]
    Skip,
    /// Start anyway.
    Queue,
    /// Cancel the previous one, then start.
    Cancel,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Queue => "queue",
            Overlap::Cancel => "cancel",
        }
    }

    pub fn parse(s: &str) -> Option<Overlap> {
        [Overlap::Skip, Overlap::Queue, Overlap::Cancel]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// What the server does with the slots that passed while no server ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Forget them: fire the next slot to come.
    #[default]
    Skip,
    /// Fire once for all of them, then go on.
    RunOnce,
}

impl Missed {
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::RunOnce => "run-once",
        }
    }

    pub fn parse(s: &str) -> Option<Missed> {
        [Missed::Skip, Missed::RunOnce]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// `POST /api/v1/schedules`: creates a schedule, or replaces the one of
/// that name. Exactly one of `action` and `workflow`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PutScheduleRequest {
    /// Letters, digits, '-' and '_', starting with a letter; at most 64.
    pub name: String,
    /// Five fields (`*/5 * * * *`), or six with seconds first.
    pub cron: String,
    /// An IANA time zone such as `Europe/Paris` [default: UTC].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub missed: Missed,
    /// The job to submit at each slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<SubmitJobRequest>,
    /// The run to start at each slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<SubmitRunRequest>,
}

/// A schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Schedule {
    pub name: String,
    /// `action` or `workflow`.
    pub kind: String,
    pub cron: String,
    pub timezone: String,
    pub overlap: Overlap,
    pub missed: Missed,
    pub paused: bool,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The next slot to fire; none while paused.
    pub next_slot: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<SubmitJobRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<SubmitRunRequest>,
}

/// A slot a schedule fired or skipped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleSlot {
    pub slot_at: DateTime<Utc>,
    /// `started`, `skipped` or `failed`.
    pub outcome: String,
    /// `job:ID` or `run:ID` when it started one.
    pub target: Option<String>,
    /// Why it was skipped or failed.
    pub detail: String,
    /// Earlier slots this one stands for (a catch-up after downtime).
    pub missed: u64,
    pub claimed_at: DateTime<Utc>,
    /// The state of the job or run it started, now.
    pub state: Option<String>,
}

/// `GET /api/v1/schedules/{name}`: a schedule and its recent slots.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleDetail {
    pub schedule: Schedule,
    /// Newest first.
    pub slots: Vec<ScheduleSlot>,
}
