//! Server-side schedules and their slots. The store knows nothing of cron:
//! the server computes slot times; the store keeps each schedule's next
//! slot and, per slot, one row whose primary key `(schedule, slot_at)` is
//! the unique slot key that lets only one server process fire a slot.

use chrono::{DateTime, Utc};

use crate::tx::{on_tx, Tx};
use crate::{from_ms, on_pool, to_ms, Result, Store};

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleRecord {
    pub name: String,
    /// `action` or `workflow`.
    pub kind: String,
    /// JSON of what to start.
    pub spec: String,
    pub cron: String,
    pub timezone: String,
    pub overlap: String,
    pub missed: String,
    pub paused: bool,
    /// The creator's limits when the schedule was made (JSON).
    pub scope: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The first slot not yet looked at; `None` while paused.
    pub next_slot: Option<DateTime<Utc>>,
}

/// A schedule to create or replace.
#[derive(Debug, Clone, Copy)]
pub struct NewSchedule<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub spec: &'a str,
    pub cron: &'a str,
    pub timezone: &'a str,
    pub overlap: &'a str,
    pub missed: &'a str,
    pub scope: Option<&'a str>,
    pub by: &'a str,
    pub next_slot: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// A slot a schedule fired or skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    pub schedule: String,
    pub slot_at: DateTime<Utc>,
    /// `started`, `skipped` or `failed`.
    pub outcome: String,
    /// `job:ID` or `run:ID` when it started something.
    pub target: Option<String>,
    pub detail: String,
    /// Earlier slots this one stands for (a catch-up after downtime).
    pub missed: u64,
    pub claimed_at: DateTime<Utc>,
}

/// A slot to claim.
#[derive(Debug, Clone, Copy)]
pub struct SlotClaim<'a> {
    pub schedule: &'a str,
    pub slot_at: DateTime<Utc>,
    pub outcome: &'a str,
    pub target: Option<&'a str>,
    pub detail: &'a str,
    pub missed: u64,
    pub now: DateTime<Utc>,
}

const COLUMNS: &str = "name, kind, spec, cron, timezone, overlap, missed, paused, scope, \
                       created_by, created_at, updated_at, next_slot";

type Row = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
    String,
    i64,
    i64,
    Option<i64>,
);

fn from_row(r: Row) -> ScheduleRecord {
    ScheduleRecord {
        name: r.0,
        kind: r.1,
        spec: r.2,
        cron: r.3,
        timezone: r.4,
        overlap: r.5,
        missed: r.6,
        paused: r.7 != 0,
        scope: r.8,
        created_by: r.9,
        created_at: from_ms(r.10),
        updated_at: from_ms(r.11),
        next_slot: r.12.map(from_ms),
    }
}

const SLOT_COLUMNS: &str = "schedule, slot_at, outcome, target, detail, missed, claimed_at";

type SlotRow = (String, i64, String, Option<String>, String, i64, i64);

fn slot_from_row(r: SlotRow) -> SlotRecord {
    SlotRecord {
        schedule: r.0,
        slot_at: from_ms(r.1),
        outcome: r.2,
        target: r.3,
        detail: r.4,
        missed: u64::try_from(r.5).unwrap_or(0),
        claimed_at: from_ms(r.6),
    }
}

impl Tx {
    /// Creates a schedule, or replaces the one of that name (keeping its
    /// creation time and its slots, unpausing it); returns whether it is
    /// new.
    pub async fn put_schedule(&mut self, s: &NewSchedule<'_>) -> Result<bool> {
        let sql =
            "INSERT INTO schedules (name, kind, spec, cron, timezone, overlap, missed, paused, \
                   scope, created_by, created_at, updated_at, next_slot) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10, $10, $11) \
                   ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, spec = excluded.spec, \
                   cron = excluded.cron, timezone = excluded.timezone, overlap = excluded.overlap, \
                   missed = excluded.missed, paused = 0, scope = excluded.scope, \
                   created_by = excluded.created_by, updated_at = excluded.updated_at, \
                   next_slot = excluded.next_slot \
                   RETURNING created_at = updated_at";
        let created: bool = on_tx!(self, c => sqlx::query_scalar(sql)
            .bind(s.name)
            .bind(s.kind)
            .bind(s.spec)
            .bind(s.cron)
            .bind(s.timezone)
            .bind(s.overlap)
            .bind(s.missed)
            .bind(s.scope)
            .bind(s.by)
            .bind(to_ms(s.now))
            .bind(s.next_slot.map(to_ms))
            .fetch_one(&mut *c)
            .await)?;
        Ok(created)
    }

