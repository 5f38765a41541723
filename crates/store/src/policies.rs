//! Policies, their force-runs, the runs agents report, and group settings.
//! A policy's spec is the server's resolved JSON; the store keeps it by
//! name with its hash (`Store::upsert_by_hash`), as the catalog does.

use chrono::{DateTime, Utc};

use crate::jobs::Upsert;
use crate::tx::on_tx;
use crate::{from_ms, on_pool, on_write, to_ms, Result, Store};

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    pub name: String,
    pub spec: String,
    pub hash: String,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

/// A force-run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForceRecord {
    pub id: String,
    pub policy: String,
    pub target: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// A run an agent reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRunRecord {
    pub id: String,
    pub agent_id: String,
    pub policy: String,
    pub version: String,
    pub trigger: String,
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub output: String,
    pub error: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// Which runs a page of history holds; every field narrows it.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub agent_id: Option<String>,
    pub policy: Option<String>,
    /// The version, or a prefix of it.
    pub version: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// A group's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub name: String,
    pub poll_interval_ms: Option<i64>,
    pub updated_by: String,
    pub updated_at: DateTime<Utc>,
}

/// An agent's runs over a window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub runs: i64,
    pub failures: i64,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_poll_at: Option<DateTime<Utc>>,
}

type RunRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    i64,
    i64,
    i64,
    String,
    Option<String>,
    i64,
);

const RUN_COLUMNS: &str = "id, agent_id, policy, version, trigger_kind, outcome, exit_code, \
                           started_at, finished_at, duration_ms, output, error, received_at";

fn run_from(r: RunRow) -> PolicyRunRecord {
    PolicyRunRecord {
        id: r.0,
        agent_id: r.1,
        policy: r.2,
        version: r.3,
        trigger: r.4,
        outcome: r.5,
        exit_code: r.6.and_then(|c| i32::try_from(c).ok()),
        started_at: from_ms(r.7),
        finished_at: from_ms(r.8),
        duration_ms: r.9,
        output: r.10,
        error: r.11,
        received_at: from_ms(r.12),
    }
}

enum Bind {
    Text(String),
    Int(i64),
}

/// Escapes `%`, `_` and `\` for a LIKE pattern with `ESCAPE '\'`.
fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

