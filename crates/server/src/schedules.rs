//! Server-side schedules (issue 16, point 5): the cron clock of a schedule,
//! what a due schedule does now (a pure plan), and the engine that fires
//! slots.
//!
//! Key design decision: a slot fires only for the server process whose
//! INSERT of the slot's row (primary key schedule + slot time) wins, in the
//! transaction that creates the job or run, or records a skip. Every
//! process looks at every due schedule; the database decides, so two
//! servers on one PostgreSQL fire each slot once and need no leader.

use std::str::FromStr;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use drover_proto::jobs::SubmitJobRequest;
use drover_proto::schedules::{Missed, Overlap};
use drover_proto::workflows::SubmitRunRequest;
use drover_store::schedules::{ScheduleRecord, SlotClaim};

use crate::auth::UserAuth;
use crate::error::ApiError;
use crate::routes::audit::Audit;
use crate::state::AppState;

/// A schedule's clock: a cron expression read in a time zone.
#[derive(Debug, Clone)]
pub struct Clock {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl Clock {
    /// Five fields (`*/5 * * * *`), or six with seconds first; an IANA
    /// time zone name. The error names the field that is wrong.
    pub fn parse(cron: &str, timezone: &str) -> Result<Clock, String> {
        let fields = cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "cron: '{}' has {fields} fields; five are expected (minute hour day month weekday), \
                 or six with seconds first",
                cron.escape_debug()
            ));
        }
        let parsed = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| format!("cron: '{}' is invalid: {e}", cron.escape_debug()))?;
        let tz = chrono_tz::Tz::from_str(timezone).map_err(|_| {
            format!(
                "timezone: '{}' is not a known time zone (e.g. UTC, Europe/Paris)",
                timezone.escape_debug()
            )
        })?;
        Ok(Clock { cron: parsed, tz })
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last slot at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }
}

/// Most slots counted one by one when a schedule catches up.
const MAX_COUNTED: u64 = 10_000;

/// What a due schedule does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The slot to fire and how many earlier slots it stands for.
    pub fire: Option<(DateTime<Utc>, u64)>,
    /// The schedule's next slot afterwards.
    pub next: Option<DateTime<Utc>>,
}

/// What a schedule whose next slot is `next_slot` (at or before `now`)
/// does: the latest due slot fires when it is on time (at most `grace`
/// late); slots before it, or it too when late, passed while no server
/// looked: forgotten (`skip`), or fired once together as the latest
/// (`run-once`).
pub fn plan(
    clock: &Clock,
    next_slot: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    missed: Missed,
) -> Plan {
    let latest = clock
        .last_at_or_before(now)
        .filter(|l| *l >= next_slot)
        .unwrap_or(next_slot);
    let mut due = 1u64;
    let mut t = next_slot;
    while let Some(n) = clock.next_after(t).filter(|n| *n <= latest) {
        due += 1;
        t = n;
        if due >= MAX_COUNTED {
            break;
        }
    }
    let on_time = now - latest <= grace;
    let passed = due - u64::from(on_time);
    let fire = match missed {
        Missed::Skip => on_time.then_some((latest, 0)),
        Missed::RunOnce => Some((latest, passed)),
    };
    Plan {
        fire,
        next: clock.next_after(latest.max(now)),
    }
}

/// A slot being fired: claimed in the transaction that starts its work.
#[derive(Debug, Clone, Copy)]
pub struct Firing<'a> {
    pub schedule: &'a str,
    pub slot_at: DateTime<Utc>,
    pub missed: u64,
}

impl Firing<'_> {
    /// The slot's claim, as started `target` (`job:ID`, `run:ID`).
    pub fn claim<'b>(&'b self, target: &'b str) -> SlotClaim<'b> {
        SlotClaim {
            schedule: self.schedule,
            slot_at: self.slot_at,
            outcome: "started",
            target: Some(target),
            detail: "",
            missed: self.missed,
            now: Utc::now(),
        }
    }
}

/// What a schedule starts, as stored in its spec.
#[derive(Debug, Clone)]
pub enum Work {
    Action(SubmitJobRequest),
    Workflow(SubmitRunRequest),
}

