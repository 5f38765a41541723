//! Work on a server's store without a server: `drover admin
//! reset-password`, for an operator who lost the admin's password. It does
//! what `POST /users/{name}/password` does (the same checks, the same
//! argon2 hash, the user's sessions ended, API tokens kept) and writes an
//! audit entry, from the machine that has the store.

use chrono::{DateTime, Utc};
use drover_store::Store;

use crate::config::ServerConfig;
use crate::Error;

/// Who does an offline change, in the audit log.
const OFFLINE_ACTOR: &str = "drover admin (offline)";

/// What `reset_password` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordReset {
    /// The database changed (its URL, the password hidden).
    pub database: String,
    /// Sessions of the user that were ended.
    pub sessions_ended: u64,
    /// The user is disabled: the new password lets them in only once
    /// they are enabled again.
    pub disabled: bool,
}

/// Sets `username`'s password to `password` in the store of `config`.
/// A SQLite database that does not exist is an error, not a new one.
pub async fn reset_password(
    config: &ServerConfig,
    username: &str,
    password: &str,
    now: DateTime<Utc>,
) -> Result<PasswordReset, Error> {
    let database = drover_store::redact(&config.database_url);
    if let Some(path) = crate::private::sqlite_path(&config.database_url) {
        if !path.exists() {
            return Err(Error::Offline(format!(
                "no database at {}: give the server's --data-dir (or --database-url)",
                path.display()
            )));
        }
    }
    crate::routes::accounts::check_password(password).map_err(|e| Error::Offline(e.message))?;
    let store = Store::open(&drover_store::Options {
        url: config.database_url.clone(),
        max_connections: 2,
    })
    .await?;
    let result = reset_in(&store, &database, username, password, now).await;
    store.close().await;
    let (sessions_ended, disabled) = result?;
    Ok(PasswordReset {
        database,
        sessions_ended,
        disabled,
    })
}

async fn reset_in(
    store: &Store,
    database: &str,
    username: &str,
    password: &str,
    now: DateTime<Utc>,
) -> Result<(u64, bool), Error> {
    let Some(user) = store.user_by_username(username).await? else {
        return Err(Error::Offline(format!(
            "no user '{username}' in {database}"
        )));
    };
    let hash = {
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
            .await
            .map_err(|e| crate::auth::SecretError::Hash(e.to_string()))??
    };
    let ended = store.set_user_password(&user.id, &hash, None, now).await?;
    let detail = serde_json::json!({ "sessions_ended": ended.to_string() }).to_string();
    store
        .audit(
            &drover_store::jobs::AuditEntry {
                actor: OFFLINE_ACTOR,
                action: "user.reset-password",
                target: &format!("user:{username}"),
                status: 200,
                outcome: "ok",
                // Not an API call: `drover admin reset-password` on the store.
                request: "",
                source: "",
                detail: &detail,
            },
            now,
        )
        .await?;
    tracing::info!(user = %username, sessions_ended = ended, "password reset offline");
    Ok((ended, user.disabled_at.is_some()))
}
