//! Agents: enrollment, refresh-token rotation, heartbeats, labels, revocation.

use chrono::{DateTime, Utc};
use drover_proto::agent::Inventory;
use drover_proto::api::DispatchState;
use drover_proto::labels::Labels;

use crate::auth::{labels_from_json, labels_to_json};
use crate::tx::{on_tx, Tx};
use crate::{from_ms, on_pool, on_write, to_ms, Error, Result, Store};

/// An agent's health, as the store can select it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentHealth {
    Online,
    Stale,
    Offline,
    Revoked,
}

/// The moments that divide online from stale from offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCut {
    /// Seen at or after this: online.
    pub online_since: DateTime<Utc>,
    /// Seen at or after this (and before `online_since`): stale.
    pub stale_since: DateTime<Utc>,
}

/// An agent as stored.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    pub id: String,
    pub hostname: String,
    pub labels: Labels,
    pub group: Option<String>,
    pub agent_version: Option<String>,
    pub enrolled_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub inventory: Option<Inventory>,
    /// The refresh-token family the agent may use; `None` once ended.
    pub session_id: Option<String>,
    pub session_ended_reason: Option<String>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_reason: Option<String>,
    /// Whether it takes new work, and who changed that, when and why.
    pub dispatch: DispatchState,
    pub dispatch_reason: Option<String>,
    /// A stop that kills at once.
    pub dispatch_force: bool,
    /// When `drover agents rm` removed it (a revoked agent): the row stays
    /// for the history of its attempts, hidden from listings and targets.
    pub removed_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct AgentRow {
    id: String,
    hostname: String,
    labels: String,
    grp: Option<String>,
    agent_version: Option<String>,
    enrolled_at: i64,
    last_seen_at: Option<i64>,
    inventory: Option<String>,
    session_id: Option<String>,
    session_ended_reason: Option<String>,
    revoked_at: Option<i64>,
    revoked_reason: Option<String>,
    dispatch: String,
    dispatch_reason: Option<String>,
    dispatch_force: i64,
    removed_at: Option<i64>,
}

const AGENT_COLUMNS: &str =
    "id, hostname, labels, grp, agent_version, enrolled_at, last_seen_at, inventory, \
                             session_id, session_ended_reason, revoked_at, revoked_reason, \
                             dispatch, dispatch_reason, dispatch_force, removed_at";

impl TryFrom<AgentRow> for AgentRecord {
    type Error = Error;
    fn try_from(r: AgentRow) -> Result<AgentRecord> {
        let inventory = match r.inventory {
            Some(s) => Some(serde_json::from_str(&s).map_err(|e| Error::Corrupt {
                what: "agent inventory",
                detail: e.to_string(),
            })?),
            None => None,
        };
        let dispatch = DispatchState::parse(&r.dispatch).ok_or_else(|| Error::Corrupt {
            what: "agent dispatch state",
            detail: r.dispatch.clone(),
        })?;
        Ok(AgentRecord {
            dispatch,
            dispatch_reason: r.dispatch_reason,
            dispatch_force: r.dispatch_force != 0,
            labels: labels_from_json(&r.labels)?,
            id: r.id,
            hostname: r.hostname,
            group: r.grp,
            agent_version: r.agent_version,
            enrolled_at: from_ms(r.enrolled_at),
            last_seen_at: r.last_seen_at.map(from_ms),
            inventory,
            session_id: r.session_id,
            session_ended_reason: r.session_ended_reason,
            revoked_at: r.revoked_at.map(from_ms),
            revoked_reason: r.revoked_reason,
            removed_at: r.removed_at.map(from_ms),
        })
    }
}

/// What enrollment records about a new agent.
#[derive(Debug, Clone)]
pub struct NewAgent<'a> {
    pub id: &'a str,
    pub hostname: &'a str,
    pub agent_version: &'a str,
    pub session_id: &'a str,
    pub refresh_token_hash: &'a str,
    pub refresh_expires_at: DateTime<Utc>,
}