impl Work {
    pub fn kind(&self) -> &'static str {
        match self {
            Work::Action(_) => "action",
            Work::Workflow(_) => "workflow",
        }
    }

    pub fn to_json(&self) -> String {
        match self {
            Work::Action(r) => serde_json::to_string(r),
            Work::Workflow(r) => serde_json::to_string(r),
        }
        .unwrap_or_default()
    }

    pub fn from_record(rec: &ScheduleRecord) -> Result<Work, String> {
        let bad = |e: serde_json::Error| format!("schedule '{}': stored spec: {e}", rec.name);
        match rec.kind.as_str() {
            "action" => serde_json::from_str(&rec.spec)
                .map(Work::Action)
                .map_err(bad),
            "workflow" => serde_json::from_str(&rec.spec)
                .map(Work::Workflow)
                .map_err(bad),
            other => Err(format!("schedule '{}': unknown kind '{other}'", rec.name)),
        }
    }
}

/// The user a schedule acts as: its creator as they are now (role,
/// scope, not disabled), within the token scope the schedule was made
/// with.
async fn creator(state: &AppState, rec: &ScheduleRecord) -> Result<UserAuth, ApiError> {
    let user = state
        .store
        .user_by_username(&rec.created_by)
        .await?
        .ok_or_else(|| {
            ApiError::forbidden(format!("user '{}' no longer exists", rec.created_by))
        })?;
    if user.disabled_at.is_some() {
        return Err(ApiError::forbidden(format!(
            "user '{}' is disabled",
            rec.created_by
        )));
    }
    let token_scope = match rec.scope.as_deref() {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::internal("reading a schedule's scope", &e))?,
        None => Default::default(),
    };
    Ok(UserAuth {
        limits: crate::access::Limits::of(&user.scope, &token_scope),
        user_id: user.id,
        username: user.username,
        role: user.role,
        token_id: String::new(),
        token_scope,
    })
}

/// Whether the job or run `target` (`job:ID`, `run:ID`) has not ended.
async fn still_running(state: &AppState, target: &str) -> Result<bool, ApiError> {
    if let Some(id) = target.strip_prefix("job:") {
        return Ok(state
            .store
            .job(id)
            .await?
            .is_some_and(|j| !j.state.is_final()));
    }
    if let Some(id) = target.strip_prefix("run:") {
        return Ok(state
            .store
            .run(id)
            .await?
            .is_some_and(|r| !r.state.is_final()));
    }
    Ok(false)
}

