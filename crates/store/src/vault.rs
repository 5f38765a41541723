//! The secrets vault's rows: wrapped data keys and sealed secrets. The
//! store never sees a key or a value in clear: callers seal and open.

use chrono::{DateTime, Utc};

use crate::tx::on_tx;
use crate::{from_ms, on_pool, on_write, to_ms, Error, Result, Store};

/// A data key as stored: sealed under the master key `master_key_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub id: String,
    pub master_key_id: String,
    pub wrapped: String,
}

/// A secret as stored: its value sealed, its scope and history.
#[derive(Debug, Clone)]
pub struct SecretRecord {
    pub name: String,
    pub sealed: String,
    /// Action globs it may be sent to; empty means any action.
    pub actions: Vec<String>,
    /// Selector of the agents that may receive it; `None` means any.
    pub target: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

/// What to store for a secret.
#[derive(Debug, Clone)]
pub struct NewSecret<'a> {
    pub name: &'a str,
    pub sealed: &'a str,
    pub actions: &'a [String],
    pub target: Option<&'a str>,
    pub by: &'a str,
    pub now: DateTime<Utc>,
}

type SecretRow = (
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    String,
    i64,
    String,
);

const SECRET_COLUMNS: &str =
    "name, sealed, actions, target, version, created_at, created_by, updated_at, updated_by";

fn secret_from_row(r: SecretRow) -> Result<SecretRecord> {
    let actions: Vec<String> = serde_json::from_str(&r.2).map_err(|e| Error::Corrupt {
        what: "secret actions",
        detail: format!("{}: {e}", r.0),
    })?;
    Ok(SecretRecord {
        name: r.0,
        sealed: r.1,
        actions,
        target: r.3,
        version: r.4,
        created_at: from_ms(r.5),
        created_by: r.6,
        updated_at: from_ms(r.7),
        updated_by: r.8,
    })
}

