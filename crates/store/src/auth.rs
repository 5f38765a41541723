//! Users, their session and API tokens, and agent bootstrap tokens.
//! Secrets are never stored: only their SHA-256 hashes, computed by callers.

use chrono::{DateTime, Utc};
use drover_proto::api::Role;
use drover_proto::labels::Labels;

use crate::{from_ms, new_id, on_pool, on_write, to_ms, Error, Result, Store};

/// A user who can log in.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: String,
    username: String,
    password_hash: String,
    role: String,
    created_at: i64,
}

impl TryFrom<UserRow> for User {
    type Error = Error;
    fn try_from(r: UserRow) -> Result<User> {
        let role = Role::parse(&r.role).ok_or_else(|| Error::Corrupt {
            what: "user role",
            detail: r.role.clone(),
        })?;
        Ok(User {
            id: r.id,
            username: r.username,
            password_hash: r.password_hash,
            role,
            created_at: from_ms(r.created_at),
        })
    }
}

/// A session (from `drover login`) or API token of a user.
#[derive(Debug, Clone)]
pub struct UserToken {
    pub id: String,
    pub user_id: String,
    pub kind: String,
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What is needed to record a new user token.
#[derive(Debug, Clone)]
pub struct NewUserToken<'a> {
    pub user_id: &'a str,
    /// `session` or `api`.
    pub kind: &'a str,
    pub token_hash: &'a str,
    pub name: Option<&'a str>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// What is needed to record a new bootstrap token.
#[derive(Debug, Clone)]
pub struct NewBootstrapToken<'a> {
    pub token_hash: &'a str,
    pub labels: &'a Labels,
    pub group: Option<&'a str>,
    pub name: Option<&'a str>,
    /// Id of the user who made it.
    pub created_by: &'a str,
    pub expires_at: DateTime<Utc>,
}

/// A one-time enrollment token.
#[derive(Debug, Clone)]
pub struct BootstrapToken {
    pub id: String,
    pub labels: Labels,
    pub group: Option<String>,
    pub name: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    pub used_by_agent: Option<String>,
}

pub(crate) fn labels_to_json(labels: &Labels) -> String {
    // A BTreeMap of strings always serializes.
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) fn labels_from_json(s: &str) -> Result<Labels> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt {
        what: "labels",
        detail: e.to_string(),
    })
}

impl Store {
    /// Number of users; zero means the server has never started before.
    pub async fn count_users(&self) -> Result<i64> {
        let n: i64 = on_pool!(self, p => sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(p).await)?;
        Ok(n)
    }

    /// Creates a user. Fails with a unique violation if the name is taken.
    pub async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
        now: DateTime<Utc>,
    ) -> Result<User> {
        let id = new_id();
        let sql = "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)";
        on_write!(self, c => sqlx::query(sql)
            .bind(&id)
            .bind(username)
            .bind(password_hash)
            .bind(role.as_str())
            .bind(to_ms(now))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(User {
            id,
            username: username.to_owned(),
            password_hash: password_hash.to_owned(),
            role,
            created_at: now,
        })
    }

    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>> {
        let sql =
            "SELECT id, username, password_hash, role, created_at FROM users WHERE username = $1";
        let row: Option<UserRow> =
            on_pool!(self, p => sqlx::query_as(sql).bind(username).fetch_optional(p).await)?;
        row.map(User::try_from).transpose()
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        let sql = "SELECT id, username, password_hash, role, created_at FROM users WHERE id = $1";
        let row: Option<UserRow> =
            on_pool!(self, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await)?;
        row.map(User::try_from).transpose()
    }

    /// Records a user token and returns its id.
    pub async fn insert_user_token(
        &self,
        t: NewUserToken<'_>,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let id = new_id();
        let sql = "INSERT INTO user_tokens (id, user_id, kind, token_hash, name, created_at, expires_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7)";
        on_write!(self, c => sqlx::query(sql)
            .bind(&id)
            .bind(t.user_id)
            .bind(t.kind)
            .bind(t.token_hash)
            .bind(t.name)
            .bind(to_ms(now))
            .bind(t.expires_at.map(to_ms))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(id)
    }

    /// Finds the token with this hash and the user it belongs to.
    pub async fn user_token_by_hash(&self, token_hash: &str) -> Result<Option<(UserToken, User)>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            t_id: String,
            kind: String,
            name: Option<String>,
            t_created_at: i64,
            expires_at: Option<i64>,
            revoked_at: Option<i64>,
            #[sqlx(flatten)]
            user: UserRow,
        }
        let sql = "SELECT t.id AS t_id, t.kind, t.name, t.created_at AS t_created_at, t.expires_at, t.revoked_at, \
                   u.id, u.username, u.password_hash, u.role, u.created_at \
                   FROM user_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1";
        let row: Option<Row> =
            on_pool!(self, p => sqlx::query_as(sql).bind(token_hash).fetch_optional(p).await)?;
        let Some(r) = row else { return Ok(None) };
        let user = User::try_from(r.user)?;
        let token = UserToken {
            id: r.t_id,
            user_id: user.id.clone(),
            kind: r.kind,
            name: r.name,
            created_at: from_ms(r.t_created_at),
            expires_at: r.expires_at.map(from_ms),
            revoked_at: r.revoked_at.map(from_ms),
        };
        Ok(Some((token, user)))
    }

    /// Records a bootstrap token and returns it as stored.
    pub async fn insert_bootstrap_token(
        &self,
        t: NewBootstrapToken<'_>,
        now: DateTime<Utc>,
    ) -> Result<BootstrapToken> {
        let id = new_id();
        let sql = "INSERT INTO bootstrap_tokens (id, token_hash, labels, grp, name, created_by, created_at, expires_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        on_write!(self, c => sqlx::query(sql)
            .bind(&id)
            .bind(t.token_hash)
            .bind(labels_to_json(t.labels))
            .bind(t.group)
            .bind(t.name)
            .bind(t.created_by)
            .bind(to_ms(now))
            .bind(to_ms(t.expires_at))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(BootstrapToken {
            id,
            labels: t.labels.clone(),
            group: t.group.map(str::to_owned),
            name: t.name.map(str::to_owned),
            created_by: t.created_by.to_owned(),
            created_at: now,
            expires_at: t.expires_at,
            used_at: None,
            used_by_agent: None,
        })
    }
}