/// Records a slot that started nothing; false when another process has
/// the slot.
async fn record(
    state: &AppState,
    slot: &Firing<'_>,
    outcome: &str,
    detail: &str,
    audit: Option<(&Audit, StatusCode)>,
) -> Result<bool, ApiError> {
    let mut tx = state.store.begin().await?;
    let claimed = tx
        .claim_slot(&SlotClaim {
            schedule: slot.schedule,
            slot_at: slot.slot_at,
            outcome,
            target: None,
            detail,
            missed: slot.missed,
            now: Utc::now(),
        })
        .await?;
    if !claimed {
        return Ok(false);
    }
    if let Some((audit, status)) = audit {
        audit.target(format!("schedule:{}", slot.schedule));
        audit.note("error", detail);
        audit.write(&mut tx, status).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Fires one slot of `rec`: applies the overlap policy, then starts the
/// work as the creator, the slot claimed in the same commit.
async fn fire(state: &AppState, rec: &ScheduleRecord, slot: &Firing<'_>) -> Result<(), ApiError> {
    let source = format!("schedule {}", rec.name);
    let work = Work::from_record(rec).map_err(|e| ApiError::internal("reading a schedule", &e))?;
    let (action, request) = match &work {
        Work::Action(_) => ("job.create", "POST /api/v1/jobs"),
        Work::Workflow(_) => ("run.create", "POST /api/v1/workflows/runs"),
    };
    let audit = Audit::internal(&rec.created_by, action, request, &source);
    audit.note("schedule", &rec.name);
    audit.note("slot", slot.slot_at.to_rfc3339());
    if slot.missed > 0 {
        audit.note("missed", slot.missed.to_string());
    }
    let user = match creator(state, rec).await {
        Ok(u) => u,
        Err(e) => {
            record(state, slot, "failed", &e.message, Some((&audit, e.status))).await?;
            return Ok(());
        }
    };
    let overlap = Overlap::parse(&rec.overlap).unwrap_or_default();
    if overlap != Overlap::Queue {
        if let Some(prev) = state.store.last_started_slot(&rec.name).await? {
            let target = prev.target.unwrap_or_default();
            if still_running(state, &target).await? {
                if overlap == Overlap::Skip {
                    let why = format!("{target} from the slot of {} is running", prev.slot_at);
                    if record(state, slot, "skipped", &why, None).await? {
                        tracing::info!(schedule = %rec.name, slot = %slot.slot_at, previous = %target, "slot skipped: the previous one is running");
                    }
                    return Ok(());
                }
                cancel_previous(state, &user, rec, &target).await;
            }
        }
    }
    let started = match &work {
        Work::Action(req) => {
            crate::routes::jobs::submit_as(
                state,
                &user,
                &audit,
                req,
                StatusCode::CREATED,
                Some(slot),
            )
            .await
        }
        Work::Workflow(req) => {
            crate::routes::workflows::start_run(state, &user, &audit, req, Some(slot)).await
        }
    };
    match started {
        Ok(Some(_)) => {
            tracing::info!(schedule = %rec.name, slot = %slot.slot_at, missed = slot.missed, by = %rec.created_by, "schedule fired");
        }
        Ok(None) => {
            tracing::debug!(schedule = %rec.name, slot = %slot.slot_at, "slot fired by another server");
        }
        Err(e) => {
            tracing::warn!(schedule = %rec.name, slot = %slot.slot_at, error = %e.message, "schedule could not start its work");
            record(state, slot, "failed", &e.message, Some((&audit, e.status))).await?;
        }
    }
    Ok(())
}

/// Cancels the job or run a schedule's previous slot started (overlap
/// `cancel`). Another server may have cancelled it already: a refusal is
/// only logged.
async fn cancel_previous(state: &AppState, user: &UserAuth, rec: &ScheduleRecord, target: &str) {
    let source = format!("schedule {}", rec.name);
    let reason = format!("schedule {}: the next slot replaces it", rec.name);
    let cancelled = if let Some(id) = target.strip_prefix("job:") {
        let audit = Audit::internal(
            &rec.created_by,
            "job.cancel",
            "POST /api/v1/jobs/{id}/cancel",
            &source,
        );
        let done = crate::routes::jobs::cancel(state, user, &audit, id, Some(&reason))
            .await
            .map(|_| ());
        audited(state, &audit, done).await
    } else if let Some(id) = target.strip_prefix("run:") {
        let audit = Audit::internal(
            &rec.created_by,
            "run.cancel",
            "POST /api/v1/workflows/runs/{id}/cancel",
            &source,
        );
        let done = crate::routes::workflows::cancel(state, user, &audit, id, Some(&reason))
            .await
            .map(|_| ());
        audited(state, &audit, done).await
    } else {
        Ok(())
    };
    match cancelled {
        Ok(()) => {
            tracing::info!(schedule = %rec.name, previous = %target, "previous slot's work cancelled")
        }
        Err(e) => {
            tracing::debug!(schedule = %rec.name, previous = %target, error = %e.message, "previous slot's work not cancelled")
        }
    }
}

/// Writes `audit` for a call that ended `done`, and hands `done` back.
async fn audited(
    state: &AppState,
    audit: &Audit,
    done: Result<(), ApiError>,
) -> Result<(), ApiError> {
    let status = match &done {
        Ok(()) => StatusCode::OK,
        Err(e) => e.status,
    };
    if let Err(e) = audit.write_alone(&state.store, status).await {
        tracing::warn!(error = %e, "audit entry of a schedule's cancel not written");
    }
    done
}

/// How late a slot may fire and still be on time.
pub fn grace(tick: Duration) -> chrono::Duration {
    chrono::Duration::from_std(tick).unwrap_or_default() + chrono::Duration::seconds(2)
}

/// Looks at one due schedule: fires what its plan says, then moves its
/// next slot on.
async fn due(state: &AppState, rec: &ScheduleRecord, now: DateTime<Utc>) -> Result<(), ApiError> {
    let Some(next_slot) = rec.next_slot else {
        return Ok(());
    };
    let clock = Clock::parse(&rec.cron, &rec.timezone)
        .map_err(|e| ApiError::internal("reading a schedule's clock", &e))?;
    let missed = Missed::parse(&rec.missed).unwrap_or_default();
    let plan = plan(
        &clock,
        next_slot,
        now,
        grace(state.config.schedule_tick),
        missed,
    );
    if let Some((slot_at, missed)) = plan.fire {
        let firing = Firing {
            schedule: &rec.name,
            slot_at,
            missed,
        };
        fire(state, rec, &firing).await?;
    }
    // A schedule with no slot to come is left where it is: due, firing
    // nothing more (its slot is claimed).
    if let Some(next) = plan.next {
        state
            .store
            .advance_schedule(&rec.name, next_slot, next)
            .await?;
    }
    Ok(())
}

/// The `schedules` background task: wakes at the earliest next slot (at
/// most every `schedule_tick`), fires the due ones. Errors are logged and
/// the schedule looked at again on the next wake.
pub async fn run(state: AppState) {
    let tick = state.config.schedule_tick;
    loop {
        let now = Utc::now();
        match state.store.due_schedules(now).await {
            Ok(list) => {
                for rec in list {
                    if let Err(e) = due(&state, &rec, now).await {
                        tracing::warn!(schedule = %rec.name, error = %e.message, "schedule not fired");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "schedules not read"),
        }
        let wait = match state.store.earliest_slot().await {
            Ok(Some(t)) => (t - Utc::now()).to_std().unwrap_or_default().min(tick),
            _ => tick,
        };
        tokio::select! {
            () = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, h, m, s).unwrap()
    }

    #[test]
    fn clocks_name_the_field_that_is_wrong() {
        assert!(Clock::parse("*/5 * * * *", "UTC").is_ok());
        assert!(Clock::parse("*/2 * * * * *", "Europe/Paris").is_ok());
        for (cron, tz, needle) in [
            ("* * * *", "UTC", "cron: '* * * *' has 4 fields"),
            ("61 * * * *", "UTC", "cron: '61 * * * *' is invalid"),
            ("* * * * * * *", "UTC", "has 7 fields"),
            ("* * * * *", "Mars/Olympus", "timezone: 'Mars/Olympus'"),
        ] {
            let err = Clock::parse(cron, tz).unwrap_err();
            assert!(err.contains(needle), "{cron} {tz}: {err}");
        }
    }

    #[test]
    fn time_zones_move_slots() {
        let c = Clock::parse("0 9 * * *", "Europe/Paris").unwrap();
        // 09:00 in Paris in March (before DST) is 08:00 UTC.
        assert_eq!(c.next_after(at(0, 0, 0)), Some(at(8, 0, 0)));
    }

    #[test]
    fn plans_fire_on_time_slots_and_treat_missed_ones_by_policy() {
        let c = Clock::parse("*/5 * * * *", "UTC").unwrap();
        let g = chrono::Duration::seconds(3);
        // On time: fire the slot.
        let p = plan(&c, at(10, 0, 0), at(10, 0, 1), g, Missed::Skip);
        assert_eq!(p.fire, Some((at(10, 0, 0), 0)));
        assert_eq!(p.next, Some(at(10, 5, 0)));
        // Down from 10:00 to 10:16: 10:00 .. 10:15 passed.
        let p = plan(&c, at(10, 0, 0), at(10, 16, 0), g, Missed::Skip);
        assert_eq!(p.fire, None);
        assert_eq!(p.next, Some(at(10, 20, 0)));
        let p = plan(&c, at(10, 0, 0), at(10, 16, 0), g, Missed::RunOnce);
        assert_eq!(p.fire, Some((at(10, 15, 0), 4)));
        assert_eq!(p.next, Some(at(10, 20, 0)));
        // Back just after 10:15: it is on time; the three before are missed.
        let p = plan(&c, at(10, 0, 0), at(10, 15, 1), g, Missed::Skip);
        assert_eq!(p.fire, Some((at(10, 15, 0), 0)));
        let p = plan(&c, at(10, 0, 0), at(10, 15, 1), g, Missed::RunOnce);
        assert_eq!(p.fire, Some((at(10, 15, 0), 3)));
    }
}
