//! Sandbox profiles, and whether agents and the fleet take work: drain,
//! stop (graceful or forced) and resume of one agent, and the fleet-wide
//! emergency stop.
//!
//! Key design decision: a stop is a flag on the agent (or the fleet row)
//! that dispatch and cancel checks read, not only a one-off marking of the
//! attempts that ran at the time. The marking gives each attempt its reason;
//! the flag closes the races: an attempt claimed a moment before the stop,
//! or while a crash cut the stop short, is still told to stop at its
//! agent's next poll or lease renewal.

use chrono::{DateTime, Utc};
use drover_proto::api::DispatchState;

use crate::tx::on_tx;
use crate::{from_ms, on_pool, to_ms, Error, Result, Store};

/// A profile as stored: canonical JSON and its hash.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SandboxRecord {
    pub name: String,
    pub spec: String,
    pub hash: String,
    pub updated_at: i64,
}

/// The fleet-wide stop, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetRecord {
    pub stopped_at: Option<DateTime<Utc>>,
    pub stopped_by: Option<String>,
    pub reason: Option<String>,
    pub force: bool,
}

/// Whether an agent may be given work now, and whether what it runs must
/// stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    pub fleet_stopped: bool,
    pub fleet_force: bool,
    pub agent: DispatchState,
    pub agent_force: bool,
}

impl Gate {
    /// An active agent in a running fleet.
    pub fn open() -> Gate {
        Gate {
            fleet_stopped: false,
            fleet_force: false,
            agent: DispatchState::Active,
            agent_force: false,
        }
    }

    /// What the agent runs must stop (and is not renewed).
    pub fn stopping(&self) -> bool {
        self.fleet_stopped || self.agent == DispatchState::Stopped
    }

    /// Stopping without the kill grace.
    pub fn killing(&self) -> bool {
        (self.fleet_stopped && self.fleet_force)
            || (self.agent == DispatchState::Stopped && self.agent_force)
    }
}

/// What a stop did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stopped {
    /// (attempt, agent, job) of every attempt told to stop.
    pub attempts: Vec<(String, String, String)>,
}

impl Stopped {
    pub fn agents(&self) -> Vec<String> {
        let mut a: Vec<String> = self.attempts.iter().map(|(_, a, _)| a.clone()).collect();
        a.sort();
        a.dedup();
        a
    }

    pub fn jobs(&self) -> Vec<String> {
        let mut j: Vec<String> = self.attempts.iter().map(|(_, _, j)| j.clone()).collect();
        j.sort();
        j.dedup();
        j
    }
}

impl Store {
    /// Creates or replaces a sandbox profile; unchanged when the hash is
    /// the same.
    pub async fn upsert_sandbox(
        &self,
        name: &str,
        spec_json: &str,
        hash: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<crate::jobs::Upsert> {
        self.upsert_by_hash("sandboxes", name, spec_json, hash, by, now)
            .await
    }

    pub async fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>> {
        let sql = "SELECT name, spec, hash, updated_at FROM sandboxes ORDER BY name";
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?)
    }

    /// Deletes a sandbox profile; false when there was none. Jobs keep
    /// the whole profile they were created with.
    pub async fn delete_sandbox(&self, name: &str) -> Result<bool> {
        self.delete_by_name("sandboxes", name).await
    }