/// The result of trading a bootstrap token.
#[derive(Debug)]
pub enum EnrollOutcome {
    Enrolled(Box<AgentRecord>),
    TokenUnknown,
    TokenUsed { used_at: DateTime<Utc> },
    TokenExpired { expired_at: DateTime<Utc> },
    TokenRevoked { revoked_at: DateTime<Utc> },
}

/// A refresh token presented for rotation.
#[derive(Debug, Clone, Copy)]
pub struct RefreshRotation<'a> {
    /// The presented token's hash.
    pub old_hash: &'a str,
    /// Its successor's hash. The caller derives the successor from the
    /// presented token rather than drawing it at random, so that the same
    /// token presented again maps to the same successor.
    pub new_hash: &'a str,
    pub new_expires_at: DateTime<Utc>,
    /// How long after its rotation a token may be presented again without
    /// ending the session: only if `new_hash` is the successor recorded at
    /// that rotation, that successor was never used, and the session is still
    /// current. The answer to the rotation was then lost (a cut link, a
    /// server that died before answering), and the caller hands out the same
    /// successor again. Zero turns this off.
    pub grace: std::time::Duration,
}

/// The result of presenting a refresh token.
#[derive(Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was valid; the new one is now the only valid one.
    Rotated {
        agent_id: String,
        session_id: String,
    },
    /// The token was rotated moments ago but its successor was never used:
    /// the answer was lost. Nothing changed; the successor stands.
    Repeated {
        agent_id: String,
        session_id: String,
    },
    /// The token had already been rotated: the agent's session is ended.
    Reused {
        agent_id: String,
    },
    Unknown,
    Expired,
    AgentRevoked {
        reason: Option<String>,
    },
    SessionEnded {
        reason: Option<String>,
    },
}

/// session_id, session_ended_reason, revoked_at, revoked_reason
type AgentAuthRow = (Option<String>, Option<String>, Option<i64>, Option<String>);

/// What decides whether an agent's refresh token may still be honoured.
async fn agent_auth(tx: &mut Tx, agent_id: &str) -> Result<Option<AgentAuthRow>> {
    let row = on_tx!(tx, c => sqlx::query_as(
        "SELECT session_id, session_ended_reason, revoked_at, revoked_reason FROM agents WHERE id = $1",
    )
    .bind(agent_id)
    .fetch_optional(&mut *c)
    .await)?;
    Ok(row)
}

fn grace_ms(grace: std::time::Duration) -> i64 {
    i64::try_from(grace.as_millis()).unwrap_or(i64::MAX)
}

/// Counts of agents by health, as of one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentCounts {
    pub online: i64,
    pub stale: i64,
    pub offline: i64,
    pub revoked: i64,
}