impl Store {
    /// Every wrapped data key.
    pub async fn vault_keys(&self) -> Result<Vec<WrappedKey>> {
        let sql = "SELECT id, master_key_id, wrapped FROM vault_keys ORDER BY id";
        let rows: Vec<(String, String, String)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(id, master_key_id, wrapped)| WrappedKey {
                id,
                master_key_id,
                wrapped,
            })
            .collect())
    }

    /// Stores a new data key unless one with its id exists (another replica
    /// created it first); the caller reads the keys again either way.
    pub async fn insert_vault_key(&self, key: &WrappedKey, now: DateTime<Utc>) -> Result<()> {
        on_write!(self, c => sqlx::query(
            "INSERT INTO vault_keys (id, master_key_id, wrapped, created_at, rewrapped_at) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&key.id)
        .bind(&key.master_key_id)
        .bind(&key.wrapped)
        .bind(to_ms(now))
        .execute(&mut *c)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Replaces the wrapping of data keys (a master key rotation), in one
    /// transaction. A key whose wrapping changed meanwhile (`expected`
    /// master key id no longer there) is left alone and not counted.
    pub async fn rewrap_vault_keys(
        &self,
        keys: &[(WrappedKey, String)],
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let mut tx = self.begin().await?;
        let mut n = 0;
        for (key, expected) in keys {
            n += on_tx!(&mut tx, c => sqlx::query(
                "UPDATE vault_keys SET master_key_id = $1, wrapped = $2, rewrapped_at = $3 \
                 WHERE id = $4 AND master_key_id = $5",
            )
            .bind(&key.master_key_id)
            .bind(&key.wrapped)
            .bind(to_ms(now))
            .bind(&key.id)
            .bind(expected)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Creates or replaces a secret; its version counts the values it had.
    pub async fn put_secret(&self, s: &NewSecret<'_>) -> Result<SecretRecord> {
        let actions = serde_json::to_string(s.actions).map_err(|e| Error::Corrupt {
            what: "secret actions",
            detail: e.to_string(),
        })?;
        let sql = format!(
            "INSERT INTO secrets ({SECRET_COLUMNS}) VALUES ($1, $2, $3, $4, 1, $5, $6, $5, $6) \
             ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed, actions = excluded.actions, \
             target = excluded.target, version = secrets.version + 1, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by \
             RETURNING {SECRET_COLUMNS}"
        );
        let row: SecretRow = on_write!(self, c => sqlx::query_as(&sql)
            .bind(s.name)
            .bind(s.sealed)
            .bind(&actions)
            .bind(s.target)
            .bind(to_ms(s.now))
            .bind(s.by)
            .fetch_one(&mut *c)
            .await)?;
        secret_from_row(row)
    }

    /// Every secret, by name.
    pub async fn list_secrets(&self) -> Result<Vec<SecretRecord>> {
        let sql = format!("SELECT {SECRET_COLUMNS} FROM secrets ORDER BY name");
        let rows: Vec<SecretRow> = on_pool!(self, p => sqlx::query_as(&sql).fetch_all(p).await)?;
        rows.into_iter().map(secret_from_row).collect()
    }

    /// One secret by name.
    pub async fn secret(&self, name: &str) -> Result<Option<SecretRecord>> {
        let sql = format!("SELECT {SECRET_COLUMNS} FROM secrets WHERE name = $1");
        let row: Option<SecretRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(name).fetch_optional(p).await)?;
        row.map(secret_from_row).transpose()
    }

    /// Removes a secret; false when there was none.
    pub async fn delete_secret(&self, name: &str) -> Result<bool> {
        let n = on_write!(self, c => sqlx::query("DELETE FROM secrets WHERE name = $1")
            .bind(name)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// The action and environment (references, never values) of the job
    /// an attempt belongs to, and the agent it is assigned to.
    pub async fn attempt_env(&self, attempt_id: &str) -> Result<Option<AttemptEnv>> {
        let sql =
            "SELECT j.action, j.env, a.agent_id FROM attempts a JOIN jobs j ON j.id = a.job_id \
                   WHERE a.id = $1";
        let row: Option<(String, String, String)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(attempt_id).fetch_optional(p).await)?;
        let Some((action, env, agent_id)) = row else {
            return Ok(None);
        };
        let env = serde_json::from_str(&env).map_err(|e| Error::Corrupt {
            what: "job env",
            detail: e.to_string(),
        })?;
        Ok(Some(AttemptEnv {
            action,
            env,
            agent_id,
        }))
    }

    /// Global webhooks whose secret is still in clear (`prefix` marks a
    /// sealed one): id and secret, for the back-fill at start.
    pub async fn clear_webhook_secrets(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let sql = "SELECT id, secret FROM webhooks WHERE secret NOT LIKE $1";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(format!("{prefix}%")).fetch_all(p).await)?)
    }

    /// Pending deliveries whose secret is still in clear.
    pub async fn clear_delivery_secrets(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let sql = "SELECT id, secret FROM webhook_deliveries \
                   WHERE secret IS NOT NULL AND secret NOT LIKE $1";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(format!("{prefix}%")).fetch_all(p).await)?)
    }

    /// Replaces webhook (`deliveries` false) or delivery secrets that are
    /// still what they were when read (so a concurrent change wins).
    pub async fn seal_webhook_secrets(
        &self,
        deliveries: bool,
        rows: &[(String, String, String)],
    ) -> Result<()> {
        let sql = if deliveries {
            "UPDATE webhook_deliveries SET secret = $1 WHERE id = $2 AND secret = $3"
        } else {
            "UPDATE webhooks SET secret = $1 WHERE id = $2 AND secret = $3"
        };
        let mut tx = self.begin().await?;
        for (id, old, sealed) in rows {
            on_tx!(&mut tx, c => sqlx::query(sql)
                .bind(sealed)
                .bind(id)
                .bind(old)
                .execute(&mut *c)
                .await
                .map(|_| ()))?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// What the vault needs to know about an attempt.
#[derive(Debug, Clone)]
pub struct AttemptEnv {
    pub action: String,
    pub env: std::collections::BTreeMap<String, String>,
    pub agent_id: String,
}
