//! Users, their session and API tokens, and agent bootstrap tokens.
//! Secrets are never stored: only their SHA-256 hashes, computed by callers.

use chrono::{DateTime, Utc};
use drover_proto::access::Scope;
use drover_proto::api::Role;
use drover_proto::labels::Labels;

use crate::tx::on_tx;
use crate::{from_ms, new_id, on_pool, on_write, to_ms, Error, Result, Store};

/// A user who can log in.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    /// Where the user may act; everywhere when empty.
    pub scope: Scope,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: String,
    username: String,
    password_hash: String,
    role: String,
    scope_target: Option<String>,
    scope_actions: Option<String>,
    created_at: i64,
    disabled_at: Option<i64>,
}

/// The columns of a user, in `UserRow`'s order.
const USER_COLUMNS: &str =
    "id, username, password_hash, role, scope_target, scope_actions, created_at, disabled_at";

/// A scope as two columns: the target, and the globs as a JSON array
/// (NULL when there are none).
pub(crate) fn scope_columns(scope: &Scope) -> (Option<&str>, Option<String>) {
    let actions = (!scope.actions.is_empty())
        .then(|| serde_json::to_string(&scope.actions).unwrap_or_else(|_| "[]".to_owned()));
    (scope.target.as_deref(), actions)
}

pub(crate) fn scope_from_columns(target: Option<String>, actions: Option<String>) -> Result<Scope> {
    let actions = match actions {
        Some(json) => serde_json::from_str(&json).map_err(|e| Error::Corrupt {
            what: "scope actions",
            detail: e.to_string(),
        })?,
        None => Vec::new(),
    };
    Ok(Scope { target, actions })
}

fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| Error::Corrupt {
        what: "role",
        detail: s.to_owned(),
    })
}