impl Store {
    /// Trades a bootstrap token (by hash) for a new agent and its first
    /// refresh token, atomically: a token enrolls at most one agent.
    pub async fn enroll_agent(
        &self,
        bootstrap_hash: &str,
        agent: NewAgent<'_>,
        now: DateTime<Utc>,
    ) -> Result<EnrollOutcome> {
        {
            let mut tx = self.begin().await?;
            let claimed: Option<(String, Option<String>)> = on_tx!(&mut tx, c => sqlx::query_as(
                "UPDATE bootstrap_tokens SET used_at = $1, used_by_agent = $2 \
                 WHERE token_hash = $3 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $1 \
                 RETURNING labels, grp",
            )
            .bind(to_ms(now))
            .bind(agent.id)
            .bind(bootstrap_hash)
            .fetch_optional(&mut *c)
            .await)?;
            let Some((labels, grp)) = claimed else {
                let found: Option<(Option<i64>, i64, Option<i64>)> = on_tx!(&mut tx, c => sqlx::query_as(
                    "SELECT used_at, expires_at, revoked_at FROM bootstrap_tokens WHERE token_hash = $1",
                )
                .bind(bootstrap_hash)
                .fetch_optional(&mut *c)
                .await)?;
                tx.rollback().await?;
                return Ok(match found {
                    None => EnrollOutcome::TokenUnknown,
                    Some((Some(used), _, _)) => EnrollOutcome::TokenUsed {
                        used_at: from_ms(used),
                    },
                    Some((None, _, Some(revoked))) => EnrollOutcome::TokenRevoked {
                        revoked_at: from_ms(revoked),
                    },
                    Some((None, expires, None)) => EnrollOutcome::TokenExpired {
                        expired_at: from_ms(expires),
                    },
                });
            };
            on_tx!(&mut tx, c => sqlx::query(
                "INSERT INTO agents (id, hostname, labels, grp, agent_version, enrolled_at, session_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(agent.id)
            .bind(agent.hostname)
            .bind(&labels)
            .bind(&grp)
            .bind(agent.agent_version)
            .bind(to_ms(now))
            .bind(agent.session_id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            on_tx!(&mut tx, c => sqlx::query(
                "INSERT INTO agent_refresh_tokens (token_hash, agent_id, session_id, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(agent.refresh_token_hash)
            .bind(agent.id)
            .bind(agent.session_id)
            .bind(to_ms(now))
            .bind(to_ms(agent.refresh_expires_at))
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            tx.commit().await?;
            Ok(EnrollOutcome::Enrolled(Box::new(AgentRecord {
                id: agent.id.to_owned(),
                hostname: agent.hostname.to_owned(),
                labels: labels_from_json(&labels)?,
                group: grp,
                agent_version: Some(agent.agent_version.to_owned()),
                enrolled_at: now,
                last_seen_at: None,
                inventory: None,
                session_id: Some(agent.session_id.to_owned()),
                session_ended_reason: None,
                revoked_at: None,
                revoked_reason: None,
                dispatch: DispatchState::Active,
                dispatch_reason: None,
                dispatch_force: false,
                removed_at: None,
            })))
        }
    }

    /// Presents a refresh token (by hash). If it is the current one of a live
    /// session, it is marked used and `rotation.new_hash` becomes the current
    /// one. If it was already used, the whole session is ended (reuse
    /// detection) — unless its rotation's answer was evidently lost: see
    /// [`RefreshRotation::grace`].
    pub async fn rotate_refresh_token(
        &self,
        rotation: RefreshRotation<'_>,
        now: DateTime<Utc>,
    ) -> Result<RefreshOutcome> {
        let RefreshRotation {
            old_hash,
            new_hash,
            new_expires_at,
            grace,
        } = rotation;
        let mut tx = self.begin().await?;
        let claimed: Option<(String, String, i64)> = on_tx!(&mut tx, c => sqlx::query_as(
            "UPDATE agent_refresh_tokens SET used_at = $1, successor_hash = $2 \
             WHERE token_hash = $3 AND used_at IS NULL \
             RETURNING agent_id, session_id, expires_at",
        )
        .bind(to_ms(now))
        .bind(new_hash)
        .bind(old_hash)
        .fetch_optional(&mut *c)
        .await)?;
        let Some((agent_id, session_id, expires_at)) = claimed else {
            /// agent_id, session_id, used_at, successor_hash
            type UsedRow = (String, String, Option<i64>, Option<String>);
            let found: Option<UsedRow> = on_tx!(&mut tx, c => sqlx::query_as(
                "SELECT agent_id, session_id, used_at, successor_hash \
                 FROM agent_refresh_tokens WHERE token_hash = $1",
            )
            .bind(old_hash)
            .fetch_optional(&mut *c)
            .await)?;
            let Some((agent_id, session_id, used_at, successor)) = found else {
                tx.rollback().await?;
                return Ok(RefreshOutcome::Unknown);
            };
            let in_grace = !grace.is_zero()
                && used_at.is_some_and(|used| to_ms(now) - used <= grace_ms(grace))
                && successor.as_deref() == Some(new_hash);
            // Lock the successor while checking it was never used, so that
            // a rotation of it running at the same time either finishes
            // first (and this is reuse) or waits for this answer.
            let successor_unused = in_grace
                && on_tx!(&mut tx, c => sqlx::query_as::<_, (String,)>(
                    "UPDATE agent_refresh_tokens SET used_at = NULL \
                     WHERE token_hash = $1 AND session_id = $2 AND used_at IS NULL \
                     AND expires_at > $3 \
                     RETURNING token_hash",
                )
                .bind(new_hash)
                .bind(&session_id)
                .bind(to_ms(now))
                .fetch_optional(&mut *c)
                .await)?
                .is_some();
            if successor_unused {
                let outcome = match agent_auth(&mut tx, &agent_id).await? {
                    None => RefreshOutcome::Unknown,
                    Some((_, _, Some(_), reason)) => RefreshOutcome::AgentRevoked { reason },
                    Some((current, reason, None, _))
                        if current.as_deref() != Some(session_id.as_str()) =>
                    {
                        RefreshOutcome::SessionEnded { reason }
                    }
                    Some(_) => RefreshOutcome::Repeated {
                        agent_id,
                        session_id,
                    },
                };
                tx.rollback().await?;
                return Ok(outcome);
            }
            // A rotated token came back: whoever holds the family is not
            // to be trusted any more. End the session it belongs to.
            on_tx!(&mut tx, c => sqlx::query(
                "UPDATE agents SET session_id = NULL, session_ended_reason = $1 \
                 WHERE id = $2 AND session_id = $3",
            )
            .bind("refresh token reuse detected")
            .bind(&agent_id)
            .bind(&session_id)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused { agent_id });
        };
        let outcome = match agent_auth(&mut tx, &agent_id).await? {
            None => RefreshOutcome::Unknown,
            Some((_, _, Some(_), reason)) => RefreshOutcome::AgentRevoked { reason },
            Some((current, reason, None, _)) if current.as_deref() != Some(session_id.as_str()) => {
                RefreshOutcome::SessionEnded { reason }
            }
            Some(_) if expires_at <= to_ms(now) => RefreshOutcome::Expired,
            Some(_) => RefreshOutcome::Rotated {
                agent_id: agent_id.clone(),
                session_id: session_id.clone(),
            },
        };
        if !matches!(outcome, RefreshOutcome::Rotated { .. }) {
            tx.rollback().await?;
            return Ok(outcome);
        }
        on_tx!(&mut tx, c => sqlx::query(
            "INSERT INTO agent_refresh_tokens (token_hash, agent_id, session_id, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(new_hash)
        .bind(&agent_id)
        .bind(&session_id)
        .bind(to_ms(now))
        .bind(to_ms(new_expires_at))
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Records a heartbeat if the agent exists, is not revoked and `session_id`
    /// is its current session. Returns false otherwise (ask `agent` why).
    pub async fn record_heartbeat(
        &self,
        agent_id: &str,
        session_id: &str,
        inventory: &Inventory,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let json = serde_json::to_string(inventory).map_err(|e| Error::Corrupt {
            what: "agent inventory",
            detail: e.to_string(),
        })?;
        let sql = "UPDATE agents SET last_seen_at = $1, inventory = $2, agent_version = $3, hostname = $4 \
                   WHERE id = $5 AND session_id = $6 AND revoked_at IS NULL";
        let done = on_write!(self, c => sqlx::query(sql)
            .bind(to_ms(now))
            .bind(json)
            .bind(&inventory.agent_version)
            .bind(&inventory.hostname)
            .bind(agent_id)
            .bind(session_id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// One agent by its full id.
    pub async fn agent(&self, id: &str) -> Result<Option<AgentRecord>> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1");
        let row: Option<AgentRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(id).fetch_optional(p).await)?;
        row.map(AgentRecord::try_from).transpose()
    }

    /// All agents but removed ones, oldest enrollment first.
    pub async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE removed_at IS NULL ORDER BY enrolled_at, id"
        );
        let rows: Vec<AgentRow> = on_pool!(self, p => sqlx::query_as(&sql).fetch_all(p).await)?;
        rows.into_iter().map(AgentRecord::try_from).collect()
    }

    /// One page of agents (oldest enrollment first), optionally only those
    /// in one health state, and how many there are in all: health as
    /// `count_agents` counts it (online if seen at or after
    /// `health.online_since`, stale if at or after `health.stale_since`).
    pub async fn page_agents(
        &self,
        only: Option<AgentHealth>,
        health: HealthCut,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<AgentRecord>, i64)> {
        let cond = match only {
            None => "",
            Some(AgentHealth::Online) => " AND revoked_at IS NULL AND last_seen_at >= $1",
            Some(AgentHealth::Stale) => {
                " AND revoked_at IS NULL AND last_seen_at < $1 AND last_seen_at >= $2"
            }
            Some(AgentHealth::Offline) => {
                " AND revoked_at IS NULL AND (last_seen_at IS NULL OR last_seen_at < $2)"
            }
            Some(AgentHealth::Revoked) => " AND revoked_at IS NOT NULL",
        };
        // Both thresholds are always bound; `$1 = $1` keeps PostgreSQL
        // from refusing a parameter the condition does not use.
        let base = format!("FROM agents WHERE removed_at IS NULL AND ($1 = $1 AND $2 = $2){cond}");
        let (online, stale) = (to_ms(health.online_since), to_ms(health.stale_since));
        let count_sql = format!("SELECT COUNT(*) {base}");
        let total: i64 = on_pool!(self, p => sqlx::query_scalar(&count_sql)
            .bind(online)
            .bind(stale)
            .fetch_one(p)
            .await)?;
        let sql =
            format!("SELECT {AGENT_COLUMNS} {base} ORDER BY enrolled_at, id LIMIT $3 OFFSET $4");
        let rows: Vec<AgentRow> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(online)
            .bind(stale)
            .bind(limit)
            .bind(offset)
            .fetch_all(p)
            .await)?;
        let agents = rows
            .into_iter()
            .map(AgentRecord::try_from)
            .collect::<Result<_>>()?;
        Ok((agents, total))
    }

    /// Resolves a full agent id or a unique prefix of one (at least 4
    /// chars); removed agents are not found.
    pub async fn resolve_agent_id(&self, id_or_prefix: &str) -> Result<String> {
        self.resolve_id_where("agents", "agent", "removed_at IS NULL", id_or_prefix)
            .await
    }

    /// Sets or clears an agent's group.
    pub async fn set_agent_group(&self, id: &str, group: Option<&str>) -> Result<()> {
        let done = on_write!(self, c => sqlx::query("UPDATE agents SET grp = $1 WHERE id = $2 AND removed_at IS NULL")
            .bind(group)
            .bind(id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(Error::NotFound {
                what: "agent",
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    /// Removes a revoked agent: hidden from listings, id resolution and
    /// targets from now on, its refresh tokens deleted. The row stays, so
    /// the attempts it ran keep their agent. False when the agent is not
    /// revoked (or already removed, or unknown).
    pub async fn remove_agent(&self, id: &str, now: DateTime<Utc>) -> Result<bool> {
        let mut tx = self.begin().await?;
        let done = on_tx!(&mut tx, c => sqlx::query(
            "UPDATE agents SET removed_at = $1 WHERE id = $2 AND revoked_at IS NOT NULL AND removed_at IS NULL",
        )
        .bind(to_ms(now))
        .bind(id)
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Ok(false);
        }
        on_tx!(&mut tx, c => sqlx::query("DELETE FROM agent_refresh_tokens WHERE agent_id = $1")
            .bind(id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        tx.changes.agents.insert(id.to_owned());
        tx.commit().await?;
        Ok(true)
    }

    /// Resolves a full id or a unique prefix (at least 4 characters of hex
    /// digits and dashes) of a row of `table`, a name fixed in the code.
    pub(crate) async fn resolve_id(
        &self,
        table: &'static str,
        what: &'static str,
        id_or_prefix: &str,
    ) -> Result<String> {
        self.resolve_id_where(table, what, "TRUE", id_or_prefix)
            .await
    }

    /// [`Store::resolve_id`] among the rows for which `filter`, an SQL
    /// condition fixed in the code, holds.
    pub(crate) async fn resolve_id_where(
        &self,
        table: &'static str,
        what: &'static str,
        filter: &'static str,
        id_or_prefix: &str,
    ) -> Result<String> {
        let not_found = || Error::NotFound {
            what,
            id: id_or_prefix.to_owned(),
        };
        let exact = format!("SELECT id FROM {table} WHERE id = $1 AND {filter}");
        let found: Option<String> = on_pool!(self, p => sqlx::query_scalar(&exact).bind(id_or_prefix).fetch_optional(p).await)?;
        if let Some(id) = found {
            return Ok(id);
        }
        let valid = id_or_prefix.len() >= 4
            && id_or_prefix
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-');
        if !valid {
            return Err(not_found());
        }
        let pattern = format!("{}%", id_or_prefix.to_ascii_lowercase());
        let by_prefix =
            format!("SELECT id FROM {table} WHERE id LIKE $1 AND {filter} ORDER BY id LIMIT 2");
        let ids: Vec<String> =
            on_pool!(self, p => sqlx::query_scalar(&by_prefix).bind(&pattern).fetch_all(p).await)?;
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(not_found()),
            _ => Err(Error::Ambiguous {
                what,
                prefix: id_or_prefix.to_owned(),
            }),
        }
    }

    /// Replaces an agent's labels.
    pub async fn set_agent_labels(&self, id: &str, labels: &Labels) -> Result<()> {
        let done = on_write!(self, c => sqlx::query("UPDATE agents SET labels = $1 WHERE id = $2")
            .bind(labels_to_json(labels))
            .bind(id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(Error::NotFound {
                what: "agent",
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    /// Revokes an agent: its credentials stop working at its next request.
    /// Revoking twice keeps the first time and reason.
    pub async fn revoke_agent(&self, id: &str, reason: &str, now: DateTime<Utc>) -> Result<()> {
        let sql = "UPDATE agents SET revoked_at = COALESCE(revoked_at, $1), \
                   revoked_reason = COALESCE(revoked_reason, $2), session_id = NULL, \
                   session_ended_reason = COALESCE(session_ended_reason, 'agent revoked') \
                   WHERE id = $3";
        let mut tx = self.begin().await?;
        let done = on_tx!(&mut tx, c => sqlx::query(sql)
            .bind(to_ms(now))
            .bind(reason)
            .bind(id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(Error::NotFound {
                what: "agent",
                id: id.to_owned(),
            });
        }
        tx.changes.agents.insert(id.to_owned());
        tx.commit().await?;
        Ok(())
    }

    /// Counts agents by health: online if seen at or after `online_since`,
    /// stale if seen at or after `stale_since`, offline otherwise.
    pub async fn count_agents(
        &self,
        online_since: DateTime<Utc>,
        stale_since: DateTime<Utc>,
    ) -> Result<AgentCounts> {
        let sql = "SELECT \
            COALESCE(SUM(CASE WHEN revoked_at IS NULL AND last_seen_at >= $1 THEN 1 ELSE 0 END), 0), \
            COALESCE(SUM(CASE WHEN revoked_at IS NULL AND last_seen_at < $1 AND last_seen_at >= $2 THEN 1 ELSE 0 END), 0), \
            COALESCE(SUM(CASE WHEN revoked_at IS NULL AND (last_seen_at IS NULL OR last_seen_at < $2) THEN 1 ELSE 0 END), 0), \
            COALESCE(SUM(CASE WHEN revoked_at IS NOT NULL THEN 1 ELSE 0 END), 0) \
            FROM agents WHERE removed_at IS NULL";
        let (online, stale, offline, revoked): (i64, i64, i64, i64) = on_pool!(self, p => sqlx::query_as(sql)
            .bind(to_ms(online_since))
            .bind(to_ms(stale_since))
            .fetch_one(p)
            .await)?;
        Ok(AgentCounts {
            online,
            stale,
            offline,
            revoked,
        })
    }
}