impl Store {
    /// Creates or replaces policy `name`; unchanged when `hash` is.
    pub async fn upsert_policy(
        &self,
        name: &str,
        spec_json: &str,
        hash: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Upsert> {
        self.upsert_by_hash("policies", name, spec_json, hash, by, now)
            .await
    }

    /// Every policy, by name.
    pub async fn list_policies(&self) -> Result<Vec<PolicyRecord>> {
        let sql = "SELECT name, spec, hash, updated_at, updated_by FROM policies ORDER BY name";
        let rows: Vec<(String, String, String, i64, String)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|r| PolicyRecord {
                name: r.0,
                spec: r.1,
                hash: r.2,
                updated_at: from_ms(r.3),
                updated_by: r.4,
            })
            .collect())
    }

    /// Policy `name`.
    pub async fn policy(&self, name: &str) -> Result<Option<PolicyRecord>> {
        let sql = "SELECT name, spec, hash, updated_at, updated_by FROM policies WHERE name = $1";
        let row: Option<(String, String, String, i64, String)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(name).fetch_optional(p).await)?;
        Ok(row.map(|r| PolicyRecord {
            name: r.0,
            spec: r.1,
            hash: r.2,
            updated_at: from_ms(r.3),
            updated_by: r.4,
        }))
    }

    /// Removes policy `name` and its force-runs; false when there was none.
    pub async fn delete_policy(&self, name: &str) -> Result<bool> {
        let mut tx = self.begin().await?;
        let n = on_tx!(&mut tx, c => sqlx::query("DELETE FROM policies WHERE name = $1")
            .bind(name)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        on_tx!(&mut tx, c => sqlx::query("DELETE FROM policy_forces WHERE policy = $1")
            .bind(name)
            .execute(&mut *c)
            .await
            .map(|_| ()))?;
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Records a force-run of `policy`.
    pub async fn add_force(&self, f: &ForceRecord) -> Result<()> {
        let sql = "INSERT INTO policy_forces (id, policy, target, created_by, created_at) \
                   VALUES ($1, $2, $3, $4, $5)";
        on_write!(self, c => sqlx::query(sql)
            .bind(&f.id)
            .bind(&f.policy)
            .bind(&f.target)
            .bind(&f.created_by)
            .bind(to_ms(f.created_at))
            .execute(&mut *c)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Force-runs made since `since`, oldest first.
    pub async fn forces_since(&self, since: DateTime<Utc>) -> Result<Vec<ForceRecord>> {
        let sql = "SELECT id, policy, target, created_by, created_at FROM policy_forces \
                   WHERE created_at >= $1 ORDER BY created_at, id";
        let rows: Vec<(String, String, Option<String>, String, i64)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(to_ms(since)).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|r| ForceRecord {
                id: r.0,
                policy: r.1,
                target: r.2,
                created_by: r.3,
                created_at: from_ms(r.4),
            })
            .collect())
    }

    /// Stores the runs agent `agent_id` reported; a run already stored
    /// (same id) is left as it is. Returns how many were new.
    pub async fn record_policy_runs(
        &self,
        agent_id: &str,
        runs: &[PolicyRunRecord],
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let sql = format!(
            "INSERT INTO policy_runs ({RUN_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (id) DO NOTHING"
        );
        let mut tx = self.begin().await?;
        let mut added = 0;
        for r in runs {
            added += on_tx!(&mut tx, c => sqlx::query(&sql)
                .bind(&r.id)
                .bind(agent_id)
                .bind(&r.policy)
                .bind(&r.version)
                .bind(&r.trigger)
                .bind(&r.outcome)
                .bind(r.exit_code.map(i64::from))
                .bind(to_ms(r.started_at))
                .bind(to_ms(r.finished_at))
                .bind(r.duration_ms)
                .bind(&r.output)
                .bind(&r.error)
                .bind(to_ms(now))
                .execute(&mut *c)
                .await
                .map(|r| r.rows_affected()))?;
        }
        tx.commit().await?;
        Ok(added)
    }

    /// A page of runs, newest first, and how many match.
    pub async fn page_policy_runs(
        &self,
        f: &RunFilter,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<PolicyRunRecord>, i64)> {
        let mut binds: Vec<Bind> = Vec::new();
        let mut conditions: Vec<String> = Vec::new();
        let mut add = |cond: &str, value: Bind| {
            binds.push(value);
            conditions.push(cond.replace('?', &format!("${}", binds.len())));
        };
        if let Some(a) = &f.agent_id {
            add("agent_id = ?", Bind::Text(a.clone()));
        }
        if let Some(p) = &f.policy {
            add("policy = ?", Bind::Text(p.clone()));
        }
        if let Some(v) = &f.version {
            add(
                "version LIKE ? ESCAPE '\\'",
                Bind::Text(format!("{}%", like_escape(v))),
            );
        }
        if let Some(o) = &f.outcome {
            add("outcome = ?", Bind::Text(o.clone()));
        }
        if let Some(t) = f.since {
            add("started_at >= ?", Bind::Int(to_ms(t)));
        }
        if let Some(t) = f.until {
            add("started_at < ?", Bind::Int(to_ms(t)));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let n = binds.len();
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM policy_runs {filter} ORDER BY started_at DESC, id DESC \
             LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let count = format!("SELECT COUNT(*) FROM policy_runs {filter}");
        let rows: Vec<RunRow> = on_pool!(self, p => {
            let mut q = sqlx::query_as(&sql);
            for b in &binds {
                q = match b {
                    Bind::Text(s) => q.bind(s),
                    Bind::Int(i) => q.bind(*i),
                };
            }
            q.bind(limit.max(0)).bind(offset.max(0)).fetch_all(p).await
        })?;
        let total: i64 = on_pool!(self, p => {
            let mut q = sqlx::query_scalar(&count);
            for b in &binds {
                q = match b {
                    Bind::Text(s) => q.bind(s),
                    Bind::Int(i) => q.bind(*i),
                };
            }
            q.fetch_one(p).await
        })?;
        Ok((rows.into_iter().map(run_from).collect(), total))
    }

    /// Agent `agent_id`'s runs and failures since `since`, its last
    /// success ever and its last poll for its desired state.
    pub async fn agent_run_counts(
        &self,
        agent_id: &str,
        since: DateTime<Utc>,
    ) -> Result<RunCounts> {
        let sql =
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN outcome = 'succeeded' THEN 0 ELSE 1 END), 0) \
                   FROM policy_runs WHERE agent_id = $1 AND started_at >= $2";
        let (runs, failures): (i64, i64) = on_pool!(self, p => sqlx::query_as(sql)
            .bind(agent_id)
            .bind(to_ms(since))
            .fetch_one(p)
            .await)?;
        let last = "SELECT MAX(finished_at) FROM policy_runs WHERE agent_id = $1 AND outcome = 'succeeded'";
        let last_success: Option<i64> =
            on_pool!(self, p => sqlx::query_scalar(last).bind(agent_id).fetch_one(p).await)?;
        let poll = "SELECT desired_polled_at FROM agents WHERE id = $1";
        let polled: Option<Option<i64>> =
            on_pool!(self, p => sqlx::query_scalar(poll).bind(agent_id).fetch_optional(p).await)?;
        Ok(RunCounts {
            runs,
            failures,
            last_success_at: last_success.map(from_ms),
            last_poll_at: polled.flatten().map(from_ms),
        })
    }

    /// Notes that agent `agent_id` asked for its desired state at `now`;
    /// written at most every `every_ms`, so a poll usually writes nothing.
    pub async fn touch_desired_poll(
        &self,
        agent_id: &str,
        now: DateTime<Utc>,
        every_ms: i64,
    ) -> Result<()> {
        let sql = "UPDATE agents SET desired_polled_at = $1 WHERE id = $2 \
                   AND (desired_polled_at IS NULL OR desired_polled_at <= $3)";
        let stale: Option<Option<i64>> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT desired_polled_at FROM agents WHERE id = $1")
            .bind(agent_id)
            .fetch_optional(p)
            .await)?;
        let now_ms = to_ms(now);
        let due = match stale {
            None => false,
            Some(None) => true,
            Some(Some(at)) => at <= now_ms - every_ms,
        };
        if due {
            on_write!(self, c => sqlx::query(sql)
                .bind(now_ms)
                .bind(agent_id)
                .bind(now_ms - every_ms)
                .execute(&mut *c)
                .await
                .map(|_| ()))?;
        }
        Ok(())
    }

    /// Sets group `name`'s settings.
    pub async fn set_group(&self, g: &GroupRecord) -> Result<()> {
        let sql = "INSERT INTO group_settings (name, poll_interval_ms, updated_by, updated_at) \
                   VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET \
                   poll_interval_ms = excluded.poll_interval_ms, updated_by = excluded.updated_by, \
                   updated_at = excluded.updated_at";
        on_write!(self, c => sqlx::query(sql)
            .bind(&g.name)
            .bind(g.poll_interval_ms)
            .bind(&g.updated_by)
            .bind(to_ms(g.updated_at))
            .execute(&mut *c)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Every group with settings, by name.
    pub async fn list_groups(&self) -> Result<Vec<GroupRecord>> {
        let sql = "SELECT name, poll_interval_ms, updated_by, updated_at FROM group_settings ORDER BY name";
        let rows: Vec<(String, Option<i64>, String, i64)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|r| GroupRecord {
                name: r.0,
                poll_interval_ms: r.1,
                updated_by: r.2,
                updated_at: from_ms(r.3),
            })
            .collect())
    }
}