impl TryFrom<UserRow> for User {
    type Error = Error;
    fn try_from(r: UserRow) -> Result<User> {
        Ok(User {
            role: parse_role(&r.role)?,
            scope: scope_from_columns(r.scope_target, r.scope_actions)?,
            id: r.id,
            username: r.username,
            password_hash: r.password_hash,
            created_at: from_ms(r.created_at),
            disabled_at: r.disabled_at.map(from_ms),
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
    /// The role it acts with; the user's when `None` (sessions).
    pub role: Option<Role>,
    /// Its own scope, applied on top of its user's.
    pub scope: Scope,
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
    /// The role it acts with; the user's when `None`.
    pub role: Option<Role>,
    pub scope: &'a Scope,
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
        scope: &Scope,
        now: DateTime<Utc>,
    ) -> Result<User> {
        let id = new_id();
        let sql = "INSERT INTO users (id, username, password_hash, role, scope_target, scope_actions, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7)";
        let (target, actions) = scope_columns(scope);
        on_write!(self, c => sqlx::query(sql)
            .bind(&id)
            .bind(username)
            .bind(password_hash)
            .bind(role.as_str())
            .bind(target)
            .bind(&actions)
            .bind(to_ms(now))
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(User {
            id,
            username: username.to_owned(),
            password_hash: password_hash.to_owned(),
            role,
            scope: scope.clone(),
            created_at: now,
            disabled_at: None,
        })
    }

    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
        let row: Option<UserRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(username).fetch_optional(p).await)?;
        row.map(User::try_from).transpose()
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        let row: Option<UserRow> =
            on_pool!(self, p => sqlx::query_as(&sql).bind(id).fetch_optional(p).await)?;
        row.map(User::try_from).transpose()
    }

    /// Records a user token and returns its id.
    pub async fn insert_user_token(
        &self,
        t: NewUserToken<'_>,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let id = new_id();
        let sql = "INSERT INTO user_tokens (id, user_id, kind, token_hash, name, created_at, expires_at, \
                   role, scope_target, scope_actions) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
        let (target, actions) = scope_columns(t.scope);
        on_write!(self, c => sqlx::query(sql)
            .bind(&id)
            .bind(t.user_id)
            .bind(t.kind)
            .bind(t.token_hash)
            .bind(t.name)
            .bind(to_ms(now))
            .bind(t.expires_at.map(to_ms))
            .bind(t.role.map(Role::as_str))
            .bind(target)
            .bind(&actions)
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
            t_role: Option<String>,
            t_scope_target: Option<String>,
            t_scope_actions: Option<String>,
            #[sqlx(flatten)]
            user: UserRow,
        }
        let sql = "SELECT t.id AS t_id, t.kind, t.name, t.created_at AS t_created_at, t.expires_at, t.revoked_at, \
                   t.role AS t_role, t.scope_target AS t_scope_target, t.scope_actions AS t_scope_actions, \
                   u.id, u.username, u.password_hash, u.role, u.scope_target, u.scope_actions, u.created_at, u.disabled_at \
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
            role: r.t_role.as_deref().map(parse_role).transpose()?,
            scope: scope_from_columns(r.t_scope_target, r.t_scope_actions)?,
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

/// A token of any kind as a listing shows it.
#[derive(Debug, Clone)]
pub struct TokenListing {
    pub id: String,
    /// `session`, `api` or `bootstrap`.
    pub kind: String,
    pub name: Option<String>,
    /// The owner (the creator for a bootstrap token).
    pub user_id: String,
    pub username: String,
    pub role: Option<Role>,
    pub scope: Scope,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub used_at: Option<DateTime<Utc>>,
}

/// Why a role change or a disable was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserChange {
    Done,
    NotFound,
    /// It would leave no enabled admin.
    LastAdmin,
}

/// Condition that keeps at least one enabled admin other than `$N`.
const ANOTHER_ADMIN: &str = "EXISTS (SELECT 1 FROM users o WHERE o.role = 'admin' \
     AND o.disabled_at IS NULL AND o.id <> users.id)";

impl Store {
    /// Every user, by name.
    pub async fn list_users(&self) -> Result<Vec<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY username");
        let rows: Vec<UserRow> = on_pool!(self, p => sqlx::query_as(&sql).fetch_all(p).await)?;
        rows.into_iter().map(User::try_from).collect()
    }

    /// Gives a user a role and scope. Refused when it would take the role
    /// of the last enabled admin.
    pub async fn set_user_role(&self, id: &str, role: Role, scope: &Scope) -> Result<UserChange> {
        let (target, actions) = scope_columns(scope);
        let sql = format!(
            "UPDATE users SET role = $1, scope_target = $2, scope_actions = $3 \
             WHERE id = $4 AND ($1 = 'admin' OR role <> 'admin' OR disabled_at IS NOT NULL OR {ANOTHER_ADMIN})"
        );
        let n = on_write!(self, c => sqlx::query(&sql)
            .bind(role.as_str())
            .bind(target)
            .bind(&actions)
            .bind(id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        self.user_change(id, n).await
    }

    /// Disables (`Some(now)`) or enables (`None`) a user. Disabling the
    /// last enabled admin is refused.
    pub async fn set_user_disabled(
        &self,
        id: &str,
        disabled_at: Option<DateTime<Utc>>,
    ) -> Result<UserChange> {
        let sql = format!(
            "UPDATE users SET disabled_at = $1 \
             WHERE id = $2 AND ($1 IS NULL OR role <> 'admin' OR {ANOTHER_ADMIN})"
        );
        let n = on_write!(self, c => sqlx::query(&sql)
            .bind(disabled_at.map(to_ms))
            .bind(id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        self.user_change(id, n).await
    }

    async fn user_change(&self, id: &str, changed: u64) -> Result<UserChange> {
        if changed > 0 {
            return Ok(UserChange::Done);
        }
        Ok(match self.user_by_id(id).await? {
            None => UserChange::NotFound,
            Some(_) => UserChange::LastAdmin,
        })
    }

    /// Sets a user's password hash and ends their sessions but `keep` (the
    /// one making the change); returns how many were ended. API tokens
    /// stay. One transaction.
    pub async fn set_user_password(
        &self,
        id: &str,
        password_hash: &str,
        keep: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let mut tx = self.begin().await?;
        on_tx!(&mut tx, c => sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(password_hash)
            .bind(id)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        let ended = on_tx!(&mut tx, c => sqlx::query(
            "UPDATE user_tokens SET revoked_at = $1 WHERE user_id = $2 AND kind = 'session' \
             AND revoked_at IS NULL AND id <> $3",
        )
        .bind(to_ms(now))
        .bind(id)
        .bind(keep.unwrap_or(""))
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected()))?;
        tx.commit().await?;
        Ok(ended)
    }

    /// Tokens of one user (every user's when `None`): sessions and API
    /// tokens, and the bootstrap tokens they made; newest first.
    pub async fn list_tokens(&self, user_id: Option<&str>) -> Result<Vec<TokenListing>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            id: String,
            kind: String,
            name: Option<String>,
            user_id: String,
            username: String,
            role: Option<String>,
            scope_target: Option<String>,
            scope_actions: Option<String>,
            created_at: i64,
            expires_at: Option<i64>,
            revoked_at: Option<i64>,
            used_at: Option<i64>,
        }
        let sql = "SELECT t.id AS id, t.kind AS kind, t.name AS name, t.user_id AS user_id, u.username AS username, \
                   t.role AS role, t.scope_target AS scope_target, t.scope_actions AS scope_actions, \
                   t.created_at AS created_at, t.expires_at AS expires_at, t.revoked_at AS revoked_at, NULL AS used_at \
                   FROM user_tokens t JOIN users u ON u.id = t.user_id WHERE ($1 IS NULL OR t.user_id = $1) \
                   UNION ALL \
                   SELECT b.id, 'bootstrap', b.name, b.created_by, COALESCE(u.username, b.created_by), NULL, NULL, NULL, \
                   b.created_at, b.expires_at, b.revoked_at, b.used_at \
                   FROM bootstrap_tokens b LEFT JOIN users u ON u.id = b.created_by WHERE ($1 IS NULL OR b.created_by = $1) \
                   ORDER BY created_at DESC, id";
        let rows: Vec<Row> =
            on_pool!(self, p => sqlx::query_as(sql).bind(user_id).fetch_all(p).await)?;
        rows.into_iter()
            .map(|r| {
                Ok(TokenListing {
                    role: r.role.as_deref().map(parse_role).transpose()?,
                    scope: scope_from_columns(r.scope_target, r.scope_actions)?,
                    id: r.id,
                    kind: r.kind,
                    name: r.name,
                    user_id: r.user_id,
                    username: r.username,
                    created_at: from_ms(r.created_at),
                    expires_at: r.expires_at.map(from_ms),
                    revoked_at: r.revoked_at.map(from_ms),
                    used_at: r.used_at.map(from_ms),
                })
            })
            .collect()
    }

    /// One token of any kind by id.
    pub async fn token_listing(&self, id: &str) -> Result<Option<TokenListing>> {
        Ok(self
            .list_tokens(None)
            .await?
            .into_iter()
            .find(|t| t.id == id))
    }

    /// Revokes a user or bootstrap token by id; takes effect on its next
    /// use. False when it was revoked already or does not exist.
    pub async fn revoke_token(&self, id: &str, now: DateTime<Utc>) -> Result<bool> {
        let mut tx = self.begin().await?;
        let mut n = on_tx!(&mut tx, c => sqlx::query(
            "UPDATE user_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(to_ms(now))
        .bind(id)
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected()))?;
        n += on_tx!(&mut tx, c => sqlx::query(
            "UPDATE bootstrap_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(to_ms(now))
        .bind(id)
        .execute(&mut *c)
        .await
        .map(|r| r.rows_affected()))?;
        tx.commit().await?;
        Ok(n > 0)
    }
}