    pub async fn sandbox(&self, name: &str) -> Result<Option<SandboxRecord>> {
        let sql = "SELECT name, spec, hash, updated_at FROM sandboxes WHERE name = $1";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(name).fetch_optional(p).await)?)
    }

    /// The fleet-wide stop, if any.
    pub async fn fleet(&self) -> Result<FleetRecord> {
        let sql = "SELECT stopped_at, stopped_by, reason, force FROM fleet WHERE id = 1";
        /// stopped_at, stopped_by, reason, force
        type FleetRow = (Option<i64>, Option<String>, Option<String>, i64);
        let row: Option<FleetRow> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_optional(p).await)?;
        Ok(match row {
            Some((at, by, reason, force)) => FleetRecord {
                stopped_at: at.map(from_ms),
                stopped_by: by,
                reason,
                force: force != 0,
            },
            None => FleetRecord::default(),
        })
    }

    /// Whether this agent may be given work, in one read.
    pub async fn gate(&self, agent_id: &str) -> Result<Gate> {
        let sql = "SELECT f.stopped_at, f.force, a.dispatch, a.dispatch_force \
                   FROM agents a, fleet f WHERE a.id = $1 AND f.id = 1";
        let row: Option<(Option<i64>, i64, String, i64)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(agent_id).fetch_optional(p).await)?;
        let Some((stopped_at, fleet_force, dispatch, agent_force)) = row else {
            return Err(Error::NotFound {
                what: "agent",
                id: agent_id.to_owned(),
            });
        };
        Ok(Gate {
            fleet_stopped: stopped_at.is_some(),
            fleet_force: fleet_force != 0,
            agent: DispatchState::parse(&dispatch).ok_or_else(|| Error::Corrupt {
                what: "agent dispatch state",
                detail: dispatch.clone(),
            })?,
            agent_force: agent_force != 0,
        })
    }

    /// Drains an agent (no new work; what runs finishes) or makes it take
    /// work again (`Active`). `Stopped` goes through `stop_agent`.
    pub async fn set_agent_dispatch(
        &self,
        agent_id: &str,
        dispatch: DispatchState,
        reason: Option<&str>,
    ) -> Result<()> {
        let sql = "UPDATE agents SET dispatch = $1, dispatch_reason = $2, dispatch_force = 0 WHERE id = $3";
        let mut tx = self.begin().await?;
        let done = on_tx!(&mut tx, c => sqlx::query(sql)
            .bind(dispatch.as_str())
            .bind(reason)
            .bind(agent_id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(Error::NotFound {
                what: "agent",
                id: agent_id.to_owned(),
            });
        }
        tx.changes.agents.insert(agent_id.to_owned());
        tx.commit().await?;
        Ok(())
    }

    /// Stops an agent: it takes no new work, and every attempt it has been
    /// given is told to stop (at once with `force`), in one transaction.
    pub async fn stop_agent(&self, agent_id: &str, force: bool, reason: &str) -> Result<Stopped> {
        {
            let mut tx = self.begin().await?;
            let found = on_tx!(&mut tx, c => sqlx::query(
                "UPDATE agents SET dispatch = 'stopped', dispatch_reason = $1, dispatch_force = $2 WHERE id = $3",
            )
            .bind(reason)
            .bind(i64::from(force))
            .bind(agent_id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            if found == 0 {
                tx.rollback().await?;
                return Err(Error::NotFound {
                    what: "agent",
                    id: agent_id.to_owned(),
                });
            }
            let attempts: Vec<(String, String, String)> = on_tx!(&mut tx, c => sqlx::query_as(
                "UPDATE attempts SET cancel_requested = 1, \
                 cancel_force = CASE WHEN $1 = 1 THEN 1 ELSE cancel_force END, reason = $2 \
                 WHERE agent_id = $3 AND state IN ('dispatched', 'running') \
                 RETURNING id, agent_id, job_id",
            )
            .bind(i64::from(force))
            .bind(reason)
            .bind(agent_id)
            .fetch_all(&mut *c)
            .await)?;
            tx.changes.agents.insert(agent_id.to_owned());
            tx.changes
                .jobs
                .extend(attempts.iter().map(|(_, _, job)| job.clone()));
            tx.commit().await?;
            Ok(Stopped { attempts })
        }
    }

    /// The emergency stop: dispatch pauses everywhere and every attempt
    /// given to any agent is told to stop (at once with `force`). A second
    /// stop keeps the first time and may turn a graceful stop forced.
    pub async fn stop_fleet(
        &self,
        by: &str,
        force: bool,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Stopped> {
        {
            let mut tx = self.begin().await?;
            on_tx!(&mut tx, c => sqlx::query(
                "UPDATE fleet SET stopped_at = COALESCE(stopped_at, $1), stopped_by = $2, reason = $3, \
                 force = CASE WHEN $4 = 1 THEN 1 ELSE force END WHERE id = 1",
            )
            .bind(to_ms(now))
            .bind(by)
            .bind(reason)
            .bind(i64::from(force))
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            let attempts: Vec<(String, String, String)> = on_tx!(&mut tx, c => sqlx::query_as(
                "UPDATE attempts SET cancel_requested = 1, \
                 cancel_force = CASE WHEN $1 = 1 THEN 1 ELSE cancel_force END, reason = $2 \
                 WHERE state IN ('dispatched', 'running') RETURNING id, agent_id, job_id",
            )
            .bind(i64::from(force))
            .bind(reason)
            .fetch_all(&mut *c)
            .await)?;
            tx.changes.all_agents = true;
            tx.changes
                .jobs
                .extend(attempts.iter().map(|(_, _, job)| job.clone()));
            tx.commit().await?;
            Ok(Stopped { attempts })
        }
    }

    /// Ends the emergency stop: dispatch resumes. Attempts already told to
    /// stop still stop.
    pub async fn resume_fleet(&self) -> Result<()> {
        let sql = "UPDATE fleet SET stopped_at = NULL, stopped_by = NULL, reason = NULL, force = 0 WHERE id = 1";
        let mut tx = self.begin().await?;
        on_tx!(&mut tx, c => sqlx::query(sql).execute(&mut *c).await.map(|r| r.rows_affected()))?;
        tx.changes.all_agents = true;
        tx.commit().await?;
        Ok(())
    }

    /// Number of agents (not revoked) in each dispatch state.
    pub async fn count_agents_by_dispatch(&self) -> Result<Vec<(String, i64)>> {
        let sql =
            "SELECT dispatch, COUNT(*) FROM agents WHERE revoked_at IS NULL GROUP BY dispatch";
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?)
    }
}
