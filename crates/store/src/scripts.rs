//! The scripts library: immutable versions of named scripts, each named by
//! the SHA-256 of its content (the caller computes it; the store keeps
//! what it is given and never updates a version).

use chrono::{DateTime, Utc};

use crate::tx::{on_tx, Tx};
use crate::{from_ms, on_pool, to_ms, Error, Result, Store};

/// A version of a script, without its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptRecord {
    pub name: String,
    pub sha256: String,
    pub interpreter: String,
    pub size: u64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// A version to add.
#[derive(Debug, Clone, Copy)]
pub struct NewScript<'a> {
    pub name: &'a str,
    pub sha256: &'a str,
    pub content: &'a str,
    pub interpreter: &'a str,
    pub by: &'a str,
    pub now: DateTime<Utc>,
}

const COLUMNS: &str = "name, sha256, interpreter, size, created_by, created_at";

type Row = (String, String, String, i64, String, i64);

fn from_row(r: Row) -> ScriptRecord {
    ScriptRecord {
        name: r.0,
        sha256: r.1,
        interpreter: r.2,
        size: u64::try_from(r.3).unwrap_or(0),
        created_by: r.4,
        created_at: from_ms(r.5),
    }
}

impl Tx {
    /// Adds a version unless that content is a version of the script
    /// already; returns the version there is and whether it is new.
    pub async fn add_script(&mut self, s: &NewScript<'_>) -> Result<(ScriptRecord, bool)> {
        let size = i64::try_from(s.content.len()).map_err(|_| Error::Corrupt {
            what: "script",
            detail: "too large".into(),
        })?;
        let insert = "INSERT INTO scripts (name, sha256, content, interpreter, size, created_by, created_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name, sha256) DO NOTHING";
        let added = on_tx!(self, c => sqlx::query(insert)
            .bind(s.name)
            .bind(s.sha256)
            .bind(s.content)
            .bind(s.interpreter)
            .bind(size)
            .bind(s.by)
            .bind(to_ms(s.now))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        let sql = format!("SELECT {COLUMNS} FROM scripts WHERE name = $1 AND sha256 = $2");
        let row: Row = on_tx!(self, c => sqlx::query_as(&sql)
            .bind(s.name)
            .bind(s.sha256)
            .fetch_one(&mut *c)
            .await)?;
        Ok((from_row(row), added == 1))
    }
}

impl Store {
    /// Every script: its latest version and how many versions it has, by
    /// name.
    pub async fn list_scripts(&self) -> Result<Vec<(ScriptRecord, u64)>> {
        // The latest version: the newest, ties broken by hash.
        let sql = "SELECT s.name, s.sha256, s.interpreter, s.size, s.created_by, s.created_at, \
                   (SELECT COUNT(*) FROM scripts c WHERE c.name = s.name) \
                   FROM scripts s WHERE NOT EXISTS (SELECT 1 FROM scripts n WHERE n.name = s.name \
                   AND (n.created_at > s.created_at OR (n.created_at = s.created_at AND n.sha256 > s.sha256))) \
                   ORDER BY s.name";
        let rows: Vec<(String, String, String, i64, String, i64, i64)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let n = u64::try_from(r.6).unwrap_or(0);
                (from_row((r.0, r.1, r.2, r.3, r.4, r.5)), n)
            })
            .collect())
    }

    /// The versions of a script, newest first; empty when there is none.
    pub async fn script_versions(&self, name: &str) -> Result<Vec<ScriptRecord>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM scripts WHERE name = $1 ORDER BY created_at DESC, sha256 DESC"
        );
        let rows: Vec<Row> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(name).fetch_all(p).await)?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    /// The full hash of the version of `name` whose hash is or starts with
    /// `version` (at least 4 hex digits).
    pub async fn resolve_script_version(&self, name: &str, version: &str) -> Result<String> {
        let what = "script version";
        let not_found = || Error::NotFound {
            what,
            id: format!("{name}@{version}"),
        };
        let valid = version.len() >= 4
            && version.len() <= 64
            && version.chars().all(|c| c.is_ascii_hexdigit());
        if !valid {
            return Err(not_found());
        }
        let pattern = format!("{}%", version.to_ascii_lowercase());
        let sql =
            "SELECT sha256 FROM scripts WHERE name = $1 AND sha256 LIKE $2 ORDER BY sha256 LIMIT 2";
        let found: Vec<String> = on_pool!(self, p => sqlx::query_scalar(sql).bind(name).bind(&pattern).fetch_all(p).await)?;
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(not_found()),
            _ => Err(Error::Ambiguous {
                what,
                prefix: format!("{name}@{version}"),
            }),
        }
    }

    /// A version and its content.
    pub async fn script_content(
        &self,
        name: &str,
        sha256: &str,
    ) -> Result<Option<(ScriptRecord, String)>> {
        let sql = format!("SELECT {COLUMNS}, content FROM scripts WHERE name = $1 AND sha256 = $2");
        let row: Option<(String, String, String, i64, String, i64, String)> = on_pool!(self, p => sqlx::query_as(&sql)
            .bind(name)
            .bind(sha256)
            .fetch_optional(p)
            .await)?;
        Ok(row.map(|r| (from_row((r.0, r.1, r.2, r.3, r.4, r.5)), r.6)))
    }
}