    /// Pauses (`next_slot` None) or resumes (from `next_slot`) a schedule;
    /// false when there is none of that name.
    pub async fn set_schedule_paused(
        &mut self,
        name: &str,
        paused: bool,
        next_slot: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let sql =
            "UPDATE schedules SET paused = $2, next_slot = $3, updated_at = $4 WHERE name = $1";
        let n = on_tx!(self, c => sqlx::query(sql)
            .bind(name)
            .bind(i64::from(paused))
            .bind(next_slot.map(to_ms))
            .bind(to_ms(now))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// Removes a schedule and its slots; false when there is none.
    pub async fn delete_schedule(&mut self, name: &str) -> Result<bool> {
        let n = on_tx!(self, c => sqlx::query("DELETE FROM schedules WHERE name = $1")
            .bind(name)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        on_tx!(self, c => sqlx::query("DELETE FROM schedule_slots WHERE schedule = $1")
            .bind(name)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// Claims a slot: true when this transaction's row is the slot's, false
    /// when another claim has it. On PostgreSQL a concurrent claim of the
    /// same slot waits for this transaction and then loses (or wins, if
    /// this one rolls back), so a slot is fired by one process only when
    /// the work it starts is in the same transaction.
    pub async fn claim_slot(&mut self, s: &SlotClaim<'_>) -> Result<bool> {
        let sql = "INSERT INTO schedule_slots (schedule, slot_at, outcome, target, detail, missed, claimed_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (schedule, slot_at) DO NOTHING";
        let n = on_tx!(self, c => sqlx::query(sql)
            .bind(s.schedule)
            .bind(to_ms(s.slot_at))
            .bind(s.outcome)
            .bind(s.target)
            .bind(s.detail)
            .bind(i64::try_from(s.missed).unwrap_or(i64::MAX))
            .bind(to_ms(s.now))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }
}

impl Store {
    /// One schedule.
    pub async fn schedule(&self, name: &str) -> Result<Option<ScheduleRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM schedules WHERE name = $1");
        let row: Option<Row> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(name).fetch_optional(p).await)?;
        Ok(row.map(from_row))
    }

    /// Every schedule, by name.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM schedules ORDER BY name");
        let rows: Vec<Row> = on_pool!(self, p => sqlx::query_as(&sql).fetch_all(p).await)?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    /// Unpaused schedules whose next slot is at or before `now`.
    pub async fn due_schedules(&self, now: DateTime<Utc>) -> Result<Vec<ScheduleRecord>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM schedules WHERE paused = 0 AND next_slot IS NOT NULL \
             AND next_slot <= $1 ORDER BY next_slot, name"
        );
        let rows: Vec<Row> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(to_ms(now)).fetch_all(p).await)?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    /// The earliest next slot of any unpaused schedule.
    pub async fn earliest_slot(&self) -> Result<Option<DateTime<Utc>>> {
        let sql = "SELECT MIN(next_slot) FROM schedules WHERE paused = 0";
        let t: Option<i64> = on_pool!(self, p => sqlx::query_scalar(sql).fetch_one(p).await)?;
        Ok(t.map(from_ms))
    }

    /// Moves a schedule's next slot from `from` to `to`; false when it is
    /// no longer at `from` (another process moved it, or it was paused or
    /// replaced).
    pub async fn advance_schedule(
        &self,
        name: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<bool> {
        let sql =
            "UPDATE schedules SET next_slot = $3 WHERE name = $1 AND next_slot = $2 AND paused = 0";
        let n = crate::on_write!(self, c => sqlx::query(sql)
            .bind(name)
            .bind(to_ms(from))
            .bind(to_ms(to))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// A schedule's slots, newest first.
    pub async fn schedule_slots(&self, name: &str, limit: i64) -> Result<Vec<SlotRecord>> {
        let sql = format!(
            "SELECT {SLOT_COLUMNS} FROM schedule_slots WHERE schedule = $1 \
             ORDER BY slot_at DESC LIMIT $2"
        );
        let rows: Vec<SlotRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(name).bind(limit).fetch_all(p).await)?;
        Ok(rows.into_iter().map(slot_from_row).collect())
    }

    /// The newest slot of a schedule that started something.
    pub async fn last_started_slot(&self, name: &str) -> Result<Option<SlotRecord>> {
        let sql = format!(
            "SELECT {SLOT_COLUMNS} FROM schedule_slots WHERE schedule = $1 AND outcome = 'started' \
             ORDER BY slot_at DESC LIMIT 1"
        );
        let row: Option<SlotRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(name).fetch_optional(p).await)?;
        Ok(row.map(slot_from_row))
    }
}
